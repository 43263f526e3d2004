"""torch.compile of F-SAM steps on the CPU (C++ backend; Triton in its interpreter): both halves under
``fullgraph=True`` equal to eager bit for bit with every value changing every step and no
recompile; a whole training step whose graph breaks are none of fsam_fused's
(``docs/compile.md``)."""

import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters

import fsam_fused
from fsam_fused import FSAM
from helpers import backend_available, make_net

PACKAGE = os.path.dirname(os.path.abspath(fsam_fused.__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _xy(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randn(n, 5, generator=g)


def _values():
    """rho (one per group), sigma, lmbda as float64 tensors and lr as a float32 tensor (the
    compiled-optimizer recipe): changed in place every step."""
    f64 = dict(dtype=torch.float64)
    return dict(
        rhos=[torch.tensor(0.05, **f64), torch.tensor(0.1, **f64)],
        sigma=torch.tensor(0.5, **f64),
        lmbda=torch.tensor(0.9, **f64),
        lr=torch.tensor(0.05),
    )


def _schedule(v, k):
    v["rhos"][0].fill_(0.03 + 0.004 * k)
    v["rhos"][1].fill_(0.2 - 0.005 * k)
    v["sigma"].fill_(0.3 + 0.03 * k)
    v["lmbda"].fill_(0.9 - 0.02 * k)
    v["lr"].fill_(0.05 / (1 + k))


def _make(backend="cpp", float_values=False):
    net = make_net(7)
    v = _values()
    groups = net.groups(0.05, adaptive=True)
    if not float_values:
        for g, r in zip(groups, v["rhos"]):
            g["rho"] = r
    kw = dict(lr=v["lr"], momentum=0.9)
    if float_values:
        kw = dict(lr=0.05, momentum=0.9)
    opt = FSAM(
        groups,
        torch.optim.SGD,
        sigma=float(v["sigma"]) if float_values else v["sigma"],
        lmbda=float(v["lmbda"]) if float_values else v["lmbda"],
        backend=backend,
        fixed_addresses=backend == "cpp",
        **kw,
    )
    return net, opt, v


def _trajectory(net, opt, v, first, second, steps, warm=2, values=True):
    """``warm`` eager steps then ``steps`` steps through ``first``/``second``; gradients
    produced outside. Returns weights and EMAs after every half."""
    x, y = _xy(11)
    loss = lambda: torch.nn.functional.mse_loss(net(x), y)  # noqa: E731
    out = []
    for k in range(warm + steps):
        if values:
            _schedule(v, k)
        eager = k < warm
        loss().backward()
        (opt.first_step if eager else first)()
        opt.zero_grad()
        out.append([p.detach().clone() for p in net.parameters()])
        loss().backward()
        (opt.second_step if eager else second)()
        opt.zero_grad()
        out.append(
            [p.detach().clone() for p in net.parameters()]
            + [opt.state[p]["ema"].clone() for p in net.parameters() if p in opt.state]
        )
    return out


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_halves_compile_fullgraph_equal_eager_without_recompiles(backend):
    """first_step and second_step, each alone under torch.compile(fullgraph=True) (Inductor),
    over 20 steps while every group's rho, sigma, lmbda and the base lr (tensors) change each
    step: no recompile (one graph per half), and every weight and EMA after every half equal
    bit for bit to eager FSAM's. The eager run's base step is compiled too: torch's SGD with
    a tensor lr rounds differently eager (add_ with alpha: a fused multiply-add) and traced
    (a multiply, then an add), by one ulp; that is torch's, measured against a plain eager
    run below. (Triton: CPU tensors in its interpreter.)"""
    backend_available(backend, "cpu")
    from fsam_fused.kernels import fsam as K

    uploads = []
    real = K._upload
    K._upload = lambda *a: uploads.append(1) or real(*a)
    net, opt, v = _make(backend)
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True)
    f2 = torch.compile(lambda: opt.second_step(), fullgraph=True)
    first = []
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = _trajectory(net, opt, v, lambda: (f1(), first.append(len(uploads))), f2, 20)
    finally:
        K._upload = real
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    # Triton: after the frozen launcher's first call, one upload a step: the gradient table
    # (zero_grad() frees the gradients); a compiled graph's fresh copy of the rows re-uploads
    # no static table. (The C++ backend uploads nothing.)
    steps = [b - a for a, b in zip(first, first[1:])]
    assert steps == [1 if backend == "triton" else 0] * 19, first

    # Oracle 1: eager FSAM (its plan, checks and value refresh; the same C++ passes), the
    # base optimizer's step compiled alone from the third step on, as in the compiled run.
    net2, opt2, v2 = _make(backend)
    base = opt2.base_optimizer
    plain = base.step
    compiled_base = torch.compile(plain)

    def second():
        base.step = compiled_base
        opt2.second_step()

    want = _trajectory(net2, opt2, v2, opt2.first_step, second, 20)
    base.step = plain
    assert len(got) == len(want) == 44
    for k, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b)
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), (k, i, (p - q).abs().max())

    # Oracle 2: the reference backend (plain torch, another code path), all eager.
    net3, opt3, v3 = _make(backend="reference")
    ref = _trajectory(net3, opt3, v3, opt3.first_step, opt3.second_step, 20)
    for k, (a, b) in enumerate(zip(got, ref)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"half-step {k}")


def test_the_values_reach_the_compiled_graph():
    """The compiled step reads this step's values, not the ones it was traced with: with
    rho changed (in place) to 0 after tracing, first_step leaves the weights as they are;
    with it back, they move."""
    backend_available("cpp", "cpu")
    net, opt, v = _make()
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True)
    f2 = torch.compile(lambda: opt.second_step(), fullgraph=True)
    _trajectory(net, opt, v, f1, f2, 1)
    x, y = _xy(12)
    for r in v["rhos"]:
        r.fill_(0.0)
    torch.nn.functional.mse_loss(net(x), y).backward()
    w = [p.detach().clone() for p in net.parameters()]
    f1()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w))
    f2()
    opt.zero_grad()
    for r in v["rhos"]:
        r.fill_(0.5)
    torch.nn.functional.mse_loss(net(x), y).backward()
    w = [p.detach().clone() for p in net.parameters()]
    f1()
    moved = {n for (n, p), q in zip(net.named_parameters(), w) if not torch.equal(p, q)}
    f2()
    # (the unused parameter has no gradient: it never moves)
    assert moved == {n for n, _ in net.named_parameters()} - {"unused"}, moved


def _breaks_in_package(explained):
    """The graph breaks whose user stack has a frame in fsam_fused."""
    out = []
    for b in explained.break_reasons:
        frames = [f for f in b.user_stack if os.path.abspath(f.filename).startswith(PACKAGE)]
        if frames:
            first = b.reason.splitlines()[0]
            out.append((first, [(f.filename, f.lineno) for f in frames]))
    return out


@pytest.mark.parametrize("capturable", [False, True])
def test_a_training_step_has_no_graph_break_from_fsam_fused(capturable):
    """forward, backward, first_step, forward, backward, second_step under torch.compile
    (default mode): torch._dynamo.explain finds graph breaks (the two backward calls) but
    none whose frames lie in fsam_fused; the compiled steps then run and stay close to the
    eager ones (Inductor's forward and backward round differently from eager's)."""
    backend_available("cpp", "cpu")
    net, opt, _ = _make(float_values=True)
    opt.capturable = capturable  # (gradients zeroed in place: another path)
    twin = copy.deepcopy(net)
    ref = FSAM(
        twin.groups(0.05, adaptive=True),
        torch.optim.SGD,
        sigma=0.5,
        lmbda=0.9,
        backend="cpp",
        fixed_addresses=True,
        lr=0.05,
        momentum=0.9,
    )
    x, y = _xy(13)

    def step(n, o):
        torch.nn.functional.mse_loss(n(x), y).backward()
        o.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(n(x), y).backward()
        o.second_step(zero_grad=True)

    for _ in range(2):  # the eager warm-up: plan, EMAs
        step(net, opt)
        step(twin, ref)
    explained = torch._dynamo.explain(step)(net, opt)
    step(twin, ref)
    assert _breaks_in_package(explained) == []
    assert explained.graph_break_count >= 1  # (the backward calls: the test sees breaks)
    compiled = torch.compile(step)
    for _ in range(5):
        compiled(net, opt)
        step(twin, ref)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compiling_before_any_eager_step_says_what_to_do():
    backend_available("cpp", "cpu")
    net, opt, _ = _make(float_values=True)
    x, y = _xy(14)
    torch.nn.functional.mse_loss(net(x), y).backward()
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="take at least two eager steps"):
        f1()
    assert not opt.perturbed


def test_an_unfused_backend_is_refused_under_compile():
    """The foreach passes are Python that Inductor would trace: refused, naming the
    backends that can run compiled."""
    net, opt, v = _make(backend="foreach", float_values=True)
    _trajectory(net, opt, v, opt.first_step, opt.second_step, 0, values=False)
    x, y = _xy(15)
    torch.nn.functional.mse_loss(net(x), y).backward()
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="backend 'cpp' on CPU, 'triton' on CUDA"):
        f1()


def test_double_buffering_is_refused_under_compile():
    """The C++ backend's default swaps p.data, which a graph cannot hold: the error names
    fixed_addresses=True (the test conftest lets every tensor be swapped)."""
    backend_available("cpp", "cpu")
    net = make_net(7)
    opt = FSAM(net.parameters(), torch.optim.SGD, backend="cpp", lr=0.1)
    x, y = _xy(16)
    for _ in range(2):
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)
    assert any(opt.plan_summary()[0].double_buffered)
    torch.nn.functional.mse_loss(net(x), y).backward()
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="fixed_addresses=True"):
        f1()
    assert not opt.perturbed


def test_eager_and_compiled_halves_mix():
    """An eager first_step finished by a compiled second_step, and a compiled first_step
    ended by an eager abandon_step(), give the weights back bit for bit (every weight is
    copied, never swapped)."""
    backend_available("cpp", "cpu")
    # (float values: torch's SGD rounds a tensor lr differently eager and traced)
    net, opt, v = _make(float_values=True)
    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True, backend="eager")
    f2 = torch.compile(lambda: opt.second_step(), fullgraph=True, backend="eager")
    _trajectory(net, opt, v, f1, f2, 1, values=False)
    x, y = _xy(17)
    twin_net, twin, tv = _make(float_values=True)
    _trajectory(twin_net, twin, tv, twin.first_step, twin.second_step, 1, values=False)
    for n, o, second in ((net, opt, f2), (twin_net, twin, twin.second_step)):
        torch.nn.functional.mse_loss(n(x), y).backward()
        o.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(n(x), y).backward()
        second()
        o.zero_grad()
    for p, q in zip(net.parameters(), twin_net.parameters()):
        assert torch.equal(p, q)
    w = [p.detach().clone() for p in net.parameters()]
    torch.nn.functional.mse_loss(net(x), y).backward()
    f1()
    assert opt.perturbed and not all(torch.equal(p, q) for p, q in zip(net.parameters(), w))
    assert opt.abandon_step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w))


def test_tensor_values_in_eager_steps():
    """0-dim tensor values in eager steps: read on the host each step (a tensor changed in
    place is seen), the same trajectory bit for bit as floats of the same values, and a bad
    one named before anything changes."""
    backend_available("cpp", "cpu")
    a_net, a, v = _make()
    b_net, b, _ = _make(float_values=True)
    b.param_groups[0]["lr"] = 0.05
    x, y = _xy(18)
    for k in range(4):
        _schedule(v, k)
        v["lr"].fill_(0.05)
        b.param_groups[0]["rho"], b.param_groups[1]["rho"] = (float(r) for r in v["rhos"])
        b.sigma, b.lmbda = float(v["sigma"]), float(v["lmbda"])
        for n, o in ((a_net, a), (b_net, b)):
            torch.nn.functional.mse_loss(n(x), y).backward()
            o.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(n(x), y).backward()
            o.second_step(zero_grad=True)
        for p, q in zip(a_net.parameters(), b_net.parameters()):
            assert torch.equal(p, q), k
    v["rhos"][1].fill_(-0.5)
    w = [p.detach().clone() for p in a_net.parameters()]
    torch.nn.functional.mse_loss(a_net(x), y).backward()
    with pytest.raises(ValueError, match="rho in param group 1"):
        a.first_step()
    assert not a.perturbed and all(torch.equal(p, q) for p, q in zip(a_net.parameters(), w))


def test_two_dtype_buckets_compile_equal_eager():
    """float32 and bfloat16 parameters (two buckets, one global norm over both partials):
    the compiled halves equal eager FSAM bit for bit (its base step compiled as well, as in
    the first test: Inductor's SGD rounds bfloat16 otherwise than eager)."""
    backend_available("cpp", "cpu")

    def run(compiled):
        torch.manual_seed(0)
        shapes = [((33, 10), torch.float32), ((17,), torch.bfloat16), ((40,), torch.float32)]
        ps = [torch.nn.Parameter(torch.randn(s).to(dt)) for s, dt in shapes]
        opt = FSAM(ps, torch.optim.SGD, lr=0.05, backend="cpp", fixed_addresses=True)
        f1 = torch.compile(lambda: opt.first_step(), fullgraph=True)
        f2 = torch.compile(lambda: opt.second_step(), fullgraph=True)
        g = torch.Generator().manual_seed(1)
        out = []
        for k in range(6):
            if not compiled and k == 2:
                opt.base_optimizer.step = torch.compile(opt.base_optimizer.step)
            eager = k < 2 or not compiled
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            (opt.first_step if eager else f1)()
            out += [p.detach().clone() for p in ps]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            (opt.second_step if eager else f2)()
            out += [p.detach().clone() for p in ps]
        assert len(opt.plan_summary()) == 2
        return out

    got, want = run(True), run(False)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i
