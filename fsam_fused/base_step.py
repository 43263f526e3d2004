"""The base optimizer's step after the restore, and the rules that skip it.

A step is skipped when a pass saw a non-finite gradient, and who decides depends on what is
known without a host synchronisation:

* with a GradScaler (``scaler.step(opt)`` handed ``grad_scale``/``found_inf``): the first
  pass's flag is merged into the scaler's record (:func:`fsam_fused.amp.finish`); a base that
  reads ``grad_scale``/``found_inf`` (torch's fused SGD, Adam, AdamW) unscales and skips on
  the device; any other is unscaled here and skipped after the one synchronisation GradScaler
  itself makes;
* ``skip_nonfinite=True``: the second pass is checked too, and any base is skipped after one
  synchronisation (documented on the option);
* otherwise a fused base skips on the first pass's flag on the device, and any other base
  steps (on the second gradient, taken at the unperturbed weights).

The base's step is called without torch.optim's step hooks and profiler range: those belong
to the F-SAM step (``FSAM``'s own), which would otherwise be reported twice, the second time
attributed to the base optimizer.
"""

from __future__ import annotations

import torch

from . import amp, distributed


def _step(base) -> None:
    """``base.step()`` without the hook/profiler wrapper torch.optim puts around it. An LR
    scheduler attached to the base patches ``step`` on the instance only to set
    ``_opt_called``: that is done here instead (its wrapper would call the hooked step). Any
    other instance-level patch is called as it is."""
    fn = type(base).step
    inner = getattr(fn, "__wrapped__", None) if getattr(fn, "hooked", False) else None
    patch = base.__dict__.get("step")
    if inner is None or (patch is not None and not getattr(patch, "_wrapped_by_lr_sched", False)):
        base.step()
    else:
        inner(base)
        base._opt_called = True  # what an LR scheduler attached to the base reads


def _params(groups) -> list:
    return [p for g in groups for p in g["params"]]


def _device_step(base, grad_scale, found_inf) -> None:
    """A base optimizer that reads ``grad_scale``/``found_inf`` unscales and skips on the
    device: no host synchronisation."""
    base.grad_scale, base.found_inf = grad_scale, found_inf
    try:
        _step(base)
    finally:
        del base.grad_scale, base.found_inf


def run(
    base,
    groups,
    first,
    *,
    scaler=None,
    grad_scale=None,
    found_inf=None,
    key=None,
    skip_nonfinite=False,
    group=None,
    plan=None,
    second=True,
) -> torch.Tensor | None:
    """Step (or skip) ``base`` after the restore (``groups``: the param groups, read only by
    the rules that unscale or check the second gradients). ``first``: the first pass's found flag (a
    0-dim device tensor) or None; ``scaler``/``grad_scale``/``found_inf``: the GradScaler the
    step started with and what ``scaler.step`` handed over, ``key`` what the scaler knows
    the optimizer by; ``group``/``plan``: see :func:`fsam_fused.distributed.agreed_found`;
    ``second``: False for a schedule's cheap step (its one gradient is the first pass's,
    already checked: ``skip_nonfinite`` does not check it again).
    Returns the step's combined found flag (None when nothing checked it)."""
    device_skip = getattr(base, "_step_supports_amp_scaling", False)
    if scaler is not None or skip_nonfinite or (device_skip and first is not None):
        # This decision reads the first pass's flag, which may differ between data-parallel
        # ranks (DDP's per-replica mode): every rank decides on all of them.
        first = distributed.agreed_found(first, group, plan)
    if scaler is not None:
        found = amp.finish(scaler, key, first, found_inf)
        if device_skip:
            _device_step(base, grad_scale, found)
        else:
            if grad_scale is not None:
                amp.unscale_and_check(_params(groups), grad_scale.double().reciprocal().float())
            if not found.item():  # the one synchronisation GradScaler itself makes
                _step(base)
        return found
    if skip_nonfinite:
        second = amp.unscale_and_check(_params(groups)) if second else None
        found = (
            first
            if second is None
            else second
            if first is None
            else second + first.to(second.device)
        )
        if found is None or not found.item():  # the documented synchronisation
            _step(base)
        return found
    if device_skip and first is not None:
        _device_step(base, None, first)
    else:
        _step(base)
    return first
