"""MoE code of in-context reinforcement learning and multi-task vision, with zero configuration (see
``test_public_routers32``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_evidence import D
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _Used, assert_exact


def _seq(seq: int = 5) -> torch.Tensor:
    return torch.randn(2, seq, D, generator=torch.Generator().manual_seed(1))


def _one_block(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of a residual stack of one block, its parameters drawn from a fixed seed (the global generator left
    as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            stack = ResidualStack(make)
        del stack.layers[1]
        return stack

    return build


# ----------------------------------------------------------------------- T2MIR: a gate and its frozen EMA target
# NJU-RL/T2MIR T2MIR-DPT/algorithms/moe.py (``TopKBalancedNoisyGate``, ``LinearGLUExperts``, ``UniversalCalculator``,
# ``LinearGLUMoELayerContrastive``; the task-wise MoE of "Mixture-of-Experts Meets In-Context Reinforcement
# Learning"): the layer holds two gates of the same class, ``gate`` and ``gate_target`` (a frozen copy that the
# trainer moves towards ``gate`` by a soft update; only its logits are used, by a contrastive loss). Each gate's MLP
# (``Linear``, ``Tanh``, ``Linear``, no biases) gives logits; ``topk`` takes the ``k + 1`` best of them and keeps
# the first ``k`` ids, softmaxed in fp32; the scores are scattered into zeros for the importance and load statistics.
# The calculator sorts the ids, ``bincount(...).tolist()`` splits the sorted rows among the experts (each a slice of
# up / down weights of a ``ParameterList``), multiplies by the scores and ``index_add``s back. With
# ``task_hard_router`` both gates score the mean over the sequence, and the chosen ids and scores of a sequence are
# expanded to its every token. Noise and the balance loss are off (the contrastive layer's defaults).
class TopKBalancedNoisyGate(_Used):
    def __init__(self, input_size: int, num_experts: int, num_selects: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.gate_network = nn.Sequential(
            nn.Linear(input_size, num_experts, bias=False),
            nn.Tanh(),
            nn.Linear(num_experts, num_experts, bias=False),
        )
        self.softmax = nn.Softmax(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_gate = self.gate_network(x)
        logits = logits_gate
        top_logits, top_indices = logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, : self.num_selects]
        top_k_indices = top_indices[:, : self.num_selects]
        if self.forced is not None:
            top_k_indices = self.forced
            top_k_logits = logits.gather(1, top_k_indices)
        self.used = top_k_indices
        top_k_scores = self.softmax(top_k_logits.to(torch.float32))
        top_k_scores = top_k_scores.to(logits.dtype)
        zeros = torch.zeros_like(logits, requires_grad=True, device=logits.device)
        scores_filtered = zeros.scatter(dim=1, index=top_k_indices, src=top_k_scores)
        importance = scores_filtered.sum(0)
        load = (scores_filtered > 0).sum(0)
        return {
            "topK_indices": top_k_indices,
            "topK_scores": top_k_scores,
            "balance_loss": torch.tensor(-100.0, device=x.device),
            "load": load,
            "importance": importance,
            "gate_logits": logits_gate,
        }


class LinearGLUExperts(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, num_experts: int) -> None:
        super().__init__()
        size = hidden_features // num_experts
        self.num_experts = num_experts
        self.act_fn = nn.SiLU()
        self.dropout = nn.Dropout(0.4)
        self.weight_up = nn.ParameterList(
            nn.Parameter(torch.randn(size, in_features) * 0.3) for _ in range(num_experts)
        )
        self.weight_down = nn.ParameterList(
            nn.Parameter(torch.randn(in_features, size) * 0.3) for _ in range(num_experts)
        )
        self.bias_up = nn.ParameterList(nn.Parameter(torch.randn(size) * 0.1) for _ in range(num_experts))
        self.bias_down = nn.ParameterList(nn.Parameter(torch.randn(in_features) * 0.1) for _ in range(num_experts))

    def forward(self, input: torch.Tensor, i: int) -> torch.Tensor:
        up = F.linear(input, self.weight_up[i], self.bias_up[i])
        return F.linear(self.dropout(self.act_fn(up)), self.weight_down[i], self.bias_down[i])


class UniversalCalculator(nn.Module):
    def __init__(self, experts: LinearGLUExperts) -> None:
        super().__init__()
        self.experts = experts
        self.num_experts = experts.num_experts

    def forward(self, x: torch.Tensor, topK_indices: torch.Tensor, topK_scores: torch.Tensor) -> torch.Tensor:
        batch_size = topK_indices.size(0)
        num_selects = topK_indices.size(1)
        topK_indices = topK_indices.flatten()
        topK_scores = topK_scores.flatten()
        batch_indices = torch.arange(batch_size, device=topK_scores.device).repeat_interleave(num_selects)
        _, index_sorted_topK_indices = topK_indices.sort(0)
        sorted_topK_scores = topK_scores.index_select(0, index_sorted_topK_indices)
        sorted_batch_indices = batch_indices.index_select(0, index_sorted_topK_indices)
        expert_batch_size = topK_indices.bincount(minlength=self.num_experts).tolist()
        sorted_x = x.index_select(0, sorted_batch_indices)
        split_x = torch.split(sorted_x, expert_batch_size, dim=0)
        expert_outputs = [self.experts(split_x[i], i) for i in range(self.num_experts) if split_x[i].shape[0] > 0]
        cat_expert_outputs = torch.cat(expert_outputs, 0)
        cat_expert_outputs = torch.mul(cat_expert_outputs, sorted_topK_scores.reshape(-1, 1) * 1.0)
        zeros = torch.zeros((batch_size, cat_expert_outputs.size(1)), dtype=cat_expert_outputs.dtype)
        return zeros.index_add(0, sorted_batch_indices, cat_expert_outputs)


class LinearGLUMoELayerContrastive(nn.Module):
    def __init__(self, hard_router: bool, num_experts: int = 4, num_selects: int = 2) -> None:
        super().__init__()
        self.input_size = D
        self.num_selects = num_selects
        self.hard_router = hard_router
        self.gate = TopKBalancedNoisyGate(D, num_experts, num_selects)
        self.gate_target = TopKBalancedNoisyGate(D, num_experts, num_selects)
        self.gate_target.gate_network.requires_grad_(False)  # ``freeze`` and ``hard_update``
        self.gate_target.gate_network.load_state_dict(self.gate.gate_network.state_dict())
        self.calculator = UniversalCalculator(LinearGLUExperts(D, 4 * num_experts, num_experts))
        self.gate_logits_target: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original_shape = x.shape[:-1]
        if self.hard_router:
            gate_outputs = self.gate(x.mean(dim=1))
            gate_outputs_target = self.gate_target(x.mean(dim=1).detach())
            gate_outputs["topK_indices"] = (
                gate_outputs["topK_indices"].unsqueeze(1).expand(-1, x.shape[1], -1).reshape(-1, self.num_selects)
            )
            gate_outputs["topK_scores"] = (
                gate_outputs["topK_scores"].unsqueeze(1).expand(-1, x.shape[1], -1).reshape(-1, self.num_selects)
            )
            x = x.reshape(-1, self.input_size)
        else:
            x = x.reshape(-1, self.input_size)
            gate_outputs = self.gate(x)
            gate_outputs_target = self.gate_target(x.detach())
        y = self.calculator(x, gate_outputs["topK_indices"], gate_outputs["topK_scores"])
        self.gate_logits_target = gate_outputs_target["gate_logits"]  # (``MoEMlpOutput.gate_logits_target``)
        return y.reshape((*original_shape, D))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("hard_router", [False, True], ids=["token-wise", "task-hard-router"])
def test_t2mir_gate_beside_its_frozen_target_replays_the_recorded_experts_as_by_hand(hard_router: bool) -> None:
    """T2MIR's contrastive MoE layer, in eval as its policy acts: both gates are found with zero configuration,
    ``gate`` (whose ``k + 1`` best ids cut to ``k`` the calculator splits by ``bincount(...).tolist()``) and
    ``gate_target`` (a frozen copy whose own top-k, returned with its load statistics, is taken but never dispatched
    by: recording and forcing it changes nothing downstream); the recorded rows are each gate's chosen ids, per token
    or (with ``task_hard_router``) per sequence expanded to its tokens, and a replay after the gates change forces
    them, in output and gradients as by hand."""
    model = _one_block(lambda: LinearGLUMoELayerContrastive(hard_router))()
    session = assert_exact(model, _seq(), train=False)
    assert session.names == ("layers.0.gate", "layers.0.gate_target"), session.names


# ----------------------------------------------------------------------- tesi: one gate per task token
# Antuke/tesi multitask/moe_task_aware.py (``TaskAwareGating``, ``MoELayerTaskAware``): the last MLP of a SigLIP2 /
# Perception Encoder made a task-aware MoE after a multi-head attention pooling with one learnable query per task,
# so the layer sees ``[batch, num_tasks, d]``. The gate is a ``[num_tasks, E, d]`` parameter and each task token is
# scored by its own task's weights (``einsum('btd,ted->bte')``); ``torch.topk`` of those logits, the k values
# softmaxed; each token copied k times, and for each expert a boolean mask over the flat ids picks its copies
# (``expanded_x[mask]``), whose outputs are written back into a zero buffer (``expert_outputs[mask] = ...``), weighted
# and summed over the k slots. The layer returns the output, a load-balance loss (in training) and gate statistics.
class TaskAwareGating(nn.Module):
    def __init__(self, input_dim: int, num_experts: int, num_tasks: int) -> None:
        super().__init__()
        self.gating_weights = nn.Parameter(torch.randn(num_tasks, num_experts, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,ted->bte", x, self.gating_weights)


class ExpertPe(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


class MoELayerTaskAware(_Used):
    def __init__(self, num_experts: int = 4, num_tasks: int = 3, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.output_dim = D
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.input_dim = D
        self.experts = nn.ModuleList([ExpertPe(D, 8, D) for _ in range(num_experts)])
        self.gating = TaskAwareGating(D, num_experts, num_tasks)

    def compute_load_balance_loss(self, gating_logits: torch.Tensor) -> torch.Tensor:
        router_probs = F.softmax(gating_logits.reshape(-1, self.num_experts), dim=-1)
        return self.num_experts * torch.sum(torch.mean(router_probs, dim=0) ** 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, dict[str, torch.Tensor]]:
        batch_size, seq_len, _ = x.shape
        assert seq_len == self.num_tasks, "Input sequence length must match the number of tasks"
        gating_logits = self.gating(x)
        aux_loss: torch.Tensor | float = 0.0
        if self.forced is None:
            top_k_weights, top_k_indices = torch.topk(gating_logits, self.top_k, dim=-1)
        else:
            top_k_indices = self.forced.view(batch_size, seq_len, self.top_k)
            top_k_weights = gating_logits.gather(-1, top_k_indices)
        self.used = top_k_indices.reshape(-1, self.top_k)
        top_k_weights = F.softmax(top_k_weights, dim=-1)
        if self.training:
            aux_loss = self.compute_load_balance_loss(gating_logits)
        x_flat = x.view(-1, self.input_dim)
        top_k_indices_flat = top_k_indices.view(-1)
        expanded_x = x_flat.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, self.input_dim)
        expert_outputs = torch.zeros(expanded_x.shape, dtype=x.dtype, device=x.device)
        for i, expert in enumerate(self.experts):
            mask = top_k_indices_flat == i
            if mask.any():
                expert_outputs[mask] = expert(expanded_x[mask]).to(expert_outputs.dtype)
        weighted_outputs = expert_outputs * top_k_weights.view(-1).unsqueeze(-1)
        combined_output_flat = weighted_outputs.view(-1, self.top_k, self.output_dim).sum(dim=1)
        return combined_output_flat.view(batch_size, seq_len, self.output_dim), aux_loss, {}


class TaskAwareBlock(nn.Module):
    """The wrapper's use of the layer: the output kept, the auxiliary loss set aside for the trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoELayerTaskAware()
        self.aux_loss: torch.Tensor | float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.aux_loss, _ = self.moe(x)
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_tesi_task_aware_gates_replay_the_recorded_experts_as_by_hand(train: bool) -> None:
    """tesi's task-aware MoE layer: a gate per task token (one ``[E, d]`` slice of a ``[tasks, E, d]`` parameter per
    position, by ``einsum``), found with zero configuration; the recorded rows are the experts each task token used
    through the boolean masks over its k copies, and a replay after the gates change forces them, in output and
    gradients as by hand (the load-balance loss, in training, set aside)."""
    model = _one_block(TaskAwareBlock)()
    session = assert_exact(model, _seq(3), train=train)
    assert session.names == ("layers.0.moe.gating",), session.names
