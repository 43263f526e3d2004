"""FSAM through Hugging Face accelerate.

``accelerator.prepare(opt)`` wraps the optimizer in an ``AcceleratedOptimizer``, which
forwards ``step``, ``zero_grad`` and the state but not FSAM's own methods. This module gives
that class a ``__getattr__`` that forwards :data:`FORWARDED` (and only those) to the FSAM
inside, so the manual loop reads the same with or without accelerate::

    model, opt = accelerator.prepare(model, FSAM(model.parameters(), torch.optim.SGD, lr=0.1))
    accelerator.backward(loss_fn(model(x), y))
    opt.first_step(zero_grad=True, grad_scaler=accelerator.scaler)   # the FSAM's first_step
    accelerator.backward(loss_fn(model(x), y))
    opt.step()      # accelerate: scaler.step(fsam) + scaler.update() under fp16, else fsam.step()
    opt.zero_grad()

It is installed when this module is imported, and by every ``FSAM(...)`` built after
accelerate was imported. Attributes are not forwarded (setting ``opt.sigma`` on the wrapper
would silently not reach the FSAM): use :func:`fsam_fused.integrations.unwrap` for those.
"""

from __future__ import annotations

from accelerate.optimizer import AcceleratedOptimizer

from . import unwrap

__all__ = ["FORWARDED", "install", "unwrap"]

#: FSAM's methods that torch.optim.Optimizer (and so the wrapper) does not have.
FORWARDED = frozenset(
    {
        "first_step",
        "second_step",
        "found_nonfinite",
        "plan_summary",
        "backend_for",
        "perturbed",
        "abandon_step",
        "will_perturb",
        "last_perturbed",
        "schedule",
    }
)


def install(cls: type = AcceleratedOptimizer) -> None:
    """Give ``cls`` (accelerate's optimizer wrapper) a ``__getattr__`` forwarding
    :data:`FORWARDED` to an FSAM inside; idempotent. Names the class already resolves are
    untouched (``__getattr__`` runs only when normal look-up fails), and a ``__getattr__``
    the class had is called for every other name.

    Example:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from fsam_fused import FSAM
        >>> model = torch.nn.Linear(4, 1)
        >>> accelerator = Accelerator(cpu=True)
        >>> opt = accelerator.prepare(FSAM(model.parameters(), torch.optim.SGD, lr=0.1))
        >>> type(opt).__name__
        'AcceleratedOptimizer'
        >>> accelerator.backward(model(torch.randn(8, 4)).square().mean())
        >>> opt.first_step(zero_grad=True)
        True
        >>> accelerator.backward(model(torch.randn(8, 4)).square().mean())
        >>> opt.step()
    """
    if cls.__dict__.get("_fsam_forwarding", False):
        return
    previous = cls.__dict__.get("__getattr__")

    def __getattr__(self, name):
        if name in FORWARDED:
            # vars(): no attribute look-up that could come back here (unpickling calls
            # __getattr__ before __dict__ is filled).
            try:
                return getattr(unwrap(vars(self)["optimizer"]), name)
            except (KeyError, TypeError):
                pass  # not an FSAM inside: the ordinary AttributeError below
        if previous is not None:
            return previous(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    cls.__getattr__ = __getattr__
    cls._fsam_forwarding = True


install()
