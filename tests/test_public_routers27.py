"""MoE code of vision, decentralised training, recommendation, unified multimodal and adapter models, with zero
configuration (see ``test_public_routers26``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, E
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused


# ----------------------------------------------------------------------- Spatial MoE: a top-k over feature-map channels
# spcl/smoe smoe/models/smoe.py (``SpatialMoE2d``, ``GatedSpatialMoE2d``), smoe/models/smoe_routing.py
# (``SMoERouting``, an autograd Function) and smoe/models/smoe_gates.py (``SpatialConvGate2d``,
# ``SpatialLatentTensorGate2d``): each expert is one output channel of a convolution run at every pixel
# (``[batch, E, H, W]``); the gate (a convolution, or a latent ``[E, H, W]`` parameter that does not read the input)
# gives routing weights of the same shape, normal noise added in training, softmax over the expert channels; the
# routing Function takes ``routing_weights.topk(k=out_planes, dim=1)`` at each pixel and keeps the winning experts'
# channels, weighted, in rank order (output channel j is the j-th best expert at that pixel); its backward sends
# gradients through the chosen places only (a straight-through estimator). A routed row is a pixel.
class SMoERouting(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, experts: torch.Tensor, routing_weights: torch.Tensor, out_planes: int, save_module: SpatialMoE2d
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if save_module.forced is None:
            vals, indices = routing_weights.topk(k=out_planes, dim=1)
        else:
            b, _, h, w = routing_weights.shape
            indices = save_module.forced.view(b, h, w, out_planes).permute(0, 3, 1, 2).contiguous()
            vals = routing_weights.gather(1, indices)
        save_module.used = indices.permute(0, 2, 3, 1).reshape(-1, out_planes)
        ctx.indices = indices
        ctx.save_for_backward(experts, routing_weights)
        routing_map = torch.zeros_like(routing_weights).scatter_(dim=1, index=indices, src=vals)
        ctx.mark_non_differentiable(routing_map)
        ctx.mark_non_differentiable(indices)
        scaled_experts = experts * routing_map
        selected = torch.gather(scaled_experts, dim=1, index=indices)
        return selected, routing_map, indices

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_selected: torch.Tensor, grad_routing_map: torch.Tensor, grad_indices: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        experts, routing_weights = ctx.saved_tensors
        scattered = torch.zeros(experts.size(), dtype=grad_selected.dtype).scatter_(1, ctx.indices, grad_selected)
        grad_experts = scattered * routing_weights if ctx.needs_input_grad[0] else None
        grad_routing_weights = scattered * experts if ctx.needs_input_grad[1] else None
        return grad_experts, grad_routing_weights, None, None


class SpatialMoE2d(_Used):
    def __init__(self, in_planes: int, out_planes: int, num_experts: int = E) -> None:
        super().__init__()
        self.out_planes, self.num_experts = out_planes, num_experts
        self.experts = nn.Conv2d(in_planes, num_experts, kernel_size=3, padding=1, bias=False)

    def forward(
        self, x: torch.Tensor, routing_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        experts = self.experts(x)
        return SMoERouting.apply(experts, routing_weights, self.out_planes, self)  # type: ignore[no-any-return]


class SpatialGate2d(nn.Module):
    """``SpatialGate2d.forward``: the gate, normal noise of std ``noise_std_scale / E`` in training, softmax over the
    experts (``norm_weighted``); the importance loss kept on the module."""

    gate: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, num_experts: int = E, noise_std_scale: float = 1.0) -> None:
        super().__init__()
        self.noise_std = noise_std_scale / num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing_weights = self.gate(x)
        importance = routing_weights.softmax(dim=1).sum(dim=(0, 2, 3))
        self.aux_losses = {"importance_loss": 0.1 * (importance.std() / importance.mean()) ** 2}
        if self.training:
            routing_weights = routing_weights + torch.randn_like(routing_weights) * self.noise_std
        return routing_weights.softmax(dim=1)


class SpatialConvGate2d(SpatialGate2d):
    def __init__(self, in_planes: int, num_experts: int = E) -> None:
        super().__init__(num_experts)
        self.gate = nn.Conv2d(in_planes, num_experts, kernel_size=3, padding=1, bias=False)


class SpatialLatentTensorGate2d(SpatialGate2d):
    """Routing weights that do not read the input: a latent ``[E, H, W]`` parameter repeated over the batch."""

    def __init__(self, in_planes: int, out_planes: int, input_shape: tuple[int, int], num_experts: int = E) -> None:
        super().__init__(num_experts)
        bound = math.sqrt(3.0 / (out_planes / num_experts))
        self.latent_routing = nn.Parameter(torch.empty(num_experts, *input_shape).uniform_(-bound, bound))

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.latent_routing.repeat(x.size(0), 1, 1, 1)


class GatedSpatialMoE2d(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, gate: str, input_shape: tuple[int, int]) -> None:
        super().__init__()
        self.smoe = SpatialMoE2d(in_planes, out_planes)
        self.gate: SpatialGate2d = (
            SpatialConvGate2d(in_planes)
            if gate == "conv"
            else SpatialLatentTensorGate2d(in_planes, out_planes, input_shape)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing_weights = self.gate(x)
        x, _, _ = self.smoe(x, routing_weights)
        return x


class SMoENet(nn.Module):
    """Two SMoE layers in a small CNN (``smoe_net``'s shape: SMoE, batch norm-free ReLU, a 1x1 convolution back)."""

    def __init__(self, gate: str = "conv", channels: int = 4, out_planes: int = 2, hw: tuple[int, int] = (5, 5)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(GatedSpatialMoE2d(channels, out_planes, gate, hw) for _ in range(2))
        self.back = nn.ModuleList(nn.Conv2d(out_planes, channels, kernel_size=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for smoe, back in zip(self.layers, self.back, strict=True):
            x = x + back(F.relu(smoe(x)))
        return x


def _image() -> torch.Tensor:
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- hivemind: beam search over a grid of experts
# learning-at-home/hivemind hivemind/moe/client/moe.py (``RemoteMixtureOfExperts``), switch_moe.py
# (``RemoteSwitchMixtureOfExperts``) and beam_search.py (``MoEBeamSearcher``): experts are named by their place in a
# grid (``uid_prefix.i.j``) and served by peers; ``proj`` scores every grid dimension at once (``[batch,
# sum(grid_size)]``, split per dimension), the input averaged over its middle dimensions (one choice per sample); a beam
# search over the DHT, on the scores moved to numpy, picks the ``k_best`` experts that exist (prefix by prefix, keeping
# the best ``beam_size`` partial uids); the chosen experts' logits are the sums of their coordinates' scores, and the
# responders' softmax weights their outputs. The Switch variant jitters the gating input in place, drops grid rows at
# random (``grid_dropout``), weights by the product of per-dimension softmaxes, keeps an EMA of the grid's use in a
# buffer, adds a balancing loss and a residual. The DHT and the peers are stood in for by a local table of experts.
def _beam_search(grid_scores: list[Any], alive: set[tuple[int, ...]], beam_size: int) -> list[tuple[int, ...]]:
    """``MoEBeamSearcher.find_best_experts`` over a local table: the best ``beam_size`` existing prefixes per
    dimension by their summed scores (``heapq.nlargest``), then the best full uids."""
    beam: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for dim, scores in enumerate(grid_scores):
        candidates = [
            (score + float(scores[j]), (*prefix, j))
            for score, prefix in beam
            for j in range(len(scores))
            if any(uid[: dim + 1] == (*prefix, j) for uid in alive)
        ]
        beam = heapq.nlargest(beam_size, candidates)
    return [uid for _, uid in beam]


class LocalExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class RemoteMixtureOfExperts(_Used):
    def __init__(
        self, grid_size: tuple[int, ...] = (2, 4), k_best: int = 2, dead: tuple[tuple[int, ...], ...] = ((1, 3),)
    ) -> None:
        super().__init__()
        self.grid_size, self.k_best = grid_size, k_best
        uids = [(i, j) for i in range(grid_size[0]) for j in range(grid_size[1])]
        self.alive: set[tuple[int, ...]] = {uid for uid in uids if uid not in dead}
        self.experts = nn.ModuleDict({f"expert_{i}_{j}": LocalExpert() for i, j in uids})
        self.proj = nn.Linear(D, sum(grid_size))

    def _flat(self, uid: tuple[int, ...]) -> int:
        return uid[0] * self.grid_size[1] + uid[1]

    def _chosen(self, grid_scores: list[torch.Tensor], beam_size: int) -> list[list[tuple[int, ...]]]:
        if self.forced is not None:
            return [[divmod(int(e), self.grid_size[1]) for e in row] for row in self.forced]
        numpy_scores = [s.detach().cpu().numpy() for s in grid_scores]
        return [_beam_search([s[b] for s in numpy_scores], self.alive, beam_size) for b in range(len(numpy_scores[0]))]

    def _call_many(self, chosen: list[list[tuple[int, ...]]], x: torch.Tensor) -> torch.Tensor:
        """``_RemoteCallMany``: each sample sent to each of its experts, outputs ``[batch, k, ...]``."""
        return torch.stack(
            [
                torch.stack([self.experts[f"expert_{i}_{j}"](x[b : b + 1])[0] for i, j in row])
                for b, row in enumerate(chosen)
            ]
        )

    def compute_expert_scores(
        self, grid_scores: list[torch.Tensor], chosen: list[list[tuple[int, ...]]]
    ) -> torch.Tensor:
        batch = torch.arange(len(chosen))[:, None]
        grid_indices = torch.tensor(chosen)  # [batch, k, dims]
        return torch.stack([s[batch, grid_indices[..., d]] for d, s in enumerate(grid_scores)]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_for_gating = x.mean(dim=tuple(range(1, x.ndim - 1))) if x.ndim != 2 else x
        grid_scores = list(self.proj(input_for_gating).split_with_sizes(list(self.grid_size), dim=-1))
        chosen = self._chosen(grid_scores, self.k_best)
        self.used = torch.tensor([[self._flat(uid) for uid in row] for row in chosen])
        expert_outputs = self._call_many(chosen, x)
        expert_weights = torch.softmax(self.compute_expert_scores(grid_scores, chosen), dim=1)
        return (expert_weights.view(*expert_weights.shape, *([1] * (x.ndim - 1))) * expert_outputs).sum(dim=1)


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    grid_utilization: torch.Tensor

    def __init__(self, jitter_eps: float = 1e-2, grid_dropout: float = 0.9, utilization_alpha: float = 0.9) -> None:
        super().__init__(k_best=1, dead=())
        self.jitter_eps, self.grid_dropout, self.utilization_alpha = jitter_eps, grid_dropout, utilization_alpha
        self.register_buffer("grid_utilization", torch.cat([torch.full((n,), 1 / n) for n in self.grid_size]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        input_for_gating = x.mean(dim=tuple(range(1, x.ndim - 1))) if x.ndim != 2 else x
        input_for_gating *= torch.empty_like(input_for_gating).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        grid_scores = list(self.proj(input_for_gating).split_with_sizes(list(self.grid_size), dim=-1))
        grid_scores_dropout = [
            torch.where(torch.rand(n) < self.grid_dropout, s, torch.full((1,), float("-inf")))
            for s, n in zip(grid_scores, self.grid_size, strict=True)
        ]
        grid_softmax = [torch.softmax(s, dim=-1) for s in grid_scores_dropout]
        chosen = self._chosen(grid_scores_dropout, self.k_best)
        self.used = torch.tensor([[self._flat(uid) for uid in row] for row in chosen])
        expert_outputs = self._call_many(chosen, x)
        with torch.no_grad():
            use = [torch.zeros(n) for n in self.grid_size]
            for row in chosen:
                for d, j in enumerate(row[0]):
                    use[d][j] += 1
            batch_utilization = torch.cat([F.normalize(u, p=1, dim=0) for u in use])
            self.grid_utilization = (
                self.utilization_alpha * self.grid_utilization + (1 - self.utilization_alpha) * batch_utilization
            )
        batch = torch.arange(len(chosen))[:, None]
        grid_indices = torch.tensor(chosen)
        expert_probs = torch.stack([p[batch, grid_indices[..., d]] for d, p in enumerate(grid_softmax)]).prod(0)
        out = (expert_probs.view(*expert_probs.shape, *([1] * (x.ndim - 1))) * expert_outputs).sum(dim=1)
        self.balancing_loss = torch.stack(
            [
                torch.mean(p.mean(0) * u) * n**2
                for p, u, n in zip(
                    grid_softmax, self.grid_utilization.split(list(self.grid_size)), self.grid_size, strict=True
                )
            ]
        ).sum()
        return out + x


def _samples() -> torch.Tensor:
    return torch.randn(4, 6, D, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- torchrec: DCN-v2's mixture of low-rank experts
# pytorch/torchrec torchrec/modules/crossnet.py (``LowRankMixtureCrossNet``): at each cross layer, K low-rank experts
# (``U [K, N, r]``, ``C [K, r, r]``, ``V [K, r, N]`` parameters) each cross ``x_0`` with ``x_l``; ``gates`` is a
# ``ModuleList`` of K ``Linear(N, 1)``, stacked into ``[B, K, 1]``, and the layer adds the softmax-weighted sum of every
# expert's output: a dense mixture, no expert is chosen.
class LowRankMixtureCrossNet(nn.Module):
    def __init__(self, in_features: int = D, num_layers: int = 2, num_experts: int = 4, low_rank: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self._num_layers, self._num_experts = num_layers, num_experts

        def kernels(*shape: int) -> nn.ParameterList:
            return nn.ParameterList(
                nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape))) for _ in range(num_layers)
            )

        self.U_kernels = kernels(num_experts, in_features, low_rank)
        self.V_kernels = kernels(num_experts, low_rank, in_features)
        self.C_kernels = kernels(num_experts, low_rank, low_rank)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(in_features, 1)) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(in_features, 1, bias=False) for _ in range(num_experts))
        self._activation = torch.relu

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x_0 = input.unsqueeze(2)
        x_l = x_0
        for layer in range(self._num_layers):
            gating = torch.stack([self.gates[i](x_l.squeeze(2)) for i in range(self._num_experts)], 1)
            experts = []
            for i in range(self._num_experts):
                expert = torch.matmul(self.V_kernels[layer][i], x_l)
                expert = torch.matmul(self.C_kernels[layer][i], self._activation(expert))
                expert = torch.matmul(self.U_kernels[layer][i], self._activation(expert))
                experts.append((x_0 * (expert + self.bias[layer])).squeeze(2))
            moe = torch.matmul(torch.stack(experts, 2), torch.softmax(gating, 1))
            x_l = moe + x_l
        return torch.squeeze(x_l, dim=2)


# ----------------------------------------------------------------------- BAGEL: mixture of transformers by token kind
# ByteDance-Seed/Bagel modeling/bagel/qwen2_navit.py (``Qwen2MoEDecoderLayer``, ``Qwen2MoTDecoderLayer``): a packed
# sequence of understanding tokens (text, ViT patches) and generation tokens (VAE latents); the MoE layer runs ``mlp``
# on the understanding tokens and ``mlp_moe_gen`` on the generation ones (``packed_und_token_indexes``,
# ``packed_gen_token_indexes``), the MoT layer also has ``q_proj_moe_gen`` / ``k_proj_moe_gen`` / ``v_proj_moe_gen``,
# ``o_proj_moe_gen`` and norms of its own: the expert is set by the token's kind, no router decides.
class Qwen2MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.input_layernorm_moe_gen = nn.RMSNorm(D), nn.RMSNorm(D)
        self.post_attention_layernorm, self.post_attention_layernorm_moe_gen = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q_proj, self.q_proj_moe_gen = nn.Linear(D, D), nn.Linear(D, D)
        self.k_proj, self.k_proj_moe_gen = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.v_proj_moe_gen = nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj, self.o_proj_moe_gen = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(), Qwen2MLP()

    @staticmethod
    def _split(
        x: torch.Tensor, und: torch.Tensor, gen: torch.Tensor, f_und: nn.Module, f_gen: nn.Module, width: int
    ) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], width)
        out[und] = f_und(x[und])
        out[gen] = f_gen(x[gen])
        return out

    def forward(self, packed: torch.Tensor, und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        h = self._split(packed, und, gen, self.input_layernorm, self.input_layernorm_moe_gen, D)
        q = self._split(h, und, gen, self.q_proj, self.q_proj_moe_gen, D)
        k = self._split(h, und, gen, self.k_proj, self.k_proj_moe_gen, D)
        v = self._split(h, und, gen, self.v_proj, self.v_proj_moe_gen, D)
        causal = torch.ones(len(h), len(h), dtype=torch.bool).tril()
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal)[0]
        packed = packed + self._split(attn, und, gen, self.o_proj, self.o_proj_moe_gen, D)
        h = self._split(packed, und, gen, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, D)
        return packed + self._split(h, und, gen, self.mlp, self.mlp_moe_gen, D)


class BagelLanguageModel(nn.Module):
    """A packed sequence whose last ten tokens are VAE latents (generation), the rest text (understanding)."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer() for _ in range(layers))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        kind = torch.zeros(len(packed), dtype=torch.bool)
        kind[-10:] = True
        und, gen = (~kind).nonzero().squeeze(1), kind.nonzero().squeeze(1)
        for layer in self.layers:
            packed = layer(packed, und, gen)
        return packed


# ----------------------------------------------------------------------- Camelidae (PESC): adapters as the experts
# wuhy68/Parameter-Efficient-MoE camelidae/modeling_camelidae.py (``CamelidaeGateAdapter``, ``ParallelAdapterMLP``,
# ``LlamaMLP``): sparse upcycling with one shared dense FFN and E bottleneck adapters as the experts; the ``router``
# (``Linear``, no bias) reads the MLP's input, ``torch.topk`` of the logits, softmax over the k values; the adapters
# read the dense FFN's output and add to it, each token repeated k times (``repeat_interleave``) and
# ``expert_hidden_states[flat_expert_indices == idx] += expert(...)`` in place; the adapters (a ``ModuleDict``) drop
# their input out in training; the MLP returns the router logits beside its output.
class ParallelAdapterMLP(nn.Module):
    def __init__(self, adapter_dim: int = 4, adapter_scaling: float = 1.0) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(D, adapter_dim, bias=False)
        self.adapter_up = nn.Linear(adapter_dim, D, bias=False)
        self.adapter_act = nn.GELU()
        self.adapter_dropout = nn.Dropout(p=0.1)
        self.adapter_scaling = adapter_scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter_dropout(x)
        return self.adapter_scaling * self.adapter_up(self.adapter_act(self.adapter_down(x)))


class CamelidaeGateAdapter(_Used):
    def __init__(self, num_experts: int = E, topk: int = 2) -> None:
        super().__init__()
        self.num_experts, self.topk = num_experts, topk
        self.router = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.ModuleDict({f"expert_{i}": ParallelAdapterMLP() for i in range(num_experts)})

    def forward(
        self, input_hidden_states: torch.Tensor, output_hidden_states: torch.Tensor, router_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        orig_shape = output_hidden_states.shape
        input_hidden_states = input_hidden_states.view(-1, input_hidden_states.shape[-1])
        output_hidden_states = output_hidden_states.view(-1, output_hidden_states.shape[-1])
        router_hidden_states = router_hidden_states.view(-1, router_hidden_states.shape[-1])
        router_logits = self.router(router_hidden_states)
        if self.forced is None:
            expert_weights, expert_indices = torch.topk(router_logits, self.topk, dim=-1)
        else:
            expert_indices = self.forced
            expert_weights = router_logits.gather(-1, expert_indices)
        self.used = expert_indices
        expert_weights = expert_weights.softmax(dim=-1)
        flat_expert_indices = expert_indices.view(-1)
        input_hidden_states = input_hidden_states.repeat_interleave(self.topk, dim=0)
        expert_hidden_states = output_hidden_states.repeat_interleave(self.topk, dim=0)
        for idx, expert in enumerate(self.experts.values()):
            expert_hidden_states[flat_expert_indices == idx] += expert(input_hidden_states[flat_expert_indices == idx])
        hidden_states = (expert_hidden_states.view(*expert_weights.shape, -1) * expert_weights.unsqueeze(-1)).sum(dim=1)
        return hidden_states.view(*orig_shape), router_logits


class CamelidaeMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)
        self.moe_adapter = CamelidaeGateAdapter()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        down_proj = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.moe_adapter(down_proj, down_proj, x)


class _FirstOut(nn.Module):
    """A decoder layer's MLP slot: the hidden states of a module that returns them beside its router logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.mlp = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)[0]  # type: ignore[no-any-return]


# ----------------------------------------------------------------------- Uni-Perceiver-MoE: routed by token attributes
# fundamentalvision/Uni-Perceiver uniperceiver/task_moe/gate.py (``TopKGate``), task_moe/layer.py (``TaskMoE``) and
# modeling/layers/transformer_encoder_moe_layer.py (``MoETransformerEncoderLayer._ff_block``): conditional MoE by
# attribute routing: the gate does not read the hidden states but the token's attribute embedding (modality, token
# kind, task: ``moe_embedding``, passed down through ``**kwargs``) through ``tag_transform`` (``Linear``, GELU,
# ``LayerNorm``), then ``wg`` in fp32; ``top2gating``: Gumbel noise times ``noise_std`` in training (``RSample``),
# ``torch.topk(..., dim=1).indices`` chunked into per-slot index lists, the weights read from the full softmax by
# one-hot masks and renormalised. Both FFN linears are ``TaskMoE`` layers of ``Linear`` experts, and with
# ``FFN_SHARE_GATE_DECISION`` the second one takes the first one's decision (``gate_decision=``): its own gate
# never runs.
class TopKGate(nn.Module):
    def __init__(self, model_dim: int = D, num_experts: int = E, k: int = 2, attribute_length: int = 6) -> None:
        super().__init__()
        self.k, self.noise_std = k, 1.0
        self.tag_transform = nn.Sequential(nn.Linear(attribute_length, model_dim), nn.GELU(), nn.LayerNorm(model_dim))
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def _topk(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.topk(logits, self.k, dim=1).indices

    def forward(
        self, input: torch.Tensor, moe_embedding: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits = self.wg(self.tag_transform(moe_embedding).float())
        num_experts = int(logits.shape[-1])
        noisy = logits
        if self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
            noisy = logits + gumbel * self.noise_std
        topk_indices = self._topk(noisy)
        indices_s = [x.view(-1) for x in topk_indices.chunk(self.k, dim=1)]
        masks_se = [
            torch.zeros(x.size(0), num_experts, dtype=x.dtype).scatter_(1, x.unsqueeze(-1), 1) for x in indices_s
        ]
        gates = F.softmax(logits, dim=1)
        gates_s = [(gates * m).sum(dim=1) for m in masks_se]
        denom_s = torch.clamp(sum(gates_s), min=torch.finfo(gates_s[0].dtype).eps)  # type: ignore[arg-type]
        return indices_s, [g / denom_s for g in gates_s]


class UsedTopKGate(TopKGate, _Used):
    """The gate whose decision both FFN layers use (it runs; the second layer's gate does not)."""

    def _topk(self, logits: torch.Tensor) -> torch.Tensor:
        idx = torch.topk(logits, self.k, dim=1).indices if self.forced is None else self.forced
        self.used = idx
        return idx


class TaskMoE(nn.Module):
    def __init__(self, in_features: int, out_features: int, gate: TopKGate) -> None:
        super().__init__()
        self.num_experts = E
        self.gate = gate
        self.experts = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(E))

    def forward(
        self,
        hidden_states: torch.Tensor,
        gate_decision: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        **kwargs: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        top_indices, gates = gate_decision if gate_decision is not None else self.gate(hidden_states, **kwargs)
        out = 0
        for idx, g in zip(top_indices, gates, strict=True):
            y = torch.stack([self.experts[int(e)](h) for e, h in zip(idx, hidden_states, strict=True)])
            out = out + g.unsqueeze(-1).to(y.dtype) * y
        return out, (top_indices, gates)  # type: ignore[return-value]


class UniPerceiverMoELayer(nn.Module):
    """The FFN block of ``MoETransformerEncoderLayer`` (``norm_first``), the attention stood in for by a token
    mixer; ``share_gate_decision``: ``cfg.MOE.FFN_SHARE_GATE_DECISION``."""

    def __init__(self, share_gate_decision: bool = True) -> None:
        super().__init__()
        self.share = share_gate_decision
        self.norm2 = nn.LayerNorm(D)
        self.linear1 = TaskMoE(D, 2 * D, UsedTopKGate())
        self.linear2 = TaskMoE(2 * D, D, TopKGate(model_dim=D) if share_gate_decision else UsedTopKGate())

    def forward(self, x: torch.Tensor, moe_embedding: torch.Tensor) -> torch.Tensor:
        h, gate_decision = self.linear1(self.norm2(x), moe_embedding=moe_embedding)
        h, _ = self.linear2(F.gelu(h), gate_decision=gate_decision if self.share else None, moe_embedding=moe_embedding)
        return x + h


class UniPerceiverMoE(nn.Module):
    """Two layers over a sequence of image patches, then text tokens: each token's attribute (a one-hot of its
    modality and kind, as ``sample_info`` carries them) held on the model, as the data loader would pass it."""

    def __init__(self, share_gate_decision: bool = True, tokens: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(UniPerceiverMoELayer(share_gate_decision) for _ in range(2))
        kinds = torch.arange(tokens) * 6 // tokens
        self.register_buffer("moe_embedding", F.one_hot(kinds, 6).float() + 0.1 * torch.randn(tokens, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, moe_embedding=self.moe_embedding)
        return x


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train`` and attach options)
    "camelidae-pesc-adapters": (lambda: Layers(lambda: _FirstOut(CamelidaeMLP())), _x, {}),
    "camelidae-pesc-adapters-train": (lambda: Layers(lambda: _FirstOut(CamelidaeMLP())), _x, {"train": True}),
    "uni-perceiver-moe-own-gates": (lambda: UniPerceiverMoE(share_gate_decision=False), _x, {}),
    "uni-perceiver-moe-own-gates-train": (lambda: UniPerceiverMoE(share_gate_decision=False), _x, {"train": True}),
    # (the second layer's gate, which never runs while the decision is shared, left out as the refusal below says)
    "uni-perceiver-moe-shared-decision": (UniPerceiverMoE, _x, {"exclude": "layers.*.linear2.gate"}),
    "uni-perceiver-moe-shared-decision-train": (
        UniPerceiverMoE,
        _x,
        {"exclude": "layers.*.linear2.gate", "train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Camelidae's adapters as experts on a shared dense FFN (a top-k of the router's logits, softmax over the k,
    in-place adds into repeated tokens, adapter dropout in training); Uni-Perceiver-MoE's attribute routing (the gate
    reads each token's attribute embedding through ``tag_transform``, not the hidden states; Gumbel noise in
    training, weights from the full softmax by one-hot masks), with a gate per FFN layer, and with the second layer
    taking the first one's decision (its idle gate excluded): every router found and nothing else, the recorded rows
    the experts used, and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_exact(make(), x(), train=train, **opts)  # type: ignore[arg-type]


_NUMPY = r"makes no decision-like call \(topk, argmax, max, sort\) in torch, and hands floating values out of torch"

REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "spatial-moe-conv-gate": (SMoENet, _image, "no MoE router found", {}),
    "spatial-moe-conv-gate-train": (SMoENet, _image, "no MoE router found", {"train": True}),
    "spatial-moe-latent-gate": (lambda: SMoENet("latent"), _image, "no MoE router found", {}),
    "hivemind-remote-moe": (lambda: Layers(RemoteMixtureOfExperts), _samples, "no MoE router found", {}),
    "hivemind-remote-moe-named": (
        RemoteMixtureOfExperts,
        _samples,
        rf"'': its forward {_NUMPY} \(numpy at ",
        {"include": RemoteMixtureOfExperts},
    ),
    "hivemind-remote-moe-named-in-layers": (
        lambda: Layers(RemoteMixtureOfExperts),
        _samples,
        r"routers 'layers\.0' and 'layers\.1' make no decision-like call",
        {"include": RemoteMixtureOfExperts},
    ),
    "hivemind-switch-moe": (
        lambda: nn.Sequential(RemoteSwitchMixtureOfExperts(), RemoteSwitchMixtureOfExperts()),
        _samples,
        "no MoE router found",
        {},
    ),
    "hivemind-switch-moe-named": (
        RemoteSwitchMixtureOfExperts,
        _samples,
        rf"'': its forward {_NUMPY} \(numpy at ",
        {"include": RemoteSwitchMixtureOfExperts},
    ),
    "torchrec-dcn-v2-mixture": (LowRankMixtureCrossNet, lambda: _x(6), "no MoE router found", {}),
    "torchrec-dcn-v2-mixture-named": (
        LowRankMixtureCrossNet,
        lambda: _x(6),
        r"'': its forward makes no decision-like call .*soft routing \(every expert weighted\)",
        {"include": LowRankMixtureCrossNet},
    ),
    "bagel-mixture-of-transformers": (BagelLanguageModel, _x, "no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """Spatial MoE (experts as the channels of a convolution, a top-k over them at each pixel inside an autograd
    Function; a conv gate or a latent tensor that does not read the input); hivemind's MoE (a beam search over a grid
    of experts, run on the scores in numpy: alone, named, and two named in one model) and its Switch variant;
    torchrec's mixture of low-rank DCN experts (every expert weighted by a softmax); BAGEL's mixture of transformers
    (the experts set by each token's kind): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
def test_uni_perceiver_shared_decision_idle_gate_is_named() -> None:
    """With ``FFN_SHARE_GATE_DECISION`` the second FFN layer's gate never runs: zero configuration finds it (a gate
    like the first one's), and the routes of the capture are refused naming the idle gates and ``exclude=``, never
    handed over without them; the model as it was after detaching."""
    model = UniPerceiverMoE().eval()
    before = snapshot(model)
    with mr.attach(model) as session:
        assert "layers.0.linear2.gate" in session.names
        with torch.no_grad(), session.capture():
            model(_x())
        with pytest.raises(
            mr.MoEReplayError,
            match=r"routers \['layers\.0\.linear2\.gate', 'layers\.1\.linear2\.gate'\] recorded no row.*exclude=",
        ):
            session.routes()
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_spatial_moe_named_is_replayed_exactly() -> None:
    """Spatial MoE named with ``include=``: its decision is a plain top-k over the experts, along dim 1 of
    ``[batch, E, H, W]`` (a row per pixel), recorded and forced along that dimension: exact."""
    assert_exact(SMoENet(), _image(), include=SpatialMoE2d)
