"""The step engine: one F-SAM step, from the plan to the base optimizer's update.

``first_step``:

1. **plan** (:mod:`.plan`): reuse the plan while only gradients changed (each gradient's
   dtype, shape, device and layout checked against it), else rebuild it with every check;
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
  first write (issue 14: a real out-of-memory changes nothing). Signals are held back while
  the buckets are written (issue 14: every signal with a Python handler, not only SIGINT:
  a SIGALRM or SIGTERM timeout's handler raising at any bytecode would leave the weights
  half written), in the main thread, and handed to their handlers once they are; SIGINT
  (Ctrl-C, ``_thread.interrupt_main``) is also held while they are restored. If a handler
  raises (the default SIGINT one raises KeyboardInterrupt), or anything raises between the
  commit and the return of ``FSAM.first_step``, the weights are restored first, as after a
  failed second pass (below); a handler that only sets a flag, or an ignored SIGINT, lets
  the step complete. An exception anywhere before the write region leaves everything as it
  was; one that interrupts a restore leaves the step in flight, to be restored again.
  ``second_step`` (``stepping.finish``) holds every signal across its restore and base step
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
* ``step(closure)`` with exactly the gradients the previous step left (a sample of them:
  the same tensors at the same version counters, :meth:`Engine.stale`) is refused before anything is modified (no backward ran: a framework owns the
  closure).
* ``second_step`` restores every parameter it can, also when one's storage changed between
  the two steps (``p.data = ...``, ``model.half()``: the saved value is copied into the new
  storage, cast if the dtype changed, with a warning); a parameter given another view of the
  same storage (``p.data = p.data.t()``) has its storage restored and keeps its view; one
  given new storage of another shape cannot be restored, and the error names it after every
  other parameter is restored. The base optimizer does not step then. If a restore itself
  fails, the step stays in flight (the optimizer still says the weights are perturbed) and
  ``restore`` can be called again.

A capturable mode (CUDA graphs, ``torch.compile``) would plug in at the plan: a plan frozen
after warm-up (no rebuild, no per-step metadata or address checks inside the captured step,
those run once at capture), hyper-parameters as device tensors in the backends' tables
instead of Python floats, and the passes registered as custom ops (the C++ ones already are,
with fake kernels) so a compiled graph can call them.
"""

from __future__ import annotations

# The C-level signal functions: the `signal` module's Python wrappers convert enums on every
# call, which costs more than the rest of the hold (measured 6 us against 0.4 us a step).
import _signal  # noqa: E402
import os
import signal
import threading
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter

import torch

from . import backends, reduce
from ._warnings import warn_at_caller
from .buffers import Buffers, state_version
from .hparams import Config
from .plan import Plan, build
from .traffic import bytes_per_step

_SIGINT = 2 if not hasattr(_signal, "SIGINT") else _signal.SIGINT
_GETSIGNAL = _signal.getsignal
_PYTHON_HANDLER = callable  # SIG_DFL, SIG_IGN (ints) and None (set outside Python) are not
# Every signal a Python handler can be installed for (SIGKILL and SIGSTOP cannot be caught).
_CATCHABLE = tuple(
    int(s)
    for s in signal.valid_signals()
    if s not in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))
)
_GRAD = attrgetter("grad")


class _Held:
    """Signals held back while a step writes or restores its buckets (main thread only),
    then handed to the handlers they were meant for.

    Issue 14: every signal with a Python handler, not only SIGINT: a handler that raises
    (a SIGALRM or SIGTERM timeout, a job scheduler's) runs in the main thread at any
    bytecode, and inside the write region it would leave the weights half written. Python
    runs handlers only at bytecode boundaries of the main thread, whichever thread the OS
    delivered the signal to (so blocking it with pthread_sigmask would not do: another
    thread takes it); swapping the Python-level handler for a recorder is what holds it.
    SIGINT is swapped whatever its handler (SIG_DFL: the process is then ended by
    :meth:`deliver`, as it would have been). Cost: one C-level scan of the handler table
    (about 1-2 us a first_step, measured) and two ``signal.signal`` calls per signal that has a
    Python handler."""

    __slots__ = ("prev", "caught", "every")

    def __init__(self, every: bool = True):
        # every=False: SIGINT only (the restore: a signal that interrupts it leaves the step
        # in flight, and a restore can run again, so it need not pay for the scan)
        self.prev, self.caught, self.every = None, [], every

    def __enter__(self):
        # Issue 14: forget an earlier step's handlers, or a step in a worker thread after one
        # in the main thread would call signal.signal (main thread only) on exit and raise.
        self.caught, self.prev = [], None
        if threading.current_thread() is threading.main_thread():
            prev = {}
            try:
                # (C-level iteration: the scan is most of the cost; SIGINT always)
                if self.every:
                    handled = map(_PYTHON_HANDLER, map(_GETSIGNAL, _CATCHABLE))
                    for s in compress(_CATCHABLE, handled):
                        prev[s] = _signal.signal(s, self._catch)
                if _SIGINT not in prev and _signal.getsignal(_SIGINT) is not None:
                    prev[_SIGINT] = _signal.signal(_SIGINT, self._catch)
                self.prev = prev
            except (ValueError, TypeError, OSError):  # no signal module support here
                self._put_back(prev)
        return self

    def _catch(self, signum, frame):
        self.caught.append((signum, frame))

    @staticmethod
    def _put_back(prev) -> None:
        for s, h in (prev or {}).items():
            _signal.signal(s, h)

    def __exit__(self, exc_type, *exc):
        self._put_back(self.prev)
        if exc_type is not None and self.caught:
            # The block failed (and rolled back): the signals it held are not lost but
            # raised again, for their own handlers to run next, as Python would have.
            caught, self.caught = self.caught, []
            for signum, _ in caught:
                _signal.raise_signal(signum)
        return False

    def deliver(self) -> None:
        """Run the handlers the signals were meant for, in arrival order: the default SIGINT
        handler raises KeyboardInterrupt, a user's may only set a flag or raise, an ignored
        one stays ignored, and SIGINT's SIG_DFL ends the process as it would have. If one
        raises, the signals after it are raised again (their handlers are back in place, so
        Python runs them next, as it would have) and the exception propagates."""
        caught, prev = self.caught, self.prev or {}
        self.caught = []
        for i, (signum, frame) in enumerate(caught):
            h = prev.get(signum)
            try:
                if callable(h):
                    h(signum, frame)
                elif signum == _SIGINT and h == _signal.SIG_DFL:
                    os.kill(os.getpid(), _SIGINT)
            except BaseException:
                for later, _ in caught[i + 1 :]:
                    _signal.raise_signal(later)
                raise


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
    aligned: bool | None  # Triton: every address 16-byte aligned (128-bit accesses)


class Engine:
    """Runs the steps of one optimizer; owns its plan, buffers and backend instances."""

    def __init__(self):
        self.buffers = Buffers()
        self.backends = {}
        self.plan: Plan | None = None
        self.inflight: list | None = None  # buckets perturbed by first_step, until restored
        self._held = _Held()
        self._held_restore = _Held(every=False)
        self.held_step = _Held()  # second_step's restore and base step (stepping.finish)
        # Issue 14: one step at a time per optimizer (stepping.exclusive); re-entrant, as
        # step(closure) calls first_step and second_step.
        self.lock = threading.RLock()
        # device -> 0-dim float32: set by the perturb pass, 1.0 when the first pass's
        # sum of squares was not finite. ``found`` is the last step's (the first bucket's).
        self._found: dict = {}
        self.found: torch.Tensor | None = None
        self.left = None  # what the last step left, for stale()

    # ------------------------------------------------------------------ plan

    def _backend(self, name):
        be = self.backends.get(name)
        if be is None:
            be = self.backends[name] = backends.CLASSES[name](self.buffers)
        return be

    def _select(self, cfg: Config):
        def select(cfg_, device, dtype, ema_dtype, dense):
            return self._backend(backends.select(cfg.backend, device, dtype, ema_dtype, dense))

        return select

    def plan_for(self, cfg: Config, groups, state) -> Plan:
        key = (id(state), state_version(), [(id(g["params"]), len(g["params"])) for g in groups])
        plan = self.plan
        if plan is not None and plan.cfg is cfg and plan.key == key:
            grads = list(map(_GRAD, plan.flat))
            if plan.every:
                # (take_grads also turns down a None: a parameter without a gradient)
                if list(map(torch.Tensor.data_ptr, plan.flat)) == plan.ptrs and plan.take_grads(
                    grads
                ):
                    return plan
            else:
                have = [i for i, g in enumerate(grads) if g is not None]
                if (
                    have == plan.have
                    and [plan.flat[i].data_ptr() for i in have] == plan.ptrs
                    and plan.take_grads(grads)
                ):
                    return plan
        self.plan = None
        self.buffers.state = state
        plan = build(cfg, groups, self._select(cfg), self.buffers)
        plan.cfg, plan.key = cfg, key
        self.plan = plan
        return plan

    # ------------------------------------------------------------------ first_step

    def _found_on(self, device) -> torch.Tensor:
        f = self._found.get(device)
        if f is None:
            f = self._found[device] = torch.zeros((), dtype=torch.float32, device=device)
        return f

    def first_step(self, cfg: Config, groups, state, inv_scale=None) -> None:
        """``inv_scale``: None, or a 1-element float32 tensor (a GradScaler's 1/scale, on the
        parameters' device) every first-pass gradient is multiplied by inside the passes."""
        previous = self.plan
        plan = self.plan_for(cfg, groups, state)
        inv = inv_scale
        try:
            if inv is not None and any(b.device != inv.device for b in plan.buckets):
                inv = {d: inv.to(d, non_blocking=True) for d in {b.device for b in plan.buckets}}
            parts = []
            for b in plan.buckets:
                b.inv = inv[b.device] if type(inv) is dict else inv
                part, b.carry = b.backend.norm(b, b.inv)
                parts.append(part)
            for b, sq in zip(plan.buckets, reduce.combine(parts, plan.buckets)):
                b.sq = sq
        except Exception:
            self.plan = None
            if plan is previous:
                # A reused plan leaves some per-step checks to the kernels (the C++ ops check
                # devices): the full checks of a new plan name what is wrong more clearly.
                self.plan_for(cfg, groups, state)
                self.plan = None
            raise
        except BaseException:
            self.plan = None  # re-check everything next time
            raise
        held = self._held
        try:
            with held:
                self._write(plan)
            held.deliver()
        except BaseException:
            # A signal's handler raised (by default SIGINT's, KeyboardInterrupt), or
            # something between the commit and here did: give the weights back, as after a
            # failed second pass (issue 14: any exception, not only SIGINT's).
            if self.inflight is not None:
                self.restore()
            raise

    def _write(self, plan) -> None:
        """The write region, run with signals held (:class:`_Held`): only the code's own
        exceptions can arise in it, and they roll back."""
        done = []
        b = None
        try:
            for b in plan.commit:
                if b.backups is not None:
                    torch._foreach_copy_(b.backups, b.emas)
                b.backend.perturb(b, b.sq, b.carry, b.inv, self._found_on(b.device))
                b.carry = None  # the reference's carry holds full-size tensors
                done.append(b)
            b = None
        except BaseException:
            self._roll_back(done, b)
            raise
        self.inflight = done  # the commit point: from here on a failure restores
        self.buffers.commit(self._seen(plan))
        if plan.new_emas:
            plan.key = None  # the next step has no first sights: rebuild then
        self.found = self._found_on(plan.buckets[0].device) if plan.buckets else None
        # Autocast caches low-precision copies of the weights until its outermost block
        # exits: a second forward inside the same block would reuse the unperturbed ones.
        torch.clear_autocast_cache()

    def _seen(self, plan) -> dict:
        """The EMAs to enter into the state: issue 14, a parameter whose first gradient was
        not finite has not been seen (the pass kept its zero EMA; its next finite gradient
        must seed it, not decay into it). This reads the found flag on the host: one
        synchronisation, only on a step that creates EMAs (a parameter's first step), never
        in the steady state."""
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

    # ------------------------------------------------------------------ stale gradients

    def leave(self) -> None:
        """After the base step: remember a sample of the gradients the step leaves (up to
        four: the first, the last and two between, each tensor with its version counter;
        host metadata only, O(1) a step) for :meth:`stale`."""
        plan = self.plan
        if plan is None:
            self.left = None
            return
        flat = plan.flat
        n = len(flat)
        picks = sorted({0, n // 3, (2 * n) // 3, n - 1}) if n else []
        sample = []
        for i in picks:
            p = flat[i]
            g = p.grad
            if g is not None:
                sample.append((p, g, g._version))
        self.left = sample or None

    def stale(self) -> bool:
        """True if every sampled parameter still holds the very gradient tensor the last step
        left, unmodified (same object, same version counter): no backward ran since (a
        backward writes new tensors or bumps the versions of all of them, as does
        ``zero_grad``), so a perturbation would follow a stale gradient."""
        left = self.left
        if left is None:
            return False
        for p, g, v in left:
            if p.grad is not g or g._version != v:
                return False
        return True

    # ------------------------------------------------------------------ second_step

    def second_pass(self, groups, closure):
        """Run ``closure`` (the second forward and backward) on fresh gradients, as
        ``step(closure)`` does. If it raises, the weights are restored and the first pass's
        ``.grad`` given back (the EMA keeps this step's update: see the module docstring)."""
        params = [p for g in groups for p in g["params"]]
        first_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                return closure()
        except BaseException:
            self.restore()
            for p, g in zip(params, first_grads):
                p.grad = g
            raise

    def restore(self) -> None:
        """Give every perturbed weight back its saved bits (see the module docstring). Like
        every Engine method, it runs under the caller's ``torch.no_grad()``. SIGINT is held
        meanwhile; if a restore fails, the step stays in flight (restore can be called
        again)."""
        torch.clear_autocast_cache()  # (copies of the perturbed weights: see first_step)
        changed = []
        held = self._held_restore
        with held:
            for b in self.inflight:
                if list(map(torch.Tensor.data_ptr, b.params)) == b.perturbed_ptrs:
                    try:
                        b.backend.restore(b)
                        continue
                    except Exception:  # e.g. a view of another shape on the same storage
                        pass
                self.plan = None
                changed += self._restore_each(b)
            self.inflight = None
        if changed:
            raise RuntimeError(
                "second_step(): the shape of " + "; ".join(changed) + " changed between "
                "first_step() and second_step(); every other parameter was restored and the "
                "base optimizer did not step"
            )
        held.deliver()

    @staticmethod
    def _restore_each(b) -> list:
        """The slow path: one parameter at a time, for a bucket where some parameter's storage
        or view changed since first_step. Returns the parameters that could not be restored:
        a new storage of another shape."""
        changed = []
        swapped = getattr(b.prep, "swap", None) or [0] * len(b.params)
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
                    else:
                        p.data.as_strided(orig.shape, orig.stride()).copy_(orig)
                else:
                    changed.append(
                        f"the parameter planned as shape {tuple(orig.shape)} (now {tuple(p.shape)})"
                    )
            elif swapped[i] and (same_place or same_kind):
                p.data = orig  # the double buffer: the untouched home storage goes back
            else:
                if not same_kind:
                    warn_at_caller(
                        f"fsam_fused: a parameter of shape {tuple(p.shape)} became "
                        f"{p.dtype} on {p.device} between first_step() and "
                        f"second_step(); its saved {orig.dtype} value was cast"
                    )
                p.data.copy_(orig)
        return changed

    # ------------------------------------------------------------------ introspection

    def summary(self) -> list[BucketSummary]:
        plan = self.plan
        if plan is None:
            return []
        out = []
        for b in plan.buckets:
            swap = tuple(bool(s) for s in getattr(b.prep, "swap", [0] * len(b.params)))
            m_dtype = b.emas[0].dtype if b.emas else None
            w = b.dtype.itemsize
            m = m_dtype.itemsize if m_dtype else 0
            traffic = sum(
                bytes_per_step(p.numel(), w, m, b.emas is not None, a, s)
                for p, a, s in zip(b.params, b.adaptive, swap)
            )
            out.append(
                BucketSummary(
                    device=b.device,
                    dtype=b.dtype,
                    backend=b.backend.name,
                    tensors=len(b.params),
                    numel=b.numel,
                    ema_dtype=m_dtype,
                    double_buffered=swap,
                    bytes_per_step=traffic,
                    aligned=getattr(b.prep, "aligned", None),
                )
            )
        return out

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
        return Passes(self.plan.buckets[0])


class Passes:
    """The three passes of a one-bucket plan, to time each alone: ``norm()`` returns the
    partial sums ``perturb(sq)`` takes; ``restore()`` undoes ``perturb``. They bypass the
    engine's checks and rollback: call them only between steps, in this order, and
    ``restore()`` after every ``perturb``."""

    def __init__(self, bucket):
        self._b = bucket
        self._carry = None

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        sq, self._carry = self._b.backend.norm(self._b, None)
        return sq

    @torch.no_grad()
    def perturb(self, sq: torch.Tensor) -> None:
        found = getattr(self, "_found", None)
        if found is None:
            found = self._found = torch.zeros((), dtype=torch.float32, device=self._b.device)
        self._b.backend.perturb(self._b, sq, self._carry, None, found)

    @torch.no_grad()
    def restore(self) -> None:
        self._b.backend.restore(self._b)
