"""More public MoE router code, with zero configuration (see ``test_public_routers12``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact
from tests.test_public_routers9 import _assert_refused, _pick


def _gumbel(shape: torch.Size) -> torch.Tensor:
    """DeepSpeed ``sharded_moe.gumbel_rsample``: standard Gumbel noise."""
    return torch.distributions.Gumbel(0.0, 1.0).rsample(shape)


def _gate_network(kind: str) -> nn.Module:
    """LLaMA-MoE ``get_gate_network``: a ``Linear`` initialised to zeros (every score tied until it trains), or an
    MLP ``Linear, Tanh, Linear``."""
    if kind == "linear":
        gate = nn.Linear(D, E, bias=False)
        nn.init.zeros_(gate.weight)
        return gate
    return nn.Sequential(nn.Linear(D, E, bias=False), nn.Tanh(), nn.Linear(E, E, bias=False))


# ----------------------------------------------------------------------- LLaMA-MoE: Switch gate, Gumbel, max
class LlamaMoESwitchBalancedGate(_Used):
    """pjlab-sys4nlp/llama-moe ``smoe/modules/moe/moe_gates.py`` ``SwitchBalancedGate``: Gumbel noise added to the
    logits in every mode (``add_noise``), ``torch.max`` over the experts, the *noisy logit* as the weight (no
    softmax of it), the load by ``bincount`` handed on as a Python list (``expert_batch_size``) and a balance loss
    from the softmax scores; returns a dict."""

    def __init__(self, gate_network: str = "mlp", add_noise: bool = True) -> None:
        super().__init__()
        self.num_experts, self.num_selects, self.add_noise = E, 1, add_noise
        self.gate_network = _gate_network(gate_network)
        self.softmax = nn.Softmax(1)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        logits = self.gate_network(x)
        scores = self.softmax(logits)
        noisy = logits + _gumbel(logits.shape).to(logits) if self.add_noise else logits
        if self.forced is None:
            top1_scores, top1_indices = torch.max(noisy, dim=1)
        else:
            top1_indices = self.forced[:, 0]
            top1_scores = noisy.gather(1, self.forced)[:, 0]
        self.used = top1_indices[:, None]
        load = top1_indices.bincount(minlength=self.num_experts)
        balance_loss = self.num_experts * torch.sum(scores.mean(0) * load / x.shape[0]) * 0.1
        return {
            "topK_indices": top1_indices,
            "topK_scores": top1_scores,
            "expert_batch_size": load.tolist(),
            "balance_loss": balance_loss,
        }


class LlamaMoELayer(nn.Module):
    """LLaMA-MoE ``LinearGLUMoELayer`` with ``UniversalCalculator`` (indices flattened and sorted, tokens split
    per expert by the gate's ``expert_batch_size`` or a ``bincount``, scaled, added back by ``index_add``) or
    ``SwitchDropTokenCalculator`` (per expert, tokens past ``int(capacity_factor * T / E)`` dropped after a
    ``randperm`` shuffle, the rest written in, then scaled by the scores)."""

    def __init__(self, gate: nn.Module, calculator: str = "universal", capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.gate, self.calculator, self.capacity_factor = gate, calculator, capacity_factor
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.gate(x)
        idx, w = out["topK_indices"], out["topK_scores"]
        if self.calculator == "universal":
            t, k = idx.shape[0], 1 if idx.dim() == 1 else idx.shape[1]
            flat, wf = idx.flatten(), w.flatten()
            rows = torch.arange(t).repeat_interleave(k)
            _, order = flat.sort(0)
            sizes = out.get("expert_batch_size") or flat.bincount(minlength=E).tolist()
            parts = torch.split(x.index_select(0, rows.index_select(0, order)), sizes, dim=0)
            outs = torch.cat([self.experts[e](parts[e]) for e in range(E) if parts[e].shape[0] > 0], 0)
            outs = outs * wf.index_select(0, order)[:, None]
            y = torch.zeros_like(x).index_add(0, rows.index_select(0, order), outs)
        else:
            capacity = int(self.capacity_factor * idx.shape[0] / E)
            y = torch.zeros_like(x)
            for e in range(E):
                tok = (idx == e).nonzero(as_tuple=True)[0]
                if tok.numel() > capacity:
                    tok = tok[torch.randperm(tok.numel())][:capacity]
                if tok.numel() > 0:
                    y[tok, :] = self.experts[e](x[tok, :])
            y = y * w.reshape(-1, 1)
        return y, out["balance_loss"]  # type: ignore[return-value]


class AuxLayers(nn.Module):
    """Two residual layers whose blocks return ``(hidden, aux loss)``: the losses summed into the output."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([make(), make()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = x.new_zeros(())
        for layer in self.layers:
            y, a = layer(x)
            x, aux = x + y, aux + a
        return x + aux


# ----------------------------------------------------------------------- mamba_ssm MoE (garrett361/mamba): DSv3 gate
class MambaTokenCounter(nn.Module):
    """``mamba_ssm/modules/moe.py`` ``TokenCounter``: a submodule of the gate (for hooks on token statistics) that
    turns the indices into tokens per expert by ``scatter_`` of ones, under ``@torch.no_grad()``."""

    @torch.no_grad()
    def forward(self, indices: torch.Tensor, n_routed_experts: int) -> torch.Tensor:
        counts = indices.new_zeros((indices.shape[0], n_routed_experts))
        counts.scatter_(1, indices, 1)
        return counts.sum(dim=0, dtype=torch.int32)


class MambaMoEGate(_Used):
    """garrett361/mamba ``mamba_ssm/modules/moe.py`` ``Gate`` (DeepSeek-V3's reference gate, ported): softmax (in
    float32) or sigmoid scores, an optional bias buffer for the choice, groups scored by ``amax`` without a bias and
    by the sum of their ``topk(2)`` with one, the other groups ``-inf``, ``topk(...)[1]``, the unbiased scores
    gathered, renormalised *in place* (sigmoid) and scaled in place; returns ``(weights, indices, counts)``, the
    counts from the ``TokenCounter`` submodule."""

    def __init__(self, k: int = 2, groups: int = 1, limited: int = 1, func: str = "softmax", bias: bool = False):
        super().__init__()
        self.n_routed_experts, self.n_activated_experts = E, k
        self.n_expert_groups, self.n_limited_groups, self.score_func, self.route_scale = groups, limited, func, 1.5
        self.lin = nn.Linear(D, E, bias=False)
        self.register_buffer("bias", torch.randn(E) / 4 if bias else None)
        self.tok_counter = MambaTokenCounter()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.lin(x)
        scores = scores.softmax(dim=-1, dtype=torch.float32) if self.score_func == "softmax" else scores.sigmoid()
        original_scores = scores
        if self.bias is not None:
            scores = scores + self.bias
        if self.n_expert_groups > 1:
            scores = scores.view(x.size(0), self.n_expert_groups, -1)
            if self.bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            indices = group_scores.topk(self.n_limited_groups, dim=-1)[1]
            mask = scores.new_ones(x.size(0), self.n_expert_groups, dtype=torch.bool).scatter_(1, indices, False)
            scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.n_activated_experts, dim=-1)[1] if self.forced is None else self.forced
        self.used = indices
        weights = original_scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights /= weights.sum(dim=-1, keepdim=True)
        weights *= self.route_scale
        return weights.type_as(x), indices, self.tok_counter(indices, self.n_routed_experts)


class MambaMoE(nn.Module):
    """``mamba_ssm/modules/moe.py`` ``MoE``: the gate, then ``RoutedExpertsNoEPForLoop`` (``torch.where(indices ==
    e)``, ``z[tok] += ...``) or the grouped path (tokens sorted by ``indices.flatten().argsort()``, split by the
    gate's counts, put back in place, weighted by ``bmm``); plus a shared expert."""

    def __init__(self, gate: MambaMoEGate, impl: str = "loop") -> None:
        super().__init__()
        self.gate, self.impl = gate, impl
        self.experts = Experts()
        self.shared_experts = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices, counts = self.gate(x)
        if self.impl == "loop":
            z = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(indices == e)
                if tok.numel() == 0:
                    continue
                z[tok] += expert(x[tok]) * weights[tok, slot, None]
        else:
            order = indices.flatten().argsort(dim=-1)
            x_by_expert = x[order // indices.shape[-1]]
            parts = torch.split(x_by_expert, counts.tolist(), dim=0)
            y = torch.cat([expert(p) for expert, p in zip(self.experts, parts, strict=True)], 0)
            x_by_expert = torch.empty_like(y)
            x_by_expert[order] = y
            z = torch.bmm(weights[:, None], x_by_expert.reshape(*weights.shape, -1)).squeeze(1)
        return z + self.shared_experts(x)


# ----------------------------------------------------------------------- LLaMA-MoE: noisy top-(k+1), zero-init gate
class LlamaMoETopKBalancedNoisyGate(_Used):
    """pjlab-sys4nlp/llama-moe ``smoe/modules/moe/moe_gates.py`` ``TopKBalancedNoisyGate``: the gate network
    (``"linear"``: initialised to zeros, every logit tied until it trains), noise scaled by a softplus of a
    zero-initialised ``weight_noise`` in training, a top-(k+1) of which the first k are used, a softmax of the
    top-k logits; the load estimate of the noisy gating paper from the (k+1)-th and k-th values; the importance and
    load handed on as Python lists. Forced by hand: the forced experts' logits, then the best of the others."""

    def __init__(self, gate_network: str = "linear", k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.num_selects = E, k
        self.gate_network = _gate_network(gate_network)
        self.weight_noise = nn.Linear(D, E, bias=False)
        nn.init.zeros_(self.weight_noise.weight)
        self.softmax, self.softplus, self.noise_epsilon = nn.Softmax(1), nn.Softplus(), 1e-2
        self.normal = torch.distributions.Normal(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        logits_gate = self.gate_network(x)
        logits, noise_control, logits_noise = logits_gate, None, None
        if self.training:
            noise_control = self.softplus(self.weight_noise(x)) + self.noise_epsilon
            logits_noise = torch.randn_like(logits_gate) * noise_control
            logits = logits_gate + logits_noise
        m = min(self.num_selects + 1, self.num_experts)
        if self.forced is None:
            top_logits, top_indices = logits.topk(m, dim=1)
        else:
            rest = logits.scatter(1, self.forced, float("-inf")).topk(m - self.num_selects, dim=1)
            top_logits = torch.cat([logits.gather(1, self.forced), rest.values], 1)
            top_indices = torch.cat([self.forced, rest.indices], 1)
        top_k_indices = top_indices[:, : self.num_selects]
        self.used = top_k_indices
        top_k_scores = self.softmax(top_logits[:, : self.num_selects])
        scores_filtered = torch.zeros_like(logits).scatter(dim=1, index=top_k_indices, src=top_k_scores)
        importance = scores_filtered.sum(0)
        if self.training:
            assert noise_control is not None and logits_noise is not None
            flat = top_logits.flatten()
            positions_in = torch.arange(top_logits.size(0)) * top_logits.size(1) + self.num_selects
            threshold_if_in = flat.gather(0, positions_in).unsqueeze(1)
            threshold_if_out = flat.gather(0, positions_in - 1).unsqueeze(1)
            is_in = torch.gt(logits_noise, threshold_if_in)
            prob_if_in = self.normal.cdf((logits_gate - threshold_if_in) / noise_control)
            prob_if_out = self.normal.cdf((logits_gate - threshold_if_out) / noise_control)
            load = torch.where(is_in, prob_if_in, prob_if_out).sum(0)
        else:
            load = (scores_filtered > 0).sum(0)

        def cv_squared(v: torch.Tensor) -> torch.Tensor:
            return v.float().var() / (v.float().mean() ** 2 + 1e-10)

        return {
            "topK_indices": top_k_indices,
            "topK_scores": top_k_scores,
            "balance_loss": (cv_squared(importance) + cv_squared(load)) * 1e-2,
            "load": load.tolist(),
            "importance": importance.tolist(),
        }


def _switch(gate_network: str = "mlp", calculator: str = "universal", noise: bool = True) -> nn.Module:
    return AuxLayers(lambda: LlamaMoELayer(LlamaMoESwitchBalancedGate(gate_network, noise), calculator))


def _noisy(gate_network: str = "linear", k: int = 2) -> nn.Module:
    return AuxLayers(lambda: LlamaMoELayer(LlamaMoETopKBalancedNoisyGate(gate_network, k)))


def _mamba(impl: str = "loop", **gate: object) -> nn.Module:
    return Layers(lambda: MambaMoE(MambaMoEGate(**gate), impl))  # type: ignore[arg-type]


EXACT: dict[str, tuple[Callable[[], nn.Module], dict[str, object]]] = {
    # name: (model, options: ``train``, ``change``)
    "llama-moe-switch-gumbel-max-universal": (_switch, {}),
    "llama-moe-switch-zero-gate-random-drop-train": (lambda: _switch("linear", "drop"), {"train": True}),
    "llama-moe-switch-no-noise-drop": (lambda: _switch("mlp", "drop", noise=False), {}),
    "llama-moe-noisy-zero-gate-eval": (_noisy, {}),
    "llama-moe-noisy-zero-gate-top1": (lambda: _noisy("linear", 1), {}),
    "mamba-ssm-softmax-loop": (_mamba, {}),
    "mamba-ssm-softmax-amax-groups-loop": (lambda: _mamba(groups=2, limited=1), {}),
    "mamba-ssm-sigmoid-bias-groups-sorted": (
        lambda: _mamba("sorted", groups=4, limited=2, func="sigmoid", bias=True),
        {},
    ),
    "mamba-ssm-sigmoid-amax-groups-sorted-top3-train": (
        lambda: _mamba("sorted", k=3, groups=2, limited=1, func="sigmoid"),
        {"train": True},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """LLaMA-MoE's Switch gate (Gumbel noise in every mode, a ``max``, the noisy logit as the weight, the load
    handed on as a list, a random drop past capacity) and its noisy top-(k+1) gate from a zero-initialised gate (every
    logit tied), the mamba_ssm port of DeepSeek-V3's gate (groups by ``amax``, in-place renormalisation, counts from
    a no-grad submodule, dispatch by ``argsort``): every router found and nothing else, the recorded rows the
    experts used, and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), _x(), train=train, change=change, **opts)  # type: ignore[arg-type]


class IdsModel(nn.Module):
    """An embedding in front of a stack above: ``[batch, seq]`` token ids in, so that a replay can tell the tokens
    it is fed from those its routes were recorded for."""

    def __init__(self, stack: nn.Module, vocab: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, D)
        self.stack = stack

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.stack(self.embed(input_ids).flatten(0, 1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "case",
    ["llama-moe-switch-gumbel-max-universal", "llama-moe-noisy-zero-gate-eval", "mamba-ssm-sigmoid-bias-groups-sorted"],
)
def test_routes_of_another_batch_are_refused_and_those_of_the_batch_replay(case: str) -> None:
    """A stack above fed token ids: routes of batch A replayed on batch B (or on A's sequences swapped) are refused
    with ``TokenMismatchError`` before any router reads a row; on A itself, after every parameter changes, they
    replay the experts recorded."""
    make, options = EXACT[case]
    model = IdsModel(make()).train(bool(options.get("train", False)))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 32, (2, 6), generator=g), torch.randint(0, 32, (2, 6), generator=g)
    assert not torch.equal(a, a.flip(0)) and not torch.equal(a, b)
    routers = [m for m in model.modules() if isinstance(m, _Used)]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(a)
        routes = session.routes()
        used = [r.used.clone() for r in routers if r.used is not None]
        for other in (b, a.flip(0)):
            with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
                with torch.no_grad(), session.replay(routes):
                    model(other)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        with torch.no_grad(), session.replay(routes):
            model(a)
        assert len(used) == len(routers)
        for router, rows in zip(routers, used, strict=True):
            assert router.used is not None and torch.equal(router.used.long(), rows.long())


# ----------------------------------------------------------------------- a minimum weight kept in a tensor
class TensorMinWeightGate(_Used):
    """A top-k whose slots under a minimum weight are dropped (dynamic routing by a weight threshold, as XMoE's
    and top-p routers cut the experts a token needs least), the minimum kept in a tensor rather than a Python
    number: a frozen 0-d ``Parameter`` (``"frozen-0d-parameter"``, set by a schedule), a learned one
    (``"learned-0d-parameter"``), or one per expert in a buffer (``"per-expert-buffer"``, read at the chosen
    experts). It starts at 0, where no softmax weight is under it: the cut drops nothing until it is raised."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.kind = E, 2, kind
        self.gate = nn.Linear(D, E, bias=False)
        if kind == "per-expert-buffer":
            self.register_buffer("min_weight", torch.zeros(E))
        else:
            self.min_weight = nn.Parameter(torch.zeros(()), requires_grad=kind == "learned-0d-parameter")

    def raise_minimum(self, value: float) -> None:
        with torch.no_grad():
            self.min_weight.fill_(value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        floor = self.min_weight[idx] if self.min_weight.dim() else self.min_weight
        keep = w > floor
        self.used = torch.where(keep, idx, -1)
        return w * keep, idx


class MinWeightBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.router = TensorMinWeightGate(kind)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return dispatch(self.experts, x, idx, w)


class MinWeightHiddenBlock(_Used):
    """The same cut in a block whose gate is a bare ``Linear`` (HF v4 style: the top-k in the block, which returns
    its hidden states alone); the minimum kept as in :class:`TensorMinWeightGate`, or in a 0-d float buffer
    (``"0d-buffer"``: read as a setting, compared at every block)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        if kind == "per-expert-buffer":
            self.register_buffer("min_weight", torch.zeros(E))
        elif kind == "0d-buffer":
            self.register_buffer("min_weight", torch.zeros(()))
        else:
            self.min_weight = nn.Parameter(torch.zeros(()), requires_grad=kind == "learned-0d-parameter")

    def raise_minimum(self, value: float) -> None:
        with torch.no_grad():
            self.min_weight.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        keep = w > (self.min_weight[idx] if self.min_weight.dim() else self.min_weight)
        self.used = torch.where(keep, idx, -1)
        return dispatch(self.experts, x, idx, w * keep)


_MIN_WEIGHT: dict[str, Callable[[], nn.Module]] = {
    "router-frozen-0d-parameter": lambda: MinWeightBlock("frozen-0d-parameter"),
    "router-learned-0d-parameter": lambda: MinWeightBlock("learned-0d-parameter"),
    "router-per-expert-buffer": lambda: MinWeightBlock("per-expert-buffer"),
    "block-frozen-0d-parameter": lambda: MinWeightHiddenBlock("frozen-0d-parameter"),
    "block-per-expert-buffer": lambda: MinWeightHiddenBlock("per-expert-buffer"),
}


def _minimum_routers(model: nn.Module) -> list[TensorMinWeightGate | MinWeightHiddenBlock]:
    return [m for m in model.modules() if isinstance(m, TensorMinWeightGate | MinWeightHiddenBlock)]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(_MIN_WEIGHT))
def test_a_minimum_weight_kept_in_a_tensor_that_cuts_nothing_yet_is_refused(case: str) -> None:
    """Once silent: a cut by a minimum weight held in a tensor (a frozen or learned 0-d ``Parameter``, a floor per
    expert in a buffer) that starts at 0 cut nothing as the decision was established, so no later choice was seen;
    raised afterwards (by a schedule, by training), it dropped slots the rows still named, and a replay of earlier
    routes used other experts than forced, with no error. Now the later choices are also held with the router's
    small floating state moved: refused at the first capture, saying why, the model as it was. The same cut raised
    before the first forward is refused as a later choice, as before."""
    x = _x()
    raised = Layers(_MIN_WEIGHT[case])
    for m in _minimum_routers(raised):
        m.raise_minimum(0.35)
    _assert_refused(raised, x, "chooses again from the current scores")
    model = Layers(_MIN_WEIGHT[case])
    routers = _minimum_routers(model)
    with torch.no_grad():
        model(x)
    assert all(r.used is not None and bool((r.used >= 0).all()) for r in routers)  # (it cuts nothing yet)
    for r in routers:  # (raised, it cuts: the case tries something)
        r.raise_minimum(0.35)
    with torch.no_grad():
        model(x)
    assert all(r.used is not None and bool((r.used < 0).any()) for r in routers)
    for r in routers:
        r.raise_minimum(0.0)
    _assert_refused(model, x, "chooses again by comparing values with tensors it holds.*a minimum weight")


class ScaledFloorGate(TensorMinWeightGate):
    """The same router with state it holds that no later choice compares with: a learned per-expert scale of the
    logits and a 0-d temperature (X-MoE's), and a floor of 0 kept as a Python number beside a softmax (a cut that
    can never drop a slot: none is under 0)."""

    def __init__(self) -> None:
        super().__init__("per-expert-buffer")
        self.scale = nn.Parameter(torch.ones(E))
        self.temperature = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick((self.gate(x) * self.scale / self.temperature).softmax(-1), self.forced, self.top_k)
        keep = w >= 0.0
        self.used = torch.where(keep, idx, -1)
        return w * keep, idx


@pytest.mark.reliability("silent replays")
def test_state_a_router_holds_that_no_later_choice_compares_with_replays_exactly() -> None:
    """The check above moves the router's small floating tensors; a router whose scale, temperature and floor-free
    guard hold such tensors, with no cut that can bite, still replays as forced by hand."""
    model = Layers(lambda: MinWeightBlock("per-expert-buffer"))
    for block in model.layers:
        block.router = ScaledFloorGate()
    assert_exact(model, _x())


@pytest.mark.reliability("silent replays")
def test_a_minimum_weight_in_a_0d_float_buffer_replays_until_raised_then_is_refused() -> None:
    """A minimum kept in a 0-d float buffer is read as a setting (compared at every block), not moved by the check
    above: at 0 its rows are the experts used and they replay; raised, the next forward establishes the decision
    again and is refused, the rows never naming an expert the cut dropped."""
    model = Layers(lambda: MinWeightHiddenBlock("0d-buffer"))
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        for name, r in zip(session.names, _minimum_routers(model), strict=True):
            assert r.used is not None and torch.equal(r.used.long(), routes.layer(name).long())
        with torch.no_grad(), session.replay(routes):
            model(x)
        for r in _minimum_routers(model):
            r.raise_minimum(0.35)
        with pytest.raises(mr.MoEReplayError, match="chooses again from the current scores"):
            with torch.no_grad(), session.capture():
                model(x)


class ArgumentMinWeightGate(_Used):
    """A top-k cut by a minimum weight its block passes at each call (``router(x, min_weight=...)``: a schedule
    the block reads, as tutel's layer takes ``top_k``/``capacity_factor`` per call), a Python number or a 0-d
    tensor; 0 at first, where no softmax weight is under it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor, min_weight: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        keep = w > min_weight
        self.used = torch.where(keep, idx, -1)
        return w * keep, idx


class ArgumentMinWeightBlock(nn.Module):
    def __init__(self, tensor: bool) -> None:
        super().__init__()
        self.router, self.experts, self.tensor = ArgumentMinWeightGate(), Experts(), tensor
        self.min_weight: float | torch.Tensor = torch.zeros(()) if tensor else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, min_weight=self.min_weight)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tensor", [False, True], ids=["number", "0d-tensor"])
def test_a_minimum_weight_passed_to_the_router_and_raised_later_is_exact_or_refused(tensor: bool) -> None:
    """Once silent: the router's decision established with ``min_weight=0`` (nothing cut); the block then passed
    0.35, which no later forward compared, and the next capture recorded the slots the cut dropped. Now the settings
    among a router forward's arguments are compared at each forward: the change establishes the decision again, and
    the cut is seen (refused). The next capture records the experts used (the cut slots as dropped), or is
    refused."""
    model = Layers(lambda: ArgumentMinWeightBlock(tensor))
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        for block in model.layers:
            block.min_weight = torch.tensor(0.35) if tensor else 0.35
        try:
            with torch.no_grad(), session.capture():
                model(x)
            routes = session.routes()
        except mr.MoEReplayError:
            return
        routers = [b.router for b in model.layers]
        assert all(r.used is not None and bool((r.used < 0).any()) for r in routers)  # (the cut drops slots)
        for name, r in zip(session.names, routers, strict=True):
            assert r.used is not None
            assert torch.equal(r.used.long(), routes.layer(name).long()), f"'{name}': the rows are not the experts used"


# ----------------------------------------------------------------------- dynamic skipping in the block
class DynamicSkippingBlock(nn.Module):
    """Expert skipping of Lu et al. 2024 ("Not All Experts are Equal", Lucky-Lance/Expert_Sparsity, on Mixtral): the
    second expert of a token is skipped where its weight is under ``beta`` times the first's. Here in a block whose
    router is a module of its own (transformers v5's ``MixtralTopKRouter`` returns the weights and indices), so the
    cut runs in the block, after the router returned: outside the router's forward."""

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.router = MixtralRouter()
        self.experts, self.beta = Experts(), beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[:, 1] = w[:, 1] >= self.beta * w[:, 0]
        self.router.used = torch.where(keep, idx, -1)
        return dispatch(self.experts, x, idx, w * keep)


class MixtralRouter(_Used):
    """Softmax, top-2, renormalised; returns ``(weights, indices)``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        self.used = idx
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
def test_experts_skipped_by_weight_in_the_block_after_the_router_are_exact_or_refused() -> None:
    """The rows of a capture are the experts the block used (the skipped slots not named), or it is refused."""
    model = Layers(DynamicSkippingBlock)
    x = _x()
    routers = [m for m in model.modules() if isinstance(m, MixtralRouter)]
    with mr.attach(model) as session:
        try:
            with torch.no_grad(), session.capture():
                model(x)
            routes = session.routes()
        except mr.MoEReplayError:
            return
        assert all(r.used is not None and bool((r.used < 0).any()) for r in routers)  # (the block skips some)
        for name, r in zip(session.names, routers, strict=True):
            assert r.used is not None
            assert torch.equal(r.used.long(), routes.layer(name).long()), f"'{name}': the rows are not the experts used"
