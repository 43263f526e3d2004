"""Lightning's automatic optimization, as seen from ``FSAM.step(closure)``.

Lightning (2.x) hands ``optimizer.step`` a ``functools.partial`` of its precision plugin's
``_wrap_closure(model, optimizer, closure)``; the closure runs ``training_step``, ``zero_grad``
(on the first micro-batch of an accumulation cycle) and the backward. With one micro-batch per
step that is torch.optim's closure convention, which FSAM runs twice (both passes). With
``accumulate_grad_batches > 1`` Lightning has already run the cycle's other micro-batches
before it calls ``step``: FSAM cannot run them again at the perturbed weights, so it refuses
(the manual-optimization recipe in ``docs/training-loops.md`` runs every micro-batch in both
passes). Nothing of Lightning is imported here: the closure is recognised by its module.
"""

from __future__ import annotations

import functools

ACCUMULATION = (
    "Lightning's automatic optimization with accumulate_grad_batches > 1: Lightning ran the "
    "cycle's earlier micro-batches before calling optimizer.step, so F-SAM's second pass "
    "could not see them. Use accumulate_grad_batches=1, or manual optimization with every "
    "micro-batch in both passes (docs/training-loops.md)"
)


def automatic_module(closure):
    """The LightningModule if ``closure`` is the one Lightning's automatic optimization hands
    ``optimizer.step``, else None."""
    if not isinstance(closure, functools.partial) or not closure.args:
        return None
    owner = getattr(closure.func, "__self__", None)
    if owner is None or not type(owner).__module__.startswith(("lightning.", "pytorch_lightning.")):
        return None
    module = closure.args[0]
    return module if getattr(module, "automatic_optimization", False) else None


def check_first_pass(closure) -> None:
    """Called when gradients were written before ``step(closure)``: under Lightning's
    automatic optimization that is gradient accumulation, which F-SAM cannot follow."""
    if automatic_module(closure) is not None:
        raise RuntimeError(ACCUMULATION)
