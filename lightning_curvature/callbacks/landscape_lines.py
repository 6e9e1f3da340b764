"""What ``LossLandscapeMonitor`` slices along, on which axis, and what it reads off a slice.

**Axis: distance in step lengths.** Every eigenvector line is drawn against the distance from
the current weights ``w`` in units of ``h``, the length of the step the optimizer is about to
take (``lr·‖u_next‖``, its next update read from its state by
:func:`~lightning_curvature.functional.optimizer_update.next_update`; for another optimizer
the last update's length): at ``t = ±1`` the weights have moved as far as one step moves
them, which is where the quadratic model has to hold for the stability analysis to mean
anything. (A learning-rate axis, ``w − t·(gᵀv)v``, collapses when the gradient has no
component along ``v``, as it has not before the edge, where the top direction has relaxed.)

* Along a top eigenvector ``v`` (eigenvalue ``λ``), oriented so that the optimizer's next
  step moves towards positive ``t``: the marker ``step`` is where that step lands on the line
  (its component along ``v``; ``η|gᵀv|/h`` for gradient descent) and ``2/lambda`` where the
  quadratic model is back at ``L(w)``, the mirror image of ``w`` across the model's vertex.
  Plain gradient descent is at the edge of stability along ``v`` when the two coincide
  (``ηλ = 2``): before it the step lands short of the mirror point (the loss along ``v``
  falls), beyond it the step overshoots.
* Along the last update ``u = w_t − w_{t−1}``, in multiples of ``u``: ``t = −1`` is the
  weights before the step, ``t = 1`` one more such step.

The offsets are ``num_points`` evenly spaced in ``[−R, R]`` (``R = 2``, or up to 8 to show
both markers), plus ``±1`` and the marked step, where the scalars are read
(:func:`line_scalars`): ``num_points + 2`` forward passes a line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_curvature.callbacks.reporting.slice_rendering import SlicePanel
from lightning_curvature.functional.landscape import LossSlice
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = [
    "SliceLine",
    "eigenvector_lines",
    "line_panels",
    "line_scalars",
    "offsets_around",
    "update_line",
]

#: A loss change below this many roundings of ``L(w)`` is not resolved by the forward passes.
_RESOLVED = 64


@dataclass(frozen=True)
class SliceLine:
    """One line of a probe's slices.

    Attributes:
        key: the suffix of its tags (``"1"`` … ``"k"``, ``"update"``).
        title: what the line is, for its panel.
        direction: ``d`` (flat): the point at offset ``t`` is ``w + t·d``.
        offsets: the offsets along it.
        step: the offset of the optimizer's step on this line (``None``: unknown).
        x_label: what the offsets count.
        level_label: the label of the marker where the quadratic model is back at ``L(w)``.
    """

    key: str
    title: str
    direction: torch.Tensor
    offsets: torch.Tensor
    step: float | None
    x_label: str
    level_label: str


def offsets_around(points: int, reach: float, extra: list[float]) -> torch.Tensor:
    """``points`` (odd) offsets evenly spaced in ``[−reach, reach]``, and ``extra``, sorted.

    Symmetric, with an exact 0 (the current weights, whose loss costs no forward pass).

    Example:
        >>> offsets_around(5, 2.0, [-1.0, 0.5]).tolist()
        [-2.0, -1.0, -1.0, 0.0, 0.5, 1.0, 2.0]
        >>> float(offsets_around(13, 2.0, [])[6])  # (linspace's middle is 1.1e-16 here)
        0.0
    """
    half = torch.linspace(0.0, reach, points // 2 + 1, dtype=torch.float64)
    even = torch.cat([-half[1:].flip(0), half])
    return torch.cat([even, torch.tensor(extra, dtype=torch.float64)]).sort().values


def eigenvector_lines(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    gradient: torch.Tensor,
    step: torch.Tensor,
    num_points: int,
    shards: VectorShards | None = None,
) -> list[SliceLine]:
    """The lines along the top eigenvectors, in lengths of ``step`` (see the module docstring).

    Args:
        eigenvalues: ``(k,)``.
        eigenvectors: ``(k, P)`` unit vectors.
        gradient: the probe gradient ``g``.
        step: the optimizer's next step (what it subtracts from the weights), or the last
            update where the next one is not known; not zero.
        num_points: evenly spaced offsets per line (odd: ``w`` among them); ``±1`` and the
            step are added.
        shards: how the vectors are split across processes (FSDP2: each holds its shard,
            and the inner products are summed over them, so every process draws the same
            lines); whole by default.
    """
    shards = shards or VectorShards.single(step.numel())
    length = shards.norm(step)
    along = shards.inner_products(eigenvectors, step.to(eigenvectors))
    slopes = shards.inner_products(eigenvectors, gradient.to(eigenvectors))
    lines = []
    for i, value in enumerate(eigenvalues.tolist()):
        sign = -1.0 if float(along[i]) > 0 else 1.0  # w − step moves along −(stepᵀv)·v
        mark = abs(float(along[i])) / length
        slope = sign * length * float(slopes[i])  # gᵀd
        level = -2.0 * slope / (length**2 * value) if value > 0 else math.inf
        shown = max(mark, abs(level) if math.isfinite(level) else 0.0)
        extra = [-1.0, 1.0, mark]
        lines.append(
            SliceLine(
                key=str(i + 1),
                title=f"top eigenvector v{i + 1} (lambda_{i + 1} = {value:.4g})",
                direction=(sign * length) * eigenvectors[i],
                offsets=offsets_around(num_points, min(8.0, max(2.0, 1.25 * shown)), extra),
                step=mark,
                x_label=f"distance along v{i + 1}, in lengths of the optimizer's step",
                level_label=f"2/lambda_{i + 1}",
            )
        )
    return lines


def update_line(update: torch.Tensor, num_points: int) -> SliceLine:
    """The line along the last update ``u``, in multiples of ``u``."""
    return SliceLine(
        key="update",
        title="last update u = w_t - w_(t-1)",
        direction=update,
        offsets=offsets_around(num_points, 2.0, [-1.0, 1.0, 0.5]),
        step=1.0,
        x_label="multiples of the last update (-1: the weights before it)",
        level_label="model back at L(w)",
    )


def _index(offsets: torch.Tensor, value: float) -> int:
    return int(torch.isclose(offsets, offsets.new_tensor(value), rtol=1e-9, atol=0).nonzero()[0, 0])


def line_scalars(result: LossSlice, lines: list[SliceLine]) -> dict[str, torch.Tensor]:
    """The scalars of each line, tagged ``landscape/<name>_<key>``.

    Its curvature ``dᵀHd/‖d‖²``; at one step length (``t = ±1``) the secant curvature and
    the asymmetry; at the optimizer's step the loss change, measured and modelled. A value
    read from loss differences below 64 roundings of ``L(w)`` in float32 is left out: the
    forward passes do not resolve it.
    """
    metrics: dict[str, torch.Tensor] = {}
    curvatures = result.curvatures()
    secants, asymmetries = result.secant_curvatures(1.0), result.asymmetries(1.0)
    model = result.quadratic_model()
    resolution = _RESOLVED * torch.finfo(torch.float32).eps * abs(float(result.loss))
    for i, line in enumerate(lines):
        metrics[f"landscape/curvature_{line.key}"] = curvatures[i]
        even = secants[i] * result.squared_norms[i]  # L(1) + L(−1) − 2L₀
        if abs(float(even)) > resolution:
            metrics[f"landscape/secant_curvature_{line.key}"] = secants[i]
            metrics[f"landscape/asymmetry_{line.key}"] = asymmetries[i]
        if line.step is None:
            continue
        at = _index(result.offsets[i], line.step)
        measured = result.losses[i, at] - result.loss
        modelled = model[i, at] - result.loss
        if max(abs(float(measured)), abs(float(modelled))) > resolution:
            metrics[f"landscape/step_loss_change_{line.key}"] = measured
            metrics[f"landscape/quadratic_step_loss_change_{line.key}"] = modelled
    return metrics


def line_panels(result: LossSlice, lines: list[SliceLine]) -> list[SlicePanel]:
    """One picture panel per line: the slice, its quadratic model, the step and ``2/λ``."""
    panels = []
    levels = result.level_offsets()
    for i, line in enumerate(lines):
        markers = {} if line.step is None else {"step": line.step}
        if line.key == "update":
            markers = {"weights before": -1.0}
        if math.isfinite(float(levels[i])):
            markers[line.level_label] = float(levels[i])
        panels.append(
            SlicePanel(
                title=line.title,
                offsets=result.offsets[i].cpu(),
                losses=result.losses[i].cpu(),
                quadratic=(
                    float(result.loss),
                    float(result.slopes[i]),
                    float(result.hessian_form[i, i]),
                ),
                x_label=line.x_label,
                markers=markers,
            )
        )
    return panels
