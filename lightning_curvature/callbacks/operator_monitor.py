"""``OperatorMonitor``: the base of the monitors that measure through the curvature operator.

The eigenvalue, trace and density monitors measure the Hessian, or with ``curvature="ggn"``
the generalized Gauss–Newton matrix ``Jᵀ H_ℓ J``
(:mod:`~lightning_curvature.functional.operator.ggn`). For the GGN the monitor must know where the
model's outputs end and the loss begins, which a ``training_step`` does not say: such a
monitor needs ``loss_fn=OutputLoss(output_fn, loss)`` and refuses to be built without it.

A GGN monitor writes every tag with ``ggn_`` before its name (``curvature/ggn_eigenvalue_1``,
``curvature/ggn_trace``, ``probe_cost/ggn_eigenvalue_hvps``), so that a Hessian and a GGN
monitor of one kind log side by side, and its charts say "GGN".
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.trainer import sharding
from lightning_curvature.functional.operator.backends import check_curvature
from lightning_curvature.functional.operator.ggn import Curvature

__all__ = ["OperatorMonitor"]


class OperatorMonitor(CurvatureMonitor):
    """A monitor of the Hessian, or of the generalized Gauss–Newton matrix.

    Args:
        curvature: ``"hessian"`` (default) or ``"ggn"``, which needs
            ``loss_fn=OutputLoss(output_fn, loss)`` (e.g. ``OutputLoss(lambda module, batch:
            (module(batch[0]), batch[1]), F.cross_entropy)``).
        **kwargs: see ``CurvatureMonitor``.

    Raises:
        MisconfigurationException: on an unknown ``curvature``, or ``"ggn"`` without an
            ``OutputLoss`` or with ``backend="finite_difference"``.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_curvature import HessianTraceMonitor, OutputLoss
        >>> split = OutputLoss(lambda module, batch: (module(batch[0]), batch[1]), F.cross_entropy)
        >>> monitor = HessianTraceMonitor(curvature="ggn", loss_fn=split)
        >>> monitor.tag("curvature/trace"), monitor.matrix
        ('curvature/ggn_trace', 'GGN')
    """

    def __init__(self, *, curvature: Curvature = "hessian", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            check_curvature(curvature, self.loss_fn, self.backend)
        except ValueError as err:
            default = " (the default, training_step, does not split it)" * (self.loss_fn is None)
            raise MisconfigurationException(f"{err}{default}") from None
        self.curvature = curvature

    @property
    def matrix(self) -> str:
        """The measured matrix as the charts name it: ``"Hessian"`` or ``"GGN"``."""
        return "GGN" if self.curvature == "ggn" else "Hessian"

    @override
    def tag(self, tag: str) -> str:
        if self.curvature == "ggn":
            group, _, rest = tag.partition("/")
            tag = f"{group}/ggn_{rest}"
        return super().tag(tag)

    @override
    def check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().check_sharding(trainer, pl_module)
        if self.curvature != "hessian" and sharding(trainer) == "fsdp2":
            raise MisconfigurationException(
                f"`{type(self).__name__}` under ModelParallelStrategy: curvature="
                f"{self.curvature!r} needs Jacobian products through torch.func, which FSDP2's "
                "sharded parameters do not allow; use curvature='hessian'."
            )

    @override
    def probe_kwargs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {**super().probe_kwargs(trainer, pl_module), "curvature": self.curvature}

    @override
    def state_key_fields(self) -> dict[str, Any]:
        # Only a GGN monitor adds its curvature: Hessian monitors keep the keys they had.
        ggn = {"curvature": self.curvature} if self.curvature != "hessian" else {}
        return {**super().state_key_fields(), **ggn}
