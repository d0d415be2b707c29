"""Later choices by score that escaped the watch on the values a router returns, and a remap of its ids by a table
it holds.

A block's capacity drop made from the router's weights by way of a copy (``buffer.copy_(w)``, ``w.new_tensor(w)``,
taken for calls that hold none of their values), of scores made whole and cast to integers (``(w * 10).round()
.long()``, taken for ids packed beside the weights), by the inverse indices of a ``torch.unique`` (their ranks),
or of a count per token of its slots over a threshold (``(weights > t).sum(-1)``, taken for a statistic kept aside)
replayed on other tokens than the capture ran, without a
word; each is refused now at the first capture, naming the block. Statistics kept aside (an expert's count over the
tokens, a copy of the weights logged into a buffer, ids the router packs as floats) are not. A router whose ids pass
through a table of integers it holds (``self.perm[ids]``: a placement of the experts), written in place between the
capture and the replay, ran other experts than the capture did without a word: the routes keep that table's values
now, and a replay under others is refused, naming it; a count of its calls it keeps in a buffer is its state, not a
setting.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D as _RD
from tests.test_review70 import _Router, _Stack
from tests.test_review71 import E as _RE
from tests.test_review71 import _Model
from tests.test_review73 import _same_state, _state

D, E, K = 8, 4, 2


def _keep(how: str, w: torch.Tensor, weights: torch.Tensor, tok: torch.Tensor, cap: int) -> torch.Tensor:
    """The positions among an expert's ``w`` (its tokens' weights) kept under its capacity, chosen by ``how``."""
    if how == "copy_":
        held = torch.empty_like(w)
        held.copy_(w)
        return held.topk(cap).indices
    if how == "new_tensor":
        return w.new_tensor(w).topk(cap).indices
    if how == "round":  # (scores made whole, then integers: they rank as the scores do)
        return (w * 10).round().long().topk(cap).indices
    if how == "bucket":  # (a bucket of the scores kept, compared as integers)
        return ((w * 4).floor().long() == 1).nonzero().squeeze(-1)[:cap]
    if how == "unique":  # (the inverse indices of the sorted distinct weights: their ranks)
        return torch.unique(w, sorted=True, return_inverse=True)[1].topk(cap).indices
    if how == "rows":  # (a tensor made again of the rows of a Python iteration over the weights)
        return torch.tensor([v for v in w]).topk(cap).indices
    if how == "count":  # (the tokens with most slots over a threshold first)
        return (weights > 0.3).sum(-1)[tok].topk(cap).indices
    assert how == "any"  # (the tokens with a slot over a threshold)
    return (weights > 0.3).any(-1)[tok].nonzero().squeeze(-1)[:cap]


class _Drop(nn.Module):
    """Per expert, its (token, slot) pairs; over a capacity, those kept chosen by a score made from the weights by
    ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = self.router(tokens)
        out = torch.zeros_like(tokens)
        cap = max(math.ceil(tokens.size(0) * K / E) - 1, 1)
        for e, expert in enumerate(self.experts):
            tok, slot = (ids == e).nonzero().unbind(1)
            if tok.numel() > cap:
                keep = _keep(self.how, weights[tok, slot], weights, tok, cap)
                keep = keep[keep < tok.numel()]
                tok, slot = tok[keep], slot[keep]
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


def _model(make: Any, how: str) -> _Stack:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _Stack(make(how)).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(3))


_HOWS = ["copy_", "new_tensor", "round", "bucket", "unique", "count", "any"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _HOWS)
def test_a_later_choice_through_a_copy_a_rounding_or_a_count_per_token_is_refused(how: str) -> None:
    """Refused at the first capture with the module that chose and the line it chose at; the model as it was."""
    model = _model(_Drop, how)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="choice by score") as info:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert "'layers.0' (_Drop)" in str(info.value), info.value
    assert "test_review79.py:" in str(info.value), info.value
    assert_untouched(model, before)


@pytest.mark.parametrize("how", [*_HOWS, "rows"])
def test_the_later_choices_run_other_tokens_when_the_ids_are_forced(how: str) -> None:
    """The cases try something: with the router's ids forced by hand after it changes, the block's experts run on
    other tokens than the choice by the captured scores did (the silent replay the refusal prevents)."""
    model = _model(_Drop, how)
    x = _x()
    block = model.layers[0]
    ran: list[list[float]] = []
    hooks = [ex.register_forward_pre_hook(lambda m, a: ran.append(sorted(a[0][:, 0].tolist()))) for ex in block.experts]
    with torch.no_grad():
        block.router.forced = block.router(x.reshape(-1, D))[-1]
        model(x)
        captured = list(ran)
        ran.clear()
        block.router.gate.weight.mul_(-1.0)
        model(x)
    for h in hooks:
        h.remove()
    assert captured != ran


@pytest.mark.reliability("silent replays")
def test_a_later_choice_by_a_tensor_made_again_of_the_weights_rows_is_refused() -> None:
    """Refused at the first capture with the module that chose; the model as it was."""
    model = _model(_Drop, "rows")
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_Drop\)"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class _Logged(nn.Module):
    """Dispatch by the router's ids (packed as floats beside its weights, where ``packed``), with statistics kept
    aside: a copy of the weights logged into a buffer, a tensor made of Python numbers by ``new_tensor``, each
    expert's count of slots over a threshold over the tokens, the mean share of slots over it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.packed = how == "packed"
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])
        self.register_buffer("last", torch.zeros(12, K))
        self.stats: dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = self.router(tokens)
        if self.packed:  # (the weights and the ids as floats, in one tensor, unpacked)
            both = torch.cat([weights, ids.float()], -1)
            weights, ids = both[:, :K], both[:, K:].long()
        self.last.copy_(weights.detach())
        self.stats = {
            "scale": weights.new_tensor([1.0, 2.0]).sum().item(),
            "over": (weights > 0.3).sum(0).tolist(),
            "share": (weights > 0.3).float().mean().item(),
        }
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", ["plain", "packed"])
def test_statistics_kept_aside_and_ids_packed_as_floats_replay_as_by_hand(how: str) -> None:
    """Not refused: the replay after the router changes gives the output of the changed model with the captured ids
    forced by hand."""
    model = _model(_Logged, how)
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        ids = model.layers[0].router(x.reshape(-1, D))[-1].detach()
        with torch.no_grad():
            model.layers[0].router.gate.weight.mul_(-1.0)
        ref = copy.deepcopy(model)
        with torch.no_grad(), session.replay(session.routes()):
            replayed = model(x)
    ref.layers[0].router.forced = ids
    with torch.no_grad():
        by_hand, free = ref(x), model(x)
    torch.testing.assert_close(replayed, by_hand)
    assert not torch.allclose(free, by_hand), "the changed router picks the captured experts anyway: tries nothing"


class _TableRemap(nn.Module):
    """The ids a router hands on, through a table of the expert each names (a placement of the experts), held as a
    buffer; ``count``: a count of its calls kept in a buffer too, its own state."""

    def __init__(self, count: bool = False) -> None:
        super().__init__()
        self.count = count
        self.register_buffer("perm", torch.tensor([1, 2, 3, 0]))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.count:
            self.calls += 1
        return self.perm[ids]


def _remapped(count: bool = False) -> _Model:
    model = _Model()
    model.block.router.remap = _TableRemap(count)
    return model


def _tokens() -> torch.Tensor:
    return torch.randn(6, _RD, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("silent replays")
def test_a_remap_by_a_table_written_in_place_between_capture_and_replay_is_refused_naming_it() -> None:
    """The table written in place after the capture block (a placement moved): the replay block is refused before any
    forward, naming the router and the table, the model as it was; set back, the same routes replay the captured
    experts on the captured tokens."""
    model = _remapped()
    x = _tokens()
    perm = model.block.router.remap.perm
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = sorted(model.block.ran[-1]), session.routes()
        was = perm.clone()
        perm.copy_(perm.roll(1))
        with torch.no_grad():
            model(x)
        assert sorted(model.block.ran[-1]) != captured, "the new table runs the same experts: the case tries nothing"
        before = _state(model)
        with pytest.raises(mr.MoEReplayError, match=r"router 'block\.router'.*remap\.perm.*captured"):
            with torch.no_grad(), session.replay(routes):
                model(x)
        assert _same_state(_state(model), before)
        perm.copy_(was)
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


@pytest.mark.reliability("false refusals")
def test_a_count_of_its_calls_a_remapping_router_keeps_in_a_buffer_is_no_setting() -> None:
    """The count moves with every forward, the replay's own too: routes captured before replay the captured experts
    on the captured tokens after more forwards."""
    model = _remapped(count=True)
    x = _tokens()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = sorted(model.block.ran[-1]), session.routes()
        with torch.no_grad():
            model(x)
            model.block.router.gate.weight.mul_(-3)
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured
    assert int(model.block.router.remap.calls) >= 3


#: a table of expert placements read through a cached function (filled on first use, cleared when it moves)
_PLACEMENT = {"shift": 1}


@functools.cache
def _placed(key: str) -> torch.Tensor:
    return torch.tensor([(e + _PLACEMENT["shift"]) % _RE for e in range(_RE)])


class _CachedRemap(nn.Module):
    """The ids through a table a cached function returns; ``training``: shifted once more in training."""

    def __init__(self, by_mode: bool) -> None:
        super().__init__()
        self.by_mode = by_mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.by_mode:
            return (ids + int(self.training)) % _RE
        return _placed("placement")[ids]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["cache", "mode"])
def test_a_remap_hidden_in_a_cache_or_the_training_flag_is_refused_or_exact(how: str) -> None:
    """The remap changed between the capture and the replay block: the replay runs the captured experts on the
    captured tokens, or is refused."""
    model = _Model()
    model.block.router.remap = _CachedRemap(by_mode=how == "mode")
    model.eval()
    x = _tokens()
    _placed.cache_clear()
    try:
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                model(x)
            captured, routes = sorted(model.block.ran[-1]), session.routes()
            if how == "cache":
                _PLACEMENT["shift"] = 2
                _placed.cache_clear()
            else:
                model.train()
            try:
                with torch.no_grad(), session.replay(routes):
                    model(x)
            except mr.MoEReplayError:
                return
            assert sorted(model.block.ran[-1]) == captured, "the replay ran other experts than the capture"
    finally:
        _PLACEMENT["shift"] = 1
        _placed.cache_clear()


class _SharpCut(nn.Module):
    """The router's weights renormalised, each slot kept only over a minimum weight (a real later choice by score);
    the experts run, on how many tokens, kept in ``ran``."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])
        self.ran: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = self.router(tokens)
        w = weights / weights.sum(-1, keepdim=True)
        keep = w > 0.3
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = ((ids == e) & keep).nonzero().unbind(1)
            self.ran.append((e, tok.numel()))
            out[tok] += expert(tokens[tok]) * w[tok, slot].unsqueeze(-1)
        return out.view_as(x)
