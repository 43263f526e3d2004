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

DTensor parameters (FSDP2): the buffers are keyed by, and shaped like, the parameter's local
shard; its EMA is kept in the state as a DTensor with the parameter's mesh and placements
whose local tensor is the buffer the kernels update (so ``torch.distributed.checkpoint``
saves it sharded, like the parameter).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import distributed
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


_MUTATORS = (
    "__setitem__",
    "__delitem__",
    "clear",
    "pop",
    "popitem",
    "setdefault",
    "update",
    "__ior__",
)


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
        # A parameter's state becomes a Slot; anything else (torch.optim lets hooks keep
        # non-parameter entries, e.g. ``opt.state["epoch"] = 3``) is kept as it is.
        if torch.is_tensor(key) and not isinstance(value, Slot):
            value = Slot(value)
        defaultdict.__setitem__(self, key, value)

    def __reduce__(self):  # pickles as itself, without the default factory argument
        return (State, (), None, None, iter(self.items()))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def fits(t: torch.Tensor, shape=None, stride=None) -> bool:
    """``t``'s storage holds every element its view (or ``shape``/``stride`` at its offset)
    addresses: False after ``t.untyped_storage().resize_(0)`` (FSDP-style code frees
    parameters so), when a copy into it would write past its end."""
    shape, stride = (t.shape, t.stride()) if shape is None else (shape, stride)
    if any(n == 0 for n in shape):
        return True
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return t.untyped_storage().nbytes() >= (t.storage_offset() + extent) * t.element_size()


class Buffers:
    def __init__(self):
        self.saved: dict = {}
        self.backups: dict = {}
        # Per-backend buffers (foreach's direction buffers): backend name -> {param: tensor}.
        self.scratch: dict = {}
        self.state = None  # the optimizer's state dict, set before each plan is built

    def saved_for(self, p: torch.Tensor) -> torch.Tensor:
        s = self.saved.get(p)
        # (A double buffer's spare is the parameter's storage during the second pass: code
        # that freed the parameter's storage then freed the spare.)
        if s is None or not _same_layout(s, p) or not fits(s):
            # empty_like keeps the parameter's strides: the kernels walk all the buffers of
            # one parameter in the same storage order.
            s = self.saved[p] = torch.empty_like(p)
        return s

    def ema_for(self, p: torch.Tensor, dtype: torch.dtype, local=None):
        """``(m, first, staged)``: ``m`` is the tensor the kernels update (for a DTensor
        parameter, whose local shard is ``local``, the EMA's local shard); ``first`` when
        ``p`` has no EMA yet (then ``m`` is zeros); ``staged`` is the entry to put in the state
        once the step succeeds, or None when the committed EMA is used as it is: a new EMA, or
        the committed one converted to ``dtype`` (``ema_dtype`` changed, a checkpoint from
        another setting) or to the parameter's element order (it changed memory format)."""
        st = self.state.get(p) if p in self.state else None
        m = st.get("ema") if st else None
        if local is None:
            local = p
        sharded = local is not p
        if m is None:
            # Zeros: the paper order starts from m = 0, and the official first sight reads m
            # with weight 0 (0 * garbage could be NaN).
            m = torch.zeros_like(local, dtype=dtype)
            return m, True, (distributed.like(m, p) if sharded else m)
        check_ema(m, p)
        if sharded:
            check_sharded_ema(m, p)
            ml = m._local_tensor
            if ml.shape != local.shape or ml.device != local.device:
                raise ValueError(
                    f"the EMA of the DTensor parameter of shape {tuple(p.shape)} "
                    f"has a local shard of shape {tuple(ml.shape)} on "
                    f"{ml.device}, the parameter's is {tuple(local.shape)} on "
                    f"{local.device}"
                )
            if ml.dtype != dtype or ml.stride() != local.stride():
                ml = torch.empty_like(local, dtype=dtype).copy_(ml)
                return ml, False, distributed.like(ml, p)
            return ml, False, None
        if m.dtype != dtype or m.stride() != p.stride():
            m = torch.empty_like(p, dtype=dtype).copy_(m)
            return m, False, m
        return m, False, None

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


def check_sharded_ema(m, p, where: str = "") -> None:
    """The EMA of a DTensor parameter is a DTensor with its mesh and placements; that of a
    plain tensor is not a DTensor."""
    if distributed.is_dtensor(p):
        if not distributed.is_dtensor(m):
            raise ValueError(
                f"the EMA of the DTensor parameter {where or tuple(p.shape)} is a "
                f"{type(m).__name__}; it must be a DTensor with the parameter's "
                f"placements {tuple(p.placements)} (save and load sharded state "
                "with torch.distributed.checkpoint)"
            )
        if m.device_mesh != p.device_mesh or tuple(m.placements) != tuple(p.placements):
            raise ValueError(
                f"the EMA of the DTensor parameter {where or tuple(p.shape)} has "
                f"placements {tuple(m.placements)} on {m.device_mesh}, the "
                f"parameter {tuple(p.placements)} on {p.device_mesh}"
            )
    elif distributed.is_dtensor(m):
        raise ValueError(
            f"the EMA of the plain-tensor parameter {where or tuple(p.shape)} is a DTensor"
        )


def check_ema(m, p, where: str = "") -> None:
    """An EMA must be a tensor of its parameter's shape and device, of an EMA dtype."""
    if not torch.is_tensor(m):
        raise TypeError(
            f"the EMA of parameter {where or tuple(p.shape)} must be a tensor, got "
            f"{type(m).__name__}"
        )
    if (
        m.shape != p.shape
        or m.device != p.device
        or m.dtype not in EMA_DTYPES
        or m.layout != torch.strided
        or m.requires_grad
    ):
        raise ValueError(
            f"the EMA of parameter {where or ''} (shape {tuple(p.shape)}, "
            f"{p.device}) is a {m.layout} {m.dtype} tensor of shape "
            f"{tuple(m.shape)} on {m.device}"
        )
