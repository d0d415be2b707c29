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
calls do not all go through the wrappers keep the mode, and so do compiled routers. The wrappers
are in place only while an eager router forward runs; a compiled helper that such a forward calls
traces them and breaks its graph where one hands a call to the router, which so still sees it. Torch's
caches of its own namespace are built before the wrappers first go in, so none of them records a
wrapper (see ``_torch_compat.build_namespace_caches``).

Only names still bound to torch's own functions are wrapped, and only our own wrappers are put
back, so other code that wraps these names keeps working.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import operator
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat
from ._code_settings import is_setting
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
    "CodeWitness",
    "bypasses",
    "code_in_arguments",
    "enter",
    "held_in_arguments",
    "leave",
    "put_back",
    "settle",
    "takes_only_tensors",
    "unwrapped",
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


#: torch's caches of its namespaces, built from its own functions before the wrappers go in (see :func:`settle`)
_build_namespace_caches = _torch_compat.build_namespace_caches


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

    The hook's ``_fast`` is ``((ordinal, rest, keywords, (width,), dtype), source, ring)`` in a forward
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
        hook = NESTING.lean
        if hook is None:
            return _audited(NESTING, orig, args, kwargs) if NESTING.auditing else orig(*args, **kwargs)
        form = hook._fast
        if form is not None and args:
            learned, src, ring = form
            x = args[0]
            if (
                type(x) is _TENSOR
                # (at the ordinal, with the arguments learned, after 2-D scores of the width and dtype learned)
                and (hook._ordinal, args[1:], kwargs, x.shape[1:], x.dtype) == learned
                and (not hook._entry_grad or (_top_hooks() is None and _fwd_grad()))  # (no checkpoint opened inside)
            ):
                hook._ordinal += 1
                hook._decided = True
                if src is None:  # capture
                    out = orig(*args, **kwargs)
                    ring.write_eager(idx := out[1])
                    hook._answered = idx
                    return out
                n = x.shape[0]
                forced = src.read_eager(n) if src.host_consumed + n <= src.cleared else hook._forced(n)
                if ring is not None:
                    ring.write_eager(forced)
                hook._answered = forced
                return _TOPK_RESULT((pick(x, forced) if hook._entry_grad else x.gather(1, forced), forced))
        return hook.on_lean(orig, args, kwargs)  # (it clears state.lean while it makes torch calls of its own)

    return topk


class _Pick(torch.autograd.Function):
    """``source.gather(-1, index)`` whose backward keeps what a top-k's or a max's own keeps: the index and the
    shape, not ``source`` (see :func:`pick`)."""

    @staticmethod
    def forward(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return source.gather(-1, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        source, index = inputs
        ctx.save_for_backward(index)
        ctx.save_for_forward(index)
        ctx.shape = source.shape

    @staticmethod
    @torch.compiler.disable  # (a backward run from a compiled training step: dynamo's guards on ctx.saved_tensors
    # would unpack them a second time, which a non-reentrant checkpoint's saved-tensor hooks refuse)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add(-1, index, grad), None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _index: Any) -> torch.Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return tangent.gather(-1, index)


def pick(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source.gather(-1, index)``: the values a decision call returns for forced (or natively chosen) indices.

    With gradients, eagerly, through a function whose backward keeps only ``index`` and the shape, as the backward
    of the top-k, max or sort it answers for does: ``gather``'s own keeps ``source``, so a router that writes its
    scores in place after its decision (a max loop knocking each winner out with ``scatter_``), natively fine,
    would fail its backward under a capture or a replay with autograd's error about a modified tensor."""
    if not (source.requires_grad and torch.is_grad_enabled()) or _compiling():
        return source.gather(-1, index)
    return _Pick.apply(source, index)


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
            _build_namespace_caches()  # (torch's, of its namespace, from its own functions: see settle)
            names.update(ON)
            return True
        for name, orig, wrapper in _SWAPS:
            if names[name] is orig:  # never over another library's wrapper
                names[name] = wrapper
        return False


def settle() -> None:
    """Have torch build the caches it keeps of its namespaces, while no router forward has the wrappers in.

    Torch builds some caches once per process from the functions its namespaces hold
    (:func:`~moe_replay._torch_compat.build_namespace_caches`); one built while the wrappers are in would hold them
    for good, and compiled code would trace ``torch.topk`` without the session's mode. :func:`enter` builds them
    before it puts the wrappers in, a lean router's forward (which puts them in inline) does not: a capture,
    replay or verify block calls this as it opens."""
    with SWAP.lock:
        if SWAP.depth == 0 and CURRENT(NAMES) == THEIRS:
            _build_namespace_caches()


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


def bypasses(forward: Callable[..., Any], witness: CodeWitness | None = None) -> list[str]:
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
    ``torch.Tensor.topk``) is such a place, and so is a name the code reaches that holds torch's
    own function or the Tensor method of its name, bound before a forward put the wrappers in
    (see :func:`unwrapped`): a global (``from torch import topk``), an attribute of ``self`` or of
    a module or class it names (``self.fill = torch.masked_fill`` in ``__init__``), a default
    argument, a closure cell, a ``functools.partial`` of one, or one held in a dict, list, tuple
    or set there; and an attribute of ``self`` the code calls that holds None when read (``self.score_mod(p)``
    behind a test for None): code some forwards are handed there (a block may set it for one forward and take it
    back after, which no check of the code read as blocks start and end sees) is code none of this read. Code
    reached in other ways (held in a local variable, or reached through two
    attributes) is not read; a callable passed in as an argument is not either, but a forward that
    gets one runs under the mode (see :func:`code_in_arguments`). A router with any such place
    keeps the mode: only a router whose reachable code calls these through ``torch.`` goes lean.

    ``witness``: where given, notes the code read through each name (a method of ``self``, a module's
    function, a global), so that a later patch of one is seen (:class:`CodeWitness`).
    """
    out: list[str] = []
    note = witness.note if witness is not None else _ignore
    seen: set[int] = set()

    def where(code: types.CodeType, ins: dis.Instruction) -> str:
        at = getattr(ins, "positions", None)  # (Python 3.11 on: 3.10's instructions hold no positions)
        line = at.lineno if at is not None and at.lineno is not None else code.co_firstlineno
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
            elif (found := unwrapped(held)) is not None:
                out.append(f"{found} held in a closure cell of {getattr(fn, '__qualname__', fn)}")
        if isinstance(fn, types.FunctionType):  # a default argument: `def route(s, pick=torch.topk)`
            for held in (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()):
                if (found := unwrapped(held)) is not None:
                    out.append(f"{found} as a default argument of {fn.__qualname__}")
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
                    note(cls.__dict__, name)
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
                    note(owner, name)
                    if isinstance(static, property):  # its getter is code the router runs: read, not run
                        read(static.fget, owner, depth + 1)
                    else:
                        try:
                            target = getattr(owner, name, None)
                        except Exception:  # (an attribute that fails to resolve fails the router's forward too)
                            target = None
                        if (found := unwrapped(target)) is not None:
                            out.append(f"self.{name} ({found} held there) at {where(code, ins)}")
                        elif target is None and _loads_to_call(ins):  # (code some forwards are handed: unread)
                            out.append(f"self.{name} (None when read, called) at {where(code, ins)}")
                        else:
                            read_attribute(target, depth)
                elif isinstance(named, (types.ModuleType, type)) and not _is_library(
                    getattr(named, "__name__" if isinstance(named, types.ModuleType) else "__module__", "") or ""
                ):  # a function of a module or class the code names: utils.route, Routing.pick
                    target = inspect.getattr_static(named, name, None)  # (no lazy import, no descriptor run)
                    note(named, name)
                    if isinstance(target, (staticmethod, classmethod)):
                        target = target.__func__
                    if isinstance(target, types.FunctionType):
                        read(target, None, depth + 1)
                    elif (found := unwrapped(target)) is not None:
                        spelled = base.argval if base is not None else named.__name__  # (as the code names it)
                        out.append(f"{spelled}.{name} ({found} held there) at {where(code, ins)}")
            elif op.startswith(("LOAD_GLOBAL", "LOAD_NAME")) and isinstance(name, str):
                target = names.get(name, getattr(builtins, name, None))
                note(names, name)
                if (found := unwrapped(target)) is not None:
                    out.append(f"{name} ({found} bound at import) at {where(code, ins)}")
                elif isinstance(target, types.FunctionType):
                    read(target, None, depth + 1)
            elif isinstance(ins.argval, types.CodeType):
                read_code(ins.argval, names, owner, depth + 1)
            previous = ins

    read(forward, getattr(forward, "__self__", None), 0)
    return out


#: torch's own decision-like functions and the Tensor methods of their names, by id: what a name bound to one before a
#: forward put the wrappers in calls, unseen by them
_UNWRAPPED: dict[int, str] = {id(fn): f"torch.{name}" for name, fn in ORIGINALS.items()}
_UNWRAPPED.update(
    {id(m): f"torch.Tensor.{name}" for name in _NAMES if (m := getattr(torch.Tensor, name, None)) is not None}
)
_HOLDERS = (dict, list, tuple, set, frozenset)
_HELD_ITEMS = 64  # items of a container looked at (a long list of tensors held beside is not read through)


def unwrapped(value: Any, depth: int = 0) -> str | None:
    """The decision-like function of torch that calling ``value`` (or what it holds) runs without a lean wrapper, in
    words; None where there is none.

    ``value`` calls it where it is torch's own function (``torch.topk`` as imported, not a wrapper), the Tensor
    method of such a name (``torch.Tensor.topk``, or a tensor's bound ``scores.topk``), or a ``functools.partial``
    of one; one level into a dict, list, tuple or set, an item that is one. Only builtin types are looked into:
    nothing of the value's own code runs.
    """
    found = _UNWRAPPED.get(id(value))
    if found is not None:
        return found
    kind = type(value)
    if (kind is functools.partial or kind is functools.partialmethod) and depth < 4:
        return unwrapped(value.func, depth + 1)
    if kind is types.BuiltinMethodType and value.__name__ in _NAMES and issubclass(type(value.__self__), torch.Tensor):
        return f"a tensor's .{value.__name__}"
    if kind in _HOLDERS and depth == 0:
        items = dict.values(value) if kind is dict else value
        for i, item in enumerate(items):
            if i >= _HELD_ITEMS:
                break
            if (found := unwrapped(item, 1)) is not None:
                return found
    return None


def held_in_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """The arguments of an audited forward that hold torch's own decision-like function (see :func:`unwrapped`):
    a block that passes its router ``fill=self.fill`` hands it code no wrapper sees."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    return [f"{where} ({found})" for where, value in named if (found := unwrapped(value)) is not None]


def takes_only_tensors(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Does a router's ``forward`` take one parameter alone, which took a tensor in this (audited) forward: none left
    to its default, no ``*args`` nor ``**kwargs``, no value of another kind? That one carries the hidden states it
    scores, so no later forward hands it code there, and its lean forwards need not look at their arguments.
    Otherwise they do (see :func:`code_in_arguments`): a block may pass its router torch's ``masked_fill`` on some
    forwards only, where this one got None, or a function of its own in a parameter that took a tensor here (a bias,
    or a function that modifies the scores). Read from the code object alone: nothing of the router runs."""
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return False
    bound = 1 if fn is not forward else 0  # (a bound method: its first parameter is the module)
    if len(args) + len(kwargs) != 1 or code.co_argcount + code.co_kwonlyargcount - bound != 1:
        return False
    return all(isinstance(v, _TENSOR) for v in (*args, *kwargs.values()))


def code_in_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The first argument of a router forward that is (or holds, one level into a dict, list, tuple or set) code: a
    function, torch's own or another (see :func:`unwrapped`), a method, a module, any object called like one; in
    words, else None. No code read in the router's audit is code it runs: such a forward runs under the mode, which
    sees every call. Asked only of routers whose forward takes more than tensors (see :func:`takes_only_tensors`);
    nothing of the values' own code runs."""
    for where, value in (*enumerate(args), *kwargs.items()):
        kind = type(value)
        if kind is _TENSOR or value is None:
            continue
        if callable(value):  # (a tensor is not)
            return f"argument {where!r} ({unwrapped(value) or kind.__qualname__})"
        if kind in _HOLDERS:
            items = dict.values(value) if kind is dict else value
            for i, item in enumerate(items):
                if i >= _HELD_ITEMS:
                    break
                if callable(item):
                    return f"argument {where!r} (holding {unwrapped(item) or type(item).__qualname__})"
    return None


def _loads_to_call(ins: dis.Instruction) -> bool:
    """Does this instruction load an attribute to call it (``self.score_mod(...)``)? Python 3.11 and earlier load
    such an attribute with ``LOAD_METHOD``; later ones with a ``LOAD_ATTR`` whose lowest bit of its argument is set."""
    if ins.opname == "LOAD_METHOD":
        return True
    return _METHOD_FLAG and ins.opname == "LOAD_ATTR" and bool((ins.arg or 0) & 1)


_METHOD_FLAG = sys.version_info >= (3, 12)


def _ignore(holder: Any, name: str) -> None:
    """:meth:`CodeWitness.note` where no witness is kept."""


#: what a name the router's code reads may hold that is code: a patch of one changes what its forward runs
_CODE = (types.FunctionType, types.MethodType, functools.partial, staticmethod, classmethod, property)


class CodeWitness:
    """The code a lean router's forward reaches through names, as it was read (:func:`bypasses`).

    A router goes lean because its code, as read, calls the decision-like functions through the wrappers
    alone. Replace one of the methods it calls (``router.decide = ...``, ``Router.decide = ...``, a module
    function of a helper module) with code that does not, and its later forwards would run it unseen: a mask
    applied by a tensor method would leave forced experts with their masked scores. So each name read as it
    led to code (a function, a method, a ``functools.partial``, a property, torch's own function) or to nothing,
    is noted with what it held; :meth:`changed` tells a name that holds other code now. Checked as a block starts
    and ends, as a router's settings are (not at each forward). Holders are held weakly where they can be.
    """

    __slots__ = ("entries", "noted")

    def __init__(self) -> None:
        self.entries: list[tuple[Callable[[], Any], str, Callable[[], Any]]] = []
        self.noted: set[tuple[int, str]] = set()

    def note(self, holder: Any, name: str) -> None:
        """The code ``holder`` (an object, a class, or a namespace read by key: a module's globals, a class's own
        ``__dict__``) holds at ``name`` now, as the router's code reads it. Names that hold a plain setting (compared
        as settings are) or a module are not noted."""
        if (id(holder), name) in self.noted:
            return
        self.noted.add((id(holder), name))
        value = _lookup(holder, name)
        if (is_setting(value) and value is not None) or isinstance(value, types.ModuleType):
            return
        self.entries.append((_pin(holder), name, _pin(_code_held(value))))

    def changed(self, skip: set[str] | frozenset[str] = frozenset()) -> str | None:
        """A name whose code differs from when it was read, in words; None where none does. ``skip``: names the
        router's own forward assigns (its state)."""
        for holder_ref, name, then_ref in self.entries:
            holder = holder_ref()
            if holder is None or name in skip:
                continue
            now = _code_held(_lookup(holder, name))
            then = then_ref()
            if now is not then:
                where = (
                    f"'{name}'"
                    if type(holder) in _MAPPINGS
                    else f"'{(holder if isinstance(holder, type) else type(holder)).__qualname__}.{name}'"
                )
                return f"{where} is {_spelled(now)}, but was {_spelled(then)} when its code was read"
        return None


_MAPPINGS = (dict, types.MappingProxyType)  # (a module's globals, a class's own namespace: read by key)


def _lookup(holder: Any, name: str) -> Any:
    """What ``holder`` holds at ``name``, as stored (no descriptor run, no ``__getattr__``): a mapping's entry; an
    object's own ``__dict__`` entry, else the first of its class's (a class's: the first along its MRO)."""
    if type(holder) in _MAPPINGS:
        return holder.get(name)
    if not isinstance(holder, type):
        try:
            own = object.__getattribute__(holder, "__dict__")
        except AttributeError:  # (slots alone)
            own = None
        if type(own) is dict and name in own:
            return own[name]
        holder = type(holder)
    for klass in holder.__mro__:
        space = klass.__dict__
        if name in space:
            return space[name]
    return None


def _code_held(value: Any) -> Any:
    """``value`` where it is code (see :data:`_CODE`) or torch's own decision-like function; else None."""
    if isinstance(value, _CODE) or id(value) in _UNWRAPPED:
        return value
    return None


def _pin(value: Any) -> Callable[[], Any]:
    """A weak reference to ``value`` where it takes one (a strong one otherwise: torch's functions, a dict)."""
    if value is None:
        return _none
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


def _none() -> None:
    return None


def _spelled(code: Any) -> str:
    """Code in a message: its qualified name, else its type."""
    if code is None:
        return "no code"
    fn = getattr(code, "__func__", None) or getattr(code, "func", None) or getattr(code, "fget", None) or code
    return getattr(fn, "__qualname__", None) or type(code).__name__


def _is_torch(module: str) -> bool:
    """Is this module name torch's own (``torch`` or ``torch.*``)?"""
    return module == "torch" or module.startswith("torch.")


def _is_library(module: str) -> bool:
    """Is this module name torch's or moe_replay's own (their attributes are no router's code)?"""
    return _is_torch(module) or module == "moe_replay" or module.startswith("moe_replay.")


def _call_of(obj: Any) -> Any:
    """The ``__call__`` that calling ``obj`` runs (looked up on its class, as a call does), or None."""
    return next((c.__dict__["__call__"] for c in type(obj).__mro__ if "__call__" in c.__dict__), None)
