"""SIGTERM and SIGINT as requests to stop cleanly.

A cluster scheduler sends SIGTERM (SLURM, Kubernetes: then a grace period, then SIGKILL); a person
presses Ctrl-C (SIGINT). :func:`stop_requests` turns the first into a flag that long work polls at a
safe point (training: after the current update, writing its last checkpoint); a second one ends the
process at once by that signal, writing nothing more. :func:`term_as_interrupt` makes SIGTERM raise
:class:`Interrupted` as SIGINT raises ``KeyboardInterrupt``, so cleanup runs (``translate`` keeps
what it has written). The CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class Interrupted(BaseException):
    """Work stopped by a signal (a ``BaseException``, as ``KeyboardInterrupt``: no ``except
    Exception`` swallows it). ``exit_code`` is 128 + the signal number; ``message`` one line."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.exit_code = 128 + signum
        self.message = message or f"stopped by {signal.Signals(signum).name}"
        super().__init__(self.message)


@dataclass
class StopRequest:
    signum: int | None = None  # the first stop signal received, None while there was none

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While active, the first SIGTERM/SIGINT sets ``request.signum``; a second one kills the process
    by that signal at once. Outside the main thread (no signals caught there) the flag never rises."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, _frame: Any) -> None:
        if request.signum is None:
            request.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)  # a second signal: no more writing, die by it
        os.kill(os.getpid(), signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def term_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Interrupted` in the main thread (as SIGINT raises
    ``KeyboardInterrupt``), so ``finally`` blocks and error handlers run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM during cleanup ends the process
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
