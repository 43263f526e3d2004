"""pytest-benchmark microbenchmarks, kept out of the default test run:

    pytest bench --benchmark-only                       # everything (long on a CPU)
    pytest bench --benchmark-only -k "resnet18 and step"
    pytest bench --benchmark-only --benchmark-json out.json

Each pass (norm, perturb, restore) and the whole optimizer step, for every FSAM backend that
runs on the device (CUDA if any, else the CPU), over parameter lists that mirror real models,
in float32 and bfloat16; the peers (pytorch_optimizer's FriendlySAM, foreach and loop, and on
CUDA the foreach step under torch.compile) in the same tables for the whole step. Each
benchmark records its counted bytes and GB/s in ``extra_info``.

For the one-minute overview with copy-bandwidth yardsticks, run ``python -m fsam_fused.bench``.
"""

import pytest
import torch

from fsam_fused.bench.candidates import candidates
from fsam_fused.bench.presets import FULL, PRESETS, numel
from fsam_fused.bench.suite import make_params, sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CANDIDATES = {c.name: c for c in candidates(DEVICE)}
_built = {}  # (preset, dtype): (params, {name: Built}); one list alive at a time


def _get(preset, dtype, name):
    key = (preset, dtype)
    if key not in _built:
        _built.clear()  # free the previous list before allocating the next
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _built[key] = (make_params(PRESETS[preset](), dtype, DEVICE), {})
    params, built = _built[key]
    c = CANDIDATES[name]
    reason = c.unavailable(DEVICE, dtype, len(PRESETS[preset]()))
    if reason is not None:
        pytest.skip(reason)
    if name not in built:
        built[name] = c.build(params)
    return c, built[name], PRESETS[preset]()


def _record(benchmark, c, shapes, dtype, what):
    nbytes = c.bytes(shapes, dtype) if what == "step" else None
    benchmark.extra_info.update(
        device=DEVICE.type, params=sum(map(numel, shapes)), counted_bytes=nbytes
    )
    if nbytes and benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run(*a, **k):
        out = fn(*a, **k)
        sync(DEVICE)
        return out

    return run


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("preset", FULL)
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_step(benchmark, name, preset, dtype):
    benchmark.group = f"step {preset} {dtype}"
    c, b, shapes = _get(preset, DTYPES[dtype], name)
    step = _synced(b.step)
    if b.prepare is None:
        benchmark(step)
    else:  # a peer whose gradients are reset, untimed, before each step

        def setup():
            b.prepare()
            sync(DEVICE)

        benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=1)
    _record(benchmark, c, shapes, DTYPES[dtype], "step")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("preset", FULL)
@pytest.mark.parametrize("what", ["norm", "perturb", "restore"])
@pytest.mark.parametrize("name", [n for n, c in CANDIDATES.items() if not c.peer])
def test_pass(benchmark, name, what, preset, dtype):
    benchmark.group = f"{what} {preset} {dtype}"
    c, b, shapes = _get(preset, DTYPES[dtype], name)
    setup, run = b.passes[what]

    def synced_setup():
        args = setup()
        sync(DEVICE)
        return args

    try:
        benchmark.pedantic(_synced(run), setup=synced_setup, rounds=10, warmup_rounds=1)
    finally:
        b.passes["settle"]()  # leave the weights unperturbed for the next benchmark
    _record(benchmark, c, shapes, DTYPES[dtype], what)
