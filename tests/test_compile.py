"""torch.compile: capture and replay inside compiled models, one compile per session state."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import moe_replay as mr

from .conftest import perturb_routers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_states_compile_once_each(tokens: torch.Tensor) -> None:
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    eager = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with mr.attach(model) as session, torch.no_grad():
        session.verify(tokens)  # one eager forward establishes each decision; compiled code cannot
        assert torch.equal(compiled(tokens).logits, eager(tokens).logits)  # idle
        with session.capture():
            compiled(tokens)
            compiled(tokens[:1])
        routes = session.routes()
        with mr.attach(eager) as plain:
            with plain.capture():
                eager(tokens)
                eager(tokens[:1])
            assert routes.equal(plain.routes())
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture():
            compiled(tokens)
            compiled(tokens[:1])
        assert session.routes().equal(routes)  # forced in the compiled graph, and recorded
        with session.replay(routes):
            compiled(tokens)
            compiled(tokens[:1])
        compiled_graphs = counter.frame_count
        # switching back and forth, and routes of another length, compile nothing new
        longer = mr.Routes.cat([routes, routes])
        for _ in range(2):
            compiled(tokens)
            with session.capture():
                compiled(tokens)
            with session.replay(longer):
                for _ in range(2):
                    compiled(tokens)
                    compiled(tokens[:1])
            with session.replay(routes), session.capture():
                compiled(tokens)
                compiled(tokens[:1])
            assert session.routes().equal(routes)
        assert counter.frame_count == compiled_graphs
    # idle, capture, replay+capture and replay, each for the two batch shapes at most
    assert compiled_graphs <= 8


@pytest.mark.reliability("lifecycle")
def test_many_blocks_compile_nothing_after_warm_up(tokens: torch.Tensor) -> None:
    """An RL loop: one capture block per rollout and one replay block per training step, many times, on a
    fullgraph-compiled model. Once each distinct state has compiled (capture, replay, both, idle; with and without
    gradients), further blocks compile nothing, and their rows are those of an eager capture. Once, with a forward
    hook on a router (here one that tempers the combine weights), each block put a new output guard on it:
    compiled code traced with the last one failed its guards and recompiled at every block, until fullgraph's
    recompile limit refused the model."""
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense")

    def eager_capture(m: torch.nn.Module) -> mr.Routes:
        with mr.attach(m) as plain, plain.capture(), torch.no_grad():
            m(tokens)
        return plain.routes()

    want = eager_capture(copy.deepcopy(model))  # the routes every replay forces
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.add_(3.0 * p.std() * torch.randn(p.shape, generator=g))
    free = eager_capture(copy.deepcopy(model))  # what the routers choose now, unforced
    assert not free.equal(want)
    ran = torch.zeros(())

    def temper(module: torch.nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> Any:
        ran.add_(1)  # (a tensor: compiled code runs it; a Python count would be guarded on and recompile)
        return (out[0] * 1.0, *out[1:])  # a temperature of 1 on the combine weights: allowed

    for name, m in model.named_modules():
        if name.endswith(".router"):
            m.register_forward_hook(temper)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    seen: list[int] = []
    with mr.attach(model) as session:
        session.verify(tokens)
        model(tokens)  # (one eager forward with gradients establishes that mode too)
        for _ in range(4):
            with session.capture(), torch.no_grad():  # a rollout
                compiled(tokens)
            assert session.routes().equal(free)
            with session.replay(want), session.capture():  # a training step, the routes it ran recorded again
                compiled(tokens).logits.sum().backward()
            assert session.routes().equal(want)
            with session.replay(want):
                compiled(tokens).logits.sum().backward()
            compiled(tokens)  # idle forwards between blocks
            with torch.no_grad():
                compiled(tokens)
            model.zero_grad(set_to_none=True)
            seen.append(counter.frame_count)
    assert seen[0] >= 1  # (it compiled)
    assert seen == [seen[0]] * len(seen), seen  # nothing compiled after the first round of blocks
    assert ran.item() >= 4 * 5 * 2  # (the hooks ran, in compiled code too)


@pytest.mark.reliability("lifecycle")
def test_sessions_attached_again_compile_nothing_new(tokens: torch.Tensor) -> None:
    """A loop that attaches a new session per rollout (not one session with a block per rollout) on a compiled
    model, more times than torch's recompile limit: each attach puts back the wrappers the last session left (the
    objects ``torch.compile`` guarded on), so nothing compiles after the first session, and every session records
    the rows an eager capture records, and forces them on perturbed routers. Once, each attach put new wrappers in
    the routers' ``forward``: every session recompiled, and ``fullgraph=True`` refused the model at the limit."""
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense")
    reference = copy.deepcopy(model)
    with mr.attach(reference) as plain, plain.capture(), torch.no_grad():
        reference(tokens)
    want = plain.routes()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    limit = getattr(torch._dynamo.config, "recompile_limit", 8)
    seen: list[int] = []
    for _ in range(limit + 2):
        with mr.attach(model) as session, torch.no_grad():
            session.verify(tokens)  # (eager: the first session establishes the decision; later ones know it)
            with session.capture():
                compiled(tokens)
            assert session.routes().equal(want)
        seen.append(counter.frame_count)
    assert seen[0] >= 1  # (it compiled)
    assert seen == [seen[0]] * len(seen), seen
    perturbed = reference
    with torch.no_grad():
        for name, param in perturbed.named_parameters():
            if ".router." in name:
                param.add_(3.0 * param.std() * torch.randn_like(param))
    model.load_state_dict(perturbed.state_dict())
    for _ in range(2):
        with mr.attach(model) as session, torch.no_grad():
            session.verify(tokens)
            with session.replay(want), session.capture():
                compiled(tokens)
            assert session.routes().equal(want)  # (forced: the perturbed routers would choose otherwise)
        seen.append(counter.frame_count)
    assert seen[-1] == seen[-2], seen  # (the second replaying session compiled nothing new either)
    with mr.attach(perturbed) as free, free.capture(), torch.no_grad():
        perturbed(tokens)
    assert not free.routes().equal(want)


@pytest.mark.reliability("lifecycle")
def test_a_forward_kept_from_a_detached_session_is_refused_and_the_model_is_freed(tokens: torch.Tensor) -> None:
    """The wrappers a detach takes off are kept, emptied, for the next attach: one a user kept from before detach
    raises a clear error where it is called, and they hold nothing of the model, which is freed as without a
    session."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    router = next(m for n, m in model.named_modules() if n.endswith(".router"))
    with mr.attach(model) as session, torch.no_grad():
        kept = router.__dict__["forward"]
        with session.capture():
            model(tokens)
    assert "forward" not in router.__dict__
    with pytest.raises(mr.SessionStateError, match="detached"):
        kept(tokens)
    gone = weakref.ref(model)
    del model, router, session
    gc.collect()
    assert gone() is None


def test_compiled_training_step_follows_routes_and_matches_eager(tokens: torch.Tensor) -> None:
    model = mr.models.build("grouped_sigmoid", num_layers=2, first_dense_layers=1, expert_impl="dense")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=3.0)

        def step(fn):
            with session.replay(routes), session.keep_scores() as seen:
                out = fn(tokens, labels=tokens)
            # (its decision reads sigmoid scores plus a bias, which may be negative: no probabilities as they are)
            aux = mr.load_balancing_loss([s.softmax(-1) for s in seen.scores], seen.indices)
            (out.loss + 0.1 * aux).backward()
            assert all(torch.equal(a, b) for a, b in zip(seen.indices, routes.per_layer(), strict=True))
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return out.loss.detach(), grads

        loss, grads = step(model)
        counter = CompileCounter()
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        for _ in range(2):
            c_loss, c_grads = step(compiled)
            assert torch.allclose(c_loss, loss, atol=1e-6)
            for name, g in grads.items():
                assert torch.allclose(c_grads[name], g, atol=1e-5), name
        assert counter.frame_count == 1
        assert grads["layers.1.mlp.router.weight"].abs().sum() > 0


def test_graph_breaks_outside_the_router(tokens: torch.Tensor) -> None:
    """The sparse experts read counts on the host: a graph break, after the router's decision."""
    model = mr.models.build("topk_softmax", num_layers=2, first_dense_layers=1)
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model) as session, torch.no_grad():
        session.verify(tokens)
        with session.capture():
            compiled(tokens)
        routes = session.routes()
        assert routes.num_tokens == tokens.numel()
        perturb_routers(session, scale=3.0)
        with session.replay(routes):
            ref = model(tokens).logits
        with session.replay(routes), session.capture():
            out = compiled(tokens).logits
        assert session.routes().equal(routes)
        assert torch.equal(out, ref)


def test_inductor_replay_and_capture(tokens: torch.Tensor) -> None:
    model = mr.models.build("grouped_sigmoid", num_layers=1, expert_impl="dense")
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=3.0)
        with session.replay(routes):
            ref = model(tokens).logits
        compiled = torch.compile(model, fullgraph=True)
        with session.replay(routes), session.capture():
            out = compiled(tokens).logits
        assert session.routes().equal(routes)
        assert torch.allclose(out, ref, atol=1e-5)


def test_first_forward_under_compile_is_refused_with_the_fix(tokens: torch.Tensor) -> None:
    """No decision is taken on trust: compiled code cannot run the probe, so it says what to do."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(Exception, match=r"session\.verify\(example\)") as err, session.capture():
            compiled(tokens)
        assert "has not been established" in str(err.value)
        session.verify(tokens)
        with session.capture():
            compiled(tokens)
        assert session.routes().num_tokens == tokens.numel()


def test_a_model_compiled_before_attach_leaves_no_probe_state_behind(tokens: torch.Tensor) -> None:
    """A model compiled and run before attach, then captured compiled with no eager forward: its routers are
    established eagerly (the probe is never traced), and nothing is left half-done for later sessions (once,
    a traced probe left the nesting count negative and every later capture in the process recorded nothing)."""
    from moe_replay.evidence import NESTING

    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(tokens)
        with mr.attach(model) as session:
            try:
                with session.capture():
                    compiled(tokens)
            except Exception:  # (torch may refuse the mode inside a graph it compiled without one)
                pass
        assert NESTING.probing == 0 and NESTING.depth == 0
        fresh = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
        with mr.attach(fresh) as other, other.capture():
            fresh(tokens)
        assert other.routes().num_tokens == tokens.numel()


@pytest.mark.parametrize("compiled_first", [True, False], ids=["run-compiled-before-attach", "compiled-after"])
def test_a_first_forward_at_a_graph_break_is_refused_with_the_fix_or_runs(
    tokens: torch.Tensor, compiled_first: bool
) -> None:
    """No fullgraph: a router's first forward under the session may run at a graph break, where dynamo compiles
    the router's own frame under the interception. Where torch fails there, the error is ours and names the fix;
    after one eager forward, compiled capture and replay force the recorded experts."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        if compiled_first:
            compiled(tokens)
        with mr.attach(model) as session:
            try:
                with session.capture():
                    compiled(tokens)
            except Exception as e:  # torch's own failure, reported as what to do
                assert isinstance(e, mr.UnsupportedRouterError), f"{type(e).__name__}: {e}"
                assert "session.verify(example)" in str(e)
            session.verify(tokens)
            with session.capture():
                compiled(tokens)
            routes = session.routes()
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
            with session.capture():
                compiled(tokens)
            assert not session.routes().equal(routes)  # the routers choose other experts now
            with session.replay(routes), session.capture():
                compiled(tokens)
            assert session.routes().equal(routes)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_a_model_compiled_where_torch_falls_back_to_eager_captures_and_replays_every_forward(
    tokens: torch.Tensor, backend: str
) -> None:
    """Established without gradients (``verify``), a model compiled and run with gradients: every forward records
    what an eager one records, and a replay forces it. Once a false refusal with aot_eager: torch.compile gave up
    the model's frame after the first forward's refusal (a graph break to it) and compiled the router's own frame,
    called eagerly, past the lean interception, so later forwards made "no decision-like call"."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(tokens)
        expected = session.routes()
        session.verify(tokens)
        compiled = torch.compile(model, backend=backend)
        for _ in range(3):
            with session.capture():
                compiled(tokens).logits.sum().backward()
            assert session.routes().equal(expected)
        perturb_routers(session)
        with session.replay(expected), session.capture():
            compiled(tokens).logits.sum().backward()
        assert session.routes().equal(expected)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".router." in n or "gate" in n)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_layers_under_compile(tokens: torch.Tensor, mode: str) -> None:
    """Dynamo does not trace a checkpointed region with side effects: it runs eagerly, and still holds."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=3.0)
        with session.replay(routes):
            model(tokens, labels=tokens).loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        model.config.checkpointing = mode
        compiled = torch.compile(model, backend="aot_eager")
        with session.replay(routes), session.capture():
            compiled(tokens, labels=tokens).loss.backward()
        assert session.routes().equal(routes)  # recorded once, not again in the recompute
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-5), name


def test_compiled_capture_writes_a_fixed_ring_and_raises_at_the_overflowing_forward(tokens: torch.Tensor) -> None:
    """A compiled region cannot grow its ring: on CPU the forward that would overflow it raises, rows before stay."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, expert_impl="dense")
    n = tokens.numel()
    capacity = 2 * n + n // 2  # two forwards fit, the third does not
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with mr.attach(model, capacity=capacity) as session, torch.no_grad():
        with session.capture():
            for _ in range(2):
                model(tokens)
        two = session.routes()
        assert not any(r.fixed for r in session._rings())  # eager writes never fix a ring
        ran = 0
        with pytest.raises(mr.CaptureOverflowError, match=r"capture overflow at this forward") as err:
            with session.capture():
                for _ in range(5):
                    compiled(tokens)
                    ran += 1
        assert ran == 2
        assert f"'layers.1.mlp.router': {2 * n} of {capacity}" in str(err.value)
        assert session.routes(allow_partial=True).equal(two)
        assert all(r.fixed_by == "a compiled region" for r in session._rings())
        # fixed for good: eager forwards cannot grow it either, and raise at the forward that would overflow
        ran = 0
        with pytest.raises(
            mr.CaptureOverflowError, match=rf"at least {3 * n} rows, but its ring is fixed at {capacity}"
        ):
            with session.capture():
                for _ in range(5):
                    model(tokens)
                    ran += 1
        assert ran == 2
        with pytest.raises(mr.CaptureOverflowError, match="cannot be replaced"):
            session.reserve(4 * n)
        with pytest.raises(mr.CaptureOverflowError, match="cannot be replaced"):
            with session.capture(expected_tokens=4 * n):
                pass
        with session.capture(expected_tokens=2 * n):  # what fits is fine
            for _ in range(2):
                compiled(tokens)
        assert session.routes().equal(two)


def test_a_first_compiled_forward_that_overflows_the_ring_names_the_rows_written(tokens: torch.Tensor) -> None:
    """Once the overflow of a ring by the first compiled forward said "rows written so far per router: )": that run
    raised before it marked the rings fixed, and only rings marked fixed were counted."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with mr.attach(model, capacity=tokens.numel() - 1) as session, torch.no_grad():
        session.verify(tokens)
        with pytest.raises(mr.CaptureOverflowError, match="capture overflow at this forward") as err:
            with session.capture():
                compiled(tokens)
    assert f"per router: 'layers.1.mlp.router': 0 of {tokens.numel() - 1})" in str(err.value)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("direction", ["bare to compiled", "compiled to bare"])
def test_routes_cross_the_compile_wrapper(tokens: torch.Tensor, direction: str) -> None:
    """Routes recorded on the bare model replay on torch.compile's wrapper (routers under _orig_mod.), and back."""
    model = mr.models.build("grouped_sigmoid", num_layers=2, first_dense_layers=1, expert_impl="dense")
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    src, dst = (model, compiled) if direction == "bare to compiled" else (compiled, model)
    with mr.attach(src) as s, torch.no_grad():
        model(tokens)  # one eager forward establishes each decision (compiled code cannot)
        for _ in range(2):  # (a block's first forward of a new model is watched, eagerly; the second compiles)
            with s.capture():
                src(tokens)
        routes = s.routes()
        perturb_routers(s, scale=3.0)
    assert routes.names[0].startswith("_orig_mod.") == (direction == "compiled to bare")
    with mr.attach(model) as bare, bare.replay(routes.rename({"_orig_mod.": ""})), torch.no_grad():
        ref = model(tokens).logits  # the reference: eager, the bare model's own names
    with mr.attach(dst) as session, torch.no_grad():
        model(tokens)
        with session.capture():  # (a block's first forward of a new model is watched, eagerly)
            dst(tokens)
        with session.replay(routes), session.capture():
            out = dst(tokens).logits
        expected = {"": "_orig_mod."} if direction == "bare to compiled" else {"_orig_mod.": ""}
        assert session.renamed == expected and "routes renamed" in repr(session)
        back = {new: old for old, new in expected.items()}
        assert session.routes().rename(back).equal(routes)  # forced in the compiled graph, and recorded
    assert torch.allclose(out, ref, atol=1e-6)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("style", ["softmax_topk", "grouped_sigmoid"])
def test_eager_and_compiled_forwards_mixed_in_one_capture_and_one_replay(style: str) -> None:
    """Eager forwards count their rows on the host and leave the device cursor behind; the compiled code's
    first run brings it up to date. Rows and forced experts come out as if every forward were eager."""
    model = mr.models.build(style, num_layers=2, first_dense_layers=1, expert_impl="dense")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, 128, (2, 6), generator=g) for _ in range(6)]
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    run = [model, model, compiled, compiled, model, compiled]  # eager, compiled, eager again, compiled again
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for x in xs:
                model(x)
        want = session.routes()
        with session.capture():
            for f, x in zip(run, xs, strict=True):
                f(x)
        assert session.routes().equal(want)
        assert all(r.fixed_by == "a compiled region" for r in session._rings())
        with session.capture():  # a new capture, compiled forwards only: nothing of the last one's catch-up
            for x in xs:
                compiled(x)
        assert session.routes().equal(want)
        perturb_routers(session, scale=3.0)  # the routers' own choice is now another
        with session.replay(want):
            ref = [model(x).logits for x in xs]
        with session.replay(want):
            out = [f(x).logits for f, x in zip(run, xs, strict=True)]
        with session.capture():
            model(xs[0])
        assert not session.routes().equal(want[: xs[0].numel()])  # the perturbation changed the free choice
    for a, b in zip(out, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert counter.frame_count >= 1


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _export(module: torch.nn.Module, x: torch.Tensor) -> Any:
    return torch.export.export(module, (x,)).module()


def _export_strict(module: torch.nn.Module, x: torch.Tensor) -> Any:
    return torch.export.export(module, (x,), strict=True).module()


def _jit_trace(module: torch.nn.Module, x: torch.Tensor) -> Any:
    return torch.jit.trace(module, (x,), check_trace=False)


def _make_fx(module: torch.nn.Module, x: torch.Tensor) -> Any:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(module)(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "make", [_export, _export_strict, _jit_trace, _make_fx], ids=["export", "export-strict", "jit.trace", "make_fx"]
)
def test_export_or_trace_inside_a_block_is_refused_and_outside_routes_natively(tokens: torch.Tensor, make: Any) -> None:
    """torch.export, jit.trace or make_fx inside a capture or replay block (a guardless program): refused.

    Once silent: a program made inside replay() forced the replayed experts at every later call, outside
    blocks too and with the routers changed; one made inside capture() wrote into the session's ring."""
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense").eval()
    wrapped = _Logits(model)
    # (strict export traces with dynamo, which raises its own error carrying the refusal's message)
    error = Exception if make is _export_strict else mr.UnsupportedRouterError
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(tokens)
        routes = session.routes()
        for block in (session.capture, lambda: session.replay(routes)):
            with pytest.raises(error, match="is being exported"), block():
                make(wrapped, tokens)
        program = make(wrapped, tokens)
        perturb_routers(session, scale=3.0)
        with session.capture():
            plain = model(tokens).logits
        native = session.routes()
        assert not native.equal(routes)
        with session.capture():  # the program routes natively and writes nothing into the ring
            assert torch.equal(program(tokens), plain)
            model(tokens)
        assert session.routes().equal(native)


def _tiny() -> Any:
    from .tinymoe import RouterSpec, TinyMoE

    return TinyMoE([RouterSpec(8, 2), RouterSpec(6, 1, "argmax"), RouterSpec(8, 2, "grouped", n_group=4, topk_group=2)])


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("make", [_export, _jit_trace, _make_fx], ids=["export", "jit.trace", "make_fx"])
@pytest.mark.parametrize("target", ["the model", "a router", "a copy"])
def test_export_or_trace_of_the_attached_module_itself_routes_natively_or_is_refused(make: Any, target: str) -> None:
    """Once torch.export of an attached model, a router or a copy made while attached failed with an AttributeError
    (it reads the exported module's ``forward.__code__``, which the session's wrappers had none of), and jit.trace of
    an attached model whose routers no forward had established traced the probe and failed in TorchScript.

    Outside blocks the program routes natively, like the plain module; inside a block it is refused with our
    error, and the model keeps the session's forwards (and a later capture records as before)."""
    import copy

    model = _tiny()
    plain = _tiny()
    x = model.inputs((3, 5))
    with mr.attach(model) as session, torch.no_grad():
        forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
        module = {"the model": model, "a router": model.layers[0].router, "a copy": copy.deepcopy(model)}[target]
        reference = {"the model": plain, "a router": plain.layers[0].router, "a copy": plain}[target]
        program = make(module, x)  # (before any forward: nothing established)
        assert _same(program(x), reference(x))
        with session.capture():
            model(x)
        routes = session.routes()
        if target != "a copy":
            for block in (session.capture, lambda: session.replay(routes)):
                with pytest.raises(mr.UnsupportedRouterError, match="is being exported"), block():
                    make(module, x)
        assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
        for m in {model, plain, module if target == "a copy" else model}:
            m.perturb(scale=2.0)
        program = make(module, x)
        with session.capture():  # the program routes natively and writes nothing into the ring
            assert _same(program(x), reference(x))
            model(x)
        native = session.routes()
    with mr.attach(plain) as other, other.capture(), torch.no_grad():
        plain(x)
    assert native.equal(other.routes())


class _FxRouter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 6, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = torch.topk(self.proj(x).softmax(-1), 2, dim=-1)
        return v / v.sum(-1, keepdim=True), i


class _FxMoE(torch.nn.Module):
    """Two layers of a router and a table of expert embeddings that torch.fx.symbolic_trace can trace."""

    def __init__(self) -> None:
        super().__init__()
        self.routers = torch.nn.ModuleList([_FxRouter(), _FxRouter()])
        self.experts = torch.nn.Parameter(torch.randn(2, 6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n, router in enumerate(self.routers):
            w, i = router(x)
            x = x + (w.unsqueeze(-1) * self.experts[n][i]).sum(-2)
        return x


@pytest.mark.reliability("silent replays")
def test_fx_symbolic_trace_of_an_attached_model_routes_natively_or_is_refused() -> None:
    """Once torch.fx.symbolic_trace of an attached model failed with a refusal calling the routers soft routing (the
    decision was established on the tracer's proxies), idle too; and inside a block it was not refused as tracing.

    Outside blocks the traced program routes natively; inside a block it is refused as an export is."""
    torch.manual_seed(0)
    model = _FxMoE()
    x = torch.randn(3, 5, 8)
    with mr.attach(model, include="routers.*", top_k=2, num_experts=6) as session:
        program = torch.fx.symbolic_trace(model)  # (before any forward: nothing established)
        with torch.no_grad():
            assert torch.equal(program(x), model(x))
            session.verify(x)
        program = torch.fx.symbolic_trace(model)  # (with gradients: a mode verify() did not establish)
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        for block in (session.capture, lambda: session.replay(routes, strict=False)):
            with pytest.raises(mr.UnsupportedRouterError, match="is being exported"), block():
                torch.fx.symbolic_trace(model)
        with torch.no_grad():
            for router in model.routers:
                router.proj.weight.add_(torch.randn_like(router.proj.weight))
            with session.capture():  # the program routes natively and writes nothing into the ring
                out = program(x)
                want = model(x)
            native = session.routes()
            assert torch.equal(out, want) and not native.equal(routes)
            with session.replay(routes):  # and is not forced either
                assert torch.equal(program(x), want)
                model(x)


def _same(a: Any, b: Any) -> bool:
    """Equal tensors, or equal tuples of them."""
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def test_vmap_over_a_compiled_model_inside_a_block_is_refused(tokens: torch.Tensor) -> None:
    """Once silent: dynamo cannot ask for the torch.func transform, so vmap over a compiled model in replay()
    forced one entry's rows onto every entry with no error (capture() raised a raw dynamo error)."""
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense").eval()
    compiled = torch.compile(model, backend="eager")
    batch = torch.stack([tokens, tokens.flip(-1)])
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(tokens)  # (the first forward under a session runs eagerly)
        routes = session.routes()
        for block in (session.capture, lambda: session.replay(routes)):
            with pytest.raises(mr.UnsupportedRouterError, match="torch.func transform"), block():
                torch.func.vmap(lambda t: compiled(t).logits)(batch)
        with session.capture(), session.replay(routes):  # compiled, outside vmap: still forced and recorded
            compiled(tokens)
        assert session.routes().equal(routes)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_a_torch_func_transform_inside_compiled_code_in_a_block_is_refused(transform: str) -> None:
    """Once torch.func.grad run inside a compiled function, in a capture or replay block, failed with dynamo's
    TorchRuntimeError (the ring write under the transform): the transform the compiled code runs itself is now
    refused with ours, as one around it is. Outside blocks it runs as before."""
    model = _tiny()
    x = model.inputs((3, 5))
    if transform == "grad":
        params = {n: p.detach() for n, p in model.named_parameters()}

        def step(p: dict[str, torch.Tensor]) -> Any:
            return torch.func.grad(lambda q: torch.func.functional_call(model, q, (x,)).sum())(p)

        run, arg = torch.compile(step, backend="eager"), params
    else:
        run, arg = torch.compile(lambda t: torch.func.vmap(model)(t), backend="eager"), torch.stack([x, x + 1])
    with mr.attach(model) as session:
        with torch.no_grad():
            session.verify(x)
            with session.capture():
                model(x)
        with torch.compiler.set_stance("force_eager"):
            model(x)  # (the mode with gradients, established eagerly)
        routes = session.routes()
        run(arg)  # idle: fine
        for block in (session.capture, lambda: session.replay(routes, strict=False)):
            with pytest.raises(mr.UnsupportedRouterError, match="torch.func transform"), block():
                run(arg)
        with session.capture():
            model(x)
        assert session.routes().equal(routes)


@pytest.mark.reliability("silent replays")
def test_a_non_strict_compiled_replay_that_reads_past_its_routes_fails_at_exit(tokens: torch.Tensor) -> None:
    """A strict=False replay whose compiled forwards read past the end of the routes fails when the block exits.

    Once silent: compiled reads past the end are clamped to a padding row, so the tokens of the extra forward
    were all sent to expert 0 and only a strict replay reported it. Leaving rows unread stays allowed."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    n = tokens.numel()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(tokens)
            model(tokens)
        routes = session.routes()
        with pytest.raises(mr.ReplayConsumptionError, match=rf"'layers.1.mlp.router' read {3 * n} of {2 * n} rows"):
            with session.replay(routes, strict=False):
                for _ in range(3):
                    compiled(tokens)
        perturb_routers(session, scale=3.0)
        with session.replay(routes, strict=False), session.capture():  # a prefix: fine, and forced
            compiled(tokens)
        assert session.routes().equal(routes[:n])


def _compile_in_place(model: torch.nn.Module, backend: Any) -> torch.nn.Module:
    model.compile(fullgraph=True, backend=backend)
    return model


def _compile_a_layer(model: torch.nn.Module, backend: Any) -> torch.nn.Module:
    model.layers[1].compile(fullgraph=True, backend=backend)
    return model


@pytest.mark.parametrize(
    "compile_",
    [lambda m, b: torch.compile(m, fullgraph=True, backend=b), _compile_in_place, _compile_a_layer],
    ids=["torch.compile", "model.compile", "layer.compile"],
)
def test_verify_establishes_a_compiled_model_eagerly(tokens: torch.Tensor, compile_: Any) -> None:
    """session.verify(example), the fix every refusal names, runs eagerly on a compiled model: once, it ran the
    compiled code, which cannot establish a decision, and failed with torch's error (model.compile() left no eager
    forward at all). Afterwards the compiled code captures and forces."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    eager = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1, expert_impl="dense")
    counter = CompileCounter()
    target = compile_(model, counter)
    with mr.attach(target) as session, torch.no_grad():
        session.verify(tokens)
        assert counter.frame_count == 0  # (verify compiled nothing)
        with session.capture():
            target(tokens)
        routes = session.routes()
        assert counter.frame_count >= 1
        with mr.attach(eager) as plain, plain.capture():
            eager(tokens)
        assert routes.equal(plain.routes().rename(dict(zip(plain.names, routes.names, strict=True))))
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture():
            target(tokens)
        assert session.routes().equal(routes)


@pytest.mark.parametrize("compiled", ["the model", "the experts inside the router's scope"])
def test_a_router_under_the_mode_runs_eagerly_among_compiled_code(tokens: torch.Tensor, compiled: str) -> None:
    """A bare gate is intercepted over its whole MoE block, under the mode (its experts call a tensor method).

    Once, compiled frames inside that eager forward were compiled with the mode on the stack, and torch failed
    on every capture: a compiled model whose sparse experts graph-break, and an eager model with its experts
    compiled. The forward now runs eagerly inside, and records and forces as an eager one."""
    model = mr.models.build("linear_gate", num_layers=2, first_dense_layers=1)
    counter = CompileCounter()
    if compiled == "the model":
        run = torch.compile(model, backend=counter)
    else:
        model.layers[1].mlp.experts.compile(backend=counter)
        run = model
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(tokens)
        want = session.routes()
        assert session.table().count("not through torch's function") == 1  # (it keeps the mode)
        with session.capture():
            run(tokens)
        assert session.routes().equal(want)
        perturb_routers(session, scale=3.0)
        with session.replay(want):
            ref = model(tokens).logits
        with session.replay(want), session.capture():
            out = run(tokens).logits
        assert session.routes().equal(want)
        assert torch.allclose(out, ref, atol=1e-6)
        run(tokens)  # idle: compiled code runs compiled
    assert counter.frame_count >= 1


def test_a_first_forward_with_gradients_at_a_graph_break_is_established_eagerly(tokens: torch.Tensor) -> None:
    """verify() establishes the routers without gradients; the first compiled training forward then reaches each
    router in a new mode. Without fullgraph, dynamo runs that router at a graph break: once, it compiled the
    session's eager bookkeeping frame by frame there and failed; now it runs eagerly and is established."""
    model = mr.models.build("grouped_sigmoid", num_layers=2, first_dense_layers=1, expert_impl="dense")
    compiled = torch.compile(model, backend="eager")
    with mr.attach(model) as session:
        session.verify(tokens)
        with session.capture(), torch.no_grad():
            model(tokens)
        want = session.routes()
        with session.capture():
            compiled(tokens).logits.sum().backward()
        assert session.routes().equal(want)
        perturb_routers(session, scale=3.0)
        with session.replay(want), session.capture():
            compiled(tokens).logits.sum().backward()
        assert session.routes().equal(want)


def test_router_forwards_that_overlap_in_threads_leave_compiled_code_compiled() -> None:
    """The force_eager stance of an eager router forward is global: forwards that overlap in two threads and end
    in the order they began must still put back the stance that was there, or every later compiled call runs eager."""
    import threading
    import time

    from moe_replay.intercept import _uncompiled

    started = threading.Barrier(2)

    def forward(delay: float) -> None:
        started.wait()
        time.sleep(delay)

    threads = [threading.Thread(target=_uncompiled, args=(forward, d)) for d in (0.05, 0.1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counter = CompileCounter()
    torch.compile(lambda x: x + 1, backend=counter)(torch.zeros(2))
    assert counter.frame_count == 1


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_forward_hook_that_remaps_the_indices_is_refused_in_a_compiled_block(block: str) -> None:
    """Once silent: a forward hook on a router that remaps the indices it returned was refused in an eager block,
    but in a compiled one the layer dispatched the remapped experts while the capture recorded (or the replay
    forced) the router's own. The guard is put on as the block starts, and dynamo traces its check with the hooks."""
    model = _tiny()
    x = model.inputs((3, 5))
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def remap(module: torch.nn.Module, args: Any, out: Any) -> Any:
        weights, idx = out
        return weights, (idx + 1) % module.num_experts

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        with session.capture():
            model(x)
        routes = session.routes()
        model.layers[0].router.register_forward_hook(remap)
        with pytest.raises(mr.UnsupportedRouterError, match="forward hook"), session.capture():
            model(x)  # (eager: refused)
        ctx = session.capture() if block == "capture" else session.replay(routes)
        with pytest.raises(mr.UnsupportedRouterError, match="forward hook"), ctx:
            compiled(x)


@pytest.mark.reliability("silent replays")
def test_a_compiled_forward_from_another_thread_inside_a_block_is_refused() -> None:
    """Once silent: while one thread was inside capture(), a fullgraph compiled forward of the model from another
    thread wrote its rows into the capture, interleaved with the owner's (an eager one was refused). The code traced
    in a block is guarded on the thread (a ``threading.local``), and the other thread's trace raises as it runs."""
    import threading

    model = _tiny()
    x = model.inputs((3, 5))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with torch.no_grad():
                compiled(x)
        except BaseException as e:  # (what the thread raised, for the assertion below)
            errors.append(e)

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        with session.capture():
            compiled(x)  # (the capture state compiled in this thread)
        with session.capture():
            compiled(x)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        assert session.routes().num_tokens == 15
    assert len(errors) == 1 and isinstance(errors[0], mr.SessionStateError)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph break"])
def test_a_forward_hook_that_reads_the_indices_is_exact_in_a_compiled_block_and_one_that_remaps_them_refused(
    fullgraph: bool,
) -> None:
    """A hook that only reads what a router returned passes in a compiled block (its capture is the eager one's),
    and one that remaps the indices is refused there, also where the hook breaks the graph (then dynamo compiles the
    router's forward and its hooks apart: the guard finds what the forward returned either way)."""
    model = _tiny()
    x = model.inputs((3, 5))
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    seen: list[torch.Tensor] = []

    def look(module: torch.nn.Module, args: Any, out: Any) -> None:
        if not fullgraph:
            torch._dynamo.graph_break()
        seen.append(out[1])

    def remap(module: torch.nn.Module, args: Any, out: Any) -> Any:
        if not fullgraph:
            torch._dynamo.graph_break()
        return out[0], (out[1] + 1) % module.num_experts

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        with session.capture():
            model(x)
        eager = session.routes()
        handle = model.layers[0].router.register_forward_hook(look)
        for _ in range(2):  # (a second block: a guard of its own, the code compiled in the first)
            with session.capture():
                compiled(x)
            assert session.routes().equal(eager) and len(seen) > 0
            with session.replay(eager):
                compiled(x)
        handle.remove()
        model.layers[1].router.register_forward_hook(remap)
        with pytest.raises(mr.UnsupportedRouterError, match="forward hook"), session.capture():
            compiled(x)


@pytest.mark.reliability("silent replays")
def test_a_forward_hook_that_cuts_weights_to_zero_is_refused_in_a_compiled_block() -> None:
    """Once silent: a forward hook on a router that cuts its weights to zero (a minimum-weight cut from the current
    scores, made after the decision) was refused in an eager block only; a compiled block's layer dropped the
    experts whose weights it cut while the capture recorded (or the replay forced) them. Compiled code marks a flag
    on the router's device, read as the block ends (a hook that rescales the weights passes there, and compiles
    nothing new per block: test_many_blocks_compile_nothing_after_warm_up)."""
    from .tinymoe import RouterSpec, TinyMoE

    model = TinyMoE([RouterSpec(8, 2)])
    x = model.inputs((3, 5))
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def cut(module: torch.nn.Module, args: Any, out: Any) -> Any:
        w = out[0]
        return (w * (w >= 0.9 * w.amax(-1, keepdim=True)), *out[1:])  # every slot but the top one cut

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        with session.capture():
            model(x)
        routes = session.routes()
        model.layers[0].router.register_forward_hook(cut)  # (before compiling: dynamo follows no hook added since)
        with pytest.raises(mr.UnsupportedRouterError, match="cut to zero"), session.capture():
            model(x)  # (eager: refused)
        for ctx in (session.capture, lambda: session.replay(routes), session.capture):  # (each block its own flag)
            with pytest.raises(mr.UnsupportedRouterError, match="cut to zero.*compiled code"), ctx():
                compiled(x)


@pytest.mark.reliability("silent replays")
def test_a_forward_hook_that_remaps_the_indices_in_place_is_refused_in_a_compiled_block() -> None:
    """Once silent: a forward hook that remaps the indices a router returned in place (the same tensor, other
    values) is refused in an eager block by the tensor's version counter, and in a compiled one (which traces no
    version counter) by their values, compared on the device with a copy and read as the block ends."""
    model = _tiny()
    x = model.inputs((3, 5))
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def remap(module: torch.nn.Module, args: Any, out: Any) -> None:
        out[1].add_(1).remainder_(module.num_experts)

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        model.layers[0].router.register_forward_hook(remap)
        with pytest.raises(mr.UnsupportedRouterError, match="forward hook"), session.capture():
            model(x)  # (eager: refused)
        with pytest.raises(mr.UnsupportedRouterError, match="forward hook"), session.capture():
            compiled(x)


@pytest.mark.reliability("concurrency")
def test_the_block_thread_keeps_its_compiled_code_after_another_thread_was_refused() -> None:
    """The code traced for another thread inside a block is guarded on that thread: the block's own thread goes on
    running its compiled forwards, which record what an eager forward records, and the other thread runs natively
    once the block has ended."""
    import threading

    model = _tiny()
    x = model.inputs((3, 5))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    errors: list[BaseException] = []
    outs: list[torch.Tensor] = []

    def other() -> None:
        try:
            with torch.no_grad():
                outs.append(compiled(x))
        except BaseException as e:  # (what the thread raised, for the assertion below)
            errors.append(e)

    def run_other() -> None:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()

    with mr.attach(model) as session, torch.no_grad():
        session.verify(x)
        with session.capture():
            model(x)
        eager = session.routes()
        with session.capture():
            compiled(x)
            run_other()
            run_other()
            compiled(x)
        frames = counter.frame_count
        assert session.routes().equal(mr.Routes.cat([eager, eager]))  # (the owner's two forwards, nothing else)
        assert len(errors) == 2 and all(isinstance(e, mr.SessionStateError) for e in errors)
        with session.capture():
            compiled(x)  # (no new trace for the block's thread)
        assert counter.frame_count == frames and session.routes().equal(eager)
        run_other()  # outside the blocks: natively
        assert len(errors) == 2 and torch.equal(outs[0], model(x))


def test_verify_that_overlaps_a_router_forward_in_another_thread_leaves_compiled_code_compiled() -> None:
    """verify() runs its forward under the same counted force_eager stance as router forwards: a verify() that
    ends while a router forward of another thread still runs must not leave the stance set for compiled code."""
    import threading

    from moe_replay.intercept import _uncompiled

    model = mr.models.build("softmax_topk", num_layers=1)
    other_started, verify_done = threading.Event(), threading.Event()

    def other_forward() -> None:
        other_started.set()
        verify_done.wait(timeout=10)

    other = threading.Thread(target=_uncompiled, args=(other_forward,))

    def start_other(module: torch.nn.Module, args: Any) -> None:
        other.start()
        other_started.wait(timeout=10)

    handle = model.register_forward_pre_hook(start_other)
    with mr.attach(model) as session:
        session.verify(torch.zeros(1, 4, dtype=torch.long))
    handle.remove()
    verify_done.set()
    other.join()
    counter = CompileCounter()
    torch.compile(lambda x: x + 1, backend=counter)(torch.zeros(2))
    assert counter.frame_count == 1


@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_first_forward_under_fullgraph_is_refused_with_our_error(tokens: torch.Tensor, block: str) -> None:
    """Under fullgraph=True the compiler cannot run a router's first forward eagerly, and reports the refusal
    it traced as its own Unsupported error; the block raises ours again, with the fix, and nothing is left set."""
    from moe_replay.evidence import NESTING

    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with mr.attach(model) as session:
        with torch.no_grad():
            session.verify(tokens)
            with session.capture():
                model(tokens)
        routes = session.routes()
    with mr.attach(model) as session:
        ctx = session.capture() if block == "capture" else session.replay(routes)
        with pytest.raises(mr.UnsupportedRouterError, match=r"session\.verify\(example\)") as raised:
            with ctx:
                compiled(tokens)
        assert raised.value.__cause__ is not None  # the compiler's error kept as the cause
        assert NESTING.probing == 0 and NESTING.depth == 0


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_a_compiled_training_step_after_verify_is_refused_with_a_fix_that_works(how: str) -> None:
    """Once the refusal of a compiled first forward with gradients said session.verify(example) fixes it.

    verify() runs without gradients and the decision is established per gradient mode, so after it a
    fullgraph training step was refused again with the same advice, and a model.compile()'d model had no
    eager forward with gradients to run at all. The refusal now names the mode and a fix that works (one
    forward under torch.compiler.set_stance('force_eager')), after which the compiled step replays the
    recorded experts: its output and gradients are those of a hand-written gather at the recorded rows."""
    from .tinymoe import RouterSpec, TinyMoE

    specs = [RouterSpec(8, 2), RouterSpec(6, 1, "argmax"), RouterSpec(8, 2, "grouped", n_group=4, topk_group=2)]
    model = TinyMoE(specs)
    reference = TinyMoE(specs)
    x = model.inputs((3, 5))
    if how == "model.compile":
        model.compile(fullgraph=True, backend="aot_eager")
        target: torch.nn.Module = model
    else:
        target = torch.compile(model, fullgraph=True, backend="aot_eager")
    with mr.attach(model) as session:
        session.verify(x)
        with session.capture(), torch.no_grad():
            target(x)
        routes = session.routes()
        model.perturb(scale=2.0)
        with pytest.raises(mr.UnsupportedRouterError, match="with gradients") as raised, session.replay(routes):
            target(x).square().sum().backward()
        assert "set_stance('force_eager')" in str(raised.value) and "verify(example) runs without" in str(raised.value)
        with torch.compiler.set_stance("force_eager"):
            target(x).square().sum()  # the fix the refusal names: one eager forward with gradients
        model.zero_grad(set_to_none=True)
        with session.replay(routes), session.capture():
            out = target(x)
            out.square().sum().backward()
        assert session.routes().equal(routes)
    reference.load_state_dict(model.state_dict())
    want = reference(x, forced=routes.per_layer())
    want.square().sum().backward()
    assert torch.allclose(out, want, atol=1e-6)
    got = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(got[name].grad, p.grad, atol=1e-5), name
    assert all(got[f"layers.{i}.router.weight"].grad.abs().sum() > 0 for i in range(3))
