"""Megatron-core's routes (read from megatron-core 0.19.2).

* Training: ``RouterReplay.set_replay_data`` / ``get_recorded_data()``, a list with one
  ``[num_tokens, k]`` index tensor per MoE layer of the stage, in the order the routers
  were built (layer order). Every index is gathered: there is no "route natively" row.
* Inference: ``DynamicInferenceRequest.routing_indices``, numpy
  ``[total_tokens - 1, num_moe_layers, k]`` int32; prefix-cached blocks reuse the routes
  stored with them.

docs/formats.md cites the source of each fact.

Example:
    >>> import torch, moe_replay as mr
    >>> r = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["decoder.layers.1.mlp.router"], num_experts=4)
    >>> lm = mr.LayerMap.from_routes(r, num_layers=2)
    >>> mr.interop.to_megatron(r, layer_map=lm)[0].tolist()
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_count, is_collection, is_integer, is_one_of, router_names
from ..errors import ArgumentTypeError, InvalidArgumentError, RoutesValidationError, UnsupportedRouterError
from ..routes import Routes, in_token_order, order_untold
from ._common import (
    as_array,
    check_axes,
    check_routed_rows,
    columns,
    cut_last,
    in_axes,
    make_routes,
    ordered,
    rows_untold,
    to_array,
    with_last,
)
from .layer_map import LAYER_PATTERN, LayerMap, check_map

__all__ = [
    "check_megatron_config",
    "from_megatron",
    "from_megatron_inference",
    "to_megatron",
    "to_megatron_inference",
]


def _check_layer_order(names: Sequence[str], fix: str) -> None:
    """Refuse router names that say their hidden layers and are not in layer order.

    Megatron's ``set_replay_data`` gives the list's tensors to its routers in the order they were
    built, which is layer order; a list in another order (names sorted as text put
    ``layers.10`` before ``layers.2``) would give each router another layer's routes. Names are
    compared where their text before the layer number is the same (``decoder.layers.<i>`` among
    themselves, MTP's ``mtp.layers.<i>`` after them); names without a layer number say nothing.
    """
    rx = re.compile(LAYER_PATTERN)
    last: dict[str, tuple[int, str]] = {}
    for nm in names:
        m = rx.search(nm)
        if m is None:
            continue
        stack, layer = nm[: m.start(1)], int(m.group(1))
        seen = last.get(stack)
        if seen is not None and layer <= seen[0]:
            raise RoutesValidationError(
                f"router '{seen[1]}' (layer {seen[0]}) comes before '{nm}' (layer {layer}), but Megatron gives the "
                "list's tensors to its routers in the order they were built, layer order: each router would get "
                f"another layer's routes. {fix}"
            )
        last[stack] = (layer, nm)


def _check_layer_numbers(layer_numbers: Any, names: list[Any], count: int) -> None:
    """Refuse Megatron layer numbers that do not prove the list is in construction (layer) order, or that
    do not keep one distance to the hidden layers ``names`` say."""
    if not is_collection(layer_numbers) or isinstance(layer_numbers, str | bytes | Mapping):
        raise ArgumentTypeError(
            f"from_megatron: layer_numbers must be the RouterReplay layer_number of each tensor, in the list's order; "
            f"got {type(layer_numbers).__name__}"
        )
    numbers = list(layer_numbers)
    if not all(is_integer(n) and int(n) >= 0 for n in numbers):
        raise RoutesValidationError(f"from_megatron: layer_numbers must be integers >= 0, got {numbers[:8]!r:.80}")
    numbers = [int(n) for n in numbers]
    if len(numbers) != count:
        raise RoutesValidationError(f"from_megatron: {len(numbers)} layer_numbers for {count} Megatron layers")
    for j in range(1, count):
        if numbers[j] <= numbers[j - 1]:
            raise RoutesValidationError(
                f"from_megatron: tensor {j} is of layer {numbers[j]}, after layer {numbers[j - 1]}: Megatron's list "
                "is in the order its routers were built, layer order, so this list was reordered on the way (each "
                "router would get another layer's routes). Pass the tensors in layer order, with their layer_numbers"
            )
    rx = re.compile(LAYER_PATTERN)
    distance: dict[str, tuple[int, str, int]] = {}  # (names of one stack, decoder or MTP, keep one distance)
    for n, number in zip(names, numbers, strict=True):
        m = rx.search(n) if isinstance(n, str) else None
        if m is None:
            continue
        stack, d = n[: m.start(1)], number - int(m.group(1))
        seen = distance.setdefault(stack, (d, n, number))
        if seen[0] != d:
            raise RoutesValidationError(
                f"from_megatron: router '{seen[1]}' is given layer_number {seen[2]} and '{n}' {number}, not one "
                "distance from the layers their names say: the names are of other routers than the list's tensors. "
                "Pass the names of the routers the tensors are of, in the list's order"
            )


_MEGATRON_AXES = ("tokens,k", "k,tokens")


def _megatron_axes(axes: Any) -> bool:
    """Whether ``axes=`` of :func:`from_megatron` says the tensors are transposed (``"k,tokens"``)."""
    told = axes.replace(" ", "") if isinstance(axes, str) else None
    if told not in _MEGATRON_AXES:
        raise InvalidArgumentError(
            f"from_megatron: axes={axes!r:.60}, but axes names the order of each tensor's two axes: 'tokens,k' (as "
            "Megatron writes it) or 'k,tokens' (transposed)"
        )
    return told == "k,tokens"


def _no_repeat(t: torch.Tensor) -> bool:
    """Whether every row of ``t`` that is not all -1 holds no negative index and no expert twice."""
    rows = t[~(t < 0).all(dim=1)].long()
    if not rows.numel():
        return True
    if bool((rows < 0).any()):
        return False
    s = rows.sort(dim=1).values
    return not bool((s[:, 1:] == s[:, :-1]).any())


def _check_square(tensors: list[torch.Tensor]) -> None:
    """Refuse square ``[tokens, k]`` tensors (a micro-batch of k tokens) whose data does not prove their axes.

    A ``[k, tokens]`` tensor of k tokens has the shape of ``[tokens, k]``, and read so it gives each token the
    experts of one choice rank across tokens. Top-k experts are distinct in a row: where every layer holds
    no expert twice in a row read either way (and is not its own transpose), nothing tells the order.
    """
    square = [t for t in tensors if t.ndim == 2 and t.shape[0] == t.shape[1] and t.shape[0] > 1]
    if len(square) != len(tensors) or not square:
        return
    if all(torch.equal(t, t.T) for t in square):
        return
    for i, t in enumerate(square):
        if not _no_repeat(t) and _no_repeat(t.T):
            raise RoutesValidationError(
                f"from_megatron: Megatron layer {i} is {t.shape[0]}x{t.shape[1]} and repeats an expert in a row read "
                "as Megatron's [tokens, k], but not read as a transposed [k, tokens]. If the tensors were "
                "transposed, pass axes='k,tokens'"
            )
    if all(_no_repeat(t) and _no_repeat(t.T) for t in square):
        n = square[0].shape[0]
        raise RoutesValidationError(
            f"from_megatron: each tensor is {n}x{n}, a micro-batch of as many tokens as k, so it reads as Megatron's "
            f"[tokens, k] and as a transposed [k, tokens] alike (no expert twice in a row either way), and each "
            "reading gives every token other experts. Pass axes='tokens,k' if the tensors are Megatron's own "
            "(get_recorded_data()), axes='k,tokens' if they were transposed"
        )


def _seq_first(n: int, batch_size: Any) -> torch.Tensor:
    """Index mapping batch-major ``[B, S]`` rows to Megatron's sequence-first ``[S, B]`` order.

    ``batch_size`` must be an integer: 2.5 is refused, not cut to 2 (which would reorder
    the rows as two sequences).
    """
    if not is_integer(batch_size):
        raise InvalidArgumentError(f"batch_size must be an integer (the sequences of the batch), got {batch_size!r}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise InvalidArgumentError(
            f"batch_size={batch_size}: a micro-batch holds at least one sequence. Pass the sequences of the [S, B] "
            "batch (B), or leave batch_size out for rows already batch-major (packed)"
        )
    if n % batch_size:
        divisors = [b for b in range(1, min(n, 64) + 1) if n % b == 0]
        raise RoutesValidationError(
            f"{n} rows do not split into batch_size={batch_size} sequences of one length ([S, B] rows hold S*B): "
            f"check batch_size against the micro-batch these rows are of (counts that divide {n}: "
            f"{divisors[:8]}{' ...' if len(divisors) > 8 else ''})"
        )
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

    The list order must match the order the routers were built in (layer order). Tokens
    are in the order the routers see them: a packed (THD) batch in packed order; an
    unpacked ``[S, B]`` batch sequence-first, which ``batch_size`` converts to from these
    batch-major routes.

    Args:
        layer_map: order routers by hidden layer and leave out MTP routers (default: the
            order of ``routes``, refused where their names say layers out of order).
        fill: Megatron gathers every forced index and has no "route natively" row; -1 rows
            are refused unless ``fill`` is given: they are then written as experts
            ``fill, fill + 1, ..., fill + k - 1``.

    A capture of routers that saw a ``[batch, positions]`` forward sequence-first is put in
    the order of its tokens first, and needs ``batch_size`` (without it, it is refused).
    """
    if layer_map is not None:
        check_map(layer_map, "to_megatron")
    if not isinstance(routes, Routes):
        raise RoutesValidationError(f"expected Routes, got {type(routes).__name__}")
    if fill is not None and not (is_integer(fill) and int(fill) >= 0):  # (checked whether or not a -1 row needs it)
        raise ArgumentTypeError(f"to_megatron: fill must be None or an expert number (an int >= 0), got {fill!r:.60}")
    if routes._token_rank is not None and batch_size is None and not order_untold(routes):  # (refused below)
        raise RoutesValidationError(
            "to_megatron: these routes were captured from routers that saw the tokens of a [batch, positions] forward "
            "sequence-first, so their rows are not in the order of their tokens, and without batch_size= the rows "
            "are written in the order given (a packed batch's). Pass batch_size= (the sequences of Megatron's [S, B] "
            "batch): the rows are put in the order of their tokens, then in Megatron's sequence-first order"
        )
    routes = in_token_order(routes, "to_megatron")
    routes._ensure_valid()  # (validate=False: a repeated expert collapses in Megatron's routing map)
    if layer_map is not None:
        placed = zip(layer_map.layers, layer_map.names, ordered(routes, layer_map), strict=True)
        pairs = sorted(((i, nm, t) for i, nm, t in placed if t is not None), key=lambda x: x[0])
        order, tensors = [nm for _, nm, _ in pairs], [t for _, _, t in pairs]
    else:
        _check_layer_order(
            routes.names, "Pass layer_map= (it orders the routers by hidden layer), or reorder with routes.select()"
        )
        tensors = list(routes.per_layer())
        order = list(routes.names)
    out = []
    for nm, t, e in zip(order, tensors, [routes.experts_per_layer[routes.names.index(n)] for n in order], strict=True):
        hole = (t < 0).all(dim=1)
        if bool(hole.any()):
            if fill is None:
                raise RoutesValidationError(
                    f"router '{nm}' has {int(hole.sum())} rows without a route (-1: the last token, padding, prefix "
                    "cache); Megatron's replay cannot route a token natively. Drop those tokens, or pass fill="
                )
            if not is_integer(fill) or not 0 <= int(fill) <= e - t.shape[1]:
                raise RoutesValidationError(f"fill={fill}: experts fill..fill+{t.shape[1] - 1} must exist (< {e})")
            t = t.clone()
            t[hole] = torch.arange(t.shape[1]) + int(fill)
        if batch_size is not None:
            t = t[_seq_first(t.shape[0], batch_size)]
        out.append(t.long().contiguous())
    return out


def from_megatron(
    tensors: Sequence[torch.Tensor],
    names: Sequence[str],
    num_experts: int | Sequence[int],
    *,
    batch_size: int | None = None,
    missing: str = "error",
    layer_numbers: Sequence[int] | None = None,
    axes: str | None = None,
) -> Routes:
    """Routes from Megatron's per-MoE-layer list (``RouterReplay.get_recorded_data()``).

    ``names`` are this model's routers in Megatron's layer order (names that say layers out
    of order are refused); ``batch_size`` converts
    sequence-first ``[S, B]`` token order back to batch-major.

    Megatron gathers every index and records no "route natively" row, so a negative index
    is refused by default (padding, or damage from another tool). ``missing="native"``
    reads a whole row of -1 as no route, as NeMo-RL's patched Megatron routes such rows
    natively (and as :func:`to_megatron` refuses to write without ``fill=``).

    The list's order is its only tie to the layers: the tensors hold no layer number, so a
    list reordered on the way (reversed, sorted by name as text) reads each router another
    layer's routes, and nothing in the tensors tells. ``layer_numbers`` proves it: the
    ``layer_number`` of each tensor's ``RouterReplay`` (Megatron-core 0.19,
    ``router_replay.py:111``), in the list's order. They must rise (construction order), and
    where ``names`` say their hidden layers, keep the same distance to them (Megatron numbers
    layers from 1, a pipeline stage from its offset): anything else is refused.

    ``axes`` names the order of each tensor's two axes: ``"tokens,k"`` as Megatron writes it, or
    ``"k,tokens"`` (a transposed tensor). It is needed only where the data cannot prove it: a
    micro-batch of as many tokens as k has square tensors, and where each layer read either way
    holds no expert twice in a row, it is refused without ``axes``. A one-token step of a top-1
    model (``[1, 1]``) and tensors equal to their own transpose read the same either way.

    The rows keep no place in their sequences (the engine readers' rows do): the list is a
    micro-batch of packed or ``[S, B]`` sequences whose boundaries, padding and order it does not
    hold, so a slice of these routes without token ids is checked by its row count alone. Lay
    them out with :class:`~moe_replay.BatchLayout`, or give them their ids
    (:meth:`~moe_replay.Routes.with_token_ids`), for a replay that checks each row's token.
    """
    if not is_collection(tensors):
        raise ArgumentTypeError(
            f"from_megatron takes a list of [tokens, k] index tensors, got {type(tensors).__name__}"
        )
    if isinstance(tensors, torch.Tensor | np.ndarray):  # (as Routes refuses it: iterating reads axis 0 as the layers)
        raise ArgumentTypeError(
            f"from_megatron takes Megatron's list of [tokens, k] tensors, one per MoE layer; got one "
            f"{type(tensors).__name__} of shape {tuple(tensors.shape)}, whose axes are not known: a [tokens, layers, "
            "k] array (routes.indices) would be read with tokens as layers. Pass list(t) of a [layers, tokens, k] "
            "stack, or t.unbind(1) of [tokens, layers, k]"
        )
    names = list(router_names(names, "from_megatron: names="))
    if all(isinstance(n, str) for n in names):  # (other kinds are refused by Routes below)
        _check_layer_order(names, "Pass names in the order of Megatron's list (get_recorded_data()), layer order")
    if layer_numbers is not None:
        _check_layer_numbers(layer_numbers, names, len(tensors))
    tensors = [
        torch.from_numpy(np.ascontiguousarray(as_array(t, f"Megatron layer {i}"))) for i, t in enumerate(tensors)
    ]
    if len(tensors) != len(names):
        stage = (
            " A pipeline stage's list holds only its own layers: pass the names of that stage's routers, in "
            "its layer order, or gather every stage's list first"
            if 0 < len(tensors) < len(names)
            else ""
        )
        raise RoutesValidationError(
            f"got {len(tensors)} Megatron layers for {len(names)} router names: give one name per tensor of the "
            f"list, the routers in Megatron's layer order.{stage}"
        )
    if axes is not None and _megatron_axes(axes):
        tensors = [t.T.contiguous() if t.ndim == 2 else t for t in tensors]
    rows = [t.shape[0] if t.ndim else 0 for t in tensors]
    if len(set(rows)) > 1:  # every MoE layer routes every token of the micro-batch once
        raise RoutesValidationError(
            f"Megatron layers hold different token counts {rows}: each layer's [tokens, k] tensor routes the same "
            "tokens. Pass the tensors of one micro-batch (get_recorded_data() of one forward)"
        )
    if not is_one_of(missing, ("error", "native")):
        raise RoutesValidationError(f"from_megatron: missing must be 'error' or 'native', got {missing!r:.60}")
    for i, (nm, t) in enumerate(zip(names, tensors, strict=True)):
        if missing == "error" and t.numel() and t.dtype.is_signed and int(t.min()) < 0:  # (min has no uint16 kernel)
            row = int((t < 0).reshape(t.shape[0], -1).any(dim=1).nonzero()[0, 0]) if t.ndim else 0
            raise RoutesValidationError(
                f"Megatron layer {i} (router '{nm}') holds a negative index at token {row}: Megatron gathers every "
                "index and records no 'route natively' row, so this is padding or damage from another tool. If -1 "
                "rows mean 'route natively' (NeMo-RL's patched Megatron), pass missing='native'"
            )
    if axes is None:
        _check_square(tensors)
    if batch_size is not None:
        inverse = [torch.argsort(_seq_first(t.shape[0], batch_size)) for t in tensors]
        tensors = [t[i] for t, i in zip(tensors, inverse, strict=True)]
    return Routes(tensors, names=names, num_experts=num_experts)


def from_megatron_inference(
    routing_indices: Any, layer_map: LayerMap, *, num_tokens: int | None = None, axes: str | None = None
) -> Routes:
    """Routes of one sequence from Megatron inference's ``routing_indices``.

    ``DynamicInferenceRequest.routing_indices`` is ``[total_tokens - 1, num_moe_layers, k]``
    int32: MoE layers only, in layer order, the last token unrouted.

    Args:
        num_tokens: prompt plus generated tokens, to check the row count (without it the
            array's rows are taken as ``num_tokens - 1``: the array does not say its length,
            and only the replay's row count refuses a row too many or too few; a replay with
            ``strict=False`` that leaves rows of such routes unread is refused, since a row too
            many at the front would shift every token's experts: slice them, ``routes[:n]``,
            for a partial replay).
        axes: the order of the array's axes, ``"tokens,layers,k"`` as Megatron writes it, or
            another order of those names (``"layers,tokens,k"``: a stack of per-layer arrays).
            Needed only where the data cannot prove it: an array with as many rows as MoE
            layers (or as many MoE layers as k) that fits the LayerMap read in either order is
            refused without it.

    Returns:
        ``rows + 1`` tokens, the last one -1; row t is token t of the sequence and keeps that
        place (a slice of them is forced only on tokens fed at their places).
    """
    check_map(layer_map, "from_megatron_inference")
    arr = in_axes(as_array(routing_indices, "routing_indices"), axes, "Megatron routing_indices")
    if arr.dtype.name in ("uint8", "uint16", "int16"):
        raise RoutesValidationError(
            f"routing_indices is {arr.dtype}; Megatron inference writes int32, and a cast to a narrower type may have "
            "wrapped expert ids into other experts: pass the int32 array of DynamicInferenceRequest.routing_indices"
        )
    if num_tokens is not None:
        check_routed_rows(arr, check_count(num_tokens, "num_tokens"), "routing_indices")
    check_axes(arr, layer_map, "moe", "Megatron routing_indices", told=axes is not None)
    layers = columns(arr, layer_map, "moe", "Megatron routing_indices")
    routes = make_routes(with_last(layers), layer_map, "Megatron routing_indices")
    return routes if num_tokens is not None else rows_untold(routes, "from_megatron_inference")


def to_megatron_inference(routes: Routes, layer_map: LayerMap, *, drop_last: bool = False) -> np.ndarray:
    """Megatron inference's ``routing_indices`` for one sequence: ``[T - 1, num_moe_layers, k]`` int32."""
    check_map(layer_map, "to_megatron_inference")
    body = cut_last(routes, drop_last, "Megatron routing_indices")
    return to_array(body, layer_map, "moe", np.int32, "Megatron routing_indices", allow_missing=False)


#: The two ``TransformerConfig`` settings whose pair silently skips replay.
_REPLAY_SETTINGS = ("moe_enable_routing_replay", "moe_router_fusion")


def _replay_settings(config: Any) -> dict[str, Any]:
    """The settings of ``_REPLAY_SETTINGS`` that ``config`` holds: a mapping's items, else an object's attributes."""
    if isinstance(config, Mapping):
        # (a misspelt key, or one spelt with dashes, is no setting: the check would pass on what it never read)
        keys = {k.replace("-", "_").lower(): k for k in config if isinstance(k, str) and k not in _REPLAY_SETTINGS}
        for key in _REPLAY_SETTINGS:
            near = [keys[k] for k in difflib.get_close_matches(key, list(keys), n=1, cutoff=0.9)]
            if key not in config and near:
                raise InvalidArgumentError(
                    f"check_megatron_config: the config holds {near[0]!r}, not {key!r}: a misspelt setting would be "
                    f"read as off. Spell it {key!r}"
                )
        return {key: config[key] for key in _REPLAY_SETTINGS if key in config}
    return {key: getattr(config, key) for key in _REPLAY_SETTINGS if hasattr(config, key)}


_ON, _OFF = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "", "none", "null")


def _setting_on(key: str, value: Any) -> bool:
    """Whether the flag ``key`` of a config is on: a bool (numpy's, a 0-d tensor's), 0 or 1, None (off), or the text
    a YAML/JSON/env config spells it in (``"false"``, ``"True"``, ``"0"``): never the truth of a non-empty string,
    which reads ``"false"`` as on. Anything else is refused rather than guessed."""
    if value is None:
        return False
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool | np.bool_) or (is_integer(value) and int(value) in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _ON + _OFF:
        return value.strip().lower() in _ON
    raise InvalidArgumentError(
        f"check_megatron_config: {key}={value!r:.60} is not a flag Megatron reads (True or False, or the text "
        "'true'/'false'); pass the config's boolean"
    )


def check_megatron_config(config: Any) -> None:
    """Refuse a Megatron ``TransformerConfig`` whose router would skip routing replay.

    In megatron-core 0.19, ``moe_router_fusion=True`` returns from the fused top-k before
    the replay hook is reached, so ``moe_enable_routing_replay`` then does nothing, and
    nothing in Megatron checks the pair.

    Args:
        config: a ``TransformerConfig`` or any object with its attributes (Megatron's
            ``args``), or a mapping of its settings read by key (a YAML or JSON config,
            ``vars(config)``, a checkpoint's args). A setting it does not hold is off, as
            Megatron's default.

    Raises:
        UnsupportedRouterError: replay is enabled together with router fusion.
        ArgumentTypeError: ``config`` is not a mapping and holds neither setting (None, or not
            a Megatron config).
        InvalidArgumentError: ``config`` is a mapping that holds neither setting, or a key that
            misspells one (``moe_enable_routing_replays``), or a setting that is no flag (text other
            than true/false, a number other than 0 and 1).
    """
    settings = _replay_settings(config)
    if not settings:
        why = (
            f"check_megatron_config found neither {_REPLAY_SETTINGS[0]} nor {_REPLAY_SETTINGS[1]} in this "
            f"{type(config).__name__}, so it cannot check it. Pass Megatron's TransformerConfig (or its args), or "
            "a mapping of its settings such as the YAML or JSON config (the section that holds them)"
        )
        if isinstance(config, Mapping):
            raise InvalidArgumentError(why)
        raise ArgumentTypeError(why)
    if all([_setting_on(key, settings.get(key)) for key in _REPLAY_SETTINGS]):
        raise UnsupportedRouterError(
            "moe_enable_routing_replay=True with moe_router_fusion=True: Megatron's fused router returns before "
            "the replay hook, so the routes would be ignored silently. Set moe_router_fusion=False"
        )
