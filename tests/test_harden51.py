"""Errors of the user's forward stay the user's; errors of moe_replay's code inside the runs it makes are never lost.

A call of a watched forward that does not fit its parameters (the caller's ``TypeError``) was read, in the runs that
tell a forward's token order, as moe_replay's own fault. An error of moe_replay's code inside a probe run (a nested
router's interception, the stand-in that serves a router again what the runs drew from an iterator, its refusal among
them) could be caught by the forward's own ``except Exception`` around the call: the run went on as another forward
than the router's, and the router was established on it. Faults are injected as in ``test_harden50``: a private helper
replaced by a function whose code is filed under the module it replaces a helper of.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import _faults, _feeds, evidence, intercept

from .test_harden50 import (
    _E,
    _K,
    _T,
    _as_it_was,
    _Block,
    _dispatch,
    _filed_under,
    _hooks,
    _Inner,
    _inputs,
    _lm,
    _Model,
    _refused_for,
    _state,
)


def _raised(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as e:
        return e
    raise AssertionError("it did not raise")


#: calls of a model's forward that fit none of its parameters
_MISFITS: dict[str, Callable[[nn.Module, torch.Tensor], Any]] = {
    "an unknown keyword": lambda model, ids: model(ids, no_such_argument=1),
    "too many by position": lambda model, ids: model(ids, *([None] * 12)),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("misfit", list(_MISFITS))
def test_a_call_that_fits_no_parameter_of_the_forward_raises_the_callers_own_type_error(misfit: str) -> None:
    """A capture's forward called with arguments its forward does not take raises the ``TypeError`` it raises with no
    session attached, the model as it was, and the session goes on: the runs that tell the forward's token order call
    it as the caller did, and its error was taken for moe_replay's own (a request to report a fault)."""
    model, ids = _lm()
    call = _MISFITS[misfit]
    native = _raised(lambda: call(model, ids))
    assert isinstance(native, TypeError)
    state, hooks = _state(model), _hooks(model)
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(TypeError) as info, session.capture():
            call(model, ids)
        assert type(info.value) is type(native) and str(info.value) == str(native)
        with session.capture():  # (the session goes on as before)
            model(ids)
        assert session.routes().indices.shape[0] == ids.numel()
    _as_it_was(model, state, hooks)


class _Holder(nn.Module):
    """A model that holds another model and calls it (a level inside a level), with arguments its forward does not
    take where ``misfit``."""

    def __init__(self, inner: nn.Module, misfit: bool) -> None:
        super().__init__()
        self.model = inner
        self.config = inner.config
        self.misfit = misfit

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """The inner model's output."""
        if self.misfit:
            return self.model(input_ids, attention_mask, *([None] * 8))
        return self.model(input_ids, attention_mask=attention_mask)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("misfit", [True, False], ids=["misfit", "fits"])
def test_a_call_of_a_model_inside_that_fits_no_parameter_raises_the_callers_own_type_error(misfit: bool) -> None:
    """A model's call of the model it holds with arguments that forward does not take raises, inside a capture, the
    ``TypeError`` it raises with no session attached, with the model as it was: the runs that tell the outer forward's
    token order made that call too, and its error was taken for moe_replay's own. The same model calling it as it
    should is captured."""
    inner, ids = _lm()
    model = _Holder(inner, misfit)
    state, hooks = _state(model), _hooks(model)
    with mr.attach(model) as session, torch.no_grad():
        if misfit:
            native = _raised(lambda: inner(ids, None, *([None] * 8)))
            with pytest.raises(TypeError) as info, session.capture():
                model(ids)
            assert type(info.value) is type(native) and str(info.value) == str(native)
        else:
            with session.capture():
                model(ids)
            assert session.routes().indices.shape[0] == ids.numel()
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
def test_a_type_error_of_moe_replays_own_in_a_token_order_run_still_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``TypeError`` of moe_replay's own code inside a token-order run of a call that fits the forward's parameters
    is still moe_replay's fault: the forward is refused, naming it, with the model as it was (the caller's own
    ``TypeError`` alone is the caller's)."""
    model, ids = _lm()
    state, hooks = _state(model), _hooks(model)

    def faulty(value: Any, depth: int = 0) -> bool:
        if isinstance(value, torch.Tensor) and value.dtype == torch.long:  # (token ids: a call of the forward's)
            raise TypeError("a generator's state")
        return False

    with mr.attach(model) as session, torch.no_grad():
        monkeypatch.setattr(_feeds, "is_generator_anywhere", _filed_under(faulty, _feeds))
        with pytest.raises(mr.MoEReplayError, match="could not tell the order") as info, session.capture():
            model(ids)
        assert isinstance(info.value.__cause__, TypeError)
    _as_it_was(model, state, hooks)


class _Catching(_Block):
    """A block that runs its nested router block as a best-effort extra: any error of it is caught, and the block
    goes on without it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` in and out."""
        if self.inner is not None:
            try:
                x = x + self.inner(x)
            except Exception:
                pass
        w, idx = self.gate(x).softmax(-1).topk(_K, dim=-1)
        return _dispatch(self.experts, x, idx, w)


def _catching(tied: bool = False) -> _Model:
    model = _Model()
    torch.manual_seed(1)
    model.layers = nn.ModuleList([_Catching(inner=True), _Catching(inner=True)])
    for layer in model.layers:
        layer.inner = _Inner(tied)
    return model


@pytest.mark.reliability("silent replays")
def test_a_fault_of_a_nested_routers_interception_caught_by_the_forward_refuses_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ``IndexError`` of a nested router's interception in the check on one token alone, caught by the outer
    block's own ``except Exception``, refuses the outer router by name, with the model as it was: the probe run went on
    without the nested block, as another forward, and the router was established and captured on it."""
    model = _catching()
    state, hooks = _state(model), _hooks(model)
    plain = intercept.forwards_call

    def faulty(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor) and args[0].shape[0] == 1:
            raise IndexError("index 1 is out of bounds")
        return plain(fn, args, kwargs)

    monkeypatch.setattr(intercept, "forwards_call", _filed_under(faulty, intercept))
    with mr.attach(model) as session:
        assert len(session.names) == 4
        with torch.no_grad(), pytest.raises(mr.UnsupportedRouterError) as info, session.capture():
            model(_inputs())
    _refused_for(info, IndexError)
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("false refusals")
def test_a_nested_routers_own_error_caught_by_the_forward_is_still_the_forwards() -> None:
    """The nested router's own error on another number of tokens, caught by the outer block's ``except Exception``, is
    the forward's to catch: the outer router is established, captured and replayed exactly."""
    model = _catching(tied=True)
    x = _inputs()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            native = model(x)
        routes = session.routes()
        with session.replay(routes):
            replayed = model(x)
    assert torch.equal(native, replayed)
    assert tuple(routes.indices.shape) == (_T, 4, _K)


def _sent_seeds() -> Generator[int | None, Any, None]:
    got = yield None
    while True:
        got = yield 5 + int(got) % 3


class _Sending(_Block):
    """A block that draws a seed for a small jitter of its scores from a generator it drives with ``send()``, sending
    its number of tokens; a seed it cannot draw (any error) is taken as 0."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = _sent_seeds()
        next(self.sent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` in and out."""
        try:
            seed = self.sent.send(x.shape[0])
        except Exception:
            seed = 0
        g = torch.Generator().manual_seed(seed)
        scores = self.gate(x) + 1e-3 * torch.randn(x.shape[0], _E, generator=g)
        w, idx = scores.softmax(-1).topk(_K, dim=-1)
        return _dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_a_stand_ins_refusal_caught_by_the_forward_still_refuses() -> None:
    """The refusal of the stand-in for a generator driven with ``send()`` (a run on another number of tokens sends
    another value than the runs drew for) caught by the forward's own ``except Exception`` still refuses, with the
    model as it was: the runs went on with a seed of the forward's fallback, and the router was established on them."""
    model = _Model()
    torch.manual_seed(2)
    model.layers = nn.ModuleList([_Sending(), _Sending()])
    state, hooks = _state(model), _hooks(model)
    with warnings.catch_warnings():  # (detach may hand the model a generator of its own, and says so: see _Redrawn)
        warnings.simplefilter("ignore")
        with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
            with pytest.raises(mr.UnsupportedRouterError, match="driven with send"), session.capture():
                model(_inputs())
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
def test_an_error_of_moe_replays_own_is_noted_inside_a_run_only() -> None:
    """:func:`note_fault` keeps an error leaving moe_replay's code only inside a run that moe_replay makes, and only
    where no frame of the user's code lies below: the first one, handed to the run's maker as the run ends; a run
    inside another notes afresh and leaves the outer's note as it was."""

    def library_raises() -> None:
        raise KeyError("moe_replay's own")

    library_raises = _filed_under(library_raises, evidence)

    def user_raises() -> None:
        raise KeyError("the forward's own")

    def entry(inner: Callable[[], None]) -> None:
        try:
            inner()
        except Exception as e:
            _faults.note_fault(e)
            raise

    entry = _filed_under(entry, intercept)

    def caught(inner: Callable[[], None]) -> BaseException:
        return _raised(lambda: entry(inner))

    caught(library_raises)  # (no run under way: nothing noted)
    outer = _faults.run_begins()
    try:
        caught(user_raises)
        first = caught(library_raises)
        caught(library_raises)
        inner_begun = _faults.run_begins()
        assert inner_begun is first
        assert _faults.run_ends(inner_begun) is None
    finally:
        noted = _faults.run_ends(outer)
    assert noted is first and outer is None

    def library_raises_marked() -> None:  # (a call it made for the forward: the forward's error)
        error = KeyError("the forward's, marked")
        _faults.mark_forwards(error)
        raise error

    library_raises_marked = _filed_under(library_raises_marked, evidence)
    marked = _faults.run_begins()
    try:
        caught(library_raises_marked)
    finally:
        assert _faults.run_ends(marked) is None
