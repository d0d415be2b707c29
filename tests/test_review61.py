"""Round 61's review: choices a router makes from a floating input of its own beside the hidden states (a second
tensor argument), before or after its decision, which a replay would make again from current values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_harden50 import _as_it_was, _hooks, _state

_D, _E, _K, _T = 8, 4, 2, 6


class _TwoInputRouter(nn.Module):
    """A top-k router over the scores of ``x`` whose weights are cut by a threshold on an allocator's scores of a
    second input ``y`` (``on``: which of the two the allocator reads): before the top-k as a number of slots per token
    (``when="before"``), or after it as a mask of the weights (``when="after"``)."""

    def __init__(self, when: str, on: str) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.allocator = nn.Linear(_D, _K, bias=False)
        self.when, self.on = when, on

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on == "a weight per token":  # (``y`` a vector: one value per token, beside the hidden states)
            allocated = torch.stack([y + 1, y - 1], dim=-1)
        else:
            allocated = self.allocator(y if self.on == "y" else x)
        if self.when == "before":
            k = (torch.sigmoid(allocated) > 0.5).sum(-1).clamp(min=1)
            w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
            return w * (torch.arange(_K) < k.unsqueeze(-1)), idx
        w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
        return w * (torch.sigmoid(allocated) > 0.5), idx


class _Model(nn.Module):
    def __init__(self, when: str, on: str) -> None:
        super().__init__()
        self.router = _TwoInputRouter(when, on)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x, y)


def _captured(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            return model(x, y)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_choice_made_from_a_second_floating_input_is_refused_as_one_made_from_the_hidden_states(when: str) -> None:
    """A router that cuts its top-k's slots by a threshold on a second floating input (``router(x, y)``), before its
    decision or after it, or by a weight per token given as a vector, was accepted: only the first floating input of
    two or more dimensions was varied, so the choice never moved, though a
    replay makes it again from the current values (the slots a token keeps change with ``y`` or the allocator) and
    the capture records experts a token weighed 0. Refused by name now, as the same router cutting by ``x`` is, with
    the model as it was."""
    torch.manual_seed(0)
    x, y, w = torch.randn(_T, _D), torch.randn(_T, _D), torch.randn(_T)
    for on in ("x", "y", "a weight per token"):
        model = _Model(when, on)
        given = w if on == "a weight per token" else y
        kept = torch.sigmoid(model.router.allocator(y if on == "y" else x)) > 0.5
        if on == "a weight per token":
            kept = torch.sigmoid(torch.stack([w + 1, w - 1], dim=-1)) > 0.5
        assert not bool(kept.all()) and bool(kept.any())  # (the cut drops some slots, not all)
        state, hooks = _state(model), _hooks(model)
        with pytest.raises(mr.UnsupportedRouterError) as info:
            _captured(model, x, given)
        message = str(info.value)
        assert "router 'router'" in message and ("before its decision" if when == "before" else "after its") in message
        _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
def test_a_second_floating_input_the_router_only_weighs_by_is_accepted() -> None:
    """The check does not refuse a second floating input that picks nothing: a router that scales its top-k's weights
    by a second input (no threshold, no choice) is accepted, and its capture records the top-k of its scores."""

    class _Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(_D, _E, bias=False)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
            return w * torch.sigmoid(y[:, :1]), idx

    class _Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = _Scaled()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.router(x, y)

    torch.manual_seed(0)
    x, y = torch.randn(_T, _D), torch.randn(_T, _D)
    model = _Own()
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            model(x, y)
        recorded = session.routes().layer("router")
    want = torch.topk(model.router.gate(x), _K, dim=-1).indices
    assert torch.equal(recorded.reshape(want.shape).long(), want)
