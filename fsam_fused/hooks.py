"""torch.optim's step hooks and profiler range, once per F-SAM step, attributed to FSAM.

torch.optim wraps every optimizer class's ``step`` so that the global and per-optimizer pre
and post hooks run around it inside a profiler range ``Optimizer.step#<Class>.step``. An
F-SAM step is ``step(closure)``, or ``first_step`` ... ``second_step``, or ``first_step`` ...
``scaler.step(opt)``; and inside it the base optimizer steps. So ``FSAM.step`` is marked as
already wrapped, and FSAM runs the hooks itself: the pre hooks when the step begins (in
``step`` or ``first_step``), the post hooks when it ends (after the base step), the profiler
range around the whole, and the base optimizer's step without its own wrapper
(:mod:`fsam_fused.base_step`).
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim import optimizer as _torch_optimizer


def begin(opt, args: tuple, kwargs: dict):
    """Open the step's profiler range (only while a profiler runs: it costs a dispatch
    otherwise) and run the pre hooks, global ones first, as torch.optim does. Returns
    ``(range or None, args, kwargs)``: a pre hook may return new ``(args, kwargs)``."""
    rng = None
    if torch._C._autograd._profiler_enabled():
        rng = torch.autograd.profiler.record_function(f"Optimizer.step#{type(opt).__name__}.step")
        rng.__enter__()
    try:
        for hook in chain(
            _torch_optimizer._global_optimizer_pre_hooks.values(),
            opt._optimizer_step_pre_hooks.values(),
        ):
            result = hook(opt, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(
                        f"{hook} must return None or a tuple of (new_args, new_kwargs), but "
                        f"got {result}."
                    )
    except BaseException:
        close(rng)
        raise
    return rng, args, kwargs


def end(opt, rng, args: tuple, kwargs: dict) -> None:
    """After the base step: the post hooks (the optimizer's, then the global ones), then the
    range closes."""
    try:
        opt._optimizer_step_code()  # the profiler's entry point, as torch.optim calls it
        for hook in chain(
            opt._optimizer_step_post_hooks.values(),
            _torch_optimizer._global_optimizer_post_hooks.values(),
        ):
            hook(opt, args, kwargs)
    finally:
        close(rng)


def close(rng) -> None:
    """Close a range without the post hooks (a step that failed or was abandoned)."""
    if rng is not None:
        rng.__exit__(None, None, None)
