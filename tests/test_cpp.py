"""The C++ CPU backend: its ops (opcheck, errors, determinism), the shapes that break
multi-tensor kernels and the double-buffered perturbation (the build on first use:
test_cpp_build.py).

The whole equivalence matrix of the other test files also runs against "cpp" (double-buffered,
the default) and "cpp-fixed" (the exact-copy path). Output buffers are poisoned with NaN
before the ops run, so an element they fail to write shows up."""

import pytest
import torch

from fsam_fused import FSAM
from fsam_fused.backends import cpp as cpp_backend
from helpers import backend_available, check_against_reference
from helpers import cpp_rows as _rows
from helpers import cpp_scalars as _sc

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture
def ops():
    backend_available("cpp", "cpu")
    return torch.ops.fsam_fused


def _check_against_reference(make_params, dtype, backend, **kw):
    backend_available(backend, "cpu")
    return check_against_reference(make_params, dtype, backend, **kw)


@pytest.mark.parametrize("backend", ["cpp", "cpp-fixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_awkward_sizes_across_chunks(dtype, backend):
    # 65,539 is prime: three work chunks of 32,768 and an odd tail; the small ones are shorter
    # than one vector step (16) or end mid-step.
    sizes = [1, 3, 15, 17, 1025, 65_539]

    def make():
        torch.manual_seed(1)
        return [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]

    _check_against_reference(make, dtype, backend, adaptive=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_swapped_and_copied_tensors_in_one_bucket(dtype, monkeypatch):
    """One op call, both kinds: tensors from 1,000 elements on double-buffered, the rest
    copied."""
    monkeypatch.setattr(cpp_backend, "SWAP_MIN_NUMEL", 1000)
    sizes = [1, 3, 999, 1000, 17, 65_539]

    def make():
        torch.manual_seed(6)
        return [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]

    opt = _check_against_reference(make, dtype, "cpp", adaptive=True)
    (bucket,) = opt.plan_summary()
    assert bucket.double_buffered == (False, False, False, True, False, True)


@pytest.mark.parametrize("backend", ["cpp", "cpp-fixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_many_tiny_tensors_beside_a_large_one(dtype, backend):
    def make():
        torch.manual_seed(2)
        shapes = [(int(n),) for n in torch.randint(1, 20, (500,))] + [(300, 1001)]
        return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]

    _check_against_reference(make, dtype, backend, steps=2)


def _flat_views():
    """Parameters that view one flat buffer at odd offsets (unaligned, not owning storage)."""
    torch.manual_seed(3)
    storage = torch.randn(5000)
    return storage, [
        torch.nn.Parameter(storage[1 : 1 + 777]),
        torch.nn.Parameter(storage[901:4000]),
    ]


def test_views_of_a_flat_buffer_keep_their_addresses_and_stay_exact():
    """Double-buffering would desynchronise the flat buffer: such parameters are copied
    instead, and unaligned addresses take the plain stores."""
    _check_against_reference(lambda: _flat_views()[1], torch.float32, "cpp")
    flat, ps = _flat_views()
    opt = FSAM(ps, torch.optim.SGD, backend="cpp", lr=0.1)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.first_step()  # creates the EMA, so the next step builds the plan it keeps
    opt.second_step()
    for p in ps:  # fresh gradients: with the same ones, d = g - m would be zero
        p.grad = torch.randn_like(p)
    before = flat.clone()
    opt.first_step()
    assert not any(opt.plan_summary()[0].double_buffered)
    assert not torch.equal(flat, before), "the flat buffer must see the perturbation"
    assert ps[0].data_ptr() == flat.data_ptr() + 4
    opt.second_step()
    outside = torch.ones(5000, dtype=torch.bool)
    outside[1:778] = outside[901:4000] = False  # the kernels write only inside the views
    assert torch.equal(flat[outside], before[outside])


@pytest.mark.parametrize("fixed", [False, True])
def test_double_buffer_swaps_storage_only_during_the_step(fixed, monkeypatch):
    """Only parameters from SWAP_MIN_NUMEL elements on are swapped (the default threshold
    here, not the tests' 1); none with fixed_addresses."""
    backend_available("cpp", "cpu")
    monkeypatch.setattr(cpp_backend, "SWAP_MIN_NUMEL", 4096)
    torch.manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (10, 4095, 4096, 30_000)]
    opt = FSAM(ps, torch.optim.SGD, backend="cpp", fixed_addresses=fixed, lr=0.1)
    home = [p.data_ptr() for p in ps]
    want_moved = [False, False, not fixed, not fixed]
    for _step in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        w = [p.detach().clone() for p in ps]
        opt.first_step()
        moved = [p.data_ptr() != h for p, h in zip(ps, home)]
        assert moved == want_moved
        assert all(not torch.equal(p, x) for p, x in zip(ps, w)), "not perturbed"
        opt.second_step()  # base SGD steps on the restored, home storage
        assert [p.data_ptr() for p in ps] == home
        for p, x in zip(ps, w):
            assert torch.equal(p.detach(), torch.add(x, p.grad, alpha=-0.1))


def test_closure_error_restores_the_home_storage():
    backend_available("cpp", "cpu")
    ps = [torch.nn.Parameter(torch.randn(100))]  # double-buffered (the tests' threshold: 1)
    ps[0].grad = torch.randn(100)
    opt = FSAM(ps, torch.optim.SGD, backend="cpp", lr=0.1)
    home, w = ps[0].data_ptr(), ps[0].detach().clone()

    def closure():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert ps[0].data_ptr() == home and torch.equal(ps[0].detach(), w)


def test_channels_last_weights():
    def make():
        torch.manual_seed(5)
        return [
            torch.nn.Parameter(
                torch.randn(4, 3, 5, 7).contiguous(memory_format=torch.channels_last)
            ),
            torch.nn.Parameter(torch.randn(9)),
        ]

    backend_available("cpp", "cpu")
    ps, ref = make(), make()
    opt = FSAM(ps, torch.optim.SGD, backend="cpp", lr=0.1)
    opt_r = FSAM(ref, torch.optim.SGD, backend="reference", lr=0.1)
    for _ in range(3):
        for p, r in zip(ps, ref):
            g = (
                torch.randn(p.shape).contiguous(memory_format=torch.channels_last)
                if p.dim() == 4
                else torch.randn(p.shape)
            )
            p.grad, r.grad = g, g.clone()
        for o in (opt, opt_r):
            o.first_step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        for o in (opt, opt_r):
            o.second_step(zero_grad=True)
    assert [b.backend for b in opt.plan_summary()] == ["cpp"]
    assert ps[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "dtype,want",
    [
        (torch.float32, "cpp"),
        (torch.bfloat16, "cpp"),
        (torch.float16, "cpp"),
        (torch.float64, "foreach"),
    ],
)
def test_auto_picks_cpp_for_what_it_supports(dtype, want):
    backend_available("cpp", "cpu")
    p = torch.nn.Parameter(torch.randn(50, dtype=dtype))
    p.grad = torch.randn_like(p)
    opt = FSAM([p], torch.optim.SGD, lr=0.1)
    for _ in range(2):  # the first step creates the EMA; the second keeps its plan
        opt.first_step()
        opt.second_step()
    assert [b.backend for b in opt.plan_summary()] == [want]
    assert opt.backend_for(p) == want


def test_explicit_cpp_rejects_what_it_cannot_run():
    backend_available("cpp", "cpu")
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    w = p.detach().clone()
    with pytest.raises(ValueError, match="float64"):
        FSAM([p], torch.optim.SGD, lr=0.1, backend="cpp").first_step()
    assert torch.equal(p.detach(), w)
    with pytest.raises(TypeError, match="fixed_addresses"):
        FSAM([p], torch.optim.SGD, lr=0.1, fixed_addresses=1)


# ------------------------------------------------------------------ the ops themselves


def _op_args(dtype=torch.float32, sizes=(5, 40_000, 33), adaptive=(0, 1, 0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    gs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    ms = [torch.randn(n, generator=gen) for n in sizes]
    n = len(sizes)
    return ws, gs, ms, list(adaptive), [0.9] * n, [0.1] * n, [0.05, 0.1, 0.2][:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(ops, dtype):
    """Schemas (mutations declared), fake implementations and autograd registration are
    consistent, so torch.compile can trace the ops."""
    ws, gs, ms, ad, dec, gain, rho = _op_args(dtype)
    sq = ops.norm_sq(ws, gs, ms, _rows(ad, dec, gain), _sc(1.0), False)
    saved = [torch.empty_like(w) for w in ws]
    cases = [
        (ops.norm_sq.default, (ws, gs, ms, _rows(ad, dec, gain), _sc(1.0), True)),
        (
            ops.perturb_.default,
            (ws, gs, ms, saved, sq, _rows(ad, dec, gain, rho), _sc(1.0, 1e-12), [0, 0, 0], False),
        ),
        (
            ops.perturb_.default,
            (ws, gs, ms, saved, sq, _rows(ad, dec, gain, rho), _sc(0.5, 1e-12), [1, 0, 1], True),
        ),
        (ops.restore_.default, (ws, saved)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_norm_is_deterministic_and_independent_of_thread_count(ops):
    ws, gs, ms, ad, dec, gain, _ = _op_args(sizes=(3, 200_001, 70_000, 1), adaptive=(0, 1, 0, 1))
    threads = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got[n] = [
                ops.norm_sq(ws, gs, ms, _rows(ad, dec, gain), _sc(0.7), paper).item()
                for paper in (False, True)
            ]
    finally:
        torch.set_num_threads(threads)
    assert got[1] == got[2] == got[3]
    # ... and it is the right number: float64 from the statement.
    d = [g.double() - 0.7 * m.double() for g, m in zip(gs, ms)]
    want = sum(
        ((w.double().abs() if a else 1.0) * x).pow(2).sum().item() for w, x, a in zip(ws, d, ad)
    )
    assert abs(got[1][0] - want) <= 1e-6 * want


def test_restore_and_double_buffer_are_bit_exact(ops):
    """perturb_ saves the stored bits and restore_ gives them back; a swapped tensor keeps
    its weights untouched and gets the same w + e in its spare buffer that the copy path
    writes in place, and the same EMA."""
    for dtype in DTYPES:
        ws, gs, ms, ad, dec, gain, rho = _op_args(dtype)
        ws[1][7] = float("nan")  # bits that a round trip through arithmetic would not keep
        w0 = [w.clone() for w in ws]
        m_copy = [m.clone() for m in ms]
        sq = torch.tensor([4.0])
        spare = [torch.full_like(w, float("nan")) for w in ws]
        ops.perturb_(
            ws, gs, m_copy, spare, sq, _rows(ad, dec, gain, rho), _sc(1.0, 1e-12), [1, 1, 1], False
        )
        assert all(torch.equal(w.view(torch.int8), x.view(torch.int8)) for w, x in zip(ws, w0))
        saved = [torch.full_like(w, float("nan")) for w in ws]
        ops.perturb_(
            ws, gs, ms, saved, sq, _rows(ad, dec, gain, rho), _sc(1.0, 1e-12), [0, 0, 0], False
        )
        for _w, s, x, a, b in zip(ws, saved, w0, ms, m_copy):
            assert torch.equal(s.view(torch.int8), x.view(torch.int8))
            assert torch.equal(a, b)
        for w, s in zip(ws, spare):
            mask = ~w.isnan()
            assert torch.equal(w[mask], s[mask]) and not torch.equal(w[mask], s[mask] * 0)
        ops.restore_(ws, saved)
        assert all(torch.equal(w.view(torch.int8), x.view(torch.int8)) for w, x in zip(ws, w0))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: a.update(gs=a["gs"][:2]), "grads has 2 tensors"),
        (
            lambda a: a.update(gs=[g.double() for g in a["gs"]]),
            "grads must have the weights' dtype",
        ),
        (lambda a: a.update(ms=[m[:-1] for m in a["ms"]]), r"emas\[0\] has sizes"),
        (
            lambda a: a.update(ws=[w.double() for w in a["ws"]], gs=[g.double() for g in a["gs"]]),
            "weights must be float32",
        ),
        (lambda a: a.update(ad=a["ad"][:1]), r"rows must have shape \[3, 4\]"),
        (lambda a: a.update(swap=[1]), "swap has 1 entries"),
        (
            lambda a: a.update(
                ws=[w[::2] for w in a["ws"]],
                gs=[g[::2] for g in a["gs"]],
                ms=[m[::2] for m in a["ms"]],
            ),
            "must be dense",
        ),
    ],
)
def test_ops_reject_bad_arguments_before_writing(ops, bad, match):
    ws, gs, ms, ad, dec, gain, rho = _op_args()
    a = dict(ws=ws, gs=gs, ms=ms, ad=ad, swap=[0, 1, 0])
    bad(a)
    w0 = [w.clone() for w in a["ws"]]
    m0 = [m.clone() for m in a["ms"]]
    saved = [torch.empty_like(w) for w in a["ws"]]
    if "swap" not in match:  # norm_sq has no swap flags
        with pytest.raises(RuntimeError, match=match):
            ops.norm_sq(a["ws"], a["gs"], a["ms"], _rows(a["ad"], dec, gain), _sc(1.0), False)
    with pytest.raises(RuntimeError, match=match):
        ops.perturb_(
            a["ws"],
            a["gs"],
            a["ms"],
            saved,
            torch.ones(1),
            _rows(a["ad"], dec, gain, rho),
            _sc(1.0, 1e-12),
            a["swap"],
            False,
        )
    assert all(torch.equal(w, x) for w, x in zip(a["ws"], w0))
    assert all(torch.equal(m, x) for m, x in zip(a["ms"], m0))


# ------------------------------------------------------------------ the direct bindings


def test_direct_bindings_match_the_dispatcher_bit_for_bit(ops):
    """The wrappers' eager path (pybind bindings calling the kernels) and torch.ops give the
    same bits, raise the same errors, and leave the same version counters."""
    from fsam_fused.ops import cpp as cpp_ops

    assert cpp_ops._eager()
    results = []
    for path in ("direct", "dispatcher"):
        ws, gs, ms, ad, dec, gain, rho = _op_args(seed=3)
        saved = [torch.full_like(w, float("nan")) for w in ws]
        rows, sc = _rows(ad, dec, gain, rho), _sc(0.7, 1e-12)
        call = cpp_ops if path == "direct" else ops
        sq = call.norm_sq(ws, gs, ms, rows, sc, False)
        v0 = [t._version for t in ws + ms + saved]
        call.perturb_(ws, gs, ms, saved, sq, rows, sc, [0, 1, 0], False)
        bumps = [t._version - v for t, v in zip(ws + ms + saved, v0)]
        perturbed = [t.clone() for t in ws + ms + saved]
        call.restore_([ws[0], ws[2]], [saved[0], saved[2]])
        with pytest.raises(RuntimeError, match=r"^fsam_fused: saved has 1 tensors, weights has 2$"):
            call.restore_(ws[:2], saved[:1])
        results.append((sq, bumps, perturbed, [w.clone() for w in ws]))
    (sq1, b1, p1, w1), (sq2, b2, p2, w2) = results
    assert torch.equal(sq1, sq2) and b1 == b2
    for x, y in zip(p1 + w1, p2 + w2):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_direct_bindings_defer_to_dispatch_modes(ops):
    """Under a TorchDispatchMode (what FakeTensor, tracing and profilers use) the wrappers'
    calls go through the dispatcher, so the mode sees them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fsam_fused.ops import cpp as cpp_ops

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ws, gs, ms, ad, dec, gain, rho = _op_args()
    with Log():
        cpp_ops.norm_sq(ws, gs, ms, _rows(ad, dec, gain), _sc(1.0), False)
        cpp_ops.restore_(ws, [w.clone() for w in ws])
    assert "fsam_fused.norm_sq.default" in seen and "fsam_fused.restore_.default" in seen
