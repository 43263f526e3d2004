"""F-SAM benchmarks: ``python -m fsam_fused.bench`` (also installed as ``fsam-bench``).

Times the optimizer-only F-SAM step (``first_step`` + ``second_step`` with a base optimizer
that does nothing: exactly the work F-SAM adds to a training step) for every FSAM backend that
runs on the device present (CUDA if any, else the CPU) and for the peers a user would run
instead: pytorch_optimizer's ``FriendlySAM`` (foreach and loop paths) and, on CUDA, the
foreach step under ``torch.compile``. All candidates take turns on one parameter list,
round after round, beside a plain copy whose bandwidth is the yardstick.

Printed per candidate: median ms, GB/s against the bytes its design must move
(:func:`fsam_fused.traffic.bytes_per_step`), that as a share of the copy bandwidth, and the speed-up over the
reference backend and over each peer. Timings from different runs are not comparable on a
shared CPU: compare within one run.

``--quick`` (the default) runs the ResNet-18 list in float32 and bfloat16 and 2,000 tiny
tensors (plus GPT-2 on CUDA), about a minute on a 2-core CPU; ``--full`` runs every preset
and the end-to-end ResNet-18 training step (``--e2e`` runs that alone).

Example (a short run on the CPU, without the peers):

    >>> from fsam_fused.bench import main
    >>> main(["--device", "cpu", "--presets", "tiny2000", "--dtypes", "float32",
    ...       "--backends", "reference,foreach", "--reps", "2"])  # doctest: +ELLIPSIS
    fsam_fused.bench on cpu ...
    0
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .candidates import NoOp, candidates
from .presets import FULL, PRESETS, QUICK, resnet18_cifar_shapes

__all__ = ["main", "NoOp", "candidates", "PRESETS", "resnet18_cifar_shapes"]


def _log(msg="", end="\n"):
    print(msg, end=end, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fsam_fused.bench", description=__doc__.split("\n\n")[0]
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="the default: ResNet-18 and 2,000 tiny tensors in float32 and bfloat16 on the CPU "
        "(ResNet-18, GPT-2 and 2,000 tiny tensors on CUDA); measured: 65 s on a 2-core CPU, "
        "plus about 30 s the first time to compile the C++ backend",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="every preset (" + ", ".join(FULL) + ") and the end-to-end step",
    )
    mode.add_argument(
        "--e2e", action="store_true", help="only the end-to-end ResNet-18 training step"
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--presets", default=None, help="comma-separated, from: " + ", ".join(PRESETS))
    ap.add_argument("--dtypes", default=None, help="default: float32,bfloat16")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated candidate names (default: all that run here)",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per group")
    ap.add_argument("--batch", type=int, default=128, help="end-to-end batch size")
    ap.add_argument("--json", metavar="PATH", help="write one record per measurement")
    ap.add_argument("--plot", metavar="PATH", help="draw the comparison as a PNG (matplotlib)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.presets:
        presets = args.presets.split(",")
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            ap.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    else:
        presets = FULL if args.full else QUICK[device.type if cuda else "cpu"]
    dtypes = []
    for d in (args.dtypes or "float32,bfloat16").split(","):
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"unknown dtype {d!r}; choose from float32, bfloat16, float16")
        dtypes.append(getattr(torch, d))
    names = set(args.backends.split(",")) if args.backends else None
    if names:
        known = {c.name for c in candidates(device)}
        if names - known:
            ap.error(
                f"unknown backend(s) {sorted(names - known)} on {device.type}; "
                f"choose from {', '.join(sorted(known))}"
            )
    reps = args.reps or (50 if cuda else 15)

    from . import e2e, report, suite

    meta = suite.versions()
    _log(
        f"fsam_fused.bench on {device.type} ({suite.device_name(device)}), torch "
        f"{meta['torch']}, triton {meta['triton']}: optimizer-only step (first_step + "
        f"second_step, base optimizer doing nothing), median of {reps} interleaved rounds"
    )
    records = []

    def save():  # after every group, so a run cut short still leaves what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)

    if not args.e2e:
        big = {"vit_b16", "gpt2", "single64m", "large"}
        for preset in presets:
            # The big lists take seconds a round on a CPU: fewer rounds there.
            r = reps if cuda or preset not in big else max(3, reps // 3)
            records += suite.run(
                device, [preset], dtypes, names, reps=r, warmup=5 if cuda else 1, log=_log
            )
            save()
        _log()
        _log(report.terminal_table(records))
    if args.full or args.e2e:
        _log()
        e2e_records = e2e.run(device, batch=args.batch, log=_log)
        _log(report.markdown_e2e(e2e_records))
        records += e2e_records
        save()
    if args.json:
        _log(f"\nwrote {len(records)} records to {args.json}")
    if args.plot and any(r.get("kind", "optimizer") == "optimizer" for r in records):
        report.plot(records, args.plot)
        _log(f"wrote the plot to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
