"""Shared test machinery: models, base optimizers, trajectories and tolerances."""

import os
import sys

import pytest
import torch

from fsam_fused import FSAM

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_plain_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


def opt_args(backend: str) -> dict:
    """FSAM keyword arguments for a backend name of the test matrix: "cpp" double-buffers
    (the default), "cpp-fixed" is the same backend with the exact-copy path."""
    if backend == "cpp-fixed":
        return {"backend": "cpp", "fixed_addresses": True}
    return {"backend": backend}


def backend_available(backend: str, device) -> None:
    """Skip when this backend cannot run on this device in this process."""
    device = torch.device(device)
    if backend.startswith("cpp"):
        if device.type != "cpu":
            pytest.skip("the C++ backend takes CPU tensors")
        from fsam_fused.ops import cpp as cpp_ops

        # A compiler and ninja are part of the test set-up: a failed build is a failure.
        reason = cpp_ops.load()
        assert reason is None, f"the C++ backend did not build: {reason}"
    if backend == "triton":
        require_triton()
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def require_triton():
    """Triton is a dependency on Linux: there, failing to import it (or its interpreter's
    numpy) is a failure, not a reason to skip. Elsewhere the Triton tests are skipped."""
    if sys.platform.startswith("linux"):
        import triton  # noqa: F401

        if os.environ.get("TRITON_INTERPRET") == "1":
            import numpy  # noqa: F401
    else:
        pytest.importorskip("triton")


class SmallNet(torch.nn.Module):
    """Tensors of awkward sizes, a LayerNorm, and a parameter that never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 33)
        self.norm = torch.nn.LayerNorm(33)
        self.fc2 = torch.nn.Linear(33, 5)
        self.unused = torch.nn.Parameter(torch.randn(7))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))

    def groups(self, rho, adaptive):
        """Two param groups with different rho."""
        return [
            {"params": [*self.fc1.parameters(), *self.norm.parameters()]},
            {"params": [*self.fc2.parameters(), self.unused], "rho": 2 * rho, "adaptive": adaptive},
        ]


def make_net(seed, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return SmallNet().to(device=device, dtype=dtype)


def batches(seed, steps, dtype=torch.float32, device="cpu"):
    """Fresh random data for every step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (
            torch.randn(16, 10, generator=g).to(device, dtype),
            torch.randn(16, 5, generator=g).to(device, dtype),
        )


def loss_of(net, x, y):
    return torch.nn.functional.mse_loss(net(x).float(), y.float())


def trajectory(
    backend,
    *,
    seed=0,
    steps=5,
    dtype=torch.float32,
    device="cpu",
    base="sgd",
    rho=0.1,
    sigma=1.0,
    lmbda=0.6,
    adaptive=False,
    ema_order="official",
    net=None,
    opt_kwargs=None,
):
    """Run `steps` F-SAM steps with the explicit first/second-step API; return a snapshot per
    step: the perturbed weights, the final weights and the EMA of every parameter."""
    net = net if net is not None else make_net(seed, dtype, device)
    cls, kw = BASES[base]
    opt = FSAM(
        net.groups(rho, adaptive),
        cls,
        rho=rho,
        sigma=sigma,
        lmbda=lmbda,
        adaptive=adaptive,
        ema_order=ema_order,
        **opt_args(backend),
        **(opt_kwargs or {}),
        **kw,
    )
    snaps = []
    for x, y in batches(seed + 1, steps, dtype, device):
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        perturbed = [p.detach().clone() for p in net.parameters()]
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
        snaps.append(
            {
                "perturbed": perturbed,
                "weights": [p.detach().clone() for p in net.parameters()],
                "ema": [
                    opt.state[p]["ema"].clone() if "ema" in opt.state.get(p, {}) else None
                    for p in net.parameters()
                ],
            }
        )
    return snaps, net, opt


def assert_snapshots_close(got, want, rtol, atol, what=""):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for key in ("perturbed", "weights", "ema"):
            for i, (a, b) in enumerate(zip(g[key], w[key])):
                if b is None:
                    assert a is None, f"{what} step {step} {key}[{i}]: unexpected EMA"
                    continue
                assert a is not None, f"{what} step {step} {key}[{i}]: missing EMA"
                torch.testing.assert_close(
                    a.float(),
                    b.float(),
                    rtol=rtol,
                    atol=atol,
                    msg=lambda m: f"{what} step {step} {key}[{i}]: {m}",
                )


def close_to_reference(got, want, dtype, what):
    """A fused kernel's output against the reference's on the same input: float32 to within
    rounding, 16-bit at most one ulp apart (one rounding of nearly the same float32 value)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(
            got.float(), want.float(), rtol=eps, atol=1e-30, msg=lambda m: f"{what}: {m}"
        )


def check_against_reference(
    make_params, dtype, backend, device="cpu", steps=3, adaptive=False, seed=0
):
    """Step a fused optimizer and a reference twin on the same fresh gradients, comparing
    after each half step. The saved-copy buffers are poisoned with NaN first, so an element
    a kernel fails to write shows up; the weights' own bits must survive the perturbation
    exactly: in the saved copy, or, where the parameter was double-buffered onto another
    storage, in its home storage. Returns the fused optimizer."""
    gen = torch.Generator().manual_seed(seed)
    ps, ps_r = make_params(), make_params()
    kw = dict(rho=0.5, sigma=1.0, lmbda=0.8, adaptive=adaptive, lr=0.01, momentum=0.9)
    opt = FSAM(ps, torch.optim.SGD, **opt_args(backend), **kw)
    opt_r = FSAM(ps_r, torch.optim.SGD, backend="reference", **kw)

    def fresh_grads():
        for p, r in zip(ps, ps_r):
            g = torch.randn(p.shape, generator=gen).to(device, dtype)
            p.grad, r.grad = g.clone(), g.clone()

    for step in range(steps):
        fresh_grads()
        before = [p.detach().clone() for p in ps]
        homes = [p.detach() for p in ps]  # aliases of each parameter's own storage
        for buf in opt.engine.buffers.saved.values():
            buf.fill_(float("nan"))
        opt.first_step()
        opt_r.first_step()
        for i, (p, r) in enumerate(zip(ps, ps_r)):
            close_to_reference(p.detach(), r.detach(), dtype, f"step {step} perturbed[{i}]")
            kept = homes[i] if p.data_ptr() != homes[i].data_ptr() else opt.engine.buffers.saved[p]
            assert torch.equal(kept, before[i]), f"step {step}: weights [{i}] not kept exactly"
            close_to_reference(
                opt.state[p]["ema"], opt_r.state[r]["ema"], torch.float32, f"step {step} ema[{i}]"
            )
        fresh_grads()
        opt.second_step()
        opt_r.second_step()
        for i, (p, r) in enumerate(zip(ps, ps_r)):
            close_to_reference(p.detach(), r.detach(), dtype, f"step {step} weights[{i}]")
    return opt


def lowp_yardstick(got, ref32, lowp, dtype, scale):
    """flash-attention's rule: the error of `got` against the float32 reference is at most
    twice the error of plain torch in the same low precision, plus a floor of one ulp at the
    data's scale."""
    err = (got.float() - ref32.float()).abs().max().item()
    torch_err = (lowp.float() - ref32.float()).abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    assert err <= 2 * torch_err + floor, (
        f"{dtype}: error {err:.3g} > 2 x torch's {torch_err:.3g} + floor {floor:.3g}"
    )
    return err, torch_err


def cpp_rows(adaptive, decay, gain, rho=None):
    """The C++ ops' ``rows`` tensor (float32 ``[n, 4]``: rho, adaptive, decay, gain) from
    per-tensor lists; rho defaults to 0 (the norm pass does not read it). Rows stop at the
    shortest list, so a short list gives a table of the wrong shape."""
    rho = [0.0] * len(adaptive) if rho is None else rho
    data = [
        [float(r), float(a), float(d), float(g)] for r, a, d, g in zip(rho, adaptive, decay, gain)
    ]
    return torch.tensor(data, dtype=torch.float32).reshape(-1, 4)


def cpp_scalars(sigma, eps=1e-12):
    """The C++ ops' ``scalars`` tensor: float32 ``[sigma, eps]``."""
    return torch.tensor([sigma, eps], dtype=torch.float32)


def lsq_grad64(w, b, x, y):
    """d/dw, d/db of mean((x w^T + b - y)^2), by hand (the float64 statements' gradient)."""
    r = (x @ w.T + b - y) * (2 / y.numel())
    return r.T @ x, r.sum(0)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (one per process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
