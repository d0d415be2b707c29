"""The settings a router's code reads from outside its module's attributes.

A decision is established under the settings of its forward: which of two top-k calls
dispatches may hang on a flag. The module's own attributes and its config are compared at
each block (``intercept._fingerprint``); this module finds the rest, by reading the code the
router runs, as far as it can be read without running it:

- **module-level globals** its forward names (``if USE_BIAS:``; through its module object reached by
  name too: ``sys.modules[__name__].USE_BIAS``, ``importlib.import_module(__name__)``), and the
  attributes it reads of a module or class it names (``settings.USE_BIAS``, ``Cfg.use_bias``);
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

import collections
import dis
import enum
import functools
import importlib
import inspect
import os
import random
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

__all__ = [
    "HeldStamp",
    "Home",
    "OutsideState",
    "assigned_on_others",
    "attribute_names_read",
    "code_settings",
    "flag_buffers",
    "generators",
    "hook_names_read",
    "hook_written",
    "is_written",
    "named_places",
    "reads_state",
    "settings_in",
    "static_attribute",
    "written",
]

#: the plain values that are compared as settings (:func:`is_setting`: members of an ``enum`` too)
_PLAIN = frozenset((int, float, str, bool, type(None)))


#: the end of the key of a tensor or list of integers a router's code names, compared as a setting (its contents)
_HELD = " (held)"


def is_setting(value: Any) -> bool:
    """Is ``value`` compared as a setting: a plain value, or a member of an ``enum`` (``Mode.BIASED``)?"""
    return type(value) in _PLAIN or isinstance(value, enum.Enum)


class HeldStamp:
    """A tensor of integers or booleans a router reads (one its modules hold, or a global, closure cell or class
    attribute its code names), as a setting: which tensor it is (held weakly) and its version counter (read on the
    host: no sync). Equal while neither written in place nor replaced: an order of the tokens it holds (``x[order]``)
    is one, which the decision's rows follow."""

    __slots__ = ("ident", "ref", "version")

    def __init__(self, tensor: torch.Tensor, version: Any) -> None:
        self.ref, self.version, self.ident = weakref.ref(tensor), version, id(tensor)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeldStamp):
            return False
        held = self.ref()
        return held is not None and held is other.ref() and self.version == other.version

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        written = f", written {self.version} times" if self.version is not None else ""
        return f"a tensor of integers (object 0x{self.ident:x}{written})"


def held_stamp(value: Any) -> Any:
    """``value`` as :class:`HeldStamp` compares it, where it is a tensor of integers or booleans; a list or tuple of
    up to 256 ints or bools as its items; None for anything else."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            return None
        return HeldStamp(value, None if value.is_inference() else value._version)
    if isinstance(value, list | tuple) and len(value) <= 256 and all(type(i) in (int, bool) for i in value):
        return tuple(value)
    return None


def settings_in(items: Iterable[tuple[Any, Any]]) -> list[tuple[str, Any]]:
    """The settings among ``(key, value)`` pairs whose key is a public ``str``, as compared: :func:`is_setting` and
    :func:`comparable` in one loop, a plain value read without a call (a config's dozens of them, at every block)."""
    out: list[tuple[str, Any]] = []
    for key, value in items:
        kind = type(value)
        if kind in _PLAIN:
            if kind is float and value != value:
                value = "nan"
        elif isinstance(value, enum.Enum):
            value = comparable(value)
        else:
            continue
        if type(key) is str and key[:1] != "_":
            out.append((key, value))
    return out


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
#: where the code changes something outside the module's own attributes, to be put back after a run that is not the
#: forward's (see :class:`OutsideState`): ``(root kind, root holder, root name, steps to what holds it, last step)``;
#: a rebound global or closure cell has no steps and no last step
_Place = tuple[str, Any, str, tuple[_Step, ...], "_Step | None"]
#: what :func:`_read_code` finds: the reads, the chains, what the code assigns (by name), where it changes things,
#: whether it reads some of the state it changes otherwise than by changing it (``if len(_SEEN) > n``), and the
#: globals, closure cells and class attributes it names that hold no setting (see :func:`generators`)
_Code = tuple[
    tuple[_Read, ...], tuple[_Chain, ...], frozenset[str], tuple[_Place, ...], bool, tuple[tuple[str, Any, str], ...]
]
#: per class, per forward function: the reads and the chains found in its code, what it assigns itself (attributes of
#: the module: ``self._step += 1``; globals; entries of a container it fills: ``_WARNED[key] = True``), and where
_CACHE: weakref.WeakKeyDictionary[type, dict[Any, _Code]] = weakref.WeakKeyDictionary()
_MISSING = object()
#: an entry of a container the code changes by a key it computes (``CACHE[name] = value``, ``SEEN.add(key)``)
_ANY = object()
#: the last step of a chain to a tensor the code changes in place (``_STEP.add_(1)``)
_IN_PLACE: tuple[str, Any] = ("()", "_")


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
        reads, chained = cached[0], cached[1]
        instance = vars(module)
        for key, where, name in reads:
            if where is None:  # a class attribute read through self: the instance's own comes first
                if name in instance:
                    continue
                value = _in_class(cls, name)  # (as inspect.getattr_static finds it on the class, faster)
            else:
                value = where.get(name, _MISSING)
            if is_setting(value):
                out[key] = comparable(value)
        for chain in chained:
            _read_chain(module, chain, out)
        # (tensors of integers and lists of ints in globals, closure cells and class attributes it names: an order
        # of its tokens, chunk sizes; compared by identity and version)
        for kind, holder, name in cached[5]:
            if kind == "class":
                value, spelled = inspect.getattr_static(holder, name, _MISSING), f"{holder.__qualname__}.{name}"
            elif kind == "cell":
                value, spelled = holder.get(name, _MISSING), f"<{name}>"
            else:
                value, spelled = holder.get(name, _MISSING), f"{holder.get('__name__', '')}.{name}"
            stamp = held_stamp(value) if value is not _MISSING else None
            if stamp is not None:
                out[f"{spelled}{_HELD}"] = stamp
    out.update(flag_buffers(module))
    return out


def assigned_on_others(module: nn.Module) -> frozenset[str]:
    """The names of the attributes the code of ``module``'s forward assigns on objects other than the module itself,
    a constant each time (``layer.collect_aux_loss = True`` over its layers, in nested functions and comprehensions
    too, and in every function a wrapper's ``__wrapped__`` leads to): flags a model's forward sets on its submodules
    for the forward, and may put back after it. Read from the code; nothing runs. torch's own modules assign none."""
    cls = type(module)
    if cls.__module__.partition(".")[0] in _NOT_FOLLOWED:
        return frozenset()
    out: set[str] = set()
    for forward in (module.__dict__.get("forward"), getattr(cls, "forward", None)):
        fn: Any = forward
        for _ in range(8):  # (the forward, and what a wrapper of it wraps)
            while isinstance(fn, types.MethodType | staticmethod | classmethod):
                fn = fn.__func__
            if not isinstance(fn, types.FunctionType):
                break
            found = _ASSIGNED_ON_OTHERS.get(fn.__code__)
            if found is None:
                found = _ASSIGNED_ON_OTHERS[fn.__code__] = _stores_on_others(fn.__code__)
            out.update(found)
            fn = vars(fn).get("__wrapped__")
    return frozenset(out)


#: what :func:`_stores_on_others` read, by code object
_ASSIGNED_ON_OTHERS: dict[types.CodeType, frozenset[str]] = {}


def _stores_on_others(code: types.CodeType) -> frozenset[str]:
    """The attribute names ``code`` (and the code objects defined in it) assigns on an object other than its first
    argument (a ``STORE_ATTR`` whose object is not loaded from that argument just before it), a constant each time
    (``layer.flag = True``, ``layer.flag = None``): a flag set from the input or from state may read otherwise at
    each forward, so a name that is ever assigned anything else is left out."""
    constant: dict[str, bool] = {}
    stack = [(code, True)]
    while stack:
        c, top = stack.pop()
        me = c.co_varnames[0] if top and c.co_argcount else None
        prev: list[tuple[str, Any]] = [("", None), ("", None)]
        for ins in _instructions(c):
            if ins.opname in _PASS:
                continue
            if ins.opname == "STORE_ATTR" and not (prev[-1][0].startswith("LOAD_FAST") and _local(prev[-1][1]) == me):
                constant[ins.argval] = constant.get(ins.argval, True) and prev[-2][0] in _CONSTANTS
            prev = [prev[-1], (ins.opname, ins.argval)]
        stack.extend((k, False) for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(name for name, always in constant.items() if always)


def _local(argval: Any) -> Any:
    """The name a ``LOAD_FAST`` loads (of a pair loaded at once, the last)."""
    return argval[-1] if isinstance(argval, tuple) else argval


def written(module: nn.Module, forward: Any = None) -> frozenset[str]:
    """What the code of ``module``'s forward assigns, named as :func:`code_settings` names it: attributes of the
    module itself (``self._step += 1``, ``self._warned = True``, a cache filled on first use: ``"self._warned"``),
    module-level globals (``global _WARNED; _WARNED = True``: ``"mymodule._WARNED"``), closure cells
    (``nonlocal step``), attributes of a class or object it names (``Router._warned = True``,
    ``type(self)._calls += 1``) and the entries of a container it fills (``_WARNED["zero"] = True``,
    ``_SEEN.setdefault(key, ...)``, ``self._cache[name] = value``). Its state, which the forward changes itself, not
    a setting someone else changes. A name that ends with ``*`` stands for every name it begins (the entries of a
    container filled by keys the code computes); see :func:`is_written`. Read from the code; nothing runs."""
    cached = _read_code(module, forward)
    return frozenset() if cached is None else cached[2]


def hook_written(module: nn.Module) -> frozenset[str]:
    """What the forward hooks and pre-hooks registered on ``module`` assign on it, named as :func:`written` names
    them (``"self.calls"`` for a hook that counts the module's calls: ``m.calls += 1``): the hooks' state, changed at
    every call by code that runs with the forward, not a setting someone changes between forwards. A hook is read as
    a forward is: its module is its first argument (the one after ``self`` for a bound method); a hook that is no
    plain Python function or method (a ``functools.partial``, a callable object) is not read, so what it assigns
    stays a setting. Read from the code; nothing runs."""
    out: set[str] = set()
    for attr in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = vars(module).get(attr)
        for hook in hooks.values() if isinstance(hooks, dict) else ():
            at = 1 if isinstance(hook, types.MethodType) else 0
            fn = hook.__func__ if at else hook
            if not isinstance(fn, types.FunctionType) or fn.__code__.co_argcount <= at:
                continue
            code = fn.__code__
            found = _HOOK_STORES.get(code)
            if found is None:
                found = _HOOK_STORES[code] = frozenset(_stores_in(code, code.co_varnames[at]))
            out.update(f"self.{name}" for name in found)
    return frozenset(out)


#: what each hook's code assigns on its module, by code object (read once)
_HOOK_STORES: weakref.WeakKeyDictionary[types.CodeType, frozenset[str]] = weakref.WeakKeyDictionary()


def is_written(key: str, names: set[str] | frozenset[str]) -> bool:
    """Is the setting ``key`` one of ``names`` (see :func:`written`): one of them, a name that ends with ``*`` that it
    begins with, or read further into one (``CACHE['a']`` into ``CACHE['a'].size``)? A container's contents compared
    as a setting (``"mod.ORDER (held)"``, see :func:`code_settings`) are written where it is, or its entries are
    (``ORDER.append(...)``, ``ORDER[i] = ...``)."""
    if key in names:
        return True
    if key.endswith(_HELD):
        key = key[: -len(_HELD)]
        if key in names or any(name.startswith(key) and name[len(key) : len(key) + 1] in (".", "[") for name in names):
            return True
    for name in names:
        if name.endswith("*"):
            if key.startswith(name[:-1]):
                return True
        elif key.startswith(name) and key[len(name) : len(name) + 1] in (".", "[", "(", "<"):
            return True
    return False


def reads_state(module: nn.Module, forward: Any = None) -> bool:
    """Does the code of ``module``'s forward read some of the state it changes (see :func:`written`) otherwise than by
    changing it: ``if len(_SEEN) > n``, ``if _STEP > warmup``, ``STATE["step"] += 1``? Such state may steer which of
    its calls decides. One that only fills a log (``self.history.append(idx)``) does not read it."""
    cached = _read_code(module, forward)
    return cached is not None and cached[4]


def generators(modules: list[nn.Module]) -> list[Any]:
    """The random generators the code of ``modules``' forwards may draw from outside the modules' own attributes,
    as they hold them now: a ``torch.Generator`` (or another random stream of :func:`is_host_stream`) held by a
    global, a closure cell or a class attribute the code names (``_RNG``, ``self.rng`` on the class), one level inside
    what it names (an attribute of a class or module it names: ``Noise.generator``, an item of a list or dict), or at a
    chain it reads (``self.sampler.generator``). Their state
    is put back after runs that are not the model's forwards, as the global random state is. A generator the code
    creates on first use is not held yet: the assignment that stores it is put back instead (see :class:`OutsideState`).
    Read from the code and the objects' own dictionaries; nothing of the model's runs."""
    found: dict[int, Any] = {}
    for m in modules:
        cls = type(m)
        if cls.__module__.partition(".")[0] in _NOT_FOLLOWED:  # (torch's own modules: nothing of theirs)
            continue
        cached = _read_code(m, m.__dict__.get("forward"))
        if cached is None:
            continue
        for value, named in _reached(m, cached):
            _generators_in(value, found, 1 if named else 0)
    return list(found.values())


def _reached(module: nn.Module, cached: _Code) -> Iterator[tuple[Any, bool]]:
    """What the code of ``module`` reaches by name, nothing of it run: ``(value, True)`` for each global, closure cell
    or class attribute it names, ``(value, False)`` for each object along each chain it reads (``self.tracker.stats``,
    up to a call, which is not made)."""
    for kind, where, name in cached[5]:
        yield (_in_class(where, name) if kind == "class" else where.get(name, _MISSING)), True
    for kind, where, name, steps in cached[1]:
        if kind == "defaults":
            continue
        obj: Any = module if kind == "self" else where.get(name, _MISSING)
        for step in steps:
            if obj is _MISSING or step[0] == "()":  # (a call is not made: only what it names is read)
                break
            obj = _step(obj, step)
            yield obj, False


class Home(Protocol):
    """A namespace an iterator is held in, read and set by name: a dict, or a closure cell or class read as one."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...


class _CellHome:
    """A closure cell, read and set by its free variable's name as a namespace's item (a dict's ``get`` and
    ``[name] =``): where an iterator the code draws from is stood in for and given back."""

    def __init__(self, name: str, cell: types.CellType) -> None:
        self.name, self.cell = name, cell

    def get(self, key: str, default: Any = None, /) -> Any:
        try:
            return self.cell.cell_contents if key == self.name else default
        except ValueError:  # an empty cell
            return default

    def __setitem__(self, key: str, value: Any, /) -> None:
        if key == self.name:
            self.cell.cell_contents = value


class _ClassHome:
    """A class's attributes, read from its own dictionary and set on it, as a namespace's items."""

    def __init__(self, klass: type) -> None:
        self.klass = klass

    def get(self, key: str, default: Any = None, /) -> Any:
        return _DICT_OF(self.klass).get(key, default)

    def __setitem__(self, key: str, value: Any, /) -> None:
        setattr(self.klass, key, value)


def named_places(modules: list[nn.Module]) -> list[tuple[Home, str]]:
    """The places outside the modules' own attributes that the code of ``modules`` names and that hold no setting
    (an iterator it draws from with ``next()``, a registry): globals, closure cells and class attributes, each as a
    namespace that holds it (a module's dict, or a cell's or class's read and set by name) and its name there, once;
    none of their code run. A class attribute's namespace is the class of the MRO that holds it."""
    out: dict[tuple[int, str], tuple[Home, str]] = {}
    for m in modules:
        if type(m).__module__.partition(".")[0] in _NOT_FOLLOWED:  # (torch's own modules: nothing of theirs)
            continue
        cached = _read_code(m, m.__dict__.get("forward"))
        for kind, where, name in () if cached is None else cached[5]:
            if kind == "global" and type(where) is dict:
                out.setdefault((id(where), name), (where, name))
            elif kind == "cell" and isinstance(where, _Cells) and name in where.cells:
                cell = where.cells[name]
                out.setdefault((id(cell), name), (_CellHome(name, cell), name))
            elif kind == "class" and isinstance(where, type):
                holder = next((k for k in _MRO_OF(where) if name in _DICT_OF(k)), None)
                if holder is not None:
                    out.setdefault((id(holder), name), (_ClassHome(holder), name))
    return list(out.values())


def is_host_stream(value: Any) -> bool:
    """Is ``value`` a random stream of the host's that is not torch's: a ``random.Random`` (not the operating
    system's ``SystemRandom``, which holds no state), a numpy ``Generator`` or ``RandomState``? A router may draw its
    noise from one it holds (``self.rng = np.random.default_rng(seed)``) or from a global one; its state is put
    back after runs that are not the model's forwards, as a ``torch.Generator``'s is."""
    if isinstance(value, random.Random):
        return not isinstance(value, random.SystemRandom)
    return isinstance(value, np.random.Generator | np.random.RandomState)


def is_generator(value: Any) -> bool:
    """``isinstance(value, torch.Generator)``, read without torch's own check of it where it is plainly no generator:
    ``torch.Generator``'s metaclass checks each instance in Python (a traced wrapper of a generator passes too), a
    cost paid for every argument of every call the runs that establish a decision and tell a token order watch."""
    if type.__instancecheck__(torch.Generator, value):
        return True
    return type(value).__name__ == "FakeScriptObject" and isinstance(value, torch.Generator)


#: :func:`is_generator` for a ``__torch_function__`` that dynamo may trace (a mode active in a compiled forward): run
#: eagerly there, one graph break, instead of compiled as a frame of its own once per type of value it is given (each a
#: recompile, up to dynamo's limit). Eager callers call :func:`is_generator` itself (no wrapper's cost)
is_generator_anywhere: Callable[[Any], bool] = torch.compiler.disable(is_generator)


def _generators_in(value: Any, found: dict[int, Any], depth: int) -> None:
    """Add to ``found`` ``value`` where it is a ``torch.Generator`` (or a stream of :func:`is_host_stream`), and
    ``depth`` levels inside it: the attributes of a class (its MRO's own), of a module or of a plain object, the items
    of a list, tuple or dict. Nothing of it runs (its own dictionary is read, not its ``__getattr__``)."""
    if is_generator(value) or is_host_stream(value):
        found.setdefault(id(value), value)
        return
    if depth <= 0 or value is _MISSING or is_setting(value) or isinstance(value, torch.Tensor | nn.Module):
        return  # (a module's own generators are the snapshot's)
    if isinstance(value, types.ModuleType | type):
        if _skipped(value):
            return
        spaces = [_DICT_OF(k) for k in _MRO_OF(value) if not _skipped(k)] if isinstance(value, type) else [vars(value)]
        items: list[Any] = [v for space in spaces for v in space.values()]
    elif isinstance(value, dict):
        items = list(dict.values(value))
    elif isinstance(value, list | tuple):
        items = list(list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value))
    else:
        try:
            own = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return
        items = list(dict.values(own)) if type(own) is dict else []
    for item in items:
        _generators_in(item, found, depth - 1)


def _namespaces(module: nn.Module, cached: _Code) -> list[dict[str, Any]]:
    """The module-level namespaces of the code a forward runs, outside the libraries whose code is not followed: its
    own function's globals, those of the functions it names (a global, a class attribute, at a chain it reads:
    ``tracking.save_to_tracker``), and the modules it names (``tracking``)."""
    spaces: dict[int, dict[str, Any]] = {}

    def add(value: Any) -> None:
        if isinstance(value, types.MethodType):
            value = value.__func__
        if isinstance(value, types.FunctionType) and not _skipped(value):
            spaces.setdefault(id(value.__globals__), value.__globals__)
        elif isinstance(value, types.ModuleType) and not _skipped(value):
            space = vars(value)
            spaces.setdefault(id(space), space)

    add(_function(module.__dict__.get("forward") or getattr(type(module), "forward", None)))
    for kind, where, name in cached[5]:
        add(_in_class(where, name) if kind == "class" else where.get(name, _MISSING))
    for kind, where, name, steps in cached[1]:
        if kind == "defaults":
            continue
        obj: Any = module if kind == "self" else where.get(name, _MISSING)
        add(obj)
        for step in steps:
            if obj is _MISSING or step[0] == "()":  # (a call is not made: only what it names is read)
                break
            obj = _step(obj, step)
            add(obj)
    return list(spaces.values())


#: the most objects :func:`_tensors_in` looks into from one value the code names (a large registry is not walked)
_TENSOR_WALK = 256


def _tensors_in(value: Any, found: dict[int, torch.Tensor], depth: int, budget: list[int] | None = None) -> None:
    """Add to ``found`` ``value`` where it is a tensor, and ``depth`` levels inside it (as :func:`_generators_in`
    looks for generators): the attributes of a class, of a module or of a plain object, the items of a list, tuple or
    dict. Nothing of it runs; at most :data:`_TENSOR_WALK` objects are looked at."""
    budget = [_TENSOR_WALK] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or value is _MISSING:
        return
    if isinstance(value, torch.Tensor):
        found.setdefault(id(value), value)
        return
    if depth <= 0 or is_setting(value) or isinstance(value, nn.Module) or is_generator(value):
        return  # (a module's own tensors are the snapshot's)
    if isinstance(value, types.ModuleType | type):
        if _skipped(value):
            return
        spaces = [_DICT_OF(k) for k in _MRO_OF(value) if not _skipped(k)] if isinstance(value, type) else [vars(value)]
        items: list[Any] = [v for space in spaces for v in space.values()]
    elif isinstance(value, dict):
        items = list(dict.values(value))
    elif isinstance(value, list | tuple):
        items = list(list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value))
    elif isinstance(value, types.FunctionType | types.MethodType | types.BuiltinFunctionType | property):
        return
    else:
        try:
            own = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return
        items = list(dict.values(own)) if type(own) is dict else []
    for item in items[: max(budget[0], 0)]:
        _tensors_in(item, found, depth - 1, budget)


class OutsideState:
    """What the code of some modules changes outside their own attributes (see :func:`written`), as it is now, to be
    put back after runs that are not the model's forwards: the globals and closure cells it rebinds, the attributes
    it sets on classes and other objects, the contents of the dicts, lists, sets and deques it fills (put back in
    place: the code holds them), the small tensors it reaches outside the modules, by value (see
    :meth:`_save_tensors`), and the containers and small tensors its namespaces hold at module level (see
    :meth:`_save_namespace`). Nothing of the model's runs: values are compared by identity, containers read and
    refilled through their builtin type's own methods."""

    def __init__(self, modules: list[nn.Module]) -> None:
        #: (how, where, key, value): ``"dict"`` an entry of a dict (a module's globals, an object's ``__dict__``),
        #: ``"class"`` a class attribute, ``"cell"`` a closure cell, ``"in"`` a container's contents, ``"tensor"``
        #: a tensor changed in place (its version then, a copy of its values)
        self.saved: list[tuple[str, Any, Any, Any]] = []
        #: the tensors too large to copy within :data:`_LARGE_BUDGET`, with their versions: a run that changes one
        #: cannot be undone, and :meth:`unrestorable` names it
        self.watched: list[tuple[torch.Tensor, int]] = []
        self._budget = _LARGE_BUDGET
        seen: set[tuple[int, Any]] = set()
        # (the modules' own tensors are the snapshot's)
        seen.update((id(t), None) for m in modules for t in (*m._parameters.values(), *m._buffers.values()))
        for m in modules:
            cls = type(m)
            if cls.__module__.partition(".")[0] in _NOT_FOLLOWED:  # (torch's own modules: nothing of theirs)
                continue
            cached = _read_code(m, m.__dict__.get("forward"))
            for place in () if cached is None else cached[3]:
                self._save(m, place, seen)
            if cached is not None:
                self._save_tensors(m, cached, seen)
                for space in _namespaces(m, cached):
                    self._save_namespace(space, seen)

    def _save_tensors(self, module: nn.Module, cached: _Code, seen: set[tuple[int, Any]]) -> None:
        """Save by value the small tensors the code reaches outside the modules, as :func:`generators` finds its
        generators: held by a global, a closure cell or a class attribute it names, a level or two inside (a dict of
        statistics, an attribute of a tracker object), or at a chain it reads. The code may change any of them in place
        by a way no place names: ``STATS[name] += counts`` (an in-place add, then the same tensor stored back), an
        ``out=`` argument, a local alias (``t = STATS["load"]; t.add_(1)``). Put back only where a run changed one
        (its version moved)."""
        found: dict[int, torch.Tensor] = {}
        for value, named in _reached(module, cached):
            if named:
                _tensors_in(value, found, 2)
            elif not isinstance(value, nn.Module):  # (a module's own tensors are the snapshot's)
                _tensors_in(value, found, 1)
        for t in found.values():
            self._save_tensor(t, seen)

    def _save_tensor(self, t: torch.Tensor, seen: set[tuple[int, Any]]) -> None:
        """Save ``t`` by value, to be put back where a run changes it in place: one of at most
        :data:`_TENSOR_LIMIT` elements always, a larger one while :data:`_LARGE_BUDGET` lasts (a history or a
        table of counts the code writes a slot of); one beyond it is watched by its version
        (:meth:`unrestorable`), never left changed unsaid."""
        if (id(t), None) in seen or t.is_meta or t.is_inference():
            return
        seen.add((id(t), None))
        n = t.numel()
        if n > _TENSOR_LIMIT:
            if n > self._budget:
                self.watched.append((t, t._version))
                return
            self._budget -= n
        self.saved.append(("tensor", t, t._version, t.detach().clone()))

    def _save_array(self, a: np.ndarray, seen: set[tuple[int, Any]]) -> None:
        """Save a numpy array of numbers by value (``_STEP[0] += 1``, ``np.add(COUNTS, c, out=COUNTS)``: changed in
        place, the same object stays bound), to be put back where a run changed it; at most :data:`_TENSOR_LIMIT`
        elements."""
        if (id(a), None) in seen or a.dtype.kind not in "biufc" or not a.flags.writeable or a.size > _TENSOR_LIMIT:
            return
        seen.add((id(a), None))
        self.saved.append(("array", a, None, a.copy()))

    def unrestorable(self) -> list[torch.Tensor]:
        """The tensors too large to copy (see :meth:`_save_tensor`) that a run changed in place since saved."""
        return [t for t, version in self.watched if t._version != version]

    def _save_namespace(self, space: dict[str, Any], seen: set[tuple[int, Any]]) -> None:
        """Save the module-level state of a namespace of the code (see :func:`_namespaces`): the contents of its
        dicts, lists, sets and deques, and of those they hold (a tracker's dict of dicts of tensors), and the small
        tensors among them, by value. The code may fill them through what no place names: a function that returns the
        registry it fills (Megatron's ``get_moe_layer_wise_logging_tracker()[name]["values"][layer] += loss``, an
        auxiliary loss appended to the list a getter returns). At most :data:`_TENSOR_WALK` of them per namespace."""
        budget = [_TENSOR_WALK]
        for name, value in list(dict.items(space)):
            if not (isinstance(name, str) and name.startswith("__")):
                self._save_held(value, seen, 3, budget)

    def _save_held(self, value: Any, seen: set[tuple[int, Any]], depth: int, budget: list[int]) -> None:
        """Save ``value`` where it is a small tensor, or a container (with what it holds, ``depth`` levels deep)."""
        if (
            not isinstance(value, torch.Tensor | np.ndarray | dict | list | set | collections.deque)
            or (id(value), None) in seen
        ):
            return
        budget[0] -= 1
        if budget[0] < 0:
            return
        if isinstance(value, torch.Tensor):
            self._save_tensor(value, seen)
            return
        if isinstance(value, np.ndarray):
            self._save_array(value, seen)
            return
        if depth <= 0 or not isinstance(value, dict | list | set | collections.deque):
            return
        seen.add((id(value), None))
        contents = container_contents(value)
        self.saved.append(("in", value, None, contents))
        for item in (v for _, v in contents[1]) if issubclass(contents[0], dict) else contents[1]:
            self._save_held(item, seen, depth - 1, budget)

    def __bool__(self) -> bool:
        return bool(self.saved)

    def _save(self, module: nn.Module, place: _Place, seen: set[tuple[int, Any]]) -> None:
        kind, where, name, steps, last = place
        if last is None:  # a rebound global or cell
            if kind == "cell":
                cell = where.cells.get(name)
                if cell is not None and (id(cell), None) not in seen:
                    seen.add((id(cell), None))
                    self.saved.append(("cell", cell, None, where.get(name, _MISSING)))
            elif (id(where), name) not in seen:
                seen.add((id(where), name))
                self.saved.append(("dict", where, name, where.get(name, _MISSING)))
            return
        obj: Any = module if kind == "self" else where.get(name, _MISSING)
        if kind == "self" and steps[:1] == ((".", "__class__"),):
            obj, steps = type(module), steps[1:]
        for step in steps:
            obj = _step(obj, step) if obj is not _MISSING else _MISSING
        if obj is _MISSING or isinstance(obj, property | nn.Module):  # (a module's own attributes: the snapshot's)
            return
        if kind == "self" and len(steps) == 1 and last[0] == "[]" and steps[0][1] in vars(module):
            return  # (a container the module holds: the snapshot puts back a copy of it)
        if isinstance(obj, torch.Tensor):  # changed in place (_STEP.add_(1), _STEP[0] += 1): a small one, by value
            if last[0] != ".":
                self._save_tensor(obj, seen)
            return
        if isinstance(obj, np.ndarray):  # (a numpy array, the same: _STEP[0] += 1)
            if last[0] != ".":
                self._save_array(obj, seen)
            return
        if last[0] in ("[]", "()"):
            if isinstance(obj, dict | list | set | collections.deque) and (id(obj), None) not in seen:
                seen.add((id(obj), None))
                contents = container_contents(obj)
                self.saved.append(("in", obj, None, contents))
                for item in (v for _, v in contents[1]) if issubclass(contents[0], dict) else contents[1]:
                    if isinstance(item, np.ndarray):  # (STATS["n"] += 1 on an array: changed in place, kept bound)
                        self._save_array(item, seen)
            return
        attr = last[1]
        if (id(obj), attr) in seen:
            return
        if isinstance(obj, type):
            seen.add((id(obj), attr))
            self.saved.append(("class", obj, attr, _DICT_OF(obj).get(attr, _MISSING)))
            return
        try:
            own = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            return
        if type(own) is dict:
            seen.add((id(obj), attr))
            self.saved.append(("dict", own, attr, own.get(attr, _MISSING)))

    def restore(self) -> None:
        """Put back what changed since it was saved."""
        for i, (how, where, key, value) in enumerate(self.saved):
            if how == "tensor":
                if where._version != key and where.shape == value.shape:  # (only what a run changed: no needless bump)
                    with torch.no_grad():
                        where.copy_(value)
                    self.saved[i] = (how, where, where._version, value)
            elif how == "in":
                refill_container(where, value)
            elif how == "array":
                if where.shape == value.shape and not np.array_equal(where, value):
                    np.copyto(where, value)
            elif how == "cell":
                try:
                    now = where.cell_contents
                except ValueError:
                    now = _MISSING
                if now is not value:
                    if value is _MISSING:
                        del where.cell_contents
                    else:
                        where.cell_contents = value
            elif how == "class":
                if _DICT_OF(where).get(key, _MISSING) is not value:
                    if value is _MISSING:
                        type.__delattr__(where, key)
                    else:
                        type.__setattr__(where, key, value)
            elif where.get(key, _MISSING) is not value:
                if value is _MISSING:
                    where.pop(key, None)
                else:
                    where[key] = value


#: the most elements of a tensor outside the modules that :class:`OutsideState` always copies to put back (a step count)
_TENSOR_LIMIT = 1 << 16
#: the most elements of the larger such tensors, all together, that one :class:`OutsideState` copies (a table of counts
#: per step); a larger one still is watched, and a run that changes it refused
_LARGE_BUDGET = 1 << 24
#: the builtin container types :class:`OutsideState` puts back, the nearest first (an OrderedDict keeps its order)
CONTAINERS = (collections.OrderedDict, dict, list, set, collections.deque)


def container_contents(obj: Any) -> Any:
    """A container's contents as its builtin type holds them (items of a dict), none of its own methods run."""
    kind = next(k for k in CONTAINERS if isinstance(obj, k))
    return kind, (list(dict.items(obj)) if issubclass(kind, dict) else list(kind.__iter__(obj)))


def refill_container(obj: Any, saved: tuple[Any, list[Any]]) -> None:
    """Put a container's contents back in place (see :func:`container_contents`), where they changed: other code
    that holds the same object keeps seeing it."""
    kind, items = saved
    if issubclass(kind, dict):
        if dict.__len__(obj) == len(items) and all(dict.get(obj, k, _MISSING) is v for k, v in items):
            return
        kind.clear(obj)
        for k, v in items:
            kind.__setitem__(obj, k, v)
        return
    now = list(kind.__iter__(obj))
    if len(now) == len(items) and all(a is b for a, b in zip(now, items, strict=True)):
        return
    kind.clear(obj)
    if kind is list:
        list.extend(obj, items)
    elif kind is set:
        set.update(obj, items)
    else:
        collections.deque.extend(obj, items)


def _read_code(module: nn.Module, forward: Any) -> _Code | None:
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
        places = _Changes()
        _walk(fn, cls, 0, set(), found, chains, stores, places)
        cached = per_class[fn] = (
            tuple({read[0]: read for read in found}.values()),
            tuple({(c[0], id(c[1]), c[2], c[3]): c for c in chains}.values()),
            frozenset(stores),
            tuple({(p[0], id(p[1]), p[2], p[3], p[4]): p for p in places.places}.values()),
            not places.read.isdisjoint(places.changed),
            tuple({(h[0], id(h[1]), h[2]): h for h in places.holders}.values()),
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


#: names whose use in a module's code may read its attributes otherwise than by a name written in the code (a name
#: computed, every attribute at once, its parameters and buffers by iteration, or its class's lookup from ``super()``)
_DYNAMIC_READS = frozenset(
    (
        "getattr",
        "vars",
        "dir",
        "__dict__",
        "__getattribute__",
        "__getattr__",
        "attrgetter",
        "getattr_static",
        "super",
        "locals",
        "globals",
        "eval",
        "exec",
        "_buffers",
        "_parameters",
        "buffers",
        "named_buffers",
        "parameters",
        "named_parameters",
        "state_dict",
        "_modules",
    )
)
#: how many functions :func:`attribute_names_read` reads from one forward before it gives up (reads nothing proven)
_READ_BUDGET = 256
#: the instructions that may follow a load of the module in code that only reads or writes its attributes by name
_ATTRIBUTE_OPS = frozenset(("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR"))
#: the methods of ``nn.Module`` a subclass overrides to read its attributes otherwise than by name at each call
_LOOKUP_METHODS = ("__getattribute__", "__getattr__", "__call__", "_call_impl", "_wrapped_call_impl")
#: what :func:`attribute_names_read` found, per class, per forward function
_NAMES_READ: weakref.WeakKeyDictionary[type, dict[Any, frozenset[str] | None]] = weakref.WeakKeyDictionary()


def attribute_names_read(module: nn.Module) -> frozenset[str] | None:
    """Every name the code that ``module``'s forward runs may read its attributes by: the names and string
    constants of its forward, the methods, properties and functions it reaches, the functions defined in them, and
    the methods it names of the objects of the user's classes it reaches (a helper object it holds, in a list too,
    or a global holds: see :func:`_held_methods`), followed to any depth; or None where that reading is not complete
    (no Python forward; a name that reads attributes otherwise than by a name written in the code: ``getattr(self,
    name)``, ``vars(self)``, ``self.__dict__``, ``super()``, ``self.named_buffers()``; the module handed on as a
    value, to code not read here: ``helper(self)``, ``f"{self}"``; a class attribute that is another kind of
    descriptor, or a callable attribute of the module's that is no function; an override of attribute lookup or of
    ``__call__``; more code than a bound). An attribute of the module whose name is not among them is never read by
    its forward: a record the code around it keeps there (the ids a block stores on its gate after the gate
    returns), not a setting. Read from the code; nothing runs."""
    cls = type(module)
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if any(name in vars(klass) for name in _LOOKUP_METHODS):
            return None
    forward = module.__dict__.get("forward")
    fn = _function(forward) if forward is not None else _function(getattr(cls, "forward", None))
    if fn is None:
        return None
    # (a method of its class, which takes the module first: the class's forward, or one a wrapper set on the module
    # runs; any other function set on it may reach the module otherwise, unseen here)
    if not _class_method(cls, fn):
        return None
    per_class = _NAMES_READ.setdefault(cls, {})
    if fn in per_class:
        found = per_class[fn]
    else:
        found = per_class[fn] = _names_read(fn, cls)
    if found is None:
        return None
    # (callables the module holds itself that its code names: a function followed; another object is not read)
    own = module.__dict__
    extra: set[str] = set()
    held: list[Any] = []
    for name in found & own.keys():
        value = own[name]
        if isinstance(value, nn.Module | torch.Tensor) or not callable(value):
            if not isinstance(value, nn.Module | torch.Tensor) and _user_object(value):
                held.append(value)  # (a helper object it holds: its methods its code names are read below)
            continue
        inner = _function(value) if isinstance(value, types.FunctionType | types.MethodType) else None
        if inner is None:
            return None
        if isinstance(value, types.MethodType) and value.__self__ is not module:
            return None  # (a method of another object: what it holds is not read here)
        more = _names_read(inner, cls if isinstance(value, types.MethodType) else None)
        if more is None:
            return None
        extra |= more
    if held:
        more = _names_read(None, None, held=held, names=found | extra)
        if more is None:
            return None
        extra |= more
    return found | extra if extra else found


def hook_names_read(hook: Any) -> frozenset[str] | None:
    """Every name the code of a user's forward hook or pre-hook ``hook`` may read a module's attributes by, as
    :func:`attribute_names_read` reads a forward's (a function, a bound method of any object, a
    ``functools.partial`` of either, a callable object's ``__call__``: the functions and methods they reach too); or
    None where that reading is not complete: no Python code, a name computed, or the module it is handed (its first
    argument, or one a partial binds) used otherwise than to read or write its attributes by name. A hook that
    scales a gate's logits by ``router.temperature`` reads ``temperature``: an attribute the router's own code never
    names is a setting of its decision all the same while such a hook runs on its modules. Read from the code;
    nothing runs."""
    bound: list[Any] = []
    owner: type | None = None
    fn = hook
    for _ in range(8):
        if isinstance(fn, functools.partial):
            bound.append(fn)
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            owner, fn = type(fn.__self__), fn.__func__
            break
        elif isinstance(fn, types.FunctionType):
            break
        else:
            call = inspect.getattr_static(type(fn), "__call__", None)
            if not isinstance(call, types.FunctionType) or type(fn).__module__ == "builtins":
                return None
            owner, fn = type(fn), call
            break
    inner = _function(fn)
    if inner is None:
        return None
    found = _names_read(inner, owner)
    if found is None:
        return None
    code = inner.__code__
    params = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    if owner is not None:
        params = params[1:]  # (the object the method is bound to: read by _names_read)
    handed: set[str] = set()
    for part in reversed(bound):  # (the innermost partial binds the first positional parameters)
        handed.update(k for k, v in part.keywords.items() if isinstance(v, nn.Module))
        handed.update(p for p, v in zip(params, part.args, strict=False) if isinstance(v, nn.Module))
        params = params[len(part.args) :]
    if params:
        handed.add(params[0])  # (the module the hook runs on)
    codes = [code]
    while codes:
        c = codes.pop()
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        if any(_escapes(c, name) for name in handed):
            return None
    return found


def _class_method(cls: type, fn: types.FunctionType) -> bool:
    """Is ``fn`` a method of ``cls`` (as looked up on it, statically), which takes the module first?"""
    attr = inspect.getattr_static(cls, fn.__name__, None)
    return isinstance(attr, types.FunctionType) and _function(attr) is fn


def _names_read(
    fn: types.FunctionType | None,
    cls: type | None,
    into: list[types.CodeType] | None = None,
    held: Iterable[Any] = (),
    names: Iterable[str] = (),
) -> frozenset[str] | None:
    """The names and string constants of ``fn``'s code and of all it reaches (see :func:`attribute_names_read`), its
    first argument the module where ``cls`` is given (a method of it); None where the reading is not complete.
    ``into``: gets every code object read (nested ones too). The objects of the user's classes that code reaches (in
    a global, a closure cell, or ``held``: those a module holds, read with ``names`` at first) are read too, by the
    methods of theirs it names (see :func:`_held_methods`): a helper object's method that reads a router's attribute
    reads it as the router's own code would."""
    found: set[str] = set(names)
    seen: set[types.CodeType] = set()
    todo: list[tuple[types.FunctionType, type | None, bool]] = [(fn, cls, cls is not None)] if fn is not None else []
    objects: list[Any] = list(held)
    while True:
        if not _read_todo(todo, seen, found, objects, into):
            return None
        more = _held_methods(objects, found)
        if more is None:
            return None
        todo = [t for t in more if t[0].__code__ not in seen]
        if not todo:
            return frozenset(found)


def _read_todo(
    todo: list[tuple[types.FunctionType, type | None, bool]],
    seen: set[types.CodeType],
    names: set[str],
    objects: list[Any],
    into: list[types.CodeType] | None,
) -> bool:
    """Reads the functions of ``todo`` and all they reach for :func:`_names_read`, into ``names``, ``seen`` and
    ``into``; the objects of the user's classes their globals and cells hold into ``objects``. False where the
    reading is not complete."""
    while todo:
        f, owner, is_method = todo.pop()
        if f.__code__ in seen:
            continue
        seen.add(f.__code__)
        if len(seen) > _READ_BUDGET:
            return False
        top = f.__code__
        me = top.co_varnames[0] if is_method and top.co_argcount else None
        codes = [top]
        mine: set[str] = set()
        read: list[types.CodeType] = []  # (its code and the code nested in it)
        while codes:
            c = codes.pop()
            read.append(c)
            codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
            if not _DYNAMIC_READS.isdisjoint(c.co_names):
                return False
            mine.update(c.co_names)
            mine.update(k for k in c.co_consts if type(k) is str)
            if me is not None and _escapes(c, me):
                return False
        names |= mine
        if into is not None:
            into.extend(read)
        cells = _Cells(f) if f.__closure__ else None
        for name in sorted(mine | set(top.co_freevars)):
            value = cells.get(name, _MISSING) if cells is not None and name in cells.cells else _MISSING
            if value is _MISSING:
                value = f.__globals__.get(name, _MISSING)
            if isinstance(value, types.FunctionType):
                todo.append((value, None, False))
            elif isinstance(value, nn.Module):
                # (a module held in a global, or in a closure cell its code hands on: it may be this one, its
                # attributes read unseen; one in a cell whose code only reads or writes its attributes by name, or
                # takes its class or identity, reads the names counted here already)
                if cells is None or name not in cells.cells or any(_escapes(c, name) for c in read):
                    return False
            elif value is not _MISSING and _user_object(value):
                objects.append(value)  # (a helper object, or a list of them: its methods named are read after)
            if owner is None:
                continue
            # (as the instance finds it in its class: not the class's own ``__name__``, which its metaclass holds,
            # nor what ``object`` holds for every instance, its ``__class__``: no attribute of the module is read)
            attr = _in_class(owner, name)
            if attr is not _MISSING and _OBJECTS.get(name, _MISSING) is attr:
                continue
            if isinstance(attr, types.FunctionType):
                todo.append((attr, owner, True))
            elif isinstance(attr, staticmethod | classmethod):
                inner = _function(attr)
                if inner is not None:
                    todo.append((inner, None, False))
            elif isinstance(attr, property):
                todo.extend((g, owner, True) for g in (attr.fget, attr.fset) if isinstance(g, types.FunctionType))
            elif attr is not _MISSING and hasattr(type(attr), "__get__") and not isinstance(attr, type):
                return False  # (another descriptor: its __get__ is handed the module)
    return True


#: the types whose values hold no code of the user's: numbers, strings, and what torch and Python describe
_PLAIN_VALUES = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.Tensor)
#: how many objects and items :func:`_held_methods` looks at before it calls its reading not complete
_HELD_BUDGET = 4096


def _user_object(value: Any) -> bool:
    """Is ``value`` an object whose methods may be the user's code (an instance of a class of the user's, a module
    too, a callable one; a class of the user's, by its static and class methods), or a container that may hold one
    (a list, tuple, set or dict)? Not a plain value, a function, a Python module, nor an object or class of a
    library's (torch's, numpy's)."""
    if isinstance(value, list | tuple | set | frozenset | dict):
        return True
    if isinstance(value, (*_PLAIN_VALUES, types.ModuleType, types.FunctionType, types.MethodType)):
        return False  # (a function is read where it is found: see _read_todo)
    if isinstance(value, types.BuiltinFunctionType | types.BuiltinMethodType | functools.partial):
        return False
    return not _skipped(value)


def _held_methods(objects: Sequence[Any], names: set[str]) -> list[tuple[types.FunctionType, type | None, bool]] | None:
    """The functions code that names ``names`` may run through ``objects`` (objects of the user's classes, and
    containers of them, that it reaches: see :func:`_user_object`), as :func:`_names_read` reads them: the methods,
    properties, static and class methods their classes hold under one of ``names``, and the functions and bound
    methods they hold themselves under one, followed through the objects they hold under one (a helper that holds
    the router, in a list too). ``self.helper.shift(ids)`` runs ``shift`` of the helper's class, whose reads of the
    router's attributes are reads all the same. None where that is not known: a class that looks its attributes up
    in code (``__getattr__``), another kind of descriptor, a callable that is no function, too many objects."""
    out: list[tuple[types.FunctionType, type | None, bool]] = []
    todo = list(objects)
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _PLAIN_VALUES):
            continue
        seen.add(id(obj))
        if len(seen) > _HELD_BUDGET:
            return None
        if isinstance(obj, list | tuple | set | frozenset | dict):
            items = [v for v in (obj.values() if isinstance(obj, dict) else obj) if not isinstance(v, _PLAIN_VALUES)]
            if len(items) > _HELD_BUDGET:
                return None
            todo += items
            continue
        if not _user_object(obj):
            continue
        klass = isinstance(obj, type)  # (a class: its functions are called unbound, its static and class methods)
        cls = obj if klass else type(obj)
        if not (isinstance(obj, nn.Module) or klass) and any(
            _in_class(cls, name) is not _OBJECTS.get(name, _MISSING) for name in ("__getattr__", "__getattribute__")
        ):
            return None  # (its attributes looked up in code of its class's)
        for name in sorted(names | {"__call__"} if not klass else names):
            attr = _in_class(cls, name)
            if attr is _MISSING or _OBJECTS.get(name, _MISSING) is attr or (name == "__call__" and _skipped(attr)):
                continue
            if isinstance(attr, types.FunctionType):
                out.append((attr, None if klass else cls, not klass))
            elif isinstance(attr, staticmethod | classmethod):
                inner = _function(attr)
                if inner is None:
                    return None
                out.append((inner, None, False))
            elif isinstance(attr, property):
                if not klass:
                    out.extend((g, cls, True) for g in (attr.fget, attr.fset) if isinstance(g, types.FunctionType))
            elif hasattr(type(attr), "__get__") and not isinstance(attr, type) and not _skipped(attr):
                return None  # (another descriptor, a partialmethod: its __get__ is handed the object)
        if klass:
            continue  # (what a class holds besides is read by the names counted already)
        try:
            own = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            continue  # (slots only: what they hold is read by the names counted already)
        for name in names & own.keys():
            value = own[name]
            if isinstance(value, types.FunctionType):
                out.append((value, None, False))
            elif isinstance(value, types.MethodType):
                inner = _function(value)
                if inner is None:
                    return None
                out.append((inner, type(value.__self__), True))
                todo.append(value.__self__)
            elif callable(value) and not isinstance(value, nn.Module | type) and not _skipped(value):
                inner = _function(value)
                if inner is None:
                    return None
                out.append((inner, None, False))
            else:
                todo.append(value)
    return out


#: what ``object`` holds for every instance (its ``__class__``, ``__init__``, ``__eq__``...)
_OBJECTS = vars(object)


def _escapes(code: types.CodeType, me: str) -> bool:
    """Is the module (the local or free variable ``me``) used in ``code`` otherwise than to read or write one of its
    attributes by name (``self.gate``, ``self.ids = ids``): handed to a call, formatted, returned, compared?

    Uses that read none of its attributes are no escape: its class or identity taken by a builtin (``type(m)``,
    ``id(m)``, ``isinstance(m, nn.Linear)``), a key of a mapping (``names[m]``, ``seen[m] = out``), a test of its
    identity (``x is m``, ``m is None``). A hook that logs a module's output under its name is such code."""
    loaded = False
    before: Any = None  # (the last instruction not passed over)
    for ins in _instructions(code):
        op = ins.opname
        if op in _PASS:
            continue
        if loaded and op not in _ATTRIBUTE_OPS and not _keyed_or_compared(ins):
            return True
        loaded = False
        if op.startswith("LOAD_FAST") or op in ("LOAD_DEREF", "LOAD_NAME"):
            argval = ins.argval
            if isinstance(argval, tuple):  # (two locals loaded at once: the first is left under the second)
                if argval[0] == me:
                    return True
                argval = argval[-1]
            elif before is not None and before.opname in _GLOBAL_LOADS and before.argval in _CLASS_OR_IDENTITY:
                argval = None  # (handed to type, id or isinstance: first argument, right after the builtin)
            loaded = argval == me
        before = ins
    return loaded


#: the builtins that take a module's class or identity, reading none of its attributes (its first argument, loaded
#: right after the builtin): ``type(m)``, ``id(m)``, ``isinstance(m, cls)``
_CLASS_OR_IDENTITY = frozenset(("type", "id", "isinstance"))
_GLOBAL_LOADS = frozenset(("LOAD_GLOBAL", "LOAD_NAME"))
#: what may follow a module loaded that uses it as a key (the last operand of a subscript: ``names[m]``,
#: ``seen[m] = out``) or tests its identity (``x is m``; ``m is None`` as a jump of its own)
_KEYED_OR_COMPARED = frozenset(("BINARY_SUBSCR", "STORE_SUBSCR", "DELETE_SUBSCR", "IS_OP"))


def _keyed_or_compared(ins: Any) -> bool:
    """Does the instruction ``ins``, right after a module is loaded, use it as a key or test its identity alone (see
    :data:`_KEYED_OR_COMPARED`; a subscript by ``BINARY_OP`` where the interpreter spells it so, a jump on
    ``is None``)?"""
    op = ins.opname
    return (
        op in _KEYED_OR_COMPARED
        or (op == "BINARY_OP" and ins.argrepr == "[]")
        or op.endswith(("_IF_NONE", "_IF_NOT_NONE"))
    )


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
        inner = _attribute(fn, "__wrapped__")  # (as inspect.getattr_static finds it: nothing of a user's object runs)
        if inner is _MISSING:
            return None
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
    places: _Changes,
) -> None:
    """Collect the reads of ``fn``'s code into ``out``, the chains it reads into ``chains``, what it assigns itself
    into ``stores`` (named as the settings it reads are) and where into ``places``; follow the functions and methods
    it names."""
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
        _changes(fn, c, me, cls, cells if c is code else None, stores, places)
        for kind, name, steps in _chains_in(c, me, space):
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
            places.holders.append(("cell", cells, name))
        value = space.get(name, _MISSING)
        if value is not _MISSING:
            if is_setting(value):
                out.append((f"{where}.{name}", space, name))
            elif isinstance(value, types.ModuleType | type) and not _skipped(value):
                _attributes(value, names, out)
                if isinstance(value, type) and issubclass(value, torch.autograd.Function):
                    # (``Noise.apply(x)`` runs the Function's own static methods: their code is the forward's)
                    follow.extend((_in_class(value, m), None) for m in _FUNCTION_METHODS)
            if not is_setting(value) and not isinstance(value, types.FunctionType):
                places.holders.append(("global", space, name))
            follow.append((value, None))
        if cls is not None:
            attr = inspect.getattr_static(cls, name, _MISSING)
            if is_setting(attr):
                out.append((f"{cls.__qualname__}.{name}", None, name))
            else:  # (a static or class method's first argument is not the module)
                follow.append((attr, None if isinstance(attr, staticmethod | classmethod) else cls))
                if attr is not _MISSING and not isinstance(attr, types.FunctionType):
                    places.holders.append(("class", cls, name))
    if depth >= _DEPTH:
        return
    for value, owner in follow:
        inner = _function(value) if isinstance(value, types.FunctionType | staticmethod | classmethod) else None
        if inner is not None and not _skipped(inner):
            _walk(inner, owner, depth + 1, seen, out, chains, stores, places)


#: the static methods of a ``torch.autograd.Function`` that its ``apply`` runs
_FUNCTION_METHODS = ("forward", "setup_context", "backward")


#: instructions a chain passes over (no value of its own: caches, a call's preparation)
_PASS = frozenset(("CACHE", "PRECALL", "EXTENDED_ARG", "NOP", "NOT_TAKEN", "PUSH_NULL"))
_CONSTANTS = frozenset(("LOAD_CONST", "LOAD_SMALL_INT"))


def _chains_in(
    code: types.CodeType, me: str | None, space: Mapping[str, Any] | None = None
) -> list[tuple[str, str, tuple[_Step, ...]]]:
    """The chains ``code`` reads, as ``(root kind, root name, steps)``: attributes, subscripts by a constant,
    ``.get(constant)`` and calls with constant arguments, from the module (``me``, its first argument), a global or
    a free variable (``self.config.routing.use_bias``, ``self.flags[0]``, ``self.parent_ref().use_bias``,
    ``os.environ.get("X")``). A module-level name of ``space`` (the code's globals) bound to a key (a string, an
    int) counts as that constant inside a chain (``os.environ.get(ENV_KEY)``, ``self.flags[FLAG]``). Read from the
    bytecode, so nothing runs; a chain ends at the first other instruction."""
    import dis  # (imported by inspect already)

    out: list[tuple[str, str, tuple[_Step, ...]]] = []
    kind = name = ""
    steps: list[_Step] = []
    consts: list[Any] = []

    method = False  # the last step loads a method to call: no setting (a chain that ends so is left out)

    def end() -> None:
        nonlocal kind
        if kind and steps and not method:
            root, chain = name, tuple(steps)
            own = _own_module_steps(space, root, chain) if kind == "global" and space is not None else 0
            if own and len(chain) > own and chain[own][0] == ".":  # (sys.modules[__name__].CFG.flag: CFG.flag)
                root, chain = chain[own][1], chain[own + 1 :]
            if chain and not (own and root == name):  # (no steps left: a global it names, read as one)
                out.append((kind, root, chain))
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
            if op == "LOAD_GLOBAL" and space is not None and not (ins.arg or 0) & 1:  # (not one pushed to be called)
                key = space.get(ins.argval, _MISSING)
                if _is_key(key):
                    consts.append(key)
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


#: the methods of a dict, list, set or deque that change it in place (a warn-once registry: ``_SEEN.add(key)``)
_MUTATORS = frozenset(
    (
        "setdefault", "update", "add", "append", "extend", "insert", "pop", "popitem", "clear", "discard", "remove",
        "appendleft", "extendleft", "popleft", "move_to_end", "__setitem__", "__delitem__", "sort", "reverse",
        "rotate", "difference_update", "intersection_update", "symmetric_difference_update",
    )
)  # fmt: skip
#: instructions with no value of their own, for :func:`_changes` (which tracks the values a call leaves)
_NO_VALUE = frozenset(("CACHE", "PRECALL", "EXTENDED_ARG", "NOP", "NOT_TAKEN", "RESUME"))


class _Changes:
    """What :func:`_changes` finds in the code followed from a forward: where it changes state (``places``), and the
    roots of what it changes and of what it reads (a global, a closure cell, an attribute of the module), by
    identity: a root in both is state the code reads, which may steer it (a step count, ``len(_SEEN)``)."""

    def __init__(self) -> None:
        self.places: list[_Place] = []
        self.read: set[tuple[Any, ...]] = set()
        self.changed: set[tuple[Any, ...]] = set()
        #: the globals, closure cells and class attributes (through the module) the code names that hold no setting:
        #: ``(kind, holder, name)``, where a random generator it draws from may be held (see :func:`generators`)
        self.holders: list[tuple[str, Any, str]] = []


#: the methods of :data:`_MUTATORS` whose first argument is the key of the one entry they change
_KEYED = frozenset(("setdefault", "pop", "__setitem__", "__delitem__"))


class _Pending:
    """A method that changes a container in place, loaded to be called (``_SEEN.setdefault``): its call says which
    entry it changes (see :func:`_changes`)."""

    __slots__ = ("name", "obj")

    def __init__(self, obj: _Held, name: str) -> None:
        self.obj, self.name = obj, name


class _Const:
    """A constant on the stack, as :func:`_changes` follows it (a key: ``_WARNED["zero"] = True``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _OwnModule:
    """The module whose globals the code runs in, reached by its name (``sys.modules[__name__]``), on the stack as
    :func:`_changes` follows it: its attributes are the code's globals."""

    __slots__ = ()


_OWN = _OwnModule()

#: a value on the stack, as :func:`_changes` follows it: a chain ``(root kind, root name, steps)``, a constant, the
#: code's own module, or None (anything else: what it is, is not followed)
_Held = tuple[str, str, tuple[_Step, ...]] | _Const | _Pending | _OwnModule | None

#: ``ModuleType.__dict__``'s getter: a module's own namespace, whatever a subclass of it says
_MODULE_DICT = vars(types.ModuleType)["__dict__"].__get__


def _own_module_steps(space: Mapping[str, Any], name: str, steps: tuple[_Step, ...]) -> int:
    """How many of ``steps`` from the global ``name`` of ``space`` (the globals of the code) reach the module those
    globals are, by its name: ``sys.modules[__name__]``, ``sys.modules.get(__name__)``,
    ``importlib.import_module(__name__)`` (and ``modules[...]``, ``import_module(...)`` imported by name); 0 where
    they do not. The name is looked up in ``sys.modules`` and its namespace compared with ``space``; nothing runs."""
    own = space.get("__name__")
    if type(own) is not str or not steps:
        return 0
    root = space.get(name, _MISSING)
    by_name = (("[]", own), ("get", own))
    if root is sys and steps[0] == (".", "modules") and steps[1:2] and steps[1] in by_name:
        n = 2
    elif root is sys.modules and steps[0] in by_name:
        n = 1
    elif root is importlib and steps[:2] == ((".", "import_module"), ("()", (own,))):
        n = 2
    elif root is importlib.import_module and steps[0] == ("()", (own,)):
        n = 1
    else:
        return 0
    modules = sys.modules
    module = dict.get(modules, own) if isinstance(modules, dict) else None
    return n if isinstance(module, types.ModuleType) and _MODULE_DICT(module) is space else 0


def _entry(obj: _Held, key: _Held) -> _Held:
    """The chain of ``obj[key]``: by a constant key, or any entry (a key the code computes)."""
    if not isinstance(obj, tuple):
        return None
    k = key.value if isinstance(key, _Const) and _is_key(key.value) else _ANY
    return (obj[0], obj[1], (*obj[2], ("[]", k)))


def _changes(
    fn: types.FunctionType,
    code: types.CodeType,
    me: str | None,
    cls: type | None,
    cells: _Cells | None,
    stores: set[str],
    changes: _Changes,
) -> None:
    """What ``code`` (of ``fn``, or defined in it) changes outside the module's own attributes, into ``stores`` by the
    names its reads have (see :func:`written`) and into ``places`` where: globals and closure cells it rebinds
    (``global _STEP; _STEP += 1``, ``nonlocal step``), attributes it sets on a chain (``Router._warned = True``,
    ``type(self)._calls += 1``, ``self.cfg.count += 1``), entries of a container it fills (``_WARNED[key] = True``,
    ``_SEEN.setdefault(key, ...)``, ``self._cache[name] = value``). The stack is followed through straight code
    from the bytecode, nothing runs; where it is not known (past a jump target, an instruction not followed) what it
    holds is not a chain, so a change there is not seen: its reads stay settings (refused when they change between
    blocks, never silently kept)."""
    import dis

    space = fn.__globals__
    where = space.get("__name__", "?")
    found: list[tuple[str, str, tuple[_Step, ...], _Step]] = []
    stack: list[_Held] = []

    def named(key: _Held) -> Any:
        """The string ``key`` is where known: a constant, or a global bound to one (``__name__``)."""
        if isinstance(key, _Const):
            return key.value
        if isinstance(key, tuple) and key[0] == "global" and not key[2]:
            return space.get(key[1])
        return None

    def own(obj: _Held, step: _Step) -> bool:
        """Is ``obj`` then ``step`` the module of these globals, by its name (``sys.modules[__name__]``)?"""
        if not isinstance(obj, tuple) or obj[0] != "global":
            return False
        chain = (*obj[2], step)
        return _own_module_steps(space, obj[1], chain) == len(chain)

    def rebound(name: str) -> None:
        """A global rebound (``global _STEP; _STEP += 1``, or through the module: ``sys.modules[__name__]._STEP``)."""
        stores.add(f"{where}.{name}")
        changes.places.append(("global", space, name, (), None))
        changes.changed.add(("global", id(space), name))

    def root(held: _Held) -> tuple[Any, ...] | None:
        """What ``held`` is part of, by identity: a global, a cell, an attribute of the module (or of its class)."""
        if not isinstance(held, tuple):
            return None
        kind, name, steps = held
        if kind == "global":
            return ("global", id(space), name)
        if kind == "cell":
            return ("cell", id(cells.cells[name])) if cells is not None and name in cells.cells else None
        if not steps:
            return None
        return ("class", steps[1][1]) if steps[0] == (".", "__class__") and len(steps) > 1 else ("self", steps[0][1])

    def pop(n: int, read: bool = True) -> list[_Held]:
        got = [stack.pop() if stack else None for _ in range(n)]  # (top first)
        if read:
            changes.read.update(r for r in map(root, got) if r is not None)
        return got

    def unknown() -> list[_Held]:  # (what the stack holds is read by code not followed)
        return pop(len(stack))

    for ins in dis.get_instructions(code):
        op, arg = ins.opname, ins.argval
        if ins.is_jump_target:
            unknown()
        if op in _NO_VALUE:
            continue
        if op in ("LOAD_GLOBAL", "LOAD_NAME"):
            stack.extend([None, ("global", arg, ())] if "NULL" in ins.argrepr else [("global", arg, ())])
        elif op.startswith("LOAD_FAST"):
            for local in arg if isinstance(arg, tuple) else (arg,):
                stack.append(("self", local, ()) if me is not None and local == me else None)
        elif op == "LOAD_DEREF":
            held: _Held = None
            if me is not None and arg == me:
                held = ("self", arg, ())
            elif cells is not None and arg in cells.cells:
                held = ("cell", arg, ())
            stack.append(held)
        elif op in _CONSTANTS:
            stack.append(_Const(arg))
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            if op == "LOAD_METHOD" or "NULL|self" in ins.argrepr:  # a method loaded to be called
                in_place = isinstance(arg, str) and arg.endswith("_") and not arg.startswith("_")  # (a tensor's add_)
                (obj,) = pop(1, read=arg not in _MUTATORS)
                if obj is _OWN:
                    obj = ("global", arg, ())  # (a function of the module, called: nothing of it changes)
                mutates = arg in _MUTATORS and isinstance(obj, tuple)
                if in_place and isinstance(obj, tuple):
                    found.append((*obj, _IN_PLACE))
                if mutates:  # (which entry: seen at its call)
                    stack.extend((_Pending(obj, arg), None))
                elif arg in ("get", "import_module") and isinstance(obj, tuple):  # (the module by name, maybe)
                    stack.extend(((obj[0], obj[1], (*obj[2], (".", arg))), None))
                else:
                    stack.extend((None, None))
            else:
                (obj,) = pop(1, read=False)
                if obj is _OWN:  # (sys.modules[__name__].X: the global X)
                    stack.append(("global", arg, ()))
                else:
                    stack.append((obj[0], obj[1], (*obj[2], (".", arg))) if isinstance(obj, tuple) else None)
        elif op == "BINARY_SUBSCR" or (op == "BINARY_OP" and ins.argrepr == "[]"):
            (key,) = pop(1)
            (obj,) = pop(1, read=False)
            stack.append(_OWN if own(obj, ("[]", named(key))) else _entry(obj, key))
        elif op in ("STORE_SUBSCR", "DELETE_SUBSCR"):
            (key,) = pop(1)
            (obj,) = pop(1, read=False)
            if op == "STORE_SUBSCR":
                pop(1)
            entry = _entry(obj, key)
            if isinstance(entry, tuple):
                found.append((entry[0], entry[1], entry[2][:-1], entry[2][-1]))
        elif op in ("STORE_ATTR", "DELETE_ATTR"):
            (obj,) = pop(1, read=False)
            if op == "STORE_ATTR":
                pop(1)
            if obj is _OWN:
                rebound(arg)
            elif isinstance(obj, tuple) and (obj[0] != "self" or obj[2]):
                found.append((*obj, (".", arg)))
            elif obj == ("self", me, ()) and cls is not None:  # (the module's own, from _stores_in; it hides a class
                stores.add(f"{cls.__qualname__}.{arg}")  # attribute of that name, read before: _warned = False)
        elif op in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            pop(1 if op == "STORE_GLOBAL" else 0)
            rebound(arg)
        elif op in ("STORE_DEREF", "DELETE_DEREF"):
            pop(1 if op == "STORE_DEREF" else 0)
            if cells is not None and arg in cells.cells:  # (a cell of its closure, not one of its own locals)
                stores.add(f"{fn.__qualname__}.<{arg}>")
                changes.places.append(("cell", cells, arg, (), None))
                changes.changed.add(("cell", id(cells.cells[arg])))
        elif op == "COPY":
            stack.append(stack[-arg] if len(stack) >= arg else None)
        elif op == "DUP_TOP":
            stack.append(stack[-1] if stack else None)
        elif op in ("SWAP", "ROT_TWO", "ROT_THREE"):
            n = arg if op == "SWAP" else 2 if op == "ROT_TWO" else 3
            if len(stack) < n:
                unknown()
            elif op == "ROT_THREE":
                stack[-3:] = [stack[-1], stack[-3], stack[-2]]
            else:
                stack[-1], stack[-n] = stack[-n], stack[-1]
        elif op == "PUSH_NULL":
            stack.append(None)
        elif op == "POP_TOP":
            pop(1, read=False)
        elif op == "STORE_FAST":
            pop(1)
        elif op in ("CALL", "CALL_FUNCTION", "CALL_METHOD"):
            args = pop(arg)
            callee = pop(1 if op == "CALL_FUNCTION" else 2, read=False)
            for pending in callee:
                if isinstance(pending, _Pending):  # _SEEN.setdefault("zero", True): that entry; update(...): any
                    keyed = pending.name in _KEYED and args and isinstance(args[-1], _Const)
                    entry = _entry(pending.obj, args[-1] if keyed else None)
                    if isinstance(entry, tuple):
                        found.append((entry[0], entry[1], entry[2][:-1], entry[2][-1]))
            typed = arg == 1 and ("global", "type", ()) in callee and args[0] == ("self", me, ())
            if typed and me is not None:  # type(self)
                stack.append(("self", me, ((".", "__class__"),)))
            elif arg == 1 and any(_by_name(c, named(args[0]), own) for c in callee):  # import_module(__name__)
                stack.append(_OWN)
            else:
                stack.append(None)
        elif op.startswith(("BINARY_", "INPLACE_", "COMPARE_", "IS_OP", "CONTAINS_OP")):
            pop(2)
            stack.append(None)
        elif op.startswith(("UNARY_", "TO_BOOL")):
            pop(1)
            stack.append(None)
        elif op in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET"):
            pop(arg)
            stack.append(None)
        else:  # (not followed: what the stack holds past it is not known)
            unknown()
    unknown()
    for kind, name, steps, last in found:
        for i, (how, key) in enumerate(steps):
            if how == "[]" and key is _ANY:  # (an entry of an entry the code computes: every entry of the first)
                steps, last = steps[:i], ("[]", _ANY)
                break
        changed = root((kind, name, (*steps, last)))
        if changed is not None:
            changes.changed.add(changed)
        stores.update(_names_changed(kind, space, name, steps, last, cls))
        changes.places.append((kind, space if kind == "global" else cells, name, steps, last))


def _by_name(callee: _Held, key: Any, own: Callable[[_Held, _Step], bool]) -> bool:
    """Is a call of ``callee`` with the one argument ``key`` the module of the code's globals by its name
    (``importlib.import_module(__name__)``, ``sys.modules.get(__name__)``; ``own`` tells)?"""
    if not isinstance(callee, tuple) or type(key) is not str:
        return False
    if callee[2] and callee[2][-1] == (".", "get"):
        return own((callee[0], callee[1], callee[2][:-1]), ("get", key))
    return own(callee, ("()", (key,)))


def _names_changed(
    kind: str, space: Mapping[str, Any], name: str, steps: tuple[_Step, ...], last: _Step, cls: type | None
) -> list[str]:
    """The names of the settings that a change of ``last`` of a chain makes (see :func:`_changes`): as the module's
    reads name them (:func:`_read_chain`, :func:`_attributes`, the one level into a dict :func:`_fingerprint`
    reads), every spelling of one entry (``D['a']``, ``D.get('a')``, ``D.a``)."""
    how, key = last
    if last == _IN_PLACE:
        ends = [""]
    elif how == ".":
        ends = [f".{key}"]
    elif key is _ANY:
        ends = ["[*", ".get(*", ".*"]
    else:
        ends = [f"[{key!r}]", f".get({key!r})"] + ([f".{key}"] if type(key) is str else [])
    if kind == "self":
        if steps[:1] == ((".", "__class__"),):  # a class attribute: type(self)._calls, self.__class__._calls
            return [f"{cls.__qualname__}{_spelled(steps[1:])}{e}" for e in ends] if cls is not None else []
        return [f"self{_spelled(steps)}{e}" for e in ends] + (
            [f"{cls.__qualname__}.{key}"] if cls is not None and not steps and how == "." else []
        )
    if kind == "cell":
        return [f"<{name}>{_spelled(steps)}{e}" for e in ends]
    root = space.get(name, _MISSING)
    if isinstance(root, types.ModuleType):
        label = str(vars(root).get("__name__", name))
    elif isinstance(root, type) and not steps:  # Router._warned = True: as read by name, and through self
        out = [f"{root.__qualname__}{e}" for e in ends]
        if cls is not None and root in _MRO_OF(cls):
            out += [f"{cls.__qualname__}{e}" for e in ends]
        return out
    else:
        label = f"{space.get('__name__', '?')}.{name}"
    return [f"{label}{_spelled(steps)}{e}" for e in ends]


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


def static_attribute(obj: Any, key: str) -> Any:
    """``inspect.getattr_static(obj, key, None)``, faster (see :func:`_attribute`)."""
    found = _attribute(obj, key)
    return None if found is _MISSING else found


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
        read = tuple(steps for kind, _, steps in _chains_in(code, me, fn.__globals__) if kind == "self")
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


#: the descriptors of fields that C code reads (a slot; a ``NamedTuple``'s field, ``operator.itemgetter``-like)
_Pair: Any = collections.namedtuple("_Pair", "a")
_C_FIELDS = (types.MemberDescriptorType, types.GetSetDescriptorType, type(_Pair.a))


def _step(obj: Any, step: _Step) -> Any:
    """One step of a chain, as the code takes it, without running code of the model's: an attribute as
    ``inspect.getattr_static`` finds it (with a module's parameters, buffers and children; a property as such), a
    list's or a tuple's item, a dict's or the environment's entry, a weak reference's object; else missing."""
    how, key = step
    if how == ".":
        got = _attribute(obj, key)
        if isinstance(got, _C_FIELDS) and not isinstance(obj, type):
            try:
                return got.__get__(obj, type(obj))  # (a slot, a named tuple's field: C code)
            except AttributeError:
                return _MISSING
        return got
    if how in ("[]", "get"):
        if obj is os.environ:
            return os.environ.get(key)
        if isinstance(obj, dict):
            return dict.get(obj, key, None if how == "get" else _MISSING)
        if how == "[]" and isinstance(obj, list | tuple) and type(key) is int and -len(obj) <= key < len(obj):
            return list.__getitem__(obj, key) if isinstance(obj, list) else tuple.__getitem__(obj, key)
        return _MISSING
    if isinstance(obj, weakref.ReferenceType) and not key:
        return weakref.ReferenceType.__call__(obj)
    if obj is os.getenv and key:
        return os.environ.get(key[0])
    return _MISSING


def _setting_of(value: Any) -> Any:
    """``value`` as a setting is compared, or missing: a plain value or an enum member (see :func:`comparable`),
    and a tensor of one real element that takes no gradient (``self.use_bias = torch.tensor(True)``, a step count
    kept in a float buffer: ``register_buffer("step", torch.zeros(()))``)."""
    if is_setting(value):
        return comparable(value)
    if (
        type(value) is torch.Tensor
        and value.numel() == 1
        and not value.requires_grad
        and not value.is_meta
        and not value.dtype.is_complex
    ):
        return comparable(value.item())
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


def codes_read(module: nn.Module) -> list[types.CodeType] | None:
    """The code objects ``module``'s forward runs, as :func:`attribute_names_read` reads them (its forward, the
    methods, properties and functions it reaches, the functions defined in them, and the functions the module holds
    that its code names), or None where that reading is not complete."""
    found = attribute_names_read(module)
    if found is None:
        return None
    cls = type(module)
    forward = module.__dict__.get("forward")
    fn = _function(forward) if forward is not None else _function(getattr(cls, "forward", None))
    if fn is None:
        return None
    out: list[types.CodeType] = []
    if _names_read(fn, cls, out) is None:
        return None
    own = module.__dict__
    held: list[Any] = []
    for name in found & own.keys():
        value = own[name]
        if isinstance(value, nn.Module | torch.Tensor) or not callable(value):
            if not isinstance(value, nn.Module | torch.Tensor) and _user_object(value):
                held.append(value)
            continue
        inner = _function(value)
        if inner is None or _names_read(inner, cls if isinstance(value, types.MethodType) else None, out) is None:
            return None
    if held and _names_read(None, None, out, held=held, names=found) is None:
        return None
    return out


def modules_codes_read(modules: Sequence[nn.Module]) -> list[types.CodeType] | None:
    """The code objects the forwards of ``modules`` run (see :func:`codes_read`), with the methods, properties and
    functions of any of their classes that code names (``self.gate.helper()``, a method of a child module called
    from its parent's forward, reaches code its own forward does not), followed until no more are found; None where
    the reading of any is not complete."""
    out: list[types.CodeType] = []
    read: set[tuple[Any, ...]] = set()
    for m in modules:
        # (one of each class read once, where it holds no code of its own: the experts of a block)
        key = (
            type(m),
            *(id(v) for v in vars(m).values() if callable(v) and not isinstance(v, nn.Module | torch.Tensor)),
        )
        if key in read:
            continue
        read.add(key)
        found = codes_read(m)
        if found is None:
            return None
        out += found
    seen = set(out)
    classes = list(dict.fromkeys(type(m) for m in modules))
    todo = list(out)
    while todo:
        names = {n for code in todo for n in code.co_names}
        todo = []
        for cls in classes:
            for name in sorted(names):
                attr = _in_class(cls, name)
                if isinstance(attr, property):
                    fns = [g for g in (attr.fget, attr.fset) if isinstance(g, types.FunctionType)]
                else:
                    inner = (
                        _function(attr) if isinstance(attr, types.FunctionType | staticmethod | classmethod) else None
                    )
                    fns = [inner] if inner is not None else []
                for fn in fns:
                    if fn.__code__ in seen or (fn.__module__ or "").startswith("torch."):
                        continue  # (torch's own: ``nn.Module.float`` reads no setting of the user's by name)
                    more: list[types.CodeType] = []
                    if _names_read(fn, cls if isinstance(attr, types.FunctionType | property) else None, more) is None:
                        return None
                    fresh = [c for c in more if c not in seen]
                    seen.update(fresh)
                    out += fresh
                    todo += fresh
                if len(seen) > _READ_BUDGET:
                    return None
    return out


#: the opcodes that read a value by a name of the code's (an attribute, a global, a closure cell), or write it
_NAMED_OPS = frozenset(
    name
    for name in dis.opmap
    if name.startswith(("LOAD_", "STORE_", "DELETE_", "IMPORT_"))
    and "FAST" not in name
    and name not in ("LOAD_CONST", "LOAD_SMALL_INT", "LOAD_ASSERTION_ERROR", "LOAD_BUILD_CLASS", "LOAD_CLOSURE")
)
#: the loads among them: what a read of a setting by name is
_NAME_LOADS = frozenset(("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_NAME"))
#: opcodes that take nothing from the stack and give nothing to it, or only push values no name of the code's names
_NO_POPS = frozenset(
    (
        "NOP",
        "RESUME",
        "CACHE",
        "PRECALL",
        "KW_NAMES",
        "EXTENDED_ARG",
        "LOAD_FAST",
        "LOAD_FAST_CHECK",
        "LOAD_FAST_LOAD_FAST",
        "LOAD_CONST",
        "LOAD_SMALL_INT",
        "LOAD_GLOBAL",
        "LOAD_DEREF",
        "LOAD_CLASSDEREF",
        "LOAD_NAME",
        "LOAD_CLOSURE",
        "PUSH_NULL",
        "COPY_FREE_VARS",
    )
)
#: opcodes that take one value from the stack (and push what :func:`dis.stack_effect` says, one more)
_ONE_POP = frozenset(
    (
        "LOAD_ATTR",
        "LOAD_METHOD",
        "UNARY_NEGATIVE",
        "UNARY_NOT",
        "UNARY_INVERT",
        "UNARY_POSITIVE",
        "POP_TOP",
        "UNPACK_SEQUENCE",
        "TO_BOOL",
    )
)
#: opcodes that take two values from the stack and push one: an operator of Python's
_TWO_POPS = frozenset(("BINARY_OP", "BINARY_SUBSCR", "COMPARE_OP", "IS_OP", "CONTAINS_OP"))
#: the calls, and how many values besides their arguments each takes: the callable, and a self or a NULL
_CALLS = {"CALL": 2, "CALL_METHOD": 2, "CALL_FUNCTION": 1, "CALL_FUNCTION_KW": 1, "CALL_KW": 2}
#: the calls whose arguments end with a tuple of the keywords' names (taken besides the arguments their count says)
_KW_CALLS = frozenset(("CALL_FUNCTION_KW", "CALL_KW"))


def only_into_calls(codes: Sequence[types.CodeType], sites: Mapping[types.CodeType, frozenset[int]], name: str) -> bool:
    """Does every read of ``name`` (an attribute, a global or a closure cell) in ``codes`` only compute what one of
    the calls at ``sites`` (a code object, the offsets of its calls there) is handed: its value, or what operators
    of Python's and methods of it make from it, goes on the stack straight into one of those calls, none of it
    kept past that call (no local, no other call's argument, no branch or loop on the way)? A decision's top-k
    whose scores a temperature divides is such a call: the temperature moves the scores alone, which a replay
    recomputes. False where any read of it is otherwise, or the name is written, or is a string constant (read by
    ``getattr``), or is read by code not among ``sites``. Read from the bytecode; nothing runs."""
    return all(_flows_only_into(code, sites.get(code, frozenset()), name) for code in codes)


@functools.lru_cache(maxsize=4096)
def _flows_only_into(code: types.CodeType, offsets: frozenset[int], name: str) -> bool:
    """:func:`only_into_calls` for one code object (nested ones apart) and the offsets of its calls."""
    if name in code.co_consts:
        return False
    named = name in code.co_names or name in code.co_freevars or name in code.co_cellvars
    if not named:
        return True
    ins = list(dis.get_instructions(code))
    reads = [j for j, i in enumerate(ins) if i.opname in _NAMED_OPS and i.argval == name]
    if not offsets and reads:
        return False
    return all(ins[j].opname in _NAME_LOADS and _into_call(ins, j, offsets) for j in reads)


def _pops(ins: Any) -> int | None:
    """How many values instruction ``ins`` takes from the stack, where known (see :func:`_into_call`); None else."""
    op = ins.opname
    if op in _NO_POPS:
        return 0
    if op in _ONE_POP:
        return 1
    if op in _TWO_POPS or (op.startswith("BINARY_") and op != "BINARY_SLICE"):
        return 2
    if op in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_SLICE"):
        return int(ins.arg)
    if op in _CALLS:
        return int(ins.arg) + _CALLS[op] + (op in _KW_CALLS)
    return None


def _into_call(ins: list[Any], j: int, offsets: frozenset[int]) -> bool:
    """Does the value instruction ``ins[j]`` loads go on the stack straight into a call at one of ``offsets``, and no
    further (see :func:`only_into_calls`)? The stack is followed value by value, those derived from it marked,
    from the load on, in straight-line code: a value derived is one an instruction made that took one."""
    stack = [False] * 64  # (the values on the stack before the load: none derived from it)
    for step, i in enumerate(ins[j:]):
        op = i.opname
        if step and i.offset in offsets:  # the call handed it: nothing derived may be left below its result
            pops = _pops(i)
            if pops is None or pops > len(stack):
                return False
            return not any(stack[: len(stack) - pops])
        if op in ("COPY", "SWAP", "DUP_TOP", "ROT_TWO", "ROT_THREE", "ROT_FOUR"):
            n = {"DUP_TOP": 1, "ROT_TWO": 2, "ROT_THREE": 3, "ROT_FOUR": 4}.get(op) or int(i.arg)
            if n > len(stack):
                return False
            if op in ("COPY", "DUP_TOP"):
                stack.append(stack[-n])
            elif op == "SWAP":
                stack[-1], stack[-n] = stack[-n], stack[-1]
            elif any(stack[-n:]):
                stack[-n:] = [True] * n
            continue
        pops = _pops(i)
        if pops is None or pops > len(stack):
            return False
        taken = stack[len(stack) - pops :] if pops else []
        if op in _CALLS and any(taken[_CALLS[op] :]) and not any(taken[: _CALLS[op]]):
            return False  # (handed to a call not of a value derived from it: it may keep it)
        pushes = 1 if op in _CALLS else 0 if op == "PRECALL" else pops + dis.stack_effect(i.opcode, i.arg)
        del stack[len(stack) - pops :]
        stack.extend([step == 0 or any(taken)] * pushes)
        if not any(stack):
            return True  # (what was derived from it was dropped)
    return False


#: the opcodes that jump (a loop's jump back among them): a read before a decision call a jump leads back to runs
#: after it too
_JUMPS = frozenset((*dis.hasjrel, *dis.hasjabs))
#: where torch's own code lies: its modules read ``training`` for dropout or statistics, never to name an expert
_TORCH_DIR = os.path.dirname(torch.__file__)


def read_after_calls(
    codes: Sequence[types.CodeType], sites: Mapping[types.CodeType, frozenset[int]], name: str
) -> bool:
    """May ``name`` (an attribute, a global or a closure cell) be read in ``codes`` after one of the calls at
    ``sites`` (a code object, the offsets of its decision calls there)? A read before every such call of its code, no
    loop leading back over them, is not; nor is one in a function or method that code names only before them (a
    helper that adds jitter to the scores). Any other read is, in a code with no decision call (a child's forward
    that remaps the ids, a helper named after the decision) too, as is the name as a string constant (``getattr``);
    torch's own code (a dropout) aside. Read from the bytecode; nothing runs."""
    early: dict[str, bool] = {}  # (per name a decision code loads: only ever before its decision calls)
    for code, offsets in sites.items():
        first = min(offsets)
        for i in dis.get_instructions(code):
            if i.opname in _NAME_LOADS and isinstance(i.argval, str):
                early[i.argval] = early.get(i.argval, True) and _before(code, i.offset, first)
    for code in codes:
        if code.co_filename.startswith(_TORCH_DIR):
            continue
        if name in code.co_consts:
            return True
        if name not in code.co_names and name not in code.co_freevars and name not in code.co_cellvars:
            continue
        calls = sites.get(code)
        reads = [i.offset for i in dis.get_instructions(code) if i.opname in _NAMED_OPS and i.argval == name]
        if calls is not None:
            if not all(_before(code, at, min(calls)) for at in reads):
                return True
        elif reads and not early.get(code.co_name, False):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _before(code: types.CodeType, at: int, first: int) -> bool:
    """Does the instruction at offset ``at`` of ``code`` run only before the one at ``first``: ahead of it, and no
    jump at or after ``first`` leads back to it or before it?"""
    if at >= first:
        return False
    return not any(
        i.opcode in _JUMPS and i.offset >= first and isinstance(i.argval, int) and i.argval <= at
        for i in dis.get_instructions(code)
    )
