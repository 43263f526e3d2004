"""Where F-SAM's optimizer step spends its time against one fused AdamW step (issue 16):
each pass alone on a list too large for any cache, with the machine's read-only and copy
bandwidth measured the same way, interleaved in one process (medians of rounds).

    python bench/adamw_passes.py [--params 100e6] [--tensors 8] [--rounds 7]

Prints per pass its time, the bytes it must read and write per parameter and the GB/s it
reaches, then the floor a step's reads set: on a machine where reading is what binds, a
step cannot be faster than (bytes read) / (read bandwidth). F-SAM reads 20 B per float32
parameter (norm: g, m; perturb: g, m, w), AdamW 16 (p, g, m, v).
"""

import argparse
import statistics
import time

import torch

from fsam_fused import FSAM
from fsam_fused.bench import NoOp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    n = int(a.params) // a.tensors
    total = n * a.tensors
    g = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for _ in range(a.tensors)]
        for p in ps:
            p.grad = torch.randn(n, generator=g) * 1e-3
        return ps

    ps, qs = params(), params()
    opt = FSAM(ps, NoOp, backend="cpp")  # the default double buffer: 28 B/param a step
    adam = torch.optim.AdamW(qs, lr=1e-6, fused=True)
    for _ in range(2):
        opt.first_step()
        opt.second_step()
        adam.step()
    passes = opt.engine.passes()
    xs, ys = [p.grad for p in qs], [p.detach() for p in qs]

    def fsam_step():
        opt.first_step()
        opt.second_step()

    state = {}

    def norm():
        state["sq"] = passes.norm()

    def perturb_restore():
        passes.perturb(state["sq"])
        passes.restore()

    cases = {
        # name: (callable, bytes read, bytes written, per parameter)
        "F-SAM step": (fsam_step, 20, 8),
        "  norm pass": (norm, 8, 0),
        "  perturb + restore": (perturb_restore, 12, 8),
        "AdamW(fused) step": (adam.step, 16, 12),
        "read 2 streams (dot)": (lambda: [torch.dot(x, y) for x, y in zip(xs, ys)], 8, 0),
        "copy (read 1, write 1)": (lambda: torch._foreach_copy_(ys, xs), 4, 4),
    }
    norm()
    times = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, (f, _, _) in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.tensors} tensors, {total:,} float32 parameters, {torch.get_num_threads()} threads")
    for k, (_, r, w) in cases.items():
        gbs = (r + w) * total / med[k] / 1e9
        print(f"{k:24s} {med[k] * 1e3:8.2f} ms  reads {r:2d} B  writes {w:2d} B  {gbs:6.1f} GB/s")
    read_bw = 8 * total / med["read 2 streams (dot)"]
    print(
        f"F-SAM / AdamW: {med['F-SAM step'] / med['AdamW(fused) step']:.3f}; "
        f"read-bandwidth floors at {read_bw / 1e9:.1f} GB/s of reads: F-SAM "
        f"{20 * total / read_bw * 1e3:.1f} ms, AdamW {16 * total / read_bw * 1e3:.1f} ms "
        f"(ratio of the floors 1.25)"
    )


if __name__ == "__main__":
    main()
