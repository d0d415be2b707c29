"""Every MoE family of the installed transformers: build a tiny random instance, run the checks.

Shared by ``tests/test_hf_sweep.py`` and ``docs/make_support.py``. Nothing here lists families:
the model types come from transformers' own config registry, a type is a candidate when its
config declares an expert count, and the tiny configuration is derived from the default one by
rules on field names (``moe_replay._hf.tiny_config``, which the command line's ``inspect`` uses
too). Its ``_BUILD_HINTS`` only fill in what a released checkpoint's config carries and a
default-constructed config lacks. The checks themselves are in ``replay_checks``.

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

from moe_replay._hf import _EXPERT_FIELDS, _LAYERS, _VOCAB, _fields, _int, _is_config, tiny_config

from .replay_checks import SEED, Built, FamilyResult, check_model, expert_count, forward, has_experts, moe_blocks, short

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_BATCH, _SEQ = 2, 8


class BuildError(Exception):
    """The family cannot be built on CPU for a reason that is not moe_replay's."""


# ----------------------------------------------------------------------- enumeration
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
