"""False refusals of round 53, fixed generally: a record the block stores on its router (a tensor or a list of ints
its forward never reads) is no setting; the exact zeros of experts that end in a ReLU under a renormalised top-k are
no later choice; a top-k over the tokens' axis is refused as expert-choice routing. And what must still be refused
beside them: a held order the router reads, a record read by a name the code computes, a later cut by the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_evidence import D
from tests.test_public_routers6 import _Used, assert_exact, assert_refused, one_layer

E = 4


class _Gate(_Used):
    """A top-2 gate, softmax renormalised. ``order``: an order of its tokens it holds and reads (``x[self.order]``,
    its results put back in token order)."""

    def __init__(self, order: bool = False) -> None:
        super().__init__()
        self.w = nn.Linear(D, E, bias=False)
        self.order = torch.arange(6) if order else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is not None:
            x = x[self.order]
        p = self.w(x).softmax(-1)
        v, i = p.topk(2, dim=-1)
        if self.order is not None:
            back = torch.argsort(self.order)
            p, v, i = p[back], v[back], i[back]
        if self.forced is not None:
            i = self.forced.view_as(i)
            v = p.gather(-1, i)
        self.used = i
        return v / v.sum(-1, keepdim=True), i


class _ComputedGate(_Gate):
    """The gate, reading an attribute by a name it computes (``getattr``) before it runs: which attributes its code
    reads cannot be told."""

    label = "ids"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        getattr(self, "_".join(("last", self.label)))
        return super().forward(x)


class _Block(nn.Module):
    """A block over ``[tokens, d]`` that runs each token through its chosen experts. ``keep``: what it stores on its
    gate after the gate returns, for a loss read elsewhere (``"tensor"``: the ids; ``"list"``: them as ints;
    ``"order"``: a new order of the tokens, which the gate reads)."""

    def __init__(self, gate: _Gate, keep: str = "") -> None:
        super().__init__()
        self.gate, self.keep = gate, keep
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.gate.last_ids = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, i = self.gate(x)
        if self.keep == "tensor":
            self.gate.last_ids = i
        elif self.keep == "list":
            self.gate.last_ids = i.flatten().tolist()
        elif self.keep == "order":
            self.gate.order = self.gate.order.flip(0)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            m = i == e
            rows = m.any(-1)
            if rows.any():
                out[rows] = out[rows] + expert(x[rows]) * (w * m).sum(-1, keepdim=True)[rows]
        return out


def _tokens(n: int = 6) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("keep", ["tensor", "list"])
def test_a_record_the_block_stores_on_its_gate_replays_as_by_hand(keep: str) -> None:
    """The block stores the gate's ids on it after each forward (a tensor of integers, or them as a list of ints),
    read by no code of the gate's: no setting, so the gate replays exactly, in output and gradients as by hand."""
    session = assert_exact(one_layer(lambda: _Block(_Gate(), keep))(), _tokens())
    assert session.names == ("layers.0.gate",), session.names


@pytest.mark.reliability("silent replays")
def test_a_held_order_the_gate_reads_written_by_its_block_is_still_refused() -> None:
    """An order of the tokens the gate reads (``x[self.order]``), replaced by its block after each forward: a setting
    that changed inside the block, refused with a ``MoEReplayError`` that names it, the model left as it was."""
    model = one_layer(lambda: _Block(_Gate(order=True), "order"))()
    assert_refused(model, _tokens(), r"'order \(held\)' of router 'layers\.0\.gate'")


@pytest.mark.reliability("silent replays")
def test_a_record_read_by_a_computed_name_is_still_a_setting() -> None:
    """The same record, where the gate's code reads an attribute by a name it computes (``getattr(self, name)``):
    which attributes it reads cannot be told, so the record changed inside the block is refused as a setting."""
    model = one_layer(lambda: _Block(_ComputedGate(), "tensor"))()
    assert_refused(model, _tokens(), r"'last_ids( \(held\))?' of router 'layers\.0\.gate'")


class _ReluMoE(_Used):
    """A top-2 gate, softmax renormalised, that runs each token through its chosen experts itself; the experts end in
    a ReLU (exact zeros in their outputs of ``2 * d`` features, and in its own where both of a token's are zero).
    ``cut``: a minimum weight after the renormalisation (a later choice by the scores)."""

    def __init__(self, cut: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU()) for _ in range(E))
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.router(x).softmax(-1)
        v, i = p.topk(2, dim=-1)
        if self.forced is not None:
            i = self.forced.view_as(i)
            v = p.gather(-1, i)
        self.used = i
        w = v / v.sum(-1, keepdim=True)
        if self.cut:
            w = w * (w >= 0.3)
        out = x.new_zeros(x.shape[0], 2 * D)
        for e, expert in enumerate(self.experts):
            m = i == e
            rows = m.any(-1)
            if rows.any():
                out[rows] = out[rows] + expert(x[rows]) * (w * m).sum(-1, keepdim=True)[rows]
        return out


class _ReluBlock(nn.Module):
    """The ReLU experts' features (not hidden states: their zeros are compared) projected back to ``d``."""

    def __init__(self, cut: bool = False) -> None:
        super().__init__()
        self.moe = _ReluMoE(cut)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.moe(x))


@pytest.mark.reliability("false refusals")
def test_relu_experts_under_a_renormalised_top_k_replay_as_by_hand() -> None:
    """Experts that end in a ReLU (exact zeros in the block's output) under a renormalised top-k, run inside the
    router's own forward: the zeros come from the experts' own units, not from a choice by the scores, so the router
    replays exactly, in output and gradients as by hand."""
    session = assert_exact(one_layer(_ReluBlock)(), _tokens())
    assert session.names == ("layers.0.moe.router",), session.names


@pytest.mark.reliability("silent replays")
def test_a_minimum_weight_after_the_top_k_over_relu_experts_is_still_refused() -> None:
    """A minimum weight cut after the renormalisation, over the same ReLU experts: a later choice by the scores,
    refused as such, the model left as it was."""
    model = one_layer(lambda: _ReluBlock(cut=True))()
    assert_refused(model, _tokens(16), "chooses again from the current scores")


class _ExpertChoice(nn.Module):
    """Each expert takes the 2 tokens of ``[tokens, d]`` hidden states with its largest score (a top-k along dim 0
    of ``[tokens, experts]`` scores), weighted by their softmax over the experts."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1)
        _, rows = logits.topk(2, dim=0)
        mask = torch.zeros_like(probs).scatter(0, rows, 1.0)
        out = torch.stack([expert(x) for expert in self.experts], dim=-1)
        return (out * (probs * mask).unsqueeze(-2)).sum(-1)


@pytest.mark.reliability("refusals")
def test_a_top_k_over_the_tokens_of_two_dimensional_scores_is_refused_as_expert_choice() -> None:
    """A top-k along the tokens of ``[tokens, experts]`` scores: refused as expert-choice routing, not with the
    advice to put the experts last, where they are."""
    model = one_layer(_ExpertChoice)()
    assert_refused(model, _tokens(8), "expert-choice routing")
