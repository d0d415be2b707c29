"""Every MoE family of the installed transformers: build a tiny random instance, run the checks.

Shared by ``tests/test_hf_sweep.py`` and ``docs/make_support.py``. Nothing here lists families:
the model types come from transformers' own config registry, a type is a candidate when its
config declares an expert count, and the tiny configuration is derived from the default one by
rules on field names. ``_BUILD_HINTS`` only fills in what a released checkpoint's config carries
and a default-constructed config lacks. The checks themselves are in ``replay_checks``.

A family is counted as built when some model class of its type builds on CPU and runs a plain
text-only forward; the MoE blocks are counted without moe_replay (``replay_checks.moe_blocks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
from torch import nn

from .replay_checks import SEED, Built, FamilyResult, check_model, expert_count, forward, has_experts, moe_blocks, short

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
_BATCH, _SEQ = 2, 8

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


class BuildError(Exception):
    """The family cannot be built on CPU for a reason that is not moe_replay's."""


# ----------------------------------------------------------------------- enumeration
def _fields(cfg: Any) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(cfg):
        try:
            yield f.name, getattr(cfg, f.name)
        except Exception:  # some configs raise on ambiguous per-layer attributes
            continue


def _is_config(x: Any) -> bool:
    from transformers import PreTrainedConfig

    return isinstance(x, PreTrainedConfig)


def _declares_experts(cfg: Any, depth: int = 0) -> bool:
    if any(f.name in _EXPERT_FIELDS for f in dataclasses.fields(cfg)):
        return True
    return depth < 3 and any(_is_config(v) and _declares_experts(v, depth + 1) for _, v in _fields(cfg))


def _quiet() -> contextlib.AbstractContextManager[None]:
    import transformers

    transformers.logging.set_verbosity_error()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _class_declares_experts(cls: type, depth: int = 0) -> bool:
    """The same test on a config class whose defaults do not construct: its fields and sub-config specs."""
    from transformers import CONFIG_MAPPING

    if any(f.name in _EXPERT_FIELDS for f in dataclasses.fields(cls)):
        return True
    for spec in (getattr(cls, "sub_configs_defaults", None) or {}).values():
        sub = getattr(spec, "config_class", None)
        model_type = getattr(spec, "model_type", None)
        if model_type in CONFIG_MAPPING:
            sub = CONFIG_MAPPING[model_type]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and depth < 3:
            if _class_declares_experts(sub, depth + 1):
                return True
    return False


@cache
def model_types() -> tuple[str, ...]:
    """Every model type of the installed transformers whose config declares an expert count."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = []
    with _quiet():
        for model_type in CONFIG_MAPPING_NAMES:
            try:
                cls = CONFIG_MAPPING[model_type]
            except Exception:  # a registry entry whose module does not import
                continue
            try:
                declares = _declares_experts(cls())
            except Exception:  # defaults that do not construct: judge by the class
                declares = _class_declares_experts(cls)
            if declares:
                out.append(model_type)
    return tuple(out)


# ----------------------------------------------------------------------- tiny configs
def _int(v: Any) -> bool:
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


def tiny_config(model_type: str, layers: int | None = _LAYERS) -> Any:
    """A tiny configuration of ``model_type``: ``layers`` layers at most (None: the default depth)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kwargs = _apply_hint(_tiny_kwargs(cls(), layers), _BUILD_HINTS.get(model_type, {}))
    return cls(**kwargs)


# ----------------------------------------------------------------------- building
_AUTO_CLASSES = (
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModel",
)


def _fill_expert_tables(model: nn.Module) -> None:
    """Hash routers read experts from a token-id table that checkpoints carry and init leaves zero:
    give each token k distinct random experts, as a trained table has."""
    g = torch.Generator().manual_seed(SEED)
    for m in model.modules():
        count = expert_count(m)
        for b in m.buffers(recurse=False):
            if count and b.dim() == 2 and not b.is_floating_point() and b.shape[0] > b.shape[1] and not b.any():
                rows = torch.stack([torch.randperm(count, generator=g)[: b.shape[1]] for _ in range(b.shape[0])])
                b.copy_(rows.to(b.dtype))


def _token_ids(cfg: Any, acc: set[int], depth: int = 0) -> set[int]:
    for name, value in _fields(cfg):
        if re.search(r"_(token_)?(id|index)$", name):
            if _int(value):
                acc.add(value)
            elif isinstance(value, list):
                acc.update(v for v in value if _int(v))
        elif depth < 3 and _is_config(value):
            _token_ids(value, acc, depth + 1)
    return acc


def _vocab(cfg: Any) -> int:
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "get_text_config", lambda: None)()):
        v = getattr(c, "vocab_size", None) if c is not None else None
        if _int(v):
            return v
    return _VOCAB


def make_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Token ids that avoid every special token of the config (image, audio, pad ... ids)."""
    cfg = model.config
    special = _token_ids(cfg, set())
    allowed = torch.tensor([i for i in range(min(_vocab(cfg), _VOCAB)) if i not in special])
    g = torch.Generator().manual_seed(SEED)
    ids = allowed[torch.randint(0, len(allowed), (_BATCH, _SEQ), generator=g)]
    inputs = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = allowed[torch.randint(0, len(allowed), (_BATCH, _SEQ // 2), generator=g)]
    return inputs


def _constructors(model_type: str) -> Iterator[tuple[str, Callable[[Any], nn.Module]]]:
    """Ways to build a model of ``model_type``: the auto classes that map it (they unwrap composite
    configs), then any other model class the auto mappings name for it (a backbone, a pose model)."""
    import transformers
    from transformers.models.auto import modeling_auto

    seen = set()
    for auto in _AUTO_CLASSES:
        cls = getattr(transformers, auto)
        yield auto, cls.from_config
    for key in sorted(vars(modeling_auto)):
        mapping = getattr(modeling_auto, key)
        if key.startswith("MODEL_") and key.endswith("_MAPPING_NAMES") and model_type in mapping:
            names = mapping[model_type]
            for name in [names] if isinstance(names, str) else names:
                cls = getattr(transformers, name, None)
                if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and name not in seen:
                    seen.add(name)
                    yield name, cls


def _try(make: Callable[[Any], nn.Module], cfg: Any) -> nn.Module | None:
    """The model, or None when the constructor does not map this config."""
    try:
        torch.manual_seed(SEED)
        return make(cfg)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            return None
        raise


def build(model_type: str, dtype: torch.dtype = torch.float32) -> Built | str:
    """A tiny eval-mode model of ``model_type`` whose plain forward runs, or why there is none.

    Returns ``no-model``, ``not-moe`` or ``not-routed`` for types that are not a routed MoE model
    of their own. Raises :class:`BuildError` when no model class of the type builds and runs a
    text-only forward on CPU. A multimodal family is built through its multimodal class first,
    then through its text model if the multimodal one cannot run on text alone.
    """
    failures: list[str] = []
    kinds: set[str] = set()
    with _quiet():
        for layers in (_LAYERS, None):  # shrink the depth unless that leaves no MoE layer
            try:
                cfg = tiny_config(model_type, layers)
            except Exception as e:
                raise BuildError(short(e)) from e
            classes: set[type] = set()
            for label, make in _constructors(model_type):
                try:
                    model = _try(make, cfg)
                except Exception as e:
                    failures.append(f"{label}: {short(e)}")
                    continue
                if model is None or type(model) in classes:
                    continue
                classes.add(type(model))
                built = _checked(model, kinds, failures, dtype)
                if built is not None:
                    built.fallback = failures[0] if failures else ""
                    return built
            if failures or "not-routed" in kinds:
                break
    if failures:
        raise BuildError(failures[0])
    return "not-routed" if "not-routed" in kinds else "not-moe" if kinds else "no-model"


def _checked(model: nn.Module, kinds: set[str], failures: list[str], dtype: torch.dtype) -> Built | None:
    """``model`` ready for the checks, if it is a routed MoE whose plain forward runs in ``dtype``."""
    model.to(dtype).eval()
    for m in model.modules():  # no KV cache: hybrid models reject an attention cache of linear layers
        cfg = getattr(m, "config", None)
        if getattr(cfg, "use_cache", None):
            cfg.use_cache = False
    _fill_expert_tables(model)
    if not has_experts(model):
        kinds.add("not-moe")
        return None
    blocks = moe_blocks(model)
    if not blocks:
        kinds.add("not-routed")
        return None
    built = Built(model, make_inputs(model), blocks)
    try:
        with torch.no_grad():
            forward(built)
    except Exception as e:
        failures.append(f"{type(model).__name__}: {short(e)}")
        return None
    return built


@cache
def result(model_type: str, dtype: torch.dtype = torch.float32) -> FamilyResult:
    """:func:`run_family`, once per process (the per-family tests and the pass-rate test share it)."""
    return run_family(model_type, dtype)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and threads that spin on a busy machine cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_family(model_type: str, dtype: torch.dtype = torch.float32) -> FamilyResult:
    """Build ``model_type`` tiny in ``dtype`` and run the four checks; never raises."""
    with _one_thread():
        return _run_family(model_type, dtype)


def _run_family(model_type: str, dtype: torch.dtype) -> FamilyResult:
    t0 = time.perf_counter()
    try:
        built = build(model_type, dtype)
    except BuildError as e:
        res = FamilyResult(model_type, "no-build", notes=str(e))
    except Exception as e:  # a crash in the sweep itself
        res = FamilyResult(model_type, "fail", notes=short(e))
    else:
        if isinstance(built, str):
            res = FamilyResult(model_type, built, notes=_NOT_BUILT[built])
        else:
            with _quiet():
                res = check_model(model_type, built)
    res.seconds = time.perf_counter() - t0
    return res


_NOT_BUILT = {
    "no-model": "no model class of its own (a sub-config of a composite model)",
    "not-moe": "no expert container in the built model",
    "not-routed": "experts are selected without a router (no router-shaped parameter in the MoE block)",
}
