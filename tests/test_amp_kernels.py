"""The passes with a GradScaler's 1/scale and a non-finite sum of squares, backend by backend,
against a float64 statement written here (not the reference backend): the unscaled
gradient enters the EMA, the direction and the norm; a non-finite sum leaves weights and EMA
bit for bit, writes an exact saved copy and sets the found flag. Plus the C++ ops' schema
(opcheck) with the new arguments."""

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args
from helpers import cpp_rows as _rows
from helpers import cpp_scalars as _sc

BACKENDS = ["reference", "foreach", "cpp", "cpp-fixed", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _oracle(ws, gs, ms, inv, rho, sigma, lmbda, first):
    """F-SAM's first step in float64 (official order), gradients multiplied by inv."""
    g64 = [g.double() * inv for g in gs]
    d = [g if first else g - sigma * m.double() for g, m in zip(g64, ms)]
    n = torch.sqrt(sum((x * x).sum() for x in d))
    e = [rho / (n + 1e-12) * x for x in d]
    m_new = [g if first else lmbda * m.double() + (1 - lmbda) * g for g, m in zip(g64, ms)]
    return [w.double() + x for w, x in zip(ws, e)], m_new


def _params(dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 17), (5,), (70_001,), (4, 3, 3, 3)]
    ps = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device, dtype)) for s in shapes]
    return ps, gen


def _skip(backend, device, dtype):
    if torch.device(device).type == "cuda" and backend.startswith("cpp"):
        pytest.skip("the C++ backend takes CPU tensors")
    backend_available(backend, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inv_scale_inside_the_passes(backend, dtype, device):
    _skip(backend, device, dtype)
    ps, gen = _params(dtype, device, 0)
    opt = FSAM(ps, torch.optim.SGD, rho=0.3, sigma=0.7, lmbda=0.8, lr=0.0, **opt_args(backend))
    scale = 2.0**12
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=scale)
    scaler.scale(torch.ones((), device=device))  # creates the scale
    for step in range(3):
        raw = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, r in zip(ps, raw):
            p.grad = (r * scale).to(device, dtype)  # what a scaled backward leaves
        grads = [p.grad.clone() for p in ps]
        ws = [p.detach().clone() for p in ps]
        ms = [
            opt.state[p]["ema"].clone()
            if "ema" in opt.state.get(p, {})
            else torch.zeros_like(p, dtype=torch.float32)
            for p in ps
        ]
        opt.first_step(grad_scaler=scaler)
        want_w, want_m = _oracle(ws, grads, ms, 1 / scale, 0.3, 0.7, 0.8, step == 0)
        tol = (
            dict(rtol=0, atol=1e-6)
            if dtype == torch.float32
            else dict(rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)
        )
        for p, w in zip(ps, want_w):
            torch.testing.assert_close(p.double(), w, **tol)
        for p, m in zip(ps, want_m):
            torch.testing.assert_close(opt.state[p]["ema"].double(), m, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads)), ".grad was rewritten"
        assert opt.found_nonfinite().item() == 0.0
        assert opt.abandon_step()
        assert all(torch.equal(p, w) for p, w in zip(ps, ws))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_sum_selects_the_old_values(backend, dtype, value, device):
    _skip(backend, device, dtype)
    ps, gen = _params(dtype, device, 1)
    opt = FSAM(ps, torch.optim.SGD, rho=0.3, sigma=0.7, lmbda=0.8, lr=0.1, **opt_args(backend))
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    opt.first_step(zero_grad=False)
    opt.second_step(zero_grad=True)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    ps[2].grad[12_345] = value  # one element, in the big tensor's middle chunk
    ws = [p.detach().clone() for p in ps]
    ms = [opt.state[p]["ema"].clone() for p in ps]
    opt.first_step()
    for p, w in zip(ps, ws):
        assert torch.equal(
            p.view(torch.uint8 if p.dim() else p.dtype), w.view(torch.uint8 if w.dim() else w.dtype)
        ), "weights must keep their bits"
    assert all(torch.equal(opt.state[p]["ema"], m) for p, m in zip(ps, ms))
    assert opt.found_nonfinite().item() == 1.0
    opt.abandon_step()  # from the saved copy: must be the same bits again
    assert all(torch.equal(p, w) for p, w in zip(ps, ws))
    # The next finite step perturbs normally.
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    opt.first_step()
    assert opt.found_nonfinite().item() == 0.0
    assert not all(torch.equal(p, w) for p, w in zip(ps, ws))
    opt.second_step()


def test_cpp_opcheck_with_inv_scale_and_found():
    backend_available("cpp", "cpu")
    ops = torch.ops.fsam_fused
    gen = torch.Generator().manual_seed(0)
    sizes = (5, 40_000, 33)
    ws = [torch.randn(n, generator=gen) for n in sizes]
    gs = [torch.randn(n, generator=gen) for n in sizes]
    ms = [torch.randn(n, generator=gen) for n in sizes]
    ad, dec, gain, rho = [0, 1, 0], [0.9] * 3, [0.1] * 3, [0.05, 0.1, 0.2]
    inv = torch.tensor(0.25)
    found = torch.zeros(())
    sq = ops.norm_sq(ws, gs, ms, _rows(ad, dec, gain), _sc(1.0), False, inv)
    # The 1/scale multiplies each gradient: the same as the op on pre-unscaled gradients.
    torch.testing.assert_close(
        sq,
        ops.norm_sq(ws, [g * 0.25 for g in gs], ms, _rows(ad, dec, gain), _sc(1.0), False),
        rtol=1e-6,
        atol=0,
    )
    saved = [torch.empty_like(w) for w in ws]
    for args in [
        (
            ws,
            gs,
            ms,
            saved,
            sq,
            _rows(ad, dec, gain, rho),
            _sc(1.0, 1e-12),
            [0, 1, 0],
            False,
            inv,
            found,
        ),
        (
            ws,
            gs,
            ms,
            saved,
            sq,
            _rows(ad, dec, gain, rho),
            _sc(0.5, 1e-12),
            [1, 0, 1],
            True,
            None,
            found,
        ),
        (
            ws,
            gs,
            ms,
            saved,
            torch.tensor([float("nan")]),
            _rows(ad, dec, gain, rho),
            _sc(0.5, 1e-12),
            [0, 1, 0],
            False,
            inv,
            found,
        ),
    ]:
        torch.library.opcheck(ops.perturb_.default, args)
    torch.library.opcheck(
        ops.norm_sq.default, (ws, gs, ms, _rows(ad, dec, gain), _sc(1.0), True, inv)
    )
    # Bad arguments are refused by name before any write.
    w0 = [w.clone() for w in ws]
    with pytest.raises(RuntimeError, match="inv_scale"):
        ops.perturb_(
            ws,
            gs,
            ms,
            saved,
            sq,
            _rows(ad, dec, gain, rho),
            _sc(1.0, 1e-12),
            [0, 0, 0],
            False,
            torch.ones(2),
            found,
        )
    with pytest.raises(RuntimeError, match="found"):
        ops.perturb_(
            ws,
            gs,
            ms,
            saved,
            sq,
            _rows(ad, dec, gain, rho),
            _sc(1.0, 1e-12),
            [0, 0, 0],
            False,
            inv,
            torch.zeros(2, dtype=torch.float64),
        )
    assert all(torch.equal(a, b) for a, b in zip(ws, w0))
    # A non-finite sum: EMA and weights untouched, saved = w for either kind, flag set.
    m0 = [m.clone() for m in ms]
    saved = [torch.full_like(w, float("nan")) for w in ws]
    ops.perturb_(
        ws,
        gs,
        ms,
        saved,
        torch.tensor([1.0, float("inf")]),
        _rows(ad, dec, gain, rho),
        _sc(1.0, 1e-12),
        [0, 1, 0],
        False,
        None,
        found,
    )
    assert found.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(ws, w0))
    assert all(torch.equal(a, b) for a, b in zip(ms, m0))
    assert all(torch.equal(a, b) for a, b in zip(saved, w0))
