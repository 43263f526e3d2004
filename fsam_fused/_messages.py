"""Error messages that explain a recipe (long enough to keep out of the code that raises them)."""

NO_FIRST_STEP = (
    "FSAM.step() needs a closure that runs the second forward and backward pass, e.g. "
    "opt.step(lambda: loss_fn().backward()), or a preceding first_step(). With a GradScaler: "
    "opt.first_step(zero_grad=True, grad_scaler=scaler) after the first backward, then the "
    "second backward, then scaler.step(opt). Frameworks that run the only backward inside "
    "their own closure (Lightning's automatic optimization) need the manual-optimization "
    "recipe in docs/training-loops.md"
)
STALE = (
    "FSAM.step(closure) found exactly the gradients the previous step left (no backward "
    "since): its first_step would perturb along a stale gradient. The closure runs the "
    "*second* forward and backward; run the first before step(closure). A framework that "
    "calls step(closure) with the step's only backward in the closure (Lightning's automatic "
    "optimization) needs manual optimization: docs/training-loops.md"
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
