"""The arguments of a router's forward that are settings of its decision.

A router may be handed the settings of its decision at each call instead of holding them: a minimum weight under
which its top-k's slots are dropped (``router(x, min_weight=0.2)``), a temperature, a flag that picks a branch, a
floor per expert. A decision is established on one forward's arguments; a cut that cut nothing there (a minimum of 0)
drops slots once raised, which the runs that established it never saw. So the arguments that are no tokens are
compared at each forward with those the decision was established with, and a change establishes it again (see
``RouterHook._run``), as a changed attribute does at the next block.

Settings among the arguments: plain values (``int``, ``float``, ``str``, ``bool``, ``None``, an ``enum`` member),
compared by value; and tensors of one value (0-d) or of one value per expert (1-d, ``num_experts`` long), compared by
identity and version counter first (no sync), and by value only where either moved (a new tensor of the same value
each call is the same setting). What varies by the tokens is none: the hidden states, a mask or position ids (of a
token count), a cache object; nor is code handed in a setting's place (it runs under the mode).
"""

from __future__ import annotations

import enum
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat
from ._code_settings import is_setting

__all__ = ["ArgumentStamp", "stamp_arguments"]

_TENSOR = torch.Tensor
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_NOTHING = object()  # (no argument is this: the fast path gives way to the slow one)


def _one_parameter(forward: Callable[..., Any]) -> bool:
    """Does ``forward`` take one parameter alone (besides its module), with no ``*args`` nor ``**kwargs``? Then no
    argument but the tokens it routes can be handed to it. Read from the code object: nothing of it runs."""
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return False
    bound = 1 if fn is not forward else 0  # (a bound method: its first parameter is the module)
    return code.co_argcount + code.co_kwonlyargcount - bound == 1


def _is_setting_tensor(value: torch.Tensor, num_experts: int) -> bool:
    """Is a tensor argument a setting: one value (0-d), or one per expert (``[num_experts]``)?"""
    return value.dim() == 0 or (value.dim() == 1 and value.shape[0] == num_experts)


class _Item:
    """One argument compared: where it is, the object last seen there (the fast path compares it by identity), a
    tensor's version counter as then (None: an inference tensor, which has none: compared by value), and, for a
    tensor, a copy of the value the decision was established with."""

    __slots__ = ("experts", "obj", "plain", "tensor", "value", "version", "where")

    def __init__(self, where: int | str, obj: Any, experts: int) -> None:
        self.where, self.experts = where, experts
        self.tensor = isinstance(obj, _TENSOR)
        self.plain = not self.tensor
        self.version = _version(obj) if self.tensor else None
        # (an inference tensor has no version counter: never taken as the very object, compared by value)
        self.obj: Any = _NOTHING if self.tensor and self.version is None else obj
        self.value: torch.Tensor | None = obj.detach().clone() if self.tensor else None

    def holds(self, now: Any, tensors: bool) -> bool:
        """:meth:`same`, past the fast path's identity: ``tensors=False`` (compiled code) takes a tensor, or a number
        traced as dynamic, as the same (neither is at hand while it traces)."""
        if not tensors and (self.tensor or type(now) in _SYMBOLIC):
            return True
        return self.same(now)

    def same(self, now: Any) -> bool:
        """Is ``now`` the setting this item holds? A tensor of other identity or version is read (a sync on a GPU:
        only where either moved); inside a CUDA-graph capture, where it cannot be read, it is not the same. A plain
        value is compared by type and value (an ``enum`` member by identity: none runs its own ``__eq__``). Code
        handed in its place (torch's ``masked_fill``, a function of the block's) is no setting: a forward handed code
        runs under the mode (see ``_lean.code_in_arguments``), which sees the calls it makes; nor is a tensor of
        another shape than a setting's (a padding mask given where None was)."""
        if callable(now):  # code handed in its place: that forward runs under the mode, which sees every call
            return True
        if isinstance(now, _TENSOR) and not _is_setting_tensor(now, self.experts):
            return True  # (a tensor of the tokens in its place, a mask where None was: it varies with them)
        held = self.value
        if held is not None:
            if not isinstance(now, _TENSOR):
                return False
            if now is self.obj and _version(now) == self.version:
                return True
            if now.is_meta or held.is_meta or now.shape != held.shape or now.dtype != held.dtype:
                return False
            if now.device != held.device or (now.is_cuda and _torch_compat.graph_capturing()):
                return False
            with torch.no_grad():
                equal = bool(torch.equal(now.detach(), held))
            if equal and not now.is_inference():  # (the same value in another tensor: compared by identity next)
                self.obj, self.version = now, _version(now)
            elif equal:
                self.obj = _NOTHING
            return equal
        was = self.obj
        if type(now) is not type(was) or isinstance(now, enum.Enum):
            return now is was
        if now == was or (now != now and was != was):  # (NaN the same as NaN)
            self.obj = now  # (compared by identity next)
            return True
        return False

    def describe(self, now: Any) -> str:
        """The change, in words."""
        held = self.value
        then = f"a tensor of {tuple(held.shape)} ({_values(held)})" if held is not None else repr(self.obj)
        if isinstance(now, _TENSOR):
            is_ = f"a tensor of {tuple(now.shape)}" + ("" if now.is_meta else f" ({_values(now)})")
        else:
            is_ = repr(now) if is_setting(now) else f"a {type(now).__qualname__}"
        return f"argument {self.where!r} of its forward is {is_}, but was {then} when its decision was established"


def _values(t: torch.Tensor) -> str:
    """A small tensor's values, in words (read on the host)."""
    if t.is_meta:
        return "on the meta device"
    flat = t.detach().reshape(-1)[:8].cpu().tolist()
    more = ", ..." if t.numel() > 8 else ""
    return "values " + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in flat) + more


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class ArgumentStamp:
    """The arguments a router's forward got other than its tokens, where they are settings of its decision (see the
    module's docstring), as its decision was established: how many it got by position, the keywords, and each
    setting. :meth:`holds` compares a later forward's arguments with them: where each is the very object it was (a
    float attribute handed on, the same 0-d tensor not written since), a few bytecodes per setting."""

    __slots__ = ("count", "items", "keys", "named", "positional", "tensors")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], num_experts: int) -> None:
        self.count = len(args)
        self.keys = frozenset(kwargs)
        named: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        self.items: tuple[_Item, ...] = tuple(
            _Item(where, value, num_experts)
            for where, value in named
            if (isinstance(value, _TENSOR) and _is_setting_tensor(value, num_experts))
            or (not isinstance(value, _TENSOR) and is_setting(value))
        )
        self.positional: tuple[tuple[int, _Item], ...] = tuple(
            (item.where, item) for item in self.items if isinstance(item.where, int)
        )
        self.named: tuple[tuple[str, _Item], ...] = tuple(
            (item.where, item) for item in self.items if isinstance(item.where, str)
        )
        #: the settings that are tensors: compiled code compares them on the device (see :meth:`mark_moved`)
        self.tensors: tuple[_Item, ...] = tuple(item for item in self.items if item.tensor)

    def holds(self, args: tuple[Any, ...], kwargs: dict[str, Any], tensors: bool = True) -> bool:
        """Are ``args``/``kwargs`` given as the decision's were, each setting the same? ``tensors=False``: the plain
        settings alone (compiled code, where a tensor's value is not at hand)."""
        if len(args) != self.count or kwargs.keys() != self.keys:
            return False
        now: Any
        for at, item in self.positional:
            now = args[at]
            if tensors and now is item.obj and (item.plain or now._version == item.version):
                continue  # (the very object: a plain value handed on from an attribute, a tensor not written since)
            if not item.holds(now, tensors):
                return False
        for name, item in self.named:
            now = kwargs[name]
            if tensors and now is item.obj and (item.plain or now._version == item.version):
                continue
            if not item.holds(now, tensors):
                return False
        return True

    def mark_moved(self, flag: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Traced, in compiled code (after :meth:`holds` took the plain settings as the same): mark ``flag``, a 0-d
        bool on the router's device, where a tensor setting's value is not the one the decision was established with
        (a minimum weight written in place since). Compared on the device, as the forward runs: no sync; the flag is
        read as the block ends. A tensor no longer there, or of another shape, dtype or device, marks it at every
        call (none of that is a value: it is known as the code is traced)."""
        moved: torch.Tensor | None = None
        for item in self.tensors:
            where = item.where
            now = args[where] if type(where) is int else kwargs[where]  # type: ignore[index]
            if callable(now) or (isinstance(now, _TENSOR) and not _is_setting_tensor(now, item.experts)):
                continue  # (as same() takes them: code in its place, a tensor of the tokens)
            held = item.value
            assert held is not None
            if (
                not isinstance(now, _TENSOR)
                or now.shape != held.shape
                or now.dtype != held.dtype
                or now.device != held.device
            ):
                differ = torch.ones((), dtype=torch.bool, device=flag.device)
            else:
                differ = (now.detach() != held).any().to(flag.device)  # (NaN differs, as torch.equal reads it)
            moved = differ if moved is None else moved | differ
        if moved is not None:
            flag.logical_or_(moved)

    def tensor_names(self) -> str:
        """The tensor settings, in words (what a refusal of :meth:`mark_moved`'s flag names)."""
        return ", ".join(f"argument {item.where!r}" for item in self.tensors)

    def changed(self, args: tuple[Any, ...], kwargs: dict[str, Any], tensors: bool = True) -> str:
        """What differs from the arguments the decision was established with, in words (after :meth:`holds` said
        something does). ``tensors=False``: the plain settings alone, as :meth:`holds` takes it."""
        if len(args) != self.count or kwargs.keys() != self.keys:
            return (
                f"its forward was given {len(args)} arguments by position and the keywords {sorted(kwargs)}, but "
                f"{self.count} and {sorted(self.keys)} when its decision was established"
            )
        for item in self.items:
            where = item.where
            now = args[where] if type(where) is int else kwargs[where]  # type: ignore[index]
            if not tensors:  # (compiled code: the plain ones, named only, as a traced number has no repr)
                if not item.tensor and type(now) not in _SYMBOLIC and not item.same(now):
                    return f"argument {where!r} of its forward is not what it was when its decision was established"
                continue
            if not item.same(now):
                return item.describe(now)
        return "the settings among its forward's arguments changed"


def stamp_arguments(
    forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], num_experts: int
) -> ArgumentStamp | None:
    """The settings among the arguments a decision is established with, or None where the forward takes its tokens
    alone (nothing to compare: its forwards pay nothing)."""
    if _one_parameter(forward) and len(args) + len(kwargs) == 1:
        return None
    return ArgumentStamp(args, kwargs, num_experts)
