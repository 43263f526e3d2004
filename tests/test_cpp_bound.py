"""``Bound`` (the C++ ops bound to one plan bucket's lists: ``fsam_fused.ops.cpp.bind``)
against the ops themselves: the same bits for every pass, in every dtype and order, and the
per-call checks of what a call may change (gradients, values, sq, found), each raising with
its argument named before anything is written."""

import pytest
import torch

from helpers import backend_available, cpp_rows, cpp_scalars

N = 300


@pytest.fixture
def cpp():
    backend_available("cpp", "cpu")
    from fsam_fused.ops import cpp

    return cpp


def _lists(seed, dtype=torch.float32, ema_dtype=torch.float32, n=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda dt: [torch.randn(N + i, generator=g).to(dt) for i in range(n)]  # noqa: E731
    return dict(w=r(dtype), g=r(dtype), m=r(ema_dtype), s=r(dtype), swap=[0, 1, 0, 1][:n])


def _values(n, adaptive=(0, 1, 0, 1)):
    return cpp_rows(list(adaptive[:n]), [0.9] * n, [0.1] * n, [0.05] * n), cpp_scalars(0.8, 1e-12)


def _clone(d):
    return {
        k: [t.clone() for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v
        for k, v in d.items()
    }


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize(
    "dtype, ema_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_bound_passes_equal_the_ops_bit_for_bit(cpp, dtype, ema_dtype, paper):
    a, b = _lists(1, dtype, ema_dtype), None
    b = _clone(a)
    rows, scalars = _values(4)
    inv = torch.tensor([0.5])
    bound = cpp.bind(b["w"], b["m"], b["s"], b["swap"], paper, rows, scalars)
    ops = torch.ops.fsam_fused
    for with_inv in (None, inv):
        sq_a = ops.norm_sq(a["w"], a["g"], a["m"], rows, scalars, paper, with_inv)
        sq_b = bound.norm_sq(b["g"], with_inv)
        assert torch.equal(sq_a, sq_b)
        plain = torch.zeros(4, 4)
        assert torch.equal(
            ops.norm_sq(a["w"], a["g"], [], plain, scalars, False, with_inv),
            bound.grad_sq(b["g"], with_inv),
        )
        fa, fb = torch.full((), 7.0), torch.full((), 7.0)
        ops.perturb_(
            a["w"], a["g"], a["m"], a["s"], sq_a, rows, scalars, a["swap"], paper, with_inv, fa
        )
        assert bound.perturb_(b["g"], sq_b, with_inv, fb) is True
        for k in ("w", "m", "s"):
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k
        assert torch.equal(fa, fb)
        ops.restore_(
            [w for w, s in zip(a["w"], a["swap"]) if not s],
            [t for t, s in zip(a["s"], a["swap"]) if not s],
        )
        bound.restore_()
        assert all(torch.equal(x, y) for x, y in zip(a["w"], b["w"]))
        ops.ema_(a["m"], a["g"], rows, sq_a, with_inv, fa)
        assert bound.ema_(b["g"], sq_b, with_inv, fb) is True
        assert all(torch.equal(x, y) for x, y in zip(a["m"], b["m"]))


def _hostile(cpp, change, match):
    a = _lists(2)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    sq = torch.tensor([4.0])
    grads, found = list(a["g"]), torch.zeros(())
    grads, sq, found = change(a, grads, rows, scalars, sq, found)
    before = {k: [t.clone() for t in a[k]] for k in ("w", "m", "s")}
    for call in (
        lambda: bound.norm_sq(grads, None),
        lambda: bound.perturb_(grads, sq, None, found),
        lambda: bound.ema_(grads, sq, None, found),
    ):
        with pytest.raises((RuntimeError, ValueError), match=match):
            call()
        for k, v in before.items():
            assert all(torch.equal(x, y) for x, y in zip(a[k], v)), k


def _set(lst, i, t):
    lst[i] = t
    return lst


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a, g, r, s, sq, f: (g[:3], sq, f), "grads has 3 tensors"),
        (lambda a, g, r, s, sq, f: (_set(g, 1, torch.randn(N + 5)), sq, f), r"grads\[1\]"),
        (lambda a, g, r, s, sq, f: (_set(g, 2, g[2].double()), sq, f), r"grads\[2\]"),
        (lambda a, g, r, s, sq, f: (_set(g, 0, torch.randn(2 * N)[::2]), sq, f), r"grads\[0\]"),
        (lambda a, g, r, s, sq, f: (_set(g, 3, a["m"][3]), sq, f), r"grads\[3\] overlaps"),
        (lambda a, g, r, s, sq, f: (_set(g, 1, a["w"][1][:]), sq, f), r"grads\[1\] overlaps"),
        (lambda a, g, r, s, sq, f: (_set(g, 2, a["s"][2]), sq, f), r"grads\[2\] overlaps"),
        (lambda a, g, r, s, sq, f: (r.__setitem__((1, 0), float("nan")) or g, sq, f), "rho"),
        (lambda a, g, r, s, sq, f: (r.__setitem__((2, 1), 0.5) or g, sq, f), "adaptive"),
    ],
)
def test_bound_checks_every_call_before_writing(cpp, change, match):
    _hostile(cpp, change, match)


def test_bound_checks_sq_eps_and_found(cpp):
    a = _lists(3)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    with pytest.raises(RuntimeError, match="sq must be"):
        bound.perturb_(a["g"], torch.tensor([[4.0]]), None, None)
    with pytest.raises(RuntimeError, match="found must be"):
        bound.perturb_(a["g"], torch.tensor([4.0]), None, torch.zeros(2))
    scalars[1] = 0.0
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        bound.perturb_(a["g"], torch.tensor([4.0]), None, None)


def test_bind_checks_the_fixed_lists_once(cpp):
    a = _lists(4)
    rows, scalars = _values(4)
    with pytest.raises(RuntimeError, match="overlaps"):
        cpp.bind(a["w"], a["m"], [a["w"][0]] + a["s"][1:], a["swap"], False, rows, scalars)
    with pytest.raises(RuntimeError, match="requires grad"):
        w = [t.requires_grad_() for t in a["w"]]
        cpp.bind(w, a["m"], a["s"], a["swap"], False, rows, scalars)
    with pytest.raises(RuntimeError, match="rows must have shape"):
        cpp.bind(a["w"][:3], a["m"][:3], a["s"][:3], a["swap"][:3], False, rows, scalars)


def test_a_subclass_gradient_takes_the_ops_path(cpp):
    """Bound returns None/False (nothing done) for a gradient that must go through the
    dispatcher; the backend then calls the op."""
    from torch.testing._internal.two_tensor import TwoTensor

    a = _lists(5)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    g = list(a["g"])
    g[0] = TwoTensor(g[0], g[0].clone())
    m = [t.clone() for t in a["m"]]
    assert bound.norm_sq(g, None) is None
    assert bound.ema_(g, torch.tensor([1.0]), None, None) is False
    assert all(torch.equal(x, y) for x, y in zip(a["m"], m))


@pytest.mark.parametrize(
    "change",
    [
        lambda a, g: g[:3],
        lambda a, g: _set(g, 1, None),
        lambda a, g: _set(g, 1, torch.randn(N + 5)),
        lambda a, g: _set(g, 2, g[2].double()),
        lambda a, g: _set(g, 0, torch.randn(2 * N)[::2]),
        lambda a, g: _set(g, 3, a["m"][3]),
        lambda a, g: _set(g, 1, a["w"][1][:]),
        lambda a, g: _set(g, 2, a["s"][2]),
        lambda a, g: _set(g, 0, torch.randn(N).to(torch.device("meta"))),
    ],
)
def test_accepts_says_no_to_what_the_passes_refuse(cpp, change):
    """``accepts`` (the engine's per-step test of a step's gradients) is False exactly where
    a pass would raise; it raises nothing itself."""
    a = _lists(6)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    assert bound.accepts(list(a["g"])) is True
    g = change(a, list(a["g"]))
    assert bound.accepts(g) is False
    if all(t is not None for t in g):
        with pytest.raises(RuntimeError, match="grads"):
            bound.norm_sq(g, None)


def test_accepts_turns_down_a_subclass(cpp):
    from torch.testing._internal.two_tensor import TwoTensor

    a = _lists(7)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    g = list(a["g"])
    g[2] = TwoTensor(g[2], g[2].clone())
    assert bound.accepts(g) is False


@pytest.mark.parametrize("where", ["w", "m", "s", "g"])
def test_bound_refuses_a_found_flag_that_shares_memory(cpp, where):
    """``found`` is written before the gradients are read: one that aliases a weight, an EMA,
    a saved copy or a gradient is refused, before anything is written."""
    a = _lists(8)
    rows, scalars = _values(4)
    bound = cpp.bind(a["w"], a["m"], a["s"], a["swap"], False, rows, scalars)
    before = {k: [t.clone() for t in a[k]] for k in ("w", "m", "s", "g")}
    found = a[where][1][5:6]
    for call in (
        lambda: bound.perturb_(a["g"], torch.tensor([4.0]), None, found),
        lambda: bound.ema_(a["g"], torch.tensor([4.0]), None, found),
    ):
        with pytest.raises(RuntimeError, match="found overlaps"):
            call()
        for k, v in before.items():
            assert all(torch.equal(x, y) for x, y in zip(a[k], v)), k


def test_watch_sees_moved_parameters_and_missing_gradients(cpp):
    """``Watch`` (the engine's per-step test that no parameter moved, and its gradients): it
    holds the parameters themselves, so ``p.data = x`` and ``p.grad = None`` are seen."""
    g = torch.Generator().manual_seed(9)
    ps = [torch.nn.Parameter(torch.randn(5 + i, generator=g)) for i in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    w = cpp.watch(ps, [p.data_ptr() for p in ps])
    got = w.grads()
    assert w.unmoved() and all(a is p.grad for a, p in zip(got, ps))
    ps[1].grad = torch.randn(6, generator=g)  # a new gradient object: the new one is given
    assert w.grads()[1] is ps[1].grad
    ps[2].grad = None
    assert w.grads() is None and w.unmoved()
    ps[2].grad = torch.zeros(7)
    ps[0].data = torch.randn(5, generator=g)
    assert w.grads() is None and not w.unmoved()
    from torch.testing._internal.two_tensor import TwoTensor

    assert cpp.watch([TwoTensor(torch.ones(2), torch.ones(2))], [0]) is None


def test_a_moved_parameter_still_replans_with_the_watch(cpp):
    """Through the optimizer: the steady state takes the watched path (no new plan), a
    reassigned ``p.data`` or a dropped gradient builds a new plan, and the weights follow the
    reference backend over the same sequence."""
    from fsam_fused import FSAM

    torch.manual_seed(10)
    runs = {}
    for backend in ("cpp", "reference"):
        torch.manual_seed(10)
        ps = [torch.nn.Parameter(torch.randn(64, 3)) for _ in range(5)]
        opt = FSAM(ps, torch.optim.SGD, lr=0.1, backend=backend)
        builds = []
        for step in range(6):
            for i, p in enumerate(ps):
                p.grad = None if (step == 4 and i == 2) else torch.randn(64, 3)
            if step == 3:
                ps[1].data = ps[1].data.clone()
            opt.first_step()
            opt.second_step()
            builds.append(opt.engine.builds)
        runs[backend] = ([p.detach().clone() for p in ps], builds)
    (wc, bc), (wr, _) = runs["cpp"], runs["reference"]
    # (step 1 replans once: step 0 created the EMAs; step 2 is the steady state)
    assert bc == [1, 2, 2, 3, 4, 5], bc
    for a, b in zip(wc, wr):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
