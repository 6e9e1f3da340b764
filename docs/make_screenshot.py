"""Regenerate the dashboard pictures under ``docs/``: the example runs in TensorBoard.

Runs each example of :data:`RUNS` (``examples/edge_of_stability.py`` with SGD and with full-batch
AdamW; ``examples/digits_cnn.py``, AdamW with warmup and cosine decay, at a readable cadence
and at the defaults), serves each run's logs with TensorBoard on 127.0.0.1 only, and takes
screenshots of the Custom Scalars, Scalars and Images tabs in headless Chromium (Debian
package ``chromium``), with the settings docs/READING.md recommends for sparse probe series
(smoothing 0, outliers not ignored), given in the page's address:

    python docs/make_screenshot.py  # docs/<run>_{custom_scalars,scalars,images}.png
    python docs/make_screenshot.py --runs digits_cnn --logs lightning_logs/digits_cnn/version_0

The pictures are palette PNGs (a few hundred KB each).
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

from PIL import Image

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
# tab -> window size and device scale (the Custom Scalars page is long: every chart of the
# layout; TensorBoard shows an image at half its width, so that page is taken at 2x)
PAGES = {
    "custom_scalars": (1400, 2000, 1),
    "scalars": (1400, 1500, 1),
    "images": (1000, 560, 2),
}


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


#: run -> the example and its arguments
RUNS = {
    "sgd": ["edge_of_stability.py", "--optimizer", "sgd"],
    "adamw": ["edge_of_stability.py", "--optimizer", "adamw"],
    "digits_cnn": ["digits_cnn.py", "--every-n-steps", "50"],
    "digits_cnn_defaults": ["digits_cnn.py"],
}
#: TensorBoard's settings for sparse probe series, in the address of every tab
SETTINGS = "&_smoothingWeight=0&_ignoreYOutliers=false"


def run_example(run: str, log_dir: str, max_steps: int | None) -> None:
    """Train the example of ``run``, logging under ``log_dir``."""
    script, *arguments = RUNS[run]
    command = [sys.executable, str(ROOT / "examples" / script), *arguments, "--log-dir", log_dir]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    print(next(line for line in done.stdout.splitlines() if line.startswith("CONCLUSION")))


def screenshot(chromium: str, url: str, size: tuple[int, int, int], output: Path) -> None:
    """Save a headless-Chromium screenshot of ``url``, quantized to a small palette PNG."""
    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "shot.png"
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size={size[0]},{size[1]}", f"--force-device-scale-factor={size[2]}",
             "--virtual-time-budget=30000",
             f"--screenshot={raw}", url],
            check=True, capture_output=True, timeout=240,
        )  # fmt: skip
        with Image.open(raw) as image:
            image.convert("RGB").quantize(colors=128).save(output, optimize=True)
    print(f"wrote {output} ({output.stat().st_size // 1024} KB)")


def main() -> None:
    """Run both examples, serve each, and save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--max-steps", type=int, help="default: the example's own")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--logs", type=Path, help="serve these logs of one run of --runs instead of training"
    )
    args = parser.parse_args()
    for run in args.runs:
        with tempfile.TemporaryDirectory() as scratch:
            log_dir = str(args.logs) if args.logs is not None else scratch
            if args.logs is None:
                run_example(run, log_dir, args.max_steps)
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir,
                 "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_for(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout")
                for page, size in PAGES.items():
                    output = args.output_dir / f"{run}_{page}.png"
                    url = f"http://127.0.0.1:{port}/#{page}{SETTINGS}"
                    screenshot(args.chromium, url, size, output)
            finally:
                server.terminate()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
