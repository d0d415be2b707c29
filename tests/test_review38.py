"""Adversarial review, round 38: misuse and router code from outside the suite.

Each case must be exact (the recorded experts forced on the tokens they were recorded for) or refused with a
``MoEReplayError``: never silent, and never a refusal of an exact replay.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot

D, E, K, V = 16, 8, 2, 50


# ------------------------------------------------------------------- token ids given by the name of the first parameter
class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = K

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return vals / vals.sum(-1, keepdim=True), idx


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()
        self.w = nn.Parameter(torch.randn(E, D, D) / 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        w, idx = self.gate(x)
        out = torch.einsum("tkd,tkdf->tf", x[:, None] * w[..., None], self.w[idx])
        return (x + out).reshape(h.shape)


class _NamedIds(nn.Module):
    """A language model without an ``nn.Embedding`` (a table indexed by the ids), whose forward takes its ids as
    ``tokens`` (torchtitan's name; nanoGPT's is ``idx``); ``first``: its layers run ``[positions, batch, hidden]``."""

    def __init__(self, first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(V, D))
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.first = first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb[tokens]
        h = h.transpose(0, 1) if self.first else h
        for layer in self.layers:
            h = layer(h)
        h = h.transpose(0, 1) if self.first else h
        return h @ self.emb.T


class _KeywordOnlyIds(_NamedIds):
    def forward(self, *, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first", [False, True], ids=["batch_major", "sequence_first"])
@pytest.mark.parametrize("make", [_NamedIds, _KeywordOnlyIds], ids=["named", "keyword_only"])
def test_routes_of_a_model_fed_its_ids_by_the_name_of_its_first_parameter_are_checked(make: Any, first: bool) -> None:
    """Once silent: the ids were read only as ``input_ids=`` or the first positional argument, so a model called
    ``model(tokens=ids)`` recorded routes without token ids, and routes of another batch (the sequences swapped) were
    forced with no ``TokenMismatchError``. Given by the name of the forward's first parameter, they are read as given
    by position: the routes know their ids (in the order of their tokens where the layers see them sequence-first),
    the swapped batch is refused, and the batch they were recorded for replays its experts."""
    torch.manual_seed(0)
    model = make(first)
    a = torch.randint(0, V, (2, 8))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad(), session.capture():
        model(tokens=a)
    routes = session.routes()
    assert routes.token_ids is not None
    assert torch.equal(routes.in_token_order().token_ids, a.flatten())
    with pytest.raises(mr.TokenMismatchError), torch.no_grad(), session.replay(routes):
        model(tokens=a.flip(0))
    with torch.no_grad():  # (other router weights: a replay that forced nothing would choose other experts)
        for layer in model.layers:
            layer.gate.weight.add_(torch.randn(E, D) * 3)
        model(tokens=a)
    state = snapshot(model)
    with session.capture():
        with session.replay(routes):
            model(tokens=a).square().sum().backward()
        assert session.routes().equal(routes)
    session.detach()
    assert_untouched(model, state)


# ------------------------------------------------------------------- sequences sorted before the routers
class _SortsByLength(nn.Module):
    """Runs its layers on the sequences sorted longest first (as code written for packed sequences does), then puts
    them back: the routers see sequence 1's tokens first where sequence 0 is the shorter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        order = attention_mask.sum(-1).argsort(descending=True, stable=True)
        h = self.emb(input_ids)[order]
        for layer in self.layers:
            h = layer(h)
        return h[order.argsort()]


class _BatchStatistic(nn.Module):
    """Adds the mean of every token's embedding (a statistic over the batch) before its layers: a changed token moves
    every row, its own most."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = h + 3 * h.mean(dim=(0, 1), keepdim=True)
        for layer in self.layers:
            h = layer(h)
        return h


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0  # (sequence 0 the shorter)
    return ids, mask


@pytest.mark.reliability("silent replays")
def test_rows_of_sequences_sorted_before_the_routers_are_not_labelled_with_the_ids_as_fed() -> None:
    """Once silent: a model that sorts its sequences by length before its layers shows the routers sequence 1's
    tokens first. The runs that tell the order found the changed token's row in neither of its two places and read the
    rows batch-major anyway, so the capture labelled sequence 1's rows with sequence 0's ids, and those rows cut for
    sequence 0 (``routes[:8]``) were forced on it alone with no ``TokenMismatchError``. Rows that follow the ids in
    neither order keep no ids: cut or whole they are refused, and the capture's own forward replays by row order on
    purpose."""
    torch.manual_seed(0)
    model = _SortsByLength()
    ids, mask = _padded_batch()
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            out = model(ids, mask)
        routes = session.routes()
        n = ids.shape[1]
        for i in range(2):
            part = routes[i * n : (i + 1) * n]
            try:
                with session.capture():
                    with session.replay(part):
                        model(ids[i : i + 1], mask[i : i + 1])
                    got = session.routes()
            except mr.TokenMismatchError:
                continue
            with session.capture():
                model(ids[i : i + 1], mask[i : i + 1])
            own = session.routes()  # (what the sequence chooses alone: one sequence is never reordered)
            assert got.equal(part) and part.equal(own), f"sequence {i}'s rows are another sequence's"
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(ids, mask)
        with session.replay(routes.with_token_ids(None)):
            assert torch.equal(model(ids, mask), out)
    session.detach()


@pytest.mark.reliability("round trips")
def test_rows_of_a_model_with_a_statistic_over_the_batch_keep_their_ids_and_replay() -> None:
    """A changed token that moves every row (a mean over the batch added before the layers) moves its own row most:
    the rows are read batch-major as before, keep their ids, and replay; another batch is refused."""
    torch.manual_seed(0)
    model = _BatchStatistic()
    ids, mask = _padded_batch()
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(ids, mask)
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids.masked_fill(mask == 0, -1).flatten())  # (-1: padding)
        with session.capture():
            with session.replay(routes):
                model(ids, mask)
            assert session.routes().equal(routes)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(ids.flip(0), mask)
    session.detach()


@pytest.mark.reliability("silent replays")
def test_rows_of_a_later_forward_whose_sequences_sort_otherwise_are_not_labelled_with_the_ids_as_fed() -> None:
    """Once silent: the first forward of the block holds sequence 0 the longer (no reorder: batch-major was told and
    kept for the block), the second sequence 0 the shorter (sorted second), and its rows cut for sequence 0 were
    sequence 1's, forced on sequence 0 alone. The order is now kept only where the routers' rows follow the sequences
    when the batch is rolled one place: a model that sorts them by length gives the rolled batch the rows it gave the
    batch as fed, so its rows keep no ids and are refused."""
    torch.manual_seed(0)
    model = _SortsByLength()
    ids, second = _padded_batch()
    first = second.flip(0)
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(ids, first)
            model(ids, second)
        part = session.routes()[16:24]
        with session.capture():
            model(ids[:1], second[:1])
        own = session.routes()
        try:
            with session.capture():
                with session.replay(part):
                    model(ids[:1], second[:1])
                got = session.routes()
        except mr.TokenMismatchError:
            pass
        else:
            assert got.equal(own), "sequence 1's rows were forced on sequence 0"
    session.detach()


@pytest.mark.reliability("silent replays")
def test_rows_of_sequences_sorted_past_the_first_are_not_labelled_with_the_ids_as_fed() -> None:
    """Once silent: a sort that keeps sequence 0 in place and swaps others (lengths 8, 5, 7) left the changed token of
    sequence 0 in its row, the rows were read batch-major, and sequence 1's rows cut from the capture were sequence
    2's. The rolled batch sorts the same way: its rows do not follow the sequences, and they keep no ids."""
    torch.manual_seed(0)
    model = _SortsByLength()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 7:] = 0  # (lengths 8, 5, 7: the routers see sequences 0, 2, 1)
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(ids, mask)
        part = session.routes()[8:16]
        with session.capture():
            model(ids[1:2], mask[1:2])
        own = session.routes()
        try:
            with session.capture():
                with session.replay(part):
                    model(ids[1:2], mask[1:2])
                got = session.routes()
        except mr.TokenMismatchError:
            pass
        else:
            assert got.equal(own), "sequence 2's rows were forced on sequence 1"
    session.detach()


class _ReordersPastTheFirst(nn.Module):
    """Runs its layers on its sequences in a fixed order of its own that keeps sequence 0 first (0, 2, 1), whatever
    they hold, and puts them back after."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        order = torch.tensor([0, 2, 1])
        h = self.emb(input_ids)[order]
        for layer in self.layers:
            h = layer(h)
        return h[order.argsort()]


@pytest.mark.reliability("silent replays")
def test_rows_of_sequences_a_layer_reorders_past_the_first_in_a_fixed_order_keep_no_ids() -> None:
    """Once silent: a layer that swaps sequences 1 and 2 (in an order of its own, not by what they hold) left the
    changed token of sequence 0 in its row, and the rows were labelled batch-major: sequence 2's rows were labelled
    with sequence 1's ids. Rolled one place, the batch's rows do not follow the sequences: no ids, refused."""
    torch.manual_seed(0)
    model = _ReordersPastTheFirst()
    ids = torch.randint(1, V, (3, 8), generator=torch.Generator().manual_seed(5))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            out = model(ids)
        routes = session.routes()
        assert routes.token_ids is None or torch.equal(routes.token_ids, ids[[0, 2, 1]].flatten())
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(ids)
        with session.replay(routes.with_token_ids(None)):
            assert torch.equal(model(ids), out)
    session.detach()


_ON_A_GPU = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.xfail(
        strict=True,
        reason="a mask on a device is not read at a later forward of the block (no host sync): the order told at "
        "sequences of one length is not told again where the lengths differ",
    ),
]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_ON_A_GPU)])
def test_rows_of_a_forward_that_sorts_after_one_of_even_lengths_are_not_labelled_with_the_ids_as_fed(
    device: str,
) -> None:
    """Once silent: the block's first forward holds two sequences of 6 tokens each (padded: a sort by length leaves
    them in place, and so does the rolled batch), the second sequences of 6 and 8 (sorted: sequence 1 first), and the
    order told at the first was kept: the second's rows cut for sequence 0 were sequence 1's. An order told where the
    sequences held as many tokens is told again at a forward whose counts differ: refused (or exact)."""
    torch.manual_seed(0)
    model = _SortsByLength().to(device)
    ids, second = (t.to(device) for t in _padded_batch())
    first = torch.ones(2, 8, dtype=torch.long, device=device)
    first[:, 6:] = 0
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(ids, first)
            model(ids, second)
        part = session.routes()[16:24]
        with session.capture():
            model(ids[:1], second[:1])
        own = session.routes()
        try:
            with session.capture():
                with session.replay(part):
                    model(ids[:1], second[:1])
                got = session.routes()
        except mr.TokenMismatchError:
            pass
        else:
            assert got.equal(own), "sequence 1's rows were forced on sequence 0"
    session.detach()


class _SortsByContent(nn.Module):
    """Runs its layers on its sequences sorted by what they hold (the sum of their ids), then puts them back."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        order = input_ids.sum(-1).argsort(descending=True, stable=True)
        h = self.emb(input_ids)[order]
        for layer in self.layers:
            h = layer(h)
        return h[order.argsort()]


@pytest.mark.reliability("silent replays")
def test_rows_of_a_model_that_sorts_by_content_told_at_one_prompt_repeated_keep_no_ids() -> None:
    """Once silent: the block's first forward is one prompt repeated (rolled one place, the batch is the same batch,
    and its rows tell nothing), the second three other sequences, which the model sorts, and the order told at the
    first was kept: the second's rows were labelled with the ids as fed. The rolled run of a batch of one sequence
    repeated is that of the batch whose sequence 0 the runs changed: the sort moves it, and the rows keep no ids."""
    torch.manual_seed(0)
    model = _SortsByContent()
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, V, (1, 8), generator=g).expand(3, 8)
    ids = torch.randint(1, V, (3, 8), generator=g)
    ids = ids[ids.sum(-1).argsort()]  # (the least first: the model runs them in the other order)
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(prompt)
            model(ids)
        routes = session.routes()
        assert routes.token_ids is None or torch.equal(
            routes.token_ids[24:], ids[ids.sum(-1).argsort(descending=True, stable=True)].flatten()
        )
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(prompt)
                model(ids)
    session.detach()


class _DropsOut(nn.Module):
    """Embedding dropout before its layers (in training: each run draws its own mask by position)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.drop = nn.Dropout(0.3)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.emb(input_ids))
        for layer in self.layers:
            h = layer(h)
        return h


@pytest.mark.reliability("round trips")
def test_rows_of_a_model_with_dropout_before_its_routers_in_training_keep_their_ids() -> None:
    """The rolled batch's rows differ from the rows as fed by the dropout drawn at each place, not only by the rolled
    tokens: they follow the sequences (closer to their own tokens' rows than to those they took the place of), and
    the rows keep their ids."""
    torch.manual_seed(0)
    model = _DropsOut().train()
    ids = torch.randint(1, V, (4, 8), generator=torch.Generator().manual_seed(5))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad(), session.capture():
        model(ids)
    assert torch.equal(session.routes().token_ids, ids.flatten())
    session.detach()


# ------------------------------------------------------------------- padding taken out by the ids' value
class _UnpadsByPadId(nn.Module):
    """Takes the pad id 0 out before its layers by the ids' values (no attention mask: a varlen model fed padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids != 0
        h = self.emb(input_ids)[keep]
        for layer in self.layers:
            h = layer(h)
        return torch.zeros(*input_ids.shape, D).masked_scatter(keep[..., None], h)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_capture_of_a_model_that_unpads_by_the_pad_id_replays_its_own_batch(side: str) -> None:
    """Once a false refusal: a model given no mask that takes its padding out by the ids' value showed its routers
    fewer rows than its tokens, no input marked which, and the capture kept no ids. The ids themselves are read as the
    mask where one value alone (the pad id) is taken out: the rows keep their ids, the batch replays, and the batch
    with its sequences swapped is refused."""
    torch.manual_seed(0)
    model = _UnpadsByPadId()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (2, 8), generator=g)
    if side == "left":
        ids[0, :3] = 0
    else:
        ids[0, 5:] = 0
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids[ids != 0])
        with session.capture():
            with session.replay(routes):
                model(ids)
            assert session.routes().equal(routes)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(ids.flip(0))
    session.detach()


# ------------------------------------------------------------------- left padding moved to the right inside the model
class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, -1)
        see = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        see = see | ~see.any(-1, keepdim=True)  # (rows of padding attend anywhere)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=see)


class _LeftToRightPadding(nn.Module):
    """Fed left padding, moves each sequence's tokens to its start (right padding) before its layers, as code written
    for right padding does, and back after: the routers see sequence 0's tokens at other positions than fed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.attn = _Attention()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        order = (1 - attention_mask).argsort(dim=-1, stable=True)  # (the kept tokens first)
        mask = attention_mask.gather(1, order)
        h = self.emb(input_ids.gather(1, order))
        h = h + self.attn(h, mask)
        for layer in self.layers:
            h = layer(h)
        return h.scatter(1, order[..., None].expand_as(h), h)


@pytest.mark.reliability("silent replays")
def test_rows_of_a_sequence_whose_tokens_move_before_the_routers_are_not_labelled_with_the_ids_as_fed() -> None:
    """Once silent: a model that moves left padding to the right before its layers shows the routers sequence 0's
    tokens from its row 0 on. The changed token's row moved with the rows of padding after it, all within sequence 0,
    and the rows were read batch-major: the capture labelled the rows of its first tokens as padding and the rows of
    its last tokens and padding with its tokens' ids, and those rows, laid out for sequence 0 unpadded, were forced on
    it with no ``TokenMismatchError``. The changed token's own row is the one that changed most: in neither of its
    places, the rows keep no ids and are refused; the capture's own forward replays by row order on purpose."""
    torch.manual_seed(0)
    model = _LeftToRightPadding()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            out = model(ids, mask)
        routes = session.routes()
        with session.capture():
            model(ids[:1, 3:], mask[:1, 3:])
        own = session.routes()  # (sequence 0 alone, unpadded)
        kept = routes[3:8]  # (the rows a capture that reads them batch-major gives sequence 0's tokens)
        try:
            with session.capture():
                with session.replay(kept):
                    model(ids[:1, 3:], mask[:1, 3:])
                got = session.routes()
        except mr.TokenMismatchError:
            pass
        else:
            assert got.equal(own) and kept.equal(own), "rows of other positions were forced on sequence 0's tokens"
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(ids, mask)
        with session.replay(routes.with_token_ids(None)):
            assert torch.equal(model(ids, mask), out)
    session.detach()


class _LabelsFirst(nn.Module):
    """A forward whose first parameter is not the ids (``labels``), fed embeddings by name."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(
        self, labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert inputs_embeds is not None and labels is not None
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h)
        return h, F.cross_entropy(h.flatten(0, 1), labels.flatten().clamp(min=0) % D)


@pytest.mark.reliability("round trips")
def test_a_first_parameter_given_by_name_beside_embeddings_is_not_read_as_the_ids() -> None:
    """Only a forward given neither ``input_ids`` nor ``inputs_embeds`` has its first parameter read as its ids: here
    the labels, which differ between the rollout and the training forward (-100 at the prompt), are no token ids, and
    the replay of the embeddings the routes were recorded for forces them."""
    torch.manual_seed(0)
    model = _LabelsFirst()
    embeds = torch.randn(2, 6, D)
    labels = torch.randint(0, V, (2, 6))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad(), session.capture():
        model(labels=labels, inputs_embeds=embeds)
    routes = session.routes()
    assert routes.token_ids is None
    with torch.no_grad(), session.capture():
        with session.replay(routes):
            model(labels=labels.masked_fill(torch.arange(6) < 3, -100), inputs_embeds=embeds)
        assert session.routes().equal(routes)
    session.detach()


@pytest.mark.reliability("silent replays")
def test_a_model_compiled_whole_fed_its_ids_by_the_name_of_its_first_parameter_checks_them() -> None:
    """Once silent: the token check of a model compiled whole read the ids only as ``input_ids=`` or by position, so
    ``compiled(tokens=ids)`` on the batch with its sequences swapped was forced with no ``TokenMismatchError``. They
    are read by that name there too: the swapped batch is refused as the block ends, the batch itself replays."""
    torch.manual_seed(0)
    model = _NamedIds()
    a = torch.randint(0, V, (2, 8))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad():
        with session.capture():
            want = model(tokens=a)
        routes = session.routes()
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                compiled(tokens=a.flip(0))
        with session.replay(routes):
            assert torch.equal(compiled(tokens=a), want)
    session.detach()
