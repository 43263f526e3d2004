"""Warnings attributed to the user's line: the first frame outside fsam_fused and torch (a
warning from inside ``first_step`` would otherwise point at a line of this package, or at
torch's ``no_grad`` decorator)."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIP = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn_at_caller(message: str, category=RuntimeWarning) -> None:
    level, f = 2, sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_SKIP):
        f, level = f.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
