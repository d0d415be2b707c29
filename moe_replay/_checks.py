"""Argument checks shared by the modules: a value is refused, never truncated or wrapped."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping, MappingView
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import ArgumentTypeError, InvalidArgumentError, MoEReplayError, _FrozenError

_T = TypeVar("_T")

__all__ = [
    "MAX_COUNT",
    "check_count",
    "check_dense",
    "check_flag",
    "frozen_value",
    "is_collection",
    "is_integer",
    "is_one_of",
    "router_names",
]

#: The largest count or offset taken: one past it no tensor or array index holds.
MAX_COUNT = 2**63 - 1


def is_integer(value: Any) -> bool:
    """A Python or numpy integer, or a 0-d integer tensor; never a bool, a float (2.0 included), a string or a
    tensor on the meta device (which holds no value)."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and value.device.type != "meta"  # (shape only: no value to take)
        and not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
    )


def is_one_of(value: Any, choices: Iterable[str]) -> bool:
    """``value`` is a ``str`` among ``choices``: the check of an option named by a string.

    ``value in choices`` alone compares a numpy array or a tensor element by element, and its
    truth value then raises numpy's or torch's own error (or is read as one element's): an
    option is a string, and anything else is simply not one of them.
    """
    return isinstance(value, str) and value in tuple(choices)


def is_collection(value: Any) -> bool:
    """Items in order: a list, tuple, 1-D or wider array or tensor; never a str, bytes, 0-d array, set or mapping.

    A 0-d array or tensor is iterable to ``isinstance(..., Iterable)`` but raises when iterated:
    it is one value, as a number is. A set iterates in an order of its own (``{3, 2}`` gives 2
    first), so lengths, names or parts given as one would be taken in another order than written.
    A mapping (a dict) iterates over its keys alone, so its values would be dropped unsaid
    (``names={"a": 1}`` read as ``["a"]``). A nested or sparse tensor has no rows to iterate
    (torch raises its own error), so it is refused here as any other non-list is.
    """
    if isinstance(value, str | bytes | AbstractSet | Mapping):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and not value.is_nested and value.layout == torch.strided
    if isinstance(value, np.ndarray):
        return value.ndim > 0
    return isinstance(value, Iterable)


def router_names(value: Any, role: str) -> tuple[str, ...]:
    """``value`` as router names in the order given: any iterable of ``str`` with an order of its own.

    A list, tuple, iterator or generator, or a dict's ``keys()`` (which iterate in the dict's order) are
    taken. A bare ``str`` is one name, not a list of its characters; a set has no order of its own and a
    dict iterates over its keys alone, dropping its values unsaid: each is refused, saying what to pass.

    Raises:
        ArgumentTypeError: a str or bytes, a set, a mapping, or anything but an iterable of str.
    """
    if isinstance(value, str | bytes):
        raise ArgumentTypeError(
            f"{role} takes a list of router names, got one {type(value).__name__} {value!r:.60}: "
            f"for one router pass a list, [{value!r:.60}]"
        )
    if isinstance(value, Mapping | AbstractSet) and not isinstance(value, MappingView):
        what = "a mapping (its values would be dropped)" if isinstance(value, Mapping) else "a set (it has no order)"
        raise ArgumentTypeError(
            f"{role} takes a list of router names in order, got {what}: {value!r:.60}; pass a list, e.g. d.keys() or "
            "sorted(names)"
        )
    if not (isinstance(value, MappingView) or is_collection(value)) or isinstance(value, torch.Tensor | np.ndarray):
        raise ArgumentTypeError(f"{role} takes a list of router names (any iterable of str), got {value!r:.60}")
    names = tuple(value)
    odd = [n for n in names if not isinstance(n, str)]
    if odd:  # (str(None) would be a router named 'None': never one of the model's)
        raise ArgumentTypeError(
            f"{role}: router names must be str (module paths, as model.named_modules() gives them), got "
            f"{odd[0]!r:.60} ({type(odd[0]).__name__})"
        )
    return tuple(str(n) for n in names)  # (a numpy str_ as a plain str)


def check_count(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 0: a count of rows, tokens or sequences.

    A float is refused rather than cut (2.9 is not 2 tokens), as are bools and negatives.

    Raises:
        InvalidArgumentError: ``value`` is not a non-negative integer.
    """
    if not is_integer(value) or int(value) < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
    if int(value) > MAX_COUNT:
        raise InvalidArgumentError(f"{name}={value} is past what a tensor index holds (2**63 - 1)")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a ``bool``: ``True`` or ``False`` (numpy's too), nothing else.

    A flag is never read by truth value: ``"false"`` from a config file or command line is a
    true string, so ``keep_newest="false"`` would keep only the newest rows and ``drop_last="no"``
    would drop a route, with no error.

    Raises:
        ArgumentTypeError: ``value`` is not a bool.
    """
    if not isinstance(value, bool | np.bool_):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r:.60} ({type(value).__name__})")
    return bool(value)


def check_values(value: Any, what: str, error: type[MoEReplayError] = ArgumentTypeError) -> None:
    """Refuse a tensor to be read as values (lengths, counts, positions, ids) that holds none: on the meta device, or
    not dense (see :func:`check_dense`). torch's own error would come at the first read ("Cannot copy out of meta
    tensor"). Anything that is not a tensor passes."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise error(f"{what} is a tensor on the meta device: it holds no values (only a shape); pass one with values")
    check_dense(value, what, error)


def check_dense(value: Any, what: str, error: type[MoEReplayError] = ArgumentTypeError) -> None:
    """Refuse a tensor whose values are not plain elements in memory: sparse, nested or quantized.

    Such a tensor has no numpy view, no strides to slice and no integer values to compare
    (a quantized one holds scaled integers), so taking it would raise torch's own error at
    some later step, or read the wrong numbers. Anything that is not a tensor passes.

    Raises:
        ``error`` (an ArgumentTypeError unless told): naming ``what`` and the tensor's kind.
    """
    if not isinstance(value, torch.Tensor):
        return
    if value.is_nested or value.layout != torch.strided:
        kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise error(f"{what} is a {kind} tensor; pass a dense tensor (tensor.to_dense(), or one tensor per sequence)")
    if value.is_quantized:
        raise error(
            f"{what} is a quantized tensor ({value.dtype}): its values are scaled, not integers; pass the integer "
            "tensor (tensor.int_repr() holds the stored integers, tensor.dequantize() the values)"
        )


def as_tensor(value: Any) -> torch.Tensor:
    """``torch.as_tensor(value)``, numpy arrays that torch does not take as they are included.

    torch refuses an array of negative strides (``np.arange(n)[::-1]``, ``np.argsort(x)[::-1]``) or of the other byte
    order with a ``ValueError``, and warns of a read-only one (``np.frombuffer``, a memory-mapped file); each holds
    plain numbers, taken here from a native, C-ordered copy. Anything else goes to ``torch.as_tensor`` as it is (its
    errors are the caller's to name).
    """
    if (
        isinstance(value, np.ndarray)
        and not value.dtype.hasobject
        and (not value.dtype.isnative or not value.flags.writeable or any(s < 0 for s in value.strides))
    ):
        value = np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
    return torch.as_tensor(value)


def _set_own(obj: Any, name: str, value: Any) -> bool:
    """Set attribute ``name`` of ``obj`` where it is the object's own private state (``_``-named: straight into its
    ``__dict__``, as it is set often) or a method wrapped on the instance (a spy or a mock of it); False, setting
    nothing, where it is any other name, which the caller refuses."""
    if name[:1] == "_" and name[:2] != "__":
        obj.__dict__[name] = value
        return True
    if name[:2] == "__" or _is_method(type(obj), name):
        object.__setattr__(obj, name, value)
        return True
    return False


def _del_own(obj: Any, name: str) -> bool:
    """Delete attribute ``name`` of ``obj`` where :func:`_set_own` would set it: its own private state, or a method
    wrapped on the instance (a spy or a mock taken off again); False, deleting nothing, where it is any other name
    (a property, a misspelt one), which the caller refuses with what to do rather than a bare ``AttributeError``."""
    if (name[:1] == "_" and name[:2] != "__") or (name in vars(obj) and _is_method(type(obj), name)):
        object.__delattr__(obj, name)
        return True
    return False


def _is_method(cls: type, name: str) -> bool:
    """Is ``name`` a method of ``cls`` (a function, classmethod or staticmethod it or a base defines), which an
    instance may wrap with one of its own, as a spy or a mock does?"""
    for klass in cls.__mro__:
        if name in vars(klass):
            return isinstance(vars(klass)[name], types.FunctionType | classmethod | staticmethod)
    return False


def frozen_value(instead: str | None = None) -> Callable[[_T], _T]:
    """A class decorator, over ``@dataclass(frozen=True)``: an attribute set on or deleted from an instance is
    refused with a :class:`~moe_replay.MoEReplayError` (also an ``AttributeError``, as the dataclass's own refusal
    is) that names the class, the attribute and what to do, instead of ``dataclasses``' bare
    ``FrozenInstanceError``. ``instead``: what gives one with other values, where not
    ``dataclasses.replace(value, field=...)`` (a value computed by a call says that call). Its ``__init__`` sets its
    fields as before."""

    def make(cls: _T) -> _T:
        assert isinstance(cls, type) and dataclasses.is_dataclass(cls)

        def refuse(self: Any, name: str, *_: Any) -> None:
            raise _frozen_refusal(type(self), name, instead)

        cls.__setattr__ = refuse  # type: ignore[assignment]
        cls.__delattr__ = refuse  # type: ignore[assignment]
        return cls

    return make


def _frozen_refusal(cls: type, name: str, instead: str | None) -> _FrozenError:
    """The error for setting or deleting attribute ``name`` of a :func:`frozen_value` instance of ``cls``."""
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    what = f"{cls.__name__} is a frozen value, and {name!r} cannot be set on it or deleted from it: "
    if name in fields or isinstance(getattr(cls, name, None), property):
        if instead is not None:
            return _FrozenError(what + instead)
        if name in fields:
            return _FrozenError(
                f"{what}build one with another {name}, dataclasses.replace(value, {name}=...) (checked as the "
                "constructor checks it), and use that"
            )
        return _FrozenError(f"{what}it is read from its fields ({', '.join(fields)})")
    public = [n for n in fields if not n.startswith("_")]
    return _FrozenError(
        f"{what}{cls.__name__} has no field {name!r} (a misspelt one? its fields: {', '.join(public)}); keep your own "
        "data beside it (a dict or a dataclass holding it)"
    )
