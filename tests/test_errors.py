"""Bad input gets a clear error naming the problem, before anything is modified."""

import math

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, batches, loss_of, make_net, opt_args, require_triton

BACKENDS = ["reference", "foreach", "triton", "cpp", "cpp-fixed"]


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _unchanged(net, snap):
    return all(torch.equal(p, s) for p, s in zip(net.parameters(), snap))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(rho=math.nan), ValueError, "rho"),
        (dict(rho=math.inf), ValueError, "rho"),
        (dict(rho="0.1"), TypeError, "rho"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=math.nan), ValueError, "sigma"),
        (dict(lmbda=1.0), ValueError, "lmbda"),
        (dict(lmbda=-0.1), ValueError, "lmbda"),
        (dict(lmbda=math.inf), ValueError, "lmbda"),
        (dict(adaptive=1), TypeError, "adaptive"),
        (dict(ema_order="algorithm1"), ValueError, "ema_order"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(ema_dtype=torch.int32), ValueError, "ema_dtype"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, exc, match):
    net = make_net(0)
    with pytest.raises(exc, match=match):
        FSAM(net.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_invalid_base_optimizer():
    net = make_net(0)
    with pytest.raises(TypeError, match="base_optimizer"):
        FSAM(net.parameters(), torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        FSAM(net.parameters(), "SGD", lr=0.1)


def test_invalid_group_rho():
    net = make_net(0)
    with pytest.raises(ValueError, match="rho in param group"):
        FSAM([{"params": net.fc1.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)
    opt = FSAM(net.fc1.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho in param group"):
        opt.add_param_group({"params": net.fc2.parameters(), "rho": math.nan})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda o: o.param_groups[1].update(rho=-0.5), "rho in param group 1"),
        (lambda o: setattr(o, "sigma", -1.0), "sigma"),
        (lambda o: setattr(o, "lmbda", 1.5), "lmbda"),
        (lambda o: setattr(o, "ema_order", "wrong"), "ema_order"),
    ],
)
def test_invalid_value_set_between_steps_is_caught_before_any_change(
    backend, break_it, match, device
):
    backend_available(backend, device)
    net = make_net(0, device=device)
    opt = FSAM(net.groups(0.1, False), torch.optim.SGD, lr=0.1, **opt_args(backend))
    ((x, y),) = batches(1, 1, device=device)
    loss_of(net, x, y).backward()
    opt.step(lambda: loss_of(net, x, y).backward())
    opt.zero_grad()
    loss_of(net, x, y).backward()
    snap, emas = _snapshot(net), {p: s["ema"].clone() for p, s in opt.state.items()}
    break_it(opt)
    with pytest.raises(ValueError, match=match):
        opt.first_step()
    assert _unchanged(net, snap)
    assert all(torch.equal(opt.state[p]["ema"], m) for p, m in emas.items())
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()  # the failed first_step left nothing to undo


def test_call_order_misuse():
    net = make_net(0)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    ((x, y),) = batches(1, 1)
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    loss_of(net, x, y).backward()
    original = _snapshot(net)
    opt.first_step()
    perturbed = _snapshot(net)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    assert _unchanged(net, perturbed), "a second first_step perturbed again"
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.load_state_dict({})
    opt.zero_grad()
    opt.second_step()  # no gradients: restore only, the base optimizer skips them
    assert _unchanged(net, original)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_error_restores_the_weights(backend, device):
    backend_available(backend, device)
    net = make_net(0, device=device)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, **opt_args(backend))
    ((x, y),) = batches(1, 1, device=device)
    loss_of(net, x, y).backward()
    snap = _snapshot(net)

    def closure():
        raise KeyboardInterrupt  # e.g. Ctrl-C during the second forward

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert _unchanged(net, snap)
    loss_of(net, x, y).backward()
    opt.step(lambda: loss_of(net, x, y).backward())  # usable afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_rejected_before_any_change(backend):
    backend_available(backend, "cpu")
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    opt = FSAM([*lin.parameters(), *emb.parameters()], torch.optim.SGD, lr=0.1, **opt_args(backend))
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    snap = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert all(torch.equal(p, s) for p, s in zip((*lin.parameters(), *emb.parameters()), snap))
    assert not opt.state


def test_complex_parameter_rejected():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = FSAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.randn(3, dtype=torch.complex64)
    snap = p.detach().clone()
    with pytest.raises(RuntimeError, match="complex"):
        opt.first_step()
    assert torch.equal(p, snap)


def test_triton_backend_rejects_what_it_cannot_run(monkeypatch):
    require_triton()
    net = make_net(0)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, backend="triton")
    ((x, y),) = batches(1, 1)
    loss_of(net, x, y).backward()
    snap = _snapshot(net)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        opt.first_step()
    assert _unchanged(net, snap)
    monkeypatch.undo()

    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p.grad = torch.randn(5, dtype=torch.float64)
    opt64 = FSAM([p], torch.optim.SGD, lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        opt64.first_step()
    FSAM([p], torch.optim.SGD, lr=0.1, backend="auto").first_step()  # auto: foreach


def test_load_state_dict_rejects_mismatches():
    net = make_net(0)
    opt = FSAM(net.groups(0.1, False), torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="not an FSAM state_dict"):
        opt.load_state_dict(torch.optim.SGD(net.parameters(), lr=0.1).state_dict())
    other = FSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="param groups"):
        other.load_state_dict(sd)
    bad = dict(sd, param_groups=[dict(sd["param_groups"][0], params=[0]), sd["param_groups"][1]])
    with pytest.raises(ValueError, match="param group 0 has"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_gradient_after_steps_is_still_caught(backend, device):
    """Steps reuse their plan while only gradients change: a gradient that turns bad later
    must still be rejected before anything is modified."""
    backend_available(backend, device)
    p = torch.nn.Parameter(torch.randn(6, 5, device=device))
    q = torch.nn.Parameter(torch.randn(4, device=device))
    opt = FSAM([q, p], torch.optim.SGD, lr=0.1, **opt_args(backend))
    for _ in range(2):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.first_step()
        opt.second_step(zero_grad=True)
    snap = [p.detach().clone(), q.detach().clone()]
    q.grad = torch.randn_like(q)
    p.grad = torch.randn(5, 6, device=device).t()  # same shape, not contiguous
    if backend in ("triton", "cpp", "cpp-fixed"):  # the fused kernels walk dense storage
        with pytest.raises(ValueError, match="dense"):
            opt.first_step()
        assert torch.equal(p, snap[0]) and torch.equal(q, snap[1])
    else:  # the unfused backends take any strides
        opt.first_step()
        opt.second_step(zero_grad=True)
    q.grad = torch.randn_like(q)
    p.grad = torch.randn_like(p).to_sparse()
    snap = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert torch.equal(p, snap[0]) and torch.equal(q, snap[1])


def test_auto_falls_back_when_gradients_are_not_dense(device):
    """(On CUDA "auto" would pick Triton, which needs dense gradients.)"""
    p = torch.nn.Parameter(torch.randn(6, 5, device=device))
    opt = FSAM([p], torch.optim.SGD, lr=0.1, backend="auto")
    for _ in range(2):  # the second step keeps its plan: no new EMA
        p.grad = torch.randn(5, 6, device=device).t()
        opt.first_step()
        opt.second_step()
    assert [b.backend for b in opt.plan_summary()] == ["foreach"]
