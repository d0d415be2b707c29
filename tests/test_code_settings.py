"""Flags a router's code reads from outside its module's attributes (``moe_replay._code_settings``).

Each router below runs two top-k calls of one form and a flag picks which one dispatches; it
returns a dense ``[tokens, experts]`` weight, so what it returns names no indices to check. A
decision established under one value of the flag and kept under the other records or forces
the call that no longer dispatches.
"""

from __future__ import annotations

import enum
import functools
import importlib
import os
import sys
import types
import typing
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay._code_settings import code_settings, hook_written

from . import conftest
from . import test_evidence as ev

USE_BIAS = False  # read by GlobalFlagRouter
HELPER_BIAS = False  # read by _pick, a module-level helper
SETTINGS = types.ModuleType("routing_settings")  # read by NamespaceFlagRouter as SETTINGS.use_bias
SETTINGS.use_bias = False
CALLS = 0  # counted by CountingRouter itself
WARNED = False  # set once by GlobalWarnOnceRouter itself
WARNED_OF: dict[str, bool] = {}  # set once per kind of warning by DictWarnOnceRouter itself


class _Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ev.E, ev.D))
        self.register_buffer("bias", 4 * torch.randn(ev.E))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).softmax(-1)

    def pick(self, s: torch.Tensor, biased: bool) -> torch.Tensor:
        plain, shifted = torch.topk(s, 2, dim=-1).indices, torch.topk(s + self.bias, 2, dim=-1).indices
        idx = shifted if biased else plain
        return torch.zeros_like(s).scatter(-1, idx, s.gather(-1, idx))


class GlobalFlagRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), USE_BIAS)


class NamespaceFlagRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), SETTINGS.use_bias)


class ClassFlagRouter(_Router):
    use_bias = False  # switched on the class: Router.use_bias = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.use_bias)


def _pick(router: _Router, s: torch.Tensor) -> torch.Tensor:
    return router.pick(s, HELPER_BIAS)


class HelperFlagRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pick(self, self.scores(x))


class BufferFlagRouter(_Router):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("use_bias", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), bool(self.use_bias))


def _closure_router() -> tuple[type[_Router], Callable[[], None]]:
    use_bias = False

    def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), use_bias)

    def switch() -> None:
        nonlocal use_bias
        use_bias = True

    return type("ClosureFlagRouter", (_Router,), {"forward": forward}), switch


class CountingRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global CALLS
        CALLS += 1  # its own state, changed by every forward: not a setting
        return self.pick(self.scores(x), False)


class DenseBlock(nn.Module):
    """An MoE block that dispatches by the router's dense weight: each token to the experts it weighs."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = ev.Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(x, self.router(x))

    def combine(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each token of ``x`` through the experts its row of the dense weight ``w`` weighs, summed."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = (w[:, e] != 0).nonzero(as_tuple=True)[0]
            if tok.numel():
                out = out.index_add(0, tok, w[tok, e, None] * expert(x[tok]))
        return out


def _switch_global() -> None:
    global USE_BIAS
    USE_BIAS = True


def _switch_helper() -> None:
    global HELPER_BIAS
    HELPER_BIAS = True


def _flagged(kind: str) -> tuple[nn.Module, Callable[[], None]]:
    """A two-layer model whose routers read the flag ``kind`` names, and the switch that turns it on."""
    if kind == "closure":
        cls, switch = _closure_router()
    else:
        cls = {
            "global": GlobalFlagRouter,
            "namespace": NamespaceFlagRouter,
            "class": ClassFlagRouter,
            "helper": HelperFlagRouter,
            "buffer": BufferFlagRouter,
        }[kind]
        switch = {
            "global": _switch_global,
            "namespace": lambda: setattr(SETTINGS, "use_bias", True),
            "class": lambda: setattr(ClassFlagRouter, "use_bias", True),
            "helper": _switch_helper,
        }.get(kind)
    model = ev.TwoLayers(lambda: DenseBlock(cls()))
    if kind == "buffer":

        def switch() -> None:
            for layer in model.layers:
                layer.router.use_bias.fill_(True)

    return model, switch


@pytest.fixture(autouse=True)
def _flags_off() -> Iterator[None]:
    global USE_BIAS, HELPER_BIAS, WARNED
    yield
    USE_BIAS = HELPER_BIAS = WARNED = False
    WARNED_OF.clear()
    SETTINGS.use_bias = False
    ClassFlagRouter.use_bias = False


def _dispatched_as_recorded(model: nn.Module, session: mr.Session, spy: ev.ExpertSpy) -> bool:
    routes = session.routes()
    return all(
        torch.equal(spy.experts_of(b), ev.as_sets(routes.layer(name)[-ev.T :])) for b, name in enumerate(session.names)
    )


def _warns_in_a_later_block(router: Callable[[], nn.Module]) -> None:
    """Three capture blocks of two forwards each, the second block's first forward fed a zero token (a router that
    warns once about it sets its flag there): each block's rows are the experts its forwards dispatched to."""
    model = ev.TwoLayers(lambda: DenseBlock(router()))
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            for block in range(3):
                with session.capture():
                    model(x.index_fill(0, torch.tensor([0]), 0.0) if block == 1 else x)  # (a zero token: it warns)
                    model(x)
                assert _dispatched_as_recorded(model, session, spy)
    finally:
        spy.remove()


_KINDS = ["global", "namespace", "class", "helper", "closure", "buffer"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", _KINDS)
def test_a_flag_outside_the_module_switched_between_blocks_establishes_the_decision_again(kind: str) -> None:
    """Once silent: a flag read from outside the router's attributes (a module-level global, a settings module, a
    class attribute, a helper's global, a closure cell, a 0-d bool buffer) switched between blocks kept the decision
    established under the old value, and the capture recorded the top-k that no longer dispatched."""
    _switch_and_check(*_flagged(kind))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["global", "class", "closure", "buffer"])
def test_a_flag_outside_the_module_switched_inside_a_block_is_seen_at_the_next_forward(kind: str) -> None:
    """Once silent: the same flag switched between two forwards of one capture block went unnoticed (then refused as
    the block ended). A router that returns none of its decision's indices beside another call of its form has its
    decision checked by effect at every forward: the forward after the switch records the call that dispatched."""
    _switch_inside_and_check(*_flagged(kind))


def _switch_inside_and_check(model: nn.Module, switch: Callable[[], None]) -> None:
    """Capture a forward, switch the flag, capture another in the same block: each dispatched as recorded."""
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(1))
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
            assert _dispatched_as_recorded(model, session, spy)
            switch()
            model(x)
            assert _dispatched_as_recorded(model, session, spy)
    finally:
        spy.remove()


def test_the_settings_read_by_a_routers_code_are_named_by_where_they_live() -> None:
    closure_cls, _ = _closure_router()
    assert code_settings(GlobalFlagRouter()) == {f"{__name__}.USE_BIAS": False}
    assert code_settings(HelperFlagRouter()) == {f"{__name__}.HELPER_BIAS": False}
    assert code_settings(NamespaceFlagRouter()) == {"routing_settings.use_bias": False}
    assert code_settings(ClassFlagRouter()) == {"ClassFlagRouter.use_bias": False}
    assert code_settings(closure_cls()) == {"_closure_router.<locals>.forward.<use_bias>": False}
    assert code_settings(BufferFlagRouter()) == {"buffer use_bias": False}
    router = ClassFlagRouter()
    router.use_bias = True  # an instance's own attribute is compared with the module's attributes, not here
    assert code_settings(router) == {}


def test_a_global_the_router_changes_itself_is_its_state_not_a_setting() -> None:
    """A count the router keeps in a global moves at every forward: the next block neither refuses nor establishes
    the decision again, and the runs that establish or check it put the count back (it counts the model's forwards)."""
    model = ev.TwoLayers(lambda: DenseBlock(CountingRouter()))
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            runs, established = [], []
            for _ in range(2):
                before = CALLS
                with session.capture():
                    model(x)
                    model(x)
                runs.append(CALLS - before)
                established.append([next(iter(h.evidence.values())) for h in session._hooks])
                assert _dispatched_as_recorded(model, session, spy)
            assert runs == [4, 4]  # (two routers, two forwards a block: the probe runs left no count)
            assert all(a is b for a, b in zip(*established, strict=True))  # (established once)
    finally:
        spy.remove()


class Scoring(enum.Enum):
    PLAIN = "plain"
    BIASED = "biased"


@dataclass
class _Cfg:
    scoring: Scoring = Scoring.PLAIN


class EnumFlagRouter(_Router):
    def __init__(self) -> None:
        super().__init__()
        self.scoring = Scoring.PLAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.scoring is Scoring.BIASED)


class ConfigEnumFlagRouter(_Router):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = _Cfg()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.cfg.scoring is Scoring.BIASED)


class EnvFlagRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), os.environ.get("MOE_REPLAY_TEST_BIAS") == "1")


def _switch_and_check(model: nn.Module, switch: Callable[[], None]) -> None:
    """Capture, switch the flag, capture again and replay after perturbing: each dispatched as recorded."""
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(1))
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(x)
                model(x)
            assert _dispatched_as_recorded(model, session, spy)
            switch()
            with session.capture():
                model(x)
            assert _dispatched_as_recorded(model, session, spy)
            routes = session.routes()
            ev.perturb(model)
            with session.replay(routes):
                model(x)
            for b, name in enumerate(session.names):
                assert torch.equal(spy.experts_of(b), ev.as_sets(routes.layer(name)))
    finally:
        spy.remove()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", ["attribute", "config"])
def test_a_flag_held_as_an_enum_member_switched_between_blocks_establishes_the_decision_again(where: str) -> None:
    """Once silent: a router whose dispatching top-k is picked by an ``enum`` member (``self.scoring``, or in a
    dataclass config it holds) kept the decision established under the old member once switched: only plain values
    were compared as settings. Members of an enum are now compared, by class and name."""
    if where == "attribute":
        model = ev.TwoLayers(lambda: DenseBlock(EnumFlagRouter()))

        def switch() -> None:
            for layer in model.layers:
                layer.router.scoring = Scoring.BIASED
    else:
        model = ev.TwoLayers(lambda: DenseBlock(ConfigEnumFlagRouter()))

        def switch() -> None:
            for layer in model.layers:
                layer.router.cfg.scoring = Scoring.BIASED

    _switch_and_check(model, switch)
    assert ("scoring", "Scoring.PLAIN") in mr.intercept._held_settings(_Cfg())


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["environ.get", "getenv"])
def test_a_flag_read_from_the_environment_switched_between_blocks_establishes_the_decision_again(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once silent: ``os.environ.get("...")`` (or ``os.getenv``) in a router's forward picks which top-k dispatches;
    switched between blocks, the capture recorded the call that no longer dispatched. The variable is now read as a
    setting (an unset one as None)."""
    monkeypatch.delenv("MOE_REPLAY_TEST_BIAS", raising=False)
    model = ev.TwoLayers(lambda: DenseBlock(EnvFlagRouter() if how == "environ.get" else GetenvFlagRouter()))
    _switch_and_check(model, lambda: monkeypatch.setenv("MOE_REPLAY_TEST_BIAS", "1"))


class GetenvFlagRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), os.getenv("MOE_REPLAY_TEST_BIAS", "0") == "1")


# ----------------------------------------------------------------------- flags read along a chain of the router's
@dataclass
class _Routing:
    use_bias: bool = False


@dataclass
class _NestedCfg:
    routing: _Routing = field(default_factory=_Routing)


class NestedConfigRouter(_Router):
    """``self.config.routing.use_bias``: a dataclass inside the config (a namespace where ``namespace`` is set)."""

    def __init__(self, namespace: bool = False) -> None:
        super().__init__()
        self.config = (
            types.SimpleNamespace(routing=types.SimpleNamespace(use_bias=False)) if namespace else _NestedCfg()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.config.routing.use_bias)


class PropertyFlagRouter(_Router):
    """A public property over a private attribute."""

    getter_runs = 0

    def __init__(self) -> None:
        super().__init__()
        self._use_bias = False

    @property
    def use_bias(self) -> bool:
        type(self).getter_runs += 1
        return self._use_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.use_bias)


class ListFlagRouter(_Router):
    def __init__(self) -> None:
        super().__init__()
        self.flags = [False, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.flags[0])


class TensorFlagRouter(_Router):
    """A 0-d boolean tensor held as a plain attribute, not a registered buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.use_bias = torch.tensor(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), bool(self.use_bias))


class DefaultFlagRouter(_Router):
    """The flag is the forward's default argument (switched through ``forward.__defaults__``)."""

    def forward(self, x: torch.Tensor, use_bias: bool = False) -> torch.Tensor:
        return self.pick(self.scores(x), use_bias)


class WeakParentRouter(_Router):
    """Reads the flag of the block that holds it, through a weak reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.parent_ref().use_bias)


class OwnerRouter(_Router):
    """Reads the flag of the block that holds it, through a plain reference (set past ``nn.Module``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.owner.use_bias)


class _TupleCfg(typing.NamedTuple):
    use_bias: bool = False


class NamedTupleConfigRouter(_Router):
    """Reads its flag from a ``NamedTuple`` config, replaced wholesale to switch it (``cfg._replace(...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = _TupleCfg()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.cfg.use_bias)


BIAS_VAR = "MOE_REPLAY_TEST_NAMED_BIAS"  # the variable EnvByNameRouter reads, named by a module-level constant
FLAG_AT = 0  # the item of ``self.flags`` IndexedFlagRouter reads, named by a module-level constant


class EnvByNameRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), os.environ.get(BIAS_VAR, "0") == "1")


class IndexedFlagRouter(_Router):
    def __init__(self) -> None:
        super().__init__()
        self.flags = [False]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.flags[FLAG_AT])


def _chained(kind: str) -> tuple[nn.Module, Callable[[], None]]:
    """A two-layer model whose routers read a flag along the chain ``kind`` names, and the switch that turns it on."""
    make: Callable[[], nn.Module] = {
        "nested dataclass": NestedConfigRouter,
        "nested namespace": lambda: NestedConfigRouter(namespace=True),
        "property": PropertyFlagRouter,
        "list item": ListFlagRouter,
        "tensor attribute": TensorFlagRouter,
        "default argument": DefaultFlagRouter,
        "weakref to the block": WeakParentRouter,
        "reference to the block": OwnerRouter,
        "named tuple": NamedTupleConfigRouter,
        "item by a named index": IndexedFlagRouter,
    }[kind]
    model = ev.TwoLayers(lambda: DenseBlock(make()))
    for layer in model.layers:
        layer.use_bias = False
        if kind == "weakref to the block":
            layer.router.parent_ref = weakref.ref(layer)
        elif kind == "reference to the block":
            object.__setattr__(layer.router, "owner", layer)

    def switch() -> None:
        for layer in model.layers:
            r = layer.router
            if kind.startswith("nested"):
                r.config.routing.use_bias = True
            elif kind == "property":
                r._use_bias = True
            elif kind in ("list item", "item by a named index"):
                r.flags[0] = True
            elif kind == "named tuple":
                r.cfg = r.cfg._replace(use_bias=True)
            elif kind == "tensor attribute":
                r.use_bias.fill_(True)
            elif kind.endswith("the block"):
                layer.use_bias = True
        if kind == "default argument":
            DefaultFlagRouter.forward.__defaults__ = (True,)

    return model, switch


@pytest.fixture
def _default_off() -> Iterator[None]:
    yield
    DefaultFlagRouter.forward.__defaults__ = (False,)


_CHAINED = [
    "nested dataclass",
    "nested namespace",
    "property",
    "list item",
    "tensor attribute",
    "default argument",
    "weakref to the block",
    "reference to the block",
]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", _CHAINED)
@pytest.mark.usefixtures("_default_off")
def test_a_flag_read_along_a_chain_switched_between_blocks_establishes_the_decision_again(kind: str) -> None:
    """Once silent: a flag two levels into a config (``self.config.routing.use_bias``), a property over a private
    attribute, a list's item, a 0-d tensor held as a plain attribute, the forward's default argument, or the holding
    block's flag read through a weak or plain reference, switched between blocks, kept the decision established under
    its old value: a capture recorded the top-k that no longer dispatched. The chains of attributes, constant
    subscripts and weak-reference calls the code reads are now followed (statically) and compared as settings."""
    _switch_and_check(*_chained(kind))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["named tuple", "item by a named index", "environment by a named key"])
def test_a_flag_in_a_named_tuple_or_at_a_key_named_by_a_constant_switched_between_blocks_establishes_it_again(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once silent: a flag read from a ``NamedTuple`` config (replaced wholesale: ``cfg._replace(use_bias=True)``; its
    fields are C descriptors of its class, which the chain stopped at), or at an item or environment variable named by
    a module-level constant (``self.flags[FLAG_AT]``, ``os.environ.get(BIAS_VAR)``: the chain ended at the global)
    was not read, so a switch between blocks kept the decision established under the old value and the capture
    recorded the top-k that no longer dispatched."""
    if kind == "environment by a named key":
        monkeypatch.delenv(BIAS_VAR, raising=False)
        model, switch = ev.TwoLayers(lambda: DenseBlock(EnvByNameRouter())), lambda: monkeypatch.setenv(BIAS_VAR, "1")
    else:
        model, switch = _chained(kind)
    _switch_and_check(model, switch)
    router = model.layers[0].router
    key = {"named tuple": "self.cfg.use_bias", "item by a named index": "self.flags[0]"}.get(kind)
    assert key is None or code_settings(router).get(key) is True


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["nested dataclass", "property", "tensor attribute", "reference to the block"])
@pytest.mark.usefixtures("_default_off")
def test_a_flag_read_along_a_chain_switched_inside_a_block_is_seen_at_the_next_forward(kind: str) -> None:
    _switch_inside_and_check(*_chained(kind))


def test_the_chains_a_routers_code_reads_are_named_and_read_without_running_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOE_REPLAY_TEST_BIAS", "1")
    assert code_settings(NestedConfigRouter()) == {"self.config.routing.use_bias": False}
    assert code_settings(ListFlagRouter()) == {"self.flags[0]": False}
    assert code_settings(TensorFlagRouter()) == {"self.use_bias": False}
    assert code_settings(DefaultFlagRouter()) == {"DefaultFlagRouter.forward(default use_bias)": False}
    assert code_settings(EnvFlagRouter()) == {"os.environ.get('MOE_REPLAY_TEST_BIAS')": "1"}
    assert code_settings(GetenvFlagRouter()) == {"os.getenv('MOE_REPLAY_TEST_BIAS', '0')": "1"}
    router = WeakParentRouter()
    block = nn.Module()
    block.use_bias = True
    router.parent_ref = weakref.ref(block)
    assert code_settings(router) == {"self.parent_ref().use_bias": True}
    before = PropertyFlagRouter.getter_runs
    assert code_settings(PropertyFlagRouter()) == {"self.use_bias<_use_bias>": False}  # (what its getter reads)
    assert PropertyFlagRouter.getter_runs == before  # (its getter's code is read, not run)
    router = NestedConfigRouter()
    router.config.routing.use_bias = True  # (the names are read once per class; the values at each call)
    assert code_settings(router) == {"self.config.routing.use_bias": True}


class ArgFlagRouter(_Router):
    def forward(self, x: torch.Tensor, use_bias: bool = False) -> torch.Tensor:
        return self.pick(self.scores(x), use_bias)


class PassingBlock(DenseBlock):
    """An MoE block that passes its own flag to the router it calls: ``self.router(x, use_bias=self.use_bias)``."""

    def __init__(self) -> None:
        super().__init__(ArgFlagRouter())
        self.use_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(x, self.router(x, use_bias=self.use_bias))


@pytest.mark.reliability("silent replays")
def test_a_flag_the_calling_block_passes_as_an_argument_switched_between_blocks_establishes_the_decision_again() -> (
    None
):
    """Once silent: the block that calls the router passes its own flag as a keyword argument; the router (the scope)
    holds no trace of it, so a switch between blocks kept the decision of the old value. A router that returns none of
    its decision's indices and makes other calls of the decision's form has its decision checked by effect at every
    forward: which of them dispatches may hang on what it is given."""
    model = ev.TwoLayers(PassingBlock)

    def switch() -> None:
        for layer in model.layers:
            layer.use_bias = True

    _switch_and_check(model, switch)


class WarnOnceRouter(_Router):
    """Warns once, at its third forward (a capacity overflow, say): the flag it sets is its state, not a setting."""

    def __init__(self) -> None:
        super().__init__()
        self._step = 0
        self._warned = False
        self._capacity: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._step += 1
        if self._step == 3 and not self._warned:
            self._warned = True
        if self._capacity is None and self._step > 2:  # (a cache filled once, later than the first forward)
            self._capacity = 2 * x.shape[0]
        return self.pick(self.scores(x), False)


def test_an_attribute_the_routers_own_code_assigns_later_than_its_first_forward_is_not_refused() -> None:
    """Once refused: a flag the router's forward sets once (a warning given, a cache filled), at a forward after the
    one that followed the establishment, read as a setting changed inside the block. What its code assigns on itself
    is its state."""
    model = ev.TwoLayers(lambda: DenseBlock(WarnOnceRouter()))
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            for _ in range(3):
                with session.capture():
                    model(x)
                    model(x)
                assert _dispatched_as_recorded(model, session, spy)
        assert all(layer.router._warned and layer.router._capacity == 2 * ev.T for layer in model.layers)
    finally:
        spy.remove()


class PrivateWarmupRouter(_Router):
    """Its biased top-k dispatches once a private step count passes a warm-up."""

    def __init__(self) -> None:
        super().__init__()
        self._step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._step += 1
        return self.pick(self.scores(x), self._step > 3)


@pytest.mark.reliability("silent replays")
def test_a_private_step_count_that_picks_which_call_dispatches_is_checked_at_every_forward() -> None:
    """Once silent: a warm-up read from a private step count (``self._step``) was not the modules' own state to the
    check at every forward (only public attributes were), so the decision established before the warm-up was kept
    after it, and the capture recorded the plain top-k while the biased one dispatched."""
    model = ev.TwoLayers(lambda: DenseBlock(PrivateWarmupRouter()))
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            for _ in range(5):
                with session.capture():
                    model(x)
                assert _dispatched_as_recorded(model, session, spy)
    finally:
        spy.remove()


class HookedFlagRouter(_Router):
    """Its biased top-k dispatches while a public flag is on: the flag a forward pre-hook may switch."""

    def __init__(self) -> None:
        super().__init__()
        self.use_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), self.use_bias)


def _count_calls(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.calls = getattr(module, "calls", 0) + 1  # a profiling hook's count: state, changed at every forward


def _warm_up_by_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.calls = getattr(module, "calls", 0) + 1
    module.use_bias = module.calls > 2  # a warm-up the hook switches: which call dispatches changes mid-block


def _hooked_model(hook: Callable[[nn.Module, tuple[Any, ...]], None]) -> nn.Module:
    model = ev.TwoLayers(lambda: DenseBlock(HookedFlagRouter()))
    for layer in model.layers:
        layer.router.register_forward_pre_hook(hook)
    return model


def test_a_count_a_forward_hook_keeps_on_the_router_is_its_state_not_a_setting() -> None:
    """Once refused: a forward pre-hook that counts the router's calls in a public attribute (``m.calls += 1``, as
    profiling and logging hooks do) changed a "setting" at every forward, and every block of more than one forward
    was refused as the model changing inside it. What a hook on the router assigns on it is state, as what the
    router's own forward assigns is."""
    model = _hooked_model(_count_calls)
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            for _ in range(2):
                with session.capture():
                    for _ in range(3):
                        model(x)
                    assert _dispatched_as_recorded(model, session, spy)
            routes = session.routes()
            assert routes.num_tokens == 3 * ev.T
            with session.replay(routes):
                for _ in range(3):
                    model(x)
    finally:
        spy.remove()
    assert all(layer.router.calls == 9 for layer in model.layers)


@pytest.mark.reliability("silent replays")
def test_a_flag_a_forward_hook_switches_mid_block_is_checked_at_every_forward() -> None:
    """A hook's state is not trusted to be a count: a pre-hook that switches which of two top-k calls dispatches
    (a warm-up kept by the hook) inside one block has each forward's rows recorded from the call that dispatched,
    as a step count the router keeps itself has."""
    model = _hooked_model(_warm_up_by_hook)
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            for step in range(5):
                with session.capture():
                    model(x)
                    assert _dispatched_as_recorded(model, session, spy), step
            assert all(layer.router.use_bias for layer in model.layers)  # (the switch happened in the blocks)
    finally:
        spy.remove()


def test_what_a_hook_object_assigns_on_itself_is_not_read_as_the_routers_state() -> None:
    """A hook that is a bound method gets its module as its second argument: what it assigns on ``self`` (its own
    object) is not the router's, so the router's attribute of that name stays a setting."""

    class Profiler:
        use_bias = False

        def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
            self.use_bias = True  # its own attribute, not the router's
            module.seen = True

    router = HookedFlagRouter()
    router.register_forward_pre_hook(Profiler().hook)
    router.register_forward_pre_hook(_count_calls)
    assert hook_written(router) == {"self.seen", "self.calls"}


class GlobalWarnOnceRouter(_Router):
    """Warns once per process of an all-zero token, remembered in a module-level flag (``global WARNED``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global WARNED
        if not WARNED and bool((x == 0).all(-1).any()):
            WARNED = True
        return self.pick(self.scores(x), False)


def test_a_global_the_routers_own_code_assigns_later_than_its_first_forward_is_not_refused() -> None:
    """Once refused: a warn-once flag kept in a global the forward assigns (``global WARNED; WARNED = True``), set in
    a later block than the one that established the decision, read as a setting changed inside that block."""
    _warns_in_a_later_block(GlobalWarnOnceRouter)
    assert WARNED


class DictWarnOnceRouter(_Router):
    """Warns once per kind of warning, remembered in a module-level dict (``WARNED_OF["zero"] = True``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not WARNED_OF.get("zero") and bool((x == 0).all(-1).any()):
            WARNED_OF["zero"] = True
        return self.pick(self.scores(x), False)


def test_an_entry_the_routers_own_code_stores_in_a_global_dict_is_not_refused() -> None:
    """Once refused: an entry the router's own code stores in a module-level dict (``WARNED_OF["zero"] = True``, a
    warn-once registry), set in a later block than the one that established the decision, was read as a setting (the
    chain ``WARNED_OF.get('zero')``) changed inside that block. The entries a router's code stores are its state."""
    _warns_in_a_later_block(DictWarnOnceRouter)
    assert WARNED_OF == {"zero": True}


WARMUP = 3  # forwards before the routers below switch to their biased top-k
STEPS: dict[str, int] = {"step": 0}  # counted by DictStepRouter
STEP_TENSOR = torch.zeros((), dtype=torch.long)  # counted in place by TensorStepRouter
STEP_LOG: list[int] = []  # appended to by LogLengthRouter, whose length is its step count
STEP_ITER = iter(range(10**9))  # drawn from by IterStepRouter


class ClassStepRouter(_Router):
    """Counts its steps in a class attribute (``type(self)._step += 1``), shared by every instance."""

    _step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self)._step += 1
        return self.pick(self.scores(x), self._step > 2 * WARMUP)  # (two routers count)


def _cell_step_router() -> type[_Router]:
    step = 0

    def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
        nonlocal step
        step += 1
        return self.pick(self.scores(x), step > 2 * WARMUP)

    return type("CellStepRouter", (_Router,), {"forward": forward})


class DictStepRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        STEPS["step"] += 1
        return self.pick(self.scores(x), STEPS["step"] > 2 * WARMUP)


class OwnDictStepRouter(_Router):
    """Counts its steps in an entry of a dict it holds (``self._state["step"] += 1``)."""

    def __init__(self) -> None:
        super().__init__()
        self._state = {"step": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._state["step"] += 1
        return self.pick(self.scores(x), self._state["step"] > WARMUP)


class TensorStepRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        STEP_TENSOR.add_(1)
        return self.pick(self.scores(x), bool(STEP_TENSOR > 2 * WARMUP))


class LogLengthRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        STEP_LOG.append(x.shape[0])
        return self.pick(self.scores(x), len(STEP_LOG) > 2 * WARMUP)


@dataclass
class _SharedCounter:
    warmup: int = 2 * WARMUP
    step: int = 0


class SharedConfigStepRouter(_Router):
    """Counts its steps in a dataclass config shared by every router (``self.cfg.step += 1``)."""

    def __init__(self, cfg: _SharedCounter) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cfg.step += 1
        return self.pick(self.scores(x), self.cfg.step > self.cfg.warmup)


class FloatBufferStepRouter(_Router):
    """Counts its steps in a float 0-d buffer (``register_buffer("step", torch.zeros(()))``, ``self.step += 1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        return self.pick(self.scores(x), bool(self.step > WARMUP))


class IterStepRouter(_Router):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(x), next(STEP_ITER) % 10**6 > 2 * WARMUP)


def _stepping(kind: str) -> Callable[[], nn.Module]:
    """A maker of routers that switch to their biased top-k once a step count kept where ``kind`` says passes
    :data:`WARMUP` forwards, the count started afresh."""
    global STEP_ITER
    STEPS["step"] = 0
    STEP_TENSOR.zero_()
    STEP_LOG.clear()
    ClassStepRouter._step = 0
    STEP_ITER = iter(range(10**9))
    if kind == "closure cell":
        cls = _cell_step_router()
        return cls
    if kind == "shared dataclass config":
        cfg = _SharedCounter()
        return lambda: SharedConfigStepRouter(cfg)
    return {
        "class attribute": ClassStepRouter,
        "module-level dict": DictStepRouter,
        "dict the module holds": OwnDictStepRouter,
        "global tensor": TensorStepRouter,
        "length of a global list": LogLengthRouter,
        "float buffer": FloatBufferStepRouter,
        "iterator": IterStepRouter,
    }[kind]


def _assert_warmup_followed(kind: str) -> None:
    make = _stepping(kind)
    model = ev.TwoLayers(lambda: DenseBlock(make()))
    x = torch.randn(ev.T, ev.D)
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():  # (established before the warm-up ends)
                model(x)
            assert _dispatched_as_recorded(model, session, spy)
            for _ in range(2 * WARMUP):  # the warm-up ends outside the blocks
                model(x)
            with session.capture():
                model(x)
            assert _dispatched_as_recorded(model, session, spy)
    finally:
        spy.remove()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "kind",
    [
        "class attribute",
        "closure cell",
        "module-level dict",
        "dict the module holds",
        "global tensor",
        "length of a global list",
        "shared dataclass config",
    ],
)
def test_a_step_count_kept_outside_the_modules_attributes_is_checked_at_every_forward(kind: str) -> None:
    """Once silent, or refused for a later choice: a warm-up counted in a class attribute, a closure cell (``nonlocal
    step``), an entry of a dict, a tensor changed in place, the length of a list the router appends to, or a config
    object shared by every router. The runs that establish a decision did not put such state back (they moved the
    count past the warm-up, or hundreds of steps on), and the router was not checked at each forward, so the
    decision established before the warm-up ended was kept after it: the capture recorded the top-k that no longer
    dispatched. Such state is put back after those runs, and a router whose code reads it is checked as one that
    counts in its attributes."""
    _assert_warmup_followed(kind)


@pytest.mark.reliability("silent replays")
def test_a_step_count_kept_in_a_float_buffer_is_checked_at_every_forward() -> None:
    """Once silent: a warm-up counted in a float 0-d buffer (``torch.zeros(())``, as a step kept beside float
    statistics) was no setting nor state (only tensors of one boolean or integer element were read), so the router
    was not checked at each forward and the capture recorded the top-k that no longer dispatched."""
    _assert_warmup_followed("float buffer")
    model = ev.TwoLayers(lambda: DenseBlock(FloatBufferStepRouter()))
    assert code_settings(model.layers[0].router)["self.step"] == 0.0


@pytest.mark.reliability("silent replays")
def test_a_step_count_drawn_from_an_iterator_is_checked_at_every_forward() -> None:
    """Once silent where the warm-up outlasted the runs that establish the decision: a count kept inside an object the
    router's code only calls is neither put back after those runs nor seen as state. A router that returns none of its
    decision's indices beside other calls of its form has its decision checked by effect at every forward, so each
    forward's rows are the dispatching call's (the checking runs still draw from the iterator: the warm-up ends
    earlier than it would without the session)."""
    global WARMUP
    saved, WARMUP = WARMUP, 400
    try:
        _assert_warmup_followed("iterator")
    finally:
        WARMUP = saved


MODULE_STEP = 0  # counted by the routers of _module_step_router through the module object


def _module_step_router(how: str) -> type[_Router]:
    """A router that counts its steps in a global it reaches through its module object, by the module's name."""

    class ModuleStepRouter(_Router):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if how == "sys.modules[__name__]":
                sys.modules[__name__].MODULE_STEP += 1
            elif how == "sys.modules.get(__name__)":
                sys.modules.get(__name__).MODULE_STEP += 1  # type: ignore[union-attr]
            elif how == "importlib.import_module(__name__)":
                importlib.import_module(__name__).MODULE_STEP += 1
            else:
                import_module(__name__).MODULE_STEP += 1
            return self.pick(self.scores(x), importlib.import_module(__name__).MODULE_STEP > 10**6)

    return ModuleStepRouter


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "how",
    [
        "sys.modules[__name__]",
        "sys.modules.get(__name__)",
        "importlib.import_module(__name__)",
        "import_module(__name__), imported by name",
    ],
)
def test_a_step_count_changed_through_the_modules_object_is_put_back_after_the_checking_runs(how: str) -> None:
    """Once not put back: a count the router's code changes through its module object, reached by the module's name
    (``sys.modules[__name__].STEP += 1``), was not seen as its state; the runs that establish and check the decision
    moved it (a warm-up ended early). The module reached by its name is now read as the code's globals: the count
    moves by the routers' own forwards alone, 2 per model forward."""
    global MODULE_STEP
    MODULE_STEP = 0
    model = ev.TwoLayers(lambda: DenseBlock(_module_step_router(how)()))
    with mr.attach(model) as session, torch.no_grad():
        for _ in range(2):
            with session.capture():
                model(torch.randn(ev.T, ev.D))
    assert MODULE_STEP == 4


def _warn_once_router(kind: str) -> type[_Router]:
    """A router that notes once that it saw an all-zero token, where ``kind`` says; its dispatch never changes."""
    noted: dict[str, bool] = {}
    flags = types.SimpleNamespace(warned=False)

    def note() -> None:
        noted["zero"] = True

    def zero(x: torch.Tensor) -> bool:
        return bool((x == 0).all(-1).any())

    if kind == "nonlocal":
        warned = False

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            nonlocal warned
            if not warned and zero(x):
                warned = True
            return self.pick(self.scores(x), False)

    elif kind == "type(self) attribute":

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            if not self._warned and zero(x):
                type(self)._warned = True
            return self.pick(self.scores(x), False)

    elif kind == "instance over class attribute":

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            if not self._warned and zero(x):
                self._warned = True
            return self.pick(self.scores(x), False)

    elif kind == "namespace attribute":

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            if not flags.warned and zero(x):
                flags.warned = True
            return self.pick(self.scores(x), False)

    elif kind == "dict by a helper":

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            if not noted.get("zero") and zero(x):
                note()
            return self.pick(self.scores(x), False)

    else:  # setdefault

        def forward(self: _Router, x: torch.Tensor) -> torch.Tensor:
            if zero(x):
                noted.setdefault("zero", True)
            return self.pick(self.scores(x), bool(noted.get("never", False)))

    return type("WarnOnce", (_Router,), {"forward": forward, "_warned": False})


@pytest.mark.parametrize(
    "kind",
    [
        "nonlocal",
        "type(self) attribute",
        "instance over class attribute",
        "namespace attribute",
        "dict by a helper",
        "setdefault",
    ],
)
def test_a_warn_once_flag_the_routers_own_code_sets_outside_its_attributes_is_not_refused(kind: str) -> None:
    """Once refused: a warn-once flag the router's code sets in a closure cell, on its class (``type(self)._warned =
    True``, or on the instance over a class default), on a namespace or in a dict (by a helper it calls, or by
    ``setdefault``), set in a later block than the one that established the decision, read as a setting changed
    inside that block."""
    _warns_in_a_later_block(_warn_once_router(kind))


def pick_by_sign(s: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A helper another module's router calls: two top-k of one form, the biased one where ``x``'s mean is positive."""
    plain, shifted = torch.topk(s, 2, dim=-1).indices, torch.topk(s + bias, 2, dim=-1).indices
    return shifted if bool(x.mean() > 0) else plain


class HookFlaggedTop1(_Router):
    """Top-1 by ``argmax``, of its biased scores where ``use_bias`` is on: a flag its hooks set from the input."""

    use_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scores(x)
        plain, shifted = s.argmax(-1, keepdim=True), (s + self.bias).argmax(-1, keepdim=True)
        idx = shifted if self.use_bias else plain
        return torch.zeros_like(s).scatter(-1, idx, s.gather(-1, idx))


def _flag_by_sign(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.use_bias = bool(args[0].mean() > 0)


def _flag_off(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    module.use_bias = False


class _FlagBySign:
    """A pre-hook as a callable object."""

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        module.use_bias = bool(args[0].mean() > 0)


def _set_and_put_back(kind: str, router: nn.Module) -> list[Any]:
    """Hooks on ``router`` that set its flag from the input before its forward and put it back after, as ``kind``."""
    if kind == "module-wide":  # (torch's global hooks, which run for every module: the flag set on routers only)
        return [
            torch.nn.modules.module.register_module_forward_pre_hook(
                lambda m, a: _flag_by_sign(m, a) if isinstance(m, HookFlaggedTop1) else None
            ),
            torch.nn.modules.module.register_module_forward_hook(
                lambda m, a, o: _flag_off(m, a, o) if isinstance(m, HookFlaggedTop1) else None
            ),
        ]
    pre, post = {
        "partial": (functools.partial(_flag_by_sign), functools.partial(_flag_off)),
        "lambda": (
            lambda m, a: setattr(m, "use_bias", bool(a[0].mean() > 0)),
            lambda m, a, o: setattr(m, "use_bias", False),
        ),
        "object": (_FlagBySign(), functools.partial(_flag_off)),
        "after attach": (_flag_by_sign, _flag_off),
    }[kind]
    return [router.register_forward_pre_hook(pre), router.register_forward_hook(post)]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["partial", "lambda", "object", "module-wide", "after attach"])
def test_a_flag_hooks_set_from_the_input_and_put_back_is_checked_at_every_forward(kind: str) -> None:
    """Once silent: a pre-hook set a router's flag from its input and a forward hook put it back, so no setting
    changed between forwards; hooks that are no plain function (or registered after the decision was established)
    are not read as state, and a top-1 ``argmax`` decision never had what it returned compared, so the plain call
    was recorded while the biased one dispatched. A router whose decision has twins of its form and is not one
    top-k is now checked by its effect at every forward."""
    model = ev.TwoLayers(lambda: DenseBlock(HookFlaggedTop1()))
    spy, handles = ev.ExpertSpy(model), []
    try:
        with mr.attach(model) as session, torch.no_grad():
            if kind == "after attach":
                model(_signed(0))  # (established with no hook on the routers)
            for block in model.layers:
                handles += _set_and_put_back(kind, block.router) if kind != "module-wide" or not handles else []
            with session.capture():
                for step in range(3):
                    model(_signed(step))
                    assert _dispatched_as_recorded(model, session, spy), step
    finally:
        spy.remove()
        for h in handles:
            h.remove()


def _signed(step: int) -> torch.Tensor:
    """Inputs whose mean is negative at even steps and positive at odd ones."""
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(step))
    return x + (1.0 if step % 2 else -1.0)


# ----------------------------------------------------------------------- random generators outside the module
_NOISE_RNG = torch.Generator().manual_seed(11)  # drawn from by GlobalGeneratorRouter


class _Sampler:
    """A plain object (no module) that holds the generator a router draws from."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(12)


class LazyNoise(torch.autograd.Function):
    """Megatron-core ``RandomSTE``-like: noise from a generator the class creates on first use, gradient passed."""

    generator: torch.Generator | None = None

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if LazyNoise.generator is None:
            LazyNoise.generator = torch.Generator().manual_seed(13)
        return x * (0.5 + torch.rand(x.shape, generator=LazyNoise.generator))

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _JitterRouter(nn.Module):
    """Multiplicative jitter of the input in training, then a top-2 (``independent``: a top-1 in each half of the
    experts, Hetu's k top-1, which moe_replay refuses after its probe runs)."""

    def __init__(self, independent: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ev.E, ev.D))
        self.independent = independent

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.rand_like(x)  # (the default random stream)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            x = x * self.noise(x)
        probs = F.linear(x, self.weight).softmax(-1)
        if not self.independent:
            return probs.topk(2, dim=-1)
        halves = [torch.topk(half, 1, dim=-1) for half in probs.split(ev.E // 2, dim=-1)]
        idx = torch.cat([halves[0].indices, halves[1].indices + ev.E // 2], dim=-1)
        return torch.cat([halves[0].values, halves[1].values], dim=-1), idx


class GlobalGeneratorRouter(_JitterRouter):
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.rand(x.shape, generator=_NOISE_RNG)


class ClassGeneratorRouter(_JitterRouter):
    rng = torch.Generator().manual_seed(14)  # (the class's, shared by its instances)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.rand(x.shape, generator=self.rng)


class ChainGeneratorRouter(_JitterRouter):
    def __init__(self, independent: bool = False) -> None:
        super().__init__(independent)
        self.sampler = _Sampler()

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + torch.rand(x.shape, generator=self.sampler.generator)


class FunctionGeneratorRouter(_JitterRouter):
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return LazyNoise.apply(torch.ones_like(x))


def _cell_generator_router() -> type[_JitterRouter]:
    rng = torch.Generator().manual_seed(15)

    class CellGeneratorRouter(_JitterRouter):
        def noise(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 + torch.rand(x.shape, generator=rng)

    return CellGeneratorRouter


CellGeneratorRouter = _cell_generator_router()


class _Tools:
    """A plain object whose method draws from a generator it keeps in a dict (found by no reading of the code)."""

    def __init__(self) -> None:
        self.state = {"generator": torch.Generator().manual_seed(16)}

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape, generator=self.state["generator"])


class ContainerGeneratorRouter(_JitterRouter):
    def __init__(self, independent: bool = False) -> None:
        super().__init__(independent)
        self.tools = {"noise": _Tools()}

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + self.tools["noise"].draw(x)


GENERATOR_ROUTERS: dict[str, type[_JitterRouter]] = {
    "default stream": _JitterRouter,
    "global": GlobalGeneratorRouter,
    "class attribute": ClassGeneratorRouter,
    "attribute chain": ChainGeneratorRouter,
    "closure cell": CellGeneratorRouter,
    "autograd function, created on first use": FunctionGeneratorRouter,
    "held in a container, drawn from by a call": ContainerGeneratorRouter,
}


def _generator_of(router: nn.Module) -> torch.Generator | None:
    """The generator a router of :data:`GENERATOR_ROUTERS` draws from (read directly, never through moe_replay)."""
    if isinstance(router, CellGeneratorRouter):
        return type(router).noise.__closure__[0].cell_contents
    if isinstance(router, GlobalGeneratorRouter):
        return _NOISE_RNG
    if isinstance(router, ClassGeneratorRouter):
        return ClassGeneratorRouter.rng
    if isinstance(router, ChainGeneratorRouter):
        return router.sampler.generator
    if isinstance(router, ContainerGeneratorRouter):
        return router.tools["noise"].state["generator"]
    return LazyNoise.generator if isinstance(router, FunctionGeneratorRouter) else None


def _random_state(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default stream's state and that of the generator the router draws from (None: it holds none)."""
    g = _generator_of(router)
    return torch.get_rng_state(), None if g is None else g.get_state()


def _same_random_state(
    a: tuple[torch.Tensor, torch.Tensor | None], b: tuple[torch.Tensor, torch.Tensor | None]
) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


@pytest.fixture
def fresh_lazy_noise() -> Iterator[None]:
    """``LazyNoise`` without its generator (as before its first use), and so again after the test."""
    LazyNoise.generator = None
    yield
    LazyNoise.generator = None


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("kind", list(GENERATOR_ROUTERS))
def test_the_probe_runs_leave_a_generator_the_routers_code_draws_from_as_one_forward_would(
    kind: str, fresh_lazy_noise: None
) -> None:
    """Once changed: a generator held outside the router (a global, a class's, a closure cell's, an object's it
    holds, or created on first use by an ``autograd.Function`` it applies) was drawn from by each probe run, so the
    first forward under a session left it (and, for a top-k of noise, the decision) other than one forward does;
    Megatron's forced load balancing was refused as differing between two runs. Each now draws from it as the
    plain forward does, and the default stream is left as one forward leaves it."""
    cls = GENERATOR_ROUTERS[kind]
    model = ev.TwoLayers(lambda: ev.RouterBlock(cls())).train()
    routers = [block.router for block in model.layers]
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(2))
    start = [_random_state(r) for r in routers]
    with torch.no_grad():
        want = model(x)
    after_plain = [_random_state(r) for r in routers]
    assert not _same_random_state(after_plain[0], start[0]), "the router draws nothing"
    torch.set_rng_state(start[0][0])  # (back to the start, by hand)
    for r, (_, state) in zip(routers, start, strict=True):
        if state is not None:
            _generator_of(r).set_state(state)
        else:
            LazyNoise.generator = None
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        got = model(x)
    assert all(_same_random_state(_random_state(r), a) for r, a in zip(routers, after_plain, strict=True))
    assert torch.equal(got, want)
    assert [s.top_k for s in session.sites] == [2, 2]


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("kind", list(GENERATOR_ROUTERS))
def test_a_refused_attach_leaves_every_random_state_the_routers_code_draws_from_as_it_was(
    kind: str, fresh_lazy_noise: None
) -> None:
    """The same routers making k independent top-1 choices, which moe_replay refuses once its probe runs have
    run: the model, the default random stream and the generator the code draws from (a class's left without one,
    where the code creates it on first use) are as they were before the attach."""
    cls = GENERATOR_ROUTERS[kind]
    model = ev.TwoLayers(lambda: ev.RouterBlock(cls(independent=True))).train()
    routers = [block.router for block in model.layers]
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x)  # (the generators created and drawn from)
    if kind.startswith("autograd"):
        LazyNoise.generator = None
    before, weights = [_random_state(r) for r in routers], conftest.snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="independent choice"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert all(_same_random_state(_random_state(r), b) for r, b in zip(routers, before, strict=True))
    assert not kind.startswith("autograd") or LazyNoise.generator is None
    conftest.assert_untouched(model, weights)


class _CountedConfig(types.SimpleNamespace):
    """A config whose attribute reads run Python code, as transformers' ``PretrainedConfig.__getattribute__`` does
    (it maps names through ``attribute_map`` at every read); it counts the reads of ``__class__``."""

    class_reads = 0

    def __getattribute__(self, key: str) -> Any:
        if key == "__class__":
            type(self).class_reads += 1
        return super().__getattribute__(key)


class _Posing:
    """An object that says it is another class (as a proxy does): ``isinstance`` believes it."""

    def __init__(self, posed: type) -> None:
        self.posed = posed

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return self.posed


def test_a_config_held_by_a_router_is_told_from_modules_and_tensors_with_one_read_of_its_class() -> None:
    """Whether an attribute is a config to read settings from runs at every block for each one a router scope holds;
    it read ``__class__`` through a config's own ``__getattribute__`` once for each class it was not (a module, a
    tensor, a class, a Python module): four Python calls per config per block. Now once, with the same answers,
    those of objects that say they are another class included."""
    from moe_replay.intercept import _config_like

    def by_isinstance(v: Any) -> bool:
        return (
            hasattr(v, "__dict__")
            and not isinstance(v, nn.Module | torch.Tensor | type | types.ModuleType)
            and not callable(v)
        )

    config = _CountedConfig(num_experts=8, norm_topk_prob=True)
    before = _CountedConfig.class_reads
    assert _config_like(config)
    assert _CountedConfig.class_reads - before <= 1
    cases = [config, types.SimpleNamespace(a=1), nn.Linear(2, 2), torch.zeros(1), int, types, print, 3, "x", {}]
    cases += [_Posing(nn.Linear), _Posing(torch.Tensor), _Posing(int), _Posing(types.SimpleNamespace), _Posing(type)]
    assert [_config_like(v) for v in cases] == [by_isinstance(v) for v in cases]
