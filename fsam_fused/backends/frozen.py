"""A bucket's passes for a frozen plan: what a compiled (``torch.compile``) or captured
(CUDA graph, ``capturable=True``) step calls (``fsam_fused/compiled.py``).

A frozen step runs only the fused custom ops on tensors that the plan fixed: no Python
branch on a device value, no allocation beyond the ops' own outputs, no table upload, no
``p.data`` swap. So the C++ backend's double buffering is not used here: every parameter
gets the exact-copy path (``swap`` all zeros: the saved buffer, a spare one for a swapped
parameter, is the same tensor either way, and between steps every parameter holds its own
storage again). The passes are opaque ops to Dynamo and Inductor (``torch.ops.fsam_fused.*``
with fake kernels and exact ``mutates_args``): never traced Python.

Only the fused backends can be frozen: the foreach and reference passes are Python, which
Inductor would trace and could reorder (a ``saved.copy_(p); p.add_(e)`` was seen compiled
with the saved copy holding the perturbed weights).
"""

from __future__ import annotations

from ..ops import frozen as frozen_ops


class CppFrozen:
    """The C++ passes over a bucket as custom ops (``fsam_fused/ops/frozen.py``), every
    tensor copied (never swapped)."""

    __slots__ = ("params", "emas", "saved", "rows", "scalars", "paper")

    def __init__(self, b):
        # The parameters themselves (the ops detach them): a graph that also runs the model
        # then sees the perturbation as a mutation of the parameters.
        self.params = b.params
        self.emas = b.emas if b.emas is not None else []
        self.saved = b.saved
        self.rows, self.scalars, self.paper = b.rows, b.scalars, b.paper

    def norm(self, grads, inv):
        return frozen_ops.cpp_norm(
            self.params, grads, self.emas, self.rows, self.scalars, self.paper, inv
        )

    def perturb(self, grads, sq, inv, found) -> None:
        frozen_ops.cpp_perturb_(
            self.params,
            grads,
            self.emas,
            self.saved,
            sq,
            self.rows,
            self.scalars,
            self.paper,
            inv,
            found,
        )

    def restore(self) -> None:
        frozen_ops.cpp_restore_(self.params, self.saved)


class TritonFrozen:
    """The Triton passes over a bucket as custom ops (``fsam_fused/ops/triton.py``), with a
    launcher of their own (its tables uploaded by the first op call, then only when an
    address changes) and a partials buffer made here, once per plan."""

    __slots__ = ("ops", "launcher", "handle", "params", "emas", "saved", "rows", "scalars")
    __slots__ += ("paper", "adaptive", "partials")

    def __init__(self, b):
        import torch

        from ..kernels import fsam as kernels
        from ..ops import triton as triton_ops

        m_dtype = b.emas[0].dtype if b.emas else torch.float32
        self.ops = triton_ops
        self.launcher = kernels.MultiTensorFSAM(b.device, b.dtype, m_dtype)
        self.handle = triton_ops.register(self.launcher)
        self.params, self.saved = b.params, b.saved
        self.emas = b.emas if b.emas is not None else []
        self.rows, self.scalars, self.paper = b.rows, b.scalars, b.paper
        self.adaptive = any(b.adaptive)
        # As many partials as the launcher will have programs (MultiTensorFSAM.set_static).
        chunks = sum(-(-p.numel() // kernels.CHUNK) for p in b.params)
        n = min(chunks, kernels.max_programs(b.device))
        self.partials = torch.zeros(max(n, 1), dtype=torch.float32, device=b.device)

    def norm(self, grads, inv):
        self.ops.triton_norm_(
            self.handle,
            self.params,
            grads,
            self.emas,
            self.saved,
            self.rows,
            self.scalars,
            self.partials,
            self.paper,
            self.adaptive,
            inv,
        )
        return self.partials

    def perturb(self, grads, sq, inv, found) -> None:
        self.ops.triton_perturb_(
            self.handle,
            self.params,
            grads,
            self.emas,
            self.saved,
            sq,
            self.rows,
            self.scalars,
            self.paper,
            self.adaptive,
            inv,
            found,
        )

    def restore(self) -> None:
        self.ops.triton_restore_(
            self.handle, self.params, self.emas, self.saved, self.rows, self.scalars, self.adaptive
        )


def frozen_passes(b):
    """The frozen passes of bucket ``b`` (after its backend's ``prepare``), or None when its
    backend cannot run frozen (foreach, reference)."""
    name = b.backend.name
    if name == "cpp":
        return CppFrozen(b)
    if name == "triton":
        return TritonFrozen(b)
    return None
