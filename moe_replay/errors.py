"""Exceptions raised by moe_replay.

Every error names what is wrong and what to do about it. All of them derive from
:class:`MoEReplayError`, so ``except mr.MoEReplayError`` catches any of them.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

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
    """An argument of the wrong type (also a ``TypeError``)."""


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
