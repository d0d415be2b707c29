"""Round 56's closed gaps: each closing check beside the valid case it must not refuse.

- A static cache is read as holding the tokens before a forward's positions only where as many of its slices as the
  forward has sequences hold them (a batch row whose slot holds nothing beside one that holds its prefix is refused,
  test_review56): a cache larger than the batch, its sequence kept in any slot, and a batch whose every row holds its
  prefix, still replay exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_gaps53 import _MAX, _static_model
from .test_review51 import _outcome
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
@pytest.mark.xfail(
    strict=True,
    reason="a static cache's slices holding the tokens before a forward's positions are counted, not matched to the "
    "batch's rows: a cache of more slots than sequences whose batch slot is empty beside another slot's stale prefix "
    "is read as holding the batch's prefix, its rows forced",
)
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
