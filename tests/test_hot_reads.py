"""The torch state a lean router's forward reads at every call, read with fewer calls: still what torch says.

The hot path of a router forward (``ScopedForward.__call__``) asks torch at every call whether a tracer runs
(``jit.trace``, ``make_fx``, ``fx.symbolic_trace``) and whether a CUDA stream is capturing, which needs to know
whether this process is a forked child of one that had initialised CUDA. The tracing question is spelled there in
parts, with no Python frame of its own; the fork's answer is kept in a field that a fork handler sets in the child.
These tests hold both to what torch's own functions say, and a traced router to its refusal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import moe_replay as mr
from moe_replay import _torch_compat

from .conftest import tried
from .test_compile import _FxMoE


def _tracing_in_parts() -> bool:
    """The hot path's spelling of ``_torch_compat.tracing()``."""
    tc = _torch_compat
    return bool(tc.jit_tracing() or (tc.dispatch_modes() != 0 and tc.tracing()) or tc.FX._is_fx_tracing_flag)


class _Passing(TorchDispatchMode):
    """A dispatch mode that is no tracer (as selective checkpointing's, or a FLOP counter's, is)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _tracers() -> dict[str, Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], Any]]:
    """Ways to run a function: under each tracer the hot path asks about, and under none."""

    def symbolic(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Any:
        class Wrap(torch.nn.Module):
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return fn(t)

        return torch.fx.symbolic_trace(Wrap())

    def under_mode(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Any:
        with _Passing():
            return fn(x)

    return {
        "none": lambda fn, x: fn(x),
        "jit.trace": lambda fn, x: torch.jit.trace(fn, (x,), check_trace=False),
        "make_fx": lambda fn, x: make_fx(fn)(x),
        "fx.symbolic_trace": symbolic,
        "a dispatch mode that traces nothing": under_mode,
    }


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tracer", list(_tracers()))
def test_the_hot_paths_tracing_in_parts_says_what_tracing_says(tracer: str) -> None:
    seen: list[tuple[bool, bool]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append((_tracing_in_parts(), bool(_torch_compat.tracing())))
        return x * 2

    _tracers()[tracer](fn, torch.randn(3, 4))
    tried(len(seen))
    assert seen and all(parts == whole for parts, whole in seen), seen
    assert all(whole == (tracer not in ("none", "a dispatch mode that traces nothing")) for _, whole in seen)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tracer", ["jit.trace", "make_fx", "fx.symbolic_trace"])
def test_a_model_traced_inside_a_block_where_its_routers_are_lean_is_refused(tracer: str) -> None:
    """A router established without gradients takes the lean hot path at its later forwards: a tracer running the
    model there (inside a capture or a replay block, without gradients) is told by that path's own reads of torch's
    state, and refused as an export is, never recorded into a program that routes natively."""
    torch.manual_seed(0)
    model = _FxMoE()
    x = torch.randn(3, 5, 8)
    tracers: dict[str, Callable[[], Any]] = {
        "jit.trace": lambda: torch.jit.trace(model, (x,), check_trace=False),
        "make_fx": lambda: make_fx(model)(x),
        "fx.symbolic_trace": lambda: torch.fx.symbolic_trace(model),
    }
    with mr.attach(model, include="routers.*", top_k=2, num_experts=6) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(x)
        routes = session.routes()
        for block in (session.capture, lambda: session.replay(routes[: x.shape[0] * x.shape[1]], strict=False)):
            with pytest.raises(mr.UnsupportedRouterError, match="is being exported"), block():
                tracers[tracer]()
            tried(1)
        with session.capture():  # and the lean path is taken again afterwards, recording as before
            model(x)
        assert session.routes().equal(routes[: x.shape[0] * x.shape[1]])


@pytest.mark.reliability("faults")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_the_forks_answer_kept_for_the_hot_path_is_read_again_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FORK.bad`` stands for torch's bad-fork flag at every router forward: it changes only at a fork,
    and the child reads torch's flag again before it runs on (the parent's field is left as it was)."""
    before = _torch_compat.FORK.bad
    assert before is bool(_torch_compat.bad_fork())
    for answer in (True, False):
        monkeypatch.setattr(_torch_compat, "bad_fork", lambda answer=answer: answer)  # (what torch's flag says there)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the field, and leave at once
            try:
                os.write(write, b"1" if _torch_compat.FORK.bad else b"0")
            finally:
                os._exit(0)
        os.close(write)
        try:
            got = os.read(read, 1)
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        tried(1)
        assert got == (b"1" if answer else b"0")
        assert _torch_compat.FORK.bad is before


def test_compiled_code_reads_the_forks_kept_answer_as_it_is_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """``graph_capturing()`` may be compiled as a frame of its own (dynamo falling back frame by frame): dynamo reads
    the kept answer whole (no graph break) and guards on it, so a changed answer is read again, not baked in."""

    @torch.compile(backend="eager", fullgraph=True)
    def branch(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if _torch_compat.FORK.bad else x - 1

    want = _torch_compat.FORK.bad
    assert branch(torch.zeros(1)).item() == (1.0 if want else -1.0)
    monkeypatch.setattr(_torch_compat.FORK, "bad", not want)
    assert branch(torch.zeros(1)).item() == (-1.0 if want else 1.0)


@pytest.mark.reliability("faults")
def test_a_lean_router_asks_the_stream_only_where_cuda_is_up_and_the_process_is_no_bad_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on a CUDA host (CUDA initialised, stubbed here): each lean router call asks whether the stream is capturing,
    unless the kept answer says this is a forked child of a process that had initialised CUDA, where torch's stream
    query would fail; nothing asks torch's bad-fork flag itself at a router call."""
    from moe_replay import intercept

    torch.manual_seed(0)
    model = _FxMoE()
    x = torch.randn(3, 5, 8)
    asked: list[str] = []

    class _Up:
        _initialized = True

    with mr.attach(model, include="routers.*", top_k=2, num_experts=6) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(x)  # (established, and lean)
        monkeypatch.setattr(intercept, "_CUDA", _Up())
        monkeypatch.setattr(intercept, "_cuda_capturing", lambda: asked.append("stream") or False)
        monkeypatch.setattr(_torch_compat, "bad_fork", lambda: asked.append("fork") or False)
        for bad in (False, True):
            asked.clear()
            monkeypatch.setattr(_torch_compat.FORK, "bad", bad)
            with session.capture():
                model(x)
            tried(1)
            assert asked == ([] if bad else ["stream"] * len(model.routers)), (bad, asked)
