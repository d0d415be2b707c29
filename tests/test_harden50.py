"""An error of moe_replay's code that runs inside a forward, outside the probe's mode, is never taken for the forward's.

The runs that establish a decision, and those that tell the order of a forward's tokens, let a forward that fails on
other inputs go. moe_replay's code runs inside those forwards where no mode marks its errors: a nested router's
interception, the stand-ins that serve again what a router drew from an iterator, the token checks' hooks. An error
raised there once escaped the forward as the forward's own, and a check was skipped (or the user got a bare builtin
error). The check of an order a router's state sets took an error of the code that reverses that state for "no
order" too. Each fault here is injected as moe_replay's own code (a private helper replaced by a function whose code is
filed under the module it replaces a helper of), as a bug there would raise it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import _faults, _feeds, evidence, intercept

_E, _D, _T, _K = 8, 16, 24, 2


def _filed_under(fn: Callable[..., Any], module: Any) -> Callable[..., Any]:
    """``fn``, its code filed under ``module``'s file: a frame of it is that module's code (moe_replay's own, as the
    helper it replaces is, where ``module`` is one of moe_replay's; a function of this test file is the user's)."""
    fn.__code__ = fn.__code__.replace(co_filename=module.__file__)
    return fn


def _dispatch(experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
    return out


class _Router(nn.Module):
    """A router module of its own: a softmax and a top-2 over its gate's scores; ``tied``: it runs on ``_T`` tokens
    only (its own error on any other number)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(_E, _D) / _D**0.5)
        self.top_k = _K
        self.tied = tied

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, indices)``, ``[tokens, k]`` each."""
        if self.tied and x.shape[0] != _T:
            raise ValueError(f"this router runs on {_T} tokens only")
        w, idx = (x @ self.weight.t()).softmax(-1).topk(_K, dim=-1)
        return w, idx


class _Inner(nn.Module):
    """An MoE block whose router is a module of its own (nested in the outer block's scope)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.router = _Router(tied)
        self.experts = nn.ModuleList(nn.Linear(_D, _D) for _ in range(_E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return _dispatch(self.experts, x, idx, w)


class _Block(nn.Module):
    """A Linear gate, a softmax and a top-2 over eight experts, dispatched by its indices; ``inner``: a router block
    nested in it, run first; ``seeds``: it draws a seed from an iterator it holds for a small jitter of its scores;
    ``scale``: a float buffer of one row per expert (state that may set an order of its tokens), which its forward
    refuses reversed where ``picky``."""

    def __init__(self, inner: bool = False, seeds: bool = False, picky: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(_D, _D) for _ in range(_E))
        self.top_k = _K
        self.inner = _Inner() if inner else None
        self.seeds = itertools.cycle([5, 6, 7]) if seeds else None
        self.register_buffer("scale", torch.linspace(1.0, 1.5, _E))
        self.picky = picky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` in and out."""
        if self.picky and bool(self.scale[0] > self.scale[-1]):
            raise ValueError("this block's scale runs upwards")
        if self.inner is not None:
            x = x + self.inner(x)
        scores = self.gate(x) * self.scale
        if self.seeds is not None:
            g = torch.Generator().manual_seed(next(self.seeds))
            scores = scores + 1e-3 * torch.randn(scores.shape, generator=g)
        w, idx = scores.softmax(-1).topk(_K, dim=-1)
        return _dispatch(self.experts, x, idx, w)


class _Model(nn.Module):
    def __init__(self, **kw: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(**kw), _Block(**kw)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _inputs() -> torch.Tensor:
    return torch.randn(_T, _D, generator=torch.Generator().manual_seed(3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def _as_it_was(model: nn.Module, state: dict[str, torch.Tensor], hooks: list[int]) -> None:
    after = _state(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert _hooks(model) == hooks
    assert all(not isinstance(v, intercept.ScopedForward) for m in model.modules() for v in vars(m).values())


def _refused_for(info: pytest.ExceptionInfo[BaseException], cause: type[BaseException]) -> None:
    message = str(info.value)
    assert "router 'layers." in message and "could not make its check" in message and "report" in message
    assert isinstance(info.value.__cause__, cause)


@pytest.mark.reliability("silent replays")
def test_a_fault_of_a_nested_routers_interception_on_one_token_refuses_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ``IndexError`` of a nested router's interception (its ``forward`` wrapper, run plainly inside the outer
    router's probe runs) in the check on one token alone refuses the outer router, with the model as it was: it
    escaped the outer forward as the forward's own, the check was passed over as for a forward tied to its number
    of tokens, and the capture went through."""
    model = _Model(inner=True)
    x = _inputs()
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
            model(x)
    _refused_for(info, IndexError)
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("false refusals")
def test_a_nested_routers_own_error_on_one_token_is_still_the_forwards() -> None:
    """The nested router's own forward failing on another number of tokens (its code's error, raised under the
    interception) is the forward's: the outer router is established on its own number, captured and replayed."""

    model = _Model(inner=True)
    for layer in model.layers:
        layer.inner = _Inner(tied=True)
    x = _inputs()
    with pytest.raises(ValueError):
        model(x[:1])
    with mr.attach(model) as session:
        assert len(session.names) == 4
        with torch.no_grad():
            with session.capture():
                native = model(x)
            routes = session.routes()
            with session.replay(routes):
                replayed = model(x)
    assert torch.equal(native, replayed)
    assert tuple(routes.indices.shape) == (_T, 4, _K)


@pytest.mark.reliability("bad inputs")
def test_a_fault_of_a_stand_in_for_a_drawn_iterator_refuses_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of the stand-in that serves a router again what the probe runs drew from an iterator it holds
    refuses the router as moe_replay's fault, not the user's forward failing with a bare ``KeyError``; the model
    holds its own iterator again, the state and hooks as they were."""
    model = _Model(seeds=True)
    seeds = [layer.seeds for layer in model.layers]
    state, hooks = _state(model), _hooks(model)

    def faulty(source: Any, depth: int = 0, memo: Any = None) -> Any:
        raise KeyError("a slot of the copy")

    monkeypatch.setattr(evidence, "_replica", _filed_under(faulty, evidence))
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError) as info, session.capture():
            model(_inputs())
    _refused_for(info, KeyError)
    _as_it_was(model, state, hooks)
    assert [layer.seeds for layer in model.layers] == seeds


@pytest.mark.reliability("false refusals")
def test_the_end_of_a_drawn_iterator_is_the_forwards_own() -> None:
    """A finite iterator a router draws from that ends inside a probe run ends the run as the forward's own
    ``StopIteration`` (raised by the C iterator under the stand-in, with no frame of the user's below it)."""
    x = _inputs()
    model = _Model(seeds=True)
    for layer in model.layers:
        layer.seeds = iter([])
    with pytest.raises(StopIteration):
        model(x)
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(StopIteration), session.capture():
            model(x)


@pytest.mark.reliability("silent replays")
def test_a_fault_flipping_the_state_refuses_rather_than_keeping_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of moe_replay's code that reverses the rows of the state a router holds (the check of an order that
    state may set) refuses the router: it once answered "not out of order" and the check was passed over."""
    model = _Model()
    state, hooks = _state(model), _hooks(model)

    @contextlib.contextmanager
    def faulty(held: Any) -> Iterator[None]:
        raise IndexError("no row to flip")
        yield

    monkeypatch.setattr(evidence, "_state_flipped", faulty)
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError) as info, session.capture():
            model(_inputs())
    _refused_for(info, IndexError)
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("false refusals")
def test_a_forward_that_fails_on_its_state_reversed_is_still_established() -> None:
    """A forward that raises with its state's rows reversed (its own error, in the runs of the order check) is
    established, captured and replayed as before."""
    model = _Model(picky=True)
    x = _inputs()
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            native = model(x)
        routes = session.routes()
        with session.replay(routes):
            replayed = model(x)
    assert torch.equal(native, replayed)


def _lm() -> tuple[nn.Module, torch.Tensor]:
    model = mr.models.build("softmax_topk")
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, ids


def _faulty_stop(self: Any, args: Any, kwargs: Any, forward: Any = None) -> Any:
    raise KeyError("a row of the first router")


def _faulty_generator_test(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor) and value.dtype == torch.long:  # (token ids: a call of the forward's)
        raise KeyError("a generator's state")
    return False


#: the places in a token-order run where moe_replay's code runs inside the model's forward: the interception that
#: stops the run at the first router, and the mode that notes the generators the run draws from
_ORDER_FAULTS = {
    "the order stop": (intercept.OrderProbe, "stop", _filed_under(_faulty_stop, intercept)),
    "the drawn generators' mode": (_feeds, "is_generator_anywhere", _filed_under(_faulty_generator_test, _feeds)),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", list(_ORDER_FAULTS))
def test_a_fault_inside_a_token_order_run_refuses_rather_than_leaving_the_order_untold(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An error of moe_replay's code inside a token-order run (the interception that stops it at the first router,
    the mode that notes what it draws) refuses the forward, naming moe_replay's fault, with the model as it was: it
    was read as a forward that fails on the changed token, the order left untold and the checks that read it off."""
    model, ids = _lm()
    state, hooks = _state(model), _hooks(model)
    holder, name, faulty = _ORDER_FAULTS[where]

    with mr.attach(model) as session, torch.no_grad():
        monkeypatch.setattr(holder, name, faulty)
        with pytest.raises(mr.MoEReplayError, match="could not tell the order") as info, session.capture():
            model(ids)
        assert isinstance(info.value.__cause__, KeyError)
        monkeypatch.undo()
        with session.capture():  # (the session goes on as before once the fault is gone)
            model(ids)
        assert session.routes().indices.shape[0] == ids.numel()
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("false refusals")
def test_where_an_error_was_raised_is_told_by_its_frames() -> None:
    """:func:`raised_inside` takes an error for moe_replay's own only where it was raised in its code entered from the
    forward with no frame of the user's below: the user's code an entry calls (in a file of its own or of an installed
    package), and an error marked the forward's, stay the forward's."""

    def user() -> None:
        raise ValueError("the forward's own")

    def library_raises() -> None:
        raise ValueError("moe_replay's own")

    library_raises = _filed_under(library_raises, evidence)

    def entry(inner: Callable[[], None]) -> None:
        inner()

    entry = _faults.inside_forward(_filed_under(entry, intercept))

    def caught(fn: Callable[[], None]) -> BaseException:
        try:
            fn()
        except Exception as e:
            return e
        raise AssertionError("it did not raise")

    def installed() -> None:  # (model code of an installed package, transformers' say: the user's too)
        raise ValueError("the forward's own, in an installed package")

    installed = _filed_under(installed, numpy)

    assert _faults.raised_inside(caught(lambda: entry(library_raises)))
    assert not _faults.raised_inside(caught(lambda: entry(user)))
    assert not _faults.raised_inside(caught(lambda: entry(installed)))
    assert not _faults.raised_inside(caught(library_raises))  # (no entry: not inside a forward)
    marked = caught(lambda: entry(library_raises))
    _faults.mark_forwards(marked)
    assert not _faults.raised_inside(marked)
    assert not _faults.raised_inside(caught(lambda: _faults.forwards_call(entry, (user,), {})))
    assert _faults.raised_inside(caught(lambda: _faults.forwards_call(entry, (library_raises,), {})))
    assert _feeds.FeedForward.__call__.__code__ in _faults._ENTRIES
