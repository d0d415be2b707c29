"""Known gaps closed in round 57, and the cases beside each that must stay as they were.

Forwards whose routers see their tokens sequence-first: a model fed ``[positions, batch]`` ids (as ``nn.Transformer``
takes them) whose layers run batch-major, and a model fed ``[batch, positions]`` ids whose layers run sequence-first
(fairseq's, Megatron's). A capture of either records each row's token and place in the order its routers saw them,
and rows whose ids were dropped are forced only where the positions fed are their places. The oracle is the test's own
hooks on each experts module: every token whose row names experts dispatches exactly those, or the replay is refused
with the model as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.models import MoEBlock, MoEConfig

from .test_gaps53 import _caches, _feed, _put_back, _static_model
from .test_review51 import _outcome
from .test_review56 import _Pooled
from .test_review57 import _SequenceFirst
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts


def _slice_rows(batch: int, positions: int, lo: int, hi: int) -> torch.Tensor:
    """The rows of positions ``lo..hi - 1`` of each of ``batch`` sequences of ``positions``, in the order routers that
    see them batch-major hold them (each sequence in turn)."""
    return (torch.arange(batch)[:, None] * positions + torch.arange(lo, hi)).reshape(-1)


@pytest.mark.reliability("round trips")
def test_a_positions_first_forward_records_each_rows_token_and_place_in_the_routers_order() -> None:
    """A ``[positions, batch]`` forward of three sequences whose layers run batch-major (causal attention along the
    positions): the capture tells the routers' order (every sequence in turn) and records each row's token id and
    place in it, not those of the ids read row by row."""
    model = _SequenceFirst()
    seq = torch.randint(1, 128, (6, 3), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(6)[:, None].expand(6, 3)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(seq, position_ids=pos)
        routes = session.routes()
    assert routes._seq_pos is not None
    assert torch.equal(routes._seq_pos.long(), pos.t().reshape(-1))
    assert routes.token_ids is not None
    assert torch.equal(routes.token_ids.long(), seq.t().reshape(-1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed", ["another slice", "a suffix without its prefix"])
def test_rows_without_ids_of_a_positions_first_forward_fed_other_places_are_refused(fed: str) -> None:
    """A ``[positions, batch]`` model's capture of three sequences of 9, its ids dropped: the rows of positions 0..2
    are exact on their own tokens and positions, and refused (the model unchanged) on the tokens of positions 6..8
    fed their positions; the whole capture's rows fed positions 3..8 alone (a suffix without its prefix) are refused
    as well."""
    model = _SequenceFirst()
    _watch_experts(model)
    seq = torch.randint(1, 128, (9, 3), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(9)[:, None].expand(9, 3)
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(seq, position_ids=pos)
        want, routes = _joined(rec), session.routes().with_token_ids(None)
        _perturb(model)
        first = _slice_rows(3, 9, 0, 3)
        with torch.no_grad():
            own = _outcome(model, session, routes[first], lambda: model(seq[:3], position_ids=pos[:3]), model)
            if fed == "another slice":
                other = _outcome(model, session, routes[first], lambda: model(seq[6:], position_ids=pos[6:]), model)
            else:
                tail = _slice_rows(3, 9, 0, 6)
                other = _outcome(model, session, routes[tail], lambda: model(seq[3:], position_ids=pos[3:]), model)
        assert own is not None, "the rows of the slice they were captured at refused though exact"
        for layer, got in own.items():
            assert torch.equal(got, want[layer][first]), layer
        assert other is None, "rows forced on tokens at other places"
    finally:
        session.detach()


class _Transposing(nn.Module):
    """fairseq's shape of a model: ``[batch, positions]`` ids and their ``position_ids``, its MoE layers run on
    ``[positions, batch, hidden]`` (its routers see the tokens sequence-first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        cfg = MoEConfig(hidden_size=32, num_heads=4, num_experts=8, top_k=2, expert_size=16, vocab_size=128)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(32, cfg.hidden_size)
        self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = (self.embed(input_ids) + self.pos(position_ids)).transpose(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return x.transpose(0, 1)


@pytest.mark.reliability("silent replays")
def test_rows_without_ids_of_a_model_that_transposes_its_batch_fed_another_slice_are_refused() -> None:
    """A ``[batch, positions]`` model whose routers see the batch sequence-first: its capture's rows of the first 3
    positions of two sequences, their ids dropped, are exact on those tokens and positions, and refused on the tokens
    of positions 6..8 fed their positions (their rows held in the routers' order, position by position)."""
    model = _Transposing()
    _watch_experts(model)
    seq = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(9)[None].expand(2, 9)
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(seq, position_ids=pos)
        want, routes = _joined(rec), session.routes().with_token_ids(None)
        _perturb(model)
        first = torch.arange(6)  # (positions 0..2 of both sequences, position by position)
        with torch.no_grad():
            own = _outcome(model, session, routes[first], lambda: model(seq[:, :3], position_ids=pos[:, :3]), model)
            other = _outcome(model, session, routes[first], lambda: model(seq[:, 6:], position_ids=pos[:, 6:]), model)
        assert own is not None, "the rows of the slice they were captured at refused though exact"
        for layer, got in own.items():
            assert torch.equal(got, want[layer][first]), layer
        assert other is None, "rows forced on tokens at other places"
    finally:
        session.detach()


# ------------------------------------------------------------------------------ a word index under a name of positions
def _pooled_capture(mask: torch.Tensor | None, words: torch.Tensor) -> tuple[nn.Module, mr.Session, torch.Tensor]:
    """test_review56's wrapper (any keyword beside the tokens and their mask), attached, its capture of a [2, 6] batch
    fed ``words`` as ``word_positions=`` (and ``mask``) taken; its session, and the ids."""
    model = _Pooled()
    _watch_experts(model)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(ids, attention_mask=mask, word_positions=words)
    return model, session, ids


@pytest.mark.reliability("false refusals")
def test_a_word_index_beside_a_mask_of_left_padding_does_not_refuse_an_exact_replay() -> None:
    """A left-padded batch (its mask given) fed a word index under ``word_positions=`` (sub-words of one word share
    it, the padding at 0): its rows laid out by ``BatchLayout.padded`` without ids replay it exactly, the routers
    moved, as the capture did not read the word index as places."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    words = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 1, 1, 2, 3, 3]])
    model, session, ids = _pooled_capture(mask, words)
    try:
        r = session.routes().with_token_ids(None)
        routes = mr.BatchLayout.padded([4, 6], side="left").routes([r[2:6], r[6:]])
        with torch.no_grad(), _dispatched(model) as rec:
            model(ids, attention_mask=mask, word_positions=words)
        want = _joined(rec)
        _perturb(model)
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(ids, attention_mask=mask, word_positions=words), model)
        assert got is not None, "refused though exact"
        for layer, rows in got.items():
            held = mask.reshape(-1).bool()
            assert torch.equal(rows[held], want[layer][held]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", ["token_positions", "position_index"])
def test_positions_under_a_name_like_positions_that_tell_places_are_still_compared(name: str) -> None:
    """Positions given under a name only like one of positions, each token at a place of its own: still read as the
    tokens' positions, so a capture's rows of places 0..3 (ids dropped) fed the tokens of places 2..5 at their
    positions are refused, the model unchanged, and fed their own tokens at 0..3 replay exactly."""
    model, session, ids = _pooled_capture(None, torch.arange(6)[None].expand(2, 6))
    try:
        r = session.routes().with_token_ids(None)
        first = _slice_rows(2, 6, 0, 4)
        places = torch.arange(6)[None].expand(2, 6)
        _perturb(model)
        with torch.no_grad():
            own = _outcome(model, session, r[first], lambda: model(ids[:, :4], **{name: places[:, :4]}), model)
            other = _outcome(model, session, r[first], lambda: model(ids[:, 2:], **{name: places[:, 2:]}), model)
        assert own is not None, "the rows' own tokens at their own positions refused though exact"
        assert other is None, "rows forced on tokens at other places given under a name like positions"
    finally:
        session.detach()


# ------------------------------------------------------------------------- copies of indices given to the loss
def _kept(layers: int, grad: bool) -> tuple[mr.Routes, mr.RouterScores]:
    """Routes of a capture of a reference model, and the scores kept in a replay of them (with gradients: ``grad``)."""
    model = mr.models.build("softmax_topk", num_layers=layers)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept, torch.set_grad_enabled(grad):
            model(ids)
    return routes, kept


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("made", ["kept scores", "softmax of them"])
@pytest.mark.parametrize("copy", ["clone", "numpy"])
def test_copied_rows_of_kept_scores_in_another_router_order_are_refused(made: str, copy: str) -> None:
    """Three routers' rows copied out of ``routes.indices`` (cloned, or through numpy), given in another router order
    than the kept probabilities (the scores themselves, or made from them with gradients): refused, naming the
    router whose rows they are; in the probabilities' order, the loss of each router's own."""
    routes, kept = _kept(3, grad=made != "kept scores")
    probs = list(kept.scores) if made == "kept scores" else [s.softmax(-1) for s in kept.scores]
    rows = routes.indices.unbind(1)
    copies = [r.clone() if copy == "clone" else torch.from_numpy(r.numpy().copy()) for r in rows]
    want = mr.load_balancing_loss(probs, list(kept.indices))
    assert mr.load_balancing_loss(probs, copies).item() == pytest.approx(want.item(), abs=1e-6)
    with pytest.raises(mr.InvalidArgumentError, match=r"indices\[0\].*name no router.*another router's experts"):
        mr.load_balancing_loss(probs, [copies[1], copies[0], copies[2]])


@pytest.mark.reliability("false refusals")
def test_copies_of_other_rows_than_those_kept_are_counted_as_given() -> None:
    """Rows of other experts than the kept scores were kept with (another capture's, copied: a clone), in the
    probabilities' order: counted as given, router by router, not refused (nothing tells their router)."""
    routes, kept = _kept(2, grad=False)
    other = [(r + 1) % 8 for r in routes.indices.unbind(1)]
    got = mr.load_balancing_loss(list(kept.scores), other)
    want = torch.stack([mr.load_balancing_loss(p, x) for p, x in zip(kept.scores, other, strict=True)]).mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


# ------------------------------------------------------------ rows of no recorded place after a static cache
@pytest.mark.reliability("silent replays")
def test_a_turn_laid_out_from_an_array_after_a_static_cache_is_refused_unless_its_ids_are_given() -> None:
    """A second turn (places 5..8) captured after a prompt a static cache holds, its rows rebuilt from an array (no
    place recorded) and laid out as a sequence of their own: fed after that cache at their positions, nothing tells
    them from another rank's slice, so they are refused with the model as it was (a false refusal the error says how
    to avoid); given their token ids they replay exactly."""
    model = _static_model("gpt-fast", "input_pos")
    _watch_experts(model)
    prompt, turn = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    later = torch.arange(5, 9)[None]
    with torch.no_grad():
        _feed(model, prompt, torch.arange(5)[None], "input_pos", "gpt-fast")
    held = _caches(model)
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            _feed(model, turn, later, "input_pos", "gpt-fast")
        want, captured = _joined(rec), session.routes()
        bare = mr.Routes.from_numpy(captured.to_numpy(), names=captured.names, num_experts=captured.experts_per_layer)
        _perturb(model)
        run = lambda: _feed(model, turn, later, "input_pos", "gpt-fast")  # noqa: E731
        _put_back(model, held)
        with torch.no_grad(), pytest.raises(mr.TokenMismatchError, match=r"with_token_ids"):
            with session.replay(mr.BatchLayout.packed([4]).routes([bare])):
                run()
        assert all(torch.equal(v, _caches(model)[k]) for k, v in held.items()), "the cache was written"
        _put_back(model, held)
        with torch.no_grad():
            got = _outcome(model, session, mr.BatchLayout.packed([4]).routes([bare.with_token_ids(turn)]), run, model)
        assert got is not None, "refused though its ids were given"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()
