"""MoE code of time-series attention, recursion depths, compiled router functions, radiance fields and a research
layer library, with zero configuration (see ``test_public_routers28``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, perturb
from tests.test_public_routers6 import _Used, assert_exact, assert_refused


def _seq() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- TimeExpert: key positions as experts
# xwmaxwma/TimeExpert model/TimeExpert.py (``AdaptiveLocalExpertSelection``, ``ExpertGathering``, ``TMOE``,
# ``TMOELayer``): the "experts" of a query are the key positions of its own sequence (patches of a time series). The
# router takes detached per-head queries and keys, ``(q * scale) @ k^T`` over every position, ``torch.topk`` of
# each query's row of that ``[n*h, m, m]`` matrix; its softmaxed top-k weights go unused (``mul_weight='none'``).
# The gathering module picks each query's k keys and values by ``torch.gather`` of the keys expanded over the
# queries, and attention over those k (recomputed from the live q and k) combines them; ``shared`` adds the mean of
# the sequence as one more key and value to every query.
class AdaptiveLocalExpertSelection(_Used):
    def __init__(self, qk_dim: int, topk: int = 4, qk_scale: float | None = None) -> None:
        super().__init__()
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.emb = nn.Identity()
        self.routing_act = nn.Softmax(dim=-1)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query, key = query.detach(), key.detach()
        query_hat, key_hat = self.emb(query), self.emb(key)
        attn_logit = (query_hat * self.scale) @ key_hat.transpose(-2, -1)
        if self.forced is None:
            topk_attn_logit, topk_index = torch.topk(attn_logit, k=self.topk, dim=-1)
        else:
            topk_index = self.forced.view(*attn_logit.shape[:-1], self.topk)
            topk_attn_logit = attn_logit.gather(-1, topk_index)
        self.used = topk_index.reshape(-1, self.topk)
        r_weight = self.routing_act(topk_attn_logit)
        return r_weight, topk_index


class ExpertGathering(nn.Module):
    def forward(self, r_idx: torch.Tensor, r_weight: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        n, m, c_kv = kv.size()
        all_kv = kv.unsqueeze(1).expand(-1, m, -1, -1)
        r_idx_expanded = r_idx.unsqueeze(-1).expand(-1, -1, -1, c_kv)
        return torch.gather(all_kv, dim=2, index=r_idx_expanded)


class TMOE(nn.Module):
    def __init__(self, dim: int = D, num_heads: int = 2, topk: int = 2, shared: bool = False) -> None:
        super().__init__()
        self.dim, self.qk_dim, self.num_heads, self.topk = dim, dim, num_heads, topk
        self.scale = self.qk_dim**-0.5
        self.pos = nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.router = AdaptiveLocalExpertSelection(qk_dim=self.qk_dim, qk_scale=self.scale, topk=topk)
        self.kv_gather = ExpertGathering()
        self.qkv = nn.Linear(dim, self.qk_dim + self.qk_dim + dim)
        self.wo = nn.Linear(dim, dim)
        self.attn_act = nn.Softmax(dim=-1)
        self.shared = shared

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # 'n m (h d) -> (n h) m d'
        n, m, _ = t.shape
        return t.view(n, m, self.num_heads, -1).permute(0, 2, 1, 3).reshape(n * self.num_heads, m, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x.permute(0, 2, 1)).permute(0, 2, 1)
        n, m, c = x.shape
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        state = x.mean(dim=1, keepdim=True)
        d = c // self.num_heads
        r_weight, r_idx = self.router(q, k)
        kv = torch.cat([k, v], dim=-1)
        kv_select = self.kv_gather(r_idx=r_idx, r_weight=r_weight, kv=kv)
        k_select, v_select = kv_select.split([self.qk_dim // self.num_heads, self.dim // self.num_heads], dim=-1)
        if self.shared:
            state = self._heads(state.repeat(1, m, 1))
            k_select = torch.cat([k_select, state.unsqueeze(2)], dim=2)
            v_select = torch.cat([v_select, state.unsqueeze(2)], dim=2)
        attn_weight = (q * self.scale).view(n * self.num_heads, m, 1, d) @ k_select.permute(0, 1, 3, 2)
        attn_weight = self.attn_act(attn_weight)
        out = attn_weight @ v_select  # '(n h) m 1 d -> n m (h d)'
        out = out.view(n, self.num_heads, m, d).permute(0, 2, 1, 3).reshape(n, m, c)
        return self.wo(out)


class TMOELayer(nn.Module):
    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.attn = TMOE(shared=shared)
        self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


# ----------------------------------------------------------------------- Mixture-of-Recursions: depth by argmax
# Ratnaditya-J/MixtureOfRecursions src/models/mor_model.py (``RecursiveRouter``, ``RecursiveTransformerLayer``,
# ``MixtureOfRecursions``): a two-layer MLP router (dropout between) gives per-token logits over recursion depths;
# in eval the depth is their ``argmax`` plus the least depth, in training the ``argmax`` of a hard
# ``F.gumbel_softmax`` with a learned temperature (whose own straight-through ``max`` runs first). Each depth d runs
# the shared layer ``(d - 1) % layers`` over all tokens, with the float attention mask (added to the scores, as
# upstream) the product of a causal mask and ``depth >= d`` for both query and key; the router's loss (a KL to a
# uniform depth use and the mean depth) is added to the logits here, as a training step adds it to the loss.
class RecursiveRouter(_Used):
    def __init__(self, hidden: int, depths: int, min_depth: int = 1) -> None:
        super().__init__()
        self.min_depth = min_depth
        self.router = nn.Sequential(nn.Linear(hidden, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, depths))
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states: torch.Tensor, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.router(hidden_states)
        if training:
            recursion_probs = F.gumbel_softmax(router_logits, tau=self.temperature, hard=True)  # type: ignore[arg-type]
            chosen = torch.argmax(recursion_probs, dim=-1) if self.forced is None else None
        else:
            chosen = torch.argmax(router_logits, dim=-1) if self.forced is None else None
        if chosen is None:
            assert self.forced is not None
            chosen = self.forced.view(router_logits.shape[:-1])
        self.used = chosen.reshape(-1, 1)
        return chosen + self.min_depth, router_logits


class RecursiveTransformerLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, num_heads=1, dropout=0.1, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.ln1(hidden_states)
        attn_output, _ = self.attention(
            hidden_states, hidden_states, hidden_states, attn_mask=attention_mask, need_weights=False
        )
        hidden_states = residual + attn_output
        return hidden_states + self.feed_forward(self.ln2(hidden_states))


class MixtureOfRecursions(nn.Module):
    def __init__(self, vocab: int = 32, hidden: int = D, layers: int = 2, depths: int = 3) -> None:
        super().__init__()
        self.depths = depths
        self.token_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(16, hidden)
        self.recursive_layers = nn.ModuleList(RecursiveTransformerLayer(hidden) for _ in range(layers))
        self.router = RecursiveRouter(hidden, depths)
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = input_ids.shape
        position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
        attention_mask = torch.ones(batch_size, seq_len)
        hidden_states = self.token_embeddings(input_ids) + self.position_embeddings(position_ids)
        recursion_depths, router_logits = self.router(hidden_states, training=self.training)
        for depth in range(1, self.depths + 1):
            depth_mask = (recursion_depths >= depth).float()
            if depth_mask.sum() == 0:
                continue
            layer = self.recursive_layers[(depth - 1) % len(self.recursive_layers)]
            causal = torch.tril(torch.ones(seq_len, seq_len))
            mask = attention_mask.unsqueeze(1) * attention_mask.unsqueeze(2) * causal
            mask = mask * (depth_mask.unsqueeze(1) * depth_mask.unsqueeze(2))
            hidden_states = layer(hidden_states, mask)
        logits = self.lm_head(self.ln_f(hidden_states))
        depth_probs = F.softmax(router_logits, dim=-1)
        mean_probs = depth_probs.mean(dim=(0, 1))
        balance = F.kl_div(mean_probs.log(), torch.ones_like(mean_probs) / len(mean_probs), reduction="batchmean")
        router_loss = 0.01 * balance + 0.001 * recursion_depths.float().mean() / self.depths
        return logits + router_loss


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))


# ----------------------------------------------------------------------- moe-explore: a compiled router function
# arthurfeeney/moe-explore src/moe_explore/moe.py (``TopkMoE``), router.py (``topk_router``, ``ernie_router``,
# each under ``@torch.compile``) and functional/topk_moe.py (``topk_moe_torch``, the reference path): the MoE
# module holds a ``[d, E]`` ``router_weight`` and stacked ``[E, d, F]`` / ``[E, F, d]`` expert weights; the router
# function softmaxes in float32 and takes an unsorted ``torch.topk`` (``sorted=False``); Ernie's adds a bias to
# the softmax for the choice only, gathers the unbiased weights and divides by their clamped sum. The flat slot
# ids are ordered by expert (``get_token_indices``: a stable ``argsort`` and the cumulative counts per expert), each
# expert runs on its slice, its output scaled in place (``mul_``) by the slot weights and ``scatter_reduce_``d into
# the tokens. (Compiled with the ``eager`` backend here: the same graph capture, no code generation; and the
# ``scatter_reduce`` out of place, as the whole compiled function runs functionalised upstream: in eager the
# in-place form saves a buffer it writes again, and its backward fails.)
def _softmax(x: torch.Tensor) -> torch.Tensor:
    return F.softmax(x, dim=-1, dtype=torch.float32)


@torch.compile(backend="eager")
def topk_router(
    x: torch.Tensor, weight: torch.Tensor, topk: int, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _softmax(x @ weight)
    if forced is None:
        topk_scores, topk_indices = torch.topk(logits, k=topk, dim=-1, sorted=False)
    else:
        topk_indices = forced
        topk_scores = logits.gather(-1, forced)
    return topk_scores.to(x.dtype), topk_indices


@torch.compile(backend="eager")
def ernie_router(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x.float() @ weight
    weights = _softmax(logits)
    if forced is None:
        _, topk_indices = torch.topk(weights + bias, k=topk, dim=-1, sorted=False)
    else:
        topk_indices = forced
    weights = torch.gather(weights, index=topk_indices, dim=-1)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=1e-12)
    return weights.to(x.dtype), topk_indices


class TopkMoE(_Used):
    e_score_correction_bias: torch.Tensor

    def __init__(self, num_experts: int = 4, hidden: int = D, inter: int = 8, topk: int = 2, ernie: bool = False):
        super().__init__()
        self.num_experts, self.topk, self.ernie = num_experts, topk, ernie
        g = torch.Generator().manual_seed(5)
        self.router_weight = nn.Parameter(0.5 * torch.randn(hidden, num_experts, generator=g))
        self.weight1 = nn.Parameter(0.3 * torch.randn(num_experts, hidden, inter, generator=g))
        self.weight2 = nn.Parameter(0.3 * torch.randn(num_experts, inter, hidden, generator=g))
        if ernie:
            self.register_buffer("e_score_correction_bias", 0.1 * torch.randn(num_experts, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, x.size(-1))
        if self.ernie:
            topk_scores, topk_indices = ernie_router(
                x, self.router_weight, self.e_score_correction_bias, self.topk, self.forced
            )
        else:
            topk_scores, topk_indices = topk_router(x, self.router_weight, self.topk, self.forced)
        self.used = topk_indices
        flat_expert_weights = topk_scores.view(-1, 1)
        flat = topk_indices.flatten()
        indices = flat.argsort(stable=True)
        group_indices = torch.bincount(flat, minlength=self.num_experts).cumsum(0)
        expert_cache = torch.zeros_like(x)
        for expert_id, end_idx in enumerate(group_indices.tolist()):
            start_idx = 0 if expert_id == 0 else int(group_indices[expert_id - 1])
            if start_idx == end_idx:
                continue
            exp_token_idxs = indices[start_idx:end_idx] // self.topk
            expert_up = F.gelu(x[exp_token_idxs] @ self.weight1[expert_id])
            expert_out = expert_up @ self.weight2[expert_id]
            expert_out.mul_(flat_expert_weights[indices[start_idx:end_idx]])
            expert_cache = expert_cache.scatter_reduce(
                0, exp_token_idxs.view(-1, 1).repeat(1, x.shape[-1]), expert_out, reduce="sum"
            )
        return expert_cache.view(shape)


# ----------------------------------------------------------------------- Boost Your NeRF: points routed after filters
# EIDOSLAB/boost-your-nerf dvgo/moe.py (``DVGOMoE``, ``DirectVoxGOGate``, ``DirectVoxGOExpert``): a mixture of
# radiance fields at several resolutions. Points sampled along each ray are filtered twice before routing (a coarse
# density's alpha over ``fast_color_thres``, then the rendering weight over it), so which points are routed depends
# on the density field. The gate (a feature field and an MLP over it with the view direction's encoding) gives the
# logits; the MoE softmaxes them, ``torch.topk``, renormalises for k > 1; expert i renders the points whose top-k
# holds i (``(indices == i).sum(-1).bool()``), weighted by ``vals[indices == i]``, written by boolean-mask
# assignment into per-expert buffers that are summed and alpha-composited along each ray. (Our fields are linear
# maps of the points for the voxel grids, the CUDA ray sampler a fixed number of steps, ``Alphas2Weights`` its
# cumulative product in torch and ``segment_coo`` an ``index_add``.)
def _alphas2weights(alpha: torch.Tensor, ray_id: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's alpha times the transmittance before it on its ray (points sorted by ray), and each ray's
    transmittance past its last point: a cumulative product along the rays laid out as rows."""
    counts = torch.bincount(ray_id, minlength=n)
    starts = counts.cumsum(0) - counts
    place = torch.arange(len(alpha)) - starts[ray_id]
    width = int(counts.max()) if len(alpha) else 0
    kept = torch.ones(n, width + 1, dtype=alpha.dtype).index_put((ray_id, place + 1), 1 - alpha).cumprod(1)
    return alpha * kept[ray_id, place], kept[:, -1]


def _raw2alpha(density: torch.Tensor, shift: float, interval: float) -> torch.Tensor:
    return 1 - torch.exp(-F.softplus(density + shift) * interval)


class _Field(nn.Linear):
    """A voxel grid's stand-in: values at the points, linear in the parameters as a trilinear lookup is."""

    def __init__(self, out: int) -> None:
        super().__init__(3, out)


def _viewdirs_emb(viewdirs: torch.Tensor, viewfreq: torch.Tensor) -> torch.Tensor:
    emb = (viewdirs.unsqueeze(-1) * viewfreq).flatten(-2)
    return torch.cat([viewdirs, emb.sin(), emb.cos()], -1)


class DirectVoxGOGate(nn.Module):
    viewfreq: torch.Tensor

    def __init__(self, num_experts: int = 3, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.k0 = _Field(4)
        self.register_buffer("viewfreq", torch.tensor([1.0, 2.0]))
        self.rgbnet = nn.Sequential(nn.Linear(4 + 3 + 12, 8), nn.ReLU(), nn.Linear(8, num_experts))

    def forward(self, ray_pts: torch.Tensor, viewdirs: torch.Tensor, ray_id: torch.Tensor) -> torch.Tensor:
        emb = _viewdirs_emb(viewdirs, self.viewfreq)[ray_id]
        return self.rgbnet(torch.cat([self.k0(ray_pts), emb], -1))  # type: ignore[no-any-return]


class DirectVoxGOExpert(nn.Module):
    viewfreq: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.density, self.k0 = _Field(1), _Field(4)
        self.register_buffer("viewfreq", torch.tensor([1.0, 2.0]))
        self.rgbnet = nn.Sequential(nn.Linear(4 + 3 + 12, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(
        self, viewdirs: torch.Tensor, ray_pts: torch.Tensor, ray_id: torch.Tensor, interval: float, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        ray_pts, ray_id = ray_pts[mask], ray_id[mask]
        alpha = _raw2alpha(self.density(ray_pts).squeeze(-1), -1.0, interval)
        emb = _viewdirs_emb(viewdirs, self.viewfreq)[ray_id]
        radiance = torch.sigmoid(self.rgbnet(torch.cat([self.k0(ray_pts), emb], -1)))
        return {"radiance": radiance, "alpha": alpha, "ray_id": ray_id}


class DVGOMoE(_Used):
    def __init__(
        self, num_experts: int = 3, top_k: int = 2, thres: float = 1e-4, steps: int = 3, act_shift: float = -2.0
    ) -> None:
        super().__init__()
        self.models = nn.ModuleList(DirectVoxGOExpert() for _ in range(num_experts))
        self.num_experts, self.fast_color_thres, self.steps, self.act_shift = num_experts, thres, steps, act_shift
        self.gate = DirectVoxGOGate(num_experts, top_k)
        self.density = _Field(1)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        rays_o, viewdirs = rays[:, :3], F.normalize(rays[:, 3:], dim=-1)
        n = len(rays_o)
        t = torch.linspace(0.2, 1.0, self.steps)
        ray_pts = (rays_o[:, None] + t[None, :, None] * viewdirs[:, None]).reshape(-1, 3)
        ray_id = torch.arange(n).repeat_interleave(self.steps)
        interval = 0.5
        alpha = _raw2alpha(self.density(ray_pts).squeeze(-1), self.act_shift, interval)
        if self.fast_color_thres > 0:
            mask = alpha > self.fast_color_thres
            ray_pts, ray_id, alpha = ray_pts[mask], ray_id[mask], alpha[mask]
        weights, _ = _alphas2weights(alpha, ray_id, n)
        if self.fast_color_thres > 0:
            mask2 = weights > self.fast_color_thres
            ray_pts, ray_id = ray_pts[mask2], ray_id[mask2]
        r_s = torch.zeros(self.num_experts, *ray_pts.shape)
        alpha_s = torch.zeros(self.num_experts, ray_pts.shape[0])
        logits = self.gate(ray_pts, viewdirs, ray_id)
        probs = torch.softmax(logits, dim=-1)
        top_k = self.gate.top_k
        if self.forced is None:
            vals, indices = torch.topk(probs, k=top_k)
        else:
            indices = self.forced
            vals = probs.gather(-1, indices)
        self.used = indices
        if top_k > 1:
            vals = vals / torch.sum(vals, dim=-1).unsqueeze(-1)
        for i in range(self.num_experts):
            mask = indices == i
            g_val = (vals[mask]).unsqueeze(-1)
            mask = mask.sum(dim=-1).bool()
            render_result = self.models[i](viewdirs, ray_pts, ray_id, interval, mask=mask)
            r_s[i][mask] = render_result["radiance"] * g_val
            alpha_s[i][mask] = render_result["alpha"] * g_val.squeeze()
        rgb = torch.sum(r_s, dim=0)
        alpha = torch.sum(alpha_s, dim=0)
        weights, alphainv_last = _alphas2weights(alpha, ray_id, n)
        rgb_marched = torch.zeros(n, 3).index_add(0, ray_id, weights.unsqueeze(-1) * rgb)
        return rgb_marched + alphainv_last.unsqueeze(-1) * 1.0


def _rays() -> torch.Tensor:
    return torch.randn(2, 6, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------- edadaltocg/research: a gate passed in
# edadaltocg/research research/nn/layers/moe.py (``MoELayer``): the layer takes its experts and any gate module;
# ``torch.topk`` of the gate's logits, a softmax over the k in float32 cast back, and per expert
# ``torch.where(selected_experts == i)`` gives the rows and slots, ``results[batch_idx] += ...`` in place.
class MoELayer(_Used):
    def __init__(self, experts: Sequence[nn.Module], gate: nn.Module, num_experts_per_tok: int = 2) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.num_experts_per_tok = num_experts_per_tok

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(inputs)
        if self.forced is None:
            weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        else:
            selected_experts = self.forced
            weights = gate_logits.gather(-1, selected_experts)
        self.used = selected_experts
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


def _research_layer() -> nn.Module:
    experts = [nn.Sequential(nn.Linear(D, 8), nn.SiLU(), nn.Linear(8, D)) for _ in range(4)]
    return MoELayer(experts, nn.Linear(D, 4, bias=False))


def _tokens() -> torch.Tensor:
    return torch.randn(10, D, generator=torch.Generator().manual_seed(4))


class _Holder(nn.Module):
    """A model around one MoE block (the block's own name is then ``block``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # type: ignore[no-any-return]


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``make`` with its parameters drawn from a fixed seed (the global generator left as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return make()

    return build


def _held(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return _seeded(lambda: _Holder(make()))


# ----------------------------------------------------------------------- the cases
_TIMEEXPERT: dict[str, object] = {"include": AdaptiveLocalExpertSelection, "top_k": 2, "num_experts": 6}

EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train`` and attach options)
    # (the experts of a query are the key positions: their count is the sequence's length, named with the router)
    "timeexpert-key-positions-named": (_seeded(TMOELayer), _seq, _TIMEEXPERT),
    "timeexpert-key-positions-shared-named": (_seeded(lambda: TMOELayer(shared=True)), _seq, _TIMEEXPERT),
    "moe-explore-compiled-topk": (_held(TopkMoE), _tokens, {}),
    "moe-explore-compiled-ernie": (_held(lambda: TopkMoE(ernie=True)), _tokens, {}),
    # (a smaller change of the routers: a forced expert's softmax score under float32's range makes the renormalised
    # weights 0/0, upstream as by hand, and NaN is never equal to itself)
    "boost-your-nerf-unfiltered-points": (_held(lambda: DVGOMoE(thres=0.0)), _rays, {"change": 0.5}),
    "research-moe-layer": (_held(_research_layer), _tokens, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """TimeExpert's key positions chosen per query (detached per-head scores); Mixture-of-Recursions' depth by argmax
    (a hard Gumbel-softmax in training); moe-explore's compiled router functions (unsorted top-k, Ernie's biased
    choice); Boost Your NeRF's points routed after density filters; a research layer whose gate is passed in: every
    router found and nothing else, the recorded rows the experts used, and a replay after the routers change those
    experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "timeexpert-zero-configuration": (_seeded(TMOELayer), _seq, "no MoE router found", {}),
    "timeexpert-named-without-its-count": (
        _seeded(TMOELayer),
        _seq,
        r"'attn\.router': cannot tell its expert count; pass num_experts=",
        {"include": AdaptiveLocalExpertSelection},
    ),
    "mixture-of-recursions-zero-configuration": (_seeded(MixtureOfRecursions), _ids, "no MoE router found", {}),
    "mixture-of-recursions-named-depth-shifted": (
        _seeded(MixtureOfRecursions),
        _ids,
        r"router 'router': its decision .*argmax\(\) over 3.* shifted by \+1",
        {"include": RecursiveRouter},
    ),
    "mixture-of-recursions-named-depth-shifted-train": (
        _seeded(MixtureOfRecursions),
        _ids,
        r"router 'router': its decision .*argmax\(\) over 3.* shifted by \+1",
        {"include": RecursiveRouter, "train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """TimeExpert's key positions as experts (a router with no parameters over a width that is the sequence's
    length: not found alone, and named without its count); Mixture-of-Recursions' depth (not found alone; named, its
    argmax plus the least depth is a shifted id, in eval and under a hard Gumbel-softmax in training): refused with a
    ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a decision made for the points density filters keep: one of the checks at the first capture forces "
    "rows held from one run onto a run that routes fewer points, and its own code raises (reported as a fault of "
    "moe_replay) before the check that names the choice of tokens from their values",
)
def test_points_kept_by_density_filters_are_refused_naming_why() -> None:
    """Boost Your NeRF with filters that keep some of the points (which are routed is chosen from their values
    before the gate): refused at the first capture with a ``MoEReplayError`` that says its decision is made for a
    share of the tokens chosen from their values, not as a fault of moe_replay; the model as it was."""
    assert_refused(
        _held(lambda: DVGOMoE(thres=0.3, act_shift=1.0))(),
        _rays(),
        r"router 'block\.gate': its decision .* is made for \d+ of the \d+ tokens it took",
    )


@pytest.mark.reliability("silent replays")
def test_points_a_changed_density_filters_out_are_refused_at_replay() -> None:
    """Boost Your NeRF with its filters on, where they keep every point at the capture: the capture records one row
    per point routed (the experts used); after the parameters change, the density filters a point out, and a replay
    of the same rays is refused with a ``MoEReplayError`` that names the rows recorded and those the forward took;
    the model is as it was."""
    model = _held(lambda: DVGOMoE(steps=6))().eval()
    rays = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        assert session.names == ("block.gate",)
        with torch.no_grad(), session.capture():
            model(rays)
        routes = session.routes()
        block = model.block
        assert isinstance(block, DVGOMoE) and block.used is not None
        assert torch.equal(routes.layer("block.gate").sort(-1).values, block.used.sort(-1).values)
        recorded = len(block.used)
        perturb(model, 3.0)
        before = snapshot(model)
        with torch.no_grad():
            model(rays)
        routed = len(block.used)
        assert routed < recorded, "the changed density keeps every point: the case tries nothing"
        with pytest.raises(mr.MoEReplayError, match=rf"'block\.gate' consumed {routed} of {recorded} rows"):
            with torch.no_grad(), session.replay(routes):
                model(rays)
    assert_untouched(model, before)
