"""F-SAM backends, one module each, behind the protocol of :mod:`.base`.

=============  ==========================================================================
``reference``  a plain loop over parameters, the readable statement of the contract; any
               device and floating-point dtype
``foreach``    ``torch._foreach_*`` ops in place on persistent buffers; any device and dtype
``triton``     the fused Triton kernels of ``fsam_fused.kernels``: CUDA tensors (CPU tensors
               only under ``TRITON_INTERPRET=1``), float32/bfloat16/float16 weights and EMA
``cpp``        the fused C++ passes of ``csrc/`` (built on first use): CPU tensors,
               float32/bfloat16/float16 weights and EMA
=============  ==========================================================================

The ``auto`` rule, per bucket (one device and dtype), implemented by :func:`select`:

1. CUDA tensors take ``triton`` if Triton is installed and can run the weight and EMA dtypes
   and every parameter is dense (contiguous or channels_last) with a gradient of the same
   layout;
2. CPU tensors take ``cpp`` under the same conditions if the extension builds (the first CPU
   step builds it, or loads the verified cached build); if it cannot, one warning names the
   reason, pointed at the caller's line, and the bucket takes ``foreach``;
3. anything else takes ``foreach``.

An explicit ``"triton"`` or ``"cpp"`` that cannot run a bucket is a ``ValueError`` naming the
reason; only ``"auto"`` falls back.
"""

from __future__ import annotations

from .base import FUSED_DTYPES, Backend
from .cpp import CppBackend
from .foreach import ForeachBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

CLASSES = {c.name: c for c in (ReferenceBackend, ForeachBackend, TritonBackend, CppBackend)}

__all__ = [
    "Backend",
    "CLASSES",
    "FUSED_DTYPES",
    "ReferenceBackend",
    "ForeachBackend",
    "TritonBackend",
    "CppBackend",
    "select",
    "build_ahead",
]

_DENSE = (
    "the {} kernels need each parameter dense (contiguous or channels_last) with a "
    "gradient of the same strides"
)


def build_ahead(name: str) -> None:
    """Called by ``FSAM(...)``: an explicit ``backend="cpp"`` builds (or loads the cached
    build of) the C++ ops at construction, so the compile happens, and a missing compiler is
    reported, where the optimizer is made rather than inside the first step. ``"auto"``
    builds only when a CPU bucket needs it. Raises ``ValueError`` with the reason."""
    if name == "cpp":
        from ..ops import cpp as cpp_ops

        reason = cpp_ops.load()
        if reason is not None:
            raise ValueError(
                f"backend='cpp' cannot run these parameters: {reason}; use backend='auto', "
                "'foreach' or 'reference'"
            )


def select(name: str, device, dtype, ema_dtype, dense: bool) -> str:
    """The backend name that runs a bucket, by the rule in this module's docstring."""
    from ..ops import cpp as cpp_ops

    if name == "auto":
        if not dense:
            return "foreach"
        if device.type == "cuda":
            return (
                "triton"
                if TritonBackend.unsupported(device, dtype, ema_dtype) is None
                else "foreach"
            )
        if device.type == "cpu" and CppBackend.unsupported(device, dtype, ema_dtype) is None:
            reason = cpp_ops.load()  # builds on first use, cached on disk
            if reason is None:
                return "cpp"
            cpp_ops.fallback_warning(reason)
        return "foreach"
    if name in ("triton", "cpp"):
        reason = CLASSES[name].unsupported(device, dtype, ema_dtype)
        if reason is None and not dense:
            reason = _DENSE.format(name)
        if reason is None and name == "cpp":
            reason = cpp_ops.load()
        if reason is not None:
            raise ValueError(
                f"backend={name!r} cannot run these parameters: {reason}; "
                "use backend='auto', 'foreach' or 'reference'"
            )
    return name
