"""Small but real MoE transformers in pure torch, one per router style users meet.

They serve the demo, the tests, the benchmarks and the notebooks. Each is a causal
decoder (attention with a KV cache, RMSNorm, SwiGLU experts) whose MoE layers use one
of five router styles:

=================  ==========================================================================
``softmax_topk``   a router module returning (logits, weights, indices): softmax, top-k,
                   renormalise (Qwen2/3-MoE, OLMoE)
``topk_softmax``   top-k on the logits, then softmax over the k (Mixtral-inference, gpt-fast)
``grouped_sigmoid`` sigmoid scores, a selection-only bias and group-limited top-k (DeepSeek-V3)
``linear_gate``    a bare ``nn.Linear`` gate with the top-k in the MoE block (Mixtral in
                   transformers v4, DBRX-style blocks)
``top1_argmax``    a top-1 router choosing by ``argmax`` (Switch Transformer)
=================  ==========================================================================

Example:
    >>> import torch, moe_replay as mr
    >>> model = mr.models.build("grouped_sigmoid", num_layers=2)
    >>> ids = torch.randint(0, model.config.vocab_size, (1, 5))
    >>> model.generate(ids, max_new_tokens=3).shape
    torch.Size([1, 8])
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _progress
from ._checks import is_integer, is_one_of
from .errors import InvalidArgumentError

__all__ = [
    "CHECKPOINTING",
    "MAX_PARAMETER_BYTES",
    "STYLES",
    "Experts",
    "GroupedSigmoidRouter",
    "MoEBlock",
    "MoEConfig",
    "MoEOutput",
    "MoETransformer",
    "SoftmaxTopKRouter",
    "Top1ArgmaxRouter",
    "TopKSoftmaxRouter",
    "build",
]

STYLES: tuple[str, ...] = ("softmax_topk", "topk_softmax", "grouped_sigmoid", "linear_gate", "top1_argmax")

#: Activation checkpointing of each layer while gradients are on (``torch.utils.checkpoint``).
CHECKPOINTING: tuple[str, ...] = ("none", "reentrant", "non_reentrant")

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

#: The most bytes of parameters (float32) a reference model may hold: 16 GiB, or the machine's memory where it
#: is less. A configuration past it is refused at build, before anything is allocated.
MAX_PARAMETER_BYTES = 16 << 30


@dataclass
class MoEConfig:
    """Shape and router style of a reference MoE.

    ``extra`` is read by no part of the model: it must stay empty, and entries given in it are refused where they
    would be ignored without a word (set the field that does what is meant instead: ``build(style, top_k=4)``).
    """

    router: str = "softmax_topk"
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 64
    max_positions: int = 512
    first_dense_layers: int = 0
    shared_expert: bool = False
    norm_topk_prob: bool = True
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    group_weights_from_topk: bool = False
    expert_impl: str = "sparse"
    router_init_std: float = 0.5
    checkpointing: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_extra()
        for f in fields(self):  # (each field of its own type first: a str or float count fails deep in torch)
            value, kind = getattr(self, f.name), f.type
            # (a numpy integer or a 0-d tensor is the count it holds, as everywhere in the package: kept as an int)
            if kind == "int" and (not is_integer(value) or int(value) < 0):
                raise InvalidArgumentError(f"{f.name} must be a non-negative int, got {value!r:.60}")
            if kind == "bool" and not isinstance(value, bool | np.bool_):
                raise InvalidArgumentError(f"{f.name} must be True or False, got {value!r:.60}")
            if kind == "float" and not (is_integer(value) or isinstance(value, float | np.floating)):
                raise InvalidArgumentError(f"{f.name} must be a number, got {value!r:.60}")
            if kind in ("int", "bool", "float"):
                setattr(self, f.name, {"int": int, "bool": bool, "float": float}[kind](value))
        if not is_one_of(self.router, STYLES):
            raise InvalidArgumentError(f"unknown router style {self.router!r}; choose one of {STYLES}")
        if self.router == "top1_argmax":
            self.top_k = 1
        if not is_one_of(self.expert_impl, ("sparse", "dense")):
            raise InvalidArgumentError("expert_impl must be 'sparse' or 'dense'")
        if not is_one_of(self.checkpointing, CHECKPOINTING):
            raise InvalidArgumentError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.router == "grouped_sigmoid" and self.n_group < 1:
            raise InvalidArgumentError(f"n_group must be a positive int, got {self.n_group}")
        if self.router == "grouped_sigmoid" and self.num_experts % self.n_group:
            raise InvalidArgumentError("num_experts must be a multiple of n_group")
        for name in ("vocab_size", "hidden_size", "num_heads", "num_experts", "top_k", "expert_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise InvalidArgumentError(f"top_k={self.top_k} is more than the num_experts={self.num_experts} experts")
        if self.hidden_size % self.num_heads:
            raise InvalidArgumentError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if self.router == "grouped_sigmoid" and not 1 <= self.topk_group <= self.n_group:
            raise InvalidArgumentError(f"topk_group must be in 1..n_group={self.n_group}, got {self.topk_group}")
        kept = self.topk_group * (self.num_experts // max(self.n_group, 1))
        if self.router == "grouped_sigmoid" and self.top_k > kept:
            # (the top-k would take experts of the groups masked out, at score 0, and weigh them by their own scores)
            raise InvalidArgumentError(
                f"top_k={self.top_k} is more than the {kept} experts of the topk_group={self.topk_group} groups a "
                f"token keeps ({self.num_experts // self.n_group} experts in each of n_group={self.n_group}): raise "
                "topk_group or lower top_k"
            )
        if self.num_layers < 1:
            raise InvalidArgumentError(f"num_layers must be a positive int, got {self.num_layers}")
        if self.first_dense_layers >= self.num_layers:
            raise InvalidArgumentError(
                f"first_dense_layers={self.first_dense_layers} leaves none of the num_layers={self.num_layers} layers "
                "an MoE layer: a model with no router. Use fewer dense layers or more layers"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not math.isfinite(value):
                raise InvalidArgumentError(f"{f.name} must be a finite number, got {value!r}")
        need, cap = 4 * self.parameter_count(), _parameter_byte_cap()
        if need > cap:
            raise InvalidArgumentError(
                f"this configuration holds {self.parameter_count():,} parameters ({need / 2**30:,.1f} GiB in float32), "
                f"more than the {cap / 2**30:,.1f} GiB a reference model may hold (MAX_PARAMETER_BYTES, or the "
                "machine's memory where less): use smaller sizes (num_layers, num_experts, hidden_size, expert_size, "
                "vocab_size, max_positions)"
            )

    def _check_extra(self) -> None:
        """Refuse entries in ``extra``, which no part of the model reads.

        Raises:
            InvalidArgumentError: ``extra`` is not empty (or no dict), naming the fields its keys spell.
        """
        extra = self.extra
        if isinstance(extra, dict) and not extra:
            return
        names = [f.name for f in fields(self) if f.name != "extra"]
        spelt = [k for k in extra if k in names] if isinstance(extra, dict) else []
        fix = (
            f"set {', '.join(f'{k}={extra[k]!r:.20}' for k in spelt)} as {'fields' if len(spelt) > 1 else 'a field'} "
            "instead"
            if spelt
            else f"set the fields that do what is meant instead ({', '.join(names[1:])})"
        )
        raise InvalidArgumentError(
            f"extra={extra!r:.80} would be ignored: no part of the reference model reads MoEConfig.extra. Leave it "
            f"empty, and {fix}"
        )

    def parameter_count(self) -> int:
        """How many parameters and buffers a model of this configuration holds at most, computed from its sizes alone
        (nothing is allocated): embeddings, output head and final norm, then per layer its norms, attention and
        its MLP (an MoE block's router with a selection bias, its experts and shared expert, or a dense MLP)."""
        h, e, s = self.hidden_size, self.num_experts, self.expert_size
        moe_layers = self.num_layers - min(self.first_dense_layers, self.num_layers)
        moe = e * h + e + 3 * e * s * h + (3 * h * s + h if self.shared_expert else 0)
        dense = 3 * h * s * self.top_k
        per_layer = 2 * h + 4 * h * h
        return (
            (2 * self.vocab_size + self.max_positions) * h
            + h
            + self.num_layers * per_layer
            + moe_layers * moe
            + (self.num_layers - moe_layers) * dense
        )


def _parameter_byte_cap() -> int:
    """:data:`MAX_PARAMETER_BYTES`, or the machine's physical memory where it is known and less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (a platform with no sysconf: the cap alone)
        return MAX_PARAMETER_BYTES
    return min(MAX_PARAMETER_BYTES, memory) if memory > 0 else MAX_PARAMETER_BYTES


#: False while :func:`build` constructs a model: it draws every parameter from its own seeded generator afterwards, so
#: the modules here skip their own draw from the global one (build's use of the global stream stays as it was).
_DRAW_AT_CONSTRUCTION: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_replay_draw", default=True)


@contextlib.contextmanager
def _drawn_later() -> Iterator[None]:
    token = _DRAW_AT_CONSTRUCTION.set(False)
    try:
        yield
    finally:
        _DRAW_AT_CONSTRUCTION.reset(token)


def _draw_uniform(p: torch.Tensor, fan_in: int) -> None:
    """``p`` drawn as ``nn.Linear`` draws its weight, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` from the global
    generator (where not constructed by :func:`build`, which draws every parameter itself)."""
    if _DRAW_AT_CONSTRUCTION.get():
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            p.uniform_(-bound, bound)


@dataclass
class MoEOutput:
    """What :class:`MoETransformer` returns."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


# ----------------------------------------------------------------------------- routers
class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, top-k, renormalise; returns (logits, weights, indices)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = cfg.top_k, cfg.num_experts, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate weight drawn as ``nn.Linear(hidden_size, num_experts)`` draws its own."""
        _draw_uniform(self.weight, self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), indices


class TopKSoftmaxRouter(nn.Module):
    """Top-k on the logits, then softmax over the k chosen; returns (weights, indices)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate weight drawn as ``nn.Linear(hidden_size, num_experts)`` draws its own."""
        _draw_uniform(self.weight, self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        return F.softmax(top_logits, dim=-1, dtype=torch.float).to(x.dtype), indices


class GroupedSigmoidRouter(nn.Module):
    """Sigmoid scores, selection-only bias, group-limited top-k (DeepSeek-V3 style).

    With ``group_weights_from_topk`` the weights are the top-k values of the group-masked
    scores (DeepSeek-V2 group-limited greedy) instead of a gather from the scores.
    """

    e_score_correction_bias: torch.Tensor  # (a buffer)

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scale, self.norm_topk_prob = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weights_from_topk = cfg.group_weights_from_topk
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate weight drawn as ``nn.Linear(hidden_size, num_experts)`` draws its own."""
        _draw_uniform(self.weight, self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        choice = scores.detach() + self.e_score_correction_bias if not self.weights_from_topk else scores
        grouped = rearrange(choice, "t (g e) -> t g e", g=self.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
        masked = choice.masked_fill(score_mask == 0, 0.0)
        top_values, indices = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        weights = top_values if self.weights_from_topk else scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scale).to(x.dtype), indices


class Top1ArgmaxRouter(nn.Module):
    """Switch-style top-1 router: softmax, argmax, weight = probability of the chosen expert."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts = 1, cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate weight drawn as ``nn.Linear(hidden_size, num_experts)`` draws its own."""
        _draw_uniform(self.weight, self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float)
        index = torch.argmax(probs, dim=-1)
        weight = probs.gather(-1, index.unsqueeze(-1))
        return weight.to(x.dtype), index.unsqueeze(-1)


_ROUTERS: dict[str, type[nn.Module]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "topk_softmax": TopKSoftmaxRouter,
    "grouped_sigmoid": GroupedSigmoidRouter,
    "top1_argmax": Top1ArgmaxRouter,
}


# ----------------------------------------------------------------------------- experts
class Experts(nn.Module):
    """E SwiGLU experts with stacked weights.

    ``sparse`` runs each expert on its tokens (one host sync per call for the counts);
    ``dense`` runs every expert on every token and masks: no sync, CUDA-graph safe.
    Both sum the k expert outputs of a token in slot order, so results are deterministic.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.impl = cfg.num_experts, cfg.expert_impl
        self.gate_up = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.expert_size, cfg.hidden_size))
        self.down = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, cfg.expert_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's weights drawn as ``nn.Linear`` draws its own (fan-in ``hidden_size``, then ``expert_size``)."""
        _draw_uniform(self.gate_up, self.gate_up.shape[-1])
        _draw_uniform(self.down, self.down.shape[-1])

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t, k = indices.shape
        if self.impl == "dense":
            outs = torch.stack([self._expert(e, x) for e in range(self.num_experts)], dim=1)  # [T, E, H]
            picked = outs.gather(1, indices.unsqueeze(-1).expand(t, k, x.shape[-1]))  # [T, k, H]
        else:
            flat = indices.reshape(-1)
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            token_of = order // k
            picked_flat: torch.Tensor | None = None  # allocated in the experts' dtype (autocast may change it)
            start = 0
            for e, c in enumerate(counts):
                if c:
                    sel = order[start : start + c]
                    out = self._expert(e, x[token_of[start : start + c]])
                    if picked_flat is None:
                        picked_flat = out.new_empty(t * k, x.shape[-1])
                    picked_flat[sel] = out
                    start += c
            picked = picked_flat.view(t, k, -1) if picked_flat is not None else x.new_zeros(t, k, x.shape[-1])
        return (picked * weights.unsqueeze(-1).to(picked.dtype)).sum(dim=1)


class _DenseMLP(nn.Module):
    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, size, bias=False)
        self.up_proj = nn.Linear(hidden, size, bias=False)
        self.down_proj = nn.Linear(size, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Router + experts (+ an optional gated shared expert).

    Built alone (outside :func:`build`, which draws every parameter from its seed), its parameters are drawn at
    construction from the global generator, as ``nn.Linear`` draws its own (``torch.manual_seed`` makes them
    reproducible); so are those of the routers and :class:`Experts` built alone.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.style, self.top_k, self.num_experts = cfg.router, cfg.top_k, cfg.num_experts
        self.norm_topk_prob = cfg.norm_topk_prob
        if cfg.router == "linear_gate":
            self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        else:
            self.router = _ROUTERS[cfg.router](cfg)
        self.experts = Experts(cfg)
        if cfg.shared_expert:
            self.shared_expert = _DenseMLP(cfg.hidden_size, cfg.expert_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, indices) of every token, ``[T, k]`` each."""
        if self.style == "linear_gate":
            probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
            weights, indices = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights.to(x.dtype), indices
        out = self.router(x)
        if self.style == "softmax_topk":
            return out[1], out[2]
        return out[0], out[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, indices = self.route(x)
        y = self.experts(x, indices, weights)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)


# ----------------------------------------------------------------------------- transformer
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class _Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(rearrange(out, "b h s d -> b s (h d)")), (k, v)


class _Layer(nn.Module):
    def __init__(self, cfg: MoEConfig, moe: bool) -> None:
        super().__init__()
        self.input_norm = _RMSNorm(cfg.hidden_size)
        self.attn = _Attention(cfg)
        self.post_norm = _RMSNorm(cfg.hidden_size)
        self.mlp: nn.Module = MoEBlock(cfg) if moe else _DenseMLP(cfg.hidden_size, cfg.expert_size * cfg.top_k)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.input_norm(x), mask, cache)
        x = x + a
        return x + self.mlp(self.post_norm(x)), kv


def _layer_flat(
    layer: _Layer, x: torch.Tensor, mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer with flat tensor outputs, as reentrant checkpointing needs them."""
    x, (k, v) = layer(x, mask, cache)
    return x, k, v


class MoETransformer(nn.Module):
    """A causal MoE decoder. Its MoE layers are ``layers.{i}.mlp`` (:class:`MoEBlock`)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_positions, config.hidden_size)
        self.layers = nn.ModuleList(
            _Layer(config, moe=i >= config.first_dense_layers) for i in range(config.num_layers)
        )
        self.norm = _RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Logits ``[B, S, V]``; ``labels`` (HF convention, shifted inside, -100 ignored) give a loss.

        ``attention_mask`` ``[B, past + S]`` marks real tokens with 1 (left padding allowed).
        ``position_ids`` without an ``attention_mask`` may pack several sequences in a row:
        positions restarting mark where each begins (``BatchLayout.position_ids()``).
        """
        b, s = input_ids.shape
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        total = past + s
        if position_ids is None and total > self.config.max_positions:
            raise InvalidArgumentError(
                f"{total} positions ({past} cached + {s} new) exceed max_positions={self.config.max_positions}; "
                "build the model with a larger max_positions"
            )
        # given positions (packed rows restart them: a row may be longer than max_positions) are checked themselves
        if position_ids is not None and position_ids.numel():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= self.config.max_positions:
                raise InvalidArgumentError(
                    f"position_ids hold {low}..{high}, outside 0..{self.config.max_positions - 1} "
                    f"(max_positions={self.config.max_positions}); build the model with a larger max_positions"
                )
        packed = None
        if attention_mask is None and position_ids is not None and not past:
            # packed rows (as in transformers): a position that does not follow its left
            # neighbour starts a new sequence, and sequences do not attend to each other
            starts = torch.ones_like(position_ids, dtype=torch.bool)
            starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
            packed = starts.long().cumsum(-1)
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        causal = torch.ones(s, total, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        if packed is not None:
            mask = mask & (packed[:, None, :, None] == packed[:, None, None, :])
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # fully padded rows attend anywhere (ignored)
        x = self.embed(input_ids) + self.pos(position_ids)
        new_cache: KVCache = []
        ckpt = self.config.checkpointing != "none" and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cache = past_key_values[i] if past_key_values else None
            if ckpt:
                x, k, v = checkpoint(
                    _layer_flat,
                    layer,
                    x,
                    mask,
                    cache,
                    use_reentrant=self.config.checkpointing == "reentrant",
                )
                kv = (k, v)
            else:
                x, kv = layer(x, mask, cache)
            new_cache.append(kv)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return MoEOutput(logits=logits, loss=loss, past_key_values=new_cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 8,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Decode with a KV cache; returns prompt and new tokens, ``[B, S + max_new_tokens]``.

        Routers see the prompt in one forward, then one token per sequence per step; the
        last sampled token is never fed back, so it is never routed.

        ``progress`` draws a bar over the decode steps on stderr (``tqdm``'s where it is
        installed): ``None`` shows it where stderr is a terminal (``MOE_REPLAY_PROGRESS=0``
        or ``1`` decides instead where set), ``True`` always, ``False`` never. It changes nothing else.
        """
        progress = _progress.check(progress, "generate()")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        seq, cache, step_input = input_ids, None, input_ids
        with _progress.Progress(max_new_tokens, "moe_replay: generating", enabled=progress) as bar:
            for _ in range(max_new_tokens):
                out = self(step_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                last = out.logits[:, -1].float()
                if do_sample:
                    probs = F.softmax(last / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                else:
                    nxt = last.argmax(dim=-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
                attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
                step_input = nxt
                bar.update()
        return seq


def _init(model: MoETransformer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = model.config.router_init_std if (".router." in name or name.endswith("mlp.gate.weight")) else 0.05
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for m in model.modules():
        if isinstance(m, GroupedSigmoidRouter):
            m.e_score_correction_bias.copy_(torch.randn(m.num_experts, generator=g) * 0.1)


#: The :class:`MoEConfig` fields only some router styles read, with the styles that read each; ``top_k`` is fixed
#: at 1 by ``top1_argmax``. A :func:`build` override of one for another style, away from its default, is refused.
_STYLE_FIELDS: dict[str, tuple[str, ...]] = {
    "top_k": ("softmax_topk", "topk_softmax", "grouped_sigmoid", "linear_gate"),
    "norm_topk_prob": ("softmax_topk", "grouped_sigmoid", "linear_gate"),
    "n_group": ("grouped_sigmoid",),
    "topk_group": ("grouped_sigmoid",),
    "routed_scaling_factor": ("grouped_sigmoid",),
    "group_weights_from_topk": ("grouped_sigmoid",),
}


def _check_read_by_style(style: str, overrides: dict[str, Any]) -> None:
    """Refuse an override the router style never reads (``n_group`` of ``softmax_topk``, ``top_k=4`` of
    ``top1_argmax``), where it asks for other than what the style does: it would be ignored without a word.

    Raises:
        InvalidArgumentError: naming the fields, what the style does instead and the styles that read them.
    """
    defaults = MoEConfig(router=style)
    ignored = [
        name
        for name, readers in _STYLE_FIELDS.items()
        if name in overrides and style not in readers and overrides[name] != getattr(defaults, name)
    ]
    if ignored:
        said = ", ".join(f"{n}={overrides[n]!r} (read by {', '.join(_STYLE_FIELDS[n])})" for n in ignored)
        fixed = " (it chooses top_k=1)" if "top_k" in ignored else ""
        raise InvalidArgumentError(
            f"build({style!r}) does not read {said}: the {style} router{fixed} would ignore it. Leave it out, "
            "or build a style that reads it"
        )


def build(style: str = "softmax_topk", *, seed: int = 0, **overrides: Any) -> MoETransformer:
    """A reference MoE of the given router style with seeded random weights.

    Args:
        style: one of :data:`STYLES`.
        seed: initialisation seed (same seed, same weights).
        **overrides: any :class:`MoEConfig` field (``num_layers``, ``num_experts``, ``top_k``...).

    Raises:
        InvalidArgumentError: a field of the wrong type or out of range (a count under 1, ``top_k`` over
            ``num_experts``, or, for ``grouped_sigmoid``, over the experts of the ``topk_group`` groups a token
            keeps, no MoE layer left after ``first_dense_layers``, a number not finite, a field the style
            does not read set away from its default: ``n_group`` of ``softmax_topk``, ``top_k=4`` of
            ``top1_argmax``, which chooses one expert), or sizes whose
            parameters would take more than :data:`MAX_PARAMETER_BYTES` (or the machine's memory, where less):
            refused from the sizes alone, before anything is allocated; an ``extra`` that is not empty (no part of
            the model reads it); a :class:`MoEConfig` given for the style (its fields are passed by name).
    """
    if isinstance(style, MoEConfig):
        raise InvalidArgumentError(
            "build() takes a router style name, got a MoEConfig: pass its style and fields, "
            "build(config.router, **{k: v for k, v in vars(config).items() if k != 'router'})"
        )
    if not is_integer(seed) or not -(2**63) <= int(seed) < 2**64:
        raise InvalidArgumentError(f"seed must be an int (a torch.Generator seed), got {seed!r:.60}")
    seed = int(seed)  # (a numpy integer or a 0-d tensor: the seed it holds)
    if "router" in overrides:
        raise InvalidArgumentError(
            f"pass the router style as build's first argument, not router={overrides['router']!r}"
        )
    unknown = sorted(set(overrides) - {f.name for f in fields(MoEConfig)})
    if unknown:
        raise InvalidArgumentError(
            f"build() got {unknown}, which MoEConfig has no field for; "
            f"fields: {[f.name for f in fields(MoEConfig) if f.name != 'router']}"
        )
    cfg = replace(MoEConfig(router=style), **overrides) if overrides else MoEConfig(router=style)
    _check_read_by_style(style, overrides)
    with _drawn_later():  # (every parameter is drawn next, from the seeded generator)
        model = MoETransformer(cfg)
    _init(model, seed)
    return model.eval()
