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

    def norm(self, b):
        d = b.prep
        torch._foreach_copy_(d, b.grads)  # d <- g (up-cast)
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

    def perturb(self, b, sq, carry) -> None:
        ct = opmath(b.dtype)
        d = b.prep
        torch._foreach_copy_(b.saved, b.params)
        try:
            self._write_weights(b, d, sq, ct)
        except BaseException:
            self.restore(b)
            raise
        if b.emas is not None:  # the last write: m <- decay * m + gain * g
            for decay, gain, idx in b.ema_groups():
                m = [b.emas[i] for i in idx]
                low = m[0].dtype != ct  # a 16-bit EMA: compute in ct, round once
                m_ct = [x.to(ct) for x in m] if low else m
                torch._foreach_mul_(m_ct, decay)
                torch._foreach_add_(m_ct, [b.grads[i].to(ct) for i in idx], alpha=gain)
                if low:
                    torch._foreach_copy_(m, m_ct)

    @staticmethod
    def _write_weights(b, d, sq, ct) -> None:
        norm_eps = sq.sum().sqrt() + EPS
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

    def restore(self, b) -> None:
        torch._foreach_copy_(b.homes, b.saved)

    def original(self, b, i):
        return b.saved[i]
