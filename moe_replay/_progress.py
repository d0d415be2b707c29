"""A progress bar for the library's own long work.

It is drawn over the routers ``verify()`` establishes, the decode steps of the reference models'
``generate()``, the sequences :func:`~moe_replay.split_generation` and the verl converters go
through, and the command line's ``demo`` and ``inspect --verify``.

``tqdm`` draws it where it is installed; otherwise a one-line bar is written to stderr. It shows only where
a person watches: on by default when stderr is a terminal, off in pipes, logs and tests. Who asks decides,
in this order: a function's ``progress=True``/``False``, the command line's ``--progress``/``--no-progress``
(:func:`setting`), ``MOE_REPLAY_PROGRESS=1`` (on anywhere) or ``=0`` (off), and last whether stderr is a
terminal (another value of ``MOE_REPLAY_PROGRESS`` is read as unset, with a ``RuntimeWarning`` that says so). It
never changes a result.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

from ._checks import check_flag
from ._quiet import aloud

_ENV = "MOE_REPLAY_PROGRESS"
#: The values of ``MOE_REPLAY_PROGRESS`` (any case) that show the bar, and those that hide it; any other is warned of.
_SHOWN = ("1", "true", "yes", "on")
_HIDDEN = ("0", "false", "no", "off")
_SETTING: ContextVar[bool | None] = ContextVar("moe_replay_progress", default=None)


def check(progress: Any, name: str) -> bool | None:
    """A ``progress=`` argument: ``None`` (shown on a terminal), ``True`` or ``False``.

    Raises:
        ArgumentTypeError: anything else (``"no"`` is a true string, never read as a flag).
    """
    return None if progress is None else check_flag(progress, f"{name}: progress (True, False or None)")


@contextmanager
def setting(progress: bool | None) -> Iterator[None]:
    """Bars made in this block (in this thread or task) are shown (``True``) or hidden (``False``).

    ``None`` leaves the choice to ``MOE_REPLAY_PROGRESS`` and the terminal. A ``progress=`` given to a
    function still decides for that function's own bar.
    """
    token = _SETTING.set(check(progress, "setting()"))
    try:
        yield
    finally:
        _SETTING.reset(token)


def wanted(stream: IO[str] | None = None) -> bool:
    """Should a bar be drawn on ``stream`` (stderr by default)? :func:`setting`, then ``MOE_REPLAY_PROGRESS``."""
    chosen = _SETTING.get()
    if chosen is not None:
        return chosen
    setting = os.environ.get(_ENV, "").strip().lower()
    if setting in _SHOWN:
        return True
    if setting in _HIDDEN:
        return False
    if setting:  # (a value of neither list, "2" or "hide": said, where it was read as unset without a word)
        warnings.warn(
            f"moe_replay: {_ENV}={os.environ[_ENV]!r:.40} is none of {', '.join(_SHOWN)} (show the progress bar) "
            f"or {', '.join(_HIDDEN)} (hide it): it is read as unset, a bar shown where stderr is a terminal. Set "
            f"{_ENV} to one of those, or unset it",
            RuntimeWarning,
            stacklevel=2,
        )
    if _other_rank():  # one bar per job: the ranks of a distributed run share a terminal
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (a closed or a replaced stream)
        return False


def _other_rank() -> bool:
    """Is this a process of an initialised ``torch.distributed`` group other than rank 0?"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


class Progress:
    """A bar over ``total`` steps, drawn only where :func:`wanted` says so.

    Example:
        >>> with Progress(3, "routers", enabled=False) as bar:
        ...     for _ in range(3):
        ...         bar.update()
        >>> bar.done
        3
    """

    def __init__(self, total: int, desc: str, *, enabled: bool | None = None, stream: IO[str] | None = None) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._on = wanted(self._stream) if enabled is None else bool(enabled)
        self._tqdm: Any = None
        self._drawn = 0.0
        if self._on and importlib.util.find_spec("tqdm") is not None:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]

                self._tqdm = tqdm(total=self.total, desc=desc, file=self._stream, leave=False, unit="")
            except Exception:  # a broken tqdm install: the built-in bar, never a failed run
                self._tqdm = None

    def __repr__(self) -> str:
        return f"Progress({self.desc!r}, {self.done}/{self.total}, {'shown' if self._on else 'hidden'})"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done (never past ``total``)."""
        n = min(n, self.total - self.done)
        if n <= 0:
            return
        self.done += n
        if not self._on:
            return
        if self._tqdm is not None:
            with aloud():  # (drawn over runs of forwards, which are unheard)
                self._tqdm.update(n)
            return
        now = time.monotonic()
        if self.done == self.total or now - self._drawn >= 0.1:  # (at most ten draws a second)
            self._drawn = now
            width = 24
            filled = width * self.done // max(self.total, 1)
            self._write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")

    def close(self) -> None:
        """Take the bar off the screen (it is a transient display: results are printed or returned)."""
        if not self._on:
            return
        self._on = False
        if self._tqdm is not None:
            with aloud():
                self._tqdm.close()
        elif self._drawn:
            self._write("\r\033[K")

    def _write(self, text: str) -> None:
        try:
            with aloud():  # (drawn over runs of forwards, which are unheard)
                self._stream.write(text)
                self._stream.flush()
        except (OSError, ValueError):  # a closed stream: the bar is only a display
            self._on = False


def steps(total: int, desc: str, enabled: bool | None = None) -> Iterator[int]:
    """``range(total)`` under a :class:`Progress` bar that counts each step once its loop body is done.

    The bar is taken off when the loop ends, breaks or raises.
    """
    with Progress(total, desc, enabled=enabled) as bar:
        for i in range(total):
            yield i
            bar.update()
