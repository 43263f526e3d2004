"""The passes of a frozen step (``fsam_fused/compiled.py``) as ``torch.library`` custom ops on
every device: opaque to Dynamo and Inductor, with fake kernels and exact ``mutates_args``.

``fsam_fused::cpp_*`` wrap the C++ ops (``ops/cpp.py``): they take the parameters themselves
and detach them inside. In a graph that also runs the model, the perturbation must reach the
parameters as a mutation of the parameters (AOTAutograd refuses two graph inputs that share
storage when one is mutated, so detached aliases kept from the plan cannot be passed), and
Inductor hands a training graph's primals to the op as they are (requiring grad), which the
C++ ops refuse to write. The C++ ops' own checks run inside (sizes, strides, devices, dtypes,
overlaps, finite values), before any write.

``fsam_fused::triton_*`` are the Triton passes (``kernels/fsam.py``), defined in
:mod:`fsam_fused.ops.triton` (imported only when Triton is).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpp


def _detached(ts: list[Tensor]) -> list[Tensor]:
    return [t.detach() for t in ts]


@torch.library.custom_op("fsam_fused::cpp_norm", mutates_args=())
def cpp_norm(
    weights: list[Tensor],
    grads: list[Tensor],
    emas: list[Tensor],
    rows: Tensor,
    scalars: Tensor,
    paper: bool,
    inv_scale: Tensor | None,
) -> Tensor:
    """``fsam_fused::norm_sq`` on the detached weights (a 1-element float32 tensor)."""
    return cpp.norm_sq(_detached(weights), grads, emas, rows, scalars, paper, inv_scale)


@cpp_norm.register_fake
def _(weights, grads, emas, rows, scalars, paper, inv_scale):
    return rows.new_empty(1, dtype=torch.float32)


@torch.library.custom_op(
    "fsam_fused::cpp_perturb_", mutates_args=("weights", "emas", "saved", "found")
)
def cpp_perturb_(
    weights: list[Tensor],
    grads: list[Tensor],
    emas: list[Tensor],
    saved: list[Tensor],
    sq: Tensor,
    rows: Tensor,
    scalars: Tensor,
    paper: bool,
    inv_scale: Tensor | None,
    found: Tensor,
) -> None:
    """``fsam_fused::perturb_`` with every tensor copied (never swapped)."""
    cpp.perturb_(
        _detached(weights),
        grads,
        emas,
        saved,
        sq,
        rows,
        scalars,
        [0] * len(weights),
        paper,
        inv_scale,
        found,
    )


@cpp_perturb_.register_fake
def _(weights, grads, emas, saved, sq, rows, scalars, paper, inv_scale, found):
    return None


@torch.library.custom_op("fsam_fused::cpp_restore_", mutates_args=("weights",))
def cpp_restore_(weights: list[Tensor], saved: list[Tensor]) -> None:
    """``fsam_fused::restore_`` on the detached weights."""
    cpp.restore_(_detached(weights), saved)


@cpp_restore_.register_fake
def _(weights, saved):
    return None
