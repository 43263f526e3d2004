"""Mixed precision and non-finite gradients (docs/training-loops.md): the GradScaler recipe
against an unscaled run and a plain fp32 run, inf/NaN injected into either pass with and
without a scaler, the scale's back-off, host synchronisation, two forwards in one autocast
block. Every test takes the ``device`` fixture: on a CUDA machine its CUDA variants carry the
``cuda`` marker (bench/gpu_check.sh)."""

import contextlib
import copy

import pytest
import torch

from fsam_fused import FSAM, amp
from helpers import backend_available, batches, loss_of, make_net, opt_args

BACKENDS = ["reference", "foreach", "cpp", "triton"]

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd_fused": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
    "adamw_fused": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2, fused=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-3)),
}


def _backend_for(backend, device):
    if torch.device(device).type == "cuda" and backend == "cpp":
        pytest.skip("the C++ backend takes CPU tensors")
    backend_available(backend, device)


def _opt(net, backend, base, **kw):
    cls, args = BASES[base]
    return FSAM(
        net.parameters(), cls, rho=0.1, sigma=1.0, lmbda=0.6, **opt_args(backend), **args, **kw
    )


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _loss(net, x, y, device, dtype):
    with _autocast(device, dtype):
        return loss_of(net, x, y)


def _weights(net):
    return [p.detach().clone() for p in net.parameters()]


def _same_bits(a, b):
    return all(
        torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y)
        for x, y in zip(a, b)
    )


def _state(opt):
    """Every tensor of the optimizer's and the base optimizer's state, copied."""
    out = {}
    params = list(opt.state)
    for i, (_p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[(i, k)] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    for p, st in opt.base_optimizer.state.items():
        for k, v in st.items():
            out[("base", id(p), k)] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    del params
    return out


def _same_state(a, b):
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def recipe_step(net, opt, scaler, x, y, device, dtype, inject=None, unscale=False):
    """One step of the documented recipe; ``inject=(pass, value)`` writes ``value`` into one
    gradient element after that pass's backward."""
    scaler.scale(_loss(net, x, y, device, dtype)).backward()
    if inject and inject[0] == 1:
        net.fc1.weight.grad[0, 0] = inject[1]
    if unscale:
        scaler.unscale_(opt)
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(net, x, y, device, dtype)).backward()
    if inject and inject[0] == 2:
        net.fc1.weight.grad[0, 0] = inject[1]
    if unscale:
        scaler.unscale_(opt)  # e.g. for gradient clipping
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def plain_step(net, opt, x, y, device, dtype):
    _loss(net, x, y, device, dtype).backward()
    opt.first_step(zero_grad=True)
    _loss(net, x, y, device, dtype).backward()
    opt.second_step(zero_grad=True)


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("base", ["sgd", "sgd_fused", "adamw_fused"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scaler_recipe_matches_unscaled_and_fp32_runs(backend, base, device):
    """With a power-of-two scale that neither overflows nor underflows, the scaled run is the
    unscaled fp16-autocast run of the reference backend (to float rounding of the unscale),
    and both stay near the plain fp32 run."""
    _backend_for(backend, device)
    steps = 4
    net, ref, f32 = (make_net(1, device=device) for _ in range(3))
    opt = _opt(net, backend, base)
    opt_ref = _opt(ref, "reference", base)
    opt_32 = _opt(f32, "reference", base)
    scaler = torch.amp.GradScaler(
        torch.device(device).type, init_scale=2.0**10, growth_interval=1000
    )
    for x, y in batches(2, steps, device=device):
        recipe_step(net, opt, scaler, x, y, device, torch.float16)
        plain_step(ref, opt_ref, x, y, device, torch.float16)
        plain_step(f32, opt_32, x, y, device, None)
    assert scaler.get_scale() == 2.0**10, "no step may have been skipped"
    for p, q, r in zip(net.parameters(), ref.parameters(), f32.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, r, rtol=0, atol=5e-4)  # fp16 forward vs fp32 (3e-5)
    for p, q, r in zip(net.parameters(), ref.parameters(), f32.parameters()):
        if p in opt.state and "ema" in opt.state[p]:
            a_, b_, c_ = opt.state[p]["ema"], opt_ref.state[q]["ema"], opt_32.state[r]["ema"]
            # (the unscaled fp16 run loses the gradients' subnormal tail: ~2e-5 relative)
            torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-4 * c_.abs().max().item())
            torch.testing.assert_close(a_, c_, rtol=0, atol=2e-3 * c_.abs().max().item())
    assert opt.found_nonfinite().item() == 0.0


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_unscale_after_each_backward_is_the_same_recipe(backend, device):
    """The natural recipe (scaler.unscale_(opt) after each backward, e.g. to clip) runs and
    gives the same trajectory as the plain one."""
    _backend_for(backend, device)
    a, b = make_net(3, device=device), make_net(3, device=device)
    oa, ob = _opt(a, backend, "sgd"), _opt(b, backend, "sgd")
    dev = torch.device(device).type
    sa, sb = (
        torch.amp.GradScaler(dev, init_scale=256.0),
        torch.amp.GradScaler(dev, init_scale=256.0),
    )
    for x, y in batches(4, 3, device=device):
        recipe_step(a, oa, sa, x, y, device, torch.float16)
        recipe_step(b, ob, sb, x, y, device, torch.float16, unscale=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- inf and NaN


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("base", ["sgd", "sgd_fused", "adamw_fused"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", [1, 2])
def test_nonfinite_pass_with_scaler_skips_the_step(which, backend, base, value, device):
    """First pass: no perturbation, EMA untouched, step skipped. Second pass: weights
    restored bit for bit, base state unchanged. Both: the scale backs off once; the next
    step trains normally."""
    _backend_for(backend, device)
    net = make_net(5, device=device)
    opt = _opt(net, backend, base)
    dev = torch.device(device).type
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**10, backoff_factor=0.5)
    data = list(batches(6, 3, device=device))
    recipe_step(net, opt, scaler, *data[0], device, torch.float16)  # EMA, momentum exist
    w0, st0, scale0 = _weights(net), _state(opt), scaler.get_scale()
    x, y = data[1]
    scaler.scale(_loss(net, x, y, device, torch.float16)).backward()
    if which == 1:
        net.fc1.weight.grad[0, 0] = value
    g_first = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    if which == 1:
        assert _same_bits(_weights(net), w0), "a non-finite first pass perturbed the weights"
        assert _same_state(_state(opt), st0), "a non-finite first pass changed the EMA"
    assert opt.found_nonfinite().item() == float(which == 1)
    scaler.scale(_loss(net, x, y, device, torch.float16)).backward()
    if which == 2:
        net.fc1.weight.grad[0, 0] = value
    scaler.step(opt)
    assert _same_bits(_weights(net), w0), "the skipped step changed the weights"
    st = _state(opt)
    if which == 1:
        assert _same_state(st, st0)
    else:
        # The base optimizer's state is unchanged; the EMA kept this step's update, from
        # the valid first gradient (docs/training-loops.md).
        base_keys = {k for k in st0 if k[0] == "base"}
        assert all(
            torch.equal(st[k], st0[k]) if torch.is_tensor(st0[k]) else st[k] == st0[k]
            for k in base_keys
        )
        params = list(net.parameters())
        for key, m0 in st0.items():
            i, k = key[0], key[-1]
            if key[0] != "base" and k == "ema":
                p = list(opt.state)[i]
                g = next(g for q, g in zip(params, g_first) if q is p).float() / scale0
                torch.testing.assert_close(st[key], 0.6 * m0 + 0.4 * g, rtol=1e-6, atol=1e-7)
    assert opt.found_nonfinite().item() >= 1.0
    scaler.update()
    assert scaler.get_scale() == scale0 * 0.5, "the scale must back off exactly once"
    opt.zero_grad()
    recipe_step(net, opt, scaler, *data[2], device, torch.float16)
    assert not _same_bits(_weights(net), w0) and all(
        torch.isfinite(p).all() for p in net.parameters()
    )
    assert scaler.get_scale() == scale0 * 0.5


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_first_pass_without_scaler(backend, value, device):
    """No perturbation and the EMA untouched; a fused base skips on the device, a plain one
    steps on the second gradient (taken at w), skip_nonfinite=True skips any base."""
    _backend_for(backend, device)
    data = list(batches(8, 2, device=device))
    for base, skip, steps_base in [
        ("sgd_fused", False, False),
        ("adamw_fused", False, False),
        ("sgd", False, True),
        ("sgd", True, False),
        ("adam", True, False),
    ]:
        net = make_net(7, device=device)
        opt = _opt(net, backend, base, skip_nonfinite=skip)
        plain_step(net, opt, *data[0], device, None)
        w0, st0 = _weights(net), _state(opt)
        x, y = data[1]
        loss_of(net, x, y).backward()
        net.fc2.bias.grad[1] = value
        opt.first_step(zero_grad=True)
        assert _same_bits(_weights(net), w0), base
        assert _same_state(_state(opt), st0), base
        assert opt.found_nonfinite().item() == 1.0
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
        st = _state(opt)
        if steps_base:
            assert not _same_bits(_weights(net), w0)
            assert all(torch.isfinite(p).all() for p in net.parameters())
            assert all(torch.equal(st[k], st0[k]) for k in st0 if k[-1] == "ema")
        else:
            assert _same_bits(_weights(net), w0), base
            assert _same_state(st, st0), base
        # The EMA never saw the non-finite gradient, and stays finite.
        assert all(torch.isfinite(s["ema"]).all() for s in opt.state.values() if "ema" in s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_second_pass_with_skip_nonfinite(backend, device):
    _backend_for(backend, device)
    net = make_net(9, device=device)
    opt = _opt(net, backend, "sgd", skip_nonfinite=True)
    data = list(batches(10, 2, device=device))
    plain_step(net, opt, *data[0], device, None)
    w0 = _weights(net)
    base0 = {k: v for k, v in _state(opt).items() if k[0] == "base"}
    x, y = data[1]
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(net, x, y).backward()
    net.fc1.bias.grad[0] = float("nan")
    opt.second_step(zero_grad=True)
    assert _same_bits(_weights(net), w0)
    assert _same_state({k: v for k, v in _state(opt).items() if k[0] == "base"}, base0)
    assert opt.found_nonfinite().item() == 1.0


def test_overflowing_finite_first_pass_is_a_skip_too(device):
    """A sum of squares that overflows float32 (finite gradients of 1e20) is treated as
    non-finite: weights and EMA keep their bits (documented)."""
    net = make_net(11, device=device)
    opt = _opt(net, "auto", "sgd")
    loss_of(net, *next(batches(1, 1, device=device))).backward()
    for p in net.parameters():
        if p.grad is not None:
            p.grad.fill_(1e20)
    w0 = _weights(net)
    opt.first_step(zero_grad=True)
    assert _same_bits(_weights(net), w0)
    assert opt.found_nonfinite().item() == 1.0
    opt.second_step()


# ----------------------------------------------------------------------------- no host sync


class _NoSync:
    """Fails the test on any read of a tensor's value on the host (CPU tensors have no
    device to synchronise with, so this is how "no synchronisation" is checked on CPU)."""

    NAMES = ("item", "__bool__", "tolist", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(*a, **k):
            raise AssertionError("host synchronisation (a tensor's value read on the host)")

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_with_a_device_skipping_base(backend, device):
    _backend_for(backend, device)
    net = make_net(12, device=device)
    opt = _opt(net, backend, "adamw_fused")
    dev = torch.device(device).type
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**10)
    data = list(batches(13, 3, device=device))
    recipe_step(net, opt, scaler, *data[0], device, torch.float16)  # plans, builds, warms up
    x, y = data[1]
    sync = _NoSync if dev == "cpu" else _cuda_sync_errors
    loss = _loss(net, x, y, device, torch.float16)
    scaler.scale(loss).backward()
    with sync():
        opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(net, x, y, device, torch.float16)).backward()
    with sync():
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()
    # Without a scaler: the first pass's found flag goes to the fused base, on the device.
    opt2 = _opt(net, backend, "sgd_fused")
    plain_step(net, opt2, *data[1], device, None)
    _loss(net, *data[2], device, None).backward()
    with sync():
        opt2.first_step(zero_grad=True)
    _loss(net, *data[2], device, None).backward()
    with sync():
        opt2.second_step(zero_grad=True)


@contextlib.contextmanager
def _cuda_sync_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- misuse


def test_scaler_misuse_is_a_clear_error(device):
    dev = torch.device(device).type
    net = make_net(14, device=device)
    opt = _opt(net, "auto", "sgd")
    scaler = torch.amp.GradScaler(dev)
    ((x, y),) = batches(15, 1, device=device)
    scaler.scale(loss_of(net, x, y)).backward()
    w0, st0 = _weights(net), _state(opt)
    with pytest.raises(RuntimeError, match="is not supported"):
        scaler.step(opt, lambda: loss_of(net, x, y).backward())
    assert _same_bits(_weights(net), w0) and _same_state(_state(opt), st0)
    with pytest.raises(TypeError, match="grad_scaler"):
        opt.first_step(grad_scaler=object())
    # scaler.step(opt) without a first_step: the error explains the recipe
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt)
    scaler = torch.amp.GradScaler(dev)
    scaler.scale(loss_of(net, x, y)).backward()
    # The first pass scaled but first_step told nothing: restored, base untouched, error.
    opt.first_step(zero_grad=True)
    scaler.scale(loss_of(net, x, y)).backward()
    with pytest.raises(RuntimeError, match="grad_scaler=scaler to first_step"):
        scaler.step(opt)
    assert _same_bits(_weights(net), w0)
    # first_step(grad_scaler=...) then second_step() directly: refused, still perturbed.
    scaler = torch.amp.GradScaler(dev)
    opt.zero_grad()
    scaler.scale(loss_of(net, x, y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(net, x, y)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.second_step()
    scaler.step(opt)
    scaler.update()
    # A scaler with no scale yet
    with pytest.raises(RuntimeError, match="no scale yet"):
        opt.first_step(grad_scaler=torch.amp.GradScaler(dev))


def test_disabled_scaler_is_no_scaler(device):
    net, ref = make_net(16, device=device), make_net(16, device=device)
    opt, opt_ref = _opt(net, "auto", "sgd"), _opt(ref, "auto", "sgd")
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=False)
    for x, y in batches(17, 2, device=device):
        recipe_step(net, opt, scaler, x, y, device, None)
        plain_step(ref, opt_ref, x, y, device, None)
    assert _same_bits(_weights(net), _weights(ref))


def test_gradscaler_internals_we_rely_on():
    """Pins the GradScaler internals fsam_fused.amp reads (torch 2.11 and 2.13)."""
    import inspect

    from torch.amp.grad_scaler import OptState

    s = torch.amp.GradScaler("cpu", init_scale=4.0)
    p = torch.nn.Parameter(torch.ones(2))
    o = torch.optim.SGD([p], lr=0.1)
    s.scale(p.sum()).backward()
    assert torch.is_tensor(s._scale) and s._scale.dtype == torch.float32
    st = s._per_optimizer_states[id(o)]
    assert st["stage"] is OptState.READY and st["found_inf_per_device"] == {}
    s.unscale_(o)
    assert s._per_optimizer_states[id(o)]["stage"] is OptState.UNSCALED
    src = inspect.getsource(torch.amp.GradScaler.step)
    assert "_step_supports_amp_scaling" in src and "optimizer.found_inf" in src
    assert "optimizer.grad_scale" in src
    assert "found_inf_per_device" in inspect.getsource(torch.amp.GradScaler.update)
    assert amp.GradScaler is torch.amp.GradScaler


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_forwards_in_one_autocast_block_see_the_perturbed_weights(backend, dtype, device):
    """Autocast caches low-precision weight copies until its outermost block exits: FSAM
    clears the cache whenever it changes the weights, so the second gradient is the one at
    w + e (bit for bit the gradient a fresh block computes there)."""
    _backend_for(backend, device)
    dev = torch.device(device).type
    if dev == "cpu" and dtype == torch.float16 and backend == "triton":
        pytest.skip("covered by bfloat16 on CPU")
    net = make_net(18, device=device)
    opt = _opt(net, backend, "sgd")
    data = list(batches(19, 2, device=device))
    for x, y in data:
        with torch.autocast(dev, dtype=dtype):
            loss_of(net, x, y).backward()
            g1 = [p.grad.clone() for p in net.parameters() if p.grad is not None]
            opt.first_step(zero_grad=True)
            loss_of(net, x, y).backward()
            g2 = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        opt.zero_grad()
        with torch.autocast(dev, dtype=dtype):  # a fresh block at the perturbed weights
            loss_of(net, x, y).backward()
        want = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        assert all(torch.equal(a, b) for a, b in zip(g2, want))
        assert not all(torch.equal(a, b) for a, b in zip(g1, g2))
        for p, g in zip([p for p in net.parameters() if p.grad is not None], g2):
            p.grad = g
        opt.second_step(zero_grad=True)
    # bf16 autocast keeps training
    assert all(torch.isfinite(p).all() for p in net.parameters())
