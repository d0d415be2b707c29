"""Router code of the newest public MoE models and libraries, with zero configuration (see ``test_public_routers10``).

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
from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, MixtralGate, _Used, assert_exact
from tests.test_public_routers9 import _assert_refused, _pick


def _renorm(w: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    return w / (w.sum(-1, keepdim=True) + eps)


class FusedExperts(nn.Module):
    """HF v5 ``*Experts``: the experts' weights as 3-D parameters (``gate_up_proj [E, 2i, d]``, ``down_proj
    [E, d, i]``), a loop over the experts hit (``one_hot(...).permute(2, 1, 0)``, ``torch.where``), ``index_add_``;
    ``act``: the gated activation (SwiGLU, or gpt-oss's clamped one)."""

    def __init__(self, n: int = E, inter: int = 8, act: str = "swiglu") -> None:
        super().__init__()
        self.num_experts, self.act = n, act
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * inter, D) / 4)
        self.down_proj = nn.Parameter(torch.randn(n, D, inter) / 4)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        if self.act == "swiglu":
            return F.silu(gate) * up
        gate, up = gate.clamp(max=7.0), up.clamp(min=-7.0, max=7.0)
        return (up + 1) * gate * torch.sigmoid(gate * 1.702)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(x)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index.long(), num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = expert_idx[0]
            pos, tok = torch.where(expert_mask[e])
            h = self._apply_gate(F.linear(x[tok], self.gate_up_proj[e]))
            h = F.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))
        return final


class MLP(nn.Module):
    def __init__(self, d: int = D, inter: int = 12, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.up_proj, self.down_proj, self.act = nn.Linear(d, inter), nn.Linear(inter, d), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, per_group: int) -> torch.Tensor:
    """DeepSeek-V3's group selection: each group scored by the sum of its ``topk(per_group)``, ``topk_group``
    groups kept (``topk(sorted=False)``), the mask ``[T, E]`` of their experts."""
    t = scores.shape[0]
    group_scores = scores.view(t, n_group, -1).topk(per_group, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(t, n_group, E // n_group).reshape(t, -1).bool()


# ----------------------------------------------------------------------- Qwen3-Next: v5 router, shared expert gate
class Qwen3NextTopKRouter(_Used):
    """huggingface/transformers v5 ``Qwen3NextTopKRouter``: a ``weight [E, d]`` Parameter, softmax of the logits in
    fp32, ``topk``, renormalised (``norm_topk_prob``), cast to the logits' dtype; returns ``(logits, values,
    indices)``."""

    def __init__(self, k: int = 2, norm: bool = True) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = k, E, norm
        self.weight = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, D)
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        value, index = _pick(probs, self.forced, self.top_k)
        self.used = index
        if self.norm_topk_prob:
            value = value / value.sum(dim=-1, keepdim=True)
        return router_logits, value.to(router_logits.dtype), index


class Qwen3NextSparseMoeBlock(nn.Module):
    """``Qwen3NextSparseMoeBlock``: the router, fused 3-D experts, a shared expert scaled by ``sigmoid`` of its
    own one-output ``shared_expert_gate``."""

    def __init__(self, k: int = 2, norm: bool = True) -> None:
        super().__init__()
        self.gate = Qwen3NextTopKRouter(k, norm)
        self.experts = FusedExperts()
        self.shared_expert = MLP()
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, weights, index = self.gate(hidden_states)
        out = self.experts(hidden_states, index, weights)
        shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return out + shared


# ----------------------------------------------------------------------- gpt-oss: v5 router, top-k then softmax
class GptOssTopKRouter(_Used):
    """v5 ``GptOssTopKRouter``: logits with a bias, ``topk`` of the logits, a softmax over the k values (``dim=1``);
    returns ``(logits, scores, indices)``; the experts' clamped SwiGLU."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts = k, E
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.bias = nn.Parameter(torch.randn(E) / 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states.reshape(-1, D), self.weight, self.bias)
        top_value, index = _pick(router_logits, self.forced, self.top_k)
        self.used = index
        return router_logits, F.softmax(top_value, dim=1, dtype=top_value.dtype), index


class GptOssMLP(nn.Module):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.router = GptOssTopKRouter(k)
        self.experts = FusedExperts(act="gptoss")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, scores, index = self.router(hidden_states)
        return self.experts(hidden_states, index, scores)


# ----------------------------------------------------------------------- DeepSeek-V3 family, decided in the block
class DeepseekV3TopkRouter(nn.Module):
    """v5 ``DeepseekV3TopkRouter``: only the fp32 logits (``F.linear(x.float(), weight.float())``) and the
    ``e_score_correction_bias`` buffer; the choice is the block's."""

    def __init__(self) -> None:
        super().__init__()
        self.n_routed_experts = E
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.reshape(-1, D).float(), self.weight.float())


class DeepseekV3MoE(_Used):
    """v5 ``DeepseekV3MoE.route_tokens_to_experts`` (Kimi-K2, DeepSeek-V3.2, dots.llm1, Mistral-Large-3, MiMo-V2 use
    it): sigmoid scores, the router's bias added for the choice, groups scored by their ``topk(2)`` sums,
    ``topk_group`` kept, the rest ``0.0``, ``topk(top_k, sorted=False)``, the unbiased scores gathered, renormalised
    (``norm_topk_prob``), times ``routed_scaling_factor``; fused experts and shared experts."""

    def __init__(self, k: int = 3, n_group: int = 1, topk_group: int = 1, norm: bool = True, scale: float = 2.827):
        super().__init__()
        self.top_k, self.n_group, self.topk_group, self.norm_topk_prob = k, n_group, topk_group, norm
        self.routed_scaling_factor = scale
        self.gate = DeepseekV3TopkRouter()
        self.experts = FusedExperts()
        self.shared_experts = MLP()

    def route_tokens_to_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_logits.sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        mask = _group_mask(choice, self.n_group, self.topk_group, 2)
        masked = choice.masked_fill(~mask, 0.0)
        idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1] if self.forced is None else self.forced
        self.used = idx
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        idx, w = self.route_tokens_to_experts(self.gate(hidden_states))
        return self.experts(hidden_states, idx, w.type_as(hidden_states)) + self.shared_experts(hidden_states)


# ----------------------------------------------------------------------- Ling / Bailing-MoE v2: group-limited, -inf
class BailingMoeV2Gate(_Used):
    """inclusionAI Ling-2.0 ``BailingMoeV2Gate``: fp32 logits, sigmoid, ``expert_bias`` buffer for the choice,
    ``group_limited_topk`` (groups by the sum of their ``topk(2)``, the others ``-inf``), ``topk``, the unbiased
    scores gathered, renormalised, scaled; returns ``(indices, weights, logits)``, indices first."""

    def __init__(self, k: int = 3, n_group: int = 4, topk_group: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.n_group, self.topk_group = k, E, n_group, topk_group
        self.routed_scaling_factor = 2.5
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.register_buffer("expert_bias", torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits.float()).type_as(logits)
        choice = scores + self.expert_bias
        masked = choice.masked_fill(~_group_mask(choice, self.n_group, self.topk_group, 2), float("-inf"))
        idx = torch.topk(masked, k=self.top_k, dim=-1)[1] if self.forced is None else self.forced
        self.used = idx
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) if self.top_k > 1 else w
        return idx, w * self.routed_scaling_factor, logits


class BailingMoeV2SparseMoeBlock(nn.Module):
    def __init__(self, k: int = 3, n_group: int = 4, topk_group: int = 2) -> None:
        super().__init__()
        self.gate = BailingMoeV2Gate(k, n_group, topk_group)
        self.experts = Experts()
        self.shared_experts = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w, _ = self.gate(x)
        return dispatch(self.experts, x, idx, w.to(x.dtype)) + self.shared_experts(x)


# ----------------------------------------------------------------------- Step-3 (vLLM): logits into the fused layer
class Step3FusedMoE(nn.Module):
    """vLLM ``FusedMoE`` as Step-3 calls it: the block passes its own gate's fp32 logits (``need_fp32_gate``), the
    fused layer (named ``experts``, holding the experts' weights too) does softmax, ``topk(3)``, ``renormalize``."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.top_k, self.global_num_experts, self.renormalize = k, E, True
        self.w13_weight = nn.Parameter(torch.randn(E, 16, D) / 4)
        self.w2_weight = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(torch.softmax(router_logits, dim=-1, dtype=torch.float32), forced, self.top_k)
        if self.renormalize:
            w = _renorm(w)
        out = torch.zeros_like(hidden_states)
        for slot in range(self.top_k):
            e = idx[:, slot]
            gate, up = torch.einsum("tod,td->to", self.w13_weight[e], hidden_states).chunk(2, -1)
            h = torch.einsum("tdi,ti->td", self.w2_weight[e], F.silu(gate) * up)
            out = out + w[:, slot, None] * h
        return out, idx


class Step3MoEMLP(_Used):
    """Step-3's MoE in vLLM: the gate's weight read in fp32 by the block (its forward never runs), the fused layer
    passed the logits, a shared expert."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Step3FusedMoE()
        self.share_expert = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = F.linear(x.float(), self.gate.weight.float())
        out, self.used = self.experts(hidden_states=x, router_logits=router_logits, forced=self.forced)
        return out + self.share_expert(x)


# ----------------------------------------------------------------------- Hunyuan-A13B: fp32 wg, clamped renorm
class HunYuanMoEV1Gate(_Used):
    """Tencent Hunyuan-A13B ``HunYuanMoEV1Gate``: an fp32 ``wg`` Linear fed ``x.float()``, softmax, ``topk``,
    renormalised by the sum clamped to ``eps``."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.moe_topk, self.num_experts = k, E
        self.wg = nn.Linear(D, E, bias=False, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = F.softmax(self.wg(hidden_states.float()), dim=1)
        w, idx = _pick(gates, self.forced, self.moe_topk)
        self.used = idx
        return w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).eps), idx


class HunYuanMoE(nn.Module):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.gate = HunYuanMoEV1Gate(k)
        self.experts = Experts()
        self.shared_mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return self.shared_mlp(x) + dispatch(self.experts, x, idx, w.to(x.dtype))


# ----------------------------------------------------------------------- ERNIE-4.5: the bias added by a submodule
class Ernie4_5_MoeStatics(nn.Module):
    """``Ernie4_5_MoeStatics``: the ``e_score_correction_bias [1, E]`` (a frozen Parameter) added to the probs by
    its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.randn(1, E) / 10, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.e_score_correction_bias.squeeze()


class Ernie4_5_MoeTopKRouter(_Used):
    """``Ernie4_5_MoeSparseMoeBlock``'s routing: fp32 logits, softmax, ``topk`` of ``moe_statics(probs)`` (the bias
    added in a submodule's forward), the probs gathered, divided by their sum clamped to ``moe_norm_min``."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.norm_min = k, E, 1e-12
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.moe_statics = Ernie4_5_MoeStatics()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x.float(), self.weight.float()), dim=1, dtype=torch.float)
        idx = torch.topk(self.moe_statics(probs), self.top_k, dim=-1)[1] if self.forced is None else self.forced
        self.used = idx
        w = torch.gather(probs, dim=-1, index=idx)
        return w / torch.clamp(w.sum(dim=-1, keepdim=True), min=self.norm_min), idx


class ErnieBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Ernie4_5_MoeTopKRouter()
        self.experts = Experts()
        self.shared_experts = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return dispatch(self.experts, x, idx, w.to(x.dtype)) + self.shared_experts(x)


# ----------------------------------------------------------------------- Grok-2 (SGLang): softcap, residual MoE
class Grok1MoE(_Used):
    """SGLang ``Grok1MoE`` for Grok-2: router logits soft-capped (``router_logit_softcapping * tanh(l / cap)``),
    fp32 softmax, ``topk(2)``, not renormalised."""

    def __init__(self, cap: float = 3.0) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.router_logit_softcapping = 2, E, cap
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        logits = self.router_logit_softcapping * torch.tanh(logits / self.router_logit_softcapping)
        w, idx = _pick(F.softmax(logits.float(), dim=-1), self.forced, self.top_k)
        self.used = idx
        return dispatch(self.experts, x, idx, w.to(x.dtype))


class Grok2ResidualLayer(nn.Module):
    """Grok-2's residual MoE: a dense MLP beside the MoE, ``(mlp + moe) / sqrt(2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()
        self.block_sparse_moe = Grok1MoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.mlp(x) + self.block_sparse_moe(x)) / math.sqrt(2)


# ----------------------------------------------------------------------- Llama-4 (vLLM): fast_topk by max, on input
class Llama4VllmMoE(_Used):
    """vLLM ``Llama4MoE.custom_routing_function``: ``fast_topk`` (``torch.max(keepdim=True)`` for top-1, else
    ``topk``) of the logits, ``sigmoid`` of the values, the ids as int32; ``apply_router_weight_on_input``: the
    weight scales the expert's input; a shared expert."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.top_k, self.num_experts = k, E
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.shared_expert = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        if self.forced is not None:
            values, idx = logits.gather(-1, self.forced), self.forced
        elif self.top_k == 1:
            values, idx = torch.max(logits, dim=-1, keepdim=True)
        else:
            values, idx = torch.topk(logits, self.top_k, dim=-1)
        idx = idx.to(torch.int32)
        self.used = idx
        w = torch.sigmoid(values.float()).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, expert(x[tok] * w[tok, slot, None]))
        return out + self.shared_expert(x)


class DenseThenMoE(nn.Module):
    """Llama-4's interleave: a dense layer, then an MoE layer (``interleave_moe_layer_step = 2``)."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.dense = MLP()
        self.moe = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dense(x)
        return self.moe(x)


# ----------------------------------------------------------------------- AFMoE / torchtitan: bias passed as argument
class TokenChoiceTopKRouter(_Used):
    """pytorch/torchtitan ``TokenChoiceTopKRouter`` (Arcee AFMoE's ``AfmoeTokenChoiceRouter`` is the same): scores
    sigmoid or softmax in fp32; with the ``expert_bias`` the block passes in, ``topk`` of the biased scores and the
    unbiased gathered, else ``topk`` of the scores; ``route_norm``, ``route_scale``; ``histc`` counts."""

    def __init__(self, k: int = 2, score_func: str = "sigmoid", route_norm: bool = True, scale: float = 2.0):
        super().__init__()
        self.num_experts, self.top_k, self.score_func = E, k, score_func
        self.route_norm, self.route_scale = route_norm, scale
        self.gate = nn.Linear(D, E, bias=False)

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.gate(x)
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(scores.to(torch.float32))
        else:
            scores = F.softmax(scores.to(torch.float32), dim=1)
        if expert_bias is not None:
            if self.forced is None:
                _, idx = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
            else:
                idx = self.forced
            top_scores = scores.gather(dim=1, index=idx)
        else:
            top_scores, idx = _pick(scores, self.forced, self.top_k)
        self.used = idx
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        counts = torch.histc(idx.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        return top_scores, idx, counts


class TitanMoE(nn.Module):
    """torchtitan ``MoE``: the ``expert_bias`` and ``tokens_per_expert`` buffers on the block, the router's counts
    added to ``tokens_per_expert`` under ``no_grad``, the ``TokenReorderer``'s stable ``argsort``, scores applied
    before the experts (``score_before_experts``), ``scatter_add`` back; a shared expert."""

    def __init__(self, k: int = 2, score_func: str = "sigmoid", bias: bool = True, frozen_param: bool = False):
        super().__init__()
        self.top_k = k
        self.router = TokenChoiceTopKRouter(k, score_func)
        self.experts = Experts()
        self.shared_experts = MLP()
        if frozen_param:  # (kept as a frozen Parameter, so that a change of the router's bias alone is tried too)
            self.expert_bias = nn.Parameter(torch.randn(E) / 10, requires_grad=False)
        else:
            self.register_buffer("expert_bias", torch.randn(E) / 10 if bias else None)
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_scores, idx, counts = self.router(x, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        order = torch.argsort(idx.view(-1), stable=True)
        scores_sorted = top_scores.view(-1)[order]
        tokens_sorted = order // self.top_k
        experts_sorted = idx.view(-1)[order]
        routed = x[tokens_sorted] * scores_sorted.reshape(-1, 1)
        outs = torch.zeros_like(routed)
        for e, expert in enumerate(self.experts):
            sel = (experts_sorted == e).nonzero(as_tuple=True)[0]
            if sel.numel():
                outs = outs.index_copy(0, sel, expert(routed[sel]))
        out = self.shared_experts(x)
        return out.scatter_add(0, tokens_sorted.reshape(-1, 1).expand(-1, D), outs)


# ----------------------------------------------------------------------- FlexOlmo: OLMoE routing, experts opted out
class FlexOlmoSparseMoeBlock(_Used):
    """allenai FlexOlmo (``OlmoeSparseMoeBlock`` routing): fp32 softmax, ``topk``, not renormalised; the experts of
    the data owners who opted out masked to ``-inf`` before the softmax (an ``active`` buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = 2, E, False
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        active = torch.ones(E, dtype=torch.bool)
        active[5] = False
        self.register_buffer("active", active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x).masked_fill(~self.active, float("-inf"))
        w, idx = _pick(F.softmax(logits, dim=1, dtype=torch.float), self.forced, self.top_k)
        self.used = idx
        return dispatch(self.experts, x, idx, w.to(x.dtype))


# ----------------------------------------------------------------------- SmallThinker: routed on the layer's input
class SmallThinkerMoeBlock(_Used):
    """SJTU-IPADS SmallThinker ``SmallThinkerMoeBlock``: the ``primary_router`` fed the decoder layer's *input*
    (before attention, so that experts can be prefetched), the experts fed the post-attention states; ``topk`` of
    the logits, then ``softmax`` of the values or ``sigmoid`` renormalised."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.num_active_primary_experts, self.num_primary_experts, self.apply_softmax = 2, E, softmax
        self.primary_router = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, router_input: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        logits, idx = _pick(self.primary_router(router_input), self.forced, self.num_active_primary_experts)
        self.used = idx
        if self.apply_softmax:
            w = F.softmax(logits.float(), dim=-1)
        else:
            w = _renorm(torch.sigmoid(logits.float()))
        return dispatch(self.experts, hidden_states, idx, w.to(hidden_states.dtype))


class SmallThinkerDecoderLayer(nn.Module):
    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.self_attn = nn.Linear(D, D)
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.block_sparse_moe = SmallThinkerMoeBlock(softmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_input = x
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.block_sparse_moe(router_input, self.post_attention_layernorm(h)) - x


# ----------------------------------------------------------------------- Nemotron-H: latent MoE, relu2 experts
class NemotronHTopkRouter(_Used):
    """NVIDIA Nemotron-H / Nemotron-3 ``NemotronHTopkRouter``: DeepSeek-V3 routing in the router module (fp32 logits,
    sigmoid, ``e_score_correction_bias``, one group), returns ``(indices, weights)``."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts, self.routed_scaling_factor = 2, E, 2.5
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        masked = choice.masked_fill(~_group_mask(choice, 1, 1, 2), 0.0)
        idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1] if self.forced is None else self.forced
        self.used = idx
        return idx, _renorm(scores.gather(1, idx), 1e-20) * self.routed_scaling_factor


class NemotronHMoE(nn.Module):
    """``NemotronHMOE`` with a latent MoE: the routed experts run in a latent space (``fc1_latent_proj`` down,
    ``fc2_latent_proj`` up, the latent as wide as the expert count), non-gated squared-ReLU experts; a shared expert
    on the full states."""

    def __init__(self, latent: int = 8) -> None:
        super().__init__()
        self.gate = NemotronHTopkRouter()
        self.fc1_latent_proj = nn.Linear(D, latent, bias=False)
        self.fc2_latent_proj = nn.Linear(latent, D, bias=False)
        self.experts = nn.ModuleList(nn.Linear(latent, latent) for _ in range(E))
        self.shared_experts = MLP(act=lambda t: F.relu(t).square())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x)
        z = self.fc1_latent_proj(x)
        out = torch.zeros_like(z)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, w[tok, slot, None] * F.relu(expert(z[tok])).square())
        return self.fc2_latent_proj(out) + self.shared_experts(x)


# ----------------------------------------------------------------------- LFM2-MoE: sigmoid, expert_bias, scaling
class Lfm2MoeSparseMoeBlock(_Used):
    """LiquidAI ``Lfm2MoeSparseMoeBlock``: sigmoid of the logits, ``expert_bias`` (a buffer) added for the choice,
    ``topk``, the unbiased scores gathered, ``type_as`` the logits, renormalised (``+ 1e-6``), times
    ``routed_scaling_factor``."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.routed_scaling_factor = 2, E, 1.5
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("expert_bias", torch.randn(E) / 10)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        weights = logits.sigmoid()
        idx = torch.topk(weights + self.expert_bias, k=self.top_k, dim=-1)[1] if self.forced is None else self.forced
        self.used = idx
        w = torch.gather(weights, dim=1, index=idx).type_as(logits)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-6) * self.routed_scaling_factor
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- Megatron group top-k as wide as k
class MegatronGroupTopKRouter(_Used):
    """Megatron-core ``group_limited_topk`` with ``topk=4, num_groups=2, group_topk=1``: each group scored by its
    ``topk(topk // group_topk)``, as wide as the decision (``topk(4)`` over a group of 4), the other group ``-inf``,
    the top-4 of the masked softmax scores; the values read from the scores before the mask when forced (Megatron's
    own router replay gathers the unmasked scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.topk, self.num_groups, self.group_topk, self.num_experts = 4, 2, 1, E
        self.weight = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        t = scores.shape[0]
        group_scores = scores.view(t, self.num_groups, -1).topk(self.topk // self.group_topk, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.group_topk, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(t, self.num_groups, E // self.num_groups).reshape(t, -1).bool()
        if self.forced is None:
            probs, idx = torch.topk(scores.masked_fill(~mask, float("-inf")), k=self.topk, dim=-1)
        else:
            probs, idx = scores.gather(1, self.forced), self.forced
        self.used = idx
        return probs, idx


class MegatronBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = MegatronGroupTopKRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, idx = self.router(x)
        return dispatch(self.experts, x, idx, probs)


# ----------------------------------------------------------------------- SGLang: a fused shared expert slot
class SglangFusedSharedTopK(_Used):
    """SGLang ``biased_grouped_topk_impl`` with ``num_fused_shared_experts=1``: a ``topk`` of ``top_k + 1`` over
    the routed experts, whose last column is then overwritten in place with the shared expert's id (``E``, one past
    the routed experts) and its weight with the routed weights' sum over ``routed_scaling_factor``."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.routed_scaling_factor = 2, E, 2.5
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("correction_bias", torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).sigmoid()
        if self.forced is None:
            _, idx = torch.topk(scores + self.correction_bias, k=self.top_k + 1, dim=-1, sorted=True)
        else:  # the recorded rows, and any column for the slot overwritten below
            idx = torch.cat([self.forced, self.forced[:, :1]], dim=1)
        w = scores.gather(1, idx.clone())  # (under no_grad upstream: the gather's saved ids are written next)
        idx[:, -1] = self.num_experts
        w = torch.cat([w[:, :-1], w[:, :-1].sum(-1, keepdim=True) / self.routed_scaling_factor], dim=-1)
        self.used = idx
        return w / w[:, :-1].sum(-1, keepdim=True) * self.routed_scaling_factor, idx


def _shared_last(rows: torch.Tensor) -> torch.Tensor:
    """The experts that recorded rows of SGLang's fused shared expert slot name: the routed experts recorded (the
    top-k's last column, overwritten before any expert reads it, is not part of the choice), then the shared one."""
    return torch.cat([rows.long(), torch.full((rows.shape[0], 1), E)], dim=1)


class SglangSharedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.topk = SglangFusedSharedTopK()
        self.experts = Experts(E + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.topk(x)
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- vLLM fused_topk_bias: logits passed in
class VllmFusedTopKBias(nn.Module):
    """vLLM ``fused_topk_bias`` (ERNIE-4.5 and MiniMax-M2 in vLLM): the logits passed in by the block, softmax,
    ``e_score_correction_bias`` for the choice, ``topk(sorted=False)``, the unbiased gathered, ``renormalize``; ids
    cast to int32 at once."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.global_num_experts = 2, E
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)

    def forward(
        self, gating_output: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = gating_output.softmax(dim=-1)
        choice = scores.view(-1, E) + self.e_score_correction_bias.unsqueeze(0)
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1] if forced is None else forced
        w = scores.gather(1, idx)
        return w / w.sum(dim=-1, keepdim=True), idx.to(torch.int32)


class VllmBiasBlock(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.select = VllmFusedTopKBias()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.select(self.gate(x), self.forced)
        self.used = idx
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- the choice under no_grad
class NoGradChoiceGate(_Used):
    """The choice made under ``torch.no_grad()`` (as several research routers and the DeepSeek reference write the
    group selection and top-k), the weights gathered outside it from the grad-carrying scores."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        with torch.no_grad():
            idx = probs.topk(self.top_k, dim=-1).indices if self.forced is None else self.forced
        self.used = idx
        return _renorm(probs.gather(1, idx)), idx


class GateBlock(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- MiniCPM-MoE / DeepSeek-VL2: simple gates
class MiniCPMMoE(_Used):
    """OpenBMB MiniCPM-MoE-8x2B ``MiniCPMMoE``: a ``gate`` Linear, softmax in fp32, ``topk``, renormalised, the
    per-expert loop over ``expert_mask``; the layer's output scaled by ``scale_depth / sqrt(num_layers)``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.num_experts_per_tok = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.scale = 1.4 / math.sqrt(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(F.softmax(self.gate(x), dim=1, dtype=torch.float), self.forced, self.num_experts_per_tok)
        self.used = idx
        return dispatch(self.experts, x, idx, _renorm(w).to(x.dtype)) * self.scale


class DeepSeekVL2Gate(_Used):
    """DeepSeek-VL2 ``MoEGate`` with ``topk_method="greedy"`` and ``scoring_func="softmax"`` over ``[batch, seq, d]``
    inputs: ``topk(sorted=False)`` of the softmax, not renormalised, times ``routed_scaling_factor``."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts, self.routed_scaling_factor = 2, E, 1.0
        self.weight = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states.view(-1, hidden_states.shape[-1])
        scores = F.linear(h.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)
        if self.forced is None:
            w, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            w, idx = scores.gather(1, self.forced), self.forced
        self.used = idx
        return w * self.routed_scaling_factor, idx


class DeepSeekVL2MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = DeepSeekVL2Gate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        flat = x.reshape(-1, D)
        return dispatch(self.experts, flat, idx, w.to(x.dtype)).view_as(x)


# ----------------------------------------------------------------------- torchtitan: debug round-robin routing
class TitanDebugBalanceRouter(TokenChoiceTopKRouter):
    """torchtitan ``_debug_force_load_balance``: the ``topk`` still runs, then its indices are replaced by a
    round-robin assignment (``arange(n * k) % E``) and the scores gathered there: the top-k decides nothing."""

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(self.gate(x).float())
        top_scores, idx = torch.topk(scores, k=self.top_k, dim=1)
        idx = torch.arange(x.shape[0] * self.top_k).reshape(x.shape[0], self.top_k) % self.num_experts
        top_scores = scores.gather(dim=1, index=idx)
        self.used = idx
        counts = torch.histc(idx.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        return top_scores * self.route_scale, idx, counts


class TitanDebugMoE(TitanMoE):
    def __init__(self) -> None:
        super().__init__(2, "sigmoid", False)
        self.router = TitanDebugBalanceRouter(2, "sigmoid")


# ----------------------------------------------------------------------- Gemma-3n AltUp: a "router" with no choice
class Gemma3nAltUp(nn.Module):
    """google Gemma-3n ``Gemma3nTextAltUp``: a ``modality_router`` Linear (``[altup_num_inputs, d]``) after its own
    ``router_norm``, ``tanh`` of its scaled output the coefficients that mix the predicted streams: named a router,
    weighted densely, no expert choice."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.altup_num_inputs, self.altup_active_idx = n, 0
        self.router_norm = nn.LayerNorm(D)
        self.modality_router = nn.Linear(D, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.register_buffer("router_input_scale", torch.tensor(D**-1.0))

    def compute_router_modalities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.modality_router(self.router_norm(x) * self.router_input_scale))

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        modalities = self.compute_router_modalities(streams[self.altup_active_idx])
        coefs = self.prediction_coefs(modalities).reshape(-1, self.altup_num_inputs, self.altup_num_inputs)
        return streams + torch.einsum("ntd,tnm->mtd", streams, coefs)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        innovation = activated - predictions[self.altup_active_idx]
        coefs = self.correction_coefs(self.compute_router_modalities(activated)) + 1.0
        return predictions + coefs.permute(1, 0).unsqueeze(-1) * innovation


class AltUpMoELayer(nn.Module):
    """AltUp's four streams around an MoE block (Gemma-3n has no MoE; the streams beside one test discovery)."""

    def __init__(self) -> None:
        super().__init__()
        self.altup = Gemma3nAltUp()
        self.mlp = Qwen3NextSparseMoeBlock()
        self.altup_projections = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = torch.stack([x] + [p(x) for p in self.altup_projections])
        predictions = self.altup.predict(streams)
        active = predictions[0]
        return self.altup.correct(predictions, active + self.mlp(active)).mean(0) - x


# ----------------------------------------------------------------------- Mixture-of-Depths beside the MoE
class MixtureOfDepthsMoE(nn.Module):
    """Mixture-of-Depths (Raposo et al. 2024) around an MoE block: a one-output ``router`` scores each token, a
    ``topk(capacity, dim=1)`` over the sequence picks the tokens the block processes (its output scaled by the
    router's weight), the others skip it. With as many positions as experts and a capacity of k, the sequence top-k
    has the expert decision's signature."""

    def __init__(self, capacity: int = 2) -> None:
        super().__init__()
        self.capacity = capacity
        self.router = nn.Linear(D, 1, bias=False)
        self.block = Qwen3NextSparseMoeBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        weights = self.router(x).squeeze(-1)  # [b, s]
        top_w, top_pos = torch.topk(weights, self.capacity, dim=1, sorted=False)
        top_pos, order = top_pos.sort(dim=1)
        top_w = top_w.gather(1, order)
        picked = x.gather(1, top_pos[..., None].expand(-1, -1, D))
        processed = self.block(picked.reshape(-1, D)).view(b, self.capacity, D) * top_w[..., None]
        return torch.zeros_like(x).scatter_add(1, top_pos[..., None].expand(-1, -1, D), processed)


# ----------------------------------------------------------------------- DeepSeek-V3.2: DSA indexer beside the MoE
class DsaDecoderLayer(nn.Module):
    """DeepSeek-V3.2 / GLM-5 decoder layer in small: a lightning indexer scores the earlier keys (causal ``-inf``),
    ``topk(index_topk)`` of them picks the keys attended to, then the DeepSeek-V3 MoE. With as many positions as
    experts and ``index_topk`` equal to the MoE's k, the indexer's top-k has the decision's signature."""

    def __init__(self, index_topk: int = 3) -> None:
        super().__init__()
        self.index_topk = index_topk
        self.wq_indexer = nn.Linear(D, D, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.mlp = DeepseekV3MoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, key, value = (self.qkv(x) / D).chunk(3, -1)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        index_score = (self.wq_indexer(x) @ x.transpose(1, 2)).masked_fill(~causal, float("-inf"))
        _, picked = index_score.topk(min(self.index_topk, s), dim=-1)  # [b, s, k] key positions
        keys = torch.gather(key.unsqueeze(1).expand(b, s, s, D), 2, picked[..., None].expand(-1, -1, -1, D))
        vals = torch.gather(value.unsqueeze(1).expand(b, s, s, D), 2, picked[..., None].expand(-1, -1, -1, D))
        allowed = torch.gather(causal.expand(b, s, s), 2, picked)
        att = torch.einsum("bsd,bskd->bsk", q, keys).masked_fill(~allowed, float("-inf")).softmax(-1)
        h = x + torch.einsum("bsk,bskd->bsd", att, vals)
        return h + self.mlp(h.reshape(-1, D)).view_as(h) - x


def _three_d() -> torch.Tensor:
    return _x(3, 8)


class Pair(nn.Module):
    """Two residual MoE layers of different structures (one case tries both, at the cost of one)."""

    def __init__(self, first: Callable[[], nn.Module], second: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([first(), second()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _bf16_pair() -> nn.Module:
    return Pair(DeepseekV3MoE, Lfm2MoeSparseMoeBlock).to(torch.bfloat16)


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change``, ``as_used`` and attach options)
    "qwen3-next-v5-router-shared-gate": (lambda: Layers(Qwen3NextSparseMoeBlock), _x, {"change": 0.3}),
    "qwen3-next-top1-unnormalised+gpt-oss-top4": (
        lambda: Pair(lambda: Qwen3NextSparseMoeBlock(1, False), lambda: GptOssMLP(4)),
        _x,
        {"change": 0.3},
    ),
    "kimi-k2-block-decides-one-group-top3": (lambda: Layers(DeepseekV3MoE), _x, {}),
    "deepseek-v32-four-groups-two-kept": (lambda: Layers(lambda: DeepseekV3MoE(2, 4, 2, scale=2.5)), _x, {}),
    "dots-llm1-top4+mistral-large3-two-groups-unnormalised": (
        lambda: Pair(lambda: DeepseekV3MoE(4, 1, 1, scale=2.5), lambda: DeepseekV3MoE(2, 2, 1, False, 1.0)),
        _x,
        {},
    ),
    "bailing-v2-groups-inf-indices-first": (lambda: Layers(BailingMoeV2SparseMoeBlock), _x, {}),
    "bailing-v2-top1+hunyuan-a13b-top1": (
        lambda: Pair(lambda: BailingMoeV2SparseMoeBlock(1, 2, 1), lambda: HunYuanMoE(1)),
        _x,
        {},
    ),
    "step3-vllm-fused-layer-logits-in": (lambda: Layers(Step3MoEMLP), _x, {"change": 0.3}),
    "minicpm-moe+hunyuan-a13b-fp32-wg": (lambda: Pair(MiniCPMMoE, HunYuanMoE), _x, {}),
    "ernie45-bias-in-a-submodule": (lambda: Layers(ErnieBlock), _x, {}),
    "grok2-softcap-residual-moe+torchtitan-bias-frozen-parameter": (
        lambda: Pair(Grok2ResidualLayer, lambda: TitanMoE(frozen_param=True)),
        _x,
        {},
    ),
    "llama4-vllm-fast-topk-max-on-input": (lambda: Layers(lambda: DenseThenMoE(Llama4VllmMoE)), _x, {}),
    "llama4-vllm-top2+smallthinker-softmax": (
        lambda: Pair(lambda: DenseThenMoE(lambda: Llama4VllmMoE(2)), lambda: SmallThinkerDecoderLayer(True)),
        _x,
        {},
    ),
    "torchtitan-softmax-no-bias+afmoe-sigmoid-bias-top3": (
        lambda: Pair(lambda: TitanMoE(2, "softmax", False), lambda: TitanMoE(3, "sigmoid")),
        _x,
        {},
    ),
    "choice-under-no-grad+flexolmo-opted-out-expert": (
        lambda: Pair(lambda: GateBlock(NoGradChoiceGate()), FlexOlmoSparseMoeBlock),
        _x,
        {},
    ),
    "smallthinker-router-on-layer-input-sigmoid": (lambda: Layers(SmallThinkerDecoderLayer), _x, {"change": 0.3}),
    "nemotron-h-latent-moe": (lambda: Layers(NemotronHMoE), _x, {}),
    "lfm2-moe-expert-bias+vllm-fused-topk-bias-logits-in": (
        lambda: Pair(Lfm2MoeSparseMoeBlock, VllmBiasBlock),
        _x,
        {},
    ),
    "megatron-group-topk-as-wide-as-k": (lambda: Layers(MegatronBlock), _x, {}),
    "sglang-fused-shared-expert-slot-named": (
        lambda: Layers(SglangSharedBlock),
        _x,
        {"as_used": _shared_last, "include": SglangFusedSharedTopK},
    ),
    "deepseek-vl2-greedy-3d": (lambda: Layers(DeepSeekVL2MoE), _three_d, {}),
    "gemma3n-altup-modality-router-beside": (lambda: Layers(AltUpMoELayer), _x, {"change": 0.3}),
    # (the changes reach Mixture-of-Depths' own router: it chooses other tokens at replay, which is refused)
    "mixture-of-depths-seq-as-wide-as-experts": (
        lambda: Layers(MixtureOfDepthsMoE),
        lambda: _x(3, E),
        {"change": 0.3, "refused": r"'layers\.0' chooses.*other tokens"},
    ),
    "dsa-indexer-beside-seq-as-wide-as-experts": (lambda: Layers(DsaDecoderLayer), lambda: _x(3, E), {"change": 0.3}),
    "dsa-indexer+mixture-of-depths-seq-wider": (
        lambda: Pair(DsaDecoderLayer, MixtureOfDepthsMoE),
        lambda: _x(2, 12),
        {"change": 0.3, "refused": r"'layers\.1' chooses.*other tokens"},
    ),
    "kimi-k2+lfm2-bf16": (_bf16_pair, lambda: _x().bfloat16(), {"change": 0.3}),
    "ernie45+qwen3-next-train": (lambda: Pair(ErnieBlock, Qwen3NextSparseMoeBlock), _x, {"train": True, "change": 0.3}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Qwen3-Next's v5 router and gated shared expert, gpt-oss's top-k then softmax, the DeepSeek-V3 block-level
    choice of Kimi-K2, DeepSeek-V3.2, dots.llm1 and Mistral-Large-3 (in bf16 too), Ling-2.0's group-limited gate,
    Step-3's logits passed into vLLM's fused layer, Hunyuan-A13B, ERNIE-4.5's bias added by a submodule, Grok-2's
    soft-capped residual MoE, Llama-4's vLLM ``fast_topk``, torchtitan's and AFMoE's bias passed as an argument,
    FlexOlmo's opted-out experts, SmallThinker's router on the layer's input, Nemotron-H's latent MoE, LFM2-MoE, a
    Megatron group top-k as wide as the decision, SGLang's fused shared expert slot, vLLM's ``fused_topk_bias``, a
    choice under ``no_grad``, MiniCPM-MoE, DeepSeek-VL2; a DSA indexer, Mixture-of-Depths and Gemma-3n's AltUp
    beside them (top-k's of the decision's signature over positions): every router found and nothing else, the
    recorded rows the experts used, and a replay after the routers change those experts forced by hand, in output
    and gradients. Where the change makes Mixture-of-Depths around an MoE block choose other tokens (``refused``),
    the replay is refused, naming it, rather than forcing the recorded rows on those tokens."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    refused = opts.pop("refused", None)
    if refused is None:
        assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]
        return
    with pytest.raises(mr.TokenMismatchError, match=str(refused)):
        assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the refusal says, options: ``train`` and attach options)
    "torchtitan-debug-round-robin": (
        lambda: Layers(TitanDebugMoE),
        _x,
        r"'layers.0.router': no decision-like call in its forward changes the output when its choice changes",
        {},
    ),
    "sglang-fused-shared-expert-slot-not-found": (lambda: Layers(SglangSharedBlock), _x, "no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_choices_no_recorded_row_holds_are_refused(case: str) -> None:
    """torchtitan's debug round-robin routing (its top-k decides nothing); SGLang's fused shared expert slot (one
    expert more than the gate scores) not found without ``include``: refused, saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    _assert_refused(make(), x(), match, train=train, **opts)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- the decision in the decoder layer
class EarlyRouterBlock(nn.Module):
    """An MoE block that holds the router but is passed the weights and ids: its forward makes no choice."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.primary_router = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return dispatch(self.experts, h, idx, w)


class EarlyRouterLayer(_Used):
    """An early router (the choice made from the layer's input before attention, so that the experts' weights can
    be fetched while attention runs, the aim of on-device MoE designs such as SmallThinker's): the decoder layer
    calls its MoE block's ``primary_router``, takes the ``topk`` itself, sigmoid weights renormalised, and passes
    the block the weights and ids."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(D, D)
        self.block_sparse_moe = EarlyRouterBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, idx = _pick(self.block_sparse_moe.primary_router(x), self.forced, 2)
        self.used = idx
        h = x + self.self_attn(x)
        return h + self.block_sparse_moe(h, _renorm(torch.sigmoid(values)), idx) - x


@pytest.mark.reliability("silent replays")
def test_a_decision_the_decoder_layer_takes_from_its_blocks_router_is_found() -> None:
    """The layer, not the block, takes the top-k of the block's router: with zero configuration the decision is
    intercepted in the layer's forward, and the replay is exact (once refused at attach as soft routing, "its block
    calls no topk")."""
    assert_exact(Layers(EarlyRouterLayer), _x(), change=0.3)


# ----------------------------------------------------------------------- k-sparse expert activations
class KSparseMLP(nn.Module):
    """An expert whose hidden activation is k-sparse (the top-2 of its hidden units kept, Q-Sparse-style activation
    sparsity), its hidden width equal to the expert count."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(D, E), nn.Linear(E, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        v, i = h.topk(2, dim=-1)
        return self.down_proj(torch.zeros_like(h).scatter(-1, i, v))


class KSparseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = MixtralGate()
        self.experts = nn.ModuleList(KSparseMLP() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_k_sparse_expert_activations_as_wide_as_the_expert_count_are_not_taken_for_a_decision() -> None:
    """The experts' own top-k over their hidden units chooses no expert: the gate's replay is exact (once refused as a
    decision outside every attached router: a top-2 over as many hidden units as the block has experts)."""
    assert_exact(Layers(KSparseBlock), _x(), change=0.3)
