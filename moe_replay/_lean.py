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
back, so other code that wraps these names keeps working. A lean forward wraps only the names its
router can reach (:class:`Names`): those its code reads as ``torch.<name>``, those the audited
forward called through torch's own code, and the masks (``MASKS``) always.
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

__all__ = [
    "ALL",
    "MASKS",
    "NAMES",
    "ORIGINALS",
    "SWAP",
    "Names",
    "bypasses",
    "enter",
    "leave",
    "names_of",
    "put_back",
    "reach",
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
    used = state.used
    if used is not None:
        used.add(orig)
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
                forced = src.read_eager(n) if src.host_consumed + n <= src.num_rows else hook._forced(n)
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
#: torch's module dict, where the names are swapped.
NAMES = torch.__dict__
for _name, _op in _NAMES.items():
    _torch_compat.register_jit_builtin(_WRAPPERS[_name], _op)
#: Each original function to its name.
NAME_OF = {fn: name for name, fn in ORIGINALS.items()}


class Names:
    """Some of the wrapped names, with what swapping them in and out takes, prepared once.

    ``current(NAMES)`` is what they are bound to now, to compare with ``ours`` (the wrappers) or
    ``theirs`` (torch's functions); ``NAMES.update(on)`` puts the wrappers in, ``NAMES.update(off)``
    torch's functions back. Get one with :func:`names_of`.
    """

    __slots__ = ("current", "keys", "off", "on", "ours", "theirs")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.current = operator.itemgetter(*keys)
        ours = tuple(_WRAPPERS[k] for k in keys)
        theirs = tuple(ORIGINALS[k] for k in keys)
        self.ours: Any = ours if len(keys) > 1 else ours[0]  # (what itemgetter returns for one key)
        self.theirs: Any = theirs if len(keys) > 1 else theirs[0]
        self.on = dict(zip(keys, ours, strict=True))
        self.off = dict(zip(keys, theirs, strict=True))

    def __repr__(self) -> str:
        return f"Names({', '.join(self.keys)})"


_KNOWN_NAMES: dict[frozenset[str], Names] = {}


def names_of(names: Any) -> Names:
    """The :class:`Names` of these names (an iterable of wrapped names; none or an unknown one: all of them)."""
    key = frozenset(names)
    if not key or not key <= _NAMES.keys():
        key = frozenset(_NAMES)
    found = _KNOWN_NAMES.get(key)
    if found is None:
        found = _KNOWN_NAMES[key] = Names(tuple(n for n in _NAMES if n in key))
    return found


#: Every wrapped name (what an audited forward swaps).
ALL = names_of(_NAMES)
#: Swapped in every lean forward: a mask missed would give forced experts masked weights, where a
#: decision-like call missed on a branch the audit did not take only goes uncounted.
MASKS = frozenset({"masked_fill", "where"})


class _Swap:
    """Router forwards running with wrappers in place, over all threads (the first puts them in).

    ``put``: the names put in since the first of them began, for the last to take out (all of them once
    a nested or concurrent forward with names of its own has come in).
    """

    __slots__ = ("depth", "lock", "put")

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()
        self.put = ALL


SWAP = _Swap()


def put_in(names: Names) -> bool:
    """With ``SWAP.lock`` held and ``SWAP.depth`` raised: the wrappers of ``names`` in place.

    The first forward with every name still torch's puts them in at once; later ones (nested, or in
    another thread) put in those not in yet. Returns False, changing nothing, where another library
    has wrapped one of ``names`` since torch was imported: a lean forward would not see the calls
    made through it, and must run under the mode instead.
    """
    d = NAMES
    now = names.current(d)
    if now == names.theirs and SWAP.depth == 1:  # the usual case, in one go
        d.update(names.on)
        SWAP.put = names
        return True
    for name in names.keys:
        if d[name] is not ORIGINALS[name] and d[name] is not _WRAPPERS[name]:
            return False
    d.update(names.on)
    SWAP.put = ALL
    return True


def enter(names: Names = ALL) -> bool:
    """Put the wrappers of ``names`` in place for a router forward (see :func:`put_in`).

    Returns whether each of them is ours now. Where one is another library's, the others of ``ALL`` are
    put in all the same (the audited forward, which checks whether its calls came through them).
    A lean router's forward does this inline (``ScopedForward.__call__``).
    """
    with SWAP.lock:
        SWAP.depth += 1
        if put_in(names):
            return True
        if names is ALL:
            for name, orig, wrapper in _SWAPS:
                if NAMES[name] is orig:  # never over another library's wrapper
                    NAMES[name] = wrapper
            SWAP.put = ALL
        return False


def leave() -> None:
    """The router forward is over; the last one puts torch's functions back (where ours still are)."""
    with SWAP.lock:
        SWAP.depth -= 1
        if SWAP.depth == 0:
            put_back()


def put_back() -> None:
    """Torch's functions back where the wrappers are (the last router forward does this, under ``SWAP.lock``)."""
    names, put = NAMES, SWAP.put
    SWAP.put = ALL
    if put.current(names) == put.ours:
        names.update(put.off)
        return
    for name in put.keys:
        if names[name] is _WRAPPERS[name]:
            names[name] = ORIGINALS[name]


# ----------------------------------------------------------------------------- the router's code
#: How far the code a router's forward reaches is read, and how much of it.
_MAX_DEPTH = 6
_MAX_CODES = 200


def bypasses(forward: Callable[..., Any]) -> list[str]:
    """The places in a router's code that would call a decision-like function or a mask without a wrapper
    (see :func:`reach`)."""
    return reach(forward)[0]


def reach(forward: Callable[..., Any]) -> tuple[list[str], frozenset[str]]:
    """The places in a router's code that would call a decision-like function or a mask without a wrapper,
    and the wrapped names it calls through ``torch.`` (those its lean forwards swap, with the audit's).

    The audited forward shows that the calls it made came through the wrappers; a later forward
    may take another branch. So the code itself is read too: the scope's ``forward``, the
    functions it names as globals, the methods and submodule forwards it reaches through
    ``self`` (through ``super()`` too, and functions or callable objects kept as its attributes), and the
    functions defined inside them. A ``topk``/``argmax``/``max``/``min``/
    ``sort``/``argsort``/``kthvalue``/``masked_fill``/``where`` taken as an attribute of anything
    but the ``torch`` module (``scores.topk``, ``torch.Tensor.topk``) or a global name bound to
    torch's own function (``from torch import topk``) is such a place. Code reached in other ways
    (a callable passed in as an argument, say) is not read. A router with any such place keeps the
    mode: only a router whose reachable code calls these through ``torch.`` goes lean.
    """
    out: list[str] = []
    used: set[str] = set()
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
        calls_super = False
        for ins in dis.get_instructions(code):
            op, name = ins.opname, ins.argval
            if op.startswith(("LOAD_GLOBAL", "LOAD_NAME")) and name == "super" and owner is not None:
                calls_super = True
            if calls_super and op.startswith(("LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR")) and isinstance(name, str):
                for cls in type(owner).__mro__:  # super().<name>: any class's <name> (all of them read)
                    found = cls.__dict__.get(name)
                    if isinstance(found, types.FunctionType):
                        read(found, owner, depth + 1)
            if (
                previous is not None
                and previous.opname.startswith(("LOAD_GLOBAL", "LOAD_NAME"))
                and names.get(previous.argval) is torch
                and (not op.startswith(("LOAD_ATTR", "LOAD_METHOD")) or name == "__dict__")
            ):  # the module itself handed on (getattr(torch, name), torch.__dict__...): any name may be called
                used.update(_NAMES)
            if op.startswith(("LOAD_ATTR", "LOAD_METHOD")) and isinstance(name, str):
                base = previous
                on_torch = (
                    base is not None
                    and base.opname.startswith(("LOAD_GLOBAL", "LOAD_NAME"))
                    and names.get(base.argval) is torch
                )
                if name in _NAMES and on_torch:
                    used.add(name)
                elif name in _NAMES:
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
                    elif isinstance(target, types.FunctionType):  # a function kept as an attribute
                        read(target, None, depth + 1)
                    elif isinstance(call := _call_of(target), types.FunctionType):
                        read(call, target, depth + 1)  # an object called like one
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
    return out, frozenset(used)


def _call_of(obj: Any) -> Any:
    """The ``__call__`` that calling ``obj`` runs (looked up on its class, as a call does), or None."""
    return next((c.__dict__["__call__"] for c in type(obj).__mro__ if "__call__" in c.__dict__), None)
