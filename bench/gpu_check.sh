#!/usr/bin/env bash
# The one script a lent GPU runs, well under ten minutes: the CUDA tests (every backend on
# CUDA tensors, the compiled Triton kernels against the reference), the benchmark's quick
# suite on CUDA (ResNet-18, GPT-2 and 2,000 tiny tensors in float32 and bfloat16, with the
# peers present: pytorch_optimizer if installed, the foreach step under torch.compile) with
# its JSON and plot, then the end-to-end ResNet-18 training step. Everything lands in $OUT.
#
#   run from the repository root (the GPU machine has no network, so nothing is installed;
#   the script lays the package out itself):  OUT=/some/dir bash bench/gpu_check.sh
#   The pytorch_optimizer peer needs its package there: beforehand, on a machine with network,
#   `pip install --no-deps --target .gpu_deps pytorch-optimizer` and carry `.gpu_deps`.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
# The package as pip lays it out (kernels/ and csrc/ inside fsam_fused/, as pyproject's
# package-dir maps them), from this tree, without installing anything: the machine has no
# network. Symlinks, so the tests' own paths (tests/, bench/) still read this tree.
PKG=$(mktemp -d)
mkdir -p "$PKG/fsam_fused"
for f in fsam_fused/*; do ln -s "$PWD/$f" "$PKG/fsam_fused/"; done
ln -s "$PWD/kernels" "$PKG/fsam_fused/kernels"
ln -s "$PWD/csrc" "$PKG/fsam_fused/csrc"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu_deps ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
# (tests/test_amp.py and test_training_loops.py add the CUDA variants of the GradScaler
# recipe, inf/NaN in either pass, no host synchronisation under set_sync_debug_mode("error"),
# two forwards in one autocast block, accumulation and BatchNorm; tests/test_capture.py the
# CUDA-graph capture of a whole step: replay against eager in fp32 and bf16, fp16 with a
# GradScaler skipping an inf step, and torch.compile(mode="reduce-overhead") with no CUDA graph
# skipped.) Budgets: the four steps stay under 10 minutes together (590 s), a worst case;
# each normally ends well before its limit.
timeout 230 python3 -m pytest tests -q -m "cuda or codegen" -p no:cacheprovider \
  --ignore=tests/test_distributed.py --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" \
  || status=1
# NCCL on the one GPU (a single-rank process group still runs the cross-rank path).
timeout 90 python3 -m pytest tests/test_distributed.py -q -m cuda -p no:cacheprovider \
  --junitxml="$OUT/tests-dist.xml" 2>&1 | tee "$OUT/tests-dist.log" || status=1
timeout 210 python3 -m fsam_fused.bench --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  2>&1 | tee "$OUT/bench.log" || status=1
timeout 60 python3 -m fsam_fused.bench --e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" \
  || status=1
exit $status
