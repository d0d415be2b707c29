"""An error of moe_replay's own code while it establishes or checks a decision is never taken for the forward's.

The runs that check a decision on other numbers of tokens let a forward that fails there go (a forward tied to its
number of tokens): an error raised inside moe_replay's own code during those runs (the probe's mode, the code that
moves a choice, the comparisons after a run) once passed the same way, and the check was skipped without a word.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import evidence

_E, _D, _T, _K = 8, 16, 24, 2


class _Block(nn.Module):
    """A Linear gate, a softmax and a top-2 over eight experts, dispatched by its indices. ``tied``: how the forward
    fails on another number of tokens than ``_T`` (None: it does not)."""

    def __init__(self, tied: str | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(_D, _D) for _ in range(_E))
        self.top_k = _K
        self.tied = tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum ``[tokens, hidden]``."""
        if self.tied == "raise" and x.shape[0] != _T:
            raise ValueError(f"this block runs on {_T} tokens only")
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(_K, dim=-1)
        if self.tied == "torch":  # (a torch call that fails on another number of tokens: its own error)
            idx = idx.view(_T, _K)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


class _Model(nn.Module):
    def __init__(self, tied: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(tied), _Block(tied)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _inputs() -> torch.Tensor:
    return torch.randn(_T, _D, generator=torch.Generator().manual_seed(3))


def _faulty_on_few_tokens(raised: Callable[[], BaseException]) -> Callable[..., Any]:
    """``evidence._changed`` that raises ``raised()`` where the indices it moves are of one token (the check of a
    decision on one token alone), as the library's own code once did there; as it is elsewhere."""
    changed = evidence._changed

    def faulty(family: str, out: Any, width: int) -> Any:
        indices = out if isinstance(out, torch.Tensor) else out[1]
        if indices.reshape(-1, indices.shape[-1]).shape[0] == 1:
            raise raised()
        return changed(family, out, width)

    return faulty


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


@pytest.mark.reliability("silent replays")
def test_a_fault_of_the_probe_on_one_token_refuses_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``IndexError`` of moe_replay's own code in the check of a decision on one token alone refuses the router,
    naming it and asking for a report, with the model as it was: once it was taken for a forward tied to its number
    of tokens, the check skipped, and the capture and the replay went through."""
    model = _Model()
    x = _inputs()
    state, hooks = _state(model), _hooks(model)
    monkeypatch.setattr(evidence, "_changed", _faulty_on_few_tokens(lambda: IndexError("index 1 is out of bounds")))
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError) as info, session.capture():
            model(x)
    message = str(info.value)
    assert "router 'layers.0'" in message and "could not make its check" in message and "report" in message
    assert isinstance(info.value.__cause__, IndexError)
    after = _state(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert _hooks(model) == hooks


@pytest.mark.reliability("silent replays")
def test_a_fault_after_a_run_is_no_error_of_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of moe_replay's code that compares the runs (outside the forward) in the check on one token alone
    refuses the router too: it is no error of the forward either."""
    model = _Model()
    distance = evidence._distance

    def faulty(a: Any, b: Any, tol: float = 0.0) -> tuple[float, int]:
        tensors = [t for t in evidence._leaves(a, []) if isinstance(t, torch.Tensor)]
        if tensors and tensors[0].dim() and tensors[0].shape[0] == 1:
            raise KeyError("a slot")
        return distance(a, b, tol)

    monkeypatch.setattr(evidence, "_distance", faulty)
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match="could not make its check") as info, session.capture():
            model(_inputs())
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("tied", ["raise", "torch"], ids=["its own raise", "a torch call's error"])
def test_a_forward_that_fails_on_another_token_count_is_still_allowed(tied: str) -> None:
    """A forward that fails on any other number of tokens than its own (its own ``raise``, or a torch call of its
    code that raises there) is established on its own number, captured and replayed as before."""
    model = _Model(tied)
    x = _inputs()
    with pytest.raises((ValueError, RuntimeError)):
        model(x[:1])
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            native = model(x)
        routes = session.routes()
        with session.replay(routes):
            replayed = model(x)
    assert torch.equal(native, replayed)
    assert tuple(routes.indices.shape) == (_T, 2, _K)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit], ids=["KeyboardInterrupt", "SystemExit"])
def test_an_interrupt_inside_a_probe_run_is_not_caught(
    monkeypatch: pytest.MonkeyPatch, raised: type[BaseException]
) -> None:
    """A ``KeyboardInterrupt`` or ``SystemExit`` raised inside a probe run (here by the code that moves a choice, in
    the check on one token alone) leaves the forward as it is: neither taken for the forward's error nor refused."""
    model = _Model()
    state = _state(model)
    monkeypatch.setattr(evidence, "_changed", _faulty_on_few_tokens(raised))
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with pytest.raises(raised), session.capture():
            model(_inputs())
    after = _state(model)
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.reliability("silent replays")
def test_a_fault_while_a_decision_is_checked_again_is_no_false_or_true(monkeypatch: pytest.MonkeyPatch) -> None:
    """``still_decides`` and ``makes_its_calls`` (checks before later forwards) raise an error of moe_replay's own
    code, which ``faults_refused`` makes the router's refusal, rather than answering it; an error of the forward
    still answers False (the decision is established afresh on its inputs)."""
    model = _Model()
    block = model.layers[0]
    x = _inputs()
    with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            model(x)
        hook = next(h for h in session._hooks if h.name == "layers.0")
        ev = next(iter(hook.evidence.values()))
    forward = type(block).forward.__get__(block)
    assert evidence.makes_its_calls(block, forward, (x,), {}, ev)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("the probe's own")

    monkeypatch.setattr(evidence, "_clone", broken)
    with pytest.raises(mr.UnsupportedRouterError, match="router 'r'.*could not make its check"):
        with evidence.faults_refused("r"):
            evidence.makes_its_calls(block, forward, (x,), {}, ev)
    with pytest.raises(mr.UnsupportedRouterError, match="router 'r'.*could not make its check"):
        with evidence.faults_refused("r"):
            evidence.still_decides(block, forward, (x,), {}, ev)
    monkeypatch.undo()

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the forward's own")

    assert not evidence.makes_its_calls(block, fails, (x,), {}, ev)
    assert not evidence.still_decides(block, fails, (x,), {}, ev)


@pytest.mark.reliability("bad inputs")
def test_a_fault_in_any_probe_run_refuses_the_router_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of moe_replay's own code in the first, a middle or the last of the runs that establish a decision
    (here in the copy of the inputs each run makes) refuses the router by name: never passed over, and never a bare
    builtin error of moe_replay's own out of the user's forward."""
    grad_like = evidence._grad_like
    runs = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        runs[0] += 1
        return grad_like(*args, **kwargs)

    def establish(fault_at: int | None) -> None:
        model = _Model()
        model.layers = model.layers[:1]
        with mr.attach(model, include="layers.*", top_k=_K, num_experts=_E) as session, torch.no_grad():
            with session.capture():
                model(_inputs())

    monkeypatch.setattr(evidence, "_grad_like", counting)
    establish(None)
    total = runs[0]
    assert total > 8
    for at in sorted({0, 4, total // 2, total - 1}):
        runs[0] = 0

        def faulty(*args: Any, at: int = at, **kwargs: Any) -> Any:
            runs[0] += 1
            if runs[0] == at + 1:
                raise IndexError("the probe's own")
            return grad_like(*args, **kwargs)

        monkeypatch.setattr(evidence, "_grad_like", faulty)
        with pytest.raises(mr.UnsupportedRouterError, match="router 'layers.0'.*could not make its check") as info:
            establish(at)
        assert isinstance(info.value.__cause__, IndexError), at
