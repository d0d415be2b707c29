"""A later choice by score made outside the router from the values it returned, by way of calls the watch did not
follow: joined with others (``torch.cat``, ``torch.stack``, ``F.pad``), multiplied into as many entries
(``weights @ M``, ``einsum``), scattered into a dense table, reduced per token, passed through a monotone function,
made Python numbers (``tolist()`` then ``sorted``, ``numpy()`` then ``argsort``, ``item()`` of each row of a Python
loop), or a threshold at zero of the raw logits a router returns (not its weights). Each replayed silently on other
tokens; each is now refused with a ``MoEReplayError`` naming the module and the line, at capture and at
``verify()``, the model left as it was. Blocks that only log or lose statistics of the values (an auxiliary loss, an
expert's load made a list, a z-loss of the logits) or combine by a dense table of them are not refused, and replay
as by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot

D, E, K = 8, 4, 2


class _Router(nn.Module):
    """Softmax scores of a bias-free Linear, their top-k weights and ids (and the logits first, where ``logits``);
    ``forced``: ids set by hand instead."""

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.logits = logits
        self.forced: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.gate(tokens)
        scores = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(scores, K, dim=-1)
        if self.forced is not None:
            ids = self.forced
            weights = scores.gather(1, ids)
        return (logits, weights, ids) if self.logits else (weights, ids)


def _keep(how: str, w: torch.Tensor, weights: torch.Tensor, tok: torch.Tensor, slot: torch.Tensor, cap: int) -> Any:
    """The positions among an expert's ``w`` (its tokens' weights) kept under its capacity, chosen by ``how``."""
    n = w.numel()
    if how == "cat":
        return torch.cat([w, w.new_zeros(1)]).topk(cap).indices
    if how == "matmul":
        return (weights @ torch.eye(K))[tok, slot].topk(cap).indices
    if how == "einsum":
        return torch.einsum("tk,kj->tj", weights, torch.eye(K))[tok, slot].topk(cap).indices
    if how == "stack":
        return torch.stack([w, w], -1).mean(-1).topk(cap).indices
    if how == "pad":
        return F.pad(w, (0, 1))[:n].topk(cap).indices
    if how == "total":  # (each token's total routing weight)
        return weights.sum(-1)[tok].topk(cap).indices
    if how == "exp":
        return w.exp().topk(cap).indices
    if how == "tolist":
        values = w.tolist()
        return torch.tensor(sorted(range(n), key=lambda i: -values[i])[:cap])
    if how == "numpy":
        return torch.from_numpy(np.argsort(-w.detach().cpu().numpy())[:cap].copy())
    if how == "argmax":  # (an arg-max by hand: each token's slots of its largest weight)
        return (weights == weights.max(-1, keepdim=True).values)[tok, slot].nonzero().squeeze(-1)[:cap]
    if how == "bucket":  # (the weights bucketed, those of one bucket kept)
        return ((w * 4).floor() == 2).nonzero().squeeze(-1)[:cap]
    if how == "hidden":  # (a product into as many columns as the hidden states have)
        return (weights @ torch.eye(K, D))[tok, slot].topk(cap).indices
    assert how == "rows"  # (a Python number per row of a loop over the weights)
    values = [row.item() for row in w]
    return torch.tensor(sorted(range(n), key=lambda i: -values[i])[:cap])


class _Drop(nn.Module):
    """Per expert, its (token, slot) pairs; over a capacity, those kept chosen by a score made from the weights by
    ``how``. ``dense``: the weights scattered into a ``[tokens, experts]`` table, each expert taking its best tokens
    along it; ``logits``: the slots whose raw logit is over zero."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router(logits=how == "logits")
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        routed = self.router(tokens)
        logits, weights, ids = routed if len(routed) == 3 else (None, *routed)
        out = torch.zeros_like(tokens)
        cap = max(math.ceil(tokens.size(0) * K / E) - 1, 1)
        if self.how == "dense":
            table = torch.zeros(tokens.size(0), E).scatter(1, ids, weights)
            best = table.topk(cap, dim=0).indices
            for e, expert in enumerate(self.experts):
                tok = best[:, e][table[best[:, e], e] > 0]
                out[tok] += expert(tokens[tok]) * table[tok, e].unsqueeze(-1)
            return out.view_as(x)
        for e, expert in enumerate(self.experts):
            if logits is not None:
                tok, slot = ((ids == e) & (logits.gather(1, ids) > 0)).nonzero().unbind(1)
            else:
                tok, slot = (ids == e).nonzero().unbind(1)
                if tok.numel() > cap:
                    keep = _keep(self.how, weights[tok, slot], weights, tok, slot, cap)
                    keep = keep[keep < tok.numel()]
                    tok, slot = tok[keep], slot[keep]
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Logged(nn.Module):
    """Dispatch by the router's ids, with statistics of its values kept as Python numbers (an auxiliary loss, each
    expert's load and mean weight as lists, the largest weight, a z-loss of the logits); ``dense``: combined by the
    weights scattered into a dense table, a mask of its nonzero entries made by a product with a one-hot."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router(logits=True)
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])
        self.stats: dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        logits, weights, ids = self.router(tokens)
        n = tokens.size(0)
        importance = torch.zeros(E).scatter_add(0, ids.reshape(-1), weights.reshape(-1)) / n
        load = F.one_hot(ids, E).float().mean((0, 1))
        self.stats = {
            "aux": (E * (importance * load).sum()).item(),
            "importance": importance.tolist(),
            "slots": weights.mean(0).tolist(),
            "largest": float(weights.max()),
            "z": torch.logsumexp(logits, -1).pow(2).mean().item(),
            "histogram": torch.histc(weights, 4).tolist(),
            "routed": (torch.zeros_like(logits).scatter(1, ids, weights) > 0).long().sum(0).tolist(),
        }
        out = torch.zeros_like(tokens)
        if self.how == "dense":
            table = torch.zeros(n, E).scatter(1, ids, weights)
            live = (weights.unsqueeze(1) @ F.one_hot(ids, E).float()).squeeze(1) > 0
            outs = torch.stack([expert(tokens) for expert in self.experts], 1)
            return torch.einsum("te,ted->td", table * live, outs).view_as(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Stack(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _model(make: type[nn.Module], how: str) -> _Stack:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _Stack(make(how)).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(3))


_LINES = {
    "cat": "return torch.cat([w, w.new_zeros(1)]).topk(cap)",
    "matmul": "return (weights @ torch.eye(K))[tok, slot].topk(cap)",
    "einsum": 'return torch.einsum("tk,kj->tj", weights, torch.eye(K))',
    "stack": "return torch.stack([w, w], -1).mean(-1).topk(cap)",
    "pad": "return F.pad(w, (0, 1))[:n].topk(cap)",
    "total": "return weights.sum(-1)[tok].topk(cap)",
    "exp": "return w.exp().topk(cap)",
    "tolist": "values = w.tolist()",
    "numpy": "return torch.from_numpy(np.argsort(-w.detach().cpu().numpy())",
    "rows": "values = [row.item() for row in w]",
    "argmax": "return (weights == weights.max(-1, keepdim=True).values)[tok, slot].nonzero()",
    "bucket": "return ((w * 4).floor() == 2).nonzero()",
    "dense": "best = table.topk(cap, dim=0).indices",
    "logits": "tok, slot = ((ids == e) & (logits.gather(1, ids) > 0)).nonzero()",
}


def _line(how: str) -> int:
    source = open(__file__).read().splitlines()
    return next(i + 1 for i, text in enumerate(source) if _LINES[how] in text)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", list(_LINES))
def test_a_later_choice_by_values_made_from_the_routers_is_refused(how: str) -> None:
    """Refused at the first capture with the module that chose and the line it chose at; the model as it was."""
    model = _model(_Drop, how)
    x = _x()
    before = snapshot(model)
    with pytest.raises(mr.MoEReplayError, match="choice by score") as info:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert isinstance(info.value, mr.UnsupportedRouterError)
    assert "'layers.0' (_Drop)" in str(info.value), info.value
    assert f"test_review70.py:{_line(how)}" in str(info.value), info.value
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["cat", "tolist"])
def test_verify_refuses_a_later_choice_by_the_routers_values(how: str) -> None:
    """``verify()`` follows the values a router returns as a capture's first forward does: refused there too."""
    model = _model(_Drop, how)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_Drop\)"):
        with mr.attach(model) as session:
            session.verify(_x())
    assert_untouched(model, before)


@pytest.mark.parametrize("how", ["cat", "tolist", "logits", "argmax", "hidden"])
def test_the_later_choices_replay_silently_without_the_check(how: str) -> None:
    """The cases try something: with the router's ids forced by hand after it changes, the block's experts run on
    other tokens than the choice by the captured scores did (the silent replay the refusal prevents)."""
    model = _model(_Drop, how)
    x = _x()
    block = model.layers[0]
    ran: list[list[list[float]]] = []
    hooks = [ex.register_forward_pre_hook(lambda m, a: ran.append(sorted(a[0].tolist()))) for ex in block.experts]
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


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", ["loop", "dense"])
def test_statistics_of_the_routers_values_kept_as_python_numbers_are_no_choice(how: str) -> None:
    """Not refused: an auxiliary loss, loads and mean weights as lists, a histogram, a z-loss of the logits, the tokens
    each expert got by ``> 0`` of a table of the weights scattered into ``zeros_like(logits)``, and a
    combine by a dense table of the weights (its nonzero mask made by a product with a one-hot); a replay after the
    router changes gives the output of the changed model with the captured ids forced by hand."""
    model = _model(_Logged, how)
    x = _x()
    router = model.layers[0].router
    with torch.no_grad():
        captured = router(x.reshape(-1, D))[-1]
    with mr.attach(model) as session:
        session.verify(x)
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
    assert isinstance(model.layers[0].stats["importance"], list)


@pytest.mark.reliability("silent replays")
def test_a_later_choice_by_a_product_as_wide_as_the_hidden_states_is_refused() -> None:
    """Once silent: a product of the weights into as many columns as the hidden states have was taken for a combine
    of the experts' outputs and not followed. Now a product is a combine only where its other operand is made from
    the forward's input: refused at the first capture with the module that chose; the model as it was."""
    model = _model(_Drop, "hidden")
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.0' \(_Drop\)"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)
