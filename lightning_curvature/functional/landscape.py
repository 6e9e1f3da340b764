"""``loss_slice``: the loss along chosen directions, beside its second-order model.

Loss-landscape pictures are usually drawn after training, along random directions, at
hundreds of points. During training the directions that matter are known at every eigenvalue
probe: the top Hessian eigenvectors and the optimizer's update. :func:`loss_slice` evaluates
the probe loss at ``w + t·d`` for given directions ``d`` and offsets ``t`` (one forward pass
each, at displaced copies of the weights:
:class:`~lightning_curvature.functional.operator.displaced_loss.DisplacedLoss`), or on the
grid ``w + a·d₁ + b·d₂`` of two directions, and from the same probe the second-order model
``L₀ + t·gᵀd + ½t²·dᵀHd`` (one gradient, free with the retained-graph backend, and one
Hessian-vector product per direction through the operator), so that a picture shows where
the quadratic model every eigenvalue rests on stops being true.

**Units.** ``t`` counts lengths of ``d`` as given, so the length of ``d`` gives ``t`` its
meaning:

* ``d = u``, the optimizer's last update ``w_t − w_{t−1}``: ``t`` counts steps (``t = −1``
  is the weights before the step, ``t = 1`` one more such step); ``d = u/η`` makes ``t`` a
  learning rate, ``t = η`` one step;
* ``d = −(gᵀv)·v`` for a unit eigenvector ``v`` of eigenvalue ``λ``: ``t`` is the step size
  of gradient descent along ``v`` (``t = η`` is where a step of learning rate ``η`` moves
  along ``v``), and the quadratic model is back at ``L₀`` at ``t = 2/λ``
  (:meth:`LossSlice.level_offsets`): the stability threshold on the axis of the step;
* ``d = v/√λ``: the quadratic model's curvature is 1 (``t = ±1`` is ``1/√λ`` away).

**Summaries at a scale ``t``** (with ``±t`` both among the offsets): the *secant curvature*
``[L(t) + L(−t) − 2L₀] / (t²‖d‖²)``, the curvature of the parabola through the three points
(``dᵀHd/‖d‖²`` on a quadratic, at any ``t``), and the *asymmetry*
``[L(t) − L(−t) − 2t·gᵀd] / [L(t) + L(−t) − 2L₀]``, the odd part beyond the linear term over
the even part (0 on a quadratic; the cubic term's share at that scale).

A point whose loss is not finite is kept as it is (NaN, ``inf``): the caller decides.

**Over FSDP2 shards** (``fully_shard``) each process passes its shard of every direction;
each point is one forward pass of the model itself with the local shards displaced in place
and restored exactly after it, every inner product (``gᵀd``, ``dᵀHd``, ``‖d‖²``) is summed
over the shards, and every loss is the union batch's, so every process holds the same
result (the products by finite differences, the one backend there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import check_flag, check_tensor
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend
from lightning_curvature.functional.operator.displaced_loss import DisplacedLoss
from lightning_curvature.functional.operator.options import OperatorOptions

__all__ = ["LossSlice", "loss_slice"]


@dataclass(frozen=True)
class LossSlice:
    """Result of :func:`loss_slice`; float64 tensors on the model's device.

    Attributes:
        offsets: ``(k, T)``: the offsets of each direction (a grid: ``(2, T)``, rows and
            columns).
        losses: ``(k, T)``: ``L(w + offsets[i, j]·d_i)``; a grid: ``(T, T)`` with
            ``losses[a, b] = L(w + offsets[0, a]·d₁ + offsets[1, b]·d₂)``.
        loss: ``L₀ = L(w)``.
        slopes: ``(k,)``: ``gᵀd_i``.
        hessian_form: ``(k, k)``: ``d_iᵀ H d_j``.
        squared_norms: ``(k,)``: ``‖d_i‖²``.
        grid: whether the losses are a 2-D grid.
        num_hvps: Hessian-vector products (one per direction).
        num_forwards: forward passes of the probe (one per point other than ``w``, and ``L₀``).

    Example:
        >>> line = LossSlice(torch.tensor([[-1.0, 0.0, 1.0]]), torch.tensor([[3.5, 1.0, 1.5]]),
        ...                  torch.tensor(1.0), torch.tensor([-1.0]), torch.tensor([[3.0]]),
        ...                  torch.tensor([1.0]), False, 1, 3)
        >>> line.quadratic_model()  # 1 − t + 1.5 t²
        tensor([[3.5000, 1.0000, 1.5000]])
        >>> line.secant_curvatures(1.0), line.asymmetries(1.0), line.level_offsets()
        (tensor([3.]), tensor([0.]), tensor([0.6667]))
    """

    offsets: torch.Tensor
    losses: torch.Tensor
    loss: torch.Tensor
    slopes: torch.Tensor
    hessian_form: torch.Tensor
    squared_norms: torch.Tensor
    grid: bool
    num_hvps: int
    num_forwards: int

    def quadratic_model(self) -> torch.Tensor:
        """``L₀ + gᵀδ + ½ δᵀHδ`` at every point ``δ`` of :attr:`losses` (its shape)."""
        if self.grid:
            a, b = self.offsets[0][:, None], self.offsets[1][None, :]
            s, h = self.slopes, self.hessian_form
            second = a * a * h[0, 0] + 2 * a * b * h[0, 1] + b * b * h[1, 1]
            return self.loss + a * s[0] + b * s[1] + 0.5 * second
        t = self.offsets
        curvature = torch.diagonal(self.hessian_form)[:, None]
        return self.loss + t * self.slopes[:, None] + 0.5 * t * t * curvature

    def curvatures(self) -> torch.Tensor:
        """``dᵀHd / ‖d‖²`` of each direction: the quadratic model's curvature per unit length."""
        return torch.diagonal(self.hessian_form) / self.squared_norms

    def level_offsets(self) -> torch.Tensor:
        """``−2 gᵀd / dᵀHd``: the offset at which the quadratic model is back at ``L₀``.

        ``2/λ`` for ``d = −(gᵀv)·v`` along a unit eigenvector ``v``; ``inf`` where ``dᵀHd``
        is 0.
        """
        return -2.0 * self.slopes / torch.diagonal(self.hessian_form)

    def _pair(self, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``L(w + t·d_i)`` and ``L(w − t·d_i)`` for each direction (``±t`` must be offsets)."""
        if self.grid:
            raise ValueError("secant curvatures and asymmetries are of 1-D slices, not grids.")
        found = []
        for row, losses in zip(self.offsets, self.losses, strict=True):
            index = []
            for t in (offset, -offset):
                hits = torch.isclose(row, row.new_tensor(t), rtol=1e-9, atol=0).nonzero()
                index.append(int(hits[0, 0]) if len(hits) else -1)
            if offset == 0 or min(index) < 0:
                raise ValueError(
                    f"both {offset} and {-offset} must be among the offsets of every "
                    f"direction (nonzero), got {row.tolist()}."
                )
            found.append((losses[index[0]], losses[index[1]]))
        ahead, behind = (torch.stack(side) for side in zip(*found, strict=True))
        return ahead, behind

    def secant_curvatures(self, offset: float) -> torch.Tensor:
        """``[L(t) + L(−t) − 2L₀] / (t²‖d‖²)`` at ``t = offset``, per direction.

        Raises:
            ValueError: on a grid, or if ``±offset`` is not among the offsets.
        """
        ahead, behind = self._pair(offset)
        return (ahead + behind - 2 * self.loss) / (offset**2 * self.squared_norms)

    def asymmetries(self, offset: float) -> torch.Tensor:
        """``[L(t) − L(−t) − 2t·gᵀd] / [L(t) + L(−t) − 2L₀]`` at ``t = offset``, per direction.

        Raises:
            ValueError: on a grid, or if ``±offset`` is not among the offsets.
        """
        ahead, behind = self._pair(offset)
        odd = ahead - behind - 2 * offset * self.slopes
        return odd / (ahead + behind - 2 * self.loss)


def _offsets(offsets: Any, rows: int, device: torch.device) -> torch.Tensor:
    table = torch.as_tensor(offsets, dtype=torch.float64).to(device)
    if table.dim() == 1:
        table = table.expand(rows, -1)
    if table.dim() != 2 or table.shape[0] != rows or table.shape[1] == 0:
        raise ValueError(
            f"`offsets` must be (T,) or ({rows}, T) with T >= 1, got {tuple(table.shape)}."
        )
    if not bool(torch.isfinite(table).all()):
        raise ValueError("`offsets` must be finite.")
    return table


def loss_slice(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    directions: torch.Tensor,
    offsets: torch.Tensor | Sequence[float],
    *,
    grid: bool = False,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    all_reduce: AllReduce | None = None,
    options: OperatorOptions | None = None,
) -> LossSlice:
    """The loss at ``w + t·d`` along each direction, and its second-order model from one probe.

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches.
        directions: ``(P,)`` or ``(k, P)`` flat directions over the measured parameters;
            their lengths are the unit of the offsets (see the module docstring). Over
            sharded (FSDP2) parameters, this process's shards (``P`` the local length); every
            process passes the same offsets.
        offsets: ``(T,)`` offsets shared by the directions, or ``(k, T)``, one row each.
            An offset of 0 costs no forward pass.
        grid: evaluate the ``T × T`` grid ``w + a·d₁ + b·d₂`` of two directions instead.
        parameters: glob pattern(s) selecting the measured parameters.
        backend: Hessian-vector product strategy (see :class:`HessianOperator`).
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        all_reduce: averages a tensor across processes (DDP): every loss, the gradient and
            the products are the union batch's; give every rank the same directions. Over
            FSDP2 shards the losses are the union batch's without it (summed over the shards'
            processes, each weighted by its share of the examples).
        options: the operator's settings as one ``OperatorOptions`` instead of keywords.

    Raises:
        ValueError: on directions or offsets of the wrong shape, a grid of other than two
            directions, a direction that is zero, or ``curvature="ggn"`` options.
        NonFiniteCurvatureError: if the loss at ``w``, the gradient or a product is not
            finite (a point along the slice may be: it is kept as it is).

    Example:
        >>> net = nn.Linear(2, 1, bias=False).double()  # L = w₁² + ¼w₂²: H = diag(2, ½)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> line = loss_slice(net, loss_fn, x, torch.tensor([1.0, 0.0]), [-0.5, 0.0, 0.5])
        >>> line.losses.tolist(), line.quadratic_model().tolist()  # (1 + t)² + ¼: quadratic
        ([[0.5, 1.25, 2.5]], [[0.5, 1.25, 2.5]])
        >>> line.secant_curvatures(0.5).tolist(), line.num_hvps, line.num_forwards
        ([2.0], 1, 3)
    """
    check_flag("grid", grid)
    check_tensor("directions", directions, values=False)  # its entries: on every process
    settings = OperatorOptions.of(options, parameters, backend, batch_norm, "hessian", all_reduce)
    if settings.curvature != "hessian":
        raise ValueError("`loss_slice` models the loss by its Hessian; got curvature='ggn'.")
    rows = directions.reshape(1, -1) if directions.dim() == 1 else directions
    with settings.operator(model, loss_fn, batch) as operator:
        if rows.dim() != 2 or rows.shape[1] != operator.size or rows.shape[0] == 0:
            raise ValueError(
                f"`directions` must be (P,) or (k, P) with P = {operator.size} measured "
                f"parameters, got {tuple(directions.shape)}."
            )
        if grid and rows.shape[0] != 2:
            raise ValueError(f"a grid needs exactly 2 directions, got {rows.shape[0]}.")
        shards = operator.shards
        for row in rows:
            shards.check_vector("directions", row, operator.device, nonzero=True)
        rows = rows.to(device=operator.device, dtype=operator.dtype)
        gradient = operator.gradient()
        products = [operator.matvec(d) for d in rows]
        num_hvps = operator.num_hvps
    slopes = shards.inner_products(rows, gradient)
    form = torch.stack([shards.inner_products(rows, hd) for hd in products])
    form = (form + form.T) / 2  # symmetric to rounding; made exactly so
    squared = torch.stack([shards.inner_products(d, d) for d in rows])
    table = _offsets(offsets, 2 if grid else rows.shape[0], gradient.device)
    with DisplacedLoss(
        model,
        loss_fn,
        batch,
        parameters=settings.parameters,
        batch_norm=settings.batch_norm,
        all_reduce=settings.all_reduce,
    ) as losses:
        center = losses.at().to(torch.float64)

        def at(displacement: torch.Tensor, zero: bool) -> torch.Tensor:
            return center if zero else losses.at(displacement).to(torch.float64)

        if grid:
            values = [
                [at(a * rows[0] + b * rows[1], a == b == 0) for b in table[1].tolist()]
                for a in table[0].tolist()
            ]
        else:
            values = [
                [at(t * d, t == 0) for t in row.tolist()]
                for d, row in zip(rows, table, strict=True)
            ]
        num_forwards = losses.num_forwards
    return LossSlice(
        offsets=table,
        losses=torch.stack([torch.stack(row) for row in values]),
        loss=center,
        slopes=slopes,
        hessian_form=form,
        squared_norms=squared,
        grid=grid,
        num_hvps=num_hvps,
        num_forwards=num_forwards,
    )
