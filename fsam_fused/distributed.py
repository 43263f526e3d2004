"""torch.distributed support: DTensor parameters (FSDP2's ``fully_shard``, HSDP) and the
cross-rank half of the global norm. User guide: ``docs/distributed.md``.

How a step runs on sharded parameters:

* the plan (:mod:`fsam_fused.plan`) puts each DTensor parameter's *local shard*
  (``p._local_tensor``, the storage FSDP2 all-gathers from) and its gradient's local shard in
  a bucket of its own (device, dtype, mesh, sharded mesh dims): every backend (``cpp``,
  ``foreach``, ``triton``, ``reference``) runs on plain local tensors, with no DTensor dispatch
  and no gather of parameters or gradients;
* :func:`fsam_fused.reduce.combine` sums the bucket partials of every such bucket locally and
  all-reduces that one float32 tensor (SUM) over the process group of each *sharded* mesh
  dimension (one ``all_reduce`` per step for FSDP2 and HSDP, which shard over one dimension).
  Replicated mesh dimensions (HSDP's replica groups) are not summed over: each replica holds
  the same shards. Plain tensors (not DTensors) are counted once, as each rank sees them: under
  DDP (synced) their gradients are the same on every rank; under DDP's ``no_sync()`` each rank
  perturbs by its own gradients' norm. No host synchronisation: the all-reduce takes a device
  tensor;
* every rank then perturbs its shards with the same scale ``rho / (N + eps)``;
* EMAs live in ``opt.state[p]["ema"]`` as DTensors with the parameter's mesh and placements
  (their local tensors are what the kernels update), so ``torch.distributed.checkpoint``
  saves and loads them sharded. :func:`init_state` builds the state a checkpoint is loaded
  into.
"""

from __future__ import annotations

import sys

import torch


def dtensor_class():
    """The DTensor class if ``torch.distributed.tensor`` was imported (nobody can have made a
    DTensor otherwise), else None: plain runs never import torch.distributed."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def shard_spec(p, where: str = ""):
    """``(key, groups)`` of a DTensor parameter: ``key`` identifies the shards that form a
    whole (the mesh and its sharded dimensions); ``groups`` are the process groups of those
    dimensions, the ones its sum of squares is all-reduced over (empty if ``p`` is replicated
    on every mesh dimension: then each rank holds all of it, and it is counted once)."""
    mesh, placements = p.device_mesh, p.placements
    dims = []
    for d, pl in enumerate(placements):
        if pl.is_shard():  # Shard and FSDP2's _StridedShard
            dims.append(d)
        elif not pl.is_replicate():
            raise RuntimeError(
                f"FSAM needs DTensor parameters sharded or replicated on each "
                f"mesh dimension, got placements {tuple(placements)} for the "
                f"parameter {where}"
            )
    groups = tuple(mesh.get_group(d) for d in dims)
    return (mesh, tuple(dims)), groups


def check_grad(p, g, where: str) -> None:
    """A DTensor parameter's gradient must be a DTensor of the same mesh and placements (what
    FSDP2 leaves after its reduce-scatter)."""
    if not is_dtensor(g):
        raise RuntimeError(
            f"the gradient of the DTensor parameter {where} is a {type(g).__name__}, not a DTensor"
        )
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise RuntimeError(
            f"the gradient of the DTensor parameter {where} has placements "
            f"{tuple(g.placements)} on {g.device_mesh}, the parameter "
            f"{tuple(p.placements)} on {p.device_mesh}: redistribute it to the "
            "parameter's placements (a Partial gradient must be reduced first)"
        )


def like(local: torch.Tensor, p):
    """``local`` (a tensor shaped like ``p``'s local shard) as a DTensor with ``p``'s mesh,
    placements, global shape and strides; no communication, and the DTensor's local tensor
    shares ``local``'s memory (from_local wraps a view), so what the kernels write into
    ``local`` is the DTensor's value, and what a checkpoint loads into the DTensor is
    ``local``'s."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def all_reduce_sum(t: torch.Tensor, groups) -> None:
    """Sum ``t`` in place over each process group (one collective per group)."""
    import torch.distributed as dist

    for g in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)


def agreed_found(found, group=None, plan=None):
    """The first pass's found flag as every data-parallel rank must act on it.

    Under DDP's per-replica mode (the first backward under ``no_sync()``) each rank's flag
    is its own: a NaN on one rank would make that rank alone skip its base step (a fused
    base, ``skip_nonfinite=True``) or back its GradScaler's scale off, and the replicas
    would diverge silently. So before any decision that reads it, the flag is all-reduced
    (MAX, a copy: one collective of one float32 device tensor, no host synchronisation)
    over ``group`` (``FSAM.nonfinite_group``; ``plan``: the step's plan):

    * not set (the default): the default process group, when torch.distributed is
      initialised with more than one rank and the step has plain-tensor parameters
      (DTensor-only steps, FSDP2's, already have a global flag: their norm is all-reduced);
    * a process group: that one (e.g. DDP's ``process_group``);
    * ``False``: never (an optimizer that steps on some ranks only: the collective would
      wait for the others).

    Every rank of the group must then take the step, as it must for DDP's all-reduces."""
    if found is None or not _asks_ranks(group, plan):
        return found
    import torch.distributed as dist

    out = found.clone()  # never the engine's own flag
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def _asks_ranks(group, plan) -> bool:
    """Whether :func:`agreed_found`'s rule (and :func:`agreed_mean`'s) asks other ranks."""
    if group is False:
        return False
    if group is not None:
        return True
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if dist.get_world_size() < 2:
        return False
    # DTensor-only steps (FSDP2's) are global already: their sums are all-reduced.
    return plan is None or not all(b.owners is not None for b in plan.buckets)


def agreed_mean(x, group=None, plan=None):
    """``x`` (a 1-element float32 device tensor: a schedule's statistic) averaged over the
    data-parallel ranks that :func:`agreed_found` would ask (same ``group`` rule), so every
    rank takes the same decision from it; ``x`` itself when there are none. One collective
    of one float, no host synchronisation."""
    if not _asks_ranks(group, plan):
        return x
    import torch.distributed as dist

    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


@torch.no_grad()
def init_state(opt) -> None:
    """Create every state entry a checkpoint may hold, so ``opt.state_dict()`` can be the
    template ``torch.distributed.checkpoint.load`` fills in place: a zero EMA for every
    parameter (a DTensor like its parameter, when sigma > 0) and the base optimizer's state,
    made by one base step with zero gradients and a learning rate of 0 (what
    ``torch.distributed.checkpoint.state_dict`` does for other optimizers). Only an
    optimizer that has no state yet may be initialised; the values are overwritten by the
    load. If no load follows (neither ``opt.load_state_dict`` nor a load in place into the
    template's tensors), the next ``first_step`` drops the template, so training is exactly
    what it would have been without ``init_state`` (the zero EMA would count as seen, and
    the base state would hold a step that never was).

    Example (the resume half of a DCP round trip; ``docs/distributed.md`` has both)::

        opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        fsam_fused.distributed.init_state(opt)
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        torch.distributed.checkpoint.load(sd, checkpoint_id=path)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    >>> import torch
    >>> from fsam_fused import FSAM
    >>> from fsam_fused.distributed import init_state
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = FSAM([w], torch.optim.SGD, lr=0.1, momentum=0.9)
    >>> init_state(opt)
    >>> list(opt.state[w]), list(opt.base_optimizer.state[w]), w.grad is None, w.tolist()
    (['ema'], ['momentum_buffer'], True, [1.0, 1.0, 1.0])
    """
    if opt.perturbed:
        raise RuntimeError("init_state(opt) called between first_step() and second_step()")
    if any(len(s) for s in opt.state.values()) or any(opt.base_optimizer.state.values()):
        raise RuntimeError(
            "init_state(opt) needs an optimizer without state: it makes the "
            "template a checkpoint is loaded into"
        )
    params = [p for g in opt.param_groups for p in g["params"]]
    if opt.sigma > 0:
        for p in params:
            dtype = opt.ema_dtype or torch.promote_types(p.dtype, torch.float32)
            if is_dtensor(p):
                m = like(torch.zeros_like(p._local_tensor, dtype=dtype), p)
            else:
                m = torch.zeros_like(p, dtype=dtype)
            opt.state[p]["ema"] = m
    base = opt.base_optimizer
    grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in base.param_groups]
    try:
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        for g in base.param_groups:
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if torch.is_tensor(g["lr"]) else 0.0
        base.step()
    finally:
        for g, lr in zip(base.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g
    opt.engine.plan = None
    opt.__dict__[_TEMPLATE] = (opt.state, base.state, _versions(opt.state, base.state))


_TEMPLATE = "_fsam_init_state_template"


def _versions(*states) -> list:
    """The version counter of every tensor in ``states`` (and of each DTensor's local
    tensor): a load in place (``torch.distributed.checkpoint.load``) bumps them."""
    out = []
    for state in states:
        for entry in state.values():
            for v in entry.values():
                if torch.is_tensor(v):
                    out.append(v._version)
                    if is_dtensor(v):
                        out.append(v._local_tensor._version)
    return out


def drop_unloaded_template(opt) -> None:
    """At a ``first_step``: :func:`drop_template` if :func:`init_state` left a template."""
    if _TEMPLATE in opt.__dict__:
        drop_template(opt)


def drop_template(opt) -> None:
    """Called by the first ``first_step`` after :func:`init_state`: when no load replaced
    the template (the optimizer's and the base optimizer's state are the very objects
    init_state filled, every tensor unwritten since), the template is removed, so the step
    runs as on a fresh optimizer. Host metadata only."""
    state, base_state, versions = opt.__dict__.pop(_TEMPLATE)
    if (
        opt.state is state
        and opt.base_optimizer.state is base_state
        and _versions(state, base_state) == versions
    ):
        state.clear()
        base_state.clear()
