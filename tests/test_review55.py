"""Round 55's review: positions given under names the checks read (a forward's ``**kwargs``, an index of positions,
positions of a kind) or cannot read (fractions, a video under a name of its own), and the model left as it was after
each refusal."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _outcome, _PerTokenFrom, _RouterBlock
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_P = inspect.Parameter
#: how a test model's forward hands the inner model its positions, from its arguments after the ids and its keywords
ToInner = Callable[[nn.Module, torch.Tensor, tuple[Any, ...], dict[str, Any]], Any]


def _wrapper(params: list[tuple[str, Any]], to_inner: ToInner) -> nn.Module:
    """A model of one's own around a built MoE model, whose forward declares ``params`` (name, kind) after
    ``input_ids`` and hands the inner model what ``to_inner`` makes of its arguments."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)

    class _Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            """The inner model's output."""
            return to_inner(self.inner, input_ids, args, kwargs)

    sig = [_P("self", _P.POSITIONAL_OR_KEYWORD), _P("input_ids", _P.POSITIONAL_OR_KEYWORD)]
    sig += [_P(n, k) if k is _P.VAR_KEYWORD else _P(n, k, default=None) for n, k in params]
    _Own.forward.__signature__ = inspect.Signature(sig)  # type: ignore[attr-defined]
    return _Own()


def _slices(model: nn.Module, run: Callable[[torch.Tensor, torch.Tensor], Any]) -> tuple[bool, bool]:
    """One 8-token sequence captured whole, its rows laid out without ids and split between two sequence-parallel
    ranks: (each rank fed its own slice and positions is exact, rank 0's rows fed rank 1's slice are refused)."""
    inner = model.inner
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 8))
        pos = torch.arange(8)[None]
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            run(seq, pos)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        exact = True
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                got = _outcome(model, session, routes[own], lambda s=own: run(seq[:, s], pos[:, s]), inner)
                exact = exact and got is not None and all(torch.equal(r, want[k][own]) for k, r in got.items())
            wrong = lambda: run(seq[:, 4:], pos[:, 4:])  # noqa: E731
            refused = _outcome(model, session, routes[:4], wrong, inner) is None
        return exact, refused
    finally:
        session.detach()


def _by_name(name: str) -> ToInner:
    """Hand the inner model the keyword ``name`` as its position_ids (and the KV cache given, if any)."""
    return lambda inner, ids, args, kw: inner(
        ids, position_ids=args[0] if args else kw[name], past_key_values=kw.get("past_key_values")
    )


#: forwards whose positions are read: (their parameters after the ids, how they hand on the positions, the call)
_READ: dict[str, tuple[list[tuple[str, Any]], ToInner, Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]]] = {
    "positions= in **kwargs": ([("kwargs", _P.VAR_KEYWORD)], _by_name("positions"), lambda m, i, p: m(i, positions=p)),
    "pos= in **kwargs": ([("kwargs", _P.VAR_KEYWORD)], _by_name("pos"), lambda m, i, p: m(i, pos=p)),
    "position_idx= in **kwargs": (
        [("kwargs", _P.VAR_KEYWORD)],
        _by_name("position_idx"),
        lambda m, i, p: m(i, position_idx=p),
    ),
    "position_idx declared": (
        [("position_idx", _P.POSITIONAL_OR_KEYWORD), ("kwargs", _P.VAR_KEYWORD)],
        _by_name("position_idx"),
        lambda m, i, p: m(i, position_idx=p),
    ),
    "position_idx by position": (
        [("position_idx", _P.POSITIONAL_OR_KEYWORD)],
        _by_name("position_idx"),
        lambda m, i, p: m(i, p),
    ),
    "token_positions declared": (
        [("token_positions", _P.POSITIONAL_OR_KEYWORD), ("start_pos", _P.POSITIONAL_OR_KEYWORD)],
        _by_name("token_positions"),
        lambda m, i, p: m(i, token_positions=p),
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(_READ))
def test_a_slice_fed_another_ranks_tokens_with_positions_under_another_name_is_refused(case: str) -> None:
    """A sequence-parallel rank's rows of one sequence, laid out without token ids, fed the other rank's tokens and
    positions, the positions given under a name of the model's own: in a forward's ``**kwargs`` (``positions=``,
    ``pos=``, ``position_idx=``), or declared as an index of positions or positions of a kind (``position_idx``,
    ``token_positions`` beside a ``start_pos``), by name or by position. Once forced with nothing compared (only
    the names of ``position_ids``'s own forms declared by the forward were read); refused, and each rank fed its own
    slice is exact."""
    params, to_inner, call = _READ[case]
    model = _wrapper(params, to_inner)
    exact, refused = _slices(model, lambda ids, pos: call(model, ids, pos))
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("name", ["positions", "position_idx"])
def test_a_continuation_fed_positions_in_kwargs_beside_its_cache_is_exact(name: str) -> None:
    """A second turn fed after its first turn's KV cache, its positions (those after the cached tokens) in the
    forward's ``**kwargs`` under a name of their own, its rows laid out as a sequence of their own: exact, as with
    ``position_ids`` (compared by their steps beside a cache that holds tokens)."""
    model = _wrapper([("kwargs", _P.VAR_KEYWORD)], _by_name(name))
    inner = model.inner
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
            got = _outcome(model, session, mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)]), run, inner)
        assert got is not None, "refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_ranks_tokens_with_fractional_positions_is_refused() -> None:
    """Positions that a model of one's own takes as fractions (scaled by a half, as position interpolation scales
    them) and scales back: another rank's slice fed them must be refused, as with whole positions."""
    model = _wrapper(
        [("positions", _P.POSITIONAL_OR_KEYWORD)],
        lambda inner, ids, args, kw: inner(ids, position_ids=(kw["positions"] * 2).long()),
    )
    exact, refused = _slices(model, lambda ids, pos: model(ids, positions=pos / 2))
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", ["frames", "vision_x"])
def test_a_slice_fed_another_ranks_tokens_beside_a_video_under_a_name_of_its_own_is_refused(name: str) -> None:
    """Another rank's slice fed beside a video's frames (``[batch, frames, channels, height, width]``, OpenFlamingo's
    6-d ``vision_x``) under a name that names no media: refused, as beside ``pixel_values``."""
    video = torch.rand(1, 2, 3, 4, 4) if name == "frames" else torch.rand(1, 1, 2, 3, 4, 4)
    model = _wrapper(
        [("position_ids", _P.POSITIONAL_OR_KEYWORD), (name, _P.POSITIONAL_OR_KEYWORD)],
        _by_name("position_ids"),
    )
    exact, refused = _slices(model, lambda ids, pos: model(ids, position_ids=pos, **{name: video}))
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


# ----------------------------------------------------------------------------- iterators of the user's class
class _Box:
    """A plain object an iterator keeps its count in."""

    def __init__(self) -> None:
        self.n = 0


class _Source:
    """An iterator of the user's class (a method besides ``next()``, so no stand-in takes its place) keeping its
    state outside its own attributes: in a ``random.Random`` it holds (``"random stream"``, items small enough that
    the runs' tolerance lets them pass), an object of its own (``"object"``), a list inside a list (``"nested
    list"``) or an iterator of Python's (``"list iterator"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.rng = random.Random(0)
        self.box = _Box()
        self.cells = [[0]]
        self.src = iter(list(range(100000)))

    def __iter__(self) -> _Source:
        return self

    def __next__(self) -> float:
        if self.kind == "random stream":
            return self.rng.random() * 1e-3
        if self.kind == "object":
            self.box.n += 1
            return float(self.box.n)
        if self.kind == "nested list":
            self.cells[0][0] += 1
            return float(self.cells[0][0])
        return float(next(self.src))

    def rewind(self) -> None:
        """Start again."""
        self.__init__(self.kind)  # type: ignore[misc]


def _drawing(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_RouterBlock(_PerTokenFrom(_Source(kind))), _RouterBlock(_PerTokenFrom(_Source(kind))))


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("kind", ["random stream", "object", "nested list", "list iterator"])
def test_a_router_drawing_from_an_iterator_keeping_its_state_in_a_stream_or_object_it_holds_is_in_step(
    kind: str,
) -> None:
    """Routers drawing one item per token from an iterator of the user's class that keeps its state in a
    ``random.Random`` it holds, or in an object of its own: the captured forwards see the plain model's draws and
    each iterator goes on where the plain model's does. Once the runs that establish the decision drew on from the
    stream (its object put back, its state not), the forwards seeing other draws with nothing said; a count kept in
    an object of its own refused the router and left its iterator 1251 items on."""
    model, plain = _drawing(kind), _drawing(kind)
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        got = [model(x) for x in xs]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
    assert [next(b.router.noise) for b in model] == [next(b.router.noise) for b in plain], "drawn past the forwards"


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("kind", ["nested list", "list iterator"])
def test_a_router_drawing_from_an_iterator_keeping_its_state_deeper_is_in_step_or_refused_as_it_was(kind: str) -> None:
    """Once a known gap: an iterator of the user's class keeping its state in a list inside a list, or in an iterator
    of Python's it holds, had that state put back by no run that establishes the decision, the router refused and its
    iterator left 1251 (or 18) items on. Such a router is in step with the plain model, or refused with its iterator
    where it stood before the forward or where the plain model's forward leaves it."""
    model, plain = _drawing(kind), _drawing(kind)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(x)
    fresh = [next(_Source(kind)) for _ in model]
    try:
        with mr.attach(model) as session, session.capture(), torch.no_grad():
            got = model(x)
    except mr.MoEReplayError:
        now = [next(b.router.noise) for b in model]
        assert now in (fresh, [next(b.router.noise) for b in plain]), f"left drawn on: next items {now}"
        return
    assert torch.equal(want, got), "the forward saw other draws"


# ----------------------------------------------------------------------------- compiled forwards
@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_ranks_tokens_through_a_compiled_model_is_refused() -> None:
    """A sequence-parallel rank's rows of one sequence, laid out without token ids, fed the other rank's tokens and
    ``position_ids`` through ``torch.compile(model)``: refused, as in eager; each rank fed its own slice is exact."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    session = mr.attach(inner)
    compiled = torch.compile(inner, backend="eager")
    try:
        seq, pos = torch.randint(1, 128, (1, 8)), torch.arange(8)[None]
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            compiled(seq, position_ids=pos)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                run = lambda s=own: compiled(seq[:, s], position_ids=pos[:, s])  # noqa: E731
                got = _outcome(inner, session, routes[own], run, inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), f"slice {own} at {layer}"
            wrong = lambda: compiled(seq[:, 4:], position_ids=pos[:, 4:])  # noqa: E731
            assert _outcome(inner, session, routes[:4], wrong, inner) is None, "rank 0's rows forced on rank 1's"
    finally:
        session.detach()
        torch.compiler.reset()


# ----------------------------------------------------------------------------- an engine's flat batch
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", ["positions", "position_ids"])
def test_rows_laid_out_in_another_order_fed_a_flat_batch_are_refused(name: str) -> None:
    """Two sequences captured on their own through a forward of flat ids and positions (``[tokens]``), their rows
    laid out without ids for a packed batch: fed the packed flat batch, the layout of its order is exact, and the
    layout of the other order (each token given another sequence's experts) is refused, as it is for ``[1, tokens]``
    ids."""
    model = _wrapper(
        [(name, _P.POSITIONAL_OR_KEYWORD)],
        lambda inner, ids, args, kw: inner(ids.reshape(1, -1), position_ids=kw[name].reshape(1, -1)),
    )
    inner = model.inner
    session = mr.attach(model)
    try:
        a, b = torch.randint(1, 128, (5,)), torch.randint(1, 128, (3,))
        with torch.no_grad():
            with _dispatched(inner) as rec, session.capture():
                model(a, **{name: torch.arange(5)})
            first, want_a = session.routes().with_token_ids(None), _joined(rec)
            with _dispatched(inner) as rec, session.capture():
                model(b, **{name: torch.arange(3)})
            second, want_b = session.routes().with_token_ids(None), _joined(rec)
        _perturb(inner)
        run = lambda: model(torch.cat([a, b]), **{name: torch.cat([torch.arange(5), torch.arange(3)])})  # noqa: E731
        with torch.no_grad():
            got = _outcome(model, session, mr.BatchLayout.packed([5, 3]).routes([first, second]), run, inner)
            assert got is not None, "refused though exact"
            for layer, rows in got.items():
                assert torch.equal(rows, torch.cat([want_a[layer], want_b[layer]])), layer
            swapped = mr.BatchLayout.packed([3, 5]).routes([second, first])
            assert _outcome(model, session, swapped, run, inner) is None, "another order's rows forced"
    finally:
        session.detach()
