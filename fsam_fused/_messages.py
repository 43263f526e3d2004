"""Error messages that explain a recipe (long enough to keep out of the code that raises them)."""

NO_FIRST_STEP = (
    "FSAM.step() needs a closure (one that runs the step's forward and backward, or, after "
    "your own first backward, the second pass), or a preceding first_step(). With a "
    "GradScaler: opt.first_step(zero_grad=True, grad_scaler=scaler) after the first backward, "
    "then the second backward, then scaler.step(opt). A framework that runs the closure "
    "itself and then calls scaler.step(opt) without it (Lightning's automatic optimization "
    "under fp16) needs the manual-optimization recipe in docs/training-loops.md"
)
SCALER_CLOSURE = (
    "scaler.step(opt, closure) is not supported: GradScaler cannot see the closure's "
    "backward. Use opt.first_step(zero_grad=True, grad_scaler=scaler) after the first "
    "backward, run the second backward, then scaler.step(opt) and scaler.update()"
)


def closure_called(method: str) -> str:
    return (
        f"the closure passed to step() must run only the second forward and backward; it "
        f"called {method}() (step() calls first_step() and second_step() itself)"
    )


SCALED_SECOND_STEP = (
    "first_step() took grad_scaler=scaler: finish the step with scaler.step(opt), then "
    "scaler.update() (the second pass's gradients are scaled; the weights are still perturbed)"
)
UNSCALED_SCALER_STEP = (
    "scaler.step(opt) after a first_step() without grad_scaler: the first pass's gradients "
    "were scaled. Pass grad_scaler=scaler to first_step(). The weights are restored and the "
    "base optimizer did not step"
)
BASE_INSTANCE = (
    "base_optimizer must be the optimizer class (e.g. torch.optim.SGD), not an instance: FSAM "
    "builds it on its own param groups"
)


def base_not_class(obj) -> str:
    return (
        f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, got {obj!r}"
    )


CHEAP_SECOND_PASS = (
    "second_step(): first_step() returned False (the schedule took a cheap step: the EMA "
    "was updated, the weights not perturbed), but the gradients were written again since: "
    "a second forward/backward must be skipped on such a step (`if opt.first_step(): ...`). "
    "The base optimizer did not step; the step is over"
)
NO_SCHEDULE = (
    "FSAM: a perturbation schedule (EveryK, Bernoulli, Adaptive) decides on the host, step by "
    "step, which passes run: it cannot run under torch.compile or CUDA-graph capture. Take "
    "the optimizer's steps eagerly (compile the model alone), or drop the schedule"
)
