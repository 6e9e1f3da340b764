"""gradient_coherence and GradientSums against a brute-force loop of per-example gradients.

The reference computes every statistic straight from its definition on the stacked
``(m, P)`` gradients, each taken by its own ``torch.autograd.grad`` on a float64 copy of the
model: coherence ‖Σg‖²/Σ‖g‖², the mean of the explicit m×m cosine matrix off its diagonal,
‖G‖² as the mean of g_i·g_j over i ≠ j, tr Σ = b·Σ‖g_i − ḡ‖²/(m − 1) (McCandlish et al.
2018, App. A.1), and the SNR as the mean of ḡ_j² / (b·var_j) with the unbiased variance.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.errors import CurvatureWarning, NonFiniteCurvatureError
from lightning_curvature.functional.coherence import gradient_coherence, gradient_sums
from lightning_curvature.functional.gradients import accumulator as gradient_statistics
from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.gradients.statistics import GradientCoherence
from lightning_curvature.functional.model.batches import BatchList

RTOL = 1e-6
FIELDS = ("coherence", "mean_cosine", "noise_scale", "snr", "grad_norm_sq", "trace_sigma")


# -- models and data -----------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def classification(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def linear_mean(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """With ``model = Linear(d, 1, bias=False)`` each example's gradient is the example."""
    return model(batch).mean()


def linear(d: int) -> nn.Module:
    return nn.Linear(d, 1, bias=False).double()


# -- the brute-force reference -------------------------------------------------------------
def loop_gradients(model: nn.Module, loss_fn: Any, pieces: list[Any]) -> torch.Tensor:
    """One ``torch.autograd.grad`` per piece on a copy of the model, stacked ``(m, P)``."""
    twin = copy.deepcopy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    rows = []
    for piece in pieces:
        grads = torch.autograd.grad(
            loss_fn(twin, piece), params, allow_unused=True, materialize_grads=True
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def examples(batch: tuple[torch.Tensor, ...], size: int = 1) -> list[tuple[torch.Tensor, ...]]:
    n = batch[0].shape[0]
    return [tuple(t[i : i + size] for t in batch) for i in range(0, n, size)]


def reference(
    g: torch.Tensor, b: int = 1, eps: float = torch.finfo(torch.float64).eps
) -> dict[str, float]:
    """Every statistic from its definition; the SNR over coordinates that vary and are resolved
    (root-mean-square above ``100·eps`` of the mean one: not zero up to rounding in the dtype
    of ``eps``)."""
    m = g.shape[0]
    total = g.sum(0)
    norms = g.norm(dim=1)
    unit = g / norms[:, None]
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    grad_norm_sq = (g @ g.T)[off_diagonal].mean()
    trace_sigma = b * ((g - g.mean(0)) ** 2).sum() / (m - 1)
    second = (g * g).sum(0)
    varying = ~(g == g[0]).all(0) & (second > (100 * eps) ** 2 * second.mean())
    per_example_var = b * g.var(0, unbiased=True)
    snr = (g.mean(0)[varying] ** 2 / per_example_var[varying]).mean()
    return {
        "coherence": float(total @ total / (norms**2).sum()),
        "mean_cosine": float((unit @ unit.T)[off_diagonal].mean()),
        "noise_scale": float(trace_sigma / grad_norm_sq) if grad_norm_sq > 0 else math.nan,
        "snr": float(snr),
        "grad_norm_sq": float(grad_norm_sq),
        "trace_sigma": float(trace_sigma),
    }


def assert_matches(out: GradientCoherence, expected: dict[str, float], rtol: float = RTOL) -> None:
    for name, value in expected.items():
        got = getattr(out, name).item()
        assert got == pytest.approx(value, rel=rtol, abs=1e-12, nan_ok=True), name


def assert_same(a: GradientCoherence, b: GradientCoherence, rtol: float = 1e-10) -> None:
    assert_matches(a, {name: getattr(b, name).item() for name in FIELDS}, rtol)


# -- exactness against the loop ------------------------------------------------------------
def test_per_example_matches_brute_force() -> None:
    model, batch = mlp(), classification()
    out = gradient_coherence(model, cross_entropy, batch)
    expected = reference(loop_gradients(model, cross_entropy, examples(batch)))
    assert_matches(out, expected)
    assert (out.mode, out.num_samples, out.sample_size) == ("per_example", 12, 1.0)
    assert out.coherence.dtype == torch.float64


def test_per_example_matches_brute_force_on_a_conv_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    generator = torch.Generator().manual_seed(2)
    batch = (torch.randn(8, 1, 5, 5, generator=generator, dtype=torch.float64), torch.arange(8) % 3)
    out = gradient_coherence(model, cross_entropy, batch, chunk_size=3, per_layer=True)
    g = loop_gradients(model, cross_entropy, examples(batch))
    assert_matches(out, reference(g))
    assert out.per_layer["0"].item() == pytest.approx(block_coherence(g, slice(0, 20)), rel=RTOL)


def test_micro_batch_matches_brute_force_over_micro_batches() -> None:
    model, batch = mlp(), classification(n=16)
    out = gradient_coherence(model, cross_entropy, batch, mode="micro_batch", micro_batch_size=4)
    expected = reference(loop_gradients(model, cross_entropy, examples(batch, 4)), b=4)
    assert_matches(out, expected)
    assert (out.mode, out.num_samples, out.sample_size) == ("micro_batch", 4, 4.0)


def test_vmap_path_and_loop_path_agree() -> None:
    model, batch = mlp(), classification()
    vmapped = gradient_coherence(model, cross_entropy, batch, mode="per_example", chunk_size=5)
    looped = gradient_coherence(model, cross_entropy, batch, mode="micro_batch", micro_batch_size=1)
    assert_same(vmapped, looped)
    assert (vmapped.mode, looped.mode) == ("per_example", "micro_batch")
    assert looped.sample_size == 1.0


def test_chunk_size_does_not_change_the_result() -> None:
    model, batch = mlp(), classification()
    whole = gradient_coherence(model, cross_entropy, batch, chunk_size=None)
    for chunk in (1, 5, 12, 100):
        assert_same(gradient_coherence(model, cross_entropy, batch, chunk_size=chunk), whole)


def test_float32_model_gives_float32_on_its_device() -> None:
    model, (x, y) = mlp().float(), classification()
    out = gradient_coherence(model, cross_entropy, (x.float(), y))
    expected = reference(loop_gradients(mlp(), cross_entropy, examples((x, y))))
    assert out.coherence.dtype == torch.float32
    assert out.coherence.device == next(model.parameters()).device
    assert_matches(out, expected, rtol=1e-4)


def test_low_precision_model_is_measured_in_float32() -> None:
    model, (x, y) = mlp().to(torch.bfloat16), classification()
    out = gradient_coherence(model, cross_entropy, (x.to(torch.bfloat16), y))
    twin = copy.deepcopy(model).float()
    exact = gradient_coherence(twin, cross_entropy, (x.to(torch.bfloat16).float(), y))
    assert out.coherence.dtype == torch.float32
    assert_same(out, exact, rtol=1e-6)


def test_uneven_micro_batches_use_the_general_unbiased_estimators() -> None:
    model, batch = mlp(), classification(n=10)
    out = gradient_coherence(model, cross_entropy, batch, mode="micro_batch", micro_batch_size=4)
    g = loop_gradients(model, cross_entropy, examples(batch, 4))  # sizes 4, 4, 2
    sizes = torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    grad_norm_sq = (g @ g.T)[off_diagonal].mean()
    # E‖g_i‖² = ‖G‖² + trΣ/b_i  =>  trΣ = (Σ‖g_i‖² − m‖G‖²) / Σ(1/b_i)
    trace_sigma = ((g**2).sum() - 3 * grad_norm_sq) / (1 / sizes).sum()
    assert out.sample_size == pytest.approx(3.0)  # harmonic mean of 4, 4, 2
    assert out.num_samples == 3
    assert out.grad_norm_sq.item() == pytest.approx(grad_norm_sq.item(), rel=RTOL)
    assert out.trace_sigma.item() == pytest.approx(trace_sigma.item(), rel=RTOL)
    assert out.coherence.item() == pytest.approx(
        (g.sum(0).norm() ** 2 / (g**2).sum()).item(), rel=RTOL
    )


def test_unequal_size_estimators_are_unbiased() -> None:
    """Simulated samples g_i = G + noise/√b_i: the estimates average to ‖G‖² and tr Σ."""
    generator = torch.Generator().manual_seed(0)
    true_g = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # per-example standard deviations
    sizes = torch.tensor([1.0, 2.0, 4.0, 4.0, 8.0], dtype=torch.float64)
    reps = 1500
    noise = torch.randn(reps, 5, 3, generator=generator, dtype=torch.float64)
    samples = true_g + noise * sigma / sizes.sqrt()[:, None]
    norm_estimates, trace_estimates = [], []
    for rep in range(reps):
        sums = GradientSums.zeros(3, dtype=torch.float64)
        for row, size in zip(samples[rep], sizes.tolist(), strict=True):
            sums.add(row, size)
        out = sums.compute()
        norm_estimates.append(out.grad_norm_sq.item())
        trace_estimates.append(out.trace_sigma.item())
    for estimates, truth in (
        (norm_estimates, true_g @ true_g),
        (trace_estimates, (sigma**2).sum()),
    ):
        values = torch.tensor(estimates)
        std_error = values.std() / math.sqrt(reps)
        assert abs(values.mean() - truth) < 4 * std_error


# -- closed forms --------------------------------------------------------------------------
def test_identical_gradients() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).repeat(6, 1)
    out = gradient_coherence(linear(3), linear_mean, x)
    assert out.coherence.item() == pytest.approx(6.0)
    assert out.mean_cosine.item() == pytest.approx(1.0)
    assert out.grad_norm_sq.item() == pytest.approx(5.25)
    assert out.trace_sigma.item() == pytest.approx(0.0, abs=1e-12)
    assert out.noise_scale.item() == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(out.snr.item())  # no coordinate varies


def test_orthogonal_gradients() -> None:
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    out = gradient_coherence(linear(4), linear_mean, x)
    assert out.coherence.item() == pytest.approx(1.0)
    assert out.mean_cosine.item() == pytest.approx(0.0)
    assert out.grad_norm_sq.item() == pytest.approx(0.0)
    assert out.trace_sigma.item() == pytest.approx(30.0 / 4)  # S₁/m when the pairs are 0
    assert math.isnan(out.noise_scale.item())  # tr Σ / 0: no noise scale, and a flag says so
    assert not out.noise_scale_defined


def test_opposite_pair() -> None:
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    out = gradient_coherence(linear(2), linear_mean, x)
    assert out.coherence.item() == pytest.approx(0.0)
    assert out.mean_cosine.item() == pytest.approx(-1.0)
    assert out.grad_norm_sq.item() == pytest.approx(-5.0)
    # b(m − c)/(c − 1) = 1·2/(−1) = −2 would be the formula's value: not a noise scale
    assert math.isnan(out.noise_scale.item())
    assert not out.noise_scale_defined
    assert out.trace_sigma.item() > 0  # its parts are kept


def test_scale_invariance() -> None:
    model, batch = mlp(), classification()
    base = gradient_coherence(model, cross_entropy, batch)
    scaled = gradient_coherence(model, lambda m, b: 7.0 * cross_entropy(m, b), batch)
    for name in ("coherence", "mean_cosine", "noise_scale", "snr"):
        expected = pytest.approx(getattr(base, name).item(), rel=1e-10, nan_ok=True)
        assert getattr(scaled, name).item() == expected
    assert scaled.grad_norm_sq.item() == pytest.approx(49 * base.grad_norm_sq.item(), rel=1e-10)
    assert scaled.trace_sigma.item() == pytest.approx(49 * base.trace_sigma.item(), rel=1e-10)


def test_noise_scale_is_a_function_of_coherence() -> None:
    out = gradient_coherence(
        mlp(), cross_entropy, classification(n=16), mode="micro_batch", micro_batch_size=2
    )
    m, b, c = out.num_samples, out.sample_size, out.coherence.item()
    assert out.noise_scale_defined
    assert out.noise_scale.item() == pytest.approx(b * (m - c) / (c - 1), rel=1e-10)


# -- per layer, parameters, batch forms ----------------------------------------------------
def block_coherence(g: torch.Tensor, block: slice) -> float:
    part = g[:, block]
    return float(part.sum(0).norm() ** 2 / (part**2).sum())


def test_per_layer_coherence_matches_brute_force() -> None:
    model, batch = mlp(), classification()
    g = loop_gradients(
        model, cross_entropy, examples(batch)
    )  # layout: 0.weight 0.bias 2.weight 2.bias
    per_module = gradient_coherence(model, cross_entropy, batch, per_layer=True).per_layer
    assert list(per_module) == ["0", "2"]
    assert per_module["0"].item() == pytest.approx(block_coherence(g, slice(0, 25)), rel=RTOL)
    assert per_module["2"].item() == pytest.approx(block_coherence(g, slice(25, 43)), rel=RTOL)
    biases = gradient_coherence(model, cross_entropy, batch, per_layer=["*.bias"]).per_layer
    part = torch.cat([g[:, 20:25], g[:, 40:43]], dim=1)
    assert biases["*.bias"].item() == pytest.approx(block_coherence(part, slice(None)), rel=RTOL)


def test_per_layer_dict_blocks_hold_every_parameter_of_their_patterns() -> None:
    """A dict names blocks; a block of several patterns is the union of their parameters."""
    model, batch = mlp(), classification()
    g = loop_gradients(model, cross_entropy, examples(batch))  # 0.weight 0.bias 2.weight 2.bias
    named = {"weights": ["0.weight", "2.weight"], "head": "2.*", "everything": ["*.bias", "*"]}
    out = gradient_coherence(model, cross_entropy, batch, per_layer=named)
    assert list(out.per_layer) == ["weights", "head", "everything"]
    part = torch.cat([g[:, :20], g[:, 25:40]], dim=1)
    assert out.per_layer["weights"].item() == pytest.approx(block_coherence(part, slice(None)))
    assert out.per_layer["head"].item() == pytest.approx(block_coherence(g, slice(25, 43)))
    assert out.per_layer["everything"].item() == pytest.approx(out.coherence.item(), rel=1e-12)


def test_parameters_restrict_every_statistic() -> None:
    model, batch = mlp(), classification()
    out = gradient_coherence(model, cross_entropy, batch, parameters="2.*")
    g = loop_gradients(model, cross_entropy, examples(batch))[:, 25:]
    assert_matches(out, reference(g))


def test_dict_batch_with_shared_items_and_unused_parameters() -> None:
    """Per-example leaves are split, a class-weight vector and a float are passed whole; the
    never-used parameter has zero variance and is left out of the SNR."""
    model = mlp()
    model.add_module("unused", nn.Linear(2, 2).double())
    x, y = classification()
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    batch = {"x": x, "y": y, "w": weights, "scale": 3.0}

    def loss_fn(m: nn.Module, b: dict[str, Any]) -> torch.Tensor:
        logits = m[2](m[1](m[0](b["x"])))
        return (
            b["scale"]
            * F.cross_entropy(logits, b["y"], weight=b["w"], reduction="sum")
            / len(b["y"])
        )

    out = gradient_coherence(model, loss_fn, batch, per_layer=True)
    pieces = [{"x": x[i : i + 1], "y": y[i : i + 1], "w": weights, "scale": 3.0} for i in range(12)]
    g = loop_gradients(model, loss_fn, pieces)
    assert_matches(out, reference(g))
    assert math.isnan(out.per_layer["unused"].item())  # 0/0: no gradient in that block


def test_iterable_of_batches_pools_samples() -> None:
    model, batch = mlp(), classification()
    x, y = batch
    pooled = gradient_coherence(model, cross_entropy, BatchList([(x[:5], y[:5]), (x[5:], y[5:])]))
    assert_same(pooled, gradient_coherence(model, cross_entropy, batch))


def test_one_sample_per_given_batch() -> None:
    """``micro_batch_size=None``: each batch of the list is one sample (training micro-batches)."""
    model, (x, y) = mlp(), classification(n=12)
    pieces = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    out = gradient_coherence(
        model, cross_entropy, BatchList(pieces), mode="micro_batch", micro_batch_size=None
    )
    g = loop_gradients(model, cross_entropy, pieces)
    assert out.num_samples == 3
    assert out.sample_size == pytest.approx(3 / (1 / 3 + 1 / 4 + 1 / 5))
    assert out.coherence.item() == pytest.approx(
        (g.sum(0).norm() ** 2 / (g**2).sum()).item(), rel=RTOL
    )


# -- auto mode -----------------------------------------------------------------------------
class ItemModel(nn.Module):
    """Data-dependent control flow through ``.item()``: vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if x.sum().item() > -100 else -out


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)
    ).double()


def test_auto_uses_micro_batches_silently_with_batch_norm_in_train_mode() -> None:
    model, batch = bn_model().train(), classification(n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gradient_coherence(model, cross_entropy, batch, micro_batch_size=4)
    assert not caught
    assert out.mode == "micro_batch"
    twin = copy.deepcopy(model)
    twin[1].track_running_stats = False  # batch statistics, as the probe uses them
    twin[3].eval()  # dropout off
    assert_matches(out, reference(loop_gradients(twin, cross_entropy, examples(batch, 4)), b=4))


def test_auto_uses_per_example_gradients_with_batch_norm_in_eval_mode() -> None:
    model, batch = bn_model().train(), classification()
    out = gradient_coherence(model, cross_entropy, batch, batch_norm="eval")
    twin = copy.deepcopy(model).eval()
    assert out.mode == "per_example"
    assert_matches(out, reference(loop_gradients(twin, cross_entropy, examples(batch))))


def test_auto_loops_over_examples_when_vmap_fails_keeping_the_per_example_meaning() -> None:
    model, batch = ItemModel(), classification(n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gradient_coherence(model, cross_entropy, batch, micro_batch_size=4, chunk_size=5)
    assert not caught
    assert (out.mode, out.num_samples, out.sample_size) == ("per_example", 16, 1.0)
    assert out.fallback.startswith("a loop over single examples instead of vmap")
    assert "item()" in out.fallback
    assert_matches(out, reference(loop_gradients(model, cross_entropy, examples(batch))))
    explicit = gradient_coherence(model, cross_entropy, batch, mode="per_example")
    assert_same(out, explicit)
    assert gradient_coherence(mlp(), cross_entropy, batch).fallback == ""


class NeedsPairs(nn.Module):
    """A set model that compares examples within its batch: undefined on a single example."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise RuntimeError("NeedsPairs needs at least 2 examples per batch")
        return self.body(x)


def test_auto_falls_back_to_micro_batches_with_one_loud_warning_where_no_example_runs() -> None:
    model, batch = NeedsPairs(), classification(n=16)
    with pytest.warns(
        CurvatureWarning, match=r"micro-batches of 4 examples instead of per-example.*NeedsPairs"
    ) as caught:
        out = gradient_coherence(model, cross_entropy, batch, micro_batch_size=4)
    assert len(caught) == 1
    assert "not single examples" in str(caught[0].message)
    assert (out.mode, out.num_samples, out.sample_size) == ("micro_batch", 4, 4.0)
    assert out.fallback.startswith("micro-batches of 4 examples instead of per-example")
    explicit = gradient_coherence(
        model, cross_entropy, batch, mode="micro_batch", micro_batch_size=4
    )
    assert_same(out, explicit)
    assert explicit.fallback == ""


def test_explicit_per_example_mode_does_not_fall_back() -> None:
    with pytest.raises(RuntimeError, match="NeedsPairs needs at least 2 examples"):
        gradient_coherence(NeedsPairs(), cross_entropy, classification(), mode="per_example")
    with pytest.raises(ValueError, match="mode='per_example' needs BatchNorm in eval mode"):
        gradient_coherence(bn_model().train(), cross_entropy, classification(), mode="per_example")


# -- harmless ------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "flags": [getattr(m, "track_running_stats", None) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before["grads"], after["grads"], strict=True)
    )
    assert before["modes"] == after["modes"]
    assert before["flags"] == after["flags"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
def test_model_is_untouched(batch_norm: str) -> None:
    model = bn_model().train()
    model[4].eval()  # a frozen head in eval mode must stay so
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    before = snapshot(model)
    out = gradient_coherence(
        model, cross_entropy, classification(n=16), batch_norm=batch_norm, per_layer=True
    )
    assert out.mode == ("per_example" if batch_norm == "eval" else "micro_batch")
    assert_untouched(model, before)
    assert model[4].weight.grad is None


@pytest.mark.parametrize("model_class", [ItemModel, NeedsPairs])
def test_model_is_untouched_after_a_vmap_failure(model_class: type[nn.Module]) -> None:
    model = model_class()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # NeedsPairs: micro-batches, warned
        gradient_coherence(model, cross_entropy, classification())
    assert_untouched(model, before)


# -- the accumulator -----------------------------------------------------------------------
def sample_rows(m: int = 9, p: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, p, generator=generator, dtype=torch.float64) + 0.3


def merged(first: GradientSums, second: GradientSums) -> GradientSums:
    """The sums over the samples of both (what adding the states of two processes gives)."""
    theirs = second.states()
    return first.with_states({name: value + theirs[name] for name, value in first.states().items()})


def test_sums_of_rows_equal_the_reference_and_merge_in_any_split() -> None:
    rows = sample_rows()
    whole = GradientSums.zeros(7, dtype=torch.float64)
    whole.add(rows)
    assert_matches(whole.compute(), reference(rows), rtol=1e-10)
    first, second = (
        GradientSums.zeros(7, dtype=torch.float64),
        GradientSums.zeros(7, dtype=torch.float64),
    )
    first.add(rows[:2])
    for row in rows[2:]:
        second.add(row)
    assert_same(merged(first, second).compute(), whole.compute())
    assert first.num_samples == 2  # merge leaves its inputs alone


def test_per_parameter_parts_and_row_blocks_give_the_same_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = sample_rows(m=9, p=7)
    blocks = {"a": [slice(0, 3)], "b": [slice(3, 5), slice(6, 7)]}
    flat = GradientSums.zeros(7, dtype=torch.float64, blocks=blocks)
    flat.add(rows)
    monkeypatch.setattr(gradient_statistics, "_ROW_BLOCK", 14)  # blocks of 2 rows
    parts = GradientSums.zeros(7, dtype=torch.float64, blocks=blocks)
    parts.add([rows[:, :3], rows[:, 3:5].reshape(9, 1, 2), rows[:, 5:]])
    for name, value in flat.states().items():
        assert torch.allclose(parts.states()[name], value, rtol=1e-12, atol=0), name


def test_all_sums_every_state_in_one_call() -> None:
    rows = sample_rows()
    blocks = {"a": [slice(0, 3)], "b": [slice(3, 5), slice(6, 7)]}
    mine = GradientSums.zeros(7, dtype=torch.float64, blocks=blocks)
    theirs = GradientSums.zeros(7, dtype=torch.float64, blocks=blocks)
    mine.add(rows[:4])
    theirs.add(rows[4:])
    sent: list[torch.Tensor] = []
    theirs.all_reduce(lambda flat: sent.append(flat) or flat)  # what the other process sends
    calls = []

    def fake_all_reduce(flat: torch.Tensor) -> torch.Tensor:
        calls.append(flat.shape)
        return flat + sent[0]

    reduced = mine.all_reduce(fake_all_reduce).compute()
    assert len(calls) == 1
    assert_same(reduced, merged(mine, theirs).compute())
    assert reduced.per_layer.keys() == {"a", "b"}
    assert reduced.per_layer["b"].item() == pytest.approx(
        block_coherence(rows[:, [3, 4, 6]], slice(None))
    )


def test_processes_with_samples_of_different_kinds_all_refuse_their_sums() -> None:
    """One process fell back to micro-batches alone: summing would mix two meanings."""
    rows = sample_rows()
    mine = GradientSums.zeros(7, dtype=torch.float64, mode="per_example")
    theirs = GradientSums.zeros(7, dtype=torch.float64, mode="micro_batch")
    mine.add(rows[:4])
    theirs.add(rows[4:])
    sent: list[torch.Tensor] = []
    theirs.all_reduce(lambda flat: sent.append(flat) or flat)
    with pytest.raises(ValueError, match=r"different kinds \(1 of 2 per_example, 1 of 2 micro"):
        mine.all_reduce(lambda flat: flat + sent[0])


def test_all_sum_of_gradient_coherence_is_the_union_batch() -> None:
    """Two identical 'ranks': the sum of their sums is the result on the doubled batch."""
    model, (x, y) = mlp(), classification()
    doubled = gradient_coherence(model, cross_entropy, batch=(x, y), all_sum=lambda t: 2 * t)
    union = gradient_coherence(model, cross_entropy, (torch.cat([x, x]), torch.cat([y, y])))
    assert_same(doubled, union)
    assert doubled.num_samples == 24


def test_scalar_only_sums_give_coherence_and_noise_from_scalars() -> None:
    """The DDP mode: each rank's gradient a sample, only scalars reduced, S₂ = m²‖ḡ‖²."""
    rows = sample_rows(m=4)
    blocks = {"first": [slice(0, 2)]}
    scalars = GradientSums.zeros(7, dtype=torch.float64, vectors=False, blocks=blocks)
    vectors = GradientSums.zeros(7, dtype=torch.float64, blocks=blocks)
    for sums in (scalars, vectors):
        sums.add(rows)
    assert set(scalars.states()) == {
        "count",
        "inverse_size_sum",
        "sq_norm_sum",
        "nonzero_count",
        "block_sq_norm_sum",
    }
    mean = rows.mean(0)
    out = scalars.compute(
        sum_sq_norm=16 * mean @ mean, block_sum_sq_norm={"first": 16 * mean[:2] @ mean[:2]}
    )
    full = vectors.compute()
    for name in ("coherence", "noise_scale", "grad_norm_sq", "trace_sigma"):
        assert getattr(out, name).item() == pytest.approx(getattr(full, name).item(), rel=1e-10)
    assert out.per_layer["first"].item() == pytest.approx(full.per_layer["first"].item(), rel=1e-10)
    assert math.isnan(out.mean_cosine.item())
    assert math.isnan(out.snr.item())


def test_zero_samples_are_left_out_of_the_cosine() -> None:
    sums = GradientSums.zeros(2, dtype=torch.float64)
    sums.add(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    out = sums.compute()
    assert out.mean_cosine.item() == pytest.approx(1 / math.sqrt(2))  # the one non-zero pair
    assert out.coherence.item() == pytest.approx(5 / 3)


def test_with_states_round_trip() -> None:
    sums = GradientSums.zeros(3, blocks={"x": [slice(0, 1)]}, mode="accumulation")
    sums.add(torch.ones(2, 3), sample_size=4)
    copied = GradientSums.zeros(3, blocks={"x": [slice(0, 1)]}, mode="accumulation").with_states(
        sums.states()
    )
    assert copied.compute().coherence.item() == pytest.approx(2.0)
    assert copied.compute().sample_size == pytest.approx(4.0)
    assert copied.compute().mode == "accumulation"


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "vmap"}, r"`mode` must be one of .*'vmap'"),
        ({"micro_batch_size": 0}, r"`micro_batch_size` must be an integer >= 1 or None, got 0"),
        ({"micro_batch_size": 2.5}, r"`micro_batch_size` .* got 2.5"),
        ({"micro_batch_size": True}, r"`micro_batch_size` .* got True"),
        ({"chunk_size": -1}, r"`chunk_size` must be an integer >= 1 or None, got -1"),
        ({"per_layer": 3}, r"`per_layer` must be a bool or glob pattern"),
        ({"per_layer": ["nope.*"]}, r"`per_layer` pattern 'nope\.\*' matches none"),
        ({"parameters": "nope"}, r"`parameters` pattern 'nope' matches no trainable"),
        ({"batch_norm": "frozen"}, r"`batch_norm` must be one of"),
        (
            {"mode": "micro_batch", "micro_batch_size": 12},
            r"gives 1 gradient sample\(s\) in mode 'micro_batch'",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gradient_coherence(mlp(), cross_entropy, classification(), **kwargs)


def test_invalid_inputs() -> None:
    model, batch = mlp(), classification()
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        gradient_coherence(model, "cross_entropy", batch)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gives 1 gradient sample"):
        gradient_coherence(model, cross_entropy, (batch[0][:1], batch[1][:1]))
    with pytest.raises(ValueError, match="holds no tensor with a leading"):
        gradient_coherence(model, lambda m, b: m(torch.ones(1, 4)).sum(), {"n": 3})
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        gradient_coherence(model, lambda m, b: m(b[0]), batch, mode="micro_batch")
    with pytest.raises(NonFiniteCurvatureError, match="not finite"):
        gradient_coherence(model, lambda m, b: cross_entropy(m, b) * math.inf, batch)


def test_invalid_accumulator_use() -> None:
    with pytest.raises(ValueError, match="`size` must be an integer >= 1, got 0"):
        GradientSums.zeros(0)
    with pytest.raises(ValueError, match="`dtype` must be a floating dtype"):
        GradientSums.zeros(3, dtype=torch.int64)
    sums = GradientSums.zeros(3)
    with pytest.raises(ValueError, match=r"k samples of length 3: .* got \(2, 4\)"):
        sums.add(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"k samples of length 3: .* got \[\(2, 2\), \(3, 1\)\]"):
        sums.add([torch.ones(2, 2), torch.ones(3, 1)])
    with pytest.raises(ValueError, match=r"k samples of length 3: .* got \[\(2, 2\)\]"):
        sums.add([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="`sample_size` must be > 0, got 0"):
        sums.add(torch.ones(3), sample_size=0)
    sums.add(torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        sums.compute()
    sums.add(torch.ones(3))
    with pytest.raises(ValueError, match=r"give `sum_sq_norm`.*exactly when"):
        sums.compute(sum_sq_norm=torch.tensor(4.0))
    with pytest.raises(ValueError, match=r"give `sum_sq_norm`.*exactly when"):
        sums.compute(block_sum_sq_norm={"a": torch.tensor(4.0)})
    scalar_only = GradientSums.zeros(3, vectors=False)
    scalar_only.add(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"give `sum_sq_norm`.*exactly when"):
        scalar_only.compute()
    with pytest.raises(ValueError, match="`states` must have the keys"):
        sums.with_states({"count": torch.tensor(1.0)})
    scalar = GradientSums.zeros(3, vectors=False, blocks={"a": [slice(0, 1)]})
    scalar.add(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`block_sum_sq_norm` must have the keys \['a'\]"):
        scalar.compute(sum_sq_norm=torch.tensor(4.0))


def test_one_example_per_process_is_enough_once_pooled() -> None:
    """Fewer than 2 samples is checked after the all-reduce (DDP ranks with one example)."""
    model, (x, y) = mlp(), classification(n=2)
    theirs = gradient_sums(model, cross_entropy, (x[1:], y[1:]))
    assert theirs.num_samples == 1
    sent: list[torch.Tensor] = []
    theirs.all_reduce(lambda flat: sent.append(flat) or flat)  # what the other process sends
    out = gradient_coherence(model, cross_entropy, (x[:1], y[:1]), all_sum=lambda t: t + sent[0])
    assert out.num_samples == 2
    assert_matches(out, reference(loop_gradients(model, cross_entropy, examples((x, y)))))
    with pytest.raises(ValueError, match=r"at least 2 samples, got 1: the batch gives 1"):
        gradient_coherence(model, cross_entropy, (x[:1], y[:1]))
