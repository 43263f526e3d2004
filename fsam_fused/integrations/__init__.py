"""Optional integrations with training frameworks (each needs its extra; importing this
package imports none of them).

- :mod:`fsam_fused.integrations.accelerate`: FSAM's step methods on the optimizer that
  ``accelerator.prepare`` returns (``pip install -e ".[hf]"``).
- :mod:`fsam_fused.integrations.huggingface`: ``FSAMTrainer``, a Hugging Face ``Trainer``
  that runs both F-SAM passes per optimizer step (``pip install -e ".[hf]"``).
- :mod:`fsam_fused.integrations.lightning`: how ``FSAM.step(closure)`` recognises Lightning's
  automatic optimization (nothing of Lightning is imported).

The recipes, with what each is tested against: ``docs/integrations.md``.
"""

from __future__ import annotations

import sys


def unwrap(opt):
    """The FSAM inside ``opt``: ``opt`` itself, or the optimizer a framework's wrapper holds
    as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), a few levels deep. TypeError if there is none.

    Example:
        >>> import torch
        >>> from fsam_fused import FSAM
        >>> from fsam_fused.integrations import unwrap
        >>> opt = FSAM(torch.nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1)
        >>> unwrap(opt) is opt
        True
    """
    from ..reports import own

    return own(opt)


def _on_fsam_created() -> None:
    """Called by ``FSAM.__init__``: if accelerate is already imported, give its optimizer
    wrapper FSAM's step methods (a dictionary look-up otherwise: accelerate is never imported
    from here)."""
    if "accelerate.optimizer" in sys.modules:
        from .accelerate import install

        install()
