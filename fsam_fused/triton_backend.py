"""Adapter from the optimizer's buckets to the fused Triton launchers in ``fsam_fused.kernels``."""

from __future__ import annotations

import os

import torch

from .reference import EPS, Bucket


def interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(device: torch.device, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
    """None if the Triton backend can run this bucket, else the reason it cannot."""
    if not triton_available():
        return "Triton is not installed"
    from .kernels.fsam import SUPPORTED_DTYPES

    for what, dt in (("weights", dtype), ("EMA", ema_dtype)):
        if dt not in SUPPORTED_DTYPES:
            return (f"the Triton kernels support {', '.join(map(str, SUPPORTED_DTYPES))} "
                    f"{what}, not {dt}")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_active():
        return None
    return (f"the Triton kernels need CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, for testing), got a {device.type} tensor")


class TritonBackend:
    """Three launches per bucket and step: norm partials, perturb, restore."""

    name = "triton"

    def __init__(self):
        self._launchers = {}  # (device, dtype, ema dtype) -> MultiTensorFSAM, holding the tables

    def _launcher(self, b: Bucket):
        from .kernels.fsam import MultiTensorFSAM

        m_dtype = b.emas[0].dtype if b.emas else torch.float32
        key = (b.device, b.dtype, m_dtype)
        if key not in self._launchers:
            self._launchers[key] = MultiTensorFSAM(b.device, b.dtype, m_dtype)
        return self._launchers[key]

    def norm_partials(self, b: Bucket) -> torch.Tensor:
        ln = self._launcher(b)
        if b.scratch_static.get("triton") is not ln:
            # The optimizer built a new plan: rows and static tables change only then.
            rows = []
            for rho, ad, first in zip(b.rhos, b.adaptive, b.first):
                # Official order on first sight: m is zero, decay 0 and gain 1 make m_new = g.
                if first and not b.paper:
                    rows.append((rho, float(ad), 0.0, 1.0))
                else:
                    rows.append((rho, float(ad), b.lmbda, 1.0 - b.lmbda))
            ln.set_static(b.params, b.emas, b.saved, rows)
            b.scratch_static["triton"] = ln
        ln.set_grads(b.grads)
        out = torch.empty(ln.n_programs, dtype=torch.float32, device=b.device)
        ln.norm_partials(out, b.sigma, b.paper)
        b.scratch["launcher"] = ln
        return out

    def perturb(self, b: Bucket, sq: torch.Tensor) -> None:
        b.scratch["launcher"].perturb(sq, b.sigma, EPS, b.paper)

    def restore(self, b: Bucket) -> None:
        b.scratch.pop("launcher").restore()
