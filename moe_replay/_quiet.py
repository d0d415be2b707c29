"""What a forward says, unheard in the runs of it that moe_replay makes (the runs that establish a decision, those
that tell the order of a forward's tokens, ``verify()``'s forward).

A block may say what it does as it runs: a line it logs through ``logging`` (to a handler's file, to stderr), a
``print``, a warning. Each run of its own code that moe_replay makes would say it again: dozens of lines at a
router's first forward, and a warning shown once (``"default"``, ``"once"``) taken by a run, so that the forward the
user made never shows it. So while such runs are under way in a thread, what that thread says is dropped: the
records its loggers handle (a stand-in for ``logging.Logger.handle``), what it writes to ``sys.stdout`` and
``sys.stderr`` (a proxy of each, in place while any thread's runs are under way), and the warnings shown (a stand-in
for ``warnings._showwarnmsg``, through which both Python's and C's ``warn`` show one), each one's entries taken out of
the registries ``warn`` wrote them to (the module's ``__warningregistry__``, ``warnings.onceregistry``), so that the
forward after the runs shows it as without them. A warning that is an error (the ``"error"`` action) is raised as
ever. Other threads' lines, writes and warnings are never touched; moe_replay's own (a progress bar, its warnings)
are said through :func:`aloud`. Not seen: a stream held since before the runs (a handler of ``logging`` writes to
its own, which the stand-in keeps from it), writes to a file descriptor, and a warning given a registry of its own
(``warn_explicit``): shown not, but its entry stays.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["aloud", "unheard"]


class _Local(threading.local):
    """How many blocks of runs are under way in this thread (none: it is heard), and, while some are, how many
    :func:`aloud` blocks inside them."""

    def __init__(self) -> None:
        self.depth = 0
        self.aloud = 0


_LOCAL = _Local()
_LOCK = threading.Lock()
#: blocks of runs under way in any thread, and what the stand-ins took the place of while there are some
_ACTIVE = 0
_ORIGINAL: dict[str, Any] = {}


def _hushed() -> bool:
    """Is this thread inside a block of runs (and not in an :func:`aloud` block there)?"""
    local = _LOCAL
    return local.depth > 0 and local.aloud == 0


class _Stream:
    """A thread-aware proxy of a standard stream: what the threads whose runs are under way write is dropped (its
    length returned, as written), all else passed to ``target``."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: Any) -> Any:
        """``text`` written to the stream, or dropped in a thread whose runs are under way."""
        if _hushed():
            return len(text) if isinstance(text, str | bytes) else 0
        return self._target.write(text)

    def writelines(self, lines: Any) -> None:
        """``lines`` written to the stream, or dropped in a thread whose runs are under way."""
        if not _hushed():
            self._target.writelines(lines)

    def flush(self) -> None:
        """The stream flushed (nothing to flush of a thread whose runs are under way)."""
        if not _hushed():
            self._target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _handle(original: Callable[..., Any]) -> Callable[..., Any]:
    """``logging.Logger.handle`` that drops the records of a thread whose runs are under way."""

    def handle(self: logging.Logger, record: logging.LogRecord) -> Any:
        if _hushed():
            return None
        return original(self, record)

    handle.__name__, handle.__qualname__, handle.__doc__ = original.__name__, original.__qualname__, original.__doc__
    handle.__wrapped__ = original  # type: ignore[attr-defined]
    return handle


def _action(text: str, category: type, module: str, lineno: int) -> str:
    """The action ``warnings.filters`` gives a warning (as ``warn_explicit`` finds it)."""
    for action, message, cat, mod, line in list(warnings.filters):
        if (
            (message is None or message.match(text))
            and issubclass(category, cat)
            and (mod is None or mod.match(module))
            and (line == 0 or lineno == line)
        ):
            return str(action)
    return str(getattr(warnings, "defaultaction", "default"))


def _unregister(msg: Any) -> None:
    """The entries ``warn`` wrote for the warning ``msg`` (shown now) taken out of its registries: the
    ``__warningregistry__`` of the module of the frame it names (found on this thread's stack) and
    ``warnings.onceregistry``."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename != msg.filename or frame.f_lineno != msg.lineno):
        frame = frame.f_back  # type: ignore[assignment]
    space = frame.f_globals if frame is not None else sys.__dict__ if msg.filename == "sys" else None
    if space is None:  # (a registry of its own, ``warn_explicit``'s: not seen)
        return
    registry = space.get("__warningregistry__")
    if not isinstance(registry, dict):
        return
    text, category, lineno = str(msg.message), msg.category, msg.lineno
    action = _action(text, category, str(space.get("__name__", "<string>")), lineno)
    if action in ("default", "once", "module"):
        registry.pop((text, category, lineno), None)
    if action == "module":
        registry.pop((text, category, 0), None)
    # (a warning shown once: noted in the module's registry by C's ``warn``, in ``warnings.onceregistry`` by Python's)
    if action == "once" and registry.pop((text, category), None) is None:
        getattr(warnings, "onceregistry", {}).pop((text, category), None)


def _show(original: Callable[..., Any]) -> Callable[..., Any]:
    """``warnings._showwarnmsg`` that shows no warning of a thread whose runs are under way, and leaves none of it in
    the registries."""

    def show(msg: Any) -> Any:
        if _hushed():
            with contextlib.suppress(Exception):  # (a registry past reading: shown not, its entry stays)
                _unregister(msg)
            return None
        return original(msg)

    show.__name__, show.__qualname__, show.__doc__ = original.__name__, original.__qualname__, original.__doc__
    show.__wrapped__ = original  # type: ignore[attr-defined]
    return show


def _install() -> None:
    """The stand-ins in place (the first block of runs of any thread puts them there)."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE == 0:
            _ORIGINAL["handle"] = logging.Logger.__dict__["handle"]
            _ORIGINAL["show"] = warnings._showwarnmsg  # type: ignore[attr-defined]
            _ORIGINAL["stdout"], _ORIGINAL["stderr"] = sys.stdout, sys.stderr
            logging.Logger.handle = _handle(_ORIGINAL["handle"])  # type: ignore[method-assign]
            warnings._showwarnmsg = _show(_ORIGINAL["show"])  # type: ignore[attr-defined]
            # (none where there is no stream, as under ``pythonw``: a print there writes nowhere already)
            _ORIGINAL["out"] = None if sys.stdout is None else _Stream(sys.stdout)
            _ORIGINAL["err"] = None if sys.stderr is None else _Stream(sys.stderr)
            if _ORIGINAL["out"] is not None:
                sys.stdout = _ORIGINAL["out"]
            if _ORIGINAL["err"] is not None:
                sys.stderr = _ORIGINAL["err"]
        _ACTIVE += 1


def _uninstall() -> None:
    """What the stand-ins took the place of, back once the last block of runs of any thread ends (unless another
    was set since: then it stays, and ours in it passes everything through)."""
    global _ACTIVE
    with _LOCK:
        _ACTIVE -= 1
        if _ACTIVE == 0:
            if getattr(logging.Logger.__dict__.get("handle"), "__wrapped__", None) is _ORIGINAL["handle"]:
                logging.Logger.handle = _ORIGINAL["handle"]  # type: ignore[method-assign,assignment]
            if getattr(getattr(warnings, "_showwarnmsg", None), "__wrapped__", None) is _ORIGINAL["show"]:
                warnings._showwarnmsg = _ORIGINAL["show"]  # type: ignore[attr-defined]
            if sys.stdout is _ORIGINAL["out"] is not None:
                sys.stdout = _ORIGINAL["stdout"]
            if sys.stderr is _ORIGINAL["err"] is not None:
                sys.stderr = _ORIGINAL["stderr"]


@contextlib.contextmanager
def unheard() -> Iterator[None]:
    """What this thread logs, prints and warns in the block dropped (see the module's docstring); other threads
    heard as ever. Blocks nest."""
    _install()
    local = _LOCAL
    aloud = local.aloud  # (runs made inside an :func:`aloud` block are unheard too)
    local.depth += 1
    local.aloud = 0
    try:
        yield
    finally:
        local.depth -= 1
        local.aloud = aloud
        _uninstall()


@contextlib.contextmanager
def aloud() -> Iterator[None]:
    """moe_replay's own words heard inside the runs of this thread (a progress bar drawn over them, a warning of its
    own)."""
    _LOCAL.aloud += 1
    try:
        yield
    finally:
        _LOCAL.aloud -= 1
