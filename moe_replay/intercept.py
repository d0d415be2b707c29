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

import copy
import sys
import types
import weakref
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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


# ----------------------------------------------------------------- activation checkpointing
# A router inside a checkpointed region runs twice: in the forward, and again in backward
# when the region is recomputed. The rows of the forward are kept per region object
# (weakly: they go when the autograd graph goes), and the recompute of that region takes
# them back in call order. So backward needs no ordering assumption: it works after the
# capture/replay context exited, for any number of micro-batches in any backward order,
# and again for a second backward over a retained graph.
#
# A region object is
# * non-reentrant torch.utils.checkpoint: its `_CheckpointFrame`. The forward's pack hook
#   holds it, the recompute's pack hook a weak reference to it (torch/utils/checkpoint.py:
#   `_checkpoint_hook`, `_recomputation_hook`); only the innermost one is visible;
# * reentrant checkpointing (torch's `CheckpointFunction`, and any autograd.Function that
#   runs its forward again in its backward, as Megatron's and DeepSpeed's do): that
#   Function's ctx, found on the Python stack in its `forward` and in its `backward`.

try:
    from torch.utils.checkpoint import _CheckpointFrame
except ImportError:  # pragma: no cover - torch without non-reentrant checkpoint
    _CheckpointFrame = None  # type: ignore[assignment,misc]

_FunctionCtx = torch.autograd.function.BackwardCFunction
_CTX_METHODS = frozenset(("forward", "backward"))

#: How many Python frames above a router call are searched for reentrant checkpoints.
MAX_STACK_DEPTH = 128


def _frame_of_hook(fn: Any) -> tuple[Any, bool]:
    """The ``_CheckpointFrame`` a pack hook of torch.utils.checkpoint refers to, and whether it recomputes."""
    for _ in range(3):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            recompute = isinstance(v, weakref.ref)
            if recompute:
                v = v()
            if _CheckpointFrame is not None and isinstance(v, _CheckpointFrame):
                return v, recompute
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            break
    return None, False


def _regions() -> list[tuple[Any, bool]]:
    """The checkpoint regions around this router call, innermost first, each with "being recomputed?"."""
    out: list[tuple[Any, bool]] = []
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None:
        frame, recompute = _frame_of_hook(hooks[0])
        if frame is not None:
            out.append((frame, recompute))
        elif getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint":
            raise UnsupportedRouterError(
                "moe_replay does not know this torch version's non-reentrant checkpoint (no checkpoint frame in "
                "its saved-tensor hooks), so a recompute could not be given the experts of its forward; "
                "checkpoint with use_reentrant=True, or report the torch version"
            )
    # an autograd.Function runs its forward with gradients off, its backward inside a graph task
    if (torch.is_grad_enabled() and not _in_backward()) or torch.is_inference_mode_enabled():
        return out
    f: types.FrameType | None = sys._getframe(2)
    for _ in range(MAX_STACK_DEPTH):
        if f is None:
            break
        code = f.f_code
        if code.co_name in _CTX_METHODS and code.co_argcount and code.co_varnames[0] == "ctx":
            ctx = f.f_locals.get("ctx")
            if isinstance(ctx, _FunctionCtx):
                out.append((ctx, code.co_name == "backward"))
        f = f.f_back
    return out


class _Kept:
    """The rows one router got inside one checkpointed region, and the recompute's position in them."""

    __slots__ = ("graph_task", "pos", "rows")

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.graph_task = -1
        self.pos = 0


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
    kept: weakref.WeakKeyDictionary[Any, _Kept] = field(default_factory=weakref.WeakKeyDictionary)
    seen: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (scores, indices) per decision, when kept
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
        eager = not _compiling()
        if eager:
            self.decisions += 1
        x: torch.Tensor = args[0] if args else kwargs["input"]
        lead = x.shape[:-1]
        n = x.numel() // self.num_experts
        source = self._unmasked(x).reshape(-1, self.num_experts)
        regions = _regions() if eager else []
        if regions and _in_backward():  # a recompute: its forward's rows, never recorded nor counted again
            forced = self._recomputed(regions, n)
            if forced is None:  # its forward ran while the session was idle
                return func(*args, **kwargs)
            return self._answer(func, args, kwargs, source, forced, lead)

        if self.replaying:
            forced = self._forced(func, x, args, kwargs, n)
        elif not (torch.is_grad_enabled() and source.requires_grad):  # native, answered by the call itself
            out = func(*args, **kwargs)
            idx = self._indices_of(func, out, n)
            self._record(idx)
            self._keep(regions, idx)
            if self.seen is not None:
                self.seen.append((source, idx))
            return out
        else:  # native decision, values through gather so that a recompute saves the same tensors
            forced = self._native(func, x, args, kwargs, n)
        self._record(forced)
        self._keep(regions, forced)
        if self.seen is not None:
            self.seen.append((source, forced))
        return self._answer(func, args, kwargs, source, forced, lead)

    def _keep(self, regions: list[tuple[Any, bool]], forced: torch.Tensor) -> None:
        """Keep the rows on every region that may be recomputed later (all of them, in a forward)."""
        for region, recomputing in regions:
            if not recomputing:
                kept = self.kept.get(region)
                if kept is None:
                    kept = self.kept[region] = _Kept()
                kept.rows.append(forced)

    def _recomputed(self, regions: list[tuple[Any, bool]], n: int) -> torch.Tensor | None:
        """The rows this router got in the forward of the innermost region now being recomputed."""
        kept = next((k for r, recomputing in regions if recomputing and (k := self.kept.get(r)) is not None), None)
        if kept is None:
            if self.kept and not any(recomputing for _, recomputing in regions):
                raise UnsupportedRouterError(
                    f"router '{self.name}' runs in a checkpointed region that is itself run again inside the "
                    "recompute of an outer non-reentrant checkpoint: moe_replay cannot see the outer region to "
                    "give it the experts of its forward. Do not nest non-reentrant checkpoints, or make the "
                    "outer one reentrant"
                )
            return None
        task = torch._C._current_graph_task_id()
        if kept.graph_task != task:  # a new backward recomputes the region from its start
            kept.graph_task, kept.pos = task, 0
        if kept.pos >= len(kept.rows):
            raise ReplayConsumptionError(
                f"router '{self.name}' ran {kept.pos + 1} times in the recompute of a checkpointed region but "
                f"{len(kept.rows)} times in its forward: the checkpointed function must run the same routers "
                "each time"
            )
        forced = kept.rows[kept.pos]
        kept.pos += 1
        if forced.shape[0] != n:
            raise ReplayConsumptionError(
                f"router '{self.name}' is recomputed for {n} tokens during backward, but its forward had "
                f"{forced.shape[0]}: the checkpointed function must see the same inputs each time"
            )
        self._keep(regions, forced)  # regions first run inside this recompute (nested checkpoints)
        return forced

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
        if (
            hook.capturing
            or hook.replaying
            or hook.seen is not None
            or (not _compiling() and hook.kept and _in_backward())
        ):
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
