"""NeMo-RL's routed-experts wire envelope (read from NVIDIA-NeMo/RL @7ea279ab).

``"nrlre1:<dtype>:<S>x<L>x<K>:<base64>"``: base64 of the C-contiguous bytes of an array
``[S, L, K]``, dtype int8, int16 or int32 (the narrowest signed one holding expert ids and
-1), little-endian. A plain nested list ``[S][L][K]`` is the legacy payload. NeMo-RL's
vLLM server builds it per chat choice from ``CompletionOutput.routed_experts``:

* ``S`` is every token of the sequence, prompt and completion.
* Rows ``0 .. S - 2`` are vLLM's rows, aligned from the front. When vLLM returned fewer,
  NeMo-RL fills the rest with all -1 rows (its Megatron side routes them natively); where
  vLLM actually lost them cannot be told, so they are refused unless ``missing="native"``.
* Row ``S - 1``, the last token, which no forward routed, is NeMo-RL's placeholder
  ``0, 1, .., K - 1`` in every column.
* ``L`` is what vLLM returned: all hidden layers (vLLM 0.22+, dense columns zero; NeMo-RL
  pins 0.25.1) or MoE layers only (0.21); NeMo-RL's Megatron side takes either.

docs/formats.md cites the source of each fact.

Example:
    >>> import base64, numpy as np, moe_replay as mr
    >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    >>> rows = np.array([[[0, 0], [0, 3]], [[0, 0], [2, 1]], [[0, 1], [0, 1]]], np.int8)  # 3 tokens
    >>> payload = "nrlre1:int8:3x2x2:" + base64.b64encode(rows.tobytes()).decode()
    >>> r = mr.interop.from_nemo_rl(payload, lm, num_tokens=3)
    >>> r.layer("model.layers.1.mlp.gate").tolist()
    [[0, 3], [2, 1], [-1, -1]]
    >>> mr.interop.to_nemo_rl(r, lm) == payload
    True
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .._checks import check_count, is_one_of
from ..errors import ArgumentTypeError, RoutesValidationError
from ..routes import Routes
from ._common import (
    as_array,
    b64_bytes,
    check_axes,
    check_holds,
    columns,
    cut_last,
    in_axes,
    make_routes,
    rows_untold,
    to_array,
    with_last,
)
from .layer_map import LayerMap, check_layout, check_map

__all__ = ["from_nemo_rl", "nemo_rl_dtype", "to_nemo_rl"]

_MAGIC = "nrlre1"
_DTYPES: dict[str, np.dtype[Any]] = {"int8": np.dtype("<i1"), "int16": np.dtype("<i2"), "int32": np.dtype("<i4")}
_WHAT = "NeMo-RL routed_experts"
_MISSING = ("error", "native")


def nemo_rl_dtype(num_experts: int) -> str:
    """The dtype NeMo-RL carries routes in: int8 up to 128 experts, int16 up to 32768, else int32."""
    n = check_count(num_experts, "num_experts")
    if not 1 <= n <= np.iinfo(np.int32).max + 1:
        raise RoutesValidationError(f"num_experts must be from 1 to 2**31 (int32 expert ids), got {n}")
    return next(name for name, dt in _DTYPES.items() if n - 1 <= np.iinfo(dt).max)


def _dtype_name(dtype: Any) -> str:
    """The envelope's name of ``dtype``: "int8", "int16" or "int32", given by name or as numpy spells it
    (``np.int16``, ``np.dtype("int16")``), as :meth:`Routes.to_numpy` takes a dtype; the envelope's byte order is
    its own (little-endian), whatever the dtype's."""
    carried = ", ".join(repr(n) for n in _DTYPES)
    if isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(
            f"to_nemo_rl: dtype={dtype} is a torch dtype; pass its name or the numpy dtype ({carried}, np.int16)"
        )
    if isinstance(dtype, bool | np.bool_) or (isinstance(dtype, str) and not dtype.strip()):
        raise ArgumentTypeError(f"to_nemo_rl: dtype must name one of {carried} (or be np.int16...), got {dtype!r}")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(
            f"to_nemo_rl: dtype must be one of {carried} or the numpy dtype (np.int16...), got {dtype!r:.60}: {e}"
        ) from None
    if dt.name not in _DTYPES:
        raise RoutesValidationError(
            f"to_nemo_rl: dtype must be one of {carried} (NeMo-RL carries routes in no other), got {dt}; pass one "
            "of them (or None for NeMo-RL's own choice, nemo_rl_dtype(num_experts))"
        )
    return dt.name


def _unwrap(payload: Any) -> tuple[Any, int | None, list[Any] | None]:
    """The payload of a chat message, a choice or a NeMo Gym output item, its token count and token ids."""
    if not isinstance(payload, Mapping):
        return payload, None, None
    msg = payload.get("message", payload)
    if not isinstance(msg, Mapping) or msg.get("routed_experts") is None:
        raise RoutesValidationError(
            f"{_WHAT}: the mapping has no routed_experts (NeMo-RL sets it on each chat choice's message when "
            "policy.router_replay.enabled is on)"
        )
    ids: list[Any] = [msg.get("prompt_token_ids"), msg.get("generation_token_ids")]
    if any(x is None for x in ids):
        return msg["routed_experts"], None, None
    try:
        return msg["routed_experts"], len(ids[0]) + len(ids[1]), [*ids[0], *ids[1]]
    except TypeError:
        raise RoutesValidationError(
            f"{_WHAT}: prompt_token_ids and generation_token_ids must be lists of token ids, got "
            f"{type(ids[0]).__name__} and {type(ids[1]).__name__}"
        ) from None


def _decode(text: str | bytes) -> np.ndarray:
    """The ``[S, L, K]`` array of an ``nrlre1`` envelope."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    parts = text.split(":", 3)
    if len(parts) != 4 or parts[0] != _MAGIC:
        head = parts[0][:16]
        raise RoutesValidationError(
            f"{_WHAT}: envelope version {head!r} is not read (only '{_MAGIC}')"
            if head != _MAGIC and re.fullmatch(r"nrlre\d+", head)
            else f"{_WHAT} is not a '{_MAGIC}:<dtype>:<S>x<L>x<K>:<base64>' envelope (starts {text[:24]!r})"
        )
    _, name, shape, data = parts
    if name not in _DTYPES:
        raise RoutesValidationError(f"{_WHAT}: dtype {name!r} is not one NeMo-RL writes ({', '.join(_DTYPES)})")
    m = re.fullmatch(r"([0-9]+)x([0-9]+)x([0-9]+)", shape)
    if m is None:
        raise RoutesValidationError(f"{_WHAT}: shape {shape!r} is not three integers <S>x<L>x<K>")
    dims = tuple(int(g) for g in m.groups())
    raw = b64_bytes(data, f"{_WHAT}'s data", "NeMo-RL writes base64 of the array's little-endian bytes")
    dt = _DTYPES[name]
    if len(raw) != dims[0] * dims[1] * dims[2] * dt.itemsize:
        raise RoutesValidationError(
            f"{_WHAT}: {len(raw)} bytes of data, but shape {shape} of {name} needs "
            f"{dims[0] * dims[1] * dims[2] * dt.itemsize}: the payload was cut or its header changed"
        )
    return np.frombuffer(raw, dtype=dt).reshape(dims)


def _layout(arr: np.ndarray, lm: LayerMap) -> str:
    """The layout a width fits: "moe" or "all" (equal only when every hidden layer routes, then one layout)."""
    if arr.ndim == 3 and arr.shape[2] == lm.k:
        for layout in ("moe", "all"):
            if arr.shape[1] == lm.width(layout):
                return layout
    raise RoutesValidationError(
        f"{_WHAT} has shape {tuple(arr.shape)}; this model needs [tokens, {lm.width('moe')} (MoE layers) or "
        f"{lm.width('all')} (all hidden layers), {lm.k}]. Check num_layers and k of the LayerMap"
    )


def from_nemo_rl(
    payload: Any,
    layer_map: LayerMap,
    *,
    num_tokens: int | None = None,
    missing: str = "error",
    cached_tokens: int | None = None,
    axes: str | None = None,
) -> Routes:
    """Routes of one sequence from NeMo-RL's ``routed_experts``: the envelope or the legacy list.

    Args:
        payload: the ``nrlre1`` envelope string; a chat message, choice or NeMo Gym output
            item holding it (with ``prompt_token_ids`` and ``generation_token_ids``, which
            give ``num_tokens``); or the legacy nested list ``[S][L][K]``.
        num_tokens: prompt plus completion length, to check the row count: NeMo-RL writes
            one row per token. Without it (and without a message's ids) only the replay's row
            count refuses a row too many or too few, and a replay with ``strict=False`` that
            leaves rows of the routes unread is refused (a row too many at the front would shift
            every token's experts): slice them, ``routes[:n]``, for a partial replay.
        missing: all -1 token rows, which NeMo-RL writes where vLLM returned fewer rows
            than the sequence has: ``"error"`` (default: the rows vLLM did return were placed
            from the front, a guess) or ``"native"`` (take NeMo-RL's alignment; those tokens
            get -1 rows). A -1 row of k in one layer's column alone (that layer routes the
            token natively, as :func:`to_nemo_rl` writes a single router's -1 row) is read as
            that router's -1 row either way.
        cached_tokens: a payload of MoE-layer columns only, of a model with dense layers,
            comes from vLLM 0.21, which leaves the rows of prefix-cached prompt tokens zero
            (NeMo-RL copies them): the leading tokens served from the prefix cache, whose
            zero rows become -1 (route natively). Without it an all-zero token row there is
            refused: with k = 1 it is also a route (expert 0 in every MoE layer). 0 when
            caching was off. On a model without dense layers both layouts have as many
            columns: pass it for a payload of vLLM 0.21 there too.

        axes: the order of the array's axes, ``"tokens,layers,k"`` as NeMo-RL writes it, or
            another order of those names (``"layers,tokens,k"``: a stack of per-layer arrays).
            Needed only where the data cannot prove it: an envelope or list with as many rows
            as layer columns (or as many columns as k) that fits the LayerMap, placeholder row
            and all, read in either order is refused without it. A message or item (with its
            token ids) holds the array as NeMo-RL writes it.

    Returns:
        ``S`` tokens; the last is -1. From a message or item, they know their tokens
        (:attr:`~moe_replay.Routes.token_ids`): its prompt and generation ids. Row t is token t
        of the sequence and keeps that place (a slice of them is forced only on tokens fed there).

    Raises:
        RoutesValidationError: not an ``nrlre1`` envelope (or another version), a dtype
            NeMo-RL does not write or too narrow for the map's experts, a shape that is not
            three integers or that the bytes do not fill, a row count other than
            ``num_tokens``, a width that is neither the map's MoE-layer nor hidden-layer
            count, a last row that is not the placeholder, -1 rows (unless
            ``missing="native"``), a dense column holding experts, invalid experts.
    """
    check_map(layer_map, "from_nemo_rl")
    if not is_one_of(missing, _MISSING):
        raise RoutesValidationError(f"missing must be one of {_MISSING}, got {missing!r}")
    payload, counted, token_ids = _unwrap(payload)
    if isinstance(payload, str | bytes):
        arr = _decode(payload)
        if np.iinfo(arr.dtype).max < layer_map.max_experts - 1:
            raise RoutesValidationError(
                f"{_WHAT} is {arr.dtype.name}, which cannot hold the expert ids of {layer_map.max_experts} experts "
                f"(NeMo-RL uses {nemo_rl_dtype(layer_map.max_experts)}): ids past {np.iinfo(arr.dtype).max} were "
                "wrapped. Check the LayerMap's num_experts, or NeMo-RL's routed_experts_dtype"
            )
    else:
        arr = as_array(payload, _WHAT)
        check_holds(arr, layer_map, _WHAT)  # (before the rows are widened to int64, which would hide it)
    arr = in_axes(arr, axes, _WHAT)
    if num_tokens is None:
        num_tokens = counted
    elif counted is not None and check_count(num_tokens, "num_tokens") != counted:
        raise RoutesValidationError(f"num_tokens={num_tokens}, but the message holds {counted} token ids")
    layout = _layout(arr, layer_map)
    if num_tokens is not None and arr.shape[0] != check_count(num_tokens, "num_tokens"):
        raise RoutesValidationError(
            f"{_WHAT} has {arr.shape[0]} rows; NeMo-RL writes one per token, prompt and completion: {num_tokens}"
        )
    if not arr.shape[0]:
        raise RoutesValidationError(f"{_WHAT} holds no token")
    placeholder = np.arange(arr.shape[2])
    # (a message or item, with its token ids, holds the array as NeMo-RL writes it)
    check_axes(arr, layer_map, layout, _WHAT, told=axes is not None or token_ids is not None, body=_framed)
    if not (arr[-1] == placeholder).all():
        raise RoutesValidationError(
            f"{_WHAT}: the last row {arr[-1].tolist()[:4]} is not NeMo-RL's placeholder {placeholder.tolist()} in "
            "every column (the last token is never routed). This payload was not written by NeMo-RL, or its rows "
            "are shifted"
        )
    body = arr[:-1].astype(np.int64)
    hole = (body == -1).all(axis=(1, 2))
    if missing == "error" and hole.any():
        t = int(np.argmax(hole))
        raise RoutesValidationError(
            f"{_WHAT}: token {t} is all -1: NeMo-RL's fill for rows vLLM did not return ({int(hole.sum())} tokens "
            "here). NeMo-RL placed the rows vLLM did return from the front, so whether they belong to their tokens "
            "cannot be told. Pass missing='native' to take that alignment and route those tokens natively"
        )
    # a -1 is NeMo-RL's "route natively": across a whole token row (above), or a whole row of k in one layer's
    # column (its Megatron side routes that token natively in that layer); any other negative is no route
    minus = body == -1
    odd = ((minus.any(axis=2) & ~minus.all(axis=2)) | (body < -1).any(axis=2)) & ~hole[:, None]
    if odd.any():
        t, j = (int(v) for v in np.argwhere(odd)[0])
        raise RoutesValidationError(
            f"{_WHAT}: token {t}, column {j} holds {body[t, j].tolist()[:4]}; NeMo-RL writes -1 only across a whole "
            "row of k (that layer routes the token natively) or a whole token row (a row vLLM did not return)"
        )
    body[hole] = 0
    native = hole
    if layout == "moe" and (cached_tokens is not None or layer_map.dense_layers):
        # (MoE columns alone: vLLM 0.21's, whose cached rows are zero; on an all-MoE model only cached_tokens= says so)
        native = hole | _cached(body, hole, cached_tokens)
    elif cached_tokens is not None:
        raise RoutesValidationError(
            f"{_WHAT}: cached_tokens= is for payloads of vLLM 0.21 (MoE-layer columns only); this one holds "
            f"{arr.shape[1]} columns, every hidden layer's, as vLLM 0.22+ writes, whose cached rows hold their routes"
        )
    layers = columns(body, layer_map, layout, _WHAT, native=native, negative_ok=True)
    routes = make_routes(with_last(layers), layer_map, _WHAT)
    # the message's prompt and generation ids: a replay fed other tokens is refused (Routes.token_ids)
    if token_ids is not None:
        return routes._with_token_ids(token_ids, f"{_WHAT}: prompt_token_ids + generation_token_ids")
    return routes if num_tokens is not None else rows_untold(routes, "from_nemo_rl")


def _framed(arr: np.ndarray) -> np.ndarray | None:
    """The token rows of a reading of a NeMo-RL array (its placeholder last row cut), None where that row is not the
    placeholder ``arange(k)`` in every column; rows of -1 (no route) read as zero rows, which prove no order."""
    if not arr.shape[0] or not (arr[-1] == np.arange(arr.shape[2])).all():
        return None
    body = arr[:-1].astype(np.int64)
    body[(body == -1).all(axis=2)] = 0
    return body


def _cached(body: np.ndarray, hole: np.ndarray, cached_tokens: int | None) -> np.ndarray:
    """The rows of a vLLM 0.21 payload that are prefix-cached prompt tokens (zero there): the first
    ``cached_tokens``, which must be zero; without it, any all-zero row is refused as ambiguous."""
    zero = (body == 0).all(axis=(1, 2)) & ~hole
    if cached_tokens is None:
        if zero.any():
            t = int(np.argmax(zero))
            raise RoutesValidationError(
                f"{_WHAT}: token {t} is all zeros in every MoE-layer column. A payload of MoE layers alone comes from "
                "vLLM 0.21, which leaves prefix-cached prompt rows zero (NeMo-RL copies them), so it cannot tell a "
                "cached token from one routed to expert 0 everywhere. Pass cached_tokens= (the prompt tokens served "
                "from the prefix cache; 0 when caching was off)"
            )
        return np.zeros_like(zero)
    n = check_count(cached_tokens, "cached_tokens")
    if n > body.shape[0]:
        raise RoutesValidationError(f"{_WHAT}: cached_tokens={n} is more than the {body.shape[0]} routed tokens")
    if not (zero[:n] | hole[:n]).all():
        t = int(np.argmin(zero[:n] | hole[:n]))
        raise RoutesValidationError(
            f"{_WHAT}: cached_tokens={n}, but token {t} holds routes: vLLM 0.21 leaves cached rows zero. Check "
            "cached_tokens"
        )
    out = np.zeros_like(zero)
    out[:n] = True
    return out


def to_nemo_rl(
    routes: Routes,
    layer_map: LayerMap,
    *,
    layout: str = "all",
    dtype: str | None = None,
    drop_last: bool = False,
) -> str:
    """NeMo-RL's ``nrlre1`` envelope for one sequence: a row per token, the last its placeholder.

    A token whose every router holds -1 is written as an all -1 row, as NeMo-RL writes a
    route vLLM did not return (:func:`from_nemo_rl` reads it back with ``missing="native"``,
    since such a row cannot be told from NeMo-RL's fill); a single router's -1 row as -1 in
    its column, which :func:`from_nemo_rl` reads back as is.

    Args:
        layout: "all" hidden layers (vLLM 0.22+, as NeMo-RL pins) or "moe" layers (0.21).
        dtype: "int8", "int16" or "int32", by name or as numpy spells it (``np.int16``); by
            default NeMo-RL's choice for the map's expert count (:func:`nemo_rl_dtype`). One too
            narrow for the experts is refused.
        drop_last: write the placeholder over a route the last token holds (otherwise
            refused: the format has no route for it).

    Raises:
        RoutesValidationError: routes that do not fit the map, a dtype NeMo-RL does not
            carry or too narrow, a route for the last token without ``drop_last=True``.
        ArgumentTypeError: ``dtype`` is no dtype numpy reads (a torch dtype: pass its name).
    """
    check_map(layer_map, "to_nemo_rl")
    check_layout(layout)
    name = nemo_rl_dtype(layer_map.max_experts) if dtype is None else _dtype_name(dtype)
    body = cut_last(routes, drop_last, _WHAT)
    arr = to_array(body, layer_map, layout, _DTYPES[name], _WHAT, allow_missing=True)
    cols = [c for c in (layer_map.column(n, layout) for n in layer_map.names) if c is not None]
    arr[(arr[:, cols] == -1).all(axis=(1, 2))] = -1
    last = np.broadcast_to(np.arange(layer_map.k, dtype=arr.dtype), (1, *arr.shape[1:]))
    arr = np.ascontiguousarray(np.concatenate([arr, last]))
    shape = "x".join(str(d) for d in arr.shape)
    return f"{_MAGIC}:{name}:{shape}:{base64.b64encode(arr.tobytes()).decode()}"
