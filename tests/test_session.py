"""Capture and replay on the five reference router styles."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr
from moe_replay.models import MoEBlock

from .conftest import assert_untouched, clone_model, perturb_routers, snapshot, tried


def build(style: str, **kw) -> mr.models.MoETransformer:
    return mr.models.build(style, num_layers=3, first_dense_layers=1, shared_expert=True, **kw)


def test_capture_then_replay_is_bit_exact(style: str, tokens: torch.Tensor) -> None:
    model = build(style)
    with mr.attach(model) as session:
        with session.capture():
            ref = model(tokens).logits
        routes = session.routes()
        assert routes.num_tokens == tokens.numel()
        assert routes.names == (
            "layers.1.mlp." + ("gate" if style == "linear_gate" else "router"),
            "layers.2.mlp." + ("gate" if style == "linear_gate" else "router"),
        )
        with session.replay(routes):
            out = model(tokens).logits
    assert torch.equal(ref, out)


def test_replay_forces_recorded_experts_after_perturbation(style: str, tokens: torch.Tensor) -> None:
    model = build(style)
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        recorded = session.routes()
        perturb_routers(session)
        with session.capture():
            model(tokens)
        free = session.routes()
        assert not free.equal(recorded), "the perturbation should change some decisions"
        with session.replay(recorded), session.capture():
            model(tokens)
        forced = session.routes()
    assert forced.equal(recorded)


# hand-written gather-based routers: what replay must compute, written without moe_replay
def _reference_route(block: MoEBlock, x: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if block.style == "linear_gate":
        probs = F.softmax(block.gate(x), dim=-1, dtype=torch.float)
        w = probs.gather(1, forced)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), forced
    r = block.router
    if block.style == "softmax_topk":
        probs = F.softmax(F.linear(x, r.weight), dim=-1, dtype=torch.float)
        w = probs.gather(1, forced)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), forced
    if block.style == "topk_softmax":
        return F.softmax(F.linear(x, r.weight).gather(1, forced), dim=-1, dtype=torch.float).to(x.dtype), forced
    if block.style == "grouped_sigmoid":
        scores = torch.sigmoid(F.linear(x.float(), r.weight.float()))
        w = scores.gather(1, forced)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return (w * r.scale).to(x.dtype), forced
    probs = F.softmax(F.linear(x, r.weight), dim=-1, dtype=torch.float)
    return probs.gather(1, forced).to(x.dtype), forced


def _reference_model(model: torch.nn.Module, routes: mr.Routes) -> torch.nn.Module:
    ref = clone_model(model)
    layers = dict(zip(routes.names, routes.per_layer(), strict=True))
    for name, m in ref.named_modules():
        if isinstance(m, MoEBlock):
            key = name + (".gate" if m.style == "linear_gate" else ".router")
            forced = layers[key]
            m.route = types.MethodType(lambda self, x, f=forced: _reference_route(self, x, f), m)
    return ref


@pytest.mark.parametrize("weights_from_topk", [False, True])
def test_replay_gradients_match_gather_reference(style: str, tokens: torch.Tensor, weights_from_topk: bool) -> None:
    if weights_from_topk and style != "grouped_sigmoid":
        pytest.skip("only the group-limited router has the masked-weights variant")
    model = build(style, group_weights_from_topk=weights_from_topk)
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=2.0)
        reference = _reference_model(model, routes)
        with session.replay(routes):
            loss = model(tokens, labels=tokens).loss
            loss.backward()
    ref_loss = reference(tokens, labels=tokens).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=0)
    ref_params = dict(reference.named_parameters())
    router_grads = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, ref_params[name].grad, atol=1e-6, rtol=0), name
        if name.endswith(("router.weight", "mlp.gate.weight")):
            assert p.grad.abs().sum() > 0, f"no gradient reached {name}"
            router_grads += 1
    assert router_grads == 2


def test_masked_group_scores_get_unmasked_weights(tokens: torch.Tensor) -> None:
    """DeepSeek-V2 style: a forced expert outside the chosen groups keeps its real score."""
    model = build("grouped_sigmoid", group_weights_from_topk=True, num_experts=16, n_group=4, topk_group=1)
    router = model.layers[1].mlp.router
    seen = {}
    orig = router.forward

    def spy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen["out"] = orig(x)  # the last call's output: the replayed forward's
        return seen["out"]

    router.forward = spy
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=3.0)
        seen.clear()
        with session.replay(routes):
            model(tokens)
    del router.forward
    weights = seen["out"][0]
    assert (weights > 0).all(), "a gather from masked scores would give zero weights"


def test_missing_rows_route_natively(tokens: torch.Tensor) -> None:
    model = build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        recorded = session.routes()
        perturb_routers(session)
        with session.capture():
            model(tokens)
        free = session.routes()
        layers = [t.clone() for t in recorded.per_layer()]
        blank = torch.zeros(tokens.numel(), dtype=torch.bool)
        blank[::3] = True
        layers[0][blank] = -1  # the first MoE layer has no routes for these tokens
        partial = mr.Routes(layers, names=recorded.names, num_experts=recorded.num_experts)
        with session.replay(partial), session.capture():
            model(tokens)
        got = session.routes()
    first, second = got.per_layer()
    assert torch.equal(first[~blank], recorded.per_layer()[0][~blank])
    assert torch.equal(first[blank], free.per_layer()[0][blank])  # same inputs to layer 1: native choice
    assert torch.equal(second, recorded.per_layer()[1])


def test_capture_accumulates_forwards_in_call_order(tokens: torch.Tensor) -> None:
    model = build("topk_softmax")
    with mr.attach(model) as session:
        with session.capture():
            model(tokens[:1])
        a = session.routes()
        with session.capture():
            model(tokens[1:])
        b = session.routes()
        with session.capture():
            model(tokens[:1])
            model(tokens[1:])
        both = session.routes()
        with session.capture(clear=False):
            model(tokens[:1])
        appended = session.routes()
    assert both.equal(mr.Routes.cat([a, b]))
    assert appended.equal(mr.Routes.cat([a, b, a]))


def test_replay_consumes_rows_across_forwards(tokens: torch.Tensor) -> None:
    model = build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            model(tokens[:1])
            model(tokens[1:])
        routes = session.routes()
        perturb_routers(session)
        with session.replay(routes), session.capture():
            model(tokens[:1])
            model(tokens[1:])
        assert session.routes().equal(routes)


def test_generate_capture_matches_teacher_forced_replay() -> None:
    model = build("grouped_sigmoid")
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture():
            seq = model.generate(prompt, max_new_tokens=5)
        routes = session.routes()
        assert routes.num_tokens == seq.shape[1] - 1  # the last sampled token is never routed
        perturb_routers(session)
        with session.replay(routes), session.capture():
            model(seq[:, :-1])
        assert session.routes().equal(routes)


def test_session_repr_says_when_the_last_capture_was_interrupted(tokens: torch.Tensor) -> None:
    """Once misleading: after a capture ended by an exception, the repr read as a plain idle session."""
    model = build("softmax_topk")
    with mr.attach(model) as session:
        with pytest.raises(KeyError), session.capture():
            model(tokens)
            raise KeyError("stop")
        assert "last capture interrupted by KeyError" in repr(session)
        with session.capture():
            model(tokens)
        assert "interrupted" not in repr(session)


def test_session_repr_and_state(tokens: torch.Tensor) -> None:
    model = build("softmax_topk")
    session = mr.attach(model, capacity=128)
    k = session.sites[0].top_k
    held = f"held=cpu: 128 rows x 2 routers, {2 * 128 * k} B"
    assert repr(session) == f"Session(model=MoETransformer, routers=2, capacity=128, {held}, state=idle)"
    with session.capture():
        assert session.state == "capturing"
        for _ in range(6):
            model(tokens)  # 6 x 24 rows: each ring grows once, to twice its first segment
    assert session.memory() == {"cpu": {"routers": 2, "rows": 2 * 256, "bytes": 2 * 256 * k}}
    assert "held=cpu: 256 rows x 2 routers, 1.0 KiB" in repr(session)
    routes = session.routes()
    with session.replay(routes), session.capture():
        assert session.state == "replaying+capturing"
        for _ in range(6):
            model(tokens)
    table = session.table()
    assert "layers.1.mlp.router" in table
    assert "capture memory: grows in eager mode from 128 rows per router" in table
    assert "cpu: 2 routers, 512 rows, 1.0 KiB" in table
    session.detach()
    assert session.state == "detached"
    session.detach()  # idempotent


def test_verify_reports_each_router_once(tokens: torch.Tensor) -> None:
    model = build("linear_gate")
    with mr.attach(model) as session:
        assert session.verify(tokens) == {"layers.1.mlp.gate": 1, "layers.2.mlp.gate": 1}
        with pytest.raises(mr.SessionStateError):
            session.routes()  # verify records nothing


@pytest.mark.reliability("bad inputs")
def test_verify_without_an_input_is_refused_and_the_session_goes_on(tokens: torch.Tensor) -> None:
    """``session.verify()`` let the model's TypeError through; it is bad input to verify, said as such."""
    model = build("softmax_topk")
    before = snapshot(model)
    session = mr.attach(model)
    with pytest.raises(mr.InvalidArgumentError, match=r"without an input.*session\.verify\(input_ids\)"):
        session.verify()
    assert session.state == "idle"
    with session.capture():  # nothing of the refused call is left: the first forward proves and records
        model(tokens)
    assert session.routes().num_tokens == tokens.numel()
    assert session.verify(tokens) == {"layers.1.mlp.router": 1, "layers.2.mlp.router": 1}
    session.detach()
    assert_untouched(model, before)


class _StatefulMoE(torch.nn.Module):
    """A tiny MoE whose forward in train mode writes state: a BatchNorm's running statistics and
    ``num_batches_tracked``, a counter buffer, a plain step count, dropout draws, and (as transformers' output
    recording does at its first forward) a forward hook it registers once, noted in an attribute."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.embed = torch.nn.Embedding(64, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.block = MoEBlock(cfg)
        self.drop = torch.nn.Dropout(0.25)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.steps = 0
        self.seen: list[int] = []

    def _record(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        self.seen.append(out.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_recording", False):
            self.block.register_forward_hook(self._record)
            self._recording = True
        self.calls += 1
        self.steps += 1
        h = self.norm(self.embed(ids).reshape(-1, 16))
        return self.drop(self.block(h))


@pytest.mark.reliability("lifecycle")
def test_verify_in_train_mode_leaves_the_model_as_it_was() -> None:
    """verify() put back only what its establishing runs changed: its own forward, in train mode, moved a
    BatchNorm's running statistics and num_batches_tracked, a counter buffer and a step count, drew from the global
    random stream (dropout) and left a hook the forward registers once. A verification changes nothing of the
    model; the capture and replay after it run as they would have without it."""
    torch.manual_seed(0)
    model, twin = _StatefulMoE().train(), _StatefulMoE().train()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    before, rng = snapshot(model), torch.get_rng_state()
    with mr.attach(model) as session:
        report = session.verify(ids)
        assert report == {"block.router": 1}
        assert torch.equal(torch.get_rng_state(), rng), "verify drew from the global random stream"
        after = model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
        assert not changed, f"verify changed {changed}"
        assert (model.steps, model.seen, "_recording" in vars(model)) == (0, [], False)
        assert not model.block._forward_hooks, "a hook the forward registered is left"
        with session.capture():
            out = model(ids)
        captured = snapshot(model)
        assert session.routes().num_tokens == ids.numel()
    torch.set_rng_state(rng)  # the twin runs the same forward with no session nor verify: the same output and state
    assert torch.equal(out, twin(ids))
    assert all(torch.equal(v, captured[k]) for k, v in twin.state_dict().items())
    assert (model.steps, model.seen, model.calls.item()) == (1, [12], 1)


def test_detach_leaves_model_untouched(style: str, tokens: torch.Tensor) -> None:
    model = build(style)
    before = snapshot(model)
    session = mr.attach(model)
    with session.capture():
        model(tokens)
    with session.replay(session.routes()):
        model(tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)
    session.detach()
    assert_untouched(model, before)
    assert type(model.layers[1].mlp).forward is MoEBlock.forward
    with pytest.raises(mr.SessionStateError, match="detached"):
        with session.capture():
            pass
    mr.attach(model).detach()  # a new session can attach again


def test_deepcopy_of_attached_model_is_plain(tokens: torch.Tensor) -> None:
    model = build("linear_gate")
    with mr.attach(model) as session:
        twin = clone_model(model)  # e.g. a frozen reference policy made while attached
        with session.capture():
            model(tokens)
        assert session.routes().num_tokens == tokens.numel()
        perturb_routers(session)
        # the twin runs its own (unperturbed) routers natively, with no link to the session
        assert not torch.equal(twin(tokens).logits, model(tokens).logits)
        assert twin.layers[1].mlp.forward.__self__ is twin.layers[1].mlp


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("established", [False, True], ids=["first-forward", "established"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_are_refused_in_blocks(tokens: torch.Tensor, transform: str, established: bool) -> None:
    """Under vmap one router call routes every batch entry's tokens: rows cannot be one per token, so refused."""
    model = build("softmax_topk", expert_impl="dense")  # (the sparse experts' bincount cannot be vmapped)
    before = snapshot(model)
    batch = torch.stack([tokens, tokens.flip(-1), tokens.roll(1, -1)])
    params = dict(model.named_parameters())

    def run() -> None:
        if transform == "vmap":
            torch.func.vmap(lambda t: model(t).logits)(batch)
        else:
            torch.func.grad(lambda p: torch.func.functional_call(model, p, (tokens,)).logits.sum())(params)

    with mr.attach(model) as session:
        with torch.no_grad():
            if established:
                with session.capture():
                    model(tokens)
            with session.capture():
                model(tokens)
            routes = session.routes()
            run()  # outside blocks: the plain forward, nothing recorded
        for block in (session.capture, lambda: session.replay(routes)):
            with pytest.raises(mr.UnsupportedRouterError, match="torch.func transform"):
                with block():
                    run()
        with session.capture(), session.replay(routes):  # the session still works, and forces the routes
            model(tokens)
        assert torch.equal(session.routes().indices, routes.indices)
    assert_untouched(model, before)


@pytest.mark.reliability("bad inputs")
def test_routes_of_no_router_are_refused_even_when_not_strict(tokens: torch.Tensor) -> None:
    """Once silent: routes of no router at all (an empty select(), a name filter that matched nothing) replayed
    with strict=False forced nothing and raised nothing, every forward of the block routing natively."""
    model = build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        routes = session.routes()
        empty = routes.select([n for n in routes.names if n.startswith("model.")])  # the names have no "model."
        for r in (empty, mr.Routes([], names=[], num_experts=8)):
            for strict in (True, False):
                with pytest.raises(mr.RoutesValidationError, match="hold no router, so this replay would force"):
                    with session.replay(r, strict=strict):
                        model(tokens)
        assert session.state == "idle"
        with session.replay(routes.select(routes.names[:1]), strict=False), session.capture():
            model(tokens)  # some routers: those forced, the others native
        assert session.routes().select(routes.names[:1]).equal(routes.select(routes.names[:1]))


@pytest.mark.reliability("bad inputs")
def test_routes_read_inside_a_forward_are_refused(tokens: torch.Tensor) -> None:
    """Once unsaid: routes() from a forward hook of a layer, in a capture's second forward, gave the routers
    before it two forwards' rows and those after it one, as if they were routes (a replay then overdrew)."""
    model = build("softmax_topk")
    seen: list[object] = []

    def read(module: torch.nn.Module, args: object, out: object) -> None:
        try:
            seen.append(session.routes())
        except mr.SessionStateError as e:
            seen.append(e)

    with mr.attach(model) as session:
        hook = model.layers[1].register_forward_hook(read)
        with session.capture():
            model(tokens)
            model(tokens)
        hook.remove()
        assert len(seen) == 2 and all(isinstance(e, mr.SessionStateError) for e in seen), seen
        assert "routes() inside a forward of the model" in str(seen[1])
        routes = session.routes()  # after the forward: every router's rows of both forwards
        assert routes.tokens_per_layer == (2 * tokens.numel(),) * 2
        with session.capture():
            model(tokens)
            mid = session.routes()  # between forwards of a block: the rows so far, lined up
        assert mid.equal(routes[: tokens.numel()])


def _programs() -> dict[str, Any]:
    """Ways to make a program of an attached model that runs none of the session's interception."""
    import copy

    from torch.fx.experimental.proxy_tensor import make_fx

    return {
        "jit.trace": lambda m, x: torch.jit.trace(m, (x,), check_trace=False),
        "export": lambda m, x: torch.export.export(m, (x,)).module(),
        "fx.symbolic_trace": lambda m, x: torch.fx.symbolic_trace(m),
        "make_fx": lambda m, x: make_fx(m)(x),
        "deepcopy": lambda m, x: copy.deepcopy(m),
    }


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("make", list(_programs()))
def test_a_replay_that_forces_nothing_is_refused_even_when_not_strict(make: str) -> None:
    """Once silent: a program made from the attached model while the session was idle (jit.trace, export,
    fx.symbolic_trace, make_fx) or a deep copy, run inside ``replay(routes, strict=False)``, routed natively and
    the block passed (a strict one only said rows were left unconsumed). Now refused, strict or not, naming what
    runs no interception; a partial replay (one forward of two, the program beside the model) still passes."""
    from .test_compile import _FxMoE

    torch.manual_seed(0)
    model = _FxMoE()
    xs = [torch.randn(3, 5, 8), torch.randn(2, 4, 8)]
    with mr.attach(model, include="routers.*", top_k=2, num_experts=6) as session, torch.no_grad():
        with session.capture():
            want = model(xs[0])
            model(xs[1])
        routes = session.routes()
        program = _programs()[make](model, xs[0])
        copied = list(program.routers) if make == "deepcopy" else []
        for router in [*model.routers, *copied]:  # routed natively now, the program's routes differ from the capture's
            router.proj.weight.add_(torch.randn_like(router.proj.weight))
        for strict in (True, False):
            with pytest.raises(mr.ReplayConsumptionError, match=r"forced nothing.*torch\.jit\.trace.*copy"):
                with session.replay(routes, strict=strict):
                    out = program(xs[0])
            assert not torch.equal(out, want)  # (what was refused: the native routing)
        with session.capture(), session.replay(routes, strict=False):  # a partial replay, the program beside
            program(xs[0])
            model(xs[0])
        assert session.routes().equal(routes[: xs[0].shape[0] * xs[0].shape[1]])  # forced where the model ran


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("strict", [True, False])
def test_routes_of_one_part_of_a_model_are_not_taken_for_those_of_a_sibling_part(strict: bool, tmp_path: Any) -> None:
    """Once silent: routes of an encoder-decoder's encoder routers (selected from a capture of the whole model)
    replayed on a session attached to its decoder alone: 'encoder.layers.0.router' maps onto 'layers.0.router' by one
    prefix change, as a wrapper's routes would, and the encoder's experts were forced on the decoder, strict or not.
    The routes keep the routers they were recorded on (through select, save and load): 'encoder.' has a sibling
    there, so it is a part of the model, not a wrapper's prefix. Refused, naming both prefixes; an explicit rename
    says which, and then forces those rows."""
    from .tinymoe import RouterSpec, TinyMoE

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=1)
            self.decoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

    torch.manual_seed(0)
    pair = Pair()
    x = pair.encoder.inputs((2, 5))
    with mr.attach(pair) as session, torch.no_grad(), session.capture():
        pair(x)
    routes = session.routes()
    encoder = routes.select([n for n in routes.names if n.startswith("encoder.")])
    encoder.save(tmp_path / "encoder.npz")
    with mr.attach(pair.decoder) as session, torch.no_grad():
        for given in (
            encoder,
            encoder[:4],
            mr.Routes.cat([encoder[:4], encoder[4:]]),
            mr.Routes.load(tmp_path / "encoder.npz"),
        ):
            with pytest.raises(
                mr.RouterNotFoundError, match=r"'encoder\.' -> ''.*'decoder\.layers\.0\.router'.*routes\.rename"
            ):
                with session.replay(given, strict=strict):
                    pair.decoder(x)
            assert session.renamed is None
        with session.replay(encoder.rename({"encoder.": ""}), strict=strict), session.capture():
            out = pair.decoder(x)
        assert session.routes().equal(encoder.rename({"encoder.": ""})), "the rows named were not forced"
    want = pair.decoder(x, forced=list(encoder.per_layer()))  # (the hand-written forced path)
    assert torch.equal(out, want)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("strict", [True, False])
def test_routes_that_lost_the_routers_they_were_recorded_on_are_not_fitted_onto_a_sibling_part(strict: bool) -> None:
    """Once silent: routes of an encoder-decoder's encoder that no longer knew the routers they were recorded on
    (rebuilt with mr.Routes, through numpy) or never knew them all (a capture of a session with exclude=) were fitted
    onto a session of the decoder by dropping 'encoder.' (or swapping it for 'decoder.'), as a wrapper's prefix would
    be, and the encoder's experts were forced on the decoder. Such a fit that drops a module name of no wrapper is
    refused (a capture of some routers knows the model's others: 'encoder.' is a part of it, named as such); a
    wrapper's ('module.', 'model.') is taken as before, and an explicit rename forces the rows named."""
    from .tinymoe import RouterSpec, TinyMoE

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=1)
            self.decoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

    class Wrapped(torch.nn.Module):  # (a wrapper of the whole model, as DDP's)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    torch.manual_seed(0)
    pair = Pair()
    x = pair.encoder.inputs((2, 5))
    with mr.attach(pair) as session, torch.no_grad(), session.capture():
        pair(x)
    enc = session.routes().select([n for n in session.routes().names if n.startswith("encoder.")])
    with mr.attach(pair, exclude="decoder.*") as session, torch.no_grad(), session.capture():
        pair(x)
    excluded = session.routes()
    lost = {
        "Routes(rows)": mr.Routes(list(enc.per_layer()), enc.names, enc.experts_per_layer),
        "from_numpy": mr.Routes.from_numpy(enc.to_numpy(), names=enc.names, num_experts=enc.experts_per_layer),
        "a capture with exclude=": excluded,
    }
    assert excluded.equal(enc)
    with mr.attach(pair.decoder) as alone, torch.no_grad():
        for what, given in lost.items():  # (a capture of some routers knows the model's others: a part, named)
            part = r"'encoder\.' is one part of that model"
            why = part if what == "a capture with exclude=" else "dropping 'encoder'"
            with pytest.raises(mr.RouterNotFoundError, match=why + r".*routes\.rename"):
                with alone.replay(given, strict=strict):
                    pair.decoder(x)
            tried()
        with alone.replay(lost["from_numpy"].rename({"encoder.": ""}), strict=strict), alone.capture():
            pair.decoder(x)
        assert alone.routes().equal(enc.rename({"encoder.": ""}))  # (the explicit fit: the rows named, forced)
    with mr.attach(pair, exclude="encoder.*") as others, torch.no_grad():  # (the decoder's routers, by a swap)
        with pytest.raises(mr.RouterNotFoundError, match=r"'encoder\.' is one part of that model"):
            with others.replay(lost["a capture with exclude="], strict=False):
                pair(x)
    tried()
    wrapped = Wrapped(pair)
    with mr.attach(wrapped) as session, torch.no_grad(), session.capture():
        wrapped(x)
    whole = session.routes()
    rebuilt = mr.Routes(list(whole.per_layer()), whole.names, whole.experts_per_layer)  # ('module.' of a wrapper)
    with mr.attach(pair) as bare, torch.no_grad():
        with bare.replay(rebuilt, strict=strict), bare.capture():
            pair(x)
        assert bare.routes().equal(rebuilt.rename({"module.": ""})) and bare.renamed == {"module.": ""}


@pytest.mark.reliability("silent replays")
def test_a_filtered_capture_knows_the_model_routers_and_replays_where_names_fit(tmp_path: Any) -> None:
    """Once a false refusal: a capture of a session with include= or exclude= knew no router it was recorded on, so
    its routes, fitted onto a session of the same routers by dropping a module name of no wrapper ('backbone.'), were
    refused as routes built from rows are. Such a capture records the model's routers (those the search finds
    without the filter): its routes fit where that module name holds every router of the model, through select,
    rename, slices, cat, save and load, and are refused where it is one part of a model beside another (an encoder's
    routes, recorded by a filtered session, on a session of the decoder or the encoder alone). The name-based
    operations (load_balancing_loss's pairing, a LayerMap and Megatron's writer) take them as any capture's."""
    from .tinymoe import RouterSpec, TinyMoE

    class Holder(torch.nn.Module):  # (a model under a module name no wrapper uses)
        def __init__(self) -> None:
            super().__init__()
            self.backbone = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2), RouterSpec(8, 2)], seed=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=1)
            self.decoder = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)], seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

    torch.manual_seed(0)
    holder = Holder()
    x = holder.backbone.inputs((2, 5))
    every = [f"backbone.layers.{i}.router" for i in range(3)]
    for filters in ({"exclude": "backbone.layers.2.*"}, {"include": "backbone.layers.*.router", "exclude": every[2]}):
        with mr.attach(holder, **filters) as session, torch.no_grad(), session.capture():
            holder(x)
        routes = session.routes()
        assert routes.names == tuple(every[:2])
        assert routes._recorded_names == tuple(every), "the model's routers, not only the session's"
        routes.save(tmp_path / "filtered.npz")
        variants = {
            "as captured": routes,
            "select": routes.select(every[1::-1]),
            "rename": routes.rename({"backbone.": "trunk."}),
            "slices, cat": mr.Routes.cat([routes[:3], routes[3:]]),
            "save, load": mr.Routes.load(tmp_path / "filtered.npz"),
        }
        with mr.attach(holder.backbone) as bare, torch.no_grad():  # (the same routers, 'backbone.' dropped)
            for what, given in variants.items():
                with bare.replay(given, strict=False), bare.capture():
                    holder.backbone(x)
                got = bare.routes()
                assert got.select(["layers.0.router", "layers.1.router"]).equal(routes.rename({"backbone.": ""})), what
            kept_names = ["layers.1.router", "layers.0.router"]
            with bare.replay(routes, strict=False), bare.keep_scores() as kept:
                holder.backbone(x)
            probs = [kept[n][0] for n in kept_names]  # (softmax scores, named by the session)
            by_name = mr.load_balancing_loss(probs, list(routes.per_layer()))  # (the routes' order: paired by name)
            in_order = mr.load_balancing_loss(probs, [routes.layer(f"backbone.{n}") for n in kept_names])
            assert torch.equal(by_name, in_order)
        lm = mr.interop.LayerMap.from_session(session, num_layers=3)
        back = mr.interop.from_megatron(mr.interop.to_megatron(routes, layer_map=lm), lm.names, num_experts=8)
        assert back.equal(routes)

    pair = Pair()
    y = pair.encoder.inputs((2, 5))
    with mr.attach(pair, exclude="decoder.*") as session, torch.no_grad(), session.capture():
        pair(y)
    encoder = session.routes()
    every = [f"{p}.layers.{i}.router" for p in ("encoder", "decoder") for i in (0, 1)]
    assert encoder._recorded_names == tuple(every)
    for part in (pair.encoder, pair.decoder):  # (names cannot tell which part a session of one part is)
        with mr.attach(part) as alone, torch.no_grad():
            with pytest.raises(mr.RouterNotFoundError, match=r"'encoder\.' is one part of that model.*routes\.rename"):
                with alone.replay(encoder):
                    part(y)
        tried()
    with mr.attach(pair) as whole, torch.no_grad():  # (names that match: the routers named are forced)
        with whole.replay(encoder, strict=False), whole.capture():
            pair(y)
        assert whole.routes().select(list(encoder.names)).equal(encoder)

    from .test_compile import _FxMoE  # (routers the search does not find: include= alone names them)

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = _FxMoE()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk(x)

    held, z = Trunk(), torch.randn(1, 2, 8)
    with mr.attach(held, include="trunk.routers.*", top_k=2, num_experts=6) as session, torch.no_grad():
        with session.capture():
            held(z)
    unknown = session.routes()
    assert unknown._recorded_names is None  # (which routers the model has, no search tells)
    with mr.attach(held.trunk, include="routers.*", top_k=2, num_experts=6) as alone, torch.no_grad():
        with pytest.raises(mr.RouterNotFoundError, match=r"dropping 'trunk'.*routes\.rename"):
            with alone.replay(unknown):
                held.trunk(z)
    tried(4)


@pytest.mark.reliability("silent replays")
def test_a_router_excluded_by_an_earlier_session_is_watched_for_in_a_session_that_does_not_exclude_it() -> None:
    """Once silent: the watch for routers left out passes once per model and set of routers, and a session with
    exclude= (a router left native on purpose) passed it for a later session of the same routers chosen by include=,
    which left that router out unsaid: it ran natively in that session's replays. A pass counts only for sessions
    that leave the same modules out on purpose; the later session's capture is refused, naming the router."""
    from .tinymoe import RouterSpec, TinyMoE

    model = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2), RouterSpec(8, 2)], seed=3)
    x = model.inputs((2, 5))
    for _ in range(2):  # (an exclusion passes the watch, and again from the record of its pass)
        with mr.attach(model, exclude="layers.2.*") as session, torch.no_grad(), session.capture():
            model(x)
        assert session.routes().names == ("layers.0.router", "layers.1.router")
    with mr.attach(model, include=["layers.0.router", "layers.1.router"]) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match=r"(?s)outside every attached router.*'layers\.2\.router'"):
            with session.capture():
                model(x)
    tried(3)
