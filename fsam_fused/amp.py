"""Mixed precision: the one place that touches ``torch.amp.GradScaler``'s internals.

F-SAM takes two gradients per step, GradScaler expects one. The recipe
(``docs/training-loops.md``)::

    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)   # unscaled inside the passes
    scaler.scale(loss_at_w_plus_e).backward()
    scaler.step(opt)                                      # restore, unscale, base step or skip
    scaler.update()

What this module relies on, pinned by ``tests/test_amp.py`` on the torch versions we support
(2.11 and 2.13; the protocol dates from torch 2.1):

* ``scaler._scale``: the scale, a float32 device tensor, created by the first ``scale()``;
  ``1/scale`` is computed as ``unscale_`` does (``_scale.double().reciprocal().float()``).
* ``scaler._per_optimizer_states[id(opt)]``: ``{"stage": OptState, "found_inf_per_device":
  {device: float32 tensor}}``, reset by ``update()``, which sums every ``found_inf`` in it
  and backs the scale off if the sum is non-zero.
* The ``_step_supports_amp_scaling`` protocol: for an optimizer with that attribute True,
  ``scaler.step(opt)`` checks the gradients for infs (``_check_inf_per_device``, without
  unscaling them), sets ``opt.grad_scale`` (the scale, or None if ``unscale_`` already ran)
  and ``opt.found_inf``, calls ``opt.step()`` and deletes both attributes.

The first pass's ``found_inf`` is added to the scaler's per-device record in
:func:`finish`, so ``update()`` backs off for a non-finite first pass exactly as for a
one-pass optimizer whose gradients overflowed.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.amp.grad_scaler import GradScaler, OptState

__all__ = ["GradScaler", "begin", "after_first_step", "finish", "unscale_and_check"]


def begin(scaler, key: int):
    """Checks for ``first_step(grad_scaler=scaler)``, before anything is modified.

    Returns ``(inv_scale, unscaled)``: ``inv_scale`` is the 1/scale the first pass's
    gradients are multiplied by inside the passes (None if the scaler is disabled or the
    gradients were already unscaled); ``unscaled`` is True when the caller ran
    ``scaler.unscale_(opt)`` after the first backward (then the stage is reset once the first
    step succeeded, so the second pass can be unscaled too)."""
    if not isinstance(scaler, GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None, False
    scale = scaler._scale
    if scale is None:
        raise RuntimeError(
            "grad_scaler: the scaler has no scale yet; call "
            "scaler.scale(loss).backward() before opt.first_step(grad_scaler="
            "scaler)"
        )
    stage = scaler._per_optimizer_states[key]["stage"]
    if stage is OptState.STEPPED:
        raise RuntimeError(
            "grad_scaler: scaler.step() has already been called since the last "
            "scaler.update(); call scaler.update() at the end of each step"
        )
    if stage is OptState.UNSCALED:
        return None, True
    return scale.double().reciprocal().float(), False


def after_first_step(scaler, key: int, unscaled: bool) -> None:
    """After a successful first step: a first pass the caller unscaled with
    ``scaler.unscale_(opt)`` is forgotten by the scaler (FSAM's own found flag carries its
    inf check to :func:`finish`), so ``unscale_`` may run again for the second pass."""
    if unscaled:
        scaler._per_optimizer_states[key] = {
            "stage": OptState.READY,
            "found_inf_per_device": {},
        }


def from_scaler_step(opt):
    """``(grad_scale, found_inf)`` that ``scaler.step(opt)`` set on ``opt`` for this call
    (None, None when ``step`` was not called by a GradScaler)."""
    d = opt.__dict__
    if "found_inf" not in d:
        return None, None
    return d.get("grad_scale"), d["found_inf"]


def forget_scaler_step(opt) -> None:
    """Drop what a ``scaler.step(opt)`` that raised left on ``opt``."""
    opt.__dict__.pop("grad_scale", None)
    opt.__dict__.pop("found_inf", None)


def finish(scaler, key: int, first_found, found_inf):
    """Merge the first pass's found flag into what ``scaler.update()`` reads and return the
    step's combined found flag (a 0-dim float32 tensor on the scaler's device): non-zero
    when either pass saw a non-finite gradient. No host synchronisation."""
    st = scaler._per_optimizer_states[key]
    per_device = st["found_inf_per_device"]
    if not torch.is_tensor(found_inf):  # sum([]) == 0: no second-pass gradient at all
        found_inf = torch.zeros((), dtype=torch.float32, device=scaler._scale.device)
    if first_found is None:
        return found_inf
    first = first_found.reshape(())
    dev = first.device
    # New tensors, never ours: update() adds into the first of its list in place.
    per_device[dev] = per_device[dev] + first if dev in per_device else first.clone()
    # At most 1: torch's fused SGD/Adam/AdamW skip only when found_inf == 1.0, and a cheap
    # step's overflow is seen by both checks (the scaler re-checks the same gradient).
    return (found_inf + first.to(found_inf.device, non_blocking=True)).clamp_(max=1.0)


def unscale_and_check(params, inv_scale=None) -> torch.Tensor | None:
    """Multiply every ``.grad`` of ``params`` by ``inv_scale`` in place (None: by nothing)
    and return a 0-dim float32 found flag on the first gradient's device (None if no
    parameter has a gradient), with torch's own fused op (one pass per device and dtype)."""
    groups = defaultdict(list)
    for p in params:
        g = p.grad
        if g is not None:
            groups[(g.device, g.dtype)].append(g._values() if g.is_sparse else g)
    if not groups:
        return None
    home = next(iter(groups))[0]
    found = torch.zeros((), dtype=torch.float32, device=home)
    per_dev = {home: found}
    for (dev, _), grads in groups.items():
        f = per_dev.get(dev)
        if f is None:
            f = per_dev[dev] = torch.zeros((), dtype=torch.float32, device=dev)
        inv = (
            torch.ones((), dtype=torch.float32, device=dev)
            if inv_scale is None
            else inv_scale.reshape(()).to(dev, non_blocking=True)
        )
        torch._amp_foreach_non_finite_check_and_unscale_(grads, f, inv)
    for dev, f in per_dev.items():
        if dev != home:
            found.add_(f.to(home, non_blocking=True))
    return found
