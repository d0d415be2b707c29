"""Round 57's review of round 49's places, positions and static-cache evidence, as a hostile user would run them.

The models here are the static-cache decoders of ``test_gaps53`` (gpt-fast's ``KVCache`` written at ``input_pos``,
Meta's reference ``cache_k`` written from ``start_pos``). The oracle is the test's own hooks on each experts module:
every token whose row names experts dispatches exactly those, or the replay is refused with the model as it was.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay.models import MoEBlock, MoEConfig

from .interop import engines
from .test_gaps53 import _feed, _static_model
from .test_review51 import _outcome
from .test_review56 import _Kept
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

Oracle = dict[str, torch.Tensor]

#: a static-cache decoder's forms: (style of its cache, the name its forward takes positions under)
_STATIC = [("gpt-fast", "input_pos"), ("llama", "position_ids")]


def _engine_rows(session: mr.Session, seq: torch.Tensor, seed: int) -> mr.Routes:
    """vLLM's routes of ``seq`` (8 prompt tokens, then the completion) for the two MoE layers of a static-cache
    decoder, written by the fake engine from experts of its own (not what the model would choose)."""
    engine = engines.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=2)
    lm = mr.LayerMap.from_session(session, num_layers=2)
    truth = engine.truth(seq.numel(), seed=seed)
    arr = engines.vllm_033_routed_experts(engine, truth, 8)
    return mr.interop.from_vllm(arr, lm, prompt_len=8, completion_len=seq.numel() - 8)


def _rows_of(routes: mr.Routes) -> Oracle:
    """The experts each MoE layer's rows of ``routes`` name, by the name of the experts module the test watches."""
    return {name.rsplit(".", 1)[0] + ".experts": routes.layer(name).long() for name in routes.names}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("rows", ["captured", "laid out", "engine"])
@pytest.mark.parametrize(("style", "name"), _STATIC, ids=[s for s, _ in _STATIC])
def test_a_slice_fed_after_a_static_cache_a_capture_left_filled_is_refused(style: str, name: str, rows: str) -> None:
    """An RL trainer's flow on a model that keeps a static KV cache: the rollout (here a capture of the whole
    12-token sequence) leaves the cache holding every place it wrote. Rank 0's rows (the capture's, its ids dropped;
    the same laid out by ``BatchLayout.packed``; or an engine's rows of the sequence) fed rank 2's tokens at rank 2's
    positions must be refused, the model unchanged; rank 2's own rows fed there are exact. The cache holds something
    at every place before rank 2's positions, and the forward writes it at its positions: read as a continuation after
    the tokens it holds, the positions were not compared, and rank 0's experts were forced on rank 2's tokens."""
    model = _static_model(style, name)
    _watch_experts(model)
    seq = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(12)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            _feed(model, seq, pos, name, style)
        captured = session.routes().with_token_ids(None)
        if rows == "engine":
            routes = _engine_rows(session, seq[0], seed=5).with_token_ids(None)
            want = _rows_of(routes)
        else:
            routes = captured if rows == "captured" else mr.BatchLayout.packed([12]).routes([captured])
            want = _joined(rec)
        _perturb(model)
        assert not all(torch.equal(want[k][:4], want[k][8:]) for k in want), "rank 0's and rank 2's experts differ"
        with torch.no_grad():
            other = _outcome(
                model, session, routes[:4], lambda: _feed(model, seq[:, 8:], pos[:, 8:], name, style), model
            )
            own = _outcome(model, session, routes[8:], lambda: _feed(model, seq[:, 8:], pos[:, 8:], name, style), model)
        assert other is None, f"rank 0's {rows} rows forced on rank 2's tokens after the cache the capture filled"
        assert own is not None, "rank 2's own rows at its own positions refused though exact"
        for layer, got in own.items():  # (an engine's k experts of a row in its own order; -1 rows routed natively)
            held = want[layer][8:, 0] >= 0
            assert bool(held.any()), "the test forced nothing"
            assert torch.equal(got[held].sort(-1).values, want[layer][8:][held].sort(-1).values), layer
    finally:
        session.detach()


def _continuation(style: str, name: str) -> tuple[Any, ...]:
    """A second turn (4 tokens at places 5..8) of a static-cache decoder captured after its 5-token first turn: the
    model, its session, the turn's tokens and positions, the rows it dispatched, and its routes without ids."""
    model = _static_model(style, name)
    _watch_experts(model)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    with torch.no_grad():
        _feed(model, first, torch.arange(5)[None], name, style)
    session = mr.attach(model)
    later = torch.arange(5, 9)[None]
    with torch.no_grad(), _dispatched(model) as rec, session.capture():
        _feed(model, second, later, name, style)
    return model, session, second, later, _joined(rec), session.routes().with_token_ids(None)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("rows", ["captured", "laid out"])
@pytest.mark.parametrize(("style", "name"), _STATIC, ids=[s for s, _ in _STATIC])
def test_a_continuation_captured_after_a_static_cache_replays_exactly(style: str, name: str, rows: str) -> None:
    """The continuation these checks must keep: a second turn captured after the first turn's tokens a static cache
    holds, replayed on that cache, its rows as the capture holds them (their places 5..8) or laid out as a sequence
    of their own (places 0..3, recorded at 5..8): exact, the routers moved."""
    model, session, second, later, want, captured = _continuation(style, name)
    try:
        routes = captured if rows == "captured" else mr.BatchLayout.packed([4]).routes([captured])
        _perturb(model)
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: _feed(model, second, later, name, style), model)
        assert got is not None, "refused though exact"
        assert got.keys() == want.keys()
        for layer, dispatched in got.items():
            assert torch.equal(dispatched, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kept", ["a static cache a capture left filled", "a running statistic per position"])
def test_layout_rows_of_no_recorded_places_fed_another_ranks_slice_after_a_kept_tensor_are_refused(kept: str) -> None:
    """Rows built from an array (``Routes.from_numpy``: no places recorded) of a 12-token sequence, laid out by
    ``BatchLayout.packed([12])``, rank 0's slice fed rank 2's tokens and positions, after a static cache the capture
    left holding every place or beside a running statistic per position (test_review56's): must be refused. Such rows
    are told from a turn laid out as a sequence of its own, fed after the tokens a static cache holds, by nothing, so
    they are refused there as well."""
    model: torch.nn.Module = _static_model("gpt-fast", "input_pos") if kept.startswith("a static") else _Kept("ema")
    name = "input_pos" if kept.startswith("a static") else "position_ids"
    _watch_experts(model)
    seq = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(12)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            _feed(model, seq, pos, name, "gpt-fast")
        want, captured = _joined(rec), session.routes()
        bare = mr.Routes.from_numpy(captured.to_numpy(), names=captured.names, num_experts=captured.experts_per_layer)
        routes = mr.BatchLayout.packed([12]).routes([bare])
        _perturb(model)
        assert not all(torch.equal(want[k][:4], want[k][8:]) for k in want), "rank 0's and rank 2's experts differ"
        with torch.no_grad():
            other = _outcome(
                model, session, routes[:4], lambda: _feed(model, seq[:, 8:], pos[:, 8:], name, "gpt-fast"), model
            )
        assert other is None, "rank 0's rows forced on rank 2's tokens"
    finally:
        session.detach()


class _StackedLayer(nn.Module):
    """Causal attention over one layer's slice of a static cache stacked for every layer, ``[layers, 2, batch,
    heads, positions, head_dim]``, given to each forward and written at its positions; then an MoE block."""

    def __init__(self, cfg: MoEConfig, index: int) -> None:
        super().__init__()
        self.index, self.heads = index, cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mlp = MoEBlock(cfg)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, kvs: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        kvs[self.index, 0, :b, :, pos] = k
        kvs[self.index, 1, :b, :, pos] = v
        mask = torch.arange(kvs.shape[4])[None, :] <= pos[:, None]
        out = F.scaled_dot_product_attention(
            q, kvs[self.index, 0, :b], kvs[self.index, 1, :b], attn_mask=mask[None, None]
        )
        x = x + self.o_proj(out.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(x)


class _StackedModel(nn.Module):
    """A decoder fed a static KV cache it fills in place, stacked in one preallocated tensor under a name of its own
    (``kvs``), and its tokens' ``position_ids``."""

    def __init__(self) -> None:
        super().__init__()
        cfg = MoEConfig(hidden_size=32, num_heads=4, num_experts=8, top_k=2, expert_size=16, vocab_size=128)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(32, cfg.hidden_size)
        self.layers = nn.ModuleList(_StackedLayer(cfg, i) for i in range(2))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kvs: torch.Tensor) -> torch.Tensor:
        flat = position_ids.reshape(-1)
        x = self.embed(input_ids) + self.pos(flat)[None]
        for layer in self.layers:
            x = layer(x, flat, kvs)
        return x


@pytest.mark.reliability("false refusals")
def test_a_turn_after_a_static_cache_stacked_in_one_tensor_of_its_own_name_replays_exactly() -> None:
    """A multi-turn capture (a prompt at places 0..4, then a turn at 5..8) of a model fed a preallocated static cache
    stacked in one tensor (``kvs``, ``[layers, 2, batch, heads, 32, head_dim]``, written in place at each forward's
    positions): the turn's rows laid out as a sequence of their own, replayed on the cache holding the prompt, are
    exact, as where only the turn was captured. The tensor's shape is the same beside both starts, as a video's is;
    unlike a video, each forward writes it."""
    torch.manual_seed(0)
    model = _StackedModel()
    _watch_experts(model)
    kvs = torch.zeros(2, 2, 1, 4, 32, 8)
    prompt, turn = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    later = torch.arange(5, 9)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(prompt, position_ids=torch.arange(5)[None], kvs=kvs)
            after_prompt = kvs.clone()
            model(turn, position_ids=later, kvs=kvs)
        want = {layer: rows[5:] for layer, rows in _joined(rec).items()}
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)[5:]])
        _perturb(model)
        kvs.copy_(after_prompt)
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(turn, position_ids=later, kvs=kvs), model)
        assert got is not None, "the turn after the prompt's stacked static cache refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


def _rank0(batch: int) -> torch.Tensor:
    """The rows of the first 4 positions of each of ``batch`` sequences of 12, laid out batch-major (as the routers
    of :class:`_SequenceFirst` see them)."""
    return (torch.arange(batch)[:, None] * 12 + torch.arange(4)).reshape(-1)


class _SequenceFirst(nn.Module):
    """A static-cache decoder's layers (test_gaps53's, no cache kept: a rotary table and a causal mask) behind a
    forward that takes its tokens sequence-first, as ``nn.Transformer`` does by default: ids ``[positions, batch]``
    and their ``position_ids`` of the same shape (every sequence at the same positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _static_model("tables", "position_ids")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.run(input_ids.t(), position_ids[:, 0])


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("batch", [1, 2])
def test_a_sequence_first_forward_of_another_ranks_slice_fed_its_positions_is_refused(batch: int) -> None:
    """A model that takes ``[positions, batch]`` ids (one sequence per sequence-parallel rank) and their
    ``position_ids``: the capture of the 12-token sequence records each row's place (0..11), and rank 0's rows fed
    rank 0's slice are exact. Fed rank 2's tokens at rank 2's positions (8..11) they must be refused, as they are for
    a ``[1, positions]`` forward; the rows with their token ids are. Read as a batch of one-token rows, fed no cache
    and no mask, each row's position is its place: their positions were not compared, and rank 0's rows were forced
    on rank 2's tokens."""
    model = _SequenceFirst()
    _watch_experts(model)
    seq = torch.randint(1, 128, (12, batch), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(12)[:, None].expand(12, batch)
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(seq, position_ids=pos)
        want, captured = _joined(rec), session.routes()
        assert sorted(cast(torch.Tensor, captured._seq_pos).tolist()) == sorted(pos.reshape(-1).tolist()), "places"
        routes = captured.with_token_ids(None)
        _perturb(model)
        with torch.no_grad():
            own = _outcome(model, session, routes[_rank0(batch)], lambda: model(seq[:4], position_ids=pos[:4]), model)
            by_ids = _outcome(
                model, session, captured[_rank0(batch)], lambda: model(seq[8:], position_ids=pos[8:]), model
            )
            other = _outcome(model, session, routes[_rank0(batch)], lambda: model(seq[8:], position_ids=pos[8:]), model)
        assert own is not None, "rank 0's own slice refused though exact"
        for layer, got in own.items():
            assert torch.equal(got, want[layer][_rank0(batch)]), layer
        assert by_ids is None, "rows with their ids forced on other tokens"
        assert other is None, "rank 0's rows forced on rank 2's tokens"
    finally:
        session.detach()
