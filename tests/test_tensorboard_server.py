"""A real TensorBoard server, on loopback, serves what the monitors wrote.

Runs the edge-of-stability example briefly, starts ``tensorboard`` on 127.0.0.1 over its log
directory and reads the data API the dashboard itself uses: scalar tags, the custom-scalars
layout (sharpness next to its threshold), the density histogram and image.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import URLError

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_scalars_layout_histogram_and_image(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(EXAMPLES / "edge_of_stability.py"), "--max-steps", "60",
         "--every-n-steps", "20", "--log-dir", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
         "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                scalar_tags = _get(f"{base}/scalars/tags")
                if scalar_tags:
                    break
            except (URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "TensorBoard did not come up"
            time.sleep(1)
        (run,) = scalar_tags  # one run: edge_of_stability/version_0
        tags = set(scalar_tags[run])
        assert {"curvature/eigenvalue_1", "curvature/stability_threshold",
                "curvature/sharpness_ratio", "curvature/trace", "curvature/trace_std_error",
                "probe_cost/eigenvalue_hvps", "probe_cost/eigenvalue_seconds",
                "train/loss"} <= tags  # fmt: skip
        threshold = _get(f"{base}/scalars/scalars?run={run}&tag=curvature/stability_threshold")
        assert [point[1] for point in threshold] == [0, 20, 40]
        assert threshold[0][2] == pytest.approx(2 / 0.2)

        layout = _get(f"{base}/custom_scalars/layout")
        charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
        assert charts["sharpness λ₁ vs. stability threshold 2/η"]["multiline"]["tag"] == [
            "^curvature/eigenvalue_1$",
            "^curvature/stability_threshold$",
        ]
        (band,) = charts["Hessian trace ± 2 standard errors"]["margin"]["series"]
        assert band == {
            "value": "curvature/trace",
            "lower": "curvature/trace_lower",
            "upper": "curvature/trace_upper",
        }
        assert {c["title"] for c in layout["category"][-1]["chart"]} == {
            "seconds per probe",
            "Hessian-vector products per probe",
            "gradient samples m, examples per sample b",
        }  # the bookkeeping, last
        assert "curvature/spectral_density" in _get(f"{base}/histograms/tags")[run]
        assert "curvature/spectral_density_image" in _get(f"{base}/images/tags")[run]
    finally:
        server.terminate()
        server.wait(timeout=30)
