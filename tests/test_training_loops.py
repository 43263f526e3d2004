"""Training loops around FSAM (docs/training-loops.md): gradient accumulation against the
equivalent big batch, BatchNorm running statistics in the second pass, and the refusal of a
stale first-pass gradient (the case of frameworks that own the closure)."""

import copy

import pytest
import torch

from fsam_fused import FSAM, bn_frozen, disable_running_stats, enable_running_stats
from helpers import backend_available, loss_of, make_net, opt_args

BACKENDS = ["reference", "foreach", "cpp", "triton"]


def _data(seed, steps, n=32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 10, generator=g).to(device), torch.randn(n, 5, generator=g).to(device))
        for _ in range(steps)
    ]


def _opt(net, backend, **kw):
    return FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=0.1,
        sigma=1.0,
        lmbda=0.6,
        lr=0.05,
        momentum=0.9,
        **opt_args(backend),
        **kw,
    )


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_matches_the_big_batch(backend, device):
    """All micro-batches for the first pass, first_step, all micro-batches for the second
    pass, second_step: the big batch's step, to float tolerance. Also through
    step(closure) with a closure that runs every micro-batch."""
    if torch.device(device).type == "cuda" and backend == "cpp":
        pytest.skip("the C++ backend takes CPU tensors")
    backend_available(backend, device)
    k = 4
    big, acc, clo = (make_net(0, device=device) for _ in range(3))
    ob, oa, oc = _opt(big, backend), _opt(acc, backend), _opt(clo, backend)
    for x, y in _data(1, 4, device=device):
        micro = list(zip(x.chunk(k), y.chunk(k)))

        def backward_all(net):
            for xm, ym in micro:  # mean loss of equal micro-batches: divide by k
                (loss_of(net, xm, ym) / k).backward()

        loss_of(big, x, y).backward()
        ob.first_step(zero_grad=True)
        loss_of(big, x, y).backward()
        ob.second_step(zero_grad=True)

        backward_all(acc)
        oa.first_step(zero_grad=True)
        backward_all(acc)
        oa.second_step(zero_grad=True)

        backward_all(clo)
        oc.step(lambda: backward_all(clo))
        oc.zero_grad()
    for p, q, r in zip(big.parameters(), acc.parameters(), clo.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, q, rtol=0, atol=0)
    for p, q in zip(big.parameters(), acc.parameters()):
        if "ema" in ob.state[p]:
            torch.testing.assert_close(oa.state[q]["ema"], ob.state[p]["ema"], rtol=1e-5, atol=1e-6)


def test_first_step_per_micro_batch_is_not_accumulation():
    """The mistake the recipe prevents: a first_step per micro-batch perturbs k times and
    gives a different (wrong) step; the second call is refused outright."""
    net = make_net(0)
    opt = _opt(net, "auto")
    ((x, y),) = _data(2, 1)
    loss_of(net, x[:8], y[:8]).backward()
    opt.first_step()
    loss_of(net, x[8:16], y[8:16]).backward()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


# ----------------------------------------------------------------------------- BatchNorm


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("helper", ["bn_frozen", "disable_enable"])
def test_bn_frozen_second_pass_does_not_touch_running_stats(helper, device):
    torch.manual_seed(0)
    net = BNNet().to(device)
    plain = copy.deepcopy(net)
    opt, opt_plain = _opt(net, "auto"), _opt(plain, "auto")
    steps = 5
    for x, y in _data(3, steps, device=device):
        loss_of(net, x, y).backward()
        mean, var = net.bn.running_mean.clone(), net.bn.running_var.clone()
        # The oracle: one momentum update from this batch's statistics at w.
        h = net.fc1(x).detach()
        opt.first_step(zero_grad=True)
        if helper == "bn_frozen":
            with bn_frozen(net):
                loss_of(net, x, y).backward()
        else:
            disable_running_stats(net)
            loss_of(net, x, y).backward()
            enable_running_stats(net)
        assert torch.equal(net.bn.running_mean, mean) and torch.equal(net.bn.running_var, var)
        opt.second_step(zero_grad=True)
        del h
        loss_of(plain, x, y).backward()
        opt_plain.first_step(zero_grad=True)
        loss_of(plain, x, y).backward()
        opt_plain.second_step(zero_grad=True)
    assert int(net.bn.num_batches_tracked) == steps
    assert int(plain.bn.num_batches_tracked) == 2 * steps  # the problem it solves
    assert net.bn.track_running_stats
    # The second forward used the batch statistics, as in training: same trajectory as the
    # unfrozen run (the running stats do not enter a training-mode forward).
    for p, q in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bn_running_mean_is_one_update_per_step():
    torch.manual_seed(1)
    net = BNNet()
    opt = _opt(net, "auto")
    mom = net.bn.momentum
    for x, y in _data(4, 3):
        want = (1 - mom) * net.bn.running_mean + mom * net.fc1(x).detach().mean(0)
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        with bn_frozen(net):
            loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
        torch.testing.assert_close(net.bn.running_mean, want, rtol=1e-6, atol=1e-7)


def test_bn_frozen_restores_on_error_and_checks_its_argument():
    net = BNNet()
    with pytest.raises(ZeroDivisionError):
        with bn_frozen(net):
            raise ZeroDivisionError
    assert net.bn.track_running_stats
    with pytest.raises(TypeError, match="model"):
        with bn_frozen(object()):
            pass


# ----------------------------------------------------------------------------- closures


def test_closure_convention_is_told_by_the_gradients():
    """step(closure) runs the closure twice (both passes) when no gradient was written since
    the last step, and once (the second pass) after the caller's first backward, whichever
    way the gradients were cleared (tests/test_closures.py checks the math)."""
    net = make_net(0)
    opt = _opt(net, "auto")
    ((x, y),) = _data(5, 1)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(net, x, y)
        loss.backward()
        return loss

    def count(fn):
        calls.clear()
        fn()
        return len(calls)

    assert count(lambda: opt.step(closure)) == 2  # step 0: no gradient yet
    assert count(lambda: opt.step(closure)) == 2  # the gradients step 0 left, untouched
    opt.zero_grad()
    assert count(lambda: opt.step(closure)) == 2
    opt.zero_grad(set_to_none=False)
    assert count(lambda: opt.step(closure)) == 2
    opt.zero_grad(set_to_none=False)
    loss_of(net, x, y).backward()  # the caller's first pass, into zeroed gradients
    assert count(lambda: opt.step(closure)) == 1
    opt.zero_grad()
    loss_of(net, x, y).backward()  # into new gradient tensors
    assert count(lambda: opt.step(closure)) == 1
    # Explicit first/second steps replay whatever gradients are there (tests, benchmarks).
    opt.first_step()
    opt.second_step()
