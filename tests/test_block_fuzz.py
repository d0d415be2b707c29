"""MoE blocks written from random parts around a drawn router: every replay is exact, or refused.

``tests/test_router_fuzz.py`` draws the router; here the block around it is drawn too: a shared expert
beside the routed ones (with or without its own sigmoid gate, as Qwen2-MoE has), a capacity that drops
the tokens over it after the choice (Switch and DeepSpeed: a later choice made from the decision), jitter
noise on the router's input in training mode, a padding mask (the router called on ``h[mask]``), the
dispatch written HF-style (``one_hot(idx).permute``, ``index_add_``), as a loop over the slots or as a dense
einsum, the router's result returned as a tuple, a dict, a namedtuple or a dataclass, two routers in one
layer (an attention-MoE and an FFN-MoE), the router run under ``torch.autocast`` in bfloat16, the weights
scaled by a ``routed_scaling_factor`` and a top-k renormalisation computed in float32 then cast back.

A capture must record each router's choice; a replay on other inputs and other gate weights must force
those experts, the combine weights recomputed from the current scores: its output and gradients are
compared with the block written out by hand (the same capacity rule, the same mask, the same noise) that
never calls moe_replay. Where the library cannot prove a decision it must refuse; anything else is a
silent failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, examples, snapshot, tried
from .test_router_fuzz import HIDDEN, FuzzRouter, Spec, _common, _group_masked, _scores, _weights, specs

SHARED = ("none", "plain", "gated")
DISPATCHES = ("loop", "hf", "dense")
FORMS = ("tuple", "dict", "namedtuple", "dataclass")
JITTER = 0.2

RouterOut = namedtuple("RouterOut", ["weights", "experts"])


@dataclass
class RouterResult:
    """A router's result as a dataclass."""

    weights: torch.Tensor
    experts: torch.Tensor


@dataclass(frozen=True)
class BlockSpec:
    """One drawn block (its routers drawn by ``test_router_fuzz.specs``)."""

    router: Spec
    moa_router: Spec | None  # a second router in the layer (an attention-MoE before the FFN-MoE)
    shared: str
    capacity: float  # 0: no capacity; else the capacity factor (tokens over it dropped after the choice)
    capacity_in_router: bool  # the drop made in the router's forward (DeepSpeed's gate), not in the block
    jitter: bool  # multiplicative noise on the router's input, in training mode
    jitter_in_router: bool  # the noise drawn in the router's forward (Switch), not in the block
    mask: bool  # a padding mask: the router sees only the tokens it keeps
    dispatch: str
    form: str
    autocast: bool
    routed_scaling: float
    renorm_f32: bool


def _router_spec(spec: Spec, masked: bool) -> Spec:
    """The drawn router made to return weights and experts (the block unpacks them), in float32 (the block's
    autocast makes bfloat16), flat where a mask hands it the kept tokens."""
    returns = spec.returns if spec.returns != "dense" else "w_idx"
    return dataclasses.replace(spec, returns=returns, dtype="float32", batched=spec.batched and not masked)


@st.composite
def block_specs(draw: st.DrawFn) -> BlockSpec:
    mask = draw(st.booleans())
    router = _router_spec(draw(specs()), mask)
    attn = _router_spec(draw(specs()), mask) if draw(st.booleans()) else None
    positive = router.scoring != "logits" or router.weighting == "softmax_values"
    return BlockSpec(
        router=router,
        moa_router=attn,
        shared=draw(st.sampled_from(SHARED)),
        capacity=draw(st.sampled_from((0.0, 0.0, 0.75, 1.25))),
        capacity_in_router=draw(st.booleans()),
        jitter=draw(st.booleans()),
        jitter_in_router=draw(st.booleans()),
        mask=mask,
        dispatch=draw(st.sampled_from(DISPATCHES)),
        form=draw(st.sampled_from(FORMS)),
        autocast=draw(st.booleans()),
        routed_scaling=draw(st.sampled_from((1.0, 1.0, 2.5))),
        renorm_f32=positive and not router.normalize and router.k > 1 and draw(st.booleans()),
    )


class BlockRouter(FuzzRouter):
    """A drawn router whose weights may be renormalised in float32 and scaled, returned in the form drawn."""

    def __init__(self, spec: Spec, seed: int, block: BlockSpec) -> None:
        super().__init__(spec, seed)
        self.form = block.form
        self.renorm_f32 = block.renorm_f32
        self.routed_scaling_factor = block.routed_scaling
        self.capacity_factor = block.capacity if block.capacity_in_router else 0.0
        self.jitter_noise = JITTER if block.jitter and block.jitter_in_router else 0.0

    def forward(self, h: torch.Tensor) -> object:
        if self.training and self.jitter_noise:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        got = super().forward(h)
        weights, idx = _unpack(self.spec.returns, got)
        if self.renorm_f32:
            weights = (weights.float() / weights.float().sum(dim=-1, keepdim=True)).to(weights.dtype)
        weights = weights * self.routed_scaling_factor
        if self.capacity_factor:
            flat = idx.reshape(-1, idx.shape[-1])
            weights = weights * _capacity_keep(flat, self.spec.experts, self.capacity_factor).reshape(idx.shape)
        if self.form == "dict":
            return {"topk_weights": weights, "topk_ids": idx}
        if self.form == "namedtuple":
            return RouterOut(weights, idx)
        if self.form == "dataclass":
            return RouterResult(weights, idx)
        return weights, idx


def _unpack(returns: str, got: object) -> tuple[torch.Tensor, torch.Tensor]:
    if returns == "w_idx":
        weights, idx = got  # type: ignore[misc]
    elif returns == "idx_w":
        idx, weights = got  # type: ignore[misc]
    elif returns == "logits_w_idx":
        _, weights, idx = got  # type: ignore[misc]
    else:
        weights, idx = got["weights"], got["experts"]  # type: ignore[index]
    return weights, idx


def _from_form(form: str, got: object) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "dict":
        return got["topk_weights"], got["topk_ids"]  # type: ignore[index]
    if form in ("namedtuple", "dataclass"):
        return got.weights, got.experts  # type: ignore[attr-defined]
    return got  # type: ignore[return-value]


def _capacity_keep(idx: torch.Tensor, experts: int, factor: float) -> torch.Tensor:
    """Switch/DeepSpeed capacity: each expert takes at most ``ceil(factor * T * k / E)`` of the token-slots, the
    first slot of every token first, then in token order; the rest are dropped (a boolean ``[T, k]``)."""
    tokens, k = idx.shape
    cap = max(1, math.ceil(factor * tokens * k / experts))
    onehot = F.one_hot(idx.t().reshape(-1), experts)  # [k*T, E], slot-major
    position = (onehot.cumsum(0) - 1) * onehot
    kept = ((position < cap) & (onehot > 0)).any(-1)
    return kept.reshape(k, tokens).t()


class Experts(nn.Module):
    """Linear experts with a tanh, dispatched in one of three ways."""

    def __init__(self, experts: int, dispatch: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(experts, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
        self.dispatch = dispatch

    def forward(self, h: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        experts = self.weight.shape[0]
        if self.dispatch == "loop":
            out = torch.zeros_like(h)
            for j in range(idx.shape[-1]):
                out = out + weights[:, j, None] * torch.tanh(torch.einsum("th,thd->td", h, self.weight[idx[:, j]]))
            return out
        if self.dispatch == "hf":
            out = torch.zeros_like(h)
            expert_mask = F.one_hot(idx, num_classes=experts).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for e in hit:
                slot, tok = torch.where(expert_mask[e[0]])
                cur = torch.tanh(h[tok] @ self.weight[e[0]]) * weights[tok, slot, None]
                out.index_add_(0, tok, cur.to(out.dtype))
            return out
        dense = torch.zeros(h.shape[0], experts, dtype=weights.dtype).scatter_add(-1, idx, weights)
        every = torch.tanh(torch.einsum("th,ehd->ted", h, self.weight))
        return torch.einsum("te,ted->td", dense.to(h.dtype), every)


class FuzzMoEBlock(nn.Module):
    """A residual layer of one or two MoEs: (an attention-MoE, then) an FFN-MoE with an optional shared expert."""

    def __init__(self, block: BlockSpec, seed: int) -> None:
        super().__init__()
        self.block = block
        self.router = BlockRouter(block.router, seed, block)
        self.experts = Experts(block.router.experts, block.dispatch, seed + 1000)
        if block.moa_router is not None:
            self.moa_router = BlockRouter(block.moa_router, seed + 500, block)
            self.moa_experts = Experts(block.moa_router.experts, block.dispatch, seed + 1500)
        if block.shared != "none":
            g = torch.Generator().manual_seed(seed + 2000)
            self.shared_expert = nn.Linear(HIDDEN, HIDDEN, bias=False)
            with torch.no_grad():
                self.shared_expert.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
            if block.shared == "gated":
                self.shared_expert_gate = nn.Linear(HIDDEN, 1, bias=False)
                with torch.no_grad():
                    self.shared_expert_gate.weight.copy_(torch.randn(1, HIDDEN, generator=g))

    def _moe(self, x: torch.Tensor, mask: torch.Tensor, router: BlockRouter, experts: Experts) -> torch.Tensor:
        block = self.block
        h = x.reshape(-1, HIDDEN)
        if block.mask:
            h = h[mask.reshape(-1)]
        r = h if block.mask or not router.spec.batched else x
        if block.jitter and not block.jitter_in_router and self.training:
            r = r * torch.empty_like(r).uniform_(1.0 - JITTER, 1.0 + JITTER)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if block.autocast else contextlib.nullcontext()
        with autocast:
            got = router(r)
        weights, idx = _from_form(block.form, got)
        weights, idx = weights.reshape(h.shape[0], -1).to(h.dtype), idx.reshape(h.shape[0], -1)
        if block.capacity and not block.capacity_in_router:
            weights = weights * _capacity_keep(idx, router.spec.experts, block.capacity)
        y = experts(h, weights, idx)
        if block.mask:
            y = torch.zeros(x.numel() // HIDDEN, HIDDEN, dtype=y.dtype).index_put((mask.reshape(-1),), y)
        return y.reshape(x.shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.block.moa_router is not None:
            x = x + self._moe(x, mask, self.moa_router, self.moa_experts)
        y = self._moe(x, mask, self.router, self.experts)
        if self.block.shared != "none":
            s = torch.tanh(self.shared_expert(x))
            if self.block.shared == "gated":
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            y = y + s
        return x + y


class FuzzMoEModel(nn.Module):
    def __init__(self, block: BlockSpec, layers: int, seed: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FuzzMoEBlock(block, seed + 10 * i) for i in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ----------------------------------------------------------------------------- the block written out by hand


def _logits(router: FuzzRouter, h: torch.Tensor) -> torch.Tensor:
    """The router's logits, made with the same op as the router (under autocast the op decides the rounding)."""
    if router.spec.gate == "einsum":
        return torch.einsum("...h,eh->...e", h, router.gate_weight())
    return F.linear(h, router.gate_weight())


def _ref_router(
    router: BlockRouter, r: torch.Tensor, forced: torch.Tensor | None, autocast: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router by hand: its weights and experts (``forced``, or its own choice), its own choice and its
    selection scores."""
    spec = router.spec
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        scores = _scores(spec, _logits(router, r))
        select = scores + router.e_score_correction_bias if spec.bias else scores
        scores, select = scores.reshape(-1, spec.experts), select.reshape(-1, spec.experts)
        own = torch.sort(_group_masked(spec, select), dim=-1, descending=True, stable=True).indices[:, : spec.k]
        idx = own if forced is None else forced.to(torch.long)
        weights = _weights(spec, scores, select.gather(-1, idx), idx)
        if router.renorm_f32:
            weights = (weights.float() / weights.float().sum(dim=-1, keepdim=True)).to(weights.dtype)
        weights = weights * router.routed_scaling_factor
    return weights, idx, own, select


def _reference(
    model: FuzzMoEModel, x: torch.Tensor, mask: torch.Tensor, forced: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's forward by hand (the noise drawn in the same order): with ``forced`` experts per router name;
    without, each router's own choice. Returns the output, each router's own choice on the input it saw and its
    selection scores."""
    own: dict[str, torch.Tensor] = {}
    selects: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        block = layer.block
        parts = [("moa_router", layer.moa_router, layer.moa_experts)] if block.moa_router is not None else []
        parts.append(("router", layer.router, layer.experts))
        ys = []
        for part, router, experts in parts:
            name = f"layers.{i}.{part}"
            h = x.reshape(-1, HIDDEN)
            keep = mask.reshape(-1)
            hr = h[keep] if block.mask else h
            r = (
                hr * torch.empty_like(hr).uniform_(1.0 - JITTER, 1.0 + JITTER)
                if block.jitter and model.training
                else hr
            )
            choice = None if forced is None else forced[name]
            weights, idx, own[name], selects[name] = _ref_router(router, r, choice, block.autocast)
            weights = weights.to(h.dtype)
            if block.capacity:
                weights = weights * _capacity_keep(idx, router.spec.experts, block.capacity)
            # (the block's own dispatch, which decides nothing: another way of summing rounds the gradients of a
            # renormalised log-softmax, a small difference of large terms, otherwise)
            y = experts(hr, weights, idx)
            if block.mask:
                y = torch.zeros_like(h).index_put((keep,), y)
            y = y.reshape(x.shape)
            if part == "moa_router":
                x = x + y
            else:
                ys.append(y)
        y = ys[0]
        if block.shared != "none":
            s = torch.tanh(x @ layer.shared_expert.weight.t())
            if block.shared == "gated":
                s = torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * s
            y = y + s
        x = x + y
    return x, own, selects


def _router_names(model: FuzzMoEModel) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BlockRouter)]


def _perturb(model: FuzzMoEModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BlockRouter):
                target = m.gate.parametrizations.weight.original if m.spec.gate == "parametrized" else m.gate_weight()
                target.add_(torch.randn(target.shape, generator=g) * 1.5)


def _close(a: torch.Tensor, b: torch.Tensor, loose: bool) -> bool:
    tol = 3e-2 if loose else 1e-4
    a, b = a.detach().float(), b.detach().float()
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 + tol * b.abs().max())


def _is_top_k(recorded: torch.Tensor, select: torch.Tensor, spec: Spec) -> bool:
    """Are ``recorded`` the best ``k`` of ``select`` up to bfloat16 rounding (autocast rounds otherwise)?"""
    select = select.float()
    if spec.choice == "grouped":  # (tipped groups are rounding too: judged within the groups chosen)
        per = spec.experts // spec.groups
        kept = torch.zeros(select.shape[0], spec.groups, dtype=torch.bool).scatter(-1, recorded // per, True)
        if bool((kept.sum(-1) > spec.topk_group).any()):
            return False
        select = select.masked_fill(~kept.repeat_interleave(per, dim=-1), float("-inf"))
    chosen = select.gather(-1, recorded).amin(-1)
    rest = select.scatter(-1, recorded, float("-inf")).amax(-1)
    return bool((chosen >= rest - 0.05 * select.abs().amax(-1) - 1e-3).all())


def _as_sets(idx: torch.Tensor) -> torch.Tensor:
    return idx.to(torch.long).sort(dim=-1).values


def run_block(block: BlockSpec, seed: int, grad: bool) -> tuple[str, str]:
    """Capture, then replay on other inputs and gates; compare with the block by hand. Returns ``("exact", "")``
    or ``("refused", message)``; a silent failure fails an assertion."""
    model = FuzzMoEModel(block, layers=2, seed=seed)
    model.train(block.jitter)
    g = torch.Generator().manual_seed(seed + 7)
    x1 = torch.randn(2, 5, HIDDEN, generator=g)
    x2 = torch.randn(2, 5, HIDDEN, generator=g)
    mask = torch.rand(2, 5, generator=g) < 0.7 if block.mask else torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = True  # (every sequence keeps a token)
    loose = block.autocast
    names = _router_names(model)
    session = None
    try:
        session = mr.attach(model)
        torch.manual_seed(seed)
        with torch.no_grad(), session.capture():
            out1 = model(x1, mask)
        routes = session.routes()
        assert sorted(routes.names) == sorted(names), f"routers found {routes.names}, the block has {names}"
        recorded = dict(zip(routes.names, routes.per_layer(), strict=True))
        torch.manual_seed(seed)
        with torch.no_grad():  # (each router judged on the input it saw: a capacity's drops follow the slot order)
            want1, own, selects = _reference(model, x1, mask, recorded)
        for name in names:
            if loose:
                spec = model.get_submodule(name).spec
                ok = _is_top_k(recorded[name].to(torch.long), selects[name], spec)
                assert ok, f"{name}: the capture recorded experts that are not the router's best"
            else:
                # (the same experts, or others tied with them: a saturated sigmoid makes many scores exactly 1)
                rows, mine = recorded[name].to(torch.long), own[name]
                same = torch.equal(_as_sets(rows), _as_sets(mine)) or torch.equal(
                    selects[name].gather(-1, rows).sort(-1).values, selects[name].gather(-1, mine).sort(-1).values
                )
                assert same, f"{name}: other experts recorded"
        assert _close(out1, want1, loose), "the capture changed the model's output"
        torch.manual_seed(seed)
        with torch.no_grad(), session.replay(routes):  # (the forward's own choice, in its own slot order)
            again = model(x1, mask)
        assert torch.equal(again, out1), "a replay of the forward's own choice changed its output"
        _perturb(model, seed + 1)
        moved = snapshot(model)
        params = [p for p in model.parameters() if p.requires_grad]
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        torch.manual_seed(seed + 3)
        with ctx, session.replay(routes):
            out2 = model(x2, mask)
        torch.manual_seed(seed + 3)
        with ctx:
            want2 = _reference(model, x2, mask, recorded)[0]
        assert _close(out2, want2, loose), "the replay did not force the recorded experts"
        if grad:
            got = torch.autograd.grad(out2.square().sum(), params, allow_unused=True)
            want = torch.autograd.grad(want2.square().sum(), params, allow_unused=True)
            for a, b in zip(got, want, strict=True):
                assert (a is None) == (b is None), "a gradient the hand-written block has is missing, or extra"
                if a is not None:
                    assert _close(a, b, loose), "the replay's gradients differ"
        session.detach()
        session = None
        assert_untouched(model, moved)
        return "exact", ""
    except mr.MoEReplayError as e:
        if session is not None:
            session.detach()
        for name, m in model.named_modules():
            assert "forward" not in m.__dict__, f"a refusal left a forward override on '{name}'"
            assert not m._forward_hooks and not m._forward_pre_hooks, f"a refusal left hooks on '{name}'"
        return "refused", f"{type(e).__name__}: {e}"


@pytest.mark.reliability("silent replays")
@examples(20)
@given(block=block_specs(), seed=st.integers(0, 2**16), grad=st.booleans())
def test_a_block_of_random_parts_replays_exactly_or_is_refused(block: BlockSpec, seed: int, grad: bool) -> None:
    """Shared experts, capacity, jitter, masks, dispatches, result forms, two routers, autocast, scaling: each
    drawn block's replay forces the recorded experts with weights from the current scores, or is refused."""
    tried()
    run_block(block, seed, grad)


def _plain(**changes: object) -> BlockSpec:
    router = _common(normalize=False)
    base = BlockSpec(
        router=router,
        moa_router=None,
        shared="none",
        capacity=0.0,
        capacity_in_router=False,
        jitter=False,
        jitter_in_router=False,
        mask=False,
        dispatch="loop",
        form="tuple",
        autocast=False,
        routed_scaling=1.0,
        renorm_f32=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


#: one part of a common MoE block at a time around a plain softmax top-k router: each must replay, not be refused
COMMON_BLOCKS: dict[str, BlockSpec] = {
    "shared expert": _plain(shared="plain"),
    "gated shared expert": _plain(shared="gated"),
    "capacity in the block": _plain(capacity=0.75),
    "capacity in the router": _plain(capacity=0.75, capacity_in_router=True),
    "jitter in training": _plain(jitter=True),
    "jitter in the router": _plain(jitter=True, jitter_in_router=True),
    "padding mask": _plain(mask=True),
    "HF dispatch": _plain(dispatch="hf"),
    "dense einsum dispatch": _plain(dispatch="dense"),
    "namedtuple": _plain(form="namedtuple"),
    "dataclass": _plain(form="dataclass"),
    "dict": _plain(form="dict"),
    "two routers": _plain(moa_router=_plain().router),
    "autocast bfloat16": _plain(autocast=True),
    "routed scaling factor": _plain(routed_scaling=2.5),
    "renormalised in float32": _plain(renorm_f32=True),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(COMMON_BLOCKS))
def test_common_block_parts_replay_exactly(case: str) -> None:
    """One common part of an MoE block at a time: each replays exactly, outputs and gradients (no refusal)."""
    tried()
    assert run_block(COMMON_BLOCKS[case], seed=3, grad=True) == ("exact", "")


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("seed", [2, 3, 319])
def test_a_stable_softmax_over_logits_tens_apart_replays_exactly(seed: int) -> None:
    """Once a false refusal: a stable softmax (``(x - max).exp()``, normalised) over logits made large (a doubled
    gate, a scale of 2.5, a routed scaling in the layer before) was refused as a mask chosen by the values of its
    ``max``: moved to another row's maximum, tens away, the exponentials of probabilities of 1e-5 underflowed to 0,
    which no mask had made. A moved value now moves by at most 16 in float32."""
    tried()
    router = dataclasses.replace(
        _plain().router,
        experts=10,
        k=2,
        scoring="stable_softmax",
        normalize=True,
        scale=2.5,
        gate="parametrized",
        choice="method_topk",
        weighting="gather",
    )
    assert run_block(_plain(router=router, routed_scaling=2.5), seed=seed, grad=True) == ("exact", "")


class AttentionRouter(FuzzRouter):
    """The router of an attention-MoE (MoA / SwitchHead-style: it picks attention experts)."""


class _AttnRouterBlock(nn.Module):
    """An attention-MoE router held as ``attn_router`` beside an FFN router."""

    def __init__(self) -> None:
        super().__init__()
        spec = _plain().router
        self.attn_router = AttentionRouter(spec, 1)
        self.router = FuzzRouter(spec, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        wa, ia = self.attn_router(h)
        wf, i_f = self.router(h)
        return h * (wa.sum(-1, keepdim=True) + wf.sum(-1, keepdim=True)) + ia.sum() + i_f.sum()


@pytest.mark.reliability("silent replays")
def test_a_router_named_attn_router_is_found_and_both_routers_replay_exactly() -> None:
    """Once a false refusal: a router held as ``attn_router`` (class ``AttentionRouter``) was passed over, ``attn``
    naming attention, and the capture refused as deciding outside every attached router. It is found beside the FFN
    router, and a replay after both routers' weights changed forces the experts each chose at the capture."""
    tried()
    model = nn.Sequential(_AttnRouterBlock())
    assert [site.name for site in mr.find_routers(model)] == ["0.attn_router", "0.router"]
    h = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(0))
    used: dict[str, list[torch.Tensor]] = {"attn_router": [], "router": []}
    block = model[0]
    for name in used:  # the experts each router handed on, seen by a hook of the test's own
        getattr(block, name).register_forward_hook(lambda m, a, out, name=name: used[name].append(out[1].clone()))
    with mr.attach(model) as session:
        with session.capture():
            model(h)
        routes = session.routes()
        with torch.no_grad():
            for name in used:
                getattr(block, name).gate_weight().mul_(-1.0)  # every token would choose other experts
        with session.replay(routes):
            model(h)
    for name, (captured, replayed) in used.items():
        recorded = routes.layer(f"0.{name}").long()
        assert torch.equal(captured.sort(-1).values, recorded.sort(-1).values)
        assert torch.equal(replayed.sort(-1).values, recorded.sort(-1).values)
        assert not torch.equal(block_choice(getattr(block, name), h).sort(-1).values, recorded.sort(-1).values)


def block_choice(router: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts ``router`` chooses for ``h`` now, with no session attached."""
    return router(h)[1]


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="false refusal: noise drawn before the decision (Switch's jitter in the router) on large activations "
    "(bfloat16 autocast) is refused as a random choice after the decision: which held weights are zero moves with "
    "the noise (underflow, it seems), though the refusal itself advises drawing noise before the decision",
)
def test_jitter_before_the_decision_on_large_activations_is_not_refused() -> None:
    """Jitter in the router's forward, before its top-k: the decision held, its weights move with the noise, but
    no second choice is made; the second layer's large inputs once had the block refused (seed 256)."""
    tried()
    router = dataclasses.replace(
        _plain().router, experts=6, k=1, gate="einsum", scoring="softmax", k_place="top_k", normalize=False
    )
    moa = dataclasses.replace(
        _plain().router,
        experts=7,
        k=1,
        scoring="logits",
        choice="argmax",
        scale=2.5,
        k_place="literal",
        gate="parametrized",
        returns="idx_w",
        batched=True,
    )
    block = _plain(router=router, moa_router=moa, jitter=True, jitter_in_router=True, form="dataclass", autocast=True)
    assert run_block(block, seed=256, grad=False) == ("exact", "")
