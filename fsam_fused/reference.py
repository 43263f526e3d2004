"""Unfused F-SAM backends: the readable reference and the ``torch._foreach_*`` baseline.

Every backend implements the same three passes over a :class:`Bucket` (the parameters of one
device and dtype that have a gradient this step):

``norm_partials(b)``
    Returns a float32 1-D tensor on ``b.device`` whose *sum* is this bucket's share of the
    squared global norm ``sum (a * d)**2``. The optimizer combines buckets by summing these
    sums of squares, never norms of norms.
``perturb(b, sq)``
    ``sq``: float32 1-D tensor on ``b.device`` whose sum is the squared global norm. Updates
    the EMA, saves an exact copy of each weight into ``b.saved`` and writes ``w + e``.
``restore(b)``
    Copies ``b.saved`` back into the weights.

The reference backend is the executable statement of ``SEMANTICS.md``; the others are
tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-12


@dataclass
class Bucket:
    """Parameters of one device and dtype that have a gradient this step, in group order.

    The optimizer keeps a bucket across steps while nothing but the gradients changes: it
    refreshes ``grads`` and clears ``scratch`` every step. ``scratch_static`` lives as long as
    the bucket, for what a backend derives from the other fields once.
    """

    device: torch.device
    dtype: torch.dtype
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    emas: list | None = None  # float32 EMA tensors, or None when sigma == 0
    saved: list = field(default_factory=list)  # buffers for the exact copy of each weight
    rhos: list = field(default_factory=list)
    adaptive: list = field(default_factory=list)
    first: list = field(default_factory=list)  # True where the EMA was created this step
    sigma: float = 0.0
    lmbda: float = 0.0
    paper: bool = False  # EMA order: "paper" (Algorithm 1) instead of "official"
    scratch: dict = field(default_factory=dict)  # per-step data a backend keeps between passes
    scratch_static: dict = field(default_factory=dict)
    index: list = field(default_factory=list)  # positions in the optimizer's flat param list
    # False lets a backend double-buffer: write w + e into `saved` and swap storages instead of
    # copying w there (only the C++ backend does; see FSAM's ``fixed_addresses``).
    fixed_addresses: bool = True


def opmath(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float32 for 16-bit storage, else the storage dtype."""
    return torch.promote_types(dtype, torch.float32)


class ReferenceBackend:
    """A deliberately plain loop over parameters, one SEMANTICS.md step at a time."""

    name = "reference"

    def norm_partials(self, b: Bucket) -> torch.Tensor:
        directions, squares = [], []
        for i, (p, g) in enumerate(zip(b.params, b.grads)):
            ct = opmath(p.dtype)
            g = g.to(ct)
            if b.emas is None:  # sigma == 0: plain SAM, no EMA read or written
                d = g
            else:
                m = b.emas[i]
                m_old = m.to(ct)
                if b.paper:
                    # Algorithm 1: m starts at zero; update m, then d = g - sigma * m.
                    m_new = m_old * b.lmbda + g * (1 - b.lmbda)
                    d = g - m_new * b.sigma
                elif b.first[i]:
                    # Official order, first sight of this parameter: m <- g, d <- g.
                    m_new = g
                    d = g
                else:
                    # Official order: d uses the EMA from *before* this step's update.
                    d = g - m_old * b.sigma
                    m_new = m_old * b.lmbda + g * (1 - b.lmbda)
                # Written in pass 2 with the weights, so an error before then changes nothing.
                b.scratch.setdefault("m_new", {})[i] = m_new
            directions.append(d)
            a = p.to(ct).abs() if b.adaptive[i] else 1.0
            squares.append((a * d).float().pow(2).sum())
        b.scratch["d"] = directions
        return torch.stack(squares) if squares else torch.zeros(1, device=b.device)

    def perturb(self, b: Bucket, sq: torch.Tensor) -> None:
        norm = sq.sum().sqrt()
        for i, (p, d) in enumerate(zip(b.params, b.scratch.pop("d"))):
            ct = opmath(p.dtype)
            if b.emas is not None:
                b.emas[i].copy_(b.scratch["m_new"][i])
            scale = (b.rhos[i] / (norm + EPS)).to(ct)
            w = p.to(ct)
            a2 = w * w if b.adaptive[i] else 1.0
            e = scale * a2 * d
            b.saved[i].copy_(p)
            p.copy_(w + e)  # computed in opmath, rounded once to the storage dtype
        b.scratch.pop("m_new", None)

    def restore(self, b: Bucket) -> None:
        for p, s in zip(b.params, b.saved):
            p.copy_(s)


class ForeachBackend:
    """The same math with ``torch._foreach_*`` ops: the strongest unfused baseline.

    Every op runs in place on persistent buffers: a fresh full-size temporary per step costs
    page faults on the CPU (large blocks go back to the OS when freed) and allocator traffic
    on CUDA. The direction ``d`` lives in one buffer per parameter and becomes ``e`` in place.
    """

    name = "foreach"

    def __init__(self):
        self._d = {}  # param -> buffer for d (then e), in the arithmetic dtype

    def _buffers(self, b: Bucket, ct):
        # Looked up once per plan (the bucket lives while only gradients change); the dict
        # keeps the buffers across plans, so a rho schedule does not reallocate them.
        d = b.scratch_static.get("foreach_d")
        if d is None:
            d = []
            for p in b.params:
                buf = self._d.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != ct or \
                        buf.device != p.device:
                    buf = self._d[p] = torch.empty_like(p, dtype=ct)
                d.append(buf)
            b.scratch_static["foreach_d"] = d
        return d

    def norm_partials(self, b: Bucket) -> torch.Tensor:
        ct = opmath(b.dtype)
        d = self._buffers(b, ct)
        torch._foreach_copy_(d, b.grads)  # d <- g (up-cast)
        if b.emas is not None:
            if b.paper:
                # d <- g - sigma * (lmbda * m + (1 - lmbda) * g), the updated EMA, expanded
                # so that it needs no temporary: (1 - sigma (1 - lmbda)) g - sigma lmbda m.
                torch._foreach_mul_(d, 1 - b.sigma * (1 - b.lmbda))
                torch._foreach_add_(d, b.emas, alpha=-b.sigma * b.lmbda)
            else:
                # d <- g - sigma * m_old (m is zero on first sight, so d == g there)
                torch._foreach_add_(d, b.emas, alpha=-b.sigma)
        b.scratch["d"] = d
        ad = d
        if any(b.adaptive):
            ad = [torch.abs(p) * di if a else di for p, di, a in zip(b.params, d, b.adaptive)]
        return torch.stack(torch._foreach_norm(ad, 2)).float().square()

    def perturb(self, b: Bucket, sq: torch.Tensor) -> None:
        ct = opmath(b.dtype)
        d = b.scratch.pop("d")
        if b.emas is not None:
            # The EMA is fed the raw g; in place, and only now that nothing can fail early.
            first = [i for i, f in enumerate(b.first) if f and not b.paper]
            rest = [i for i, f in enumerate(b.first) if not f or b.paper]
            if first:
                torch._foreach_copy_([b.emas[i] for i in first], [b.grads[i] for i in first])
            if rest:
                m = [b.emas[i] for i in rest]
                low = m[0].dtype != ct  # a 16-bit EMA: compute in ct, round once
                m_ct = [x.to(ct) for x in m] if low else m
                torch._foreach_mul_(m_ct, b.lmbda)
                torch._foreach_add_(m_ct, [b.grads[i].to(ct) for i in rest], alpha=1 - b.lmbda)
                if low:
                    torch._foreach_copy_(m, m_ct)
        norm_eps = sq.sum().sqrt() + EPS
        torch._foreach_copy_(b.saved, b.params)
        for i, p in enumerate(b.params):
            if b.adaptive[i]:
                w = p.to(ct)
                d[i].mul_(w).mul_(w)
        # e = (rho / (N + eps)) * a^2 * d, in place in d; one scale tensor per distinct rho.
        rhos = sorted(set(b.rhos))
        for rho in rhos:
            scale = (rho / norm_eps).to(ct)
            idx = range(len(d)) if len(rhos) == 1 else [i for i, r in enumerate(b.rhos) if r == rho]
            torch._foreach_mul_([d[i] for i in idx], scale)
        if ct == b.dtype:
            torch._foreach_add_(b.params, d)
        else:
            torch._foreach_add_(d, b.saved)  # w + e in the arithmetic dtype ...
            torch._foreach_copy_(b.params, d)  # ... rounded once to the storage dtype

    def restore(self, b: Bucket) -> None:
        torch._foreach_copy_(b.params, b.saved)
