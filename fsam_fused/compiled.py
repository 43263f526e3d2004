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

from .rows import DECAY, GAIN, RHO, SIGMA

_NEEDS_EAGER = (
    "take at least two eager steps (first_step/second_step without torch.compile) before "
    "compiling or capturing them: they build and check the plan and create the EMAs "
    "(docs/compile.md)"
)


def frozen_active(fs) -> bool:
    """True when this step must take the frozen path: under ``torch.compile``."""
    return torch.compiler.is_compiling()


def _plan(fs):
    """The plan to freeze, with the errors that say why there is none."""
    session = fs._session
    engine = session.engine
    plan = engine.plan
    if plan is None or plan.key is None or plan.new_emas:
        raise RuntimeError(f"FSAM: no frozen plan yet: {_NEEDS_EAGER}")
    st = plan.structure
    if (
        fs.ema_order != ("paper" if st.paper else "official")
        or fs.backend != st.backend
        or fs.ema_dtype != st.ema_dtype
        or tuple(g["adaptive"] for g in fs.param_groups) != st.adaptive
    ):
        raise RuntimeError(
            "FSAM: ema_order, backend, ema_dtype or a group's adaptive changed since the plan "
            "was built; a compiled or captured step cannot rebuild it: take an eager step "
            "first (docs/compile.md)"
        )
    sigma = fs.sigma
    if not isinstance(sigma, torch.Tensor) and (sigma > 0) != st.has_ema:
        raise RuntimeError(
            "FSAM: sigma changed between 0 and a positive value (SAM <-> F-SAM); a compiled "
            "or captured step cannot rebuild the plan: take an eager step first"
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
    """``view[:] = v``: a float, or a tensor (cast as a Python float would be: through
    float64, so the bits equal an eager step's)."""
    if isinstance(v, torch.Tensor):
        view.copy_(v.detach().to(torch.float64))
    else:
        view.fill_(v)


def write_values(plan, fs) -> None:
    """This step's rho, sigma and lmbda into every bucket's device rows (tensor ops: in the
    graph). A frozen plan has no first sight: every EMA row decays (``rows.ema_row``)."""
    rhos = [g["rho"] for g in fs.param_groups]
    sigma, lmbda = fs.sigma, fs.lmbda
    if isinstance(lmbda, torch.Tensor):
        lmbda = lmbda.detach().to(torch.float64)
    gain = 1.0 - lmbda
    for b in plan.buckets:
        rows, scalars = b.rows, b.scalars
        for gi, lo, hi in b.spans:
            _fill(rows[lo:hi, RHO], rhos[gi])
        _fill(rows[:, DECAY], lmbda)
        _fill(rows[:, GAIN], gain)
        _fill(scalars[SIGMA : SIGMA + 1], sigma)


def first_step(fs, zero_grad: bool) -> None:
    """The frozen ``first_step`` (see the module docstring)."""
    from .session import Phase

    session = fs._session
    if session.phase is not Phase.IDLE:
        raise RuntimeError(
            "first_step() called twice without second_step(): the weights are already perturbed"
        )
    plan = _plan(fs)
    engine = session.engine
    write_values(plan, fs)
    flat = plan.flat
    grads = [[flat[i].grad for i in b.index] for b in plan.buckets]
    found = engine._found_on(plan.buckets[0].device)
    parts = [b.frozen.norm(g, None) for b, g in zip(plan.buckets, grads)]
    sqs = _combine(parts, plan.buckets)
    order = {id(b): i for i, b in enumerate(plan.buckets)}
    for b in plan.commit:
        i = order[id(b)]
        b.frozen.perturb(grads[i], sqs[i], None, engine._found_on(b.device))
    engine.inflight = list(plan.commit)
    engine.found = found
    session.found = found
    session.phase = Phase.PERTURBED
    if zero_grad:
        _zero_grad(fs)


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
    from .session import Phase

    session = fs._session
    if session.phase is not Phase.PERTURBED:
        raise RuntimeError(
            "second_step() called before first_step(): there is no perturbation to undo"
            if session.phase is Phase.IDLE
            else f"FSAM: second_step() under torch.compile in phase {session.phase.value!r}"
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
    base_step(fs.base_optimizer, engine.found)
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
    """``zero_grad(set_to_none=True)`` as torch.optim's (whose own is not traced)."""
    for g in fs.param_groups:
        for p in g["params"]:
            p.grad = None


NO_SCALER = (
    "FSAM: first_step(grad_scaler=...) under torch.compile is not supported yet; compile the "
    "forward/backward and call the F-SAM steps eagerly, or train in bfloat16 (docs/compile.md)"
)
