"""Adapter from buckets to the fused Triton launchers of ``fsam_fused.kernels`` (CUDA; CPU
tensors only under ``TRITON_INTERPRET=1``, which the tests use)."""

from __future__ import annotations

import os

import torch

from .base import FUSED_DTYPES, Capabilities, CheapStep, StepInputs, fused_unsupported


def interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels():
    """The ``fsam_fused.kernels.fsam`` module (imports Triton)."""
    from ..kernels import fsam

    return fsam


def triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return (
            "Triton is not installed (it comes with torch's CUDA builds on Linux; "
            "pip install triton)"
        )
    return None


class _Prep:
    """Per plan: the launcher holding its tables, and one partials buffer (stream order makes
    a step's perturb read it before the next step's norm rewrites it)."""

    __slots__ = ("launcher", "partials")

    def __init__(self, launcher, partials):
        self.launcher, self.partials = launcher, partials

    @property
    def aligned(self) -> bool:
        return self.launcher.aligned


class TritonBackend(CheapStep):  # (the cheap step in plain torch: not fused yet)
    """Three launches per bucket and step: norm partials, perturb, restore."""

    name = "triton"
    caps = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=FUSED_DTYPES,
        dense_only=True,
        double_buffer=False,
        checks_devices=False,
        auto=0,
    )

    def __init__(self, buffers=None):
        self._launchers = {}  # (device, dtype, EMA dtype) -> MultiTensorFSAM, holding tables

    @staticmethod
    def unsupported(device, dtype, ema_dtype):
        reason = triton_missing() or fused_unsupported("Triton", dtype, ema_dtype)
        if reason is not None:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
            return None
        return (
            f"the Triton kernels need CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, for testing), got a {device.type} tensor"
        )

    @staticmethod
    def available():
        return triton_missing()

    def prepare(self, b) -> None:
        m_dtype = b.emas[0].dtype if b.emas else torch.float32
        key = (b.device, b.dtype, m_dtype)
        ln = self._launchers.get(key)
        if ln is None:
            ln = self._launchers[key] = kernels().MultiTensorFSAM(b.device, b.dtype, m_dtype)
        ln.set_static(b.params, b.emas, b.saved, b.adaptive, b.rows, b.scalars)
        b.prep = _Prep(ln, torch.empty(ln.n_programs, dtype=torch.float32, device=b.device))
        b.perturbed_ptrs = [p.data_ptr() for p in b.params]

    def norm(self, b, inputs: StepInputs):
        ln = b.prep.launcher  # its static tables are this plan's: one plan at a time
        ln.set_grads(inputs.grads)  # uploads the gradient addresses only when one has moved
        ln.norm_partials(b.prep.partials, b.paper, inputs.inv)
        return b.prep.partials, None

    def perturb(self, b, inputs: StepInputs, sq, carry) -> None:
        b.prep.launcher.perturb(sq, b.paper, inputs.found, inputs.inv)

    def restore(self, b) -> None:
        b.prep.launcher.restore()

    def original(self, b, i):
        return b.saved[i]

    def double_buffered(self, b) -> tuple:
        return (False,) * len(b.params)

    def aligned(self, b) -> bool | None:
        return b.prep.launcher.aligned
