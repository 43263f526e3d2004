"""Issue 14, item 7: gradients whose strides differ from their parameter's only on size-1
dimensions (what Inductor gives a 1x1 convolution's weight) are accepted by every backend
with the result of the same gradient in the parameter's own strides; a gradient in a truly
different layout runs under ``auto`` (foreach, one warning) and is a clear error for an
explicit fused backend."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args

BACKENDS = ["reference", "foreach", "cpp", "cpp-fixed", "triton", "auto"]


def _odd_strides(g: torch.Tensor) -> torch.Tensor:
    """``g``'s values with Inductor's strides for a [C, K, 1, 1] tensor: [K, 1, K, K]."""
    c, k = g.shape[:2]
    out = torch.empty_strided(g.shape, (k, 1, k, k), dtype=g.dtype)
    out.copy_(g)
    assert out.stride() != g.stride() and torch.equal(out, g)
    return out


def _run(backend, odd, steps=3):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 5, 1, 1))
    b = torch.nn.Parameter(torch.randn(8))
    opt = FSAM([w, b], torch.optim.SGD, rho=0.3, sigma=1.0, lmbda=0.6, lr=0.1, **opt_args(backend))
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for second in (False, True):
            gw = torch.randn(8, 5, 1, 1, generator=gen)
            w.grad = _odd_strides(gw) if odd else gw
            b.grad = torch.randn(8, generator=gen)
            if second:
                opt.second_step(zero_grad=True)
            else:
                opt.first_step(zero_grad=True)
    return w.detach().clone(), opt.state[w]["ema"].clone(), opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_size1_strides_accepted(backend):
    backend_available(backend, "cpu")
    w_ref, m_ref, _ = _run(backend, odd=False)
    w, m, opt = _run(backend, odd=True)
    assert torch.equal(w, w_ref) and torch.equal(m, m_ref)
    if backend != "auto":
        assert opt.plan_summary()[0].backend == opt_args(backend)["backend"]


def test_other_layout_auto_warns_and_explicit_refuses():
    backend_available("cpp", "cpu")
    torch.manual_seed(1)
    w0 = torch.randn(4, 3, 2, 2)
    g = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    results = {}
    for backend in ("auto", "reference"):
        w = torch.nn.Parameter(w0.clone())
        opt = FSAM([w], torch.optim.SGD, rho=0.2, lr=0.1, backend=backend)
        w.grad = g.clone(memory_format=torch.preserve_format)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.first_step()
        if backend == "auto":
            assert [str(c.message) for c in caught if "another memory layout" in str(c.message)]
            assert opt.plan_summary()[0].backend == "foreach"
        opt.second_step()
        results[backend] = w.detach().clone()
    torch.testing.assert_close(results["auto"], results["reference"], rtol=1e-6, atol=1e-7)
    w = torch.nn.Parameter(w0.clone())
    opt = FSAM([w], torch.optim.SGD, rho=0.2, lr=0.1, backend="cpp")
    w.grad = g.clone(memory_format=torch.preserve_format)
    with pytest.raises(ValueError, match="backend='cpp' cannot run"):
        opt.first_step()
    assert torch.equal(w, w0)


class _Block(torch.nn.Module):
    """A ResNet bottleneck in miniature: 1x1, 3x3, 1x1 convolutions and BatchNorm."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Conv2d(c, c // 2, 1, bias=False)
        self.b = torch.nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False)
        self.c = torch.nn.Conv2d(c // 2, c, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _resnetish():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        _Block(16),
        _Block(16),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )


def test_compiled_resnet_shaped_model_auto():
    """A torch.compile'd model's gradients (Inductor's strides) step under ``auto`` with
    the C++ backend, as the same gradients in the parameters' strides do."""
    backend_available("cpp", "cpu")
    # Inductor lowers the convolutions' backward by the thread count: on one thread it gives
    # the parameters' own strides. Two threads (this machine's), whatever ran before.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compiled_resnetish_steps()
    finally:
        torch.set_num_threads(threads)


def _compiled_resnetish_steps():
    torch._dynamo.reset()  # a fresh compile under this thread count
    model = _resnetish()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, backend="auto")
    ref = FSAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, backend="reference")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    odd = 0
    for _ in range(2):
        for step in ("first_step", "second_step"):
            torch.nn.functional.cross_entropy(compiled(x), y).backward()
            odd += sum(p.grad.stride() != p.stride() for p in model.parameters())
            for p, q in zip(model.parameters(), twin.parameters()):
                q.grad = p.grad.contiguous()
            getattr(opt, step)(zero_grad=True)
            getattr(ref, step)(zero_grad=True)
    assert odd > 0, "Inductor gave every gradient its parameter's strides: nothing tested"
    assert opt.plan_summary()[0].backend == "cpp"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
