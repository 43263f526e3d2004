"""Issue 14, item 3: stepping from a worker thread works (also after a step in the main
thread); one optimizer entered from two threads at once raises a clear error instead of
interleaving; two optimizers in two threads stay correct."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from fsam_fused import FSAM
from helpers import backend_available, opt_args

BACKENDS = ["reference", "foreach", "cpp", "cpp-fixed"]
JOIN = 60  # seconds: every join is bounded


def _in_thread(fn):
    """Run ``fn`` in a worker thread; return what it returned or re-raise what it raised."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(JOIN)
    assert not t.is_alive(), "the worker thread did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _trajectory(backend, where):
    """3 steps; ``where(i)``: run step i in a worker thread."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    opt = FSAM([w], torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, **opt_args(backend))
    gen = torch.Generator().manual_seed(1)
    for i in range(3):

        def step():
            w.grad = torch.randn(50, generator=gen)
            opt.first_step(zero_grad=True)
            w.grad = torch.randn(50, generator=gen)
            opt.second_step(zero_grad=True)

        _in_thread(step) if where(i) else step()
    return w.detach().clone(), opt.state[w]["ema"].clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_thread_after_main_thread(backend):
    backend_available(backend, "cpu")
    w_main, m_main = _trajectory(backend, lambda i: False)
    w_mix, m_mix = _trajectory(backend, lambda i: i % 2 == 1)  # main, worker, main
    assert torch.equal(w_mix, w_main) and torch.equal(m_mix, m_main)


class _Blocking(torch.optim.SGD):
    """SGD whose step waits (bounded) until released: a step held open in one thread."""

    entered = None
    release = None

    def step(self, closure=None):
        type(self).entered.set()
        assert type(self).release.wait(JOIN)
        return super().step(closure)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_thread_refused_while_stepping(backend):
    backend_available(backend, "cpu")
    _Blocking.entered, _Blocking.release = threading.Event(), threading.Event()
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40))
    twin = torch.nn.Parameter(w.detach().clone())
    opt = FSAM([w], _Blocking, rho=0.3, lr=0.1, **opt_args(backend))
    ref = FSAM([twin], torch.optim.SGD, rho=0.3, lr=0.1, **opt_args(backend))
    g1, g2 = torch.randn(40), torch.randn(40)
    twin.grad = g1.clone()
    ref.first_step()
    twin.grad = g2.clone()
    ref.second_step()

    def worker():
        w.grad = g1.clone()
        opt.first_step()
        w.grad = g2.clone()
        opt.second_step()  # blocks in the base step until released

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert _Blocking.entered.wait(JOIN)
        before = w.detach().clone()
        grad = w.grad
        w.grad = torch.randn(40)  # the main thread's own first pass
        with pytest.raises(RuntimeError, match="another thread is stepping"):
            opt.first_step()
        assert torch.equal(w, before)
        w.grad = grad
    finally:
        _Blocking.release.set()
        t.join(JOIN)
    assert not t.is_alive()
    assert torch.equal(w, twin) and torch.equal(opt.state[w]["ema"], ref.state[twin]["ema"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_one_optimizer_never_corrupt(backend):
    """A no-op base (lr 0): whatever the interleaving, every weight comes back exactly."""
    backend_available(backend, "cpu")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20000))
    w0 = w.detach().clone()
    opt = FSAM([w], torch.optim.SGD, rho=0.5, lr=0.0, **opt_args(backend))
    opt.check_stale_grads = False
    g = torch.randn(20000)
    errors = []

    def closure():
        w.grad = g.clone()

    def hammer():
        for _ in range(150):
            try:
                w.grad = g.clone()
                opt.step(closure)
            except RuntimeError as e:
                if "another thread" not in str(e):
                    errors.append(e)
            except BaseException as e:
                errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN * 2)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert not opt.perturbed
    assert torch.equal(w, w0), (w - w0).abs().max()


def test_two_optimizers_two_threads():
    def run(threaded):
        results = []

        def one(seed):
            torch.manual_seed(seed)
            w = torch.nn.Parameter(torch.randn(300))
            opt = FSAM([w], torch.optim.SGD, rho=0.2, lr=0.1, backend="foreach")
            gen = torch.Generator().manual_seed(seed)
            for _ in range(20):
                w.grad = torch.randn(300, generator=gen)
                opt.first_step(zero_grad=True)
                w.grad = torch.randn(300, generator=gen)
                opt.second_step(zero_grad=True)
            results.append((seed, w.detach().clone()))

        if threaded:
            ts = [threading.Thread(target=one, args=(s,)) for s in (1, 2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(JOIN)
            assert not any(t.is_alive() for t in ts)
        else:
            one(1)
            one(2)
        return dict(results)

    serial, threaded = run(False), run(True)
    assert all(torch.equal(serial[s], threaded[s]) for s in (1, 2))
