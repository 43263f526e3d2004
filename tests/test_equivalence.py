"""Every backend follows the reference backend, step by step, on a small model.

Also: the reference's official order follows the authors' published code, and SAM equals
FSAM with sigma = 0.
"""

import pytest
import torch

from fsam_fused import FSAM, SAM
from fsam_fused.published import FriendlySAM
from helpers import (
    BASES,
    assert_snapshots_close,
    backend_available,
    batches,
    loss_of,
    make_net,
    opt_args,
    trajectory,
)

FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["foreach", "triton", "cpp", "cpp-fixed"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("order", ["official", "paper"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
def test_backend_follows_reference(backend, base, order, adaptive, sigma, device):
    backend_available(backend, device)
    kw = dict(
        seed=7, steps=5, device=device, base=base, sigma=sigma, adaptive=adaptive, ema_order=order
    )
    want, _, _ = trajectory("reference", **kw)
    got, _, _ = trajectory(backend, **kw)
    assert_snapshots_close(got, want, **FP32, what=backend)


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
@pytest.mark.parametrize("base", ["sgd", "sgd_plain_momentum", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["sam", "fsam"])
def test_every_backend_follows_published_code(backend, base, adaptive, sigma, device):
    """Third-party code: the authors' FriendlySAM (with sigma = 0 it is SAM/ASAM as in
    davda54/sam). It combines norms of norms and computes e as (a^2 * d) * s; we sum squares:
    equal up to float32 rounding."""
    backend_available(backend, device)
    seed, steps = 3, 6
    want, _, _ = trajectory(
        backend,
        seed=seed,
        steps=steps,
        base=base,
        rho=0.1,
        sigma=sigma,
        lmbda=0.6,
        adaptive=adaptive,
        device=device,
    )
    net = make_net(seed, device=device)
    cls, kw = BASES[base]
    opt = FriendlySAM(
        net.groups(0.1, adaptive), cls, rho=0.1, sigma=sigma, lmbda=0.6, adaptive=adaptive, **kw
    )
    for step, (x, y) in enumerate(batches(seed + 1, steps, device=device)):
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        for i, p in enumerate(net.parameters()):
            torch.testing.assert_close(p.detach(), want[step]["perturbed"][i], **FP32)
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
        for i, p in enumerate(net.parameters()):
            torch.testing.assert_close(p.detach(), want[step]["weights"][i], **FP32)


@pytest.mark.parametrize("backend", ["reference", "foreach", "triton", "cpp", "cpp-fixed"])
def test_sam_is_fsam_with_sigma_zero_and_no_state(backend, device):
    backend_available(backend, device)
    want, _, _ = trajectory(backend, seed=5, device=device, sigma=0.0)
    net = make_net(5, device=device)
    cls, kw = BASES["sgd"]
    opt = SAM(net.groups(0.1, False), cls, rho=0.1, **opt_args(backend), **kw)
    for step, (x, y) in enumerate(batches(6, 5, device=device)):
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())
        opt.zero_grad()
        for i, p in enumerate(net.parameters()):
            assert torch.equal(p.detach(), want[step]["weights"][i])
    assert not any(opt.state.get(p) for p in net.parameters()), "SAM stored state"


@pytest.mark.parametrize("backend", ["foreach", "triton", "cpp", "cpp-fixed"])
def test_mixed_dtypes_share_one_global_norm(backend, device):
    """float32 and bfloat16 parameters form two buckets; the norm spans both."""
    backend_available(backend, device)

    def run(b):
        net = make_net(11, device=device)
        net.fc2.to(torch.bfloat16)
        opt = FSAM(net.parameters(), torch.optim.SGD, rho=0.2, **opt_args(b), lr=0.05, momentum=0.9)
        snaps = []
        for x, y in batches(12, 4, device=device):

            def loss():
                h = torch.tanh(net.norm(net.fc1(x)))
                return torch.nn.functional.mse_loss(net.fc2(h.bfloat16()).float(), y)

            loss().backward()
            opt.first_step(zero_grad=True)
            snaps.append([p.detach().float().clone() for p in net.parameters()])
            loss().backward()
            opt.second_step(zero_grad=True)
            snaps.append([p.detach().float().clone() for p in net.parameters()])
        return snaps

    want, got = run("reference"), run(backend)
    for s_got, s_want in zip(got, want):
        for a, b in zip(s_got, s_want):
            # bfloat16 tensors: one rounding of the same float32 value, so equal up to one ulp.
            torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-6)
