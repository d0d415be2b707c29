"""CUDA graphs: capture records every graph replay in order; replay reads from the device cursor.

A graph runs the kernels recorded when it was captured, whatever the session state is
when it is replayed: capture a graph in the state it should run in.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import moe_replay as mr

from .conftest import perturb_routers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BATCH, STEPS = 4, 12


def build() -> mr.models.MoETransformer:
    return mr.models.build("grouped_sigmoid", num_layers=3, first_dense_layers=1, expert_impl="dense").cuda()


def step_inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (BATCH, 1), generator=g).cuda() for _ in range(STEPS)]


def eager_routes(model: torch.nn.Module, session: mr.Session, inputs: list[torch.Tensor]) -> mr.Routes:
    with session.capture(), torch.no_grad():
        for ids in inputs:
            model(ids)
    return session.routes()


def warm_up(model: torch.nn.Module, static: torch.Tensor) -> None:
    """What CUDA graph capture needs first: a few eager runs on a side stream (session idle)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(side)


def graphed(model: torch.nn.Module, static: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One fixed-shape step captured into a graph, in the session's current state."""
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(static).logits
    return graph, out


def test_capture_inside_cuda_graph_records_every_replay_in_order() -> None:
    model, inputs = build(), step_inputs()
    with mr.attach(model, capacity=BATCH * STEPS) as session:
        expected = eager_routes(model, session, inputs)
        static = torch.zeros_like(inputs[0])
        warm_up(model, static)
        with session.capture():
            graph, out = graphed(model, static)
        assert session.routes().num_tokens == 0  # capturing a graph runs nothing
        logits = []
        with session.capture():
            for ids in inputs:
                static.copy_(ids)
                graph.replay()
                logits.append(out.clone())
        routes = session.routes()
        assert routes.equal(expected)
        with torch.no_grad():
            for ids, got in zip(inputs, logits, strict=True):
                assert torch.allclose(got, model(ids).logits, atol=1e-5)


def test_replay_inside_cuda_graph_consumes_from_the_device_cursor() -> None:
    model, inputs = build(), step_inputs()
    with mr.attach(model, capacity=BATCH * STEPS) as session:
        routes = eager_routes(model, session, inputs)
        perturb_routers(session, scale=3.0)
        assert not eager_routes(model, session, inputs).equal(routes)
        expected = []
        with session.replay(routes), torch.no_grad():
            for ids in inputs:
                expected.append(model(ids).logits)
        static = torch.zeros_like(inputs[0])
        warm_up(model, static)
        # strict: leaving checks that the graph replays consumed exactly the recorded rows
        with session.replay(routes), session.capture():
            graph, out = graphed(model, static)
            for ids, ref in zip(inputs, expected, strict=True):
                static.copy_(ids)
                graph.replay()
                assert torch.allclose(out, ref, atol=1e-5)
        assert session.routes().equal(routes)  # each replay read its own rows, in order


def test_reduce_overhead_compiled_decode_capture_and_replay() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = build(), step_inputs()
    with mr.attach(model, capacity=BATCH * STEPS) as session:
        expected = eager_routes(model, session, inputs)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        with session.capture(), torch.no_grad():
            for ids in inputs:
                torch.compiler.cudagraph_mark_step_begin()
                compiled(ids)
        assert session.routes().equal(expected)
        perturb_routers(session, scale=3.0)
        with session.replay(expected), session.capture(), torch.no_grad():
            for ids in inputs:
                torch.compiler.cudagraph_mark_step_begin()
                compiled(ids)
        assert session.routes().equal(expected)
    assert counters["inductor"]["cudagraph_skips"] == 0, "the compiled step did not run as a CUDA graph"
    torch._dynamo.reset()


def test_a_graph_step_larger_than_the_fixed_ring_raises_when_captured() -> None:
    """The host sees the graph being captured: a step whose rows alone overflow the ring fails there."""
    model = build()
    with mr.attach(model, capacity=BATCH - 1) as session:
        static = torch.zeros(BATCH, 1, dtype=torch.long, device="cuda")
        warm_up(model, static)
        with pytest.raises(
            mr.CaptureOverflowError, match=rf"each replay of the CUDA graph being captured would write {BATCH} rows"
        ):
            with session.capture():
                graphed(model, static)


def test_graph_replays_past_the_fixed_ring_are_reported_by_routes_with_the_capacity_that_holds_them() -> None:
    """Replays run no Python: routes() finds the overflow on the device counter and names the capacity needed."""
    model, inputs = build(), step_inputs()
    half = BATCH * STEPS // 2
    with mr.attach(model, capacity=half) as session:
        static = torch.zeros_like(inputs[0])
        warm_up(model, static)
        with session.capture():
            graph, _ = graphed(model, static)
        with session.capture():
            for ids in inputs:
                static.copy_(ids)
                graph.replay()
        with pytest.raises(
            mr.CaptureOverflowError,
            match=rf"wrote {BATCH * STEPS} rows.*fixed at {half} rows.*capacity={BATCH * STEPS} holds this run",
        ):
            session.routes()
        with pytest.raises(mr.CaptureOverflowError, match="cannot be replaced"):
            session.reserve(BATCH * STEPS)
    with mr.attach(model, capacity=1) as session:  # sized before the graph is captured, the run fits
        session.reserve(BATCH * STEPS)
        expected = eager_routes(model, session, inputs)
        static = torch.zeros_like(inputs[0])
        warm_up(model, static)
        with session.capture():
            graph, _ = graphed(model, static)
            for ids in inputs:
                static.copy_(ids)
                graph.replay()
        assert session.routes().equal(expected)


def test_eager_steps_then_graph_replays_in_one_capture_and_one_replay() -> None:
    """Eager steps count their rows on the host and leave the device cursors behind; a graph capture
    (torch.cuda.graph) brings them up to date first, so its replays write and read after the eager rows."""
    model, inputs = build(), step_inputs()
    first = 5  # eager steps before the graph
    with mr.attach(model, capacity=BATCH * STEPS) as session:
        expected = eager_routes(model, session, inputs)
        static = torch.zeros_like(inputs[0])
        warm_up(model, static)
        with session.capture():
            with torch.no_grad():
                for ids in inputs[:first]:
                    model(ids)
            graph, _ = graphed(model, static)
            for ids in inputs[first:]:
                static.copy_(ids)
                graph.replay()
        assert session.routes().equal(expected)
        perturb_routers(session, scale=3.0)
        assert not eager_routes(model, session, inputs).equal(expected)
        with session.replay(expected), torch.no_grad():
            want = [model(ids).logits for ids in inputs]
        got = []
        with session.replay(expected), session.capture():
            with torch.no_grad():
                got += [model(ids).logits for ids in inputs[:first]]
            graph, out = graphed(model, static)
            for ids in inputs[first:]:
                static.copy_(ids)
                graph.replay()
                got.append(out.clone())
        assert session.routes().equal(expected)  # each step read its own rows, in order
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_eager_steps_then_reduce_overhead_compiled_steps() -> None:
    """The same with torch.compile's CUDA graphs: the compiled code's first run counts the eager rows."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = build(), step_inputs()
    first = 5
    with mr.attach(model, capacity=BATCH * STEPS) as session:
        expected = eager_routes(model, session, inputs)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for state in ("capture", "replay"):
            if state == "replay":
                perturb_routers(session, scale=3.0)
            ctx = session.replay(expected) if state == "replay" else contextlib.nullcontext()
            with ctx, session.capture(), torch.no_grad():
                for ids in inputs[:first]:
                    model(ids)
                for ids in inputs[first:]:
                    torch.compiler.cudagraph_mark_step_begin()
                    compiled(ids)
            assert session.routes().equal(expected), state
    torch._dynamo.reset()


@pytest.mark.reliability("silent replays")
def test_a_router_with_twin_calls_is_refused_when_a_graph_is_captured() -> None:
    """A router whose ``torch.where`` picks between two top-k by its inputs' values: a graph replays that choice,
    and the call established eagerly was recorded at every replay. Capturing such a graph is refused."""
    from . import test_code_settings as settings
    from . import test_decisions as decisions
    from . import test_evidence as ev

    torch.manual_seed(0)
    model = ev.TwoLayers(lambda: settings.DenseBlock(decisions._ValueBranchRouter("where"))).cuda()
    with mr.attach(model, capacity=256) as session:
        session.verify(decisions._signed(0).cuda())
        static = decisions._signed(1).cuda()
        warm_up(model, static)
        graph = torch.cuda.CUDAGraph()
        refused = pytest.raises(mr.UnsupportedRouterError, match="other calls over its decision's width")
        with refused, session.capture(), torch.no_grad(), torch.cuda.graph(graph):
            model(static)
