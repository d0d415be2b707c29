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
import inspect
import operator
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat
from .evidence import NESTING, UNWRAP

__all__ = [
    "CURRENT",
    "NAMES",
    "OFF",
    "ON",
    "ORIGINALS",
    "OURS",
    "SWAP",
    "THEIRS",
    "bypasses",
    "enter",
    "leave",
    "put_back",
]

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


class _Swap:
    """Router forwards running with the wrappers in place, over all threads (the first puts them in)."""

    __slots__ = ("depth", "lock")

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()


SWAP = _Swap()


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
            return _audited(state, orig, args, kwargs) if state.auditing else orig(*args, **kwargs)
        return hook.on_lean(orig, args, kwargs)  # (it clears state.lean while it makes torch calls of its own)

    return wrapper


def _audited(state: Any, orig: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A call outside any lean forward while a forward is audited: the mode checks that it came through here."""
    state.via = orig
    try:
        return orig(*args, **kwargs)
    finally:
        state.via = None


def _wrap_topk(orig: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_wrap` for ``topk``, which answers a lean router's decision in its learned form itself.

    The hook's ``_fast`` is ``(ordinal, rest, keywords, width, dtype, source, ring)`` in a forward
    where the decision may be answered at once (see ``RouterHook._fast``): a call at that ordinal
    with those arguments after 2-D scores of that width and dtype is answered here, without a
    frame of the hook's: the native top-k with its indices copied into ``ring`` (capture), or the
    recorded rows of ``source`` and a ``gather`` (replay, copied into ``ring`` too when one is
    given). Any other call goes to ``hook.on_lean``, which answers as the mode would.
    """

    @functools.wraps(orig)
    def topk(*args: Any, **kwargs: Any) -> Any:
        if _compiling():
            return orig(*args, **kwargs)
        state = NESTING
        hook = state.lean
        if hook is None:
            return _audited(state, orig, args, kwargs) if state.auditing else orig(*args, **kwargs)
        form = hook._fast
        if form is not None and hook._ordinal == form[0] and args[1:] == form[1] and kwargs == form[2] and args:
            x = args[0]
            if (
                type(x) is _TENSOR
                and x.dim() == 2
                and x.shape[1] == form[3]
                and x.dtype is form[4]
                and (not hook._entry_grad or (_top_hooks() is None and _fwd_grad()))  # (no checkpoint opened inside)
            ):
                hook._ordinal += 1
                hook._decided = True
                hook.decisions += 1
                src, ring = form[5], form[6]
                if src is None:  # capture
                    out = orig(*args, **kwargs)
                    ring.write_eager(out[1])
                    hook._answered = out[1]
                    return out
                n = x.shape[0]
                forced = src.read_eager(n) if src.host_consumed + n <= src.cleared else hook._forced(n)
                if ring is not None:
                    ring.write_eager(forced)
                hook._answered = forced
                return _TOPK_RESULT((x.gather(1, forced), forced))
        return hook.on_lean(orig, args, kwargs)  # (it clears state.lean while it makes torch calls of its own)

    return topk


_TENSOR = torch.Tensor
_top_hooks = _torch_compat.top_saved_tensors_hooks
_fwd_grad = _torch_compat.fwd_grad_enabled
_TOPK_RESULT = torch.return_types.topk
_WRAPPERS = {name: (_wrap_topk if name == "topk" else _wrap)(fn) for name, fn in ORIGINALS.items()}
UNWRAP.update({_WRAPPERS[name]: fn for name, fn in ORIGINALS.items()})


_SWAPS = [(name, ORIGINALS[name], _WRAPPERS[name]) for name in _NAMES]
_KEYS = tuple(_NAMES)
#: What torch's names are bound to now, as a tuple: ``CURRENT(NAMES)``.
CURRENT = operator.itemgetter(*_KEYS)
NAMES = torch.__dict__
#: The names bound to the wrappers; to torch's functions.
OURS = tuple(_WRAPPERS[name] for name in _KEYS)
THEIRS = tuple(ORIGINALS[name] for name in _KEYS)
#: ``NAMES.update(ON)`` puts every wrapper in; ``NAMES.update(OFF)`` every original back.
ON = dict(zip(_KEYS, OURS, strict=True))
OFF = dict(zip(_KEYS, THEIRS, strict=True))
for _name, _op in _NAMES.items():
    _torch_compat.register_jit_builtin(_WRAPPERS[_name], _op)


def enter() -> bool:
    """Put the wrappers in place for a router forward (the first of nested or concurrent ones does).

    Returns whether every name is ours now: where another library has wrapped one since
    torch was imported, a lean forward would not see the calls made through it, and must
    run under the mode instead. A lean router's forward does this inline
    (``ScopedForward.__call__``): with ``SWAP.lock``, ``SWAP.depth`` up by one, and where it is
    the first, ``NAMES.update(ON)`` when ``CURRENT(NAMES) == THEIRS``.
    """
    with SWAP.lock:
        SWAP.depth += 1
        names = NAMES
        if SWAP.depth > 1:
            return CURRENT(names) == OURS
        if CURRENT(names) == THEIRS:  # the usual case, in one go
            names.update(ON)
            return True
        for name, orig, wrapper in _SWAPS:
            if names[name] is orig:  # never over another library's wrapper
                names[name] = wrapper
        return False


def leave() -> None:
    """The router forward is over; the last one puts torch's functions back (where ours still are)."""
    with SWAP.lock:
        SWAP.depth -= 1
        if SWAP.depth == 0:
            put_back()


def put_back() -> None:
    """Torch's functions back where the wrappers are (the last router forward does this, under ``SWAP.lock``)."""
    names = NAMES
    if CURRENT(names) == OURS:
        names.update(OFF)
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
    may take another branch. So the code itself is read too: the scope's ``forward``; the
    functions it names as globals, or as attributes of a module or class it names
    (``utils.route``, ``Routing.pick``); the methods, property getters, submodule forwards (those
    of a container's children too), functions and callable objects it reaches through ``self`` or
    ``super()``;
    the functions a decorated one wraps; and the functions defined inside all of these. A
    ``topk``/``argmax``/``max``/``min``/``sort``/``argsort``/``kthvalue``/``masked_fill``/``where``
    taken as an attribute of anything but the ``torch`` module (``scores.topk``,
    ``torch.Tensor.topk``) or a global name bound to torch's own function (``from torch import
    topk``) is such a place. Code reached in other ways (a callable passed in as an argument,
    held in a local variable or a container, or reached through two attributes) is not read. A
    router with any such place keeps the mode: only a router whose reachable code calls these
    through ``torch.`` goes lean.
    """
    out: list[str] = []
    seen: set[int] = set()
    originals = {id(fn): name for name, fn in ORIGINALS.items()}

    def where(code: types.CodeType, ins: dis.Instruction) -> str:
        line = ins.positions.lineno if ins.positions is not None else code.co_firstlineno
        return f"{code.co_filename.rsplit('/', 1)[-1]}:{line}"

    def read(fn: Any, owner: Any, depth: int) -> None:
        fn = getattr(fn, "__func__", fn)
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None and wrapped is not fn:  # a decorated function: what it wraps too
            read(wrapped, owner, depth + 1)
        code = getattr(fn, "__code__", None)
        if code is None or id(code) in seen:
            return
        if depth > _MAX_DEPTH or len(seen) >= _MAX_CODES:
            out.append(f"{getattr(fn, '__qualname__', fn)} (too deep to read)")
            return
        module = getattr(fn, "__module__", "") or ""
        if _is_torch(module):
            return  # torch's own code
        for cell in getattr(fn, "__closure__", None) or ():  # a decorator's wrapper calls what it closes over
            try:
                held = cell.cell_contents
            except ValueError:  # (an empty cell)
                continue
            if isinstance(held, types.FunctionType):
                read(held, owner, depth + 1)
        read_code(code, getattr(fn, "__globals__", {}), owner, depth)

    def read_attribute(target: Any, depth: int) -> None:
        """What a router reaches as ``self.<name>``: a method, a submodule, a function or a callable object."""
        if isinstance(target, torch.nn.Module):
            if getattr(target.forward, "__moe_replay_hook__", None) is not None:
                return  # another router reads its own
            try:
                forward = type(target).forward
            except AttributeError:  # a scripted module's class holds a descriptor that raises when read there
                forward = inspect.getattr_static(type(target), "forward", None)
            if _is_torch(getattr(forward, "__module__", "") or ""):  # a container's: its children's
                for child in target.children():
                    read_attribute(child, depth + 1)
            else:
                read(forward, target, depth + 1)
        elif isinstance(target, types.MethodType):
            read(target, target.__self__, depth + 1)
        elif isinstance(target, types.FunctionType):  # a function kept as an attribute
            read(target, None, depth + 1)
        elif isinstance(call := _call_of(target), types.FunctionType):  # an object called like one
            read(call, target, depth + 1)

    def read_code(code: types.CodeType, names: dict[str, Any], owner: Any, depth: int) -> None:
        seen.add(id(code))
        self_name = code.co_varnames[0] if code.co_argcount and owner is not None else None
        previous: dis.Instruction | None = None
        calls_super = False
        for ins in dis.get_instructions(code):
            op, name = ins.opname, ins.argval
            if op.startswith(("LOAD_GLOBAL", "LOAD_NAME")) and name == "super" and owner is not None:
                calls_super = True
            if calls_super and op.startswith(("LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR")) and isinstance(name, str):
                for cls in type(owner).__mro__:  # super().<name>: any class's <name> (all of them read)
                    found = cls.__dict__.get(name)
                    if isinstance(found, (staticmethod, classmethod)):
                        found = found.__func__
                    if isinstance(found, types.FunctionType):
                        read(found, owner, depth + 1)
            if op.startswith(("LOAD_ATTR", "LOAD_METHOD")) and isinstance(name, str):
                base = previous
                named = (
                    names.get(base.argval, getattr(builtins, base.argval, None))
                    if base is not None and base.opname.startswith(("LOAD_GLOBAL", "LOAD_NAME"))
                    else None
                )
                on_torch = named is torch
                if name in _NAMES and not on_torch:
                    out.append(f".{name} at {where(code, ins)}")
                elif (
                    base is not None
                    and base.opname.startswith("LOAD_FAST")
                    and base.argval == self_name
                    and owner is not None
                ):
                    static = inspect.getattr_static(owner, name, None)
                    if isinstance(static, property):  # its getter is code the router runs: read, not run
                        read(static.fget, owner, depth + 1)
                    else:
                        try:
                            target = getattr(owner, name, None)
                        except Exception:  # (an attribute that fails to resolve fails the router's forward too)
                            target = None
                        read_attribute(target, depth)
                elif isinstance(named, (types.ModuleType, type)) and not _is_torch(
                    getattr(named, "__name__" if isinstance(named, types.ModuleType) else "__module__", "") or ""
                ):  # a function of a module or class the code names: utils.route, Routing.pick
                    target = inspect.getattr_static(named, name, None)  # (no lazy import, no descriptor run)
                    if isinstance(target, (staticmethod, classmethod)):
                        target = target.__func__
                    if isinstance(target, types.FunctionType):
                        read(target, None, depth + 1)
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


def _is_torch(module: str) -> bool:
    """Is this module name torch's own (``torch`` or ``torch.*``)?"""
    return module == "torch" or module.startswith("torch.")


def _call_of(obj: Any) -> Any:
    """The ``__call__`` that calling ``obj`` runs (looked up on its class, as a call does), or None."""
    return next((c.__dict__["__call__"] for c in type(obj).__mro__ if "__call__" in c.__dict__), None)
