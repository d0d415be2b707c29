"""Capture inside a CUDA-graphed decode step.

The reference model with ``expert_impl="dense"`` (every expert on every token, masked:
no host synchronisation) runs a fixed-shape decode step (``batch`` x 1 token over a
cache of ``past`` tokens). Three graphs of that step are captured:

* ``plain``: before any session is attached;
* ``capture``: with a session attached and capturing: each replay of the graph writes
  its rows into the rings through the device cursors;
* ``check``: like ``capture``, plus a forward hook per router copying its indices into
  a static tensor, read after every replay: the ground truth the rings are checked against.

``plain`` and ``capture`` are timed round-robin. Then the graphs replay over a sequence of
different inputs, and three checks count what they claim:

* ``check`` graph: its rings against its own hooks' indices, replay by replay (the same
  graph, so the same arithmetic: exact);
* ``capture`` graph, order: it replays the inputs, then the same inputs in reverse; the
  second capture must hold the first one's per-replay blocks of rows in reverse order
  (the same graph on the same input gives the same rows, so this counts the replays
  recorded in their own place, whatever the numerics);
* ``capture`` graph against the ``check`` graph, on the replays where both graphs gave a
  bitwise identical output: two graph builds may round differently (different memory
  addresses, different GEMM tiles), and with bf16 scores and 128 experts near-ties then
  flip experts, which is not a recording error; where the outputs agree the experts must;
* eager steps against their own hooks (the hooks stay registered, so every eager step
  fills them): exact.

Without CUDA (smoke mode only) a "graph" is the eager step called again, so the flow and
the checks still run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

import moe_replay as mr
from moe_replay.models import Experts

from .baselines import INDEX_OUTPUT
from .harness import Variant, kernels_active, summarise, time_variants, torch_ops

__all__ = ["Graph", "bench_graph"]


class Graph:
    """``fn`` captured in a CUDA graph (warmed up on a side stream); eager on other devices."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device, warmup: int = 3) -> None:
        self.fn = fn
        self.graph: Any = None
        if device.type != "cuda":
            self.out = fn()
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> None:
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()


@contextlib.contextmanager
def _dense(model: torch.nn.Module) -> Any:
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    old = [m.impl for m in experts]
    for m in experts:
        m.impl = "dense"
    try:
        yield
    finally:
        for m, impl in zip(experts, old, strict=True):
            m.impl = impl


def _copy_into(slot: torch.Tensor) -> Callable[..., None]:
    """A forward hook copying the router's indices into ``slot`` (and leaving the output alone)."""

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        slot.copy_(out[INDEX_OUTPUT].reshape(slot.shape))

    return hook


def _run_inputs(
    session: mr.Session,
    ids: torch.Tensor,
    inputs: torch.Tensor,
    run: Callable[[], Any],
    after: Callable[[], Any] = lambda: None,
) -> mr.Routes:
    """Capture ``run`` once per input (copied into the static ``ids`` first); the routes recorded."""
    with session.capture():
        for x in inputs:
            ids.copy_(x)
            run()
            after()
    return session.routes()


def _rows_in_order(
    routes: mr.Routes, expected: list[list[torch.Tensor]], batch: int, compare: list[bool] | None = None
) -> dict[str, Any]:
    """Compare each router's rows, replay by replay, with what each replay chose.

    ``compare``: the replays to compare (default all); ``compared`` counts them.
    """
    layers = [r.long() for r in routes.per_layer()]
    n = len(expected)
    compare = compare if compare is not None else [True] * n
    written_ok = all(r.shape[0] == n * batch for r in layers)
    matched = 0
    if written_ok:
        for i, per_router in enumerate(expected):
            matched += compare[i] and all(
                torch.equal(r[i * batch : (i + 1) * batch], e.cpu().reshape(batch, -1))
                for r, e in zip(layers, per_router, strict=True)
            )
    compared = sum(compare)
    return {
        "rows_per_router": [r.shape[0] for r in layers],
        "replays_matched": matched,
        "replays_compared": compared,
        "in_order": written_ok and matched == compared,
    }


def _blocks(routes: mr.Routes, batch: int) -> list[list[torch.Tensor]]:
    """Per replay, each router's rows (the ``expected`` form of :func:`_rows_in_order`)."""
    layers = [r.long() for r in routes.per_layer()]
    n = layers[0].shape[0] // batch if layers else 0
    return [[r[i * batch : (i + 1) * batch] for r in layers] for i in range(n)]


def _order_check(
    session: mr.Session, ids: torch.Tensor, inputs: torch.Tensor, graph: Graph, batch: int
) -> tuple[dict[str, Any], mr.Routes, list[torch.Tensor]]:
    """Replay ``graph`` over ``inputs`` then over them reversed: the rows must come back reversed.

    Returns the check, the forward-order routes and the graph's output of each replay.
    """
    outs: list[torch.Tensor] = []
    forward = _run_inputs(session, ids, inputs, graph.replay, lambda: outs.append(graph.out.clone()))
    backward = _run_inputs(session, ids, inputs.flip(0), graph.replay)
    check = _rows_in_order(backward, _blocks(forward, batch)[::-1], batch)
    return check, forward, outs


@torch.no_grad()
def bench_graph(
    model: torch.nn.Module,
    *,
    batch: int,
    past: int,
    reps: int,
    inner: int,
    replays: int,
    warmup: int = 1,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Time a graphed decode step with and without capture; check every replay was recorded in order."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    hd = cfg.hidden_size // cfg.num_heads
    kv = [
        tuple(torch.randn(batch, cfg.num_heads, past, hd, device=device, generator=g, dtype=dtype) for _ in "kv")
        for _ in range(cfg.num_layers)
    ]
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=g)

    def step() -> torch.Tensor:
        return model(ids, past_key_values=kv).logits

    result: dict[str, Any] = {"model": "reference", "shape": "decode-graph", "batch": batch, "past": past}
    result["graphed"] = device.type == "cuda"
    with _dense(model):
        plain = Graph(step, device)
        with mr.attach(model, capacity=batch * max(inner, replays)) as session, contextlib.ExitStack() as stack:
            routers = [s.module for s in session.sites]
            result.update(layers=len(routers), experts=cfg.num_experts, top_k=cfg.top_k, tokens=batch)
            step()  # one eager forward: the routers establish their decision before any graph is captured
            with session.capture():
                captured = Graph(step, device)
            compare = kernels_active(device)
            if compare:  # the same graph with the torch-op ring, to show what the kernels save
                with torch_ops(session.capture()):
                    captured_torch = Graph(step, device)
            # hooks stay registered to the end: an emulated "graph" (no CUDA) runs them on each replay
            slots = [torch.zeros(batch, cfg.top_k, dtype=torch.long, device=device) for _ in routers]
            hooks = [r.register_forward_hook(_copy_into(slot)) for r, slot in zip(routers, slots, strict=True)]
            stack.callback(lambda: [h.remove() for h in hooks])
            with session.capture():
                checked = Graph(step, device)

            variants = [
                Variant("plain_graph", nullcontext, plain.replay),
                Variant("capture_graph", session.capture, captured.replay),
            ]
            if compare:
                variants.append(Variant("capture_graph_torch", session.capture, captured_torch.replay))
            times = time_variants(
                variants, device=device, reps=reps, inner=inner, warmup=warmup, clock=clock, progress=progress
            )
            result["variants"] = summarise(times, "plain_graph")

            inputs = torch.randint(0, cfg.vocab_size, (replays, batch, 1), device=device, generator=g)
            expected: list[list[torch.Tensor]] = []
            check_outs: list[torch.Tensor] = []

            def truth() -> None:
                expected.append([s.clone() for s in slots])
                check_outs.append(checked.out.clone())

            check_graph = _rows_in_order(_run_inputs(session, ids, inputs, checked.replay, truth), expected, batch)
            order, routes, outs = _order_check(session, ids, inputs, captured, batch)
            same = [torch.equal(a, b) for a, b in zip(outs, check_outs, strict=True)]
            against_check = _rows_in_order(routes, expected, batch, same)
            if compare:
                torch_order, _, _ = _order_check(session, ids, inputs, captured_torch, batch)
            few = min(replays, 32)  # the eager step is slow (every expert on every token): a prefix
            eager_truth: list[list[torch.Tensor]] = []
            eager_routes = _run_inputs(
                session, ids, inputs[:few], step, lambda: eager_truth.append([s.clone() for s in slots])
            )
            eager = _rows_in_order(eager_routes, eager_truth, batch)
    result["checks"] = {
        "replays": replays,
        "check_graph_in_order": check_graph["in_order"],
        "check_graph_replays_matched": check_graph["replays_matched"],
        "capture_graph_in_order": order["in_order"],
        "capture_graph_replays_matched": order["replays_matched"],
        "capture_graph_torch_replays_matched": torch_order["replays_matched"] if compare else None,
        "capture_vs_check_compared": against_check["replays_compared"],
        "capture_vs_check_matched": against_check["replays_matched"],
        "eager_replays": few,
        "eager_replays_matched": eager["replays_matched"],
        "rows_per_router": order["rows_per_router"],
    }
    result["bytes_per_token"] = {
        "moe_replay": sum(mr.index_dtype(s.num_experts).itemsize * s.top_k for s in session.sites)
    }
    return result
