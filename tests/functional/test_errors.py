"""Every invalid argument fails with a ValueError naming it; bad luck is NonFiniteCurvatureError."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.density import density_on_grid, spectral_density
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.linalg.sampling import check_generator, make_generator
from lightning_curvature.functional.linalg.trace_estimators import hutch_plus_plus
from lightning_curvature.functional.model.batches import BatchList, split_batches
from lightning_curvature.functional.model.parameters import ParameterLayout, select_parameters
from lightning_curvature.functional.model.probe import probe_context
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import CASES_BY_NAME, DTYPE

CPU = torch.device("cpu")


@pytest.fixture
def tiny() -> tuple[nn.Module, Any, Any]:
    return CASES_BY_NAME["mlp_tanh"].build()


@pytest.mark.parametrize("k", [0, -2, 1.5])
def test_k(tiny: Any, k: Any) -> None:
    with pytest.raises(ValueError, match=rf"`k` must be an integer >= 1 and <= 1000000, got {k}"):
        hessian_eigenvalues(*tiny, k=k)


def test_k_above_parameter_count() -> None:
    model, loss_fn, batch = CASES_BY_NAME["least_squares"].build()  # P = 6
    with pytest.raises(
        ValueError, match=r"`k` \(7\) exceeds the number of measured parameters \(6\)"
    ):
        hessian_eigenvalues(model, loss_fn, batch, k=7)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan")])
def test_tol(tiny: Any, tol: float) -> None:
    with pytest.raises(ValueError, match=rf"`tol` must be a finite number in \(0, 1\), got {tol}"):
        hessian_eigenvalues(*tiny, tol=tol)


@pytest.mark.parametrize("max_iter", [2, 0, 4.0])
def test_max_iter_below_k(tiny: Any, max_iter: Any) -> None:
    with pytest.raises(
        ValueError,
        match=rf"`max_iter` must be an integer >= k \(3\) and <= 1000000, got {max_iter}",
    ):
        hessian_eigenvalues(*tiny, k=3, max_iter=max_iter)


def test_min_iter(tiny: Any) -> None:
    with pytest.raises(
        ValueError, match="`min_iter` must be an integer >= 1 and <= 1000000, got 0"
    ):
        hessian_eigenvalues(*tiny, min_iter=0)


@pytest.mark.parametrize("miss_probability", [0.0, 1.0, -0.1, float("nan"), True])
def test_miss_probability(tiny: Any, miss_probability: Any) -> None:
    with pytest.raises(
        ValueError, match=r"`miss_probability` must be a finite number in \(0, 1\), got"
    ):
        hessian_eigenvalues(*tiny, miss_probability=miss_probability)


@pytest.mark.parametrize("empty", [[], BatchList(), iter([]), torch.utils.data.DataLoader([])])
def test_empty_batch_iterable(tiny: Any, empty: Any) -> None:
    model, loss_fn, _ = tiny
    with pytest.raises(ValueError, match="`batch` is an empty iterable"):
        hessian_trace(model, loss_fn, empty)


def test_empty_batch_iterable_in_split_batches() -> None:
    with pytest.raises(ValueError, match="`batch` is an empty iterable"):
        split_batches((b for b in []), CPU)


def test_no_trainable_parameters(tiny: Any) -> None:
    model, loss_fn, batch = tiny
    model.requires_grad_(False)
    for function in (hessian_eigenvalues, hessian_trace, spectral_density):
        with pytest.raises(ValueError, match=r"`model` \(Sequential\) has no trainable parameters"):
            function(model, loss_fn, batch)


@pytest.mark.parametrize(
    ("loss", "shown"),
    [
        (lambda m, b: m(b[0]).sum(dim=1), r"\(8,\)"),
        (lambda m, b: m(b[0]).detach().sum().item(), "float"),
        (lambda m, b: m(b[0]), r"\(8, 3\)"),
    ],
    ids=["vector", "python_float", "matrix"],
)
def test_loss_not_a_scalar(tiny: Any, loss: Any, shown: str) -> None:
    model, _, batch = tiny
    with pytest.raises(
        ValueError, match=rf"`loss_fn` must return a scalar tensor .* returned {shown}"
    ):
        hessian_eigenvalues(model, loss, batch)


def test_loss_fn_not_callable(tiny: Any) -> None:
    model, _, batch = tiny
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        HessianOperator(model, "cross_entropy", batch)  # type: ignore[arg-type]


def test_unknown_backend(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"`backend` must be one of \('auto', .*\), got 'jvp'"):
        hessian_trace(*tiny, backend="jvp")


def test_unknown_method(tiny: Any) -> None:
    with pytest.raises(
        ValueError, match=r"`method` must be one of \('hutchinson', 'hutch\+\+'\), got 'xtrace'"
    ):
        hessian_trace(*tiny, method="xtrace")


@pytest.mark.parametrize("function", [hessian_eigenvalues, hessian_trace, spectral_density])
def test_unknown_batch_norm(tiny: Any, function: Any) -> None:
    with pytest.raises(
        ValueError, match=r"`batch_norm` must be one of \('as_is', 'eval', 'train'\), got 'frozen'"
    ):
        function(*tiny, batch_norm="frozen")


def test_unknown_batch_norm_in_probe_context() -> None:
    with (
        pytest.raises(ValueError, match="`batch_norm` must be one of"),
        probe_context(nn.Linear(2, 2), batch_norm="none"),
    ):
        pass


@pytest.mark.parametrize(
    ("method", "num_hvps", "minimum"),
    [("hutchinson", 1, 2), ("hutch++", 3, 4), ("hutchinson", 4.0, 2)],
)
def test_num_hvps_too_small(tiny: Any, method: str, num_hvps: Any, minimum: int) -> None:
    expected = (
        f"`num_hvps` must be an integer >= {minimum} and <= 1000000 for '{method}', got {num_hvps}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        hessian_trace(*tiny, num_hvps=num_hvps, method=method)


def test_hutch_plus_plus_needs_four_products() -> None:
    with pytest.raises(ValueError, match=r"Hutch\+\+ needs `num_hvps` >= 4 .*, got 3"):
        hutch_plus_plus(lambda v: v, 4, 3, make_generator(CPU))


def test_parameters_pattern_matching_nothing(tiny: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"`parameters` pattern 'encoder\.\*' matches no trainable parameter; "
        r"trainable names are \['0\.weight'",
    ):
        hessian_eigenvalues(*tiny, parameters=["2.*", "encoder.*"])


def test_per_layer_pattern_matching_nothing(tiny: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"`per_layer` pattern 'decoder\.\*' matches none of the measured parameters",
    ):
        hessian_trace(*tiny, per_layer=["decoder.*"])


def test_pattern_on_frozen_parameter_only() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"`parameters` pattern '0\.weight' matches no trainable"):
        select_parameters(model, "0.weight")


@pytest.mark.parametrize("shape", [(42,), (2, 44), (), (1, 1, 43)])
def test_init_of_the_wrong_shape(tiny: Any, shape: tuple[int, ...]) -> None:
    expected = f"`init` must have shape (43,) or (m, 43) over the measured parameters, got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        hessian_eigenvalues(*tiny, init=torch.ones(shape, dtype=DTYPE))


def test_preconditioner_of_the_wrong_shape(tiny: Any) -> None:
    expected = r"`preconditioner` must have shape \(43,\) .*, got \(42,\)"
    with pytest.raises(ValueError, match=expected):
        hessian_eigenvalues(*tiny, preconditioner=torch.ones(42, dtype=DTYPE))


def test_vector_of_the_wrong_length(tiny: Any) -> None:
    with pytest.raises(
        ValueError, match="`vector` has 42 entries but the measured parameters have 43"
    ):
        hessian_vector_product(*tiny, torch.ones(42, dtype=DTYPE))


def test_generator_on_the_wrong_device_type() -> None:
    with pytest.raises(ValueError, match=r"`generator` is on 'cpu' but the model is on 'cuda'"):
        check_generator(make_generator(CPU), torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_for_a_cpu_model(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"`generator` is on 'cuda' but the model is on 'cpu'"):
        hessian_trace(*tiny, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize(
    ("argument", "value"), [("num_steps", 0), ("num_runs", 0), ("num_steps", 2.5), ("num_runs", -1)]
)
def test_density_steps_and_runs(tiny: Any, argument: str, value: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"`{argument}` must be an integer >= 1 and <= 1000000, got {value}"
    ):
        spectral_density(*tiny, **{argument: value})


@pytest.mark.parametrize("sigma", [0.0, -0.1])
def test_sigma(sigma: float) -> None:
    with pytest.raises(
        ValueError, match=rf"`sigma` must be a finite number > 0 or None, got {sigma}"
    ):
        density_on_grid(torch.zeros(3), torch.ones(3) / 3, sigma=sigma)


def test_num_points() -> None:
    with pytest.raises(
        ValueError, match="`num_points` must be an integer >= 2 and <= 1000000, got 1"
    ):
        density_on_grid(torch.zeros(3), torch.ones(3) / 3, num_points=1)


def test_per_layer_pattern_in_layout() -> None:
    layout = ParameterLayout.from_named([("w", torch.zeros(2))])
    with pytest.raises(ValueError, match="`per_layer` pattern 'v' matches none"):
        layout.groups(["v"])


@pytest.mark.parametrize("function", [hessian_eigenvalues, hessian_trace, spectral_density])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss(tiny: Any, function: Any, bad: float) -> None:
    model, loss_fn, batch = tiny

    def broken(m: nn.Module, b: Any) -> torch.Tensor:
        return loss_fn(m, b) * bad

    with pytest.raises(NonFiniteCurvatureError, match="the probe loss is not finite"):
        function(model, broken, batch)


@pytest.mark.parametrize("backend", ["auto", "double_backward", "forward_over_reverse"])
def test_non_finite_product(backend: str) -> None:
    """A finite loss with an infinite curvature: sqrt(|w·x|) at w = 0."""
    model = nn.Linear(3, 1, bias=False).to(DTYPE)
    nn.init.zeros_(model.weight)
    x = torch.randn(4, 3, dtype=DTYPE)
    with pytest.raises(NonFiniteCurvatureError, match="a Hessian-vector product is not finite"):
        hessian_eigenvalues(model, lambda m, b: m(b).abs().sqrt().mean(), x, backend=backend)


def test_empty_list_of_parameter_patterns(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"`parameters` must be None .*, got \[\]"):
        hessian_trace(*tiny, parameters=[])


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_init_zero_or_not_finite(tiny: Any, fill: float) -> None:
    with pytest.raises(ValueError, match="`init` must be finite and not zero"):
        hessian_eigenvalues(*tiny, init=torch.full((43,), fill, dtype=DTYPE))


@pytest.mark.parametrize(
    ("argument", "call"),
    [
        ("k", lambda m, f, b: hessian_eigenvalues(m, f, b, k=True)),
        ("tol", lambda m, f, b: hessian_eigenvalues(m, f, b, tol=True)),
        ("max_iter", lambda m, f, b: hessian_eigenvalues(m, f, b, max_iter=True)),
        ("min_iter", lambda m, f, b: hessian_eigenvalues(m, f, b, min_iter=True)),
        ("num_hvps", lambda m, f, b: hessian_trace(m, f, b, num_hvps=True)),
        ("num_steps", lambda m, f, b: spectral_density(m, f, b, num_steps=True)),
        ("num_runs", lambda m, f, b: spectral_density(m, f, b, num_runs=True)),
        ("sigma", lambda m, f, b: density_on_grid(torch.zeros(2), torch.ones(2) / 2, sigma=True)),
    ],
)
def test_booleans_are_not_numbers(tiny: Any, argument: str, call: Any) -> None:
    """True is an int to Python, but k=True or tol=True is a mistake, not 1."""
    with pytest.raises(ValueError, match=rf"`{argument}` must be .*, got True"):
        call(*tiny)


class HardCodedHalf(nn.Module):
    """A forward that casts to fp16 itself: wrong for a float64 model, whatever the probe."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.half())


class InPlaceOnSaved(nn.Module):
    """Modifies in place a tensor autograd saved: the first backward fails, for any order."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x)).mul_(2.0)


@pytest.mark.parametrize("backend", ["auto", "retained_graph", "double_backward"])
@pytest.mark.parametrize(
    ("model", "message"),
    [
        (HardCodedHalf, "same dtype"),
        (InPlaceOnSaved, "modified by an inplace operation"),
    ],
)
def test_model_errors_are_not_explained_as_missing_second_derivatives(
    model: type[nn.Module], message: str, backend: str
) -> None:
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)))
    with pytest.raises(RuntimeError, match=message) as info:
        hessian_eigenvalues(model(), lambda m, b: m(b[0]).sum(), batch, backend=backend)
    assert "cannot pass through this model" not in str(info.value)
    assert "second derivative" not in str(info.value)
