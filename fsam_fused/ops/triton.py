"""The Triton passes (``kernels/fsam.py``) as ``torch.library`` custom ops, for frozen steps
(``fsam_fused/compiled.py``): opaque to Dynamo and Inductor, with fake kernels and exact
``mutates_args``.

The kernels reach their tensors through device pointer tables, which hide every mutation
from Inductor's analysis of user Triton kernels; as custom ops the tensors they read and
write are arguments, and the schema says which are written. Each op finds its launcher
(:class:`fsam_fused.kernels.fsam.MultiTensorFSAM`, holding the tables) by ``handle``, and
first hands it the tensors it was called with: the tables are those tensors' addresses, so
an op called on other tensors (copies that Inductor or ``opcheck`` made) runs on them, at the
cost of a table upload; the steady state uploads nothing (the launcher compares addresses).
A frozen launcher is its own, never the eager backend's (whose tables an op call on copies
would otherwise repoint).

Imported only when Triton is (a Triton bucket is frozen).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

_LAUNCHERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_next = itertools.count(1)


def register(launcher) -> int:
    """A handle for ``launcher``, valid while it lives (its owner holds it)."""
    handle = next(_next)
    _LAUNCHERS[handle] = launcher
    return handle


def _launcher(handle, weights, emas, saved, rows, scalars, adaptive, grads=None):
    ln = _LAUNCHERS.get(handle)
    if ln is None:
        raise RuntimeError(
            f"fsam_fused: Triton launcher {handle} no longer exists (its plan was rebuilt): "
            "take an eager step, then compile or capture again"
        )
    frozen = capturing()
    ln.set_static(weights, emas or None, saved, (adaptive,) * len(weights), rows, scalars, frozen)
    if grads is not None:
        ln.set_grads(grads, frozen)
    return ln


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream (no upload may happen)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("fsam_fused::triton_norm_", mutates_args=("partials",))
def triton_norm_(
    handle: int,
    weights: list[Tensor],
    grads: list[Tensor],
    emas: list[Tensor],
    saved: list[Tensor],
    rows: Tensor,
    scalars: Tensor,
    partials: Tensor,
    paper: bool,
    adaptive: bool,
    inv_scale: Tensor | None,
) -> None:
    """The norm pass: ``partials[:n_programs]`` get the partial sums of squares."""
    ln = _launcher(handle, weights, emas, saved, rows, scalars, adaptive, grads)
    ln.norm_partials(partials, paper, inv_scale)


@triton_norm_.register_fake
def _(handle, weights, grads, emas, saved, rows, scalars, partials, paper, adaptive, inv_scale):
    return None


@torch.library.custom_op(
    "fsam_fused::triton_perturb_", mutates_args=("weights", "emas", "saved", "found")
)
def triton_perturb_(
    handle: int,
    weights: list[Tensor],
    grads: list[Tensor],
    emas: list[Tensor],
    saved: list[Tensor],
    sq: Tensor,
    rows: Tensor,
    scalars: Tensor,
    paper: bool,
    adaptive: bool,
    inv_scale: Tensor | None,
    found: Tensor,
) -> None:
    """EMA update, exact save and ``w + e`` (``found`` set on the device)."""
    ln = _launcher(handle, weights, emas, saved, rows, scalars, adaptive, grads)
    ln.perturb(sq, paper, found, inv_scale)


@triton_perturb_.register_fake
def _(handle, weights, grads, emas, saved, sq, rows, scalars, paper, adaptive, inv_scale, found):
    return None


@torch.library.custom_op("fsam_fused::triton_restore_", mutates_args=("weights",))
def triton_restore_(
    handle: int,
    weights: list[Tensor],
    emas: list[Tensor],
    saved: list[Tensor],
    rows: Tensor,
    scalars: Tensor,
    adaptive: bool,
) -> None:
    """``w <- saved``, bit for bit."""
    _launcher(handle, weights, emas, saved, rows, scalars, adaptive).restore()


@triton_restore_.register_fake
def _(handle, weights, emas, saved, rows, scalars, adaptive):
    return None
