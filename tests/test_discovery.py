"""find_routers: patterns, overrides and refusals."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot


def test_skips_shared_expert_gates_and_dense_layers() -> None:
    model = mr.models.build("linear_gate", num_layers=4, first_dense_layers=2, shared_expert=True)
    sites = mr.find_routers(model)
    assert [s.name for s in sites] == ["layers.2.mlp.gate", "layers.3.mlp.gate"]
    assert all(s.scope == s.name.rsplit(".", 1)[0] and s.adapter == "linear-gate" for s in sites)
    assert (sites[0].num_experts, sites[0].top_k) == (8, 2)


@pytest.mark.parametrize(
    "include",
    [
        "layers.1.mlp.router",
        "layers.1.*.router",
        re.compile(r"layers\.1\.mlp\.router"),
        lambda n, m: n == "layers.1.mlp.router",
        ["layers.1.mlp.router"],
    ],
)
def test_include_forms(include) -> None:
    model = mr.models.build("softmax_topk", num_layers=3)
    assert [s.name for s in mr.find_routers(model, include=include)] == ["layers.1.mlp.router"]


def test_include_class_and_exclude() -> None:
    model = mr.models.build("top1_argmax", num_layers=3)
    names = [s.name for s in mr.find_routers(model, include=mr.models.Top1ArgmaxRouter, exclude="layers.0.*")]
    assert names == ["layers.1.mlp.router", "layers.2.mlp.router"]


@pytest.mark.reliability("bad inputs")
def test_an_include_that_exclude_empties_and_a_none_in_a_list_are_named() -> None:
    """Once misleading or unsaid: include= whose every match exclude= took out was reported as matching no module,
    and a None in an exclude list excluded nothing with no word (in an include list, it was named include=None)."""
    model = mr.models.build("top1_argmax", num_layers=2)
    before = snapshot(model)
    with pytest.raises(mr.RouterNotFoundError, match=r"matched 2 module\(s\).*exclude='layers\.\*' took every one"):
        mr.attach(model, include="layers.*.mlp.router", exclude="layers.*")
    for kw in ({"exclude": ["layers.0.*", None]}, {"include": [None]}):
        with pytest.raises(mr.ArgumentTypeError, match="got None in"):
            mr.attach(model, **kw)
    assert_untouched(model, before)
    names = [s.name for s in mr.find_routers(model, include=("layers.*.mlp.router",), exclude=iter(["layers.0.*"]))]
    assert names == ["layers.1.mlp.router"]


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("include", ["*", ["*"], "**", lambda name, module: True], ids=["star", "list", "2star", "all"])
def test_an_include_that_matches_the_model_itself_is_named_as_too_broad(include: object) -> None:
    """Once misleading: include='*' listed the model itself and its layer list as routers, and attach refused them
    as two routers intercepted in one forward, with no word of the pattern. The error names the pattern, modules it
    matched that are not routers, and a narrower pattern (the built-in patterns' routers); the model is untouched."""
    model = mr.models.build("top1_argmax", num_layers=2)
    before = snapshot(model)
    routers = [s.name for s in mr.find_routers(model)]
    narrower = re.sub(r"\.\d+\.", ".*.", routers[0])
    for call in (mr.find_routers, mr.attach):
        with pytest.raises(mr.InvalidArgumentError, match="not routers") as caught:
            call(model, include=include)
        text = str(caught.value)
        assert "'' (the model itself)" in text and "'layers'" in text
        assert f"include={narrower!r}" in text and "Narrow the pattern" in text
        if isinstance(include, str):
            assert f"include={include!r}" in text
    assert_untouched(model, before)
    assert [s.name for s in mr.find_routers(model, include=narrower)] == routers  # the pattern it suggests


def _raises(exc: Exception) -> None:
    raise exc


_ODD_PATTERNS = [
    pytest.param(
        {"include": ""},
        mr.InvalidArgumentError,
        r"include= got an empty pattern \(''\).*leave include unset",
        id="include-empty-str",
    ),
    pytest.param({"include": [""]}, mr.InvalidArgumentError, "empty pattern", id="include-empty-str-in-list"),
    pytest.param({"include": re.compile("")}, mr.InvalidArgumentError, "empty pattern", id="include-empty-regex"),
    pytest.param({"exclude": ""}, mr.InvalidArgumentError, "exclude= got an empty pattern", id="exclude-empty-str"),
    pytest.param(
        {"include": []}, mr.InvalidArgumentError, r"include=\[\] is empty.*leave include unset", id="include-empty-list"
    ),
    pytest.param({"include": set()}, mr.InvalidArgumentError, "is empty", id="include-empty-set"),
    pytest.param({"include": [[], ()]}, mr.InvalidArgumentError, "is empty", id="include-nested-empty"),
    pytest.param(
        {"include": "layers.9.mlp.router"},
        mr.RouterNotFoundError,
        "matched no module.*glob",
        id="include-matching-nothing",
    ),
    pytest.param(
        {"include": r"layers\.\d\.mlp\.router"}, mr.RouterNotFoundError, r"re\.compile", id="include-regex-as-str"
    ),
    pytest.param(
        {"include": ["layers.0.mlp.router", "layers.1.mlp.ruoter"]},
        mr.RouterNotFoundError,
        r"'layers\.1\.mlp\.ruoter' matched no module.*left out",
        id="include-list-part-matching-nothing",
    ),
    pytest.param(
        {"exclude": "layers.0.mlp.ruoter"},
        mr.RouterNotFoundError,
        r"'layers\.0\.mlp\.ruoter' matched no module.*recorded and forced",
        id="exclude-matching-nothing",
    ),
    pytest.param(
        {"exclude": [re.compile(r"layers\.0\..*"), re.compile("nowhere")]},
        mr.RouterNotFoundError,
        "re:nowhere matched no module",
        id="exclude-regex-part-matching-nothing",
    ),
    pytest.param({"include": 5}, mr.ArgumentTypeError, "include= takes a name.*got int", id="include-int"),
    pytest.param({"exclude": [3.5]}, mr.ArgumentTypeError, "exclude= takes a name.*got float", id="exclude-float"),
    pytest.param({"include": b"layers.0.mlp.router"}, mr.ArgumentTypeError, "got bytes", id="include-bytes"),
    pytest.param({"include": re.compile(rb"layers")}, mr.ArgumentTypeError, "bytes regex", id="include-bytes-regex"),
    pytest.param({"include": nn.Linear(2, 2)}, mr.ArgumentTypeError, "module instance.*its class", id="include-module"),
    pytest.param(
        {"include": lambda n: True},
        mr.ArgumentTypeError,
        "predicate <lambda> raised TypeError",
        id="include-predicate-one-arg",
    ),
    pytest.param(
        {"exclude": lambda n, m: _raises(KeyError("boom"))},
        mr.ArgumentTypeError,
        "exclude= predicate <lambda> raised KeyError",
        id="exclude-predicate-raising",
    ),
    pytest.param(
        {"include": lambda n, m: torch.ones(2)},
        mr.ArgumentTypeError,
        "raised RuntimeError",
        id="include-predicate-returning-a-tensor",
    ),
]


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", ["find_routers", "attach"])
@pytest.mark.parametrize(("kwargs", "error", "match"), _ODD_PATTERNS)
def test_empty_and_odd_include_exclude_patterns_are_refused_by_name(
    call: str, kwargs: dict, error: type[mr.MoEReplayError], match: str
) -> None:
    """Once, include='' (an empty CLI --include among them) took the model itself as its one router, a bytes regex, a
    module instance or a predicate of the wrong shape raised a bare TypeError, include=[] was reported as
    'include= matched no module', and an exclude= (or one name of an include= list) with a typo matched nothing,
    unsaid: the router meant to stay native was recorded and forced, or the one named was left out."""
    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        getattr(mr, call)(model, **kwargs)
    assert_untouched(model, before)
    assert mr.find_routers(model)  # (and still found as it was)


@pytest.mark.reliability("bad inputs")
def test_patterns_that_name_something_still_work_beside_the_refusals() -> None:
    """The refusals above leave the forms that do name modules as they were: an empty exclude list (exclude nothing),
    a set, a dict's keys, one-shot iterators (read once, used by both the search and the session's watch)."""
    model = mr.models.build("softmax_topk", num_layers=2)
    everything = [s.name for s in mr.find_routers(model)]
    assert [s.name for s in mr.find_routers(model, exclude=[])] == everything
    assert [s.name for s in mr.find_routers(model, include={"layers.1.mlp.router"})] == ["layers.1.mlp.router"]
    assert [s.name for s in mr.find_routers(model, include={"layers.0.mlp.router": 0})] == ["layers.0.mlp.router"]
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    with mr.attach(model, exclude=(n for n in ["layers.0.mlp.router"])) as session:
        assert [s.name for s in session.sites] == ["layers.1.mlp.router"]
        with session.capture(), torch.no_grad():  # (the watch for routers left out sees layer 0 as excluded)
            model(x)
        assert list(session.routes().names) == ["layers.1.mlp.router"]


class _Custom(nn.Module):
    """An MoE no pattern knows: the router is called 'selector'."""

    def __init__(self) -> None:
        super().__init__()
        self.selector = nn.Linear(16, 6, bias=False)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.selector(x).softmax(-1).topk(3, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(3):
            for e, expert in enumerate(self.experts):
                sel = idx[:, slot] == e
                out = out + sel[:, None] * w[:, slot : slot + 1] * expert(x)
        return out


def test_unknown_model_needs_include_and_then_works() -> None:
    model = _Custom()
    with pytest.raises(mr.RouterNotFoundError, match="include="):
        mr.find_routers(model)
    (site,) = mr.find_routers(model, include="selector")
    assert (site.num_experts, site.scope, site.top_k) == (6, "", None)  # k: learned from the decision
    x = torch.randn(5, 16)
    with mr.attach(model, include="selector") as session:
        with session.capture():
            ref = model(x)
        assert session.sites[0].top_k == 3
        with session.replay(session.routes()):
            assert torch.equal(model(x), ref)


def test_adapter_can_refuse_or_rescope() -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    refuse = mr.Adapter("fused", match=lambda n, m: n.endswith("router"), unsupported="fused kernel")
    sites = mr.find_routers(model, adapters=[refuse])
    assert all(s.unsupported == "fused kernel" and s.how.startswith("refused") for s in sites)
    with pytest.raises(mr.UnsupportedRouterError, match="fused kernel"):
        mr.attach(model, adapters=[refuse])
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="scope"):
        mr.Adapter("x", match=lambda n, m: True, scope="block")


def test_format_sites_table() -> None:
    text = mr.format_sites(mr.find_routers(mr.models.build("top1_argmax")))
    assert text.splitlines()[0].split()[:4] == ["router", "class", "E", "k"]
    assert "layers.0.mlp.router  Top1ArgmaxRouter  8  1" in text


def test_a_top_k_above_the_expert_count_is_refused_before_anything_is_attached() -> None:
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    with pytest.raises(mr.InvalidArgumentError, match="top_k=9 chooses more experts"):
        mr.find_routers(model, top_k=9)
    with pytest.raises(mr.InvalidArgumentError, match="8 experts"):
        mr.attach(model, top_k=9)
    assert_untouched(model, before)
    assert [s.top_k for s in mr.find_routers(model, top_k=8)] == [8, 8]  # all of them is still a choice


def test_a_num_experts_no_router_has_is_named_as_the_problem() -> None:
    """Once refused as 'no MoE router found ... pass num_experts=', when num_experts= itself hid the routers."""
    model = mr.models.build("softmax_topk")
    for wrong in (7, 16, 2**40):  # (16: more scores than the routers' [8, hidden] weights can make)
        with pytest.raises(
            mr.RouterNotFoundError, match=rf"num_experts={wrong} is the expert count of no router.*\[8\]"
        ):
            mr.find_routers(model, num_experts=wrong)
    assert [s.num_experts for s in mr.find_routers(model, num_experts=8)] == [8, 8]
    with pytest.raises(mr.RouterNotFoundError, match="no MoE router found"):
        mr.find_routers(nn.Linear(4, 4), num_experts=4)


class _TemperatureRouter(nn.Module):
    """A top-2 router with a per-token temperature head registered after its gate (its last Linear has one
    output)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 8, bias=False)
        self.temperature = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = nn.functional.softplus(self.temperature(x)) + 0.5
        return torch.topk((self.gate(x) / t).softmax(-1), 2, dim=-1)


class _TemperatureBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = _TemperatureRouter()
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


def test_a_top_k_is_checked_against_expert_counts_not_a_width_hint() -> None:
    """Once refused: under include= the width hint was the last Linear's (a temperature head: 1), so a correct
    top_k=2 was refused as choosing more experts than the router has; the decision is a top-2 over 8."""
    model = _TemperatureBlock()
    assert [s.num_experts for s in mr.find_routers(model, include="router")] == [1]  # (a hint)
    with mr.attach(model, include="router", top_k=2) as session, session.capture():
        model(torch.randn(6, 16))
    assert [(s.num_experts, s.top_k) for s in session.sites] == [(8, 2)]
    with pytest.raises(mr.InvalidArgumentError, match=r"'router' \(8 experts\)"):
        mr.find_routers(model, include="router", top_k=9)


class _Router(nn.Module):
    """A top-2 router that decides in its own forward."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, 16))
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(nn.functional.linear(x, self.weight).softmax(-1), 2, dim=-1)


class _Experts(nn.Module):
    def __init__(self, num_experts: int = 6) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w = nn.Parameter(torch.randn(num_experts, 16, 16) / 4)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(w[:, s, None] * torch.einsum("th,thg->tg", x, self.w[idx[:, s]]) for s in range(idx.shape[1]))


class _GatedInputLayer(nn.Module):
    """Gemma 4's decoder layer: its router, its experts and a gate of per-layer inputs, all side by side; the gate
    is a ``Linear`` named like a router and, in some configurations, as wide as the expert count."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = _Experts()
        self.per_layer_input_gate = nn.Linear(16, 6, bias=False)
        self.per_layer_projection = nn.Linear(6, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        x = x + self.experts(x, idx, w)
        return x + self.per_layer_projection(nn.functional.gelu(self.per_layer_input_gate(x)))


class _Layers(nn.Module):
    def __init__(self, layer: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_gate_beside_a_router_that_decides_is_not_a_router() -> None:
    """Once found as a bare-Linear router intercepted in the whole layer's forward (around the real router), and
    refused at the first forward as soft routing: a Gemma 4 model whose per-layer input width equals its expert
    count could not be attached at all."""
    model = _Layers(_GatedInputLayer)
    assert [s.name for s in mr.find_routers(model)] == ["layers.0.router", "layers.1.router"]
    x = torch.randn(10, 16)
    with mr.attach(model) as session:
        with session.capture():
            ref = model(x)
        routes = session.routes()
        with session.replay(routes):
            assert torch.equal(model(x), ref)


class _MoEOfMoEs(nn.Module):
    """A bare gate choosing among experts that are MoE blocks with routers of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 3, bias=False)
        self.num_experts, self.top_k = 3, 1
        self.experts = nn.ModuleList(_InnerMoE() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x).softmax(-1).topk(1, dim=-1)
        return sum((idx == e) * w * expert(x) for e, expert in enumerate(self.experts))


class _InnerMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = _Router()
        self.experts = _Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return self.experts(x, idx, w)


def test_routers_inside_the_experts_of_a_gated_block_keep_its_gate() -> None:
    model = _Layers(_MoEOfMoEs)
    sites = mr.find_routers(model)
    assert [s.name for s in sites if s.name.endswith(".gate")] == ["layers.0.gate", "layers.1.gate"]
    assert len(sites) == 8
    x = torch.randn(10, 16)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        with session.replay(routes), session.capture():
            model(x)
        assert session.routes().equal(routes)


class _LoggedRouterBlock(nn.Module):
    """The bare gate decides in the block; a router-like module beside it is only logged."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 6, bias=False)
        self.num_experts, self.top_k = 6, 2
        self.router = _Router()
        self.experts = _Experts()
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.router(x)[1]
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, idx, w)


def test_a_gate_set_aside_for_a_router_beside_it_is_still_caught_if_it_decides() -> None:
    model = _Layers(_LoggedRouterBlock)
    assert [s.name for s in mr.find_routers(model)] == ["layers.0.router", "layers.1.router"]
    before = snapshot(model)
    with mr.attach(model) as session, pytest.raises(mr.UnsupportedRouterError, match="outside every attached router"):
        with session.capture():
            model(torch.randn(10, 16))
    assert_untouched(model, before)


def test_gemma4_with_a_per_layer_input_as_wide_as_its_experts_is_attached_by_its_routers() -> None:
    pytest.importorskip("transformers")
    from moe_replay._hf import tiny_model

    model = tiny_model("gemma4_text", hidden_size_per_layer_input=8)
    assert model.config.num_experts == model.model.layers[0].per_layer_input_gate.out_features
    sites = mr.find_routers(model)
    assert {s.module_class for s in sites} == {"Gemma4TextRouter"} and len(sites) == model.config.num_hidden_layers
    x = torch.randint(1, 200, (2, 6))
    with mr.attach(model) as session:
        with session.capture():
            ref = model(x).logits
        with session.replay(session.routes()):
            assert torch.equal(model(x).logits, ref)


# ----------------------------------------------------------------------- dense modules that look like MoE blocks
_D, _H = 16, 4


class _HeadGatedAttention(nn.Module):
    """Attention with its per-head projections stacked ``[H, 3 * head_dim, D]`` and a per-head output gate
    ``Linear(D, H)``: H gate outputs, a 3-D weight of H slices, no experts."""

    def __init__(self) -> None:
        super().__init__()
        self.wqkv = nn.Parameter(torch.randn(_H, 3 * (_D // _H), _D) / 4)
        self.gate = nn.Linear(_D, _H)
        self.o = nn.Linear(_D, _D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.einsum("bsd,hed->bhse", x, self.wqkv).chunk(3, -1)
        a = q @ k.transpose(-1, -2) / (_D // _H) ** 0.5
        a = (a - a.max(-1, keepdim=True).values).softmax(-1)
        o = a @ v * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        return x + self.o(o.transpose(1, 2).reshape(x.shape))


class _RawConvGated(nn.Module):
    """A gated convolution mixer holding its depthwise kernel raw, ``[D, 1, width]``, beside a gate ``Linear(D, D)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(_D, 1, 4) / 2)
        self.gate = nn.Linear(_D, _D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.conv1d(nn.functional.pad(x.transpose(1, 2), (3, 0)), self.conv_weight, groups=_D)
        return x + y.transpose(1, 2) * torch.sigmoid(self.gate(x))


class _BilinearFusion(nn.Module):
    """A gate ``Linear(D, D)`` beside an ``nn.Bilinear(D, D, D)``, whose weight is ``[D, D, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _D)
        self.bilinear = nn.Bilinear(_D, _D, _D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.gate(x)) * self.bilinear(x, x)


class _DenseLM(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, _D)
        self.layers = nn.ModuleList([block(), block()])
        self.lm_head = nn.Linear(_D, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class _PrototypeClassifier(nn.Module):
    """A classification head of 5 classes named like a gate, beside 5 class prototypes ``[5, D, 2]``; the
    predicted class (an argmax over the 5 logits) is part of its output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, _D)
        self.prototypes = nn.Parameter(torch.randn(5, _D, 2))
        self.gating_head = nn.Linear(_D, 5)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gating_head(self.emb(ids).mean(1))
        return logits, logits.argmax(-1)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _DenseLM(_HeadGatedAttention), id="per-head-stacked-attention"),
        pytest.param(lambda: _DenseLM(_RawConvGated), id="raw-conv-kernel"),
        pytest.param(lambda: _DenseLM(_BilinearFusion), id="bilinear"),
        pytest.param(_PrototypeClassifier, id="classifier-beside-prototypes"),
    ],
)
def test_a_lone_3d_weight_beside_a_gate_is_no_expert_stack(make: object) -> None:
    """Once a false router: a gate-named Linear as wide as the first dimension of one 3-D weight of its block
    (per-head projections, a raw convolution kernel, a bilinear form, class prototypes) was taken for a router
    choosing among stacked experts; the dense model attached, and the classifier's argmax was captured as routes."""
    model = make()
    with pytest.raises(mr.RouterNotFoundError, match="no MoE router found"):
        mr.find_routers(model)
    with pytest.raises(mr.RouterNotFoundError):
        mr.attach(model)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids)  # (a working dense model)


def test_a_block_holding_an_up_and_a_down_expert_stack_is_still_found() -> None:
    """Two 3-D weights of the same first dimension (experts' up and down projections) beside a bare gate
    are the expert stack, whether the block holds them itself or a child does."""

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(_D, 4, bias=False)
            self.w_up = nn.Parameter(torch.randn(4, 12, _D) / 4)
            self.w_down = nn.Parameter(torch.randn(4, _D, 12) / 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
            h = torch.einsum("bsd,bskfd->bskf", x, self.w_up[idx]).relu()
            return x + torch.einsum("bskf,bskdf,bsk->bsd", h, self.w_down[idx], w)

    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = Own()
            del self.ffn.gate
            self.gate = nn.Linear(_D, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
            h = torch.einsum("bsd,bskfd->bskf", x, self.ffn.w_up[idx]).relu()
            return x + torch.einsum("bskf,bskdf,bsk->bsd", h, self.ffn.w_down[idx], w)

    for block in (Own, Child):
        sites = mr.find_routers(_DenseLM(block))
        assert [(s.name, s.num_experts) for s in sites] == [("layers.0.gate", 4), ("layers.1.gate", 4)]


@pytest.mark.reliability("clear errors")
def test_a_lazy_gate_is_refused_until_the_first_forward_materialises_it() -> None:
    """Once a ``ValueError`` from torch (an uninitialised parameter) escaped ``attach`` on a lazy gate."""
    model = mr.models.build("linear_gate")
    model.layers[0].mlp.gate = nn.LazyLinear(8, bias=False)
    with pytest.raises(mr.InvalidArgumentError, match=r"lazy module\) in 'layers\.0\.mlp\.gate' \(LazyLinear\)"):
        mr.attach(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    model(torch.randint(0, 32, (1, 4)))  # the first forward materialises it
    with mr.attach(model) as session:
        assert session.names == ("layers.0.mlp.gate", "layers.1.mlp.gate")


class _TutelStyleLayer(nn.Module):
    """Gates kept in a list named ``gates`` beside the experts (tutel's ``MOELayer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList([nn.Linear(16, 8, bias=False)])
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))


class _ExpertRunner(nn.Module):
    """The experts of a block whose gate sits beside it (ScatterMoE's ``moe_mlp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))


class _ScatterStyleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 8
        self.gate = nn.Linear(16, 8, bias=False)
        self.moe_mlp = _ExpertRunner()


class _DecoderLayerWithResidual(nn.Module):
    """A decoder layer with a residual gate as wide as the experts beside its MoE block (which has its own gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 8
        self.residual_gate = nn.Linear(16, 8, bias=False)
        self.mlp = _ScatterStyleBlock()


def test_a_list_of_gates_is_not_a_router_and_the_gates_in_it_are() -> None:
    """Once the ``gates`` list itself was taken for the router, its E read from the first Linear inside it."""
    model = nn.ModuleList([_TutelStyleLayer(), _TutelStyleLayer()])
    assert [s.name for s in mr.find_routers(model)] == ["0.gates.0", "1.gates.0"]


def test_a_gate_beside_experts_held_one_level_down_is_a_router_and_a_gate_beside_an_moe_block_is_not() -> None:
    """Once not found: ScatterMoE's gate sits beside ``moe_mlp``, which holds the experts."""
    assert [s.name for s in mr.find_routers(nn.ModuleList([_ScatterStyleBlock()]))] == ["0.gate"]
    assert [s.name for s in mr.find_routers(nn.ModuleList([_DecoderLayerWithResidual()]))] == ["0.mlp.gate"]


def _tied_gates() -> nn.Module:
    from .test_evidence import LinearGateBlock, TwoLayers

    model = TwoLayers(LinearGateBlock)
    model.layers[1].gate = model.layers[0].gate  # one gate Linear shared by the two MoE blocks
    return model


@pytest.mark.parametrize("include", [None, "layers.*.gate", ["layers.0.gate", "layers.1.gate"]])
def test_a_gate_tied_across_blocks_is_a_router_in_each_block(include: object) -> None:
    """Once a bare gate shared by two MoE blocks was found at its first path only, even where include= named both:
    the second block's top-k ran outside every attached router and a legitimate model was refused."""
    from .test_evidence import assert_capture_and_replay_are_exact

    model = _tied_gates()
    sites = mr.find_routers(model, include=include)
    assert [(s.name, s.scope) for s in sites] == [("layers.0.gate", "layers.0"), ("layers.1.gate", "layers.1")]
    session = assert_capture_and_replay_are_exact(model, include=include)
    assert session.names == ("layers.0.gate", "layers.1.gate")


def test_a_router_tied_across_blocks_is_intercepted_once() -> None:
    """A router module deciding in its own forward and shared by two blocks is one site, at its first path."""
    from .test_evidence import GroupLimitedRouter, RouterBlock, TwoLayers

    model = TwoLayers(lambda: RouterBlock(GroupLimitedRouter(n_group=2, topk_group=1, top_k=2)))
    model.layers[1].router = model.layers[0].router
    assert [(s.name, s.scope) for s in mr.find_routers(model)] == [("layers.0.router", "layers.0.router")]
    x = torch.randn(24, 16)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    assert session.routes().layer("layers.0.router").shape == (48, 2)  # both calls, in order


class _ScriptedGateBlock(nn.Module):
    """An MoE block whose gate was scripted before attach: a scripted ``Linear``, or a scripted module that makes
    the top-k itself (``topk_in_gate``)."""

    def __init__(self, topk_in_gate: bool = False) -> None:
        super().__init__()
        self.gate = torch.jit.script(_TopkGate() if topk_in_gate else nn.Linear(16, 6, bias=False))
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.top_k, self.topk_in_gate = 2, topk_in_gate
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.topk_in_gate:
            w, idx = self.gate(x)
        else:
            w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        self.last = idx
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                out = out + (idx[:, slot] == e)[:, None] * w[:, slot : slot + 1] * expert(x)
        return out


class _EagerTopkBlock(nn.Module):
    """A Mixtral-style block, to be scripted whole."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 6, bias=False)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + ((idx == e).to(x.dtype) * w).sum(-1, keepdim=True) * expert(x)
        return out


class _TopkGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 6, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(self.proj(x).softmax(-1), 2, dim=-1)


@pytest.mark.reliability("clear errors")
def test_a_gate_scripted_before_attach_is_intercepted_in_its_eager_block() -> None:
    """Once ``attach`` raised torch's ``AttributeError`` reading the forward of a scripted gate's class."""
    torch.manual_seed(0)
    block, x = _ScriptedGateBlock(), torch.randn(10, 16)
    (site,) = mr.find_routers(block)
    assert (site.name, site.scope, site.unsupported) == ("gate", "", None)
    with mr.attach(block) as session:
        with session.capture():
            block(x)
        assert torch.equal(session.routes().layer("gate"), block.last)
        g = torch.Generator().manual_seed(1)
        forced = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)])
        with session.replay(mr.Routes([forced], names=session.names, num_experts=6)):
            block(x)
        assert torch.equal(block.last, forced)


@pytest.mark.reliability("clear errors")
def test_a_router_that_decides_in_torchscript_is_refused_with_a_clear_error() -> None:
    """Once a scripted router (or a scripted block) made ``attach`` or the first capture raise an
    ``AttributeError`` from torch's script module internals, not a MoEReplayError."""
    torch.manual_seed(0)
    block, x = _ScriptedGateBlock(topk_in_gate=True), torch.randn(10, 16)
    before = snapshot(block)
    forwards = {name: m.__dict__.get("forward") for name, m in block.named_modules()}  # (a script module's own)
    with mr.attach(block) as session, pytest.raises(mr.UnsupportedRouterError, match="TorchScript"):
        with session.capture():
            block(x)
    assert {name: m.__dict__.get("forward") for name, m in block.named_modules()} == forwards
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    scripted = nn.ModuleDict({"moe": torch.jit.script(_EagerTopkBlock())})
    forwards = {name: m.__dict__.get("forward") for name, m in scripted.named_modules()}
    with pytest.raises(mr.UnsupportedRouterError, match=r"'moe\.gate'.*the block that holds it is a TorchScript"):
        mr.attach(scripted, include="moe.gate")
    assert {name: m.__dict__.get("forward") for name, m in scripted.named_modules()} == forwards


class _SpectralGateBlock(nn.Module):
    """A Mixtral-style block whose gate is spectrally normalised (a parametrization with state)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(16, 6, bias=False))
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(2):
            for e, expert in enumerate(self.experts):
                out = out + (idx[:, slot] == e)[:, None] * w[:, slot : slot + 1] * expert(x)
        return out


@pytest.mark.reliability("wrappers")
def test_finding_a_spectrally_normalised_gate_does_not_run_its_power_iteration() -> None:
    """Once silent: discovery read ``gate.weight``, which runs the parametrization: in training mode,
    spectral_norm's power iteration moved its ``_u``/``_v`` buffers at each read, so ``find_routers``
    and ``attach`` changed the model and every later output."""
    torch.manual_seed(0)
    model = nn.Sequential(_SpectralGateBlock(), _SpectralGateBlock())
    twin = nn.Sequential(_SpectralGateBlock(), _SpectralGateBlock())
    twin.load_state_dict(model.state_dict())
    before = snapshot(model)
    assert [s.name for s in mr.find_routers(model)] == ["0.gate", "1.gate"]
    assert_untouched(model, before)
    x = torch.randn(5, 16)
    with mr.attach(model) as session:
        with session.capture():
            y = model(x)
        assert torch.equal(y, twin(x))  # the same power iteration as the model's own forward
        with session.replay(session.routes()):
            assert torch.equal(model(x), twin(x))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


class _ForwardingRouter(nn.Module):
    """A router that keeps its numbers in a dict and forwards attribute reads to it (as wrappers and config
    proxies do), beside one that says k through a property of its class."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 8, bias=False)
        self.numbers = {"top_k": 3, "num_experts": 8}

    def __getattr__(self, name: str) -> object:
        numbers = self.__dict__.get("numbers", {})
        return numbers[name] if name in numbers else super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(self.gate(x).softmax(-1), 3, dim=-1)


class _PropertyRouter(_TemperatureRouter):
    @property
    def top_k(self) -> int:
        return 2


def test_numbers_a_router_gives_through_its_own_getattr_or_a_class_property_are_read() -> None:
    """Discovery reads k and E from a module's own attributes and class without nn.Module's ``__getattr__`` (whose
    misses raise at every attach); a class with a ``__getattr__`` of its own is still asked."""
    forwarding = _TemperatureBlock()
    forwarding.router = _ForwardingRouter()
    assert [(s.num_experts, s.top_k) for s in mr.find_routers(forwarding, include="router")] == [(8, 3)]
    by_property = _TemperatureBlock()
    by_property.router = _PropertyRouter()
    assert [s.top_k for s in mr.find_routers(by_property, include="router")] == [2]


def test_discovery_asks_no_plain_module_for_a_number_it_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name discovery reads k or E under was looked up through nn.Module's ``__getattr__`` on every module,
    each miss raising an AttributeError: thousands per attach of a large model, at every attach."""
    from moe_replay import discovery

    asked: list[str] = []
    plain = nn.Module.__getattr__

    def counting(self: nn.Module, name: str) -> object:
        asked.append(name)
        return plain(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", counting)
    monkeypatch.setattr(discovery, "_MODULE_GETATTR", counting, raising=False)
    model = mr.models.build("softmax_topk")
    assert mr.find_routers(model)
    numbers = set(discovery._EXPERT_KEYS) | set(discovery._TOPK_KEYS)
    assert not numbers & set(asked)


@pytest.mark.parametrize("spec", [[], (), set()], ids=["list", "tuple", "set"])
def test_an_empty_exclude_list_excludes_nothing(spec: object) -> None:
    """A list of exclusions built by the caller may come out empty: it then excludes nothing, as ``None`` does."""
    model = mr.models.build("linear_gate")
    expected = [s.name for s in mr.find_routers(model)]
    assert expected and [s.name for s in mr.find_routers(model, exclude=spec)] == expected
    with mr.attach(model, exclude=spec) as session:
        assert list(session.names) == expected


class _DeclaringLayer(nn.Module):
    """An MoE layer fed logits by the gate beside it, its experts in plain lists (as text-generation-inference's
    ``DenseMoELayer``), declaring what ``attrs`` say."""

    def __init__(self, **attrs: int) -> None:
        super().__init__()
        for key, value in attrs.items():
            setattr(self, key, value)

    def forward(self, x: torch.Tensor, gating_output: torch.Tensor) -> torch.Tensor:
        w, idx = gating_output.softmax(-1).topk(2, dim=-1)
        return x * w.sum(-1, keepdim=True) + idx.sum(-1, keepdim=True)


class _GateBesideLayer(nn.Module):
    def __init__(self, width: int = 8, **attrs: int) -> None:
        super().__init__()
        self.gate = nn.Linear(16, width, bias=False)
        self.moe = _DeclaringLayer(**attrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x, self.gate(x))


def test_a_gate_beside_a_layer_declaring_its_expert_count_and_k_is_found() -> None:
    """A gate as wide as the expert count that the module beside it declares, with a k, is a router (its logits
    feed that MoE layer); a module declaring only a count, or another count than the gate's width, or one holding a
    router of its own (an MoE block beside a gate that feeds something else), makes no gate a router."""
    found = mr.find_routers(nn.ModuleList([_GateBesideLayer(n_experts=8, topk=2)]))
    assert [(s.name, s.num_experts) for s in found] == [("0.gate", 8)]
    own_router = _GateBesideLayer(n_experts=8, topk=2)
    own_router.moe.router = nn.Linear(16, 8, bias=False)  # (never run: only what the block holds counts here)
    for model in (_GateBesideLayer(n_experts=8), _GateBesideLayer(width=6, n_experts=8, topk=2), own_router):
        with pytest.raises(mr.MoEReplayError, match="no MoE router found"):
            mr.find_routers(nn.ModuleList([model]))
