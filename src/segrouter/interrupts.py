"""SIGTERM and SIGINT (``kill``, SLURM pre-emption, ``docker stop``, Ctrl-C) end a command with one line and the
exit code a shell gives a process killed by the signal (128 + its number: 143, 130), never 0.

Left to Lightning, SIGTERM stops training and exits 0 (a sweep records a success), and Ctrl-C prints a banner
and exits 1, or a traceback during start-up. :func:`raising` turns either signal into :class:`Interrupted`
for the whole command; while a ``fit`` trains, :class:`Deferred` only notes the signal, so that training
stops at the next step boundary after saving a resumable ``last.ckpt``
(:class:`segrouter.training.trainer.StopOnSignal`): an exception raised mid-step could leave the weights
half-updated.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The command was stopped by a signal. A ``BaseException``, as ``KeyboardInterrupt`` is: code that catches
    ``Exception`` must not swallow it. ``str()`` is the one line the CLI prints."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f"; {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Set ``handler`` for SIGINT and SIGTERM; return the previous handlers (none off the main thread, where
    Python does not allow signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def raising() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` where the program is."""
    previous = _install(_raise)
    try:
        yield
    finally:
        _restore(previous)


class Deferred:
    """Notes SIGINT/SIGTERM (the first one received) instead of raising: the code that installed it decides
    where it is safe to stop. ``on_signal`` runs at each signal, e.g. to pass it on to a child process."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def install(self) -> dict[int, Any]:
        return _install(self)


@contextmanager
def deferred(on_signal: Callable[[int], None] | None = None) -> Iterator[Deferred]:
    """Within the block, SIGINT and SIGTERM are only noted in the yielded :class:`Deferred`."""
    notes = Deferred(on_signal)
    previous = notes.install()
    try:
        yield notes
    finally:
        _restore(previous)
