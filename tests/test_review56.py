"""Round 56's review of the static-cache evidence (a floating tensor the model keeps, holding something before a
forward's positions and written at them alone, lets positions after it through), positions read under other names
and from ``**kwargs``: buffers that are no KV cache (a running statistic per position, a rotary table rewritten in
place, a statistic moved everywhere), a refusal that comes after the forward wrote its cache, names of the positions'
form that hold something else, and the decode loops of gpt-fast's and torchtune's forms these rules must not refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_gaps53 import _MAX, _caches, _put_back, _static_model, _StaticModel
from .test_review51 import _outcome
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

Oracle = dict[str, torch.Tensor]


class _Kept(nn.Module):
    """A model of test_gaps53's form (``style``: "tables" keeps no KV cache, a rotary table and a causal mask only)
    beside a floating buffer ``[_MAX, hidden]`` of its own that is no cache, of ``kind``:

    - "ema": a running statistic per position (ones at first), moved at the positions each forward is fed;
    - "rotary": a rotary table rewritten whole in place at each forward (the very values it holds);
    - "everywhere": a running statistic moved at every index at each forward.
    """

    def __init__(self, kind: str, style: str = "tables") -> None:
        super().__init__()
        self.kind = kind
        self.inner = _static_model(style, "position_ids")
        hidden = self.inner.embed.embedding_dim
        self.register_buffer("stat", self._table(hidden) if kind == "rotary" else torch.ones(_MAX, hidden))

    @staticmethod
    def _table(hidden: int) -> torch.Tensor:
        angles = torch.arange(_MAX, dtype=torch.float)[:, None] * 0.1 ** torch.arange(hidden // 2, dtype=torch.float)
        return torch.cat([angles.cos(), angles.sin()], -1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        flat = position_ids.reshape(-1)
        with torch.no_grad():
            if self.kind == "ema":
                seen = self.inner.embed(input_ids)[0]
                self.stat[flat] = 0.9 * self.stat[flat] + 0.1 * seen
            elif self.kind == "rotary":
                self.stat.copy_(self._table(self.stat.shape[1]))
            else:
                self.stat.mul_(0.9).add_(0.2)
        return self.inner(input_ids, position_ids=position_ids)


def _try(model: nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any]) -> Oracle | None:
    """The rows dispatched replaying ``routes`` through ``forward``, or None where refused (a forward refused as its
    block ends has run: the buffers it wrote are not compared)."""
    try:
        with _dispatched(model) as rec, session.replay(routes):
            forward()
    except mr.MoEReplayError:
        assert session.state == "idle"
        return None
    return _joined(rec)


def _slices(model: _Kept) -> tuple[Oracle | None, Oracle | None, Oracle]:
    """A 12-token sequence captured (its rows laid out without ids); rank 0's rows replayed on rank 0's slice and on
    rank 2's slice fed its own positions: (rank 0's outcome, rank 2's outcome, the rows the capture dispatched)."""
    _watch_experts(model)
    seq, pos = torch.randint(1, 128, (1, 12)), torch.arange(12)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(seq, position_ids=pos)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([12]).routes([session.routes().with_token_ids(None)])
        _perturb(model)
        with torch.no_grad():
            own = _outcome(model, session, routes[:4], lambda: model(seq[:, :4], position_ids=pos[:, :4]), model)
            other = _try(model, session, routes[:4], lambda: model(seq[:, 8:], position_ids=pos[:, 8:]))
        return own, other, want
    finally:
        session.detach()


def _assert_slices_kept_apart(model: _Kept) -> None:
    own, other, want = _slices(model)
    assert own is not None, "rank 0's own slice refused though exact"
    for layer, rows in own.items():
        assert torch.equal(rows, want[layer][:4]), layer
    assert other is None, "rank 0's rows forced on rank 2's tokens"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["rotary", "everywhere"])
def test_a_slice_fed_another_ranks_positions_beside_a_buffer_that_is_no_cache_is_refused(kind: str) -> None:
    """A model with no KV cache keeping a floating buffer that holds something at every place before a slice's
    positions, a rotary table rewritten whole in place at each forward (its values never move) or a statistic moved
    at every index: rank 0's rows of a 12-token sequence (no ids) fed rank 2's tokens and positions are refused; rank
    0's own slice is exact. A write that moves no value tells nothing of where it was made: the table was read as a
    cache written at the slice's positions, and rank 0's rows were forced on rank 2's tokens."""
    _assert_slices_kept_apart(_Kept(kind))


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_ranks_positions_beside_a_running_statistic_per_position_is_refused() -> None:
    """A model with no KV cache keeping a statistic per position (ones at first, moved at the positions each forward
    is fed, as a cache is written): rank 0's rows (no ids) fed rank 2's tokens and positions must be refused. Its
    writes have the very form of a static cache's, but the capture recorded the rows at places 0..3: rows recorded at
    other places than the positions they are fed are never a turn laid out alone after a cache (rows no capture
    recorded: test_review57)."""
    _assert_slices_kept_apart(_Kept("ema"))


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("beside", ["alone", "a rotary table rewritten in place"])
def test_a_static_cache_continuation_refused_as_its_block_ends_says_it_ran_and_what_it_wrote(beside: str) -> None:
    """torchtune's cache writes at its own ``cache_pos``, moved on past the turn by the capture: a replay of the turn
    (rows laid out alone, no ids) fed its positions writes the cache after them and is refused only as the block
    ends, after it ran. The error says so and names the tensors it left written (each did change), so the user knows
    to reset them. A rotary table rewritten in place beside the cache (no value moves) must not let it through."""
    model: nn.Module = _static_model("torchtune", "position_ids") if beside == "alone" else _Kept("rotary", "torchtune")
    prefix = "" if beside == "alone" else "inner."
    _watch_experts(model)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    with torch.no_grad():
        model(first, position_ids=torch.arange(5)[None])
    session = mr.attach(model)
    try:
        later = torch.arange(5, 9)[None]
        with torch.no_grad(), session.capture():
            model(second, position_ids=later)
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
        before = _caches(model)
        with pytest.raises(mr.TokenMismatchError) as err, torch.no_grad(), session.replay(routes):
            model(second, position_ids=later)
        assert session.state == "idle"
        text = str(err.value)
        assert "ran before it was refused" in text
        after = _caches(model)
        for i in range(2):
            for kind in ("k_cache", "v_cache"):
                name = f"{prefix}layers.{i}.attn.kv_cache.{kind}"
                assert name in text, f"{name} not named"
                assert not torch.equal(after[name], before[name]), f"{name} named as written, but unchanged"
    finally:
        session.detach()


# ------------------------------------------------------------------------------------ decode loops these must let run
class _GptFast(_StaticModel):
    """gpt-fast's ``Transformer.forward(idx, input_pos)``: positions ``[seq]``, caches written at them."""

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.run(idx, input_pos)


class _Torchtune(_StaticModel):
    """torchtune's ``TransformerDecoder.forward(tokens, *, mask, encoder_input, encoder_mask, input_pos)``: positions
    ``[batch, seq]`` and a boolean mask ``[batch, seq, max_seq_len]`` of the keys each token sees."""

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.run(tokens, input_pos if input_pos is not None else torch.arange(tokens.shape[1]))


def _given(form: str, pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keywords a generation loop of ``form`` feeds its model for positions ``pos`` (``[seq]``)."""
    if form == "gpt-fast":
        return {"input_pos": pos}
    causal = torch.ones(_MAX, _MAX, dtype=torch.bool).tril()
    return {"input_pos": pos[None], "mask": causal[pos][None]}


def _generate(model: nn.Module, form: str, prompt: torch.Tensor, new: int, fed: torch.Tensor | None = None) -> Any:
    """gpt-fast's and torchtune's ``generate``: a prefill at ``0..T-1``, then one token per step at the next place,
    greedy (or the tokens ``fed`` holds after the prompt); the sequence of tokens fed."""
    t = prompt.shape[1]
    logits = model(prompt, **_given(form, torch.arange(t)))
    out = [prompt]
    for i in range(new):
        nxt = logits[:, -1:].argmax(-1) if fed is None else fed[:, t + i : t + i + 1]
        out.append(nxt)
        logits = model(nxt, **_given(form, torch.tensor([t + i])))
    return torch.cat(out, 1)


_REPLAYED = ["teacher-forced", "teacher-forced, no ids", "laid out", "the loop", "loop, laid out"]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("form", ["gpt-fast", "torchtune"])
@pytest.mark.parametrize("replayed", _REPLAYED)
def test_a_generation_loop_of_a_model_keeping_a_static_cache_replays_exactly(form: str, replayed: str) -> None:
    """gpt-fast's and torchtune's generation (prefill, then a decode step per token, positions under ``input_pos``,
    torchtune's boolean mask beside them) captured; the routers moved; replayed on the caches emptied again, as one
    teacher-forced forward over the whole sequence (with its ids, without, laid out by a BatchLayout) or as the same
    loop fed the same tokens (with ids, laid out): every one exact, none refused."""
    torch.manual_seed(3)
    model = (_GptFast if form == "gpt-fast" else _Torchtune)("gpt-fast")
    _watch_experts(model)
    fresh = _caches(model)
    session = mr.attach(model)
    try:
        prompt = torch.randint(1, 128, (1, 5))
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            seq = _generate(model, form, prompt, 4)
        want, captured = _joined(rec), session.routes()
        routes = {
            "teacher-forced": captured,
            "teacher-forced, no ids": captured.with_token_ids(None),
            "the loop": captured,
        }.get(replayed) or mr.BatchLayout.packed([captured.num_tokens]).routes([captured.with_token_ids(None)])
        _perturb(model)
        _put_back(model, fresh)
        if replayed.startswith("teacher"):
            run = lambda: model(seq, **_given(form, torch.arange(seq.shape[1])))  # noqa: E731
        else:
            run = lambda: _generate(model, form, prompt, 4, fed=seq)  # noqa: E731
        with torch.no_grad():
            got = _try(model, session, routes, run)
        assert got is not None, "refused though exact"
        assert got.keys() == want.keys()
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


# --------------------------------------------------------------------------------- positions under names of their own
class _Pooled(nn.Module):
    """A wrapper taking any keyword beside the tokens and its mask (a reward or tagging head's inputs), passing the
    tokens alone to a reference MoE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = mr.models.build("softmax_topk", num_layers=2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.inner(input_ids, attention_mask=attention_mask).logits


_WORDS = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 3, 3]])  # (each token's word: sub-words of one word share it)


def _laid_out_word_replay() -> tuple[_Pooled, mr.Session, mr.Routes, torch.Tensor]:
    model = _Pooled()
    ids = torch.randint(1, 128, (2, 6))
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(ids, word_positions=_WORDS)
    r = session.routes().with_token_ids(None)
    return model, session, mr.BatchLayout.padded([6, 6]).routes([r[:6], r[6:]]), ids


@pytest.mark.reliability("bad inputs")
def test_positions_read_under_a_name_of_their_own_are_named_where_they_are_refused() -> None:
    """A forward taking ``**kwargs`` fed ``token_positions=`` (positions 3..8, read as its tokens' positions by the
    name's form) with rows laid out without ids at places 0..5: refused, and the error names the keyword they were read
    from and what to do where it holds something else, not only ``position_ids``, which the forward was never fed."""
    model, session, routes, ids = _laid_out_word_replay()
    try:
        later = torch.arange(3, 9)[None].expand(2, 6)
        with pytest.raises(mr.TokenMismatchError, match=r"token_positions=.*with_token_ids"), torch.no_grad():
            with session.replay(routes):
                model(ids, token_positions=later)
        assert session.state == "idle"
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
def test_a_word_index_under_a_positions_like_name_does_not_refuse_an_exact_replay() -> None:
    """The capture's own batch, fed the same ``word_positions=`` (a word index, not the tokens' places), replaying
    its rows laid out without ids: exact, so not refused. Neither the capture nor the replay reads them as places: two
    tokens side by side share a word, never a place."""
    model, session, routes, ids = _laid_out_word_replay()
    try:
        with torch.no_grad(), session.replay(routes):
            model(ids, word_positions=_WORDS)
    finally:
        session.detach()


# ------------------------------------------------------------------------- numpy arrays a router moves in place
_STEP = np.zeros(1)
_STATS = {"n": np.zeros(1)}


class _Counter:
    """An iterator of the user's class counting its items in a numpy array it moves in place."""

    def __init__(self) -> None:
        self.count = np.zeros(1)

    def __iter__(self) -> _Counter:
        return self

    def __next__(self) -> float:
        self.count += 1
        return float(self.count[0]) * 1e-6

    def rewind(self) -> None:
        """Start again."""
        self.count = np.zeros(1)


class _NumpyStep(nn.Module):
    """A top-2 router over 8 experts whose scores move a little with a step count kept in a numpy array moved in
    place at each forward, ``where``: its own attribute, an iterator of the user's class it draws from, a global's
    item, a global rebound in place (``_STEP += 1``) or an array a global dict holds."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.top_k, self.where = 2, where
        self.step = np.zeros(1)
        self.noise = _Counter()

    def _moved(self) -> float:
        global _STEP
        if self.where == "attribute":
            self.step += 1
            return float(self.step[0]) * 1e-6
        if self.where == "iterator":
            return next(self.noise)
        if self.where == "global item":
            _STEP[0] += 1
        elif self.where == "global rebound":
            _STEP += 1
        else:
            _STATS["n"] += 1
            return float(_STATS["n"][0]) * 1e-6
        return float(_STEP[0]) * 1e-6

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and experts of each token."""
        logits = F.linear(x, self.weight) + self._moved() * torch.arange(8.0)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


def _numpy_state(model: nn.Module) -> list[float]:
    return [float(b.router.step[0]) for b in model] + [float(b.router.noise.count[0]) for b in model]


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("where", ["attribute", "iterator", "global item", "global rebound", "global dict"])
def test_a_router_moving_a_numpy_array_in_place_is_in_step_and_left_as_the_plain_model(where: str) -> None:
    """Routers whose scores move with a count kept in a numpy array changed in place (their own attribute, an
    iterator's, a global's): the captured forwards see the plain model's values and every count ends where the plain
    model's does. The runs that establish the decision put back lists, dicts and tensors but not numpy arrays: each
    run moved the count on, the forwards saw other scores with nothing said (too small a change to refuse), and the
    counts were left 44 steps on after two forwards."""
    from .test_review51 import _RouterBlock

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(_RouterBlock(_NumpyStep(where)), _RouterBlock(_NumpyStep(where)))

    def reset() -> None:
        _STEP[:] = 0
        _STATS["n"][:] = 0

    model, plain = build(), build()
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    reset()
    with torch.no_grad():
        want = [plain(x) for x in xs]
    plain_after = (_numpy_state(plain), float(_STEP[0]), float(_STATS["n"][0]))
    reset()
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        got = [model(x) for x in xs]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other values"
    assert (_numpy_state(model), float(_STEP[0]), float(_STATS["n"][0])) == plain_after, "left moved on"


# ---------------------------------------------------------------------- a batch row whose static cache holds nothing
@pytest.mark.reliability("silent replays")
def test_a_continuation_whose_batch_row_has_an_empty_static_cache_slot_is_refused() -> None:
    """gpt-fast's cache for a batch of two, both rows' prompts written, a continuation of both captured (rows laid
    out without ids); row 1's slot emptied (a new sequence put in it without its prefix), row 0's kept: the replay of
    the continuation at the same positions must be refused, as it is where both slots are empty. Row 1's tokens are
    fed without the tokens before them, and their rows were recorded with them."""

    class _Cache2(nn.Module):
        def __init__(self, heads: int, head_dim: int) -> None:
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(2, heads, _MAX, head_dim))
            self.register_buffer("v_cache", torch.zeros(2, heads, _MAX, head_dim))

        def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, Any]:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
            return self.k_cache, self.v_cache

    model = _static_model("gpt-fast", "position_ids")
    for layer in model.layers:
        layer.attn.kv_cache = _Cache2(4, 8)
    first, second = torch.randint(1, 128, (2, 5)), torch.randint(1, 128, (2, 4))
    with torch.no_grad():
        model(first, position_ids=torch.arange(5)[None])
    session = mr.attach(model)
    try:
        later = torch.arange(5, 9)[None]
        with torch.no_grad(), session.capture():
            model(second, position_ids=later)
        turn = session.routes().with_token_ids(None)
        routes = mr.BatchLayout.padded([4, 4]).routes([turn[:4], turn[4:]])
        with torch.no_grad():
            for layer in model.layers:
                layer.attn.kv_cache.k_cache[1].zero_()
                layer.attn.kv_cache.v_cache[1].zero_()
        with pytest.raises(mr.TokenMismatchError), torch.no_grad(), session.replay(routes):
            model(second, position_ids=later)
    finally:
        session.detach()
