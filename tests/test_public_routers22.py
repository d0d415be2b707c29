"""MoE code of inference servers, training frameworks and hub models, with zero configuration (see
``test_public_routers19``).

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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E, Experts, dispatch, perturb
from tests.test_public_routers2 import _forced_by_hand, _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused


def _pick(scores: torch.Tensor, forced: torch.Tensor | None, k: int, **topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's own ``topk`` of ``scores`` (``topk``: its keyword arguments), or the forced rows and their
    scores."""
    if forced is None:
        return torch.topk(scores, k, dim=-1, **topk)
    return scores.gather(-1, forced), forced


# ----------------------------------------------------------------------- TGI: every expert run, weights scattered
# huggingface/text-generation-inference server/text_generation_server/layers/moe/__init__.py (``DenseMoELayer``, the
# layer used where no fused kernel fits the weights) and models/custom_modeling/flash_mixtral_modeling.py
# (``BlockSparseMoE``): the block's ``gate`` Linear gives the logits, passed as ``gating_output=`` to the MoE layer;
# ``fused_topk`` (softmax in fp32, ``topk``, renormalised) or ``grouped_topk`` (DeepSeek-V2's: groups by their best
# score, ``topk_group`` kept, the rest ``0.0``, ``topk``) decides; the k weights are cast to the input's dtype and
# scattered into a ``[tokens, E]`` zero tensor; then every expert runs on every token (experts held in plain Python
# lists of per-expert projections, not a ``ModuleList``) and is added weighted by its column.
class _TgiLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / 4)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return F.linear(x, self.weight)


class TgiDenseMoELayer(nn.Module):
    """TGI ``DenseMoELayer``: the choice of ``fused_topk`` or ``grouped_topk`` over ``gating_output``."""

    def __init__(self, topk: int = 2, n_expert_group: int | None = None, topk_group: int | None = None) -> None:
        super().__init__()
        self.n_experts, self.topk, self.renormalize = E, topk, True
        self.n_expert_group, self.topk_group = n_expert_group, topk_group
        self.act = F.silu
        # (as upstream: plain lists, so no module holds the experts and their weights are no parameters of the model)
        self.gate_proj = [_TgiLinear(D, 12) for _ in range(E)]
        self.up_proj = [_TgiLinear(D, 12) for _ in range(E)]
        self.down_proj = [_TgiLinear(12, D) for _ in range(E)]

    def _fused_topk(
        self, gating_output: torch.Tensor, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        routing_weights = torch.softmax(gating_output, dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = _pick(routing_weights, forced, self.topk)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights, topk_ids

    def _grouped_topk(
        self, gating_output: torch.Tensor, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.n_expert_group is not None and self.topk_group is not None
        scores = torch.softmax(gating_output, dim=-1)
        num_token = scores.shape[0]
        group_scores = scores.view(num_token, self.n_expert_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_token, self.n_expert_group, scores.shape[-1] // self.n_expert_group)
            .reshape(num_token, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        if forced is None:
            topk_weights, topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)
        else:
            # (an exact replay reads a forced expert's weight before the group mask, as moe_replay does)
            topk_weights, topk_ids = scores.gather(-1, forced), forced
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights.to(torch.float32), topk_ids.to(torch.int32)

    def forward(
        self, x: torch.Tensor, *, gating_output: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = x.shape
        x = x.view(-1, input_shape[-1])
        if self.n_expert_group is not None and self.topk_group is not None:
            topk_weights, topk_ids = self._grouped_topk(gating_output, forced)
        else:
            topk_weights, topk_ids = self._fused_topk(gating_output, forced)
            topk_weights = topk_weights.to(x.dtype)
        weights = torch.zeros(topk_ids.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        weights.scatter_(1, topk_ids.long(), topk_weights.to(weights.dtype))
        out = torch.zeros_like(x)
        for i in range(self.n_experts):
            h = self.act(self.gate_proj[i](x)) * self.up_proj[i](x)
            h = self.down_proj[i](h, reduce=False)
            out += h * weights[:, i].view(-1, 1)
        return out.view(input_shape), topk_ids


class TgiBlockSparseMoE(_Used):
    """TGI ``BlockSparseMoE``: ``gate`` logits over the flattened tokens, the MoE layer passed them."""

    def __init__(self, n_expert_group: int | None = None, topk_group: int | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.moe = TgiDenseMoELayer(2, n_expert_group, topk_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x.view(-1, x.shape[-1]))
        out, self.used = self.moe(x, gating_output=router_logits, forced=self.forced)
        return out


# TGI's ``SparseMoELayer`` (``UnquantizedSparseMoELayer`` in layers/moe/unquantized.py) instead passes the logits to
# the fused ``fused_moe`` kernel, which chooses and runs the experts out of sight (a custom operator here), the
# layer's ``topk`` and ``n_experts`` on its inner ``moe``.
@torch.library.custom_op("moe_replay_tests22::tgi_fused_moe", mutates_args=())
def tgi_fused_moe(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool
) -> torch.Tensor:
    w = torch.softmax(gating_output, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(w, topk, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for slot in range(topk):
        e = topk_ids[:, slot]
        gate, up = torch.einsum("tod,td->to", w1[e], x).chunk(2, -1)
        out = out + topk_weights[:, slot, None].to(x.dtype) * torch.einsum("tdi,ti->td", w2[e], F.silu(gate) * up)
    return out


class TgiUnquantizedSparseMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_experts, self.topk, self.renormalize = E, 2, True
        self.gate_up_proj = nn.Parameter(torch.randn(E, 16, D) / 4)
        self.down_proj = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(self, x: torch.Tensor, *, gating_output: torch.Tensor) -> torch.Tensor:
        return tgi_fused_moe(x, self.gate_up_proj, self.down_proj, gating_output, self.topk, self.renormalize)


class TgiSparseMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = TgiUnquantizedSparseMoELayer()

    def forward(self, x: torch.Tensor, *, gating_output: torch.Tensor) -> torch.Tensor:
        return self.moe(x, gating_output=gating_output)


class TgiSparseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.moe = TgiSparseMoELayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])
        return self.moe(flat, gating_output=self.gate(flat)).view(x.shape)


# ----------------------------------------------------------------------- NeMo Automodel: Gate score functions
# NVIDIA-NeMo/Automodel nemo_automodel/components/moe/layers.py (``Gate``, ``_GateRoutingCore``, ``FakeBalancedGate``,
# ``MoE``): the gate's ``weight [E, d]`` Parameter, logits by ``F.linear``; ``_route_scores`` by ``score_func``:
# ``softmax`` (``softmax_before_topk``: softmax, ``topk``, the probs gathered; else the ``topk`` of the raw logits and
# a softmax over the k values), ``softmax_with_bias`` (softmax, the correction bias added for the choice, groups by
# their ``topk(2)`` sums multiplied by a 0/1 mask, ``topk``, the unbiased probs gathered), ``sqrtsoftplus``
# (DeepSeek-V4's ``sqrt(softplus(logits))``, bias added for the choice), ``sigmoid`` (groups by ``amax`` without a
# bias, masked by multiplication); renormalised (``norm_topk_prob``), times ``route_scale``. In training, the expert
# load (a scatter of the ids) accumulates for the bias update and, with ``aux_loss_coeff``, the load-balancing loss
# rides on the weights through ``MoEAuxLossAutoScaler``. With
# ``use_routing_core`` (the gate's routing captured as a CUDA graph) the choice runs in a parameterless child module
# whose forward is passed the gate itself and calls back ``gate._route_scores``. The gate returns ``(weights,
# indices, aux_loss)`` from ``forward(x, token_mask, cp_mesh)``. ``FakeBalancedGate`` (performance experiments) sends
# token ``t``'s slots to experts ``(t * k + j) % E`` with uniform weights, whatever the input.
class AutomodelRoutingCore(nn.Module):
    """``_GateRoutingCore``: no parameters, the gate passed in as a control argument."""

    def forward(self, scores: torch.Tensor, gate: AutomodelGate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gate._route_scores(scores)


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """``MoEAuxLossAutoScaler``: the weights passed through, the aux loss given a unit gradient in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (aux_loss,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad_output, torch.ones_like(aux_loss)


class AutomodelGate(_Used):
    def __init__(
        self,
        score_func: str = "softmax",
        softmax_before_topk: bool = True,
        n_groups: int = 1,
        topk_groups: int = 1,
        bias: bool = False,
        routing_core: bool = False,
        topk: int = 2,
        aux_loss_coeff: float = 0.0,
    ) -> None:
        super().__init__()
        self.aux_loss_coeff, self.bias_update_factor = aux_loss_coeff, 0.001 if aux_loss_coeff else 0.0
        self._cumulative_expert_load: torch.Tensor | None = None
        self.n_experts, self.topk, self.score_func = E, topk, score_func
        self.softmax_before_topk, self.n_groups, self.topk_groups = softmax_before_topk, n_groups, topk_groups
        self.route_scale, self.norm_topk_prob, self.score_dtype = 2.5, True, torch.float32
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.bias = None
        if bias:
            self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)
        else:
            self.e_score_correction_bias = None
        self.routing_core = AutomodelRoutingCore()
        self.use_routing_core = routing_core

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        indices = group_scores.topk(self.topk_groups, dim=-1)[1]
        mask = torch.zeros_like(scores[..., 0]).scatter_(1, indices, True)
        return (scores * mask.unsqueeze(-1)).flatten(1)

    def _route_scores(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = scores.size(0)
        correction_bias = self.e_score_correction_bias
        if self.score_func == "softmax":
            if self.softmax_before_topk:
                scores = scores.softmax(dim=-1, dtype=self.score_dtype)
                original_scores = scores
                weights, indices = _pick(scores, self.forced, self.topk)
            else:
                values, indices = _pick(scores, self.forced, self.topk)
                weights = values.softmax(dim=1, dtype=self.score_dtype)
                original_scores = scores.softmax(dim=-1, dtype=self.score_dtype)
        elif self.score_func == "softmax_with_bias":
            scores = scores.softmax(dim=-1, dtype=self.score_dtype)
            original_scores = scores
            choice = scores + correction_bias if correction_bias is not None else scores
            if self.n_groups > 1:
                choice = choice.view(num_tokens, self.n_groups, -1)
                choice = self._group_mask(choice, choice.topk(2, dim=-1)[0].sum(dim=-1))
            indices = torch.topk(choice, self.topk, dim=-1)[1] if self.forced is None else self.forced
            weights = original_scores.gather(1, indices)
        elif self.score_func == "sqrtsoftplus":
            scores = torch.sqrt(F.softplus(scores.float()))
            original_scores = scores
            if correction_bias is not None:
                scores = scores + correction_bias
            indices = torch.topk(scores, self.topk, dim=-1)[1] if self.forced is None else self.forced
            weights = original_scores.gather(1, indices)
        else:
            scores = torch.sigmoid(scores.to(dtype=self.score_dtype))
            original_scores = scores
            if correction_bias is not None:
                scores = scores + correction_bias
            if self.n_groups > 1:
                scores = scores.view(num_tokens, self.n_groups, -1)
                group_scores = scores.amax(dim=-1) if correction_bias is None else scores.topk(2, dim=-1)[0].sum(-1)
                scores = self._group_mask(scores, group_scores)
            indices = torch.topk(scores, self.topk, dim=-1)[1] if self.forced is None else self.forced
            weights = original_scores.gather(1, indices)
        self.used = indices
        if self.norm_topk_prob and self.topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            original_scores = original_scores / (original_scores.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, original_scores

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor, cp_mesh: object | None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        scores = F.linear(x, self.weight.to(dtype=x.dtype))
        if self.use_routing_core:
            weights, indices, original_scores = self.routing_core(scores, self)
        else:
            weights, indices, original_scores = self._route_scores(scores)
        if self.bias_update_factor > 0 or self.aux_loss_coeff > 0:
            expert_mask = indices.new_zeros((indices.shape[0], self.n_experts))
            contribution = token_mask.to(dtype=expert_mask.dtype).unsqueeze(-1).expand(-1, indices.shape[1])
            expert_load = expert_mask.scatter_(dim=1, index=indices, src=contribution).sum(dim=0)
            if self.bias_update_factor > 0 and self.training:
                load = expert_load.detach()
                self._cumulative_expert_load = (
                    load if self._cumulative_expert_load is None else self._cumulative_expert_load + load
                )
            if self.aux_loss_coeff > 0 and self.training:
                context_length = torch.clamp(token_mask.sum(), min=1)
                expert_scores = (original_scores.float() * token_mask.unsqueeze(-1)).sum(dim=0)
                f_i = expert_load.float() * self.n_experts / (self.topk * context_length)
                aux_loss = torch.sum(f_i * expert_scores / context_length)
                weights = MoEAuxLossAutoScaler.apply(weights, self.aux_loss_coeff * aux_loss)
        return weights.type_as(x), indices, None


class AutomodelFakeBalancedGate(nn.Module):
    """``FakeBalancedGate`` with ``noise=0``: round-robin experts, uniform weights."""

    def __init__(self, topk: int = 2) -> None:
        super().__init__()
        self.n_routed_experts, self.n_activated_experts, self.skip_first_n_experts = E, topk, 0

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor, cp_mesh: object | None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        n_tokens, a_exp = x.size(0), self.n_activated_experts
        available_experts = self.n_routed_experts - self.skip_first_n_experts
        weights = torch.ones(n_tokens, a_exp, device=x.device) / a_exp
        indices = (
            torch.arange(n_tokens * a_exp, device=x.device).view(-1, a_exp) % available_experts
        ) + self.skip_first_n_experts
        return weights.type_as(x), indices, None


class AutomodelNoisyFakeBalancedGate(nn.Module):
    """``FakeBalancedGate`` with ``noise > 0``: a generator seeded from the input's first values (so that a
    checkpoint's recompute draws the same), noisy weights, and a ``topk`` of uniform draws plus a per-expert
    popularity bias, also drawn."""

    def __init__(self, topk: int = 2, noise: float = 0.5) -> None:
        super().__init__()
        self.n_routed_experts, self.n_activated_experts, self.skip_first_n_experts = E, topk, 0
        self.noise = noise

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor, cp_mesh: object | None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        n_tokens, a_exp = x.size(0), self.n_activated_experts
        available_experts = self.n_routed_experts - self.skip_first_n_experts
        seed = int(x.view(-1)[:4].to(torch.float32).sum().item() * 1e6) & 0x7FFFFFFF
        gen = torch.Generator(device=x.device).manual_seed(seed)
        uniform_weights = torch.ones(n_tokens, a_exp, device=x.device) / a_exp
        raw_weights = torch.rand(n_tokens, a_exp, device=x.device, generator=gen)
        raw_weights = raw_weights / raw_weights.sum(dim=-1, keepdim=True)
        weights = (1 - self.noise) * uniform_weights + self.noise * raw_weights
        expert_bias = torch.randn(available_experts, device=x.device, generator=gen) * self.noise * 0.1
        scores = torch.rand(n_tokens, available_experts, device=x.device, generator=gen) + expert_bias
        _, indices = scores.topk(a_exp, dim=-1)
        return weights.type_as(x), indices + self.skip_first_n_experts, None


class AutomodelMoE(nn.Module):
    """``MoE``: a token mask from the padding mask (none here: every token valid), the gate, the experts (a loop
    over ``ModuleList`` experts here, upstream's ``GroupedExperts``), the shared experts."""

    def __init__(self, make_gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.n_routed_experts = E
        self.gate = make_gate()
        self.experts = Experts()
        self.shared_experts = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        token_mask = torch.ones(x.shape[0], dtype=torch.bool) if padding_mask is None else ~padding_mask.flatten()
        weights, indices, _ = self.gate(x, token_mask, None)
        y = dispatch(self.experts, x, indices, weights)
        return (y + self.shared_experts(x)).view(shape)


# ----------------------------------------------------------------------- Doge: cross-domain MoE by product keys
# huggingface/transformers src/transformers/models/doge/modeling_doge.py (``DogeCDMoE``): a dense gated MLP plus
# ``num_experts`` single-neuron experts (rows of the ``down_embed`` and ``up_embed`` Embeddings) picked by product
# keys: ``router_gate`` gives two sets of ``num_keys = sqrt(E)`` logits, each fully ranked by ``topk(num_keys)``, the
# ``num_keys ** 2`` sums and ids ``i * num_keys + j``, a ``topk(top_k)`` over the sums whose positions ``gather`` the
# expert ids, a softmax over the chosen sums. The config has ``num_experts`` and ``num_experts_per_tok``.
class DogeCDMoE(_Used):
    def __init__(self, num_experts: int = 16, top_k: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.num_keys = int(math.sqrt(num_experts))
        self.norm_topk_prob = False
        self.act_fn = F.silu
        self.gate_proj = nn.Linear(D, 12, bias=False)
        self.up_proj = nn.Linear(D, 12, bias=False)
        self.down_proj = nn.Linear(12, D, bias=False)
        self.router_gate = nn.Linear(D, self.num_keys * 2, bias=False)
        self.down_embed = nn.Embedding(num_experts, D)
        self.up_embed = nn.Embedding(num_experts, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.shape
        router_logits = self.router_gate(hidden_states).view(2, bsz * seq_len, -1)
        (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(self.num_keys, dim=-1)
        all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
        all_indices = indices_x.unsqueeze(-1) * self.num_keys + indices_y.unsqueeze(-2)
        all_scores = all_scores.view(*all_scores.shape[:-2], -1)
        all_indices = all_indices.view(*all_indices.shape[:-2], -1)
        if self.forced is None:
            scores, position_indices = all_scores.topk(self.top_k, dim=-1)
            indices = all_indices.gather(-1, position_indices)
        else:
            indices = self.forced
            scores = router_logits[0].gather(-1, indices // self.num_keys) + router_logits[1].gather(
                -1, indices % self.num_keys
            )
        self.used = indices
        routing_weights = F.softmax(scores, dim=-1)
        down_embed = self.down_embed(indices)
        up_embed = self.up_embed(indices)
        experts_weights = torch.matmul(down_embed, hidden_states.view(bsz * seq_len, -1, 1)).view(bsz * seq_len, -1)
        experts_weights = self.act_fn(experts_weights) * routing_weights
        experts_states = torch.matmul(experts_weights.view(bsz * seq_len, 1, -1), up_embed).view(bsz, seq_len, -1)
        hidden_states = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return hidden_states + experts_states


# ----------------------------------------------------------------------- vLLM: grouped top-k with a bias, int32 ids
# vllm-project/vllm vllm/model_executor/models/dots1.py (``Dots1MoE``, dots.llm1) and deepseek_v2.py
# (``DeepseekV2MoE``, Kimi-K2 / Moonlight / DeepSeek-V3), with vllm/model_executor/layers/fused_moe/fused_moe.py
# (``grouped_topk``): the gate a ``ReplicatedLinear`` returning ``(logits, None)``, its ``e_score_correction_bias``
# Parameter set on the gate and handed to the ``FusedMoE`` (``experts``, which holds the experts' weights and
# decides): sigmoid scores, the bias added for the choice, groups by their ``topk(2)`` sums, ``topk_group`` kept, the
# rest ``-inf``, ``topk(sorted=False)``, the unbiased scores gathered, renormalised, returned as fp32 weights and
# int32 ids; dots.llm1 multiplies the MoE output by ``routed_scaling_factor`` after the layer and adds the shared
# experts.
class VllmReplicatedLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


def vllm_grouped_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int,
    topk_group: int,
    e_score_correction_bias: torch.Tensor,
    forced: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = gating_output.sigmoid()
    num_token = scores.shape[0]
    original_scores = scores
    scores = scores + e_score_correction_bias.unsqueeze(0)
    group_scores = scores.view(num_token, num_expert_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(num_token, num_expert_group, scores.shape[-1] // num_expert_group)
        .reshape(num_token, -1)
    )
    tmp_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
    topk_ids = torch.topk(tmp_scores, k=topk, dim=-1, sorted=False)[1] if forced is None else forced
    topk_weights = original_scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(torch.float32), topk_ids.to(torch.int32)


class VllmFusedMoE(nn.Module):
    """``FusedMoE`` with ``use_grouped_topk``: the choice from the logits passed in, the experts' ``w13``/``w2``
    weights indexed by the ids."""

    def __init__(self, top_k: int, num_expert_group: int, topk_group: int, bias: nn.Parameter) -> None:
        super().__init__()
        self.top_k, self.global_num_experts, self.renormalize = top_k, E, True
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.e_score_correction_bias = bias
        self.w13_weight = nn.Parameter(torch.randn(E, 16, D) / 4)
        self.w2_weight = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = vllm_grouped_topk(
            router_logits,
            self.top_k,
            self.renormalize,
            self.num_expert_group,
            self.topk_group,
            self.e_score_correction_bias,
            forced,
        )
        out = torch.zeros_like(hidden_states)
        for slot in range(self.top_k):
            e = ids[:, slot].long()
            gate, up = torch.einsum("tod,td->to", self.w13_weight[e], hidden_states).chunk(2, -1)
            h = torch.einsum("tdi,ti->td", self.w2_weight[e], F.silu(gate) * up)
            out = out + w[:, slot, None].to(hidden_states.dtype) * h
        return out, ids


class Dots1MoE(_Used):
    """vLLM ``Dots1MoE`` (``n_group``/``topk_group`` as the config says: dots.llm1 has one group, Kimi-K2 one, and
    DeepSeek-V3 eight of which four are kept)."""

    def __init__(self, top_k: int = 3, n_group: int = 1, topk_group: int = 1) -> None:
        super().__init__()
        self.routed_scaling_factor = 2.5
        self.gate = VllmReplicatedLinear(D, E)
        self.gate.e_score_correction_bias = nn.Parameter(torch.randn(E) / 10)
        self.experts = VllmFusedMoE(top_k, n_group, topk_group, self.gate.e_score_correction_bias)
        self.shared_experts = nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, shape[-1])
        shared_output = self.shared_experts(hidden_states)
        router_logits, _ = self.gate(hidden_states)
        out, ids = self.experts(hidden_states=hidden_states, router_logits=router_logits, forced=self.forced)
        self.used = ids.long()
        out = out * self.routed_scaling_factor + shared_output
        return out.view(shape)


# ----------------------------------------------------------------------- vLLM: DeepSeek-V4 routing, hash layers
# vllm-project/vllm vllm/model_executor/layers/fused_moe/router/fused_topk_bias_router.py (``FusedTopKBiasRouter``,
# ``fused_topk_bias``, ``_topk_softplus_sqrt_torch``: the torch reference of the fused kernel, run where the kernel is
# not built): the router object of the fused layer (no module), the gate's correction bias handed to it; weights
# ``sqrt(softplus(logits))`` in fp32, the bias added for the ranking only, ``topk``, the unbiased weights gathered,
# renormalised (a zero sum left as is), times ``routed_scaling_factor``, the ids and weights ``copy_``-ed into
# preallocated int32 and fp32 buffers. DeepSeek-V4's hash layers hand it a ``hash_indices_table`` (``tid2eid [V,
# k]``) and the token ids: the experts are the table's row for each token (no top-k), the weights gathered as above.
class VllmFusedTopKBiasRouter:
    """``FusedTopKBiasRouter``: a plain object (``FusedMoERouter`` is an ``ABC``, no module)."""

    def __init__(self, top_k: int, bias: nn.Parameter, hash_indices_table: torch.Tensor | None = None) -> None:
        self.top_k, self.global_num_experts, self.renormalize, self.routed_scaling_factor = top_k, E, True, 1.5
        self.scoring_func = "sqrtsoftplus"
        self.e_score_correction_bias = bias
        self._hash_indices_table = hash_indices_table

    def _compute_routing(
        self, router_logits: torch.Tensor, input_ids: torch.Tensor | None, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = router_logits.shape[0]
        topk_weights = torch.empty(num_tokens, self.top_k, dtype=torch.float32)
        topk_indices = torch.empty(num_tokens, self.top_k, dtype=torch.int32)
        weights_base = torch.sqrt(F.softplus(router_logits.to(torch.float32), beta=1.0, threshold=20.0))
        if input_ids is not None and self._hash_indices_table is not None:
            selected = self._hash_indices_table[input_ids.to(torch.long)] if forced is None else forced
            out_weights = torch.gather(weights_base, -1, selected.to(torch.long))
        else:
            ranking = weights_base + self.e_score_correction_bias.to(torch.float32)
            selected = torch.topk(ranking, self.top_k, dim=-1)[1] if forced is None else forced
            out_weights = torch.gather(weights_base, -1, selected)
        if self.renormalize:
            denom = out_weights.sum(dim=-1, keepdim=True)
            out_weights = out_weights / torch.where(denom > 0, denom, torch.ones_like(denom))
        out_weights = out_weights * self.routed_scaling_factor
        topk_weights.copy_(out_weights.to(topk_weights.dtype))
        topk_indices.copy_(selected.to(topk_indices.dtype))
        return topk_weights, topk_indices


class VllmRoutedFusedMoE(nn.Module):
    """``FusedMoE`` holding its router object and the experts' weights; ``input_ids`` passed through for hash
    routing."""

    def __init__(self, top_k: int, bias: nn.Parameter, hash_indices_table: torch.Tensor | None) -> None:
        super().__init__()
        self.top_k, self.global_num_experts = top_k, E
        self.router = VllmFusedTopKBiasRouter(top_k, bias, hash_indices_table)
        self.w13_weight = nn.Parameter(torch.randn(E, 16, D) / 4)
        self.w2_weight = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        forced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = self.router._compute_routing(router_logits, input_ids, forced)
        out = torch.zeros_like(hidden_states)
        for slot in range(self.top_k):
            e = ids[:, slot].long()
            gate, up = torch.einsum("tod,td->to", self.w13_weight[e], hidden_states).chunk(2, -1)
            h = torch.einsum("tdi,ti->td", self.w2_weight[e], F.silu(gate) * up)
            out = out + w[:, slot, None].to(hidden_states.dtype) * h
        return out, ids


class DeepseekV4MoE(_Used):
    """A DeepSeek-V4 MoE layer as vLLM runs it: the gate's logits and (in a hash layer) the token ids handed to the
    fused layer; shared experts beside."""

    def __init__(self, top_k: int = 2, vocab: int = 0) -> None:
        super().__init__()
        self.gate = VllmReplicatedLinear(D, E)
        self.gate.e_score_correction_bias = nn.Parameter(torch.randn(E) / 10)
        g = torch.Generator().manual_seed(5)
        table = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(vocab)]) if vocab else None
        self.experts = VllmRoutedFusedMoE(top_k, self.gate.e_score_correction_bias, table)
        self.shared_experts = nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)
        out, ids = self.experts(hidden_states, router_logits, input_ids=input_ids, forced=self.forced)
        self.used = ids.long()
        return out + self.shared_experts(hidden_states)


class DeepseekV4Model(nn.Module):
    """Token ids in, an embedding, MoE layers handed the ids (the first ``hash_layers`` of them hash-routed)."""

    def __init__(self, hash_layers: int = 0, vocab: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(DeepseekV4MoE(vocab=vocab if i < hash_layers else 0) for i in range(2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.view(-1)
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer(h, ids)
        return h.view(*input_ids.shape, D)


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- vLLM: forced load balance for benchmarks
# vllm-project/vllm vllm/model_executor/layers/fused_moe/router/fused_moe_router.py (``FusedMoERouter.select_experts``,
# ``_force_load_balance``): with ``VLLM_USE_FORCE_LOAD_BLANCE`` set (a benchmarking aid), the ids of the router's own
# choice (here ``fused_topk``: softmax, ``topk``, renormalised, int32 ids) are replaced by the first k of an
# ``argsort`` of uniform noise, the weights of the real choice kept; the ids are then copied into the router's
# ``_routing_replay_out`` buffer when an engine capturer is bound (none here).
def _force_load_balance(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    random_matrix = torch.rand(topk_ids.size(0), num_experts, device=topk_ids.device)
    return torch.argsort(random_matrix, dim=1)[:, : topk_ids.size(1)].to(topk_ids.dtype)


class VllmFusedTopKRouter:
    """``FusedTopKRouter`` (a plain object) with ``select_experts`` of its ``FusedMoERouter`` base."""

    def __init__(self, force_load_balance: bool) -> None:
        self.top_k, self.renormalize, self.force_load_balance = 2, True, force_load_balance
        self._routing_replay_out: torch.Tensor | None = None

    def select_experts(
        self, router_logits: torch.Tensor, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        topk_weights, topk_ids = _pick(torch.softmax(router_logits, dim=-1, dtype=torch.float32), forced, self.top_k)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        topk_ids = topk_ids.to(torch.int32)
        if self.force_load_balance:
            topk_ids = _force_load_balance(topk_ids, router_logits.shape[-1])
        if self._routing_replay_out is not None:
            self._routing_replay_out[: topk_ids.shape[0]].copy_(topk_ids.to(torch.int16))
        return topk_weights, topk_ids


class VllmBalancedFusedMoE(nn.Module):
    def __init__(self, force_load_balance: bool) -> None:
        super().__init__()
        self.top_k, self.global_num_experts = 2, E
        self.router = VllmFusedTopKRouter(force_load_balance)
        self.w13_weight = nn.Parameter(torch.randn(E, 16, D) / 4)
        self.w2_weight = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = self.router.select_experts(router_logits, forced)
        out = torch.zeros_like(hidden_states)
        for slot in range(self.top_k):
            e = ids[:, slot].long()
            gate, up = torch.einsum("tod,td->to", self.w13_weight[e], hidden_states).chunk(2, -1)
            out = out + w[:, slot, None] * torch.einsum("tdi,ti->td", self.w2_weight[e], F.silu(gate) * up)
        return out, ids


class VllmMixtralMoE(_Used):
    """vLLM's ``MixtralMoE``: the ``gate`` logits over the flat tokens into the fused layer."""

    def __init__(self, force_load_balance: bool = False) -> None:
        super().__init__()
        self.gate = VllmReplicatedLinear(D, E)
        self.experts = VllmBalancedFusedMoE(force_load_balance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])
        router_logits, _ = self.gate(flat)
        out, ids = self.experts(flat, router_logits, self.forced)
        self.used = ids.long()
        return out.view(x.shape)


# ----------------------------------------------------------------------- MiniMax-M1 (vLLM): an fp32 gate, bf16 logits
# vllm-project/vllm vllm/model_executor/models/minimax_text_01.py (``MiniMaxText01MoE``): the gate a
# ``ReplicatedLinear`` with fp32 parameters fed ``hidden_states.to(torch.float32)``, its logits cast back to the
# model's dtype (bf16 here) before the ``FusedMoE`` (softmax in fp32, ``topk``, renormalised): the choice is made over
# logits rounded to bf16, where experts tie more often.
class MiniMaxText01MoE(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.num_total_experts, self.hidden_size = 2, E, D
        self.gate = VllmReplicatedLinear(D, E)  # (fp32, as ``params_dtype=torch.float32``; the model cast around it)
        self.experts = VllmBalancedFusedMoE(force_load_balance=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, self.hidden_size)
        router_logits_fp32, _ = self.gate(hidden_states.to(torch.float32))
        out, ids = self.experts(hidden_states, router_logits_fp32.to(hidden_states.dtype), self.forced)
        self.used = ids.long()
        return out.to(hidden_states.dtype).view(shape)


def _minimax_bf16() -> nn.Module:
    """Two MiniMax-M1 MoE layers in bf16, their gates kept in fp32."""
    model = Layers(MiniMaxText01MoE).to(torch.bfloat16)
    for layer in model.layers:
        layer.gate.float()
    return model


# ----------------------------------------------------------------------- ERNIE-4.5-VL (vLLM): modality experts
# vllm-project/vllm vllm/model_executor/models/ernie45_vl_moe.py (``Ernie4_5_VLMoeMoE``): text and vision experts,
# each with its own fp32 gate and ``FusedMoE``; the block takes a ``visual_token_mask``: all vision tokens go through
# the vision gate and experts, all text through the text ones, and a mixed batch is split by the mask (the rows of
# each modality gathered by boolean indexing, routed by their own gate, written back by masked assignment).
class ErnieVlFusedMoE(nn.Module):
    """``FusedMoE`` with softmax, ``topk``, renormalised, the ERNIE correction bias added for the choice only."""

    def __init__(self, n: int, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.global_num_experts = top_k, n
        self.e_score_correction_bias = nn.Parameter(torch.randn(n) / 10, requires_grad=False)
        self.w13_weight = nn.Parameter(torch.randn(n, 16, D) / 4)
        self.w2_weight = nn.Parameter(torch.randn(n, D, 8) / 4)

    def forward(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(router_logits, dim=-1)
        ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)[1] if forced is None else forced
        w = scores.gather(1, ids)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(hidden_states)
        for slot in range(self.top_k):
            e = ids[:, slot]
            gate, up = torch.einsum("tod,td->to", self.w13_weight[e], hidden_states).chunk(2, -1)
            h = torch.einsum("tdi,ti->td", self.w2_weight[e], F.silu(gate) * up)
            out = out + w[:, slot, None].to(hidden_states.dtype) * h
        return out, ids


class ErnieVlModality(_Used):
    """One modality's gate and experts (upstream: ``text_experts_gate``/``text_experts`` and the vision pair as
    attributes of the block)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gate = VllmReplicatedLinear(D, n)
        self.experts = ErnieVlFusedMoE(n)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states.to(dtype=torch.float32))
        out, self.used = self.experts(hidden_states=hidden_states, router_logits=router_logits, forced=self.forced)
        return out


class Ernie45VlMoE(nn.Module):
    """``Ernie4_5_VLMoeMoE.forward``: the modality split by ``visual_token_mask`` (here every third token is a vision
    token, or ``visual``: all of them, or none)."""

    def __init__(self, visual: str = "mixed") -> None:
        super().__init__()
        self.hidden_size, self.visual = D, visual
        self.text = ErnieVlModality(E)
        self.vision = ErnieVlModality(6)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_size)
        n = hidden_states.shape[0]
        visual_token_mask = {
            "mixed": torch.arange(n) % 3 == 0,
            "all": torch.ones(n, dtype=torch.bool),
            "none": torch.zeros(n, dtype=torch.bool),
        }[self.visual].view(-1, 1)
        if visual_token_mask.all():
            final_hidden_states = self.vision(hidden_states)
        elif visual_token_mask.any():
            visual_token_mask = visual_token_mask.repeat(1, self.hidden_size).bool()
            text_token_mask = ~visual_token_mask
            final_hidden_states = torch.zeros_like(hidden_states)
            text_hidden_states = hidden_states[text_token_mask].reshape(-1, self.hidden_size)
            vision_hidden_states = hidden_states[visual_token_mask].reshape(-1, self.hidden_size)
            final_hidden_states[text_token_mask] = self.text(text_hidden_states).flatten()
            final_hidden_states[visual_token_mask] = self.vision(vision_hidden_states).flatten()
        else:
            final_hidden_states = self.text(hidden_states)
        return final_hidden_states.view(shape)


# ----------------------------------------------------------------------- Klear: routed and shared mixed by softmax
# ml-explore/mlx-lm mlx_lm/models/klear.py (``KlearSparseMoeBlock``, the port of Kwai-Klear's Klear-46B-A2.5B hub
# code): a bare ``gate`` Linear, sigmoid scores in fp32, a trainable ``expert_bias`` Parameter added for the choice,
# ``topk(...).indices`` of the biased scores, the unbiased scores gathered, renormalised, cast to the input's dtype;
# ``SwitchGLU`` experts over stacked ``[E, ...]`` weights indexed by the ids (one output per slot), summed weighted;
# the routed and the shared experts' outputs mixed by a 2-way softmax of a ``coefficient`` Linear.
class SwitchGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(E, 8, D) / 4)
        self.up_proj = nn.Parameter(torch.randn(E, 8, D) / 4)
        self.down_proj = nn.Parameter(torch.randn(E, D, 8) / 4)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        gate = torch.einsum("...kid,...d->...ki", self.gate_proj[indices], x)
        up = torch.einsum("...kid,...d->...ki", self.up_proj[indices], x)
        return torch.einsum("...kdi,...ki->...kd", self.down_proj[indices], F.silu(gate) * up)


class KlearSparseMoeBlock(_Used):
    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.norm_topk_prob, self.num_experts, self.top_k = True, E, top_k
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = SwitchGLU()
        self.shared_experts = MLPShared()
        self.coefficient = nn.Linear(D, 2)
        self.expert_bias = nn.Parameter(torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing_weights = torch.sigmoid(self.gate(x).to(torch.float32))
        biased_weights = routing_weights + self.expert_bias.reshape((1, 1, -1))
        inds = (
            torch.topk(biased_weights, self.top_k, dim=-1).indices
            if self.forced is None
            else self.forced.view(*x.shape[:-1], self.top_k)
        )
        self.used = inds.reshape(-1, self.top_k)
        scores = torch.gather(routing_weights, -1, inds)
        if self.norm_topk_prob:
            scores = scores / (torch.sum(scores, dim=-1, keepdim=True) + 1e-20)
        scores = scores.to(x.dtype)
        y_experts = (self.experts(x, inds) * scores[..., None]).sum(dim=-2)
        coef = F.softmax(self.coefficient(x), dim=-1)
        return y_experts * coef[..., :1] + self.shared_experts(x) * coef[..., 1:]


class MLPShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, 8, bias=False)
        self.up_proj = nn.Linear(D, 8, bias=False)
        self.down_proj = nn.Linear(8, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------- Apertus: a dense model of the list
# huggingface/transformers src/transformers/models/apertus/modeling_apertus.py (``ApertusMLP``) and
# src/transformers/activations.py (``XIELUActivation``): no experts, an up/down MLP with the xIELU activation (two
# learned softplus-parametrised slopes and a ``torch.where`` on the sign): no router to find.
class XIELUActivation(nn.Module):
    def __init__(self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.log(torch.expm1(torch.tensor(alpha_p_init))).unsqueeze(0))
        self.alpha_n = nn.Parameter(torch.log(torch.expm1(torch.tensor(alpha_n_init - beta))).unsqueeze(0))
        self.register_buffer("beta", torch.tensor(beta))
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(
            x > 0,
            alpha_p * x * x + self.beta * x,
            (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x,
        )


class ApertusMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(D, 32, bias=False)
        self.down_proj = nn.Linear(32, D, bias=False)
        self.act_fn = XIELUActivation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "tgi-dense-moe-fused-topk-weights-scattered": (lambda: Layers(TgiBlockSparseMoE), lambda: _x(2, 12), {}),
    "tgi-dense-moe-fused-topk-weights-scattered-train": (
        lambda: Layers(TgiBlockSparseMoE),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "tgi-dense-moe-grouped-topk-zero-masked": (
        lambda: Layers(lambda: TgiBlockSparseMoE(n_expert_group=4, topk_group=2)),
        lambda: _x(2, 12),
        {"change": 1.0},
    ),
    "automodel-gate-softmax-before-topk": (lambda: Layers(lambda: AutomodelMoE(AutomodelGate)), _x, {}),
    "automodel-gate-softmax-before-topk-train": (
        lambda: Layers(lambda: AutomodelMoE(AutomodelGate)),
        _x,
        {"train": True},
    ),
    "automodel-gate-topk-of-logits-then-softmax": (
        lambda: Layers(lambda: AutomodelMoE(lambda: AutomodelGate(softmax_before_topk=False))),
        _x,
        {},
    ),
    "automodel-gate-softmax-with-bias-groups-by-product": (
        lambda: Layers(
            lambda: AutomodelMoE(lambda: AutomodelGate("softmax_with_bias", n_groups=4, topk_groups=2, bias=True))
        ),
        _x,
        {},
    ),
    "automodel-gate-sqrtsoftplus-with-bias": (
        lambda: Layers(lambda: AutomodelMoE(lambda: AutomodelGate("sqrtsoftplus", bias=True))),
        _x,
        {},
    ),
    "automodel-gate-sigmoid-groups-by-amax": (
        lambda: Layers(lambda: AutomodelMoE(lambda: AutomodelGate("sigmoid", n_groups=4, topk_groups=2))),
        _x,
        {},
    ),
    "automodel-gate-routing-core-child-called-with-the-gate": (
        lambda: Layers(lambda: AutomodelMoE(lambda: AutomodelGate("sigmoid", bias=True, routing_core=True))),
        _x,
        {},
    ),
    "automodel-gate-routing-core-child-called-with-the-gate-train": (
        lambda: Layers(lambda: AutomodelMoE(lambda: AutomodelGate("sigmoid", bias=True, routing_core=True))),
        _x,
        {"train": True},
    ),
    "automodel-gate-aux-loss-and-expert-load-train": (
        lambda: Layers(
            lambda: AutomodelMoE(lambda: AutomodelGate("softmax_with_bias", bias=True, aux_loss_coeff=0.01))
        ),
        _x,
        {"train": True},
    ),
    "klear-sigmoid-bias-parameter-coefficient-mix": (lambda: Layers(KlearSparseMoeBlock), lambda: _x(2, 12), {}),
    "klear-sigmoid-bias-parameter-coefficient-mix-train": (
        lambda: Layers(KlearSparseMoeBlock),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "vllm-dots1-grouped-topk-bias-on-the-gate-int32-ids": (lambda: Layers(Dots1MoE), lambda: _x(2, 12), {}),
    "vllm-deepseek-v3-grouped-topk-four-of-eight-groups": (
        lambda: Layers(lambda: Dots1MoE(3, n_group=4, topk_group=2)),
        lambda: _x(2, 12),
        {},
    ),
    # (a smaller change: logits pushed far below zero make ``sqrt(softplus)`` 0 and its gradient NaN, natively too)
    "vllm-deepseek-v4-sqrtsoftplus-copied-into-buffers": (lambda: DeepseekV4Model(0), _ids, {"change": 1.0}),
    "vllm-deepseek-v4-sqrtsoftplus-copied-into-buffers-train": (
        lambda: DeepseekV4Model(0),
        _ids,
        {"change": 1.0, "train": True},
    ),
    "vllm-fused-topk-router-select-experts": (lambda: Layers(VllmMixtralMoE), lambda: _x(2, 12), {}),
    "vllm-minimax-m1-fp32-gate-bf16-logits": (_minimax_bf16, lambda: _x(2, 12).bfloat16(), {"change": 1.0}),
    "vllm-minimax-m1-fp32-gate-bf16-logits-train": (
        _minimax_bf16,
        lambda: _x(2, 12).bfloat16(),
        {"change": 1.0, "train": True},
    ),
    "vllm-ernie45-vl-text-and-vision-split-by-mask": (lambda: Layers(Ernie45VlMoE), lambda: _x(2, 12), {}),
    "vllm-ernie45-vl-text-and-vision-split-by-mask-train": (
        lambda: Layers(Ernie45VlMoE),
        lambda: _x(2, 12),
        {"train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """TGI's dense MoE layer (``fused_topk`` or DeepSeek-V2's ``grouped_topk`` over logits passed in, the k weights
    scattered into a ``[tokens, E]`` map, every expert run on every token); NeMo Automodel's ``Gate`` (softmax before
    or after the top-k, softmax with a correction bias and groups masked by a product, DeepSeek-V4's
    ``sqrtsoftplus``, sigmoid with groups by ``amax``, the choice in a parameterless routing-core child that is
    passed the gate, the expert load and aux loss in training); vLLM's grouped top-k with the bias Parameter set on
    the gate and shared with the fused layer, int32 ids (dots.llm1, DeepSeek-V3 with four of eight groups); vLLM's
    DeepSeek-V4 router (``sqrt(softplus)``, ids and weights copied into preallocated buffers); vLLM's plain fused
    top-k router; MiniMax-M1's fp32 gate whose logits are cast to bf16 before the choice; vLLM's ERNIE-4.5-VL with
    text and vision tokens split by a mask between two gates; Klear (a trainable bias Parameter for the choice,
    ``SwitchGLU`` experts by indexed stacked weights, routed and shared outputs mixed by a softmax): every router
    found and nothing else, the recorded rows the experts used, and a replay after the routers change those experts
    forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("visual", ["all", "none"])
def test_ernie45_vl_one_modality_only(visual: str) -> None:
    """vLLM's ERNIE-4.5-VL fed one modality: the other modality's gates are found but never run. Reading the routes
    is refused, naming them; with ``allow_silent=True`` the routers that ran replay exactly, as by hand."""
    model = Layers(lambda: Ernie45VlMoE(visual))
    ref = copy.deepcopy(model)
    x = _x(2, 12)
    idle = "text" if visual == "all" else "vision"
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        with pytest.raises(
            mr.MoEReplayError,
            match=rf"routers \['layers\.0\.{idle}\.gate', 'layers\.1\.{idle}\.gate'\] "
            r"recorded no row .* never ran",
        ):
            session.routes()
        routes = session.routes(allow_silent=True)
        rows = [routes.layer(name) for name in session.names]
        perturb(model)
        perturb(ref)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            expected.square().sum().backward()
        with session.replay(routes):
            replayed = model(x)
        replayed.square().sum().backward()
        assert torch.equal(replayed, expected)
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert (p.grad is None) == (want[name].grad is None), name
            assert p.grad is None or torch.equal(p.grad, want[name].grad), name


class ErnieVlLayerByTypes(nn.Module):
    """``Ernie4_5_VLMoeMoE`` fed the modality mask from the model's ``mm_token_type_ids``: the rows of each modality
    gathered by boolean indexing, each routed by its own gate."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_size = D
        self.text = ErnieVlModality(E)
        self.vision = ErnieVlModality(6)

    def forward(self, hidden_states: torch.Tensor, visual_token_mask: torch.Tensor) -> torch.Tensor:
        visual = visual_token_mask.view(-1, 1).repeat(1, self.hidden_size)
        out = torch.zeros_like(hidden_states)
        out[~visual] = self.text(hidden_states[~visual].reshape(-1, self.hidden_size)).flatten()
        out[visual] = self.vision(hidden_states[visual].reshape(-1, self.hidden_size)).flatten()
        return out


class ErnieVlByTypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(32, D)
        self.layers = nn.ModuleList([ErnieVlLayerByTypes(), ErnieVlLayerByTypes()])

    def forward(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids).view(-1, D)
        visual = mm_token_type_ids.view(-1).bool()
        for layer in self.layers:
            h = h + layer(h, visual)
        return h


@pytest.mark.reliability("silent replays")
def test_ernie45_vl_another_modality_split_of_the_same_tokens_is_refused() -> None:
    """ERNIE-4.5-VL's modality routers fed the same token ids with other token types at replay (as many vision
    tokens, other ones): each router would be forced the rows recorded for other tokens, so the replay is refused,
    saying which token a row was recorded for; with the captured types it replays."""
    model = ErnieVlByTypes()
    ids = _ids()
    captured_types = (torch.arange(24) % 3 == 0).long().view(2, 12)
    other_types = (torch.arange(24) % 3 == 1).long().view(2, 12)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            captured = model(ids, captured_types)
        routes = session.routes()
        with pytest.raises(mr.MoEReplayError, match=r"was fed other tokens than its routes were recorded for"):
            with torch.no_grad(), session.replay(routes):
                model(ids, other_types)
        with torch.no_grad(), session.replay(routes):
            assert torch.equal(model(ids, captured_types), captured)


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "automodel-fake-balanced-gate": (
        lambda: Layers(lambda: AutomodelMoE(AutomodelFakeBalancedGate)),
        _x,
        r"'layers\.0\.gate': its forward makes no decision-like call",
        {},
    ),
    # (a top-k of draws seeded by the first token's values: every row follows that token, none its own)
    "automodel-fake-balanced-gate-noisy": (
        lambda: Layers(lambda: AutomodelMoE(AutomodelNoisyFakeBalancedGate)),
        _x,
        r"'layers\.0\.gate': its decision .* is made over scores that follow other tokens than their own",
        {},
    ),
    "apertus-dense-xielu-mlp": (lambda: Layers(ApertusMLP), _x, "no MoE router found", {}),
    # (the choice is the table's row for the token id: no decision to record or force; exclude= the hash layers)
    "vllm-deepseek-v4-hash-layer-table-lookup": (
        lambda: DeepseekV4Model(1),
        _ids,
        r"(?s)'layers\.0\.gate': its forward makes no decision-like call.*a hash layer.*leave it out with exclude=",
        {},
    ),
    # (the ids of the real choice replaced by an argsort of noise, its weights kept: the argsort decides)
    "vllm-force-load-balance-random-argsort": (
        lambda: Layers(lambda: VllmMixtralMoE(force_load_balance=True)),
        lambda: _x(2, 12),
        r"'layers\.0\.gate': its experts are chosen by an argsort of the scores",
        {},
    ),
    "tgi-sparse-moe-fused-kernel": (lambda: Layers(TgiSparseBlock), lambda: _x(2, 12), "no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """NeMo Automodel's ``FakeBalancedGate`` (round-robin experts by ``arange``, no choice made from the input; with
    noise, a top-k of draws seeded by the input's first values);
    Apertus' dense xIELU MLP (no experts); vLLM's DeepSeek-V4 hash layer (the experts a table's row for the token
    id); vLLM's forced load balance for benchmarks (the real top-k's ids replaced by an ``argsort`` of noise); TGI's
    sparse layer (the choice inside a fused kernel, the k and E on a module the gate does not sit beside):
    refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_deepseek_v4_hash_layer_excluded_the_learned_one_replays_exactly(train: bool) -> None:
    """vLLM's DeepSeek-V4 with its first layer hash-routed (the experts a table's row for the token id, the same in
    every forward of the same tokens): with that layer's gate excluded, the learned layer's routes replay exactly
    after the routers change, as by hand, the hash layer routing by its table as it always does."""
    model = DeepseekV4Model(1)
    model.train(train)
    ref = copy.deepcopy(model)
    x = _ids()
    with mr.attach(model, exclude="layers.0.gate") as session:
        assert session.names == ("layers.1.gate",)
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        row = routes.layer("layers.1.gate")
        assert torch.equal(row.long().sort(-1).values, model.layers[1].used.sort(-1).values)
        perturb(model, 1.0)
        perturb(ref, 1.0)
        ref.layers[1].forced = row.long()
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
@pytest.mark.xfail(
    strict=True,
    reason="false refusal: Doge ranks each half of its product keys fully (topk(num_keys)), so every expert is a "
    "candidate and its score can be gathered, yet the product-key refusal says none can be",
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_doge_cdmoe_product_keys_fully_ranked_replay_exactly(train: bool) -> None:
    """Doge's cross-domain MoE (each half of the router's logits fully ranked by ``topk(num_keys)``, the
    ``num_keys ** 2`` sums, a top-k of the sums whose positions pick the expert ids by ``gather``): every expert is a
    candidate product, so a replay could force the recorded expert ids exactly, as by hand. Today the product-key
    refusal turns it down (loudly: no silent replay of positions)."""
    assert_exact(Layers(DogeCDMoE), _x(2, 12), train=train)
