"""Routing comparison: how often two sets of routes choose different experts.

:func:`compare` computes the figures the R3 paper (arXiv 2510.11370) reports for an
inference engine against a training forward on the same tokens: the share of router
decisions that differ (about 10% for Qwen3-30B-A3B there), the share of tokens that
differ in at least one router (94% there), plus the mean number of differing routers
per token and each side's expert load.

**What a decision is.** One router's choice for one token: the *set* of its k experts.
Two decisions are the same when they pick the same experts, in any order: the MoE
output sums the chosen experts' outputs, so the order of the k slots does not change
which experts run (R3 replays the binary expert-selection mask). ``mode="slot"``
compares slot by slot instead (same experts in the same order), for checking that a
conversion kept the order.

Rows of -1 (no recorded route) on either side are excluded and counted, and so are rows a
capture recorded at prompt padding (attention mask 0: the router ran on the token of no
sequence), where the routes know it.

Example:
    >>> import torch, moe_replay as mr
    >>> a = mr.Routes([torch.tensor([[0, 1], [2, 3], [0, 2]])], names=["gate"], num_experts=4)
    >>> b = mr.Routes([torch.tensor([[1, 0], [2, 1], [-1, -1]])], names=["gate"], num_experts=4)
    >>> c = mr.compare(a, b)
    >>> c.overall, c.excluded.tolist()       # [1, 0] equals [0, 1] as a set; the -1 row is left out
    (0.5, [1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ._checks import frozen_value, is_integer, is_one_of, router_names
from ._feeds import unmarked_places
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    MissingDependencyError,
    RoutesValidationError,
    UnknownRouterError,
)
from .routes import Routes, _rows_ids, in_token_order, order_untold
from .session import _WRAPPER_NAMES, _prefix_maps, _unwrapped_map

__all__ = ["RoutingComparison", "compare"]


@frozen_value(
    "it holds what mr.compare(a, b) computed; compare again (names=, mode=, labels=), or keep values of your own "
    "beside it (report.as_dict() is a dict of them)"
)
@dataclass(frozen=True, repr=False, eq=False)
class RoutingComparison:
    """What :func:`compare` returns. Fractions are of compared decisions or tokens.

    Attributes:
        names: the routers compared, in order.
        mode: ``"set"`` or ``"slot"``.
        differ: per router, decisions that differ.
        compared: per router, decisions compared (rows recorded on both sides).
        excluded: per router, rows left out (-1 on either side, or recorded at prompt padding
            on either side).
        tokens: tokens with at least one compared decision.
        tokens_differ: of those, tokens where at least one router differs.
        differing_routers: differing decisions summed over tokens.
        shared_experts: per router, experts the two sides share, summed over compared rows.
        top_k: per router.
        load_a, load_b: ``[routers, max experts]`` how many compared tokens each expert
            received on each side (0 past a router's own expert count).
        labels: what ``a`` and ``b`` are, for the plot's legend (``("a", "b")`` unless given).
        num_experts: per router (empty when not given: the width of ``load_a`` for each).
        padding_rows: of the rows left out, those recorded at prompt padding on either side
            (summed over routers).
    """

    names: tuple[str, ...]
    mode: str
    differ: np.ndarray
    compared: np.ndarray
    excluded: np.ndarray
    tokens: int
    tokens_differ: int
    differing_routers: int
    shared_experts: np.ndarray
    top_k: tuple[int, ...]
    load_a: np.ndarray
    load_b: np.ndarray
    labels: tuple[str, str] = ("a", "b")
    num_experts: tuple[int, ...] = ()
    padding_rows: int = 0

    def __eq__(self, other: object) -> bool:
        """Same routers, mode, labels and counts (the arrays compared element by element)."""
        if not isinstance(other, RoutingComparison):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name))
            if isinstance(getattr(self, f.name), np.ndarray)
            else getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def per_layer(self) -> np.ndarray:
        """Fraction of decisions that differ, per router (NaN where nothing was compared)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.compared > 0, self.differ / np.maximum(self.compared, 1), np.nan)

    @property
    def overall(self) -> float:
        """Fraction of all compared decisions that differ."""
        total = int(self.compared.sum())
        return float(self.differ.sum() / total) if total else float("nan")

    @property
    def token_fraction(self) -> float:
        """Fraction of compared tokens that differ in at least one router."""
        return self.tokens_differ / self.tokens if self.tokens else float("nan")

    @property
    def routers_per_token(self) -> float:
        """Mean number of differing routers per compared token."""
        return self.differing_routers / self.tokens if self.tokens else float("nan")

    @property
    def overlap(self) -> float:
        """Mean share of the k experts that both sides chose, over compared decisions."""
        slots = float((self.compared * np.asarray(self.top_k)).sum())
        return float(self.shared_experts.sum() / slots) if slots else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The headline figures and per-router fractions, as plain Python values."""
        return {
            "mode": self.mode,
            "overall": self.overall,
            "token_fraction": self.token_fraction,
            "routers_per_token": self.routers_per_token,
            "overlap": self.overlap,
            "tokens": self.tokens,
            "excluded_rows": int(self.excluded.sum()),
            "padding_rows": self.padding_rows,
            "per_layer": dict(zip(self.names, [float(x) for x in self.per_layer], strict=True)),
            "labels": self.labels,
        }

    def __repr__(self) -> str:
        decisions = int(self.compared.sum())
        named = "" if self.labels == ("a", "b") else f", labels={self.labels!r}"
        padded = f" ({self.padding_rows} at padding)" if self.padding_rows else ""
        lines = [
            f"RoutingComparison(mode={self.mode!r}, routers={len(self.names)}, tokens={self.tokens}, "
            f"excluded_rows={int(self.excluded.sum())}{padded}{named})",
            f"  decisions differing:            {_pct(self.overall)} ({int(self.differ.sum())} of {decisions})",
            f"  tokens differing in any router: {_pct(self.token_fraction)} ({self.tokens_differ} of {self.tokens})",
            f"  differing routers per token:    {_num(self.routers_per_token)}",
            f"  experts shared per decision:    {_pct(self.overlap)}",
        ]
        per = [f"{n}: {_pct(x)}" for n, x in zip(self.names, self.per_layer, strict=True)]
        shown = per[:8] + ([f"... (+{len(per) - 8} more)"] if len(per) > 8 else [])
        lines.append("  per router: " + ", ".join(shown))
        return "\n".join(lines)

    def _router_position(self, router: str | int) -> int:
        """Position in :attr:`names` of a router given by name or position."""
        if isinstance(router, str):
            if router not in self.names:
                raise UnknownRouterError(f"no router named '{router}' in this comparison; routers: {list(self.names)}")
            return self.names.index(router)
        if not is_integer(router):  # (a numpy integer or a 0-d integer tensor: the position it holds)
            raise ArgumentTypeError(f"router must be a router name or a position in names, got {router!r:.60}")
        if not -len(self.names) <= int(router) < len(self.names):
            raise InvalidArgumentError(
                f"router={int(router)} is out of range: this comparison holds {len(self.names)} router(s)"
            )
        return int(router) % len(self.names)

    def plot(self, *, router: str | int | None = None) -> Any:
        """Two panels: the share of differing decisions per router, and expert load on each side.

        Routers are labelled by their layer number when their names differ only in it
        (``model.layers.N.mlp.gate``), else by the part of their names that differs. The
        legend names the two sides by :attr:`labels` (``compare(..., labels=...)``).

        Args:
            router: whose expert load to draw (name or position in :attr:`names`); default:
                summed over routers.

        Raises:
            UnknownRouterError, InvalidArgumentError, ArgumentTypeError: ``router`` names
                no router of the comparison.

        Returns:
            The matplotlib ``Figure``, closed in pyplot: a notebook shows it once when a cell ends with
            ``c.plot()`` (or ``display(fig)``); elsewhere ``fig.savefig(path)``. Needs matplotlib:
            ``pip install "moe_replay[plot]"``.

        Example:
            >>> import torch, moe_replay as mr
            >>> a = mr.Routes([torch.tensor([[0, 1], [2, 3]])] * 2, names=["l.0.gate", "l.1.gate"], num_experts=4)
            >>> fig = mr.compare(a, a, labels=("rollout", "training")).plot()
            >>> fig.axes[1].get_legend_handles_labels()[1], fig.axes[0].get_xlabel()
            (['rollout', 'training'], 'layer N (l.N.gate)')
        """
        try:
            import matplotlib.pyplot as plt
            from matplotlib.ticker import MaxNLocator
        except ImportError as e:
            raise MissingDependencyError(
                "RoutingComparison.plot() needs matplotlib: pip install 'moe_replay[plot]' (or matplotlib)"
            ) from e
        pos = None if router is None else self._router_position(router)  # before a figure is made
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))  # (on the user's backend: a notebook's draws it)
        ticks, axis = _router_labels(self.names)
        x = np.arange(len(self.names))
        per = self.per_layer
        left.set_xlabel(axis)
        step = max(1, -(-len(x) // 16))  # at most 16 tick labels
        long = max((len(t) for t in ticks), default=0) > 4
        left.set_xticks(x[::step], ticks[::step], rotation=30 if long else 0, ha="right" if long else "center")
        left.set_xlim(-0.6, len(x) - 0.4)
        if int(self.differ.sum()) == 0 and int(self.compared.sum()) > 0:
            left.set_yticks([])
            left.text(
                0.5,
                0.5,
                f"no difference\nall {int(self.compared.sum())} decisions are the same",
                transform=left.transAxes,
                ha="center",
                va="center",
                fontsize=12,
            )
            left.set_title(f"{self.labels[0]} vs {self.labels[1]}: no decision differs")
        else:
            left.bar(x, np.nan_to_num(per) * 100, color="tab:red")
            left.set_ylabel("decisions differing (%)")
            left.set_ylim(bottom=0)
            left.set_title(f"{_pct(self.overall)} of decisions, {_pct(self.token_fraction)} of tokens differ")
        for i in np.flatnonzero(np.isnan(per)):  # nothing compared: say so rather than draw a zero
            left.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, transform=left.get_xaxis_transform())
        excluded = int(self.excluded.sum())
        if excluded:  # the figures are of the compared rows only: say how many were left out
            rows = excluded + int(self.compared.sum())
            why = "-1 or padding on either side" if self.padding_rows else "-1 on either side"
            left.set_title(f"{left.get_title()}\n{excluded} of {rows} rows not compared ({why})")
        if pos is None:
            a, b = self.load_a.sum(axis=0), self.load_b.sum(axis=0)
            title, ylabel = "expert load, all routers", "token slots compared (all routers)"
        else:
            own = self.num_experts[pos] if self.num_experts else self.load_a.shape[1]  # not the widest router's
            a, b = self.load_a[pos, :own], self.load_b[pos, :own]
            title, ylabel = f"expert load, {self.names[pos]}", "tokens compared"
        xs = np.arange(a.shape[0])
        if len(xs) <= 32:
            right.bar(xs - 0.2, a, width=0.4, label=self.labels[0])
            right.bar(xs + 0.2, b, width=0.4, label=self.labels[1])
        else:  # paired bars of many experts blur into bands: two outlines instead
            right.step(xs, a, where="mid", label=self.labels[0])
            right.step(xs, b, where="mid", label=self.labels[1], alpha=0.8)
            right.set_ylim(bottom=0)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlim(-0.6, len(xs) - 0.4)
        right.set_xlabel("expert")
        right.set_ylabel(ylabel)
        right.set_title(title)
        right.legend()
        fig.tight_layout()
        # (closed in pyplot, not left open: a notebook cell ending in c.plot() shows the figure it returns once, not
        # again as an open figure at the cell's end, and a later plt.show() does not show it once more)
        plt.close(fig)
        return fig


def _router_labels(names: Sequence[str]) -> tuple[list[str], str]:
    """Short tick labels for routers, and the axis label that explains them.

    Names that differ in one integer part only give that integer (``layer`` axis, the
    pattern shown); otherwise the parts all names share at both ends are cut off.
    """
    if not names:
        return [], "router"
    parts = [n.split(".") for n in names]
    if len(names) > 1 and len({len(p) for p in parts}) == 1:
        varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(varying) == 1 and all(p[varying[0]].isdigit() for p in parts):
            i = varying[0]
            pattern = ".".join([*parts[0][:i], "N", *parts[0][i + 1 :]])
            return [p[i] for p in parts], f"layer N ({pattern})"
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    short = [".".join(p[head : len(p) - tail]) for p in parts]
    if len(names) == 1 or len(set(short)) < len(short):
        short = list(names)
    return short, "router"


def _only_wrappers(prefix: str) -> bool:
    """Is ``prefix`` (of a prefix change) made of wrappers' module names alone (DDP's ``module.``, PEFT's
    ``base_model.model.``, ``torch.compile``'s ``_orig_mod.``; see ``session._WRAPPER_NAMES``), or empty?"""
    return all(part in _WRAPPER_NAMES for part in prefix.split(".") if part)


def _named_as(b: Routes, a: Routes) -> Routes:
    """``b`` under ``a``'s router names, where the two hold the same routers of one model named through other wrappers.

    A capture of a model wrapped by DDP, ``torch.compile`` or PEFT names its routers ``module.layers.0...``,
    ``_orig_mod.layers.0...`` or ``base_model.model.layers.0...``; the same model's routes captured bare or read from an
    engine name them ``layers.0...``. A replay fits such names by itself; compared, they are paired by the one change
    of wrappers' module names (at the front, or inside the paths as FSDP1 and ``checkpoint_wrapper`` put them) that
    maps every router of ``b`` onto a distinct router of ``a``, all of them. Any other difference (another part of a
    model, another layer, a change that fits in more than one way) leaves ``b`` as it is, to be refused naming it.
    """
    if len(a.names) != len(b.names):
        return b
    candidates = [c for c in _prefix_maps(b.names, a.names) if _only_wrappers(c[0][0]) and _only_wrappers(c[0][1])]
    if len(candidates) == 1:
        return b.rename(dict([candidates[0][0]]))
    if not candidates and (by_path := _unwrapped_map(b.names, a.names)) is not None:
        return b.rename(by_path)
    return b


def _rename_hint(a: Routes, b: Routes) -> str:
    """How to fit ``b``'s router names onto ``a``'s, where one prefix change would (but not by wrappers alone, or in
    more than one way): the rename that says which."""
    fits = _prefix_maps(b.names, a.names) if len(a.names) == len(b.names) else []
    if not fits:
        return ""
    ways = "; ".join(f"b.rename({{{old!r}: {new!r}}})" for (old, new), _ in fits[:3])
    return f", or, where they are the same routers under other module names, rename one side first: {ways}"


def _in_one_order(a: Routes, b: Routes) -> tuple[Routes, Routes]:
    """``a`` and ``b`` with their rows in one order, where one holds rows recorded sequence-first and the other not.

    Routers that see a ``[batch, positions]`` forward sequence-first (layers that run ``[positions, batch, hidden]``)
    record position 0 of every sequence first; an engine's routes and the batch layouts hold the same tokens
    sequence by sequence. Compared row by row, each row of one would meet another token's row of the other. Where
    both know their token ids, both are put in the order of their tokens (and the ids then checked); otherwise which
    rows are the same tokens cannot be told, and that is refused.
    """
    ra, rb = a._token_rank, b._token_rank
    # rows in an order no one told, met with rows in another (or with some in another): refused
    if (order_untold(a) or order_untold(b)) and not (order_untold(a, every=True) and order_untold(b, every=True)):
        in_token_order(a if order_untold(a) else b, f"compare(): {'a' if order_untold(a) else 'b'}")
    if (ra is None and rb is None) or (ra is not None and rb is not None and torch.equal(ra, rb)):
        return a, b
    if a.token_ids is None or b.token_ids is None:
        first = "a" if ra is not None else "b"
        raise RoutesValidationError(
            f"the rows of {first} were recorded by routers that saw the tokens sequence-first (position 0 of every "
            f"sequence, then position 1...), those of {'b' if first == 'a' else 'a'} in another order, and not both "
            "know their token ids, so which rows are the same tokens cannot be told. Lay the capture out sequence by "
            "sequence first (mr.Routes.cat(mr.BatchLayout.padded(lengths).unpack(routes))), or give both their token "
            "ids (with_token_ids)"
        )
    return in_token_order(a, "compare()"), in_token_order(b, "compare()")


def _check_same_tokens(a: Routes, b: Routes, names: Sequence[str]) -> None:
    """Refuse routes that know their tokens (:attr:`Routes.token_ids`, or each router's own, where its rows are not
    one per token of the same forwards: a router also called on hidden states of one's own, the models of a holder
    called each on its own) and were recorded for other tokens."""
    ids_a, ids_b = a.token_ids, b.token_ids
    if ids_a is not None and ids_b is not None:
        pairs = [("", ids_a, ids_b)]
    else:  # (each router's own ids, where either side knows them)
        pairs = [(n, _rows_ids(a, a.names.index(n)), _rows_ids(b, b.names.index(n))) for n in names]
    for name, x, y in pairs:
        if x.shape != y.shape:
            continue
        wrong = ((x != y) & (x >= 0) & (y >= 0)).nonzero()
        if wrong.numel():
            row = int(wrong[0, 0])
            where = f"router '{name}', " if name else ""
            raise RoutesValidationError(
                f"the two were recorded for other tokens: {where}row {row} is token {int(x[row])} in a but "
                f"{int(y[row])} in b ({wrong.shape[0]} of {x.shape[0]} rows differ), so their decisions are not "
                "comparable; compare routes of the same tokens in the same order (or drop the ids with "
                "with_token_ids(None) to compare them anyway)"
            )
    _check_same_places_in_sequences(a, b)


def _check_same_places_in_sequences(a: Routes, b: Routes) -> None:
    """Refuse rows of one token id that were recorded at other places in their sequences (``Routes._seq_pos``).

    A token id alone does not tell a token: a run of one repeated id (padding fed as tokens, a line of spaces, the
    same prompt twice) gives every row of it one id, so rows cut or picked out of it at other places pass the id
    check while each is compared with another token's decision, made after other tokens. A replay refuses such rows
    by the same places; here they are checked where both sides know each row's id and place. Dropping the ids
    (``with_token_ids(None)``) compares the rows anyway, as it does for other ids.
    """
    ids_a, ids_b = a.token_ids, b.token_ids
    pa, pb = a._seq_pos, b._seq_pos
    if ids_a is None or ids_b is None or pa is None or pb is None:
        return
    if not ids_a.shape == ids_b.shape == pa.shape == pb.shape:
        return
    pa, pb = unmarked_places(pa), unmarked_places(pb)
    wrong = ((ids_a >= 0) & (ids_b >= 0) & (pa >= 0) & (pb >= 0) & (pa != pb)).nonzero().flatten()
    if wrong.numel():
        row = int(wrong[0])
        raise RoutesValidationError(
            f"the two were recorded for other tokens: row {row} is token {int(ids_a[row])} on both sides, but at "
            f"place {int(pa[row])} of its sequence in a and at place {int(pb[row])} in b ({wrong.numel()} of "
            f"{ids_a.numel()} rows differ so), so each decision was made after other tokens and they are not "
            "comparable. Were rows cut or picked out of their sequences on one side (routes[1:], routes[::2], "
            "halves joined in another order)? Compare routes of the same tokens in the same order (or drop the ids "
            "with with_token_ids(None) to compare them anyway)"
        )


def _check_same_places(a: Routes, b: Routes) -> None:
    """Refuse routes laid out by a :class:`~moe_replay.BatchLayout` compared with rows of another batch, where
    nothing else tells (routes that know no token ids): each row's place in its sequence against the other side's
    (two layouts: a sequence's token at another place), or against the mask a capture was fed (a sequence's token at a
    row the capture recorded at padding). Either means that the rows compared are not the same tokens (the batch
    padded on the other side, sequences of other lengths or in another order), and the figures would be of other
    tokens' decisions."""
    if len(set(a.tokens_per_layer)) != 1 or a.tokens_per_layer != b.tokens_per_layer:
        return  # (routers of other row counts: no row is one token of one batch)
    t = a.tokens_per_layer[0]
    _check_same_padding(a, b, t)
    pa, pb = (r._layout_pos if r._layout_pos is not None and r._layout_pos.shape == (t,) else None for r in (a, b))
    if pa is None and pb is None:
        return
    if pa is not None and pb is not None:
        wrong = (pa >= 0) & (pb >= 0) & (pa != pb)
        if not _ids_check(a, b, (pa >= 0) | (pb >= 0)):
            # (a token in one layout at padding in the other: sequences of other lengths or in another order, whose
            # tokens at the same places are other tokens; ids on both sides check each row instead)
            wrong |= ((pa >= 0) & (pb == -1)) | ((pa == -1) & (pb >= 0))
        what = (
            "holds a token of a sequence in the layout of one, but a token at another place in its sequence, or "
            "padding, in the layout of the other"
        )
    else:
        (places, laid, other) = (pa, a, b) if pa is not None else (pb, b, a)
        fed = other._fed_mask
        known = fed is not None and fed.shape == (t,) and bool((fed >= 0).any())
        told = places is not None and _ids_check(laid, other, places >= 0)  # (then _check_same_tokens did)
        if places is not None and not known and not told and bool((places < 0).any()):
            # (a capture of a padded batch fed no mask keeps nothing of where its sequences sit: padded on the
            # other side, each of its rows is compared with another token's)
            raise RoutesValidationError(
                f"one side was laid out for a padded batch ({int((places < 0).sum())} rows of padding), and the other "
                "knows neither its token ids nor where its batch was padded (a capture fed no attention mask), so "
                "nothing tells whether its rows are the same tokens. Feed the captured forward its attention_mask, "
                "or give both their token ids (with_token_ids)"
            )
        if places is None or fed is None or fed.shape != (t,):
            return
        wrong = (places >= 0) & (fed == 0)
        what = (
            "holds a token of a sequence in the layout of one, but padding in the batch the other was captured on "
            "(its attention mask 0 there)"
        )
        # (and a token of the capture at a row the layout holds padding: its sequences sit elsewhere, as a batch
        # padded on the other side fed a mask of ones, or sequences of other lengths; each token the layout holds
        # may then be at another place in the capture's sequence. Ids on both sides check each row instead)
        extra = (places == -1) & (fed == 1) & (not told)
        if bool(extra.any()) and not bool(wrong.any()):
            wrong = extra
            what = (
                "holds padding in the layout of one, but a token in the batch the other was captured on (its "
                "attention mask 1 there: its sequences sit elsewhere, and a token of the layout may be at another "
                "place in its sequence there)"
            )
    at = wrong.nonzero().flatten()
    if at.numel():
        raise RoutesValidationError(
            f"the two were laid out for other batches: row {int(at[0])} (and {at.numel() - 1} more) {what}, so "
            "the rows compared would be other tokens' decisions. Lay both out for the same batch (the same lengths, "
            "order and padding side: mr.BatchLayout of the batch as fed), or give them their token ids "
            "(with_token_ids) so that each row's token is checked"
        )


def _check_same_padding(a: Routes, b: Routes, t: int) -> None:
    """Refuse two captures whose prompt masks (``Routes._fed_mask``) put padding at a row where the other holds a token
    of a sequence, where the ids of both sides do not tell that row's token: a batch padded on the other side, or
    sequences of other lengths. Such a row is no decision of one side, and the row of the other side's token is
    another token's or padding, so leaving it out as padding would drop that token's decisions unsaid."""
    fa, fb = a._fed_mask, b._fed_mask
    if fa is None or fb is None or fa.shape != (t,) or fb.shape != (t,):
        return
    other = ((fa == 0) & (fb == 1)) | ((fa == 1) & (fb == 0))
    if not bool(other.any()) or _ids_check(a, b, other):
        return
    at = other.nonzero().flatten()
    pad, tok = ("a", "b") if int(fa[at[0]]) == 0 else ("b", "a")
    raise RoutesValidationError(
        f"the two were captured on batches padded otherwise: row {int(at[0])} (and {at.numel() - 1} more) is padding "
        f"in the batch {pad} was captured on (its attention mask 0 there) but a token of a sequence in {tok}'s (mask "
        "1), so the rows compared would not be the same tokens and that token's decisions would be left out as "
        "padding. Capture both on the batch padded the same way, or compare each sequence's rows (routes[i:j])"
    )


def _ids_check(a: Routes, b: Routes, rows: torch.Tensor) -> bool:
    """Do both sides know the token id of each of ``rows`` (a boolean ``[t]``), so that :func:`_check_same_tokens`
    compared them? An id of -1 (a part of unknown tokens joined to one of known) is compared with none."""
    ids_a, ids_b = a.token_ids, b.token_ids
    if ids_a is None or ids_b is None or ids_a.shape != rows.shape or ids_b.shape != rows.shape:
        return False
    return bool(((ids_a >= 0) & (ids_b >= 0) | ~rows).all())


def _padding_rows(r: Routes, t: int) -> torch.Tensor:
    """Boolean ``[t]``: the rows a capture recorded at prompt padding (attention mask 0).

    The router ran there on the token of no sequence: its choice is no decision of the model on a token (a
    replay refuses to put a sequence's token on such a row, see ``Session.replay``), so it is not compared. An id
    given since (``with_token_ids(input_ids)`` of the padded batch gives each such row the pad token's) does not
    make it one: the router still ran on padding there.
    """
    fed = r._fed_mask
    if fed is None or fed.shape != (t,):
        return torch.zeros(t, dtype=torch.bool)
    return fed == 0


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.2f}%"


def _num(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def compare(
    a: Routes,
    b: Routes,
    *,
    mode: str = "set",
    names: Sequence[str] | None = None,
    labels: tuple[str, str] = ("a", "b"),
) -> RoutingComparison:
    """Compare two routings of the same tokens, router by router.

    Args:
        a, b: routes of the same tokens (e.g. an engine's rollout and a training forward);
            routers are matched by name. Names that differ by wrappers' module names alone (a
            capture of the model under DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` or
            PEFT's ``base_model.model.`` against its bare routes) are paired as a replay pairs them,
            where one change fits every router; the report names them as ``a`` does. A capture of
            routers that saw the tokens sequence-first is compared with rows in another order (an
            engine's) token by token, where both know their :attr:`~moe_replay.Routes.token_ids`.
        mode: ``"set"`` (default): a decision is the set of k experts; ``"slot"``: the
            ordered k slots.
        names: compare only these routers (default: all, which both must hold).
        labels: what ``a`` and ``b`` are, for the plot's legend and the repr, e.g.
            ``("rollout", "training")``.

    Raises:
        RoutesValidationError: the two hold different routers, token counts, k or
            expert counts, were recorded for other tokens (both know their
            :attr:`~moe_replay.Routes.token_ids`, or each router's own where its rows are not one
            per token of the same forwards, and they differ; or where both know each row's token id and its
            place in its sequence, the same id at other places: rows cut or picked out of a run of one repeated
            token), were laid out by a
            :class:`~moe_replay.BatchLayout` for another batch than the other's (a sequence's token at
            another place in the other's layout, or at a row the other's capture recorded at padding),
            were captured on batches padded otherwise (a row padding in one and a token in the
            other, where their ids do not tell), or hold rows that are no
            decision (built with ``validate=False``: a row mixing -1 with experts, or
            repeating an expert), or one holds rows recorded sequence-first, the other rows in
            another order, and not both know their token ids, or one holds rows of forwards fed
            embeddings whose order the capture could not tell and the other does not.
        ArgumentTypeError, InvalidArgumentError: ``names`` is not a list of distinct
            router names, or is empty.

    Example:
        >>> import torch, moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
        >>> with mr.attach(model) as session:
        ...     with session.capture():
        ...         _ = model(x)
        ...     before = session.routes()
        ...     with torch.no_grad():  # flip the first router: it now picks its bottom-k
        ...         _ = model.layers[0].mlp.router.weight.neg_()
        ...     with session.capture():
        ...         _ = model(x)
        ...     after = session.routes()
        >>> report = mr.compare(before, after)
        >>> float(report.per_layer[0])  # every decision of the first router changed
        1.0
        >>> print(report)  # doctest: +ELLIPSIS
        RoutingComparison(mode='set', routers=2, tokens=16, excluded_rows=0)
          decisions differing: ...
    """
    if not is_one_of(mode, ("set", "slot")):
        raise InvalidArgumentError(f"mode must be 'set' or 'slot', got {mode!r}")
    if not isinstance(a, Routes) or not isinstance(b, Routes):
        got = f"{type(a).__name__} and {type(b).__name__}"
        hint = ""
        if any(type(x).__name__ == "Session" for x in (a, b)):
            hint = ": for what a session captured pass session.routes()"
        elif any(isinstance(x, (torch.Tensor, np.ndarray)) for x in (a, b)):
            hint = ": wrap index arrays with mr.Routes(...) or Routes.from_numpy(...)"
        elif any(isinstance(x, list | tuple) and x and all(isinstance(p, Routes) for p in x) for x in (a, b)):
            # (split_generation and BatchLayout.unpack give one Routes per sequence)
            hint = (
                ": for one Routes per sequence (split_generation, BatchLayout.unpack) join each side with "
                "mr.Routes.cat(...), or compare the sequences one by one"
            )
        raise ArgumentTypeError(f"compare takes two Routes, got {got}{hint}")
    if not isinstance(labels, tuple | list) or len(labels) != 2 or not all(isinstance(x, str) for x in labels):
        raise ArgumentTypeError(f"labels must be two strings, one for a and one for b, got {labels!r}")
    if names is not None:
        names = router_names(names, "names=")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidArgumentError(f"names lists a router more than once: {twice[:3]}; name each once")
    if set(a.names) != set(b.names):
        b = _named_as(b, a)
    if names is None:
        if set(a.names) != set(b.names):
            only_a = [n for n in a.names if n not in b.names]
            only_b = [n for n in b.names if n not in a.names]
            raise RoutesValidationError(
                f"the two hold different routers (only in a: {only_a[:3]}, only in b: {only_b[:3]}); pass names= "
                "to compare the common ones" + _rename_hint(a, b)
            )
        names = a.names
    names = tuple(names)
    if not names:
        why = "names= is empty" if a.names else "the routes hold no router"
        raise InvalidArgumentError(f"nothing to compare: {why}")
    a, b = _in_one_order(a, b)
    for side, r in (("a", a), ("b", b)):
        absent = [n for n in names if n not in r.names]
        if absent:
            raise RoutesValidationError(
                f"{side} holds no routes for routers {absent[:3]}; its routers are {list(r.names)[:4]}"
                + (" ..." if len(r.names) > 4 else "")
                + ": pass names= of routers both hold (or leave it out to compare them all)"
            )
        r._ensure_valid()  # rows built with validate=False: a partial -1 row or a repeated expert is no decision
    xs = [a.layer(n) for n in names]
    ys = [b.layer(n) for n in names]
    ea = [a.experts_per_layer[a.names.index(n)] for n in names]
    eb = [b.experts_per_layer[b.names.index(n)] for n in names]
    counts = {x.shape[0] for x in xs} | {y.shape[0] for y in ys}
    if len(counts) != 1:
        if all(x.shape[0] == y.shape[0] for x, y in zip(xs, ys, strict=True)):
            # a and b agree router by router: the routers see different tokens (an encoder and a decoder)
            groups: dict[int, list[str]] = {}
            for n, x in zip(names, xs, strict=True):
                groups.setdefault(int(x.shape[0]), []).append(n)
            raise RoutesValidationError(
                "the routers hold different token counts ("
                + "; ".join(f"{t} rows: {ns[:2]}{' ...' if len(ns) > 2 else ''}" for t, ns in groups.items())
                + "), so their rows are not the same tokens; compare each group on its own with names="
            )
        raise RoutesValidationError(
            f"the routes cover different token counts {sorted(counts)}; compare routes of the same tokens"
        )
    for n, x, y, e1, e2 in zip(names, xs, ys, ea, eb, strict=True):
        if x.shape[1] != y.shape[1] or e1 != e2:
            raise RoutesValidationError(
                f"router '{n}': a has k={x.shape[1]} over {e1} experts, b has k={y.shape[1]} over {e2}"
            )
    t = counts.pop()
    _check_same_tokens(a, b, names)
    _check_same_places(a, b)
    width = max(ea) if ea else 0
    differ, compared, excluded, shared = [], [], [], []
    load_a = np.zeros((len(names), width), dtype=np.int64)
    load_b = np.zeros((len(names), width), dtype=np.int64)
    token_differ = torch.zeros(t, dtype=torch.long)
    token_seen = torch.zeros(t, dtype=torch.bool)
    padding = _padding_rows(a, t) | _padding_rows(b, t)
    padding_rows = 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        recorded = ~((x < 0).all(dim=1) | (y < 0).all(dim=1))
        ok = recorded & ~padding
        padding_rows += int((recorded & padding).sum())
        xv, yv = x[ok], y[ok]
        if mode == "set":
            same = (xv.sort(dim=1).values == yv.sort(dim=1).values).all(dim=1)
        else:
            same = (xv == yv).all(dim=1)
        d = torch.zeros(t, dtype=torch.bool)
        d[ok] = ~same
        token_differ += d.long()
        token_seen |= ok
        differ.append(int(d.sum()))
        compared.append(int(ok.sum()))
        excluded.append(int((~ok).sum()))
        shared.append(int((xv[:, :, None] == yv[:, None, :]).any(dim=2).sum()))
        load_a[i] = torch.bincount(xv.reshape(-1), minlength=width).numpy()[:width]
        load_b[i] = torch.bincount(yv.reshape(-1), minlength=width).numpy()[:width]
    return RoutingComparison(
        names=names,
        mode=mode,
        differ=np.asarray(differ, dtype=np.int64),
        compared=np.asarray(compared, dtype=np.int64),
        excluded=np.asarray(excluded, dtype=np.int64),
        tokens=int(token_seen.sum()),
        tokens_differ=int((token_differ > 0).sum()),
        differing_routers=int(token_differ.sum()),
        shared_experts=np.asarray(shared, dtype=np.int64),
        top_k=tuple(int(x.shape[1]) for x in xs),
        load_a=load_a,
        load_b=load_b,
        labels=(labels[0], labels[1]),
        num_experts=tuple(ea),
        padding_rows=padding_rows,
    )
