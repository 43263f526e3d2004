"""The examples still run: smoke runs of examples/label_noise.py and examples/schedules.py
write their three results."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_label_noise_quick(tmp_path):
    # A subprocess, as a user runs it; the timeout is generous for a shared 2-core machine
    # (measured: about 6 s) and for a first build of the C++ backend, but still catches a hang.
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "label_noise.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    for name in ("label_noise.json", "label_noise.md", "label_noise.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "label_noise.json").read_text())
    assert {r["optimizer"] for r in results["runs"]} == {"SGD", "SAM", "F-SAM"}
    assert (tmp_path / "label_noise.png").read_bytes()[:4] == b"\x89PNG"


def test_schedules_quick(tmp_path):
    # examples/schedules.py --quick: every method once on two tiny settings (measured: about
    # 5 s once the C++ backend is built; the timeout leaves room for that first build).
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "schedules.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    for name in ("schedules.json", "schedules.md", "schedules.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "schedules.json").read_text())
    runs = results["runs"]
    assert {r["method"] for r in runs} == {
        "SGD",
        "SAM",
        "F-SAM",
        "F-SAM every 2",
        "F-SAM every 4",
        "F-SAM Bernoulli 0.5",
        "F-SAM adaptive",
        "F-SAM adaptive lagged",
    }
    frac = {(r["setting"], r["method"]): r["perturbed_fraction"] for r in runs}
    # What the schedules promise, on the example's own counts: full F-SAM and SAM perturb
    # every step, SGD none, every-k exactly ceil(steps / k) of them.
    steps = {r["setting"]: r["steps"] for r in runs}
    for setting, n in steps.items():
        assert frac[(setting, "F-SAM")] == frac[(setting, "SAM")] == 1.0
        assert frac[(setting, "SGD")] == 0.0
        for k in (2, 4):
            assert frac[(setting, f"F-SAM every {k}")] == -(-n // k) / n
    assert {s["lambda1"] for s in results["adaptive_scores"]} >= {-1.0, 0.0}
    # The interleaved step timing covers every setting and method, relative to full F-SAM.
    assert set(results["step_timing"]) == set(steps)
    for timing in results["step_timing"].values():
        assert set(timing) == {r["method"] for r in runs}
        assert timing["F-SAM"]["step_vs_fsam"] == 1.0
    assert (tmp_path / "schedules.png").read_bytes()[:4] == b"\x89PNG"
