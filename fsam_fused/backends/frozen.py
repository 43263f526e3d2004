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

import torch

from ..ops import frozen as frozen_ops


def _own_tensors(f, b) -> None:
    """What every frozen bucket keeps: its found flag (set by the perturb pass), a float64
    scratch value (``1 - lmbda``) and a float64 one, and the static-address marks that let a CUDA graph tree
    (``torch.compile(mode="reduce-overhead")``) keep the tensors the passes write in place
    instead of skipping the graph for mutated inputs."""
    f.found = torch.zeros((), dtype=torch.float32, device=b.device)
    # (shape [1], not 0-dim: torch 2.13 compiled a 0-dim float64 CPU tensor's in-place
    # updates into nothing, under aot_eager and Inductor alike)
    f.scratch = torch.zeros(1, dtype=torch.float64, device=b.device)
    f.one = torch.ones(1, dtype=torch.float64, device=b.device)
    for t in (*f.saved, *f.emas, f.rows, f.scalars, f.found, f.scratch, f.one):
        torch._dynamo.mark_static_address(t)


class CppFrozen:
    """The C++ passes over a bucket as custom ops (``fsam_fused/ops/frozen.py``), every
    tensor copied (never swapped)."""

    __slots__ = ("params", "emas", "saved", "rows", "scalars", "paper", "found", "scratch", "one")

    def __init__(self, b):
        # The parameters themselves (the ops detach them): a graph that also runs the model
        # then sees the perturbation as a mutation of the parameters.
        self.params = b.params
        self.emas = b.emas if b.emas is not None else []
        self.saved = b.saved
        self.rows, self.scalars, self.paper = b.rows, b.scalars, b.paper
        _own_tensors(self, b)

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
    __slots__ += ("paper", "adaptive", "partials", "found", "scratch", "one")

    def __init__(self, b):
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
        _own_tensors(self, b)
        torch._dynamo.mark_static_address(self.partials)

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
