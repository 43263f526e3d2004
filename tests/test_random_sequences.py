"""Random sequences of steps (hypothesis): gradients that come and go, hyper-parameters
changed mid-run, gradients at new or the same addresses, both step APIs. Each fused
backend must track the reference on every step. The reference run drops its step plan
before every step, so it also checks the plan the optimizer keeps between steps."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsam_fused import FSAM
from helpers import backend_available, opt_args

SIZES = [1, 5, 1024, 1500]


def sometimes(values):
    """None (keep the previous value) most of the time: a plan is only reused between steps
    that change nothing but the gradients."""
    return st.one_of(st.none(), st.none(), st.none(), st.sampled_from(values))


step_st = st.fixed_dictionaries(
    {
        "present": st.one_of(
            st.none(), st.lists(st.booleans(), min_size=len(SIZES), max_size=len(SIZES))
        ),
        "rho0": sometimes([0.0, 0.05, 0.3]),
        "adaptive1": sometimes([False, True]),
        "sigma": sometimes([0.0, 0.5, 1.0]),
        "lmbda": sometimes([0.0, 0.6, 0.95]),
        "reuse_grads": st.booleans(),
        "closure": st.booleans(),
    }
)


@pytest.mark.parametrize("backend", ["foreach", "triton", "cpp", "cpp-fixed"])
@settings(
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(step_st, min_size=2, max_size=6),
    order=st.sampled_from(["official", "paper"]),
    seed=st.integers(0, 2**16),
)
def test_random_step_sequences_track_the_reference(backend, device, steps, order, seed):
    backend_available(backend, device)
    gen = torch.Generator().manual_seed(seed)
    w0 = [torch.randn(n, generator=gen) for n in SIZES]
    runs = {}
    for b in ("reference", backend):
        ps = [torch.nn.Parameter(w.to(device, copy=True)) for w in w0]
        opt = FSAM(
            [{"params": ps[:2]}, {"params": ps[2:], "rho": 0.2}],
            torch.optim.SGD,
            **opt_args(b),
            ema_order=order,
            lr=0.05,
            momentum=0.9,
        )
        runs[b] = (ps, opt, {})
    present = [True] * len(SIZES)
    for k, s in enumerate(steps):
        present = s["present"] or present
        grads = [
            torch.randn(n, generator=gen).to(device) if on else None
            for n, on in zip(SIZES, present)
        ]
        grads2 = [
            None if g is None else torch.randn(g.shape, generator=gen).to(device) for g in grads
        ]
        for b, (ps, opt, kept) in runs.items():
            if s["rho0"] is not None:
                opt.param_groups[0]["rho"] = s["rho0"]
            if s["adaptive1"] is not None:
                opt.param_groups[1]["adaptive"] = s["adaptive1"]
            if s["sigma"] is not None:
                opt.sigma = s["sigma"]
            if s["lmbda"] is not None:
                opt.lmbda = s["lmbda"]
            for i, (p, g) in enumerate(zip(ps, grads)):
                if g is None:
                    p.grad = None
                elif s["reuse_grads"] and i in kept and kept[i].shape == g.shape:
                    p.grad = kept[i]  # same storage as last step, new values
                    p.grad.copy_(g)
                else:
                    p.grad = kept[i] = g.clone()

            def second():
                for p, g in zip(ps, grads2):
                    p.grad = None if g is None else g.clone()

            if b == "reference":
                # The oracle re-validates and rebuilds its plan every step: a fresh copy of
                # its optimizer (copies carry no plan), which must also step identically.
                opt = copy.deepcopy(opt, {id(p): p for p in ps})
                runs[b] = (ps, opt, kept)
            if s["closure"]:
                opt.step(second)
            else:
                opt.first_step()
                second()
                opt.second_step()
        (pr, optr, _), (pf, optf, _) = runs["reference"], runs[backend]
        for i, (a, b) in enumerate(zip(pf, pr)):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k} weights[{i}]: {m}"
            )
            ma, mb = optf.state.get(a, {}).get("ema"), optr.state.get(b, {}).get("ema")
            assert (ma is None) == (mb is None), f"step {k} ema[{i}] presence"
            if ma is not None:
                torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-6)
