"""A false refusal of round 54, fixed generally: integers or booleans made from the scores (the rows of
``nonzero(gates)`` that Rau's ``SparseDispatcher`` sends each expert) only place other values, so an expert's ReLU of
its own units of rows gathered by them is no later choice from the scores. And what must still be refused beside
it: a ReLU of the gathered weights themselves, and rows picked by a threshold of the scores before ReLU experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_public_routers6 import assert_exact, assert_refused
from tests.test_public_routers37 import (
    MoEFusionEncoder,
    RauModel,
    RauSparseMoE,
    TCMoAFusion,
    TCMoAMMoE,
    _combine,
    _images,
    _SparseDispatcher,
)

#: the weight under which the refused variants below drop an expert after the decision
_CUT = 0.3


def _tokens() -> torch.Tensor:
    return torch.randn(10, 16, generator=torch.Generator().manual_seed(3))


class _TCMoAUncut(TCMoAMMoE):
    """TC-MoA's gate over its ReLU adapters without the dispatcher's in-place cut of weights at or under ``1e-4``."""

    def forward(self, x: torch.Tensor, task_index: int, loss_coef: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        gates, _ = self.noisy_top_k_gating(x, self.training, task_index)
        dispatcher = _SparseDispatcher(self.num_experts, gates)
        expert_inputs = dispatcher.dispatch(x)
        expert_outputs = [self.experts[i](expert_inputs[i]) for i in range(self.num_experts)]
        return _combine(dispatcher, gates, expert_outputs), gates.sum() * 0


class _RauReluOfWeights(RauSparseMoE):
    """Rau's block whose gathered weights are cut by a ReLU after the decision (``relu(w - t)``): a weight under
    the threshold drops its expert's row from the combine, a later choice made from the scores."""

    def forward(self, x: torch.Tensor, loss_coef: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
        gates, _ = self._gating(x, self.w_gate, self.w_noise, self.training, 1e-2)
        dispatcher = _SparseDispatcher(self.num_experts, gates)
        dispatcher._nonzero_gates = F.relu(dispatcher._nonzero_gates - _CUT)
        expert_outputs = [self.experts[i](rows) for i, rows in enumerate(dispatcher.dispatch(x))]
        return _combine(dispatcher, gates, expert_outputs), gates.sum() * 0


class _RauRowsByThreshold(RauSparseMoE):
    """Rau's block whose dispatcher takes only the gates over a threshold (``gates * (gates > t)``): an expert's rows,
    gathered by ``nonzero`` of those, are picked by a later choice made from the scores before its ReLU reads them."""

    def forward(self, x: torch.Tensor, loss_coef: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
        gates, _ = self._gating(x, self.w_gate, self.w_noise, self.training, 1e-2)
        gates = gates * (gates > _CUT)
        dispatcher = _SparseDispatcher(self.num_experts, gates)
        expert_outputs = [self.experts[i](rows) for i, rows in enumerate(dispatcher.dispatch(x))]
        return _combine(dispatcher, gates, expert_outputs), gates.sum() * 0


def _rau(cls: type[RauSparseMoE]) -> RauModel:
    model = RauModel()
    model.moe.__class__ = cls  # (the same parameters, another forward)
    return model


@pytest.mark.reliability("false refusals")
def test_moe_fusion_relu_conv_experts_in_training_replay_after_the_gates_change_much() -> None:
    """MoE-Fusion's local experts (ReLU convolutions behind Rau's dispatcher) in training, noisy gating on, replay
    exactly after the gates change as much as any other router's test changes them (they were refused, the
    experts' ReLU taken for a later choice made from the scores)."""
    session = assert_exact(MoEFusionEncoder(), _images(), train=True)
    assert session.names == ("moe_fg",), session.names


@pytest.mark.reliability("false refusals")
def test_tc_moa_gate_without_its_cut_replays_as_by_hand() -> None:
    """TC-MoA's task-sliced gate over its ReLU adapters, the dispatcher's cut of small weights left out: with the
    decision held, each adapter's rows are fixed, so its ReLU is no choice and the replay is exact."""
    model = TCMoAFusion(task_index=2)
    model.adapter.MoA.__class__ = _TCMoAUncut
    xt = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    session = assert_exact(model, xt, include=TCMoAMMoE)
    assert session.names == ("adapter.MoA",), session.names


@pytest.mark.reliability("silent replays")
def test_relu_of_the_dispatched_weights_is_still_refused() -> None:
    """A ReLU of the weights the dispatcher gathered (``relu(w - t)``) is a later choice from the scores: refused,
    naming the line of the cut, the model as it was. (On these tokens the cut drops some expert's row.)"""
    model = _rau(_RauReluOfWeights)
    with torch.no_grad():
        gates, _ = model.moe._gating(_tokens(), model.moe.w_gate, model.moe.w_noise, False, 1e-2)
    assert bool(((gates > 0) & (gates <= _CUT)).any()), "the cut must drop a row on these tokens"
    assert_refused(model, _tokens(), r"chooses again from the current scores \(at [^)]*test_review72\.py:\d+")


@pytest.mark.reliability("silent replays")
def test_relu_experts_fed_rows_picked_by_a_threshold_of_the_scores_are_still_refused() -> None:
    """Rows sent to ReLU experts by ``nonzero`` of gates cut at a threshold after the decision: the threshold is a
    later choice from the scores (the ReLU after it is not what is refused), so the block is refused."""
    model = _rau(_RauRowsByThreshold)
    assert_refused(model, _tokens(), r"chooses again from the current scores \(at [^)]*test_review72\.py:\d+")
