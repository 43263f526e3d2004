"""The step session: torch.optim's step hooks and profiler range once per F-SAM step
(attributed to FSAM), values that change without a plan rebuild or a table upload, the
public in-flight flag and abandon_step, one optimizer entered from two threads."""

import copy
import threading

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from fsam_fused import FSAM
from helpers import backend_available, make_net, opt_args


def _xy(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randn(n, 5, generator=g)


def _loss(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def _api_steps(api, net, opt, x, y, steps):
    for _ in range(steps):
        if api == "two-pass":
            _loss(net, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(net, x, y).backward()
            opt.second_step(zero_grad=True)
        elif api == "closure-authors":
            _loss(net, x, y).backward()
            opt.step(lambda: _loss(net, x, y).backward())
            opt.zero_grad()
        elif api == "closure-torch":
            opt.zero_grad()
            opt.step(lambda: _loss(net, x, y).backward())
        elif api == "scaler":
            scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
            scaler.scale(_loss(net, x, y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(_loss(net, x, y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


APIS = ["two-pass", "closure-authors", "closure-torch", "scaler"]


@pytest.mark.parametrize("api", APIS)
def test_step_hooks_fire_once_per_step_for_fsam(api):
    net = make_net(0)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05)
    seen = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__))),
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("gpre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("gpost", type(o).__name__))),
    ]
    try:
        _api_steps(api, net, opt, *_xy(), 3)
    finally:
        for h in handles:
            h.remove()
    one = [("gpre", "FSAM"), ("pre", "FSAM"), ("post", "FSAM"), ("gpost", "FSAM")]
    assert seen == one * 3, seen


@pytest.mark.parametrize("api", APIS)
def test_one_profiler_range_per_step(api):
    net = make_net(1)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05)
    x, y = _xy(1)
    _api_steps(api, net, opt, x, y, 1)  # warm-up: plan and build outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _api_steps(api, net, opt, x, y, 2)
    names = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
    assert names == ["Optimizer.step#FSAM.step"] * 2, names


def test_hooks_on_a_failed_step_close_without_post_hooks():
    net = make_net(2)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    x, y = _xy(2)
    _loss(net, x, y).backward()

    def bad():
        raise ValueError("second pass failed")

    with pytest.raises(ValueError):
        opt.step(bad)
    assert seen == [] and not opt.perturbed
    _api_steps("two-pass", net, opt, x, y, 1)
    assert seen == ["post"]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp", "cpp-fixed", "triton"])
def test_values_changing_every_step_never_rebuild(backend, monkeypatch):
    """rho, sigma and lmbda change every step: the plan is built twice (the first step, and
    once after it creates the EMAs) and never again, no Triton table is uploaded after that,
    and the trajectory equals the reference's rebuilt from scratch every step."""
    backend_available(backend, "cpu")
    net = make_net(3)
    twin = copy.deepcopy(net)
    kw = dict(lr=0.05, momentum=0.9)
    opt = FSAM(net.parameters(), torch.optim.SGD, **opt_args(backend), **kw)
    ref = FSAM(twin.parameters(), torch.optim.SGD, backend="reference", **kw)
    uploads = []
    if backend == "triton":
        from fsam_fused.kernels import fsam as K

        real = K._upload
        monkeypatch.setattr(K, "_upload", lambda *a: uploads.append(1) or real(*a))
    x, y = _xy(3)
    gen = torch.Generator().manual_seed(3)
    schedule = [torch.rand(3, generator=gen).tolist() for _ in range(8)]

    def run(n, o, fresh):
        out = []
        for k, vals in enumerate(schedule):
            o.param_groups[0]["rho"] = 0.01 + vals[0]
            o.sigma = 0.2 + vals[1]
            o.lmbda = 0.5 * vals[2]
            if fresh:  # the oracle: a copy (no plan) every step, rebuilt from scratch
                o = copy.deepcopy(o, {id(p): p for p in n.parameters()})
            if k == 2:
                uploads.clear()
                at2 = o.engine.builds
            # Gradients kept at their addresses, so the Triton gradient table stays too.
            _loss(n, x, y).backward()
            o.first_step()
            o.zero_grad(set_to_none=False)
            _loss(n, x, y).backward()
            o.second_step()
            o.zero_grad(set_to_none=False)
            out.append([p.detach().clone() for p in n.parameters()])
        return out, (at2, o.engine.builds)

    want, _ = run(twin, ref, True)
    got, builds = run(net, opt, False)
    for k, (a, b) in enumerate(zip(got, want)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    assert builds == (2, 2), builds
    assert uploads == []


# ----------------------------------------------------------------------------- in flight


def test_abandon_step_restores_and_skips_the_base():
    net = make_net(4)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    x, y = _xy(4)
    _api_steps("two-pass", net, opt, x, y, 1)  # momentum buffers exist
    w = [p.detach().clone() for p in net.parameters()]
    base = copy.deepcopy(opt.base_optimizer.state_dict())
    assert not opt.perturbed and opt.abandon_step() is False
    _loss(net, x, y).backward()
    opt.first_step(zero_grad=True)
    assert opt.perturbed
    with pytest.raises(RuntimeError, match="abandon_step"):
        opt.state_dict()
    assert opt.abandon_step() is True
    assert not opt.perturbed
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w))
    after = opt.base_optimizer.state_dict()
    for k, s in base["state"].items():
        assert torch.equal(s["momentum_buffer"], after["state"][k]["momentum_buffer"])
    opt.state_dict()  # idle again
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    _api_steps("two-pass", net, opt, x, y, 1)  # and steps on normally


def test_one_optimizer_from_two_threads_is_refused():
    net = make_net(5)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05)
    x, y = _xy(5)
    inside, release, errors = threading.Event(), threading.Event(), []

    def slow():
        inside.set()
        release.wait(10)
        _loss(net, x, y).backward()

    def other():
        inside.wait(10)
        try:
            opt.first_step()
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            release.set()

    _loss(net, x, y).backward()
    t = threading.Thread(target=other)
    t.start()
    opt.step(slow)
    t.join(10)
    assert errors and "another thread" in errors[0]
    assert not opt.perturbed


def test_values_refresh_without_numpy(monkeypatch):
    """numpy is not a dependency: without it the CPU rows are written through torch views,
    with the same results (a changing rho and sigma, against a run with numpy)."""
    runs = []
    for numpy_ok in (True, False):
        if not numpy_ok:

            def no_numpy(self):
                raise RuntimeError("Numpy is not available")

            monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
        net = make_net(6)
        opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.05, backend="cpp")
        x, y = _xy(6)
        for k in range(4):
            opt.param_groups[0]["rho"] = 0.05 * (k + 1)
            opt.sigma = 0.5 + 0.1 * k
            _api_steps("two-pass", net, opt, x, y, 1)
        assert (opt.engine.plan.buckets[0].device_values.host() is None) == (not numpy_ok)
        runs.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- review findings


def test_after_a_failed_torch_style_step_the_next_runs_both_passes():
    """A torch.optim-style closure whose second pass raised gives the first pass's .grad
    back; the next step(closure) must not take them for a caller's first pass."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1)
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    xs = [torch.randn(8, 4) for _ in range(3)]
    calls = []

    def make(i, fail_on_call=None):
        n = [0]

        def closure():
            n[0] += 1
            calls.append((i, n[0]))
            if fail_on_call == n[0]:
                raise ValueError("bad batch")
            opt.zero_grad()
            loss = m(xs[i]).pow(2).mean()
            loss.backward()
            return loss

        return closure

    opt.step(make(0))
    with pytest.raises(ValueError, match="bad batch"):
        opt.step(make(1, fail_on_call=2))
    calls.clear()
    opt.step(make(2))
    assert calls == [(2, 1), (2, 2)]


def test_the_closure_sample_keeps_no_gradient_alive():
    import gc
    import weakref

    m = torch.nn.Linear(4, 3)
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(5, 4)
    m(x).sum().backward()
    opt.first_step(zero_grad=True)
    m(x).sum().backward()
    opt.second_step()
    refs = [weakref.ref(p.grad) for p in m.parameters()]
    opt.zero_grad()
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_scheduler_on_the_base_optimizer_reports_the_step_once():
    import warnings

    m = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, 1, 0.5)
    seen = []
    h = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
            for _ in range(2):
                m(x).pow(2).mean().backward()
                opt.first_step(zero_grad=True)
                m(x).pow(2).mean().backward()
                opt.second_step(zero_grad=True)
                sched.step()
    finally:
        h.remove()
    assert seen == ["FSAM", "FSAM"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("bad", [None, "0.5"])
def test_a_bad_sigma_after_a_step_is_named(bad):
    m = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    _api_steps("two-pass", m, opt, x, torch.zeros(8, 1), 1)
    opt.sigma = bad
    m(x).sum().backward()
    with pytest.raises(TypeError, match="sigma"):
        opt.first_step()
    assert not opt.perturbed
