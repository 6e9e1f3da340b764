"""Run a two-process DDP script of this folder as a user would, and fail with its stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_script(script: Path, out: Path, mode: str, timeout: float = 240) -> None:
    """``python script out mode``; raises with the end of stderr if it fails."""
    done = subprocess.run(
        [sys.executable, str(script), str(out), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
