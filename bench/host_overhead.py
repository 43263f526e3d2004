"""Host (Python) time of one F-SAM step on the Triton path, with the kernel launches stubbed
out: what the optimizer costs the CPU thread that feeds the GPU. Runs without a GPU.

    TRITON_INTERPRET=1 python bench/host_overhead.py

Three cases per parameter list: gradients that stay put between steps (zero_grad with
set_to_none=False), gradients at new addresses every step (set_to_none=True), which make
the gradient table re-upload, and rho and sigma changing every step (values are device data
rewritten in place: the ratio to the first case is what a schedule costs the host).
"""

import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton backend accept CPU tensors

import torch  # noqa: E402

from fsam_fused import FSAM  # noqa: E402
from fsam_fused.bench import NoOp, resnet18_cifar_shapes  # noqa: E402
from fsam_fused.kernels import fsam as K  # noqa: E402

K.MultiTensorFSAM.norm_partials = lambda self, *a, **k: None
K.MultiTensorFSAM.perturb = lambda self, *a, **k: None
K.MultiTensorFSAM.restore = lambda self: None


def measure(shapes, moving_grads, reps=200, changing_values=False):
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(2)]
    opt = FSAM(ps, NoOp, backend="triton")
    times = []
    for k in range(reps + 5):
        for p, g in zip(ps, grads[k % 2 if moving_grads else 0]):
            p.grad = g
        if changing_values:  # (outside the timed region, as a scheduler's step is)
            opt.param_groups[0]["rho"] = 0.05 + 1e-4 * (k % 7)
            opt.sigma = 0.5 + 1e-3 * (k % 5)
        t0 = time.perf_counter()
        opt.first_step()
        opt.second_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1e6


if __name__ == "__main__":
    for name, shapes in [
        ("resnet18 (62 tensors)", resnet18_cifar_shapes()),
        ("2000 tiny tensors", [(7,)] * 2000),
    ]:
        # Interleaved rounds (one process): medians of each case, and the schedule's ratio.
        cases = {
            "gradients stay": (False, False),
            "gradients move": (True, False),
            "rho, sigma change": (False, True),
        }
        got = {c: [] for c in cases}
        for _ in range(5):
            for c, (moving, changing) in cases.items():
                got[c].append(measure(shapes, moving, 100, changing))
        med = {c: statistics.median(v) for c, v in got.items()}
        for c, us in med.items():
            print(f"{name:<24} {c:<18}: {us:8.0f} us per step")
        ratio = med["rho, sigma change"] / med["gradients stay"]
        print(f"{name:<24} a value schedule costs {ratio:.3f}x the fixed-value host step")
