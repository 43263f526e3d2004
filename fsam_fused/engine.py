"""The step engine: one F-SAM step, from the plan to the base optimizer's update.

``first_step``:

1. **plan** (:mod:`.plan`): reuse the plan while its structure holds (each gradient's
   dtype, shape, device and layout checked against it), else rebuild it with every check;
   values (rho, sigma, lmbda) are rewritten into the buckets' device rows in place
   (:mod:`.rows`), never a reason to rebuild;
2. **norm**: each bucket's backend computes partial sums of squares; nothing the user can see
   is written;
3. **reduce** (:mod:`.reduce`): the partials of every bucket and device combined into the
   squared global norm, as device tensors;
4. **perturb**: bucket by bucket, EMA update, exact save and ``w + e``;
5. commit: EMAs created this step enter the optimizer state.

``second_step``: **restore** every perturbed weight (each parameter's live storage checked
against the one perturbed, host metadata only), then the **base step**.

Failure policy (all-or-nothing):

* ``first_step`` is all-or-nothing. Every check and every allocation happens before the
  first write; buckets are perturbed smallest first, and each one but the last backs its EMA
  up first (one copy of the smaller buckets' EMA; none with a single bucket), so an error in
  any bucket's pass restores the weights of those done and their EMA. Each backend's perturb
  pass is atomic (checks before writes, undoes its own weights on failure, EMA last), so the
  last bucket's pass is the commit point. Every allocation of a pass is made before its
  first write (a real out-of-memory changes nothing). Signals are held back while
  the buckets are written (every signal with a Python handler, not only SIGINT:
  a SIGALRM or SIGTERM timeout's handler raising at any bytecode would leave the weights
  half written), in the main thread, and handed to their handlers once they are; SIGINT
  (Ctrl-C, ``_thread.interrupt_main``) is also held while they are restored. If a handler
  raises (the default SIGINT one raises KeyboardInterrupt), or anything raises between the
  commit and the return of ``FSAM.first_step``, the weights are restored first, as after a
  failed second pass (below); a handler that only sets a flag, or an ignored SIGINT, lets
  the step complete. An exception anywhere before the write region leaves everything as it
  was; one that interrupts a restore leaves the step in flight, to be restored again.
  ``second_step`` (the session's finish) holds every signal across its restore and base step
  (:attr:`Engine.held_step`): a torch for-loop base optimizer is never left stepped
  part-way.
* A failed second pass (the closure raising; a non-finite second gradient under a GradScaler
  or ``skip_nonfinite=True``) restores the
  weights bit for bit and leaves the base optimizer untouched; the EMA keeps this step's
  update, which saw a valid first gradient: rolling it back would need a second EMA-sized
  buffer for every parameter. ``step(closure)`` also gives back the first pass's ``.grad``.
* A non-finite first pass is not an error (``found`` is a device flag, never read on the
  host here): the perturb pass *selects* the old values when the global sum of squares is
  not finite (a non-finite gradient, or finite ones whose squares overflow float32), so the
  weights and the EMA keep their bits and the saved copy is exact; the step is in flight as
  usual and its restore is the identity. Whether the base optimizer then steps is the
  optimizer's rule (``FSAM.second_step``: skipped on the device by a fused base, with a
  GradScaler, or with ``skip_nonfinite=True``).
* A GradScaler's ``1/scale`` enters the passes as a device tensor; ``.grad`` is never
  rewritten by ``first_step``. With a scaler, a non-finite second pass restores the weights
  bit for bit and leaves the base optimizer's state unchanged; the EMA keeps this step's
  update, as for any failed second pass (below). The exception kept: ``scaler.step(opt)``
  after a ``first_step()`` that was not given the scaler restores the weights and raises
  without a base step, but the EMA has taken that step's *scaled* gradient.
* ``second_step`` restores every parameter it can, also when one's storage changed between
  the two steps (``p.data = ...``, ``model.half()``: the saved value is copied into the new
  storage, cast if the dtype changed, with a warning); a parameter given another view of the
  same storage (``p.data = p.data.t()``) has its storage restored and keeps its view; one
  given new storage of another shape, or whose storage was freed or shrunk, cannot be
  restored, and the error names it after every other parameter is restored. The base
  optimizer does not step then. If a restore itself fails, the step stays in flight (the
  optimizer still says the weights are perturbed) and ``restore`` can be called again.

Who calls what: :class:`fsam_fused.session.StepSession` is the only caller of
:meth:`Engine.first_step` and :meth:`Engine.restore`; closures, GradScaler hand-off and the
base optimizer's step are the session's, not the engine's.

Compiled and captured steps (``torch.compile``, ``capturable=True``) do not run through this
engine's checks: :mod:`fsam_fused.compiled` freezes the plan two eager steps built and calls
the fused passes as custom ops (``docs/compile.md`` says what is checked per step then).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch

from . import backends, reduce
from ._sigint import Held
from ._warnings import warn_at_caller
from .backends.base import StepInputs
from .buffers import Buffers, fits, state_version
from .hparams import Structure, Values
from .ops import cpp as cpp_ops
from .plan import Plan, build
from .traffic import bytes_per_step, cheap_bytes_per_step

_GRAD = attrgetter("grad")


class _Reading:
    """``Engine._reading``'s context (a class, not a generator: it runs twice a step)."""

    __slots__ = ("engine", "plan", "previous", "st", "groups", "state")

    def __init__(self, engine, plan, previous, st, groups, state):
        self.engine, self.plan, self.previous = engine, plan, previous
        self.st, self.groups, self.state = st, groups, state

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            return False
        engine = self.engine
        engine.plan = None  # re-check everything next time
        if issubclass(kind, Exception) and self.plan is self.previous:
            # A reused plan leaves some per-step checks to the kernels (the C++ ops check
            # devices): the full checks of a new plan name what is wrong more clearly.
            engine.plan_for(self.st, self.groups, self.state)
            engine.plan = None
        return False


class _NoHold:
    """A hold that holds nothing (the caller's hold covers the block)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def deliver(self) -> None:
        pass


_NO_HOLD = _NoHold()


@dataclass(frozen=True)
class BucketSummary:
    """One bucket of the current plan, as :meth:`FSAM.plan_summary` reports it."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    tensors: int
    numel: int
    ema_dtype: torch.dtype | None
    double_buffered: tuple  # per tensor: swapped with a spare buffer instead of copied
    bytes_per_step: int  # what the step must move (fsam_fused.traffic)
    cheap_bytes_per_step: int  # what a schedule's cheap step moves
    aligned: bool | None  # Triton: every address 16-byte aligned (128-bit accesses)


class CheapPasses:
    """The passes of a schedule's cheap step (:mod:`fsam_fused.schedules`), mixed into
    :class:`Engine` (whose plan, holds and commit they use)."""

    def grad_sq(self, prepared) -> list:
        """Per bucket, a float32 1-D tensor whose sum is ``sum (inv * g)**2`` over the whole
        step (every bucket, every rank of a sharded parameter). Writes nothing."""
        plan, inputs, ctx = prepared
        with self._reading(plan, *ctx):
            parts = [b.backend.grad_sq(b, inputs[id(b)]) for b in plan.buckets]
            return reduce.combine(parts, plan.buckets)

    def cheap(self, prepared, sqs: list) -> None:
        """A schedule's cheap step: the EMA pass alone, bucket by bucket with the perturb
        pass's EMA backups and rollback (no weight is written), then the commit of new EMAs.
        ``sqs``: :meth:`grad_sq`'s, in the plan's bucket order."""
        plan, inputs, _ = prepared
        by = {id(x): sq for x, sq in zip(plan.buckets, sqs)}
        done, b = [], None
        held = self._held
        with held:
            try:
                for b in plan.commit:
                    if b.backups is not None:
                        torch._foreach_copy_(b.backups, b.emas)
                    b.backend.ema(b, inputs[id(b)], by[id(b)])
                    done.append(b)
            except BaseException:
                self.plan = None
                for x in (*done, b):
                    if x is not None and x.backups is not None:
                        torch._foreach_copy_(x.emas, x.backups)
                raise
            self._committed(plan)
        held.deliver()


class Engine(CheapPasses):
    """Runs the passes of one optimizer's steps; owns its plan, buffers and backends."""

    def __init__(self):
        self.buffers = Buffers()
        self.backends = {}
        self.plan: Plan | None = None
        self.inflight: list | None = None  # buckets perturbed by first_step, until restored
        self._held = Held()
        self._held_restore = Held(every=False)
        self.held_step = Held()  # second_step's restore and base step (the session's finish)
        # device -> 0-dim float32: set by the perturb pass, 1.0 when the first pass's
        # sum of squares was not finite. ``found`` is the last step's (the first bucket's).
        self._found: dict = {}
        self.found: torch.Tensor | None = None
        self.builds = 0  # plans built (a value schedule must never add to it)

    # ------------------------------------------------------------------ plan

    def _backend(self, name):
        be = self.backends.get(name)
        if be is None:
            be = self.backends[name] = backends.CLASSES[name](self.buffers)
        return be

    def plan_for(self, st: Structure, groups, state) -> tuple[Plan, list]:
        """The plan for this step and, per bucket, this step's gradients."""
        key = (id(state), state_version(), [(id(g["params"]), len(g["params"])) for g in groups])
        plan = self.plan
        if plan is not None and plan.structure == st and plan.key == key:
            if plan.watch is not None and cpp_ops.eager():
                # (None if a parameter moved or has no gradient)
                grads = plan.watch.grads()
                taken = None if grads is None else plan.take_grads(grads)
                if taken is not None:
                    return plan, taken
            elif plan.every:
                # (take_grads also turns down a None: a parameter without a gradient)
                grads = list(map(_GRAD, plan.flat))
                if list(map(torch.Tensor.data_ptr, plan.flat)) == plan.ptrs:
                    taken = plan.take_grads(grads)
                    if taken is not None:
                        return plan, taken
            else:
                grads = list(map(_GRAD, plan.flat))
                have = [i for i, g in enumerate(grads) if g is not None]
                if have == plan.have and [plan.flat[i].data_ptr() for i in have] == plan.ptrs:
                    taken = plan.take_grads(grads)
                    if taken is not None:
                        return plan, taken
        self.plan = None
        self.buffers.state = state

        def select(device, dtype, ema_dtype, dense):
            return self._backend(backends.select(st.backend, device, dtype, ema_dtype, dense))

        plan = build(st, groups, select, self.buffers)
        self.builds += 1
        plan.structure, plan.key = st, key
        taken = plan.take_grads(list(map(_GRAD, plan.flat)))
        if taken is None:  # checked by build(): only a plan this module misbuilt gets here
            raise RuntimeError("fsam_fused: internal error: a new plan refused its gradients")
        self.plan = plan
        return plan, taken

    # ------------------------------------------------------------------ first_step

    def _found_on(self, device) -> torch.Tensor:
        f = self._found.get(device)
        if f is None:
            f = self._found[device] = torch.zeros((), dtype=torch.float32, device=device)
        return f

    def first_step(self, st: Structure, values: Values, groups, state, inv_scale=None) -> None:
        """``inv_scale``: None, or a 1-element float32 tensor (a GradScaler's 1/scale, on the
        parameters' device) every first-pass gradient is multiplied by inside the passes."""
        self.perturb(self.prepare(st, values, groups, state, inv_scale))

    def prepare(self, st: Structure, values: Values, groups, state, inv_scale=None):
        """The step's plan and, per bucket, its :class:`StepInputs` (values refreshed):
        what :meth:`perturb`, :meth:`grad_sq` and :meth:`cheap` take. Writes nothing."""
        previous = self.plan
        plan, grads = self.plan_for(st, groups, state)
        with self._reading(plan, previous, st, groups, state):
            inv = inv_scale
            if inv is not None and any(b.device != inv.device for b in plan.buckets):
                inv = {d: inv.to(d, non_blocking=True) for d in {b.device for b in plan.buckets}}
            inputs = {}
            for b, g in zip(plan.buckets, grads):
                b.device_values.refresh(values)
                inputs[id(b)] = StepInputs(
                    g, inv[b.device] if type(inv) is dict else inv, self._found_on(b.device)
                )
        return plan, inputs, (previous, st, groups, state)

    def _reading(self, plan, previous, st, groups, state):
        """Around the passes that read: a failure drops the plan (re-checked next time)."""
        return _Reading(self, plan, previous, st, groups, state)

    def perturb(self, prepared, before_write=None) -> None:
        """The norm pass, then the write region (see the module docstring). ``before_write``:
        called with :meth:`grad_sq`'s result, taken by the norm pass from the same read (a
        schedule's statistic), after every read and before the first write."""
        plan, inputs, ctx = prepared
        with self._reading(plan, *ctx):
            parts, carries, gparts = [], {}, []
            for b in plan.buckets:
                x = inputs[id(b)]
                if before_write is None:
                    part, carries[id(b)] = b.backend.norm(b, x)
                else:
                    part, carries[id(b)], gpart = b.backend.norm_and_grad_sq(b, x)
                    gparts.append(gpart)
                parts.append(part)
            sqs = {id(b): sq for b, sq in zip(plan.buckets, reduce.combine(parts, plan.buckets))}
            gsqs = None if before_write is None else reduce.combine(gparts, plan.buckets)
        if before_write is not None:
            before_write(gsqs)
        held = self._held
        try:
            with held:
                self._write(plan, inputs, sqs, carries)
            held.deliver()
        except BaseException:
            # A signal's handler raised (by default SIGINT's, KeyboardInterrupt), or
            # something between the commit and here did: give the weights back, as after a
            # failed second pass (any exception, not only SIGINT's).
            if self.inflight is not None:
                self.restore()
            raise

    def _write(self, plan, inputs, sqs, carries) -> None:
        """The write region, run with signals held (:class:`Held`): only the code's own
        exceptions can arise in it, and they roll back."""
        done = []
        b = None
        try:
            for b in plan.commit:
                if b.backups is not None:
                    torch._foreach_copy_(b.backups, b.emas)
                k = id(b)
                b.backend.perturb(b, inputs[k], sqs[k], carries.pop(k))
                done.append(b)
            b = None
        except BaseException:
            self._roll_back(done, b)
            raise
        self.inflight = done  # the commit point: from here on a failure restores
        self._committed(plan)
        # Autocast caches low-precision copies of the weights until its outermost block
        # exits: a second forward inside the same block would reuse the unperturbed ones.
        torch.clear_autocast_cache()

    def _committed(self, plan) -> None:
        self.buffers.commit(self._seen(plan))
        if plan.new_emas:
            plan.key = None  # the next step has no first sights: rebuild then
        self.found = self._found_on(plan.buckets[0].device) if plan.buckets else None

    def _seen(self, plan) -> dict:
        """The EMAs to enter into the state: a parameter whose first gradient was not finite
        has not been seen (the pass kept its zero EMA; its next finite gradient must seed
        it, not decay into it). This reads the found flag on the host: one synchronisation,
        only on a step that creates EMAs (a parameter's first step), never in the steady
        state."""
        new = plan.new_emas
        if plan.first_sights and self._found_on(plan.buckets[0].device).item():
            new = {p: m for p, m in new.items() if p not in plan.first_sights}
        return new

    def _roll_back(self, done, failed) -> None:
        self.plan = None
        for b in done:
            b.backend.restore(b)
        for b in (*done, failed):
            if b is not None and b.backups is not None:
                torch._foreach_copy_(b.emas, b.backups)

    # ------------------------------------------------------------------ second_step

    def restore(self, held: bool = True) -> None:
        """Give every perturbed weight back its saved bits (see the module docstring). Like
        every Engine method, it runs under the caller's ``torch.no_grad()``. SIGINT is held
        meanwhile (``held=False``: the caller holds signals already, as ``second_step``
        does); if a restore fails, the step stays in flight (restore can be called again)."""
        torch.clear_autocast_cache()  # (copies of the perturbed weights: see first_step)
        changed = []
        held = self._held_restore if held else _NO_HOLD
        with held:
            for b in self.inflight:
                if (
                    b.watch.unmoved()
                    if b.watch is not None and cpp_ops.eager()
                    else list(map(torch.Tensor.data_ptr, b.params)) == b.perturbed_ptrs
                ):
                    try:
                        b.backend.restore(b)
                        continue
                    except Exception:  # e.g. a view of another shape on the same storage
                        pass
                self.plan = None
                changed += _restore_each(b)
            self.inflight = None
        if changed:
            raise RuntimeError(
                "second_step(): " + "; ".join(changed) + " between first_step() and "
                "second_step(); every other parameter was restored and the base optimizer "
                "did not step"
            )
        held.deliver()

    # ------------------------------------------------------------------ introspection

    def summary(self) -> list[BucketSummary]:
        return [] if self.plan is None else [_summary(b) for b in self.plan.buckets]

    def backend_for(self, p) -> str | None:
        plan = self.plan
        if plan is not None:
            for b in plan.buckets:
                if any(q is p for q in (b.owners or b.params)):  # DTensors: their owners
                    return b.backend.name
        return None

    def passes(self) -> Passes:
        """The current plan's passes one at a time (benchmarks): see :class:`Passes`."""
        if self.plan is None or len(self.plan.buckets) != 1:
            raise RuntimeError("passes() needs a plan of exactly one bucket: take a step first")
        grads = self.plan.take_grads(list(map(_GRAD, self.plan.flat)))
        if grads is None:
            raise RuntimeError("passes(): the gradients no longer match the last step's plan")
        return Passes(self.plan.buckets[0], grads[0])


def _restore_each(b) -> list:
    """The slow path: one parameter at a time, for a bucket where some parameter's storage
    or view changed since first_step. Returns the parameters that could not be restored:
    a new storage of another shape, or a storage freed or shrunk in between."""
    changed = []
    swapped = b.backend.double_buffered(b)
    for i, (p, ptr) in enumerate(zip(b.params, b.perturbed_ptrs)):
        orig = b.backend.original(b, i)
        same_kind = p.dtype == orig.dtype and p.device == orig.device
        same_place = p.data_ptr() == ptr
        if p.shape != orig.shape:
            if same_place and same_kind:
                # Another view of the same storage (p.data = p.data.t(), p.data[:k]): the
                # storage gets its bits back, the parameter keeps the view it was given.
                if swapped[i]:
                    p.data = orig.as_strided(p.shape, p.stride())
                elif fits(p, orig.shape, orig.stride()):
                    p.data.as_strided(orig.shape, orig.stride()).copy_(orig)
                else:
                    changed.append(
                        f"the storage of the parameter planned as shape {tuple(orig.shape)} "
                        "was shrunk"
                    )
            else:
                changed.append(
                    f"the shape of the parameter planned as shape {tuple(orig.shape)} (now "
                    f"{tuple(p.shape)}) changed"
                )
        elif swapped[i] and (same_place or same_kind):
            p.data = orig  # the double buffer: the untouched home storage goes back
        elif not fits(p):
            # Its storage was freed or shrunk in between (untyped_storage().resize_(0), as
            # FSDP-style code does): a copy into it would write past its end.
            changed.append(
                f"the storage of the parameter of shape {tuple(p.shape)} was freed or shrunk "
                f"(now {p.untyped_storage().nbytes()} bytes)"
            )
        else:
            if not same_kind:
                warn_at_caller(
                    f"fsam_fused: a parameter of shape {tuple(p.shape)} became "
                    f"{p.dtype} on {p.device} between first_step() and "
                    f"second_step(); its saved {orig.dtype} value was cast"
                )
            p.data.copy_(orig)
    return changed


def _summary(b) -> BucketSummary:
    swap = b.backend.double_buffered(b)
    m_dtype = b.emas[0].dtype if b.emas else None
    w = b.dtype.itemsize
    m = m_dtype.itemsize if m_dtype else 0
    traffic = sum(
        bytes_per_step(p.numel(), w, m, b.emas is not None, a, s)
        for p, a, s in zip(b.params, b.adaptive, swap)
    )
    return BucketSummary(
        device=b.device,
        dtype=b.dtype,
        backend=b.backend.name,
        tensors=len(b.params),
        numel=b.numel,
        ema_dtype=m_dtype,
        double_buffered=swap,
        bytes_per_step=traffic,
        cheap_bytes_per_step=cheap_bytes_per_step(b.numel, w, m, b.emas is not None),
        aligned=b.backend.aligned(b),
    )


class Passes:
    """The three passes of a one-bucket plan, to time each alone: ``norm()`` returns the
    partial sums ``perturb(sq)`` takes; ``restore()`` undoes ``perturb``. They bypass the
    engine's checks and rollback: call them only between steps, in this order, and
    ``restore()`` after every ``perturb``."""

    def __init__(self, bucket, grads):
        self._b = bucket
        found = torch.zeros((), dtype=torch.float32, device=bucket.device)
        self._inputs = StepInputs(grads, None, found)
        self._carry = None

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        sq, self._carry = self._b.backend.norm(self._b, self._inputs)
        return sq

    @torch.no_grad()
    def perturb(self, sq: torch.Tensor) -> None:
        self._b.backend.perturb(self._b, self._inputs, sq, self._carry)

    @torch.no_grad()
    def restore(self) -> None:
        self._b.backend.restore(self._b)
