"""The user's forward hooks inside a router's scope, watched at its real forwards.

The runs that establish a router's decision set the user's forward hooks and pre-hooks of the scope's submodules
aside (so that a hook counting or logging sees one forward), and the real forward that follows is compared with
them: where it returned what they did, the hooks are taken to change nothing. That holds for that forward's inputs
alone: a cut of the combine weights in a hook (``out * (out >= 0.3)``) cuts nothing where every weight is above its
threshold, and cuts at a later forward. So at every later eager forward of a scope whose decision was so
established, a :class:`HookWatch` sits around the user's hooks of each such submodule (a hook of its own first and
one last among the module's forward hooks, and among its pre-hooks) and notes a hook that hands on other values
than it was given (a value it returns in place of the module's output or arguments, or a change of theirs in
place): the router then establishes its decision again with the hooks in (see
:meth:`moe_replay.intercept.RouterHook._hooks_checked`), where a choice a hook makes is seen as the forward's own
code's, and refused there. A hook that only reads (returns None, writes nothing it was given) passes unseen, and
only scopes with such hooks pay for the watch: a model without any pays nothing on its hot path.

The watch's entries carry no handle (torch's count of hooks does not move, see
:meth:`moe_replay.intercept.RouterHook.follow_hooks`), are moe_replay's own wherever the user's hooks are
listed or compared, and are taken off as the forward ends, whatever happens in it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _torch_compat
from ._interrupts import interrupts_held
from ._output_guard import own_hook

__all__ = ["HookWatch"]

#: values compared by ``==`` where a hook handed on another object than it was given (a container's shape too)
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size, tuple)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _flat(obj: Any, out: list[Any], depth: int = 0) -> list[Any]:
    """The leaves of a module's output or arguments (tensors and plain values), with the shape of the containers
    that hold them (their type and length, a mapping's keys), in order."""
    if isinstance(obj, torch.Tensor) or depth > 6:
        out.append(obj)
    elif isinstance(obj, Mapping):
        out.append((type(obj), tuple(obj.keys())))
        for v in obj.values():
            _flat(v, out, depth + 1)
    elif isinstance(obj, list | tuple):
        out.append((type(obj), len(obj)))
        for v in obj:
            _flat(v, out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out.append(type(obj))
        for f in dataclasses.fields(obj):
            _flat(getattr(obj, f.name), out, depth + 1)
    else:
        out.append(obj)
    return out


def _snapshot(obj: Any) -> list[tuple[Any, int | None, torch.Tensor | None]]:
    """:func:`_flat` of ``obj``, each tensor with its version counter (a change in place moves it), or where it keeps
    none (an inference tensor), a copy of its values."""
    out: list[tuple[Any, int | None, torch.Tensor | None]] = []
    for x in _flat(obj, []):
        if not isinstance(x, torch.Tensor):
            out.append((x, None, None))
        elif (version := _version(x)) is not None or x.is_meta:
            out.append((x, version, None))
        else:
            with _torch_compat.hidden_from_dispatch_modes():
                out.append((x, None, x.clone()))
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors hold the same values, in the same shape, dtype and device?"""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
        return False
    if a.is_meta or b.is_meta:
        return True  # (no values to differ)
    with _torch_compat.hidden_from_dispatch_modes():  # (not the forward's ops: a recompute runs no watch)
        try:
            return bool(torch.equal(a, b))
        except Exception:
            return False


def _handed_on(was: list[tuple[Any, int | None, torch.Tensor | None]], now: list[Any]) -> bool:
    """Is ``now`` (the leaves of what a module's hooks handed on) what they were given (``was``, see
    :func:`_snapshot`): the same objects, none changed in place, or equal values?"""
    if len(now) != len(was):
        return False
    for (a, version, copy), b in zip(was, now, strict=True):
        if isinstance(a, torch.Tensor):
            if a is b and copy is not None:
                if not _equal(copy, b):
                    return False
            elif a is b:
                if version is not None and _version(b) != version:
                    return False
            elif not isinstance(b, torch.Tensor) or not _equal(a if copy is None else copy, b):
                return False
        elif a is not b and not (type(a) is type(b) and isinstance(a, _PLAIN) and a == b):
            return False
    return True


class HookWatch:
    """Watches the user's hooks of ``modules`` (``(path, module)`` pairs inside one router's scope) for one forward
    of the scope: :attr:`changed` names the first module whose hooks handed on other values than they were given
    (None: none did). :meth:`install` before the forward, :meth:`remove` after it."""

    __slots__ = ("_keys", "_paths", "_seen", "_user", "changed", "modules")

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], user: Callable[[Any], bool]) -> None:
        self.modules = modules
        self._user = user  # (is a hook the user's: neither moe_replay's own nor torch's)
        self.changed: str | None = None
        self._paths = {id(m): path for path, m in modules}
        self._seen: dict[tuple[int, bool], list[list[tuple[Any, int | None, torch.Tensor | None]]]] = {}
        first = -2 - 2 * id(self)  # (negative: no handle of torch's has it; one pair per watch, nested ones apart)
        self._keys = (first, first - 1)

    def install(self) -> None:
        """Put the watch's hooks around the user's, on each module that holds some (its forward hooks, its
        pre-hooks). A Ctrl-C while it does waits for the end (a dict half rebuilt by :func:`_put_first` would lose
        the user's hooks); call it inside the ``try`` whose ``finally`` calls :meth:`remove`."""
        with interrupts_held():
            self._install()

    def _install(self) -> None:
        """:meth:`install`, with Ctrl-C held."""
        first, last = self._keys
        for _, m in self.modules:
            own = vars(m)
            for name, flags, before, after in (
                ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", self._pre_first, self._pre_last),
                ("_forward_hooks", None, self._first, self._last),
            ):
                hooks = own.get(name)
                if not isinstance(hooks, dict) or not any(map(self._user, list(hooks.values()))):
                    continue
                _put_first(hooks, first, before)
                hooks[last] = after
                kw = own.get(flags) if flags is not None else None
                if isinstance(kw, dict):  # (so that a pre-hook's change of the keyword arguments is seen too)
                    kw[first] = kw[last] = True

    def remove(self) -> None:
        """Take the watch's hooks off again (those of the user's registered during the forward stay); a Ctrl-C while
        it does waits for the end. Taking off hooks that were never put on does nothing."""
        with interrupts_held():
            self._remove()

    def _remove(self) -> None:
        """:meth:`remove`, with Ctrl-C held."""
        for _, m in self.modules:
            own = vars(m)
            for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs"):
                hooks = own.get(name)
                if isinstance(hooks, dict):
                    for key in self._keys:
                        hooks.pop(key, None)
        self._seen.clear()

    def _note(self, module: nn.Module, pre: bool, given: Any) -> None:
        self._seen.setdefault((id(module), pre), []).append(_snapshot(given))

    def _check(self, module: nn.Module, pre: bool, handed: Any) -> None:
        stack = self._seen.get((id(module), pre))
        if not stack:
            return  # (its first entry did not run: another's hook put first since, say; not one of this forward's)
        was = stack.pop()
        if self.changed is None and not _handed_on(was, _flat(handed, [])):
            kind = "pre-hooks" if pre else "forward hooks"
            self.changed = f"the {kind} of '{self._paths.get(id(module), type(module).__name__)}'"

    @own_hook
    def _pre_first(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        self._note(module, True, (args, kwargs))

    @own_hook
    def _pre_last(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        self._check(module, True, (args, kwargs))

    @own_hook
    def _first(self, module: nn.Module, args: Any, out: Any) -> None:
        self._note(module, False, out)

    @own_hook
    def _last(self, module: nn.Module, args: Any, out: Any) -> None:
        self._check(module, False, out)


def _put_first(hooks: dict[int, Any], key: int, hook: Any) -> None:
    """``hooks[key] = hook``, first in the dict's order."""
    hooks[key] = hook
    if isinstance(hooks, OrderedDict):
        hooks.move_to_end(key, last=False)
    else:  # (a plain dict: the others after it again, in their order)
        rest = [(k, v) for k, v in hooks.items() if k != key]
        for k, _ in rest:
            del hooks[k]
        hooks.update(rest)
