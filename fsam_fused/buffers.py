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

import torch

from . import distributed
from .hparams import EMA_DTYPES


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

    def ema_for(self, p: torch.Tensor, dtype: torch.dtype, local=None):
        """``(m, first, entry)``: the committed EMA of ``p``, or a staged zero one if it has
        none; ``entry`` is what the state holds (``m`` itself, or for a DTensor parameter,
        whose local shard is ``local``, the DTensor whose local tensor ``m`` is)."""
        st = self.state.get(p) if p in self.state else None
        m = st.get("ema") if st else None
        if local is None:
            local = p
        if m is None:
            # Zeros: the paper order starts from m = 0, and the official first sight reads m
            # with weight 0 (0 * garbage could be NaN).
            m = torch.zeros_like(local, dtype=dtype)
            return m, True, (distributed.like(m, p) if local is not p else m)
        check_ema(m, p)
        if local is not p:
            check_sharded_ema(m, p)
            ml = m._local_tensor
            if ml.shape != local.shape or ml.device != local.device:
                raise ValueError(f"the EMA of the DTensor parameter of shape {tuple(p.shape)} "
                                 f"has a local shard of shape {tuple(ml.shape)} on "
                                 f"{ml.device}, the parameter's is {tuple(local.shape)} on "
                                 f"{local.device}")
            if ml.stride() != local.stride():
                ml = torch.empty_like(local, dtype=ml.dtype).copy_(ml)
                m = st["ema"] = distributed.like(ml, p)
            return ml, False, m
        if m.stride() != p.stride():
            # The parameter changed memory format (or a checkpoint came from another layout):
            # same values, the parameter's element order.
            m = st["ema"] = torch.empty_like(p, dtype=m.dtype).copy_(m)
        return m, False, m

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
            raise ValueError(f"the EMA of the DTensor parameter {where or tuple(p.shape)} is a "
                             f"{type(m).__name__}; it must be a DTensor with the parameter's "
                             f"placements {tuple(p.placements)} (save and load sharded state "
                             "with torch.distributed.checkpoint)")
        if m.device_mesh != p.device_mesh or tuple(m.placements) != tuple(p.placements):
            raise ValueError(f"the EMA of the DTensor parameter {where or tuple(p.shape)} has "
                             f"placements {tuple(m.placements)} on {m.device_mesh}, the "
                             f"parameter {tuple(p.placements)} on {p.device_mesh}")
    elif distributed.is_dtensor(m):
        raise ValueError(f"the EMA of the plain-tensor parameter {where or tuple(p.shape)} "
                         "is a DTensor")


def check_ema(m, p, where: str = "") -> None:
    """An EMA must be a tensor of its parameter's shape and device, of an EMA dtype."""
    if not torch.is_tensor(m):
        raise TypeError(f"the EMA of parameter {where or tuple(p.shape)} must be a tensor, got "
                        f"{type(m).__name__}")
    if m.shape != p.shape or m.device != p.device or m.dtype not in EMA_DTYPES \
            or m.layout != torch.strided:
        raise ValueError(f"the EMA of parameter {where or ''} (shape {tuple(p.shape)}, "
                         f"{p.device}) is a {m.layout} {m.dtype} tensor of shape "
                         f"{tuple(m.shape)} on {m.device}")
