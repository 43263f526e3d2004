"""Review of the per-plan C++ ``Bound`` and ``Watch`` (issue 16 item 2): each test is a
defect found on main (3ed9ac3) and fails there unless its docstring says it guards the fix;
the one-line docstring says what is wrong.

The Bound holds a bucket's EMAs, which are the optimizer state's own tensors: a user can
change one in place between two steps (``m.data = x``, ``m.resize_(n)``,
``m.requires_grad_()``) without the plan being rebuilt, and the Bound used the table, the
written ranges and the dtype it had taken from them when bound.

The last tests are older defects the review found (also at 48ccf37): a parameter re-viewed at
the same address kept its plan; a parameter's storage freed between the two steps crashed the
restore, and a double buffer freed so was reused."""

import warnings

import pytest
import torch

from fsam_fused import FSAM, EveryK
from helpers import backend_available, cpp_rows, cpp_scalars

N = 80  # an 80x80 weight (double-buffered) and an 80-element bias (exact copy)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(N, N), torch.nn.Tanh(), torch.nn.Linear(N, N), torch.nn.Linear(N, 1)
    )


def _opt(net, backend, **kw):
    backend_available(backend, "cpu")
    return FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=0.05,
        sigma=1.0,
        lmbda=0.9,
        lr=0.05,
        momentum=0.9,
        backend=backend,
        **kw,
    )


def _backward(net, seed):
    x = torch.randn(16, N, generator=torch.Generator().manual_seed(seed))
    net(x).square().mean().backward()


def _emas(opt, net):
    return [opt.state[p]["ema"] for p in net.parameters()]


# The in-place changes: (name, change(opt, net), refused). ``refused``: the contract refuses
# the step (an EMA that shares memory with a weight or a gradient, requires grad, or is not of
# its parameter's shape); otherwise the step may also take the EMA as it now is, as the
# reference backend does.
def _resize(opt, net):
    _emas(opt, net)[0].resize_(10)  # (shrinks: the storage keeps its size)


def _alias_weight(opt, net):
    _emas(opt, net)[0].data = net[2].weight.detach()


def _alias_grad(opt, net):
    _emas(opt, net)[0].data = net[0].weight.grad.detach()


def _requires_grad(opt, net):
    _emas(opt, net)[2].requires_grad_()


def _transposed(opt, net):
    m = _emas(opt, net)[2]
    m.data = m.data.t()  # (80x80: the same sizes, other strides)


def _float64(opt, net):
    m = _emas(opt, net)[2]
    m.data = m.data.double()


CHANGES = [
    ("resize", _resize, True),
    ("alias_weight", _alias_weight, True),
    ("alias_grad", _alias_grad, True),
    ("requires_grad", _requires_grad, True),
    ("transposed", _transposed, False),
    ("float64", _float64, False),
]


def _snapshot(opt, net):
    """Every weight, EMA and momentum buffer, bit for bit (with dtype and strides)."""
    out = []
    for p in net.parameters():
        out.append(p.detach().clone())
        for v in opt.state[p].values():
            if torch.is_tensor(v):
                out.append(v.detach().clone(memory_format=torch.preserve_format))
    return out


def _assert_unchanged(before, after):
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), i


def _run(backend, change, at, steps=4, **kw):
    """F-SAM steps; ``change`` applied before step ``at``'s first_step. Returns the outcome
    of that step (None, or the exception), the state just before it, the state right after
    the exception (if any) and the final weights and EMAs."""
    net = _net()
    opt = _opt(net, backend, **kw)
    outcome = before = after = None
    for t in range(steps):
        _backward(net, seed=t)
        if t == at:
            change(opt, net)
            before = _snapshot(opt, net)
        try:
            perturbed = opt.first_step(zero_grad=True)
        except (RuntimeError, ValueError) as e:
            assert t == at, e
            outcome, after = e, _snapshot(opt, net)
            break
        if perturbed:
            _backward(net, seed=100 + t)
        opt.second_step(zero_grad=True)
    final = [p.detach().clone() for p in net.parameters()] + [
        m.detach().clone() for m in _emas(opt, net)
    ]
    return outcome, before, after, final


@pytest.mark.parametrize("name, change, refused", CHANGES, ids=[c[0] for c in CHANGES])
def test_an_ema_changed_in_place_is_not_written_through_a_stale_binding(name, change, refused):
    """An EMA changed in place between steps (resized, re-pointed at a weight's or a
    gradient's memory, made to require grad, given other strides or another dtype) was
    read and written by the Bound as it had been bound: out of its bounds, into a weight,
    in the wrong element order, float64 bits read as float32. The step must refuse it with
    nothing changed, or (where the contract allows) take the EMA as it now is, as the
    reference backend does."""
    err, before, after, final = _run("cpp", change, at=2)
    if err is not None:
        _assert_unchanged(before, after)
        return
    assert not refused, f"{name}: the step took an EMA the contract refuses"
    ref_err, _, _, want = _run("reference", change, at=2)
    assert ref_err is None
    # (values only: a new plan converts a float64 EMA to the fused backends' float32, where
    # the reference keeps it)
    for i, (g, w) in enumerate(zip(final, want)):
        assert g.shape == w.shape, i
        torch.testing.assert_close(
            g, w, rtol=1e-5, atol=1e-6, check_dtype=False, msg=f"{name}: tensor {i}"
        )


@pytest.mark.parametrize(
    "name, change",
    [CHANGES[0][:2], CHANGES[1][:2], CHANGES[3][:2]],
    ids=["resize", "alias_weight", "requires_grad"],
)
def test_an_ema_changed_in_place_before_a_cheap_step_is_refused(name, change):
    """The same in a schedule's cheap step (the EMA update through the Bound's ema_): it
    updated a resized EMA over its old extent, and wrote a weight the EMA was re-pointed at."""
    err, before, after, _ = _run("cpp", change, at=3, steps=5, schedule=EveryK(2))
    assert err is not None, f"{name}: the cheap step took an EMA the contract refuses"
    _assert_unchanged(before, after)


def test_an_ema_moved_to_new_storage_of_its_shape_is_followed():
    """(Guards the fix.) An EMA given new storage of its own shape and dtype (``m.data =
    m.data.clone()``) is a valid EMA: the step updates it there, with the bits of a run in
    which it did not move."""

    def move(opt, net):
        for m in _emas(opt, net):
            m.data = m.data.clone()

    err, _, _, moved = _run("cpp", move, at=2)
    assert err is None
    _, _, _, still = _run("cpp", lambda opt, net: None, at=2)
    for i, (a, b) in enumerate(zip(moved, still)):
        assert torch.equal(a, b), i


def _move_and_reuse(opt, net):
    # The EMA of the second weight moves to new storage of its shape (valid); the first
    # weight's gradient is then read from the storage it left, which is no EMA any more.
    m = _emas(opt, net)[2]
    left = m.data
    m.data = left.clone()
    net[0].weight.grad = left


def test_a_gradient_in_the_storage_an_ema_left_is_taken():
    """The Bound's written ranges stayed on the storage an EMA had when bound: after a valid
    move of the EMA, a gradient in the storage it left was refused as overlapping an EMA (and
    one overlapping the EMA's new storage was not seen)."""
    err, _, _, got = _run("cpp", _move_and_reuse, at=2)
    assert err is None, err
    ref_err, _, _, want = _run("reference", _move_and_reuse, at=2)
    assert ref_err is None
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")


def test_bound_passes_do_nothing_when_an_ema_changed():
    """``Bound.norm_sq``/``grad_sq``/``perturb_``/``ema_`` ran on an EMA resized since
    ``bind()``, over its old extent; each must return None/False, writing nothing (the
    caller then takes the ops, which check the EMA), and ``accepts`` None (a new plan)."""
    backend_available("cpp", "cpu")
    from fsam_fused.ops import cpp

    g = torch.Generator().manual_seed(3)
    w = [torch.randn(300 + i, generator=g) for i in range(3)]
    grads = [torch.randn_like(t) for t in w]
    m = [torch.randn_like(t) for t in w]
    s = [torch.zeros_like(t) for t in w]
    rows, scalars = cpp_rows([0, 1, 0], [0.9] * 3, [0.1] * 3, [0.05] * 3), cpp_scalars(0.8)
    bound = cpp.bind(w, m, s, [0, 1, 0], False, rows, scalars)
    sq = bound.norm_sq(grads, None)
    assert sq is not None and bound.accepts(grads) is True
    m[1].resize_(5)
    keep = [t.clone() for t in (*w, *s)] + [m[1].clone()]
    found = torch.full((), 7.0)
    assert bound.accepts(grads) is None
    assert bound.norm_sq(grads, None) is None
    assert bound.grad_sq(grads, None) is None
    assert bound.perturb_(grads, sq, None, found) is False
    assert bound.ema_(grads, sq, None, found) is False
    for a, b in zip(keep, [*w, *s, m[1]]):
        assert torch.equal(a, b)
    assert found.item() == 7.0


def _re_view_run(be, fixed, steps=5, **kw):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1))
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.05, backend=be, fixed_addresses=fixed, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(16, 24, generator=g)
        m(x).square().mean().backward()
        if t == 2:
            m[0].weight.data = m[0].weight.data.t()
        opt.first_step(zero_grad=True)
        m(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    return m, opt


@pytest.mark.parametrize("backend", ["auto", "foreach"])
@pytest.mark.parametrize("fixed", [False, True])
def test_a_parameter_re_viewed_at_the_same_address_replans(backend, fixed):
    """``p.data = p.data.t()`` of a square weight keeps its address: the plan must still be
    rebuilt (the passes walk memory in the planned layout), so the step equals the reference
    backend's, which works on the parameters as they are (``auto`` then leaves the C++
    kernels for that bucket, with its warning: the gradient no longer has the weight's
    strides). Every parameter has a gradient: the C++ Watch's test (docs/semantics.md says
    where a re-view made after the backward is not seen)."""
    want, _ = _re_view_run("reference", fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, _ = _re_view_run(backend, fixed)
    assert got[0].weight.stride() == want[0].weight.stride() == (1, 24)
    for a, b in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capturable", [False, True])
def test_an_explicit_cpp_backend_refuses_the_re_viewed_parameter(capturable):
    """With ``backend="cpp"`` the new plan's checks refuse the re-viewed weight (its gradient
    no longer has its strides), naming what to use, before anything changes. With
    ``capturable=True`` the frozen plan must not be taken for it either (its passes walk
    memory in the planned layout): the same error, not a silently transposed step."""
    backend_available("cpp", "cpu")
    m, opt = _re_view_run("cpp", False, steps=2, capturable=capturable)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 24, generator=g)
    m(x).square().mean().backward()
    m[0].weight.data = m[0].weight.data.t()
    before = [p.detach().clone() for p in m.parameters()]
    emas = [s["ema"].clone() for s in opt.state.values() if "ema" in s]
    with pytest.raises(ValueError, match="same strides"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))
    assert all(
        torch.equal(a, s["ema"])
        for a, s in zip(emas, [s for s in opt.state.values() if "ema" in s])
    )


def _freed_model(backend, fixed=False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = FSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend, fixed_addresses=fixed)
    return m, opt, torch.randn(4, 8)


@pytest.mark.parametrize(
    "backend, fixed", [("cpp", True), ("reference", False), ("foreach", False)]
)
def test_a_storage_freed_between_the_two_steps_is_an_error_not_a_crash(backend, fixed):
    """A parameter whose storage is freed between first_step and second_step
    (``untyped_storage().resize_(0)``, as FSDP-style code frees parameters) cannot get its
    bits back into that storage: second_step names it and restores every other parameter; it
    used to copy the saved value past the end of the freed storage (a segfault)."""
    if backend == "cpp":
        backend_available("cpp", "cpu")
    m, opt, x = _freed_model(backend, fixed)
    m(x).square().mean().backward()
    before = [p.detach().clone() for p in m.parameters()]
    opt.first_step(zero_grad=True)
    m(x).square().mean().backward()
    m[0].bias.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"storage of the parameter of shape \(8,\) was freed"):
        opt.second_step()
    for p, b, name in zip(m.parameters(), before, ("w0", "b0", "w2", "b2")):
        if name != "b0":
            assert torch.equal(p, b), name


def test_a_freed_double_buffer_is_not_reused():
    """Double-buffered, the parameter's storage during the second pass is the spare: freeing
    it there frees the spare (after the second backward: no value depends on it).
    second_step puts the home storage back and the next steps take a new spare, bit for bit
    as without the free; they used to write w + e into the freed one (a segfault)."""
    backend_available("cpp", "cpu")
    runs = []
    for free in (False, True):
        m, opt, x = _freed_model("cpp")
        for t in range(4):
            m(x).square().mean().backward()
            opt.first_step(zero_grad=True)
            m(x).square().mean().backward()
            if free and t == 1:
                m[0].bias.untyped_storage().resize_(0)
            opt.second_step(zero_grad=True)
        assert opt.plan_summary()[0].double_buffered == (True,) * 4
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
