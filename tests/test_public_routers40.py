"""MoE code of torchao (its quantizable MoE feed-forward, experts by ``torch._grouped_mm``), of LightLLM (the
pure-PyTorch ``grouped_topk`` of its inference server, the correction bias added IN PLACE to the scores it then
takes the weights from), of nanoMoE (nanoGPT with a noisy top-k router, expert capacity and a dense dispatch by
one-hot capacity slots), of MoDE (a diffusion policy whose router reads only the noise level's embedding, sampling
its experts in training) and of ort_moe (the MoE of PyTorch's ONNX Runtime training package: a top-2 gate whose
dispatch is an ``[E, C]`` table of token ids), with zero configuration where they are found so (see
``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import einops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import perturb
from tests.test_public_routers2 import _forced_by_hand
from tests.test_public_routers6 import _routers, _sets, _Used, assert_exact, assert_refused


# ----------------------------------------------------------------------- torchao: MoEFeedForwardAOQuantizable
# pytorch/ao torchao/prototype/moe_quant/quantizable_moe_modules.py (``MoEFeedForwardAOQuantizable``,
# ``ExpertsAOQuantizable._forward_grouped_mm``, the default path): a bias-free ``router`` Linear over the flattened
# tokens, a softmax over all experts, ``torch.topk`` of the probabilities renormalised IN PLACE (``scores /= ...``);
# the experts are stacked ``up_proj`` ``[E, 2F, D]`` / ``down_proj`` ``[E, D, F]`` Parameters run by
# ``torch._grouped_mm``: the flat ids ordered by a STABLE ``argsort``, the token of each slot by ``div(top_k)
# .floor()``, the rows per expert counted by ``torch.histc`` of the ids as floats (on CPU), their ``cumsum`` the
# group offsets; the weighted outputs ``scatter_add``-ed back to their tokens.
class AoExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_dim: int, expert_dim: int, act_fn: Callable = F.silu) -> None:
        super().__init__()
        # (``empty_init=False`` upstream draws them by ``randn``; scaled here to keep the outputs small)
        self.up_proj = nn.Parameter(torch.randn(num_experts, 2 * expert_dim, hidden_dim) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_dim, expert_dim) * 0.2)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        orig_shape = x.shape
        x = x.view(-1, x.shape[-1])
        final_out = self._forward_grouped_mm(x, expert_indices, scores, self.up_proj, self.down_proj, self.act_fn)
        return final_out.view(orig_shape)

    @staticmethod
    def _forward_grouped_mm(
        x: torch.Tensor,
        expert_indices: torch.Tensor,
        scores: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        act_fn: Callable,
    ) -> torch.Tensor:
        num_experts, hidden_dim, expert_dim = down_proj.shape
        num_tokens, top_k = expert_indices.shape
        num_token_activations = num_tokens * top_k
        expert_indices = expert_indices.view(-1)
        ordered_token_activations = expert_indices.argsort(stable=True)
        ordered_token_indices = ordered_token_activations.div(top_k).floor().to(torch.int32)
        indices_for_histc = expert_indices if expert_indices.is_cuda else expert_indices.float()
        num_tokens_per_expert = torch.histc(indices_for_histc, bins=num_experts, min=0, max=num_experts)
        offs = num_tokens_per_expert.cumsum(dim=0).to(torch.int32)
        ordered_inputs = x[ordered_token_indices]
        ordered_scores = scores.view(-1, 1)[ordered_token_activations]
        gate, up = torch._grouped_mm(ordered_inputs, up_proj.transpose(-2, -1), offs).chunk(2, dim=1)
        y1 = act_fn(gate) * up
        ordered_outs = torch._grouped_mm(y1, down_proj.transpose(-2, -1), offs)
        ordered_weighted_outs = ordered_scores * ordered_outs
        final_out = torch.zeros_like(x)
        final_out = final_out.scatter_add(
            dim=0,
            index=ordered_token_indices.unsqueeze(-1).expand(num_token_activations, hidden_dim).to(torch.int64),
            src=ordered_weighted_outs,
        )
        return final_out


class AoMoEFeedForward(_Used):
    def __init__(self, num_experts: int, hidden_dim: int, expert_dim: int, top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_dim, num_experts, bias=False)
        self.experts = AoExperts(num_experts, hidden_dim, expert_dim)
        self.top_k = top_k
        self.shared_expert: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, hidden_dim = x.shape
        x = x.view(-1, hidden_dim)
        scores = self.router(x)
        scores = F.softmax(scores, dim=-1)
        probs = scores
        scores, expert_indices = torch.topk(scores, self.top_k, dim=-1)
        if self.forced is not None:
            expert_indices = self.forced
            scores = probs.gather(-1, expert_indices)
        self.used = expert_indices
        scores /= scores.sum(dim=-1, keepdim=True).to(x.dtype)
        out = self.experts(x, expert_indices, scores)
        if self.shared_expert:
            out += self.shared_expert(x)
        return out.reshape(batch_size, -1, hidden_dim)


class AoMoEBlock(nn.Module):
    """torchao's mixtral-moe ``TransformerBlock``, its attention left out: ``x + feed_forward(ffn_norm(x))``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ffn_norm = nn.LayerNorm(16)
            # (dims of 16-byte multiples: ``torch._grouped_mm`` wants its strides aligned so)
            self.feed_forward = AoMoEFeedForward(num_experts=4, hidden_dim=16, expert_dim=24, top_k=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.feed_forward(self.ffn_norm(x))


def _grouped_mm_runs_on_cpu() -> bool:
    """Whether this torch runs ``torch._grouped_mm`` on CPU tensors (older releases have it for CUDA only)."""
    try:
        x, w = torch.zeros(4, 4), torch.zeros(2, 4, 4)
        torch._grouped_mm(x, w, torch.tensor([2, 4], dtype=torch.int32))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.reliability("silent replays")
@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="this torch has no CPU torch._grouped_mm")
def test_torchao_quantizable_moe_with_grouped_mm_experts_replays_as_by_hand() -> None:
    """torchao's ``MoEFeedForwardAOQuantizable``: a top-2 of the softmax probabilities renormalised in place; the
    ids ordered by a stable ``argsort``, counted by ``histc`` of floats, and the experts run by ``torch._grouped_mm``
    over those groups, the weighted outputs ``scatter_add``-ed back. Found with zero configuration; the recorded rows
    are the experts each token ran, and a replay after the router changes forces them, in output and gradients as
    by hand."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    # (a change of 3 leaves a token both forced probabilities underflowed to zero: upstream's renormalisation, with no
    # epsilon, then gives NaN, alike by hand and in the replay, which no equality can compare)
    session = assert_exact(AoMoEBlock(), x, change=1.0)
    assert session.names == ("feed_forward.router",), session.names


# ----------------------------------------------------------------------- LightLLM: grouped_topk, bias added in place
# ModelTC/lightllm lightllm/common/fused_moe/topk_select.py (``select_experts``, ``grouped_topk``; the pure-PyTorch
# path, taken unless ``GROUPED_TOPK_CUDA`` is set): the scores a sigmoid (or softmax) of the gate's logits, the
# ``correction_bias`` added to them IN PLACE (``scores.add_``), so that the weights are taken from the BIASED
# scores; each group's ``max``, ``torch.topk(..., sorted=False)`` of the groups, a 0/1 group mask scattered and
# expanded, the scores of the groups left out ``masked_fill``-ed with 0, ``torch.topk(..., sorted=False)`` of them,
# the weights renormalised, returned as float32 weights and int32 ids. The block around it is ours, a DeepSeek-V3
# MoE as its inference server runs one (a gate matrix, the correction bias, the routed scaling factor, a shared
# expert); its fused Triton experts stand in for a loop over the experts. Inference only: the in-place add on the
# sigmoid's output leaves no backward, so the check runs without gradients.
def _lightllm_grouped_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    correction_bias: torch.Tensor | None,
    topk: int,
    renormalize: bool,
    num_expert_group: int = 0,
    topk_group: int = 0,
    scoring_func: str = "softmax",
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert hidden_states.shape[0] == gating_output.shape[0], "Number of tokens mismatch"
    if scoring_func == "sigmoid":
        scores = torch.sigmoid(gating_output)
    else:
        scores = torch.softmax(gating_output, dim=-1)
    if correction_bias is not None:
        scores.add_(correction_bias)
    num_token = scores.shape[0]
    group_scores = scores.view(num_token, num_expert_group, -1).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(num_token, num_expert_group, scores.shape[-1] // num_expert_group)
    ).reshape(num_token, -1)
    tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
    topk_weights, topk_ids = torch.topk(tmp_scores, k=topk, dim=-1, sorted=False)
    if forced is not None:
        topk_ids = forced
        topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(torch.float32), topk_ids.to(torch.int32)


class LightLLMDeepseekMoE(_Used):
    def __init__(self, hidden: int = 16, inter: int = 24, n_routed: int = 8, n_group: int = 4) -> None:
        super().__init__()
        # (the layer's settings, read from the network config as lightllm's DeepSeek layers keep them)
        self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group = n_routed, 2, n_group, 2
        self.routed_scaling_factor = 2.5
        self.moe_gate = nn.Parameter(torch.randn(hidden, n_routed) * 0.5)
        # (the checkpoint's ``e_score_correction_bias``: a bias as it stands after training)
        self.register_buffer("e_score_correction_bias", torch.linspace(-0.1, 0.1, n_routed))
        self.experts_w13 = nn.Parameter(torch.randn(n_routed, 2 * inter, hidden) * 0.2)
        self.experts_w2 = nn.Parameter(torch.randn(n_routed, hidden, inter) * 0.2)
        self.shared_experts = nn.Sequential(nn.Linear(hidden, inter, bias=False), nn.SiLU(), nn.Linear(inter, hidden))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden_states = input.view(-1, input.shape[-1])
        shared_output = self.shared_experts(hidden_states)
        router_logits = hidden_states.mm(self.moe_gate)
        topk_weights, topk_ids = _lightllm_grouped_topk(
            hidden_states,
            router_logits,
            self.e_score_correction_bias,
            self.num_experts_per_tok,
            True,
            num_expert_group=self.n_group,
            topk_group=self.topk_group,
            scoring_func="sigmoid",
            forced=self.forced,
        )
        self.used = topk_ids
        out = torch.zeros_like(hidden_states)
        for e in range(self.experts_w13.shape[0]):
            rows, slots = torch.where(topk_ids == e)
            gate, up = F.linear(hidden_states[rows], self.experts_w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.experts_w2[e])
            out.index_add_(0, rows, y * topk_weights[rows, slots, None].to(y.dtype))
        out.mul_(self.routed_scaling_factor)
        out.add_(shared_output)
        return out.view_as(input)


class LightLLMDeepseekBlock(nn.Module):
    """A DeepSeek-V3 decoder layer, its attention left out: ``x + moe(ffn_norm(x))``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ffn_norm = nn.LayerNorm(16)
            self.mlp = LightLLMDeepseekMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ffn_norm(x))


def _assert_exact_without_grad(model: nn.Module, x: torch.Tensor, *, change: float = 3.0) -> mr.Session:
    """:func:`assert_exact` for inference-only code (no backward): found as the ``_Used`` modules, the captured rows
    the experts used, and a replay after the routers change the recorded experts forced by hand."""
    model.eval()
    ref = copy.deepcopy(model)
    routers = _routers(model)
    with torch.no_grad(), mr.attach(model) as session:
        assert len(session.names) == len(routers), (session.names, list(routers))
        for name, own in zip(session.names, routers, strict=True):
            assert name == own or name.startswith(own + "."), (name, own)
        with session.capture():
            captured = model(x)
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        for (name, router), r in zip(routers.items(), rows, strict=True):
            assert router.used is not None
            assert torch.equal(_sets(r), _sets(router.used)), f"'{name}': the routes are not the experts used"
        with _forced_by_hand(ref, rows):
            assert torch.equal(ref(x), captured), "the rows forced by hand do not give the captured output"
        perturb(model, change)
        perturb(ref, change)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
        model(x)
        assert any(
            not torch.equal(_sets(r), _sets(m.used))
            for m, r in zip(routers.values(), rows, strict=True)
            if m.used is not None
        ), "the changed routers choose the recorded experts anyway: the case tries nothing"
        with session.replay(routes):
            replayed = model(x)
        for (name, router), r in zip(routers.items(), rows, strict=True):
            assert router.used is not None
            assert torch.equal(_sets(r), _sets(router.used)), f"'{name}': the replay did not force them"
        assert torch.equal(replayed, expected), "the replay is not the recorded experts forced by hand"
    return session


@pytest.mark.reliability("silent replays")
def test_lightllm_grouped_topk_with_bias_added_in_place_replays_as_by_hand() -> None:
    """LightLLM's pure-PyTorch ``grouped_topk``: sigmoid scores with the correction bias added in place (the weights
    taken from the biased scores), the top-2 of 4 groups by their max, ``masked_fill`` of the rest, an unsorted top-2,
    renormalised, returned as float32 weights and int32 ids, the routed output scaled in place and a shared expert
    added. Found with zero configuration; the recorded rows are the experts each token ran, and a replay after the
    gate changes forces them, as by hand (inference only: no backward exists)."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(6))
    session = _assert_exact_without_grad(LightLLMDeepseekBlock(), x)
    assert session.names == ("mlp",), session.names


# ----------------------------------------------------------------------- nanoMoE: noisy top-k, capacity, one-hot slots
# wolfecameron/nanoMoE model.py (``Router``, ``MLPExperts``, ``MOELayer``; nanoGPT made MoE, as copied in several
# study repos): a bias-free ``w_g`` Linear, in training softplus(``w_noise``)-scaled Gaussian noise added to the
# logits IN PLACE; ``topk`` of the logits scattered into a ``-inf`` tensor and softmaxed over all experts (only the k
# left nonzero); the capacity ``floor(k * factor * tokens / E)`` made even and at least ``min_capacity``; the
# one-hot choices put K first (``permute(1, 0, 2)``) so that a ``cumsum`` ranks all first choices before the second;
# a choice past capacity masked out (``*=`` of ``torch.lt``); the ranks one-hot over the capacity slots, the combine
# weights ``[tokens, E, capacity]``, their ``bool()`` the dispatch mask. The layer gathers each expert's batch by
# ``exp_mask.permute(1, 2, 0) @ x``, runs the experts as ``bmm``s of stacked ``c_fc`` / ``c_proj``, and combines by
# ``exp_weight @ exp_out``. (The auxiliary and z losses, off by default, are left off.)
@dataclasses.dataclass
class NanoMoEConfig:
    n_embd: int = 16
    n_exp: int = 4
    top_k: int = 2
    use_noisy_top_k: bool = True
    train_capacity: float = 1.25
    eval_capacity: float = 2.0
    min_capacity: int = 4
    router_use_full_prec: bool = False
    use_aux_loss: bool = False
    use_router_z_loss: bool = False
    bias: bool = False
    dropout: float = 0.0


class NanoMoERouter(_Used):
    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.n_exp = config.n_exp
        assert self.top_k >= 1 and self.top_k <= config.n_exp
        self.use_noisy_top_k = config.use_noisy_top_k
        self.train_capacity = config.train_capacity
        self.eval_capacity = config.eval_capacity
        self.min_capacity = config.min_capacity
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if self.use_noisy_top_k else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.size()
        num_tokens = B * T
        logits = self.w_g(x)
        if self.use_noisy_top_k:
            assert self.w_noise is not None
            noise = F.softplus(self.w_noise(x))
            noise *= torch.randn_like(noise)
            logits += noise
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=-1)
        if self.forced is not None:
            top_k_indices = self.forced.view(B, T, self.top_k)
            top_k_logits = logits.gather(-1, top_k_indices)
        self.used = top_k_indices.reshape(-1, self.top_k)
        router_probs = torch.full_like(logits, float("-inf"))
        router_probs.scatter_(-1, top_k_indices, top_k_logits)
        router_probs = F.softmax(router_probs, dim=-1)
        exp_capacity = self.get_capacity(num_tokens)
        exp_mask = F.one_hot(top_k_indices, num_classes=self.n_exp)
        exp_mask = exp_mask.view(num_tokens, self.top_k, self.n_exp)
        exp_mask = exp_mask.permute(1, 0, 2)
        exp_rank = exp_mask.reshape(self.top_k * num_tokens, self.n_exp)
        exp_rank = torch.cumsum(exp_rank, dim=0) - 1
        exp_rank = exp_rank.reshape(self.top_k, num_tokens, self.n_exp)
        exp_mask *= torch.lt(exp_rank, exp_capacity)
        used_capacity = torch.sum(exp_mask, dim=(0, 1))
        exp_rank = torch.sum(exp_mask * exp_rank, dim=-1)
        router_probs = router_probs.view(num_tokens, self.n_exp)[None, :]
        exp_weights = exp_mask * router_probs
        exp_rank_sc = F.one_hot(exp_rank, num_classes=exp_capacity)
        cb_weight = torch.sum(exp_weights.unsqueeze(3) * exp_rank_sc.unsqueeze(2), dim=0)
        sec_mask = cb_weight.bool()
        return used_capacity, cb_weight, sec_mask

    def get_capacity(self, tokens_per_batch: int) -> int:
        capacity_factor = self.train_capacity if self.training else self.eval_capacity
        capacity = math.floor(self.top_k * capacity_factor * tokens_per_batch / self.n_exp)
        capacity += capacity % 2
        capacity = max(capacity, self.min_capacity)
        assert capacity > 0
        return int(capacity)


class NanoMoEMLPExperts(nn.Module):
    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.bias = config.bias
        # (``torch.empty`` upstream, set by the model's init; drawn here)
        self.c_fc = nn.Parameter(torch.randn(config.n_exp, config.n_embd, 4 * config.n_embd) * 0.2)
        self.c_proj = nn.Parameter(torch.randn(config.n_exp, 4 * config.n_embd, config.n_embd) * 0.2)
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.bmm(x, self.c_fc)
        x = self.gelu(x)
        x = torch.bmm(x, self.c_proj)
        return self.dropout(x)


class NanoMoELayer(nn.Module):
    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.router = NanoMoERouter(config)
        self.experts = NanoMoEMLPExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, n_embd = x.size()
        num_tokens = B * T
        used_capacity, exp_weight, exp_mask = self.router(x)
        x = x.view(num_tokens, n_embd)
        exp_batches = exp_mask.permute(1, 2, 0).type_as(x) @ x
        exp_out = self.experts(exp_batches)
        exp_weight = exp_weight.view(num_tokens, -1)
        exp_out = exp_out.view(-1, n_embd)
        output = exp_weight @ exp_out
        return output.view(B, T, n_embd)


class NanoMoEBlock(nn.Module):
    """nanoGPT's ``Block`` with ``use_moe``, its attention left out: ``x + mlp(ln_2(x))``."""

    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ln_2 = nn.LayerNorm(config.n_embd)
            self.mlp = NanoMoELayer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_2(x))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [True, False], ids=["noisy-train", "eval"])
def test_nanomoe_capacity_router_with_one_hot_slots_replays_as_by_hand(train: bool) -> None:
    """nanoMoE's ``Router``: noisy logits in training, a top-2 scattered into ``-inf`` and softmaxed, an even capacity
    filled first choices first by a ``cumsum`` over the K-first one-hot choices, the choices past it dropped, the
    ranks one-hot over the capacity slots; the layer dispatches and combines by dense matmuls over those slots.
    Found with zero configuration; the recorded rows are the experts each token chose (a choice dropped for capacity
    included: the drop is a function of the choices), and a replay after the router changes forces them, in output
    and gradients as by hand."""
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(7))
    # (a change of 3 makes the noise so large that a forced expert's softmax weight underflows to zero under some
    # random states, and upstream then does not dispatch the token to it at all: refused, see below)
    session = assert_exact(NanoMoEBlock(NanoMoEConfig(train_capacity=0.75)), x, train=train, change=1.0)
    assert session.names == ("mlp.router",), session.names


def _loud_noise_nanomoe() -> NanoMoEBlock:
    """nanoMoE with its noise projection scaled up (as after training drives ``w_noise`` far): noise large enough
    that the softmax of a token's two noisy top-k logits underflows one to exactly zero under some random states."""
    model = NanoMoEBlock(NanoMoEConfig(train_capacity=0.75))
    assert model.mlp.router.w_noise is not None
    with torch.no_grad():
        model.mlp.router.w_noise.weight.mul_(200.0)
    return model.train()


@pytest.mark.reliability("silent replays")
def test_nanomoe_with_noise_that_zeroes_forced_experts_is_refused() -> None:
    """nanoMoE dispatches a token only where its combine weight is nonzero (``sec_mask = cb_weight.bool()``); with
    noise so loud that a chosen expert's weight underflows to zero, the decision held, whether a forced expert runs
    at all depends on the random state, which a replay does not keep: refused with a ``MoEReplayError``, the model
    as it was. (The condition is real: shown by hand first.)"""
    model = _loud_noise_nanomoe()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(7))
    router = model.mlp.router
    with torch.no_grad():
        h = model.ln_2(x)
        torch.manual_seed(0)
        router(h)
        assert router.used is not None
        router.forced = router.used.clone()
        try:
            masks = []
            for seed in range(4):
                torch.manual_seed(seed)
                masks.append(router(h)[2])
        finally:
            router.forced = None
    assert any(not torch.equal(masks[0], m) for m in masks[1:]), "the forced experts run alike under every random state"
    assert_refused(model, x, "which of its weights are zero", train=True)


# ----------------------------------------------------------------------- MoDE: routed by the noise level alone
# intuitive-robots/MoDE_Diffusion_Policy mode/models/networks/modedit.py (``RouterCond``, ``Mlp``, ``SwishGLU``,
# ``RMSNorm``, ``NoiseBlockMoE``): a diffusion policy's transformer block whose router reads only the noise level's
# embedding ``c`` (``cond_router``, ``router_context_cond_only``), repeated over the tokens by ``einops.repeat``; the
# router an ``Mlp`` (a SwishGLU projection with a bias, dropout, a Linear to E); its logits less their max, over a
# temperature, softmaxed and clamped to ``[1e-9, 1 - 1e-9]``; in training the experts SAMPLED by
# ``torch.multinomial(probs, k, replacement=False)``, in evaluation a ``topk``; a 0/1 ``router_mask`` and the chosen
# probabilities scattered, renormalised; the block runs each expert on the tokens of its ``router_mask`` column
# (boolean indexing, ``+=``) and keeps usage statistics. (The attention, the inference cache of experts per noise
# level, empty until ``precompute_experts``, and the usage statistics are left out.)
class MoDERMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.scale, self.eps = dim**-0.5, eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class MoDESwishGLU(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.act, self.project = nn.SiLU(), nn.Linear(in_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected, gate = self.project(x).tensor_split(2, dim=-1)
        return projected * self.act(gate)


class MoDEMlp(nn.Module):
    def __init__(self, n_embd: int, bias: bool, output_dim: int | None = None) -> None:
        super().__init__()
        n_embed_final = output_dim if output_dim is not None else n_embd
        self.mlp = nn.Sequential(
            MoDESwishGLU(n_embd, 4 * n_embd), nn.Dropout(0.0), nn.Linear(4 * n_embd, n_embed_final, bias=bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MoDERouterCond(_Used):
    def __init__(self, hidden_states: int, cond_dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = True
        self.temperature = 1.0
        self.use_argmax = False
        self.router = MoDEMlp(cond_dim, output_dim=num_experts, bias=True)

    def forward(
        self, inputs: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        input_shape = inputs.size()
        if cond.shape[-2] != inputs.shape[-2]:
            cond = einops.repeat(cond, "b t d -> b (t n) d", n=int(inputs.shape[-2] / cond.shape[-2]))
        logits = self.router(cond.reshape(-1, cond.size(-1)))
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / self.temperature
        probs = torch.softmax(logits, dim=-1)
        probs = torch.clamp(probs, min=1e-9, max=1 - 1e-9)
        flat_probs = probs.view(-1, probs.size(-1))
        if self.training and not self.use_argmax:
            top_k_indices = torch.multinomial(flat_probs, self.top_k, replacement=False)
        else:
            top_k_indices = flat_probs.topk(self.top_k, dim=-1).indices
        if self.forced is not None:
            top_k_indices = self.forced
        self.used = top_k_indices
        router_mask = torch.zeros_like(flat_probs).scatter_(1, top_k_indices, 1)
        router_probs = torch.zeros_like(flat_probs).scatter_(1, top_k_indices, flat_probs.gather(1, top_k_indices))
        router_mask = router_mask.view(*input_shape[:-1], -1)
        router_probs = router_probs.view(*input_shape[:-1], -1)
        top_k_indices = top_k_indices.view(*input_shape[:-1], -1)
        if self.normalize:
            router_probs = router_probs / router_probs.sum(dim=-1, keepdim=True)
        return router_mask, top_k_indices, router_probs, probs.view(*input_shape[:-1], -1)


class MoDENoiseBlockMoE(nn.Module):
    def __init__(self, n_embd: int = 16, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.ln_2 = MoDERMSNorm(n_embd, eps=1e-6)
        self.num_experts = num_experts
        self.router = MoDERouterCond(n_embd, n_embd, num_experts, top_k)
        self.experts = nn.ModuleDict({f"expert_{i}": MoDEMlp(n_embd, bias=False) for i in range(num_experts)})

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.ln_2(x)
        router_mask, top_k_indices, router_probs, true_probs = self.router(x, c)
        next_states = torch.zeros_like(x)
        for idx in range(self.num_experts):
            token_indices = router_mask[:, :, idx].bool()
            if token_indices.any():
                expert = self.experts[f"expert_{idx}"]
                probs = router_probs[:, :, idx][token_indices].unsqueeze(-1)
                next_states[token_indices] += probs * expert(x[token_indices]).to(next_states.dtype)
        return x + next_states


class MoDENet(nn.Module):
    """``MoDeDiT`` cut to one block: the noise level ``sigma`` embedded by ``sigma_emb`` (a Linear from 1) and
    ``sigma_linear``, the block fed the tokens and that embedding as ``c``; its input the tokens and ``sigma``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.sigma_emb = nn.Linear(1, 16)
            self.sigma_linear = nn.Linear(16, 16, bias=False)
            self.block = MoDENoiseBlockMoE()

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, sigma = inputs
        emb_t = self.sigma_linear(self.sigma_emb(sigma.log().view(-1, 1, 1) / 4))
        return self.block(x, emb_t)


def _mode_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(6, 3, 16, generator=g), torch.rand(6, generator=g) * 80 + 0.01


@pytest.mark.reliability("silent replays")
def test_mode_router_of_the_noise_level_replays_as_by_hand() -> None:
    """MoDE's ``RouterCond`` in evaluation: a top-2 of the clamped softmax of an MLP of the noise level's embedding
    alone, repeated over the tokens; the chosen probabilities scattered and renormalised, each expert run on its
    mask's tokens by boolean indexing. Found with zero configuration; the recorded rows are the experts each token
    ran, and a replay after the router changes forces them, in output and gradients as by hand."""
    session = assert_exact(MoDENet(), _mode_inputs())  # type: ignore[arg-type]
    assert session.names == ("block.router",), session.names


@pytest.mark.reliability("silent replays")
def test_mode_router_sampling_its_experts_in_training_is_refused() -> None:
    """In training MoDE samples its experts (``torch.multinomial`` without replacement): a random draw is the
    decision, refused with a ``MoEReplayError`` that names it, the model as it was."""
    assert_refused(MoDENet(), _mode_inputs(), "multinomial", train=True)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- ort_moe: top2gating, a dispatch table of ids
# pytorch/ort ort_moe/topKgate.py (``TopKGate``, ``top2gating``, ``top1gating``, ``multiplicative_jitter``,
# ``fast_one_hot``; adapted from fairscale's ``top2gating``): a bias-free ``wg`` Linear, a softmax; the first expert by
# ``argmax`` of the gates, one-hot by ``scatter`` (int64), the second by ``argmax`` of the LOGITS with the first
# ``masked_fill``-ed with ``-inf``; the capacity ``ceil(max(min(S, 2S/E * factor), 4))``; with
# ``token_drop_type='routing_weight'`` each expert keeps the ``topk`` over the tokens of ``max(mask1, mask2) * gates``
# (its ``capacity`` highest-weighted), with ``'cut'`` the choices past capacity (``cumsum`` locations, the second
# choices after all the first) are cut; the two gates stored as rows of a ``[2, S]`` tensor, renormalised in place (plus
# ``1e-9``); the dispatch a flat ``[E * C + 1]`` table of token ids (``-1`` for an empty place, the second choices
# offset by ``S``, the dropped ones written to the last, fake place) reshaped to ``[E, C]``. With ``k=1``: in training
# the gate input multiplied by a cached ``Uniform(1 - eps, 1 + eps).rsample`` (``switch_jitter``), an ``argmax`` of the
# gates, the choices past ``ceil(max(min(S, S/E * factor), 4))`` cut, the gates a ``[1, S]`` einsum of the gates and the
# mask. (The gate losses and logs, Gumbel noise, non-padding masks and the straight-through variant, all off by default,
# are left out; the layer runs each expert on the tokens of its row of the table, a loop of ours.)
def _ort_fast_one_hot(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    assert len(indices.shape) == 1, "indices should only be one dimension"
    ret = torch.zeros(indices.shape[0], num_classes, dtype=torch.int64, device=indices.device)
    ret = ret.scatter(-1, indices.unsqueeze(-1), 1)
    return ret


def _ort_top2gating(
    logits: torch.Tensor, capacity_factor: float, token_drop_type: str, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    gates = F.softmax(logits, dim=1)
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    capacity_fp = max(min(num_tokens, (2 * num_tokens / num_experts) * capacity_factor), 4)
    capacity = math.ceil(capacity_fp)
    indices1_s = torch.argmax(gates, dim=1)
    if forced is not None:
        indices1_s = forced[:, 0]
    mask1 = _ort_fast_one_hot(indices1_s, num_classes=num_experts)
    gates_nonpadding = gates
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    if forced is not None:
        indices2_s = forced[:, 1]
    mask2 = _ort_fast_one_hot(indices2_s, num_classes=num_experts)
    chosen = torch.stack([indices1_s, indices2_s], 1)
    if token_drop_type in ["random", "routing_weight"]:
        mask12 = torch.max(mask1, mask2)
        if token_drop_type == "random":
            priority = mask12 * torch.rand_like(mask1.float())
        else:
            priority = mask12 * gates_nonpadding
        _, cap_idx = torch.topk(priority, k=min(capacity, priority.shape[0]), dim=0)
        priority_mask = torch.zeros_like(mask1).scatter_(0, cap_idx, 1)
        mask1 *= priority_mask
        mask2 *= priority_mask
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)
    if token_drop_type == "cut":
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    mask1_float = mask1.float()
    mask2_float = mask2.float()
    gates12_s = torch.zeros(2, num_tokens).to(gates_nonpadding)
    gates12_s[0] = torch.sum(gates_nonpadding.reshape(gates_nonpadding.shape[0], -1) * mask1_float, dim=1)
    gates12_s[1] = torch.sum(gates_nonpadding.reshape(gates_nonpadding.shape[0], -1) * mask2_float, dim=1)
    denom_s = torch.sum(gates12_s, dim=0) + 1e-9
    gates12_s /= denom_s
    dispatch_mask = torch.full((num_experts * capacity + 1,), -1, dtype=torch.int64, device=logits.device)
    indices = torch.arange(0, num_tokens, dtype=torch.int64, device=logits.device)
    mask_sum1 = torch.sum(mask1, dim=1)
    dispatch_indices1 = torch.where(mask_sum1 == 0, -1, indices1_s * capacity + locations1_s)
    dispatch_mask[dispatch_indices1] = indices
    mask_sum2 = torch.sum(mask2, dim=1)
    dispatch_indices2 = torch.where(mask_sum2 == 0, -1, indices2_s * capacity + locations2_s)
    dispatch_mask[dispatch_indices2] = indices + num_tokens
    dispatch_mask = dispatch_mask[0:-1].reshape(num_experts, -1)
    return gates12_s, dispatch_mask, chosen, capacity_fp


_ort_uniform_map: dict[torch.device, Callable] = {}


def _ort_multiplicative_jitter(x: torch.Tensor, device: torch.device, epsilon: float = 1e-2) -> torch.Tensor:
    if epsilon == 0:
        return x
    minval = torch.empty([], device=device).fill_(1.0 - epsilon)
    maxval = torch.empty([], device=device).fill_(1.0 + epsilon)
    uniform = _ort_uniform_map.get(device)
    if uniform is None:
        uniform = torch.distributions.uniform.Uniform(low=minval, high=maxval).rsample
        _ort_uniform_map[device] = uniform
    return x * uniform(x.shape)


def _ort_top1gating(
    logits: torch.Tensor, capacity_factor: float, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``top1gating`` without expert slicing, its ``'cut'`` drop."""
    gates = F.softmax(logits, dim=1)
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    capacity_fp = max(min(num_tokens, (num_tokens / num_experts) * capacity_factor), 4)
    capacity = math.ceil(capacity_fp)
    indices_s = torch.argmax(gates, dim=1)
    if forced is not None:
        indices_s = forced[:, 0]
    chosen = indices_s.unsqueeze(1)
    mask1 = _ort_fast_one_hot(indices_s, num_classes=num_experts)
    gates_nonpadding = gates
    locations1 = torch.cumsum(mask1, dim=0) - 1
    mask1 = mask1 * torch.lt(locations1, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    dispatch_mask = torch.full((num_experts * capacity + 1,), -1, dtype=torch.int64, device=logits.device)
    indices = torch.arange(0, num_tokens, dtype=torch.int64, device=logits.device)
    mask_sum = torch.sum(mask1, dim=1)
    dispatch_indices = torch.where(mask_sum == 0, -1, indices_s * capacity + locations1_s)
    dispatch_mask[dispatch_indices] = indices
    dispatch_mask = dispatch_mask[0:-1].reshape(num_experts, -1)
    mask1_float = mask1.float()
    gates_nonpadding = gates_nonpadding.float()
    gates1_s = torch.einsum("se,se->s", gates_nonpadding, mask1_float).reshape(1, -1)
    return gates1_s, dispatch_mask, chosen, capacity_fp


class OrtTopKGate(_Used):
    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        token_drop_type: str,
        capacity_factor: float = 1.0,
        k: int = 2,
        switch_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor
        self.k = k
        self.switch_jitter = switch_jitter
        self.token_drop_type = token_drop_type

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        assert self.k == 1 or self.k == 2, "k can only be 1 or 2"
        if self.training and self.k == 1 and self.switch_jitter > 0:
            input = _ort_multiplicative_jitter(input, device=input.device, epsilon=self.switch_jitter)
        logits = self.wg(input)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            gates_s, dispatch_mask, chosen, capacity_fp = _ort_top1gating(logits, factor, self.forced)
        else:
            gates_s, dispatch_mask, chosen, capacity_fp = _ort_top2gating(
                logits, factor, self.token_drop_type, self.forced
            )
        self.used = chosen
        return gates_s, dispatch_mask, capacity_fp


class OrtMoEBlock(nn.Module):
    """A residual MoE block over ``[S, d]`` tokens: the gate's ``[2, S]`` weights and ``[E, C]`` table, each expert
    run on the tokens of its row (``id % S``, the slot ``id // S``), weighted and ``index_add``-ed back."""

    def __init__(self, token_drop_type: str, k: int = 2, switch_jitter: float = 0.0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(16)
            self.gate = OrtTopKGate(16, 4, token_drop_type, capacity_factor=0.75, k=k, switch_jitter=switch_jitter)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)) for _ in range(4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        gates12_s, dispatch_mask, _ = self.gate(h)
        num_tokens = h.shape[0]
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            ids = dispatch_mask[e][dispatch_mask[e] >= 0]
            tokens, slots = ids % num_tokens, ids // num_tokens
            out.index_add_(0, tokens, expert(h[tokens]) * gates12_s[slots, tokens, None])
        return x + out


@pytest.mark.reliability("silent replays")
def test_ort_moe_top2_gate_with_a_dispatch_table_replays_as_by_hand() -> None:
    """ort_moe's ``top2gating`` with ``token_drop_type='cut'``: an argmax of the gates, an argmax of the logits
    with the first masked, the choices past capacity cut in the ``cumsum`` order, the two gates renormalised in place
    in a ``[2, S]`` tensor and the dispatch an ``[E, C]`` table of token ids. Found with zero configuration; the
    recorded rows are the experts each token chose, and a replay after the gate changes forces them, in output and
    gradients as by hand."""
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(11))
    session = assert_exact(OrtMoEBlock("cut"), x)
    assert session.names == ("gate",), session.names


@pytest.mark.reliability("silent replays")
def test_ort_moe_top1_gate_with_multiplicative_jitter_replays_as_by_hand() -> None:
    """ort_moe's ``top1gating`` in training: the gate input multiplied by a ``Uniform(1 - eps, 1 + eps)`` sample
    (a cached ``rsample`` of ``torch.distributions``), an argmax of the softmax gates, the tokens past capacity cut,
    the gate of each kept token a ``[1, S]`` einsum of the gates and the mask. Found with zero configuration; the
    recorded rows are the experts each token chose, and a replay after the gate changes forces them, in output and
    gradients as by hand (the jitter drawn alike under the same seed)."""
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(12))
    session = assert_exact(OrtMoEBlock("cut", k=1, switch_jitter=0.1), x, train=True)
    assert session.names == ("gate",), session.names


@pytest.mark.reliability("silent replays")
def test_ort_moe_top2_gate_dropping_by_routing_weight_is_refused() -> None:
    """With ``token_drop_type='routing_weight'`` each expert keeps the tokens of the highest weights: which chosen
    experts a token keeps reads the current scores, so a replay of the choices could drop others than the capture:
    refused with a ``MoEReplayError``, the model as it was."""
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(11))
    assert_refused(OrtMoEBlock("routing_weight"), x, "chooses again from the current scores")
