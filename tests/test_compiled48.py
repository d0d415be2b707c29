"""The per-router call checks of a replay whose forwards run compiled (``torch.compile``).

Where routes hold each router's own rows and calls (a router called again in a forward, a layer skipped in some), an
eager replay refuses a forward whose routers make other calls than the captured forward it replays, or whose routers
read rows of different captured forwards. Compiled code counts the reads on the device, where the host sees none: the
same checks run there as tensor ops and are read as the block ends. Each case is exact (the experts a replay forces are
those of the model whose top-k is replaced by the captured indices by hand) or refused: never silent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr

TOKENS = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Loop(torch.nn.Module):
    """Embeddings, then the stack of two MoE blocks ``loops - 1`` times, then ``a`` called ``1 + extra`` times and ``b``
    unless ``skip``. With
    ``by_data``, the hidden states decide both (against thresholds that the test sets to say which way they go):
    dynamo breaks the graph there."""

    def __init__(self, by_data: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 16)
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.a, self.b = mr.models.MoEBlock(cfg), mr.models.MoEBlock(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (*self.a.parameters(), *self.b.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.by_data = by_data
        self.extra, self.skip, self.loops = 0, False, 1

    def set(self, extra: int, skip: bool, loops: int = 1) -> None:
        self.extra, self.skip, self.loops = extra, skip, loops
        self.skip_above = float("-inf") if skip else float("inf")
        self.again_above = float("-inf") if extra else float("inf")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for _ in range(self.loops - 1):  # (the whole stack run again: every router called once more)
            h = h + self.a(h)
            h = h + self.b(h)
        h = h + self.a(h)
        if self.by_data:
            if not bool(h.mean() > self.skip_above):
                h = h + self.b(h)
            if bool(h.mean() > self.again_above):
                h = h + self.a(h)
            return h
        for _ in range(self.extra):
            h = h + self.a(h)
        if not self.skip:
            h = h + self.b(h)
        return h


def _forced_by_hand(model: _Loop, routes: mr.Routes, plan: list[tuple[int, bool]], x: torch.Tensor) -> list[Any]:
    """The outputs of ``model`` run eagerly per ``plan`` with each block's top-k replaced by its next captured rows
    (in the order the capture recorded them), the combine weights gathered from its current scores."""
    rows = {name: routes.layer(f"{name}.router").long() for name in ("a", "b")}
    read = {"a": 0, "b": 0}
    saved = {}
    for name in ("a", "b"):
        block = getattr(model, name)
        saved[name] = block.route

        def route(h: torch.Tensor, name: str = name, block: Any = block) -> tuple[torch.Tensor, torch.Tensor]:
            at = read[name]
            forced = rows[name][at : at + h.shape[0]]
            read[name] = at + h.shape[0]
            probs = F.softmax(F.linear(h, block.router.weight), dim=-1, dtype=torch.float)
            weights = probs.gather(-1, forced)
            return (weights / weights.sum(-1, keepdim=True)).to(h.dtype), forced

        block.route = route
    try:
        outs = []
        for extra, skip in plan:
            model.set(extra, skip)
            outs.append(model(x))
    finally:
        for name in ("a", "b"):
            del getattr(model, name).route
    assert read == {name: r.shape[0] for name, r in rows.items()}
    return outs


def _captured(
    model: _Loop, session: mr.Session, plan: list[tuple[int, bool]], x: torch.Tensor, ids: bool = True
) -> mr.Routes:
    """The routes of the forwards of ``plan`` on ``x``, with their token ids or without (an engine's arrays)."""
    with session.capture():
        for extra, skip in plan:
            model.set(extra, skip)
            model(x)
    routes = session.routes()
    assert routes._router_calls is not None
    return routes if ids else routes.with_token_ids(None)


def _move_routers(model: torch.nn.Module) -> None:
    """Move every router far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.add_(3 * torch.randn(p.shape, generator=g))


def _tokens() -> torch.Tensor:
    return torch.randint(1, 64, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def _refused_untouched(
    model: _Loop, session: mr.Session, routes: mr.Routes, plan: list[tuple[int, bool]], compiled: Any, match: str
) -> None:
    """Replaying ``routes`` through ``compiled`` per ``plan`` is refused, naming ``match``, with the model's weights
    and the session as they were."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _tokens()
    with pytest.raises(mr.TokenMismatchError, match=match), session.replay(routes):
        for extra, skip in plan:
            model.set(extra, skip)
            compiled(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert session.state == "idle"


BACKENDS = ["eager", "aot_eager"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("by_data", [False, True], ids=["flag", "by_data"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "no_ids"])
def test_a_router_called_once_more_in_a_compiled_forward_than_captured_is_refused(
    backend: str, by_data: bool, ids: bool
) -> None:
    """Once silent: a capture whose first forward called block ``a`` once and whose second called it twice, replayed
    through the model compiled whole with the first forward calling it twice and the second once (the same tokens: no
    token check tells; or routes without ids), forced the second forward's rows on the first forward's second call,
    and the eager check of each router's calls never ran. Refused now as the block ends, as the eager replay is."""
    model = _Loop(by_data)
    x = _tokens()
    with mr.attach(model) as session, torch.no_grad():
        routes = _captured(model, session, [(0, False), (1, False)], x, ids)
        with (
            pytest.raises(mr.TokenMismatchError, match="called again" if ids else "more than one call on every token"),
            session.replay(routes),
        ):
            for extra, skip in [(1, False), (0, False)]:
                model.set(extra, skip)
                model(x)  # (eager: refused)
        compiled = torch.compile(model, backend=backend)
        _refused_untouched(
            model, session, routes, [(1, False), (0, False)], compiled, r"compiled forward 1 .*router 'a\.router'"
        )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("by_data", [False, True], ids=["flag", "by_data"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "no_ids"])
def test_a_layer_dropped_in_another_compiled_forward_than_at_capture_is_refused(
    backend: str, by_data: bool, ids: bool
) -> None:
    """Once silent: block ``b`` skipped in the second forward at capture and in the first at replay (same tokens, same
    row counts in all) gave ``b``'s first-forward rows to the second replay forward, whose ``a`` read the second
    forward's rows: two captured forwards' rows in one forward. Refused now as the block ends."""
    model = _Loop(by_data)
    x = _tokens()
    with mr.attach(model) as session, torch.no_grad():
        routes = _captured(model, session, [(0, False), (0, True)], x, ids)
        with pytest.raises(mr.TokenMismatchError, match="in forward 1 of the capture"), session.replay(routes):
            for extra, skip in [(0, True), (0, False)]:
                model.set(extra, skip)
                model(x)  # (eager: refused)
        compiled = torch.compile(model, backend=backend)
        _refused_untouched(
            model,
            session,
            routes,
            [(0, True), (0, False)],
            compiled,
            r"compiled forward 2 .*'b\.router' .*forward 1 of the capture.*'a\.router'.*forward 2 of the capture",
        )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("backend", [*BACKENDS, "inductor"])
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "no_ids"])
def test_compiled_forwards_that_make_the_captured_calls_replay_exactly(backend: str, ids: bool) -> None:
    """The capture's forwards, each with its own calls (one forward calling ``a`` twice, another skipping ``b``),
    replayed compiled in their order after the routers moved: no refusal, and each output is that of the model whose
    top-k is replaced by the captured indices by hand."""
    model = _Loop()
    x = _tokens()
    plan = [(1, False), (0, True), (0, False)]
    with mr.attach(model) as session, torch.no_grad():
        routes = _captured(model, session, plan, x, ids)
        _move_routers(model)
        assert not _captured(model, session, plan, x, ids).equal(routes)
        compiled = torch.compile(model, backend=backend)
        got = []
        with session.replay(routes):
            for extra, skip in plan:
                model.set(extra, skip)
                got.append(compiled(x))
    want = _forced_by_hand(model, routes, plan, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("run", ["fewer", "more"])
def test_compiled_forwards_more_or_fewer_than_the_routes_hold_are_refused(run: str) -> None:
    """Routes of two forwards replayed through the compiled model in one forward, or three: refused as the block
    ends (rows left unread, or read past the end), never forced silently."""
    model = _Loop()
    x = _tokens()
    plan = [(1, False), (0, True)]
    with mr.attach(model) as session, torch.no_grad():
        routes = _captured(model, session, plan, x)
        compiled = torch.compile(model, backend="eager")
        ran = plan[:1] if run == "fewer" else [*plan, plan[0]]
        with pytest.raises(mr.MoEReplayError), session.replay(routes):
            for extra, skip in ran:
                model.set(extra, skip)
                compiled(x)
        assert session.state == "idle"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "no_ids"])
def test_a_stack_looped_once_more_in_a_compiled_forward_than_captured_is_refused(backend: str, ids: bool) -> None:
    """Once silent: every router called once more in the first compiled forward than the capture's first (the whole
    stack looped again, its routes' rows the same count for every router) and once less in the second read the second
    forward's rows in the first; refused now as the block ends, and the capture's order replays exactly."""
    model = _Loop()
    x = _tokens()
    plan = [(0, False, 1), (0, False, 2)]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for extra, skip, loops in plan:
                model.set(extra, skip, loops)
                model(x)
        routes = session.routes()
        routes = routes if ids else routes.with_token_ids(None)
        assert routes._call_rows is not None and len(set(routes.tokens_per_layer)) == 1
        compiled = torch.compile(model, backend=backend)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(mr.TokenMismatchError, match="compiled forward 1 "), session.replay(routes):
            for extra, skip, loops in reversed(plan):
                model.set(extra, skip, loops)
                compiled(x)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert session.state == "idle"
        _move_routers(model)  # (the routers choose other experts now: the replay forces the recorded ones)
        with session.capture():
            for extra, skip, loops in plan:
                model.set(extra, skip, loops)
                model(x)
        assert not session.routes().equal(routes)
        with session.replay(routes), session.capture():
            for extra, skip, loops in plan:
                model.set(extra, skip, loops)
                compiled(x)
        assert session.routes().with_token_ids(None).equal(routes.with_token_ids(None))
