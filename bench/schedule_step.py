"""What a schedule's cheap step costs against a perturbing step: the optimizer's own work
(``first_step`` + ``second_step``, gradients fixed, no forward/backward), on the ResNet-18
(CIFAR) parameter list, both kinds interleaved in one process (medians of rounds).

    python bench/schedule_step.py [--rounds 15] [--backend auto] [--device cpu]

Prints each kind's median time, its bytes per parameter (``plan_summary``) and the ratio.
The whole step's saving is the second forward/backward, which dwarfs both:
``examples/README-schedules.md`` measures that on real training.
"""

import argparse
import statistics
import time

import torch

from fsam_fused import FSAM, EveryK
from fsam_fused.bench import resnet18_cifar_shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g).to(a.device))
        for s in resnet18_cifar_shapes()
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(a.device) * 1e-2
    opt = FSAM(params, torch.optim.SGD, lr=1e-4, backend=a.backend, schedule=EveryK(2))
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    times = {True: [], False: []}
    for r in range(a.rounds + 2):  # alternate: EveryK(2) perturbs, then not, then ...
        for _ in range(2):
            sync()
            t = time.perf_counter()
            took = opt.first_step()
            opt.second_step()
            sync()
            if r >= 2:  # warm-up rounds dropped
                times[took].append(time.perf_counter() - t)
    s = opt.plan_summary()
    n = sum(b.numel for b in s)
    full, cheap = statistics.median(times[True]), statistics.median(times[False])
    print(f"{len(params)} tensors, {n:,} parameters, backend {s[0].backend}, {a.device}")
    for name, t, b in (
        ("perturbing step", full, sum(x.bytes_per_step for x in s)),
        ("cheap step", cheap, sum(x.cheap_bytes_per_step for x in s)),
    ):
        print(f"{name:16s} {t * 1e3:8.3f} ms  {b / n:5.1f} B/param  {b / t / 1e9:6.1f} GB/s")
    print(f"cheap / perturbing: {cheap / full:.3f}")


if __name__ == "__main__":
    main()
