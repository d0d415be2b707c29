"""The models and input shapes the benchmark runs: what one timed forward is.

A :class:`Workload` owns a model, its router modules and the inputs of one shape:

* ``prefill``: one sequence of many tokens, no cache;
* ``decode``: a batch of single tokens over a KV cache of a fixed length (every timed
  forward sees the same cache length, so every step does the same work).

Two model families: the pure-torch reference MoE of :mod:`moe_replay.models` and, when
transformers is installed, a Qwen3-MoE-shaped ``Qwen3MoeForCausalLM`` built from a config
with random weights (no download).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import moe_replay as mr
from moe_replay.models import MoEConfig, MoETransformer

__all__ = ["SIZES", "Workload", "build_model", "make_workload", "routers_of", "transformers_version"]

#: Model shapes per size. ``gpu`` is the Qwen3-30B-A3B MoE layer (hidden 2048, 128
#: experts, top-8, expert width 768) with the layer count cut to 8; ``cpu`` keeps the
#: routing shape (128 experts, top-8) on a narrower model that a laptop runs in seconds;
#: ``smoke`` only checks that the harness runs.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "gpu": {
        "reference": dict(
            hidden_size=2048, num_layers=8, num_heads=16, num_experts=128, top_k=8, expert_size=768, vocab_size=4096
        ),
        "qwen3": dict(
            hidden_size=2048,
            num_hidden_layers=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            intermediate_size=6144,
            vocab_size=151936,
        ),
    },
    "cpu": {
        "reference": dict(
            hidden_size=256, num_layers=4, num_heads=4, num_experts=32, top_k=4, expert_size=256, vocab_size=1024
        ),
        "qwen3": dict(
            hidden_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=192,
            intermediate_size=1024,
            vocab_size=2048,
        ),
    },
    "smoke": {
        "reference": dict(
            hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2, expert_size=32, vocab_size=64
        ),
        "qwen3": dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            intermediate_size=64,
            vocab_size=128,
        ),
    },
}


def transformers_version() -> str | None:
    """The installed transformers version, or None."""
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def routers_of(model: nn.Module) -> list[nn.Module]:
    """The router modules of ``model``, in module order."""
    return [s.module for s in mr.find_routers(model) if s.module is not None]


def _init_params(model: nn.Module, seed: int) -> None:
    """Random weights on the model's own device: N(0, 1/fan_in) matrices, N(0, 1) embeddings."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            std = 1.0 if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding) else p.shape[-1] ** -0.5
            p.normal_(0.0, std, generator=g)


def build_model(
    family: str, size: str, device: torch.device, dtype: torch.dtype, layers: int | None = None, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """A model of ``family`` (``reference`` or ``qwen3``) at ``size``, built on ``device``.

    Returns the model (eval mode) and a description of its shape for the report.
    """
    shape = dict(SIZES[size][family])
    if family == "reference":
        if layers:
            shape["num_layers"] = layers
        cfg = MoEConfig(router="softmax_topk", max_positions=16384, **shape)
        with torch.device(device):
            model: nn.Module = MoETransformer(cfg)
        _init_params(model, seed)
        info = {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts, "top_k": cfg.top_k}
    elif family == "qwen3":
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        if layers:
            shape["num_hidden_layers"] = layers
        cfg = Qwen3MoeConfig(**shape)
        experts = "grouped_mm" if device.type == "cuda" else None
        torch.manual_seed(seed)
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(
                    cfg, attn_implementation="sdpa", experts_implementation=experts, dtype=dtype
                )
            except (TypeError, ValueError, ImportError):  # a transformers without experts_implementation
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        info = {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
        }
    else:
        raise ValueError(f"unknown model family {family!r}; choose reference or qwen3")
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, info


def _cache_kwarg(model: nn.Module) -> str:
    """The name of the KV-cache argument of an HF forward (``cache`` from 5.2x, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class Workload:
    """One model at one input shape; :meth:`forward` is what the benchmark times.

    Call :meth:`prepare` with the number of forwards about to run (untimed): an HF decode
    step mutates its cache, so each forward gets the state of a fresh one built beforehand
    (in one cache object, as a decode loop keeps one).
    """

    family: str
    shape: str
    model: nn.Module
    batch: int
    seq: int
    past: int
    info: dict[str, Any]
    _step: Callable[[], torch.Tensor] = field(repr=False, default=lambda: torch.empty(0))
    _prepare: Callable[[int], None] = field(repr=False, default=lambda n: None)
    _warm: Callable[[], Any] | None = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return f"{self.family}/{self.shape}"

    @property
    def tokens(self) -> int:
        """Tokens routed per forward (rows each router writes)."""
        return self.batch * self.seq

    @property
    def routers(self) -> list[nn.Module]:
        """The router modules, in module order."""
        return routers_of(self.model)

    def warm(self) -> None:
        """One untimed eager forward that leaves prepared inputs alone (a fresh session's routers
        establish their decision at their first eager forward)."""
        with torch.no_grad():
            (self._warm or self._step)()

    def prepare(self, n: int) -> None:
        self._prepare(n)

    def forward(self) -> torch.Tensor:
        return self._step()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.family,
            "shape": self.shape,
            "batch": self.batch,
            "seq": self.seq,
            "past": self.past,
            "tokens": self.tokens,
            **self.info,
        }


def make_workload(
    family: str,
    shape: str,
    model: nn.Module,
    info: dict[str, Any],
    *,
    tokens: int,
    batch: int,
    past: int,
    seed: int = 0,
) -> Workload:
    """The ``prefill`` (``tokens`` in one sequence) or ``decode`` (``batch`` x 1 over ``past``) workload."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size
    if shape == "prefill":
        b, s, past = 1, tokens, 0
    elif shape == "decode":
        b, s = batch, 1
    else:
        raise ValueError(f"unknown shape {shape!r}; choose prefill or decode")
    ids = torch.randint(0, vocab, (b, s), device=device, generator=g)
    w = Workload(family, shape, model, b, s, past, info)

    if family == "reference":
        cfg = model.config
        kv = None
        if past:
            hd = cfg.hidden_size // cfg.num_heads
            kv = [
                tuple(torch.randn(b, cfg.num_heads, past, hd, device=device, generator=g, dtype=dtype) for _ in "kv")
                for _ in range(cfg.num_layers)
            ]
        # the reference attention concatenates into new tensors: the same cache serves every step
        w._step = lambda: model(ids, past_key_values=kv).logits
        return w

    cache_arg = _cache_kwarg(model)
    if not past:
        w._step = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        return w

    from transformers import DynamicCache

    cfg = model.config
    kv = [
        tuple(
            torch.randn(b, cfg.num_key_value_heads, past, cfg.head_dim, device=device, generator=g, dtype=dtype)
            for _ in "kv"
        )
        for _ in range(cfg.num_hidden_layers)
    ]
    caches: list[Any] = []

    def fresh() -> Any:
        c = DynamicCache()
        for i, (k, v) in enumerate(kv):
            c.update(k, v, i)
        return c

    def prepare(n: int) -> None:
        caches.clear()
        caches.extend(fresh() for _ in range(n))

    # One cache object across the steps, as a decode loop keeps one (generate() does): each step moves a fresh
    # cache's state into it (one dict update, C code, the same in every variant), so every step sees the same
    # cache length while a session, as in real decoding, sees the cache it watches given again.
    held = DynamicCache()

    def step() -> torch.Tensor:
        cache = caches.pop() if caches else None
        if cache is None:
            prepare(1)
            cache = caches.pop()
        vars(held).update(vars(cache))
        return model(input_ids=ids, use_cache=True, **{cache_arg: held}).logits

    w._step, w._prepare = step, prepare
    w._warm = lambda: model(input_ids=ids, use_cache=True, **{cache_arg: fresh()})
    return w
