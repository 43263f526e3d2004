"""The C++ ops (``csrc/fsam_cpu.cpp``): loaded once per process from the verified build of
:mod:`.cpp_build`, with typed wrappers next to their fake kernels, as pytorch/extension-cpp
lays them out. The ops exist once :func:`load` has returned None.

Values travel as tensors, never as float arguments (a compiled graph must not specialise on
them): ``rows`` is a contiguous float32 CPU tensor of shape ``[n, 4]``, one row per tensor,
``(rho, adaptive 0.0/1.0, EMA decay, EMA gain)``; ``scalars`` is ``[2]``: ``(sigma, eps)``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading

import torch

from . import cpp_build

_LIB = "fsam_fused::"
_lock = threading.Lock()
_status = None  # None: not tried yet; True: loaded; str: why it cannot be
_warned = False  # fallback_warning has been given
# The extension as a Python module: its direct bindings of the ops (see the end of
# csrc/fsam_cpu.cpp) skip the boxed argument conversion of torch.ops, 0.5 us per tensor and
# list. Eager calls use them; under torch.compile the wrappers call torch.ops.fsam_fused.*.
_direct = None


def _import(so: str):
    """Load the verified build as a Python module: dlopen registers the ops
    (TORCH_LIBRARY), and its init function makes the direct bindings."""
    name = os.path.splitext(os.path.basename(so))[0]
    loader = importlib.machinery.ExtensionFileLoader(name, so)
    spec = importlib.util.spec_from_file_location(name, so, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load() -> str | None:
    """Load the verified cached build of the extension, building it first if need be (the
    build says so once on stderr), and register its ops once per process (thread-safe).
    Returns None when ``torch.ops.fsam_fused`` is ready, else the reason it is not (kept:
    later calls return the same)."""
    global _status, _direct
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    _direct = _import(cpp_build.ensure_built())
                    register_fakes()
                    _status = True
                except Exception as e:  # noqa: BLE001 - any failure means "no C++ backend"
                    _status = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    return None if _status is True else _status


def attempted() -> bool:
    """True once this process has tried to load the extension (built or not)."""
    return _status is not None


def fallback_warning(reason: str) -> None:
    """The one warning ``backend="auto"`` gives when it cannot build the C++ backend,
    attributed to the caller's line."""
    global _warned
    if not _warned:
        _warned = True
        from .._warnings import warn_at_caller

        warn_at_caller(
            f"fsam_fused: the C++ CPU backend is unavailable "
            f"({reason.splitlines()[0]}); CPU parameters use backend='foreach' "
            "instead",
            RuntimeWarning,
        )


def norm_sq(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    rows: torch.Tensor,
    scalars: torch.Tensor,
    paper: bool,
    inv_scale: torch.Tensor | None = None,
    grad_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 1-element float32 tensor: the sum of ``(a * d)**2`` over every tensor. ``inv_scale``
    (a 1-element float32 CPU tensor, or None): every gradient is multiplied by it first.
    ``grad_sq`` (a 1-element float32 CPU tensor, or None) also gets ``sum (inv * g)**2`` from
    the same read (a schedule's statistic). ``rows`` and ``scalars`` as in the module
    docstring (rho and eps are not used here)."""
    f = _direct.norm_sq if _eager() else torch.ops.fsam_fused.norm_sq
    return f(weights, grads, emas, rows, scalars, paper, inv_scale, grad_sq)


def perturb_(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    saved: list[torch.Tensor],
    sq: torch.Tensor,
    rows: torch.Tensor,
    scalars: torch.Tensor,
    swap: list[int],
    paper: bool,
    inv_scale: torch.Tensor | None = None,
    found: torch.Tensor | None = None,
) -> None:
    """EMA update, then per tensor: ``swap`` 0 saves an exact copy and writes ``w + e`` in
    place; 1 writes ``w + e`` into ``saved`` and leaves ``w``. Checks before any write.
    If the sum of ``sq`` is not finite, EMA and weights are left as they are and ``saved``
    gets an exact copy of ``w`` (either kind); ``found`` (1-element float32, optional) gets
    1.0 then, else 0.0. ``inv_scale`` as for :func:`norm_sq`."""
    f = _direct.perturb_ if _eager() else torch.ops.fsam_fused.perturb_
    f(weights, grads, emas, saved, sq, rows, scalars, swap, paper, inv_scale, found)


def restore_(weights: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """``w <- saved``, bit for bit."""
    (_direct.restore_ if _eager() else torch.ops.fsam_fused.restore_)(weights, saved)


def ema_(
    emas: list[torch.Tensor],
    grads: list[torch.Tensor],
    rows: torch.Tensor,
    sq: torch.Tensor,
    inv_scale: torch.Tensor | None = None,
    found: torch.Tensor | None = None,
) -> None:
    """The cheap step's pass: ``m <- m * decay + g * gain`` (``rows``' columns 2 and 3), the
    EMA kept bit for bit when the sum of ``sq`` is not finite; ``found`` as for
    :func:`perturb_`. Checks before any write."""
    f = _direct.ema_ if _eager() else torch.ops.fsam_fused.ema_
    f(emas, grads, rows, sq, inv_scale, found)


def bind(weights, emas, saved, swap, paper, rows, scalars):
    """A plan bucket's ops with what the plan fixes checked and built once (``Bound`` in
    ``csrc/fsam_cpu.cpp``: the weights, EMAs and saved copies, their work tables and restore
    spans); None when the direct bindings are not loaded. Its methods ``norm_sq(grads, inv)``,
    ``grad_sq(grads, inv)``, ``perturb_(grads, sq, inv, found)``, ``ema_(grads, sq, inv,
    found)`` and ``restore_()`` check per call what a call may change (the gradients, the
    values, ``sq``, ``inv``, ``found``) and return None/False, doing nothing, for tensors
    that must go through the dispatcher (a subclass, a dispatch mode) or when an EMA was
    changed in place since (``accepts(grads)`` is then None): use the ops then."""
    if _direct is None:
        return None
    return _direct.Bound(weights, emas, saved, swap, paper, rows, scalars)


def watch(params, ptrs):
    """A ``Watch`` (``csrc/fsam_cpu.cpp``) of ``params`` at the addresses ``ptrs``:
    ``unmoved()`` (every ``data_ptr()`` as recorded) and ``grads()`` (every ``.grad``, or
    None if one moved or has none) in one C++ loop each. None when the direct bindings are
    not loaded (this never builds them) or a parameter is not a plain tensor."""
    if _direct is None or any(type(p) not in _PLAIN for p in params):
        return None
    return _direct.Watch(list(params), list(ptrs))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager() -> bool:
    """The direct bindings are loaded and nothing is tracing: a compiled graph must see
    the torch.ops call, which the direct bindings hide from it."""
    return _direct is not None and not torch.compiler.is_compiling()


_eager = eager


def _no_meta(op: str, **lists) -> None:
    """``register_fake`` also makes the fakes the ops' Meta kernels: called on real meta
    tensors (not a FakeTensorMode's fakes) they would silently do nothing, so they raise."""
    from torch._subclasses.fake_tensor import FakeTensor

    for name, ts in lists.items():
        for i, t in enumerate([ts] if isinstance(ts, torch.Tensor) else ts):
            if t.device.type == "meta" and not isinstance(t, FakeTensor):
                raise RuntimeError(
                    f"fsam_fused: {op}: {name}[{i}] is a meta tensor; these kernels take "
                    "CPU tensors (meta tensors have no data to compute on)"
                )


def register_fakes() -> None:
    """Shape-only implementations, so torch.compile and opcheck can trace the ops. Called
    once per process, by :func:`load`, after the library is loaded."""

    @torch.library.register_fake(_LIB + "norm_sq")
    def _(weights, grads, emas, rows, scalars, paper, inv_scale=None, grad_sq=None):
        _no_meta(
            "norm_sq",
            weights=weights,
            grads=grads,
            emas=emas,
            rows=rows,
            scalars=scalars,
            inv_scale=[] if inv_scale is None else [inv_scale],
            grad_sq=[] if grad_sq is None else [grad_sq],
        )
        return grads[0].new_empty(1, dtype=torch.float32)

    @torch.library.register_fake(_LIB + "perturb_")
    def _(weights, grads, emas, saved, sq, rows, scalars, swap, paper, inv_scale=None, found=None):
        _no_meta(
            "perturb_",
            weights=weights,
            grads=grads,
            emas=emas,
            saved=saved,
            sq=sq,
            rows=rows,
            scalars=scalars,
            inv_scale=[] if inv_scale is None else [inv_scale],
            found=[] if found is None else [found],
        )
        return None

    @torch.library.register_fake(_LIB + "ema_")
    def _(emas, grads, rows, sq, inv_scale=None, found=None):
        _no_meta(
            "ema_",
            emas=emas,
            grads=grads,
            rows=rows,
            sq=sq,
            inv_scale=[] if inv_scale is None else [inv_scale],
            found=[] if found is None else [found],
        )
        return None

    @torch.library.register_fake(_LIB + "restore_")
    def _(weights, saved):
        _no_meta("restore_", weights=weights, saved=saved)
        return None
