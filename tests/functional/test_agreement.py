"""The agreement of a probe's processes, simulated by threads: a failure anywhere is agreed.

Each thread plays one process; their in-place sum is a barrier that also checks that the
processes meet at collectives of one shape, as gloo requires (a mismatch is what aborts or
hangs real processes). Every failure case must end with every process raising the same
``ProbeFailure`` after the same number of collectives, and the next probe must run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_curvature.errors import PeerFailure, ProbeFailure
from lightning_curvature.functional.distributed.agreement import (
    Agreement,
    agreed,
    check_agreement,
    describe_error,
)

WORLD = 2


class Processes:
    """``WORLD`` threads summing tensors in place, counting the collectives each made."""

    def __init__(self) -> None:
        self._barrier = threading.Barrier(WORLD, timeout=20)
        self._slots: list[torch.Tensor | None] = [None] * WORLD
        self.collectives = [0] * WORLD

    def sum_in_place(self, rank: int) -> Callable[[torch.Tensor], None]:
        def total(tensor: torch.Tensor) -> None:
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            shapes = {tuple(t.shape) for t in self._slots if t is not None}
            summed = torch.stack([t for t in self._slots if t is not None]).sum(0)
            self._barrier.wait()
            if len(shapes) != 1:
                raise AssertionError(f"collectives of different shapes met: {shapes}")
            tensor.copy_(summed)
            self.collectives[rank] += 1

        return total

    def agreement(self, rank: int) -> Agreement:
        return Agreement(self.sum_in_place(rank), rank=rank, world_size=WORLD)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(rank)`` on every simulated process; what each returned or raised."""
        results: list[Any] = [None] * WORLD

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as err:
                results[rank] = err
                if not isinstance(err, ProbeFailure):
                    self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(WORLD)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a process hangs"
        return results


def probe(processes: Processes, fails: dict[int, tuple[int, BaseException]], length: int = 6):
    """A probe of ``length`` agreed sums; rank r raises ``fails[r][1]`` before sum ``fails[r][0]``.

    Returns each rank's ``ProbeFailure``, or the list of its sums.
    """

    def on(rank: int) -> Any:
        agreement = processes.agreement(rank)
        all_sum = agreed(processes.sum_in_place(rank))
        sums = []
        try:
            with agreement.probe():
                for i in range(length + 1):
                    if fails.get(rank, (None,))[0] == i:
                        raise fails[rank][1]
                    if i < length:
                        sums.append(float(all_sum(torch.full((i + 1,), float(rank + 1)))[0]))
        except ProbeFailure as failure:
            return failure
        return sums

    return processes.run(on)


def test_a_probe_that_fails_nowhere_sums_and_ends_with_one_status() -> None:
    processes = Processes()
    results = probe(processes, {})
    assert results == [[3.0] * 6] * 2
    assert processes.collectives == [13, 13]  # a status and a payload per sum, one at the end


@pytest.mark.parametrize("where", [0, 3, 6], ids=["before-any", "mid-lanczos", "after-last"])
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("boom"),
        ValueError("the loss is not a scalar"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_one_rank_failing_anywhere_fails_the_probe_on_every_rank_in_step(
    where: int, error: Exception
) -> None:
    processes = Processes()
    results = probe(processes, {1: (where, error)})
    for result in results:
        assert isinstance(result, ProbeFailure)
        assert result.failures == {1: describe_error(error)}
        assert str(result) == f"rank 1 raised {describe_error(error)}"
    assert results[1].__cause__ is error  # the failed rank keeps its own exception
    assert isinstance(results[0].__cause__, type(None))
    # every rank met the same collectives: the payloads before the failure, one status
    # that carried it, the descriptions
    assert processes.collectives == [2 * where + 2] * 2
    assert probe(processes, {}) == [[3.0] * 6] * 2  # the next probe runs


def test_two_ranks_failing_at_different_points_agree_on_the_first() -> None:
    processes = Processes()
    results = probe(processes, {0: (2, KeyError("a")), 1: (4, ValueError("b"))})
    assert all(isinstance(r, ProbeFailure) for r in results)
    assert results[0].failures == results[1].failures == {0: "KeyError: 'a'"}


def test_two_ranks_failing_together_are_both_named() -> None:
    processes = Processes()
    results = probe(processes, {0: (1, KeyError("a")), 1: (1, ValueError("b"))})
    assert (
        str(results[0])
        == str(results[1])
        == "rank 0 raised KeyError: 'a'; rank 1 raised ValueError: b"
    )


def test_keyboard_interrupt_is_no_probe_failure() -> None:
    with pytest.raises(KeyboardInterrupt), Agreement().probe():
        raise KeyboardInterrupt


def test_one_process_raises_a_probe_failure_naming_no_rank() -> None:
    with pytest.raises(ProbeFailure, match=r"^ValueError: bad$") as caught, Agreement().probe():
        raise ValueError("bad")
    assert caught.value.failures == {0: "ValueError: bad"}
    assert isinstance(caught.value.__cause__, ValueError)


def test_outside_a_probe_agreed_sums_make_no_status_collective() -> None:
    processes = Processes()
    results = processes.run(lambda rank: agreed(processes.sum_in_place(rank))(torch.ones(3)))
    assert [r.tolist() for r in results] == [[2.0, 2.0, 2.0]] * 2
    assert processes.collectives == [1, 1]
    check_agreement()  # nothing to check outside a probe


def test_a_nested_probe_is_covered_by_the_outer_one() -> None:
    processes = Processes()

    def on(rank: int) -> Any:
        outer = processes.agreement(rank)
        try:
            with outer.probe(), processes.agreement(rank).probe():
                if rank == 1:
                    raise RuntimeError("inner")
                agreed(processes.sum_in_place(rank))(torch.ones(1))
        except ProbeFailure as failure:
            return failure
        return None

    results = processes.run(on)
    assert [r.failures for r in results] == [{1: "RuntimeError: inner"}] * 2
    assert processes.collectives == [2, 2]  # one status meeting the failure, the descriptions


def test_a_peer_failure_is_no_runtime_error_so_no_fallback_swallows_it() -> None:
    assert not issubclass(PeerFailure, RuntimeError)
    assert not issubclass(PeerFailure, (ValueError, ArithmeticError))


def test_the_description_of_a_long_error_is_cut_and_decoded() -> None:
    processes = Processes()
    text = "é" * 2000  # two bytes each: cut inside the limit, decoded without error
    results = probe(processes, {1: (0, RuntimeError(text))})
    what = results[0].failures[1]
    assert what.startswith("RuntimeError: éé")
    assert len(what.encode()) <= 1024 + 3
