"""The math layer is pure torch: no module of ``lightning_curvature.functional`` imports
Lightning (the callbacks layer sits on top of it, never the other way round), and importing it
through the top-level package does not load the callbacks either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning_curvature

PACKAGE = Path(lightning_curvature.__file__).parent
FUNCTIONAL = PACKAGE / "functional"

# A plain import of the subpackage (through the real top-level __init__), then every module
# below it, then the modules the functional layer shares with the callbacks.
SCRIPT = """
import importlib, json, pkgutil, sys
{preamble}
functional = importlib.import_module("lightning_curvature.functional")
names = ["lightning_curvature.functional"] + [
    info.name
    for info in pkgutil.walk_packages(functional.__path__, "lightning_curvature.functional.")
]
for name in names + ["lightning_curvature.errors", "lightning_curvature.checks"]:
    importlib.import_module(name)
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
    or m.startswith("lightning_curvature.callbacks")
)
print(json.dumps({{"imported": names, "heavy": heavy}}))
"""


def _report(preamble: str = "") -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(preamble=preamble)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_functional_modules_import_without_lightning() -> None:
    report = _report()
    modules = {
        "lightning_curvature." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in FUNCTIONAL.rglob("*.py")
    }
    modules = {m.removesuffix(".__init__") for m in modules}
    assert set(report["imported"]) == modules
    assert len(modules) >= 12
    assert report["heavy"] == []


def test_the_check_sees_a_lightning_module() -> None:
    """The same probe reports a module named ``lightning`` once one is loaded."""
    report = _report('import types; sys.modules["lightning"] = types.ModuleType("lightning")')
    assert report["heavy"] == ["lightning"]
