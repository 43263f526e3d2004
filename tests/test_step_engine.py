"""The step engine's guarantees: first_step is all-or-nothing (an error in a later bucket,
an interrupt), the global norm spans every bucket (checked against float64 arithmetic on the
perturbation itself), and copies of the optimizer step like the original."""

import _thread
import copy
import io
import pickle

import pytest
import torch

from fsam_fused import FSAM, backends, reduce
from helpers import backend_available, opt_args

BACKENDS = ["reference", "foreach", "triton", "cpp", "cpp-fixed"]


def _two_buckets(seed=0):
    """A float32 and a bfloat16 parameter list: two buckets, the bfloat16 one larger (it
    commits last)."""
    g = torch.Generator().manual_seed(seed)
    small = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5, 300)]
    large = [torch.nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in (700, 33)]
    return small, large


def _grads(ps, gen):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _snapshot(opt, ps):
    return (
        [p.detach().clone() for p in ps],
        {id(p): opt.state[p]["ema"].clone() for p in ps if "ema" in opt.state.get(p, {})},
        copy.deepcopy(opt.base_optimizer.state_dict()),
    )


def _assert_same(opt, ps, snap, what):
    w, m, base = snap
    assert all(torch.equal(p.detach(), x) for p, x in zip(ps, w)), f"{what}: weights changed"
    now = {id(p): opt.state[p]["ema"] for p in ps if "ema" in opt.state.get(p, {})}
    assert now.keys() == m.keys(), f"{what}: EMA entries changed"
    assert all(torch.equal(now[k], m[k]) for k in m), f"{what}: EMA changed"
    b = opt.base_optimizer.state_dict()
    assert b["state"].keys() == base["state"].keys(), f"{what}: base state changed"
    for k, s in base["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(b["state"][k][key]), torch.as_tensor(v)), what


def _opt(ps, backend, **kw):
    return FSAM(
        [{"params": ps[:2]}, {"params": ps[2:], "rho": 0.3}],
        torch.optim.SGD,
        rho=0.1,
        sigma=1.0,
        lmbda=0.6,
        lr=0.1,
        momentum=0.9,
        **opt_args(backend),
        **kw,
    )


def _fail_on_call(monkeypatch, backend, method, n, exc):
    """Make the n-th call (1-based) of ``method`` on the backend's class raise ``exc``."""
    cls = backends.CLASSES["cpp" if backend.startswith("cpp") else backend]
    original = getattr(cls, method)
    calls = []

    def wrapped(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(self, *a, **k)

    monkeypatch.setattr(cls, method, wrapped)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["norm", "perturb"])
@pytest.mark.parametrize(
    "exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_failure_in_a_later_bucket_changes_nothing(backend, method, exc, monkeypatch):
    """Two buckets; the second's pass fails after the first's perturbation: the weights, the
    EMA and the base optimizer's state are exactly what they were before first_step."""
    backend_available(backend, "cpu")
    small, large = _two_buckets()
    ps = small + large
    opt = _opt(ps, backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # EMA and momentum exist, the plan is reused
        _grads(ps, gen)
        opt.first_step()
        _grads(ps, gen)
        opt.second_step()
    _grads(ps, gen)
    snap = _snapshot(opt, ps)
    assert [s.numel for s in opt.plan_summary()] == [305, 733]
    _fail_on_call(monkeypatch, backend, method, 2, exc)
    with pytest.raises(type(exc)):
        opt.first_step()
    _assert_same(opt, ps, snap, f"{backend} {method}")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()  # nothing is perturbed
    opt.first_step()  # and the optimizer works afterwards
    opt.second_step()


def test_the_engine_perturbs_the_largest_bucket_last():
    """The commit order the failure policy relies on (the last bucket needs no EMA backup),
    seen from outside: the order of the perturb calls."""
    small, large = _two_buckets()
    ps = large + small  # group order: the large bucket first
    opt = FSAM(ps, torch.optim.SGD, lr=0.1, backend="foreach")
    seen = []
    original = backends.ForeachBackend.perturb

    def spy(self, b, *args):
        seen.append(b.dtype)
        return original(self, b, *args)

    backends.ForeachBackend.perturb = spy
    try:
        _grads(ps, torch.Generator().manual_seed(0))
        opt.first_step()
    finally:
        backends.ForeachBackend.perturb = original
    opt.second_step()
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_interrupt_while_writing_is_held_then_raised_with_weights_restored(backend):
    """SIGINT arriving while the buckets are written (here: raised by interrupt_main inside
    the first bucket's perturbation) is held until the step is written, then the weights are
    restored bit for bit and KeyboardInterrupt is raised; the EMA keeps this step's update,
    as after a failed second pass."""
    backend_available(backend, "cpu")
    cls = backends.CLASSES[backend]
    runs = {}
    for interrupt in (False, True):
        small, large = _two_buckets()
        ps = small + large
        opt = _opt(ps, backend)
        gen = torch.Generator().manual_seed(2)
        _grads(ps, gen)
        opt.first_step()
        _grads(ps, gen)
        opt.second_step()
        _grads(ps, gen)
        before = [p.detach().clone() for p in ps]
        original = cls.perturb
        if interrupt:

            def hit(self, *a, **k):
                _thread.interrupt_main()
                return original(self, *a, **k)

            cls.perturb = hit
        try:
            if interrupt:
                with pytest.raises(KeyboardInterrupt):
                    opt.first_step()
                assert all(torch.equal(p.detach(), x) for p, x in zip(ps, before))
                opt.state_dict()  # not perturbed: a checkpoint can be taken
            else:
                opt.first_step()
                opt.abandon_step()
        finally:
            cls.perturb = original
        runs[interrupt] = [opt.state[p]["ema"].clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))


def test_interrupt_during_the_norm_pass_changes_nothing():
    small, large = _two_buckets()
    ps = small + large
    opt = _opt(ps, "foreach")
    gen = torch.Generator().manual_seed(3)
    _grads(ps, gen)
    opt.first_step()
    _grads(ps, gen)
    opt.second_step()
    _grads(ps, gen)
    snap = _snapshot(opt, ps)
    original = backends.ForeachBackend.norm

    def hit(self, *a, **k):
        _thread.interrupt_main()
        return original(self, *a, **k)

    backends.ForeachBackend.norm = hit
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.first_step()
    finally:
        backends.ForeachBackend.norm = original
    _assert_same(opt, ps, snap, "interrupt in norm")


# ------------------------------------------------------------------ the global norm


def _float64_perturbation(ws, gs, ms, groups, rhos, sigma):
    """e per parameter from SEMANTICS.md in float64: d = g - sigma * m, one norm over every
    parameter of every group and dtype, e = rho_group / (N + eps) * d."""
    d = [g.double() - sigma * m.double() for g, m in zip(gs, ms)]
    norm = torch.sqrt(sum((x * x).sum() for x in d))
    return [rhos[grp] / (norm + 1e-12) * x for x, grp in zip(d, groups)]


def _check_global_norm(backend):
    gen = torch.Generator().manual_seed(11)
    # Small weights so a bfloat16 ulp is far below the perturbation (e ~ rho / sqrt(n)).
    shapes = [(40,), (7, 9), (1000,), (33,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    groups = [0, 0, 1, 1]
    rhos = (0.2, 0.7)
    ps = [
        torch.nn.Parameter((0.01 * torch.randn(s, generator=gen)).to(dt))
        for s, dt in zip(shapes, dtypes)
    ]
    opt = FSAM(
        [{"params": ps[:2], "rho": rhos[0]}, {"params": ps[2:], "rho": rhos[1]}],
        torch.optim.SGD,
        sigma=1.0,
        lmbda=0.5,
        lr=0.0,
        **opt_args(backend),
    )
    ms = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for step in range(2):
        gs = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dtypes)]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        w = [p.detach().double().clone() for p in ps]
        opt.first_step()
        e = [p.detach().double() - x for p, x in zip(ps, w)]
        want = _float64_perturbation(w, gs, ms, groups, rhos, sigma=1.0 if step else 0.0)
        for i, (got, exp, dt) in enumerate(zip(e, want, dtypes)):
            # float32: rounding of w + e; bfloat16: half an ulp of w + e, plus float32 slack.
            ulp = torch.finfo(dt).eps * (w[i] + exp).abs()
            tol = (ulp / 2 if dt == torch.bfloat16 else ulp) + 1e-6 * exp.abs().max()
            assert bool(((got - exp).abs() <= tol).all()), (
                f"{backend} step {step} e[{i}] ({dt}): max error {(got - exp).abs().max():.3g}"
            )
        opt.second_step()
        # The official order: the first step seeds m <- g; afterwards m <- 0.5 m + 0.5 g.
        ms = [g.double() if step == 0 else 0.5 * m + 0.5 * g.double() for m, g in zip(ms, gs)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbation_uses_one_norm_over_every_bucket_against_float64(backend):
    """float32 and bfloat16 parameters (two buckets) in two rho groups, one step: the
    perturbation e itself (not w + e) against float64 arithmetic."""
    backend_available(backend, "cpu")
    _check_global_norm(backend)


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_the_global_norm_check_catches_a_per_bucket_norm(backend, monkeypatch):
    """The mutation the check exists for: each bucket normalised alone."""
    backend_available(backend, "cpu")
    monkeypatch.setattr(reduce, "combine", lambda parts, buckets: list(parts))
    with pytest.raises(AssertionError, match="max error"):
        _check_global_norm(backend)


# ------------------------------------------------------------------ copies


def _model_and_opt(backend, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    opt = FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=0.2,
        sigma=0.8,
        lmbda=0.7,
        lr=0.05,
        momentum=0.9,
        ema_order="paper",
        **opt_args(backend),
    )
    return net, opt


def _train(net, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)


def _bits(ts):
    return [t.detach().clone().view(torch.int32) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_between_steps_steps_bit_for_bit_like_the_original(backend, how):
    backend_available(backend, "cpu")
    net, opt = _model_and_opt(backend)
    _train(net, opt, 2, seed=5)
    bundle = {"net": net, "opt": opt}
    if how == "deepcopy":
        twin = copy.deepcopy(bundle)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(bundle))
    else:
        buf = io.BytesIO()
        torch.save(bundle, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    net2, opt2 = twin["net"], twin["opt"]
    for attr in ("sigma", "lmbda", "ema_order", "backend", "ema_dtype", "fixed_addresses"):
        assert getattr(opt2, attr) == getattr(opt, attr), attr
    assert type(opt2.base_optimizer) is torch.optim.SGD
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert all(q is p for q, p in zip(opt2.param_groups[0]["params"], net2.parameters()))
    _train(net, opt, 3, seed=6)
    _train(net2, opt2, 3, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(_bits(net.parameters()), _bits(net2.parameters())))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(opt.state[p]["ema"], opt2.state[q]["ema"])
        assert opt.state[p]["ema"].data_ptr() != opt2.state[q]["ema"].data_ptr()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copying_mid_step_says_the_weights_are_perturbed(how):
    net, opt = _model_and_opt("foreach")
    net(torch.randn(2, 6)).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        copy.deepcopy(opt) if how == "deepcopy" else pickle.dumps(opt)
    opt.second_step()
    copy.deepcopy(opt)
