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

import builtins
import dis
import functools
import operator
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat
from .evidence import NESTING, UNWRAP

__all__ = ["ORIGINALS", "REFUSED", "bypasses", "enter", "leave", "run"]

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


# only dynamo can trace a wrapper (they are in place while an eager router forward runs alone)
_compiling = _torch_compat.dynamo_compiling


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
        return hook.on_lean(orig, args, kwargs)  # (it clears state.lean while it makes torch calls of its own)

    return wrapper


_WRAPPERS = {name: _wrap(fn) for name, fn in ORIGINALS.items()}
UNWRAP.update({_WRAPPERS[name]: fn for name, fn in ORIGINALS.items()})


_SWAPS = [(name, ORIGINALS[name], _WRAPPERS[name]) for name in _NAMES]
_KEYS = tuple(_NAMES)
_CURRENT = operator.itemgetter(*_KEYS)  # what torch's names are bound to now, as a tuple
_OURS = tuple(_WRAPPERS[name] for name in _KEYS)
_THEIRS = tuple(ORIGINALS[name] for name in _KEYS)
_TORCH = torch.__dict__
_ON = dict(zip(_KEYS, _OURS, strict=True))
_OFF = dict(zip(_KEYS, _THEIRS, strict=True))
for _name, _op in _NAMES.items():
    _torch_compat.register_jit_builtin(_WRAPPERS[_name], _op)


def enter() -> bool:
    """Put the wrappers in place for a router forward (the first of nested or concurrent ones does).

    Returns whether every name is ours now: where another library has wrapped one since
    torch was imported, a lean forward would not see the calls made through it, and must
    run under the mode instead.
    """
    global _depth
    with _lock:
        _depth += 1
        names = torch.__dict__
        if _depth > 1:
            return _CURRENT(names) == _OURS
        if _CURRENT(names) == _THEIRS:  # the usual case, in one go
            names.update(_ON)
            return True
        for name, orig, wrapper in _SWAPS:
            if names[name] is orig:  # never over another library's wrapper
                names[name] = wrapper
        return False


#: What :func:`run` returns, without running the forward, when another library wraps one of the names.
REFUSED: Any = object()


def run(hook: Any, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a lean router's forward: the wrappers in place, and its calls handed to ``hook.on_lean``.

    :func:`enter`, the forward and :func:`leave` in one Python frame (this runs at every router
    call of an eager decode step). Returns :data:`REFUSED`, having run nothing, where another
    library wraps one of the names since torch was imported: the forward must run under the mode.
    """
    global _depth
    names = _TORCH
    with _lock:
        _depth += 1
        if _depth == 1 and _CURRENT(names) == _THEIRS:  # the usual case, in one go
            names.update(_ON)
        elif _CURRENT(names) != _OURS:
            _depth -= 1
            return REFUSED
    state = NESTING
    outer = state.lean
    state.depth += 1
    state.lean = hook
    try:
        return forward(*args, **kwargs)
    finally:
        state.lean = outer
        state.depth -= 1
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _CURRENT(names) == _OURS:
                    names.update(_OFF)
                else:
                    for name, orig, wrapper in _SWAPS:
                        if names[name] is wrapper:
                            names[name] = orig


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


# ----------------------------------------------------------------------------- the router's code
#: How far the code a router's forward reaches is read, and how much of it.
_MAX_DEPTH = 6
_MAX_CODES = 200


def bypasses(forward: Callable[..., Any]) -> list[str]:
    """The places in a router's code that would call a decision-like function or a mask without a wrapper.

    The audited forward shows that the calls it made came through the wrappers; a later forward
    may take another branch. So the code itself is read too: the scope's ``forward``, the
    functions it names as globals, the methods and submodule forwards it reaches through
    ``self``, and the functions defined inside them. A ``topk``/``argmax``/``max``/``min``/
    ``sort``/``argsort``/``kthvalue``/``masked_fill``/``where`` taken as an attribute of anything
    but the ``torch`` module (``scores.topk``, ``torch.Tensor.topk``) or a global name bound to
    torch's own function (``from torch import topk``) is such a place. Code reached in other ways
    (a callable passed in as an argument, say) is not read. A router with any such place keeps the
    mode: only a router whose reachable code calls these through ``torch.`` goes lean.
    """
    out: list[str] = []
    seen: set[int] = set()
    originals = {id(fn): name for name, fn in ORIGINALS.items()}

    def where(code: types.CodeType, ins: dis.Instruction) -> str:
        line = ins.positions.lineno if ins.positions is not None else code.co_firstlineno
        return f"{code.co_filename.rsplit('/', 1)[-1]}:{line}"

    def read(fn: Any, owner: Any, depth: int) -> None:
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is None or id(code) in seen:
            return
        if depth > _MAX_DEPTH or len(seen) >= _MAX_CODES:
            out.append(f"{getattr(fn, '__qualname__', fn)} (too deep to read)")
            return
        module = getattr(fn, "__module__", "") or ""
        if module == "torch" or module.startswith("torch."):
            return  # torch's own code
        read_code(code, getattr(fn, "__globals__", {}), owner, depth)

    def read_code(code: types.CodeType, names: dict[str, Any], owner: Any, depth: int) -> None:
        seen.add(id(code))
        self_name = code.co_varnames[0] if code.co_argcount and owner is not None else None
        previous: dis.Instruction | None = None
        for ins in dis.get_instructions(code):
            op, name = ins.opname, ins.argval
            if op.startswith(("LOAD_ATTR", "LOAD_METHOD")) and isinstance(name, str):
                base = previous
                on_torch = (
                    base is not None
                    and base.opname.startswith(("LOAD_GLOBAL", "LOAD_NAME"))
                    and names.get(base.argval) is torch
                )
                if name in _NAMES and not on_torch:
                    out.append(f".{name} at {where(code, ins)}")
                elif (
                    base is not None
                    and base.opname.startswith("LOAD_FAST")
                    and base.argval == self_name
                    and owner is not None
                ):
                    target = getattr(owner, name, None)
                    if isinstance(target, torch.nn.Module):
                        inner = target.forward
                        if getattr(inner, "__moe_replay_hook__", None) is None:  # another router reads its own
                            read(type(target).forward, target, depth + 1)
                    elif isinstance(target, types.MethodType):
                        read(target, target.__self__, depth + 1)
            elif op.startswith(("LOAD_GLOBAL", "LOAD_NAME")) and isinstance(name, str):
                target = names.get(name, getattr(builtins, name, None))
                if id(target) in originals:
                    out.append(f"{name} (torch.{originals[id(target)]} bound at import) at {where(code, ins)}")
                elif isinstance(target, types.FunctionType):
                    read(target, None, depth + 1)
            elif isinstance(ins.argval, types.CodeType):
                read_code(ins.argval, names, owner, depth + 1)
            previous = ins

    read(forward, getattr(forward, "__self__", None), 0)
    return out
