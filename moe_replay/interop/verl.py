"""verl's batch ``routed_experts`` (read from verl 0.9.1).

The agent loop stores ``[batch, prompt_width + response_width, layers, k]`` **int16**:
each sequence's engine rows placed from ``prompt_width - len(prompt_ids)`` (prompt
left-padded, response right-padded), zeros everywhere else, including the last token's
row, which the engine does not return. ``layers`` is what the engine returned: all hidden
layers for SGLang and vLLM 0.22+. docs/formats.md cites the source of each fact.

Example:
    >>> import torch, moe_replay as mr
    >>> r = mr.Routes([torch.tensor([[0, 1], [2, 3], [-1, -1]])], names=["model.layers.0.mlp.gate"], num_experts=4)
    >>> lm = mr.LayerMap.from_routes(r, num_layers=1)
    >>> batch = mr.interop.to_verl([r], lm, prompt_lengths=[2], prompt_width=3)
    >>> batch.dtype, tuple(batch.shape)
    (torch.int16, (1, 4, 1, 2))
    >>> mask = torch.tensor([[0, 1, 1, 1]])
    >>> mr.interop.from_verl(batch, mask, lm)[0].equal(r)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._checks import MAX_COUNT, as_tensor, check_count, check_flag, check_values, is_integer
from .._progress import check, steps
from ..batch import BatchLayout, _lengths, check_same_routers, routes_list
from ..errors import ArgumentTypeError, RoutesValidationError
from ..routes import Routes, check_exact
from ._common import ENGINE_AXES, as_array, axes_names, check_axes, columns, make_routes, to_array
from .layer_map import LayerMap, check_map

__all__ = ["from_verl", "to_verl"]


def to_verl(
    sequences: Sequence[Routes],
    layer_map: LayerMap,
    *,
    prompt_lengths: Sequence[int] | torch.Tensor,
    prompt_width: int | None = None,
    response_width: int | None = None,
    layout: str = "all",
    fill: int = 0,
    dtype: torch.dtype = torch.int16,
    progress: bool | None = None,
) -> torch.Tensor:
    """verl's batch ``routed_experts`` ``[batch, prompt_width + response_width, layers, k]``.

    Each sequence's prompt is left-padded to ``prompt_width`` and its response
    right-padded. ``layout`` is the engine's: "all" hidden layers (SGLang, vLLM 0.22+ and
    <= 0.20) or "moe" layers (vLLM 0.21). Padding is written as ``fill`` (0, as verl does);
    rows without a route keep -1 (moe_replay's "route natively"; verl itself writes 0
    for the last token). ``dtype`` is int16, as verl stores it; a dtype that cannot hold
    every value exactly (bool, uint8 and -1 rows or ``fill=300``) is refused, as
    :meth:`Routes.to_numpy` refuses it, rather than wrapped around.

    ``axes`` names the order of each sequence's three axes after the batch's,
    ``"tokens,layers,k"`` as verl writes it, or another order of those names
    (``"layers,tokens,k"``: ``[batch, layers, seq, k]``). It is needed only where a
    sequence's data cannot prove it: a batch as wide as the layer count (or with as many
    layers as k) whose sequences fit the LayerMap read in either order is refused without it.

    ``progress`` draws a bar over the sequences on stderr (``tqdm``'s where installed): ``None``
    shows it where stderr is a terminal (``MOE_REPLAY_PROGRESS=0`` or ``1`` decides instead
    where set), ``True`` always, ``False`` never. It changes nothing else.

    Raises:
        RoutesValidationError: the sequences do not fit the map or the layout, ``dtype``
            would change a value or is no integer dtype.
    """
    check_map(layer_map, "to_verl")
    progress = check(progress, "to_verl")
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"to_verl: dtype must be a torch.dtype (torch.int16, as verl stores it), got {dtype!r}")
    if dtype not in _INTEGER_DTYPES:
        raise RoutesValidationError(
            f"to_verl(dtype={dtype}): verl stores routed_experts as integers (int16, uint8 views to send them), and "
            "from_verl reads only integer arrays, so this batch could not be read back. Pick an integer dtype: "
            "torch.int16, as verl stores it"
        )
    if not is_integer(fill):
        raise ArgumentTypeError(f"to_verl: fill must be an integer (the padding value, 0 as verl writes), got {fill!r}")
    if not -MAX_COUNT - 1 <= int(fill) <= MAX_COUNT:
        raise RoutesValidationError(f"to_verl: fill={fill} fits no integer dtype; use 0, as verl writes")
    seqs = routes_list(sequences)
    try:
        check_same_routers(seqs)
    except (TypeError, ValueError) as e:
        raise RoutesValidationError(f"to_verl: {e}") from None
    lengths = [s.num_tokens for s in seqs]
    row_length = None
    try:
        if response_width is not None:  # an integer: 2.5 is refused, never cut to 2
            prompts = _lengths(prompt_lengths, "prompt_lengths")
            pw = max(prompts) if prompt_width is None else check_count(prompt_width, "prompt_width")
            row_length = pw + check_count(response_width, "response_width")
            _check_response_width(prompts, lengths, int(response_width))
        bl = BatchLayout.split(prompt_lengths, lengths, prompt_width=prompt_width, row_length=row_length)
    except ValueError as e:
        raise RoutesValidationError(f"to_verl: {e}") from None
    width, k = layer_map.width(layout), layer_map.k
    pad = _exactly(np.array(int(fill)), dtype, f"to_verl(dtype={dtype}): fill={fill}")
    out = torch.full((bl.rows, bl.row_length, width, k), pad.item(), dtype=dtype)
    for i in steps(len(seqs), "moe_replay: to_verl", progress):
        seq, (r, s, n) = seqs[i], bl.placements[i]
        arr = to_array(seq, layer_map, layout, np.int64, f"verl sequence {i}", allow_missing=True)
        out[r, s : s + n] = _exactly(arr, dtype, f"to_verl(dtype={dtype}): verl sequence {i}")
    return out


def _check_response_width(prompts: Sequence[int], lengths: Sequence[int], width: int) -> None:
    """Refuse a ``response_width`` narrower than a sequence's response, naming it (not the row length it makes).

    Counts that do not pair up (another number of prompts, a sequence shorter than its prompt) are left to
    :meth:`BatchLayout.split`, which names them.
    """
    if len(prompts) != len(lengths):
        return
    responses = [n - p for p, n in zip(prompts, lengths, strict=True)]
    longest = max(responses, default=0)
    if longest > width:
        i = responses.index(longest)
        raise RoutesValidationError(
            f"to_verl: response_width={width} is narrower than the response of sequence {i} ({lengths[i]} tokens, "
            f"{prompts[i]} of them prompt: {longest} response tokens); nothing is cut to fit. Pass "
            f"response_width={longest} or more (verl's response_length), or leave it out for the longest response"
        )


#: The dtypes to_verl writes: the integer ones, which from_verl reads back (floats, bool, complex and quantized
#: dtypes hold no expert numbers there, and are refused on reading).
_INTEGER_DTYPES = frozenset(
    {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)


def _exactly(values: np.ndarray, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``values`` as a tensor of ``dtype``, refused where the dtype would change one (the rule of ``to_numpy``)."""
    out = torch.from_numpy(values).to(dtype)
    check_exact(values, out, what)
    return out


def _mask(attention_mask: torch.Tensor) -> np.ndarray:
    """``attention_mask`` as a bool array; only 0 and 1 are a mask (position ids or token ids are not)."""
    # (meta, sparse, nested, quantized: no 0/1 values to read, and torch's own error at the first comparison)
    check_values(attention_mask, "attention_mask", RoutesValidationError)
    try:
        mask = as_tensor(attention_mask).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise RoutesValidationError(f"attention_mask must be a [batch, seq] tensor of 0 and 1: {e}") from None
    if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)]
        raise RoutesValidationError(
            f"attention_mask holds {bad[0].item() if bad.numel() else mask.dtype}, not only 0 and 1: pass verl's "
            "attention_mask (1 at each token, 0 at padding)"
        )
    return mask.bool().numpy()


def _holds_route(row: np.ndarray, fill: int) -> bool:
    """Whether a token's row holds a value other than 0 (verl), -1 (:func:`to_verl`) and ``fill``: a route."""
    return bool(((row != 0) & (row != -1) & (row != fill)).any())


def _check_unrouted_last(row: np.ndarray, i: int, position: int, fill: int, at_edge: bool) -> None:
    """The last token's row of sequence ``i`` holds no route: only 0 (verl), -1 (:func:`to_verl`) or ``fill``.

    Engines never route the last token, so its row is read as -1. A route there means the rows
    are shifted against the mask (with k=1 an engine's zero row then reads as expert 0 and the
    whole sequence one token off), were recorded in a training forward, or (``at_edge``: the
    sequence reaches the batch's last position) belong to a response verl cut at
    ``response_length``: either way reading it as -1 would drop that route.
    """
    if _holds_route(row, fill):
        cut = (
            ". This sequence reaches the batch's last position: if verl cut its response at response_length (a "
            "multi-turn agent loop keeps routed_experts[: len(prompt_ids) + response_length] of an engine that "
            "generated past it), its last token was routed by the engine: pass truncated=True"
            if at_edge
            else ""
        )
        raise RoutesValidationError(
            f"sequence {i}: the last token (position {position}) holds {row.tolist()[:4]}, but engines never route "
            "the last token and verl leaves its row 0, so reading it would drop a route. The rows are shifted "
            "against the attention_mask (or belong to another batch); if they were recorded in a training "
            f"forward, which routes the last token too, pass last_routed=True{cut}"
        )


def from_verl(
    routed_experts: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_map: LayerMap,
    *,
    layout: str = "all",
    last_routed: bool = False,
    truncated: bool = False,
    fill: int = 0,
    input_ids: torch.Tensor | None = None,
    progress: bool | None = None,
    axes: str | None = None,
) -> list[Routes]:
    """Per-sequence routes from verl's ``[batch, seq, layers, k]`` ``routed_experts``.

    Tokens are the positions where ``attention_mask`` is 1: one run per sequence (the
    prompt left-padded, the response right-padded). The last token of each sequence gets
    a -1 row (engines never route it, verl leaves zeros there) unless ``last_routed``
    (routes recorded in a training forward); without ``last_routed`` that row must hold
    no route (0, -1 or ``fill``), since a route there would be dropped.

    A response verl cut at ``response_length`` is the exception, with ``truncated=True``:
    verl's multi-turn agent loop keeps ``routed_experts[: len(prompt_ids) + response_length]``
    of an engine that generated past that length, so a sequence that reaches the batch's
    last position may hold the engine's route for its last token, which is then kept (a
    row of no route there is still read as -1). Sequences that end earlier are not cut,
    and a route at their last token is refused as before.

    Nothing is dropped: every padding position must hold ``fill`` (0, as verl writes;
    :func:`to_verl`'s ``fill=``). A route there means the mask does not belong to these
    routes (shifted, or another batch's), and is refused.

    Given the batch's ``[batch, seq]`` ``input_ids``, each sequence's routes know their tokens
    (:attr:`~moe_replay.Routes.token_ids`), so a replay fed other tokens (micro-batches
    regrouped between the rollout and the update) is refused. Each sequence's row t (its run of
    mask 1s from its first prompt token) is token t, and keeps that place: sliced without ids (a
    sequence-parallel rank's rows), it is forced only on a token fed at place t.

    ``axes`` names the order of each sequence's three axes after the batch's,
    ``"tokens,layers,k"`` as verl writes it, or another order of those names
    (``"layers,tokens,k"``: ``[batch, layers, seq, k]``). It is needed only where a
    sequence's data cannot prove it: a batch as wide as the layer count (or with as many
    layers as k) whose sequences fit the LayerMap read in either order is refused without it.

    ``progress`` draws a bar over the sequences on stderr (``tqdm``'s where installed): ``None``
    shows it where stderr is a terminal (``MOE_REPLAY_PROGRESS=0`` or ``1`` decides instead
    where set), ``True`` always, ``False`` never. It changes nothing else.

    Raises:
        RoutesValidationError: shapes that do not fit, a mask of other values than 0 and 1
            or with a gap inside a sequence, a padding position holding a route, a last
            token holding a route without ``last_routed=True`` (or, for a sequence that
            reaches the batch's last position, ``truncated=True``), rows that do not fit the
            map or are no routes.
    """
    check_map(layer_map, "from_verl")
    last_routed = check_flag(last_routed, "from_verl: last_routed")
    truncated = check_flag(truncated, "from_verl: truncated")
    progress = check(progress, "from_verl")
    if not is_integer(fill):
        raise ArgumentTypeError(
            f"from_verl: fill must be an integer (the padding value, 0 as verl writes), got {fill!r}"
        )
    arr = as_array(routed_experts, "routed_experts")
    if axes is not None:
        names = axes_names(axes, "verl routed_experts")
        if arr.ndim == 4:  # (any other shape is refused below)
            arr = np.ascontiguousarray(arr.transpose([0, *(1 + names.index(a) for a in ENGINE_AXES)]))
    mask = _mask(attention_mask)
    if arr.ndim != 4 or tuple(mask.shape) != arr.shape[:2]:
        raise RoutesValidationError(
            f"verl routed_experts must be [batch, seq, layers, k] with a [batch, seq] attention_mask; got "
            f"{tuple(arr.shape)} and {tuple(mask.shape)}"
        )
    if arr.shape[2:] != (layer_map.width(layout), layer_map.k):  # (before any row is read: no row fits then)
        view = arr.dtype == np.uint8 and arr.shape[3] == 2 * layer_map.k
        raise RoutesValidationError(
            f"verl routed_experts is [batch, seq, layers, k] {tuple(arr.shape)}; with layout='{layout}' this model "
            f"needs [..., {layer_map.width(layout)}, {layer_map.k}] ({layer_map.num_layers} hidden layers, "
            f"{len(layer_map.moe_layers)} with a router, k={layer_map.k})"
            + (
                ": a uint8 array of twice k is verl's uint8 view of its int16 routes, made to send them; pass "
                "routed_experts.view(torch.int16)"
                if view
                else ". Check num_layers and k of the LayerMap, and the layout the engine writes"
            )
        )
    ids = None
    if input_ids is not None:
        ids = as_array(input_ids, "from_verl: input_ids", "token ids")
        if ids.shape != mask.shape or ids.dtype.kind not in "iu":
            raise RoutesValidationError(
                f"from_verl: input_ids must be the batch's [batch, seq] integer token ids, like its attention_mask "
                f"{tuple(mask.shape)}; got {ids.dtype} {tuple(ids.shape)}"
            )
    out = []
    for i in steps(arr.shape[0], "moe_replay: from_verl", progress):
        keep = mask[i]
        if not keep.any():
            raise RoutesValidationError(f"sequence {i} has no token (its attention_mask is all 0)")
        at = np.flatnonzero(keep)
        if at[-1] - at[0] + 1 != at.size:
            gap = int(at[np.argmax(np.diff(at) > 1)]) + 1
            raise RoutesValidationError(
                f"sequence {i}: attention_mask is 0 at position {gap}, inside the sequence (positions {int(at[0])}.."
                f"{int(at[-1])}); verl's mask is one run of 1s per sequence, so this is not the mask of these routes"
            )
        pad = (arr[i][~keep] != int(fill)).any(axis=(1, 2))
        if pad.any():
            j = int(np.flatnonzero(~keep)[np.argmax(pad)])
            raise RoutesValidationError(
                f"sequence {i}, position {j} is padding (attention_mask 0) but holds {arr[i, j].tolist()[:4]}, not "
                f"fill={fill}: the mask does not match these routes (shifted, or another batch's), and reading it "
                "would drop that row. Pass the attention_mask of this batch, or fill= if padding was written with "
                "another value"
            )
        if axes is None and (arr.shape[1] == arr.shape[2] or arr.shape[2] == arr.shape[3]):  # (another order fits)
            slab = np.where(keep[:, None, None], arr[i], 0)  # (padding holds fill=: no route, as zeros are)
            check_axes(slab, layer_map, layout, f"verl sequence {i}", told=False)
        rows = arr[i][keep]
        at_edge = int(at[-1]) == arr.shape[1] - 1
        cut = truncated and at_edge and _holds_route(rows[-1], int(fill))  # the engine routed its last token
        if not (last_routed or cut):
            _check_unrouted_last(rows[-1], i, int(at[-1]), int(fill), at_edge)
        last = np.zeros(rows.shape[0], dtype=bool)
        last[-1] = not (last_routed or cut)
        layers = columns(rows, layer_map, layout, f"verl sequence {i}", last, negative_ok=True)  # (-1: no route)
        routes = make_routes(layers, layer_map, "verl")
        out.append(routes.with_token_ids(ids[i][keep]) if ids is not None else routes)
    return out
