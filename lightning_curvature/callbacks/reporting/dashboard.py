"""The TensorBoard custom-scalars layout: one page of charts for every monitor of a Trainer.

TensorBoard reads one layout per run (the first written), so the monitors do not each write
their own: the first monitor of the Trainer collects every monitor's
:meth:`~lightning_curvature.callbacks.monitor.CurvatureMonitor.charts` at ``on_train_start`` and
hands them here to be written once (:func:`write_layout`); this module knows charts, not
monitors. Chart regexes are anchored (``^tag$``), so a chart
shows exactly the tags it names and never, say, the per-layer ``curvature/eigenvalue_1/<name>``
next to the full model's. The cost of the probes (``*_cost/…``) gets a category of its own,
after the science.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_curvature.callbacks.reporting.logging import tensorboard_writers
from lightning_curvature.functional.stability import stability_threshold

__all__ = [
    "COST_CATEGORY",
    "Charts",
    "batch_norm_note",
    "exact",
    "family",
    "layout",
    "margin",
    "multiline",
    "raw_threshold",
    "sharpness_chart_title",
    "threshold_label",
    "write_layout",
]

#: The raw-Hessian sharpness quantities that share one chart against the SGD threshold.
SHARED_SHARPNESS = ("λ₁", "batch sharpness", "critical sharpness")

#: ``{category: {chart title: ["Multiline", [regex, ...]] or ["Margin", [value, lower, upper]]}}``
Charts = dict[str, dict[str, list[Any]]]

#: The category of the cost charts (HVPs and seconds per probe), shown last.
COST_CATEGORY = "cost of the probes"


def exact(tag: str) -> str:
    r"""A chart regex matching ``tag`` and nothing else.

    Example:
        >>> exact("curvature/trace/net.0")
        '^curvature/trace/net\\.0$'
    """
    return f"^{re.escape(tag)}$"


def family(prefix: str, suffix: str) -> str:
    r"""A chart regex for ``<prefix><suffix>`` tags, ``suffix`` a regex (e.g. ``\d+``).

    Example:
        >>> pattern = family("curvature/eigenvalue_", r"\d+")
        >>> [bool(re.search(pattern, t)) for t in ("curvature/eigenvalue_2",
        ...                                        "curvature/eigenvalue_1/net.0")]
        [True, False]
    """
    return f"^{re.escape(prefix)}{suffix}$"


def multiline(*regexes: str) -> list[Any]:
    """A line chart of every tag matching one of ``regexes``.

    Example:
        >>> multiline(exact("gradient/snr"))
        ['Multiline', ['^gradient/snr$']]
    """
    return ["Multiline", list(regexes)]


def margin(value: str, lower: str, upper: str) -> list[Any]:
    """A line with a shaded band: the three tags (exact names, not regexes).

    Example:
        >>> margin("curvature/trace", "curvature/trace_lower", "curvature/trace_upper")
        ['Margin', ['curvature/trace', 'curvature/trace_lower', 'curvature/trace_upper']]
    """
    return ["Margin", [value, lower, upper]]


def batch_norm_note(module: nn.Module, mode: str) -> str:
    """What a chart title says about BatchNorm: which statistics the probe used (or nothing).

    Example:
        >>> batch_norm_note(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "train")
        ' [BatchNorm: batch statistics]'
        >>> batch_norm_note(nn.Linear(2, 2), "train")
        ''
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return ""
    return " [BatchNorm: batch statistics]" if mode == "train" else " [BatchNorm: running stats]"


def threshold_label(optimizer: torch.optim.Optimizer) -> str | None:
    """The stability threshold of ``optimizer`` as a chart title writes it (``None``: unknown).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> threshold_label(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4))
        '(2+2β)/η − wd'
        >>> threshold_label(torch.optim.AdamW([w]))
        '(2+2β₁)/((1−β₁)η)'
    """
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(group.get("momentum", 0.0))
        if momentum == 0:
            label = "2/η"
        elif group.get("nesterov", False):
            label = "(2+2β)/((1+2β)η)"
        else:
            label = "(2+2β)/η"
        return label + (" − wd" if float(group.get("weight_decay", 0.0)) else "")
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "(2+2β₁)/((1−β₁)η)"
    return None


def sharpness_chart_title(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batch_norm: str,
    quantity: str = "λ₁",
    name: str | None = None,
) -> str | None:
    """The title of the chart of the raw sharpness against its threshold (SGD family).

    ``HessianEigenvalueMonitor``'s ``λ₁``, ``BatchSharpnessMonitor``'s batch sharpness and
    ``CriticalSharpnessMonitor``'s critical sharpness (with plain SGD) chart on it, so with
    the same BatchNorm mode (the same landscape) and ``name`` they share one chart
    (:func:`layout` merges charts of one title), whose title names what the Trainer's monitors
    put on it (each says so in its ``sharpness_quantity``). ``None``
    without an SGD optimizer.

    Example:
        >>> sharpness_chart_title(pl.Trainer(logger=False), nn.Linear(1, 1), "train") is None
        True
    """
    if not trainer.optimizers or not isinstance(trainer.optimizers[0], torch.optim.SGD):
        return None
    if quantity in SHARED_SHARPNESS:
        charted = {
            getattr(c, "sharpness_quantity", None)
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if getattr(c, "batch_norm", None) == batch_norm and getattr(c, "name", None) == name
        }
        quantity = " and ".join(q for q in SHARED_SHARPNESS if q in charted) or quantity
    label = threshold_label(trainer.optimizers[0])
    note = batch_norm_note(pl_module, batch_norm)
    named = f"sharpness {quantity}" if quantity.startswith("λ") else quantity
    return f"{named} vs. stability threshold {label}{note}"


def raw_threshold(trainer: pl.Trainer) -> float | None:
    """The threshold of the raw Hessian's ``λ₁`` (SGD family), else ``None``.

    Adam's threshold refers to the preconditioned ``λ₁(P⁻¹H)``, not to ``H``'s spectrum.

    Example:
        >>> raw_threshold(pl.Trainer(logger=False)) is None  # no optimizer yet
        True
    """
    if not trainer.optimizers or not isinstance(trainer.optimizers[0], torch.optim.SGD):
        return None
    found = stability_threshold(trainer.optimizers[0], [])
    return None if found is None else found.limit


def layout(parts: Iterable[Charts]) -> Charts:
    """Merge the charts of several monitors, keeping their order; the cost category last.

    Line charts of one title (e.g. every monitor's "seconds per probe") become one chart.

    Example:
        >>> merged = layout([{COST_CATEGORY: {"s": multiline("^a$")}},
        ...                  {"curvature": {"trace": multiline("^b$")}}])
        >>> list(merged)
        ['curvature', 'cost of the probes']
    """
    merged: Charts = {}
    for charts in parts:
        for category, entries in charts.items():
            known = merged.setdefault(category, {})
            for title, chart in entries.items():
                if title in known and known[title][0] == chart[0] == "Multiline":
                    known[title] = multiline(*dict.fromkeys([*known[title][1], *chart[1]]))
                else:
                    known[title] = chart
    if COST_CATEGORY in merged:
        merged[COST_CATEGORY] = merged.pop(COST_CATEGORY)
    return merged


def write_layout(trainer: pl.Trainer, parts: Iterable[Charts]) -> None:
    """Write the merged layout of ``parts`` to every TensorBoard logger of ``trainer``.

    ``parts`` (each monitor's charts) is read only if there is such a logger: a lazy
    iterable spares the monitors drawing charts nothing shows.
    """
    writers = list(tensorboard_writers(trainer))
    if not writers:
        return
    charts = layout(parts)
    if charts:
        for writer in writers:
            writer.add_custom_scalars(charts)
