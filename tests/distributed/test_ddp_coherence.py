"""DDP on CPU (2 processes, gloo): coherence of the union of the ranks' samples, on every rank.

* ``source="probe"``: per-example statistics of the union of the two ranks' probe batches;
* ``source="accumulation"``: one sample per micro-batch of either rank (4 samples a step);
* ``source="ddp"``: one sample per rank, its gradient of the step (its 2 micro-batches),
  from scalar all-reduces and the averaged ``.grad``.

Training with the monitors is bit-for-bit training without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import run_script

from lightning_curvature import gradient_coherence
from lightning_curvature.functional.model.batches import BatchList

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_coherence_script.py")
STATISTICS = ("coherence", "mean_cosine", "noise_scale", "snr", "grad_norm_sq", "trace_sigma")


def _run(tmp_path: Path, mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    run_script(SCRIPT, tmp_path, mode)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, saved


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ranks, saved = _run(tmp_path_factory.mktemp("ddp_coherence"), "monitors")
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_coherence_script import Classifier

    model = Classifier()
    model.load_state_dict(saved[0]["weights"])
    return {"ranks": ranks, "saved": saved, "model": model}


def _loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(module.net(x), y)


def _cat(batches: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]


def _assert_logged(logged: dict[str, float], expected: Any, names: tuple[str, ...]) -> None:
    for name in names:
        assert logged[f"gradient/{name}"] == pytest.approx(
            float(getattr(expected, name)), rel=1e-5
        ), name
    assert logged["gradient/num_samples"] == expected.num_samples
    assert logged["gradient/sample_size"] == pytest.approx(expected.sample_size)
    for block, value in expected.per_layer.items():
        assert logged[f"gradient/coherence/{block}"] == pytest.approx(float(value), rel=1e-5)


def test_every_rank_logs_the_same_values(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert ranks[0]["last_step"] == {"probe": 2, "accumulation": 2, "ddp": 2}

    def without_timing(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {
            source: {k: v for k, v in tags.items() if not k.endswith("seconds")}
            for source, tags in values.items()
        }

    assert without_timing(ranks[0]["values"]) == without_timing(ranks[1]["values"])


def test_probe_source_is_the_union_of_the_probe_batches(ddp_run: dict[str, Any]) -> None:
    saved = ddp_run["saved"]
    assert not torch.equal(saved[0]["probe"][0][0], saved[1]["probe"][0][0])  # own shards
    union = _cat([s["probe"][0] for s in saved])
    expected = gradient_coherence(ddp_run["model"], _loss, union, per_layer=True)
    assert expected.num_samples == 12
    _assert_logged(ddp_run["ranks"][0]["values"]["probe"], expected, STATISTICS)


def test_accumulation_source_pools_every_ranks_micro_batches(ddp_run: dict[str, Any]) -> None:
    micro_batches = [b for s in ddp_run["saved"] for b in s["micro_batches"]]
    assert len(micro_batches) == 4
    expected = gradient_coherence(
        ddp_run["model"],
        _loss,
        BatchList(micro_batches),
        mode="micro_batch",
        micro_batch_size=None,
        per_layer=True,
    )
    _assert_logged(ddp_run["ranks"][0]["values"]["accumulation"], expected, STATISTICS)


def _ddp_source_expected(saved: list[dict[str, Any]], model: torch.nn.Module) -> Any:
    per_rank = [_cat(s["micro_batches"]) for s in saved]  # 12 examples each
    return gradient_coherence(
        model,
        _loss,
        BatchList(per_rank),
        mode="micro_batch",
        micro_batch_size=None,
        per_layer=True,
    )


DDP_SOURCE = ("coherence", "noise_scale", "grad_norm_sq", "trace_sigma")


def test_ddp_source_takes_one_sample_per_rank(ddp_run: dict[str, Any]) -> None:
    expected = _ddp_source_expected(ddp_run["saved"], ddp_run["model"])
    assert expected.num_samples == 2
    assert expected.sample_size == pytest.approx(12)
    logged = ddp_run["ranks"][0]["values"]["ddp"]
    _assert_logged(logged, expected, DDP_SOURCE)
    assert "gradient/mean_cosine" not in logged  # would need gradient-sized all-reduces
    assert "gradient/snr" not in logged


def test_ddp_source_under_sam_reads_the_gradients_at_w(tmp_path: Path) -> None:
    """SAM replaces .grad with the gradient at w + ε after the backward; the source must
    take DDP's averaged gradient of the backward pass, at w, like its samples."""
    ranks, saved = _run(tmp_path, "sam")
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_coherence_script import Classifier

    model = Classifier()
    model.load_state_dict(saved[0]["weights"])
    expected = _ddp_source_expected(saved, model)
    for rank in ranks:
        _assert_logged(rank["values"]["ddp"], expected, DDP_SOURCE)


def test_training_with_the_monitors_is_training_without_them(
    tmp_path: Path, ddp_run: dict[str, Any]
) -> None:
    _, plain = _run(tmp_path, "plain")
    for rank in (0, 1):
        with_monitors = ddp_run["saved"][rank]["final"]
        for name, value in plain[rank]["final"].items():
            assert torch.equal(with_monitors[name], value), name
