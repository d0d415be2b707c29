"""A progress bar for the library's own long work (establishing every router's decision in ``verify()``).

``tqdm`` draws it where it is installed; otherwise a one-line bar is written to stderr. It shows only where
a person watches: on by default when stderr is a terminal, off in pipes, logs and tests.
``MOE_REPLAY_PROGRESS=1`` turns it on anywhere, ``MOE_REPLAY_PROGRESS=0`` off. It never changes a result.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import IO, Any

_ENV = "MOE_REPLAY_PROGRESS"


def wanted(stream: IO[str] | None = None) -> bool:
    """Should a bar be drawn on ``stream`` (stderr by default)? ``MOE_REPLAY_PROGRESS`` decides where set."""
    setting = os.environ.get(_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (a closed or a replaced stream)
        return False


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
        self._on = wanted(self._stream) if enabled is None else enabled
        self._tqdm: Any = None
        self._drawn = 0.0
        if self._on and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, file=self._stream, leave=False, unit="")

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
            self._tqdm.close()
        elif self._drawn:
            self._write("\r\033[K")

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed stream: the bar is only a display
            self._on = False
