"""Signals held back while a step writes or restores its buckets, then handed on.

A Ctrl-C, a timeout's SIGALRM or a scheduler's SIGTERM whose Python handler raises lands at
any bytecode of the main thread; between two writes of a step it would leave some weights
perturbed and others not, or a for-loop base optimizer stepped part-way. While a hold is
active such signals are only recorded; :meth:`Held.deliver` then runs the handlers they were
meant for, once the weights are consistent again (the caller restores them first if a
handler raises).
"""

from __future__ import annotations

# The C-level signal functions: the `signal` module's Python wrappers convert enums on every
# call, which costs more than the rest of the hold (measured 6 us against 0.4 us a step).
import _signal
import os
import signal
import threading
from itertools import compress

_SIGINT = 2 if not hasattr(_signal, "SIGINT") else _signal.SIGINT
_GETSIGNAL = _signal.getsignal
_PYTHON_HANDLER = callable  # SIG_DFL, SIG_IGN (ints) and None (set outside Python) are not
# Every standard signal a Python handler can be installed for (SIGKILL and SIGSTOP cannot be
# caught). The real-time signals (SIGRTMIN..SIGRTMAX: half the table) are left out: nothing
# uses them for timeouts or interrupts, and scanning them doubled the hold's cost (measured
# 2.2 us against 1.1 us a hold, on 2 holds a step).
_RT = range(getattr(signal, "SIGRTMIN", 1 << 30), getattr(signal, "SIGRTMAX", -1) + 1)
_CATCHABLE = tuple(
    int(s)
    for s in signal.valid_signals()
    if s not in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))
    and int(s) not in _RT
)


class Held:
    """Signals held back while a step writes or restores its buckets (main thread only),
    then handed to the handlers they were meant for.

    Every signal with a Python handler, not only SIGINT: a handler that raises
    (a SIGALRM or SIGTERM timeout, a job scheduler's) runs in the main thread at any
    bytecode, and inside the write region it would leave the weights half written. Python
    runs handlers only at bytecode boundaries of the main thread, whichever thread the OS
    delivered the signal to (so blocking it with pthread_sigmask would not do: another
    thread takes it); swapping the Python-level handler for a recorder is what holds it.
    SIGINT is swapped whatever its handler (SIG_DFL: the process is then ended by
    :meth:`deliver`, as it would have been). Cost: one C-level scan of the handler table
    (about 1-2 us a first_step, measured) and two ``signal.signal`` calls per signal that has a
    Python handler."""

    __slots__ = ("prev", "caught", "every")

    def __init__(self, every: bool = True):
        # every=False: SIGINT only (the restore: a signal that interrupts it leaves the step
        # in flight, and a restore can run again, so it need not pay for the scan)
        self.prev, self.caught, self.every = None, [], every

    def __enter__(self):
        # Forget an earlier step's handlers, or a step in a worker thread after one in the
        # main thread would call signal.signal (main thread only) on exit and raise.
        self.caught, self.prev = [], None
        if threading.current_thread() is threading.main_thread():
            prev = {}
            try:
                # (C-level iteration: the scan is most of the cost; SIGINT always)
                # Each handler is recorded before it is swapped: a handler that runs right
                # after a swap (CPython checks for signals when a builtin returns) and raises
                # must find it recorded, to be put back.
                if self.every:
                    # (the scan at C level: it is most of the cost)
                    handled = compress(
                        _CATCHABLE, map(_PYTHON_HANDLER, map(_GETSIGNAL, _CATCHABLE))
                    )
                    for s in list(handled):
                        prev[s] = _GETSIGNAL(s)
                        _signal.signal(s, self._catch)
                if _SIGINT not in prev:
                    h = _GETSIGNAL(_SIGINT)
                    if h is not None:
                        prev[_SIGINT] = h
                        _signal.signal(_SIGINT, self._catch)
                self.prev = prev
            except (ValueError, TypeError, OSError):  # no signal module support here
                self._put_back(prev)
            except BaseException:
                # A handler not swapped yet ran (at the loop's back-edge) and raised: the
                # ones swapped so far go back, or they would record signals for good.
                self._put_back(prev)
                raise
        return self

    def _catch(self, signum, frame):
        self.caught.append((signum, frame))

    @staticmethod
    def _put_back(prev) -> None:
        items = list((prev or {}).items())
        i = 0
        try:
            while i < len(items):
                _signal.signal(*items[i])
                i += 1
        except BaseException:
            # A handler put back already ran and raised: the others go back all the same.
            for s, h in items[i:]:
                _signal.signal(s, h)
            raise

    def __exit__(self, exc_type, *exc):
        self._put_back(self.prev)
        if exc_type is not None and self.caught:
            # The block failed (and rolled back): the signals it held are not lost but
            # raised again, for their own handlers to run next, as Python would have.
            caught, self.caught = self.caught, []
            for signum, _ in caught:
                _signal.raise_signal(signum)
        return False

    def deliver(self) -> None:
        """Run the handlers the signals were meant for, in arrival order: the default SIGINT
        handler raises KeyboardInterrupt, a user's may only set a flag or raise, an ignored
        one stays ignored, and SIGINT's SIG_DFL ends the process as it would have. If one
        raises, the signals after it are raised again (their handlers are back in place, so
        Python runs them next, as it would have) and the exception propagates."""
        caught, prev = self.caught, self.prev or {}
        self.caught = []
        for i, (signum, frame) in enumerate(caught):
            h = prev.get(signum)
            try:
                if callable(h):
                    h(signum, frame)
                elif signum == _SIGINT and h == _signal.SIG_DFL:
                    os.kill(os.getpid(), _SIGINT)
            except BaseException:
                for later, _ in caught[i + 1 :]:
                    _signal.raise_signal(later)
                raise
