"""FSAM through accelerate (fsam_fused.integrations.accelerate): FSAM's step methods on the
wrapper ``accelerator.prepare`` returns, driven as the docs' recipe drives them, against
the same loop on a copy of the model without accelerate, over several steps on fresh data;
plain and with ``mixed_precision="bf16"`` (CPU). Skipped without the ``hf`` extra."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fsam_fused import FSAM, bn_frozen

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="needs the hf extra (accelerate)"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


@pytest.fixture
def accelerator_factory():
    """accelerate keeps its state in process-wide singletons: reset them around each test so
    each Accelerator gets the mixed precision it asks for."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(**kw):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kw)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def net():
    return torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.BatchNorm1d(24), torch.nn.ReLU(), torch.nn.Linear(24, 3)
    )


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


KW = dict(rho=0.1, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9)


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accelerate_recipe_matches_plain_loop(precision, accelerator_factory):
    accelerator = accelerator_factory(mixed_precision=precision)
    torch.manual_seed(0)
    model = net()
    ref = copy.deepcopy(model)
    model, opt = accelerator.prepare(model, FSAM(model.parameters(), torch.optim.SGD, **KW))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    ref_opt = FSAM(ref.parameters(), torch.optim.SGD, **KW)
    cast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16"
        else contextlib.nullcontext
    )
    first = copy.deepcopy(ref.state_dict())
    for step in range(STEPS):
        x, y = batch(step)
        # The recipe (docs/integrations.md), through the wrapper.
        accelerator.backward(loss_fn(model, x, y))
        opt.first_step(zero_grad=True, grad_scaler=accelerator.scaler)
        with bn_frozen(model):
            accelerator.backward(loss_fn(model, x, y))
        opt.step()
        opt.zero_grad()
        # The same loop without accelerate.
        with cast():
            loss = loss_fn(ref, x, y)
        loss.backward()
        ref_opt.first_step(zero_grad=True)
        with bn_frozen(ref), cast():
            loss = loss_fn(ref, x, y)
        loss.backward()
        ref_opt.second_step(zero_grad=True)
        got, want = model.state_dict(), ref.state_dict()
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}"
            )
    assert int(model[1].num_batches_tracked) == STEPS
    assert not torch.equal(first["0.weight"], model.state_dict()["0.weight"])
    inner = opt.optimizer
    # (each call returns a copy of the last step's flag: equal, not the same tensor)
    assert torch.equal(opt.found_nonfinite(), inner.found_nonfinite())
    assert opt.perturbed is inner.perturbed is False
    assert opt.plan_summary() == inner.plan_summary()
    assert opt.backend_for(model[0].weight) == inner.backend_for(model[0].weight)


def test_accelerate_accumulation_recipe(accelerator_factory):
    """The docs' accumulation loop through accelerate: every micro-batch in both passes
    (no_sync on all but the last), one first_step, one opt.step(); against the same loop
    without accelerate, over several steps."""
    accelerator = accelerator_factory()
    torch.manual_seed(1)
    model = net()
    ref = copy.deepcopy(model)
    model, opt = accelerator.prepare(model, FSAM(model.parameters(), torch.optim.SGD, **KW))
    ref_opt = FSAM(ref.parameters(), torch.optim.SGD, **KW)
    for step in range(STEPS):
        micro = [batch(10 * step + i) for i in range(3)]
        for second in (False, True):
            with bn_frozen(model) if second else contextlib.nullcontext():
                for i, (x, y) in enumerate(micro):
                    last = i == len(micro) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        accelerator.backward(loss_fn(model, x, y) / len(micro))
            if not second:
                opt.first_step(zero_grad=True)
        opt.step()
        opt.zero_grad()
        for second in (False, True):
            with bn_frozen(ref) if second else contextlib.nullcontext():
                for x, y in micro:
                    (loss_fn(ref, x, y) / len(micro)).backward()
            if not second:
                ref_opt.first_step(zero_grad=True)
        ref_opt.second_step(zero_grad=True)
        for name, want in ref.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], want, rtol=1e-6, atol=1e-7)
    assert int(model[1].num_batches_tracked) == 3 * STEPS


def test_wrapper_without_fsam_keeps_its_attribute_errors(accelerator_factory):
    accelerator = accelerator_factory()
    model = net()
    opt = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    assert not hasattr(opt, "first_step")
    with pytest.raises(AttributeError, match="'AcceleratedOptimizer' object has no attribute"):
        opt.second_step()
    with pytest.raises(AttributeError):
        opt.sigma  # noqa: B018  (attributes are never forwarded)


def test_unwrap(accelerator_factory):
    from fsam_fused.integrations import unwrap

    accelerator = accelerator_factory()
    fsam = FSAM(net().parameters(), torch.optim.SGD, lr=0.1)
    assert unwrap(accelerator.prepare(fsam)) is fsam
    with pytest.raises(TypeError, match="does not wrap, an FSAM"):
        unwrap(torch.optim.SGD(net().parameters(), lr=0.1))


def run_fresh(code):
    """Run ``code`` in a fresh interpreter from the repository's root (where a user of a
    clone runs, and where the source tree's ``kernels/`` folder is on sys.path)."""
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


def test_forwarding_without_importing_the_integration():
    """A user who imports accelerate and fsam_fused, never fsam_fused.integrations: the
    FSAM built after accelerate's import installs the forwarding."""
    code = (
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from fsam_fused import FSAM\n"
        "m = torch.nn.Linear(3, 1)\n"
        "acc = Accelerator(cpu=True)\n"
        "opt = acc.prepare(FSAM(m.parameters(), torch.optim.SGD, lr=0.1))\n"
        "acc.backward(m(torch.randn(4, 3)).sum())\n"
        "opt.first_step(zero_grad=True)\n"
        "acc.backward(m(torch.randn(4, 3)).sum())\n"
        "opt.step()\n"
        "print('ok', opt.optimizer.engine.inflight is None)\n"
    )
    out = run_fresh(code)
    assert out.returncode == 0 and "ok True" in out.stdout, out.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_trainer_imports_from_the_clone_root():
    """transformers imports its dependency ``kernels``; from a clone's root this repository's
    ``kernels/`` folder came first (``cannot import name 'CUDAProperties'``)."""
    out = run_fresh(
        "from fsam_fused.integrations.huggingface import FSAMTrainer\n"
        "import kernels, fsam_fused.kernels as ours\n"
        "print('ok', kernels.__file__ != ours.__file__)\n"
    )
    assert out.returncode == 0 and "ok True" in out.stdout, out.stderr[-2000:]
