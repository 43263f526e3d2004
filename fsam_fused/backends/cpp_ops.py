"""Typed Python wrappers of the C++ ops (``csrc/fsam_cpu.cpp``), next to their fake
kernels, as pytorch/extension-cpp lays them out. The ops exist once
:func:`fsam_fused.cpp_build.load` has loaded the extension."""

from __future__ import annotations

import torch

_LIB = "fsam_fused::"


def norm_sq(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    adaptive: list[int],
    decay: list[float],
    gain: list[float],
    sigma: float,
    paper: bool,
    inv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 1-element float32 tensor: the sum of ``(a * d)**2`` over every tensor. ``inv_scale``
    (a 1-element float32 CPU tensor, or None): every gradient is multiplied by it first."""
    return torch.ops.fsam_fused.norm_sq(
        weights, grads, emas, adaptive, decay, gain, sigma, paper, inv_scale
    )


def perturb_(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    saved: list[torch.Tensor],
    sq: torch.Tensor,
    rho: list[float],
    adaptive: list[int],
    decay: list[float],
    gain: list[float],
    swap: list[int],
    sigma: float,
    eps: float,
    paper: bool,
    inv_scale: torch.Tensor | None = None,
    found: torch.Tensor | None = None,
) -> None:
    """EMA update, then per tensor: ``swap`` 0 saves an exact copy and writes ``w + e`` in
    place; 1 writes ``w + e`` into ``saved`` and leaves ``w``. Checks before any write.
    If the sum of ``sq`` is not finite, EMA and weights are left as they are and ``saved``
    gets an exact copy of ``w`` (either kind); ``found`` (1-element float32, optional) gets
    1.0 then, else 0.0. ``inv_scale`` as for :func:`norm_sq`."""
    torch.ops.fsam_fused.perturb_(
        weights,
        grads,
        emas,
        saved,
        sq,
        rho,
        adaptive,
        decay,
        gain,
        swap,
        sigma,
        eps,
        paper,
        inv_scale,
        found,
    )


def restore_(weights: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """``w <- saved``, bit for bit."""
    torch.ops.fsam_fused.restore_(weights, saved)


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
    once per process, by the loader, after the library is loaded."""

    @torch.library.register_fake(_LIB + "norm_sq")
    def _(weights, grads, emas, adaptive, decay, gain, sigma, paper, inv_scale=None):
        _no_meta(
            "norm_sq",
            weights=weights,
            grads=grads,
            emas=emas,
            inv_scale=[] if inv_scale is None else [inv_scale],
        )
        return grads[0].new_empty(1, dtype=torch.float32)

    @torch.library.register_fake(_LIB + "perturb_")
    def _(
        weights,
        grads,
        emas,
        saved,
        sq,
        rho,
        adaptive,
        decay,
        gain,
        swap,
        sigma,
        eps,
        paper,
        inv_scale=None,
        found=None,
    ):
        _no_meta(
            "perturb_",
            weights=weights,
            grads=grads,
            emas=emas,
            saved=saved,
            sq=sq,
            inv_scale=[] if inv_scale is None else [inv_scale],
            found=[] if found is None else [found],
        )
        return None

    @torch.library.register_fake(_LIB + "restore_")
    def _(weights, saved):
        _no_meta("restore_", weights=weights, saved=saved)
        return None
