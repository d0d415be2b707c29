"""More public MoE router code, with zero configuration (see ``test_public_routers16``).

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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused, one_layer


# ----------------------------------------------------------------------- TensorRT-LLM: routing methods, a vanilla MoE
# NVIDIA/TensorRT-LLM tensorrt_llm/_torch/modules/fused_moe/routing.py (the routing methods, ``nn.Module``s whose
# ``apply`` the fused MoE calls: their ``forward`` never runs) and fused_moe_vanilla.py (``VanillaMoE``: the experts
# in an ``nn.ModuleDict`` keyed by the expert id, a loop over them with ``torch.where`` of the selected experts).
class TrtllmRoutingMethod(nn.Module):
    """``BaseMoeRoutingMethod``: ``apply(router_logits)`` returns ``(token_selected_experts int32, token_final_scales
    float32)``; ``forced``: the experts chosen by hand instead (the rest of the method's own code unchanged)."""

    top_k: int

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k

    def apply(  # type: ignore[override]  # (upstream shadows ``nn.Module.apply`` too)
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @property
    def experts_per_token(self) -> int:
        return self.top_k


class TrtllmDefaultRouting(TrtllmRoutingMethod):
    """``DefaultMoeRoutingMethod.apply_pytorch``: ``torch.topk`` of the fp32 softmax, no renormalisation."""

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        probs = F.softmax(router_logits.float(), dim=-1)
        if forced is None:
            topk_values, topk_indices = torch.topk(probs, k=self.top_k, dim=-1)
        else:
            topk_indices, topk_values = forced, probs.gather(-1, forced)
        return topk_indices.to(torch.int32), topk_values


class TrtllmRenormalizeRouting(TrtllmRoutingMethod):
    """``RenormalizeMoeRoutingMethod.apply_pytorch``: ``torch.topk`` of the logits, the softmax of the top values."""

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if forced is None:
            topk_values, topk_indices = torch.topk(router_logits, k=self.top_k, dim=-1)
        else:
            topk_indices, topk_values = forced, router_logits.gather(-1, forced)
        return topk_indices.to(torch.int32), F.softmax(topk_values.float(), dim=-1)


class TrtllmLlama4Routing(TrtllmRoutingMethod):
    """``Llama4RenormalizeMoeRoutingMethod``: a top-1 ``torch.topk`` of the logits, the sigmoid of the top value."""

    def __init__(self, top_k: int = 1) -> None:
        super().__init__(top_k)

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if forced is None:
            topk_values, topk_indices = torch.topk(router_logits, k=self.top_k, dim=-1)
        else:
            topk_indices, topk_values = forced, router_logits.gather(-1, forced)
        return topk_indices.to(torch.int32), torch.sigmoid(topk_values.float())


class TrtllmSparseMixerRouting(TrtllmRoutingMethod):
    """``SparseMixerMoeRoutingMethod`` (Phi-3.5-MoE): ``k`` rounds; from the second on, ``torch.argmax`` of the
    logits finds the previous round's expert and ``scatter_`` writes ``-inf`` there *in place* (``.float()`` of fp32
    logits is the gate's own output tensor); each round's ``torch.max(..., keepdim=True)`` picks an expert, and its
    weight is the softmax of the logits with every expert too far below that max masked to ``-inf``."""

    def __init__(self, top_k: int = 2, eps: float = 0.2) -> None:
        super().__init__(top_k)
        self.eps = eps

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        router_logits = router_logits.float()
        topk_values = torch.empty(router_logits.shape[0], self.top_k, dtype=torch.float32)
        topk_indices = torch.empty(router_logits.shape[0], self.top_k, dtype=torch.int32)
        for i in range(self.top_k):
            if i > 0:
                max_elem = torch.argmax(router_logits, dim=-1) if forced is None else forced[:, i - 1]
                router_logits.scatter_(-1, max_elem.unsqueeze(-1), -float("inf"))
            if forced is None:
                max_values, max_indices = torch.max(router_logits, dim=-1, keepdim=True)
            else:
                max_indices = forced[:, i : i + 1]
                max_values = router_logits.gather(-1, max_indices)
            topk_indices[:, i] = max_indices.squeeze(-1)
            mask = ((max_values - router_logits) / torch.max(torch.abs(router_logits), max_values)) > 2 * self.eps
            masked_logits = torch.where(mask, -float("inf"), router_logits)
            softmax_masked_logits = F.softmax(masked_logits, dim=-1)
            topk_values[:, i] = torch.gather(softmax_masked_logits, -1, max_indices).squeeze(-1)
        return topk_indices.to(torch.int32), topk_values


class TrtllmLoadBalancedRouting(TrtllmRoutingMethod):
    """``LoadBalancedMoeRoutingMethod`` (for benchmarks): the router's logits ignored, every token sent round-robin
    to ``arange(E)`` repeated, weights of 1. No choice from scores: nothing to record or force."""

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        balanced_values = torch.ones(router_logits.shape[0], self.top_k, dtype=torch.float32)
        final_size = router_logits.shape[0] * self.top_k
        repeat_count = math.ceil(final_size / router_logits.shape[1])
        indices = torch.arange(router_logits.shape[1], dtype=torch.int32).repeat(repeat_count)[:final_size]
        return indices.view(router_logits.shape[0], self.top_k).contiguous(), balanced_values


class TrtllmStaticRouting(TrtllmRoutingMethod):
    """``StaticMoeRoutingMethod`` (for tests): a fixed ``routing_tensor`` of expert ids (int32) and optional scales,
    returned whatever the logits."""

    def __init__(self, routing_tensor: torch.Tensor, routing_scales: torch.Tensor | None = None) -> None:
        super().__init__(routing_tensor.shape[1])
        self.routing_tensor, self.routing_scales = routing_tensor, routing_scales

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.routing_tensor, self.routing_scales


class TrtllmVanillaMoE(nn.Module):
    """``VanillaMoE``: ``routing_method.apply(router_logits)``, then per expert id ``torch.where`` of the selected
    experts, the expert of ``experts[str(id)]`` on those tokens, ``index_add_`` of its output times the scale (1 where
    the method gives none). ``forced``: passed by the block that holds it, forced by hand; ``used``: the experts it
    dispatched by in its last forward."""

    used: torch.Tensor | None = None

    def __init__(self, routing_method: TrtllmRoutingMethod) -> None:
        super().__init__()
        self.routing_method = routing_method
        self.num_experts = E
        self.experts = nn.ModuleDict({str(e): nn.Linear(D, D) for e in range(E)})

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        selected, scales = self.routing_method.apply(router_logits, forced=forced)
        self.used = selected
        if scales is None:
            scales = torch.ones(selected.shape, dtype=torch.float32)
        outputs = torch.zeros_like(x)
        for expert_id in range(self.num_experts):
            expert_mask = selected == expert_id
            if not torch.any(expert_mask):
                continue
            batch_idx, nth_expert = torch.where(expert_mask)
            output = self.experts[str(expert_id)](x[batch_idx])
            outputs = outputs.index_add(0, batch_idx, (output * scales[batch_idx, nth_expert, None]).to(x.dtype))
        return outputs


class TrtllmQwen3MoE(_Used):
    """A TensorRT-LLM decoder's MoE (``modeling_qwen3_moe.py``, ``modeling_mixtral.py``): ``gate`` Linear to the
    logits, the fused MoE module fed the hidden states and the logits."""

    def __init__(self, routing: Callable[[], TrtllmRoutingMethod]) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = TrtllmVanillaMoE(routing())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.experts(x, self.gate(x), forced=self.forced)
        self.used = self.experts.used
        return out.view(shape)


# NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_deepseekv3.py: ``Deepseekv3RoutingImpl.noaux_tc``'s torch
# path (no fused kernel), in two versions: the groups left out multiplied by a 0/1 mask (``scores_with_bias *
# score_mask``) or set to ``-inf`` (``torch.where``); then the top-k of the biased scores scattered into a 0/1 mask of
# the *unbiased* scores, those normalised and scaled, and a second ``torch.topk`` over the dense result gives the
# values and ids the MoE uses.
class TrtllmDeepseekV3Routing(TrtllmRoutingMethod):
    """``DeepSeekV3MoeRoutingMethod`` calling ``Deepseekv3RoutingImpl.apply(logits, e_score_correction_bias)``, the
    bias read from the gate through a callable (as upstream passes ``callable_e_score_correction_bias``)."""

    def __init__(
        self, bias: Callable[[], torch.Tensor], where: bool, n_group: int = 4, topk_group: int = 2, k: int = 2
    ) -> None:
        super().__init__(k)
        self.bias, self.where = bias, where
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, 2.5

    def apply(  # type: ignore[override]
        self, router_logits: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = torch.sigmoid(router_logits)
        scores_with_bias = scores + self.bias()
        shape = list(scores_with_bias.shape)
        group_scores = torch.sum(
            torch.topk(
                scores_with_bias.view([*shape[:-1], self.n_group, shape[-1] // self.n_group]),
                k=2,
                dim=-1,
                largest=True,
                sorted=True,
            )[0],
            dim=-1,
        )
        _, group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, largest=True, sorted=True)
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(-1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1).expand([*shape[:-1], self.n_group, shape[-1] // self.n_group]).reshape(shape)
        )
        if self.where:
            scores_with_bias = torch.where(score_mask.bool(), scores_with_bias, torch.tensor(float("-inf")))
        else:
            scores_with_bias = scores_with_bias * score_mask
        if forced is None:
            _, topk_idx = torch.topk(scores_with_bias, k=self.top_k, dim=-1, largest=True, sorted=True)
        else:
            topk_idx = forced
        new_mask = torch.zeros_like(scores)
        new_mask.scatter_(-1, topk_idx, 1)
        scores = scores * new_mask
        score_sum = torch.sum(scores, dim=-1, keepdim=True) + 1e-20
        scores = scores / score_sum * self.routed_scaling_factor
        topk_values, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, largest=True)
        return topk_indices.to(torch.int32), topk_values.to(torch.float32)


class TrtllmDeepseekV3Gate(nn.Module):
    """``DeepseekV3Gate``: the router GEMM only (``F.linear`` of its weight), the correction bias a frozen
    ``nn.Parameter`` on it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) / D**0.5)
        self.e_score_correction_bias = nn.Parameter(0.1 * torch.randn(E), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float())


class TrtllmDeepseekV3MoE(_Used):
    """``Deepseekv3MoE``: the gate's logits into the fused MoE, whose routing method reads the gate's bias; a shared
    expert beside."""

    def __init__(self, where: bool) -> None:
        super().__init__()
        self.gate = TrtllmDeepseekV3Gate()
        self.experts = TrtllmVanillaMoE(TrtllmDeepseekV3Routing(lambda: self.gate.e_score_correction_bias, where))
        self.shared_experts = nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.experts(x, self.gate(x), forced=self.forced)
        self.used = self.experts.used
        return (out + self.shared_experts(x)).view(shape)


# ----------------------------------------------------------------------- TensorRT-LLM's routing reference
# NVIDIA/TensorRT-LLM tests/unittest/_torch/thop/parallel/test_moe.py ``routing_reference_renormalize`` and
# ``routing_reference`` (also in alibaba/rtp-llm's fused-MoE executor tests): the top-k of the logits softmaxed, the
# values written into a dense ``[tokens, E]`` tensor one element at a time, then ``routing_reference`` takes a second
# ``torch.topk`` of that dense tensor *on the host* (``.cpu()``) and counts the tokens per expert in Python loops; the
# weights are read back with advanced indexing at the second top-k's ids.
class TrtllmReferenceRenormalizeMoE(_Used):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.top_k = k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def _routing_reference(self, expert_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        expert_logits = expert_logits.cpu()
        num_tokens, num_experts = expert_logits.shape
        num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64)
        _top_k_logits, top_k_indices = torch.topk(expert_logits, self.top_k, dim=1)
        for token_idx in range(num_tokens):
            for k in range(self.top_k):
                num_tokens_per_expert[top_k_indices[token_idx, k]] += 1
        return {"numTokensPerExpert": num_tokens_per_expert, "topKIndices": top_k_indices}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        expert_logits = self.router(x)
        if self.forced is None:
            topk_values, topk_idx = torch.topk(expert_logits, k=self.top_k, dim=-1)
        else:
            topk_idx, topk_values = self.forced, expert_logits.gather(-1, self.forced)
        topk_values = F.softmax(topk_values.float(), dim=-1)
        new_mask = torch.zeros_like(expert_logits)
        new_mask.scatter_(-1, topk_idx, 1)
        scores = expert_logits * new_mask
        for i in range(topk_idx.shape[0]):
            for j in range(topk_idx.shape[1]):
                scores[i, topk_idx[i, j]] = topk_values[i, j]
        permute_info = self._routing_reference(scores)
        topk_ids = permute_info["topKIndices"].to(torch.int32)
        self.used = topk_ids
        topk_weights = scores.view(x.shape[0], E)[torch.arange(x.shape[0]).unsqueeze(1), topk_ids]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, topk_weights[tok, slot, None] * expert(x[tok]))
        return out.view(shape)


# ----------------------------------------------------------------------- DiffMoE: a batch-level token pool
# yhlleo/DiffMoE (KwaiVGI's DiffMoE) models/models_DiffMoE.py ``SparseMoEBlock``: in training each expert takes the
# ``k = S / E * capacity`` best tokens of the whole batch (``torch.topk`` of the ``[E, S]`` softmax scores: expert
# choice over a global pool), and a capacity predictor's per-expert thresholds follow the k-th best prediction by EMA;
# in evaluation each expert takes as many tokens as the predictor puts above its threshold (a ``torch.topk`` per expert
# over the tokens, ``k`` a 0-dim tensor, 0 for some experts).
class DiffMoESparseMoEBlock(nn.Module):
    def __init__(self, capacity: float = 2.0) -> None:
        super().__init__()
        self.gate_weight = nn.Parameter(torch.randn(E, D) / D**0.5)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.capacity, self.num_experts = capacity, E
        self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
        self.register_buffer("expert_threshold", 0.5 + 0.05 * torch.randn(E))
        self.register_buffer("ema_decay", torch.tensor([0.95]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.forward_train(x) if self.training else self.forward_eval(x)

    def update_threshold(self, capacity_pred: torch.Tensor) -> None:
        capacity_pred = torch.sigmoid(capacity_pred)
        topk = int((capacity_pred.size(0) / self.num_experts) * self.capacity)
        threshold = self.expert_threshold
        for i in range(self.num_experts):
            capacity_pred_scores, _ = torch.topk(capacity_pred[:, i], k=topk, dim=-1, sorted=True)
            threshold[i] = threshold[i] * self.ema_decay + (1 - self.ema_decay) * capacity_pred_scores[-1].detach()
        if dist.is_available() and dist.is_initialized():  # (upstream all-reduces unconditionally)
            dist.all_reduce(threshold, op=dist.ReduceOp.SUM)
            threshold /= dist.get_world_size()
        self.expert_threshold = threshold

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, s, d = x.shape
        x = x.reshape(-1, d)
        n = x.shape[0]
        capacity_pred = self.capacity_predictor(x.detach())
        k = int((n / self.num_experts) * self.capacity)
        scores = F.linear(x, self.gate_weight).softmax(dim=-1).permute(1, 0)  # [E, S]
        gating, index = torch.topk(scores, k=k, dim=-1, sorted=False)
        mask = torch.zeros((self.num_experts, n), dtype=x.dtype).scatter(1, index, 1.0)
        expert_inputs = x[index]
        expert_outputs = torch.stack([expert(expert_inputs[i]) for i, expert in enumerate(self.experts)])
        gated = (gating.unsqueeze(-1) * expert_outputs).view(-1, d)
        offset = torch.arange(0, self.num_experts).unsqueeze(1) * n
        flat = (index + offset).view(-1)
        y = torch.zeros((n * self.num_experts, d), dtype=x.dtype).scatter(0, flat.unsqueeze(1).expand(-1, d), gated)
        y = y.view(self.num_experts, n, d).sum(dim=0)
        self.update_threshold(capacity_pred)
        return y.view(b, s, d), mask.permute(1, 0).view(b, s, self.num_experts), capacity_pred.view(b, s, -1)

    def forward_eval(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, s, d = x.shape
        x = x.reshape(-1, d)
        capacity_pred = torch.sigmoid(self.capacity_predictor(x.detach()))
        scores = F.linear(x, self.gate_weight).softmax(dim=-1).permute(-1, -2)
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            k_fixed = torch.where(capacity_pred[:, i] > self.expert_threshold[i], 1, 0).sum()
            gating, index = torch.topk(scores[i], k=int(k_fixed), dim=-1, sorted=False)
            y[index, :] += gating.unsqueeze(-1) * expert(x[index, :])
        return y.view(b, s, d), None, None


class DiffMoEDiTBlock(nn.Module):
    """The DiT block's MLP half: the norm, the MoE block, its output taken from the tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = DiffMoESparseMoEBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ones, _pred = self.mlp(self.norm2(x))
        return out


# ----------------------------------------------------------------------- a sequence router with uniform noise
# A research MoE "based on uclaml/MoE" (MoE_Visualization.ipynb), its ``moe.py``: the router a weight-standardised
# ``WSLinear`` (its ``init_std`` buffer filled from the weight on its first forward, a Python flag set) over the mean
# of each sequence's tokens; the gate a plain Python object (no module) whose ``compute`` takes the softmax, a
# ``torch.topk``, the softmax of the top values and one-hot masks summed into a ``[b, E, 1, 1]`` combine tensor, after
# ``perturbation`` adds ``torch.rand`` noise to the scores in training and evaluation alike; every expert runs on the
# whole batch masked by the combine tensor (``einsum``), the outputs weighed by it.
class WSLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.gain = nn.Parameter(torch.ones(out_features))
        self.buffer_initialized = False
        self.register_buffer("init_std", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=[1], keepdim=True)
        std = weight.std(dim=[1], keepdim=True) + 1e-5
        if not self.buffer_initialized:
            with torch.no_grad():
                self.init_std.copy_(std.flatten())
            self.buffer_initialized = True
        scale_factor = self.init_std.view(-1, 1) / std * self.gain.view(-1, 1)
        return F.linear(x, scale_factor * weight, self.bias)


class UclamlTopKGate:
    """``TopKGate(Gate)``: ``compute(x)`` for ``k > 1`` and its ``perturbation`` (``torch.rand`` for normal noise)."""

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def compute(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        x = F.softmax(x, dim=-1)
        if forced is None:
            topk_gate_scores, indices = torch.topk(x, self.k)
        else:
            topk_gate_scores, indices = x.gather(-1, forced), forced
        topk_gate_scores = F.softmax(topk_gate_scores, dim=1, dtype=torch.float).type_as(x)
        mask_flat = F.one_hot(indices, x.shape[-1]).float().sum(dim=-1)
        one_hot = F.one_hot(indices, x.shape[-1])[..., None, None]
        combine_tensor = (topk_gate_scores[..., None, None, None] * mask_flat[..., None, None, None] * one_hot).sum(1)
        return combine_tensor, indices, topk_gate_scores

    def perturbation(self, shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape)


class UclamlRouter(_Used):
    """``Router(AbstractRouter)``: ``_forward`` is the mean over the sequence of the ``WSLinear``'s logits, and
    ``forward`` hands them, perturbed, to the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = UclamlTopKGate()
        self.linear = WSLinear(D, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        expert_scores = self.linear(x).mean(dim=1)
        combine_tensor, indices, scores = self.gate.compute(
            expert_scores + self.gate.perturbation(expert_scores.shape), forced=self.forced
        )
        self.used = indices
        return combine_tensor, indices, scores


class UclamlMoE(nn.Module):
    """``MoE`` (sequence routing, not ``is_per_token``): the experts on the dispatched batch, combined by ``einsum``."""

    def __init__(self) -> None:
        super().__init__()
        self.expert_num = E
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.router = UclamlRouter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine_tensor, _, _ = self.router(x)
        dispatch_tensor = combine_tensor.bool().to(combine_tensor)
        expert_inputs = torch.einsum("bsn,beij->ebsn", x, dispatch_tensor)
        output = torch.stack([self.experts[i](expert_inputs[i]) for i in range(self.expert_num)])
        return torch.einsum("beij,ebsn->bsn", combine_tensor, output)


class UclamlCachedRouter(nn.Module):
    """The same file's ``CachedRouter``: the routing of its first call kept in a Python dict (``self.state``) and
    returned, with no choice made, to every later call until ``init`` clears it for the next batch; one instance is
    handed to every MoE layer, so the first layer routes and the others reuse its experts."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.state: dict[str, tuple[torch.Tensor, ...]] = {}

    def init(self) -> None:
        self.state.clear()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if "routing" in self.state:
            return self.state["routing"]
        out = self.router(x)
        self.state["routing"] = out
        return out


class UclamlCachedModel(nn.Module):
    """Two sequence-routed MoE layers sharing one cached router, the cache cleared as each batch starts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = UclamlCachedRouter(UclamlRouter())
        self.layers = nn.ModuleList([UclamlMoE(), UclamlMoE()])
        for layer in self.layers:
            layer.router = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layers[0].router.init()
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------- Primus: Megatron's router, balanced by force
# AMD-AGI/Primus primus/backends/megatron/core/transformer/moe/router.py ``BalancedTopKRouter(TopKRouter)``: Megatron's
# ``routing`` (a ``torch.topk`` of the logits, the softmax of the top values scattered into dense ``probs`` and a
# boolean ``routing_map``), then, with ``moe_router_force_load_balancing`` (for profiling), ``routing_map`` replaced
# by ``arange(...) % num_experts``: every token sent round-robin whatever the scores, the probs left as the top-k made
# them. The MoE layer runs each expert on the tokens of its column of the map, weighed by the probs there.
class PrimusBalancedTopKRouter(_Used):
    def __init__(self, force_load_balancing: bool = True) -> None:
        super().__init__()
        self.topk, self.num_experts, self.force_load_balancing = 2, E, force_load_balancing
        self.weight = nn.Parameter(torch.randn(E, D) / D**0.5)

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced is None:
            scores, top_indices = torch.topk(logits, k=self.topk, dim=1)
        else:
            top_indices, scores = self.forced, logits.gather(1, self.forced)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
        routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
        if self.force_load_balancing:
            indices = torch.arange(routing_map.sum()).view(routing_map.size(0), self.topk) % self.num_experts
            row = torch.arange(routing_map.size(0)).repeat_interleave(self.topk)
            routing_map = torch.zeros_like(routing_map, dtype=torch.bool).index_put_(
                (row, indices.view(-1)), torch.ones(1, dtype=torch.bool)
            )
        self.used = routing_map.nonzero()[:, 1].view(routing_map.size(0), -1)
        return routing_probs, routing_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.routing(F.linear(x.float(), self.weight.float()))


class PrimusMoELayer(nn.Module):
    def __init__(self, force_load_balancing: bool = True) -> None:
        super().__init__()
        self.router = PrimusBalancedTopKRouter(force_load_balancing)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs, routing_map = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = routing_map[:, e].nonzero().squeeze(-1)
            if tok.numel():
                out = out.index_add(0, tok, probs[tok, e, None].to(x.dtype) * expert(x[tok]))
        return out.view(shape)


# ----------------------------------------------------------------------- the cases
def _trtllm(routing: Callable[[], TrtllmRoutingMethod]) -> Callable[[], nn.Module]:
    return lambda: Layers(lambda: TrtllmQwen3MoE(routing))


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "trtllm-default-softmax-topk": (_trtllm(TrtllmDefaultRouting), lambda: _x(2, 12), {}),
    "trtllm-default-softmax-topk-train": (_trtllm(TrtllmDefaultRouting), lambda: _x(2, 12), {"train": True}),
    "trtllm-renormalize-topk-softmax": (_trtllm(TrtllmRenormalizeRouting), lambda: _x(2, 12), {}),
    "trtllm-llama4-top1-sigmoid": (_trtllm(TrtllmLlama4Routing), lambda: _x(2, 12), {}),
    "trtllm-deepseekv3-noaux-tc-where": (lambda: Layers(lambda: TrtllmDeepseekV3MoE(True)), lambda: _x(2, 12), {}),
    "trtllm-deepseekv3-noaux-tc-mask-product": (
        lambda: Layers(lambda: TrtllmDeepseekV3MoE(False)),
        lambda: _x(2, 12),
        {},
    ),
    "trtllm-routing-reference-renormalize": (one_layer(TrtllmReferenceRenormalizeMoE), lambda: _x(2, 12), {}),
    "primus-megatron-topk-router-unforced": (lambda: Layers(lambda: PrimusMoELayer(False)), lambda: _x(2, 12), {}),
    "uclaml-sequence-router-uniform-noise": (lambda: Layers(UclamlMoE), lambda: _x(3, 8), {}),
    "uclaml-sequence-router-uniform-noise-train": (lambda: Layers(UclamlMoE), lambda: _x(3, 8), {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """TensorRT-LLM's routing methods called through ``apply`` by a vanilla fused MoE (softmax then top-k, top-k then
    softmax, Llama-4's top-1 sigmoid, DeepSeek-V3's ``noaux_tc`` with its groups masked by ``-inf`` or by a product
    and a second top-k of the dense scores) and its test suite's routing reference (a second top-k on the host),
    Megatron's router as Primus subclasses it, a sequence router whose gate is a plain object adding uniform noise:
    every router found and nothing else, the recorded rows the experts used, and a replay after the routers change
    those experts forced by hand, in output and gradients.

    Once falsely refused: a block whose fused experts module makes the choice in a method of a routing object it
    holds (``self.routing_method.apply(logits)``, not a ``forward``) was read as soft routing; and DeepSeek-V3's second
    top-k, which only reads the decision back from scores masked to its experts, was taken for a later choice of its
    own (held on other inputs with the values of the first, the hidden states moved)."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="silent: the experts used are replaced after the decision by a rule that reads no score (round-robin "
    "by position), so the routes record the top-k's experts, which the layer did not use; nothing tells the "
    "decision's indices from the experts the output is made of",
)
@pytest.mark.reliability("silent replays")
def test_a_routing_map_replaced_round_robin_after_the_top_k_is_refused_or_recorded_as_used() -> None:
    """Primus's ``BalancedTopKRouter`` with ``moe_router_force_load_balancing``: Megatron's top-k makes the probs,
    then the routing map is replaced by ``arange % num_experts``. The experts used are not the top-k's: a capture
    must record the experts used or be refused, not hand on the top-k's experts as the routes."""
    assert_exact(Layers(lambda: PrimusMoELayer(True)), _x(2, 12))


def _static() -> TrtllmRoutingMethod:
    return TrtllmStaticRouting(torch.randint(0, E, (24, 2), generator=torch.Generator().manual_seed(2)).int())


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "routing",
    [TrtllmLoadBalancedRouting, _static],
    ids=["load-balanced-round-robin", "static-routing-tensor"],
)
def test_routing_methods_that_ignore_the_scores_are_refused(routing: Callable[[], TrtllmRoutingMethod]) -> None:
    """TensorRT-LLM's benchmark and test routing methods send tokens to experts that no score chose (round-robin, or
    a fixed tensor): there is no decision to record or force, so attaching is refused, the model as it was."""
    assert_refused(_trtllm(routing)(), _x(2, 12), "calls no topk, argmax, max or sort, so it makes no expert choice")


@pytest.mark.reliability("silent replays")
def test_a_sparse_mixer_of_k_rounds_of_max_is_refused() -> None:
    """TensorRT-LLM's torch SparseMixer: ``k`` rounds of ``torch.max``, each round's ``argmax`` masking the previous
    round's expert in place, each weight a softmax masked around its round's max. Its choice is spread over ``k``
    calls that each reach the output, none of them the whole decision (as HF PhiMoE's sparsemixer): refused, naming
    the calls, never replayed as one of them."""
    assert_refused(_trtllm(TrtllmSparseMixerRouting)(), _x(2, 12), r"more than one independent choice.*max\(\) over 8")


@pytest.mark.reliability("silent replays")
def test_a_routing_cached_by_the_first_layer_and_reused_by_the_others_is_refused() -> None:
    """One ``CachedRouter`` shared by both layers: the second call returns the first call's routing from a Python
    dict, with no choice made. The second layer's experts are no decision of its own to record or force: refused,
    naming it. The first layer's forward has run by then, as its own code runs it (its ``WSLinear`` filled its
    ``init_std`` and set its flag, a first forward's work that restoring the buffer alone would break), so the
    model is checked to be left working as a copy never attached works, with no interception left."""
    model, x = UclamlCachedModel().eval(), _x(3, 8)
    ref = copy.deepcopy(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"'layers\.1\.router'.*makes no decision-like call"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    assert torch.equal(out, ref(x))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [True, False], ids=["train-global-pool", "eval-predicted-capacity"])
def test_diffmoe_expert_choice_over_the_batch_pool_is_refused(train: bool) -> None:
    """DiffMoE's block: each expert chooses its tokens from the whole batch (training), or as many as its capacity
    predictor lets through (evaluation, a ``topk`` per expert over the tokens with a data-dependent ``k``). Expert
    choice: refused, the model as it was (its EMA thresholds included)."""
    match = "expert-choice routing" if train else "a top-k across tokens"
    assert_refused(Layers(DiffMoEDiTBlock), _x(2, 12), match, train=train)
