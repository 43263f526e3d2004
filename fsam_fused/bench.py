"""Optimizer-only F-SAM benchmark: ``python -m fsam_fused.bench`` (also ``fsam-bench``).

Times ``first_step() + second_step()`` with a base optimizer that does nothing, so the figure
is exactly the work F-SAM adds to a training step, for every backend that can run on the
device present (CUDA if any, else CPU). Reports the median milliseconds, the bandwidth against
the bytes the step must move (``fsam_fused.kernels.fsam.bytes_per_step``), that bandwidth as a
share of a plain copy measured in the same run, and the speed-up over the reference backend.

Timings from different runs are not comparable on a shared CPU: compare the ratios within
one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from .optimizer import FSAM


def resnet18_cifar_shapes():
    """The 62 parameter tensors (11.2 M) of the CIFAR ResNet-18 of the F-SAM recipes."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    c_in = 64
    for c in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(c, c_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            if block == 0 and c != c_in:
                shapes += [(c, c_in, 1, 1), (c,), (c,)]
            c_in = c
    return shapes + [(10, 512), (10,)]


def large_shapes():
    """48 tensors of 4096 x 1536: 302 M parameters, a mid-size language model's worth."""
    return [(4096, 1536)] * 48


PRESETS = {"resnet18": resnet18_cifar_shapes, "large": large_shapes}


class _NoOp(torch.optim.Optimizer):
    """Base optimizer that does nothing: the benchmark times F-SAM's own work."""

    def __init__(self, params, **_):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device, nbytes, reps, warmup):
    """Bandwidth of a plain device copy, counting the bytes read and written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps, warmup)
    return 2 * n * 4 / ms / 1e6


def _setup(shapes, dtype, device, backend, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    opt = FSAM(params, _NoOp, rho=0.05, sigma=1.0, lmbda=0.9, backend=backend)
    return params, opt


def measure(preset, dtype, device, backend, reps, warmup):
    from .kernels.fsam import bytes_per_step

    shapes = PRESETS[preset]()
    params, opt = _setup(shapes, dtype, device, backend)

    def step():
        opt.first_step()
        opt.second_step()

    ms = _median_ms(step, device, reps, warmup)
    numel = sum(p.numel() for p in params)
    nbytes = bytes_per_step(numel, params[0].element_size(), 4, has_ema=True, adaptive=False)
    return {"backend": backend, "preset": preset, "dtype": str(dtype).replace("torch.", ""),
            "device": device.type, "ms": ms, "gbps": nbytes / ms / 1e6, "bytes": nbytes,
            "tensors": len(params), "params": numel}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsam_fused.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--presets", default=None,
                    help="comma-separated, from: " + ", ".join(PRESETS)
                    + " (default: resnet18, plus large on CUDA)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backends", default=None, help="default: every backend the device runs")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", metavar="PATH", help="write one record per measurement")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    presets = args.presets.split(",") if args.presets else (["resnet18", "large"] if cuda
                                                            else ["resnet18"])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    backends = args.backends.split(",") if args.backends else (
        ["reference", "foreach", "triton"] if cuda else ["reference", "foreach"])
    reps = args.reps or (50 if cuda else 15)
    warmup = 5 if cuda else 2

    meta = {"device_name": device_name(device), **versions()}
    print(f"fsam_fused.bench on {device.type} ({meta['device_name']}), torch {meta['torch']}, "
          f"triton {meta['triton']}; optimizer-only step (first_step + second_step), "
          f"median of {reps}", flush=True)
    copy = copy_gbps(device, 1 << 28 if cuda else 1 << 26, reps, warmup)
    print(f"copy bandwidth (read + write): {copy:.1f} GB/s", flush=True)

    records = []
    for preset in presets:
        for dtype in dtypes:
            group = []
            for backend in backends:
                print(f"  {preset} {str(dtype)[6:]} {backend} ...", end="", flush=True)
                r = measure(preset, dtype, device, backend, reps if preset != "large" or cuda
                            else 3, warmup)
                r.update(meta, copy_gbps=copy)
                print(f" {r['ms']:.3f} ms", flush=True)
                group.append(r)
            ref = next((r["ms"] for r in group if r["backend"] == "reference"), None)
            for r in group:
                r["speedup_vs_reference"] = ref / r["ms"] if ref else None
            records += group
            if cuda:
                torch.cuda.empty_cache()  # the next preset's buffers may need the room

    print()
    head = f"{'preset':<10}{'dtype':<10}{'backend':<11}{'ms':>10}{'GB/s':>9}{'% copy':>8}{'x ref':>7}"
    print(head)
    print("-" * len(head))
    for r in records:
        print(f"{r['preset']:<10}{r['dtype']:<10}{r['backend']:<11}{r['ms']:>10.3f}"
              f"{r['gbps']:>9.1f}{100 * r['gbps'] / copy:>7.0f}%"
              f"{r['speedup_vs_reference']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
