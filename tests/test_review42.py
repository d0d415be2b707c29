"""Adversarial review of round 42's changes: compare()'s check that routes laid out for a padded batch are compared
with the same tokens of a capture, and the other changes of the round, each made to fail silently or to refuse an
ordinary use."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr
from tests.conftest import perturb_routers, tried

LENGTHS = (5, 3)


@pytest.fixture(scope="module")
def rollout() -> tuple[Any, ...]:
    """A model, its session, two sequences, and each sequence's routes captured on its own (ids kept)."""
    model = mr.models.build("softmax_topk", seed=0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in LENGTHS]
    session = mr.attach(model)
    per = []
    for seq in seqs:
        with session.capture(), torch.no_grad():
            model(seq[None])
        per.append(session.routes())
    return model, session, seqs, per


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("side", ["right", "left"])
def test_compare_of_a_layout_with_a_capture_fed_a_mask_of_ones_is_exact_or_refused(
    rollout: tuple[Any, ...], side: str
) -> None:
    """Once silent: a right-padded batch captured with a mask of ones (every row a token, as a batch of other,
    unpadded sequences is fed), compared with engine routes (no ids) laid out left-padded, compared each layout token
    with the capture's token at another place of its sequence: 6 of 16 decisions differed, figures of misaligned rows,
    and nothing was refused. Where the layout holds padding at a row the capture was fed a token, the two are now
    refused (either padding side: nothing but ids tells that the rows are the same tokens); given the ids of both,
    each row is checked instead and the same tokens compare as the hand count."""
    model, session, seqs, per = rollout
    right = mr.BatchLayout.padded(list(LENGTHS), side="right")
    with session.capture(), torch.no_grad():
        model(right.tokens(seqs), attention_mask=torch.ones_like(right.attention_mask()))
    captured = session.routes()
    assert captured._fed_mask is not None and bool((captured._fed_mask == 1).all())  # (a mask of ones, recorded)
    laid = mr.BatchLayout.padded(list(LENGTHS), side=side).routes([p.with_token_ids(None) for p in per])
    for a, b in ((captured.with_token_ids(None), laid), (laid, captured.with_token_ids(None))):
        tried()
        with pytest.raises(mr.RoutesValidationError, match="laid out for other batches"):
            mr.compare(a, b)
    told = mr.BatchLayout.padded(list(LENGTHS), side=side).routes(per)  # (each sequence's ids, -1 at padding)
    tried()
    if side == "left":  # (the ids differ where the tokens do)
        with pytest.raises(mr.RoutesValidationError, match="other tokens"):
            mr.compare(captured, told)
        return
    got = mr.compare(captured, told)
    assert got.tokens == sum(LENGTHS)
    # (the hand count: each sequence's rows of the capture against its own capture)
    by_hand = sum(int(mr.compare(captured[right.flat_positions(i)], per[i]).differ.sum()) for i in range(len(per)))
    assert int(got.differ.sum()) == by_hand


@pytest.mark.reliability("silent replays")
def test_compare_of_two_layouts_of_sequences_in_another_order_is_exact_or_refused(rollout: tuple[Any, ...]) -> None:
    """Once silent: engine routes (no ids) laid out right-padded for sequences of lengths 5 and 3, compared with the
    same routes laid out for the two in the other order (3 and 5), compared the first sequence's first tokens with the
    other sequence's at the same places: no place differed where both held a token, so nothing was refused. A token
    in one layout at padding in the other is now refused; the same layout on both sides compares as the hand count,
    and with the ids of both, each row is checked instead (there: other tokens, refused)."""
    _, _, _, per = rollout
    bare = [p.with_token_ids(None) for p in per]
    a = mr.BatchLayout.padded(list(LENGTHS)).routes(bare)
    b = mr.BatchLayout.padded(list(LENGTHS[::-1])).routes(bare[::-1])
    for x, y in ((a, b), (b, a)):
        tried()
        with pytest.raises(mr.RoutesValidationError, match="laid out for other batches"):
            mr.compare(x, y)
    tried()
    same = mr.compare(a, mr.BatchLayout.padded(list(LENGTHS)).routes(bare))
    assert same.tokens == sum(LENGTHS) and int(same.differ.sum()) == 0  # (the same rows on both sides)
    tried()
    told = (
        mr.BatchLayout.padded(list(LENGTHS)).routes(per),
        mr.BatchLayout.padded(list(LENGTHS[::-1])).routes(per[::-1]),
    )
    with pytest.raises(mr.RoutesValidationError, match="other tokens"):
        mr.compare(*told)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("side", ["right", "left"])
def test_layout_replayed_on_a_batch_fed_positions_that_run_on_is_exact_or_refused(
    rollout: tuple[Any, ...], side: str
) -> None:
    """Once silent: engine routes (no ids) laid out left-padded, replayed on the same sequences padded on the right
    and fed no mask but position_ids 0, 1, ... along every row (as a model fed no mask counts them), forced the second
    sequence's recorded experts on its tokens at other places and on its padding: the positions restarted nowhere
    inside a sequence of the layout, so every check passed. Positions that run on through a row holding the layout's
    padding tell nowhere a sequence starts, and are now refused as a forward fed nothing is (the model left as it
    was); fed the layout's own position_ids, each sequence dispatches its recorded experts."""
    model, session, seqs, per = rollout
    bare = [p.with_token_ids(None) for p in per]
    routes = mr.BatchLayout.padded(list(LENGTHS), side=side).routes(bare)
    right = mr.BatchLayout.padded(list(LENGTHS), side="right")
    ids = right.tokens(seqs)
    run_on = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    before = _state(model)
    tried()
    with pytest.raises(mr.TokenMismatchError, match="run on"), session.replay(routes), torch.no_grad():
        model(ids, position_ids=run_on)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert session.state == "idle"
    if side == "left":
        return
    tried()
    perturb_routers(session, scale=3.0, seed=5)  # (the routers choose other experts: only a forced replay matches)
    try:
        with session.replay(routes), session.capture(), torch.no_grad():
            model(ids, position_ids=right.position_ids())
        got = right.unpack(session.routes().with_token_ids(None))
    finally:
        model.load_state_dict(before)
    for i, want in enumerate(bare):
        assert got[i].equal(want), f"sequence {i} did not dispatch its recorded experts"


@pytest.mark.reliability("silent replays")
def test_compare_of_layouts_whose_ids_are_partly_unknown_is_refused(rollout: tuple[Any, ...]) -> None:
    """Once silent: routes laid out for sequences of which only the first knows its ids (the second an engine's
    arrays), compared with the same laid out in the other order: each side knew some ids, so the places were not
    checked, while the ids compared no row of the first sequence against the second (-1 there). Rows that not both
    sides know the ids of are now checked by their places, and refused."""
    _, _, _, per = rollout
    mixed = [per[0], per[1].with_token_ids(None)]
    a = mr.BatchLayout.padded(list(LENGTHS)).routes(mixed)
    b = mr.BatchLayout.padded(list(LENGTHS[::-1])).routes(mixed[::-1])
    assert a.token_ids is not None and b.token_ids is not None  # (each side knows some ids)
    for x, y in ((a, b), (b, a)):
        tried()
        with pytest.raises(mr.RoutesValidationError, match="laid out for other batches"):
            mr.compare(x, y)


@pytest.mark.reliability("files")
@pytest.mark.parametrize("cut", [5, 12, 14])
def test_chunks_of_an_unpadding_capture_saved_apart_split_once_loaded_and_joined(tmp_path: Any, cut: int) -> None:
    """Once a false refusal: a decode loop of a model that takes the padding out of its prompts, saved in two files
    cut through its prompt forward (at row 5), loaded with the capture gone and joined, was refused by
    split_generation as a capture that did not record its prompt mask, while the same chunks joined in memory (or
    pickled) split: the file named the capture's forwards but not the mask of the tokens its prompt forward saw. It
    keeps it now, and the chunks split into the capture's parts."""
    import gc

    from tests.test_generation import _unpadded_capture, _UnpaddingDecoder

    torch.manual_seed(0)
    routes, mask, _, session = _unpadded_capture(_UnpaddingDecoder())
    session.detach()
    want = [r.per_layer() for r in mr.split_generation(routes, attention_mask=mask)]
    routes[:cut].save(tmp_path / "a.npz")
    routes[cut:].save(tmp_path / "b.npz")
    del routes
    gc.collect()  # (the capture gone, as in another process)
    tried()
    joined = mr.Routes.cat([mr.Routes.load(tmp_path / "a.npz"), mr.Routes.load(tmp_path / "b.npz")])
    got = mr.split_generation(joined, attention_mask=mask)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.per_layer(), w, strict=True))


@pytest.mark.reliability("files")
def test_a_slice_file_whose_kept_prompt_mask_is_corrupted_is_refused(tmp_path: Any) -> None:
    """The prompt mask a slice's file keeps of the capture it was cut from is checked as it is read: bits of another
    length, text that is not hexadecimal, or a mask that keeps other than the first forward's rows is refused as a
    corrupted file, never used to split."""
    import json

    import numpy as np

    from tests.test_generation import _unpadded_capture, _UnpaddingDecoder

    torch.manual_seed(0)
    routes, _, _, session = _unpadded_capture(_UnpaddingDecoder())
    session.detach()
    routes[:5].save(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as f:
        arrays = dict(f)
    meta = json.loads(bytes(arrays["meta"]).decode())
    kept = meta["forwards"]["cut_from"]["kept"]
    bits = kept["bits"]
    flipped = f"{int(bits[:2], 16) ^ 0x80:02x}" + bits[2:]  # (one token more or fewer kept)
    for bad in ({**kept, "bits": bits[:-2]}, {**kept, "bits": "zz" + bits[2:]}, {**kept, "bits": flipped}):
        meta["forwards"]["cut_from"]["kept"] = bad
        np.savez_compressed(
            tmp_path / "bad.npz", **{**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        )
        tried()
        with pytest.raises(mr.RoutesValidationError, match="prompt mask of the capture it was cut from"):
            mr.Routes.load(tmp_path / "bad.npz")
