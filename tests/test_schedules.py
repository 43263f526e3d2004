"""Perturbation schedules (``FSAM(schedule=...)``) against an independent float64 statement
of F-SAM with a schedule (SEMANTICS.md, "Perturbation schedules"): the EMA updated on every
step, the perturbation on the chosen steps, the base step on the one gradient otherwise;
the decisions re-derived here from the schedules' published rules, not from their code."""

import io
import math

import pytest
import torch

from fsam_fused import FSAM, Adaptive, Bernoulli, EveryK
from helpers import backend_available, lsq_grad64, opt_args

RHO, SIGMA, LMBDA, LR, EPS = 0.4, 0.8, 0.7, 0.1, 1e-12
STEPS = 10
BACKENDS = ["reference", "foreach", "cpp", "cpp-fixed", "triton"]


def _problem(seed):
    """A linear least-squares model and STEPS different batches (the gradient norm moves,
    so the adaptive rule has something to decide on)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, 16, 5, generator=g, dtype=torch.float64)
    xs = xs * torch.linspace(0.3, 2.0, STEPS, dtype=torch.float64)[
        torch.randperm(STEPS, generator=g)
    ].view(-1, 1, 1)
    ys = torch.randn(STEPS, 16, 2, generator=g, dtype=torch.float64)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    return xs, ys, w, b


class _Rule:
    """The decisions, from the rules as published (not fsam_fused's code)."""

    def __init__(self, kind, **kw):
        self.kind, self.kw, self.t = kind, kw, 0
        if kind == "bernoulli":
            self.gen = torch.Generator().manual_seed(kw["seed"])
        self.mu = self.s2 = 0.0
        self.prev = True

    def __call__(self, x):
        t, self.t = self.t, self.t + 1
        if self.kind == "every":
            return t % self.kw["k"] == 0
        if self.kind == "bernoulli":
            return torch.rand((), generator=self.gen).item() < self.kw["p"]
        # AE-SAM (Jiang et al. 2023): mu, then the variance against the new mu, then compare.
        d, T = 0.9, self.kw["T"]
        self.mu = d * self.mu + (1 - d) * x
        self.s2 = d * self.s2 + (1 - d) * (x - self.mu) ** 2
        c = self.kw["l1"] * min(t / T, 1) + self.kw["l2"] * (1 - min(t / T, 1))
        now = x >= self.mu + c * math.sqrt(self.s2)
        if self.kw.get("lagged"):
            now, self.prev = self.prev, now
        return now


def statement(rule, seed):
    """F-SAM (official order) with a schedule, plain SGD, float64; returns the weights, the
    EMA and the decisions."""
    xs, ys, w, b = _problem(seed)
    ps, m, taken = [w.clone(), b.clone()], None, []
    for x, y in zip(xs, ys):
        g = list(lsq_grad64(*ps, x, y))
        take = rule(float(sum((t * t).sum() for t in g)))
        taken.append(take)
        m_old = m
        m = (
            [t.clone() for t in g]
            if m is None
            else [LMBDA * mi + (1 - LMBDA) * gi for gi, mi in zip(g, m)]
        )
        if not take:  # the cheap step: EMA only, the base step on g
            ps = [p - LR * gi for p, gi in zip(ps, g)]
            continue
        d = g if m_old is None else [gi - SIGMA * mi for gi, mi in zip(g, m_old)]
        norm = math.sqrt(sum(float((t * t).sum()) for t in d))
        e = [RHO / (norm + EPS) * t for t in d]
        g2 = lsq_grad64(*[p + ei for p, ei in zip(ps, e)], x, y)
        ps = [p - LR * gi for p, gi in zip(ps, g2)]
    return ps, m, taken


SCHEDULES = {
    "every2": (lambda: EveryK(2), lambda: _Rule("every", k=2)),
    "every3": (lambda: EveryK(3), lambda: _Rule("every", k=3)),
    "bernoulli": (lambda: Bernoulli(0.5, seed=7), lambda: _Rule("bernoulli", p=0.5, seed=7)),
    "adaptive": (
        lambda: Adaptive(total_steps=STEPS, lambda1=-0.5, lambda2=0.5),
        lambda: _Rule("adaptive", T=STEPS, l1=-0.5, l2=0.5),
    ),
    "adaptive_lagged": (
        lambda: Adaptive(total_steps=STEPS, lambda1=-0.5, lambda2=0.5, lagged=True),
        lambda: _Rule("adaptive", T=STEPS, l1=-0.5, l2=0.5, lagged=True),
    ),
}


def _model(seed, backend, schedule, device="cpu", **kw):
    backend_available(backend, device)
    xs, ys, w, b = _problem(seed)
    lin = torch.nn.Linear(5, 2, device=device)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    opt = FSAM(
        lin.parameters(),
        torch.optim.SGD,
        rho=RHO,
        sigma=SIGMA,
        lmbda=LMBDA,
        lr=LR,
        schedule=schedule,
        **opt_args(backend),
        **kw,
    )
    data = [(x.float().to(device), y.float().to(device)) for x, y in zip(xs, ys)]
    return lin, opt, data


def _run(lin, opt, data, api, start=0, stop=STEPS):
    taken = []
    for x, y in data[start:stop]:
        loss_fn = lambda: torch.nn.functional.mse_loss(lin(x), y)  # noqa: B023, E731
        if api == "two_pass":
            loss_fn().backward()
            took = opt.first_step(zero_grad=True)
            assert opt.perturbed == took
            if took:
                loss_fn().backward()
            opt.second_step(zero_grad=True)
        elif api == "torch_closure":

            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert torch.isfinite(loss)
        else:  # the authors' closure convention
            loss_fn().backward()
            opt.step(lambda: loss_fn().backward())
            opt.zero_grad()
        taken.append(opt.last_perturbed)
    return taken


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_against_the_statement(name, backend):
    seed = 11 + list(SCHEDULES).index(name)
    make, rule = SCHEDULES[name]
    lin, opt, data = _model(seed, backend, make())
    taken = _run(lin, opt, data, "two_pass")
    r = rule()
    want, m, want_taken = statement(r, seed)
    assert taken == want_taken
    if r.kind == "adaptive":  # the running statistics themselves
        assert math.isclose(opt.schedule.mu.item(), r.mu, rel_tol=1e-5)
        assert math.isclose(opt.schedule.s2.item(), r.s2, rel_tol=1e-4)
    assert True in taken and False in taken, taken  # both kinds of step were exercised
    for p, q in zip((lin.weight, lin.bias), want):
        torch.testing.assert_close(p.detach().double(), q, rtol=2e-5, atol=2e-6)
    for p, q in zip((lin.weight, lin.bias), m):
        torch.testing.assert_close(opt.state[p]["ema"].double(), q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("api", ["torch_closure", "authors_closure"])
@pytest.mark.parametrize("name", ["every2", "adaptive"])
def test_closures_skip_the_second_pass_on_cheap_steps(api, name):
    seed = 23
    make, rule = SCHEDULES[name]
    lin, opt, data = _model(seed, "cpp", make())
    calls = []
    orig = lin.forward
    lin.forward = lambda x: (calls.append(1), orig(x))[1]
    taken = _run(lin, opt, data, api)
    want, _, want_taken = statement(rule(), seed)
    assert taken == want_taken
    # One forward per step, a second one on the perturbed steps only.
    assert len(calls) == STEPS + sum(taken)
    for p, q in zip((lin.weight, lin.bias), want):
        torch.testing.assert_close(p.detach().double(), q, rtol=2e-5, atol=2e-6)


def test_default_is_every_step_and_first_step_says_so():
    lin, opt, data = _model(3, "cpp", None)
    assert _run(lin, opt, data, "two_pass") == [True] * STEPS
    want, _, _ = statement(_Rule("every", k=1), 3)
    for p, q in zip((lin.weight, lin.bias), want):
        torch.testing.assert_close(p.detach().double(), q, rtol=2e-5, atol=2e-6)


def test_a_second_pass_on_a_cheap_step_is_refused_before_the_base_step():
    lin, opt, data = _model(4, "cpp", EveryK(2))
    _run(lin, opt, data, "two_pass", 0, 1)  # step 0 perturbs; step 1 is cheap
    x, y = data[1]
    torch.nn.functional.mse_loss(lin(x), y).backward()
    assert opt.first_step(zero_grad=True) is False
    assert not opt.perturbed
    w = [p.detach().clone() for p in lin.parameters()]
    torch.nn.functional.mse_loss(lin(x), y).backward()  # the mistake: a second backward
    with pytest.raises(RuntimeError, match="cheap step"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w))  # no base step
    opt.zero_grad()
    _run(lin, opt, data, "two_pass", 2, 4)  # and the optimizer goes on


def test_a_cheap_step_writes_only_the_ema():
    lin, opt, data = _model(5, "cpp", EveryK(2))
    _run(lin, opt, data, "two_pass", 0, 1)
    x, y = data[1]
    torch.nn.functional.mse_loss(lin(x), y).backward()
    ws = [(p.data_ptr(), p._version, p.detach().clone()) for p in lin.parameters()]
    saved = [(s, s._version) for b in opt.engine.plan.buckets for s in b.saved]
    emas = [opt.state[p]["ema"].clone() for p in lin.parameters()]
    assert opt.first_step() is False
    for p, (ptr, v, w) in zip(lin.parameters(), ws):
        assert (p.data_ptr(), p._version) == (ptr, v) and torch.equal(p, w)
    assert all(s._version == v for s, v in saved)
    assert not any(torch.equal(opt.state[p]["ema"], m) for p, m in zip(lin.parameters(), emas))
    opt.second_step()
    summary = opt.plan_summary()[0]
    # g read twice (the norm, then the EMA pass), m read and written: 16 B/param in float32.
    assert summary.cheap_bytes_per_step == 16 * summary.numel


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_resume_continues_bit_for_bit(name):
    make, _ = SCHEDULES[name]
    lin, opt, data = _model(31, "cpp", make())
    whole = _run(lin, opt, data, "two_pass")
    ref = [p.detach().clone() for p in lin.parameters()]
    lin2, opt2, _ = _model(31, "cpp", make())
    first = _run(lin2, opt2, data, "two_pass", 0, STEPS // 2)
    buf = io.BytesIO()
    torch.save({"model": lin2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    lin3, opt3, _ = _model(99, "cpp", make())  # another init: everything comes from the file
    lin3.load_state_dict(ck["model"])
    opt3.load_state_dict(ck["opt"])
    rest = _run(lin3, opt3, data, "two_pass", STEPS // 2, STEPS)
    assert first + rest == whole
    assert all(torch.equal(p, q) for p, q in zip(lin3.parameters(), ref))


def test_loading_another_schedule_changes_nothing():
    lin, opt, data = _model(6, "cpp", EveryK(2))
    _run(lin, opt, data, "two_pass", 0, 3)
    sd = opt.state_dict()
    lin2, opt2, _ = _model(6, "cpp", Bernoulli(0.5))
    before = opt2.state_dict()
    with pytest.raises(ValueError, match="schedule"):
        opt2.load_state_dict(sd)
    assert opt2.schedule.steps == 0
    gen = before["fsam"]["schedule"]["generator"]
    assert torch.equal(opt2.schedule.generator.get_state(), gen)
    lin3, opt3, _ = _model(6, "cpp", None)
    with pytest.warns(UserWarning, match="schedule"):
        opt3.load_state_dict(sd)


def test_a_scheduler_may_change_k_p_and_the_threshold():
    sched = EveryK(2)
    lin, opt, data = _model(8, "cpp", sched)
    taken = _run(lin, opt, data, "two_pass", 0, 4)
    sched.k = 3
    taken += _run(lin, opt, data, "two_pass", 4, 10)
    assert taken == [t % 2 == 0 if t < 4 else t % 3 == 0 for t in range(10)]
    b = Bernoulli(0.5, seed=1)
    lin, opt, data = _model(8, "cpp", b)
    b.p = 0.0
    assert _run(lin, opt, data, "two_pass", 0, 3) == [False] * 3
    b.p = 1.0
    assert _run(lin, opt, data, "two_pass", 3, 6) == [True] * 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EveryK(0), "k must be an int >= 1"),
        (lambda: EveryK(2.0), "k must be an int >= 1"),
        (lambda: Bernoulli(1.5), "p"),
        (lambda: Adaptive(total_steps=0), "total_steps"),
        (lambda: Adaptive(total_steps=10, delta=1.0), "delta"),
        (
            lambda: FSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, schedule=2),
            "schedule",
        ),
    ],
)
def test_bad_settings_are_named(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_a_bad_value_set_later_is_named_before_anything_changes():
    sched = EveryK(2)
    lin, opt, data = _model(9, "cpp", sched)
    _run(lin, opt, data, "two_pass", 0, 1)
    sched.k = 0
    x, y = data[1]
    torch.nn.functional.mse_loss(lin(x), y).backward()
    w = [p.detach().clone() for p in lin.parameters()]
    m = [opt.state[p]["ema"].clone() for p in lin.parameters()]
    with pytest.raises(ValueError, match="schedule.k"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w))
    assert all(torch.equal(opt.state[p]["ema"], q) for p, q in zip(lin.parameters(), m))
    assert sched.steps == 1 and not opt.perturbed


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nonfinite_cheap_step_keeps_the_ema_and_the_statistics(backend):
    sched = Adaptive(total_steps=STEPS)
    lin, opt, data = _model(10, backend, sched, skip_nonfinite=True)
    _run(lin, opt, data, "two_pass", 0, 3)
    mu, s2 = sched.mu.clone(), sched.s2.clone()
    m = [opt.state[p]["ema"].clone() for p in lin.parameters()]
    w = [p.detach().clone() for p in lin.parameters()]
    x, y = data[3]
    torch.nn.functional.mse_loss(lin(x), y).backward()
    lin.weight.grad[0, 0] = float("inf")
    assert opt.first_step() is False  # a non-finite statistic never perturbs
    opt.second_step()
    assert opt.found_nonfinite().item() == 1.0
    assert torch.equal(sched.mu, mu) and torch.equal(sched.s2, s2)
    assert all(torch.equal(opt.state[p]["ema"], q) for p, q in zip(lin.parameters(), m))
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w))


@pytest.mark.parametrize("name", ["every2", "adaptive"])
def test_grad_scaler_with_a_schedule(name):
    """fp32 weights under a GradScaler (scale 2**8: exact) give the unscaled trajectory; an
    inf on a cheap step skips it (weights and EMA kept) and backs the scale off."""
    make, _ = SCHEDULES[name]
    lin, opt, data = _model(12, "cpp", make())
    want = _run(lin, opt, data, "two_pass")
    ref = [p.detach().clone() for p in lin.parameters()]
    lin, opt, data = _model(12, "cpp", make())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    taken = []
    for x, y in data:
        loss_fn = lambda: torch.nn.functional.mse_loss(lin(x), y)  # noqa: B023, E731
        scaler.scale(loss_fn()).backward()
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            scaler.scale(loss_fn()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        taken.append(opt.last_perturbed)
    assert taken == want
    for p, q in zip(lin.parameters(), ref):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
    # An inf on a cheap step (every2: step 10 is perturbed, 11 cheap).
    if name == "every2":
        x, y = data[0]
        for inject in (False, True):
            scaler.scale(torch.nn.functional.mse_loss(lin(x), y)).backward()
            if inject:
                lin.bias.grad[0] = float("inf")
                w = [p.detach().clone() for p in lin.parameters()]
                m = [opt.state[p]["ema"].clone() for p in lin.parameters()]
                scale = scaler.get_scale()
            if opt.first_step(zero_grad=True, grad_scaler=scaler):
                scaler.scale(torch.nn.functional.mse_loss(lin(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert opt.last_perturbed is False
        assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w))
        assert all(torch.equal(opt.state[p]["ema"], q) for p, q in zip(lin.parameters(), m))
        assert scaler.get_scale() < scale


def test_schedules_survive_a_copy():
    import copy

    lin, opt, data = _model(13, "cpp", Bernoulli(0.5, seed=3))
    _run(lin, opt, data, "two_pass", 0, 3)
    twin = copy.deepcopy(opt)
    assert twin.schedule is not opt.schedule
    assert twin.schedule.state_dict()["steps"] == 3
    assert torch.equal(twin.schedule.generator.get_state(), opt.schedule.generator.get_state())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sam_with_a_schedule_is_sgd_on_cheap_steps(backend):
    from fsam_fused import SAM

    backend_available(backend, "cpu")
    xs, ys, w, b = _problem(14)
    lin = torch.nn.Linear(5, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    opt = SAM(
        lin.parameters(), torch.optim.SGD, rho=RHO, lr=LR, backend=backend, schedule=EveryK(3)
    )
    data = [(x.float(), y.float()) for x, y in zip(xs, ys)]
    assert _run(lin, opt, data, "two_pass") == [t % 3 == 0 for t in range(STEPS)]
    ps = [w.clone(), b.clone()]  # SAM every 3rd step, SGD otherwise, in float64
    for t, (x, y) in enumerate(zip(xs, ys)):
        g = lsq_grad64(*ps, x, y)
        if t % 3 == 0:
            norm = math.sqrt(sum(float((u * u).sum()) for u in g))
            g = lsq_grad64(*[p + RHO / (norm + EPS) * u for p, u in zip(ps, g)], x, y)
        ps = [p - LR * u for p, u in zip(ps, g)]
    for p, q in zip((lin.weight, lin.bias), ps):
        torch.testing.assert_close(p.detach().double(), q, rtol=2e-5, atol=2e-6)
    assert not opt.state  # no EMA


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["every2", "adaptive", "adaptive_lagged"])
@pytest.mark.parametrize("backend", ["triton", "foreach"])
def test_schedule_on_cuda_against_the_statement(name, backend):
    """The cheap step on CUDA tensors (plain torch passes), the adaptive statistic on the
    device, the lagged decision through pinned memory and an event."""
    seed = 41
    make, rule = SCHEDULES[name]
    lin, opt, data = _model(seed, backend, make(), device="cuda")
    taken = _run(lin, opt, data, "two_pass")
    want, m, want_taken = statement(rule(), seed)
    assert taken == want_taken
    for p, q in zip((lin.weight, lin.bias), want):
        torch.testing.assert_close(p.detach().double().cpu(), q, rtol=2e-5, atol=2e-6)


@pytest.mark.cuda
def test_adaptive_statistics_saved_on_cpu_resume_on_cuda():
    make, _ = SCHEDULES["adaptive"]
    lin, opt, data = _model(42, "reference", make())
    _run(lin, opt, data, "two_pass", 0, STEPS // 2)
    sd, model_sd = opt.state_dict(), {k: v.clone() for k, v in lin.state_dict().items()}
    assert sd["fsam"]["schedule"]["mu"].device.type == "cpu"
    rest_cpu = _run(lin, opt, data, "two_pass", STEPS // 2, STEPS)
    lin2, opt2, cuda_data = _model(42, "foreach", make(), device="cuda")
    lin2.load_state_dict(model_sd)
    opt2.load_state_dict(sd)
    assert _run(lin2, opt2, cuda_data, "two_pass", STEPS // 2, STEPS) == rest_cpu
    assert opt2.schedule.mu.device.type == "cuda"
    for p, q in zip(lin.parameters(), lin2.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_inv", [False, True])
def test_norm_pass_sums_the_gradient_squares_from_the_same_read(dtype, with_inv):
    """The C++ norm_sq's optional grad_sq output: bit for bit the cheap step's first pass
    (norm_sq without EMA or |w|), and the norm itself unchanged."""
    backend_available("cpp", "cpu")
    from fsam_fused.ops import cpp as ops
    from helpers import cpp_rows, cpp_scalars

    g = torch.Generator().manual_seed(5)
    n = [70000, 33, 1000]  # several chunks, a vector tail, a scalar tail
    w = [torch.randn(k, generator=g).to(dtype) for k in n]
    gr = [torch.randn(k, generator=g).to(dtype) for k in n]
    m = [torch.randn(k, generator=g) for k in n]
    rows = cpp_rows([0, 1, 0], [0.9] * 3, [0.1] * 3, [0.05] * 3)
    scalars = cpp_scalars(0.8, 1e-12)
    inv = torch.tensor([0.25]) if with_inv else None
    out = torch.full((1,), float("nan"))
    got = ops.norm_sq(w, gr, m, rows, scalars, False, inv, out)
    assert torch.equal(got, ops.norm_sq(w, gr, m, rows, scalars, False, inv))
    plain = torch.zeros(3, 4)
    assert torch.equal(out, ops.norm_sq(w, gr, [], plain, scalars, False, inv))
    with pytest.raises(RuntimeError, match="grad_sq must be"):
        ops.norm_sq(w, gr, m, rows, scalars, False, inv, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_sq.*overlaps"):
        ops.norm_sq(w, gr, m, rows, scalars, False, inv, gr[0].view(torch.float32)[:1])


@pytest.mark.parametrize("lagged", [False, True])
def test_the_adaptive_statistic_reads_the_gradients_once_more_only_unlagged(lagged, monkeypatch):
    from fsam_fused.backends.cpp import CppBackend

    calls = []
    orig = CppBackend.grad_sq
    monkeypatch.setattr(
        CppBackend, "grad_sq", lambda self, b, x: (calls.append(1), orig(self, b, x))[1]
    )
    sched = Adaptive(total_steps=STEPS, lambda1=-0.5, lambda2=0.5, lagged=lagged)
    lin, opt, data = _model(15, "cpp", sched)
    taken = _run(lin, opt, data, "two_pass")
    assert True in taken and False in taken
    # Unlagged: a separate read every step (the decision picks the passes); lagged: only
    # the cheap steps' own first pass (the norm pass sums g**2 on the perturbing ones).
    assert len(calls) == (STEPS if not lagged else taken.count(False))


def test_a_schedule_is_refused_where_steps_are_compiled_or_captured():
    """A schedule decides on the host which passes run: capturable=True refuses it (at
    construction and when set), and the frozen first_step (torch.compile) names why."""
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="schedule.*torch.compile or CUDA-graph capture"):
        FSAM(p, torch.optim.SGD, lr=0.1, capturable=True, schedule=EveryK(2))
    opt = FSAM(p, torch.optim.SGD, lr=0.1, capturable=True)
    with pytest.raises(ValueError, match="schedule"):
        opt.schedule = EveryK(2)
    assert opt.schedule is None
    from fsam_fused import compiled

    opt = FSAM(p, torch.optim.SGD, lr=0.1, schedule=EveryK(2))
    with pytest.raises(RuntimeError, match="cannot run under torch.compile"):
        compiled.first_step(opt, zero_grad=False)
