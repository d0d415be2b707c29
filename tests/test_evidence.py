"""Decisions established by effect: router code that defeats a signature-based guess.

Every case is a small MoE of our own. Which experts a token really went to is observed
independently of moe_replay, by hooks on the experts that match the rows they receive to the
block's input rows; capture must record exactly those experts, and replay must make the
experts receive exactly the forced tokens, or moe_replay must refuse with a message that names
the call and the fix.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot

E, D, T = 8, 16, 24


class Experts(nn.ModuleList):
    def __init__(self, n: int = E) -> None:
        super().__init__(nn.Linear(D, D) for _ in range(n))


def dispatch(experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
    return out


# ----------------------------------------------------------------------- router code under test
class LoggingTopKBlock(nn.Module):
    """Case 1: a top-k of the detached logits for a confidence metric, then the real top-k."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.top_k = 2
        self.confidence: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        self.confidence = torch.topk(logits.detach(), self.top_k, dim=-1).values.mean()
        w, idx = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return dispatch(self.experts, x, idx, w)


class LoggingInRouter(nn.Module):
    """Case 1 in a router module: a logged ``max`` and a logged ``topk``, then the decision."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k, self.num_experts = 2, E
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        self.stats["argmax"] = logits.max(dim=-1).indices
        self.stats["top"] = logits.topk(self.top_k, dim=-1).indices
        probs = logits.softmax(-1)
        w, idx = torch.topk(probs + 0.3 * torch.linspace(0, 1, E), self.top_k, dim=-1)
        return probs.gather(-1, idx), idx


class StableSoftmaxRouter(nn.Module):
    """Case 2: ``logits - max`` for a stable softmax, then ``argmax`` (k=1) or ``topk`` (k=2) of biased probs."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.register_buffer("bias", torch.linspace(-0.2, 0.2, E))
        self.top_k, self.num_experts = k, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        z = (logits - logits.max(-1, keepdim=True).values).exp()
        probs = z / z.sum(-1, keepdim=True)
        if self.top_k == 1:
            idx = torch.argmax(probs + self.bias, dim=-1, keepdim=True)
        else:
            idx = torch.topk(probs + self.bias, self.top_k, dim=-1).indices
        return probs.gather(-1, idx), idx


class SuccessiveTop1Router(nn.Module):
    """Case 5: a top-2 made of two ``topk(k=1)`` calls, the second on masked scores; no k attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        w1, i1 = probs.topk(1, dim=-1)
        masked = probs.masked_fill(F.one_hot(i1[:, 0], E).bool(), float("-inf"))
        _, i2 = masked.topk(1, dim=-1)
        idx = torch.cat([i1, i2], dim=-1)
        return probs.gather(-1, idx), idx


class RenamedKRouter(nn.Module):
    """Case 6: k under a name no discovery rule knows."""

    def __init__(self, attr: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        setattr(self, attr, 2)
        self.attr = attr

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        w, idx = probs.topk(getattr(self, self.attr), dim=-1)
        return w / w.sum(-1, keepdim=True), idx


class FlatWeightRouter(nn.Module):
    """Case 7: the gate weight kept flat (sharding) and viewed as [E, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E * D))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (x @ self.weight.view(E, D).T).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return w, idx


class TransposedWeightRouter(nn.Module):
    """Case 7: the gate weight stored [D, E], used as ``x @ w``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, E))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (x @ self.weight).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return w, idx


class GroupLimitedRouter(nn.Module):
    """Case 8: DeepSeek-style group-limited greedy with ``n_group == top_k``."""

    def __init__(self, n_group: int = 2, topk_group: int = 1, top_k: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.n_group, self.topk_group, self.top_k, self.num_experts = n_group, topk_group, top_k, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x, self.weight))
        grouped = scores.view(-1, self.n_group, E // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        group_idx = torch.topk(group_scores, self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)
        keep = mask.unsqueeze(-1).expand_as(grouped).reshape(scores.shape)
        idx = torch.topk(scores.masked_fill(keep == 0, 0.0), self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


class RouterBlock(nn.Module):
    """An MoE block around a router module that returns ``(weights, indices)``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return dispatch(self.experts, x, idx, w)


class TwoLayers(nn.Module):
    """Two residual MoE layers, so that routes span several routers."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([make(), make()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------- independent observation
class ExpertSpy:
    """Which tokens each expert of each block received, read from the experts' own inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), Experts)]
        self.handles = []
        self.inputs: dict[int, torch.Tensor] = {}
        self.used: dict[int, torch.Tensor] = {}
        for b, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._block_input(b), with_kwargs=True))
            for e, expert in enumerate(block.experts):
                self.handles.append(expert.register_forward_pre_hook(self._expert_input(b, e)))

    def _block_input(self, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            self.inputs[b] = x.detach().clone()
            self.used[b] = torch.zeros(x.shape[0], E, dtype=torch.bool)

        return hook

    def _expert_input(self, b: int, e: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            rows = args[0].detach()
            match = (rows[:, None, :] == self.inputs[b][None, :, :]).all(-1)  # [received, tokens]
            self.used[b][match.any(0), e] = True

        return hook

    def experts_of(self, b: int) -> torch.Tensor:
        """``[tokens, E]`` boolean: which experts each token of block ``b`` went to in the last forward."""
        return self.used[b].clone()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def as_sets(rows: torch.Tensor) -> torch.Tensor:
    """``[tokens, k]`` indices as a ``[tokens, E]`` boolean."""
    return torch.zeros(rows.shape[0], E, dtype=torch.bool).scatter(1, rows.long(), True)


def perturb(model: nn.Module, scale: float = 3.0) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" not in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def assert_capture_and_replay_are_exact(
    model: nn.Module, *, dtype: torch.dtype = torch.float32, **attach: object
) -> mr.Session:
    """Capture records the experts used; after the routers change, replay makes the experts receive the
    recorded tokens, and free routing would not have. ``dtype``: of the model and its input."""
    model.to(dtype)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    spy = ExpertSpy(model)
    try:
        with mr.attach(model, **attach) as session:
            with torch.no_grad(), session.capture():
                captured = model(x)  # the first forward also establishes each decision (probe runs)
            routes = session.routes()
            with torch.no_grad():
                assert torch.equal(model(x), captured)  # a plain forward, observed alone
            for b, name in enumerate(session.names):
                assert torch.equal(as_sets(routes.layer(name)), spy.experts_of(b)), f"capture of {name}"
            perturb(model)
            with torch.no_grad():
                model(x)
            free = [spy.experts_of(b) for b in range(len(session.names))]
            assert any(not torch.equal(f, as_sets(routes.layer(n))) for f, n in zip(free, session.names, strict=True))
            with torch.no_grad(), session.replay(routes), session.capture():
                model(x)
            for b, name in enumerate(session.names):
                assert torch.equal(spy.experts_of(b), as_sets(routes.layer(name))), f"replay of {name}"
            assert session.routes().equal(routes)
            report = session.verify(x)
            assert set(report.evidence) == set(session.names)
        return session
    finally:
        spy.remove()


# ----------------------------------------------------------------------- cases 1, 2, 5, 6, 7, 8
CASES: dict[str, Callable[[], nn.Module]] = {
    "1-logging-topk-in-block": LoggingTopKBlock,
    "1-logging-max-and-topk-in-router": lambda: RouterBlock(LoggingInRouter()),
    "2-stable-softmax-argmax": lambda: RouterBlock(StableSoftmaxRouter(1)),
    "2-stable-softmax-topk2": lambda: RouterBlock(StableSoftmaxRouter(2)),
    "5-successive-topk1": lambda: RouterBlock(SuccessiveTop1Router()),
    "6-k-as-top_n": lambda: RouterBlock(RenamedKRouter("top_n")),
    "6-k-as-n_pick": lambda: RouterBlock(RenamedKRouter("n_pick")),
    "6-k-as-num_selected": lambda: RouterBlock(RenamedKRouter("num_selected")),
    "7-flat-weight": lambda: RouterBlock(FlatWeightRouter()),
    "7-transposed-weight": lambda: RouterBlock(TransposedWeightRouter()),
    "8-groups-equal-k": lambda: RouterBlock(GroupLimitedRouter(n_group=2, topk_group=1, top_k=2)),
    "8-groups-equal-k-two-kept": lambda: RouterBlock(GroupLimitedRouter(n_group=2, topk_group=2, top_k=2)),
    "8-four-groups": lambda: RouterBlock(GroupLimitedRouter(n_group=4, topk_group=2, top_k=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_configuration_capture_and_replay_are_exact(case: str) -> None:
    model = TwoLayers(CASES[case])
    session = assert_capture_and_replay_are_exact(model)
    expected_k = 1 if case == "2-stable-softmax-argmax" else 2
    assert [s.top_k for s in session.sites] == [expected_k, expected_k]
    assert [s.num_experts for s in session.sites] == [E, E]


def test_verify_names_the_deciding_call_and_the_ignored_ones() -> None:
    model = TwoLayers(lambda: RouterBlock(LoggingInRouter()))
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        report = session.verify(x)
    ev = report.evidence["layers.0.router"]
    assert [c.family for c in ev.calls] == ["max", "topk", "topk"]
    assert ev.decision == (2,)
    assert [c.effect for c in ev.calls[:2]] == [False, False]
    text = str(report)
    assert "decides with #2 topk(k=2) over 8 at test_evidence.py" in text
    assert "ignores #0 max() over 8" in text and "its indices do not reach the output" in text


def test_successive_top1_slots_are_one_decision_in_call_order() -> None:
    model = TwoLayers(lambda: RouterBlock(SuccessiveTop1Router()))
    with mr.attach(model) as session:
        report = session.verify(torch.randn(T, D))
    assert report.evidence["layers.0.router"].decision == (0, 1)
    assert "2 successive calls" in report.evidence["layers.0.router"].reason


def test_group_selection_is_ignored_and_named_as_shaping_the_scores() -> None:
    model = TwoLayers(lambda: RouterBlock(GroupLimitedRouter(n_group=4, topk_group=2)))
    with mr.attach(model) as session:
        ev = session.verify(torch.randn(T, D)).evidence["layers.0.router"]
    assert ev.decision == (2,)
    assert ev.calls[1].effect is True  # the group top-k matters, but only through the scores
    assert "shapes the scores only" in ev.describe()


# ----------------------------------------------------------------------- case 3: parametrized weights
class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 1.5 * w


class LinearGateBlock(nn.Module):
    """Mixtral-style: a bare ``Linear`` gate, the top-k in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
def test_parametrized_gate_weight_is_found_and_forced(how: str) -> None:
    model = TwoLayers(LinearGateBlock)
    gate = model.layers[1].gate
    if how == "parametrize":
        parametrize.register_parametrization(gate, "weight", _Scale())
    else:
        torch.nn.utils.parametrizations.weight_norm(gate)
    assert [s.name for s in mr.find_routers(model)] == ["layers.0.gate", "layers.1.gate"]
    assert_capture_and_replay_are_exact(model)


# ----------------------------------------------------------------------- orphans and nothing ran
class _Scorer(nn.Module):
    """A router no naming rule recognises."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_w = nn.Parameter(torch.randn(E, D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = F.linear(x, self.proj_w).softmax(-1).topk(2, dim=-1)
        return w, idx


class ScorerBlock(RouterBlock):
    """The router held under a name no rule knows either."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        del self.router
        self.pick = _Scorer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.pick(x)
        return dispatch(self.experts, x, idx, w)


def test_a_decision_outside_every_attached_router_is_an_error_naming_it() -> None:
    model = TwoLayers(lambda: RouterBlock(RenamedKRouter("top_n")))
    model.layers[1] = ScorerBlock()
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        assert session.names == ("layers.0.router",)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'layers\.1\.pick' \(_Scorer\): topk over 8 at test_ev"):
            session.verify(x)
        with pytest.raises(mr.UnsupportedRouterError, match="outside every attached router"), session.capture():
            model(x)
    # named, it is attached and exact; excluded, it is left native on purpose
    assert_capture_and_replay_are_exact(model, include=["layers.0.router", "layers.1.pick"])
    with mr.attach(model, exclude="layers.1*") as session:
        with session.capture():
            model(x)
        assert session.routes().names == ("layers.0.router",)


class _AuxRouter(nn.Module):
    """A router module that takes a top-k for its auxiliary loss and returns the logits with it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = logits.softmax(-1)
        load = F.one_hot(torch.topk(probs, self.top_k, dim=-1).indices, E).float().sum(1).mean(0)
        return logits, E * (load * probs.mean(0)).sum()


class DispatchOutside(RouterBlock):
    """The block around it dispatches with a top-k of its own over the router's logits."""

    def __init__(self) -> None:
        super().__init__(_AuxRouter())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, aux = self.router(x)
        w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
        return dispatch(self.experts, x, idx, w) + 0 * aux


@pytest.mark.reliability("silent replays")
def test_a_block_that_dispatches_outside_the_router_it_holds_is_an_error_naming_it() -> None:
    """A block dispatching with its own top-k beside its router's aux-loss top-k: refused; attached, exact."""
    model = TwoLayers(DispatchOutside)
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        assert session.names == ("layers.0.router", "layers.1.router")
        with pytest.raises(
            mr.UnsupportedRouterError,
            match=r"'layers\.0' \(DispatchOutside\): topk over 8 .*"
            r"holds the attached router 'layers\.0\.router'.*include=\['layers\.0'\]",
        ):
            session.verify(x)
        with pytest.raises(mr.UnsupportedRouterError, match="outside every attached router"), session.capture():
            model(x)
    assert_capture_and_replay_are_exact(model, include=["layers.0", "layers.1"])  # as the hint says


class FlaggedBias(nn.Module):
    """Two top-k calls of one form every forward; a flag on a config object picks which one dispatches."""

    def __init__(self, cfg: types.SimpleNamespace) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.register_buffer("bias", torch.randn(E))
        self.cfg, self.top_k = cfg, 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.linear(x, self.weight).sigmoid()
        plain, biased = self.pick(s), self.pick(s + self.bias)
        idx = biased if self.cfg.use_bias else plain
        return s.gather(-1, idx), idx

    def pick(self, s: torch.Tensor) -> torch.Tensor:
        return torch.topk(s, 2, dim=-1).indices


class FlaggedBiasByMethod(FlaggedBias):
    def pick(self, s: torch.Tensor) -> torch.Tensor:
        return s.topk(2, dim=-1).indices  # a Tensor method: the router keeps the mode


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("method", [False, True], ids=["lean", "mode"])
def test_a_flag_that_switches_which_call_dispatches_inside_a_block_is_captured_as_dispatched(method: bool) -> None:
    """A config flag switched inside a block, which of two same-form top-k calls dispatches: a router with such twin
    calls has its decision checked by its effect at every forward, so the forward after the switch is recorded, and
    replayed, on the call that now dispatches (once refused there, as the indices it returned moved; switched between
    blocks, the next block establishes the decision again: tests/test_intercept.py)."""
    cfg = types.SimpleNamespace(use_bias=False)
    router = FlaggedBiasByMethod if method else FlaggedBias
    model = TwoLayers(lambda: RouterBlock(router(cfg)))
    x = torch.randn(T, D)
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(x)
                model(x)
            plain = [spy.experts_of(b) for b in range(len(session.names))]
            with session.capture():
                cfg.use_bias = True  # the bias steers routing from now on
                model(x)
            routes = session.routes()
            assert any(not torch.equal(p, spy.experts_of(b)) for b, p in enumerate(plain))  # (dispatch moved)
            for b, name in enumerate(session.names):
                assert torch.equal(as_sets(routes.layer(name)), spy.experts_of(b))
            perturb(model)
            with session.replay(routes):
                model(x)
            for b, name in enumerate(session.names):
                assert torch.equal(spy.experts_of(b), as_sets(routes.layer(name)))
    finally:
        spy.remove()


def test_a_capture_in_which_no_router_ran_is_an_error() -> None:
    model = TwoLayers(LinearGateBlock)
    rebuilt = TwoLayers(LinearGateBlock)
    with mr.attach(model) as session:
        with session.capture():
            rebuilt(torch.randn(T, D))  # the model was rebuilt after attach
        with pytest.raises(mr.UnsupportedRouterError, match="recorded nothing: none of the 2 routers"):
            session.routes()


# ----------------------------------------------------------------------- refusals
class SoftMoE(nn.Module):
    """Case 9: every expert weighted, no choice."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.num_experts = E

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(x).softmax(-1)
        return sum(w[:, e, None] * expert(x) for e, expert in enumerate(self.experts))


def test_soft_routing_is_refused_as_such() -> None:
    model = TwoLayers(SoftMoE)
    with pytest.raises(mr.MoEReplayError, match="soft routing"):
        mr.attach(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


class UnusedDecisionRouter(nn.Module):
    """A top-k whose indices are dropped: the block mixes every expert (soft routing in disguise); with ``stable``,
    the logits less their ``max`` first (a hand-written stable softmax: that call's values cancel)."""

    def __init__(self, stable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k, self.num_experts, self.stable = 2, E, stable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.stable:
            logits = logits - logits.max(-1, keepdim=True).values
        probs = logits.softmax(-1)
        probs.topk(2, dim=-1)
        return probs, torch.arange(E).expand(x.shape[0], E)


@pytest.mark.parametrize("stable", [False, True], ids=["softmax", "stable-softmax"])
def test_no_call_that_matters_is_refused_listing_the_calls(stable: bool) -> None:
    model = TwoLayers(lambda: RouterBlock(UnusedDecisionRouter(stable)))
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError) as err:
        session.verify(torch.randn(T, D))
    msg = str(err.value)
    assert "no decision-like call in its forward changes the output" in msg
    assert f"#{int(stable)} topk(k=2) over 8 at test_evidence.py" in msg and "Adapter(..., call=N)" in msg
    assert "reads the values" not in msg  # (a stable softmax's maximum is no threshold)


class ThresholdRouter(UnusedDecisionRouter):
    """The experts kept where the probabilities reach the top-k's last value, every expert dispatched with the
    kept ones' renormalised probabilities (0 for the others): chosen by a threshold, the indices unused."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        kept = probs * (probs >= probs.topk(self.top_k, dim=-1).values[..., -1:])
        return kept / kept.sum(-1, keepdim=True), torch.arange(E).expand(x.shape[0], E)


def test_experts_chosen_by_a_threshold_from_a_top_ks_values_are_refused_naming_the_threshold() -> None:
    """Once refused as though no call mattered: the top-k's values reach the output (as a threshold), its indices
    do not. Refused naming the call whose values choose and the fix (choose by its indices), the model left as it
    was."""
    model = TwoLayers(lambda: RouterBlock(ThresholdRouter()))
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError) as err:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(torch.randn(T, D))
    msg = str(err.value)
    assert "reads the values of #0 topk(k=2) over 8 at test_evidence.py" in msg
    assert "but the indices of no decision-like call" in msg and "a threshold" in msg
    assert "Choose the experts by the call's indices" in msg
    assert "no decision-like call in its forward changes the output" not in msg
    assert_untouched(model, before)


def test_declared_top_k_that_the_decision_contradicts_is_refused() -> None:
    model = TwoLayers(lambda: RouterBlock(RenamedKRouter("top_n")))
    with mr.attach(model, top_k=3) as session, pytest.raises(mr.UnsupportedRouterError) as err:
        session.verify(torch.randn(T, D))
    assert "top_k=3 was given, but its decision (#0 topk(k=2) over 8" in str(err.value)
    assert "Pass top_k=2" in str(err.value)


class MulMaskedGroupRouter(GroupLimitedRouter):
    """Group-limited routing whose group mask is a product: a forced expert outside it would weigh 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x, self.weight))
        grouped = scores.view(-1, self.n_group, E // self.n_group)
        group_idx = torch.topk(grouped.amax(-1), self.topk_group, dim=-1).indices
        mask = torch.zeros(x.shape[0], self.n_group).scatter(1, group_idx, 1.0)
        masked = scores * mask.repeat_interleave(E // self.n_group, dim=1)
        w, idx = torch.topk(masked, self.top_k, dim=-1)
        return w, idx


def test_group_mask_that_cannot_be_undone_is_refused() -> None:
    model = TwoLayers(lambda: RouterBlock(MulMaskedGroupRouter(n_group=4, topk_group=1)))
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match="cannot undo"):
        session.verify(torch.randn(T, D))


class ViewMaskedGroupRouter(GroupLimitedRouter):
    """torchtitan node-limited / DeepSeek-V3 reference ``Gate``: the group mask applied to a 3-D view, in
    place (``gathered``: the weights read from the unmasked scores at the chosen experts, else from the
    masked ones, where a forced expert outside the groups would weigh 0)."""

    def __init__(self, gathered: bool) -> None:
        super().__init__(n_group=4, topk_group=2)
        self.gathered = gathered

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x, self.weight))
        grouped = (scores + 0).view(x.shape[0], self.n_group, -1)
        group_idx = torch.topk(grouped.amax(-1), self.topk_group, dim=-1).indices
        drop = torch.ones(x.shape[0], self.n_group, dtype=torch.bool).scatter(1, group_idx, False)
        masked = grouped.masked_fill_(drop.unsqueeze(-1), 0.0).flatten(1)
        idx = torch.topk(masked, self.top_k, dim=-1).indices
        w = (scores if self.gathered else masked).gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


def test_a_mask_on_a_view_is_harmless_where_the_weights_are_read_from_unmasked_scores() -> None:
    """Once wrongly refused: a mask moe_replay cannot read through (on a view, in place) cannot reach the
    output when the weights are gathered from the unmasked scores; where they come from the masked ones,
    refused."""
    assert_capture_and_replay_are_exact(TwoLayers(lambda: RouterBlock(ViewMaskedGroupRouter(gathered=True))))
    model = TwoLayers(lambda: RouterBlock(ViewMaskedGroupRouter(gathered=False)))
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match="cannot undo"):
        session.verify(torch.randn(T, D))


class ThresholdGroupRouter(GroupLimitedRouter):
    """Groups kept by a threshold taken from a top-k's values; the mask applied by ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__(n_group=4, topk_group=2)
        self.how = how

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x, self.weight))
        group_scores = scores.view(-1, self.n_group, E // self.n_group).amax(-1)
        threshold = torch.topk(group_scores, self.topk_group, dim=-1).values[:, -1:]
        keep = (group_scores >= threshold).repeat_interleave(E // self.n_group, dim=1)
        masked = scores * keep if self.how == "product" else scores.masked_fill(~keep, 0.0)
        w, idx = torch.topk(masked, self.top_k, dim=-1)
        return w, idx


class RescaledRouter(GroupLimitedRouter):
    """Scores divided by each row's best and shifted by it (a hand-written stable softmax): not a mask."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        e = (logits - torch.max(logits, dim=-1, keepdim=True).values).exp()
        probs = e / e.sum(-1, keepdim=True)
        scores = probs / torch.max(probs, dim=-1, keepdim=True).values
        w, idx = torch.topk(scores, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
def test_a_group_mask_built_from_a_top_ks_values_is_refused_unless_it_can_be_undone() -> None:
    """Groups kept by a threshold from a top-k's values, masked by a product: refused; by masked_fill, exact."""
    model = TwoLayers(lambda: RouterBlock(ThresholdGroupRouter("product")))
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match="values of an earlier call"):
        session.verify(torch.randn(T, D))
    assert_capture_and_replay_are_exact(TwoLayers(lambda: RouterBlock(ThresholdGroupRouter("masked_fill"))))


class BestShareMaskRouter(GroupLimitedRouter):
    """The probabilities kept where they reach a share of the row's best (a ``max``'s values), by ``how``: a
    product with the comparison, or a ``relu`` of the difference; or (``softmax``) the logits less their best set to
    0 under -1, then a softmax (a mask that moves every probability of a row); the top-k of what is kept."""

    def __init__(self, how: str) -> None:
        super().__init__(n_group=4, topk_group=2)
        self.how = how

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.how == "softmax":  # the logits far below the best set to 0, before the softmax
            shifted = logits - logits.max(-1, keepdim=True).values
            kept = (shifted * (shifted > -1.0)).softmax(-1)
        else:
            probs = (logits * D**-0.5).softmax(-1)  # (not peaked: several experts kept)
            best = probs.max(-1, keepdim=True).values
            kept = probs * (probs >= 0.5 * best) if self.how == "product" else F.relu(probs - 0.3 * best)
        w, idx = torch.topk(kept, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"]
)
@pytest.mark.parametrize("router", ["threshold-group", "best-share", "best-relu", "before-softmax"])
def test_a_mask_made_from_an_earlier_calls_values_stays_refused(router: str, dtype: torch.dtype) -> None:
    """The rounding that a stable softmax's shift or a rescale leaves (several percent in bfloat16) is not taken
    for a mask: a mask moves a score to 0 and leaves the others, no shift or scale of the row. Masks made from a
    top-k's or a max's values stay refused in bfloat16 and float16 (where the values moved to probe them are kept
    within what an exponential holds), the model left as it was. Once silent: a mask before a
    softmax (which moves every probability of a row, as a rescaling does) was taken for a rescaling; a row changed
    in full is now a mask unless it is the other shifted or scaled."""
    make = {
        "threshold-group": lambda: RouterBlock(ThresholdGroupRouter("product")),
        "best-share": lambda: RouterBlock(BestShareMaskRouter("product")),
        "best-relu": lambda: RouterBlock(BestShareMaskRouter("relu")),
        "before-softmax": lambda: RouterBlock(BestShareMaskRouter("softmax")),
    }[router]
    model = TwoLayers(make).to(dtype)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="values of an earlier call .* select which scores"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(dtype))
    assert_untouched(model, before)


class MinimumWeightRouter(GroupLimitedRouter):
    """A top-2 whose second expert is dropped when its weight is under half the first's."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        keep = w >= 0.5 * w[:, :1]
        return w * keep, idx.masked_fill(~keep, -1)  # (-1: no expert)


class TopPRouter(GroupLimitedRouter):
    """A top-4 cut to the experts that hold the first 60% of the mass (top-p), by zero weights."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), 4, dim=-1)
        w = w * ((w.cumsum(-1) - w) < 0.6)
        return w / w.sum(-1, keepdim=True), idx


class ScoreCapacityRouter(GroupLimitedRouter):
    """A top-2 whose experts keep only their highest-scoring tokens up to a capacity (Megatron's
    ``drop_policy="probs"``): the dropped slots get weight 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        w, idx = torch.topk(probs, 2, dim=-1)
        dense = torch.zeros_like(probs).scatter(1, idx, w)
        best = torch.topk(dense, max(1, x.shape[0] // E), dim=0).indices  # per expert, over the tokens
        kept = torch.zeros_like(dense, dtype=torch.bool).scatter(0, best, True)
        return w * kept.gather(1, idx), idx


class ThresholdFunctionRouter(GroupLimitedRouter):
    """A cut with no comparison and no integer: ``F.threshold`` zeroes the weights under 0.2."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return F.threshold(w, 0.2, 0.0), idx


class ClampCutRouter(GroupLimitedRouter):
    """A cut by ``clamp``: the weights less 0.2, those under it at zero; held by where it cut, not by what."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return torch.clamp(w - 0.2, min=0.0), idx


class OutArgumentRouter(GroupLimitedRouter):
    """A minimum-weight cut written through ``out=``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        keep = torch.empty(w.shape, dtype=torch.bool)
        torch.ge(w, 0.5 * w[:, :1], out=keep)
        return w * keep, idx


class ScoresThresholdRouter(GroupLimitedRouter):
    """A cut taken on the full scores (not on what the decision computed), applied at its experts."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.linear(x, self.weight).softmax(-1)
        w, idx = torch.topk(p, self.top_k, dim=-1)
        return w * (p >= 0.5 * p.amax(-1, keepdim=True)).gather(1, idx), idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "router",
    [MinimumWeightRouter, TopPRouter, ScoreCapacityRouter, ThresholdFunctionRouter, ClampCutRouter, OutArgumentRouter],
)
@pytest.mark.parametrize("tokens", [T, 1])
def test_a_choice_from_the_scores_after_the_decision_is_refused(router: type[nn.Module], tokens: int) -> None:
    """Once the known gap: a cut after the top-k by the current scores replayed other experts; now refused.

    Established on one token too: a capacity by score chooses nothing among one token, so the later
    choices are checked again on more.

    A minimum weight, top-p, tokens dropped by score over a capacity, ``F.threshold``, ``out=``: the
    replay forced the top-k and the router cut again by the replayed forward's own scores, so the
    experts used were not the recorded ones, with no error."""
    model = TwoLayers(lambda: RouterBlock(router()))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="chooses again from the current scores") as err:
            with torch.no_grad(), session.capture():
                model(x)
        assert "#0 topk" in str(err.value) and "masked_fill" in str(err.value)
        with pytest.raises(mr.UnsupportedRouterError, match="chooses again"):
            session.verify(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class SafeDivisionRouter(GroupLimitedRouter):
    """Comparisons after the top-k that choose nothing: a guarded division, a statistic kept aside."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        total = w.sum(-1, keepdim=True)
        self.confident = (w[:, 0] > 0.5).float().mean()  # a log, never returned
        return torch.where(total > 0, w / total, torch.zeros_like(w)), idx


class SortedSlotsRouter(GroupLimitedRouter):
    """Experts chosen on biased scores, then their slots ordered by unbiased weight, a statistic returned,
    a ``w > 0`` guard: later choices that change no expert."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.linspace(-1, 1, E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = F.linear(x, self.weight).softmax(-1)
        _, idx = torch.topk(p + self.bias, self.top_k, dim=-1)
        w, order = p.gather(1, idx).sort(-1, descending=True)
        low = (w[:, -1] < 0.1).sum()
        return torch.where(w > 0, w / w.sum(-1, keepdim=True), 0.0), idx.gather(1, order), low


class SortedSlotsBlock(RouterBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx, _ = self.router(x)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.parametrize(
    "block", [lambda: RouterBlock(SafeDivisionRouter()), lambda: SortedSlotsBlock(SortedSlotsRouter())]
)
def test_choices_after_the_decision_that_change_no_expert_replay_exactly(block: Callable[[], nn.Module]) -> None:
    assert_capture_and_replay_are_exact(TwoLayers(block))


class ClampedSumRouter(nn.Module):
    """ERNIE-4.5-MoE's router: softmax in float32, a top-k, the weights divided by their sum clamped away from
    zero (a guard that cuts nowhere here), returned in the input's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(E, D))
        self.top_k, self.num_experts = 2, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.float(), self.weight.float()).softmax(-1)
        _, idx = torch.topk(probs, self.top_k, dim=-1)
        w = probs.gather(1, idx)
        return (w / torch.clamp(w.sum(-1, keepdim=True), min=1e-12)).to(x.dtype), idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_a_guarded_division_of_the_weights_is_no_choice_in_half_precision(dtype: torch.dtype) -> None:
    """Once refused in float16 as a choice from the scores after the decision: the clamped sum was held at
    its value on the real inputs while the forward ran on others, so weights were divided by an unrelated
    sum and rounded to zero in float16, as if an expert had been dropped. A cut is held by where it cut."""
    assert_capture_and_replay_are_exact(TwoLayers(lambda: RouterBlock(ClampedSumRouter())), dtype=dtype)


class PackedInputRouter(MinimumWeightRouter):
    """A minimum-weight cut in a router that takes its hidden states in a tuple."""

    def forward(self, packed: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(packed[0])


class PackedBlock(RouterBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router((x, 0))
        return dispatch(self.experts, x, idx.clamp(min=0), w)


class PickyRouter(MinimumWeightRouter):
    """A minimum-weight cut in a router that fails on any input but the first it was given (kept where a
    probe does not put it back: in a weak dictionary on the class, not one of Python's builtin containers)."""

    firsts: ClassVar[weakref.WeakKeyDictionary[nn.Module, torch.Tensor]] = weakref.WeakKeyDictionary()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.firsts.setdefault(self, x.clone())
        if not torch.equal(x, first):
            raise ValueError("unexpected input")
        return super().forward(x)


@pytest.mark.reliability("silent replays")
def test_later_choices_are_checked_on_inputs_in_containers_and_refused_where_they_cannot_be() -> None:
    """Hidden states in a tuple are varied too; later choices that cannot be checked are refused, not passed.

    A router whose forward fails on every other input has later choices that cannot be checked."""
    x = torch.randn(T, D)
    packed = TwoLayers(lambda: PackedBlock(PackedInputRouter()))
    with mr.attach(packed) as session, pytest.raises(mr.UnsupportedRouterError, match="chooses again"):
        session.verify(x)
    picky = TwoLayers(lambda: RouterBlock(PickyRouter()))
    with mr.attach(picky) as session, pytest.raises(mr.UnsupportedRouterError, match="could not be checked"):
        session.verify(x)


class ScatteredTopFourRouter(GroupLimitedRouter):
    """A top-4 scattered into zeros, masked under 0.1 and a top-2 taken: the mask reads through to scores
    the top-4 still shapes, so a forced expert outside today's top-4 would weigh 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.linear(x, self.weight).softmax(-1)
        w4, i4 = p.topk(4, dim=-1)
        dense = torch.zeros_like(p).scatter(1, i4, w4)
        return dense.masked_fill(dense < 0.1, 0.0).topk(self.top_k, dim=-1)


@pytest.mark.reliability("silent replays")
def test_a_mask_that_reads_through_to_scores_an_earlier_choice_shaped_is_refused() -> None:
    """A top-4 scattered into zeros, masked, then a top-2: a forced expert would weigh 0; refused."""
    model = TwoLayers(lambda: RouterBlock(ScatteredTopFourRouter()))
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match="shaped by an earlier choice"):
        session.verify(torch.randn(T, D))


class CuttingBlock(nn.Module):
    """An MoE block that cuts after its top-k (a minimum weight) and returns only hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), 2, dim=-1)
        keep = w >= 0.5 * w[:, :1]
        return dispatch(self.experts, x, idx.masked_fill(~keep, -1), w * keep)  # (-1: no expert)


class TopPBlock(nn.Module):
    """An MoE block with its gate as a linear layer, a top-p cut after the top-k, returning hidden states
    and its logits (the shape of HF's Mixtral-era blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        w, idx = torch.topk(logits.softmax(-1), 3, dim=-1)
        before = w.cumsum(-1) - w  # the mass of the slots before each
        w = torch.where(before < 0.5, w, torch.zeros_like(w))
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True)), logits


class ReluExperts(Experts):
    def __init__(self) -> None:
        nn.ModuleList.__init__(
            self, (nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D)) for _ in range(E))
        )


class ReluBlock(nn.Module):
    """An MoE block with ReLU experts (Switch, NLLB) and a statistic of its weights: neither is a later choice
    from the scores that picks experts."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.experts = ReluExperts()
        self.confident = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(F.linear(x, self.weight).softmax(-1), 2, dim=-1)
        self.confident = (w[:, 0] > 0.5).float().mean().detach()  # logged, never used
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tokens", [T, 1])
@pytest.mark.parametrize("block", [CuttingBlock, TopPBlock])
def test_a_cut_inside_a_scope_that_returns_hidden_states_is_refused(block: type[nn.Module], tokens: int) -> None:
    """A minimum-weight or top-p cut after the top-k inside a block that returns its hidden states: refused.

    The output names no expert, so the cut is seen in the hidden states: with the decision held, the
    cut made afresh on other scores moves them. Before, the experts used were not the recorded ones,
    with no error."""
    model = TwoLayers(block)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(1))
    with mr.attach(model, include=["layers.0", "layers.1"]) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match="chooses again from the current scores") as info:
            with session.capture():
                model(x)
        assert "hidden states" in str(info.value)


def test_relu_experts_and_a_statistic_in_a_block_that_returns_hidden_states_replay_exactly() -> None:
    """Expert ReLUs cut the hidden states, not the scores, and a logged statistic does not reach the output:
    such a block is exact, not refused."""
    assert_capture_and_replay_are_exact(TwoLayers(ReluBlock), include=["layers.0", "layers.1"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_block_of_relu_experts_in_half_precision_is_not_refused_for_zeros_its_sums_round_to(
    dtype: torch.dtype,
) -> None:
    """In bf16 a sum of experts rounds to 0 here or there: zeros of the hidden states a block returns are not
    taken for weights cut to zero (once refused as a later choice); its replay is exact."""
    model = TwoLayers(ReluBlock).to(dtype)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    spy = ExpertSpy(model)
    try:
        with mr.attach(model, include=["layers.0", "layers.1"]) as session, torch.no_grad():
            with session.capture():
                model(x)
            routes = session.routes()
            perturb(model)
            with session.replay(routes):
                model(x)
            for b, name in enumerate(session.names):
                assert torch.equal(spy.experts_of(b), as_sets(routes.layer(name))), name
    finally:
        spy.remove()


def test_scores_rescaled_by_a_max_are_not_taken_for_a_mask() -> None:
    assert_capture_and_replay_are_exact(TwoLayers(lambda: RouterBlock(RescaledRouter())))


def test_adapter_can_name_the_deciding_call() -> None:
    model = TwoLayers(lambda: RouterBlock(LoggingInRouter()))
    pick = mr.Adapter("pick", match=lambda n, m: isinstance(m, LoggingInRouter), call=2)
    session = assert_capture_and_replay_are_exact(model, adapters=[pick])
    assert all(s.call == 2 for s in session.sites)


# ----------------------------------------------------------------------- the model is left as it was
class CountingRouter(RenamedKRouter):
    """A router that counts its calls in a buffer and draws jitter from the random stream."""

    def __init__(self) -> None:
        super().__init__("top_k")
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen += 1
        return super().forward(x + 1e-3 * torch.randn_like(x))


def test_probing_leaves_buffers_and_the_random_stream_as_one_forward_would() -> None:
    x = torch.randn(T, D)
    plain = TwoLayers(lambda: RouterBlock(CountingRouter()))
    probed = TwoLayers(lambda: RouterBlock(CountingRouter()))
    torch.manual_seed(5)
    want = plain(x)
    next_plain = torch.randn(3)
    torch.manual_seed(5)
    with mr.attach(probed) as session, session.capture():
        got = probed(x)  # the first forward establishes every decision, then runs once
        next_probed = torch.randn(3)
    assert torch.equal(got, want)
    assert [int(m.router.seen) for m in probed.layers] == [1, 1]
    assert torch.equal(next_probed, next_plain)


class CachedCountsRouter(RenamedKRouter):
    """OLMo-core ``MoERouter``: tokens per expert accumulated in place in a ``BufferCache`` (a dict
    attribute, kept out of the module's buffers), for the aux-loss-free bias update."""

    def __init__(self) -> None:
        super().__init__("top_k")
        self._cache = collections.OrderedDict(batch_size_per_expert=torch.zeros(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = super().forward(x)
        with torch.no_grad():
            self._cache["batch_size_per_expert"] += torch.histc(idx.float(), bins=E, min=0, max=E - 1)
        return w, idx


def test_probing_leaves_tensors_held_in_a_dict_attribute_as_one_forward_would() -> None:
    """Once changed: tensors inside a dict attribute were not put back after the probe runs, so the
    first forward under a session counted each token once per probe run (34 times)."""
    x = torch.randn(T, D)
    plain = TwoLayers(lambda: RouterBlock(CachedCountsRouter()))
    probed = TwoLayers(lambda: RouterBlock(CachedCountsRouter()))
    plain(x)
    with mr.attach(probed) as session, session.capture():
        probed(x)
    for a, b in zip(plain.layers, probed.layers, strict=True):
        assert torch.equal(a.router._cache["batch_size_per_expert"], b.router._cache["batch_size_per_expert"])


class NormedLogitsRouter(RenamedKRouter):
    """A router that batch-normalises its inputs before the gate (running statistics kept in training)."""

    def __init__(self) -> None:
        super().__init__("top_k")
        self.norm = nn.BatchNorm1d(D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(self.norm(x))


def test_probing_leaves_a_batch_norms_running_statistics_as_one_forward_would() -> None:
    """Once changed: a batch norm's kernel updates its running statistics in place without a new version, so the
    probe runs, put back by version, left them moved once per run."""
    x = torch.randn(T, D)
    plain = TwoLayers(lambda: RouterBlock(NormedLogitsRouter()))
    probed = TwoLayers(lambda: RouterBlock(NormedLogitsRouter()))
    plain(x)
    with mr.attach(probed) as session, session.capture():
        probed(x)
    for a, b in zip(plain.layers, probed.layers, strict=True):
        assert torch.equal(a.router.norm.running_mean, b.router.norm.running_mean)
        assert torch.equal(a.router.norm.running_var, b.router.norm.running_var)
        assert int(b.router.norm.num_batches_tracked) == 1


def test_a_router_changed_after_its_decision_was_established_raises_then_is_established_again() -> None:
    model = TwoLayers(lambda: RouterBlock(RenamedKRouter("top_n")))
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        session.verify(x)
        with pytest.raises(mr.UnsupportedRouterError, match=r"now topk\(k=3\) over 8, but it was topk\(k=2\)"):
            with torch.no_grad(), session.capture():  # the mode verify() established
                for block in model.layers:  # on purpose, inside the block: now a top-3 router
                    block.router.top_n = 3
                model(x)
    # a new session establishes the new decision (nothing stale is reused), and replays it exactly
    session = assert_capture_and_replay_are_exact(model)
    assert [s.top_k for s in session.sites] == [3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_zero_that_rounding_makes_is_not_a_dropped_expert(dtype: torch.dtype) -> None:
    """Hidden states that round to exactly 0 in one run are not weights cut to zero: bf16 rounding is
    about 4e-3 of the largest value; in float32 a zero there is a change of structure."""
    from moe_replay.evidence import _restructured

    ev = types.SimpleNamespace(top_k=2, num_experts=E)  # (what _restructured reads of the evidence)
    a = torch.tensor([[1.39, 0.002], [0.5, 0.7]], dtype=dtype)
    b = a.clone()
    b[0, 1] = 0
    assert (_restructured(a, b, ev) is None) == (dtype == torch.bfloat16)  # type: ignore[arg-type]
    cut = a.clone()
    cut[1, 0] = 0  # a weight of a third of the largest, cut
    assert _restructured(a, cut, ev) is not None  # type: ignore[arg-type]


class _ModalityGates(nn.Module):
    """Two gates in one module's forward, each choosing for its own tokens (MoMa's per-modality routing; here the
    first third of the tokens and the rest: runs of unequal length, not chunks of the tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(D, E, bias=False) for _ in range(2))
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        third = x.shape[0] // 3
        for m, part in enumerate((slice(0, third), slice(third, None))):
            w, idx = self.gates[m](x[part]).softmax(-1).topk(2, dim=-1)
            out[part] = dispatch(self.experts, x[part], idx, w)
        return out


def test_two_independent_choices_in_one_forward_are_named_as_two_routers() -> None:
    """Refused, and not as a mask: moving one choice leaves the other's scores as they were."""
    model = TwoLayers(_ModalityGates)
    with mr.attach(model, include=["layers.0", "layers.1"]) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="more than one independent choice") as err:
            session.verify(torch.randn(T, D))
    assert "reshapes the scores" not in str(err.value)


class _ExpertsInTheMiddle(nn.Module):
    """Scores laid out ``[batch, E, seq]``, the top-k along dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("bsd,ed->bes", x[None], self.weight).softmax(1)
        w, idx = torch.topk(scores, 2, dim=1)
        return w.transpose(1, 2)[0], idx.transpose(1, 2)[0]


def test_a_choice_along_the_experts_dimension_is_read_moved_last() -> None:
    """A top-k along dim 1 of ``[batch, E, seq]`` (the experts): established with that dimension moved last, which
    ``verify()`` says, recorded per token, and forced in a replay after the routers change."""
    model = TwoLayers(lambda: RouterBlock(_ExpertsInTheMiddle()))
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        assert "along dim 1 of 3-dimensional scores" in str(session.verify(x))
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        assert routes.num_tokens == T
        with torch.no_grad():
            for name in session.names:
                model.get_submodule(name).weight.mul_(-1)
            with session.capture():
                model(x)
            assert not session.routes().equal(routes), "the changed routers choose the recorded experts anyway"
            with session.replay(routes), session.capture():
                model(x)
        assert session.routes().equal(routes)


class BusiestCapacityTop2Gate(nn.Module):
    """DeepSpeed's ``top2gating`` with ``drop_tokens=False``: two ``argmax`` calls, then combine weights
    ``[S, E, C]`` whose capacity ``C`` is the busiest expert's count, so a change of a choice may change the
    shape of what the gate returns."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.wg = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.wg.weight.normal_(generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.wg(x)
        gates = logits.softmax(-1)
        mask1 = F.one_hot(torch.argmax(gates, dim=1), E)
        mask2 = F.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), E)
        loc1 = mask1.cumsum(0) - 1
        loc2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
        capacity = int((mask1 + mask2).sum(0).max())
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        slot1 = F.one_hot((loc1 * mask1).sum(1), capacity).float()
        slot2 = F.one_hot((loc2 * mask2).sum(1), capacity).float()
        combine = torch.einsum("s,se,sc->sec", g1 / (g1 + g2), mask1.float(), slot1)
        combine = combine + torch.einsum("s,se,sc->sec", g2 / (g1 + g2), mask2.float(), slot2)
        return combine, combine.bool()


class BusiestCapacityTop2Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.gate = BusiestCapacityTop2Gate(seed)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine, dispatch = self.gate(x)
        slots = torch.einsum("sec,sd->ecd", dispatch.to(x.dtype), x)
        out = torch.stack([expert(slots[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("sec,ecd->sd", combine, out)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("seed", range(8))
def test_a_choice_whose_change_reshapes_the_output_stays_a_slot_of_the_decision(seed: int) -> None:
    """A top-2 gate whose slots are sized by the busiest expert (DeepSpeed, no dropping): both choices forced.

    Once wrong: a change of the second choice changed the capacity (the gate's output shape), which counted
    as reaching every element, so the first choice's finite reach looked like a sliver and it was left out: a
    top-2 gate was recorded as top-1, its first expert chosen afresh at replay, with no error."""
    session = assert_capture_and_replay_are_exact(TwoLayers(lambda: BusiestCapacityTop2Block(seed)))
    assert [site.top_k for site in session.sites] == [2, 2]


class BusiestCapacityTop2GateWithAuxLoss(BusiestCapacityTop2Gate):
    """The same gate, also returning a load-balancing loss built from a later ``topk`` of its gates."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        combine, dispatch = super().forward(x)
        gates = self.wg(x).softmax(-1)
        counts = F.one_hot(torch.topk(gates, 2, dim=-1).indices, E).float().sum(1).mean(0)
        return combine, dispatch, (counts * gates.mean(0)).sum() * E


class BusiestCapacityTop2BlockWithAuxLoss(BusiestCapacityTop2Block):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.gate = BusiestCapacityTop2GateWithAuxLoss(seed)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine, dispatch, self.aux_loss = self.gate(x)
        slots = torch.einsum("sec,sd->ecd", dispatch.to(x.dtype), x)
        out = torch.stack([expert(slots[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("sec,ecd->sd", combine, out)


@pytest.mark.parametrize("seed", range(8))
def test_an_aux_loss_call_stays_a_sliver_when_every_slot_of_the_decision_reshapes_the_output(seed: int) -> None:
    """Once refused: with both choices reshaping the output, the aux-loss top-k (one element) was the only finite
    reach, so it counted as broad, was taken for the decision, and the gate refused as two independent choices."""
    session = assert_capture_and_replay_are_exact(TwoLayers(lambda: BusiestCapacityTop2BlockWithAuxLoss(seed)))
    assert [site.top_k for site in session.sites] == [2, 2]


class LazyCachedCountsRouter(RenamedKRouter):
    """``CachedCountsRouter`` with its counts made at its first forward (under inference_mode in a rollout:
    an inference tensor, which keeps no version counter), in a dict attribute or directly."""

    def __init__(self, in_dict: bool) -> None:
        super().__init__("top_k")
        self.in_dict = in_dict
        self._cache: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None

    def get(self) -> torch.Tensor | None:
        return self._cache.get("counts") if self.in_dict else self.counts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = super().forward(x)
        with torch.no_grad():
            if self.get() is None:
                self._cache["counts"] = self.counts = torch.zeros(E)  # (one of the two is read)
            self.get().add_(torch.histc(idx.float(), bins=E, min=0, max=E - 1))  # type: ignore[union-attr]
        return w, idx


@pytest.mark.parametrize("in_dict", [True, False], ids=["dict-attribute", "attribute"])
def test_probing_puts_back_inference_tensors_under_inference_mode(in_dict: bool) -> None:
    """Once a raw 'Inference tensors do not track version counter' at the first capture under inference_mode
    after a rollout under it made the counts: the snapshot read their version counter."""
    x = torch.randn(T, D)
    plain = TwoLayers(lambda: RouterBlock(LazyCachedCountsRouter(in_dict)))
    probed = TwoLayers(lambda: RouterBlock(LazyCachedCountsRouter(in_dict)))
    with torch.inference_mode():
        plain(x)
        probed(x)
    with mr.attach(probed) as session, torch.inference_mode(), session.capture():
        probed(x)
    with torch.inference_mode():
        plain(x)
    for a, b in zip(plain.layers, probed.layers, strict=True):
        assert torch.equal(a.router.get(), b.router.get())


class LoggedLogitsRouter(RenamedKRouter):
    """Keeps every forward's logits in a list attribute, for a later plot: a history far larger than a router."""

    def __init__(self, history: int, width: int) -> None:
        super().__init__("top_k")
        self.history = [torch.zeros(width) for _ in range(history)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.history.append(F.linear(x, self.weight).detach())
        return super().forward(x)


def test_probe_runs_watch_a_large_history_of_tensors_instead_of_copying_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of tensors beyond the copy budget is watched by version, not cloned; the list itself is put back."""
    from moe_replay import evidence

    cloned: list[int] = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: cloned.append(t.numel()) or clone(t, *a, **k))
    width = evidence._COPY_LIMIT // 16
    model = TwoLayers(lambda: RouterBlock(LoggedLogitsRouter(history=64, width=width)))
    x = torch.randn(T, D)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    assert sum(cloned) < 2 * 64 * width  # less than the two histories: each probe snapshot copies a budget's worth
    assert [len(layer.router.history) for layer in model.layers] == [65, 65]  # one forward's entry, not one per probe


class AtenTopKBlock(LinearGateBlock):
    """The top-k called as torch's operator, ``torch.ops.aten.topk`` (or an overload of it), not ``torch.topk``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        topk = torch.ops.aten.topk if self.op == "packet" else torch.ops.aten.topk.default
        w, idx = topk(probs, self.top_k)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.parametrize("op", ["packet", "default"])
def test_a_top_k_called_as_an_aten_operator_is_the_decision(op: str) -> None:
    """A top-k called as torch's aten operator is read as torch.topk: recorded and forced exactly."""
    session = assert_capture_and_replay_are_exact(TwoLayers(lambda: AtenTopKBlock(op)))
    assert list(session.names) == ["layers.0.gate", "layers.1.gate"]


class AtenDecoyBlock(LinearGateBlock):
    """``torch.topk`` picks the weights, the aten operator picks the experts the tokens go to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        _, shown = torch.topk(probs, self.top_k)
        _, used = torch.ops.aten.topk.default(probs, self.top_k)
        return dispatch(self.experts, x, used, probs.gather(1, shown))


def test_experts_chosen_by_an_aten_operator_beside_a_torch_top_k_are_refused() -> None:
    """A block whose experts come from an aten top-k and whose weights come from a torch.topk is refused, not
    replayed with only the weights forced."""
    model = TwoLayers(AtenDecoyBlock)
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="more than one independent choice"):
            session.verify(torch.randn(T, D))


class NumpyDispatchBlock(LinearGateBlock):
    """``torch.topk`` sets the weights; the experts the tokens go to are an ``argsort`` in numpy (before or after)."""

    def __init__(self, numpy_first: bool) -> None:
        super().__init__()
        self.numpy_first = numpy_first

    def _in_numpy(self, probs: torch.Tensor) -> torch.Tensor:
        order = np.argsort(-probs.detach().numpy(), axis=-1, kind="stable")
        return torch.from_numpy(order[:, : self.top_k].copy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        used = self._in_numpy(probs) if self.numpy_first else None
        _, shown = torch.topk(probs, self.top_k)
        used = self._in_numpy(probs) if used is None else used
        return dispatch(self.experts, x, used, probs.gather(1, shown))


@pytest.mark.parametrize("numpy_first", [False, True])
def test_experts_chosen_in_numpy_beside_a_torch_top_k_are_refused(numpy_first: bool) -> None:
    """A block whose experts are chosen in numpy and whose weights come from a torch.topk is refused, naming the
    numpy call, not replayed with only the weights forced."""
    model = TwoLayers(lambda: NumpyDispatchBlock(numpy_first))
    before = copy.deepcopy(model.state_dict())
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"out of torch \(numpy at test_evidence"):
            session.verify(torch.randn(T, D))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class NumpyLoggingBlock(LinearGateBlock):
    """Keeps a numpy copy of the probabilities and their rows as lists (for a plot), then routes with torch.topk."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        self.seen = (probs.detach().numpy().copy(), probs.tolist())
        w, idx = torch.topk(probs, self.top_k)
        return dispatch(self.experts, x, idx, w)


def test_a_copy_of_the_scores_kept_in_numpy_for_logging_is_not_refused() -> None:
    """Scores handed to numpy or a Python list only for logging do not reach the output: the router is exact."""
    assert_capture_and_replay_are_exact(TwoLayers(NumpyLoggingBlock))


class HistcSplitBlock(LinearGateBlock):
    """Megatron-style: tokens sorted by expert, the counts per expert a float ``histc`` read back as split sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)
        rows = x.repeat_interleave(self.top_k, 0)[order]
        sizes = [int(c) for c in counts.tolist()]
        done = [expert(part) for expert, part in zip(self.experts, rows.split(sizes), strict=True)]
        out = torch.zeros_like(rows).index_copy(0, order, torch.cat(done)) * w.flatten()[:, None]
        return out.view(-1, self.top_k, D).sum(1)


def test_counts_of_the_chosen_experts_read_back_as_split_sizes_are_not_refused() -> None:
    """Counts per expert made from the decision's indices and read back to the host (split sizes) are no choice
    outside torch: the router is exact."""
    assert_capture_and_replay_are_exact(TwoLayers(HistcSplitBlock))


class ScatteredCountSplitBlock(LinearGateBlock):
    """Counts per expert summed from a float mask of the chosen experts, scattered into ``zeros_like`` of the
    scores, read back as split sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        w, idx = torch.topk(probs, self.top_k)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        sizes = [int(c) for c in torch.zeros_like(probs).scatter(1, idx, 1.0).sum(0).tolist()]
        rows = x.repeat_interleave(self.top_k, 0)[order]
        done = [expert(part) for expert, part in zip(self.experts, rows.split(sizes), strict=True)]
        out = torch.zeros_like(rows).index_copy(0, order, torch.cat(done)) * w.flatten()[:, None]
        return out.view(-1, self.top_k, D).sum(1)


def test_counts_scattered_into_a_tensor_shaped_like_the_scores_are_not_read_as_scores() -> None:
    """Counts per expert summed from a mask of the decision's indices scattered into ``zeros_like`` of the scores
    hold none of the scores' values: read back as split sizes, the router is exact."""
    assert_capture_and_replay_are_exact(TwoLayers(ScatteredCountSplitBlock))


# ----------------------------------------------------------------------- branches on the number of tokens
#: Forwards of this many tokens or fewer take the decode branch of the routers below.
DECODE = 4


class TokenCountBlock(LinearGateBlock):
    """A Linear gate and a top-k in the block, then a branch on the number of tokens (``decode``: few)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return self.after(x, probs, w, idx, decode=x.shape[0] <= DECODE)

    def after(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, decode: bool) -> Any:
        return dispatch(self.experts, x, idx, w)


class DecodeCut(TokenCountBlock):
    """Decode only: a slot weighing under 0.2 is dropped (a minimum-weight cut after the top-k)."""

    def after(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, decode: bool) -> Any:
        if decode:
            idx = torch.where(w >= 0.2, idx, torch.full_like(idx, -1))
        return dispatch(self.experts, x, idx, w)


class DecodeDenseMask(TokenCountBlock):
    """Decode only: the experts are those scoring at least the k-th value (a dense mask), not the indices."""

    def after(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, decode: bool) -> Any:
        if not decode:
            return dispatch(self.experts, x, idx, w)
        mask = probs >= w[:, -1:]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = mask[:, e].nonzero().flatten()
            if tok.numel():
                out = out.index_add(0, tok, probs[tok, e, None] * expert(x[tok]))
        return out


class PrefillCapacity(TokenCountBlock):
    """Prefill only (over 20 tokens): at most 3 tokens per expert, kept by weight (dropped by score)."""

    def after(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, decode: bool) -> Any:
        if x.shape[0] > 20:
            flat, counts = idx.flatten(), [0] * E
            keep = torch.zeros_like(flat, dtype=torch.bool)
            for j in torch.argsort(-w.flatten(), stable=True).tolist():
                if counts[int(flat[j])] < 3:
                    counts[int(flat[j])] += 1
                    keep[j] = True
            idx = torch.where(keep.view_as(idx), idx, torch.full_like(idx, -1))
        return dispatch(self.experts, x, idx, w)


class DecodeThresholdK(LinearGateBlock):
    """Decode only: experts per token from a threshold before the top-k (its second slot dropped under it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        decode = x.shape[0] <= DECODE
        if decode:
            n = (probs > 0.25).sum(-1, keepdim=True).clamp(1, self.top_k)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if decode:
            idx = torch.where(torch.arange(self.top_k) < n, idx, torch.full_like(idx, -1))
        return dispatch(self.experts, x, idx, w)


class DecodeBias(TokenCountBlock):
    """Decode only: a bias added to the scores before the same top-k. Forcing that top-k forces the experts
    used on every branch: exact, not refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        scores = probs + torch.linspace(-0.3, 0.3, E) if x.shape[0] <= DECODE else probs
        _, idx = torch.topk(scores, self.top_k, dim=-1)
        return dispatch(self.experts, x, idx, probs.gather(-1, idx))


def _prefill_then_decode(steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(T, D, generator=g)] + [torch.randn(1, D, generator=g) for _ in range(steps)]


BRANCHES = {
    "decode-cut": DecodeCut,
    "decode-dense-mask": DecodeDenseMask,
    "prefill-capacity": PrefillCapacity,
    "decode-threshold-k": DecodeThresholdK,
}


#: Each block, with which forward comes first: the branch is not taken there.
BRANCH_ORDERS = [
    ("decode-cut", "prefill-first"),
    ("decode-dense-mask", "prefill-first"),
    ("decode-threshold-k", "prefill-first"),
    ("decode-threshold-k", "decode-first"),  # (on one token its second slot may weigh 0: k=1 was learned)
    ("prefill-capacity", "decode-first"),
]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("block", "order"), BRANCH_ORDERS)
def test_a_branch_taken_only_on_another_number_of_tokens_is_refused_at_the_first_forward(
    block: str, order: str
) -> None:
    """A choice that a block makes only on another number of tokens than its first forward's is refused then.

    Decode steps (one token) or a prefill (many) may take another branch: a weight cut or a threshold on
    the number of experts, a dense mask of the values instead of the indices, a capacity dropping by score.
    Before, a prefill-first capture recorded experts the decode steps did not use (and a decode-first one
    those a prefill did not), and the replays forced rows that were not the experts used, with no error.
    """
    model = TwoLayers(BRANCHES[block])
    xs = _prefill_then_decode()
    if order == "decode-first":
        xs = xs[1:] + xs[:1]
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        with pytest.raises(
            mr.UnsupportedRouterError,
            match="Found on (one of its tokens alone|32 tokens)|chooses again from the current scores on more tokens",
        ) as info:
            model(xs[0])
        refused = str(info.value).split("'")[1]
        assert session.routes(allow_partial=True).layer(refused).shape[0] == 0  # nothing recorded for it


@pytest.mark.parametrize("decode_first", [False, True], ids=["prefill-first", "decode-first"])
def test_a_branch_on_the_number_of_tokens_that_only_shapes_the_scores_replays_exactly(decode_first: bool) -> None:
    """A bias added before the same top-k in decode steps only: every branch's experts are forced, not refused."""
    model = TwoLayers(DecodeBias)
    xs = _prefill_then_decode()
    if decode_first:
        xs = xs[1:] + xs[:1]
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            used, outs = [], []
            with session.capture():
                for x in xs:
                    outs.append(model(x))
                    used.append([spy.experts_of(b) for b in range(2)])
            routes = session.routes()
            with session.replay(routes):
                assert all(torch.equal(model(x), out) for x, out in zip(xs, outs, strict=True))
            perturb(model)
            with session.replay(routes):
                for x, was in zip(xs, used, strict=True):
                    model(x)
                    assert all(torch.equal(spy.experts_of(b), was[b]) for b in range(2))
            start = 0
            for x, was in zip(xs, used, strict=True):
                for b, name in enumerate(session.names):
                    assert torch.equal(as_sets(routes.layer(name)[start : start + x.shape[0]]), was[b])
                start += x.shape[0]
    finally:
        spy.remove()


class _TopKFunction(torch.autograd.Function):
    """A top-k inside an ``autograd.Function``'s forward (a custom backward, say)."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(probs, k, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, grad_indices: torch.Tensor) -> tuple[None, None]:
        return None, None


class HiddenTopKBlock(LinearGateBlock):
    """A bare ``Linear`` gate and experts only; the top-k reached through ``how``, not named in the forward."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "partial":
            self.pick = functools.partial(torch.topk, k=2, dim=-1)
        elif how == "stored":
            self.pick = torch.topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.how == "function":
            w, idx = _TopKFunction.apply(probs, 2)
        elif self.how == "partial":
            w, idx = self.pick(probs)
        else:
            w, idx = self.pick(probs, 2, dim=-1)
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["function", "partial", "stored"])
def test_a_top_k_reached_through_an_autograd_function_or_a_stored_callable_is_the_decision(how: str) -> None:
    """Once refused at attach as soft routing: a top-k in an ``autograd.Function`` or kept on ``self``
    (``functools.partial(torch.topk, ...)``, ``torch.topk`` itself) was not read; recorded and forced exactly."""
    assert_capture_and_replay_are_exact(TwoLayers(lambda: HiddenTopKBlock(how)))


@torch.jit.script
def _scripted_top2(probs: torch.Tensor) -> torch.Tensor:
    return torch.topk(probs, 2, dim=-1)[1]


class ScriptedTopKBlock(LinearGateBlock):
    """The experts chosen by a TorchScript helper, whose calls no Python code can see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        idx = _scripted_top2(probs)
        w = probs.gather(-1, idx)
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


@pytest.mark.reliability("silent replays")
def test_a_choice_made_out_of_sight_is_refused_saying_how_to_make_it_visible() -> None:
    """Once refused as soft routing with no way out: a TorchScript top-k is refused, the message saying to
    choose with torch.topk in Python; nothing stays installed."""
    model = TwoLayers(ScriptedTopKBlock)
    x = torch.randn(T, D)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(mr.UnsupportedRouterError, match=r"TorchScript.*torch\.topk"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all("forward" not in m.__dict__ for m in model.modules())


class CpuDecisionBlock(LinearGateBlock):
    """The top-k taken of a host copy of the scores (``.cpu()``), its indices moved back to the device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        idx = torch.topk(probs.detach().cpu(), 2, dim=-1).indices.to(x.device)
        w = probs.gather(-1, idx)
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad", [False, True])
def test_a_decision_taken_on_a_host_copy_of_device_scores_is_forced_exactly(grad: bool) -> None:
    """Once a raw device-mismatch RuntimeError at replay: the rows on the GPU were gathered from the top-k's CPU
    scores; they are now answered on the call's device, and replay equals the hand-forced reference."""
    model = TwoLayers(CpuDecisionBlock).cuda()
    x = torch.randn(T, D, device="cuda")
    with mr.attach(model) as session:
        with torch.set_grad_enabled(grad), session.capture():
            model(x)
        routes = session.routes()
        rows = [routes.layer(n).long().cuda() for n in session.names]
        with torch.no_grad():
            for layer in model.layers:
                layer.gate.weight.add_(3 * torch.randn_like(layer.gate.weight))
        for _ in range(3):  # the first replayed forward under the mode, the later ones lean
            with torch.set_grad_enabled(grad), session.replay(routes):
                out = model(x)
            with torch.no_grad():
                ref = x
                for layer, r in zip(model.layers, rows, strict=True):
                    probs = layer.gate(ref).softmax(-1)
                    w = probs.gather(-1, r)
                    ref = ref + dispatch(layer.experts, ref, r, w / w.sum(-1, keepdim=True))
            assert torch.equal(out.detach(), ref)


# ----------------------------------------------------------------------- hooks inside the scope
class OffloadedGateRouter(nn.Module):
    """A router whose gate ``Linear`` holds its weights elsewhere: a forward pre-hook on the gate loads them and a
    forward hook frees them again (the way an offloading library or DeepSpeed ZeRO-3 hooks a module)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


def _offload(gate: nn.Linear, store: dict[int, torch.Tensor]) -> list[Any]:
    store[id(gate)] = gate.weight.data.clone()
    gate.weight.data = torch.empty(0)

    def load(m: nn.Module, args: tuple[Any, ...]) -> None:
        m.weight.data = store[id(m)]

    def free(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        m.weight.data = torch.empty(0)

    return [gate.register_forward_pre_hook(load), gate.register_forward_hook(free)]


@pytest.mark.reliability("wrappers")
def test_a_forward_that_needs_the_hooks_of_its_submodules_is_captured_and_forced() -> None:
    """Once refused by name (and before that, failed with torch's own error, a size mismatch): a gate whose weights a
    pre-hook loads (offloading, DeepSpeed ZeRO-3) fails in the runs that establish its decision with the submodules'
    hooks set aside. Those runs are made again with the hooks in, so it is captured and forced with its hooks on."""
    model = TwoLayers(lambda: RouterBlock(OffloadedGateRouter())).eval()
    store: dict[int, torch.Tensor] = {}
    for layer in model.layers:
        _offload(layer.router.gate, store)
    x = torch.randn(T, D)
    expected = model(x)
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                out = model(x)
            assert torch.equal(out, expected)
            routes = session.routes()
            captured = [spy.experts_of(b) for b in range(2)]
            assert all(torch.equal(as_sets(routes.layer(n)), c) for n, c in zip(session.names, captured, strict=True))
            for key in store:  # the offloaded weights change
                store[key] = store[key] + 3 * torch.randn(store[key].shape, generator=torch.Generator().manual_seed(2))
            model(x)
            assert any(not torch.equal(spy.experts_of(b), c) for b, c in enumerate(captured))
            with session.replay(routes):
                model(x)
            assert all(torch.equal(spy.experts_of(b), c) for b, c in enumerate(captured))
    finally:
        spy.remove()
    assert all(layer.router.gate.weight.numel() == 0 for layer in model.layers)  # (offloaded, as it was)


# ----------------------------------------------------------------------- a peaked token in half precision
def _peaked_inputs(tokens: int, scale: float = 100.0) -> torch.Tensor:
    """bf16 hidden states whose first token is ``scale`` times as large as the others (no norm before the MoE block:
    the massive activation of an attention sink), so that its softmax puts its second slot under bf16 rounding."""
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(1))
    x[0] *= scale
    return x.to(torch.bfloat16)


class OneSlotAloneBlock(LinearGateBlock):
    """A block that drops the second slot of its top-2 on a forward of one token (its code, not rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        if x.shape[0] == 1:
            w, idx = w[:, :1], idx[:, :1]
        return dispatch(self.experts, x, idx, w)


class MinimumWeightBlock(LinearGateBlock):
    """A block that drops the second slot where it weighs under half the first (a cut by the scores)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        return dispatch(self.experts, x, idx.masked_fill(w < 0.5 * w[:, :1], -1), w)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("tokens", "scale"), [(1, 100.0), (1, 1000.0), (T, 100.0)], ids=["alone", "alone-1000", "batch"]
)
def test_a_peaked_token_whose_last_slot_rounds_away_in_bf16_is_captured_and_forced(tokens: int, scale: float) -> None:
    """Once refused as "slot 2 ... does not reach the output" (or "reaches the output, but ... only its first 1
    do"), or silent: a token whose scores are very peaked weighs its second expert under bf16 rounding, so moving
    that expert changed nothing representable on it, alone, and it was taken for a slot the forward drops. A first
    forward of that token alone (a prompt of one token, a sink 1000 times as large as the others) established
    k=1 where every random token of its spread was as peaked, and later forwards recorded one of the two experts
    their tokens used, with no error. A slot counts as reaching the output where moving it changes the output on
    other inputs of the same shape too (the other tokens, random ones, the inputs scaled down)."""
    model = TwoLayers(LinearGateBlock).to(torch.bfloat16)
    x = _peaked_inputs(tokens, scale)
    with torch.no_grad():
        w = model.layers[0].gate(x[:1]).float().softmax(-1).topk(2).values[0]
    assert w[1] < 2**-9 * w[0]  # (the premise: the first token's second weight is under bf16 rounding of the first)
    later = torch.randn(4, D, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(x)
                used = [spy.experts_of(b) for b in range(2)]
                model(later)
                used = [torch.cat([u, spy.experts_of(b)]) for b, u in enumerate(used)]
            assert [s.top_k for s in session.sites] == [2, 2]
            for b, name in enumerate(session.names):
                assert torch.equal(as_sets(session.routes().layer(name)), used[b]), f"capture of {name}"
            with session.capture():
                out = model(x)
            routes = session.routes()
            with session.replay(routes):
                assert torch.equal(model(x), out)
            perturb(model)
            model(x)
            free = [spy.experts_of(b) for b in range(len(session.names))]
            assert any(not torch.equal(f, as_sets(routes.layer(n))) for f, n in zip(free, session.names, strict=True))
            with session.replay(routes):
                model(x)
            for b, name in enumerate(session.names):
                assert torch.equal(spy.experts_of(b), as_sets(routes.layer(name))), f"replay of {name}"
    finally:
        spy.remove()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tokens", [1, T], ids=["alone", "batch"])
@pytest.mark.parametrize("block", [OneSlotAloneBlock, MinimumWeightBlock])
def test_a_block_that_drops_its_last_slot_is_still_refused_beside_a_peaked_token(
    block: type[nn.Module], tokens: int
) -> None:
    """Other inputs count for a slot that rounds away, not for one the forward drops: by its code on one token
    (refused on one token, or on many where it was established on one), or by the scores (a later choice)."""
    model = TwoLayers(block).to(torch.bfloat16)
    x = _peaked_inputs(tokens)
    if block is OneSlotAloneBlock and tokens > 1:
        x = x[1:]  # (no peaked token: its first forward takes the branch of many tokens)
    match = {OneSlotAloneBlock: "only its first 1 do" if tokens == 1 else "does not reach the output"}
    before = copy.deepcopy(model.state_dict())
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match=match.get(block, "chooses again from the current scores")):
            with session.capture():
                model(x)
        assert session.routes(allow_partial=True).layer(session.names[0]).shape[0] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class LargeTokenCutBlock(LinearGateBlock):
    """A block that drops the second slot of the tokens whose hidden state is large (a cut by value, per token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        large = x.float().norm(dim=-1, keepdim=True) > 50 * D**0.5
        cut = large & (torch.arange(self.top_k) == 1)
        return dispatch(self.experts, x, idx.masked_fill(cut, -1), w)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", [0, 5])
def test_a_cut_by_the_norm_of_the_hidden_states_is_refused(where: int) -> None:
    """Once silent: a block drops the second slot of its large tokens by their norm, after its top-k. It is no later
    choice from the scores, and the rows recorded for such a token named an expert it did not use. The booleans made
    of the hidden states meet the decision's indices in one elementwise call (a cut of the decision), and held at
    their values on other inputs they move the hidden states the block returns: refused as a cut, the model left as
    it was."""
    model = TwoLayers(LargeTokenCutBlock).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    x = _peaked_inputs(T).roll(where, 0)
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match="cuts it by values that are not its scores"):
            with session.capture():
                model(x)
        assert session.routes(allow_partial=True).layer(session.names[0]).shape[0] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class ReluByHandBlock(LinearGateBlock):
    """A block whose experts' activation is written by hand (``h * (h > 0)``: booleans of hidden states made after its
    decision) and whose weights are scaled by a gate of each token's norm (values, no booleans): no cut of its
    decision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        w = w * torch.sigmoid(x.float().norm(dim=-1, keepdim=True) - 4).to(w.dtype)
        h = torch.stack([expert(x) for expert in self.experts])  # [E, tokens, D]: every expert on every token
        h = h * (h > 0)
        return torch.einsum("te,etd->td", torch.zeros(x.shape[0], E).scatter(-1, idx, w), h)


@pytest.mark.reliability("silent replays")
def test_booleans_of_hidden_states_that_meet_no_decision_are_not_a_cut() -> None:
    """No false refusal: booleans made of the hidden states after the decision (an expert's activation by hand) that
    never meet the decision's indices or weights in one elementwise call are no cut of it: captured, the gates moved,
    replayed with the recorded experts."""
    torch.manual_seed(0)
    model = nn.Sequential(ReluByHandBlock())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        model[0].gate.weight.mul_(-1)
        with session.replay(routes), session.capture():
            model(x)
        assert session.routes().equal(routes)


class _Top1WarmupBlock(nn.Module):
    """A top-1 block with a bare linear gate that dispatches by ``argmax`` of its biased scores for its first
    ``warmup`` forwards, then by ``topk(probs, 1)``; both are computed every time (the other feeds a statistic), so
    the decision-like calls never change, but they are of two families (``argmax``, ``topk``)."""

    def __init__(self, warmup: int = 1, top_k: int = 1) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.register_buffer("bias", torch.linspace(2.0, -2.0, E))
        self.top_k, self.num_experts, self.warmup, self.step = top_k, E, warmup, 0
        self.dispatched: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        probs = self.gate(x).softmax(-1)
        early = torch.argmax(probs + self.bias, dim=-1, keepdim=True)
        late = torch.topk(probs, self.top_k, dim=-1).indices
        idx = late if self.step > self.warmup else early
        self.dispatched.append(idx.clone())
        return dispatch(self.experts, x, idx, probs.gather(-1, idx))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("top_k", [1, 2], ids=["top-1 argmax then topk", "top-1 argmax then top-2"])
def test_a_warmup_that_moves_dispatch_to_a_call_of_another_family_is_checked_at_every_forward(top_k: int) -> None:
    """Once silent: a warm-up that moves dispatch from an ``argmax`` to a ``topk`` (of one k, or of another) made
    both calls at every forward, but only calls of the decision's own family and k were checked at each forward, so
    the capture recorded, and the replay forced, the ``argmax`` that no longer dispatched. Every call over the
    experts beside the decision is now checked: the decision is established afresh where it moved (a capture that
    already holds rows of another k is refused, as a changed k is)."""
    torch.manual_seed(7)
    block, x = _Top1WarmupBlock(top_k=top_k), torch.randn(10, D)
    with mr.attach(block) as session, torch.no_grad():
        with session.capture():
            block(x)  # (the warm-up forward: established on the argmax)
        assert torch.equal(session.routes().layer("gate"), block.dispatched[0])
        with session.capture():
            block(x)
            block(x)
        assert torch.equal(session.routes().layer("gate"), torch.cat(block.dispatched[1:]))
        g = torch.Generator().manual_seed(5)
        rows = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(10)])
        forced = mr.Routes([rows], names=session.names, num_experts=E)
        with session.replay(forced):
            block(x)
        assert torch.equal(block.dispatched[-1], forced.layer("gate"))


class SharedStateRouter(nn.Module):
    """A top-k router whose forward adds to containers it shares or keeps: a list and a dict handed in by the model
    (its aux losses, per-expert loads), and a deque of its own (a bounded history of loads)."""

    def __init__(self, losses: list[torch.Tensor], loads: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, 2
        self.aux_losses, self.loads = losses, loads
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        self.aux_losses.append(probs.mean(0).square().sum())
        self.loads[f"router{id(self)}"] = torch.bincount(idx.flatten(), minlength=E)
        self.history.append(probs.mean(0))
        return w, idx


class SharedStateModel(nn.Module):
    """Two MoE layers whose routers add their aux losses to the model's list (cleared at each forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.aux_losses: list[torch.Tensor] = []
        self.loads: dict[str, torch.Tensor] = {}
        self.layers = nn.ModuleList(RouterBlock(SharedStateRouter(self.aux_losses, self.loads)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.aux_losses.clear()
        for layer in self.layers:
            x = x + layer(x)
        return x, sum(self.aux_losses, torch.zeros(()))


@pytest.mark.reliability("silent replays")
def test_containers_a_router_shares_are_put_back_in_place_after_the_probe_runs() -> None:
    """Once silent: the runs that establish a decision put a router's list, dict and set attributes back as copies,
    so a list it shares with the model (aux losses handed to each router) was no longer the model's: the model's
    aux loss read 0 in every later forward, during the session and after it; and a deque attribute (a history of
    loads) kept every probe run's entry. They are put back in place, the same objects with the same contents."""
    model = SharedStateModel()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, aux = model(x)
    routers = [layer.router for layer in model.layers]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            captured, captured_aux = model(x)
        assert torch.equal(captured, out) and torch.equal(captured_aux, aux)
        with torch.no_grad(), session.replay(session.routes()):
            assert torch.equal(model(x)[1], aux)
    assert all(r.aux_losses is model.aux_losses and r.loads is model.loads for r in routers)
    assert len(model.aux_losses) == 2 and len(model.loads) == 2
    assert [len(r.history) for r in routers] == [3, 3]  # the plain, captured and replayed forwards alone
    with torch.no_grad():
        assert torch.equal(model(x)[1], aux)


# ----------------------------------------------------------------------- scores squashed after the logits
class ScoredRouter(nn.Module):
    """A top-2 router over 8 experts that decides on: ``"softmax"``, the softmax of its logits; ``"logits"``, the
    logits; ``"sigmoid-bias"``, sigmoid scores plus a bias (DeepSeek-V3 style); ``"sigmoid-gate-beside"``, the
    softmax, beside a sigmoid gate of a shared expert (Qwen2-MoE style) that the decision does not read."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.top_k, self.num_experts = kind, 2, E
        self.weight = nn.Parameter(torch.randn(E, D))
        self.shared = nn.Linear(D, 1)
        self.register_buffer("bias", 0.5 * torch.randn(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.kind == "logits":
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            return top.softmax(-1), idx
        if self.kind == "sigmoid-bias":
            scores = logits.sigmoid()
            idx = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
            w = scores.gather(1, idx)
            return w / w.sum(-1, keepdim=True), idx
        w, idx = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        if self.kind == "sigmoid-gate-beside":
            w = w * torch.sigmoid(self.shared(x))
        return w, idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["softmax", "logits", "sigmoid-bias", "sigmoid-gate-beside"])
def test_scores_made_through_a_sigmoid_are_told_from_logits_without_a_graph(kind: str) -> None:
    """Whether the decision's scores were made through a squashing after the logits (what tells a sigmoid router's
    scores, moved out of ``[0, 1]`` by a bias, from logits where no autograd graph says so), read from the calls of
    the router's forward: a sigmoid the decision's scores descend from counts, one beside them does not."""
    model = TwoLayers(lambda: RouterBlock(ScoredRouter(kind)))
    with mr.attach(model) as session:
        ev = session.verify(torch.randn(T, D)).evidence["layers.0.router"]
    assert ev.squashed is (kind == "sigmoid-bias")


class FlatIndexRouter(nn.Module):
    """A top-2 over ``[1, tokens, experts]`` scores (one sequence, its batch dimension kept) that returns, beside the
    expert ids, a flat index into those scores (``position * E + id``, for a scatter of the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.gate(x).softmax(-1)[None]
        w, idx = scores.topk(self.top_k, dim=-1)
        flat = idx + torch.arange(scores.shape[-2])[:, None] * E
        return (w / w.sum(-1, keepdim=True))[0], idx[0], flat[0]


class FlatIndexBlock(RouterBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx, _ = self.router(x)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_a_flat_index_beside_the_ids_of_batched_scores_is_no_group_offset() -> None:
    """Once falsely refused: the ``[1, tokens, experts]`` scores' dimension before the experts is the tokens', one row
    of the decision per token, and a flat index into them (the ids shifted by ``position * E``) was taken for a
    grouped choice's ids shifted by their group's offset. Captured and replayed exactly."""
    assert_capture_and_replay_are_exact(TwoLayers(lambda: FlatIndexBlock(FlatIndexRouter())))


class MappedIdsRouter(nn.Module):
    """A top-2 whose positions the router hands on through a permutation held in a buffer (``expert_map[idx]``): the
    experts the block uses are the mapped ids, not the positions the decision chose."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("expert_map", torch.randperm(E, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), self.expert_map[idx]


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="ids handed on through a table (expert_map[idx]) are recorded as the decision's positions: the replay is "
    "exact, but the routes name other experts than the model uses; only a constant or a group's shift is refused",
)
def test_ids_mapped_through_a_table_are_refused() -> None:
    """The routes would hold the decision's positions while the block dispatches to ``expert_map`` of them: loads,
    expert counts and routes exchanged with an inference engine name other experts, with no error."""
    model = TwoLayers(lambda: RouterBlock(MappedIdsRouter()))
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(torch.randn(T, D, generator=torch.Generator().manual_seed(1)))
    assert_untouched(model, before)


class BankOffsetRouter(nn.Module):
    """One gate's top-2 over ``E`` scores handed on with each token's bank offset added (``idx + bank * E``: text
    tokens to experts ``0..E-1``, the others to a second bank ``E..2E-1``), each token's bank known by its place
    (text and image tokens interleaved)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        bank = (torch.arange(x.shape[0], device=x.device) % 2)[:, None]  # (each token's modality, by its place)
        return w / w.sum(-1, keepdim=True), idx + bank * E


class BankOffsetBlock(RouterBlock):
    def __init__(self) -> None:
        super().__init__(BankOffsetRouter())
        self.experts = Experts(2 * E)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="ids shifted by an offset that differs from token to token (a bank per modality) are recorded as the "
    "decision's positions: the replay is exact, but the routes name other experts than the model uses; only a "
    "shift the same for every row, or a group's, is refused",
)
def test_ids_shifted_by_a_per_token_offset_are_refused() -> None:
    """As a constant shift of the ids, but by an offset each token has of its own: the routes would name positions
    among the gate's scores while the block dispatches to the token's bank, with no error."""
    model = TwoLayers(BankOffsetBlock)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(torch.randn(T, D, generator=torch.Generator().manual_seed(1)))
    assert_untouched(model, before)


class HeadBankRouter(nn.Module):
    """A top-1 per head, fed each head's part of the token (``[tokens, H, D / H]``, so one row per head and token
    as ``[batch, positions, experts]`` scores have one per token), head ``h``'s positions handed on plus ``h * W``:
    its experts in one bank of ``H * W``."""

    heads, width = 2, 4

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = self.width, 1
        self.gate = nn.Linear(D // self.heads, self.width, bias=False)

    def forward(self, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = self.gate(parts).softmax(-1).topk(self.top_k, dim=-1)
        return w.flatten(1), (idx + torch.arange(self.heads)[None, :, None] * self.width).flatten(1)


class HeadBankBlock(RouterBlock):
    def __init__(self) -> None:
        super().__init__(HeadBankRouter())
        self.experts = Experts(HeadBankRouter.heads * HeadBankRouter.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x.view(x.shape[0], HeadBankRouter.heads, -1))
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_head_offsets_of_a_router_fed_each_heads_part_are_refused() -> None:
    """A router fed ``[tokens, H, D / H]`` has as many rows as its input has vectors, as one fed ``[batch, positions,
    D]``; its positions handed on only with their head's offset are no flat index beside the ids (see
    ``test_a_flat_index_beside_the_ids_of_batched_scores_is_no_group_offset``) but the ids the block uses: refused
    as a grouped choice's offsets, the model left as it was."""
    model = TwoLayers(HeadBankBlock)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"chooses in each of 2 groups of 4"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(torch.randn(T, D, generator=torch.Generator().manual_seed(1)))
    assert_untouched(model, before)


# ----------------------------------------------------------------------------- the time limit of probe runs
@pytest.mark.reliability("faults")
def test_a_stop_that_lands_anywhere_in_a_probe_runs_way_out_hangs_nothing() -> None:
    """Once a hang (seen once in the whole suite): the stop a probe run's timer raises in the running thread landed
    just as that thread took a lock on its way out (the timer's ``Event``), which stayed taken, and the thread's next
    take of it waited forever. The stop is raised here at each step of the way out in turn, after the run's own work
    ended (as a function begins, or as a call ends): every such run ends, returned or timed out."""
    from moe_replay import evidence

    def run(at: int, ended: list[str]) -> None:
        steps = {"after": False, "n": 0}

        def work() -> int:
            steps["after"] = True  # (from here on, each step of the way out is counted)
            return 7

        def trace(frame: Any, event: str, arg: Any) -> Any:
            if event == "return" and frame.f_code is evidence._within.__code__:
                steps["after"] = False  # (its way out ends: no stop is left to land after it)
            if steps["after"] and event in ("call", "return"):  # (where a stop fired from another thread lands: as a
                steps["n"] += 1  # function begins, or as the call of one ends)
                if steps["n"] == at:
                    raise evidence._Overtime
            return trace

        sys.settrace(trace)
        try:
            evidence._within(30.0, work)
            ended.append("returned")
        except evidence.ProbeTimeout:
            ended.append("timed out")
        finally:
            sys.settrace(None)

    for at in range(1, 40):
        ended: list[str] = []
        thread = threading.Thread(target=run, args=(at, ended), daemon=True)
        thread.start()
        thread.join(60.0)  # (a hang never ends; a run on a loaded machine may take seconds)
        if thread.is_alive():  # (every thread's stack: where the run waits or loops, and where the watchdog is)
            frames = sys._current_frames().items()
            stacks = "\n".join(f"thread {i}:\n{''.join(traceback.format_stack(f))}" for i, f in frames)
            pytest.fail(f"a stop raised at step {at} of the way out hung the run\n{stacks}")
        assert ended in (["returned"], ["timed out"])

    def spin() -> None:  # (a loop in Python that would run for a minute)
        end = time.monotonic() + 60.0
        while time.monotonic() < end:
            pass

    began = time.monotonic()
    with pytest.raises(evidence.ProbeTimeout):  # (and the limit itself still stops a run)
        evidence._within(0.05, spin)
    assert time.monotonic() - began < 30.0


@pytest.mark.reliability("faults")
def test_a_run_whose_thread_ended_without_disarming_is_never_stopped_again() -> None:
    """A run's thread that ended without disarming its limit (an exception landing as the run was handed over) left
    the watchdog raising its stop every quarter of a second, for ever, into that thread's id: once the id was reused
    by another thread, stops landed in code that was no probe run. The watchdog now drops a run whose thread ended."""
    from moe_replay import evidence

    armed: list[evidence._Armed] = []

    def leave_armed() -> None:
        arm = evidence._Armed(threading.get_ident(), 0.01)
        evidence._watchdog().put(arm)  # (and never disarmed)
        armed.append(arm)

    thread = threading.Thread(target=leave_armed)
    thread.start()
    thread.join()
    deadline = time.monotonic() + 30.0
    while not armed[0].done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert armed[0].done and not armed[0].fired


@pytest.mark.reliability("faults")
def test_a_probe_runs_time_limit_starts_no_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each router's first forward makes many probe runs on inputs of the probe's own making, each under a time limit:
    a timer thread started per run made the first step slow. One watchdog thread serves them all (started at most
    once here, where no earlier test started it), and still stops a run that outlives its limit, then none after."""
    from moe_replay import evidence

    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    assert [evidence._within(30.0, lambda i=i: i * 2) for i in range(20)] == [i * 2 for i in range(20)]

    def spin() -> None:
        end = time.monotonic() + 60.0
        while time.monotonic() < end:
            pass

    for _ in range(2):
        with pytest.raises(evidence.ProbeTimeout):
            evidence._within(0.05, spin)
    assert evidence._within(30.0, lambda: "after") == "after"
    time.sleep(0.6)  # (past the stopped runs' deadlines and repeats: no stop is left to land in this thread)
    assert sum(range(10)) == 45
    assert len(started) <= 1, started


@pytest.mark.reliability("faults")
@pytest.mark.skipif(not hasattr(time, "pthread_getcpuclockid"), reason="needs a thread's processor-time clock")
def test_a_probe_run_that_waits_is_not_stopped_for_the_time_it_waited(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe run's limit counts the processor time its thread runs: on a loaded machine (its process descheduled)
    or waiting on a device, a run slower in wall time than its limit is not stopped as one that loops, which made the
    router look like one whose forward runs or not by its scores, and refused it. A run that waits on and on still
    stops, after a multiple of its limit in wall time, and a spinning one at its limit."""
    from moe_replay import evidence

    def waits(seconds: float) -> str:  # (as a descheduled process: wall time passes, the thread runs nothing)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        return "done"

    assert evidence._within(0.1, waits, 0.5) == "done"
    monkeypatch.setattr(evidence, "_WAITING_FACTOR", 4.0)
    began = time.monotonic()
    with pytest.raises(evidence.ProbeTimeout):
        evidence._within(0.1, waits, 60.0)
    assert time.monotonic() - began < 30.0

    def spin() -> None:
        end = time.monotonic() + 60.0
        while time.monotonic() < end:
            pass

    began = time.monotonic()
    with pytest.raises(evidence.ProbeTimeout):
        evidence._within(0.05, spin)
    assert time.monotonic() - began < 30.0


@pytest.mark.reliability("faults")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_probe_runs_time_limit_still_stops_it_in_a_forked_child() -> None:
    """The watchdog thread that stops probe runs past their limit is not forked with the process (a data-loader
    worker, a launcher that forks): a child starts its own, so a run there that outlives its limit still stops
    instead of hanging."""
    from moe_replay import evidence

    assert evidence._within(30.0, lambda: 1) == 1  # (the parent's watchdog, started)

    def spin() -> None:
        end = time.monotonic() + 60.0
        while time.monotonic() < end:
            pass

    pid = os.fork()
    if pid == 0:  # (the child: exit 0 where the limit stopped the run)
        code = 1
        try:
            evidence._within(0.05, spin)
        except evidence.ProbeTimeout:
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 50.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child's run past its limit was never stopped")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.reliability("faults")
def test_each_function_a_probe_run_calls_is_read_for_its_operator_namespace_once() -> None:
    """Every call of every probe run asks whether its function is another library's operator (refused where it may
    choose out of sight) or a collective (refused before it runs): read once per function, the answer the same."""
    from moe_replay import evidence

    class Op:
        reads = 0

        @property
        def namespace(self) -> str:
            type(self).reads += 1
            return "mylib"

        def __call__(self) -> None:
            return None

    op = Op()
    assert [evidence._namespace(op) for _ in range(5)] == ["mylib"] * 5
    assert Op.reads == 1
    assert evidence._foreign(op) and not evidence._foreign(torch.topk)
    assert evidence._namespace(torch.ops.aten.topk) == evidence._namespace(torch.ops.aten.topk.default) == "aten"
    assert evidence._namespace(torch.topk) is None and evidence._namespace(lambda: None) is None


@pytest.mark.reliability("faults")
def test_generators_are_told_from_other_values_as_isinstance_tells_them() -> None:
    """The runs that establish a decision and tell a token order check every argument of every call for a generator
    to put back: read without torch's own ``isinstance`` check of ``torch.Generator`` (Python, on each value), with
    the same answer."""
    from moe_replay._code_settings import is_generator

    class Odd:
        def __getattr__(self, name: str) -> Any:
            raise KeyError(name)

    for value in (torch.Generator(), torch.default_generator, torch.zeros(2), None, 3, "g", Odd(), torch.Generator):
        assert is_generator(value) == isinstance(value, torch.Generator), value


@pytest.mark.reliability("faults")
def test_a_decision_is_established_with_no_more_plain_runs_than_its_noise_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runs that establish a decision run the forward as it is twice (its calls, and the run-to-run noise); the
    check that its rows follow the tokens in their order compares its changed runs with the second of those rather
    than a third such run of its own (one forward fewer per router at the first step). The check still refuses rows
    out of order (``test_a_single_top_k_over_tokens_in_an_order_no_setting_holds_is_refused_as_it_is_established`` in
    test_decisions.py, and its neighbours)."""
    from moe_replay import evidence

    plain = {"runs": 0}
    real = evidence._Prober.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        as_it_is = all(v is None or v is False or k == "trace" for k, v in kwargs.items())
        if self.limit is None and not args and as_it_is:
            plain["runs"] += 1  # (on the forward's own inputs, as they are: not those of the checks on other inputs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(evidence._Prober, "run", run)
    model = RouterBlock(LoggingInRouter())
    with mr.attach(model) as session, torch.no_grad():
        session.verify(torch.randn(T, D, generator=torch.Generator().manual_seed(0)))
    assert plain["runs"] == 2, plain
