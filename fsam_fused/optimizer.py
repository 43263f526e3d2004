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

from . import _messages, amp, checkpoint, hparams, schedules
from .backends import build_ahead
from .buffers import State
from .reports import StepReports, own
from .session import StepSession

# Called by every FSAM(...) (and copy): the layers above register here, so this module imports
# none of them (fsam_fused/__init__.py adds the accelerate wrapper's forwarding: integrations).
ON_CREATE: list = []

# Not copied by __getstate__: what the next step rebuilds, and hooks (torch.optim's copies
# drop them too; a lambda hook would make the optimizer unpicklable).
_NOT_COPIED = frozenset(
    ("_session", "_config")
    + tuple(
        f"_optimizer_{kind}_hooks"
        for kind in (
            "step_pre",
            "step_post",
            "state_dict_pre",
            "state_dict_post",
            "load_state_dict_pre",
            "load_state_dict_post",
        )
    )
)


class FSAM(StepReports, Optimizer):
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
        schedule: on which steps to perturb (:mod:`fsam_fused.schedules`: ``EveryK``,
            ``Bernoulli``, ``Adaptive``); None (default) perturbs every step. On other steps
            ``first_step()`` updates the EMA alone and returns False: skip the second pass.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``sigma``, ``lmbda``, ``ema_order``, ``backend``, ``ema_dtype`` and ``fixed_addresses`` are
    attributes, ``rho`` and ``adaptive`` live in each param group: all may be changed between
    steps. A new rho, sigma or lmbda is written into device memory the passes read: no plan is
    rebuilt. ``.grad`` keeps the user's gradient, so zero gradients between steps as usual.
    ``step(closure)`` takes both closure conventions (``fsam_fused.session``): the authors'
    (the caller ran the first backward; the closure runs the second) and torch.optim's (the
    closure runs the step's only forward/backward, after ``zero_grad()``; FSAM calls it
    twice). Under torch.distributed a non-finite first pass skips the step on every rank
    alike (``nonfinite_group``: ``fsam_fused.distributed.agreed_found``). ``perturbed`` says
    whether a step is in flight, ``abandon_step()`` ends one
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
        >>> opt.first_step(zero_grad=True)  # True: perturbed (always, without a schedule)
        True
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
        schedule: schedules.Schedule | None = None,
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
        build_ahead(backend)  # backend="cpp" compiles or loads the C++ ops now
        self.sigma, self.lmbda, self.ema_order = values.sigma, values.lmbda, ema_order
        self.backend, self.ema_dtype, self.fixed_addresses = backend, ema_dtype, fixed_addresses
        self.skip_nonfinite = hparams.check_flag("skip_nonfinite", skip_nonfinite)
        self._schedule = schedules.check_schedule(schedule, self)
        # Which ranks agree on a non-finite first pass: fsam_fused.distributed.agreed_found.
        self.nonfinite_group = None
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
        self._session = StepSession(
            self.param_groups, self.base_optimizer, id(self), self.__dict__.get("_schedule")
        )
        self._config = hparams.ConfigCache()
        for hook in ON_CREATE:
            hook()

    @property
    def schedule(self) -> schedules.Schedule | None:
        """The perturbation schedule (settable between steps)."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule) -> None:
        self._session.refuse_mid_step("changing the schedule")
        new = schedules.check_schedule(schedule, self)
        if self._schedule is not None and self._schedule is not new:
            self._schedule._owner = None  # (free for another optimizer)
        self._schedule = self._session.schedule = new

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
            self._session.sample.note_zeroed()

    def state_dict(self) -> dict[str, Any]:
        """State to resume bit-exactly: the EMA (its presence is the "seen" flag), the param
        groups, sigma/lmbda/order and the base optimizer's own state (momentum etc.). Hooks
        and non-parameter entries as torch.optim's (``docs/semantics.md``)."""
        self._session.refuse_mid_step("state_dict() called")
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, every check first; hooks, older group flags and ``param_names``
        as torch.optim's. A checkpoint of davda54's SAM, of the authors' or
        pytorch_optimizer's FriendlySAM or of pytorch_optimizer's SAM is translated, with a
        :class:`fsam_fused.peers.PeerCheckpointWarning` (``docs/checkpoints.md``); a plain SAM
        checkpoint makes this optimizer plain SAM, with a warning (``docs/semantics.md``)."""
        self._session.refuse_mid_step("load_state_dict() called")
        checkpoint.load(self, state_dict)

    def __getstate__(self):
        """Copies (``copy.deepcopy``, pickle, ``torch.save``) carry the configuration, the
        state and the base optimizer; buffers and plans are rebuilt on the next step, and
        hooks are not copied (as torch.optim's copies drop them)."""
        self._session.refuse_mid_step("copying or pickling FSAM")
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, st):
        super().__setstate__(st)
        if not isinstance(self.state, State):
            self.state = State(self.state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("nonfinite_group", None)
        self.__dict__.setdefault("_schedule", None)
        schedules.check_schedule(self._schedule, self)  # (a copy's schedule is this copy's)
        self._fresh_session()

    # ------------------------------------------------------------------ the step

    def _inputs(self):
        """What a step begins with: the validated settings and the state."""
        return (*self._config(self), self.state)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        """Perturb the weights to ``w + e`` (saving ``w``); call after the first backward.
        Returns True; with a ``schedule``, False on a cheap step (the EMA updated, nothing
        perturbed, ``zero_grad`` not applied: skip the second pass, then ``second_step()``).
        All-or-nothing: if it raises, weights, EMA and base state are as they were.
        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first backward (its
        1/scale is applied inside the passes); finish with ``scaler.step(opt)`` and
        ``scaler.update()`` (``docs/training-loops.md``). A non-finite first gradient leaves
        weights and EMA as they were; see :meth:`found_nonfinite`."""
        fs = own(self)
        return fs._session.first_step(fs, fs._inputs, zero_grad, grad_scaler)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights (bit for bit) and step the base optimizer with the
        gradient taken at the perturbed point; call after the second backward. After
        ``first_step(grad_scaler=scaler)`` use ``scaler.step(opt)`` instead."""
        fs = own(self)
        fs._session.second_step(fs, fs._inputs, zero_grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One F-SAM step with ``closure``, in either convention (``fsam_fused.session``):
        the caller already ran the first forward/backward and the closure runs the second
        (its value is returned); or no gradient was written since the last step, and the
        closure, which runs the step's forward/backward, is called twice (the first value is
        returned). If the second pass raises, the weights are restored. After
        ``first_step()`` it finishes the step (``scaler.step(opt)`` calls it so), running a
        given closure first as the second pass."""
        fs = own(self)
        grad_scale, found_inf = amp.from_scaler_step(self)
        try:
            return fs._session.step(fs, fs._inputs, closure, grad_scale, found_inf)
        except BaseException:
            if found_inf is not None:  # scaler.step deletes them only when step() returns
                amp.forget_scaler_step(self)
            raise


FSAM.step.hooked = True  # torch.optim must not wrap it: FSAM runs its hooks itself (hooks.py)


class SAM(FSAM):
    """Sharpness-Aware Minimization (Foret et al.): :class:`FSAM` with sigma = 0 and no EMA
    state. ``adaptive=True`` gives ASAM without the eta offset; a ``schedule``'s cheap step is
    the base step alone (Composer's SAM ``interval``, SS-SAM, AE-SAM).

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
        schedule: schedules.Schedule | None = None,
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
            schedule=schedule,
            **base_kwargs,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`FSAM.load_state_dict`, but an F-SAM checkpoint (sigma > 0, or an EMA:
        FSAM's, or the authors' or pytorch_optimizer's FriendlySAM's) is refused with a
        ``ValueError`` before anything changes: loading it would silently make this SAM
        F-SAM. The error says how to drop the F-SAM part to continue as plain SAM."""
        self._session.refuse_mid_step("load_state_dict() called")
        checkpoint.load(self, state_dict, plain_sam=True)
