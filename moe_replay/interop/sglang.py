"""SGLang's ``meta_info["routed_experts"]`` (read from SGLang 0.5.23).

Base64 of the raw bytes of a flat, row-major **int32** array
``[seq_len - 1 - routed_experts_start_len, num_hidden_layers, k]``: all hidden layers
(dense columns zero), fused shared-expert slots cut off, no dtype field. Prefix-cached
tokens carry the routes recorded when their KV slot was computed. docs/formats.md cites
the source of each fact.

Example:
    >>> import base64, numpy as np, moe_replay as mr
    >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    >>> rows = np.array([[[0, 0], [0, 3]], [[0, 0], [2, 1]]], np.int32)   # 3 tokens, 2 hidden layers
    >>> meta_info = {"routed_experts": base64.b64encode(rows.tobytes()).decode()}
    >>> r = mr.interop.from_sglang(meta_info, lm, num_tokens=3)
    >>> r.layer("model.layers.1.mlp.gate").tolist()
    [[0, 3], [2, 1], [-1, -1]]
    >>> mr.interop.to_sglang(r, lm) == meta_info
    True
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_count, check_values, is_collection, is_integer
from ..errors import ArgumentTypeError, RoutesValidationError
from ..routes import Routes
from ._common import (
    axes_names,
    b64_bytes,
    check_start,
    columns,
    cut_last,
    in_axes,
    make_routes,
    one_of_many,
    rows_untold,
    skip_front,
    to_array,
    with_front,
    with_last,
)
from .layer_map import LayerMap, check_map

__all__ = ["from_sglang", "to_sglang"]


def _payload(response: Mapping[str, Any] | str | bytes) -> tuple[str | bytes, tuple[int, int] | None]:
    """The base64 payload, and the most and fewest tokens its rows may cover where ``meta_info`` says them (else
    None)."""
    if isinstance(response, str | bytes):
        return response, None
    if not isinstance(response, Mapping):
        raise RoutesValidationError(
            f"expected an SGLang response or meta_info dict, got {type(response).__name__}"
            + one_of_many(
                response, "from_sglang", "a /generate of a batch or of n > 1 samples returns one response each"
            )
        )
    meta = response.get("meta_info", response)
    if not isinstance(meta, Mapping) or meta.get("routed_experts") is None:
        raise RoutesValidationError(
            "meta_info has no routed_experts: launch SGLang with --enable-return-routed-experts and send "
            "return_routed_experts=True"
        )
    sent = meta.get("routed_experts_dtype")
    if sent is not None and str(sent).lower() != "int32":
        raise RoutesValidationError(
            f"meta_info says routed_experts_dtype={sent!r}; SGLang (up to 0.5.23) sends no such field and always "
            "writes int32. This payload was re-encoded by something else: decode it there"
        )
    payload = meta["routed_experts"]
    if not isinstance(payload, str | bytes):
        raise RoutesValidationError(
            f"meta_info['routed_experts'] is a {type(payload).__name__}; SGLang sends a base64 string of int32 "
            "bytes. Decoded or re-encoded data came from elsewhere: read it there"
        )
    return payload, _meta_tokens(meta)


def _meta_tokens(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """The most and the fewest tokens SGLang's rows may cover, by ``meta_info``'s ``prompt_tokens`` and
    ``completion_tokens``.

    SGLang sends ``prompt_tokens = len(origin_input_ids)`` and a ``completion_tokens`` that
    is ``len(output_ids_through_stop)`` in recent releases and ``len(output_ids)`` (which a
    stop string may leave longer than the rows' sequence) in earlier ones. So their sum bounds
    the rows' sequence from above: more rows are refused. The prompt is always prefilled and
    routed (prefix-cached tokens carry the routes recorded in their KV slot), and a stop keeps
    the token that completes it: the rows' sequence holds the whole prompt, plus one token
    where any was generated. Fewer rows than that are not a stop string's trim but another
    model's payload (fewer layers or a smaller k read as fewer rows of this model's width) or a
    ``start_len`` not given: refused. None where either count is absent (or null); a count that is
    there but no count (``5.0`` from a table's float column, ``"5"`` from a text field, a negative
    number) is refused, never read as absent: the check it gives would be dropped without a word.
    """
    counts: list[Any] = [meta.get("prompt_tokens"), meta.get("completion_tokens")]
    if any(c is None for c in counts):
        return None
    for key, c in zip(("prompt_tokens", "completion_tokens"), counts, strict=True):
        if not is_integer(c) or int(c) < 0:
            raise RoutesValidationError(
                f"meta_info's {key} is {c!r:.40} ({type(c).__name__}), not a token count: SGLang sends non-negative "
                "integers, so this meta_info was rebuilt elsewhere (a table's float column, a text field). Give the "
                f"counts as ints (int(meta_info[{key!r}]) where it holds a whole number), or drop them and pass "
                "num_tokens=, which checks the rows alike"
            )
    prompt, completion = int(counts[0]), int(counts[1])
    return prompt + completion, prompt + min(completion, 1)


def _id_count(token_ids: Any) -> np.ndarray | torch.Tensor | list[Any]:
    """``token_ids`` flattened to one entry per token (their values are checked by ``with_token_ids``)."""
    if isinstance(token_ids, torch.Tensor):
        check_values(token_ids, "from_sglang: token_ids")  # (meta, sparse, nested, quantized: no ids to read)
        return token_ids.detach().reshape(-1)
    if isinstance(token_ids, np.ndarray):
        return token_ids.reshape(-1)
    if not is_collection(token_ids) or isinstance(token_ids, Mapping):  # (a dict's keys are no ids in order)
        raise ArgumentTypeError(
            f"from_sglang: token_ids must be the sequence's token ids (a list, array or tensor), got "
            f"{type(token_ids).__name__}"
        )
    return list(token_ids)


def _check_rows(rows: int, start: int, expected: int, source: str, lm: LayerMap, at_most: bool = False) -> None:
    """SGLang's ``rows`` fit a sequence of ``expected`` tokens with ``start_len=start`` (``source`` says who said so);
    ``at_most``: ``expected`` is an upper bound, and fewer rows fit too (down to what :func:`_check_fewest` allows).

    Checked before any row is read: a count that does not fit is refused here, not by a replay
    that runs out of rows (or has rows left) after its forwards.
    """
    if expected < 1:
        raise RoutesValidationError(
            f"{source} gives a sequence of {expected} tokens; SGLang routes sequences of at least one token"
        )
    if start > expected - 1:
        raise RoutesValidationError(
            f"start_len={start} is past the {expected - 1} routed tokens of a sequence of {expected} ({source}); "
            "SGLang takes routed_experts_start_len within the prompt. Pass the request's routed_experts_start_len"
        )
    want = expected - 1 - start
    if rows == want or (at_most and rows < want):
        return
    hint = ""
    if at_most:
        hint = " at most: the rows hold more tokens than the response"
    elif not start and rows < want:
        hint = f". If the request set routed_experts_start_len, pass start_len={want - rows}"
    elif start and rows == want + start:
        hint = ". The rows cover the whole sequence: did the request set routed_experts_start_len?"
    if source.startswith("token_ids"):
        hint += ". token_ids are the prompt's input_ids then the response's output_ids, one per token"
    # (the payload holds no shape: a model with other layers or another k reads as another row count)
    hint += (
        f". Rows are counted in num_hidden_layers*k = {lm.num_layers}*{lm.k} int32 values of the LayerMap: a payload "
        "of a model with other layers or another k reads as another count"
    )
    raise RoutesValidationError(
        f"SGLang routed_experts has {rows} rows; a sequence of {expected} tokens ({source}) with start_len={start} "
        f"has {want} (the last token is never routed); these rows fit {rows + 1 + start} tokens{hint}"
    )


def _check_fewest(rows: int, start: int, fewest: int, lm: LayerMap) -> None:
    """SGLang's ``rows`` cover at least ``fewest`` tokens with ``start_len=start``: the prompt, and a generated token
    where ``meta_info`` counts any (see :func:`_meta_tokens`)."""
    want = fewest - 1 - start
    if rows >= want:
        return
    hint = ""
    if not start:
        hint = f", or the request set routed_experts_start_len (then pass start_len={fewest - 1 - rows})"
    raise RoutesValidationError(
        f"SGLang routed_experts has {rows} rows of num_hidden_layers*k = {lm.num_layers}*{lm.k} int32 values, but "
        f"meta_info's prompt_tokens and completion_tokens say they cover at least {fewest} tokens (the prompt is "
        f"always routed, and a stop keeps the token that completes it): {want} rows with start_len={start}. A stop "
        f"string's trim leaves no fewer. The payload is of another model than the LayerMap's (fewer layers or a "
        f"smaller k: check the LayerMap's num_layers and k){hint}"
    )


def from_sglang(
    response: Mapping[str, Any] | str | bytes,
    layer_map: LayerMap,
    *,
    num_tokens: int | None = None,
    start_len: int = 0,
    token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    axes: str | None = None,
) -> Routes:
    """Routes of one sequence from SGLang's ``meta_info["routed_experts"]``.

    Args:
        response: a ``/generate`` response (with ``meta_info``), its ``meta_info``, or the
            base64 string itself. Each of ``n > 1`` samples is its own response.
        num_tokens: prompt plus completion length (as returned, after stop trimming), to
            check the row count: SGLang writes ``num_tokens - 1 - start_len`` rows. A
            response or ``meta_info`` holding SGLang's ``prompt_tokens`` and
            ``completion_tokens`` bounds that count itself (more rows are refused; fewer may
            be a stop string's trim, which only ``num_tokens`` tells, but never fewer than the
            prompt and one generated token: those are another model's payload, refused). Without ``num_tokens``
            (nor token ids, nor counts that fit the rows exactly) the rows are taken as the
            sequence: only the replay's row count refuses a row too many or too few, and a
            replay with ``strict=False`` that leaves rows of them unread is refused (a row too
            many at the front would shift every token's experts): slice them, ``routes[:n]``,
            for a partial replay.
        start_len: the request's ``routed_experts_start_len``: tokens left out at the
            front; they get -1 rows.
        token_ids: the sequence's ids, prompt then completion (the ``input_ids`` sent, then
            the response's ``output_ids``), one per token: the routes then know their tokens
            (:attr:`~moe_replay.Routes.token_ids`), and a replay fed other tokens is refused.
            SGLang's response holds the completion's ids but not the prompt's: given a whole
            ``/generate`` response (with ``output_ids`` and ``meta_info["prompt_tokens"]``), the
            routes know its ``output_ids`` (-1 for the prompt's tokens) without ``token_ids=``;
            ``token_ids=`` given too must name the same completion ids.
        axes: the order of the flat array's axes, ``"tokens,layers,k"`` as SGLang writes it (the
            default), or another order of those names (``"layers,tokens,k"``: the bytes of a stack
            of per-layer arrays). The payload is SGLang's wire encoding and holds no shape, so it is
            read in SGLang's order unless told otherwise: bytes made by other code than SGLang's
            (or :func:`to_sglang`) must say their order here.

    Returns:
        ``start_len + rows + 1`` tokens; the first ``start_len`` and the last are -1. Row t is
        token t of the sequence and keeps that place: sliced without token ids (a
        sequence-parallel rank's rows), it is forced only on a token fed at place t.

    Raises:
        RoutesValidationError: not base64, a size that is not whole rows of
            ``num_hidden_layers * k`` int32 values, a row count that does not fit
            ``num_tokens`` or ``token_ids``, more rows than ``meta_info``'s token counts
            allow or fewer than its prompt (checked before any row is read), a ``meta_info``
            token count that is no count (``5.0``, ``"5"``, negative), a dense layer's
            column holding experts, invalid experts;
            a response's ``output_ids`` that are not token ids, that no ``prompt_tokens`` places, that
            name fewer tokens than the rows cover, or that ``token_ids=`` contradicts.
    """
    check_map(layer_map, "from_sglang")
    start = check_start(start_len, "start_len")
    payload, meta_count = _payload(response)
    # (tokens, who says so, whether only an upper bound): every count given must fit the rows
    counts: list[tuple[int, str, bool]] = []
    if num_tokens is not None:
        counts.append((check_count(num_tokens, "num_tokens"), f"num_tokens={int(num_tokens)}", False))
    ids = None
    if token_ids is not None:
        ids = _id_count(token_ids)
        counts.append((len(ids), f"token_ids holds {len(ids)} ids", False))
    if meta_count is not None:
        counts.append((meta_count[0], "meta_info's prompt_tokens + completion_tokens", True))
    raw = b64_bytes(payload, "SGLang routed_experts", "SGLang sends base64 of the sequence's int32 rows")
    width, k = layer_map.num_layers, layer_map.k
    if len(raw) % (4 * width * k):
        raise RoutesValidationError(
            f"SGLang routed_experts holds {len(raw)} bytes, not whole rows of num_hidden_layers*k = {width}*{k} "
            "int32 values: check the LayerMap's num_layers and k"
        )
    flat = np.frombuffer(raw, dtype="<i4")
    if axes is None:
        arr = flat.reshape(-1, width, k)
    else:
        sizes = {"tokens": -1, "layers": width, "k": k}
        arr = in_axes(flat.reshape([sizes[a] for a in axes_names(axes, "SGLang routed_experts")]), axes, "SGLang")
    for expected, source, at_most in counts:
        _check_rows(arr.shape[0], start, expected, source, layer_map, at_most)
    if meta_count is not None:
        _check_fewest(arr.shape[0], start, meta_count[1], layer_map)
    layers = columns(arr, layer_map, "all", "SGLang routed_experts")
    routes = make_routes(with_last(with_front(layers, start)), layer_map, "SGLang routed_experts")
    told = _response_ids(response, routes.num_tokens)
    if told is not None and ids is not None:
        _check_agree(told, ids)
    if ids is None:
        ids = told
    if ids is not None:
        given = "from_sglang: token_ids" if token_ids is not None else "from_sglang: the response's output_ids"
        return routes._with_token_ids(ids, given)
    # (meta_info's counts bound the rows; they place them only where they count exactly as many tokens)
    if num_tokens is not None or (meta_count is not None and meta_count[0] == routes.num_tokens):
        return routes
    return rows_untold(routes, "from_sglang")


def _response_ids(response: Any, num_tokens: int) -> list[int] | None:
    """The ids of the ``num_tokens`` tokens SGLang's rows cover, as a full ``/generate`` response names them:
    -1 for each of ``meta_info["prompt_tokens"]`` prompt tokens (SGLang sends no prompt ids), then its
    ``output_ids``. None for a ``meta_info`` or a payload alone (they hold no ids).

    The rows cover the first tokens of the prompt and ``output_ids`` (SGLang sends ``output_ids``
    through the stop; an earlier release's rows may stop short of them, never go past them), so the ids
    are taken from the front. ``output_ids`` naming fewer tokens than the rows cover (an incrementally
    streamed chunk's new tokens only), or a response without ``prompt_tokens`` to place them, is refused:
    ids placed by a guess would check a replay against the wrong tokens.
    """
    if not isinstance(response, Mapping) or "meta_info" not in response or response.get("output_ids") is None:
        return None
    outs = response["output_ids"]
    if isinstance(outs, torch.Tensor | np.ndarray):
        outs = outs.reshape(-1).tolist()
    if not is_collection(outs) or isinstance(outs, Mapping | str | bytes):
        raise RoutesValidationError(
            f"the response's output_ids is a {type(outs).__name__}; SGLang sends the completion's token ids as a list"
        )
    outs = list(outs)
    bad = [t for t in outs if not is_integer(t) or int(t) < 0]
    if bad:
        raise RoutesValidationError(
            f"the response's output_ids holds {bad[0]!r:.40} ({type(bad[0]).__name__}), not a token id; SGLang sends "
            "non-negative integers: a response rebuilt elsewhere. Fix it, or drop output_ids and pass token_ids="
        )
    meta = response["meta_info"]
    prompt: Any = meta.get("prompt_tokens") if isinstance(meta, Mapping) else None
    if not is_integer(prompt) or int(prompt) < 0:
        raise RoutesValidationError(
            f"the response holds output_ids but its meta_info has no prompt_tokens count (got {prompt!r:.40}), which "
            "SGLang always sends: the completion's ids cannot be placed among the tokens. Pass "
            "token_ids= (the prompt's input_ids, then output_ids), or the meta_info alone"
        )
    told = [-1] * int(prompt) + [int(t) for t in outs]
    if len(told) < num_tokens:
        raise RoutesValidationError(
            f"the response's output_ids hold {len(outs)} ids after a prompt of {int(prompt)} tokens, but its rows "
            f"cover {num_tokens} tokens: output_ids of an incrementally streamed chunk (only its new tokens)? Pass "
            "token_ids= (the prompt's input_ids, then every output id), or the meta_info alone"
        )
    return told[:num_tokens]


def _check_agree(told: list[int], given: Any) -> None:
    """``token_ids=`` names the tokens the response names (where it names one)."""
    ids = given.tolist() if isinstance(given, torch.Tensor | np.ndarray) else list(given)
    for i, (a, b) in enumerate(zip(told, ids, strict=True)):
        if a >= 0 and not (is_integer(b) and int(b) == a):
            raise RoutesValidationError(
                f"token_ids[{i}] is {b!r:.40}, but the response's output_ids name token {a} there: the ids are of "
                "another sequence, or out of order"
            )


def to_sglang(routes: Routes, layer_map: LayerMap, *, start_len: int = 0, drop_last: bool = False) -> dict[str, str]:
    """SGLang's ``{"routed_experts": base64}`` for one sequence: int32, all hidden layers.

    Rows from ``start_len`` to the second-to-last token; the last token's row must be -1
    unless ``drop_last=True``, and every written row must hold a route.
    """
    check_map(layer_map, "to_sglang")
    body = skip_front(cut_last(routes, drop_last, "SGLang routed_experts"), start_len, "to_sglang", "start_len")
    arr = to_array(body, layer_map, "all", np.dtype("<i4"), "SGLang routed_experts", allow_missing=False)
    return {"routed_experts": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()}
