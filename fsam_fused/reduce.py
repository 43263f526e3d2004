"""Sums of squares combined across buckets and devices into the squared global norm.

SEMANTICS: across dtype buckets, devices and ranks combine *sums of squares*, never norms of
norms. Each bucket's norm pass returns partial sums whose total is its share; the
perturb pass of every bucket receives, on its own device, partials whose total is the whole.
No host synchronisation: everything stays a device tensor.

Ranks (:mod:`fsam_fused.distributed`): the buckets of DTensor shards are summed locally, per
shard layout (``Bucket.reduce_key``), into one float32 tensor that is all-reduced (SUM) over
the process group of each sharded mesh dimension; replicated dimensions are not summed over.
FSDP2 and HSDP: one ``all_reduce`` of one float per step. Buckets of plain tensors are counted
once, as this rank sees them (no collective).
"""

from __future__ import annotations

import torch


def combine(parts: list[torch.Tensor], buckets) -> list[torch.Tensor]:
    """Per bucket, a float32 1-D tensor on its device whose sum is the squared global norm.
    ``parts`` are in the plan's group order, so the rounding of the total never depends on
    the order buckets commit in."""
    if len(parts) == 1 and not buckets[0].groups:
        return parts
    if not parts:
        return []
    if any(b.groups for b in buckets):
        return _across_ranks(parts, buckets)
    if len({b.device for b in buckets}) == 1:
        sq = parts[0] if len(parts) == 1 else torch.cat(parts)
        return [sq] * len(parts)
    # Several devices: move each bucket's sum of squares (not its norm) to every device.
    home = parts[0].device
    sums = torch.stack([p.sum().to(home) for p in parts])
    return [sums.to(b.device) for b in buckets]


def _across_ranks(parts, buckets) -> list[torch.Tensor]:
    from .distributed import all_reduce_sum

    home = parts[0].device
    local, sharded = [], {}  # plain buckets' partials; per shard layout, its buckets' sums
    for p, b in zip(parts, buckets):
        if b.groups:
            sharded.setdefault(b.reduce_key, (b.groups, []))[1].append(p.sum().to(home))
        else:
            local.append(p.to(home))
    for groups, sums in sharded.values():
        total = torch.stack(sums).sum().reshape(1) if len(sums) > 1 else sums[0].reshape(1)
        # A fresh tensor (stack/sum or a reduction's result): safe to reduce in place.
        all_reduce_sum(total, groups)
        local.append(total)
    sq = local[0] if len(local) == 1 else torch.cat(local)
    if all(b.device == home for b in buckets):
        return [sq] * len(parts)
    return [sq.to(b.device) for b in buckets]
