"""Ctrl-C windows a few bytecodes wide in a capture block: a notebook's interrupt lands between any two bytecodes,
so each test sends a real SIGINT at one line of the library's code (the moment a count was raised, a flag set on the
routers, a torch function mode pushed) and checks that the model and the session are left as they were: the block
count back to zero, no router left capturing, no mode left on torch's stack, Python's own SIGINT handler in place,
and the session's next capture records exactly what a plain capture records."""

from __future__ import annotations

import inspect
import itertools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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


# --- iterators a router reaches outside its own attributes ----------------------------------------------------------


class _Router(nn.Module):
    """A softmax top-2 router over 8 experts, jittered by a seed its subclass draws from an iterator."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)))
        self.top_k = 2

    def seed(self) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed())
        jitter = 1e-2 * torch.randn((*x.shape[:-1], 8), generator=g)
        w, idx = (F.linear(x, self.weight) + jitter).softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


class _Block(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = (idx == e).any(-1)
            if hit.any():
                out[hit] += (w * (idx == e)).sum(-1, keepdim=True)[hit] * expert(x[hit])
        return out


class _Section:
    """A plain object of a config, which may hold another and point back to its parent (a cycle)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class _TwoObjectsDeep(_Router):
    """Draws from ``self.cfg.noise.seeds``: an iterator two plain objects deep, inside a config that points back."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = _Section(noise=_Section(seeds=itertools.cycle([31, 32, 33])))
        self.cfg.noise.parent = self.cfg

    def seed(self) -> int:
        return next(self.cfg.noise.seeds)


def _in_a_closure() -> type[_Router]:
    seeds = itertools.cycle([41, 42, 43])

    class _FromACell(_Router):
        """Draws from an iterator in a closure cell of its forward."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(next(seeds))
            jitter = 1e-2 * torch.randn((*x.shape[:-1], 8), generator=g)
            w, idx = (F.linear(x, self.weight) + jitter).softmax(-1).topk(self.top_k, dim=-1)
            return w / w.sum(-1, keepdim=True), idx

    return _FromACell


def _on_a_class() -> type[_Router]:
    class _FromItsClass(_Router):
        """Draws from an iterator its class holds."""

        seeds = itertools.cycle([51, 52, 53])

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(next(_FromItsClass.seeds))
            jitter = 1e-2 * torch.randn((*x.shape[:-1], 8), generator=g)
            w, idx = (F.linear(x, self.weight) + jitter).softmax(-1).topk(self.top_k, dim=-1)
            return w / w.sum(-1, keepdim=True), idx

    return _FromItsClass


_HOLDERS: dict[str, Callable[[], type[_Router]]] = {
    "two plain objects deep": lambda: _TwoObjectsDeep,
    "a closure cell": _in_a_closure,
    "a class attribute": _on_a_class,
}
_XS = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("holder", list(_HOLDERS))
def test_an_iterator_a_router_reaches_outside_its_attributes_gives_the_forwards_after_attach_the_same_draws(
    holder: str,
) -> None:
    """Once silent: an iterator a router draws from through plain objects it keeps (two deep, with a cycle back),
    or held by a closure cell of its forward or by its class, was advanced by the runs that establish its decision,
    so the forwards after attach saw other draws than the plain model's. Each is stood in for while those runs
    run: the forwards after attach, captured and replayed, see the plain model's draws, and the replay forces
    exactly the captured experts."""
    torch.manual_seed(0)
    plain = nn.Sequential(_Block(_HOLDERS[holder]()()), _Block(_HOLDERS[holder]()()))
    torch.manual_seed(0)
    attached = nn.Sequential(_Block(_HOLDERS[holder]()()), _Block(_HOLDERS[holder]()()))
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    tried()
    with mr.attach(attached) as session, torch.no_grad():
        with session.capture():
            got = [attached(x) for x in _XS]
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept:
            again = [attached(x) for x in _XS]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards after attach saw other draws"
    with torch.no_grad():
        want = [plain(x) for x in _XS]  # (the replay's forwards draw on, as the plain model's do)
    assert all(torch.equal(w, g) for w, g in zip(want, again, strict=True)), "the replay's forwards saw other draws"
    for name, used in zip(kept.names, kept.indices, strict=True):
        assert torch.equal(used.long().cpu(), routes.layer(name).long())


def _counting() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1


class _GeneratorPerToken(_Router):
    """Draws one jitter item per token from a generator it holds: the runs that establish its decision on more
    tokens than a forward draw more items than the forward does."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = _counting()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.tensor([float(next(self.noise)) for _ in range(x.shape[0])])
        logits = F.linear(x, self.weight) + 0.3 * torch.sin(j)[:, None] * torch.arange(8.0)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx
