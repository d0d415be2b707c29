"""Adversarial review of round 47's merges: the value check of position_ids where a forward is given other
arguments (a dataclass of sequence lengths, a KV cache as one tensor under a name of its own), and iterators a router
draws from that the runs establishing its decision could not stand in for."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _first, _outcome, _PerTokenFrom, _RouterBlock
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts


# ----------------------------------------------------------------------------- what may hold earlier tokens
@dataclasses.dataclass
class _PackedSeqParams:
    """What Megatron hands a forward of packed sequences besides its tokens: their boundaries and longest length."""

    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    qkv_format: str = "thd"


class _Megatronish(nn.Module):
    """A model of one's own fed ``packed_seq_params`` (sequence boundaries, no tokens) or a KV cache as one tensor
    under a name of its own (``kv_cache``: ``[layers, 2, batch, heads, past, head_dim]``), handed to the inner model
    as the list of ``(keys, values)`` it takes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        packed_seq_params: _PackedSeqParams | None = None,
        kv_cache: torch.Tensor | None = None,
    ) -> Any:
        """The inner model's output."""
        past = None if kv_cache is None else [(layer[0], layer[1]) for layer in kv_cache.unbind(0)]
        return self.inner(input_ids, position_ids=position_ids, past_key_values=past, use_cache=True)


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_ranks_tokens_with_packed_seq_params_is_refused() -> None:
    """A sequence-parallel rank's rows of one sequence, laid out without token ids, fed the other rank's tokens and
    positions with a dataclass of sequence boundaries beside them (Megatron's ``PackedSeqParams``: 1-d tensors and
    counts, no tokens) are refused, as they are fed nothing else; each rank fed its own slice is exact. Once forced
    silently: any object given to a forward was read as a KV cache that may hold earlier tokens, and the positions
    fed were then compared by their steps only."""
    torch.manual_seed(3)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _Megatronish(inner)
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 8))
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(seq)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        pos = torch.arange(8)[None]
        params = _PackedSeqParams(torch.tensor([0, 4], dtype=torch.int32), 4)
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                run: Callable[[], Any] = lambda s=own: model(  # noqa: E731
                    seq[:, s], position_ids=pos[:, s], packed_seq_params=params
                )
                got = _outcome(model, session, routes[own], run, inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), f"slice {own} at {layer}"
            wrong = lambda: model(seq[:, 4:], position_ids=pos[:, 4:], packed_seq_params=params)  # noqa: E731
            assert _outcome(model, session, routes[:4], wrong, inner) is None, "rank 0's rows forced on rank 1's"
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
def test_a_continuation_fed_its_cache_as_one_tensor_under_a_name_of_its_own_is_exact() -> None:
    """A second turn fed after its first turn's KV cache, the cache one stacked tensor under a name of its own
    (``kv_cache``), its rows laid out as a sequence of their own and fed the positions after the cached tokens: the
    replay is exact, as with the cache given as a list. Once refused: every plain tensor given to a forward was read
    as one that holds no earlier token, so the positions were compared with the rows' places by value."""
    torch.manual_seed(4)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _Megatronish(inner)
    session = mr.attach(model)
    try:
        first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
        later = torch.arange(5, 9)[None]
        with torch.no_grad():
            cache = torch.stack([torch.stack(kv) for kv in inner(first, use_cache=True).past_key_values])
            with _dispatched(inner) as rec, session.capture():
                model(second, position_ids=later, kv_cache=cache)
        want, turn = _joined(rec), session.routes()
        _perturb(inner)
        routes = mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)])
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(second, position_ids=later, kv_cache=cache), inner)
        assert got is not None, "refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_position_ids_given_by_position_are_checked_as_given_by_name() -> None:
    """A forward given its position_ids as its second positional argument (``model(ids, positions)``): a
    sequence-parallel rank's rows fed the other rank's tokens and positions are refused, as they are where the
    positions are given by name; each rank's own slice is exact. Once forced silently: only an attention mask given
    by position was read as given by name, and position_ids given so were never compared with the rows' places."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _Megatronish(inner)
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 8))
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(seq)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        pos = torch.arange(8)[None]
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                got = _outcome(model, session, routes[own], lambda s=own: model(seq[:, s], pos[:, s]), inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), f"slice {own} at {layer}"
            for given in ("by name", "by position"):
                if given == "by name":
                    wrong: Callable[[], Any] = lambda: model(seq[:, 4:], position_ids=pos[:, 4:])  # noqa: E731
                else:
                    wrong = lambda: model(seq[:, 4:], pos[:, 4:])  # noqa: E731
                assert _outcome(model, session, routes[:4], wrong, inner) is None, f"forced, positions {given}"
    finally:
        session.detach()


# ----------------------------------------------------------------------------- iterators a router draws from
_COPIED: dict[str, Callable[[], Iterator[Any]]] = {
    "a deque's": lambda: iter(collections.deque(range(100000))),
    "a deque's, reversed": lambda: reversed(collections.deque(range(100000))),
    "a list's, reversed": lambda: reversed(list(range(100000))),
    "enumerate over a deque's": lambda: enumerate(iter(collections.deque(range(100000)))),
}


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("draws", list(_COPIED))
def test_a_router_drawing_per_token_from_a_deque_or_reversed_iterator_is_in_step_and_its_own(draws: str) -> None:
    """A router draws one jitter item per token from a ``collections.deque``'s iterator or a reversed list's: the
    captured forwards see the plain model's draws, and after detach() the router holds its own iterator, advanced by
    exactly what the forwards drew. Once refused (a deque's: its module is neither builtins nor itertools, so no
    stand-in kept what the runs that establish the decision drew, and they drew on from it) or handed back as a
    generator of the library's (a reversed list's, which was not copied)."""
    make = _COPIED[draws]
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_PerTokenFrom(make())), _RouterBlock(_PerTokenFrom(make())))
    torch.manual_seed(0)
    plain = nn.Sequential(_RouterBlock(_PerTokenFrom(make())), _RouterBlock(_PerTokenFrom(make())))
    held = [vars(b.router)["noise"] for b in model]
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        got = [model(x) for x in xs]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own after detach"
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]


@pytest.mark.reliability("the model is left as it was")
def test_a_router_refused_for_drawing_from_a_numpy_flatiter_leaves_it_where_it_stood() -> None:
    """A router that draws per token from ``ndarray.flat``: where its decision cannot be established the refusal
    leaves the iterator where it stood (no forward of the model ran to its end); where it is established (the runs
    draw from a copy of the iterator), the iterator stands where the plain model's forward leaves its own."""
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_PerTokenFrom(np.arange(1000.0).flat)))
    torch.manual_seed(0)
    plain = nn.Sequential(_RouterBlock(_PerTokenFrom(np.arange(1000.0).flat)))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(x)
    try:
        with mr.attach(model) as session, session.capture(), torch.no_grad():
            got = model(x)
    except mr.MoEReplayError:
        assert model[0].router.noise.index == 0, f"the refusal left the flatiter at {model[0].router.noise.index}"
    else:
        assert torch.equal(got, want), "the forward saw other draws"
        assert model[0].router.noise.index == plain[0].router.noise.index, "drawn past the forward"


class _HeldCache(nn.Module):
    """A model of one's own that keeps its KV cache itself (as gpt-fast's and Llama's reference code keep theirs in
    buffers of their attention) and is told how many tokens it holds by a count (``start_pos``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.held: Any = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, start_pos: int = 0) -> Any:
        """The inner model's output, fed the cache kept from the forwards before (none at ``start_pos`` 0)."""
        out = self.inner(
            input_ids, position_ids=position_ids, past_key_values=self.held if start_pos else None, use_cache=True
        )
        self.held = out.past_key_values
        return out


@pytest.mark.reliability("false refusals")
def test_a_continuation_of_a_model_that_keeps_its_own_cache_is_not_refused_by_its_positions() -> None:
    """A second turn of a model that keeps its KV cache itself, fed the positions after the cached tokens and a
    count of them, its rows laid out as a sequence of their own: the replay is exact, as it is where the cache is
    given to the forward (test_review51's continuation under a name of one's own)."""
    torch.manual_seed(5)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _HeldCache(inner)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    later = torch.arange(5, 9)[None]
    with torch.no_grad():
        model(first, position_ids=torch.arange(5)[None])
        kept = model.held
        session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(second, position_ids=later, start_pos=5)
        want, turn = _joined(rec), session.routes()
        _perturb(inner)
        routes = mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)])
        model.held = kept
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(second, position_ids=later, start_pos=5), inner)
        assert got is not None, "refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()
