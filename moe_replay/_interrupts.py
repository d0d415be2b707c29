"""Ctrl-C (``SIGINT``) held across the few bytecodes where a ``KeyboardInterrupt`` would leave state half-made.

A notebook's interrupt lands between any two bytecodes. Where a change and the ``try`` that undoes it cannot be
one bytecode (a count raised before the ``try`` that lowers it, a flag set on every router, a torch function
mode pushed before the ``with`` that pops it is in place), the signal is noted while the change is made and
handed to the handler that was there before (Python's raises ``KeyboardInterrupt``) once the undoing is in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


def _nothing() -> None:
    """The release of a hold that held nothing."""


def hold_interrupts() -> Callable[[], None]:
    """Note a ``SIGINT`` from now on instead of raising it; the callable returned puts the handler back and hands
    it a noted signal (raising ``KeyboardInterrupt`` there, with Python's handler). Call it where the undoing is in
    place (inside the ``try``); calling it again does nothing. Outside the main thread (no signal is delivered there)
    and where ``SIGINT`` is ignored or left to the system, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # (SIG_IGN, SIG_DFL, or a handler not installed from Python)
        return _nothing
    caught: list[tuple[int, Any]] = []
    done: list[bool] = []

    def note(signum: int, frame: Any) -> None:
        caught.append((signum, frame))

    try:
        signal.signal(signal.SIGINT, note)
    except (ValueError, OSError):  # (an interpreter other than the main one may not set handlers)
        return _nothing

    def release() -> None:
        if done:
            return
        done.append(True)
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(*caught[0])

    return release


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a ``SIGINT`` that arrives inside the block, and hand it on once the block is over, whether it ends
    normally or by an exception (see :func:`hold_interrupts`)."""
    release = hold_interrupts()
    try:
        yield
    finally:
        release()
