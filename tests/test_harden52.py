"""Checks that run the forward on other inputs never pass a router for lack of runs, nor take moe_replay's own errors
for the forward's.

A choice made before the decision (a number of experts per token from a threshold) is varied on other inputs than
the real ones: a forward that failed on every one of them left the choice unchecked, and the router was accepted,
where a later choice left unchecked so is refused. An error of moe_replay's own code while it compared the runs that
hold such a choice was reported as the forward failing when the choices are held, and a refusal moe_replay made on
purpose there was reworded into that one: each is now raised as what it is.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay import evidence

from .test_harden50 import _as_it_was, _filed_under, _hooks, _state

_D, _E, _K, _T = 8, 4, 2, 6


class _CountRouter(nn.Module):
    """A router that chooses, before its top-k, how many of its ``k`` slots each token keeps (from an allocator's
    scores by a threshold), the others weighed 0. ``only``: the one batch it runs on (else it raises, as a forward
    tied to its inputs' values does)."""

    def __init__(self, only: torch.Tensor | None) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.allocator = nn.Linear(_D, _K, bias=False)
        self.only = only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.only is not None and (x.shape != self.only.shape or not torch.equal(x, self.only)):
            raise ValueError("this router runs on its own batch only")
        k = (torch.sigmoid(self.allocator(x)) > 0.5).sum(-1).clamp(min=1)
        w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
        return w * (torch.arange(_K) < k.unsqueeze(-1)), idx


class _Model(nn.Module):
    def __init__(self, only: torch.Tensor | None) -> None:
        super().__init__()
        self.router = _CountRouter(only)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x)


def _made(restricted: bool) -> tuple[_Model, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _Model(x.clone() if restricted else None)
    ks = (torch.sigmoid(model.router.allocator(x)) > 0.5).sum(-1).clamp(min=1)
    assert len(set(ks.tolist())) > 1  # (the earlier choice keeps other numbers of slots for other tokens)
    return model, x


def _captured(model: nn.Module, x: torch.Tensor) -> Any:
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            return model(x)


@pytest.mark.reliability("silent replays")
def test_an_earlier_choice_that_no_other_input_could_vary_is_refused() -> None:
    """A forward that fails on every input other than its own left its choice before the decision unchecked, and the
    router was accepted: a replay forces the top-k and makes that choice again from the current scores. Refused now,
    by name, with the model as it was (a later choice left unchecked was refused so already)."""
    model, x = _made(restricted=True)
    assert torch.equal(model(x)[1], model(x)[1])  # (it runs on its own batch)
    with pytest.raises(ValueError, match="its own batch only"):
        model(x.roll(1, 0))
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "router 'router'" in message and "before its decision" in message and "could not be checked" in message
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
def test_the_same_earlier_choice_on_a_forward_that_runs_on_other_inputs_is_refused_as_such() -> None:
    """The check the unchecked choice stands in for: the same router, run on other inputs, is refused for what its
    earlier choice picks (not as unchecked)."""
    model, x = _made(restricted=False)
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "router 'router'" in message and "before its decision" in message
    assert "could not be checked" not in message and "what picks experts after it" in message
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("faults")
def test_a_fault_of_moe_replay_comparing_held_choices_is_refused_as_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of moe_replay's code reading the runs that hold the earlier choices was reported as the forward
    failing when they are held ("whether its forward runs at all"): the user was told their model is at fault. It
    refuses the router as moe_replay's own fault now, chained from the error, with the model as it was."""
    model, x = _made(restricted=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a fault in reading the runs")

    monkeypatch.setattr(evidence, "_restructured", _filed_under(broken, evidence))
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "router 'router'" in message and "could not make its check" in message, message
    assert "whether its forward runs at all" not in message
    assert isinstance(info.value.__cause__, RuntimeError)
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("faults")
def test_a_refusal_made_on_purpose_in_a_held_run_is_raised_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal of moe_replay's own (an ``UnsupportedRouterError`` with its reason) raised while the earlier choices
    are held was reworded as the forward failing when they are held, its reason lost. It is raised as it is."""
    model, x = _made(restricted=False)

    def refusing(*args: Any, **kwargs: Any) -> Any:
        raise mr.UnsupportedRouterError("router 'router': a reason of moe_replay's own")

    monkeypatch.setattr(evidence, "_restructured", _filed_under(refusing, evidence))
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "a reason of moe_replay's own" in message and "whether its forward runs at all" not in message, message
    _as_it_was(model, state, hooks)


class _LoggingRouter(nn.Module):
    """A top-k router that keeps its scores as a Python list for logging (values handed out of torch, read by
    nothing that reaches its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1)
        self.seen = probs.tolist()
        return torch.topk(probs, _K, dim=-1)


class _LoggingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = _LoggingRouter()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x)


@pytest.mark.reliability("faults")
def test_a_refusal_made_on_purpose_in_the_run_that_moves_escaped_values_is_raised_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal of moe_replay's own raised inside the run that hands escaped values back with their experts moved was
    taken for the forward failing on them, and the router refused as one that chooses outside torch: its reason was
    lost. It is raised as it is; without it, the logging router is accepted."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    real = evidence._ProbeMode._escape

    def escape(self: Any, func: Any, args: Any, kwargs: Any) -> Any:
        if self.scramble is not None:
            raise mr.UnsupportedRouterError("router 'router': a reason of moe_replay's own")
        return real(self, func, args, kwargs)

    monkeypatch.setattr(evidence._ProbeMode, "_escape", _filed_under(escape, evidence))
    model = _LoggingModel()
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _captured(model, x)
    message = str(info.value)
    assert "a reason of moe_replay's own" in message and "out of torch" not in message, message
    _as_it_was(model, state, hooks)
    monkeypatch.undo()
    _captured(_LoggingModel(), x)


@pytest.mark.reliability("silent replays")
def test_a_refusal_the_probes_mode_makes_on_other_inputs_refuses_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal the probe's mode makes on purpose inside a run (reached through torch's dispatch, not through an entry
    of moe_replay's) was marked as the forward's own error: on inputs of other values it read as a forward tied to its
    inputs' values, the checks made there were passed over, and the router accepted. It refuses the router now, with
    the model as it was; the same router with no such refusal is accepted."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _LoggingModel()
    with torch.no_grad():
        scores = F.softmax(model.router.gate(x), dim=-1)
    real = evidence._ProbeMode._answer

    def answer(self: Any, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is torch.topk and args[0].shape == scores.shape and not torch.allclose(args[0], scores):
            raise mr.UnsupportedRouterError("a refusal of moe_replay's own on other inputs")  # (naming no router)
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(evidence._ProbeMode, "_answer", _filed_under(answer, evidence))
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError, match="a refusal of moe_replay's own on other inputs") as info:
        _captured(model, x)
    assert str(info.value).startswith("router 'router': "), info.value  # (named: the refusal alone names no router)
    _as_it_was(model, state, hooks)
    monkeypatch.undo()
    _captured(_LoggingModel(), x)
