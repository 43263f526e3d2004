"""fsam-fused: Friendly Sharpness-Aware Minimization with fused multi-tensor kernels.

>>> import torch
>>> from fsam_fused import FSAM
>>> model = torch.nn.Linear(3, 1)
>>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
"""

from . import integrations as _integrations
from . import optimizer as _optimizer
from .backends import ForeachBackend, ReferenceBackend
from .bn import bn_frozen, disable_running_stats, enable_running_stats
from .engine import BucketSummary
from .hparams import BACKENDS
from .optimizer import FSAM, SAM
from .schedules import Adaptive, Bernoulli, EveryK, Schedule

# accelerate's optimizer wrapper gets FSAM's step methods when an FSAM is made after
# accelerate was imported (fsam_fused.integrations; a dictionary look-up otherwise).
_optimizer.ON_CREATE.append(_integrations._on_fsam_created)

__all__ = [
    "FSAM",
    "SAM",
    "Schedule",
    "EveryK",
    "Bernoulli",
    "Adaptive",
    "BACKENDS",
    "BucketSummary",
    "ReferenceBackend",
    "ForeachBackend",
    "bn_frozen",
    "disable_running_stats",
    "enable_running_stats",
]
__version__ = "0.1.0"
