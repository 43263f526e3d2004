"""The ``torch._foreach_*`` backend: the same math as the reference, a few multi-tensor ops
per pass; the strongest unfused baseline, on any device and dtype.

Every op runs in place on persistent buffers: a fresh full-size temporary per step costs page
faults on the CPU (large blocks go back to the OS when freed) and allocator traffic on CUDA.
The direction ``d`` lives in one buffer per parameter and becomes ``e`` in place.
"""

from __future__ import annotations

import torch

from ..hparams import EPS, opmath


class ForeachBackend:
    name = "foreach"

    def __init__(self, buffers):
        # param -> buffer for d (then e), in the arithmetic dtype, kept across plans so a rho
        # schedule does not reallocate them.
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
        b.prep = d
        b.perturbed_ptrs = [p.data_ptr() for p in b.params]

    def norm(self, b, inv=None):
        d = b.prep
        torch._foreach_copy_(d, b.grads)  # d <- g (up-cast)
        if inv is not None:
            torch._foreach_mul_(d, inv.reshape(()))  # unscaled g (.grad is not rewritten)
        if b.emas is not None:
            if b.paper:
                # d <- g - sigma * (decay * m + gain * g), the updated EMA, expanded so that it
                # needs no temporary: (1 - sigma * gain) g - sigma * decay * m.
                for decay, gain, idx in b.ema_groups():
                    di = [d[i] for i in idx]
                    torch._foreach_mul_(di, 1 - b.sigma * gain)
                    torch._foreach_add_(di, [b.emas[i] for i in idx], alpha=-b.sigma * decay)
            else:
                # d <- g - sigma * m_old (m is zero on first sight, so d == g there)
                torch._foreach_add_(d, b.emas, alpha=-b.sigma)
        ad = d
        if any(b.adaptive):
            ad = [torch.abs(p) * di if a else di for p, di, a in zip(b.params, d, b.adaptive)]
        return torch.stack(torch._foreach_norm(ad, 2)).float().square(), None

    def perturb(self, b, sq, carry, inv=None, found=None) -> None:
        ct = opmath(b.dtype)
        d = b.prep
        total = sq.sum()
        # Not finite (a non-finite gradient): every write below selects the old value, on
        # the device (never a multiply by zero: 0 * inf is NaN).
        ok = torch.isfinite(total)
        not_ok = ~ok
        # Issue 14: the EMA's new values (full-size temporaries) are computed before the
        # first write, so a real out-of-memory there changes nothing; after it, only in-place
        # ops that allocate nothing.
        emas = self._new_emas(b, ok, ct, inv) if b.emas is not None else ()
        torch._foreach_copy_(b.saved, b.params)
        try:
            self._write_weights(b, d, total, ok, ct)
        except BaseException:
            self.restore(b)
            raise
        if found is not None:
            found.copy_(not_ok)
        for x, y in emas:  # the last write: m <- decay * m + gain * g, rounded once
            if x.dtype == ct:
                torch.where(ok, y, x, out=x)
            else:
                x.copy_(y)  # (y already holds the selection)

    @staticmethod
    def _new_emas(b, ok, ct, inv) -> list:
        """``[(m, m_new)]``: each EMA and its new value in ``ct`` (for an EMA of another
        dtype, already the selection by ``ok``, so its write is one copy)."""
        out = []
        for decay, gain, idx in b.ema_groups():
            m = [b.emas[i] for i in idx]
            g = [b.grads[i].to(ct) for i in idx]
            if inv is not None:
                g = torch._foreach_mul(g, inv.reshape(()))
            m_new = torch._foreach_mul([x.to(ct) for x in m], decay)
            torch._foreach_add_(m_new, g, alpha=gain)
            for x, y in zip(m, m_new):
                if x.dtype != ct:
                    torch.where(ok, y, x, out=y)
                out.append((x, y))
        return out

    @staticmethod
    def _write_weights(b, d, total, ok, ct) -> None:
        norm_eps = total.sqrt() + EPS
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

    def original(self, b, i):
        return b.saved[i]
