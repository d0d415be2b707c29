"""Where an error that escapes a forward was raised: in the forward's own code, or in moe_replay's code that runs inside
it (a nested router's interception, a stand-in for an iterator a router draws from, the hooks of the token checks).

The runs that establish or check a decision, and those that tell the order of a forward's tokens, let a forward that
fails on other inputs go. moe_replay's code runs inside those forwards outside any mode that could mark its errors as
they are raised (a nested router's ``forward`` wrapper runs at every router call of every capture and replay: it gets
no ``try`` of its own for this), so an error that escapes the forward is told apart afterwards, by its traceback: one
raised in moe_replay's code entered from the forward (an *entry*, :func:`inside_forward`), with no frame of the user's
code below that entry, is moe_replay's own. The user's code an entry calls (the router's forward, the iterator it
draws from) has a frame of its own below it; where an entry calls something that raises with no frame of its own (a
C iterator's ``StopIteration``), the entry marks that error as the forward's (``forwards_call``).

An error of moe_replay's own may not reach the run's maker at all: the user's code around an entry may catch it (an
``except Exception`` around a nested router's call) and the run go on as another forward. So an entry's code that runs
in those runs notes such an error as it leaves (:func:`note_fault`), and the maker of each run reads the note as the
run ends (:func:`run_begins`, :func:`run_ends`): a run that saw one is refused, whatever the forward did with it.
"""

from __future__ import annotations

import os
import sysconfig
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

__all__ = [
    "forwards_call",
    "inside_forward",
    "mark_forwards",
    "note_fault",
    "raised_by_library",
    "raised_inside",
    "run_begins",
    "run_ends",
]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The code objects of moe_replay's functions that the user's forward enters (see :func:`inside_forward`).
_ENTRIES: set[types.CodeType] = set()

#: The attribute that marks an exception as the forward's own (see :func:`mark_forwards`).
FORWARDS_OWN = "_moe_replay_forwards_own"

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: files of the package that hold model code (its reference models): their frames are the user's forward
_MODEL_FILES = frozenset({os.path.join(_PACKAGE, "models.py")})
#: folders whose frames are neither the user's nor moe_replay's: torch's and Python's standard library (not the
#: packages installed beside it, transformers' model code among them: the user's)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__ or "")) + os.sep
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
#: the folders packages are installed in, wherever they lie (a virtual environment's, the interpreter's own)
_INSTALLED = frozenset({"site-packages", "dist-packages"})


def inside_forward(fn: _F) -> _F:
    """Note ``fn`` as moe_replay code the user's forward enters (a ``forward`` wrapper, a hook, a stand-in's method):
    an error raised under it with no frame of the user's code below is moe_replay's own (see :func:`raised_inside`).
    ``fn`` is returned as it is: nothing is added to its calls."""
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        _ENTRIES.add(code)
    return fn


def mark_forwards(e: BaseException) -> None:
    """Mark ``e`` as raised by the forward (its code, or a call of its that an entry makes for it)."""
    try:
        setattr(e, FORWARDS_OWN, True)
    except (AttributeError, TypeError):  # (an exception class that takes no attribute: unmarked)
        pass


def forwards_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``fn(*args, **kwargs)``, a call an entry makes of the user's code (or of an object of the user's): what it
    raises is the forward's own, but an error of an entry that code entered in turn (a router nested in it)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if not raised_inside(e):  # (one of moe_replay's entries below it, in the forward it called: that one's)
            mark_forwards(e)
        raise


def _kind(code: types.CodeType) -> str:
    """``"entry"``, ``"library"`` (moe_replay's other code), ``"neutral"`` (torch's, Python's) or ``"user"``."""
    if code in _ENTRIES:
        return "entry"
    path = os.path.abspath(code.co_filename) if not code.co_filename.startswith("<") else code.co_filename
    if path.startswith(_PACKAGE) and path not in _MODEL_FILES:
        return "library"
    if path.startswith(_TORCH) or (path.startswith(_STDLIB) and _INSTALLED.isdisjoint(path.split(os.sep))):
        return "neutral"
    return "user"  # (what is not known to be moe_replay's, torch's or Python's: the forward's, as it always was)


def raised_inside(e: BaseException) -> bool:
    """Was ``e`` raised by moe_replay's code that the forward entered: a frame of an entry in its traceback with no
    frame of the user's code below it, and not marked as the forward's own?"""
    return _raised_below(e, False)


def raised_by_library(e: BaseException) -> bool:
    """Was ``e`` raised in moe_replay's own code (the innermost frame of its traceback that is not torch's or Python's
    is moe_replay's), and not marked as the forward's own? A refusal that code running inside a forward makes on
    purpose (the probe's mode, entered through torch's dispatch, not through an entry) is told so."""
    if getattr(e, FORWARDS_OWN, False) is True:
        return False
    last = "neutral"
    tb = e.__traceback__
    while tb is not None:
        kind = _kind(tb.tb_frame.f_code)
        if kind != "neutral":
            last = kind
        tb = tb.tb_next
    return last in ("entry", "library")


def _raised_below(e: BaseException, inside: bool) -> bool:
    """:func:`raised_inside`, where ``inside`` tells whether the traceback's first frame runs in moe_replay's code
    entered from the forward (an entry's own ``except`` reads it: its frame is the first)."""
    if getattr(e, FORWARDS_OWN, False) is True:
        return False
    tb = e.__traceback__
    while tb is not None:
        kind = _kind(tb.tb_frame.f_code)
        if kind == "entry":
            inside = True
        elif kind == "user":
            inside = False
        tb = tb.tb_next
    return inside


class _Runs(threading.local):
    """The runs of a forward that moe_replay makes in this thread (a probe run, a token-order run), and the first
    error of its own that left one of its entries in the innermost of them (see :func:`note_fault`)."""

    def __init__(self) -> None:
        self.depth = 0
        self.fault: Exception | None = None


_RUNS = _Runs()


def note_fault(e: Exception) -> None:
    """Note ``e``, leaving moe_replay's code that the forward entered (called in that code's ``except``), where it is
    moe_replay's own error (no frame of the user's code below, not marked the forward's) and a run that moe_replay
    makes is under way in this thread: the user's code around may catch it and the run go on as another forward, so
    the run's maker reads it as the run ends (:func:`run_ends`). Nothing is noted outside such runs."""
    runs = _RUNS
    if runs.depth and runs.fault is None and _raised_below(e, True):
        runs.fault = e


def run_begins() -> Exception | None:
    """A run of the forward begins in this thread: returns what the run around it noted so far (handed back to
    :func:`run_ends`), and notes afresh."""
    runs = _RUNS
    outer, runs.fault = runs.fault, None
    runs.depth += 1
    return outer


def run_ends(outer: Exception | None) -> Exception | None:
    """The run begun by :func:`run_begins` (which returned ``outer``) ended: returns the error of moe_replay's own
    that left one of its entries in it (None where none did), whether or not the forward caught it; the run around
    it notes as before."""
    runs = _RUNS
    fault, runs.fault = runs.fault, outer
    runs.depth -= 1
    return fault
