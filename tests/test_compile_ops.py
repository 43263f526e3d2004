"""The frozen passes as torch.library custom ops (fsam_fused/ops/triton.py, ops/frozen.py):
``torch.library.opcheck`` (schema and declared mutations, fake kernels, AOT dispatch) on CPU
tensors (the Triton ones under TRITON_INTERPRET=1), and their results against a float64
statement of the passes."""

import pytest
import torch

from helpers import backend_available

SHAPES = [(3, 5), (1100,), (17,), (2, 1, 4)]


def _inputs(dtype, seed=0, has_ema=True, adaptive=True):
    g = torch.Generator().manual_seed(seed)

    def r(shape):
        return torch.randn(shape, generator=g).to(dtype)

    weights = [r(s) for s in SHAPES]
    grads = [r(s) for s in SHAPES]
    emas = [torch.randn(s, generator=g) for s in SHAPES] if has_ema else []
    saved = [torch.full(s, float("nan"), dtype=dtype) for s in SHAPES]  # poisoned
    rows = torch.tensor(
        [[0.05 * (i + 1), float(adaptive and i % 2 == 1), 0.9, 0.1] for i in range(len(SHAPES))],
        dtype=torch.float32,
    )
    scalars = torch.tensor([0.5 if has_ema else 0.0, 1e-12], dtype=torch.float32)
    return weights, grads, emas, saved, rows, scalars


def _oracle(weights, grads, emas, rows, scalars, has_ema):
    """float64: (sum of squares, new weights, new EMAs) of one official-order step."""
    sigma, eps = scalars.double().tolist()
    ds, news = [], []
    for i, (w, g) in enumerate(zip(weights, grads)):
        rho, a, decay, gain = rows[i].double().tolist()
        g, w = g.double(), w.double()
        m = emas[i].double() if has_ema else g
        d = g - sigma * m if has_ema else g
        news.append(decay * m + gain * g if has_ema else None)
        ds.append((w.abs() if a else torch.ones_like(w)) * d)
    sq = sum((x * x).sum() for x in ds)
    norm = sq.sqrt()
    out = []
    for i, (w, x) in enumerate(zip(weights, ds)):
        rho, a = rows[i, 0].double(), rows[i, 1].item()
        out.append(w.double() + rho / (norm + eps) * (w.double().abs() if a else 1.0) * x)
    return sq, out, news


def _triton():
    backend_available("triton", "cpu")
    from fsam_fused.kernels import fsam as K
    from fsam_fused.ops import triton as T

    return K, T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_ema", [True, False])
def test_triton_ops_opcheck(dtype, has_ema):
    K, T = _triton()
    weights, grads, emas, saved, rows, scalars = _inputs(dtype, has_ema=has_ema)
    ln = K.MultiTensorFSAM(torch.device("cpu"), dtype, torch.float32)
    handle = T.register(ln)
    partials = torch.zeros(K.CPU_PROGRAMS)
    found = torch.full((), float("nan"))
    args = (handle, weights, grads, emas, saved, rows, scalars)
    torch.library.opcheck(T.triton_norm_, (*args, partials, False, True, None))
    sq = partials.clone()
    torch.library.opcheck(
        T.triton_perturb_,
        (handle, weights, grads, emas, saved, sq, rows, scalars, False, True, None, found),
    )
    torch.library.opcheck(T.triton_restore_, (handle, weights, emas, saved, rows, scalars, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ops_compute_the_passes(dtype):
    """The ops against float64: the partials sum to the sum of squares, perturb writes
    w + e (to the dtype's rounding), the EMA update and an exact saved copy; restore gives
    the weights back bit for bit."""
    K, T = _triton()
    weights, grads, emas, saved, rows, scalars = _inputs(dtype, seed=3)
    w0 = [w.clone() for w in weights]
    sq, want, want_m = _oracle(weights, grads, emas, rows, scalars, True)
    ln = K.MultiTensorFSAM(torch.device("cpu"), dtype, torch.float32)
    handle = T.register(ln)
    partials = torch.full((K.CPU_PROGRAMS,), float("nan"))
    found = torch.full((), float("nan"))
    T.triton_norm_(handle, weights, grads, emas, saved, rows, scalars, partials, False, True, None)
    torch.testing.assert_close(partials.double().sum(), sq, rtol=1e-5, atol=0)
    T.triton_perturb_(
        handle, weights, grads, emas, saved, partials, rows, scalars, False, True, None, found
    )
    assert found.item() == 0.0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    for w, x, s, w_orig, m, xm in zip(weights, want, saved, w0, emas, want_m):
        torch.testing.assert_close(w.double(), x, **tol)
        assert torch.equal(s, w_orig)
        torch.testing.assert_close(m.double(), xm, rtol=1e-6, atol=1e-7)
    T.triton_restore_(handle, weights, emas, saved, rows, scalars, True)
    assert all(torch.equal(w, x) for w, x in zip(weights, w0))


def test_triton_ops_on_copies_write_the_copies():
    """Called on other tensors than the launcher last saw (copies, as Inductor or opcheck
    may pass), an op writes those, not the ones its tables held before."""
    K, T = _triton()
    weights, grads, emas, saved, rows, scalars = _inputs(torch.float32, seed=4)
    ln = K.MultiTensorFSAM(torch.device("cpu"), torch.float32, torch.float32)
    handle = T.register(ln)
    T.triton_restore_(handle, weights, emas, [w.clone() for w in weights], rows, scalars, True)
    copies = [w.clone() for w in weights]
    before = [w.clone() for w in weights]
    zeros = [torch.zeros_like(w) for w in weights]
    T.triton_restore_(handle, copies, emas, zeros, rows, scalars, True)
    assert all(torch.equal(c, z) for c, z in zip(copies, zeros))
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_a_dead_launcher_is_named():
    _, T = _triton()
    weights, _, emas, saved, rows, scalars = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="no longer exists"):
        T.triton_restore_(10**9, weights, emas, saved, rows, scalars, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_frozen_ops_opcheck(dtype):
    """The C++ passes' custom-op wrappers (they detach the weights) pass opcheck, with
    weights that require grad as a training graph's primals do."""
    backend_available("cpp", "cpu")
    from fsam_fused.ops import frozen as F

    weights, grads, emas, saved, rows, scalars = _inputs(dtype, seed=5)
    saved = [torch.zeros_like(w) for w in weights]
    found = torch.zeros(1)
    torch.library.opcheck(F.cpp_norm, (weights, grads, emas, rows, scalars, False, None))
    sq = F.cpp_norm(weights, grads, emas, rows, scalars, False, None)
    torch.testing.assert_close(
        sq.double().sum(), _oracle(weights, grads, emas, rows, scalars, True)[0], rtol=1e-5, atol=0
    )
    torch.library.opcheck(
        F.cpp_perturb_, (weights, grads, emas, saved, sq, rows, scalars, False, None, found)
    )
    torch.library.opcheck(F.cpp_restore_, (weights, saved))
