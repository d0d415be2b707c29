"""Round 52's gaps: an iterator numpy gives over an array's items (``array.flat``) that a router draws from, positions
given under names of a model's own, a model that keeps its KV cache itself, and the refusal of a router whose output
differs between two runs naming the iterators it draws from."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _first, _outcome, _PerTokenFrom, _RouterBlock
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts


# ----------------------------------------------------------------------------- numpy's flat iterators
def _flat_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        _RouterBlock(_PerTokenFrom(np.linspace(0.0, 50.0, 5000).flat)),
        _RouterBlock(_PerTokenFrom(np.arange(4000.0).reshape(40, 100)[:, ::2].flat)),
    )


@pytest.mark.reliability("the model is left as it was")
def test_a_router_drawing_per_token_from_a_numpy_flatiter_is_in_step_and_its_own() -> None:
    """Routers that draw one jitter item per token from ``ndarray.flat`` (one over a strided view): the captured
    forwards see the plain model's draws, a replay runs, and after detach() each router holds its
    own iterator, advanced by exactly what the forwards drew. Once refused as a router whose output differs between
    two runs: a flatiter's public attributes kept any stand-in out, so the runs that establish the decision drew on
    from it, and the refusal left it past the items they drew."""
    model, plain = _flat_model(0), _flat_model(0)
    held = [vars(b.router)["noise"] for b in model]
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in xs]
        routes = session.routes()
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
        assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own"
        assert [it.index for it in held] == [b.router.noise.index for b in plain], "drawn past the forwards"
        with session.replay(routes):
            again = [model(x) for x in xs]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    assert len(again) == len(want)
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own after detach"
    assert [it.index for it in held] == [b.router.noise.index for b in plain]
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]


# ----------------------------------------------------------------------------- the refusal names the iterator
class _Jitter:
    """An iterator of the user's class, with a method of its own besides ``next()``: no stand-in takes its place."""

    def __init__(self) -> None:
        self.at = 0

    def __iter__(self) -> _Jitter:
        return self

    def __next__(self) -> float:
        self.at += 1
        return float(self.at)

    def rewind(self) -> None:
        """Start again."""
        self.at = 0


class _Drawn(nn.Module):
    """A top-2 router over 8 experts whose first choice per token is the item it draws (mod 8) from an iterator it
    holds, itself (``self.noise``) or in a plain object it keeps (``self.cfg.jitter``): runs that draw other items
    choose other experts."""

    def __init__(self, kept: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.top_k = 2
        if kept:
            self.cfg = _Cfg()
        else:
            self.noise = _Jitter()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and experts of each token."""
        drawn = torch.tensor([int(self.item()) % 8 for _ in range(x.shape[0])])
        logits = nn.functional.linear(x, self.weight) + 10.0 * nn.functional.one_hot(drawn, 8)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx

    def item(self) -> float:
        """The next item drawn."""
        return next(self.cfg.jitter if hasattr(self, "cfg") else self.noise)


class _ByCall(_Drawn):
    """:class:`_Drawn` drawing by calling a bound method of an iterator's (``self.draw()``), holding no iterator."""

    def __init__(self) -> None:
        super().__init__(kept=False)
        self.draw = self.noise.__next__
        del self.noise

    def item(self) -> float:
        """The next item drawn."""
        return self.draw()


class _Cfg:
    """A plain object a router keeps, holding the iterator it draws from."""

    def __init__(self) -> None:
        self.jitter = _Jitter()


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("held", ["in an attribute", "in an object the router keeps"])
def test_a_router_whose_runs_differ_by_an_iterator_of_its_own_is_refused_naming_it(held: str) -> None:
    """A router that draws per token from an iterator of the user's class (no copy nor stand-in can take its place
    in the runs that establish the decision, so each run draws on from it): refused as one whose output differs
    between two runs, the refusal naming the iterator as the likely cause."""
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_Drawn(kept=held != "in an attribute")))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with pytest.raises(mr.MoEReplayError) as err, mr.attach(model) as session, session.capture(), torch.no_grad():
        model(x)
    text = str(err.value)
    assert "differs between two runs" in text, text
    name = "'noise'" if held == "in an attribute" else "'jitter'"
    assert f"likely cause: it draws from {name} (a _Jitter" in text, text


@pytest.mark.reliability("clear errors")
def test_a_router_whose_runs_differ_by_another_cause_names_no_iterator() -> None:
    """The same refusal for a router whose runs differ by what a method it calls draws (it holds no iterator) names
    none."""
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_ByCall()))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with pytest.raises(mr.MoEReplayError) as err, mr.attach(model) as session, session.capture(), torch.no_grad():
        model(x)
    assert "differs between two runs" in str(err.value), str(err.value)
    assert "likely cause" not in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- counts and positions of a model's own
class _Counted(nn.Module):
    """A model of one's own fed its tokens' positions and a count beside them (``offset``: where a
    sequence-parallel rank's slice starts, or how many tokens the cache it keeps holds) that it does not read; it
    keeps its last forward's KV cache (``self.held``) where ``keeps``."""

    def __init__(self, inner: nn.Module, keeps: bool) -> None:
        super().__init__()
        self.inner, self.keeps = inner, keeps
        self.held: Any = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, offset: int = 0) -> Any:
        """The inner model's output (fed no cache)."""
        out = self.inner(input_ids, position_ids=position_ids, use_cache=self.keeps)
        if self.keeps:
            self.held = out.past_key_values
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("keeps", [False, True], ids=["keeps nothing", "keeps its last cache"])
def test_a_slice_fed_another_ranks_tokens_with_its_offset_as_a_count_is_refused(keeps: bool) -> None:
    """A sequence-parallel rank's rows of a 12-token sequence (laid out without ids) fed the third rank's tokens, their
    positions, and where that slice starts as an int (``offset=8``, which is neither the slice's length nor its token
    count) are refused, whether the model keeps nothing or keeps its last forward's KV cache (which holds 4 tokens, not
    8: the count is not that of the tokens a cache it keeps holds); each rank fed its own slice is exact. A count
    read as the tokens a cache the model keeps holds (test_review53's continuation) must not open this."""
    torch.manual_seed(7)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _Counted(inner, keeps)
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 12))
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(seq, torch.arange(12)[None])
        want = _joined(rec)
        routes = mr.BatchLayout.packed([12]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        pos = torch.arange(12)[None]
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8), slice(8, 12)):
                run: Any = lambda s=own: model(seq[:, s], pos[:, s], offset=s.start)  # noqa: E731
                got = _outcome(model, session, routes[own], run, inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), f"slice {own} at {layer}"
            wrong = lambda: model(seq[:, 8:], pos[:, 8:], offset=8)  # noqa: E731
            assert _outcome(model, session, routes[:4], wrong, inner) is None, "rank 0's rows forced on rank 2's"
    finally:
        session.detach()


def _named_positions(name: str) -> type[nn.Module]:
    """A model of one's own whose forward takes its tokens' positions under ``name`` (vLLM's ``positions``, ``pos``,
    ``position``, ``pos_ids``) and may be given a KV cache, handed to the inner model as its ``position_ids``."""

    class _Named(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            """The inner model's output."""
            pos = args[0] if args else kwargs.get(name)
            return self.inner(input_ids, position_ids=pos, past_key_values=kwargs.get("past_key_values"))

    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, default=None if n != "self" else P.empty) for n in ("self", "input_ids")]
    params += [P(name, P.POSITIONAL_OR_KEYWORD, default=None), P("past_key_values", P.KEYWORD_ONLY, default=None)]
    _Named.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return _Named


_POSITION_NAMES = ["positions", "pos", "position", "pos_ids"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("given", ["by name", "by position"])
@pytest.mark.parametrize("name", _POSITION_NAMES)
def test_a_slice_fed_another_ranks_tokens_with_positions_under_a_name_of_its_own_is_refused(
    name: str, given: str
) -> None:
    """A sequence-parallel rank's rows of one sequence, laid out without token ids, fed the other rank's tokens and
    positions, the positions under the name the model's forward declares for them (vLLM's ``positions``, ``pos``,
    ``position``, ``pos_ids``), by name or by position: refused, as with ``position_ids``;
    each rank fed its own slice is exact."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _named_positions(name)(inner)
    session = mr.attach(model)

    def run(ids: torch.Tensor, pos: torch.Tensor) -> Any:
        return model(ids, **{name: pos}) if given == "by name" else model(ids, pos)

    try:
        seq = torch.randint(1, 128, (1, 8))
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            run(seq, torch.arange(8)[None])
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        pos = torch.arange(8)[None]
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                got = _outcome(model, session, routes[own], lambda s=own: run(seq[:, s], pos[:, s]), inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), f"slice {own} at {layer}"
            wrong = lambda: run(seq[:, 4:], pos[:, 4:])  # noqa: E731
            assert _outcome(model, session, routes[:4], wrong, inner) is None, "rank 0's rows forced on rank 1's"
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("name", _POSITION_NAMES)
def test_a_continuation_fed_positions_under_a_name_of_its_own_beside_its_cache_is_exact(name: str) -> None:
    """A second turn fed after its first turn's KV cache, its positions (those after the cached tokens) under the name
    the model's forward declares for them, its rows laid out as a sequence of their own: the replay is exact, as with
    ``position_ids`` (the positions are compared by their steps, not their values, beside a cache that holds tokens);
    and a capture's own rows replay on the forward they were captured at."""
    torch.manual_seed(4)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _named_positions(name)(inner)
    session = mr.attach(model)
    try:
        first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
        later = torch.arange(5, 9)[None]
        with torch.no_grad():
            cache = inner(first, use_cache=True).past_key_values
            with _dispatched(inner) as rec, session.capture():
                model(second, **{name: later, "past_key_values": cache})
        want, turn = _joined(rec), session.routes()
        _perturb(inner)
        with torch.no_grad():
            run = lambda: model(second, **{name: later, "past_key_values": cache})  # noqa: E731
            for routes in (turn.with_token_ids(None), mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)])):
                got = _outcome(model, session, routes, run, inner)
                assert got is not None, "refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()
