"""Round 58's review of round 50's merges (faults noted inside runs, places after a static cache, one-token rows), as
a hostile user would run them.

The oracle is the test's own hooks on each experts module: every token whose row names experts dispatches exactly
those, or the replay is refused with the model as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_gaps53 import _caches, _put_back, _StaticModel
from .test_review51 import _outcome
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts


class _MaskedStatic(_StaticModel):
    """gpt-fast's static-cache decoder (its cache in its modules, written at the positions given), whose forward takes
    ``position_ids`` and the attention mask a decode loop passes over the cache's tokens and its own (unread here, as
    a model whose cache masks by position reads none)."""

    def __init__(self, style: str = "gpt-fast") -> None:
        torch.manual_seed(3)
        super().__init__(style)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of ``input_ids`` (``[1, positions]``) at ``position_ids``."""
        return self.run(input_ids, position_ids)


def _step(model: torch.nn.Module, tokens: torch.Tensor, at: int) -> torch.Tensor:
    """One step: ``tokens`` (``[1, n]``) from place ``at`` on, given the mask over the ``at`` tokens before them."""
    n = int(tokens.shape[1])
    return model(
        tokens, position_ids=torch.arange(at, at + n)[None], attention_mask=torch.ones(1, at + n, dtype=torch.long)
    )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("width", [1, 3], ids=["decode steps", "chunks"])
def test_a_steps_rows_fed_another_step_beside_a_mask_over_a_kept_cache_are_refused(width: int) -> None:
    """A decode loop (or a chunked prefill, ``width`` tokens a step) on a model keeping its KV cache in its modules,
    each step fed its positions and the attention mask over the cache (as a generation loop passes it), each step
    captured on its own and its ids dropped: step 0's rows fed step 3 (other places in the sequence) must be refused,
    the model unchanged; step 3's own rows are exact. A forward given a mask longer than its tokens had its positions
    compared with no row's place, and step 0's experts were forced on step 3's tokens."""
    model = _MaskedStatic()
    _watch_experts(model)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(prompt, position_ids=torch.arange(5)[None], attention_mask=torch.ones(1, 5, dtype=torch.long))
    after_prompt = _caches(model)
    tokens = []
    with torch.no_grad():
        for i in range(4):
            tokens.append(logits[:, -1:].argmax(-1).repeat(1, width))
            logits = _step(model, tokens[-1], 5 + width * i)
    _put_back(model, after_prompt)
    session = mr.attach(model)
    try:
        rows, want = [], []
        with torch.no_grad():
            for i in range(4):
                with _dispatched(model) as rec, session.capture():
                    _step(model, tokens[i], 5 + width * i)
                rows.append(session.routes().with_token_ids(None))
                want.append(_joined(rec))
        assert any(not torch.equal(want[0][k], want[3][k]) for k in want[3]), "step 0's and step 3's experts differ"
        _perturb(model)

        def replayed(step_rows: mr.Routes) -> dict[str, torch.Tensor] | None:
            _put_back(model, after_prompt)
            with torch.no_grad():
                for i in range(3):
                    _step(model, tokens[i], 5 + width * i)
                return _outcome(model, session, step_rows, lambda: _step(model, tokens[3], 5 + width * 3), model)

        assert replayed(rows[0]) is None, "step 0's rows forced on step 3's tokens"
        own = replayed(rows[3])
        assert own is not None, "step 3's own rows refused though exact"
        assert own.keys() == want[3].keys()
        for layer, got in own.items():
            assert torch.equal(got, want[3][layer]), layer
    finally:
        session.detach()


class _ListAttention(nn.Module):
    """Causal attention over a KV cache kept in two Python lists the module appends each forward's keys and values
    to (a hand-written decode loop's cache): no tensor of it is written at the positions a forward is given."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``[1, positions, hidden]`` in and out; ``pos``: the tokens' places ``[positions]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        self.keys.append(k)
        self.values.append(v)
        keys, values = torch.cat(self.keys, 1), torch.cat(self.values, 1)
        seen = torch.arange(keys.shape[1])[None, :] <= pos[:, None]
        scores = (q @ keys.transpose(1, 2)).masked_fill(~seen, float("-inf"))
        return scores.softmax(-1) @ values


def _list_cache_model() -> _MaskedStatic:
    model = _MaskedStatic("tables")
    for layer in model.layers:
        layer.attn = _ListAttention()
    return model


@pytest.mark.reliability("silent replays")
def test_laid_out_rows_fed_other_places_than_recorded_after_a_list_cache_are_refused() -> None:
    """The same turn's laid-out rows, its first two fed the tokens of its last two at their places (7, 8): refused,
    the model unchanged; their recorded places tell them apart."""
    model = _list_cache_model()
    _watch_experts(model)
    g = torch.Generator().manual_seed(6)
    prompt, turn = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 4), generator=g)
    session = mr.attach(model)
    try:
        with torch.no_grad():
            model(prompt, position_ids=torch.arange(5)[None])
            with session.capture():
                model(turn, position_ids=torch.arange(5, 9)[None])
            routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
            got = _outcome(
                model, session, routes[:2], lambda: model(turn[:, 2:], position_ids=torch.tensor([[7, 8]])), model
            )
        assert got is None, "rows recorded at 5 and 6 forced at 7 and 8"
    finally:
        session.detach()


class _TiedGateBlock(nn.Module):
    """A softmax top-2 over eight experts, its gate a module it is handed (one gate tied across layers)."""

    def __init__(self, gate: nn.Linear) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, 16]`` in and out."""
        w, idx = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


class _LayerDrop(nn.Module):
    """Three MoE layers, the first two sharing one gate module; the second dropped at this forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        tied = nn.Linear(16, 8, bias=False)
        self.blocks = nn.ModuleList([_TiedGateBlock(tied), _TiedGateBlock(tied), _TiedGateBlock(nn.Linear(16, 8))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, 16]`` in and out, block 1 skipped."""
        for i, block in enumerate(self.blocks):
            if i != 1:
                x = x + block(x)
        return x


@pytest.mark.reliability("clear errors")
def test_a_dropped_layer_sharing_its_gate_with_a_layer_that_ran_is_not_said_to_have_rows_under_it() -> None:
    """A gate tied across two layers, the second layer dropped at the captured forward: routes() refuses its idle path
    naming exclude=, and does not say its rows are under the first layer's path (they are the first layer's own; the
    dropped block is no wrapper of the block that ran, nor inside it). With it excluded the replay is exact."""
    model = _LayerDrop()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, torch.no_grad():
        assert session.names == ("blocks.0.gate", "blocks.1.gate", "blocks.2.gate")
        with session.capture():
            model(x)
        with pytest.raises(mr.UnsupportedRouterError, match="exclude=") as info:
            session.routes()
    message = str(info.value)
    assert "blocks.1.gate" in message
    assert "recorded rows for" not in message and "its rows are there" not in message, message
    with mr.attach(model, exclude="blocks.1.gate") as session, torch.no_grad():
        with session.capture():
            native = model(x)
        with session.replay(session.routes()):
            assert torch.equal(model(x), native)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("masked", [False, True], ids=["cache", "cache and mask"])
def test_a_decode_steps_rows_fed_another_step_given_its_kv_cache_are_refused(masked: bool) -> None:
    """A decode loop given its KV cache (and the mask over it), each step fed its position and captured on its own,
    its ids dropped: step 1's rows fed step 4, with step 4's own cache, must be refused, the model unchanged; step
    4's own rows are exact. A forward given a cache had its positions compared with no row's place."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2)
    _watch_experts(model)
    g = torch.Generator().manual_seed(2)
    prompt, tokens = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 5), generator=g)

    def step(i: int, cache: object) -> object:
        mask = {"attention_mask": torch.ones(1, 6 + i, dtype=torch.long)} if masked else {}
        out = model(
            tokens[:, i : i + 1], position_ids=torch.tensor([[5 + i]]), past_key_values=cache, use_cache=True, **mask
        )
        return out.past_key_values

    session = mr.attach(model)
    try:
        with torch.no_grad():
            caches = [model(prompt, use_cache=True).past_key_values]
            rows, want = [], []
            for i in range(5):
                with _dispatched(model) as rec, session.capture():
                    caches.append(step(i, caches[-1]))
                rows.append(session.routes().with_token_ids(None))
                want.append(_joined(rec))
            assert any(not torch.equal(want[1][k], want[4][k]) for k in want[4]), "step 1's and step 4's experts differ"
            _perturb(model)
            assert _outcome(model, session, rows[1], lambda: step(4, caches[4]), model) is None, (
                "step 1's rows forced on step 4's token"
            )
            own = _outcome(model, session, rows[4], lambda: step(4, caches[4]), model)
        assert own is not None, "step 4's own rows refused though exact"
        assert own.keys() == want[4].keys()
        for layer, got in own.items():
            assert torch.equal(got, want[4][layer]), layer
    finally:
        session.detach()
