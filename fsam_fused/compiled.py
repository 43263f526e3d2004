"""The frozen step: what ``first_step``/``second_step`` run under ``torch.compile`` (and, with
``capturable=True``, inside a CUDA graph capture).

An eager step builds the plan with every check (:mod:`fsam_fused.plan`: addresses, dtypes,
layouts, aliasing, devices) and creates the EMAs; a later step that finds
``torch.compiler.is_compiling()`` true does not rebuild or re-check it: it *freezes* the
plan the eager steps left and only

1. writes this step's values (each group's ``rho``, ``sigma``, ``lmbda``: floats or 0-dim
   tensors) into the buckets' ``rows``/``scalars`` with tensor ops (traceable: they are part
   of the graph, so a tensor value changed in place is read at every call without a
   recompile);
2. calls the fused passes as opaque custom ops (:mod:`fsam_fused.backends.frozen`) on the
   gradients now in ``.grad``;
3. keeps the session's phase (Python state Dynamo replays after the graph).

What is checked per step in this mode, and what is not, is ``docs/compile.md``'s table; in
short: the phase (a Python guard), that a plan exists and still fits the optimizer's
structure (ema_order, backend, ema_dtype, per-group adaptive, the set of parameters with a
gradient, whether sigma > 0 for a float sigma), Dynamo's guards on every gradient
(dtype, shape, strides, device: a change recompiles) and the C++ ops' own checks (sizes,
strides, devices, dtypes, overlaps, finite values, rho >= 0: they raise before writing).
Not checked: a parameter given new storage (``p.data = ...``) since the plan was built (the
step would perturb the old storage: take an eager step after such a change), a tensor
``sigma`` crossing 0 (structure), and values given as tensors are not validated on the host
(the C++ ops still reject a negative rho or a non-finite value; the Triton ones do not).
No signal is held back and no profiler range or step hook runs (the graph is one call).
"""

from __future__ import annotations

import torch

from ._messages import NO_SCHEDULE
from .hparams import number
from .phase import Phase
from .rows import DECAY, GAIN, RHO, SIGMA

_NEEDS_EAGER = (
    "take at least two eager steps (first_step/second_step without torch.compile) before "
    "compiling or capturing them: they build and check the plan and create the EMAs "
    "(docs/compile.md)"
)


def kept(given, checked):
    """A value as the optimizer keeps it: a tensor as given (read in place), else checked."""
    return given if isinstance(given, torch.Tensor) else checked


def frozen_active(fs) -> bool:
    """True when this step takes the frozen path: under ``torch.compile``, or with
    ``capturable=True`` once the plan is built and still fits (else the eager step rebuilds
    it, which a capture refuses: :func:`_fits`)."""
    if torch.compiler.is_compiling():
        return True
    return fs.__dict__.get("capturable", False) and _fits(fs)


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _fits(fs) -> bool:
    """``capturable=True``, eager or captured: the plan's own per-step checks (host metadata
    only: the plan's key, every parameter's address, each gradient's dtype, shape, device
    and layout), as an eager step makes them. False sends the step to the eager path, which
    rebuilds the plan; inside a capture that would upload and allocate, so it raises."""
    from .buffers import state_version

    session = fs._session
    plan = session.engine.plan
    ok = plan is not None and plan.key is not None and not plan.new_emas
    if ok and session.phase is Phase.IDLE:
        groups = fs.param_groups
        key = (id(fs.state), state_version(), [(id(g["params"]), len(g["params"])) for g in groups])
        grads = [p.grad for p in plan.flat]
        ok = (
            key == plan.key
            and _same_structure(fs, plan.structure)
            and [i for i, g in enumerate(grads) if g is not None] == plan.have
            and [plan.flat[i].data_ptr() for i in plan.have] == plan.ptrs
            and plan.laid_out([plan.flat[i] for i in plan.have])
            and plan.take_grads(grads) is not None
        )
    if not ok and capturing():
        raise RuntimeError(
            "FSAM(capturable=True): inside a CUDA graph capture the plan must be built "
            "already and fit this step (same parameters, addresses, gradients' layouts, "
            f"structure): {_NEEDS_EAGER}"
        )
    return ok


def _same_structure(fs, st) -> bool:
    sigma = fs.sigma
    return (
        fs.ema_order == ("paper" if st.paper else "official")
        and fs.backend == st.backend
        and fs.ema_dtype == st.ema_dtype
        and tuple(g["adaptive"] for g in fs.param_groups) == st.adaptive
        and (isinstance(sigma, torch.Tensor) or (sigma > 0) == st.has_ema)
    )


def base_kwargs(base_optimizer, kwargs: dict, capturable) -> dict:
    """``capturable=True`` is also the base optimizer's when it takes one (Adam, AdamW...)."""
    if capturable is True and "capturable" not in kwargs:
        import inspect

        try:
            takes = "capturable" in inspect.signature(base_optimizer).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            kwargs = {**kwargs, "capturable": True}
    return kwargs


def _plan(fs):
    """The plan to freeze, with the errors that say why there is none."""
    session = fs._session
    engine = session.engine
    plan = engine.plan
    if plan is None or plan.key is None or plan.new_emas:
        raise RuntimeError(f"FSAM: no frozen plan yet: {_NEEDS_EAGER}")
    if not _same_structure(fs, plan.structure):
        raise RuntimeError(
            "FSAM: ema_order, backend, ema_dtype, a group's adaptive or sigma's sign (SAM <-> "
            "F-SAM) changed since the plan was built; a compiled step cannot rebuild it: "
            "take an eager step first (docs/compile.md)"
        )
    for b in plan.buckets:
        if any(b.backend.double_buffered(b)):
            # A swapped parameter's restore is a p.data assignment, which a graph cannot
            # hold; with every weight copied, eager and compiled halves also mix freely.
            raise RuntimeError(
                "FSAM: under torch.compile or CUDA-graph capture the C++ backend needs "
                "fixed_addresses=True (its double buffering swaps p.data)"
            )
        if b.frozen is None:
            raise RuntimeError(
                f"FSAM: the bucket on {b.device} ({b.dtype}) runs on the {b.backend.name} "
                "backend, which cannot run under torch.compile or CUDA-graph capture: only "
                "the fused ones can (backend 'cpp' on CPU, 'triton' on CUDA; dense "
                "float32/bfloat16/float16 parameters)"
            )
    return plan


def _fill(view, v) -> None:
    """``view[:] = v``: a float, or a tensor (one rounding to the rows' dtype, as a Python
    float's: the bits equal an eager step's). No allocation: a capture may run it."""
    if isinstance(v, torch.Tensor):
        # (no detach(): the step runs under no_grad, and AOTAutograd's detach of an input
        # mutated earlier in the graph read its value from before the mutation)
        view.copy_(v)
    else:
        view.fill_(v)


def _checked(fs):
    """``(rhos, sigma, lmbda)``; float values validated as an eager step does, outside
    compilation (a compiled graph holds them as constants or symbols); tensors as they are
    (reading them would synchronise)."""
    rhos = [g["rho"] for g in fs.param_groups]
    sigma, lmbda = fs.sigma, fs.lmbda
    if not torch.compiler.is_compiling():
        rhos = [
            r if isinstance(r, torch.Tensor) else number(f"rho in param group {i}", r, 0.0)
            for i, r in enumerate(rhos)
        ]
        if not isinstance(sigma, torch.Tensor):
            sigma = number("sigma", sigma, 0.0)
        if not isinstance(lmbda, torch.Tensor):
            lmbda = number("lmbda", lmbda, 0.0, 1.0, hi_open=True)
    return rhos, sigma, lmbda


def write_values(plan, fs) -> None:
    """This step's rho, sigma and lmbda into every bucket's device rows (tensor ops: in the
    graph, or in the captured step). A frozen plan has no first sight: every EMA row decays
    (``rows.ema_row``). ``1 - lmbda`` of a tensor lmbda is computed in float64 in the
    frozen passes' scratch (exactly Python's), then rounded once into the rows."""
    rhos, sigma, lmbda = _checked(fs)
    for b in plan.buckets:
        rows, scalars = b.rows, b.scalars
        for gi, lo, hi in b.spans:
            _fill(rows[lo:hi, RHO], rhos[gi])
        _fill(rows[:, DECAY], lmbda)
        if isinstance(lmbda, torch.Tensor):
            # (a tensor operand, not the number 1: a Python number is wrapped into a new
            # tensor at every call, an allocation)
            gain = torch.sub(b.frozen.one, lmbda, out=b.frozen.scratch)
        else:
            gain = 1.0 - lmbda
        _fill(rows[:, GAIN], gain)
        _fill(scalars[SIGMA : SIGMA + 1], sigma)


def first_step(fs, zero_grad: bool, scaler=None) -> bool:
    """The frozen ``first_step`` (see the module docstring). ``scaler``: a GradScaler, with
    ``capturable=True`` outside compilation (its 1/scale enters the passes as a device
    tensor; finish with ``scaler.step(opt)`` as in eager steps)."""
    from . import amp

    session = fs._session
    if session.phase is not Phase.IDLE:
        raise RuntimeError(
            "first_step() called twice without second_step(): the weights are already perturbed"
        )
    if session.schedule is not None:
        raise RuntimeError(NO_SCHEDULE)
    if scaler is not None and torch.compiler.is_compiling():
        raise RuntimeError(NO_SCALER)
    plan = _plan(fs)
    inv, unscaled = (None, False) if scaler is None else amp.begin(scaler, session.key)
    if inv is not None and any(b.device != inv.device for b in plan.buckets):
        raise RuntimeError("FSAM: a frozen step takes a GradScaler on the parameters' device")
    write_values(plan, fs)
    flat = plan.flat
    grads = [[flat[i].grad for i in b.index] for b in plan.buckets]
    parts = [b.frozen.norm(g, inv) for b, g in zip(plan.buckets, grads)]
    sqs = _combine(parts, plan.buckets)
    order = {id(b): i for i, b in enumerate(plan.buckets)}
    for b in plan.commit:
        i = order[id(b)]
        b.frozen.perturb(grads[i], sqs[i], inv, b.frozen.found)
    engine = session.engine
    engine.inflight = list(plan.commit)
    found = plan.buckets[0].frozen.found
    engine.found = found
    session.found = found
    session.phase, session.cheap, session.took = Phase.PERTURBED, False, True
    if scaler is not None:
        if scaler.is_enabled():
            session.scaler = scaler
            session.phase = Phase.SCALED
        amp.after_first_step(scaler, session.key, unscaled)
    if zero_grad:
        _zero_grad(fs)
    return True


def _combine(parts, buckets):
    """Per bucket, partials whose sum is the squared global norm (one device: the partials
    concatenated, as :func:`fsam_fused.reduce.combine` does)."""
    if len(parts) == 1:
        return parts
    if len({b.device for b in buckets}) != 1 or any(b.groups for b in buckets):
        raise RuntimeError(
            "FSAM: a compiled or captured step takes the buckets of one device, without "
            "torch.distributed sharding"
        )
    sq = torch.cat(parts)
    return [sq] * len(parts)


def second_step(fs, zero_grad: bool) -> None:
    """The frozen ``second_step``: restore every bucket, then the base optimizer's step
    (its own step function, without torch.optim's wrappers: FSAM's step already runs
    under ``torch.no_grad``)."""

    session = fs._session
    if session.phase is Phase.SCALED:
        raise RuntimeError(
            "second_step() after first_step(grad_scaler=...): finish with scaler.step(opt) "
            "and scaler.update()"
        )
    if session.phase is not Phase.PERTURBED:
        raise RuntimeError(
            "second_step() called before first_step(): there is no perturbation to undo"
            if session.phase is Phase.IDLE
            else f"FSAM: second_step() under torch.compile in phase {session.phase.value!r}"
        )
    if session.cheap:
        raise RuntimeError(
            "FSAM: the step in flight is a schedule's cheap step, taken eagerly: finish it "
            "eagerly (a schedule cannot run under torch.compile)"
        )
    engine = session.engine
    if fs.skip_nonfinite:
        raise RuntimeError(
            "FSAM: skip_nonfinite=True reads a flag on the host each step; it cannot run "
            "under torch.compile or CUDA-graph capture (a fused base optimizer skips on the "
            "device instead)"
        )
    for b in engine.inflight:
        if b.frozen is None:
            raise RuntimeError(
                "FSAM: the step in flight was started eagerly by a backend that cannot run "
                "frozen; finish it eagerly"
            )
        b.frozen.restore()
    engine.inflight = None
    session.phase = Phase.IDLE
    first = engine.found
    if first is not None and getattr(fs.base_optimizer, "_step_supports_amp_scaling", False):
        # Data-parallel ranks act on one flag (as an eager step: distributed.agreed_found).
        from .distributed import agreed_found

        first = agreed_found(first, fs.nonfinite_group, engine.plan)
    base_step(fs.base_optimizer, first)
    fs._opt_called = True
    session.sample.left = None  # (the closure sample: any gradient now is a first pass)
    if zero_grad:
        _zero_grad(fs)


def _raw_step(base):
    """The base optimizer's step function under torch.optim's wrappers (hooks, profiler,
    and ``_use_grad``, which breaks the graph on purpose to keep grad mode)."""
    fn = type(base).step
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def base_step(base, first) -> None:
    """The base step as :func:`fsam_fused.base_step.run` takes it without a GradScaler or
    ``skip_nonfinite``: a base that reads ``found_inf`` (torch's fused SGD/Adam/AdamW) skips
    on the device on a non-finite first pass; any other steps."""
    fn = _raw_step(base)
    if getattr(base, "_step_supports_amp_scaling", False) and first is not None:
        base.grad_scale, base.found_inf = None, first
        try:
            fn(base)
        finally:
            del base.grad_scale, base.found_inf
    else:
        fn(base)
    base._opt_called = True


def _zero_grad(fs) -> None:
    """``zero_grad()`` as torch.optim's (whose own is not traced); with ``capturable=True``
    in place (``set_to_none=False``): the gradients keep their addresses, which the
    Triton gradient table and a captured graph hold."""
    if fs.__dict__.get("capturable", False):
        grads = [p.grad for g in fs.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        fs._session.sample.note_zeroed()
        return
    for g in fs.param_groups:
        for p in g["params"]:
            p.grad = None


NO_SCALER = (
    "FSAM: first_step(grad_scaler=...) is not supported under torch.compile; compile the "
    "forward/backward and call the F-SAM steps eagerly, capture the step with "
    "capturable=True, or train in bfloat16 (docs/compile.md)"
)
