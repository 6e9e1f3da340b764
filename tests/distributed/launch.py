"""Run a two-process DDP script of this folder as a user would, and fail with its stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]  # the checkout these tests belong to


def run_script(script: Path, out: Path, mode: str, timeout: float = 240) -> None:
    """``python script out mode``; raises with the end of stderr if it fails.

    The checkout's own package comes first on ``PYTHONPATH`` (the script's processes and
    those Lightning launches from them), not whichever copy is installed.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, str(script), str(out), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr[-3000:]
