"""Training batches from per-sequence routes: padded, packed, or prompt-left / completion-right.

A training forward over a ``[rows, row_length]`` batch shows every router its tokens
batch-major: row 0's positions, then row 1's, and so on. A :class:`BatchLayout` says
where each sequence sits in that grid, and builds from it, in the same order:

* :meth:`BatchLayout.routes`: the replay :class:`~moe_replay.Routes` (pad positions are
  -1 rows, routed natively);
* :meth:`BatchLayout.tokens`, :meth:`BatchLayout.attention_mask`,
  :meth:`BatchLayout.position_ids`: the matching model inputs;
* :meth:`BatchLayout.unpack`: the inverse, per-sequence routes from a capture of that
  forward.

Example:
    >>> import torch, moe_replay as mr
    >>> a = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
    >>> b = mr.Routes([torch.tensor([[1, 2]])], names=["layers.0.gate"], num_experts=4)
    >>> layout = mr.BatchLayout.padded([2, 1])          # right padding, 2 rows of 2
    >>> layout.routes([a, b]).layer("layers.0.gate").tolist()
    [[0, 1], [2, 3], [1, 2], [-1, -1]]
    >>> mr.BatchLayout.packed([2, 1]).routes([a, b]).num_tokens   # one row of 3
    3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from ._checks import as_tensor, check_count, check_values, frozen_value, is_collection, is_integer, is_one_of
from ._feeds import unmarked_places
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    RoutesValidationError,
)
from .routes import Routes, _known_or_none, _one_token_per_row, in_token_order, reorder_hint

__all__ = ["BatchLayout", "pack_routes", "pad_routes"]


def take_rows(routes: Routes, index: torch.Tensor) -> Routes:
    """Rows ``routes[index]`` of every router, with a -1 row wherever ``index`` is -1.

    ``index`` counts the rows in the order of their tokens: routes whose rows are not (a capture of routers that saw
    the tokens sequence-first) are put in that order first (:func:`~moe_replay.routes.in_token_order`).
    """
    routes = in_token_order(routes, "these routes")
    _one_token_per_row(routes, "a layout of these routes")
    index = index.long()
    hole = index < 0
    safe = index.clamp(min=0)
    layers = []
    for rows in routes._data:  # (the rows taken are widened to int64, not every row of the routes for each take)
        if rows.shape[0] == 0:
            if not bool(hole.all()):
                raise RoutesValidationError("cannot take rows from routes that hold no rows")
            picked = torch.full((index.numel(), rows.shape[1]), -1, dtype=torch.long)
        else:
            picked = rows[safe].long()
            picked[hole] = -1
        layers.append(picked)
    # rows of checked routes and whole -1 rows: as checked as the routes they come from
    out = Routes._trusted(layers, routes.names, routes.experts_per_layer, routes._validated)
    out._recorded_names = routes._recorded_names  # (the same routers, other rows)
    out._keep_row_marks([routes])  # (what holds for every row: a keep_newest capture's dropped rows, an untold reader)
    ids = routes._token_ids  # (None for routes of no rows: not one id is known)
    if ids is not None:  # the token of each row taken; -1 at a hole
        taken = ids[safe]  # (a copy)
        taken[hole] = -1
        out._token_ids = _known_or_none(taken)
    if routes._router_ids is not None:  # (each router's own: its rows' tokens go with them too)
        taken_ids = []
        for v in routes._router_ids:
            one = v[safe] if v.numel() else torch.full((index.numel(),), -1, dtype=torch.long)
            one[hole] = -1
            taken_ids.append(one)
        out._router_ids = tuple(taken_ids)
    out._ids_lost = routes._ids_lost
    fed = routes._fed_mask  # each row's prompt mask goes with it: a row recorded at padding stays one (replay reads it)
    if fed is not None and fed.numel():
        mask = fed[safe]
        mask[hole] = -1
        out._fed_mask = mask
    places = routes._seq_pos  # (each row's place in its sequence goes with it: a replay checks it with the ids)
    if places is not None and places.numel():
        taken_places = places[safe]
        taken_places[hole] = -1
        out._seq_pos = taken_places
    return out


def check_same_routers(parts: Sequence[Routes], what: str = "sequence") -> None:
    """All parts hold the same routers, expert counts and k (else a clear error)."""
    if not parts:
        raise InvalidArgumentError(f"need at least one {what}")
    first = parts[0]
    for i, p in enumerate(parts):
        if not isinstance(p, Routes):
            raise ArgumentTypeError(f"{what} {i} is a {type(p).__name__}, not Routes")
        if (p.names, p.experts_per_layer, p.k_per_layer) != (first.names, first.experts_per_layer, first.k_per_layer):
            raise RoutesValidationError(
                f"{what} {i} holds routers {list(p.names)[:3]}... (experts {p.experts_per_layer[:3]}, "
                f"k {p.k_per_layer[:3]}), {what} 0 holds {list(first.names)[:3]}... (experts "
                f"{first.experts_per_layer[:3]}, k {first.k_per_layer[:3]})"
                + (reorder_hint(p, first, i, what) or ": they come from different models")
            )


def _lengths(values: Sequence[int] | torch.Tensor, what: str = "lengths") -> list[int]:
    """One token count per sequence, as ints: a 1-D tensor or array, or a sequence of integers."""
    if isinstance(values, torch.Tensor | np.ndarray):
        check_values(values, what)
        if values.ndim != 1:
            raise InvalidArgumentError(f"{what} must be 1-D, one length per sequence; got shape {tuple(values.shape)}")
        values = values.tolist()
    if not is_collection(values):
        raise ArgumentTypeError(f"{what} must be one length per sequence (a list or a 1-D tensor), got {values!r}")
    out = [check_count(v, f"{what}[{i}]") for i, v in enumerate(values)]
    if not out:
        raise InvalidArgumentError(f"{what} is empty: a batch needs at least one sequence")
    return out


@frozen_value(
    "build another layout with BatchLayout.padded(...), .packed(...) or .split(...) (they check the lengths) "
    "and use that"
)
@dataclass(frozen=True)
class BatchLayout:
    """Where each sequence sits in a ``[rows, row_length]`` training batch.

    ``placements[i] = (row, start, length)``: sequence ``i`` fills positions
    ``start .. start + length - 1`` of row ``row``; every other position is padding.
    Build one with :meth:`padded`, :meth:`packed` or :meth:`split`.

    Example:
        A rollout batch as ``generate()`` and TRL lay it out: prompts of 2 and 3 tokens
        left-padded, then the completions (sequences of 4 and 5 tokens in all):

        >>> import torch, moe_replay as mr
        >>> layout = mr.BatchLayout.split(prompt_lengths=[2, 3], lengths=[4, 5])
        >>> layout
        BatchLayout(rows=2, row_length=5, sequences=2, padding=1)
        >>> layout.tokens([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12, 13])]).tolist()
        [[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
        >>> layout.attention_mask().tolist()
        [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]

        ``layout.routes(per_sequence_routes)`` gives the replay routes of that batch, with
        -1 rows (routed natively) at the padding.
    """

    rows: int
    row_length: int
    placements: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        check_count(self.rows, "rows")
        check_count(self.row_length, "row_length")
        if not is_collection(self.placements):
            raise ArgumentTypeError(f"placements must be (row, start, length) triples, got {self.placements!r:.60}")
        for i, place in enumerate(self.placements):
            # (a row of a [sequences, 3] array or tensor is such a triple too: numpy or 0-d tensor ints, read as ints)
            if not is_collection(place) or len(place) != 3 or not all(is_integer(v) for v in place):
                raise InvalidArgumentError(f"placement {i} must be a (row, start, length) of ints, got {place!r}")
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "row_length", int(self.row_length))
        object.__setattr__(self, "placements", tuple(tuple(int(v) for v in p) for p in self.placements))
        for i, (r, s, n) in enumerate(self.placements):
            if not (0 <= r < self.rows and s >= 0 and n >= 0 and s + n <= self.row_length):
                raise InvalidArgumentError(
                    f"sequence {i} at row {r}, positions {s}..{s + n - 1} does not fit a "
                    f"[{self.rows}, {self.row_length}] batch"
                )
        # (each row's sequences by start, compared with the one before: no [rows, row_length] grid is allocated)
        by_row = sorted((r, s, s + n, i) for i, (r, s, n) in enumerate(self.placements) if n)
        for (r0, _, end0, i0), (r1, s1, _, i1) in pairwise(by_row):
            if r0 == r1 and s1 < end0:
                raise InvalidArgumentError(f"sequence {max(i0, i1)} overlaps another sequence in row {r1}")

    # ------------------------------------------------------------- builders
    @classmethod
    def padded(
        cls, lengths: Sequence[int] | torch.Tensor, *, side: str = "right", length: int | None = None
    ) -> BatchLayout:
        """One sequence per row, padded on ``side`` ("right" or "left") to ``length`` (default: the longest)."""
        ls = _lengths(lengths)
        width = max(ls) if length is None else check_count(length, "length")
        if width < max(ls):
            raise InvalidArgumentError(f"length={width} is shorter than the longest sequence ({max(ls)} tokens)")
        if not is_one_of(side, ("left", "right")):
            raise InvalidArgumentError(f"side must be 'left' or 'right', got {side!r}")
        return cls(len(ls), width, tuple((i, 0 if side == "right" else width - n, n) for i, n in enumerate(ls)))

    @classmethod
    def packed(cls, lengths: Sequence[int] | torch.Tensor, *, row_length: int | None = None) -> BatchLayout:
        """Sequences back to back (varlen packing), in order.

        Without ``row_length`` every sequence goes into one row. With it, a sequence that
        does not fit the current row starts the next one; rows are right-padded.
        """
        ls = _lengths(lengths)
        if row_length is None:
            places, at = [], 0
            for n in ls:
                places.append((0, at, n))
                at += n
            return cls(1, at, tuple(places))
        width = check_count(row_length, "row_length")
        if max(ls) > width:
            raise InvalidArgumentError(
                f"a sequence of {max(ls)} tokens does not fit row_length={width}; raise row_length"
            )
        places, row, at = [], 0, 0
        for n in ls:
            if at + n > width:
                row, at = row + 1, 0
            places.append((row, at, n))
            at += n
        return cls(row + 1, width, tuple(places))

    @classmethod
    def split(
        cls,
        prompt_lengths: Sequence[int] | torch.Tensor,
        lengths: Sequence[int] | torch.Tensor,
        *,
        prompt_width: int | None = None,
        row_length: int | None = None,
    ) -> BatchLayout:
        """Prompts left-padded to ``prompt_width``, completions right-padded after it.

        The layout of the ``sequences`` that ``generate()`` returns for a left-padded batch,
        and of verl's rollout batches. ``lengths`` are whole sequence lengths (prompt plus
        completion).
        """
        ps, ls = _lengths(prompt_lengths, "prompt_lengths"), _lengths(lengths)
        if len(ps) != len(ls):
            raise InvalidArgumentError(f"got {len(ps)} prompt lengths for {len(ls)} sequences")
        short = [i for i, (p, n) in enumerate(zip(ps, ls, strict=True)) if n < p]
        if short:
            i = short[0]
            raise InvalidArgumentError(
                f"sequence {i} is shorter than its prompt: {ls[i]} tokens in all, prompt_lengths[{i}]={ps[i]}. "
                "lengths are whole sequences (prompt plus completion), one per prompt length in the same order: "
                "pass each sequence's prompt length and its whole length"
            )
        pw = max(ps) if prompt_width is None else check_count(prompt_width, "prompt_width")
        if pw < max(ps):
            raise InvalidArgumentError(f"prompt_width={pw} is shorter than the longest prompt ({max(ps)} tokens)")
        need = max(pw + n - p for p, n in zip(ps, ls, strict=True))
        width = need if row_length is None else check_count(row_length, "row_length")
        if width < need:
            raise InvalidArgumentError(f"row_length={width} is too short: the longest completion ends at {need}")
        return cls(len(ls), width, tuple((i, pw - p, n) for i, (p, n) in enumerate(zip(ps, ls, strict=True))))

    # ------------------------------------------------------------- views
    @property
    def num_sequences(self) -> int:
        """How many sequences the batch holds."""
        return len(self.placements)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Token count of each sequence."""
        return tuple(n for _, _, n in self.placements)

    def __repr__(self) -> str:
        pad = self.rows * self.row_length - sum(self.lengths)
        return (
            f"BatchLayout(rows={self.rows}, row_length={self.row_length}, sequences={self.num_sequences}, "
            f"padding={pad})"
        )

    def flat_positions(self, i: int) -> torch.Tensor:
        """Where sequence ``i``'s tokens sit in the batch-major flattened batch (``i < 0`` counts from the end).

        Raises:
            InvalidArgumentError: ``i`` is not the index of one of the layout's sequences.
        """
        count = self.num_sequences
        if not is_integer(i) or not -count <= int(i) < count:
            raise InvalidArgumentError(
                f"flat_positions({i!r}): this layout holds {count} sequences; give an integer index in "
                f"{-count}..{count - 1}"
            )
        r, s, n = self.placements[int(i)]
        return torch.arange(n) + r * self.row_length + s

    def _places(self) -> torch.Tensor:
        """For each flattened batch position, its place in its sequence (0, 1, ...), or -1 (padding)."""
        out = torch.full((self.rows * self.row_length,), -1, dtype=torch.long)
        for i, (_, _, n) in enumerate(self.placements):
            out[self.flat_positions(i)] = torch.arange(n)
        return out

    def source_index(self) -> torch.Tensor:
        """For each flattened batch position, its row in the concatenated sequences, or -1 (padding)."""
        index = torch.full((self.rows * self.row_length,), -1, dtype=torch.long)
        offset = 0
        for i, (_, _, n) in enumerate(self.placements):
            index[self.flat_positions(i)] = torch.arange(offset, offset + n)
            offset += n
        return index

    # ------------------------------------------------------------- builders of inputs
    def routes(self, sequences: Sequence[Routes]) -> Routes:
        """Replay routes for this batch: ``rows * row_length`` rows, batch-major, -1 at padding."""
        seqs = _sequences(sequences)
        self._check_count(len(seqs))
        got = [seq.num_tokens for seq in seqs]
        for i, (have, n) in enumerate(zip(got, self.lengths, strict=True)):
            if have != n:
                raise RoutesValidationError(
                    f"sequence {i} has {have} rows of routes but the layout gives it {n} positions"
                    + _count_hint(got, self.lengths, "rows of routes")
                )
        out = take_rows(Routes.cat(seqs), self.source_index())
        # each row's place in its sequence, -1 at padding: a replay of routes that know no token ids refuses a forward
        # whose attention mask or position_ids put a sequence elsewhere (another padding side, order or length)
        out._layout_pos = self._places()
        return out

    def unpack(self, routes: Routes) -> list[Routes]:
        """Per-sequence routes from the routes of a forward over this batch (the inverse of :meth:`routes`).

        The rows are read sequence by sequence, as the batch's tokens are laid out: a capture of routers that saw
        the tokens sequence-first (layers that run ``[positions, batch, hidden]``, as fairseq's and Megatron's),
        whose rows are position by position, is put in that order first, with the ids of its tokens.

        Where the capture kept the attention mask the forward was fed, the layout must fit it: a
        position of a sequence that the mask marks padding, or a position of padding that it marks
        a token (whose recorded route would be dropped), means the layout is not the batch's (the
        other padding side, other lengths) and is refused. So is a layout holding one sequence
        where the forward, by the ``position_ids`` or mask it was fed, restarted one or placed
        padding (packed rows of another packing, padded on the other side).

        Raises:
            RoutesValidationError: not one row per position of the batch, a layout that does not
                fit the attention mask the capture was fed or the places its position_ids gave,
                routes laid out by another layout
                (:meth:`routes` of other lengths or padding side), or rows of routers that saw the tokens
                sequence-first whose tokens the capture could not tell.
        """
        if not isinstance(routes, Routes):
            raise ArgumentTypeError(f"unpack takes the Routes of a forward over the batch, got {type(routes).__name__}")
        total = self.rows * self.row_length
        if routes.num_tokens != total:
            raise RoutesValidationError(
                f"these routes hold {routes.num_tokens} rows, a [{self.rows}, {self.row_length}] batch has {total}: "
                "unpack takes the routes of one forward over this layout's whole batch (padding included). Pass "
                "those, or build the layout of the batch they were recorded on"
            )
        routes = in_token_order(routes, "BatchLayout.unpack")
        self._check_fed_mask(routes._fed_mask)
        self._check_laid_out(routes._layout_pos)
        self._check_fed_places(routes._seq_pos)
        return [routes[self.flat_positions(i)] for i in range(self.num_sequences)]

    def _check_laid_out(self, places: torch.Tensor | None) -> None:
        """Refuse routes laid out by another layout (each row's place in its sequence, -2 where not known): read
        through this one, each sequence would get the rows of other positions."""
        if places is None or places.shape != (self.rows * self.row_length,):
            return
        wrong = ((places >= -1) & (places != self._places())).nonzero().flatten()
        if wrong.numel():
            row, col = divmod(int(wrong[0]), self.row_length)
            raise RoutesValidationError(
                f"BatchLayout.unpack: these routes were laid out by another BatchLayout: batch position [{row}, {col}] "
                f"(and {wrong.numel() - 1} more) holds place {int(places[wrong[0]])} of a sequence there "
                f"({'padding' if int(places[wrong[0]]) == -1 else 'a token'}), place {int(self._places()[wrong[0]])} "
                "in this layout, so sequences would get the rows of other positions; unpack them with the layout "
                "that laid them out (its lengths, order and padding side)"
            )

    def _check_fed_places(self, places: torch.Tensor | None) -> None:
        """Refuse a layout whose sequences are not those the forward gave its tokens places in (``Routes._seq_pos``:
        from the ``position_ids`` or attention mask it was fed, -1 where not known).

        Within each of the layout's sequences the known places must run on by one from token to token: a place that
        does not (a sequence restarting, or padding's place) means the forward saw other sequences there (packed by
        another packing, padded on the other side, other lengths), and each sequence would get the rows of tokens of
        another. A forward fed no positions (places counted along the row), or one after a KV cache (places that
        start past 0), fits its layout: each token's row is still its own.
        """
        total = self.rows * self.row_length
        if places is None or places.shape != (total,):
            return
        fed = torch.where(places == -1, -1, unmarked_places(places)).view(self.rows, self.row_length)
        owner = torch.full((total,), -1, dtype=torch.long)
        for i in range(self.num_sequences):
            owner[self.flat_positions(i)] = i
        owner = owner.view(self.rows, self.row_length)
        prev, cur, was, now = fed[:, :-1], fed[:, 1:], owner[:, :-1], owner[:, 1:]
        known = (prev >= 0) & (cur >= 0) & (was >= 0) & (now >= 0)
        runs_on = cur == prev + 1  # (the forward gave the two tokens one sequence)
        at = (known & (was == now) & ~runs_on).nonzero()
        if not at.numel():
            return
        row, col = int(at[0, 0]), int(at[0, 1]) + 1
        raise RoutesValidationError(
            f"BatchLayout.unpack: the forward these routes were captured on gave batch position [{row}, {col}] "
            f"(and {at.shape[0] - 1} more) place {int(fed[row, col])} in its sequence, after place "
            f"{int(fed[row, col - 1])} of the token before it, where this layout holds sequence {int(owner[row, col])} "
            "running on: it saw other sequences there than this layout (packed by another "
            "packing, padded on the other side, or other lengths), so sequences would get the rows of other tokens; "
            "unpack with the layout of the batch that was fed (the one whose position_ids() or attention_mask() the "
            "forward was given)"
        )

    def _check_fed_mask(self, fed: torch.Tensor | None) -> None:
        """Refuse a layout whose tokens and padding are not those of the mask a capture was fed (-1: not known)."""
        if fed is None:
            return
        padding = self.source_index() < 0
        for wrong, what in (
            ((fed == 0) & ~padding, "a token of a sequence in this layout, where the forward's attention mask was 0"),
            ((fed == 1) & padding, "padding in this layout, where the forward's attention mask fed a token"),
        ):
            at = wrong.nonzero().flatten()
            if at.numel():
                row, col = divmod(int(at[0]), self.row_length)
                raise RoutesValidationError(
                    f"BatchLayout.unpack: batch position [{row}, {col}] (and {at.numel() - 1} more) is {what}: "
                    "this layout does not fit the batch these routes were captured on (padded on the other side, "
                    "or other lengths), and would give sequences the rows of other positions or drop recorded "
                    "ones; build the layout from the lengths and padding side of the batch that was fed "
                    "(layout.attention_mask() is its mask)"
                )

    def tokens(self, sequences: Sequence[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
        """The ``[rows, row_length]`` input ids, ``pad_id`` at padding.

        Each sequence is 1-D token ids, or ``[1, n]`` (one sequence as a tokenizer returns it); a tensor of several
        rows is refused rather than run together as one sequence.
        """
        if not is_integer(pad_id) or not -(2**63) <= int(pad_id) < 2**63:
            raise InvalidArgumentError(
                f"pad_id must be an integer token id, got {pad_id!r:.60}, past the int64 of token ids"
                if is_integer(pad_id)
                else f"pad_id must be an integer token id, got {pad_id!r:.60}"
            )
        if not is_collection(sequences):
            raise ArgumentTypeError(
                f"tokens takes one sequence of token ids per sequence (a list), got {type(sequences).__name__}"
            )
        seqs = []
        for i, ids in enumerate(sequences):
            check_values(ids, f"sequence {i}")  # (meta, sparse, nested, quantized: no ids to copy)
            try:
                t = as_tensor(ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ArgumentTypeError(f"sequence {i} is not token ids (a tensor or a list of ints): {e}") from None
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise InvalidArgumentError(f"sequence {i} holds {t.dtype} values; token ids are integers")
            if t.dtype == getattr(torch, "uint64", None) and t.numel():  # (past int64: wrapped to negatives by long())
                top = int(t.detach().cpu().numpy().max())
                if top > 2**63 - 1:
                    raise InvalidArgumentError(
                        f"sequence {i} holds token id {top} ({t.dtype}), past the int64 of token ids: pass the ids "
                        "the model's vocabulary holds"
                    )
            if t.dim() > 1 and any(n != 1 for n in t.shape[:-1]):  # ([1, n] is one sequence; [2, n] is a batch)
                raise InvalidArgumentError(
                    f"sequence {i} is a {list(t.shape)} tensor: one sequence is 1-D token ids (or [1, n]), and its "
                    "rows would run together as one sequence. Pass each sequence of a batch apart (list(batch)), "
                    "or build the layout from that many sequences"
                )
            seqs.append(t.reshape(-1))
        self._check_count(len(seqs))
        out = torch.full((self.rows, self.row_length), int(pad_id), dtype=torch.long)
        got = [ids.numel() for ids in seqs]
        for i, ((r, s, n), ids) in enumerate(zip(self.placements, seqs, strict=True)):
            if ids.numel() != n:
                raise InvalidArgumentError(
                    f"sequence {i} has {ids.numel()} tokens but the layout gives it {n} positions"
                    + _count_hint(got, self.lengths, "tokens")
                )
            out[r, s : s + n] = ids.long()
        return out

    def attention_mask(self) -> torch.Tensor:
        """``[rows, row_length]``: 1 on tokens, 0 on padding (packed rows need :meth:`position_ids` too)."""
        out = torch.zeros(self.rows, self.row_length, dtype=torch.long)
        for r, s, n in self.placements:
            out[r, s : s + n] = 1
        return out

    def position_ids(self) -> torch.Tensor:
        """``[rows, row_length]``: 0, 1, ... within each sequence (0 at padding).

        For packed rows pass these (and no attention mask) to a model that reads packing
        from restarting positions, as transformers and the reference models do.
        """
        out = torch.zeros(self.rows, self.row_length, dtype=torch.long)
        for r, s, n in self.placements:
            out[r, s : s + n] = torch.arange(n)
        return out

    def _check_count(self, n: int) -> None:
        if n != self.num_sequences:
            raise InvalidArgumentError(f"got {n} sequences for a layout of {self.num_sequences}")


def _count_hint(got: Sequence[int], want: Sequence[int], what: str) -> str:
    """What to do where sequences of ``got`` rows (or tokens) meet a layout of lengths ``want``: the sequences in
    another order, each one off by one (the last generated token, whose row the routes hold but no forward is fed),
    or a layout built from other lengths."""
    if sorted(got) == sorted(want):
        return (
            f": the sequences hold {list(got)[:8]} {what}, the layout's lengths in another order; pass them in the "
            "order the layout was built from (or build it from the sequences in the order given)"
        )
    off = {g - w for g, w in zip(got, want, strict=True)}
    if off == {1}:
        return (
            f": every sequence holds one more than the layout's length ({list(got)[:8]} {what}). Routes of a "
            "rollout hold a row for the last generated token, which is never fed back; build the layout from "
            "the whole sequences (prompt plus every generated token), or cut the last row of each Routes "
            "(routes[:-1]) and token where the training forward leaves it out"
        )
    if off == {-1}:
        return (
            f": every sequence holds one less than the layout's length ({list(got)[:8]} {what}): a layout built "
            "from lengths counted once more (an end token or the last generated token added again?); build it "
            f"from the sequences' own lengths ({list(got)[:8]})"
        )
    return f": build the layout from the sequences' own lengths ({list(got)[:8]} {what}), in the order given"


def routes_list(values: Sequence[Routes], what: str = "sequence") -> list[Routes]:
    """``values`` as a list of Routes, one per ``what`` (one Routes is not a list of them)."""
    if not is_collection(values):
        raise ArgumentTypeError(
            f"give one Routes per {what} (a list), got {type(values).__name__}; for one {what} pass [routes]"
        )
    return list(values)


def _sequences(sequences: Sequence[Routes]) -> list[Routes]:
    """A list of per-sequence Routes of the same routers (one Routes is not a list of sequences)."""
    seqs = routes_list(sequences)
    check_same_routers(seqs)
    return seqs


def pad_routes(sequences: Sequence[Routes], *, side: str = "right", length: int | None = None) -> Routes:
    """Routes for a padded batch, one sequence per row: ``BatchLayout.padded(...).routes(sequences)``.

    Example:
        >>> import torch, moe_replay as mr
        >>> a = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
        >>> b = mr.Routes([torch.tensor([[1, 2]])], names=["layers.0.gate"], num_experts=4)
        >>> mr.pad_routes([a, b], side="left").layer("layers.0.gate").tolist()  # row 2: padding, then b
        [[0, 1], [2, 3], [-1, -1], [1, 2]]
    """
    seqs = _sequences(sequences)
    return BatchLayout.padded([s.num_tokens for s in seqs], side=side, length=length).routes(seqs)


def pack_routes(sequences: Sequence[Routes], *, row_length: int | None = None) -> Routes:
    """Routes for a packed batch: ``BatchLayout.packed(...).routes(sequences)``.

    Example:
        >>> import torch, moe_replay as mr
        >>> a = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
        >>> b = mr.Routes([torch.tensor([[1, 2]])], names=["layers.0.gate"], num_experts=4)
        >>> mr.pack_routes([a, b]).layer("layers.0.gate").tolist()  # one row: a's tokens, then b's
        [[0, 1], [2, 3], [1, 2]]
    """
    seqs = _sequences(sequences)
    return BatchLayout.packed([s.num_tokens for s in seqs], row_length=row_length).routes(seqs)
