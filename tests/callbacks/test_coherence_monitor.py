"""GradientCoherenceMonitor: every source logs what gradient_coherence computes by hand.

Each run records, at every step, the weights before the step and the micro-batches it
trained on (a callback placed before the monitor); the logged values must equal the
model-level function on those weights and batches: the probe batch for ``source="probe"``,
the step's micro-batches (one sample each) for ``source="accumulation"``. Models are in
float64 where the comparison is exact to rounding.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    hessian_loss,
    loader,
    make_trainer,
    read_csv,
    read_events,
    regression_data,
    steps,
    tb_logger,
    tb_scalars,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    SAM,
    CurvatureWarning,
    GradientCoherenceMonitor,
    gradient_coherence,
)
from lightning_curvature.callbacks import CurvatureMonitor, training_step_loss
from lightning_curvature.callbacks.training_coherence import (
    PROBE_OPTIONS,
    TrainingGradientCoherenceMonitor,
)
from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.model.batches import BatchList

pytestmark = [
    *LIGHTNING_NOISE,
    pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available.*"),
]

STATISTICS = ("coherence", "mean_cosine", "noise_scale", "snr", "grad_norm_sq", "trace_sigma")


class Recorder(pl.Callback):
    """Weights before each optimizer step and the micro-batches it trains on."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, list[Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step not in self.weights:
            self.weights[step] = copy.deepcopy(pl_module.state_dict())
        self.batches.setdefault(step, []).append([t.clone() for t in batch])

    def model_at(self, step: int, template: pl.LightningModule) -> pl.LightningModule:
        model = copy.deepcopy(template)
        model.load_state_dict(self.weights[step])
        return model


def fit(
    tmp_path: Path,
    monitor: GradientCoherenceMonitor,
    *,
    double: bool = True,
    steps_: int = 4,
    batch_size: int = 8,
    callbacks_after: list[pl.Callback] | None = None,
    **trainer_options: Any,
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    data = regression_data(n=48)
    if double:
        data = TensorDataset(*(t.double() for t in data.tensors))
    model = TanhRegressor()
    if double:
        model = model.double()
    recorder = Recorder()
    logger = csv_logger(tmp_path)
    callbacks = [recorder, monitor, *(callbacks_after or [])]
    trainer = make_trainer(callbacks, logger=logger, max_steps=steps_, **trainer_options)
    trainer.fit(model, loader(data, batch_size=batch_size, shuffle=True))
    return {"model": model, "recorder": recorder, "logged": read_csv(logger), "trainer": trainer}


def micro_batch_reference(run: dict[str, Any], step: int, **kwargs: Any) -> Any:
    """gradient_coherence on the weights and micro-batches of ``step``, one sample each."""
    recorder = run["recorder"]
    return gradient_coherence(
        recorder.model_at(step, run["model"]),
        hessian_loss,
        BatchList(recorder.batches[step]),
        mode="micro_batch",
        micro_batch_size=None,
        **kwargs,
    )


def assert_logged_equals(
    logged: dict[str, list[tuple[int, float]]],
    step: int,
    expected: Any,
    rel: float,
    names: tuple[str, ...] = STATISTICS,
) -> None:
    at_step = {tag: dict(series)[step] for tag, series in logged.items() if step in dict(series)}
    for name in names:
        assert at_step[f"gradient/{name}"] == pytest.approx(
            float(getattr(expected, name)), rel=rel
        ), name
    assert at_step["gradient/num_samples"] == expected.num_samples
    assert at_step["gradient/sample_size"] == pytest.approx(expected.sample_size)
    for block, value in expected.per_layer.items():
        assert at_step[f"gradient/coherence/{block}"] == pytest.approx(float(value), rel=rel)


# -- source="probe" ------------------------------------------------------------------------------
def test_probe_source_logs_per_example_statistics_of_the_fixed_probe(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(every_n_steps=2, per_layer=True)
    run = fit(tmp_path, monitor)
    logged, recorder = run["logged"], run["recorder"]
    assert steps(logged["gradient/coherence"]) == [0, 2]
    assert "probe_cost/coherence_hvps" not in logged  # no Hessian-vector products: no HVP count
    assert steps(logged["probe_cost/coherence_seconds"]) == [0, 2]
    probe = monitor._fixed_batches
    assert probe is not None
    for step in (0, 2):
        expected = gradient_coherence(
            recorder.model_at(step, run["model"]),
            training_step_loss,
            BatchList(probe),
            per_layer=True,
            batch_norm="eval",
        )
        assert expected.mode == "per_example"
        assert expected.num_samples == 8
        assert {"net.0", "net.2"} == set(expected.per_layer)
        assert_logged_equals(logged, step, expected, rel=1e-10)
    first, second = (dict(logged["gradient/coherence"])[s] for s in (0, 2))
    assert first != second  # the weights moved, so the comparison above is not vacuous


def test_probe_source_with_micro_batches_and_named_blocks(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(
        mode="micro_batch",
        micro_batch_size=2,
        per_layer={"hidden": "net.0.*"},
        every_n_steps=3,
        probe_batches=2,
    )
    run = fit(tmp_path, monitor, steps_=4)
    probe = monitor._fixed_batches
    assert probe is not None
    assert len(probe) == 2
    expected = gradient_coherence(
        run["recorder"].model_at(3, run["model"]),
        training_step_loss,
        BatchList(probe),
        mode="micro_batch",
        micro_batch_size=2,
        per_layer=["net.0.*"],
        batch_norm="eval",
    )
    assert expected.num_samples == 8
    assert expected.sample_size == 2
    expected_tagged = copy.copy(expected)
    object.__setattr__(expected_tagged, "per_layer", {"hidden": expected.per_layer["net.0.*"]})
    assert_logged_equals(run["logged"], 3, expected_tagged, rel=1e-10)


# -- source="accumulation" -----------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulation_source_equals_the_statistics_of_the_steps_micro_batches(
    tmp_path: Path, accumulate: int
) -> None:
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1, per_layer=True)
    run = fit(tmp_path, monitor, accumulate_grad_batches=accumulate, steps_=3)
    logged, recorder = run["logged"], run["recorder"]
    assert steps(logged["gradient/coherence"]) == [0, 1, 2]
    for step in (0, 1, 2):
        assert len(recorder.batches[step]) == accumulate
        expected = micro_batch_reference(run, step, per_layer=True)
        assert expected.num_samples == accumulate
        assert expected.sample_size == 8
        assert_logged_equals(logged, step, expected, rel=1e-9)


def test_with_sam_the_samples_are_the_gradients_at_w_not_at_w_plus_eps(tmp_path: Path) -> None:
    """SAM's second pass (at w + ε) replaces .grad after the backward; the free source reads
    the backward passes at w, so its values are those of the same weights without SAM."""
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    sam = SAM(rho=0.5)
    run = fit(tmp_path, monitor, accumulate_grad_batches=2, steps_=3, callbacks_after=[sam])
    assert sam.num_sam_steps == 3
    recorder = run["recorder"]
    assert not torch.equal(recorder.weights[2]["net.0.weight"], recorder.weights[0]["net.0.weight"])
    for step in (0, 1, 2):
        expected = micro_batch_reference(run, step)
        assert_logged_equals(run["logged"], step, expected, rel=1e-9)


def test_accumulation_source_in_float32_matches_to_rounding(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=2)
    run = fit(tmp_path, monitor, double=False, accumulate_grad_batches=4, steps_=3)
    for step in (0, 2):
        expected = micro_batch_reference(run, step)
        assert_logged_equals(run["logged"], step, expected, rel=1e-4)


def test_accumulation_source_undoes_the_grad_scalers_scale(tmp_path: Path) -> None:
    """Under 16-mixed with a real GradScaler the backward gradients are 2**16 times larger;
    the logged ‖G‖² must be that of the unscaled gradients (a missing unscale is 2**32 off).
    Steps the scaler skips (an fp16 overflow, routine while it calibrates) log nothing and
    warn nothing: training skips them too."""
    scaled = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    run = fit(tmp_path, scaled, double=False, accumulate_grad_batches=2, steps_=6, plugins=[plugin])
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() >= 2.0**10
    logged_steps = steps(run["logged"]["gradient/coherence"])
    assert 0 < len(logged_steps) < 6  # some steps overflowed, the others were measured
    for step in logged_steps:
        expected = micro_batch_reference(run, step)
        # fp16 autocast changes the gradients by ~1e-3 relative; the scale would be 2**16.
        assert_logged_equals(
            run["logged"], step, expected, rel=2e-2, names=("coherence", "grad_norm_sq")
        )


def test_a_step_with_one_micro_batch_warns_once_and_logs_nothing_for_it(tmp_path: Path) -> None:
    """48 examples in batches of 8 with accumulation 4: every epoch's second window has 2
    micro-batches (fine), with accumulation 5 its second has 1 (too few samples)."""
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    with pytest.warns(CurvatureWarning) as records:
        run = fit(tmp_path, monitor, accumulate_grad_batches=5, steps_=4)
    messages = [str(r.message) for r in records.list if issubclass(r.category, CurvatureWarning)]
    assert len(messages) == 1, messages
    assert "1 gradient sample" in messages[0]
    assert "step 1" in messages[0]
    assert steps(run["logged"]["gradient/coherence"]) == [0, 2]
    assert run["trainer"].global_step == 4


def test_non_finite_training_gradients_skip_those_steps_with_one_warning(tmp_path: Path) -> None:
    """A NaN loss at step 1 makes the weights NaN from then on (SGD steps with it): steps 1
    and 2 are skipped with one warning in all, and training runs to its end."""

    class NaNAtStep1(TanhRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if self.trainer.global_step == 1 else loss

    pl.seed_everything(0, verbose=False)
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    logger = csv_logger(tmp_path)
    trainer = make_trainer(
        [monitor], logger=logger, max_steps=3, accumulate_grad_batches=2, detect_anomaly=False
    )
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(NaNAtStep1(), loader(regression_data(n=48), 8))
    messages = [str(r.message) for r in records.list if issubclass(r.category, CurvatureWarning)]
    assert len(messages) == 1, messages
    assert "step 1" in messages[0]
    assert "not finite" in messages[0]
    assert steps(read_csv(logger)["gradient/coherence"]) == [0]
    assert trainer.global_step == 3


def test_a_batch_without_an_example_dimension_warns_and_logs_nothing(tmp_path: Path) -> None:
    class Scalars(TanhRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch[1:], batch_idx)

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        x, y = (torch.stack(column) for column in zip(*items, strict=True))
        return torch.tensor(0.0), x, y  # its first tensor has no leading dimension

    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path)
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    trainer = make_trainer([monitor], logger=logger, max_steps=2, accumulate_grad_batches=2)
    data = DataLoader(regression_data(n=32), batch_size=8, collate_fn=collate)
    with pytest.warns(CurvatureWarning, match="number of examples is unknown"):
        trainer.fit(Scalars(), data)
    assert "gradient/coherence" not in read_csv(logger)
    assert trainer.global_step == 2


def test_no_noise_scale_is_logged_where_the_signal_is_below_its_noise(tmp_path: Path) -> None:
    """Two examples with opposite gradients: Σg = 0, so the unbiased ‖G‖² is negative and
    tr Σ/‖G‖² meaningless; its parts are logged, the ratio is not."""

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 1, bias=False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).mean()  # per-example gradient: the example itself

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    logger = csv_logger(tmp_path)
    monitor = GradientCoherenceMonitor(every_n_steps=1)
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    make_trainer([monitor], logger=logger, max_steps=2).fit(
        Linear(), DataLoader(TensorDataset(x), batch_size=2)
    )
    logged = read_csv(logger)
    assert "gradient/noise_scale" not in logged
    assert [v for _, v in logged["gradient/grad_norm_sq"]] == [-5.0, -5.0]  # -S₁/(m(m-1))
    assert [v for _, v in logged["gradient/coherence"]] == [0.0, 0.0]
    assert [v for _, v in logged["gradient/trace_sigma"]] == [10.0, 10.0]


def test_event_file_has_every_tag_at_the_measured_steps(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    logger = tb_logger(tmp_path)
    monitors = [
        GradientCoherenceMonitor(every_n_steps=2, per_layer=["net.2.*"]),
        GradientCoherenceMonitor(source="accumulation", every_n_steps=3, seed=1),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=5, accumulate_grad_batches=2)
    trainer.fit(TanhRegressor(), loader(regression_data(n=48), 8, shuffle=True))
    scalars = tb_scalars(read_events(logger))
    for tag in (*(f"gradient/{n}" for n in (*STATISTICS, "num_samples", "sample_size")),
                "probe_cost/coherence_seconds"):  # fmt: skip
        # both monitors write every tag; the probe at 0, 2, 4, the free one at 0, 3
        assert steps(scalars[tag]) == [0, 0, 2, 3, 4], tag
    assert steps(scalars["gradient/coherence/net.2"]) == [0, 2, 4]
    # the values in the file are the monitors' last ones
    assert scalars["gradient/coherence"][-1][1] == pytest.approx(
        monitors[0].last_metrics["gradient/coherence"]
    )
    assert scalars["gradient/coherence"][-2][1] == pytest.approx(
        monitors[1].last_metrics["gradient/coherence"]
    )


def test_a_resumed_run_measures_at_the_same_steps_with_the_same_values(tmp_path: Path) -> None:
    def run(name: str, ckpt_path: Path | None = None) -> dict[str, list[tuple[int, float]]]:
        pl.seed_everything(0, verbose=False)
        monitors = [
            GradientCoherenceMonitor(source="accumulation", every_n_steps=3),
            GradientCoherenceMonitor(every_n_steps=4, mode="micro_batch", micro_batch_size=2),
        ]
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path / "checkpoints", every_n_train_steps=5, save_top_k=-1
        )
        logger = csv_logger(tmp_path, name)
        trainer = make_trainer(
            [*monitors, checkpoints],
            logger=logger,
            max_steps=10,
            accumulate_grad_batches=2,
            enable_checkpointing=True,
        )
        # 10 micro-batches (5 steps) per epoch, in order: the resumed run sees the same data.
        trainer.fit(TanhRegressor(), loader(regression_data(n=80), 8), ckpt_path=ckpt_path)
        return {t: v for t, v in read_csv(logger).items() if not t.endswith("seconds")}

    full = run("full")
    (checkpoint,) = (tmp_path / "checkpoints").glob("*step=5.ckpt")
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    coherence = [s for key, s in states.items() if key.startswith("GradientCoherenceMonitor")]
    assert sorted(state["schedule"]["last_step"] for state in coherence) == [3, 4]
    resumed = run("resumed", checkpoint)
    assert steps(resumed["gradient/coherence"]) == [6, 8, 9]
    for tag, series in resumed.items():
        assert series == [(s, v) for s, v in full[tag] if s >= 5], tag


# -- construction and setup ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"source": "gradients"}, "source"),
        ({"mode": "vmap"}, "mode"),
        *[({"micro_batch_size": v}, "micro_batch_size") for v in (0, 2.0, True)],
        *[({"chunk_size": v}, "chunk_size") for v in (0, -4, "8")],
        ({"per_layer": "net.*"}, "per_layer"),
        ({"per_layer": [3]}, "per_layer"),
        ({"backend": "double_backward"}, "backend"),
        ({"source": "accumulation", "probe": "current"}, "probe"),
        ({"source": "ddp", "probe_batches": 2}, "probe_batches"),
        ({"source": "ddp", "loss_fn": hessian_loss}, "loss_fn"),
        ({"source": "accumulation", "batch_norm": "train"}, "batch_norm"),
        ({"source": "accumulation", "probe_dataloader": [torch.zeros(2)]}, "probe_dataloader"),
        ({"source": "accumulation", "on_train_end": True}, "on_train_end"),
        ({"source": "accumulation", "mode": "per_example"}, "mode"),
        ({"source": "ddp", "chunk_size": 4}, "chunk_size"),
    ],
    ids=repr,
)
def test_invalid_arguments_raise_at_construction_naming_them(
    kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(MisconfigurationException, match=name) as raised:
        GradientCoherenceMonitor(**kwargs)
    assert "got" in str(raised.value) or "apply" in str(raised.value)


def test_free_sources_accept_the_probe_options_at_their_defaults() -> None:
    """LightningCLI passes every argument of the signature, defaults included."""
    for source in ("accumulation", "ddp"):
        GradientCoherenceMonitor(
            source=source,  # type: ignore[arg-type]
            probe="fixed",
            probe_batches=1,
            probe_dataloader=None,
            loss_fn=None,
            batch_norm="eval",
            backend="auto",
            on_train_end=False,
        )


@pytest.mark.parametrize(
    ("monitor", "trainer_options", "match"),
    [
        (GradientCoherenceMonitor(source="accumulation"), {}, "accumulate_grad_batches >= 2"),
        (GradientCoherenceMonitor(source="ddp"), {}, "at least 2 processes"),
    ],
    ids=["accumulation-without-accumulation", "ddp-on-one-process"],
)
def test_a_free_source_without_samples_to_read_fails_at_setup(
    tmp_path: Path, monitor: GradientCoherenceMonitor, trainer_options: dict[str, Any], match: str
) -> None:
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1, **trainer_options)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))


def test_a_free_source_with_manual_optimization_fails_at_setup(tmp_path: Path) -> None:
    class Manual(TanhRegressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(hessian_loss(self, batch))
            opt.step()  # type: ignore[union-attr]

    monitor = GradientCoherenceMonitor(source="accumulation")
    trainer = make_trainer(
        [monitor], logger=csv_logger(tmp_path), max_steps=1, accumulate_grad_batches=2
    )
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        trainer.fit(Manual(), loader(regression_data(), 8))
    # ... while the probe source works with manual optimization given a loss_fn
    probe = GradientCoherenceMonitor(loss_fn=hessian_loss, every_n_steps=1)
    logger = csv_logger(tmp_path, "manual")
    make_trainer([probe], logger=logger, max_steps=2).fit(Manual(), loader(regression_data(), 8))
    assert steps(read_csv(logger)["gradient/coherence"]) == [0, 1]


def test_hooks_are_gone_after_training_and_never_outlive_a_backward(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(source="accumulation", every_n_steps=1)
    with warnings.catch_warnings():
        run = fit(tmp_path, monitor, accumulate_grad_batches=2, steps_=2)
    for p in run["model"].parameters():
        assert not p._backward_hooks  # every hook was removed after its backward
    assert monitor._step is None


# -- the two kinds of monitor behind one constructor -----------------------------------------
def test_each_source_builds_the_monitor_of_what_it_reads() -> None:
    probe = GradientCoherenceMonitor()
    free = [GradientCoherenceMonitor(source=s) for s in ("accumulation", "ddp")]  # type: ignore[arg-type]
    assert type(probe) is GradientCoherenceMonitor
    assert all(type(m) is TrainingGradientCoherenceMonitor for m in free)
    assert all(isinstance(m, GradientCoherenceMonitor) for m in free)
    assert [m.source for m in free] == ["accumulation", "ddp"]
    assert [m.skipped_statistics for m in (probe, *free)] == [(), (), ("mean_cosine", "snr")]
    # one checkpoint key format for every source, as before the two classes
    assert all(m.state_key.startswith("GradientCoherenceMonitor{") for m in (probe, *free))
    assert len({m.state_key for m in (probe, *free)}) == 3
    with pytest.raises(MisconfigurationException, match=r"`source` must be one of .*'probe'"):
        TrainingGradientCoherenceMonitor(source="probe")  # type: ignore[arg-type]


def test_the_neutral_probe_options_are_the_signature_defaults() -> None:
    """What a free source accepts of the probe options is what LightningCLI passes."""
    defaults = {
        name: parameter.default
        for cls in (CurvatureMonitor, GradientCoherenceMonitor)
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
    }
    assert {name: defaults[name] for name in PROBE_OPTIONS} == PROBE_OPTIONS


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"micro_batch_size": 4}, "micro_batch_size"),
        ({"micro_batch_size": None}, "micro_batch_size"),
        ({"probe_batches": True}, "probe_batches"),
    ],
    ids=repr,
)
def test_free_sources_refuse_the_probe_options_they_cannot_use(
    kwargs: dict[str, Any], name: str
) -> None:
    for source in ("accumulation", "ddp"):
        with pytest.raises(MisconfigurationException, match=f"`{name}`.*do not apply"):
            GradientCoherenceMonitor(source=source, **kwargs)  # type: ignore[arg-type]


def test_sums_cross_processes_in_one_collective() -> None:
    """Every state of the sums (vectors and blocks included) goes in one reduce call."""
    calls: list[tuple[int, ...]] = []

    class Strategy:
        def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            calls.append(tuple(tensor.shape))
            assert reduce_op == "sum"
            return 2 * tensor  # two identical processes

    class Trainer:
        world_size = 2
        strategy = Strategy()

    sums = GradientSums.zeros(3, dtype=torch.float64, blocks={"a": [slice(0, 1)]})
    sums.add(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64))
    total = GradientCoherenceMonitor.summed_over_processes(Trainer(), sums)  # type: ignore[arg-type]
    # 4 scalars, 3 vectors of 3, 1 block; the processes, those of each kind of sample
    assert calls == [(4 + 3 * 3 + 1 + 3,)]
    assert total.num_samples == 4
    for name, value in sums.states().items():
        assert torch.equal(total.states()[name], 2 * value), name
    alone = GradientCoherenceMonitor.summed_over_processes(pl.Trainer(logger=False), sums)
    assert alone is sums
