"""Perturbation schedules: on which steps F-SAM perturbs (``FSAM(..., schedule=...)``).

A step the schedule perturbs is today's F-SAM step (two forward/backward passes). Any other
step is a **cheap step**: one fused pass updates the EMA from the step's only gradient
(``m <- lmbda * m + (1 - lmbda) * g``, the authors' rule for a parameter's first gradient
applying as on any step), then the base optimizer steps on that gradient. No saved copy, no
restore, no second forward or backward; the EMA stays current for the next perturbation,
which is what F-SAM has that SAM does not (SAM keeps no state across steps).

Who learns the decision, and when:

* :class:`EveryK` and :class:`Bernoulli` decide on the host before the step's passes, from a
  step counter and a CPU generator: no device read. Every rank of a data-parallel job with the
  same schedule (and ``seed``) decides the same.
* :class:`Adaptive` (AE-SAM) decides from the step's squared gradient norm against its running
  mean and variance, which live on the device. ``lagged=False`` (the paper's rule) reads one
  boolean on the host per step (a synchronisation on a GPU; free on the CPU).
  ``lagged=True`` applies at step t the decision the rule made at step t-1, copied to the
  host without blocking at the end of step t-1 (on CUDA: to pinned memory, with an event), so
  it never stalls.

The squared norm ``sum g**2`` (the unscaled first gradient, over every parameter with a
gradient, all ranks of a sharded parameter) comes from the cheap step's own first pass; on a
perturbing step it costs one extra read of the gradients (4 bytes per float32 parameter),
only with :class:`Adaptive`. Under torch.distributed with plain (replicated) parameters the
statistic is averaged over the ranks (``FSAM.nonfinite_group``'s group), so every rank takes
the same decision also when the first backward ran under DDP's ``no_sync()``.

Schedules are plain objects whose settings (``k``, ``p``, ``lambda1``...) may be changed
between steps, by hand or by any scheduler; their state (counters, generator, running
statistics) is in ``FSAM.state_dict()["fsam"]["schedule"]`` and a resumed run continues bit
for bit.

Example:
    >>> import torch
    >>> from fsam_fused import FSAM, EveryK
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, schedule=EveryK(2))
    >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
    >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    >>> taken = []
    >>> for _ in range(4):
    ...     loss_fn().backward()
    ...     if opt.first_step(zero_grad=True):   # True: perturbed, run the second pass
    ...         loss_fn().backward()
    ...     opt.second_step(zero_grad=True)      # restore (if perturbed), base step
    ...     taken.append(opt.last_perturbed)
    >>> taken
    [True, False, True, False]
"""

from __future__ import annotations

import math
import weakref

import torch

from . import distributed
from .hparams import number

__all__ = ["Schedule", "EveryK", "Bernoulli", "Adaptive", "check_schedule"]


class Schedule:
    """The protocol. ``decide()`` returns True (perturb), False (cheap step) or None (the
    decision needs this step's squared gradient norm: :meth:`decide_with`). The session calls
    :meth:`snapshot` before a decision and :meth:`restore` if the step then fails, so a
    failed step changes no schedule state."""

    needs_norm = False  # observe() must be given the squared gradient norm of every step
    kind = "schedule"
    _owner = None  # a weak reference to the optimizer stepping with it (one at a time)

    def __getstate__(self):  # (copies belong to no optimizer until one claims them)
        d = dict(vars(self))
        d.pop("_owner", None)
        return d

    def decide(self) -> bool | None:
        raise NotImplementedError

    def peek(self) -> bool:
        """The next step's decision, known before its backward (``FSAM.will_perturb``),
        without consuming it."""
        raise NotImplementedError

    def decide_with(self, sq: torch.Tensor) -> bool:  # pragma: no cover - Adaptive's
        raise NotImplementedError

    def prepare(self, sq: torch.Tensor, take: bool) -> bool:
        """A decision already made (``decide``) and this step's statistic, before the
        step's writes: compute whatever ``observe`` will commit. Returns the decision."""
        return take

    def observe(self, sq: torch.Tensor) -> None:
        """The step's squared gradient norm (a 1-element float32 device tensor)."""

    def snapshot(self):
        gen = getattr(self, "generator", None)
        return dict(vars(self)), None if gen is None else gen.get_state()

    def restore(self, snap) -> None:
        attrs, gen = snap
        self.__dict__.update(attrs)
        if gen is not None:
            self.generator.set_state(gen)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError

    def _check_kind(self, sd) -> None:
        if not isinstance(sd, dict) or sd.get("kind") != self.kind:
            got = sd.get("kind") if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(
                f"schedule: the checkpoint's schedule is {got!r}, this optimizer's is "
                f"{self.kind!r}; construct FSAM with the schedule the run was saved with"
            )


class EveryK(Schedule):
    """Perturb on steps 0, k, 2k, ... (Composer's SAM ``interval``, LookSAM's period);
    ``k = 1`` is every step. ``k`` may be changed between steps: the counter keeps going,
    and the next perturbation is the next multiple of the new ``k``."""

    kind = "every_k"

    def __init__(self, k: int):
        self.k = _positive_int("k", k)
        self.steps = 0

    def decide(self) -> bool:
        take = self.peek()
        self.steps += 1
        return take

    def peek(self) -> bool:
        return self.steps % _positive_int("schedule.k", self.k) == 0

    def state_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        self._check_kind(sd)
        self.k, self.steps = _positive_int("k", sd["k"]), int(sd["steps"])

    def __repr__(self) -> str:
        return f"EveryK(k={self.k})"


class Bernoulli(Schedule):
    """Perturb each step with probability ``p`` (SS-SAM's Bernoulli trial), drawn from this
    schedule's own CPU generator seeded with ``seed``: the decisions do not touch the global
    RNG (data order, dropout keep theirs) and are the same on every rank."""

    kind = "bernoulli"

    def __init__(self, p: float, seed: int = 0):
        self.p = number("p", p, 0.0, 1.0)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0

    def decide(self) -> bool:
        p = number("schedule.p", self.p, 0.0, 1.0)
        u = torch.rand((), generator=self.generator).item()  # a CPU tensor: no device sync
        self.steps += 1
        return u < p

    def peek(self) -> bool:
        p = number("schedule.p", self.p, 0.0, 1.0)
        state = self.generator.get_state()
        try:
            return torch.rand((), generator=self.generator).item() < p
        finally:
            self.generator.set_state(state)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "p": self.p,
            "seed": self.seed,
            "steps": self.steps,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        self._check_kind(sd)
        self.p = number("p", sd["p"], 0.0, 1.0)
        self.seed, self.steps = int(sd["seed"]), int(sd["steps"])
        self.generator.set_state(sd["generator"].clone())

    def __repr__(self) -> str:
        return f"Bernoulli(p={self.p}, seed={self.seed})"


class Adaptive(Schedule):
    r"""AE-SAM's adaptive policy (Jiang, Yang, Zhang and Kwok, "An Adaptive Policy to Employ
    Sharpness-Aware Minimization", ICLR 2023, arXiv:2304.14647): perturb when the squared
    norm of the stochastic gradient is large against its running statistics, i.e. when the
    iterate is in a sharp region; otherwise take the cheap step. At step ``t`` (from 0), with
    ``x_t = ||g_t||^2`` and ``mu_{-1} = s2_{-1} = 0``::

        mu_t = delta * mu_{t-1} + (1 - delta) * x_t
        s2_t = delta * s2_{t-1} + (1 - delta) * (x_t - mu_t)**2
        c_t  = lambda1 * t / T + lambda2 * (1 - t / T)          (t / T capped at 1)
        perturb  iff  x_t >= mu_t + c_t * sqrt(s2_t)

    The rule, its update order (``mu`` first, the variance against the new ``mu``) and the
    linear threshold schedule from ``lambda2`` to ``lambda1`` over the ``T`` training steps
    are the paper's. Its stored full text could not be read past the introduction here, so
    the defaults (``delta = 0.9``; ``lambda1 = -1``, ``lambda2 = 1``: about half of the steps
    perturb under a normal model of ``x``) were chosen on the validation split of
    ``examples/schedules.py``, not taken from the paper's tables.

    A non-finite ``x_t`` (an overflowed GradScaler step) leaves ``mu`` and ``s2`` unchanged and
    takes the cheap step (whose EMA update is then skipped). ``lagged``: see the module
    docstring. ``total_steps`` (``T``) is required; ``delta``, ``lambda1``, ``lambda2`` and
    ``total_steps`` may be changed between steps.
    """

    kind = "adaptive"
    needs_norm = True

    def __init__(
        self,
        total_steps: int,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        lagged: bool = False,
    ):
        self.total_steps = _positive_int("total_steps", total_steps)
        self.delta = number("delta", delta, 0.0, 1.0, hi_open=True)
        self.lambda1 = number("lambda1", lambda1, -math.inf)
        self.lambda2 = number("lambda2", lambda2, -math.inf)
        if not isinstance(lagged, bool):
            raise TypeError(f"lagged must be a bool, got {type(lagged).__name__}")
        self.lagged = lagged
        self.steps = 0
        self.mu: torch.Tensor | None = None  # float32 device tensors, shape [1]
        self.s2: torch.Tensor | None = None
        self._next = True  # lagged: the decision the rule made at the last step
        self._pending = None  # lagged: (host copy, event) of that decision, not read yet
        self._new = None  # this step's (mu, s2, flag), committed by observe()

    def _settings(self) -> tuple[float, float]:
        """``(delta, c_t)``, every setting checked (a ``ValueError``/``TypeError`` naming it)."""
        delta = number("schedule.delta", self.delta, 0.0, 1.0, hi_open=True)
        t = min(self.steps / _positive_int("schedule.total_steps", self.total_steps), 1.0)
        l1 = number("schedule.lambda1", self.lambda1, -math.inf)
        l2 = number("schedule.lambda2", self.lambda2, -math.inf)
        return delta, l1 * t + l2 * (1.0 - t)

    def _update(self, sq: torch.Tensor):
        """(mu_t, s2_t, flag_t) from x_t = sq, as new device tensors (committed later)."""
        delta, c = self._settings()
        x = sq.reshape(1).float()
        self.to(x.device)  # (statistics loaded from a checkpoint arrive on the CPU)
        mu0 = self.mu if self.mu is not None else torch.zeros_like(x)
        s0 = self.s2 if self.s2 is not None else torch.zeros_like(x)
        ok = torch.isfinite(x)
        mu = torch.where(ok, delta * mu0 + (1.0 - delta) * x, mu0)
        s2 = torch.where(ok, delta * s0 + (1.0 - delta) * (x - mu) ** 2, s0)
        flag = ok & (x >= mu + c * s2.sqrt())
        return mu, s2, flag

    def decide(self) -> bool | None:
        self._settings()  # (checked before anything is written, lagged or not)
        return self._read_pending() if self.lagged else None

    def prepare(self, sq: torch.Tensor, take: bool) -> bool:
        """Lagged: this step's statistics computed before the step's writes (committed by
        :meth:`observe`); the decision, made a step ago, stands."""
        self._new = self._update(sq)
        return take

    def peek(self) -> bool:
        self._settings()
        if not self.lagged:
            raise RuntimeError(
                "Adaptive(lagged=False) decides from the step's own gradient, after its "
                "backward: the decision is not known ahead (use lagged=True)"
            )
        return self._read_pending()

    def decide_with(self, sq: torch.Tensor) -> bool:
        """The paper's (unlagged) decision: one host read of a device boolean."""
        self._new = self._update(sq)
        return bool(self._new[2].item())  # the documented synchronisation (lagged=False)

    def observe(self, sq: torch.Tensor) -> None:
        """Commit this step's statistics (computed before the writes: ``decide_with`` or
        ``prepare``) and, lagged, start copying the next decision to the host."""
        new, self._new = self._new, None
        self.mu, self.s2, flag = new
        self.steps += 1
        if self.lagged:
            if flag.is_cuda:
                host = torch.empty(1, dtype=torch.bool, pin_memory=True)
                host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._pending = (host, event)
            else:
                self._pending = (flag, None)

    def _read_pending(self) -> bool:
        if self._pending is None:
            return self._next
        host, event = self._pending
        if event is not None:
            event.synchronize()  # recorded a whole step ago: done by now
        self._next = bool(host[0])
        self._pending = None
        return self._next

    def snapshot(self):
        return (self.steps, self.mu, self.s2, self._next, self._pending)

    def restore(self, snap) -> None:
        self.steps, self.mu, self.s2, self._next, self._pending = snap
        self._new = None

    def state_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        nxt = self._read_pending() if self.lagged else self._next
        return {
            "kind": self.kind,
            "total_steps": self.total_steps,
            "delta": self.delta,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "lagged": self.lagged,
            "steps": self.steps,
            "mu": cpu(self.mu),
            "s2": cpu(self.s2),
            "next": nxt,
        }

    def load_state_dict(self, sd: dict) -> None:
        self._check_kind(sd)
        if bool(sd["lagged"]) != self.lagged:
            raise ValueError(
                f"schedule: the checkpoint's Adaptive has lagged={sd['lagged']}, this "
                f"optimizer's lagged={self.lagged}"
            )
        self.total_steps = _positive_int("total_steps", sd["total_steps"])
        self.delta = number("delta", sd["delta"], 0.0, 1.0, hi_open=True)
        self.lambda1 = number("lambda1", sd["lambda1"], -math.inf)
        self.lambda2 = number("lambda2", sd["lambda2"], -math.inf)
        self.steps, self._next, self._pending, self._new = int(sd["steps"]), sd["next"], None, None
        # Moved to the parameters' device by the first step that reads them.
        self.mu, self.s2 = sd["mu"], sd["s2"]

    def __getstate__(self):
        # A pending decision is read first: a CUDA event cannot be copied or pickled.
        if self._pending is not None:
            self._read_pending()
        d = super().__getstate__()
        d["_pending"] = d["_new"] = None
        return d

    def to(self, device) -> None:
        if self.mu is not None and self.mu.device != device:
            self.mu, self.s2 = self.mu.to(device), self.s2.to(device)

    def __repr__(self) -> str:
        return (
            f"Adaptive(total_steps={self.total_steps}, delta={self.delta}, "
            f"lambda1={self.lambda1}, lambda2={self.lambda2}, lagged={self.lagged})"
        )


def first_half(schedule, engine, step, inv, group) -> bool:
    """A step's first half as ``schedule`` decides: the perturbation (True) or the cheap step
    (False). ``step``: ``(structure, values, groups, state)``; ``inv``: a GradScaler's 1/scale
    or None; ``group``: ``FSAM.nonfinite_group`` (who averages the adaptive statistic).
    All-or-nothing: if it raises, the weights, the EMA and the schedule are as they were.
    Every setting is checked and the statistics' new values computed before the first write;
    after it, only their commit (and a signal's handler) can raise, and the weights are then
    restored (the EMA keeps a cheap step's update, as after any failed second pass)."""
    if schedule is None:
        engine.first_step(*step, inv)
        return True
    snap = schedule.snapshot()
    try:
        take = schedule.decide()
        prepared = engine.prepare(*step, inv)
        sqs = stat = None
        if schedule.needs_norm or not take:
            sqs = engine.grad_sq(prepared)  # the cheap step's first pass, and the statistic
            if schedule.needs_norm and sqs:
                stat = distributed.agreed_mean(sqs[0].sum().reshape(1), group, prepared[0])
                take = schedule.decide_with(stat) if take is None else schedule.prepare(stat, take)
        take = True if take is None else take  # (no gradient at all: nothing to decide on)
        if take:
            engine.perturb(prepared)
        else:
            engine.cheap(prepared, sqs)
        try:
            if stat is not None:
                schedule.observe(stat)
        except BaseException:
            if engine.inflight is not None:
                engine.restore()
            raise
    except BaseException:
        schedule.restore(snap)
        raise
    return take


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def check_schedule(schedule, owner=None) -> Schedule | None:
    """``FSAM(schedule=...)``'s check: None or a :class:`Schedule` that no other live
    optimizer steps with (its counters are one run's); ``owner`` claims it."""
    if schedule is None:
        return None
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "schedule must be None (perturb every step) or a fsam_fused schedule "
            f"(EveryK, Bernoulli, Adaptive), got {type(schedule).__name__}"
        )
    other = schedule._owner() if schedule._owner is not None else None
    if other is not None and other is not owner:
        raise ValueError(
            f"schedule: this {type(schedule).__name__} already belongs to another optimizer "
            "(it holds that run's step counter and state); give each optimizer its own"
        )
    if owner is not None:
        schedule._owner = weakref.ref(owner)
    return schedule
