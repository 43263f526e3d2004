"""The values a bucket's passes read, as device data apart from the plan's structure.

Each bucket owns two tensors on its device, in its arithmetic dtype (float32 for 16-bit and
float32 weights, float64 for float64 ones), made once per plan and rewritten in place
whenever a value changes:

* ``rows``, shape ``[n, 4]``, one row per tensor: ``rho``, ``adaptive`` (0/1), the EMA's
  ``decay`` and ``gain`` (``m_new = decay * m + gain * g``; :func:`ema_row`);
* ``scalars``, shape ``[2]``: ``sigma``, ``eps``.

A rho, sigma or lmbda schedule therefore costs one compare per bucket and step, and a few
in-place writes on the steps where a value changes: no plan rebuild, no check, no table
upload; a compiled graph or a captured step reads the new values from the same memory.
Whether a parameter's EMA is seen for the first time is structure (the plan is rebuilt once
after the step that creates EMAs).
"""

from __future__ import annotations

import torch

from .hparams import EPS, Values, opmath

RHO, ADAPTIVE, DECAY, GAIN = range(4)  # the columns of ``rows``
SIGMA, EPS_ = range(2)  # the entries of ``scalars``


def ema_row(first: bool, lmbda: float, paper: bool) -> tuple[float, float]:
    """``(decay, gain)`` of one tensor's EMA update ``m_new = m * decay + g * gain``.

    This is the first-sight rule, the one place it is written. The official order seeds the
    EMA with the first gradient it sees (``m <- g``, so ``d = g``: step 0 is plain SAM); the
    EMA of a parameter seen for the first time is created as zeros, and ``0 * decay + g * 1``
    with decay 0 is ``g`` exactly, as ``g - sigma * 0`` is. The paper order starts from zero
    and always decays."""
    if first and not paper:
        return 0.0, 1.0
    return lmbda, 1.0 - lmbda


class Rows:
    """``rows`` and ``scalars`` of one bucket (see the module docstring).

    ``spans``: ``[(group index, first row, end row)]``: a bucket holds its tensors in
    param-group order, so each group's rows are one contiguous range. ``first``: per tensor,
    whether its EMA is created this plan. ``adaptive``: per tensor (structure)."""

    __slots__ = ("rows", "scalars", "_spans", "_first", "_paper", "_last", "_np", "version")

    def __init__(self, device, dtype, spans, first, adaptive, paper: bool):
        ct = opmath(dtype)
        n = len(first)
        self.rows = torch.zeros((n, 4), dtype=ct, device=device)
        self.scalars = torch.zeros(2, dtype=ct, device=device)
        self._spans = spans
        self._first = [i for i, f in enumerate(first) if f and not paper]
        self._paper = paper
        self._last = None
        # CPU tensors are written through numpy views (0.3 us a write instead of a dispatch).
        self._np = (self.rows.numpy(), self.scalars.numpy()) if self.rows.is_cpu else None
        self.version = 0  # bumped by every refresh that changed something
        for i, a in enumerate(adaptive):
            if a:
                self._set(ADAPTIVE, i, i + 1, 1.0)
        self._set(None, EPS_, EPS_ + 1, EPS)

    def host(self):
        """``(rows, scalars)`` as numpy views, for CPU buckets (None elsewhere)."""
        return self._np

    def _set(self, col: int | None, lo: int, hi: int, value: float) -> None:
        """rows[lo:hi, col] (or scalars[lo:hi] when ``col`` is None) = value, in place."""
        if self._np is not None:
            if col is None:
                self._np[1][lo:hi] = value
            else:
                self._np[0][lo:hi, col] = value
        elif col is None:
            self.scalars[lo:hi].fill_(value)
        else:
            self.rows[lo:hi, col].fill_(value)

    def refresh(self, values: Values) -> None:
        """Write ``values`` into the device tensors if they differ from the last ones."""
        key = (values.sigma, values.lmbda, values.rhos)
        last = self._last
        if key == last:
            return
        if last is None or last[2] != values.rhos:
            for gi, lo, hi in self._spans:
                self._set(RHO, lo, hi, values.rhos[gi])
        if last is None or last[1] != values.lmbda:
            n = self.rows.shape[0]
            for first, idx in ((False, [(0, n)]), (True, [(i, i + 1) for i in self._first])):
                decay, gain = ema_row(first, values.lmbda, self._paper)
                for lo, hi in idx:
                    self._set(DECAY, lo, hi, decay)
                    self._set(GAIN, lo, hi, gain)
        if last is None or last[0] != values.sigma:
            self._set(None, SIGMA, SIGMA + 1, values.sigma)
        self._last = key
        self.version += 1
