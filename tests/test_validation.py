"""Every validation error names the problem, and the model is left exactly as it was."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot
from .test_orphans import FFN

pytestmark = pytest.mark.reliability("bad inputs")


@pytest.fixture
def setup(tokens: torch.Tensor):
    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    session = mr.attach(model)
    with session.capture():
        model(tokens)
    routes = session.routes()
    yield model, session, routes, tokens
    session.detach()
    model.zero_grad(set_to_none=True)
    assert_untouched(model, before)


def _with_layer(routes: mr.Routes, i: int, rows: torch.Tensor) -> list[torch.Tensor]:
    layers = [t.clone() for t in routes.per_layer()]
    layers[i] = rows
    return layers


def _still_replays(model, session: mr.Session, routes: mr.Routes, x: torch.Tensor) -> None:
    """After an error, the session replays good routes exactly."""
    with session.replay(routes), session.capture():
        model(x)
    assert session.routes().equal(routes)


def _recorded_on(x: torch.Tensor, style: str = "softmax_topk", **config) -> mr.Routes:
    other = mr.models.build(style, num_layers=2, **config)
    with mr.attach(other) as session:
        with session.capture():
            other(x)
        return session.routes()


# each case: routes that do not fit the model, the error, and what its message must say
OTHER_MODELS = {
    "an unknown router name": (
        lambda r, x: mr.Routes(r.per_layer(), names=["layers.0.mlp.router", "layers.9.mlp.router"], num_experts=8),
        mr.RouterNotFoundError,
        r"does not have: \['layers\.9\.mlp\.router'\]",
    ),
    "another model's router names": (
        lambda r, x: _recorded_on(x, "linear_gate"),
        mr.RouterNotFoundError,
        r"layers\.0\.mlp\.gate",
    ),
    "fewer experts": (lambda r, x: _recorded_on(x, num_experts=4), mr.RoutesValidationError, "8 experts.*for 4"),
    "more experts": (lambda r, x: _recorded_on(x, num_experts=16), mr.RoutesValidationError, "8 experts.*for 16"),
    "expert count relabelled": (
        lambda r, x: mr.Routes(r.per_layer(), names=r.names, num_experts=16),
        mr.RoutesValidationError,
        "8 experts.*for 16",
    ),
    "smaller k": (lambda r, x: _recorded_on(x, top_k=1), mr.RoutesValidationError, "k=2.*k=1"),
    "larger k": (lambda r, x: _recorded_on(x, top_k=3), mr.RoutesValidationError, "k=2.*k=3"),
    "k cut": (
        lambda r, x: mr.Routes([t[:, :1] for t in r.per_layer()], names=r.names, num_experts=8),
        mr.RoutesValidationError,
        "k=2.*k=1",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_MODELS))
def test_routes_recorded_on_another_model(setup, case: str) -> None:
    """Routes whose router set differs (names, E, k) are refused before any forward, naming both fingerprints."""
    model, session, routes, x = setup
    make, error, pattern = OTHER_MODELS[case]
    bad = make(routes, x)
    assert bad.fingerprint != session.fingerprint == routes.fingerprint
    with pytest.raises(error, match=pattern) as err:
        with session.replay(bad):
            raise AssertionError("the routes must be refused before the block runs")
    message = str(err.value)
    assert f"routes.fingerprint is {bad.fingerprint}, session.fingerprint is {session.fingerprint}" in message
    assert session.state == "idle"
    _still_replays(model, session, routes, x)


def test_missing_router_is_strict(setup) -> None:
    """Routes missing a router are refused unless strict=False, which routes that router natively."""
    model, session, routes, x = setup
    part = routes.select(["layers.0.mlp.router"])
    with pytest.raises(mr.RoutesValidationError, match=r"layers\.1\.mlp\.router.*strict=False"):
        with session.replay(part):
            model(x)
    with session.replay(part, strict=False), session.capture():
        model(x)
    assert torch.equal(session.routes().per_layer()[0], routes.per_layer()[0])


def test_routes_for_a_router_of_unknown_k_are_checked_at_its_first_forward() -> None:
    """Routes replayed before a router's first forward, its k unknown: forced if they fit its decision, else refused."""
    model = nn.Sequential(FFN(8), FFN(8))  # a bare gate whose k is written only in its block's forward
    x = torch.randn(6, 16)
    with mr.attach(recorder := copy.deepcopy(model)) as session, session.capture():
        ref = recorder(x)
    routes = session.routes()
    cut = mr.Routes([t[:, :1] for t in routes.per_layer()], names=routes.names, num_experts=8)
    before = snapshot(model)
    with mr.attach(model) as session:
        assert [s.top_k for s in session.sites] == [None, None]
        for _ in range(2):  # a retry inside the block is refused too
            with pytest.raises(mr.RoutesValidationError, match=r"'0\.gate' chooses 2 of 8.*rows of 1 of 8"):
                with session.replay(cut):
                    model(x)
        with session.replay(routes):
            assert torch.equal(model(x), ref)
    assert_untouched(model, before)


BAD_VALUES = {
    "E": (8, r"in \[0, 7\]"),
    "E + 1": (9, r"in \[0, 7\]"),
    "2**15 (wraps in int16)": (2**15, r"in \[0, 7\]"),
    "2**16 + 1 (wraps to 1 in int16)": (2**16 + 1, r"in \[0, 7\]"),
    "2**40": (2**40, r"in \[0, 7\]"),
    "-2": (-2, r"in \[0, 7\]"),
    "-2**15 - 1": (-(2**15) - 1, r"in \[0, 7\]"),
    "a repeated expert": (None, "repeats an expert"),
    "-1 beside an expert": (-1, "mixes -1"),
}
ROW_CHECKS = ("a repeated expert", "-1 beside an expert")  # the checks validate=False defers to replay


@pytest.mark.parametrize("path", ["Routes", "from_numpy", "Routes(validate=False)"])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_indices(setup, case: str, path: str) -> None:
    """Out-of-range indices, repeated experts and partial -1 rows are refused, naming router and token."""
    model, session, routes, x = setup
    value, pattern = BAD_VALUES[case]
    rows = routes.per_layer()[0].clone()
    rows[3, 1] = rows[3, 0] if value is None else value
    layers = _with_layer(routes, 0, rows)
    with pytest.raises(mr.RoutesValidationError, match=pattern) as err:
        if path == "Routes":
            mr.Routes(layers, names=routes.names, num_experts=8)
        elif path == "from_numpy":
            mr.Routes.from_numpy(torch.stack(layers, dim=1).numpy(), names=routes.names, num_experts=8)
        else:
            unchecked = mr.Routes(layers, names=routes.names, num_experts=8, validate=False)
            assert case in ROW_CHECKS, "dtype and range are checked even with validate=False"
            with session.replay(unchecked[2:]):  # slices keep the deferred check
                raise AssertionError("the routes must be refused before the block runs")
    assert "'layers.0.mlp.router'" in str(err.value)
    deferred = path == "Routes(validate=False)" and case in ROW_CHECKS
    assert ("token 1" if deferred else "token 3") in str(err.value)  # token 1 of the slice [2:]
    _still_replays(model, session, routes, x)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda r: r.float(), id="float32"),
        pytest.param(lambda r: r.half(), id="float16"),
        pytest.param(lambda r: r.bfloat16(), id="bfloat16"),
        pytest.param(lambda r: r.double(), id="float64"),
        pytest.param(lambda r: r.float().index_fill(0, torch.tensor([0]), float("nan")), id="NaN"),
        pytest.param(lambda r: r.float().index_fill(0, torch.tensor([0]), float("inf")), id="inf"),
        pytest.param(lambda r: r > 3, id="bool"),
        pytest.param(lambda r: r.to(torch.complex64), id="complex"),
        pytest.param(lambda r: r[:, 0], id="1-D"),
        pytest.param(lambda r: r[None], id="3-D"),
        pytest.param(lambda r: r.tolist(), id="a list"),
    ],
)
def test_indices_that_are_not_an_integer_matrix(setup, make, validate: bool) -> None:
    """Float (NaN, inf too), bool or complex indices, or not a [tokens, k] tensor: refused, even with validate=False."""
    _, _, routes, _ = setup
    rows = make(routes.per_layer()[0])
    with pytest.raises(mr.RoutesValidationError, match=r"router 'layers\.0\.mlp\.router'.*(integers|2-D|a tensor)"):
        mr.Routes(_with_layer(routes, 0, rows), names=routes.names, num_experts=8, validate=validate)


def test_too_few_rows_consumed(setup) -> None:
    """Unconsumed rows are reported when the block ends, naming router and counts; the session stays usable."""
    model, session, routes, x = setup
    with pytest.raises(mr.ReplayConsumptionError, match=r"'layers\.0\.mlp\.router' consumed 12 of 24 rows"):
        with session.replay(routes):
            model(x[:1])
    # the session stays usable
    with session.replay(routes):
        model(x)


def test_too_many_rows_fail_at_the_forward(setup) -> None:
    """Routes too short for the tokens fail at the forward that overdraws, also with strict=False."""
    model, session, routes, x = setup
    with pytest.raises(mr.ReplayConsumptionError, match=r"only 12 were recorded"):
        with session.replay(routes[:12]):
            model(x)
    with session.replay(routes[:12], strict=False):
        model(x[:1])


def test_replay_takes_routes_only(setup) -> None:
    """replay() of something that is not a Routes (a bare tensor) is refused."""
    model, session, routes, x = setup
    with pytest.raises(mr.RoutesValidationError, match="takes a Routes"):
        with session.replay(routes.indices):  # type: ignore[arg-type]
            model(x)


@pytest.mark.reliability("bad inputs")
def test_replay_of_a_list_of_per_sequence_routes_names_how_to_lay_them_out(setup) -> None:
    """Once a list of per-sequence Routes (what split_generation returns) given to replay() was refused only with
    "build one with mr.Routes(...)": the error now names the layout that makes one Routes of them."""
    model, session, routes, x = setup
    with pytest.raises(mr.RoutesValidationError, match=r"2 Routes \(one per sequence.*BatchLayout.*Routes\.cat"):
        with session.replay([routes[:12], routes[12:]]):  # type: ignore[arg-type]
            model(x)
    with session.replay(mr.Routes.cat([routes[:12], routes[12:]])):
        model(x)


@pytest.mark.reliability("re-entrance")
def test_nesting_and_second_session_are_refused(setup) -> None:
    """Nested capture, nested replay and a second attach on the same model are refused."""
    model, session, routes, x = setup
    with session.capture():
        with pytest.raises(mr.SessionStateError, match="do not nest"):
            with session.capture():
                pass
    with session.replay(routes):
        with pytest.raises(mr.SessionStateError, match="do not nest"):
            with session.replay(routes):
                pass
        model(x)
    with pytest.raises(mr.SessionStateError, match="already has an attached session"):
        mr.attach(model)


@pytest.mark.parametrize("block", ["replay", "capture", "keep_scores"])
def test_a_block_called_without_with_refuses_the_next_forward(setup, block: str) -> None:
    """Once silent: `session.replay(routes)` as a statement (no `with`) forced nothing and `session.capture()`
    recorded nothing, the forwards after them running natively; a block entered twice raised AttributeError."""
    model, session, routes, x = setup
    make = {"replay": lambda: session.replay(routes), "capture": session.capture, "keep_scores": session.keep_scores}
    with torch.no_grad():
        native = model(x).logits
        make[block]()  # (dropped at once, never entered)
        with pytest.raises(mr.SessionStateError, match=rf"session\.{block}\(\) was called but .* never entered"):
            model(x)
        assert session.state == "idle"
        assert torch.equal(model(x).logits, native)  # said once: the next forward runs
        kept = make[block]()
        with kept:
            model(x)
        with pytest.raises(mr.SessionStateError, match="entered already"):
            with kept:
                pass
        model(x)  # (a block entered once, then dropped: nothing to say)

        @make[block]()  # a decorator, as contextlib's: each call a block of its own
        def step() -> torch.Tensor:
            assert session.state != "idle" or block == "keep_scores"
            return model(x).logits

        step()
        step()
        assert session.state == "idle"
        model(x)
    _still_replays(model, session, routes, x)


@pytest.mark.parametrize("block", ["replay", "capture", "keep_scores"])
def test_a_block_entered_and_dropped_without_being_left_refuses_the_next_forward(setup, block: str) -> None:
    """Once silent: `session.replay(routes).__enter__()` on a value no name kept was garbage collected at once,
    which closed its context manager and ended the block: the forwards after it ran natively while the caller
    believed them forced or recorded. The next forward is now refused once, saying so; a block entered and left
    by hand, or held by an ExitStack, is not."""
    model, session, routes, x = setup
    make = {"replay": lambda: session.replay(routes), "capture": session.capture, "keep_scores": session.keep_scores}
    with torch.no_grad():
        native = model(x).logits
        make[block]().__enter__()  # (nothing keeps the block: dropped open)
        assert session.state == "idle"
        with pytest.raises(mr.SessionStateError, match=rf"session\.{block}\(\) block was entered and then dropped"):
            model(x)
        assert torch.equal(model(x).logits, native)  # said once: the next forward runs
        kept = make[block]()
        kept.__enter__()
        model(x)
        kept.__exit__(None, None, None)
        del kept  # (entered and left: nothing to say)
        with contextlib.ExitStack() as stack:
            stack.enter_context(make[block]())
            model(x)
        model(x)
        other = mr.Routes(routes.per_layer(), names=["a.gate", "b.gate"], num_experts=8)
        with pytest.raises(mr.MoEReplayError, match="a.gate"):
            session.replay(other).__enter__()  # (refused as it is entered: never open, nothing to say after)
        model(x)
    _still_replays(model, session, routes, x)


@pytest.mark.parametrize("block", ["replay", "capture", "keep_scores"])
def test_a_block_decorating_an_async_or_generator_function_is_refused(setup, block: str) -> None:
    """Once silent: `@session.replay(routes, strict=False)` on an `async def` (or a generator function) ended
    its block as the call returned the coroutine, before any of the body ran: the body's forwards ran natively
    with no error. Refused as it decorates, or as a call returns a coroutine or generator (a partial, a
    callable object), with nothing run."""
    import asyncio

    model, session, routes, x = setup
    make = {
        "replay": lambda: session.replay(routes, strict=False),
        "capture": session.capture,
        "keep_scores": session.keep_scores,
    }
    ran = []

    async def step() -> None:
        ran.append(model(x))

    def steps():
        yield model(x)

    async def steps_async():
        yield model(x)

    for fn in (step, steps, steps_async, functools.partial(step)):
        with pytest.raises(mr.SessionStateError, match=r"returns an? (coroutine|generator|async generator) before"):
            make[block]()(fn)

    class Step:
        async def __call__(self) -> None:
            ran.append(model(x))

    wrapped = make[block]()(Step())
    with pytest.raises(mr.SessionStateError, match="returns a coroutine before"):
        asyncio.run(wrapped())
    # a plain function that returns an async generator made elsewhere (it raised AttributeError: no close())
    with pytest.raises(mr.SessionStateError, match="returns an async generator before"):
        make[block]()(lambda: steps_async())()
    assert ran == [] and session.state == "idle"
    with pytest.raises(mr.ArgumentTypeError, match="decorates a function"):
        make[block]()(None)
    with torch.no_grad():
        model(x)  # (blocks used as decorators: nothing dropped unentered to say)
    _still_replays(model, session, routes, x)


@pytest.mark.reliability("faults")
def test_exception_mid_forward_keeps_session_usable(setup) -> None:
    """An expert that raises during capture and replay: the session returns to idle and replays exactly."""
    model, session, routes, x = setup
    layer = model.layers[1].mlp.experts

    def boom(*args, **kwargs):
        raise RuntimeError("expert failure")

    layer.forward = boom
    for ctx in (session.capture(), session.replay(routes)):
        with pytest.raises(RuntimeError, match="expert failure"):
            with ctx:
                model(x)
        assert session.state == "idle"
    del layer.forward
    with session.replay(routes), session.capture():
        model(x)
    assert session.routes().equal(routes)


def test_bad_attach_arguments_leave_model_untouched(tokens: torch.Tensor) -> None:
    """Bad capacity, an include matching nothing, two routers in one scope: refused, model untouched."""
    model = mr.models.build("linear_gate", num_layers=2, shared_expert=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="capacity"):
        mr.attach(model, capacity=0)
    with pytest.raises(mr.RouterNotFoundError, match="include="):
        mr.attach(model, include="no.such.module")
    with pytest.raises(mr.UnsupportedRouterError, match="both be intercepted"):
        mr.attach(model, include=["layers.0.mlp.gate", "layers.0.mlp.shared_expert_gate"], num_experts=8, top_k=2)
    for bad in ({"top_k": -3}, {"top_k": 0}, {"top_k": 2.5}, {"top_k": "2"}, {"top_k": True}, {"num_experts": 0}):
        with pytest.raises(mr.InvalidArgumentError, match=f"{next(iter(bad))} must be a positive int"):
            mr.attach(model, **bad)  # type: ignore[arg-type]
    with pytest.raises(mr.InvalidArgumentError, match="more experts than"):
        mr.attach(model, top_k=9, num_experts=8)
    assert_untouched(model, before)


@pytest.mark.reliability("overflow")
def test_eager_capture_grows_and_keep_newest_keeps_newest(tokens: torch.Tensor) -> None:
    """Past its capacity an eager capture grows and keeps every row; keep_newest keeps the newest."""
    model = mr.models.build("topk_softmax", num_layers=2)
    with mr.attach(model, capacity=1000) as session:
        with session.capture():
            for i in range(3):
                model(tokens[:, 4 * i : 4 * i + 4])
        full = session.routes()
    with mr.attach(model, capacity=10) as session:
        with session.capture():
            for i in range(3):
                model(tokens[:, 4 * i : 4 * i + 4])
        assert session.routes().equal(full)
    with mr.attach(model, capacity=10, keep_newest=True) as session:
        with session.capture():
            for i in range(3):
                model(tokens[:, 4 * i : 4 * i + 4])
        newest = session.routes()
    assert newest.num_tokens == 10
    assert newest.equal(full[-10:])


def test_routes_of_a_keep_newest_ring_that_wrapped_are_refused_for_replay(tokens: torch.Tensor) -> None:
    """Once silent: the routes of a keep_newest ring that wrapped (rows from part-way through a forward, no
    token ids) were replayed on whichever tokens came first; now refused unless given their tokens."""
    model = mr.models.build("topk_softmax", num_layers=2)
    before = snapshot(model)
    with mr.attach(model, capacity=10, keep_newest=True) as session:
        with session.capture():
            for i in range(3):
                model(tokens[:, 4 * i : 4 * i + 4])
        newest = session.routes()
        assert newest.token_ids is None
        x = torch.cat([tokens[1, 6:8], tokens[:, 8:12].reshape(-1)])[None]  # the tokens of the 10 newest rows
        with pytest.raises(mr.RoutesValidationError, match="keep_newest capture whose ring wrapped"):
            with session.replay(newest):
                model(x)
        with session.replay(newest.with_token_ids(x)):  # told which tokens they are: replayed, and checked
            model(x)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(newest.with_token_ids(x)):
                model(x.flip(1))
        with pytest.raises(mr.RoutesValidationError, match="keep_newest capture whose ring wrapped"):
            with session.replay(newest[:]):  # (a slice from its first row keeps what the ring dropped)
                model(x)
    assert_untouched(model, before)


def test_router_that_never_runs_is_reported(tokens: torch.Tensor) -> None:
    """A router that never runs (built twice) is reported by routes() and verify()."""
    model = mr.models.build("softmax_topk", num_layers=2)
    model.spare = mr.models.SoftmaxTopKRouter(model.config)  # a router built twice, never called
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        with pytest.raises(mr.UnsupportedRouterError, match=r"\['spare'\] recorded no row"):
            session.routes()
        assert session.routes(allow_silent=True).tokens_per_layer == (24, 24, 0)
        with pytest.raises(mr.UnsupportedRouterError, match="did not run"):
            session.verify(tokens)


def test_router_without_visible_decision_is_refused(tokens: torch.Tensor) -> None:
    """A router whose top-k the hook cannot see (a fused kernel) is refused, never skipped."""
    model = mr.models.build("softmax_topk", num_layers=2)
    router = model.layers[0].mlp.router

    def fused(x):  # a "kernel" that picks experts without a top-k call
        logits = torch.nn.functional.linear(x, router.weight)
        idx = logits.sort(dim=-1, descending=True).indices[:, :2]
        return logits, logits.softmax(-1).gather(1, idx), idx

    router.forward = fused
    before = snapshot(model)
    with mr.attach(model) as session:
        with pytest.raises(
            mr.UnsupportedRouterError, match=r"'layers\.0\.mlp\.router': its experts are chosen by a sort"
        ):
            with session.capture():
                model(tokens)
    del router.forward
    assert_untouched(model, before)


NOT_FLAGS = ["false", "no", 0, 1, None, [], torch.tensor(False)]


@pytest.mark.parametrize("value", NOT_FLAGS, ids=repr)
def test_a_flag_that_is_not_a_bool_is_refused_not_read_by_its_truth(value, tokens: torch.Tensor) -> None:
    """keep_newest="false" (a config file's string) is true: the ring kept only its newest rows and dropped the
    others with no error; allow_partial="no" read an interrupted capture, drop_last="no" dropped the last token's
    route. Every flag takes True or False only, and is checked before anything happens."""
    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    with pytest.raises(mr.ArgumentTypeError, match="keep_newest must be True or False"):
        mr.attach(model, capacity=4, keep_newest=value)
    assert_untouched(model, before)
    with mr.attach(model) as session:
        with pytest.raises(mr.ArgumentTypeError, match=r"capture\(clear=\) must be True or False"):
            with session.capture(clear=value):
                pass
        with pytest.raises(RuntimeError, match="a forward failed"), session.capture():
            model(tokens)
            raise RuntimeError("a forward failed")
        for flag in ("allow_partial", "allow_silent"):
            with pytest.raises(mr.ArgumentTypeError, match=rf"routes\({flag}=\) must be True or False"):
                session.routes(**{flag: value})
        with session.capture():
            model(tokens)
        routes = session.routes()
        with pytest.raises(mr.ArgumentTypeError, match=r"replay\(strict=\) must be True or False"):
            with session.replay(routes, strict=value):
                pass
        with session.replay(routes), session.capture():  # nothing was left open
            model(tokens)
        assert session.routes().equal(routes)
    with pytest.raises(mr.ArgumentTypeError, match="validate must be True or False"):
        mr.Routes(routes.per_layer(), names=routes.names, num_experts=8, validate=value)
    with pytest.raises(mr.ArgumentTypeError, match="keep_padding must be True or False"):
        mr.split_generation(routes, batch_size=1, prompt_lengths=[4], keep_padding=value)
    layer_map = mr.LayerMap.from_routes(routes, num_layers=2)
    with pytest.raises(mr.ArgumentTypeError, match="drop_last must be True or False"):
        mr.interop.to_vllm_legacy(routes, layer_map, drop_last=value)
    with pytest.raises(mr.ArgumentTypeError, match="last_routed must be True or False"):
        arr = torch.zeros(1, 3, 2, 2, dtype=torch.long)
        mr.interop.from_verl(arr, torch.ones(1, 3, dtype=torch.long), layer_map, last_routed=value)
    assert_untouched(model, before)
    assert mr.Routes(routes.per_layer(), names=routes.names, num_experts=8, validate=False).equal(routes)
