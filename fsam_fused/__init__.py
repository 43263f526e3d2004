"""fsam-fused: Friendly Sharpness-Aware Minimization with fused multi-tensor kernels.

>>> import torch
>>> from fsam_fused import FSAM
>>> model = torch.nn.Linear(3, 1)
>>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
"""

import os as _os

if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
    # Run from a source tree (PYTHONPATH=.): the Triton code lives in the top-level kernels/
    # folder, which an install maps to fsam_fused.kernels (pyproject's package-dir). Point the
    # subpackage there so both layouts import the same way.
    _tree = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if _os.path.isfile(_os.path.join(_tree, "__init__.py")):
        import importlib.util as _ilu
        import sys as _sys

        if _ilu.find_spec(__name__ + ".kernels") is None:
            _spec = _ilu.spec_from_file_location(__name__ + ".kernels",
                                                 _os.path.join(_tree, "__init__.py"),
                                                 submodule_search_locations=[_tree])
            _mod = _ilu.module_from_spec(_spec)
            _sys.modules[_spec.name] = _mod
            _spec.loader.exec_module(_mod)

from .optimizer import BACKENDS, FSAM, SAM  # noqa: E402
from .reference import ForeachBackend, ReferenceBackend  # noqa: E402

__all__ = ["FSAM", "SAM", "BACKENDS", "ReferenceBackend", "ForeachBackend"]
__version__ = "0.1.0"
