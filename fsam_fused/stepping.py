"""The routing of FSAM's step methods: which engine call, GradScaler hand-off, closure and
framework-wrapper case each of ``first_step``, ``second_step`` and ``step`` is (the methods
in :mod:`fsam_fused.optimizer` delegate here; the step itself is the engine's)."""

from __future__ import annotations

import functools

import torch

from . import _messages, amp, distributed
from .distributed import _TEMPLATE


def exclusive(fn):
    """Issue 14: a step method of one optimizer entered from a second thread while another
    thread is inside one raises instead of interleaving with it (which corrupts the weights
    silently). A non-blocking re-entrant lock: the same thread may re-enter (step(closure)
    calls first_step and second_step); two optimizers in two threads never contend."""

    @functools.wraps(fn)
    def run(opt, *args):
        engine = opt.__dict__.get("engine")
        if engine is None:  # a wrapper (Lightning's): its FSAM's own methods take the lock
            return fn(opt, *args)
        lock = engine.lock
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                f"FSAM.{fn.__name__}(): another thread is stepping this optimizer; one "
                "optimizer takes one step at a time (nothing was modified)"
            )
        try:
            return fn(opt, *args)
        finally:
            lock.release()

    return run


def _wrapped(opt):
    """The FSAM inside a wrapper that borrows its class (Lightning's ``LightningOptimizer``
    has FSAM among its bases but not its ``__dict__``), or None for an FSAM itself: the step
    methods must run on the optimizer GradScaler and the state know."""
    if "engine" in opt.__dict__:
        return None
    inner = getattr(opt, "optimizer", None)
    if _is_fsam(inner) and "engine" in inner.__dict__:
        return inner
    raise TypeError(f"{type(opt).__name__} is not an initialised FSAM optimizer")


def _is_fsam(obj) -> bool:
    from .optimizer import FSAM

    return isinstance(obj, FSAM)


@exclusive
def first_step(opt, zero_grad, grad_scaler):
    """``FSAM.first_step``: the engine's first_step, with a GradScaler's 1/scale if given."""
    inner = _wrapped(opt)
    if inner is not None:
        return inner.first_step(zero_grad, grad_scaler)
    if opt.engine.inflight is not None:
        if opt._in_closure:
            raise RuntimeError(_messages.closure_called("first_step"))
        raise RuntimeError(
            "first_step() called twice without second_step(): the weights are already perturbed"
        )
    if _TEMPLATE in opt.__dict__:  # issue 14: init_state(opt) with no load since
        distributed.drop_template(opt)
    inv, unscaled = (None, False) if grad_scaler is None else amp.begin(grad_scaler, opt)
    opt.engine.first_step(opt._config(opt), opt.param_groups, opt.state, inv)
    try:
        opt._nonfinite = opt.engine.found
        if grad_scaler is not None:
            opt._scaler = grad_scaler if grad_scaler.is_enabled() else None
            amp.after_first_step(grad_scaler, opt, unscaled)
        if zero_grad:
            opt.zero_grad()
    except BaseException:
        # Issue 14: all-or-nothing also for an exception here (a signal handler's): the
        # weights go back, as after a failed second pass.
        opt._scaler = None
        opt.engine.restore()
        raise


@exclusive
def second_step(opt, zero_grad):
    """``FSAM.second_step``: :func:`finish` without a GradScaler."""
    inner = _wrapped(opt)
    if inner is not None:
        return inner.second_step(zero_grad)
    finish(opt, None, None)
    if zero_grad:
        opt.zero_grad()


def finish(opt, grad_scale, found_inf):
    """Restore, then the base step (or its skip); ``grad_scale``/``found_inf``: what
    ``scaler.step(opt)`` handed ``step()``, or None."""
    if opt._in_closure:
        raise RuntimeError(_messages.closure_called("second_step"))
    if opt.engine.inflight is None:
        raise RuntimeError(
            "second_step() called before first_step(): there is no perturbation to undo"
        )
    scaler = opt._scaler
    if scaler is not None and found_inf is None:
        raise RuntimeError(
            "first_step() took grad_scaler=scaler: finish the step with "
            "scaler.step(opt), then scaler.update() (the second pass's "
            "gradients are scaled; the weights are still perturbed)"
        )
    # Issue 14: the restore and the base step run with every signal held (main thread), so
    # a handler that raises (a timeout) finds the step either still in flight or finished,
    # never a base optimizer stepped part-way (torch's for-loop SGD/Adam update parameter by
    # parameter). A signal is handed to its handler once the step is done.
    held = opt.engine.held_step
    with held:
        opt._scaler = None
        opt.engine.restore()
        if scaler is None and found_inf is not None:
            raise RuntimeError(
                "scaler.step(opt) after a first_step() without grad_scaler: "
                "the first pass's gradients were scaled. Pass "
                "grad_scaler=scaler to first_step(). The weights are restored "
                "and the base optimizer did not step"
            )
        amp.base_step(opt, scaler, grad_scale, found_inf)
        opt.engine.leave()
        # A step taken through first/second_step is a step: tell an LR scheduler attached
        # to this object (torch's warning about scheduler.step() before optimizer.step()
        # looks only at optimizer.step, which this path does not call).
        opt._opt_called = True
    held.deliver()


@exclusive
def step(opt, closure):
    """``FSAM.step``: ``scaler.step(opt)``'s call, a step finished after ``first_step()``,
    or ``first_step`` + the closure's second pass + ``second_step``."""
    grad_scale, found_inf = amp.from_scaler_step(opt)
    if found_inf is not None:
        # Called by scaler.step(opt): it deletes the two attributes once step() returns,
        # not if it raises; then they must not outlive this call.
        try:
            if closure is not None:
                raise RuntimeError(_messages.SCALER_CLOSURE)
            if opt.engine.inflight is None:
                raise RuntimeError(_messages.NO_FIRST_STEP)
            return finish(opt, grad_scale, found_inf)
        except BaseException:
            amp.forget_scaler_step(opt)
            raise
    if closure is None:
        if opt.engine.inflight is not None:
            return opt.second_step()
        raise RuntimeError(_messages.NO_FIRST_STEP)
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if opt.engine.inflight is not None and not opt._in_closure:
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            opt._scaler = None
            opt.engine.restore()
            raise
        opt.second_step()
        return loss
    if opt.check_stale_grads and opt.engine.stale():
        raise RuntimeError(_messages.STALE)
    opt.first_step()
    opt._in_closure = True
    try:
        loss = opt.engine.second_pass(opt.param_groups, closure)
    finally:
        opt._in_closure = False
    opt.second_step()
    return loss
