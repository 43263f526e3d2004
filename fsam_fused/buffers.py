"""The one owner of every per-parameter tensor F-SAM keeps beside the weights.

* the EMA ``m``: committed EMAs live in the optimizer's ``state[p]["ema"]`` (so
  ``state_dict`` carries them); an EMA created on a parameter's first sight is *staged*
  (handed to the plan, not yet in the state) and entered into the state only once the step
  that created it has succeeded;
* the saved copy of each weight (or, for a double-buffered parameter of the C++ backend, the
  spare buffer ``w + e`` is written into), in the parameter's dtype and strides;
* EMA backups, for the buckets that commit before the last one (see ``engine.py``).

Buffers are kept across plans (a rho schedule does not reallocate them) and dropped when
their parameter's shape, dtype, device or strides change. Nothing here is saved by
``state_dict`` or copied by ``copy.deepcopy``/pickle except the committed EMA, which is
optimizer state.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .hparams import EMA_DTYPES

# Bumped by every change to an FSAM optimizer's state (a parameter's entry added, replaced or
# removed, or one of its values set): a plan keeps the EMA tensors it was built with, and is
# reused only while this is unchanged, so ``opt.state[p]["ema"] = m`` is seen (and checked)
# by the next step. One counter for every optimizer: a change anywhere rebuilds every plan
# once, which costs nothing compared with a per-step scan of the state.
_version = [0]


def state_version() -> int:
    return _version[0]


def _bumps(name):
    method = getattr(dict, name)

    def bumped(self, *args, **kwargs):
        _version[0] += 1
        return method(self, *args, **kwargs)
    bumped.__name__ = name
    return bumped


_MUTATORS = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update",
             "__ior__")


class Slot(dict):
    """One parameter's state (``{"ema": m}``): a dict that records that it changed."""

    locals().update({name: _bumps(name) for name in _MUTATORS})


class State(defaultdict):
    """An FSAM optimizer's ``state``: ``defaultdict(Slot)`` that records that it changed."""

    locals().update({name: _bumps(name) for name in _MUTATORS})

    def __init__(self, *args):
        super().__init__(Slot, *args)

    def __setitem__(self, key, value):
        _version[0] += 1
        defaultdict.__setitem__(self, key, value if isinstance(value, Slot) else Slot(value))

    def __reduce__(self):  # pickles as itself, without the default factory argument
        return (State, (), None, None, iter(self.items()))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride())


class Buffers:
    def __init__(self):
        self.saved: dict = {}
        self.backups: dict = {}
        # Per-backend buffers (foreach's direction buffers): backend name -> {param: tensor}.
        self.scratch: dict = {}
        self.state = None  # the optimizer's state dict, set before each plan is built

    def saved_for(self, p: torch.Tensor) -> torch.Tensor:
        s = self.saved.get(p)
        if s is None or not _same_layout(s, p):
            # empty_like keeps the parameter's strides: the kernels walk all the buffers of
            # one parameter in the same storage order.
            s = self.saved[p] = torch.empty_like(p)
        return s

    def ema_for(self, p: torch.Tensor, dtype: torch.dtype):
        """``(m, first, staged)``: the committed EMA of ``p``; or a zero one if it has none
        (``first``); or, if the committed one has another dtype (``ema_dtype`` changed, a
        checkpoint from another setting) or another element order (the parameter changed
        memory format), the same values in ``dtype`` and the parameter's strides. A new or
        converted EMA is ``staged``: it enters the state only when the step succeeds."""
        st = self.state.get(p) if p in self.state else None
        m = st.get("ema") if st else None
        if m is None:
            # Zeros: the paper order starts from m = 0, and the official first sight reads m
            # with weight 0 (0 * garbage could be NaN).
            return torch.zeros_like(p, dtype=dtype), True, True
        check_ema(m, p)
        if m.dtype != dtype or m.stride() != p.stride():
            return torch.empty_like(p, dtype=dtype).copy_(m), False, True
        return m, False, False

    def backup_for(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b = self.backups.get(p)
        if b is None or not _same_layout(b, m):
            b = self.backups[p] = torch.empty_like(m)
        return b

    def for_backend(self, name: str) -> dict:
        return self.scratch.setdefault(name, {})

    def commit(self, new_emas: dict) -> None:
        for p, m in new_emas.items():
            self.state[p]["ema"] = m


def check_ema(m, p, where: str = "") -> None:
    """An EMA must be a tensor of its parameter's shape and device, of an EMA dtype."""
    if not torch.is_tensor(m):
        raise TypeError(f"the EMA of parameter {where or tuple(p.shape)} must be a tensor, got "
                        f"{type(m).__name__}")
    if m.shape != p.shape or m.device != p.device or m.dtype not in EMA_DTYPES \
            or m.layout != torch.strided or m.requires_grad:
        raise ValueError(f"the EMA of parameter {where or ''} (shape {tuple(p.shape)}, "
                         f"{p.device}) is a {m.layout} {m.dtype} tensor of shape "
                         f"{tuple(m.shape)} on {m.device}")
