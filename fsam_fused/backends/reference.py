"""The reference backend: the readable, executable statement of the contract
(``docs/semantics.md``); every other backend is tested against it.

A deliberately plain loop over parameters, one step of the contract at a time, in the
arithmetic dtype (float32 for 16-bit weights), each result rounded once to its storage dtype.
Values (rho, sigma, the EMA's decay and gain, eps) are read from the bucket's device rows
(:mod:`fsam_fused.rows`), as every backend reads them.
"""

from __future__ import annotations

import torch

from ..hparams import opmath
from ..rows import DECAY, EPS_, GAIN, RHO, SIGMA
from .base import Capabilities, StepInputs, Unfused


class ReferenceBackend(Unfused):
    name = "reference"
    caps = Capabilities(
        devices=None,
        dtypes=None,
        dense_only=False,
        double_buffer=False,
        checks_devices=False,
        auto=None,
    )

    def __init__(self, buffers=None):
        pass

    @staticmethod
    def unsupported(device, dtype, ema_dtype):
        return None  # any device, any floating-point dtype

    def prepare(self, b) -> None:
        b.perturbed_ptrs = [p.data_ptr() for p in b.params]

    def norm(self, b, inputs: StepInputs):
        directions, m_news, squares = [], [], []
        inv = inputs.inv.reshape(()) if inputs.inv is not None else None
        sigma = b.scalars[SIGMA]
        for i, (p, g) in enumerate(zip(b.params, inputs.grads)):
            ct = opmath(p.dtype)
            g = g.to(ct)
            if inv is not None:
                g = g * inv  # unscaled, as GradScaler.unscale_ would (.grad is not rewritten)
            m_new = None
            if b.emas is None:  # sigma == 0: plain SAM, no EMA read or written
                d = g
            else:
                m_old = b.emas[i].to(ct)
                # m_new = lmbda * m + (1 - lmbda) * g, or g on the official first sight (the
                # rows' decay/gain; see rows.ema_row).
                m_new = m_old * b.rows[i, DECAY] + g * b.rows[i, GAIN]
                # Official order: d uses the EMA from *before* this step's update; the paper's
                # (Algorithm 1) the updated one.
                d = g - (m_new if b.paper else m_old) * sigma
            directions.append(d)
            m_news.append(m_new)
            a = p.to(ct).abs() if b.adaptive[i] else 1.0
            squares.append((a * d).float().pow(2).sum())
        sq = torch.stack(squares) if squares else torch.zeros(1, device=b.device)
        return sq, (directions, m_news)

    def perturb(self, b, inputs: StepInputs, sq, carry) -> None:
        directions, m_news = carry
        total = sq.sum()
        # The norm and scale in float32 (the arithmetic of every backend's norm).
        norm_eps = total.sqrt() + b.scalars[EPS_].float()
        # A non-finite sum of squares (a non-finite gradient): select the old values, on
        # the device; never multiply by zero (0 * inf is NaN).
        ok = torch.isfinite(total)
        # Every new value is computed (every allocation made) before the first write, so an
        # allocation failure changes nothing; the writes are plain copies, which allocate
        # nothing.
        new_w = []
        for i, (p, d) in enumerate(zip(b.params, directions)):
            ct = opmath(p.dtype)
            scale = (b.rows[i, RHO].float() / norm_eps).to(ct)
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
        if inputs.found is not None:
            inputs.found.copy_(not_ok)
        for m, x in zip(b.emas or (), new_m):  # the last write: nothing after it can fail
            m.copy_(x)

    def restore(self, b) -> None:
        for p, s in zip(b.homes, b.saved):
            p.copy_(s)
