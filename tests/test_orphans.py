"""Decisions outside every attached router: refused wherever they choose among experts."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, perturb_routers, snapshot, tried

D, E, T = 16, 4, 6


class FFN(nn.Module):
    """An MoE feed-forward block whose ``gate`` discovery finds."""

    def __init__(self, num_experts: int = E) -> None:
        super().__init__()
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        return self.dispatch(x, w, idx)

    def dispatch(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


class ExpertHeads(nn.Module):
    """Attention whose value projection is chosen per head among experts (SwitchHead's form)."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.sel = nn.Parameter(torch.randn(heads * E, D))
        self.v = nn.Parameter(torch.randn(heads * E, D, D // heads) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x, self.sel).view(x.shape[0], self.heads, E).sigmoid()
        w, idx = scores.topk(1, dim=-1)  # one expert per token and head
        chosen = idx[..., 0] + torch.arange(self.heads) * E  # [T, heads]
        v = torch.einsum("td,thdo->tho", x, self.v[chosen])
        return (w * v).reshape(x.shape[0], -1)


class SigmaFFN(nn.Module):
    """An MoE layer no naming rule finds (σ-MoE's form): expert keys stacked ``[E, D, H]``, ``expert_sel``."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.expert_sel = nn.Parameter(torch.randn(num_experts, D))
        self.keys = nn.Parameter(torch.randn(num_experts, D, D) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = F.linear(x, self.expert_sel).sigmoid().topk(2, dim=-1)
        return torch.einsum("td,tkdh,tk->th", x, self.keys[idx], w)


class Indexer(nn.Module):
    """A sparse-attention indexer: a top-k over keys, as wide as the expert count here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ x.t()  # [T, T]: T == E keys
        w, idx = scores.topk(2, dim=-1)
        return x[idx].mean(1) * w.mean(-1, keepdim=True).sigmoid()


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.indexer = Indexer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.indexer(x)


class Layer(nn.Module):
    def __init__(self, mixer: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attention = mixer
        self.mlp = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.mlp(x)


@pytest.mark.reliability("silent replays")
def test_attention_that_chooses_among_experts_is_refused_when_not_attached() -> None:
    """Attention is not exempt where it holds experts: its choice would run native at replay."""
    model = nn.Sequential(Layer(ExpertHeads(), FFN()))
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.attention' \(ExpertHeads\): topk over 4"):
            session.verify(torch.randn(T, D))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("experts", [E, 6])
def test_an_unfound_moe_layer_is_refused_whatever_its_expert_count(experts: int) -> None:
    """Its top-k is over its own experts, which need not number as many as an attached router's."""
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), SigmaFFN(experts)))
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=rf"'1\.mlp' \(SigmaFFN\): topk over {experts}"):
            session.verify(torch.randn(T, D))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_an_unfound_router_is_refused_at_every_block_until_a_forward_passes(block: str) -> None:
    """An unfound router is refused again on a retry, in replay blocks too, and in a layer added after attach."""
    x = torch.randn(T, D)
    routes = mr.Routes([torch.tensor([[0, 1]] * T)], names=["0.mlp.gate"], num_experts=E)

    def run(session: mr.Session, model: nn.Module) -> None:
        with session.capture() if block == "capture" else session.replay(routes):
            model(x)

    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), SigmaFFN(E)))
    for _ in range(2):  # a second session on the model, as a retry after the error would attach
        with mr.attach(model) as session:
            for _ in range(2):  # a retry in the same session
                with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \(SigmaFFN\)"):
                    run(session, model)
                tried()
    changes = {
        "a layer appended": lambda m: m.append(Layer(nn.Identity(), SigmaFFN(E))),
        "a mixer replaced": lambda m: setattr(m[0], "attention", ExpertHeads()),
    }
    for change in changes.values():
        model = nn.Sequential(Layer(nn.Identity(), FFN()))
        with mr.attach(model) as session:
            run(session, model)  # watched, and passed
            run(session, model)
            change(model)
            with pytest.raises(mr.UnsupportedRouterError, match="outside every attached router"):
                run(session, model)
        tried()


def test_an_attention_top_k_over_keys_is_not_a_decision() -> None:
    """A sparse-attention indexer beside no experts is left alone, even as wide as the expert count."""
    model = nn.Sequential(Layer(Attention(), FFN()))
    x = torch.randn(E, D)  # as many keys as experts
    with mr.attach(model) as session:
        session.verify(x)
        with session.capture():
            model(x)
        assert session.routes().names == ("0.mlp.gate",)


class EinsumAttention(nn.Module):
    """q, k, v stacked in one 3-D weight, a stable softmax by hand: no choice among experts."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, D, D) * D**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.einsum("th,nhd->ntd", x, self.w)
        scores = q @ k.t()
        scores = scores - scores.max(dim=-1, keepdim=True).values
        return scores.softmax(-1) @ v


class ConvMixer(nn.Module):
    """A token mixer with a convolution (a 3-D weight) and a max over its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.t()[None])[0].t()
        return y - y.max(dim=-1, keepdim=True).values


@pytest.mark.parametrize("tokens", [E, 3])  # as many keys as experts; as many as the stacked weight's first dim
@pytest.mark.parametrize("mixer", [EinsumAttention, ConvMixer])
def test_attention_or_convolutions_with_3d_weights_are_not_decisions(mixer: type[nn.Module], tokens: int) -> None:
    model = nn.Sequential(Layer(mixer(), FFN()))
    x = torch.randn(tokens, D)
    with mr.attach(model) as session:
        session.verify(x)
        with session.capture():
            ref = model(x)
        with session.replay(session.routes()):
            assert torch.equal(model(x), ref)


class Wrapper(nn.Module):
    """A model whose layers are called by themselves too (as ``model.model(x)`` runs a CausalLM's body)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.model = body
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(x))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_an_unfound_router_is_refused_when_a_part_of_the_model_is_run_by_itself(block: str) -> None:
    """Once silent: only the attached model's own forward was watched, so ``model.model(x)`` ran an unfound router
    natively, recording and forcing only the routers that were found."""
    x = torch.randn(T, D)
    routes = mr.Routes([torch.tensor([[0, 1]] * T)], names=["model.0.mlp.gate"], num_experts=E)
    model = Wrapper(nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), SigmaFFN(E))))
    with mr.attach(model) as session:
        assert session.names == ("model.0.mlp.gate",)
        for _ in range(2):  # and again on a retry
            with pytest.raises(mr.UnsupportedRouterError, match=r"'model\.1\.mlp' \(SigmaFFN\)"):
                with session.capture() if block == "capture" else session.replay(routes):
                    model.model(x)
            tried()
        with pytest.raises(mr.UnsupportedRouterError, match=r"'model\.1\.mlp' \(SigmaFFN\)"):
            with session.capture():
                model.model[0](x)  # a part holding no unfound router passes; its neighbour is still watched
                model.model[1](x)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'model\.1\.mlp' \(SigmaFFN\)"):
            with session.capture():
                model(x)  # a part that passed alone does not pass the whole model
        tried(2)


def test_a_part_of_the_model_run_by_itself_is_watched_until_it_passes() -> None:
    """With every router found, a part run by itself records and replays every router, in every block."""
    x = torch.randn(T, D)
    model = Wrapper(nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), FFN())))
    with mr.attach(model) as session:
        for _ in range(2):
            with session.capture():
                model.model(x)
                model.model(x)
            assert [len(t) for t in session.routes().per_layer()] == [2 * T, 2 * T]
            with session.replay(session.routes()):
                model.model(x)
                model.model(x)


class ChunkedFFN(nn.Module):
    """An MoE layer with every expert computed by one ``Linear`` and chunked: no expert bank any rule sees."""

    def __init__(self, num_experts: int, bank: str = "ffn") -> None:
        super().__init__()
        self.num = num_experts
        self.sel = nn.Linear(D, num_experts, bias=False)
        setattr(self, bank, nn.Linear(D, num_experts * D))
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.sel(x).softmax(-1).topk(2, dim=-1)
        every = getattr(self, self.bank)(x).view(x.shape[0], self.num, D)
        return (every.gather(1, idx[..., None].expand(-1, -1, D)) * w[..., None]).sum(1)


class FunctionFFN(nn.Module):
    """An MoE layer whose experts are plain functions over a ``ParameterList`` of weights."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.sel = nn.Linear(D, num_experts, bias=False)
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(D, D) * 0.1) for _ in range(num_experts))
        self.fns = [lambda t, w=w: t @ w for w in self.ws]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.sel(x).softmax(-1).topk(2, dim=-1)
        return torch.stack(
            [(w[:, s, None] * torch.stack([f(x) for f in self.fns])[idx[:, s], range(len(x))]) for s in range(2)]
        ).sum(0)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "ffn",
    [lambda: ChunkedFFN(E), lambda: ChunkedFFN(6, bank="experts_fc"), lambda: FunctionFFN(E), lambda: FunctionFFN(6)],
)
def test_an_unfound_moe_layer_whose_experts_no_rule_sees_is_refused(ffn: object) -> None:
    """Once silent: an MoE layer computing every expert in one ``Linear``, or keeping its experts as functions, was
    neither found nor watched, so only the other layers' routers were recorded and forced."""
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), ffn()))  # type: ignore[operator]
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \((Chunked|Function)FFN\): topk over"):
            with session.capture():
                model(torch.randn(T, D))


class LoRAExperts(nn.Module):
    """A mixture of LoRA experts in a projection (MoLA, HydraLoRA): ``lora_A`` / ``lora_B`` lists of experts of no
    expert name beside a ``lora_router`` with as many outputs, held directly or per adapter name (peft's
    ``ModuleDict``), its top-k in the projection's forward."""

    def __init__(self, n: int, adapters: bool) -> None:
        super().__init__()
        self.adapters = adapters

        def held(m: nn.Module) -> nn.Module:
            return nn.ModuleDict({"default": m}) if adapters else m

        self.lora_A = held(nn.ModuleList(nn.Linear(D, 2, bias=False) for _ in range(n)))
        self.lora_B = held(nn.ModuleList(nn.Linear(2, D, bias=False) for _ in range(n)))
        self.lora_router = held(nn.Linear(D, n, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def get(m: nn.Module) -> nn.Module:
            return m["default"] if self.adapters else m  # type: ignore[index]

        w, idx = get(self.lora_router)(x).softmax(-1).topk(2, dim=-1)
        a, b = get(self.lora_A), get(self.lora_B)
        out = torch.zeros_like(x)
        for e in range(len(a)):  # type: ignore[arg-type]
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * b[e](a[e](x[tok])))  # type: ignore[index]
        return out


class LayerChoice(nn.Module):
    """Two layers and a head of another width, with a top-1 over the layers' outputs' norms (no experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([layer(x) for layer in self.layers], -1)  # [T, D, 2]
        best = outs.norm(dim=1).argmax(-1)
        return outs[torch.arange(x.shape[0]), :, best] + self.head(x).sum(-1, keepdim=True)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("adapters", [False, True], ids=["lists", "per-adapter"])
def test_lora_experts_beside_a_found_router_are_refused_whatever_their_count(adapters: bool) -> None:
    """Once silent: LoRA experts of a count no attached router has (6 beside a router of 4), in lists of no expert
    name, were neither found nor watched: a capture recorded the MoE layer alone and a replay left their top-k
    native. A layer stack beside a head of another width, choosing among the layers, holds no experts."""
    model = nn.Sequential(Layer(LoRAExperts(6, adapters), FFN()))
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.attention' \(LoRAExperts\): topk over 6"):
            with session.capture():
                model(torch.randn(T, D))
    model = nn.Sequential(Layer(LayerChoice(), FFN()))
    with mr.attach(model) as session:
        session.verify(torch.randn(T, D))


class Memory(nn.Module):
    """A key-value memory read by its top-k keys: as many keys as the routers have experts."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(E, D))
        self.values = nn.Embedding(E, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = (x @ self.keys.t()).topk(2, dim=-1)
        return (self.values(idx) * w.softmax(-1)[..., None]).sum(1)


class TokenChoice(nn.Module):
    """Picks the top-k tokens to process (Mixture-of-Depths' form): a choice among tokens, not experts."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(D, 1)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.score(x).t().topk(2, dim=-1)  # [1, T]: T == E tokens
        return torch.zeros_like(x).index_add(0, idx[0], w[0, :, None] * self.proj(x[idx[0]]))


def test_a_choice_over_as_many_things_as_experts_is_refused_only_where_a_weight_is_that_wide() -> None:
    """A memory with as many keys as experts could be an MoE layer: refused, and ``exclude=`` leaves it native. A
    choice among tokens, as many as the experts here, is no choice among experts: left alone."""
    x = torch.randn(E, D)
    model = nn.Sequential(*(Layer(nn.Identity(), ffn) for ffn in (FFN(), Memory(), TokenChoice())))
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \(Memory\): topk over 4"):
            session.verify(x)
    with mr.attach(model, exclude="1.mlp") as session:
        session.verify(x)
        with session.capture():
            ref = model(x)
        with session.replay(session.routes()):
            assert torch.equal(model(x), ref)


def test_a_compiled_model_attached_as_is_is_watched_without_breaking_its_trace() -> None:
    """``torch.compile(model)`` attached as it is: the watch reads nothing dynamo would trace, and still refuses."""
    found = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), FFN()))
    unfound = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), SigmaFFN(E)))
    x = torch.randn(T, D)
    compiled = torch.compile(found, backend="eager")
    with mr.attach(compiled) as session:
        with session.capture():
            compiled(x)
        assert session.routes().names == ("_orig_mod.0.mlp.gate", "_orig_mod.1.mlp.gate")
    compiled = torch.compile(unfound, backend="eager")
    with mr.attach(compiled) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"'_orig_mod\.1\.mlp' \(SigmaFFN\)"):
            with session.capture():
                compiled(x)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_layer_compiled_where_it_sits_after_a_block_is_watched_eagerly_not_refused(backend: str) -> None:
    """Once a false refusal: a layer wrapped by ``torch.compile`` where it sits after a block had run (a module on
    the way to the routers replaced, so the next block watches its first forward again) ran compiled under the
    watch, which saw its router's top-k inlined in the graph, outside the router's forward, and refused it as a
    decision outside every router. The watched forward runs eagerly; the layer keeps its routers' names."""
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 9))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        names = session.names
        model.layers[1] = torch.compile(model.layers[1], backend=backend)
        with session.capture():
            first, second = model(x).logits, model(x).logits
        routes = session.routes()
        assert routes.names == names
        perturb_routers(session, scale=3.0)  # the replay must force the recorded experts
        with session.replay(routes), session.capture():
            model(x), model(x)
        assert session.routes().equal(routes), "the recorded experts were not forced"
    assert torch.equal(first, second)
    assert "forward" not in vars(model.layers[0].mlp.router)


class Branching(nn.Module):
    """An MoE block that sends long inputs through a second MoE layer no rule finds, and every input through
    a normalisation that runs only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.short = FFN()
        self.long = SigmaFFN(E)
        self.norm = nn.LayerNorm(D)
        self.normalise = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = self.norm(x)
        return self.long(x) if x.shape[0] > T else self.short(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_an_unfound_router_on_a_branch_the_watched_forward_did_not_take_is_refused(block: str) -> None:
    """Once silent: the watch saw one forward, and a router that only a later forward ran (a branch for long
    inputs) was neither recorded nor forced. Modules in an MoE block that the watched forward did not run are
    watched at their first run; one that decides nothing passes and is left with no hook."""
    model = nn.Sequential(Layer(nn.Identity(), Branching()))
    short, long = torch.randn(T, D), torch.randn(2 * T, D)
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.short.gate",)
        with session.capture():
            model(short)  # watched, and passed
        routes = session.routes()
        blocks = {"capture": session.capture, "replay": lambda: session.replay(routes)}
        mlp = model[0].mlp
        mlp.normalise = True
        with blocks[block]():
            model(short)  # the normalisation runs for the first time: watched, nothing to find
        assert not mlp.norm._forward_pre_hooks and not mlp.norm._forward_hooks
        for _ in range(2):  # again at a retry
            with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.mlp\.long' \(SigmaFFN\): topk over 4"):
                with blocks[block]():
                    model(long)
            tried()
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match=r"'0\.mlp\.long'"):
        with session.capture():  # a later session on the model
            model(short)
            model(long)
    model = nn.Sequential(Layer(nn.Identity(), Branching()))
    with mr.attach(model) as session:
        session.verify(short)  # a forward that verify() watched: the branch it did not take is watched too
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.mlp\.long'"), session.capture():
            model(long)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- decisions in a router's hooks
class Router(nn.Module):
    """A router module returning ``(weights, indices)``; its block dispatches with them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)


class RouterFFN(FFN):
    def __init__(self) -> None:
        super().__init__()
        del self.gate
        self.router = Router()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return self.dispatch(x, w, idx)


def _reroute(module: nn.Module, args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> tuple:
    """A forward hook that routes again, to the experts the router likes least (a user's load balancing)."""
    scores = F.linear(args[0], module.weight).softmax(-1)
    w, idx = torch.topk(-scores, 2, dim=-1)
    return -w, idx


@pytest.mark.parametrize("when", ["before attach", "after a capture"])
def test_a_decision_in_a_forward_hook_of_a_router_is_refused(when: str) -> None:
    """Once silent: a forward hook on a router that chose the experts again ran outside the router's
    intercepted forward, so captures recorded, and replays forced, a choice the block did not use."""
    torch.manual_seed(0)
    model = nn.Sequential(RouterFFN(), RouterFFN())
    x = torch.randn(T, D)
    handles = []
    try:
        if when == "before attach":
            handles = [block.router.register_forward_hook(_reroute) for block in model]
        with mr.attach(model, include="*.router") as session, torch.no_grad():
            assert session.names == ("0.router", "1.router")
            if when == "after a capture":
                with session.capture():
                    model(x)
                handles = [block.router.register_forward_hook(_reroute) for block in model]
            # (the guard on what the router returned sees the rerouted indices first, the watch its top-k after)
            refused = r"'0\.router' \(Router\): topk over 4 in a hook|after router '0\.router'.*replaced or changed"
            with pytest.raises(mr.UnsupportedRouterError, match=refused):
                with session.capture():
                    model(x)
    finally:
        for h in handles:
            h.remove()


def test_a_model_with_modules_awaiting_their_first_run_copies_and_pickles_inside_a_block() -> None:
    """Once a crash: inside a block whose model had modules waiting for their first watched run, ``torch.save``
    of the model failed and a deep copy failed at its forward (the hooks referred to this model's watch)."""
    import copy
    import io

    model = nn.Sequential(Layer(nn.Identity(), Branching()))
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        with session.capture():
            model(x)  # watched: the normalisation and the long branch did not run
        with session.capture():
            assert model[0].mlp.norm._forward_pre_hooks  # waiting for its first run
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            copies = [torch.load(buffer, weights_only=False), copy.deepcopy(model)]
            want = model(x)
    for twin in copies:
        assert torch.equal(twin(x), want)
        twin[0].mlp.normalise = True
        twin(torch.randn(2 * T, D))  # no session: the copy's hooks do nothing


class PolicyFFN(nn.Module):
    """An MoE layer whose policy is an MLP (no gate discovery finds), of ``n`` experts, choosing as ``how`` says:
    one row at a time (``argmax`` / ``topk`` of a 1-D vector), by a random draw (``multinomial``, a ``Categorical``
    sample, a hard ``gumbel_softmax`` one-hot as the mask), or by a ``max`` / ``kthvalue`` / ``sort`` over its
    scores; or, ``how="tokens"``, a top-1 of a 1-D vector of per-token scores and a ``sort`` of the chosen ids (no
    choice among experts: left alone)."""

    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        self.how = how
        self.policy = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, n))
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.policy(x).softmax(-1)
        n = len(self.experts)
        if self.how == "gumbel":
            mask = F.gumbel_softmax(self.policy(x), hard=True)
            return sum((mask[:, e, None] * f(x) for e, f in enumerate(self.experts)), torch.zeros_like(x))
        if self.how == "kthvalue":
            keep = probs >= probs.kthvalue(n - 1, dim=-1, keepdim=True).values
            return sum((keep[:, e, None] * probs[:, e, None] * f(x) for e, f in enumerate(self.experts)), 0 * x)
        rows = {
            "argmax": lambda: torch.stack([probs[i].argmax() for i in range(len(x))])[:, None],
            "topk": lambda: torch.stack([probs[i].topk(2).indices for i in range(len(x))]),
            "multinomial": lambda: torch.multinomial(probs.detach(), 1),
            "categorical": lambda: torch.distributions.Categorical(probs=probs.detach()).sample()[:, None],
            "max": lambda: probs.max(-1, keepdim=True).indices,
            "sort": lambda: probs.sort(-1, descending=True).indices[:, :2],
            "tokens": lambda: probs.topk(2, dim=-1).indices.sort(-1).values,
        }
        idx = rows[self.how]()
        if self.how == "tokens":
            best_token = probs[:, 0].argmax()  # a 1-D choice over the tokens (as many as no bank holds)
            x = x + x[best_token]
        w = probs.gather(1, idx)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("n", [E, 6])
@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("argmax", "argmax, one row at a time, over {n} scores"),
        ("topk", "topk, one row at a time, over {n} scores"),
        ("multinomial", "multinomial draw from {n} scores"),
        ("categorical", "multinomial draw from {n} scores"),
        ("gumbel", r"gumbel_softmax\(hard=True\) draw from {n} scores"),
        ("max", "max over {n}"),
        ("kthvalue", "kthvalue over {n}"),
        ("sort", "sort over {n}"),
    ],
)
def test_an_unfound_layer_choosing_row_by_row_at_random_or_by_a_ranking_is_refused(n: int, how: str, says: str) -> None:
    """Once silent: a choice one row at a time (a 1-D ``argmax`` or ``topk``), a random draw (``multinomial``, a
    ``Categorical`` sample, a hard Gumbel one-hot), or a ``max``, ``kthvalue`` or ``sort`` over an expert count the
    routers do not have, in a layer discovery does not find beside a found router, was no decision to the watch:
    neither recorded nor forced. Refused, naming the layer and the call."""
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), PolicyFFN(n, how))).train()
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=rf"'1\.mlp' \(PolicyFFN\): {says.format(n=n)}"):
            with session.capture():
                model(torch.randn(T, D))


@pytest.mark.reliability("silent replays")
def test_a_choice_among_tokens_or_a_sort_of_chosen_ids_in_an_unfound_layer_is_no_orphan() -> None:
    """A 1-D top-1 over the tokens and a ``sort`` of each token's ``k`` chosen ids, in a layer beside a found router,
    choose among no bank of experts: not refused for that (the layer's own ``topk`` over its experts is)."""
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), PolicyFFN(E, "tokens")))  # T != E
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError) as refused:
            with session.capture():
                model(torch.randn(T, D))
    assert "'1.mlp' (PolicyFFN): topk over 4" in str(refused.value)
    assert "one row at a time" not in str(refused.value) and "sort over" not in str(refused.value)


class RandomFFN(nn.Module):
    """An MoE layer of ``n`` experts routing each token to one drawn at random from no scores (random routing, a
    ``randint`` below the expert count, or a ``randperm`` of the experts per batch, THOR's form in torch)."""

    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        self.how = how
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.experts)
        if self.how == "randint":
            idx = torch.randint(0, n, (x.shape[0],))
        elif self.how == "randint high":
            idx = torch.randint(n, (x.shape[0],))
        else:
            idx = torch.randperm(n)[:1].expand(x.shape[0])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = (idx == e).nonzero().flatten()
            out = out.index_add(0, tok, expert(x[tok]))
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("n", [E, 6])
@pytest.mark.parametrize("how", ["randint", "randint high", "randperm"])
def test_an_unfound_layer_routing_at_random_from_no_scores_is_refused(n: int, how: str) -> None:
    """Once silent: a layer beside a found router that routes its tokens to experts drawn at random from no scores
    (``torch.randint`` below its expert count, a ``randperm`` of its experts) was no decision to the watch: its
    choices were neither recorded nor forced, and a replay was not the capture. Refused, naming the layer and the
    call; a draw below another count (tokens) in it is not."""
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), RandomFFN(n, how))).train()
    name = how.split()[0]
    with mr.attach(model) as session:
        with pytest.raises(
            mr.UnsupportedRouterError, match=rf"'1\.mlp' \(RandomFFN\): {name} draw, from no scores, among {n} values"
        ):
            with session.capture():
                model(torch.randn(T, D))
    shuffled = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), Shuffle(E))).train()
    with mr.attach(shuffled) as session:
        with session.capture():
            shuffled(torch.randn(T, D))  # (a randperm of the tokens, T of them, no expert count: no orphan)


class Shuffle(RandomFFN):
    """A layer of ``n`` experts beside a found router that shuffles its tokens (a ``randperm`` of them) and runs
    every expert on each: no choice among experts."""

    def __init__(self, n: int) -> None:
        super().__init__(n, "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[torch.randperm(x.shape[0])]
        return sum((expert(x) for expert in self.experts), torch.zeros_like(x))


# ------------------------------------------------------------------ draws, sorts and rankings as wide as a bank
class Adversary(nn.Module):
    """A layer holding a bank of ``E`` experts (no router discovery finds), beside a found router, run on as many
    tokens as it has experts; ``how`` says what it does. The harmless ones draw, sort or rank the TOKENS (or write
    back the first of them, by a running count along the tokens); the others choose among its experts by a draw, a
    ranking or a cumulative sum, reached by ways meant to hide it (see :data:`HARMLESS` and :data:`CHOOSING`)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.policy = nn.Linear(D, E)
        self.score = nn.Linear(D, 1)
        self.flat = nn.Linear(D, 2 * E)
        self.prior = nn.Parameter(torch.randn(E))
        self.keys = nn.Parameter(torch.randn(E, D))
        self.w = nn.Parameter(torch.randn(E, D, D) * 0.1)

    def every(self, x: torch.Tensor) -> torch.Tensor:
        return sum((expert(x) for expert in self.experts), torch.zeros_like(x))

    def routed(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each token through the expert ``idx`` names (one per token)."""
        return sum(((idx == e)[:, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, how = x.shape[0], self.how
        probs = self.policy(x).softmax(-1)
        # ---- harmless: along the tokens
        if how == "randperm of the tokens":
            return self.every(x[torch.randperm(t)])
        if how == "randint among the tokens":
            keep = torch.randint(0, t, (2,))
            return self.every(torch.zeros_like(x).index_add(0, keep, x.index_select(0, keep)))
        if how == "multinomial over the tokens":
            pick = torch.multinomial(self.score(x).squeeze(-1).softmax(-1), 2)
            return self.every(torch.zeros_like(x).index_add(0, pick, x[pick]))
        if how == "sort of the tokens":
            return self.every(x[self.score(x).T.sort(-1, descending=True).indices[0]])
        if how == "max over the tokens":
            return self.every(x + x.T.max(-1).values)
        if how == "kthvalue of the tokens":
            s = self.score(x)
            return self.every(x * (s >= s.T.kthvalue(2, dim=-1).values))
        if how == "argmax of a token's score":
            return self.every(x + x[self.score(x)[:, 0].argmax()])
        if how == "gumbel one-hot over the tokens":
            return self.every(x * F.gumbel_softmax(self.score(x), hard=True, dim=0))
        if how == "amax over the tokens":
            return self.every(x + x.T.amax(-1))
        if how == "running count along the tokens":
            return self.every(x * ((x[:, :1] * 0 + 1).cumsum(0) <= 2))
        if how == "bernoulli draw of tokens kept":
            return self.every(x * torch.bernoulli(self.score(x)[:, 0].sigmoid())[:, None])
        if how == "dropout drawn by hand over as many features as experts":
            h = self.policy(x)
            return self.every(x + (h * torch.bernoulli(torch.full_like(h, 0.9)) / 0.9) @ self.keys)
        if how == "uniform draw under one probability over as many features as experts":
            h = self.policy(x)
            return self.every(x + (h * (torch.rand_like(h) < 0.9)) @ self.keys)
        if how == "uniform draw under each token's probability":
            return self.every(x * (torch.rand(t, 1) < self.score(x).sigmoid()))
        # ---- choices among the experts
        if how == "randperm used on tokens and experts":
            perm = torch.randperm(E)
            return self.routed(x[perm], perm)
        if how == "randint made Python numbers":
            idx = torch.randint(0, E, (t,))
            return torch.stack([self.experts[e](x[i]) for i, e in enumerate(idx.tolist())])
        if how == "randint iterated":
            idx = torch.randint(0, E, (t,))
            return torch.stack([self.experts[e](x[i]) for i, e in enumerate(idx)])
        if how == "randint picking stacked weights":
            return torch.einsum("td,tdh->th", x, self.w[torch.randint(0, E, (t,))])
        if how == "randint gathering experts' outputs":
            idx = torch.randint(0, E, (t,))
            outs = torch.stack([expert(x) for expert in self.experts], 1)
            return outs.gather(1, idx[:, None, None].expand(-1, 1, D))[:, 0]
        if how == "randint reading joined experts' outputs":
            idx = torch.randint(0, E, (t,))
            return torch.cat([expert(x) for expert in self.experts])[idx * t + torch.arange(t)]
        if how == "random_ among the experts":
            return self.routed(x, torch.empty(t).random_(0, E).long())
        if how == "randint_like among the experts":
            return self.routed(x, torch.randint_like(x[:, 0], E).long())
        if how == "multinomial from a prior":
            return self.routed(x, torch.multinomial(self.prior.softmax(-1).expand(t, E), 1)[:, 0])
        if how == "multinomial over the first features":
            return self.routed(x, torch.multinomial(x[:, :E].softmax(-1), 1)[:, 0])
        if how == "sort of scores transposed twice":
            return self.routed(x, probs.T.T.sort(-1, descending=True).indices[:, 0])
        if how == "max of scores times a square matrix":
            return self.routed(x, (probs @ torch.eye(E)).max(-1).indices)
        if how == "max of a view of flat scores":
            return self.routed(x, self.flat(x).view(-1).view(t, 2, E)[:, 0].max(-1).indices)
        if how == "max of einsum scores":
            return self.routed(x, torch.einsum("td,ed->te", x, self.keys).max(-1).indices)
        if how == "min of distances":
            return self.routed(x, torch.cdist(x, self.keys).min(-1).indices)
        if how == "gumbel one-hot over transposed scores":
            mask = F.gumbel_softmax(self.policy(x).T, hard=True, dim=0).T
            return sum((mask[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))
        if how == "argmax of a slice of flat scores":
            flat = probs.reshape(-1)
            return self.routed(x, torch.stack([flat[i * E : (i + 1) * E].argmax() for i in range(t)]))
        if how == "searchsorted under a uniform draw":
            return self.routed(x, torch.searchsorted(probs.cumsum(-1), torch.rand(t, 1))[:, 0].clamp(max=E - 1))
        if how == "uniform draw above the cumulative sum":
            return self.routed(x, (torch.rand(t, 1) > probs.cumsum(-1)).sum(-1).clamp(max=E - 1))
        if how == "threshold on the running total":
            keep = (probs.cumsum(-1) - probs) < 0.8
            return sum((keep[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))
        if how == "bernoulli_ in place from the policy's probabilities":
            keep = torch.empty_like(probs).bernoulli_(probs)
            return sum((keep[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))
        if how == "uniform draw under the policy's probabilities":
            keep = torch.rand_like(probs) < probs
            return sum((keep[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))
        if how == "argsort along the tokens of each expert's scores":
            tok = probs.argsort(0, descending=True)[:2]  # [2, E]: the tokens each expert takes
            return self.every(x) + sum((expert(x[tok[:, e]]).sum(0) for e, expert in enumerate(self.experts)))
        raise AssertionError(how)


#: harmless layers (a draw, sort or ranking along the tokens, as many as the bank's experts): not refused
HARMLESS = [
    "randperm of the tokens",
    "randint among the tokens",
    "multinomial over the tokens",
    "sort of the tokens",
    "max over the tokens",
    "kthvalue of the tokens",
    "argmax of a token's score",
    "gumbel one-hot over the tokens",
    "amax over the tokens",
    "running count along the tokens",
    "bernoulli draw of tokens kept",
    "dropout drawn by hand over as many features as experts",
    "uniform draw under one probability over as many features as experts",
    "uniform draw under each token's probability",
]
#: choices among the bank's experts, each by a way meant to hide it: refused
CHOOSING = [
    "randperm used on tokens and experts",
    "randint made Python numbers",
    "randint iterated",
    "randint picking stacked weights",
    "randint gathering experts' outputs",
    "randint reading joined experts' outputs",
    "random_ among the experts",
    "randint_like among the experts",
    "multinomial from a prior",
    "multinomial over the first features",
    "sort of scores transposed twice",
    "max of scores times a square matrix",
    "max of a view of flat scores",
    "max of einsum scores",
    "min of distances",
    "gumbel one-hot over transposed scores",
    "argmax of a slice of flat scores",
    "searchsorted under a uniform draw",
    "uniform draw above the cumulative sum",
    "threshold on the running total",
    "bernoulli_ in place from the policy's probabilities",
    "uniform draw under the policy's probabilities",
    "argsort along the tokens of each expert's scores",
]


class Keyword(nn.Module):
    """The layers, called with their input by keyword (``model(x=...)``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _beside(how: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), Adversary(how))).train()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("how", "call"),
    [(how, "positional") for how in HARMLESS]
    + [(how, call) for how in ("randperm of the tokens", "sort of the tokens") for call in ("keyword", "verify")],
)
def test_a_draw_sort_or_ranking_over_as_many_tokens_as_a_bank_has_experts_is_not_refused(how: str, call: str) -> None:
    """Once a false refusal: a draw (``randperm``, ``randint``, ``multinomial``, ``bernoulli``, a hard Gumbel
    one-hot), a sort or a ranking (``max``, ``kthvalue``, a 1-D ``argmax``) along the tokens, beside a found router,
    was read as a choice among the experts of the bank on its path whenever the tokens were as many as its experts.
    Along a dimension of the forward's input (its tokens), they choose no expert: the found router is recorded and its
    replay is exact, with the input passed by position, by keyword, or to ``verify()`` first. So is a dropout mask
    drawn by hand (``bernoulli`` of one probability, or a uniform draw under it) over as many features as the bank
    has experts: it draws from nothing the model computes."""
    model = Keyword(_beside(how))
    x = torch.randn(E, D)  # as many tokens as the bank has experts
    with mr.attach(model) as session:
        assert session.names == ("body.0.mlp.gate",)
        if call == "verify":
            session.verify(x)
        with session.capture():
            model(x) if call == "positional" else model(x=x)
        routes = session.routes()
        assert routes.names == ("body.0.mlp.gate",) and len(routes.layer("body.0.mlp.gate")) == E
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture():
            model(x)
        assert session.routes().equal(routes), "the recorded experts were not forced"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", CHOOSING)
def test_a_choice_among_a_banks_experts_hidden_from_the_width_rule_is_refused(how: str) -> None:
    """A layer beside a found router choosing among its bank's experts (as many as the tokens) by a random draw used
    on the experts too, made Python numbers, iterated, picking stacked weights or experts' outputs (gathered, or
    joined and indexed), a draw from a prior or from the input's first features, a ranking of scores transposed
    twice, multiplied by a square matrix, viewed flat, made by ``einsum`` or by distances, a Gumbel one-hot over
    transposed scores, a cumulative sum under a uniform draw (``searchsorted`` or by hand) or a threshold, or Bernoulli
    draws of the policy's probabilities (in place, ``bernoulli_``, or by hand, a uniform draw under them): none of
    these runs along the input's tokens, so each is refused, naming the layer, and the model is left as it was. So is
    each expert ranking the tokens by its scores (expert choice, an ``argsort`` along the tokens of ``[tokens, E]``
    scores): it runs along the tokens, once for each expert of the bank."""
    model = _beside(how)
    from .conftest import assert_untouched, snapshot

    before = snapshot(model)
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \(Adversary\): .* (over|from|among|along) 4"):
            with session.capture():
                model(torch.randn(E, D))
    assert_untouched(model, before)


class BernoulliFFN(Adversary):
    """Conditional computation by Bernoulli units (Bengio et al. 2015): each expert kept for a token by a Bernoulli
    draw of its probability under a policy, the kept experts' outputs summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.bernoulli(self.policy(x).sigmoid())
        return sum((keep[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))


@pytest.mark.reliability("silent replays")
def test_experts_kept_by_bernoulli_draws_beside_a_found_router_are_not_left_out_silently() -> None:
    """Experts kept at random per token by Bernoulli draws of a policy's probabilities, in a layer no router discovery
    finds: a choice among its experts outside every router, refused."""
    torch.manual_seed(0)
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), BernoulliFFN(""))).train()
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \(BernoulliFFN\)"):
            with session.capture():
                model(torch.randn(T, D))


class SdpaMixer(nn.Module):
    """Attention through ``F.scaled_dot_product_attention`` (one head, causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)[None].chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]


class BufferFFN(FFN):
    """An MoE block whose output is written into a buffer made by its shape (``x.new_zeros(shape)``, as HF's blocks
    make ``torch.zeros((tokens, hidden))``), no tensor of the input's."""

    def dispatch(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["randperm of the tokens", "multinomial over the tokens", "sort of the tokens"])
def test_a_draw_of_the_tokens_after_attention_and_a_block_writing_into_a_new_buffer_is_not_refused(how: str) -> None:
    """The tokens are followed past attention (``scaled_dot_product_attention``) and past an MoE block whose output is
    a buffer made by its shape, added back to the residual stream: a draw or sort of the tokens in the next layer, as
    many as its bank's experts, is no choice among them (once refused)."""
    torch.manual_seed(0)
    model = nn.Sequential(Layer(SdpaMixer(), BufferFFN()), Layer(nn.Identity(), Adversary(how))).train()
    x = torch.randn(E, D)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        assert routes.names == ("0.mlp.gate",)
        with session.replay(routes), session.capture():
            model(x)
        assert session.routes().equal(routes)


class Allowed(nn.Module):
    """A model called with a mask of the experts each token may use (an integer input), whose second layer draws
    one of them at random for each token (no router discovery finds), beside a found router."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = FFN()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(x)
        idx = torch.multinomial(allowed.float(), 1)[:, 0]
        return x + sum(((idx == e)[:, None] * f(x) for e, f in enumerate(self.experts)), torch.zeros_like(x))


@pytest.mark.reliability("silent replays")
def test_a_draw_among_experts_an_integer_input_allows_is_not_left_out_silently() -> None:
    """A draw among the experts an integer input mask allows, outside every router: refused."""
    torch.manual_seed(0)
    model = Allowed().train()
    allowed = torch.ones(T, E, dtype=torch.long)
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="multinomial draw from 4 scores"):
            with session.capture():
                model(torch.randn(T, D), allowed)


class ExpertChoice(nn.Module):
    """Expert-choice routing (Zhou et al. 2022) in a layer no router discovery finds: each expert takes its top
    tokens by the softmax of a policy, a ``topk`` along the tokens of the transposed scores."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = nn.Linear(D, E)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, tok = self.policy(x).softmax(-1).T.topk(2, dim=-1)  # [E, 2]: the tokens each expert takes
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out.index_add(0, tok[e], w[e, :, None] * expert(x[tok[e]]))
        return out


@pytest.mark.reliability("silent replays")
def test_expert_choice_routing_beside_a_found_router_is_not_left_out_silently() -> None:
    """Each expert of an unfound layer choosing its tokens, beside a found router: refused."""
    torch.manual_seed(0)
    model = nn.Sequential(Layer(nn.Identity(), FFN()), Layer(nn.Identity(), ExpertChoice()))
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"'1\.mlp' \(ExpertChoice\)"):
            with session.capture():
                model(torch.randn(T, D))


class FlatFFN(FFN):
    """:class:`FFN` over ``[batch, seq, d]`` inputs, its tokens flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, D)).view_as(x)


class DepthRouter(Adversary):
    """Mixture-of-Depths beside a bank of experts: each sequence keeps its two best tokens by a score (a ``topk``
    along the sequence of ``[batch, seq]`` scores), which every expert then runs on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, keep = self.score(x)[..., 0].sigmoid().topk(2, dim=-1)
        kept = x.gather(1, keep[..., None].expand(-1, -1, D))
        return x.scatter_add(1, keep[..., None].expand(-1, -1, D), w[..., None] * self.every(kept))


@pytest.mark.reliability("silent replays")
def test_tokens_kept_per_sequence_in_a_batch_as_many_as_a_banks_experts_are_not_refused() -> None:
    """A top-k along the sequence, one for each sequence of a batch as many as the experts of the bank on its path
    (Mixture-of-Depths), is no expert choice: the other dimension is the input's batch, not the bank's experts. The
    found router is recorded and forced."""
    torch.manual_seed(0)
    model = nn.Sequential(Layer(nn.Identity(), FlatFFN()), Layer(nn.Identity(), DepthRouter("")))
    x = torch.randn(E, 3, D)  # as many sequences as the bank has experts
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        assert routes.names == ("0.mlp.gate",)
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture():
            model(x)
        assert session.routes().equal(routes), "the recorded experts were not forced"


class Visible(Allowed):
    """:class:`Allowed`, called with an integer mask of the tokens each token may see (``[tokens, tokens]``), from
    which its second layer draws one token per token, whose features it adds."""

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(x)
        pick = torch.multinomial(visible.float(), 1)[:, 0]
        return x + sum((f(x[pick]) for f in self.experts), torch.zeros_like(x))


@pytest.mark.reliability("silent replays")
def test_a_draw_along_an_integer_mask_over_the_tokens_is_not_refused() -> None:
    """An integer input as long as the tokens along each dimension (a mask of the tokens each token may see) runs
    along the tokens: a draw along it, with as many tokens as a bank's experts, is no choice among them."""
    torch.manual_seed(0)
    model = Visible().train()
    x, visible = torch.randn(E, D), torch.ones(E, E, dtype=torch.long).tril()
    with mr.attach(model) as session:
        with session.capture():
            model(x, visible)
        routes = session.routes()
        assert routes.names == ("moe.gate",)
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture():
            model(x, visible)
        assert session.routes().equal(routes), "the recorded experts were not forced"


class Top1HeadAttention(nn.Module):
    """Attention whose heads are chosen per token by the arg-max of a gate over them (mixture-of-heads, top-1): the
    chosen head's output alone is kept."""

    def __init__(self, heads: int = 4, how: str = "argmax") -> None:
        super().__init__()
        self.heads, self.how = heads, how
        self.qkv = nn.Linear(D, 3 * D)
        self.wg = nn.Linear(D, heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, D // self.heads).unbind(1)
        o = torch.einsum("hnm,mhd->nhd", torch.einsum("nhd,mhd->hnm", q, k).softmax(-1), v)
        logits = self.wg(x)
        head = logits.argmax(-1) if self.how == "argmax" else logits.max(-1).indices
        return (o * F.one_hot(head, self.heads)[..., None]).flatten(1)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["argmax", "max"])
def test_a_head_chosen_by_an_arg_max_in_attention_beside_a_found_router_is_refused(how: str) -> None:
    """A head chosen per token by an ``argmax`` of a gate in attention (or a ``max``'s indices), beside a found router
    (whatever the number of heads): a choice outside every router, refused, naming the layer; the model left as it
    was."""
    from .conftest import assert_untouched, snapshot

    for heads in (E, 2):
        model = nn.Sequential(Layer(Top1HeadAttention(heads, how), FFN()))
        before = snapshot(model)
        with mr.attach(model) as session:
            assert session.names == ("0.mlp.gate",)
            match = rf"'0\.attention' \(Top1HeadAttention\): {how} over {heads} .* make a mask"
            with pytest.raises(mr.UnsupportedRouterError, match=match):
                with session.capture():
                    model(torch.randn(T, D))
        assert_untouched(model, before)


class GatherHeadAttention(Top1HeadAttention):
    """Attention whose heads' outputs are gathered per token at a top-2 of a gate over them, weighted by its scores
    (no mask made, no weight picked)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, D // self.heads).unbind(1)
        o = torch.einsum("hnm,mhd->nhd", torch.einsum("nhd,mhd->hnm", q, k).softmax(-1), v)
        w, idx = self.wg(x).softmax(-1).topk(2, dim=-1)
        picked = o.gather(1, idx[..., None].expand(-1, -1, D // self.heads))
        return (picked * w[..., None]).sum(1).repeat(1, self.heads)


@pytest.mark.reliability("silent replays")
def test_heads_outputs_gathered_at_a_choice_in_attention_beside_a_found_router_are_refused() -> None:
    """The chosen heads' outputs gathered at a top-k of a gate in attention, beside a found router: the indices pick
    activations along their heads (a dimension a projection made, as many as the gate's outputs), a choice outside
    every router, refused."""
    model = nn.Sequential(Layer(GatherHeadAttention(), FFN()))
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.gate",)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.attention' \(GatherHeadAttention\): topk over 4"):
            with session.capture():
                model(torch.randn(T, D))


@pytest.mark.reliability("silent replays")
def test_a_draw_among_experts_an_integer_input_allows_with_as_many_tokens_as_experts_is_refused() -> None:
    """Once silent: :class:`Allowed` run on as many tokens as experts: its integer mask is as long as the tokens along
    each dimension, which is no proof that a draw along it is among tokens (a mask of the tokens each token sees,
    :class:`Visible`, is not refused). The draw is judged by its use, as a draw from no scores is: compared with the
    experts' ids, refused."""
    torch.manual_seed(0)
    model = Allowed().train()
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="multinomial draw from 4 scores"):
            with session.capture():
                model(torch.randn(E, D), torch.ones(E, E, dtype=torch.long))


class HierarchicalMoE(nn.Module):
    """A two-level MoE laid out as lucidrains' ``HeirarchicalMoE``: two gates of one class, ``gate_outer``
    (``w_gating`` ``[D, outer]``, found) picking an outer group per token and ``gate_inner`` (``[outer, D,
    inner]``, a shape no rule reads, not found) an inner expert of that group, over one grid of experts ``[outer,
    inner, D, H]``."""

    def __init__(self, outer: int = 2, inner: int = E) -> None:
        super().__init__()
        self.num_experts_outer, self.num_experts_inner = outer, inner
        self.gate_outer = Top1Gating(D, outer)
        self.gate_inner = Top1Gating(D, inner, outer_expert_dims=(outer,))
        self.experts = GridExperts(outer, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_out, g = self.gate_outer(x)
        w_in, i = self.gate_inner(x, g[:, 0])
        outer = w_out * F.one_hot(g[:, 0], self.num_experts_outer)  # [T, outer]
        inner = w_in * F.one_hot(i[:, 0], self.num_experts_inner)  # [T, inner]
        hidden = torch.einsum("td,efdh->tefh", x, self.experts.w1).relu()
        out = torch.einsum("tefh,efhd->tefd", hidden, self.experts.w2)
        return torch.einsum("tefd,te,tf->td", out, outer, inner)


class Top1Gating(nn.Module):
    def __init__(self, dim: int, num_gates: int, outer_expert_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.num_gates = num_gates
        self.w_gating = nn.Parameter(torch.randn(*outer_expert_dims, dim, num_gates))

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.w_gating if group is None else self.w_gating[group]
        logits = x @ w if group is None else torch.einsum("td,tde->te", x, w)
        return logits.softmax(-1).topk(1, dim=-1)


class GridExperts(nn.Module):
    def __init__(self, outer: int, inner: int, hidden: int = 8) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(outer, inner, D, hidden) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(outer, inner, hidden, D) / hidden**0.5)


@pytest.mark.reliability("silent replays")
def test_the_inner_router_of_a_hierarchical_moe_is_refused_when_not_found() -> None:
    """A hierarchical MoE's inner router, over another number of experts than the found outer one, chooses an
    expert of a ``[outer, inner, ...]`` grid: not attached, it would run free under a replay while the outer one
    is forced. Refused, naming it and what to do, the model as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(HierarchicalMoE(), HierarchicalMoE())
    x = torch.randn(T, D)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"(?s)'0\.gate_inner' \(Top1Gating\): topk over 4.*include="):
        with mr.attach(model) as session:
            assert session.names == ("0.gate_outer", "1.gate_outer")
            with session.capture():
                model(x)
    assert_untouched(model, before)


class _TwoFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([FFN(), FFN()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.reliability("faults")
def test_the_watch_judges_the_forwards_calls_not_those_that_establish_a_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first watched forward establishes each router's decision (probe runs, and the comparisons and copies made
    between them): those calls are no forward's, and judging each of them (hundreds per router) made the first step
    slow. The watch judges the forward's own calls only, as many as in a later watched forward (give or take the
    one-off work of a session's first forward), and still refuses a decision outside every router (the tests
    above)."""
    from moe_replay import orphans

    real = orphans._ordering
    judged = {"forward": 0, "establishing": 0}

    def counting() -> bool:  # (asked of every call the watch judges, after the probe runs' calls are let by)
        ordering = real()
        if not ordering:
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_name == "establish" and frame.f_code.co_filename.endswith("evidence.py"):
                    judged["establishing"] += 1
                    break
                frame = frame.f_back
            else:
                judged["forward"] += 1
        return ordering

    monkeypatch.setattr(orphans, "_ordering", counting)
    torch.manual_seed(0)
    model, x = _TwoFFN(), torch.randn(T, D)
    counts = []
    with mr.attach(model) as session:
        for _ in range(2):  # (the first establishes both routers' decisions, under the watch)
            judged.update(forward=0, establishing=0)
            session.verify(x)
            counts.append(dict(judged))
    assert counts[0]["establishing"] == 0, counts
    assert counts[1]["forward"] > 0, counts  # (the watch ran)
    assert counts[0]["forward"] < 2 * counts[1]["forward"], counts


class ExpertChoiceAttention(nn.Module):
    """Attention experts that each take their tokens (mixture-of-attention's form): ``routes`` learned routing
    tokens score the tokens, each keeps its top 3 along them, and the experts' projections are the groups of
    grouped convolutions, one group per routing token. With one routing token (CoLT5's heavy tokens) there are no
    groups: one branch, no experts."""

    def __init__(self, routes: int = 2) -> None:
        super().__init__()
        self.routes = routes
        self.routing_tokens = nn.Parameter(torch.randn(routes, D))
        self.to_qkv = nn.Conv1d(D * routes, 3 * D * routes, 1, groups=routes, bias=False)
        self.to_out = nn.Conv1d(D * routes, D * routes, 1, groups=routes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, n, D]
        b, g = x.shape[0], self.routes
        scores = torch.einsum("bnd,gd->bgn", x, self.routing_tokens)
        w, idx = scores.sigmoid().topk(3, dim=-1)  # [b, g, 3]: each routing token's tokens
        rows = torch.gather(x[:, None].expand(-1, g, -1, -1), 2, idx[..., None].expand(-1, -1, -1, D))
        q, k, v = self.to_qkv(rows.permute(0, 1, 3, 2).reshape(b, g * D, 3)).view(b, g, 3, D, 3).unbind(2)
        att = (q.transpose(-1, -2) @ k).softmax(-1) @ v.transpose(-1, -2)  # [b, g, 3, D]
        out = self.to_out(att.permute(0, 1, 3, 2).reshape(b, g * D, 3)).view(b, g, D, 3).permute(0, 1, 3, 2)
        at = idx.reshape(b, -1, 1).expand(-1, -1, D)
        return torch.zeros_like(x).scatter_add(1, at, (w[..., None] * out).reshape(b, -1, D))


class TopKAttention(nn.Module):
    """A plain attention of 2 heads keeping each query's top 3 keys (a sparse pattern), its heads mixed by a grouped
    convolution, one group per head: a choice among keys, no experts."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.mix = nn.Conv1d(D, D, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, n, D]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, D // 2).permute(2, 0, 3, 1, 4)  # [b, 2, n, D/2] each
        scores = q @ k.transpose(-1, -2)  # [b, 2, n, n]
        top, at = scores.topk(3, dim=-1)
        kept = torch.full_like(scores, float("-inf")).scatter(-1, at, top)
        out = (kept.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D)
        return self.mix(out.transpose(1, 2)).transpose(1, 2)


class BatchedFFN(FFN):
    """:class:`FFN` over ``[b, n, D]``, keeping the experts it dispatched to last (``went``)."""

    def dispatch(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        self.went = idx.sort(-1).values
        return super().dispatch(x, w, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, D)).view_as(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("mixer", ["expert-choice", "one-routing-token", "top-k-attention"])
def test_expert_choice_among_tokens_in_attention_is_refused_and_a_choice_among_keys_is_not(mixer: str) -> None:
    """Once silent (mixture-of-attention beside a found router): attention experts, computed as the groups of
    grouped convolutions, each taking its tokens by a top-k along them for its routing token, were left native in
    attention while the found router replayed. Now refused, naming the module; with one routing token (CoLT5's
    heavy tokens, no groups) or a top-k over each query's keys beside a grouped convolution (no experts), the
    router's replay is exact and nothing else is refused."""
    torch.manual_seed(0)
    make = {"expert-choice": ExpertChoiceAttention, "one-routing-token": lambda: ExpertChoiceAttention(1)}
    model = nn.Sequential(Layer(make.get(mixer, TopKAttention)(), BatchedFFN()))
    x = torch.randn(2, 8, D)
    if mixer == "expert-choice":
        before = snapshot(model)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.attention' \(ExpertChoiceAttention\): topk along"):
            with mr.attach(model) as session, session.capture():
                model(x)
        assert_untouched(model, before)
        return
    ffn = model[0].mlp
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            ref = model(x)
        routes = session.routes()
        assert routes.names == ("0.mlp.gate",)
        recorded = routes.layer("0.mlp.gate").long().sort(-1).values
        assert torch.equal(ffn.went, recorded)
        with session.replay(routes):
            assert torch.equal(model(x), ref)
        perturb_routers(session, scale=3.0)
        model(x)
        assert not torch.equal(ffn.went, recorded)  # (the perturbed router chooses otherwise natively)
        with session.replay(routes):
            model(x)
        assert torch.equal(ffn.went, recorded)
