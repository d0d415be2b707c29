"""The per-forward notes of a capture read a decode step given what the forward before was given in brief
(``FeedRecord._watch_caches``): they must note what the full walk over the forward's arguments notes."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay._feeds import FeedRecord, MoveWatch


class _Cache:
    """A KV cache of one's own: counts its tokens on the host, moves rows (watched) and crops (watched)."""

    def __init__(self, held: int = 0) -> None:
        self.held = held

    def get_seq_length(self) -> int:
        return self.held

    def reorder_cache(self, beam_idx: Any) -> None:
        pass

    def crop(self, keep: int) -> None:
        self.held = min(self.held, keep)


class _Walked(FeedRecord):
    """A record that never takes the brief way: every forward walks its arguments."""

    def _watch_caches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        self._same = None
        return super()._watch_caches(args, kwargs)


class _WalkedMoves(MoveWatch):
    def _watch_caches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        self._same = None
        return super()._watch_caches(args, kwargs)


def _forward(record: FeedRecord, caches: list[_Cache], op: tuple[Any, ...]) -> None:
    """One forward of a decode loop as FeedForward._enter feeds it to ``record``; the cache grows by its tokens."""
    kind, at, width, where = op
    cache = caches[at]
    ids = torch.full((2, width), 5)
    if where == "positional":
        args: tuple[Any, ...] = (ids, cache)
        kwargs: dict[str, Any] = {"use_cache": True}
    elif where == "two caches":  # (another cache beside it: the forward's own is the first)
        args, kwargs = (ids,), {"past_key_values": cache, "other": caches[(at + 1) % len(caches)]}
    else:
        args, kwargs = (ids,), {"past_key_values": cache, "use_cache": True, **({"extra": 1.0} if kind else {})}
    record._began = None
    if record.fed(args, kwargs):
        cache.held += width
        record.returned(None)
        record.left()


def _state(record: FeedRecord) -> tuple[Any, ...]:
    return (
        record.moved,
        record.interleaved,
        record.rolled_back,
        list(record._fresh),
        record._switched,
        record._given_before,
        record._held_after,
        [f.count for f in record.forwards],
    )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("watch", ["capture", "replay"])
def test_decode_steps_read_in_brief_note_what_the_full_walk_notes(watch: str) -> None:
    """Random decode loops over a few caches (the same cache again, another of its kind at its place, a new one,
    tokens taken out by a watched crop or behind the record's back, rows moved, a cache given by position, a second
    cache beside the first, an argument of another kind): a record that reads the steps given what the forward before
    was given in brief ends each loop in the state of one that walks every forward's arguments, and the loops do
    take the brief way."""
    brief_kind, walked_kind = (FeedRecord, _Walked) if watch == "capture" else (MoveWatch, _WalkedMoves)
    rng = random.Random(0)
    briefs = 0
    for _ in range(40):
        ops = []
        for _ in range(12):
            ops.append(
                (
                    rng.random() < 0.15,
                    rng.choice([0, 0, 0, 1, 2]),
                    rng.choice([1, 1, 1, 3]),
                    rng.choice(["named"] * 6 + ["positional", "two caches"]),
                )
            )
        events = [
            (i, rng.choice(["crop", "drop", "move", "new"]), rng.choice([0, 4]))
            for i in range(12)
            if rng.random() < 0.2
        ]
        states: list[tuple[Any, ...]] = []
        for kind in (brief_kind, walked_kind):
            refused: tuple[Any, ...] = ()
            record = kind()
            caches = [_Cache(), _Cache(), _Cache()]
            record._active = True
            for i, op in enumerate(ops):
                for _, event, held in (e for e in events if e[0] == i):
                    if event == "crop":
                        caches[0].crop(max(caches[0].held - 1, 0))
                    elif event == "drop":  # (tokens taken out past the watched methods: a layer's own crop)
                        caches[0].held = max(caches[0].held - 2, 0)
                    elif event == "move":
                        caches[0].reorder_cache(None)
                    else:
                        caches[2] = _Cache(held)
                if kind is brief_kind and record._same is not None:
                    briefs += 1
                try:
                    _forward(record, caches, op)
                except mr.RoutesValidationError as e:  # (a replay's forward after rows moved: refused)
                    refused = (i, str(e))
                    break
            states.append((refused, *_state(record)))
            record._unwatch()
        assert states[0] == states[1], (ops, events)
    assert briefs > 100  # (the premise: most steps were read in brief)
