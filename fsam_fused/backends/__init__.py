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

Each class declares what it can run in ``caps`` (:class:`~.base.Capabilities`), and the
``auto`` rule is computed from those declarations by :func:`select`, per bucket (one device
and dtype): the backends that take part in ``auto`` are tried by rank (``caps.auto``, lower
first); the first whose declared devices, dtypes and layout needs fit the bucket, whose
``unsupported`` check passes and which is ``available()`` (Triton installed; the C++
extension built, which the first CPU step does, or its verified cache loaded) runs it. A
backend that fits but is not available is passed over, with one warning naming the reason
(pointed at the caller's line) when it declares ``warn_fallback`` (the C++ build). ``foreach``
ranks last and takes anything. Today this gives: CUDA -> ``triton``, CPU -> ``cpp``, each for
dense float32/bfloat16/float16 parameters whose gradients share their memory order; anything
else -> ``foreach``.

An explicit ``"triton"`` or ``"cpp"`` that cannot run a bucket is a ``ValueError`` naming the
reason; only ``"auto"`` falls back. ``README.md`` here says how to add a backend.
"""

from __future__ import annotations

from .base import FUSED_DTYPES, Backend, Capabilities, StepInputs
from .cpp import CppBackend
from .foreach import ForeachBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

CLASSES = {c.name: c for c in (ReferenceBackend, ForeachBackend, TritonBackend, CppBackend)}
_AUTO = sorted((c for c in CLASSES.values() if c.caps.auto is not None), key=lambda c: c.caps.auto)

__all__ = [
    "Backend",
    "CLASSES",
    "Capabilities",
    "FUSED_DTYPES",
    "StepInputs",
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


def _fits(cls, device, dtype, ema_dtype, dense: bool) -> bool:
    caps = cls.caps
    return (
        (caps.devices is None or device.type in caps.devices)
        and (caps.dtypes is None or (dtype in caps.dtypes and ema_dtype in caps.dtypes))
        and (dense or not caps.dense_only)
        and cls.unsupported(device, dtype, ema_dtype) is None
    )


def build_ahead(name: str) -> None:
    """Called by ``FSAM(...)``: a backend named explicitly that is built on first use
    (``caps.built``: the C++ ops) is built (or its verified cache loaded) at construction, so
    the compile happens, and a missing compiler is reported, where the optimizer is made
    rather than inside the first step. ``"auto"`` builds only when a bucket needs it. Raises
    ``ValueError`` with the reason."""
    cls = CLASSES.get(name)
    if cls is not None and cls.caps.built:
        reason = cls.available()
        if reason is not None:
            raise ValueError(
                f"backend={name!r} cannot run these parameters: {reason}; use "
                "backend='auto', 'foreach' or 'reference'"
            )


def select(name: str, device, dtype, ema_dtype, dense: bool) -> str:
    """The backend name that runs a bucket, by the rule in this module's docstring."""
    if name == "auto":
        for cls in _AUTO:
            if _fits(cls, device, dtype, ema_dtype, dense):
                reason = cls.available()
                if reason is None:
                    return cls.name
                if cls.caps.warn_fallback:
                    cls.fallback_warning(reason)
        return "foreach"
    cls = CLASSES[name]
    reason = cls.unsupported(device, dtype, ema_dtype)
    if reason is None and cls.caps.dense_only and not dense:
        reason = _DENSE.format(name)
    if reason is None:
        reason = cls.available()
    if reason is not None:
        raise ValueError(
            f"backend={name!r} cannot run these parameters: {reason}; "
            "use backend='auto', 'foreach' or 'reference'"
        )
    return name
