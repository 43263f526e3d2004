"""``FSAM`` and ``SAM``: the torch.optim surface of the optimizer (constructor, param groups,
state_dict, the step methods). A step's control is :class:`fsam_fused.session.StepSession`'s,
its passes :mod:`fsam_fused.engine`'s, the checks :mod:`fsam_fused.hparams`'s and
:mod:`fsam_fused.checkpoint`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import _messages, amp, checkpoint, hooks, hparams
from .buffers import State
from .engine import BucketSummary, Engine
from .integrations import lightning
from .session import StepSession


def _own(opt):
    """The FSAM whose step this is: ``opt`` itself, or the FSAM inside a wrapper that borrows
    its class (Lightning's ``LightningOptimizer`` has FSAM among its bases but not its
    ``__dict__``): the step must run on the optimizer GradScaler and the state know."""
    if "_session" in opt.__dict__:
        return opt
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, FSAM) and "_session" in inner.__dict__:
        return inner
    raise TypeError(f"{type(opt).__name__} is not an initialised FSAM optimizer")


class FSAM(Optimizer):
    r"""Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024), fused.

    Drop-in for the authors' ``FriendlySAM``: same constructor and methods. Each step keeps an
    EMA ``m`` of the gradients, perturbs the weights along ``d = g - sigma * m`` scaled to
    radius ``rho`` by one global L2 norm, lets the caller take the gradient there, restores
    the weights bit for bit and steps the base optimizer. ``docs/semantics.md`` states the
    contract; ``fsam_fused.engine`` the failure policy (``first_step`` is all-or-nothing).

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
            (CPU); ``"auto"`` picks the fused one for each device and dtype
            (``fsam_fused.backends`` documents the rule).
        ema_dtype: dtype of the EMA state; by default float32 (float64 for float64 weights).
        fixed_addresses: keep every parameter at its address during the step. By default the
            C++ backend double-buffers parameters that own their whole storage (swapping
            storages with ``p.data``, as the authors' restore does), which moves a third fewer
            bytes. Set True when something holds a parameter's address.
        skip_nonfinite: skip the base optimizer's step when either pass saw a non-finite
            gradient, for any base optimizer, at the cost of one host synchronisation per
            step. Without it a non-finite first pass never perturbs the weights nor enters
            the EMA (checked on the device), and a fused base (``fused=True`` SGD, Adam,
            AdamW) skips its step on the device; any other base steps on the second gradient.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``sigma``, ``lmbda``, ``ema_order``, ``backend``, ``ema_dtype`` and ``fixed_addresses`` are
    attributes, ``rho`` and ``adaptive`` live in each param group: all may be changed between
    steps. A new rho, sigma or lmbda is written into device memory the passes read: no plan is
    rebuilt. ``.grad`` keeps the user's gradient, so zero gradients between steps as usual.
    ``step(closure)`` takes both closure conventions (``fsam_fused.session``): the authors'
    (the caller ran the first backward; the closure runs the second) and torch.optim's (the
    closure runs the step's only forward/backward, after ``zero_grad()``; FSAM calls it
    twice). ``perturbed`` says whether a step is in flight, ``abandon_step()`` ends one
    without a base step. Mixed precision, accumulation, BatchNorm, Lightning:
    ``docs/training-loops.md``.

    Example:
        >>> import torch
        >>> from fsam_fused import FSAM
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
        >>> loss_fn().backward()          # first forward/backward at w
        >>> opt.first_step(zero_grad=True)
        >>> opt.perturbed
        True
        >>> loss_fn().backward()          # second forward/backward at w + e
        >>> opt.second_step(zero_grad=True)
        >>> def closure():                # torch.optim's convention: both passes in one call
        ...     opt.zero_grad()
        ...     loss = loss_fn()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)      # runs closure, first_step, closure, second_step
        >>> [s.backend for s in opt.plan_summary()] in (["cpp"], ["foreach"])
        True
    """

    # torch.amp.GradScaler.step(opt) hands this optimizer the scale and the second pass's
    # found_inf (opt.grad_scale, opt.found_inf) and calls opt.step(): see fsam_fused.amp.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        *,
        ema_order: str = "official",
        backend: str = "auto",
        ema_dtype: torch.dtype | None = None,
        fixed_addresses: bool = False,
        skip_nonfinite: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, Optimizer):
            if isinstance(base_optimizer, Optimizer):
                raise TypeError(_messages.BASE_INSTANCE)
            if not callable(base_optimizer):
                raise TypeError(_messages.base_not_class(base_optimizer))
        defaults = {"rho": rho, "adaptive": adaptive}
        st, values = hparams.config(
            sigma, lmbda, ema_order, backend, ema_dtype, fixed_addresses, [defaults]
        )
        self.sigma, self.lmbda, self.ema_order = values.sigma, values.lmbda, ema_order
        self.backend, self.ema_dtype, self.fixed_addresses = backend, ema_dtype, fixed_addresses
        self.skip_nonfinite = hparams.check_flag("skip_nonfinite", skip_nonfinite)
        self.base_optimizer = None
        super().__init__(params, dict(rho=float(rho), adaptive=adaptive, **base_kwargs))
        base = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"base_optimizer(...) must return a torch.optim.Optimizer, "
                f"got {type(base).__name__}"
            )
        self.base_optimizer = base
        self.state = State()  # records changes, so a plan sees an EMA set by hand
        # One list of group dicts for both: schedulers and add_param_group act on both.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._fresh_session()

    def _fresh_session(self) -> None:
        self._session = StepSession(self.param_groups, self.base_optimizer, id(self))
        self._config = hparams.ConfigCache()
        self._range = None  # the profiler range of a two-pass step in flight

    @property
    def engine(self) -> Engine:
        """The step engine (introspection and benchmarks: ``opt.engine.passes()``)."""
        return self._session.engine

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to both this optimizer and the base optimizer (one shared dict)."""
        checkpoint.check_new_group(self.param_groups, param_group)
        if self.base_optimizer is None:
            super().add_param_group(param_group)  # during __init__: base is built after
            return
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; zeroed (not freed) gradients are remembered as "no first pass
        yet", so a following ``step(closure)`` runs both passes in the closure."""
        super().zero_grad(set_to_none)
        if not set_to_none:
            self._session.note_zeroed()

    def state_dict(self) -> dict[str, Any]:
        """State to resume bit-exactly: the EMA (its presence is the "seen" flag), the param
        groups, sigma/lmbda/order and the base optimizer's own state (momentum etc.)."""
        self._session.refuse_mid_step("state_dict() called")
        sd = super().state_dict()
        # Plain dicts, so torch.load(weights_only=True) reads them (Slot is an internal type).
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["fsam"] = {
            "version": checkpoint.VERSION,
            "sigma": self.sigma,
            "lmbda": self.lmbda,
            "ema_order": self.ema_order,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict; every check (structure, shapes, dtypes, the base optimizer's
        kind of state) runs before anything changes."""
        self._session.refuse_mid_step("load_state_dict() called")
        checkpoint.load(self, state_dict)

    def __getstate__(self):
        """Copies (``copy.deepcopy``, pickle, ``torch.save``) carry the configuration, the
        state and the base optimizer; buffers and plans are rebuilt on the next step."""
        self._session.refuse_mid_step("copying or pickling FSAM")
        return {k: v for k, v in self.__dict__.items() if k not in ("_session", "_config", "_range")}

    def __setstate__(self, st):
        super().__setstate__(st)
        if not isinstance(self.state, State):
            self.state = State(self.state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self._fresh_session()

    # ------------------------------------------------------------------ introspection

    def plan_summary(self) -> list[BucketSummary]:
        """One :class:`fsam_fused.engine.BucketSummary` per bucket of the last step's plan
        (device, dtype, backend, tensors, elements, double-buffered tensors, bytes per step);
        empty before the first step."""
        return self._session.engine.summary()

    def backend_for(self, param: torch.Tensor) -> str | None:
        """The backend that ran ``param`` in the last step (None if it had no gradient)."""
        return self._session.engine.backend_for(param)

    def found_nonfinite(self) -> torch.Tensor | None:
        """Whether the last step saw a non-finite gradient: a 0-dim float32 device tensor,
        1.0 or 0.0 (more than 1.0 when both passes did, with a GradScaler), None before the
        first step. It covers the first pass always, and the second pass too when a
        GradScaler or ``skip_nonfinite=True`` checked it. Reading its value (``.item()``,
        ``bool()``) synchronises with the device; passing it on does not.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> model(torch.tensor([[float("inf"), 0.0, 0.0]])).sum().backward()
            >>> w = model.weight.detach().clone()
            >>> opt.first_step(zero_grad=True)       # non-finite: the weights are not perturbed
            >>> torch.equal(model.weight, w), opt.found_nonfinite().item()
            (True, 1.0)
        """
        return self._session.found

    @property
    def perturbed(self) -> bool:
        """True between ``first_step()`` and the end of the step: the weights are ``w + e``
        (not the model's weights: don't average, evaluate or save them now). Host state only.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> opt.perturbed
            False
        """
        return _own(self)._session.perturbed

    @torch.no_grad()
    def abandon_step(self) -> bool:
        """End a step in flight without a base step: the weights get their saved bits back
        (the EMA keeps the first pass's update, as after any failed second pass). For a loop
        whose second pass failed outside ``step(closure)`` (another rank died, a bad batch).
        Returns False, changing nothing, when no step was in flight.

        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1)
            >>> w = model.weight.detach().clone()
            >>> model(torch.randn(4, 3)).sum().backward()
            >>> opt.first_step(zero_grad=True)
            >>> opt.abandon_step(), torch.equal(model.weight, w), opt.perturbed
            (True, True, False)
        """
        fs = _own(self)
        with fs._session as s:
            done = s.abandon()
            if done:
                rng, fs._range = fs._range, None
                hooks.close(rng)
            return done

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Perturb the weights to ``w + e`` (saving ``w``); call after the first backward.
        All-or-nothing: if it raises, weights, EMA and base state are as they were.
        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first backward (its
        1/scale is applied inside the passes); finish with ``scaler.step(opt)`` and
        ``scaler.update()`` (``docs/training-loops.md``). A non-finite first gradient leaves
        weights and EMA as they were; see :meth:`found_nonfinite`."""
        fs = _own(self)
        with fs._session as s:
            rng, _, _ = hooks.begin(fs, (), {})
            try:
                s.first(*fs._config(fs), fs.state, grad_scaler)
            except BaseException:
                hooks.close(rng)
                raise
            fs._range = rng
            if zero_grad:
                fs.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights (bit for bit) and step the base optimizer with the
        gradient taken at the perturbed point; call after the second backward. After
        ``first_step(grad_scaler=scaler)`` use ``scaler.step(opt)`` instead."""
        fs = _own(self)
        with fs._session:
            fs._finish(None, None)
            if zero_grad:
                fs.zero_grad()

    def _finish(self, grad_scale, found_inf) -> None:
        s = self._session
        try:
            s.finish(grad_scale, found_inf, self.skip_nonfinite)
        except BaseException:
            if not s.perturbed:  # the step ended (restored): so does its profiler range
                rng, self._range = self._range, None
                hooks.close(rng)
            raise
        # A step taken through first/second_step is a step: tell an LR scheduler attached
        # to this object (its warning looks only at optimizer.step, which may not have run).
        self._opt_called = True
        rng, self._range = self._range, None
        hooks.end(self, rng, (), {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One F-SAM step with ``closure``, in either convention (``fsam_fused.session``):
        the caller already ran the first forward/backward and the closure runs the second
        (its value is returned); or no gradient was written since the last step, and the
        closure, which runs the step's forward/backward, is called twice (the first value is
        returned). If the second pass raises, the weights are restored. After
        ``first_step()`` it finishes the step (``scaler.step(opt)`` calls it so), running a
        given closure first as the second pass."""
        fs = _own(self)
        grad_scale, found_inf = amp.from_scaler_step(self)
        with fs._session as s:
            if found_inf is not None:  # scaler.step(opt): it deletes the attributes after
                try:
                    if closure is not None:
                        raise RuntimeError(_messages.SCALER_CLOSURE)
                    if not s.perturbed:
                        raise RuntimeError(_messages.NO_FIRST_STEP)
                    return fs._finish(grad_scale, found_inf)
                except BaseException:
                    amp.forget_scaler_step(self)
                    raise
            if closure is not None and not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            if s.perturbed:
                try:
                    loss = None if closure is None else s.finish_closure(closure)
                except BaseException:
                    rng, fs._range = fs._range, None
                    hooks.close(rng)
                    raise
                fs._finish(None, None)
                return loss
            if closure is None:
                raise RuntimeError(_messages.NO_FIRST_STEP)
            return fs._whole_step(closure)

    def _whole_step(self, closure):
        s = self._session
        rng, args, kwargs = hooks.begin(self, (closure,), {})
        closure = args[0] if args else kwargs.get("closure", closure)
        self._range = rng
        try:
            first_loss = None
            if s.first_pass_ran():  # the authors' convention: the closure runs the second
                lightning.check_first_pass(closure)
            else:  # torch.optim's convention: the closure runs both passes
                with torch.enable_grad():
                    first_loss = closure()
            s.first(*self._config(self), self.state)
            self.zero_grad()
            loss = s.run_closure(closure)
            self._finish(None, None)
        except BaseException:
            if not s.perturbed and self._range is rng:
                self._range = None
                hooks.close(rng)
            raise
        return loss if first_loss is None else first_loss


FSAM.step.hooked = True  # torch.optim must not wrap it: FSAM runs its hooks itself (hooks.py)


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

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        backend: str = "auto",
        fixed_addresses: bool = False,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            sigma=0.0,
            lmbda=0.0,
            adaptive=adaptive,
            backend=backend,
            fixed_addresses=fixed_addresses,
            **base_kwargs,
        )
