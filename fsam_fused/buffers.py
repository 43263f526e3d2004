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

import torch

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

    def ema_for(self, p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """``(m, first)``: the committed EMA of ``p``, or a staged zero one if it has none."""
        st = self.state.get(p) if p in self.state else None
        m = st.get("ema") if st else None
        if m is None:
            # Zeros: the paper order starts from m = 0, and the official first sight reads m
            # with weight 0 (0 * garbage could be NaN).
            return torch.zeros_like(p, dtype=dtype), True
        check_ema(m, p)
        if m.stride() != p.stride():
            # The parameter changed memory format (or a checkpoint came from another layout):
            # same values, the parameter's element order.
            m = st["ema"] = torch.empty_like(p, dtype=m.dtype).copy_(m)
        return m, False

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
            or m.layout != torch.strided:
        raise ValueError(f"the EMA of parameter {where or ''} (shape {tuple(p.shape)}, "
                         f"{p.device}) is a {m.layout} {m.dtype} tensor of shape "
                         f"{tuple(m.shape)} on {m.device}")
