"""MoE code of small training and research codebases (a nanoGPT fork, LLM baselines, nano-train, an energy-aware
router, Super Tiny Language Models), with zero configuration (see ``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, perturb
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _sets, _Used, assert_exact, assert_refused


def _seq(seq: int = 5) -> torch.Tensor:
    return torch.randn(2, seq, D, generator=torch.Generator().manual_seed(1))


def _one_block(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of a residual stack of one block, its parameters drawn from a fixed seed (the global generator left
    as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            stack = ResidualStack(make)
        del stack.layers[1]
        return stack

    return build


class _Config:
    """The part of a model config the MoE layers below read."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class NanoGptMLP(nn.Module):
    """nanoGPT's ``MLP``: ``c_fc``, GELU, ``c_proj``, dropout (off)."""

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.c_proj = nn.Linear(2 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# ----------------------------------------------------------------------- nanoGPT fork: a second top-k for margins
# klei22/nanoGPT variations/router_variations.py (``RouterOutput``, ``_router_output``, ``TopKRouter``,
# ``NoisyTopKRouter``) and variations/moe_variations.py (``MoELayer``): the router's ``route_linear`` gives logits
# (in training ``NoisyTopKRouter`` adds ``randn_like * softplus(noise_linear(x))``); ``topk`` of the logits, the k
# values scattered into a ``-inf`` tensor and softmaxed over all experts (exact zeros outside the k), the selected
# weights gathered back; then, for the router's diagnostics only, a SECOND ``topk`` of the same logits, of ``k + 1``
# values, whose first and last give the margin, and a ``one_hot`` load. The layer keeps the historical two-value
# API (probabilities, indices); for each expert, ``(indices == i).any(-1)`` picks its tokens, the expert runs on them
# and ``final_output[expert_mask] += ...`` adds its output weighted by that expert's column of the probabilities.
class RouterOutput(NamedTuple):
    probabilities: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    selected_weights: torch.Tensor
    margins: torch.Tensor
    load: torch.Tensor


class NanoGptTopKRouter(_Used):
    def __init__(self, config: _Config, noisy: bool) -> None:
        super().__init__()
        self.top_k = config.moe_top_k
        self.noisy = noisy
        self.route_linear = nn.Linear(config.n_embd, config.n_experts)
        if noisy:
            self.noise_linear = nn.Linear(config.n_embd, config.n_experts)

    def _router_output(self, logits: torch.Tensor, top_k: int) -> RouterOutput:
        selected_logits, indices = logits.topk(top_k, dim=-1)
        if self.forced is not None:
            indices = self.forced.view(*logits.shape[:-1], top_k)
            selected_logits = logits.gather(-1, indices)
        self.used = indices.reshape(-1, top_k)
        sparse_logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, selected_logits)
        probabilities = F.softmax(sparse_logits, dim=-1)
        selected_weights = probabilities.gather(-1, indices)
        margin_k = min(top_k + 1, logits.shape[-1])
        margin_logits = logits.topk(margin_k, dim=-1).values
        margins = margin_logits[..., 0] - margin_logits[..., -1]
        load = F.one_hot(indices, logits.shape[-1]).float().sum(tuple(range(indices.ndim - 1)))
        return RouterOutput(probabilities, indices, logits, selected_weights, margins, load)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.route_linear(x)
        if self.noisy:
            noise_logits = self.noise_linear(x)
            logits = logits + torch.randn_like(logits) * F.softplus(noise_logits)
        result = self._router_output(logits, self.top_k)
        return result.probabilities, result.indices


class NanoGptMoELayer(nn.Module):
    def __init__(self, noisy: bool = False) -> None:
        super().__init__()
        config = _Config(n_embd=D, n_experts=4, moe_top_k=2)
        self.top_k = config.moe_top_k
        self.num_experts = config.n_experts
        self.router = NanoGptTopKRouter(config, noisy)
        self.experts = nn.ModuleList([NanoGptMLP(config) for _ in range(config.n_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gating_output, indices = self.router(x)
        final_output = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating_output = gating_output.view(-1, gating_output.size(-1))
        for i, expert in enumerate(self.experts):
            expert_mask = (indices == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            if flat_mask.any():
                expert_output = expert(flat_x[flat_mask])
                gating_scores = flat_gating_output[flat_mask, i].unsqueeze(1)
                final_output[expert_mask] += (expert_output * gating_scores).squeeze(1)
        return final_output


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("noisy", [False, True], ids=["softmax-eval", "noisy-top-k-train"])
def test_nanogpt_router_with_a_second_topk_for_its_margins_replays_as_by_hand(noisy: bool) -> None:
    """klei22/nanoGPT's router: the top-k of its (noisy, in training) logits scattered into ``-inf`` and softmaxed,
    then a second top-k of ``k + 1`` of the same logits for the margin diagnostic, never dispatched by. Found with zero
    configuration; the recorded rows are the experts each token's ``(indices == i).any(-1)`` masks sent it to, and a
    replay after the router changes forces them, in output and gradients as by hand."""
    model = _one_block(lambda: NanoGptMoELayer(noisy))()
    session = assert_exact(model, _seq(), train=noisy)
    assert session.names == ("layers.0.router",), session.names


# ----------------------------------------------------------------------- LLM baselines: shared experts in the list
# epfml/llm-baselines src/models/moe.py (``MoE``, ``ExpertChoiceMoE``): the block holds a bias-free ``router``
# Linear over the ``E - n_shared`` routed experts, and ONE ``experts`` ModuleList whose first ``n_shared`` entries are
# shared (run on every token, added unweighted) and the rest routed, expert ``i`` of the list being routed id
# ``i - n_shared``. ``moe_softmax_order`` picks ``softmax_topk`` (an fp32 softmax, then ``torch.topk``, the
# probabilities not renormalised) or ``topk_softmax`` (``torch.topk`` of the logits, the k values softmaxed in fp32).
# ``torch.where(selected_experts == i - n_shared)`` gives each expert's tokens and slots, ``results[batch_idx] +=``
# adds its weighted output. Experts return ``(output, extras)``; the layer returns ``(results, {"router_logits",
# "selected_experts"})``, which the transformer ``Block`` unpacks. ``ExpertChoiceMoE`` instead takes each expert's
# ``torch.topk`` over the tokens of the transposed probabilities (``all_probs.T``), capacity ``capacity_factor *
# tokens / E``.
class LlmBaselinesMLP(nn.Module):
    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.c_proj(F.gelu(self.c_fc(x))), {}


class LlmBaselinesMoE(_Used):
    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.experts = nn.ModuleList([LlmBaselinesMLP(config) for _ in range(config.moe_num_experts)])
        self.n_shared_experts = config.moe_num_shared_experts
        self.router = nn.Linear(config.n_embd, config.moe_num_experts - self.n_shared_experts, bias=False)
        self.top_k = config.moe_num_experts_per_tok
        self.softmax_order = config.moe_softmax_order

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs_squashed = inputs.view(-1, inputs.shape[-1])
        router_logits = self.router(inputs_squashed)
        if self.softmax_order == "softmax_topk":
            all_probs = F.softmax(router_logits, dim=1, dtype=torch.float32)
            weights, selected_experts = torch.topk(all_probs, self.top_k)
            if self.forced is not None:
                selected_experts = self.forced
                weights = all_probs.gather(1, selected_experts)
        else:
            weights, selected_experts = torch.topk(router_logits, self.top_k)
            if self.forced is not None:
                selected_experts = self.forced
                weights = router_logits.gather(1, selected_experts)
            weights = F.softmax(weights, dim=-1, dtype=torch.float32)
        self.used = selected_experts
        results = torch.zeros_like(inputs_squashed)
        for i, expert in enumerate(self.experts):
            if i < self.n_shared_experts:
                output, _ = expert(inputs_squashed)
                results += output
            else:
                batch_idx, nth_expert = torch.where(selected_experts == i - self.n_shared_experts)
                output, _ = expert(inputs_squashed[batch_idx])
                results[batch_idx] += weights[batch_idx, nth_expert, None] * output
        return results.view_as(inputs), {"router_logits": router_logits, "selected_experts": selected_experts}


class LlmBaselinesExpertChoiceMoE(nn.Module):
    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.n_experts = config.moe_num_experts
        self.experts = nn.ModuleList([LlmBaselinesMLP(config) for _ in range(config.moe_num_experts)])
        self.router = nn.Linear(config.n_embd, config.moe_num_experts, bias=False)
        self.capacity_factor = config.capacity_factor
        self.softmax_order = config.moe_softmax_order
        self.top_k = int(self.capacity_factor * config.batch_size * config.sequence_length / config.moe_num_experts)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs_squashed = inputs.view(-1, inputs.shape[-1])
        num_tokens = inputs_squashed.shape[0]
        top_k = min(self.top_k, int(self.capacity_factor * num_tokens / self.n_experts))
        router_logits = self.router(inputs_squashed)
        if self.softmax_order == "softmax_topk":
            all_probs = F.softmax(router_logits, dim=1, dtype=torch.float32)
            weights, selected_tokens = torch.topk(all_probs.T, top_k)
        else:
            weights, selected_tokens = torch.topk(router_logits.T, top_k)
            weights = F.softmax(weights, dim=0, dtype=torch.float32)
        results = torch.zeros_like(inputs_squashed)
        for i, expert in enumerate(self.experts):
            batch_idx = selected_tokens[i]
            output, _ = expert(inputs_squashed[batch_idx])
            results[batch_idx] += weights[i, :, None] * output
        return results.view_as(inputs), {"router_logits": router_logits, "selected_experts": selected_tokens}


class LlmBaselinesBlock(nn.Module):
    """The part of the transformer ``Block`` around its MoE: ``x_, logits_and_experts = self.mlp(...)``, the router
    logits and chosen experts kept for the losses."""

    def __init__(self, expert_choice: bool = False, n_shared: int = 0, softmax_order: str = "softmax_topk") -> None:
        super().__init__()
        config = _Config(
            n_embd=D,
            moe_num_experts=4 + n_shared,
            moe_num_shared_experts=n_shared,
            moe_num_experts_per_tok=2,
            moe_softmax_order=softmax_order,
            capacity_factor=2.0,
            batch_size=2,
            sequence_length=5,
        )
        self.mlp = LlmBaselinesExpertChoiceMoE(config) if expert_choice else LlmBaselinesMoE(config)
        self.logits_and_experts: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_, self.logits_and_experts = self.mlp(x)
        return x_


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("n_shared", "softmax_order", "train", "attach"),
    [
        (1, "softmax_topk", False, {"include": "layers.*.mlp.router"}),
        (0, "topk_softmax", True, {}),
    ],
    ids=["shared-expert-named", "topk-softmax-train"],
)
def test_llm_baselines_moe_replays_as_by_hand(
    n_shared: int, softmax_order: str, train: bool, attach: dict[str, object]
) -> None:
    """epfml/llm-baselines' ``MoE``: a bare ``router`` Linear in the block, its top-k (of the fp32 probabilities, or
    of the logits softmaxed after), the routed ids offset by the shared experts that head the same ``experts`` list.
    Found with zero configuration (with a shared expert in the list, named by ``include=``: see the next test); the
    recorded rows are the routed ids ``torch.where`` dispatched by (the shared expert, run on every token, is no
    route), and a replay after the router changes forces them, in output and gradients as by hand."""
    model = _one_block(lambda: LlmBaselinesBlock(n_shared=n_shared, softmax_order=softmax_order))()
    session = assert_exact(model, _seq(), train=train, **attach)
    assert session.names == ("layers.0.mlp.router",), session.names


@pytest.mark.reliability("false refusals")
def test_llm_baselines_moe_with_shared_experts_in_its_list_is_found_with_zero_configuration() -> None:
    """epfml/llm-baselines' ``MoE`` with ``moe_num_shared_experts=1``: the block's ``experts`` list holds the shared
    expert first and the routed ones after it, the ``router`` Linear scores the routed ones only (one row fewer than
    the list) and the block says ``n_shared_experts``. Zero configuration should find the router as it does without
    the shared expert (a wider router, rows for shared experts, is accepted too), and replays as by hand."""
    model = _one_block(lambda: LlmBaselinesBlock(n_shared=1))()
    session = assert_exact(model, _seq())
    assert session.names == ("layers.0.mlp.router",), session.names


@pytest.mark.reliability("refusals")
@pytest.mark.parametrize("softmax_order", ["softmax_topk", "topk_softmax"])
def test_llm_baselines_expert_choice_moe_is_refused(softmax_order: str) -> None:
    """epfml/llm-baselines' ``ExpertChoiceMoE``: each expert's ``torch.topk`` over the tokens of the transposed
    probabilities (or logits) picks its tokens, so a token gets anywhere from none to every expert. That is no choice
    of k experts per token: it is refused at the first capture as expert-choice routing, the model left as it was."""
    model = _one_block(lambda: LlmBaselinesBlock(expert_choice=True, softmax_order=softmax_order))()
    assert_refused(model, _seq(), "expert-choice routing")


# ----------------------------------------------------------------------- nano-train: capacity drops in the block
# lastweek/nano-train src/models/moe.py (``TopKRouter``, ``LocalRoutedMoE``, ``ExpertMLP``): a DeepSeek-style router
# module over flattened tokens, its bias-free ``router`` Linear scored by ``sigmoid`` (or ``softmax``); with
# ``n_group > 1`` each group's ``max`` score, a ``torch.topk`` of the groups and a boolean mask that zeroes (sigmoid) or
# sets to ``-inf`` (softmax) the other groups' scores; ``torch.topk`` of those scores, the k values renormalised by
# their clamped sum (sigmoid, ``norm_topk_prob``) or softmaxed, times ``routed_scaling_factor``, and an auxiliary loss
# from a ``one_hot`` of the ids. The local MoE then runs, per expert, ``(topk_indices == e).nonzero()``; an expert
# over its capacity ``ceil(capacity_factor * tokens * k / E)`` keeps its ``torch.topk`` of the detached weights of
# its (token, slot) pairs (a second choice, over the tokens, from the current scores); ``output[token_indices] +=``
# adds the weighted SwiGLU outputs, and the shared experts' mean is added to every token.
class NanoTrainExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class NanoTrainRouterOutput(NamedTuple):
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor
    aux_loss: torch.Tensor
    dropped_fraction: float


class NanoTrainTopKRouter(_Used):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        scoring_func: str,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring_func = scoring_func
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = True
        self.routed_scaling_factor = routed_scaling_factor
        self.router = nn.Linear(hidden_size, num_experts, bias=False)

    def _score_experts(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def _apply_group_routing(self, scores: torch.Tensor) -> torch.Tensor:
        if self.n_group <= 1 or self.topk_group >= self.n_group:
            return scores
        num_tokens = scores.size(0)
        experts_per_group = self.num_experts // self.n_group
        grouped_scores = scores.view(num_tokens, self.n_group, experts_per_group)
        group_scores = grouped_scores.max(dim=-1).values
        selected_groups = torch.topk(group_scores, k=self.topk_group, dim=-1).indices
        if self.forced is not None:  # (by hand: the groups of the forced experts)
            selected_groups = self.forced // experts_per_group
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, selected_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts_per_group).reshape(num_tokens, self.num_experts)
        if self.scoring_func == "sigmoid":
            return torch.where(expert_mask, scores, torch.zeros_like(scores))
        return torch.where(expert_mask, scores, torch.full_like(scores, float("-inf")))

    def _compute_aux_loss(self, scores: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "sigmoid":
            normed_scores = scores / torch.clamp(scores.sum(dim=-1, keepdim=True), min=1e-9)
        else:
            normed_scores = scores
        assignments = F.one_hot(topk_indices, num_classes=self.num_experts).float().mean(dim=1)
        return (assignments.mean(dim=0) * normed_scores.mean(dim=0)).sum() * float(self.num_experts)

    def forward(self, tokens: torch.Tensor) -> NanoTrainRouterOutput:
        logits = self.router(tokens)
        scores = self._score_experts(logits)
        routed_scores = self._apply_group_routing(scores)
        topk_weights, topk_indices = torch.topk(routed_scores, k=self.top_k, dim=-1)
        if self.forced is not None:
            topk_indices = self.forced
            topk_weights = routed_scores.gather(1, topk_indices)
        self.used = topk_indices
        if self.scoring_func == "sigmoid" and self.norm_topk_prob:
            topk_weights = topk_weights / torch.clamp(topk_weights.sum(dim=-1, keepdim=True), min=1e-9)
        elif self.scoring_func == "softmax":
            topk_weights = torch.softmax(topk_weights, dim=-1)
        topk_weights = topk_weights * self.routed_scaling_factor
        aux_loss = self._compute_aux_loss(scores, topk_indices)
        return NanoTrainRouterOutput(topk_indices, topk_weights, aux_loss, 0.0)


class NanoTrainLocalRoutedMoE(nn.Module):
    def __init__(
        self, capacity_factor: float, scoring_func: str = "sigmoid", n_group: int = 1, n_shared_experts: int = 1
    ) -> None:
        super().__init__()
        self.hidden_size = D
        self.num_experts = 4
        self.top_k = 2
        self.capacity_factor = capacity_factor
        self.router = NanoTrainTopKRouter(D, 4, 2, scoring_func, n_group, 1, 2.5)
        self.experts = nn.ModuleList([NanoTrainExpertMLP(D, 8) for _ in range(4)])
        self.shared_experts = nn.ModuleList([NanoTrainExpertMLP(D, 8) for _ in range(n_shared_experts)])
        self._last_aux_loss = torch.zeros(())
        self._last_dropped_fraction = 0.0
        self._last_token_counts = torch.zeros(4, dtype=torch.long)

    def _compute_capacity(self, num_tokens: int) -> int:
        if num_tokens <= 0:
            return 0
        expected = (num_tokens * self.top_k) / float(self.num_experts)
        return max(int(math.ceil(self.capacity_factor * expected)), 1)  # noqa: RUF046 (as upstream)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_size = x.shape
        tokens = x.reshape(-1, hidden_size)
        output = torch.zeros_like(tokens)
        router_output = self.router(tokens)
        topk_indices = router_output.topk_indices
        topk_weights = router_output.topk_weights
        capacity = self._compute_capacity(tokens.size(0))
        dropped = 0
        self.kept: dict[int, list[int]] = {}
        token_counts = torch.zeros(self.num_experts, dtype=torch.long, device=tokens.device)
        for expert_idx, expert in enumerate(self.experts):
            selected = (topk_indices == expert_idx).nonzero(as_tuple=False)
            if selected.numel() == 0:
                continue
            token_indices = selected[:, 0]
            slot_indices = selected[:, 1]
            sort_weights = topk_weights[token_indices, slot_indices].detach()
            if capacity > 0 and token_indices.numel() > capacity:
                keep_rel = torch.topk(sort_weights, k=capacity, sorted=True).indices
                token_indices = token_indices[keep_rel]
                slot_indices = slot_indices[keep_rel]
                dropped += selected.size(0) - capacity
            self.kept[expert_idx] = sorted(token_indices.tolist())  # (ours: the tokens the expert ran on)
            expert_out = expert(tokens[token_indices])
            weights = topk_weights[token_indices, slot_indices].unsqueeze(-1)
            output[token_indices] += expert_out * weights
            token_counts[expert_idx] = token_indices.numel()
        if self.shared_experts:
            shared = torch.zeros_like(tokens)
            for shared_expert in self.shared_experts:
                shared += shared_expert(tokens)
            output += shared / float(len(self.shared_experts))
        self._last_aux_loss = router_output.aux_loss
        self._last_dropped_fraction = float(dropped / max(topk_indices.numel(), 1))
        self._last_token_counts = token_counts
        return output.view(batch_size, seq_len, hidden_size)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("scoring_func", "n_group", "train"),
    [("sigmoid", 2, False), ("softmax", 2, True)],
    ids=["sigmoid-two-groups", "softmax-two-groups-train"],
)
def test_nano_train_router_under_its_capacity_replays_as_by_hand(scoring_func: str, n_group: int, train: bool) -> None:
    """nano-train's ``TopKRouter`` (a module over flattened tokens; sigmoid scores renormalised and scaled, or the k
    values softmaxed; with two groups, the weights the top-k values of the group-masked scores themselves) in its
    ``LocalRoutedMoE`` with a capacity no expert reaches: found with zero configuration, the recorded rows are the
    ids each expert's ``nonzero()`` dispatched by, and a replay after the router changes forces them, with the groups
    they lie in kept (their weights the current scores, not the zero or ``-inf`` of a group the current scores would
    leave out), in output and gradients as by hand (the shared expert's mean added to every token)."""
    model = _one_block(
        lambda: NanoTrainLocalRoutedMoE(capacity_factor=4.0, scoring_func=scoring_func, n_group=n_group)
    )()
    session = assert_exact(model, _seq(), train=train)
    assert session.names in {("layers.0.router",), ("layers.0.router.router",)}, session.names


@pytest.mark.reliability("silent replays")
def test_nano_train_capacity_drop_by_detached_weight_is_replayed_or_refused() -> None:
    """nano-train's ``LocalRoutedMoE`` at ``capacity_factor=1``: an expert over ``ceil(tokens * k / E)`` assignments
    keeps its ``torch.topk`` of the detached weights of its (token, slot) pairs, a second choice over the tokens from
    the current scores. A replay after the router changes must have each expert run on the tokens it ran on at
    capture (the drops recorded and replayed), or be refused with a ``MoEReplayError``; today the router's top-k is
    forced and the drops are made again from the changed scores, silently: other tokens lose their expert."""
    model = _one_block(lambda: NanoTrainLocalRoutedMoE(capacity_factor=1.0))().eval()
    block = model.layers[0]
    x = _seq()
    with torch.no_grad():
        model(x)
    if block._last_dropped_fraction == 0:  # (not an AssertionError: the marker must not take it for the gap)
        pytest.fail("no expert went over its capacity: the case tries nothing")
    captured = dict(block.kept)
    try:
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                model(x)
            routes = session.routes()
            perturb(model, 3.0)
            with torch.no_grad():
                model(x)
            if block.kept == captured:
                pytest.fail("the changed router drops the captured tokens anyway: the case tries nothing")
            with torch.no_grad(), session.replay(routes):
                model(x)
    except mr.MoEReplayError:
        return
    assert block.kept == captured, f"the replay's experts ran on {block.kept}, at capture on {captured}"


# ----------------------------------------------------------------------- energy-aware routing: a cost fed per call
# hrishabhg/energy-aware-moe-router src/models/moe.py (``TopKGating``, ``MoELayer``, ``Expert``): the gate's bias-free
# ``W_g`` Linear gives logits, from which ``lambda_energy * e_gpu.detach()`` is subtracted, ``e_gpu`` being a
# per-expert energy cost (read live from the GPUs' power draw) that the caller passes to every forward beside the
# tokens; ``torch.topk`` of the penalised logits, the k values softmaxed; the auxiliary dict holds a balance loss
# from a ``scatter_add_`` of the top-1 ids, the energy loss ``e_gpu[top_k_indices].mean()`` and the router entropy.
# The layer runs each expert on ``(top_k_indices == e).any(-1)`` and, per slot, adds ``weights *
# expert_output[torch.searchsorted(token_indices, slot_indices)]``.
class EnergyTopKGating(_Used):
    def __init__(self, d_model: int, num_experts: int, top_k: int, lambda_energy: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.lambda_energy = lambda_energy
        self.W_g = nn.Linear(d_model, num_experts, bias=False)

    def forward(
        self, x: torch.Tensor, e_gpu: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        num_tokens = x.shape[0]
        logits = self.W_g(x)
        if e_gpu is not None and self.lambda_energy > 0:
            logits = logits - self.lambda_energy * e_gpu.detach()
        router_probs = F.softmax(logits, dim=-1)
        top_k_logits, top_k_indices = torch.topk(logits, self.top_k, dim=-1)
        if self.forced is not None:
            top_k_indices = self.forced
            top_k_logits = logits.gather(1, top_k_indices)
        self.used = top_k_indices
        top_k_weights = F.softmax(top_k_logits, dim=-1)
        expert_counts = torch.zeros(self.num_experts, device=x.device, dtype=x.dtype)
        expert_counts.scatter_add_(0, top_k_indices[:, 0], torch.ones(num_tokens, device=x.device, dtype=x.dtype))
        f_i = expert_counts / num_tokens
        balance_loss = self.num_experts * (f_i * router_probs.mean(dim=0)).sum()
        energy_loss = e_gpu[top_k_indices].mean() if e_gpu is not None else torch.tensor(0.0)
        router_entropy = (-(router_probs * torch.log(router_probs + 1e-10)).sum(dim=-1)).mean()
        aux = {
            "balance_loss": balance_loss,
            "energy_loss": energy_loss,
            "router_entropy": router_entropy,
            "expert_load": f_i.detach(),
        }
        return top_k_indices, top_k_weights, aux


class EnergyExpert(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class EnergyMoELayer(nn.Module):
    def __init__(self, num_experts: int = 4, top_k: int = 2, lambda_energy: float = 2.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = EnergyTopKGating(D, num_experts, top_k, lambda_energy)
        self.experts = nn.ModuleList([EnergyExpert(D, 8) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, e_gpu: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        B, T, D_ = x.shape
        x_flat = x.reshape(B * T, D_)
        top_k_indices, top_k_weights, aux = self.gate(x_flat, e_gpu)
        output = torch.zeros_like(x_flat)
        for expert_idx in range(self.num_experts):
            mask = top_k_indices == expert_idx
            if not mask.any():
                continue
            token_mask = mask.any(dim=-1)
            expert_output = self.experts[expert_idx](x_flat[token_mask])
            for k_idx in range(self.top_k):
                slot_mask = mask[:, k_idx]
                if not slot_mask.any():
                    continue
                weights = top_k_weights[slot_mask, k_idx].unsqueeze(-1)
                token_indices = torch.where(token_mask)[0]
                slot_indices = torch.where(slot_mask)[0]
                pos_in_expert = torch.searchsorted(token_indices, slot_indices)
                output[slot_mask] += weights * expert_output[pos_in_expert]
        return output.reshape(B, T, D_), aux


class EnergyAwareLM(nn.Module):
    """The model's use of the layer (ours, small): ``forward(x, e_gpu)`` hands the energy vector to every MoE layer,
    the auxiliary losses kept for the trainer."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([EnergyMoELayer()])
        self.aux: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor, e_gpu: torch.Tensor | None = None) -> torch.Tensor:
        self.aux = []
        for layer in self.layers:
            out, aux = layer(x, e_gpu)
            self.aux.append(aux)
            x = x + out
        return x


class _FedEnergy(nn.Module):
    """The training loop's call, ``model(x, e_gpu)``, with the monitor's reading of the moment (``e_gpu``)."""

    def __init__(self, e_gpu: torch.Tensor) -> None:
        super().__init__()
        self.lm = EnergyAwareLM()
        self.e_gpu = e_gpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(x, self.e_gpu)


def _energy(*values: float) -> torch.Tensor:
    return torch.tensor(values)


@pytest.mark.reliability("silent replays")
def test_energy_aware_router_fed_a_cost_per_call_replays_as_by_hand() -> None:
    """The energy-aware router: the per-expert energy cost the caller feeds each forward, scaled by
    ``lambda_energy``, subtracted from the logits before the top-k. Found with zero configuration; the recorded rows are
    the experts each token's ``any(-1)`` mask sent it to, and a replay after the router changes forces them, in output
    and gradients as by hand. A replay under another energy reading (experts 0 and 1 made the dearest, so the free
    choice leaves every token that took them) still forces the recorded experts, its weights the softmax of their
    current penalised logits."""
    model = _FedEnergy(_energy(0.1, 0.9, 0.4, 0.6))
    session = assert_exact(model, _seq(), train=True)
    assert session.names == ("lm.layers.0.gate",), session.names
    gate = model.lm.layers[0].gate
    x = _seq()
    model.lm.aux = []  # (the last run's losses, with their graphs)
    ref = copy.deepcopy(model)
    ref.e_gpu = model.e_gpu = _energy(0.0, 0.0, 0.0, 0.0)
    dear = _energy(50.0, 50.0, 0.0, 0.0)  # experts 0 and 1 dearest: a free choice takes 2 and 3
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        rows = routes.layer("lm.layers.0.gate").long()
        assert torch.isin(rows, torch.tensor([0, 1])).any(), "no token chose expert 0 or 1: the case tries nothing"
        ref.e_gpu = model.e_gpu = dear
        with torch.no_grad():
            model(x)
            assert gate.used is not None and not torch.equal(_sets(gate.used), _sets(rows))
            with session.replay(routes):
                replayed = model(x)
        assert gate.used is not None and torch.equal(_sets(gate.used), _sets(rows)), "the replay did not force them"
    ref_gate = ref.lm.layers[0].gate
    assert isinstance(ref_gate, EnergyTopKGating)
    with torch.no_grad():
        ref_gate.forced = rows
        assert torch.equal(ref(x), replayed), "the replay is not the recorded experts forced by hand"


# ----------------------------------------------------------------------- Super Tiny LMs: every expert run, gathered
# LeonGuertler/SuperTinyLanguageModels models/components/ffn/moe.py (``GatingNetwork``, ``MoEFeedForward``,
# ``Expert``): the ``gating_network`` module returns the softmax of its Linear (with a bias); every expert runs on
# every token and the outputs are stacked on dim 1 (``[B, E, S, H]``); ``torch.topk`` of the probabilities in the
# block, and ``torch.gather`` on dim 1 with the ids expanded to ``[B, S, k, H]`` reads the chosen experts' outputs
# (as written upstream, slot ``j`` reads each chosen expert's output at position ``j``), weighted by the k
# probabilities (not renormalised) and summed.
class StlmExpert(nn.Module):
    def __init__(self, hidden_dim: int, ffn_dim: int, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(hidden_dim, ffn_dim, bias=bias)
        self.linear_2 = nn.Linear(ffn_dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class StlmGatingNetwork(nn.Module):
    def __init__(self, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.linear(x), dim=-1)


class StlmMoEFeedForward(_Used):
    def __init__(self, hidden_dim: int = D, ffn_dim: int = 8, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList([StlmExpert(hidden_dim, ffn_dim, False) for _ in range(num_experts)])
        self.gating_network = StlmGatingNetwork(hidden_dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert_outputs = torch.stack([expert(x) for expert in self.experts], dim=1)
        gate_outputs = self.gating_network(x)
        top_k_gate_values, top_k_gate_indices = torch.topk(gate_outputs, self.top_k, dim=-1)
        if self.forced is not None:
            top_k_gate_indices = self.forced.view(*x.shape[:-1], self.top_k)
            top_k_gate_values = gate_outputs.gather(-1, top_k_gate_indices)
        self.used = top_k_gate_indices.reshape(-1, self.top_k)
        top_k_expert_outputs = torch.gather(
            expert_outputs, 1, top_k_gate_indices.unsqueeze(-1).expand(-1, -1, -1, expert_outputs.size(-1))
        )
        return (top_k_gate_values.unsqueeze(-1) * top_k_expert_outputs).sum(dim=2)


@pytest.mark.reliability("silent replays")
def test_stlm_dense_experts_gathered_by_the_topk_replay_as_by_hand() -> None:
    """SuperTinyLanguageModels' ``MoEFeedForward``: every expert run on every token, the ``gating_network``'s
    probabilities ranked by a top-k in the block and the chosen outputs read by a ``torch.gather`` of the stacked
    ``[B, E, S, H]`` outputs. Found with zero configuration; the recorded rows are the ids the gather read by, and a
    replay after the gate changes forces them, in output and gradients as by hand."""
    model = _one_block(StlmMoEFeedForward)()
    session = assert_exact(model, _seq(), train=True)
    assert session.names == ("layers.0.gating_network",), session.names
