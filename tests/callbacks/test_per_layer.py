"""``per_layer`` has one grammar on every monitor that takes it: ``True`` (one block per
module), a list of patterns (one block each, tagged without the trailing ``.*``), a dict of
tag name to a pattern or a list of them (one block of every parameter matching any).

Each form is run on each monitor, measuring the initial float64 weights at step 0, and the
logged block values are checked against an independent computation: the model-level
function restricted to the block's parameters (coherence, top eigenvalue), or, for the
Hutchinson trace, whose block estimates come from the same probes, their exact additivity
(blocks that partition a set sum to the trace of the set).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    hessian_loss,
    loader,
    make_trainer,
    read_csv,
    regression_data,
)
from torch.utils.data import TensorDataset

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    gradient_coherence,
    hessian_eigenvalues,
)
from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.model.batches import BatchList

pytestmark = LIGHTNING_NOISE

WEIGHTS = ["net.0.weight", "net.2.weight"]
# The three forms, each with the blocks (tag -> parameter names) it must give.
FIRST, SECOND = ["net.0.weight", "net.0.bias"], ["net.2.weight", "net.2.bias"]
FORMS: dict[str, tuple[Any, dict[str, list[str]]]] = {
    "true": (True, {"net.0": FIRST, "net.2": SECOND}),
    "list": (["net.0.*", "*.bias"], {"net.0": FIRST, "*.bias": ["net.0.bias", "net.2.bias"]}),
    "dict": (
        {"first_weight": "net.0.weight", "second_weight": ["net.2.weight"], "weights": WEIGHTS},
        {"first_weight": ["net.0.weight"], "second_weight": ["net.2.weight"], "weights": WEIGHTS},
    ),
}  # fmt: skip


def run(tmp_path: Path, monitor: CurvatureMonitor, **trainer_options: Any) -> dict[str, Any]:
    """Train one step in float64; the model's initial copy, the batches and what was logged."""
    x, y = (t.double() for t in regression_data(n=48).tensors)
    torch.manual_seed(0)
    model = TanhRegressor().double()
    initial = copy.deepcopy(model)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1, **trainer_options)
    trainer.fit(model, loader(TensorDataset(x, y), batch_size=8))
    logged = {tag: dict(series)[0] for tag, series in read_csv(trainer.logger).items()}  # type: ignore[arg-type]
    return {"initial": initial, "logged": logged, "batches": [(x[:8], y[:8]), (x[8:16], y[8:16])]}


def block_tags(logged: dict[str, float], prefix: str) -> set[str]:
    return {tag.removeprefix(prefix) for tag in logged if tag.startswith(prefix)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("source", ["probe", "accumulation"])
def test_coherence_blocks_are_the_coherence_of_their_parameters(
    tmp_path: Path, form: str, source: str
) -> None:
    per_layer, blocks = FORMS[form]
    monitor = GradientCoherenceMonitor(
        source,  # type: ignore[arg-type]
        every_n_steps=1,
        per_layer=per_layer,
        **({"loss_fn": hessian_loss} if source == "probe" else {}),
    )
    options = {"accumulate_grad_batches": 2} if source == "accumulation" else {}
    out = run(tmp_path, monitor, **options)
    logged = out["logged"]
    assert block_tags(logged, "gradient/coherence/") == set(blocks)
    if source == "probe":
        assert monitor.fixed_probe is not None
        batch, sampling = monitor.fixed_probe, {}
    else:  # the step's two micro-batches, one sample each
        batch, sampling = (
            BatchList(out["batches"]),
            {"mode": "micro_batch", "micro_batch_size": None},
        )
    for tag, names in blocks.items():
        expected = gradient_coherence(
            out["initial"], hessian_loss, batch, parameters=names, batch_norm="eval", **sampling
        )
        assert logged[f"gradient/coherence/{tag}"] == pytest.approx(
            float(expected.coherence), rel=1e-10
        ), tag


@pytest.mark.parametrize("form", list(FORMS))
def test_eigenvalue_blocks_are_the_top_eigenvalue_of_their_parameters(
    tmp_path: Path, form: str
) -> None:
    per_layer, blocks = FORMS[form]
    monitor = HessianEigenvalueMonitor(
        tol=1e-6, stability=False, every_n_steps=1, per_layer=per_layer, loss_fn=hessian_loss
    )
    out = run(tmp_path, monitor)
    logged = out["logged"]
    assert block_tags(logged, "curvature/eigenvalue_1/") == set(blocks)
    assert monitor.fixed_probe is not None
    for tag, names in blocks.items():
        exact = hessian_eigenvalues(
            out["initial"],
            hessian_loss,
            monitor.fixed_probe,
            k=1,
            tol=1e-6,
            parameters=names,
            batch_norm="train",
            generator=make_generator(torch.device("cpu")),
        )
        assert logged[f"curvature/eigenvalue_1/{tag}"] == pytest.approx(
            float(exact.eigenvalues[0]), rel=1e-5
        ), tag


def test_trace_blocks_of_every_form_add_up_as_their_parameters_do(tmp_path: Path) -> None:
    """Hutchinson's block traces share the probes: disjoint blocks add up exactly."""
    logged = {}
    for form, (per_layer, blocks) in FORMS.items():
        monitor = HessianTraceMonitor(
            num_hvps=4, every_n_steps=1, per_layer=per_layer, loss_fn=hessian_loss
        )
        logged[form] = run(tmp_path / form, monitor)["logged"]
        assert block_tags(logged[form], "curvature/trace/") == set(blocks), form
    # the same seed and probe batch: every run draws the same probe vectors
    assert len({values["curvature/trace"] for values in logged.values()}) == 1
    true, listed, named = logged["true"], logged["list"], logged["dict"]
    total = true["curvature/trace"]
    assert true["curvature/trace/net.0"] + true["curvature/trace/net.2"] == pytest.approx(
        total, rel=1e-12
    )
    assert listed["curvature/trace/net.0"] == pytest.approx(
        true["curvature/trace/net.0"], rel=1e-12
    )
    weights = named["curvature/trace/first_weight"] + named["curvature/trace/second_weight"]
    assert named["curvature/trace/weights"] == pytest.approx(weights, rel=1e-12)
    biases = total - weights
    assert listed["curvature/trace/*.bias"] == pytest.approx(biases, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "monitor", [HessianEigenvalueMonitor, HessianTraceMonitor, GradientCoherenceMonitor]
)
@pytest.mark.parametrize(
    ("per_layer", "match"),
    [
        ("net.*", r"`per_layer` must be True/False, a list .* got 'net\.\*'"),
        ({"head": []}, r"`per_layer` must be True/False, a list .* got \{'head': \[\]\}"),
        ({3: "net.*"}, r"`per_layer` must be True/False, a list"),
        (
            ["net.0.*", "net.0*"],
            r"`per_layer` patterns \['net\.0\.\*', 'net\.0\*'\] give the same tag",
        ),
    ],
    ids=["string", "empty-block", "non-string-tag", "same-tag-twice"],
)
def test_every_monitor_refuses_what_is_outside_the_grammar(
    monitor: type, per_layer: Any, match: str
) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        monitor(per_layer=per_layer)


@pytest.mark.parametrize(
    "monitor", [HessianEigenvalueMonitor, HessianTraceMonitor, GradientCoherenceMonitor]
)
@pytest.mark.parametrize("per_layer", [False, None, [], {}])
def test_no_blocks_however_it_is_said(monitor: type, per_layer: Any) -> None:
    built = monitor(per_layer=per_layer)
    assert built.per_layer is False
    assert not built.blocks.requested
