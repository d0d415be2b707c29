"""Interception of a router's decision call inside its own forward.

While the scope module of a router (the router itself, or its MoE block for a bare
``nn.Linear`` gate) runs, a :class:`torch.overrides.TorchFunctionMode` watches for the
decision call: ``topk`` with ``k == top_k`` over the expert dimension, or ``argmax`` /
``max`` for top-1 routers. The mode is thread-local and active for that forward alone.

* capture: the decision runs natively and its indices are written to the ring;
* replay: the call is answered with ``(source.gather(-1, forced), forced)``, where
  ``source`` is the score tensor (or, when that tensor is a ``masked_fill``/``where``
  of another one, the unmasked scores: group-limited routers mask out groups before
  the top-k, and a forced expert outside the chosen groups must still get its score);
* recompute (activation checkpointing): a router running again during backward gets
  the very rows its forward got, whatever mode the session is in by then.

With gradients on, the values are always produced by ``gather`` (never by the top-k
itself) so that a forward and its recompute save the same tensors: non-reentrant
checkpointing checks that.
"""

from __future__ import annotations

import collections
import copy
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ReplayConsumptionError, UnsupportedRouterError
from .ring import CaptureRing, ReplaySource

__all__ = ["RouterHook"]

_TOPK = {torch.topk, torch.Tensor.topk}
_ARGMAX = {torch.argmax, torch.Tensor.argmax}
_MAX = {torch.max, torch.Tensor.max}
_MASKS = {torch.masked_fill, torch.Tensor.masked_fill}
_WHERE = {torch.where, torch.Tensor.where}
_WATCHED = _TOPK | _ARGMAX | _MAX | _MASKS | _WHERE

#: How many recompute entries a router keeps before dropping the oldest (a forward whose
#: backward never ran); pipeline schedules keep far fewer micro-batches in flight.
MAX_PENDING_RECOMPUTES = 1024


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _ckpt_code() -> types.CodeType | None:
    try:
        from torch.utils.checkpoint import CheckpointFunction

        return CheckpointFunction.forward.__code__
    except (ImportError, AttributeError):  # pragma: no cover - torch without reentrant checkpoint
        return None


_REENTRANT_FORWARD = _ckpt_code()


def _in_reentrant_checkpoint(max_depth: int = 40) -> bool:
    """True inside the forward of a reentrant ``torch.utils.checkpoint`` region."""
    f = sys._getframe(2)
    for _ in range(max_depth):
        if f is None:
            return False
        if f.f_code is _REENTRANT_FORWARD:
            return True
        f = f.f_back
    return False


def _recomputable() -> bool:
    """Will this forward run again during backward (activation checkpointing)?"""
    if torch.is_grad_enabled():
        # non-reentrant checkpointing packs saved tensors through default hooks
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    if torch.is_inference_mode_enabled():
        return False
    return _in_reentrant_checkpoint()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class RouterHook:
    """Per-router interception state; one per found router, owned by a session."""

    name: str
    num_experts: int
    top_k: int
    decision: str  # "auto" (topk, or argmax/max when top_k == 1), "topk", "argmax" or "max"
    scope: nn.Module
    capture_ring: CaptureRing | None = None
    replay_source: ReplaySource | None = None
    capturing: bool = False
    replaying: bool = False
    pending: collections.deque[torch.Tensor] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_PENDING_RECOMPUTES)
    )
    calls: int = 0  # scope forwards since the counter was reset (eager only)
    decisions: int = 0  # decision calls seen since the counter was reset (eager only)
    _decided: bool = False
    _masks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    # ------------------------------------------------------------- scope forward
    def wrap(self, forward: Callable[..., Any]) -> ScopedForward:
        """The replacement ``forward`` installed on the scope module."""
        return ScopedForward(self, forward)

    def _run(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._decided = False
        self._masks = []
        try:
            with _DecisionMode(self):
                out = forward(*args, **kwargs)
        finally:
            self._masks = []
        if not _compiling():
            self.calls += 1
            if not self._decided:
                raise UnsupportedRouterError(
                    f"router '{self.name}' ran, but no decision call was seen in its forward: expected "
                    f"topk(k={self.top_k}) over {self.num_experts} experts"
                    + (" or argmax/max" if self.top_k == 1 else "")
                    + ". It may use a fused kernel or compute the top-k elsewhere: name the module that "
                    "calls the top-k with include=, or register an Adapter; nothing was recorded or forced"
                )
        return out

    # ------------------------------------------------------------- the decision
    def matches(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Is this call the router's decision?"""
        if self._decided:
            return False
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.num_experts:
            return False
        if func in _TOPK:
            if self.decision not in ("auto", "topk"):
                return False
            k = args[1] if len(args) > 1 else kwargs.get("k")
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            largest = args[3] if len(args) > 3 else kwargs.get("largest", True)
            return k == self.top_k and isinstance(dim, int) and dim in (-1, x.dim() - 1) and bool(largest)
        if self.top_k != 1:
            return False
        kind = "argmax" if func in _ARGMAX else "max" if func in _MAX else None
        if kind is None or self.decision not in ("auto", kind):
            return False
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return isinstance(dim, int) and dim in (-1, x.dim() - 1)

    def decide(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Answer the decision call: native (capture), forced (replay) or recompute."""
        self._decided = True
        if not _compiling():
            self.decisions += 1
        x: torch.Tensor = args[0] if args else kwargs["input"]
        lead = x.shape[:-1]
        n = x.numel() // self.num_experts
        source = self._unmasked(x).reshape(-1, self.num_experts)
        grad = torch.is_grad_enabled() and source.requires_grad

        eager = not _compiling()
        record = True
        if eager and self.pending and _in_backward():
            record = False  # a recompute: its forward already recorded these rows
            forced = self.pending.popleft()
            if forced.shape[0] != n:
                raise ReplayConsumptionError(
                    f"router '{self.name}' is recomputed for {n} tokens during backward, but its next "
                    f"forward had {forced.shape[0]}: backward passes must run in the order of their forwards"
                )
        elif self.replaying:
            forced = self._forced(func, x, args, kwargs, n)
            if eager and _recomputable():
                self.pending.append(forced)
        elif not grad:  # native decision, answered by the call itself
            out = func(*args, **kwargs)
            self._record(self._indices_of(func, out, n))
            return out
        else:  # native decision, values through gather so that a recompute matches
            forced = self._native(func, x, args, kwargs, n)
            if eager and _recomputable():
                self.pending.append(forced)
        if record:
            self._record(forced)
        return self._answer(func, args, kwargs, source, forced, lead)

    def _forced(
        self, func: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], n: int
    ) -> torch.Tensor:
        src = self.replay_source
        assert src is not None
        if not _compiling() and not _graph_capturing():
            if src.host_consumed + n > src.num_rows:
                raise ReplayConsumptionError(
                    f"router '{self.name}' needs rows {src.host_consumed}..{src.host_consumed + n - 1} "
                    f"but only {src.num_rows} were recorded for it: the routes are too short for "
                    "these forwards (check the batch against the routes, or slice the routes)"
                )
            src.host_consumed += n
        forced = src.read(n)
        if src.has_missing:  # -1 rows: this token is routed natively
            forced = torch.where(forced < 0, self._native(func, x, args, kwargs, n), forced)
        return forced

    def _native(
        self, func: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], n: int
    ) -> torch.Tensor:
        """The indices the model's own call would choose, without autograd."""
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        out = func(x.detach(), *args[1:], **rest)
        return self._indices_of(func, out, n)

    def _indices_of(self, func: Any, out: Any, n: int) -> torch.Tensor:
        idx = out if func in _ARGMAX else out[1]
        return idx.reshape(n, self.top_k)

    def _record(self, idx: torch.Tensor) -> None:
        if self.capturing and self.capture_ring is not None:
            self.capture_ring.write(idx)

    def _answer(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        source: torch.Tensor,
        forced: torch.Tensor,
        lead: torch.Size,
    ) -> Any:
        values = source.gather(-1, forced).reshape(*lead, self.top_k)
        idx = forced.reshape(*lead, self.top_k)
        if func in _TOPK:
            return torch.return_types.topk((values, idx))
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if not keepdim:
            values, idx = values.squeeze(-1), idx.squeeze(-1)
        if func in _ARGMAX:
            return idx
        return torch.return_types.max((values, idx))

    # ------------------------------------------------------------- masked sources
    def note_mask(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Remember that ``out`` is a masked copy of a score tensor (group-limited routing)."""
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[-1] != self.num_experts:
            return
        if func in _MASKS:
            src = args[0] if args else kwargs.get("input")
        else:  # where(cond, scores, fill)
            src = args[1] if len(args) > 1 else kwargs.get("input")
        if isinstance(src, torch.Tensor) and src.shape == out.shape:
            self._masks.append((out, src))

    def _unmasked(self, x: torch.Tensor) -> torch.Tensor:
        changed = True
        while changed:
            changed = False
            for out, src in self._masks:
                if out is x:
                    x, changed = src, True
                    break
        return x


class ScopedForward:
    """The scope module's ``forward`` while a session is attached.

    Idle, it calls the original forward and nothing else. A deep copy of the model
    (a reference policy, say) gets the plain original forward, not a link to this session.
    """

    def __init__(self, hook: RouterHook, inner: Callable[..., Any]) -> None:
        self.__moe_replay_hook__ = hook
        self.__wrapped__ = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = self.__moe_replay_hook__
        if hook.capturing or hook.replaying or (not _compiling() and hook.pending and _in_backward()):
            return hook._run(self.__wrapped__, args, kwargs)
        return self.__wrapped__(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., Any]:
        inner = self.__wrapped__
        scope = self.__moe_replay_hook__.scope
        if isinstance(inner, types.MethodType) and inner.__self__ is scope and id(scope) in memo:
            return types.MethodType(inner.__func__, memo[id(scope)])
        return copy.deepcopy(inner, memo)

    def __repr__(self) -> str:
        return f"<moe_replay forward of router '{self.__moe_replay_hook__.name}'>"


def _graph_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _DecisionMode(TorchFunctionMode):
    """Routes the scope forward's torch calls: decisions to the hook, the rest through."""

    def __init__(self, hook: RouterHook) -> None:
        super().__init__()
        self.hook = hook

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func not in _WATCHED:  # the hot path: every other torch call of the scope forward
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        hook = self.hook
        if hook.matches(func, args, kwargs):
            return hook.decide(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in _MASKS or func in _WHERE:
            hook.note_mask(func, args, kwargs, out)
        return out
