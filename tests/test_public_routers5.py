"""Router code of more public MoE papers and libraries, with zero configuration (see ``test_public_routers4``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). The
rule checked: a replay is proven exact (the experts used are the recorded ones, and the output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, E, Experts, RouterBlock, T, TwoLayers, dispatch, perturb
from tests.test_public_routers2 import _Forced, _forced_by_hand, _x, assert_replay_is_forced_by_hand
from tests.test_public_routers4 import HyperlessGate


class _MLP(nn.Module):
    """A small MLP (a dense or shared expert), bounded so that perturbed weights keep its output finite."""

    def __init__(self, width: int = 2 * D) -> None:
        super().__init__()
        self.up = nn.Linear(D, width, bias=False)
        self.down = nn.Linear(width, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


# ----------------------------------------------------------------------- static buffers: out= of a decision call
class OutBufferTopKRouter(_Forced):
    """CUDA-graph-friendly inference code (SGLang/vLLM style): the top-k written with ``out=`` into views of
    preallocated buffers (``self.topk_ids[:n]``) under ``no_grad``; the router reads the indices from its buffer, the
    weights a gather of the probabilities at them (so the gate still learns), renormalised."""

    def __init__(self, max_tokens: int = 64) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("topk_values", torch.zeros(max_tokens, 2), persistent=False)
        self.register_buffer("topk_ids", torch.zeros(max_tokens, 2, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        n = x.shape[0]
        if self.forced is None:
            with torch.no_grad():
                torch.topk(probs, self.top_k, dim=-1, out=(self.topk_values[:n], self.topk_ids[:n]))
            idx = self.topk_ids[:n]
        else:
            idx = self.forced
        w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


class OutBufferMaxRouter(_Forced):
    """The top-1 counterpart: ``torch.max(logits, -1, out=(values, indices))`` into whole preallocated buffers, the
    weight the sigmoid of the chosen logit (a gather)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 1
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("best", torch.zeros(T), persistent=False)
        self.register_buffer("best_id", torch.zeros(T, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.forced is None:
            with torch.no_grad():
                torch.max(logits, -1, out=(self.best, self.best_id))
            idx = self.best_id[:, None]
        else:
            idx = self.forced
        return torch.sigmoid(logits.gather(1, idx)), idx


class OutFormRouter(_Forced):
    """Other ``out=`` forms: a top-k into fresh empty tensors that torch resizes (``resize``), an ``argmax`` into
    one (``argmax``); the weights a gather of the probabilities, renormalised."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.num_experts, self.top_k = E, 1 if form == "argmax" else 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        idx = torch.empty(0, dtype=torch.long) if self.forced is None else self.forced
        if self.forced is None:
            with torch.no_grad():
                if self.form == "argmax":
                    torch.argmax(probs, dim=-1, keepdim=True, out=idx)
                else:
                    torch.topk(probs, self.top_k, out=(torch.empty(0), idx))
        w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


# ----------------------------------------------------------------------- LongCat-Flash: zero-computation experts
class LongCatRouter(_Forced):
    """meituan-longcat LongCat-Flash's router: a softmax over ``E`` real and ``Z`` zero-computation experts, a top-k
    of the scores plus a balancing bias, the weights the unbiased scores times a scaling factor."""

    def __init__(self, zero: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k = E + zero, 2
        self.classifier = nn.Linear(D, E + zero, bias=False)
        self.register_buffer("e_score_correction_bias", torch.linspace(-0.3, 0.3, E + zero))
        self.routed_scaling_factor = 2.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.classifier(x).softmax(-1)
        if self.forced is None:
            _, topk_ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)
        else:
            topk_ids = self.forced.clone()  # (what a top-k gives: a tensor of the caller's own)
        return scores.gather(1, topk_ids) * self.routed_scaling_factor, topk_ids


class LongCatZeroExpertMoE(nn.Module):
    """LongCat-Flash's MoE as inference engines run it: the zero experts' weight adds an identity term, then, in
    place on the indices the router returned, every zero expert's slot is set to expert 0 (``topk_ids[mask] = 0``)
    with weight 0 before the real experts are dispatched (with gradients on a copy: autograd saved the indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = LongCatRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.router(x)
        zero_mask = topk_ids >= E
        identity = x * (topk_weights * zero_mask).sum(-1, keepdim=True)
        if torch.is_grad_enabled():
            topk_ids = topk_ids.clone()
        topk_ids[zero_mask] = 0
        topk_weights = topk_weights.masked_fill(zero_mask, 0.0)
        return identity + dispatch(self.experts, x, topk_ids, topk_weights)


# ----------------------------------------------------------------------- hierarchical MoE (Shazeer et al. 2017)
class HierarchicalGate(_Forced):
    """A noisy-top-k-free gate of Shazeer et al. 2017's hierarchical MoE: softmax of the top-k logits."""

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = n, k
        self.w_gate = nn.Linear(D, n, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_gate(x)
        if self.forced is None:
            top, idx = logits.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            top = logits.gather(1, idx)
        return top.softmax(-1), idx


class HierarchicalMoE(nn.Module):
    """Shazeer et al. 2017, section B: a primary gate picks one of ``groups`` groups per token; each group's
    secondary gate (its own) picks the top-2 of that group's experts among the tokens sent to it, a data-dependent
    subset of the batch."""

    def __init__(self, groups: int = 3) -> None:
        super().__init__()
        self.primary = HierarchicalGate(groups, 1)
        self.secondary = nn.ModuleList(HierarchicalGate(E, 2) for _ in range(groups))
        self.experts = nn.ModuleList(Experts() for _ in range(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_w, g_idx = self.primary(x)
        out = torch.zeros_like(x)
        for g, (gate, experts) in enumerate(zip(self.secondary, self.experts, strict=True)):
            tok = (g_idx[:, 0] == g).nonzero()[:, 0]
            if tok.numel():
                w, idx = gate(x[tok])
                out = out.index_add(0, tok, g_w[tok] * dispatch(experts, x[tok], idx, w))
        return out


# ----------------------------------------------------------------------- ERNIE 4.5 VL: modality-isolated routers
class ErnieGate(_Forced):
    """ERNIE 4.5's gate: softmax in float32, a top-k of the probabilities plus a balancing bias, the weights the
    probabilities at the chosen experts divided by their sum clamped from below."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.weight = nn.Parameter(torch.randn(E, D) * D**-0.5)
        self.register_buffer("e_score_correction_bias", torch.linspace(0.0, 0.2, E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.float(), self.weight.float()).softmax(-1)
        if self.forced is None:
            _, idx = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        else:
            idx = self.forced
        w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True).clamp(min=1e-12), idx


class ErnieModalityIsolatedMoE(nn.Module):
    """PaddlePaddle ERNIE 4.5 VL: text and vision tokens of one sequence go to their own router and experts
    (selected by a token-type mask), a shared expert sees every token."""

    def __init__(self) -> None:
        super().__init__()
        self.text_gate, self.vision_gate = ErnieGate(), ErnieGate()
        self.text_experts, self.vision_experts = Experts(), Experts()
        self.shared_experts = _MLP()

    def forward(self, x: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        out = self.shared_experts(x)
        for kind, gate, experts in ((0, self.text_gate, self.text_experts), (1, self.vision_gate, self.vision_experts)):
            tok = (token_type_ids == kind).nonzero()[:, 0]
            w, idx = gate(x[tok])
            out = out.index_add(0, tok, dispatch(experts, x[tok], idx, w.to(x.dtype)))
        return out


class ErnieVL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([ErnieModalityIsolatedMoE(), ErnieModalityIsolatedMoE()])
        self.register_buffer("token_type_ids", (torch.arange(T) % 3 == 1).long())  # an image patch every 3 tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, self.token_type_ids)
        return x


# ----------------------------------------------------------------------- Snowflake Arctic: dense + MoE residual
class ArcticGate(HyperlessGate):
    """Arctic's gate: Mixtral's (softmax, top-2, renormalised)."""


class ArcticBlock(nn.Module):
    """Snowflake Arctic: a dense transformer's MLP and a top-2 MoE in parallel (the residual MoE), on one normed
    input; only every other layer has the MoE (``moe_layer_frequency=2``)."""

    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.residual_mlp = _MLP()
        self.block_sparse_moe = RouterBlock(ArcticGate()) if moe else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out = self.residual_mlp(h)
        if self.block_sparse_moe is not None:
            out = out + self.block_sparse_moe(h)
        return x + out


class Arctic(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(ArcticBlock(moe=i % 2 == 1) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------- RMoE: a router with a state across layers
class RecurrentRouter(_Forced):
    """Qiu et al. 2024 (Layerwise Recurrent Router, RMoE): a GRU cell shared by the layers carries a router state;
    each layer's router scores its projection of the hidden state through the GRU with the previous layer's state,
    the top-k of the softmax renormalised."""

    def __init__(self, gru: nn.GRUCell) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.proj = nn.Linear(D, 8, bias=False)
        self.gru = [gru]  # shared, held outside the module tree so it is one module of the model
        self.gate = nn.Linear(8, E, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.gru[0](self.proj(x), state)
        probs = self.gate(state).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx, state


class RMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRUCell(8, 8)
        self.routers = nn.ModuleList(RecurrentRouter(self.gru) for _ in range(2))
        self.experts = nn.ModuleList(Experts() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(x.shape[0], 8)
        for router, experts in zip(self.routers, self.experts, strict=True):
            w, idx, state = router(x, state)
            x = x + dispatch(experts, x, idx, w)
        return x


# ----------------------------------------------------------------------- routing by cost: a top-k of the smallest
class CostTopKRouter(_Forced):
    """Routing as clustering (e.g. optimal-transport or k-means style routers): the squared distance of the token
    to each expert's centroid, the ``k`` nearest by ``topk(largest=False)``, weighted by a softmax of the negated
    distances at them."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.centroids = nn.Parameter(torch.randn(E, D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cost = torch.cdist(x, self.centroids).square()
        if self.forced is None:
            near, idx = torch.topk(cost, self.top_k, dim=-1, largest=False)
        else:
            idx = self.forced
            near = cost.gather(1, idx)
        return (-near).softmax(-1), idx


# ----------------------------------------------------------------------- weights by masking the full softmax
class MaskedSoftmaxRouter(_Forced):
    """The chosen set's weights written as a softmax over every expert with the others masked to ``-inf`` (the
    indices scattered into a boolean mask), read back at the chosen experts (Mixtral's arithmetic, Mesh-TF's form)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        idx = logits.topk(self.top_k, dim=-1).indices if self.forced is None else self.forced
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        return logits.masked_fill(~keep, float("-inf")).softmax(-1).gather(1, idx), idx


EXACT: dict[str, tuple[Callable[[], nn.Module], bool | None, Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, the routers get gradients (None: not checked), input, attach options)
    "max-out-buffers": (lambda: TwoLayers(lambda: RouterBlock(OutBufferMaxRouter())), True, _x, {}),
    "topk-out-resized": (lambda: TwoLayers(lambda: RouterBlock(OutFormRouter("resize"))), True, _x, {}),
    "argmax-out": (lambda: TwoLayers(lambda: RouterBlock(OutFormRouter("argmax"))), True, _x, {}),
    "longcat-zero-experts-in-place": (lambda: TwoLayers(LongCatZeroExpertMoE), True, _x, {}),
    "hierarchical-moe": (lambda: TwoLayers(HierarchicalMoE), True, _x, {}),
    "ernie-modality-isolated": (ErnieVL, True, _x, {}),
    "arctic-dense-residual": (Arctic, True, _x, {}),
    "rmoe-recurrent-router": (RMoE, None, _x, {}),
    "cost-topk-smallest": (lambda: TwoLayers(lambda: RouterBlock(CostTopKRouter())), True, _x, {}),
    "masked-full-softmax": (lambda: TwoLayers(lambda: RouterBlock(MaskedSoftmaxRouter())), True, _x, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_is_the_recorded_experts_forced_by_hand(case: str) -> None:
    """A top-1 written into preallocated buffers (``out=``), a top-k and an argmax into tensors torch resizes,
    indices edited in place after the top-k (LongCat's zero experts), a two-level hierarchy whose inner gates see the
    tokens the outer one sends them, modality-isolated routers over a token-type mask (ERNIE 4.5 VL), a dense MLP
    beside the MoE (Arctic), a router state carried across layers (RMoE), the nearest experts by
    ``topk(largest=False)``, a masked full softmax: the recorded experts are the ones used, and a replay after the
    routers change is those experts forced by hand, in output and gradients."""
    make, router_grads, x, attach = EXACT[case]
    assert_replay_is_forced_by_hand(make(), x(), router_grads=router_grads, **attach)


@pytest.mark.reliability("silent replays")
def test_indices_edited_in_place_by_the_model_leave_the_routes_as_recorded() -> None:
    """LongCat's zero experts as an engine runs them (no gradients): the model writes into the indices its router
    returned. Neither the capture's routes nor the routes a replay is fed may change by it: a second replay of the
    same routes forces the very rows recorded, and gives the captured output again."""
    model = TwoLayers(LongCatZeroExpertMoE)
    ref = copy.deepcopy(model)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(_x())
        routes = session.routes()
        rows = {name: routes.layer(name).clone() for name in session.names}
        assert any(bool((r >= E).any()) for r in rows.values()), "no zero expert chosen: the case tries nothing"
        perturb(model)
        perturb(ref)
        with _forced_by_hand(ref, list(rows.values())):
            expected = ref(_x())
        for _ in range(2):
            with session.replay(routes):
                assert torch.equal(model(_x()), expected)
            for name, r in rows.items():
                assert torch.equal(routes.layer(name), r), name


# ----------------------------------------------------------------------- random draws and Python choices
class SampledRouter(_Forced):
    """A choice drawn at random from the router's distribution (no top-k):

    - ``multinomial``: RL-R routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"): the expert
      a sample of the softmax policy, ``torch.multinomial(probs, 1)``, trained by REINFORCE;
    - ``categorical``: the same through ``torch.distributions.Categorical(logits=...).sample()``;
    - ``inverse-cdf``: the same by hand, the count of the cumulative probabilities below a uniform draw;
    - ``heapq``: no draw, but the top-2 chosen in Python (``heapq.nlargest`` over ``tolist()`` rows).

    The weight the probability of the chosen expert (a gather)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.num_experts, self.top_k = E, 2 if how == "heapq" else 1
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        probs = logits.softmax(-1)
        if self.forced is not None:
            idx = self.forced
        elif self.how == "multinomial":
            idx = torch.multinomial(probs.detach(), 1)
        elif self.how == "categorical":
            idx = torch.distributions.Categorical(logits=logits.detach()).sample()[:, None]
        elif self.how == "inverse-cdf":
            u = torch.rand(x.shape[0], 1)
            idx = (probs.detach().cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=E - 1)
        else:
            rows = probs.detach().tolist()
            idx = torch.tensor([[e for e, _ in heapq.nlargest(2, enumerate(r), key=lambda p: p[1])] for r in rows])
        return probs.gather(1, idx), idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["multinomial", "categorical", "inverse-cdf", "heapq"])
def test_routers_that_choose_by_a_draw_or_in_python_are_refused(how: str) -> None:
    """A choice that no decision-like call makes: a random draw from the router's softmax (RL-R's policy,
    ``multinomial``, a ``Categorical`` sample, an inverse-CDF draw by hand) or a top-k in Python. Refused at the
    first capture, saying why, the model left as it was."""
    model = TwoLayers(lambda: RouterBlock(SampledRouter(how)))
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="makes no decision-like call"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


# ----------------------------------------------------------------------- an integer table that is no hash router
class RoutingCacheRouter(_Forced):
    """Expert-prefetching inference code: the router keeps the experts it chose at each position in an integer
    ``[max_positions, k]`` table (what to prefetch for the next step), reads the previous choice at the positions it
    is fed (``routing_cache[position_ids]``) to count how often a position's experts repeat, then takes its own
    top-k of the softmax, renormalised, and writes it into the table."""

    def __init__(self, max_positions: int = 64) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("routing_cache", torch.arange(2).repeat(max_positions, 1), persistent=False)
        self.repeat_rate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        previous = self.routing_cache[position_ids]
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.repeat_rate = (previous == idx).float().mean()
        self.routing_cache[position_ids] = idx.detach()
        return w / w.sum(-1, keepdim=True), idx


class RoutingCacheBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = RoutingCacheRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, torch.arange(x.shape[0]))
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- DeepSpeed PR-MoE: a pyramid of experts
class PyramidGate(_Forced):
    """DeepSpeed-MoE's PR-MoE (Rajbhandari et al. 2022): more experts in later layers (a pyramid), a top-1 gate
    (softmax, ``argmax``) whose expert output is added to a dense MLP's (the residual MoE)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = n, 1
        self.wg = nn.Linear(D, n, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.wg(x).softmax(-1)
        idx = gates.argmax(-1, keepdim=True) if self.forced is None else self.forced
        return gates.gather(1, idx), idx


class PyramidResidualMoE(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gate = PyramidGate(n)
        self.experts = Experts(n)
        self.mlp = _MLP()
        self.coefficient = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        coef = self.coefficient(x).softmax(-1)
        return dispatch(self.experts, x, idx, w) * coef[:, :1] + self.mlp(x) * coef[:, 1:]


class PyramidModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([PyramidResidualMoE(4), PyramidResidualMoE(E), PyramidResidualMoE(2 * E)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------- scores in physical order
class PhysicalOrderGate(_Forced):
    """Expert-parallel serving code whose gate rows are stored in the devices' (physical) order: the top-k of the
    physical scores, its positions mapped to the logical expert ids by a ``physical_to_logical`` table (the experts
    held in logical order); the weights a softmax of the top-k logits. Routes number the experts as the columns of
    the scores the decision chooses from (here the physical positions), so the choice forced by hand is of
    positions."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("physical_to_logical", torch.randperm(E, generator=torch.Generator().manual_seed(7)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        physical = self.gate(x)
        if self.forced is None:
            top, pos = physical.topk(self.top_k, dim=-1)
        else:
            pos = self.forced
            top = physical.gather(1, pos)
        return top.softmax(-1), self.physical_to_logical[pos]


EXACT_MORE: dict[str, tuple[Callable[[], nn.Module], bool | None, dict[str, object]]] = {
    "pr-moe-pyramid": (PyramidModel, True, {}),
    "physical-order-gate": (lambda: TwoLayers(lambda: RouterBlock(PhysicalOrderGate())), True, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT_MORE))
def test_routers_of_other_widths_or_orders_replay_the_recorded_experts(case: str) -> None:
    """Layers of 4, 8 and 16 experts (PR-MoE's pyramid), a top-k over scores held in another order than the
    experts, mapped back after it: exact as the recorded rows forced by hand."""
    make, router_grads, attach = EXACT_MORE[case]
    assert_replay_is_forced_by_hand(make(), _x(), router_grads=router_grads, **attach)


# ----------------------------------------------------------------------- k changed between capture and replay
@pytest.mark.reliability("silent replays")
def test_a_top_k_changed_between_capture_and_replay_is_refused() -> None:
    """A top-k annealed during training (DynMoE-style schedules, or a user lowering ``top_k`` for speed): routes
    of two experts per token replayed into routers that now take one are refused, not cut or padded, the model's
    forward left as it was."""
    model = TwoLayers(lambda: RouterBlock(ArcticGate()))
    before = snapshot(model)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(_x())
        routes = session.routes()
        for layer in model.layers:
            layer.router.top_k = 1
        with (
            pytest.raises(mr.RoutesValidationError, match=f"chooses 1 of {E} experts .* rows of 2 of {E} experts"),
            torch.no_grad(),
            session.replay(routes),
        ):
            model(_x())
    assert_untouched(model, before)


# ----------------------------------------------------------------------- integer tables that are no hash table
_TABLES: dict[str, Callable[[], nn.Module]] = {
    "routing-cache": RoutingCacheBlock,
    "topk-out-buffers": lambda: RouterBlock(OutBufferTopKRouter()),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(_TABLES))
def test_a_router_holding_an_integer_table_beside_its_top_k_is_refused_until_named(case: str) -> None:
    """Once silent (the routing cache): a router holding an integer ``[rows, k]`` buffer was read as a hash router
    (DeepSeek-V4's token-id table), its first lookup of that buffer by an index tensor taken for the decision while
    its own top-k went unseen: the capture recorded the cached past choices, and a replay forced them into the
    cache read while the top-k chose freely. Preallocated ``out=`` buffers were refused saying a lookup was
    missing. Now refused naming the buffer and the top-k, the model left as it was; with the Adapter the message
    gives, exact as the recorded experts forced by hand."""
    model = TwoLayers(_TABLES[case])
    before = snapshot(model)
    table = "topk_ids" if case == "topk-out-buffers" else "routing_cache"
    match = rf"read as a hash router.* integer buffer '{table}' \[64, 2\]\), .* makes topk\(k=2\) over its {E} "
    with pytest.raises(mr.UnsupportedRouterError, match=match):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)
    adapter = mr.Adapter("topk", match=lambda name, module: name.endswith(".router"), decision="topk")
    assert_replay_is_forced_by_hand(TwoLayers(_TABLES[case]), _x(), adapters=[adapter])


@pytest.mark.reliability("round trips")
def test_a_modalitys_routers_that_run_on_no_token_record_no_row_rightly() -> None:
    """Once a false refusal: on a text-only batch, ERNIE 4.5 VL's vision routers run on no token, and routes()
    refused them as routers that never ran (a module built twice). They did run: their rows are empty, the replay is
    exact as the recorded experts forced by hand, and routes() after detach says the same."""
    model = ErnieVL()
    model.token_type_ids.zero_()
    session = assert_replay_is_forced_by_hand(model, _x(), router_grads=None)  # (routes() read while attached)
    assert session.names[1::2] == ("layers.0.vision_gate", "layers.1.vision_gate")
    assert session.routes().tokens_per_layer == (T, 0, T, 0)  # after detach


# ----------------------------------------------------------------------- capacity-aware rerouting at inference
class CapacityRerouteGate(_Forced):
    """Capacity-aware inference (He et al. 2025, token rerouting against stragglers): a first top-k counts each
    expert's load over the batch; experts over capacity are masked out of the scores and every token chooses again
    among the rest. ``how``: masked by ``masked_fill(-inf)`` (``fill``) or by a product with the kept mask
    (``product``), the weights the probabilities at the chosen experts; or by the product, the weights the values
    of the top-k that chose them (``product-values``). Renormalised."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is not None:
            idx = self.forced
            w = probs.gather(1, idx)
        else:
            load = torch.bincount(probs.topk(self.top_k, dim=-1).indices.flatten(), minlength=E)
            over = load > x.shape[0] * self.top_k // E + 2
            masked = probs.masked_fill(over, float("-inf")) if self.how == "fill" else probs * ~over
            top, idx = masked.topk(self.top_k, dim=-1)
            w = top if self.how == "product-values" else probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["fill", "product", "product-values"])
def test_capacity_aware_rerouting_is_exact_or_refused(how: str) -> None:
    """Experts over capacity (counted from a first top-k over the batch) masked out before the top-k that decides:
    a forced expert that the replay's own first top-k would mask out must still be used, at its own probability.
    Exact as the recorded experts forced by hand where the weights are read at the chosen experts from the unmasked
    probabilities, or through a ``masked_fill`` that a replay reads through; refused where they are the values of a
    product with the mask (a forced expert masked out would weigh 0), naming the first top-k, the model left as it
    was."""
    model = TwoLayers(lambda: RouterBlock(CapacityRerouteGate(how)))
    if how != "product-values":
        assert_replay_is_forced_by_hand(model, _x(), router_grads=True)
        return
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"an earlier choice \(#0 topk\(k=2\) over 8 .* cannot undo"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class SampledCacheRouter(RoutingCacheRouter):
    """The routing cache of :class:`RoutingCacheRouter` beside RL-R's sampled choice (``torch.multinomial``)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        previous = self.routing_cache[position_ids]
        idx = torch.multinomial(probs.detach(), self.top_k) if self.forced is None else self.forced
        self.repeat_rate = (previous == idx).float().mean()
        self.routing_cache[position_ids] = idx.detach()
        return probs.gather(1, idx), idx


class SampledCacheBlock(RoutingCacheBlock):
    def __init__(self) -> None:
        super().__init__()
        self.router = SampledCacheRouter()


@pytest.mark.reliability("silent replays")
def test_a_router_read_as_a_hash_router_that_returns_other_indices_than_its_lookup_is_refused() -> None:
    """Once silent: a router holding an integer ``[positions, k]`` cache of its past choices, read as a hash router,
    whose experts are a random draw (no decision-like call to refuse): the cache read was recorded and forced as
    its choice while the draw chose the experts used. The indices it returns are not the lookup's: refused, the
    model left as it was."""
    model = TwoLayers(SampledCacheBlock)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="read as a hash router.* the indices it returns are not"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


# ----------------------------------------------------------------------- a fallback expert past the top-k
class FallbackGate(_Forced):
    """A capacity fallback: a top-(k+1) of the softmax; a token whose second expert is over capacity (counted
    over the batch's first choices) uses its third instead, so the third slot reaches the output for some tokens
    only."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        idx3 = probs.topk(self.top_k + 1, dim=-1).indices if self.forced is None else self.forced
        over = torch.bincount(idx3[:, 0], minlength=E)[idx3[:, 1]] > 3
        idx = torch.stack([idx3[:, 0], torch.where(over, idx3[:, 2], idx3[:, 1])], 1)
        w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
def test_a_fallback_slot_used_by_some_tokens_only_is_refused() -> None:
    """The (k+1)-th slot of the top-k used in place of the k-th where that expert is over capacity: a row of k+1
    experts would name experts some tokens did not use, and k slots would leave the fallback to the replay's own
    choice. Refused naming the slot, the model left as it was (a false refusal of a kind: forcing all three slots
    would be exact)."""
    model = TwoLayers(lambda: RouterBlock(FallbackGate()))
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"slot 3 of its decision \(#0 topk\(k=3\) over 8"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)
