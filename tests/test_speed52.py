"""The per-forward notes of a capture, read once where a forward repeats them: a cache returned that is the one the
forward was given is not noted again (``FeedRecord.returned``), the notes of a cache read once as they are made
(``_Built.note``, ``_Made.note``), and the tests of a forward traced, captured or transformed spelled in one frame
(``_unseen``). Each must note, and answer, what the full reading does."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from moe_replay._feeds import FeedRecord, _Built, _inputs, _Made, _plain, _unseen
from moe_replay._torch_compat import EXPORT, exporting, functorch_transform, graph_capturing, tracing


class _Cache:
    """A KV cache of one's own that counts its tokens on the host."""

    def __init__(self, held: int = 0) -> None:
        self.held = held

    def get_seq_length(self) -> int:
        return self.held


class _Unnoted(FeedRecord):
    """A record that notes every cache returned in full, as if the forward had been given none."""

    def returned(self, out: Any) -> None:
        self._noted = None
        super().returned(out)


def _notes(record: FeedRecord, caches: list[_Cache]) -> tuple[Any, ...]:
    """What ``record`` noted of each cache, by its place in ``caches``."""
    return (
        [record._built.end_of(c) for c in caches],
        [record._made_by.end_of(c) for c in caches],
        [(f.parent, None if f.places is None else f.places.tolist()) for f in record.forwards],
    )


@pytest.mark.reliability("silent replays")
def test_a_returned_cache_is_noted_as_the_full_reading_notes_it() -> None:
    """Random decode loops over a few caches, each forward returning the cache it was given, another one, a fresh one
    or none: a record that skips noting a returned cache it noted as the forward began ends each loop with the notes
    (built, made by, each forward's parent and places) of one that notes every returned cache, and the loops do
    return the cache given."""
    rng = random.Random(0)
    same = 0
    for _ in range(30):
        ops = [(rng.choice([0, 0, 1, 2]), rng.choice(["given", "given", "other", "fresh", "none"])) for _ in range(8)]
        ends = []
        for kind in (FeedRecord, _Unnoted):
            record = kind()
            record._active = True
            caches = [_Cache(), _Cache(), _Cache(), _Cache()]
            for at, back in ops:
                cache = caches[at]
                record._began = None
                assert record.fed((torch.full((2, 1), 5),), {"past_key_values": cache, "use_cache": True})
                cache.held += 1
                if back == "given":
                    out: Any = {"past_key_values": cache}
                    same += kind is FeedRecord and record._noted is not None and record._noted[0] is cache
                elif back == "other":
                    out = {"past_key_values": caches[(at + 1) % 3]}
                elif back == "fresh":
                    caches[3] = _Cache(cache.held)
                    out = {"past_key_values": caches[3]}
                else:
                    out = {"logits": None}
                record.returned(out)
                record.left()
            ends.append(_notes(record, caches))
        assert ends[0] == ends[1]
    assert same > 0


def test_note_returns_what_end_of_read_before() -> None:
    """``_Built.note`` and ``_Made.note`` answer what ``end_of`` read of the cache before noting it."""
    cache = _Cache()
    plain = [(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))]
    built, made = _Built(), _Made()
    for c in (cache, plain):
        assert built.end_of(c) is None and built.note(c, 3) is None and built.end_of(c) == 3
        assert built.note(c, 5) == 3 and built.end_of(c) == 5
        assert made.end_of(c) is None and made.note(c, 1) is None and made.end_of(c) == 1
        assert made.note(c, 2) == 1 and made.end_of(c) == 2
    assert built.note(None) is None and made.note(None, 0) is None


def test_unseen_answers_as_its_parts() -> None:
    """``_unseen`` (its tests spelled in one frame) answers as the functions it spells inline: eagerly, and under a
    ``torch.func`` transform; the export flag it reads is :func:`exporting`'s."""

    def parts() -> bool:
        return bool(graph_capturing() or functorch_transform() is not None or tracing() or exporting())

    assert _unseen() == parts() is False
    seen: list[tuple[bool, bool]] = []

    def inside(x: torch.Tensor) -> torch.Tensor:
        seen.append((bool(_unseen()), parts()))
        return x

    torch.vmap(inside)(torch.zeros(2, 3))
    assert seen == [(True, True)]
    assert EXPORT._is_exporting_flag is exporting() is False


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(2, 3, dtype=torch.long),
        lambda: torch.zeros(2, 3),
        lambda: torch.zeros(2, 3, dtype=torch.long, device="meta"),
        lambda: torch.zeros(2, 3, dtype=torch.long).to_sparse(),
        lambda: torch.nested.nested_tensor([torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)]),
        lambda: torch.quantize_per_tensor(torch.zeros(2, 3), 0.1, 0, torch.quint8),
    ],
    ids=["ids", "floats", "meta", "sparse", "nested", "quantized"],
)
def test_inputs_read_ids_as_plain_reads_them(make: Any) -> None:
    """``_inputs`` (``_plain`` spelled inline) reads a forward's ids only where ``_plain`` reads the tensor."""
    ids = make()
    count, got, _ = _inputs((ids,), {})
    assert (got is ids) == (_plain(ids) and not ids.is_floating_point())
    assert (count >= 0) == (got is not None)
