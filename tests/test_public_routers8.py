"""More public MoE router code, with zero configuration (see ``test_public_routers6`` and ``test_public_routers7``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, E, Experts, T, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import GateBlock, Layers, MixtralGate, _Used, assert_exact, assert_refused


class BesideMoE(nn.Module):
    """A layer of ``other`` (no routed choice of its own), then a routed MoE (a Mixtral-style gate) over the tokens
    flattened: ``[tokens, d]`` or ``[batch, seq, d]`` inputs."""

    def __init__(self, other: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.other = other()
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.other(x))
        y = x + h
        return h + self.moe(y.reshape(-1, D)).view_as(y)


# ----------------------------------------------------------------------- DeepSpeed top1gating with used_token
class DSTop1Gate(_Used):
    """deepspeed/moe/sharded_moe.py ``top1gating`` behind ``TopKGate``: softmax, ``argmax``, the one-hot mask
    multiplied by ``used_token`` (padding routed nowhere, ``einsum("s,se->se")``), locations by ``cumsum - 1``,
    tokens past the capacity dropped, ``combine_weights`` by ``einsum("se,sc->sec")``; in training the ``Jitter``
    noise policy (``multiplicative_jitter`` on the gate's input)."""

    def __init__(self, capacity_factor: float = 1.0, min_capacity: int = 2) -> None:
        super().__init__()
        self.wg = nn.Linear(D, E, bias=False)
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity

    def forward(self, x: torch.Tensor, used_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            x = x * torch.empty_like(x).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        gates = F.softmax(self.wg(x), dim=1)
        capacity = max(math.ceil(x.shape[0] / E * self.capacity_factor), self.min_capacity)
        indices1_s = torch.argmax(gates, dim=1) if self.forced is None else self.forced[:, 0]
        self.used = indices1_s[:, None]
        mask1 = F.one_hot(indices1_s, num_classes=E)
        mask1 = torch.einsum("s,se->se", used_token.to(mask1.dtype), mask1)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        mask1 = mask1 * torch.lt(locations1, capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        gates1_s = (gates * mask1.to(gates.dtype)).sum(dim=1)
        gates = gates * mask1.to(gates.dtype)
        locations1_sc = F.one_hot(locations1_s, num_classes=capacity).to(gates.dtype)
        combine_weights = torch.einsum("se,sc->sec", gates, locations1_sc)
        del gates1_s
        return combine_weights, combine_weights.bool()


class DSMOELayer(nn.Module):
    """DeepSpeed's ``MOELayer``: dispatched by ``einsum("sec,sm->ecm")``, each expert on its ``[capacity, d]``
    rows, combined by ``einsum("sec,ecm->sm")``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = DSTop1Gate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor, used_token: torch.Tensor) -> torch.Tensor:
        combine_weights, dispatch_mask = self.gate(x, used_token)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.to(x.dtype), x)
        expert_output = torch.stack([expert(dispatched[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("sec,ecm->sm", combine_weights, expert_output)


class PaddedStack(nn.Module):
    """Two residual DeepSpeed MoE layers fed the padding mask (the last tokens padding) as ``used_token``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([DSMOELayer(), DSMOELayer()])
        self.register_buffer("used_token", (torch.arange(T) < T - 5).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, self.used_token)
        return x


# ----------------------------------------------------------------------- dynamic skipping (Lu et al. 2024)
class DynamicSkipMixtralBlock(_Used):
    """Lucky-Lance/Expert_Sparsity dynamic skipping (Lu et al. 2024, "Not All Experts are Equal"): Mixtral's top-2,
    renormalised, then the second expert skipped where its weight is under ``beta`` times the first's (its weight
    set to zero by a boolean index, its slot marked ``-1``, not run)."""

    def __init__(self, beta: float = 0.6) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.beta = E, 2, beta
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing_weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            selected_experts = self.forced
            routing_weights = routing_weights.gather(1, selected_experts)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        self.used = selected_experts
        skip = routing_weights[:, 1] < self.beta * routing_weights[:, 0]
        routing_weights[skip, 1] = 0
        selected_experts = selected_experts.clone()
        selected_experts[skip, 1] = -1
        return dispatch(self.experts, x, selected_experts, routing_weights)


# ----------------------------------------------------------------------- SMoE-Dropout: a frozen random router
class SMoEDropoutGate(_Used):
    """VITA-Group/Random-MoE-as-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout"): FastMoE's
    ``NaiveGate`` with its ``Linear`` frozen at its random init, ``topk`` of the logits, softmax of the chosen ones;
    ``top_k`` raised during training (the schedule sets the attribute)."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E)
        self.gate.requires_grad_(False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gate(x)
        if self.forced is None:
            gate_top_k_val, gate_top_k_idx = torch.topk(gate, k=self.top_k, dim=-1, largest=True, sorted=False)
        else:
            gate_top_k_idx = self.forced
            gate_top_k_val = gate.gather(1, gate_top_k_idx)
        self.used = gate_top_k_idx
        return F.softmax(gate_top_k_val, dim=-1), gate_top_k_idx


# ----------------------------------------------------------------------- HyperMoE: the unchosen experts' knowledge
class HyperMoEBlock(_Used):
    """Bumble666/Hyper_MoE (Zhao et al. 2024, "HyperMoE"): a top-2 MoE plus a hyper-expert whose low-rank weights a
    hypernetwork makes from the mean embedding of the experts *not* chosen (``1 - one_hot(idx).sum(1)``)."""

    def __init__(self, r: int = 2, emb: int = 6) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.r = E, 2, r
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.expert_embeddings = nn.Parameter(torch.randn(E, emb) / 2)
        self.hypernet = nn.Linear(emb, 2 * D * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        out = dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))
        unselected = 1 - F.one_hot(idx, E).sum(1).to(x.dtype)
        cond = unselected @ self.expert_embeddings / (E - self.top_k)
        params = torch.tanh(self.hypernet(cond))
        down = params[:, : D * self.r].view(-1, D, self.r)
        up = params[:, D * self.r :].view(-1, self.r, D)
        return out + torch.bmm(torch.bmm(x[:, None], down), up)[:, 0]


# ----------------------------------------------------------------------- FastMoE SwipeGate
def _swipe_once(idx: torch.Tensor, bias: int) -> torch.Tensor:
    """``fmoe_native.swipe_once`` on one worker, on the host: each token in turn keeps its expert while the expert
    has room (``ceil(tokens / E)``), else goes to the least loaded one (ties broken from ``bias`` on)."""
    with torch.no_grad():
        cap, load, new = math.ceil(idx.numel() / E), [0] * E, []
        for i in idx.tolist():
            if load[i] >= cap:
                i = min(range(E), key=lambda e: (load[e], (e - bias) % E))
            load[i] += 1
            new.append(i)
        return torch.tensor(new, device=idx.device)


class SwipeGate(_Used):
    """laekov/fastmoe ``fmoe/gates/swipe_gate.py`` ``SwipeGate``: ``topk`` of the logits; in eval their softmax;
    in training each slot's experts rebalanced by ``swipe_once`` (a native op, here on the host), the scores of the
    new experts read by advanced indexing, softmax-ed."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(D, E)

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.gate(inp)
        if self.forced is None:
            orig_score, orig_idx = torch.topk(score, k=self.top_k, dim=-1)
        else:
            orig_idx = self.forced
            orig_score = score.gather(1, orig_idx)
        if not self.training:
            self.used = orig_idx
            return orig_idx, F.softmax(orig_score, dim=-1)
        idx_x = torch.arange(inp.shape[0], device=inp.device)
        topk_idxs, topk_vals = [], []
        for k in range(self.top_k):
            idx = _swipe_once(orig_idx[:, k], k % E)
            topk_vals.append(score[idx_x, idx])
            topk_idxs.append(idx)
        topk_idx = torch.stack(topk_idxs).transpose(0, 1)
        self.used = topk_idx
        return topk_idx, F.softmax(torch.stack(topk_vals).transpose(0, 1), dim=-1)


class FMoEBlock(nn.Module):
    """FastMoE's ``FMoE``: the gate returns ``(idx, score)``."""

    def __init__(self, gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.gate = gate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, score = self.gate(x)
        return dispatch(self.experts, x, idx, score)


# ----------------------------------------------------------------------- a routing kernel that writes its outputs
@torch.library.custom_op("moe_replay_tests_public8::topk_softmax", mutates_args=("topk_weights", "topk_ids"))
def _topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor, gating_output: torch.Tensor) -> None:
    """vLLM's ``_moe_C.topk_softmax`` (csrc/moe/topk_softmax_kernels.cu) as a Python custom op: softmax of the
    gating output, its top-k written into the preallocated ``topk_weights`` and ``topk_ids``."""
    w, i = gating_output.float().softmax(-1).topk(topk_ids.shape[-1], dim=-1)
    topk_weights.copy_(w)
    topk_ids.copy_(i.to(topk_ids.dtype))


class FusedTopKMoE(_Used):
    """vLLM ``fused_topk`` (model_executor/layers/fused_moe): ``topk_weights``, ``topk_ids`` and
    ``token_expert_indices`` allocated with ``torch.empty``, filled by the ``topk_softmax`` kernel, renormalised;
    inference only (no gradient through the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gating_output = self.gate(x)
        m = x.shape[0]
        topk_weights = torch.empty(m, self.top_k, dtype=torch.float32)
        topk_ids = torch.empty(m, self.top_k, dtype=torch.int32)
        if self.forced is None:
            torch.ops.moe_replay_tests_public8.topk_softmax(topk_weights, topk_ids, gating_output)
        else:
            topk_ids.copy_(self.forced)
            topk_weights.copy_(gating_output.detach().float().softmax(-1).gather(1, self.forced))
        self.used = topk_ids
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return dispatch(self.experts, x, topk_ids.long(), topk_weights)


# ----------------------------------------------------------------------- DenseMixer: a straight-through router
class DenseMixerBlock(_Used):
    """yaof20/DenseMixer (Yao et al. 2025): in training, the forward is the top-k MoE's, but every expert is run
    and the router's gradient is the dense mixture's (``sparse + (dense - dense.detach())``, the experts' outputs
    detached in the dense term); in eval, the plain top-k."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        if self.forced is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        norm = w.sum(dim=-1, keepdim=True)
        if not self.training:
            return dispatch(self.experts, x, idx, w / norm)
        mask = F.one_hot(idx, num_classes=E).sum(dim=1).to(probs.dtype)
        all_out = torch.stack([expert(x) for expert in self.experts], dim=1)
        sparse = ((probs * mask / norm)[..., None] * all_out).sum(1)
        dense = ((probs / norm)[..., None] * all_out.detach()).sum(1)
        return sparse + (dense - dense.detach())


# ----------------------------------------------------------------------- Expert Gate: autoencoders as the router
class ExpertGateLayer(_Used):
    """rahafaljundi/Expert-Gate (Aljundi et al. 2017, "Expert Gate"): one small autoencoder per expert, the
    relevance of an expert the softmax of minus the reconstruction errors over a temperature, the most relevant
    expert run alone (weight 1); no gate ``Linear``. ``per_sample``: the ``argmax`` taken one sample at a time, as
    upstream at test time (a 1-D vector of relevances each)."""

    def __init__(self, temperature: float = 2.0, per_sample: bool = False) -> None:
        super().__init__()
        self.temperature, self.per_sample = temperature, per_sample
        self.autoencoders = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 4), nn.Sigmoid(), nn.Linear(4, D)) for _ in range(E)
        )
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        errors = torch.stack([(ae(x) - x).square().mean(-1) for ae in self.autoencoders], dim=-1)
        relevance = F.softmax(-errors / self.temperature, dim=-1)
        if self.forced is not None:
            idx = self.forced
        elif self.per_sample:
            idx = torch.stack([torch.argmax(relevance[i]) for i in range(x.shape[0])])[:, None]
        else:
            idx = relevance.argmax(-1, keepdim=True)
        self.used = idx
        return dispatch(self.experts, x, idx, torch.ones_like(idx, dtype=x.dtype))


# ----------------------------------------------------------------------- SCMoE: self-contrast of chosen experts
class SCMoEBlock(_Used):
    """DavidFanzz/SCMoE (Shi et al. 2024, "Unchosen Experts Can Contribute Too"): one top-2 decision, the strong
    activation both experts (renormalised), the weak one the rank-2 expert alone, contrasted:
    ``strong + beta * (strong - weak)``."""

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.beta = E, 2, beta
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        strong = dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))
        weak = dispatch(self.experts, x, idx[:, 1:], torch.ones_like(w[:, 1:]))
        return strong + self.beta * (strong - weak)


# ----------------------------------------------------------------------- Mixture of Tokens: dense, across the batch
class ContinuousMoE(nn.Module):
    """llm-random ``ContinuousMoE`` (Antoniak et al. 2023, "Mixture of Tokens"): tokens at one position across the
    batch are a group; per expert a softmax over the group (``dim=0``) mixes them into one token, the expert
    (``lin1``, ``lin2`` as ``[E, d, f]`` parameters) runs on it, and the softmax weights spread its output back:
    dense, no choice."""

    def __init__(self, n_experts: int = 4, dff: int = 8, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.controller = nn.Parameter(torch.randn(D, n_experts) / 4)
        self.lin1 = nn.Parameter(torch.randn(n_experts, D, dff) / 4)
        self.lin2 = nn.Parameter(torch.randn(n_experts, dff, D) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge_weights = F.softmax(torch.einsum("bsd,de->bse", x, self.controller) / self.temperature, dim=0)
        z = torch.einsum("bsd,bse->sed", x, merge_weights)
        z = torch.einsum("sef,efd->sed", F.relu(torch.einsum("sed,edf->sef", z, self.lin1)), self.lin2)
        return torch.einsum("sed,bse->bsd", z, merge_weights)


# ----------------------------------------------------------------------- MMoE: dense multi-gate mixture
class MMoE(nn.Module):
    """drawbridge/keras-mmoe, as ported to PyTorch (Ma et al. 2018, "Multi-gate Mixture-of-Experts"): an
    ``experts`` list and one ``Linear(d, E)`` gate per task, each task's softmax weighing every expert; the tasks'
    towers summed here: dense, no choice."""

    def __init__(self, n_experts: int = E, tasks: int = 2) -> None:
        super().__init__()
        self.experts = Experts(n_experts)
        self.gates = nn.ModuleList(nn.Linear(D, n_experts) for _ in range(tasks))
        self.towers = nn.ModuleList(nn.Linear(D, D) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([torch.tanh(expert(x)) for expert in self.experts], dim=-2)
        total = torch.zeros_like(x)
        for gate, tower in zip(self.gates, self.towers, strict=True):
            g = F.softmax(gate(x), dim=-1)
            total = total + tower((g[..., None] * outs).sum(-2))
        return total


# ----------------------------------------------------------------------- HyperRouter: a generated router
class HyperRouterGate(_Used):
    """giangdip2410/HyperRouter (Do et al. 2023): the router's ``[E, d]`` weight made by a frozen hypernetwork from
    a trainable embedding, ``F.linear`` with it, FastMoE's ``NaiveGate`` top-k and softmax of the chosen logits."""

    def __init__(self, emb: int = 4, hidden: int = 12) -> None:
        super().__init__()
        self.top_k = 2
        self.hyper_embedding = nn.Parameter(torch.randn(emb))
        self.hypernet = nn.Sequential(nn.Linear(emb, hidden), nn.ReLU(), nn.Linear(hidden, E * D))
        self.hypernet.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.hypernet(self.hyper_embedding).view(E, D)
        gate = F.linear(x, weight)
        if self.forced is None:
            val, idx = torch.topk(gate, k=self.top_k, dim=-1)
        else:
            idx = self.forced
            val = gate.gather(1, idx)
        self.used = idx
        return idx, F.softmax(val, dim=-1)


# ----------------------------------------------------------------------- RMoE: a router recurrent over layers
class RMoERouter(_Used):
    """qiuzh20/RMoE (Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts"): the router's input
    projected, a ``GRUCell`` carrying the previous layer's router state, the gate on the new state; softmax, top-2,
    renormalised; the state passed on to the next layer."""

    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.top_k = 2
        self.proj = nn.Linear(D, hidden, bias=False)
        self.gru = nn.GRUCell(hidden, hidden)
        self.gate = nn.Linear(hidden, E, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.gru(self.proj(x), state)
        probs = self.gate(state).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        return w / w.sum(-1, keepdim=True), idx, state


class RMoEModel(nn.Module):
    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = hidden
        self.routers = nn.ModuleList([RMoERouter(hidden), RMoERouter(hidden)])
        self.experts = nn.ModuleList([Experts(), Experts()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = x.new_zeros(x.shape[0], self.hidden)
        for router, experts in zip(self.routers, self.experts, strict=True):
            w, idx, state = router(x, state)
            x = x + dispatch(experts, x, idx, w)
        return x


# ----------------------------------------------------------------------- Chain-of-Experts: iterated routing
class CoEBlock(nn.Module):
    """ZihanWang314/coe (Wang et al. 2025, "Chain-of-Experts"): the same experts applied ``iterations`` times in
    one layer, each iteration routed by its own gate on the current hidden state, with an inner residual."""

    def __init__(self, iterations: int = 2) -> None:
        super().__init__()
        self.gates = nn.ModuleList(MixtralGate() for _ in range(iterations))
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for gate in self.gates:
            w, idx = gate(h)
            h = h + dispatch(self.experts, h, idx, w)
        return h - x


# ----------------------------------------------------------------------- TC-MoE: ternary expert choice
class TCMoEBlock(_Used):
    """TC-MoE (Yan et al. 2025, "Ternary Expert Choice"): each expert offered with a multiplier in ``{-1, 0, 1}``,
    the router's ``Linear(d, 3E)`` softmax-ed and top-2 over the ``3E`` choices, the expert ``idx % E`` run with
    weight ``(idx // E - 1)`` times the renormalised score (a zero multiplier: the expert skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, 3 * E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        sign = (torch.div(idx, E, rounding_mode="floor") - 1).to(x.dtype)
        expert = torch.where(sign == 0, -1, idx % E)
        return dispatch(self.experts, x, expert, sign * w / w.sum(-1, keepdim=True))


# ----------------------------------------------------------------------- MoH: attention heads as experts
class MoHAttention(_Used):
    """SkyworkAI/MoH (Jin et al. 2024, "Mixture-of-Head attention"): every head computed, two shared heads always
    on, a top-2 of the routed heads by ``wg`` (softmax, ``scatter`` of ones, L1-renormalised), a ``wg_0`` softmax
    weighing shared against routed, the heads' outputs scaled before ``proj``."""

    def __init__(self, heads: int = 8, shared: int = 2, top_k: int = 2) -> None:
        super().__init__()
        self.heads, self.shared, self.top_k = heads, shared, top_k
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.wg = nn.Linear(D, heads - shared, bias=False)
        self.wg_0 = nn.Linear(D, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, hd = x.shape[0], D // self.heads
        q, k, v = self.qkv(x).view(n, 3, self.heads, hd).unbind(1)
        att = torch.einsum("nhd,mhd->hnm", q, k).div(math.sqrt(hd)).softmax(-1)
        o = torch.einsum("hnm,mhd->nhd", att, v)
        gate0 = F.softmax(self.wg_0(x), dim=1)
        gate = F.softmax(self.wg(x), dim=1)
        indices = gate.topk(self.top_k, dim=1).indices if self.forced is None else self.forced
        self.used = indices
        gate = F.normalize(gate * torch.zeros_like(gate).scatter(1, indices, 1), p=1, dim=1)
        o_shared = o[:, : self.shared] * (gate0[:, 0:1, None] * self.shared)
        o_routed = o[:, self.shared :] * (gate[..., None] * gate0[:, 1:2, None] * (self.heads - self.shared))
        return self.proj(torch.cat([o_shared, o_routed], dim=1).flatten(1))


# ----------------------------------------------------------------------- capacity-aware inference: rerouting
class CapacityRerouteBlock(_Used):
    """Capacity-Aware Inference (He et al. 2025, "Mitigating the Straggler Effect in MoE", Expanded Drop): a top-2,
    slots past an expert's capacity (by ``cumsum`` in token order) rerouted to the best expert still under
    capacity (``masked_fill(-inf)`` of the full and the already chosen, ``argmax``)."""

    def __init__(self, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = E, 2, capacity_factor
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        capacity = math.ceil(x.shape[0] * self.top_k / E * self.capacity_factor)
        one_hot = F.one_hot(idx.t().reshape(-1), E)  # slot-major, as GShard orders slots
        position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).view(self.top_k, -1).t()
        over = position >= capacity
        full = one_hot.sum(0) >= capacity
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
        alt = probs.masked_fill(full[None] | chosen, float("-inf")).argmax(-1, keepdim=True)
        idx = torch.where(over, alt, idx)
        w = torch.where(over, probs.gather(1, alt), w)
        self.used = idx
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


class CoESharedGate(_Used):
    """A Mixtral-style gate called once per iteration of Chain-of-Experts' shared-router variant: ``used`` the
    experts of every call of the forward, in call order (the block resets it), ``forced`` read call by call."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            n = x.shape[0]
            idx = self.forced[self.calls * n : (self.calls + 1) * n]
            w = probs.gather(1, idx)
        self.calls += 1
        self.used = idx if self.used is None else torch.cat([self.used, idx])
        return w / w.sum(-1, keepdim=True), idx


class CoESharedBlock(nn.Module):
    """Chain-of-Experts with one router shared by the iterations (the paper's shared-gate ablation)."""

    def __init__(self, iterations: int = 2) -> None:
        super().__init__()
        self.iterations = iterations
        self.gate = CoESharedGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.used, self.gate.calls = None, 0
        h = x
        for _ in range(self.iterations):
            w, idx = self.gate(h)
            h = h + dispatch(self.experts, h, idx, w)
        return h - x


# ----------------------------------------------------------------------- SiRA: expert dropout and capacity
class SiRAGate(_Used):
    """SiRA (Zhu et al. 2023, "Sparse Mixture of Low Rank Adaptation"): top-k of the softmax, each expert's
    capacity filled by position, and in training the gate's output dropped out (expert dropout) before the top-k."""

    def __init__(self, top_k: int = 2, capacity_factor: float = 1.0, dropout: float = 0.3) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = E, top_k, capacity_factor
        self.gate = nn.Linear(D, E, bias=False)
        self.expert_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.expert_dropout(self.gate(x).softmax(-1))
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        capacity = math.ceil(x.shape[0] * self.top_k / E * self.capacity_factor)
        mask = F.one_hot(idx, E)  # [T, k, E]
        position = ((mask.flatten(0, 1).cumsum(0) - 1).view_as(mask) * mask).sum(-1)
        return w * (position < capacity).to(w.dtype), idx


class LoRAExperts(nn.ModuleList):
    def __init__(self, r: int = 2) -> None:
        super().__init__(nn.Sequential(nn.Linear(D, r, bias=False), nn.Linear(r, D, bias=False)) for _ in range(E))


class SiRALinear(nn.Module):
    """A frozen base ``Linear`` plus SiRA's LoRA experts (an ``experts`` list) routed by :class:`SiRAGate`."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.gate = SiRAGate()
        self.experts = LoRAExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return self.base_layer(x) + dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- CondConv: dense per-example kernels
class CondConv(nn.Module):
    """tensorflow/tpu ``condconv`` (Yang et al. 2019, "CondConv"), as a pointwise convolution over a sequence: per
    example a ``sigmoid`` routing of the pooled input over ``num_experts`` kernels (a ``[E, d, d]`` weight), the
    kernels mixed by it: dense, no choice."""

    def __init__(self, num_experts: int = E) -> None:
        super().__init__()
        self.routing_fn = nn.Linear(D, num_experts)
        self.weight = nn.Parameter(torch.randn(num_experts, D, D) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.routing_fn(x.mean(1)))  # [B, E]
        kernel = torch.einsum("be,eoi->boi", r, self.weight)
        return torch.einsum("boi,bsi->bso", kernel, x)


# ----------------------------------------------------------------------- Flaxformer: routing in groups of tokens
class TokensChooseScatterRouter(_Used):
    """google/flaxformer ``moe/routing.py`` ``TokensChooseScatterRouter`` (GShard/Switch in groups): tokens in
    ``[num_groups, tokens_per_group, d]``, a top-2 over ``[G, S, E]``, each group's expert capacity filled slot-major
    (``cumsum`` over ``K * S`` within the group), the gates of dropped slots zeroed."""

    def __init__(self, num_groups: int = 3, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.num_groups, self.top_k, self.capacity_factor = num_groups, 2, capacity_factor
        self.router_weights = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = x.view(self.num_groups, -1, D)
        s = g.shape[1]
        probs = self.router_weights(g).softmax(-1)
        if self.forced is None:
            expert_gate, expert_index = probs.topk(self.top_k, dim=-1)
        else:
            expert_index = self.forced.view(self.num_groups, s, self.top_k)
            expert_gate = probs.gather(-1, expert_index)
        self.used = expert_index.reshape(-1, self.top_k)
        capacity = max(math.ceil(s * self.top_k / E * self.capacity_factor), 1)
        mask = F.one_hot(expert_index, E).transpose(1, 2).reshape(self.num_groups, self.top_k * s, E)
        priority = ((mask.cumsum(1) - 1) * mask).sum(-1).view(self.num_groups, self.top_k, s).transpose(1, 2)
        kept = (priority < capacity).to(expert_gate.dtype)
        return (expert_gate * kept).reshape(-1, self.top_k), expert_index.reshape(-1, self.top_k)


# ----------------------------------------------------------------------- Routing Networks: a sampled policy
class RoutingNetworkLayer(_Used):
    """cle-ros/RoutingNetworks (Rosenbaum et al. 2018, "Routing Networks"): a policy MLP over the sample's
    representation picks one of the layer's function blocks, in training a ``Categorical`` sample of its softmax
    (trained by REINFORCE), in eval its ``max(1)[1]``; the chosen block run with weight 1. ``by_hand``: the sample
    drawn by hand in training (the count of cumulative probabilities under a uniform draw); ``per_sample``: each
    sample routed in turn, as upstream's agents do (a ``max`` along the 1-D policy, or ``torch.multinomial`` of
    it); ``gumbel``: trained through a hard ``gumbel_softmax`` instead, its one-hot the mask of the blocks;
    ``top_p``: the blocks whose sorted probabilities reach ``top_p`` together (XMoE's threshold routing, its
    ``sort`` and ``cumsum``), weighted by them; ``num_experts``: how many blocks."""

    def __init__(
        self,
        by_hand: bool = False,
        per_sample: bool = False,
        gumbel: bool = False,
        top_p: float | None = None,
        num_experts: int = E,
    ) -> None:
        super().__init__()
        self.by_hand, self.per_sample, self.gumbel, self.top_p = by_hand, per_sample, gumbel, top_p
        self.policy = nn.Sequential(nn.Linear(D, 12), nn.ReLU(), nn.Linear(12, num_experts))
        self.experts = Experts(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.policy(x)
        probs = F.softmax(logits, dim=-1)
        if self.gumbel and self.training:
            mask = F.gumbel_softmax(logits, tau=1.0, hard=True)
            return sum((mask[:, e, None] * expert(x) for e, expert in enumerate(self.experts)), torch.zeros_like(x))
        if self.top_p is not None:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.top_p
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                chosen = ((sorted_idx == e) & keep).any(-1, keepdim=True)
                out = out + chosen * probs[:, e, None] * expert(x)
            return out
        if self.forced is not None:
            idx = self.forced
        elif self.per_sample:
            pick = (lambda p: torch.multinomial(p, 1)[0]) if self.training else (lambda p: p.max(dim=0).indices)
            idx = torch.stack([pick(probs[i].detach()) for i in range(x.shape[0])])[:, None]
        elif self.training and self.by_hand:
            u = torch.rand(x.shape[0], 1)
            idx = (probs.detach().cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=E - 1)
        elif self.training:
            idx = torch.distributions.Categorical(probs=probs.detach()).sample()[:, None]
        else:
            idx = probs.max(1)[1][:, None]  # (upstream's PyTorch of 2018 had no argmax)
        self.used = idx
        return dispatch(self.experts, x, idx, torch.ones_like(idx, dtype=x.dtype))


def _three_d() -> torch.Tensor:
    return _x(4, 6)


def _swiped(rows: torch.Tensor) -> torch.Tensor:
    """The experts SwipeGate's training forward dispatches by, from the top-k recorded (its gate's decision): each
    slot rebalanced by ``swipe_once``, a function of the recorded ids alone."""
    rows = rows.long()
    return torch.stack([_swipe_once(rows[:, k], k % E) for k in range(rows.shape[1])], dim=1)


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change``, ``as_used`` and attach options)
    "deepspeed-top1-used-token": (PaddedStack, _x, {}),
    "deepspeed-top1-used-token-jitter-train": (PaddedStack, _x, {"train": True}),
    "smoe-dropout-frozen-router": (lambda: Layers(lambda: FMoEBlock(SMoEDropoutGate)), _x, {}),
    "hypermoe-unchosen-experts": (lambda: Layers(HyperMoEBlock), _x, {"change": 0.5}),
    "swipe-gate-eval": (lambda: Layers(lambda: FMoEBlock(SwipeGate)), _x, {}),
    "swipe-gate-train": (lambda: Layers(lambda: FMoEBlock(SwipeGate)), _x, {"train": True, "as_used": _swiped}),
    "densemixer-eval": (lambda: Layers(DenseMixerBlock), _x, {}),
    "densemixer-train": (lambda: Layers(DenseMixerBlock), _x, {"train": True, "change": 0.3}),
    "expert-gate-autoencoders-named": (lambda: Layers(ExpertGateLayer), _x, {"include": ExpertGateLayer}),
    "scmoe-self-contrast": (lambda: Layers(SCMoEBlock), _x, {}),
    "mixture-of-tokens-beside-moe": (lambda: Layers(lambda: BesideMoE(ContinuousMoE)), _three_d, {}),
    "condconv-beside-moe": (lambda: Layers(lambda: BesideMoE(CondConv)), _three_d, {}),
    "mmoe-beside-moe-gates-excluded": (lambda: Layers(lambda: BesideMoE(MMoE)), _x, {"exclude": "layers.*.other.*"}),
    "hyperrouter-generated-weight": (lambda: Layers(lambda: FMoEBlock(HyperRouterGate)), _x, {}),
    "rmoe-recurrent-router": (RMoEModel, _x, {}),
    "chain-of-experts": (lambda: Layers(CoEBlock), _x, {"change": 0.5}),
    "chain-of-experts-shared-gate": (lambda: Layers(CoESharedBlock), _x, {"change": 0.5}),
    "tc-moe-ternary": (lambda: Layers(TCMoEBlock), _x, {}),
    "moh-head-routing-named": (lambda: Layers(MoHAttention), _x, {"change": 0.5, "include": MoHAttention}),
    "sira-expert-dropout-capacity": (lambda: Layers(SiRALinear), _x, {}),
    "flaxformer-groups-of-tokens": (lambda: Layers(lambda: GateBlock(TokensChooseScatterRouter())), _x, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """DeepSpeed's top-1 with padding routed nowhere (``used_token``) and its capacity; a frozen random router
    (SMoE-Dropout); the unchosen experts feeding a hypernetwork (HyperMoE); FastMoE's SwipeGate, whose training
    rebalances the top-k on the host (the routes hold the gate's top-k, the experts used follow from them alone);
    a straight-through dense gradient (DenseMixer); autoencoders as the router (Expert Gate, named); one top-2
    used twice, strong and weak (SCMoE); dense mixtures beside an MoE (Mixture of Tokens, CondConv: nothing of them
    found); a router weight made by a hypernetwork (HyperRouter); a router recurrent over layers (RMoE); routing
    iterated in a layer, by a gate per iteration or one gate called twice (Chain-of-Experts); MMoE's dense gates
    beside an MoE, excluded (with zero configuration they are taken for two routers: refused); ternary choices over
    ``3E`` (TC-MoE); attention heads as experts (MoH, named); expert dropout before a capacity (SiRA, in eval);
    groups of tokens with a capacity each (Flaxformer): every router found and nothing else, the recorded rows the
    experts used, and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


_NOT_FOUND = "no MoE router found"
_OUTSIDE = "outside every attached router"
REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the refusal says, options: ``train`` and attach options)
    "dynamic-skipping": (lambda: Layers(DynamicSkipMixtralBlock), _x, "chooses again from the current scores", {}),
    "vllm-topk-softmax-kernel": (lambda: Layers(FusedTopKMoE), _x, r"soft routing: .* \(a custom operator", {}),
    "capacity-aware-reroute": (
        lambda: Layers(CapacityRerouteBlock),
        _x,
        r"#0 topk\(k=2\) over 8 .* \+ #1 argmax\(\) over 8 .* forcing this decision would not force",
        {},
    ),
    "sira-expert-dropout-capacity-train": (
        lambda: Layers(SiRALinear),
        _x,
        "draws from the random stream",
        {"train": True},
    ),
    "mmoe-dense-gates-beside-moe": (
        lambda: Layers(lambda: BesideMoE(MMoE)),
        _x,
        r"'layers.0.other.gates.0' and 'layers.0.other.gates.1' would both be intercepted",
        {},
    ),
    "mmoe-dense-gates-alone": (lambda: Layers(MMoE), _x, "would both be intercepted", {}),
    "expert-gate-autoencoders": (lambda: Layers(ExpertGateLayer), _x, _NOT_FOUND, {}),
    "expert-gate-beside-moe": (
        lambda: Layers(lambda: BesideMoE(ExpertGateLayer)),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(ExpertGateLayer\): argmax over 8 at",
        {},
    ),
    "expert-gate-per-sample-beside-moe": (
        lambda: Layers(lambda: BesideMoE(lambda: ExpertGateLayer(per_sample=True))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(ExpertGateLayer\): argmax, one row at a time, over 8 scores at",
        {},
    ),
    "expert-gate-per-sample-named": (
        lambda: Layers(lambda: ExpertGateLayer(per_sample=True)),
        _x,
        "makes no decision-like call",
        {"include": ExpertGateLayer},
    ),
    "routing-network-policy": (lambda: Layers(RoutingNetworkLayer), _x, _NOT_FOUND, {}),
    "routing-network-policy-beside-moe": (
        lambda: Layers(lambda: BesideMoE(RoutingNetworkLayer)),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): max over 8 at",
        {},
    ),
    "routing-network-sampled-beside-moe-train": (
        lambda: Layers(lambda: BesideMoE(RoutingNetworkLayer)),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): multinomial draw from 8 scores at",
        {"train": True},
    ),
    "routing-network-per-sample-beside-moe": (
        lambda: Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(per_sample=True))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): max, one row at a time, over 8 scores at",
        {},
    ),
    "routing-network-per-sample-sampled-beside-moe-train": (
        lambda: Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(per_sample=True))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): multinomial draw from 8 scores at",
        {"train": True},
    ),
    "routing-network-gumbel-mask-beside-moe-train": (
        lambda: Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(gumbel=True))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): gumbel_softmax\(hard=True\) draw from 8",
        {"train": True},
    ),
    "routing-network-4-top-p-beside-moe": (
        lambda: Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(top_p=0.6, num_experts=4))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): sort over 4 at",
        {},
    ),
    "routing-network-4-beside-moe": (
        lambda: Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(num_experts=4))),
        _x,
        rf"{_OUTSIDE}.*\n  'layers.0.other' \(RoutingNetworkLayer\): max over 4 at",
        {},
    ),
    "mixture-of-tokens-alone": (lambda: Layers(ContinuousMoE), _three_d, _NOT_FOUND, {}),
    "condconv-alone": (lambda: Layers(CondConv), _three_d, _NOT_FOUND, {}),
    "moh-head-routing": (lambda: Layers(MoHAttention), _x, _NOT_FOUND, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_choices_no_recorded_row_holds_are_refused(case: str) -> None:
    """The second expert skipped below a share of the first's weight (dynamic skipping), a routing kernel that
    writes its top-k into preallocated tensors (vLLM's ``topk_softmax``), slots past a capacity rerouted to the best
    expert with room (capacity-aware inference), expert dropout read again after the decision in training (SiRA):
    the experts used would not be the recorded ones; dense multi-task gates over one bank (MMoE), taken for two
    routers of one block; routers discovery does not find (Expert Gate's autoencoders, MoH's heads, dense mixtures
    alone, a policy MLP); Expert Gate's choice beside a routed MoE, over a batch or one sample at a time, and a
    Routing Network's policy beside one, its ``max`` or, in training, its ``Categorical`` sample, one sample at a
    time or not, its hard Gumbel one-hot used as the mask, its ``max`` or a top-p over 4 blocks beside 8 experts
    (once silent, all but the batched ``max`` over 8: a 1-D choice, a random draw, a one-hot drawn inside
    ``gumbel_softmax``, and a ``max`` or ``sort`` over another count than the routers' were no decision to the
    watch, so their choices were neither recorded nor forced): refused, saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


class _Schedule:
    """SMoE-Dropout's schedule of ``k``, kept outside the router (read by its forward at each call)."""

    k = 1


class ScheduledGate(SMoEDropoutGate):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.top_k = _Schedule.k
        return super().forward(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", ["attribute", "schedule"])
@pytest.mark.parametrize(("k_capture", "k_replay"), [(1, 2), (2, 1)])
def test_a_top_k_changed_between_capture_and_replay_is_refused(where: str, k_capture: int, k_replay: int) -> None:
    """SMoE-Dropout raises ``k`` during training: routes captured at one ``k`` and replayed after it changed (on
    the router, or read from a schedule outside it) hold rows of another width than the router now chooses: the
    replay is refused, nothing forced, the model as it was (its ``k`` aside)."""
    _Schedule.k = k_capture
    model = Layers(lambda: FMoEBlock(lambda: ScheduledGate() if where == "schedule" else SMoEDropoutGate(k_capture)))
    model.eval()
    x = _x()
    before = snapshot(model)
    try:
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                want = model(x)
            routes = session.routes()
            _Schedule.k = k_replay
            for layer in model.layers:
                layer.gate.top_k = k_replay
            with pytest.raises(mr.MoEReplayError, match=rf"(is now topk\(k={k_replay}\)|chooses {k_replay} of 8)"):
                with torch.no_grad(), session.replay(routes):
                    model(x)
        assert_untouched(model, before)
        _Schedule.k = k_capture
        for layer in model.layers:
            layer.gate.top_k = k_capture
        assert torch.equal(model(x), want)
    finally:
        _Schedule.k = 1


@pytest.mark.reliability("silent replays")
def test_a_sample_drawn_by_hand_beside_a_found_router_is_not_left_out_silently() -> None:
    """Once silent: a Routing Network whose policy's sample is drawn by hand in training (the count of cumulative
    probabilities under a uniform draw), beside a routed MoE, made no call the watch read as a choice. A cumulative sum
    along a bank's width compared is one: refused, as its ``Categorical`` sample is."""
    assert_refused(
        Layers(lambda: BesideMoE(lambda: RoutingNetworkLayer(by_hand=True))),
        _x(),
        r"'layers\.0\.other' \(RoutingNetworkLayer\): a cumulative sum compared .* along 8 scores",
        train=True,
    )
