"""Router styles of MoE codebases outside transformers, rewritten small (our own code, no copies).

Each block reproduces the routing behaviour of one upstream router, named in its docstring, down
to the calls that make the decision, where it is made (router or block), the dtype casts and
what the router returns; the experts are plain SwiGLU MLPs. :func:`build` wraps a block kind in
a tiny language model (embedding, residual MoE layers, head) so that the same four checks as the
HF sweep apply (``replay_checks``). Nothing here is imported by the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .replay_checks import Built

DIM, FFN, VOCAB = 32, 32, 96


class SwiGLU(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = FFN) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class StackedExperts(nn.Module):
    """E SwiGLU experts with stacked ``[E, ...]`` weights, run on their tokens (torchtitan ``GroupedExperts``)."""

    def __init__(self, num_experts: int, dim: int = DIM, hidden: int = FFN) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(num_experts)
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim, generator=g) / math.sqrt(dim))
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden, dim, generator=g) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden, generator=g) / math.sqrt(hidden))

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T) @ self.w2[e].T


def _combine(experts: StackedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * expert_{idx[t, k]}(x[t]), slot by slot."""
    out = torch.zeros_like(x)
    for slot in range(idx.shape[1]):
        for e in range(experts.w1.shape[0]):
            sel = (idx[:, slot] == e).nonzero().squeeze(-1)
            if sel.numel():
                out = out.index_add(0, sel, w[sel, slot, None].to(x.dtype) * experts.run(e, x[sel]))
    return out


# ----------------------------------------------------------------------- torchtitan
class TokenChoiceTopKRouter(nn.Module):
    """Mirrors torchtitan ``torchtitan/models/moe/moe.py`` (``TokenChoiceTopKRouter``).

    Sigmoid (or softmax) scores; the load-balancing ``expert_bias`` (owned by the MoE block and
    passed in) only shifts the selection, the weights are gathered from the unbiased scores;
    optional renormalisation and ``route_scale``. Returns (top scores, expert ids, tokens per expert).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "sigmoid") -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k, self.score_func = num_experts, top_k, score_func
        self.route_norm, self.route_scale = True, 1.0

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.gate(x)
        scores = torch.sigmoid(scores.float()) if self.score_func == "sigmoid" else F.softmax(scores.float(), dim=1)
        if expert_bias is not None:
            _, selected = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
            top_scores = scores.gather(dim=1, index=selected)
        else:
            top_scores, selected = torch.topk(scores, k=self.top_k, dim=1)
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        counts = torch.histc(selected.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        return top_scores, selected, counts


class TitanMoE(nn.Module):
    """torchtitan ``MoE``: router, grouped experts, a selection-only ``expert_bias`` buffer."""

    def __init__(self, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.router = TokenChoiceTopKRouter(DIM, num_experts, top_k)
        self.experts = StackedExperts(num_experts)
        self.register_buffer("expert_bias", torch.linspace(-0.05, 0.05, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_scores, selected, _counts = self.router(x, self.expert_bias)
        return _combine(self.experts, x, selected, top_scores).reshape(shape)


# ----------------------------------------------------------------------- Megatron-core
def _topk_routing(logits: torch.Tensor, topk: int, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors ``megatron/core/transformer/moe/moe_utils.py`` (``topk_routing_with_score_function``,
    sigmoid scores with an expert bias): dense probabilities ``[T, E]`` and a boolean routing map."""
    scores = torch.sigmoid(logits.float())
    _, top_indices = torch.topk(scores + expert_bias, k=topk, dim=1)
    probs = torch.gather(scores, 1, top_indices)
    probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    routing_probs = torch.zeros_like(logits, dtype=probs.dtype).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


class MegatronTopKRouter(nn.Module):
    """Mirrors ``megatron/core/transformer/moe/router.py`` (``TopKRouter``): the router owns its
    ``[E, hidden]`` weight, computes fp32 logits and returns ``(probs [T, E], routing_map [T, E])``."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.topk, self.num_experts = top_k, num_experts
        self.weight = nn.Parameter(torch.randn(num_experts, DIM) / math.sqrt(DIM))
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())
        return _topk_routing(logits, self.topk, self.expert_bias)


class MegatronMoE(nn.Module):
    """Megatron ``MoELayer``: tokens are dispatched by the boolean map and weighted by the dense probs."""

    def __init__(self, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.router = MegatronTopKRouter(num_experts, top_k)
        self.experts = StackedExperts(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, routing_map = self.router(x)
        out = torch.zeros_like(x)
        for e in range(self.router.num_experts):
            tokens = routing_map[:, e].nonzero().squeeze(-1)
            if tokens.numel():
                out = out.index_add(0, tokens, probs[tokens, e, None].to(x.dtype) * self.experts.run(e, x[tokens]))
        return out.reshape(shape)


# ----------------------------------------------------------------------- DeepSpeed
def _capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    return max(math.ceil(num_tokens / num_experts * capacity_factor), min_capacity)


def _top1gating(logits: torch.Tensor, capacity_factor: float, min_capacity: int) -> tuple[torch.Tensor, ...]:
    """Mirrors ``deepspeed/moe/sharded_moe.py`` (``top1gating``) with ``use_rts=False``: argmax of the
    softmax, one-hot masks, capacity by cumulative position, combine weights ``[S, E, C]`` from mask *
    gates. (DeepSpeed's default random token selection drops by a random draw after the decision:
    refused, see ``test_public_routers::test_deepspeed_random_token_selection_is_refused``.)"""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    capacity = _capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    indices1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    mask1 = mask1 * torch.lt(locations1, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates1_s = torch.einsum("se,se->s", gates, mask1.float())
    locations1_sc = F.one_hot(locations1_s, num_classes=capacity).float()
    combine = torch.einsum("s,se,sc->sec", gates1_s, mask1.float(), locations1_sc)
    return combine, combine.bool()


def _top2gating(logits: torch.Tensor, capacity_factor: float, min_capacity: int) -> tuple[torch.Tensor, ...]:
    """Mirrors ``deepspeed/moe/sharded_moe.py`` (``top2gating``): the first expert by argmax of
    the softmax, the second by argmax of Gumbel-noised logits with the first masked to -inf;
    capacity for the second counts after all first choices; the two gates are renormalised."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    capacity = _capacity(num_tokens, num_experts, 2 * capacity_factor, min_capacity)
    indices1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=num_experts)
    gumbel = -torch.empty_like(logits).exponential_().log()
    logits_except1 = (logits + gumbel).masked_fill(mask1.bool(), float("-inf"))
    indices2 = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2, num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    gates1_s = torch.einsum("se,se->s", gates, mask1.float())
    gates2_s = torch.einsum("se,se->s", gates, mask2.float())
    denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    gates1_s, gates2_s = gates1_s / denom, gates2_s / denom
    combine1 = torch.einsum("s,se,sc->sec", gates1_s, mask1.float(), F.one_hot(locations1_s, capacity).float())
    combine2 = torch.einsum("s,se,sc->sec", gates2_s, mask2.float(), F.one_hot(locations2_s, capacity).float())
    combine = combine1 + combine2
    return combine, combine.bool()


class TopKGate(nn.Module):
    """Mirrors ``deepspeed/moe/sharded_moe.py`` (``TopKGate``): a ``wg`` Linear in fp32 and
    ``top1gating``/``top2gating`` with capacity; returns combine weights and the dispatch mask."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0) -> None:
        super().__init__()
        if k not in (1, 2):
            raise ValueError("only top-1 or top-2 gating is supported")
        self.wg = nn.Linear(model_dim, num_experts, bias=False).float()
        self.k, self.capacity_factor, self.min_capacity = k, capacity_factor, 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.wg(x.float())
        gating = _top1gating if self.k == 1 else _top2gating
        return gating(logits, self.capacity_factor, self.min_capacity)


class DeepSpeedMoE(nn.Module):
    """DeepSpeed ``MOELayer``: dispatch by ``einsum`` into ``[E, C, d]``, experts, combine back."""

    def __init__(self, num_experts: int = 8, k: int = 1) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = TopKGate(DIM, num_experts, k=k)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        combine, dispatch = self.gate(x)
        dispatched = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
        out = torch.stack([expert(dispatched[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), out).reshape(shape)


# ----------------------------------------------------------------------- MegaBlocks
@dataclass
class MegaBlocksArguments:
    """The part of ``megablocks/layers/arguments.py`` (``Arguments``) the router reads."""

    hidden_size: int = DIM
    moe_num_experts: int = 8
    moe_top_k: int = 1
    moe_normalize_expert_weights: float | None = None


class LearnedRouter(nn.Module):
    """Mirrors ``megablocks/layers/router.py`` (``LearnedRouter``): softmax scores, then ``max``
    for top-1 (``topk`` otherwise); returns (scores, expert weights, expert indices)."""

    def __init__(self, args: MegaBlocksArguments) -> None:
        super().__init__()
        self.args = args
        self.layer = nn.Linear(args.hidden_size, args.moe_num_experts, bias=False)

    def _top_k(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.moe_top_k == 1:
            return scores.max(dim=-1, keepdim=True)
        return torch.topk(scores, self.args.moe_top_k, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        expert_weights, expert_indices = self._top_k(scores)
        if self.args.moe_normalize_expert_weights:
            norm = torch.norm(expert_weights, p=self.args.moe_normalize_expert_weights, dim=-1, keepdim=True)
            expert_weights = expert_weights / norm
        return scores, expert_weights, expert_indices


class MegaBlocksMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.args = MegaBlocksArguments()
        self.router = LearnedRouter(self.args)
        self.experts = StackedExperts(self.args.moe_num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        _, weights, indices = self.router(x)
        flat = x.reshape(-1, shape[-1])
        return _combine(self.experts, flat, indices, weights).reshape(shape)


# ----------------------------------------------------------------------- gpt-fast
class ConditionalFeedForward(nn.Module):
    """gpt-fast's stacked experts ``w1, w2, w3 [E, ...]``, gathered per token and slot."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = nn.Parameter(torch.randn(num_experts, FFN, DIM, generator=g) / math.sqrt(DIM))
        self.w2 = nn.Parameter(torch.randn(num_experts, DIM, FFN, generator=g) / math.sqrt(FFN))
        self.w3 = nn.Parameter(torch.randn(num_experts, FFN, DIM, generator=g) / math.sqrt(DIM))

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1[expert_indices], self.w3[expert_indices], self.w2[expert_indices]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, w1))
        x3 = torch.einsum("ti,taoi->tao", x, w3)
        return torch.einsum("tao,taio->tai", x1 * x3, w2)


@dataclass
class GptFastArgs:
    """The part of gpt-fast's ``ModelArgs`` (mixtral-moe) the MoE reads."""

    num_experts: int = 8
    num_activated_experts: int = 2


class MOEFeedForward(nn.Module):
    """Mirrors gpt-fast ``mixtral-moe/model.py`` (``MOEFeedForward``): a bare ``Linear`` gate; the
    softmax, top-k and renormalisation run in the block; ``einsum`` combine."""

    def __init__(self, args: GptFastArgs) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, args.num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(args.num_experts)
        self.dim, self.num_activated_experts = DIM, args.num_activated_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, self.dim)
        expert_weights = F.softmax(self.gate(x), dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        expert_outs = self.cond_ffn(x, expert_indices)
        return torch.einsum("tai,ta->ti", expert_outs, expert_weights).view(shape)


# ----------------------------------------------------------------------- mistral-inference
@dataclass
class MoeArgs:
    """``mistral_inference/args.py`` (``MoeArgs``)."""

    num_experts: int = 8
    num_experts_per_tok: int = 2


class MoeLayer(nn.Module):
    """Mirrors ``mistral_inference/moe.py`` (``MoeLayer``): a bare ``Linear`` gate, ``topk`` on the
    logits in the block (default dim), softmax over the k in fp32, one loop per expert."""

    def __init__(self, experts: list[nn.Module], gate: nn.Module, moe_args: MoeArgs) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        inputs = inputs.reshape(-1, shape[-1])
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.args.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results.reshape(shape)


def _mistral_moe() -> MoeLayer:
    args = MoeArgs()
    return MoeLayer([SwiGLU() for _ in range(args.num_experts)], nn.Linear(DIM, args.num_experts, bias=False), args)


# ----------------------------------------------------------------------- nanoGPT-MoE
class NoisyTopkRouter(nn.Module):
    """Mirrors the nanoGPT-based MoE tutorials (makeMoE ``makeMoE.py`` / nanoMoE ``model.py``,
    ``NoisyTopkRouter``): logits plus softplus-scaled Gaussian noise, top-k of the noisy logits,
    softmax over a -inf-filled sparse copy; returns (router output ``[.., E]``, indices)."""

    def __init__(self, n_embed: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.topkroute_linear = nn.Linear(n_embed, num_experts)
        self.noise_linear = nn.Linear(n_embed, num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.topkroute_linear(x)
        noise = torch.randn_like(logits) * F.softplus(self.noise_linear(x))
        noisy_logits = logits + noise
        top_k_logits, indices = noisy_logits.topk(self.top_k, dim=-1)
        sparse_logits = torch.full_like(noisy_logits, float("-inf")).scatter(-1, indices, top_k_logits)
        return F.softmax(sparse_logits, dim=-1), indices


class SparseMoE(nn.Module):
    def __init__(self, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.router = NoisyTopkRouter(DIM, num_experts, top_k)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gating, indices = self.router(x)
        out = torch.zeros_like(x)
        flat_x, flat_gating = x.reshape(-1, x.shape[-1]), gating.reshape(-1, gating.shape[-1])
        flat_idx = indices.reshape(-1, indices.shape[-1])
        flat_out = out.reshape(-1, x.shape[-1])
        for i, expert in enumerate(self.experts):
            mask = (flat_idx == i).any(dim=-1)
            if mask.any():
                contribution = expert(flat_x[mask]) * flat_gating[mask, i, None]
                flat_out = flat_out.index_add(0, mask.nonzero().squeeze(-1), contribution)
        return flat_out.reshape(x.shape)


# ----------------------------------------------------------------------- the model around a block
class StyleModel(nn.Module):
    """Embedding, ``layers`` pre-norm residual layers (a causal mixing plus the MoE block), head."""

    def __init__(self, make_block: Callable[[], nn.Module], layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))
        self.mix = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(layers))
        self.layers = nn.ModuleList(make_block() for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for norm, mix, block in zip(self.norms, self.mix, self.layers, strict=True):
            h = norm(x)
            h = mix(torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1, device=h.device)[:, None])
            x = x + block(h)
        return self.head(x)


#: style -> (block factory, router attribute inside the block)
STYLES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "torchtitan TokenChoiceTopKRouter": (TitanMoE, "router"),
    "Megatron-core TopKRouter": (MegatronMoE, "router"),
    "DeepSpeed TopKGate k=1": (lambda: DeepSpeedMoE(k=1), "gate"),
    "DeepSpeed TopKGate k=2": (lambda: DeepSpeedMoE(k=2), "gate"),
    "MegaBlocks LearnedRouter": (MegaBlocksMoE, "router"),
    "gpt-fast MOEFeedForward": (lambda: MOEFeedForward(GptFastArgs()), "gate"),
    "mistral-inference MoeLayer": (_mistral_moe, "gate"),
    "nanoGPT-MoE NoisyTopkRouter": (SparseMoE, "router"),
}


def build(style: str, seed: int = 0) -> tuple[Built, list[str]]:
    """A tiny model of ``style`` with inputs, and the router names it has by construction."""
    make_block, router = STYLES[style]
    torch.manual_seed(seed)
    model = StyleModel(make_block).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    blocks = {f"layers.{i}": 8 for i in range(len(model.layers))}
    return Built(model, {"input_ids": ids}, blocks), [f"layers.{i}.{router}" for i in range(len(model.layers))]
