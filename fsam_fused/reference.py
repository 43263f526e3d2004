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
    """Parameters of one device and dtype that have a gradient this step, in group order."""

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
    """The same math with ``torch._foreach_*`` ops: the strongest unfused baseline."""

    name = "foreach"

    @staticmethod
    def _upcast(ts, ct):
        return [t if t.dtype == ct else t.to(ct) for t in ts]

    def norm_partials(self, b: Bucket) -> torch.Tensor:
        ct = opmath(b.dtype)
        g = self._upcast(b.grads, ct)
        if b.emas is None:
            d = g
        else:
            m = self._upcast(b.emas, ct)
            m_new = list(torch._foreach_mul(m, b.lmbda))
            torch._foreach_add_(m_new, g, alpha=1 - b.lmbda)
            if b.paper:
                d = torch._foreach_add(g, m_new, alpha=-b.sigma)
            else:
                d = torch._foreach_add(g, m, alpha=-b.sigma)
                # First sight: m <- g (m is zero there, so d == g already).
                for i in (i for i, f in enumerate(b.first) if f):
                    m_new[i] = g[i]
            b.scratch["m_new"] = m_new
        ad = d
        if any(b.adaptive):
            w = self._upcast(b.params, ct)
            ad = [torch.abs(wi) * di if a else di for wi, di, a in zip(w, d, b.adaptive)]
        b.scratch["d"] = d
        norms = torch._foreach_norm(ad, 2)
        return torch.stack(norms).float().square()

    def perturb(self, b: Bucket, sq: torch.Tensor) -> None:
        ct = opmath(b.dtype)
        d = b.scratch.pop("d")
        if b.emas is not None:
            torch._foreach_copy_(b.emas, b.scratch.pop("m_new"))
        norm_eps = sq.sum().sqrt() + EPS
        # One scale tensor per distinct rho: groups usually share it.
        scales = {rho: (rho / norm_eps).to(ct) for rho in set(b.rhos)}
        torch._foreach_copy_(b.saved, b.params)
        w = self._upcast(b.params, ct)
        if any(b.adaptive):
            d = [wi * wi * di if a else di for wi, di, a in zip(w, d, b.adaptive)]
        e = [di * scales[rho] for di, rho in zip(d, b.rhos)] if len(scales) > 1 else \
            torch._foreach_mul(d, scales[b.rhos[0]])
        if ct == b.dtype:
            torch._foreach_add_(b.params, e)
        else:
            torch._foreach_add_(w, e)
            torch._foreach_copy_(b.params, w)  # one rounding to the storage dtype

    def restore(self, b: Bucket) -> None:
        torch._foreach_copy_(b.params, b.saved)
