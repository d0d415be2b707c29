"""A drop by score in the MoE block, after its router returned, that reaches the threshold through a call the watch did
not follow (a ``relu`` or ``log`` of the weights, a cast to integers, an in-place shift, a ``heaviside``, ``!= 0`` of
shifted weights, ``.to(torch.bool)``, a ``cat``): each is a later choice by score the routes cannot carry, refused at
the first capture like a plain ``weights > t``. Blocks that only log such values (an entropy, a share over a threshold
of their ``sigmoid``), renormalise them (``F.normalize``), zero slots by the ids (``where``) or build a mask of their
shape (``ones_like``) before a dispatch mask at zero are not refused, and replay as by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot

D, E, K = 8, 4, 2
T = 0.3


class _Router(nn.Module):
    """Softmax scores of a bias-free Linear, their top-k ids and weights (``forced``: ids set by hand instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.forced: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(self.gate(tokens), dim=-1)
        weights, ids = torch.topk(scores, K, dim=-1)
        if self.forced is not None:
            ids = self.forced
            weights = scores.gather(1, ids)
        return ids, weights


#: masks of the slots kept, made from the weights the router returned (a drop by score: weights under ``T`` dropped)
_DROPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda ids, w: torch.relu(w - T) > 0,
    "log": lambda ids, w: w.log() > math.log(T),
    "integers": lambda ids, w: (w / T).long().bool(),
    "in-place": lambda ids, w: w.clone().sub_(T).relu_() != 0,
    "heaviside": lambda ids, w: torch.heaviside(w - T, torch.zeros(())).bool(),
    "to-bool": lambda ids, w: (w - T).clamp(min=0).to(torch.bool),
    "scattered": lambda ids, w: (torch.zeros(w.shape[0], E).scatter(1, ids, w) > T).gather(1, ids),
}
#: the same mask made from the weights by the ids alone, or a statistic of them kept aside (no later choice)
_KEEPS: dict[str, Callable[[torch.Tensor, torch.Tensor, list[float]], torch.Tensor]] = {
    "normalize": lambda ids, w, stats: F.normalize(w, p=1.0, dim=-1).bool(),
    "where-ids": lambda ids, w, stats: torch.where(ids >= 0, w, torch.zeros_like(w)).bool(),
    "nan-guard": lambda ids, w, stats: w.masked_fill(torch.isnan(w) | w.isinf(), 0.0).bool(),
    "combine-bool": lambda ids, w, stats: torch.zeros(w.shape[0], E).scatter(1, ids, w).bool().gather(1, ids),
    "statistics": lambda ids, w, stats: (
        stats.extend(
            [float(-(w * w.log()).sum(-1).mean()), float((torch.sigmoid(w) > 0.6).sum()), float(w.cumsum(-1).mean())]
        ),
        torch.ones_like(w, dtype=torch.bool),
    )[1],
}


class _Block(nn.Module):
    """Per expert, its (token, slot) pairs among the slots ``keep`` holds (a drop of ``_DROPS``, or of ``_KEEPS``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])
        self.stats: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        ids, weights = self.router(tokens)
        if self.how in _DROPS:
            keep = _DROPS[self.how](ids, weights)
        else:
            keep = _KEEPS[self.how](ids, weights, self.stats)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = ((ids == e) & keep).nonzero().unbind(1)
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Stack(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([_Block(how)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(3))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", list(_DROPS))
def test_a_drop_by_score_through_a_call_not_followed_before_is_refused(how: str) -> None:
    """Refused at the first capture as a later choice by score, naming the block; the model as it was."""
    model = _Stack(how).eval()
    x = _x()
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_Block\)"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert_untouched(model, before)


def test_the_drop_runs_other_experts_when_the_ids_are_forced() -> None:
    """The case tries something: with the captured ids forced by hand after the router changes, the block's experts
    run on other (token, slot) pairs than at the capture, for every drop (what a replay would have done silently)."""
    for how in _DROPS:
        model = _Stack(how).eval()
        router = model.layers[0].router
        ran: list[tuple[int, int]] = []
        hooks = [
            ex.register_forward_pre_hook(lambda m, a, e=e, ran=ran: ran.append((e, a[0].shape[0])))
            for e, ex in enumerate(model.layers[0].experts)
        ]
        with torch.no_grad():
            model(_x())
            captured = list(ran)
            router.forced = router(_x().reshape(-1, D))[0]
            router.gate.weight.mul_(-1.0)
            ran.clear()
            model(_x())
        for h in hooks:
            h.remove()
        assert ran != captured, how


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", list(_KEEPS))
def test_a_dispatch_mask_or_statistics_of_the_weights_replay_as_by_hand(how: str) -> None:
    """Not refused: a replay after the router changes gives the changed model's output with the captured ids forced."""
    model = _Stack(how).eval()
    x = _x()
    router = model.layers[0].router
    with torch.no_grad():
        captured = router(x.reshape(-1, D))[0]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        with torch.no_grad():
            router.gate.weight.mul_(-1.0)
        with torch.no_grad(), session.replay(routes):
            replayed = model(x)
    with torch.no_grad():
        free = model(x)
        router.forced = captured
        by_hand = model(x)
    torch.testing.assert_close(replayed, by_hand)
    assert not torch.allclose(free, by_hand), "the changed router picks the captured experts anyway: tries nothing"


class _Combined(nn.Module):
    """GShard's combine tensor by an ``einsum`` of the weights with the ids' one-hot; its slots under ``T`` dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        ids, weights = self.router(tokens)
        combine = torch.einsum("tk,tke->te", weights, F.one_hot(ids, E).to(weights.dtype))
        keep = combine > T
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok = keep[:, e].nonzero().squeeze(-1)
            out[tok] += expert(tokens[tok]) * combine[tok, e].unsqueeze(-1)
        return out.view_as(x)


@pytest.mark.reliability("silent replays")
def test_a_drop_by_score_on_an_einsum_combine_tensor_is_refused() -> None:
    """Refused at the first capture as a later choice by score, the model as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Combined().eval()
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="choice by score"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class _Count:
    """A running count kept in a slot (no ``__dict__``)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _Holder:
    """A plain object holding a slotted count, a few objects deep in what the forward is handed."""

    def __init__(self) -> None:
        self.inner = _Count()


class _Counting(nn.Module):
    """Top-k routing that adds its tokens to the counts it is handed, and scales its output by them (so a count a run
    left moved changes what the model returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])

    def forward(self, x: torch.Tensor, count: _Count, holder: _Holder) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = torch.topk(torch.softmax(self.gate(tokens), -1), K, -1)
        count.n += tokens.shape[0]
        holder.inner.n += 1
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = (ids == e).nonzero().unbind(1)
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x) / (count.n + holder.inner.n)


@pytest.mark.reliability("silent replays")
def test_slotted_counts_handed_to_a_forward_are_added_to_once_per_real_forward() -> None:
    """An object keeping its state in slots, handed to the forward (as an argument, or held by a plain object that
    is), is put back after each establishing run like one with a ``__dict__``: after a capture and a replay, each
    count moved as one plain forward moves it, and the captured output is the model's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Counting().eval()
    x = _x()
    count, holder = _Count(), _Holder()
    with torch.no_grad():
        plain = model(x, count, holder)
    moved = (count.n, holder.inner.n)
    with mr.attach(model) as session:
        count, holder = _Count(), _Holder()
        with torch.no_grad(), session.capture():
            captured = model(x, count, holder)
        assert (count.n, holder.inner.n) == moved
        routes = session.routes()
        count, holder = _Count(), _Holder()
        with torch.no_grad(), session.replay(routes):
            model(x, count, holder)
        assert (count.n, holder.inner.n) == moved
    torch.testing.assert_close(captured, plain)
