"""A later choice by score made outside the router, in the module that holds it (or one above): a capacity drop by a
top-k of the weights the router returned, a sort of them, a threshold on them. The routes carry the router's choice,
not this one, so a replay would force the router's experts and make the later choice again from the current scores;
each is refused with a ``MoEReplayError`` naming the module and the line, the model left as it was. Blocks that only
dispatch by the router's ids (a sort of the ids, a one-hot mask), renormalise its weights, or log a statistic of them
(a ``max``, the share over a threshold) are not refused, and replay as by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot

D, E, K = 8, 4, 2


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


def _experts() -> nn.ModuleList:
    return nn.ModuleList([nn.Linear(D, D) for _ in range(E)])


def _capacity(tokens: int) -> int:
    return max(math.ceil(tokens * K / E) - 1, 1)


class _DropBlock(nn.Module):
    """Per expert, its (token, slot) pairs by ``nonzero``; over a capacity, a later choice among them by ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router()
        self.experts = _experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        ids, weights = self.router(tokens)
        out = torch.zeros_like(tokens)
        capacity = _capacity(tokens.size(0))
        for e, expert in enumerate(self.experts):
            if self.how == "threshold":
                pairs = ((ids == e) & (weights > 0.3)).nonzero()
            elif self.how == "shifted":
                pairs = ((ids == e) & ((weights - 0.3) > 0)).nonzero()
            else:
                pairs = (ids == e).nonzero()
            tok, slot = pairs[:, 0], pairs[:, 1]
            if self.how not in ("threshold", "shifted") and tok.numel() > capacity:
                w = weights[tok, slot]
                if self.how == "detached":
                    keep = torch.topk(w.detach(), capacity).indices
                elif self.how == "weights":
                    keep = torch.topk(w * 2.0, capacity).indices
                else:  # "sort"
                    keep = torch.argsort(w, descending=True)[:capacity]
                tok, slot = tok[keep], slot[keep]
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Scorer(nn.Module):
    """A module holding the router, returning its ids and weights (rescaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.router(tokens)
        return ids, weights / weights.sum(-1, keepdim=True)


class _GrandparentDrop(nn.Module):
    """The experts and the capacity drop two modules above the router (``scorer.router``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scorer = _Scorer()
        self.experts = _experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        ids, weights = self.scorer(tokens)
        out = torch.zeros_like(tokens)
        capacity = _capacity(tokens.size(0))
        for e, expert in enumerate(self.experts):
            tok, slot = (ids == e).nonzero().unbind(1)
            if tok.numel() > capacity:
                keep = weights[tok, slot].detach().topk(capacity).indices
                tok, slot = tok[keep], slot[keep]
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Ordinary(nn.Module):
    """Dispatch by the router's ids only: ``sorted`` (tokens reordered by expert id, grouped by counts), ``onehot`` (an
    expert mask and ``torch.where``), ``logged`` (a ``max`` of the weights and the share over a threshold kept as
    statistics, a ``max`` along the slots' values only), ``renorm`` (the weights renormalised and scaled first),
    ``nonzero`` (the slots the weights fill, by ``bool()`` and ``> 0`` of them: a dispatch mask, GShard's
    ``combine.bool()``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = _Router()
        self.experts = _experts()
        self.stats: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D)
        ids, weights = self.router(tokens)
        out = torch.zeros_like(tokens)
        if self.how == "renorm":
            weights = 1.5 * (weights / weights.sum(-1, keepdim=True))
        if self.how == "logged":
            peak = weights.max(dim=-1).values  # (a stable statistic: its indices unread)
            self.stats = [float(weights.max()), float((weights > 0.4).float().mean()), float(peak.mean())]
        if self.how == "sorted":
            order = torch.argsort(ids.view(-1), stable=True)
            counts = torch.bincount(ids.view(-1), minlength=E).tolist()
            rows = order // K
            flat_w = weights.view(-1)[order]
            start = 0
            for e, n in enumerate(counts):
                tok, w = rows[start : start + n], flat_w[start : start + n]
                out.index_add_(0, tok, self.experts[e](tokens[tok]) * w.unsqueeze(-1))
                start += n
            return out.view_as(x)
        if self.how == "nonzero":  # (the slots the decision filled: bool() and > 0 of its own weights, rescaled)
            live = weights.bool() & (weights * 2.0 > 0)
            for e, expert in enumerate(self.experts):
                tok, slot = ((ids == e) & live).nonzero().unbind(1)
                out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
            return out.view_as(x)
        mask = nn.functional.one_hot(ids, E).permute(2, 0, 1)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(mask[e])
            out[tok] += expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
        return out.view_as(x)


class _Stack(nn.Module):
    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([make()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(3))


def _router(model: nn.Module) -> _Router:
    return next(m for m in model.modules() if isinstance(m, _Router))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "line", "include"),
    [
        (lambda: _DropBlock("detached"), "keep = torch.topk(w.detach(), capacity)", None),
        (lambda: _DropBlock("weights"), "keep = torch.topk(w * 2.0, capacity)", None),
        (lambda: _DropBlock("sort"), "keep = torch.argsort(w, descending=True)", None),
        (lambda: _DropBlock("threshold"), "pairs = ((ids == e) & (weights > 0.3)).nonzero()", None),
        (lambda: _DropBlock("shifted"), "pairs = ((ids == e) & ((weights - 0.3) > 0)).nonzero()", None),
        (_GrandparentDrop, "keep = weights[tok, slot].detach().topk(capacity)", "layers.0.scorer.router"),
    ],
    ids=[
        "topk-of-detached-weights",
        "topk-of-scaled-weights",
        "sort-of-weights",
        "threshold-on-weights",
        "zero-threshold-on-shifted-weights",
        "grandparent",
    ],
)
def test_a_later_choice_by_the_routers_weights_outside_it_is_refused(
    make: Callable[[], nn.Module], line: str, include: str | None
) -> None:
    """Refused at the first capture with the module that chose and the line it chose at; the model as it was (the
    router two modules below the block named with ``include=``: zero configuration finds no router there)."""
    model = _Stack(make).eval()
    x = _x()
    with torch.no_grad():
        model(x)
    source = open(__file__).read().splitlines()
    lineno = next(i + 1 for i, text in enumerate(source) if line in text)
    before = snapshot(model)
    hooks = (len(model.layers[0]._forward_hooks), len(model.layers[0]._forward_pre_hooks))
    with pytest.raises(mr.MoEReplayError, match="choice by score") as info:
        with mr.attach(model, include=include) as session, torch.no_grad(), session.capture():
            model(x)
    assert isinstance(info.value, mr.UnsupportedRouterError)
    assert f"'layers.0' ({type(model.layers[0]).__name__})" in str(info.value), info.value
    assert f"test_cap60.py:{lineno}" in str(info.value), info.value
    assert_untouched(model, before)
    assert (len(model.layers[0]._forward_hooks), len(model.layers[0]._forward_pre_hooks)) == hooks


def test_the_drop_replays_silently_without_the_check() -> None:
    """The case tries something: with the router's ids forced by hand after it changes, the block's experts run on
    other tokens than the drop by the captured scores chose (the silent replay the refusal prevents)."""
    model = _Stack(lambda: _DropBlock("detached")).eval()
    x = _x()
    ran: list[list[int]] = []
    hook = model.layers[0].experts[0].register_forward_pre_hook(lambda m, a: ran.append(sorted(a[0][:, 0].tolist())))
    router = _router(model)
    with torch.no_grad():
        model(x)
        router.forced = router(x.reshape(-1, D))[0]
        router.gate.weight.mul_(-1.0)
        model(x)
    hook.remove()
    assert ran[0] != ran[1]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["sorted", "onehot", "logged", "renorm", "nonzero"])
def test_blocks_that_dispatch_by_the_ids_alone_replay_as_by_hand(how: str) -> None:
    """Not refused: a replay after the router changes gives the output of the changed model with the captured ids
    forced by hand."""
    model = _Stack(lambda: _Ordinary(how)).eval()
    x = _x()
    router = _router(model)
    with torch.no_grad():
        captured = router(x.reshape(-1, D))[0]  # (the first block's router sees the input's tokens)
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


class _Branch(nn.Module):
    """An ordinary block, then a dropping block run only where ``deep`` is set (not in the first forward)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([_Ordinary("onehot"), _DropBlock("detached")])
        self.deep = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layers[0](x)
        return x + self.layers[1](x) if self.deep else x


@pytest.mark.reliability("silent replays")
def test_a_later_choice_in_a_block_the_first_forward_did_not_run_is_refused_at_its_first_run() -> None:
    """The block's first run (watched on its own once the model's first forward passed without it) follows its
    router's returned values too: refused there, the model as it was once the session ends."""
    model = _Branch().eval()
    x = _x()
    before = snapshot(model)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        model.deep = True
        with pytest.raises(mr.UnsupportedRouterError, match=r"choice by score[\s\S]*'layers.1' \(_DropBlock\): topk"):
            with torch.no_grad(), session.capture():
                model(x)
    assert_untouched(model, before)
    assert not model.layers[1]._forward_hooks and not model.layers[1]._forward_pre_hooks
