"""FSAM's state_dict format, kept to torch.optim's conventions (state_dict and load_state_dict
hooks, non-parameter entries in ``state``, group flags filled on load, ``param_names``), and
the check of a new param group. A loaded dict is checked completely
(:mod:`fsam_fused.checkpoint_checks`) before anything is modified; checkpoints of other SAM
libraries are translated first (:mod:`fsam_fused.peers`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import hparams, peers, schedules
from ._warnings import warn_at_caller
from .buffers import State
from .checkpoint_checks import VERSION, check_loadable

__all__ = ["VERSION", "check_loadable", "check_new_group", "load", "state_dict"]


def check_new_group(groups, group) -> None:
    """A param group's own rho/adaptive, and no parameter twice (torch only warns about a
    parameter repeated inside one group, whose EMA would then be updated twice)."""
    if "rho" in group or "adaptive" in group:
        hparams.check_group(
            {"rho": group.get("rho", 0.0), "adaptive": group.get("adaptive", False)},
            " in param group",
        )
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    group["params"] = params  # a generator must be read once only
    ids = set()
    for g in groups:
        ids.update(id(p) for p in g["params"])
    for i, p in enumerate(params):
        if id(p) in ids:
            raise ValueError(
                f"parameter {i} of the new param group (shape {tuple(p.shape)}) "
                "appears twice in the optimizer; pass each parameter once"
            )
        ids.add(id(p))


# ---------------------------------------------------------------------------- saving


def state_dict(opt) -> dict:
    """``opt``'s state_dict as torch.optim.Optimizer.state_dict builds it (pre-hooks, packed
    groups and state, post-hooks, each of which may return a new dict), with the base
    optimizer's state_dict and the ``fsam`` entry added before the post-hooks see it."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    # Indices exactly as torch numbers them (the base optimizer's state_dict uses the same).
    index: dict[int, int] = {}
    groups, start = [], 0
    for g in opt.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        index.update({id(p): i for i, p in enumerate(g["params"], start) if id(p) not in index})
        packed["params"] = [index[id(p)] for p in g["params"]]
        start += len(packed["params"])
        groups.append(packed)
    # A parameter's state as a plain dict, so torch.load(weights_only=True) reads it (Slot is
    # an internal type); an entry that is not a parameter's (put there by a hook) as it is.
    state = {
        (index[id(k)] if torch.is_tensor(k) else k): (dict(v) if torch.is_tensor(k) else v)
        for k, v in opt.state.items()
    }
    base = opt.base_optimizer.state_dict()
    # The base's groups are FSAM's own dicts: their names are saved once, in FSAM's groups,
    # where torch keeps (and its tests strip) them.
    base["param_groups"] = [
        {k: v for k, v in g.items() if k != "param_names"} for g in base["param_groups"]
    ]
    sd = {
        "state": state,
        "param_groups": groups,
        "base_optimizer": base,
        "fsam": {
            "version": VERSION,
            "sigma": opt.sigma,
            "lmbda": opt.lmbda,
            "ema_order": opt.ema_order,
        },
    }
    if opt.schedule is not None:  # counters, generator, running statistics
        sd["fsam"]["schedule"] = opt.schedule.state_dict()
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


# ---------------------------------------------------------------------------- loading


def load(opt, sd, *, plain_sam: bool = False) -> None:
    """torch.optim's load_state_dict for FSAM: the pre-hooks get a shallow copy of ``sd`` (and
    may return a new dict), a peer library's checkpoint is translated, everything is checked,
    then installed: the base optimizer's state, the group dicts updated in place (every
    holder keeps the same objects) with missing flags filled as torch fills them, the EMA,
    sigma/lmbda/order; then the post-hooks run. ``plain_sam``: refuse F-SAM state (SAM)."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    sd = sd.copy()
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    sd, imported = peers.as_fsam(opt, sd, VERSION)
    new_state, (sigma, lmbda, order) = check_loadable(opt, sd)
    if plain_sam:
        _refuse_fsam(new_state, sigma)
    groups = _merged_groups(opt, sd["param_groups"])
    schedule = _checked_schedule(opt, sd["fsam"].get("schedule"))
    became_sam = imported is None and sigma == 0 < opt.sigma and not plain_sam

    opt.base_optimizer.load_state_dict(sd["base_optimizer"])
    for g, new in zip(opt.param_groups, groups):
        g.clear()
        g.update(new)
    _fill_flags(opt)
    opt.state = new_state
    opt.engine.plan = None
    opt.sigma, opt.lmbda, opt.ema_order = sigma, lmbda, order
    if schedule is not None:
        opt.schedule.load_state_dict(schedule)

    if imported is not None:
        warn_at_caller(imported, peers.PeerCheckpointWarning)
    if became_sam:
        warn_at_caller(
            "the loaded checkpoint is plain SAM's (sigma = 0): like every hyper-parameter a "
            "checkpoint holds, its sigma replaces this optimizer's, which now runs plain SAM. "
            "To continue as F-SAM instead, set opt.sigma after loading (the EMA then starts "
            "from the next gradient)",
            UserWarning,
        )
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _checked_schedule(opt, saved):
    """The checkpoint's schedule state, checked against ``opt.schedule`` (loaded into a copy
    first, so a mismatch raises before anything changes); None when there is nothing to load.
    A checkpoint without one leaves the schedule as it is; one with a schedule loaded into an
    optimizer without one is a warning (the run continues perturbing every step)."""
    if saved is None:
        return None
    if opt.schedule is None:
        warn_at_caller(
            "the checkpoint holds a perturbation schedule's state "
            f"({saved.get('kind') if isinstance(saved, dict) else saved!r}) but this optimizer "
            "has no schedule (it perturbs every step); pass schedule=... to FSAM to resume it",
            UserWarning,
        )
        return None
    copy.deepcopy(opt.schedule).load_state_dict(saved)
    return saved


def _refuse_fsam(state, sigma) -> None:
    """SAM is FSAM with sigma = 0 and no EMA: loading F-SAM state would silently make it
    F-SAM."""
    emas = sum(1 for k, s in state.items() if torch.is_tensor(k) and "ema" in s)
    if sigma > 0 or emas:
        raise ValueError(
            f"SAM cannot load an F-SAM checkpoint (sigma={sigma}, an EMA for {emas} "
            "parameters): it would silently become F-SAM. Load it into fsam_fused.FSAM, or, "
            "to continue as plain SAM, drop the F-SAM part first: set "
            "state_dict['fsam']['sigma'] = 0.0 and remove the 'ema' entries of "
            "state_dict['state']"
        )


def _merged_groups(opt, saved_groups) -> list[dict]:
    """The new content of each group dict: a deep copy of the saved group (as torch makes, so
    the optimizer never shares a value with the dict it loaded), the optimizer's own params,
    and its ``param_names`` where the saved group has none (torch keeps them then)."""
    saved_groups = copy.deepcopy(saved_groups)
    for g, new in zip(opt.param_groups, saved_groups):
        new["params"] = g["params"]
        if "param_names" in g and "param_names" not in new:
            new["param_names"] = g["param_names"]
    return saved_groups


def _fill_flags(opt) -> None:
    """Give the loaded groups the flags a checkpoint of an older torch or FSAM lacks.

    torch's load_state_dict ends with ``self.__setstate__(...)``, where each optimizer fills
    in the flags its older versions lacked (SGD and Adam: ``maximize``, ``foreach``,
    ``differentiable``, ``fused``, ``capturable``...); the base optimizer does so here on
    the loaded groups. A key still missing gets the optimizer's default, as a new param
    group would (``add_param_group``)."""
    base = opt.base_optimizer
    base.__setstate__({"state": base.state, "param_groups": opt.param_groups})
    base.param_groups = opt.param_groups  # one list of group dicts for both, as built
    for g in opt.param_groups:
        for k, v in opt.defaults.items():
            g.setdefault(k, copy.deepcopy(v))


# Not copied by __getstate__: what the next step rebuilds, and hooks (torch.optim's copies
# drop them too; a lambda hook would make the optimizer unpicklable).
_NOT_COPIED = frozenset(
    ("_session", "_config")
    + tuple(
        f"_optimizer_{kind}_hooks"
        for kind in (
            "step_pre",
            "step_post",
            "state_dict_pre",
            "state_dict_post",
            "load_state_dict_pre",
            "load_state_dict_post",
        )
    )
)


class Checkpointing:
    """``state_dict``, ``load_state_dict`` and copies of :class:`fsam_fused.FSAM` (mixed in;
    the format and checks are this module's)."""

    def state_dict(self) -> dict[str, Any]:
        """State to resume bit-exactly: the EMA (its presence is the "seen" flag), the param
        groups, sigma/lmbda/order and the base optimizer's own state (momentum etc.). Hooks
        and non-parameter entries as torch.optim's (``docs/semantics.md``)."""
        self._session.refuse_mid_step("state_dict() called")
        return state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, every check first; hooks, older group flags and ``param_names``
        as torch.optim's. A checkpoint of davda54's SAM, of the authors' or
        pytorch_optimizer's FriendlySAM or of pytorch_optimizer's SAM is translated, with a
        :class:`fsam_fused.peers.PeerCheckpointWarning` (``docs/checkpoints.md``); a plain SAM
        checkpoint makes this optimizer plain SAM, with a warning (``docs/semantics.md``)."""
        self._session.refuse_mid_step("load_state_dict() called")
        load(self, state_dict)

    def __getstate__(self):
        """Copies (``copy.deepcopy``, pickle, ``torch.save``) carry the configuration, the
        state and the base optimizer; buffers and plans are rebuilt on the next step, and
        hooks are not copied (as torch.optim's copies drop them)."""
        self._session.refuse_mid_step("copying or pickling FSAM")
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, st):
        super().__setstate__(st)
        if not isinstance(self.state, State):
            self.state = State(self.state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("nonfinite_group", None)
        self.__dict__.setdefault("_schedule", None)
        self.__dict__.setdefault("capturable", False)
        schedules.check_schedule(self._schedule, self)  # (a copy's schedule is this copy's)
        self._fresh_session()
