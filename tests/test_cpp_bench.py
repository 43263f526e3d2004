"""The benchmark's yardstick column: one torch.optim.AdamW(fused=True) step on the same list,
timed in the same interleaved rounds as the F-SAM candidates ("x AdamW(fused) step")."""

import pytest
import torch

from fsam_fused.bench import report, suite
from fsam_fused.bench.candidates import FSAMBackend
from helpers import backend_available


def test_fused_adamw_yardstick_is_a_real_adamw_step():
    """The yardstick is AdamW's own fused step (its moments and weights move as torch's
    unfused AdamW moves them), and its prepare rewrites the gradients in place."""
    shapes = [(300,), (17, 5)]
    prepare, step = suite.fused_adamw(shapes, torch.float32, torch.device("cpu"))
    params = step.__self__.param_groups[0]["params"]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twin, params):
        t.grad = p.grad.clone()
    ref = torch.optim.AdamW(twin, lr=1e-12, foreach=False)
    ref.load_state_dict(step.__self__.state_dict())
    grads = [p.grad.data_ptr() for p in params]
    prepare()
    step()
    ref.step()
    assert [p.grad.data_ptr() for p in params] == grads
    for p, t in zip(params, twin):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            step.__self__.state[p]["exp_avg_sq"], ref.state[t]["exp_avg_sq"], rtol=1e-5, atol=0
        )


def test_records_and_tables_carry_the_adamw_column(monkeypatch):
    backend_available("cpp", "cpu")
    monkeypatch.setattr(suite, "candidates", lambda device: [FSAMBackend("cpp", "FSAM C++", "cpp")])
    seen = {}
    real = suite.time_interleaved

    def spy(steps, device, reps, warmup, *rest, **kw):
        ms = real(steps, device, reps, warmup, *rest, **kw)
        seen.update(ms)
        return ms

    monkeypatch.setattr(suite, "time_interleaved", spy)
    (r,) = suite.run(
        torch.device("cpu"), ["tiny2000"], [torch.float32], reps=3, warmup=1, log=lambda *a, **k: 0
    )
    assert set(seen) == {"cpp", "copy", "stream-copy", "adamw-fused"}
    assert r["adamw_ms"] == seen["adamw-fused"] > 0
    assert r["x_adamw"] == pytest.approx(r["ms"] / r["adamw_ms"])
    text = report.terminal_table([r])
    assert "x AdamW" in text.splitlines()[0]
    assert f"{r['x_adamw']:.2f}" in text.splitlines()[2]
    md = report.markdown_table([r]).splitlines()
    col = md[0].split(" | ").index("x AdamW(fused) step")
    assert md[2].split(" | ")[col] == f"{r['x_adamw']:.2f}"
    assert len([c for c in md[0].split("|") if c.strip()]) == md[1].count("---")
    # Records without the yardstick (older result files) keep the old table.
    old = {k: v for k, v in r.items() if k not in ("adamw_ms", "x_adamw")}
    assert "AdamW" not in report.markdown_table([old])
