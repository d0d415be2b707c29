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
  count ``if self.step > self.warmup:``);
- **chains** the code reads from the module, a global or a closure cell: attributes, subscripts
  by a constant, ``.get(constant)`` and weak-reference calls (``self.config.routing.use_bias``,
  ``self.flags[0]``, ``self.parent_ref().use_bias``, ``os.environ.get("X")``, ``os.getenv("X")``),
  followed statically (a property into its getter's code, never run) to a plain value, an enum
  member or a tensor of one boolean or integer element;
- **default arguments** of the forward and of the methods it calls (``forward.__defaults__``).

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
import os
import types
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["code_settings", "flag_buffers", "written"]

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
#: a step of a chain the code reads: ``(".", name)`` an attribute, ``("[]", key)`` a subscript by a constant,
#: ``("get", key)`` a mapping's ``.get(key)``, ``("()", args)`` a call with constant arguments
_Step = tuple[str, Any]
#: a chain read from a root: ``("self", None, name)`` the module itself, ``("global", space, name)``,
#: ``("cell", cells, name)``, ``("defaults", fn, "")`` a function's default arguments; then its steps
_Chain = tuple[str, Any, str, tuple[_Step, ...]]
#: per class, per forward function: the reads and the chains found in its code, and the attributes it assigns on the
#: module (``self._step += 1``)
_CACHE: weakref.WeakKeyDictionary[type, dict[Any, tuple[tuple[_Read, ...], tuple[_Chain, ...], frozenset[str]]]] = (
    weakref.WeakKeyDictionary()
)
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
    out: dict[str, Any] = {}
    cached = _read_code(module, forward)
    if cached is not None:
        cls = type(module)
        reads, chained, _ = cached
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
        for chain in chained:
            _read_chain(module, chain, out)
    out.update(flag_buffers(module))
    return out


def written(module: nn.Module, forward: Any = None) -> frozenset[str]:
    """What the code of ``module``'s forward assigns, named as :func:`code_settings` names it: attributes of the
    module itself (``self._step += 1``, ``self._warned = True``, a cache filled on first use: ``"self._warned"``)
    and module-level globals (``global _WARNED; _WARNED = True``: ``"mymodule._WARNED"``). Its state, which the
    forward changes itself, not a setting someone else changes. Read from the code; nothing runs."""
    cached = _read_code(module, forward)
    return frozenset() if cached is None else cached[2]


def _read_code(module: nn.Module, forward: Any) -> tuple[tuple[_Read, ...], tuple[_Chain, ...], frozenset[str]] | None:
    """What the code of ``module``'s forward reads and assigns (worked out once per class and forward), or None."""
    cls = type(module)
    fn = _function(forward) if forward is not None else _function(getattr(cls, "forward", None))
    if fn is None:
        return None
    per_class = _CACHE.setdefault(cls, {})
    cached = per_class.get(fn)
    if cached is None:
        found: list[_Read] = []
        chains: list[_Chain] = []
        stores: set[str] = set()
        _walk(fn, cls, 0, set(), found, chains, stores)
        cached = per_class[fn] = (
            tuple({read[0]: read for read in found}.values()),
            tuple({(c[0], id(c[1]), c[2], c[3]): c for c in chains}.values()),
            frozenset(stores),
        )
    return cached


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
            inner = vars(fn).get("__wrapped__")
            if inner is None or not _library_code(fn):
                return fn
            fn = inner  # (a library's wrapper, torch.compile's: the function it runs is the user's)
            continue
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


def _walk(
    fn: types.FunctionType,
    cls: type | None,
    depth: int,
    seen: set[Any],
    out: list[_Read],
    chains: list[_Chain],
    stores: set[str],
) -> None:
    """Collect the reads of ``fn``'s code into ``out``, the chains it reads into ``chains`` and the attributes it
    assigns on the module into ``stores``; follow the functions and methods it names."""
    code = fn.__code__
    if code in seen:
        return
    seen.add(code)
    names: set[str] = set()
    stack = [code]
    space = fn.__globals__
    where = space.get("__name__", "?")
    cells = _Cells(fn) if fn.__closure__ else None
    # (the module itself is the first argument of a method; a nested function or lambda reads it as a free variable)
    me = code.co_varnames[0] if cls is not None and code.co_argcount else None
    if (fn.__defaults__ or fn.__kwdefaults__) and (depth == 0 or cls is not None):
        chains.append(("defaults", fn, fn.__qualname__, ()))
    while stack:  # the code and the functions, lambdas and comprehensions defined in it
        c = stack.pop()
        names.update(c.co_names)
        names.update(c.co_freevars)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        if me is not None and c is code:
            stores.update(f"self.{name}" for name in _stores_in(c, me))
        stores.update(f"{where}.{i.argval}" for i in _instructions(c) if i.opname == "STORE_GLOBAL")
        for kind, name, steps in _chains_in(c, me):
            if any(how == "()" and key for how, key in steps) and not (
                kind == "global" and _getenv(space.get(name, _MISSING), steps)
            ):  # (a call with arguments is read only where it reads the environment)
                continue
            if kind == "self":
                chains.append(("self", None, name, steps))
            elif kind == "global":
                root = space.get(name, _MISSING)
                if not (isinstance(root, types.ModuleType | type) and _skipped(root)):  # (torch.float32...)
                    chains.append(("global", space, name, steps))
            elif kind == "cell" and cells is not None and c is code and name in cells.cells:
                chains.append(("cell", cells, name, steps))
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
            else:  # (a static or class method's first argument is not the module)
                follow.append((attr, None if isinstance(attr, staticmethod | classmethod) else cls))
    if depth >= _DEPTH:
        return
    for value, owner in follow:
        inner = _function(value) if isinstance(value, types.FunctionType | staticmethod | classmethod) else None
        if inner is not None and not _skipped(inner):
            _walk(inner, owner, depth + 1, seen, out, chains, stores)


#: instructions a chain passes over (no value of its own: caches, a call's preparation)
_PASS = frozenset(("CACHE", "PRECALL", "EXTENDED_ARG", "NOP", "NOT_TAKEN", "PUSH_NULL"))
_CONSTANTS = frozenset(("LOAD_CONST", "LOAD_SMALL_INT"))


def _chains_in(code: types.CodeType, me: str | None) -> list[tuple[str, str, tuple[_Step, ...]]]:
    """The chains ``code`` reads, as ``(root kind, root name, steps)``: attributes, subscripts by a constant,
    ``.get(constant)`` and calls with constant arguments, from the module (``me``, its first argument), a global or
    a free variable (``self.config.routing.use_bias``, ``self.flags[0]``, ``self.parent_ref().use_bias``,
    ``os.environ.get("X")``). Read from the bytecode, so nothing runs; a chain ends at the first other instruction."""
    import dis  # (imported by inspect already)

    out: list[tuple[str, str, tuple[_Step, ...]]] = []
    kind = name = ""
    steps: list[_Step] = []
    consts: list[Any] = []

    method = False  # the last step loads a method to call: no setting (a chain that ends so is left out)

    def end() -> None:
        nonlocal kind
        if kind and steps and not method:
            out.append((kind, name, tuple(steps)))
        kind = ""

    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _PASS:
            continue
        if kind:
            if op in ("LOAD_ATTR", "LOAD_METHOD") and not consts:
                steps.append((".", ins.argval))
                method = op == "LOAD_METHOD" or "NULL|self" in ins.argrepr
                continue
            if op in _CONSTANTS:
                consts.append(ins.argval)
                continue
            if consts and (op == "BINARY_SUBSCR" or (op == "BINARY_OP" and ins.argrepr == "[]")) and len(consts) == 1:
                steps.append(("[]", consts.pop()))
                continue
            if op == "CALL" and ins.argval == len(consts) and all(_is_key(k) for k in consts):
                if steps and steps[-1] == (".", "get") and 1 <= len(consts) <= 2:
                    steps[-1] = ("get", consts[0])
                else:
                    steps.append(("()", tuple(consts)))
                consts.clear()
                method = False
                continue
            consts.clear()
            end()
        if op.startswith("LOAD_FAST") or op == "LOAD_DEREF":
            local = ins.argval[-1] if isinstance(ins.argval, tuple) else ins.argval
            method = False
            if me is not None and local == me:
                kind, name, steps = "self", local, []
            elif op == "LOAD_DEREF" and isinstance(local, str):
                kind, name, steps = "cell", local, []
        elif op in ("LOAD_GLOBAL", "LOAD_NAME"):
            kind, name, steps, method = "global", ins.argval, [], False
    end()
    return out


def _instructions(code: types.CodeType) -> list[Any]:
    """The instructions of ``code`` (``dis``'s)."""
    import dis

    return list(dis.get_instructions(code))


def _stores_in(code: types.CodeType, me: str) -> set[str]:
    """The attributes ``code`` assigns on the module (``me``, its first argument): ``self.x = v`` (the module loaded
    just before the store) and ``self.x += v`` (loaded, copied and read, then stored under the same name)."""
    import dis

    out: set[str] = set()
    prev: list[tuple[str, Any]] = []  # the instructions before, past those with no value of their own
    augmented: set[str] = set()
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _PASS:
            continue
        if op == "STORE_ATTR" and (
            (prev and prev[-1][0] == "me") or (ins.argval in augmented and prev and prev[-1][0] == "SWAP")
        ):
            out.add(ins.argval)
        if op == "LOAD_ATTR" and len(prev) >= 2 and prev[-2][0] == "me" and prev[-1][0] == "COPY":
            augmented.add(ins.argval)
        local = ins.argval[-1] if op.startswith("LOAD_FAST") and isinstance(ins.argval, tuple) else ins.argval
        prev = [*prev[-1:], ("me" if op.startswith("LOAD_FAST") and local == me else op, ins.argval)]
    return out


def _getenv(root: Any, steps: tuple[_Step, ...]) -> bool:
    """Is ``root`` then ``steps`` a read of the environment by ``os.getenv(name)`` (or ``getenv`` imported)?"""
    if root is os and steps[:1] == ((".", "getenv"),):
        steps = steps[1:]
    elif root is not os.getenv:
        return False
    return len(steps) == 1 and steps[0][0] == "()" and len(steps[0][1]) in (1, 2)


def _is_key(k: Any) -> bool:
    return type(k) in (int, str, bool, type(None))


def _read_chain(module: nn.Module, chain: _Chain, out: dict[str, Any]) -> None:
    """Read one chain of ``module``'s code (see :func:`_chains_in`) into ``out``, by its name, without running any
    of the code it passes through (see :func:`_step`): the settings at its end, or read by a property's getter."""
    kind, where, name, steps = chain
    if kind == "defaults":
        fn = where
        params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        values = fn.__defaults__ or ()
        pairs = [*zip(params[len(params) - len(values) :], values, strict=True), *(fn.__kwdefaults__ or {}).items()]
        out.update((f"{name}(default {p})", comparable(v)) for p, v in pairs if is_setting(v))
        return
    if kind == "self":
        if len(steps) == 1 and steps[0][0] == ".":
            _read_own(module, steps[0][1], out)
            return
        root: Any = module
        label = "self"
    else:
        root = where.get(name, _MISSING)
        if (
            kind == "global" and len(steps) == 1 and steps[0][0] == "." and isinstance(root, types.ModuleType | type)
        ):  # (read with _attributes)
            return
        if isinstance(root, types.ModuleType):
            label = str(vars(root).get("__name__", name))
        else:
            label = f"{where.get('__name__', '?')}.{name}" if kind == "global" else f"<{name}>"
    for sub, value in _follow(root, steps, 0):
        out[label + _spelled(steps) + sub] = value


def _read_own(module: nn.Module, attr: str, out: dict[str, Any]) -> None:
    """Read ``self.<attr>`` (one step: the most common read, so the quickest) into ``out``, unless it is compared
    already: a plain public attribute of the module (``_fingerprint`` reads those), a plain class attribute (a read of
    its own), a 0-d boolean buffer (every one is read). What is left: a private attribute, a tensor of one element, a
    property (followed into its getter)."""
    instance = vars(module)
    value = instance.get(attr, _MISSING)
    if value is _MISSING:
        if attr in instance["_parameters"] or attr in instance["_modules"]:
            return
        buffers = instance["_buffers"]  # (a scripted module's is a wrapper with no get())
        value = buffers[attr] if attr in buffers else _MISSING
        if value is not _MISSING:
            if value is None or (value.dim() == 0 and value.dtype == torch.bool):
                return
        else:
            value = _in_class(type(module), attr)
            if not isinstance(value, property):
                return
            for sub, got in _follow(module, ((".", attr),), 0):
                out[f"self.{attr}{sub}"] = got
            return
    elif not attr.startswith("_") and is_setting(value):
        return
    value = _setting_of(value)
    if value is not _MISSING:
        out[f"self.{attr}"] = value


_MRO_OF = type.__dict__["__mro__"].__get__  # (a class's own, whatever its metaclass says)
_DICT_OF = type.__dict__["__dict__"].__get__
#: per descriptor type: does it define __set__ or __delete__ (then it comes before an instance's own attribute)
_DATA: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _in_class(klass: type, key: str) -> Any:
    """``key`` as the classes of ``klass``'s MRO hold it (a function, a property, a plain value), or missing."""
    for k in _MRO_OF(klass):
        space = _DICT_OF(k)
        if key in space:
            return space[key]
    return _MISSING


def _attribute(obj: Any, key: str) -> Any:
    """``obj.<key>`` as ``inspect.getattr_static`` finds it, and faster (it runs at every block): a data descriptor
    of its class (a property, a slot) as such, then its own attribute, then its class's; for an ``nn.Module`` its
    parameters, buffers and children after these (what its ``__getattr__`` reads). Nothing of ``obj`` runs."""
    if isinstance(obj, type):
        return _in_class(obj, key)
    found = _in_class(type(obj), key)
    if found is not _MISSING:
        kind = type(found)
        data = _DATA.get(kind)
        if data is None:
            data = _DATA[kind] = any("__set__" in _DICT_OF(k) or "__delete__" in _DICT_OF(k) for k in _MRO_OF(kind))
        if data:
            return found
    try:
        own = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        own = None
    if isinstance(own, dict):
        if key in own:
            return own[key]
        if found is _MISSING and isinstance(obj, nn.Module):
            for store in ("_parameters", "_buffers", "_modules"):
                held = own.get(store)
                if held is not None and key in held:
                    return held[key]
    return found


def _follow(obj: Any, steps: tuple[_Step, ...], depth: int) -> list[tuple[str, Any]]:
    """The settings at the end of ``steps`` from ``obj``, with what their names gain past it: ``[("", value)]``; a
    property whose getter returns a chain of its object is followed along it; one that computes its value gives the
    settings its getter reads (``<_a>``, ``<_b>``)."""
    for i, step in enumerate(steps):
        got = _step(obj, step)
        if isinstance(got, property):
            getter = _function(got.fget)
            if getter is None or depth >= _DEPTH or _skipped(getter):
                return []
            returned, read = _getter_chains(getter)
            if returned is not None:
                return _follow(obj, returned + steps[i + 1 :], depth + 1)
            found: list[tuple[str, Any]] = []
            for sub in read:
                found.extend((f"<{_spelled(sub)[1:]}{s}>", v) for s, v in _follow(obj, sub, depth + 1))
            return found
        if got is _MISSING:
            return []
        obj = got
    value = _setting_of(obj)
    return [] if value is _MISSING else [("", value)]


#: per getter: the chain of its object it returns, when it returns one and nothing else; the chains it reads
_GETTERS: weakref.WeakKeyDictionary[types.FunctionType, tuple[tuple[_Step, ...] | None, tuple[tuple[_Step, ...], ...]]]
_GETTERS = weakref.WeakKeyDictionary()


def _getter_chains(fn: types.FunctionType) -> tuple[tuple[_Step, ...] | None, tuple[tuple[_Step, ...], ...]]:
    """What a property's getter reads of its object: the chain it returns where it returns one alone
    (``return self._use_bias``), and every chain of its object it reads."""
    known = _GETTERS.get(fn)
    if known is None:
        import dis

        code = fn.__code__
        me = code.co_varnames[0] if code.co_argcount else None
        read = tuple(steps for kind, _, steps in _chains_in(code, me) if kind == "self")
        body = [i.opname for i in dis.get_instructions(code) if i.opname not in _PASS and i.opname != "RESUME"]
        simple = (
            len(read) == 1
            and body[:1] in (["LOAD_FAST"], ["LOAD_FAST_BORROW"])
            and body[-1:] == ["RETURN_VALUE"]
            and len(body) == 2 + len(read[0])
            and all(s[0] == "." for s in read[0])
        )
        known = _GETTERS[fn] = (read[0] if simple else None, read)
    return known


def _step(obj: Any, step: _Step) -> Any:
    """One step of a chain, as the code takes it, without running code of the model's: an attribute as
    ``inspect.getattr_static`` finds it (with a module's parameters, buffers and children; a property as such), a
    list's or a tuple's item, a dict's or the environment's entry, a weak reference's object; else missing."""
    how, key = step
    if how == ".":
        got = _attribute(obj, key)
        if isinstance(got, types.MemberDescriptorType | types.GetSetDescriptorType) and not isinstance(obj, type):
            try:
                return got.__get__(obj, type(obj))  # (a slot: C code)
            except AttributeError:
                return _MISSING
        return got
    if how in ("[]", "get"):
        if obj is os.environ:
            return os.environ.get(key)
        if isinstance(obj, dict):
            return dict.get(obj, key, None if how == "get" else _MISSING)
        if how == "[]" and isinstance(obj, list | tuple) and type(key) is int and -len(obj) <= key < len(obj):
            return (list if isinstance(obj, list) else tuple).__getitem__(obj, key)
        return _MISSING
    if isinstance(obj, weakref.ReferenceType) and not key:
        return weakref.ReferenceType.__call__(obj)
    if obj is os.getenv and key:
        return os.environ.get(key[0])
    return _MISSING


def _setting_of(value: Any) -> Any:
    """``value`` as a setting is compared, or missing: a plain value or an enum member (see :func:`comparable`),
    and a tensor of one boolean or integer element that takes no gradient (``self.use_bias = torch.tensor(True)``)."""
    if is_setting(value):
        return comparable(value)
    if (
        type(value) is torch.Tensor
        and value.numel() == 1
        and not value.requires_grad
        and not value.is_meta
        and (value.dtype == torch.bool or not (value.dtype.is_floating_point or value.dtype.is_complex))
    ):
        return value.item()
    return _MISSING


def _spelled(steps: tuple[_Step, ...]) -> str:
    """A chain's steps as the code spells them: ``.config.routing.use_bias``, ``.flags[0]``, ``.get('X')``."""
    out = []
    for how, key in steps:
        if how == ".":
            out.append(f".{key}")
        elif how == "[]":
            out.append(f"[{key!r}]")
        elif how == "get":
            out.append(f".get({key!r})")
        else:
            out.append(f"({', '.join(map(repr, key))})")
    return "".join(out)


def _attributes(holder: types.ModuleType | type, names: set[str], out: list[_Read]) -> None:
    """The plain attributes of a module or class named in global scope that the code reads by name."""
    space = vars(holder)
    label = holder.__name__ if isinstance(holder, types.ModuleType) else holder.__qualname__
    out.extend((f"{label}.{n}", space, n) for n in sorted(names) if is_setting(space.get(n, _MISSING)))


def _library_code(fn: types.FunctionType) -> bool:
    """Is ``fn``'s code that of a library not followed, wherever its ``__module__`` says it is from (``functools.wraps``
    copies the wrapped function's: ``torch.compile``'s wrapper claims the user's module)?"""
    where = fn.__globals__.get("__name__")
    return isinstance(where, str) and where.partition(".")[0] in _NOT_FOLLOWED


def _skipped(obj: Any) -> bool:
    """Is ``obj`` the code of a library whose flags are not a router's (torch's own, numpy's...)? Read without
    running anything of it (a module's ``__getattr__`` may import on demand)."""
    if isinstance(obj, types.ModuleType):
        where = vars(obj).get("__name__")
    elif isinstance(obj, types.FunctionType):
        if _library_code(obj):
            return True
        where = obj.__module__  # (a function's own field: getattr_static gives its type's descriptor)
    else:
        where = inspect.getattr_static(obj, "__module__", None)
    root = where.partition(".")[0] if isinstance(where, str) else ""
    return root in _NOT_FOLLOWED
