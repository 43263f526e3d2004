"""``capturable=True``: steps that CUDA graphs can capture (``docs/compile.md``).

On the CPU: a steady capturable step allocates nothing and uploads no pointer table (counted:
CPU allocations by torch's profiler, uploads by wrapping the one upload function), values
changing every step never rebuild the plan, capturable steps equal eager ones bit for bit
(non-finite gradients included), and a capture that would need an upload refuses.
On CUDA (marker ``cuda``, selected by ``bench/gpu_check.sh``): a whole training step
captured with ``torch.cuda.graph`` and replayed equals eager steps (fp32, bf16); fp16 with a
GradScaler skips a non-finite step identically; ``torch.compile(mode="reduce-overhead")``
runs the step with CUDA graphs.
"""

import copy

import pytest
import torch

from fsam_fused import FSAM
from fsam_fused.bench import NoOp
from helpers import backend_available, make_net

# ----------------------------------------------------------------------------- CPU


def _profiled_allocations(fn):
    """Allocations (count) torch's allocators made while ``fn`` runs: the profiler's
    allocation events (frees are events of negative size), wherever they nest."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    count, todo = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        n = todo.pop()
        todo.extend(n.children)
        if n.tag == torch._C._profiler._EventType.Allocation and n.extra_fields.alloc_size > 0:
            count += 1
    return count


def test_the_allocation_count_sees_an_allocation():
    """The instrument: one small tensor made is one allocation counted, a temporary freed
    inside an op too; views and in-place writes none."""
    t = torch.zeros(4, 4)
    assert _profiled_allocations(lambda: torch.empty(16)) == 1
    assert _profiled_allocations(lambda: t.sum()) == 1
    assert _profiled_allocations(lambda: (t[1:, 2], t.t(), t.fill_(1.0))) == 0


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_a_steady_capturable_step_allocates_and_uploads_nothing(backend, monkeypatch):
    """After the warm-up, capturable steps (first_step + second_step, a base that does
    nothing) with rho (a tensor, changed in place), sigma (a float, reassigned) and lmbda
    (a tensor) changing every step: no allocation, no pointer-table upload, no plan built.
    Triton's launches are stubbed (its interpreter copies tensors; a GPU launch allocates
    nothing); the C++ norm pass returns its 1-element sum, its one allocation per bucket."""
    backend_available(backend, "cpu")
    from fsam_fused.kernels import fsam as K

    if backend == "triton":
        for name in ("norm_partials", "perturb", "restore"):
            monkeypatch.setattr(K.MultiTensorFSAM, name, lambda self, *a, **k: None)
    uploads = []
    real = K._upload
    monkeypatch.setattr(K, "_upload", lambda *a: uploads.append(1) or real(*a))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(33, 10), (33,), (5, 33), (7,)]]
    rho = torch.tensor(0.05, dtype=torch.float64)
    lmbda = torch.tensor(0.9, dtype=torch.float64)
    opt = FSAM(params, NoOp, rho=rho, lmbda=lmbda, backend=backend, capturable=True)
    for p in params:
        p.grad = torch.randn_like(p)

    def step(k):
        rho.fill_(0.05 + 0.001 * k)
        opt.sigma = 0.5 + 0.01 * k
        lmbda.fill_(0.9 - 0.01 * k)
        opt.first_step()
        opt.second_step()

    for k in range(3):
        step(k)
    builds, n = opt.engine.builds, len(uploads)
    counted = _profiled_allocations(lambda: [step(k) for k in range(3, 8)])
    assert counted == (0 if backend == "triton" else 5), counted
    assert len(uploads) == n and opt.engine.builds == builds == 2


def _run(backend, capturable, steps=8, inf_at=None, fused=False):
    net = make_net(21)
    kw = dict(lr=0.05, momentum=0.9) if not fused else dict(lr=0.05, momentum=0.9, fused=True)
    opt = FSAM(
        net.groups(0.05, adaptive=True),
        torch.optim.SGD,
        backend=backend,
        fixed_addresses=True,
        capturable=capturable,
        **kw,
    )
    g = torch.Generator().manual_seed(22)
    out = []
    for k in range(steps):
        x, y = torch.randn(8, 10, generator=g), torch.randn(8, 5, generator=g)
        opt.param_groups[1]["rho"] = 0.1 + 0.01 * k
        opt.sigma, opt.lmbda = 0.5 + 0.05 * k, 0.9 - 0.02 * k
        torch.nn.functional.mse_loss(net(x), y).backward()
        if k == inf_at:
            net.fc1.weight.grad[0, 0] = float("inf")
        opt.first_step(zero_grad=True)
        out.append([p.detach().clone() for p in net.parameters()])
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)
        out.append(
            [p.detach().clone() for p in net.parameters()]
            + [opt.state[p]["ema"].clone() for p in net.parameters() if p in opt.state]
            + [opt.found_nonfinite()]
        )
    return out


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("inf_at", [None, 4])
def test_capturable_steps_equal_eager_steps(backend, inf_at):
    """Capturable steps (frozen from the third on) against plain eager ones: every weight,
    EMA and found flag bit for bit, with values changing every step; a non-finite first
    gradient (step 4) leaves the weights and EMA alone and a fused base skips its step on
    the device in both."""
    backend_available(backend, "cpu")
    fused = inf_at is not None
    got = _run(backend, True, inf_at=inf_at, fused=fused)
    want = _run(backend, False, inf_at=inf_at, fused=fused)
    for k, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b)
        for i, (p, q) in enumerate(zip(a, b)):
            assert (p is None and q is None) or torch.equal(p, q), (k, i)
    if inf_at is not None:
        assert got[2 * inf_at + 1][-1].item() == 1.0
        assert torch.equal(got[2 * inf_at + 1][0], got[2 * inf_at - 1][0])  # skipped


def test_capturable_gradients_are_zeroed_in_place():
    """zero_grad=True in a capturable step zeroes the gradients where they are: a captured
    graph and the Triton gradient table hold their addresses."""
    backend_available("cpp", "cpu")
    net = make_net(23)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, backend="cpp", capturable=True)
    x, y = torch.randn(4, 10), torch.randn(4, 5)
    for _ in range(3):
        torch.nn.functional.mse_loss(net(x), y).backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        opt.first_step(zero_grad=True)
        assert all(p.grad is grads[n] for n, p in net.named_parameters() if n in grads)
        assert all(not g.any() for g in grads.values())
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)


def test_capturable_base_optimizer_is_capturable():
    net = make_net(24)
    opt = FSAM(net.parameters(), torch.optim.AdamW, lr=1e-3, capturable=True)
    assert opt.base_optimizer.defaults["capturable"] is True and opt.fixed_addresses
    sgd = FSAM(net.parameters(), torch.optim.SGD, lr=1e-3, capturable=True)
    assert "capturable" not in sgd.base_optimizer.defaults


def test_inside_a_capture_a_moved_gradient_refuses_to_upload(monkeypatch):
    """A gradient at a new address needs a table upload, which a capture cannot hold: the
    step raises, naming the fix, before any pass runs (the capture state is faked)."""
    backend_available("triton", "cpu")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(9)) for _ in range(3)]
    opt = FSAM(params, NoOp, backend="triton", capturable=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)  # (moves: fine outside a capture)
        opt.first_step()
        opt.second_step()
    for p in params:
        p.grad = torch.randn_like(p)
    w = [p.detach().clone() for p in params]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=False\)"):
        opt.first_step()
    monkeypatch.undo()
    assert all(torch.equal(p, q) for p, q in zip(params, w))


def test_inside_a_capture_a_plan_that_does_not_fit_raises(monkeypatch):
    """A step whose plan would have to be rebuilt (a new parameter got a gradient) raises
    inside a capture instead of rebuilding it there."""
    backend_available("cpp", "cpu")
    net = make_net(25)
    opt = FSAM(net.parameters(), torch.optim.SGD, lr=0.1, backend="cpp", capturable=True)
    x, y = torch.randn(4, 10), torch.randn(4, 5)
    for _ in range(2):
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)
    torch.nn.functional.mse_loss(net(x), y).backward()
    net.unused.grad = torch.ones_like(net.unused)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture the plan"):
        opt.first_step()
    monkeypatch.undo()
    assert not opt.perturbed


# ----------------------------------------------------------------------------- CUDA


def _cuda_setup(dtype, seed=0, scaler=False):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)
    ).cuda()
    if dtype == torch.bfloat16:
        net = net.to(dtype)
    rho = torch.tensor(0.05, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    opt = FSAM(
        net.parameters(),
        torch.optim.AdamW,
        rho=rho,
        lr=lr,
        fused=True,
        capturable=True,
        backend="triton",
    )
    return net, opt, rho, lr


def _cuda_step(net, opt, x, y, scaler=None):
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None)
    with autocast:
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    (scaler.scale(loss) if scaler else loss).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with autocast:
        loss2 = torch.nn.functional.cross_entropy(net(x).float(), y)
    if scaler is None:
        loss2.backward()
        opt.second_step(zero_grad=True)
    else:
        scaler.scale(loss2).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)


def _batches(n, dtype, inf_at=None):
    g = torch.Generator(device="cuda").manual_seed(5)
    out = []
    for k in range(n):
        x = torch.randn(32, 64, device="cuda", generator=g, dtype=dtype)
        if k == inf_at:
            x[0, 0] = float("inf")
        out.append((x, torch.randint(0, 10, (32,), device="cuda", generator=g)))
    return out


def _replayed(dtype, batches, scaler=None, warm=3):
    """Warm-up on a side stream, capture the whole step, replay it over ``batches``
    (rho and lr changed in place before each replay). Returns the weights after each."""
    net, opt, rho, lr = _cuda_setup(dtype)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in batches[:warm]:
            static_x.copy_(x), static_y.copy_(y)
            _cuda_step(net, opt, static_x, static_y, scaler)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _cuda_step(net, opt, static_x, static_y, scaler)
    out = []
    for k, (x, y) in enumerate(batches[warm:]):
        rho.fill_(0.05 + 0.002 * k)
        lr.fill_(1e-3 / (1 + k))
        static_x.copy_(x), static_y.copy_(y)
        g.replay()
        out.append([p.detach().clone() for p in net.parameters()])
    torch.cuda.synchronize()
    return out, opt


def _eager(dtype, batches, scaler=None, warm=3):
    """The same steps eagerly (a capture records the step's work without running it)."""
    net, opt, rho, lr = _cuda_setup(dtype)
    for x, y in batches[:warm]:
        _cuda_step(net, opt, x, y, scaler)
    out = []
    for k, (x, y) in enumerate(batches[warm:]):
        rho.fill_(0.05 + 0.002 * k)
        lr.fill_(1e-3 / (1 + k))
        _cuda_step(net, opt, x, y, scaler)
        out.append([p.detach().clone() for p in net.parameters()])
    return out, opt


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_replay_equals_eager(dtype):
    """forward, backward, first_step, forward, backward, second_step (fused capturable
    AdamW) captured once and replayed 20 times, rho and lr changed in place before each:
    every weight after every replay equals the eager steps' bit for bit."""
    batches = _batches(23, dtype)
    got, _ = _replayed(dtype, batches)
    want, _ = _eager(dtype, batches)
    assert len(got) == len(want) == 20
    for k, (a, b) in enumerate(zip(got, want)):
        for p, q in zip(a, b):
            assert torch.equal(p, q), k


@pytest.mark.cuda
def test_cuda_fp16_scaler_replay_skips_like_eager():
    """fp16 autocast with a GradScaler, an inf in the batch of one replayed step: that step
    is skipped (weights unchanged, the scale backed off) identically in replay and eager."""
    batches = _batches(13, torch.float32, inf_at=7)
    s1, s2 = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    got, _ = _replayed(torch.float32, batches, scaler=s1)
    want, _ = _eager(torch.float32, batches, scaler=s2)
    for k, (a, b) in enumerate(zip(got, want)):
        for p, q in zip(a, b):
            assert torch.equal(p, q), k
    skipped = 7 - 3
    assert all(torch.equal(p, q) for p, q in zip(got[skipped], got[skipped - 1]))
    assert s1.get_scale() == s2.get_scale()


@pytest.mark.cuda
def test_cuda_reduce_overhead_compile_runs_with_cudagraphs():
    """torch.compile(mode="reduce-overhead") of a whole step: Inductor skips no CUDA graph
    (counted), and the steps stay close to eager ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = _batches(10, torch.float32)
    net, opt, _, _ = _cuda_setup(torch.float32)
    twin, topt = copy.deepcopy(net), None
    topt = FSAM(twin.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, fused=True)
    for x, y in batches[:2]:
        _cuda_step(net, opt, x, y)
        _cuda_step(twin, topt, x, y)
    step = torch.compile(_cuda_step, mode="reduce-overhead")
    for x, y in batches[2:]:
        step(net, opt, x, y)
        _cuda_step(twin, topt, x, y)
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _scaled_run(capturable, steps=8, inf_at=5):
    net = make_net(26)
    opt = FSAM(
        net.parameters(),
        torch.optim.SGD,
        backend="cpp",
        fixed_addresses=True,
        capturable=capturable,
        lr=0.05,
        momentum=0.9,
        fused=True,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(27)
    out = []
    for k in range(steps):
        x, y = torch.randn(8, 10, generator=g), torch.randn(8, 5, generator=g)
        scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
        if k == inf_at:
            net.fc2.bias.grad[0] = float("inf")
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out.append([p.detach().clone() for p in net.parameters()] + [scaler.get_scale()])
    return out


def test_capturable_steps_with_a_grad_scaler_equal_eager_steps():
    """The frozen first_step with a GradScaler (its 1/scale inside the passes) finished by
    scaler.step(opt), against eager steps: weights and scale bit for bit, an inf in the
    first pass skipping the step and backing the scale off alike (CPU GradScaler)."""
    backend_available("cpp", "cpu")
    got, want = _scaled_run(True), _scaled_run(False)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a[-1] == b[-1], k
        for p, q in zip(a[:-1], b[:-1]):
            assert torch.equal(p, q), k
    assert got[5][-1] == got[4][-1] / 2
    assert all(torch.equal(p, q) for p, q in zip(got[5][:-1], got[4][:-1]))
