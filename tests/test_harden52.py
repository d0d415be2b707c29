"""Checks that run the forward on other inputs never pass a router for lack of runs, nor take moe_replay's own errors
for the forward's.

A choice made before the decision (a number of experts per token from a threshold) is varied on other inputs than
the real ones: a forward that failed on every one of them left the choice unchecked, and the router was accepted,
where a later choice left unchecked so is refused. An error of moe_replay's own code while it compared the runs that
hold such a choice was reported as the forward failing when the choices are held, and a refusal moe_replay made on
purpose there was reworded into that one: each is now raised as what it is.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_harden50 import _as_it_was, _hooks, _state

_D, _E, _K, _T = 8, 4, 2, 6


class _CountRouter(nn.Module):
    """A router that chooses, before its top-k, how many of its ``k`` slots each token keeps (from an allocator's
    scores by a threshold), the others weighed 0. ``only``: the one batch it runs on (else it raises, as a forward
    tied to its inputs' values does)."""

    def __init__(self, only: torch.Tensor | None) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.allocator = nn.Linear(_D, _K, bias=False)
        self.only = only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.only is not None and (x.shape != self.only.shape or not torch.equal(x, self.only)):
            raise ValueError("this router runs on its own batch only")
        k = (torch.sigmoid(self.allocator(x)) > 0.5).sum(-1).clamp(min=1)
        w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
        return w * (torch.arange(_K) < k.unsqueeze(-1)), idx


class _Model(nn.Module):
    def __init__(self, only: torch.Tensor | None) -> None:
        super().__init__()
        self.router = _CountRouter(only)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x)


def _made(restricted: bool) -> tuple[_Model, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _Model(x.clone() if restricted else None)
    ks = (torch.sigmoid(model.router.allocator(x)) > 0.5).sum(-1).clamp(min=1)
    assert len(set(ks.tolist())) > 1  # (the earlier choice keeps other numbers of slots for other tokens)
    return model, x


def _captured(model: nn.Module, x: torch.Tensor) -> Any:
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            return model(x)


@pytest.mark.reliability("silent replays")
def test_an_earlier_choice_that_no_other_input_could_vary_is_refused() -> None:
    """A forward that fails on every input other than its own left its choice before the decision unchecked, and the
    router was accepted: a replay forces the top-k and makes that choice again from the current scores. Refused now,
    by name, with the model as it was (a later choice left unchecked was refused so already)."""
    model, x = _made(restricted=True)
    assert torch.equal(model(x)[1], model(x)[1])  # (it runs on its own batch)
    with pytest.raises(ValueError, match="its own batch only"):
        model(x.roll(1, 0))
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "router 'router'" in message and "before its decision" in message and "could not be checked" in message
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
def test_the_same_earlier_choice_on_a_forward_that_runs_on_other_inputs_is_refused_as_such() -> None:
    """The check the unchecked choice stands in for: the same router, run on other inputs, is refused for what its
    earlier choice picks (not as unchecked)."""
    model, x = _made(restricted=False)
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "router 'router'" in message and "before its decision" in message
    assert "could not be checked" not in message and "what picks experts after it" in message
    _as_it_was(model, state, hooks)
