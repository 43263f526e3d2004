"""transformers imports the ``kernels`` package (Hugging Face's, one of its dependencies);
this repository's source tree has a top-level ``kernels/`` folder (installed as
``fsam_fused.kernels``). Run from a clone's root (``python -m pytest``, a script there),
``import kernels`` finds that folder first and ``import transformers.trainer`` fails
(``cannot import name 'CUDAProperties' from 'kernels'``). :func:`unshadow` imports the
installed ``kernels`` from the rest of ``sys.path`` before transformers asks for it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _our_kernels_dir() -> str | None:
    spec = importlib.util.find_spec("fsam_fused.kernels")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(os.path.realpath(spec.origin))


def unshadow() -> None:
    """If ``import kernels`` would find fsam-fused's own kernel sources, import the installed
    ``kernels`` package instead (from ``sys.path`` without the folder that shadows it); a
    no-op when nothing is shadowed or no other ``kernels`` is installed."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    ours = _our_kernels_dir()
    if spec is None or spec.origin is None or ours is None:
        return
    if os.path.dirname(os.path.realpath(spec.origin)) != ours:
        return
    root = os.path.dirname(ours)
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    real = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if real is None:
        return
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
