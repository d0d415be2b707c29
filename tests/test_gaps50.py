"""Ctrl-C windows a few bytecodes wide in a capture block: a notebook's interrupt lands between any two bytecodes,
so each test sends a real SIGINT at one line of the library's code (the moment a count was raised, a flag set on the
routers, a torch function mode pushed) and checks that the model and the session are left as they were: the block
count back to zero, no router left capturing, no mode left on torch's stack, Python's own SIGINT handler in place,
and the session's next capture records exactly what a plain capture records."""

from __future__ import annotations

import inspect
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moe_replay as mr
from moe_replay import _torch_compat
from moe_replay.intercept import _DecisionMode
from moe_replay.session import Session

from .conftest import tried
from .test_session_lifecycle import model_and_input, plain_routes


def _code(fn: Any) -> CodeType:
    """The code of ``fn``, under the wrappers ``contextlib`` and ``functools`` put on it."""
    return inspect.unwrap(fn).__code__


@contextmanager
def _ctrl_c_after(
    code: CodeType, text: str, where: Callable[[FrameType], bool] = lambda f: True, *, after: bool = True
) -> Iterator[list[bool]]:
    """Send a real SIGINT once, in the first frame of ``code`` that ``where`` accepts, just after its line that holds
    ``text`` ran (at the next line event of that frame; ``after=False``: just before it runs). Yields a list holding
    True once it was sent."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's KeyboardInterrupt here")
    lines, first = inspect.getsourcelines(code)
    marked = {first + i for i, line in enumerate(lines) if text in line}
    assert marked, f"no line of {code.co_name} holds {text!r}"
    sent: list[bool] = []
    armed: list[FrameType] = []

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if sent:
            return None
        if event == "line":
            if armed and armed[0] is frame:
                sent.append(True)
                signal.raise_signal(signal.SIGINT)
                return None
            if frame.f_lineno in marked and where(frame):
                if not after:
                    sent.append(True)
                    signal.raise_signal(signal.SIGINT)
                    return None
                armed.append(frame)
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is code and not sent else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield sent
    finally:
        sys.settrace(old)


def _left_right(session: mr.Session, model: torch.nn.Module, x: torch.Tensor, want: mr.Routes) -> None:
    """The session after an interrupt: no block open, no router capturing or replaying, no mode on torch's stack,
    Python's SIGINT handler back, a forward outside any block records nothing, and the next capture is exact."""
    assert session._owner.blocks == 0
    assert session.state == "idle"
    assert not any(h.capturing or h.replaying for h in session._hooks)
    assert not _torch_compat.function_mode_stack()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with torch.no_grad(), session.capture():
        model(x)
    assert session.routes().equal(want)
    written = [r.host_written for r in session._rings()]
    with torch.no_grad():
        model(x)  # (outside a block: nothing recorded)
    assert [r.host_written for r in session._rings()] == written
    assert session.routes().equal(want)
    with torch.no_grad(), session.replay(want), session.keep_scores() as kept:
        model(x)
    for name, used in zip(kept.names, kept.indices, strict=True):
        assert torch.equal(used.long().cpu(), want.layer(name).long())


_WINDOWS = {
    # the block count raised before the try that lowers it
    "block count": (_code(Session._block), "owner.blocks += 1", lambda f: True),
    # every router's capturing flag, set one after the other
    "capturing flag": (_code(Session._set), "h.capturing = self._capturing", lambda f: f.f_locals.get("capturing")),
    # the session's flags set, before the try that sets them back
    "capture set": (_code(Session._capture), "self._set(capturing=True)", lambda f: True),
}


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("window", list(_WINDOWS))
def test_a_ctrl_c_as_a_capture_block_opens_leaves_the_session_exact(window: str) -> None:
    """Once left wrong: a Ctrl-C landing after capture() raised the session's block count and before the try that
    lowers it kept the count raised (every later block was read as nested, and the session could not be detached);
    one landing while the routers' capturing flags were set one by one, or before the try that sets them back, left
    routers recording forwards outside any block. The interrupt is held for those few bytecodes and raised once the
    undoing is in place: it comes out as it was sent, and the session goes on exactly."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    session = mr.attach(model)
    code, text, where = _WINDOWS[window]
    tried()
    with pytest.raises(KeyboardInterrupt), _ctrl_c_after(code, text, where) as sent:
        with torch.no_grad(), session.capture():
            model(x)
    assert sent, "the interrupt was never sent: the line moved"
    _left_right(session, model, x, want)
    session.detach()


def _ours(frame: FrameType) -> bool:
    return isinstance(frame.f_locals.get("self"), _DecisionMode)


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_ctrl_c_as_a_routers_mode_is_pushed_leaves_no_mode_on_the_stack(block: str) -> None:
    """Once left wrong: a Ctrl-C landing inside the router's torch function mode's __enter__, after it was pushed on
    torch's mode stack and before the with that pops it was in place, left the mode there, answering every later
    torch call of the thread. A mode its with never popped is taken off as the interrupt leaves the router."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    session = mr.attach(model)
    tried()
    with (
        pytest.raises(KeyboardInterrupt),
        _ctrl_c_after(_code(TorchFunctionMode.__enter__), "return self", _ours, after=False) as sent,
    ):
        with torch.no_grad(), session.capture() if block == "capture" else session.replay(want):
            model(x)
    assert sent, "the interrupt was never sent: no router ran under its mode"
    _left_right(session, model, x, want)
    session.detach()
