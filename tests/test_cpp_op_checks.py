"""The C++ ops called directly with hostile arguments: each is rejected by the op's own
checks, with an error naming the argument, before anything is written (every tensor
argument is compared bit for bit with a clone taken before the call)."""

import math

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, cpp_rows, cpp_scalars

N = 300  # elements per tensor; all the same size so any two may be swapped for each other


@pytest.fixture
def ops():
    backend_available("cpp", "cpu")
    return torch.ops.fsam_fused


def _args(n=3, seed=0):
    """perturb_'s arguments as a dict (three tensors: copied, swapped, copied)."""
    gen = torch.Generator().manual_seed(seed)

    def r():
        return [torch.randn(N, generator=gen) for _ in range(n)]

    return dict(
        weights=r(),
        grads=r(),
        emas=r(),
        saved=r(),
        sq=torch.tensor([4.0]),
        rho=[0.05] * n,
        adaptive=[0, 1, 0][:n],
        decay=[0.9] * n,
        gain=[0.1] * n,
        swap=[0, 1, 0][:n],
        sigma=1.0,
        eps=1e-12,
        paper=False,
    )


def _rows(a):
    """The per-tensor values as the ops take them (helpers.cpp_rows), from the lists."""
    if a.get("rows_override") is not None:
        return a["rows_override"]
    return cpp_rows(a["adaptive"], a["decay"], a["gain"], a["rho"])


def _scalars(a):
    if a.get("scalars_override") is not None:
        return a["scalars_override"]
    return cpp_scalars(a["sigma"], a["eps"])


def _norm_sq(ops, a):
    return ops.norm_sq(a["weights"], a["grads"], a["emas"], _rows(a), _scalars(a), a["paper"])


def _perturb(ops, a):
    ops.perturb_(
        a["weights"],
        a["grads"],
        a["emas"],
        a["saved"],
        a["sq"],
        _rows(a),
        _scalars(a),
        a["swap"],
        a["paper"],
    )


def _restore(ops, a):
    ops.restore_(a["weights"], a["saved"])


CALLS = {"norm_sq": _norm_sq, "perturb_": _perturb, "restore_": _restore}


def _tensors(a):
    out = []
    for k in ("weights", "grads", "emas", "saved", "sq"):
        v = a[k]
        out += [v] if isinstance(v, torch.Tensor) else list(v)
    return out


def _bits(t):
    return t.detach().clone().view(torch.int32)  # float32: NaN-safe, bit for bit


def _rejects(ops, op, a, match):
    """The op raises `match` and leaves every tensor argument's bits as they were."""
    before = [_bits(t) for t in _tensors(a)]
    with pytest.raises(RuntimeError, match=match):
        CALLS[op](ops, a)
    after = [_bits(t) for t in _tensors(a)]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a tensor was modified"


# ------------------------------------------------------------------ 1. scalars

NAN, INF = float("nan"), float("inf")


def _set(key, value, i=None):
    def f(a):
        if i is None:
            a[key] = value
        else:
            a[key] = list(a[key])
            a[key][i] = value

    return f


@pytest.mark.parametrize(
    "op,bad,match",
    [
        ("perturb_", _set("sigma", NAN), r"sigma must be finite \(in float32\), got nan"),
        ("perturb_", _set("sigma", INF), "sigma must be finite"),
        ("perturb_", _set("sigma", 1e300), "sigma must be finite"),  # inf once in float32
        ("norm_sq", _set("sigma", NAN), "sigma must be finite"),
        ("norm_sq", _set("sigma", -INF), "sigma must be finite"),
        ("perturb_", _set("eps", NAN), "eps must be finite"),
        ("perturb_", _set("eps", INF), "eps must be finite"),
        ("perturb_", _set("eps", 0.0), r"eps must be > 0 \(in float32\), got 0"),
        ("perturb_", _set("eps", -1e-12), "eps must be > 0"),
        ("perturb_", _set("eps", 1e-60), "eps must be > 0"),  # 0 once in float32
        ("perturb_", _set("rho", NAN, 1), r"rho\[1\] must be finite \(in float32\) and >= 0"),
        ("perturb_", _set("rho", INF, 2), r"rho\[2\] must be finite"),
        (
            "perturb_",
            _set("rho", -0.05, 0),
            r"rho\[0\] must be finite \(in float32\) and >= 0, "
            r"got -0.05",
        ),
        ("perturb_", _set("decay", NAN, 2), r"decay\[2\] must be finite \(in float32\), got nan"),
        ("perturb_", _set("decay", -INF, 0), r"decay\[0\] must be finite"),
        ("norm_sq", _set("decay", INF, 1), r"decay\[1\] must be finite"),
        ("perturb_", _set("gain", NAN, 1), r"gain\[1\] must be finite"),
        ("norm_sq", _set("gain", NAN, 0), r"gain\[0\] must be finite"),
        ("norm_sq", _set("gain", 1e39, 2), r"gain\[2\] must be finite"),  # > float32 max
    ],
)
def test_non_finite_or_out_of_range_scalars_are_rejected(ops, op, bad, match):
    a = _args()
    bad(a)
    _rejects(ops, op, a, "fsam_fused: " + match)


def _values(rows=None, scalars=None):
    """Replaces the values the calls build (helpers.cpp_rows, cpp_scalars) with bad ones."""

    def f(a):
        a["rows_override"], a["scalars_override"] = rows, scalars

    return f


@pytest.mark.parametrize(
    "op,bad,match",
    [
        ("perturb_", _set("adaptive", 0.5, 1), r"adaptive\[1\] must be 0 or 1, got 0.5"),
        ("norm_sq", _set("adaptive", 2, 0), r"adaptive\[0\] must be 0 or 1"),
        ("norm_sq", _set("adaptive", NAN, 2), r"adaptive\[2\] must be finite"),
        (
            "perturb_",
            _values(rows=torch.zeros(3, 4, dtype=torch.float64)),
            "rows must be a contiguous float32 CPU tensor",
        ),
        ("norm_sq", _values(rows=torch.zeros(4, 3).t()), "rows must be a contiguous"),
        ("perturb_", _values(rows=torch.zeros(3, 5)), r"rows must have shape \[3, 4\]"),
        ("norm_sq", _values(rows=torch.zeros(12)), r"rows must have shape \[3, 4\]"),
        ("perturb_", _values(scalars=torch.ones(3)), r"scalars must have shape \[2\]"),
        ("norm_sq", _values(scalars=torch.ones(2, dtype=torch.bfloat16)), "scalars must be a"),
        (
            "perturb_",
            _values(scalars=torch.ones(2, requires_grad=True)),
            "scalars must not require grad",
        ),
    ],
)
def test_bad_value_tensors_are_rejected(ops, op, bad, match):
    a = _args()
    bad(a)
    _rejects(ops, op, a, "fsam_fused: " + match)


def test_scalars_at_the_edge_are_accepted(ops):
    """rho = 0 (no step), the smallest eps that is positive in float32, negative decay."""
    a = _args()
    a.update(rho=[0.0, -0.0, 0.1], eps=1e-45, decay=[-0.5, 0.0, 0.9])
    _perturb(ops, a)


# ------------------------------------------------------------------ 2. aliasing


def _share(a, x, i, y, j, shift):
    """Make a[x][i] and a[y][j] views of one buffer, the second starting `shift` elements
    after the first (shift < N: they overlap; shift == N: they only touch)."""
    buf = torch.randn(N + shift)
    a[x] = list(a[x])
    a[y] = list(a[y])
    a[x][i] = buf[:N]
    a[y][j] = buf[shift : shift + N]


def _same(x, i, y, j):
    def f(a):
        a[y] = list(a[y])
        a[y][j] = a[x][i]

    return f


def _overlap(x, i, y, j, shift=N - 1):
    return lambda a: _share(a, x, i, y, j, shift)


def _sq_in(x, i):
    def f(a):
        a["sq"] = a[x][i][7:8]

    return f


ALIASED = [
    # perturb_ writes weights, emas and saved
    ("perturb_", _same("weights", 1, "saved", 1), r"weights\[1\] overlaps saved\[1\]"),
    ("perturb_", _same("weights", 0, "saved", 2), r"weights\[0\] overlaps saved\[2\]"),
    ("perturb_", _overlap("weights", 1, "saved", 1), r"weights\[1\] overlaps saved\[1\]"),
    ("perturb_", _overlap("saved", 0, "weights", 0, 1), r"weights\[0\] overlaps saved\[0\]"),
    ("perturb_", _same("emas", 0, "grads", 0), r"emas\[0\] overlaps grads\[0\]"),
    ("perturb_", _overlap("grads", 2, "emas", 2, 150), r"emas\[2\] overlaps grads\[2\]"),
    ("perturb_", _same("weights", 0, "weights", 2), r"weights\[0\] overlaps weights\[2\]"),
    ("perturb_", _overlap("weights", 0, "weights", 1), r"weights\[0\] overlaps weights\[1\]"),
    ("perturb_", _same("weights", 1, "grads", 1), r"weights\[1\] overlaps grads\[1\]"),
    ("perturb_", _overlap("emas", 1, "weights", 0, 10), r"weights\[0\] overlaps emas\[1\]"),
    ("perturb_", _overlap("emas", 1, "saved", 2), r"emas\[1\] overlaps saved\[2\]"),
    ("perturb_", _same("emas", 0, "emas", 1), r"emas\[0\] overlaps emas\[1\]"),
    ("perturb_", _same("saved", 2, "saved", 0), r"saved\[0\] overlaps saved\[2\]"),
    ("perturb_", _sq_in("weights", 2), r"weights\[2\] overlaps sq\[0\]"),
    ("perturb_", _sq_in("saved", 0), r"saved\[0\] overlaps sq\[0\]"),
    # restore_ writes the weights
    ("restore_", _same("weights", 0, "weights", 1), r"weights\[0\] overlaps weights\[1\]"),
    ("restore_", _same("weights", 2, "saved", 2), r"weights\[2\] overlaps saved\[2\]"),
    ("restore_", _overlap("saved", 1, "weights", 0, 5), r"weights\[0\] overlaps saved\[1\]"),
]


@pytest.mark.parametrize(
    "op,bad,match", ALIASED, ids=[m.replace("\\", "") + "-" + op for op, _, m in ALIASED]
)
def test_written_tensors_overlapping_another_argument_are_rejected(ops, op, bad, match):
    a = _args()
    bad(a)
    _rejects(
        ops,
        op,
        a,
        "fsam_fused: " + match + " in memory; a tensor the op writes must "
        "not share memory with any other tensor argument",
    )


@pytest.mark.parametrize(
    "op,share",
    [
        ("perturb_", _same("grads", 0, "grads", 2)),  # one gradient read twice
        ("perturb_", _overlap("grads", 0, "grads", 1, 100)),  # read-only tensors may overlap
        ("perturb_", _overlap("weights", 0, "weights", 1, N)),  # views that only touch
        ("perturb_", _overlap("emas", 2, "saved", 1, N)),
        ("restore_", _same("saved", 0, "saved", 1)),  # one saved copy restored twice
    ],
    ids=[
        "same-grad-twice",
        "grads-overlap",
        "weights-touch",
        "ema-saved-touch",
        "same-saved-twice",
    ],
)
def test_overlapping_inputs_and_touching_outputs_are_accepted(ops, op, share):
    """And compute what they would on separate copies."""
    a = _args()
    share(a)
    b = {
        k: (
            [t.clone() for t in v]
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
            else v
        )
        for k, v in a.items()
    }
    b["sq"] = a["sq"].clone()
    CALLS[op](ops, b)  # separate tensors first (a's views are still untouched) ...
    CALLS[op](ops, a)
    for k in ("weights", "emas", "saved"):
        for x, y in zip(a[k], b[k]):
            assert torch.equal(_bits(x), _bits(y)), k


# ------------------------------------------------------------------ 3. meta tensors


@pytest.mark.parametrize("op", list(CALLS))
def test_real_meta_tensors_are_rejected(ops, op):
    a = _args()
    for k in ("weights", "grads", "emas", "saved"):
        a[k] = [t.to("meta") for t in a[k]]
    a["sq"] = a["sq"].to("meta")
    with pytest.raises(RuntimeError, match=rf"fsam_fused: {op}: weights\[0\] is a meta tensor"):
        CALLS[op](ops, a)


@pytest.mark.parametrize("op", list(CALLS))
def test_fake_tensors_still_trace(ops, op):
    """FakeTensorMode (what torch.compile and opcheck use) still runs the fake kernels,
    also on fakes of meta tensors; and nothing real is touched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _args()
    before = [_bits(t) for t in _tensors(real)]
    for device in ("cpu", "meta"):
        mode = FakeTensorMode()
        a = dict(real)
        for k in ("weights", "grads", "emas", "saved"):
            a[k] = [mode.from_tensor(t.to(device)) for t in real[k]]
        a["sq"] = mode.from_tensor(real["sq"].to(device))
        with mode:
            out = CALLS[op](ops, a)
            if op == "norm_sq":
                assert out.shape == (1,) and out.dtype == torch.float32
    assert all(torch.equal(x, _bits(y)) for x, y in zip(before, _tensors(real)))


# ------------------------------------------------------------------ 4. requires_grad


@pytest.mark.parametrize(
    "op,key,i",
    [
        ("perturb_", "weights", 0),
        ("perturb_", "weights", 1),
        ("perturb_", "emas", 2),
        ("perturb_", "saved", 1),
        ("restore_", "weights", 2),
    ],
)
def test_written_tensors_that_require_grad_are_rejected(ops, op, key, i):
    a = _args()
    a[key][i].requires_grad_()
    _rejects(
        ops,
        op,
        a,
        rf"fsam_fused: {key}\[{i}\] requires grad; the op writes it in place "
        "behind autograd's back",
    )


def test_read_only_tensors_may_require_grad(ops):
    """Gradients taken with create_graph=True, and the weights norm_sq only reads."""
    a = _args()
    for t in a["grads"] + a["weights"]:
        t.requires_grad_()
    _norm_sq(ops, a)
    for t in a["weights"]:
        t.requires_grad_(False)
    _perturb(ops, a)
    a["saved"][0].requires_grad_()
    _restore(ops, a)


@pytest.mark.parametrize("fixed", [False, True], ids=["double-buffer", "fixed-addresses"])
def test_backend_passes_detached_aliases(ops, fixed):
    """The optimizer's parameters require grad, which the ops refuse: CppBackend hands them
    detached aliases (taken once per plan), and the double buffer still swaps and restores."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5, 64, 3)]
    opt = FSAM(ps, torch.optim.SGD, rho=0.1, lr=0.0, backend="cpp", fixed_addresses=fixed)
    w0 = [p.detach().clone() for p in ps]
    homes = [p.data_ptr() for p in ps]
    for _step in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.first_step()
        assert [s.backend for s in opt.plan_summary()] == ["cpp"]
        moved = [p.data_ptr() != h for p, h in zip(ps, homes)]
        assert all(moved) if not fixed else not any(moved)
        assert not any(torch.equal(p, w) for p, w in zip(ps, w0))  # perturbed
        opt.second_step()
        assert [p.data_ptr() for p in ps] == homes
        assert all(torch.equal(_bits(p), _bits(w)) for p, w in zip(ps, w0))  # lr = 0
        assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in ps)
    assert math.isfinite(sum(float(p.detach().sum()) for p in ps))
