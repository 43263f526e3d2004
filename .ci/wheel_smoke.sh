#!/usr/bin/env bash
# Release smoke test: build the sdist and the wheel, install the wheel (not the source tree,
# not editable) with torch in a fresh virtual environment, and take one F-SAM step there with
# the C++ backend compiled from the sources the wheel installed.
#
#   .ci/wheel_smoke.sh            # about 1-3 minutes on a 2-core CPU, no GPU needed
#   KEEP=1 .ci/wheel_smoke.sh     # keep the temp dir (dist/, venvs, build cache) for a look
#   PYTHON=python3.12 .ci/wheel_smoke.sh
#
# How it builds: `python -m build` in a throw-away tool venv (`pip install build`, from PyPI).
# It makes the sdist and then the wheel *from that sdist*, so the wheel also proves the sdist
# is complete enough to build. `pip wheel .` alone would give no sdist, and setuptools has no
# sdist command of its own that a fresh venv can run (its setuptools is too old for PEP 639).
# The tree is first copied as git sees it (tracked and untracked-but-not-ignored files) into
# the temp dir: the build never writes into the checkout, and a stale fsam_fused.egg-info or
# build/ left there by `pip install -e .` cannot add files to the sdist (setuptools, without
# a VCS plugin, re-reads an old egg-info SOURCES.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fsam-wheel-smoke.XXXXXX")
passed=0
failed=0
summary_done=0
SECONDS=0

finish() {
    local rc=$?
    if [ "$summary_done" = 0 ]; then
        # A set-up step (copy, build, venv, install) failed before the checks could finish.
        failed=$((failed + 1))
        echo "wheel smoke: $passed passed, $failed failed (set-up step failed, exit $rc; ${SECONDS}s)"
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap finish EXIT

check() {  # check NAME COMMAND...: run one check, count it, keep going on failure
    local name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "PASS $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
    fi
}

echo "== copy of the tree as git sees it -> $WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"  # [ -e ]: skip deleted tracked files

echo "== build: sdist, then the wheel from the sdist"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q build
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "built $(basename "$SDIST") $(basename "$WHEEL") (${SECONDS}s)"

sdist_has_files() {
    local listing missing=0 f
    listing=$(tar -tzf "$SDIST")
    # The sdist's top folder is <name>-<version>/; the paths below are relative to it.
    for f in csrc/fsam_cpu.cpp kernels/__init__.py kernels/fsam.py LICENSE README.md \
             pyproject.toml fsam_fused/optimizer.py; do
        if ! grep -qE "^[^/]+/$f\$" <<< "$listing"; then
            echo "  sdist lacks $f"
            missing=1
        fi
    done
    return $missing
}
check "sdist contains csrc/fsam_cpu.cpp, kernels, LICENSE, README.md" sdist_has_files

echo "== fresh venv: $TORCH_SPEC and the built wheel"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$TORCH_SPEC" "$WHEEL"
echo "installed (${SECONDS}s)"

# Run from an empty directory, with no PYTHONPATH, so the checkout cannot be imported.
mkdir -p "$WORK/run"
smoke_step() {
    (cd "$WORK/run" && env -u PYTHONPATH FSAM_FUSED_BUILD_DIR="$WORK/cpp-build" \
        VENV="$WORK/venv" "$WORK/venv/bin/python" - <<'EOF'
import os
import sys
from importlib import metadata

import torch

import fsam_fused
from fsam_fused import FSAM
from fsam_fused.ops import cpp_build

venv = os.path.realpath(os.environ["VENV"])
inside = lambda path: os.path.realpath(path).startswith(venv + os.sep)
assert inside(fsam_fused.__file__), f"fsam_fused imported from {fsam_fused.__file__}, not {venv}"
src = cpp_build._sources()[0]
assert inside(src), f"C++ source {src} is not the installed one"
build_dir = cpp_build.build_directory()
assert build_dir.startswith(os.environ["FSAM_FUSED_BUILD_DIR"]), build_dir
meta = metadata.metadata("fsam-fused")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
assert any(str(f).endswith("LICENSE") for f in metadata.files("fsam-fused")), "no LICENSE"

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, lr=0.05,
           momentum=0.9, weight_decay=1e-3, backend="cpp")
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
loss_fn = torch.nn.CrossEntropyLoss()
before = [p.detach().clone() for p in model.parameters()]
loss_fn(model(x), y).backward()
opt.first_step(zero_grad=True)
perturbed = [p.detach().clone() for p in model.parameters()]
loss_fn(model(x), y).backward()
opt.second_step(zero_grad=True)
params = list(model.parameters())
assert all(not torch.equal(a, b) for a, b in zip(before, perturbed)), "first_step left w"
assert all(not torch.equal(a, p) for a, p in zip(before, params)), "the step left w unchanged"
assert all(torch.isfinite(p).all() for p in params)
assert all("ema" in opt.state[p] for p in params), "no EMA in opt.state"
assert [b.backend for b in opt.plan_summary()] == ["cpp"], "the C++ backend did not run"
assert os.path.isdir(build_dir) and any(f.endswith(".so") for f in os.listdir(build_dir)), \
    f"no compiled extension in {build_dir}"
print(f"  fsam_fused {fsam_fused.__version__} from {os.path.dirname(fsam_fused.__file__)}")
print(f"  torch {torch.__version__}, C++ extension built in {build_dir}")
EOF
    )
}
check "installed wheel: F-SAM step on CPU with backend=\"cpp\"" smoke_step

summary_done=1
echo "wheel smoke: $passed passed, $failed failed (${SECONDS}s)"
[ "$failed" = 0 ]
