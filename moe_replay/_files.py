"""Files a forward writes, put back after the runs of it that moe_replay makes (the runs that establish a decision,
those that tell the order of a forward's tokens, ``verify()``'s forward).

A block may write what it chose outside the process: a routing log that appends one line a forward (sample-ESFT
counts those lines to pick the experts it trains), a file of statistics it rewrites. Each run of its own code that
moe_replay makes writes there too, and no snapshot of the modules' attributes holds a file's contents. So while such
runs are under way in a thread, the files that thread changes at a path (opened for writing through ``open``,
``io.open`` and so ``pathlib`` and ``numpy``, or ``os.open``; replaced, renamed, removed or cut through ``os``, and
so ``pathlib``, ``shutil`` and ``tempfile``; saved with ``torch.save``, whose writer opens the path itself) are
noted as they were before the first run changed them (their size where they are only appended to, else their bytes;
none where they did not exist), and the file objects the modules hold or reach (see :func:`reachable_files`) that
can be written and sought (a log opened at ``__init__``, a statistics file rewritten in place, an ``io.StringIO``, a
``logging`` handler's stream) as they stand, with their bytes where they may be written over; as the runs end, the
files opened in them are flushed and every one of them is put back: cut to its size, written back, or removed. A
file whose bytes are too large to keep is not changed in a run: the router is refused, before anything is written.
Other threads' files are never touched, but a line another thread appends during a run to a file the run appends to
is cut with the run's. Not seen: writes through a file descriptor alone or a path relative to a directory's
descriptor, or by native code that opens the path itself (safetensors' ``save_file``), directories made, a file held
open in place that is too large to keep (its size alone is put back), and a file object out of the reach of
:func:`reachable_files`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import itertools
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedRouterError

__all__ = ["files_as_they_were", "reachable_files", "writable_file"]

#: Bytes of files opened in a run to be written over (not only appended to) that are kept to put them back; a file
#: past what is left of it refuses the router rather than be written unrecoverably.
_CONTENT_BUDGET = 64 * 2**20


@dataclass
class _Before:
    """A file as it was before a run first opened it for writing: ``existed``, its ``size``, and its ``data`` where
    the run may write over it (not only append)."""

    existed: bool
    size: int = 0
    data: bytes | None = None


@dataclass(eq=False)
class _Frame:
    """The files noted for one block of runs (see :func:`files_as_they_were`)."""

    paths: dict[str, _Before] = field(default_factory=dict)
    opened: list[weakref.ref[Any]] = field(default_factory=list)
    budget: int = field(default_factory=lambda: _CONTENT_BUDGET)
    refusal: UnsupportedRouterError | None = None


class _Local(threading.local):
    """The blocks of runs under way in this thread, innermost last."""

    def __init__(self) -> None:
        self.frames: list[_Frame] = []


_LOCAL = _Local()
_LOCK = threading.Lock()
#: blocks of runs under way in any thread, and the ``open`` functions the wrappers stand in for while there are some
_ACTIVE = 0
_ORIGINAL: dict[str, Callable[..., Any]] = {}


def _writes(mode: Any) -> bool:
    """Does an ``open`` of ``mode`` write (create, write over, append, or update)?"""
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def _note(file: Any, mode: str, follow: bool = True) -> None:
    """Note the file at ``file`` as it is now in every block of runs of this thread that has not noted it yet (or
    noted it as appended to only, where it is now opened to be written over); the file a link at ``file`` leads to
    where ``follow``, else the name itself (one that is replaced or removed)."""
    if isinstance(file, int) or not isinstance(file, str | bytes | os.PathLike):
        return
    path = os.fsdecode(os.fspath(file))
    if follow:
        path = os.path.realpath(path)
    else:
        path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    append = "a" in mode and "+" not in mode  # (appended to alone: the size before tells what to cut)
    frames = [
        f
        for f in _LOCAL.frames
        if path not in f.paths or (not append and f.paths[path].existed and f.paths[path].data is None)
    ]
    if not frames:
        return
    exists = os.path.isfile(path)
    size = os.path.getsize(path) if exists else 0
    data: bytes | None = None
    if exists and not append:
        if any(f.budget < size for f in frames):
            refusal = UnsupportedRouterError(
                f"a run of a forward that moe_replay makes to establish a router's decision (or to check it) opens "
                f"{path!r} ({size} bytes) to write over it (or replaces, removes or cuts it), more than moe_replay "
                "keeps to put the file back after the run. Write such a file outside the router's forward (after it "
                "returns), or attach with "
                "include=/exclude= so that the module that writes it is not part of a router's scope"
            )
            for f in frames:
                f.refusal = f.refusal or refusal
            raise refusal
        with _ORIGINAL["open"](path, "rb") as fh:
            data = fh.read()
    for f in frames:
        noted = f.paths.get(path)
        if noted is None:
            f.paths[path] = _Before(exists, size, data)
        elif data is not None:  # (appended to in the runs so far: its bytes before are those up to its size then)
            f.paths[path] = _Before(True, noted.size, data[: noted.size])
        else:
            continue
        f.budget -= len(data or b"")


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (an ``open``), noting in this thread's blocks of runs the files it opens for writing first."""

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not _LOCAL.frames or not _writes(mode):
            return original(file, mode, *args, **kwargs)
        _note(file, mode)
        handle = original(file, mode, *args, **kwargs)
        with contextlib.suppress(TypeError):
            for f in _LOCAL.frames:
                f.opened.append(weakref.ref(handle))
        return handle

    opened.__name__, opened.__qualname__, opened.__doc__ = original.__name__, original.__qualname__, original.__doc__
    opened.__wrapped__ = original  # type: ignore[attr-defined]
    return opened


def _path_calls() -> dict[tuple[Any, str], tuple[tuple[int, str], ...]]:
    """The functions, beside ``open``, that change the file at a path they are given (write over it, replace it,
    remove it or cut it), each with where its paths are among its arguments (place, keyword): ``os.open``, the
    renames and removals of ``os`` (and so of ``pathlib``, ``shutil`` and ``tempfile``), ``os.truncate``, and
    ``torch.save``, whose writer opens a path of its own."""
    import torch.serialization

    return {
        (os, "open"): ((0, "path"),),
        (os, "replace"): ((0, "src"), (1, "dst")),
        (os, "rename"): ((0, "src"), (1, "dst")),
        (os, "remove"): ((0, "path"),),
        (os, "unlink"): ((0, "path"),),
        (os, "truncate"): ((0, "path"),),
        (torch, "save"): ((1, "f"),),
        (torch.serialization, "save"): ((1, "f"),),
    }


def _os_open_mode(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The ``open`` mode that ``os.open``'s flags amount to, as far as a file is changed: ``"r"`` (read alone),
    ``"a"`` (appended to alone) or ``"w"``."""
    flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
    if not isinstance(flags, int) or not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
        return "r"
    return "a" if flags & os.O_APPEND and not flags & (os.O_RDWR | os.O_TRUNC) else "w"


def _wrap_path_call(
    original: Callable[..., Any], where: tuple[tuple[int, str], ...], flags: bool
) -> Callable[..., Any]:
    """``original`` (a function of :func:`_path_calls`; ``os.open`` where ``flags``, which tell whether it writes),
    noting in this thread's blocks of runs the files at the paths it is given, as they are, before it changes them
    (the name itself where it is a link; a path relative to a directory's descriptor is not seen)."""

    def changed(*args: Any, **kwargs: Any) -> Any:
        if _LOCAL.frames and not any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            mode = _os_open_mode(args, kwargs) if flags else "w"
            if mode != "r":
                for place, name in where:
                    _note(args[place] if len(args) > place else kwargs.get(name), mode, follow=flags)
        return original(*args, **kwargs)

    functools.update_wrapper(changed, original)
    return changed


#: The stand-in made for each function set aside (by its key in ``_ORIGINAL``): the function and its stand-in, made
#: once and set again at each first block of runs while the function is the same.
_STAND_INS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _stand_in(
    key: str, original: Callable[..., Any], make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[..., Any]:
    """The stand-in ``make`` makes for ``original``, made once while ``original`` stays the function at ``key``."""
    kept = _STAND_INS.get(key)
    if kept is None or kept[0] is not original:
        kept = _STAND_INS[key] = (original, make(original))
    return kept[1]


def _install() -> None:
    """The stand-ins for ``open`` and the functions of :func:`_path_calls` in place (the first block of runs of any
    thread puts them there)."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE == 0:
            _ORIGINAL["open"] = builtins.open
            _ORIGINAL["io"] = io.open
            builtins.open = _stand_in("open", builtins.open, _wrap)
            io.open = _stand_in("io", io.open, _wrap)
            for (home, name), where in _path_calls().items():
                key = f"{home.__name__}.{name}"
                _ORIGINAL[key] = getattr(home, name)
                make = functools.partial(_wrap_path_call, where=where, flags=key == "os.open")
                setattr(home, name, _stand_in(key, _ORIGINAL[key], make))
        _ACTIVE += 1


def _uninstall() -> None:
    """Python's own ``open`` (and the functions of :func:`_path_calls`) back once the last block of runs of any thread
    ends (unless another stand-in was set since: then it stays, and ours passes every call through)."""
    global _ACTIVE
    with _LOCK:
        _ACTIVE -= 1
        if _ACTIVE == 0:
            if getattr(builtins.open, "__wrapped__", None) is _ORIGINAL["open"]:  # (not one set since by others)
                builtins.open = _ORIGINAL["open"]
            if getattr(io.open, "__wrapped__", None) is _ORIGINAL["io"]:
                io.open = _ORIGINAL["io"]
            for home, name in _path_calls():
                key = f"{home.__name__}.{name}"
                if getattr(getattr(home, name), "__wrapped__", None) is _ORIGINAL[key]:
                    setattr(home, name, _ORIGINAL[key])


def writable_file(v: Any) -> bool:
    """Is ``v`` an open file object that can be written and sought (a log file a module opened, an ``io.StringIO``)?"""
    if not isinstance(v, io.IOBase):
        return False
    try:
        return not v.closed and v.writable() and v.seekable()
    except (OSError, ValueError):
        return False


#: How far the search for the file objects the modules reach goes: objects looked at, and steps from a root.
_REACH_OBJECTS = 2048
_REACH_DEPTH = 3


def _reached_from(v: Any) -> Iterator[Any]:
    """The values one step from ``v``: a container's items (a dict's values), a function's closure cells, a bound
    method's object and function, a partial's function and arguments, a plain object's attributes; none from a
    module, a tensor, a class, a Python module or text."""
    import torch

    if isinstance(v, str | bytes | int | float | type | types.ModuleType | torch.Tensor | torch.nn.Module):
        return
    if isinstance(v, dict):
        yield from itertools.islice(v.values(), _REACH_OBJECTS)
    elif isinstance(v, list | tuple | set | frozenset):
        yield from itertools.islice(v, _REACH_OBJECTS)
    elif isinstance(v, types.FunctionType):
        for cell in v.__closure__ or ():
            with contextlib.suppress(ValueError):  # (a cell not yet set)
                yield cell.cell_contents
    elif isinstance(v, types.MethodType):
        yield v.__self__
        yield v.__func__
    elif isinstance(v, functools.partial):
        yield v.func
        yield from v.args
        yield from v.keywords.values()
    elif isinstance(getattr(v, "__dict__", None), dict) and not isinstance(v, io.IOBase):
        yield from itertools.islice(vars(v).values(), _REACH_OBJECTS)


def reachable_files(roots: Iterable[Any]) -> list[Any]:
    """The file objects of :func:`writable_file` reached from ``roots`` (the values of the modules' attributes and of
    the places their code names) a few steps deep (see :func:`_reached_from`), each once, the objects looked at
    bounded: a log kept in a registry ``dict`` a global holds, or in the closure of a function a module keeps."""
    out: dict[int, Any] = {}
    seen: set[int] = set()
    todo = [(v, 0) for v in roots]
    while todo and len(seen) < _REACH_OBJECTS:
        v, depth = todo.pop(0)
        if id(v) in seen:
            continue
        seen.add(id(v))
        if writable_file(v):
            out.setdefault(id(v), v)
        elif depth < _REACH_DEPTH:
            todo.extend((w, depth + 1) for w in _reached_from(v))
    return list(out.values())


def _held_state(f: Any) -> tuple[int, int | None, Any]:
    """Where ``f`` stands (flushed): its position, its size on disk (None for an in-memory one), and its value: in
    memory, or the bytes on disk where it may be written over (not opened to append) and they are no larger than what
    moe_replay keeps (past that, its size alone tells what to cut)."""
    f.flush()
    pos = f.tell()
    if isinstance(f, io.StringIO | io.BytesIO):
        return pos, None, f.getvalue()
    fd = f.fileno()
    size = os.fstat(fd).st_size
    appends = "a" in str(getattr(f, "mode", ""))
    return pos, size, None if appends or size > _CONTENT_BUDGET else _bytes_of(f)


def _bytes_of(f: Any) -> bytes | None:
    """The bytes on disk of file object ``f`` (read at its descriptor, or at its name where it is opened to write
    alone and the name still leads to its file), or None where neither can read them."""
    fd = f.fileno()
    st = os.fstat(fd)
    if f.readable():
        return os.pread(fd, st.st_size, 0)
    name = getattr(f, "name", None)
    if isinstance(name, str | bytes) and os.path.isfile(name):
        there = os.stat(name)
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            with _ORIGINAL.get("open", builtins.open)(name, "rb") as fh:  # (held files are read before any stand-in)
                data: bytes = fh.read()
                return data
    return None


def _put_held(f: Any, state: tuple[int, int | None, Any]) -> None:
    """File object ``f`` put back where :func:`_held_state` found it: its value written back (in memory, or its bytes
    on disk), or its bytes after the size it had cut, and its position."""
    pos, size, value = state
    if f.closed:
        return
    f.flush()
    if size is None:
        if f.getvalue() != value:
            f.seek(0)
            f.truncate(0)
            f.write(value)
    else:
        fd = f.fileno()
        now = os.fstat(fd).st_size
        if value is not None and (now != size or _bytes_of(f) != value):
            os.pwrite(fd, value, 0)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    if f.tell() != pos or size is not None:
        f.seek(pos)


def _put_path(path: str, before: _Before) -> None:
    """The file at ``path`` put back as ``before`` noted it: removed, written back, or cut to its size."""
    if not before.existed:
        if os.path.isfile(path):
            _ORIGINAL.get("os.remove", os.remove)(path)
        return
    if before.data is not None:
        same = False
        if os.path.isfile(path):
            with _ORIGINAL["open"](path, "rb") as fh:
                same = fh.read() == before.data
        if not same:
            with _ORIGINAL["open"](path, "wb") as fh:
                fh.write(before.data)
    elif os.path.isfile(path) and os.path.getsize(path) != before.size:
        _ORIGINAL.get("os.truncate", os.truncate)(path, before.size)


@contextlib.contextmanager
def files_as_they_were(held: Iterable[Any] = ()) -> Iterator[None]:
    """The files this thread opens for writing in the block, and the file objects of ``held`` (see
    :func:`writable_file`), as they were before it, once it ends (see the module's docstring). A refusal made in the
    block for a file too large to keep is raised as it ends, whatever the forward did with it; a file that cannot be
    put back (the run made a directory at its path) is refused as it ends, every other one put back."""
    states = []
    for f in held:
        with contextlib.suppress(OSError, ValueError):
            states.append((f, _held_state(f)))
    frame = _Frame()
    unput: list[tuple[str, Exception]] = []
    _install()
    _LOCAL.frames.append(frame)
    failed = True
    try:
        yield
        failed = False
    finally:
        _LOCAL.frames[:] = [f for f in _LOCAL.frames if f is not frame]
        try:
            for ref in frame.opened:
                handle = ref()
                if handle is not None and not handle.closed:
                    with contextlib.suppress(OSError, ValueError):
                        handle.flush()
            for path, before in reversed(frame.paths.items()):
                try:
                    _put_path(path, before)
                except OSError as e:  # (the others are put back all the same; this one is said, below)
                    unput.append((path, e))
            for f, state in states:
                try:
                    _put_held(f, state)
                except (OSError, ValueError) as e:
                    unput.append((str(getattr(f, "name", f)), e))
        finally:
            _uninstall()
        if unput:
            refusal = UnsupportedRouterError(
                "a run of a forward that moe_replay makes to establish a router's decision (or to check it) changed "
                + "; ".join(f"{path!r} ({e})" for path, e in unput)
                + ", and moe_replay could not put it back as it was: the file is as the run left it. Write such a "
                "file outside the router's forward (after it returns), or attach with include=/exclude= so that the "
                "module that writes it is not part of a router's scope"
            )
            pending = sys.exc_info()[1] if failed else None
            if pending is None or isinstance(pending, Exception):
                raise refusal from unput[0][1]
            note = getattr(pending, "add_note", None)  # (an interrupt goes on as it is, saying so where it can)
            if note is not None:
                note(str(refusal))
    if not failed and frame.refusal is not None:
        raise frame.refusal
