"""Review of the perturbation schedules (issue 19): each test is a defect found on main
(8fca4e6), failing there; the one-line docstring says what is wrong."""

import os
import signal

import pytest
import torch

from fsam_fused import FSAM, SAM, Adaptive, EveryK
from helpers import backend_available

LR = 0.1


def _lin(schedule, backend="cpp", base=torch.optim.SGD, seed=0, **kw):
    backend_available(backend, "cpu")
    torch.manual_seed(seed)
    lin = torch.nn.Linear(5, 2)
    opt = FSAM(
        lin.parameters(),
        base,
        rho=0.1,
        sigma=0.5,
        lmbda=0.7,
        lr=LR,
        backend=backend,
        schedule=schedule,
        **kw,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(8)]
    return lin, opt, data


def _loss(lin, x, y):
    return torch.nn.functional.mse_loss(lin(x), y)


def _step(lin, opt, x, y):
    _loss(lin, x, y).backward()
    if opt.first_step(zero_grad=True):
        _loss(lin, x, y).backward()
    opt.second_step(zero_grad=True)


def _snap(lin, opt):
    return (
        [p.detach().clone() for p in lin.parameters()],
        [opt.state[p]["ema"].clone() for p in lin.parameters() if p in opt.state],
    )


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# ---------------------------------------------------------------- all-or-nothing


@pytest.mark.parametrize("attr, value", [("delta", 2.0), ("total_steps", 0)])
@pytest.mark.parametrize("lam", [-100.0, 100.0], ids=["perturbing", "cheap"])
def test_lagged_adaptive_bad_setting_is_checked_before_anything_is_written(attr, value, lam):
    """Adaptive(lagged=True) validates delta/total_steps in observe(), after engine.perturb
    wrote w + e (or engine.cheap the EMA): first_step raises with the weights left perturbed
    and opt.perturbed False (the saved copy is orphaned: the weights never come back), or
    with the EMA updated. docs/semantics.md: "validated at every decision, before anything
    is modified"."""
    sched = Adaptive(total_steps=10, lambda1=lam, lambda2=lam, lagged=True)
    lin, opt, data = _lin(sched)
    for x, y in data[:3]:
        _step(lin, opt, x, y)
    setattr(sched, attr, value)
    x, y = data[3]
    _loss(lin, x, y).backward()
    w, m = _snap(lin, opt)
    with pytest.raises(ValueError, match=attr):
        opt.first_step()
    assert not opt.perturbed
    assert _same([p.detach() for p in lin.parameters()], w)  # fails: weights are w + e
    assert _same(_snap(lin, opt)[1], m)
    assert sched.steps == 3


def test_a_signal_in_the_schedule_bookkeeping_after_the_perturbation_restores_the_weights():
    """A signal whose handler raises after engine.perturb() returned but inside
    schedules.first_half (schedule.observe) escapes with the weights left at w + e and the
    session IDLE (the engine's "anything between the commit and the return of first_step
    restores the weights" does not hold with a schedule)."""
    sched = Adaptive(total_steps=10)  # the paper's rule: step 0 perturbs
    lin, opt, data = _lin(sched)
    x, y = data[0]
    _loss(lin, x, y).backward()
    w, _ = _snap(lin, opt)

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    original = Adaptive.observe

    def observe(self, sq):
        os.kill(os.getpid(), signal.SIGALRM)  # delivered at the next bytecode
        return original(self, sq)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        sched.observe = observe.__get__(sched)
        with pytest.raises(Boom):
            opt.first_step()
    finally:
        signal.signal(signal.SIGALRM, old)
        del sched.observe
    assert not opt.perturbed
    assert _same([p.detach() for p in lin.parameters()], w)  # fails: left at w + e


# ---------------------------------------------------------------- gradient clipping


def test_clipping_the_gradient_of_a_cheap_step_before_second_step():
    """The usual loop clips right before the base step (after the second backward on a
    perturbing step); on a cheap step clip_grad_norm_ rewrites the first pass's .grad in
    place, the version check takes it for a second backward, and second_step() raises
    CHEAP_SECOND_PASS: the step is dropped. Expected: the base steps on the clipped g."""
    lin, opt, data = _lin(EveryK(2))
    _step(lin, opt, *data[0])  # step 0 perturbs
    x, y = data[1]
    _loss(lin, x, y).backward()
    assert opt.first_step(zero_grad=True) is False
    w = [p.detach().clone() for p in lin.parameters()]
    torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.01)
    g = [p.grad.clone() for p in lin.parameters()]
    opt.second_step(zero_grad=True)  # fails: RuntimeError (cheap step, gradients written)
    for p, w0, g0 in zip(lin.parameters(), w, g):
        torch.testing.assert_close(p.detach(), w0 - LR * g0, rtol=0, atol=1e-7)


def test_grad_scaler_unscale_for_clipping_on_a_cheap_step():
    """docs/training-loops.md: "scaler.unscale_(opt) after either backward (to clip
    gradients) works too". On a cheap step unscale_ after first_step rewrites .grad in place
    and scaler.step(opt) raises CHEAP_SECOND_PASS (the step is lost)."""
    lin, opt, data = _lin(EveryK(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    ref_lin, ref_opt, _ = _lin(EveryK(2))
    for x, y in data[:4]:
        _step(ref_lin, ref_opt, x, y)
        scaler.scale(_loss(lin, x, y)).backward()
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            scaler.scale(_loss(lin, x, y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(lin.parameters(), 1e6)  # (a no-op clip)
        scaler.step(opt)  # fails on step 1 (cheap)
        scaler.update()
        opt.zero_grad()
    for p, q in zip(lin.parameters(), ref_lin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_hf_trainer_with_a_schedule_and_the_default_clipping(tmp_path):
    """FSAMTrainer with schedule=EveryK(2) and the Trainer's default max_grad_norm=1.0: the
    Trainer clips between training_step (the cheap first_step) and optimizer.step(), so the
    first cheap step raises CHEAP_SECOND_PASS; the existing test passes max_grad_norm=0."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_integrations_hf import FSAM_KW, bert, make_trainer, text_data

    torch.manual_seed(0)
    model = bert()
    kw = {**FSAM_KW, "schedule": EveryK(2)}
    trainer, _ = make_trainer(
        model, text_data(48, "bert", 1), tmp_path, fsam_kw=kw, max_grad_norm=1.0
    )
    trainer.train()  # fails: RuntimeError at the first cheap step
    assert trainer.state.global_step == 4


# ---------------------------------------------------------------- GradScaler and fused bases


@pytest.mark.parametrize(
    "base, kw",
    [(torch.optim.SGD, {"fused": True}), (torch.optim.AdamW, {"fused": True})],
    ids=["sgd_fused", "adamw_fused"],
)
@pytest.mark.parametrize("schedule", ["every2", "none"])
def test_fused_base_skips_an_overflow_seen_by_both_checks(base, kw, schedule):
    """amp.finish returns found_inf + first: 2.0 when the scaler's own check and FSAM's
    first-pass flag both saw the overflow, which is *every* overflowing cheap step (the
    scaler re-checks the same gradient) and a perturbing step whose two passes overflow.
    torch's fused SGD/Adam/AdamW skip only when found_inf == 1.0: they step on the inf
    gradient and the weights become inf/NaN."""
    lin, opt, data = _lin(EveryK(2) if schedule == "every2" else None, base=base, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    for t, (x, y) in enumerate(data[:2]):
        scaler.scale(_loss(lin, x, y)).backward()
        if t == 1:
            lin.bias.grad[0] = float("inf")
            w, m = _snap(lin, opt)
        if opt.first_step(zero_grad=True, grad_scaler=scaler):
            scaler.scale(_loss(lin, x, y)).backward()
            if t == 1:
                lin.bias.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.last_perturbed is (schedule == "none")
    assert _same([p.detach() for p in lin.parameters()], w)  # fails: bias[0] is inf/NaN
    assert scaler.get_scale() == 2.0**7
    assert opt.found_nonfinite().item() == 1.0


# ---------------------------------------------------------------- counted bytes


def test_sam_cheap_step_bytes():
    """SAM has no EMA: its cheap step is the sum of squares (one read of g, W bytes) and the
    base step; plan_summary says 2 W (cheap_bytes_per_step counts a second read of g that
    only the EMA pass makes)."""
    backend_available("cpp", "cpu")
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 2)
    opt = SAM(lin.parameters(), torch.optim.SGD, rho=0.1, lr=LR, backend="cpp", schedule=EveryK(2))
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    for _ in range(2):
        _step(lin, opt, x, y)
    s = opt.plan_summary()[0]
    assert s.cheap_bytes_per_step == 4 * s.numel  # fails: 8 * numel


# ---------------------------------------------------------------- misuse not refused


def test_one_schedule_object_given_to_two_optimizers():
    """A schedule holds per-run state (a step counter), but FSAM(schedule=s) accepts an
    object another optimizer already steps with: the two interleave one counter, so with
    EveryK(2) and two optimizers stepped alternately one always perturbs and the other
    never does, silently. Expected: refused at construction, or each optimizer its own."""
    s = EveryK(2)
    lin1, opt1, data = _lin(s)
    try:
        lin2, opt2, _ = _lin(s, seed=1)
    except (TypeError, ValueError) as e:
        assert "schedule" in str(e)
        return
    taken2 = []
    for x, y in data[:4]:
        _step(lin1, opt1, x, y)
        _step(lin2, opt2, x, y)
        taken2.append(opt2.last_perturbed)
    assert taken2 == [True, False, True, False]  # fails: [False, False, False, False]


# ---------------------------------------------------------------- the C++ op's messages


@pytest.mark.parametrize(
    "make",
    [
        lambda g, m: ([m[0]], g),  # fewer EMAs than gradients
        lambda g, m: (m, [g[0], g[1].bfloat16()]),  # mixed gradient dtypes
        lambda g, m: ([torch.zeros(4)], [torch.randn(4).to_sparse()]),  # a sparse gradient
    ],
    ids=["lengths", "dtypes", "sparse"],
)
def test_cpp_ema_op_names_its_arguments(make):
    """ops.cpp.ema_(emas, grads, ...) has no `weights` argument, but gather(grads, grads,
    ...) makes its errors name one ("weights[1] is BFloat16", "emas has 1 tensors, weights
    has 2", "weights[0] must be dense"): bad input must name the argument it came in."""
    backend_available("cpp", "cpu")
    from fsam_fused.ops import cpp as cpp_ops

    g = [torch.randn(10), torch.randn(6)]
    m = [torch.zeros(10), torch.zeros(6)]
    emas, grads = make(g, m)
    rows = torch.zeros(len(grads), 4)
    with pytest.raises(RuntimeError) as info:
        cpp_ops.ema_(emas, grads, rows, torch.ones(1))
    assert "weights" not in str(info.value), str(info.value)
    assert "grads" in str(info.value), str(info.value)


# ---------------------------------------------------------------- a failed step's schedule


def test_a_first_step_that_fails_after_the_decision_keeps_the_schedule():
    """Schedule's contract: "a failed step changes no schedule state". A signal whose
    handler raises in first_step's zero_grad (after first_half returned) is handled by
    abandon(): the weights go back, but the schedule's counter keeps the failed step, so
    the retried step 0 is taken as step 1 (cheap) instead of perturbing."""
    sched = EveryK(2)
    lin, opt, data = _lin(sched)
    x, y = data[0]
    _loss(lin, x, y).backward()
    w, _ = _snap(lin, opt)

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    original = opt.zero_grad

    def zero_grad(*a, **k):
        os.kill(os.getpid(), signal.SIGALRM)
        return original(*a, **k)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        opt.zero_grad = zero_grad
        with pytest.raises(Boom):
            opt.first_step(zero_grad=True)
    finally:
        signal.signal(signal.SIGALRM, old)
        del opt.zero_grad
    assert not opt.perturbed
    assert _same([p.detach() for p in lin.parameters()], w)  # (abandoned: restored)
    assert sched.steps == 0  # fails: 1
    assert opt.will_perturb() is True  # fails: the retry would be a cheap step


# ---------------------------------------------------------------- reporting a step in flight


def test_perturbed_no_longer_tells_a_callback_that_a_step_is_in_flight():
    """On a cheap step in flight perturbed is False (the weights are w), yet state_dict() is
    refused: the guard for a checkpoint is the public ``opt.in_flight`` (documented), and
    state_dict() names what is pending."""
    lin, opt, data = _lin(EveryK(2))
    _step(lin, opt, *data[0])
    x, y = data[1]
    _loss(lin, x, y).backward()
    assert opt.first_step(zero_grad=True) is False
    assert not opt.perturbed and opt.in_flight
    with pytest.raises(RuntimeError, match="base step is pending"):
        opt.state_dict()
    opt.second_step(zero_grad=True)
    assert not opt.in_flight
    opt.state_dict()


# ---------------------------------------------------------------- accelerate's wrapper


def test_accelerate_wrapper_forwards_the_schedule_api():
    """integrations/accelerate.FORWARDED lists FSAM's own members on accelerate.prepare's
    wrapper, but not the new will_perturb()/last_perturbed (nor schedule): the documented
    DDP per-replica recipe (`ahead = opt.will_perturb()`) and a logger reading
    `opt.last_perturbed` raise AttributeError on the optimizer accelerate hands back."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        lin, opt, data = _lin(EveryK(2))
        lin, opt = accelerator.prepare(lin, opt)
        x, y = data[0]
        assert opt.will_perturb() is True  # fails: AttributeError
        accelerator.backward(_loss(lin, x, y))
        if opt.first_step(zero_grad=True):
            accelerator.backward(_loss(lin, x, y))
        opt.step()
        assert opt.last_perturbed is True
        assert isinstance(opt.schedule, EveryK)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.cuda
def test_lagged_adaptive_on_cuda_survives_load_state_dict_and_copies():
    """UNVERIFIED here (no GPU in this review): after a CUDA step, Adaptive(lagged=True)
    holds (pinned tensor, torch.cuda.Event) in _pending; checkpoint._checked_schedule
    deep-copies the schedule before loading and copy.deepcopy(opt) copies it too, and a
    torch.cuda.Event has no __reduce__/__deepcopy__ (expected: TypeError "cannot pickle")."""
    import copy

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lin = torch.nn.Linear(5, 2).cuda()
    opt = FSAM(
        lin.parameters(),
        torch.optim.SGD,
        rho=0.1,
        lr=LR,
        backend="foreach",
        schedule=Adaptive(total_steps=10, lagged=True),
    )
    x, y = torch.randn(8, 5, device="cuda"), torch.randn(8, 2, device="cuda")
    for _ in range(2):
        _step(lin, opt, x, y)
    sd = opt.state_dict()  # (reads the pending decision: _pending is None now)
    _step(lin, opt, x, y)  # a fresh pending event
    copy.deepcopy(opt)
    opt.load_state_dict(sd)
    _step(lin, opt, x, y)
