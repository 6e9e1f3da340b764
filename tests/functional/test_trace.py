"""``hessian_trace`` and the trace estimators against exact traces."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_curvature.functional.linalg.sampling import make_generator, rademacher
from lightning_curvature.functional.linalg.trace_estimators import (
    MIN_MATVECS,
    hutch_plus_plus,
    hutchinson,
    student_t_975,
)
from lightning_curvature.functional.model.parameters import ParameterLayout
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import CASES_BY_NAME, mse, reference, seeded, trainable

CPU = torch.device("cpu")
D = torch.float64


def _low_rank_psd(size: int, rank: int, seed: int = 0) -> torch.Tensor:
    u = torch.randn(size, rank, dtype=D, generator=torch.Generator().manual_seed(seed))
    return u @ u.T


def _dense_indefinite(size: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(size, size, dtype=D, generator=torch.Generator().manual_seed(seed))
    return (a + a.T) / 2


def test_hutchinson_within_three_standard_errors_for_95_of_100_seeds() -> None:
    case = CASES_BY_NAME["mlp_tanh"]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    exact = float(hessian.trace())
    inside = 0
    for seed in range(100):
        out = hessian_trace(
            model, loss_fn, batch, num_hvps=10, backend="retained_graph",
            generator=make_generator(CPU, seed),
        )  # fmt: skip
        assert out.num_hvps == 10
        assert float(out.std_error) > 0
        inside += abs(float(out.estimate) - exact) <= 3 * float(out.std_error)
    assert inside >= 95


def test_hutchinson_is_exact_on_a_diagonal_matrix() -> None:
    a = torch.diag(torch.linspace(-3.0, 5.0, 30, dtype=D))
    out = hutchinson(lambda v: a @ v, 30, 4, make_generator(CPU), dtype=D)
    assert out.estimate == pytest.approx(float(a.trace()), abs=1e-12)
    assert out.std_error == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_samples_are_rademacher_quadratic_forms() -> None:
    a = _dense_indefinite(20)
    out = hutchinson(lambda v: a @ v, 20, 5, make_generator(CPU, 3), dtype=D)
    replay = make_generator(CPU, 3)
    for sample in out.samples:
        z = rademacher((20,), replay, D, CPU)
        assert set(z.tolist()) <= {-1.0, 1.0}
        assert float(sample) == pytest.approx(float(z @ a @ z), abs=1e-12)
    assert out.estimate == pytest.approx(float(out.samples.mean()), abs=1e-12)
    assert out.std_error == pytest.approx(float(out.samples.std() / 5**0.5), abs=1e-12)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_draws_equal_the_int64_draw_and_consume_alike(
    device: str, dtype: torch.dtype
) -> None:
    """Drawn in the compute dtype (no int64 temporaries, issue 23): the same signs as the
    int64 draw shifted, and the generator left in the same state."""
    where = torch.device(device)
    drawn, reference = make_generator(where, 5), make_generator(where, 5)
    for size in (7, 1 << 17):
        z = rademacher((size,), drawn, dtype, where)
        bits = torch.randint(0, 2, (size,), generator=reference, device=where)
        assert z.dtype == dtype
        assert torch.equal(z, (2 * bits - 1).to(dtype))
    assert torch.equal(drawn.get_state(), reference.get_state())


@pytest.mark.parametrize(("size", "rank", "matvecs"), [(50, 2, 6), (40, 5, 15), (30, 3, 10)])
def test_hutch_plus_plus_is_exact_on_low_rank_psd(size: int, rank: int, matvecs: int) -> None:
    a = _low_rank_psd(size, rank, seed=size)
    for seed in range(3):
        out = hutch_plus_plus(lambda v: a @ v, size, matvecs, make_generator(CPU, seed), dtype=D)
        assert out.estimate == pytest.approx(float(a.trace()), rel=1e-10)
        assert out.std_error == pytest.approx(0.0, abs=1e-8 * float(a.trace()))
        assert out.num_matvecs == matvecs


def test_hutch_plus_plus_on_least_squares_with_fewer_examples_than_parameters() -> None:
    """n = 3 < d = 12: H = 2XᵀX/n has rank 3, so 9 products (a sketch of 3) are exact."""
    with seeded(3):
        x = torch.randn(3, 12, dtype=D)
        y = torch.randn(3, 1, dtype=D)
        model = nn.Linear(12, 1, bias=False).to(D)
    exact = float((2 * x.T @ x / 3).trace())
    for seed in range(3):
        out = hessian_trace(
            model, mse, (x, y), num_hvps=9, method="hutch++", generator=make_generator(CPU, seed)
        )
        assert float(out.estimate) == pytest.approx(exact, rel=1e-10)
        assert float(out.std_error) == pytest.approx(0.0, abs=1e-9)
        assert out.num_hvps == 9
        assert out.method == "hutch++"
    rough = hessian_trace(model, mse, (x, y), num_hvps=9)
    assert float(rough.std_error) > 1e-3  # plain Hutchinson is not exact here


def _per_layer_blocks(name: str) -> tuple[dict[str, list[slice]], list[str]]:
    model, _, _ = CASES_BY_NAME[name].build()
    layout = ParameterLayout.from_named(trainable(model))
    return layout.groups(True), list(layout.names)


def test_per_layer_traces_sum_to_the_total() -> None:
    case = CASES_BY_NAME["cnn_batchnorm_eval"]
    model, loss_fn, batch = case.build()
    out = hessian_trace(model, loss_fn, batch, num_hvps=8, per_layer=True)
    assert set(out.per_layer) == {"conv", "bn", "head"}
    assert set(out.per_layer_std_error) == set(out.per_layer)
    total = sum(out.per_layer.values())
    assert float(total) == pytest.approx(float(out.estimate), abs=1e-12)
    patterns = hessian_trace(model, loss_fn, batch, num_hvps=8, per_layer=["conv.*", "*.bias"])
    assert set(patterns.per_layer) == {"conv.*", "*.bias"}


def test_per_layer_dict_blocks_are_the_union_of_their_patterns() -> None:
    """Block estimates share the probes: a block of two modules is the sum of theirs."""
    case = CASES_BY_NAME["cnn_batchnorm_eval"]
    model, loss_fn, batch = case.build()
    per_module = hessian_trace(model, loss_fn, batch, num_hvps=8, per_layer=True).per_layer
    named = {"conv_and_bn": ["conv.*", "bn.*"], "head": "head.*"}
    out = hessian_trace(model, loss_fn, batch, num_hvps=8, per_layer=named)
    assert list(out.per_layer) == ["conv_and_bn", "head"]
    both = float(per_module["conv"] + per_module["bn"])
    assert float(out.per_layer["conv_and_bn"]) == pytest.approx(both, rel=1e-12)
    assert float(out.per_layer["head"]) == pytest.approx(float(per_module["head"]), rel=1e-12)


def test_per_layer_estimates_are_unbiased() -> None:
    """Each block estimate is within 4 standard errors of the exact block trace (800 probes)."""
    case = CASES_BY_NAME["mlp_tanh"]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    blocks, _ = _per_layer_blocks(case.name)
    out = hessian_trace(model, loss_fn, batch, num_hvps=800, per_layer=True)
    assert set(out.per_layer) == {"0", "2"}
    for name, slices in blocks.items():
        index = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        exact = float(hessian[index][:, index].trace())
        error = float(out.per_layer_std_error[name])
        assert 0 < error < 0.2 * abs(exact) + 0.05
        assert abs(float(out.per_layer[name]) - exact) <= 4 * error


def test_hutch_plus_plus_block_estimates_are_unbiased() -> None:
    """Averaged over 300 seeds, each Hutch++ block estimate matches the exact block trace."""
    a = _dense_indefinite(24, seed=5) + _low_rank_psd(24, 2, seed=6)
    blocks = {"first": [slice(0, 10)], "rest": [slice(10, 20), slice(20, 24)]}
    estimates = {name: [] for name in blocks}
    for seed in range(300):
        out = hutch_plus_plus(
            lambda v: a @ v, 24, 9, make_generator(CPU, seed), dtype=D, blocks=blocks
        )
        for name in blocks:
            estimates[name].append(out.block(name)[0])
    for name, slices in blocks.items():
        exact = sum(float(a[s, s].trace()) for s in slices)
        values = torch.tensor(estimates[name], dtype=D)
        assert abs(float(values.mean()) - exact) <= 4 * float(values.std()) / 300**0.5


def test_same_seed_same_result_default_generator_ignores_global_rng() -> None:
    case = CASES_BY_NAME["mlp_gelu"]
    model, loss_fn, batch = case.build()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(hessian_trace(model, loss_fn, batch, num_hvps=6))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0].estimate, runs[1].estimate)
    assert torch.equal(runs[0].std_error, runs[1].std_error)
    again = [
        hessian_trace(model, loss_fn, batch, num_hvps=6, generator=make_generator(CPU, s))
        for s in (4, 4, 9)
    ]
    assert torch.equal(again[0].estimate, again[1].estimate)
    assert not torch.equal(again[0].estimate, again[2].estimate)
    generator = make_generator(CPU, 4)
    first = hessian_trace(model, loss_fn, batch, num_hvps=6, generator=generator)
    second = hessian_trace(model, loss_fn, batch, num_hvps=6, generator=generator)
    assert torch.equal(first.estimate, again[0].estimate)
    assert not torch.equal(second.estimate, first.estimate)  # the generator advanced


def test_result_fields() -> None:
    case = CASES_BY_NAME["half_least_squares"]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    out = hessian_trace(model, loss_fn, batch, num_hvps=4)
    assert out.num_parameters == hessian.shape[0]
    assert out.method == "hutchinson"
    assert out.estimate.dtype == torch.float64
    assert out.per_layer == {}


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_smallest_allowed_num_hvps_gives_a_finite_standard_error(method: str) -> None:
    """Issue 10: Hutch++ with 3 products had one deflated sample and logged ``inf``; the
    smallest budget each method accepts now gives a finite error, one less is refused."""
    with seeded(4):
        x = torch.randn(20, 6, dtype=D)
        y = torch.randn(20, 1, dtype=D)
        model = nn.Linear(6, 1).to(D)
    minimum = MIN_MATVECS[method]
    for num_hvps in range(minimum, minimum + 4):
        out = hessian_trace(model, mse, (x, y), num_hvps=num_hvps, method=method)
        assert math.isfinite(float(out.std_error)), (method, num_hvps)
        assert out.num_hvps == num_hvps
    with pytest.raises(
        ValueError, match=rf"`num_hvps` must be an integer >= {minimum} and <= 1000000 for"
    ):
        hessian_trace(model, mse, (x, y), num_hvps=minimum - 1, method=method)


def _rotated(spectrum: torch.Tensor, seed: int = 1) -> torch.Tensor:
    size = spectrum.numel()
    q, _ = torch.linalg.qr(
        torch.randn(size, size, dtype=D, generator=torch.Generator().manual_seed(seed))
    )
    return q @ torch.diag(spectrum.to(D)) @ q.T


@pytest.mark.parametrize("matvecs", [6, 10])
def test_hutch_plus_plus_band_covers_the_trace_95_percent_of_the_time(matvecs: int) -> None:
    """±1.96 standard errors over 200 seeds of a 200 x 200 operator whose spectrum decays
    like 1/√i (known trace): the band of Hutch++'s 2 or 4 deflated samples is a Student-t
    interval, in 92-98 % of them (95.5 %, 95 %). The plain ``std/√r`` fell out of that band
    (72.5 %, 89 %)."""
    spectrum = 1.0 / torch.arange(1, 201, dtype=D).sqrt()
    a = _rotated(spectrum)
    exact = float(spectrum.sum())
    covered = plain = 0
    for seed in range(200):
        out = hutch_plus_plus(lambda v: a @ v, 200, matvecs, make_generator(CPU, seed), dtype=D)
        error = abs(out.estimate - exact)
        r = out.samples.numel()
        covered += error <= 1.96 * out.std_error
        plain += error <= 1.96 * float(out.samples.std() / r**0.5)
    assert 0.92 <= covered / 200 <= 0.98
    assert plain / 200 < 0.92


def test_hutch_plus_plus_error_is_the_student_interval_of_its_samples() -> None:
    """std/√r times t_{0.975, r−1}/1.96 (r = 4 of 10 products: 3.182/1.96), per block too;
    Hutchinson's stays std/√m."""
    a = _dense_indefinite(30, seed=2)
    blocks = {"first": [slice(0, 10)], "rest": [slice(10, 30)]}
    out = hutch_plus_plus(lambda v: a @ v, 30, 10, make_generator(CPU, 1), dtype=D, blocks=blocks)
    assert out.samples.numel() == 4
    plain = float(out.samples.std() / 2)
    assert out.std_error == pytest.approx(plain * 3.182446 / 1.959964, rel=5e-4)
    for name in blocks:
        samples = out.block_samples[name]
        assert out.block(name)[1] == pytest.approx(
            float(samples.std() / 2) * 3.182446 / 1.959964, rel=5e-4
        )
    same = hutchinson(lambda v: a @ v, 30, 10, make_generator(CPU, 1), dtype=D)
    assert same.std_error == pytest.approx(float(same.samples.std() / 10**0.5), abs=1e-12)


@pytest.mark.parametrize(
    ("df", "quantile"),
    [(1, 12.706205), (2, 4.302653), (3, 3.182446), (5, 2.570582), (11, 2.200985), (98, 1.984467)],
)
def test_student_quantile_matches_the_tables(df: int, quantile: float) -> None:
    assert student_t_975(df) == pytest.approx(quantile, rel=3e-4)
