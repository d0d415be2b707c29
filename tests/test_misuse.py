"""Misuse of the public API that no other test tries: blocks left in the wrong order, sessions on parts
of one model, copies run inside a block, errors inside ``verify`` and ``keep_scores``.

Each case must end in a ``MoEReplayError`` or in exactly the rows a correct use gives: never rows
given to other tokens, a replay that forces nothing, or a model left changed.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moe_replay as mr

from .conftest import assert_untouched, perturb_routers, snapshot, tried


def _model(layers: int = 2) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=layers)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(seed))


def _forced(routes: mr.Routes) -> mr.Routes:
    """The same tokens' routes with every expert moved by one: what a native forward would not choose."""
    moved = [
        torch.where(t >= 0, (t + 1) % e, t) for t, e in zip(routes.per_layer(), routes.experts_per_layer, strict=True)
    ]
    return mr.Routes(moved, routes.names, routes.experts_per_layer).with_token_ids(routes.token_ids)


@pytest.mark.reliability("re-entrance")
def test_a_capture_left_before_the_replay_entered_inside_it_records_no_later_forward() -> None:
    """capture() entered, then replay() inside it by hand, then the capture left first: the forward after it is
    still forced (the replay is open) and counted by the replay's strict check, and recorded nowhere."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
            model(x)
        forced = _forced(session.routes())
        with session.replay(forced[:12]):
            want = model(x).logits
        cap, rep = session.capture(), session.replay(forced)
        cap.__enter__()
        rep.__enter__()
        model(x)
        assert session.state == "replaying+capturing"
        cap.__exit__(None, None, None)
        assert session.state == "replaying"
        got = model(x).logits  # the second forward: forced, not recorded
        rep.__exit__(None, None, None)  # strict: both forwards' rows consumed
        assert session.state == "idle"
        assert torch.equal(got, want)
        assert session.routes().equal(forced[:12]) and session.routes().num_tokens == 12


@pytest.mark.reliability("re-entrance")
def test_keep_scores_does_not_nest_and_an_exception_inside_it_leaves_it_usable() -> None:
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.keep_scores(), pytest.raises(mr.SessionStateError, match="does not nest"):
            session.keep_scores().__enter__()
        with pytest.raises(RuntimeError, match="in the block"), session.keep_scores() as failed:
            model(x)
            raise RuntimeError("in the block")
        with session.keep_scores() as kept:
            model(x)
        model(x)  # after the block: nothing more kept
        for name in session.names:
            assert kept[name][0].shape[0] == 12 and torch.equal(kept[name][1], failed[name][1])
        assert session.state == "idle"


@pytest.mark.reliability("lifecycle")
def test_sessions_on_sibling_layers_replay_exactly_and_the_parent_is_not_attached_over_them() -> None:
    """A session on each layer of one model: both capture in one forward, both replay it exactly, and a session
    on the whole model is refused while they hold its routers (a router intercepted twice would record twice)."""
    model, x = _model(), _ids()
    before = snapshot(model)
    native = model(x).logits
    first, second = mr.attach(model.layers[0]), mr.attach(model.layers[1])
    with pytest.raises(mr.SessionStateError, match="already intercepted by another session"):
        mr.attach(model)
    with first.capture(), second.capture():
        assert torch.equal(model(x).logits, native)
    a, b = first.routes(), second.routes()
    assert a.names == b.names == ("mlp.router",)  # (paths inside each layer: the same name)
    perturb_routers(first)
    perturb_routers(second)
    with first.replay(a), second.replay(b), first.capture():
        model(x)
    assert first.routes().equal(a)
    first.detach()
    second.detach()
    with torch.no_grad():
        model.load_state_dict(before)
    assert_untouched(model, before)


@pytest.mark.reliability("lifecycle")
def test_a_copy_of_the_model_run_inside_a_capture_adds_no_row_to_it() -> None:
    """A deep copy made inside a capture() block (a reference policy) is a plain model: its forwards are neither
    recorded in the block nor refused, and the block holds exactly the original's rows."""
    model, x, y = _model(), _ids(0), _ids(1)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        alone = session.routes()
        with session.capture():
            ref = copy.deepcopy(model)
            native = ref(y).logits
            model(x)
            assert torch.equal(ref(y).logits, native)
        assert session.routes().equal(alone)
        assert torch.equal(session.routes().token_ids, alone.token_ids)


@pytest.mark.reliability("faults")
def test_a_verify_that_raises_half_way_leaves_the_model_and_the_session_exact() -> None:
    """verify() whose forward raises after the first layer's router ran: the error is the model's own, and the model,
    the session and every later capture and replay are as if it had never run."""
    model, x = _model(3), _ids()
    before = snapshot(model)
    native = model(x).logits
    session = mr.attach(model)
    left = [1]

    def fail_once(*_: object) -> None:
        if left[0]:
            left[0] -= 1
            raise RuntimeError("layer 1 failed")

    handle = model.layers[1].register_forward_hook(fail_once)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        session.verify(x)
    handle.remove()
    assert session.state == "idle"
    with session.capture():
        assert torch.equal(model(x).logits, native)
    routes = session.routes()
    assert routes.num_tokens == 12
    with session.replay(routes):
        assert torch.equal(model(x).logits, native)
    session.detach()
    assert_untouched(model, before)
    assert torch.equal(model(x).logits, native)
    tried(2)
