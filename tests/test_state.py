"""state_dict round trips, determinism, param groups shared with the base optimizer, LR
schedulers, and hyper-parameters changed between steps."""

import copy
import io

import pytest
import torch

from fsam_fused import FSAM
from helpers import BASES, backend_available, batches, loss_of, make_net, opt_args, trajectory


def _steps(net, opt, data):
    for x, y in data:
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())
        opt.zero_grad()


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_mid_run_resumes_bit_exactly(backend, base, dtype, device):
    backend_available(backend, device)
    cls, kw = BASES[base]
    data = list(batches(21, 6, dtype, device))

    def new(net):
        return FSAM(
            net.groups(0.1, True), cls, rho=0.1, sigma=0.7, lmbda=0.9, **opt_args(backend), **kw
        )

    net_a = make_net(20, dtype, device)
    opt_a = new(net_a)
    _steps(net_a, opt_a, data[:3])
    buf = io.BytesIO()
    torch.save({"model": net_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _steps(net_a, opt_a, data[3:])

    buf.seek(0)
    ckpt = torch.load(buf)
    net_b = make_net(999, dtype, device)  # different init, overwritten by the checkpoint
    net_b.load_state_dict(ckpt["model"])
    opt_b = FSAM(
        net_b.groups(0.5, False), cls, rho=0.5, sigma=0.1, lmbda=0.1, **opt_args(backend), **kw
    )  # hyper-parameters restored from the checkpoint
    groups_before = [id(g) for g in opt_b.param_groups]
    opt_b.load_state_dict(ckpt["opt"])
    assert [id(g) for g in opt_b.param_groups] == groups_before
    assert opt_b.base_optimizer.param_groups is opt_b.param_groups
    assert (opt_b.sigma, opt_b.lmbda) == (0.7, 0.9)
    _steps(net_b, opt_b, data[3:])

    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        if "ema" in sa:
            assert sb["ema"].dtype == torch.float32  # not cast to the weights' dtype
            assert torch.equal(sa["ema"], sb["ema"])
        ba, bb = opt_a.base_optimizer.state.get(pa, {}), opt_b.base_optimizer.state.get(pb, {})
        assert ba.keys() == bb.keys()
        for k in ba:
            assert torch.equal(torch.as_tensor(ba[k]), torch.as_tensor(bb[k])), k


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
def test_rerun_is_bit_identical(backend, device):
    backend_available(backend, device)
    a, _, _ = trajectory(backend, seed=4, device=device, adaptive=True)
    b, _, _ = trajectory(backend, seed=4, device=device, adaptive=True)
    for sa, sb in zip(a, b):
        for key in ("perturbed", "weights"):
            assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key]))


def test_lr_scheduler_on_either_object_drives_the_base():
    net = make_net(0)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(1, 2):
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())
        opt.zero_grad()
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda e: 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    del sched2


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
def test_add_param_group_reaches_base_and_steps(backend, device):
    backend_available(backend, device)
    net = make_net(2, device=device)
    opt = FSAM(
        net.fc1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **opt_args(backend)
    )
    opt.add_param_group({"params": list(net.fc2.parameters()), "rho": 0.3})
    g = opt.param_groups[1]
    assert opt.base_optimizer.param_groups[1] is g
    assert g["rho"] == 0.3 and g["adaptive"] is False and g["momentum"] == 0.9
    for x, y in batches(3, 2, device=device):
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())
        opt.zero_grad()
    assert "momentum_buffer" in opt.base_optimizer.state[net.fc2.weight]
    assert "ema" in opt.state[net.fc2.weight]


@pytest.mark.parametrize("backend", ["foreach", "triton", "cpp", "cpp-fixed"])
def test_hyperparameters_changed_between_steps_take_effect(backend, device):
    """rho and adaptive per group, sigma and lmbda on the optimizer: a scheduler may change
    any of them; cached device tables must follow."""
    backend_available(backend, device)
    changes = [
        lambda o: o.param_groups[0].update(rho=0.3),
        lambda o: o.param_groups[1].update(adaptive=True),
        lambda o: setattr(o, "sigma", 0.25),
        lambda o: setattr(o, "lmbda", 0.5),
        lambda o: o.param_groups[1].update(rho=0.0),
    ]

    def run(b):
        net = make_net(8, device=device)
        opt = FSAM(net.groups(0.1, False), torch.optim.SGD, lr=0.05, **opt_args(b))
        out = []
        for change, (x, y) in zip(changes, batches(9, len(changes), device=device)):
            change(opt)
            loss_of(net, x, y).backward()
            opt.first_step(zero_grad=True)
            out.append([p.detach().clone() for p in net.parameters()])
            loss_of(net, x, y).backward()
            opt.second_step(zero_grad=True)
        return out

    for got, want in zip(run(backend), run("reference")):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_is_left_as_the_users_gradient():
    net = make_net(1)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches(2, 2):
        loss_of(net, x, y).backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        opt.first_step()
        assert all(
            torch.equal(g, p.grad)
            for g, p in zip(grads, [p for p in net.parameters() if p.grad is not None])
        )
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)


def test_state_dict_of_sam_has_no_ema_and_records_hyperparameters():
    from fsam_fused import SAM

    net = make_net(1)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    _steps(net, opt, batches(2, 2))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"] == {}
    assert sd["fsam"]["sigma"] == 0.0
    assert sd["base_optimizer"]["state"], "base optimizer momentum missing from the state_dict"


def test_scheduler_sees_steps_taken_with_first_and_second_step(recwarn):
    net = make_net(0)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ((x, y),) = batches(1, 1)
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(net, x, y).backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert opt.param_groups[0]["lr"] == 0.5
