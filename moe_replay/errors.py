"""Exceptions raised by moe_replay.

Every error names what is wrong and what to do about it. All of them derive from
:class:`MoEReplayError`, so ``except mr.MoEReplayError`` catches any of them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = [
    "ArgumentTypeError",
    "CaptureOverflowError",
    "InvalidArgumentError",
    "LayerMapError",
    "MissingDependencyError",
    "MissingFileError",
    "MoEReplayError",
    "NotAFileError",
    "ReplayConsumptionError",
    "RouterNotFoundError",
    "RoutesValidationError",
    "SessionStateError",
    "TokenIndexError",
    "TokenMismatchError",
    "UnknownRouterError",
    "UnsupportedRouterError",
]


class MoEReplayError(RuntimeError):
    """Base class of every error raised by moe_replay."""


class RouterNotFoundError(MoEReplayError, LookupError):
    """No router was found, or a named router is not in the model."""


class UnknownRouterError(RouterNotFoundError, KeyError):
    """A router name that a ``Routes`` or a result does not hold (also a ``KeyError``)."""

    __str__ = RuntimeError.__str__  # the message, not KeyError's quoted repr of it


class UnsupportedRouterError(MoEReplayError):
    """A router whose decision cannot be seen or forced; refused rather than skipped."""


class RoutesValidationError(MoEReplayError, ValueError):
    """Routes that do not fit the model or are malformed (range, k, duplicates, dtype)."""


class LayerMapError(MoEReplayError, ValueError):
    """A :class:`~moe_replay.LayerMap` that cannot place the routers on the engine's layers."""


class CaptureOverflowError(MoEReplayError):
    """A capture that does not fit: rows past a fixed ring (CUDA graph, torch.compile), or memory past ``max_bytes``."""


class ReplayConsumptionError(MoEReplayError):
    """A router consumed fewer or more rows than were recorded for it."""


class TokenMismatchError(RoutesValidationError):
    """A replayed forward fed other tokens than its routes were recorded for (:attr:`Routes.token_ids`)."""


class SessionStateError(MoEReplayError):
    """An operation that the session's current state does not allow (nesting, detached).

    Where :func:`attach` raises it because another session holds the model (or one of its
    routers), its ``session`` attribute is that session: ``e.session.detach()`` frees the model
    where no name holds the session any more (a notebook cell that showed ``mr.attach(model)``).
    """

    #: the session in the way, where another one holds the model or a router (else None)
    session: Any = None


class InvalidArgumentError(MoEReplayError, ValueError):
    """An argument with a value the function cannot use (also a ``ValueError``)."""


class ArgumentTypeError(MoEReplayError, TypeError):
    """An argument of the wrong type, or a call of a public function, constructor or method whose arguments do not
    bind to its signature: an unknown or misspelled keyword, a required argument left out, too many by position
    (also a ``TypeError``, as Python raises for those)."""


class TokenIndexError(MoEReplayError, IndexError):
    """A token index outside the routes (also an ``IndexError``)."""


class MissingFileError(MoEReplayError, FileNotFoundError):
    """A file to read does not exist (also a ``FileNotFoundError``)."""

    __str__ = RuntimeError.__str__


class NotAFileError(MoEReplayError, IsADirectoryError):
    """A path to read is a directory or no regular file, a pipe or a device (also an ``IsADirectoryError``)."""

    __str__ = RuntimeError.__str__


class MissingDependencyError(MoEReplayError, ImportError):
    """An optional package that this feature needs is not installed (also an ``ImportError``)."""


class _ReadOnlyError(MoEReplayError, AttributeError):
    """An attribute set on a value that holds none of its own (:class:`~moe_replay.Routes`); also an
    ``AttributeError``, as Python raises for a property that has no setter."""


class _FrozenError(_ReadOnlyError, dataclasses.FrozenInstanceError):
    """An attribute set on or deleted from a frozen value the API hands out (:class:`~moe_replay.BatchLayout`...);
    also the ``dataclasses.FrozenInstanceError`` the dataclass itself raises, so code that catches that still does."""


class _ScriptError(UnsupportedRouterError, AttributeError):
    """``torch.jit.script`` of a module whose ``forward`` is one of moe_replay's wrappers (also an ``AttributeError``:
    raised where TorchScript reads the wrapper's ``__globals__``, so ``hasattr`` and ``getattr`` with a default still
    find no such attribute)."""


def _script_refusal(wrapper: object, module: object, copied: bool) -> _ScriptError:
    """The error for TorchScript compiling ``wrapper``, the ``forward`` of ``module`` (``copied``: a copy's)."""
    name = type(module).__name__
    if copied:
        return _ScriptError(
            f"torch.jit.script cannot compile the forward of this {name}: it is a copy (copy.deepcopy, pickle, "
            "torch.save) of a module that a moe_replay session was attached to, and keeps a forward attribute that "
            "calls its class's forward. Take those off the copy first: mr.attach(copy).detach(), or `del "
            "module.forward` on each such module"
        )
    return _ScriptError(
        f"torch.jit.script of a model attached to a moe_replay session (the forward of this {name} is the session's "
        f"{type(wrapper).__name__}): a scripted module runs no Python, so its routers would be neither recorded nor "
        "forced. Detach first (session.detach()) to script the plain model; capture and replay run under "
        "torch.compile"
    )


#: How dynamo reports an exception raised in code it traced: ``raised exception Name("message")`` (torch 2.13),
#: ``raised exception Name((ConstantVariable(str: "message"),))`` (torch 2.11); the message a Python literal.
_TRACED = re.compile(r"raised exception (\w+)\(")
_LITERAL = re.compile(r"""(?:\(+ConstantVariable\(str: )?("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


def _from_compiler(error: BaseException) -> MoEReplayError | None:
    """The error of ours that torch.compile traced being raised, which it reports as its own, or None.

    Under ``fullgraph=True`` (or wherever the compiler cannot fall back to running the code), an error that a
    router forward raises while dynamo traces it comes out as dynamo's ``Unsupported`` exception, whose text
    holds ``raised exception UnsupportedRouterError("...")``. This rebuilds that error (same class, same
    message), so that a block can raise it from the compiler's: what is wrong and what to do stay a
    :class:`MoEReplayError`.
    """
    seen: set[int] = set()
    at: BaseException | None = error
    while at is not None and id(at) not in seen and type(at).__module__.startswith("torch."):
        seen.add(id(at))
        for text in (a for a in at.args if isinstance(a, str)):
            for found in _TRACED.finditer(text):
                cls = globals().get(found[1])
                literal = _LITERAL.match(text, found.end())
                if not (isinstance(cls, type) and issubclass(cls, MoEReplayError)) or literal is None:
                    continue
                try:
                    message = ast.literal_eval(literal[1])
                except (ValueError, SyntaxError):
                    continue
                if isinstance(message, str):
                    return cls(message)
        at = at.__cause__ or at.__context__
    return None


# ----------------------------------------------------------------------------- calls that do not bind
_P = ParamSpec("_P")
_R = TypeVar("_R")
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
#: each public entry point checked (see :func:`_check_calls`) -> the function that checks its calls
_CHECKED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _call_refusal(
    fn: Callable[..., Any], shown: str, skip: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ArgumentTypeError | None:
    """The error for a call of ``fn`` (shown as ``shown``, its first ``skip`` parameters ``self`` or ``cls``) with
    ``args`` and ``kwargs``, where they do not bind to its signature; None where they do (a ``TypeError`` raised
    in its body is its own)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (no signature to read: nothing to tell)
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        problem = str(err)
    else:
        return None
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in list(signature.parameters.values())[skip:]]
    takes = f"{shown}{signature.replace(parameters=params, return_annotation=empty)}"
    by_keyword = [p.name for p in params if p.kind in _KEYWORD]
    positional = sum(p.kind in _POSITIONAL for p in params)
    wild = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [key for key in kwargs if key not in by_keyword] if not wild else []
    if unknown:
        near = difflib.get_close_matches(unknown[0], by_keyword, n=1, cutoff=0.6)
        problem = f"got an unexpected keyword argument {unknown[0]!r}" + (
            f" (did you mean {near[0]!r}?)" if near else ""
        )
    elif "too many positional" in problem:
        plural = "" if positional == 1 else "s"
        problem = f"takes at most {positional} positional argument{plural}, got {len(args) - skip}"
    valid = ", ".join(p.name for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL,)) or "none"
    named = " (those after `*` by name only)" if any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params) else ""
    return ArgumentTypeError(f"{shown}() {problem}. Its parameters are: {valid}; call it as {takes}{named}")


def _checked(fn: Callable[_P, _R], shown: str, skip: int = 0) -> Callable[_P, _R]:
    """``fn``, whose call raises an :class:`ArgumentTypeError` (also a ``TypeError``) where its arguments do not bind
    to its signature (an unknown or misspelled keyword, a required one missing, too many by position), naming it as
    ``shown``, the argument, the closest valid name and its parameters: Python's own ``TypeError`` says none of what
    to do. A call that binds costs one frame and a ``try``: only for entry points called by hand, never per forward.
    Its signature, docstring and ``help()`` are ``fn``'s (``functools.wraps``)."""
    if fn in _CHECKED:
        return _CHECKED[fn]

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except TypeError as err:
            if isinstance(err, MoEReplayError):
                raise
            refusal = _call_refusal(fn, shown, skip, args, kwargs)
            if refusal is None:
                raise
            raise refusal from None

    _CHECKED[fn] = _CHECKED[call] = call
    return call


def _check_class(cls: type, methods: bool) -> None:
    """Check the calls of ``cls``'s constructor (its own ``__init__``) and, with ``methods``, of its public methods,
    class methods and static methods (see :func:`_checked`); its properties and special methods are left alone."""
    for name, value in list(vars(cls).items()):
        if name != "__init__" and (name.startswith("_") or not methods):
            continue
        shown = cls.__qualname__ if name == "__init__" else f"{cls.__qualname__}.{name}"
        if isinstance(value, (classmethod, staticmethod)) and inspect.isfunction(value.__func__):
            kind = type(value)
            skip = 1 if kind is classmethod else 0
            setattr(cls, name, kind(_checked(value.__func__, shown, skip)))
        elif inspect.isfunction(value):
            setattr(cls, name, _checked(value, shown, 1))


def _check_calls(module_name: str, methods: bool = False) -> None:
    """Check the calls of every public entry point of a module (those named in its ``__all__``, see
    :func:`_checked`): its functions, its classes' constructors and, with ``methods``, their public methods. A
    function is replaced where the module names it and where it is defined (so that ``pickle`` still finds it);
    exceptions and values are left alone. Called once, as the package is imported."""
    module = sys.modules[module_name]
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if isinstance(obj, type):
            if not issubclass(obj, BaseException) and obj.__module__.startswith("moe_replay"):
                _check_class(obj, methods)
        elif inspect.isfunction(obj) and obj.__module__.startswith("moe_replay"):
            checked = _checked(obj, obj.__name__)
            for holder in (module, sys.modules.get(obj.__module__)):
                if holder is not None and getattr(holder, name, None) is obj:
                    setattr(holder, name, checked)
