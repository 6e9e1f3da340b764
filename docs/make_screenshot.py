"""Regenerate ``docs/dashboard.png``: the TensorBoard dashboard of the main example.

Runs ``examples/edge_of_stability.py``, serves its logs with TensorBoard on 127.0.0.1 and
takes a screenshot of the Custom Scalars tab in headless Chromium (Debian package
``chromium``):

    python docs/make_screenshot.py
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.error import URLError

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float = 90) -> None:
    """Poll ``url`` until it answers with content."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if len(response.read()) > 2:
                    return
        except (URLError, ConnectionError):
            pass
        time.sleep(1)
    raise TimeoutError(url)


def main() -> None:
    """Run the example, serve it, and save the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--max-steps", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as log_dir:
        example = ROOT / "examples" / "edge_of_stability.py"
        command = [
            sys.executable,
            str(example),
            "--log-dir",
            log_dir,
            "--max-steps",
            str(args.max_steps),
        ]
        subprocess.run(command, check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host", "127.0.0.1",
             "--port", str(port), "--load_fast=false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout")
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                     "--window-size=1400,1000", "--virtual-time-budget=30000",
                     f"--screenshot={args.output}", f"http://127.0.0.1:{port}/#custom_scalars"],
                    check=True, capture_output=True, timeout=180,
                )  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
