"""Round 61's review: choices a router makes from a floating input of its own beside the hidden states (a second
tensor argument), before or after its decision, which a replay would make again from current values; and a
``Routes.indices`` written in place by a write no version counter sees (``.data``, numpy), its slices paired with
routers by their old slots."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_gaps56 import _kept_loss_case
from .test_harden50 import _as_it_was, _hooks, _state
from .test_losses import by_hand

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


@pytest.mark.reliability("silent replays")
def test_an_earlier_choice_that_only_a_second_input_could_vary_is_still_refused_as_unchecked() -> None:
    """A forward that fails on every hidden state but its own, with a second floating input it chooses nothing from:
    the runs that vary that input alone must not count as having checked the choice made from the hidden states
    (else it is accepted unchecked, as before choices were refused so). Refused as unchecked, the model as it was."""

    class _Restricted(_TwoInputRouter):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not torch.equal(x, own):
                raise ValueError("this router runs on its own batch only")
            return super().forward(x, y)

    torch.manual_seed(0)
    own, y = torch.randn(_T, _D), torch.randn(_T, _D)
    model = _Model("before", "x")
    model.router = _Restricted("before", "x")
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, own, y)
    message = str(info.value)
    assert "router 'router'" in message and "could not be checked" in message, message
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("through", [".data", "numpy", "copy_"])
def test_rows_of_a_routes_indices_stack_written_past_its_version_counter_are_not_paired_by_their_old_slots(
    through: str,
) -> None:
    """``routes.indices`` reordered in place after it was handed out (its routers flipped to the probabilities'
    order) through ``.data`` or numpy's view of it, which move no version counter: its slices were still named by
    the router each slot held, and paired with another router's probabilities, a wrong loss without a word. They
    are counted with the probabilities they are given beside (or refused), as after ``copy_``, which moves it."""
    routes, kept, _ = _kept_loss_case(3)
    names = list(kept.names)
    ind = routes.indices
    flipped = ind.flip(1).clone()
    if through == ".data":
        ind.data.copy_(flipped)
    elif through == "numpy":
        ind.numpy()[:] = flipped.numpy()
    else:
        ind.copy_(flipped)
    assert torch.equal(ind, flipped)
    want = sum(by_hand(kept[n][0], kept[n][1]) for n in names) / len(names)
    try:
        got = mr.load_balancing_loss(list(kept.scores)[::-1], list(ind.unbind(1))).item()
    except mr.MoEReplayError:
        return
    assert got == pytest.approx(want, abs=1e-5), "rows paired with another router's probabilities"


@pytest.mark.reliability("false refusals")
def test_slices_of_an_unwritten_routes_indices_stack_still_name_their_routers() -> None:
    """The check by values names each slice of a stack left as it was handed out: in the reversed order of the
    probabilities, they are paired by name to each router's own loss."""
    routes, kept, want = _kept_loss_case(3)
    rows = list(routes.indices.unbind(1))
    assert mr.load_balancing_loss(list(kept.scores)[::-1], rows).item() == pytest.approx(want, abs=1e-5)
