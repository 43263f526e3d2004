"""BatchNorm running statistics and F-SAM's second forward pass.

F-SAM runs two forward passes per step; the second one, at the perturbed weights ``w + e``,
would update every BatchNorm's running mean and variance (and ``num_batches_tracked``) a
second time, with statistics of a model that is never deployed. :func:`bn_frozen` keeps
them out of it: inside it, BatchNorm layers in training mode still normalise with the batch's
statistics (the forward is exactly the training forward) but update nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["bn_frozen", "disable_running_stats", "enable_running_stats"]

_NORMS = (torch.nn.modules.batchnorm._NormBase,)


def _norms(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, _NORMS)]


@contextlib.contextmanager
def bn_frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, no BatchNorm (or InstanceNorm with running stats) of ``model``
    updates its running statistics or ``num_batches_tracked``; training-mode layers still use
    the batch's statistics. Restores every layer's setting on exit, also on error. Blocks
    nest, and mix with :func:`disable_running_stats` in any order: a layer is frozen while
    any of them holds it, and gets its own setting back when the last one ends.

    Example:
        >>> import torch
        >>> from fsam_fused import FSAM, bn_frozen
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> x = torch.randn(16, 4)
        >>> model(x).square().mean().backward()       # first pass: updates the stats
        >>> opt.first_step(zero_grad=True)
        True
        >>> with bn_frozen(model):                    # second pass: does not
        ...     model(x).square().mean().backward()
        >>> opt.second_step(zero_grad=True)
        >>> int(model[1].num_batches_tracked)
        1
    """
    layers = _norms(model)
    for m in layers:
        _freeze(m)
    try:
        yield model
    finally:
        for m in layers:
            _thaw(m)


# The helpers compose. Each layer counts the holds on it (every bn_frozen block
# it is in, plus one for disable_running_stats until enable_running_stats) and keeps its own
# setting from before the first: nesting and mixing the two styles in any order leave it
# frozen while any hold remains, and give its setting back when the last one ends.


def _freeze(m) -> None:
    n = m.__dict__.get("_fsam_holds", 0)
    if n == 0:
        # With track_running_stats off a training-mode layer normalises with the batch's
        # statistics and passes no running buffers: nothing is updated or counted.
        m._fsam_tracking = m.track_running_stats
    m._fsam_holds = n + 1
    m.track_running_stats = False


def _thaw(m) -> None:
    n = m.__dict__.get("_fsam_holds", 0)
    if n > 1:
        m._fsam_holds = n - 1
    elif n == 1:
        m.track_running_stats = m._fsam_tracking
        del m._fsam_holds, m._fsam_tracking


def disable_running_stats(model: torch.nn.Module) -> None:
    """The authors' helper, same effect as entering :func:`bn_frozen`; undo it with
    :func:`enable_running_stats`. (Unlike the authors' momentum = 0, ``num_batches_tracked``
    is not counted either.)

    Example:
        >>> import torch
        >>> from fsam_fused import disable_running_stats, enable_running_stats
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> disable_running_stats(bn); _ = bn(torch.randn(4, 3)); enable_running_stats(bn)
        >>> int(bn.num_batches_tracked)
        0
    """
    for m in _norms(model):
        if not m.__dict__.get("_fsam_disabled", False):  # twice is once, as in the authors'
            m._fsam_disabled = True
            _freeze(m)


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats` (a layer still inside a :func:`bn_frozen` block
    stays frozen until the block ends)."""
    for m in _norms(model):
        if m.__dict__.pop("_fsam_disabled", False):
            _thaw(m)
