"""Which call of a router's forward is its decision: established by effect, once per router.

A router's forward may make several calls that look like a decision: a ``topk`` taken for
logging, a ``max`` for a numerically stable softmax, a group ``topk`` before the expert
``topk``, two ``topk(k=1)`` calls that together choose two experts. Their signatures do not
say which one chooses the experts; their effect does. So, the first time a router's forward
runs eagerly under a session (in any state), moe_replay runs that forward a few more times
without gradients, with the same inputs, the same random state and the same buffers:

1. twice as it is, to record every decision-like call (``topk``, ``argmax``/``max`` over a
   dimension, ``sort``/``argsort``) and to measure the run-to-run noise of the output;
2. once per candidate call, with that call's *indices* changed (its values kept), to see
   whether the forward's output changes. A call whose indices never reach the output
   (logging, a stable-softmax ``max``, a dispatch that only reads values) is not a decision;
3. the decision is the last call that matters over the expert width: the one that fixes
   the final choice. An earlier call over the same width is part of the decision too
   (successive top-1 slots) when changing it still changes the output while the later
   calls are held at their own choice; otherwise it only shaped the scores (a group
   selection) and runs natively.

k is the number of indices the decision calls produce together, E the width they choose
from; attribute names and weight shapes found by discovery are hints that narrow the
search, never a substitute for it. Where no call matters, or the evidence contradicts what
the user declared, the router is refused with the calls that were seen. The model is left
as it was: random state and buffers are put back after every probe run, and the real
forward then runs once, exactly as it would have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import UnsupportedRouterError

__all__ = ["Call", "Evidence", "VerifyReport", "decision_call", "establish"]

_FAMILY: dict[Any, str] = {
    torch.topk: "topk",
    torch.Tensor.topk: "topk",
    torch.argmax: "argmax",
    torch.Tensor.argmax: "argmax",
    torch.max: "max",
    torch.Tensor.max: "max",
    torch.sort: "sort",
    torch.Tensor.sort: "sort",
    torch.argsort: "argsort",
    torch.Tensor.argsort: "argsort",
    torch.argmin: "argmin",
    torch.Tensor.argmin: "argmin",
    torch.min: "min",
    torch.Tensor.min: "min",
    torch.kthvalue: "kthvalue",
    torch.Tensor.kthvalue: "kthvalue",
}
#: Families whose indices the replay can answer with forced experts.
FORCEABLE = frozenset({"topk", "argmax", "max", "argmin", "min"})
#: The torch functions whose calls may be a decision.
DECISION_FUNCS = frozenset(_FAMILY)

#: The lean wrappers of torch's functions, each to the function it wraps (filled by moe_replay._lean).
#: Traced code may hand a mode the wrapper itself (dynamo calls what ``torch.topk`` names); modes
#: read it as the function it wraps.
UNWRAP: dict[Any, Any] = {}


class _Nesting(threading.local):
    """What runs in this thread: how deep in router scopes, and which lean router (if any) gets calls."""

    depth = 0  # scope forwards running in this thread (eager): a mode sees only its own scope's calls
    lean: Any = None  # the router hook whose lean forward runs innermost now (see moe_replay._lean)
    auditing = False  # a forward is checking that its calls come through the lean wrappers
    via: Any = None  # the original torch function a lean wrapper is calling right now
    probing = 0  # probe runs in progress in this thread: routers nested in a probed scope run plainly


NESTING = _Nesting()

_MASKS = frozenset({torch.masked_fill, torch.Tensor.masked_fill, torch.where, torch.Tensor.where})
#: Families whose result carries values beside the indices.
_VALUED = frozenset({"topk", "max", "min", "sort", "kthvalue"})


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def decision_call(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """``(family, k, width)`` when this torch call chooses indices along the last dimension.

    ``k`` is the number of indices per row it returns (1 for ``argmax``/``max``, the width for a
    ``sort``); ``width`` the size of the dimension chosen from. Calls along another dimension,
    a ``max`` of two tensors and a ``max``/``argmax`` over all elements are not decisions.
    """
    family = _FAMILY.get(func)
    if family is None:
        return None
    x = _arg(args, kwargs, 0, "input")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.dtype == torch.bool:
        return None  # a router scores [tokens, E] (or [..., tokens, E]); 1-D calls sort tokens
    width = int(x.shape[-1])
    if family == "topk":
        k, dim = _arg(args, kwargs, 1, "k"), _arg(args, kwargs, 2, "dim", -1)
    elif family in ("argmax", "max", "argmin", "min"):
        k, dim = 1, _arg(args, kwargs, 1, "dim")
    elif family == "kthvalue":
        k, dim = 1, _arg(args, kwargs, 2, "dim", -1)
    else:
        k, dim = width, _arg(args, kwargs, 1, "dim", -1)
    if type(k) is not int or type(dim) is not int:  # the common case is plain ints: no ABC checks
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or isinstance(dim, bool):
            return None
        if not isinstance(dim, numbers.Integral):
            return None
        k, dim = int(k), int(dim)
    if dim not in (-1, x.dim() - 1) or width < 2:
        return None
    return family, k, width


@dataclass(frozen=True)
class Call:
    """One decision-like call seen in a router's forward.

    Attributes:
        ordinal: its position among the decision-like calls of that forward (0-based).
        family: ``topk``, ``argmax``, ``max``, ``sort`` or ``argsort``.
        k: indices per row it returns.
        width: size of the dimension it chooses from.
        rows: rows (tokens) it chose for in the forward it was seen in.
        where: ``file:line`` of the model code that made it.
        effect: whether changing its indices changed the forward's output (None: not probed).
    """

    ordinal: int
    family: str
    k: int
    width: int
    rows: int
    where: str
    effect: bool | None = None

    @property
    def signature(self) -> tuple[str, int, int]:
        return self.family, self.k, self.width

    def describe(self) -> str:
        """``#1 topk(k=2) over 8 at model.py:42``."""
        k = f"k={self.k}" if self.family == "topk" else ""
        return f"#{self.ordinal} {self.family}({k}) over {self.width} at {self.where}"


@dataclass(frozen=True)
class Evidence:
    """How a router's decision was established.

    Attributes:
        calls: every decision-like call of its forward, in call order, with its effect.
        decision: ordinals of the calls that make the decision, in slot order.
        top_k: experts chosen per token (the decision calls' indices together).
        num_experts: the width the decision chooses from.
        training: the module's ``training`` flag when it was established.
        reason: one sentence saying why these calls decide.
    """

    calls: tuple[Call, ...]
    decision: tuple[int, ...]
    top_k: int
    num_experts: int
    training: bool
    reason: str

    @property
    def count(self) -> int:
        """Decision-like calls per forward."""
        return len(self.calls)

    def describe(self) -> str:
        """A few lines for ``verify()`` and error messages."""
        lines = [f"decides with {' + '.join(self.calls[i].describe() for i in self.decision)}: {self.reason}"]
        for c in self.calls:
            if c.ordinal not in self.decision:
                why = {True: "shapes the scores only", False: "its indices do not reach the output"}.get(
                    c.effect, "not of the family the Adapter names"
                )
                lines.append(f"  ignores {c.describe()} ({why})")
        return "\n".join(lines)


class VerifyReport(dict[str, int]):
    """What :meth:`Session.verify` returns: per router, how many times it ran in the forward.

    ``evidence`` holds, per router, the :class:`Evidence` of its decision; ``str(report)``
    is a readable account of which call decides in every router and why.
    """

    def __init__(self, calls: Mapping[str, int], evidence: Mapping[str, Evidence]) -> None:
        super().__init__(calls)
        self.evidence: dict[str, Evidence] = dict(evidence)

    def __str__(self) -> str:
        lines = [f"verified {len(self)} routers:"]
        for name, n in self.items():
            ev = self.evidence.get(name)
            how = ev.describe().replace("\n", "\n    ") if ev is not None else "hash table lookup (declared)"
            k = f"k={ev.top_k} of {ev.num_experts}, " if ev is not None else ""
            lines.append(f"  {name}: {k}ran {n}x, {how}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / notebooks
        printer.text(str(self))


# ----------------------------------------------------------------------------- probe runs
_MACHINERY = ("evidence.py", "intercept.py", "orphans.py", "session.py", "_lean.py")


def _where() -> str:
    """``file:line`` of the innermost frame of model code (outside torch and this interception)."""
    here = os.path.dirname(os.path.abspath(__file__))
    own = {os.path.join(here, name) for name in _MACHINERY}
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    f = sys._getframe(2)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if path not in own and not path.startswith(torch_dir):
            return f"{os.path.basename(path)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _changed(family: str, out: Any, width: int) -> Any:
    """``out`` with its indices moved to other experts and its values kept."""
    if family in ("argmax", "argmin"):
        return (out + 1) % width
    if family == "argsort":
        return out.roll(1, dims=-1)
    values, idx = out[0], out[1]
    idx = idx.roll(1, dims=-1) if family == "sort" else (idx + 1) % width
    return type(out)((values, idx))


def _changed_slot(out: Any, slot: int, width: int) -> Any:
    """A ``topk`` result with only slot ``slot`` moved to an expert the row does not hold."""
    values, idx = out[0], out[1]
    taken = torch.zeros(*idx.shape[:-1], width, dtype=torch.bool, device=idx.device).scatter(-1, idx, True)
    free = (~taken).to(torch.int8).argmax(-1)
    idx = idx.clone()
    idx[..., slot] = free
    return type(out)((values, idx))


def _changed_values(out: Any) -> Any:
    """A ``(values, indices)`` result with its values moved (the best of a row and the k-th swap places, or
    rows take each other's values), its indices kept; ``out`` itself where neither is possible."""
    values, idx = out[0], out[1]
    if values.dim() and values.shape[-1] > 1 and values.dim() == idx.dim():
        return type(out)((values.flip(-1), idx))
    if values.dim() and values.shape[0] > 1:
        return type(out)((values.roll(1, 0), idx))
    return out


def _masks_some(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Did some scores of a row change (by more than 1%) while other nonzero ones did not (a mask that
    moved), rather than all of them (a rescaling, a shift) or none?"""
    if before.shape != after.shape or before.dim() == 0:
        return False
    a, b = before.detach().flatten(0, -2) if before.dim() > 1 else before.detach()[None], after.detach()
    b = b.flatten(0, -2) if b.dim() > 1 else b[None]
    a, b = a.double(), b.double()
    changed = (a - b).abs() > 1e-2 * torch.maximum(a.abs(), b.abs())  # (rounding is not a change)
    kept = ~changed & (a != 0)
    return bool((changed.any(-1) & kept.any(-1)).any())


class _ProbeMode(TorchFunctionMode):
    """Counts the decision-like calls of one forward; changes or holds some of them."""

    def __init__(
        self, change: int | None, hold: dict[int, Any], slot: int | None = None, values: int | None = None
    ) -> None:
        super().__init__()
        self.change, self.hold, self.slot, self.values = change, hold, slot, values
        self.depth = NESTING.depth
        self.calls: list[Call] = []
        self.ins: list[torch.Tensor] = []  # each call's scores
        self.outs: list[Any] = []
        self.masked: list[torch.Tensor] = []
        self.unmasked: list[bool] = []  # per call: its input is a masked copy that was seen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        func = UNWRAP.get(func, func)
        if func in _MASKS:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.masked.append(out)
            return out
        sig = decision_call(func, args, kwargs) if func in DECISION_FUNCS else None
        if sig is None or NESTING.depth != self.depth:  # not a decision, or one of a router nested inside
            return func(*args, **kwargs)
        i = len(self.calls)
        x = _arg(args, kwargs, 0, "input")
        self.calls.append(Call(i, *sig, rows=x.numel() // sig[2], where=_where()))
        self.ins.append(x)
        self.unmasked.append(any(m is x for m in self.masked))
        if i in self.hold:
            out = self.hold[i]
        else:
            out = func(*args, **kwargs)
            if i == self.change:
                out = _changed(sig[0], out, sig[2]) if self.slot is None else _changed_slot(out, self.slot, sig[2])
            elif i == self.values and sig[0] in _VALUED:
                out = _changed_values(out)
        self.outs.append(out)
        return out


def _leaves(obj: Any, out: list[Any], depth: int = 0) -> list[Any]:
    if isinstance(obj, torch.Tensor) or depth > 8:
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _leaves(v, out, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _leaves(v, out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _leaves(getattr(obj, f.name), out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | nn.Module) and not callable(obj):
        for v in vars(obj).values():  # a plain result object
            _leaves(v, out, depth + 1)
    return out


def _distance(a: Any, b: Any, tol: float = 0.0) -> tuple[float, int]:
    """How far two forward outputs are apart, and in how many elements (by more than ``tol``).

    ``(0, 0)`` when equal; ``inf`` when their structure differs.
    """
    la, lb = _leaves(a, []), _leaves(b, [])
    if len(la) != len(lb):
        return math.inf, sys.maxsize
    worst, count = 0.0, 0
    for x, y in zip(la, lb, strict=True):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return math.inf, sys.maxsize
        if not x.is_floating_point():
            unequal = int((x != y).sum())
            if unequal:
                worst, count = math.inf, count + unequal
            continue
        x, y = x.detach().double(), y.detach().double()
        same = (x == y) | (x.isnan() & y.isnan())
        if bool(same.all()):
            continue
        diff = (x - y).abs().masked_fill(same, 0.0).nan_to_num(nan=math.inf)
        worst = max(worst, float(diff.max()))
        count += int((diff > tol).sum())
    return worst, count


def _indices(out: Any, family: str, rows: int) -> torch.Tensor:
    idx = out if family in ("argmax", "argmin", "argsort") else out[1]
    return idx.reshape(rows, -1)


def _disjoint(call: Call, out: Any, slots: list[tuple[Call, Any]]) -> bool:
    """Do the indices of ``out`` share no expert with those of ``slots`` in any row (slots of one decision)?"""
    try:
        mine = _indices(out, call.family, call.rows)
        rest = torch.cat([_indices(o, c.family, call.rows) for c, o in slots], 1)
    except (RuntimeError, IndexError, TypeError):
        return False
    return not bool((mine[:, :, None] == rest[:, None, :]).any())


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Tokens in the forward's first input tensor of two or more dimensions (``[..., tokens, hidden]``)."""
    x = next((a for a in _leaves((args, kwargs), []) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    return None if x is None else x.numel() // max(int(x.shape[-1]), 1)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_clone(v) for v in obj)
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if type(obj) is dict:
        return {k: _clone(v) for k, v in obj.items()}
    return obj


#: Parameters up to this many elements are copied before probing and put back after each run;
#: larger ones (expert weights) are only checked not to change.
_COPY_LIMIT = 1 << 20
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"forward"}  # torch's own state (hook dicts...) is not ours
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def _shallow(v: Any) -> Any:
    return copy.copy(v) if isinstance(v, list | dict | set) else v


class _Snapshot:
    """What a probe run could change in the scope, put back after each run.

    The global and CUDA random state, every generator a module holds, the buffers and small
    parameters (in place, as a forward may update a balancing bias), and the plain attributes
    of every module in the scope (step counters, cached statistics). While a probe runs, the
    forward hooks of the scope's submodules are set aside, so that user hooks (utilisation
    counters, loggers) see one forward, not the probe runs.
    """

    def __init__(self, scope: nn.Module) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        self.py_random, self.np_random = random.getstate(), np.random.get_state()
        self.modules = list(scope.modules())
        self.held = [(m, dict(m._buffers), dict(m._parameters)) for m in self.modules]  # rebinding, too
        self.tensors = [(b, b.detach().clone(), b._version) for b in scope.buffers()]
        self.big: list[tuple[torch.Tensor, int]] = []
        for p in scope.parameters():
            if p.numel() <= _COPY_LIMIT:
                self.tensors.append((p, p.detach().clone(), p._version))
            else:
                self.big.append((p, p._version))
        self.attrs = [
            (m, {k: _shallow(v) for k, v in vars(m).items() if k not in _MODULE_INTERNALS}) for m in self.modules
        ]
        held = {id(t) for t, _, _ in self.tensors}
        for _, attrs in self.attrs:  # tensors kept as plain attributes (statistics updated in place)
            for v in attrs.values():
                if isinstance(v, torch.Tensor) and id(v) not in held and v.numel() <= _COPY_LIMIT:
                    held.add(id(v))
                    self.tensors.append((v, v.detach().clone(), v._version))
        self.generators = [
            (g, g.get_state()) for m in self.modules for g in vars(m).values() if isinstance(g, torch.Generator)
        ]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.py_random)
        np.random.set_state(self.np_random)
        for m, buffers, params in self.held:
            for now, then in ((m._buffers, buffers), (m._parameters, params)):
                if len(now) != len(then) or any(now.get(k) is not v for k, v in then.items()):
                    now.clear()
                    now.update(then)
        for g, state in self.generators:
            g.set_state(state)
        with torch.no_grad():
            for i, (t, v, version) in enumerate(self.tensors):
                if t._version != version and t.shape == v.shape:  # only what a run changed: no needless bump
                    t.copy_(v)
                    self.tensors[i] = (t, v, t._version)
        for m, attrs in self.attrs:
            for k in [k for k in vars(m) if k not in attrs and k not in _MODULE_INTERNALS]:
                delattr(m, k)
            for k, v in attrs.items():
                m.__dict__[k] = _shallow(v)
        changed = [p for p, version in self.big if p._version != version]
        if changed:
            raise UnsupportedRouterError(
                f"a forward of this router changes a parameter of {tuple(changed[0].shape)} in place; moe_replay "
                "cannot put it back after the runs that establish the decision. Keep such state in a buffer"
            )

    @contextlib.contextmanager
    def hooks_aside(self) -> Iterator[None]:
        """The forward hooks of the scope's submodules are not called during a probe run."""
        saved = [(m, name, getattr(m, name)) for m in self.modules[1:] for name in _HOOKS if getattr(m, name, None)]
        for m, name, _ in saved:
            setattr(m, name, type(getattr(m, name))())
        try:
            yield
        finally:
            for m, name, hooks in saved:
                setattr(m, name, hooks)


@contextlib.contextmanager
def _syncs_allowed() -> Iterator[None]:
    """Establishing runs once and reads values back; a sync-debug mode must not trip on it."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _Prober:
    def __init__(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], scope: nn.Module):
        self.forward, self.args, self.kwargs = forward, args, kwargs
        self.snapshot = _Snapshot(scope)

    def run(
        self,
        change: int | None = None,
        hold: dict[int, Any] | None = None,
        slot: int | None = None,
        values: int | None = None,
    ) -> tuple[Any, _ProbeMode]:
        mode = _ProbeMode(change, hold or {}, slot, values)
        self.snapshot.restore()
        NESTING.probing += 1
        try:
            # the caller's grad mode (a router may compute more with gradients on), saving nothing
            # through a checkpoint's saved-tensor hooks
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), self.snapshot.hooks_aside(), mode:
                out = self.forward(*_clone(self.args), **_clone(self.kwargs))
        finally:
            NESTING.probing -= 1
        return out, mode


# ----------------------------------------------------------------------------- establish
def _refuse(name: str, calls: Sequence[Call], why: str, fix: str) -> UnsupportedRouterError:
    seen = "\n  ".join(c.describe() + ("" if c.effect is None else f" (changes the output: {c.effect})") for c in calls)
    return UnsupportedRouterError(
        f"router '{name}': {why}. Decision-like calls seen in its forward:\n  {seen or '(none)'}\n{fix}; "
        "nothing was recorded or forced"
    )


@_syncs_allowed()  # establishing runs once and reads values back
def establish(
    name: str,
    scope: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_experts: int | None,
    top_k: int | None,
    declared_top_k: bool = False,
    call: int | None = None,
    family: str | None = None,
) -> Evidence | None:
    """Find the decision of ``scope``'s forward on these inputs by changing each candidate's choice.

    Args:
        name: the router's name, for messages.
        scope: the module whose forward is run.
        forward: its original forward.
        args, kwargs: the inputs of the forward being run.
        num_experts: the expert width discovery expects, or None.
        top_k: k discovery expects (a hint), or None.
        declared_top_k: ``top_k`` was given by the user: a different k is refused, not learned.
        call: an ordinal that an :class:`~moe_replay.Adapter` names as the decision.
        family: only calls of this family may decide (``topk``, ``argmax``, ``max``, ``argmin``, ``min``).

    Returns:
        The evidence, or None when the forward chose for no token (empty inputs): nothing to
        establish, record or force yet.

    Raises:
        UnsupportedRouterError: no call decides, or the evidence contradicts what was declared.
    """
    if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in _leaves((args, kwargs), [])):
        return None
    probe = _Prober(forward, args, kwargs, scope)
    try:
        base, seen = probe.run()
        calls = seen.calls
        if calls and not any(c.rows for c in calls):
            return None  # no token to choose for
        again, seen2 = probe.run()
        if [c.signature for c in seen2.calls] != [c.signature for c in calls]:
            raise _refuse(
                name,
                calls,
                "its forward makes different decision-like calls from one run to the next on the same inputs",
                "Make the forward's control flow deterministic, or name the decision with an Adapter",
            )
        noise, _ = _distance(base, again)
        tolerance = 0.0 if noise == 0 else 16 * noise
        fix = (
            "If a fused kernel or soft routing (every expert weighted, no choice) makes the decision, it cannot be "
            "replayed; identical experts (an upcycled model before training) hide every choice: establish it on "
            "a trained model; otherwise name the module that makes it with include=, or the call with "
            "mr.Adapter(..., call=N)"
        )
        if call is not None:
            if not 0 <= call < len(calls):
                raise _refuse(name, calls, f"the Adapter names call #{call}, which its forward does not make", fix)
            chosen = calls[call]
            k = chosen.k
            return _verdict(name, calls, (call,), chosen.width, k, top_k, declared_top_k, scope, "named by an Adapter")

        reach: dict[int, int] = {}  # output elements that changing each call changes

        def effect(i: int, hold: dict[int, Any] | None = None, slot: int | None = None) -> bool:
            out, _ = probe.run(change=i, hold=hold, slot=slot)
            worst, count = _distance(base, out, tolerance)
            if hold is None and slot is None:
                reach[i] = count
            return worst > tolerance

        candidates = [c for c in calls if family is None or c.family == family]
        effects = {c.ordinal: effect(c.ordinal) for c in candidates}
        calls = tuple(dataclasses.replace(c, effect=effects.get(c.ordinal)) for c in calls)
        mattering = [c for c in calls if c.effect]
        if not mattering:
            why = "no decision-like call in its forward changes the output when its choice changes"
            if not calls:
                why = (
                    "its forward makes no decision-like call (topk, argmax, max, sort): soft routing (every expert "
                    "weighted) has no expert choice to record or replay"
                )
            elif noise > 0 and not math.isfinite(noise):
                why = "its output differs between two runs on the same inputs, so no effect can be measured"
            raise _refuse(name, calls, why, fix)
        # the decision fixes the final choice: the last call that matters over the expert width
        pool = [c for c in mattering if c.width == num_experts] or [
            c for c in mattering if c.width == max(m.width for m in mattering)
        ]
        # a call whose change reaches only a sliver of the output (one auxiliary-loss value) is not
        # the decision, which changes the tokens' hidden states; of the rest, the last fixes the choice
        most = max(reach.get(c.ordinal, 0) for c in mattering)
        broad = [c for c in mattering if 8 * reach.get(c.ordinal, 0) >= most]
        pool = [c for c in pool if c in broad] or pool
        anchor = pool[-1]
        slots = [anchor.ordinal]
        hold = {anchor.ordinal: seen.outs[anchor.ordinal]}
        for c in reversed([m for m in broad if m.ordinal < anchor.ordinal]):
            held = [(calls[i], seen.outs[i]) for i in slots]
            if c.width != anchor.width or not _disjoint(c, seen.outs[c.ordinal], held):
                continue  # a slot of the decision never repeats an expert the other slots chose
            if effect(c.ordinal, hold):  # its indices still reach the output: a slot of the decision
                slots.insert(0, c.ordinal)
                hold[c.ordinal] = seen.outs[c.ordinal]
        odd = next((calls[i].family for i in slots if calls[i].family not in FORCEABLE), None)
        if odd is not None:
            raise _refuse(
                name,
                calls,
                f"its experts are chosen by a {odd} of the scores; moe_replay forces topk, argmax/argmin and "
                "max/min decisions",
                "Select the experts with torch.topk(scores, k), or name another call with mr.Adapter(..., call=N)",
            )
        tokens = _tokens(args, kwargs)
        if tokens is not None and anchor.width == tokens != anchor.rows:
            raise _refuse(
                name,
                calls,
                f"its decision {anchor.describe()} chooses among the {tokens} tokens, for {anchor.rows} rows: experts "
                "choose tokens (expert-choice routing), so there is no per-token choice to record or replay",
                "Route by token choice (a top-k over experts per token)",
            )
        used = calls[anchor.ordinal].k
        if (
            len(slots) == 1
            and anchor.family == "topk"
            and 1 < used < anchor.width
            and not effect(anchor.ordinal, slot=used - 1)
        ):
            # a top-(k+1) whose last slots only feed a statistic (noisy top-k gating's load estimate)
            used -= 1
            while used > 1 and not effect(anchor.ordinal, slot=used - 1):
                used -= 1
        shapers = [c for c in broad if c.ordinal not in slots and c.ordinal < slots[0]]
        if not shapers and not seen.unmasked[slots[0]]:  # a mask built from an earlier call's values?
            for c in calls[: slots[0]]:
                if c.family in _VALUED and c.ordinal not in slots:
                    _, moved = probe.run(values=c.ordinal)
                    if len(moved.ins) > slots[0] and _masks_some(seen.ins[slots[0]], moved.ins[slots[0]]):
                        raise _refuse(
                            name,
                            calls,
                            f"the values of an earlier call ({c.describe()}) select which scores of its decision "
                            "are masked, by an operation moe_replay cannot undo (it reads through masked_fill and "
                            "where only), so a forced expert outside that selection would get a masked weight",
                            "Mask the scores with masked_fill or torch.where",
                        )
        if shapers and not seen.unmasked[slots[0]]:
            raise _refuse(
                name,
                calls,
                f"an earlier choice ({shapers[-1].describe()}) reshapes the scores of its decision by an operation "
                "moe_replay cannot undo (it reads through masked_fill and where only), so a forced expert outside "
                "that choice would get a masked weight",
                "Mask the scores with masked_fill or torch.where",
            )
        why = "changing its choice changes the output"
        if len(slots) > 1:
            why = f"{len(slots)} successive calls, each of whose choices reaches the output"
        if shapers:
            why += "; earlier choices only shape its scores"
        k = sum(calls[i].k for i in slots) if len(slots) > 1 else used
        if k < calls[anchor.ordinal].k:
            why += f"; only its first {k} of {calls[anchor.ordinal].k} slots reach the output"
        return _verdict(name, calls, tuple(slots), anchor.width, k, top_k, declared_top_k, scope, why)
    finally:
        probe.snapshot.restore()


def _verdict(
    name: str,
    calls: Sequence[Call],
    slots: tuple[int, ...],
    width: int,
    k: int,
    top_k: int | None,
    declared_top_k: bool,
    scope: nn.Module,
    why: str,
) -> Evidence:
    if declared_top_k and top_k is not None and top_k != k:
        raise _refuse(
            name,
            calls,
            f"top_k={top_k} was given, but its decision ({' + '.join(calls[i].describe() for i in slots)}) "
            f"chooses {k} experts per token",
            f"Pass top_k={k}, or leave top_k out: k is read from the decision",
        )
    return Evidence(tuple(calls), slots, k, width, bool(scope.training), why)
