"""The examples still run: a smoke run of examples/label_noise.py writes its three results."""

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
