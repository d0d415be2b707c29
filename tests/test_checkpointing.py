"""Activation checkpointing: a recompute gets its forward's experts, is never recorded or counted twice."""

from __future__ import annotations

import contextlib
import gc
import types

import pytest
import torch

import moe_replay as mr
from moe_replay.models import MoETransformer

from .conftest import perturb_routers

MODES = ("reentrant", "non_reentrant")


def build(style: str = "softmax_topk", **kw) -> MoETransformer:
    return mr.models.build(style, **{"num_layers": 3, "first_dense_layers": 1, **kw})


def batch(n: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name
    routers = [n for n in a if n.endswith(("router.weight", "mlp.gate.weight"))]
    assert routers and all(a[n].abs().sum() > 0 for n in routers), "no gradient reached a router"


def log_experts(model: MoETransformer) -> list[tuple[str, bool, torch.Tensor]]:
    """Record (layer, during backward?, indices) each time an MoE layer runs its experts."""
    log: list[tuple[str, bool, torch.Tensor]] = []
    for name, m in model.named_modules():
        if name.endswith("mlp.experts"):
            inner = m.forward

            def fwd(self, x, indices, weights, name=name, inner=inner):
                log.append((name, torch._C._current_graph_task_id() != -1, indices.detach().clone()))
                return inner(x, indices, weights)

            m.forward = types.MethodType(fwd, m)
    return log


def assert_recomputed_with(log: list[tuple[str, bool, torch.Tensor]], routes: mr.Routes) -> None:
    """Each MoE layer was recomputed once in backward, with exactly the experts of ``routes``."""
    recomputed = {name: idx for name, bwd, idx in log if bwd}
    assert sum(bwd for _, bwd, _ in log) == len(routes.names) == len(recomputed)
    for router, rows in zip(routes.names, routes.per_layer(), strict=True):
        assert torch.equal(recomputed[router.rsplit(".", 1)[0] + ".experts"], rows), router


def record(session: mr.Session, model: MoETransformer, *xs: torch.Tensor) -> mr.Routes:
    with session.capture(), torch.no_grad():
        for x in xs:
            model(x)
    return session.routes()


def routes_and_plain_grads(
    session: mr.Session, model: MoETransformer, *xs: torch.Tensor
) -> tuple[mr.Routes, dict[str, torch.Tensor]]:
    """Record the routes of ``xs``, perturb the routers, and replay them without checkpointing.

    Returns the routes and the gradients of that plain replay, which every checkpointed
    replay of the same routes must reproduce.
    """
    routes = record(session, model, *xs)
    perturb_routers(session, scale=2.0)
    mode, model.config.checkpointing = model.config.checkpointing, "none"
    with session.replay(routes):
        for x in xs:
            model(x, labels=x).loss.backward()
    model.config.checkpointing = mode
    return routes, grads(model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("style", ["softmax_topk", "grouped_sigmoid", "top1_argmax", "linear_gate"])
def test_replay_under_checkpointing_matches_plain_replay(style: str, mode: str) -> None:
    model, x = build(style), batch()
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        model.config.checkpointing = mode
        with session.replay(routes):  # strict: each forward is counted once, not again in its recompute
            model(x, labels=x).loss.backward()
        assert_same_grads(grads(model), plain)


@pytest.mark.parametrize("mode", MODES)
def test_backward_after_the_replay_context_exited(mode: str) -> None:
    model, x = build(), batch()
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        model.config.checkpointing = mode
        with session.replay(routes):
            loss = model(x, labels=x).loss
        assert session.state == "idle"
        log = log_experts(model)
        loss.backward()  # the recompute still gets the replayed rows, natively it would not
        assert_same_grads(grads(model), plain)
    assert_recomputed_with(log, routes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inside", [True, False], ids=["backward-inside", "backward-after"])
def test_capture_recompute_reuses_forward_experts_after_weights_changed(mode: str, inside: bool) -> None:
    model, x = build(checkpointing=mode), batch()
    with mr.attach(model) as session:
        with session.capture():
            loss = model(x, labels=x).loss
            if not inside:
                captured = session.routes()
            perturb_routers(session, scale=3.0)  # the recompute now sees other router weights
            log = log_experts(model)
            if inside:
                loss.backward()  # still capturing: the recompute must not be recorded again
                captured = session.routes()
        if not inside:
            loss.backward()
        assert captured.num_tokens == x.numel()
        free = record(session, model, x)
    assert not free.equal(captured), "the perturbation should change what the routers choose"
    assert_recomputed_with(log, captured)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_backward_in_any_order(mode: str) -> None:
    model = build()
    xs = [batch(seed=s) for s in range(3)]
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, *xs)
        model.config.checkpointing = mode
        with session.replay(routes):
            losses = [model(x, labels=x).loss for x in xs]
        for i in (2, 0, 1):  # e.g. a pipeline schedule; accumulation into .grad
            losses[i].backward()
        assert_same_grads(grads(model), plain)


@pytest.mark.parametrize("mode", MODES)
def test_discarded_forward_leaves_nothing_for_the_next_backward(mode: str) -> None:
    model = build()
    a, b = batch(seed=1), batch(seed=2)
    with mr.attach(model) as session:
        routes = record(session, model, a, b)
        perturb_routers(session, scale=2.0)
        with session.replay(routes[a.numel() :]):
            model(b, labels=b).loss.backward()
        plain = grads(model)
        model.config.checkpointing = mode
        with session.replay(routes):
            model(a, labels=a)  # e.g. a logged loss: its graph is dropped, never backpropagated
            loss = model(b, labels=b).loss
        loss.backward()
        assert_same_grads(grads(model), plain)
        del loss
        assert all(len(h.kept) == 0 for h in session._hooks)  # released with the graphs


@pytest.mark.parametrize("mode", MODES)
def test_retained_graph_recomputes_with_the_same_rows_twice(mode: str) -> None:
    model, x = build(checkpointing=mode), batch()
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        with session.replay(routes):
            loss = model(x, labels=x).loss
        loss.backward(retain_graph=True)
        assert_same_grads(grads(model), plain)
        loss.backward()  # recomputed again, from the start of the region
        assert_same_grads(grads(model), plain)


@pytest.mark.parametrize("mode", ("none", *MODES))
def test_other_saved_tensor_hooks(mode: str) -> None:
    """Offloading saved tensors (alone, or around checkpointed layers) keeps nothing it should not."""
    model, x = build(), batch()
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        model.config.checkpointing = mode
        with torch.autograd.graph.save_on_cpu():
            with session.replay(routes):
                loss = model(x, labels=x).loss
            assert all(len(h.kept) == (mode != "none") for h in session._hooks)
            loss.backward()
        assert_same_grads(grads(model), plain)


def test_replay_with_no_grad_under_reentrant_checkpoint_keeps_nothing() -> None:
    """An old-log-prob pass under no_grad inside checkpointed layers leaves no rows behind."""
    model, x = build(), batch()
    with mr.attach(model) as session:
        routes = record(session, model, x)
        with session.replay(routes), torch.no_grad():
            torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True)
        assert all(len(h.kept) == 0 for h in session._hooks)


def test_checkpoint_wrapping_the_whole_model_with_several_routers() -> None:
    model, x = build(num_layers=4), batch()
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        anchor = torch.zeros((), requires_grad=True)  # reentrant checkpointing needs an input with grad
        for reentrant in (True, False):
            with session.replay(routes):
                loss = torch.utils.checkpoint.checkpoint(
                    lambda t, a: model(t, labels=t).loss + a, x, anchor, use_reentrant=reentrant
                )
            loss.backward()
            anchor.grad = None
            assert_same_grads(grads(model), plain)


@pytest.mark.parametrize("outer,inner", [("reentrant", "non_reentrant"), ("non_reentrant", "reentrant")])
def test_nested_checkpoints(outer: str, inner: str) -> None:
    model, x = build(checkpointing=inner), batch()
    anchor = torch.zeros((), requires_grad=True)  # reentrant checkpointing needs an input with grad
    with mr.attach(model) as session:
        routes, plain = routes_and_plain_grads(session, model, x)
        with session.replay(routes):
            loss = torch.utils.checkpoint.checkpoint(
                lambda t, a: model(t, labels=t).loss + a, x, anchor, use_reentrant=outer == "reentrant"
            )
        loss.backward()
        assert_same_grads(grads(model), plain)


def test_nested_non_reentrant_checkpoints_are_refused_not_misrouted() -> None:
    model, x = build(checkpointing="non_reentrant"), batch()
    with mr.attach(model) as session:
        routes = record(session, model, x)
        with session.replay(routes):
            loss = torch.utils.checkpoint.checkpoint(lambda t: model(t, labels=t).loss, x, use_reentrant=False)
        with pytest.raises(mr.UnsupportedRouterError, match="nest"):
            loss.backward()
        del loss  # its regions were never recomputed: detach waits for the graph to go


class _RerunInBackward(torch.autograd.Function):
    """A hand-written reentrant checkpoint, as Megatron and DeepSpeed write theirs."""

    @staticmethod
    def forward(ctx, run, x):
        ctx.run = run
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = ctx.run(x)
        torch.autograd.backward(out, grad)
        return None, x.grad


def test_any_function_that_reruns_its_forward_in_backward() -> None:
    model, x = build(num_layers=2, first_dense_layers=0), batch()
    block = model.layers[1].mlp
    with mr.attach(block) as session:
        h = model.embed(x).detach()
        routes = record(session, block, h)
        perturb_routers(session, scale=3.0)
        with session.replay(routes):
            block(h).square().sum().backward()
        plain = grads(model)
        with session.replay(routes):
            out = _RerunInBackward.apply(block, h.requires_grad_())
        log = log_experts(model)
        out.square().sum().backward()
        assert_same_grads(grads(model), plain)
    assert len(log) == 1 and log[0][1]
    assert torch.equal(log[0][2], routes.per_layer()[0])


def _tiny_hf(family: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=16, mlp_only_layers=[], **common)
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.MixtralConfig(num_local_experts=8, **common)
    return transformers.MixtralForCausalLM(cfg)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "offload"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_hf_gradient_checkpointing_enable(family: str, how: str) -> None:
    model, x = _tiny_hf(family), batch()
    if how == "offload":  # activations saved to pinned host memory around each checkpointed layer
        if not torch.cuda.is_available() or not hasattr(model, "activation_checkpointing_enable"):
            pytest.skip("offloaded checkpointing needs CUDA and a transformers that has it")
        model, x = model.cuda(), x.cuda()
    model.train()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x, use_cache=False)
        routes = session.routes()
        perturb_routers(session, scale=3.0)
        with session.replay(routes):
            model(x, labels=x, use_cache=False).loss.backward()
        plain = grads(model)
        kwargs = {"use_reentrant": how == "reentrant"}
        if how == "offload":
            model.activation_checkpointing_enable(kwargs, offload=True)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        with session.replay(routes), session.capture():
            loss = model(x, labels=x, use_cache=False).loss
            loss.backward()
        assert session.routes().equal(routes)  # recorded once, forced in forward and recompute
        assert_same_grads(grads(model), plain, atol=1e-6 if x.device.type == "cpu" else 1e-5)


class Wrapped(torch.nn.Module):
    """Holds the model as ``module``, as DistributedDataParallel does (router names gain ``module.``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _ddp(model: torch.nn.Module):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return torch.nn.parallel.DistributedDataParallel(model)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["bare to wrapped", "wrapped to bare"])
@pytest.mark.parametrize("wrapper", ["module holder", "DistributedDataParallel"])
def test_checkpointed_replay_across_a_wrapper(mode: str, direction: str, wrapper: str) -> None:
    """Routes recorded on the bare model replay under checkpointing on the wrapped one (names mapped), and back."""
    import torch.distributed as dist

    model, x = build("grouped_sigmoid"), batch()
    try:
        wrapped = Wrapped(model) if wrapper == "module holder" else _ddp(model)
        src, dst = (model, wrapped) if direction == "bare to wrapped" else (wrapped, model)
        with mr.attach(src) as s:
            routes = record(s, src, x)
            perturb_routers(s, scale=2.0)
        with mr.attach(model) as bare:  # the reference: the bare model, its own names, no checkpointing
            with bare.replay(routes.rename({"module.": ""})):
                model(x, labels=x).loss.backward()
        plain = grads(model)
        model.config.checkpointing = mode
        with mr.attach(dst) as session:
            with session.replay(routes), session.capture():
                dst(x, labels=x).loss.backward()
            assert session.renamed == ({"": "module."} if direction == "bare to wrapped" else {"module.": ""})
            back = {new: old for old, new in session.renamed.items()}
            assert session.routes().rename(back).equal(routes)  # forced and recorded once, not again in recompute
        assert_same_grads(grads(model), plain)
    finally:
        if wrapper != "module holder" and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class _CheckpointInside(torch.nn.Module):
    """A router that checkpoints its own scoring and top-k, inside its forward."""

    def __init__(self, mode: str | None, d: int = 8, e: int = 6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(e, d, generator=torch.Generator().manual_seed(0)))
        self.top_k = 2
        self.mode = mode  # None: no checkpoint

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(torch.nn.functional.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode is None:
            return self.route(x)
        return torch.utils.checkpoint.checkpoint(self.route, x, use_reentrant=self.mode == "reentrant")


class _InsideBlock(torch.nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.router = _CheckpointInside(mode)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (w * (idx == e)).sum(-1, keepdim=True)
            out = out + weight * expert(x)
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("captured_with_gradients", [False, True])
def test_a_checkpoint_opened_inside_the_routers_forward_is_refused_in_a_replay_with_gradients(
    mode: str, captured_with_gradients: bool
) -> None:
    """A checkpoint inside the router's own forward, replayed with gradients: refused (its recompute is unforced)."""
    torch.manual_seed(0)
    model = _InsideBlock(mode)
    x = torch.randn(10, 8, requires_grad=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mr.attach(model) as session:
        with session.capture(), torch.set_grad_enabled(captured_with_gradients):
            model(x)
            model(x)  # (with gradients: the lean fast path has learned the call's form)
        routes = session.routes()
        with session.replay(routes, strict=False):  # (strict: the refused forward consumed nothing)
            with pytest.raises(mr.UnsupportedRouterError, match="checkpoint opened in its own forward"):
                model(x)
        with session.replay(routes), torch.no_grad():  # without gradients nothing is recomputed: replayed
            model(x)
            model(x)
    assert model.router.forward.__func__ is _CheckpointInside.forward
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_replay_through_a_checkpoint_inside_the_router_gives_the_plain_replays_gradients_when_allowed() -> None:
    # the same router without the inner checkpoint, replayed: what the refused case would have had to match
    def replayed(mode: str | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = _InsideBlock(mode)
        x = torch.randn(10, 8)
        with mr.attach(model) as session:
            with session.capture(), torch.no_grad():
                model(x)
            with torch.no_grad():
                model.router.weight.mul_(-1)  # the current scores choose other experts
            with session.replay(session.routes()), torch.no_grad():
                return model(x)

    torch.testing.assert_close(replayed("non_reentrant"), replayed(None), rtol=0, atol=0)
    torch.testing.assert_close(replayed("reentrant"), replayed(None), rtol=0, atol=0)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("inner", MODES)
def test_under_an_outer_reentrant_checkpoint_the_inner_one_is_refused_at_its_recompute(inner: str) -> None:
    """The same inside an outer reentrant checkpoint (whose forward has no gradients): refused at its recompute."""
    torch.manual_seed(0)
    model = _InsideBlock(inner)
    x = torch.randn(10, 8, requires_grad=True)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        with session.replay(routes):
            y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True)
        with pytest.raises(mr.UnsupportedRouterError, match="checkpoint opened in its own forward"):
            y.sum().backward()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_detach_waits_for_the_backward_of_a_replayed_checkpointed_forward(tokens: torch.Tensor, mode: str) -> None:
    """After detach, the recompute would choose natively and the gradients follow other experts: refused."""
    model = mr.models.build("softmax_topk", num_layers=2, checkpointing=mode).train()
    session = mr.attach(model)
    with session.capture():
        model(tokens)
    routes = session.routes()
    perturb_routers(session, scale=3.0)
    with session.replay(routes):
        loss = model(tokens, labels=tokens).loss
    with pytest.raises(mr.SessionStateError, match="recompute of a checkpointed region"):
        session.detach()
    loss.backward()  # with the session: the recompute is forced
    session.detach()
    assert all("forward" not in vars(m) for m in model.modules())


def test_detach_in_a_finally_clause_after_an_error_still_detaches(tokens: torch.Tensor) -> None:
    """A step that fails with a replayed, checkpointed loss alive: detach in finally goes, the error stays."""
    model = mr.models.build("softmax_topk", num_layers=2, checkpointing="non_reentrant").train()
    session = mr.attach(model)
    with session.capture():
        model(tokens)
    routes = session.routes()
    with pytest.raises(RuntimeError, match="micro-batch 1"):
        try:
            with session.replay(routes):
                loss = model(tokens, labels=tokens).loss  # noqa: F841 - alive while the error unwinds
            raise RuntimeError("micro-batch 1 failed")
        finally:
            session.detach()
    assert all("forward" not in vars(m) for m in model.modules())


def _selective(save: set | None):
    """A ``context_fn`` for selective activation checkpointing: ``save`` ops kept (None: every op)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, func, *args, **kwargs):
        keep = save is None or func in save
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda: create_selective_checkpoint_contexts(policy)


_SAVED = {"mm": {torch.ops.aten.mm.default}, "gather": {torch.ops.aten.gather.default}, "every op": None}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("saved", list(_SAVED))
@pytest.mark.parametrize("block", ["replay", "capture", "idle"])
@pytest.mark.parametrize("first", [True, False], ids=["first-forward", "established"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_selective_activation_checkpointing_gives_the_forced_reference_gradients(
    saved: str, block: str, first: bool, amp: bool
) -> None:
    """Under selective activation checkpointing the gradients are those of the recorded experts, forced by hand.

    Selective checkpointing hands out the ops it saved in the forward by their order of call, so the
    library's own ops (the probe runs that establish a decision at a router's first forward in a mode,
    idle or not, the native choice, ring reads and writes) must not be seen in a forward that its
    recompute does not make, or every later op of their kind is handed another op's output. Under
    autocast the probe runs must not fill its cache of cast weights either: the forward would then take
    the router weight's cast from that cache while its recompute casts it (torch's RuntimeError
    "aten._to_copy.default invocation index ... not found in storage").
    """
    import copy

    from .tinymoe import RouterSpec, TinyMoE

    specs = [
        RouterSpec(8, 2),
        RouterSpec(6, 1, "argmax"),
        RouterSpec(8, 2, "grouped", n_group=4, topk_group=2),
        RouterSpec(6, 1, "max"),
    ]
    model = TinyMoE(specs)
    x = model.inputs((3, 5))

    def loss(m: torch.nn.Module, context_fn=None, forced=None) -> torch.Tensor:
        def body(h: torch.Tensor) -> torch.Tensor:
            for i, layer in enumerate(m.layers):
                h = layer(h, None if forced is None else forced[i].reshape(*x.shape[:-1], -1))
            return h

        h = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):  # (a fresh region, and cache, per step)
            out = (
                body(h)
                if context_fn is None
                else torch.utils.checkpoint.checkpoint(body, h, use_reentrant=False, context_fn=context_fn)
            )
        return out.float().square().sum()

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        model.perturb(scale=2.0)  # the current scores choose other experts
        if block == "capture":  # a capture with gradients: the recompute must use the forward's own choice
            with session.capture(), torch.no_grad():
                model(x)
            now = session.routes()
            assert not now.equal(routes)
            routes = now
        if not first:  # the decisions established (in this grad mode) outside the checkpoint
            with session.replay(routes):
                loss(model)
        reference = copy.deepcopy(model)  # a plain copy: the recorded experts forced by its own gather
        loss(reference, forced=None if block == "idle" else routes.per_layer()).backward()
        blocks = {"replay": session.replay(routes), "capture": session.capture(), "idle": contextlib.nullcontext()}
        with blocks[block]:
            out = loss(model, _selective(_SAVED[saved]))
        out.backward()
        if block == "capture":
            assert session.routes().equal(routes)
        assert_same_grads(grads(model), grads(reference))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
@pytest.mark.parametrize(
    ("where", "amp"),
    [("layers", True), ("model", False), ("model", True)],
    ids=["each-layer-bf16-autocast", "whole-model-fp32", "whole-model-bf16-autocast"],
)  # (each layer in fp32: the probe runs outside every checkpoint, and no cache holds what it cast)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_selective_checkpointing_survives_the_token_order_probe_of_a_blocks_first_forward(
    block: str, where: str, amp: bool
) -> None:
    """Once the token-order probe at a block's first forward fed ids broke selective checkpointing's backward.

    That probe runs the model up to its first router, a forward no recompute makes. Under bf16 autocast it
    put the casts of the weights on the way (the first layer's attention projections) into autocast's cache,
    so the forward after it took them from there while its recompute cast them; with the whole model in one
    checkpoint, selective checkpointing saw its ops and handed the recompute the probe's outputs by order of
    call (the router's scores came out 32 wide). Backward failed in torch's RuntimeError ("aten._to_copy.default
    invocation index ... not found in storage") or in an UnsupportedRouterError blaming the router.
    """
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, func, *args, **kwargs):
        keep = func is torch.ops.aten.mm.default
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    model, x = _tiny_hf("qwen3_moe").train(), batch()
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    def loss(checkpointed: bool) -> torch.Tensor:
        def run(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, use_cache=False).logits.float()

        with torch.autocast("cpu", torch.bfloat16, enabled=amp):  # (a fresh region, and cache, per step)
            if checkpointed and where == "model":
                out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False, context_fn=context_fn)
            else:
                out = run(x)
        return out.square().mean()

    loss(False).backward()
    plain = grads(model)
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        model(x, use_cache=False)
    routes = session.routes()
    if where == "layers":
        kwargs = {"use_reentrant": False, "context_fn": context_fn}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with mr.attach(model) as session:  # (a new session: its first block forward fed ids runs the order probe)
        with session.replay(routes) if block == "replay" else session.capture():
            out = loss(True)
        out.backward()
        if block == "capture":
            assert session.routes().equal(routes)
    assert_same_grads(grads(model), plain, atol=1e-5)


class _Rerun(torch.autograd.Function):
    """Reruns ``fn`` in backward, as a reentrant checkpoint does, its ctx named so that no stack search finds it."""

    @staticmethod
    def forward(context, fn, h):
        context.fn = fn
        context.save_for_backward(h)
        with torch.no_grad():
            return fn(h)

    @staticmethod
    def backward(context, grad):
        (h,) = context.saved_tensors
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            out = context.fn(h)
        torch.autograd.backward(out, grad)
        return None, h.grad


class _LeanBlock(torch.nn.Module):
    """A MoE block whose router calls ``torch.topk`` (so its forwards run lean, without the mode)."""

    def __init__(self, d: int = 8, e: int = 6, k: int = 2) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, e, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(e))
        self.k = k
        self.detach = False  # route on the input detached, with a frozen gate: scores without gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x.detach() if self.detach else x).softmax(-1), self.k, dim=-1)
        out = torch.zeros_like(x)
        for j in range(self.k):
            for e, expert in enumerate(self.experts):
                out = out + (idx[:, j] == e).unsqueeze(-1) * w[:, j : j + 1] * expert(x)
        return out


class _LeanModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_LeanBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["replay", "capture"])
def test_a_recompute_it_cannot_see_is_refused_in_a_lean_forward_too(block: str) -> None:
    """Once silent: a lean router's replay forced a recompute it could not see with the next recorded rows, and
    the capture of a frozen gate on a detached input (scores without gradients) recorded it again (the lean
    path went around the check of the forward under the mode)."""
    torch.manual_seed(0)
    model, x = _LeanModel(), torch.randn(5, 8)
    if block == "capture":
        for layer in model.layers:
            layer.gate.requires_grad_(False)
            layer.detach = True
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            for _ in range(3):  # rows to spare: the recompute would not run out of them
                model(x)
        routes = session.routes()
        for _ in range(2):  # with gradients: audited, then lean
            with session.replay(routes[:5]):
                model(x).sum().backward()
        assert all(h.interception() == "lean" for h in session._hooks)
        blocks = {"replay": lambda: session.replay(routes), "capture": session.capture}
        with pytest.raises(mr.UnsupportedRouterError, match="use_reentrant=False"), blocks[block]():
            h = x.clone().requires_grad_(True)
            for layer in model.layers:
                h = h + _Rerun.apply(layer, h)
            h.square().sum().backward()
        del h
        gc.collect()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["replay", "capture"])
def test_a_recompute_it_cannot_see_inside_a_block_is_refused(block: str) -> None:
    """Once silent: a recompute in backward in no region it could see was taken for a new forward.

    A rerun-in-backward Function whose ctx is not found on the stack (compiled autograd runs a reentrant
    checkpoint's backward from a frame of its own; here its ctx is named otherwise) made a capture record
    every row twice and a replay force the recompute with the next rows. A forward with gradients inside
    backward in no region it can see is now refused inside a block, naming the way out."""
    from .tinymoe import RouterSpec, TinyMoE

    model = TinyMoE([RouterSpec(8, 2), RouterSpec(6, 1, "argmax")])
    x = model.inputs((3, 5))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        with session.replay(routes):  # each decision established with gradients, eagerly
            model(x).sum().backward()
        blocks = {"replay": lambda: session.replay(routes), "capture": session.capture}
        with pytest.raises(mr.UnsupportedRouterError, match="use_reentrant=False"), blocks[block]():
            h = x.clone().requires_grad_(True)
            for layer in model.layers:
                h = _Rerun.apply(layer, h)
            h.square().sum().backward()
        del h
        gc.collect()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("compiler", ["dynamo", "eager"])
def test_a_reentrant_recompute_run_by_compiled_autograd_after_the_block_is_refused(compiler: str) -> None:
    """Once silent: with compiled autograd on, the backward of a replayed forward run after its block ran a
    reentrant checkpoint's recompute outside the autograd engine (traced by dynamo, or eagerly once dynamo
    gave it up), where it routed natively: the gradients followed other experts than the forward, and only
    detach said that rows were left. A non-reentrant checkpoint's recompute is seen there, and forced."""
    from torch._dynamo import compiled_autograd
    from torch.utils.checkpoint import checkpoint

    from .tinymoe import RouterSpec, TinyMoE

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMoE([RouterSpec(8, 2), RouterSpec(6, 2)])
    x = model.inputs((3, 5))
    compile_graph = torch.compile(backend="eager") if compiler == "dynamo" else (lambda gm: gm)

    def forward(h: torch.Tensor, reentrant: bool) -> torch.Tensor:
        for layer in model.layers:
            h = checkpoint(layer, h, use_reentrant=reentrant)
        return h

    try:
        with mr.attach(model) as session:
            with session.capture(), torch.no_grad():
                model(x)
            routes = session.routes()
            for reentrant in (False, True):
                with session.replay(routes):
                    out = forward(x.clone().requires_grad_(True), reentrant)
                if not reentrant:
                    with compiled_autograd._enable(compile_graph):
                        out.sum().backward()
                    assert not any(h.kept for h in session._hooks)  # each recompute took its rows
                    continue
                with (
                    pytest.raises(mr.UnsupportedRouterError, match="use_reentrant=False"),
                    compiled_autograd._enable(compile_graph),
                ):
                    out.sum().backward()
                del out
                gc.collect()
                for h in session._hooks:  # (rows left by the refused backward: the graph is gone)
                    h.kept.clear()
    finally:
        torch._dynamo.reset()


def test_establishing_a_router_under_a_checkpoint_initializes_no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with CUDA not yet initialized, a CPU model's first forward under a non-reentrant checkpoint that
    preserves the RNG state establishes its routers without initializing CUDA: torch refuses a checkpointed forward
    that initializes a device (reading the sync-debug mode initializes CUDA)."""

    def initializes(*args: object) -> int:
        raise AssertionError("CUDA initialized inside a checkpointed forward")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", initializes)
    model, x = build(checkpointing="non_reentrant"), batch()
    with mr.attach(model) as session:
        with session.capture():
            model(x, labels=x).loss.backward()
        assert session.routes().num_tokens == x.numel()
