"""The contract between the step engine and a backend.

A backend runs F-SAM's three passes over a :class:`~fsam_fused.plan.Bucket` (the parameters
of one device and dtype that have a gradient this step, with their buffers and per-tensor
settings, built once per plan):

``prepare(b)``
    Once per plan: derive whatever the passes reuse (device tables, op arguments, detached
    aliases) and keep it in ``b.prep``. May fail; writes nothing the user can see.
``norm(b, inv) -> (partials, carry)``
    ``inv``: None, or a 1-element float32 tensor on ``b.device`` (a GradScaler's 1/scale)
    that every gradient is multiplied by before any other use (EMA, direction, norm); the
    ``.grad`` tensors themselves are never rewritten. Without it the arithmetic is exactly
    the unscaled one (a separate code path, not a multiply by 1). A float32 1-D tensor on ``b.device`` whose *sum* is this bucket's share of the squared
    global norm ``sum (a * d)**2``, and anything the perturb pass reuses this step. Writes
    nothing the user can see: the engine combines the buckets' sums of squares (never norms
    of norms) before any weight changes.
``perturb(b, sq, carry, inv, found)``
    ``sq``: float32 1-D tensor on ``b.device`` whose sum is the squared global norm; ``inv``
    as for ``norm``; ``found``: a 1-element float32 tensor on ``b.device`` the pass sets to
    1.0 if that sum is not finite (a non-finite gradient, or an overflowing sum of squares),
    else 0.0, on the device (no host synchronisation). When it is not finite the pass
    *selects* (never multiplies by zero: ``0 * inf`` is NaN): weights and EMA keep their bits
    and the saved copy is still written, so ``restore`` is the identity. Otherwise it updates
    the EMA (``b.emas``), keeps an exact copy of each weight (``b.saved``, or the weight's own
    storage when double-buffered) and writes ``w + e``. **Atomic**: it checks everything
    before its first write, and a failure after that undoes what it wrote to the weights. The
    EMA update is its last write.
``restore(b)``
    Gives every weight back its saved bits. Called only when the engine has checked that every
    parameter still has the storage ``b.perturbed_ptrs`` recorded (host metadata, no sync).
``original(b, i) -> Tensor``
    The exact unperturbed values of parameter ``i`` (the saved copy, or the home storage of a
    double-buffered one), for the engine's per-parameter restore when a parameter's storage
    changed between the two steps.

Room for later: a backend may add ``restore_and_step(b, base)`` to fuse the restore with a
base optimizer's update (one pass instead of two); the engine would call it when present.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

# Weight and EMA dtypes the fused kernels (Triton and C++) take; the one list both adapters
# and their capability checks read.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]

    @staticmethod
    def unsupported(device: torch.device, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
        """None if this backend can run such a bucket, else the reason it cannot."""

    def prepare(self, b) -> None: ...

    def norm(self, b, inv: torch.Tensor | None) -> tuple[torch.Tensor, Any]: ...

    def perturb(
        self, b, sq: torch.Tensor, carry: Any, inv: torch.Tensor | None, found: torch.Tensor
    ) -> None: ...

    def restore(self, b) -> None: ...

    def original(self, b, i: int) -> torch.Tensor: ...


def fused_unsupported(what: str, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
    """The dtype half of a fused backend's capability check."""
    for kind, dt in (("weights", dtype), ("EMA", ema_dtype)):
        if dt not in FUSED_DTYPES:
            return (
                f"the {what} kernels support {', '.join(map(str, FUSED_DTYPES))} {kind}, not {dt}"
            )
    return None
