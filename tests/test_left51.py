"""Defects noticed and left in an earlier round, each shown failing first: Ctrl-C windows where a router's forward or
a block's ``__enter__`` changed state before the ``try`` that undoes it was in place."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import _lean, _torch_compat
from moe_replay.intercept import NESTING, RouterHook, ScopedForward
from moe_replay.session import _Block

from .conftest import tried
from .test_decisions3 import D, Model, T
from .test_evidence import D as ED
from .test_evidence import RouterBlock, TwoLayers
from .test_evidence import T as ET
from .test_gaps50 import _code, _ctrl_c_after
from .test_inner_hooks import LoggedRenorm
from .test_lean import SeenModes
from .test_session_lifecycle import model_and_input

# --- Ctrl-C in a router's forward and as a block is entered ---------------------------------------------------------


def _hooks_of(model: nn.Module) -> dict[str, tuple[list[Any], list[Any], list[Any]]]:
    return {
        n: (
            list(m._forward_pre_hooks.items()),
            list(m._forward_hooks.items()),
            list(m._forward_pre_hooks_with_kwargs.items()),
        )
        for n, m in model.named_modules()
    }


def _hooked_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Model(LoggedRenorm()).eval(), torch.randn(T, D)


def _exact_after(session: mr.Session, model: nn.Module, x: torch.Tensor, hooks: Any) -> None:
    """Nothing of the interrupted forward is left: the model's hooks as they were, no block open, no router capturing,
    no mode on torch's stack, no lean state, Python's handler back; and the session captures and replays exactly."""
    assert _hooks_of(model) == hooks
    assert session._owner.blocks == 0
    assert not session._owner.entered
    assert session.state == "idle"
    assert not any(h.capturing or h.replaying for h in session._hooks)
    assert not _torch_compat.function_mode_stack()
    assert NESTING.lean is None and not NESTING.auditing
    assert _lean.SWAP.depth == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with torch.no_grad(), session.capture():
        want = model(x)
    routes = session.routes()
    with torch.no_grad(), session.replay(routes):
        got = model(x)
    assert torch.equal(got, want)


_FORWARD_LINES = {
    # the watch of the user's hooks inside the scope, installed before the try whose finally removes it
    "watch": ("watch.install()", _hooked_model),
    # an auditing forward's state and the lean wrappers' depth, set before the try that undoes them
    "audit": ("auditing, state.auditing = state.auditing, True", model_and_input),
}


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("window", list(_FORWARD_LINES))
def test_a_ctrl_c_in_a_routers_forward_leaves_no_watch_no_lean_state(window: str) -> None:
    """Once left wrong: a Ctrl-C landing in a router's forward just after it put a watch on the user's hooks inside
    its scope (or set a lean or auditing forward's state, or raised the lean wrappers' depth) and before the try that
    undoes it left the watch's hooks on the user's modules (the state set, the depth raised) for every later forward.
    The first forward that runs the line is interrupted there."""
    line, make = _FORWARD_LINES[window]
    model, x = make()
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    with _ctrl_c_after(_code(RouterHook._run), line) as sent, pytest.raises(KeyboardInterrupt):
        for _ in range(4):
            with torch.no_grad(), session.capture():
                model(x)
    assert sent, f"no forward ran the line {line!r}: it moved"
    _exact_after(session, model, x, hooks)
    session.detach()
    assert _hooks_of(model) == hooks


@pytest.mark.reliability("lifecycle")
@pytest.mark.xfail(
    strict=True,
    reason="a lean router forward (ScopedForward.__call__) raises the lean wrappers' depth, the nesting depth and "
    "the thread's lean router before the try that undoes them; holding Ctrl-C costs ~20 us a router forward there",
)
def test_a_ctrl_c_in_a_lean_routers_forward_leaves_no_lean_state() -> None:
    """A Ctrl-C landing in a lean router forward after it set this thread's lean router and before the try that
    clears it leaves the router set (every later torch call of the thread handed to it) and the depths raised."""
    model = TwoLayers(lambda: RouterBlock(SeenModes())).eval()
    x = torch.randn(ET, ED)
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    depth, swapped = NESTING.depth, _lean.SWAP.depth
    try:
        with (
            _ctrl_c_after(_code(ScopedForward.__call__), "state.lean = hook") as sent,
            pytest.raises(KeyboardInterrupt),
        ):
            for _ in range(4):
                with torch.no_grad(), session.capture():
                    model(x)
        assert sent, "no forward ran the line: it moved"
        _exact_after(session, model, x, hooks)
    finally:  # (what the interrupt leaves today is undone for the tests after this one)
        NESTING.lean, NESTING.depth = None, depth
        with _lean.SWAP.lock:
            _lean.SWAP.depth = swapped
            if swapped == 0:
                _lean.put_back()
        session.detach()


_ENTER_LINES = ["value = self._cm.__enter__()", "self._open = True"]


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("line", _ENTER_LINES)
def test_a_ctrl_c_as_a_block_is_entered_leaves_no_block_open(line: str) -> None:
    """Once left wrong: a Ctrl-C landing in a block's __enter__ after its context manager was entered and before the
    block knew itself open left the block open with no `with` to leave it (its __exit__ is not called when __enter__
    raises): the session stayed capturing until the block was garbage collected, and a traceback kept it."""
    model, x = _hooked_model()
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    kept: list[Any] = []
    with pytest.raises(KeyboardInterrupt) as info, _ctrl_c_after(_code(_Block.__enter__), line) as sent:
        with session.capture():
            pass
    kept.append(info.value.__traceback__)  # (a notebook keeps the last traceback: it must not keep the block open)
    assert sent, "the interrupt was never sent: the line moved"
    _exact_after(session, model, x, hooks)
    session.detach()
