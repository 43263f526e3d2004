"""Every validation of F-SAM's hyper-parameters and options, in one place.

The optimizer's attributes (``sigma``, ``lmbda``, ``ema_order``, ``backend``, ``ema_dtype``,
``fixed_addresses``) and each param group's ``rho`` and ``adaptive`` may be changed by the user
or a scheduler between steps, so they are checked again at every ``first_step``, before
anything is modified, and split into a :class:`Structure` (what a plan is built for) and
:class:`Values` (numbers the device reads, refreshed in place: :mod:`fsam_fused.rows`).
Every error names the argument (and the param group) it is about.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

BACKENDS = ("auto", "reference", "foreach", "triton", "cpp")
EMA_ORDERS = ("official", "paper")
EMA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The arithmetic dtype of the perturbation and the default EMA dtype: float32 for 16-bit
# storage, float64 for float64 weights (SEMANTICS: "sums accumulated in at least float32").
EPS = 1e-12


def opmath(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for weights of ``dtype``: float32 for 16-bit storage, else its own."""
    return torch.promote_types(dtype, torch.float32)


def number(name: str, value, lo: float, hi: float = math.inf, hi_open: bool = False) -> float:
    """``value`` as a float in ``[lo, hi]`` (``[lo, hi)`` if ``hi_open``), finite; else a
    ``TypeError``/``ValueError`` that names ``name``."""
    if type(value) is float and lo <= value < hi:  # the common case, checked in one compare
        return value
    value = host_value(value)  # (a 0-dim tensor value: compiled/captured steps)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"Invalid {name}: {value!r} is too large for a float") from None
    if not math.isfinite(f) or f < lo or f > hi or (hi_open and f >= hi):
        bound = f"[{lo}, {hi})" if hi_open else f">= {lo}"
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and {bound})")
    return f


# Values may be given as 0-dim floating tensors (as torch.optim takes a Tensor
# lr), which a compiled or captured step reads on the device (fsam_fused/compiled.py); an
# eager step reads them on the host: one synchronisation per tensor value and step on a GPU.
def host_value(value):
    """A 0-dim floating tensor's value as a Python float (read on the host); anything else
    as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        return value.item()
    return value


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (one of {BACKENDS})")
    return backend


def check_ema_order(order) -> str:
    if not isinstance(order, str) or order not in EMA_ORDERS:
        raise ValueError(f"Invalid ema_order: {order!r} (one of {EMA_ORDERS})")
    return order


def check_ema_dtype(dtype) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in EMA_DTYPES):
        raise ValueError(
            f"Invalid ema_dtype: {dtype!r} (None for the default, or one of "
            "torch.float32, torch.bfloat16, torch.float16, torch.float64)"
        )
    return dtype


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_group(group: dict, where: str = "") -> tuple[float, bool]:
    """(rho, adaptive) of a param group (or of the defaults when ``where`` is empty)."""
    return (
        number(f"rho{where}", group["rho"], 0.0),
        check_flag(f"adaptive{where}", group["adaptive"]),
    )


@dataclass(frozen=True)
class Structure:
    """What a plan is built for: while it compares equal, the plan (buckets, buffers, backend
    tables) is reused. ``adaptive`` is per param group, in order (it selects code paths)."""

    backend: str
    ema_dtype: torch.dtype | None
    fixed_addresses: bool
    has_ema: bool  # sigma > 0; sigma == 0 is plain SAM: no EMA is stored or read
    paper: bool
    adaptive: tuple[bool, ...]

    def ema_dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        return self.ema_dtype or opmath(dtype)


class Values(NamedTuple):
    """What a step reads as numbers: refreshed in place on the device (``rows.Rows``) when it
    changes, never a reason to rebuild a plan. ``rhos`` is per param group, in order. (A
    NamedTuple: a schedule makes one every step.)"""

    sigma: float
    lmbda: float
    rhos: tuple[float, ...]


def config(
    sigma, lmbda, ema_order, backend, ema_dtype, fixed_addresses, groups
) -> tuple[Structure, Values]:
    """Validate everything a step reads; raise before anything is modified."""
    checked = [check_group(g, f" in param group {i}") for i, g in enumerate(groups)]
    sigma = number("sigma", sigma, 0.0)
    structure = Structure(
        backend=check_backend(backend),
        ema_dtype=check_ema_dtype(ema_dtype),
        fixed_addresses=check_flag("fixed_addresses", fixed_addresses),
        has_ema=sigma > 0,
        paper=check_ema_order(ema_order) == "paper",
        adaptive=tuple(a for _, a in checked),
    )
    values = Values(
        sigma=sigma,
        lmbda=number("lmbda", lmbda, 0.0, 1.0, hi_open=True),
        rhos=tuple(r for r, _ in checked),
    )
    return structure, values


class ConfigCache:
    """An optimizer's ``(Structure, Values)``, validated again only when one of its inputs
    changed (a tuple compare per step instead of every check). A changed rho, sigma or lmbda
    is validated alone and gives a new ``Values`` with the *same* ``Structure`` object, so a
    schedule costs a few number checks a step and the plan is kept."""

    def __init__(self):
        self._raw, self._structure, self._values = None, None, None

    def __call__(self, opt) -> tuple[Structure, Values]:
        groups = opt.param_groups
        sigma, lmbda = opt.sigma, opt.lmbda
        # tensor values are compared by value (one may be changed in place)
        sigma, lmbda = host_value(sigma), host_value(lmbda)
        # Types too: 1 == True == 1.0, but only the last is a valid rho or sigma.
        vraw = (
            sigma,
            type(sigma),
            lmbda,
            type(lmbda),
            [(r, type(r)) for r in (host_value(g["rho"]) for g in groups)],
        )
        sraw = (
            opt.ema_order,
            opt.backend,
            opt.ema_dtype,
            opt.fixed_addresses,
            type(opt.fixed_addresses),
            [(g["adaptive"], type(g["adaptive"])) for g in groups],
        )
        raw = self._raw
        try:
            same_s = raw is not None and sraw == raw[1]
            same_v = same_s and vraw == raw[0]
        except (RuntimeError, TypeError, ValueError):  # e.g. a tensor compared with a float
            same_s = same_v = False
        if same_v:
            return self._structure, self._values
        if same_s:
            sigma = number("sigma", sigma, 0.0)  # (before it is compared with anything)
        if same_s and (sigma > 0) == self._structure.has_ema:
            # Values only: check them alone (a schedule pays this, not the whole config).
            rhos = [r for r, _ in vraw[4]]
            # (finite non-negative floats, the common case, without naming each group)
            if not all(type(r) is float and 0.0 <= r < math.inf for r in rhos):
                rhos = [number(f"rho in param group {i}", r, 0.0) for i, r in enumerate(rhos)]
            self._values = Values(
                sigma, number("lmbda", lmbda, 0.0, 1.0, hi_open=True), tuple(rhos)
            )
        else:
            structure, self._values = config(
                sigma, lmbda, opt.ema_order, opt.backend, opt.ema_dtype, opt.fixed_addresses, groups
            )
            if structure != self._structure:
                self._structure = structure
        self._raw = (vraw, sraw)
        return self._structure, self._values
