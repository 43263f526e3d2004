"""The plan of a step: buckets of parameters and their per-tensor settings, built once and
reused while only the gradients change.

A *bucket* holds the parameters of one device and dtype that have a gradient, in param-group
order, with their buffers (from :mod:`fsam_fused.buffers`) and one row of settings per tensor.
Each bucket is one launch per pass, whatever the number of tensors. A plan is kept while the
hyper-parameters, the param groups, the optimizer state, the set of parameters with a gradient
and every such parameter's storage stay the same; then a step only hands each bucket its new
gradients, after checking each one's dtype, shape, device and layout against the plan
(:meth:`Bucket.take_grads`). Anything else rebuilds the plan with the full checks of
:func:`build`, which raise before anything is modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter, is_
from typing import Any

import torch

from . import distributed
from ._warnings import warn_at_caller
from .backends.frozen import frozen_passes
from .hparams import Structure
from .ops import cpp as cpp_ops
from .rows import Rows


@dataclass(eq=False)
class Bucket:
    """Parameters of one device and dtype that have a gradient, and their buffers.

    For DTensor parameters (FSDP2), one bucket per device, dtype and shard layout
    (:func:`fsam_fused.distributed.shard_spec`): ``params`` and ``grads`` are the local
    shards, ``owners`` the DTensor parameters, ``groups`` the process groups the bucket's sum
    of squares is all-reduced over (:mod:`fsam_fused.reduce`)."""

    device: torch.device
    dtype: torch.dtype
    paper: bool
    backend: Any = None  # a backends.base.Backend
    params: list = field(default_factory=list)
    index: list = field(default_factory=list)  # positions in the plan's flat parameter list
    groups_of: list = field(default_factory=list)  # per tensor: its param group's index
    adaptive: list = field(default_factory=list)
    first: list = field(default_factory=list)  # the EMA is created this step
    # [(group index, first, end)]: each param group's tensors are one run of the bucket
    spans: list = field(default_factory=list)
    # Device values (rho, decay, gain per tensor; sigma, eps), rewritten in place when they
    # change: :mod:`fsam_fused.rows`. ``rows``/``scalars`` are its two tensors.
    device_values: Any = None
    rows: Any = None
    scalars: Any = None
    emas: list | None = None  # None when sigma == 0
    saved: list = field(default_factory=list)  # exact copies, or spare buffers
    # EMA backups, taken before this bucket's perturbation when it is not the last bucket to
    # commit (see engine.py); None for the last one.
    backups: list | None = None
    fixed_addresses: bool = True
    sizes: list = field(default_factory=list)  # planned, for take_grads
    strides: list | None = None  # planned (fused backends: the kernels walk dense storage)
    contiguous: bool = False  # every parameter contiguous (fused backends)
    size1: list = field(default_factory=list)  # tensors with a size-1 dimension
    device_check: Any = None
    # Detached aliases of the parameters as planned: a restore through them gives the planned
    # storage its bits back even if the user re-viewed a parameter in between (p.data = p.t()).
    homes: list = field(default_factory=list)
    perturbed_ptrs: list = field(default_factory=list)  # set by the backend's prepare()
    prep: Any = None  # the backend's per-plan data
    # ``ops.cpp.watch(params, perturbed_ptrs)`` (None without the C++ bindings): the restore's
    # test that every parameter still has its perturbed storage, in one C++ loop.
    watch: Any = None
    # torch.distributed: the optimizer's parameters (DTensors) whose local shards ``params``
    # holds; None for plain tensors, whose ``params`` are the optimizer's own.
    owners: list | None = None
    groups: tuple = ()  # process groups to all-reduce the sum of squares over
    reduce_key: Any = None  # buckets with the same key are summed before one all-reduce
    grad_placements: list | None = None
    first_grads: list = field(default_factory=list)  # the gradients seen when planned
    # The passes a compiled or captured step calls (backends/frozen.py); None when the
    # bucket's backend cannot run frozen (foreach, reference).
    frozen: Any = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def take_grads(self, grads) -> list | None:
        """This step's gradients for the bucket's passes if each has its parameter's dtype,
        shape, device and (for the fused backends) strides as planned; None otherwise (the
        caller then rebuilds the plan, whose checks explain what is wrong). Host metadata
        only, one C-level pass per property: this runs every step. Shapes and strides are
        those the plan recorded, which a parameter reshaped in place no longer has."""
        try:
            if self.owners is not None:
                # DTensor gradients: their local shards, if the placements are the planned
                # ones and every parameter still has the local shard it was planned with.
                if list(map(_PLACEMENTS, grads)) != self.grad_placements or not all(
                    map(is_, map(_LOCAL, self.owners), self.params)
                ):
                    return None
                grads = list(map(_LOCAL, grads))
            # A backend that checks the whole list in one call (C++): taken as they are; None
            # when its per-plan data no longer fits (an EMA changed in place): a new plan.
            accepts = getattr(self.backend, "accepts", None)
            if accepts is not None:
                fits = accepts(self, grads)
                if fits:
                    return grads
                if fits is None:
                    return None
            if (
                set(map(_DTYPE, grads)) != self._dtype_set
                or list(map(torch.Tensor.size, grads)) != self.sizes
            ):
                return None
            if self.contiguous:
                # Contiguous as planned: is_contiguous() per gradient (half the cost of their
                # strides), then exact strides only where a size-1 dimension lets them differ.
                if not all(map(torch.Tensor.is_contiguous, grads)):
                    return None
                odd = [i for i in self.size1 if grads[i].stride() != self.strides[i]]
                if odd:
                    grads = self.restrided(grads, [g.stride() for g in grads])
            elif self.strides is not None:
                got = list(map(torch.Tensor.stride, grads))
                if got != self.strides:
                    grads = self.restrided(grads, got)
                    if grads is None:
                        return None
            if self.device_check is not None and not self.device_check(grads):
                return None
        except (AttributeError, RuntimeError, NotImplementedError):
            return None  # a None (no gradient), a sparse gradient's strides...
        return grads

    def restrided(self, grads, got):
        """Gradients whose strides differ from the planned ones only on size-1 dimensions
        (Inductor's 1x1-convolution weight gradients: [64, 1, 64, 64] against [64, 1, 1, 1])
        walk the same memory in the same order: the kernels get them as views with the
        parameter's strides (no copy). None if one is in another layout."""
        out = list(grads)
        for i, (s, want) in enumerate(zip(got, self.strides)):
            if s != want:
                if not same_order(self.sizes[i], s, want):
                    return None
                out[i] = out[i].as_strided(self.sizes[i], want)
        return out

    def freeze(self, fused: bool, checks_devices: bool) -> None:
        """Record what take_grads compares each step's gradients with. ``checks_devices``:
        the backend's own kernels reject a tensor on another device before writing anything
        (the C++ ops), so the per-step check can be left to them."""
        self.sizes = [p.size() for p in self.params]
        self.strides = [p.stride() for p in self.params] if fused else None
        # Same sizes and both contiguous is the same strides except on size-1 dimensions.
        self.contiguous = fused and all(p.is_contiguous() for p in self.params)
        self.size1 = [i for i, p in enumerate(self.params) if 1 in p.shape] if fused else []
        self._dtype_set = {self.dtype}
        dev = self.device
        if checks_devices:
            self.device_check = None
        elif dev.type == "cpu":
            self.device_check = lambda grads: all(map(_IS_CPU, grads))
        elif dev.type == "cuda":
            index = {dev.index if dev.index is not None else torch.cuda.current_device()}
            self.device_check = lambda grads: set(map(torch.Tensor.get_device, grads)) == index
        else:
            self.device_check = lambda grads: set(map(_DEVICE, grads)) == {dev}


_DTYPE = attrgetter("dtype")
_LOCAL = attrgetter("_local_tensor")
_PLACEMENTS = attrgetter("_spec.placements")  # (not the Python property DTensor.placements)
_IS_CPU = attrgetter("is_cpu")
_DEVICE = attrgetter("device")


@dataclass(eq=False)
class Plan:
    key: tuple
    flat: list  # every parameter of every group, in order
    have: list  # positions of those with a gradient
    ptrs: list  # their data_ptr() when planned
    buckets: list  # in group order: the order partial sums are combined in
    commit: list  # the order buckets are perturbed in: the largest last (see engine.py)
    new_emas: dict  # EMAs created by this plan, entered into the state on success
    first_sights: set = field(default_factory=set)  # those of parameters never seen

    every: bool = False  # every parameter has a gradient, and there is one bucket
    # The strides of those with a gradient when planned, and whether each was contiguous: a
    # re-view at the same address (p.data = p.data.t() of a square weight) needs a new plan,
    # as the passes walk memory in the planned layout. Watch (C++) tests it every step; the
    # Python test does not (its per-step cost on the GPU path), see laid_out().
    pstrides: list = field(default_factory=list)
    contiguous: bool = False
    structure: Any = None  # the Structure it was built for
    # With ``every``: ``ops.cpp.watch(flat, ptrs)`` (None without the C++ bindings), the
    # step's test that no parameter moved and its gradients, in one C++ loop.
    watch: Any = None

    def laid_out(self, params) -> bool:
        """``params`` (those with a gradient) still in their planned strides: the frozen
        plan's test (``capturable=True``). Contiguous parameters are asked only whether they
        still are (a C-level bool per parameter, no tuple), which a transpose at the same
        address is not; a reshape that stays contiguous keeps the planned memory order."""
        if self.contiguous:
            return all(map(torch.Tensor.is_contiguous, params))
        return list(map(torch.Tensor.stride, params)) == self.pstrides

    def take_grads(self, grads) -> list | None:
        """Per bucket, this step's gradients (see :meth:`Bucket.take_grads`), or None if any
        bucket's do not match the plan."""
        if self.every:
            g = self.buckets[0].take_grads(grads)
            return None if g is None else [g]
        out = []
        for b in self.buckets:
            g = b.take_grads([grads[i] for i in b.index])
            if g is None:
                return None
            out.append(g)
        return out


def same_order(size, stride, want) -> bool:
    """True if a tensor of ``size`` and ``stride`` addresses the same elements in the same
    order as one of ``size`` and ``want`` at the same offset: equal strides on every
    dimension of size > 1 (a size-1 dimension is never stepped along; an empty tensor
    addresses nothing)."""
    if 0 in size:
        return True
    return all(n == 1 or a == b for n, a, b in zip(size, stride, want))


def dense_format(p: torch.Tensor):
    """The memory format the fused kernels walk ``p`` in (contiguous or channels_last), or
    None if ``p`` is not dense in either."""
    if p.is_contiguous():
        return torch.contiguous_format
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _where(gi, pi, p):
    return f"(param group {gi}, parameter {pi}, shape {tuple(p.shape)}, {p.dtype})"


def check_param(gi, pi, p, g) -> None:
    """Everything a parameter and its gradient must be, for every backend."""
    where = _where(gi, pi, p)
    if p.layout != torch.strided:
        raise RuntimeError(f"FSAM needs dense (strided) parameters {where}")
    if p.is_complex():
        raise RuntimeError(
            f"FSAM does not support complex parameters {where}; use torch.view_as_real"
        )
    if not p.is_floating_point():
        raise RuntimeError(f"FSAM needs floating-point parameters {where}")
    if p.device.type == "meta":
        raise RuntimeError(f"FSAM cannot step meta parameters {where}")
    if torch._debug_has_internal_overlap(p) == 1:
        raise RuntimeError(
            f"parameter {where} has overlapping elements (e.g. made by expand()); "
            "an in-place update of it is ill-defined"
        )
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"FSAM does not support sparse gradients {where}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"gradient dtype {g.dtype} does not match the parameter {where}")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match the parameter {where}")
    if g.device != p.device:
        raise RuntimeError(f"gradient device {g.device} does not match the parameter {where}")


def _span(t: torch.Tensor):
    """[first, last) byte addresses ``t`` touches (its elements may not fill the range)."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def check_no_aliasing(named) -> None:
    """``named``: ``[(description, tensor)]`` of tensors a step writes or reads beside each
    other (parameters, gradients, EMAs): no two may share memory, or one's update would
    change the other (two Parameters on one storage would not be restored; a gradient that
    aliases a weight would change under the perturbation). Gradients may share
    memory with each other (two parameters given one ``.grad`` tensor, as torch allows):
    the passes only read gradients. A description starting with "the gradient" marks one."""
    spans = []
    for what, t in named:
        s = _span(t)
        if s is not None:
            spans.append((str(t.device), s[0], s[1], what, what.startswith("the gradient")))
    spans.sort(key=lambda x: (x[0], x[1]))
    # A sweep by start address, keeping the furthest-reaching span seen so far of each kind:
    # a span overlaps an earlier one exactly when it starts before that one's end.
    device, far_any, far_written = None, None, None
    for dev, start, end, what, is_grad in spans:
        if dev != device:
            device, far_any, far_written = dev, None, None
        other = far_written if is_grad else far_any
        if other is not None and start < other[0]:
            raise RuntimeError(
                f"{other[1]} and {what} share memory; FSAM needs every parameter (and its "
                "EMA) in storage of its own, and no gradient sharing a parameter's memory"
            )
        if far_any is None or end > far_any[0]:
            far_any = (end, what)
        if not is_grad and (far_written is None or end > far_written[0]):
            far_written = (end, what)


def _dense(st: Structure, b: Bucket) -> bool:
    """Whether every parameter of ``b`` is dense with a gradient in its memory order (what
    the fused kernels walk)."""
    dense = all(
        dense_format(p) is not None and g.is_contiguous(memory_format=dense_format(p))
        for p, g in zip(b.params, b.first_grads)
    )
    if not dense and st.backend == "auto" and all(dense_format(p) for p in b.params):
        # A gradient in another layout than its parameter's (not merely other strides on
        # size-1 dimensions) routes the bucket to foreach, said once.
        warn_at_caller(
            f"fsam_fused: a gradient on {b.device} ({b.dtype}) has another memory "
            "layout than its parameter; its bucket runs on the foreach backend"
        )
    return dense


def _spans(groups_of: list) -> list:
    """``[(group, first, end)]`` runs of equal group index (a bucket is in group order)."""
    spans = []
    for i, gi in enumerate(groups_of):
        if spans and spans[-1][0] == gi:
            spans[-1][2] = i + 1
        else:
            spans.append([gi, i, i + 1])
    return [tuple(x) for x in spans]


def _collect(st: Structure, groups):
    """Check every parameter (and gradient) and sort those with a gradient into buckets.
    Returns ``(flat, have, buckets, named)``: every parameter in order, the positions of those
    with a gradient, the buckets (their parameters, group indices and this step's
    gradients), and what must not share memory."""
    flat, have, buckets, seen, named = [], [], {}, {}, []
    for gi, (group, adaptive) in enumerate(zip(groups, st.adaptive)):
        for pi, p in enumerate(group["params"]):
            if id(p) in seen:
                raise RuntimeError(
                    f"parameter {_where(gi, pi, p)} is also {seen[id(p)]}: a "
                    "parameter may appear only once in an FSAM optimizer"
                )
            seen[id(p)] = f"param group {gi}, parameter {pi}"
            flat.append(p)
            g = p.grad
            if g is None:
                # (a DTensor's own data_ptr() is 0: its local shard is what it occupies)
                q = p._local_tensor if distributed.is_dtensor(p) else p
                if q.layout == torch.strided and q.device.type != "meta":
                    named.append((f"parameter {_where(gi, pi, p)}", q))
                continue
            owner, key, pgroups = p, None, ()
            if distributed.is_dtensor(p):
                # FSDP2 / DTensor: the bucket runs on the local shards (see distributed.py).
                where = _where(gi, pi, p)
                distributed.check_grad(p, g, where)
                key, pgroups = distributed.shard_spec(p, where)
                p, g = p._local_tensor, g._local_tensor
            elif distributed.is_dtensor(g):
                raise RuntimeError(
                    f"the gradient of the plain-tensor parameter {_where(gi, pi, p)} is a DTensor"
                )
            check_param(gi, pi, p, g)
            named.append((f"parameter {_where(gi, pi, p)}", p))
            named.append((f"the gradient of parameter {_where(gi, pi, p)}", g))
            b = buckets.get((p.device, p.dtype, key))
            if b is None:
                b = buckets[(p.device, p.dtype, key)] = Bucket(
                    device=p.device,
                    dtype=p.dtype,
                    paper=st.paper,
                    emas=[] if st.has_ema else None,
                    # FSDP2 all-gathers from the local shards' storage: never swap it.
                    fixed_addresses=st.fixed_addresses or key is not None,
                    groups=pgroups,
                    reduce_key=key,
                )
                if key is not None:
                    b.owners, b.grad_placements = [], []
            if b.owners is not None:
                b.owners.append(owner)
                b.grad_placements.append(_PLACEMENTS(owner.grad))
            have.append(len(flat) - 1)
            b.index.append(len(flat) - 1)
            b.params.append(p)
            b.first_grads.append(g)
            b.groups_of.append(gi)
            b.adaptive.append(adaptive)
    return flat, have, list(buckets.values()), named


def _buffers(st: Structure, b: Bucket, buffers, new_emas: dict, first_sights, named) -> None:
    """The bucket's saved copies, EMAs (staging new ones in ``new_emas``, and the owners of
    those seen for the first time in ``first_sights``) and device values."""
    for p, owner in zip(b.params, b.owners or b.params):
        b.saved.append(buffers.saved_for(p))
        if b.emas is None:
            b.first.append(False)
            continue
        m, first, staged = buffers.ema_for(owner, st.ema_dtype_for(p.dtype), p)
        if staged is not None:
            new_emas[owner] = staged
            if first:
                first_sights.add(owner)
        else:  # the user's tensor: it must not share memory with anything either
            named.append((f"the EMA of parameter (shape {tuple(p.shape)})", m))
        b.emas.append(m)
        b.first.append(first)
    b.spans = _spans(b.groups_of)
    dv = b.device_values = Rows(b.device, b.dtype, b.spans, b.first, b.adaptive, st.paper)
    b.rows, b.scalars = dv.rows, dv.scalars


def build(st: Structure, groups, select, buffers) -> Plan:
    """Validate every parameter with a gradient and plan its bucket.

    ``select(device, dtype, ema_dtype, dense)`` returns the backend for a bucket (see
    :func:`fsam_fused.backends.select`); ``buffers`` is the
    :class:`~fsam_fused.buffers.Buffers` that owns the per-parameter tensors. Raises before
    anything the user can see is modified."""
    flat, have, buckets, named = _collect(st, groups)
    for b in buckets:
        b.backend = select(b.device, b.dtype, st.ema_dtype_for(b.dtype), _dense(st, b))
    new_emas, first_sights = {}, set()
    for b in buckets:
        caps = b.backend.caps
        b.freeze(fused=caps.dense_only, checks_devices=caps.checks_devices)
        _buffers(st, b, buffers, new_emas, first_sights, named)
        b.first_grads = []  # (not kept: per-step inputs are the engine's)
    check_no_aliasing(named)
    # The largest bucket commits last: it is the one whose EMA needs no backup.
    commit = sorted(buckets, key=lambda b: b.numel)
    for b in commit[:-1]:
        if b.emas is not None:
            b.backups = [buffers.backup_for(p, m) for p, m in zip(b.params, b.emas)]
    for b in buckets:
        b.homes = [p.detach() for p in b.params]
        b.backend.prepare(b)
        b.frozen = frozen_passes(b)
        b.watch = cpp_ops.watch(b.params, b.perturbed_ptrs)
    ptrs = [flat[i].data_ptr() for i in have]
    every = len(buckets) == 1 and len(have) == len(flat)
    return Plan(
        key=(),
        flat=flat,
        have=have,
        ptrs=ptrs,
        buckets=buckets,
        commit=commit,
        new_emas=new_emas,
        first_sights=first_sights,
        every=every,
        pstrides=[flat[i].stride() for i in have],
        contiguous=all(flat[i].is_contiguous() for i in have),
        watch=cpp_ops.watch(flat, ptrs) if every else None,
    )
