"""Misuse of a session by a notebook user who interrupts cells (Ctrl-C) at any moment: while the session is put on
the model, while it is taken off, while a block opens. Whatever the moment, the user's ``KeyboardInterrupt`` comes
out as it was raised, the model is left attached whole or not at all (never some routers wrapped and others not),
and the session either goes on exactly or is detached cleanly, so a new ``attach`` records and replays exactly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay import session as session_module

from .conftest import assert_untouched, snapshot
from .test_session_lifecycle import model_and_input, ours_reachable, plain_routes


@contextmanager
def _ctrl_c_on_call(name: str, at: int) -> Iterator[list[int]]:
    """Send a real SIGINT (a notebook's interrupt) from inside the ``at``-th call of ``moe_replay.session.<name>``."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's KeyboardInterrupt here")
    real = getattr(session_module, name)
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    setattr(session_module, name, interrupted)
    try:
        yield calls
    finally:
        setattr(session_module, name, real)


def _exact_again(model: torch.nn.Module, x: torch.Tensor, routes: mr.Routes) -> None:
    """A new session on the model records the routes of a plain run and replays them exactly."""
    with mr.attach(model) as again, torch.no_grad():
        with again.capture():
            model(x)
        assert again.routes().equal(routes)
        with again.replay(routes), again.keep_scores() as kept:
            model(x)
        for name, used in zip(kept.names, kept.indices, strict=True):
            assert torch.equal(used.long().cpu(), routes.layer(name).long())


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_ctrl_c_in_the_middle_of_detach_still_detaches_whole_and_comes_out(at: int) -> None:
    """Once a Ctrl-C landing while detach() put the routers' forwards back left the model half-detached: some
    routers still wrapped, the session still attached to forwards it no longer wrapped (its captures refused as if
    other code had removed its wrapper), a second detach() failing with an AttributeError or IndexError or refusing,
    and a new attach refused. The interrupt now waits until every forward is back and then comes out."""
    model, x = model_and_input()
    before = snapshot(model)
    routes = plain_routes(model, x)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    with _ctrl_c_on_call("_restore_forward", at) as calls:
        with pytest.raises(KeyboardInterrupt):
            session.detach()
    assert calls[0] >= at  # (the interrupt landed in the middle: more forwards were put back after it)
    assert not session.attached and session.state == "detached"
    assert session.routes().equal(routes)  # (the capture's rows were kept before the forwards went back)
    assert_untouched(model, before)
    assert ours_reachable(model) == []
    session.detach()  # (idempotent)
    _exact_again(model, x, routes)
    assert_untouched(model, before)


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_ctrl_c_in_the_middle_of_attach_leaves_the_model_as_it_was(at: int) -> None:
    """A Ctrl-C landing while attach() wraps the routers' forwards one by one (a slow model, an impatient user): the
    interrupt comes out of attach() and attach's rollback leaves the model as it was (no router wrapped, none
    registered), so the cell re-run attaches, records and replays exactly."""
    model, x = model_and_input()
    before = snapshot(model)
    routes = plain_routes(model, x)
    with _ctrl_c_on_call("_reused", at) as calls:
        with pytest.raises(KeyboardInterrupt):
            mr.attach(model)
    assert calls[0] >= at
    assert_untouched(model, before)
    assert ours_reachable(model) == []
    _exact_again(model, x, routes)
    assert_untouched(model, before)
