"""Loading HuggingFace transformers models for the command line, the notebooks and the HF tests.

The library itself never imports transformers. This private module does, lazily and
only through its public classes (``Auto*``, ``CONFIG_MAPPING``, ``PreTrainedConfig``),
when a user asks for an HF model:

* :func:`load_checkpoint` builds the model saved in a local directory (``config.json``
  plus weights, as written by ``save_pretrained``), without touching the network;
* :func:`tiny_config` / :func:`tiny_model` build a small random instance of a model type
  (``"qwen3_moe"``, ``"mixtral"`` ...) from that type's default configuration, shrunk by
  rules on field names, so that a family added to transformers later works too. The HF
  sweep behind docs/support.md builds its models from the same configurations.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

from torch import nn

from .errors import ArgumentTypeError, InvalidArgumentError, MissingDependencyError, MissingFileError

__all__ = ["is_checkpoint_dir", "load_checkpoint", "tiny_config", "tiny_model"]


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise MissingDependencyError(
            "this needs HuggingFace transformers, which is not installed: pip install 'moe_replay[hf]' "
            "(or pip install transformers)"
        ) from e


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


# config fields that carry an expert count or a top-k, in any family seen so far; a new family
# that names them differently is caught by the `experts` container test on the built model
_EXPERT_FIELDS = frozenset(
    {
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_num_experts",
        "n_experts",
        "num_routed_experts",
        "expert_count",
        "num_total_experts",
    }
)
_TOPK_FIELDS = frozenset(
    {
        "num_experts_per_tok",
        "num_experts_per_token",
        "experts_per_token",
        "moe_topk",
        "moe_top_k",
        "moe_k",
        "top_k_experts",
        "router_topk",
        "num_selected_experts",
        "n_activated_experts",
    }
)
_LAYER_FIELDS = frozenset(
    {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers", "num_decoder_layers"}
)
_HIDDEN, _HEADS, _HEAD_DIM, _FFN, _VOCAB = 64, 4, 16, 32, 256
_EXPERTS, _TOPK, _LAYERS = 8, 2, 4

_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}
_QSA = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": _HEAD_DIM,
    "indexer_budget": 4,
    "indexer_compress_ratio": 2,
}

# What a released checkpoint's config.json carries and a default-constructed config lacks.
_BUILD_HINTS: dict[str, dict[str, Any]] = {
    # the attention module reads `attn_config.rope_theta` and clamps by `clip_qkv`, both unset by default
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},
    # the decoder indexes `mlp_layer_types`, which only checkpoints set
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    # per-layer vision settings are keyed by layer index, for the default depth
    "dots3_note": {"vision_config": {"per_layer_config": {}}},
    "dots3_note_vision_encoder": {"per_layer_config": {}},
    # the vision tower lists one patch size, width and depth per stage
    "muse_spark": {"vision_config": {"num_hidden_layers": None}},
    # only top-1 routing is implemented
    "zaya": {"num_experts_per_tok": 1},
    # the rotary embedding splits its dimensions by an `mrope_section` that only checkpoints set
    "glm4v_moe": {"text_config": {"rope_parameters": _MROPE}},
    "glm4v_moe_text": {"rope_parameters": _MROPE},
    "ernie4_5_vl_moe": {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]}}
    },
    # the attention layers read a sliding window and the indexer sizes that only checkpoints set
    "step3p7": {"text_config": {"sliding_window": 4}},
    "qwen4_exp": {"text_config": _QSA},
    "qwen4_exp_text": _QSA,
    # the expert MLP splits off `part_features` of the hidden width
    "vitpose": {"backbone_config": {"part_features": 16}},
    "vitpose_backbone": {"part_features": 16},
    # the talker builds a vision-position helper from a field only its parent config defines
    "qwen3_omni_moe": {
        "talker_config": {"text_config": {"shared_expert_intermediate_size": _FFN}, "spatial_merge_size": 2}
    },
}


# ----------------------------------------------------------------------- config fields
def _fields(cfg: Any) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(cfg):
        try:
            yield f.name, getattr(cfg, f.name)
        except Exception:  # some configs raise on ambiguous per-layer attributes
            continue


def _is_config(x: Any) -> bool:
    return isinstance(x, _transformers().PreTrainedConfig)


# ----------------------------------------------------------------------- tiny configs
def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrunk(name: str, value: Any, layers: int | None) -> Any:
    """The tiny value of one config field, or ``...`` to keep the default. Never grows a field."""
    n = name.lower()
    if isinstance(value, bool):
        return True if re.fullmatch(r"enable_moe\w*|is_moe|use_moe", n) else ...
    if n in _EXPERT_FIELDS:
        return _EXPERTS
    if n in _TOPK_FIELDS:
        return _TOPK
    if value is None:
        if re.search(r"moe_intermediate|expert\w*intermediate", n):
            return _FFN
        if re.fullmatch(r"n(um)?_shared_experts", n):
            return 1
        if n == "head_dim":
            return _HEAD_DIM
        return ...
    if isinstance(value, list) and value and all(_int(v) for v in value) and re.search(r"intermediate|ffn", n):
        return [min(v, _FFN) for v in value]
    if not _int(value):
        return ...
    tiny = _tiny_value(n, layers)
    return ... if tiny is None else min(value, tiny)


def _tiny_value(n: str, layers: int | None) -> int | None:
    if n in ("n_group", "num_expert_group"):
        return 2
    if n == "topk_group" or re.fullmatch(r"(mamba_)?n_groups", n):
        return 1
    if re.search(r"zero_expert|skip_expert", n):
        return 2
    if re.search(r"intermediate_size|ffn_hidden_size|^d_ff$|share_expert_dim|moe_hidden_size|ffn_dim$", n):
        return _FFN
    if n in ("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim") or n.endswith(("_hidden_size", "_out_dim")):
        return _HIDDEN
    if n in _LAYER_FIELDS:
        return layers
    if n in ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads", "n_head", "n_heads"):
        return _HEADS
    if n in ("num_heads", "num_key_value_heads", "num_kv_heads", "kv_n_heads"):
        return _HEADS
    if n.endswith("head_dim") and not n.startswith(("qk_", "kv_")):
        return _HEAD_DIM
    if re.search(r"(^|_)(n|num)_\w*heads$", n):
        return _HEADS
    if re.search(r"state_size$|d_state$", n):
        return 16
    if re.fullmatch(r"(\w+_)?chunk_size", n):
        return 16
    if n in ("vocab_size", "vocab_size_per_layer_input"):
        return _VOCAB
    if n == "q_lora_rank":
        return 32
    if n == "kv_lora_rank":
        return 16
    if n in ("qk_rope_head_dim", "qk_nope_head_dim"):
        return 8
    if n == "first_k_dense_replace":
        return 1
    return None


def _rope_half(cfg: Any, kwargs: dict[str, Any], rope: dict[str, Any]) -> int:
    """Half the rotary dimension of the shrunk config."""
    rope_dim = kwargs.get("qk_rope_head_dim", getattr(cfg, "qk_rope_head_dim", None))
    if not _int(rope_dim):
        rope_dim = kwargs.get("head_dim", getattr(cfg, "head_dim", None))
        if not _int(rope_dim):
            hidden = kwargs.get("hidden_size", getattr(cfg, "hidden_size", _HIDDEN))
            rope_dim = hidden // kwargs.get("num_attention_heads", getattr(cfg, "num_attention_heads", _HEADS))
        rope_dim = int(rope_dim * float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))))
    return int(rope_dim) // 2


def _tiny_kwargs(cfg: Any, layers: int | None) -> dict[str, Any]:
    """Keyword overrides that turn the default config ``cfg`` into a tiny one."""
    out: dict[str, Any] = {}
    specs = getattr(type(cfg), "sub_configs_defaults", None) or {}
    for name, value in _fields(cfg):
        if _is_config(value):
            sub = _tiny_kwargs(value, layers)
            if sub:  # a dict replaces the default sub-config: keep the kwargs the parent built it with
                spec = specs.get(name)
                init = dict(getattr(spec, "init_kwargs", None) or {})
                out[name] = {**init, "model_type": value.model_type, **sub}
            continue
        new = _shrunk(name, value, layers)
        if new is not ... and new != value:
            out[name] = new
    _keep_relations(cfg, out)
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list | tuple):
        # multimodal rope splits the rotary half-dimension into sections: rescale them
        sec = [int(s) for s in rope["mrope_section"]]
        half = _rope_half(cfg, out, rope)
        new = [max(1, s * half // sum(sec)) for s in sec]
        new[0] += half - sum(new)
        out["rope_parameters"] = {**rope, "mrope_section": new}
    # special token ids must stay inside the shrunk vocabulary
    vocab = out.get("vocab_size", getattr(cfg, "vocab_size", None)) if "vocab_size" in dict(_fields(cfg)) else None
    if _int(vocab):
        nxt = vocab - 1
        for name, value in _fields(cfg):
            if not re.search(r"_(token_)?(id|index)$", name):
                continue
            if _int(value) and value >= vocab:
                out[name], nxt = nxt, nxt - 1
            elif isinstance(value, list) and value and all(_int(v) for v in value) and max(value) >= vocab:
                out[name] = list(range(nxt, nxt - len(value), -1))
                nxt -= len(value)
    return out


def _keep_relations(cfg: Any, out: dict[str, Any]) -> None:
    """Keep what the default config ties together: the query/key-value head ratio, equal head dims."""
    fields = dict(_fields(cfg))
    heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if _int(heads) and _int(kv) and "num_attention_heads" in out:
        out["num_key_value_heads"] = max(1, out["num_attention_heads"] * kv // heads)
    hidden = fields.get("hidden_size")
    if _int(hidden) and "hidden_size" in out:  # widths declared equal to the model width
        for n, v in fields.items():
            if v == hidden and _int(v) and n not in out and re.search(r"_dim$|_size$", n):
                out[n] = out["hidden_size"]
    dims = [n for n, v in fields.items() if n.endswith("head_dim") and _int(v) and n in out]
    for a in dims:
        for b in dims:
            if fields[a] == fields[b] and out[a] != out[b]:
                out[a] = out[b] = min(out[a], out[b])


def _apply_hint(kwargs: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Merge a build hint into the overrides; a None value drops that override (keeps the default)."""
    out = dict(kwargs)
    for k, v in hint.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _apply_hint(out[k], v)
        else:
            out[k] = v
    return out


def tiny_config(model_type: str, layers: int | None = _LAYERS, **overrides: Any) -> Any:
    """A tiny configuration of ``model_type``: ``layers`` layers at most (None: the default depth).

    The default configuration of the type, with every width, depth, head and expert count
    capped by rules on field names (the relations between fields kept), plus what a released
    checkpoint's config carries and a default one lacks (``_BUILD_HINTS``).

    Args:
        model_type: a transformers model type, e.g. ``"qwen3_moe"`` or ``"mixtral"``.
        layers: the layer count to cap at; None keeps the default depth.
        **overrides: config fields to set on top (``num_experts=16`` ...).

    Raises:
        InvalidArgumentError: transformers does not know ``model_type`` (a ``ValueError``), or
            ``layers`` is not a count >= 1.
        ArgumentTypeError: ``model_type`` is not a str.
    """
    if not isinstance(model_type, str):
        raise ArgumentTypeError(f"model_type must be a transformers model type (a str), got {model_type!r:.60}")
    if layers is not None and (not _int(layers) or layers < 1):
        raise InvalidArgumentError(
            f"layers must be a layer count >= 1 (or None: the default depth), got {layers!r:.60}"
        )
    tf = _transformers()
    try:
        cls = tf.CONFIG_MAPPING[model_type]
    except KeyError:
        raise InvalidArgumentError(
            f"'{model_type}' is not a model type of the installed transformers {tf.__version__} "
            "(model types look like 'qwen3_moe', 'mixtral', 'deepseek_v3')"
        ) from None
    kwargs = _apply_hint(_tiny_kwargs(cls(), layers), _BUILD_HINTS.get(model_type, {}))
    return cls(**_apply_hint(kwargs, overrides))


# ----------------------------------------------------------------------- models
#: Tried in order for a tiny model: the causal LM first, the base model last.
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM", "AutoModel")


def _build(tf: Any, config: Any) -> nn.Module:
    for name in _AUTO_CLASSES:
        try:
            return getattr(tf, name).from_config(config)
        except ValueError:  # no model of this kind for that config class
            continue
    raise InvalidArgumentError(f"transformers has no model class for config {type(config).__name__}")


def tiny_model(model_type: str, *, seed: int = 0, layers: int | None = _LAYERS, **overrides: Any) -> nn.Module:
    """A small random instance of ``model_type`` (see :func:`tiny_config`), in eval mode.

    Example:
        >>> from moe_replay._hf import tiny_model
        >>> model = tiny_model("qwen3_moe")  # doctest: +SKIP
    """
    import torch

    tf = _transformers()
    config = tiny_config(model_type, layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(tf, config)
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """The model saved in the local directory ``path`` (``save_pretrained`` output), in eval mode.

    Only local files are read; the causal-LM class is tried first, then the base model.
    """
    if not isinstance(path, str | os.PathLike):
        raise ArgumentTypeError(
            f"load_checkpoint takes a directory path (a str or os.PathLike), got {type(path).__name__}"
        )
    tf = _transformers()
    if not is_checkpoint_dir(path):
        raise MissingFileError(f"{path} is not a model directory: it has no config.json")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            return auto.from_pretrained(path, config=config, local_files_only=True).eval()
        except ValueError:
            continue
    raise InvalidArgumentError(f"transformers has no model class for the config in {path} ({type(config).__name__})")
