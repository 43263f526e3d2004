"""The C++ step's cost per tensor (issue 16): the slope of the optimizer-only step time from
1,000 to 10,000 tensors of 64 float32 elements, where a step is all overhead (the memory it
moves is 18 KB per thousand tensors). The gradients are set once, so the loop that sets
``.grad`` is not counted; the base optimizer does nothing (``NoOp``), so only F-SAM's own
work is. The two lists are stepped alternately in one process, and each figure is the
median of ``--rounds`` rounds, over ``--repeats`` repeats (median [min-max] printed).

    python bench/per_tensor.py [--threads 2] [--rounds 15] [--repeats 3]

Per pass (norm, perturb, restore) the same slope is printed: what is left over is the
Python front-end's per-step work.
"""

import argparse
import statistics
import time

import torch

from fsam_fused import FSAM
from fsam_fused.bench import NoOp


def _optimizer(n, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(64, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(64, generator=g)
    opt = FSAM(ps, NoOp, backend="cpp")
    for _ in range(3):  # past the first-sight step and the plan's rebuild after it
        opt.first_step()
        opt.second_step()
    return opt


def _cases(opt):
    passes, held = opt.engine.passes(), {}

    def step():
        opt.first_step()
        opt.second_step()

    def norm():
        held["sq"] = passes.norm()

    norm()
    return {
        "step": step,
        "  norm pass": norm,
        "  perturb pass": lambda: passes.perturb(held["sq"]),
        "  restore pass": passes.restore,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = (1000, 10000)
    cases = {n: _cases(_optimizer(n, n)) for n in sizes}
    names = list(cases[sizes[0]])
    slopes = {k: [] for k in names}
    for _ in range(a.repeats):
        times = {(n, k): [] for n in sizes for k in names}
        for _ in range(a.rounds):
            for k in names:
                for n in sizes:
                    t = time.perf_counter()
                    cases[n][k]()
                    times[n, k].append(time.perf_counter() - t)
        med = {key: statistics.median(v) for key, v in times.items()}
        for k in names:
            slopes[k].append((med[10000, k] - med[1000, k]) / 9000 * 1e6)
        last = med
    print(f"{torch.get_num_threads()} threads; tensors of 64 float32 elements; µs per tensor")
    for k in names:
        s = slopes[k]
        print(
            f"{k:16s} 1,000: {last[1000, k] * 1e3:7.3f} ms  10,000: {last[10000, k] * 1e3:7.3f} ms"
            f"  slope {statistics.median(s):.2f} [{min(s):.2f}-{max(s):.2f}] µs per tensor"
        )


if __name__ == "__main__":
    main()
