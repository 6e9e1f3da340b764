"""Loud on bad input: every public name refuses every bad argument, naming it.

Each public name of ``lightning_curvature.__all__`` that a user calls (the model-level
functions, ``HessianOperator``, ``OperatorOptions``, ``OutputLoss`` and every callback's
constructor) is described once, in :data:`SIGNATURES`, as the *kind* of each argument (a count,
a real number in a range, a flag, a choice, a tensor of a shape, a module, a batch, ...). Each
kind generates its bad values systematically (:meth:`Kind.bad`): a wrong type, ``None``
where it is not allowed, NaN, ±inf, a negative, zero, a value below the minimum or above the
maximum, a huge budget. Every such call must raise the layer's error (``ValueError`` or
``TypeError`` for the functions, ``MisconfigurationException`` for the callbacks) with a
message that names the argument in backticks, and, for scalars, quotes the value given.

``python tests/test_bad_input.py`` prints the census: how many bad calls are refused clearly,
end in another exception (an obscure traceback) or are silently accepted.
"""

from __future__ import annotations

import math
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_curvature as lc

HUGE = 10**12  # a budget that would run (or allocate) without end
NAN, INF = math.nan, math.inf


# -- the kinds of argument, and their bad values ------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """An argument's kind: what it takes, and so which values are bad."""

    none_ok: bool = field(default=False, kw_only=True)

    def bad(self) -> Iterator[tuple[str, Any]]:
        """``(label, value)`` of each bad value, ``None`` included unless it is allowed."""
        if not self.none_ok:
            yield "None", None
        yield from self.own()

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from ()

    def errors(self, label: str) -> tuple[type[Exception], ...] | None:
        """The error a bad value of this label raises, if not the layer's own."""
        return None


@dataclass(frozen=True)
class Count(Kind):
    """An integer ``>= minimum``; ``budget``: a count of work, refused when huge."""

    minimum: int = 1
    budget: bool = False
    maximum: int | None = None

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("str", "3"), ("float", 2.5), ("bool", True))
        yield from (("nan", NAN), ("inf", INF), ("-inf", -INF))
        low = {-1: "negative", 0: "zero"}
        low.setdefault(self.minimum - 1, "below minimum")
        for value, label in low.items():
            if value < self.minimum:
                yield label, value
        if self.budget:
            yield "huge", HUGE
        if self.maximum is not None:
            yield "above maximum", self.maximum + 1


@dataclass(frozen=True)
class Cadence(Count):
    """``every_n_steps`` of a monitor: a count, ``"auto"`` or ``None``."""

    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from super().own()
        yield "other string", "often"


@dataclass(frozen=True)
class Real(Kind):
    """A finite real number in ``[low, high]`` (ends open where asked)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("str", "0.5"), ("bool", True), ("complex", 1j))
        yield from (("nan", NAN), ("inf", INF), ("-inf", -INF))
        if self.low is not None and self.low >= 0:
            yield "negative", -1.0
        if self.low == 0 and self.low_open:
            yield "zero", 0.0
        if self.high is not None:
            yield "above maximum", self.high * 2 + 1
            if self.high_open:
                yield "maximum", float(self.high)


@dataclass(frozen=True)
class Flag(Kind):
    """``True`` or ``False``: no truthy stand-ins."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("str", "yes"), ("empty str", ""), ("int 1", 1), ("int 0", 0), ("nan", NAN))


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few strings."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("unknown", "nope"), ("int", 3), ("bool", True), ("nan", NAN))


@dataclass(frozen=True)
class Function(Kind):
    """A callable."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("str", "loss"), ("nan", NAN))


@dataclass(frozen=True)
class Patterns(Kind):
    """``parameters=``: ``None``, a glob pattern or a non-empty list of them."""

    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("float", 2.5), ("nan", NAN), ("bytes", b"0.*"))
        yield from (("list of int", [3]), ("empty str", ""), ("empty list", []))
        yield from (("empty pattern", ["0.*", ""]), ("dict", {"0.*": "x"}))


@dataclass(frozen=True)
class Blocks(Kind):
    """``per_layer=``: a bool, a list of patterns or a dict of name to pattern(s)."""

    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("float", 2.5), ("nan", NAN), ("bare str", "0.*"))
        yield from (("list of int", [3]), ("dict of int", {"a": 3}), ("int key", {3: "0.*"}))
        yield from (("empty block", {"a": []}),)


@dataclass(frozen=True)
class Module(Kind):
    """``model``: an ``nn.Module`` with a trainable parameter."""

    def own(self) -> Iterator[tuple[str, Any]]:
        frozen = nn.Linear(2, 1).requires_grad_(False)
        yield from (("int", 3), ("str", "model"), ("function", lambda x: x), ("nan", NAN))
        yield from (("no parameters", nn.ReLU()), ("all frozen", frozen))


@dataclass(frozen=True)
class Batch(Kind):
    """A batch for ``model``: ``None``, no examples or the wrong shape are bad.

    A batch of the wrong shape fails in the user's model with the model's own error (a
    ``RuntimeError`` the callbacks treat as bad luck, not bad input), with a note naming
    ``batch`` (Python 3.11+).
    """

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("no examples", torch.zeros(0, 2)), ("wrong shape", torch.ones(8, 3)))
        yield from (("empty iterable", []),)

    def errors(self, label: str) -> tuple[type[Exception], ...] | None:
        return (RuntimeError,) if label == "wrong shape" else None


@dataclass(frozen=True)
class Batches(Batch):
    """``batches`` of ``batch_sharpness``: at least two batches."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("empty", []), ("one batch", [torch.ones(4, 2)]))
        yield from (("wrong shape", [torch.ones(4, 3), torch.ones(4, 3)]),)


@dataclass(frozen=True)
class Tensor(Kind):
    """A real tensor of finite entries and of ``shape`` (any length where ``any_length``).

    ``sign``: ``"nonnegative"`` entries; ``nonzero``: not all zero.
    """

    shape: tuple[int, ...] = ()
    any_length: bool = False
    sign: str = ""
    nonzero: bool = False

    def own(self) -> Iterator[tuple[str, Any]]:
        good = torch.ones(self.shape)
        wrong = (2, *self.shape) if self.any_length else (*self.shape[:-1], self.shape[-1] + 1)
        yield from (("str", "v"), ("float", 1.0), ("list", good.tolist()))
        yield from (("wrong shape", torch.ones(wrong)), ("empty", torch.ones(0)))
        yield from (("complex", good.to(torch.cfloat)),)
        yield from (("nan", torch.full(self.shape, NAN)), ("inf", torch.full(self.shape, INF)))
        yield "-inf", torch.full(self.shape, -INF)
        if self.sign == "nonnegative":
            yield "negative", -good
        if self.nonzero:
            yield "zero", torch.zeros(self.shape)


@dataclass(frozen=True)
class Generator(Kind):
    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("str", "cpu"), ("nan", NAN))


@dataclass(frozen=True)
class Options(Kind):
    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("dict", {"backend": "auto"}), ("nan", NAN))


@dataclass(frozen=True)
class Name(Kind):
    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("empty", ""), ("slash", "a/b"), ("bool", True), ("nan", NAN))


@dataclass(frozen=True)
class Loader(Kind):
    """``probe_dataloader``: ``None`` or an iterable of batches (not a string)."""

    none_ok: bool = field(default=True, kw_only=True)

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("str", "data"), ("bool", True), ("nan", NAN))


@dataclass(frozen=True)
class Instance(Kind):
    """An object of one class (a ``Fabric``, an optimizer)."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("str", "object"), ("nan", NAN))


@dataclass(frozen=True)
class PathKind(Kind):
    """A directory's path: a ``str`` or an ``os.PathLike``."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("bool", True), ("nan", NAN), ("list", ["runs"]))


@dataclass(frozen=True)
class Monitors(Kind):
    """``monitors`` of ``FabricMonitors``: a list of curvature monitors."""

    def own(self) -> Iterator[tuple[str, Any]]:
        yield from (("int", 3), ("str", "monitors"), ("list of int", [3]), ("nan", NAN))


# -- the public names ----------------------------------------------------------------------------
P = 13  # parameters of the tiny model below


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))


def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def batch() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 16).reshape(8, 2)


@dataclass(frozen=True)
class Signature:
    """A public name: how to call it validly, and the kind of each argument it checks."""

    call: Callable[..., Any]
    valid: Callable[[], dict[str, Any]]
    kinds: dict[str, Kind] = field(default_factory=dict)


def _model_args() -> dict[str, Any]:
    return {"model": tiny_model(), "loss_fn": loss, "batch": batch()}


def _run_directory() -> str:
    """A run's directory as a ``CSVLogger`` writes it (what the reader takes)."""
    directory = tempfile.mkdtemp()
    with open(f"{directory}/metrics.csv", "w") as file:
        file.write("step,curvature/trace\n0,4.5\n")
    return directory


MODEL = {"model": Module(), "loss_fn": Function(), "batch": Batch()}
OPERATOR = {
    "parameters": Patterns(),
    "backend": Choice(),
    "batch_norm": Choice(),
    "all_reduce": Function(none_ok=True),
    "curvature": Choice(),
}
ESTIMATOR = {**OPERATOR, "options": Options(), "generator": Generator()}


def _enter(**kwargs: Any) -> None:
    with lc.HessianOperator(**kwargs) as operator:
        operator.matvec(torch.ones(operator.size))


FUNCTIONS: dict[str, Signature] = {
    "hessian_eigenvalues": Signature(
        lc.hessian_eigenvalues,
        _model_args,
        {
            **MODEL,
            "k": Count(budget=True),
            "tol": Real(low=0, high=1, low_open=True, high_open=True),
            "max_iter": Count(none_ok=True, budget=True),
            "min_iter": Count(budget=True),
            "miss_probability": Real(low=0, high=1, low_open=True, high_open=True),
            "smallest": Flag(),
            "return_eigenvectors": Flag(),
            "return_gradient": Flag(),
            "init": Tensor(none_ok=True, shape=(P,)),
            "preconditioner": Tensor(none_ok=True, shape=(P,), sign="nonnegative", nonzero=True),
            **ESTIMATOR,
        },
    ),
    "hessian_trace": Signature(
        lc.hessian_trace,
        _model_args,
        {**MODEL, "num_hvps": Count(budget=True), "method": Choice(), "per_layer": Blocks()}
        | ESTIMATOR,
    ),
    "spectral_density": Signature(
        lc.spectral_density,
        _model_args,
        {**MODEL, "num_steps": Count(budget=True), "num_runs": Count(budget=True), **ESTIMATOR},
    ),
    "gradient_coherence": Signature(
        lc.gradient_coherence,
        _model_args,
        {
            **MODEL,
            "all_sum": Function(none_ok=True),
            "mode": Choice(),
            "micro_batch_size": Count(none_ok=True),
            "chunk_size": Count(none_ok=True),
            "per_layer": Blocks(),
            "parameters": Patterns(),
            "batch_norm": Choice(),
        },
    ),
    "batch_sharpness": Signature(
        lc.batch_sharpness,
        lambda: {"model": tiny_model(), "loss_fn": loss, "batches": [batch(), -batch()]},
        {"model": Module(), "loss_fn": Function(), "batches": Batches(), **OPERATOR}
        | {"options": Options()},
    ),
    "directional_curvature": Signature(
        lc.directional_curvature,
        lambda: {**_model_args(), "direction": torch.ones(P)},
        {**MODEL, "direction": Tensor(shape=(P,)), **OPERATOR} | {"options": Options()},
    ),
    "hessian_vector_product": Signature(
        lc.hessian_vector_product,
        lambda: {**_model_args(), "vector": torch.ones(P)},
        {**MODEL, "vector": Tensor(shape=(P,)), **OPERATOR} | {"all_reduce": Kind(none_ok=True)},
    ),
    "sam_gradient": Signature(
        lc.sam_gradient,
        _model_args,
        {
            **MODEL,
            "rho": Real(low=0, low_open=True),
            "adaptive": Flag(),
            "eta": Real(low=0),
            "parameters": Patterns(),
            "dropout": Choice(),
        },
    ),
    "loss_slice": Signature(
        lc.loss_slice,
        lambda: {**_model_args(), "directions": torch.ones(P), "offsets": [-1.0, 0.0, 1.0]},
        {**MODEL, "directions": Tensor(shape=(P,), nonzero=True), "grid": Flag()}
        | {name: OPERATOR[name] for name in ("parameters", "backend", "batch_norm")}
        | {"all_reduce": Function(none_ok=True), "options": Options()},
    ),
    "critical_sharpness": Signature(
        lc.critical_sharpness,
        lambda: {**_model_args(), "update": torch.ones(P)},
        {**MODEL, "init": Real(low=0, low_open=True)}
        | {"rtol": Real(low=0, high=1, low_open=True, high_open=True)}
        | {"max_evals": Count(budget=True), "parameters": Patterns(), "batch_norm": Choice()}
        | {"all_reduce": Function(none_ok=True)},
    ),
    "read_run": Signature(
        lc.read_run, lambda: {"path": _run_directory()}, {"path": PathKind(), "all_tags": Flag()}
    ),
    "find_runs": Signature(
        lc.find_runs, lambda: {"path": _run_directory()}, {"path": PathKind(), "all_tags": Flag()}
    ),
    "density_on_grid": Signature(
        lc.density_on_grid,
        lambda: {"nodes": torch.tensor([0.0, 1.0]), "weights": torch.tensor([0.5, 0.5])},
        {
            "nodes": Tensor(shape=(2,)),
            "weights": Tensor(shape=(2,), sign="nonnegative", nonzero=True),
            "grid": Tensor(none_ok=True, shape=(5,), any_length=True),
            "num_points": Count(2, budget=True),
            "sigma": Real(none_ok=True, low=0, low_open=True),
        },
    ),
    "subspace_share": Signature(
        lc.subspace_share,
        lambda: {"vector": torch.ones(3), "basis": torch.eye(3)[:1]},
        {"vector": Tensor(shape=(3,)), "basis": Tensor(shape=(1, 3))},
    ),
    "HessianOperator": Signature(_enter, _model_args, {**MODEL, **OPERATOR, "dropout": Flag()}),
    "OperatorOptions": Signature(lc.OperatorOptions, dict, {**OPERATOR, "dropout": Flag()}),
    "OutputLoss": Signature(
        lc.OutputLoss,
        lambda: {"output_fn": lambda m, b: (m(b), None), "loss": lambda out, _: out.mean()},
        {"output_fn": Function(), "loss": Function()},
    ),
}
# hessian_vector_product takes no all_reduce; the entry above only keeps OPERATOR's shape.
del FUNCTIONS["hessian_vector_product"].kinds["all_reduce"]

SCHEDULE = {
    "every_n_steps": Cadence(),
    "every_n_epochs": Count(none_ok=True),
    "max_overhead": Real(none_ok=True, low=0, high=1, low_open=True, high_open=True),
    "name": Name(),
    "parameters": Patterns(),
    "seed": Count(-(2**63), maximum=2**64 - 1),
}
PROBE = {
    **SCHEDULE,
    "on_train_end": Flag(),
    "probe": Choice(),
    "probe_batches": Count(),
    "probe_dataloader": Loader(),
    "loss_fn": Function(none_ok=True),
    "batch_norm": Choice(),
    "backend": Choice(),
}
EIGEN = {
    "k": Count(budget=True),
    "tol": Real(low=0, high=1, low_open=True, high_open=True),
    "max_iter": Count(none_ok=True, budget=True),
    "per_layer": Blocks(),
    "warm_start_device": Choice(),
    "curvature": Choice(),
    **{
        flag: Flag()
        for flag in (
            "stability",
            "smallest",
            "warm_start",
            "checkpoint_warm_start",
            "gradient_share",
            "update_sharpness",
            "prog_bar",
        )
    },
}
CALLBACKS: dict[str, Signature] = {
    "CurvatureMonitor": Signature(lc.CurvatureMonitor, dict, PROBE),
    "HessianEigenvalueMonitor": Signature(lc.HessianEigenvalueMonitor, dict, {**PROBE, **EIGEN}),
    "HessianTraceMonitor": Signature(
        lc.HessianTraceMonitor,
        dict,
        {**PROBE, "num_hvps": Count(budget=True), "method": Choice(), "per_layer": Blocks()}
        | {"curvature": Choice()},
    ),
    "SpectralDensityMonitor": Signature(
        lc.SpectralDensityMonitor,
        dict,
        {**PROBE, "num_steps": Count(2, budget=True), "num_runs": Count(budget=True)}
        | {"num_points": Count(2, budget=True), "curvature": Choice()},
    ),
    "GradientCoherenceMonitor": Signature(
        lc.GradientCoherenceMonitor,
        dict,
        {**PROBE, "source": Choice(), "mode": Choice(), "per_layer": Blocks()}
        | {"micro_batch_size": Count(none_ok=True), "chunk_size": Count(none_ok=True)},
    ),
    "TrainingGradientCoherenceMonitor": Signature(
        lc.TrainingGradientCoherenceMonitor,
        dict,
        {**SCHEDULE, "source": Choice(), "mode": Choice(), "per_layer": Blocks()},
    ),
    "BatchSharpnessMonitor": Signature(
        lc.BatchSharpnessMonitor,
        dict,
        {name: kind for name, kind in PROBE.items() if name not in ("probe", "probe_batches")}
        | {"num_batches": Count(2)},
    ),
    "LossLandscapeMonitor": Signature(
        lc.LossLandscapeMonitor,
        dict,
        {**PROBE, "k": Count(budget=True), "num_points": Count(3, budget=True)}
        | {"update": Flag(), "images": Flag()}
        | {"tol": Real(low=0, high=1, low_open=True, high_open=True)},
    ),
    "CriticalSharpnessMonitor": Signature(
        lc.CriticalSharpnessMonitor,
        dict,
        {**PROBE, "rtol": Real(low=0, high=1, low_open=True, high_open=True)}
        | {"max_evals": Count(budget=True)},
    ),
    "SAM": Signature(
        lc.SAM,
        dict,
        {
            "rho": Real(low=0, low_open=True),
            "adaptive": Flag(),
            "every_n_steps": Count(),
            "eta": Real(low=0),
            "dropout": Choice(),
            "perturbation": Choice(),
            "log_every_n_steps": Count(none_ok=True),
        },
    ),
}
_LOGS = tempfile.mkdtemp()


def _fabric_args() -> dict[str, Any]:
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(_LOGS))
    module = tiny_model()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    monitors = [lc.HessianEigenvalueMonitor(every_n_steps=10)]
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(batch(), batch_size=4))
    return {
        "fabric": fabric,
        "model": model,
        "optimizer": optimizer,
        "monitors": monitors,
        "loss_fn": loss,
        "probe_data": loader,
    }


CALLBACKS["FabricMonitors"] = Signature(
    lc.FabricMonitors,
    _fabric_args,
    {
        "fabric": Instance(),
        "model": Module(),
        "optimizer": Instance(none_ok=True),
        "monitors": Monitors(),
        "loss_fn": Function(none_ok=True),
        "probe_data": Loader(none_ok=False),  # the monitor draws a fixed probe
    },
)
SIGNATURES = {**FUNCTIONS, **CALLBACKS}

#: Public names a user does not call with arguments to check: results the functions return
#: (built by the library from checked values), the exception and warning classes, the version.
NOT_CALLED = {
    "BatchSharpness",
    "CriticalSharpness",
    "CurvatureCheckError",
    "CurvatureRun",
    "CurvatureWarning",
    "DirectionalCurvature",
    "GradientCoherence",
    "HessianEigenvalues",
    "HessianTrace",
    "LossSlice",
    "NonFiniteCurvatureError",
    "SAMGradient",
    "Series",
    "SpectralDensity",
    "__version__",
}


def cases() -> Iterator[Any]:
    for name, signature in SIGNATURES.items():
        for argument, kind in signature.kinds.items():
            for label, value in kind.bad():
                errors = kind.errors(label) or expected_error(name)
                marks = (
                    []
                    if kind.errors(label) is None or sys.version_info >= (3, 11)
                    else [pytest.mark.skip(reason="the note naming the argument needs Python 3.11")]
                )
                yield pytest.param(
                    name, argument, value, errors, id=f"{name}-{argument}-{label}", marks=marks
                )


def expected_error(name: str) -> tuple[type[Exception], ...]:
    """The functions raise ``ValueError``/``TypeError``, the callbacks Lightning's error."""
    if getattr(lc, name).__module__.startswith("lightning_curvature.callbacks"):
        return (MisconfigurationException,)
    return (ValueError, TypeError)


class _TookTooLong(Exception):
    """A bad call that was accepted and ran on (a huge budget)."""


def _raise_timeout(*_: Any) -> None:
    raise _TookTooLong


def call(name: str, argument: str, value: Any, seconds: int = 20) -> Exception | None:
    """The exception calling ``name`` with ``argument=value`` raises (``None``: none)."""
    signature = SIGNATURES[name]
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(seconds)
    try:
        signature.call(**{**signature.valid(), argument: value})
    except _TookTooLong:
        return None
    except Exception as err:
        return err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return None


def message(err: BaseException) -> str:
    """The message with the notes Python 3.11+ prints under it."""
    return "\n".join([str(err), *getattr(err, "__notes__", ())])


# -- the tests -----------------------------------------------------------------------------------
def test_every_public_name_is_covered() -> None:
    assert set(lc.__all__) == set(SIGNATURES) | NOT_CALLED


def test_every_checked_argument_is_a_real_argument() -> None:
    """The table stays true to the signatures (a renamed argument fails here, not silently)."""
    import inspect

    for name, signature in SIGNATURES.items():
        target = getattr(lc, name)
        accepted: set[str] = set()
        for cls in getattr(target, "__mro__", (target,)):
            if cls is Callback or cls is object:
                break
            function = cls.__init__ if isinstance(cls, type) else cls
            accepted |= set(inspect.signature(function).parameters)
        if name in ("gradient_coherence", "GradientCoherenceMonitor"):
            accepted |= {"mode", "micro_batch_size", "chunk_size", "per_layer", "parameters"}
            accepted |= {"batch_norm"}
        unknown = set(signature.kinds) - accepted
        assert not unknown, (name, unknown)


def test_the_valid_calls_run() -> None:
    """Each bad case changes one argument of a call that works."""
    for signature in SIGNATURES.values():
        signature.call(**signature.valid())


@pytest.mark.filterwarnings("ignore::lightning_curvature.errors.CurvatureWarning")
@pytest.mark.parametrize(("name", "argument", "value", "errors"), list(cases()))
def test_bad_argument_is_refused_naming_it(
    name: str, argument: str, value: Any, errors: tuple[type[Exception], ...]
) -> None:
    err = call(name, argument, value)
    assert err is not None, f"{name}({argument}={value!r}) was accepted"
    assert isinstance(err, errors), f"{type(err).__name__}: {err}"
    text = message(err)
    assert f"`{argument}`" in text, text
    if isinstance(value, (bool, int, float, str)) and not isinstance(value, complex):
        assert repr(value) in text, text  # and the value given


def census() -> dict[str, int]:
    """How every bad call ends: refused clearly, another exception, or accepted."""
    counts = {"clear": 0, "obscure": 0, "accepted": 0}
    for case in cases():
        name, argument, value, errors = case.values
        err = call(name, argument, value)
        if err is None:
            counts["accepted"] += 1
            print("accepted:", case.id)
        elif isinstance(err, errors) and f"`{argument}`" in message(err):
            counts["clear"] += 1
        else:
            counts["obscure"] += 1
            print("obscure:", case.id, type(err).__name__, str(err)[:120].replace("\n", " "))
    return counts


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    totals = census()
    print(totals, "of", sum(totals.values()), file=sys.stderr)
