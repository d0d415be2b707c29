"""Round 60's review: a video kept in one preallocated buffer the user's loop refills in place between forwards,
beside positions that start at two places, and rows a loss pairs with their router by where they start in its
storage."""

from __future__ import annotations

import inspect

import pytest
import torch

import moe_replay as mr

from .test_gaps56 import _kept_loss_case
from .test_losses import by_hand
from .test_review51 import _outcome
from .test_review55 import _by_name, _slices, _wrapper
from .test_review57 import _StackedModel
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_P = inspect.Parameter


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", ["frames", "clip", "vision_x"])
def test_a_slice_fed_another_ranks_tokens_beside_a_video_buffer_refilled_in_place_is_refused(name: str) -> None:
    """A video's frames kept in one preallocated buffer that the loop refills in place (``buf.copy_(clip)``) before
    each forward, under a name that names no media: another rank's slice fed beside it is refused, as beside a video
    handed on as a new tensor each time (a buffer written between forwards is not thereby a cache)."""
    shape = (1, 3, 3, 4, 4) if name != "vision_x" else (1, 1, 3, 3, 4, 4)
    clip = torch.rand(shape)
    buf = torch.empty(shape)
    model = _wrapper(
        [("position_ids", _P.POSITIONAL_OR_KEYWORD), (name, _P.POSITIONAL_OR_KEYWORD)],
        _by_name("position_ids"),
    )

    def run(ids: torch.Tensor, pos: torch.Tensor) -> object:
        buf.copy_(clip)  # (the loop's next clip, here the same one)
        return model(ids, position_ids=pos, **{name: buf})

    exact, refused = _slices(model, run)
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


# ------------------------------------------------------------ rows of a stack written in place after it was handed out
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("write", ["flipped in place", "one slot overwritten"])
def test_rows_of_a_routes_indices_stack_written_in_place_are_not_paired_by_their_old_slots(write: str) -> None:
    """``routes.indices`` written in place after it was handed out (its routers reordered to the probabilities'
    order, ``ind.copy_(ind.flip(1))``, or one router's slot refilled with another's rows) no longer holds one router
    at each index: its slices must not name the router that slot held, or the loss pairs rows with another router's
    probabilities. Each is counted with the probabilities it is given beside (no name to go by), or refused."""
    routes, kept, _ = _kept_loss_case(3)
    names = list(kept.names)
    ind = routes.indices
    if write == "flipped in place":
        ind.copy_(ind.flip(1))
        probs = list(kept.scores)[::-1]
        want = sum(by_hand(kept[n][0], kept[n][1]) for n in names) / len(names)
    else:
        ind[:, 0] = ind[:, 2]  # (router 0's slot now holds router 2's rows, given beside router 2's probabilities)
        probs = [kept[names[2]][0], kept[names[1]][0], kept[names[2]][0]]
        want = sum(by_hand(p, r) for p, r in zip(probs, ind.unbind(1), strict=True)) / 3
    try:
        got = mr.load_balancing_loss(probs, list(ind.unbind(1))).item()
    except mr.MoEReplayError:
        return
    assert got == pytest.approx(want, abs=1e-5), "rows paired with another router's probabilities"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("op", ["clamp_", "sub_"])
def test_a_slice_fed_another_ranks_tokens_beside_a_video_its_forward_normalizes_in_place_is_refused(op: str) -> None:
    """A video's frames under a name of its own (each frame larger than the positions fed) that the model's forward
    normalizes in place (``frames.clamp_(0, 1)``, which moves no value, or ``frames.sub_(0.5)``, which moves every
    one): written whole, at no positions, as no cache is; another rank's slice fed beside it is refused, as beside
    frames the forward only reads."""
    clip = torch.rand(1, 2, 3, 16, 12)

    def to_inner(inner: torch.nn.Module, ids: torch.Tensor, args: tuple[object, ...], kw: dict[str, object]) -> object:
        frames = kw["frames"]
        assert isinstance(frames, torch.Tensor)
        frames.clamp_(0.0, 1.0) if op == "clamp_" else frames.sub_(0.5)  # (in place, every frame: no position's slot)
        return inner(ids, position_ids=kw["position_ids"])

    model = _wrapper([("position_ids", _P.POSITIONAL_OR_KEYWORD), ("frames", _P.POSITIONAL_OR_KEYWORD)], to_inner)
    exact, refused = _slices(model, lambda ids, pos: model(ids, position_ids=pos, frames=clip.clone()))
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("handed", ["in place", "as a copy"])
def test_a_turns_rows_fed_the_next_turn_after_a_stacked_static_cache_are_refused(handed: str) -> None:
    """Three turns of four tokens (places 0..3, 4..7, 8..11) captured, fed a static cache stacked in one tensor of its
    own name (written at each forward's positions; the same tensor each turn, or a copy of the last): the second
    turn's rows laid out alone, fed the third turn's tokens and positions on the cache holding the first two turns,
    are refused; fed their own turn's tokens on the cache holding the first, they are exact."""
    torch.manual_seed(1)
    model = _StackedModel()
    _watch_experts(model)
    kvs = torch.zeros(2, 2, 1, 4, 28, 8)  # (a shape of its own: what was noted of other tests' caches tells nothing)
    turns = [torch.randint(1, 128, (1, 4)) for _ in range(3)]
    places = [torch.arange(4 * i, 4 * i + 4)[None] for i in range(3)]
    held = []
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            for ids, pos in zip(turns, places, strict=True):
                held.append(kvs.clone())
                kvs = kvs if handed == "in place" else kvs.clone()  # (each turn a copy of the last one's)
                model(ids, position_ids=pos, kvs=kvs)
        want = {layer: rows[4:8] for layer, rows in _joined(rec).items()}
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)[4:8]])
        _perturb(model)
        assert not all(torch.equal(r[4:8], r[8:]) for r in _joined(rec).values()), "turns 2 and 3 differ"
        with torch.no_grad():
            own = held[1].clone()
            got = _outcome(model, session, routes, lambda: model(turns[1], position_ids=places[1], kvs=own), model)
            assert got is not None, "the second turn refused though exact"
            for layer, rows in got.items():
                assert torch.equal(rows, want[layer]), layer
            nxt = held[2].clone()
            wrong = _outcome(model, session, routes, lambda: model(turns[2], position_ids=places[2], kvs=nxt), model)
        assert wrong is None, "the second turn's rows forced on the third turn's tokens"
    finally:
        session.detach()
