"""Lean interception: the decision-like torch functions, wrapped while a router's forward runs.

The general interception runs a router's whole forward under a
:class:`~torch.overrides.TorchFunctionMode`, so every torch call of it (the gate's
``linear``, the ``softmax``...) makes a round trip through Python. In an eager decode step,
which is bound by the host, that round trip is most of what capture costs.

While an eager router forward runs under a session, the module functions of :mod:`torch`
that can make or shape a decision (``torch.topk``, ``torch.argmax``... and
``torch.masked_fill``/``torch.where``) are thin wrappers that call the original and, in the
thread where a *lean* router's forward runs, hand the call to that router instead. A router
becomes lean for a (training, gradients) mode once one whole forward under the mode (under
the mode *and* the wrappers) has shown that every call the mode acted on came through the
wrappers (``torch.topk(x, k)``, not ``x.topk(k)`` nor a name bound at import). Its later
forwards then see exactly the calls the mode would have seen, without the mode. Routers whose
calls do not all go through the wrappers keep the mode; compiled code always does, and never
sees a wrapper (they are in place only while an eager router forward runs).

Only names still bound to torch's own functions are wrapped, and only our own wrappers are put
back, so other code that wraps these names keeps working.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat
from .evidence import NESTING, UNWRAP

__all__ = ["ORIGINALS", "enter", "leave"]

#: The names wrapped, with the aten operator TorchScript should compile each wrapper to.
_NAMES = {
    "topk": "aten::topk",
    "argmax": "aten::argmax",
    "argmin": "aten::argmin",
    "max": "aten::max",
    "min": "aten::min",
    "sort": "aten::sort",
    "argsort": "aten::argsort",
    "kthvalue": "aten::kthvalue",
    "masked_fill": "aten::masked_fill",
    "where": "aten::where",
}
#: torch's own functions, as imported.
ORIGINALS: dict[str, Callable[..., Any]] = {name: getattr(torch, name) for name in _NAMES}

_lock = threading.Lock()
_depth = 0  # router forwards running with the wrappers in place, over all threads


_compiling = torch.compiler.is_compiling


def _wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _compiling():  # compiled routers keep the mode; dynamo never reads the state
            return orig(*args, **kwargs)
        state = NESTING
        hook = state.lean
        if hook is None:
            if not state.auditing:
                return orig(*args, **kwargs)
            state.via = orig  # the mode checks that the call it gets came through here
            try:
                return orig(*args, **kwargs)
            finally:
                state.via = None
        state.lean = None  # the router's own torch calls while it answers are not its forward's
        try:
            return hook.on_lean(orig, args, kwargs)
        finally:
            state.lean = hook

    return wrapper


_WRAPPERS = {name: _wrap(fn) for name, fn in ORIGINALS.items()}
UNWRAP.update({_WRAPPERS[name]: fn for name, fn in ORIGINALS.items()})


_SWAPS = [(name, ORIGINALS[name], _WRAPPERS[name]) for name in _NAMES]
_KEYS = tuple(_NAMES)
_CURRENT = operator.itemgetter(*_KEYS)  # what torch's names are bound to now, as a tuple
_OURS = tuple(_WRAPPERS[name] for name in _KEYS)
_THEIRS = tuple(ORIGINALS[name] for name in _KEYS)
_ON = dict(zip(_KEYS, _OURS, strict=True))
_OFF = dict(zip(_KEYS, _THEIRS, strict=True))
for _name, _op in _NAMES.items():
    _torch_compat.register_jit_builtin(_WRAPPERS[_name], _op)


def enter() -> None:
    """Put the wrappers in place for a router forward (the first of nested or concurrent ones does)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            names = torch.__dict__
            if _CURRENT(names) == _THEIRS:  # the usual case, in one go
                names.update(_ON)
                return
            for name, orig, wrapper in _SWAPS:
                if names[name] is orig:  # never over another library's wrapper
                    names[name] = wrapper


def leave() -> None:
    """The router forward is over; the last one puts torch's functions back (where ours still are)."""
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            names = torch.__dict__
            if _CURRENT(names) == _OURS:
                names.update(_OFF)
                return
            for name, orig, wrapper in _SWAPS:
                if names[name] is wrapper:
                    names[name] = orig
