"""MoE code of fine-tuning and accelerator training libraries, with zero configuration (see ``test_public_routers30``).

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
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, perturb
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _Used, assert_exact


def _seq() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def _one_block(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of a residual stack of one block, its parameters drawn from a fixed seed (the global generator left
    as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            stack = ResidualStack(make)
        del stack.layers[1]
        return stack

    return build


# ----------------------------------------------------------------------- torchtune: token choice, grouped experts
# pytorch/torchtune torchtune/modules/moe/moe.py (``TokenChoiceTopKRouter``, ``MoE``) and torchtune/modules/moe/
# experts.py (``GroupedExperts``): the router holds the ``gate`` Linear, takes the sigmoid of its logits in fp32,
# ``torch.topk`` of those scores, counts the tokens of each expert by ``torch.histc`` of the ids (here of the ids cast
# to float: the CPU kernel takes no integer input) and sorts the flat ids by a stable ``argsort``; it returns the
# chosen scores in that order, the token of each slot and the counts, never the ids. The block gathers the tokens,
# scales each by its score before the experts, and the experts split the rows by the counts (``.tolist()``), one
# SwiGLU of ``[E, d, F]`` parameters a split; the outputs are summed into the shared expert's by ``scatter_add_``.
class TokenChoiceTopKRouter(_Used):
    def __init__(self, *, gate: nn.Module, dim: int, num_experts: int, experts_per_token: int) -> None:
        super().__init__()
        self.gate = gate
        self.dim = dim
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.gate(x)
        scores = torch.sigmoid(scores.to(torch.float32)).to(x.dtype)
        if self.forced is None:
            top_scores, selected_experts_indices = torch.topk(scores, k=self.experts_per_token, dim=1)
        else:
            selected_experts_indices = self.forced
            top_scores = scores.gather(1, selected_experts_indices)
        self.selected_experts_indices = selected_experts_indices
        self.used = selected_experts_indices
        num_tokens_per_expert = torch.histc(
            selected_experts_indices.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts
        )
        token_indices_experts_sorted = torch.argsort(selected_experts_indices.view(-1), stable=True)
        top_scores = top_scores.view(-1)[token_indices_experts_sorted]
        token_indices_experts_sorted = token_indices_experts_sorted // self.experts_per_token
        return top_scores, token_indices_experts_sorted, num_tokens_per_expert


class GroupedExperts(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int = 1) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.3)
        self.up_proj = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * 0.3)
        self.act_fn = F.silu

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        splits = torch.split(x, split_size_or_sections=[int(n) for n in num_tokens_per_expert.tolist()], dim=0)
        out_experts_splits = []
        for expert_idx, x_expert in enumerate(splits):
            w1, w2, w3 = self.gate_proj[expert_idx], self.down_proj[expert_idx], self.up_proj[expert_idx]
            h = self.act_fn(torch.matmul(x_expert, w1))
            h = h * torch.matmul(x_expert, w3)
            out_experts_splits.append(torch.matmul(h, w2))
        return torch.cat(out_experts_splits, dim=0)


class TorchtuneMoE(nn.Module):
    def __init__(self, num_experts: int = 6, experts_per_token: int = 2, shared: bool = True) -> None:
        super().__init__()
        self.experts = GroupedExperts(dim=D, hidden_dim=8, num_experts=num_experts)
        self.router = TokenChoiceTopKRouter(
            gate=nn.Linear(D, num_experts, bias=False),
            dim=D,
            num_experts=num_experts,
            experts_per_token=experts_per_token,
        )
        self.shared_expert = nn.Sequential(nn.Linear(D, 8), nn.SiLU(), nn.Linear(8, D)) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        top_scores, token_indices, num_tokens_per_expert = self.router(x.reshape(bs * slen, dim))
        token_indices = token_indices.reshape(-1, 1).expand(-1, dim)
        routed_input = torch.gather(x.view(-1, dim), dim=0, index=token_indices)
        routed_input = routed_input * top_scores.reshape(-1, 1)
        routed_output = self.experts(routed_input, num_tokens_per_expert)
        if self.shared_expert is not None:
            out = self.shared_expert(x).reshape(bs * slen, dim)
        else:
            out = torch.zeros_like(x.reshape(bs * slen, dim))
        if routed_output.numel() > 0:
            out.scatter_add_(dim=0, index=token_indices, src=routed_output)
        return out.reshape(bs, slen, dim)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_torchtune_token_choice_replays_the_recorded_experts_as_by_hand(shared: bool, train: bool) -> None:
    """torchtune's token-choice router (sigmoid scores, ids never returned, only the sorted scores, token indices and
    counts): found with zero configuration, the recorded rows the experts used, a replay after the gate changes those
    experts forced by hand, in output and gradients."""
    model = _one_block(lambda: TorchtuneMoE(shared=shared))()
    assert_exact(model, _seq(), train=train)


# ----------------------------------------------------------------------- NeuronX Distributed: routers and all experts
# aws-neuron/neuronx-distributed src/neuronx_distributed/modules/moe/routing.py (``RouterBase``, ``RouterTopK``,
# ``RouterSinkhorn``), with the combine of modules/moe/expert_mlps.py (``get_expert_affinities_masked``,
# ``forward_all_experts``): the router's ``linear_router`` gives ``[T, E]`` logits; the affinities are their softmax
# (or sigmoid) in fp64, cast back; ``RouterTopK`` takes ``torch.topk`` of the logits (not the affinities), the ids
# detached; ``RouterSinkhorn`` (top-1) takes in training the ``argmax`` of the logits balanced by 30 Sinkhorn
# iterations over the whole batch (fp32, under ``no_grad``), in eval that of the raw logits. The router returns the
# logits, the full affinities and the ids; the MoE layer makes a top-k-hot mask of the ids, zeroes the affinities
# outside it (``masked_fill``), L1-normalises them where asked (``F.normalize(p=1)``) and runs every expert over every
# token, each output scaled by its expert's masked affinity column.
class RouterBase(_Used):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, act_fn: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.act_fn = act_fn
        self.linear_router = nn.Linear(hidden_size, num_experts, bias=False)

    def get_router_logits_and_expert_affinities(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.linear_router(hidden_states)
        if self.act_fn == "sigmoid":
            expert_affinities = torch.sigmoid(router_logits.to(dtype=torch.float64))
        else:
            expert_affinities = F.softmax(router_logits, dim=1, dtype=torch.float64)
        return router_logits, expert_affinities.to(dtype=hidden_states.dtype)


class RouterTopK(RouterBase):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int) -> None:
        super().__init__(num_experts, top_k, hidden_size, act_fn="softmax")

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits, expert_affinities = self.get_router_logits_and_expert_affinities(hidden_states)
        if self.forced is None:
            _, expert_index = torch.topk(router_logits, self.top_k)
        else:
            expert_index = self.forced
        expert_index = expert_index.detach().to(dtype=torch.long)
        self.used = expert_index
        return router_logits, expert_affinities, expert_index


class RouterSinkhorn(RouterBase):
    def __init__(self, num_experts: int, hidden_size: int, act_fn: str = "sigmoid", iterations: int = 30) -> None:
        super().__init__(num_experts, 1, hidden_size, act_fn=act_fn)
        self.sinkhorn_iterations = iterations

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits, expert_affinities = self.get_router_logits_and_expert_affinities(hidden_states)
        with torch.no_grad():
            if self.training:
                sinkroute = self._sinkhorn(
                    router_logits.detach().to(dtype=torch.float32), num_iters=self.sinkhorn_iterations
                )
            else:
                sinkroute = router_logits.detach()
            expert_index = torch.argmax(sinkroute, dim=1, keepdim=True)
        if self.forced is not None:
            expert_index = self.forced
        expert_index = expert_index.to(dtype=torch.long)
        self.used = expert_index
        return router_logits, expert_affinities, expert_index

    @staticmethod
    def _sinkhorn(cost: torch.Tensor, num_iters: int) -> torch.Tensor:
        cost = torch.exp(cost)
        d0 = torch.ones(cost.size(0), dtype=cost.dtype)
        d1 = torch.ones(cost.size(1), dtype=cost.dtype)
        eps = 1e-8
        for _ in range(num_iters):
            d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
            d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        return d1 * cost * d0.unsqueeze(1)


class NeuronMoE(nn.Module):
    def __init__(self, router: RouterBase, normalize_top_k_affinities: bool) -> None:
        super().__init__()
        self.router = router
        self.normalize_top_k_affinities = normalize_top_k_affinities
        self.gate_up_proj = nn.Parameter(torch.randn(router.num_experts, D, 16) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(router.num_experts, 8, D) * 0.3)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        _, expert_affinities, expert_index = self.router(hidden_states)
        expert_mask = torch.zeros_like(expert_affinities).scatter(1, expert_index, 1.0)
        expert_affinities_masked = expert_affinities.masked_fill(torch.eq(expert_mask, 0), 0)
        if self.normalize_top_k_affinities:
            expert_affinities_masked = F.normalize(expert_affinities_masked, p=1.0, dim=1)
        output = torch.zeros_like(hidden_states)
        for e in range(self.router.num_experts):
            gate, up = (hidden_states @ self.gate_up_proj[e]).chunk(2, dim=-1)
            mlp_output = (F.silu(gate) * up) @ self.down_proj[e]
            output = output + mlp_output * expert_affinities_masked[:, e].unsqueeze(1)
        return output.reshape(shape)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_neuronx_top_k_router_replays_the_recorded_experts_as_by_hand(normalize: bool, train: bool) -> None:
    """NeuronX Distributed's ``RouterTopK`` (top-k of the logits, the full fp64 softmax returned beside the ids) in
    a layer that runs every expert on every token, the unchosen ones weighted zero: the recorded rows the experts
    used, a replay after the router changes those experts forced by hand, in output and gradients."""
    model = _one_block(lambda: NeuronMoE(RouterTopK(6, 2, D), normalize))()
    assert_exact(model, _seq(), train=train)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("act_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("train", [False, True])
def test_neuronx_sinkhorn_router_replays_the_recorded_experts_as_by_hand(act_fn: str, train: bool) -> None:
    """NeuronX Distributed's ``RouterSinkhorn`` (in training the argmax of logits balanced over the whole batch, in
    eval that of the raw logits, both under ``no_grad``; the affinities from the raw logits): the recorded rows the
    experts used, a replay after the router changes those experts forced by hand, in output and gradients."""
    model = _one_block(lambda: NeuronMoE(RouterSinkhorn(6, D, act_fn), normalize_top_k_affinities=False))()
    assert_exact(model, _seq(), train=train)


# ----------------------------------------------------------------------- LMDeploy: the decision in a backend object
# InternLM/lmdeploy lmdeploy/pytorch/backends/default/moe.py (``DefaultSoftmaxTopKImpl``) and backends/default/
# moe_router.py (``DefaultRouterNoauxTCImpl``), held by the thin ``nn.Module`` wrappers of lmdeploy/pytorch/nn/moe
# (``SoftmaxTopK``, ``NoauxTCRouter``): the routing is a plain backend object's ``forward``, not a module's. The softmax
# top-k (fp32) takes, with ``n_groups``, ``top_k / n_groups`` experts in each equal group of experts (the group's
# ``torch.topk`` over an ``unflatten``, the ids moved by the group offsets). The no-aux-loss router takes the bias as an
# argument (the model's ``e_score_correction_bias``), softmax or sigmoid scores, either the same per-group top-k (whose
# weights are the biased scores it ranked) or DeepSeek-V3's group-limited top-k (the groups' top-2 sums, a 0/1 group
# mask, ``masked_fill`` with 0; the unbiased scores gathered), renormalised (``+ 1e-20``) and scaled. The models
# (lmdeploy/pytorch/models/qwen3_moe.py: a ``gate`` Linear beside ``softmax_topk``, the weights renormalised where
# the experts run; models/hy3.py: a ``Hy3Router`` module of ``gate`` and ``topk_router``) dispatch by a one-hot
# mask per expert.
class DefaultSoftmaxTopKImpl:
    def __init__(self, top_k: int, dim: int = -1, n_groups: int = -1) -> None:
        self.top_k = top_k
        self.dim = dim
        self.n_groups = n_groups

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing_weights = torch.softmax(x, dim=self.dim, dtype=torch.float32)
        if self.n_groups > 0:
            per_group_top_k = self.top_k // self.n_groups
            group_size = routing_weights.shape[-1] // self.n_groups
            group_offsets = (torch.arange(self.n_groups) * group_size).view(1, -1, 1)
            routing_weights = routing_weights.unflatten(-1, (self.n_groups, group_size))
            topk_weights, topk_ids = torch.topk(routing_weights, per_group_top_k, dim=-1)
            topk_ids = (topk_ids + group_offsets).flatten(-2, -1)
            topk_weights = topk_weights.flatten(-2, -1)
        else:
            topk_weights, topk_ids = torch.topk(routing_weights, self.top_k, dim=self.dim)
        return topk_weights, topk_ids


class SoftmaxTopK(_Used):
    def __init__(self, top_k: int, n_groups: int = -1) -> None:
        super().__init__()
        self.impl = DefaultSoftmaxTopKImpl(top_k, -1, n_groups=n_groups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced is None:
            topk_weights, topk_ids = self.impl.forward(x)
        else:
            topk_ids = _group_ids(self.impl.n_groups, x.shape[-1])(self.forced)
            topk_weights = torch.softmax(x, dim=-1, dtype=torch.float32).gather(1, topk_ids)
        self.used = topk_ids
        return topk_weights, topk_ids


class DefaultRouterNoauxTCImpl:
    def __init__(
        self, scoring_func: str, top_k: int, n_group: int, topk_group: int, n_routed_experts: int, router_n_groups: int
    ) -> None:
        self.scoring_func = scoring_func
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.n_routed_experts = n_routed_experts
        self.renormalize = True
        self.routed_scaling_factor = 2.5
        self.router_n_groups = router_n_groups

    def _forward_router_n_groups(self, scores_for_choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_group_top_k = self.top_k // self.router_n_groups
        group_size = scores_for_choice.shape[-1] // self.router_n_groups
        group_offsets = (torch.arange(self.router_n_groups) * group_size).view(1, -1, 1)
        scores_for_choice = scores_for_choice.unflatten(-1, (self.router_n_groups, group_size))
        topk_weight, topk_idx = torch.topk(scores_for_choice, per_group_top_k, dim=-1)
        return (topk_weight.flatten(-2, -1), (topk_idx + group_offsets).flatten(-2, -1))

    def _forward_default(
        self, scores: torch.Tensor, scores_for_choice: torch.Tensor, sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group_scores = scores_for_choice.view(sequence_length, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(sequence_length, self.n_group, self.n_routed_experts // self.n_group)
            .reshape(sequence_length, -1)
        )
        tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        _, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        return scores.gather(1, topk_idx), topk_idx

    def renorm(self, topk_weight: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight * self.routed_scaling_factor

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "softmax":
            return logits.softmax(dim=-1, dtype=torch.float32)
        return logits.sigmoid()

    def forward(self, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence_length = logits.shape[0]
        scores = self.scores(logits)
        scores_for_choice = scores.view(sequence_length, -1) + bias[None]
        if self.router_n_groups > 0:
            topk_weight, topk_idx = self._forward_router_n_groups(scores_for_choice)
        else:
            topk_weight, topk_idx = self._forward_default(scores, scores_for_choice, sequence_length)
        return self.renorm(topk_weight), topk_idx


class NoauxTCRouter(_Used):
    def __init__(self, scoring_func: str, router_n_groups: int, n_routed_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.impl = DefaultRouterNoauxTCImpl(scoring_func, top_k, 4, 2, n_routed_experts, router_n_groups)

    def forward(self, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced is None:
            topk_weight, topk_idx = self.impl.forward(logits, bias)
        else:
            topk_idx = _group_ids(self.impl.router_n_groups, logits.shape[-1])(self.forced)
            scores = self.impl.scores(logits)
            if self.impl.router_n_groups > 0:  # the per-group top-k keeps the biased scores as weights
                scores = scores + bias[None]
            topk_weight = self.impl.renorm(scores.gather(1, topk_idx))
        self.used = topk_idx
        return topk_weight, topk_idx


class Hy3Router(nn.Module):
    """The router module of lmdeploy's Hy3 (lmdeploy/pytorch/models/hy3.py): an fp32 ``gate`` Linear and the
    ``topk_router`` wrapper, the bias handed in by the block."""

    def __init__(self, scoring_func: str, router_n_groups: int, n_experts: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(D, n_experts, bias=False)
        self.topk_router = NoauxTCRouter(scoring_func, router_n_groups, n_experts)

    def forward(self, hidden_states: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = self.gate(hidden_states.float())
        return self.topk_router(router_logits, expert_bias)


class LMDeployMoE(nn.Module):
    """A sparse block as lmdeploy's models build it, dispatched by a one-hot mask per expert: a ``gate`` Linear beside
    the ``softmax_topk`` wrapper (Qwen3-MoE), or a router module and the block's ``expert_bias`` (Hy3)."""

    def __init__(self, scoring_func: str | None, n_groups: int, n_experts: int = 8) -> None:
        super().__init__()
        if scoring_func is None:
            self.gate = nn.Linear(D, n_experts, bias=False)
            self.softmax_topk = SoftmaxTopK(4, n_groups)
        else:
            self.router = Hy3Router(scoring_func, n_groups, n_experts)
            self.expert_bias = nn.Parameter(torch.randn(n_experts) * 0.1, requires_grad=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 8), nn.SiLU(), nn.Linear(8, D)) for _ in range(n_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        if hasattr(self, "router"):
            topk_weights, topk_ids = self.router(hidden_states, self.expert_bias)
        else:
            topk_weights, topk_ids = self.softmax_topk(self.gate(hidden_states))
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(topk_ids, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])
            out = out.index_add(0, token, expert(hidden_states[token]) * topk_weights[token, slot, None])
        return out.reshape(shape)


def _group_ids(n_groups: int, n_experts: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert ids that rows of positions in each group of experts name (one row a token and group, in order): as
    the rows are recorded, and as they are forced by hand."""

    def as_used(rows: torch.Tensor) -> torch.Tensor:
        if n_groups <= 0:
            return rows
        grouped = rows.reshape(-1, n_groups, rows.shape[-1])
        return (grouped + (torch.arange(n_groups) * (n_experts // n_groups)).view(1, -1, 1)).flatten(1)

    return as_used


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("n_groups", [-1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_lmdeploy_softmax_top_k_replays_the_recorded_experts_as_by_hand(n_groups: int, train: bool) -> None:
    """lmdeploy's softmax top-k, the decision in a backend object its wrapper holds (over all experts, or ``top_k /
    n_groups`` in each group, recorded as positions in the groups), the wrapper named: the recorded rows the experts
    used, a replay after the gate changes those experts forced by hand, in output and gradients."""
    model = _one_block(lambda: LMDeployMoE(None, n_groups))()
    assert_exact(model, _seq(), train=train, as_used=_group_ids(n_groups), include="*.softmax_topk")


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_groups", [-1, 2])
def test_lmdeploy_noaux_tc_router_replays_the_recorded_experts_as_by_hand(scoring_func: str, n_groups: int) -> None:
    """lmdeploy's no-aux-loss router in Hy3's router module (the bias an argument; group-limited, or a fixed share
    of each group of experts), with zero configuration: the recorded rows the experts used, a replay after the gate
    changes those experts forced by hand, in output and gradients."""
    model = _one_block(lambda: LMDeployMoE(scoring_func, n_groups))()
    assert_exact(model, _seq(), train=True, as_used=_group_ids(n_groups), holders=True)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("n_groups", [-1, 2])
def test_lmdeploy_softmax_top_k_with_zero_configuration_replays_by_its_gate(n_groups: int) -> None:
    """With zero configuration the ``gate`` Linear beside lmdeploy's ``softmax_topk`` wrapper is the router found
    (the top-k it feeds runs in the block's forward): the recorded rows the experts used, and a replay after the gate
    changes uses them."""
    model = _one_block(lambda: LMDeployMoE(None, n_groups))().eval()
    wrapper = model.get_submodule("layers.0.softmax_topk")
    assert isinstance(wrapper, SoftmaxTopK)
    as_used = _group_ids(n_groups)
    x = _seq()
    with mr.attach(model) as session:
        assert list(session.names) == ["layers.0.gate"]
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        assert wrapper.used is not None
        recorded = wrapper.used.sort(-1).values
        assert torch.equal(as_used(routes.layer("layers.0.gate")).sort(-1).values, recorded)
        perturb(model, 3.0)
        with torch.no_grad():
            model(x)
        assert not torch.equal(wrapper.used.sort(-1).values, recorded), "the changed gate chooses them anyway"
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert torch.equal(wrapper.used.sort(-1).values, recorded), "the replay did not force the recorded experts"
