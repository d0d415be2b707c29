"""MoE code of multimodal, speech, vision and diffusion models, with zero configuration (see ``test_public_routers23``).

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
from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused


class _MLP(nn.Module):
    """A SwiGLU MLP (the shared expert, the projections and the dense feed-forwards below)."""

    def __init__(self, d_in: int = D, hidden: int = 2 * D, d_out: int = D) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_in, hidden, bias=False)
        self.up_proj = nn.Linear(d_in, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------- Qwen3-Omni: thinker and talker MoE
# huggingface/transformers src/transformers/models/qwen3_omni_moe/modeling_qwen3_omni_moe.py
# (``Qwen3OmniMoeThinkerTextTopKRouter``, ``Qwen3OmniMoeThinkerTextSparseMoeBlock``,
# ``Qwen3OmniMoeTalkerTextTopKRouter``, ``Qwen3OmniMoeTalkerTextSparseMoeBlock``, ``Qwen3OmniMoeTalkerResizeMLP``
# and ``Qwen3OmniMoeForConditionalGeneration``'s use of ``accept_hidden_layer``): both routers hold a ``weight
# [E, d]`` (no Linear), ``F.linear``, a float softmax, ``torch.topk`` of the probs, renormalised in place
# (``norm_topk_prob``); the thinker's block is the routed experts alone, the talker's adds a shared expert scaled by
# ``sigmoid(shared_expert_gate(x))`` (a ``Linear(d, 1)``). The talker reads the thinker's hidden state after layer
# ``accept_hidden_layer`` through ``hidden_projection`` (a resize MLP), not its last one.
class Qwen3OmniTopKRouter(_Used):
    def __init__(self, n: int = E, k: int = 2, norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob, self.hidden_dim = k, n, norm_topk_prob, D
        self.weight = nn.Parameter(torch.randn(n, D) / math.sqrt(D))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        if self.forced is None:
            router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        else:
            router_indices = self.forced
            router_top_value = router_probs.gather(-1, router_indices)
        self.used = router_indices
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices


class Qwen3OmniThinkerSparseMoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()
        self.gate = Qwen3OmniTopKRouter()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden_states.shape
        flat = hidden_states.view(-1, d)
        _, routing_weights, selected_experts = self.gate(flat)
        return dispatch(self.experts, flat, selected_experts, routing_weights).reshape(b, s, d)


class Qwen3OmniTalkerSparseMoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Qwen3OmniTopKRouter()
        self.experts = Experts()
        self.shared_expert = _MLP()
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden_states.shape
        flat = hidden_states.view(-1, d)
        shared_expert_output = self.shared_expert(flat)
        _, routing_weights, selected_experts = self.gate(flat)
        expert_output = dispatch(self.experts, flat, selected_experts, routing_weights)
        shared_expert_output = torch.sigmoid(self.shared_expert_gate(flat)) * shared_expert_output
        return (expert_output + shared_expert_output).reshape(b, s, d)


class Qwen3OmniThinkerTalker(nn.Module):
    """Three thinker MoE layers; the talker (two MoE layers with a shared expert) reads the thinker's hidden state
    after layer ``accept_hidden_layer`` through ``hidden_projection``. Returns both streams (the thinker's text
    logits and the talker's codec logits both train)."""

    def __init__(self, accept_hidden_layer: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.thinker = nn.ModuleList(Qwen3OmniThinkerSparseMoeBlock() for _ in range(3))
        self.hidden_projection = _MLP()
        self.talker = nn.ModuleList(Qwen3OmniTalkerSparseMoeBlock() for _ in range(2))
        self.accept_hidden_layer = accept_hidden_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_states = [x]
        for layer in self.thinker:
            x = x + layer(F.rms_norm(x, (D,)))  # (each decoder layer's ``post_attention_layernorm``)
            hidden_states.append(x)
        talker = self.hidden_projection(hidden_states[self.accept_hidden_layer])
        for layer in self.talker:
            talker = talker + layer(F.rms_norm(talker, (D,)))
        return torch.cat([x, talker], dim=-1)


# ----------------------------------------------------------------------- LIMoE: one router for images and text
# LIMoE (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE") over the V-MoE router it is built on,
# google-research/vmoe vmoe/nn/routing.py (``NoisyTopExpertsPerItemRouter``, ``_get_top_experts_per_item_common``):
# image patches and text tokens of a pair in one group, one router for both; top-1 (``num_selected_experts=1``),
# Gaussian noise of ``noise_std / E`` on the logits in training, softmax gates; each expert's buffer filled by a
# cumulative sum over the items (with batch priority routing: items sorted by their top gate first), items past the
# capacity dropped; the per-modality local entropy (mean of each token's entropy) and global entropy (entropy of the
# mean gates, counted only above a threshold) as the auxiliary losses, over the gates, not the choice.
class LIMoERouter(_Used):
    """Over groups ``[G, S, d]`` (one pair each); ``used``: the expert each item chose (an item past its expert's
    capacity in its group is dropped by its place, which a replay of the same batch repeats)."""

    def __init__(self, batch_priority: bool, capacity_factor: float, tau: float = 1.0) -> None:
        super().__init__()
        self.num_experts, self.num_selected_experts, self.noise_std = E, 1, 1.0
        self.batch_priority, self.capacity_factor, self.tau = batch_priority, capacity_factor, tau
        self.dense = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor, is_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates_logits = self.dense(x)
        if self.training and self.noise_std > 0:
            gates_logits = gates_logits + self.noise_std / self.num_experts * torch.randn_like(gates_logits)
        gates = F.softmax(gates_logits, dim=-1)
        self.aux_loss = self._entropy_losses(gates, is_text)
        num_groups, group_size, _ = gates.shape
        k = self.num_selected_experts
        if self.forced is None:
            top_gate, top_expert = torch.topk(gates, k, dim=-1)
        else:
            top_expert = self.forced.view(num_groups, group_size, k)
            top_gate = gates.gather(-1, top_expert)
        capacity = math.ceil(k * group_size * self.capacity_factor / self.num_experts)
        if self.batch_priority:
            perm = torch.argsort(-top_gate[..., 0], dim=-1)
        else:
            perm = torch.arange(group_size).expand(num_groups, group_size)
        ordered = torch.take_along_dim(top_expert, perm[..., None], dim=1)
        one_hot = F.one_hot(ordered.transpose(1, 2).reshape(num_groups, -1), self.num_experts)
        buffer_idx = (torch.cumsum(one_hot, dim=1) * one_hot).sum(-1) - 1
        buffer_idx = buffer_idx.view(num_groups, k, group_size).transpose(1, 2)
        buffer_idx = torch.take_along_dim(buffer_idx, torch.argsort(perm, dim=-1)[..., None], dim=1)
        keep = buffer_idx < capacity
        self.used = top_expert.reshape(-1, k)
        return top_expert, top_gate * keep

    def _entropy_losses(self, gates: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
        loss = gates.new_zeros(())
        for modality in (is_text, ~is_text):
            p = gates[:, modality]
            local = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
            mean = p.mean((0, 1))
            global_entropy = -(mean * mean.clamp_min(1e-9).log()).sum()
            loss = loss + local - torch.clamp(global_entropy, max=self.tau)
        return loss


class LIMoEMoeLayer(nn.Module):
    """Each sequence one group (a pair: the image patches, then the text tokens), routed together; a dropped item
    gets zero."""

    def __init__(self, batch_priority: bool = False, capacity_factor: float = float(E)) -> None:
        super().__init__()
        self.router = LIMoERouter(batch_priority, capacity_factor)
        self.experts = Experts()
        self.num_image_tokens = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        is_text = torch.arange(s) >= self.num_image_tokens
        idx, w = self.router(x, is_text)
        return dispatch(self.experts, x.reshape(-1, d), idx.reshape(b * s, -1), w.reshape(b * s, -1)).view_as(x)


# ----------------------------------------------------------------------- V-MoE E^3: efficient ensembles
# google-research/vmoe vmoe/nn/ensemble_routing.py (``NoisyTopExpertsPerItemEnsembleRouter``,
# ``reshape_to_group_size_representation``, ``reshape_from_diag_blocks``) and vmoe/nn/vit_moe_ensemble.py (Allingham
# et al. 2022, "Sparse MoEs meet Efficient Ensembles"): the image batch repeated M times (one copy per ensemble
# member), every group holding the members' copies of its tokens interleaved (``(B, M, T) -> (B, T, M)``); each
# member has its own router kernel (``nn.vmap`` over the params) giving softmax gates over its E / M experts, the
# members' gates laid out as a block diagonal over all E experts (zeros outside the member's block), then the plain
# V-MoE top-k over the E-wide gates and the buffers filled by place; the members' outputs averaged at the end.
class VMoEEnsembleRouter(_Used):
    def __init__(self, ensemble_size: int = 2, num_selected_experts: int = 2) -> None:
        super().__init__()
        self.ensemble_size, self.num_experts, self.num_selected_experts = ensemble_size, E, num_selected_experts
        self.noise_std, self.capacity_factor = 1.0, 2.0
        self.kernel = nn.Parameter(torch.randn(ensemble_size, D, E // ensemble_size) / math.sqrt(D))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_groups, group_size, hidden = inputs.shape
        m = self.ensemble_size
        x = inputs.reshape(num_groups, group_size // m, m, hidden)
        logits = torch.einsum("gsmh,mhe->gmse", x, self.kernel)  # (G, M, S / M, E / M)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std / (self.num_experts // m) * torch.randn_like(logits)
        gates = F.softmax(logits, dim=-1)
        diag = torch.einsum("gmse,mn->gmsne", gates, torch.eye(m)).reshape(num_groups, m, group_size // m, E)
        gates_softmax = diag.transpose(1, 2).reshape(num_groups, group_size, E)
        k = self.num_selected_experts
        if self.forced is None:
            top_gate, top_expert = torch.topk(gates_softmax, k, dim=-1)
        else:
            top_expert = self.forced.view(num_groups, group_size, k)
            top_gate = gates_softmax.gather(-1, top_expert)
        self.used = top_expert.reshape(-1, k)
        capacity = math.ceil(k * group_size * self.capacity_factor / E)
        one_hot = F.one_hot(top_expert.transpose(1, 2).reshape(num_groups, -1), E)
        buffer_idx = (torch.cumsum(one_hot, dim=1) * one_hot).sum(-1) - 1
        keep = buffer_idx.view(num_groups, k, group_size).transpose(1, 2) < capacity
        return top_expert, top_gate * keep


class VMoEEnsembleLayer(nn.Module):
    def __init__(self, ensemble_size: int = 2) -> None:
        super().__init__()
        self.ensemble_size = ensemble_size
        self.router = VMoEEnsembleRouter(ensemble_size)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bm, t, h = x.shape
        m = self.ensemble_size
        groups = x.reshape(bm // m, m, t, h).transpose(1, 2).reshape(bm // m, t * m, h)
        idx, w = self.router(groups)
        flat = groups.reshape(-1, h)
        out = dispatch(self.experts, flat, idx.reshape(flat.shape[0], -1), w.reshape(flat.shape[0], -1))
        return out.reshape(bm // m, t, m, h).transpose(1, 2).reshape(bm, t, h)


class VMoEEnsemble(nn.Module):
    def __init__(self, ensemble_size: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ensemble_size = ensemble_size
        self.layers = nn.ModuleList(VMoEEnsembleLayer(ensemble_size) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.ensemble_size, dim=0)  # (``jnp.repeat`` of the images)
        for layer in self.layers:
            x = x + layer(x)
        return x.reshape(-1, self.ensemble_size, *x.shape[1:]).mean(1)


# ----------------------------------------------------------------------- Uni-MoE-2.0-Omni: dynamic capacity
# HITsz-TMG/Uni-MoE (Uni-MoE-2.0-Omni, "Dynamic Capacity MoE"): routed experts chosen by top-P, the fewest experts
# whose probabilities reach ``p`` (a descending ``sort`` and a cumulative sum), at most ``max_k``; null experts in
# the routed pool (a token sent to one computes nothing there) and shared experts always on.
class UniMoE2DynamicCapacityRouter(_Used):
    def __init__(self, top_p: float = 0.5, max_k: int = 3, null_experts: int = 2) -> None:
        super().__init__()
        self.top_p, self.max_k, self.null_experts = top_p, max_k, null_experts
        self.gate = nn.Linear(D, E + null_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1)
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.top_p
        idx, w = sorted_idx[:, : self.max_k], (sorted_probs * keep)[:, : self.max_k]
        self.used = idx.masked_fill(~keep[:, : self.max_k] | (idx >= E), -1)
        return w, idx


class UniMoE2DynamicCapacityMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = UniMoE2DynamicCapacityRouter()
        self.experts = Experts()
        self.shared_experts = _MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        is_null = idx >= E
        routed = dispatch(self.experts, x, idx.masked_fill(is_null, 0), w.masked_fill(is_null, 0.0))
        return routed + self.shared_experts(x)


# ----------------------------------------------------------------------- EC-DiT: expert choice per image
# EC-DiT (Sun et al. 2024, "EC-DiT: Scaling Diffusion Transformers with Adaptive Expert-Choice Routing"): the router
# ``Linear`` over the image's tokens, a softmax over the experts, and each expert picks its ``capacity`` tokens of
# the image (``topk`` over the token axis of ``[b, E, n]``, capacity ``n * f / E``): a token gets anywhere from 0
# to E experts; the outputs combined by the gates at the picked places.
class ECDiTRouter(_Used):
    def __init__(self, capacity_factor: float = 2.0) -> None:
        super().__init__()
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softmax(self.gate(x), dim=-1).transpose(1, 2)  # [b, E, n]
        capacity = int(x.shape[1] * self.capacity_factor / E)
        gates, token_index = torch.topk(scores, capacity, dim=-1)
        self.used = token_index
        return gates, token_index


class ECDiTMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = ECDiTRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, token_index = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            picked = torch.gather(x, 1, token_index[:, e, :, None].expand(-1, -1, x.shape[-1]))
            y = gates[:, e, :, None] * expert(picked)
            out = out.scatter_add(1, token_index[:, e, :, None].expand(-1, -1, x.shape[-1]), y)
        return out


# ----------------------------------------------------------------------- PanGu-Sigma: random routed experts
# PanGu-Sigma (Ren et al. 2023, "PanGu-Sigma: Towards Trillion Parameter Language Model with Sparse Heterogeneous
# Computing", section "Random Routed Experts"): the experts split into one group per domain; a token goes to the group
# of its domain, and inside it to the expert a fixed random table maps its token id to (no gate, no scores, weight
# 1). Rebuilt from the paper's description: the table a buffer, ``[domains, vocab]`` of expert ids within a group.
class PanguSigmaRRE(nn.Module):
    def __init__(self, vocab: int, domains: int = 2) -> None:
        super().__init__()
        self.experts_per_domain = E // domains
        table = torch.randint(self.experts_per_domain, (domains, vocab), generator=torch.Generator().manual_seed(5))
        self.register_buffer("rre_table", table)
        self.experts = Experts()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        expert = domain[:, None] * self.experts_per_domain + self.rre_table[domain[:, None], token_ids]
        flat = x.reshape(-1, d)
        idx = expert.reshape(-1, 1)
        return dispatch(self.experts, flat, idx, torch.ones_like(idx, dtype=x.dtype)).reshape(b, s, d)


class PanguSigma(nn.Module):
    VOCAB = 64

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(self.VOCAB, D)
        self.layers = nn.ModuleList(PanguSigmaRRE(self.VOCAB) for _ in range(2))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        domain = torch.arange(token_ids.shape[0]) % 2
        x = self.embed(token_ids)
        for layer in self.layers:
            x = x + layer(x, token_ids, domain)
        return x


def _token_ids() -> torch.Tensor:
    return torch.randint(PanguSigma.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


# ----------------------------------------------------------------------- Mono-InternVL: a visual expert by mask
# OpenGVLab/Mono-InternVL, as vllm-project/vllm vllm/model_executor/models/internlm2_ve.py runs it
# (``InternLM2VEDecoderLayer``): every layer holds the frozen text ``feed_forward`` and a visual ``feed_forward_ve``;
# the tokens that the ``visual_token_mask`` marks (the image's patches, known from the prompt) go through the visual
# one, the others through the text one. No router: the split is fixed by the input, not chosen.
class InternLM2VEDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feed_forward = _MLP()
        self.feed_forward_ve = _MLP()

    def forward(self, hidden_states: torch.Tensor, visual_token_mask: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(hidden_states)
        out[visual_token_mask] = self.feed_forward_ve(hidden_states[visual_token_mask])
        out[~visual_token_mask] = self.feed_forward(hidden_states[~visual_token_mask])
        return hidden_states + out


class MonoInternVL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(InternLM2VEDecoderLayer() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visual_token_mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        visual_token_mask[:, 1:7] = True
        for layer in self.layers:
            x = layer(x, visual_token_mask)
        return x


# ----------------------------------------------------------------------- SpeechMoE2: utterance-level router input
# SpeechMoE2 (You et al. 2021, "SpeechMoE2: Mixture-of-Experts Model with Improved Routing"): every MoE layer's
# router reads the layer's frame, the frame's embedding from a shared embedding network over the acoustic input (as
# SpeechMoE), and a global embedding of the whole utterance (its mean frame through a small network, the domain and
# accent information); a softmax over the experts, top-1, the expert's output scaled by its gate; the sparsity L1
# and mean importance losses over the gates.
class SpeechMoE2Router(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * D, E)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
        g = global_embedding[:, None, :].expand_as(h)
        gates = F.softmax(self.linear(torch.cat([h, embedding, g], dim=-1)), dim=-1)
        unit = gates / gates.norm(dim=-1, keepdim=True)
        self.aux_loss = unit.abs().sum(-1).mean() + gates.mean((0, 1)).square().sum() * E
        if self.forced is None:
            w, idx = gates.max(dim=-1, keepdim=True)
        else:
            idx = self.forced.view(*h.shape[:2], 1)
            w = gates.gather(-1, idx)
        self.used = idx.reshape(-1, 1)
        return w, idx


class SpeechMoE2Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = SpeechMoE2Router()
        self.experts = Experts()

    def forward(self, h: torch.Tensor, embedding: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(h, embedding, global_embedding)
        flat = h.reshape(-1, D)
        return dispatch(self.experts, flat, idx.reshape(-1, 1), w.reshape(-1, 1)).view_as(h)


class SpeechMoE2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding_network = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.global_network = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.layers = nn.ModuleList(SpeechMoE2Layer() for _ in range(2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding_network(features)
        global_embedding = self.global_network(features.mean(1))
        h = features
        for layer in self.layers:
            h = h + layer(h, embedding, global_embedding)
        return h


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "qwen3-omni-thinker-talker": (Qwen3OmniThinkerTalker, lambda: _x(2, 6), {}),
    "qwen3-omni-thinker-talker-train": (Qwen3OmniThinkerTalker, lambda: _x(2, 6), {"train": True}),
    # (the capacity E times the even share: nothing dropped)
    "limoe-image-and-text-one-router": (lambda: Layers(LIMoEMoeLayer), lambda: _x(2, 12), {}),
    "limoe-image-and-text-one-router-train": (lambda: Layers(LIMoEMoeLayer), lambda: _x(2, 12), {"train": True}),
    # (the capacity the even share: items past it dropped by their place in the group)
    "limoe-capacity-by-place": (
        lambda: Layers(lambda: LIMoEMoeLayer(capacity_factor=1.0)),
        lambda: _x(2, 12),
        {},
    ),
    "limoe-capacity-by-place-train": (
        lambda: Layers(lambda: LIMoEMoeLayer(capacity_factor=1.0)),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "vmoe-efficient-ensemble-block-diagonal-gates": (VMoEEnsemble, lambda: _x(2, 6), {}),
    "vmoe-efficient-ensemble-block-diagonal-gates-train": (VMoEEnsemble, lambda: _x(2, 6), {"train": True}),
    "speechmoe2-utterance-embedding": (SpeechMoE2, lambda: _x(2, 10), {}),
    "speechmoe2-utterance-embedding-train": (SpeechMoE2, lambda: _x(2, 10), {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Qwen3-Omni's thinker and talker MoE (routers holding a bare ``weight``; the talker's shared expert behind a
    ``Linear(d, 1)`` sigmoid gate; the talker fed by a middle thinker layer through a projection); LIMoE's one
    top-1 router over a pair's image patches and text tokens (noisy in training, entropy losses per modality,
    nothing past the capacity); SpeechMoE2's router reading the frame, its embedding and an utterance-level
    embedding (a top-1 by ``max``): every router found and nothing else, the recorded rows the experts used, and a
    replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    # (items sorted by their current top gate before the buffers fill: a token dropped by score)
    "limoe-batch-priority-routing": (
        lambda: Layers(lambda: LIMoEMoeLayer(batch_priority=True, capacity_factor=1.0)),
        lambda: _x(2, 12),
        r"'layers\.0\.router': after its decision .* chooses again from the current scores",
        {},
    ),
    "limoe-batch-priority-routing-train": (
        lambda: Layers(lambda: LIMoEMoeLayer(batch_priority=True, capacity_factor=1.0)),
        lambda: _x(2, 12),
        r"'layers\.0\.router': after its decision .* chooses again from the current scores",
        {"train": True},
    ),
    # (the number of experts a token uses read from the current probabilities after the sort: a choice again)
    "uni-moe-2-dynamic-capacity-top-p": (
        lambda: Layers(UniMoE2DynamicCapacityMoE),
        _x,
        r"'layers\.0\.router': its experts are chosen by a sort of the scores",
        {},
    ),
    "ec-dit-expert-choice-per-image": (lambda: Layers(ECDiTMoE), lambda: _x(2, 16), r"expert-choice routing", {}),
    "pangu-sigma-random-routed-experts": (PanguSigma, _token_ids, r"no MoE router found", {}),
    "mono-internvl-visual-expert-by-mask": (MonoInternVL, lambda: _x(2, 10), r"no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """LIMoE with batch priority routing (the items sorted by their top gate before the capacity is filled); EC-DiT's
    expert choice over each image's tokens (no per-token choice to record); PanGu-Sigma's random routed experts (a
    fixed table from token id to expert: nothing chosen); Mono-InternVL's visual expert (tokens split by a mask the
    input fixes: no router): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


# ----------------------------------------------------------------------- Qwen3-Omni's talker, the real code
# huggingface/transformers src/transformers/models/qwen3_omni_moe/modeling_qwen3_omni_moe.py
# (``Qwen3OmniMoeTalkerModel``): the talker text model as transformers builds it (a tiny random config; no
# download), fed embeddings as the talker is (the thinker's projected hidden states). The transformers sweep
# cannot build it alone (its config is a sub-config of the composite model), so it is checked here.
def _talker() -> nn.Module:
    pytest.importorskip("transformers.models.qwen3_omni_moe")
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerTextConfig

    config = Qwen3OmniMoeTalkerTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = modeling.Qwen3OmniMoeTalkerModel(config).eval()
    with torch.no_grad():  # (its init leaves the routers' weights at zero and the expert tables unset)
        for name, p in model.named_parameters():
            if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    return model


def _force_talker_router(router: nn.Module, rows: torch.Tensor) -> None:
    """``Qwen3OmniMoeTalkerTextTopKRouter.forward`` with ``rows`` in place of its ``topk``, by hand."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states, router.weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value = router_probs.gather(-1, rows)
        if router.norm_topk_prob:
            router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), rows

    router.forward = forward  # type: ignore[method-assign]


@pytest.mark.reliability("silent replays")
def test_qwen3_omni_talker_of_transformers_replays_the_recorded_experts() -> None:
    """The real ``Qwen3OmniMoeTalkerModel``: its two routers found (not the ``shared_expert_gate`` beside them),
    and after the routers change, a replay's output and router gradients are those of the recorded experts forced
    by hand into a copy never attached, while a free forward chooses other experts."""
    model = _talker()
    ref = copy.deepcopy(model)
    embeds = _x(2, 6, seed=3).repeat(1, 1, 2)
    with mr.attach(model) as session:
        assert session.names == ("layers.0.mlp.gate", "layers.1.mlp.gate")
        with torch.no_grad(), session.capture():
            model(inputs_embeds=embeds)
        routes = session.routes()
        rows = [routes.layer(name).long() for name in session.names]
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for m in (model, ref):
                for name in session.names:
                    gate = m.get_submodule(name)
                    gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator))
                generator.manual_seed(7)
        with torch.no_grad(), session.capture():
            model(inputs_embeds=embeds)
        free = session.routes()
        assert any(not torch.equal(free.layer(n).long(), r) for n, r in zip(session.names, rows, strict=True))
        for name, r in zip(session.names, rows, strict=True):
            _force_talker_router(ref.get_submodule(name), r)
        expected = ref(inputs_embeds=embeds).last_hidden_state
        expected.square().sum().backward()
        with session.replay(routes), session.capture():
            replayed = model(inputs_embeds=embeds).last_hidden_state
        again = session.routes()
        replayed.square().sum().backward()
        for name, r in zip(session.names, rows, strict=True):
            assert torch.equal(again.layer(name).long(), r), name
            grad = model.get_submodule(name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
            assert torch.equal(grad, ref.get_submodule(name).weight.grad), name
        assert torch.equal(replayed, expected)


# ----------------------------------------------------------------------- ERNIE-4.5-VL: a router per modality, real
# huggingface/transformers src/transformers/models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py
# (``Ernie4_5_VLMoeMoeBlock``, ``Ernie4_5_VLMoeMoeTopKRouter``): every MoE layer holds a text MoE and a vision MoE,
# each with its own router; ``moe_mm_token_type_ids`` sends the text tokens through the one and the image tokens
# through the other (boolean indexing, a different number of rows for each), plus a shared expert; the router's top-k
# runs on the softmax plus ``e_score_correction_bias``, the weights gathered from the unbiased softmax. The
# transformers sweep runs text only, where the vision routers stay idle: here a batch mixes both.
def _force_ernie_router(router: nn.Module, rows: torch.Tensor) -> None:
    """``Ernie4_5_VLMoeMoeTopKRouter.forward`` with ``rows`` in place of its ``topk``, by hand."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states.float(), router.weight.float())
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights = torch.gather(routing_weights, dim=-1, index=rows)
        routing_weights = routing_weights / torch.clamp(routing_weights.sum(dim=-1, keepdim=True), min=router.norm_min)
        return router_logits, routing_weights.to(hidden_states.dtype), rows

    router.forward = forward  # type: ignore[method-assign]


@pytest.mark.reliability("silent replays")
def test_ernie_4_5_vl_text_and_vision_routers_on_a_mixed_batch_replay_exactly() -> None:
    """The real ERNIE-4.5-VL language model on a batch of text and image tokens (a different number of each): both
    routers of every MoE layer found and recorded (each its own rows), and after the routers change, a replay's
    output and router gradients are those of the recorded experts forced by hand into a copy never attached, while
    a free forward chooses other experts."""
    pytest.importorskip("transformers.models.ernie4_5_vl_moe")
    from tests import hf_sweep

    built = hf_sweep.build("ernie4_5_vl_moe")
    assert not isinstance(built, str)
    model = built.model.get_submodule("model.language_model").eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # (the tiny build leaves the routers at zero and the correction bias at zero)
        for name, p in model.named_parameters():
            if name.endswith("_moe.gate.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    ref = copy.deepcopy(model)
    hidden = model.config.hidden_size
    token_types = torch.zeros(2, 8, dtype=torch.long)
    token_types[:, 2:5] = 1
    token_types[1, 5] = 1
    inputs = {"inputs_embeds": torch.randn(2, 8, hidden, generator=generator), "moe_mm_token_type_ids": token_types}
    gates = [n for n, _ in model.named_modules() if n.endswith(("text_moe.gate", "vision_moe.gate"))]
    with mr.attach(model) as session:
        assert list(session.names) == gates and any("vision" in n for n in gates)
        with torch.no_grad(), session.capture():
            model(**inputs)
        routes = session.routes()
        rows = {n: routes.layer(n).long() for n in session.names}
        vision, text = int(token_types.sum()), int((token_types == 0).sum())
        assert {n: r.shape[0] for n, r in rows.items()} == {n: vision if "vision" in n else text for n in gates}
        with torch.no_grad():
            for name in session.names:
                weight = torch.randn(model.get_submodule(name).weight.shape, generator=generator)
                model.get_submodule(name).weight.copy_(weight)
                ref.get_submodule(name).weight.copy_(weight)
        with torch.no_grad(), session.capture():
            model(**inputs)
        free = session.routes()
        assert all(not torch.equal(free.layer(n).long(), rows[n]) for n in session.names)
        for name in session.names:
            _force_ernie_router(ref.get_submodule(name), rows[name])
        expected = ref(**inputs).last_hidden_state
        expected.square().sum().backward()
        with session.replay(routes), session.capture():
            replayed = model(**inputs).last_hidden_state
        again = session.routes()
        replayed.square().sum().backward()
        for name in session.names:
            assert torch.equal(again.layer(name).long(), rows[name]), name
            grad = model.get_submodule(name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
            assert torch.equal(grad, ref.get_submodule(name).weight.grad), name
        assert torch.equal(replayed, expected)


def _dropped(model: nn.Module, x: torch.Tensor) -> int:
    """How many items LIMoE's routers of ``model`` drop over ``x`` (each layer on its own input), by hand."""
    count = 0
    with torch.no_grad():
        for layer in model.layers:
            _, w = layer.router(x, torch.arange(x.shape[1]) >= layer.num_image_tokens)
            count += int((w == 0).sum())
            x = x + layer(x)
    return count


@pytest.mark.reliability("silent replays")
def test_limoe_batch_priority_is_refused_on_a_first_batch_where_nothing_drops() -> None:
    """LIMoE's batch priority routing on a first batch where every item fits its expert's buffer (the sort by the
    top gate changes nothing on that batch) and a capacity that a larger batch overflows: refused at that first
    capture, so that a later batch whose items are dropped by their gate is never recorded as if the recorded
    experts were the ones used; the model as it was."""
    model = Layers(lambda: LIMoEMoeLayer(batch_priority=True, capacity_factor=2.0)).eval()
    fits, drops = _x(1, 4, seed=1), _x(2, 12)
    assert _dropped(model, fits) == 0 and _dropped(model, drops) > 0
    assert_refused(model, fits, r"'layers\.0\.router': after its decision .* chooses again from the current scores")


# ----------------------------------------------------------------------- dots3 note: a vision MoE, real
# huggingface/transformers src/transformers/models/dots3_note/modeling_dots3_note.py (``Dots3NoteVisionTopKRouter``,
# ``Dots3NoteVisionMoE``, ``Dots3NoteVisionModel``) and configuration_dots3_note.py (``pyramid_num_routed``): the
# vision encoder's MoE blocks hold a pyramid of expert counts (dense first layers, then more experts deeper), kept
# in a per-layer config whose global ``num_local_experts`` has no single value (a read of it raises); the router
# (a float ``weight``, sigmoid) takes the block's ``e_score_correction_bias`` as an argument, a ``topk(sorted=False)``
# of the biased scores, the weights gathered from the unbiased ones, renormalised and scaled. The transformers sweep
# runs text only, where the vision encoder never runs.
def _dots3_vision() -> nn.Module:
    pytest.importorskip("transformers.models.dots3_note")
    from transformers.models.dots3_note import configuration_dots3_note as configuration
    from transformers.models.dots3_note import modeling_dots3_note as modeling

    config = configuration.Dots3NoteVisionConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=2,
        moe_intermediate_size=16, adapter_in_dim=32, adapter_out_dim=32, num_experts_per_tok=2,
        pyramid_num_routed=[-1, 4, 8],
    )  # fmt: skip
    torch.manual_seed(0)
    model = modeling.Dots3NoteVisionModel(config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # (the router weights and expert tables are left unset by its init)
        for name, p in model.named_parameters():
            if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=generator))
    return model


def _force_dots3_router(router: nn.Module, rows: torch.Tensor) -> None:
    """``Dots3NoteVisionTopKRouter.forward`` with ``rows`` in place of its ``topk``, by hand."""

    def forward(
        hidden_states: torch.Tensor, e_score_correction_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states.float(), router.weight.float())
        top_k_weights = torch.sigmoid(router_logits).gather(1, rows)
        top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights * router.router_scaling_factor, rows

    router.forward = forward  # type: ignore[method-assign]


@pytest.mark.reliability("silent replays")
def test_dots3_note_vision_moe_with_a_pyramid_of_expert_counts_replays_exactly() -> None:
    """The real dots3 note vision encoder over one image: attach reads a per-layer config whose global expert count
    raises (once a transformers error out of ``attach``), finds both MoE routers with their own expert counts (4,
    then 8), and after the routers change, a replay's output and router gradients are those of the recorded experts
    forced by hand into a copy never attached, while a free forward chooses other experts."""
    model = _dots3_vision()
    ref = copy.deepcopy(model)
    pixels = torch.randn(16, 12, generator=torch.Generator().manual_seed(4))  # (16 patches of 3 x 2 x 2)
    inputs = {"pixel_values": pixels, "grid_thw": torch.tensor([[1, 4, 4]])}
    with mr.attach(model) as session:
        assert session.names == ("blocks.1.mlp.gate", "blocks.2.mlp.gate")
        with torch.no_grad(), session.capture():
            model(**inputs)
        routes = session.routes()
        rows = {n: routes.layer(n).long() for n in session.names}
        assert [int(r.max()) < e for r, e in zip(rows.values(), (4, 8), strict=True)] == [True, True]
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name in session.names:
                weight = torch.randn(model.get_submodule(name).weight.shape, generator=generator)
                model.get_submodule(name).weight.copy_(weight)
                ref.get_submodule(name).weight.copy_(weight)
        with torch.no_grad(), session.capture():
            model(**inputs)
        free = session.routes()
        assert all(not torch.equal(free.layer(n).long(), rows[n]) for n in session.names)
        for name in session.names:
            _force_dots3_router(ref.get_submodule(name), rows[name])
        expected = ref(**inputs).last_hidden_state
        expected.square().sum().backward()
        with session.replay(routes), session.capture():
            replayed = model(**inputs).last_hidden_state
        again = session.routes()
        replayed.square().sum().backward()
        for name in session.names:
            assert torch.equal(again.layer(name).long(), rows[name]), name
            grad = model.get_submodule(name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
            assert torch.equal(grad, ref.get_submodule(name).weight.grad), name
        assert torch.equal(replayed, expected)


class _PerLayerConfig:
    """A config whose global expert count has no single value: reading it raises, as transformers' per-layer
    configs do (not an ``AttributeError``, so ``getattr(..., None)`` does not swallow it)."""

    @property
    def num_experts(self) -> int:
        raise RuntimeError("num_experts differs between layers: read it from the layer's config")


class _ConfiguredLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from tests.test_public_routers6 import GateBlock

        torch.manual_seed(0)
        self.config = _PerLayerConfig()
        self.layers = nn.ModuleList([GateBlock(), GateBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.reliability("false refusals")
def test_a_config_attribute_that_raises_on_read_is_no_evidence_and_no_crash() -> None:
    """A model whose config raises on a read of its expert count (a per-layer value with no global one): discovery
    takes the count from the routers themselves; capture and replay are exact, never the config's error."""
    assert_exact(_ConfiguredLayers(), _x())
