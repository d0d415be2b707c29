"""Adversarial review of round 49's merges (round 50): the iterators a router draws from while its decision is
established, the per-router call check of compiled forwards, a token fed its place among its KV cache's tokens,
and detach() under Ctrl-C. A replay forces the captured experts on the tokens they were recorded for, or it is
refused; plain use is not refused, and the model is left as it was."""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from moe_replay import session as session_module
from tests.test_compiled48 import _captured, _Loop, _move_routers, _tokens
from tests.test_evidence import D, E
from tests.test_left48 import _Block, _Router
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, assert_refused
from tests.test_public_routers21 import FlatCapacityGate
from tests.test_session_lifecycle import model_and_input, ours_reachable

from .conftest import assert_untouched, snapshot

_XS = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]


# --- iterators a router keeps in a dict or list it holds ------------------------------------------------------------


def _jittered(router: _Router, item: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x, router.weight) + 0.3 * torch.sin(torch.tensor(float(item))) * torch.arange(8.0)
    w, idx = logits.softmax(-1).topk(router.top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


class _JitterFromADict(_Router):
    """Draws its jitter from an iterator kept in a dict it holds (a table of named noise streams)."""

    def __init__(self, stream: Iterator[int] | None = None) -> None:
        super().__init__()
        self.streams = {"jitter": itertools.cycle(range(1000)) if stream is None else stream}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _jittered(self, next(self.streams["jitter"]), x)


class _JitterFromAList(_Router):
    """Draws its jitter from an iterator kept in a list it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.streams = [itertools.cycle(range(1000))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _jittered(self, next(self.streams[0]), x)


def _own() -> tuple[nn.Module, list[Iterator[int]]]:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_JitterFromADict()), _Block(_JitterFromAList()))
    return model, [model[0].router.streams["jitter"], model[1].router.streams[0]]


def _shared() -> tuple[nn.Module, list[Iterator[int]]]:
    torch.manual_seed(0)
    stream = itertools.cycle(range(1000))
    return nn.Sequential(_Block(_JitterFromADict(stream)), _Block(_JitterFromADict(stream))), [stream, stream]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("make", [_own, _shared], ids=["each its own", "one shared"])
def test_an_iterator_held_in_a_dict_or_list_attribute_replays_and_the_forwards_get_the_plain_draws(
    make: Callable[[], tuple[nn.Module, list[Iterator[int]]]],
) -> None:
    """Once refused as a router whose output differs between two runs on the same inputs: the runs that establish the
    decision stood in only for an iterator held in an attribute itself, so one kept in a dict or list the router holds
    was advanced by every run. Such iterators are stood in for too: the capture's forwards see the plain model's
    draws, a replay of them reproduces them, and after detach each place holds its own iterator, which gives its
    next item as the plain model's does."""
    plain, plain_streams = make()
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    model, streams = make()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in _XS]
        routes = session.routes()
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g), "a forward after attach saw other draws than the plain model"
    assert model[0].router.streams["jitter"] is streams[0]
    held_1 = model[1].router.streams[0] if isinstance(model[1].router.streams, list) else None
    assert held_1 is None or held_1 is streams[1]
    assert [next(s) for s in streams] == [next(s) for s in plain_streams]
    with mr.attach(model) as session, session.replay(routes), torch.no_grad():
        [model(x) for x in _XS]  # (not refused: every row consumed)


# --- the per-router call check of compiled forwards -----------------------------------------------------------------


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Checkpointed(_Loop):
    """:class:`tests.test_compiled48._Loop` with every block call under non-reentrant activation checkpointing: a
    compiled training step's backward runs each router again (a recompute reads its rows a second time)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for _ in range(1 + self.extra):
            h = h + checkpoint(self.a, h, use_reentrant=False)
        if not self.skip:
            h = h + checkpoint(self.b, h, use_reentrant=False)
        return h


def _steps(model: _Loop, run: Callable[[torch.Tensor], torch.Tensor], plan: list[tuple[int, bool]]) -> list[Any]:
    """Each forward of ``plan`` through ``run`` and its backward: the outputs and the routers' gradients."""
    got = []
    for extra, skip in plan:
        model.set(extra, skip)
        model.zero_grad()
        out = run(_tokens())
        out.square().sum().backward()
        got.append((out.detach(), model.a.router.weight.grad.clone()))
    return got


@pytest.mark.reliability("silent replays")
@pytest.mark.usefixtures("_fresh_dynamo")
def test_a_compiled_checkpointed_training_step_replays_as_the_eager_one_and_its_calls_are_checked() -> None:
    """A training step compiled whole, its blocks checkpointed (the backward's recompute reads each router's rows
    again, which the compiled call check must not count as calls), over a capture whose forwards call ``a`` twice in
    one and skip ``b`` in the other: the compiled replay gives the eager replay's outputs and router gradients; the
    same forwards in the other order are refused as the block ends, the model's weights untouched."""
    model = _Checkpointed()
    plan = [(1, False), (0, True)]
    with mr.attach(model) as session:
        with torch.no_grad():
            routes = _captured(model, session, plan, _tokens())
        _move_routers(model)
        with session.replay(routes):
            want = _steps(model, model, plan)
        compiled = torch.compile(model, backend="eager")
        with session.replay(routes):
            got = _steps(model, compiled, plan)
        for (wo, wg), (go, gg) in zip(want, got, strict=True):
            torch.testing.assert_close(go, wo)
            torch.testing.assert_close(gg, wg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(mr.TokenMismatchError, match=r"compiled forward 1 .*'a\.router'"), session.replay(routes):
            _steps(model, compiled, plan[::-1])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert session.state == "idle"


@pytest.mark.reliability("silent replays")
@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("modes", ["eager,compiled,compiled", "compiled,eager,eager", "compiled,eager,compiled"])
def test_a_block_of_eager_and_compiled_forwards_that_swaps_two_captured_forwards_is_refused(modes: str) -> None:
    """A replay block whose forwards run some eager and some compiled, the first as captured and the two after it in
    each other's place (``a`` called twice in one, ``b`` skipped in the other: the same rows in all for ``a``):
    refused, whichever of them ran compiled, never forced on the other forward's calls."""
    model = _Loop()
    x = _tokens()
    with mr.attach(model) as session, torch.no_grad():
        routes = _captured(model, session, [(0, False), (1, False), (0, True)], x)
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(mr.TokenMismatchError), session.replay(routes):
            for (extra, skip), mode in zip([(0, False), (0, True), (1, False)], modes.split(","), strict=True):
                model.set(extra, skip)
                (model if mode == "eager" else compiled)(x)
        assert session.state == "idle"


# --- detach() under Ctrl-C ------------------------------------------------------------------------------------------


@pytest.mark.reliability("lifecycle")
def test_a_ctrl_c_in_detach_reaches_the_users_own_handler_once_and_the_handler_is_kept() -> None:
    """A notebook's own SIGINT handler (one that notes the interrupt and raises nothing): a Ctrl-C landing half-way
    through detach() waits until every forward is back, is handed to that handler once, and the handler is the one
    installed after detach, as before it; the model is left as it was."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    model, x = model_and_input()
    before = snapshot(model)
    seen: list[int] = []

    def notebooks(signum: int, frame: Any) -> None:
        seen.append(signum)

    real = session_module._restore_forward
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            signal.raise_signal(signal.SIGINT)
            assert seen == [], "the interrupt reached the handler before every forward was back"
        return real(*args, **kwargs)

    previous = signal.signal(signal.SIGINT, notebooks)
    try:
        session = mr.attach(model)
        with torch.no_grad(), session.capture():
            model(x)
        session_module._restore_forward = interrupted  # type: ignore[assignment]
        try:
            session.detach()
        finally:
            session_module._restore_forward = real  # type: ignore[assignment]
        assert seen == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is notebooks
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls[0] > 1
    assert not session.attached
    assert_untouched(model, before)
    assert ours_reachable(model) == []


@pytest.mark.reliability("lifecycle")
def test_detach_from_another_thread_than_the_main_one_detaches_whole() -> None:
    """detach() called from a worker thread (a data loader's, a server's): no signal handler can be set there, and
    it detaches whole all the same, the main thread's SIGINT handler untouched."""
    model, x = model_and_input()
    before = snapshot(model)
    handler = signal.getsignal(signal.SIGINT)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            session.detach()
        except BaseException as e:  # (handed to the test's thread)
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert errors == []
    assert not session.attached
    assert signal.getsignal(signal.SIGINT) is handler
    assert_untouched(model, before)
    assert ours_reachable(model) == []


# --- zeros read as a later choice of experts ------------------------------------------------------------------------


class _PerExpertSlotsGate(FlatCapacityGate):
    """A top-1 gate that hands its weights on as one tensor of ``capacity`` slots per expert (a list of E: no
    dimension of E, k or the tokens in any of them), with each slot's token: each expert's first ``capacity`` tokens
    in token order take its slots, and those past ``capacity - 1`` by score get the weight 0 in theirs."""

    def __init__(self, capacity: int = 3) -> None:
        super().__init__(capacity=capacity - 1)  # (a slot more than it keeps: a dropped token's weight 0)
        self.slots = capacity

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # type: ignore[override]
        w, idx = super().forward(x)
        c = self.slots
        weights, owners = [], []
        for e in range(self.num_experts):
            tok = (idx == e).nonzero().squeeze(-1)[:c]
            weights.append(w.new_zeros(c).index_put((torch.arange(tok.numel()),), w[tok]))
            owners.append(torch.cat([tok, torch.full((c - tok.numel(),), -1, dtype=torch.long)]))
        return weights, owners


class _PerExpertSlotsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _PerExpertSlotsGate()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, owners = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            used = owners[e] >= 0
            tok = owners[e][used]
            out = out.index_add(0, tok, weights[e][used, None] * expert(x[tok]))
        return out


@pytest.mark.reliability("silent replays")
def test_a_capacity_drop_by_score_into_a_list_of_each_experts_slots_is_refused() -> None:
    """Once silent: zeros were read as a choice of experts only in a tensor with a dimension of E, k or the tokens,
    so a gate that hands its weights on as a list of E tensors of each expert's slots (none of those sizes in any)
    had its capacity drop by score, a second choice from the current scores, replayed unrefused. A list, tuple or
    mapping of E lays its tensors along the experts: refused, as the same slots in one ``[E * capacity]`` buffer are."""
    assert_refused(Layers(_PerExpertSlotsBlock), _x(12), "chooses again from the current scores")


class _JitterFromAGenerator(_Router):
    """Draws one jitter item per token from a generator it holds: the runs that establish its decision on more
    tokens than a forward draw items no forward was given yet."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = self._items()
        self.closed = False

    def _items(self) -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            self.closed = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.tensor([float(next(self.noise)) for _ in range(x.shape[0])])
        logits = F.linear(x, self.weight) + 0.3 * torch.sin(j)[:, None] * torch.arange(8.0)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("the model is left as it was")
def test_a_generator_a_router_holds_closes_and_is_thrown_into_as_without_the_library() -> None:
    """Once an AttributeError: while items the runs that establish a decision drew wait for later forwards, the
    router's attribute holds a stand-in, which had no close() nor throw(). close() now closes the generator itself
    (its cleanup runs) and puts it back in the attribute; throw() while items wait is refused with a clear error,
    the items kept, as the generator stands past where the model's forwards left it; once none waits it throws."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_JitterFromAGenerator()), _Block(_JitterFromAGenerator()))
    own = [vars(b.router)["noise"] for b in model]
    with mr.attach(model) as session:  # (attached: the stand-in is in the attribute while items wait)
        with torch.no_grad(), session.capture():
            model(_XS[0][:1])  # (one token: the runs drew more than this forward)
        first, second = (b.router for b in model)
        assert vars(first)["noise"] is not own[0], "no item waits: the case this test is for does not arise"
        with pytest.raises(mr.MoEReplayError, match=r"thrown into"):
            first.noise.throw(ValueError("stop"))
        assert not first.closed
        first.noise.close()
        assert first.closed and vars(first)["noise"] is own[0]
        with pytest.raises(StopIteration):
            next(first.noise)
        while vars(second)["noise"] is not own[1]:  # (the forwards that follow are given every waiting item)
            next(second.noise)
        with pytest.raises(ValueError, match="stop"):
            second.noise.throw(ValueError("stop"))
        assert second.closed


@pytest.mark.reliability("the model is left as it was")
def test_a_generator_handed_back_at_detach_refuses_a_throw_while_items_wait() -> None:
    """Where items the runs drew still wait at detach, the router's attribute is given a plain generator of them and
    then the router's own; a throw into it before its first item is refused as a throw into the stand-in is (a
    generator not started would raise the exception without running a line), and close() closes the router's own."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_JitterFromAGenerator()), _Block(_JitterFromAGenerator()))
    own = [vars(b.router)["noise"] for b in model]
    with pytest.warns(RuntimeWarning), mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_XS[0][:1])
    first, second = (b.router for b in model)
    assert vars(first)["noise"] is not own[0], "no item waits: the case this test is for does not arise"
    with pytest.raises(mr.MoEReplayError, match=r"thrown into"):
        first.noise.throw(ValueError("stop"))
    second.noise.close()
    assert second.closed
