"""What users write instead of moe_replay, measured in the same run.

* :class:`RecipeRouting`: the approach of the transformers routing recipe (PR 44925,
  ``docs/source/en/moe_routing``): the router class is replaced by a subclass whose
  forward reads forced indices off the module (``gather`` instead of ``topk``), and
  capture collects the router's index output with an output recorder (a forward hook
  that keeps every index tensor, int64, on the device). Written here from that
  description for routers returning ``(logits, weights, indices)`` (Qwen2/3-MoE, OLMoE,
  and ``softmax_topk`` of :mod:`moe_replay.models`); it depends on no transformers
  internals.
* :class:`NaiveHook`: a forward hook on each router that copies the indices to the host
  on every call (one device-to-host copy, and so one synchronisation, per router call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NaiveHook", "RecipeRouting"]

#: Position of the expert indices in the router's output tuple.
INDEX_OUTPUT = 2


def _recipe_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A softmax-top-k router forward that takes its experts from ``self._forced_indices`` when set."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    logits = F.linear(x, self.weight)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    forced = self._forced_indices
    if forced is None:
        values, indices = torch.topk(probs, self.top_k, dim=-1)
    else:  # Megatron-style replay: the forced experts, weighted by the current scores
        indices = forced
        values = probs.gather(-1, forced)
    if self.norm_topk_prob:
        values = values / values.sum(dim=-1, keepdim=True)
    return logits, values.to(logits.dtype), indices


_SUBCLASSES: dict[type, type] = {}


def _replayable(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Replayable{cls.__name__}", (cls,), {"forward": _recipe_forward, "_forced_indices": None})
        _SUBCLASSES[cls] = sub
    return sub


class _Recorder:
    """Index outputs collected by forward hooks on the routers, in call order."""

    def __init__(self, routers: Sequence[nn.Module]) -> None:
        self.routers = list(routers)
        self.recorded: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, record: Any) -> None:
        self._handles = [r.register_forward_hook(record) for r in self.routers]

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def per_router(self) -> list[torch.Tensor]:
        """The recorded index tensors of each router, concatenated over forwards."""
        n = len(self.routers)
        return [torch.cat(self.recorded[i::n]) for i in range(n)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.recorded)


class RecipeRouting(_Recorder):
    """The router-subclass + output-recorder recipe on a list of router modules.

    ``install()`` swaps each router's class for its replayable subclass (the recipe does
    this when the model is built); ``record=True`` also registers the recorder.
    """

    def __init__(self, routers: Sequence[nn.Module]) -> None:
        super().__init__(routers)
        self._classes: list[type] = []

    def install(self, record: bool = False) -> RecipeRouting:
        self._classes = [type(r) for r in self.routers]
        for r in self.routers:
            r.__class__ = _replayable(type(r))
        if record:
            self._hook(self._record)
        return self

    def _record(self, module: nn.Module, args: Any, out: Any) -> None:
        self.recorded.append(out[INDEX_OUTPUT])

    def force(self, per_router: Sequence[torch.Tensor] | None) -> None:
        """Forced indices (``[tokens, k]`` int64 on the device) per router, or None to route natively."""
        for i, r in enumerate(self.routers):
            r._forced_indices = None if per_router is None else per_router[i]

    def uninstall(self) -> None:
        self.force(None)
        self._unhook()
        for r, cls in zip(self.routers, self._classes, strict=True):
            r.__dict__.pop("_forced_indices", None)
            r.__class__ = cls
        self._classes = []


class NaiveHook(_Recorder):
    """A forward hook per router that copies its indices to the host on every call."""

    def install(self) -> NaiveHook:
        self._hook(self._record)
        return self

    def _record(self, module: nn.Module, args: Any, out: Any) -> None:
        self.recorded.append(out[INDEX_OUTPUT].cpu())

    def uninstall(self) -> None:
        self._unhook()
