"""Checkpoints of the SAM optimizers users switch from, translated into FSAM's state_dict.

Four optimizers are read, each recognised by the structure of its ``state_dict()`` (none
writes a format tag):

* davda54's ``SAM`` (github.com/davda54/sam): param groups with ``rho`` and ``adaptive``; per
  parameter only ``old_p`` (older versions: ``e_w``), a copy of the weights (or of the
  perturbation) taken during its step, which is not optimizer state;
* the authors' ``FriendlySAM`` (github.com/nblt/F-SAM; ``fsam_fused/published.py``): the same
  groups; per parameter ``momentum`` (the EMA of the gradients, FSAM's ``ema``) and
  ``old_p``; ``sigma`` and ``lmbda`` are attributes, not saved;
* pytorch_optimizer's ``FriendlySAM``: groups that also hold ``sigma`` and ``lmbda`` (one value
  per group; FSAM has one for all groups); per parameter ``momentum`` (``old_p`` exists only
  between its two steps, so a dict holding it was saved with perturbed weights and is refused);
* pytorch_optimizer's ``SAM``, whose ``state`` *is* its base optimizer's (one dict shared):
  groups with ``rho`` and ``adaptive``, per parameter the base optimizer's keys
  (``momentum_buffer``...), checked against the base optimizer as any base state is.

All of them build the base optimizer on their own param groups, so their ``state_dict()``
holds the base optimizer's options. Its state (momentum buffers, Adam moments) is in
pytorch_optimizer's FriendlySAM under ``base_optimizer`` (the key FSAM uses) and in its SAM's
``state``, but davda54's and the authors' keep it only in ``base_optimizer.state_dict()``: a
user who saved both passes them together,
``dict(sd, base_optimizer=peer.base_optimizer.state_dict())``; without it the base optimizer
starts afresh, as it does when those libraries resume from their own checkpoints. The
FriendlySAMs compute the EMA in the authors' order (``ema_order="official"``).
What was imported and what was not is said in one :class:`PeerCheckpointWarning`.
"""

from __future__ import annotations

import copy

_NOT_STATE = {
    "old_p": "a copy of the weights taken during its step (not optimizer state)",
    "e_w": "the perturbation of its last step (not optimizer state)",
}
DAVDA54 = "davda54's SAM"
AUTHORS = "the authors' FriendlySAM"
PYTORCH_OPTIMIZER = "pytorch_optimizer's FriendlySAM"
PYTORCH_OPTIMIZER_SAM = "pytorch_optimizer's SAM"


class PeerCheckpointWarning(UserWarning):
    """Says what a checkpoint of another SAM library became when loaded into FSAM.

    Example (the authors' FriendlySAM, with the base optimizer's state saved beside it):
        >>> import warnings, torch
        >>> from fsam_fused import FSAM
        >>> from fsam_fused.peers import PeerCheckpointWarning
        >>> from fsam_fused.published import FriendlySAM
        >>> model = torch.nn.Linear(4, 2)
        >>> theirs = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
        >>> x = torch.randn(8, 4)
        >>> model(x).pow(2).mean().backward()
        >>> theirs.first_step(zero_grad=True)
        >>> model(x).pow(2).mean().backward()
        >>> theirs.second_step(zero_grad=True)
        >>> sd = dict(theirs.state_dict(), base_optimizer=theirs.base_optimizer.state_dict())
        >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     opt.load_state_dict(sd)
        >>> caught[0].category is PeerCheckpointWarning
        True
        >>> str(caught[0].message).split(".")[0]
        "loaded a checkpoint of the authors' FriendlySAM"
        >>> sorted(opt.state[model.weight]), opt.param_groups[0]["rho"]
        (['ema'], 0.1)
    """


def _not_ours(sd) -> ValueError:
    return ValueError(
        "state_dict has no 'fsam' entry: not an FSAM state_dict, nor one of the SAM "
        "optimizers FSAM reads (davda54's SAM, the authors' FriendlySAM, pytorch_optimizer's "
        "FriendlySAM: a torch.optim state_dict whose param groups hold 'rho' and 'adaptive'); "
        f"its entries are {sorted(map(str, sd))}"
    )


def detect(sd: dict) -> tuple[str, set]:
    """``(library, per-parameter state keys)`` of a peer's state_dict, or a ``ValueError``
    saying why it is none of them."""
    groups, state = sd.get("param_groups"), sd.get("state")
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or not groups
        or not all(isinstance(g, dict) and {"rho", "adaptive", "params"} <= set(g) for g in groups)
    ):
        raise _not_ours(sd)
    keys = set()
    for pid, s in state.items():
        if not isinstance(s, dict):
            raise ValueError(f"the state of parameter index {pid} must be a dict, got {s!r:.100}")
        keys |= set(s)
    own = {"momentum", *_NOT_STATE}
    if all("sigma" in g and "lmbda" in g for g in groups):
        kind = PYTORCH_OPTIMIZER
    elif keys - own:
        kind = PYTORCH_OPTIMIZER_SAM  # its state is the base optimizer's (checked as such)
    else:
        kind = AUTHORS if "momentum" in keys else DAVDA54
    if kind in (PYTORCH_OPTIMIZER, PYTORCH_OPTIMIZER_SAM) and "old_p" in keys:
        raise ValueError(
            f"this {kind} state_dict holds 'old_p': it was saved between first_step and "
            "second_step, when the weights are perturbed; save after a whole step"
        )
    if kind == PYTORCH_OPTIMIZER and keys - own:
        raise ValueError(
            f"this {kind} state_dict's per-parameter state holds "
            f"{sorted(map(str, keys - own))}, which it never keeps (its own is 'momentum')"
        )
    return kind, keys


def _sigma_lmbda(groups) -> tuple[float, float]:
    """pytorch_optimizer keeps sigma and lmbda in each group; FSAM has one of each."""
    values = {(g["sigma"], g["lmbda"]) for g in groups}
    if len(values) != 1:
        raise ValueError(
            f"this {PYTORCH_OPTIMIZER} state_dict has param groups with different sigma or "
            f"lmbda {sorted(values)}; FSAM has one sigma and one lmbda for all groups"
        )
    return values.pop()


def as_fsam(opt, sd: dict, version: int) -> tuple[dict, str | None]:
    """``(sd, None)`` for an FSAM state_dict; for a peer's, ``(the same in FSAM's format, a
    message saying what was imported and what was not)``. ``sd`` itself is not modified."""
    if "fsam" in sd:
        return sd, None
    kind, keys = detect(sd)
    groups = [dict(g) for g in sd["param_groups"]]
    sigma, lmbda, hp = opt.sigma, opt.lmbda, None
    if kind == PYTORCH_OPTIMIZER:
        sigma, lmbda = _sigma_lmbda(groups)
        for g in groups:
            del g["sigma"], g["lmbda"]
        hp = f"sigma={sigma} and lmbda={lmbda} from its param groups"
    state, base_from = {}, None
    if kind == PYTORCH_OPTIMIZER_SAM:  # one state dict shared with its base optimizer
        base = {"state": sd["state"], "param_groups": copy.deepcopy(groups)}
        base_from = "from its 'state' (it shares the base optimizer's)"
    else:
        state = {pid: {"ema": s["momentum"]} for pid, s in sd["state"].items() if "momentum" in s}
        base = sd.get("base_optimizer")
        if base is None:
            base = {"state": {}, "param_groups": copy.deepcopy(groups)}
        else:
            base_from = "from the 'base_optimizer' entry"
    out = {
        "state": state,
        "param_groups": groups,
        "base_optimizer": base,
        # Their EMA was computed in the authors' order; without one, the optimizer's stays.
        "fsam": {
            "version": version,
            "sigma": sigma,
            "lmbda": lmbda,
            "ema_order": "official" if state else opt.ema_order,
        },
    }
    return out, _message(opt, kind, keys, len(groups), len(state), (sigma, lmbda, hp), base_from)


def _message(opt, kind, keys, n_groups, n_emas, hps, base_from) -> str:
    sigma, lmbda, hp = hps
    done = [f"the {n_groups} param group(s) (rho, adaptive and the base optimizer's options)"]
    left = [f"{k!r}: {_NOT_STATE[k]}" for k in sorted(keys & set(_NOT_STATE))]
    if n_emas:
        done.append(f"the EMA 'momentum' of {n_emas} parameter(s), as FSAM's 'ema'")
    elif sigma > 0:
        left.append(
            "an EMA (the checkpoint holds none): FSAM's starts from the next gradient, "
            "whose step perturbs along the plain gradient as a fresh FSAM's first step does "
            f"(sigma={sigma}, lmbda={lmbda})"
        )
    if hp:
        done.append(hp)
    elif kind == AUTHORS:  # SAM has no sigma nor lmbda to save
        left.append(
            f"sigma and lmbda ({kind} does not save them): this optimizer keeps "
            f"sigma={sigma}, lmbda={lmbda}"
        )
    if n_emas and opt.ema_order != "official":
        done.append("ema_order='official' (the order it computed its EMA in)")
    if base_from:
        done.append(f"the base optimizer's state, {base_from}")
    else:
        left.append(
            f"the base optimizer's state: {kind}'s state_dict does not hold it (it is in "
            "peer.base_optimizer.state_dict()), so the base optimizer starts afresh (no "
            "momentum or moments); to carry it, load "
            "dict(sd, base_optimizer=peer.base_optimizer.state_dict())"
        )
    return (
        f"loaded a checkpoint of {kind}. Imported: "
        + "; ".join(done)
        + ". Not imported: "
        + ("; ".join(left) if left else "nothing")
        + "."
    )
