"""BatchLayout: replay routes, inputs and the inverse for padded, packed and split batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_replay as mr

from .conftest import tried

NAMES = ("layers.0.gate", "layers.1.gate")


def seq(n: int, offset: int) -> mr.Routes:
    """Top-1 routes whose expert numbers the token: offset, offset + 1, ..."""
    rows = (torch.arange(n) + offset).unsqueeze(1)
    return mr.Routes([rows, rows + 100], names=NAMES, num_experts=512)


SEQS = [seq(3, 0), seq(1, 10), seq(4, 20)]


def experts(routes: mr.Routes) -> list[int]:
    return routes.layer(NAMES[0])[:, 0].tolist()


def test_padded_right_and_left() -> None:
    right = mr.BatchLayout.padded([3, 1, 4])
    assert (right.rows, right.row_length) == (3, 4)
    assert experts(right.routes(SEQS)) == [0, 1, 2, -1, 10, -1, -1, -1, 20, 21, 22, 23]
    left = mr.BatchLayout.padded([3, 1, 4], side="left", length=5)
    assert experts(left.routes(SEQS))[:10] == [-1, -1, 0, 1, 2, -1, -1, -1, -1, 10]
    assert left.attention_mask()[0].tolist() == [0, 0, 1, 1, 1]
    assert left.position_ids()[0].tolist() == [0, 0, 0, 1, 2]
    assert mr.pad_routes(SEQS, side="left", length=5).equal(left.routes(SEQS))


def test_packed_one_row_and_rows() -> None:
    one = mr.BatchLayout.packed([3, 1, 4])
    assert (one.rows, one.row_length) == (1, 8)
    assert experts(one.routes(SEQS)) == [0, 1, 2, 10, 20, 21, 22, 23]
    assert one.position_ids().tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    rows = mr.BatchLayout.packed([3, 1, 4], row_length=5)
    assert rows.placements == ((0, 0, 3), (0, 3, 1), (1, 0, 4))
    assert experts(rows.routes(SEQS)) == [0, 1, 2, 10, -1, 20, 21, 22, 23, -1]
    assert mr.pack_routes(SEQS, row_length=5).equal(rows.routes(SEQS))


def test_split_layout_is_generate_grid() -> None:
    layout = mr.BatchLayout.split([2, 1, 3], [3, 1, 4], prompt_width=3)
    assert layout.placements == ((0, 1, 3), (1, 2, 1), (2, 0, 4))
    assert layout.attention_mask().tolist() == [[0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize(
    "layout",
    [
        mr.BatchLayout.padded([3, 1, 4]),
        mr.BatchLayout.padded([3, 1, 4], side="left", length=6),
        mr.BatchLayout.packed([3, 1, 4]),
        mr.BatchLayout.packed([3, 1, 4], row_length=4),
        mr.BatchLayout.split([2, 1, 3], [3, 1, 4], prompt_width=4, row_length=7),
    ],
    ids=repr,
)
def test_unpack_inverts_routes_and_tokens_line_up(layout: mr.BatchLayout) -> None:
    batch = layout.routes(SEQS)
    assert batch.num_tokens == layout.rows * layout.row_length
    assert all(a.equal(b) for a, b in zip(layout.unpack(batch), SEQS, strict=True))
    ids = [torch.tensor(experts(s)) for s in SEQS]  # token ids equal to the expert numbers
    flat = layout.tokens(ids, pad_id=-1).reshape(-1)
    assert flat.tolist() == experts(batch)  # the routers see tokens in the same order
    assert int(layout.attention_mask().sum()) == sum(layout.lengths)


def test_layout_errors() -> None:
    with pytest.raises(ValueError, match="shorter than the longest"):
        mr.BatchLayout.padded([3, 5], length=4)
    with pytest.raises(ValueError, match="does not fit row_length"):
        mr.BatchLayout.packed([3, 6], row_length=5)
    with pytest.raises(ValueError, match="overlaps"):
        mr.BatchLayout(1, 4, ((0, 0, 3), (0, 2, 2)))
    layout = mr.BatchLayout.padded([3, 1, 4])
    with pytest.raises(mr.RoutesValidationError, match="sequence 1 has 2 rows"):
        layout.routes([SEQS[0], seq(2, 0), SEQS[2]])
    with pytest.raises(ValueError, match="got 2 sequences"):
        layout.routes(SEQS[:2])
    other = mr.Routes([torch.zeros(1, 1, dtype=torch.long)] * 2, names=["x", "y"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match="different models"):
        layout.routes([SEQS[0], other, SEQS[2]])
    with pytest.raises(mr.RoutesValidationError, match=r"another order; reorder sequence 2 with \.select\(\)"):
        layout.routes([*SEQS[:2], SEQS[2].select(NAMES[::-1])])
    with pytest.raises(mr.RoutesValidationError, match="a \\[3, 4\\] batch has 12"):
        layout.unpack(SEQS[0])
    assert repr(layout) == "BatchLayout(rows=3, row_length=4, sequences=3, padding=4)"


@pytest.mark.parametrize("index", [3, -4, 1.0, "0"])
def test_flat_positions_of_a_sequence_the_layout_does_not_hold(index: object) -> None:
    """An index past the layout's sequences (or not an integer) names how many it holds."""
    layout = mr.BatchLayout.padded([3, 1, 4])
    assert layout.flat_positions(-1).tolist() == layout.flat_positions(2).tolist()  # from the end, as a list does
    with pytest.raises(mr.InvalidArgumentError, match=r"holds 3 sequences.*-3\.\.2"):
        layout.flat_positions(index)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: mr.BatchLayout.padded([2.9, 5]),
        lambda: mr.BatchLayout.padded(torch.tensor([2.9, 5.0])),
        lambda: mr.BatchLayout.packed([2.9, 5]),
        lambda: mr.BatchLayout.split([1.5, 2], [3, 5]),
        lambda: mr.BatchLayout.padded([3, 5], length=6.5),
        lambda: mr.BatchLayout.packed([3, 5], row_length=8.5),
    ],
    ids=["padded", "padded tensor", "packed", "split", "length", "row_length"],
)
def test_lengths_that_are_not_integers_are_refused_not_cut(build: Callable[[], mr.BatchLayout]) -> None:
    """2.9 tokens is not 2: refused as generation_capacity refuses 2.5, naming the value."""
    with pytest.raises(mr.InvalidArgumentError, match=r"must be a non-negative int, got \d\.\d"):
        build()


def test_lengths_must_be_one_per_sequence() -> None:
    with pytest.raises(mr.InvalidArgumentError, match=r"1-D, one length per sequence; got shape \(1, 2\)"):
        mr.BatchLayout.packed(torch.tensor([[3, 5]]))
    with pytest.raises(mr.ArgumentTypeError, match="one length per sequence"):
        mr.BatchLayout.padded(3)  # type: ignore[arg-type]
    assert mr.BatchLayout.padded(torch.tensor([3, 5])).lengths == mr.BatchLayout.padded([3, 5]).lengths


@pytest.mark.parametrize(
    "call",
    [
        lambda: mr.pad_routes([SEQS[0], "routes"]),  # type: ignore[list-item]
        lambda: mr.pack_routes([SEQS[0], torch.zeros(2, 1)]),  # type: ignore[list-item]
        lambda: mr.pad_routes(SEQS[2]),  # one Routes is not a list of sequences (it iterates by token)
        lambda: mr.BatchLayout.padded([1, 1, 1, 1]).routes(SEQS[2]),
        lambda: mr.BatchLayout.padded([3]).unpack(torch.zeros(3, 1)),  # type: ignore[arg-type]
        lambda: mr.BatchLayout(1.5, 4, ((0, 0, 2),)),  # type: ignore[arg-type]
        lambda: mr.BatchLayout(1, "4", ((0, 0, 2),)),  # type: ignore[arg-type]
        lambda: mr.BatchLayout(1, 4, ((0, 0.5, 2),)),  # type: ignore[arg-type]
        lambda: mr.BatchLayout(1, 4, ((0, 0),)),  # type: ignore[arg-type]
        lambda: mr.BatchLayout(1, 4, None),  # type: ignore[arg-type]
        lambda: mr.BatchLayout.padded([1]).tokens(["a"]),  # type: ignore[list-item]
        lambda: mr.BatchLayout.padded([1, 2]).tokens([torch.tensor([1]), torch.tensor([2, 3])], pad_id="x"),
    ],
    ids=[
        "pad str",
        "pack tensor",
        "pad one Routes",
        "routes one Routes",
        "unpack tensor",
        "float rows",
        "str row_length",
        "float start",
        "pair placement",
        "no placements",
        "str ids",
        "str pad_id",
    ],
)
def test_inputs_of_the_wrong_type_are_moe_replay_errors(call: Callable[[], object]) -> None:
    with pytest.raises(mr.MoEReplayError):
        call()


def test_token_ids_and_pad_id_are_refused_not_cut() -> None:
    """1.7 is not token 1: float ids and pad ids are refused, as float lengths are."""
    layout = mr.BatchLayout.padded([2, 1])
    with pytest.raises(mr.InvalidArgumentError, match="sequence 0 holds torch.float32 values"):
        layout.tokens([torch.tensor([1.7, 2.2]), torch.tensor([3])])
    with pytest.raises(mr.InvalidArgumentError, match="pad_id must be an integer token id, got 0.5"):
        layout.tokens([torch.tensor([1, 2]), torch.tensor([3])], pad_id=0.5)
    assert layout.tokens([[1, 2], [3]], pad_id=torch.tensor(9)).tolist() == [[1, 2], [3, 9]]
    with pytest.raises(mr.InvalidArgumentError, match="pad_id must be an integer token id, got 2361.*past the int64"):
        layout.tokens([[1, 2], [3]], pad_id=2**71)  # was a bare OverflowError from torch.full


@pytest.mark.parametrize("value", [np.array(3), torch.tensor(3), 7, None])
def test_sequences_that_are_no_list_are_refused(value: object) -> None:
    """A 0-d array or tensor is iterable to isinstance but one value: refused as any non-list, never a raw error."""
    for call in (mr.pad_routes, mr.pack_routes):
        with pytest.raises(mr.ArgumentTypeError, match="one Routes per sequence"):
            call(value)  # type: ignore[arg-type]
    with pytest.raises(mr.MoEReplayError, match="one length per sequence"):
        mr.BatchLayout.padded(value)  # type: ignore[arg-type]
    with pytest.raises(mr.ArgumentTypeError, match="one sequence of token ids per sequence"):
        mr.BatchLayout.padded([1]).tokens(value)  # type: ignore[arg-type]  # None was a bare TypeError


@pytest.mark.parametrize(
    "call",
    [
        lambda: mr.BatchLayout.padded({3, 2}),  # type: ignore[arg-type]
        lambda: mr.BatchLayout.packed(frozenset({5, 1}), row_length=8),  # type: ignore[arg-type]
        lambda: mr.Routes([torch.zeros(2, 1, dtype=torch.long)], {"a"}, num_experts=4),  # type: ignore[arg-type]
    ],
    ids=["padded", "packed", "Routes names"],
)
def test_a_set_is_refused_where_order_matters(call: Callable[[], object]) -> None:
    """{3, 2} iterates as 2, 3: lengths, sequences or names given as a set would be taken in another order."""
    with pytest.raises(mr.ArgumentTypeError):
        call()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "wrong",
    [
        mr.BatchLayout.padded([3, 5], side="right"),  # the other padding side: padding rows given to sequence 0
        mr.BatchLayout.padded([2, 5], side="left"),  # a length one short: a recorded token's route dropped
        mr.BatchLayout.packed([5, 5]),  # packed where the forward was padded
    ],
    ids=["other side", "shorter", "packed"],
)
def test_unpack_refuses_a_layout_that_does_not_fit_the_mask_the_capture_was_fed(wrong: mr.BatchLayout) -> None:
    """A capture knows which rows its forward was fed as padding: a layout that disagrees is refused, not followed."""
    model = mr.models.build("softmax_topk", num_layers=1)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    right = mr.BatchLayout.padded([3, 5], side="left")
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=right.attention_mask())
        routes = session.routes()
    parts = right.unpack(routes)  # the layout of the batch that was fed: each sequence gets its own rows
    for part, positions in zip(parts, (right.flat_positions(0), right.flat_positions(1)), strict=True):
        assert part.token_ids.tolist() == ids.reshape(-1)[positions].tolist()
        assert torch.equal(part.layer(routes.names[0]), routes.layer(routes.names[0])[positions])
    with pytest.raises(mr.RoutesValidationError, match=r"BatchLayout.unpack: batch position \[\d, \d\].*does not fit"):
        wrong.unpack(routes)
    with mr.attach(model) as session:  # fed no mask: nothing tells the padding, the layout is taken as given
        with session.capture():
            model(ids)
        assert tuple(p.num_tokens for p in wrong.unpack(session.routes())) == wrong.lengths


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "build",
    [
        lambda parts: mr.pad_routes(parts),
        lambda parts: mr.pack_routes(parts),
        lambda parts: mr.BatchLayout.padded([5, 5]).routes(parts),
    ],
    ids=["pad_routes", "pack_routes", "BatchLayout.routes"],
)
def test_batch_routes_keep_which_rows_were_recorded_at_padding(build: Callable[[list[mr.Routes]], mr.Routes]) -> None:
    """Rows a capture recorded at prompt padding are refused for real tokens after a layout as they are before it."""
    model = mr.models.build("softmax_topk", num_layers=1)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = mr.BatchLayout.padded([3, 5], side="left").attention_mask()
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=mask)
        routes = session.routes()
        batch = build([routes[0:5], routes[5:10]])  # each row of the batch, padding included, as one sequence
        with session.replay(batch), session.capture():  # fed as the capture was (its mask): forced as recorded
            model(ids, attention_mask=mask)
        assert session.routes().equal(routes)
        for fed in (ids, ids.reshape(1, -1)):  # the padding's rows forced on tokens fed as real ones (no mask)
            with pytest.raises(mr.TokenMismatchError, match="recorded at prompt padding"), session.replay(batch):
                model(fed)


def _sequence_first_captures(lengths: list[int]) -> tuple[mr.Routes, list[mr.Routes], torch.Tensor]:
    """A capture of a [2, 4] batch by routers that see the tokens sequence-first, the capture of each sequence alone
    (its model routes each token by its own id: the rows each sequence must get), and the ids."""
    from tests.test_feeds import _batch, _SequenceFirst

    model = _SequenceFirst().eval()
    ids = _batch(rows=len(lengths), width=max(lengths))
    mask = mr.BatchLayout.padded(lengths).attention_mask()
    with mr.attach(model) as session, torch.no_grad():
        alone = []
        for row, n in zip(ids, lengths, strict=True):  # (one sequence: no order to tell)
            with session.capture():
                model(row[None, :n])
            alone.append(session.routes())
        with session.capture():
            model(ids, attention_mask=mask)
        return session.routes(), alone, ids


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("lengths", [[4, 4], [3, 4]], ids=["full", "right-padded"])
@pytest.mark.parametrize("kept", ["as captured", "saved and loaded"])
def test_unpack_lays_out_the_capture_of_routers_that_see_the_tokens_sequence_first(
    lengths: list[int], kept: str, tmp_path: Path
) -> None:
    """Once silent: BatchLayout.unpack read the rows of routers that see a [batch, positions] forward sequence-first
    (position 0 of every sequence, then position 1..., as fairseq's and Megatron's layers run) sequence by sequence,
    and gave each sequence rows of the others' tokens (their token ids went with them, so a replay refused them, but
    an engine format written from them drops the ids). The capture now knows the order of its rows' tokens, and
    unpack gives each sequence the rows of its own tokens, as a capture of that sequence alone records them."""
    routes, alone, ids = _sequence_first_captures(lengths)
    if kept == "saved and loaded":
        routes.save(tmp_path / "r.npz")
        routes = mr.Routes.load(tmp_path / "r.npz")
    layout = mr.BatchLayout.padded(lengths)
    parts = layout.unpack(routes)
    for part, own, row, n in zip(parts, alone, ids, lengths, strict=True):
        assert part.equal(own)
        assert part.token_ids.tolist() == row[:n].tolist()
    # the sequences laid out again: the batch's rows, in the order of its tokens
    assert layout.routes(parts).equal(layout.routes(alone))
    tried(len(parts))


@pytest.mark.reliability("silent replays")
def test_unpack_refuses_rows_of_routers_that_see_the_tokens_sequence_first_whose_tokens_are_not_known() -> None:
    """A keep_newest capture that wrapped keeps no forward's ids: rows of routers that saw the tokens sequence-first,
    whose tokens cannot be told, are refused rather than read sequence by sequence."""
    from tests.test_feeds import _batch, _SequenceFirst

    model = _SequenceFirst().eval()
    with mr.attach(model, capacity=8, keep_newest=True) as session, torch.no_grad():
        with session.capture():
            for seed in range(2):
                model(_batch(seed, rows=2, width=4))
        routes = session.routes()
    with pytest.raises(mr.RoutesValidationError, match="sequence-first.*could not tell"):
        mr.BatchLayout.padded([4, 4]).unpack(routes)
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["BatchLayout.unpack", "split_generation"])
def test_an_embeddings_capture_of_routers_that_see_the_batch_sequence_first_is_laid_out_by_token(how: str) -> None:
    """Once silent: a capture of a [2, 4] batch fed as embeddings to a model whose routers see it sequence-first holds
    its rows position by position, but no one told the capture that order (``Routes._order_untold``), and
    BatchLayout.unpack and split_generation read them sequence by sequence: each sequence got rows of other tokens.
    The order is now told for embeddings as for ids (one token's embedding changed), and each sequence gets the rows
    a capture of it alone records (split_generation adds the row of the token generated last: never routed)."""
    from tests.test_feeds import _batch, _EmbedsSequenceFirst

    model = _EmbedsSequenceFirst().eval()
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(inputs_embeds=model.embed(ids))
        routes = session.routes()
        alone = []
        for row in ids:
            with session.capture():
                model(row[None])
            alone.append(session.routes())
    if how == "BatchLayout.unpack":
        parts = mr.BatchLayout.padded([4, 4]).unpack(routes)
    else:
        parts = [p[:4] for p in mr.split_generation(routes, batch_size=2, prompt_len=4)]
    assert all(got.equal(want) for got, want in zip(parts, alone, strict=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "build",
    [
        lambda parts: mr.pad_routes(parts),
        lambda parts: mr.pack_routes(parts),
        lambda parts: mr.BatchLayout.padded([p.num_tokens for p in parts]).routes(parts),
        lambda parts: mr.interop.stitch_turns(parts),
        lambda parts: parts[0][torch.arange(parts[0].num_tokens).flip(0)][torch.arange(parts[0].num_tokens).flip(0)],
    ],
    ids=["pad_routes", "pack_routes", "BatchLayout.routes", "stitch_turns", "a pick of every row"],
)
def test_routes_laid_out_keep_what_refuses_their_replay(build: Callable[[list[mr.Routes]], mr.Routes]) -> None:
    """Once silent: rows an engine reader placed by their row count alone (a row too many at the front shifts every
    token) and the rows of a keep_newest capture whose ring wrapped (no token ids, starting anywhere) are refused by a
    replay; laid out in a batch (pad_routes, pack_routes, BatchLayout.routes), stitched as one turn or picked by an
    index, they lost that mark, and a strict=False replay forced every token its neighbour's experts without a word.
    Now the rows keep it through each: refused as they are before, while the exact rows replay the capture."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        captured = session.routes()
        lm = mr.LayerMap.from_session(session, num_layers=3)
        arr = mr.interop.to_vllm_legacy(captured, lm, drop_last=True)
        exact = mr.interop.from_vllm_legacy(arr, lm)  # (read without num_tokens: placed by the row count alone)
        front = mr.interop.from_vllm_legacy(np.concatenate([arr[-1:], arr]), lm)  # a row too many at the front

        def replayed(routes: mr.Routes) -> mr.Routes:
            with session.replay(routes, strict=False), session.capture(), torch.no_grad():
                model(ids)
            return session.routes()

        assert replayed(build([exact])).equal(captured)
        with pytest.raises(mr.ReplayConsumptionError, match="left rows unread of routes from_vllm_legacy"):
            replayed(build([front]))
    with mr.attach(model, capacity=8, keep_newest=True) as session:
        with session.capture(), torch.no_grad():
            model(torch.randint(1, 128, (1, 4)))
            model(ids)  # the ring wraps: it holds the newest 8 rows, which know no token ids
        wrapped = session.routes()
    with mr.attach(model) as session:
        with pytest.raises(mr.RoutesValidationError, match="keep_newest capture whose ring wrapped"):
            with session.replay(build([wrapped]), strict=False):
                model(ids)
    tried(10)
