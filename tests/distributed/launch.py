"""Both sides of a two-process script of these tests: the launch and the rank's exit.

``run_script`` runs a script as a user would and fails with its stderr; ``run_rank`` is
what every such script's ``__main__`` calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).parents[2]  # the checkout these tests belong to


def run_script(script: Path, out: Path, mode: str, timeout: float = 240) -> None:
    """``python script out mode``; raises with the end of stderr if it fails.

    The checkout's own package comes first on ``PYTHONPATH`` (the script's processes and
    those Lightning launches from them), not whichever copy is installed; so does the
    checkout itself, for scripts outside this folder that import ``run_rank``. A script
    whose ``__main__`` does not end through ``run_rank`` is refused before it runs.
    """
    entry = script.read_text().partition('if __name__ == "__main__":')[2]
    assert "run_rank(" in entry, f"{script.name}: its __main__ must end through run_rank"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, str(script), str(out), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr[-3000:]


def run_rank(main: Callable[[], None]) -> None:
    """Run one rank's ``main``, then destroy the process group Lightning left up.

    Neither ``Trainer.fit`` nor ``Fabric`` destroys the default group. A gloo process that
    exits with it up can abort while the interpreter finalises ("terminate called without
    an active exception", pytorch/pytorch#190489): that failed one CI run after ``fit`` had
    ended cleanly. Only after a clean ``main``: a rank that raised leaves the group as it is,
    since tearing it down then could wait on a peer still inside a collective.

    Example::

        if __name__ == "__main__":
            run_rank(main)
    """
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
