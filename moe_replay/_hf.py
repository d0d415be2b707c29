"""Loading HuggingFace transformers models for the command line and the notebooks.

The library itself never imports transformers. This private module does, lazily and
only through its public ``Auto*`` classes, when a user asks for an HF model:

* :func:`load_checkpoint` builds the model saved in a local directory (``config.json``
  plus weights, as written by ``save_pretrained``), without touching the network;
* :func:`tiny_model` builds a small random instance of a model type (``"qwen3_moe"``,
  ``"mixtral"`` ...) from that type's default configuration, with every size shrunk.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["TINY_SIZES", "is_checkpoint_dir", "load_checkpoint", "tiny_config", "tiny_model"]

#: Config keys set (or capped) for a tiny random instance: widths, depths, expert counts.
#: Keys a config does not have are ignored, so one table serves every model family.
TINY_SIZES: dict[str, int] = {
    # widths
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "ffn_hidden_size": 64,
    "expert_intermediate_size": 32,
    # attention
    "d_ff": 64,
    "num_attention_heads": 4,
    "num_heads": 4,
    "d_kv": 16,
    "n_heads": 4,
    "head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 32,
    "v_head_dim": 16,
    # depth and length
    "num_hidden_layers": 2,
    "n_layers": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "max_position_embeddings": 256,
    "max_seq_len": 256,
    "vocab_size": 256,
    # experts
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_top_k": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "zero_expert_num": 2,
    "expert_ffn_hidden_size": 32,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}

_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(
            "this needs HuggingFace transformers, which is not installed: pip install 'moe_replay[hf]' "
            "(or pip install transformers)"
        ) from e


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with every size in :data:`TINY_SIZES` capped, recursively.

    Key-value heads keep their ratio to attention heads, and per-layer lists
    (``layer_types`` ...) are cut to the new layer count.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("id2label", "label2id"):
            out[key] = _shrink(value)
        elif key in TINY_SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = min(value, TINY_SIZES[key])
        else:
            out[key] = value
    for heads, kv in (("num_attention_heads", "num_key_value_heads"), ("n_heads", "kv_n_heads")):
        if all(isinstance(values.get(k), int) and values[k] > 0 for k in (heads, kv)):
            group = max(1, values[heads] // values[kv])  # keep the grouping: MLA needs kv == heads
            out[kv] = max(1, out[heads] // group)
    old = next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)
    new = next((out[k] for k in _LAYER_KEYS if isinstance(out.get(k), int)), None)
    if old is not None and new is not None and new < old:
        for key, value in out.items():
            if isinstance(value, list) and len(value) == old:
                out[key] = value[:new]
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_KEYS:
            tok = out.get(key)
            if isinstance(tok, int) and tok >= vocab:
                out[key] = vocab - 1
            elif isinstance(tok, list):
                out[key] = [min(t, vocab - 1) for t in tok]
    return out


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The default configuration of ``model_type``, shrunk to a CPU-sized random model.

    Args:
        model_type: a transformers model type, e.g. ``"qwen3_moe"`` or ``"mixtral"``.
        **overrides: config fields to set after shrinking (``num_hidden_layers=4`` ...).

    Raises:
        ValueError: transformers does not know ``model_type``.
    """
    tf = _transformers()
    try:
        default = tf.AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"'{model_type}' is not a model type of the installed transformers {tf.__version__} "
            "(model types look like 'qwen3_moe', 'mixtral', 'deepseek_v3')"
        ) from e
    values = _shrink(default.to_dict())
    values.update(overrides)
    return type(default).from_dict(values)


def _build(tf: Any, config: Any) -> nn.Module:
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            return auto.from_config(config)
        except ValueError:  # no model of this kind for that config class
            continue
    raise ValueError(f"transformers has no model class for config {type(config).__name__}")


def tiny_model(model_type: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random instance of ``model_type`` (see :func:`tiny_config`), in eval mode.

    Example:
        >>> from moe_replay._hf import tiny_model
        >>> model = tiny_model("qwen3_moe")  # doctest: +SKIP
    """
    import torch

    tf = _transformers()
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(tf, config)
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """The model saved in the local directory ``path`` (``save_pretrained`` output), in eval mode.

    Only local files are read; the causal-LM class is tried first, then the base model.
    """
    tf = _transformers()
    if not is_checkpoint_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            return auto.from_pretrained(path, config=config, local_files_only=True).eval()
        except ValueError:
            continue
    raise ValueError(f"transformers has no model class for the config in {path} ({type(config).__name__})")
