"""Tiny random transformers MoE models built from configs (no download)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, pad_token_id=0, bos_token_id=None)


def _config(family: str) -> transformers.PretrainedConfig:
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_COMMON, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
            num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    if family == "mixtral":
        return transformers.MixtralConfig(
            **_COMMON, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    if family == "olmoe":
        return transformers.OlmoeConfig(
            **_COMMON, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4,
            num_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    if family == "deepseek_v3":  # a dense first layer, group-limited routing
        return transformers.DeepseekV3Config(
            **_COMMON, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
            first_k_dense_replace=1, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1,
        )  # fmt: skip
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random model of ``family`` in eval mode."""
    cfg = _config(family)
    cfg.eos_token_id = None
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def cache_kwarg(model: torch.nn.Module) -> str:
    """The KV-cache argument of an HF forward: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def static_cache_crops() -> bool:
    """Whether this transformers version's ``StaticCache`` can ``crop`` (5.17's static layers have no ``crop``)."""
    layer = getattr(transformers.cache_utils, "StaticLayer", None)
    return callable(getattr(layer if layer is not None else transformers.StaticCache, "crop", None))
