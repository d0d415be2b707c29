"""Later choices made through arithmetic the watch did not follow, and combines it must not take for choices.

A threshold's mask cast to numbers and then scaled, shifted or added to another tensor of its shape keeps its order,
so a ranking of the result chooses the tokens the mask does: recorded and checked. A product of a router's values with
a weight or a table made in the forward (``weights @ M``, ``F.linear(weights, W)``) holds their scores however wide it
is, so a ranking of it is a later choice, refused; a product with the experts' outputs (a ``bmm`` or ``einsum``
combine) is none, and a threshold on what it returns (a denoising ``masked_fill``) replays as by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_review67 import D, E, _Block, _experts_seen
from tests.test_review70 import E as E_WIDE
from tests.test_review70 import K, _Router, _Stack, _x


def _pick(scores: torch.Tensor, how: str) -> torch.Tensor:
    """The tokens of one sequence whose score is over 0, told by a ranking of the threshold's mask cast to numbers
    and moved by arithmetic that keeps its order: ``how`` names it."""
    keep = scores > 0
    moved = {
        "shifted": lambda: keep.long() + 3,
        "negated": lambda: -keep.int(),
        "tie-broken": lambda: keep.long() * 4 + torch.arange(keep.shape[0]) % 3,
    }[how]()
    ascending = how == "negated"
    order = moved.argsort(descending=not ascending, stable=True)
    return order[: int(keep.sum())].sort().values


class _Threshold(nn.Module):
    """Each sequence's tokens whose own score is over 0 go through the block, told by ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.score = nn.Linear(D, 1)
            self.block = _Block()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        scores = self.score(x).squeeze(-1)
        for i in range(x.shape[0]):
            idx = _pick(scores[i], self.how)
            if idx.numel():
                out[i, idx] = x[i, idx] + self.block(x[i, idx].unsqueeze(0))[0]
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["shifted", "negated", "tie-broken"])
def test_a_threshold_told_by_ranking_its_mask_moved_by_arithmetic_is_checked(how: str) -> None:
    """Once silent: the mask was followed through casts only, so a ranking of it cast to integers, then shifted,
    negated or scaled and added to another tensor, chose tokens no record held. Now a replay after the block's gate
    moved forces the recorded experts, and one where other tokens pass (as many in each sequence) is refused."""
    model = _Threshold(how).eval()
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        recorded = torch.bincount(routes.layer(routes.names[0]).reshape(-1), minlength=E).tolist()
        with torch.no_grad():
            model.block.gate.weight.mul_(-1.0)
        with session.replay(routes), torch.no_grad(), _experts_seen(model.block) as used:
            model(x)
        assert used == recorded
        with torch.no_grad():
            before = model.score(x).squeeze(-1) > 0
        g = torch.Generator().manual_seed(5)
        for _ in range(500):
            with torch.no_grad():
                model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))
                model.score.bias.zero_()
                after = model.score(x).squeeze(-1) > 0
            if torch.equal(after.sum(1), before.sum(1)) and not torch.equal(after, before):
                break
        else:
            raise AssertionError("no scores found that let other tokens pass, as many")
        with pytest.raises(mr.TokenMismatchError, match="other tokens"):
            with session.replay(routes), torch.no_grad():
                model(x)


class _Wide(nn.Module):
    """Per expert, its (token, slot) pairs; over a capacity, those kept chosen by ranking a product of the weights
    into as many columns as the hidden states have: with a learned table (``table``), through ``F.linear``
    (``linear``); ``bmm``, ``einsum`` and ``soft``: no capacity, the experts' outputs combined by a product with the
    weights (``soft``: the experts fed slots, the tokens mixed by a product with them), then denoised by a threshold on
    the combine (no choice by score)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E_WIDE)])
        self.table = nn.Parameter(torch.rand(K, D))
        self.back = nn.Linear(K, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = self.router(tokens)
        if self.how == "soft":  # (each expert fed one slot, the tokens mixed by its weights; the slots mixed back)
            table = torch.zeros(tokens.size(0), E_WIDE).scatter(1, ids, weights)
            slots = table.t() @ tokens
            outs = torch.stack([expert(slots[e]) for e, expert in enumerate(self.experts)])
            out = table @ outs
            return out.masked_fill(out.abs() < 1e-6, 0.0).view_as(x)
        if self.how in ("bmm", "einsum"):
            outs = torch.stack([expert(tokens) for expert in self.experts], 1)
            picked = outs.gather(1, ids.unsqueeze(-1).expand(-1, -1, D))
            if self.how == "bmm":
                out = torch.bmm(weights.unsqueeze(1), picked).squeeze(1)
            else:
                out = torch.einsum("tk,tkd->td", weights, picked)
            return out.masked_fill(out.abs() < 1e-6, 0.0).view_as(x)
        out = torch.zeros_like(tokens)
        cap = max(math.ceil(tokens.size(0) * K / E_WIDE) - 1, 1)
        wide = weights @ self.table if self.how == "table" else F.linear(weights, self.back.weight)
        for e, expert in enumerate(self.experts):
            tok, slot = (ids == e).nonzero().unbind(1)
            if tok.numel() > cap:
                keep = wide[tok].sum(-1).topk(cap).indices
                tok, slot = tok[keep], slot[keep]
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


def _wide(how: str) -> _Stack:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _Stack(_Wide(how)).eval()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["table", "linear"])
def test_a_later_choice_by_a_product_with_a_learned_table_as_wide_as_the_hidden_states_is_refused(how: str) -> None:
    """Once silent: a product of the weights with a weight of the model into the hidden states' width was taken for a
    combine. Refused at the first capture with the module that chose; the model as it was."""
    model = _wide(how)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_Wide\)"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", ["bmm", "einsum", "soft"])
def test_a_combine_by_a_product_with_the_experts_outputs_then_denoised_replays(how: str) -> None:
    """A product of the weights with the experts' outputs is a combine, and one with the hidden states a dispatch (each
    expert fed one slot of them, mixed by its weights: ``soft``), neither followed: a threshold on what the combine
    returns chooses nothing. The replay after the router changes gives the changed model's output with the captured ids
    forced by hand."""
    model = _wide(how)
    x = _x()
    router = model.layers[0].router
    with torch.no_grad():
        captured = router(x.reshape(-1, D))[-1]
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
