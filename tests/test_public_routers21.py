"""More public MoE router code, with zero configuration (see ``test_public_routers20``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

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
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused


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
    """Two patch MoE layers after their own ``eval()`` (hard top-k for good), back in training if ``train``."""
    model = Layers(PatchMoEBlock)
    for layer in model.layers:
        layer.eval()
    return model.train(train)


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
    ``no_grad``), in eval and back in training: every router found and nothing else, the recorded rows the experts
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
@pytest.mark.xfail(
    strict=True,
    reason="falsely refused: MoG's edge mask (which edges each node keeps, by a sort of the gated expert scores) "
    "changes its zeros when the scores change with the experts held, and is taken for a later choice of experts "
    "from the scores, though it has no dimension of the expert count or k",
)
def test_mog_edge_mask_after_the_decision_replays_exactly(train: bool) -> None:
    """MoG's graph sparsification MoE: the experts (each keeps its own share of every node's edges) all run, and the
    gates of the chosen experts set how many edges each node keeps, by a sort of the gated scores over the edges. A
    replay forcing the recorded experts is the same forward with them forced by hand: the edge mask is the model's
    function of its scores, not a choice of experts."""
    assert_exact(Layers(MoGGraphLayer), _x(12), train=train)


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
