"""vLLM's ``routed_experts``, by release.

=============  =============================================  ===============  ==============
vLLM           rows (one sequence)                            layer columns    dtype
=============  =============================================  ===============  ==============
<= 0.20        ``[prompt_len + gen_len - 1]``                 all hidden       int32
0.21.0 only    ``prompt_routed_experts`` ``[prompt_len]``     MoE layers only  int16
               + ``routed_experts`` ``[gen_len - 1]``
0.22 - 0.33    ``[prompt_len - prompt_start + gen_len - 1]``  all hidden       uint8 (<= 256
                                                                               experts), uint16
                                                                               (int32 from the
                                                                               OpenAI server)
=============  =============================================  ===============  ==============

``prompt_start`` is the request's ``SamplingParams.routed_experts_prompt_start`` (0.22+).
The last sampled token never has a row. Dense layers' columns are zero. docs/formats.md
cites the source of each fact.

Example:
    >>> import numpy as np, moe_replay as mr
    >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    >>> arr = np.zeros((3, 2, 2), np.uint8)   # prompt of 2, 2 generated: 2 + 2 - 1 rows
    >>> arr[:, 1] = [[0, 3], [1, 2], [3, 1]]
    >>> r = mr.interop.from_vllm(arr, lm, prompt_len=2, completion_len=2)
    >>> r.layer("model.layers.1.mlp.gate").tolist()
    [[0, 3], [1, 2], [3, 1], [-1, -1]]
    >>> turn = mr.interop.from_vllm(arr[1:], lm, prompt_len=2, completion_len=2, prompt_start=1)
    >>> turn.layer("model.layers.1.mlp.gate").tolist()     # token 0 was not returned
    [[-1, -1], [1, 2], [3, 1], [-1, -1]]
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .._checks import check_count, is_collection, is_integer
from ..errors import RoutesValidationError
from ..routes import Routes
from ._common import (
    ENGINE_AXES,
    as_array,
    check_axes,
    check_holds,
    check_routed_rows,
    check_start,
    columns,
    cut_last,
    in_axes,
    make_routes,
    npy_from_base64,
    npy_to_base64,
    one_of_many,
    ordered,
    rows_untold,
    skip_front,
    to_array,
    with_front,
    with_last,
)
from .layer_map import LayerMap, check_map

__all__ = [
    "VLLM_TESTED",
    "from_vllm",
    "from_vllm_legacy",
    "from_vllm_output",
    "from_vllm_split",
    "to_vllm",
    "to_vllm_legacy",
    "to_vllm_split",
    "vllm_array_from_base64",
    "vllm_array_to_base64",
    "vllm_dtype",
    "vllm_layout",
]

#: The newest vLLM release whose routed-experts format was read; later ones are refused
#: unless ``version=`` names a release up to it.
VLLM_TESTED = (0, 33)

_LEGACY, _SPLIT, _CURRENT = "<=0.20", "0.21", "0.22-0.33"
_DTYPE_OF = {_LEGACY: ("int32",), _SPLIT: ("int16",), _CURRENT: ("uint8", "uint16")}
#: Dtypes a layout's arrays also come in, read when ``version=`` names the release: vLLM 0.22+'s OpenAI server
#: documents its ``routed_experts`` as "uint8/uint16/int32" (``chat_completion/protocol.py:130-138``), and
#: trainers keep them as int8/int16/int32 (NeMo-RL's ``generation/interfaces.py:61-69``). Without ``version=``
#: int16 is 0.21's and is refused (its prompt rows are split off).
_ALSO = {_CURRENT: ("int16", "int32")}


def vllm_layout(version: str | tuple[int, ...]) -> str:
    """The routed-experts layout of a vLLM release: ``"<=0.20"``, ``"0.21"`` or ``"0.22-0.33"``.

    Args:
        version: ``vllm.__version__`` (``"0.33.0"``, ``"v0.22.1rc1"``...) or ``(major, minor)``.

    Raises:
        RoutesValidationError: a release newer than the last one read (0.33), or not a version.
    """
    if isinstance(version, tuple):
        if not all(is_integer(x) and int(x) >= 0 for x in version[:2]):
            raise RoutesValidationError(f"a vLLM version tuple holds ints, as (0, 33); got {version!r}")
        parts = tuple(int(x) for x in version[:2])
    elif isinstance(version, numbers.Number):  # (0.30 as a float is 0.3, a release of another layout)
        raise RoutesValidationError(
            f"version must be vllm.__version__ (a str such as '0.30.0') or (major, minor), got {version!r} "
            f"({type(version).__name__}): a number cannot tell 0.3 from 0.30"
        )
    else:  # (a str, or a packaging Version)
        m = re.match(r"v?(\d+)\.(\d+)", str(version).strip())
        if m is None:
            raise RoutesValidationError(f"cannot read a vLLM version from {version!r}; give e.g. '0.33.0'")
        parts = (int(m.group(1)), int(m.group(2)))
    if len(parts) != 2:
        raise RoutesValidationError(f"a vLLM version needs major and minor numbers, got {version!r}")
    if parts > VLLM_TESTED:
        raise RoutesValidationError(
            f"vLLM {parts[0]}.{parts[1]} is newer than the last release whose routed-experts format was read "
            f"({VLLM_TESTED[0]}.{VLLM_TESTED[1]}). Check its CompletionOutput.routed_experts, then pass the "
            "oldest read release with the same format, e.g. version='0.33'"
        )
    if parts <= (0, 20):
        return _LEGACY
    return _SPLIT if parts == (0, 21) else _CURRENT


def vllm_dtype(num_experts: int) -> np.dtype:
    """The dtype vLLM 0.22+ writes: uint8 for up to 256 experts, else uint16.

    Raises:
        RoutesValidationError: ``num_experts`` is not an integer from 1 to 65536 (256.5 is
            refused, never cut to 256).
    """
    if not is_integer(num_experts) or not 1 <= int(num_experts) <= 2**16:
        raise RoutesValidationError(
            f"num_experts must be an integer from 1 to 65536 (what uint16 expert ids hold), got {num_experts!r:.60}"
        )
    return np.dtype(np.uint8 if int(num_experts) <= 256 else np.uint16)


def vllm_array_from_base64(text: str | bytes) -> np.ndarray:
    """The array of an OpenAI-server choice's ``routed_experts``: base64 of a ``.npy`` file."""
    return npy_from_base64(text, "vLLM routed_experts")


def vllm_array_to_base64(arr: np.ndarray) -> str:
    """What vLLM's OpenAI server sends for ``arr``: base64 of its ``.npy`` file.

    ``arr`` holds expert indices: an integer array, tensor or nested lists. Anything else
    (floats, an object array, ragged lists) is refused, as :func:`from_vllm` refuses it.

    Raises:
        RoutesValidationError: ``arr`` is not a rectangular integer array.
    """
    return npy_to_base64(as_array(arr, "vLLM routed_experts"))


def _array(data: Any, what: str) -> np.ndarray:
    if isinstance(data, str | bytes):
        data = vllm_array_from_base64(data)
    return as_array(data, what)


def _detect(arr: np.ndarray, version: Any, split: bool, start: int = 0) -> str:
    """The layout of a vLLM array: from ``version=``, else from the dtype vLLM wrote.

    int32 is what vLLM <= 0.20 writes and what 0.22+'s OpenAI server may send: with ``start`` > 0
    (``routed_experts_prompt_start``, 0.22+ only) it is 0.22+'s; with 0 both read the same rows.
    """
    if version is not None:
        layout = vllm_layout(version)
        known = {d: lay for lay, ds in _DTYPE_OF.items() for d in ds}
        if arr.dtype.name in known and known[arr.dtype.name] != layout and arr.dtype.name not in _ALSO.get(layout, ()):
            raise RoutesValidationError(
                f"routed_experts is {arr.dtype}, which vLLM writes in releases {known[arr.dtype.name]}, not in "
                f"{version} ({layout}: {'/'.join(_DTYPE_OF[layout])}). Check the version; an array cast on the way "
                "(verl stores int16) is read with its own reader (interop.from_verl), or cast back to the dtype "
                "vLLM wrote"
            )
        return layout
    if split:
        return _SPLIT
    name = arr.dtype.name
    if name in _DTYPE_OF[_CURRENT]:
        return _CURRENT
    if name == "int32":
        return _CURRENT if start else _LEGACY
    if name == "int16":
        raise RoutesValidationError(
            "routed_experts is int16 without prompt_routed_experts: vLLM 0.21 writes int16 and splits off the "
            "prompt rows. Read it with from_vllm_split(prompt_routed_experts, routed_experts, ...), or pass "
            "version= if it came from another release"
        )
    raise RoutesValidationError(
        f"routed_experts is {arr.dtype}, which no vLLM release writes (int32 up to 0.20, int16 in 0.21, "
        "uint8/uint16 from 0.22): it was converted on the way. Pass version= (vllm.__version__ of the engine)"
    )


def from_vllm(
    routed_experts: Any,
    layer_map: LayerMap,
    *,
    prompt_len: int,
    completion_len: int,
    prompt_start: int = 0,
    version: str | tuple[int, ...] | None = None,
    axes: str | None = None,
) -> Routes:
    """Routes of one sequence from a ``CompletionOutput.routed_experts`` array (vLLM <= 0.20, 0.22-0.33).

    vLLM 0.22-0.33 write ``[prompt_len - prompt_start + completion_len - 1,
    num_hidden_layers, k]`` uint8 (uint16 above 256 experts; their OpenAI server may send
    int32), vLLM <= 0.20 the same rows (``prompt_start`` 0) as int32. The release is told by
    the dtype (int32 with ``prompt_start`` > 0 is 0.22+'s) unless ``version=`` names it; a
    ``version=`` of 0.22-0.33 reads any integer dtype that holds every expert number (int16 and
    int32 as trainers keep them, int64 as converted). The row count must match
    exactly, or the call fails: a shift is never guessed.

    Args:
        routed_experts: the array, or the OpenAI server's base64 ``.npy`` string.
        prompt_len: ``len(RequestOutput.prompt_token_ids)``.
        completion_len: ``len(CompletionOutput.token_ids)`` (after stop-string trimming,
            which cuts the dropped tokens' rows too).
        prompt_start: the request's ``routed_experts_prompt_start``: prompt tokens left out
            at the front; they get -1 rows.
        version: ``vllm.__version__`` of the engine, needed when the dtype was changed on
            the way (e.g. to int64).
        axes: the order of the array's axes, ``"tokens,layers,k"`` as vLLM writes it, or
            another order of those names (``"layers,tokens,k"``: a stack of per-layer arrays).
            Needed only where the array's data cannot prove its order: an array with as many
            rows as layer columns (or as many columns as k) that fits the LayerMap read in
            either order is refused without it.

    Returns:
        ``prompt_len + completion_len`` rows; the first ``prompt_start`` and the last are -1.
        Row t is token t of the sequence, and keeps that place: sliced without token ids (a
        sequence-parallel rank's rows), it is forced only on a token fed at place t.

    Raises:
        RoutesValidationError: dtype, layer width, k or row count do not fit the release and
            the LayerMap; a dtype that cannot hold every expert number; a dense layer's column
            holds experts; invalid expert indices (negative, or past the router's experts).
    """
    check_map(layer_map, "from_vllm")
    arr = in_axes(_array(routed_experts, "routed_experts"), axes, "vLLM routed_experts")
    start = check_start(prompt_start, "prompt_start")
    layout = _detect(arr, version, split=False, start=start)
    if layout == _SPLIT:
        raise RoutesValidationError(
            "vLLM 0.21 splits routes into prompt_routed_experts and routed_experts: use from_vllm_split"
        )
    p, c = check_start(prompt_len, "prompt_len"), check_start(completion_len, "completion_len")
    if start > p:
        raise RoutesValidationError(
            f"prompt_start={start} is past the prompt ({p} tokens); vLLM requires <= prompt_len"
        )
    if layout == _LEGACY and start:
        raise RoutesValidationError(
            "vLLM <= 0.20 (int32) has no routed_experts_prompt_start; an int32 array with prompt_start > 0 fits no "
            "release. Pass version= if the dtype was changed on the way"
        )
    # (a wider dtype than vLLM writes, uint16 for 16 experts, reads the same experts)
    check_holds(arr, layer_map, "routed_experts", "vLLM returned (uint8/uint16, or int32 from its OpenAI server)")
    want = p - start + c - 1
    if want < 0:
        raise RoutesValidationError(f"prompt_len={p}, prompt_start={start}, completion_len={c} leave no token")
    if arr.ndim < 1 or arr.shape[0] != want:
        rows = arr.shape[0] if arr.ndim else 0
        hint = ""
        if start == 0 and 0 < want - rows <= p:
            hint = (
                f" If the request set routed_experts_prompt_start, pass prompt_start= (this array would fit "
                f"prompt_start={want - rows})."
            )
        elif start and rows == want + start:
            hint = " The array covers the whole prompt: was routed_experts_prompt_start set on the request?"
        elif rows > want:
            hint = (
                f" These rows fit completion_len={rows - (p - start) + 1}: a completion streamed with "
                "output_kind=DELTA holds only its last chunk's token_ids; pass the whole completion's length."
            )
        raise RoutesValidationError(
            f"routed_experts has {rows} rows; vLLM {layout} writes prompt_len - prompt_start + completion_len - 1 = "
            f"{p} - {start} + {c} - 1 = {want} (the last token is never routed).{hint}"
        )
    check_axes(arr, layer_map, "all", f"vLLM {layout} routed_experts", told=axes is not None)
    layers = columns(arr, layer_map, "all", f"vLLM {layout} routed_experts")
    return make_routes(with_last(with_front(layers, start)), layer_map, f"vLLM {layout} routed_experts")


def to_vllm(
    routes: Routes,
    layer_map: LayerMap,
    *,
    prompt_start: int = 0,
    drop_last: bool = False,
) -> np.ndarray:
    """vLLM 0.22-0.33's ``routed_experts`` for one sequence: all hidden layers, uint8 or uint16.

    Rows from ``prompt_start`` to the second-to-last token; the last token's row must be
    -1 (engines never route it) unless ``drop_last=True``. Every written row must hold a
    route: vLLM has no "route natively" row.
    """
    check_map(layer_map, "to_vllm")
    body = skip_front(cut_last(routes, drop_last, "vLLM routed_experts"), prompt_start, "to_vllm", "prompt_start")
    return to_array(
        body, layer_map, "all", vllm_dtype(layer_map.max_experts), "vLLM routed_experts", allow_missing=False
    )


def from_vllm_legacy(
    routed_experts: Any, layer_map: LayerMap, *, num_tokens: int | None = None, axes: str | None = None
) -> Routes:
    """Routes of one sequence from vLLM <= 0.20's ``routed_experts``: ``[seq_len - 1, num_hidden_layers, k]`` int32.

    The dtype of another release is refused: uint8/uint16 (vLLM 0.22+, whose array starts
    at ``routed_experts_prompt_start``: read it with :func:`from_vllm`) and int16 (0.21:
    :func:`from_vllm_split`). An int32 array converted on the way (to int64) is read.

    Args:
        num_tokens: ``len(prompt_token_ids) + len(token_ids)``, to check the row count.
            Without it the row count cannot be checked here: the array is all vLLM <= 0.20
            returns, and it does not say how many tokens its sequence has, so its rows are
            taken as ``num_tokens - 1`` (a transposed or cut array of a plausible shape is read
            as one of another length, and refused only by the replay that runs out of rows).
            Pass it, or read the whole ``RequestOutput`` with
            ``from_vllm_output(output, layer_map, version="0.20")``, which counts the tokens.
            Only the replay's row count then refuses a row too many or too few: a replay with
            ``strict=False`` (which leaves rows unread) of such routes is refused if it leaves
            any, since a row too many at the front would shift every token's experts; slice
            them (``routes[:n]``) for a partial replay.
        axes: the order of the array's axes, as :func:`from_vllm` takes it: needed only where
            the data cannot prove it (as many rows as layer columns, fitting either way).

    Returns:
        ``rows + 1`` tokens, the last one -1; row t is token t of the sequence and keeps that
        place (a slice of them is forced only on tokens fed at their places).
    """
    check_map(layer_map, "from_vllm_legacy")
    arr = in_axes(_array(routed_experts, "routed_experts"), axes, "vLLM routed_experts")
    if arr.dtype.name in _DTYPE_OF[_CURRENT] + _DTYPE_OF[_SPLIT]:
        other = _CURRENT if arr.dtype.name in _DTYPE_OF[_CURRENT] else _SPLIT
        use = "from_vllm(..., prompt_start=) (its rows start at routed_experts_prompt_start)"
        raise RoutesValidationError(
            f"routed_experts is {arr.dtype}, which vLLM {other} writes, not vLLM <= 0.20 (int32). Read it with "
            + (use if other == _CURRENT else "from_vllm_split(prompt_routed_experts, routed_experts, ...)")
        )
    if num_tokens is not None:
        check_routed_rows(arr, check_count(num_tokens, "num_tokens"), "routed_experts")
    check_axes(arr, layer_map, "all", "vLLM <=0.20 routed_experts", told=axes is not None)
    layers = columns(arr, layer_map, "all", "vLLM <=0.20 routed_experts")
    routes = make_routes(with_last(layers), layer_map, "vLLM <=0.20 routed_experts")
    return routes if num_tokens is not None else rows_untold(routes, "from_vllm_legacy")


def to_vllm_legacy(routes: Routes, layer_map: LayerMap, *, drop_last: bool = False) -> np.ndarray:
    """vLLM <= 0.20's ``routed_experts``: ``[T - 1, num_hidden_layers, k]`` int32, dense columns 0."""
    check_map(layer_map, "to_vllm_legacy")
    body = cut_last(routes, drop_last, "vLLM routed_experts")
    return to_array(body, layer_map, "all", np.int32, "vLLM <=0.20 routed_experts", allow_missing=False)


def from_vllm_split(
    prompt_routed_experts: Any,
    routed_experts: Any,
    layer_map: LayerMap,
    *,
    completion_len: int,
    cached_tokens: int | None = None,
    prompt_len: int | None = None,
    axes: str | None = None,
) -> Routes:
    """Routes of one sequence from vLLM 0.21's split arrays (MoE layers only, int16).

    ``RequestOutput.prompt_routed_experts`` ``[prompt_len, num_moe_layers, k]`` and
    ``CompletionOutput.routed_experts`` ``[completion_len - 1, ...]``. ``completion_len``
    rows are taken too, aligned from the front (vLLM 0.21 clips the rows it captured past
    the output, a speculative or MTP draft's, to the output's length): the last of them is
    not read, since no forward routed the last token.
    vLLM 0.21 leaves the rows of prefix-cached prompt tokens **zero**.

    Args:
        completion_len: ``len(CompletionOutput.token_ids)``.
        cached_tokens: how many leading prompt tokens came from the prefix cache: their
            zero rows become -1 (route natively). Without it, an all-zero prompt row is
            ambiguous and refused.
        prompt_len: ``len(RequestOutput.prompt_token_ids)``, to check the prompt's row
            count. Without it the prompt's rows are taken as its tokens: only the replay's
            row count refuses a row too many or too few, and a replay with ``strict=False``
            that leaves rows of the routes unread is refused (a row too many at the front
            would shift every token's experts): slice them, ``routes[:n]``, for a partial
            replay. :func:`from_vllm_output` counts the prompt itself.
        axes: the order of both arrays' axes, as :func:`from_vllm` takes it: needed only
            where the data cannot prove it (as many rows as MoE layers, fitting either way).

    Returns:
        ``prompt_len + completion_len`` rows; the last one -1. Row t is token t of the
        sequence and keeps that place (a slice of them is forced only on tokens fed there).

    Raises:
        RoutesValidationError: a dtype other than int16, row counts that do not fit
            ``completion_len`` (or ``prompt_len``), widths that do not fit the map, zero
            prompt rows without ``cached_tokens=``, invalid experts.
    """
    check_map(layer_map, "from_vllm_split")
    gen = in_axes(_array(routed_experts, "routed_experts"), axes, "vLLM 0.21 routed_experts")
    prompt = in_axes(_array(prompt_routed_experts, "prompt_routed_experts"), axes, "vLLM 0.21 prompt_routed_experts")
    for arr, what in ((prompt, "prompt_routed_experts"), (gen, "routed_experts")):
        if arr.dtype.name in ("int32", "uint8", "uint16"):
            raise RoutesValidationError(f"{what} is {arr.dtype}; vLLM 0.21 writes int16")
    c = check_start(completion_len, "completion_len")
    if c == 0:  # (its rows would be "-1 rows": said as the count it is)
        raise RoutesValidationError(
            "from_vllm_split: completion_len=0, but a completion holds at least one generated token, and vLLM "
            "returns none without one. Pass len(CompletionOutput.token_ids)"
        )
    if gen.ndim < 1 or gen.shape[0] not in (c - 1, c):
        raise RoutesValidationError(
            f"routed_experts has {gen.shape[0] if gen.ndim else 0} rows for {c} generated tokens; vLLM 0.21 gives "
            f"{c - 1} (the last token is never routed)"
        )
    if prompt_len is not None:
        p = check_start(prompt_len, "prompt_len")
        if prompt.ndim < 1 or prompt.shape[0] != p:
            raise RoutesValidationError(
                f"prompt_routed_experts has {prompt.shape[0] if prompt.ndim else 0} rows for a prompt of {p} tokens; "
                "vLLM 0.21 writes one per prompt token"
            )
    for arr, what in ((prompt, "vLLM 0.21 prompt_routed_experts"), (gen, "vLLM 0.21 routed_experts")):
        check_axes(arr, layer_map, "moe", what, told=axes is not None)
    p_layers = columns(prompt, layer_map, "moe", "vLLM 0.21 prompt_routed_experts")
    g_layers = columns(gen, layer_map, "moe", "vLLM 0.21 routed_experts")
    p_rows = np.asarray(prompt, dtype=np.int64)
    zero = (p_rows == 0).all(axis=(1, 2))
    if cached_tokens is None:
        if zero.any():
            i = int(np.argmax(zero))
            raise RoutesValidationError(
                f"prompt_routed_experts row {i} is all zeros: vLLM 0.21 leaves prefix-cached prompt rows zero, "
                "so it cannot tell a cached token from one routed to expert 0 everywhere. Pass cached_tokens= "
                "(the prompt tokens served from the prefix cache; 0 when caching was off)"
            )
    else:
        n = check_start(cached_tokens, "cached_tokens")
        if n > prompt.shape[0]:
            raise RoutesValidationError(f"cached_tokens={n} is more than the {prompt.shape[0]} prompt rows")
        if not zero[:n].all():
            i = int(np.argmin(zero[:n]))
            raise RoutesValidationError(
                f"cached_tokens={n}, but prompt row {i} holds routes: vLLM 0.21 leaves cached rows zero. Check "
                "cached_tokens"
            )
        p_layers = [torch.cat([torch.full((n, x.shape[1]), -1, dtype=x.dtype), x[n:]]) for x in p_layers]
    # (a row at the last token's place is one vLLM captured past the output, a draft's that was clipped: not the
    # last token's route, which no forward took)
    layers = with_last([torch.cat([a, b[: c - 1]]) for a, b in zip(p_layers, g_layers, strict=True)])
    routes = make_routes(layers, layer_map, "vLLM 0.21 prompt_routed_experts/routed_experts")
    return routes if prompt_len is not None else rows_untold(routes, "from_vllm_split")


def to_vllm_split(
    routes: Routes, layer_map: LayerMap, prompt_len: int, *, drop_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """vLLM 0.21's ``(prompt_routed_experts, routed_experts)`` for one sequence: MoE layers, int16.

    Leading -1 prompt rows (prefix-cached tokens) are written as zeros, as 0.21 does;
    any other -1 row is refused.
    """
    check_map(layer_map, "to_vllm_split")
    body = cut_last(routes, drop_last, "vLLM 0.21 routed_experts")
    p = check_start(prompt_len, "prompt_len")
    if p > body.num_tokens:
        raise RoutesValidationError(f"prompt_len={p} does not fit a sequence of {routes.num_tokens} tokens")
    hole = torch.stack([(x < 0).all(dim=1) for x in ordered(body, layer_map) if x is not None]).all(dim=0)
    cached = min(int(hole.long().cumprod(0).sum()), p)
    filled = body
    if cached:
        zeros = [torch.zeros(cached, x.shape[1], dtype=torch.long) for x in body.per_layer()]
        fixed = [torch.cat([z, x[cached:]]) for z, x in zip(zeros, body.per_layer(), strict=True)]
        # (the rows were checked by ordered() above; the zero rows are 0.21's cached rows, no route)
        filled = Routes._trusted(fixed, body.names, body.experts_per_layer, True)
    arr = to_array(filled, layer_map, "moe", np.int16, "vLLM 0.21 routed_experts", allow_missing=False)
    return arr[:p], arr[p:]


def from_vllm_output(
    output: Any,
    layer_map: LayerMap,
    *,
    index: int = 0,
    prompt_len: int | None = None,
    prompt_start: int = 0,
    version: str | tuple[int, ...] | None = None,
    cached_tokens: int | None = None,
) -> Routes:
    """Routes of one completion from a vLLM ``RequestOutput`` or ``CompletionOutput``, any release.

    The release is told by ``version=`` or by what vLLM wrote: a
    ``RequestOutput.prompt_routed_experts`` (0.21), else the dtype (uint8/uint16: 0.22+,
    int32: <= 0.20). The row count must then fit exactly; nothing is shifted to fit.

    Args:
        output: a ``RequestOutput`` (completion ``index`` is read: the one whose
            ``CompletionOutput.index`` it is, where completions carry one, else the one at that
            position; with ``n > 1`` each completion carries its own full array) or one
            ``CompletionOutput``.
        prompt_len: the prompt's token count; read from ``RequestOutput.prompt_token_ids``
            when not given, required with a ``CompletionOutput``.
        prompt_start: the request's ``routed_experts_prompt_start`` (0.22+).
        version: ``vllm.__version__`` of the engine.
        cached_tokens: vLLM 0.21 only: prompt tokens served from the prefix cache.

    The result knows its tokens (:attr:`~moe_replay.Routes.token_ids`): the prompt's and the
    completion's ids the output holds, so that a replay on other tokens is refused; and each row
    its place in the sequence (row t: token t), so that its rows, sliced without their ids (a
    sequence-parallel rank's), are forced only on tokens fed at those places.

    Example:
        >>> from types import SimpleNamespace
        >>> import numpy as np, moe_replay as mr
        >>> lm = mr.LayerMap.from_names(["model.layers.0.mlp.gate"], num_layers=1, num_experts=4, top_k=1)
        >>> comp = SimpleNamespace(token_ids=[7, 8], routed_experts=np.array([[[1]], [[2]]], np.uint8))
        >>> r = mr.interop.from_vllm_output(comp, lm, prompt_len=1)
        >>> r.layer("model.layers.0.mlp.gate").tolist(), r.token_ids.tolist()  # (no prompt id in a CompletionOutput)
        ([[1], [2], [-1]], [-1, 7, 8])
    """
    check_map(layer_map, "from_vllm_output")
    if prompt_len is not None:
        prompt_len = check_start(prompt_len, "prompt_len")  # 2.5 is refused, never cut to 2
    if hasattr(output, "outputs"):
        outs = _listed(output.outputs, "RequestOutput.outputs", "its CompletionOutputs")
        comp = _completion(outs, index)
        if not (hasattr(comp, "routed_experts") and hasattr(comp, "token_ids")):
            raise RoutesValidationError(
                f"RequestOutput.outputs[{index}] is a {type(comp).__name__}, not a vLLM CompletionOutput (with "
                "token_ids and routed_experts)"
            )
        ids = getattr(output, "prompt_token_ids", None)
        if ids is not None:
            ids = _listed(ids, "RequestOutput.prompt_token_ids", "the prompt's token ids")
        if ids is None and prompt_len is None:
            raise RoutesValidationError("this RequestOutput has no prompt_token_ids: pass prompt_len=")
        if ids is not None:
            if prompt_len is not None and int(prompt_len) != len(ids):
                raise RoutesValidationError(
                    f"prompt_len={prompt_len}, but the RequestOutput's prompt has {len(ids)} tokens"
                )
            prompt_len = len(ids)
        prompt_routed = getattr(output, "prompt_routed_experts", None)
    elif hasattr(output, "routed_experts") and hasattr(output, "token_ids"):
        comp, prompt_routed, ids = output, None, None
        if prompt_len is None:
            raise RoutesValidationError(
                "a CompletionOutput does not know its prompt: pass prompt_len=len(request_output.prompt_token_ids)"
            )
    else:
        raise RoutesValidationError(
            f"expected a vLLM RequestOutput or CompletionOutput, got {type(output).__name__}"
            + one_of_many(output, "from_vllm_output", "LLM.generate returns one RequestOutput per prompt")
        )
    if comp.routed_experts is None:
        raise RoutesValidationError(_why_no_routes(output, comp))
    assert prompt_len is not None
    arr = _array(comp.routed_experts, "routed_experts")
    layout = _detect(arr, version, split=prompt_routed is not None, start=check_start(prompt_start, "prompt_start"))
    completion_len = len(_listed(comp.token_ids, "CompletionOutput.token_ids", "the completion's token ids"))
    if layout == _SPLIT:
        if prompt_routed is None:
            raise RoutesValidationError(
                "vLLM 0.21 keeps the prompt's rows in RequestOutput.prompt_routed_experts: pass the RequestOutput"
            )
        if check_start(prompt_start, "prompt_start"):
            raise RoutesValidationError("vLLM 0.21 has no routed_experts_prompt_start; prompt_start must be 0")
        prompt = _array(prompt_routed, "prompt_routed_experts")
        if prompt.ndim < 1 or prompt.shape[0] != prompt_len:
            raise RoutesValidationError(
                f"prompt_routed_experts has {prompt.shape[0] if prompt.ndim else 0} rows for a prompt of "
                f"{prompt_len} tokens; vLLM 0.21 writes one per prompt token"
            )
        routes = from_vllm_split(
            prompt,
            arr,
            layer_map,
            completion_len=completion_len,
            cached_tokens=cached_tokens,
            prompt_len=prompt_len,
            axes=",".join(ENGINE_AXES),  # (vLLM's own output holds its arrays as vLLM writes them)
        )
        return _with_tokens(routes, ids, prompt_len, comp.token_ids)
    if prompt_routed is not None:
        raise RoutesValidationError(
            f"this output has prompt_routed_experts, which only vLLM 0.21 writes, but version={version!r}"
        )
    if cached_tokens is not None:
        raise RoutesValidationError(
            f"cached_tokens= is for vLLM 0.21 only; in {layout} prefix-cached rows carry their real routes"
        )
    routes = from_vllm(
        arr,
        layer_map,
        prompt_len=prompt_len,
        completion_len=completion_len,
        prompt_start=prompt_start,
        version=version if version is not None else _layout_version(layout),
        axes=",".join(ENGINE_AXES),  # (vLLM's own output holds its array as vLLM writes it)
    )
    return _with_tokens(routes, ids, prompt_len, comp.token_ids)


def _completion(outs: Any, index: Any) -> Any:
    """The completion ``index`` of a ``RequestOutput``'s ``outputs``: the one whose ``CompletionOutput.index`` it is,
    where every completion carries its own, else (and for an index from the end) the one at that position.

    A streamed output of ``n > 1`` samples carries the samples that changed in that step only, so the position of a
    completion in ``outputs`` is not its number: read by position, ``index=1`` would give another sample's routes.
    """
    if not is_integer(index):
        raise RoutesValidationError(f"index={index!r:.40}, but a completion's index is an integer")
    numbers: list[Any] = [getattr(c, "index", None) for c in outs]
    own = all(is_integer(n) for n in numbers) and len({int(n) for n in numbers}) == len(numbers)
    if own and int(index) >= 0:
        for c, n in zip(outs, numbers, strict=True):
            if int(n) == int(index):
                return c
        raise RoutesValidationError(
            f"index={index}, but this RequestOutput holds the completions numbered {sorted(int(n) for n in numbers)} "
            "(CompletionOutput.index): a streamed output of n > 1 samples carries only the samples of that step. "
            f"Read the output that holds completion {index}"
        )
    if not -len(outs) <= int(index) < len(outs):
        raise RoutesValidationError(f"index={index}, but this RequestOutput has {len(outs)} completions")
    return outs[int(index)]


def _why_no_routes(output: Any, comp: Any) -> str:
    """Why a vLLM output holds no ``routed_experts``, as its own fields tell: vLLM sets them on the final output of a
    request only, so a streamed chunk (``finished`` False, no ``finish_reason``) or an aborted request has none even
    with the option on, and the option's advice would send the user to a server that already has it."""
    finished = getattr(output, "finished", None)
    reason = getattr(comp, "finish_reason", None)
    if finished is False or (not hasattr(output, "outputs") and hasattr(comp, "finish_reason") and reason is None):
        return (
            "this output has no routed_experts and is not finished (finished=False, or no finish_reason: a streamed "
            "chunk): vLLM sets routed_experts on a request's final output only. Read the output whose finished is "
            "True (with stream=True, the last chunk), whose token_ids hold the whole completion"
        )
    if isinstance(reason, str) and reason == "abort":
        return (
            "this output has no routed_experts and its request was aborted (finish_reason='abort'): vLLM returned no "
            "routes for its tokens, so they cannot be replayed. Drop this sample, or build routes that route it "
            "natively (-1 rows)"
        )
    return "this output has no routed_experts: start vLLM with enable_return_routed_experts=True"


def _listed(value: Any, what: str, holds: str) -> Any:
    """``value`` if it is a sequence with a length (a list, tuple, array), else an error naming ``what``.

    vLLM's outputs hold lists; anything else (None, a number, a generator) is not the field vLLM
    writes, and its length would be a guess.
    """
    if not is_collection(value) or not hasattr(value, "__len__") or isinstance(value, Mapping):
        raise RoutesValidationError(
            f"{what} is {type(value).__name__}, not a list of {holds} as vLLM writes it: pass the output vLLM "
            "returned, or a CompletionOutput with prompt_len="
        )
    return value


def _with_tokens(routes: Routes, prompt: Any, prompt_len: int, completion: Any) -> Routes:
    """``routes`` knowing the tokens vLLM's output names (the prompt's -1 where only its length is known),
    so that a replay fed other tokens is refused (:attr:`Routes.token_ids`)."""
    given = [*(prompt if prompt is not None else [-1] * prompt_len), *completion]
    if not all(is_integer(t) for t in given):  # (int(1.5) would be token 1: never cut to an id)
        return routes  # (token ids of a kind no id is read from: the rows are all there is)
    ids = [int(t) for t in given]
    if len(ids) != routes.num_tokens or any(t < -1 for t in ids):
        return routes
    return routes.with_token_ids(ids)


def _layout_version(layout: str) -> str:
    """A release of ``layout``, as a version string."""
    return {_LEGACY: "0.20", _SPLIT: "0.21", _CURRENT: "0.33"}[layout]
