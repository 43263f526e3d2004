"""What the benchmarks measure: FSAM's backends and the peers users would otherwise run.

Every candidate is built on the *same* parameter and gradient tensors (its own EMA and
buffers aside) with a base optimizer that does nothing: a step restores the weights bit for
bit, so the candidates can take turns on one parameter list, interleaved, and the memory of
the big presets is paid once.

Before each timed step, every candidate's gradients are rewritten, untimed, as the backward
pass before a real optimizer step leaves them: pytorch_optimizer needs it (it subtracts the
EMA from ``.grad`` in place), and all candidates get it so none starts with gradients its
rival has just pulled into the cache. The others rewrite the same values (``g *= 1``).
"""

from __future__ import annotations

import torch

from ..backends import CppBackend, TritonBackend, cpp
from ..hparams import EPS, opmath
from ..optimizer import FSAM
from ..traffic import bytes_per_step
from .presets import numel

RHO, SIGMA, LMBDA = 0.05, 1.0, 0.9


class NoOp(torch.optim.Optimizer):
    """Base optimizer that does nothing: the benchmark times F-SAM's own work."""

    def __init__(self, params, **_):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class Candidate:
    """One implementation under test. ``build(params)`` returns a :class:`Built`."""

    peer = False

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label

    def unavailable(self, device: torch.device, dtype: torch.dtype, tensors: int = 1) -> str | None:
        """None if it can run ``tensors`` tensors of ``dtype`` on ``device``, else why not."""
        return None

    def bytes(self, shapes, dtype: torch.dtype) -> int:
        """Counted bytes of one step over tensors of these shapes."""
        return bytes_per_step(sum(map(numel, shapes)), dtype.itemsize)


class Built:
    """A candidate built on one parameter list: ``step()`` is first_step + second_step;
    ``prepare()``, if any, runs untimed before each step; ``passes`` (FSAM backends only)
    maps a pass name to ``(setup, run)`` for pass timings."""

    def __init__(self, step, passes=None, prepare=None):
        self.step, self.passes, self.prepare = step, passes or {}, prepare


class FSAMBackend(Candidate):
    def __init__(self, name, label, backend, **kwargs):
        super().__init__(name, label)
        self.backend, self.kwargs = backend, kwargs

    def unavailable(self, device, dtype, tensors=1):
        if self.backend == "triton":
            if device.type != "cuda":
                return "Triton needs CUDA"
            return TritonBackend.unsupported(device, dtype, opmath(dtype))
        if self.backend == "cpp":
            from ..ops import cpp as cpp_ops

            return CppBackend.unsupported(device, dtype, opmath(dtype)) or cpp_ops.load()
        return None

    def bytes(self, shapes, dtype):
        double = self.backend == "cpp" and not self.kwargs.get("fixed_addresses", False)
        # The C++ backend double-buffers only tensors from SWAP_MIN_NUMEL elements on.
        return sum(
            bytes_per_step(
                numel(s), dtype.itemsize, double_buffered=double and numel(s) >= cpp.SWAP_MIN_NUMEL
            )
            for s in shapes
        )

    def build(self, params):
        opt = FSAM(
            params, NoOp, rho=RHO, sigma=SIGMA, lmbda=LMBDA, backend=self.backend, **self.kwargs
        )

        def step():
            opt.first_step()
            opt.second_step()

        step()  # creates the EMA; the next step builds the plan later steps reuse
        step()
        return Built(step, self._passes(opt), prepare=_touch_grads(params))

    @staticmethod
    def _passes(opt):
        """Each pass alone on the optimizer's own plan (one bucket: one device and dtype),
        through the engine's public pass API."""
        passes = opt.engine.passes()
        state = {"perturbed": False}

        def settle():  # back to unperturbed weights, so every timed pass starts alike
            if state["perturbed"]:
                passes.restore()
                state["perturbed"] = False

        def perturb(sq):
            passes.perturb(sq)
            state["perturbed"] = True

        def restore():
            passes.restore()
            state["perturbed"] = False

        def setup_norm():
            settle()
            return (), {}

        def setup_perturb():
            settle()
            return (passes.norm(),), {}

        def setup_restore():
            settle()
            perturb(passes.norm())
            return (), {}

        return {
            "norm": (setup_norm, passes.norm),
            "perturb": (setup_perturb, perturb),
            "restore": (setup_restore, restore),
            "settle": settle,
        }


def _touch_grads(params):
    """The untimed prepare of candidates that leave ``.grad`` alone: rewrite it unchanged."""
    grads = [p.grad for p in params]

    @torch.no_grad()
    def prepare():
        torch._foreach_mul_(grads, 1.0)

    return prepare


class PytorchOptimizer(Candidate):
    """pytorch_optimizer's ``FriendlySAM`` (PyPI ``pytorch-optimizer``), foreach or loop."""

    peer = True

    def __init__(self, name, label, foreach):
        super().__init__(name, label)
        self.foreach = foreach

    def unavailable(self, device, dtype, tensors=1):
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            return "pytorch-optimizer is not installed (pip install 'fsam-fused[bench]')"
        if self.foreach and dtype not in (torch.float32, torch.float64):
            return "its foreach path takes float32/float64 only (it would run its loop)"
        return None

    def build(self, params):
        from pytorch_optimizer import FriendlySAM

        # It subtracts the EMA from .grad in place, so it gets parameters of its own, and its
        # gradients are reset before every step (see the module docstring).
        own = [torch.nn.Parameter(p.detach().clone()) for p in params]
        pristine = [p.grad.clone() for p in params]
        for p, g in zip(own, pristine):
            p.grad = g.clone()
        opt = FriendlySAM(own, NoOp, rho=RHO, sigma=SIGMA, lmbda=LMBDA, foreach=self.foreach)

        def prepare():
            torch._foreach_copy_([p.grad for p in own], pristine)

        def step():
            opt.first_step()
            opt.second_step()

        prepare()
        step()
        return Built(step, prepare=prepare)


def foreach_first_step(params, grads, emas, saved, d, rho: float, sigma: float, lmbda: float):
    """The foreach F-SAM first step (official order, EMA already seeded) as one function of
    tensor lists, so ``torch.compile`` can fuse it. The math of ``ForeachBackend``."""
    torch._foreach_copy_(d, grads)
    torch._foreach_add_(d, emas, alpha=-sigma)  # d = g - sigma * m_old
    torch._foreach_mul_(emas, lmbda)
    torch._foreach_add_(emas, [g.to(d[0].dtype) for g in grads], alpha=1.0 - lmbda)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d)))
    torch._foreach_copy_(saved, params)
    torch._foreach_mul_(d, rho / (norm + EPS))
    if d[0].dtype == params[0].dtype:
        torch._foreach_add_(params, d)
    else:
        torch._foreach_add_(d, saved)  # w + e in float32, rounded once
        torch._foreach_copy_(params, d)


def foreach_restore(params, saved):
    torch._foreach_copy_(params, saved)


class CompiledForeach(Candidate):
    """:func:`foreach_first_step` under ``torch.compile`` (CUDA: Inductor's Triton kernels)."""

    peer = True

    # Inductor compiles one graph per list and dtype, and its time grows with the tensor
    # count; above this the quick CUDA suite could not fit gpu_check.sh's few minutes
    # (ResNet-18's 62 tensors are compiled; GPT-2's 148 and 2,000 tiny ones are not).
    MAX_TENSORS = 100

    def unavailable(self, device, dtype, tensors=1):
        if device.type != "cuda":
            return "torch.compile peer runs on CUDA only"
        if tensors > self.MAX_TENSORS:
            return f"compiling a {tensors}-tensor foreach graph takes minutes"
        return None

    def build(self, params, compile=True):
        ct = opmath(params[0].dtype)
        grads = [p.grad for p in params]
        emas = [g.to(ct, copy=True) for g in grads]
        saved = [torch.empty_like(p) for p in params]
        d = [torch.empty_like(p, dtype=ct) for p in params]
        first = torch.compile(foreach_first_step) if compile else foreach_first_step
        restore = torch.compile(foreach_restore) if compile else foreach_restore

        @torch.no_grad()
        def step():
            first(params, grads, emas, saved, d, RHO, SIGMA, LMBDA)
            restore(params, saved)

        step()  # compiles
        return Built(step, prepare=_touch_grads(params))


def candidates(device: torch.device):
    """Every candidate for a device, FSAM's backends first."""
    out = [
        FSAMBackend("reference", "FSAM reference loop", "reference"),
        FSAMBackend("foreach", "FSAM foreach", "foreach"),
    ]
    if device.type == "cuda":
        out += [
            FSAMBackend("triton", "FSAM Triton (auto)", "triton"),
            CompiledForeach("compiled-foreach", "foreach under torch.compile"),
        ]
    else:
        out += [
            FSAMBackend("cpp", "FSAM C++ (auto: double-buffered)", "cpp"),
            FSAMBackend("cpp-fixed", "FSAM C++, fixed_addresses=True", "cpp", fixed_addresses=True),
        ]
    out += [
        PytorchOptimizer("po-foreach", "pytorch_optimizer FriendlySAM foreach", True),
        PytorchOptimizer("po-loop", "pytorch_optimizer FriendlySAM loop", False),
    ]
    return out
