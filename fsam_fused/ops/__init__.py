"""Compiled ops, below the backends.

``cpp_build``  builds, verifies and caches the C++ extension (``csrc/fsam_cpu.cpp``); it
               imports nothing of this package, so it can run alone
               (``python -m fsam_fused.ops`` builds ahead of time)
``cpp``        loads that build once per process, registers the ops' fake kernels and holds
               their typed wrappers; the ``cpp`` backend (``backends/cpp.py``) calls these
``frozen``     the C++ passes as ``torch.library`` custom ops taking the parameters (compiled
               and captured steps: ``fsam_fused/compiled.py``)
``triton``     the Triton passes as ``torch.library`` custom ops (imported with Triton)

Nothing is imported or built here at import time.
"""
