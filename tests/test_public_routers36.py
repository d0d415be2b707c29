"""MoE code of multimodal, pathology, robotics and traffic research codebases (Flex-MoE's modality-supervised noisy
gate, a mixture of MIL aggregators routed per bag, PAMoE's expert choice over the patches of a slide, a quadruped
policy's soft student encoder, TESTAM's gate over its experts' states), with zero configuration (see
``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from tests.test_evidence import D
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _Used, assert_exact, assert_refused


def _seq(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(1))


def _one_block(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of a residual stack of one block, its parameters drawn from a fixed seed (the global generator left
    as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            stack = ResidualStack(make)
        del stack.layers[1]
        return stack

    return build


# ----------------------------------------------------------------------- Flex-MoE: a gate told each sample's modalities
# UNITES-Lab/flex-moe moe_module.py (``AddtionalNoisyGate``, ``FixedFMoE``, ``FMoETransformerMLP``) over fastmoe's
# ``NoisyGate`` (fmoe/gates/noisy_gate.py): the gate's ``w_gate`` / ``w_noise`` are ``[d, E]`` parameters; the noisy
# logits are ``clean + randn_like * (softplus(x @ w_noise) + 1e-2) * self.training`` (the noise drawn in eval too, times
# zero); ``topk`` of ``k + 1`` logits, the first k softmaxed; the gate's forward also takes ``expert_indices``, each
# sample's modality-combination index, repeated over its tokens: a sample missing modalities adds a cross-entropy of
# its tokens' logits against that index, and the load-balancing ``cv_squared`` losses split the full-modality tokens
# from the others (``_prob_in_top_k`` in training). The gate keeps the ids (``set_topk_logit``,
# ``set_topk_indicates``) and returns the flat ids and ``[N, 1, k]`` gates; the layer runs each (token, slot) through
# its expert and combines them by a ``bmm`` with the gates.
class FlexMoeNoisyGate(_Used):
    def __init__(self, d_model: int, num_expert: int, world_size: int, top_k: int = 2) -> None:
        super().__init__()
        self.tot_expert = num_expert * world_size
        self.top_k = top_k
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.noise_epsilon = 1e-2
        self.loss: torch.Tensor | None = None
        self.topk_logits: list[torch.Tensor] | None = []
        self.indicates: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.w_gate, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.w_noise, a=math.sqrt(5))

    @staticmethod
    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        eps = 1e-10
        if x.shape[0] == 1:
            return torch.tensor([0.0])
        return x.float().var() / (x.float().mean() ** 2 + eps)

    @staticmethod
    def _gates_to_load(gates: torch.Tensor) -> torch.Tensor:
        return (gates > 0).sum(0)

    def _prob_in_top_k(
        self,
        clean_values: torch.Tensor,
        noisy_values: torch.Tensor,
        noise_stddev: torch.Tensor,
        noisy_top_values: torch.Tensor,
    ) -> torch.Tensor:
        batch = clean_values.size(0)
        m = noisy_top_values.size(1)
        top_values_flat = noisy_top_values.flatten()
        threshold_positions_if_in = torch.arange(batch) * m + self.top_k
        threshold_if_in = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in), 1)
        is_in = torch.gt(noisy_values, threshold_if_in)
        threshold_if_out = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in - 1), 1)
        normal = Normal(torch.tensor([0.0]), torch.tensor([1.0]))
        prob_if_in = normal.cdf((clean_values - threshold_if_in) / noise_stddev)
        prob_if_out = normal.cdf((clean_values - threshold_if_out) / noise_stddev)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def set_topk_logit(self, logit: torch.Tensor) -> None:
        if self.topk_logits is not None:
            self.topk_logits = [logit]  # (upstream appends until read; one kept here)

    def set_topk_indicates(self, indicate: torch.Tensor) -> None:
        self.indicates = indicate

    def set_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss  # (upstream sums until the model reads it; the last one kept here)

    def forward(self, inp: torch.Tensor, expert_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean_logits = inp @ self.w_gate
        raw_noise_stddev = inp @ self.w_noise
        noise_stddev = (self.softplus(raw_noise_stddev) + self.noise_epsilon) * self.training
        noisy_logits = clean_logits + (torch.randn_like(clean_logits) * noise_stddev)
        logits = noisy_logits
        loss = torch.zeros(())

        top_logits, top_indices = logits.topk(min(self.top_k + 1, self.tot_expert), dim=1)
        top_k_logits = top_logits[:, : self.top_k]
        top_k_indices = top_indices[:, : self.top_k]
        if self.forced is not None:
            top_k_indices = self.forced.view(-1, self.top_k)
            top_k_logits = logits.gather(1, top_k_indices)
        self.used = top_k_indices
        top_k_gates = self.softmax(top_k_logits)

        batch_size = inp.shape[0]
        num_samples = expert_indices.shape[0]
        repeats = batch_size // num_samples
        expanded = expert_indices.repeat(repeats, 1).T.reshape(-1)
        full_modality_mask_expanded = expanded == 0
        if expert_indices.sum() > 0:
            loss = loss + F.cross_entropy(logits[~full_modality_mask_expanded], expanded[~full_modality_mask_expanded])

        self.set_topk_logit(top_k_indices)
        zeros = torch.zeros_like(logits, requires_grad=True)
        gates = zeros.scatter(1, top_k_indices, top_k_gates)
        if self.top_k < self.tot_expert and self.training:
            load = self._prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits)
        else:
            load = self._gates_to_load(gates)

        full_modality_mask = expert_indices == 0
        if full_modality_mask.sum() == len(full_modality_mask):
            load = load.sum(0) if self.training else load
            loss = loss + self.cv_squared(gates.sum(0)) + self.cv_squared(load)
        else:
            importance_1 = gates[full_modality_mask_expanded, :].sum(0) if self.training else gates.sum(0)
            load_1 = load[full_modality_mask_expanded, :].sum(0) if self.training else load
            importance_2 = gates[~full_modality_mask_expanded, 1:].sum(0) if self.training else gates.sum(0)
            load_2 = load[~full_modality_mask_expanded, 1:].sum(0) if self.training else load
            loss = loss + self.cv_squared(importance_1) + self.cv_squared(load_1)
            loss = loss + self.cv_squared(importance_2) + self.cv_squared(load_2)
        self.set_loss(loss)
        return top_k_indices.contiguous().view(-1), top_k_gates.contiguous().unsqueeze(1)


class FlexMoeExpert(nn.Module):
    """fastmoe's ``_Expert`` (``htoh4``, activation, ``h4toh``) for one expert."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.htoh4 = nn.Linear(d_model, d_hidden)
        self.h4toh = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h4toh(F.gelu(self.htoh4(x)))


class FlexMoeMLP(nn.Module):
    """``FMoETransformerMLP`` with one router (``n_router=1``), world size one: the flat ids viewed ``[N, k]`` and
    stored on the gate (``set_topk_indicates``; left out with ``keep_indicates=False``), each (token, slot) row run by
    its expert in the token-major order fastmoe's global forward gives back, ``[N, k, d]``, and ``bmm`` with the
    ``[N, 1, k]`` gates."""

    def __init__(
        self, expert_indices: torch.Tensor, num_expert: int = 4, top_k: int = 2, keep_indicates: bool = True
    ) -> None:
        super().__init__()
        self.d_model, self.num_expert, self.top_k = D, num_expert, top_k
        self.keep_indicates = keep_indicates
        self.experts = nn.ModuleList([FlexMoeExpert(D, 2 * D) for _ in range(num_expert)])
        self.all_gates = nn.ModuleDict({"0": FlexMoeNoisyGate(D, num_expert, 1, top_k)})
        self.gate = self.all_gates["0"]
        self.expert_indices = expert_indices

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        original_shape = inp.shape
        moe_inp = inp.reshape(-1, self.d_model)
        gate_top_k_idx, gate_score = self.gate(moe_inp, self.expert_indices)
        gate_top_k_idx = gate_top_k_idx.view(moe_inp.shape[0], self.top_k)
        if self.keep_indicates:
            self.gate.set_topk_indicates(gate_top_k_idx)
        flat = gate_top_k_idx.reshape(-1)
        rows = moe_inp.repeat_interleave(self.top_k, dim=0)
        fwd = torch.zeros_like(rows)
        for e in range(self.num_expert):
            sel = flat == e
            if sel.any():
                fwd[sel] = self.experts[e](rows[sel])
        moe_outp = fwd.view(-1, self.top_k, self.d_model)
        moe_outp = torch.bmm(gate_score.view(-1, 1, self.top_k), moe_outp).reshape(-1, self.d_model)
        return moe_outp.reshape(original_shape)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_flex_moe_gate_fed_each_samples_modalities_replays_as_by_hand(train: bool) -> None:
    """Flex-MoE's noisy gate: the ``topk`` of ``k + 1`` noisy logits (noise drawn in eval too, times zero), the first
    k softmaxed, beside a cross-entropy of a sample's tokens against its modality-combination index (the second
    sample misses modalities here) and split load-balancing losses. With the layer's ``set_topk_indicates`` left out
    (see the test below), found with zero configuration; the recorded rows are the experts each (token, slot)
    ran, and a replay after the gate changes forces them, in output and gradients as by hand."""
    model = _one_block(lambda: FlexMoeMLP(torch.tensor([0, 2]), keep_indicates=False))()
    session = assert_exact(model, _seq(), train=train)
    assert session.names == ("layers.0.all_gates.0",), session.names


@pytest.mark.reliability("false refusals")
def test_flex_moe_layer_storing_the_ids_on_its_gate_replays_as_by_hand() -> None:
    """Flex-MoE's layer as written: after the gate returns, ``self.gate.set_topk_indicates(gate_top_k_idx)`` stores
    the ids on the gate (read later by the model's loss code, never by the gate's forward). That is a record, not a
    setting: the router replays exactly without it, and with it: its code never reads that attribute."""
    model = _one_block(lambda: FlexMoeMLP(torch.tensor([0, 2])))()
    session = assert_exact(model, _seq())
    assert session.names == ("layers.0.all_gates.0",), session.names


# ----------------------------------------------------------------------- Mixture of Aggregators: one route per bag
# fatihOzlugedik/MixtureOfAggregators models/mixture_of_aggregators.py (``MixtureOfAggregators``, with
# ``router_style="topk"`` and ``router_type="linear"``): multiple-instance learning over a bag of patch features
# ``[B, N, D]``; the router is ``router_proj`` (Linear, ReLU) averaged over the bag's instances and a ``router_fc``
# Linear, ``[B, E]`` logits; with ``use_gumbel`` in training, Gumbel noise from ``rand_like``; the softmax at the
# temperature ``temp`` the caller passes, ``topk`` of ``k`` (also passed to ``forward``), the values renormalised
# (``+ 1e-8``); then a Python loop over the bags and their slots, ``.item()`` of each id picking the expert that pools
# that bag alone, the latents summed with the weights; a shared head. The warm-up phases (``epoch`` given) are left
# out: the path without them is the one at inference and after warm-up. The ABMIL experts are our own small
# attention pooling (CLAM's ``Attn_Net``), their ``fc`` a Linear and ReLU as upstream's (or GELU: latents with no
# exact zeros).
class MoaAbmilExpert(nn.Module):
    def __init__(self, input_dim: int, dim: int, relu: bool) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(input_dim, dim), nn.ReLU() if relu else nn.GELU())
        self.attention = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.fc(x)  # [1, N, dim]
        a = torch.softmax(self.attention(h), dim=1)
        return (a * h).sum(dim=1), None


class MixtureOfAggregators(_Used):
    def __init__(
        self, relu: bool, num_classes: int = 3, num_experts: int = 4, k_active: int = 2, proj_dim: int = 8
    ) -> None:
        super().__init__()
        self.num_experts, self.k_active = num_experts, k_active
        self.experts = nn.ModuleList([MoaAbmilExpert(D, D, relu) for _ in range(num_experts)])
        self.router_proj = nn.Sequential(nn.Linear(D, proj_dim, bias=True), nn.ReLU())
        self.router_fc = nn.Linear(proj_dim, num_experts)
        self.head = nn.Linear(D, num_classes)

    def forward(
        self, x: torch.Tensor, temp: float = 1.0, k: int | None = None, use_gumbel: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        k = k or self.k_active
        router_in = self.router_proj(x).mean(dim=1)
        router_logits = self.router_fc(router_in)
        if use_gumbel and self.training:
            eps = 1e-9
            U = torch.rand_like(router_logits).clamp_(eps, 1.0 - eps)
            logits_with_gumbel = router_logits + -torch.log(-torch.log(U))
        else:
            logits_with_gumbel = router_logits
        g_soft = F.softmax(logits_with_gumbel / temp, dim=-1)
        k_effective = min(k, self.num_experts)
        topk = g_soft.topk(k_effective, dim=-1)
        idx, weights = topk.indices, topk.values
        if self.forced is not None:
            idx = self.forced.view(B, k_effective)
            weights = g_soft.gather(-1, idx)
        self.used = idx
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-8)
        z_list = []
        for b in range(B):
            z_b: torch.Tensor | int = 0
            for j in range(k_effective):
                e_idx = int(idx[b, j].item())
                latent_bj, _ = self.experts[e_idx](x[b].unsqueeze(0))
                z_b = z_b + weights[b, j] * latent_bj
            assert isinstance(z_b, torch.Tensor)
            z_list.append(z_b)
        latent = torch.stack(z_list, dim=0).squeeze(1)
        return latent, self.head(latent), g_soft


class MoaClassifier(nn.Module):
    """The MIL wrapper: the bags' class logits at the temperature and k it passes each call."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.moa = MixtureOfAggregators(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, logits, _ = self.moa(x, temp=0.7, k=2, use_gumbel=True)
        return logits


def _bags() -> torch.Tensor:
    return torch.randn(4, 2, D, generator=torch.Generator().manual_seed(2))


@pytest.mark.reliability("silent replays")
def test_mixture_of_aggregators_routing_each_bag_replays_as_by_hand() -> None:
    """The Mixture of Aggregators at inference: one route per bag (the router's projection averaged over the bag's
    instances), the top-k of a temperature softmax renormalised, and a Python loop that runs each bag through its
    experts by ``.item()`` of their ids. Over experts whose latents have no exact zeros (GELU), found with zero
    configuration; the recorded rows are the experts each bag ran, and a replay after the router changes forces them,
    in output and gradients as by hand."""
    session = assert_exact(MoaClassifier(relu=False), _bags())
    assert session.names == ("moa.router_fc",), session.names


@pytest.mark.reliability("false refusals")
def test_mixture_of_aggregators_over_relu_experts_replays_as_by_hand() -> None:
    """The same router over upstream's experts, whose ``fc`` ends in a ReLU: the experts that run are the top-k's,
    whatever the scores, and the weights are the renormalised softmax of the current scores gathered. It replays
    exactly as over GELU experts; the exact zeros of the ReLU latents are features, not a choice."""
    session = assert_exact(MoaClassifier(relu=True), _bags())
    assert session.names == ("moa.router_fc",), session.names


# ----------------------------------------------------------------------- PAMoE: the patches of a slide chosen
# wjx-error/PAMoE models/pamoe_layers/pamoe.py (``ExpertChoiceGate``, ``PAMoE``; after kyegomez's SwitchTransformers):
# the gate's bias-free ``w_gate`` Linear gives logits; their softmax over the experts is the score; each expert takes
# the ``int(n * c // e)`` patches of the bag with its largest logits (``topk`` on dim -2, the sequence axis), a 0/1
# mask scattered on dim 1; every expert runs on every patch, NaNs zeroed in place, and the masked scores weight the
# stacked outputs. A patch gets anywhere from none to every expert.
class PamoeExpertChoiceGate(_Used):
    def __init__(self, dim: int, num_experts: int, capacity_factor: float) -> None:
        super().__init__()
        self.dim, self.num_experts, self.capacity_factor = dim, num_experts, capacity_factor
        self.w_gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_gated = self.w_gate(x)
        gate_scores = F.softmax(x_gated, dim=-1)
        n = x.size(1)
        top_num = int((n * self.capacity_factor) // self.num_experts)
        _, top_k_indices = x_gated.topk(top_num, dim=-2)
        mask = torch.zeros_like(gate_scores).scatter_(1, top_k_indices, 1)
        self.used = top_k_indices
        return gate_scores * mask, x_gated


class PamoeFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class Pamoe(nn.Module):
    def __init__(self, num_expert_extra: int = 2, num_expert_proto: int = 2, capacity_factor: float = 1.0) -> None:
        super().__init__()
        num_experts = num_expert_extra + num_expert_proto
        self.experts = nn.ModuleList([PamoeFeedForward(D, 2 * D) for _ in range(num_experts)])
        self.gate = PamoeExpertChoiceGate(D, num_experts, capacity_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_scores, x_gated = self.gate(x)
        expert_outputs = [expert(x) for expert in self.experts]
        if torch.isnan(gate_scores).any():
            gate_scores[torch.isnan(gate_scores)] = 0
        stacked_expert_outputs = torch.stack(expert_outputs, dim=-1)
        if torch.isnan(stacked_expert_outputs).any():
            stacked_expert_outputs[torch.isnan(stacked_expert_outputs)] = 0
        return torch.sum(gate_scores.unsqueeze(-2) * stacked_expert_outputs, dim=-1), x_gated


class PamoeBlock(nn.Module):
    """The transformer layer's use of it: the MoE output, ``x_gated`` kept for the prototype loss."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = Pamoe()
        self.x_gated: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.x_gated = self.moe(x)
        return out


@pytest.mark.reliability("refusals")
def test_pamoe_expert_choice_over_the_patches_is_refused() -> None:
    """PAMoE's gate: each expert's ``topk`` over the patches of the bag (dim -2), a 0/1 mask of the chosen patches on
    the softmax scores, every expert run on every patch. That is no choice of k experts per patch: it is refused at
    the first capture with a ``MoEReplayError`` that names the router and the ``topk`` along dim -2, the model left as
    it was."""
    model = _one_block(PamoeBlock)()
    assert_refused(model, _seq(seq=8), r"router 'layers\.0\.moe\.gate'.*topk along dim -2")


@pytest.mark.reliability("refusals")
def test_pamoe_expert_choice_over_the_patches_is_refused_as_expert_choice() -> None:
    """The refusal says what the router does, as it does for an expert choice over the transposed scores
    (``test_public_routers34``): expert-choice routing, which no replay of k experts per token can force."""
    model = _one_block(PamoeBlock)()
    assert_refused(model, _seq(seq=8), "expert-choice routing")


# ----------------------------------------------------------------------- MoE-CTS: a student encoder of soft experts
# robogauge/code go2_rl_gym/rsl_rl/rsl_rl/modules/actor_critic_moe_ng_cts.py (``StudentMoEEncoder``,
# ``ActorCriticMoENGCTS.get_student_latent_and_weights``, ``L2Norm``): a quadruped policy's student encoder over the
# observation history; the experts share a backbone, then a Linear gives every expert's hidden units at once and a
# grouped ``Conv1d`` (``groups=expert_num``, kernel 1) each expert's latent; the ``gating_network`` Sequential ends in
# ``nn.Softmax``, over the whole history (the experts see it without the goal commands, by a boolean mask buffer);
# the latents summed with every expert's weight and L2-normalised. No expert is chosen.
class CtsStudentMoEEncoder(nn.Module):
    def __init__(
        self, expert_dim: int, gating_dim: int, hidden_dim: int = 16, expert_num: int = 4, latent_dim: int = 8
    ) -> None:
        super().__init__()
        self.expert_num, self.latent_dim = expert_num, latent_dim
        expert_hidden_dim = 8
        self.experts_backbone = nn.Sequential(nn.Linear(expert_dim, hidden_dim), nn.ELU())
        self.experts_hidden = nn.Sequential(nn.Linear(hidden_dim, expert_num * expert_hidden_dim), nn.ELU())
        self.experts_out = nn.Conv1d(
            in_channels=expert_num * expert_hidden_dim,
            out_channels=expert_num * latent_dim,
            kernel_size=1,
            groups=expert_num,
        )
        self.gating_network = nn.Sequential(
            nn.Linear(gating_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, expert_num), nn.Softmax(dim=-1)
        )

    def forward(self, obs: torch.Tensor, obs_no_goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.gating_network(obs)
        expert_hidden = self.experts_hidden(self.experts_backbone(obs_no_goal)).unsqueeze(-1)
        expert_latent = self.experts_out(expert_hidden).reshape(-1, self.expert_num, self.latent_dim)
        latent = torch.sum(weights.unsqueeze(-1) * expert_latent, dim=1)
        return F.normalize(latent, p=2.0, dim=-1), weights


class CtsStudentPolicy(nn.Module):
    """The actor-critic's student path: the history's goal commands masked out for the experts, the latent and the
    observation into the actor."""

    def __init__(self, num_obs: int = 6, history_length: int = 3, num_actions: int = 2) -> None:
        super().__init__()
        self.history_length = history_length
        mask = torch.tensor([True, True, True, True, False, False])
        self.register_buffer("obs_no_goal_mask", mask, persistent=False)
        self.student_moe_encoder = CtsStudentMoEEncoder(int(mask.sum()) * history_length, num_obs * history_length)
        self.actor = nn.Sequential(nn.Linear(8 + num_obs, 16), nn.ELU(), nn.Linear(16, num_actions))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        B = history.shape[0]
        no_goal = history.reshape(B, self.history_length, -1)[:, :, self.obs_no_goal_mask].reshape(B, -1)
        latent, _ = self.student_moe_encoder(history, no_goal)
        return self.actor(torch.cat([latent, history.reshape(B, self.history_length, -1)[:, -1]], dim=1))


@pytest.mark.reliability("refusals")
def test_cts_student_encoder_of_soft_experts_is_refused_as_soft_routing() -> None:
    """MoE-CTS's student encoder: a softmax over every expert (the gating Sequential's last module), grouped-conv
    experts all weighted. No expert is chosen, so there is nothing to record or force: found by its softmax, it is
    refused at the first capture as soft routing, the model left as it was."""
    model = CtsStudentPolicy()
    history = torch.randn(5, 18, generator=torch.Generator().manual_seed(3))
    assert_refused(model, history, r"'student_moe_encoder\.gating_network'.*soft routing")


# ----------------------------------------------------------------------- TESTAM: a gate reading the experts' states
# HyunWookL/TESTAM model.py (``TESTAM.forward``, ``MemoryGate``): traffic forecasting over ``[B, in_dim, N, T]``;
# three experts (temporal, spatio-temporal, attention) all run, each giving an output and a hidden state; the
# ``MemoryGate`` scores each expert by the cosine similarity of a memory read by the input (softmax attention over
# ``memory``) and an attention read of that expert's hidden state (``hid_query`` / ``key`` / ``value``, one of each
# per expert, in ``ParameterList``s); the model softmaxes the ``[B, N, T, 1, E]`` scores, ``torch.max`` picks one
# expert per (node, step), and per expert ``torch.eq(routes, i).nonzero()`` copies its output there, times the
# picked probability with ``prob_mul``. The experts here are our own small ones (a Linear for the hidden state, one
# for the output), the gate and the selection as upstream's.
class TESTAMMemoryGate(nn.Module):
    def __init__(self, hidden_size: int, in_dim: int, mem_hid: int = 8, memory_size: int = 6, n: int = 3) -> None:
        super().__init__()
        self.sim = nn.CosineSimilarity(dim=-1)
        self.memory = nn.Parameter(torch.empty(memory_size, mem_hid))
        self.hid_query = nn.ParameterList([nn.Parameter(torch.empty(hidden_size, mem_hid)) for _ in range(n)])
        self.key = nn.ParameterList([nn.Parameter(torch.empty(hidden_size, mem_hid)) for _ in range(n)])
        self.value = nn.ParameterList([nn.Parameter(torch.empty(hidden_size, mem_hid)) for _ in range(n)])
        self.input_query = nn.Parameter(torch.empty(in_dim, mem_hid))
        for p in self.parameters():
            nn.init.xavier_uniform_(p)

    def forward(self, input: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        memories = self.query_mem(input)
        scores = [self.sim(memories, self.attention(h, i)) for i, h in enumerate(hidden)]
        return torch.stack(scores, dim=-1).unsqueeze(dim=-2)

    def attention(self, x: torch.Tensor, i: int) -> torch.Tensor:
        query = torch.matmul(x, self.hid_query[i])
        key = torch.matmul(x, self.key[i])
        value = torch.matmul(x, self.value[i])
        score = torch.softmax(torch.matmul(query, key.transpose(-1, -2)), dim=-1)
        return torch.matmul(score, value).expand_as(value)

    def query_mem(self, input: torch.Tensor) -> torch.Tensor:
        energy = torch.matmul(torch.matmul(input, self.input_query), self.memory.T)
        return torch.matmul(torch.softmax(energy, dim=-1), self.memory)


class TESTAMExpert(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.start_linear = nn.Linear(in_dim, hidden_size)
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.start_linear(x.permute(0, 2, 3, 1)))
        return self.proj(F.relu(h)), h


class TESTAM(_Used):
    def __init__(self, prob_mul: bool, in_dim: int = 2, hidden_size: int = 8) -> None:
        super().__init__()
        self.prob_mul = prob_mul
        self.experts = nn.ModuleList([TESTAMExpert(in_dim, hidden_size) for _ in range(3)])
        self.gate_network = TESTAMMemoryGate(hidden_size, in_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        results = [expert(input) for expert in self.experts]
        outs = [o for o, _ in results]
        B, N, T, _ = outs[0].size()
        gate = torch.softmax(self.gate_network(input.permute(0, 2, 3, 1), [h for _, h in results]), dim=-1)
        out = torch.zeros_like(outs[0]).view(-1, 1)
        route_prob_max, routes = torch.max(gate, dim=-1)
        if self.forced is not None:
            routes = self.forced.view(routes.shape)
            route_prob_max = gate.gather(-1, routes.unsqueeze(-1)).squeeze(-1)
        self.used = routes.reshape(-1, 1)
        route_prob_max = route_prob_max.view(-1)
        routes = routes.view(-1)
        for i in range(len(outs)):
            cur_out = outs[i].view(-1, 1)
            indices = torch.eq(routes, i).nonzero(as_tuple=True)[0]
            out[indices] = cur_out[indices]
        if self.prob_mul:
            out = out * route_prob_max.unsqueeze(dim=-1)
        return out.view(B, N, T, -1).permute(0, 3, 1, 2)


class TESTAMForecaster(nn.Module):
    def __init__(self, prob_mul: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = TESTAM(prob_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("prob_mul", [False, True], ids=["copy", "prob-mul"])
def test_testam_gate_reading_the_experts_states_replays_as_by_hand(prob_mul: bool) -> None:
    """TESTAM's memory gate: every expert runs, the gate scores each by the cosine similarity of an input-read memory
    and an attention read of that expert's hidden state, ``torch.max`` of the softmax picks one expert per (node,
    step) and its output is copied there (times the picked probability with ``prob_mul``; without it the gate gets
    no gradient). Found with zero configuration; the recorded rows are the expert each (node, step) took, and a replay
    after the gate changes forces them, in output and gradients as by hand."""
    x = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(4))
    session = assert_exact(TESTAMForecaster(prob_mul), x)
    assert session.names == ("model.gate_network",), session.names
