"""Fused multi-tensor F-SAM passes in Triton.

One F-SAM step over a *bucket* (all parameters of one device and dtype) is three launches,
whatever the number of tensors:

1. ``_norm_kernel``: recompute the direction ``d`` (EMA read, not written) and write one
   float32 partial sum of ``(a * d)**2`` per program (a grid of one wave, at most 8 per SM).
2. ``_perturb_kernel``: every program first sums *all* partials (of every bucket on the
   device) in the same fixed order, so the global norm needs no extra launch, no atomics and
   no host synchronisation, and every program sees the same bits. It then recomputes ``d``,
   writes the EMA update, the exact saved copy of ``w`` and ``w + e``.
3. ``_restore_kernel``: copies the saved values back into the weights.

The EMA is written in pass 2, not pass 1, because the official order perturbs along
``g - sigma * m_old``: once ``m`` is overwritten, ``m_old`` cannot be recovered exactly (and not
at all when ``lmbda == 0``). Recomputing ``d`` costs one more read of ``g`` and ``m``; storing
``d`` would cost a write and a read of a full-size buffer.

Bytes each pass must move, per parameter (``W`` = bytes of the weight dtype, ``M`` = bytes
of the EMA dtype, 4 for the default float32 EMA):

============  ======================  ===========================================
pass          reads                   writes
============  ======================  ===========================================
norm          g (W), m (M), w (W)*    none (one float per program)
perturb       g (W), m (M), w (W)     m (M), saved (W), w (W)
restore       saved (W)               w (W)
============  ======================  ===========================================

``*`` w only when a parameter group is adaptive; m only when ``sigma > 0``.
For float32 weights with the float32 EMA, non-adaptive: 8 + 24 + 8 = 40 bytes per parameter
per step; bfloat16 weights: 6 + 16 + 4 = 26. ``fsam_fused.traffic.bytes_per_step`` counts this
for the benchmarks (this package imports nothing from the front-end; a test pins the two).

Tensors are reached through device-resident pointer tables: one int64 row per tensor for the
weights, EMA and saved copy (uploaded when the optimizer's plan changes) and a separate
column of gradient addresses (uploaded only when some gradient has moved, which
``zero_grad(set_to_none=True)`` often makes happen). Every table entry is checked to be 16-byte aligned on
the host (addresses are host metadata, so this costs no synchronisation); then the kernels
promise that alignment with ``tl.multiple_of`` and the compiler emits 128-bit loads and stores
on the unmasked path. A bucket with any misaligned tensor uses the same kernels without the
hint.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Elements per inner iteration. At 4 warps that is 8 per thread: two 128-bit vectors of
# float32, one of a 16-bit type, the widest access the hardware has.
BLOCK = 1024
NUM_WARPS = 4
# Register ceiling handed to ptxas. Left to itself (Triton 3.9, sm_80/sm_90) ptxas held the
# fp32 restore at 40 registers and spilled 16 bytes of table pointers around the unrolled
# copy loop; with 64 allowed it uses 44 and nothing spills. 64 registers still let 8 blocks
# of 4 warps (half the SM's warp slots) be resident: plenty for a streaming kernel.
MAXNREG = 64
# Elements per chunk, the unit of work a program takes from the chunk table: large enough
# that the table and per-chunk set-up are noise, small enough to balance programs (+-1 chunk).
CHUNK = 16 * BLOCK
# Programs per SM: the register ceiling above lets 8 blocks of 4 warps be resident at once,
# so this many fill the GPU in a single wave.
PROGRAMS_PER_SM = 8
# Grid for CPU tensors (Triton's interpreter, tests only): a few programs, so that the
# chunk striding is exercised.
CPU_PROGRAMS = 4
# Partials summed per iteration of the norm prologue of pass 2.
RBLOCK = 1024
# Alignment (bytes) that allows 128-bit accesses.
ALIGN = 16

# Tables, one row per tensor: pointers (int64) w, m, saved; gradient pointers (int64);
# values (float32, the caller's device tensor, rewritten in place when a value changes) rho,
# adaptive (0/1), EMA decay, EMA gain. The kernels index their columns by these positions.
# sigma and eps are read from a second float32 device tensor ``[sigma, eps]``.

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _ptr(tab, t, NCOL: tl.constexpr, COL: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(tab + t * NCOL + COL).to(tl.pointer_type(DT))
    if ALIGNED:
        # The hint must sit on the pointer itself: a hint on the integer is lost in the cast.
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _round(x, DT: tl.constexpr):
    """float32 -> DT, rounding to nearest even.

    bfloat16 is rounded in integer ops: compiled code rounds that conversion to nearest even
    but Triton's interpreter (3.9), which the CPU tests run, truncates it. Spelling it out makes
    the tested code and the GPU code one and the same, for a few integer ops per element in a
    memory-bound kernel. NaN stays NaN (quiet, same sign)."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        hi = u >> 16
        bits = tl.where(x != x, hi | 0x40, (u + 0x7FFF + (hi & 1)) >> 16)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _direction(g, m, decay, gain, sigma, HAS_EMA: tl.constexpr, PAPER: tl.constexpr):
    """(d, m_new) for float32 g and m. First sight of a tensor in the official order has
    decay = 0, gain = 1 and m = 0, which gives d = g and m_new = g exactly."""
    if HAS_EMA:
        m_new = decay * m + gain * g
        if PAPER:
            d = g - sigma * m_new
        else:
            d = g - sigma * m
    else:
        m_new = g
        d = g
    return d, m_new


@triton.jit
def _load(p, offs, n, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(p + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(p + offs)
    return x


@triton.jit
def _store(p, offs, x, n, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + offs, x, mask=offs < n)
    else:
        tl.store(p + offs, x)


@triton.jit
def _sq_block(
    g_p,
    m_p,
    w_p,
    offs,
    n,
    decay,
    gain,
    adapt,
    sigma,
    inv,
    HAS_EMA: tl.constexpr,
    PAPER: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    MASKED: tl.constexpr,
    UNSCALE: tl.constexpr,
):
    g = _load(g_p, offs, n, MASKED).to(tl.float32)
    if UNSCALE:
        g = g * inv  # a GradScaler's 1/scale, as its unscale_ would apply it
    m = g
    if HAS_EMA:
        m = _load(m_p, offs, n, MASKED).to(tl.float32)
    d, _ = _direction(g, m, decay, gain, sigma, HAS_EMA, PAPER)
    if ADAPTIVE:
        w = _load(w_p, offs, n, MASKED).to(tl.float32)
        d = tl.where(adapt, tl.abs(w), 1.0) * d
    return d * d


@triton.jit
def _perturb_block(
    g_p,
    m_p,
    w_p,
    s_p,
    offs,
    n,
    decay,
    gain,
    adapt,
    sigma,
    scale,
    ok,
    inv,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_EMA: tl.constexpr,
    PAPER: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    MASKED: tl.constexpr,
    UNSCALE: tl.constexpr,
):
    g = _load(g_p, offs, n, MASKED).to(tl.float32)
    if UNSCALE:
        g = g * inv
    w_raw = _load(w_p, offs, n, MASKED)
    m = g
    if HAS_EMA:
        m_raw = _load(m_p, offs, n, MASKED)
        m = m_raw.to(tl.float32)
    d, m_new = _direction(g, m, decay, gain, sigma, HAS_EMA, PAPER)
    # ``ok``: the global sum of squares is finite. Otherwise select (never multiply by 0:
    # 0 * inf is NaN): the EMA and the weights keep their bits, the saved copy is exact.
    if HAS_EMA:
        _store(m_p, offs, tl.where(ok, _round(m_new, M_DTYPE), m_raw), n, MASKED)
    # The saved copy is the raw stored value, so the restore is bit-exact.
    _store(s_p, offs, w_raw, n, MASKED)
    w = w_raw.to(tl.float32)
    if ADAPTIVE:
        e = (scale * tl.where(adapt, w * w, 1.0)) * d
    else:
        e = scale * d
    _store(w_p, offs, tl.where(ok, _round(w + e, W_DTYPE), w_raw), n, MASKED)


# ----------------------------------------------------------------------------- kernels
# Each kernel runs a fixed grid of programs that stride over the chunk table (chunk c goes to
# program c % grid): a bucket of any size fills the GPU in one balanced wave, and pass 2's
# re-read of the partial sums costs grid**2 floats from L2, whatever the model size.


@triton.jit
def _chunk(
    ptr_tab,
    grad_tab,
    numel_tab,
    chunk_tab,
    scal_tab,
    c,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_EMA: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Everything a pass needs of chunk ``c``: its length, the pointers to its first element
    in w, g, m and saved, and its tensor's scalars. (A pass that ignores some of them costs
    nothing: unused loads are dead code.)"""
    t = tl.load(chunk_tab + 2 * c)
    start = tl.load(chunk_tab + 2 * c + 1).to(tl.int64) * CHUNK
    n = tl.minimum(tl.load(numel_tab + t) - start, CHUNK).to(tl.int32)
    w_p = _ptr(ptr_tab, t, 3, 0, W_DTYPE, ALIGNED) + start
    s_p = _ptr(ptr_tab, t, 3, 2, W_DTYPE, ALIGNED) + start
    g_p = _ptr(grad_tab, t, 1, 0, W_DTYPE, ALIGNED) + start
    m_p = g_p  # never dereferenced without an EMA
    if HAS_EMA:
        m_p = _ptr(ptr_tab, t, 3, 1, M_DTYPE, ALIGNED) + start
    rho = tl.load(scal_tab + 4 * t)
    adapt = tl.load(scal_tab + 4 * t + 1) != 0.0
    decay = tl.load(scal_tab + 4 * t + 2)
    gain = tl.load(scal_tab + 4 * t + 3)
    return n, w_p, g_p, m_p, s_p, rho, adapt, decay, gain


@triton.jit
def _norm_kernel(
    ptr_tab,
    grad_tab,
    numel_tab,
    chunk_tab,
    scal_tab,
    part_ptr,
    n_chunks,
    val_ptr,
    inv_ptr,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_EMA: tl.constexpr,
    PAPER: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    UNSCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    sigma = tl.load(val_ptr)  # values are device data: a new sigma needs no new launch args
    inv = 1.0
    if UNSCALE:
        inv = tl.load(inv_ptr)  # once per program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(pid, n_chunks, tl.num_programs(0)):
        n, w_p, g_p, m_p, _, _, adapt, decay, gain = _chunk(
            ptr_tab,
            grad_tab,
            numel_tab,
            chunk_tab,
            scal_tab,
            c,
            W_DTYPE,
            M_DTYPE,
            HAS_EMA,
            ALIGNED,
            CHUNK,
        )
        n_full = (n // BLOCK) * BLOCK
        for i in range(0, n_full, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += _sq_block(
                g_p,
                m_p,
                w_p,
                offs,
                n,
                decay,
                gain,
                adapt,
                sigma,
                inv,
                HAS_EMA,
                PAPER,
                ADAPTIVE,
                False,
                UNSCALE,
            )
        if n_full < n:
            offs = n_full + tl.arange(0, BLOCK)
            acc += _sq_block(
                g_p,
                m_p,
                w_p,
                offs,
                n,
                decay,
                gain,
                adapt,
                sigma,
                inv,
                HAS_EMA,
                PAPER,
                ADAPTIVE,
                True,
                UNSCALE,
            )
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _perturb_kernel(
    ptr_tab,
    grad_tab,
    numel_tab,
    chunk_tab,
    scal_tab,
    sq_ptr,
    n_sq,
    n_chunks,
    val_ptr,
    inv_ptr,
    found_ptr,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_EMA: tl.constexpr,
    PAPER: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    RBLOCK: tl.constexpr,
    UNSCALE: tl.constexpr,
):
    sigma = tl.load(val_ptr)
    eps = tl.load(val_ptr + 1)
    # Global norm: the same loads and the same reduction tree in every program.
    tot = tl.zeros([RBLOCK], dtype=tl.float32)
    for j in range(0, n_sq, RBLOCK):
        o = j + tl.arange(0, RBLOCK)
        tot += tl.load(sq_ptr + o, mask=o < n_sq, other=0.0)
    total = tl.sum(tot, axis=0)
    norm = tl.sqrt_rn(total)
    # A sum of squares is >= 0 or NaN: finite exactly when below inf (NaN < inf is false).
    ok = total < float("inf")
    if tl.program_id(0) == 0:
        tl.store(found_ptr, tl.where(ok, 0.0, 1.0))
    inv = 1.0
    if UNSCALE:
        inv = tl.load(inv_ptr)

    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        n, w_p, g_p, m_p, s_p, rho, adapt, decay, gain = _chunk(
            ptr_tab,
            grad_tab,
            numel_tab,
            chunk_tab,
            scal_tab,
            c,
            W_DTYPE,
            M_DTYPE,
            HAS_EMA,
            ALIGNED,
            CHUNK,
        )
        scale = tl.div_rn(rho, norm + eps)
        n_full = (n // BLOCK) * BLOCK
        for i in range(0, n_full, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            _perturb_block(
                g_p,
                m_p,
                w_p,
                s_p,
                offs,
                n,
                decay,
                gain,
                adapt,
                sigma,
                scale,
                ok,
                inv,
                W_DTYPE,
                M_DTYPE,
                HAS_EMA,
                PAPER,
                ADAPTIVE,
                False,
                UNSCALE,
            )
        if n_full < n:
            offs = n_full + tl.arange(0, BLOCK)
            _perturb_block(
                g_p,
                m_p,
                w_p,
                s_p,
                offs,
                n,
                decay,
                gain,
                adapt,
                sigma,
                scale,
                ok,
                inv,
                W_DTYPE,
                M_DTYPE,
                HAS_EMA,
                PAPER,
                ADAPTIVE,
                True,
                UNSCALE,
            )


@triton.jit
def _restore_kernel(
    ptr_tab,
    grad_tab,
    numel_tab,
    chunk_tab,
    scal_tab,
    n_chunks,
    W_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        n, w_p, _, _, s_p, _, _, _, _ = _chunk(
            ptr_tab,
            grad_tab,
            numel_tab,
            chunk_tab,
            scal_tab,
            c,
            W_DTYPE,
            W_DTYPE,
            False,
            ALIGNED,
            CHUNK,
        )
        n_full = (n // BLOCK) * BLOCK
        for i in range(0, n_full, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            tl.store(w_p + offs, tl.load(s_p + offs))
        if n_full < n:
            offs = n_full + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(w_p + offs, tl.load(s_p + offs, mask=mask), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    # From pinned memory the copy is asynchronous: no host synchronisation.
    return host.pin_memory().to(device, non_blocking=True)


_MOVED = (
    "fsam_fused: {} is not at the address the pointer tables hold, and a table cannot be "
    "uploaded inside a CUDA graph capture: keep gradients in place "
    "(zero_grad(set_to_none=False)) and run the warm-up steps on the same tensors"
)


def max_programs(device: torch.device) -> int:
    """Grid size for a device: one wave of resident programs."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


class MultiTensorFSAM:
    """Tables and launches for one bucket: tensors of one device and one weight dtype.

    ``set_static`` takes what changes only with the optimizer's plan: the weights, the EMA
    (None when sigma is 0), the saved buffers, the per-tensor adaptive flags, and two float32
    device tensors the caller rewrites in place when a value changes (never re-uploaded
    here): ``rows`` ``[n, 4]`` (rho, adaptive 0/1, EMA decay, EMA gain) and ``values``
    ``[2]`` (sigma, eps). ``set_grads`` takes the gradients each step. Each uploads only what
    changed.
    """

    def __init__(self, device: torch.device, w_dtype: torch.dtype, m_dtype: torch.dtype):
        if w_dtype not in _TL_DTYPES:
            raise TypeError(f"Triton F-SAM kernels support {SUPPORTED_DTYPES}, got {w_dtype}")
        if m_dtype not in _TL_DTYPES:
            raise TypeError(
                f"Triton F-SAM kernels keep the EMA in {SUPPORTED_DTYPES}, got {m_dtype}"
            )
        self.device = torch.device(device)
        self.w_dtype, self.m_dtype = w_dtype, m_dtype
        self.max_programs = max_programs(self.device)
        self.n_chunks = self.n_programs = 0
        self._static_key = None
        self._grad_ptrs = None
        # Until set_grads: a restore needs no gradient (its table is passed but never read
        # in compiled code; the interpreter reads it, so it gets the pointer table instead).
        self.grad_tab, self.grads_aligned = None, True

    def set_static(self, weights, emas, saved, adaptive, rows, values, frozen=False) -> None:
        """``frozen``: a CUDA graph is being captured; a table that would have to be uploaded
        raises instead (the captured copy would read host memory freed after the capture)."""
        for name, t, shape in (("rows", rows, (len(weights), 4)), ("values", values, (2,))):
            if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on {self.device}, got {t.device}")
        has_ema = emas is not None
        ptrs = [
            [w.data_ptr(), m.data_ptr() if has_ema else 0, s.data_ptr()]
            for w, m, s in zip(weights, emas if has_ema else weights, saved)
        ]
        numels = [w.numel() for w in weights]
        # (Not the value tensors' addresses: the launches take them as arguments, no table
        # holds them; a compiled graph may hand the ops a fresh copy of rows every step.)
        key = (ptrs, numels, tuple(adaptive))
        self.scal_tab, self.values = rows, values
        if key == self._static_key:
            return
        if frozen:
            raise RuntimeError(_MOVED.format("a weight, EMA or saved buffer"))
        chunks = []
        for t, n in enumerate(numels):
            chunks.extend((t, c) for c in range(-(-n // CHUNK)))
        self.ptr_tab = _upload(ptrs, torch.int64, self.device)
        self.numel_tab = _upload(numels, torch.int64, self.device)
        self.chunk_tab = _upload(chunks, torch.int32, self.device)
        self.n_chunks = len(chunks)
        self.n_programs = min(self.n_chunks, self.max_programs)
        self.static_aligned = all(p % ALIGN == 0 for row in ptrs for p in row)
        self.has_ema = has_ema
        self.any_adaptive = any(adaptive)
        self._static_key = key

    def set_grads(self, grads, frozen=False) -> None:
        """``frozen`` as for :meth:`set_static`."""
        ptrs = list(map(torch.Tensor.data_ptr, grads))
        if ptrs != self._grad_ptrs:
            if frozen:
                raise RuntimeError(_MOVED.format("a gradient"))
            self.grad_tab = _upload(ptrs, torch.int64, self.device)
            self.grads_aligned = all(p % ALIGN == 0 for p in ptrs)
            self._grad_ptrs = ptrs

    @property
    def aligned(self) -> bool:
        return self.static_aligned and self.grads_aligned

    def _on_device(self):
        # Triton launches on the current CUDA device: make it the bucket's (multi-GPU hosts).
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    @staticmethod
    def _launch_opts():
        # No FMA contraction: the kernels then round like the unfused torch ops they are
        # tested against, on every Triton version (3.10 changes the default).
        return dict(num_warps=NUM_WARPS, maxnreg=MAXNREG, enable_fp_fusion=False)

    def _flags(self):
        return dict(
            W_DTYPE=_TL_DTYPES[self.w_dtype],
            M_DTYPE=_TL_DTYPES[self.m_dtype],
            HAS_EMA=self.has_ema,
            ADAPTIVE=self.any_adaptive,
            ALIGNED=self.aligned,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
        )

    def norm_partials(
        self, out: torch.Tensor, paper: bool, inv_scale: torch.Tensor | None = None
    ) -> None:
        """Write ``self.n_programs`` float32 partial sums of squares into ``out``.
        ``inv_scale``: a 1-element float32 device tensor every gradient is multiplied by
        (a GradScaler's 1/scale), or None (a separate kernel without the multiply)."""
        if self.n_programs == 0:  # only empty tensors: nothing to launch
            return
        with self._on_device():
            _norm_kernel[(self.n_programs,)](
                self.ptr_tab,
                self.grad_tab,
                self.numel_tab,
                self.chunk_tab,
                self.scal_tab,
                out,
                self.n_chunks,
                self.values,
                out if inv_scale is None else inv_scale,
                PAPER=paper,
                UNSCALE=inv_scale is not None,
                **self._launch_opts(),
                **self._flags(),
            )

    def perturb(
        self,
        sq: torch.Tensor,
        paper: bool,
        found: torch.Tensor,
        inv_scale: torch.Tensor | None = None,
    ) -> None:
        """Update the EMA, save the weights and write ``w + e``; ``sq`` holds partial sums of
        squares whose total is the squared global norm. If that total is not finite, the
        weights and the EMA keep their bits (the saved copy is still written). ``found``
        (1-element float32) gets 1.0 then, else 0.0."""
        if self.n_programs == 0:
            found.copy_(~torch.isfinite(sq.sum()))
            return
        with self._on_device():
            _perturb_kernel[(self.n_programs,)](
                self.ptr_tab,
                self.grad_tab,
                self.numel_tab,
                self.chunk_tab,
                self.scal_tab,
                sq,
                sq.numel(),
                self.n_chunks,
                self.values,
                found if inv_scale is None else inv_scale,
                found,
                PAPER=paper,
                RBLOCK=RBLOCK,
                UNSCALE=inv_scale is not None,
                **self._launch_opts(),
                **self._flags(),
            )

    def restore(self) -> None:
        """Copy the saved values back into the weights (the tables of the last step)."""
        if self.n_programs == 0:
            return
        with self._on_device():
            _restore_kernel[(self.n_programs,)](
                self.ptr_tab,
                self.ptr_tab if self.grad_tab is None else self.grad_tab,
                self.numel_tab,
                self.chunk_tab,
                self.scal_tab,
                self.n_chunks,
                W_DTYPE=_TL_DTYPES[self.w_dtype],
                ALIGNED=self.aligned,
                BLOCK=BLOCK,
                CHUNK=CHUNK,
                **self._launch_opts(),
            )
