"""Forward hooks of the user's inside a router's scope (on a submodule of the block whose forward makes the decision),
and global module hooks: the runs that establish a decision set the first aside (so that a hook that counts or logs
sees one forward), so the real forward, which runs them, is compared with what those runs gave. Each case: exact (the
recorded experts forced, the hand-forced output) or refused; never neither, whether the hook was there from the
start, added between blocks or inside one, or the first forward under a session is a replay."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import snapshot
from .test_decisions3 import (
    BiasInTheGatesHook,
    CutInASubmodulesHook,
    D,
    E,
    LoggedTopKInAGatesHook,
    Model,
    T,
    _perturb,
    _Renorm,
)


def _cut(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """A minimum-weight cut of renormalised combine weights: a choice after the decision."""
    return out * (out >= 0.3)


class PlainRenorm(CutInASubmodulesHook):
    """:class:`CutInASubmodulesHook` without its hook (the cut is added by each case)."""

    def __init__(self) -> None:
        super().__init__()
        self.renorm._forward_hooks.clear()


class CastingPreHook(BiasInTheGatesHook):
    """A pre-hook on the bare gate that rounds its input through bfloat16 (a dtype cast, as mixed-precision wrappers
    do): it changes the values the forward computes, not what chooses."""

    def __init__(self) -> None:
        super().__init__()
        self.gate._forward_hooks.clear()
        self.register_buffer("bias", torch.zeros(self.num_experts))
        self.gate.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16).float(),))

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate(x).softmax(-1).gather(-1, idx), idx)


class Log:
    """A hook that only reads: counts its calls and keeps what the submodule returned."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def __call__(self, m: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.calls += 1
        self.seen.append(out.detach().clone())


def _hooks(model: nn.Module) -> dict[str, tuple[list[Any], list[Any]]]:
    return {n: (list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for n, m in model.named_modules()}


def _sets(idx: torch.Tensor) -> torch.Tensor:
    return idx.long().sort(-1).values


def replayed(
    make: Callable[[], nn.Module],
    *,
    add: Callable[[nn.Module], Any] | None = None,
    when: str = "",
    first_replay: bool = False,
    captured_on: Callable[[], nn.Module] | None = None,
) -> str:
    """Capture a forward (on a twin made by ``captured_on`` where ``first_replay``: the replay is then the first forward
    under a session of the model replayed), move the router's weights, replay on the same tokens without gradients:
    ``"exact"``, ``"refused: ..."`` or ``"silent: ..."``. ``add`` puts a hook on the model ``"between"`` the blocks or
    ``"inside"`` the replay's block, before its forward."""
    torch.manual_seed(0)
    model = Model(make())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    if first_replay:
        twin = Model((captured_on or make)())
        twin.load_state_dict(model.state_dict())
        with mr.attach(twin) as session, torch.no_grad(), session.capture():
            twin(x)
        routes = session.routes()
    _perturb(model.moe)
    state, hooks = snapshot(model), _hooks(model)
    session = mr.attach(model)
    try:
        with torch.no_grad():
            if not first_replay:
                with session.capture():
                    model(x)
                routes = session.routes()
            if when == "between" and add is not None:
                add(model)
                state, hooks = snapshot(model), _hooks(model)
            with session.replay(routes):
                if when == "inside" and add is not None:
                    add(model)
                    state, hooks = snapshot(model), _hooks(model)
                out = model(x)
                forced = routes.per_layer()[0].long()
                if not torch.equal(_sets(model.moe.last), _sets(forced)):
                    return "silent: the replay used other experts than the recorded ones"
                want = x + model.moe.reference(x, forced)
                if not torch.allclose(out, want, atol=1e-5, rtol=1e-4):
                    return "silent: the replay's output is not the hand-forced one"
        return "exact"
    except mr.MoEReplayError as err:
        assert _hooks(model) == hooks
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        return "refused: " + str(err).split("\n")[0]
    finally:
        session.detach()


def _add_cut(model: nn.Module) -> None:
    model.moe.renorm.register_forward_hook(_cut)


@pytest.fixture
def global_cut() -> Any:
    """A global module forward hook cutting what every ``_Renorm`` returns, removed after the test."""
    handles: list[Any] = []

    def add(model: nn.Module) -> None:
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: _cut(m, args, out) if isinstance(m, _Renorm) else None
        )
        handles.append(hook)

    yield add
    for h in handles:
        h.remove()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["between", "inside"])
def test_a_cut_in_a_submodules_hook_added_after_the_decision_is_refused(when: str) -> None:
    """Once silent: a hook added after the decision was established was never compared with anything. The user's
    hooks inside a scope are a setting of its decision: added between blocks, the decision is established again at the
    next forward (whose output, with the cut, differs from the runs'); added inside a block, the block is refused."""
    got = replayed(PlainRenorm, add=_add_cut, when=when)
    assert got.startswith("refused"), got
    assert "hook" in got


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["between", "inside"])
def test_a_global_module_hook_that_cuts_added_after_the_decision_is_refused(when: str, global_cut: Any) -> None:
    """Once silent: the runs that establish a decision run the global module hooks, but one added since was in none
    of them."""
    got = replayed(PlainRenorm, add=global_cut, when=when)
    assert got.startswith("refused"), got


@pytest.mark.reliability("silent replays")
def test_a_cut_in_a_submodules_hook_is_refused_where_the_first_forward_is_a_replay() -> None:
    """Once silent: routes captured on a twin without the hook, replayed as the first forward under a session of the
    model with it. The replay's forward is compared with a run forced with the same rows, its hooks set aside."""
    got = replayed(CutInASubmodulesHook, first_replay=True, captured_on=PlainRenorm)
    assert got.startswith("refused"), got


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first_replay", [False, True], ids=["captured", "replayed first"])
@pytest.mark.parametrize("make", [BiasInTheGatesHook, CastingPreHook], ids=["bias hook", "casting pre-hook"])
def test_hooks_inside_a_scope_that_change_values_but_no_choice_replay_exactly(
    make: Callable[[], nn.Module], first_replay: bool
) -> None:
    """A hook that changes what the forward computes but chooses nothing (a bias on a gate's logits, a pre-hook that
    casts its input): established again with the hooks in, the same decision: exact."""
    assert replayed(make, first_replay=first_replay) == "exact"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["start", "between"])
def test_a_hook_that_only_reads_inside_a_scope_sees_only_the_real_forwards(when: str) -> None:
    """A hook that logs what a submodule returned changes nothing: the runs that establish the decision keep it aside,
    so it sees the real forwards alone (one call each), and the replay is exact."""
    log = Log()

    def add(model: nn.Module) -> None:
        model.moe.renorm.register_forward_hook(log)

    class Logged(PlainRenorm):
        def __init__(self) -> None:
            super().__init__()
            if when == "start":
                self.renorm.register_forward_hook(log)

    got = replayed(Logged, add=None if when == "start" else add, when=when)
    assert got == "exact", got
    assert log.calls == (2 if when == "start" else 1)
    assert all(s.shape == (T, 2) for s in log.seen)


@pytest.mark.reliability("silent replays")
def test_a_logging_hook_added_inside_a_block_replays_exactly() -> None:
    """Once a false refusal (the block refused as it ended): a hook that only reads, added inside a replay block,
    changes nothing the replay forces. The forward after it establishes the decision again with it set aside, and
    compares its output with a run forced with the same rows: exact, and the hook sees that forward alone."""
    log = Log()
    got = replayed(PlainRenorm, add=lambda model: model.moe.renorm.register_forward_hook(log), when="inside")
    assert got == "exact", got
    assert log.calls == 1


def in_turn(make: Callable[[], nn.Module], change: Callable[[nn.Module], Any], *, capture: bool = False) -> str:
    """Capture two forwards on the same tokens, move the router's weights, then replay them in one block (or,
    ``capture``, capture them again): the first forward, then ``change`` the model, then the second. ``"exact"``
    (each replayed forward used the recorded experts and gave the hand-forced output; a capture recorded the experts
    its router chose), ``"refused: ..."`` (the model as it was after the change) or ``"silent: ..."``."""
    torch.manual_seed(0)
    model = Model(make())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    session = mr.attach(model)
    state, hooks = snapshot(model), _hooks(model)
    try:
        with torch.no_grad():
            with session.capture():
                model(x)
                model(x)
            routes = session.routes()
            _perturb(model.moe)
            state, chosen = snapshot(model), []
            with session.capture() if capture else session.replay(routes):
                for step in range(2):
                    if step == 1:
                        change(model)
                        state, hooks = snapshot(model), _hooks(model)
                    out = model(x)
                    chosen.append(model.moe.last)
                    if capture:
                        continue
                    forced = routes.per_layer()[0][step * T : (step + 1) * T].long()
                    if not torch.equal(_sets(model.moe.last), _sets(forced)):
                        return f"silent: replayed forward {step} used other experts than the recorded ones"
                    if not torch.allclose(out, x + model.moe.reference(x, forced), atol=1e-5, rtol=1e-4):
                        return f"silent: replayed forward {step}'s output is not the hand-forced one"
            if capture and not torch.equal(_sets(session.routes().per_layer()[0]), _sets(torch.cat(chosen))):
                return "silent: the capture recorded other experts than the router chose"
        return "exact"
    except mr.MoEReplayError as err:
        assert _hooks(model) == hooks
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        return "refused: " + str(err).split("\n")[0]
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("capture", [False, True], ids=["replay", "capture"])
def test_a_logging_hook_added_after_its_router_ran_in_the_block_is_exact(capture: bool) -> None:
    """Once a false refusal: added inside a block after its router's first forward there, a hook that only reads
    establishes the decision again at the forward after it (the one before ran without it): exact, and the hook sees
    that one forward."""
    log = Log()
    got = in_turn(PlainRenorm, lambda model: model.moe.renorm.register_forward_hook(log), capture=capture)
    assert got == "exact", got
    assert log.calls == 1


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", ["submodule", "global"])
@pytest.mark.parametrize("capture", [False, True], ids=["replay", "capture"])
def test_a_cut_added_after_its_router_ran_in_the_block_is_refused(where: str, capture: bool, global_cut: Any) -> None:
    """A hook that cuts the combine weights, added inside a block after its router ran there (on a submodule of its
    scope, or a global module hook): the forward after it establishes the decision again, and is refused there."""
    got = in_turn(PlainRenorm, _add_cut if where == "submodule" else global_cut, capture=capture)
    assert got.startswith("refused"), got


@pytest.mark.reliability("silent replays")
def test_a_hook_outside_the_scope_added_inside_a_block_changes_nothing() -> None:
    """A hook registered outside every router's scope (on the model's own module) inside a block moves torch's count
    of hooks, which each router reads: no hook of its scope changed, and the replay goes on exactly."""
    log = Log()
    assert in_turn(PlainRenorm, lambda model: model.register_forward_hook(log)) == "exact"
    assert log.calls == 1


class LoggedRenorm(PlainRenorm):
    """:class:`PlainRenorm` with a hook on its renormalising submodule that only reads (kept in ``handle``)."""

    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        self.handle = self.renorm.register_forward_hook(self.log)


@pytest.mark.reliability("silent replays")
def test_a_logging_hook_removed_inside_a_block_replays_exactly() -> None:
    """Once a false refusal: the runs that established the decision set the hook aside, so the forwards without it
    run as they did: exact."""
    assert in_turn(LoggedRenorm, lambda model: model.moe.handle.remove()) == "exact"


def test_a_flop_counter_opened_inside_a_block_is_no_change_of_settings() -> None:
    """``FlopCounterMode`` tracks modules through global module hooks of torch's own, which it adds as it is entered:
    inside a replay block they are no hook of the user's, and the replay is exact."""
    from torch.utils.flop_counter import FlopCounterMode

    def add(model: nn.Module) -> None:
        counter = FlopCounterMode(display=False)
        counter.__enter__()
        adds.append(counter)

    adds: list[Any] = []
    try:
        assert replayed(PlainRenorm, add=add, when="inside") == "exact"
    finally:
        for counter in adds:
            counter.__exit__(None, None, None)


def across_sessions(add: Callable[[nn.Module], Any]) -> str:
    """Capture a forward under one session, detach, move the router's weights and ``add`` a hook, then replay under a
    new session on the same model: ``"exact"``, ``"refused: ..."`` or ``"silent: ..."``."""
    torch.manual_seed(0)
    model = Model(PlainRenorm())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    routes = session.routes()
    _perturb(model.moe)
    add(model)
    state, hooks = snapshot(model), _hooks(model)
    session = mr.attach(model)
    try:
        with torch.no_grad(), session.replay(routes):
            out = model(x)
        forced = routes.per_layer()[0].long()
        if not torch.equal(_sets(model.moe.last), _sets(forced)):
            return "silent: the replay used other experts than the recorded ones"
        if not torch.allclose(out, x + model.moe.reference(x, forced), atol=1e-5, rtol=1e-4):
            return "silent: the replay's output is not the hand-forced one"
        return "exact"
    except mr.MoEReplayError as err:
        assert _hooks(model) == hooks
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        return "refused: " + str(err).split("\n")[0]
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_cut_added_between_sessions_is_refused() -> None:
    """Once silent: a decision established by an earlier session on the same module was taken up by the next one
    without a look at the hooks added inside its scope since (never compared with what the forward returns with
    them). The user's hooks are part of what a decision is known by: established again, the cut is refused."""
    got = across_sessions(_add_cut)
    assert got.startswith("refused"), got


@pytest.mark.reliability("silent replays")
def test_a_logging_hook_added_between_sessions_replays_exactly() -> None:
    """The decision established again for the new hook's sake, with it set aside: it sees the real forward alone."""
    log = Log()
    assert across_sessions(lambda model: model.moe.renorm.register_forward_hook(log)) == "exact"
    assert log.calls == 1


class BoostedTopOneInAGatesHook(PlainRenorm):
    """A forward hook on the bare gate that boosts the logit of each token's top-1 expert: a choice made in a hook
    (by a top-k of its own) that changes the combine weights of the experts forced."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.register_forward_hook(
            lambda m, args, out: out + 2.0 * torch.nn.functional.one_hot(out.topk(1).indices[..., 0], E)
        )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first_replay", [False, True], ids=["captured", "replayed first"])
def test_a_top_k_made_to_log_in_a_gates_hook_is_exact_and_logged_once_per_forward(first_replay: bool) -> None:
    """Once a false refusal: the runs that establish the decision set the hook aside, so the real forward made one
    decision-like call more than they did. A call made in such a hook is none of the decision's calls (it runs as it
    is), and the forward's output is compared with theirs: exact, and the hook logs the real forwards alone."""
    made: list[LoggedTopKInAGatesHook] = []

    def make() -> nn.Module:
        made.append(LoggedTopKInAGatesHook())
        return made[-1]

    assert replayed(make, first_replay=first_replay) == "exact"
    loads = made[0].loads  # (the replayed model's: a twin captured where the replay is its first forward)
    assert len(loads) == (1 if first_replay else 2) + 1  # (and the hand-forced reference's own call of the gate)
    assert all(t.shape == (T, 1) for t in loads)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["start", "between", "inside"])
def test_a_choice_made_by_a_top_k_in_a_gates_hook_is_refused(when: str) -> None:
    """A top-k in a gate's hook whose result reaches the combine weights (a boost of each token's top-1 expert) is a
    choice the replay does not force: the forward's output differs from the runs' with the hook set aside, so the
    decision is established again with it in, and its top-k is seen there: refused, whenever the hook came."""

    def add(model: nn.Module) -> None:
        model.moe.gate.register_forward_hook(
            lambda m, args, out: out + 2.0 * torch.nn.functional.one_hot(out.topk(1).indices[..., 0], E)
        )

    got = replayed(BoostedTopOneInAGatesHook) if when == "start" else replayed(PlainRenorm, add=add, when=when)
    assert got.startswith("refused"), got


@pytest.mark.reliability("silent replays")
def test_a_cut_in_a_hook_that_cuts_nothing_where_the_decision_is_established_is_refused() -> None:
    """The first forward's tokens all keep their weights under the hook's cut; the next ones do not: refused."""
    torch.manual_seed(0)
    model = Model(CutInASubmodulesHook())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w = model.moe.gate(x).softmax(-1).topk(model.moe.top_k).values
        calm = x[(w / w.sum(-1, keepdim=True) >= 0.3).all(-1)]
    assert 0 < len(calm) < T
    session = mr.attach(model)
    try:
        with torch.no_grad():
            with session.capture():
                model(calm)
                model(x)
            routes = session.routes()
            _perturb(model.moe)
            with session.replay(routes):
                model(calm)
                out = model(x)
            forced = routes.per_layer()[0][len(calm) :].long()
            exact = torch.equal(_sets(model.moe.last), _sets(forced)) and torch.allclose(
                out, x + model.moe.reference(x, forced), atol=1e-5, rtol=1e-4
            )
        assert exact, "silent: the replay's output is not the hand-forced one"
    except mr.MoEReplayError:
        pass
    finally:
        session.detach()


def _cut_in_place(m: nn.Module, args: Any, out: torch.Tensor) -> None:
    """:func:`_cut` written into the submodule's output, returning nothing."""
    out.mul_(out >= 0.3)


def _cut_before(m: nn.Module, args: Any) -> tuple[torch.Tensor]:
    """A pre-hook of the renormalising submodule that cuts, from the top-k's values it is given, those under 0.3 of
    their sum: the same choice as :func:`_cut`, made on its input."""
    w = args[0]
    return (w * (w / w.sum(-1, keepdim=True) >= 0.3),)


def _doubled_on_full_batches(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
    """Combine weights doubled on forwards of ``T`` tokens, by their count alone: a change of values, no choice."""
    return out * 2.0 if out.shape[0] == T else None


def calm_then_all(
    hook: Callable[..., Any], *, pre: bool = False, first_replay: bool = False, factor: float = 1.0
) -> str:
    """A forward of the tokens whose renormalised weights are all at least 0.3 (where a cut under 0.3 cuts nothing, on
    the forward that establishes the decision), then one of every token, captured and replayed (the router's weights
    moved) with ``hook`` on the renormalising submodule (a pre-hook where ``pre``); ``first_replay``: captured before
    the hook was registered, the replay the first forwards of a new session with it. ``"exact"`` (the second replayed
    forward used the recorded experts and gave the hand-forced output, its combine weights times ``factor``),
    ``"refused: ..."`` or ``"silent: ..."``."""
    torch.manual_seed(0)
    model = Model(PlainRenorm())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w, idx = model.moe.gate(x).softmax(-1).topk(model.moe.top_k)
        if first_replay:  # (calm where the replay establishes the decision: the moved weights at the recorded experts)
            moved = copy.deepcopy(model)
            _perturb(moved.moe)
            w = moved.moe.gate(x).softmax(-1).gather(-1, idx)
        calm = x[(w / w.sum(-1, keepdim=True) >= 0.3).all(-1)]
    assert 0 < len(calm) < T
    if first_replay:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(calm)
            model(x)
        routes = session.routes()
    (model.moe.renorm.register_forward_pre_hook if pre else model.moe.renorm.register_forward_hook)(hook)
    state, hooks = snapshot(model), _hooks(model)
    session = mr.attach(model)
    try:
        with torch.no_grad():
            if not first_replay:
                with session.capture():
                    model(calm)
                    model(x)
                routes = session.routes()
            _perturb(model.moe)
            state = snapshot(model)
            with session.replay(routes):
                model(calm)
                out = model(x)
            forced = routes.per_layer()[0][len(calm) :].long()
            if not torch.equal(_sets(model.moe.last), _sets(forced)):
                return "silent: the replay used other experts than the recorded ones"
            if not torch.allclose(out, x + factor * model.moe.reference(x, forced), atol=1e-5, rtol=1e-4):
                return "silent: the replay's output is not the hand-forced one"
        return "exact"
    except mr.MoEReplayError as err:
        assert _hooks(model) == hooks
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        return "refused: " + str(err).split("\n")[0]
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first_replay", [False, True], ids=["captured", "replayed first"])
@pytest.mark.parametrize(
    ("hook", "pre"),
    [(_cut, False), (_cut_in_place, False), (_cut_before, True)],
    ids=["returned", "in place", "pre-hook"],
)
def test_a_cut_that_cuts_only_after_the_forward_that_established_the_decision_is_refused(
    hook: Callable[..., Any], pre: bool, first_replay: bool
) -> None:
    """Once silent: the hooks inside a scope were judged by their effect on the forward that established its decision
    alone. Each later forward watches them: a hook that hands on other values than it was given (returned, written in
    place, or a pre-hook's) has the decision established again with the hooks in, on that forward's inputs, where the
    cut is seen as a later choice: refused, whether the establishing forward was a capture or a replay."""
    got = calm_then_all(hook, pre=pre, first_replay=first_replay)
    assert got.startswith("refused"), got
    assert "handed on other values" in got, got


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first_replay", [False, True], ids=["captured", "replayed first"])
@pytest.mark.parametrize(
    ("hook", "factor"),
    [(lambda m, args, out: out.clone(), 1.0), (Log(), 1.0), (_doubled_on_full_batches, 2.0)],
    ids=["a copy", "a log", "doubled by the token count"],
)
def test_hooks_that_change_no_choice_at_later_forwards_replay_exactly(
    hook: Callable[..., Any], factor: float, first_replay: bool
) -> None:
    """The watch of later forwards refuses nothing that is exact: a hook that hands on a copy of what it was given or
    only reads passes it, and one that changes values by the token count alone (no choice) has the decision
    established again with the hooks in, the same decision: exact."""
    assert calm_then_all(hook, first_replay=first_replay, factor=factor) == "exact"


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="the hooks inside a scope whose decision was established with them set aside are watched at each eager "
    "forward alone: compiled code runs them unwatched, so a cut that cut nothing where the decision was established "
    "cuts unseen in a compiled forward (silent)",
)
def test_a_cut_that_cuts_only_in_a_later_compiled_forward_is_refused() -> None:
    """Routes captured before the cut was registered; the replay's decision established at an eager forward of tokens
    where the cut cuts nothing, its next forward compiled: exact or refused."""
    torch.manual_seed(0)
    model = Model(PlainRenorm())
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        idx = model.moe.gate(x).softmax(-1).topk(model.moe.top_k).indices
        moved = copy.deepcopy(model)
        _perturb(moved.moe)
        w = moved.moe.gate(x).softmax(-1).gather(-1, idx)
        calm = x[(w / w.sum(-1, keepdim=True) >= 0.3).all(-1)]
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(calm)
        model(x)
    routes = session.routes()
    _perturb(model.moe)
    model.moe.renorm.register_forward_hook(_cut)
    compiled = torch.compile(model, backend="eager")
    session = mr.attach(model)
    try:
        with torch.no_grad(), session.replay(routes):
            model(calm)
            out = compiled(x)
        forced = routes.per_layer()[0][len(calm) :].long()
        assert torch.equal(_sets(model.moe.last), _sets(forced))
        assert torch.allclose(out, x + model.moe.reference(x, forced), atol=1e-5, rtol=1e-4), "silent"
    except mr.MoEReplayError:
        pass
    finally:
        session.detach()


def _forwards_run(tensor_hooks: bool) -> int:
    """How many times the block's renormalising submodule runs (the runs that establish a decision too: a global
    module hook counts them) over a capture and a replay of three forwards each, a tensor's hook registered before
    each forward of the replay where ``tensor_hooks`` (as FSDP does at each)."""
    log = Log()
    counter = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: log(m, args, out) if isinstance(m, _Renorm) else None
    )
    try:
        torch.manual_seed(0)
        model = Model(PlainRenorm())
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
        leaf = torch.zeros(1, requires_grad=True)
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                for _ in range(3):
                    model(x)
            routes = session.routes()
            with session.replay(routes):
                for _ in range(3):
                    if tensor_hooks:
                        leaf.register_hook(lambda g: g)
                    model(x)
    finally:
        counter.remove()
    return log.calls


@pytest.mark.reliability("silent replays")
def test_hooks_made_elsewhere_at_every_forward_establish_nothing_again() -> None:
    """torch's count of hooks made, which each router reads, moves with a tensor's hook too: no hook of its scope
    changed, so its decision is not established again (its submodules run as often as without them, probe runs
    counted)."""
    runs = _forwards_run(tensor_hooks=True)
    assert runs > 6  # (the runs that established the decision are counted)
    assert runs == _forwards_run(tensor_hooks=False)
