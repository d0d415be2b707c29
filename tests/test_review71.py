"""Two holes of round 54, closed generally: an attribute only a user's hook on a router's modules reads (the router's
own code never names it) is a setting all the same, so a change of it inside a block is refused, whatever the hook
is (a function, a pre-hook with keyword arguments, a bound method of another object, a ``functools.partial``); and a
threshold at zero of raw logits a router returns (``logits > 0``) is a choice by score, refused, while one of its
nonnegative weights (the slots its decision filled) still replays."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay._code_settings import hook_names_read
from tests.test_evidence import D
from tests.test_public_routers6 import _Used, assert_exact, assert_refused, one_layer

E = 4


class _Remap(nn.Module):
    """The ids a router hands on, as they are (a hook on it may change them)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class _Router(nn.Module):
    """A top-2 router, softmax renormalised, whose ids pass through ``remap``; ``offset`` is never read by its own
    code (only by a hook of the user's, below)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.remap = _Remap()
        self.offset = 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self.gate(x).softmax(-1).topk(2, dim=-1)
        return v / v.sum(-1, keepdim=True), self.remap(i)


class _Block(nn.Module):
    """Runs each token through the experts its router's ids name; ``ran`` keeps, per forward, the experts run and
    on which tokens (by hooks on the experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.ran: list[list[tuple[int, tuple[float, ...]]]] = []
        for e, expert in enumerate(self.experts):
            expert.register_forward_hook(functools.partial(_note, self.ran, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, i = self.router(x)
        self.ran.append([])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            m = i == e
            rows = m.any(-1)
            if rows.any():
                out[rows] = out[rows] + expert(x[rows]) * (w * m).sum(-1, keepdim=True)[rows]
        return out


def _note(ran: list[list[tuple[int, tuple[float, ...]]]], e: int, module: nn.Module, args: Any, out: Any) -> None:
    ran[-1].append((e, tuple(sorted(args[0][:, 0].tolist()))))  # (the expert, and which tokens: their first feature)


class _Shifter:
    """Another object whose bound methods are hooks that shift the ids by the router's ``offset``."""

    def __init__(self, router: _Router) -> None:
        self.router = router

    def hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return (out + self.router.offset) % E

    def pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return ((args[0] + self.router.offset) % E,), kwargs


def _shift(module: nn.Module, args: Any, out: torch.Tensor, router: _Router) -> torch.Tensor:
    return (out + router.offset) % E


def _hooked(how: str) -> Callable[[_Router], Any]:
    """A maker of the user's hook on the router's ``remap`` that reads the router's ``offset``, as ``how`` says."""
    if how == "function":
        return lambda r: r.remap.register_forward_hook(lambda m, a, o: (o + r.offset) % E)
    if how == "bound method":
        return lambda r: r.remap.register_forward_hook(_Shifter(r).hook)
    if how == "pre-hook with kwargs":
        return lambda r: r.remap.register_forward_pre_hook(_Shifter(r).pre, with_kwargs=True)
    return lambda r: r.remap.register_forward_hook(functools.partial(_shift, router=r))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["function", "bound method", "pre-hook with kwargs", "partial"])
def test_an_attribute_only_a_hook_on_the_router_reads_changed_inside_a_block_is_refused(how: str) -> None:
    """A hook of the user's on the router's ``remap`` shifts the ids by ``router.offset``, which the router's own code
    never names; ``offset`` changed between two forwards of one capture block: the first forward's experts are not
    those a replay under the new offset would run, so it is refused as a change of a setting, naming it."""
    model = _Model()
    _hooked(how)(model.block.router)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        # (where the hook runs with one offset, the other moves the experts run: the case tries something)
        assert sorted(model.block.ran[-1]) != sorted(_ran_with(model, x, model.block.router.offset + 1))
        with pytest.raises(mr.MoEReplayError, match=r"'offset' of router 'block\.router'"):
            with torch.no_grad(), session.capture():
                model(x)
                model.block.router.offset += 1
                model(x)


def _ran_with(model: _Model, x: torch.Tensor, offset: int) -> list[tuple[int, tuple[float, ...]]]:
    """The experts a free forward of ``model`` (outside every block) runs under ``offset``, on which tokens."""
    router = model.block.router
    was = router.offset
    router.offset = offset
    try:
        with torch.no_grad():
            model(x)
    finally:
        router.offset = was
    return model.block.ran[-1]


@pytest.mark.reliability("false refusals")
def test_the_same_hooks_with_the_offset_kept_replay_the_experts_run() -> None:
    """The bound-method hook in, ``offset`` kept: two forwards captured and replayed after the gate changes run the
    same experts on the same tokens as the captured forwards did (the hook's read makes no false refusal)."""
    model = _Model()
    _hooked("bound method")(model.block.router)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
            model(x * 2)
        captured = [sorted(r) for r in model.block.ran[-2:]]
        routes = session.routes()
        with torch.no_grad():
            model.block.router.gate.weight.mul_(-3)
            model(x)
        assert sorted(model.block.ran[-1]) != captured[0], "the changed gate chooses the same experts: tries nothing"
        with torch.no_grad(), session.replay(routes):
            model(x)
            model(x * 2)
        assert [sorted(r) for r in model.block.ran[-2:]] == captured


def test_hook_names_read_reads_each_kind_of_hook_and_refuses_what_it_cannot_read() -> None:
    """The names a hook's code may read a module's attributes by: a function's, a bound method's (its object's
    methods too), a partial's; None where the module it is handed escapes (to code not read) or a name is computed."""
    r = _Router()
    shifter = _Shifter(r)
    assert "offset" in (hook_names_read(shifter.hook) or ())
    assert "offset" in (hook_names_read(shifter.pre) or ())
    assert "offset" in (hook_names_read(functools.partial(_shift, router=r)) or ())
    assert hook_names_read(lambda m, a, o: print(m)) is None
    assert hook_names_read(lambda m, a, o: getattr(m, "offset")) is None  # noqa: B009


class _LogitsGate(_Used):
    """A top-2 gate, softmax renormalised, that returns its raw logits beside its weights and ids (``relu``: their
    ReLU, nonnegative, but more of them nonzero than the slots it fills)."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.w = nn.Linear(D, E, bias=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.w(x).relu() if self.relu else self.w(x)
        p = logits.softmax(-1)
        v, i = p.topk(2, dim=-1)
        if self.forced is not None:
            i = self.forced.view_as(i)
            v = p.gather(-1, i)
        return logits, v / v.sum(-1, keepdim=True), i


class _LogitsBlock(nn.Module):
    """Runs each token through its gate's experts, kept as ``how`` says: by ``logits.gather(ids) > 0`` (``gather``),
    by ``(logits > 0).gather(ids)`` (``dense``: a choice by score, both), or by ``weights > 0`` (``weights``: the slots
    the decision filled). The gate's ``used`` is the experts run."""

    def __init__(self, how: str, relu: bool = False) -> None:
        super().__init__()
        self.gate, self.how = _LogitsGate(relu), how
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, w, i = self.gate(x)
        if self.how == "gather":
            keep = logits.gather(-1, i) > 0
        elif self.how == "dense":
            keep = (logits > 0).gather(-1, i)
        else:
            keep = w > 0
        self.gate.used = torch.where(keep, i, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            m = (i == e) & keep
            rows = m.any(-1)
            if rows.any():
                out[rows] = out[rows] + expert(x[rows]) * (w * m).sum(-1, keepdim=True)[rows]
        return out


def _tokens() -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("how", "relu"), [("gather", False), ("dense", False), ("dense", True)])
def test_a_threshold_at_zero_of_raw_logits_a_router_returns_is_refused(how: str, relu: bool) -> None:
    """The block keeps a token's slot only where the gate's raw logit for it is positive (or its ReLU of the logits
    nonzero): a choice by score the routes cannot carry (it drops slots here), refused with a ``MoEReplayError`` that
    says so, the model as it was."""
    model = one_layer(lambda: _LogitsBlock(how, relu))()
    with torch.no_grad():
        model(_tokens())
    gate = next(m for m in model.modules() if isinstance(m, _LogitsGate))
    assert gate.used is not None and bool((gate.used < 0).any()), "no slot dropped: the case tries nothing"
    assert_refused(model, _tokens(), "a choice by score was made outside every attached router")


@pytest.mark.reliability("false refusals")
def test_a_threshold_at_zero_of_the_weights_beside_raw_logits_still_replays() -> None:
    """The same gate, its block keeping the slots by ``weights > 0`` (the slots its decision filled, forced with
    it): exact, in output and gradients as by hand."""
    session = assert_exact(one_layer(lambda: _LogitsBlock("weights"))(), _tokens())
    assert session.names == ("layers.0.gate",), session.names


def test_a_refused_hooked_capture_leaves_the_model_as_it_was() -> None:
    """The refusal of the offset changed inside a block leaves the model as it was: the user's hooks alone on it, no
    hook, parameter or buffer of the library's, every tensor as it was."""
    model = _Model()
    _hooked("function")(model.block.router)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mr.MoEReplayError):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
            model.block.router.offset += 1
            model(x)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


class _OwnShift(nn.Module):
    """The ids a router hands on, shifted by an offset its own code reads (``self.offset[0]``, a held list)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = [1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids + self.offset[0]) % E


@pytest.mark.reliability("silent replays")
def test_a_remap_of_the_ids_by_a_setting_changed_between_capture_and_replay_is_refused_or_exact() -> None:
    """The router's ids pass through a shift by an offset its own code reads, changed after the capture block and
    before the replay block: the replay runs the captured experts on the captured tokens, or is refused."""
    model = _Model()
    model.block.router.remap = _OwnShift()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured = sorted(model.block.ran[-1])
        routes = session.routes()
        model.block.router.remap.offset[0] += 1
        try:
            with torch.no_grad(), session.replay(routes):
                model(x)
        except mr.MoEReplayError:
            return
        assert sorted(model.block.ran[-1]) == captured
