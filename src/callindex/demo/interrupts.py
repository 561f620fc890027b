"""Ctrl-C in the demo: the parent process handles it, the workers never see it.

A terminal sends SIGINT to its whole foreground process group, the workers
included. A spawned worker can get it while it still imports its modules,
before any code of its own could ignore it, and would print a traceback. So
the parent blocks SIGINT while it starts the workers, which inherit the
blocked signal, and holds off its own ``KeyboardInterrupt`` while it starts
and stops them, so that none is left half started or running.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker
from types import FrameType


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold off Ctrl-C until the block is over, then raise ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        # Python raises KeyboardInterrupt in the main thread only.
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread: processes started in the block begin with it blocked."""
    # The resource tracker unblocks SIGINT when it starts: start it before.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
