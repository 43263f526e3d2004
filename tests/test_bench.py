"""The benchmark command, its candidates and the README section generated from results."""

import importlib.util
import json
import os

import pytest
import torch

from fsam_fused import FSAM
from fsam_fused.bench import e2e, main
from fsam_fused.bench.candidates import NoOp, candidates, foreach_first_step, foreach_restore
from fsam_fused.bench.presets import PRESETS, numel
from fsam_fused.bench.suite import make_params
from helpers import backend_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    "backend",
    "preset",
    "dtype",
    "device",
    "ms",
    "gbps",
    "bytes",
    "speedup_vs_reference",
    "device_name",
    "torch",
    "triton",
    "copy_gbps",
    "pct_copy",
    "speedup_vs",
}
HAVE_PO = importlib.util.find_spec("pytorch_optimizer") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def test_command_writes_records_table_and_plot(tmp_path, capsys):
    backend_available("cpp", "cpu")
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    args = [
        "--device",
        "cpu",
        "--presets",
        "tiny2000",
        "--dtypes",
        "float32,bfloat16",
        "--reps",
        "2",
        "--json",
        str(out),
    ] + (["--plot", str(png)] if HAVE_MPL else [])
    assert main(args) == 0
    text = capsys.readouterr().out
    records = json.loads(out.read_text())
    want = {"reference", "foreach", "cpp", "cpp-fixed"} | (
        {"po-foreach", "po-loop"} if HAVE_PO else set()
    )
    for dtype in ("float32", "bfloat16"):
        got = {r["backend"] for r in records if r["dtype"] == dtype}
        # pytorch_optimizer's foreach path takes float32/float64 only
        assert got == (want if dtype == "float32" else want - {"po-foreach"}), (dtype, got)
    n = sum(numel(s) for s in PRESETS["tiny2000"]())
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["device"] == "cpu" and r["preset"] == "tiny2000" and r["params"] == n
        assert r["ms"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
        ref = next(
            x["ms"] for x in records if x["backend"] == "reference" and x["dtype"] == r["dtype"]
        )
        assert r["speedup_vs_reference"] == pytest.approx(ref / r["ms"])
        assert r["torch"] == torch.__version__
        # The yardstick is the streaming copy (the C++ restore_ op), torch's copy_ beside it.
        assert r["copy_kind"] == "stream" and r["torch_copy_gbps"] > 0
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
    assert "x ref" in text and "copy bandwidth" in text and "streaming copy" in text
    if HAVE_PO:
        assert '\nsummary: tiny2000 float32: backend="auto" (cpp) takes' in text, text
    if not HAVE_PO:
        assert "pytorch-optimizer is not installed" in text
    if HAVE_MPL:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--presets", "nope"])
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--backends", "triton"])  # a CUDA candidate
    assert "unknown backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--dtypes", "float64"])
    assert "unknown dtype" in capsys.readouterr().err


def test_presets_have_the_sizes_they_claim():
    count = {k: (len(f()), sum(numel(s) for s in f())) for k, f in PRESETS.items()}
    assert count["resnet18"] == (62, 11_173_962)
    assert count["vit_b16"] == (152, 86_567_656)
    assert count["gpt2"] == (148, 124_439_808)
    assert count["tiny2000"][0] == 2000 and count["tiny2000"][1] < 70_000
    assert count["single64m"] == (1, 64 * 2**20)
    resnet = e2e.ResNet18()
    assert [tuple(p.shape) for p in resnet.parameters()] == PRESETS["resnet18"]()


@pytest.mark.parametrize("name", ["reference", "foreach", "cpp", "cpp-fixed"])
def test_pass_timers_leave_the_weights_as_they_found_them(name):
    backend_available(name, "cpu")
    c = next(c for c in candidates(torch.device("cpu")) if c.name == name)
    params = make_params([(7,), (300, 5), (40_000,)], torch.float32, torch.device("cpu"))
    built = c.build(params)
    home = [(p.data_ptr(), p.detach().clone()) for p in params]
    for what in ("norm", "perturb", "restore", "perturb"):
        setup, run = built.passes[what]
        args, kwargs = setup()
        run(*args, **kwargs)
        if what == "perturb":
            assert not torch.equal(params[2].detach(), home[2][1]), "perturb did not perturb"
    built.passes["settle"]()
    for p, (ptr, w) in zip(params, home):
        assert p.data_ptr() == ptr and torch.equal(p.detach(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_peer_computes_fsam(dtype):
    """The function the CUDA peer hands to torch.compile, run eagerly, against FSAM."""
    params = make_params([(5,), (33, 7), (1000,)], dtype, torch.device("cpu"), seed=3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FSAM(twin, NoOp, rho=0.05, sigma=1.0, lmbda=0.9, backend="reference")
    g1 = [torch.randn(p.shape).to(dtype) for p in params]
    for t, g in zip(twin, g1):
        t.grad = g.clone()
    opt.first_step()  # seeds the EMA with g1
    opt.second_step()
    emas = [g.float() for g in g1]
    saved = [torch.empty_like(p) for p in params]
    d = [torch.empty_like(p, dtype=torch.float32) for p in params]
    for t, p in zip(twin, params):
        t.grad = p.grad.clone()
    opt.first_step()
    with torch.no_grad():
        foreach_first_step(params, [p.grad for p in params], emas, saved, d, 0.05, 1.0, 0.9)
    for p, t in zip(params, twin):
        torch.testing.assert_close(
            p.detach(), t.detach(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6
        )
    for m, t in zip(emas, twin):
        torch.testing.assert_close(m, opt.state[t]["ema"], rtol=1e-6, atol=1e-7)
    opt.second_step()
    with torch.no_grad():
        foreach_restore(params, saved)
    for p, t in zip(params, twin):
        assert torch.equal(p.detach(), t.detach())


def test_end_to_end_step_runs_and_reports_the_optimizer_share():
    backend_available("cpp", "cpu")
    recs = e2e.run(torch.device("cpu"), batch=2, steps=1, warmup=0, log=lambda *a, **k: None)
    assert [r["backend"] for r in recs] == ["published-loop", "fsam-auto"]
    assert recs[1]["fsam_backend"] == "cpp"
    for r in recs:
        assert 0 < r["optimizer_ms"] < r["ms"] and 0 < r["optimizer_share"] < 1
        assert r["kind"] == "e2e" and r["speedup_vs_published"] > 0


def test_readme_figures_come_from_a_committed_result_file():
    spec = importlib.util.spec_from_file_location(
        "readme_section", os.path.join(ROOT, "bench", "readme_section.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check", os.path.join(ROOT, "README.md")]) == 0


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run must set up as the README tells a new user: the same two commands."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert blocks[0] in ci and blocks[1] in ci, (blocks, ci)


def test_cpp_counts_the_bytes_of_what_it_double_buffers(monkeypatch):
    from fsam_fused.backends import cpp

    monkeypatch.setattr(cpp, "SWAP_MIN_NUMEL", 4096)
    c = {c.name: c for c in candidates(torch.device("cpu"))}
    shapes = [(10,), (64, 80)]  # 10 copied, 5,120 double-buffered
    assert c["cpp"].bytes(shapes, torch.float32) == 10 * 40 + 5120 * 28
    assert c["cpp-fixed"].bytes(shapes, torch.float32) == 5130 * 40
    assert c["po-loop"].bytes(shapes, torch.bfloat16) == 5130 * 26


def test_schedule_step_benchmark_prints_both_kinds(capsys):
    spec = importlib.util.spec_from_file_location(
        "schedule_step", os.path.join(os.path.dirname(__file__), "..", "bench", "schedule_step.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--rounds", "1", "--backend", "foreach"])
    out = capsys.readouterr().out
    assert "62 tensors, 11,173,962 parameters, backend foreach" in out
    assert "28.0 B/param" not in out  # foreach copies: 40 B/param; the cheap step 16
    assert " 40.0 B/param" in out and " 16.0 B/param" in out and "cheap / perturbing" in out


def test_adamw_passes_benchmark_prints_the_floor(capsys):
    backend_available("cpp", "cpu")
    spec = importlib.util.spec_from_file_location(
        "adamw_passes", os.path.join(os.path.dirname(__file__), "..", "bench", "adamw_passes.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--params", "2e5", "--tensors", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "4 tensors, 200,000 float32 parameters" in out
    assert "norm pass" in out and "perturb + restore" in out and "F-SAM / AdamW" in out
