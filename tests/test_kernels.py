"""The Triton path on the shapes that break multi-tensor kernels: awkward sizes, many tiny
tensors beside a large one, misaligned views, gradients at new addresses, every chunk size.
Output buffers are poisoned with NaN before the kernels run, so an element they fail to write
shows up."""

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, check_against_reference, opt_args

pytestmark = pytest.mark.usefixtures("_triton_ok")


@pytest.fixture
def _triton_ok(device):
    backend_available("triton", device)


def _kernels():
    from fsam_fused.kernels import fsam

    return fsam


def _check_against_reference(make_params, dtype, device, **kw):
    return check_against_reference(make_params, dtype, "triton", device, **kw)


def _step_pair(opt, opt_r, ps, ps_r):
    """One step of a Triton optimizer and its reference twin, compared after each half."""
    opt.first_step()
    opt_r.first_step()
    for p, r in zip(ps, ps_r):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    opt.second_step(zero_grad=True)
    opt_r.second_step(zero_grad=True)
    for p, r in zip(ps, ps_r):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_awkward_sizes(dtype, device):
    k = _kernels()
    prime = 2 * k.CHUNK + 3  # 32771 is prime: spans three chunks, odd tail
    sizes = [1, 3, k.BLOCK - 1, k.BLOCK + 1, prime]

    def make():
        torch.manual_seed(1)
        return [torch.nn.Parameter(torch.randn(n).to(device, dtype)) for n in sizes]

    _check_against_reference(make, dtype, device, adaptive=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_many_tiny_tensors_beside_a_large_one(dtype, device):
    def make():
        torch.manual_seed(2)
        # 40 tiny tensors (one chunk each, all shorter than a block) around a large one that
        # spans many chunks: the chunk table mixes both, and the few programs of the CPU
        # grid each stride over tiny and large chunks alike. More tiny tensors test nothing
        # more and cost the interpreter seconds each.
        shapes = (
            [(int(n),) for n in torch.randint(1, 20, (20,))]
            + [(300, 1001)]
            + [(int(n),) for n in torch.randint(1, 20, (20,))]
        )
        return [torch.nn.Parameter(torch.randn(s).to(device, dtype)) for s in shapes]

    _check_against_reference(make, dtype, device, steps=2)


def test_misaligned_views_take_the_unhinted_kernels(device):
    """Parameters that are views at odd offsets: no 16-byte promise can be made."""

    def make():
        torch.manual_seed(3)
        storage = torch.randn(5000, device=device)
        return [torch.nn.Parameter(storage[1 : 1 + 777]), torch.nn.Parameter(storage[901:4000])]

    _check_against_reference(make, torch.float32, device)
    ps = make()
    opt = FSAM(ps, torch.optim.SGD, backend="triton", lr=0.1)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.first_step()
    assert opt.plan_summary()[0].aligned is False


@pytest.mark.parametrize("grid", [1, 3, 1000])
def test_any_grid_covers_every_chunk(grid, device, monkeypatch):
    """Programs stride over the chunk table: one program doing everything, programs with
    unequal shares, and more programs than chunks all give the same result."""
    k = _kernels()
    if device.type == "cuda":
        monkeypatch.setattr(k, "PROGRAMS_PER_SM", max(1, grid // 100))
    else:
        monkeypatch.setattr(k, "CPU_PROGRAMS", grid)

    def make():
        torch.manual_seed(4)
        return [torch.nn.Parameter(torch.randn(n, device=device)) for n in (70_001, 5, 16_384)]

    _check_against_reference(make, torch.float32, device, steps=2)


def test_gradients_at_new_addresses_each_step(device):
    """zero_grad(set_to_none=True) hands out new gradient storage; stale table entries would
    read the old tensors, poisoned here."""
    torch.manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (100, 2000)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FSAM(ps, torch.optim.SGD, backend="triton", lr=0.1)
    opt_r = FSAM(ref, torch.optim.SGD, backend="reference", lr=0.1)
    old = []
    for _ in range(3):
        for p, r in zip(ps, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        for t in old:
            t.fill_(float("nan"))  # still alive, so their addresses are not reused
        old = [p.grad for p in ps]
        _step_pair(opt, opt_r, ps, ref)


def test_empty_parameter_and_no_gradients(device):
    p = torch.nn.Parameter(torch.randn(0, device=device))
    q = torch.nn.Parameter(torch.randn(3, device=device))
    opt = FSAM([p, q], torch.optim.SGD, backend="triton", lr=0.1)
    opt.first_step()  # no gradients at all: a no-op
    opt.second_step()
    p.grad = torch.zeros_like(p)
    q.grad = torch.zeros_like(q)  # zero norm: e = 0, no NaN
    snap = q.detach().clone()
    opt.first_step()
    assert torch.equal(q.detach(), snap)
    opt.second_step()


def test_channels_last_weights(device):
    """Dense but not contiguous: the buffers follow the parameter's element order."""

    def make():
        torch.manual_seed(6)
        w = torch.randn(8, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
        return [torch.nn.Parameter(w), torch.nn.Parameter(torch.randn(8, device=device))]

    ps = make()
    gen = torch.Generator().manual_seed(0)
    ps_r = make()
    opt = FSAM(ps, torch.optim.SGD, backend="triton", lr=0.1)
    opt_r = FSAM(ps_r, torch.optim.SGD, backend="reference", lr=0.1)
    for _ in range(2):
        for p, r in zip(ps, ps_r):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad = g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g
            r.grad = g.clone()
        _step_pair(opt, opt_r, ps, ps_r)
    assert opt.state[ps[0]]["ema"].stride() == ps[0].stride()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_no_host_synchronisation_in_a_step(backend):
    """Any synchronising call inside first_step/second_step raises."""
    device = torch.device("cuda")
    torch.manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (3, 1000, 70_000)]
    from fsam_fused.bench import NoOp  # the base optimizer's own syncs are not ours

    opt = FSAM(ps, NoOp, **opt_args(backend))
    grads = [[torch.randn_like(p) for p in ps] for _ in range(3)]
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.first_step()  # builds the tables, compiles the kernels
    opt.second_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            for p, g in zip(ps, grads[step]):
                p.grad = g
            opt.param_groups[0]["rho"] = 0.05 * step  # a changed rho re-uploads a table
            opt.first_step()
            opt.second_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_counted_bytes_match_the_docstring():
    """The kernels' docstring table and the one formula the benchmark uses agree."""
    from fsam_fused.traffic import bytes_per_step

    doc = _kernels().__doc__
    assert "8 + 24 + 8 = 40" in doc and "6 + 16 + 4 = 26" in doc
    assert bytes_per_step(1, 4, 4, has_ema=True, adaptive=False) == 8 + 24 + 8
    assert bytes_per_step(1, 2, 4, has_ema=True, adaptive=False) == 6 + 16 + 4
    assert bytes_per_step(1, 4, 4, has_ema=True, adaptive=True) == 44
    assert bytes_per_step(10, 4, 4, has_ema=False, adaptive=False) == 10 * 28
    assert bytes_per_step(1, 4, double_buffered=True) == 28
    assert bytes_per_step(1, 2, double_buffered=True) == 20


def test_kernel_dtypes_are_the_fused_backends_dtypes():
    from fsam_fused.backends import FUSED_DTYPES

    assert tuple(_kernels().SUPPORTED_DTYPES) == FUSED_DTYPES


def test_three_launches_per_step_whatever_the_tensor_count(device, monkeypatch):
    """norm + perturb + restore, once per bucket, for 1 tensor or 40 (the count is not a
    loop bound anywhere on the host: 40 shows it as well as 300 did)."""
    k = _kernels()
    launches = []
    for name in ("_norm_kernel", "_perturb_kernel", "_restore_kernel"):
        kernel = getattr(k, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(k, name, Counting(kernel, name))
    for count in (1, 40):
        torch.manual_seed(count)
        ps = [torch.nn.Parameter(torch.randn(17, device=device)) for _ in range(count)]
        opt = FSAM(ps, torch.optim.SGD, backend="triton", lr=0.1)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn_like(p)
            launches.clear()
            opt.first_step()
            opt.second_step()
            assert launches == ["_norm_kernel", "_perturb_kernel", "_restore_kernel"], count


@pytest.mark.cuda
def test_cuda_step_is_three_kernels():
    """The profiler sees exactly the three F-SAM kernels in a step (table uploads are copies,
    and happen only when something changed)."""
    device = torch.device("cuda")
    from fsam_fused.bench import NoOp

    torch.manual_seed(8)
    ps = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (3, 1000, 70_000)]
    opt = FSAM(ps, NoOp, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.first_step()
    opt.second_step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.first_step()
        opt.second_step()
        torch.cuda.synchronize()
    kernels = [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and "memcpy" not in e.name.lower()
        and "memset" not in e.name.lower()
    ]
    assert sorted(kernels) == ["_norm_kernel", "_perturb_kernel", "_restore_kernel"], kernels


def test_parameter_storage_swapped_between_steps(device):
    """``p.data = ...`` gives a parameter new storage: the cached plan and tables must follow."""
    torch.manual_seed(9)
    ps = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (10, 3000)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FSAM(ps, torch.optim.SGD, backend="triton", lr=0.1)
    opt_r = FSAM(ref, torch.optim.SGD, backend="reference", lr=0.1)
    for step in range(3):
        if step == 2:
            for p, r in zip(ps, ref):
                new = torch.randn_like(p)
                p.data, r.data = new.clone(), new.clone()
        for p, r in zip(ps, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        _step_pair(opt, opt_r, ps, ref)
