"""Issue 14, item 6: ``fsam_fused.distributed.init_state`` with no load after it leaves
training unchanged (and a load, through ``load_state_dict`` or in place, is kept); the
BatchNorm helpers compose (nesting, mixing the two styles in any order); two parameters
sharing one ``.grad`` tensor step as if each had its own copy (gradient-weight and
weight-weight sharing stay refused)."""

from __future__ import annotations

import copy

import pytest
import torch

from fsam_fused import FSAM, bn_frozen, disable_running_stats, enable_running_stats
from fsam_fused.distributed import init_state
from helpers import backend_available, opt_args

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2)),
}


def _run(base, backend, prepare=None, steps=3, seed=0, closure=False):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(4, 5))]
    cls, kw = BASES[base]
    opt = FSAM(ps, cls, rho=0.2, sigma=1.0, lmbda=0.6, **opt_args(backend), **kw)
    if prepare is not None:
        prepare(opt)
    gen = torch.Generator().manual_seed(11)

    def grads():
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)

    for _ in range(steps):
        if closure:  # step(closure): the caller's first pass, the closure's second
            grads()
            opt.step(grads)
            opt.zero_grad()
            continue
        for step in (opt.first_step, opt.second_step):
            grads()
            step(zero_grad=True)
    return ps, opt


@pytest.mark.parametrize("closure", [False, True], ids=["two-pass", "closure"])
@pytest.mark.parametrize("backend", ["foreach", "cpp"])
@pytest.mark.parametrize("base", list(BASES))
def test_init_state_without_a_load_changes_nothing(base, backend, closure):
    backend_available(backend, "cpu")
    plain, o1 = _run(base, backend, closure=closure)
    templ, o2 = _run(base, backend, prepare=init_state, closure=closure)
    for a, b in zip(plain, templ):
        assert torch.equal(a, b)
        assert torch.equal(o1.state[a]["ema"], o2.state[b]["ema"])


@pytest.mark.parametrize("in_place", [False, True], ids=["load_state_dict", "in_place"])
def test_init_state_then_a_load_is_kept(in_place):
    """A checkpoint loaded into the template (by load_state_dict, or copied into its tensors
    in place as torch.distributed.checkpoint does) is what the next steps continue from."""
    ps, opt = _run("sgd", "foreach", steps=2)
    sd = copy.deepcopy(opt.state_dict())  # (the live tensors move on with the run)
    weights = [p.detach().clone() for p in ps]
    # the run continued: 1 more step from the checkpoint
    gen = torch.Generator().manual_seed(99)
    grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(2)]

    def one_step(ps, opt):
        for step, gs in zip((opt.first_step, opt.second_step), grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            step(zero_grad=True)

    one_step(ps, opt)
    cls, kw = BASES["sgd"]
    qs = [torch.nn.Parameter(w.clone()) for w in weights]
    fresh = FSAM(qs, cls, rho=0.2, sigma=1.0, lmbda=0.6, backend="foreach", **kw)
    init_state(fresh)
    if in_place:
        tmpl = fresh.state_dict()
        for k, v in tmpl["state"].items():
            v["ema"].copy_(sd["state"][k]["ema"])
        for k, v in tmpl["base_optimizer"]["state"].items():
            v["momentum_buffer"].copy_(sd["base_optimizer"]["state"][k]["momentum_buffer"])
    else:
        fresh.load_state_dict(sd)
    one_step(qs, fresh)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["ema"], fresh.state[q]["ema"])


def _bn_net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _tracking(net):
    return net[1].track_running_stats


def test_bn_helpers_nest_and_mix():
    net = _bn_net()
    # bn_frozen, then disable inside it, the block ends, then enable: tracking again.
    with bn_frozen(net):
        disable_running_stats(net)
        assert not _tracking(net)
    assert not _tracking(net)  # still disabled by disable_running_stats
    enable_running_stats(net)
    assert _tracking(net)
    # disable, then a bn_frozen block in which enable is called: frozen until the block ends.
    disable_running_stats(net)
    with bn_frozen(net):
        enable_running_stats(net)
        assert not _tracking(net)
    assert _tracking(net)
    # nested blocks, disable twice (as the authors' loop does), enable once.
    with bn_frozen(net):
        with bn_frozen(net):
            assert not _tracking(net)
        assert not _tracking(net)
    assert _tracking(net)
    disable_running_stats(net)
    disable_running_stats(net)
    enable_running_stats(net)
    assert _tracking(net)
    # a layer built without running stats keeps its setting
    net[1].track_running_stats = False
    with bn_frozen(net):
        disable_running_stats(net)
    enable_running_stats(net)
    assert not _tracking(net)


def test_bn_helpers_count_only_the_unfrozen_passes():
    net = _bn_net()
    x = torch.randn(8, 3)
    net(x)  # counted
    with bn_frozen(net):
        disable_running_stats(net)
        net(x)
    net(x)  # not: still disabled
    enable_running_stats(net)
    net(x)  # counted
    assert int(net[1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp", "cpp-fixed", "triton"])
def test_parameters_sharing_one_grad_tensor(backend):
    backend_available(backend, "cpu")
    torch.manual_seed(2)
    w0, v0 = torch.randn(6), torch.randn(6)
    results = []
    for shared in (True, False):
        w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
        opt = FSAM([w, v], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.5, **opt_args(backend))
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            for step in (opt.first_step, opt.second_step):
                g = torch.randn(6, generator=gen)
                w.grad = g
                v.grad = g if shared else g.clone()
                step()
        results.append((w.detach().clone(), v.detach().clone(), opt.state[w]["ema"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_grad_overlapping_another_grad_and_a_weight_is_refused():
    """Gradient-gradient sharing is allowed; a gradient that also overlaps a weight is not,
    even when another gradient starts between them in memory (a check of neighbours only
    would miss it)."""
    buf = torch.zeros(30)
    w = torch.nn.Parameter(torch.randn(10))
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3))
    opt = FSAM([w, a, b], torch.optim.SGD, lr=0.1, backend="foreach")
    w.data = buf[9:19]
    w.data.copy_(torch.randn(10))
    a.grad = buf[0:10]  # its last element is w's first
    b.grad = buf[2:5]  # inside a.grad: allowed on its own
    w.grad = torch.randn(10)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="share memory"):
        opt.first_step()
    assert torch.equal(w.detach(), before)
    a.grad = torch.randn(10)  # now only the two gradients share: fine
    b.grad = a.grad[2:5]
    opt.first_step()
    opt.second_step()
