"""The host work of a decode forward read in brief must read what the general reading reads: a rollback told on the
host without ``FeedRecord._shrunk``'s frame, the five-dimensional inputs beside positions found by a scan in C, the
places of a forward given only its ids read without walking its other positional arguments."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from moe_replay._feeds import HELD_FEWER, FeedRecord, _fixed_past, _note_past, places_fed


class _Cache:
    """A KV cache of one's own that counts its tokens on the host."""

    def __init__(self, held: int) -> None:
        self.held = held

    def get_seq_length(self) -> int:
        return self.held


def _rollback(record: FeedRecord) -> Any:
    """The record's pending rollback, its flag read as a bool (a 0-d tensor where a count was read on a device)."""
    pending = record._rollback
    return None if pending is None else (pending[0], bool(pending[1]))


@pytest.mark.reliability("silent replays")
def test_a_cache_given_again_with_fewer_tokens_is_read_as_the_general_reading_reads_it() -> None:
    """A forward given the cache the forward before was given, holding fewer tokens than it held as that forward
    ended: for every count it started at (unknown, before the tokens put in, among them, after them; a count on a
    device), taken once or twice, the record notes the rollback ``_shrunk`` notes, or none where it notes none."""
    starts: list[Any] = [-1, 0, 2, 3, 5, 6, 9, torch.tensor(2), torch.tensor(9)]
    takes = [(6, 3), (6, 0), (3, 2), (6, 6), (6, 8)]
    for first, then, (before, after) in itertools.product(starts, [None, *starts], takes):
        brief, general = FeedRecord(), FeedRecord()
        cache = _Cache(after)
        for start in (first,) if then is None else (first, then):  # (taken once, or twice: counted from another start)
            brief._held_after = before
            brief._starts[id(cache)] = start
            brief._taken_between(cache)
            if 0 <= after < before:  # (what _taken_between hands the general reading)
                general._shrunk(f"{type(cache).__name__} {HELD_FEWER}", start, before, after)
        assert _rollback(brief) == _rollback(general), (first, then, before, after)
        removed = 0 <= after < before and any(0 <= int(s) < before for s in (first, then) if s is not None)
        told = _rollback(brief)  # (a count on a device notes its flag, read later: False where none were taken)
        assert (told is not None and told[1]) == removed, (first, then, before, after)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("dims", [4, 5, 6])
def test_an_input_of_five_dimensions_beside_positions_is_noted_whatever_else_is_given(dims: int) -> None:
    """A floating input of five dimensions or more under a name of its own, given beside positions that start at two
    places, is read as holding no cache (its name and shape noted), among inputs of every other kind; one of fewer
    dimensions, or of integers, is not noted."""
    shape = (1, 2, 3, 4, 7, 1)[:dims]
    value = torch.zeros(shape)
    whole = torch.zeros(shape, dtype=torch.long)
    for first in (0, 5):
        fed = {
            "input_ids": torch.ones(2, 1, dtype=torch.long),
            "position_ids": torch.full((2, 1), first),
            "use_cache": True,
            "note": "text",
            "scale": 2.0,
            "frames50": value,
            "counts50": whole,
        }
        _note_past(fed, torch.Size((2, 1)))
    assert _fixed_past("frames50", value) is (dims >= 5)
    assert _fixed_past("counts50", whole) is False


@pytest.mark.reliability("silent replays")
def test_places_are_read_only_where_every_positional_argument_after_the_ids_is_read_by_name() -> None:
    """A forward given its ids alone, or other arguments by position that its inputs by name hold, has its places
    read; one given a positional argument after its ids that no name holds has none (it is not known what it is)."""
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.long)
    alone = places_fed((ids,), {}, ids.shape)
    assert alone is not None and alone.tolist() == [[0, 1, 2], [0, 1, 2]]
    named = places_fed((ids, mask), {"attention_mask": mask}, ids.shape)
    assert named is not None and named.tolist() == alone.tolist()
    assert places_fed((ids, torch.ones(2, 3, dtype=torch.long)), {"attention_mask": mask}, ids.shape) is None
    assert places_fed((ids, None), {}, ids.shape) is not None
