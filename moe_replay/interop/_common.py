"""Helpers shared by the engine modules: arrays in, per-router rows out, and back."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._checks import MAX_COUNT, check_flag, is_integer
from ..errors import RoutesValidationError
from ..routes import Routes, in_token_order, integer_array
from .layer_map import LayerMap, check_layout


def as_array(data: Any, what: str, holds: str = "expert indices") -> np.ndarray:
    """An integer numpy array from an array, a tensor or nested lists (see :func:`integer_array`)."""
    return integer_array(data, what, holds)


#: What to do with a payload that cannot be decoded: it is read only as the server sent it.
_AS_SENT = (
    "pass the field as the server sent it, whole: text cut short (a truncated log line or a size limit), decoded "
    "or re-encoded on the way cannot be read back"
)


def b64_bytes(text: Any, what: str, sent: str) -> bytes:
    """The bytes of the base64 text ``text``, an engine's ``what`` field (``sent`` says what the engine sends).

    Text that is no base64 is refused with what is wrong in it (a length cut off the 4-character groups, a character
    base64 does not use and where) and what to pass instead, never with the decoder's words alone.
    """
    if not isinstance(text, str | bytes):
        raise RoutesValidationError(
            f"{what} must be the base64 text the server sent ({sent}), got {type(text).__name__}: pass that field "
            "itself, as it arrived"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:  # (binascii.Error is a ValueError)
        chars = text.decode("ascii", errors="replace") if isinstance(text, bytes) else text
        bad = re.search(r"[^A-Za-z0-9+/=]", chars)
        if bad is not None:
            why = f"it holds {bad.group()!r} at character {bad.start()}, which base64 does not use"
        elif len(chars) % 4:
            why = f"its {len(chars)} characters are no whole groups of 4, as base64 writes them: it was cut"
        else:
            why = str(e)
        raise RoutesValidationError(f"{what} is not base64 text ({why}); {sent}: {_AS_SENT}") from None


def npy_from_base64(text: str | bytes, what: str) -> np.ndarray:
    """Decode base64 of a ``.npy`` file (no pickles); what is wrong with a payload that is not one is said."""
    sent = "vLLM's OpenAI server sends base64 of the bytes np.save writes"
    raw = b64_bytes(text, what, sent)
    if not raw.startswith(b"\x93NUMPY"):
        raise RoutesValidationError(
            f"{what} is not base64 of a .npy file: it is base64 text, but its {len(raw)} bytes begin {raw[:8]!r}, "
            "not a .npy header; "
            f"{sent}. Raw int32 bytes (as SGLang sends) are read by from_sglang; an array already decoded is passed "
            "as the array itself"
        )
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # (a pickle of objects, a header numpy cannot read, data cut)
        held = "Python objects (a pickle), which is never read" if "pickle" in str(e) else f"no whole array ({e})"
        raise RoutesValidationError(f"{what} is a .npy file that holds {held}; {sent}: {_AS_SENT}") from None


def npy_to_base64(arr: np.ndarray) -> str:
    """Base64 of ``arr`` saved as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def check_shape(arr: np.ndarray, lm: LayerMap, layout: str, what: str) -> None:
    """``arr`` is ``[tokens, width, k]`` for ``layout``; the error says which layout it does fit."""
    check_layout(layout)
    width, k = lm.width(layout), lm.k
    if arr.ndim == 3 and arr.shape[1] == width and arr.shape[2] == k:
        return
    other = "moe" if layout == "all" else "all"
    hint = ""
    if arr.ndim == 3 and arr.shape[1] == lm.width(other) and arr.shape[2] == k:
        hint = f" (its layer count fits layout='{other}')"
    raise RoutesValidationError(
        f"{what} has shape {tuple(arr.shape)}; with layout='{layout}' this model needs [tokens, {width}, {k}] "
        f"({lm.num_layers} hidden layers, {len(lm.moe_layers)} with a router, k={k}){hint}. Check "
        "num_layers of the LayerMap and the layout the engine writes"
    )


def check_holds(
    arr: np.ndarray, lm: LayerMap, what: str, fix: str = "in a dtype that holds every expert (as the engine wrote it)"
) -> None:
    """Refuse an array whose dtype cannot write every expert of the map: cast to it on the way, an expert may have
    wrapped around to another one (expert 299 of int8 reads 43, a real expert too), which no range check sees. Any
    integer dtype that holds them all reads the same experts. ``fix`` names the array to pass instead."""
    high = int(np.iinfo(arr.dtype).max)
    if lm.max_experts - 1 > high:
        raise RoutesValidationError(
            f"{what} is {arr.dtype}, which holds expert numbers up to {high} only, but the LayerMap has "
            f"{lm.max_experts} experts: an array cast to {arr.dtype} on the way may have wrapped an expert around to "
            f"another. Pass the array {fix}, or check the LayerMap's num_experts"
        )


def columns(
    arr: np.ndarray,
    lm: LayerMap,
    layout: str,
    what: str,
    native: np.ndarray | None = None,
    *,
    negative_ok: bool = False,
) -> list[torch.Tensor]:
    """One ``[T, k]`` int64 tensor per router of ``lm`` from an engine array ``[T, width, k]``.

    Dense-layer columns of an "all" array must be all zeros (engines leave them so): any
    other value means the map places routers on the wrong layers. ``native`` marks rows
    that hold no route (they become -1). A negative value is refused unless ``negative_ok``
    (a format that writes -1 for a token with no route, as verl's): engines fill their
    buffers with zeros, so one is padding or damage from elsewhere, not a route.
    """
    check_shape(arr, lm, layout, what)
    check_holds(arr, lm, what)
    rows = arr.astype(np.int64)
    if not negative_ok and rows.size and rows.min() < 0:
        t = int(np.argwhere(rows < 0)[0][0])
        raise RoutesValidationError(
            f"{what}: token {t} holds a negative expert number ({int(rows.min())}); engines write none (their "
            "buffers are zero-filled), so this is padding or damage from another tool. Cut it before reading"
        )
    if layout == "all" and lm.dense_layers:
        dense = rows[:, list(lm.dense_layers)]
        bad = (dense != 0).any(axis=(0, 2))
        if bad.any():
            j = lm.dense_layers[int(np.argmax(bad))]
            raise RoutesValidationError(
                f"{what}: column {j} holds expert choices, but no router of the LayerMap sits at layer {j} (a "
                f"dense layer, whose column engines leave zero). The map is off: it places routers at layers "
                f"{list(lm.moe_layers)[:8]}. Check num_layers and layers="
            )
    if native is not None:
        rows[native] = -1
    out = []
    for nm, k in zip(lm.names, lm.top_k, strict=True):
        col = lm.column(nm, layout)
        if col is None:
            out.append(torch.full((arr.shape[0], k), -1, dtype=torch.long))
        else:
            out.append(torch.from_numpy(np.ascontiguousarray(rows[:, col])))
    return out


#: Routes (token x router cells) all of expert 0 from which an engine array is taken for one that was never
#: written: an engine whose capture did not run leaves zeros, and past this many no router sends every token
#: to expert 0 by chance (k >= 2 repeats expert 0 in a row, refused as a duplicate at any size). The same
#: count of one router's rows, all expert 0, is taken for that layer's column never written.
_UNWRITTEN_CELLS = 64


def make_routes(layers: list[torch.Tensor], lm: LayerMap, what: str) -> Routes:
    """Validated routes of the map's routers (range, k, duplicates), the error prefixed with ``what``, each row
    knowing its place in its sequence (``Routes._seq_pos``).

    ``layers`` are the rows of one sequence from its first token, row t its token t (the tokens an engine was asked
    to leave out, or did not route, as -1 rows), as every engine format read here holds them: so row t is at place
    t, as a capture's rows are at the places their forward gave them. Sliced without their token ids (a sequence-
    or context-parallel rank's rows), they are then forced only on tokens fed at those places, and another rank's
    slice, or chunks fed as one run, are refused instead of forced on the wrong tokens.

    An array whose every route is expert 0 over many tokens is refused as never written (top-1
    routers pass the duplicate check there), and so is one router's column whose every route
    over as many tokens is expert 0 (a pipeline stage whose routes were never gathered leaves
    its layers' columns zero while the other layers hold real routes).
    """
    written = [x[x[:, 0] >= 0] for x in layers]  # (-1 rows: routed natively, not written)
    cells = sum(x.shape[0] for x in written)
    if cells >= _UNWRITTEN_CELLS and max(lm.num_experts, default=0) > 1 and not any(bool(x.any()) for x in written):
        raise RoutesValidationError(
            f"{what}: every route is expert 0 ({cells} token x router routes): the zeros an engine leaves where "
            "its routing capture did not run (a fused or monolithic MoE kernel that records nothing, a pipeline "
            "stage whose routes were never gathered). Check that the engine records routes for every MoE layer; "
            "where a model does send every token to expert 0, build the routes with mr.Routes(...)"
        )
    for nm, i, e, x in zip(lm.names, lm.layers, lm.num_experts, written, strict=True):
        if e > 1 and x.shape[0] >= _UNWRITTEN_CELLS and not bool(x.any()):
            raise RoutesValidationError(
                f"{what}: router '{nm}' (hidden layer {i}) sends all {x.shape[0]} of its routed tokens to expert 0, "
                "while other routers' routes vary: the zeros an engine leaves in a layer's column that was never "
                "written (a pipeline stage whose routes were not gathered, a layer run by a kernel that records "
                "nothing). Check that the engine records routes for every MoE layer; where this router does send "
                "every token to expert 0, build the routes with mr.Routes(...)"
            )
    for nm, i, k, x in zip(lm.names, lm.layers, lm.top_k, written, strict=True):
        if k > 1 and x.shape[0] and not bool(x.any()):
            # (k zeros repeat expert 0: no route, but the zeros an engine leaves where no router wrote)
            raise RoutesValidationError(
                f"{what}: every one of the {x.shape[0]} rows of router '{nm}' (hidden layer {i}) is {k} zeros, which "
                "no router writes (expert 0 repeated) but an engine leaves in a dense layer's column, or one never "
                f"written. The payload is of a model with no router at layer {i} (another revision: a dense layer "
                "there, fewer or other MoE layers), or the engine recorded nothing for it. Check that the LayerMap "
                "(num_layers, layers=) is of the model that wrote the payload"
            )
    try:
        routes = Routes(layers, names=lm.names, num_experts=lm.num_experts)
    except RoutesValidationError as e:
        raise RoutesValidationError(f"{what}: {e}") from None
    routes._seq_pos = torch.arange(routes.num_tokens)
    return routes


def ordered(routes: Routes, lm: LayerMap) -> list[torch.Tensor | None]:
    """Routes' rows in the map's router order (None for MTP routers), in the order of their tokens.

    Rows of routes built with ``validate=False`` are checked first (a row mixing -1 with
    experts, a repeated expert): an engine format would carry them on, a -1 in uint8 as 255.
    Engine formats hold a sequence's rows in the order of its tokens, and keep no token ids
    that would show others: the rows of routers that saw the tokens sequence-first are put
    in that order (:func:`~moe_replay.routes.in_token_order`).
    """
    if not isinstance(routes, Routes):
        raise RoutesValidationError(f"expected Routes, got {type(routes).__name__}")
    routes = in_token_order(routes, "an engine format")
    routes._ensure_valid()
    missing = [n for n in lm.names if n not in routes.names and n not in lm.extra_names]
    if missing:
        raise RoutesValidationError(
            f"the routes hold no rows for routers {missing[:4]} of the LayerMap ({len(missing)} of its "
            f"{len(lm.names)}); they hold {list(routes.names[:4])}{' ...' if len(routes.names) > 4 else ''}. An "
            "engine format has a column for every router of the map: pass routes of every router (a capture of the "
            "whole model, not a pipeline stage's), or build the map of the routers these routes hold "
            "(LayerMap.from_routes(routes, num_layers))"
        )
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
                f"{routes.k_per_layer[j]}, the LayerMap {e} and k={k}: they are of another model (or the map was "
                "built with other counts). Build the map from the model that recorded these routes "
                "(LayerMap.from_session, or LayerMap.from_routes(routes, num_layers))"
            )
        out.append(routes.layer(nm))
    return out


def to_array(routes: Routes, lm: LayerMap, layout: str, dtype: Any, what: str, *, allow_missing: bool) -> np.ndarray:
    """``[T, width, k]`` engine array of ``dtype``; dense columns 0, as engines leave them.

    A -1 row ("route natively") is written as -1 when ``allow_missing`` and the dtype is
    signed; otherwise it is refused: the engine format has no such row.
    """
    check_layout(layout)
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        raise RoutesValidationError(f"dtype must be an integer dtype, got {dt}")
    if lm.max_experts - 1 > np.iinfo(dt).max:
        raise RoutesValidationError(f"{dt} cannot hold expert index {lm.max_experts - 1}; use a wider dtype")
    arr = np.zeros((routes.num_tokens, lm.width(layout), lm.k), dtype=np.int64)
    for nm, rows in zip(lm.names, ordered(routes, lm), strict=True):
        if rows is None:
            continue
        hole = (rows < 0).all(dim=1)
        if bool(hole.any()) and not (allow_missing and np.iinfo(dt).min < 0):
            first = int(hole.nonzero()[0, 0])
            raise RoutesValidationError(
                f"{what}: router '{nm}' has no route for token {first} (a -1 row), and this format has no row "
                "meaning 'route natively'. Write only tokens that hold routes (prompt_start=/start_len= skip "
                "leading ones), or fill them first"
            )
        arr[:, lm.column(nm, layout)] = rows.numpy()
    return arr.astype(dt)


def cut_last(routes: Routes, drop: bool, fmt: str) -> Routes:
    """The routes without the last token's row, which engines never write (the rows in the order of their tokens,
    as :func:`ordered` puts them)."""
    if not isinstance(routes, Routes):
        raise RoutesValidationError(f"expected Routes, got {type(routes).__name__}")
    routes = in_token_order(routes, fmt)
    drop = check_flag(drop, f"{fmt}: drop_last")
    if routes.num_tokens == 0:
        raise RoutesValidationError(f"{fmt}: the routes hold no token")
    if not drop and not bool(routes[-1].missing.all()):
        raise RoutesValidationError(
            f"{fmt} has no row for the last token (engines never route it), but these routes hold a route for "
            "it (a capture of a training forward?). Pass drop_last=True to drop that row"
        )
    return routes[: routes.num_tokens - 1]


def skip_front(routes: Routes, start: int, what: str, name: str) -> Routes:
    """Routes from token ``start`` on (the rows an engine asked to start there writes), in the order of their
    tokens."""
    routes = in_token_order(routes, what)
    start = check_start(start, name)
    if start > routes.num_tokens:
        raise RoutesValidationError(f"{what}: {name}={start} is past the {routes.num_tokens} tokens of the routes")
    return routes[start:]


def check_routed_rows(arr: np.ndarray, num_tokens: int, what: str) -> None:
    """``arr`` holds one row per token of a sequence of ``num_tokens`` but the last (which engines never route)."""
    rows = arr.shape[0] if arr.ndim else 0
    if num_tokens < 1:
        raise RoutesValidationError(
            f"num_tokens={num_tokens}, but a sequence has at least one token ({what} has {rows} rows, so "
            f"{rows + 1} would fit)"
        )
    if arr.ndim < 1 or rows != num_tokens - 1:
        raise RoutesValidationError(
            f"{what} has {rows} rows; a sequence of {num_tokens} tokens has {num_tokens - 1} (the last token is "
            f"never routed). Check num_tokens, and that the array is [tokens, layers, k] (not [layers, tokens, k])"
        )


def check_start(start: int, name: str) -> int:
    """A non-negative integer offset."""
    # (a numpy integer or a 0-d integer tensor is the offset it holds, as to_verl's widths and fill take it)
    if not is_integer(start) or not 0 <= int(start) <= MAX_COUNT:
        raise RoutesValidationError(f"{name} must be an integer >= 0 (a token count), got {start!r}")
    return int(start)


def with_front(layers: list[torch.Tensor], start: int) -> list[torch.Tensor]:
    """Prepend ``start`` -1 rows: leading tokens the engine was asked not to return."""
    return [torch.cat([torch.full((int(start), x.shape[1]), -1, dtype=x.dtype), x]) for x in layers]


def with_last(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Append a -1 row: the last token, which no forward routed."""
    return [torch.cat([x, torch.full((1, x.shape[1]), -1, dtype=x.dtype)]) for x in layers]


def rows_untold(routes: Routes, reader: str) -> Routes:
    """``routes``, marked as placed on their tokens by their row count alone (``reader`` read them without a token
    count or id): a replay with ``strict=False`` that leaves rows of them unread is refused, since a row too many at
    the front would have shifted every token's experts. Nor do their rows keep places (``Routes._seq_pos``): where
    the sequence's token count is not known, neither is the token its first row is, so a slice that drops rows at
    the front (``routes[1:]``, the rows the caller chose) is checked by its count alone."""
    routes._rows_untold = reader
    routes._seq_pos = None
    return routes


def one_of_many(value: Any, reader: str, holds: str) -> str:
    """What to do with ``value`` given to ``reader``, which reads one sequence, where it is a list or tuple of them (an
    engine call's batch: one output per prompt or sample); an empty string for anything else."""
    if not isinstance(value, list | tuple):
        return ""
    return (
        f": a {type(value).__name__} of {len(value)}, as a batched engine call returns them ({holds}), but {reader} "
        f"reads one sequence. Read each: [{reader}(x, layer_map) for x in outputs]"
    )


#: The axes of an engine array as engines write it: one row per token, one column per layer, k experts.
ENGINE_AXES = ("tokens", "layers", "k")


def axes_names(axes: str, what: str) -> tuple[str, ...]:
    """The axis names of ``axes=`` (a permutation of ``"tokens,layers,k"``), in its order."""
    names = tuple(a.strip() for a in axes.split(",")) if isinstance(axes, str) else ()
    if sorted(names) != sorted(ENGINE_AXES):
        raise RoutesValidationError(
            f"{what}: axes={axes!r:.60}, but axes names the order of the array's three axes, a permutation of "
            "'tokens,layers,k' (as engines write it; 'layers,tokens,k' for a stack of per-layer arrays)"
        )
    return names


def in_axes(arr: np.ndarray, axes: str | None, what: str) -> np.ndarray:
    """``arr`` with its axes put in the engine order ``[tokens, layers, k]``, where ``axes`` names the order it is in
    (a permutation of ``"tokens,layers,k"``, e.g. ``"layers,tokens,k"`` for a stack of per-layer arrays); ``arr``
    itself where ``axes`` is None (its order is then proven by :func:`check_axes`, or refused)."""
    if axes is None:
        return arr
    names = axes_names(axes, what)
    if arr.ndim != 3:
        raise RoutesValidationError(f"{what}: axes={axes!r} names three axes, but the array has shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose([names.index(a) for a in ENGINE_AXES]))


#: The other orders an engine array's axes come in: a stack of per-layer ``[tokens, k]`` arrays on the first axis
#: (Megatron's list, ``torch.stack(per_layer)``) or on the last (``torch.stack(per_layer, dim=-1)``).
_MISTAKEN_AXES = (("layers", "tokens", "k"), ("tokens", "k", "layers"))


def _fits_map(arr: np.ndarray, lm: LayerMap, layout: str) -> bool:
    """Whether ``arr``, read as ``[tokens, width, k]``, could be an engine's array for ``lm``: dense columns zero
    (layout "all"), every router's column of experts it has, no expert twice in a row of k. Rows all -1 or all 0 are
    passed over (no route, or a row an engine left unwritten), so that they never prove an order."""
    rows = arr.astype(np.int64)
    if layout == "all" and lm.dense_layers and (rows[:, list(lm.dense_layers)] != 0).any():
        return False
    for nm, e in zip(lm.names, lm.num_experts, strict=True):
        col = lm.column(nm, layout)
        if col is None:
            continue
        x = rows[:, col]
        x = x[~((x == -1).all(axis=1) | (x == 0).all(axis=1))]
        if x.size and (x.min() < 0 or x.max() >= e):
            return False
        s = np.sort(x, axis=1)
        if x.shape[1] > 1 and (s[:, 1:] == s[:, :-1]).any():
            return False
    return True


def _fits_framed(
    arr: np.ndarray, lm: LayerMap, layout: str, body: Callable[[np.ndarray], np.ndarray | None] | None
) -> bool:
    """:func:`_fits_map` of the rows ``body`` keeps of ``arr`` (all of them without ``body``)."""
    rows = arr if body is None else body(arr)
    return rows is not None and _fits_map(rows, lm, layout)


def check_axes(
    arr: np.ndarray,
    lm: LayerMap,
    layout: str,
    what: str,
    *,
    told: bool,
    hint: str = "",
    body: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> None:
    """Refuse an array whose axes order its data does not prove, where another order fits the same shape.

    An array ``[tokens, width, k]`` with as many tokens as layer columns (or as many columns as
    k) has the shape of its own transpose: a stack of per-layer arrays ``[layers, tokens, k]``
    would be read without complaint, every token given another token's experts. Unless the order was told
    (``told``: ``axes=``, or the engine's own output, which holds its array as the engine
    writes it), every other order that fits is read too: the array is taken as ``[tokens,
    layers, k]`` where that reading fits the map (dense columns zero, experts in range, none
    twice in a row) and no other does. ``hint`` adds another way to settle it. ``body`` takes a
    reading to the rows that must fit the map, or None where the format's own frame does not
    fit it (NeMo-RL's placeholder last row).
    """
    if told or arr.ndim != 3 or not arr.size or arr.shape[1:] != (lm.width(layout), lm.k):
        return  # (a shape that fits no order of the map is refused by check_shape)
    others = []
    for names in _MISTAKEN_AXES:
        alt = arr.transpose([names.index(a) for a in ENGINE_AXES])
        if alt.shape == arr.shape and not np.array_equal(alt, arr) and _fits_framed(alt, lm, layout, body):
            others.append(",".join(names))
    if not others:
        return
    if not _fits_framed(arr, lm, layout, body):
        # (read in the engine's order the array fits no map: the reason the checks give, and the order it does fit)
        rows = arr if body is None else body(arr)
        try:
            if rows is not None:
                make_routes(columns(rows, lm, layout, what, negative_ok=True), lm, what)
        except RoutesValidationError as e:
            raise RoutesValidationError(
                f"{e}. Read as [{others[0]}] instead, the array fits the LayerMap: if it was made so (a stack of "
                f"per-layer arrays), pass axes='{others[0]}'{hint}"
            ) from None
        return
    shape = f"{tuple(arr.shape)} ({arr.shape[0]} rows, {arr.shape[1]} layer columns, k={arr.shape[2]})"
    raise RoutesValidationError(
        f"{what} of shape {shape} cannot tell its axes: read as [tokens, layers, k] (as engines write it) or as "
        f"[{others[0]}] (e.g. a stack of per-layer arrays) it fits the LayerMap either way, and each reading gives "
        f"every token other experts. Nothing else known settles it (no dense layer column, no expert out of range "
        f"or repeated in either reading). Pass axes='tokens,layers,k' if the engine wrote it, axes='{others[0]}' "
        f"if it was stacked per layer{hint}"
    )
