"""Faults: exceptions mid-forward, re-entrance, threads. The session stays usable and honest.

What a failed forward leaves (documented in docs/reliability.md and in ``Session.capture``):

* capture: the rows of the routers that ran before the exception stay in the rings
  (nothing is rewound); the capture is marked interrupted, so ``routes()`` refuses it
  unless ``allow_partial=True`` and ``capture(clear=False)`` cannot append to it;
* replay: an exception that leaves the block ends the replay: its consumption is dropped
  with it and the next replay starts at row 0. Caught inside the block, the routers are
  out of step, and a strict replay reports it (at the forward or at the block's end);
* either way the rows kept for activation-checkpoint recomputes are dropped.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr

from .conftest import assert_untouched, snapshot, tried
from .tinymoe import FAULT_POINTS, Fault, RouterSpec, TinyMoE

SPECS = [
    RouterSpec(8, 2),
    RouterSpec(6, 1, "argmax"),
    RouterSpec(16, 3, "grouped", n_group=4, topk_group=2),
]
LEAD = (2, 5)
TOKENS = 10
EXCEPTIONS = {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}


def _grad_ctx(grad: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if grad else torch.no_grad()


def _at_every_fault(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` for each fault point x layer x exception type x with/without gradients."""
    test = pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])(test)
    test = pytest.mark.parametrize("exc", list(EXCEPTIONS), ids=list(EXCEPTIONS))(test)
    test = pytest.mark.parametrize("layer", [0, 1, 2])(test)
    test = pytest.mark.parametrize("point", FAULT_POINTS)(test)
    return pytest.mark.reliability("faults")(test)


def _routers_that_ran(layer: int, point: str) -> int:
    return layer + 1 if point in ("in_router_after_decision", "in_experts") else layer


@_at_every_fault
def test_exception_mid_capture(point: str, layer: int, exc: str, grad: bool) -> None:
    """An exception mid-capture keeps the rows of the routers that ran, flags the capture, and nothing else changes."""
    model = TinyMoE(SPECS)
    before = snapshot(model)
    x = model.inputs(LEAD)
    session = mr.attach(model)
    with _grad_ctx(grad), session.capture():
        expected_out = model(x)
    expected = session.routes()

    model.inject(Fault(layer, point, EXCEPTIONS[exc]("injected fault")))
    with pytest.raises(EXCEPTIONS[exc], match="injected fault") as err, _grad_ctx(grad):
        with session.capture():
            model(x)
    assert type(err.value) is EXCEPTIONS[exc]  # the model's own exception, not one of ours
    assert session.state == "idle"
    with pytest.raises(mr.SessionStateError, match=rf"interrupted by {exc}\('injected fault'\).*allow_partial=True"):
        session.routes()
    with pytest.raises(mr.SessionStateError, match=r"capture\(clear=False\) cannot append"):
        with session.capture(clear=False):
            pass
    partial = session.routes(allow_partial=True)
    ran = _routers_that_ran(layer, point)
    assert partial.tokens_per_layer == tuple(TOKENS if i < ran else 0 for i in range(len(SPECS)))
    for i in range(ran):
        assert torch.equal(partial.per_layer()[i], expected.per_layer()[i])

    model.inject(None)
    with _grad_ctx(grad), session.capture():  # a new capture starts clean
        out = model(x)
    assert torch.equal(out, expected_out) and session.routes().equal(expected)
    with _grad_ctx(grad), session.replay(expected), session.capture():
        out = model(x)
    assert torch.equal(out, expected_out) and session.routes().equal(expected)
    session.detach()
    model.zero_grad(set_to_none=True)
    assert_untouched(model, before)


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_exception_mid_capture_caught_inside_the_block_flags_the_capture(point: str, layer: int) -> None:
    """Once silent: a forward that raised inside a capture block, caught there and run again (a retry after an
    out-of-memory error), left the rows of the routers that ran before the exception among the others', and
    routes() returned the routers' rows out of line with no error. It flags the capture as an exception that
    leaves the block does; a forward that raised before any router recorded a row leaves the capture whole."""
    model = TinyMoE(SPECS)
    x = model.inputs(LEAD)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    expected = session.routes()
    with torch.no_grad(), session.capture():
        model.inject(Fault(layer, point, RuntimeError("injected fault")))
        with pytest.raises(RuntimeError, match="injected fault"):
            model(x)
        model.inject(None)
        model(x)  # the retry
    ran = _routers_that_ran(layer, point)
    if ran == 0:
        assert session.routes().equal(expected)
    else:
        with pytest.raises(
            mr.SessionStateError, match=r"interrupted by RuntimeError\('injected fault'\).*caught inside"
        ):
            session.routes()
        partial = session.routes(allow_partial=True)
        assert partial.tokens_per_layer == tuple(2 * TOKENS if i < ran else TOKENS for i in range(len(SPECS)))
    session.detach()


@_at_every_fault
def test_exception_mid_replay(point: str, layer: int, exc: str, grad: bool) -> None:
    """An exception mid-replay ends the replay; the next replay starts at row 0 and forces every row."""
    model = TinyMoE(SPECS)
    x = model.inputs(LEAD)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    routes = session.routes()
    model.perturb(scale=3.0)
    before = snapshot(model)
    with torch.no_grad():
        forced_out = model(x, forced=list(routes.per_layer()))  # the hand-written gather reference

    with _grad_ctx(grad):
        model(x)  # each router's decision is established in this grad mode before the fault goes in
    model.inject(Fault(layer, point, EXCEPTIONS[exc]("injected fault")))
    with pytest.raises(EXCEPTIONS[exc], match="injected fault") as err, _grad_ctx(grad):
        with session.replay(routes), session.capture():
            model(x)
    assert type(err.value) is EXCEPTIONS[exc]  # not masked by a consumption error
    assert session.state == "idle"
    assert session.routes(allow_partial=True).tokens_per_layer[: _routers_that_ran(layer, point)] == (TOKENS,) * (
        _routers_that_ran(layer, point)
    )

    model.inject(None)
    with _grad_ctx(grad), session.replay(routes), session.capture():
        out = model(x)
    assert session.routes().equal(routes)
    assert torch.equal(out, forced_out)
    session.detach()
    model.zero_grad(set_to_none=True)
    assert_untouched(model, before)


@pytest.mark.reliability("faults")
def test_failure_caught_inside_the_replay_block_is_reported() -> None:
    """A failed forward caught inside a strict replay puts routers out of step: the next forward or the exit says so."""
    model = TinyMoE(SPECS)
    x = model.inputs(LEAD)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        # (routes for the block, what the out-of-step routers report)
        cases = [
            # retrying the failed forward: router 0 already consumed its rows
            (routes, r"'layers\.0\.router' needs rows 10\.\.19 but only 10"),
            # going on with the next forward: routers 1 and 2 read the failed forward's rows
            (mr.Routes.cat([routes, routes]), r"'layers\.1\.router' consumed 10 of 20 rows"),
        ]
        for block_routes, pattern in cases:
            with pytest.raises(mr.ReplayConsumptionError, match=pattern):
                with session.replay(block_routes):
                    model.inject(Fault(1, "before_router"))
                    with pytest.raises(RuntimeError, match="injected fault"):
                        model(x)
                    model.inject(None)
                    model(x)
            tried()
        with session.replay(routes), session.capture():  # and the session is still fine
            model(x)
        assert session.routes().equal(routes)


# ----------------------------------------------------------------------------- checkpointing
class _Checkpointed(nn.Module):
    """A decoder layer run under non-reentrant activation checkpointing."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return checkpoint(self.inner, *args, use_reentrant=False)


def _checkpointed(style: str) -> mr.models.MoETransformer:
    # dense experts: a recompute with the wrong rows saves tensors of the same shapes, so
    # checkpointing itself cannot notice; only the gradients can
    model = mr.models.build(style, num_layers=2, expert_impl="dense")
    model.layers = nn.ModuleList(_Checkpointed(layer) for layer in model.layers)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: nn.Module, x: torch.Tensor, ctx: contextlib.AbstractContextManager) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with ctx:
        model(x, labels=x).loss.backward()
    return _grads(model)


def _fail_experts(model: nn.Module) -> nn.Module:
    experts = model.layers[1].inner.mlp.experts

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    experts.forward = boom
    return experts


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("mode", ["capture", "replay"])
def test_failed_forward_leaves_no_recompute_rows(mode: str, tokens: torch.Tensor) -> None:
    """After a block left by an exception, checkpoint recomputes of later forwards get their own rows."""
    model = _checkpointed("softmax_topk")
    before = snapshot(model)
    other = torch.randint(0, 128, tokens.shape, generator=torch.Generator().manual_seed(5))
    plain = _step(copy.deepcopy(model), tokens, contextlib.nullcontext())
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(tokens)
    routes = session.routes().with_token_ids(None)  # (replayed below on other tokens too: no token check)

    def block() -> contextlib.AbstractContextManager:
        return session.capture() if mode == "capture" else session.replay(routes)

    expected = _step(model, tokens, block())
    experts = _fail_experts(model)
    with pytest.raises(RuntimeError, match="injected fault"):
        with block():
            model(other, labels=other)  # layer 0 ran (and was checkpointed) before the failure
    del experts.forward
    assert _same(_step(model, tokens, block()), expected)
    assert _same(_step(model, tokens, contextlib.nullcontext()), plain)  # idle: untouched by the failure
    session.detach()
    model.zero_grad(set_to_none=True)
    assert_untouched(model, before)


@pytest.mark.reliability("faults")
def test_failure_caught_inside_a_block_leaves_no_recompute_rows(tokens: torch.Tensor) -> None:
    """A failed forward caught inside a capture does not hand its rows to the next forward's recompute."""
    model = _checkpointed("softmax_topk")
    other = torch.randint(0, 128, tokens.shape, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        expected = _step(model, tokens, session.capture())
        experts = _fail_experts(model)
        model.zero_grad(set_to_none=True)
        with session.capture():
            with pytest.raises(RuntimeError, match="injected fault"):
                model(other, labels=other)
            del experts.forward
            model(tokens, labels=tokens).loss.backward()
        assert _same(_grads(model), expected)


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("style", mr.models.STYLES)
def test_checkpointed_capture_records_each_token_once(style: str, tokens: torch.Tensor) -> None:
    """Capture under activation checkpointing, backward inside the block: one row per token, replay exact."""
    model = _checkpointed(style)
    with mr.attach(model) as session:
        with session.capture():
            model(tokens, labels=tokens).loss.backward()
        routes = session.routes()
        assert routes.tokens_per_layer == (tokens.numel(),) * 2
        with session.replay(routes):
            model(tokens, labels=tokens).loss.backward()


# ----------------------------------------------------------------------------- re-entrance
@pytest.mark.reliability("re-entrance")
@pytest.mark.parametrize("target", ["same model", "submodule", "parent", "model sharing a router"])
def test_second_session_is_refused(target: str, tokens: torch.Tensor) -> None:
    """A second session on the model, a submodule, a parent or a model sharing a router: refused; the first works on."""
    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    first = mr.attach(model.layers[1] if target == "parent" else model)
    second = {
        "same model": model,
        "submodule": model.layers[1],
        "parent": model,
        "model sharing a router": nn.ModuleDict({"mlp": model.layers[1].mlp}),
    }[target]
    pattern = "already has an attached session" if target == "same model" else "already intercepted by another session"
    with pytest.raises(mr.SessionStateError, match=pattern):
        mr.attach(second)
    with first.capture():
        ref = model(tokens).logits
    routes = first.routes()
    with first.replay(routes), first.capture():
        assert torch.equal(model(tokens).logits, ref)
    assert first.routes().equal(routes)
    first.detach()
    mr.attach(second).detach()  # free again once the first one is gone
    assert_untouched(model, before)


@pytest.mark.reliability("re-entrance")
@pytest.mark.parametrize("outer", ["capture", "replay"])
def test_verify_inside_a_block_is_refused(outer: str, tokens: torch.Tensor) -> None:
    """verify() inside capture() or replay() is refused, and the block goes on recording."""
    model = mr.models.build("topk_softmax", num_layers=2)
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        routes = session.routes()
        block = session.capture() if outer == "capture" else session.replay(routes)
        with block:
            with pytest.raises(mr.SessionStateError, match="idle session"):
                session.verify(tokens)
            model(tokens)
        assert session.state == "idle"
        if outer == "capture":
            assert session.routes().equal(routes)


# ----------------------------------------------------------------------------- threads
@pytest.mark.reliability("concurrency")
def test_sessions_in_threads_stay_independent() -> None:
    """Sessions on two models in two threads capture and replay at once; a third thread's plain top-k is untouched."""
    iterations = 30
    specs = [
        [RouterSpec(8, 2), RouterSpec(12, 3, "topk_softmax")],
        [RouterSpec(8, 2, "sigmoid_topk"), RouterSpec(16, 3, "grouped", n_group=4, topk_group=2)],
    ]
    models = [TinyMoE(s, seed=i) for i, s in enumerate(specs)]
    plain = TinyMoE(specs[0], seed=7)  # same router names and shapes as model 0, never attached
    inputs = [[m.inputs((3, 4), seed=100 * i + j) for j in range(iterations)] for i, m in enumerate(models)]
    plain_x = plain.inputs((3, 4), seed=999)
    with torch.no_grad():
        plain_out = plain(plain_x)
    # expected results, computed one thread at a time
    expected: list[list[tuple[mr.Routes, torch.Tensor]]] = []
    sessions = [mr.attach(m) for m in models]
    for m, s, xs in zip(models, sessions, inputs, strict=True):
        rows = []
        for x in xs:
            with torch.no_grad(), s.capture():
                m(x)
            routes = s.routes()
            with torch.no_grad():
                perturbed = copy.deepcopy(m)
                perturbed.perturb(scale=3.0)
                rows.append((routes, perturbed(x, forced=list(routes.per_layer()))))
        expected.append(rows)
        m.perturb(scale=3.0)  # replays below must force the recorded experts

    barrier = threading.Barrier(3)
    errors: list[str] = []

    def attached(i: int) -> None:
        m, s = models[i], sessions[i]
        try:
            for j in range(iterations):
                barrier.wait()
                routes, forced_out = expected[i][j]
                with torch.no_grad(), s.replay(routes), s.capture():
                    out = m(inputs[i][j])
                if not s.routes().equal(routes) or not torch.equal(out, forced_out):
                    errors.append(f"model {i}, iteration {j}: wrong routes or output")
        except BaseException as e:  # reported below, in the main thread
            errors.append(f"model {i}: {type(e).__name__}: {e}")
            barrier.abort()

    def unattached() -> None:
        try:
            for j in range(iterations):
                barrier.wait()
                with torch.no_grad():
                    if not torch.equal(plain(plain_x), plain_out):
                        errors.append(f"plain model, iteration {j}: output changed")
        except BaseException as e:
            errors.append(f"plain model: {type(e).__name__}: {e}")
            barrier.abort()

    threads = [threading.Thread(target=attached, args=(i,)) for i in range(2)] + [threading.Thread(target=unattached)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for s in sessions:
        s.detach()
    assert not errors, errors[:5]
    tried(3 * iterations)


THREADS = 4


def _run_threads(target: Callable[[int], None], n: int = THREADS) -> list[str]:
    errors: list[str] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # reported by the main thread
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


@pytest.mark.reliability("concurrency")
def test_threads_forwarding_one_model_inside_one_capture_are_refused() -> None:
    """4 threads forward one model inside the main thread's capture: each refused; the main thread's rows exact."""
    forwards, main_forwards = 60, 40
    model = TinyMoE(SPECS)
    xs = [model.inputs(LEAD, seed=j) for j in range(main_forwards)]
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        for x in xs:
            model(x)
    expected = session.routes()
    assert expected.num_tokens == main_forwards * TOKENS

    outcomes: list[str] = []
    start = threading.Barrier(THREADS + 1)
    lock = threading.Lock()

    def worker(i: int) -> None:
        start.wait()
        for j in range(forwards):
            try:
                with torch.no_grad():
                    model(model.inputs(LEAD, seed=1000 * i + j))
            except mr.SessionStateError as e:
                assert "its own model and session" in str(e), str(e)
                outcome = "refused"
            else:
                outcome = "ran"  # only possible outside the main thread's block
            with lock:
                outcomes.append(outcome)
        with pytest.raises(mr.SessionStateError, match=r"routes\(\) in thread"):
            session.routes()  # the main thread holds its block until every worker is done

    workers = [threading.Thread(target=lambda i=i: _catch(worker, i, outcomes)) for i in range(THREADS)]
    for t in workers:
        t.start()
    with torch.no_grad(), session.capture():
        start.wait()
        for x in xs:
            model(x)
        for t in workers:  # the block stays open until every worker is done
            t.join(timeout=300)
        got = session.routes()
    session.detach()
    assert not [o for o in outcomes if o.startswith("error")], outcomes[:5]
    assert outcomes.count("refused") == THREADS * forwards, outcomes[:5]
    assert got.equal(expected)  # every row of every forward that ran, in order, in every router
    assert len(set(got.tokens_per_layer)) == 1
    tried(THREADS * forwards + main_forwards)


def _catch(fn: Callable[[int], None], i: int, log: list[str]) -> None:
    try:
        fn(i)
    except BaseException as e:
        log.append(f"error in thread {i}: {type(e).__name__}: {e}")


@pytest.mark.reliability("concurrency")
def test_threads_racing_for_one_session_record_consistently_or_are_refused() -> None:
    """4 threads race to capture on one model's session, 75 rounds: each capture exact in every router, or refused."""
    rounds = 75
    model = TinyMoE(SPECS)
    xs = [[model.inputs((i + 1, 3), seed=100 * i + j) for j in range(rounds)] for i in range(THREADS)]
    session = mr.attach(model)
    expected = []
    for i in range(THREADS):
        per = []
        for j in range(rounds):
            with torch.no_grad(), session.capture():
                model(xs[i][j])
            per.append(session.routes())
        expected.append(per)
    barrier = threading.Barrier(THREADS)
    won = [0] * rounds
    refused = [0] * THREADS
    lock = threading.Lock()

    def racer(i: int) -> None:
        for j in range(rounds):
            barrier.wait()
            try:
                with torch.no_grad(), session.capture():
                    model(xs[i][j])
                    got = session.routes()
            except mr.SessionStateError as e:
                assert "its own model and session" in str(e), str(e)
                refused[i] += 1
                continue
            assert got.equal(expected[i][j]), f"thread {i}, round {j}: rows differ"
            with lock:
                won[j] += 1

    errors = _run_threads(racer)
    session.detach()
    assert not errors, errors[:5]
    assert all(w >= 1 for w in won)  # each round someone recorded, exactly
    assert sum(won) + sum(refused) == THREADS * rounds
    tried(THREADS * rounds)


@pytest.mark.reliability("concurrency")
def test_a_block_left_open_by_a_thread_that_ended_is_named_with_the_way_out() -> None:
    """Once a block entered by hand in a worker thread that then ended refused every later call with "give each
    thread its own model and session", as if the thread still ran: the error now says that thread ended with
    the block open and how to leave it, and leaving it gives the session back, capture intact."""
    model = TinyMoE(SPECS)
    before = snapshot(model)
    x = model.inputs(LEAD, seed=0)
    session = mr.attach(model)
    held: dict[str, contextlib.AbstractContextManager] = {}

    def worker() -> None:
        held["block"] = session.capture()
        held["block"].__enter__()
        with torch.no_grad():
            model(x)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    for call in (lambda: model(x), session.routes, session.detach):
        with pytest.raises(mr.SessionStateError, match=r"which has ended, left a block.*__exit__\(None, None, None\)"):
            with torch.no_grad():
                call()
    held.pop("block").__exit__(None, None, None)
    assert session.routes().num_tokens == TOKENS
    with torch.no_grad(), session.replay(session.routes()), session.capture():
        model(x)
    session.detach()
    assert_untouched(model, before)


@pytest.mark.reliability("concurrency")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_asyncio_tasks_whose_forwards_would_interleave_in_one_block_are_refused(block: str) -> None:
    """Once silent: asyncio tasks share a thread, so a forward from a sibling task while the task that opened a
    capture or replay waited at an await, or from two tasks the block gathered, forwarding in turn, ran in the
    block: a capture recorded their rows mixed, a replay gave one task's rows to the other. Each is now refused,
    the block's own rows stay exact; a task awaited to its end (wait_for), awaits with no other forward, and a
    block entered by hand in a task that has since ended (a notebook cell) still run."""
    import asyncio

    model = TinyMoE(SPECS)
    before = snapshot(model)
    x1, x2 = model.inputs(LEAD, seed=1), model.inputs(LEAD, seed=2)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x1)
        model(x1)
    expected = session.routes()
    one = expected[:TOKENS]

    @contextlib.contextmanager
    def opened(forwards: int = 2) -> Iterator[None]:
        if block == "capture":
            with torch.no_grad(), session.capture():
                yield
        else:
            with torch.no_grad(), session.replay(mr.Routes.cat([one] * forwards)), session.capture():
                yield

    async def forward(x: torch.Tensor, pause: float = 0.0) -> None:
        await asyncio.sleep(pause)
        with torch.no_grad():
            model(x)

    async def own(*gaps: Callable[[], Any], child: bool = False) -> None:
        with opened(3 if child else 2):
            model(x1)
            for gap in gaps:
                await gap()
            model(x1)

    async def siblings() -> list[object]:
        return await asyncio.gather(own(lambda: asyncio.sleep(0.01)), forward(x2), return_exceptions=True)

    outcome = asyncio.run(siblings())
    assert outcome[0] is None and isinstance(outcome[1], mr.SessionStateError), outcome
    assert "running forward(), while the task that opened a block" in str(outcome[1])
    assert "running own(), waits at an await" in str(outcome[1])
    assert session.routes().equal(expected)  # the block's own forwards, none of the sibling's

    async def rollout(x: torch.Tensor) -> None:  # a decode loop that awaits between its steps
        await forward(x)
        await forward(x)

    async def gathered() -> None:  # two tasks of the block forward in turn
        with opened(4):
            await asyncio.gather(rollout(x1), rollout(x1))

    with pytest.raises(mr.SessionStateError, match=r"running rollout\(\), while another task started inside"):
        asyncio.run(gathered())

    async def both() -> None:
        await asyncio.gather(rollout(x1), rollout(x1))

    with pytest.raises(mr.SessionStateError, match="another task started inside"), opened(4):
        asyncio.run(both())  # a block opened outside the event loop: its tasks too

    async def unawaited() -> None:  # the opener forwards while a task it started is half-way
        with opened():
            task = asyncio.create_task(forward(x1))
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # (the task runs its forward, then waits)
            model(x1)
            await task

    async def slow(x: torch.Tensor) -> None:
        with torch.no_grad():
            model(x)
        await asyncio.sleep(0.05)

    async def unawaited_slow() -> None:
        with opened():
            task = asyncio.create_task(slow(x1))
            await asyncio.sleep(0.01)
            model(x1)
            await task

    with pytest.raises(mr.SessionStateError, match="another task started inside a block"):
        asyncio.run(unawaited_slow())
    asyncio.run(unawaited())  # its task had ended before the opener's forward: one after the other
    assert session.routes().equal(expected)

    asyncio.run(own(lambda: asyncio.wait_for(forward(x1), 1), child=True))  # a task awaited to its end
    assert session.routes().equal(mr.Routes.cat([one] * 3))
    asyncio.run(own(lambda: asyncio.sleep(0)))  # awaits of the opener alone
    assert session.routes().equal(expected)

    held: dict[str, contextlib.AbstractContextManager] = {}

    async def enter() -> None:  # a cell that enters a block by hand and ends
        held["block"] = session.capture() if block == "capture" else session.replay(expected)
        held["block"].__enter__()

    async def cells() -> None:
        await asyncio.create_task(enter())
        await asyncio.create_task(forward(x1))
        await asyncio.create_task(forward(x1))
        held.pop("block").__exit__(None, None, None)

    asyncio.run(cells())
    if block == "capture":
        assert session.routes().equal(expected)
    session.detach()
    assert_untouched(model, before)
    tried(7)


@pytest.mark.reliability("concurrency")
def test_one_model_and_session_per_thread_at_scale() -> None:
    """4 threads, each with its own model and session, 100 captures and replays each: all exact."""
    iterations = 100
    models = [TinyMoE(SPECS, seed=i) for i in range(THREADS)]
    xs = [[m.inputs((2, 3), seed=10 * i + j) for j in range(iterations)] for i, m in enumerate(models)]
    sessions = [mr.attach(m) for m in models]
    expected = []
    for m, s, inputs in zip(models, sessions, xs, strict=True):
        with torch.no_grad(), s.capture():
            for x in inputs:
                m(x)
        expected.append(s.routes())
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        m, s = models[i], sessions[i]
        barrier.wait()
        for j in range(iterations):
            with torch.no_grad(), s.capture():
                m(xs[i][j])
            r = s.routes()
            assert r.equal(expected[i][j * 6 : (j + 1) * 6]), f"thread {i}, forward {j}"
            with torch.no_grad(), s.replay(r), s.capture():
                m(xs[i][j])
            assert s.routes().equal(r)

    errors = _run_threads(worker)
    for s in sessions:
        s.detach()
    assert not errors, errors[:5]
    tried(THREADS * iterations)
