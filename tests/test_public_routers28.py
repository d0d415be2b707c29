"""MoE code of hierarchical and momentum research models, block wrappers for pruning and skipping, a router whose
top-k runs in a child module, dynamic-k routing and per-dataset experts, with zero configuration (see
``test_public_routers27``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused
from tests.test_public_routers27 import _FirstOut


# ----------------------------------------------------------------------- UltraThinking: a hierarchy of four routers
# vediyappanm/UltraThinking-LLM-Training src/models/moe_advanced.py (``NoisyTopKRouter``, ``Expert``,
# ``HierarchicalMoE``, ``MoELayer``): four levels of experts (knowledge, skill, meta, safety), each with its own
# ``NoisyTopKRouter``; a level's input is the block's input plus fixed fractions of the earlier levels' outputs. The
# router runs under ``torch._dynamo.disable`` (its public name here) with autocast off, in float32: a linear gate,
# softplus-scaled normal noise when the ``training`` argument says so (the block passes ``self.training``), softmax,
# ``torch.topk``, renormalised; it fills ``[tokens, E, k]`` dispatch and combine tensors by advanced-index assignment
# in a loop over the k slots. The level loops over its experts, takes the tokens whose mask has any slot for the
# expert (``dispatch_mask[:, :, e, :].any(-1)``), and adds the expert's output, weighted by the combine weights summed
# over the slots, in place at those tokens. An expert has a specialisation projection and norm after its MLP; the
# four levels' outputs are concatenated into a combiner MLP, a residual around it, a norm after.
class NoisyTopKRouter(_Used):
    def __init__(self, hidden_dim: int, num_experts: int, top_k: int = 2, noise_std: float = 1.0) -> None:
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k, self.noise_std = hidden_dim, num_experts, top_k, noise_std
        self.gate = nn.Linear(hidden_dim, num_experts, bias=False, dtype=torch.float32)
        self.noise_linear = nn.Linear(hidden_dim, num_experts, dtype=torch.float32)

    @torch.compiler.disable
    def forward(
        self, hidden_states: torch.Tensor, training: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden_states_flat = hidden_states.view(-1, hidden_dim)
        original_dtype = hidden_states.dtype
        with torch.amp.autocast(device_type="cpu", enabled=False):
            hs_fp32 = hidden_states_flat.to(dtype=torch.float32)
            logits = self.gate(hs_fp32)
            if training and self.noise_std > 0:
                noise_logits = self.noise_linear(hs_fp32)
                noise = torch.randn_like(logits) * F.softplus(noise_logits)
                logits = logits + noise * self.noise_std
            scores = F.softmax(logits, dim=-1)
            if self.forced is None:
                top_k_scores, top_k_indices = torch.topk(scores, self.top_k, dim=-1)
            else:
                top_k_indices = self.forced
                top_k_scores = scores.gather(-1, top_k_indices)
            self.used = top_k_indices
            top_k_scores = top_k_scores / top_k_scores.sum(dim=-1, keepdim=True)
            top_k_scores = top_k_scores.to(original_dtype)
        tokens = batch_size * seq_len
        dispatch_mask = torch.zeros(tokens, self.num_experts, self.top_k, dtype=torch.bool)
        combine_weights = torch.zeros(tokens, self.num_experts, self.top_k, dtype=hidden_states.dtype)
        for k in range(self.top_k):
            expert_idx = top_k_indices[:, k]
            dispatch_mask[torch.arange(tokens), expert_idx, k] = True
            combine_weights[torch.arange(tokens), expert_idx, k] = top_k_scores[:, k]
        expert_usage = dispatch_mask.float().sum(dim=(0, 2))
        expert_usage = expert_usage / (expert_usage.sum() + 1e-10)
        importance = scores.mean(dim=0)
        aux_losses = {
            "load_loss": F.kl_div(
                torch.log(expert_usage + 1e-10), torch.ones_like(expert_usage) / self.num_experts, reduction="batchmean"
            ),
            "importance_loss": torch.var(importance, unbiased=False) / (torch.mean(importance) ** 2 + 1e-10),
            "z_loss": torch.mean(torch.logsumexp(scores, dim=-1) ** 2),
        }
        dispatch_mask = dispatch_mask.view(batch_size, seq_len, self.num_experts, self.top_k)
        combine_weights = combine_weights.view(batch_size, seq_len, self.num_experts, self.top_k)
        return dispatch_mask, combine_weights, aux_losses


class SpecialisedExpert(nn.Module):
    def __init__(self, hidden_dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, intermediate_dim)
        self.fc2 = nn.Linear(intermediate_dim, hidden_dim)
        self.dropout = nn.Dropout(0.1)
        self.activation = nn.GELU()
        self.specialization_layer = nn.Linear(hidden_dim, hidden_dim)
        self.specialization_norm = nn.LayerNorm(hidden_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.fc2(self.dropout(self.activation(self.fc1(hidden_states))))
        return output + self.specialization_norm(self.specialization_layer(output))


class HierarchicalMoE(nn.Module):
    LEVELS = ("knowledge", "skill", "meta", "safety")
    knowledge_experts: nn.ModuleList
    skill_experts: nn.ModuleList
    meta_experts: nn.ModuleList
    safety_experts: nn.ModuleList
    knowledge_router: NoisyTopKRouter
    skill_router: NoisyTopKRouter
    meta_router: NoisyTopKRouter
    safety_router: NoisyTopKRouter

    def __init__(self, hidden_dim: int = D, intermediate_dim: int = D, num_experts: int = 3, top_k: int = 2):
        super().__init__()
        for level in self.LEVELS:
            experts = nn.ModuleList(SpecialisedExpert(hidden_dim, intermediate_dim) for _ in range(num_experts))
            setattr(self, f"{level}_experts", experts)
        for level in self.LEVELS:
            setattr(self, f"{level}_router", NoisyTopKRouter(hidden_dim, num_experts, min(top_k, num_experts)))
        self.hierarchy_combiner = nn.Sequential(
            nn.Linear(hidden_dim * 4, hidden_dim * 2), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden_dim * 2, hidden_dim)
        )

    def _route_and_compute(
        self, hidden_states: torch.Tensor, experts: nn.ModuleList, router: NoisyTopKRouter
    ) -> torch.Tensor:
        dispatch_mask, combine_weights, _ = router(hidden_states, self.training)
        expert_output = torch.zeros_like(hidden_states)
        for expert_idx, expert in enumerate(experts):
            expert_mask = dispatch_mask[:, :, expert_idx, :].any(dim=-1)
            if expert_mask.any():
                expert_result = expert(hidden_states[expert_mask].unsqueeze(0)).squeeze(0)
                expert_weights = combine_weights[:, :, expert_idx, :].sum(dim=-1)[expert_mask]
                expert_output[expert_mask] += expert_result * expert_weights.unsqueeze(-1)
        return expert_output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        knowledge = self._route_and_compute(hidden_states, self.knowledge_experts, self.knowledge_router)
        skill = self._route_and_compute(hidden_states + 0.5 * knowledge, self.skill_experts, self.skill_router)
        meta = self._route_and_compute(
            hidden_states + 0.3 * knowledge + 0.3 * skill, self.meta_experts, self.meta_router
        )
        safety = self._route_and_compute(
            hidden_states + 0.2 * (knowledge + skill + meta), self.safety_experts, self.safety_router
        )
        combined = torch.cat([knowledge, skill, meta, safety], dim=-1)
        return hidden_states + self.hierarchy_combiner(combined)


class HierarchicalMoELayer(nn.Module):
    """``MoELayer``: a norm in, the hierarchical MoE, dropout, a norm out (one layer: four routers already)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_norm = nn.LayerNorm(D)
        self.post_moe_norm = nn.LayerNorm(D)
        self.moe = HierarchicalMoE()
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.post_moe_norm(self.dropout(self.moe(self.input_norm(hidden_states))))


def _seq() -> torch.Tensor:
    return _x(2, 5)


def _short() -> torch.Tensor:
    return _x(2, 3)


# ----------------------------------------------------------------------- K-SVD: dynamic skipping of the second expert
# jinuk0211/K-SVD dynamic_skip.py (``DynamicSkippingSparseMoeBlockWrapper``): wraps a Qwen3-MoE block (kept as
# ``self.model``, its gate and experts held again as ``self.gate`` and ``self.experts``); softmax of the gate's
# logits, ``torch.topk``, then the second slot is skipped where its weight is under ``beta`` times the first one's
# (the top-2 form the file keeps, commented, beside a k-wide one): its weight set to 0 in place, the weights
# renormalised (twice, as upstream), and the slot cleared in the one-hot expert mask (``expert_mask[:, 1, mask_skip]
# = 0``), so the skipped expert never runs on that token. The experts then run per expert on ``torch.where`` of the
# mask, weighted, ``index_add_`` into the output.
class QwenExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, 2 * D, bias=False)
        self.up_proj = nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3MoeSparseMoeBlock(nn.Module):
    """The wrapped block (v4-era HF Qwen3-MoE): softmax, top-k, renormalised, the one-hot loop over experts."""

    def __init__(self, num_experts: int = 6, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.ModuleList(QwenExpert() for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.numel():
                current = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
                final_hidden_states.index_add_(0, top_x, current)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class DynamicSkippingSparseMoeBlock(_Used):
    """The wrapper: the block kept as ``self.model``, its gate and experts also held as ``self.gate`` and
    ``self.experts`` (one module under two paths each); the block's own forward never runs."""

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        model = Qwen3MoeSparseMoeBlock()
        self.model, self.beta = model, beta
        self.num_experts, self.top_k = model.num_experts, model.top_k
        self.gate = model.gate
        self.experts = model.experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden_states_flat = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states_flat)
        routing_weights = F.softmax(router_logits, dim=-1)
        if self.forced is None:
            topk_weights, topk_indices = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            topk_indices = self.forced
            topk_weights = routing_weights.gather(-1, topk_indices)
        mask_skip = topk_weights[:, 1] < self.beta * topk_weights[:, 0]
        topk_weights[mask_skip, 1] = 0
        topk_weights /= topk_weights.sum(dim=-1, keepdim=True)
        topk_weights /= topk_weights.sum(dim=-1, keepdim=True)
        expert_mask = F.one_hot(topk_indices, num_classes=self.num_experts).permute(2, 1, 0)
        expert_mask[:, 1, mask_skip] = 0
        # (the experts used: a skipped slot names the first expert again)
        self.used = torch.where(mask_skip[:, None], topk_indices[:, :1], topk_indices)
        final_hidden_states = torch.zeros_like(hidden_states_flat)
        for expert_idx in range(self.num_experts):
            top_x_list, batch_idx = torch.where(expert_mask[expert_idx])
            if batch_idx.numel() == 0:
                continue
            expert_output = self.experts[expert_idx](hidden_states_flat[batch_idx])
            expert_output = expert_output * topk_weights[batch_idx, top_x_list, None]
            final_hidden_states.index_add_(0, batch_idx, expert_output)
        return final_hidden_states.view(batch_size, seq_len, hidden_dim)


# ----------------------------------------------------------------------- Dynamic-k: experts until the mass passes tau
# corey-shen/dynamicK-mixture-of-experts dataset/Mixture_of_experts/dynamic_k_moe.py (``DynamicKRouter``,
# ``ExpertNetwork``, ``DynamicKMoELayer``): softmax of a linear gate, ``torch.sort`` descending, the running sum, each
# token's k the first place where it reaches ``threshold`` (``argmax`` of the mask, plus one; every expert where it
# never does), ``max_k`` read with ``.item()``; the chosen ids and probabilities copied token by token into
# ``[batch, seq, max_k]`` tensors padded with -1 and 0. The layer loops over tokens and their first k slots in Python,
# each expert run on the one token, weighted by its (unrenormalised) probability; a norm on the output.
class DynamicKRouter(_Used):
    def __init__(self, hidden_dim: int = D, num_experts: int = 6, threshold: float = 0.5) -> None:
        super().__init__()
        self.num_experts, self.threshold = num_experts, threshold
        self.gate = nn.Linear(hidden_dim, num_experts)
        nn.init.normal_(self.gate.weight, 0, 0.1)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, seq_len, _ = x.shape
        probs = F.softmax(self.gate(x), dim=-1)
        sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
        cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
        threshold_mask = cumulative_probs >= self.threshold
        k_values = torch.argmax(threshold_mask.float(), dim=-1) + 1
        never_reached = ~threshold_mask.any(dim=-1)
        k_values = torch.where(never_reached, self.num_experts, k_values)
        max_k = min(int(k_values.max().item()), self.num_experts)
        selected_experts = torch.full((batch_size, seq_len, max_k), -1, dtype=torch.long)
        selected_probs = torch.zeros((batch_size, seq_len, max_k), dtype=torch.float)
        for b in range(batch_size):
            for s in range(seq_len):
                k = min(int(k_values[b, s].item()), max_k)
                selected_experts[b, s, :k] = sorted_indices[b, s, :k]
                selected_probs[b, s, :k] = sorted_probs[b, s, :k]
        self.used = selected_experts.view(-1, max_k)
        return selected_experts, selected_probs, k_values


class DynamicKMoELayer(nn.Module):
    def __init__(self, num_experts: int = 6) -> None:
        super().__init__()
        self.router = DynamicKRouter(num_experts=num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * D, D))
            for _ in range(num_experts)
        )
        self.output_norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = x.shape
        selected_experts, selected_probs, k_values = self.router(x)
        max_k = selected_experts.shape[-1]
        output = torch.zeros_like(x)
        for b in range(batch_size):
            for s in range(seq_len):
                token_input = x[b, s]
                token_output = torch.zeros_like(token_input)
                for i in range(min(int(k_values[b, s].item()), max_k)):
                    expert_idx = int(selected_experts[b, s, i].item())
                    if expert_idx >= 0:
                        expert_output = self.experts[expert_idx](token_input.unsqueeze(0)).squeeze(0)
                        token_output += selected_probs[b, s, i] * expert_output
                output[b, s] = token_output
        return self.output_norm(output)


class AliasingSparseMoeBlockWrapper(_Used):
    """K-SVD's wrapper structure with its skip left out: the block kept as ``self.model``, its gate and experts held
    again under the wrapper's names, and the wrapper's forward the block's own top-k (its forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        model = Qwen3MoeSparseMoeBlock()
        self.model, self.num_experts, self.top_k = model, model.num_experts, model.top_k
        self.gate = model.gate
        self.experts = model.experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_dim = hidden_states.shape[-1]
        flat = hidden_states.view(-1, hidden_dim)
        routing_weights = F.softmax(self.gate(flat), dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            selected_experts = self.forced
            routing_weights = routing_weights.gather(-1, selected_experts)
        self.used = selected_experts
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.numel():
                out.index_add_(0, top_x, self.experts[expert_idx](flat[top_x]) * routing_weights[top_x, idx, None])
        return out.view_as(hidden_states)


# ------------------------------------------------------------------ MomentumSMoE: three gates, a momentum across layers
# AverageMetaheuristicsEnjoyer/Multi-Head-MomentumSMoE gates.py (``CustomNaiveGate_Balance_SMoE``, ``SMoE_Momentum``,
# ``MHMoEGate``), custom_transformer.py (``FMoETransformerMLP``) and models.py (``MomentumLayer``,
# ``TransformerSeqLayer``, ``TransformerSeq``): a fastmoe-style layer, the gate returning ``(top_k_idx, scores)``, the
# experts two stacked ``FMoELinear`` (``[E, out, in]`` weights and ``[E, out]`` biases), the k outputs combined by a
# ``bmm`` with the scores. The balance gate takes an unsorted ``topk`` of the logits, scatters them into a ``-inf``
# tensor, softmaxes it (a softmax over the k chosen) and gathers the scores back, its balance loss kept on the gate. The
# momentum gate subtracts ``alpha`` times an EMA of the routed probabilities (a buffer, moved in place at each training
# forward) from the logits before its top-k: a bias-corrected choice. The multi-head gate (``use_xmoe``) projects the
# token to a small routing dimension, renormalises its expert embeddings ``wg`` in place, under ``no_grad``, at every
# forward, and routes by cosine with them, a softmax over the k logits; the layer splits each token into heads first
# (``split_layer``, ``merge_layer``: a routed row is a head of a token). ``MomentumLayer`` carries a momentum from
# layer to layer (``momentum = -moe_out + mu * momentum``, the output ``gamma * momentum``), each layer's output added
# to the hidden state under a norm.
class CustomNaiveGateBalanceSMoE(_Used):
    def __init__(self, d_model: int, num_expert: int, top_k: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, num_expert, bias=False)
        self.tot_expert, self.top_k = num_expert, top_k
        self.loss: torch.Tensor | None = None

    def _logits(self, inp: torch.Tensor) -> torch.Tensor:
        return self.gate(inp)

    def _after(self, router_probs: torch.Tensor, top_k_indices: torch.Tensor) -> None:
        if self.training:
            with torch.no_grad():
                f_i = F.one_hot(top_k_indices, self.tot_expert).float().sum(dim=1).mean(dim=0)
            self.loss = (f_i * router_probs.float().mean(dim=0)).sum() * self.tot_expert

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(inp)
        if self.forced is None:
            top_k_logits, top_k_indices = torch.topk(logits, k=self.top_k, dim=-1, largest=True, sorted=False)
        else:
            top_k_indices = self.forced
            top_k_logits = logits.gather(-1, top_k_indices)
        self.used = top_k_indices
        router_probs = torch.full_like(logits, float("-inf"))
        router_probs.scatter_(-1, top_k_indices, top_k_logits)
        router_probs = F.softmax(router_probs, dim=-1)
        self._after(router_probs, top_k_indices)
        return top_k_indices, torch.gather(router_probs, dim=-1, index=top_k_indices)


class SMoEMomentumGate(CustomNaiveGateBalanceSMoE):
    avg_probs: torch.Tensor

    def __init__(self, d_model: int, num_expert: int, top_k: int = 2, alpha: float = 1.0, beta: float = 0.9) -> None:
        super().__init__(d_model, num_expert, top_k)
        self.register_buffer("avg_probs", torch.zeros(num_expert))
        self.alpha, self.beta = alpha, beta

    def _logits(self, inp: torch.Tensor) -> torch.Tensor:
        logits = self.gate(inp)
        if self.training:
            logits = logits - self.avg_probs.unsqueeze(0) * self.alpha
        return logits

    def _after(self, router_probs: torch.Tensor, top_k_indices: torch.Tensor) -> None:
        if self.training:
            batch_routed_probs = torch.mean(router_probs.float(), dim=0)
            self.avg_probs.mul_(self.beta).add_(batch_routed_probs.detach(), alpha=1.0 - self.beta)


class MHMoEGate(_Used):
    def __init__(self, d_model: int, num_expert: int, top_k: int = 2, xmoe_routing_dim: int = 4) -> None:
        super().__init__()
        self.top_k, self.num_expert = top_k, num_expert
        self.wg_reduction = nn.Linear(d_model, xmoe_routing_dim, bias=False)
        wg = torch.empty(num_expert, xmoe_routing_dim)
        nn.init.orthogonal_(wg, gain=0.32)
        self.wg = nn.Parameter(wg)
        self.loss: torch.Tensor | None = None

    def _cosine(self, mat1: torch.Tensor, mat2: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        mat2 = F.normalize(mat2.float(), p=2.0, dim=1, eps=eps)
        return mat1.float().matmul(mat2.transpose(0, 1)).type_as(mat1)

    def _make_finite(self, scores: torch.Tensor) -> torch.Tensor:
        ok = scores.isfinite()
        if not ok.all():
            scores[~ok] = scores[ok].min()
        return scores

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inp = self.wg_reduction(inp)
        with torch.no_grad():
            self.wg.mul_(1.5 / self.wg.norm(p=2.0, dim=-1, keepdim=True))
        logits = self._make_finite(self._cosine(inp, self.wg))
        if self.forced is None:
            gate_top_k_logits, gate_top_k_idx = torch.topk(logits, k=self.top_k, dim=-1, largest=True, sorted=False)
        else:
            gate_top_k_idx = self.forced
            gate_top_k_logits = logits.gather(-1, gate_top_k_idx)
        self.used = gate_top_k_idx
        gate_score = F.softmax(gate_top_k_logits, dim=-1)
        scores_w_noise = F.softmax(logits / 0.3, dim=-1)
        mask = torch.zeros_like(scores_w_noise).scatter_(
            1, gate_top_k_idx[:, :1], self.num_expert / scores_w_noise.size(0)
        )
        self.loss = torch.sum(scores_w_noise.sum(0) * mask.sum(0)) / scores_w_noise.size(0)
        return gate_top_k_idx, gate_score


class FMoELinear(nn.Module):
    def __init__(self, num_expert: int, in_feat: int, out_feat: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_expert, out_feat, in_feat) / in_feat**0.5)
        self.bias = nn.Parameter(torch.zeros(num_expert, out_feat))

    def forward(self, inp: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ri,roi->ro", inp, self.weight[expert_of_row]) + self.bias[expert_of_row]


class FMoEExpert(nn.Module):
    """``_Expert``: ``expand``, ReLU, ``shrink``."""

    def __init__(self, num_experts: int, hidden_size: int, inner_hidden_size: int) -> None:
        super().__init__()
        self.expand = FMoELinear(num_experts, hidden_size, inner_hidden_size)
        self.shrink = FMoELinear(num_experts, inner_hidden_size, hidden_size)

    def forward(self, inp: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        return self.shrink(F.relu(self.expand(inp, expert_of_row)), expert_of_row)


class FMoETransformerMLP(nn.Module):
    def __init__(self, gate: str, num_experts: int = 4, top_k: int = 2, heads: int = 1) -> None:
        super().__init__()
        d = D // heads
        self.hidden_size, self.mhmoe_num_heads, self.top_k = D, heads, top_k
        self.gate: nn.Module = (
            CustomNaiveGateBalanceSMoE(d, num_experts, top_k)
            if gate == "balance"
            else SMoEMomentumGate(d, num_experts, top_k)
            if gate == "momentum"
            else MHMoEGate(d, num_experts, top_k)
        )
        self.num_expert, self.world_size = num_experts, 1
        self.experts = FMoEExpert(num_experts, d, 2 * d)
        if heads > 1:
            self.split_layer = nn.Linear(D, D)
            self.merge_layer = nn.Linear(D, D)

    def _fmoe(self, inp: torch.Tensor) -> torch.Tensor:
        """``FMoE.forward``: each row repeated for its k experts, run by its expert, combined by ``bmm``."""
        gate_top_k_idx, gate_score = self.gate(inp)
        rows = inp.repeat_interleave(self.top_k, dim=0)
        expert_of_row = gate_top_k_idx.reshape(-1)
        out = self.experts(rows, expert_of_row)
        return torch.bmm(gate_score.view(-1, 1, self.top_k), out.view(-1, self.top_k, out.shape[-1])).squeeze(1)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        original_shape = inp.shape
        reshaped_inp = inp.reshape(-1, self.hidden_size)
        if self.mhmoe_num_heads > 1:
            reshaped_inp = self.split_layer(reshaped_inp)
            n, dim = reshaped_inp.shape
            reshaped_inp = reshaped_inp.reshape(n * self.mhmoe_num_heads, dim // self.mhmoe_num_heads)
            out = self._fmoe(reshaped_inp).reshape(n, self.hidden_size)
            out = self.merge_layer(out)
        else:
            out = self._fmoe(reshaped_inp)
        return out.reshape(original_shape)


class MomentumLayer(FMoETransformerMLP):
    def __init__(self, gate: str, heads: int = 1, gamma: float = 1.0, mu: float = 0.7) -> None:
        super().__init__(gate, heads=heads)
        self.gamma, self.mu = gamma, mu
        self.dropout = nn.Dropout(0.1)

    def forward(self, inp: torch.Tensor, momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        moe_out = self.dropout(super().forward(inp))
        momentum = -moe_out + self.mu * momentum
        return self.gamma * momentum, momentum


class MomentumSMoE(nn.Module):
    """Two ``TransformerSeqLayer`` SMoE halves (no attention): the momentum from zeros, ``h = norm2(h + out)``."""

    def __init__(self, gate: str = "balance", heads: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.smoe = nn.ModuleList(MomentumLayer(gate, heads) for _ in range(2))
        self.norm2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        momentum = torch.zeros_like(h)
        for smoe, norm2 in zip(self.smoe, self.norm2, strict=True):
            smoe_out, momentum = smoe(h, momentum)
            h = norm2(h + smoe_out)
        return h


# ------------------------------------------------------------------ tamm: the top-k in a sampler, a child of the router
# tamm (Apple's tamm package, 0.2.0) tamm/layers/mixture_of_experts/router.py (``MixtureOfExpertsRouter``,
# ``create_basic_builder``), sampler (``TopKMixtureOfExpertsSampler``), loss.py (``LoadBalanceLoss``, ``RouterZLoss``),
# dispatcher/capacity_constraint.py (``VanillaMixtureOfExpertsCapacityConstraint``) and mixture_of_experts.py
# (``MixtureOfExperts``): the router is a chain of children, a bias-free linear ``input_transform``, a cast to float32,
# a tanh soft cap (``SoftCap``), the z-loss, a ``Softmax`` module, and a ``sampler`` module that takes the top-k of
# the probabilities and renormalises them; the router returns a dataclass of assignments, weights and losses (the
# load-balance loss from the one-hot assignments). The capacity-constrained dispatcher drops by position alone: one-hot
# indicators ``(B, S, K, E)`` with K put first, a running sum per expert, the places past ``ceil(factor * tokens /
# E)`` dropped. The experts run per expert on the kept places; the combine weights them; output dropout and a residual
# add. (tamm's dataclasses are registered for ``torch.export``; plain dataclasses here.)
@dataclasses.dataclass
class SamplerOutput:
    expert_assignments: torch.Tensor
    assignment_weights: torch.Tensor


@dataclasses.dataclass
class RouterOutput:
    expert_assignments: torch.Tensor
    assignment_weights: torch.Tensor
    losses: dict[str, torch.Tensor]


class TopKMixtureOfExpertsSampler(_Used):
    def __init__(self, num_experts_per_token: int) -> None:
        super().__init__()
        self.num_experts_per_token = num_experts_per_token

    def forward(self, probabilities: torch.Tensor) -> SamplerOutput:
        if self.forced is None:
            weights, assignments = torch.topk(probabilities, self.num_experts_per_token, dim=-1)
        else:
            assignments = self.forced.view(*probabilities.shape[:-1], -1)
            weights = probabilities.gather(-1, assignments)
        self.used = assignments.reshape(-1, self.num_experts_per_token)
        return SamplerOutput(assignments, weights / weights.sum(dim=-1, keepdim=True))


class SoftCap(nn.Module):
    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(tensor / self.cap)


class MixtureOfExpertsRouter(nn.Module):
    def __init__(self, input_dim: int = D, num_experts: int = 4, num_experts_per_token: int = 2) -> None:
        super().__init__()
        self.input_transform = nn.Linear(input_dim, num_experts, bias=False)
        self.logits_cap = SoftCap(cap=5.0)
        self.softmax = nn.Softmax(dim=-1)
        self.sampler = TopKMixtureOfExpertsSampler(num_experts_per_token)
        self.cast_dtype = torch.float32

    def forward(self, tensor: torch.Tensor) -> RouterOutput:
        logits = self.logits_cap(self.input_transform(tensor).type(self.cast_dtype))
        losses = {"logits_loss": torch.logsumexp(logits, dim=-1).square().mean()}
        probabilities = self.softmax(logits)
        sampler_output = self.sampler(probabilities)
        num_experts = probabilities.size(-1)
        one_hot = F.one_hot(sampler_output.expert_assignments, num_classes=num_experts)
        counts = one_hot.count_nonzero(dim=(-3, -2))
        soft_freqs = probabilities.mean(-2)
        losses["load_balance_loss"] = torch.mean(counts * soft_freqs) * (num_experts**2 / one_hot.shape[-3:-1].numel())
        return RouterOutput(sampler_output.expert_assignments, sampler_output.assignment_weights, losses)


class TammMixtureOfExperts(nn.Module):
    def __init__(self, num_experts: int = 4, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.router = MixtureOfExpertsRouter(num_experts=num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D, bias=False), nn.GELU(), nn.Linear(2 * D, D, bias=False))
            for _ in range(num_experts)
        )
        self.output_dropout = nn.Dropout(0.1)
        self.capacity_factor = capacity_factor

    def _kept(self, expert_assignments: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``VanillaMixtureOfExpertsCapacityConstraint`` (no track dimensions): the kept places ``(B, S, K, E)``."""
        indicators = F.one_hot(expert_assignments, num_experts).swapdims(0, -2)  # (K, S, B, E)
        tokens_shape = indicators.shape[:-1]
        indicators = indicators.flatten(end_dim=-2)
        capacity_per_expert = math.ceil(self.capacity_factor * tokens_shape.numel() / num_experts)
        capacity_indices = torch.cumsum(indicators, dim=-2)
        capacity_indices *= indicators
        capacity_indices *= capacity_indices <= capacity_per_expert
        return capacity_indices.not_equal_(0).unflatten(0, tokens_shape).swapdims(0, -2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.norm(input)
        router_out = self.router(x)
        kept = self._kept(router_out.expert_assignments, len(self.experts))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            b, s, k = kept[..., e].nonzero(as_tuple=True)
            if b.numel():
                y = expert(x[b, s]) * router_out.assignment_weights[b, s, k, None].to(x.dtype)
                out = out.index_put((b, s), y, accumulate=True)
        return self.output_dropout(out) + input


def _tamm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(TammMixtureOfExperts(), TammMixtureOfExperts())


# ----------------------------------------------------------------------- S5: the dataset names the expert
# MiliLab/S5 RS_Finetune/Semantic_Segmentation/model/backbone/vit_moe.py (``FFNMOE``, ``TransformerEncoderLayer``): a
# remote-sensing ViT whose FFN keeps a shared first layer and a shared output for ``embed_dims - part_features``
# channels, and an expert per dataset (``Linear(feedforward_channels, part_features)``) for the rest, concatenated;
# ``task2id`` maps the dataset's name (handed to each layer's forward) to its expert: no router decides.
class FFNMOE(nn.Module):
    def __init__(self, task_names: tuple[str, ...] = ("vaihingen", "potsdam", "OpenEarthMap"), part: int = 4):
        super().__init__()
        self.num_expert, self.part_features = len(task_names), part
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Dropout(0.0)), nn.Linear(2 * D, D - part), nn.Dropout(0.0)
        )
        self.task2id = {name: i for i, name in enumerate(task_names)}
        self.experts = nn.ModuleList(nn.Linear(2 * D, part) for _ in task_names)

    def forward(self, x: torch.Tensor, task: str | int, identity: torch.Tensor | None = None) -> torch.Tensor:
        expert_id = self.task2id[task] if isinstance(task, str) else int(task)
        out = x
        for layer in list(self.layers)[:-2]:
            out = layer(out)
        shared_out = self.layers[-1](self.layers[-2](out))
        out = torch.cat([shared_out, self.experts[expert_id](out)], dim=-1)
        return (x if identity is None else identity) + out


class S5Encoder(nn.Module):
    """Two encoder layers' FFN halves (``ffn(norm2(x), dataset, identity=x)``), the dataset held on the model."""

    def __init__(self, dataset: str = "potsdam") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dataset = dataset
        self.norm2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.ffn = nn.ModuleList(FFNMOE() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm2, ffn in zip(self.norm2, self.ffn, strict=True):
            x = ffn(norm2(x), self.dataset, identity=x)
        return x


# ------------------------------------------------------------ Expert_Sparsity: a wrapper that routes for its block
# Lucky-Lance/Expert_Sparsity model/wrapper.py (``PrunableMixtralSparseMoeBlockWrapper``): expert pruning (Lu et al.
# 2024) wraps each Mixtral block as ``self.model`` and routes in the wrapper's own forward: the block's gate, the
# logits of the experts in ``experts_to_drop`` set to ``-inf`` in place, softmax in float32, ``torch.topk`` of
# ``self.model.top_k``, renormalised, the one-hot expert mask, and each of the block's experts run on its tokens (the
# v4-era ``MixtralBLockSparseTop2MLP(hidden_states, routing_weights)`` weighting inside the expert), ``index_add_``;
# the wrapper returns ``(hidden_states, router_logits)``. The wrapped block's own forward never runs.
class MixtralBlockSparseTop2MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(D, 2 * D, bias=False)
        self.w2 = nn.Linear(2 * D, D, bias=False)
        self.w3 = nn.Linear(D, 2 * D, bias=False)

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return routing_weights * self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states))


class MixtralSparseMoeBlock(nn.Module):
    """The wrapped block (v4-era HF Mixtral): its gate, experts, ``num_experts`` and ``top_k``; its own forward, the
    same top-k, is what the wrapper replaces."""

    def __init__(self, num_experts: int = 6, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.ModuleList(MixtralBlockSparseTop2MLP() for _ in range(num_experts))


class PrunableMixtralSparseMoeBlockWrapper(_Used):
    def __init__(self, experts_to_drop: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.model = MixtralSparseMoeBlock()
        self.experts_to_drop = experts_to_drop

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.model.gate(hidden_states)
        if self.experts_to_drop is not None:
            for e in self.experts_to_drop:
                router_logits[:, e] = -float("inf")
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.model.top_k, dim=-1)
        else:
            selected_experts = self.forced
            routing_weights = routing_weights.gather(-1, selected_experts)
        self.used = selected_experts
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype)
        expert_mask = F.one_hot(selected_experts, num_classes=self.model.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.model.num_experts):
            expert_layer = self.model.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.shape[0] == 0:
                continue
            top_x_list, idx_list = top_x.tolist(), idx.tolist()
            current_state = hidden_states[None, top_x_list].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state, routing_weights[top_x_list, idx_list, None])
            final_hidden_states.index_add_(0, top_x, current_hidden_states)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train`` and attach options)
    # (a smaller change of the routers: a forced expert's softmax score under float32's range makes the renormalised
    # weights 0/0, upstream as by hand, and NaN is never equal to itself)
    "ultrathinking-hierarchical-moe": (HierarchicalMoELayer, _short, {"change": 0.5}),
    "ultrathinking-hierarchical-moe-train": (
        HierarchicalMoELayer,
        _short,
        {"change": 0.5, "train": True},
    ),
    "momentum-smoe-balance-gate": (MomentumSMoE, _seq, {}),
    "momentum-smoe-balance-gate-train": (MomentumSMoE, _seq, {"train": True}),
    "momentum-smoe-ema-penalty-gate-train": (lambda: MomentumSMoE("momentum"), _seq, {"train": True}),
    "momentum-smoe-multi-head-xmoe-gate": (lambda: MomentumSMoE("xmoe", heads=2), _seq, {"same_forwards": True}),
    "momentum-smoe-multi-head-xmoe-gate-train": (
        lambda: MomentumSMoE("xmoe", heads=2),
        _seq,
        {"same_forwards": True, "train": True},
    ),
    "tamm-router-sampler-capacity": (_tamm, _short, {"holders": True}),
    "tamm-router-sampler-capacity-train": (_tamm, _short, {"holders": True, "train": True}),
    # (the wrapper returns ``(hidden_states, router_logits)``; the router found is the wrapped block's gate, whose
    # caller, the wrapper, takes the top-k)
    # (the idle paths of the aliased gates left out, as the refusal below says)
    "k-svd-wrapper-aliases-no-skip-idle-paths-excluded": (
        lambda: Layers(AliasingSparseMoeBlockWrapper),
        _seq,
        {"exclude": "layers.*.model.gate"},
    ),
    "expert-sparsity-prunable-wrapper": (
        lambda: Layers(lambda: _FirstOut(PrunableMixtralSparseMoeBlockWrapper())),
        _seq,
        {"holders": True},
    ),
    "expert-sparsity-prunable-wrapper-experts-dropped": (
        lambda: Layers(lambda: _FirstOut(PrunableMixtralSparseMoeBlockWrapper(experts_to_drop=(1, 4)))),
        _seq,
        {"holders": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """UltraThinking's hierarchy of four noisy top-k routers per layer (each level reading the earlier levels'
    outputs; dynamo disabled, autocast off, advanced-index dispatch masks); MomentumSMoE's gates (a softmax over the
    k chosen through a ``-inf`` scatter, an EMA penalty buffer moved at each training forward before the top-k, and a
    multi-head cosine gate that renormalises its expert embeddings in place at every forward), with the momentum
    carried from layer to layer; Expert_Sparsity's pruning wrapper (the wrapped block's gate called from the
    wrapper's forward, which takes the top-k; pruned experts' logits set to ``-inf`` in place first); tamm's router,
    whose top-k runs in a sampler child and whose output is a dataclass, with a capacity drop by position after it:
    every router found and nothing else, the recorded rows the experts used, and a replay after the routers change
    those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


_LATER = r"router 'layers\.0\.gate': after its decision .* its forward chooses again from the current scores"
_STEPS = r"router 'layers\.0\.router': its forward makes more than one independent choice .*top-p"

REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "k-svd-dynamic-skip": (lambda: Layers(DynamicSkippingSparseMoeBlock), _seq, _LATER, {}),
    "dynamic-k-threshold": (lambda: Layers(DynamicKMoELayer), _seq, _STEPS, {}),
    "s5-expert-per-dataset": (S5Encoder, _seq, "no MoE router found", {}),
    "s5-expert-per-dataset-named": (
        S5Encoder,
        _seq,
        r"routers 'ffn\.0' and 'ffn\.1' make no decision-like call",
        {"include": FFNMOE},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """A dynamic skip of the second expert where its weight is under ``beta`` times the first one's (a later choice
    from the scores, the skipped slot cleared in the expert mask); dynamic-k routing (a sort, a running sum, the first
    place past a threshold, copied token by token); S5's expert per dataset (named by the dataset, no router; alone
    and named): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
def test_gate_aliased_by_a_wrapper_names_the_path_that_recorded_its_rows() -> None:
    """A wrapper that keeps its block as ``self.model`` and holds the block's gate again as ``self.gate`` (K-SVD's
    structure): zero configuration finds the gate at both paths; the block at ``model`` never runs, so that path
    records no row, and the error says which path of the same module recorded them (and ``exclude=``) rather than
    only that the router never ran; the model as it was after detaching."""
    model = Layers(AliasingSparseMoeBlockWrapper).eval()
    before = snapshot(model)
    with mr.attach(model) as session:
        assert set(session.names) == {f"layers.{i}.{path}gate" for i in (0, 1) for path in ("", "model.")}
        with torch.no_grad(), session.capture():
            model(_seq())
        with pytest.raises(
            mr.MoEReplayError,
            match=r"'layers\.0\.model\.gate' is the module that 'layers\.0\.gate' recorded rows for.*exclude=",
        ):
            session.routes()
    assert_untouched(model, before)
