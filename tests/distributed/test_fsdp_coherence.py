"""Gradient coherence under FSDP2 on CPU (2 processes, gloo, ModelParallelStrategy +
fully_shard): ``source="accumulation"`` logs the statistics of the micro-batch gradients of
the unsharded model over the union of the ranks' micro-batches; the other sources are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import run_script
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_curvature import GradientCoherenceMonitor

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fsdp_coherence_script.py")
sys.path.insert(0, str(SCRIPT.parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from fsdp_coherence_script import ACCUMULATE, BATCH_SIZE, MAX_STEPS  # noqa: E402
from fsdp_script import loss_of, make_net  # noqa: E402
from models import TanhRegressor, csv_logger  # noqa: E402


def _micro_batch_gradients(
    weights: dict[str, torch.Tensor], batches: list[tuple[torch.Tensor, ...]]
) -> list[list[torch.Tensor]]:
    """Each batch's gradient of the mean loss of the unsharded model, in float64."""
    net = make_net().double()
    gradients = []
    for batch in batches:
        params = {n: t.double().requires_grad_() for n, t in weights.items()}
        loss = loss_of(
            lambda x, params=params: torch.func.functional_call(net, params, (x,)),
            tuple(t.double() for t in batch),
        )
        gradients.append(list(torch.autograd.grad(loss, list(params.values()))))
    return gradients


def _coherence(samples: torch.Tensor) -> float:
    return float(samples.sum(0).square().sum() / samples.square().sum())


def test_accumulation_coherence_under_fsdp2_is_that_of_the_union(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path, "train", timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Why the gradients are read from .grad: hooks on the sharded parameters never fire.
    assert [rank["shard_hook_calls"] for rank in ranks] == [0, 0]
    assert ranks[0]["grad_types"] == ["DTensor"]
    m = ACCUMULATE
    for step in range(MAX_STEPS):
        logged = [
            {k: v for k, v in rank["values"][step].items() if not k.endswith("seconds")}
            for rank in ranks
        ]
        assert logged[0] == logged[1]  # the same on both ranks
        # Sample i: the i-th micro-batch of the step over both ranks (their union).
        micro = range(step * m, (step + 1) * m)
        union = [
            tuple(torch.cat([rank["batches"][k][j] for rank in ranks]) for j in (0, 1))
            for k in micro
        ]
        assert not torch.equal(ranks[0]["batches"][micro[0]][0], ranks[1]["batches"][micro[0]][0])
        weights = ranks[0]["weights"][step]
        gradients = _micro_batch_gradients(weights, union)
        samples = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in gradients])
        s1, s2, b = samples.square().sum(), samples.sum(0).square().sum(), 2 * BATCH_SIZE
        expected = {
            "gradient/coherence": _coherence(samples),
            "gradient/grad_norm_sq": float((s2 - s1) / (m * (m - 1))),
            "gradient/trace_sigma": float((m * s1 - s2) / ((m - 1) * m / b)),
            "gradient/num_samples": m,
            "gradient/sample_size": b,
        }
        if expected["gradient/grad_norm_sq"] > 0:
            expected["gradient/noise_scale"] = (
                expected["gradient/trace_sigma"] / expected["gradient/grad_norm_sq"]
            )
        names = list(weights)
        for layer in ("0", "2", "4"):
            index = [i for i, name in enumerate(names) if name.startswith(f"{layer}.")]
            block = torch.stack([torch.cat([gs[i].reshape(-1) for i in index]) for gs in gradients])
            expected[f"gradient/coherence/net.{layer}"] = _coherence(block)
        assert set(logged[0]) == set(expected)  # no mean cosine or SNR under FSDP2
        for tag, value in expected.items():
            assert logged[0][tag] == pytest.approx(value, rel=1e-4), tag  # float32 sums
    # Harmless: the same sharded training without the monitor ends at the same weights.
    for rank in ranks:
        for name, value in rank["final"].items():
            assert torch.equal(value, rank["final_without_monitor"][name]), name
        assert not torch.equal(rank["final"]["0.weight"], rank["weights"][0]["0.weight"])


def test_accumulation_under_fsdp2_refuses_micro_batches_without_reduction(tmp_path: Path) -> None:
    """With FSDP2's reduction off, .grad changes only at a step's last micro-batch: the
    micro-batches cannot be told apart, so nothing is logged, with one warning."""
    run_script(SCRIPT, tmp_path, "nosync", timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert set(rank["values"]) == set(range(MAX_STEPS))
        assert all(values == {} for values in rank["values"].values())
    (message,) = ranks[0]["warnings"]  # once, on rank zero
    assert "set_requires_gradient_sync" in message
    assert ranks[1]["warnings"] == []


def _trainer(tmp_path: Path, accumulate: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        strategy=ModelParallelStrategy(),
        loggers=[csv_logger(tmp_path)],
        accumulate_grad_batches=accumulate,
        world_size=2,
        global_step=0,
        is_global_zero=True,
    )


@pytest.mark.parametrize(
    ("source", "reason"),
    [("probe", r"source='probe' needs per-example"), ("ddp", r"source='ddp'.*reduce-scatters")],
)
def test_probe_and_ddp_sources_are_refused_under_fsdp2(
    tmp_path: Path, source: str, reason: str
) -> None:
    monitor = GradientCoherenceMonitor(source=source, every_n_steps=1)
    with pytest.raises(
        MisconfigurationException, match=rf"does not support ModelParallelStrategy.*{reason}"
    ):
        monitor.setup(_trainer(tmp_path), TanhRegressor(), stage="fit")  # type: ignore[arg-type]


def test_accumulation_under_fsdp2_needs_two_micro_batches(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    relu = TanhRegressor()
    relu.net[1] = nn.ReLU()  # type: ignore[index]  # no Hessian here: any model will do
    monitor.setup(_trainer(tmp_path), relu, stage="fit")  # type: ignore[arg-type]
    assert monitor.skipped_statistics == ("mean_cosine", "snr")
    with pytest.raises(MisconfigurationException, match=r"FSDP2.*accumulate_grad_batches >= 2"):
        monitor.setup(_trainer(tmp_path, 1), TanhRegressor(), stage="fit")  # type: ignore[arg-type]


def test_accumulation_under_fsdp2_refuses_parameters_not_sharded(tmp_path: Path) -> None:
    """Squared norms summed over shards would count an unsharded parameter once per process."""
    trainer, model = _trainer(tmp_path), TanhRegressor()
    trainer.callbacks = []
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    monitor.setup(trainer, model, stage="fit")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"'net.0.weight' is not sharded"):
        monitor.on_train_start(trainer, model)  # type: ignore[arg-type]
