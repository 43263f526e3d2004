"""The contract between the step engine and a backend.

A backend runs F-SAM's three passes over a :class:`~fsam_fused.plan.Bucket`: the parameters
of one device and dtype that have a gradient, with their buffers and device values
(``b.rows``/``b.scalars``, :mod:`fsam_fused.rows`), all fixed for the plan. What changes
every step arrives as arguments, in one :class:`StepInputs`: the gradients, a GradScaler's
1/scale, the found flag. Values (rho, sigma, lmbda, eps) are read from ``b.rows`` and
``b.scalars``, which the engine rewrites in place when they change: a backend never needs a
new plan for a new value, and must not copy values to the host.

Each backend class declares what it can do in ``caps`` (:class:`Capabilities`); the ``auto``
rule of :func:`fsam_fused.backends.select` is computed from those declarations, and nothing
outside ``backends/`` looks at a backend's name or its per-plan objects. ``README.md`` beside
this file says how to add one.

``prepare(b)``
    Once per plan: derive whatever the passes reuse (device tables, op arguments, detached
    aliases) and keep it in ``b.prep``; set ``b.perturbed_ptrs`` (the address each parameter
    has while perturbed). May fail; writes nothing the user can see.
``norm(b, inputs) -> (partials, carry)``
    A float32 1-D tensor on ``b.device`` whose *sum* is this bucket's share of the squared
    global norm ``sum (a * d)**2``, and anything the perturb pass reuses this step. Every
    gradient is multiplied by ``inputs.inv`` (when not None) before any other use; the
    ``.grad`` tensors themselves are never rewritten, and without it the arithmetic is exactly
    the unscaled one (a separate code path, not a multiply by 1). Writes nothing the user can
    see: the engine combines the buckets' sums of squares before any weight changes.
``perturb(b, inputs, sq, carry)``
    ``sq``: float32 1-D tensor on ``b.device`` whose sum is the squared global norm. Sets
    ``inputs.found`` (1-element float32 on ``b.device``) to 1.0 if that sum is not finite,
    else 0.0, on the device. When it is not finite the pass *selects* (never multiplies by
    zero: ``0 * inf`` is NaN): weights and EMA keep their bits and the saved copy is still
    written, so ``restore`` is the identity. Otherwise it updates the EMA (``b.emas``), keeps
    an exact copy of each weight (``b.saved``, or the weight's own storage when
    double-buffered) and writes ``w + e``. **Atomic**: it checks and allocates everything
    before its first write, and a failure after that undoes what it wrote to the weights.
    The EMA update is its last write.
``restore(b)``
    Gives every weight back its saved bits. Called only when the engine has checked that every
    parameter still has the storage ``b.perturbed_ptrs`` recorded (host metadata, no sync).
``original(b, i) -> Tensor``
    The exact unperturbed values of parameter ``i`` (the saved copy, or the home storage of a
    double-buffered one), for the engine's per-parameter restore when a parameter's storage
    changed between the two steps.
``grad_sq(b, inputs) -> Tensor`` and ``ema(b, inputs, sq)``
    The cheap step of a perturbation schedule (:mod:`fsam_fused.schedules`): a float32
    1-element tensor, the sum of ``(inv * g)**2`` over the bucket; then the EMA update
    alone (``m <- m * decay + (inv * g) * gain``) with the whole step's ``sq``, selecting
    the old EMA when its sum is not finite and setting ``inputs.found`` as ``perturb`` does.
    :class:`CheapStep` is a plain-torch version any backend may inherit.
``norm_and_grad_sq(b, inputs) -> (partials, carry, grad_sq)``
    ``norm`` and ``grad_sq`` together (a schedule's statistic on a perturbing step); the C++
    backend takes both from one read of the gradients.
``accepts(b, grads) -> bool | None`` (optional)
    True if the passes take this step's ``grads`` as they are (the planned dtype, sizes,
    strides and device; raising nothing). :meth:`~fsam_fused.plan.Bucket.take_grads` calls
    it first and takes the gradients on True; on False it runs its own Python checks, which
    decide between a view, a new plan and an error; on None (the backend's per-plan data no
    longer fits: an EMA changed in place) it asks for a new plan. The C++ backend makes the
    whole test in one call (``Bound.accepts``), instead of a Python pass per property.
``double_buffered(b) -> tuple[bool, ...]``, ``aligned(b) -> bool | None``
    Introspection (``FSAM.plan_summary``): which tensors are swapped instead of copied, and
    whether every address allows the widest vector accesses (None: not applicable).

Room for later: a backend may add ``restore_and_step(b, base)`` to fuse the restore with a
base optimizer's update (one pass instead of two); the engine would call it when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch

from ..hparams import opmath

# Weight and EMA dtypes the fused kernels (Triton and C++) take; the one list both adapters
# and their capability checks read.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StepInputs(NamedTuple):
    """What one step hands one bucket's passes (nothing of it is kept on the bucket)."""

    grads: list  # the gradients, one per parameter of the bucket (local shards for DTensors)
    inv: torch.Tensor | None  # a GradScaler's 1/scale (1-element float32 on the device), or None
    found: torch.Tensor | None  # 1-element float32 on the device: set by perturb


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can run; :func:`fsam_fused.backends.select` reads it.

    ``devices``: device types ``auto`` may give it (None: any). ``dtypes``: weight and EMA
    dtypes it takes (None: any floating-point). ``dense_only``: every parameter must be dense
    (contiguous or channels_last) with a gradient of the same memory order. ``double_buffer``:
    it may swap a parameter's storage instead of copying (so ``fixed_addresses`` matters).
    ``checks_devices``: its kernels refuse a tensor on another device before writing (the
    engine then skips that per-step check). ``auto``: its rank for ``"auto"`` (lower first;
    None: only by name). ``warn_fallback``: ``auto`` warns, naming the reason, when the
    backend matches a bucket but is not available (e.g. its build failed). ``built``: it is
    compiled on first use, and built at construction when named explicitly."""

    devices: frozenset | None
    dtypes: tuple | None
    dense_only: bool
    double_buffer: bool
    checks_devices: bool
    auto: int | None
    warn_fallback: bool = False
    built: bool = False


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    caps: ClassVar[Capabilities]

    @staticmethod
    def unsupported(device: torch.device, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
        """None if this backend can run such a bucket when named explicitly, else the reason."""

    @staticmethod
    def available() -> str | None:
        """None once the backend can run (built, importable), else the reason; may build."""

    def prepare(self, b) -> None: ...

    def norm(self, b, inputs: StepInputs) -> tuple[torch.Tensor, Any]: ...

    def perturb(self, b, inputs: StepInputs, sq: torch.Tensor, carry: Any) -> None: ...

    def restore(self, b) -> None: ...

    def original(self, b, i: int) -> torch.Tensor: ...

    def double_buffered(self, b) -> tuple: ...

    def aligned(self, b) -> bool | None: ...


class CheapStep:
    """The cheap step's two passes in plain torch, per tensor, in the arithmetic dtype
    (float32 for 16-bit EMAs): the reference's statement, and what backends without a fused
    version run."""

    def grad_sq(self, b, inputs: StepInputs) -> torch.Tensor:
        inv = inputs.inv.reshape(()) if inputs.inv is not None else None
        squares = []
        for g in inputs.grads:
            g = g.float() if g.dtype != torch.float64 else g
            if inv is not None:
                g = g * inv
            squares.append(g.float().pow(2).sum())
        if not squares:
            return torch.zeros(1, dtype=torch.float32, device=b.device)
        return torch.stack(squares).sum().reshape(1)

    def norm_and_grad_sq(self, b, inputs: StepInputs):
        """``norm``'s ``(partials, carry)`` and :meth:`grad_sq`'s sum: here two reads of the
        gradients (a fused backend sums both in one)."""
        part, carry = self.norm(b, inputs)
        return part, carry, self.grad_sq(b, inputs)

    def ema(self, b, inputs: StepInputs, sq: torch.Tensor) -> None:
        ok = torch.isfinite(sq.sum())
        new = []  # every new value is computed before the first write
        inv = inputs.inv.reshape(()) if inputs.inv is not None else None
        for i, (m, g) in enumerate(zip(b.emas or (), inputs.grads)):
            ct = opmath(b.dtype)
            g = g.to(ct)
            if inv is not None:
                g = g * inv
            m_new = m.to(ct) * b.rows[i, 2] + g * b.rows[i, 3]  # (DECAY, GAIN: rows.py)
            new.append(torch.where(ok, m_new, m.to(ct)).to(m.dtype))
        if inputs.found is not None:
            inputs.found.copy_(~ok)
        for m, x in zip(b.emas or (), new):
            m.copy_(x)


class Unfused(CheapStep):
    """Defaults for backends that copy every weight and have no alignment notion."""

    @staticmethod
    def available() -> str | None:
        return None

    def double_buffered(self, b) -> tuple:
        return (False,) * len(b.params)

    def aligned(self, b) -> bool | None:
        return None

    def original(self, b, i):
        return b.saved[i]


def fused_unsupported(what: str, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
    """The dtype half of a fused backend's capability check."""
    for kind, dt in (("weights", dtype), ("EMA", ema_dtype)):
        if dt not in FUSED_DTYPES:
            return (
                f"the {what} kernels support {', '.join(map(str, FUSED_DTYPES))} {kind}, not {dt}"
            )
    return None
