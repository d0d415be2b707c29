"""Adversarial review of round 45's changes: the places of forwards given a 4-d attention mask, the token order told
from the changed token's own row with sequence 0's padding left out, and blocks opened inside a compiled function.
Each case is forced exactly, refused clearly, or (strict xfail) a silence left to fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr
from tests.test_feeds import _SequenceFirst


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fill", [-1e9, -1e4], ids=["-1e9", "-1e4"])
def test_an_additive_4d_mask_of_a_finite_fill_gives_the_places_its_2d_mask_gives(fill: float) -> None:
    """A left-padded batch replayed with the 4-d additive mask of its 2-d mask, filled with -1e9 or -10000 (as much
    model code makes it) rather than the dtype's lowest: those keys get no weight, so the forward is the capture's.
    Once refused: such a fill was read as attending its key, the padded sequence's last token read at its slot's place
    (padding counted) where it was recorded after its real tokens alone."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("qwen3_moe")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    allowed = (torch.ones(5, 5, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :])[:, None]
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~allowed, fill)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = model(ids, attention_mask=mask).logits
        routes = session.routes()
        with session.replay(routes), session.capture(), torch.no_grad():
            got = model(ids, attention_mask=additive).logits
        assert session.routes().equal(routes)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1, 2:], want[1, 2:], atol=1e-5)
        # (a place read from the 4-d mask is still checked: the padded sequence's tokens one place later are refused)
        shifted = torch.zeros(2, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), fill)
        with pytest.raises(mr.TokenMismatchError, match="other places in their sequences"):
            with session.replay(routes), torch.no_grad():
                model(ids, attention_mask=shifted)


@pytest.mark.reliability("silent replays")
def test_an_additive_mask_value_between_attended_and_masked_leaves_the_place_unknown() -> None:
    """A value that neither attends its key (0, a small bias) nor leaves it out (-10000 and below) tells no place."""
    from moe_replay._feeds import places_fed

    ids = torch.zeros(1, 3, dtype=torch.long)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    for fill, known in ((float("-inf"), True), (-1e9, True), (-1e4, True), (-50.0, False)):
        mask = torch.zeros(1, 1, 3, 3).masked_fill(~causal, fill)
        got = places_fed((ids,), {"attention_mask": mask}, ids.shape)
        assert got is not None
        # (the queries whose row holds such a value: not known)
        unknown = [not known and bool((mask[0, 0, i] == fill).any()) for i in range(3)]
        assert got.tolist() == [[-1 if u else i for i, u in enumerate(unknown)]], fill
        assert known or -1 in got.tolist()[0]


class _MixedSequenceFirst(_SequenceFirst):
    """Sequence-first routers after attention both ways among each sequence's real tokens (weighted by position);
    padding holds nothing."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        m = torch.ones(input_ids.shape) if attention_mask is None else attention_mask.to(x.dtype)
        x = x * m[..., None]
        mean = x.sum(1, keepdim=True) / m.sum(1, keepdim=True)[..., None]
        weight = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None] / x.shape[1]
        x = ((x + 3 * weight * mean) * m[..., None]).transpose(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(0, 1))


@pytest.mark.reliability("silent replays")
def test_a_sequence_first_model_whose_own_row_lies_in_sequence_0s_padding_read_batch_major_is_told() -> None:
    """Once silent: sequence 0 right-padded (3 tokens of 8, batch 2), the changed token's own row in a sequence-first
    model is row 4, among sequence 0's padding rows read batch-major; left out as padding, another row of its sequence
    (row 2) passed for its own, the order was told batch-major and every row recorded for another token. The own row
    of either order is never left out now."""
    model = _MixedSequenceFirst().eval()
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    lengths = [3, 8]
    mask = mr.BatchLayout.padded(lengths).attention_mask()
    with mr.attach(model) as session:
        parts = []
        for row, n in zip(ids, lengths, strict=True):
            with session.capture(), torch.no_grad():
                model(row[None, :n])
            parts.append(session.routes())
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        native = session.routes()
        want = torch.where(mask.bool(), ids, -1).t().reshape(-1)  # (each row's own token, as the routers see them)
        assert native.token_ids is not None and torch.equal(native.token_ids, want)
        with pytest.raises(mr.TokenMismatchError, match="sequence-first"):
            with session.replay(mr.pad_routes(parts)), torch.no_grad():
                model(ids, attention_mask=mask)


class _Repad(_SequenceFirst):
    """Batch-major routers that see each sequence's right padding moved to its front, after attention both ways
    (padding attending back to the tokens, weighted by position)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        m = torch.ones(input_ids.shape) if attention_mask is None else attention_mask.to(x.dtype)
        mean = (x * m[..., None]).sum(1, keepdim=True) / m.sum(1, keepdim=True)[..., None]
        weight = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None] / x.shape[1]
        x = x + 3 * weight * mean
        order = torch.argsort(m, dim=1, stable=True)  # (padding first, the tokens after it in their order)
        x = x.gather(1, order[..., None].expand_as(x))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.gather(1, torch.argsort(order, dim=1)[..., None].expand_as(x)))


@pytest.mark.reliability("silent replays")
def test_a_layer_that_moves_right_padding_before_the_tokens_is_not_read_batch_major() -> None:
    """Once silent: a layer that moves sequence 0's right padding before its tokens put the changed token's own row
    among the rows left out as its padding, and the order was read batch-major: rows recorded for other tokens. Where
    the row that changed most is one left out as padding, one run more changes sequence 0's last padding token, whose
    own row must change most in the order told: here it does not, and the order is told reordered. Each row knows the
    token its router saw, or none; a replay of routes laid out batch-major is refused."""
    model = _Repad().eval()
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = mr.BatchLayout.padded([3, 8]).attention_mask()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        routes = session.routes()
        seen = torch.where(mask.bool(), ids, -1).gather(1, torch.argsort(mask, dim=1, stable=True)).reshape(-1)
        assert routes.token_ids is None or torch.equal(routes.token_ids, seen)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(mr.pad_routes([routes[:3], routes[8:]])), torch.no_grad():
                model(ids, attention_mask=mask)


class _PaddingLooksBack(_SequenceFirst):
    """Routers that see a batch batch-major or sequence-first, whose padding rows hold a multiple of the mean of the
    tokens before them (a right-padded completion's padding attends back), with or without the pad token's own
    embedding."""

    def __init__(self, sequence_first: bool, pad_embedded: bool) -> None:
        super().__init__()
        self.sequence_first, self.pad_embedded = sequence_first, pad_embedded

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        keep = (torch.ones(input_ids.shape) if attention_mask is None else attention_mask.float())[..., None]
        before = (h * keep).cumsum(1) / keep.cumsum(1).clamp(min=1)
        h = (h if self.pad_embedded else h * keep) + 4 * before * (1 - keep)
        h = h.transpose(0, 1) if self.sequence_first else h
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.transpose(0, 1) if self.sequence_first else h)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("sequence_first", [False, True], ids=["batch-major", "sequence-first"])
@pytest.mark.parametrize("pad_embedded", [False, True], ids=["padding-zeroed", "padding-embedded"])
@pytest.mark.parametrize("shape", [(2, 8, 3), (3, 6, 3), (2, 6, 5)], ids=str)
def test_the_order_of_a_batch_whose_first_sequence_is_right_padded_is_told_whatever_its_padding_sees(
    sequence_first: bool, pad_embedded: bool, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequence 0 right-padded (``n`` tokens of ``positions``), its padding attending back to its last token: the
    order is told as the routers see the tokens (each row knows its own token), also where the changed token's own row
    in one order lies among sequence 0's padding rows in the other (batch 2, 3 tokens of 8: row 4)."""
    from moe_replay import _feeds

    told: list[str | None] = []
    tell = _feeds.token_order

    def counted(*args: Any, **kwargs: Any) -> str | None:
        told.append(tell(*args, **kwargs))
        return told[-1]

    monkeypatch.setattr(_feeds, "token_order", counted)
    batch, positions, n = shape
    ids = torch.randint(3, 128, (batch, positions), generator=torch.Generator().manual_seed(0))
    mask = mr.BatchLayout.padded([n] + [positions] * (batch - 1)).attention_mask()
    ids = torch.where(mask.bool(), ids, 0)
    model = _PaddingLooksBack(sequence_first, pad_embedded).eval()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        routes = session.routes()
    seen = torch.where(mask.bool(), ids, -1)
    seen = (seen.t() if sequence_first else seen).reshape(-1)
    assert routes.token_ids is not None and torch.equal(routes.token_ids, seen)
    assert told == [_feeds.SEQUENCE_FIRST if sequence_first else _feeds.BATCH_MAJOR]  # (told, not read unchecked)


@pytest.mark.reliability("bad inputs")
def test_a_block_opened_inside_a_fullgraph_compile_names_what_to_do() -> None:
    """torch.compile(fullgraph=True) allows no graph break, and a block runs eagerly at one: the error says to open the
    block outside the compiled function, and the same step compiled with graph breaks is forced."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with torch.no_grad():
            model(x)
        with session.capture(), torch.no_grad():
            want = model(x).logits
        routes = session.routes()

        def step(x: torch.Tensor) -> Any:
            with session.replay(routes), torch.no_grad():
                return model(x).logits

        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"open the block outside the compiled function"):
            torch.compile(step, fullgraph=True, backend="eager")(x)
        torch._dynamo.reset()
        with session.capture():
            got = torch.compile(step, backend="eager")(x)
        assert session.routes().equal(routes) and torch.allclose(got, want, atol=1e-5)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["DynamicCache", "StaticCache"])
def test_a_decode_step_given_another_sequences_cache_is_refused(kind: str) -> None:
    """Prompts A and B each prefilled into a cache of its own, then one decode step each: replayed with the two
    caches swapped, each step's token sees the other prompt. Once silent: refused now by the forward whose cache
    each step went on from (its lineage)."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("qwen3_moe")
    name = tiny_hf.cache_kwarg(model)
    a, b = (torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    step = torch.tensor([[7]])

    def made() -> Any:
        if kind == "DynamicCache":
            return tiny_hf.transformers.DynamicCache(config=model.config)
        return tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=16)

    def loop(swapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = made(), made()
        model(a, use_cache=True, **{name: first})
        model(b, use_cache=True, **{name: second})
        if swapped:
            first, second = second, first
        return (
            model(step, use_cache=True, **{name: first}).logits,
            model(step, use_cache=True, **{name: second}).logits,
        )

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = loop(False)
        routes = session.routes()
        with session.capture(), torch.no_grad():
            got = loop(True)
        assert not torch.allclose(got[0], want[0])  # (the premise: the step sees another prompt)
        with pytest.raises(mr.TokenMismatchError, match="went on from the cache of the forward"):
            with session.replay(routes), torch.no_grad():
                loop(True)
        with session.replay(routes), torch.no_grad():  # (the loop as captured: forced, not refused)
            same = loop(False)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(same, want, strict=True))


@pytest.mark.reliability("silent replays")
def test_a_whole_training_step_compiled_by_inductor_with_its_blocks_inside_forces_and_records_the_routes() -> None:
    """The whole training step compiled by inductor (on the host), a replay and a capture block opened inside it and a
    non-reentrant checkpoint in the model: each call forces its own routes (the capture inside records exactly them),
    with the loss and gradients of the model whose top-k is replaced by those experts by hand."""
    from tests.test_review45 import (
        _assert_same_grads,
        _captured,
        _force,
        _forced_copy,
        _grads,
        _ids,
        _Model,
        _step_routers,
    )

    torch._dynamo.reset()
    ids = _ids(6)
    model = _Model("non_reentrant")
    session = mr.attach(model)
    first = _captured(model, ids, session)
    _step_routers(model, seed=5)
    second = _captured(model, ids, session)
    assert not second.equal(first)
    model.loss(ids).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(ids: torch.Tensor, routes: mr.Routes) -> torch.Tensor:
        optimizer.zero_grad()
        with session.replay(routes), session.capture():
            loss = model.loss(ids)
        loss.backward()
        optimizer.step()
        return loss.detach()

    compiled = torch.compile(step, backend="inductor")
    for routes in (first, second, first):
        loss = compiled(ids, routes)
        assert session.routes().equal(routes)
        ref = _forced_copy(model, ckpt="non_reentrant")
        _force(ref, routes.indices)
        ref_loss = ref.loss(ids)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach())
        _assert_same_grads(_grads(model), _grads(ref))
    session.detach()
