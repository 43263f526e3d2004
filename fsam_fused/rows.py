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


def _numpy_views(rows: torch.Tensor, scalars: torch.Tensor):
    """``(rows, scalars)`` as numpy arrays sharing their memory, for CPU tensors when numpy
    is importable; else None."""
    if not rows.is_cpu:
        return None
    try:
        return rows.numpy(), scalars.numpy()
    except (RuntimeError, ImportError):  # "Numpy is not available"
        return None


class Rows:
    """``rows`` and ``scalars`` of one bucket (see the module docstring).

    ``spans``: ``[(group index, first row, end row)]``: a bucket holds its tensors in
    param-group order, so each group's rows are one contiguous range. ``first``: per tensor,
    whether its EMA is created this plan. ``adaptive``: per tensor (structure)."""

    __slots__ = (
        "rows",
        "scalars",
        "_rho",
        "_decay",
        "_gain",
        "_sigma",
        "_first",
        "_paper",
        "_last",
        "_np",
        "version",
    )

    def __init__(self, device, dtype, spans, first, adaptive, paper: bool):
        ct = opmath(dtype)
        n = len(first)
        self.rows = torch.zeros((n, 4), dtype=ct, device=device)
        self.scalars = torch.zeros(2, dtype=ct, device=device)
        # Views written in place: numpy views of CPU tensors (a fill is 0.3 us, a torch
        # dispatch 2 us) when numpy is installed (it is not a dependency), torch views
        # otherwise (on a GPU, a fill kernel with the value as its argument).
        self._np = _numpy_views(self.rows, self.scalars)
        rows, scalars = self._np or (self.rows, self.scalars)
        self._rho = [(gi, rows[lo:hi, RHO]) for gi, lo, hi in spans]
        self._decay, self._gain = rows[:, DECAY], rows[:, GAIN]
        self._sigma = scalars[SIGMA : SIGMA + 1]
        self._first = [i for i, f in enumerate(first) if f and not paper]
        self._paper = paper
        self._last = None
        self.version = 0  # bumped by every refresh that changed something
        for i, a in enumerate(adaptive):
            if a:
                rows[i, ADAPTIVE] = 1.0
        scalars[EPS_] = EPS

    def host(self):
        """``(rows, scalars)`` as numpy views, for CPU buckets (None elsewhere)."""
        return self._np

    def refresh(self, values: Values) -> None:
        """Write ``values`` into the device tensors if they differ from the last ones."""
        last = self._last
        if values == last:
            return
        if last is None or last.rhos != values.rhos:
            rhos = values.rhos
            for gi, view in self._rho:
                view.fill_(rhos[gi]) if self._np is None else view.fill(rhos[gi])
        if last is None or last.lmbda != values.lmbda:
            decay, gain = ema_row(False, values.lmbda, self._paper)
            d0, g0 = ema_row(True, values.lmbda, self._paper)
            for view, v, v0 in ((self._decay, decay, d0), (self._gain, gain, g0)):
                view.fill_(v) if self._np is None else view.fill(v)
                for i in self._first:
                    view[i] = v0
        if last is None or last.sigma != values.sigma:
            v = self._sigma
            v.fill_(values.sigma) if self._np is None else v.fill(values.sigma)
        self._last = values
        self.version += 1
