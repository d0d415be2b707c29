"""Round 56's closed gaps: each closing check beside the valid case it must not refuse.

- A static cache is read as holding the tokens before a forward's positions only where as many of its slices as the
  forward has sequences hold them (a batch row whose slot holds nothing beside one that holds its prefix is refused,
  test_review56): a cache larger than the batch, its sequence kept in any slot, and a batch whose every row holds its
  prefix, still replay exactly.
- One router's rows sliced out of ``Routes.indices`` (``unbind(1)``, ``indices[:, j]``) name their router, so
  ``load_balancing_loss`` pairs them with that router's probabilities in any order (test_losses): in the
  probabilities' own order, and sliced from routes of one router, they are counted as before.
- A floating tensor of five dimensions or more under a name of its own, beside positions that start at two places,
  is read as a cache where it was written in place between two forwards given it (test_review57): a static cache
  stacked in one tensor over three turns replays its last turn laid out alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_gaps53 import _MAX, _static_model
from .test_losses import by_hand
from .test_review51 import _outcome
from .test_review57 import _StackedModel
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts


# ------------------------------------------------------------------- a static cache of more slots than sequences
class _SlotCache(nn.Module):
    """A static KV cache of two slots, ``[slots, heads, _MAX, head_dim]``, a batch written from slot ``slot`` on
    (a slot allocator's cache; slot 0 is Meta's ``cache_k[:bsz]``)."""

    def __init__(self, heads: int, head_dim: int, slot: int) -> None:
        super().__init__()
        self.slot = slot
        self.register_buffer("k_cache", torch.zeros(2, heads, _MAX, head_dim))
        self.register_buffer("v_cache", torch.zeros(2, heads, _MAX, head_dim))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, Any]:
        rows = slice(self.slot, self.slot + k.shape[0])
        self.k_cache[rows, :, input_pos] = k
        self.v_cache[rows, :, input_pos] = v
        return self.k_cache[rows], self.v_cache[rows]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize(("batch", "slot"), [(1, 0), (1, 1), (2, 0)], ids=["first slot", "second slot", "both"])
def test_a_continuation_after_a_static_cache_of_more_slots_than_its_batch_is_not_refused(batch: int, slot: int) -> None:
    """A prompt written into a two-slot static cache (one sequence in its first or its second slot, the other slot
    empty; or two sequences, one a slot), a continuation captured and its rows laid out without ids: replayed on the
    cache holding the prompt, exact. Each sequence's slot holds its prefix; empty slots the batch does not use tell
    nothing."""
    torch.manual_seed(0)
    model = _static_model("gpt-fast", "position_ids")
    for layer in model.layers:
        layer.attn.kv_cache = _SlotCache(4, 8, slot)
    _watch_experts(model)
    first, second = torch.randint(1, 128, (batch, 5)), torch.randint(1, 128, (batch, 4))
    later = torch.arange(5, 9)[None]
    with torch.no_grad():
        model(first, position_ids=torch.arange(5)[None])
    after_prompt = [(m.k_cache.clone(), m.v_cache.clone()) for m in model.modules() if isinstance(m, _SlotCache)]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(second, position_ids=later)
        want = _joined(rec)
        turn = session.routes().with_token_ids(None)
        routes = mr.BatchLayout.padded([4] * batch).routes([turn[4 * i : 4 * (i + 1)] for i in range(batch)])
        _perturb(model)
        caches = [m for m in model.modules() if isinstance(m, _SlotCache)]
        with torch.no_grad():
            for m, (k, v) in zip(caches, after_prompt, strict=True):
                m.k_cache.copy_(k)
                m.v_cache.copy_(v)
            got = _outcome(model, session, routes, lambda: model(second, position_ids=later), model)
        assert got is not None, "refused though every sequence's slot holds its prefix"
        assert got.keys() == want.keys()
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_continuation_whose_slot_is_empty_beside_another_slots_stale_prefix_is_refused() -> None:
    """A prompt written into the second slot of a two-slot static cache, the continuation captured there (rows laid
    out without ids); the cache set to write the batch's one sequence in the first slot, which holds nothing: its
    tokens are fed without the tokens before them, so the replay at the same positions must be refused, as where
    every slot is empty."""
    torch.manual_seed(0)
    model = _static_model("gpt-fast", "position_ids")
    for layer in model.layers:
        layer.attn.kv_cache = _SlotCache(4, 8, 1)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    later = torch.arange(5, 9)[None]
    with torch.no_grad():
        model(first, position_ids=torch.arange(5)[None])
    session = mr.attach(model)
    try:
        with torch.no_grad(), session.capture():
            model(second, position_ids=later)
        routes = mr.BatchLayout.padded([4]).routes([session.routes().with_token_ids(None)])
        for m in model.modules():
            if isinstance(m, _SlotCache):
                m.slot = 0
        with pytest.raises(mr.TokenMismatchError), torch.no_grad(), session.replay(routes):
            model(second, position_ids=later)
    finally:
        session.detach()


# ------------------------------------------------------------------------- one router's rows sliced out of a stack
def _kept_loss_case(layers: int) -> tuple[mr.Routes, Any, float]:
    """Routes of a capture, the scores kept in a replay of them, and the loss counted by hand per router."""
    model = mr.models.build("softmax_topk", num_layers=layers)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept, torch.no_grad():
            model(ids)
    want = sum(by_hand(kept[n][0], kept[n][1]) for n in kept.names) / len(kept.names)
    return routes, kept, want


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("sliced", ["unbind", "indexed", "one router"])
def test_rows_sliced_out_of_routes_indices_in_the_probs_order_count_each_routers_own(sliced: str) -> None:
    """Each router's rows sliced out of ``routes.indices`` in the order of the kept probabilities (``unbind(1)``,
    ``indices[:, j]``, or the routes of one router selected first): no error, each router's own loss, the same as
    with ``per_layer()``; the other order (reversed) is paired by name to the same loss."""
    routes, kept, want = _kept_loss_case(1 if sliced == "one router" else 3)
    stack = routes.indices
    rows = list(stack.unbind(1)) if sliced != "indexed" else [stack[:, j] for j in range(stack.shape[1])]
    assert all(r.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr() for r in rows)  # (views)
    assert mr.load_balancing_loss(kept.scores, rows).item() == pytest.approx(want, abs=1e-5)
    assert mr.load_balancing_loss(kept.scores, routes.per_layer()).item() == pytest.approx(want, abs=1e-5)
    if len(rows) > 1:
        assert mr.load_balancing_loss(kept.scores[::-1], rows).item() == pytest.approx(want, abs=1e-5)


@pytest.mark.reliability("silent replays")
def test_copied_rows_in_another_router_order_are_paired_or_refused() -> None:
    """Each router's rows sliced out of ``routes.indices`` and cloned, given in the reverse of the probabilities'
    router order: paired with their own router's probabilities, or refused."""
    routes, kept, want = _kept_loss_case(2)
    copies = [r.clone() for r in routes.indices.unbind(1)][::-1]
    try:
        got = mr.load_balancing_loss(kept.scores, copies).item()
    except mr.MoEReplayError:
        return
    assert got == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------ a static cache stacked in one tensor, three turns
@pytest.mark.reliability("false refusals")
def test_the_last_of_three_turns_after_a_static_cache_stacked_in_one_tensor_replays_exactly() -> None:
    """A prompt (places 0..4) and two turns (5..8, 9..11) captured, fed one preallocated cache stacked in one tensor
    under a name of its own (written in place by each forward); the last turn's rows laid out as a sequence of their
    own, replayed on the cache holding what came before it: exact, not refused as a video's frames would be."""
    torch.manual_seed(0)
    model = _StackedModel()
    _watch_experts(model)
    kvs = torch.zeros(2, 2, 1, 4, 24, 8)  # (a shape of its own: what was noted of other tests' caches tells nothing)
    turns = [torch.randint(1, 128, (1, n)) for n in (5, 4, 3)]
    starts = [0, 5, 9]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            for ids, start in zip(turns, starts, strict=True):
                if start == starts[-1]:
                    before_last = kvs.clone()
                model(ids, position_ids=torch.arange(start, start + ids.shape[1])[None], kvs=kvs)
        want = {layer: rows[9:] for layer, rows in _joined(rec).items()}
        routes = mr.BatchLayout.packed([3]).routes([session.routes().with_token_ids(None)[9:]])
        _perturb(model)
        kvs.copy_(before_last)
        last = torch.arange(9, 12)[None]
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(turns[-1], position_ids=last, kvs=kvs), model)
        assert got is not None, "the last turn after a stacked static cache refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
def test_a_turn_after_a_stacked_static_cache_handed_on_as_a_copy_replays_exactly() -> None:
    """A prompt (places 0..4) and a turn (5..8) captured, the turn given a copy of the stacked cache the prompt
    filled; the turn's rows laid out alone, replayed on a copy of that cache: exact."""
    torch.manual_seed(0)
    model = _StackedModel()
    _watch_experts(model)
    kvs = torch.zeros(2, 2, 1, 4, 20, 8)  # (a shape of its own: what was noted of other tests' caches tells nothing)
    prompt, turn = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    later = torch.arange(5, 9)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(prompt, position_ids=torch.arange(5)[None], kvs=kvs)
            after_prompt = kvs.clone()
            model(turn, position_ids=later, kvs=after_prompt.clone())
        want = {layer: rows[5:] for layer, rows in _joined(rec).items()}
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)[5:]])
        _perturb(model)
        with torch.no_grad():
            got = _outcome(
                model, session, routes, lambda: model(turn, position_ids=later, kvs=after_prompt.clone()), model
            )
        assert got is not None, "the turn after a copied stacked static cache refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()
