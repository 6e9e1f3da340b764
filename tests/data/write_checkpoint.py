"""Writes ``monitors_8e73fee.ckpt`` and ``monitors_8e73fee.json``: a checkpoint at step 5 of
a run with every periodic monitor, and the values that run logged after it.

Run once at commit 8e73fee (the last commit before the package was moved into folders),
from the repository root of a checkout of that commit, with this file copied in:
``PYTHONPATH=. python tests/data/write_checkpoint.py``. ``tests/callbacks/test_old_checkpoint.py``
resumes from the checkpoint with today's code and expects the same values.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "callbacks"))

from old_checkpoint_run import fit  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run = fit(Path(tmp), "full")
        (checkpoint,) = run["dir"].glob("*step=5.ckpt")
        shutil.copy(checkpoint, HERE / "monitors_8e73fee.ckpt")
    after = {tag: [(s, v) for s, v in series if s >= 5] for tag, series in run["values"].items()}
    (HERE / "monitors_8e73fee.json").write_text(json.dumps(after, indent=1, sort_keys=True))
