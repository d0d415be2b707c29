"""Defects noticed and left in an earlier round, each shown failing first: Ctrl-C windows where a router's forward or
a block's ``__enter__`` changed state before the ``try`` that undoes it was in place."""

from __future__ import annotations

import signal
import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import _lean, _torch_compat
from moe_replay.evidence import _Redrawn
from moe_replay.intercept import NESTING, RouterHook, ScopedForward
from moe_replay.session import _Block as _SessionBlock

from .conftest import tried
from .test_compiled48 import _Loop, _tokens
from .test_decisions3 import D, Model, T
from .test_evidence import D as ED
from .test_evidence import RouterBlock, TwoLayers
from .test_evidence import T as ET
from .test_gaps50 import _XS, _Block, _code, _ctrl_c_after, _GeneratorPerToken
from .test_inner_hooks import LoggedRenorm
from .test_lean import SeenModes
from .test_rl50 import LENGTHS, _outcome, rollout  # noqa: F401  (a fixture)
from .test_session_lifecycle import model_and_input

# --- Ctrl-C in a router's forward and as a block is entered ---------------------------------------------------------


def _hooks_of(model: nn.Module) -> dict[str, tuple[list[Any], list[Any], list[Any]]]:
    return {
        n: (
            list(m._forward_pre_hooks.items()),
            list(m._forward_hooks.items()),
            list(m._forward_pre_hooks_with_kwargs.items()),
        )
        for n, m in model.named_modules()
    }


def _hooked_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Model(LoggedRenorm()).eval(), torch.randn(T, D)


def _exact_after(session: mr.Session, model: nn.Module, x: torch.Tensor, hooks: Any) -> None:
    """Nothing of the interrupted forward is left: the model's hooks as they were, no block open, no router capturing,
    no mode on torch's stack, no lean state, Python's handler back; and the session captures and replays exactly."""
    assert _hooks_of(model) == hooks
    assert session._owner.blocks == 0
    assert not session._owner.entered
    assert session.state == "idle"
    assert not any(h.capturing or h.replaying for h in session._hooks)
    assert not _torch_compat.function_mode_stack()
    assert NESTING.lean is None and not NESTING.auditing
    assert _lean.SWAP.depth == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with torch.no_grad(), session.capture():
        want = model(x)
    routes = session.routes()
    with torch.no_grad(), session.replay(routes):
        got = model(x)
    assert torch.equal(got, want)


_FORWARD_LINES = {
    # the watch of the user's hooks inside the scope, installed before the try whose finally removes it
    "watch": ("watch.install()", _hooked_model),
    # an auditing forward's state and the lean wrappers' depth, set before the try that undoes them
    "audit": ("auditing, state.auditing = state.auditing, True", model_and_input),
}


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("window", list(_FORWARD_LINES))
def test_a_ctrl_c_in_a_routers_forward_leaves_no_watch_no_lean_state(window: str) -> None:
    """Once left wrong: a Ctrl-C landing in a router's forward just after it put a watch on the user's hooks inside
    its scope (or set a lean or auditing forward's state, or raised the lean wrappers' depth) and before the try that
    undoes it left the watch's hooks on the user's modules (the state set, the depth raised) for every later forward.
    The first forward that runs the line is interrupted there."""
    line, make = _FORWARD_LINES[window]
    model, x = make()
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    with _ctrl_c_after(_code(RouterHook._run), line) as sent, pytest.raises(KeyboardInterrupt):
        for _ in range(4):
            with torch.no_grad(), session.capture():
                model(x)
    assert sent, f"no forward ran the line {line!r}: it moved"
    _exact_after(session, model, x, hooks)
    session.detach()
    assert _hooks_of(model) == hooks


@pytest.mark.reliability("lifecycle")
@pytest.mark.xfail(
    strict=True,
    reason="a lean router forward (ScopedForward.__call__) raises the lean wrappers' depth, the nesting depth and "
    "the thread's lean router before the try that undoes them; holding Ctrl-C costs ~20 us a router forward there",
)
def test_a_ctrl_c_in_a_lean_routers_forward_leaves_no_lean_state() -> None:
    """A Ctrl-C landing in a lean router forward after it set this thread's lean router and before the try that
    clears it leaves the router set (every later torch call of the thread handed to it) and the depths raised."""
    model = TwoLayers(lambda: RouterBlock(SeenModes())).eval()
    x = torch.randn(ET, ED)
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    depth, swapped = NESTING.depth, _lean.SWAP.depth
    try:
        with (
            _ctrl_c_after(_code(ScopedForward.__call__), "state.lean = hook") as sent,
            pytest.raises(KeyboardInterrupt),
        ):
            for _ in range(4):
                with torch.no_grad(), session.capture():
                    model(x)
        assert sent, "no forward ran the line: it moved"
        _exact_after(session, model, x, hooks)
    finally:  # (what the interrupt leaves today is undone for the tests after this one)
        NESTING.lean, NESTING.depth = None, depth
        with _lean.SWAP.lock:
            _lean.SWAP.depth = swapped
            if swapped == 0:
                _lean.put_back()
        session.detach()


_ENTER_LINES = ["value = self._cm.__enter__()", "self._open = True"]


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("line", _ENTER_LINES)
def test_a_ctrl_c_as_a_block_is_entered_leaves_no_block_open(line: str) -> None:
    """Once left wrong: a Ctrl-C landing in a block's __enter__ after its context manager was entered and before the
    block knew itself open left the block open with no `with` to leave it (its __exit__ is not called when __enter__
    raises): the session stayed capturing until the block was garbage collected, and a traceback kept it."""
    model, x = _hooked_model()
    session = mr.attach(model)
    hooks = _hooks_of(model)
    tried()
    kept: list[Any] = []
    with pytest.raises(KeyboardInterrupt) as info, _ctrl_c_after(_code(_SessionBlock.__enter__), line) as sent:
        with session.capture():
            pass
    kept.append(info.value.__traceback__)  # (a notebook keeps the last traceback: it must not keep the block open)
    assert sent, "the interrupt was never sent: the line moved"
    _exact_after(session, model, x, hooks)
    session.detach()


# --- a generator the runs drew more from than the forwards, after detach --------------------------------------------


@pytest.mark.reliability("the model is left as it was")
def test_a_generator_the_runs_drew_more_from_is_given_back_as_a_plain_generator_with_a_warning() -> None:
    """Once left wrong: where the runs that establish a decision drew more items from a generator a router holds
    than the forwards after them did, the library's stand-in stayed in the router's attribute after detach(), an
    object of moe_replay's in the user's model. A generator cannot be copied nor rewound, so the user's own cannot
    be given back: detach gives a plain Python generator that yields the waiting items and then the user's own,
    says so with a warning naming the attribute, and the model draws exactly what the plain model draws, send()
    and close() reaching the user's generator."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_GeneratorPerToken()), _Block(_GeneratorPerToken()))
    torch.manual_seed(0)
    plain = nn.Sequential(_Block(_GeneratorPerToken()), _Block(_GeneratorPerToken()))
    held = [vars(b.router)["noise"] for b in model]
    with torch.no_grad():
        want = plain(_XS[0])
    tried()
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        got = model(_XS[0])
    assert torch.equal(got, want)
    waiting = [type(vars(b.router)["noise"]).__module__.startswith("moe_replay") for b in model]
    assert any(waiting), "no stand-in waits: the case shows nothing"
    with pytest.warns(RuntimeWarning, match="noise"):
        session.detach()
    now = [vars(b.router)["noise"] for b in model]
    assert all(isinstance(g, types.GeneratorType) and not type(g).__module__.startswith("moe_replay") for g in now)
    assert not any(isinstance(v, _Redrawn) for b in model for v in vars(b.router).values()), "a stand-in after detach"
    with torch.no_grad():
        assert torch.equal(model(_XS[1]), plain(_XS[1]))  # (the waiting items, then the user's own)
        assert torch.equal(model(_XS[2]), plain(_XS[2]))
    assert [next(b.router.noise) for b in model] == [next(b.router.noise) for b in plain]
    for g, it in zip(now, held, strict=True):
        g.close()
        assert it.gi_frame is None, "close() did not reach the user's generator"


@pytest.mark.reliability("the model is left as it was")
def test_an_iterator_no_item_of_which_waits_is_the_users_own_after_detach_with_no_warning() -> None:
    """Where the forwards drew every item the runs drew, detach leaves the user's own iterator and warns of
    nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_GeneratorPerToken()), _Block(_GeneratorPerToken()))
    held = [vars(b.router)["noise"] for b in model]
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(_XS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for _ in range(100):  # (the forwards draw every waiting item)
                if not any(isinstance(vars(b.router)["noise"], _Redrawn) for b in model):
                    break
                model(_XS[1])
        assert not any(isinstance(vars(b.router)["noise"], _Redrawn) for b in model), "items still wait"
        session.detach()
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True))


# --- a capture's rows stripped of their ids, sliced with no layout --------------------------------------------------


@pytest.mark.reliability("silent replays")
def test_a_ulysses_slice_of_a_captures_rows_without_ids_fed_another_ranks_tokens_is_refused(
    rollout: tuple[Any, ...],  # noqa: F811  (the fixture of test_rl50)
) -> None:
    """A capture's rows of one sequence, stripped of their token ids (on purpose: the tokens may differ) and sliced
    for two Ulysses ranks with no layout: rank 0's rows fed rank 1's tokens of the sequence with their position_ids
    are refused, as the same rows laid out are; each rank fed its own slice is exact. Dropping the ids lets other
    tokens take the rows, not other places: each row keeps the place it was recorded at, and it is compared."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    n = LENGTHS[0]
    routes = per[0].with_token_ids(None)
    tokens, positions = seqs[0][None], torch.arange(n)[None]
    half = n // 2
    for own in (slice(0, half), slice(half, n)):
        got = _outcome(model, session, routes[own], lambda s=own: model(tokens[:, s], position_ids=positions[:, s]))
        assert got is not None, "refused though exact"
        for name, rows in got.items():
            assert torch.equal(rows, want[0][name][own]), f"slice {own} at {name}"
    wrong = slice(n - half, n)  # (rank 1's tokens, as many as rank 0's rows)
    got = _outcome(model, session, routes[:half], lambda: model(tokens[:, wrong], position_ids=positions[:, wrong]))
    assert got is None, "rank 1's tokens were forced with rank 0's rows"
    with pytest.raises(mr.TokenMismatchError, match=r"recorded at other places.*with_token_ids\(None\)"):
        with session.replay(routes[:half]), torch.no_grad():
            model(tokens[:, wrong], position_ids=positions[:, wrong])


# --- the compiled per-router call check of forwards fed embeddings --------------------------------------------------


class _LoopOfEmbeds(_Loop):
    """:class:`_Loop` fed ``inputs_embeds`` (as HF models take them) instead of its token ids."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = h + self.a(h)
        for _ in range(self.extra):
            h = h + self.a(h)
        if not self.skip:
            h = h + self.b(h)
        return h


_PLANS = {
    # a capture whose first forward called a once and whose second twice, replayed the other way round
    "called once more": ([(0, False), (1, False)], [(1, False), (0, False)], "called again|more than one call"),
    # b skipped in the second forward at capture, in the first at replay
    "layer dropped": ([(0, False), (0, True)], [(0, True), (0, False)], "forward 1 of the capture"),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(_PLANS))
def test_compiled_forwards_fed_embeddings_make_the_captured_router_calls_or_are_refused(case: str) -> None:
    """Once silent: the per-router call check of compiled forwards (on the device) ran only for forwards fed token
    ids: fed ``inputs_embeds``, a router called once more, or a layer dropped, in another forward than at capture
    was forced with another forward's rows. Refused as the block ends, as the eager replay refuses it; the forwards
    that make the captured calls replay exactly."""
    torch._dynamo.reset()
    captured, other, match = _PLANS[case]
    model = _LoopOfEmbeds()
    e = model.embed(_tokens()).detach()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for extra, skip in captured:
                model.set(extra, skip)
                model(inputs_embeds=e)
        routes = session.routes()
        with pytest.raises(mr.MoEReplayError, match=match), session.replay(routes):
            for extra, skip in other:
                model.set(extra, skip)
                model(inputs_embeds=e)  # (eager: refused)
        compiled = torch.compile(model, backend="eager")
        with session.replay(routes), session.keep_scores() as kept:
            for extra, skip in captured:
                model.set(extra, skip)
                compiled(inputs_embeds=e)
        for name, used in zip(kept.names, kept.indices, strict=True):
            assert torch.equal(used.long().cpu(), routes.layer(name).long())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(mr.MoEReplayError, match=match), session.replay(routes):
            for extra, skip in other:
                model.set(extra, skip)
                compiled(inputs_embeds=e)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert session.state == "idle"
    torch._dynamo.reset()
