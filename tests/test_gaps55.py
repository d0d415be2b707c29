"""Places read where the checks read none before: a flat batch of token ids fed its positions, and a forward that
``torch.compile`` runs whole; and the ordinary uses those checks must let through (packed sequences whose positions
restart at 0, the right slice fed to a compiled model)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _outcome
from .test_review55 import _wrapper
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_P = inspect.Parameter


def _flat_model() -> nn.Module:
    """A model of one's own fed an engine's flat batch: ids ``[tokens]`` and ``positions`` ``[tokens]``."""
    return _wrapper(
        [("positions", _P.POSITIONAL_OR_KEYWORD)],
        lambda inner, ids, args, kw: inner(ids.reshape(1, -1), position_ids=kw["positions"].reshape(1, -1)),
    )


@pytest.mark.reliability("silent replays")
def test_a_flat_batch_slice_fed_another_ranks_tokens_is_refused() -> None:
    """One sequence captured through a forward of flat ids and positions, its ids dropped, split between two
    sequence-parallel ranks: each rank fed its own flat slice and positions is exact (the places the capture read
    from the flat positions), rank 0's rows fed rank 1's slice are refused."""
    model = _flat_model()
    inner = model.inner
    session = mr.attach(model)
    try:
        seq, pos = torch.randint(1, 128, (8,)), torch.arange(8)
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(seq, positions=pos)
        want, routes = _joined(rec), session.routes().with_token_ids(None)
        _perturb(inner)
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                got = _outcome(model, session, routes[own], lambda s=own: model(seq[s], positions=pos[s]), inner)
                assert got is not None, f"slice {own} refused though exact"
                for layer, rows in got.items():
                    assert torch.equal(rows, want[layer][own]), layer
            wrong = lambda: model(seq[4:], positions=pos[4:])  # noqa: E731
            assert _outcome(model, session, routes[:4], wrong, inner) is None, "rank 0's rows forced on rank 1's"
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("flat", [False, True], ids=["[1, tokens]", "[tokens]"])
def test_packed_sequences_fed_positions_restarting_at_zero_are_exact(flat: bool) -> None:
    """Two sequences captured on their own, their rows laid out without ids for one packed row (positions restarting
    at 0 at the second sequence), fed as ``[1, tokens]`` position_ids or an engine's flat ``[tokens]`` batch: exact."""
    model = _flat_model()
    inner = model.inner
    session = mr.attach(model)
    try:
        a, b = torch.randint(1, 128, (5,)), torch.randint(1, 128, (3,))
        captured = []
        with torch.no_grad():
            for seq in (a, b):
                with _dispatched(inner) as rec, session.capture():
                    model(seq, positions=torch.arange(seq.numel()))
                captured.append((session.routes().with_token_ids(None), _joined(rec)))
        _perturb(inner)
        ids, pos = torch.cat([a, b]), torch.cat([torch.arange(5), torch.arange(3)])
        if not flat:
            ids, pos = ids[None], pos[None]
        routes = mr.BatchLayout.packed([5, 3]).routes([r for r, _ in captured])
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(ids, positions=pos), inner)
        assert got is not None, "refused though exact"
        for layer, rows in got.items():
            assert torch.equal(rows, torch.cat([captured[0][1][layer], captured[1][1][layer]])), layer
    finally:
        session.detach()


def _compiled_slices(feed: Callable[[Any, torch.Tensor, torch.Tensor], Any]) -> tuple[bool, bool]:
    """One 8-token sequence captured whole through ``torch.compile(model)``, its rows laid out without ids and split
    between two ranks, each fed through the compiled model by ``feed(compiled, ids, pos)``: (each rank's own slice
    exact, rank 0's rows fed rank 1's slice refused)."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    session = mr.attach(inner)
    compiled = torch.compile(inner, backend="eager")
    try:
        seq, pos = torch.randint(1, 128, (1, 8)), torch.arange(8)[None]
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            feed(compiled, seq, pos)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        exact = True
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                run = lambda s=own: feed(compiled, seq[:, s], pos[:, s])  # noqa: E731
                got = _outcome(inner, session, routes[own], run, inner)
                exact = exact and got is not None and all(torch.equal(r, want[k][own]) for k, r in got.items())
            wrong = lambda: feed(compiled, seq[:, 4:], pos[:, 4:])  # noqa: E731
            refused = _outcome(inner, session, routes[:4], wrong, inner) is None
        return exact, refused
    finally:
        session.detach()
        torch.compiler.reset()


@pytest.mark.reliability("false refusals")
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_a_compiled_model_fed_its_own_slice_is_exact_and_another_ranks_refused() -> None:
    """Through ``torch.compile(model)``: each rank fed its own slice and ``position_ids`` is exact, rank 0's rows fed
    rank 1's are refused."""
    exact, refused = _compiled_slices(lambda m, ids, pos: m(ids, position_ids=pos))
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"


class _PositionsTaken(nn.Module):
    """A model of one's own that takes ``position_ids`` and hands the built model its ids alone (a built model's own
    check of its positions reads them on the host: no full graph)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
        """The inner model's output."""
        return self.inner(input_ids)


@pytest.mark.reliability("false refusals")
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_a_fullgraph_compiled_model_fed_its_own_slice_is_exact_and_another_ranks_refused() -> None:
    """Under ``torch.compile(model, fullgraph=True)`` the positions are compared in the compiled code itself (no
    graph break, which fullgraph would refuse): each rank's own slice replays its rows exactly, rank 0's rows fed
    rank 1's positions are refused."""
    torch.manual_seed(6)
    model = _PositionsTaken(mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense"))
    session = mr.attach(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        seq, pos = torch.randint(1, 128, (1, 8)), torch.arange(8)[None]
        with torch.no_grad():
            model(seq, position_ids=pos)  # (one eager forward establishes each decision; compiled code cannot)
            with session.capture():
                compiled(seq, position_ids=pos)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        with torch.no_grad():
            for own in (slice(0, 4), slice(4, 8)):
                with session.replay(routes[own]), session.capture():
                    compiled(seq[:, own], position_ids=pos[:, own])
                got = session.routes()
                assert all(torch.equal(got.layer(n), routes[own].layer(n)) for n in routes.names), own
            with pytest.raises(mr.MoEReplayError, match="ran compiled"), session.replay(routes[:4]):
                compiled(seq[:, 4:], position_ids=pos[:, 4:])
        assert session.state == "idle"
    finally:
        session.detach()
        torch.compiler.reset()


@pytest.mark.reliability("silent replays")
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`")
def test_a_compiled_model_fed_another_ranks_positions_in_steps_of_another_width_is_refused() -> None:
    """Through the compiled model, rows that follow each other in their sequence fed positions twice as far apart
    (as if gaps were between them): refused, as an eager forward is."""
    torch.manual_seed(6)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    session = mr.attach(inner)
    compiled = torch.compile(inner, backend="eager")
    try:
        seq = torch.randint(1, 128, (1, 4))
        with torch.no_grad(), session.capture():
            compiled(seq, position_ids=torch.arange(4)[None])
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
        with torch.no_grad(), pytest.raises(mr.MoEReplayError, match="ran compiled"):
            with session.replay(routes):
                compiled(seq, position_ids=torch.arange(0, 8, 2)[None])
    finally:
        session.detach()
        torch.compiler.reset()


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_positions_of_fractions_that_tell_no_place_is_refused_with_the_way_out() -> None:
    """Positions of fractions that are no whole number of one step (``0.3 * p + 0.1``: not positions scaled by one
    factor) tell no place: rows without ids fed them and no mask are refused, naming integer positions and ids as the
    way out, and the model is left as it was; positions scaled by one factor are read as places (see
    test_review55)."""
    model = _wrapper(
        [("positions", _P.POSITIONAL_OR_KEYWORD)],
        lambda inner, ids, args, kw: inner(ids, position_ids=((kw["positions"] - 0.1) / 0.3).round().long()),
    )
    inner = model.inner
    session = mr.attach(model)
    try:
        seq, pos = torch.randint(1, 128, (1, 8)), torch.arange(8)[None]
        with torch.no_grad(), session.capture():
            model(seq, positions=pos)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        run = lambda: model(seq[:, :4], positions=pos[:, :4] * 0.3 + 0.1)  # noqa: E731
        with torch.no_grad(), pytest.raises(mr.MoEReplayError, match="fractions that tell no place") as err:
            with session.replay(routes[:4]):
                run()
        with torch.no_grad():
            assert _outcome(model, session, routes[:4], run, inner) is None, "forced with nothing compared"
        assert "with_token_ids" in str(err.value) and "integer position_ids" in str(err.value)
        assert session.state == "idle"
    finally:
        session.detach()
