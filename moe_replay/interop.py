"""Explicit conversions between :class:`~moe_replay.Routes` and the formats of engines and trainers.

Every format here is a per-sequence array of expert indices ``[tokens, layers, k]`` (or
a list of per-layer arrays); they differ in which tokens and which layers they hold,
in dtype and in encoding. docs/formats.md describes each one and names the upstream
source it was read from. In short:

================  ==========================================  =================  =====================
format            array                                       layers             dtype
================  ==========================================  =================  =====================
vLLM (older)      ``CompletionOutput.routed_experts``         all hidden layers  int32
                  ``[seq_len - 1, L, k]``
vLLM (newer)      ``RequestOutput.prompt_routed_experts``     MoE layers only    int16 (uint8 in some
                  ``[prompt_len, L_moe, k]`` and                                 releases), -1 rows for
                  ``CompletionOutput.routed_experts``                            prefix-cached tokens
                  ``[gen_len - 1, L_moe, k]``
SGLang            ``meta_info["routed_experts"]``: base64 of  all hidden layers  int32 (or
                  a flat ``[seq_len - 1, L, k]`` array                           ``meta_info["routed_experts_dtype"]``)
Megatron-core     ``RouterReplay.set_replay_data``: a list    MoE layers, in     int64
                  of ``[tokens, k]``, one per MoE layer       router order
verl              ``routed_experts`` ``[batch, seq, L, k]``,  as the engine      as the engine
                  prompt left-padded, response right-padded   gave them
================  ==========================================  =================  =====================

**Layers.** Engines number layers by the model's hidden-layer index ("all hidden layers":
dense layers get a column of zeros) or count only MoE layers. A model's routers are
named by module path. A :class:`LayerMap` ties the two together explicitly: each router
name to its hidden-layer index (parsed from ``...layers.<i>...`` or given), checked
against the engine's ``num_hidden_layers``. Routers past the last hidden layer
(multi-token-prediction layers, which engines do not record) are refused unless the map
is built with ``mtp="native"``.

**The last token.** Engines never route the last sampled token: it is never fed back to
the model. Every ``from_*`` function here returns routes aligned to *all* tokens
(prompt plus completion) and gives the last token a -1 row, which replay routes
natively. Every ``to_*`` function for an engine format drops that row; it refuses if the
row holds a route (a capture of a training forward routes it) unless ``drop_last=True``.

Example:
    >>> import numpy as np, moe_replay as mr
    >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    >>> lm.dense_layers
    (0,)
    >>> engine = np.zeros((2, 2, 2), np.int32)        # 3 tokens: 2 routed rows, 2 hidden layers
    >>> engine[:, 1] = [[0, 3], [1, 2]]
    >>> r = mr.interop.from_vllm_legacy(engine, lm)
    >>> r.layer("model.layers.1.mlp.gate").tolist()
    [[0, 3], [1, 2], [-1, -1]]
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import BatchLayout, check_same_routers
from .errors import RoutesValidationError
from .routes import Routes

__all__ = [
    "LayerMap",
    "from_megatron",
    "from_sglang",
    "from_verl",
    "from_vllm",
    "from_vllm_legacy",
    "from_vllm_output",
    "to_megatron",
    "to_sglang",
    "to_verl",
    "to_vllm",
    "to_vllm_legacy",
]

#: How a router's module path names its hidden layer: ``model.layers.3.mlp.gate`` -> 3.
LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)"
_LAYOUTS = ("all", "moe")


# ----------------------------------------------------------------------------- layer map
@dataclass(frozen=True)
class LayerMap:
    """Explicit map between an engine's layer numbering and a model's router names.

    Build it with :meth:`from_session`, :meth:`from_routes` or :meth:`from_names`.

    Attributes:
        names: router module paths, in the order the ``Routes`` hold them.
        layers: hidden-layer index of each router.
        num_layers: the engine's layer count, ``config.num_hidden_layers``.
        num_experts, top_k: per router.
        mtp: ``"error"`` refuses routers at ``layer >= num_layers`` (MTP layers, which
            engines do not record); ``"native"`` gives them -1 rows when reading engine
            data and leaves them out when writing it.
    """

    names: tuple[str, ...]
    layers: tuple[int, ...]
    num_layers: int
    num_experts: tuple[int, ...]
    top_k: tuple[int, ...]
    mtp: str = "error"

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n:
            raise ValueError("a LayerMap needs at least one router")
        if not (len(self.layers) == len(self.num_experts) == len(self.top_k) == n):
            raise ValueError(
                f"LayerMap: {n} names, {len(self.layers)} layers, {len(self.num_experts)} expert counts and "
                f"{len(self.top_k)} k values; give one of each per router"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be the engine's hidden-layer count (>= 1), got {self.num_layers}")
        if self.mtp not in ("error", "native"):
            raise ValueError(f"mtp must be 'error' or 'native', got {self.mtp!r}")
        neg = [nm for nm, i in zip(self.names, self.layers, strict=True) if i < 0]
        if neg:
            raise ValueError(f"routers {neg} have a negative layer index")
        seen: dict[int, str] = {}
        for nm, i in zip(self.names, self.layers, strict=True):
            if i in seen:
                raise ValueError(
                    f"routers '{seen[i]}' and '{nm}' both map to hidden layer {i}; an engine records one router "
                    "per layer. Exclude one from the session (a shared-expert gate?) or give layers= explicitly"
                )
            seen[i] = nm
        extra = self.extra_names
        if extra and self.mtp == "error":
            raise ValueError(
                f"routers {list(extra)} sit at layers {[self.layers[self.names.index(x)] for x in extra]}, past the "
                f"engine's {self.num_layers} hidden layers (0..{self.num_layers - 1}): multi-token-prediction (MTP) "
                "layers, which engines do not record. Build the map with mtp='native' to route them natively, "
                "or exclude them from the session"
            )

    # ------------------------------------------------------------- builders
    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        num_layers: int,
        num_experts: int | Sequence[int],
        top_k: int | Sequence[int],
        *,
        layers: Sequence[int] | None = None,
        pattern: str = LAYER_PATTERN,
        mtp: str = "error",
    ) -> LayerMap:
        """Map router names to hidden layers, parsing ``...layers.<i>...`` unless ``layers`` is given."""
        names = tuple(str(n) for n in names)
        if layers is None:
            rx = re.compile(pattern)
            found = []
            for nm in names:
                m = rx.search(nm)
                if m is None:
                    raise ValueError(
                        f"cannot find a layer index in router name '{nm}' (pattern {pattern!r}); pass "
                        "layers=[...] with the hidden-layer index of each router"
                    )
                found.append(int(m.group(1)))
            layers = found
        e = (int(num_experts),) * len(names) if isinstance(num_experts, int) else tuple(int(x) for x in num_experts)
        k = (int(top_k),) * len(names) if isinstance(top_k, int) else tuple(int(x) for x in top_k)
        return cls(names, tuple(int(i) for i in layers), int(num_layers), e, k, mtp)

    @classmethod
    def from_session(
        cls,
        session: Any,
        num_layers: int,
        *,
        layers: Sequence[int] | None = None,
        pattern: str = LAYER_PATTERN,
        mtp: str = "error",
    ) -> LayerMap:
        """The routers of an attached session; ``num_layers`` is the model's ``config.num_hidden_layers``."""
        sites = session.sites
        return cls.from_names(
            [s.name for s in sites],
            num_layers,
            [s.num_experts for s in sites],
            [s.top_k for s in sites],
            layers=layers,
            pattern=pattern,
            mtp=mtp,
        )

    @classmethod
    def from_routes(
        cls,
        routes: Routes,
        num_layers: int,
        *,
        layers: Sequence[int] | None = None,
        pattern: str = LAYER_PATTERN,
        mtp: str = "error",
    ) -> LayerMap:
        """The routers that ``routes`` hold."""
        return cls.from_names(
            routes.names,
            num_layers,
            routes.experts_per_layer,
            routes.k_per_layer,
            layers=layers,
            pattern=pattern,
            mtp=mtp,
        )

    # ------------------------------------------------------------- views
    @property
    def extra_names(self) -> tuple[str, ...]:
        """Routers past the engine's last hidden layer (MTP)."""
        return tuple(nm for nm, i in zip(self.names, self.layers, strict=True) if i >= self.num_layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Hidden-layer indices that hold a router, ascending."""
        return tuple(sorted(i for i in self.layers if i < self.num_layers))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Hidden-layer indices without a router (dense MLP layers)."""
        moe = set(self.layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def k(self) -> int:
        """The k shared by every router (engine arrays have one k)."""
        ks = set(self.top_k)
        if len(ks) != 1:
            raise ValueError(f"routers differ in k ({sorted(ks)}); engine arrays hold one k for all layers")
        return ks.pop()

    def width(self, layout: str) -> int:
        """Layer columns of an engine array: all hidden layers, or MoE layers only."""
        _check_layout(layout)
        return self.num_layers if layout == "all" else len(self.moe_layers)

    def column(self, name: str, layout: str) -> int | None:
        """The engine column of router ``name`` (None for an MTP router)."""
        _check_layout(layout)
        i = self.layers[self.names.index(name)]
        if i >= self.num_layers:
            return None
        return i if layout == "all" else self.moe_layers.index(i)

    def __repr__(self) -> str:
        return (
            f"LayerMap(routers={len(self.names)}, num_layers={self.num_layers}, moe_layers={len(self.moe_layers)}, "
            f"dense_layers={list(self.dense_layers)}, mtp={list(self.extra_names)})"
        )


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'all' (every hidden layer) or 'moe' (MoE layers only), got {layout!r}")


# ----------------------------------------------------------------------------- array core
def _as_array(data: Any, what: str) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        raise RoutesValidationError(f"{what} must be an integer array, got dtype {arr.dtype}")
    return arr


def _from_array(
    arr: np.ndarray, lm: LayerMap, layout: str, what: str, missing: np.ndarray | None = None
) -> list[torch.Tensor]:
    """One ``[T, k]`` int64 tensor per router of ``lm`` from an engine array ``[T, width, k]``.

    ``missing`` marks tokens whose rows hold no route whatever the array says.
    """
    _check_layout(layout)
    width, k = lm.width(layout), lm.k
    if arr.ndim != 3 or arr.shape[1] != width or arr.shape[2] != k:
        other = "moe" if layout == "all" else "all"
        hint = ""
        if arr.ndim == 3 and arr.shape[1] == lm.width(other) and arr.shape[2] == k:
            hint = f" (its layer count fits layout='{other}')"
        raise RoutesValidationError(
            f"{what} has shape {tuple(arr.shape)}; with layout='{layout}' this model needs [tokens, {width}, {k}] "
            f"({lm.num_layers} hidden layers, {len(lm.moe_layers)} with a router, k={k}){hint}. Check "
            "num_layers of the LayerMap and the layout the engine writes"
        )
    rows = arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        top = np.iinfo(arr.dtype).max
        if top >= max(lm.num_experts):
            rows[(arr == top).all(axis=2)] = -1  # the -1 sentinel of a signed array, stored unsigned
    if missing is not None:
        rows[missing] = -1
    if layout == "all" and lm.dense_layers:
        dense = rows[:, list(lm.dense_layers)]
        bad = ~((dense == 0) | (dense == -1)).all(axis=(0, 2))
        if bad.any():
            j = lm.dense_layers[int(np.argmax(bad))]
            raise RoutesValidationError(
                f"{what}: column {j} holds expert choices, but no router of the LayerMap sits at layer {j} (a "
                f"dense layer, whose column engines leave empty). The map is off: routers at layers "
                f"{list(lm.moe_layers)[:8]}... Check num_layers and layers="
            )
    out = []
    for nm in lm.names:
        col = lm.column(nm, layout)
        if col is None:
            out.append(torch.full((arr.shape[0], lm.top_k[lm.names.index(nm)]), -1, dtype=torch.long))
        else:
            out.append(torch.from_numpy(np.ascontiguousarray(rows[:, col])))
    return out


def _routes(layers: list[torch.Tensor], lm: LayerMap, what: str) -> Routes:
    try:
        return Routes(layers, names=lm.names, num_experts=lm.num_experts)
    except RoutesValidationError as e:
        raise RoutesValidationError(f"{what}: {e}") from None


def _ordered(routes: Routes, lm: LayerMap) -> list[torch.Tensor | None]:
    """Routes' rows in the map's router order (None for MTP routers)."""
    if not isinstance(routes, Routes):
        raise TypeError(f"expected Routes, got {type(routes).__name__}")
    missing = [n for n in lm.names if n not in routes.names and n not in lm.extra_names]
    if missing:
        raise RoutesValidationError(f"the routes hold no rows for routers {missing[:4]} of the LayerMap")
    unknown = [n for n in routes.names if n not in lm.names]
    if unknown:
        raise RoutesValidationError(
            f"the routes hold routers {unknown[:4]} that the LayerMap does not place; build the map from the "
            "same session or routes"
        )
    out: list[torch.Tensor | None] = []
    for nm, e, k in zip(lm.names, lm.num_experts, lm.top_k, strict=True):
        if nm in lm.extra_names:
            out.append(None)
            continue
        j = routes.names.index(nm)
        if (routes.experts_per_layer[j], routes.k_per_layer[j]) != (e, k):
            raise RoutesValidationError(
                f"router '{nm}': the routes have {routes.experts_per_layer[j]} experts and k="
                f"{routes.k_per_layer[j]}, the LayerMap {e} and k={k}"
            )
        out.append(routes.layer(nm))
    return out


def _to_array(routes: Routes, lm: LayerMap, layout: str, dtype: np.dtype) -> np.ndarray:
    """``[T, width, k]`` engine array; dense columns 0 (as engines leave them), missing rows -1."""
    ordered = _ordered(routes, lm)
    t = routes.num_tokens
    arr = np.zeros((t, lm.width(layout), lm.k), dtype=np.int64)
    for nm, rows in zip(lm.names, ordered, strict=True):
        if rows is not None:
            arr[:, lm.column(nm, layout)] = rows.numpy()
    return _cast(arr, dtype, max(lm.num_experts))


def _cast(arr: np.ndarray, dtype: Any, num_experts: int) -> np.ndarray:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        raise ValueError(f"dtype must be an integer dtype, got {dt}")
    info = np.iinfo(dt)
    if num_experts - 1 > info.max:
        raise ValueError(f"{dt} cannot hold expert index {num_experts - 1}; use a wider dtype")
    missing = (arr == -1).all(axis=-1)
    if info.min >= 0 and missing.any():
        if info.max < num_experts:
            raise ValueError(f"{dt} cannot mark missing rows: its largest value {info.max} is a valid expert")
        arr = arr.copy()
        arr[missing] = info.max  # an unsigned array stores -1 as its largest value
    return arr.astype(dt)


def _drop_last(routes: Routes, drop_last: bool, fmt: str) -> Routes:
    if routes.num_tokens == 0:
        raise RoutesValidationError(f"{fmt}: the routes hold no token")
    last = routes[-1]
    if not drop_last and not bool(last.missing.all()):
        raise RoutesValidationError(
            f"{fmt} has no row for the last token (engines never route it), but these routes hold a route for "
            "it (a capture of a training forward?). Pass drop_last=True to drop that row"
        )
    return routes[: routes.num_tokens - 1]


def _skipped(layers: list[torch.Tensor], start: int) -> list[torch.Tensor]:
    """Prepend ``start`` -1 rows: leading tokens the engine was asked not to return."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return [torch.cat([torch.full((int(start), x.shape[1]), -1, dtype=x.dtype), x]) for x in layers]


def _with_last(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Append a -1 row: the last token, which no forward routed."""
    return [torch.cat([x, torch.full((1, x.shape[1]), -1, dtype=x.dtype)]) for x in layers]


# ----------------------------------------------------------------------------- vLLM
def from_vllm_legacy(routed_experts: Any, layer_map: LayerMap, *, num_tokens: int | None = None) -> Routes:
    """Routes of one sequence from older vLLM's ``CompletionOutput.routed_experts``.

    That array is ``[seq_len - 1, num_hidden_layers, k]`` int32 over prompt and
    completion (upstream: ``vllm/outputs.py``, ``vllm/model_executor/layers/fused_moe/
    routed_experts_capturer.py``, read by ``Scheduler._get_routed_experts`` with
    ``num_tokens = request.num_tokens - 1``). Returns ``seq_len`` rows, the last one -1.

    Args:
        num_tokens: ``len(prompt_token_ids) + len(token_ids)``, to check the row count.
    """
    arr = _as_array(routed_experts, "routed_experts")
    if num_tokens is not None and arr.shape[0] != int(num_tokens) - 1:
        raise RoutesValidationError(
            f"routed_experts has {arr.shape[0]} rows; a sequence of {num_tokens} tokens has {int(num_tokens) - 1} "
            "(the last token is never routed)"
        )
    return _routes(_with_last(_from_array(arr, layer_map, "all", "routed_experts")), layer_map, "vLLM routed_experts")


def to_vllm_legacy(routes: Routes, layer_map: LayerMap, *, drop_last: bool = False) -> np.ndarray:
    """Older vLLM's ``routed_experts``: ``[T - 1, num_hidden_layers, k]`` int32, dense columns 0."""
    return _to_array(_drop_last(routes, drop_last, "vLLM routed_experts"), layer_map, "all", np.int32)


def from_vllm(
    prompt_routed_experts: Any,
    routed_experts: Any,
    layer_map: LayerMap,
    *,
    completion_len: int | None = None,
    prompt_start: int = 0,
) -> Routes:
    """Routes of one sequence from newer vLLM's split arrays.

    ``RequestOutput.prompt_routed_experts`` is ``[prompt_len, num_moe_layers, k]`` and
    ``CompletionOutput.routed_experts`` ``[gen_len - 1, num_moe_layers, k]`` (upstream:
    ``docs/training/routed_experts_replay.md``): int16, or uint8 in releases that pick the
    narrowest dtype; prefix-cached rows are -1 (the largest value in an unsigned array).

    Args:
        prompt_routed_experts: may be None for an empty prompt.
        completion_len: ``len(token_ids)``. An array with ``completion_len`` rows has its
            last row replaced by -1 (no forward routed that token).
        prompt_start: prompt tokens the engine left out at the front (a request with
            ``routed_experts_prompt_start``); they get -1 rows.

    Returns:
        ``prompt_len + completion_len`` rows, the last one -1.
    """
    gen = _as_array(routed_experts, "routed_experts")
    if prompt_routed_experts is None:
        prompt = np.zeros((0, *gen.shape[1:]), dtype=gen.dtype)
    else:
        prompt = _as_array(prompt_routed_experts, "prompt_routed_experts")
    p_rows = _from_array(prompt, layer_map, "moe", "prompt_routed_experts")
    g_rows = _from_array(gen, layer_map, "moe", "routed_experts")
    if completion_len is not None:
        c = int(completion_len)
        if gen.shape[0] == c and c > 0:
            g_rows = [x[:-1] for x in g_rows]
        elif gen.shape[0] != c - 1:
            raise RoutesValidationError(
                f"routed_experts has {gen.shape[0]} rows for {c} generated tokens; vLLM gives {c - 1} (or {c})"
            )
    layers = [torch.cat([a, b]) for a, b in zip(p_rows, g_rows, strict=True)]
    return _routes(_with_last(_skipped(layers, prompt_start)), layer_map, "vLLM prompt_routed_experts/routed_experts")


def to_vllm(
    routes: Routes,
    layer_map: LayerMap,
    prompt_len: int,
    *,
    dtype: Any = np.int16,
    drop_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Newer vLLM's ``(prompt_routed_experts, routed_experts)`` for one sequence (MoE layers only)."""
    body = _drop_last(routes, drop_last, "vLLM routed_experts")
    p = int(prompt_len)
    if not 0 <= p <= body.num_tokens:
        raise ValueError(f"prompt_len={p} does not fit a sequence of {routes.num_tokens} tokens")
    arr = _to_array(body, layer_map, "moe", dtype)
    return arr[:p], arr[p:]


def from_vllm_output(request_output: Any, layer_map: LayerMap, *, index: int = 0) -> Routes:
    """Routes of completion ``index`` of a vLLM ``RequestOutput``, in either layout.

    The newer layout is recognised by ``routed_experts`` covering the completion only.
    """
    comp = request_output.outputs[index]
    if comp.routed_experts is None:
        raise RoutesValidationError(
            "this RequestOutput has no routed_experts: start vLLM with enable_return_routed_experts=True"
        )
    prompt_ids = request_output.prompt_token_ids or []
    total = len(prompt_ids) + len(comp.token_ids)
    rows = np.asarray(comp.routed_experts).shape[0]
    if getattr(request_output, "prompt_routed_experts", None) is None and rows == total - 1 and len(prompt_ids):
        return from_vllm_legacy(comp.routed_experts, layer_map, num_tokens=total)
    return from_vllm(
        getattr(request_output, "prompt_routed_experts", None),
        comp.routed_experts,
        layer_map,
        completion_len=len(comp.token_ids),
    )


# ----------------------------------------------------------------------------- SGLang
_SGLANG_DTYPES = ("int32", "uint16", "uint8")


def from_sglang(
    meta_info: Mapping[str, Any] | str,
    layer_map: LayerMap,
    *,
    num_tokens: int | None = None,
    dtype: str | None = None,
    start: int = 0,
) -> Routes:
    """Routes of one sequence from SGLang's ``meta_info["routed_experts"]``.

    A base64 string of a flat row-major ``[seq_len - 1, num_hidden_layers, k]`` array,
    dense layers included (upstream: ``python/sglang/srt/layers/moe/
    routed_experts_capturer.py``, ``extract_routed_experts_from_meta_info`` decodes it with
    ``np.frombuffer(..., dtype=np.int32)``; newer releases add
    ``meta_info["routed_experts_dtype"]``, one of int32, uint16, uint8, in
    ``state_capturer/routed_experts_wire.py``).

    Args:
        meta_info: the response's ``meta_info`` dict, or the base64 string itself.
        num_tokens: prompt plus completion length, to check the row count.
        dtype: override; default ``meta_info["routed_experts_dtype"]``, else int32.
        start: tokens left out at the front (a request with ``routed_experts_start_len``);
            they get -1 rows.
    """
    if isinstance(meta_info, str):
        payload, sent = meta_info, None
    else:
        if "routed_experts" not in meta_info or meta_info["routed_experts"] is None:
            raise RoutesValidationError(
                "meta_info has no routed_experts: launch SGLang with --enable-return-routed-experts and send "
                "return_routed_experts=True"
            )
        payload, sent = meta_info["routed_experts"], meta_info.get("routed_experts_dtype")
    name = str(dtype or sent or "int32").strip().lower()
    if name not in _SGLANG_DTYPES:
        raise ValueError(f"SGLang routed_experts dtype must be one of {_SGLANG_DTYPES}, got {name!r}")
    raw = base64.b64decode(payload.encode() if isinstance(payload, str) else payload)
    flat = np.frombuffer(raw, dtype=np.dtype(name))
    width, k = layer_map.num_layers, layer_map.k
    if flat.size % (width * k):
        raise RoutesValidationError(
            f"SGLang routed_experts holds {flat.size} {name} values, not a multiple of num_hidden_layers*k = "
            f"{width}*{k}: check the LayerMap's num_layers, k and the dtype"
        )
    arr = flat.reshape(-1, width, k)
    if num_tokens is not None and arr.shape[0] + int(start) != int(num_tokens) - 1:
        raise RoutesValidationError(
            f"SGLang routed_experts has {arr.shape[0]} rows from token {start}; a sequence of {num_tokens} tokens "
            f"has {int(num_tokens) - 1 - int(start)} (the last token is never routed)"
        )
    layers = _skipped(_from_array(arr, layer_map, "all", "SGLang routed_experts"), start)
    return _routes(_with_last(layers), layer_map, "SGLang routed_experts")


def to_sglang(routes: Routes, layer_map: LayerMap, *, dtype: str = "int32", drop_last: bool = False) -> dict[str, str]:
    """SGLang's ``{"routed_experts": base64, "routed_experts_dtype": name}`` for one sequence.

    An unsigned ``dtype`` that cannot hold every value (a -1 row) falls back to int32, as
    SGLang's own encoder does; the returned ``routed_experts_dtype`` names what was written.
    """
    name = str(dtype).strip().lower()
    if name not in _SGLANG_DTYPES:
        raise ValueError(f"SGLang routed_experts dtype must be one of {_SGLANG_DTYPES}, got {name!r}")
    arr = _to_array(_drop_last(routes, drop_last, "SGLang routed_experts"), layer_map, "all", np.int32)
    if name != "int32" and arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.dtype(name)).max):
        name = "int32"
    arr = np.ascontiguousarray(arr.astype(np.dtype(name)))
    return {"routed_experts": base64.b64encode(arr.tobytes()).decode(), "routed_experts_dtype": name}


# ----------------------------------------------------------------------------- Megatron
def _seq_first(n: int, batch_size: int) -> torch.Tensor:
    """Index mapping batch-major ``[B, S]`` rows to Megatron's sequence-first ``[S, B]`` order."""
    if n % batch_size:
        raise RoutesValidationError(f"{n} rows do not split into batch_size={batch_size} sequences")
    s = n // batch_size
    return torch.arange(n).view(batch_size, s).t().reshape(-1)


def to_megatron(
    routes: Routes,
    *,
    layer_map: LayerMap | None = None,
    batch_size: int | None = None,
    fill: int | None = None,
) -> list[torch.Tensor]:
    """The list ``RouterReplay.set_replay_data`` takes: one int64 ``[tokens, k]`` per MoE layer.

    Upstream: ``megatron/core/transformer/moe/router_replay.py``; the list order must match
    the order the routers were built in (layer order). Tokens are in the order the routers
    see them: a packed (THD) batch in packed order; an unpacked ``[S, B]`` batch
    sequence-first, which ``batch_size`` converts to from these batch-major routes.

    Args:
        layer_map: order routers by hidden layer and leave out MTP routers (default: the
            order of ``routes``).
        fill: Megatron gathers every forced index and has no "route natively" row; -1 rows
            are refused unless ``fill`` is given: they are then written as experts
            ``fill, fill + 1, ..., fill + k - 1``.
    """
    if layer_map is not None:
        placed = zip(layer_map.layers, layer_map.names, _ordered(routes, layer_map), strict=True)
        pairs = sorted(((i, nm, t) for i, nm, t in placed if t is not None), key=lambda x: x[0])
        order, tensors = [nm for _, nm, _ in pairs], [t for _, _, t in pairs]
    else:
        tensors = list(routes.per_layer())
        order = list(routes.names)
    out = []
    for nm, t in zip(order, tensors, strict=True):
        assert t is not None
        hole = (t < 0).all(dim=1)
        if bool(hole.any()):
            if fill is None:
                raise RoutesValidationError(
                    f"router '{nm}' has {int(hole.sum())} rows without a route (-1: the last token, padding, prefix "
                    "cache); Megatron's replay cannot route a token natively. Drop those tokens, or pass fill="
                )
            t = t.clone()
            t[hole] = torch.arange(t.shape[1]) + int(fill)
        if batch_size is not None:
            t = t[_seq_first(t.shape[0], int(batch_size))]
        out.append(t.long().contiguous())
    return out


def from_megatron(
    tensors: Sequence[torch.Tensor],
    names: Sequence[str],
    num_experts: int | Sequence[int],
    *,
    batch_size: int | None = None,
) -> Routes:
    """Routes from Megatron's per-MoE-layer list (``RouterReplay.get_recorded_data()``).

    ``names`` are this model's routers in Megatron's layer order; ``batch_size`` converts
    sequence-first ``[S, B]`` token order back to batch-major.
    """
    tensors = [torch.as_tensor(t).detach().cpu() for t in tensors]
    if len(tensors) != len(names):
        raise RoutesValidationError(f"got {len(tensors)} Megatron layers for {len(names)} router names")
    if batch_size is not None:
        inverse = [torch.argsort(_seq_first(t.shape[0], int(batch_size))) for t in tensors]
        tensors = [t[i] for t, i in zip(tensors, inverse, strict=True)]
    return Routes(tensors, names=names, num_experts=num_experts)


# ----------------------------------------------------------------------------- verl
def to_verl(
    sequences: Sequence[Routes],
    layer_map: LayerMap,
    *,
    prompt_lengths: Sequence[int] | torch.Tensor,
    prompt_width: int | None = None,
    response_width: int | None = None,
    layout: str = "all",
    fill: int = 0,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """verl's batch ``routed_experts`` ``[batch, prompt_width + response_width, layers, k]``.

    Each sequence's prompt is left-padded to ``prompt_width`` and its response
    right-padded (upstream: ``verl/experimental/agent_loop/agent_loop.py`` places the
    engine's rows from ``prompt_width - len(prompt_ids)``, zeros elsewhere; replay in
    ``verl/utils/megatron/router_replay_utils.py``). ``layout`` is the engine's: "all"
    hidden layers (SGLang, older vLLM) or "moe" layers (newer vLLM). Padding is written as
    ``fill`` (0, as verl does); rows without a route keep -1.
    """
    seqs = list(sequences)
    check_same_routers(seqs)
    lengths = [s.num_tokens for s in seqs]
    row_length = None
    if response_width is not None:
        pw = prompt_width if prompt_width is not None else int(torch.as_tensor(prompt_lengths).max())
        row_length = pw + int(response_width)
    bl = BatchLayout.split(prompt_lengths, lengths, prompt_width=prompt_width, row_length=row_length)
    out = torch.full((bl.rows, bl.row_length, layer_map.width(layout), layer_map.k), int(fill), dtype=dtype)
    for i, seq in enumerate(seqs):
        r, s, n = bl.placements[i]
        out[r, s : s + n] = torch.from_numpy(_to_array(seq, layer_map, layout, np.int64)).to(dtype)
    return out


def from_verl(
    routed_experts: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_map: LayerMap,
    *,
    layout: str = "all",
    last_routed: bool = False,
) -> list[Routes]:
    """Per-sequence routes from verl's ``[batch, seq, layers, k]`` ``routed_experts``.

    Tokens are the positions where ``attention_mask`` is 1. The last token of each
    sequence gets a -1 row (engines never route it, verl leaves zeros there) unless
    ``last_routed`` (routes recorded in a training forward).
    """
    arr = _as_array(routed_experts, "routed_experts")
    mask = torch.as_tensor(attention_mask).bool().cpu()
    if arr.ndim != 4 or tuple(mask.shape) != arr.shape[:2]:
        raise RoutesValidationError(
            f"verl routed_experts must be [batch, seq, layers, k] with a [batch, seq] attention_mask; got "
            f"{tuple(arr.shape)} and {tuple(mask.shape)}"
        )
    out = []
    for i in range(arr.shape[0]):
        keep = mask[i].numpy()
        if not keep.any():
            raise RoutesValidationError(f"sequence {i} has no token (its attention_mask is all 0)")
        rows = arr[i][keep]
        last = np.zeros(rows.shape[0], dtype=bool)
        last[-1] = not last_routed
        out.append(_routes(_from_array(rows, layer_map, layout, f"verl sequence {i}", last), layer_map, "verl"))
    return out
