"""Adapter from buckets to the C++ CPU ops (``fsam_fused/ops/cpp.py``: loader, typed
wrappers; the build is ``fsam_fused/ops/cpp_build.py``)."""

from __future__ import annotations

import torch

from ..ops import cpp as cpp_ops
from .base import FUSED_DTYPES, Capabilities, StepInputs, fused_unsupported

# Double-buffer a tensor only from this size on. Swapping storages costs two ``p.data``
# assignments (about 1.5 us together) whatever the size; the copy it saves costs about 0.4 ns
# an element here, so below a few thousand elements the copy is cheaper. Measured: 2,000
# tensors of 1 to 64 elements, all swapped, took 7-13% longer than all copied.
SWAP_MIN_NUMEL = 4096


def owns_storage(p: torch.Tensor) -> bool:
    """True if ``p`` is a plain tensor covering its whole storage from offset 0: swapping its
    storage cannot desynchronise a flat buffer it is a view of."""
    return (
        type(p) in (torch.Tensor, torch.nn.Parameter)
        and p.storage_offset() == 0
        and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    )


class _Static:
    """Per-plan arguments of the ops. The values (``b.rows``, ``b.scalars``: float32 CPU
    tensors, the ops' contract) are the bucket's own, rewritten in place by the engine when a
    value changes: nothing here needs rebuilding for them."""

    __slots__ = ("weights", "emas", "swap", "swapped", "copied", "plain_rows", "bound")

    def __init__(self, b):
        self.emas = b.emas if b.emas is not None else []
        # norm_sq with these rows (adaptive 0) and no EMA is the sum of g**2: the cheap
        # step's first pass (fsam_fused.schedules).
        self.plain_rows = torch.zeros(len(b.params), 4, dtype=torch.float32)
        # Per parameter: double-buffer it, or save an exact copy in place.
        self.swap = [
            int(not b.fixed_addresses and p.numel() >= SWAP_MIN_NUMEL and owns_storage(p))
            for p in b.params
        ]
        # (parameter, its own storage, the spare buffer) for the swapped ones, taken before
        # any perturbation; (parameters, saved copies) for the others.
        # The ops refuse to write tensors that require grad: they get detached aliases (same
        # memory, same version counter), taken once here, while every parameter holds its
        # own storage. A swapped parameter's alias stays on that storage while ``p.data``
        # points at the spare, and is what the next step's perturb_ reads again once the
        # restore has swapped the storage back.
        self.weights = [p.detach() for p in b.params]
        self.swapped = [
            (p, d, s) for p, d, s, w in zip(b.params, self.weights, b.saved, self.swap) if w
        ]
        self.copied = (
            [d for d, w in zip(self.weights, self.swap) if not w],
            [s for s, w in zip(b.saved, self.swap) if not w],
        )
        # The eager path: the ops bound to these lists once (checks and tables per plan, not
        # per call: about 1 us less per tensor and step; see bind()).
        self.bound = cpp_ops.bind(
            self.weights, self.emas, b.saved, self.swap, b.paper, b.rows, b.scalars
        )


class CppBackend:
    """Three op calls per bucket and step, each one parallel pass over the whole list.

    With ``fixed_addresses`` off (the default), a parameter that owns its storage and has at
    least ``SWAP_MIN_NUMEL`` elements is double-buffered: ``perturb_`` writes ``w + e`` into
    its spare buffer, which is swapped in with ``p.data``, and restoring swaps the untouched
    original back: 28 bytes per float32 parameter instead of 40, and bit-exact by
    construction. The others get an exact copy, which ``restore_`` copies back.
    """

    name = "cpp"
    caps = Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=FUSED_DTYPES,
        dense_only=True,
        double_buffer=True,
        checks_devices=True,
        auto=0,
        warn_fallback=True,
        built=True,
    )

    def __init__(self, buffers=None):
        pass

    @staticmethod
    def unsupported(device, dtype, ema_dtype):
        if device.type != "cpu":
            return f"the C++ kernels take CPU tensors, got a {device.type} tensor"
        return fused_unsupported("C++", dtype, ema_dtype)

    @staticmethod
    def available():
        return cpp_ops.load()  # builds on first use, cached on disk

    @staticmethod
    def fallback_warning(reason: str) -> None:
        cpp_ops.fallback_warning(reason)

    def prepare(self, b) -> None:
        st = b.prep = _Static(b)
        b.perturbed_ptrs = [
            s.data_ptr() if w else p.data_ptr() for p, s, w in zip(b.params, b.saved, st.swap)
        ]

    @staticmethod
    def accepts(b, grads) -> bool | None:
        """True if the passes take ``grads`` as they are (C++, one call for the whole list:
        the per-step test that is otherwise a Python pass per property); None if an EMA was
        changed in place since the plan was built (the plan must be rebuilt)."""
        bound = b.prep.bound
        if bound is None or not cpp_ops.eager():
            return False
        return bound.accepts(grads)

    def norm(self, b, inputs: StepInputs):
        st = b.prep
        if st.bound is not None and cpp_ops.eager():
            sq = st.bound.norm_sq(inputs.grads, inputs.inv)
            if sq is not None:
                return sq, None
        return cpp_ops.norm_sq(
            st.weights, inputs.grads, st.emas, b.rows, b.scalars, b.paper, inputs.inv
        ), None

    def perturb(self, b, inputs: StepInputs, sq, carry) -> None:
        st = b.prep
        # One op for both kinds: it checks everything before it writes anything.
        if not (
            st.bound is not None
            and cpp_ops.eager()
            and st.bound.perturb_(inputs.grads, sq, inputs.inv, inputs.found)
        ):
            cpp_ops.perturb_(
                st.weights,
                inputs.grads,
                st.emas,
                b.saved,
                sq,
                b.rows,
                b.scalars,
                st.swap,
                b.paper,
                inputs.inv,
                inputs.found,
            )
        try:
            for p, _, spare in st.swapped:
                p.data = spare
        except BaseException:
            self.restore(b)
            raise

    def norm_and_grad_sq(self, b, inputs: StepInputs):
        st = b.prep
        gsq = torch.empty(1, dtype=torch.float32)  # (the op writes it: no extra read of g)
        part = cpp_ops.norm_sq(
            st.weights, inputs.grads, st.emas, b.rows, b.scalars, b.paper, inputs.inv, gsq
        )
        return part, None, gsq

    def grad_sq(self, b, inputs: StepInputs):
        st = b.prep
        if st.bound is not None and cpp_ops.eager():
            sq = st.bound.grad_sq(inputs.grads, inputs.inv)
            if sq is not None:
                return sq
        return cpp_ops.norm_sq(
            st.weights, inputs.grads, [], st.plain_rows, b.scalars, False, inputs.inv
        )

    def ema(self, b, inputs: StepInputs, sq) -> None:
        # 16 bytes per float32 parameter with grad_sq: g read twice, m read and written.
        if b.emas is None:  # plain SAM: nothing to update, only the found flag
            if inputs.found is not None:
                inputs.found.copy_(~torch.isfinite(sq.sum()))
            return
        st = b.prep
        if st.bound is not None and cpp_ops.eager():
            if st.bound.ema_(inputs.grads, sq, inputs.inv, inputs.found):
                return
        cpp_ops.ema_(st.emas, inputs.grads, b.rows, sq, inputs.inv, inputs.found)

    def restore(self, b) -> None:
        st = b.prep
        for p, own, _ in st.swapped:
            # The home storage goes back; a parameter the user re-viewed in the meantime
            # (p.data = p.data.t()) keeps its view, on its own storage.
            if p.is_same_size(own) and p.stride() == own.stride():
                p.data = own
            else:
                p.data = own.as_strided(p.shape, p.stride())
        if st.copied[0]:
            if st.bound is not None and cpp_ops.eager():
                st.bound.restore_()
            else:
                cpp_ops.restore_(*st.copied)

    def original(self, b, i):
        st = b.prep
        if st.swap[i]:
            return next(own for p, own, _ in st.swapped if p is b.params[i])
        return b.saved[i]

    def double_buffered(self, b) -> tuple:
        return tuple(bool(s) for s in b.prep.swap)

    def aligned(self, b) -> bool | None:
        return None
