"""The ``torch._foreach_*`` backend: the same math as the reference, a few multi-tensor ops
per pass; the strongest unfused baseline, on any device and dtype.

Every op runs in place on persistent buffers: a fresh full-size temporary per step costs page
faults on the CPU (large blocks go back to the OS when freed) and allocator traffic on CUDA.
The direction ``d`` lives in one buffer per parameter and becomes ``e`` in place. Values are
0-dim device tensors (views of the bucket's rows, :mod:`fsam_fused.rows`), never host floats.
"""

from __future__ import annotations

import torch

from ..hparams import opmath
from ..rows import DECAY, EPS_, GAIN, RHO, SIGMA
from .base import Capabilities, StepInputs, Unfused


class _Prep:
    """Per plan: the direction buffers, and the tensor index lists that share one EMA row
    (first sights apart) and one rho (one param group)."""

    __slots__ = ("d", "ema_groups", "rho_groups")

    def __init__(self, d, b):
        self.d = d
        first = [i for i, f in enumerate(b.first) if f]
        rest = [i for i, f in enumerate(b.first) if not f]
        self.ema_groups = [idx for idx in (rest, first) if idx]
        self.rho_groups = [list(range(lo, hi)) for _, lo, hi in b.spans if hi > lo]


class ForeachBackend(Unfused):
    name = "foreach"
    caps = Capabilities(
        devices=None,
        dtypes=None,
        dense_only=False,
        double_buffer=False,
        checks_devices=False,
        auto=100,  # the fallback: last
    )

    def __init__(self, buffers):
        # param -> buffer for d (then e), in the arithmetic dtype, kept across plans so a
        # structure change does not reallocate them.
        self._d = buffers.for_backend(self.name)

    @staticmethod
    def unsupported(device, dtype, ema_dtype):
        return None

    def prepare(self, b) -> None:
        ct = opmath(b.dtype)
        d = []
        for p in b.params:
            buf = self._d.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != ct or buf.device != p.device:
                buf = self._d[p] = torch.empty_like(p, dtype=ct)
            d.append(buf)
        b.prep = _Prep(d, b)
        b.perturbed_ptrs = [p.data_ptr() for p in b.params]

    @staticmethod
    def _unscaled(b, grads, inv):
        ct = opmath(b.dtype)
        g = [x.to(ct) for x in grads]
        if inv is not None:
            g = torch._foreach_mul(g, inv.reshape(()))
        return g

    def norm(self, b, inputs: StepInputs):
        d = b.prep.d
        torch._foreach_copy_(d, inputs.grads)  # d <- g (up-cast)
        if inputs.inv is not None:
            torch._foreach_mul_(d, inputs.inv.reshape(()))  # unscaled g (.grad is not rewritten)
        if b.emas is not None:
            ct = opmath(b.dtype)
            sigma = b.scalars[SIGMA]
            for idx in b.prep.ema_groups:
                di = [d[i] for i in idx]
                sm = torch._foreach_mul([b.emas[i].to(ct) for i in idx], sigma)
                if b.paper:
                    # d <- g - sigma * (decay * m + gain * g), the updated EMA, expanded:
                    # (1 - sigma * gain) g - sigma * decay * m.
                    row = b.rows[idx[0]]
                    torch._foreach_mul_(di, 1 - sigma * row[GAIN])
                    torch._foreach_mul_(sm, row[DECAY])
                # official: d <- g - sigma * m_old (m is zero on first sight, so d == g there)
                torch._foreach_sub_(di, sm)
        ad = d
        if any(b.adaptive):
            ad = [torch.abs(p) * di if a else di for p, di, a in zip(b.params, d, b.adaptive)]
        return torch.stack(torch._foreach_norm(ad, 2)).float().square(), None

    def perturb(self, b, inputs: StepInputs, sq, carry) -> None:
        ct = opmath(b.dtype)
        d = b.prep.d
        total = sq.sum()
        # Not finite (a non-finite gradient): every write below selects the old value, on
        # the device (never a multiply by zero: 0 * inf is NaN).
        ok = torch.isfinite(total)
        not_ok = ~ok
        # The EMA's new values (full-size temporaries) are computed before the first write,
        # so a real out-of-memory there changes nothing; after it, only in-place ops that
        # allocate nothing.
        emas = self._new_emas(b, inputs, ok, ct) if b.emas is not None else ()
        torch._foreach_copy_(b.saved, b.params)
        try:
            self._write_weights(b, d, total, ok, ct)
        except BaseException:
            self.restore(b)
            raise
        if inputs.found is not None:
            inputs.found.copy_(not_ok)
        for x, y in emas:  # the last write: m <- decay * m + gain * g, rounded once
            if x.dtype == ct:
                torch.where(ok, y, x, out=x)
            else:
                x.copy_(y)  # (y already holds the selection)

    def _new_emas(self, b, inputs, ok, ct) -> list:
        """``[(m, m_new)]``: each EMA and its new value in ``ct`` (for an EMA of another
        dtype, already the selection by ``ok``, so its write is one copy)."""
        g = self._unscaled(b, inputs.grads, inputs.inv)
        out = []
        for idx in b.prep.ema_groups:
            row = b.rows[idx[0]]
            mi = torch._foreach_mul([b.emas[i].to(ct) for i in idx], row[DECAY])
            torch._foreach_add_(mi, torch._foreach_mul([g[i] for i in idx], row[GAIN]))
            for i, y in zip(idx, mi):
                x = b.emas[i]
                if x.dtype != ct:
                    torch.where(ok, y, x, out=y)
                out.append((x, y))
        return out

    @staticmethod
    def _write_weights(b, d, total, ok, ct) -> None:
        # The norm and scale in float32 (the arithmetic of every backend's norm).
        norm_eps = total.sqrt() + b.scalars[EPS_].float()
        for i, p in enumerate(b.params):
            if b.adaptive[i]:
                w = p.to(ct)
                d[i].mul_(w).mul_(w)
        # e = (rho / (N + eps)) * a^2 * d, in place in d; one scale per param group.
        for idx in b.prep.rho_groups:
            scale = (b.rows[idx[0], RHO].float() / norm_eps).to(ct)
            torch._foreach_mul_([d[i] for i in idx], scale)
        torch._foreach_add_(d, b.saved)  # e + w (== w + e) in the arithmetic dtype ...
        if ct == b.dtype:
            for p, x, s in zip(b.params, d, b.saved):
                torch.where(ok, x, s, out=p)
        else:
            # ... rounded once to the storage dtype. The selection goes into d first (the
            # old value is exact in ct), so the writes are one copy that allocates nothing.
            for x, s in zip(d, b.saved):
                torch.where(ok, x, s, out=x)
            torch._foreach_copy_(b.params, d)

    def restore(self, b) -> None:
        torch._foreach_copy_(b.homes, b.saved)
