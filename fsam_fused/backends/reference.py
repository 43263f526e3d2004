"""The reference backend: the readable, executable statement of the contract
(``docs/semantics.md``); every other backend is tested against it.

A deliberately plain loop over parameters, one step of the contract at a time, in the
arithmetic dtype (float32 for 16-bit weights), each result rounded once to its storage dtype.
"""

from __future__ import annotations

import torch

from ..hparams import EPS, opmath


class ReferenceBackend:
    name = "reference"

    def __init__(self, buffers=None):
        pass

    @staticmethod
    def unsupported(device, dtype, ema_dtype):
        return None  # any device, any floating-point dtype

    def prepare(self, b) -> None:
        b.perturbed_ptrs = [p.data_ptr() for p in b.params]

    def norm(self, b, inv=None):
        directions, m_news, squares = [], [], []
        inv0 = inv.reshape(()) if inv is not None else None
        for i, (p, g) in enumerate(zip(b.params, b.grads)):
            ct = opmath(p.dtype)
            g = g.to(ct)
            if inv0 is not None:
                g = g * inv0  # unscaled, as GradScaler.unscale_ would (.grad is not rewritten)
            m_new = None
            if b.emas is None:  # sigma == 0: plain SAM, no EMA read or written
                d = g
            else:
                m_old = b.emas[i].to(ct)
                # m_new = lmbda * m + (1 - lmbda) * g, or g on the official first sight (the
                # plan's decay/gain row; see plan.ema_row).
                m_new = m_old * b.decay[i] + g * b.gain[i]
                # Official order: d uses the EMA from *before* this step's update; the paper's
                # (Algorithm 1) the updated one.
                d = g - (m_new if b.paper else m_old) * b.sigma
            directions.append(d)
            m_news.append(m_new)
            a = p.to(ct).abs() if b.adaptive[i] else 1.0
            squares.append((a * d).float().pow(2).sum())
        sq = torch.stack(squares) if squares else torch.zeros(1, device=b.device)
        return sq, (directions, m_news)

    def perturb(self, b, sq, carry, inv=None, found=None) -> None:
        directions, m_news = carry
        total = sq.sum()
        norm = total.sqrt()
        # A non-finite sum of squares (a non-finite gradient): select the old values, on
        # the device; never multiply by zero (0 * inf is NaN).
        ok = torch.isfinite(total)
        # Issue 14: every new value is computed (every allocation made) before the first
        # write, so an allocation failure changes nothing; the writes are plain copies, which
        # allocate nothing and cannot fail part-way.
        new_w = []
        for i, (p, d) in enumerate(zip(b.params, directions)):
            ct = opmath(p.dtype)
            scale = (b.rhos[i] / (norm + EPS)).to(ct)
            w = p.to(ct)
            a2 = w * w if b.adaptive[i] else 1.0
            # computed in opmath, rounded once to storage
            new_w.append(torch.where(ok, w + scale * a2 * d, w).to(p.dtype))
        new_m = []
        if b.emas is not None:
            new_m = [torch.where(ok, mn, m).to(m.dtype) for m, mn in zip(b.emas, m_news)]
        not_ok = ~ok
        for s, p in zip(b.saved, b.params):
            s.copy_(p)
        try:
            for p, x in zip(b.params, new_w):
                p.copy_(x)
        except BaseException:
            self.restore(b)
            raise
        if found is not None:
            found.copy_(not_ok)
        for m, x in zip(b.emas or (), new_m):  # the last write: nothing after it can fail
            m.copy_(x)

    def restore(self, b) -> None:
        for p, s in zip(b.homes, b.saved):
            p.copy_(s)

    def original(self, b, i):
        return b.saved[i]
