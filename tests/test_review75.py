"""An underflow guard after the decision (``w / clamp(w.sum(), min=eps)``) is no later choice: where a sharp gate's
held decision leaves a token's kept weights at zero on the other inputs the check runs on, the guard holds nothing,
so a ``.bool()`` of the combine tensor (GShard's dispatch mask, as FairScale's and DeepSpeed's ``top2gating`` make
it) reads the router's own zeros there, not a NaN of ``0 / 0`` taken for an expert kept. Such a gate replays exactly
whatever its sharpness and whatever forwards ran before (a free one under ``no_grad`` establishes its decision
afresh, on the gate as it is then), while a real cut by weight after the same guard stays refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_public_routers6 import _Used, assert_exact, assert_refused

D, E = 16, 4


def _gumbel(shape: torch.Size) -> torch.Tensor:
    return torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(shape)


class DeepSpeedStyleTop2Gate(_Used):
    """DeepSpeed's ``top2gating``: the first expert by ``argmax`` of the softmax, Gumbel noise added to the logits IN
    PLACE and the second by ``argmax`` with the first masked to -inf, a capacity by position (the second choices after
    all first ones), the two gates read by ``einsum`` and renormalised by in-place divisions over a sum clamped at
    eps; the combine tensor and its ``.bool()``. ``min_weight``: a cut of second experts weighed under it (a real
    later choice by score, not DeepSpeed's)."""

    def __init__(self, min_weight: float = 0.0) -> None:
        super().__init__()
        self.wg = nn.Linear(D, E, bias=False)
        self.min_weight = min_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.wg.weight.float())
        gates = F.softmax(logits, dim=1)
        num_tokens = gates.shape[0]
        capacity = max(math.ceil(2 * num_tokens / E), 1)
        indices1_s = torch.argmax(gates, dim=1)
        if self.forced is not None:
            indices1_s = self.forced[:, 0]
        mask1 = F.one_hot(indices1_s, num_classes=E)
        logits += _gumbel(logits.shape)
        logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
        indices2_s = torch.argmax(logits_except1, dim=1)
        if self.forced is not None:
            indices2_s = self.forced[:, 1]
        self.used = torch.stack([indices1_s, indices2_s], 1)
        mask2 = F.one_hot(indices2_s, num_classes=E)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1
        locations2 += torch.sum(mask1, dim=0, keepdim=True)
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        locations2_s = torch.sum(locations2 * mask2, dim=1)
        gates1_s = torch.einsum("se,se->s", gates, mask1.float())
        gates2_s = torch.einsum("se,se->s", gates, mask2.float())
        denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
        gates1_s /= denom_s
        gates2_s /= denom_s
        if self.min_weight:
            gates2_s = gates2_s * (gates2_s > self.min_weight)
        combine1 = torch.einsum(
            "se,sc->sec", gates1_s[:, None] * mask1.float(), F.one_hot(locations1_s, capacity).float()
        )
        combine2 = torch.einsum(
            "se,sc->sec", gates2_s[:, None] * mask2.float(), F.one_hot(locations2_s, capacity).float()
        )
        combine_weights = combine1 + combine2
        return combine_weights, combine_weights.bool()


class DeepSpeedStyleBlock(nn.Module):
    """A norm, the gate, and GShard's ``einsum`` dispatch into ``[E, C, d]`` by the ``.bool()`` mask and combine."""

    def __init__(self, min_weight: float = 0.0, sharpness: float = 1.0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(D)
            self.gate = DeepSpeedStyleTop2Gate(min_weight)
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        with torch.no_grad():
            self.gate.wg.weight.mul_(sharpness)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).reshape(-1, D)
        combine, dispatch = self.gate(h)
        dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), h)
        out = torch.stack([expert(dispatched[e]) for e, expert in enumerate(self.experts)])
        return x + torch.einsum("sec,ecm->sm", combine, out).reshape(x.shape)


def _tokens() -> torch.Tensor:
    return torch.randn(2, 8, D, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("sharpness", [1.0, 30.0], ids=["soft", "sharp"])
def test_a_deepspeed_style_top2_gate_with_an_underflow_guard_replays_after_a_free_no_grad_forward(
    sharpness: float,
) -> None:
    """DeepSpeed's ``top2gating`` under a gate changed far (and, sharp, with logits far apart from the start): the
    free forward under ``no_grad`` between the capture and the replay establishes the decision afresh on the changed
    gate, whose held decision on other inputs leaves tokens' kept weights at zero. The clamp at eps guards those
    zeros and chooses nothing, so the replay is that of the recorded experts forced by hand."""
    session = assert_exact(DeepSpeedStyleBlock(sharpness=sharpness), _tokens(), change=3.0)
    assert session.names == ("gate",), session.names


@pytest.mark.reliability("false refusals")
def test_a_sharp_deepspeed_style_top2_gate_is_captured_and_verified() -> None:
    """The gate sharp from the start (a decision established only on logits far apart, no gentler state before it):
    the capture records the experts the gate used and ``verify`` names one decision of two of four experts."""
    model = DeepSpeedStyleBlock(sharpness=30.0).eval()
    x = _tokens()
    with mr.attach(model) as session:
        torch.manual_seed(3)
        with torch.no_grad(), session.capture():
            model(x)
        rows = session.routes().layer("gate")
        used = model.gate.used
        assert used is not None
        assert torch.equal(rows.long().sort(-1).values, used.long().sort(-1).values)
        torch.manual_seed(3)
        report = session.verify(x)
        assert [(ev.top_k, ev.num_experts) for ev in report.evidence.values()] == [(2, E)], str(report)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("sharpness", [1.0, 30.0], ids=["soft", "sharp"])
def test_a_cut_by_weight_after_the_underflow_guard_stays_refused(sharpness: float) -> None:
    """The same gate dropping second experts weighed under 0.2 after the guard: a later choice by score, which a
    replay would make afresh on its own scores. Refused, saying so, the model as it was."""
    assert_refused(DeepSpeedStyleBlock(min_weight=0.2, sharpness=sharpness), _tokens(), "chooses again")
