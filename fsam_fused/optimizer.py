"""``FSAM`` and ``SAM``: the torch.optim surface of the optimizer (constructor, param groups,
state_dict, the step methods); the step itself is :mod:`fsam_fused.engine`'s, the checks
:mod:`fsam_fused.hparams`'s and :mod:`fsam_fused.checkpoint`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import checkpoint, hparams, stepping
from .backends import build_ahead
from .buffers import State
from .engine import BucketSummary, Engine


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
            C++ backend double-buffers parameters that own their whole storage: it writes
            ``w + e`` into a spare buffer and swaps storages (``p.data``, as the authors'
            code does on restore), which moves a third fewer bytes than saving a copy and
            copying it back. Set True when something holds a parameter's address.
        skip_nonfinite: skip the base optimizer's step when either pass saw a non-finite
            gradient, for any base optimizer, at the cost of one host synchronisation per
            step (and one read of the second pass's gradients). Without it a non-finite
            first pass never perturbs the weights nor enters the EMA (checked on the device),
            and a base optimizer that can skip on the device (``fused=True`` SGD, Adam,
            AdamW) skips its step too, with no synchronisation; any other base optimizer then
            steps on the second gradient, taken at the unperturbed weights.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``sigma``, ``lmbda``, ``ema_order``, ``backend``, ``ema_dtype`` and ``fixed_addresses`` are
    attributes, ``rho`` and ``adaptive`` live in each param group: all may be changed between
    steps and are checked again at every ``first_step``. ``.grad`` keeps the user's gradient
    (the published code overwrote it with ``d``), so gradients must be zeroed between steps
    as usual. ``plan_summary()`` and ``backend_for(p)`` report how the last step ran;
    ``found_nonfinite()`` whether it saw a non-finite gradient. Mixed precision (fp16 with
    ``torch.amp.GradScaler``, bf16 autocast), gradient accumulation, BatchNorm and Lightning:
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
        >>> loss_fn().backward()          # second forward/backward at w + e
        >>> opt.second_step(zero_grad=True)
        >>> def closure():                # or both in one call
        ...     loss = loss_fn()
        ...     loss.backward()
        ...     return loss
        >>> loss_fn().backward()
        >>> loss = opt.step(closure)
        >>> opt.zero_grad()
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
                raise TypeError(
                    "base_optimizer must be the optimizer class (e.g. "
                    "torch.optim.SGD), not an instance: FSAM builds it on its own "
                    "param groups"
                )
            if not callable(base_optimizer):
                raise TypeError(
                    "base_optimizer must be a torch.optim.Optimizer class such as "
                    f"torch.optim.SGD, got {base_optimizer!r}"
                )
        defaults = {"rho": rho, "adaptive": adaptive}
        cfg = hparams.config(
            sigma, lmbda, ema_order, backend, ema_dtype, fixed_addresses, [defaults]
        )
        build_ahead(backend)  # backend="cpp" compiles or loads the C++ ops now (issue 18.4)
        self.sigma, self.lmbda, self.ema_order = cfg.sigma, cfg.lmbda, ema_order
        self.backend, self.ema_dtype, self.fixed_addresses = backend, ema_dtype, fixed_addresses
        self.skip_nonfinite = hparams.check_flag("skip_nonfinite", skip_nonfinite)
        # step(closure) refuses the very gradients the previous step left (see step).
        self.check_stale_grads = True
        self._scaler = None  # the enabled GradScaler the step in flight was started with
        self._nonfinite = None
        self.engine = Engine()
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
        self._in_closure = False
        self._config = hparams.ConfigCache()

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

    def _refuse_mid_step(self, what):
        if self.engine.inflight is not None:
            raise RuntimeError(
                f"{what} between first_step() and second_step(): the weights are "
                "perturbed; call second_step() first"
            )

    def state_dict(self) -> dict[str, Any]:
        """State to resume bit-exactly: the EMA (its presence is the "seen" flag), the param
        groups, sigma/lmbda/order and the base optimizer's own state (momentum etc.)."""
        self._refuse_mid_step("state_dict() called")
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
        self._refuse_mid_step("load_state_dict() called")
        checkpoint.load(self, state_dict)

    def __getstate__(self):
        """Copies (``copy.deepcopy``, pickle, ``torch.save``) carry the configuration, the
        state and the base optimizer; buffers and plans are rebuilt on the next step."""
        self._refuse_mid_step("copying or pickling FSAM")
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("engine", "_config", "_scaler", "_nonfinite")
        }

    def __setstate__(self, st):
        super().__setstate__(st)
        if not isinstance(self.state, State):
            self.state = State(self.state)
        self.engine = Engine()
        self.__dict__.setdefault("_in_closure", False)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("check_stale_grads", True)
        self._scaler, self._nonfinite = None, None
        self._config = hparams.ConfigCache()

    # ------------------------------------------------------------------ introspection

    def plan_summary(self) -> list[BucketSummary]:
        """One :class:`fsam_fused.engine.BucketSummary` per bucket of the last step's plan
        (device, dtype, backend, tensors, elements, double-buffered tensors, bytes per step);
        empty before the first step."""
        return self.engine.summary()

    def backend_for(self, param: torch.Tensor) -> str | None:
        """The backend that ran ``param`` in the last step (None if it had no gradient)."""
        return self.engine.backend_for(param)

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
        return self._nonfinite

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Perturb the weights to ``w + e`` (saving ``w``); call after the first backward.
        All-or-nothing: if it raises, weights, EMA and base state are as they were.

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first backward; its
        1/scale is applied to the gradients inside the passes (``.grad`` is not rewritten).
        Finish the step with ``scaler.step(opt)`` then ``scaler.update()``. A non-finite
        first gradient (with or without a scaler) leaves weights and EMA bit for bit as they
        were; see :meth:`found_nonfinite`.


        Example:
            >>> import torch
            >>> from fsam_fused import FSAM
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
            >>> scaler = torch.amp.GradScaler("cpu")
            >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
            >>> def loss_fn():
            ...     with torch.autocast("cpu", dtype=torch.float16):
            ...         return torch.nn.functional.mse_loss(model(x), y)
            >>> scaler.scale(loss_fn()).backward()
            >>> opt.first_step(zero_grad=True, grad_scaler=scaler)
            >>> scaler.scale(loss_fn()).backward()
            >>> scaler.step(opt)              # restore, unscale, base step (or skip)
            >>> scaler.update()
            >>> opt.zero_grad()
        """
        stepping.first_step(self, zero_grad, grad_scaler)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights (bit for bit) and step the base optimizer with the
        gradient taken at the perturbed point; call after the second backward. After
        ``first_step(grad_scaler=scaler)`` use ``scaler.step(opt)`` instead (it calls
        ``opt.step()``, which lands here)."""
        stepping.second_step(self, zero_grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``first_step(zero_grad=True)``, ``closure()`` under grad mode, ``second_step()``.

        The caller has already run the first forward/backward; ``closure`` runs the second
        and its value is returned. If the closure raises, the weights are restored and the
        first pass's ``.grad`` given back (the EMA keeps this step's update: see
        ``fsam_fused.engine``). After ``first_step()`` it finishes the step: without a
        closure as ``second_step()`` (this is what ``scaler.step(opt)`` calls), with one (a
        framework's wrapper, e.g. Lightning's) running it first. It refuses, before anything
        changes, a step with exactly the gradients the previous step left (a sample of four,
        by version counter; host metadata only): the first backward did not run, as under
        Lightning's automatic optimization (``docs/training-loops.md``);
        ``check_stale_grads = False`` allows replaying gradients on purpose."""
        return stepping.step(self, closure)


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
