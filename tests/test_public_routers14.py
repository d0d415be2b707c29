"""More public MoE router code, with zero configuration (see ``test_public_routers13``).

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
from tests.test_evidence import D, E, Experts
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact


# ----------------------------------------------------------------------- Moirai-MoE: centroids passed in, cdist
class MoiraiMoEFeedForward(_Used):
    """SalesforceAIResearch/uni2ts ``src/uni2ts/module/ffn.py`` ``MoEFeedForward``: no gate of its own; the layer's
    centroids (float64, handed in by the encoder at each call) cast to the input, repeated over the batch, the
    ``torch.cdist`` of the tokens to them as the logits, a ``topk`` of the *largest* distances, a float softmax of
    the top-k values, and a loop over the experts by ``torch.where``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.num_experts_per_token = E, 2
        self.experts = Experts()

    def forward(self, x: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
        x_squashed = x.view(-1, x.shape[-1])
        centroid = centroid.to(x.device).type_as(x)
        x_temp = x.view(-1, x.shape[-2], x.shape[-1]) if len(x.shape) > 3 else x
        centroid = centroid.unsqueeze(0).repeat(x_temp.shape[0], 1, 1)
        cdist = torch.cdist(x_temp, centroid)
        gate_logits = cdist.view(-1, cdist.shape[-1])
        if self.forced is None:
            weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_token)
        else:
            selected_experts = self.forced
            weights = gate_logits.gather(1, selected_experts)
        self.used = selected_experts
        weights = F.softmax(weights, dim=1, dtype=torch.float).type_as(x)
        results = torch.zeros_like(x_squashed)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(x_squashed[batch_idx])
        return results.view_as(x)


class MoiraiEncoderLayer(nn.Module):
    """uni2ts ``TransformerEncoderLayer`` (pre-norm, the attention left out): ``x + ffn(norm2(x), centroid=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(D)
        self.ffn = MoiraiMoEFeedForward()

    def forward(self, x: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm2(x), centroid=centroid)


class MoiraiEncoder(nn.Module):
    """uni2ts ``TransformerEncoder`` with ``use_moe``: a float64 ``centroid`` buffer ``[layers, E, d]``, its row
    ``idx`` passed to each layer."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("centroid", torch.randn(layers, E, D, dtype=torch.float64))
        self.layers = nn.ModuleList(MoiraiEncoderLayer() for _ in range(layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for idx, layer in enumerate(self.layers):
            x = layer(x, centroid=self.centroid[idx])
        return self.norm(x)


# ----------------------------------------------------------------------- learned centroids, no gate module
class CentroidMoEFFN(_Used):
    """A public ``MoEFFN`` ("MoE with learned centroids and sigmoid routing"): no gate module, a ``centroids``
    parameter ``[E, d]`` of its own, the sigmoid of ``u @ centroids.t()``, a ``topk`` (``moe_top_k``, no expert
    count attribute), the top-k values scattered into zeros and renormalised, every expert run and mixed by
    ``einsum``."""

    def __init__(self) -> None:
        super().__init__()
        self.moe_top_k = 2
        self.experts = Experts()
        self.centroids = nn.Parameter(torch.randn(E, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.size()
        u = x.view(b * s, d)
        gates = torch.sigmoid(u @ self.centroids.t())
        if self.forced is None:
            topk_vals, topk_idx = gates.topk(self.moe_top_k, dim=-1)
        else:
            topk_idx = self.forced
            topk_vals = gates.gather(-1, topk_idx)
        self.used = topk_idx
        mask = torch.zeros_like(gates).scatter_(-1, topk_idx, topk_vals)
        gates = mask / mask.sum(dim=-1, keepdim=True)
        all_outs = torch.stack([expert(u) for expert in self.experts], dim=1)
        return torch.einsum("be,bed->bd", gates, all_outs).view(b, s, d)


# ----------------------------------------------------------------------- NLLB-MoE: the whole route_tokens
class NllbMoeTop2Router(_Used):
    """HF ``transformers/models/nllb_moe/modeling_nllb_moe.py`` ``NllbMoeTop2Router.route_tokens``: ``argmax`` of
    the probabilities, the second ``argmax`` of the logits with the first masked (Gumbel noise added to the logits
    *in place* for ``second_expert_policy="sampling"``), normalised before or after the capacity drop
    (``normalize_router_prob_before_dropping``), positions by ``cumsum`` (no batch priority), and in eval a capacity
    of ``moe_eval_capacity_token_fraction`` of the tokens, written into ``self.expert_capacity`` at every call;
    returns ``(top_1_mask, router_probs)`` with ``router_probs`` ``[T, E]``."""

    def __init__(self, policy: str = "all", before: bool = False, fraction: float = 0.25) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.expert_capacity: int | None = None
        self.classifier = nn.Linear(D, E, bias=False)
        self.second_expert_policy, self.normalize_router_prob_before_dropping = policy, before
        self.moe_eval_capacity_token_fraction = fraction

    @staticmethod
    def normalize_router_probabilities(
        router_probs: torch.Tensor, top_1_mask: torch.Tensor, top_2_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top_1_max_probs = (router_probs * top_1_mask).sum(dim=1)
        top_2_max_probs = (router_probs * top_2_mask).sum(dim=1)
        denom_s = torch.clamp(top_1_max_probs + top_2_max_probs, min=torch.finfo(router_probs.dtype).eps)
        return top_1_max_probs / denom_s, top_2_max_probs / denom_s

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.classifier(hidden_states.reshape(-1, hidden_states.shape[-1]))
        nb_tokens = router_logits.shape[0]
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_1 = torch.argmax(router_probs, dim=-1) if self.forced is None else self.forced[:, 0]
        top_1_mask = F.one_hot(top_1, num_classes=self.num_experts)
        if self.second_expert_policy == "sampling":
            router_logits += torch.distributions.gumbel.Gumbel(0, 1).rsample(router_logits.shape)
        logits_except_top_1 = router_logits.masked_fill(top_1_mask.bool(), float("-inf"))
        top_2 = torch.argmax(logits_except_top_1, dim=-1) if self.forced is None else self.forced[:, 1]
        top_2_mask = F.one_hot(top_2, num_classes=self.num_experts)
        if self.normalize_router_prob_before_dropping:
            top_1_max_probs, top_2_max_probs = self.normalize_router_probabilities(router_probs, top_1_mask, top_2_mask)
        locations1 = torch.cumsum(top_1_mask, dim=0) - 1
        locations2 = torch.cumsum(top_2_mask, dim=0) - 1
        locations2 += torch.sum(top_1_mask, dim=0, keepdim=True)
        if not self.training and self.moe_eval_capacity_token_fraction > 0:
            self.expert_capacity = math.ceil(self.moe_eval_capacity_token_fraction * nb_tokens)
        else:
            capacity = 2 * math.ceil(nb_tokens / self.num_experts)
            self.expert_capacity = capacity if self.expert_capacity is None else self.expert_capacity
        top_1_mask = top_1_mask * torch.lt(locations1, self.expert_capacity)
        top_2_mask = top_2_mask * torch.lt(locations2, self.expert_capacity)
        self.used = torch.stack([top_1, top_2], 1)
        if not self.normalize_router_prob_before_dropping:
            top_1_max_probs, top_2_max_probs = self.normalize_router_probabilities(router_probs, top_1_mask, top_2_mask)
        gates1 = top_1_max_probs[:, None] * top_1_mask
        gates2 = top_2_max_probs[:, None] * top_2_mask
        return top_1_mask, gates1 + gates2


class NllbMoeSparseMLP(nn.Module):
    """HF ``NllbMoeSparseMLP``: the hidden states masked per expert by ``einsum("bm,be->ebm")`` with
    ``router_probs.bool()``, each expert run on the tokens its mask keeps, weighted by their probabilities."""

    def __init__(self, router: NllbMoeTop2Router) -> None:
        super().__init__()
        self.router = router
        self.experts = Experts()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, router_probs = self.router(hidden_states)
        router_mask = router_probs.bool()
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        masked = torch.einsum("bm,be->ebm", flat, router_mask.to(flat.dtype))
        out = torch.zeros_like(flat)
        for idx, expert in enumerate(self.experts):
            token_indices = router_mask[:, idx]
            combining_weights = router_probs[token_indices, idx]
            out[token_indices] += combining_weights[:, None] * expert(masked[idx, token_indices])
        return out.view_as(hidden_states)


def _nllb(**kw: object) -> nn.Module:
    return Layers(lambda: NllbMoeSparseMLP(NllbMoeTop2Router(**kw)))  # type: ignore[arg-type]


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    "moirai-moe-cdist-centroids": (MoiraiEncoder, lambda: _x(2, 12), {}),
    "learned-centroids-sigmoid": (lambda: Layers(CentroidMoEFFN), lambda: _x(2, 12), {}),
    "nllb-all-before-eval-fraction": (lambda: _nllb(before=True), _x, {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Moirai-MoE's gate-less block (the top-k of the distances to centroids its encoder hands in) and a block scoring
    its experts against learned centroids of its own (both once not found with zero configuration, a false refusal),
    and NLLB-MoE's whole ``route_tokens`` (a second ``argmax`` after Gumbel
    noise added in place, normalised before or after a capacity drop by position, an eval capacity written into the
    router at each call): every router found and nothing else, the recorded rows the experts used, and a replay
    after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


class IdsModel(nn.Module):
    """An embedding in front of a model: ``[batch, seq]`` token ids in, ``[batch, seq, d]`` to the model, so that a
    replay can tell the tokens it is fed from those its routes were recorded for."""

    def __init__(self, inner: nn.Module, vocab: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, D)
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(self.embed(input_ids))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", ["moirai-moe-cdist-centroids", "learned-centroids-sigmoid"])
def test_routes_of_another_batch_are_refused_and_those_of_the_batch_replay(case: str) -> None:
    """Fed token ids: routes of batch A replayed on batch B (or on A's sequences swapped) are refused with
    ``TokenMismatchError``; on A itself, after every parameter and the centroids change, they replay the experts
    recorded."""
    make, _, options = EXACT[case]
    model = IdsModel(make()).train(bool(options.get("train", False)))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 32, (2, 6), generator=g), torch.randint(0, 32, (2, 6), generator=g)
    assert not torch.equal(a, a.flip(0)) and not torch.equal(a, b)
    routers = [m for m in model.modules() if isinstance(m, _Used)]
    with mr.attach(model) as session:
        assert len(session.names) == len(routers)
        with torch.no_grad(), session.capture():
            model(a)
        routes = session.routes()
        used = [r.used.clone() for r in routers if r.used is not None]
        for other in (b, a.flip(0)):
            with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
                with torch.no_grad(), session.replay(routes):
                    model(other)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            model(a)
        assert any(not torch.equal(r.used, u) for r, u in zip(routers, used, strict=True) if r.used is not None)
        with torch.no_grad(), session.replay(routes):
            model(a)
        assert len(used) == len(routers)
        for router, rows in zip(routers, used, strict=True):
            assert router.used is not None and torch.equal(router.used.long(), rows.long())
