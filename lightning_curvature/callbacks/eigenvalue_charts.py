"""The charts of ``HessianEigenvalueMonitor``: sharpness against its threshold, the spectrum.

Adam's threshold is one of ``λ₁(P⁻¹H)``, SGD's one of ``λ₁(H)``: each chart holds the
quantity its threshold refers to, and the raw spectrum has a chart of its own; then one
chart per extra the monitor logs (per-block eigenvalues, the gradient's share of the top
eigenspace, the curvature along the last update). The layout they go into is
:mod:`~lightning_curvature.callbacks.reporting.dashboard`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from lightning_curvature.callbacks.reporting.dashboard import (
    batch_norm_note,
    exact,
    family,
    multiline,
    sharpness_chart_title,
    threshold_label,
)

__all__ = ["eigenvalue_charts"]


def eigenvalue_charts(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    tag: Callable[[str], str],
    *,
    matrix: str,
    k: int,
    batch_norm: str,
    name: str | None,
    stability: bool,
    smallest: bool,
    blocks: bool,
    gradient_share: bool,
    update_sharpness: bool,
) -> dict[str, list[Any]]:
    r"""Chart title to chart of the eigenvalue monitor's science (its cost charts apart).

    Args:
        trainer: the trainer, whose first optimizer names the threshold.
        pl_module: the module (its BatchNorm layers, if any, are named in the titles).
        tag: the monitor's tag of a metric (its ``name`` and ``ggn_`` applied).
        matrix: ``"Hessian"`` or ``"GGN"``.
        k: the number of top eigenvalues.
        batch_norm: the monitor's BatchNorm mode.
        name: the monitor's ``name``.
        stability: whether the threshold and the sharpness ratio are logged.
        smallest: whether the smallest eigenvalue is logged.
        blocks: whether there are ``per_layer`` blocks.
        gradient_share: whether the gradient's share of the top eigenspace is logged.
        update_sharpness: whether the curvature along the last update is logged.

    Example:
        >>> charts = eigenvalue_charts(pl.Trainer(logger=False), pl.LightningModule(), str,
        ...     matrix="Hessian", k=2, batch_norm="train", name=None, stability=True,
        ...     smallest=False, blocks=False, gradient_share=False, update_sharpness=False)
        >>> charts
        {'top 2 Hessian eigenvalues (raw H)': ['Multiline', ['^curvature/eigenvalue_\\d+$']]}
    """
    note = batch_norm_note(pl_module, batch_norm)
    symbol = matrix[0]  # H or G
    top_of = "λ₁" if symbol == "H" else f"λ₁({symbol})"
    ratio, threshold = tag("curvature/sharpness_ratio"), None
    if stability and trainer.optimizers:
        threshold = threshold_label(trainer.optimizers[0])
    science: dict[str, list[Any]] = {}
    title = sharpness_chart_title(trainer, pl_module, batch_norm, top_of, name)
    # The ratio first: one number, 1 at the edge of stability, readable whatever the schedule
    # (the threshold of a warmup and decay spans decades its chart's linear axis flattens).
    if threshold is not None and title is not None:
        science[f"sharpness ratio {top_of} / threshold"] = multiline(exact(ratio))
        science[title] = multiline(
            exact(tag("curvature/eigenvalue_1")),
            exact(tag("curvature/stability_threshold")),
        )
    elif threshold is not None:
        science[f"sharpness ratio λ₁(P⁻¹{symbol}) / threshold"] = multiline(exact(ratio))
        science[f"preconditioned sharpness λ₁(P⁻¹{symbol}) vs. threshold {threshold}{note}"] = (
            multiline(
                exact(tag("curvature/preconditioned_eigenvalue_1")),
                exact(tag("curvature/stability_threshold")),
            )
        )
    spectrum = [family(tag("curvature/eigenvalue_"), r"\d+")]
    if smallest:
        spectrum.append(exact(tag("curvature/eigenvalue_min")))
    top = f"top {matrix} eigenvalue λ₁" if k == 1 else f"top {k} {matrix} eigenvalues"
    lowest = " and the smallest" if smallest else ""
    science[f"{top}{lowest} (raw {symbol}){note}"] = multiline(*spectrum)
    if blocks:
        science["top eigenvalue per block"] = multiline(
            family(tag("curvature/eigenvalue_1/"), ".+")
        )
    if gradient_share:
        science[f"gradient's share of the top-{k} eigenspace ‖P_k g‖²/‖g‖²"] = multiline(
            exact(tag("curvature/gradient_top_share")),
            exact(tag("curvature/training_gradient_top_share")),
        )
    if update_sharpness:
        science["curvature along the last update uᵀHu/‖u‖²"] = multiline(
            exact(tag("curvature/update_sharpness")),
            exact(tag("curvature/preconditioned_update_sharpness")),
        )
        science["update sharpness / threshold"] = multiline(
            exact(tag("curvature/update_sharpness_ratio"))
        )
    return science
