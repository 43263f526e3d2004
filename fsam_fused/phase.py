"""The phases of a step (:class:`fsam_fused.session.StepSession`)."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    IDLE = "idle"
    # first_step done: the weights are w + e (or, on a schedule's cheap step, the EMA is
    # updated and the base step is pending: StepSession.cheap)
    PERTURBED = "perturbed"
    SCALED = "perturbed, with a GradScaler"  # ... and scaler.step(opt) must finish it
    IN_CLOSURE = "in the closure"  # step(closure) is running the closure
    RESTORE_FAILED = "perturbed, a restore failed"  # second_step() or abandon() may retry
