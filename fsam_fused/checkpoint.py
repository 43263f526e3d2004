"""FSAM's state_dict format, kept to torch.optim's conventions (state_dict and load_state_dict
hooks, non-parameter entries in ``state``, group flags filled on load, ``param_names``), and
the checks on what enters an FSAM optimizer from outside a step: new param groups and loaded
state_dicts. Everything is checked before anything is modified, with errors that name the
offending entry. Checkpoints of other SAM libraries are translated by :mod:`fsam_fused.peers`.
"""

from __future__ import annotations

import copy

import torch

from . import hparams, peers
from ._warnings import warn_at_caller
from .buffers import State, check_ema, check_sharded_ema

# The format of state_dict()["fsam"]; a reader refuses a newer one (it cannot know what the
# new fields mean) and a missing one (not a dict this package wrote).
VERSION = 1


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


def _structure(base_cls, group: dict):
    """The state keys ``base_cls`` keeps per parameter with these settings, and which of them
    are full-size tensors, learnt by stepping a throw-away instance on a 2-element parameter
    (None if that is impossible, e.g. an optimizer that needs a closure)."""
    try:
        p = torch.zeros(2, requires_grad=True)
        p.grad = torch.zeros(2)
        drop = ("params", "param_names", "rho", "adaptive")
        settings = {k: v for k, v in group.items() if k not in drop}
        settings.pop("fused", None)  # fused kernels may not exist on this device
        settings.pop("capturable", None)
        probe = base_cls([dict(settings, params=[p])])
        probe.step()
        st = probe.state[p]
        return {k: (torch.is_tensor(v) and v.dim() > 0) for k, v in st.items()}
    except Exception:  # noqa: BLE001 - no probe, only the structural checks below
        return None


# ---------------------------------------------------------------------------- saving


def state_dict(opt) -> dict:
    """``opt``'s state_dict as torch.optim.Optimizer.state_dict builds it (pre-hooks, packed
    groups and state, post-hooks, each of which may return a new dict), with the base
    optimizer's state_dict and the ``fsam`` entry added before the post-hooks see it."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    index: dict[int, int] = {}
    groups = []
    for g in opt.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        start = len(index)
        index.update({id(p): i for i, p in enumerate(g["params"], start) if id(p) not in index})
        packed["params"] = [index[id(p)] for p in g["params"]]
        groups.append(packed)
    # A parameter's state as a plain dict, so torch.load(weights_only=True) reads it (Slot is
    # an internal type); an entry that is not a parameter's (put there by a hook) as it is.
    state = {
        (index[id(k)] if torch.is_tensor(k) else k): (dict(v) if torch.is_tensor(k) else v)
        for k, v in opt.state.items()
    }
    sd = {
        "state": state,
        "param_groups": groups,
        "base_optimizer": opt.base_optimizer.state_dict(),
        "fsam": {
            "version": VERSION,
            "sigma": opt.sigma,
            "lmbda": opt.lmbda,
            "ema_order": opt.ema_order,
        },
    }
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
    became_sam = imported is None and sigma == 0 < opt.sigma and not plain_sam

    opt.base_optimizer.load_state_dict(sd["base_optimizer"])
    for g, new in zip(opt.param_groups, groups):
        g.clear()
        g.update(new)
    _fill_flags(opt)
    opt.state = new_state
    opt.engine.plan = None
    opt.sigma, opt.lmbda, opt.ema_order = sigma, lmbda, order

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


def _refuse_fsam(state, sigma) -> None:
    """SAM is FSAM with sigma = 0 and no EMA: loading F-SAM state would silently make it
    F-SAM (it did, before this check, with sigma 1.0)."""
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


def _check_version(fs) -> None:
    if "version" not in fs:
        raise ValueError(
            "state_dict['fsam'] has no 'version': not a state_dict written by fsam-fused "
            f"(every version writes one; this one reads format {VERSION})"
        )
    v = fs["version"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"state_dict['fsam']['version'] is {v!r}: not a format fsam-fused wrote")
    if v > VERSION:
        raise ValueError(
            f"state_dict['fsam'] is format version {v}, written by a newer fsam-fused; this "
            f"one reads format {VERSION}: upgrade fsam-fused to load it"
        )


def check_loadable(opt, sd):
    """Validate an FSAM state_dict against ``opt``; return ``(state, (sigma, lmbda, order))``
    ready to install."""
    for key in ("state", "param_groups", "base_optimizer", "fsam"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry: not an FSAM state_dict")
    fs = sd["fsam"]
    if not isinstance(fs, dict):
        raise TypeError(f"state_dict['fsam'] must be a dict, got {type(fs).__name__}")
    _check_version(fs)
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups, the optimizer "
            f"has {len(opt.param_groups)}"
        )
    id_map, group_of = {}, {}
    for i, (g, sg) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(
                f"param group {i} has {len(g['params'])} parameters, the "
                f"state_dict's has {len(sg['params'])}"
            )
        for key in ("rho", "adaptive"):
            if key not in sg:
                raise ValueError(f"the state_dict's param group {i} has no {key!r}")
        hparams.check_group(sg, f" in the state_dict's param group {i}")
        id_map.update(zip(sg["params"], g["params"]))
        group_of.update((pid, i) for pid in sg["params"])
    sigma = hparams.number("sigma in the state_dict", fs.get("sigma"), 0.0)
    lmbda = hparams.number("lmbda in the state_dict", fs.get("lmbda"), 0.0, 1.0, hi_open=True)
    order = hparams.check_ema_order(fs.get("ema_order"))
    state = State()
    for pid, s in sd["state"].items():
        if pid not in id_map:
            if isinstance(pid, int):
                raise ValueError(
                    f"state_dict has state for parameter index {pid}, which no param group holds"
                )
            state[pid] = s  # not a parameter's: copied as it is, as torch does
            continue
        p = id_map[pid]
        where = f"index {pid} (shape {tuple(p.shape)})"
        if not isinstance(s, dict) or set(s) - {"ema"}:
            raise ValueError(
                f"the state of parameter {where} must be a dict with at most an "
                f"'ema' entry, got {s!r:.200}"
            )
        if "ema" in s:
            m = s["ema"]
            # A checkpoint saved on another device loads, as torch moves state to each
            # parameter's device; the EMA keeps its own dtype (torch's default load would
            # cast it to the parameter's, losing float32 state for 16-bit weights).
            if torch.is_tensor(m) and not hasattr(m, "device_mesh"):
                m = m.to(device=p.device)
            check_ema(m, p, where)
            check_sharded_ema(m, p, where)
            state[p]["ema"] = m.to(device=p.device, copy=True)
    _check_base(opt, sd["base_optimizer"], saved_groups, id_map, group_of)
    return state, (sigma, lmbda, order)


def _check_base(opt, bsd, saved_groups, id_map, group_of) -> None:
    """The base optimizer's state_dict: its groups, and per parameter the keys this base
    optimizer keeps, each tensor of the parameter's shape where the base keeps a full-size
    tensor."""
    if not isinstance(bsd, dict) or "state" not in bsd or "param_groups" not in bsd:
        raise ValueError("state_dict['base_optimizer'] is not an optimizer state_dict")
    if [len(g["params"]) for g in bsd["param_groups"]] != [
        len(g["params"]) for g in opt.param_groups
    ]:
        raise ValueError(
            "state_dict['base_optimizer'] has param groups of other sizes than the optimizer's"
        )
    base_cls = type(opt.base_optimizer)
    structures = {}
    for pid, s in bsd["state"].items():
        if pid not in id_map:
            raise ValueError(
                f"state_dict['base_optimizer'] has state for parameter index "
                f"{pid}, which no param group holds"
            )
        p = id_map[pid]
        where = f"base optimizer state of parameter index {pid} (shape {tuple(p.shape)})"
        if not isinstance(s, dict):
            raise ValueError(f"the {where} must be a dict, got {type(s).__name__}")
        gi = group_of[pid]
        if gi not in structures:
            # The settings being loaded, not the optimizer's present ones: a checkpoint
            # saved with momentum loads into an optimizer built without it, as in torch.
            structures[gi] = _structure(base_cls, saved_groups[gi])
        want = structures[gi]
        if want is not None and set(s) != set(want):
            raise ValueError(
                f"the {where} has entries {sorted(s)}, but {base_cls.__name__} "
                f"with these settings keeps {sorted(want)}: a state_dict of "
                "another optimizer?"
            )
        for k, v in s.items():
            if torch.is_tensor(v):
                if v.device.type == "meta":
                    raise ValueError(f"the {where} has {k!r} on the meta device (no data)")
                full = want[k] if want is not None else v.dim() > 0
                if full and v.shape != p.shape:
                    raise ValueError(f"the {where} has {k!r} of shape {tuple(v.shape)}")
            elif v is not None and not isinstance(v, (int, float, bool)):
                raise ValueError(
                    f"the {where} has {k!r} of type {type(v).__name__}, where a "
                    "tensor or a number belongs"
                )
