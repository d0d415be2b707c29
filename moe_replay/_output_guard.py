"""What a router's module returns to its caller, checked after the module's forward hooks ran.

moe_replay intercepts a router's ``forward``; torch runs the module's forward hooks (and the
global ones of ``register_module_forward_hook``) after it, around that forward, and a hook
may replace what the forward returned. A hook that remaps the expert indices a router
returned (or changes them in place) makes the MoE layer dispatch other experts than those
recorded or forced, while the router's own forward was exact.

While a block runs and hooks run after a router's forward, an :class:`OutputGuard` sits last
among the router module's forward hooks (global hooks run before a module's own, so it comes
after every one of them) and refuses an output whose integer tensors (indices, dispatch
masks) are not those the forward returned, unchanged, and an output whose float tensors (combine
weights) a hook replaced or changed so that they hold zeros where the forward's did not: a weight
cut to zero after the decision (a minimum-weight cut put in a hook) is an expert dropped by the
current scores, which a replay does not force. An eager forward is refused at once; compiled code,
which cannot raise on values, marks a flag on the router's device that the block reads as it ends
(:meth:`OutputGuard.cut_in_compiled_code`). A hook that reads the output, or rescales its float
tensors (a temperature on the combine weights), passes. Where no hook runs, nothing is installed
and a router call pays one test.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

import torch
from torch import nn

from . import _torch_compat
from .errors import UnsupportedRouterError

__all__ = ["OutputGuard", "is_guard", "own_hook", "runs_foreign_hooks"]

_GLOBAL_HOOKS = _torch_compat.global_forward_hooks

#: what the forward of a router returned, by its guard's id, from the trace of the forward to the trace of the
#: guard (see :meth:`OutputGuard.expect_traced`); empty outside a trace
_TRACED: dict[int, list[tuple[torch.Tensor, int | None]]] = {}
#: the float tensors it returned, with where they held zeros, as :data:`_TRACED`
_TRACED_FLOATS: dict[int, list[tuple[torch.Tensor, int | None, torch.Tensor]]] = {}
#: copies of the integer tensors it returned, as :data:`_TRACED` (a change of their values in place is compared)
_TRACED_VALUES: dict[int, list[torch.Tensor]] = {}


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _unversioned(t: torch.Tensor) -> None:
    # (as dynamo traces: the versions of tensors a trace made are unbacked there, and of inference tensors unread)
    return None


def _integer_tensors(out: Any, depth: int = 0, version: Any = _version) -> list[tuple[torch.Tensor, int | None]]:
    """The integer and bool tensors of an output (a tensor, or the items of a tuple, list or dict, two levels
    deep), with their version counters, in order."""
    if isinstance(out, torch.Tensor):
        return [] if out.is_floating_point() or out.is_complex() else [(out, version(out))]
    if depth < 2 and isinstance(out, tuple | list):
        return [t for item in out for t in _integer_tensors(item, depth + 1, version)]
    if depth < 2 and isinstance(out, dict):
        return [t for item in out.values() for t in _integer_tensors(item, depth + 1, version)]
    return []


def _float_tensors(out: Any, depth: int = 0) -> list[torch.Tensor]:
    """The floating tensors of an output, found as :func:`_integer_tensors` finds the integer ones, in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if depth < 2 and isinstance(out, tuple | list):
        return [t for item in out for t in _float_tensors(item, depth + 1)]
    if depth < 2 and isinstance(out, dict):
        return [t for item in out.values() for t in _float_tensors(item, depth + 1)]
    return []


def _zeros(out: Any) -> list[tuple[torch.Tensor, int | None, torch.Tensor]]:
    """Each floating tensor of an output with its version and where it holds zeros (no sync: a mask)."""
    return [(t, _version(t), t.detach() == 0) for t in _float_tensors(out)]


def _new_zeros(output: Any, then: list[tuple[torch.Tensor, int | None, torch.Tensor]]) -> bool:
    """Do the floating tensors of ``output`` hold zeros where those of the forward (``then``) did not, in one
    replaced or changed in place (a cut to zero after the forward)? Tensors of other numbers or shapes are not
    compared."""
    now = _float_tensors(output)
    if len(now) != len(then):
        return False
    for t, (u, version, zero) in zip(now, then, strict=True):
        if (t is u and _version(t) == version) or t.shape != zero.shape:
            continue
        if bool(((t.detach() == 0) & ~zero).any()):
            return True
    return False


def _mark_new_zeros(flag: torch.Tensor, output: Any, then: list[tuple[torch.Tensor, int | None, torch.Tensor]]) -> None:
    """:func:`_new_zeros` as compiled code runs it: no branch on values, the answer or-ed into ``flag`` (on the
    router's device: no sync). Every tensor is compared, a changed version cannot be told there."""
    now = _float_tensors(output)
    if len(now) != len(then):
        return
    for t, (_, _, zero) in zip(now, then, strict=True):
        if t.shape == zero.shape:
            flag.logical_or_(((t.detach() == 0) & ~zero).any().to(flag.device))


def _mark_changed(flag: torch.Tensor, output: Any, then: list[torch.Tensor]) -> None:
    """As compiled code runs a router's forward hooks: or into ``flag`` whether the integer tensors of ``output`` hold
    other values than ``then``, copies of those the intercepted forward returned (a change in place: the same tensors,
    whose version counters dynamo does not trace). No branch on values, no sync."""
    now = _integer_tensors(output, version=_unversioned)
    if len(now) != len(then):
        return
    for (t, _), u in zip(now, then, strict=True):
        if t.shape == u.shape:
            flag.logical_or_((t.detach() != u).any().to(flag.device))


def _remap_message(name: str, culprits: str) -> str:
    return (
        f"a forward hook run after router '{name}', or a wrapper around its forward, replaced or changed "
        "the integer tensors (expert indices, dispatch masks) its forward returned"
        + culprits
        + ": its MoE layer would dispatch other experts than those recorded or forced. Remove the hook, or "
        "make the change inside the router's forward, before its top-k (replay then forces the experts the "
        "router chose)"
    )


def _cut_message(name: str, culprits: str) -> str:
    return (
        f"a forward hook run after router '{name}', or a wrapper around its forward, cut to zero "
        "float tensors (combine weights) its forward returned nonzero"
        + culprits
        + ": a weight cut to zero after the decision drops an expert by the current scores, so its MoE "
        "layer would not use every expert recorded or forced. Remove the hook, or make that choice "
        "inside the router's forward, where it is checked (before its top-k, a masked_fill or "
        "torch.where of the scores, is replayed exactly)"
    )


def _same_traced(now: list[tuple[torch.Tensor, int | None]], then: list[tuple[torch.Tensor, int | None]]) -> bool:
    return len(now) == len(then) and all(t is u for (t, _), (u, _) in zip(now, then, strict=True))


def _same(now: list[tuple[torch.Tensor, int | None]], then: list[tuple[torch.Tensor, int | None]]) -> bool:
    return len(now) == len(then) and all(t is u and _version(t) == v for (t, _), (u, v) in zip(now, then, strict=True))


def _inert(*args: Any) -> None:
    """What a guard becomes in a copy or a pickle of the model: nothing (the copy is no session's)."""


def _make_inert() -> Any:
    return _inert


class _Enter:
    """The guard's forward pre-hook: a new call of the module starts with nothing expected."""

    __slots__ = ("guard",)

    def __init__(self, guard: OutputGuard) -> None:
        self.guard = guard

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():  # (compiled code sets what it expects only as it is traced)
            self.guard.expected = None
            self.guard.floats = []

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_inert, ())


class OutputGuard:
    """The last forward hook of one router module during a block (see the module docstring).

    Example (what it refuses)::

        def remap(module, args, out):  # a hook that sends every token to the next expert
            weights, idx = out
            return weights, (idx + 1) % num_experts

        gate.register_forward_hook(remap)
        with session.replay(routes):
            model(x)  # UnsupportedRouterError: a hook changed the indices the router returned
    """

    __slots__ = ("cuts", "enter", "expected", "floats", "handles", "name", "remaps")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        #: the integer tensors the intercepted forward of this call returned, with their versions; None
        #: where this call's forward set none (a call not intercepted: nothing to compare)
        self.expected: list[tuple[torch.Tensor, int | None]] | None = None
        #: the floating tensors it returned, with their versions and where they held zeros (eager forwards)
        self.floats: list[tuple[torch.Tensor, int | None, torch.Tensor]] = []
        self.enter = _Enter(self)
        self.handles: tuple[Any, ...] = ()
        #: set by compiled code where a hook cut float tensors to zero (see :meth:`cut_in_compiled_code`); one
        #: tensor for the guard's life, so that code compiled in one block runs again in the next
        self.cuts: torch.Tensor | None = None
        #: set by compiled code where a hook changed the values of the integer tensors the router returned in place
        #: (the same tensors: dynamo traces no version counter), as :attr:`cuts`
        self.remaps: torch.Tensor | None = None
        self.install(module)

    def install(self, module: nn.Module) -> None:
        """Put this guard's hooks on ``module`` (again, for a later block: the same objects, so that compiled code
        traced in an earlier block, which dynamo guards on their identity, runs again without a recompile)."""
        if not self.handles:
            self.handles = (module.register_forward_pre_hook(self.enter), module.register_forward_hook(self))

    def expect(self, module: nn.Module, out: Any) -> None:
        """The intercepted forward returned ``out``: compare it with what the module's caller gets. Keeps this
        guard the last of the module's forward hooks (a hook added since would run after it)."""
        self.keep_last(module)
        self.expected = _integer_tensors(out)
        self.floats = _zeros(out)

    def keep_last(self, module: nn.Module) -> None:
        """Make this guard the last of the module's forward hooks again (a hook added since would run after it)."""
        hooks = cast("OrderedDict[int, Any]", module._forward_hooks)
        mine = self.handles[1].id
        if next(reversed(hooks), None) != mine and mine in hooks:
            hooks.move_to_end(mine)

    def is_last(self, module: nn.Module) -> bool:
        """Is this guard the last of the module's forward hooks (read as dynamo traces it: no change to them)?"""
        last = None
        for hook in module._forward_hooks.values():  # (as torch's _call_impl reads them: torch 2.11's dynamo
            last = hook  # traces no bool() or len() of the hooks' dict)
        return last is self

    def expect_traced(self, out: Any) -> None:
        """:meth:`expect`, as dynamo traces the intercepted forward: the integer tensors the code traced returns
        are compared with those the module's caller gets in the same trace. Compiled code runs the hooks traced
        with it (dynamo does not follow the module's hooks added or removed since), so what the trace compares is
        what it runs. Kept by this guard's id in a dict of this module: a guard of a block ended since is no
        object compiled code must reach again."""
        ints = _integer_tensors(out, version=_unversioned)
        _TRACED[id(self)] = ints
        _TRACED_VALUES[id(self)] = [t.detach().clone() for t, _ in ints]
        _TRACED_FLOATS[id(self)] = [(t, None, t.detach() == 0) for t in _float_tensors(out)]

    def arm(self, device: torch.device) -> None:
        """As a block starts (eager): the flag compiled code marks, on the router's device, cleared."""
        with torch.inference_mode(False):  # (an ordinary tensor, whatever the caller's mode)
            if self.cuts is None or self.cuts.device != device:
                # (its address kept across calls, as the rings': CUDA graphs of mode="reduce-overhead" update it)
                self.cuts = _torch_compat.mark_static_address(torch.zeros((), dtype=torch.bool, device=device))
            else:
                self.cuts.zero_()
            if self.remaps is None or self.remaps.device != device:
                self.remaps = _torch_compat.mark_static_address(torch.zeros((), dtype=torch.bool, device=device))
            else:
                self.remaps.zero_()

    def cut_in_compiled_code(self, module: nn.Module) -> None:
        """As a block ends: refuse it where compiled code found float tensors cut to zero by a hook (one read of the
        flag: a sync, where hooks run after this router)."""
        remaps = self.remaps
        if remaps is not None and bool(remaps):
            remaps.zero_()
            ran = [_hook_name(h) for h in module._forward_hooks.values() if _theirs(h)]
            raise UnsupportedRouterError(
                _remap_message(self.name, _culprits(ran, module.__dict__.get("forward")))
                + ". (Found in compiled code, which cannot stop at the forward: this block's forwards dispatched "
                "the changed indices)"
            )
        cuts = self.cuts
        if cuts is not None and bool(cuts):
            cuts.zero_()
            ran = [_hook_name(h) for h in module._forward_hooks.values() if _theirs(h)]
            raise UnsupportedRouterError(
                _cut_message(self.name, _culprits(ran, module.__dict__.get("forward")))
                + ". (Found in compiled code, which cannot stop at the forward: this block's forwards used "
                "the cut weights)"
            )

    def remove(self) -> None:
        """Take this guard's hooks off its module (it may be installed again: see :meth:`install`)."""
        for handle in self.handles:
            handle.remove()
        self.handles = ()
        self.expected = None
        self.floats = []
        _TRACED.pop(id(self), None)  # (what a compiled forward left for a hook run that never came)
        _TRACED_VALUES.pop(id(self), None)
        _TRACED_FLOATS.pop(id(self), None)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():  # (dynamo tracing: what the trace of the forward returned, if any)
            expected = _TRACED.pop(id(self), None)
            floats = _TRACED_FLOATS.pop(id(self), None)
            values = _TRACED_VALUES.pop(id(self), None)
            if expected is None and self.expected is not None:  # (an eager forward, this hook compiled on its own)
                expected, self.expected = self.expected, None
                floats, self.floats = self.floats, []
            if expected is not None and floats and self.cuts is not None:
                _mark_new_zeros(self.cuts, output, floats)
            if expected is not None and values and self.remaps is not None:
                _mark_changed(self.remaps, output, values)
            if expected is None or _same_traced(_integer_tensors(output, version=_unversioned), expected):
                return
            culprits = " (in the code torch.compile traced: hooks on its module, or global module hooks)"
        else:
            expected, self.expected = self.expected, None
            floats, self.floats = self.floats, []
            ran = [_hook_name(h) for h in module._forward_hooks.values() if _theirs(h)]
            culprits = _culprits(ran, module.__dict__.get("forward"))
            if expected is not None and floats and _new_zeros(output, floats):
                raise UnsupportedRouterError(_cut_message(self.name, culprits))
            if expected is None or _same(_integer_tensors(output), expected):
                return
        raise UnsupportedRouterError(_remap_message(self.name, culprits))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_inert, ())

    def __repr__(self) -> str:
        return f"<moe_replay output guard of router '{self.name}'>"


_GLOBAL = " (a global module forward hook, of torch.nn.modules.module.register_module_forward_hook?)"


def _culprits(hooks: list[str], forward: Any) -> str:
    """What may have changed the output, in words: the module's hooks, a wrapper of its forward, or a global hook."""
    found = [f"hooks on its module: {', '.join(hooks)}"] if hooks else []
    if _is_foreign(forward):
        found.append(f"its forward is now {_hook_name(forward)}")
    return f" ({'; '.join(found)}; or a global module hook)" if found else _GLOBAL


def _is_foreign(forward: Any) -> bool:
    """Is ``forward`` (what a module's instance dict holds as its forward) a wrapper of someone else's?"""
    return forward is not None and not hasattr(forward, "__moe_replay_hook__")


def _hook_name(h: Any) -> str:
    return getattr(h, "__qualname__", None) or type(h).__name__


def is_guard(h: Any) -> bool:
    """Is ``h`` one of an :class:`OutputGuard`'s hooks (not the user's: left out where hooks are compared)?"""
    return isinstance(h, OutputGuard | _Enter)


def _theirs(h: Any) -> bool:
    """Is ``h``, a module's forward hook, someone else's: neither a guard's nor one marked by :func:`own_hook` (the
    watch of the user's hooks inside an outer router's scope, see :mod:`moe_replay._inner_hooks`)?"""
    return not is_guard(h) and not getattr(h, "__moe_replay_own__", False)


def own_hook(fn: Any) -> Any:
    """Mark ``fn``, a module hook of moe_replay's own (the watch for unfound routers, a global one; the watch of the
    user's hooks inside a scope), as one that leaves what a module returned as it was: no guard is needed for it."""
    fn.__moe_replay_own__ = True
    return fn


def runs_foreign_hooks(module: nn.Module) -> bool:
    """Do forward hooks other than moe_replay's own run after ``module``'s forward (its own, or global ones)?"""
    return any(map(_theirs, module._forward_hooks.values())) or any(
        not getattr(h, "__moe_replay_own__", False) for h in _GLOBAL_HOOKS.values()
    )
