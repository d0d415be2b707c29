"""The settings a router is handed at each call, as arguments of its forward (see ``moe_replay._arguments``).

A decision is established on one forward's arguments. Those that are no tokens (numbers, flags, strings, None, 0-d
tensors and tensors of one value per expert) are compared at each later forward with those it was established with:
a change establishes it again on the new ones (a cut then seen is refused), and what varies with the tokens (a
padding mask, position ids, a cache object) or stays the same (a layer's index, a new 0-d tensor of the same value
each call) establishes nothing again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import moe_replay as mr
import moe_replay.intercept as intercept
from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact
from tests.test_public_routers9 import _pick
from tests.test_public_routers13 import ArgumentMinWeightGate


class _Cache:
    """A cache object handed to the router (a new one at each forward): no setting."""

    def __init__(self) -> None:
        self.seen: list[int] = []


class ArgumentsGate(_Used):
    """A top-2 router handed, at each call, what varies with its tokens (a padding mask, position ids, a cache) and
    settings of its decision (its layer's index, a temperature, a bias per expert, a minimum weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: _Cache,
        layer_idx: int,
        temperature: torch.Tensor,
        bias: torch.Tensor | None = None,
        min_weight: float = 0.0,
        padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x) / temperature
        if bias is not None:
            logits = logits + bias
        w, idx = _pick(logits.softmax(-1), self.forced, self.top_k)
        keep = w > min_weight
        self.used = torch.where(keep, idx, -1)
        cache.seen.append(layer_idx + int(position_ids.shape[-1]))
        if padding is not None:
            w = w * padding.reshape(-1, 1)
        return w * keep * mask[:, None], idx


_INDEX = itertools.count()


class ArgumentsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts, self.layer_idx = ArgumentsGate(), Experts(), next(_INDEX)
        self.temperature, self.bias, self.min_weight = 1.0, None, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        w, idx = self.router(
            x,
            torch.ones(n),
            torch.arange(n)[None],
            _Cache(),
            self.layer_idx,
            torch.tensor(self.temperature),  # (a new tensor at each call, of the same value)
            bias=self.bias,
            min_weight=self.min_weight,
            padding=torch.ones(1, n) if n % 2 == 1 else None,  # (a padding mask on some forwards only)
        )
        return dispatch(self.experts, x, idx, w)


@pytest.fixture
def established(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, bool, bool]]]:
    """Each time a decision is established: the router's name and the mode."""
    made: list[tuple[str, bool, bool]] = []
    real = intercept.establish

    def counted(name: str, scope: nn.Module, *args: Any, **kwargs: Any) -> Any:
        made.append((name, scope.training, torch.is_grad_enabled()))
        return real(name, scope, *args, **kwargs)

    monkeypatch.setattr(intercept, "establish", counted)
    yield made


def _rows_are_used(session: mr.Session, model: nn.Module) -> None:
    """The rows of the capture's last forward are the experts each router used in it."""
    routes = session.routes()
    routers = [m for m in model.modules() if isinstance(m, _Used)]
    for name, r in zip(session.names, routers, strict=True):
        assert r.used is not None
        rows = routes.layer(name).long()[-len(r.used) :]
        assert torch.equal(r.used.long(), rows), f"'{name}': the rows are not the experts used"


@pytest.mark.reliability("silent replays")
def test_arguments_that_vary_with_the_tokens_establish_nothing_again(established: list[Any]) -> None:
    """A mask and position ids of the token count, a padding mask given on some forwards only (None on the others),
    a new cache object, a layer's index and a new 0-d temperature of the same value at each call: the replay is
    exact, and each router's decision is established once per mode, also over forwards of other token counts."""
    model = Layers(ArgumentsBlock)
    assert_exact(model, _x())
    with mr.attach(model) as session:
        for n in (24, 5, 9):
            with torch.no_grad(), session.capture():
                model(_x(n))
            _rows_are_used(session, model)
    assert established and len(established) == len(set(established)), established


@pytest.mark.reliability("silent replays")
def test_a_setting_handed_to_the_router_that_changes_establishes_its_decision_again(established: list[Any]) -> None:
    """A temperature and a bias per expert changed between forwards (no cut): each change establishes the decision
    again at that forward, which records the experts used, and a replay of routes recorded before forces them."""
    model = Layers(ArgumentsBlock)
    blocks = list(model.layers)
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        before = session.routes()
        first = len(established)
        for b in blocks:
            b.temperature = 0.25
            b.bias = torch.linspace(-2.0, 2.0, E)
        with torch.no_grad(), session.capture():
            model(x)
            assert len(established) == first + len(blocks)
            for b in blocks:
                assert b.bias is not None
                b.bias.mul_(-1.0)  # (in place, inside the block: the same tensor, written)
            model(x)
        assert len(established) == first + 2 * len(blocks)
        _rows_are_used(session, model)
        routes = session.routes()
        assert any(  # (the changed settings choose other experts: the replay below forces something)
            not torch.equal(routes.layer(n)[-len(x) :], before.layer(n)) for n in session.names
        )
        with torch.no_grad(), session.replay(before):
            model(x)
        for name, b in zip(session.names, blocks, strict=True):
            assert b.router.used is not None
            assert torch.equal(b.router.used.long(), before.layer(name).long()), f"'{name}': not forced"


class LeanMinimumGate(ArgumentMinWeightGate):
    """The router of ``test_public_routers13`` with its top-k through ``torch.topk``: its forwards run lean (the
    hot path, which compares its arguments too)."""

    def forward(self, x: torch.Tensor, min_weight: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        forced = self.forced
        w, idx = torch.topk(probs, self.top_k) if forced is None else (probs.gather(-1, forced), forced)
        keep = w > min_weight
        self.used = torch.where(keep, idx, -1)
        return w * keep, idx


class HandedMinimumBlock(nn.Module):
    """A block that hands its router a minimum weight as a 0-d tensor it holds, or nothing (the default)."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = LeanMinimumGate(), Experts()
        self.handed: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, **self.handed)
        return dispatch(self.experts, x, idx, w)


def _blocks(model: nn.Module) -> list[HandedMinimumBlock]:
    return [m for m in model.modules() if isinstance(m, HandedMinimumBlock)]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "change", ["written in place", "handed later", "same value in place", "inference tensor written in place"]
)
def test_a_minimum_weight_handed_to_the_router_changed_inside_a_capture_is_refused(change: str) -> None:
    """A 0-d minimum weight at 0 (nothing cut) written in place to 0.35 between two forwards of one capture (also an
    inference tensor, which counts no versions, under ``inference_mode``), or handed only from the second on (the
    default, 0, before): the next forward is refused, saying the cut; written in place with the value it had, it
    records the experts used."""
    model = Layers(HandedMinimumBlock)
    blocks = _blocks(model)
    x = _x()
    with torch.inference_mode() if change.startswith("inference") else torch.no_grad():
        for b in blocks:
            b.handed = {} if change == "handed later" else {"min_weight": torch.zeros(())}
        with mr.attach(model) as session:
            with session.capture():
                model(x)
                model(x)  # (lean from here on)
                assert all(h.interception() == "lean" for h in session._hooks)
                if change != "handed later":
                    for b in blocks:
                        b.handed["min_weight"].fill_(0.0)
                    model(x)  # (the same value, written: no change)
                for b in blocks:
                    if change == "handed later":
                        b.handed = {"min_weight": torch.tensor(0.35)}
                    else:
                        b.handed["min_weight"].fill_(0.0 if change == "same value in place" else 0.35)
                if change == "same value in place":
                    model(x)
                else:
                    with pytest.raises(mr.MoEReplayError, match="chooses again from the current scores"):
                        model(x)
            if change == "same value in place":
                _rows_are_used(session, model)
                assert all(b.router.used is not None and bool((b.router.used >= 0).all()) for b in blocks)


@pytest.mark.reliability("silent replays")
def test_a_minimum_weight_handed_to_the_router_raised_before_a_later_session_is_refused() -> None:
    """Established in one session with a minimum of 0 (kept for later sessions on the module), raised to 0.35 before
    the next: that session's first capture is refused, not a reuse of the decision established under 0."""
    model = Layers(HandedMinimumBlock)
    for b in _blocks(model):
        b.handed = {"min_weight": 0.0}
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
    for b in _blocks(model):
        b.handed = {"min_weight": 0.35}
    with mr.attach(model) as session:
        with pytest.raises(mr.MoEReplayError, match="chooses again from the current scores"):
            with torch.no_grad(), session.capture():
                model(x)


@pytest.mark.reliability("silent replays")
def test_a_minimum_weight_handed_to_a_compiled_router_raised_later_is_refused() -> None:
    """A router compiled (``fullgraph=True``), its decision established eagerly with a minimum of 0: raised
    to 0.35, the compiled forward (traced again, as torch.compile guards the number) cannot establish the decision
    again, and is refused, naming the argument."""
    model = Layers(HandedMinimumBlock)
    blocks = _blocks(model)
    for b in blocks:
        b.handed = {"min_weight": 0.0}
    x = _x()
    torch._dynamo.reset()
    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        blocks[0].router.compile(fullgraph=True, backend="eager")  # (the other runs eagerly)
        with session.capture():
            model(x)
        _rows_are_used(session, model)
        for b in blocks:
            b.handed = {"min_weight": 0.35}
        with pytest.raises(mr.MoEReplayError, match="argument 'min_weight' of its forward is not what it was"):
            with session.capture():
                model(x)


@pytest.mark.reliability("silent replays")
def test_a_tensor_minimum_weight_handed_to_a_compiled_router_raised_later_is_exact_or_refused() -> None:
    """Once silent: as above, the minimum a 0-d tensor the block holds, written in place to 0.35: the capture records
    the experts used, or is refused (compiled code compares the tensor with the value the decision was established
    with on the device, and the block is refused as it ends)."""
    model = Layers(HandedMinimumBlock)
    blocks = _blocks(model)
    for b in blocks:
        b.handed = {"min_weight": torch.zeros(())}
    x = _x()
    torch._dynamo.reset()
    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        blocks[0].router.compile(fullgraph=True, backend="eager")
        with session.capture():
            model(x)
        blocks[0].handed["min_weight"].fill_(0.35)  # (the compiled router's alone: the other would refuse)
        try:
            with session.capture():
                model(x)
        except mr.MoEReplayError:
            return
        assert blocks[0].router.used is not None and bool((blocks[0].router.used < 0).any())  # (the cut drops slots)
        _rows_are_used(session, model)


@pytest.mark.reliability("silent replays")
def test_a_tensor_minimum_weight_handed_to_a_compiled_router_compiles_once_and_is_refused_only_where_it_moved() -> None:
    """The device comparison of a tensor setting in compiled code: blocks whose minimum is left as it was capture the
    experts used and compile nothing new; the block after it was written in place is refused as it ends, naming the
    argument; written back, the next block captures exactly again, with no recompile."""
    model = Layers(HandedMinimumBlock)
    blocks = _blocks(model)
    for b in blocks:
        b.handed = {"min_weight": torch.zeros(())}
    x = _x()
    torch._dynamo.reset()
    counter = CompileCounter()
    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        blocks[0].router.compile(fullgraph=True, backend=counter)
        for _ in range(2):
            with session.capture():
                model(x)
            _rows_are_used(session, model)
        frames = counter.frame_count
        blocks[0].handed["min_weight"].fill_(0.35)
        with pytest.raises(mr.UnsupportedRouterError, match="argument 'min_weight'"), session.capture():
            model(x)
        blocks[0].handed["min_weight"].fill_(0.0)
        with session.capture():
            model(x)
        _rows_are_used(session, model)
        assert counter.frame_count == frames
