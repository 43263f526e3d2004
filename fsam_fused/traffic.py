"""The one formula for the bytes an F-SAM step must move, used by the benchmark's GB/s and
pinned by the tests against the Triton kernels' docstring table.

Per parameter, counting each tensor read or written once per pass (``W`` = bytes of the weight
dtype, ``M`` = bytes of the EMA dtype):

* norm reads g and m (and w when adaptive);
* perturb reads g, w, m and writes m and, with an exact copy, the saved copy and w;
  double-buffered (the C++ backend's default) it writes ``w + e`` into a spare buffer instead;
* restore reads the copy and writes w; double-buffered it moves nothing (a storage swap).

float32 weights with the float32 EMA: 40 bytes exact copy, 28 double-buffered; bfloat16
weights: 26 and 20.

A schedule's cheap step (:mod:`fsam_fused.schedules`) reads g for the sum of squares, then g
and m and writes m: ``2 W + 2 M``, 16 bytes for float32 (12 for bfloat16 gradients), no weight
touched; plain SAM's reads g once (``W``). The adaptive rule's statistic costs a perturbing
step one more read of g (``W``). These count the fused C++ passes; the other backends run the
cheap step in plain torch per tensor (more traffic, temporaries).
"""

from __future__ import annotations


def bytes_per_step(
    numel: int,
    w_bytes: int,
    m_bytes: int = 4,
    has_ema: bool = True,
    adaptive: bool = False,
    double_buffered: bool = False,
) -> int:
    """Bytes one F-SAM step moves for ``numel`` parameters of one bucket."""
    ema = m_bytes if has_ema else 0
    norm = w_bytes + ema + (w_bytes if adaptive else 0)
    reads = 2 * w_bytes + ema  # perturb: g, w, m
    if double_buffered:
        return numel * (norm + reads + ema + w_bytes)
    return numel * (norm + reads + ema + 2 * w_bytes + 2 * w_bytes)


def cheap_bytes_per_step(numel: int, w_bytes: int, m_bytes: int = 4, has_ema: bool = True) -> int:
    """Bytes a schedule's cheap step moves for ``numel`` parameters of one bucket (without
    an EMA, plain SAM: the sum of squares alone)."""
    return numel * (2 * w_bytes + 2 * m_bytes if has_ema else w_bytes)
