"""A remapping router's mode and cached tables.

A router whose ids pass through code after its decision that reads its module's ``training`` flag (a remap by mode)
keeps that flag among the settings its routes were captured under: captured in ``eval()`` and replayed in
``train()``, it is refused, naming the flag; jitter on its scores before the decision reads the flag too, and still
replays. One whose code after the decision calls a cached function (``functools.lru_cache``) has no setting the
routes can keep for the table it returns: its replay is refused, naming the function.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_evidence import D as _RD
from tests.test_review71 import E as _RE
from tests.test_review71 import _Model
from tests.test_review73 import _same_state, _state


class _JitterRouter(nn.Module):
    """A top-2 router that shifts its ids by one (a constant remap after its decision), with jitter on its logits in
    training, before its decision: inline (``helper=False``) or in a method of its own (``helper=True``)."""

    def __init__(self, helper: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(_RD, _RE, bias=False)
        self.helper = helper

    def _jitter(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training:
            logits = logits + 1e-3 * torch.randn_like(logits)
        return logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.helper:
            logits = self._jitter(logits)
        elif self.training:
            logits = logits + 1e-3 * torch.randn_like(logits)
        v, i = logits.softmax(-1).topk(2, dim=-1)
        return v / v.sum(-1, keepdim=True), (i + 1) % _RE


class _ModeRemapRouter(_JitterRouter):
    """As :class:`_JitterRouter`, its ids shifted once more in training, after its decision."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self.gate(x).softmax(-1).topk(2, dim=-1)
        return v / v.sum(-1, keepdim=True), (i + 1 + int(self.training)) % _RE


def _jittered(helper: bool, by_mode: bool = False) -> _Model:
    model = _Model()
    model.block.router = _ModeRemapRouter(helper) if by_mode else _JitterRouter(helper)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randn(6, _RD, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("helper", [False, True])
def test_jitter_before_a_remapping_routers_decision_replays_from_eval_into_train(helper: bool) -> None:
    """The flag read only before the decision (inline, or in a helper called before it): captured in eval, the
    routes replay in train the captured experts on the captured tokens, the gate changed so that a free forward
    runs others."""
    model = _jittered(helper)
    x = _tokens()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = sorted(model.block.ran[-1]), session.routes()
        model.train()
        with torch.no_grad():
            model.block.router.gate.weight.mul_(-1.0)
            model(x)
        assert sorted(model.block.ran[-1]) != captured, "the changed gate runs the same experts: tries nothing"
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


@pytest.mark.reliability("silent replays")
def test_a_remap_by_the_training_flag_after_the_decision_is_refused_naming_it() -> None:
    """Captured in eval, replayed in train: refused before any forward, naming the router and the flag, the model as
    it was; back in eval, the same routes replay the captured experts."""
    model = _jittered(helper=False, by_mode=True)
    x = _tokens()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = sorted(model.block.ran[-1]), session.routes()
        model.train()
        before = _state(model)
        with pytest.raises(mr.MoEReplayError, match=r"router 'block\.router'.*'training \(train\(\) or eval\(\)\)'"):
            with torch.no_grad(), session.replay(routes):
                model(x)
        assert _same_state(_state(model), before)
        model.eval()
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


_SHIFT = {"by": 1}


@functools.lru_cache(maxsize=8)
def _table(n: int) -> torch.Tensor:
    return (torch.arange(n) + _SHIFT["by"]) % n


class _CachedTableRouter(nn.Module):
    """A top-2 router whose ids pass through a table a cached function returns (``remap``), or that returns its
    top-k's indices as they are, the table only logged beside them."""

    def __init__(self, remap: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(_RD, _RE, bias=False)
        self.remap = remap
        self.size = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self.gate(x).softmax(-1).topk(2, dim=-1)
        if self.remap:
            i = _table(_RE)[i]
        return v / v.sum(-1, keepdim=True), i


@pytest.mark.reliability("silent replays")
def test_a_remap_through_a_cached_function_is_refused_naming_it() -> None:
    """The replay is refused before any forward, naming the router and the cached function; the model as it was."""
    model = _Model()
    model.block.router = _CachedTableRouter(remap=True)
    x = _tokens()
    _table.cache_clear()
    try:
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                model(x)
            routes = session.routes()
            _SHIFT["by"] = 2
            _table.cache_clear()
            before = _state(model)
            with pytest.raises(mr.MoEReplayError, match=r"router 'block\.router'.*cached function '_table'"):
                with torch.no_grad(), session.replay(routes):
                    model(x)
            assert _same_state(_state(model), before)
    finally:
        _SHIFT["by"] = 1
        _table.cache_clear()


@pytest.mark.reliability("false refusals")
def test_a_router_returning_its_indices_as_they_are_beside_a_cached_function_replays() -> None:
    """A router whose ids are its top-k's, in a module that holds a cached function: no setting, it replays the
    captured experts after its gate changes."""
    model = _Model()
    model.block.router = _CachedTableRouter(remap=False)
    x = _tokens()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = sorted(model.block.ran[-1]), session.routes()
        with torch.no_grad():
            model.block.router.gate.weight.mul_(-1.0)
            model(x)
        assert sorted(model.block.ran[-1]) != captured, "the changed gate runs the same experts: tries nothing"
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured
