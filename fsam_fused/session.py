"""The step session: the one owner of an F-SAM step's control.

:class:`StepSession` holds a step's state as an explicit :class:`Phase` and is the only
caller of the engine's passes (:class:`fsam_fused.engine.Engine`) and of the base optimizer's
step (:mod:`fsam_fused.base_step`). ``FSAM``'s step methods are one call each into it. It is
built from the param groups and the base optimizer, never from the ``FSAM`` object.

Phases::

    IDLE --first()--> PERTURBED --finish()--> IDLE
    IDLE --first(scaler)--> SCALED --finish(from scaler.step)--> IDLE
    PERTURBED/SCALED --step(closure) runs the closure--> IN_CLOSURE --> PERTURBED/SCALED
    PERTURBED/SCALED --a restore that raises--> RESTORE_FAILED --finish()/abandon()--> IDLE
    any perturbed phase --abandon()--> IDLE (weights restored, no base step)

With a perturbation schedule (:mod:`fsam_fused.schedules`), ``first()`` may take the cheap
step instead (the EMA updated, nothing perturbed): the same phases with ``cheap`` set, whose
``finish()`` restores nothing and steps the base on the first pass's gradients (refused if a
second backward rewrote them) and whose ``abandon()`` only ends the step.

Closures (``step(closure)``), told apart without reading a device value:

(a) **The authors' pattern** (davda54's SAM, the published F-SAM code): the caller ran the
    first forward/backward; the closure runs the second. Recognised when a gradient has been
    written since the last step (a new tensor, or a version counter moved past the one the
    last step or ``zero_grad(set_to_none=False)`` left).
(b) **torch.optim's pattern** (LBFGS, Composer, Lightning's automatic optimization): no
    gradient since the last step (``zero_grad()`` left ``None`` or zeros, or the previous
    step's gradients are untouched); the closure runs the step's only forward/backward. The
    session calls it twice: first pass, ``first_step``, second pass, ``second_step``, and
    returns the *first* call's value (the loss at the unperturbed weights, as
    torch.optim's closure convention has it).

The check reads host metadata of a sample of at most four gradients (those the last step's
plan had: the first, the last and two between), so it costs O(1) a step; when all four are
None it looks for any gradient at all. Gradients zeroed in place other than by
``FSAM.zero_grad(set_to_none=False)`` (``nn.Module.zero_grad(set_to_none=False)``,
``p.grad.zero_()``) cannot be told from written ones without reading them: the step then
follows pattern (a). Gradients left untouched on the sampled parameters while others were
rewritten are taken as pattern (b).
"""

from __future__ import annotations

import threading
import weakref

import torch

from . import _messages, amp, base_step, distributed, hooks, schedules
from .closures import Closures
from .engine import Engine
from .phase import Phase


class GradientSample:
    """Which closure convention a ``step(closure)`` follows (the module docstring): at most
    four ``(parameter, weak reference to its gradient, versions)`` the last step left,
    compared with what the parameters hold now. Weak: the sample must not keep a gradient
    that ``zero_grad()`` frees alive (the sampled ones are often the largest: an embedding,
    an LM head); a gradient that died was replaced, which is what a dead reference says."""

    __slots__ = ("left", "ran", "handles")

    def __init__(self):
        self.left: list | None = None
        self.ran, self.handles = False, []

    def first_pass_ran(self, groups) -> bool:
        """True if a gradient was written since the last step (pattern (a) in the module
        docstring); host metadata of at most four gradients, or of every parameter when
        all four are None (then any gradient at all is a written one)."""
        left = self.left
        if left is not None:
            none = True
            for p, ref, v in left:
                pg = p.grad
                if pg is not None:
                    if ref is None or pg is not ref() or pg._version not in v:
                        return True
                    none = False
            if not none:
                return False  # untouched (or only zeroed) since the last step
        return any(p.grad is not None for g in groups for p in g["params"])

    def note_zeroed(self) -> None:
        """After ``zero_grad(set_to_none=False)``: zeroed gradients are not a first pass."""
        left = self.left
        if left is not None:
            self.left = [
                (p, ref, v + (p.grad._version,))
                if ref is not None and p.grad is not None and p.grad is ref()
                else (p, ref, v)
                for p, ref, v in left
            ]

    def watch(self) -> None:
        """After a cheap ``first_step()``: note whether a backward accumulates into a sampled
        parameter's gradient before the step ends (a second pass that must not run). A
        post-accumulate-grad hook, not the version counter: clipping or unscaling the
        gradient in place in between is allowed."""
        self.ran, self.handles = False, []

        def hook(_):
            self.ran = True

        for p, _ref, _v in self.left or ():
            try:
                self.handles.append(p.register_post_accumulate_grad_hook(hook))
            except RuntimeError:  # (a tensor that takes no hooks: not watched)
                pass

    def unwatch(self) -> bool:
        """Remove :meth:`watch`'s hooks; True if a backward reached a watched parameter."""
        for h in getattr(self, "handles", ()):
            h.remove()
        self.handles = []
        return getattr(self, "ran", False)

    def leave(self, plan, groups=None) -> None:
        """Remember a sample of the gradients the step leaves, for :meth:`first_pass_ran`:
        from the plan's parameters with a gradient, or, without a plan (a step that failed),
        from ``groups``' parameters that have one."""
        if plan is not None:
            flat, have = plan.flat, plan.have
        elif groups is not None:
            flat = [p for g in groups for p in g["params"]]
            have = [i for i, p in enumerate(flat) if p.grad is not None]
        else:
            flat, have = [], []
        if not have:
            self.left = None
            return
        n = len(have)
        picks = sorted({0, n // 3, (2 * n) // 3, n - 1})
        sample = []
        for i in picks:
            p = flat[have[i]]
            g = p.grad
            sample.append((p, weakref.ref(g), (g._version,)) if g is not None else (p, None, ()))
        self.left = sample


class OneThread:
    """A step of one optimizer entered from a second thread while another is inside one
    raises instead of interleaving with it (which corrupts the weights silently). A
    non-blocking re-entrant lock: a closure that calls ``first_step()`` from the stepping
    thread gets the misuse error of its phase, not this one; two optimizers in two threads
    never contend."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "FSAM: another thread is stepping this optimizer; one optimizer takes one "
                "step at a time (nothing was modified; give each thread its own optimizer)"
            )
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


class StepSession(Closures, OneThread):
    """One optimizer's steps. ``groups``: the (shared) param-group list; ``base``: the base
    optimizer; ``key``: what a GradScaler knows the optimizer by (its ``id``); ``schedule``:
    on which steps to perturb (:mod:`fsam_fused.schedules`; None: every step)."""

    def __init__(self, groups, base, key: int, schedule=None):
        self.groups, self.base, self.key, self.schedule = groups, base, key, schedule
        self.cheap = False  # the step in flight is a schedule's cheap step (not perturbed)
        self.took: bool | None = None  # whether the last first half perturbed
        self.engine = Engine()
        self.phase = Phase.IDLE
        self.scaler = None  # the enabled GradScaler the step in flight was started with
        self.found: torch.Tensor | None = None  # the last step's non-finite flag
        self._resume = Phase.PERTURBED  # the phase IN_CLOSURE returns to
        self.sample = GradientSample()
        self._range = None  # the profiler range of the step in flight (hooks.py)
        super().__init__()

    # ------------------------------------------------------------------ queries

    @property
    def in_flight(self) -> bool:
        return self.phase is not Phase.IDLE

    @property
    def perturbed(self) -> bool:
        return self.phase is not Phase.IDLE and not self.cheap

    def refuse_mid_step(self, what: str) -> None:
        if self.in_flight:
            state = "the base step is pending" if self.cheap else "the weights are perturbed"
            raise RuntimeError(
                f"{what} between first_step() and second_step(): {state}; call "
                "second_step() (or abandon_step()) first"
            )

    # ------------------------------------------------------------------ FSAM's step API
    # ``opt`` is the optimizer the hooks report and whose zero_grad runs; ``inputs()`` gives
    # ``(structure, values, state)``, read only when a step begins.

    def first_step(self, opt, inputs, zero_grad: bool, scaler) -> bool:
        with self:
            rng, _, _ = hooks.begin(opt, (), {})
            try:
                if not self.in_flight:  # (init_state's template, when no load followed)
                    distributed.drop_unloaded_template(opt)
                st, values, state = inputs()
                snap = self.schedule.snapshot() if self.schedule is not None else None
                took = self.first(st, values, state, scaler, opt.nonfinite_group)
            except BaseException:
                hooks.close(rng)
                raise
            self._range = rng
            if zero_grad and took:  # (a cheap step's base step takes these gradients)
                try:
                    opt.zero_grad()
                except BaseException:  # (a signal handler's): all-or-nothing, restored
                    self.abandon_step()
                    if snap is not None:
                        self.schedule.restore(snap)  # (the step did not happen)
                    raise
            return took

    def second_step(self, opt, inputs, zero_grad: bool) -> None:
        with self:
            self._finish(opt, inputs, None, None)
            if zero_grad:
                opt.zero_grad()

    def step(self, opt, inputs, closure, grad_scale=None, found_inf=None):
        """``FSAM.step``: ``scaler.step(opt)``'s call (``found_inf`` given), a two-pass step
        finished (running ``closure`` first, as a framework's wrapper does), or a whole
        step with ``closure`` in either convention."""
        with self:
            if found_inf is not None:
                if closure is not None:
                    raise RuntimeError(_messages.SCALER_CLOSURE)
                if not self.in_flight:
                    raise RuntimeError(_messages.NO_FIRST_STEP)
                return self._finish(opt, inputs, grad_scale, found_inf)
            if closure is not None and not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            if self.in_flight:
                loss = None
                if closure is not None and not self.cheap:
                    try:
                        loss = self.second_pass(closure, fresh=False)
                    except BaseException:
                        self._end_range(None)
                        raise
                self._finish(opt, inputs, None, None)
                return loss
            if closure is None:
                raise RuntimeError(_messages.NO_FIRST_STEP)
            return self._whole(opt, inputs, closure)

    def abandon_step(self) -> bool:
        with self:
            done = self.abandon()
            self._end_range(None)
            return done

    def _finish(self, opt, inputs, grad_scale, found_inf) -> None:
        try:
            self.finish(grad_scale, found_inf, opt.skip_nonfinite, opt.nonfinite_group)
        except BaseException:
            if not self.in_flight:  # the step ended (restored): so does its range
                self._end_range(None)
            raise
        # A step taken through first/second_step is a step: tell an LR scheduler attached
        # to the optimizer (its warning looks only at whether optimizer.step ran).
        opt._opt_called = True
        self._end_range(opt)

    def _end_range(self, opt) -> None:
        """Close the step's range: with the post hooks (``opt`` given) or without."""
        rng, self._range = self._range, None
        if opt is None:
            hooks.close(rng)
        else:
            hooks.end(opt, rng, (), {})

    # ------------------------------------------------------------------ the two halves

    def first(self, st, values, state, scaler=None, group=None) -> bool:
        """``first_step``: perturb the weights (all-or-nothing; see the engine), or take the
        schedule's cheap step; True if it perturbed. ``group``: ``FSAM.nonfinite_group``."""
        if self.phase is Phase.IN_CLOSURE:
            raise RuntimeError(_messages.closure_called("first_step"))
        if self.in_flight:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already perturbed"
                if not self.cheap
                else "first_step() called twice without second_step(): the first one took a "
                "schedule's cheap step, whose base step second_step() takes"
            )
        inv, unscaled = (None, False) if scaler is None else amp.begin(scaler, self.key)
        sched = self.schedule
        snap = sched.snapshot() if sched is not None else None
        took = schedules.first_half(
            sched, self.engine, (st, values, self.groups, state), inv, group
        )
        self.phase, self.cheap, self.took = Phase.PERTURBED, not took, took
        try:
            self.found = self.engine.found
            if scaler is not None:
                if scaler.is_enabled():
                    self.scaler = scaler
                    self.phase = Phase.SCALED
                # A cheap step's base step takes the first pass's gradients, which the
                # caller's unscale_ already unscaled: the scaler keeps that record.
                amp.after_first_step(scaler, self.key, unscaled and took)
            if not took:
                self.sample.leave(self.engine.plan)
                self.sample.watch()  # (finish() refuses a second backward)
        except BaseException:
            # All-or-nothing also for an exception here (a signal handler's): the weights go
            # back, as after a failed second pass.
            self.abandon()
            if snap is not None:
                sched.restore(snap)
            raise
        return took

    def finish(self, grad_scale=None, found_inf=None, skip_nonfinite=False, group=None) -> None:
        """``second_step`` (or ``scaler.step(opt)``, which hands over ``grad_scale`` and
        ``found_inf``): restore, then the base step or its skip."""
        if self.phase is Phase.IN_CLOSURE:
            raise RuntimeError(_messages.closure_called("second_step"))
        if not self.in_flight:
            raise RuntimeError(
                "second_step() called before first_step(): there is no perturbation to undo"
            )
        scaler = self.scaler
        if scaler is not None and found_inf is None:
            raise RuntimeError(_messages.SCALED_SECOND_STEP)
        # The restore and the base step run with every signal held (main thread): a handler
        # that raises (a timeout) finds the step either still in flight or finished, never a
        # base optimizer stepped part-way (torch's for-loop SGD/Adam update parameter by
        # parameter). A signal is handed to its handler once the step is done.
        held = self.engine.held_step
        with held:
            cheap = self.cheap
            if cheap:
                self._end_cheap(check=True)
            else:
                self._restore(held=False)  # (this hold covers it)
            self.scaler = None
            if scaler is None and found_inf is not None:
                raise RuntimeError(_messages.UNSCALED_SCALER_STEP)
            self.found = base_step.run(
                self.base,
                self.groups,
                self.engine.found,
                scaler=scaler,
                grad_scale=grad_scale,
                found_inf=found_inf,
                key=self.key,
                skip_nonfinite=skip_nonfinite,
                group=group,
                plan=self.engine.plan,
                second=not cheap,
            )
            self.sample.leave(self.engine.plan)
        held.deliver()

    def abandon(self) -> bool:
        """Restore the weights of a step in flight without a base step; False if none was."""
        if self.phase is Phase.IN_CLOSURE:
            raise RuntimeError(_messages.closure_called("abandon_step"))
        if not self.in_flight:
            return False
        if self.cheap:
            self._end_cheap(check=False)
        else:
            self._restore()
        self.scaler = None
        return True

    def _end_cheap(self, check: bool) -> None:
        """End a cheap step (nothing to restore); ``check``: refuse to step the base on
        gradients a second backward wrote after ``first_step()`` returned False."""
        self.phase, self.cheap = Phase.IDLE, False
        if self.sample.unwatch() and check:
            self.scaler = None
            raise RuntimeError(_messages.CHEAP_SECOND_PASS)

    def _restore(self, held: bool = True) -> None:
        try:
            self.engine.restore(held)
        except BaseException:
            if self.engine.inflight is not None:
                self.phase = Phase.RESTORE_FAILED
            else:  # restored, but a parameter could not be (its shape changed)
                self.phase = Phase.IDLE
                self.scaler = None
            raise
        self.phase = Phase.IDLE
