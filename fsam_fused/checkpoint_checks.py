"""Every check on a state_dict in FSAM's format before it is loaded: the format version, the
groups, each EMA, and the base optimizer's kind of state. Nothing is modified here; errors
name the offending entry."""

from __future__ import annotations

import torch

from . import hparams
from .buffers import State, check_ema, check_sharded_ema

# The format of state_dict()["fsam"]; a reader refuses a newer one (it cannot know what the
# new fields mean) and a missing one (not a dict this package wrote).
VERSION = 1


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
