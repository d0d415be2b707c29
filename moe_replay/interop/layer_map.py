"""The explicit map between an engine's layer numbering and a model's router names."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._checks import frozen_value, is_collection, is_integer, is_one_of, router_names
from ..errors import ArgumentTypeError, InvalidArgumentError, LayerMapError, UnknownRouterError
from ..routes import _MAX_EXPERTS, Routes
from ..session import Session

__all__ = ["LAYER_PATTERN", "LayerMap"]

#: How a router's module path names its hidden layer: ``model.layers.3.mlp.gate`` -> 3.
LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)"
_LAYOUTS = ("all", "moe")


def check_layout(layout: str) -> None:
    """``layout`` is "all" (a column per hidden layer) or "moe" (a column per MoE layer)."""
    if not is_one_of(layout, _LAYOUTS):
        raise LayerMapError(f"layout must be 'all' (every hidden layer) or 'moe' (MoE layers only), got {layout!r}")


def check_map(layer_map: Any, what: str) -> LayerMap:
    """``layer_map`` if it is a :class:`LayerMap`, else an error naming ``what`` takes one."""
    if not isinstance(layer_map, LayerMap):
        raise ArgumentTypeError(
            f"{what} takes a LayerMap as layer_map (LayerMap.from_session, from_routes or from_names), got "
            f"{type(layer_map).__name__}"
        )
    return layer_map


def _items(values: Any, what: str) -> tuple[Any, ...]:
    """``values`` as a tuple, or a LayerMapError when it is not a sequence."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise LayerMapError(f"{what} must be a sequence, one entry per router; got {values!r:.80}")
    return tuple(values)


def _config_layers(session: Any) -> int | None:
    """``config.num_hidden_layers`` (or ``num_layers``) of the session's model, when it has one."""
    ref = getattr(session, "_model_ref", None)
    model = ref() if callable(ref) else None
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _layer_pattern(pattern: Any) -> re.Pattern[str]:
    """``pattern`` compiled: a regular expression whose first group is the layer index."""
    if not isinstance(pattern, str | re.Pattern):
        raise ArgumentTypeError(f"pattern must be a regular expression (a str), got {type(pattern).__name__}")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise LayerMapError(f"pattern {pattern!r} is not a regular expression: {e}") from None
    if rx.groups < 1:
        raise LayerMapError(
            f"pattern {rx.pattern!r} has no group: its first group (...) must match the layer index, as in "
            r"r'layers\.(\d+)'"
        )
    return rx


#: The most hidden layers a LayerMap takes: engine arrays hold a column per hidden layer (the largest models have a
#: few hundred), and the map lists its dense layers one by one.
_MAX_LAYERS = 2**16


@frozen_value()
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

    Raises:
        LayerMapError: a field that does not hold what it names (a layer count, layer
            index, expert count or k that is not an integer: 3.7 is refused, never cut to
            3; k below 1 or above the router's expert count), repeated names or layers,
            routers past ``num_layers`` without ``mtp="native"``.

    Example:
        >>> import moe_replay as mr
        >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"], 3, 8, 2)
        >>> lm.dense_layers, lm.width("all"), lm.width("moe")
        ((0,), 3, 2)
    """

    names: tuple[str, ...]
    layers: tuple[int, ...]
    num_layers: int
    num_experts: tuple[int, ...]
    top_k: tuple[int, ...]
    mtp: str = "error"

    def __post_init__(self) -> None:
        self._check_values()
        n = len(self.names)
        if not n:
            raise LayerMapError("a LayerMap needs at least one router")
        if not (len(self.layers) == len(self.num_experts) == len(self.top_k) == n):
            raise LayerMapError(
                f"LayerMap: {n} names, {len(self.layers)} layers, {len(self.num_experts)} expert counts and "
                f"{len(self.top_k)} k values; give one of each per router"
            )
        if self.num_layers < 1:
            raise LayerMapError(f"num_layers must be the engine's hidden-layer count (>= 1), got {self.num_layers}")
        if not is_one_of(self.mtp, ("error", "native")):
            raise LayerMapError(f"mtp must be 'error' or 'native', got {self.mtp!r}")
        twice = sorted({nm for nm in self.names if self.names.count(nm) > 1})
        if twice:  # (a name's column is found by its first place: the second would write or read the first's)
            raise LayerMapError(f"router names repeat: {twice[:4]}; a LayerMap names each router once")
        neg = [nm for nm, i in zip(self.names, self.layers, strict=True) if i < 0]
        if neg:
            raise LayerMapError(f"routers {neg} have a negative layer index")
        seen: dict[int, str] = {}
        for nm, i in zip(self.names, self.layers, strict=True):
            if i in seen:
                raise LayerMapError(
                    f"routers '{seen[i]}' and '{nm}' both map to hidden layer {i}; an engine records one router "
                    "per layer. Exclude one from the session (a shared-expert gate?) or give layers= explicitly"
                )
            seen[i] = nm
        self._check_order()
        extra = self.extra_names
        if extra and self.mtp == "error":
            at = [self.layers[self.names.index(x)] for x in extra]
            raise LayerMapError(
                f"routers {list(extra)[:4]} sit at layers {at[:4]}, but num_layers={self.num_layers} gives the "
                f"engine hidden layers 0..{self.num_layers - 1} only. If the model has more hidden layers, "
                f"num_layers is wrong: pass its config.num_hidden_layers (at least {max(at) + 1}). If these are "
                "multi-token-prediction (MTP) layers past the last hidden layer, which engines do not record, "
                "build the map with mtp='native' to route them natively, or exclude them from the session"
            )

    def _check_order(self) -> None:
        """The layers given keep the order the routers' names number them in, within each stack of layers.

        ``model.layers.1.mlp.gate`` at hidden layer 2 and ``model.layers.2.mlp.gate`` at layer 1 contradict each
        other: the engine's columns would be read into the other router (every token given another layer's experts).
        An offset that keeps the order (a pipeline stage numbering its layers from 0, names of no number) is taken;
        names numbered in other stacks (``encoder.layers.0`` and ``decoder.layers.0``) are not compared.
        """
        rx = re.compile(LAYER_PATTERN)
        stacks: dict[str, list[tuple[int, int, str]]] = {}
        for nm, layer in zip(self.names, self.layers, strict=True):
            m = rx.search(nm)
            if m is not None:
                stacks.setdefault(nm[: m.start(1)], []).append((int(m.group(1)), layer, nm))
        for rows in stacks.values():
            rows.sort()
            for (a, la, na), (b, lb, nb) in itertools.pairwise(rows):
                if a < b and la > lb:
                    raise LayerMapError(
                        f"LayerMap: router '{na}' is numbered before '{nb}' by its name, but is mapped to hidden "
                        f"layer {la}, after '{nb}''s layer {lb}: the names and layers contradict each other, and the "
                        "engine's columns would be read into other routers. Give each router its own layer "
                        "(layers=[...] in the order of names), or build the map with LayerMap.from_names(names, ...) "
                        "to read them from the names"
                    )

    def _check_values(self) -> None:
        """Every field holds what it names: integers are integers (3.7 layers is refused, never cut to 3).

        Stores them as plain ``int`` tuples (numpy and 0-d tensor integers are taken).
        """
        if isinstance(self.names, str) or not all(isinstance(nm, str) for nm in _items(self.names, "names")):
            raise LayerMapError(f"names must be router module paths (a sequence of str), got {self.names!r:.80}")
        if not is_integer(self.num_layers):
            raise LayerMapError(f"num_layers must be an integer (config.num_hidden_layers), got {self.num_layers!r}")
        if int(self.num_layers) > _MAX_LAYERS:  # (an engine array holds a column per layer: one per layer is built)
            raise LayerMapError(
                f"num_layers={self.num_layers} is more hidden layers than a model has (at most {_MAX_LAYERS} are "
                "taken): pass the model's config.num_hidden_layers"
            )
        fields: dict[str, tuple[int, ...]] = {}
        for attr, low in (("layers", 0), ("num_experts", 1), ("top_k", 1)):
            values = _items(getattr(self, attr), attr)
            bad = [v for v in values if not is_integer(v)]
            if bad:
                raise LayerMapError(f"{attr} must be integers, one per router; got {bad[0]!r}")
            fields[attr] = tuple(int(v) for v in values)
            if attr != "layers" and any(v < low for v in fields[attr]):
                raise LayerMapError(f"{attr} must be at least {low} for every router, got {list(fields[attr])[:8]}")
            if attr == "num_experts" and any(v > _MAX_EXPERTS for v in fields[attr]):  # (as Routes refuses them)
                raise LayerMapError(
                    f"num_experts must be at most {_MAX_EXPERTS} (expert numbers fit an int32 on every engine), got "
                    f"{max(fields[attr])}"
                )
        over = [(k, e) for k, e in zip(fields["top_k"], fields["num_experts"], strict=False) if k > e]
        if over:
            raise LayerMapError(f"top_k={over[0][0]} is more than the {over[0][1]} experts of a router")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "num_layers", int(self.num_layers))
        for attr, values in fields.items():
            object.__setattr__(self, attr, values)

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
        try:  # (read once: an iterator would be empty the second time)
            names = router_names(names, "names=")
        except ArgumentTypeError as e:  # (a map that cannot be built: this class's own error, as before)
            raise LayerMapError(f"names must be router module paths in order: {e}") from e
        if layers is not None and not is_collection(layers):
            raise LayerMapError(f"layers must be one hidden-layer index per router (a list of int), got {layers!r:.60}")
        if layers is None:
            rx = _layer_pattern(pattern)
            found = []
            for nm in names:
                m = rx.search(nm)
                index = None if m is None else m.group(1)
                if index is None or not index.isdecimal():
                    raise LayerMapError(
                        f"cannot find a layer index in router name '{nm}' (pattern {pattern!r}"
                        + ("" if m is None else f" matches {m.group(0)!r}, whose first group is not a number")
                        + "); pass layers=[...] with the hidden-layer index of each router"
                    )
                found.append(int(index))
            layers = found
        if not (is_integer(num_experts) or is_collection(num_experts)):
            raise InvalidArgumentError(f"num_experts must be an int or one int per router, got {num_experts!r}")
        given: Any = num_experts  # (an int or a collection of them, checked just above)
        counts = (given,) * len(names) if is_integer(given) else tuple(given)
        if not all(is_integer(x) for x in counts):
            raise InvalidArgumentError(f"num_experts must be an int or one int per router, got {num_experts!r}")
        if not (is_integer(top_k) or is_collection(top_k)):
            raise InvalidArgumentError(f"top_k must be an int or one int per router, got {top_k!r}")
        given = top_k
        k = (given,) * len(names) if is_integer(given) else tuple(given)
        return cls(names, tuple(layers), num_layers, counts, k, mtp)  # (each checked there)

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
        """The routers of an attached session; ``num_layers`` is the model's ``config.num_hidden_layers``.

        Raises:
            LayerMapError: ``num_layers`` differs from the model's own
                ``config.num_hidden_layers`` (or ``num_layers``), or the routers do not fit it.
        """
        if not isinstance(session, Session):
            raise ArgumentTypeError(
                f"from_session takes the Session mr.attach returned, got {type(session).__name__}"
                + (
                    "; for routes, LayerMap.from_names(routes.names, num_layers, routes.experts_per_layer, "
                    "routes.k_per_layer)"
                    if isinstance(session, Routes)
                    else ""
                )
            )
        configured = _config_layers(session)
        if not is_integer(num_layers):
            raise LayerMapError(f"num_layers must be an integer (config.num_hidden_layers), got {num_layers!r}")
        if configured is not None and configured != int(num_layers):
            raise LayerMapError(
                f"num_layers={num_layers}, but the model's config says {configured} hidden layers. Pass "
                f"num_layers={configured}: the engine numbers layers as the model's config does"
            )
        sites = session.sites
        unknown = [s.name for s in sites if s.top_k is None or s.num_experts is None]
        if unknown:
            raise LayerMapError(
                f"the k (or expert count) of routers {unknown[:3]} is not known yet: it is read from each router's "
                "decision at its first forward. Run one forward first (session.verify(example) does it)"
            )
        return cls.from_names(
            [s.name for s in sites],
            num_layers,
            [s.num_experts for s in sites if s.num_experts is not None],
            [s.top_k for s in sites if s.top_k is not None],
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
        if not isinstance(routes, Routes):
            raise ArgumentTypeError(f"LayerMap.from_routes takes Routes, got {type(routes).__name__}")
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
            raise LayerMapError(f"routers differ in k ({sorted(ks)}); engine arrays hold one k for all layers")
        return ks.pop()

    @property
    def max_experts(self) -> int:
        """The largest expert count of any router (what an engine sizes its dtype by)."""
        return max(self.num_experts)

    def width(self, layout: str) -> int:
        """Layer columns of an engine array: all hidden layers, or MoE layers only."""
        check_layout(layout)
        return self.num_layers if layout == "all" else len(self.moe_layers)

    def column(self, name: str, layout: str) -> int | None:
        """The engine column of router ``name`` (None for an MTP router).

        Raises:
            UnknownRouterError: no router of the map is called ``name``.
            LayerMapError: ``layout`` is neither "all" nor "moe".
        """
        check_layout(layout)
        if not is_one_of(name, self.names):
            raise UnknownRouterError(f"no router named {name!r:.80} in this LayerMap; routers: {list(self.names)[:8]}")
        i = self.layers[self.names.index(name)]
        if i >= self.num_layers:
            return None
        return i if layout == "all" else self.moe_layers.index(i)

    def __repr__(self) -> str:
        return (
            f"LayerMap(routers={len(self.names)}, num_layers={self.num_layers}, moe_layers={len(self.moe_layers)}, "
            f"dense_layers={_few(self.dense_layers)}, mtp={_few(self.extra_names)})"
        )


def _few(values: Sequence[Any], most: int = 8) -> str:
    """``values`` as a list, its middle left out past ``most`` items: a repr of a map of many dense layers (or MTP
    routers) stays one line."""
    if len(values) <= most:
        return repr(list(values))
    head = ", ".join(repr(v) for v in values[: most - 2])
    return f"[{head}, ... (+{len(values) - most + 1} more), {values[-1]!r}]"
