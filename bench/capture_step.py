"""CUDA only: the F-SAM optimizer step (``first_step`` + ``second_step``, gradients produced
outside, fused AdamW base) eager against replayed from a CUDA graph (``capturable=True``):
device time (CUDA events around the step) and host time (the Python call alone) per step,
in interleaved rounds in one process, medians.

    python bench/capture_step.py [--preset resnet18|tiny2000] [--dtype float32|bfloat16]

Not yet run: written without a GPU (docs/compile.md says so).
"""

import argparse
import statistics
import time

import torch

from fsam_fused import FSAM
from fsam_fused.bench import resnet18_cifar_shapes


def _optimizer(shapes, dtype, capturable):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    rho = torch.tensor(0.05, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    opt = FSAM(ps, torch.optim.AdamW, rho=rho, lr=lr, fused=True, capturable=capturable)

    def step():
        opt.first_step()
        opt.second_step()

    return step


def _captured(shapes, dtype):
    step = _optimizer(shapes, dtype, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


def _time(fn, reps):
    host, device = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(host), statistics.median(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("resnet18", "tiny2000"), default="resnet18")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/capture_step.py needs a CUDA device")
    shapes = resnet18_cifar_shapes() if a.preset == "resnet18" else [(7,)] * 2000
    dtype = getattr(torch, a.dtype)
    cands = {"eager": _optimizer(shapes, dtype, False), "captured": _captured(shapes, dtype)}
    for fn in cands.values():
        for _ in range(3):
            fn()
    got = {n: ([], []) for n in cands}
    for _ in range(a.rounds):
        for n, fn in cands.items():
            h, d = _time(fn, a.reps)
            got[n][0].append(h)
            got[n][1].append(d)
    print(f"{a.preset} ({len(shapes)} tensors, {a.dtype}) on {torch.cuda.get_device_name()}")
    for n, (h, d) in got.items():
        print(
            f"{n:<9} host {statistics.median(h) * 1e6:8.1f} us   "
            f"step {statistics.median(d) * 1e6:8.1f} us (CUDA events)"
        )


if __name__ == "__main__":
    main()
