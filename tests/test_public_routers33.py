"""MoE code of reinforcement learning, multi-task vision, time-series forecasting and spiking networks, with zero
configuration (see ``test_public_routers32``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, perturb
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _sets, _Used, assert_exact, assert_refused


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


# ----------------------------------------------------------------------- Super-Linear: a gate over the periodogram
# azencot-group/SuperLinear models/SuperLinear.py (``SparseMoE``, ``Model``) and layers/Linear_layers.py (``Naive``,
# ``Mean``, ``RLinear`` with a non-affine ``RevIN``): a pretrained mixture of linear forecasters, one per frequency,
# beside parameter-free ``naive`` and ``mean`` experts. Each channel's lookback window is a routed row; the gate is a
# ``Linear`` over the row's normalised periodogram (``torch.fft.fft`` of the centred window, ``abs() ** 2`` over its
# sum, the positive half), optionally batch-normalised (``moe_norm``), divided by a temperature in eval; Gaussian noise
# is drawn at every forward and added in training only. ``torch.topk`` of the (noisy) logits, the k values softmaxed;
# every expert runs on every row (``torch.stack``) and the chosen ones are ``gather``ed and summed by those weights.
class RevIN(nn.Module):
    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.mean = torch.zeros(0)
        self.stdev = torch.ones(0)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "norm":
            self.mean = torch.mean(x, dim=1, keepdim=True).detach()
            self.stdev = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + self.eps).detach()
            return (x - self.mean) / self.stdev
        return x * self.stdev + self.mean


class Naive(nn.Module):
    def __init__(self, input_len: int, output_len: int) -> None:
        super().__init__()
        self.output_len = output_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1].unsqueeze(1).repeat(1, self.output_len)


class Mean(nn.Module):
    def __init__(self, input_len: int, output_len: int) -> None:
        super().__init__()
        self.output_len = output_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).unsqueeze(1).repeat(1, self.output_len)


class RLinear(nn.Module):
    def __init__(self, input_len: int, output_len: int) -> None:
        super().__init__()
        self.Linear = nn.Linear(input_len, output_len)
        self.revin_layer = RevIN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_shape = x.shape
        if len(x_shape) == 2:
            x = x.unsqueeze(-1)
        x = x.clone()
        x = self.revin_layer(x, "norm")
        x = self.Linear(x.permute(0, 2, 1)).permute(0, 2, 1).clone()
        x = self.revin_layer(x, "denorm")
        if len(x_shape) == 2:
            x = x.squeeze(-1)
        return x


class SuperLinearSparseMoE(_Used):
    def __init__(self, experts: list[nn.Module], k: int = 2, fft_len: int = 16, moe_norm: bool = True) -> None:
        super().__init__()
        self.noise_std = 0.5
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.k = k
        self.moe_temp = 0.5
        self.fft_len = fft_len
        self.moe_norm = moe_norm
        self.gating_network = nn.Linear(fft_len // 2, self.num_experts, bias=True)
        if self.moe_norm:
            self.batch_norm = nn.BatchNorm1d(self.num_experts)

    def get_periodogram(self, inputs: torch.Tensor, n: int) -> torch.Tensor:
        x_0 = inputs.unsqueeze(2) if inputs.dim() == 2 else inputs
        x_0 = x_0 - torch.mean(x_0, dim=1, keepdim=True)
        dft = torch.fft.fft(x_0, dim=1, n=n) / n**0.5
        dft = dft[:, : n // 2, :]
        periodogram = torch.abs(dft) ** 2
        periodogram_sum = torch.sum(periodogram, dim=1, keepdim=True)
        periodogram_sum[periodogram_sum == 0] = 1
        periodogram = periodogram / periodogram_sum
        return periodogram.squeeze(2) if inputs.dim() == 2 else periodogram

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_0 = self.get_periodogram(x, n=self.fft_len)
        gate_outputs = self.gating_network(x_0)
        if self.moe_norm:
            gate_outputs = self.batch_norm(gate_outputs)
        if not self.training:
            gate_outputs = gate_outputs / self.moe_temp
        noise = torch.randn_like(gate_outputs).to(x.device) * self.noise_std
        scores = gate_outputs + noise if self.training else gate_outputs
        if self.forced is None:
            topk_values, topk_indices = torch.topk(scores, self.k, dim=1)
        else:
            topk_indices = self.forced
            topk_values = scores.gather(1, topk_indices)
        self.used = topk_indices
        topk_gates = F.softmax(topk_values, dim=1)
        expert_outputs = torch.stack([self.experts[i](x) for i in range(self.num_experts)], dim=1)
        topk_indices_expanded = topk_indices.unsqueeze(-1).expand(-1, -1, expert_outputs.size(2))
        sparse_expert_outputs = torch.gather(expert_outputs, 1, topk_indices_expanded)
        return torch.sum(topk_gates.unsqueeze(2) * sparse_expert_outputs, dim=1)


class SuperLinear(nn.Module):
    """``Model.forward`` for a lookback of the training length (no resampling, no auto-regressive extension): the
    ``[batch, length, channels]`` input made ``[batch * channels, length]`` rows, the forecast put back."""

    def __init__(self, seq_len: int = 8, pred_len: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            experts = [Naive(seq_len, pred_len), Mean(seq_len, pred_len)]
            experts += [RLinear(seq_len, pred_len) for _ in range(3)]
            self.moe = SuperLinearSparseMoE(experts)
        self.train_seq_len = seq_len

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in.permute(0, 2, 1)
        b, v, length = x.shape
        x = x[:, :, -self.train_seq_len :]
        out = self.moe(x.reshape(b * v, length))
        return out.reshape(b, v, out.shape[-1]).permute(0, 2, 1)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_super_linear_periodogram_gate_replays_the_recorded_experts_as_by_hand(train: bool) -> None:
    """Super-Linear's mixture of frequency experts: the gate over each channel's periodogram (batch-normalised, its
    noise drawn at every forward and added in training) is found with zero configuration; the recorded rows are the
    experts each channel's window used (parameter-free ``naive`` / ``mean`` experts among them), and a replay after
    the gate changes forces them, in output and gradients as by hand (in training, the same noise drawn and the batch
    norm's running statistics moved alike)."""
    model = SuperLinear()
    x = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(1)).cumsum(1)
    session = assert_exact(model, x, train=train)
    assert session.names == ("moe.gating_network",), session.names


# ----------------------------------------------------------------------- Kinesis: an expert policy drawn by sampling
# denfujita/Kinesis src/learning/policy_moe.py (``PolicyMOE``; the Mathis group's Kinesis, musculoskeletal imitation
# learning): a gate (an ``MLP`` of ``tanh`` layers, a ``Linear``, a ``Softmax``) over the running-normalised state
# gives each pretrained expert policy's probability; ``forward`` returns a ``Categorical`` of them, and
# ``select_action`` draws the expert (``dist.sample()``: ``torch.multinomial``), compares ``expert_idx.item()`` with
# each expert's index in a Python loop and returns that expert's action with the index (whose log-probability PPO
# trains the gate by).
class KinesisMLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dims: list[int]) -> None:
        super().__init__()
        self.activation = torch.tanh
        self.affine_layers = nn.ModuleList()
        last_dim = input_dim
        for nh in hidden_dims:
            self.affine_layers.append(nn.Linear(last_dim, nh))
            last_dim = nh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for affine in self.affine_layers:
            x = self.activation(affine(x))
        return x


class RunningNorm(nn.Module):
    """The state normalisation, its statistics loaded from the first expert (fixed here)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.std + 1e-8)).clamp(-5.0, 5.0)


class PolicyMOE(_Used):
    def __init__(self, state_dim: int = 6, action_dim: int = 3, num_experts: int = 4) -> None:
        super().__init__()
        self.norm = RunningNorm(state_dim)
        self.gate = nn.Sequential(KinesisMLP(state_dim, [8]), nn.Linear(8, num_experts), nn.Softmax(dim=1))
        self.experts = nn.ModuleList(
            nn.Sequential(KinesisMLP(state_dim, [8]), nn.Linear(8, action_dim)) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(self.gate(self.norm(x)))

    def select_action(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.forward(x)
        expert_idx = dist.sample() if self.forced is None else self.forced.view(-1)
        self.used = expert_idx.view(-1, 1)
        action = torch.zeros(0)
        for i, expert in enumerate(self.experts):
            if i == expert_idx.item():
                action = expert(x)
                break
        return action, expert_idx


class KinesisAgent(nn.Module):
    """The agent's step: one state, the action of the expert drawn."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.policy = PolicyMOE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        action, _ = self.policy.select_action(x)
        return action


@pytest.mark.reliability("silent replays")
def test_kinesis_expert_drawn_by_sampling_is_refused_naming_the_random_draw() -> None:
    """Kinesis's mixture-of-experts policy draws its expert from the gate's ``Categorical`` (a ``torch.multinomial``
    outside the gate's forward) rather than ranking scores: the gate is found with zero configuration, and the first
    capture refuses it with an error that names a random draw such as ``torch.multinomial`` as a choice out of sight,
    the model left as it was (nothing recorded, nothing forced)."""
    model = KinesisAgent()
    assert_refused(model, torch.randn(1, 6, generator=torch.Generator().manual_seed(1)), "torch.multinomial")


# ----------------------------------------------------------------------- STAtten: a spiking router with GShard top-2
# jacksuniscool/STAtten module/ms_conv.py (``SpikeRouter``, ``Experts``, ``MS_MoE_Conv``; spikingjelly's
# ``MultiStepLIFNode``): the MLP of a spiking transformer made an MoE. The router's LIF neurons turn the
# ``[T, B, C, H, W]`` input into spikes (a membrane potential charged over the T steps, a spike where it passes the
# threshold, a hard reset; the potential is kept between calls as a plain attribute until ``reset()``), a 1x1
# ``Conv2d`` and a ``BatchNorm2d`` score the experts at every pixel, softmaxed; GShard's top-2 (``top1`` = ``topk(k=1)``
# twice, the first masked out by ``one_hot``) with an expert capacity (``cumsum_exclusive`` positions, at least 4),
# gives the dispatch and combine tensors of ``[T * B, N, E, capacity]``; the experts are ``einsum``s of ``[E, C, F]``
# weights with LIF neurons between (which take the experts' axis as their time steps). Training loops call
# spikingjelly's ``functional.reset_net`` after every step.
class _SigmoidSpike(torch.autograd.Function):
    """spikingjelly's ``surrogate.Sigmoid``: a Heaviside step forward, the slope of ``sigmoid(alpha * x)`` back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha  # type: ignore[attr-defined]
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        sg = torch.sigmoid(ctx.alpha * x)  # type: ignore[attr-defined]
        return grad * ctx.alpha * sg * (1 - sg), None  # type: ignore[attr-defined]


class MultiStepLIFNode(nn.Module):
    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: float = 0.0) -> None:
        super().__init__()
        self.tau = tau
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.v: torch.Tensor | float = v_reset

    def reset(self) -> None:
        self.v = self.v_reset

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        spikes = []
        for t in range(x_seq.shape[0]):
            v = self.v + (x_seq[t] - (self.v - self.v_reset)) / self.tau
            spike = _SigmoidSpike.apply(v - self.v_threshold, 4.0)
            spike_d = spike.detach()  # (``detach_reset=True``)
            self.v = (1.0 - spike_d) * v + spike_d * self.v_reset
            spikes.append(spike)
        return torch.stack(spikes)


def top1(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = t.topk(k=1, dim=-1)
    return values.squeeze(dim=-1), index.squeeze(dim=-1)


def cumsum_exclusive(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    num_pad_dims = -dim - 1
    pre_padding = (0, 0) * num_pad_dims
    pre_slice = (slice(None),) * num_pad_dims
    padded_t = F.pad(t, (*pre_padding, 1, 0)).cumsum(dim=dim)
    index: tuple[Any, ...] = (..., slice(None, -1), *pre_slice)
    return padded_t[index]


def safe_one_hot(indexes: torch.Tensor, max_length: int) -> torch.Tensor:
    max_index = int(indexes.max()) + 1
    return F.one_hot(indexes, max(max_index + 1, max_length))[..., :max_length]


class SpikeExperts(nn.Module):
    def __init__(self, num_experts: int, in_features: int, hidden_features: int) -> None:
        super().__init__()
        std1, std2 = 1 / math.sqrt(in_features), 1 / math.sqrt(hidden_features)
        self.w1 = nn.Parameter(torch.zeros(num_experts, in_features, hidden_features).uniform_(-std1, std1) * 4)
        self.w2 = nn.Parameter(torch.zeros(num_experts, hidden_features, in_features).uniform_(-std2, std2))
        self.act = MultiStepLIFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(torch.einsum("...nd,...dh->...nh", x, self.w1))
        return torch.einsum("...nh,...hd->...nd", hidden, self.w2)


class SpikeRouter(_Used):
    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.eps = 1e-9
        self.router_conv = nn.Conv2d(in_features, num_experts, kernel_size=1, stride=1)
        self.router_bn = nn.BatchNorm2d(num_experts)
        self.router_lif = MultiStepLIFNode()
        self.cursor = 0  # (test bookkeeping: the forced rows a call of a run of forwards takes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, b, _, h, w = x.shape
        n = h * w
        capacity_factor = 1.25 if self.training else 2.0
        router_out = self.router_bn(self.router_conv(self.router_lif(x).flatten(0, 1)))
        raw_gates = router_out.permute(0, 2, 3, 1).reshape(t * b, n, self.num_experts).softmax(dim=-1)
        num_gates = self.num_experts
        forced = None
        if self.forced is not None:
            forced = self.forced[self.cursor : self.cursor + t * b * n].view(t * b, n, 2)
            self.cursor += t * b * n
        if forced is None:
            gate_1, index_1 = top1(raw_gates)
        else:
            index_1 = forced[..., 0]
            gate_1 = raw_gates.gather(-1, index_1[..., None]).squeeze(-1)
        mask_1 = F.one_hot(index_1, num_gates).float()
        gates_without_top_1 = raw_gates * (1.0 - mask_1)
        if forced is None:
            gate_2, index_2 = top1(gates_without_top_1)
        else:
            index_2 = forced[..., 1]
            gate_2 = gates_without_top_1.gather(-1, index_2[..., None]).squeeze(-1)
        self.used = torch.stack([index_1, index_2], -1).reshape(-1, 2)
        mask_2 = F.one_hot(index_2, num_gates).float()
        denom = gate_1 + gate_2 + self.eps
        gate_1, gate_2 = gate_1 / denom, gate_2 / denom
        expert_capacity = max(min(n, int((n * capacity_factor) / num_gates)), 4)
        position_in_expert_1 = cumsum_exclusive(mask_1, dim=-2) * mask_1
        mask_1 = mask_1 * (position_in_expert_1 < float(expert_capacity)).float()
        mask_1_count = mask_1.sum(dim=-2, keepdim=True)
        mask_1_flat = mask_1.sum(dim=-1)
        position_in_expert_1 = position_in_expert_1.sum(dim=-1)
        gate_1 = gate_1 * mask_1_flat
        position_in_expert_2 = (cumsum_exclusive(mask_2, dim=-2) + mask_1_count) * mask_2
        mask_2 = mask_2 * (position_in_expert_2 < float(expert_capacity)).float()
        mask_2_flat = mask_2.sum(dim=-1)
        position_in_expert_2 = position_in_expert_2.sum(dim=-1)
        gate_2 = gate_2 * mask_2_flat
        combine_tensor = (
            gate_1[..., None, None]
            * mask_1_flat[..., None, None]
            * F.one_hot(index_1, num_gates)[..., None]
            * safe_one_hot(position_in_expert_1.long(), expert_capacity)[..., None, :]
            + gate_2[..., None, None]
            * mask_2_flat[..., None, None]
            * F.one_hot(index_2, num_gates)[..., None]
            * safe_one_hot(position_in_expert_2.long(), expert_capacity)[..., None, :]
        )
        return combine_tensor.bool().to(combine_tensor), combine_tensor


class MSMoEConv(nn.Module):
    def __init__(self, in_features: int = 8, num_experts: int = 4) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.out_features = in_features
        self.router = SpikeRouter(in_features, num_experts)
        self.experts = SpikeExperts(num_experts, in_features, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, h, w = x.shape
        dispatch_tensor, combine_tensor = self.router(x)
        x_flat = x.permute(0, 1, 3, 4, 2).reshape(t * b, h * w, c)
        expert_inputs = torch.einsum("bnd,bnec->ebcd", x_flat, dispatch_tensor)
        orig_shape = expert_inputs.shape
        expert_outputs = self.experts(expert_inputs.reshape(self.num_experts, -1, c))
        expert_outputs = expert_outputs.reshape(*orig_shape[:-1], self.out_features)
        output = torch.einsum("ebcd,bnec->bnd", expert_outputs, combine_tensor)
        return output.reshape(t, b, h, w, self.out_features).permute(0, 1, 4, 2, 3) + x


class SpikingNet(nn.Module):
    """One spiking MoE block; with ``reset_each_step`` the LIF neurons are reset before every forward (the training
    loop's ``reset_net`` after each step), without it their potentials carry over from one forward to the next (a
    stream cut into chunks). Each forward starts the router's forced rows where the last one stopped."""

    def __init__(self, reset_each_step: bool) -> None:
        super().__init__()
        self.reset_each_step = reset_each_step
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.block = MSMoEConv()

    def reset_net(self) -> None:
        for m in self.modules():
            if isinstance(m, MultiStepLIFNode):
                m.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reset_each_step:
            self.reset_net()
            self.block.router.cursor = 0
        return self.block(x)


def _spikes(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 1, 8, 2, 2, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_statten_spiking_router_replays_the_recorded_experts_as_by_hand(train: bool) -> None:
    """STAtten's spiking MoE, its LIF neurons reset before each step: the router (spikes, a 1x1 convolution, a batch
    norm, GShard's top-2 of two ``topk(k=1)`` calls with a capacity no pixel passes here) is found with zero
    configuration; the recorded rows are the two experts of each pixel at each time step, and a replay after the
    router changes forces them, in output and gradients (through the spikes' surrogate) as by hand."""
    model = SpikingNet(reset_each_step=True)
    session = assert_exact(model, _spikes(), train=train)
    assert session.names == ("block.router",), session.names


@pytest.mark.reliability("silent replays")
def test_statten_spiking_router_over_a_stream_replays_each_chunk_from_the_carried_potentials() -> None:
    """Two chunks of a stream through STAtten's spiking MoE with no reset between them: each chunk's routing depends
    on the membrane potentials the last one left. Capturing both leaves the outputs and the potentials of an
    unattached copy run alike; after the router changes, a replay of both chunks from reset potentials forces the
    recorded experts chunk by chunk, in output and gradients as forcing them by hand on the copy does."""
    model = SpikingNet(reset_each_step=False).eval()
    ref = copy.deepcopy(model)
    router = model.block.router
    chunks = [_spikes(1), _spikes(2)]
    with mr.attach(model) as session:
        assert session.names == ("block.router",), session.names
        used = []
        with torch.no_grad(), session.capture():
            captured = []
            for x in chunks:
                captured.append(model(x))
                assert router.used is not None
                used.append(router.used)
        routes = session.routes()
        rows = routes.layer("block.router")
        assert torch.equal(_sets(rows), _sets(torch.cat(used))), "the routes are not the experts used"
        with torch.no_grad():
            for x, out in zip(chunks, captured, strict=True):
                assert torch.equal(ref(x), out), "capturing changed a chunk's output"
        potentials = [(m.v, r.v) for m, r in zip(model.modules(), ref.modules(), strict=True) if hasattr(m, "v")]
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in potentials)
        perturb(model)
        perturb(ref)
        ref.reset_net()
        ref.block.router.forced, ref.block.router.cursor = rows.long(), 0
        expected = torch.cat([ref(x) for x in chunks])
        ref.block.router.forced = None
        expected.square().sum().backward()
        model.reset_net()
        free = []
        with torch.no_grad():
            for x in chunks:
                model(x)
                assert router.used is not None
                free.append(router.used)
        assert not torch.equal(_sets(torch.cat(free)), _sets(rows)), "the changed router chooses the same experts"
        model.reset_net()
        with session.replay(routes):
            replayed = torch.cat([model(x) for x in chunks])
        replayed.square().sum().backward()
    assert torch.equal(replayed.detach(), expected.detach()), "the replay is not the recorded experts forced by hand"
    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want_grad = want[name].grad
        assert (p.grad is None) == (want_grad is None), name
        assert p.grad is None or (want_grad is not None and torch.equal(p.grad, want_grad)), name


# ----------------------------------------------------------------------- moe-rsl-rl: top-k logits in a -1e9 mask
# iit-DLSLab/moe-rsl-rl moe_rsl_rl/modules/ac_moe_gated.py (``GatedMoENet._gate_sparse``) over ac_moe_common.py
# (``BaseMoENet``, ``MLP_net``; after ami-iit/amp-rsl-rl's ``ActorMoE``): a PPO actor whose experts are MLP heads
# after a shared backbone (``use_shared_layers="backbone"``), some of them controlling only the first actions (their
# outputs padded with zeros and masked by ``expert_action_masks``). The gate reads the backbone's features; with
# ``0 < top_k < E`` the top-k logits are scattered into a tensor full of ``-1e9`` and softmaxed (the others' weights
# exactly zero), every expert runs on every observation, and ``(expert_out * weights).sum(-1)`` mixes them.
class MLPNet(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int, act: nn.Module) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dims[0]), act]
        for i in range(len(hidden_dims)):
            if i == len(hidden_dims) - 1:
                layers.append(nn.Linear(hidden_dims[i], out_dim))
            else:
                layers.extend([nn.Linear(hidden_dims[i], hidden_dims[i + 1]), act])
        super().__init__(*layers)


class GatedMoENet(_Used):
    expert_action_masks: torch.Tensor

    def __init__(
        self,
        obs_dim: int = 6,
        act_dim: int = 3,
        num_experts: int = 4,
        top_k: int = 2,
        hidden_dims: tuple[int, int] = (8, 8),
    ) -> None:
        super().__init__()
        self.act_dim = act_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.is_sparse = 0 < top_k < num_experts
        self.expert_output_dims = [act_dim, act_dim, 2, 1][:num_experts]
        self.has_variable_expert_outputs = any(dim != act_dim for dim in self.expert_output_dims)
        masks = torch.zeros(num_experts, act_dim)
        for expert_idx, output_dim in enumerate(self.expert_output_dims):
            masks[expert_idx, :output_dim] = 1.0
        self.register_buffer("expert_action_masks", masks)
        act = nn.ELU()
        self.shared_backbone = nn.Sequential(nn.Linear(obs_dim, hidden_dims[0]), act)
        last_dim = hidden_dims[-2]
        self.experts = nn.ModuleList(
            MLPNet(last_dim, [last_dim], self.expert_output_dims[i], act) for i in range(num_experts)
        )
        self.gate = nn.Sequential(nn.Linear(last_dim, num_experts))
        self.softmax = nn.Softmax(dim=-1)
        self._last_gate_weights = torch.empty(0)
        self._last_unmasked_gate_weights = torch.empty(0)

    def _pad_expert_action_output(self, expert_output: torch.Tensor, expert_idx: int) -> torch.Tensor:
        output_dim = self.expert_output_dims[expert_idx]
        if output_dim == self.act_dim:
            return expert_output
        padded_output = expert_output.new_zeros(expert_output.shape[0], self.act_dim)
        padded_output[:, :output_dim] = expert_output
        return padded_output

    def _gate_sparse(self, gate_input: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(gate_input)
        self._last_unmasked_gate_weights = self.softmax(gate_logits)
        if self.forced is None:
            topk_vals, topk_idx = torch.topk(gate_logits, k=self.top_k, dim=-1)
        else:
            topk_idx = self.forced
            topk_vals = gate_logits.gather(-1, topk_idx)
        self.used = topk_idx
        masked_logits = torch.full_like(gate_logits, -1e9)
        masked_logits.scatter_(dim=-1, index=topk_idx, src=topk_vals)
        full_weights = self.softmax(masked_logits)
        self._last_unmasked_gate_weights = full_weights
        return full_weights.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.shared_backbone(x)
        expert_out = torch.stack(
            [self._pad_expert_action_output(e(features), i) for i, e in enumerate(self.experts)], dim=-1
        )
        weights = self._gate_sparse(features)
        self._last_gate_weights = weights
        if self.has_variable_expert_outputs:
            expert_out = expert_out * self.expert_action_masks.transpose(0, 1).unsqueeze(0).to(expert_out.dtype)
        return (expert_out * weights).sum(dim=-1)


class ActorCriticMoE(nn.Module):
    """``act_inference``: the actor's mean action for a batch of observations (the critic a plain MLP)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.actor = GatedMoENet()
            self.critic = MLPNet(6, [8], 1, nn.ELU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actor(observations)


@pytest.mark.reliability("silent replays")
def test_moe_rsl_rl_top_k_in_a_large_negative_mask_replays_the_recorded_experts_as_by_hand() -> None:
    """moe-rsl-rl's sparse gated actor (the top-k logits scattered into ``-1e9`` and softmaxed, every expert run and
    the others weighted exactly zero, experts of fewer actions padded and masked) is found with zero configuration;
    the recorded rows are the experts each observation weighs, and a replay after the gate changes forces them, in
    output and gradients as by hand."""
    model = ActorCriticMoE()
    obs = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    session = assert_exact(model, obs, train=True)
    assert session.names == ("actor.gate",), session.names
