"""Refusals of routers that draw from the random stream name the actual cause: a draw that chooses the experts
(``torch.multinomial``, a coin ``rand_like(p) < p``) is named with its line as a sampling, which cannot be replayed;
noise drawn before the decision that leaves a forced expert's weight at exactly zero is said to be that, with the
draw and its line, not a choice made again after the decision; a draw after the decision that chooses again is named
with its line. What is refused is unchanged; the model is left as it was."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import RouterBlock, TwoLayers
from tests.test_public_routers2 import _x
from tests.test_public_routers5 import SampledRouter
from tests.test_public_routers6 import _Used
from tests.test_public_routers40 import MoDENet, MoDERouterCond, NanoMoERouter, _loud_noise_nanomoe, _mode_inputs

D, E = 8, 4


def _line_of(func: Callable[..., object], text: str) -> int:
    """The line of ``func``'s source that holds ``text`` (once)."""
    lines, start = inspect.getsourcelines(func)
    hits = [start + n for n, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _refusal(model: nn.Module, x: object, *, train: bool = True) -> str:
    """The message of the ``MoEReplayError`` the first capture raises, the model left as it was."""
    model.train(train)
    before = snapshot(model)
    with pytest.raises(mr.MoEReplayError) as caught:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert_untouched(model, before)
    return str(caught.value)


@pytest.mark.reliability("bad inputs")
def test_noise_before_the_decision_that_zeroes_a_forced_weight_is_refused_naming_the_zero_weight_and_the_draw() -> None:
    """nanoMoE's noisy top-k (``randn_like`` noise added to the logits before the ``topk``) with noise loud enough that
    a forced expert's weight underflows to exactly zero: refused as a forced expert's weight that is exactly zero,
    naming the draw and its line as made before the decision, not as a choice drawn again after it."""
    msg = _refusal(_loud_noise_nanomoe(), torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(7)))
    line = _line_of(NanoMoERouter.forward, "torch.randn_like")
    assert "a forced expert's weight is exactly zero under one random state" in msg, msg
    assert re.search(rf"randn_like at test_public_routers40\.py:{line}, before its decision", msg), msg
    assert "chooses again" not in msg, msg
    assert "model.eval()" in msg, msg


@pytest.mark.reliability("bad inputs")
def test_experts_sampled_by_multinomial_are_refused_naming_the_call_and_its_line() -> None:
    """MoDE's ``RouterCond`` samples its experts in training (``torch.multinomial``): the refusal names that call and
    its line, says sampling cannot be replayed and suggests ``model.eval()``, where it was a generic 'no decision-like
    call changes the output'."""
    msg = _refusal(MoDENet(), _mode_inputs())
    line = _line_of(MoDERouterCond.forward, "torch.multinomial")
    assert re.search(rf"its experts are sampled: multinomial at test_public_routers40\.py:{line}\b", msg), msg
    assert "sampling cannot be replayed" in msg, msg
    assert "model.eval()" in msg, msg
    assert "no decision-like call in its forward changes the output" not in msg, msg


class CoinRouter(nn.Module):
    """Each expert kept by a coin of its own probability (``rand_like(p) < p``, a Bernoulli draw by hand), the kept
    probabilities the weights: no decision-like call at all."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        keep = torch.rand_like(probs) < probs
        return probs * keep


class CoinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.router = CoinRouter()
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.router(x)
        return x + sum(w[:, e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


@pytest.mark.reliability("bad inputs")
def test_experts_kept_by_a_coin_drawn_by_hand_are_refused_naming_the_draw_and_its_line() -> None:
    """A coin drawn by hand (``rand_like(p) < p``) that keeps each expert: its integers (booleans) are made of the
    draw by no decision-like call, so the refusal names ``rand_like`` with its line as a sampling."""
    msg = _refusal(CoinBlock(), torch.randn(6, D, generator=torch.Generator().manual_seed(1)))
    line = _line_of(CoinRouter.forward, "torch.rand_like")
    assert re.search(rf"its experts are sampled: rand_like at test_review84\.py:{line}\b", msg), msg
    assert "sampling cannot be replayed" in msg, msg


class SecondByCoinRouter(_Used):
    """A top-2 whose second expert is kept by a fair coin drawn after the decision (its weight zeroed otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        weights, ids = probs.topk(2, dim=-1)
        if self.forced is not None:
            ids = self.forced
            weights = probs.gather(-1, ids)
        self.used = ids
        coin = torch.rand(ids.shape[0], 1) < 0.5
        keep = torch.cat([torch.ones_like(coin), coin], dim=-1)
        return weights * keep, ids


class SecondByCoinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.router = SecondByCoinRouter()
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.router(x)
        out = x.clone()
        for e, expert in enumerate(self.experts):
            hit = (ids == e) & (w != 0)
            rows = hit.any(-1).nonzero().flatten()
            if rows.numel():
                out[rows] += (w * hit).sum(-1, keepdim=True)[rows] * expert(x[rows])
        return out


@pytest.mark.reliability("bad inputs")
def test_a_coin_drawn_after_the_decision_is_refused_as_chosen_again_naming_the_draw_and_its_line() -> None:
    """A second expert kept by a coin drawn after the decision: still refused as a choice drawn again after the
    decision, now naming the draw (``rand``) and its line."""
    msg = _refusal(SecondByCoinBlock(), torch.randn(6, D, generator=torch.Generator().manual_seed(2)))
    line = _line_of(SecondByCoinRouter.forward, "torch.rand(")
    assert re.search(rf"draws from the random stream and chooses again \(rand at test_review84\.py:{line}\)", msg), msg


class SoftRouterSampledAside(nn.Module):
    """Soft routing (every expert weighted by its probability) that also samples an expert per token with
    ``torch.multinomial`` for a statistic it keeps, never reaching the output."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.sampled: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        self.sampled = torch.bincount(torch.multinomial(probs, 1).flatten(), minlength=E)
        return probs


class SoftBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.router = SoftRouterSampledAside()
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.router(x)
        return x + sum(w[:, e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


@pytest.mark.reliability("bad inputs")
def test_a_sampling_that_does_not_reach_the_output_is_not_named_as_the_cause() -> None:
    """A ``multinomial`` drawn aside (a statistic) while the output does not move with the random state is no cause
    of the refusal: it is not named as a sampling of the experts; the soft routing, the actual cause, is."""
    msg = _refusal(SoftBlock(), torch.randn(6, D, generator=torch.Generator().manual_seed(3)))
    assert "its experts are sampled" not in msg, msg
    assert "its forward makes no decision-like call" in msg, msg


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("how", "call", "text"),
    [
        ("multinomial", "multinomial", "torch.multinomial("),
        ("categorical", "multinomial", "Categorical("),  # (its sample() draws by torch.multinomial)
        ("inverse-cdf", "rand", "torch.rand("),
    ],
)
def test_a_draw_that_chooses_with_no_decision_like_call_is_named_with_its_line(how: str, call: str, text: str) -> None:
    """An expert drawn from the router's softmax (``multinomial``, a ``Categorical`` sample, an inverse-CDF draw by
    hand from ``rand``) with no decision-like call in the forward: still refused as making none, and the draw that
    chose is named with the line of the router's code that made it, as a sampling that cannot be replayed."""
    msg = _refusal(TwoLayers(lambda: RouterBlock(SampledRouter(how))), _x())
    line = _line_of(SampledRouter.forward, text)
    assert "makes no decision-like call" in msg, msg
    assert re.search(rf"its experts are sampled: {call} at test_public_routers5\.py:{line}\b", msg), msg
    assert "sampling cannot be replayed" in msg, msg
