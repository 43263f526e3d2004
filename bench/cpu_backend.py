"""The C++ backend's goal check, as a benchmark (not a timed test):

    python bench/cpu_backend.py [--reps 30] [--json PATH]

On the CIFAR ResNet-18 parameter list (62 tensors, 11.2 M float32 parameters) FSAM's
``"cpp"`` backend, double-buffered (what ``backend="auto"`` runs on the CPU) and with
``fixed_addresses=True`` (the exact copy), ``"foreach"`` and ``"reference"`` take turns,
round after round in one process, with pytorch_optimizer's ``FriendlySAM`` (foreach path and
per-parameter loop) and a plain copy of the same number of elements. Prints the table and
the two goal figures: the speed-up of ``auto`` over the best pytorch_optimizer path (goal:
at least 3x) and its bandwidth against the bytes its design must move as a share of the copy
bandwidth (goal: at least 60%).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsam_fused.bench import report, suite  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    records = suite.run(
        torch.device("cpu"),
        ["resnet18"],
        [torch.float32],
        reps=args.reps,
        names={"reference", "foreach", "cpp", "cpp-fixed", "po-foreach", "po-loop"},
        log=lambda msg="", end="\n": print(msg, end=end, flush=True),
    )
    print()
    print(report.terminal_table(records))
    rows = {r["backend"]: r for r in records}
    peers = [rows[p] for p in ("po-foreach", "po-loop") if p in rows]
    if not peers:
        print("\npytorch-optimizer is not installed: pip install 'fsam-fused[bench]'")
        return 1
    best = min(peers, key=lambda r: r["ms"])
    auto = rows["cpp"]
    speedup = best["ms"] / auto["ms"]
    print(
        f"\nauto (cpp, double-buffered): {auto['ms']:.2f} ms; best pytorch_optimizer path "
        f"({best['backend']}): {best['ms']:.2f} ms -> {speedup:.2f}x (goal >= 3x)"
    )
    print(
        f"auto: {auto['gbps']:.1f} GB/s of counted traffic = {auto['pct_copy']:.0f}% of the "
        f"{auto['copy_gbps']:.1f} GB/s copy measured beside it (goal >= 60%)"
    )
    fixed = rows["cpp-fixed"]
    print(
        f"exact copy (fixed_addresses=True): {fixed['ms']:.2f} ms, "
        f"{best['ms'] / fixed['ms']:.2f}x the best peer; the double buffer is "
        f"{fixed['ms'] / auto['ms']:.2f}x faster"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
