"""The evidence of a decision, continued: what tells an underflow guard after the decision from a real cut, and
routers of very many experts established as fast as routers of few."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr

from .test_decisions2 import GuardedTopKBlock, outcome
from .tinymoe import RouterSpec, TinyMoE


class SmallWeightCutBlock(GuardedTopKBlock):
    """A bare gate (softened by ``scale``), the block's top-k softmax weights cut after the decision by ``cut``:
    the experts whose weight is under a thousandth dropped (weighed 0), a real choice from the scores. The
    reference forces the experts with their weights, none dropped."""

    def __init__(self, cut: Callable[[torch.Tensor], torch.Tensor], scale: float) -> None:
        super().__init__()
        self.cut = cut
        with torch.no_grad():
            self.gate.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.gate(x).softmax(-1).topk(self.top_k)
        self.last = idx.detach().clone()
        return self.experts.combine(x, self.cut(vals), idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate(x).softmax(-1).gather(-1, idx), idx)


SMALL_CUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "threshold": lambda w: F.threshold(w, 1e-3, 0.0),
    "hardshrink": lambda w: F.hardshrink(w, 1e-3),
}


def _peaked_first_token(x: torch.Tensor) -> torch.Tensor:
    """The first token made 30 times larger: its scores peaked, its largest weight ~1, as an attention sink's."""
    x = x.clone()
    x[0] *= 30
    return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("peaked", [False, True], ids=["plain", "peaked-token"])
@pytest.mark.parametrize("cut", list(SMALL_CUTS))
def test_a_cut_of_weights_under_a_thousandth_after_the_decision_is_refused(cut: str, peaked: bool) -> None:
    """Once silent: ``F.threshold(w, 1e-3, 0)`` after the top-k read as an underflow guard, since the values it cut
    were under a thousandth of the largest weight of the batch (a peaked token's ~1). The dropped slots were
    recorded as used, and the replay used them: its output was not the hand-forced one. A guard cuts only values
    that the token's own largest weight cannot tell from zero (the dtype's epsilon), so this cut is a choice."""
    got = outcome(lambda: SmallWeightCutBlock(SMALL_CUTS[cut], 0.3), inputs=_peaked_first_token if peaked else None)
    assert got.startswith("refused: router 'moe.gate': after its decision"), got


class GuardedTinyScoresBlock(GuardedTopKBlock):
    """Sigmoid scores pushed tiny by a bias (``bias``), floored by ``clamp_min(1e-30)``, and the top-k renormalised
    under ``clamp(min=1e-20)``: two underflow guards on a batch of tiny scores, no choice."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = bias

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x) + self.bias).clamp_min(1e-30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.scores(x).topk(self.top_k)
        self.last = idx.detach().clone()
        return self.experts.combine(x, vals / vals.sum(-1, keepdim=True).clamp(min=1e-20), idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = self.scores(x).gather(-1, idx)
        return self.experts.combine(x, w / w.sum(-1, keepdim=True).clamp(min=1e-20), idx)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("bias", "peaked"), [(-20.0, False), (-80.0, True)], ids=["tiny", "underflowing-peaked"])
def test_underflow_guards_on_a_batch_of_tiny_scores_replay_exactly(bias: float, peaked: bool) -> None:
    """The reverse of the cut above: guards whose cuts only floor values that underflowed, on scores that are all
    tiny (``sigmoid(-20)``) or underflow (``sigmoid(-80)``, floored at 1e-30), with a peaked token or without,
    are no choice: exact, not refused; so is the guarded renormalisation of a sharp gate with a peaked token."""
    inputs = _peaked_first_token if peaked else None
    assert outcome(lambda: GuardedTinyScoresBlock(bias), inputs=inputs) == "exact"
    if peaked:
        assert outcome(GuardedTopKBlock, inputs=inputs) == "exact"


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("lead", [(12,), (2, 6)], ids=["12-tokens", "2x6"])
def test_a_router_of_32769_experts_is_established_and_replays_exactly(lead: tuple[int, ...]) -> None:
    """Once ~20 s to establish (a router of 32,769 experts, 4 slots, 12 tokens): the check that its decision chooses
    among experts, not among tokens padded to its width, ran its forward on more tokens than it has experts. A
    decision whose scores follow the tokens row by row, with its positions in place, chooses per token; the
    forward on as many tokens as experts now runs only where that is not shown.

    The capture records the experts the router chose (the largest one among them); with the router moved, the
    replay routes every token to them, and the output is the hand-forced forward's."""
    e, k = 32769, 4
    model = TinyMoE([RouterSpec(e, k)], seed=0)
    x = model.inputs(lead, seed=0)
    with torch.no_grad():
        model.layers[0].router.weight[e - 1] = 10.0 * x.reshape(-1, model.hidden)[0]  # (expert e-1 chosen)
        native = model(x)
    chosen = model.layers[0].chosen.clone()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            assert torch.equal(model(x), native)
        routes = session.routes()
        assert session.sites[0].num_experts == e and session.sites[0].top_k == k
        assert torch.equal(routes.per_layer()[0].long(), chosen)
        assert int(routes.per_layer()[0].max()) == e - 1
        model.perturb(scale=3.0)
        with torch.no_grad():
            model(x)
        assert not torch.equal(model.layers[0].chosen, chosen)  # (free routing would take other experts)
        with torch.no_grad():
            want = model(x, forced=[chosen])
        with torch.no_grad(), session.replay(routes):
            got = model(x)
        assert torch.equal(model.layers[0].chosen, chosen)
        assert torch.equal(got, want)


_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("lead", [(12,), (2, 6)], ids=["12-tokens", "2x6"])
def test_a_router_is_established_through_the_row_order_runs_on_its_device_and_replays_exactly(
    lead: tuple[int, ...], device: str
) -> None:
    """Once refused with torch's own device error on a GPU: the runs that check a decision's rows against its tokens
    made their noise on the CPU and scaled it by a spread on the router's device. A router on either device is
    established through them, captured and replayed exactly."""
    model = TinyMoE([RouterSpec(16, 2)], seed=0).to(device)
    x = model.inputs(lead, seed=0).to(device)
    with torch.no_grad():
        native = model(x)
    chosen = model.layers[0].chosen.clone()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            assert torch.equal(model(x), native)
        routes = session.routes()
        assert torch.equal(routes.per_layer()[0].long().to(device), chosen)
        with torch.no_grad():
            weight = model.layers[0].router.weight
            weight.add_(3.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight))
            model(x)
            assert not torch.equal(model.layers[0].chosen, chosen)  # (free routing would take other experts)
            want = model(x, forced=[chosen])
        with torch.no_grad(), session.replay(routes):
            got = model(x)
        assert torch.equal(model.layers[0].chosen, chosen)
        assert torch.equal(got, want)


def _cut_under_a_thousandth(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[w < 1e-3] = 0
    return w


#: Floors after the decision: every expert given is weighed, none less than before (no choice among them).
SHARP_FLOORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum-clamp": lambda w: w / w.sum(-1, keepdim=True).clamp(min=1e-6),
    "clamp_min": lambda w: w.clamp_min(1e-6),
}
#: Cuts after the decision that drop (or all but drop) an expert: choices.
SHARP_CUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "index-cut": _cut_under_a_thousandth,
    "threshold-to-1e-9": lambda w: F.threshold(w, 0.1, 1e-9),
    "shifted-floor": lambda w: (w - 0.3).clamp_min(1e-6),
}


class SharpGateBlock(GuardedTopKBlock):
    """A very sharp gate (one weight ~1, the others underflowing to ~0) in ``dtype``, its top-k weights passed
    through ``after`` (a floor or a cut) after the decision."""

    def __init__(self, after: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.after, self.dtype = after, dtype
        with torch.no_grad():
            self.gate.weight.mul_(30.0)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x).to(self.dtype).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.scores(x).topk(self.top_k)
        self.last = idx.detach().clone()
        return self.experts.combine(x, self.after(vals).float(), idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.after(self.scores(x).gather(-1, idx)).float(), idx)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("after", "dtype"),
    [(name, torch.float32) for name in SHARP_FLOORS]
    + [("clamp_min", torch.bfloat16), ("index-cut", torch.bfloat16)]
    + [(name, torch.float32) for name in SHARP_CUTS],
    ids=lambda v: v if isinstance(v, str) else str(v).removeprefix("torch."),
)
def test_a_floor_above_epsilon_after_a_sharp_gate_replays_and_a_cut_is_refused(after: str, dtype: torch.dtype) -> None:
    """Once falsely refused: on a sharp gate (the forced experts' weights ~0), a floor above the dtype's epsilon
    (``clamp_min(1e-6)`` of the weights, or of their sum before a renormalisation, in float32) cut values that were
    not faint, and was taken for a choice. A cut that only raises values to a nonzero floor drops no expert: exact.
    A cut to zero (``w[w < 1e-3] = 0``), one that lowers values to a tiny one, or a floor of shifted weights (which
    lowers the weights under the shift) is still a choice: refused."""
    got = outcome(lambda: SharpGateBlock({**SHARP_FLOORS, **SHARP_CUTS}[after], dtype))
    if after in SHARP_FLOORS:
        assert got == "exact", got
    else:
        assert got.startswith("refused: router 'moe.gate': after its decision"), got
