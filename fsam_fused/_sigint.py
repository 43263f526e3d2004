"""SIGINT held back while a step writes or restores its buckets, then handed on.

A Ctrl-C (or ``_thread.interrupt_main``) that lands between two buckets' writes would leave
some weights perturbed and others not. While the hold is active the interrupt is only
recorded; :meth:`Held.deliver` then runs the handler it was meant for, once the weights are
consistent again (the engine restores them first if that handler raises).
"""

from __future__ import annotations

# The C-level signal functions: the `signal` module's Python wrappers convert enums on every
# call, which costs more than the rest of the hold (measured 6 us against 0.4 us a step).
import _signal
import os
import threading

_SIGINT = 2 if not hasattr(_signal, "SIGINT") else _signal.SIGINT


class Held:
    """``with held: ...`` then ``held.deliver()``. Main thread only (Python runs signal
    handlers there alone); in any other thread it holds nothing."""

    __slots__ = ("prev", "caught")

    def __init__(self):
        self.prev, self.caught = None, None

    def __enter__(self):
        self.caught = None
        self.prev = None
        if threading.current_thread() is threading.main_thread():
            try:
                self.prev = _signal.signal(_SIGINT, self._catch)
            except (ValueError, TypeError):  # no signal module support here
                self.prev = None
        return self

    def _catch(self, signum, frame):
        self.caught = (signum, frame)

    def __exit__(self, *exc):
        if self.prev is not None:
            _signal.signal(_SIGINT, self.prev)
        return False

    def deliver(self) -> None:
        """Run the handler the interrupt was meant for: the default raises
        KeyboardInterrupt, a user's may only set a flag, an ignored SIGINT stays ignored, and
        SIG_DFL ends the process as it would have."""
        if self.caught is None:
            return
        caught, self.caught = self.caught, None
        if callable(self.prev):
            self.prev(*caught)
        elif self.prev == _signal.SIG_DFL:
            os.kill(os.getpid(), _SIGINT)
