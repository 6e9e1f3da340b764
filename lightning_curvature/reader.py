"""Reading a run's curvature series back: from TensorBoard event files or a CSVLogger's output.

What the monitors wrote, as plain Python data, without Lightning (this module imports none of
it): :func:`read_run` reads one run's directory, :func:`find_runs` every run under a
directory (a ``TensorBoardLogger`` writes ``<save_dir>/<name>/version_<n>/events.out.tfevents.*``,
a ``CSVLogger`` ``…/version_<n>/metrics.csv``). A :class:`CurvatureRun` holds each scalar tag
as a :class:`Series` of ``(step, value)`` and, from TensorBoard, the spectral densities as
:class:`DensitySnapshot` (the histograms ``SpectralDensityMonitor`` writes). Other loggers
(Weights & Biases, MLflow, …) keep the same tags in their own stores; read them with their
clients.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> log_dir = tempfile.mkdtemp()
    >>> with SummaryWriter(log_dir) as writer:
    ...     for step, value in ((0, 2.0), (50, 7.5), (100, 9.0)):
    ...         writer.add_scalar("curvature/eigenvalue_1", value, step)
    >>> run = read_run(log_dir)
    >>> run.scalars["curvature/eigenvalue_1"]
    Series(steps=(0, 50, 100), values=(2.0, 7.5, 9.0))
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from lightning_curvature.checks import check_flag, check_path

__all__ = ["CurvatureRun", "DensitySnapshot", "Series", "find_runs", "read_run"]

#: The tag groups the package writes (the rest of a run's scalars are read too, on request).
GROUPS = ("curvature/", "gradient/", "sam/", "probe_cost/")
_DENSITY = "spectral_density"  # histogram tags end so: curvature/[<name>/]spectral_density


@dataclass(frozen=True)
class Series:
    """One scalar tag over a run, in step order.

    Attributes:
        steps: the optimizer steps logged at.
        values: the values, as floats.

    Example:
        >>> series = Series(steps=(0, 40, 80), values=(2.0, 5.0, 4.5))
        >>> len(series), max(series.values)
        (3, 5.0)
    """

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float:
        """The last value (``nan`` for an empty series).

        Example:
            >>> Series((0, 10), (1.5, 2.5)).last
            2.5
        """
        return self.values[-1] if self.values else math.nan


@dataclass(frozen=True)
class DensitySnapshot:
    """The eigenvalue density of one probe, from its histogram.

    Attributes:
        step: the optimizer step.
        grid: the eigenvalues the density is given at (the buckets' centres).
        density: the density there, normalised to integrate to 1 over the grid (the
            monitor's own density, smoothed over ``num_points``, up to that factor).
        count: the eigenvalues the histogram counts (the measured parameters, on a grid
            fine enough to hold the smoothed density).
    """

    step: int
    grid: tuple[float, ...]
    density: tuple[float, ...]
    count: float


@dataclass
class CurvatureRun:
    """What one run's logger holds.

    Attributes:
        path: the run's directory.
        scalars: tag to :class:`Series`.
        densities: tag to the density snapshots of that tag (TensorBoard only).

    Example:
        >>> trace = {"curvature/trace": Series((0,), (4.0,))}
        >>> run = CurvatureRun(Path("logs/sgd/version_0"), trace)
        >>> run.label(), run.scalars["curvature/trace"].last
        ('sgd/version_0', 4.0)
    """

    path: Path
    scalars: dict[str, Series] = field(default_factory=dict)
    densities: dict[str, list[DensitySnapshot]] = field(default_factory=dict)

    def label(self, root: Path | None = None) -> str:
        """A name for legends: the path below ``root`` (default: the last two parts).

        Example:
            >>> CurvatureRun(Path("logs/lr_0.003/version_0")).label()
            'lr_0.003/version_0'
        """
        if root is not None and self.path != root and self.path.is_relative_to(root):
            return str(self.path.relative_to(root))
        return "/".join(self.path.parts[-2:])


def _read_events(path: Path, groups: tuple[str, ...] | None) -> CurvatureRun:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    run = CurvatureRun(path)
    tags = events.Tags()
    for tag in sorted(tags["scalars"]):
        if groups is None or tag.startswith(groups):
            points = sorted((e.step, e.value) for e in events.Scalars(tag))
            run.scalars[tag] = Series(tuple(s for s, _ in points), tuple(v for _, v in points))
    for tag in sorted(tags["histograms"]):
        if tag.endswith(_DENSITY):
            run.densities[tag] = [
                _snapshot(e.step, e.histogram_value) for e in events.Histograms(tag)
            ]
    return run


def _snapshot(step: int, histogram: object) -> DensitySnapshot:
    limits = list(histogram.bucket_limit)  # type: ignore[attr-defined]
    counts = list(histogram.bucket)  # type: ignore[attr-defined]
    spacing = (limits[-1] - limits[0]) / max(len(limits) - 1, 1)
    total = float(histogram.num) or 1.0  # type: ignore[attr-defined]
    grid = tuple(limit - spacing / 2 for limit in limits)
    density = tuple(count / (total * spacing) for count in counts)
    return DensitySnapshot(step, grid, density, total)


def _read_csv(path: Path, groups: tuple[str, ...] | None) -> CurvatureRun:
    run = CurvatureRun(path)
    points: dict[str, list[tuple[int, float]]] = {}
    with (path / "metrics.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            step = int(float(row["step"]))
            for tag, text in row.items():
                if tag in ("step", "epoch") or not text:
                    continue
                if groups is None or tag.startswith(groups):
                    points.setdefault(tag, []).append((step, float(text)))
    for tag in sorted(points):
        ordered = sorted(points[tag])
        run.scalars[tag] = Series(tuple(s for s, _ in ordered), tuple(v for _, v in ordered))
    return run


def _is_run(path: Path) -> bool:
    return any(path.glob("events.out.tfevents.*")) or (path / "metrics.csv").is_file()


def read_run(path: str | Path, *, all_tags: bool = False) -> CurvatureRun:
    r"""The curvature series of one run's directory (TensorBoard event files or ``metrics.csv``).

    Args:
        path: the directory a logger wrote the run to (``logger.log_dir``).
        all_tags: also the scalars outside the package's groups (``train/loss``, ``lr-…``).

    Raises:
        FileNotFoundError: when ``path`` holds neither event files nor a ``metrics.csv``.

    Example:
        A ``CSVLogger``'s run (every tag a column, empty where a step did not log it):

        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> _ = (run_dir / "metrics.csv").write_text(
        ...     "epoch,step,curvature/trace,train/loss\n0,0,4.5,\n0,9,,0.7\n0,10,3.5,\n"
        ... )
        >>> read_run(run_dir).scalars
        {'curvature/trace': Series(steps=(0, 10), values=(4.5, 3.5))}
        >>> sorted(read_run(run_dir, all_tags=True).scalars)
        ['curvature/trace', 'train/loss']
    """
    check_path("path", path)
    check_flag("all_tags", all_tags)
    path = Path(path)
    groups = None if all_tags else GROUPS
    if any(path.glob("events.out.tfevents.*")):
        return _read_events(path, groups)
    if (path / "metrics.csv").is_file():
        return _read_csv(path, groups)
    raise FileNotFoundError(
        f"{str(path)!r} holds no TensorBoard event files and no CSVLogger metrics.csv; pass a "
        "run's directory (the logger's log_dir), or a directory above runs to find_runs()."
    )


def find_runs(path: str | Path, *, all_tags: bool = False) -> list[CurvatureRun]:
    r"""Every run at or below ``path``, in path order (e.g. each ``version_<n>`` of a sweep).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for lr in ("0.1", "0.2"):
        ...     (root / f"lr_{lr}").mkdir()
        ...     _ = (root / f"lr_{lr}" / "metrics.csv").write_text("step,curvature/trace\n0,4\n")
        >>> [run.label(root) for run in find_runs(root)]
        ['lr_0.1', 'lr_0.2']
    """
    check_path("path", path)
    check_flag("all_tags", all_tags)
    path = Path(path)
    directories = sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
    directories += sorted({p.parent for p in path.rglob("metrics.csv")} - set(directories))
    if not directories and not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    return [read_run(d, all_tags=all_tags) for d in sorted(directories)]
