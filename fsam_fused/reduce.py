"""Sums of squares combined across buckets and devices into the squared global norm.

SEMANTICS: across dtype buckets, devices (and, later, ranks) combine *sums of squares*, never
norms of norms. Each bucket's norm pass returns partial sums whose total is its share; the
perturb pass of every bucket receives, on its own device, partials whose total is the whole.
No host synchronisation: everything stays a device tensor.
"""

from __future__ import annotations

import torch


def combine(parts: list[torch.Tensor], buckets) -> list[torch.Tensor]:
    """Per bucket, a float32 1-D tensor on its device whose sum is the squared global norm.
    ``parts`` are in the plan's group order, so the rounding of the total never depends on
    the order buckets commit in."""
    if len(parts) == 1:
        return parts
    if not parts:
        return []
    if len({b.device for b in buckets}) == 1:
        sq = parts[0] if len(parts) == 1 else torch.cat(parts)
        return [sq] * len(parts)
    # Several devices: move each bucket's sum of squares (not its norm) to every device.
    home = parts[0].device
    sums = torch.stack([p.sum().to(home) for p in parts])
    return [sums.to(b.device) for b in buckets]
