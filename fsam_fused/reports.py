"""What an F-SAM step reports and the in-flight controls: the part of ``FSAM``'s public
surface that reads the step session (``FSAM`` inherits it; kept apart so the optimizer class
stays the torch.optim surface)."""

from __future__ import annotations

import torch

from .engine import BucketSummary, Engine


def own(opt):
    """The FSAM whose step this is: ``opt`` itself, or the FSAM inside a wrapper, a few
    levels deep: one that borrows its class (Lightning's ``LightningOptimizer`` has FSAM
    among its bases but not its ``__dict__``) or holds it as ``.optimizer`` (accelerate's).
    The step must run on the optimizer GradScaler and the state know."""
    if "_session" in opt.__dict__:  # (the common case: one look-up a step)
        return opt
    inner = opt
    for _ in range(4):
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
        if isinstance(inner, StepReports) and "_session" in vars(inner):
            return inner
    raise TypeError(f"{type(opt).__name__} is not, and does not wrap, an FSAM optimizer")


class StepReports:
    """``plan_summary``, ``backend_for``, ``found_nonfinite``, ``perturbed``,
    ``abandon_step`` and ``engine`` of :class:`fsam_fused.FSAM`."""

    @property
    def engine(self) -> Engine:
        """The step engine (introspection and benchmarks: ``opt.engine.passes()``)."""
        return own(self)._session.engine

    def plan_summary(self) -> list[BucketSummary]:
        """One :class:`fsam_fused.engine.BucketSummary` per bucket of the last step's plan
        (device, dtype, backend, tensors, elements, double-buffered tensors, bytes per step);
        empty before the first step."""
        return own(self)._session.engine.summary()

    def backend_for(self, param: torch.Tensor) -> str | None:
        """The backend that ran ``param`` in the last step (None if it had no gradient)."""
        return own(self)._session.engine.backend_for(param)

    def found_nonfinite(self) -> torch.Tensor | None:
        """Whether the last step saw a non-finite gradient: a 0-dim float32 device tensor,
        1.0 or 0.0 (more than 1.0 when both passes did, with a GradScaler), None before the
        first step. It covers the first pass always, and the second pass too when a
        GradScaler or ``skip_nonfinite=True`` checked it. Reading its value (``.item()``,
        ``bool()``) synchronises with the device; passing it on does not. Each call returns
        a new tensor (a device copy, no synchronisation) that later steps do not change, so a
        logger may keep it and read it after the next step.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> model(torch.tensor([[float("inf"), 0.0, 0.0]])).sum().backward()
            >>> w = model.weight.detach().clone()
            >>> opt.first_step(zero_grad=True)       # non-finite: the weights are not perturbed
            True
            >>> torch.equal(model.weight, w), opt.found_nonfinite().item()
            (True, 1.0)
        """
        # A copy: the engine's flag is one tensor per device that every step rewrites.
        f = own(self)._session.found
        return None if f is None else f.clone()

    @property
    def perturbed(self) -> bool:
        """True between ``first_step()`` and the end of the step: the weights are ``w + e``
        (not the model's weights: don't average, evaluate or save them now). Host state only.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> opt.perturbed
            False
        """
        return own(self)._session.perturbed

    def will_perturb(self) -> bool:
        """Whether the next ``first_step()`` will perturb, known before its backward: True
        without a schedule; from ``EveryK``, ``Bernoulli`` and ``Adaptive(lagged=True)``
        without consuming the decision (``Adaptive(lagged=False)`` raises: it decides from
        the step's gradient). For DDP's per-replica recipe, whose first backward runs under
        ``no_sync()`` only on steps that perturb (``docs/training-loops.md``)."""
        session = own(self)._session
        with session:  # (one thread at a time: Bernoulli's peek draws and puts back)
            return True if session.schedule is None else session.schedule.peek()

    @property
    def in_flight(self) -> bool:
        """True between ``first_step()`` and the end of the step, perturbed or not (a
        schedule's cheap step waits for its base step then): ``state_dict()``,
        ``load_state_dict()`` and copies are refused while it is. Host state only."""
        return own(self)._session.in_flight

    @property
    def last_perturbed(self) -> bool | None:
        """Whether the last (or current) step perturbed the weights: False for a schedule's
        cheap step, None before the first step. Host state only (``step(closure)`` callers
        count perturbed steps with it)."""
        return own(self)._session.took

    @torch.no_grad()
    def abandon_step(self) -> bool:
        """End a step in flight without a base step: the weights get their saved bits back
        (the EMA keeps the first pass's update, as after any failed second pass). For a loop
        whose second pass failed outside ``step(closure)`` (another rank died, a bad batch).
        Returns False, changing nothing, when no step was in flight.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> w = model.weight.detach().clone()
            >>> model(torch.randn(4, 3)).sum().backward()
            >>> opt.first_step(zero_grad=True)
            True
            >>> opt.abandon_step(), torch.equal(model.weight, w), opt.perturbed
            (True, True, False)
        """
        return own(self)._session.abandon_step()
