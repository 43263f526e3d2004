"""Triton kernels of fsam-fused, installed as ``fsam_fused.kernels``.

This package imports nothing from the front-end: launchers take plain tensor lists.
``fsam``: the fused multi-tensor F-SAM passes. ``inspect``: compiles every kernel for
sm_80/sm_90 without a GPU and reports its memory access widths, registers and spills.
"""
