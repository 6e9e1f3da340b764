"""The examples run as a user runs them, and print the conclusion they promise."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--log-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_edge_of_stability_sharpens_to_the_threshold_and_hovers(tmp_path: Path) -> None:
    out = _run("edge_of_stability.py", tmp_path)
    found = re.search(
        r"started at ([\d.]+), reached the edge at step (\d+) and then stayed within "
        r"\[([\d.]+), ([\d.]+)\]",
        out,
    )
    assert found, out
    start, _, low, high = (float(g) for g in found.groups())
    assert start < 0.7
    assert 0.85 <= low <= high <= 1.2
    assert list(tmp_path.glob("edge_of_stability/version_0/events.out.tfevents.*"))


@pytest.mark.slow
def test_coherence_separates_real_from_shuffled_labels(tmp_path: Path) -> None:
    out = _run("coherence.py", tmp_path)
    found = re.search(
        r"mean coherence is ([\d.]+) with real labels and ([\d.]+) with shuffled labels: "
        r"([\d.]+)x \(per probe ([\d.]+)x to ([\d.]+)x\)",
        out,
    )
    assert found, out
    real, shuffled, ratio, lowest, _ = (float(g) for g in found.groups())
    assert ratio == pytest.approx(real / shuffled, rel=1e-2)
    assert ratio >= 3.0  # the bar, over the first 300 steps
    assert lowest >= 2.5  # and no probe comes close to equal
    assert shuffled < 1.5  # shuffled labels: nearly orthogonal gradients
    for run in ("real", "shuffled"):
        assert list(tmp_path.glob(f"coherence/{run}/events.out.tfevents.*"))


@pytest.mark.slow
def test_quickstart_logs_what_the_model_level_api_computes(tmp_path: Path) -> None:
    out = _run("quickstart.py", tmp_path)
    found = re.search(
        r"final sharpness is (\d+\.\d+) in TensorBoard and (\d+\.\d+) from hessian_eigenvalues.*"
        r"threshold \(2 \+ 2·0.9\)/lr is (\d+\.\d+)",
        out,
    )
    assert found, out
    logged, direct, threshold = (float(g) for g in found.groups())
    assert logged == pytest.approx(direct, rel=1e-3)
    assert threshold == pytest.approx(3.8 / 0.05)
    for tag in ("curvature/trace/net.0", "gradient/coherence", "curvature/density_max"):
        assert tag in out


@pytest.mark.slow
def test_adamw_edge_is_the_preconditioned_one_and_the_hint_runs(tmp_path: Path) -> None:
    out = _run("edge_of_stability.py", tmp_path, "--optimizer", "adamw", "--max-steps", "300")
    assert "stability threshold 38/lr = 9500" in out
    found = re.search(
        r"started at ([\d.]+), reached the edge at step (\d+) and then stayed within "
        r"\[([\d.]+), ([\d.]+)\]",
        out,
    )
    assert found, out
    start, _, low, high = (float(g) for g in found.groups())
    assert start < 0.5  # λ₁(P⁻¹H) / (38/lr) rises to the edge ...
    assert 0.8 <= low <= high <= 1.2  # ... and hovers there
    # The printed TensorBoard command runs as printed (no `tensorboard` on PATH needed).
    (hint,) = re.findall(r"TensorBoard logs in .*?: (.+)", out)
    version = subprocess.run(
        [*shlex.split(hint), "--version_tb"], capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0, version.stderr[-2000:]
    assert re.match(r"\d+\.\d+", version.stdout.strip())


@pytest.mark.slow
def test_cli_example_ends_with_its_conclusion(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "cli.py"), "fit", "--config",
         str(EXAMPLES / "curvature_config.yaml"), "--trainer.max_steps=60",
         f"--trainer.logger.init_args.save_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(
        r"CONCLUSION: the config built (.+); the sharpness ratio .* went from ([\d.]+) at step 0 "
        r"to ([\d.]+) at step 50 over 3 probes",
        done.stdout,
    )
    assert found, done.stdout
    assert found.group(1).split(", ") == [
        "HessianEigenvalueMonitor",
        "HessianTraceMonitor",
        "GradientCoherenceMonitor",
        "SpectralDensityMonitor",
    ]
    assert float(found.group(3)) > float(found.group(2))  # gradient descent sharpens


@pytest.mark.slow
def test_batch_sharpness_example_charts_the_three_curvatures_and_concludes(
    tmp_path: Path,
) -> None:
    out = _run(
        "batch_sharpness.py", tmp_path, "--lrs", "0.2", "--batch-sizes", "16", "64",
        "--max-steps", "200", "--every-n-steps", "100", "--num-batches", "4",
    )  # fmt: skip
    found = re.search(
        r"CONCLUSION: .* within 0\.8-1\.2 of 2/lr in (\d) of 2 runs \(median ratio ([\d.]+), "
        r".* the top-10 eigenspace held a median ([\d.]+) of the full-batch gradient's squared "
        r"norm and ([\d.]+) of the mini-batch gradient's\.",
        out,
    )
    assert found, out
    ratio, share, mini = (float(g) for g in found.groups()[1:])
    assert ratio > 0
    assert 0 <= share <= 1
    assert 0 <= mini <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    for run in ("lr0.2_batch16", "lr0.2_batch64"):
        (log_dir,) = tmp_path.glob(f"batch_sharpness/{run}")
        events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
        layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
        charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
        assert charts["sharpness λ₁ and batch sharpness vs. stability threshold 2/η"] == [
            "^curvature/eigenvalue_1$",
            "^curvature/stability_threshold$",
            "^curvature/batch_sharpness$",
        ]
        tags = set(events.Tags()["scalars"])
        assert {
            "curvature/batch_sharpness",
            "curvature/eigenvalue_1",
            "curvature/eigenvalue_10",
            "curvature/stability_threshold",
            "curvature/gradient_top_share",
            "curvature/training_gradient_top_share",
        } <= tags


@pytest.mark.slow
def test_fabric_litgpt_example_logs_what_the_model_level_api_computes(tmp_path: Path) -> None:
    out = _run("fabric_litgpt.py", tmp_path)
    found = re.search(
        r"CONCLUSION: over 60 AdamW steps of a 2-layer litgpt GPT \((\d+) parameters\) the loss "
        r"fell from ([\d.]+) to ([\d.]+); the top Hessian eigenvalue went from ([\d.]+) at step 0 "
        r"to ([\d.]+) at step 60 \(hessian_eigenvalues at the final weights: ([\d.]+)\), the "
        r"trace from ([\d.]+) ± ([\d.]+) to ([\d.]+) ± ([\d.]+); λ₁\(P⁻¹H\) peaked at ([\d.]+) "
        r"of Adam's stability threshold 38/lr \(step (\d+)\), far from the edge\. 6 probes took",
        out,
    )
    assert found, out
    params, first_loss, last_loss, top0, top, direct, trace0, _, trace, error = (
        float(g) for g in found.groups()[:10]
    )
    assert params > 20_000
    assert last_loss < first_loss - 1  # it learned the chain
    assert top == pytest.approx(direct, rel=1e-3)  # logged through Fabric = computed directly
    assert top > top0 > 0
    assert trace > trace0 + 3 * error > 0  # curvature grows as the model learns
    assert 0 < float(found.group(11)) < 1
    (log_dir,) = tmp_path.glob("fabric_litgpt/version_0")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("curvature/eigenvalue_1")] == [0, 20, 40, 60]
    assert {"curvature/preconditioned_eigenvalue_1", "curvature/trace", "loss"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Tensors("custom_scalars__config__")  # the layout a Trainer run writes
    assert (log_dir / "final.ckpt").exists()


def test_landscape_example_slices_along_v1_and_tracks_critical_sharpness(tmp_path: Path) -> None:
    out = _run("landscape.py", tmp_path)
    found = re.search(
        r"secant curvature at one step length ([\d.]+) to ([\d.]+) of lambda_1\)\. Before the "
        r"edge .* unresolved in (\d+) of (\d+) probes\); from the edge on .* from step (\d+), "
        r"(\d+) probes\) the step along v1 raised the loss in (\d+) probes and lowered it in "
        r"(\d+) \(unresolved in (\d+)\), with the sign the quadratic model predicted in (\d+) "
        r"of (\d+) .* Critical sharpness: median ([\d.]+) before the edge, ([\d.]+) after it "
        r"\(([\d.]+) of 2/lr; lambda_1 ([\d.]+)\)",
        out,
    )
    assert found, out
    low, high = float(found.group(1)), float(found.group(2))
    assert 0.98 <= low <= high <= 1.02  # the loss along v1 is quadratic at the step's scale
    unresolved, before = int(found.group(3)), int(found.group(4))
    assert unresolved >= before - 1  # before the edge the step barely moves along v1
    after, rose, fell, silent = (int(found.group(i)) for i in (6, 7, 8, 9))
    assert rose + fell + silent == after
    assert rose > fell  # past the edge the step overshoots along v1
    assert int(found.group(10)) == int(found.group(11)) == rose + fell  # as the model says
    early, late = float(found.group(12)), float(found.group(13))
    assert early < 0.1 * late
    assert 0.8 <= float(found.group(14)) <= 1.2  # critical sharpness at 2/lr past the edge
    assert 0.9 <= float(found.group(15)) <= 1.2
    pictures = sorted(tmp_path.glob("landscape/version_0/slices_*_edge_step*.png"))
    assert [p.name.split("_")[1] for p in pictures] == ["after", "before"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)


@pytest.mark.slow
def test_digits_cnn_at_the_defaults_keeps_to_the_budget_and_says_why_charts_are_sparse(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "digits_cnn.py"), "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(
        r"CONCLUSION: (\d+) probes took [\d.]+ s, ([\d.]+)% of the fit's [\d.]+ s; points per "
        r"chart: sharpness ratio (\d+)",
        done.stdout,
    )
    assert found, done.stdout
    assert float(found.group(2)) <= 5.0  # every probe counted, the first ones too
    # too short a run for readable charts at 5%: each monitor says so, with what would do
    said = re.findall(r"(\w+Monitor): this run of 506 steps is too short", done.stderr)
    assert len(said) == len(set(said)) >= 4
    assert "smaller than the logging interval" not in done.stderr
    assert "Curvature monitors, from the start of training to the end of fit:" in done.stderr
    assert list(tmp_path.glob("digits_cnn/version_0/events.out.tfevents.*"))
