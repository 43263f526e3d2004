"""Every backend against an independent float64 statement of SEMANTICS.md.

Synthetic gradients (fresh random numbers each pass) make the trajectory computable without
a model, so edge cases are easy to stage: a parameter first seen at step 1, one that loses its
gradient in the second backward of step 2, one that never gets a gradient.
"""

import math

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args

SIZES = [1, 3, 1023, 1025, 257, 40]  # group 0: the first three; group 1: the rest
RHOS = (0.1, 0.3)
LR, MOMENTUM = 0.1, 0.9
STEPS = 5


def _grads(gen, k, n_params, device):
    """(first-pass grads, second-pass grads) for step k; None where a parameter has none."""
    g1 = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    g2 = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    g1[5] = g2[5] = None  # never a gradient
    if k == 0:
        g1[4] = g2[4] = None  # first seen at step 1
    if k == 2:
        g2[3] = None  # loses its gradient in the second backward: restored all the same
    return g1, g2


def independent(w0, steps, seed, sigma, lmbda, adaptive, order):
    """Whole-trajectory float64 F-SAM + SGD(momentum), written from SEMANTICS.md alone."""
    w = [x.clone() for x in w0]
    m, buf = {}, {}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        g1, g2 = _grads(gen, k, len(w), "cpu")
        d = {}
        for i, g in enumerate(g1):
            if g is None:
                continue
            if sigma == 0:
                d[i] = g
            elif order == "paper":
                m[i] = lmbda * m.get(i, torch.zeros_like(g)) + (1 - lmbda) * g
                d[i] = g - sigma * m[i]
            elif i not in m:
                m[i], d[i] = g, g
            else:
                d[i] = g - sigma * m[i]
                m[i] = lmbda * m[i] + (1 - lmbda) * g
        group = lambda i: 0 if i < 3 else 1  # noqa: E731
        a = {i: (w[i].abs() if adaptive[group(i)] else torch.ones_like(w[i])) for i in d}
        norm = math.sqrt(sum(float(((a[i] * d[i]) ** 2).sum()) for i in d))
        perturbed = [x.clone() for x in w]
        for i in d:
            perturbed[i] = w[i] + RHOS[group(i)] / (norm + 1e-12) * a[i] ** 2 * d[i]
        for i, g in enumerate(g2):
            if g is None:
                continue
            buf[i] = g.clone() if i not in buf else MOMENTUM * buf[i] + g
            w[i] = w[i] - LR * buf[i]
        out.append((perturbed, [x.clone() for x in w], {i: v.clone() for i, v in m.items()}))
    return out


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
@pytest.mark.parametrize("order", ["official", "paper"])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(
    "adaptive", [(False, False), (True, True), (True, False)], ids=["plain", "adaptive", "mixed"]
)
def test_against_float64_statement(backend, order, sigma, adaptive, device):
    backend_available(backend, device)
    lmbda, seed = 0.8, 1234
    gen = torch.Generator().manual_seed(seed - 1)
    w0 = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    want = independent(w0, STEPS, seed, sigma, lmbda, adaptive, order)

    params = [torch.nn.Parameter(x.to(device, torch.float32)) for x in w0]
    opt = FSAM(
        [
            {"params": params[:3], "rho": RHOS[0], "adaptive": adaptive[0]},
            {"params": params[3:], "rho": RHOS[1], "adaptive": adaptive[1]},
        ],
        torch.optim.SGD,
        sigma=sigma,
        lmbda=lmbda,
        ema_order=order,
        **opt_args(backend),
        lr=LR,
        momentum=MOMENTUM,
    )
    gen = torch.Generator().manual_seed(seed)
    for k in range(STEPS):
        g1, g2 = _grads(gen, k, len(params), device)
        for p, g in zip(params, g1):
            p.grad = None if g is None else g.to(device, torch.float32)
        opt.first_step(zero_grad=True)
        perturbed = [p.detach().double().cpu() for p in params]
        for p, g in zip(params, g2):
            p.grad = None if g is None else g.to(device, torch.float32)
        opt.second_step(zero_grad=True)
        w_pert, w_new, m = want[k]
        tol = dict(rtol=1e-5, atol=1e-6)
        for i, p in enumerate(params):
            torch.testing.assert_close(
                perturbed[i], w_pert[i], **tol, msg=lambda s: f"step {k} perturbed[{i}]: {s}"
            )
            torch.testing.assert_close(
                p.detach().double().cpu(),
                w_new[i],
                **tol,
                msg=lambda s: f"step {k} weights[{i}]: {s}",
            )
            ema = opt.state[p].get("ema") if p in opt.state else None
            if i in m:
                assert ema is not None and ema.dtype == torch.float32, f"step {k} ema[{i}]"
                torch.testing.assert_close(ema.double().cpu(), m[i], **tol)
            else:
                assert ema is None, f"step {k}: parameter {i} has EMA state it should not"
    assert torch.equal(params[5].detach().cpu(), w0[5].float()), "untouched parameter moved"
