"""Issue 14, items 4 and 5: a parameter whose first gradient was not finite has not been
seen (its next finite gradient seeds the EMA), on every backend, against a float64
statement of the step; and ``found_nonfinite()`` keeps the value of the step it was read
after."""

from __future__ import annotations

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args

BACKENDS = ["reference", "foreach", "cpp", "cpp-fixed", "triton"]
RHO, SIGMA, LMBDA = 0.3, 1.0, 0.5


def _statement(w, g, m, first):
    """One official-order first step in float64: (w + e, the new EMA)."""
    w, g = w.double(), g.double()
    m = g.clone() if first else LMBDA * m.double() + (1 - LMBDA) * g
    d = g - SIGMA * (torch.zeros_like(g) if first else m)  # d uses the EMA before the update
    e = RHO * d / (d.norm() + 1e-12)
    return w + e, m


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_first_gradient_is_not_a_first_sight(backend):
    backend_available(backend, "cpu")
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    v = torch.nn.Parameter(torch.tensor([1.0, 3.0]))  # finite gradient, same step
    opt = FSAM(
        [w, v], torch.optim.SGD, rho=RHO, sigma=SIGMA, lmbda=LMBDA, lr=0.1, **opt_args(backend)
    )
    w.grad = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    v.grad = torch.tensor([1.0, 1.0])
    w0, v0 = w.detach().clone(), v.detach().clone()
    opt.first_step(zero_grad=True)
    assert torch.equal(w, w0) and torch.equal(v, v0)
    assert opt.found_nonfinite().item() == 1.0
    w.grad, v.grad = torch.zeros(4), torch.zeros(2)
    opt.second_step(zero_grad=True)  # plain SGD on a zero gradient: no change
    assert "ema" not in opt.state.get(w, {}) and "ema" not in opt.state.get(v, {})
    gw, gv = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-2.0, 0.5])
    w.grad, v.grad = gw.clone(), gv.clone()
    opt.first_step(zero_grad=True)
    # The statement over both tensors (one global norm): d = g on first sight.
    d = torch.cat([gw, gv]).double()
    e = RHO * d / (d.norm() + 1e-12)
    torch.testing.assert_close(w.double(), w0.double() + e[:4], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v.double(), v0.double() + e[4:], rtol=1e-6, atol=1e-7)
    assert torch.equal(opt.state[w]["ema"], gw) and torch.equal(opt.state[v]["ema"], gv)
    w.grad, v.grad = torch.zeros(4), torch.zeros(2)
    opt.second_step(zero_grad=True)
    # A third step decays the EMA seeded by the first finite gradient.
    g3 = torch.tensor([0.5, 0.5, -1.0, 2.0])
    w.grad, v.grad = g3.clone(), torch.zeros(2)
    opt.first_step()
    expect = LMBDA * gw.double() + (1 - LMBDA) * g3.double()
    torch.testing.assert_close(opt.state[w]["ema"].double(), expect, rtol=1e-7, atol=0)
    opt.second_step()


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_found_nonfinite_keeps_its_step(backend):
    backend_available(backend, "cpu")
    w = torch.nn.Parameter(torch.ones(3))
    opt = FSAM([w], torch.optim.SGD, lr=0.1, **opt_args(backend))
    flags = []
    for g in ([float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, float("nan"), 0.0]):
        w.grad = torch.tensor(g)
        opt.first_step()
        flags.append(opt.found_nonfinite())
        w.grad = torch.ones(3)
        opt.second_step()
    assert [f.item() for f in flags] == [1.0, 0.0, 1.0]
