"""More public MoE router code, with zero configuration (see ``test_public_routers20``).

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
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused, one_layer


# ----------------------------------------------------------------------- LiME: zero-parameter routing in a LoRA Linear
# Kowsher/LiME LiMELoRA.py (``LoRALiMELinear`` and its TorchScript helpers): the frozen base Linear's first E outputs
# and the LoRA delta's first E outputs, each scaled by its own global ``abs().max()``, mixed by ``gamma_routing`` and
# softmaxed are the routing scores: no router weight at all. Each expert is a modulation vector (``LiMEs [E, H]``) of
# the one shared LoRA delta. Hard top-k (``soft_topk=False``): an eager ``torch.topk``, the k values renormalised, the
# chosen vectors mixed by a scripted helper. Soft top-k (the default): a scripted ``torch.topk`` whose k-th value is a
# sigmoid threshold over every expert's score, every expert weighted. Sparse mode: a scripted ``torch.topk`` (or
# ``argmax`` for k=1) and gather. Auto top-k: a scripted threshold at a share of the row's ``max``, no top-k.
@torch.jit.script
def _lime_fused_routing_softmax(
    h_slice: torch.Tensor, delta_slice: torch.Tensor, gamma: float, temperature: float, eps: float = 1e-6
) -> torch.Tensor:
    h_scale = h_slice.abs().max().clamp_min(eps)
    delta_scale = delta_slice.abs().max().clamp_min(eps)
    logits = (1.0 - gamma) * (h_slice / h_scale) + gamma * (delta_slice / delta_scale)
    logits = logits * (1.0 / max(temperature, eps))
    return F.softmax(logits, dim=-1)


@torch.jit.script
def _lime_fast_soft_topk_jit(
    probs: torch.Tensor, k: int, temperature: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    topk_vals, topk_idx = torch.topk(probs, k=k, dim=-1)
    threshold = topk_vals[..., -1:]
    mask = torch.sigmoid((probs - threshold) * (1.0 / temperature))
    weights = probs * mask
    weight_sum = weights.sum(dim=-1, keepdim=True) + 1e-9
    return weights / weight_sum, topk_idx


@torch.jit.script
def _lime_fast_auto_topk_jit(
    probs: torch.Tensor, threshold: float, temperature: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    max_prob = probs.max(dim=-1, keepdim=True).values
    thresh_val = threshold * max_prob
    mask = torch.sigmoid((probs - thresh_val) * (1.0 / temperature))
    weights = probs * mask
    weight_sum = weights.sum(dim=-1, keepdim=True) + 1e-9
    return weights / weight_sum, probs >= thresh_val


@torch.jit.script
def _lime_sparse_topk(probs: torch.Tensor, limes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    topk_vals, topk_idx = torch.topk(probs, k=k, dim=-1)
    topk_vals = topk_vals / topk_vals.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    selected = limes[topk_idx]
    return (topk_vals.unsqueeze(-1) * selected).sum(dim=-2), topk_idx


@torch.jit.script
def _lime_sparse_expert_mix(topk_vals: torch.Tensor, topk_idx: torch.Tensor, limes: torch.Tensor) -> torch.Tensor:
    return (topk_vals.unsqueeze(-1) * limes[topk_idx]).sum(dim=-2)


class LiMELoRALinear(_Used):
    def __init__(self, mode: str = "hard", top_k: int = 2, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)
        for p in self.linear.parameters():
            p.requires_grad = False
        self.num_experts, self.rank, self.top_k, self.mode = E, rank, top_k, mode
        self._scaling_val, self._temperature_val, self._gamma_val = alpha / rank, 1.0, 0.5
        self.soft_topk_temperature, self.auto_topk_threshold = 0.5, 0.5
        self.A = nn.Parameter(torch.empty(rank, D))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # (upstream initialises ``B`` to zeros, so an untrained delta routes nothing: a trained one here)
        self.B = nn.Parameter(torch.randn(D, rank) * 0.3)
        self.LiMEs = nn.Parameter(torch.empty(E, D).uniform_(0.9, 1.1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h_out = self.linear(hidden_states)
        delta = (hidden_states @ self.A.t()) @ self.B.t() * self._scaling_val
        e = self.num_experts
        probs = _lime_fused_routing_softmax(h_out[:, :, :e], delta[:, :, :e], self._gamma_val, self._temperature_val)
        if self.mode == "sparse":
            p_mix, topk_idx = _lime_sparse_topk(probs, self.LiMEs, self.top_k)
        elif self.mode == "auto":
            weights, selection_mask = _lime_fast_auto_topk_jit(probs, self.auto_topk_threshold, 0.5)
            p_mix, topk_idx = weights @ self.LiMEs, selection_mask.nonzero()[:, -1:]
        elif self.mode == "soft":
            weights, topk_idx = _lime_fast_soft_topk_jit(probs, self.top_k, self.soft_topk_temperature)
            p_mix = weights @ self.LiMEs
        else:
            if self.forced is None:
                topk_vals, topk_idx = torch.topk(probs, k=self.top_k, dim=-1)
            else:
                topk_vals, topk_idx = probs.gather(-1, self.forced.view(*probs.shape[:-1], -1)), self.forced
            topk_vals = topk_vals / topk_vals.sum(dim=-1, keepdim=True).clamp_min_(1e-9)
            p_mix = _lime_sparse_expert_mix(topk_vals, topk_idx.view(*probs.shape[:-1], -1), self.LiMEs)
        self.used = topk_idx.reshape(-1, topk_idx.shape[-1])
        return h_out + delta * p_mix


class LiMEFeedForward(nn.Module):
    """Both Linears of a feed-forward block wrapped by ``apply_peft``."""

    def __init__(self, mode: str = "hard") -> None:
        super().__init__()
        self.up = LiMELoRALinear(mode)
        self.down = LiMELoRALinear(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


# ----------------------------------------------------------------------- HotMoE: expert embeddings attend, then top-k
# Starlight039/HotMoE hotmoe/model.py (``Hybrid_router``, ``AttRouter``, ``MoRa``, ``AdapterLinear``): each adapted
# Linear has its own hybrid router. ``W_v`` gives one gate per expert; an attention over layer-normed expert vectors
# mixes them: the expert-expert router (early layers) attends from the learned ``expert_embedding`` to itself, the
# token-expert router (late layers) from expert vectors an fp32 MLP makes of the token. The mixed gates are softmaxed;
# with ``top_k_routing_strategy`` a ``torch.topk`` keeps k of them, scattered into a ``finfo.min`` tensor and softmaxed
# again at temperature 0.1 (the others exactly 0). The mixture of LoRA experts runs every expert's rank slice and scales
# it by its gate. In eval mode the expert-expert router caches its similarity matrix (detached) after its first forward.
class HotMoEAttRouter(nn.Module):
    def __init__(self, expert_vector_dim: int, attn_dim: int = 8, eval_mode: bool = False) -> None:
        super().__init__()
        self.num_experts, self.attn_dim, self.eval_mode = E, attn_dim, eval_mode
        self.W_q = nn.Linear(expert_vector_dim, attn_dim, bias=False)
        self.W_k = nn.Linear(expert_vector_dim, attn_dim, bias=False)
        self.routing_weight: torch.Tensor | None = None
        self.cache_enabled = True
        self.cached_similarity_matrix: torch.Tensor | None = None
        self.similarity_matrix_cached = False

    def forward(self, input_gate: torch.Tensor, q_vec: torch.Tensor, k_vec: torch.Tensor) -> torch.Tensor:
        same = torch.equal(q_vec, k_vec)
        if self.cache_enabled and self.eval_mode and same and self.similarity_matrix_cached:
            assert self.cached_similarity_matrix is not None
            similarity_matrix = self.cached_similarity_matrix
        else:
            query, key = self.W_q(q_vec), self.W_k(k_vec)
            similarity_matrix = F.softmax(torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attn_dim), -1)
            if self.cache_enabled and self.eval_mode and same:
                self.cached_similarity_matrix = similarity_matrix.detach().clone()
                self.similarity_matrix_cached = True
        gate = torch.matmul(similarity_matrix, input_gate)
        self.routing_weight = F.softmax(gate.squeeze(-1), dim=-1)
        return self.routing_weight


class HotMoEHybridRouter(_Used):
    def __init__(self, use_te: bool, eval_mode: bool = False, expert_vector_dim: int = 6, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.expert_vector_dim, self.top_k = E, expert_vector_dim, top_k
        self.top_k_routing_strategy, self.use_TE_router, self.use_EE_router = True, use_te, not use_te
        self.expert_embedding = nn.Embedding(E, expert_vector_dim)
        self.layernorm = nn.LayerNorm([E, expert_vector_dim])
        self.W_v = nn.Linear(D, E)
        if use_te:
            self.mlp = nn.Sequential(nn.Dropout(0.0), nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, E * expert_vector_dim))
            self.te_router = HotMoEAttRouter(expert_vector_dim, eval_mode=eval_mode)
        else:
            self.ee_router = HotMoEAttRouter(expert_vector_dim, eval_mode=eval_mode)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        global_experts = self.layernorm(self.expert_embedding.weight.unsqueeze(0).unsqueeze(0))
        input_gate = self.W_v(hidden_states).unsqueeze(-1)
        if self.use_TE_router:
            batch_size, seq_len, _ = hidden_states.shape
            x = self.mlp.float()(hidden_states.to(torch.float32)).to(hidden_states.dtype)
            dyn_experts = self.layernorm(x.view(batch_size, seq_len, self.num_experts, self.expert_vector_dim))
            routing_weight = self.te_router(input_gate, dyn_experts, global_experts)
        else:
            routing_weight = self.ee_router(input_gate, global_experts, global_experts)
        if self.top_k_routing_strategy:
            if self.forced is None:
                top_k_values, top_k_indices = torch.topk(routing_weight, self.top_k, dim=-1)
            else:
                top_k_indices = self.forced.view(*routing_weight.shape[:-1], -1)
                top_k_values = routing_weight.gather(-1, top_k_indices)
            self.used = top_k_indices.reshape(-1, self.top_k)
            routing_weight = torch.full_like(routing_weight, torch.finfo(routing_weight.dtype).min)
            routing_weight.scatter_(-1, top_k_indices, top_k_values)
            routing_weight = torch.softmax(routing_weight / 0.1, dim=-1)
        return routing_weight


class HotMoEMoRa(nn.Module):
    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.num_experts, self.rank, self.scaling = E, rank, 4.0 / math.sqrt(rank)
        self.mora_a = nn.Parameter(torch.empty(rank * E, D))
        nn.init.kaiming_uniform_(self.mora_a, a=math.sqrt(5))
        # (upstream initialises ``mora_b`` to zeros: a trained one here)
        self.mora_b = nn.Parameter(torch.randn(D, rank * E) * 0.3)

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = F.linear(hidden_states, self.mora_a)
        hidden_states = hidden_states.view((*hidden_states.shape[:-1], self.num_experts, self.rank))
        hidden_states = (hidden_states * gate.unsqueeze(-1)).view((*hidden_states.shape[:-2], -1))
        return (F.linear(hidden_states, self.mora_b) * self.scaling).to(residual.dtype) + residual


class HotMoEAdapterLinear(nn.Module):
    def __init__(self, use_te: bool, eval_mode: bool = False) -> None:
        super().__init__()
        base = nn.Linear(D, D)
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.mora = HotMoEMoRa()
        self.router = HotMoEHybridRouter(use_te, eval_mode)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.router(hidden_states)
        result = F.linear(hidden_states, self.weight, self.bias)
        return self.mora(hidden_states, gate, result)


class HotMoEFeedForward(nn.Module):
    """A feed-forward block whose ``wi`` and ``wo`` are adapted, each with its own router."""

    def __init__(self, use_te: bool, eval_mode: bool = False) -> None:
        super().__init__()
        self.wi = HotMoEAdapterLinear(use_te, eval_mode)
        self.wo = HotMoEAdapterLinear(use_te, eval_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class HotMoEModel(nn.Module):
    """``_choose_router``: the expert-expert router in the first half of the layers, the token-expert one after."""

    def __init__(self, eval_mode: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([HotMoEFeedForward(False, eval_mode), HotMoEFeedForward(True, eval_mode)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------- A-MoE-ASC: only real tokens routed, capacity
# HoangVo-Prog/A-MoE-ASC src/moe/moe.py (``MoEFFN``): a BERT feed-forward made MoE. The block's ``router`` Linear gives
# logits for every token; with ``route_mask_pad_tokens`` only the rows of real tokens (``nonzero`` of the mask,
# ``index_select``) are routed. ``torch.topk`` of the raw logits, softmaxed over the k; a loop over the experts takes
# ``torch.where`` of ``topk_idx.eq(e)``, keeps the first ``capacity`` rows by order (``_apply_capacity``), runs the
# expert and ``index_add_``s the weighted outputs; the routed rows go back by ``index_copy_``, then the residual and
# the layer norm. The block returns the layer's output (not its increment).
class AMoEASCMoEFFN(_Used):
    def __init__(self, top_k: int = 2, capacity_factor: float | None = None, mask_pad: bool = True) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, top_k
        self.capacity_factor, self.route_mask_pad_tokens = capacity_factor, mask_pad
        self.router = nn.Linear(D, E, bias=True)
        self.expert_dense1 = nn.ModuleList(nn.Linear(D, 2 * D) for _ in range(E))
        self.expert_dense2 = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(E))
        self.layer_norm = nn.LayerNorm(D)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seqlen, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)
        logits = self.router(flat)
        active_idx = None
        if self.route_mask_pad_tokens and token_mask is not None:
            active_idx = torch.nonzero(token_mask.reshape(-1).to(dtype=torch.bool), as_tuple=False).squeeze(-1)
            logits_active = logits.index_select(0, active_idx)
        else:
            logits_active = logits
        if self.forced is None:
            topk_vals, topk_idx = torch.topk(logits_active, k=self.top_k, dim=-1)
        else:
            topk_vals, topk_idx = logits_active.gather(-1, self.forced), self.forced
        self.used = topk_idx
        topk_w = F.softmax(topk_vals, dim=-1)
        out_active = flat.new_zeros((logits_active.size(0), h))
        max_tokens = None
        if self.capacity_factor is not None:
            max_tokens = int(((logits_active.size(0) / self.num_experts) * self.capacity_factor) + 0.999)
        for e in range(self.num_experts):
            mask = topk_idx.eq(e)
            if not mask.any():
                continue
            tok_pos, k_pos = torch.where(mask)
            if max_tokens is not None and tok_pos.numel() > max_tokens:
                tok_pos = tok_pos[:max_tokens]
                k_pos = k_pos[: tok_pos.numel()]
            source = flat.index_select(0, active_idx) if active_idx is not None else flat
            x_e = source.index_select(0, tok_pos)
            w_e = topk_w[tok_pos, k_pos].unsqueeze(-1)
            y = self.expert_dense2[e](F.gelu(self.expert_dense1[e](x_e)))
            out_active.index_add_(0, tok_pos, y * w_e)
        out = flat.new_zeros((bsz * seqlen, h))
        if active_idx is not None:
            out.index_copy_(0, active_idx, out_active)
        else:
            out = out_active
        return self.layer_norm(out.view(bsz, seqlen, h) + hidden_states)


class AMoEASCEncoder(nn.Module):
    """Two BERT layers' feed-forwards fed the attention mask: the last three tokens of the first sequence padding."""

    def __init__(self, **moe: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([AMoEASCMoEFFN(**moe), AMoEASCMoEFFN(**moe)])  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[:2], dtype=torch.long)
        mask[0, -3:] = 0
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ----------------------------------------------------------------------- MoG: graph sparsifiers as experts, per node
# yanweiyue/MoG ogbn_arxiv/MoE.py (``MoE``) and ogbn_arxiv/SpLearner.py (``SpLearner``): Mixture of Graphs, a graph
# sparsification MoE. Each node's noisy top-k gating (a ``w_gate`` Parameter, ``w_noise`` in training, a top-(k+1) of
# which the first k are used, softmaxed and scattered into zeros) weighs E sparsifier experts, each keeping its own
# share ``k_list[e]`` of every node's edges: an MLP scores each edge from both ends, a softmax per source node (a sparse
# COO softmax upstream, a masked dense one here, no Gumbel noise outside training), and a ``sort`` of the scores, a
# stable ``argsort`` by source node and a threshold at each node's k-th edge (a straight-through ``BinaryStep``). Every
# expert runs; the gates of each edge's source node weigh their masked scores (averaged over the experts), and the
# block keeps, per node, as many edges as the gates' weighted share says, by the same sort and threshold. The block
# returns the edge mask and the balance loss; a message-passing layer weighs the edges by the mask.
class MoGBinaryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0.0).float()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        additional = 2 - 4 * torch.abs(x)
        additional[torch.abs(x) > 1] = 0.0
        additional[(torch.abs(x) <= 1) * (torch.abs(x) > 0.4)] = 0.4
        return grad_output.clone() * additional


def _mog_keep_per_node(
    scores: torch.Tensor, src: torch.Tensor, num_edges_per_node: torch.Tensor, k_edges_per_node: torch.Tensor
) -> torch.Tensor:
    """Each node's best ``k_edges_per_node`` edges by ``scores`` (upstream's sort, stable argsort and threshold)."""
    sparse_values, val_sort_idx = scores.sort(descending=True)
    idx_sort_idx = src.index_select(-1, val_sort_idx).argsort(stable=True, dim=-1, descending=False)
    scores_sorted = sparse_values.index_select(-1, idx_sort_idx)
    edge_start = torch.cat((torch.tensor([0]), torch.cumsum(num_edges_per_node[:-1], dim=0)))
    edge_end = torch.abs(torch.add(edge_start, k_edges_per_node) - 1).long()
    threshold = torch.index_select(scores_sorted, -1, edge_end).repeat_interleave(num_edges_per_node)
    mask = MoGBinaryStep.apply(scores_sorted - threshold + 1e-12)
    return mask.index_select(-1, idx_sort_idx.argsort()).index_select(-1, val_sort_idx.argsort())


class MoGSpLearner(nn.Module):
    def __init__(self, k: float, hidden: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2 * D + 1, hidden), nn.Linear(hidden, 1)])
        self.k = k

    def forward(self, features: torch.Tensor, edge_index: torch.Tensor, temperature: float) -> torch.Tensor:
        src, dst = edge_index
        temp = torch.cat(
            [features.index_select(0, src), features.index_select(0, dst), torch.ones(src.shape[0], 1)], -1
        )
        z = F.normalize(self.layers[1](F.relu(self.layers[0](temp))).reshape(-1), dim=0)
        n = features.shape[0]
        dense = torch.full((n, n), float("-inf")).index_put((src, dst), z)
        pi = torch.softmax(dense, dim=1)[src, dst]
        y = torch.softmax(torch.full((n, n), float("-inf")).index_put((src, dst), torch.log(pi) / temperature), 1)
        values = y[src, dst]
        _, num_edges_per_node = src.unique(return_counts=True)
        k_edges = (num_edges_per_node.float() * self.k).round().long()
        k_edges = torch.where(k_edges > 0, k_edges, torch.ones_like(k_edges))
        return _mog_keep_per_node(values, src, num_edges_per_node, k_edges) * values


class MoGMoE(_Used):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.noisy_gating, self.num_experts, self.k, self.loss_coef = True, E, k, 1e-2
        self.k_list = torch.linspace(0.2, 0.9, E)
        self.experts = nn.ModuleList(MoGSpLearner(float(k_)) for k_ in self.k_list)
        # (upstream initialises both to zeros: trained ones here)
        self.w_gate = nn.Parameter(torch.randn(D, E) * 0.5)
        self.w_noise = nn.Parameter(torch.randn(D, E) * 0.1)
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    def cv_squared(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def _prob_in_top_k(
        self, clean: torch.Tensor, noisy: torch.Tensor, noise_stddev: torch.Tensor, noisy_top_values: torch.Tensor
    ) -> torch.Tensor:
        batch, m = clean.size(0), noisy_top_values.size(1)
        top_values_flat = noisy_top_values.flatten()
        positions_if_in = torch.arange(batch) * m + self.k
        threshold_if_in = torch.unsqueeze(torch.gather(top_values_flat, 0, positions_if_in), 1)
        is_in = torch.gt(noisy, threshold_if_in)
        threshold_if_out = torch.unsqueeze(torch.gather(top_values_flat, 0, positions_if_in - 1), 1)
        normal = torch.distributions.Normal(self.mean, self.std)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_stddev)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_stddev)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def noisy_top_k_gating(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        clean_logits = x @ self.w_gate
        if self.noisy_gating and train:
            noise_stddev = self.softplus(x @ self.w_noise) + 1e-2
            noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
            logits = noisy_logits
        else:
            logits = clean_logits
        m = min(self.k + 1, self.num_experts)
        if self.forced is None:
            top_logits, top_indices = logits.topk(m, dim=1)
        else:
            rest = logits.scatter(1, self.forced, float("-inf")).topk(m - self.k, dim=1)
            top_logits = torch.cat([logits.gather(1, self.forced), rest.values], 1)
            top_indices = torch.cat([self.forced, rest.indices], 1)
        top_k_logits, top_k_indices = top_logits[:, : self.k], top_indices[:, : self.k]
        self.used = top_k_indices
        gates = torch.zeros_like(logits, requires_grad=True).scatter(1, top_k_indices, self.softmax(top_k_logits))
        if self.noisy_gating and self.k < self.num_experts and train:
            load = self._prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0)
        return gates, load

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        node_gates, load = self.noisy_top_k_gating(x, self.training)
        loss = (self.cv_squared(node_gates.sum(0)) + self.cv_squared(load)) * self.loss_coef
        edge_gates = torch.index_select(node_gates, 0, edge_index[0])
        expert_outputs = torch.stack([expert(x, edge_index, temp) for expert in self.experts], dim=1)
        gated_output = (edge_gates * expert_outputs).mean(dim=1)
        _, num_edges_per_node = edge_index[0].unique(return_counts=True)
        k_per_node = torch.sum(node_gates * torch.unsqueeze(self.k_list, 0), dim=1)
        k_edges_per_node = k_per_node * num_edges_per_node
        k_long = k_edges_per_node.round().long()
        k_long = torch.where(k_edges_per_node > 0, k_edges_per_node, torch.ones_like(k_long))
        return _mog_keep_per_node(gated_output, edge_index[0], num_edges_per_node, k_long), loss


class MoGGraphLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.learner = MoGMoE()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        degree = 2 + torch.arange(n) % 2  # (out-degrees 2 and 3, edges grouped by source node as upstream needs)
        src = torch.arange(n).repeat_interleave(degree)
        dst = (src + torch.cat([torch.tensor([1, 3, 5])[:d] for d in degree.tolist()])) % n
        mask, loss = self.learner(x, torch.stack([src, dst]), 1.0)
        return torch.zeros_like(x).index_add(0, dst, mask[:, None] * self.lin(x)[src]) + loss


# ----------------------------------------------------------------------- patch-wise MoE: soft in training, then top-k
# k7srivatsan/MoE MoE.py (``MoE``): a patch-token MoE over FashionMNIST. The router Linear's logits are ranked by a
# ``torch.topk`` at every forward; while ``soft`` (from construction) its result is thrown away and every expert is
# weighted by the softmax of all logits; the module's own ``eval()`` switches ``soft`` off for good (``train()`` does
# not switch it back), and from then on the k values are softmaxed. In hard routing a ``sequence_histogram`` (a plain
# tensor attribute, not a buffer) counts the experts chosen at each position under ``no_grad``. The experts run on the
# tokens gathered per slot and expert by Python dicts of lists; the forward returns the clean logits, the indices, the
# positions per expert and the output, of which the model takes the output.
class PatchMoEExpertMLP(nn.Module):
    def __init__(self, hidden_dim: int = 2 * D) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(D, hidden_dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden_dim, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchMoE(_Used):
    def __init__(self, sequence_length: int = 12, k: int = 2, soft: bool = True) -> None:
        super().__init__()
        self.num_experts, self.k, self.log_usage, self.soft = E, k, True, soft
        self.router = nn.Linear(D, E)
        self.experts = nn.ModuleList(PatchMoEExpertMLP() for _ in range(E))
        self.sequence_histogram = torch.zeros(sequence_length, E)

    def eval(self) -> PatchMoE:
        self.soft = False
        return super().eval()

    def add_to_experts(
        self, x_flat: torch.Tensor, router_scores_flat: torch.Tensor, topk_indices_flat: torch.Tensor
    ) -> tuple[dict[int, list[torch.Tensor]], torch.Tensor]:
        expert_tokens: dict[int, list[torch.Tensor]] = defaultdict(list)
        expert_weights: dict[int, list[torch.Tensor]] = defaultdict(list)
        expert_positions: dict[int, list[torch.Tensor]] = defaultdict(list)
        for i in range(self.num_experts if self.soft else self.k):
            ith_indices, ith_router_score = topk_indices_flat[:, i], router_scores_flat[:, i]
            for expert in range(self.num_experts):
                mask = ith_indices == expert
                if mask.any():
                    expert_tokens[expert].append(x_flat[mask])
                    expert_weights[expert].append(ith_router_score[mask])
                    expert_positions[expert].append(mask.nonzero(as_tuple=False).view(-1))
        output = torch.full_like(x_flat, 0)
        for expert in range(self.num_experts):
            if len(expert_tokens[expert]) == 0:
                continue
            tokens = torch.cat(expert_tokens[expert], dim=0)
            weights = torch.cat(expert_weights[expert], dim=0)
            positions = torch.cat(expert_positions[expert], dim=0)
            output[positions] += torch.einsum("ij,i->ij", self.experts[expert](tokens), weights)
        return expert_positions, output

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[torch.Tensor]], torch.Tensor]:
        b, t, c = x.shape
        logits = self.router(x)
        clean_logits = logits
        if self.forced is None:
            topk_vals, topk_indices = torch.topk(logits, self.k, dim=-1)
        else:
            topk_indices = self.forced.view(b, t, -1)
            topk_vals = logits.gather(-1, topk_indices)
        if self.log_usage and not self.soft:
            with torch.no_grad():
                for pos in range(t):
                    self.sequence_histogram[pos] += torch.bincount(topk_indices[:, pos, :].flatten(), minlength=E)
        if self.soft:
            topk_vals, topk_indices = clean_logits, torch.arange(self.num_experts).repeat(b, t, 1)
        self.used = topk_indices.reshape(b * t, -1)
        router_scores = F.softmax(topk_vals, dim=-1)
        x_flat = x.view(-1, c)
        expert_positions, output = self.add_to_experts(
            x_flat, router_scores.view(-1, router_scores.shape[-1]), topk_indices.view(-1, topk_indices.shape[-1])
        )
        return clean_logits, topk_indices, expert_positions, output.reshape((b, t, c))


class PatchMoEBlock(nn.Module):
    def __init__(self, soft: bool = True) -> None:
        super().__init__()
        self.moe = PatchMoE(soft=soft)

    def eval(self) -> PatchMoEBlock:
        """As upstream's ``Model.eval``: ``nn.Module.eval`` calls no child's ``eval``, so the MoE's is called."""
        super().eval()
        self.moe.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[3]


def _patch_moe_hard(train: bool) -> nn.Module:
    """A patch MoE layer after its own ``eval()`` (hard top-k for good), back in training if ``train``."""
    model = one_layer(PatchMoEBlock)()
    for layer in model.layers:
        layer.eval()
    return model.train(train)


# ----------------------------------------------------------------------- Diff-MoE: experts conditioned on the timestep
# kunncheng/Diff-MoE models.py (``MoEGate``, ``MoeMLP_Temporal_Calibration``, ``SparseMoeBlock_SpatialTemporalMoE``,
# ``DiTBlock_SpatialTemporalMoE``): a DiT whose MoE experts each take the timestep-and-class condition ``c`` (their own
# adaLN shift, scale and gate) and a global channel weight (a squeeze-excitation of the pooled tokens). The gate is
# DeepSeek-MoE's (a ``weight`` Parameter, softmax, ``torch.topk(sorted=False)``, no renormalisation, a balance loss in
# training added by a custom autograd Function); in training each token is repeated per slot and ``y[flat_topk_idx ==
# i] = expert(...)``; in eval ``moe_infer`` (under ``no_grad``) sorts the flat ids, counts them with ``bincount`` and a
# NumPy ``cumsum``, and ``scatter_reduce_``s the weighted outputs. The experts' MLP runs in ``pretraining_tp`` slices;
# two shared experts (one wider MLP) take the block's input. A depthwise conv mixes the tokens before the MoE.
class DiffMoEGate(_Used):
    def __init__(self, num_experts_per_tok: int = 2, aux_loss_alpha: float = 0.01) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts, self.alpha = num_experts_per_tok, E, aux_loss_alpha
        self.weight = nn.Parameter(torch.empty((E, D)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bsz, seq_len, h = hidden_states.shape
        scores = F.linear(hidden_states.reshape(-1, h), self.weight, None).softmax(dim=-1)
        if self.forced is None:
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_weight, topk_idx = scores.gather(-1, self.forced), self.forced
        self.used = topk_idx
        aux_loss = None
        if self.training and self.alpha > 0.0:
            mask_ce = F.one_hot(topk_idx.view(bsz, -1).view(-1), num_classes=self.n_routed_experts)
            aux_loss = (scores.mean(0) * mask_ce.float().mean(0) * self.n_routed_experts).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class DiffMoEAddAuxiliaryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype = loss.dtype  # type: ignore[attr-defined]
        ctx.required_aux_loss = loss.requires_grad  # type: ignore[attr-defined]
        return x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grad_loss = torch.ones(1, dtype=ctx.dtype) if ctx.required_aux_loss else None  # type: ignore[attr-defined]
        return grad_output, grad_loss  # type: ignore[return-value]


class DiffMoETemporalMLP(nn.Module):
    """``MoeMLP_Temporal`` (``calibrated``: ``MoeMLP_Temporal_Calibration``, weighed by the global channel weight)."""

    def __init__(self, intermediate_size: int = 2 * D, pretraining_tp: int = 2, rank: int = 4) -> None:
        super().__init__()
        self.intermediate_size, self.pretraining_tp = intermediate_size, pretraining_tp
        self.gate_proj = nn.Linear(D, intermediate_size, bias=False)
        self.up_proj = nn.Linear(D, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, D, bias=False)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        # (upstream zero-initialises the last modulation layer: every expert the identity until trained)
        self.adaLN_modulation = nn.Sequential(nn.Linear(D, rank, bias=False), nn.ReLU(), nn.Linear(rank, 3 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, global_info: torch.Tensor | None = None) -> torch.Tensor:
        identity = x
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        x = self.norm(x) * (1 + scale) + shift
        sl = self.intermediate_size // self.pretraining_tp
        gate_slices = self.gate_proj.weight.split(sl, dim=0)
        up_slices = self.up_proj.weight.split(sl, dim=0)
        down_slices = self.down_proj.weight.split(sl, dim=1)
        gate_proj = torch.cat([F.linear(x, gate_slices[i]) for i in range(self.pretraining_tp)], dim=-1)
        up_proj = torch.cat([F.linear(x, up_slices[i]) for i in range(self.pretraining_tp)], dim=-1)
        inner = F.silu(gate_proj) * up_proj
        if global_info is not None:
            inner = inner * global_info
        parts = inner.split(sl, dim=-1)
        down_proj = sum(F.linear(parts[i], down_slices[i]) for i in range(self.pretraining_tp))
        return identity + gate * down_proj


class DiffMoESparseMoeBlock(nn.Module):
    def __init__(self, num_experts_per_tok: int = 2, n_shared_experts: int = 2, rank: int = 4) -> None:
        super().__init__()
        self.num_experts_per_tok = num_experts_per_tok
        self.experts = nn.ModuleList(DiffMoETemporalMLP() for _ in range(E))
        self.gate = DiffMoEGate(num_experts_per_tok)
        self.se = nn.Sequential(nn.Linear(D, rank, bias=False), nn.ReLU(), nn.Linear(rank, 2 * D, bias=False))
        self.shared_experts = DiffMoETemporalMLP(D * n_shared_experts)

    def forward(self, hidden_states: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        identity, orig_shape = hidden_states, hidden_states.shape
        pooled_token = F.adaptive_avg_pool2d(hidden_states, output_size=(1, hidden_states.size(2))).squeeze(1)
        global_info = torch.sigmoid(self.se(pooled_token))
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        c = c.repeat_interleave(int(orig_shape[1]), dim=0)
        global_info = global_info.repeat_interleave(int(orig_shape[1]), dim=0)
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            k = self.num_experts_per_tok
            hidden_states = hidden_states.repeat_interleave(k, dim=0)
            _c, _global_info = c.repeat_interleave(k, dim=0), global_info.repeat_interleave(k, dim=0)
            y = torch.empty_like(hidden_states, dtype=hidden_states.dtype)
            for i, expert in enumerate(self.experts):
                sel = flat_topk_idx == i
                y[sel] = expert(hidden_states[sel], _c[sel], _global_info[sel]).float()
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).view(*orig_shape)
            assert aux_loss is not None
            y = DiffMoEAddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, c, flat_topk_idx, topk_weight.view(-1, 1), global_info).view(*orig_shape)
        return y + self.shared_experts(identity, c.reshape(orig_shape[0], orig_shape[1], -1))

    @torch.no_grad()
    def moe_infer(
        self, x: torch.Tensor, c: torch.Tensor, flat_idx: torch.Tensor, flat_w: torch.Tensor, global_info: torch.Tensor
    ) -> torch.Tensor:
        expert_cache = torch.zeros_like(x)
        idxs = flat_idx.argsort()
        tokens_per_expert = flat_idx.bincount().cpu().numpy().cumsum(0)
        token_idxs = idxs // self.num_experts_per_tok
        for i, end_idx in enumerate(tokens_per_expert):
            start_idx = 0 if i == 0 else tokens_per_expert[i - 1]
            if start_idx == end_idx:
                continue
            exp_token_idx = token_idxs[start_idx:end_idx]
            expert_out = self.experts[i](x[exp_token_idx], c[exp_token_idx], global_info[exp_token_idx])
            expert_out.mul_(flat_w[idxs[start_idx:end_idx]])
            index = exp_token_idx.view(-1, 1).repeat(1, x.shape[-1])
            expert_cache.scatter_reduce_(0, index, expert_out, reduce="sum")
        return expert_cache


class DiffMoEDiTBlock(nn.Module):
    """The MoE half of ``DiTBlock_SpatialTemporalMoE``: adaLN modulation, a depthwise conv over the token grid."""

    def __init__(self) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.moe = DiffMoESparseMoeBlock()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))
        self.dwconv = nn.Conv2d(D, D, kernel_size=3, stride=1, padding=1, groups=D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(3, dim=1)
        side = int(x.shape[1] ** 0.5)
        shortcut = x
        x = self.dwconv(x.transpose(1, 2).reshape(x.shape[0], D, side, side)).flatten(2).transpose(1, 2)
        moe_in = self.norm2(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        return shortcut + gate_mlp.unsqueeze(1) * self.moe(moe_in, c)


class DiffMoEDiT(nn.Module):
    """Two blocks under one condition: a sinusoidal timestep embedding (one timestep per sample) through an MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([DiffMoEDiTBlock(), DiffMoEDiTBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[0], dtype=torch.float32) * 250.0
        freqs = torch.exp(-math.log(10000) * torch.arange(D // 2, dtype=torch.float32) / (D // 2))
        c = self.t_mlp(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1))
        for block in self.blocks:
            x = block(x, c)
        return x


# ----------------------------------------------------------------------- ProSize-MoE: a size prompt beside the tokens
# phdymz/ProSize-MoE experiments/proteinshake_eval/task_moe/gates.py (``TopKGate``), task_moe/layer.py (``TaskMoE``),
# task_moe/experts.py (``FusedExperts``) and models/graph_new.py (``GINConv``, ``GNN``): a protein-size-guided MoE in a
# GIN. Each residue's gate input is its features concatenated with a prompt embedding of its protein's size bucket
# (per 50 residues upstream, per 3 here); the gate (an fp32 Linear, multiplicative input jitter in training) takes
# ``torch.topk(...).indices``, chunks them into slots, makes one integer one-hot mask per slot by ``scatter_`` and
# weighs each slot by the softmax gathered through its mask, renormalised over the two. Every expert Linear runs and
# the masks pick and weigh their outputs. The GIN MLP is two such MoE Linears around a BatchNorm and a ReLU; the layer
# also returns the masks of both (the encoder returns them; the test model returns the residues' features).
class ProSizeTopKGate(_Used):
    def __init__(self, model_dim: int, prompt_dim: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.noisy_gate_policy = k, "Jitter"
        self.wg = nn.Linear(model_dim + prompt_dim, E, bias=True).float()

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        input_fp32 = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            uniform = torch.distributions.uniform.Uniform(low=torch.tensor(1.0 - 1e-2), high=torch.tensor(1.0 + 1e-2))
            input_fp32 = input_fp32 * uniform.rsample(input_fp32.shape)
        return self.top2gating(self.wg(torch.cat([input_fp32, prompt], dim=-1)))

    def top2gating(self, logits: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        b, num_experts = logits.shape
        topk_indices = torch.topk(logits, self.k, dim=-1).indices if self.forced is None else self.forced
        self.used = topk_indices
        masks_se = []
        for x in topk_indices.chunk(self.k, dim=-1):
            mask = torch.zeros([x.view(-1).size(0), num_experts], dtype=x.dtype).scatter_(
                1, x.view(-1).unsqueeze(-1), 1
            )
            masks_se.append(mask.view(b, num_experts))
        gates = F.softmax(logits, dim=-1)
        gates_s = [(gates * m).sum(dim=-1) for m in masks_se]
        denom_s = torch.clamp(sum(gates_s), min=torch.finfo(gates_s[0].dtype).eps)  # type: ignore[arg-type]
        return masks_se, [g / denom_s for g in gates_s]


class ProSizeTaskMoE(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_experts = E
        self.gate = ProSizeTopKGate(in_dim)
        self.experts = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(E))

    def forward(
        self, hidden_states: torch.Tensor, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        masks_se, gates = self.gate(hidden_states, prompt)
        x = torch.cat([layer(hidden_states).unsqueeze(-2) for layer in self.experts], dim=-2)
        out = (masks_se[0].unsqueeze(-1) * x).sum(-2) * gates[0].unsqueeze(-1)
        out = out + (masks_se[1].unsqueeze(-1) * x).sum(-2) * gates[1].unsqueeze(-1)
        return out, (masks_se, gates)


class ProSizeGINConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.ModuleList([ProSizeTaskMoE(D, 2 * D), nn.BatchNorm1d(2 * D), nn.ReLU(), ProSizeTaskMoE(2 * D, D)])
        self.eps = nn.Parameter(torch.Tensor([0.1]))

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = edge_index
        out = (1 + self.eps) * x + torch.zeros_like(x).index_add(0, dst, F.relu(x[src]))
        out, gate = self.mlp[0](out, prompt)
        gates = [(gate[0][0] + gate[0][1]).unsqueeze(-2)]
        out = self.mlp[2](self.mlp[1](out))
        out, gate = self.mlp[3](out, prompt)
        gates.append((gate[0][0] + gate[0][1]).unsqueeze(-2))
        return out, torch.cat(gates, dim=1)


class ProSizeGNN(nn.Module):
    """Two GIN layers over a batch of two chain graphs (5 and 7 residues), each residue prompted by its graph's size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gnns = nn.ModuleList([ProSizeGINConv(), ProSizeGINConv()])
        self.batch_norms = nn.ModuleList([nn.BatchNorm1d(D), nn.BatchNorm1d(D)])
        self.prompt = nn.Embedding(21, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([5, 7])
        starts = torch.cumsum(sizes, 0) - sizes
        src = torch.cat([torch.arange(n - 1) + s for n, s in zip(sizes.tolist(), starts.tolist(), strict=True)])
        edge_index = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
        prompt_atom = self.prompt(torch.clamp(sizes // 3, min=0, max=20))[
            torch.repeat_interleave(torch.arange(2), sizes)
        ]
        output = x
        for layer in range(2):
            output, _gate = self.gnns[layer](output, edge_index, prompt_atom)
            output = self.batch_norms[layer](output)
            output = output if layer == 1 else F.relu(output)
        return output


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and ``assert_exact`` / attach options)
    # (no router weight, no expert container: named with ``include=``; without it none is found, see below)
    "lime-hard-topk-zero-parameter-routing": (
        lambda: Layers(LiMEFeedForward),
        lambda: _x(2, 12),
        {"include": LiMELoRALinear},
    ),
    "lime-hard-topk-zero-parameter-routing-train": (
        lambda: Layers(LiMEFeedForward),
        lambda: _x(2, 12),
        {"train": True, "include": LiMELoRALinear},
    ),
    "hotmoe-expert-and-token-attention-routers": (HotMoEModel, lambda: _x(2, 12), {}),
    "hotmoe-expert-and-token-attention-routers-train": (HotMoEModel, lambda: _x(2, 12), {"train": True}),
    "hotmoe-eval-mode-cached-similarity": (lambda: HotMoEModel(eval_mode=True), lambda: _x(2, 12), {}),
    "a-moe-asc-pad-tokens-not-routed": (AMoEASCEncoder, lambda: _x(2, 12), {}),
    "a-moe-asc-pad-tokens-not-routed-train": (AMoEASCEncoder, lambda: _x(2, 12), {"train": True}),
    "a-moe-asc-capacity-by-order": (lambda: AMoEASCEncoder(capacity_factor=1.0), lambda: _x(2, 12), {}),
    "a-moe-asc-capacity-by-order-train": (
        lambda: AMoEASCEncoder(capacity_factor=1.0),
        lambda: _x(2, 12),
        {"train": True},
    ),
    "patch-moe-hard-topk-after-its-own-eval": (lambda: _patch_moe_hard(False), lambda: _x(2, 6), {}),
    "patch-moe-hard-topk-after-its-own-eval-train": (lambda: _patch_moe_hard(True), lambda: _x(2, 6), {"train": True}),
    # (in eval the experts run under ``no_grad``: no gradient reaches the gate, natively as by hand)
    "diff-moe-timestep-conditioned-experts": (DiffMoEDiT, lambda: _x(2, 16), {}),
    "diff-moe-timestep-conditioned-experts-train": (DiffMoEDiT, lambda: _x(2, 16), {"train": True}),
    "prosize-moe-size-prompted-gates-in-a-gin": (ProSizeGNN, lambda: _x(12), {}),
    "prosize-moe-size-prompted-gates-in-a-gin-train": (ProSizeGNN, lambda: _x(12), {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """LiME's hard top-k (no router weight: the scores are the frozen Linear's and the LoRA delta's first E outputs,
    each scaled by its global maximum; the experts modulation vectors of one delta, mixed by a scripted helper);
    HotMoE's hybrid routers (attention over expert embeddings or over token-made expert vectors, a top-k scattered into
    a ``finfo.min`` tensor and softmaxed again, every LoRA rank slice run and scaled, a cached similarity in eval);
    A-MoE-ASC's BERT MoE feed-forward (only the real tokens' rows routed, a capacity by order); the patch-wise MoE after
    its own ``eval()`` (a top-k of the raw logits, tokens gathered by Python dicts of lists, a usage log kept under
    ``no_grad``), in eval and back in training; Diff-MoE's DiT (experts conditioned on the timestep and a channel
    weight, a DeepSeek-MoE gate, repeated tokens in training, a NumPy ``cumsum`` of counts under ``no_grad`` in eval);
    ProSize-MoE's GIN (gates fed the residues and a size prompt, integer one-hot masks per slot, every expert run, a
    BatchNorm between two MoE Linears): every router found and nothing else, the recorded rows the experts
    used, and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "patch-moe-soft-topk-thrown-away": (
        lambda: Layers(PatchMoEBlock),
        lambda: _x(2, 6),
        r"(?s)'layers\.0\.moe\.router': no decision-like call in its forward changes the output .*topk\(k=2\) over 8 .*"
        r"\(changes the output: False\)",
        {"train": True},
    ),
    "lime-not-found-without-include": (lambda: Layers(LiMEFeedForward), lambda: _x(2, 12), "no MoE router found", {}),
    "lime-soft-topk-scripted": (
        lambda: Layers(lambda: LiMEFeedForward("soft")),
        lambda: _x(2, 12),
        r"(?s)'layers\.0\.up': its forward makes no decision-like call .*a TorchScript function",
        {"include": LiMELoRALinear},
    ),
    "lime-sparse-topk-scripted": (
        lambda: Layers(lambda: LiMEFeedForward("sparse")),
        lambda: _x(2, 12),
        r"(?s)'layers\.0\.up': its forward makes no decision-like call .*a TorchScript function",
        {"include": LiMELoRALinear},
    ),
    "lime-auto-topk-threshold": (
        lambda: Layers(lambda: LiMEFeedForward("auto")),
        lambda: _x(2, 12),
        r"(?s)'layers\.0\.up': its forward makes no decision-like call .*a TorchScript function",
        {"include": LiMELoRALinear},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """LiME without ``include=`` (no router weight, no expert container: none found); LiME's scripted routings (the
    soft top-k, whose k-th value thresholds a sigmoid over every expert; the sparse top-k and gather; the auto top-k, a
    threshold at a share of the row's maximum: no choice in sight); the patch-wise MoE while soft (its top-k runs and
    is thrown away, every expert weighted): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mog_edge_mask_after_the_decision_replays_exactly(train: bool) -> None:
    """MoG's graph sparsification MoE: the experts (each keeps its own share of every node's edges) all run, and the
    gates of the chosen experts set how many edges each node keeps, by a sort of the gated scores over the edges. A
    replay forcing the recorded experts is the same forward with them forced by hand: the edge mask is the model's
    function of its scores, not a choice of experts."""
    assert_exact(one_layer(MoGGraphLayer)(), _x(12), train=train)


class FlatCapacityGate(_Used):
    """A top-1 gate that drops, per expert, the tokens past ``capacity`` by their score, and hands its weights on as
    one per token or flattened over the tokens (``[tokens]``, no dimension of the experts or of k): a dropped token
    keeps its expert id and gets the weight 0. ``packed``: only the tokens of even position are routed (the others
    are padding, left out before the decision), so the weights run along fewer tokens than the input has."""

    def __init__(self, capacity: int = 2, packed: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity, self.packed = E, 1, capacity, packed
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed:
            x = x[torch.arange(x.shape[0]) % 2 == 0]
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(1, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(-1, idx)
        self.used = idx
        w, idx = w.flatten(), idx.flatten()
        keep = torch.zeros_like(w)
        for e in range(self.num_experts):
            tok = (idx == e).nonzero().squeeze(-1)
            keep[tok[w[tok].topk(min(self.capacity, tok.numel())).indices]] = 1.0
        return w * keep, idx


class FlatCapacityBlock(nn.Module):
    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.gate = FlatCapacityGate(packed=packed)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        rows = torch.arange(x.shape[0])[torch.arange(x.shape[0]) % 2 == 0] if self.gate.packed else None
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = (idx == e).nonzero().squeeze(-1)
            at = tok if rows is None else rows[tok]
            out = out.index_add(0, at, w[tok, None] * expert(x[at]))
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("packed", [False, True], ids=["every-token", "packed"])
def test_capacity_drop_by_score_into_per_token_weights_is_refused(packed: bool) -> None:
    """Zeros in a tensor with no dimension of the experts or of k still say which experts are used where it runs
    along the tokens (all of the input's, or those the decision chose for): a top-1 gate that drops the tokens past
    each expert's capacity by score, its weights handed on one per token (the dropped ones 0, their ids kept), is
    refused as a later choice of experts (beside MoG's edge mask, whose zeros run along the graph's edges and replay
    exactly)."""
    assert_refused(Layers(lambda: FlatCapacityBlock(packed)), _x(12), "chooses again from the current scores")


class SlotCapacityGate(FlatCapacityGate):
    """A top-1 gate that returns its weights in expert-major slots (``[E * capacity]`` flattened, GShard's dispatch
    buffer laid flat) with the token of each slot: each expert's first ``capacity`` tokens in token order take its
    slots, and those past ``capacity - 1`` by score get the weight 0 in theirs. The slot buffer has no dimension of k
    nor of the tokens; its length is a multiple of E."""

    def __init__(self, capacity: int = 3) -> None:
        super().__init__(capacity=capacity - 1)  # (a slot more than it keeps: a dropped token's weight 0)
        self.slots = capacity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        w, idx = super().forward(x)
        c = self.slots
        slots = w.new_zeros(E * c)
        owner = torch.full((E * c,), -1, dtype=torch.long)
        for e in range(E):
            tok = (idx == e).nonzero().squeeze(-1)[:c]
            slots = slots.index_put((torch.arange(tok.numel()) + e * c,), w[tok])
            owner[e * c : e * c + tok.numel()] = tok
        return slots, owner


class SlotCapacityBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = SlotCapacityGate()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, owner = self.gate(x)
        c = self.gate.slots
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            used = owner[e * c : (e + 1) * c] >= 0
            tok = owner[e * c : (e + 1) * c][used]
            out = out.index_add(0, tok, slots[e * c : (e + 1) * c][used, None] * expert(x[tok]))
        return out


@pytest.mark.reliability("silent replays")
def test_capacity_drop_by_score_into_expert_major_slots_is_refused() -> None:
    """Zeros in a flat buffer of each expert's slots (``[E * capacity]``, no dimension of k or of the tokens) still
    say which experts are used: a capacity drop by score that writes its weights there is refused as a later choice
    of experts, though its length is neither the tokens' nor k's nor E's."""
    assert_refused(Layers(SlotCapacityBlock), _x(12), "chooses again from the current scores")


@pytest.mark.reliability("silent replays")
def test_patch_moe_usage_log_counts_the_captured_forward_once() -> None:
    """The patch MoE's own usage log (``sequence_histogram``, a plain tensor attribute its hard routing adds to under
    ``no_grad`` at every forward) holds, after attaching and one captured forward, the counts of the recorded experts
    of that one forward: the forwards that establish the decision leave no trace in it."""
    model = _patch_moe_hard(False)
    x = _x(2, 6)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        for name, layer in zip(session.names, model.layers, strict=True):
            rows = routes.layer(name).long().view(2, 6, -1)
            want = torch.stack([torch.bincount(rows[:, p].flatten(), minlength=E) for p in range(6)]).float()
            assert torch.equal(layer.moe.sequence_histogram[:6], want), name
            assert not layer.moe.sequence_histogram[6:].any(), name


@pytest.mark.reliability("silent replays")
def test_prosize_batch_norm_statistics_move_once_per_captured_forward() -> None:
    """ProSize-MoE's GIN in training (BatchNorms between and after its MoE Linears): after attaching and one captured
    forward, every running statistic is that of one plain forward of a copy never attached, the same seed before
    both (the jitter draws alike): the forwards that establish the decisions move none of them."""
    model = ProSizeGNN().train()
    ref = copy.deepcopy(model)
    x = _x(12)
    torch.manual_seed(1)
    with torch.no_grad():
        ref(x)
    with mr.attach(model) as session:
        torch.manual_seed(1)
        with torch.no_grad(), session.capture():
            model(x)
    want = dict(ref.named_buffers())
    moved = [n for n, b in model.named_buffers() if not torch.equal(b, want[n])]
    assert not moved, moved
    assert any(not torch.equal(b, dict(ProSizeGNN().named_buffers())[n]) for n, b in model.named_buffers())
