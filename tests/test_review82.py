"""A remapping router's mode and cached tables, rows of its weights made a tensor again, and a saturated gate.

A router whose ids pass through code after its decision that reads its module's ``training`` flag (a remap by mode)
keeps that flag among the settings its routes were captured under: captured in ``eval()`` and replayed in
``train()``, it is refused, naming the flag; jitter on its scores before the decision reads the flag too, and still
replays. One whose code after the decision calls a cached function (``functools.lru_cache``) has no setting the
routes can keep for the table it returns: its replay is refused, naming the function. A tensor made again of the
rows of a Python iteration over a router's weights (``torch.tensor([v for v in w])``) holds their values, so a
statistic of it is no choice; and weights a router returns from a ranking of its scores are scores even where a
saturated gate makes them whole, so a cut by weight after them is refused at the first capture.
"""

from __future__ import annotations

import functools

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
from tests.test_review79 import D, K, _SharpCut, _x


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


class _RowsLogged(nn.Module):
    """Dispatch by the router's ids, its weights' rows made a tensor again and summed into a statistic kept aside."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])
        self.total = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        weights, ids = self.router(tokens)
        self.total = torch.tensor([v for v in weights[:, 0]]).sum().item()
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


@pytest.mark.reliability("false refusals")
def test_a_statistic_of_the_weights_rows_made_a_tensor_again_is_no_choice() -> None:
    """Not refused: the replay after the gate changes runs the captured experts' count of tokens."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Stack(_RowsLogged()).eval()
    block = model.layers[0]
    ran: list[tuple[int, int]] = []
    for e, ex in enumerate(block.experts):
        ex.register_forward_pre_hook(lambda m, a, e=e: ran.append((e, a[0].shape[0])))
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, ran[:] = list(ran), []
        with torch.no_grad():
            block.router.gate.weight.mul_(-1.0)
            model(x)
        assert ran != captured, "the changed gate runs the same experts: tries nothing"
        ran.clear()
        with torch.no_grad(), session.replay(session.routes()):
            model(x)
    assert ran == captured


@pytest.mark.reliability("silent replays")
def test_a_cut_by_weight_of_a_gate_saturated_at_capture_is_refused_at_the_first_capture() -> None:
    """Captured with the gate's logits far apart (its weights exactly one and zero): the cut by a minimum weight
    after the router is a choice by score all the same, refused at the first capture naming the block; the model as
    it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Stack(_SharpCut()).eval()
    block = model.layers[0]
    x = _x()
    with torch.no_grad():
        block.router.gate.weight.mul_(1e5)
        weights = block.router(x.reshape(-1, D))[0]
        assert torch.equal(weights, weights.round()), "the gate does not saturate: the case tries nothing"
    assert weights.shape[-1] == K
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_SharpCut\)"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert_untouched(model, before)


@pytest.mark.reliability("false refusals")
def test_switch_transformers_jitter_read_before_its_argmax_replays_from_eval_into_train() -> None:
    """transformers' Switch router (its code not read completely: the flag found among its class's functions, read
    before the ``argmax`` only): captured in eval, the routes replay in train, jitter on, each layer keeping the
    tokens and experts the capture kept."""
    from tests.test_public_routers import HFSwitchSparseMLP, TwoLayers
    from tests.test_public_routers import _x as _switch_x

    model = TwoLayers(HFSwitchSparseMLP).eval()
    x = _switch_x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        used = [m.used.clone() for m in model.layers]
        routes = session.routes()
        model.train()
        with torch.no_grad(), session.replay(routes):
            model(x)
    assert all(torch.equal(m.used, u) for m, u in zip(model.layers, used, strict=True))
