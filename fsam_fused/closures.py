"""``step(closure)`` for a whole step, and a closure run as the second pass: the part of
:class:`fsam_fused.session.StepSession` that calls user code (the conventions are in the
session's module docstring)."""

from __future__ import annotations

import torch

from . import distributed, hooks
from .integrations import lightning
from .phase import Phase


class Closures:
    """Mixed into :class:`fsam_fused.session.StepSession` (whose state it uses)."""

    def _whole(self, opt, inputs, closure):
        self._range, args, kwargs = hooks.begin(opt, (closure,), {})
        closure = args[0] if args else kwargs.get("closure", closure)
        try:
            distributed.drop_unloaded_template(opt)  # (as first_step does)
            first_loss = None
            if self.sample.first_pass_ran(self.groups):  # the authors' convention
                lightning.check_first_pass(closure)
            else:  # torch.optim's: the closure runs both passes
                with torch.enable_grad():
                    first_loss = closure()
            st, values, state = inputs()
            loss = None
            # A schedule's cheap step has no second pass: the closure is not run again
            # (in the authors' convention it is not run at all: None is returned).
            if self.first(st, values, state, group=opt.nonfinite_group):
                loss = self.second_pass(closure, fresh=True)
            self._finish(opt, inputs, None, None)
        except BaseException:
            # The gradients now in .grad are this failed step's (given back, or the first
            # call's): not a first pass for the next step(closure) to perturb along.
            self.sample.leave(None, self.groups)
            if not self.in_flight:
                self._end_range(None)
            raise
        return loss if first_loss is None else first_loss

    def second_pass(self, closure, fresh: bool):
        """Run ``closure`` as the second pass (phase IN_CLOSURE). ``fresh``: on cleared
        gradients, the first pass's ``.grad`` given back if it raises (``step(closure)``);
        else as they are (a framework's closure after ``first_step()``). If it raises, the
        step is abandoned: weights restored, the EMA keeping this step's update (see the
        engine's failure policy)."""
        params = [p for g in self.groups for p in g["params"]] if fresh else []
        first_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        self._resume, self.phase = self.phase, Phase.IN_CLOSURE
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.phase = self._resume
            self.abandon()
            for p, g in zip(params, first_grads):
                p.grad = g
            raise
        self.phase = self._resume
        return loss
