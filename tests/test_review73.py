"""A remap of a router's ids by a setting changed between the capture and the replay block: the routes keep, for a
router whose ids reach its caller through code after its decision, the settings its capture ran under; a replay
under other values of them is refused, naming the router and the setting, whatever carried the routes (a slice, a
rename, a file, a join of captures under different values). A router that returns its decision's indices as they
are carries none, so a change of its temperature or of its gate's weights between the blocks replays as ever, and
routes built from rows (an engine's) replay as before."""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.distributed import _known, _restore
from tests.test_evidence import D
from tests.test_review71 import E, _hooked, _Model, _OwnShift


def _tokens() -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(5))


def _own_shift() -> _Model:
    """The router of test_review71 whose ids pass through a shift by an offset its own code reads."""
    model = _Model()
    model.block.router.remap = _OwnShift()
    return model


def _captured(model: _Model, x: torch.Tensor, session: mr.Session) -> tuple[mr.Routes, list[Any]]:
    with torch.no_grad(), session.capture():
        model(x)
    return session.routes(), sorted(model.block.ran[-1])


def _state(model: nn.Module) -> tuple[Any, ...]:
    """The model's tensors, hook tables and own forwards, to tell it is as it was."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    return tensors, hooks, forwards


def _same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["own code", "hook"])
def test_a_remap_setting_changed_between_capture_and_replay_is_refused_naming_it(how: str) -> None:
    """The offset the ids are shifted by (read by the router's own ``remap``, or by a user's hook on it) changed after
    the capture block: the replay block is refused before any forward, naming the router and the setting, the model
    as it was; set back, the same routes replay the captured experts on the captured tokens."""
    model = _own_shift() if how == "own code" else _Model()
    if how == "hook":
        _hooked("bound method")(model.block.router)
    x = _tokens()

    def bump(by: int) -> None:
        if how == "own code":
            model.block.router.remap.offset[0] += by
        else:
            model.block.router.offset += by

    with mr.attach(model) as session:
        routes, captured = _captured(model, x, session)
        bump(1)
        with torch.no_grad():
            model(x)
        assert sorted(model.block.ran[-1]) != captured, "the new offset runs the same experts: the case tries nothing"
        before = _state(model)
        setting = r"remap\.offset" if how == "own code" else r"'offset'"
        with pytest.raises(mr.MoEReplayError, match=rf"router 'block\.router'.*{setting}.*captured"):
            with torch.no_grad(), session.replay(routes):
                model(x)
        assert _same_state(_state(model), before)
        bump(-1)
        with torch.no_grad():
            model.block.router.gate.weight.mul_(-3)  # (a training step's kind of change: not a setting)
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


@pytest.mark.reliability("silent replays")
def test_the_settings_travel_with_slices_renames_files_and_joins() -> None:
    """A slice, a rename (replayed on a model under the new name), a saved and loaded file, a pickle and the wire
    between ranks carry the settings and are refused alike under the changed offset; a join of captures under two
    offsets is refused under either."""
    model = _own_shift()
    x = _tokens()
    with mr.attach(model) as session:
        routes, _ = _captured(model, x, session)
        model.block.router.remap.offset[0] += 1
        second, _ = _captured(model, x, session)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "r.npz")
            routes.save(path)
            loaded = mr.Routes.load(path)
        wire = _restore(mr.Routes._trusted(routes._data, routes.names, routes.experts_per_layer), _known(routes), 0)
        travelled = [("slice", routes[:3]), ("file", loaded), ("pickle", pickle.loads(pickle.dumps(routes)))]
        travelled += [("wire", wire), ("join", mr.Routes.cat([routes, second]))]
        for name, r in travelled:
            with pytest.raises(mr.MoEReplayError, match=r"router 'block\.router'.*remap\.offset"):
                with torch.no_grad(), session.replay(r):
                    model(x[:3] if name == "slice" else torch.cat([x, x]) if name == "join" else x)
        model.block.router.remap.offset[0] -= 1
        with pytest.raises(mr.MoEReplayError, match=r"different in the routes joined"):
            with torch.no_grad(), session.replay(mr.Routes.cat([routes, second])):
                model(torch.cat([x, x]))
    renamed = routes.rename({"block": "inner.block"})
    outer = nn.Module()
    outer.inner = model
    outer.forward = lambda t: outer.inner(t)  # type: ignore[method-assign]
    model.block.router.remap.offset[0] += 1
    with mr.attach(outer) as session:
        with pytest.raises(mr.MoEReplayError, match=r"router 'inner\.block\.router'.*remap\.offset"):
            with torch.no_grad(), session.replay(renamed):
                outer(x)


@pytest.mark.reliability("false refusals")
def test_routes_without_settings_replay_as_before() -> None:
    """Routes built from the rows (an engine's, a file written before the settings were kept) carry none: they
    replay under the changed offset as routes did before (the rows forced, nothing compared)."""
    model = _own_shift()
    x = _tokens()
    with mr.attach(model) as session:
        routes, _ = _captured(model, x, session)
        bare = mr.Routes(routes.per_layer(), names=routes.names, num_experts=E)
        assert bare._ids_settings is None
        model.block.router.remap.offset[0] += 1
        with torch.no_grad(), session.replay(bare):
            model(x)


class _TempRouter(nn.Module):
    """A top-2 router whose scores are divided by a temperature before the top-k; it returns the top-k's ids."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = (self.gate(x) / self.temperature).softmax(-1).topk(2, dim=-1)
        return v / v.sum(-1, keepdim=True), i


@pytest.mark.reliability("false refusals")
def test_a_temperature_and_weights_changed_between_blocks_of_a_router_without_remap_replay() -> None:
    """A router that returns its top-k's ids as they are: its temperature and its gate's weights changed between
    the capture and the replay block (they move the scores, not the experts the rows name) replay the captured
    experts on the captured tokens, and its routes carry no settings."""
    model = _Model()
    model.block.router = _TempRouter()
    torch.manual_seed(1)
    model.block.router.gate.reset_parameters()
    x = _tokens()
    with mr.attach(model) as session:
        routes, captured = _captured(model, x, session)
        assert routes._ids_settings is None
        model.block.router.temperature = 0.1
        with torch.no_grad():
            model.block.router.gate.weight.mul_(-3)
            model(x)
        assert sorted(model.block.ran[-1]) != captured, "the changed router chooses the same experts: tries nothing"
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


class _ArgmaxShift(nn.Module):
    """A top-1 router by ``argmax`` (no top-k) whose ids are shifted by an offset its own code reads."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.offset = [1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.gate(x).softmax(-1)
        i = p.argmax(-1, keepdim=True)
        return p.gather(-1, i), (i + self.offset[0]) % E


@pytest.mark.reliability("silent replays")
def test_a_remap_after_an_argmax_changed_between_capture_and_replay_is_refused_or_exact() -> None:
    """The argmax router's offset changed between the capture and the replay block: the replay runs the captured
    experts on the captured tokens, or is refused."""
    model = _Model()
    model.block.router = _ArgmaxShift()
    x = _tokens()
    with mr.attach(model) as session:
        routes, captured = _captured(model, x, session)
        model.block.router.offset[0] += 1
        try:
            with torch.no_grad(), session.replay(routes):
                model(x)
        except mr.MoEReplayError:
            return
        assert sorted(model.block.ran[-1]) == captured


class _TempShift(nn.Module):
    """A top-2 router with a temperature on its scores before the top-k, whose ids are shifted by an offset after."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.temperature = 1.0
        self.offset = [1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = (self.gate(x) / self.temperature).softmax(-1).topk(2, dim=-1)
        return v / v.sum(-1, keepdim=True), (i + self.offset[0]) % E


@pytest.mark.reliability("false refusals")
def test_a_temperature_before_the_decision_of_a_remapping_router_changed_between_blocks_replays() -> None:
    """The shifting router's temperature (read before its top-k: it moves the scores alone) changed between the
    capture and the replay block, the offset kept: the replay runs the captured experts on the captured tokens."""
    model = _Model()
    model.block.router = _TempShift()
    x = _tokens()
    with mr.attach(model) as session:
        routes, captured = _captured(model, x, session)
        model.block.router.temperature = 0.2
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured


class _ClassShift(nn.Module):
    """The ids a router hands on, shifted by an offset its code reads as a class attribute until one is set on it."""

    offset = 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids + self.offset) % E


@pytest.mark.reliability("silent replays")
def test_an_instance_attribute_set_over_the_class_attribute_it_shadows_is_the_same_setting() -> None:
    """The remap's offset read from its class at the capture, then set on the instance between the blocks: to the same
    value, the replay runs the captured experts (a test's hand-forcing sets ``self.forced = None`` over a class
    ``forced = None`` so); to another, it is refused naming the offset."""
    model = _Model()
    model.block.router.remap = _ClassShift()
    x = _tokens()
    with mr.attach(model) as session:
        routes, captured = _captured(model, x, session)
        model.block.router.remap.offset = 1
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert sorted(model.block.ran[-1]) == captured
        model.block.router.remap.offset = 2
        with pytest.raises(mr.SessionStateError, match="offset"):
            with torch.no_grad(), session.replay(routes):
                model(x)
