"""A figure of one or more runs' curvature, for a paper: ``python -m lightning_curvature.plot``.

::

    python -m lightning_curvature.plot lightning_logs/lr_sweep -o figure.pdf
    python -m lightning_curvature.plot runs/sgd runs/adamw -o figure.png --title "digits CNN"

Every run found at or below each ``LOGDIR`` (TensorBoard event files or a ``CSVLogger``'s
``metrics.csv``, :func:`~lightning_curvature.reader.find_runs`) is drawn in a colour of its
own, named in the figure's legend. The panels, each drawn only where a run logged its data:

* **sharpness vs. threshold** (log axis): λ₁ of the Hessian (circles), Adam's λ₁(P⁻¹H)
  (squares), batch sharpness (triangles) and the stability threshold (dashed: the
  learning-rate schedule, inverted);
* **sharpness / threshold** (log axis) with the edge of stability at 1;
* **Hessian trace ± 2 standard errors** (a band);
* **gradient coherence** and **noise scale** B_simple (log axis);
* **spectral density** (log axis): the first and last snapshot of each run.

Points a probe skipped (a value that was not finite, Adam's ratio at step 0) leave a gap in
the line; nothing is drawn between two probes that did not both log. Needs matplotlib (the
``plot`` extra: ``pip install lightning-curvature[plot]``); Lightning is not imported.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_curvature.reader import CurvatureRun, Series, find_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["main", "plot_runs", "with_gaps"]

#: (tag, legend, marker, line style) of each quantity of the sharpness panel.
SHARPNESS = (
    ("curvature/eigenvalue_1", "λ₁ (Hessian)", "o", "-"),
    ("curvature/preconditioned_eigenvalue_1", "λ₁(P⁻¹H) (Adam)", "s", "-"),
    ("curvature/batch_sharpness", "batch sharpness", "^", ":"),
    ("curvature/stability_threshold", "stability threshold", "", "--"),
)
RATIOS = (
    ("curvature/sharpness_ratio", "λ₁ / threshold", "o", "-"),
    ("curvature/batch_sharpness_ratio", "batch sharpness / threshold", "^", ":"),
)
#: The monitor whose probe steps a tag is measured at (its ``probe_cost/<name>_seconds``).
_PROBED_BY = {
    "eigenvalue": "eigenvalue",
    "stability_threshold": "eigenvalue",
    "sharpness_ratio": "eigenvalue",
    "batch_sharpness": "batch_sharpness",
    "trace": "trace",
    "density": "density",
}


def _tag(tag: str, name: str | None) -> str:
    """``tag`` of a monitor built with ``name=`` (``curvature/<name>/…``)."""
    if name is None:
        return tag
    group, _, rest = tag.partition("/")
    return f"{group}/{name}/{rest}"


def _cost_tag(tag: str, name: str | None) -> str:
    quantity = tag.rsplit("/", 1)[-1]
    kind = "coherence" if tag.startswith("gradient/") else None
    for prefix, monitor in _PROBED_BY.items():
        if kind is None and quantity.startswith(prefix):
            kind = monitor
    return _tag(f"probe_cost/{kind}_seconds", name)


def with_gaps(series: Series, probed: Sequence[int]) -> tuple[list[float], list[float]]:
    """``series`` as x and y for a line, with a ``nan`` (a break) at every probe it skipped.

    Args:
        series: the quantity.
        probed: the steps its monitor probed at (a value missing there is a gap).

    Example:
        >>> with_gaps(Series((0, 20, 30), (1.0, 3.0, 4.0)), probed=[0, 10, 20, 30])
        ([0.0, 10.0, 20.0, 30.0], [1.0, nan, 3.0, 4.0])
    """
    logged = dict(zip(series.steps, series.values, strict=True))
    steps = sorted(set(probed) | set(series.steps))
    return [float(s) for s in steps], [logged.get(s, math.nan) for s in steps]


def _line(
    ax: Axes, run: CurvatureRun, tag: str, name: str | None, color: Any, **style: Any
) -> bool:
    series = run.scalars.get(_tag(tag, name))
    if series is None or not len(series):
        return False
    probed = run.scalars.get(_cost_tag(tag, name))
    x, y = with_gaps(series, probed.steps if probed is not None else ())
    ax.plot(x, y, color=color, markersize=4, linewidth=1.4, **style)
    return True


def _quantities(
    ax: Axes,
    runs: Sequence[CurvatureRun],
    name: str | None,
    colors: list[Any],
    quantities: Sequence[tuple[str, str, str, Any]],
) -> bool:
    from matplotlib.lines import Line2D

    drawn: list[Line2D] = []
    for tag, label, marker, style in quantities:
        found = [
            _line(ax, run, tag, name, c, marker=marker, linestyle=style)
            for run, c in zip(runs, colors, strict=True)
        ]
        if any(found):
            drawn.append(Line2D([], [], color="0.25", marker=marker, linestyle=style, label=label))
    if drawn:
        ax.legend(handles=drawn, fontsize=8, loc="best", frameon=False)
    return bool(drawn)


def _sharpness(ax: Axes, runs: Sequence[CurvatureRun], name: str | None, colors: list[Any]) -> bool:
    if not _quantities(ax, runs, name, colors, SHARPNESS):
        return False
    ax.set_yscale("log")
    ax.set_title("sharpness vs. stability threshold")
    ax.set_ylabel("eigenvalue")
    return True


def _ratio(ax: Axes, runs: Sequence[CurvatureRun], name: str | None, colors: list[Any]) -> bool:
    if not _quantities(ax, runs, name, colors, RATIOS):
        return False
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.text(
        0.99,
        1.0,
        "edge of stability ",
        transform=ax.get_yaxis_transform(),
        fontsize=7,
        ha="right",
        va="top",
        color="0.4",
    )
    ax.set_yscale("log")
    ax.set_title("sharpness / stability threshold")
    ax.set_ylabel("ratio")
    return True


def _trace(ax: Axes, runs: Sequence[CurvatureRun], name: str | None, colors: list[Any]) -> bool:
    drawn = False
    for run, color in zip(runs, colors, strict=True):
        if not _line(ax, run, "curvature/trace", name, color, marker="o"):
            continue
        drawn = True
        low, high = (
            run.scalars.get(_tag(f"curvature/trace_{b}", name)) for b in ("lower", "upper")
        )
        if low is not None and high is not None and low.steps == high.steps:
            ax.fill_between(low.steps, low.values, high.values, color=color, alpha=0.2, linewidth=0)
    if drawn:
        ax.set_title("Hessian trace ± 2 standard errors")
        ax.set_ylabel("trace")
    return drawn


def _gradient(
    ax: Axes,
    runs: Sequence[CurvatureRun],
    name: str | None,
    colors: list[Any],
    tag: str,
    title: str,
    log: bool,
) -> bool:
    found = [_line(ax, run, tag, name, c, marker="o") for run, c in zip(runs, colors, strict=True)]
    if not any(found):
        return False
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    return True


def _density(ax: Axes, runs: Sequence[CurvatureRun], name: str | None, colors: list[Any]) -> bool:
    from matplotlib.lines import Line2D

    drawn = False
    for run, color in zip(runs, colors, strict=True):
        snapshots = run.densities.get(_tag("curvature/spectral_density", name), [])
        shown = (
            [(snapshots[0], 0.35), (snapshots[-1], 1.0)]
            if len(snapshots) > 1
            else [(snapshot, 1.0) for snapshot in snapshots]
        )
        for snapshot, alpha in shown:
            floor = [max(d, 1e-12) for d in snapshot.density]
            ax.plot(snapshot.grid, floor, color=color, alpha=alpha, linewidth=1.2)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-8)
        ax.set_title("spectral density (first and last probe)")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        probes = [
            Line2D([], [], color="0.25", alpha=a, label=label)
            for a, label in ((0.35, "first probe"), (1.0, "last probe"))
        ]
        ax.legend(handles=probes, fontsize=8, frameon=False)
    return drawn


def plot_runs(
    runs: Sequence[CurvatureRun],
    labels: Sequence[str] | None = None,
    *,
    name: str | None = None,
    title: str | None = None,
) -> Figure:
    """The multi-panel figure of ``runs`` (one colour each), panels without data left out.

    Args:
        runs: from :func:`~lightning_curvature.reader.find_runs` or ``read_run``.
        labels: one legend entry per run (default: each run's :meth:`CurvatureRun.label`).
        name: the monitors' ``name=``, if they were given one (their tags' component).
        title: the figure's title.

    Raises:
        ValueError: when no run holds a quantity any panel draws.

    Example:
        >>> from lightning_curvature import Series
        >>> run = CurvatureRun(Path("sgd"), {"curvature/eigenvalue_1": Series((0, 10), (2.0, 9.0)),
        ...     "curvature/stability_threshold": Series((0, 10), (10.0, 10.0))})
        >>> [ax.get_title() for ax in plot_runs([run]).axes if ax.get_visible()]
        ['sharpness vs. stability threshold']
    """
    import matplotlib.pyplot as plt

    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    panels: list[Callable[[Axes], bool]] = [
        lambda ax: _sharpness(ax, runs, name, colors),
        lambda ax: _ratio(ax, runs, name, colors),
        lambda ax: _trace(ax, runs, name, colors),
        lambda ax: _gradient(
            ax,
            runs,
            name,
            colors,
            "gradient/coherence",
            "gradient coherence (m-coherence)",
            log=False,
        ),
        lambda ax: _gradient(
            ax,
            runs,
            name,
            colors,
            "gradient/noise_scale",
            "noise scale B_simple = tr Σ / ‖G‖² (examples)",
            log=True,
        ),
        lambda ax: _density(ax, runs, name, colors),
    ]
    rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(rows, 2, figsize=(10, 3.1 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    used = [ax for ax, panel in zip(flat, panels, strict=False) if panel(ax)]
    if not used:
        plt.close(figure)
        raise ValueError("none of the runs holds a quantity the figure draws (curvature/…).")
    for ax in flat:
        if ax not in used:
            figure.delaxes(ax)
    for ax in used:
        ax.grid(True, which="major", alpha=0.3)
        if not ax.get_xlabel():
            ax.set_xlabel("optimizer step")
    names = list(labels) if labels is not None else [run.label() for run in runs]
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, linewidth=2, label=n) for c, n in zip(colors, names, strict=True)
    ]
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))
    figure.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 4),
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.4 / figure.get_figheight()),
    )
    if title:
        figure.suptitle(title, y=1.0, va="bottom")
    return figure


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m lightning_curvature.plot LOGDIR... -o figure.pdf``; returns the figure's path.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_curvature.plot",
        description="Draw the curvature of one or more runs (TensorBoard or CSVLogger logs).",
    )
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="a run, or a folder of runs")
    parser.add_argument("-o", "--output", default="curvature.pdf", help="pdf, png or svg")
    parser.add_argument("--title", help="the figure's title")
    parser.add_argument("--labels", nargs="+", help="one legend entry per run, in path order")
    parser.add_argument("--name", help="the monitors' name=, if they were given one")
    parser.add_argument("--dpi", type=int, default=200, help="for raster formats")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        parser.exit(
            2,
            "lightning_curvature.plot needs matplotlib: pip install 'lightning-curvature[plot]'\n",
        )
    matplotlib.use("Agg")
    runs: list[CurvatureRun] = []
    labels: list[str] = []
    for logdir in args.logdirs:
        root = Path(logdir)
        found = find_runs(root)
        if not found:
            parser.exit(2, f"no TensorBoard or CSVLogger run under {logdir}\n")
        runs += found
        labels += [run.label(root if len(found) > 1 else root.parent) for run in found]
    if args.labels is not None:
        if len(args.labels) != len(runs):
            parser.exit(2, f"--labels gave {len(args.labels)} labels for {len(runs)} runs\n")
        labels = list(args.labels)
    figure = plot_runs(runs, labels, name=args.name, title=args.title)
    output = Path(args.output)
    figure.savefig(output, dpi=args.dpi, bbox_inches="tight")
    print(f"wrote {output} ({len(runs)} run(s))")
    return output


if __name__ == "__main__":
    main()
