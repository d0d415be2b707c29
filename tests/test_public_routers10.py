"""More public MoE router code, with zero configuration (see ``test_public_routers9``).

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
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E, Experts, dispatch, perturb
from tests.test_public_routers import ExpertChoiceBlock
from tests.test_public_routers2 import _forced_by_hand, _x
from tests.test_public_routers6 import GateBlock, Layers, MixtralGate, _Used, assert_exact
from tests.test_public_routers9 import ExpertMajorGate, _assert_refused, _pick


def _renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True)


# ----------------------------------------------------------------------- GLM-4.5 MoE: group top-2 sums, sigmoid, bias
class Glm4MoeGate(_Used):
    """huggingface/transformers ``Glm4MoeTopkRouter`` + ``Glm4MoeMoE.route_tokens_to_experts`` (GLM-4.5, the
    DeepSeek-V3 recipe): fp32 logits, sigmoid scores, ``e_score_correction_bias`` (a buffer) added for the choice
    only; each group scored by the sum of its ``topk(2)`` (with one group, a top-2 over every expert, the decision's
    own signature), ``topk_group`` groups kept by a ``topk(sorted=False)``, the other experts' scores filled with
    ``0.0``, ``topk(top_k, sorted=False)`` of those; the weights the unbiased scores gathered, renormalised, scaled
    by ``routed_scaling_factor``."""

    def __init__(self, n_group: int = 1, topk_group: int = 1) -> None:
        super().__init__()
        self.n_routed_experts, self.top_k, self.n_group, self.topk_group = E, 2, n_group, topk_group
        self.routed_scaling_factor = 2.5
        self.weight = nn.Parameter(torch.randn(E, D) / 4)
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = F.linear(x.float(), self.weight.float())
        scores = router_logits.sigmoid()
        choice = scores + self.e_score_correction_bias.unsqueeze(0)
        group_scores = choice.view(-1, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, E // self.n_group).reshape(-1, E)
        masked = choice.masked_fill(~score_mask.bool(), 0.0)
        if self.forced is None:
            idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1]
        else:
            idx = self.forced
        self.used = idx
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor, idx


# ----------------------------------------------------------------------- MiniMax-M2: sigmoid, bias, no groups
class MiniMaxM2Gate(_Used):
    """MiniMax-M2 ``MiniMaxM2SparseMoeBlock.route_tokens_to_experts``: a bare ``gate`` Linear, sigmoid of the fp32
    logits, ``e_score_correction_bias`` added for the choice, ``topk`` of the biased scores, the weights the unbiased
    scores gathered and renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).float().sigmoid()
        biased = scores + self.e_score_correction_bias
        idx = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices if self.forced is None else self.forced
        self.used = idx
        w = scores.gather(1, idx)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), idx


# ----------------------------------------------------------------------- X-MoE: low-dimensional cosine routing, top-1
class XMoEGate(_Used):
    """microsoft/unilm ``xmoe`` (Chi et al. 2022, "On the Representation Collapse of Sparse MoE"): the token
    projected to 4 dimensions (``wg_reduction``), the expert embeddings ``[E, 4]`` and the token L2-normalised, their
    product divided by a learned temperature clamped; top-1 by ``argmax``, its softmax probability the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 1
        self.wg_reduction = nn.Linear(D, 4, bias=False)
        self.wg = nn.Parameter(torch.randn(E, 4))
        self.gating_t = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.normalize(self.wg_reduction(x), p=2.0, dim=1, eps=1e-4)
        wg = F.normalize(self.wg, p=2.0, dim=1, eps=1e-4)
        logits = h @ wg.t() / self.gating_t.clamp(min=0.01)
        gates = logits.softmax(dim=1)
        idx = torch.argmax(gates, dim=1, keepdim=True) if self.forced is None else self.forced
        self.used = idx
        return gates.gather(1, idx), idx


# ----------------------------------------------------------------------- an MLP router
class MLPRouterGate(_Used):
    """A two-layer router (``Sequential(Linear, GELU, Linear)``, as in MoE-LLaVA's and several research repos'
    ``mlp`` router type): no ``[E, d]`` weight on the input, softmax, top-2, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.router = nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.router(x).softmax(-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- a router with its own norm
class NormedInputGate(_Used):
    """A router that normalises its input first (``LayerNorm`` then ``Linear``, as routers ported from JAX T5X
    code with a ``router_norm`` do), softmax of fp32 logits, top-2, not renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.norm = nn.LayerNorm(D)
        self.classifier = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.classifier(self.norm(x)).float().softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return w.type_as(x), idx


# ----------------------------------------------------------------------- soft-capped logits
class SoftcapGate(_Used):
    """Router logits soft-capped (``cap * tanh(logits / cap)``, as Gemma-style and Grok-style code caps logits),
    ``topk`` of the capped logits, the softmax of the chosen ones (Mixtral's order)."""

    def __init__(self, cap: float = 2.0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.cap = E, 2, cap
        self.router = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.cap * torch.tanh(self.router(x) / self.cap)
        top, idx = _pick(logits, self.forced, self.top_k)
        self.used = idx
        return top.softmax(-1), idx


# ----------------------------------------------------------------------- log-probabilities
class LogSoftmaxGate(_Used):
    """``topk`` of the router's ``log_softmax`` (fairseq-style code that keeps log-probabilities for the loss),
    the weights their ``exp``, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.wg = nn.Linear(D, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp, idx = _pick(F.log_softmax(self.wg(x), dim=-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(logp.exp()), idx


# ----------------------------------------------------------------------- float64 scores
class DoubleGate(_Used):
    """A router computed in float64 (``x.double()`` against the weight in double, for a stable softmax), ``topk``
    in double, the weights cast back to the input's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.double(), self.gate.weight.double()).softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return _renorm(w).to(x.dtype), idx


# ----------------------------------------------------------------------- the top-k result returned whole
class TopKResultGate(_Used):
    """A router that returns the ``torch.return_types.topk`` of its probabilities as is; the block reads
    ``.values`` and ``.indices``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            out = torch.topk(probs, self.top_k, dim=-1)
            self.used = out.indices
            return out
        self.used = self.forced
        return probs.gather(1, self.forced), self.forced


class TopKResultBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = TopKResultGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gate(x)
        values, indices = (out.values, out.indices) if hasattr(out, "indices") else out
        return dispatch(self.experts, x, indices, _renorm(values))


# ----------------------------------------------------------------------- k and E in a config object
class ConfigGate(_Used):
    """A router that holds only its config (``self.config.num_experts_per_tok``, ``self.config.num_local_experts``,
    as HF routers written against a ``PretrainedConfig`` do) and a ``weight`` Parameter; no ``top_k`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_experts_per_tok=3, num_local_experts=E, hidden_size=D)
        self.weight = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        w, idx = _pick(probs, self.forced, self.config.num_experts_per_tok)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- [batch, seq, E] with a positive dim
class PositiveDimGate(_Used):
    """Scores kept ``[batch, seq, E]`` and chosen with ``topk(k, dim=2)`` (a positive dim index), the indices
    flattened to ``[tokens, k]`` for dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(dim=2)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=2)
        else:
            idx = self.forced.view(*x.shape[:2], self.top_k)
            w = probs.gather(2, idx)
        self.used = idx.reshape(-1, self.top_k)
        return _renorm(w).reshape(-1, self.top_k), idx.reshape(-1, self.top_k)


class FlatBlock(nn.Module):
    """A routed MoE over ``[batch, seq, d]`` whose gate sees the 3-D input and whose experts see the tokens."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        flat = x.reshape(-1, D)
        return dispatch(self.experts, flat, idx, w).view_as(x)


# ----------------------------------------------------------------------- Gumbel top-k (sampling without replacement)
class GumbelTopKGate(_Used):
    """Gumbel top-k exploration (Kool et al. 2019's trick, as stochastic MoE routers use it in training): Gumbel
    noise ``-log(-log(U))`` added to the logits, ``topk`` of the noisy logits, the weights the clean softmax
    gathered and renormalised; no noise in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        noisy = logits
        if self.training:
            u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
            noisy = logits - torch.log(-torch.log(u))
        idx = noisy.topk(self.top_k, dim=-1).indices if self.forced is None else self.forced
        self.used = idx
        return _renorm(logits.softmax(-1).gather(1, idx)), idx


# ----------------------------------------------------------------------- expert dropout before the choice
class ExpertDropoutGate(_Used):
    """Expert-level dropout in training (a random subset of the experts masked to ``-inf`` for the whole batch
    before the ``topk``, as expert-dropout regularisers do), top-2, the weights the softmax of the masked logits
    gathered (a forced expert that the draw masks gets zero weight); ``choice_only``: the mask on the scores of the
    choice only, the weights read from the unmasked softmax."""

    def __init__(self, p: float = 0.25, choice_only: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.p, self.choice_only = E, 2, p, choice_only
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = choice = self.gate(x)
        if self.training:
            dropped = torch.rand(E) < self.p
            dropped[torch.randint(E, ())] = False
            choice = logits.masked_fill(dropped, float("-inf"))
        if not self.choice_only:
            logits = choice
        probs = logits.softmax(-1)
        if self.forced is None:
            idx = choice.topk(self.top_k, dim=-1).indices
        else:
            idx = self.forced
        self.used = idx
        return _renorm(probs.gather(1, idx)), idx


# ----------------------------------------------------------------------- the router under CPU autocast
class AutocastGate(_Used):
    """The gate's matmul under ``torch.autocast`` (bfloat16 on CPU, as mixed-precision training runs it), the
    logits upcast to fp32 for the softmax and ``topk`` (Megatron's ``moe_router_dtype='fp32'``)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.gate(x)
        probs = logits.float().softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- per-expert learned scale
class ScaledLogitsGate(_Used):
    """Logits scaled by a learned per-expert vector and a learned inverse temperature (``logits * scale * exp(t)``,
    as routers with a learnable temperature do), top-2 of the softmax, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.expert_scale = nn.Parameter(torch.ones(E))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x) * self.expert_scale * self.log_temperature.exp()
        w, idx = _pick(logits.softmax(-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- dropout on the router's input
class RouterDropoutGate(_Used):
    """Dropout on the router's input in training (``F.dropout(x, p)`` before the gate, NLLB-MoE-style router
    dropout), top-2 of the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(F.dropout(x, p=0.2, training=self.training)).softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return w, idx


# ----------------------------------------------------------------------- a detached router input
class DetachedInputGate(_Used):
    """A router fed ``x.detach()`` (its gradient reaches only the gate, not the trunk, as StableMoE-style and
    frozen-backbone routers do), top-2 of the softmax, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.gate(x.detach()).softmax(-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- expert embeddings as the router
class EmbeddingTableGate(_Used):
    """Experts as rows of an ``nn.Embedding(E, d)`` (expert embeddings, as Brainformer-style and retrieval-style
    routers keep them), the logits ``einsum('td,ed->te')`` against its ``weight``, top-2 of the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.expert_embeddings = nn.Embedding(E, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.einsum("td,ed->te", x, self.expert_embeddings.weight) / math.sqrt(D)
        w, idx = _pick(logits.softmax(-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- Jamba: bare router, HF v4 loop
class JambaSparseMoeBlock(_Used):
    """huggingface/transformers ``JambaSparseMoeBlock``: a bare ``router`` Linear, softmax in fp32, ``topk`` in the
    block, not renormalised, cast back; the HF v4 loop over ``one_hot(...).permute(2, 1, 0)`` and ``torch.where``
    per expert, ``index_add_`` of the weighted outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.router(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            selected = self.forced
            routing_weights = routing_weights.gather(1, selected)
        self.used = selected
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
        for expert_idx in range(E):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.shape[0] == 0:
                continue
            current = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current)
        return final


# ----------------------------------------------------------------------- Mixtral: input jitter in training, in place
class MixtralJitterBlock(_Used):
    """huggingface/transformers ``MixtralSparseMoeBlock`` with ``router_jitter_noise``: in training the hidden
    states (a ``view`` of the block's input) are multiplied in place (``*=``) by ``uniform_(1 - jitter, 1 + jitter)``
    noise before the bare ``gate``, so the experts see the jittered states too and the caller's tensor is written;
    softmax, top-2, renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.jitter_noise = E, 2, 0.1
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.view(-1, D)
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        probs = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return dispatch(self.experts, hidden_states, idx, _renorm(w))


class MixtralDecoderLayer(nn.Module):
    """The block fed ``post_attention_layernorm(x)`` (a fresh tensor the jitter writes into), the residual kept."""

    def __init__(self) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.block_sparse_moe = MixtralJitterBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_sparse_moe(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------- top-n by rounds of softmax and max
class SoftmaxRoundsGate(_Used):
    """Top-3 in rounds (as top-n gating code written without ``topk`` does it): each round a softmax of the
    logits, its ``max`` the next expert and its weight, that expert's logit set to ``-inf`` by ``scatter`` before
    the next round."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.num_experts, self.top_n = E, n
        self.w_gating = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_gating(x)
        gates, indices = [], []
        for i in range(self.top_n):
            probs = logits.softmax(-1)
            if self.forced is None:
                gate, index = probs.max(dim=-1, keepdim=True)
            else:
                index = self.forced[:, i : i + 1]
                gate = probs.gather(1, index)
            gates.append(gate)
            indices.append(index)
            logits = logits.scatter(-1, index, float("-inf"))
        idx = torch.cat(indices, dim=-1)
        self.used = idx
        return torch.cat(gates, dim=-1), idx


# ----------------------------------------------------------------------- stale k and E attributes
class StaleConfigGate(MixtralGate):
    """A router whose ``num_experts`` and ``top_k`` attributes are stale (16 and 4, left from the config of the
    model before its experts were pruned to 8) while its code takes a top-2 over 8: k and E are what the call shows."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = 16, 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, 2)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- k annealed by a step counter
class AnnealedKGate(_Used):
    """Top-k annealed during training (top-2 for the first steps, then top-1, as k-curriculum schedules do), the
    step a plain ``int`` on the module counted by each training forward, no ``top_k`` attribute."""

    def __init__(self, switch_at: int = 3) -> None:
        super().__init__()
        self.num_experts, self.step, self.switch_at = E, 0, switch_at
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = 2 if self.step < self.switch_at else 1
        if self.training:
            self.step += 1
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, k)
        self.used = idx
        return _renorm(w), idx


@pytest.mark.reliability("silent replays")
def test_routes_of_a_k_annealed_since_are_refused_not_forced_as_another_k() -> None:
    """Routes of top-2 captured before a step counter switched the gate to top-1: the replay is refused, naming the
    call that changed, and nothing is forced."""
    model = Layers(lambda: GateBlock(AnnealedKGate()))
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        assert {routes.layer(name).shape[1] for name in session.names} == {2}
        for layer in model.layers:
            layer.gate.step = layer.gate.switch_at
        with pytest.raises(mr.MoEReplayError, match=r"is now topk\(k=1\) over 8, but it was topk\(k=2\) over 8"):
            with torch.no_grad(), session.replay(routes):
                model(x)


# ----------------------------------------------------------------------- Qwen2-MoE: shared expert with a sigmoid gate
class Qwen2MoeSharedBlock(_Used):
    """huggingface/transformers ``Qwen2MoeSparseMoeBlock``: a bare ``gate`` Linear, softmax, ``topk`` in the block,
    ``norm_topk_prob=False``; a shared expert always on, scaled by ``sigmoid(shared_expert_gate(x))`` (a
    ``Linear(d, 1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.shared_expert = nn.Sequential(nn.Linear(D, 2 * D), nn.SiLU(), nn.Linear(2 * D, D))
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        out = dispatch(self.experts, x, idx, w.to(x.dtype))
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


# ----------------------------------------------------------------------- Qwen3-VL-MoE: dense router weights
class Qwen3VLMoeBlock(_Used):
    """huggingface/transformers ``Qwen3VLMoeTextSparseMoeBlock`` (training path): softmax, top-k, renormalised, the
    weights scattered into a dense ``[tokens, E]`` matrix; the experts' stacked ``gate_up_proj [E, d, 2h]`` and
    ``down_proj [E, h, d]`` run on every token by ``bmm``, weighted by that matrix and summed over the experts."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * D) / 4)
        self.down_proj = nn.Parameter(torch.randn(E, D, D) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        w = _renorm(w).to(x.dtype)
        router_weights = torch.zeros_like(router_logits).scatter_(1, idx, w)
        hs = x.repeat(E, 1).view(E, -1, D)
        gate, up = torch.bmm(hs, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.bmm(up * F.silu(gate), self.down_proj)
        return (out * router_weights.t()[..., None]).sum(dim=0)


# ----------------------------------------------------------------------- FastMoE SwitchGate: noise, capacity by order
class FastMoESwitchBlock(_Used):
    """laekov/fastmoe ``SwitchGate``: in training the logits shifted by uniform noise in ``[1 - eps, 1 + eps)``,
    softmax, ``topk(k=1)``; ``limit_by_capacity`` drops (``-1``) every token past an expert's capacity in token order
    (a function of the indices alone); the dropped tokens skip the experts. ``used``: the gate's choice before the
    capacity (the routes hold it)."""

    def __init__(self, capacity: float = 0.2) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.switch_eps, self.capacity = E, 1, 0.1, capacity
        self.gate = nn.Linear(D, E)
        self.experts = Experts()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        score = self.gate(inp)
        if self.training:
            noise = torch.rand_like(score) * 2 * self.switch_eps + 1.0 - self.switch_eps
            score = score + noise
        score = F.softmax(score, dim=-1)
        top1_score, top1_idx = _pick(score, self.forced, 1)
        self.used = top1_idx
        cap = math.ceil(self.capacity * inp.shape[0])
        onehot = F.one_hot(top1_idx[:, 0], E)
        position = (onehot.cumsum(0) * onehot).sum(-1, keepdim=True)
        kept = torch.where(position <= cap, top1_idx, torch.full_like(top1_idx, -1))
        return dispatch(self.experts, inp, kept, top1_score)


# ----------------------------------------------------------------------- Granite MoE: sorted experts, sizes, splits
class GraniteMoeTopKGating(_Used):
    """huggingface/transformers ``GraniteMoeTopKGating``: ``topk`` of the fp32 logits, the softmax of the chosen
    ones; ``expert_size`` counted from a dense scatter of the gates (``.tolist()``), the flattened experts sorted
    (``sort(0)`` over ``tokens * k``), ``batch_index`` and ``batch_gates`` read in that order."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.layer = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        logits = self.layer(x).float()
        top_k_logits, top_k_indices = _pick(logits, self.forced, self.top_k)
        self.used = top_k_indices
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(x)
        gates = torch.zeros(x.shape[0], E, dtype=top_k_gates.dtype).scatter(1, top_k_indices, 1)
        expert_size = gates.long().sum(0).tolist()
        top_k_experts = top_k_indices.flatten()
        _, index_sorted_experts = top_k_experts.sort(dim=0, stable=True)
        batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
        batch_gates = top_k_gates.flatten()[index_sorted_experts]
        return index_sorted_experts, batch_index, expert_size, batch_gates


class GraniteMoeMoE(nn.Module):
    """``GraniteMoeMoE``: the tokens gathered by ``batch_index``, split by ``expert_size`` into each expert's rows,
    weighted by ``batch_gates``, ``index_add`` back."""

    def __init__(self) -> None:
        super().__init__()
        self.router = GraniteMoeTopKGating()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, batch_index, expert_size, batch_gates = self.router(x)
        expert_inputs = x[batch_index].split(expert_size, dim=0)
        outs = [expert(h) for expert, h in zip(self.experts, expert_inputs, strict=True)]
        expert_outputs = torch.cat(outs, dim=0) * batch_gates[:, None]
        return torch.zeros_like(x).index_add(0, batch_index, expert_outputs)


# ----------------------------------------------------------------------- Aria: argsort permute, histc counts
class AriaTopKRouter(_Used):
    """rhymes-ai Aria ``TopKRouter``: ``F.linear`` against a ``weight [E, d]``, ``topk`` of the logits, the softmax
    of the chosen ones."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.topk = E, 2
        self.weight = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        top_logits, top_indices = _pick(logits, self.forced, self.topk)
        self.used = top_indices
        return F.softmax(top_logits, dim=-1), top_indices


class AriaMoELayer(nn.Module):
    """Aria ``MoELayer`` with its token permutation: the flattened indices ``argsort``-ed, the tokens
    ``index_select``-ed by ``sorted // k``, per-expert counts by ``torch.histc`` of the float indices, each expert's
    slice run, ``index_copy`` back to slot order and the slots weighted and summed."""

    def __init__(self) -> None:
        super().__init__()
        self.router = AriaTopKRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, indices = self.router(x)
        k = indices.shape[1]
        flat = indices.view(-1)
        sorted_indices = torch.argsort(flat, stable=True)
        permuted = x.index_select(0, sorted_indices // k)
        counts = torch.histc(indices.float(), bins=E, min=0, max=E - 1).long().tolist()
        outs = [expert(h) for expert, h in zip(self.experts, permuted.split(counts), strict=True)]
        permuted_out = torch.cat(outs, dim=0)
        unpermuted = torch.zeros_like(permuted_out).index_copy(0, sorted_indices, permuted_out)
        return (unpermuted.view(-1, k, D) * scores.unsqueeze(-1)).sum(dim=1)


# ----------------------------------------------------------------------- expert parallelism by hand
class ExpertParallelBlock(_Used):
    """Expert ids split into ``(rank, local id)`` by ``//`` and ``%`` (one process simulating the ranks of an
    expert-parallel group, as Megatron/DeepSpeed's local expert indices are), experts held per rank."""

    def __init__(self, ranks: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.ranks = E, 2, ranks
        self.gate = nn.Linear(D, E, bias=False)
        self.local_experts = nn.ModuleList(Experts(E // ranks) for _ in range(ranks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        self.used = idx
        w = _renorm(w)
        per = E // self.ranks
        rank, local = idx.div(per, rounding_mode="floor"), idx.remainder(per)
        out = torch.zeros_like(x)
        for r, experts in enumerate(self.local_experts):
            out = out + dispatch(experts, x, torch.where(rank == r, local, -1), w)
        return out


# ----------------------------------------------------------------------- a per-token Python loop over .tolist()
class ToListLoopBlock(_Used):
    """A naive MoE (tutorial code): the indices and weights brought to Python with ``.tolist()``, each token's
    experts run in a ``for`` loop over them."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        self.used = idx
        w = _renorm(w)
        rows = []
        for t, experts in enumerate(idx.tolist()):
            rows.append(sum(w[t, s] * self.experts[e](x[t]) for s, e in enumerate(experts)))
        return torch.stack(rows)


# ----------------------------------------------------------------------- only the experts used, by unique
class UniqueExpertsBlock(_Used):
    """Only the experts that received tokens run: ``torch.unique(idx, return_counts=True)`` (its counts logged),
    a loop over the unique ids."""

    counts: torch.Tensor | None = None

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        self.used = idx
        w = _renorm(w)
        ids, self.counts = torch.unique(idx, return_counts=True)
        out = torch.zeros_like(x)
        for e in ids.tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * self.experts[e](x[tok]))
        return out


# ----------------------------------------------------------------------- MoE-Mamba / Jamba: a causal conv mixer first
class MambaMixerThenMoE(nn.Module):
    """A MoE-Mamba / Jamba layer pair in miniature: a depthwise causal ``Conv1d`` mixer with a gated output (the
    Mamba block's conv path, its own ``[d, 1, 4]`` weight) over ``[batch, seq, d]``, then a Mixtral-style MoE."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(D, 2 * D, bias=False)
        self.conv1d = nn.Conv1d(D, D, kernel_size=4, groups=D, padding=3)
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.in_proj(x).chunk(2, dim=-1)
        h = self.conv1d(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        y = x + F.silu(h) * torch.sigmoid(z)
        return y - x + self.moe(y.reshape(-1, D)).view_as(y)


# ----------------------------------------------------------------------- routing only the unpadded tokens
class UnpadMoE(nn.Module):
    """A MoE over the unpadded tokens only (``x[mask]``, as varlen/flash-attention training code packs them; the
    mask a buffer of the model), the results scattered back, pads left as they were."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = GateBlock()
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[0, 4:] = mask[2, 1:] = False
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[self.mask] = self.moe(x[self.mask])
        return out


# ----------------------------------------------------------------------- layers of different k and E
class HeterogeneousLayers(nn.Module):
    """Two MoE layers of different shape (a top-1 over 4 experts, then a top-3 over 8, as models with mixed MoE
    layers have)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        first = GateBlock(MixtralGate(n=4, k=1))
        first.experts = Experts(4)
        self.layers = nn.ModuleList([first, GateBlock(MixtralGate(k=3))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------- HF aux loss: a top-k over every layer's logits
class AuxGate(_Used):
    """A Mixtral-style gate that also returns its logits (``router_logits``) for the model's aux loss."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        w, idx = _pick(logits.softmax(-1), self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx, logits


def _hf_load_balancing_loss(gate_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (no mask): every layer's logits concatenated, softmax, its own
    ``topk``, ``one_hot``, tokens-per-expert times router-probability, summed, times E."""
    concatenated = torch.cat(gate_logits, dim=0)
    routing_weights = F.softmax(concatenated, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected, E)
    tokens_per_expert = expert_mask.float().mean(dim=0)
    router_prob_per_expert = routing_weights.mean(dim=0)
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * E


class AuxSparseMoeBlock(nn.Module):
    """A Mixtral-style block that returns its router logits beside its output (``output_router_logits``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = AuxGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx, logits = self.gate(x)
        return dispatch(self.experts, x, idx, w), logits


class AuxLossModel(nn.Module):
    """``MixtralForCausalLM`` with ``output_router_logits=True`` in miniature: the decoder layers' blocks return
    their router logits, the model's own forward adds ``router_aux_loss_coef * load_balancing_loss_func(...)``
    (a ``topk`` over every layer's logits, outside every block) to what it returns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([AuxSparseMoeBlock(), AuxSparseMoeBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        all_logits = []
        for layer in self.layers:
            out, logits = layer(x)
            all_logits.append(logits)
            x = x + out
        return x + 0.01 * _hf_load_balancing_loss(all_logits, 2)


class FlatAuxLossModel(nn.Module):
    """The same model written flat: the gates and experts held by the model itself, which dispatches and takes the
    aux loss's ``topk`` in one forward (no block between)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gates = nn.ModuleList([AuxGate(), AuxGate()])
        self.experts = nn.ModuleList([Experts(), Experts()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        all_logits = []
        for gate, experts in zip(self.gates, self.experts, strict=True):
            w, idx, logits = gate(x)
            all_logits.append(logits)
            x = x + dispatch(experts, x, idx, w)
        return x + 0.01 * _hf_load_balancing_loss(all_logits, 2)


# ----------------------------------------------------------------------- Mixture of Tokens: no choice at all
class MixtureOfTokens(nn.Module):
    """llm-random Mixture of Tokens (Antoniak et al. 2023): tokens in groups, each expert's softmax over the group's
    tokens mixes them into one token per expert, the expert's output redistributed by the same weights: continuous,
    no decision anywhere."""

    def __init__(self, group: int = 4) -> None:
        super().__init__()
        self.num_experts, self.group = E, group
        self.controller = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.view(-1, self.group, D)
        weights = self.controller(g).softmax(dim=1)  # [groups, group, E], over the group's tokens
        mixed = torch.einsum("ngd,nge->ned", g, weights)
        outs = torch.stack([expert(mixed[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("ned,nge->ngd", outs, weights).reshape_as(x)


# ----------------------------------------------------------------------- a mask by the k-th value
class KthValueMaskGate(_Used):
    """A top-k mask made from the values alone (``logits >= logits.topk(k).values[..., -1:]``, as masked-softmax
    routers write it), the masked softmax the weights, the experts the mask's non-zeros: no index of the decision
    call is read."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.forced is None:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            mask = logits >= kth
        else:
            mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, self.forced, True)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        idx = mask.nonzero()[:, 1].view(-1, self.top_k)
        self.used = idx
        return probs.gather(1, idx), idx


# ----------------------------------------------------------------------- hard top-1, unit weight
class HardTop1Gate(_Used):
    """A hard top-1 (BASE-layer-style assignment without its balancing: the ``argmax`` expert with weight 1, no
    gradient to the gate through the combine), as hard-routing baselines write it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 1
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        idx = logits.argmax(-1, keepdim=True) if self.forced is None else self.forced
        self.used = idx
        return torch.ones(idx.shape, dtype=x.dtype), idx


# ----------------------------------------------------------------------- soft Gumbel samples, then top-k
class GumbelSoftTopKGate(_Used):
    """``F.gumbel_softmax(logits, tau, hard=False)`` in training (the noise drawn inside it, before the choice),
    ``topk`` of the soft sample, the weights the soft sample's values renormalised; in eval the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        y = F.gumbel_softmax(logits, tau=0.5, hard=False) if self.training else logits.softmax(-1)
        w, idx = _pick(y, self.forced, self.top_k)
        self.used = idx
        return _renorm(w), idx


# ----------------------------------------------------------------------- FastMoE: capacity written into the indices
class InPlaceCapacityBlock(_Used):
    """FastMoE ``limit_by_capacity`` as its kernel does it: the top-1 indices of the tokens past an expert's capacity
    (in token order) overwritten with ``-1`` in place, the dropped tokens skipping the experts (inference code: the
    indices the decision returned are written to)."""

    def __init__(self, capacity: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity = E, 1, capacity
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(1, dim=-1)
        else:
            idx = self.forced.clone()
            w = probs.gather(1, idx)
        self.used = idx.clone()
        onehot = F.one_hot(idx[:, 0], E)
        position = (onehot.cumsum(0) * onehot).sum(-1, keepdim=True)
        idx[position > self.capacity] = -1
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_indices_the_model_overwrites_in_place_are_recorded_and_forced_as_chosen() -> None:
    """Inference code that writes ``-1`` into the decision's own indices (FastMoE's capacity): the capture records
    the choice as made, not as overwritten; every replay (three in a row, of one routes object) forces the recorded
    experts, leaves the routes as recorded, and gives the output of those experts forced by hand."""
    model = Layers(InPlaceCapacityBlock)
    ref = copy.deepcopy(model)
    x = _x()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        rows = [routes.layer(name).clone() for name in session.names]
        for layer, r in zip(model.layers, rows, strict=True):
            assert torch.equal(r.long(), layer.used)
            assert (layer.used >= 0).all()
        perturb(model, 3.0)
        perturb(ref, 3.0)
        model(x)
        assert any(not torch.equal(r.long(), layer.used) for layer, r in zip(model.layers, rows, strict=True))
        with _forced_by_hand(ref, rows):
            expected = ref(x)
        for _ in range(3):
            with session.replay(routes):
                assert torch.equal(model(x), expected)
            for layer, r, name in zip(model.layers, rows, session.names, strict=True):
                assert torch.equal(r.long(), layer.used)
                assert torch.equal(routes.layer(name), r)


def _three_d() -> torch.Tensor:
    return _x(4, 6)


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "glm4-moe-one-group": (lambda: Layers(lambda: GateBlock(Glm4MoeGate())), _x, {}),
    # (experts-first scores chosen along dim 0, on as many tokens as experts: the dimension that stays as wide as the
    # experts on more tokens is read as theirs)
    "expert-major-as-many-tokens-as-experts": (lambda: Layers(lambda: GateBlock(ExpertMajorGate())), lambda: _x(E), {}),
    "glm4-moe-two-groups": (lambda: Layers(lambda: GateBlock(Glm4MoeGate(n_group=2, topk_group=1))), _x, {}),
    "glm4-moe-two-groups-both-kept": (
        lambda: Layers(lambda: GateBlock(Glm4MoeGate(n_group=2, topk_group=2))),
        _x,
        {},
    ),
    "minimax-m2-biased-sigmoid": (lambda: Layers(lambda: GateBlock(MiniMaxM2Gate())), _x, {}),
    "xmoe-cosine-argmax": (lambda: Layers(lambda: GateBlock(XMoEGate())), _x, {"change": 1.0}),
    "mlp-router": (lambda: Layers(lambda: GateBlock(MLPRouterGate())), _x, {"change": 0.3}),
    "normed-input-router": (lambda: Layers(lambda: GateBlock(NormedInputGate())), _x, {}),
    "softcapped-logits": (lambda: Layers(lambda: GateBlock(SoftcapGate())), _x, {}),
    "log-softmax-topk": (lambda: Layers(lambda: GateBlock(LogSoftmaxGate())), _x, {}),
    "float64-router": (lambda: Layers(lambda: GateBlock(DoubleGate())), _x, {}),
    "topk-result-returned-whole": (lambda: Layers(TopKResultBlock), _x, {}),
    "k-in-config-object": (lambda: Layers(lambda: GateBlock(ConfigGate())), _x, {}),
    "positive-dim-3d": (lambda: Layers(lambda: FlatBlock(PositiveDimGate())), _three_d, {}),
    "gumbel-topk-train": (lambda: Layers(lambda: GateBlock(GumbelTopKGate())), _x, {"train": True}),
    "autocast-bf16-router": (lambda: Layers(lambda: GateBlock(AutocastGate())), _x, {}),
    "scaled-logits-learned-temperature": (lambda: Layers(lambda: GateBlock(ScaledLogitsGate())), _x, {"change": 0.3}),
    "router-input-dropout-train": (lambda: Layers(lambda: GateBlock(RouterDropoutGate())), _x, {"train": True}),
    "detached-router-input": (lambda: Layers(lambda: GateBlock(DetachedInputGate())), _x, {}),
    "expert-embedding-table": (lambda: Layers(lambda: GateBlock(EmbeddingTableGate())), _x, {}),
    "jamba-hf-loop": (lambda: Layers(JambaSparseMoeBlock), _x, {}),
    "mixtral-input-jitter-in-place-train": (lambda: Layers(MixtralDecoderLayer), _x, {"train": True, "change": 0.3}),
    "qwen2-moe-shared-expert-gate": (lambda: Layers(Qwen2MoeSharedBlock), _x, {}),
    "qwen3-vl-moe-dense-weights": (lambda: Layers(Qwen3VLMoeBlock), _x, {"change": 0.1}),
    "fastmoe-switch-capacity-train": (lambda: Layers(FastMoESwitchBlock), _x, {"train": True}),
    "granite-moe-sorted-splits": (lambda: Layers(GraniteMoeMoE), _x, {}),
    "aria-argsort-histc": (lambda: Layers(AriaMoELayer), _x, {}),
    "expert-parallel-by-hand": (lambda: Layers(ExpertParallelBlock), _x, {}),
    "tolist-python-loop": (lambda: Layers(ToListLoopBlock), lambda: _x(8), {}),
    "unique-experts-only": (lambda: Layers(UniqueExpertsBlock), _x, {}),
    "mamba-mixer-then-moe": (lambda: Layers(MambaMixerThenMoE), _three_d, {"change": 0.3}),
    "unpadded-tokens-only": (lambda: Layers(UnpadMoE), _three_d, {}),
    "layers-of-different-k-and-e": (HeterogeneousLayers, _x, {}),
    "hf-load-balancing-loss-in-model": (AuxLossModel, _x, {}),
    "flat-model-with-aux-topk-excluded-by-class": (FlatAuxLossModel, _x, {"exclude": FlatAuxLossModel}),
    "aria-four-tokens-argsort-of-expert-width": (lambda: Layers(AriaMoELayer), lambda: _x(4), {}),
    "softmax-rounds-top3": (lambda: Layers(lambda: GateBlock(SoftmaxRoundsGate())), _x, {}),
    "stale-k-and-e-attributes": (lambda: Layers(lambda: GateBlock(StaleConfigGate())), _x, {}),
    "expert-dropout-in-the-choice-only-train": (
        lambda: Layers(lambda: GateBlock(ExpertDropoutGate(choice_only=True))),
        _x,
        {"train": True},
    ),
    "hard-top1-unit-weight": (lambda: Layers(lambda: GateBlock(HardTop1Gate())), _x, {}),
    "gumbel-softmax-soft-then-topk-train": (
        lambda: Layers(lambda: GateBlock(GumbelSoftTopKGate())),
        _x,
        {"train": True, "change": 0.3},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """GLM-4.5's group top-2 sums with one group or two, MiniMax-M2's biased sigmoid, X-MoE's low-dimensional cosine
    top-1, an MLP router, a normed router input, soft-capped logits, log-probabilities, float64 scores, a top-k
    result returned whole, k in a config object, a positive dim over ``[batch, seq, E]``, Gumbel top-k, expert
    dropout, autocast, learned scales, router input dropout, a detached input, expert embeddings; Jamba's and
    Mixtral's (jittered) HF blocks, Qwen2-MoE's gated shared expert, Qwen3-VL-MoE's dense weights, FastMoE's switch
    gate with capacity, Granite's sorted splits, Aria's argsort permutation, expert parallelism by hand, Python
    loops over ``.tolist()`` and ``unique``, a conv mixer first, unpadded tokens only, layers of different k and E,
    HF's load-balancing loss in the model: every router found and nothing else, the recorded rows the experts used,
    and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the refusal says, options: ``train`` and attach options)
    "mixture-of-tokens": (lambda: Layers(MixtureOfTokens), _x, "no MoE router found", {}),
    "kth-value-mask": (
        lambda: Layers(lambda: GateBlock(KthValueMaskGate())),
        _x,
        r"reads the values of #0 topk\(k=2\) over 8 .* but the indices of no decision-like call",
        {},
    ),
    "expert-dropout-train": (
        lambda: Layers(lambda: GateBlock(ExpertDropoutGate())),
        _x,
        r"(?s)draws from the random stream .* a forced expert weighs zero: expert dropout.* mask experts at random "
        "only in the scores the decision reads",
        {"train": True},
    ),
    "expert-choice-as-many-tokens-as-experts": (
        lambda: Layers(ExpertChoiceBlock),
        lambda: _x(E),
        "is a top-k over tokens, not over experts",
        {},
    ),
    "flat-model-with-aux-topk": (
        FlatAuxLossModel,
        _x,
        r"(?s)the model's own forward holds the attached router 'gates.0' but decides outside it: if this call "
        r"dispatches, attach the model as the router instead, include=FlatAuxLossModel .* if it only feeds a loss or a "
        r"metric, exclude=FlatAuxLossModel leaves it native",
        {},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_choices_no_recorded_row_holds_are_refused(case: str) -> None:
    """Mixture of Tokens (no choice to record); a top-k mask made from the k-th value alone: refused, saying why,
    the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    _assert_refused(make(), x(), match, train=train, **opts)  # type: ignore[arg-type]
