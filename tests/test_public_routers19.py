"""More public MoE router code, with zero configuration (see ``test_public_routers18``).

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

import moe_replay as mr
from tests.test_evidence import D, E
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused, one_layer


# ----------------------------------------------------------------------- LitGPT: a top-k in the block, a DSv3 router
# Lightning-AI/litgpt litgpt/model.py (``LLaMAMoE`` and ``GroupedTopkRouter``): the MoE block takes the ``torch.topk``
# of its bare ``gate`` Linear, softmaxes the k values, builds ``[E, tokens, k]`` masks by comparing the indices with
# ``arange(E)`` and adds each expert's output at the ``torch.where`` of its mask (``y[token_idx] += ...``); with expert
# groups the ``gate`` is a ``GroupedTopkRouter`` instead (DeepSeek-V3's: a ``[E, d]`` parameter used in fp32, sigmoid
# scores, an ``e_score_correction_bias`` buffer, a group top-k by the sum of each group's best scores and the final
# top-k, both ``sorted=False``, in a ``@torch.no_grad`` method, the weights gathered from the unbiased scores), the
# routed output scaled by ``routed_scaling_factor``, a shared expert on the block's input.
class LitGptLLaMAMLP(nn.Module):
    def __init__(self, intermediate_size: int = 2 * D) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(D, intermediate_size, bias=False)
        self.fc_2 = nn.Linear(D, intermediate_size, bias=False)
        self.proj = nn.Linear(intermediate_size, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class LitGptGroupedTopkRouter(_Used):
    def __init__(self, n_expert_groups: int = 2, n_topk_groups: int = 1, n_topk_scores_per_group: int = 2) -> None:
        super().__init__()
        self.n_expert, self.n_expert_per_token, self.norm_topk_prob = E, 2, True
        self.n_expert_groups, self.n_topk_groups = n_expert_groups, n_topk_groups
        self.n_topk_scores_per_group = n_topk_scores_per_group
        self.weight = nn.Parameter(torch.randn(E, D) * 0.3)
        # (zeros upstream at initialisation; a trained checkpoint holds a learned bias)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)

    @torch.no_grad()
    def get_topk_indices(self, scores: torch.Tensor) -> torch.Tensor:
        scores_for_choice = scores.view(-1, self.n_expert) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = (
            scores_for_choice.view(-1, self.n_expert_groups, self.n_expert // self.n_expert_groups)
            .topk(self.n_topk_scores_per_group, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.n_topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_expert_groups, self.n_expert // self.n_expert_groups)
            .reshape(-1, self.n_expert)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        if self.forced is not None:
            return self.forced
        return torch.topk(scores_for_choice, k=self.n_expert_per_token, dim=-1, sorted=False)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = F.linear(x.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        topk_indices = self.get_topk_indices(scores)
        self.used = topk_indices
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        return topk_weights, topk_indices


class LitGptMoEBlock(nn.Module):
    """``LLaMAMoE``; ``forced`` / ``used`` on the block where its own top-k decides (no expert groups)."""

    forced: torch.Tensor | None = None
    used: torch.Tensor | None = None

    def __init__(self, grouped: bool = False) -> None:
        super().__init__()
        self.n_expert, self.n_expert_per_token = E, 2
        self.n_expert_groups = 2 if grouped else 0
        self.routed_scaling_factor = 2.5 if grouped else 1.0
        self.gate: nn.Module = LitGptGroupedTopkRouter() if grouped else nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(LitGptLLaMAMLP(D) for _ in range(E))
        self.shared_experts = LitGptLLaMAMLP(2 * D) if grouped else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        residual_x = x.clone()
        x = x.view(-1, C)
        if not self.n_expert_groups:
            router = self.gate(x)
            if self.forced is None:
                probs, indices = torch.topk(router, self.n_expert_per_token)
            else:
                probs, indices = router.gather(-1, self.forced), self.forced
            probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
            self.used = indices
        else:
            probs, indices = self.gate(x)
        if self.routed_scaling_factor != 1.0:
            probs = probs * self.routed_scaling_factor
        masks = indices.unsqueeze(-1) == torch.arange(self.n_expert, device=x.device)
        masks = masks.permute(2, 0, 1)
        y = torch.zeros_like(x)
        for mask, expert in zip(masks, self.experts, strict=True):
            token_idx, expert_idx = torch.where(mask)
            y[token_idx] += probs[token_idx, expert_idx, None] * expert(x[token_idx])
        y = y.view(B, T, C)
        if self.shared_experts is not None:
            y = y + self.shared_experts(residual_x)
        return y


class LitGptLLaMAMoE(LitGptMoEBlock, _Used):
    """No expert groups: the block's ``torch.topk`` decides."""


class LitGptGroupedMoE(LitGptMoEBlock):
    """Expert groups: the ``GroupedTopkRouter`` decides and keeps the experts it chose."""

    def __init__(self) -> None:
        super().__init__(grouped=True)


# ----------------------------------------------------------------------- eole: top-k unsorted, runs of sorted ids
# eole-nlp/eole eole/modules/moe.py (``MoE`` and ``vectorized_moe``, the path taken in training and wherever vLLM is
# not installed): a bare ``gate`` Linear, the softmax before the ``torch.topk(..., sorted=False)`` or over its k values
# (``moe_softmax_after``), every token repeated k times (``repeat_interleave``), the flat expert ids sorted by
# ``argsort``, made a Python list and cut into runs of one expert, each run computed by its expert, the outputs
# weighted and summed per token; an optional shared expert.
class EoleMLP(nn.Module):
    def __init__(self, ff: int = 2 * D) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(D, ff, bias=False)
        self.up_proj = nn.Linear(D, ff, bias=False)
        self.down_proj = nn.Linear(ff, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_up_proj(x)) * self.up_proj(x))


def eole_vectorized_moe(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, K: int, experts: nn.ModuleList
) -> torch.Tensor:
    flat_topk_ids = topk_ids.view(-1)
    BTK = flat_topk_ids.size(0)
    hidden = x.size(1)
    sort_order = torch.argsort(flat_topk_ids)
    sorted_experts = flat_topk_ids[sort_order].tolist()
    run_starts = [0] + [i for i in range(1, BTK) if sorted_experts[i] != sorted_experts[i - 1]]
    run_ends = [*run_starts[1:], BTK]
    y_flat = torch.empty_like(x)
    for s, e in zip(run_starts, run_ends, strict=True):
        expert_id = sorted_experts[s]
        routed_positions = sort_order[s:e]
        y_flat[routed_positions] = experts[expert_id](x[routed_positions])
    y = y_flat.view(BTK // K, K, hidden)
    return (y * topk_weights.unsqueeze(-1)).sum(dim=1)


class EoleMoE(_Used):
    def __init__(self, softmax_after: bool = False, shared: bool = True) -> None:
        super().__init__()
        self.experts = nn.ModuleList(EoleMLP() for _ in range(E))
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts_per_tok = 2
        self.shared_experts = EoleMLP(4 * D) if shared else None
        self.moe_softmax_after = softmax_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        K = self.num_experts_per_tok
        x_flat = x.view(-1, C)
        scores = self.gate(x_flat)
        if not self.moe_softmax_after:
            scores = scores.softmax(dim=-1)
        if self.forced is None:
            expert_weights, expert_indices = torch.topk(scores, K, dim=-1, sorted=False)
        else:
            expert_weights, expert_indices = scores.gather(-1, self.forced), self.forced
        self.used = expert_indices
        if self.moe_softmax_after:
            expert_weights = expert_weights.softmax(dim=-1)
        x_flat = x_flat.repeat_interleave(K, dim=0)
        y = eole_vectorized_moe(x_flat, expert_weights, expert_indices, K, self.experts).view(B, T, C)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


# ----------------------------------------------------------------------- labml: Switch with tokens dropped at random
# labmlai/annotated_deep_learning_paper_implementations labml_nn/transformers/switch/__init__.py
# (``SwitchFeedForward``): softmax, ``torch.max`` over the experts, each expert's token ids by ``nonzero``, a capacity
# of ``capacity_factor * tokens / E``; with ``drop_tokens`` an expert over capacity keeps a random permutation's first
# ``capacity`` tokens and the others pass through unchanged; the output scaled by the top probability
# (``is_scale_prob``) or by ``p / p.detach()`` (a value of one that still carries the router's gradient).
class LabmlSwitchFeedForward(_Used):
    def __init__(self, drop_tokens: bool = False, is_scale_prob: bool = True, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.capacity_factor, self.is_scale_prob, self.drop_tokens = capacity_factor, is_scale_prob, drop_tokens
        self.n_experts = E
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D)) for _ in range(E)
        )
        self.switch = nn.Linear(D, E)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        seq_len, batch_size, d_model = x.shape
        x = x.reshape(-1, d_model)
        route_prob = self.softmax(self.switch(x))
        if self.forced is None:
            route_prob_max, routes = torch.max(route_prob, dim=-1)
        else:
            routes = self.forced[:, 0]
            route_prob_max = route_prob.gather(-1, self.forced)[:, 0]
        self.used = routes[:, None]
        indexes_list = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(self.n_experts)]
        final_output = x.new_zeros(x.shape)
        capacity = int(self.capacity_factor * len(x) / self.n_experts)
        counts = x.new_tensor([len(indexes_list[i]) for i in range(self.n_experts)])
        dropped: list[torch.Tensor] = []
        if self.drop_tokens:
            for i in range(self.n_experts):
                if len(indexes_list[i]) <= capacity:
                    continue
                indexes_list[i] = indexes_list[i][torch.randperm(len(indexes_list[i]))]
                dropped.append(indexes_list[i][capacity:])
                indexes_list[i] = indexes_list[i][:capacity]
        expert_output = [self.experts[i](x[indexes_list[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            final_output[indexes_list[i], :] = expert_output[i]
        n_dropped = 0
        if dropped:
            dropped_ids = torch.cat(dropped)
            n_dropped = len(dropped_ids)
            final_output[dropped_ids, :] = x[dropped_ids, :]
        if self.is_scale_prob:
            final_output = final_output * route_prob_max.view(-1, 1)
        else:
            final_output = final_output * (route_prob_max / route_prob_max.detach()).view(-1, 1)
        final_output = final_output.view(seq_len, batch_size, d_model)
        return final_output, counts, route_prob.sum(0), n_dropped, route_prob_max


class LabmlSwitchLayer(nn.Module):
    """``SwitchTransformerLayer``'s feed-forward half: norm, the switch, the residual (attention left out)."""

    def __init__(self, **switch: object) -> None:
        super().__init__()
        self.norm_ff = nn.LayerNorm(D)
        self.feed_forward = LabmlSwitchFeedForward(**switch)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ff, _counts, _route_prob, _n_dropped, _route_prob_max = self.feed_forward(self.norm_ff(x))
        return ff


# ----------------------------------------------------------------------- NNUE Mix9: one bucket per position
# dhbloo/pytorch-nnue-trainer model/blocks.py (``SwitchGate``, ``SwitchLinear``, ``SwitchLinearBlock``,
# ``SwitchPReLU``) and model/mixnet.py (the Mix9 network's heads): a gomoku evaluator routes each board position to one
# of ``num_buckets`` weight buckets. The routing logits come from a bias-free Linear of the *detached* mean feature;
# ``SwitchGate`` owns no weight: multiplicative ``rand`` jitter in training, softmax, ``torch.max`` over the buckets;
# the bucket id is handed to every switched layer of both heads, each gathering its own weights by
# ``F.embedding(route_index, weight)`` from a flat ``[E, out * in]`` table plus a shared ``weight_fact``; the value is
# scaled by the top probability (the router's only gradient).
class NnueSwitchGate(_Used):
    def __init__(self, num_experts: int = E, jitter_eps: float = 0.1, no_scaling: bool = False) -> None:
        super().__init__()
        self.num_experts, self.jitter_eps, self.no_scaling = num_experts, jitter_eps, no_scaling

    def forward(self, route_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_eps > 0:
            noise = torch.rand_like(route_logits)
            noise = noise * 2 * self.jitter_eps + 1 - self.jitter_eps
            route_logits = route_logits * noise
        route_probs = torch.softmax(route_logits, dim=1)
        if self.forced is None:
            route_prob_max, route_idx = torch.max(route_probs, dim=1)
        else:
            route_idx = self.forced[:, 0]
            route_prob_max = route_probs.gather(1, self.forced)[:, 0]
        self.used = route_idx[:, None]
        inv_batch_size = 1.0 / route_logits.shape[0]
        route_frac = torch.tensor(
            [(route_idx == i).sum() * inv_batch_size for i in range(self.num_experts)],
            dtype=route_probs.dtype,
            device=route_probs.device,
        )
        load_balancing_loss = self.num_experts * torch.dot(route_frac, route_probs.mean(0)) - 1.0
        if self.no_scaling:
            route_multiplier = route_prob_max / route_prob_max.detach()
        else:
            route_multiplier = route_prob_max
        return route_idx, route_multiplier, load_balancing_loss


class NnueSwitchLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_experts: int = E) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.weight = nn.Parameter(torch.randn(num_experts, out_features * in_features) / in_features**0.5)
        self.weight_fact = nn.Parameter(torch.randn(1, out_features * in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.randn(num_experts, out_features) * 0.1)
        self.bias_fact = nn.Parameter(torch.zeros(1, out_features))

    def forward(self, input: torch.Tensor, route_index: torch.Tensor) -> torch.Tensor:
        batch_size = route_index.shape[0]
        expert_weight = F.embedding(route_index, self.weight) + self.weight_fact
        expert_weight = expert_weight.view(batch_size, self.out_features, self.in_features)
        expert_bias = F.embedding(route_index, self.bias) + self.bias_fact
        return torch.einsum("bmn,bn->bm", expert_weight, input) + expert_bias


class NnueSwitchPReLU(nn.Module):
    def __init__(self, num_parameters: int, num_experts: int = E) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, num_parameters) * 0.1)
        self.weight_fact = nn.Parameter(torch.full((1, num_parameters), 0.25))

    def forward(self, input: torch.Tensor, route_index: torch.Tensor) -> torch.Tensor:
        neg_slope = F.embedding(route_index, self.weight) + self.weight_fact
        return torch.where(input >= 0, input, neg_slope * input)


class NnueMix9(nn.Module):
    """Mix9's routing and heads over per-position features ``[batch, positions, d]``: the value head's switched
    layers (corner, centre and final), the policy head's switched point-wise weights, all on one bucket per board."""

    def __init__(self, jitter_eps: float = 0.1, no_scaling: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feature = nn.Linear(D, D)
        self.router_linear = nn.Linear(D, E, bias=False)
        self.router_gate = NnueSwitchGate(E, jitter_eps, no_scaling)
        self.policy_pwconv_weight = nn.ModuleList([NnueSwitchLinear(D, 4), NnueSwitchPReLU(4)])
        self.value_corner = nn.ModuleList([NnueSwitchLinear(D, 8), NnueSwitchPReLU(8)])
        self.value_linear = nn.ModuleList([NnueSwitchLinear(D + 8, 8), NnueSwitchLinear(8, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = torch.tanh(self.feature(x))
        feature_mean = feature.mean(dim=1)
        route_logits = self.router_linear(feature_mean.detach())
        route_idx, route_multiplier, _lb_loss = self.router_gate(route_logits)
        route_multiplier = route_multiplier.view(-1, 1)
        pwconv_weight = feature_mean
        for layer in self.policy_pwconv_weight:
            pwconv_weight = layer(pwconv_weight, route_idx)
        pwconv_weight = pwconv_weight * route_multiplier
        policy = torch.einsum("bpd,bc->bpc", feature[..., :4], pwconv_weight).sum(-1)
        value = feature[:, 0]
        for layer in self.value_corner:
            value = layer(value, route_idx)
        value = torch.cat([feature_mean, value], 1)
        value = F.relu(self.value_linear[0](value, route_idx))
        value = self.value_linear[1](value, route_idx) * route_multiplier
        return torch.cat([value, policy], 1)


# ----------------------------------------------------------------------- PiKV: an MLP router, capacity by order
# zorinayu/PiKV core/single/module/pikv_routing.py (``BaseRouter``, ``AdaptiveRouter``): a two-layer MLP router,
# ``torch.topk`` of its softmax renormalised, then dispatch and combine tensors ``[batch, seq, E, capacity]`` filled
# token by token in order in Python (``.item()`` of each index), an expert over ``capacity_factor * k * tokens / E``
# dropping the later tokens; the adaptive router first predicts a batch-level ``k`` (the ``argmax`` of a small
# softmax head over the batch's mean feature and mean importance, ``.item() + 1``), sets ``self.top_k`` to it for
# the base routing and doubles the combine weights of tokens whose predicted importance passes a threshold. The MoE
# block consuming them is GShard's einsum pair (the repository's routers hand these tensors to such a block).
class PikvBaseRouter(_Used):
    def __init__(self, top_k: int = 2, capacity_factor: float = 1.5) -> None:
        super().__init__()
        self.hidden_size, self.num_experts, self.top_k, self.capacity_factor = D, E, top_k, capacity_factor
        self.router = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Dropout(0.0), nn.Linear(D, E))
        self.register_buffer("total_tokens", torch.tensor(0.0))
        self.register_buffer("expert_usage_count", torch.zeros(E))

    def _compute_capacity(self, batch_size: int, seq_len: int) -> int:
        return int(batch_size * seq_len * self.capacity_factor * self.top_k / self.num_experts)

    def _create_dispatch_combine_tensors(
        self, top_k_indices: torch.Tensor, top_k_probs: torch.Tensor, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self._compute_capacity(batch_size, seq_len)
        dispatch_tensor = torch.zeros(batch_size, seq_len, self.num_experts, capacity, dtype=top_k_probs.dtype)
        combine_tensor = torch.zeros(batch_size, seq_len, self.num_experts, capacity, dtype=top_k_probs.dtype)
        expert_capacity_used = torch.zeros(self.num_experts, dtype=torch.long)
        used = torch.full((batch_size, seq_len, self.top_k), -1)
        for b in range(batch_size):
            for s in range(seq_len):
                for k in range(self.top_k):
                    expert_idx = int(top_k_indices[b, s, k].item())
                    if expert_capacity_used[expert_idx] < capacity:
                        pos = int(expert_capacity_used[expert_idx].item())
                        dispatch_tensor[b, s, expert_idx, pos] = 1.0
                        combine_tensor[b, s, expert_idx, pos] = top_k_probs[b, s, k]
                        expert_capacity_used[expert_idx] += 1
                        used[b, s, k] = expert_idx
        self.used = used.view(-1, self.top_k)
        return dispatch_tensor, combine_tensor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, seq_len, _ = hidden_states.shape
        router_logits = self.router(hidden_states)
        router_probs = F.softmax(router_logits, dim=-1)
        if self.forced is None:
            top_k_probs, top_k_indices = torch.topk(router_probs, k=self.top_k, dim=-1)
        else:
            top_k_indices = self.forced.view(batch_size, seq_len, -1)
            top_k_probs = router_probs.gather(-1, top_k_indices)
        top_k_probs = top_k_probs / (top_k_probs.sum(dim=-1, keepdim=True) + 1e-8)
        dispatch_tensor, combine_tensor = self._create_dispatch_combine_tensors(
            top_k_indices, top_k_probs, batch_size, seq_len
        )
        with torch.no_grad():
            self.total_tokens += batch_size * seq_len
            for expert_idx in range(self.num_experts):
                self.expert_usage_count[expert_idx] += (top_k_indices == expert_idx).sum().float()
        return dispatch_tensor, combine_tensor, router_probs


class PikvAdaptiveRouter(PikvBaseRouter):
    def __init__(self, top_k: int = 2, capacity_factor: float = 1.5, importance_threshold: float = 0.5) -> None:
        super().__init__(top_k, capacity_factor)
        self.importance_threshold = importance_threshold
        self.importance_predictor = nn.Sequential(nn.Linear(D, D // 2), nn.ReLU(), nn.Linear(D // 2, 1), nn.Sigmoid())
        self.top_k_predictor = nn.Sequential(
            nn.Linear(D + 1, D // 4), nn.ReLU(), nn.Linear(D // 4, top_k), nn.Softmax(-1)
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        importance = self.importance_predictor(hidden_states).squeeze(-1)
        combined = torch.cat([hidden_states.mean(dim=[0, 1]), importance.mean().unsqueeze(0)])
        current_top_k = min(int(torch.argmax(self.top_k_predictor(combined)).item()) + 1, self.top_k)
        original_top_k = self.top_k
        self.top_k = current_top_k
        try:
            dispatch_tensor, combine_tensor, router_probs = super().forward(hidden_states)
        finally:
            self.top_k = original_top_k
        importance_weight = (importance > self.importance_threshold).float()
        combine_tensor = combine_tensor * (1.0 + importance_weight.unsqueeze(-1).unsqueeze(-1))
        return dispatch_tensor, combine_tensor, router_probs


class PikvMoE(nn.Module):
    def __init__(self, router: Callable[..., PikvBaseRouter] = PikvBaseRouter, capacity_factor: float = 1.5) -> None:
        super().__init__()
        self.router = router(capacity_factor=capacity_factor)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(E)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dispatch_tensor, combine_tensor, _ = self.router(x)
        expert_inputs = torch.einsum("bsec,bsd->ecd", dispatch_tensor, x)
        expert_outputs = torch.stack([expert(expert_inputs[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("bsec,ecd->bsd", combine_tensor, expert_outputs)


# ----------------------------------------------------------------------- Fast feedforward: a tree of sign decisions
# pbelcak/fastfeedforward fastfeedforward/fff.py (``FFF``): ``2**depth`` leaves under a binary tree of hyperplanes; in
# training every leaf is computed and mixed by the product of the sigmoids along its path (no choice), in evaluation
# each token descends the tree by the sign of ``x . w_node + b_node`` (``>= 0``) and only its leaf is computed. No
# top-k, no argmax: the choice is a chain of comparisons.
class FastFeedForward(nn.Module):
    def __init__(self, depth: int = 3, leaf_width: int = 8) -> None:
        super().__init__()
        self.input_width, self.leaf_width, self.output_width = D, leaf_width, D
        self.depth = nn.Parameter(torch.tensor(depth, dtype=torch.long), requires_grad=False)
        self.n_leaves, self.n_nodes = 2**depth, 2**depth - 1
        f1, f2 = 1.0 / math.sqrt(D), 1.0 / math.sqrt(leaf_width)
        self.node_weights = nn.Parameter(torch.empty(self.n_nodes, D).uniform_(-f1, f1))
        self.node_biases = nn.Parameter(torch.empty(self.n_nodes, 1).uniform_(-f1, f1))
        self.w1s = nn.Parameter(torch.empty(self.n_leaves, D, leaf_width).uniform_(-f1, f1))
        self.b1s = nn.Parameter(torch.empty(self.n_leaves, leaf_width).uniform_(-f1, f1))
        self.w2s = nn.Parameter(torch.empty(self.n_leaves, leaf_width, D).uniform_(-f2, f2))
        self.b2s = nn.Parameter(torch.empty(self.n_leaves, D).uniform_(-f2, f2))
        self.activation = nn.ReLU()

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        original_shape = x.shape
        x = x.reshape(-1, x.shape[-1])
        batch_size = x.shape[0]
        current_mixture = torch.ones((batch_size, self.n_leaves), dtype=torch.float)
        for current_depth in range(int(self.depth.item())):
            platform, next_platform = 2**current_depth - 1, 2 ** (current_depth + 1) - 1
            n_nodes = 2**current_depth
            boundary_effect = torch.sigmoid(
                x @ self.node_weights[platform:next_platform].T + self.node_biases[platform:next_platform].T
            )
            mixture_modifier = (
                torch.cat(((1 - boundary_effect).unsqueeze(-1), boundary_effect.unsqueeze(-1)), dim=-1)
                .flatten(start_dim=-2)
                .unsqueeze(-1)
            )
            current_mixture = current_mixture.view(batch_size, 2 * n_nodes, self.n_leaves // (2 * n_nodes))
            current_mixture = (current_mixture * mixture_modifier).flatten(start_dim=1, end_dim=2)
        element_logits = torch.matmul(x, self.w1s.transpose(0, 1).flatten(1, 2)).view(batch_size, self.n_leaves, -1)
        element_activations = self.activation(element_logits + self.b1s.unsqueeze(0))
        new_logits = torch.stack(
            [element_activations[:, i] @ self.w2s[i] + self.b2s[i] for i in range(self.n_leaves)], dim=1
        )
        final_logits = (new_logits * current_mixture.unsqueeze(-1)).sum(dim=1)
        return final_logits.view(*original_shape[:-1], self.output_width)

    def eval_forward_greedy(self, x: torch.Tensor) -> torch.Tensor:
        original_shape = x.shape
        x = x.reshape(-1, x.shape[-1])
        batch_size = x.shape[0]
        current_nodes = torch.zeros((batch_size,), dtype=torch.long)
        next_platform = 0
        for i in range(int(self.depth.item())):
            plane_coeffs = self.node_weights.index_select(dim=0, index=current_nodes)
            plane_offsets = self.node_biases.index_select(dim=0, index=current_nodes)
            plane_score = torch.bmm(x.unsqueeze(1), plane_coeffs.unsqueeze(-1)).squeeze(-1) + plane_offsets
            plane_choices = (plane_score.squeeze(-1) >= 0).long()
            platform, next_platform = 2**i - 1, 2 ** (i + 1) - 1
            current_nodes = (current_nodes - platform) * 2 + plane_choices + next_platform
        leaves = current_nodes - next_platform
        logits = torch.bmm(x.unsqueeze(-2), self.w1s[leaves]) + self.b1s[leaves].unsqueeze(-2)
        new_logits = torch.matmul(self.activation(logits), self.w2s[leaves]).squeeze(-2) + self.b2s[leaves]
        return new_logits.view(*original_shape[:-1], self.output_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.training_forward(x) if self.training else self.eval_forward_greedy(x)


# ----------------------------------------------------------------------- FuseMoE: Laplace gating, per modality
# pham156/FuseMoE_poly src/core/sparse_moe.py (FuseMoE's ``MoE`` and ``SparseDispatcher``, after Rau's sparsely-gated
# MoE): the gate weights are ``[d, E]`` parameters owned by the MoE block; the ``laplace`` gating takes the negative
# Euclidean distance to each expert's column (``-torch.cdist(x, w_gate.T)``), noise scaled by ``softplus(x @ w_noise)``
# and by the ``train`` argument, a ``topk`` of ``k + 1`` sliced to ``k``, the top logits renormalised by
# ``exp(l - logsumexp(l))`` and scattered into a dense gate; the dispatcher sorts the nonzero gates by expert, splits
# the tokens by the counts (``.tolist()``), and combines the experts' log-softmax outputs in probability space
# (``exp``, weighted ``index_add``, zeros set to eps, ``log``). ``router_type="permod"``: one gate per modality, kept
# in a plain Python list (not registered: no ``parameters()`` of the model hold them), each modality's tokens routed
# by its own gate over the same E experts, the block's gating run once per modality in one forward.
class FuseMoESparseDispatcher:
    def __init__(self, num_experts: int, gates: torch.Tensor) -> None:
        self._gates, self._num_experts = gates, num_experts
        sorted_experts, index_sorted_experts = torch.nonzero(gates).sort(0)
        _, self._expert_index = sorted_experts.split(1, dim=1)
        self._batch_index = torch.nonzero(gates)[index_sorted_experts[:, 1], 0]
        self._part_sizes = (gates > 0).sum(0).tolist()
        gates_exp = gates[self._batch_index.flatten()]
        self._nonzero_gates = torch.gather(gates_exp, 1, self._expert_index)

    def dispatch(self, inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inp_exp = inp[self._batch_index].squeeze(1)
        return torch.split(inp_exp, self._part_sizes, dim=0)

    def combine(self, expert_out: list[torch.Tensor]) -> torch.Tensor:
        stitched = torch.cat(expert_out, 0).exp().mul(self._nonzero_gates)
        zeros = torch.zeros(self._gates.size(0), expert_out[-1].size(1), requires_grad=True)
        combined = zeros.index_add(0, self._batch_index, stitched.float())
        combined = combined.masked_fill(combined == 0, float(torch.finfo(torch.float64).eps))
        return combined.log()


class FuseMoEMLP(nn.Module):
    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(input_size, 2 * D), nn.Linear(2 * D, D)
        self.log_soft = nn.LogSoftmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_soft(self.fc2(F.gelu(self.fc1(x))))


class FuseMoE(_Used):
    def __init__(self, router_type: str = "joint", num_modalities: int = 2, k: int = 2) -> None:
        super().__init__()
        self.noisy_gating, self.num_experts, self.k, self.gating = True, E, k, "laplace"
        self.router_type, self.num_modalities = router_type, num_modalities
        self.input_size = D if router_type == "joint" else D // num_modalities
        self.w_gate: nn.Parameter | list[nn.Parameter]
        if router_type == "permod":
            self.w_gate = [nn.Parameter(torch.randn(self.input_size, E)) for _ in range(num_modalities)]
            self.w_noise = [nn.Parameter(torch.randn(self.input_size, E) * 0.1) for _ in range(num_modalities)]
        else:
            self.w_gate = nn.Parameter(torch.randn(self.input_size, E))
            self.w_noise = nn.Parameter(torch.randn(self.input_size, E) * 0.1)
        self.experts = nn.ModuleList(FuseMoEMLP(self.input_size) for _ in range(E))
        self.softplus = nn.Softplus()
        self._rows = 0

    def _get_logits(self, x: torch.Tensor, train: bool, idx: int | None = None) -> torch.Tensor:
        w_gate = self.w_gate[idx] if isinstance(self.w_gate, list) and idx is not None else self.w_gate
        w_noise = self.w_noise[idx] if isinstance(self.w_noise, list) and idx is not None else self.w_noise
        assert isinstance(w_gate, torch.Tensor) and isinstance(w_noise, torch.Tensor)
        clean_logits = -torch.cdist(x, torch.t(w_gate))
        noise_stddev = (self.softplus(x @ w_noise) + 1e-2) * train
        return clean_logits + torch.randn_like(clean_logits) * noise_stddev

    def _top_k_gating(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        if self.forced is None:
            top_logits, top_indices = logits.topk(min(k + 1, self.num_experts), dim=1)
            top_k_logits, top_k_indices = top_logits[:, :k], top_indices[:, :k]
        else:
            top_k_indices = self.forced[self._rows : self._rows + logits.size(0)]
            top_k_logits = logits.gather(1, top_k_indices)
        self._rows += logits.size(0)
        self._used.append(top_k_indices)
        top_k_gates = torch.exp(top_k_logits - torch.logsumexp(top_k_logits, dim=1, keepdim=True))
        zeros = torch.zeros_like(logits, requires_grad=True)
        return zeros.scatter(1, top_k_indices, top_k_gates)

    def forward(self, x: torch.Tensor | list[torch.Tensor], train: bool = True) -> torch.Tensor:
        self._rows, self._used = 0, []
        if self.router_type == "joint":
            assert isinstance(x, torch.Tensor)
            gates = self._top_k_gating(self._get_logits(x, train), self.k)
            dispatcher = FuseMoESparseDispatcher(self.num_experts, gates)
            expert_inputs = dispatcher.dispatch(x)
            y = dispatcher.combine([self.experts[i](expert_inputs[i]) for i in range(self.num_experts)])
        else:
            y = torch.zeros(())
            all_gates = [self._top_k_gating(self._get_logits(x[i], train, idx=i), self.k) for i in range(len(x))]
            for j, g in enumerate(all_gates):
                dispatcher = FuseMoESparseDispatcher(self.num_experts, g)
                expert_inputs = dispatcher.dispatch(x[j])
                y = y + dispatcher.combine([self.experts[i](expert_inputs[i]) for i in range(self.num_experts)])
        self.used = torch.cat(self._used)
        return y


class FuseMoEModel(nn.Module):
    """The fusion model around the MoE: each modality's encoder, the MoE over their concatenation (``joint``) or
    the list of them (``permod``), a classifier on the mixed log-probabilities."""

    def __init__(self, router_type: str = "joint", num_modalities: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router_type = router_type
        self.encoders = nn.ModuleList(nn.Linear(D, D // num_modalities) for _ in range(num_modalities))
        self.moe = FuseMoE(router_type, num_modalities)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [torch.tanh(enc(x)) for enc in self.encoders]
        mixed = self.moe(torch.cat(feats, dim=1) if self.router_type == "joint" else feats, train=self.training)
        return self.head(mixed)


# ----------------------------------------------------------------------- Moondream 3: the top-k in a free function
# m87-labs/kestrel kestrel/moondream/layers.py (``build_moe_mlp``, ``moe_mlp``) and text.py (``text_decoder``): the
# text model is functional: its blocks are ``nn.ModuleDict``s of weights (no ``forward``), the model's forward loops
# over them and calls ``moe_mlp(x, block.mlp, experts_per_token)``, a free function that runs the ModuleDict's
# ``router`` Linear, takes the ``torch.topk`` of its logits and softmaxes the k values; in its default ``decode`` mode
# a single token gathers its experts' ``[E, 2F, C]`` / ``[E, C, F]`` weights by index and runs them as ``bmm``s, more
# tokens loop over the experts with ``nonzero`` of the indices (GELU-gated: ``gelu(x1) * (g + 1)``). The decision is
# thus made in no module's forward but the whole model's.
class MoondreamParallelExperts(nn.Module):
    """ScatterMoE's ``ParallelExperts``: one ``[E, out, in]`` weight."""

    def __init__(self, num_experts: int, input_size: int, output_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, output_size, input_size) / input_size**0.5)


class MoondreamScatterMLP(nn.Module):
    """ScatterMoE's ``MLP`` (its ``forward``, the Triton-kernel path of the ``prefill`` mode, left out)."""

    def __init__(self, input_size: int = D, hidden_size: int = D, num_experts: int = E, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.input_size, self.hidden_size, self.top_k = num_experts, input_size, hidden_size, top_k
        self.experts = MoondreamParallelExperts(num_experts, input_size, 2 * hidden_size)
        self.output_experts = MoondreamParallelExperts(num_experts, hidden_size, input_size)


class MoondreamMoEMLP(nn.ModuleDict, _Used):
    """``build_moe_mlp``'s ModuleDict (``forced`` / ``used`` on it, for ``moe_mlp`` to read and write)."""

    def __init__(self) -> None:
        super().__init__({"router": nn.Linear(D, E), "mlp": MoondreamScatterMLP()})


def moondream_moe_mlp(x: torch.Tensor, mlp_module: MoondreamMoEMLP, experts_per_token: int) -> torch.Tensor:
    B, T, C = x.shape
    x_flat = x.reshape(-1, C)
    router, scatter_mlp = mlp_module["router"], mlp_module["mlp"]
    router_logits = router(x_flat)
    if mlp_module.forced is None:
        topk_logits, topk_idxs = torch.topk(router_logits, experts_per_token, dim=-1)
    else:
        topk_logits, topk_idxs = router_logits.gather(-1, mlp_module.forced), mlp_module.forced
    mlp_module.used = topk_idxs
    topk_weights = F.softmax(topk_logits, dim=-1, dtype=torch.float32).to(x.dtype)
    num_tokens, top_k = topk_idxs.shape
    experts, outputs = scatter_mlp.experts.weight, scatter_mlp.output_experts.weight
    if T == 1:
        flat_idxs, flat_weights = topk_idxs.view(-1), topk_weights.view(-1)
        x_expanded = x_flat.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, C)
        x1, g = torch.bmm(experts[flat_idxs], x_expanded.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        expert_outs = torch.bmm(outputs[flat_idxs], (F.gelu(x1) * (g + 1)).unsqueeze(-1)).squeeze(-1)
        weighted_outs = (expert_outs * flat_weights.unsqueeze(-1)).view(num_tokens, top_k, C)
        return weighted_outs.sum(dim=1).view(B, T, C)
    out = x_flat.new_zeros(x_flat.size())
    for expert_id in range(experts.shape[0]):
        token_pos, which_k = (topk_idxs == expert_id).nonzero(as_tuple=True)
        if token_pos.numel() == 0:
            continue
        gate = topk_weights[token_pos, which_k]
        x1, g = torch.matmul(x_flat[token_pos], experts[expert_id].transpose(0, 1)).chunk(2, dim=-1)
        expert_out = torch.matmul(F.gelu(x1) * (g + 1), outputs[expert_id].transpose(0, 1)) * gate.unsqueeze(-1)
        out[token_pos] += expert_out
    return out.view(B, T, C)


class MoondreamText(nn.Module):
    """The text model as weights (``text``: blocks of ``ln``, a token mixer standing for attention, ``mlp``) and a
    forward that is ``text_decoder``'s loop: ``x + attn(ln(x)) + moe_mlp(ln(x))``, the first layer dense."""

    def __init__(self, n_layers: int = 3, start_layer: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.start_layer, self.experts_per_token = start_layer, 2
        blocks = []
        for i in range(n_layers):
            mlp: nn.Module = (
                MoondreamMoEMLP()
                if i >= start_layer
                else nn.ModuleDict({"fc1": nn.Linear(D, 2 * D), "fc2": nn.Linear(2 * D, D)})
            )
            blocks.append(nn.ModuleDict({"ln": nn.LayerNorm(D), "attn": nn.Linear(D, D), "mlp": mlp}))
        self.text = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.text["blocks"]):  # type: ignore[arg-type]
            l_in = F.layer_norm(x, (D,), block["ln"].weight, block["ln"].bias)
            l_attn = block["attn"](l_in).cumsum(dim=1) / torch.arange(1, x.shape[1] + 1)[:, None]
            if i >= self.start_layer:
                l_mlp = moondream_moe_mlp(l_in, block["mlp"], self.experts_per_token)
            else:
                l_mlp = block["mlp"]["fc2"](F.gelu(block["mlp"]["fc1"](l_in), approximate="tanh"))
            x = x + l_attn + l_mlp
        return x


# ----------------------------------------------------------------------- ktransformers: an injected proxy gate
# kvcache-ai/ktransformers ktransformers/operators/base_operator.py (``BaseInjectedModule``) and operators/gate.py
# (``KMoEGate``): the injection framework replaces a model's ``mlp.gate`` by a proxy module that holds the original
# gate as ``orig_module`` (a registered child), reads any attribute it lacks from it (``__getattr__``), writes any
# attribute it does not have itself *to* it (``__setattr__``), and whose ``forward`` calls
# ``self.orig_module.forward(...)`` directly (the original's hooks never run). The original is DeepSeek-V3's
# ``MoEGate`` (noaux_tc: sigmoid, a correction bias, a group top-k ``sorted=False`` and the final top-k, the weights
# gathered from the unbiased scores, renormalised and scaled), returning ``(topk_idx, topk_weight)``.
class KtDeepseekV3MoEGate(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts, self.routed_scaling_factor = 2, E, 2.5
        self.n_group, self.topk_group, self.norm_topk_prob = 2, 1, True
        self.weight = nn.Parameter(torch.randn(E, D) * 0.3)
        self.e_score_correction_bias = nn.Parameter(torch.randn(E) * 0.1)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.sigmoid()
        scores_for_choice = scores.view(bsz * seq_len, -1) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = scores_for_choice.view(bsz * seq_len, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(bsz * seq_len, self.n_group, self.n_routed_experts // self.n_group)
            .reshape(bsz * seq_len, -1)
        )
        tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        if self.forced is None:
            _, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_idx = self.forced
        self.used = topk_idx
        topk_weight = scores.gather(1, topk_idx)
        denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
        topk_weight = topk_weight / denominator * self.routed_scaling_factor
        return topk_idx, topk_weight


class KtBaseInjectedModule(nn.Module):
    """``BaseInjectedModule`` (its ``key``, ``gguf_loader``, ``config`` and ``device`` kept as upstream does)."""

    def __init__(self, key: str, orig_module: nn.Module) -> None:
        nn.Module.__init__(self)
        nn.Module.__setattr__(self, "orig_module", orig_module)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "device", "cpu")

    def __getattr__(self, name: str) -> object:
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            if name == "orig_module":
                return nn.Module.__getattr__(self, "orig_module")
            try:
                return nn.Module.__getattr__(self, "orig_module").__getattr__(name)
            except AttributeError:
                return super(nn.Module, nn.Module.__getattr__(self, "orig_module")).__getattribute__(name)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "orig_module":
            return nn.Module.__setattr__(self, "orig_module", value)
        elif hasattr(self, name):
            return object.__setattr__(self, name, value)
        return nn.Module.__getattr__(self, "orig_module").__setattr__(name, value)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.orig_module.forward(*args, **kwargs)


class KtMoEGate(KtBaseInjectedModule):
    """``KMoEGate``: ``forward`` returns ``self.orig_module.forward(hidden_states)``."""

    def forward(self, hidden_states: torch.Tensor) -> object:  # type: ignore[override]
        return self.orig_module.forward(hidden_states)


class KtDeepseekV3MoE(nn.Module):
    """DeepSeek-V3's MoE block as ktransformers runs it on its torch path: the injected gate, a loop over the
    experts chosen, a shared expert."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts_per_tok = 2
        self.experts = nn.ModuleList(LitGptLLaMAMLP(D) for _ in range(E))
        self.gate = KtMoEGate("blk.mlp.gate", KtDeepseekV3MoEGate())
        self.shared_experts = LitGptLLaMAMLP(2 * D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, orig_shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight = self.gate(hidden_states)
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(topk_idx == e)
            if token.numel():
                y = y.index_add(0, token, topk_weight[token, slot, None].to(flat.dtype) * expert(flat[token]))
        return y.view(*orig_shape) + self.shared_experts(identity)


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "litgpt-llama-moe-topk-in-block": (lambda: Layers(LitGptLLaMAMoE), lambda: _x(2, 12), {}),
    "litgpt-llama-moe-topk-in-block-train": (lambda: Layers(LitGptLLaMAMoE), lambda: _x(2, 12), {"train": True}),
    "litgpt-grouped-topk-router": (lambda: Layers(LitGptGroupedMoE), lambda: _x(2, 12), {}),
    "litgpt-grouped-topk-router-train": (lambda: Layers(LitGptGroupedMoE), lambda: _x(2, 12), {"train": True}),
    "eole-softmax-then-unsorted-topk": (lambda: Layers(EoleMoE), lambda: _x(2, 12), {}),
    "eole-softmax-after-unsorted-topk-train": (
        lambda: Layers(lambda: EoleMoE(softmax_after=True, shared=False)),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "labml-switch-scaled": (one_layer(LabmlSwitchLayer), lambda: _x(12, 2), {}),
    # (``p / p.detach()`` is 0/0 where a larger change underflows the forced expert's probability, natively too)
    "labml-switch-straight-through-train": (
        lambda: Layers(lambda: LabmlSwitchLayer(is_scale_prob=False)),
        lambda: _x(12, 2),
        {"train": True, "change": 0.5},
    ),
    "nnue-mix9-bucket-per-board": (NnueMix9, lambda: _x(6, 5), {}),
    "nnue-mix9-bucket-per-board-jitter-train": (NnueMix9, lambda: _x(6, 5), {"train": True}),
    # (a capacity of at least one token per expert on one token: see ``REFUSED`` for PiKV's default)
    "pikv-mlp-router-capacity-by-order": (one_layer(lambda: PikvMoE(capacity_factor=4.0)), lambda: _x(2, 12), {}),
    "ktransformers-injected-proxy-gate": (lambda: Layers(KtDeepseekV3MoE), lambda: _x(2, 12), {"holders": True}),
    "ktransformers-injected-proxy-gate-train": (
        lambda: Layers(KtDeepseekV3MoE),
        lambda: _x(2, 12),
        {"train": True, "holders": True},
    ),
    "fusemoe-laplace-joint": (FuseMoEModel, lambda: _x(10), {}),
    "fusemoe-laplace-joint-noisy-train": (FuseMoEModel, lambda: _x(10), {"train": True}),
    # (one modality: one choice per forward, by a gate no ``parameters()`` hold; the encoders before it change)
    "fusemoe-laplace-per-modality-one-unregistered-gate": (lambda: FuseMoEModel("permod", 1), lambda: _x(10), {}),
    "fusemoe-laplace-per-modality-one-unregistered-gate-train": (
        lambda: FuseMoEModel("permod", 1),
        lambda: _x(10),
        {"train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """LitGPT's top-k taken in the block over a bare gate (experts by ``torch.where`` of ``[E, tokens, k]`` masks) and
    its DeepSeek-V3 ``GroupedTopkRouter`` (both top-k ``sorted=False``, in a ``no_grad`` method, over the biased and
    group-masked sigmoid scores); eole's unsorted top-k with the softmax before or after it, the experts run in runs of
    the ``argsort``ed ids made a Python list; labml's Switch (``torch.max``, token ids per expert by ``nonzero``, scaled
    by the top probability or by ``p / p.detach()``); the gomoku NNUE's ``SwitchGate`` (no weight, multiplicative jitter
    in training, one bucket per board handed to every switched layer, which gathers its weights by ``F.embedding``);
    ktransformers' injected proxy gate (attributes read from and written to the original gate, whose ``forward`` it
    calls directly; the proxy found, the original forced); PiKV's MLP router with dispatch and combine tensors filled in
    order in Python up to a capacity; FuseMoE's Laplace gate (``-cdist`` to the gate's columns, noisy top-(k+1) sliced
    to k, experts' log probabilities mixed in probability space), its weights registered or in a plain list: every
    router found and nothing else, the recorded rows the experts used, and a replay after the routers change those
    experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "labml-switch-random-drops-train": (
        lambda: Layers(lambda: LabmlSwitchLayer(drop_tokens=True)),
        lambda: _x(12, 2),
        r"'layers\.0\.feed_forward\.switch': after its decision .* draws from the random stream and chooses again",
        {"train": True},
    ),
    "pikv-capacity-zero-on-one-token": (
        lambda: Layers(PikvMoE),
        lambda: _x(2, 12),
        r"'layers\.0\.router': on one of its tokens alone, changing the choice of its decision .* does not change "
        r"the output.*a capacity",
        {},
    ),
    "pikv-adaptive-router-batch-k": (
        one_layer(lambda: PikvMoE(PikvAdaptiveRouter, 4.0)),
        lambda: _x(2, 12),
        r"'layers\.0\.router': before its decision .* chooses from floating values .* what picks experts after it",
        {},
    ),
    "fusemoe-laplace-per-modality": (
        lambda: FuseMoEModel("permod"),
        lambda: _x(10),
        r"(?s)'moe': its forward makes more than one independent choice .*\(per-modality gates",
        {},
    ),
    "fastfeedforward-tree-eval": (lambda: Layers(FastFeedForward), lambda: _x(2, 12), "no MoE router found", {}),
    "fastfeedforward-mixture-train": (
        lambda: Layers(FastFeedForward),
        lambda: _x(2, 12),
        "no MoE router found",
        {"train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """labml's Switch with ``drop_tokens`` (an expert over capacity keeps a random permutation's first tokens: a
    replay under another random state drops others); PiKV's capacity of ``int(1.5 * k * tokens / E)`` (zero on one
    token: every token dropped, the decision reaches nothing there) and its adaptive router (a batch-level k from the
    ``argmax`` of a predictor, made a Python number before the top-k); FuseMoE's per-modality gates (one top-k per
    modality in one forward of the block, their gate weights in a plain list no ``parameters()`` hold); the fast
    feedforward tree (a chain of sign comparisons, no top-k: no router): refused with a ``MoEReplayError`` saying
    why, the model as it was.

    Once said wrongly: PiKV's capacity was refused as a branch "where the experts are chosen otherwise (from the
    values, a dense mask)", where none is used at all."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.xfail(
    strict=True,
    raises=mr.MoEReplayError,
    reason="false refusal: in a functional model (Moondream 3's text model: blocks are ModuleDicts of weights with no "
    "forward) the top-k runs in a free function called from the model's forward; zero configuration finds no router "
    "(the router's holder, past the ModuleDicts, is the whole model, which holds no experts), and with include= "
    "both routers would be intercepted in the model's forward and are refused as sharing one scope, though each "
    "decision is a top-k of its own router's output",
)
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_moondream3_topk_in_a_free_function_replays_exactly(train: bool) -> None:
    """Moondream 3's MoE layers, each a ``router`` Linear and ScatterMoE weights in a ModuleDict, the top-k taken by
    ``moe_mlp`` in the model's own loop over its blocks: a replay forcing the recorded experts is exact."""
    assert_exact(MoondreamText(), _x(2, 12), train=train)
