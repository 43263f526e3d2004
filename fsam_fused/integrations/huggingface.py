"""F-SAM in the Hugging Face ``Trainer``: :class:`FSAMTrainer` (or :class:`FSAMTrainerMixin`
on a ``Trainer`` subclass of your own).

The ``Trainer`` calls ``training_step`` once per micro-batch and ``optimizer.step()`` after
the last micro-batch of each accumulation cycle. F-SAM needs two gradients per optimizer
step, each over the whole cycle, so on the cycle's last micro-batch the mixin runs the
``first_step`` (the first pass, over every micro-batch, has accumulated by then) and the
second pass over the same micro-batches, at ``w + e``; the ``Trainer`` then clips the second
gradient (``max_grad_norm``) and calls ``optimizer.step()``, which restores ``w`` and steps
the base optimizer (through accelerate's GradScaler under fp16). What it keeps:

- every micro-batch in both passes, normalised as the ``Trainer`` normalises the first;
- under DDP both passes are reduced once, on the cycle's last micro-batch (``no_sync`` for
  the others, as the ``Trainer`` does for the first pass): single-process F-SAM on the
  global batch;
- fp16: ``first_step`` gets accelerate's ``GradScaler`` (an overflow in either pass skips
  the step and backs the scale off); bf16 needs none;
- the second forward does not update BatchNorm running statistics (:func:`fsam_fused.bn_frozen`);
- the logged loss is the first pass's (at ``w``); the micro-batches of a cycle are held
  until its last one (the ``Trainer`` has prefetched them already: no extra copy);
- if the second pass raises, the weights are restored before the error propagates;
- with a perturbation schedule (``fsam_kwargs={"schedule": ...}``), a cheap step runs no
  second pass: ``optimizer.step()`` steps the base on the first pass's gradient.

Dropout draws new masks in the second forward, as in the authors' loop.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..bn import bn_frozen
from ..optimizer import FSAM
from . import _shadow, unwrap

_shadow.unshadow()  # before transformers imports `kernels` (see _shadow)

import transformers  # noqa: E402

from . import accelerate as _accelerate  # noqa: E402,F401  (the wrapper's forwarding)

__all__ = ["FSAMTrainer", "FSAMTrainerMixin"]


class FSAMTrainerMixin:
    """Both F-SAM passes per optimizer step in a ``transformers.Trainer`` (put it first
    among the bases). ``fsam_kwargs`` (``rho``, ``sigma``, ``lmbda``, ``adaptive``,
    ``backend``, ...) builds an :class:`~fsam_fused.FSAM` around the base optimizer that
    ``TrainingArguments`` selects (``optim``, ``learning_rate``, ``weight_decay`` groups, ...);
    an FSAM passed in ``optimizers=(opt, scheduler)`` is used as it is.

    Example:
        >>> import torch, transformers
        >>> from fsam_fused.integrations.huggingface import FSAMTrainer
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 2)
        ...     def forward(self, x, labels):
        ...         return {"loss": torch.nn.functional.cross_entropy(self.lin(x), labels)}
        >>> data = [{"x": torch.randn(4), "labels": i % 2} for i in range(16)]
        >>> args = transformers.TrainingArguments(
        ...     "/tmp/fsam-doctest", use_cpu=True, per_device_train_batch_size=4,
        ...     gradient_accumulation_steps=2, max_steps=2, report_to=[], save_strategy="no",
        ...     optim="sgd", learning_rate=0.1, disable_tqdm=True)
        >>> trainer = FSAMTrainer(model=Net(), args=args, train_dataset=data,
        ...                       fsam_kwargs={"rho": 0.05, "sigma": 1.0, "lmbda": 0.9})
        >>> trainer.train().global_step  # the Trainer prints its metrics first
        {...}
        2
        >>> type(trainer.optimizer.optimizer).__name__
        'FSAM'
    """

    def __init__(self, *args: Any, fsam_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        if fsam_kwargs is not None and not isinstance(fsam_kwargs, dict):
            raise TypeError(f"fsam_kwargs must be a dict, got {type(fsam_kwargs).__name__}")
        self.fsam_kwargs = dict(fsam_kwargs or {})
        self._fsam_cycle: list[tuple[Any, Any]] = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """``Trainer.create_optimizer`` with the selected optimizer as F-SAM's base."""
        if self.optimizer is not None:
            return super().create_optimizer(model)
        chosen = self.optimizer_cls_and_kwargs
        cls, kwargs = chosen or self.get_optimizer_cls_and_kwargs(
            self.args, self.model if model is None else model
        )
        if isinstance(cls, type) and issubclass(cls, FSAM):
            return super().create_optimizer(model)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(
                f"FSAMTrainer needs a torch.optim.Optimizer class as F-SAM's base; "
                f"TrainingArguments.optim={self.args.optim!r} gives {cls!r}"
            )
        # The Trainer's own construction (parameter groups, weight decay split) with FSAM as
        # the class and the selected optimizer as its base.
        self.optimizer_cls_and_kwargs = (
            FSAM,
            {**kwargs, **self.fsam_kwargs, "base_optimizer": cls},
        )
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = chosen

    def train(self, *args: Any, **kwargs: Any):
        self._fsam_cycle = []  # nothing left over from a run that raised
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The first pass on this micro-batch; on the cycle's last one, ``first_step`` and
        the second pass over the whole cycle (the ``Trainer`` then calls ``optimizer.step()``)."""
        opt = unwrap(self.optimizer)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._fsam_cycle.append((inputs, num_items_in_batch))
        # The Trainer sets sync_gradients before each micro-batch: True on the last one of
        # the cycle, the one after which it steps the optimizer.
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        cycle, self._fsam_cycle = self._fsam_cycle, []
        if not opt.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler):
            return loss  # a schedule's cheap step: no second pass (optimizer.step() ends it)
        try:
            with bn_frozen(model):
                for i, (mb, n) in enumerate(cycle):
                    last = i == len(cycle) - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with sync:
                        super().training_step(model, mb, n)
        except BaseException:
            opt.abandon_step()  # the weights back (bit for bit), no base step
            raise
        return loss


class FSAMTrainer(FSAMTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` training with F-SAM: see :class:`FSAMTrainerMixin`."""
