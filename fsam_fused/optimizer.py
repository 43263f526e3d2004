"""The drop-in F-SAM optimizer: validation, grouping into buckets, dispatch to a backend.

Data flows optimizer -> buckets (one per device and dtype) -> backend -> kernels.

Dispatch (``backend=``):

* ``"reference"``: the plain per-parameter loop of ``reference.py``, on any device;
* ``"foreach"``: the same math with ``torch._foreach_*`` ops, on any device;
* ``"triton"``: the fused kernels; CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``,
  which tests use); float32, bfloat16 and float16 weights;
* ``"cpp"``: the fused C++ passes of ``csrc/`` (built on first use, see ``cpp_backend.py``);
  CPU tensors; float32, bfloat16 and float16 weights;
* ``"auto"``: per bucket, ``"triton"`` for CUDA tensors of a dtype it supports when Triton is
  installed, ``"cpp"`` for CPU tensors it supports when the extension builds (else a one-time
  warning), otherwise ``"foreach"``.

Decisions where SEMANTICS.md is silent:

* sigma, lmbda and the EMA order are optimizer-wide attributes (``opt.sigma`` etc., as in the
  authors' code); rho and adaptive live in each param group, so schedulers may change them.
  All are re-validated at every ``first_step`` before anything is modified.
* ``.grad`` is left as the user's gradient (the published code overwrote it with ``d``).
* ``state_dict()`` between ``first_step`` and ``second_step`` is refused: the weights are
  perturbed then, and a checkpoint of them would resume from the wrong point.
* ``load_state_dict`` updates the existing param-group dicts in place, so the base optimizer,
  LR schedulers and any other holder of a group keep seeing the same objects.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim import Optimizer

from .reference import Bucket, ForeachBackend, ReferenceBackend

BACKENDS = ("auto", "reference", "foreach", "triton", "cpp")
EMA_ORDERS = ("official", "paper")
_STATE_VERSION = 1


def _check_number(name, value, lo, hi=math.inf, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < lo or value > hi or (hi_open and value >= hi):
        bound = f"[{lo}, {hi})" if hi_open else f">= {lo}"
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and {bound})")
    return value


def _same_dense_layout(p, g):
    """Both tensors cover their storage densely, in the same element order (the kernels
    walk the storage of a parameter and its buffers linearly)."""
    if p.is_contiguous() and g.is_contiguous():
        return True
    cl = torch.channels_last
    return p.dim() == 4 and p.is_contiguous(memory_format=cl) and g.is_contiguous(memory_format=cl)


def _reject(gi, pi, p, g):
    """Raise the error that explains why gradient ``g`` of parameter ``p`` cannot be used."""
    where = f"(param group {gi}, parameter {pi}, shape {tuple(p.shape)})"
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"FSAM does not support sparse gradients {where}")
    if p.is_complex() or g.is_complex():
        raise RuntimeError(f"FSAM does not support complex parameters {where}; "
                           "use torch.view_as_real")
    if not p.is_floating_point():
        raise RuntimeError(f"FSAM needs floating-point parameters {where}")
    raise RuntimeError(f"gradient shape/device {tuple(g.shape)}/{g.device} does not match the "
                       f"parameter {where}")


def _check_group(group, where):
    _check_number(f"rho{where}", group["rho"], 0.0)
    if not isinstance(group["adaptive"], bool):
        raise TypeError(f"adaptive{where} must be a bool, got {group['adaptive']!r}")


class _Plan:
    """What ``first_step`` reuses while only the gradients change (see ``_step_plan``)."""

    __slots__ = ("sig", "flat", "have", "wptrs", "buckets", "new_emas")

    def __init__(self, sig, flat, have, wptrs, buckets):
        self.sig, self.flat, self.have, self.wptrs, self.buckets = sig, flat, have, wptrs, buckets
        self.new_emas = {}


class FSAM(Optimizer):
    r"""Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024), fused.

    Drop-in for the authors' ``FriendlySAM``: same constructor and methods. Each step keeps an
    EMA ``m`` of the gradients, perturbs the weights along ``d = g - sigma * m`` scaled to
    radius ``rho`` by one global L2 norm, lets the caller take the gradient there, restores
    the weights bit for bit and steps the base optimizer.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim`` optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` class (e.g. ``torch.optim.SGD``); it is
            built on the same param groups, so LR schedulers on either object act on both.
        rho: perturbation radius (>= 0; per group).
        sigma: weight of the EMA removed from the direction (>= 0; 0 gives plain SAM).
        lmbda: EMA decay, in [0, 1).
        adaptive: scale the perturbation by ``|w|`` (ASAM-style; per group).
        ema_order: ``"official"`` (the authors' code, default) or ``"paper"`` (Algorithm 1).
        backend: ``"auto"``, ``"reference"``, ``"foreach"``, ``"triton"`` (CUDA) or ``"cpp"``
            (CPU); ``"auto"`` picks the fused one for each device and dtype.
        ema_dtype: dtype of the EMA state; by default float32 (float64 for float64 weights).
        fixed_addresses: keep every parameter at its address during the step. By default the
            C++ backend double-buffers parameters that own their whole storage: it writes
            ``w + e`` into a spare buffer and swaps storages (``p.data``, as the authors'
            code does on restore), which moves a third fewer bytes than saving a copy and
            copying it back. Set True when something holds a parameter's address (a flat
            buffer the parameters view, hooks keyed on ``data_ptr``). The other backends
            always keep addresses fixed.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``.grad`` keeps the user's gradient (the published code overwrote it with ``d``), so
    gradients must be zeroed between steps as usual; ``step(closure)`` does it.

    Example:
        >>> import torch
        >>> from fsam_fused import FSAM
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
        >>> loss_fn().backward()          # first forward/backward at w
        >>> opt.first_step(zero_grad=True)
        >>> loss_fn().backward()          # second forward/backward at w + e
        >>> opt.second_step(zero_grad=True)
        >>> def closure():                # or both in one call
        ...     loss = loss_fn()
        ...     loss.backward()
        ...     return loss
        >>> loss_fn().backward()
        >>> loss = opt.step(closure)
        >>> opt.zero_grad()
    """

    def __init__(self, params, base_optimizer, rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False,
                 *, ema_order="official", backend="auto", ema_dtype=None, fixed_addresses=False,
                 **base_kwargs):
        if not callable(base_optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class such as "
                            f"torch.optim.SGD, got {base_optimizer!r}")
        if isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be the optimizer class (e.g. torch.optim.SGD), "
                            "not an instance: FSAM builds it on its own param groups")
        _check_group({"rho": rho, "adaptive": adaptive}, "")
        self.sigma = _check_number("sigma", sigma, 0.0)
        self.lmbda = _check_number("lmbda", lmbda, 0.0, 1.0, hi_open=True)
        if ema_order not in EMA_ORDERS:
            raise ValueError(f"Invalid ema_order: {ema_order!r} (one of {EMA_ORDERS})")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {BACKENDS})")
        if ema_dtype is not None and ema_dtype not in (torch.float32, torch.bfloat16,
                                                        torch.float16, torch.float64):
            raise ValueError(f"Invalid ema_dtype: {ema_dtype!r} (None for float32, or "
                             "torch.float32, torch.bfloat16, torch.float16, torch.float64)")
        if not isinstance(fixed_addresses, bool):
            raise TypeError(f"fixed_addresses must be a bool, got {fixed_addresses!r}")
        self.ema_order = ema_order
        self.backend = backend
        self.fixed_addresses = fixed_addresses
        self.ema_dtype = ema_dtype
        super().__init__(params, dict(rho=float(rho), adaptive=adaptive, **base_kwargs))
        base = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(base, Optimizer):
            raise TypeError(f"base_optimizer(...) must return a torch.optim.Optimizer, "
                            f"got {type(base).__name__}")
        self.base_optimizer = base
        # One list of group dicts for both: schedulers and add_param_group act on both.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._saved = {}  # param -> buffer with the exact copy of the weights
        self._perturbed = None  # buckets perturbed by first_step, until second_step
        self._backends = {}
        self._plan = None  # see _step_plan

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group):
        """Add a group to both this optimizer and the base optimizer (shared dict)."""
        if "rho" in param_group or "adaptive" in param_group:
            _check_group({"rho": param_group.get("rho", 0.0),
                          "adaptive": param_group.get("adaptive", False)}, " in param group")
        if getattr(self, "base_optimizer", None) is None:
            super().add_param_group(param_group)  # during __init__: base is built after
            return
        self._plan = None
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_saved", {})
        self.__dict__.setdefault("_perturbed", None)
        self.__dict__.setdefault("_backends", {})
        self.__dict__.setdefault("fixed_addresses", False)
        self.__dict__["_plan"] = None

    def state_dict(self):
        """State to resume bit-exactly: the EMA (its presence is the "seen" flag), the param
        groups, sigma/lmbda/order and the base optimizer's own state (momentum etc.)."""
        if self._perturbed is not None:
            raise RuntimeError("state_dict() called between first_step() and second_step(): "
                               "the weights are perturbed; checkpoint after second_step()")
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["fsam"] = {"version": _STATE_VERSION, "sigma": self.sigma, "lmbda": self.lmbda,
                      "ema_order": self.ema_order}
        return sd

    def load_state_dict(self, state_dict):
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() called between first_step() and "
                               "second_step(): call second_step() first")
        for key in ("state", "param_groups", "base_optimizer", "fsam"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry: not an FSAM state_dict")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        id_map = {}
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"param group {i} has {len(g['params'])} parameters, the "
                                 f"state_dict's has {len(sg['params'])}")
            id_map.update(zip(sg["params"], g["params"]))
        fs = state_dict["fsam"]
        sigma = _check_number("sigma", fs["sigma"], 0.0)
        lmbda = _check_number("lmbda", fs["lmbda"], 0.0, 1.0, hi_open=True)
        if fs["ema_order"] not in EMA_ORDERS:
            raise ValueError(f"Invalid ema_order in state_dict: {fs['ema_order']!r}")
        state = defaultdict(dict)
        for pid, s in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state_dict has state for parameter index {pid}, which no "
                                 "param group holds")
            p = id_map[pid]
            # The EMA keeps its own dtype (torch's default load would cast it to the
            # parameter's dtype, losing float32 state for 16-bit weights).
            state[p] = {k: (v.to(device=p.device, copy=True) if torch.is_tensor(v) else v)
                        for k, v in s.items()}
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        # Update the group dicts in place so every holder keeps the same objects.
        for g, sg in zip(self.param_groups, saved_groups):
            params = g["params"]
            g.clear()
            g.update({k: v for k, v in sg.items() if k != "params"})
            g["params"] = params
        self.base_optimizer.param_groups = self.param_groups
        self.state = state
        self._plan = None
        self.sigma, self.lmbda, self.ema_order = sigma, lmbda, fs["ema_order"]

    # ------------------------------------------------------------------ dispatch

    def _ema_dtype(self, dtype):
        return self.ema_dtype or torch.promote_types(dtype, torch.float32)

    def _backend_for(self, b):
        from . import cpp_backend, triton_backend

        name = self.backend
        dense = None
        if name in ("auto", "triton", "cpp"):
            dense = all(map(_same_dense_layout, b.params, b.grads))
        if name == "auto":
            name = "foreach"
            if b.device.type == "cuda":
                if dense and triton_backend.supports(b.device, b.dtype,
                                                     self._ema_dtype(b.dtype)) is None:
                    name = "triton"
            elif dense and cpp_backend.supports(b.device, b.dtype,
                                                self._ema_dtype(b.dtype)) is None:
                reason = cpp_backend.load()  # builds on first use, cached on disk
                if reason is None:
                    name = "cpp"
                else:
                    cpp_backend.fallback_warning(reason)
        elif name in ("triton", "cpp"):
            mod = triton_backend if name == "triton" else cpp_backend
            reason = mod.supports(b.device, b.dtype, self._ema_dtype(b.dtype))
            if reason is None and not dense:
                reason = (f"the {name} kernels need each parameter dense (contiguous or "
                          "channels_last) with a gradient of the same strides")
            if reason is None and name == "cpp":
                reason = cpp_backend.load()
            if reason is not None:
                raise ValueError(f"backend={name!r} cannot run these parameters: {reason}; "
                                 "use backend='auto', 'foreach' or 'reference'")
        if name not in self._backends:
            self._backends[name] = {"reference": ReferenceBackend, "foreach": ForeachBackend,
                                    "triton": triton_backend.TritonBackend,
                                    "cpp": cpp_backend.CppBackend}[name]()
        return self._backends[name]

    def _check_hyperparameters(self):
        self.sigma = _check_number("sigma", self.sigma, 0.0)
        self.lmbda = _check_number("lmbda", self.lmbda, 0.0, 1.0, hi_open=True)
        if self.ema_order not in EMA_ORDERS:
            raise ValueError(f"Invalid ema_order: {self.ema_order!r} (one of {EMA_ORDERS})")
        for i, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {i}")

    def _step_plan(self):
        """The buckets for this step, with this step's gradients, validated.

        A plan (buckets, buffers, per-tensor settings) is kept while the param groups, the
        hyper-parameters, the state, the set of parameters with a gradient and every
        parameter's address stay the same; then a step only collects the gradients and
        checks each one's layout. Anything else rebuilds the plan with the full checks.
        Nothing is modified before every check has passed.
        """
        groups = self.param_groups
        sig = (self.sigma, self.lmbda, self.ema_order, self.backend, self.ema_dtype,
               self.fixed_addresses,
               id(self.state), len(self.state),
               tuple((id(g["params"]), len(g["params"]), g["rho"], g["adaptive"])
                     for g in groups))
        plan = self._plan
        if plan is not None and plan.sig == sig:
            flat = plan.flat
            grads = [p.grad for p in flat]
            have = [i for i, g in enumerate(grads) if g is not None]
            if have == plan.have and [flat[i].data_ptr() for i in have] == plan.wptrs \
                    and self._refresh(plan, grads):
                return plan
        flat = [p for g in groups for p in g["params"]]
        self._plan = None
        plan = self._build_plan(sig, flat)
        self._plan = plan
        return plan

    @staticmethod
    def _refresh(plan, grads):
        """Hand each bucket this step's gradients; False if one needs the full checks."""
        strided = torch.strided
        for be, b in plan.buckets:
            b.grads = [grads[i] for i in b.index]
            b.scratch = {}
            if not all(g.layout is strided for g in b.grads):
                return False
            if be.name in ("triton", "cpp") and \
                    not all(map(_same_dense_layout, b.params, b.grads)):
                return False
        return True

    def _build_plan(self, sig, flat):
        """Validate every gradient, group the parameters that have one into buckets and
        attach their buffers (the EMA created here enters ``self.state`` only once the step
        has succeeded)."""
        strided = torch.strided
        buckets = {}
        have = []
        pos = 0
        for gi, group in enumerate(self.param_groups):
            rho, adaptive = float(group["rho"]), bool(group["adaptive"])
            for pi, p in enumerate(group["params"]):
                g = p.grad
                pos += 1
                if g is None:
                    continue
                dtype = p.dtype
                if g.layout is not strided or not dtype.is_floating_point or \
                        g.shape != p.shape or g.device != p.device:
                    _reject(gi, pi, p, g)
                b = buckets.get((p.device, dtype))
                if b is None:
                    b = buckets[(p.device, dtype)] = Bucket(
                        device=p.device, dtype=dtype, sigma=self.sigma, lmbda=self.lmbda,
                        paper=self.ema_order == "paper", emas=[] if self.sigma > 0 else None,
                        fixed_addresses=self.fixed_addresses)
                have.append(pos - 1)
                b.index.append(pos - 1)
                b.params.append(p)
                b.grads.append(g)
                b.rhos.append(rho)
                b.adaptive.append(adaptive)
        plan = _Plan(sig, flat, have, [flat[i].data_ptr() for i in have],
                     [(self._backend_for(b), b) for b in buckets.values()])
        plan.new_emas = self._allocate(plan.buckets)
        return plan

    def _allocate(self, buckets):
        """Attach the saved-copy and EMA buffers to each bucket."""
        new_emas = {}
        saved, state = self._saved, self.state
        for _, b in buckets:
            for p in b.params:
                s = saved.get(p)
                if s is None or s.dtype != p.dtype or s.device != p.device or \
                        s.shape != p.shape or s.stride() != p.stride():
                    # empty_like keeps the parameter's strides: the kernels walk all the
                    # buffers of one parameter in the same storage order.
                    s = saved[p] = torch.empty_like(p)
                b.saved.append(s)
                if b.emas is None:
                    b.first.append(False)
                    continue
                m = state[p].get("ema") if p in state else None
                b.first.append(m is None)
                if m is None:
                    # Zeros: the paper order starts from m = 0, and the kernels' official
                    # first step reads m with weight 0 (0 * garbage could be NaN).
                    m = new_emas[p] = torch.zeros_like(p, dtype=self._ema_dtype(p.dtype))
                elif m.stride() != p.stride():
                    # The parameter changed memory format (or a checkpoint came from another
                    # layout): same values, the parameter's element order.
                    m = state[p]["ema"] = torch.empty_like(p, dtype=m.dtype).copy_(m)
                b.emas.append(m)
        return new_emas

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Perturb the weights to ``w + e`` (saving ``w``); call after the first backward."""
        if self._perturbed is not None:
            raise RuntimeError("first_step() called twice without second_step(): the weights "
                               "are already perturbed")
        self._check_hyperparameters()
        plan = self._step_plan()
        buckets = plan.buckets
        done = []
        try:
            parts = [be.norm_partials(b) for be, b in buckets]
            sq = self._combine(parts, buckets)
            for (be, b), s in zip(buckets, sq):
                be.perturb(b, s)
                done.append((be, b))
        except BaseException:
            self._plan = None  # re-check everything next time
            for be, b in done:
                be.restore(b)
            raise
        if plan.new_emas:
            # The EMA now exists: the next plan has no first sights (and holds them in state).
            for p, m in plan.new_emas.items():
                self.state[p]["ema"] = m
            self._plan = None
        self._perturbed = buckets
        if zero_grad:
            self.zero_grad()

    @staticmethod
    def _combine(parts, buckets):
        """Per bucket, a tensor on its device whose sum is the squared global norm."""
        if not parts:
            return []
        devices = {b.device for _, b in buckets}
        if len(devices) == 1:
            sq = parts[0] if len(parts) == 1 else torch.cat(parts)
            return [sq] * len(parts)
        # Several devices: move each bucket's sum of squares (not its norm) to every device.
        home = parts[0].device
        sums = torch.stack([p.sum().to(home) for p in parts])
        return [sums.to(b.device) for _, b in buckets]

    def _restore(self):
        buckets, self._perturbed = self._perturbed, None
        for be, b in buckets:
            be.restore(b)

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Restore the saved weights (bit for bit) and step the base optimizer with the
        gradient taken at the perturbed point; call after the second backward."""
        if self._perturbed is None:
            raise RuntimeError("second_step() called before first_step(): there is no "
                               "perturbation to undo")
        self._restore()
        self.base_optimizer.step()
        # A step taken through first/second_step is a step: tell an LR scheduler attached
        # to this object (torch's warning about scheduler.step() before optimizer.step()
        # looks only at optimizer.step, which this path does not call).
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """``first_step(zero_grad=True)``, ``closure()`` under grad mode, ``second_step()``.

        The caller has already run the first forward/backward; ``closure`` runs the second
        and its value is returned. If the closure raises, the weights are restored first.
        """
        if closure is None:
            raise RuntimeError("FSAM.step() needs a closure that runs the second forward and "
                               "backward pass, e.g. opt.step(lambda: loss_fn().backward())")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss


class SAM(FSAM):
    """Sharpness-Aware Minimization (Foret et al.): :class:`FSAM` with sigma = 0 and no EMA
    state. ``adaptive=True`` gives ASAM without the eta offset.

    Example:
        >>> import torch
        >>> from fsam_fused import SAM
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure()
        tensor(...)
        >>> loss = opt.step(closure)
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, *, backend="auto",
                 fixed_addresses=False, **base_kwargs):
        super().__init__(params, base_optimizer, rho=rho, sigma=0.0, lmbda=0.0,
                         adaptive=adaptive, backend=backend, fixed_addresses=fixed_addresses,
                         **base_kwargs)
