"""More public MoE router code, with zero configuration (see ``test_public_routers19``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E, perturb
from tests.test_public_routers2 import _forced_by_hand, _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused, one_layer


# ----------------------------------------------------------------------- GPT-NeoX: dropless MoE, top-1 by max
# EleutherAI/gpt-neox megatron/model/router.py (``TopKTokenChoiceRouter``, ``SinkhornRouter``) and megatron/model/moe.py
# (``ParallelDroplessMoE``, ``ParallelDroplessMLP``): the router's ``layer`` Linear over ``(sl * bs, hs)`` rows; the
# token-choice router softmaxes and takes ``scores.max(dim=-1, keepdim=True)`` for one expert, ``torch.topk`` for more
# (the weights not renormalised); the Sinkhorn router, in training, balances ``exp(logits)`` by Sinkhorn iterations
# (a Python ``while error > tol`` loop) under ``no_grad``, takes the top-k of the balanced costs and gathers the
# weights from the activated logits (a sigmoid for one expert, a softmax for more); in eval it takes the top-k of the
# activated logits. The dropless MLP sorts the flat expert ids (MegaBlocks' radix ``sort``, stable here), counts them
# (``histogram``), gathers each token once per slot into runs of one expert, runs the grouped MLP over the runs and
# scatters the outputs back weighted by the flat ``expert_weights``. The MoE returns ``(output, None)``.
class NeoxTopKTokenChoiceRouter(_Used):
    def __init__(self, top_k: int = 1) -> None:
        super().__init__()
        # (upstream's ``jitter`` reads ``self.args``, which the router does not have: only ``None`` runs)
        self.jitter_eps = None
        self.top_k = top_k
        self.layer = nn.Linear(D, E, bias=False)

    def _top_k(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced is not None:
            return scores.gather(-1, self.forced), self.forced
        if self.top_k == 1:
            return scores.max(dim=-1, keepdim=True)
        return torch.topk(scores, self.top_k, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        expert_weights, expert_indices = self._top_k(scores)
        self.used = expert_indices
        return expert_weights, expert_indices


class NeoxSinkhornRouter(_Used):
    def __init__(self, top_k: int = 1) -> None:
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(D, E, bias=False)

    def sinkhorn(self, cost: torch.Tensor, tol: float = 0.0001) -> torch.Tensor:
        cost = torch.exp(cost)
        d0 = torch.ones(cost.size(0), device=cost.device, dtype=cost.dtype)
        d1 = torch.ones(cost.size(1), device=cost.device, dtype=cost.dtype)
        eps = 0.00000001
        error = 1e9
        d1_old = d1
        while error > tol:
            d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
            d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
            error = torch.mean(torch.abs(d1_old - d1))  # type: ignore[assignment]
            d1_old = d1
        return d1 * cost * d0.unsqueeze(1)

    def sinkhorn_load_balancing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def _sinkhorn_activation(logits: torch.Tensor) -> torch.Tensor:
            if self.top_k == 1:
                return torch.sigmoid(logits)
            return torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)

        if self.training:
            with torch.no_grad():
                norm_logits = self.sinkhorn(logits.to(dtype=torch.float32))
                if self.forced is None:
                    _, indices = torch.topk(norm_logits, k=self.top_k, dim=1)
                else:
                    indices = self.forced
            logits = _sinkhorn_activation(logits)
            scores = torch.gather(logits, 1, indices)
        else:
            logits = _sinkhorn_activation(logits)
            if self.forced is None:
                scores, indices = torch.topk(logits, k=self.top_k, dim=1)
            else:
                scores, indices = logits.gather(1, self.forced), self.forced
        return scores, indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.layer(x.view(-1, x.shape[-1]))
        expert_weights, expert_indices = self.sinkhorn_load_balancing(router_logits)
        self.used = expert_indices
        return expert_weights, expert_indices


class NeoxParallelGroupedMLP(nn.Module):
    """``ParallelGroupedMLP`` on one rank: each expert's slice of the stacked weights over its run of rows."""

    def __init__(self, ff: int = 2 * D) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, ff, D) * 0.3)
        self.w2 = nn.Parameter(torch.randn(E, ff, D) * 0.3)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(tokens_per_expert.tolist()):
            outs.append(F.gelu(x[start : start + n] @ self.w1[e].t()) @ self.w2[e])
            start += n
        return torch.cat(outs)


class NeoxParallelDroplessMLP(nn.Module):
    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, top_k
        self.mlp = NeoxParallelGroupedMLP()

    def indices_and_bins(
        self, top_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        top_expert = top_expert.int()
        bin_ids, indices = torch.sort(top_expert, stable=True)
        tokens_per_expert = torch.bincount(top_expert, minlength=self.num_experts)
        bins = torch.cumsum(tokens_per_expert, 0)
        return indices, bin_ids, bins, tokens_per_expert

    def forward(self, x: torch.Tensor, expert_weights: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        in_shape = x.size()
        expert_weights = expert_weights.flatten()
        expert_indices = expert_indices.flatten()
        with torch.no_grad():
            indices, _bin_ids, _bins, tokens_per_expert = self.indices_and_bins(expert_indices)
        flat = x.view(-1, x.shape[-1])
        routed = flat[indices // self.top_k]  # ``megablocks.ops.gather``
        out = self.mlp(routed, tokens_per_expert) * expert_weights[indices, None]
        y = torch.zeros_like(flat).index_add(0, indices // self.top_k, out)  # ``megablocks.ops.scatter``
        return y.view(in_shape)


class NeoxParallelDroplessMoE(nn.Module):
    def __init__(self, router: str = "topk", top_k: int = 1) -> None:
        super().__init__()
        self.router = NeoxSinkhornRouter(top_k) if router == "sinkhorn" else NeoxTopKTokenChoiceRouter(top_k)
        self.experts = NeoxParallelDroplessMLP(top_k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        expert_weights, expert_indices = self.router(x)
        return self.experts(x, expert_weights, expert_indices), None


class NeoxMoELayer(nn.Module):
    """The transformer layer's MLP half: ``mlp_output, mlp_bias = self.mlp(...)``."""

    def __init__(self, router: str = "topk", top_k: int = 1) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.mlp = NeoxParallelDroplessMoE(router, top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp_output, _mlp_bias = self.mlp(self.post_attention_layernorm(x))
        return mlp_output


# ----------------------------------------------------------------------- InternEvo: gates out, top-k in the layer
# InternLM/InternEvo internlm/model/moe/dropless_layer.py (``TopKGate``, ``DroplessMoELayer``): the gate module only
# returns ``softmax(wg(x))``; the layer's ``topk_softmax_with_capacity`` takes the ``torch.topk``, renormalises its
# values in place (``/=``) and counts the ids (``bincount`` in deterministic mode); without a capacity factor that is
# all. With one, each expert keeps ``ceil(tokens * k / E * capacity_factor)`` tokens by a second ``torch.topk`` over the
# tokens (``dim=0``) of the top-k-masked weights (``drop_policy="probs"``) or of the top-k mask (``"position"``), and
# the dropped slots get weight 0 and the id ``iinfo(long).max``. The all-to-all dispatcher on one rank sorts the flat
# ids (stable ``argsort``), runs the experts on runs of rows split by the counts, and puts the rows back with
# ``index_copy_`` before the weighted sum over the k slots.
class InternEvoTopKGate(nn.Module):
    def __init__(self, topk: int = 2) -> None:
        super().__init__()
        self.wg = nn.Linear(D, E, bias=False)
        self.k = topk
        self.noisy_gate_policy = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.wg(inputs), dim=1)


class InternEvoDroplessMoELayer(_Used):
    def __init__(self, capacity_factor: float | None = None, drop_policy: str = "probs") -> None:
        super().__init__()
        self.gate = InternEvoTopKGate()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D, bias=False), nn.SiLU(), nn.Linear(2 * D, D, bias=False)) for _ in range(E)
        )
        self.num_experts, self.topk, self.deterministic_mode = E, 2, True
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy

    def topk_softmax_with_capacity(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced is None:
            expert_weights, indices = torch.topk(gates, self.topk, dim=1)
        else:
            expert_weights, indices = gates.gather(1, self.forced), self.forced
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)
        if self.capacity_factor is None:
            return expert_weights, indices
        expert_capacity = int(-(-(gates.shape[0] * self.topk * self.capacity_factor) // gates.shape[1]))
        topk_masked_gates = torch.zeros_like(gates).scatter(1, indices, expert_weights)
        topk_mask = torch.zeros_like(gates).scatter(1, indices, 1)
        if self.drop_policy == "probs":
            _, capacity_indices = torch.topk(topk_masked_gates, k=expert_capacity, dim=0, sorted=False)
        else:
            _, capacity_indices = torch.topk(topk_mask, k=expert_capacity, dim=0, sorted=False)
        capacity_mask = torch.zeros_like(gates).scatter(0, capacity_indices, 1)
        final_mask = torch.logical_and(topk_mask, capacity_mask)
        exceed_mask = torch.gather(torch.logical_not(final_mask), 1, indices)
        final_expert_weights = expert_weights * torch.logical_not(exceed_mask)
        final_indices = indices.clone().masked_fill_(exceed_mask, torch.iinfo(torch.long).max)
        return final_expert_weights, final_indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        hidden_shape = x.shape
        reshaped = x.reshape(-1, x.shape[-1])
        gates = self.gate(reshaped)
        expert_weights, indices = self.topk_softmax_with_capacity(gates)
        self.used = indices
        flat = indices.view(-1)
        kept = flat != torch.iinfo(torch.long).max
        sorted_indices = torch.argsort(flat, stable=True)[: int(kept.sum())]
        counts = torch.bincount(flat[kept], minlength=self.num_experts)
        permuted = reshaped.index_select(0, sorted_indices // self.topk)
        chunks = torch.split(permuted, counts.tolist(), dim=0)
        expert_output = torch.cat([expert(c) for expert, c in zip(self.experts, chunks, strict=True)])
        unpermuted = torch.zeros(flat.numel(), x.shape[-1], dtype=x.dtype)
        unpermuted = unpermuted.index_copy(0, sorted_indices, expert_output)
        output = (unpermuted.view(-1, self.topk, x.shape[-1]) * expert_weights.unsqueeze(-1)).sum(dim=1)
        return output.view(hidden_shape), None


def internevo_position_drop(rows: torch.Tensor) -> torch.Tensor:
    """The experts that recorded rows reach under InternEvo's ``drop_policy="position"`` (the same rule as the layer's,
    on the rows alone: each expert keeps the tokens a top-k over the top-k mask picks)."""
    rows = rows.long()
    capacity = int(-(-(rows.shape[0] * rows.shape[1] * 1.0) // E))
    topk_mask = torch.zeros(rows.shape[0], E).scatter(1, rows, 1)
    _, capacity_indices = torch.topk(topk_mask, k=capacity, dim=0, sorted=False)
    capacity_mask = torch.zeros(rows.shape[0], E).scatter(0, capacity_indices, 1)
    exceed = torch.gather(torch.logical_not(torch.logical_and(topk_mask, capacity_mask)), 1, rows)
    return rows.masked_fill(exceed, torch.iinfo(torch.long).max)


class InternEvoLayer(nn.Module):
    def __init__(self, **moe: object) -> None:
        super().__init__()
        self.feed_forward = InternEvoDroplessMoELayer(**moe)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(x)[0]


# ----------------------------------------------------------------------- unsloth: a gate Parameter, a dataclass out
# unslothai/unsloth unsloth/kernels/moe/grouped_gemm/reference/layers/qwen3_moe.py (``Qwen3MoeGroupedGEMMBlock``) and
# reference/moe_ops.py (``get_routing_indices``, ``permute``, ``unpermute``, ``torch_grouped_gemm``,
# ``calculate_topk``): the block holds the router weight itself as a bare ``gate`` Parameter ``[E, d]`` and the
# experts as stacked ``gate_up_proj`` / ``down_proj`` Parameters; its ``run_router`` method softmaxes in fp32, takes
# the ``torch.topk`` and renormalises in place; the routing indices are a ``histc`` of the ids and their stable
# ``argsort`` (under ``no_grad``), the grouped GEMM loops over the experts' runs, ``index_copy_`` puts the rows back,
# and the block returns a ``GroupedGEMMResult`` dataclass and the router logits. ``calculate_topk`` (the routing its
# fused-MoE benchmarks and tests compare against) may take the top-k of the raw logits and activate only the k
# values after it (``post_act``, a sigmoid here), renormalised.
@dataclass
class UnslothGroupedGEMMResult:
    token_counts_by_expert: torch.Tensor
    gather_indices: torch.Tensor
    topk_weights: torch.Tensor
    hidden_states: torch.Tensor


def unsloth_calculate_topk(
    gating_output: torch.Tensor,
    top_k: int,
    use_sigmoid: bool,
    renormalize: bool,
    pre_act: bool = True,
    post_act: bool = False,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def _activation(gating_output: torch.Tensor) -> torch.Tensor:
        if use_sigmoid:
            return torch.sigmoid(gating_output.to(torch.float32)).to(gating_output.dtype)
        return F.softmax(gating_output.to(torch.float32), dim=1).to(gating_output.dtype)

    scores = _activation(gating_output) if pre_act else gating_output
    if forced is None:
        topk_weights, topk_ids = torch.topk(scores, k=top_k, dim=1)
    else:
        topk_weights, topk_ids = scores.gather(1, forced), forced
    if post_act:
        topk_weights = _activation(topk_weights)
    if renormalize:
        topk_weights /= torch.sum(topk_weights, dim=-1, keepdim=True).to(gating_output.dtype)
    return topk_weights, topk_ids


@torch.no_grad()
def unsloth_get_routing_indices(selected_experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (``histc`` of the float ids: the CPU ``histc`` takes no integer tensors)
    token_counts_by_expert = torch.histc(selected_experts.view(-1).float(), bins=num_experts, min=0, max=num_experts)
    gather_indices = torch.argsort(selected_experts.view(-1), stable=True)
    return token_counts_by_expert.long(), gather_indices


def unsloth_torch_grouped_gemm(x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor) -> torch.Tensor:
    result = torch.zeros((x.shape[0], w.shape[1]), dtype=x.dtype)
    m_start = 0
    for g in range(m_sizes.shape[0]):
        m_size = m_sizes[g]
        if m_size > 0:
            m_end = m_start + m_size
            result[m_start:m_end] = x[m_start:m_end] @ w[g].T
            m_start = m_end
    return result


class UnslothQwen3MoeGroupedGEMMBlock(_Used):
    def __init__(self, post_act_sigmoid: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob, self.moe_intermediate_size = E, 2, True, D
        self.post_act_sigmoid = post_act_sigmoid
        self.gate = nn.Parameter(torch.randn(E, D) * 0.3)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * D, D) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(E, D, D) * 0.3)

    def run_router(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.gate)
        if self.post_act_sigmoid:
            routing_weights, selected_experts = unsloth_calculate_topk(
                router_logits, self.top_k, True, False, pre_act=False, post_act=True, forced=self.forced
            )
            return router_logits, routing_weights, selected_experts
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            routing_weights, selected_experts = routing_weights.gather(-1, self.forced), self.forced
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        return router_logits, routing_weights.to(hidden_states.dtype), selected_experts

    def forward(self, hidden_states: torch.Tensor) -> tuple[UnslothGroupedGEMMResult, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        num_tokens = batch_size * sequence_length
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.run_router(hidden_states)
        self.used = selected_experts
        token_counts_by_expert, gather_indices = unsloth_get_routing_indices(selected_experts, self.num_experts)
        permuted = hidden_states[gather_indices // self.top_k]
        first_gemm = unsloth_torch_grouped_gemm(permuted, self.gate_up_proj, token_counts_by_expert)
        gate_proj = first_gemm[..., : self.moe_intermediate_size]
        up_proj = first_gemm[..., self.moe_intermediate_size :]
        second_gemm = unsloth_torch_grouped_gemm(F.silu(gate_proj) * up_proj, self.down_proj, token_counts_by_expert)
        unpermuted = torch.empty_like(second_gemm)
        unpermuted.index_copy_(0, gather_indices, second_gemm)
        out = (unpermuted.view(num_tokens, self.top_k, hidden_dim) * routing_weights[..., None]).sum(dim=1)
        result = UnslothGroupedGEMMResult(
            token_counts_by_expert, gather_indices, routing_weights, out.view(batch_size, sequence_length, hidden_dim)
        )
        return result, router_logits


class UnslothDecoderMLP(nn.Module):
    def __init__(self, post_act_sigmoid: bool = False) -> None:
        super().__init__()
        self.mlp = UnslothQwen3MoeGroupedGEMMBlock(post_act_sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result, _router_logits = self.mlp(x)
        return result.hidden_states


# ----------------------------------------------------------------------- CuMo: a top-k in a CLIP encoder layer
# SHI-Labs/CuMo cumo/model/multimodal_projector/builder.py (``MLPMoE``) and cumo/model/multimodal_encoder/clip_smoe.py
# (``CLIPEncoderMoELayer``, ``CLIPEncoder``, ``CLIPSMoEVisionTransformer``): a bias-free ``gate`` Linear; a router
# z-loss (``logsumexp`` squared), the fp32 softmax, ``torch.topk``, a balance loss from the ``one_hot`` of the first
# slot only (``one_hot(rearrange(ids, '... k -> k ...'))[0]``), the weights renormalised, and a loop per image over
# the experts (``torch.where(selected_experts[b] == i)``, ``results[b][token_idx] += ...``). The projector returns
# ``(results, balance_loss, router_z_loss)``. In the vision tower the gate and experts sit in the encoder layer
# beside its attention; the encoder returns the *inputs* of its layers (``encoder_states``) and the tower the last
# of them, so the last layer's output reaches only its losses (the tower's ``select_layer = -2`` built in).
class CuMoMLPMoE(_Used):
    def __init__(self, num_selected: int = 2) -> None:
        super().__init__()
        self.num_experts, self.num_selected, self.channels = E, num_selected, D
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)) for _ in range(E))

    def forward(self, x_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate_logits = self.gate(x_img)
        router_z_loss = torch.square(torch.logsumexp(gate_logits, dim=-1)).mean()
        gate_softmax = F.softmax(gate_logits, dim=-1, dtype=torch.float).to(x_img.dtype)
        density_1_proxy = gate_softmax.mean(dim=-2)
        if self.forced is None:
            weights, selected_experts = torch.topk(gate_softmax, self.num_selected)
        else:
            selected_experts = self.forced.view(*x_img.shape[:-1], -1)
            weights = gate_softmax.gather(-1, selected_experts)
        self.used = selected_experts.reshape(-1, self.num_selected)
        one_hot_gate_indices = F.one_hot(selected_experts.movedim(-1, 0), self.num_experts).float()[0]
        density_1 = one_hot_gate_indices.mean(dim=-2)
        balance_loss = (density_1_proxy * density_1).mean() * float(self.num_experts**2)
        weights = weights / torch.sum(weights, dim=-1, keepdim=True).to(x_img.dtype)
        results = torch.zeros((x_img.shape[0], x_img.shape[1], self.channels)).to(x_img.device, x_img.dtype)
        for b in range(x_img.shape[0]):
            for i, expert in enumerate(self.experts):
                token_idx, nth_expert = torch.where(selected_experts[b] == i)
                results[b][token_idx] += weights[b][token_idx, nth_expert, None] * expert(x_img[b][token_idx])
        return results, balance_loss, router_z_loss


class CuMoProjector(nn.Module):
    """The LLaVA-style use of the projector: image features, and its two losses added to the training loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mm_projector = CuMoMLPMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, balance_loss, router_z_loss = self.mm_projector(x)
        return torch.cat([features.flatten(), torch.stack([balance_loss, router_z_loss])])


class CuMoCLIPAttention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, D // heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = h.shape

        def shape(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = shape(self.q_proj(h) * self.scale), shape(self.k_proj(h)), shape(self.v_proj(h))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.out_proj(attn.transpose(1, 2).reshape(bsz, n, D))


class CuMoCLIPEncoderMoELayer(_Used):
    def __init__(self, num_selected: int = 2) -> None:
        super().__init__()
        self.self_attn = CuMoCLIPAttention()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.num_of_experts, self.num_selected = E, num_selected
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(E)
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.layer_norm1(hidden_states))
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        gate_logits = self.gate(hidden_states)
        router_z_loss = torch.square(torch.logsumexp(gate_logits, dim=-1)).mean()
        gate_softmax = F.softmax(gate_logits, dim=-1, dtype=torch.float).to(hidden_states.dtype)
        density_1_proxy = gate_softmax.mean(dim=-2)
        if self.forced is None:
            weights, selected_experts = torch.topk(gate_softmax, self.num_selected)
        else:
            selected_experts = self.forced.view(*hidden_states.shape[:-1], -1)
            weights = gate_softmax.gather(-1, selected_experts)
        self.used = selected_experts.reshape(-1, self.num_selected)
        one_hot_gate_indices = F.one_hot(selected_experts.movedim(-1, 0), self.num_of_experts).float()[0]
        balance_loss = (density_1_proxy * one_hot_gate_indices.mean(dim=-2)).mean() * float(self.num_of_experts**2)
        weights = weights / torch.sum(weights, dim=-1, keepdim=True).to(hidden_states.dtype)
        results = torch.zeros_like(hidden_states)
        for b in range(hidden_states.shape[0]):
            for i, expert in enumerate(self.experts):
                token_idx, nth_expert = torch.where(selected_experts[b] == i)
                results[b][token_idx] += weights[b][token_idx, nth_expert, None] * expert(hidden_states[b][token_idx])
        return residual + results, balance_loss, router_z_loss


class CuMoCLIPSMoEVisionTransformer(nn.Module):
    """``CLIPSMoEVisionTransformer`` from the patch embeddings on (``with_losses``: the tower's two losses too, as
    the training loss takes them; without: the image features alone, as inference uses them)."""

    def __init__(self, num_layers: int = 2, with_losses: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.with_losses = with_losses
        self.pre_layrnorm = nn.LayerNorm(D)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(CuMoCLIPEncoderMoELayer() for _ in range(num_layers))})

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = self.pre_layrnorm(embeddings)
        encoder_states: tuple[torch.Tensor, ...] = ()
        balance_losses, router_z_losses = [], []
        for encoder_layer in self.encoder["layers"]:  # type: ignore[union-attr]
            encoder_states = (*encoder_states, hidden_states)
            hidden_states, balance_loss, router_z_loss = encoder_layer(hidden_states)
            balance_losses.append(balance_loss)
            router_z_losses.append(router_z_loss)
        features = encoder_states[-1]
        if not self.with_losses:
            return features
        losses = torch.stack([torch.stack(balance_losses).mean(), torch.stack(router_z_losses).mean()])
        return torch.cat([features.flatten(), losses])


# ----------------------------------------------------------------------- BlockFFN baselines: routers return dicts
# thunlp/BlockFFN baseline/cpm/dragonfly/moe_gates.py (``TopKRouter``, ``TopPRouter``, ``TopKExpertChoiceRouter``) and
# baseline/cpm/dragonfly/moe_calculator.py (``TopKCalculator``, ``ExpertChoiceCalculator``): the routers own a bare
# ``weight`` ``[E, d]``, softmax in fp32 and return a dict (``topk_indices``, ``topk_scores``, ``load``,
# ``balance_loss``, ``router_entropy``). The top-k router renormalises its ``torch.topk`` and counts the ids
# (``bincount``); the top-p router sorts the probabilities, cuts where their ``cumsum`` passes ``top_p`` (the first
# expert past it kept), writes ``-1`` and 0 in the cut slots and keeps as many columns as the widest row needs (a
# ``.item()``); the expert-choice router takes a ``torch.topk`` over the tokens of the transposed probabilities. The
# top-k calculator repeats each token once per slot, runs each expert on the rows whose id is its own (experts return
# dicts) and sums the slots weighted; the expert-choice calculator gathers each expert's tokens by a ``one_hot`` of the
# token ids and combines by a matmul.
class BlockFfnExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in, self.w_out = nn.Linear(D, 2 * D, bias=False), nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden_states": self.w_out(F.silu(self.w_in(x)))}


class BlockFfnTopKRouter(_Used):
    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, E
        self.weight = nn.Parameter(torch.randn(E, D) * 0.3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.view(-1, x.shape[-1])
        scores_prob = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        router_entropy = torch.sum(-scores_prob * torch.log(scores_prob + 1e-5), dim=-1).mean()
        if self.forced is None:
            expert_weights, expert_indices = torch.topk(scores_prob, self.top_k, dim=-1)
        else:
            expert_weights, expert_indices = scores_prob.gather(-1, self.forced), self.forced
        self.used = expert_indices
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        load = expert_indices.view(-1).bincount(minlength=self.num_experts)
        load_mean = load / (x.shape[0] * self.top_k)
        balance_loss = self.num_experts * torch.sum(scores_prob.mean(dim=0) * load_mean)
        return {
            "topk_indices": expert_indices,
            "topk_scores": expert_weights.to(x.dtype),
            "load": load_mean,
            "balance_loss": balance_loss,
            "router_entropy": router_entropy,
        }


class BlockFfnTopPRouter(_Used):
    def __init__(self, top_p: float = 0.5) -> None:
        super().__init__()
        self.top_p, self.num_experts = top_p, E
        self.weight = nn.Parameter(torch.randn(E, D) * 0.3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.view(-1, x.shape[-1])
        scores_prob = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        sorted_probs, sorted_indices = torch.sort(scores_prob, descending=True, dim=-1)
        mask = torch.cumsum(sorted_probs, dim=-1) > self.top_p
        threshold_mask = F.one_hot(mask.long().argmax(dim=-1), num_classes=sorted_indices.size(-1)).bool()
        mask = mask & ~threshold_mask
        sorted_indices = torch.where(mask, -1, sorted_indices)
        sorted_probs = torch.where(mask, 0.0, sorted_probs)
        max_valid_num = max(mask.size(-1) - int(torch.min(torch.sum(mask, dim=-1)).item()), 1)
        sorted_indices = sorted_indices[:, :max_valid_num]
        sorted_probs = sorted_probs[:, :max_valid_num]
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        self.used = sorted_indices
        return {"topk_indices": sorted_indices, "topk_scores": sorted_probs.to(x.dtype)}


class BlockFfnExpertChoiceRouter(_Used):
    def __init__(self, top_k: int = 6) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, E
        self.weight = nn.Parameter(torch.randn(E, D) * 0.3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = x.view(-1, x.shape[-1])
        scores_prob = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32).transpose(0, 1)
        expert_weights, expert_indices = torch.topk(scores_prob, self.top_k, dim=-1)
        return {"topk_indices": expert_indices, "topk_scores": expert_weights.to(x.dtype), "load": None}


class BlockFfnMoE(nn.Module):
    """The MoE feed-forward: the router's dict handed to its calculator with the experts."""

    def __init__(self, router: str = "topk") -> None:
        super().__init__()
        self.router: nn.Module = {
            "topk": BlockFfnTopKRouter,
            "topp": BlockFfnTopPRouter,
            "expert_choice": BlockFfnExpertChoiceRouter,
        }[router]()
        self.expert_choice = router == "expert_choice"
        self.experts = nn.ModuleList(BlockFfnExpert() for _ in range(E))

    def _topk_calculator(
        self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        orig_shape = hidden_states.shape
        top_k = topk_indices.shape[-1]
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1]).repeat_interleave(top_k, dim=0)
        topk_idx_flat = topk_indices.view(-1)
        # (zeros where upstream leaves ``empty`` rows for the ``-1`` slots, weighted by zero)
        y = torch.zeros_like(hidden_states)
        for i in range(E):
            y[topk_idx_flat == i] = self.experts[i](hidden_states[topk_idx_flat == i])["hidden_states"]
        y = (y.view(*topk_weights.shape, -1) * topk_weights.unsqueeze(-1)).sum(dim=1)
        return y.view(*orig_shape)

    def _expert_choice_calculator(
        self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        topk_indices_onehot = F.one_hot(topk_indices, num_classes=hidden_states.shape[0])
        expert_input = torch.einsum("ekl,ld->ekd", topk_indices_onehot.to(hidden_states.dtype), hidden_states)
        expert_output = torch.empty_like(expert_input)
        for i in range(E):
            expert_output[i] = self.experts[i](expert_input[i])["hidden_states"]
        p = topk_indices_onehot.view(-1, topk_indices_onehot.shape[-1]).transpose(0, 1)
        all_weights = p * topk_weights.view(-1)
        y = torch.matmul(all_weights, expert_output.view(-1, expert_output.shape[-1]))
        return y.view(*orig_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.router(x)
        if self.expert_choice:
            return self._expert_choice_calculator(x, routed["topk_indices"], routed["topk_scores"])
        return self._topk_calculator(x, routed["topk_indices"], routed["topk_scores"])


# ----------------------------------------------------------------------- BlockFFN: a ReLU router, every expert run
# thunlp/BlockFFN pretrain/cpm/dragonfly/blockffn.py (``BLockFeedForward``) and pretrain/cpm/dragonfly/moe_modules.py
# (``MoELinearActiveGate``, ``MoEUpDownExperts`` with ``use_linear``): the router is a bare ``w_gate`` ``[E, d]`` with a
# ReLU, its scores normalised by their sum (``norm_after_router="sum"``); the experts are one wide Linear whose
# ``E`` slices of ``dim_expert`` units are each scaled by their expert's score: the sparsity is the ReLU's zeros, and
# no call chooses experts.
class BlockFfnLinearActiveGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(E, D) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_score = F.linear(x, self.w_gate)
        return raw_score, torch.relu(raw_score)


class BlockFfnUpDownExperts(nn.Module):
    def __init__(self, dim_expert: int = 4) -> None:
        super().__init__()
        self.num_expert, self.dim_expert = E, dim_expert
        self.moe_w_in = nn.Parameter(torch.randn(E * dim_expert, D) * 0.3)
        self.moe_w_out = nn.Parameter(torch.randn(D, E * dim_expert) * 0.3)

    def forward(self, x: torch.Tensor, router_score: torch.Tensor) -> torch.Tensor:
        seq_len = router_score.shape[0]
        x_in = F.silu(F.linear(x, self.moe_w_in))
        scored_x_in = x_in.view(seq_len, self.num_expert, self.dim_expert) * router_score.unsqueeze(-1)
        return F.linear(scored_x_in.view(seq_len, self.num_expert * self.dim_expert), self.moe_w_out)


class BlockFfnBlockFeedForward(nn.Module):
    def __init__(self, norm_scale: float = 1.0) -> None:
        super().__init__()
        self.moe_router = BlockFfnLinearActiveGate()
        self.moe_experts = BlockFfnUpDownExperts()
        self.num_expert, self.norm_scale = E, norm_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, dim_model = x.shape
        x = x.view(batch_size * seq_len, dim_model)
        _raw_router_score, router_score = self.moe_router(x)
        router_score = router_score / (torch.sum(router_score, dim=-1, keepdim=True) * self.norm_scale + 1e-5)
        return self.moe_experts(x, router_score).view(batch_size, seq_len, dim_model)


# ----------------------------------------------------------------------- WeNet U2++ MoE: macaron MoE feed-forwards
# wenet-e2e/wenet wenet/transformer/positionwise_feed_forward.py (``MoEFFNLayer``) and
# wenet/transformer/encoder_layer.py (``ConformerEncoderLayer``): a bias-free ``gate`` Linear, ``torch.topk`` of the
# raw logits, a softmax over the k values, a loop over the experts (``torch.where(selected_experts == i)``,
# ``output[token_ids] += ...``); U2++ MoE makes both feed-forwards of a Conformer layer MoE layers, the macaron one
# before attention and the last one after it, each added at half scale (``ff_scale = 0.5``).
class WenetPositionwiseFeedForward(nn.Module):
    def __init__(self, hidden_units: int = 2 * D) -> None:
        super().__init__()
        self.w_1 = nn.Linear(D, hidden_units, bias=False)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(0.0)
        self.w_2 = nn.Linear(hidden_units, D, bias=False)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(xs))))


class WenetMoEFFNLayer(_Used):
    def __init__(self, n_expert: int = E, n_expert_activated: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(D, n_expert, bias=False)
        self.experts = nn.ModuleList(WenetPositionwiseFeedForward() for _ in range(n_expert))
        self.n_expert, self.n_expert_activated = n_expert, n_expert_activated

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        B, L, D_ = xs.size()
        xs = xs.view(-1, D_)
        router = self.gate(xs)
        if self.forced is None:
            logits, selected_experts = torch.topk(router, self.n_expert_activated)
        else:
            logits, selected_experts = router.gather(-1, self.forced), self.forced
        self.used = selected_experts
        weights = F.softmax(logits, dim=1, dtype=torch.float).to(dtype=xs.dtype)
        output = torch.zeros_like(xs)
        for i, expert in enumerate(self.experts):
            token_ids, ith_expert = torch.where(selected_experts == i)
            output[token_ids] += weights[token_ids, ith_expert, None] * expert(xs[token_ids])
        return output.view(B, L, D_)


class WenetConformerEncoderLayer(nn.Module):
    """``ConformerEncoderLayer``'s macaron feed-forward, a token mixer standing for attention and convolution, and
    the last feed-forward, each a residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.feed_forward_macaron = WenetMoEFFNLayer()
        self.feed_forward = WenetMoEFFNLayer()
        self.norm_ff_macaron, self.norm_mha, self.norm_ff = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.self_attn = nn.Linear(D, D)
        self.ff_scale = 0.5
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))
        mixed = self.self_attn(self.norm_mha(x))
        x = x + mixed.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1)[:, None]
        return x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x)))


class WenetConformerEncoder(nn.Module):
    def __init__(self, num_blocks: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleList(WenetConformerEncoderLayer() for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoders:
            x = layer(x)
        return x


# ----------------------------------------------------------------------- Wan2.2: two experts by a timestep boundary
# Wan-Video/Wan2.2 wan/text2video.py (``WanT2V._prepare_model_for_timestep``): the MoE is two whole denoisers, a
# high-noise and a low-noise one, and each sampling step runs the one its timestep picks (``t.item() >= boundary``):
# a choice by a number, per step, with no router and no scores.
class Wan22TwoExpertDenoiser(nn.Module):
    def __init__(self, boundary: float = 0.875) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.boundary = boundary
        self.high_noise_model = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.low_noise_model = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.tensor(0.9) if t is None else t
        model = self.high_noise_model if t.item() >= self.boundary else self.low_noise_model
        return model(x)


# ----------------------------------------------------------------------- MoM: tokens routed into memories
# fla-org/flash-linear-attention fla/layers/mom.py (``MomAttention``, ``transform``, ``reconstruct``):
# Mixture-of-Memories routes each token to k of ``num_memories`` linear-attention memories: a bias-free ``gate``, the
# fp32 softmax, ``torch.topk``, the weights renormalised in place, a routing mask made from the *weights* scattered into
# ``[b, s, M]`` (``.bool().int()``); ``transform`` repeats each token k times, sorts the rows by batch and memory
# (``argsort`` of ``batch * (max id + 1) + memory``) and lays each memory's tokens out in order, padded to the longest;
# each memory runs its own key and value projections and a causal recurrence over its own tokens (the gated delta rule
# kernel; a causal linear attention here), so a token's memory changes what later tokens of that memory read;
# ``reconstruct`` scatters the rows back, unsorts them and sums the k slots weighted.
def mom_transform(
    x: torch.Tensor, routing_mask: torch.Tensor, num_memories: int, selected_memories: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    topk = selected_memories.shape[2]
    x = x.repeat_interleave(topk, dim=1)
    selected_memories = selected_memories.reshape(selected_memories.shape[0], -1)
    b, s, d = x.shape
    x_flat = x.reshape(b * s, d)
    with torch.no_grad():
        batch_indices = torch.arange(b).unsqueeze(-1).repeat(1, s).reshape(-1)
        memories_flat = selected_memories.reshape(-1)
        combined = batch_indices * (memories_flat.max() + 1) + memories_flat
        sorted_indices = combined.argsort()
    x_sorted = x_flat[sorted_indices]
    with torch.no_grad():
        batch_memory_tokens = routing_mask.sum(dim=1)
        flatten_offset = batch_memory_tokens.flatten().cumsum(dim=0)
        max_len = int(batch_memory_tokens.max())
        indices = torch.arange(max_len).unsqueeze(0).expand(b * num_memories, -1) + torch.cat(
            [torch.tensor([0]), flatten_offset[:-1]], dim=0
        ).unsqueeze(1)
        mask = indices < flatten_offset.unsqueeze(-1)
        truncation_indices = torch.where(mask, indices, torch.zeros_like(indices))
    gathered_x = torch.gather(x_sorted, 0, truncation_indices.reshape(-1).unsqueeze(-1).expand(-1, d))
    transformed_x = gathered_x.reshape(b, num_memories, max_len, d).transpose(0, 1)
    mask_2 = mask.reshape((b, num_memories, max_len)).transpose(0, 1)
    return transformed_x, truncation_indices, sorted_indices, mask, mask_2


def mom_reconstruct(
    transformed_x: torch.Tensor,
    indices: torch.Tensor,
    sorted_indices: torch.Tensor,
    batch_size: int,
    seq_len: int,
    topk: int,
    routing_weights: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    transformed_x = transformed_x.transpose(0, 1).reshape((-1, transformed_x.shape[2], transformed_x.shape[3]))
    b, s, k, d = batch_size, seq_len, topk, transformed_x.shape[2]
    gathered_x = transformed_x.reshape((transformed_x.shape[0] * transformed_x.shape[1], transformed_x.shape[2]))
    gathered_x = gathered_x * mask.reshape(-1).unsqueeze(-1).expand_as(gathered_x)
    resorted_x = torch.zeros((b * s * k, d), dtype=gathered_x.dtype).scatter_add_(
        0, indices.reshape(-1).unsqueeze(-1).expand(-1, d), gathered_x
    )
    rearranged_x_flat = resorted_x[sorted_indices.argsort()]
    restored_x = rearranged_x_flat.reshape(b, s, k, d) * routing_weights.reshape(b, s, k).unsqueeze(-1)
    return restored_x.sum(dim=2)


class MomAttention(_Used):
    def __init__(self, num_memories: int = E, topk: int = 2) -> None:
        super().__init__()
        self.num_memories, self.topk = num_memories, topk
        self.q_proj = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, num_memories, bias=False)
        self.k_proj = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(num_memories))
        self.v_proj = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(num_memories))
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = hidden_states.shape[0], hidden_states.shape[1]
        scores = F.softmax(self.gate(hidden_states), dim=2, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_memories = torch.topk(scores, self.topk, dim=-1)
        else:
            selected_memories = self.forced.view(batch_size, seq_len, -1)
            routing_weights = scores.gather(-1, selected_memories)
        self.used = selected_memories.reshape(-1, self.topk)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights_full = torch.zeros(batch_size, seq_len, self.num_memories).scatter(
            -1, selected_memories, routing_weights
        )
        routing_mask = routing_weights_full.bool().int()
        x, indices, sorted_indices, mask, mask_2 = mom_transform(
            hidden_states, routing_mask, self.num_memories, selected_memories
        )
        q = self.q_proj(x)
        k = torch.stack([k_expert(x[i]) for i, k_expert in enumerate(self.k_proj)], dim=0)
        v = torch.stack([v_expert(x[i]) for i, v_expert in enumerate(self.v_proj)], dim=0)
        length = x.shape[2]
        causal = torch.ones(length, length, dtype=torch.bool).tril() & mask_2.unsqueeze(-2)
        attn = (q @ k.transpose(-1, -2) / D).masked_fill(~causal, 0.0)
        o = mom_reconstruct(attn @ v, indices, sorted_indices, batch_size, seq_len, self.topk, routing_weights, mask)
        return self.o_proj(o)


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "gpt-neox-topk-router-top1-max-keepdim": (lambda: Layers(NeoxMoELayer), lambda: _x(12, 2), {}),
    "gpt-neox-topk-router-top1-max-keepdim-train": (lambda: Layers(NeoxMoELayer), lambda: _x(12, 2), {"train": True}),
    "gpt-neox-topk-router-top2": (lambda: Layers(lambda: NeoxMoELayer("topk", 2)), lambda: _x(12, 2), {}),
    "gpt-neox-topk-router-top2-train": (
        lambda: Layers(lambda: NeoxMoELayer("topk", 2)),
        lambda: _x(12, 2),
        {"train": True},
    ),
    "gpt-neox-sinkhorn-router-top1-sigmoid": (one_layer(lambda: NeoxMoELayer("sinkhorn")), lambda: _x(12, 2), {}),
    "gpt-neox-sinkhorn-router-top1-sigmoid-train": (
        one_layer(lambda: NeoxMoELayer("sinkhorn")),
        lambda: _x(12, 2),
        {"train": True},
    ),
    "gpt-neox-sinkhorn-router-top2-train": (
        one_layer(lambda: NeoxMoELayer("sinkhorn", 2)),
        lambda: _x(12, 2),
        {"train": True},
    ),
    "internevo-gate-returns-softmax-topk-in-layer": (lambda: Layers(InternEvoLayer), lambda: _x(2, 12), {}),
    "internevo-gate-returns-softmax-topk-in-layer-train": (
        lambda: Layers(InternEvoLayer),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "internevo-capacity-drop-by-position": (
        lambda: Layers(lambda: InternEvoLayer(capacity_factor=1.0, drop_policy="position")),
        lambda: _x(2, 12),
        {"as_used": internevo_position_drop},
    ),
    "internevo-capacity-drop-by-position-train": (
        lambda: Layers(lambda: InternEvoLayer(capacity_factor=1.0, drop_policy="position")),
        lambda: _x(2, 12),
        {"as_used": internevo_position_drop, "train": True},
    ),
    # (a smaller change: a softmax whose two forced experts both underflow renormalises 0/0, natively too)
    "unsloth-qwen3-grouped-gemm-gate-parameter-dataclass-out": (
        lambda: Layers(UnslothDecoderMLP),
        lambda: _x(2, 12),
        {"change": 0.5},
    ),
    "unsloth-qwen3-grouped-gemm-gate-parameter-dataclass-out-train": (
        lambda: Layers(UnslothDecoderMLP),
        lambda: _x(2, 12),
        {"train": True, "change": 0.5},
    ),
    # (not renormalised: upstream's in-place renormalisation of the sigmoid's output breaks its backward, natively)
    "unsloth-calculate-topk-post-act-sigmoid": (
        lambda: Layers(lambda: UnslothDecoderMLP(post_act_sigmoid=True)),
        lambda: _x(2, 12),
        {},
    ),
    "blockffn-topk-router-returns-a-dict": (lambda: Layers(BlockFfnMoE), lambda: _x(2, 12), {}),
    "blockffn-topk-router-returns-a-dict-train": (lambda: Layers(BlockFfnMoE), lambda: _x(2, 12), {"train": True}),
    "wenet-u2pp-moe-macaron-feed-forwards": (WenetConformerEncoder, lambda: _x(2, 12), {}),
    "wenet-u2pp-moe-macaron-feed-forwards-train": (WenetConformerEncoder, lambda: _x(2, 12), {"train": True}),
    "cumo-mlp-moe-projector-losses-returned": (CuMoProjector, lambda: _x(2, 12), {"change": 0.5}),
    "cumo-mlp-moe-projector-losses-returned-train": (
        CuMoProjector,
        lambda: _x(2, 12),
        {"train": True, "change": 0.5},
    ),
    "cumo-clip-encoder-moe-layers-with-losses": (CuMoCLIPSMoEVisionTransformer, lambda: _x(2, 12), {"change": 0.5}),
    "cumo-clip-encoder-moe-layers-with-losses-train": (
        CuMoCLIPSMoEVisionTransformer,
        lambda: _x(2, 12),
        {"train": True, "change": 0.5},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """GPT-NeoX's dropless MoE (a top-1 by ``max(keepdim=True)`` or a top-k, and the Sinkhorn router: in training a
    top-k of the Sinkhorn-balanced costs under ``no_grad`` after a data-dependent Python loop, the weights gathered from
    the sigmoid or softmax; the experts by sorted runs and a weighted scatter); InternEvo's dropless layer (the gate
    returns the softmax, the top-k and its in-place renormalisation in the layer's method, the experts over ``split``
    runs, rows put back by ``index_copy``; with a capacity by position, each expert keeping the tokens a second top-k
    over the tokens of the top-k mask picks, the others dropped); unsloth's reference grouped-GEMM Qwen3 block (the
    router weight a bare Parameter of the block, the top-k in its ``run_router``, a ``histc`` and stable ``argsort``, a
    dataclass returned) and its ``calculate_topk`` with the sigmoid after the top-k; CuMo's MoE projector and CLIP
    encoder layers (a top-k beside attention in the layer, a balance loss from the first slot's ``one_hot``, the losses
    in the output); BlockFFN's baseline top-k router (a bare weight, a dict returned, experts returning dicts over rows
    repeated per slot); WeNet's U2++ MoE Conformer (both feed-forwards of a layer MoE, at half scale, a top-k of the raw
    logits softmaxed over the k): every router found and nothing else, the recorded rows the experts used, and a replay
    after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "blockffn-top-p-by-sort-and-cumsum": (
        lambda: Layers(lambda: BlockFfnMoE("topp")),
        lambda: _x(2, 12),
        r"(?s)'layers\.0\.router': its forward makes more than one independent choice .*\(top-p: a sort, a cumulative "
        r"sum and an argmax",
        {},
    ),
    "blockffn-expert-choice": (
        lambda: Layers(lambda: BlockFfnMoE("expert_choice")),
        lambda: _x(2, 12),
        r"'layers\.0\.router': its decision .* is a top-k over tokens, not over experts",
        {},
    ),
    "blockffn-relu-router-every-expert-run": (
        lambda: Layers(BlockFfnBlockFeedForward),
        lambda: _x(2, 12),
        r"'layers\.0\.moe_router': its forward makes no decision-like call .*a threshold \(the experts whose weight "
        r"passes a relu",
        {},
    ),
    "wan22-two-experts-by-timestep": (Wan22TwoExpertDenoiser, lambda: _x(2, 12), "no MoE router found", {}),
    # (no ``experts``: each memory is a slice of per-memory projections; named with ``include=``, see the xfail below)
    "mom-memories-not-found-without-include": (
        lambda: Layers(MomAttention),
        lambda: _x(2, 12),
        "no MoE router found",
        {},
    ),
    "internevo-capacity-drop-by-probs": (
        lambda: Layers(lambda: InternEvoLayer(capacity_factor=1.0)),
        lambda: _x(2, 12),
        r"'layers\.0\.feed_forward\.gate': after its decision .* chooses again from the current scores .*tokens "
        r"dropped by score over a capacity",
        {},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """Mixture-of-Memories without ``include=`` (no experts to find); BlockFFN's own ReLU router (every expert run,
    scaled by a ReLU score normalised by the sum: no choice at all); Wan2.2's two denoisers picked per step by the
    timestep (no router: none found); BlockFFN's baseline top-p router (a sort, a ``cumsum`` and an ``argmax`` of where
    it crosses p, ``-1`` in the cut slots) and expert-choice router (a top-k over the tokens); InternEvo's capacity by
    score (each expert keeps its best tokens by a second top-k over the tokens of the top-k-masked weights: a replay
    under changed routers would drop others): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cumo_last_clip_layer_reaching_nothing(train: bool) -> None:
    """CuMo's vision tower used for its image features alone: the last encoder layer runs, and its router decides,
    but the tower returns that layer's input, so no decision of it reaches the output: found, recorded and forced
    all the same (its layer's own output shows the decision), the replay exact."""
    assert_exact(CuMoCLIPSMoEVisionTransformer(with_losses=False), _x(2, 12), train=train, change=0.5)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("capture_train", [False, True], ids=["eval-to-train", "train-to-eval"])
def test_neox_sinkhorn_captured_in_one_mode_replayed_in_the_other(capture_train: bool) -> None:
    """GPT-NeoX's Sinkhorn router decides by another call in each mode (the top-k of the activated logits in eval,
    of the Sinkhorn-balanced costs under ``no_grad`` in training): routes captured in one mode (a rollout in eval)
    and replayed in the other after the routers change give the output and gradients of the recorded experts forced
    by hand in that mode."""
    model = one_layer(lambda: NeoxMoELayer("sinkhorn", 2))()
    ref = copy.deepcopy(model)
    x = _x(12, 2)
    with mr.attach(model) as session:
        model.train(capture_train)
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        perturb(model)
        perturb(ref)
        model.train(not capture_train)
        ref.train(not capture_train)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            expected.square().sum().backward()
        with torch.no_grad():
            assert not torch.equal(model(x), expected), "the changed routers choose the recorded experts anyway"
        with session.replay(routes):
            replayed = model(x)
        replayed.square().sum().backward()
        assert torch.equal(replayed, expected)
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert (p.grad is None) == (want[name].grad is None), name
            assert p.grad is None or torch.equal(p.grad, want[name].grad), name


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mom_weight_mask_replays_exactly(train: bool) -> None:
    """Mixture-of-Memories named with ``include=``: a replay forcing the recorded memories is exact (a smaller change:
    a softmax whose two forced memories both underflow renormalises 0/0, natively too).

    Once refused as a later choice from the scores: its mask of the rows each memory holds (made of the ids and of a
    zero test of the weights, no choice) is expanded as the floating rows it multiplies (``mask.expand_as(rows)``),
    and a call that made booleans with a floating tensor among its arguments was taken for a choice made from it,
    though ``expand_as`` reads only that tensor's shape."""
    assert_exact(Layers(MomAttention), _x(2, 12), train=train, change=0.5, include=MomAttention)
