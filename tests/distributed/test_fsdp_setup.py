"""What is refused under sharded strategies, and FSDP2 shards in one process (world size 1)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_curvature import (
    SAM,
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    OutputLoss,
    SpectralDensityMonitor,
    hessian_eigenvalues,
)
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.operator.operator import HessianOperator

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from models import TanhRegressor, csv_logger

MONITORS = [HessianEigenvalueMonitor, HessianTraceMonitor, SpectralDensityMonitor]


def _trainer(strategy: object, tmp_path: Path) -> SimpleNamespace:
    # FSDP1/DeepSpeed need an accelerator (and deepspeed) to build a Trainer; setup reads
    # only `.strategy` and `.loggers`.
    return SimpleNamespace(strategy=strategy, loggers=[csv_logger(tmp_path)])


def _deepspeed() -> DeepSpeedStrategy:
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed package needed to ask


@pytest.mark.parametrize("strategy", [FSDPStrategy, _deepspeed], ids=["FSDP1", "DeepSpeed"])
@pytest.mark.parametrize("monitor", [*MONITORS, GradientCoherenceMonitor], ids=lambda m: m.__name__)
def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2(
    tmp_path: Path, strategy: type, monitor: type
) -> None:
    trainer = _trainer(strategy(), tmp_path)
    name = type(trainer.strategy).__name__
    with pytest.raises(
        MisconfigurationException, match=rf"does not support {name}.*ModelParallelStrategy"
    ):
        monitor(every_n_steps=1).setup(trainer, TanhRegressor(), stage="fit")


@pytest.mark.parametrize("strategy", [FSDPStrategy, _deepspeed], ids=["FSDP1", "DeepSpeed"])
def test_sam_refuses_fsdp1_and_deepspeed_naming_fsdp2(strategy: type) -> None:
    trainer = SimpleNamespace(strategy=strategy())
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy.*fully_shard"):
        SAM().setup(trainer, TanhRegressor(), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_model_parallel_is_accepted_with_finite_differences(tmp_path: Path, monitor: type) -> None:
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    for backend in ("auto", "finite_difference"):
        monitor(every_n_steps=1, backend=backend).setup(trainer, TanhRegressor(), stage="fit")


@pytest.mark.parametrize("backend", ["retained_graph", "double_backward", "forward_over_reverse"])
def test_model_parallel_refuses_double_backward_backends(tmp_path: Path, backend: str) -> None:
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(MisconfigurationException, match=rf"backend='{backend}'.*finite_difference"):
        HessianTraceMonitor(every_n_steps=1, backend=backend).setup(
            trainer, TanhRegressor(), stage="fit"
        )


def test_model_parallel_refuses_a_piecewise_linear_model(tmp_path: Path) -> None:
    model = TanhRegressor()
    model.net[1] = nn.ReLU()  # type: ignore[index]
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy.*smooth.*ReLU"):
        HessianEigenvalueMonitor(every_n_steps=1).setup(trainer, model, stage="fit")


def test_model_parallel_refuses_the_gauss_newton_matrix(tmp_path: Path) -> None:
    split = OutputLoss(lambda module, batch: (module(batch[0]), batch[1]), nn.functional.mse_loss)
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(MisconfigurationException, match=r"curvature='ggn'.*'hessian'"):
        HessianTraceMonitor(every_n_steps=1, curvature="ggn", loss_fn=split).setup(
            trainer, TanhRegressor(), stage="fit"
        )


@pytest.mark.parametrize("extra", ["gradient_share", "update_sharpness"])
def test_model_parallel_refuses_the_eigenvalue_monitors_extras(tmp_path: Path, extra: str) -> None:
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(MisconfigurationException, match=rf"{extra}=True is not implemented"):
        HessianEigenvalueMonitor(every_n_steps=1, **{extra: True}).setup(
            trainer, TanhRegressor(), stage="fit"
        )


@pytest.mark.parametrize("monitor", ["BatchSharpnessMonitor", "GradientCoherenceMonitor"])
def test_model_parallel_refuses_monitors_not_made_for_shards(tmp_path: Path, monitor: str) -> None:
    import lightning_curvature

    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(MisconfigurationException, match=r"does not support ModelParallelStrategy"):
        getattr(lightning_curvature, monitor)(every_n_steps=1).setup(
            trainer, TanhRegressor(), stage="fit"
        )


def test_model_parallel_refuses_coherence_naming_the_strategy(tmp_path: Path) -> None:
    trainer = _trainer(ModelParallelStrategy(), tmp_path)
    with pytest.raises(
        MisconfigurationException, match=r"does not support ModelParallelStrategy.*per-example"
    ):
        GradientCoherenceMonitor(every_n_steps=1).setup(trainer, TanhRegressor(), stage="fit")


def test_sam_under_model_parallel_refuses_per_replica_perturbations() -> None:
    trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(MisconfigurationException, match=r"per_replica.*all_reduced"):
        SAM(perturbation="per_replica").setup(trainer, TanhRegressor(), "fit")  # type: ignore[arg-type]


# -- FSDP2 shards in this process (a one-process group) --------------------------------------
@pytest.fixture
def one_process() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1)).to(dtype)
    sharded = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1)).to(dtype)
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded)
    return plain, sharded


def _loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).pow(2).mean()


@pytest.mark.parametrize("backend", ["retained_graph", "double_backward", "forward_over_reverse"])
def test_sharded_parameters_refuse_double_backward_backends(
    one_process: None, backend: str
) -> None:
    _, sharded = _sharded()
    with pytest.raises(ValueError, match=rf"backend='{backend}'.*double backward.*'auto'"):
        HessianOperator(sharded, _loss, torch.ones(2, 3), backend=backend)  # type: ignore[arg-type]


def test_sharded_parameters_refuse_the_gauss_newton_matrix(one_process: None) -> None:
    _, sharded = _sharded()
    split = OutputLoss(lambda m, x: (m(x), torch.zeros(2, 1)), nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"curvature='ggn'.*sharded"):
        HessianOperator(sharded, split, torch.ones(2, 3), curvature="ggn")


def test_sharded_parameters_refuse_bf16(one_process: None) -> None:
    _, sharded = _sharded(torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 or float64.*bfloat16"):
        HessianOperator(sharded, _loss, torch.ones(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sharded_parameters_take_finite_differences_restoring_everything(
    one_process: None, dtype: torch.dtype
) -> None:
    plain, sharded = _sharded(dtype)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = [torch.full_like(p, 7.0) for p in sharded.parameters()]
    for p, g in zip(sharded.parameters(), grads, strict=True):
        p.grad = g
    before = [p.to_local().clone() for p in sharded.parameters()]  # type: ignore[operator]
    generator = make_generator(torch.device("cpu"))
    # The finite difference's error (module docstring of hvp.py): ~1e-8 in float64,
    # ~1e-4 in float32, below the default tol there.
    tol, rel = (1e-7, 1e-6) if dtype == torch.float64 else (1e-3, 1e-3)
    found = hessian_eigenvalues(sharded, _loss, x, tol=tol, generator=generator)
    exact = hessian_eigenvalues(plain.double(), _loss, x.double(), tol=1e-10)  # float64
    assert float(found.eigenvalues[0]) == pytest.approx(float(exact.eigenvalues[0]), rel=rel)
    for p, g, b in zip(sharded.parameters(), grads, before, strict=True):
        assert p.grad is g  # the same .grad objects, untouched
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
        assert torch.equal(p.to_local(), b)  # type: ignore[operator]  # weights bit-exact


class _FunctionalRelu(nn.Module):
    """A piecewise-linear op no module check sees: ``F.relu`` inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.outer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(nn.functional.relu(self.inner(x)))


def test_sharded_parameters_refuse_kinks_found_in_the_graph(one_process: None) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    sharded = fully_shard(_FunctionalRelu())
    before = [p.to_local().clone() for p in sharded.parameters()]  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"piecewise-linear ops.*ReluBackward"):
        HessianOperator(sharded, _loss, torch.ones(2, 3)).__enter__()
    for p, b in zip(sharded.parameters(), before, strict=True):
        assert torch.equal(p.to_local(), b)  # type: ignore[operator]
        assert p.grad is None


def test_sharded_bf16_compute_warns_of_its_accuracy(one_process: None) -> None:
    """FSDP2's MixedPrecisionPolicy: float32 shards, a bfloat16 forward (FD's limit stated)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plain, _ = _sharded()
    mixed = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1))
    mixed.load_state_dict(plain.state_dict())
    fully_shard(mixed, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    with pytest.warns(CurvatureWarning, match=r"computes in torch.bfloat16.*no better than"):
        found = hessian_eigenvalues(mixed, _loss, x, tol=0.1)
    exact = hessian_eigenvalues(plain.double(), _loss, x.double(), tol=1e-10)
    # bfloat16 products are good to about eps^(2/3) = 2.5e-2 relative (1-10% measured)
    assert float(found.eigenvalues[0]) == pytest.approx(float(exact.eigenvalues[0]), rel=0.1)
