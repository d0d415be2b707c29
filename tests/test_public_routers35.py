"""MoE code of small time-series, streaming, recommender, vision-language and training-stack codebases (a
time-series foundation model, an expert-streaming runtime, a shopping recommender's MoE MLP, LibMoE's ternary-choice
TC-MoE, MindSpeed-LLM's group-limited router, a thesis' MoE query/key/value projections), with zero configuration
(see ``test_public_routers34``).

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
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D
from tests.test_public_routers6 import _Used, assert_exact


def _seq(seq: int = 5) -> torch.Tensor:
    return torch.randn(2, seq, D, generator=torch.Generator().manual_seed(1))


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of ``make()``'s model, its parameters drawn from a fixed seed (the global generator left as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return make()

    return build


# ----------------------------------------------------------------------- FoundationTS: sort-and-bincount dispatch
# sms1097/FoundationTS src/foundation_ts/models/tsmoe/layers.py (``Router``, ``MOELayer``, ``ExpertFFN``), model.py
# (``TimeEmbedding``, ``MOEDecoderLayer``, ``TSMOE``, ``MultiHorizonOutputLayer``) and stats.py (``MoEStats``): a
# Time-MoE-style forecaster. The ``Router`` module holds a bias-free ``router`` Linear, an ``nn.Softmax`` MODULE and a
# one-output ``shared_gate`` Linear; it returns the softmax scores and the sigmoid shared gate. The ``MOELayer`` takes
# ``torch.topk`` of those scores (the k values NOT renormalised), flattens ids and values per (token, slot), puts the
# routes in expert order by ``torch.sort``, counts them by ``torch.bincount`` and runs each expert on its slice
# ``starts[i]:offsets[i]``; ``scatter_add_`` sums the weighted outputs back per token, plus the sigmoid-gated shared
# expert. It adds the scores' mean (importance) and the counts' share (load) IN PLACE into a ``MoEStats`` passed
# from layer to layer, and the decoder layer chains ``num_expert_layers`` MoE layers one after the other (no residual
# between them): two routers in one block, the second fed the first's output.
@dataclass
class TsMoEStats:
    importance: torch.Tensor
    load: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device) -> TsMoEStats:
        return cls(torch.zeros(num_experts, device=device), torch.zeros(num_experts, device=device))

    def add_values_(self, importance: torch.Tensor, load: torch.Tensor) -> TsMoEStats:
        self.importance += importance
        self.load += load
        return self


class TsRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        denom = torch.rsqrt(hidden_state.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return hidden_state * denom * self.weight


class TsAttention(nn.Module):
    """The layer's causal attention (its rotary embedding left out: it does not touch the routing)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden_state.shape
        qkv = self.qkv_proj(hidden_state).contiguous().view(B, T, self.num_heads, 3 * self.head_dim).swapaxes(1, 2)
        q = qkv[..., : self.head_dim]
        k = qkv[..., self.head_dim : 2 * self.head_dim]
        v = qkv[..., 2 * self.head_dim :]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.out_proj(out.swapaxes(1, 2).flatten(-2, -1))


class TsExpertFFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class TsRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.softmax(self.router(x))
        g_shared = torch.sigmoid(self.shared_gate(x))
        return s, g_shared


class TsMOELayer(_Used):
    def __init__(self, hidden_size: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.router = TsRouter(hidden_size, num_experts)
        self.expert_layers = nn.ModuleList([TsExpertFFN(hidden_size, hidden_size // 2) for _ in range(num_experts)])
        self.shared_expert = TsExpertFFN(hidden_size, hidden_size // 2)

    def forward(self, hidden_state: torch.Tensor, stats: TsMoEStats) -> tuple[torch.Tensor, TsMoEStats]:
        B, T, D_ = hidden_state.shape
        N = B * T
        router_scores, shared_expert_score = self.router(hidden_state)
        topk_vals, topk_idx = torch.topk(router_scores, k=self.k)
        if self.forced is not None:
            topk_idx = self.forced.view(B, T, self.k)
            topk_vals = router_scores.gather(-1, topk_idx)
        self.used = topk_idx.reshape(N, self.k)
        x = hidden_state.reshape(N, D_)
        M = N * self.k
        expert_for_route = topk_idx.reshape(M)
        gate_for_route = topk_vals.reshape(M)
        token_for_route = torch.arange(N).repeat_interleave(self.k)
        expert_sorted, compute_order = torch.sort(expert_for_route)
        gate_sorted = gate_for_route[compute_order]
        token_sorted = token_for_route[compute_order]
        x_sorted = x[token_sorted]
        counts = torch.bincount(expert_sorted, minlength=self.num_experts)
        offsets = torch.cumsum(counts, dim=0)
        starts = offsets - counts
        y_sorted = torch.empty_like(x_sorted)
        for i, exp in enumerate(self.expert_layers):
            s_i, t = starts[i], offsets[i]
            if s_i == t:
                continue
            y_sorted[s_i:t] = exp(x_sorted[s_i:t])
        y_sorted = y_sorted * gate_sorted.unsqueeze(-1)
        y_out = torch.zeros(N, D_, dtype=y_sorted.dtype)
        y_out.scatter_add_(0, index=token_sorted.unsqueeze(-1).expand(-1, D_), src=y_sorted)
        y_out = y_out.reshape(B, T, D_) + shared_expert_score * self.shared_expert(hidden_state)
        load = counts.float() / (counts.float().sum() + 1e-12)
        importance = router_scores.mean(dim=(0, 1)).float()
        stats.add_values_(importance, load)
        return y_out, stats


class TsMOEDecoderLayer(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, num_expert_layers: int, n_head: int, k: int) -> None:
        super().__init__()
        self.rms_norm1 = TsRMSNorm(hidden_size)
        self.attention = TsAttention(hidden_size, n_head)
        self.rms_norm2 = TsRMSNorm(hidden_size)
        self.expert_layers = nn.ModuleList([TsMOELayer(hidden_size, num_experts, k) for _ in range(num_expert_layers)])

    def forward(self, tokens: torch.Tensor, stats: TsMoEStats) -> tuple[torch.Tensor, TsMoEStats]:
        norm_input_state = self.rms_norm1(tokens)
        hidden_state = self.rms_norm2(self.attention(norm_input_state) + norm_input_state)
        norm_hidden_state = hidden_state
        for exp in self.expert_layers:
            hidden_state, stats = exp(hidden_state, stats)
        return hidden_state + norm_hidden_state, stats


class TsMOE(nn.Module):
    """``TSMOE`` over ``[batch, time, 1]`` series (no patching): a gated time embedding, one decoder layer of two MoE
    layers, the multi-horizon heads. The training loss's pieces as one tensor: the heads' outputs side by side and
    (``load_term``) the load-balance term ``E * sum(importance * load)`` of the stats the layers filled."""

    def __init__(
        self, num_experts: int = 4, k: int = 2, horizons: tuple[int, ...] = (1, 3), load_term: bool = True
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.load_term = load_term
        self.emb_layer = nn.Linear(1, D, bias=False)
        self.gate_layer = nn.Linear(1, D, bias=False)
        self.decoder_layers = nn.ModuleList([TsMOEDecoderLayer(D, num_experts, 2, 2, k)])
        self.heads = nn.ModuleDict({str(h): nn.Linear(D, h) for h in horizons})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_state = F.silu(self.gate_layer(x)) * self.emb_layer(x)
        stats = TsMoEStats.zeros(self.num_experts, x.device)
        for dl in self.decoder_layers:
            hidden_state, stats = dl(hidden_state, stats)
        heads = torch.cat([head(hidden_state) for head in self.heads.values()], dim=-1)
        if not self.load_term:
            return heads
        return heads + self.num_experts * (stats.importance * stats.load).sum()


def _series(seq: int = 6) -> torch.Tensor:
    return torch.randn(2, seq, 1, generator=torch.Generator().manual_seed(1))


@pytest.mark.reliability("silent replays")
def test_foundation_ts_sort_and_bincount_dispatch_with_chained_moe_layers_replays_as_by_hand() -> None:
    """sms1097/FoundationTS' ``MOELayer`` with its stats kept out of the output (the model's forecast alone, as at
    inference): the ``Router`` module's ``nn.Softmax`` scores, ``torch.topk`` in the layer (values not renormalised),
    the routes put in expert order by ``torch.sort`` and cut by ``torch.bincount`` offsets, ``scatter_add_`` back per
    token, a sigmoid-gated shared expert; two MoE layers in a row in one decoder layer, the second routing the
    first's output. Found with zero configuration (the ``Router`` modules); the recorded rows are the experts each
    layer's sorted slices ran, and a replay after the routers change forces them, in output and gradients as by
    hand."""
    model = _seeded(lambda: TsMOE(load_term=False))()
    session = assert_exact(model, _series())
    assert session.names == (
        "decoder_layers.0.expert_layers.0.router",
        "decoder_layers.0.expert_layers.1.router",
    ), session.names


@pytest.mark.reliability("silent replays")
def test_foundation_ts_stats_added_in_place_by_each_moe_layer_keep_the_captured_output_the_models() -> None:
    """sms1097/FoundationTS' ``MOELayer`` as it trains: each layer adds its importance and load IN PLACE into the
    tensors of a ``MoEStats`` dataclass the model makes per forward and hands from layer to layer, and the loss reads
    them. A capture must leave the model's output as it is without a session (a tensor, list or dict handed to a block
    and written in place is restored around the runs that establish the decision); today, at the first captured
    forward, the stats gain one more addition per such run, so its output (the load term) is far off the model's, and
    the rows forced by hand do not give it (the rows themselves, later captures and replays are right)."""
    model = _seeded(TsMOE)()
    x = _series()
    with torch.no_grad():
        free = model(x)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        captured = model(x)
    assert torch.equal(captured, free), "the capture changed the model's output"
    assert_exact(model, x)


# ----------------------------------------------------------------------- DWR: static and streaming expert blocks
# GyetiJulius/DWR models/router.py (``Router``), models/dwr_block.py (``DWRBlock``), models/transformer.py
# (``MultiHeadSelfAttention``, ``DWRTransformerBlock``, ``DWRTransformer``) and runtime/streaming_block.py
# (``StreamingDWRBlock``): the ``Router`` module's ``gate`` Linear (with a bias), a softmax, ``torch.topk`` of the
# probabilities (NOT renormalised), and a Switch load-balance loss from a ``one_hot`` of the ids; it returns
# ``(topk_indices, topk_scores, aux_loss)``. The ``DWRBlock`` flattens tokens, and per expert takes the tokens with
# ``(topk_indices_flat == expert_id).any(-1)``, weights each by ``(scores * mask).sum(-1)`` (the score of that expert
# only) and adds into an output; then residual, dropout and a post-LayerNorm INSIDE the block, which returns
# ``(x, aux_loss)``; the model sums the blocks' aux losses. The streaming block, its inference path, holds no experts:
# under ``@torch.no_grad()`` it asks ``set(topk_indices_flat.unique().tolist())`` which experts are needed, has a
# cache manager (a plain object, no module) prefetch them, and dispatches over that set alone.
class DwrExpert(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class DwrRouter(_Used):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1)
        topk_scores, topk_indices = torch.topk(probs, self.top_k, dim=-1)
        if self.forced is not None:
            topk_indices = self.forced.view(*probs.shape[:-1], self.top_k)
            topk_scores = probs.gather(-1, topk_indices)
        self.used = topk_indices.reshape(-1, self.top_k)
        return topk_indices, topk_scores, self._load_balance_loss(probs, topk_indices)

    def _load_balance_loss(self, probs: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
        B, S, _ = probs.shape
        num_tokens = B * S
        one_hot = F.one_hot(topk_indices.reshape(num_tokens, self.top_k), self.num_experts)
        f = one_hot.sum(dim=1).float().sum(dim=0) / num_tokens
        p = probs.reshape(num_tokens, self.num_experts).mean(dim=0)
        return self.num_experts * (f * p).sum()


class DwrBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = DwrRouter(d_model, num_experts, top_k)
        self.experts = nn.ModuleList([DwrExpert(d_model, d_ff, dropout) for _ in range(num_experts)])
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x
        topk_indices, topk_scores, aux_loss = self.router(x)
        B, S, D_ = x.shape
        x_flat = x.reshape(B * S, D_)
        topk_indices_flat = topk_indices.reshape(B * S, self.top_k)
        topk_scores_flat = topk_scores.reshape(B * S, self.top_k)
        output = torch.zeros_like(x_flat)
        for expert_id, expert in enumerate(self.experts):
            mask = topk_indices_flat == expert_id
            token_indices = mask.any(dim=-1).nonzero(as_tuple=True)[0]
            if token_indices.numel() == 0:
                continue
            expert_output = expert(x_flat[token_indices])
            expert_weights = (topk_scores_flat[token_indices] * mask[token_indices].float()).sum(dim=-1, keepdim=True)
            output[token_indices] += expert_output * expert_weights
        x = self.layer_norm(residual + self.dropout(output.reshape(B, S, D_)))
        return x, aux_loss


class DwrCacheManager:
    """The runtime's ``GPUCacheManager`` as the block sees it: ``prefetch`` keys, then ``get_expert`` hits (the experts
    here held in a dict, where the runtime loads them from an expert store on disk)."""

    def __init__(self, experts: dict[tuple[int, int], nn.Module]) -> None:
        self._store = experts
        self.resident: dict[tuple[int, int], nn.Module] = {}

    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            self.resident[key] = self._store[key]

    def get_expert(self, layer_idx: int, expert_id: int) -> nn.Module:
        return self.resident[(layer_idx, expert_id)]


class DwrStreamingBlock(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, layer_idx: int, cache: DwrCacheManager) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer_idx = layer_idx
        self.cache_manager = cache
        self.router = DwrRouter(d_model, num_experts, top_k)
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(0.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        topk_indices, topk_scores, _ = self.router(x)
        B, S, D_ = x.shape
        x_flat = x.reshape(B * S, D_)
        topk_indices_flat = topk_indices.reshape(B * S, self.top_k)
        topk_scores_flat = topk_scores.reshape(B * S, self.top_k)
        unique_expert_ids = set(topk_indices_flat.unique().tolist())
        self.cache_manager.prefetch([(self.layer_idx, eid) for eid in unique_expert_ids])
        output = torch.zeros_like(x_flat)
        for expert_id in unique_expert_ids:
            expert = self.cache_manager.get_expert(self.layer_idx, expert_id)
            mask = topk_indices_flat == expert_id
            token_indices = mask.any(dim=-1).nonzero(as_tuple=True)[0]
            if token_indices.numel() == 0:
                continue
            expert_output = expert(x_flat[token_indices])
            expert_weights = (topk_scores_flat[token_indices] * mask[token_indices].float()).sum(dim=-1, keepdim=True)
            output[token_indices] += expert_output * expert_weights
        return self.layer_norm(residual + self.dropout(output.reshape(B, S, D_)))


class DwrAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.scale = math.sqrt(self.d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D_ = x.shape
        H, DH = self.num_heads, self.d_head
        q = self.q_proj(x).view(B, S, H, DH).transpose(1, 2)
        k = self.k_proj(x).view(B, S, H, DH).transpose(1, 2)
        v = self.v_proj(x).view(B, S, H, DH).transpose(1, 2)
        attn = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / self.scale, dim=-1)
        return self.out_proj(torch.matmul(attn, v).transpose(1, 2).contiguous().view(B, S, D_))


class DwrTransformer(nn.Module):
    """``DWRTransformer`` over embedded tokens (the embeddings left out): one block of attention, add and norm, then
    the MoE sub-layer; the logits, and the summed aux loss added to them (the training loss's two terms as one
    tensor). ``streaming``: the runtime's model instead, the block's experts in a cache manager."""

    def __init__(self, streaming: bool = False, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.attn = DwrAttention(D, 2)
        self.attn_norm = nn.LayerNorm(D)
        self.streaming = streaming
        self.moe_ffn: nn.Module
        if streaming:
            store: dict[tuple[int, int], nn.Module] = {(0, e): DwrExpert(D, 2 * D) for e in range(num_experts)}
            self.moe_ffn = DwrStreamingBlock(D, num_experts, top_k, 0, DwrCacheManager(store))
        else:
            self.moe_ffn = DwrBlock(D, 2 * D, num_experts, top_k)
        self.final_norm = nn.LayerNorm(D)
        self.output_proj = nn.Linear(D, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x))
        total_aux_loss = torch.tensor(0.0)
        if self.streaming:
            x = self.moe_ffn(x)
        else:
            x, aux_loss = self.moe_ffn(x)
            total_aux_loss = total_aux_loss + aux_loss
        return self.output_proj(self.final_norm(x)) + total_aux_loss


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("streaming", [False, True], ids=["static-block", "streaming-block"])
def test_dwr_blocks_with_their_norm_inside_replay_as_by_hand(streaming: bool) -> None:
    """GyetiJulius/DWR's router and blocks: the ``Router`` module's top-k of the softmax (not renormalised) and a load
    loss from a ``one_hot`` of the ids; the static block weights each expert's tokens by ``(scores * mask).sum(-1)``
    and ends in its own residual and post-LayerNorm; the streaming block, under ``torch.no_grad``, dispatches over
    ``set(ids.unique().tolist())`` to experts a cache manager (no module) hands it. Found with zero configuration;
    the recorded rows are the experts each token was sent to, and a replay after the router changes forces them, in
    output and gradients (none under the streaming block's ``no_grad``) as by hand."""
    model = _seeded(lambda: DwrTransformer(streaming))()
    session = assert_exact(model, _seq())
    assert session.names == ("moe_ffn.router",), session.names


# ----------------------------------------------------------------------- SwiftMart: one expert per sequence, by index
# yannsusu/SwiftMart SystemCode/MoEMLP.py (``MoEMLP``): a gate Linear (with a bias), ``torch.topk`` of the logits per
# token, the k values softmaxed; then, per slot ``i``, ``expert_idx = top_k_indices[..., i].view(-1)`` and
# ``torch.stack([self.experts[idx](x[b]) for b, idx in zip(range(x.size(0)), expert_idx)])``: ``zip`` stops at the
# batch size, so sequence ``b`` is run WHOLE through the expert that flattened token ``b`` chose in that slot (the
# ``ModuleList`` indexed by a 0-d tensor), and every token's output is that sequence output weighted by its OWN slot
# weight. Every token's row is read (its weights come from the logits its ids pick); the first ``batch`` rows also
# pick the experts run.
class SwiftMartMoEMLP(_Used):
    def __init__(
        self, in_features: int = D, hidden_features: int = 2 * D, num_experts: int = 4, top_k: int = 2
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, in_features)
                )
                for _ in range(num_experts)
            ]
        )
        self.gate = nn.Linear(in_features, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(x)
        top_k_values, top_k_indices = torch.topk(gate_logits, self.top_k, dim=-1)
        if self.forced is not None:
            top_k_indices = self.forced.view(*gate_logits.shape[:-1], self.top_k)
            top_k_values = gate_logits.gather(-1, top_k_indices)
        self.used = top_k_indices.reshape(-1, self.top_k)
        gate_scores = F.softmax(top_k_values, dim=-1)
        outputs = torch.zeros_like(x)
        for i in range(self.top_k):
            expert_idx = top_k_indices[..., i].view(-1)
            expert_out = torch.stack(
                [self.experts[idx](x[b]) for b, idx in zip(range(x.size(0)), expert_idx, strict=False)]
            )
            outputs += gate_scores[..., i, None] * expert_out
        return outputs


class _OneBlock(nn.Module):
    """One residual block over ``[batch, seq, d]``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@pytest.mark.reliability("silent replays")
def test_swiftmart_expert_per_sequence_picked_by_a_token_replays_as_by_hand() -> None:
    """yannsusu/SwiftMart's ``MoEMLP``: a top-k of the logits per token, but each sequence run whole through the
    experts that flattened token ``b`` chose (``zip`` over the batch, a ``ModuleList`` indexed by a 0-d tensor), every
    token weighted by its own softmaxed slot values. Found with zero configuration; the recorded rows are the ids each
    token's weights and the batch's experts were read from, and a replay after the gate changes forces them, in
    output and gradients as by hand."""
    model = _seeded(lambda: _OneBlock(SwiftMartMoEMLP()))()
    session = assert_exact(model, _seq())
    assert session.names == ("block.gate",), session.names


# ----------------------------------------------------------------------- LibMoE TC-MoE: ternary and null choices
# Fsoft-AIC/LibMoE vision_language_model/moe_model/model/moe/moe_tcmoe.py (``TCMoELayer``, TC-MoE: ternary expert
# choice) over moe.py's ``MoeLayer``: the bias-free ``gate`` is ``2 * E + k`` wide (each expert once with a plus sign,
# once with a minus sign, and ``k`` null experts); ``topk_expert`` clones the logits, takes 1 off the minus half and
# 10 off the nulls, softmaxes, takes ``torch.topk`` of ``k``, and renormalises the softmax by the chosen non-null
# weights plus ALL the nulls' probabilities, the k weights gathered back from that. ``compute_moe`` runs expert
# ``id % E`` (``torch.where(base_idx == i)`` over ``[B, N, k]``) with sign ``+1``, ``-1`` or ``0`` (a null: the
# expert of ``id % E`` still runs, its output times 0). The losses: a balance loss over the non-null choices (a
# ``scatter_add_`` of their base ids), a z-loss, a reward for null probability in training.
class _TcArgs:
    """The ``args`` namespace the layer reads its loss coefficients from."""

    balance_loss_coef, router_z_loss_coef = 0.01, 0.001


class TcMoELayer(_Used):
    def __init__(self, num_of_experts: int = 4, num_selected: int = 2, reward_factor: float = 1e-5) -> None:
        super().__init__()
        self.in_embed_dim = self.out_embed_dim = D
        self.num_of_experts, self.num_selected = num_of_experts, num_selected
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)) for _ in range(num_of_experts)
        )
        self.args = _TcArgs()
        self.num_null = num_selected
        self.router_dim = 2 * self.num_of_experts + self.num_null
        self.gate = nn.Linear(self.in_embed_dim, self.router_dim, bias=False)
        self.reward_factor = reward_factor

    def topk_expert(self, gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        E = self.num_of_experts
        sel = gate_logits.clone()
        sel[..., E : 2 * E] = sel[..., E : 2 * E] - 1.0
        sel[..., 2 * E :] = sel[..., 2 * E :] - 10.0
        gate_softmax = F.softmax(sel, dim=-1)
        weights, selected = torch.topk(gate_softmax, self.num_selected)
        if self.forced is not None:
            selected = self.forced.view(*gate_softmax.shape[:-1], self.num_selected)
            weights = gate_softmax.gather(-1, selected)
        self.used = selected.reshape(-1, self.num_selected)
        weights_from_non_null_experts = weights * (selected < 2 * E).float()
        weightsum_from_non_null_experts = weights_from_non_null_experts.sum(dim=-1, keepdim=True)
        weightsum_from_null_experts = gate_softmax[..., 2 * E :].sum(dim=-1, keepdim=True)
        weightsum = torch.clamp_min(weightsum_from_non_null_experts + weightsum_from_null_experts + 1e-20, 1e-6)
        gates = gate_softmax / weightsum
        return torch.gather(gates, -1, selected), selected, gate_softmax

    def compute_moe(
        self, selected_experts: torch.Tensor, weights: torch.Tensor, results: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        E = self.num_of_experts
        base_idx = selected_experts % E
        sign = torch.ones_like(weights)
        sign[(selected_experts >= E) & (selected_experts < 2 * E)] = -1.0
        sign[selected_experts >= 2 * E] = 0.0
        for i, expert in enumerate(self.experts):
            b, t, k = torch.where(base_idx == i)
            if b.numel() == 0:
                continue
            out = expert(x[b, t])
            w = weights[b, t, k] * sign[b, t, k]
            results[b, t] += w.unsqueeze(-1) * out
        return results

    def add_perplexity_reg_tcmoe(
        self, sel_aux: torch.Tensor, sel_index: torch.Tensor, bsz: int, seq_len: int
    ) -> torch.Tensor:
        E = self.num_of_experts
        sel_aux_non_null = sel_aux[..., : 2 * E]
        reward_loss: torch.Tensor | float = 0.0
        if self.reward_factor > 0 and self.training:
            reward_loss = -self.reward_factor * sel_aux[..., 2 * E :].sum() / (bsz * seq_len)
        p_norm = sel_aux_non_null / (sel_aux_non_null.sum(-1, keepdim=True) + 1e-20)
        base_expert_idx = sel_index % E
        non_null_mask = sel_index < 2 * E
        aux_loss = torch.zeros(bsz, E)
        valid_assignments = base_expert_idx[non_null_mask]
        if valid_assignments.numel() > 0:
            aux_loss.scatter_add_(
                1,
                valid_assignments.unsqueeze(0).expand(bsz, -1),
                torch.ones_like(valid_assignments).float().unsqueeze(0).expand(bsz, -1),
            )
        aux_loss = aux_loss / (non_null_mask.sum(dim=(1, 2)).float().unsqueeze(1) + 1e-20)
        p_avg = p_norm.mean(dim=1)
        p_base = p_avg[..., :E] + p_avg[..., E : 2 * E]
        balance_loss = self.args.balance_loss_coef * (aux_loss * p_base).sum(dim=1).mean()
        return balance_loss + reward_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, dict[str, torch.Tensor]]:
        gate_logits = self.gate(x)
        weights, selected, gate_softmax = self.topk_expert(gate_logits)
        output = torch.zeros(x.shape[0], x.shape[1], self.out_embed_dim, dtype=x.dtype)
        output = self.compute_moe(selected, weights, output, x)
        aux_loss = self.add_perplexity_reg_tcmoe(gate_softmax, selected, *gate_logits.shape[:2])
        router_z_loss = torch.logsumexp(gate_logits, dim=-1).square().mean()
        aux_loss = aux_loss + router_z_loss * self.args.router_z_loss_coef
        return output, aux_loss, None, {"router_z_loss": router_z_loss.detach()}


class _AuxBlock(nn.Module):
    """A residual block around a layer returning ``(output, aux_loss, ...)``: the aux loss added to the output (the
    training loss's two terms as one tensor)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.moe = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, *_ = self.moe(x)
        return x + out + aux


@pytest.mark.reliability("silent replays")
def test_libmoe_tcmoe_ternary_and_null_choices_replay_as_by_hand() -> None:
    """Fsoft-AIC/LibMoE's ``TCMoELayer``: a gate ``2 * E + k`` wide over ``E`` experts (plus and minus copies of each,
    and ``k`` nulls), the softmax's top-k renormalised by the chosen non-null weights plus every null's probability,
    expert ``id % E`` run with sign ``+1``, ``-1`` or ``0``. Found with zero configuration; the recorded rows are the
    ternary ids chosen (a token may pick an expert's plus and minus copies both), and a replay after the gate changes
    forces them, in training, in output and gradients (the balance loss's ``scatter_add_`` of base ids and the null
    reward included) as by hand."""
    model = _seeded(lambda: _AuxBlock(TcMoELayer()))()
    session = assert_exact(model, _seq(), train=True)
    assert session.names == ("moe.gate",), session.names
    layer = model.get_submodule("moe")
    assert isinstance(layer, TcMoELayer) and layer.used is not None
    assert (layer.used >= layer.num_of_experts).any(), "no minus copy was chosen: the case tries no sign"


# ----------------------------------------------------------------------- MindSpeed-LLM: group-limited greedy, a map
# MindSpeed-LLM (Huawei's Megatron patches, as vendored in Tr1gg3r-11/WebUi) mindspeed_llm/core/transformer/moe/
# router.py ``group_limited_greedy_topKgating``, patched onto Megatron's ``TopKRouter``: every setting read from the
# global ``get_args()`` (``micro_batch_size``, ``num_experts``, ``moe_router_topk``, ``norm_topk_prob``, ``seq_aux``,
# the device-level and communication loss coefficients); the softmax of the ``[tokens, E]`` logits, each group's
# ``max``, ``torch.topk(..., sorted=False)`` of the groups, a 0/1 group mask scattered, expanded to the experts and
# ``masked_fill``-ed with 0 over the scores, ``torch.topk(..., sorted=False)`` of those, renormalised (or scaled by
# ``moe_router_topk_scaling_factor``); the router returns NO ids: a dense ``topk_masked_gates`` (the weights scattered
# into zeros) and a boolean ``topk_map``. In training it also keeps, on the router, an expert-level balance loss (a
# per-sequence ``scatter_add_`` of the ids), a device-level one (per group) and a communication one (the groups each
# token reaches, from a ``[b, s, E]`` ``scatter_add_``). A dispatcher over the map runs, per expert, its
# ``topk_map[:, e].nonzero()`` tokens weighted by their column of the gates. Forced by hand, as for every group-limited
# router of the suite, the groups kept are those of the forced experts.
class _MindSpeedArgs:
    micro_batch_size = 1
    num_experts = 8
    moe_router_topk = 2
    norm_topk_prob = True
    moe_router_topk_scaling_factor = 1.0
    seq_aux = True
    moe_device_level_aux_loss_coeff = 0.01
    moe_comm_aux_loss_coeff = 0.01


_MINDSPEED_ARGS = _MindSpeedArgs()


def _get_args() -> _MindSpeedArgs:
    """Megatron's ``get_args()``: the one global namespace of the run's settings."""
    return _MINDSPEED_ARGS


class _MindSpeedConfig:
    moe_aux_loss_coeff = 0.01


class MindSpeedTopKRouter(_Used):
    def __init__(self, n_group: int = 4, topk_group: int = 2) -> None:
        super().__init__()
        args = _get_args()
        self.config = _MindSpeedConfig()
        self.weight = nn.Parameter(torch.randn(args.num_experts, D) * 0.5)
        self.n_group = n_group
        self.topk_group = topk_group
        self.l_aux: torch.Tensor | float | None = None

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = _get_args()
        seq_length = logits.shape[0]
        scores = F.softmax(logits, dim=1)
        group_scores = scores.view(args.micro_batch_size * seq_length, self.n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        if self.forced is not None:  # (by hand: the groups of the forced experts)
            group_idx = self.forced // (args.num_experts // self.n_group)
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(args.micro_batch_size * seq_length, self.n_group, args.num_experts // self.n_group)
            .reshape(args.micro_batch_size * seq_length, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weight, topk_idx = torch.topk(tmp_scores, k=args.moe_router_topk, dim=-1, sorted=False)
        if self.forced is not None:
            topk_idx = self.forced
            topk_weight = tmp_scores.gather(1, topk_idx)
        self.used = topk_idx
        if args.moe_router_topk > 1 and args.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * args.moe_router_topk_scaling_factor
        topk_masked_gates = torch.zeros_like(logits).scatter(1, topk_idx, topk_weight)
        topk_map = torch.zeros_like(logits).int().scatter(1, topk_idx, 1).bool()
        if not self.training:
            self.l_aux = None
            return topk_masked_gates, topk_map
        b, k, E = args.micro_batch_size, args.moe_router_topk, args.num_experts
        topk_idx_for_aux_loss = topk_idx.view(b, -1)
        l_aux: torch.Tensor | float = 0
        ce = torch.zeros(b, E)
        ce.scatter_add_(1, topk_idx_for_aux_loss, torch.ones(b, seq_length * k))
        fi = ce.div(seq_length * k / E)
        Pi = scores.view(b, seq_length, -1).mean(dim=1)
        l_aux += (Pi * fi).sum(dim=1).mean() * self.config.moe_aux_loss_coeff
        P_devi = Pi.view(b, self.n_group, -1).sum(-1)
        f_devi = fi.view(b, self.n_group, -1).mean(-1)
        l_aux += (f_devi * P_devi).sum(dim=1).mean() * args.moe_device_level_aux_loss_coeff
        ge = torch.zeros(b, seq_length, E)
        ge.scatter_add_(2, topk_idx_for_aux_loss.view(b, seq_length, -1), torch.ones(b, seq_length, k))
        ge = (ge.view(b, seq_length, self.n_group, -1).sum(-1) > 0).to(logits.dtype).sum(dim=1)
        ge.div_(seq_length * self.topk_group / self.n_group)
        l_aux += (ge * P_devi).sum(dim=1).mean() * args.moe_comm_aux_loss_coeff
        self.l_aux = l_aux
        return topk_masked_gates, topk_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight).view(-1, _get_args().num_experts)
        return self.routing(logits)


class MindSpeedMoELayer(nn.Module):
    """A Megatron MoE layer over ``[tokens, d]``: the router's map and gates, a dispatcher by the map's columns, and
    the router's training losses added to the output (the training loss's two terms as one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = MindSpeedTopKRouter()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)) for _ in range(_get_args().num_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probs, routing_map = self.router(hidden_states)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            idx = routing_map[:, e].nonzero().squeeze(-1)
            if idx.numel():
                out[idx] += probs[idx, e, None] * expert(hidden_states[idx])
        l_aux = self.router.l_aux
        return out if l_aux is None else out + l_aux


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mindspeed_group_limited_greedy_router_returning_a_map_replays_as_by_hand(train: bool) -> None:
    """MindSpeed-LLM's ``group_limited_greedy_topKgating``: settings from the global ``get_args()``, groups picked by
    their max score (``sorted=False``), the other groups' scores set to 0, ``torch.topk(sorted=False)`` of those, and
    no ids returned (a dense gates tensor and a boolean map), the map's columns dispatched by; in training the
    expert-, device- and communication-level losses from ``scatter_add_`` of the ids. Found with zero configuration;
    the recorded rows are the experts the map sent each token to, and a replay after the router changes forces them,
    in output and gradients (the three losses included, in training) as by hand."""
    model = _seeded(lambda: _OneBlock(MindSpeedMoELayer()))()
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(1))
    session = assert_exact(model, x, train=train)
    assert session.names == ("block.router",), session.names


# ----------------------------------------------------------------------- MLMI thesis: MoE q/k/v projections
# kj1080/MLMI_thesis MOE.py (``MoEAttentionProjection``, ``MoEBertSelfAttention``): BERT's self-attention with its
# query, key and value projections each a mixture of ``nn.Linear`` experts, three routers per layer. Each gate Linear
# (with a bias) is divided by a ``temperature`` read by ``getattr``, softmaxed and ``torch.topk``-ed; with
# ``segment_expert_trigger`` the gate scores the MEAN of the sequence once and the softmax is ``expand``-ed over its
# tokens before the top-k (one choice per sequence, repeated per token). EVERY expert runs on every token
# (``torch.stack`` over the experts), and per slot a ``torch.gather`` of the stacked outputs by the ids picks the
# chosen ones, times their (not renormalised) scores. Ids, scores and the softmax are logged ``.detach().cpu()``.
class MlmiMoEAttentionProjection(_Used):
    def __init__(
        self, in_features: int, out_features: int, num_experts: int, k: int = 1, segment_expert_trigger: bool = False
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.segment_expert_trigger = segment_expert_trigger
        self.temperature = 1.0
        self.experts = nn.ModuleList([nn.Linear(in_features, out_features) for _ in range(num_experts)])
        self.gate = nn.Linear(in_features, num_experts)
        self._last_gate_weights: torch.Tensor | None = None
        self._last_topk_indices: torch.Tensor | None = None
        self._last_topk_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temp = getattr(self, "temperature", 1.0)
        if not self.segment_expert_trigger:
            gate_scores = F.softmax(self.gate(x) / temp, dim=-1)
        else:
            segment_repr = x.mean(dim=1)
            gate_scores = F.softmax(self.gate(segment_repr) / temp, dim=-1)
            gate_scores = gate_scores.unsqueeze(1).expand(-1, x.size(1), -1)
        topk_scores, topk_indices = torch.topk(gate_scores, self.k, dim=-1)
        if self.forced is not None:
            topk_indices = self.forced.view(*gate_scores.shape[:-1], self.k)
            topk_scores = gate_scores.gather(-1, topk_indices)
        self.used = topk_indices.reshape(-1, self.k)
        self._last_gate_weights = gate_scores.detach().cpu()
        self._last_topk_indices = topk_indices.detach().cpu()
        self._last_topk_scores = topk_scores.detach().cpu()
        expert_outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)
        topk_outputs = []
        for i in range(self.k):
            indices = topk_indices[:, :, i].unsqueeze(-1).expand(-1, -1, expert_outputs.size(-1)).unsqueeze(-2)
            selected = torch.gather(expert_outputs, dim=-2, index=indices).squeeze(-2)
            topk_outputs.append(selected * topk_scores[:, :, i].unsqueeze(-1))
        return torch.stack(topk_outputs).sum(0)


class MlmiMoESelfAttention(nn.Module):
    """``MoEBertSelfAttention``'s forward (no masks, no dropout): q, k and v from the three MoE projections, scaled
    dot-product attention over the heads; the query router's gate weights and ids kept on the layer."""

    def __init__(self, num_experts: int = 4, k: int = 2, segment_expert_trigger: bool = False, heads: int = 2) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = D // heads
        self.all_head_size = D
        self.q_proj = MlmiMoEAttentionProjection(D, D, num_experts, k, segment_expert_trigger)
        self.k_proj = MlmiMoEAttentionProjection(D, D, num_experts, k, segment_expert_trigger)
        self.v_proj = MlmiMoEAttentionProjection(D, D, num_experts, k, segment_expert_trigger)
        self.last_gating_weights: torch.Tensor | None = None

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.size()[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mixed_query_layer = self.q_proj(hidden_states)
        assert self.q_proj._last_gate_weights is not None
        self.last_gating_weights = self.q_proj._last_gate_weights.detach().clone()
        query_layer = self.transpose_for_scores(mixed_query_layer)
        key_layer = self.transpose_for_scores(self.k_proj(hidden_states))
        value_layer = self.transpose_for_scores(self.v_proj(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        attention_probs = nn.Softmax(dim=-1)(attention_scores)
        context_layer = torch.matmul(attention_probs, value_layer).permute(0, 2, 1, 3).contiguous()
        return context_layer.view(*context_layer.size()[:-2], self.all_head_size)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("segment", [False, True], ids=["per-token", "per-segment"])
def test_mlmi_moe_query_key_value_projections_replay_as_by_hand(segment: bool) -> None:
    """kj1080/MLMI_thesis' ``MoEBertSelfAttention``: three routers per layer (query, key and value projections made
    mixtures of Linear experts), each a tempered softmax's top-k (per token, or once per sequence from its mean and
    expanded over its tokens), every expert run and the chosen ones picked by a ``torch.gather`` of the stacked
    outputs. Found with zero configuration; the recorded rows are the experts each token's projections gathered, and
    a replay after the gates change forces them, in output and gradients as by hand."""
    model = _seeded(lambda: _OneBlock(MlmiMoESelfAttention(segment_expert_trigger=segment)))()
    session = assert_exact(model, _seq())
    assert session.names == ("block.q_proj.gate", "block.k_proj.gate", "block.v_proj.gate"), session.names
