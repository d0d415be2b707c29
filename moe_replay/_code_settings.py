"""The settings a router's code reads from outside its module's attributes.

A decision is established under the settings of its forward: which of two top-k calls
dispatches may hang on a flag. The module's own attributes and its config are compared at
each block (``intercept._fingerprint``); this module finds the rest, by reading the code the
router runs, as far as it can be read without running it:

- **module-level globals** its forward names (``if USE_BIAS:``), and the attributes it reads
  of a module or class it names (``settings.USE_BIAS``, ``Cfg.use_bias``);
- **class attributes** it reads through ``self`` (``use_bias = False`` on the class, switched
  with ``Router.use_bias = True``);
- **closure cells** of the functions it runs (a flag captured by a nested function);
- **0-d boolean and integer buffers** of the module (``if self.use_bias:`` on a registered tensor, a step
  count ``if self.step > self.warmup:``).

The code followed is the forward, the methods it names on ``self``, and the functions it names
at module level, three calls deep; torch's and numpy's own code is not followed. Which names to
read is worked out once per class and forward; reading their values is a dictionary lookup each.

Example::

    USE_BIAS = False

    class Router(nn.Module):
        def forward(self, x):
            ...
            idx = biased if USE_BIAS else plain

    # code_settings(router) -> {"mymodule.USE_BIAS": False}
"""

from __future__ import annotations

import enum
import inspect
import types
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["code_settings", "flag_buffers"]

#: the plain values that are compared as settings (:func:`is_setting`: members of an ``enum`` too)
_PLAIN = frozenset((int, float, str, bool, type(None)))


def is_setting(value: Any) -> bool:
    """Is ``value`` compared as a setting: a plain value, or a member of an ``enum`` (``Mode.BIASED``)?"""
    return type(value) in _PLAIN or isinstance(value, enum.Enum)


def comparable(value: Any) -> Any:
    """A setting as compared: a NaN float equal to itself, an ``enum`` member by its class and name (its own
    ``__eq__`` is not run)."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{inspect.getattr_static(value, '_name_', None)}"
    return "nan" if type(value) is float and value != value else value


#: the dtypes of the 0-d buffers read as settings: flags and counts (a step count a warm-up branches on)
_FLAG_DTYPES = frozenset((torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))

#: how many calls deep the code is followed from a forward
_DEPTH = 3
#: the libraries whose own code is not followed (their flags are not a router's settings)
_NOT_FOLLOWED = frozenset(("torch", "numpy", "einops", "moe_replay", "builtins", "typing", "functools", "math"))

#: where a setting is read: (its name in messages, a mapping it lives in, its key there)
_Read = tuple[str, "Mapping[str, Any] | _Cells | None", str]
#: per class, per forward function: the reads found in its code
_CACHE: weakref.WeakKeyDictionary[type, dict[Any, tuple[_Read, ...]]] = weakref.WeakKeyDictionary()
_MISSING = object()


class _Cells:
    """A function's closure cells, read by their free variable's name (live, as a module's dict is)."""

    def __init__(self, fn: types.FunctionType) -> None:
        self.cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False))

    def get(self, name: str, default: Any = None) -> Any:
        cell = self.cells.get(name)
        if cell is None:
            return default
        try:
            return cell.cell_contents
        except ValueError:  # an empty cell
            return default


def code_settings(module: nn.Module, forward: Any = None) -> dict[str, Any]:
    """The plain values (``int``, ``float``, ``str``, ``bool``, ``None``) the code of ``module``'s forward
    reads outside the module's own attributes, by name: globals, class attributes, closure cells, and
    its 0-d boolean and integer buffers. ``forward`` is the function it runs, where it is not its class's."""
    cls = type(module)
    fn = _function(forward) if forward is not None else _function(getattr(cls, "forward", None))
    out: dict[str, Any] = {}
    if fn is not None:
        per_class = _CACHE.setdefault(cls, {})
        reads = per_class.get(fn)
        if reads is None:
            found: list[_Read] = []
            _walk(fn, cls, 0, set(), found)
            reads = per_class[fn] = tuple({read[0]: read for read in found}.values())
        instance = vars(module)
        for key, where, name in reads:
            if where is None:  # a class attribute read through self: the instance's own comes first
                if name in instance:
                    continue
                value = inspect.getattr_static(cls, name, _MISSING)
            else:
                value = where.get(name, _MISSING)
            if is_setting(value):
                out[key] = comparable(value)
    out.update(flag_buffers(module))
    return out


def flag_buffers(module: nn.Module) -> dict[str, Any]:
    """The values of ``module``'s 0-d boolean and integer buffers (a flag, or a count of steps a branch may read),
    by ``"buffer <name>"``."""
    return {
        f"buffer {name}": bool(buf) if buf.dtype == torch.bool else int(buf)
        for name, buf in module._buffers.items()
        if buf is not None and buf.dim() == 0 and not buf.is_meta and buf.dtype in _FLAG_DTYPES
    }


def _function(fn: Any) -> types.FunctionType | None:
    """The Python function behind a forward (a bound method, a wrapper with ``__wrapped__``), or None."""
    for _ in range(8):
        if isinstance(fn, types.FunctionType):
            return fn
        if isinstance(fn, types.MethodType | staticmethod | classmethod):
            fn = fn.__func__
            continue
        inner = inspect.getattr_static(fn, "__wrapped__", None)  # (nothing of a user's object runs)
        if isinstance(inner, property) and type(fn).__module__.startswith("moe_replay."):
            inner = getattr(fn, "__wrapped__", None)  # (a copy's class forward, looked up: ClassForward)
        if inner is None or inner is fn or isinstance(inner, property):
            return None
        fn = inner
    return None


def _walk(fn: types.FunctionType, cls: type | None, depth: int, seen: set[Any], out: list[_Read]) -> None:
    """Collect the reads of ``fn``'s code into ``out``; follow the functions and methods it names."""
    code = fn.__code__
    if code in seen:
        return
    seen.add(code)
    names: set[str] = set()
    stack = [code]
    while stack:  # the code and the functions, lambdas and comprehensions defined in it
        c = stack.pop()
        names.update(c.co_names)
        names.update(c.co_freevars)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    space = fn.__globals__
    where = space.get("__name__", "?")
    cells = _Cells(fn) if fn.__closure__ else None
    follow: list[tuple[Any, type | None]] = []
    for name in sorted(names):
        if cells is not None and name in cells.cells:
            out.append((f"{fn.__qualname__}.<{name}>", cells, name))
            follow.append((cells.get(name), None))
        value = space.get(name, _MISSING)
        if value is not _MISSING:
            if is_setting(value):
                out.append((f"{where}.{name}", space, name))
            elif isinstance(value, types.ModuleType | type) and not _skipped(value):
                _attributes(value, names, out)
            follow.append((value, None))
        if cls is not None:
            attr = inspect.getattr_static(cls, name, _MISSING)
            if is_setting(attr):
                out.append((f"{cls.__qualname__}.{name}", None, name))
            else:
                follow.append((attr, cls))
    if depth >= _DEPTH:
        return
    for value, owner in follow:
        inner = _function(value) if isinstance(value, types.FunctionType | staticmethod | classmethod) else None
        if inner is not None and not _skipped(inner):
            _walk(inner, owner, depth + 1, seen, out)


def _attributes(holder: types.ModuleType | type, names: set[str], out: list[_Read]) -> None:
    """The plain attributes of a module or class named in global scope that the code reads by name."""
    space = vars(holder)
    label = holder.__name__ if isinstance(holder, types.ModuleType) else holder.__qualname__
    out.extend((f"{label}.{n}", space, n) for n in sorted(names) if is_setting(space.get(n, _MISSING)))


def _skipped(obj: Any) -> bool:
    """Is ``obj`` the code of a library whose flags are not a router's (torch's own, numpy's...)? Read without
    running anything of it (a module's ``__getattr__`` may import on demand)."""
    if isinstance(obj, types.ModuleType):
        where = vars(obj).get("__name__")
    else:
        where = inspect.getattr_static(obj, "__module__", None)
    root = where.partition(".")[0] if isinstance(where, str) else ""
    return root in _NOT_FOLLOWED
