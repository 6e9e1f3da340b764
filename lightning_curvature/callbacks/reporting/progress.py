"""A line per probe on rank zero, through Python ``logging`` (the logger ``lightning_curvature``).

The monitors say what they measured as they go, as Lightning says its own set-up: at level
``INFO`` to a logger of the package's name, which prints to stderr unless the application
has configured logging (then the records go to the root logger's handlers). To turn the
lines off, raise the logger's level; the warnings (a run too short for the budget) stay::

    import logging

    logging.getLogger("lightning_curvature").setLevel(logging.WARNING)

A line reads ``HessianEigenvalueMonitor step 120/528: eigenvalue_1=12.3 stability_threshold=
3.8e+04 … (14 HVPs, 0.21 s; its probes 3.1% of the fit so far)``: the step and the run
Lightning expects, the first :data:`SHOWN` quantities the probe logged (the full set is in
the loggers and in the end-of-fit table), and what the probe cost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

__all__ = ["LOGGER", "SHOWN", "format_value", "headline", "probe_line"]

#: The package's logger: one line per probe (``INFO``), the budget's shortfall (``WARNING``).
LOGGER = logging.getLogger("lightning_curvature")
if LOGGER.level == logging.NOTSET:
    LOGGER.setLevel(logging.INFO)
    if not logging.getLogger().hasHandlers():  # no application set-up: print, as Lightning does
        LOGGER.addHandler(logging.StreamHandler())
        LOGGER.propagate = False

#: How many quantities a probe's line shows.
SHOWN = 4
#: Tags a line leaves out: a probe's cost (said at its end) and the bands around a value.
_LEFT_OUT = ("probe_cost/",)
_BANDS = ("_lower", "_upper")


def headline(values: Mapping[str, float]) -> dict[str, float]:
    """The quantities of a probe a reader looks at first: no cost tags, no band edges.

    Example:
        >>> headline({"curvature/trace": 3.0, "curvature/trace_lower": 2.0,
        ...           "probe_cost/trace_seconds": 0.1})
        {'curvature/trace': 3.0}
    """
    return {
        tag: value
        for tag, value in values.items()
        if not tag.startswith(_LEFT_OUT) and not tag.endswith(_BANDS)
    }


def format_value(value: float) -> str:
    """Four significant digits, as a table or a line shows a value.

    Example:
        >>> format_value(38000.0), format_value(0.0412345), format_value(float("nan"))
        ('3.8e+04', '0.04123', 'nan')
    """
    return f"{value:.4g}"


def probe_line(
    owner: str,
    step: int,
    run_steps: int | None,
    values: Mapping[str, float] | None,
    seconds: float,
    hvps: float | None,
    share: float | None,
) -> str:
    """The line of one probe.

    Args:
        owner: the monitor (its class, and its ``name`` if it has one).
        step: the optimizer step probed.
        run_steps: the optimizer steps of the run Lightning expects (``None``: unknown).
        values: what the probe logged (``None``: it was skipped; the warning says why).
        seconds: what it took.
        hvps: the Hessian-vector products it used (``None``: it counts none).
        share: the monitor's probe time so far over the fit's time so far.

    Example:
        >>> probe_line("HessianTraceMonitor", 40, 528,
        ...            {"curvature/trace": 51.25, "probe_cost/trace_seconds": 0.2}, 0.2, 32, 0.031)
        'HessianTraceMonitor step 40/528: trace=51.25 (32 HVPs, 0.2 s; its probes 3.1% of the fit so far)'
    """  # noqa: E501
    where = f"{owner} step {step}" + ("" if run_steps is None else f"/{run_steps}")
    if values is None:
        said = "skipped"
    else:
        shown = list(headline(values).items())[:SHOWN]
        said = " ".join(f"{tag.rsplit('/', 1)[-1]}={format_value(v)}" for tag, v in shown)
    cost = f"{seconds:.2g} s" if hvps is None else f"{hvps:.0f} HVPs, {seconds:.2g} s"
    if share is not None:
        cost += f"; its probes {100 * share:.1f}% of the fit so far"
    return f"{where}: {said} ({cost})"
