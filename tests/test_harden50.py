"""An error of moe_replay's own code in the check of the order a router's state sets is never taken for "no order".

The check reverses the rows of the state a router holds and runs the forward again; a forward that fails there
tells nothing, and the decision is kept. An error of moe_replay's own code there (the reversal, the reading of the
runs) once passed the same way, and the check was skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import evidence, intercept

_E, _D, _T, _K = 8, 16, 24, 2


def _dispatch(experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
    return out


class _Block(nn.Module):
    """A Linear gate, a softmax and a top-2 over eight experts, dispatched by its indices; ``scale``: a float buffer of
    one row per expert (state that may set an order of its tokens), which its forward refuses reversed where
    ``picky``."""

    def __init__(self, picky: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(_D, _D) for _ in range(_E))
        self.top_k = _K
        self.register_buffer("scale", torch.linspace(1.0, 1.5, _E))
        self.picky = picky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` in and out."""
        if self.picky and bool(self.scale[0] > self.scale[-1]):
            raise ValueError("this block's scale runs upwards")
        w, idx = (self.gate(x) * self.scale).softmax(-1).topk(_K, dim=-1)
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
