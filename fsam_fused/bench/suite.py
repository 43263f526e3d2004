"""The optimizer-only suite: every candidate on one parameter list, timed interleaved."""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch

from . import report
from .candidates import candidates
from .presets import PRESETS, numel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device) -> float:
    """Milliseconds of one call; CUDA events on CUDA (no host sync inside ``fn``)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(steps: dict, device, reps: int, warmup: int, spreads=None) -> dict:
    """Median ms per entry of ``steps`` (name -> (prepare or None, step)), taking turns every
    round, so a slow spell of a shared machine hits every candidate alike. ``spreads``: a
    dict to fill with each entry's spread (report.spread), which says whether it held."""
    times = {name: [] for name in steps}
    for r in range(warmup + reps):
        for name, (prepare, step) in steps.items():
            if prepare is not None:
                prepare()
                sync(device)
            t = _time_once(step, device)
            if r >= warmup:
                times[name].append(t)
    if spreads is not None:  # issue 18: the benchmark knows when it was disturbed
        spreads.update({name: report.spread(v) for name, v in times.items()})
    return {name: statistics.median(v) for name, v in times.items()}


def streaming_copy(device):
    """A copy with non-temporal stores, multi-threaded, or None where there is none.

    On the CPU, torch's ``copy_`` writes through the cache (a store to an uncached line first
    reads it: a third more traffic) and is not the ceiling of this machine's bandwidth; the C++
    backend's ``restore_`` op is exactly a streaming copy (non-temporal stores, prefetch, the
    threads' shares split by bytes), so the yardstick is that op on one buffer. On CUDA,
    ``copy_`` is already a streaming device copy, and None is returned."""
    if device.type != "cpu":
        return None
    from ..ops import cpp as cpp_ops

    if cpp_ops.load() is not None:
        return None
    return lambda dst, src: cpp_ops.restore_([dst], [src])


def fused_adamw(shapes, dtype, device):
    """One ``torch.optim.AdamW(fused=True)`` step on parameters of these shapes (its own, so
    the F-SAM candidates' lists are untouched), as ``(prepare, step)``, or None where torch
    has no fused AdamW for this device and dtype. The yardstick a user already pays per step:
    it moves 28 bytes per float32 parameter in one pass (p, g, m, v read; p, m, v written),
    the same as the double-buffered F-SAM step. Its moments are seeded by two steps first; the
    learning rate is tiny, so the weights barely move while it is timed. Its prepare rewrites
    the gradients, as every F-SAM candidate's does (see candidates.py)."""
    params = make_params(shapes, dtype, device, seed=1)
    try:
        opt = torch.optim.AdamW(params, lr=1e-12, fused=True)
        opt.step()
        opt.step()
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return None
    grads = [p.grad for p in params]

    @torch.no_grad()
    def prepare():
        torch._foreach_mul_(grads, 1.0)

    return prepare, opt.step


def make_params(shapes, dtype, device, seed=0):
    """Parameters with gradients, from a fixed seed (generated on the CPU, then moved)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return params


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {
        "torch": torch.__version__,
        "triton": tv,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def run(device, presets, dtypes, names=None, reps=15, warmup=2, log=print):
    """Records, one per (preset, dtype, candidate) that can run here. Skipped candidates are
    logged with the reason."""
    meta = {"device": device.type, "device_name": device_name(device), **versions()}
    records = []
    for preset in presets:
        shapes = PRESETS[preset]()
        n = sum(numel(s) for s in shapes)
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            t0 = time.perf_counter()
            log(f"{preset} ({len(shapes)} tensors, {n / 1e6:.1f} M) {dname}: building", end="")
            params = make_params(shapes, dtype, device)
            built, cands = {}, {}
            for c in candidates(device):
                if names is not None and c.name not in names:
                    continue
                if c.name.startswith("cpp"):
                    from ..ops import cpp as cpp_ops

                    if not cpp_ops.attempted():
                        log(
                            " [loading the C++ backend: compiled on first use, then cached]", end=""
                        )
                reason = c.unavailable(device, dtype, len(shapes))
                if reason is not None:
                    log(f" [{c.name} skipped: {reason.splitlines()[0]}]", end="")
                    continue
                log(f" {c.name}", end="")
                built[c.name], cands[c.name] = c.build(params), c
            src = torch.randn(n, device=device).to(dtype)
            dst = torch.empty_like(src)
            steps = {name: (b.prepare, b.step) for name, b in built.items()}
            steps["copy"] = (None, lambda dst=dst, src=src: dst.copy_(src))
            stream = streaming_copy(device)
            if stream is not None:
                steps["stream-copy"] = (None, lambda dst=dst, src=src, f=stream: f(dst, src))
            adamw = fused_adamw(shapes, dtype, device)
            if adamw is not None:
                steps["adamw-fused"] = adamw
            log(f"; timing {reps} rounds", end="")
            spreads = {}  # issue 18: each figure's spread, for report.doubts
            ms = time_interleaved(steps, device, reps, warmup, spreads)
            log(f"; {time.perf_counter() - t0:.0f} s")
            moved = 2 * src.numel() * src.element_size() / 1e6
            torch_copy_gbps = moved / ms.pop("copy")
            # The yardstick: the fastest way to stream this many bytes here (see
            # streaming_copy); torch's copy_ stays as a second column.
            copy_gbps = moved / ms.pop("stream-copy") if stream is not None else torch_copy_gbps
            adamw_ms = ms.pop("adamw-fused", None)
            group = []
            for name, t in ms.items():
                c = cands[name]
                nbytes = c.bytes(shapes, dtype)
                group.append(
                    {
                        "kind": "optimizer",
                        "backend": name,
                        "label": c.label,
                        "peer": c.peer,
                        "preset": preset,
                        "dtype": dname,
                        **meta,
                        "ms": t,
                        "bytes": nbytes,
                        "gbps": nbytes / t / 1e6,
                        "copy_gbps": copy_gbps,
                        "torch_copy_gbps": torch_copy_gbps,
                        "copy_kind": "stream" if stream is not None else "torch",
                        "pct_copy": 100 * nbytes / t / 1e6 / copy_gbps,
                        # One fused AdamW step on the same list, timed in the same rounds
                        # (None where torch has no fused AdamW here).
                        "adamw_ms": adamw_ms,
                        "x_adamw": t / adamw_ms if adamw_ms else None,
                        "tensors": len(shapes),
                        "params": n,
                        "reps": reps,
                        # issue 18: the spreads report.doubts judges the figures by.
                        "spread": spreads[name],
                        "copy_spread": spreads["stream-copy" if stream is not None else "copy"],
                        "torch_copy_spread": spreads["copy"],
                    }
                )
            ref = ms.get("reference")
            peers = {name: t for name, t in ms.items() if cands[name].peer}
            for r in group:
                r["speedup_vs_reference"] = ref / r["ms"] if ref else None
                r["speedup_vs"] = {p: t / r["ms"] for p, t in peers.items() if p != r["backend"]}
            records += group
            del built, params, src, dst, steps, adamw
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records
