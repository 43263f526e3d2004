"""Host (Python) time of one F-SAM step on the Triton path, with the kernel launches stubbed
out: what the optimizer costs the CPU thread that feeds the GPU. Runs without a GPU.

    TRITON_INTERPRET=1 python bench/host_overhead.py

Two cases per parameter list: gradients that stay put between steps (zero_grad with
set_to_none=False), and gradients at new addresses every step (set_to_none=True), which
make the gradient table re-upload.
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


def measure(shapes, moving_grads, reps=200):
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(2)]
    opt = FSAM(ps, NoOp, backend="triton")
    times = []
    for k in range(reps + 5):
        for p, g in zip(ps, grads[k % 2 if moving_grads else 0]):
            p.grad = g
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
        for moving in (False, True):
            us = measure(shapes, moving)
            print(f"{name:<24} gradients {'move' if moving else 'stay'}: {us:8.0f} us per step")
