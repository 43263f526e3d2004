"""Hostile input meets one validation layer: what a careless or adversarial user does to the
optimizer, on every backend. Each case either works correctly or raises a clear error, and
nothing the user can see changes before that error; nothing crashes."""

import copy
import math
import warnings

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args

BACKENDS = ["reference", "foreach", "triton", "cpp", "cpp-fixed"]


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _loss(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 2, generator=gen)
    return torch.nn.functional.mse_loss(net(x).float(), y)


def _stepped(backend, seed=0, steps=2, **kw):
    backend_available(backend, "cpu")
    net = _net(seed)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **opt_args(backend), **kw)
    for k in range(steps):
        _loss(net, k).backward()
        opt.first_step(zero_grad=True)
        _loss(net, k).backward()
        opt.second_step(zero_grad=True)
    return net, opt


def _state(net, opt):
    return (
        [p.detach().clone() for p in net.parameters()],
        {id(p): s["ema"].clone() for p, s in opt.state.items() if "ema" in s},
        copy.deepcopy(opt.base_optimizer.state_dict()["state"]),
    )


def _unchanged(net, opt, before):
    w, m, base = before
    assert all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), w)), "weights"
    now = {id(p): s["ema"] for p, s in opt.state.items() if "ema" in s}
    assert now.keys() == m.keys() and all(torch.equal(now[k], m[k]) for k in m), "EMA"
    b = opt.base_optimizer.state_dict()["state"]
    assert b.keys() == base.keys() and all(
        torch.equal(b[k]["momentum_buffer"], base[k]["momentum_buffer"]) for k in base
    ), "base"


# ------------------------------------------------------------------ storage changed mid-step


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_replaced_between_the_steps_is_restored_exactly(backend):
    """p.data = p.data.clone() between first_step and second_step: the saved value goes into
    the new storage (the kernels must not write through the stale address), and the run goes
    on bit for bit as a twin's that did not do it."""
    runs = []
    for replace in (False, True):
        net, opt = _stepped(backend)
        for k in range(9, 12):
            _loss(net, k).backward()
            opt.first_step(zero_grad=True)
            if replace and k == 9:
                for p in net.parameters():
                    p.data = p.data.clone()
            _loss(net, k).backward()
            opt.second_step(zero_grad=True)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_between_the_steps_restores_by_casting_with_a_warning(backend):
    net, opt = _stepped(backend)
    _loss(net, 9).backward()
    w = [p.detach().clone() for p in net.parameters()]
    opt.first_step(zero_grad=True)
    net.half()
    with pytest.warns(RuntimeWarning, match="cast"):
        opt.abandon_step()
    for p, x in zip(net.parameters(), w):
        assert p.dtype == torch.float16 and torch.equal(p.detach(), x.half())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reshaped_parameter_is_named_and_the_others_restored(backend):
    net, opt = _stepped(backend)
    _loss(net, 9).backward()
    w = [p.detach().clone() for p in net.parameters()]
    opt.first_step(zero_grad=True)
    first = next(net.parameters())
    first.data = first.data.t().contiguous()  # a transposed copy: shape (5, 6) now
    with pytest.raises(
        RuntimeError, match=r"shape of the parameter planned as shape \(6, 5\) \(now \(5, 6\)\)"
    ):
        opt.second_step()
    for p, x in list(zip(net.parameters(), w))[1:]:
        assert torch.equal(p.detach(), x), "the others are restored"
    opt.state_dict()  # not perturbed any more


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cached", [False, True], ids=["new-plan", "cached-plan"])
@pytest.mark.parametrize("bad", ["float64", "float16", "int64", "shape", "broadcast"])
def test_a_bad_gradient_is_rejected_before_anything_changes(backend, cached, bad):
    net, opt = _stepped(backend, steps=2 if cached else 0)
    _loss(net, 3).backward()
    before = _state(net, opt)
    p = next(net.parameters())  # (6, 5)
    g = p.grad
    p.grad.data = {
        "float64": lambda: g.double(),
        "float16": lambda: g.half(),
        "int64": lambda: g.long(),
        "shape": lambda: g.t().contiguous(),
        "broadcast": lambda: g[:1].clone(),
    }[bad]()
    with pytest.raises((RuntimeError, ValueError), match="gradient"):
        opt.first_step()
    _unchanged(net, opt, before)
    p.grad = None
    _loss(net, 3).backward()
    opt.first_step()  # fine again
    opt.second_step()


# ------------------------------------------------------------------ parameters


def test_a_parameter_twice_is_rejected():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="twice"):
        FSAM([p, p], torch.optim.SGD, lr=0.1)
    opt = FSAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [p]})
    opt.param_groups[0]["params"].append(p)  # behind the optimizer's back
    p.grad = torch.randn(3)
    w = p.detach().clone()
    with pytest.raises(RuntimeError, match="only once"):
        opt.first_step()
    assert torch.equal(p.detach(), w) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_sharing_storage_are_rejected(backend):
    backend_available(backend, "cpu")
    t = torch.randn(10)
    a, b = torch.nn.Parameter(t), torch.nn.Parameter(t[2:])
    opt = FSAM([a, b], torch.optim.SGD, lr=0.1, **opt_args(backend))
    a.grad, b.grad = torch.randn(10), torch.randn(8)
    before = t.clone()
    with pytest.raises(RuntimeError, match="share memory"):
        opt.first_step()
    assert torch.equal(t, before) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_parameter_is_rejected(backend):
    backend_available(backend, "cpu")
    p = torch.nn.Parameter(torch.randn(1).expand(4))
    opt = FSAM([p], torch.optim.SGD, lr=0.1, **opt_args(backend))
    p.grad = torch.randn(4)
    w = p.detach().clone()
    with pytest.raises(RuntimeError, match="overlapping"):
        opt.first_step()
    assert torch.equal(p.detach(), w) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_aliasing_a_weight_is_rejected(backend):
    backend_available(backend, "cpu")
    p = torch.nn.Parameter(torch.randn(6))
    opt = FSAM([p], torch.optim.SGD, lr=0.1, **opt_args(backend))
    p.grad = torch.randn(6)
    p.grad.data = p.data  # the gradient is the weight
    w = p.detach().clone()
    with pytest.raises(RuntimeError, match="share memory"):
        opt.first_step()
    assert torch.equal(p.detach(), w)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "attr, value, match",
    [
        ("backend", "bogus", "Invalid backend"),
        ("ema_dtype", "float32", "Invalid ema_dtype"),
        ("ema_dtype", torch.int32, "Invalid ema_dtype"),
        ("sigma", 10**400, "sigma.*too large"),
        ("lmbda", True, "lmbda must be a real number"),
        ("fixed_addresses", 1, "fixed_addresses must be a bool"),
    ],
)
def test_a_bad_setting_between_steps_is_named_before_anything_changes(backend, attr, value, match):
    net, opt = _stepped(backend)
    _loss(net, 4).backward()
    before = _state(net, opt)
    setattr(opt, attr, value)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.first_step()
    _unchanged(net, opt, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=10**400), "rho.*too large"),
        (dict(sigma=-(10**400)), "sigma.*too large"),
        (dict(lr=0.1, ema_dtype="float32"), "ema_dtype"),
        (dict(ema_dtype=torch.int64), "ema_dtype"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FSAM(_net().parameters(), torch.optim.SGD, **{"lr": 0.1, **kwargs})


# (a 0-dim floating tensor is a valid value since issue 17: docs/compile.md; an integer one
# or a 1-dim one is not)
@pytest.mark.parametrize("rho", [torch.tensor(1), torch.tensor([0.1, 0.2]), "0.1", None])
def test_a_group_rho_of_the_wrong_type_between_steps(rho):
    net, opt = _stepped("foreach")
    opt.param_groups[0]["rho"] = rho
    _loss(net, 1).backward()
    with pytest.raises(TypeError, match="rho in param group 0"):
        opt.first_step()


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: sd["state"][0].update(ema=torch.zeros(1, 5)), "EMA"),  # broadcastable
        (lambda sd: sd["state"][0].update(ema=[0.0] * 30), "must be a tensor"),
        (lambda sd: sd["state"][0].update(step=3), "at most an 'ema'"),
        (
            lambda sd: sd["base_optimizer"]["state"][0].update(momentum_buffer=torch.zeros(5)),
            "momentum_buffer",
        ),
        (lambda sd: sd["base_optimizer"]["state"][0].update(momentum_buffer=[1.0]), "type list"),
        (lambda sd: sd["fsam"].update(sigma=math.nan), "sigma"),
        (lambda sd: sd["param_groups"][0].update(rho=-1.0), "rho"),
    ],
)
def test_load_state_dict_checks_everything_before_changing_anything(corrupt, match):
    net, opt = _stepped("foreach")
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = _state(net, opt)
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    _unchanged(net, opt, before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_load_state_dict_rejects_another_optimizers_state():
    net = _net()
    adam = FSAM(net.parameters(), torch.optim.AdamW, lr=0.01)
    for _ in range(2):
        _loss(net).backward()
        adam.step(lambda: _loss(net).backward())
        adam.zero_grad()
    sgd = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="another optimizer"):
        sgd.load_state_dict(adam.state_dict())


# ------------------------------------------------------------------ the closure


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_closure_restores_weights_and_the_first_gradients(backend):
    net, opt = _stepped(backend)
    _loss(net, 5).backward()
    grads = [p.grad for p in net.parameters()]
    values = [g.clone() for g in grads]
    w = [p.detach().clone() for p in net.parameters()]
    base = copy.deepcopy(opt.base_optimizer.state_dict()["state"])

    def closure():
        _loss(net, 5).backward()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), w))
    assert all(
        p.grad is g and torch.equal(g, v) for p, g, v in zip(net.parameters(), grads, values)
    )
    b = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(b[k]["momentum_buffer"], base[k]["momentum_buffer"]) for k in base)


def test_a_closure_that_is_not_callable_or_calls_first_step():
    net, opt = _stepped("foreach")
    _loss(net).backward()
    before = _state(net, opt)
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step("not a closure")
    _unchanged(net, opt, before)

    def closure():
        _loss(net).backward()
        opt.first_step()

    with pytest.raises(RuntimeError, match="must run only the second"):
        opt.step(closure)
    assert all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), before[0]))
    opt.state_dict()


def test_step_without_closure_finishes_a_step_and_is_an_error_otherwise():
    net, opt = _stepped("foreach")
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    _loss(net).backward()
    opt.first_step(zero_grad=True)
    _loss(net).backward()
    opt.step()  # as second_step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_the_auto_fallback_warning_points_at_the_callers_line(monkeypatch):
    from fsam_fused.ops import cpp as cpp_ops

    monkeypatch.setattr(cpp_ops, "_status", "RuntimeError: no C++ compiler (test)")
    monkeypatch.setattr(cpp_ops, "_warned", False)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = FSAM([p], torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.first_step()  # the line the warning must name
        line = __import__("inspect").currentframe().f_lineno - 1
    (w,) = [w for w in caught if "C++" in str(w.message)]
    assert w.filename == __file__ and w.lineno == line, (w.filename, w.lineno)
    opt.second_step()


# ------------------------------------------------------------------ found by the sweep


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ema_set_by_hand_between_steps_is_used_or_named(backend):
    net, opt = _stepped(backend)
    p = next(net.parameters())
    opt.state[p]["ema"] = torch.zeros_like(p)  # valid: the next step must use it
    twin_net, twin = _stepped("reference")
    twin.state[next(twin_net.parameters())]["ema"] = torch.zeros_like(p)
    for n, o in ((net, opt), (twin_net, twin)):
        _loss(n, 7).backward()
        o.first_step(zero_grad=True)
        _loss(n, 7).backward()
        o.second_step(zero_grad=True)
    for a, b in zip(net.parameters(), twin_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = _state(net, opt)
    opt.state[p]["ema"] = torch.zeros(7)  # invalid: named before anything changes
    _loss(net, 8).backward()
    with pytest.raises(ValueError, match="EMA"):
        opt.first_step()
    w, m, base = before
    assert all(torch.equal(q.detach(), x) for q, x in zip(net.parameters(), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ema_of_another_dtype_is_converted_when_the_step_commits(backend):
    """One bfloat16 EMA among float32 ones (ema_dtype changed, a checkpoint from another
    setting): the fused kernels take one EMA dtype a bucket, so the step converts it (staged,
    committed on success) instead of reading it as float32."""
    nets = {}
    for b in (backend, "reference"):
        net, opt = _stepped(b)
        q = list(net.parameters())[1]
        opt.state[q]["ema"] = opt.state[q]["ema"].bfloat16().float().bfloat16()
        for k in (5, 6):
            _loss(net, k).backward()
            opt.first_step(zero_grad=True)
            _loss(net, k).backward()
            opt.second_step(zero_grad=True)
        assert opt.state[q]["ema"].dtype == torch.float32
        nets[b] = (net, opt)
    for a, b in zip(nets[backend][0].parameters(), nets["reference"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", ["weight", "gradient", "another EMA"])
def test_an_ema_sharing_memory_is_rejected(backend, alias):
    backend_available(backend, "cpu")
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    opt = FSAM([a, b], torch.optim.SGD, lr=0.1, **opt_args(backend))
    for _ in range(2):
        a.grad, b.grad = torch.randn(4, 3), torch.randn(4, 3)
        opt.first_step()
        opt.second_step()
    a.grad, b.grad = torch.randn(4, 3), torch.randn(4, 3)
    opt.state[a]["ema"] = {
        "weight": a.data,
        "gradient": a.grad,
        "another EMA": opt.state[b]["ema"],
    }[alias]
    before = [a.detach().clone(), b.detach().clone(), opt.state[b]["ema"].clone()]
    with pytest.raises(RuntimeError, match="share memory"):
        opt.first_step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert torch.equal(opt.state[b]["ema"], before[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["slice", "transpose", "square transpose"])
def test_a_new_view_of_the_same_storage_gets_its_bits_back(backend, view):
    """p.data = p.data[:2] or p.data.t() keeps the address: the storage gets its saved bits
    back, the parameter keeps the view it was given, every other parameter is restored."""
    net, opt = _stepped(backend)
    ps = list(net.parameters())
    if view == "square transpose":
        ps[0] = list(net.parameters())[2]  # (2, 6): make it square
        with torch.no_grad():
            net[2].weight = torch.nn.Parameter(torch.randn(6, 6))
        net[2].in_features = net[2].out_features = 6
        net[0].out_features = 6
        opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, **opt_args(backend))
        ps = [net[2].weight] + [p for p in net.parameters() if p is not net[2].weight]
        net.forward = lambda x: torch.nn.functional.linear(torch.tanh(net[0](x)), net[2].weight)
    _loss_fn = (
        (lambda k: (net(torch.randn(4, 5)) ** 2).mean())
        if view == "square transpose"
        else (lambda k: _loss(net, k))
    )
    _loss_fn(9).backward()
    w = [p.detach().clone() for p in ps]
    opt.first_step(zero_grad=True)
    ps[0].data = ps[0].data[:2] if view == "slice" else ps[0].data.t()
    opt.abandon_step()
    for p, x in list(zip(ps, w))[1:]:
        assert torch.equal(p.detach(), x), "the others are restored"
    want = w[0][:2] if view == "slice" else w[0].t()
    assert torch.equal(ps[0].detach(), want)
    assert ps[0].stride() == want.stride()
    opt.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_restore_leaves_the_step_in_flight(backend, monkeypatch):
    from fsam_fused import backends

    net, opt = _stepped(backend)
    _loss(net, 9).backward()
    w = [p.detach().clone() for p in net.parameters()]
    opt.first_step(zero_grad=True)
    cls = backends.CLASSES["cpp" if backend.startswith("cpp") else backend]
    original = cls.restore

    def once(self, b):
        monkeypatch.setattr(cls, "restore", original)
        raise RuntimeError("injected")

    monkeypatch.setattr(cls, "restore", once)
    monkeypatch.setattr(
        cls, "original", lambda self, b, i: (_ for _ in ()).throw(RuntimeError("injected too"))
    )
    with pytest.raises(RuntimeError, match="injected"):
        opt.second_step()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()  # still in flight: the weights are still perturbed
    opt.abandon_step()
    assert all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), w))


@pytest.mark.parametrize("handler", ["ignore", "flag"])
def test_an_interrupt_that_does_not_raise_lets_the_step_complete(handler):
    import _thread
    import signal

    from fsam_fused import backends

    calls = []
    prev = signal.signal(
        signal.SIGINT, signal.SIG_IGN if handler == "ignore" else (lambda s, f: calls.append(s))
    )
    original = backends.ForeachBackend.perturb

    def hit(self, *a, **k):
        _thread.interrupt_main()
        return original(self, *a, **k)

    try:
        net, opt = _stepped("foreach")
        _loss(net, 1).backward()
        w = [p.detach().clone() for p in net.parameters()]
        backends.ForeachBackend.perturb = hit
        opt.first_step(zero_grad=True)  # returns normally
        backends.ForeachBackend.perturb = original
        assert not all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), w))
        _loss(net, 1).backward()
        opt.second_step()  # the step is in flight and completes
    finally:
        backends.ForeachBackend.perturb = original
        signal.signal(signal.SIGINT, prev)
    assert calls == ([] if handler == "ignore" else [signal.SIGINT])


def test_a_closure_that_calls_second_step_is_refused_before_the_base_steps():
    net, opt = _stepped("foreach")
    _loss(net).backward()
    before = _state(net, opt)

    def closure():
        _loss(net).backward()
        opt.second_step()

    with pytest.raises(RuntimeError, match="called second_step"):
        opt.step(closure)
    w, _, base = before  # the EMA keeps the first pass's update (a failed second pass)
    assert all(torch.equal(p.detach(), x) for p, x in zip(net.parameters(), w))
    assert opt.base_optimizer.state_dict()["state"].keys() == base.keys()
    assert all(
        torch.equal(
            opt.base_optimizer.state_dict()["state"][k]["momentum_buffer"],
            base[k]["momentum_buffer"],
        )
        for k in base
    )


def test_load_state_dict_names_a_non_dict_fsam_entry_and_meta_state():
    net, opt = _stepped("foreach")
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match=r"state_dict\['fsam'\] must be a dict"):
        opt.load_state_dict(dict(sd, fsam=None))
    sd["base_optimizer"]["state"][0]["momentum_buffer"] = torch.empty(6, 5, device="meta")
    with pytest.raises(ValueError, match="meta"):
        opt.load_state_dict(sd)
