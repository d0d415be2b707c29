"""MoE code of dynamic-k, depth-routing and speech research, with zero configuration (see ``test_public_routers31``).

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

from tests import test_public_routers6 as by_hand
from tests.test_evidence import D
from tests.test_public_routers import ResidualStack
from tests.test_public_routers6 import _Used, assert_exact, assert_refused


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


# ----------------------------------------------------------------------- D2DMoE: top-k, dynamic-k of predicted norms
# bartwojcik/D2DMoE architectures/moe/moefication.py (``MoeficationMoE.gate``, ``forward``) and moe_layers.py
# (``ExecuteAllExperts``): a dense FFN split into experts; a router module (an MLP trained to predict each expert's
# output norm, set on the layer after it is built) scores the experts, and the layer's ``gate`` turns its output into
# a ``[b, s, E]`` routing tensor of zeros and ones: ``topk`` (the ids of ``torch.topk`` scattered as 1.0), ``dynk``
# (the experts sorted by their share of the summed norms, kept while the cumulative share is under ``tau``, one more
# by a ``roll``, mapped back by a ``gather`` of the ``argsort``) or ``dynk_max`` (every expert whose norm is at least
# ``(1 - tau)`` times the largest). ``ExecuteAllExperts`` runs every expert on every token (``einsum`` of ``[E, d, F]``
# weights) and sums their outputs weighted by that 0/1 tensor: the router gets no gradient, the experts do. The layer
# returns the output and a dict of the routing tensor (the model's forward unpacks it).
class ExecuteAllExpertsLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_experts: int, bias: bool, activation: type[nn.Module]) -> None:
        super().__init__()
        self.bias = bias
        self.w = nn.Parameter(torch.randn(num_experts, in_dim, out_dim) * 0.3)
        if self.bias:
            self.b = nn.Parameter(torch.randn(num_experts, 1, out_dim) * 0.1)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("eni,eio->eno", x, self.w)
        if self.bias:
            x = x + self.b
        return self.act(x)


class ExecuteAllExperts(nn.Module):
    def __init__(self, dim: int, num_experts: int, expert_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                ExecuteAllExpertsLayer(dim, expert_dim, num_experts, True, nn.GELU),
                ExecuteAllExpertsLayer(expert_dim, dim, num_experts, False, nn.Identity),
            ]
        )

    def forward(self, x: torch.Tensor, routing_tensor: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0)
        for layer in self.layers:
            x = layer(x)
        return torch.einsum("end,ne->nd", x, routing_tensor)


class MoeficationMoE(_Used):
    def __init__(self, forward_mode: str, num_experts: int = 6, k: int = 2, tau: float = 0.5) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = ExecuteAllExperts(D, num_experts, 4)
        self.last_bias = nn.Parameter(torch.zeros(1, D))
        # the router ``add_routers`` sets: an MLP whose outputs (predicted norms) are non-negative
        self.router = nn.Sequential(nn.Linear(D, 8), nn.GELU(), nn.Linear(8, num_experts), nn.Softplus())
        self.forward_mode = forward_mode
        self.k = k
        self.tau = tau

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        if self.forced is not None:
            routing_tensor = torch.zeros(*x.shape[:-1], self.num_experts, dtype=x.dtype)
            routing_tensor.view(-1, self.num_experts).scatter_(1, self.forced, 1.0)
            self.router(x)  # (the router still runs)
        elif self.forward_mode == "topk":
            routing_tensor = self.router(x)
            top = torch.topk(routing_tensor, k=self.k, dim=-1)[1]
            routing_tensor = torch.zeros_like(routing_tensor)
            routing_tensor.scatter_(2, top, 1.0)
        elif self.forward_mode == "dynk":
            predicted_expert_norms = self.router(x)
            total_norm = predicted_expert_norms.sum(dim=-1, keepdim=True)
            expert_shares = predicted_expert_norms / total_norm
            sorted_expert_shares, expert_share_indices = torch.sort(expert_shares, dim=-1, descending=True)
            cumulative_expert_shares = torch.cumsum(sorted_expert_shares, dim=-1)
            cumulative_mask = cumulative_expert_shares < self.tau
            cumulative_mask = cumulative_mask.roll(shifts=1, dims=-1)
            cumulative_mask[..., 0] = True
            routing_tensor = cumulative_mask.gather(dim=-1, index=expert_share_indices.argsort(dim=-1)).to(x.dtype)
        else:  # "dynk_max"
            predicted_expert_norms = self.router(x)
            max_norms, _ = predicted_expert_norms.max(dim=-1, keepdim=True)
            norm_thresholds = max_norms * (1.0 - self.tau)
            routing_tensor = torch.zeros_like(predicted_expert_norms)
            routing_tensor[predicted_expert_norms >= norm_thresholds] = 1.0
        flat = routing_tensor.reshape(-1, self.num_experts)
        if self.forward_mode == "topk" or self.forced is not None:
            self.used = flat.nonzero()[:, 1].reshape(flat.shape[0], -1)
        return routing_tensor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor]]]:
        routing_tensor = self.gate(x)
        orig_size = x.size()
        x = x.view(-1, x.size(-1))
        out = self.experts(x, routing_tensor.view(-1, routing_tensor.size(-1)))
        out = out + self.last_bias
        return out.view(orig_size), {"moe": (routing_tensor,)}


class D2DMoEBlock(nn.Module):
    """The model's forward around the layer: the output taken, the gating dict kept aside."""

    def __init__(self, forward_mode: str) -> None:
        super().__init__()
        self.mlp = MoeficationMoE(forward_mode)
        self.gating_data: dict[str, tuple[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, gating = self.mlp(x)
        self.gating_data.update(gating)
        return out


@pytest.mark.reliability("silent replays")
def test_d2dmoe_top_k_routing_tensor_replays_the_recorded_experts_as_by_hand() -> None:
    """D2DMoE's ``topk`` mode (the router MLP's top-k ids scattered as 1.0 into a routing tensor, every expert run and
    weighted by it), in eval as D2DMoE runs it: found with zero configuration (the router MLP inside the layer), the
    recorded rows the experts used, a replay after the router changes those experts forced by hand, in output and
    gradients (the experts' only: the 0/1 routing tensor carries none to the router)."""
    model = _one_block(lambda: D2DMoEBlock("topk"))()
    assert_exact(model, _seq(), train=False)  # (the routers are used in eval: ``set_for_eval_with_topk``)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("mode", "match"), [("dynk", "argsort"), ("dynk_max", "threshold")])
def test_d2dmoe_dynamic_k_routing_is_refused_naming_why(mode: str, match: str) -> None:
    """D2DMoE's dynamic-k modes choose a number of experts per token that no one call holds: ``dynk`` (a cumulative
    share of the sorted norms, mapped back by an ``argsort``) and ``dynk_max`` (a comparison with a fraction of the
    largest norm). Both are refused at the first capture with an error that names the mechanism, the model left as
    it was; the same layer in ``topk`` mode replays (above)."""
    model = _one_block(lambda: D2DMoEBlock(mode))()
    assert_refused(model, _seq(), match)


# ----------------------------------------------------------------------- astramind MoD: a Mixtral layer per sequence
# astramind-ai/Mixture-of-depths MoD/MoD.py (``TokenRouter``, ``MoD``; ``apply_mod_to_hf`` wraps every other decoder
# layer of a transformers model, Mixtral's among them): a ``Linear(d, 1)`` scores each token; the k-th best score of
# each sequence (``torch.topk`` over the sequence, ``k = int(capacity * s)``) is a threshold, and the tokens
# strictly above it (``weights > threshold``: k - 1 of them) go through the wrapped layer, one sequence at a time in a
# Python loop, scaled by their score; the others pass unchanged. The wrapped layer's MoE (transformers' Mixtral sparse
# block: a ``gate`` Linear, softmax, ``torch.topk``, the weights renormalised in place, a one-hot mask per expert) so
# runs once per sequence on a different number of tokens. In training the capacity follows a schedule of the forwards
# counted; here in eval it is fixed (the attention arguments MoD passes on are left out).
class MixtralSparseMoeBlock(_Used):
    def __init__(self, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 8), nn.SiLU(), nn.Linear(8, D)) for _ in range(num_experts)
        )
        self.cursor = 0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:  # (the rows of this call: the calls of one forward consume the forced rows in turn)
            selected_experts = self.forced[self.cursor : self.cursor + hidden_states.shape[0]]
            routing_weights = routing_weights.gather(1, selected_experts)
        self.cursor += hidden_states.shape[0]
        self.used = selected_experts if self.used is None else torch.cat([self.used, selected_experts])
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_hidden_states = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class MixtralDecoderLayer(nn.Module):
    """The wrapped layer, cut to its MoE: a pre-norm residual sparse block, returning a tuple as the decoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_size = D
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.block_sparse_moe = MixtralSparseMoeBlock()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        out, _ = self.block_sparse_moe(self.post_attention_layernorm(hidden_states))
        return (hidden_states + out,)


class TokenRouter(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.weight_predictor = nn.Linear(embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_predictor(x).squeeze(-1)


class MoD(nn.Module):
    def __init__(self, capacity: float, block: MixtralDecoderLayer) -> None:
        super().__init__()
        self.router = TokenRouter(block.hidden_size)
        self.block = block
        self.capacity = capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        weights = self.router(x)
        k = int(self.capacity * s)
        top_k_values, _ = torch.topk(weights, k, dim=1, sorted=True)
        threshold = top_k_values[:, -1]
        selected_mask = weights > threshold.unsqueeze(-1)
        processed_tokens = torch.zeros_like(x)
        for i in range(b):
            selected_tokens = x[i][selected_mask[i]]
            if selected_tokens.size(0) > 0:
                processed_tokens[i][selected_mask[i]] = self.block(selected_tokens.unsqueeze(0))[0] * weights[i][
                    selected_mask[i]
                ].unsqueeze(-1)
        return processed_tokens + (x * (~selected_mask).unsqueeze(-1).to(x.dtype))


class MoDStack(nn.Module):
    """Two MoD layers (each over its own Mixtral layer); each forward starts the routers' rows anew (test
    bookkeeping: the experts used over the calls of one forward, and where forced rows are read)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([MoD(0.5, MixtralDecoderLayer()) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if isinstance(m, MixtralSparseMoeBlock):
                m.cursor, m.used = 0, None
        for layer in self.layers:
            x = layer(x)
        return x


def _perturb_gates(model: nn.Module, scale: float = 3.0) -> None:
    """Only the MoE gates change: the tokens MoD chooses (its choice is not recorded) stay the same."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("block_sparse_moe.gate.weight"):
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.reliability("silent replays")
def test_astramind_mod_around_mixtral_layers_replays_their_routers_as_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """astramind's Mixture-of-Depths around Mixtral layers: MoD's threshold over the sequence is left native (no
    router found there), the Mixtral gates are found with zero configuration though each runs once per sequence on
    the tokens MoD passes; the recorded rows are the experts used over those calls, and a replay after the gates
    change forces them, in output and gradients as by hand."""
    monkeypatch.setattr(by_hand, "perturb", _perturb_gates)
    model = MoDStack()
    mod_routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))
    session = assert_exact(model, x, train=False)
    assert session.names == ("layers.0.block.block_sparse_moe.gate", "layers.1.block.block_sparse_moe.gate")
    assert mod_routers and all(torch.equal(model.get_parameter(n), p) for n, p in mod_routers.items())


# ----------------------------------------------------------------------- MoE-Specialisation: a mask set by the caller
# ant190100/MoE-Specialisation models/moe_layer.py (``MoELayer``, over transformers' ``MistralMLP`` experts, put in
# TinyMistral's layers by models/utils/create_moe_model.py): no router at all; the caller sets ``routing_mask`` (0 for
# vision tokens, 1 for text tokens) on the layer before each forward, and ``torch.where`` of it sends the vision tokens
# to expert 0 and the text tokens to expert 1.
class MistralMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, 8, bias=False)
        self.up_proj = nn.Linear(D, 8, bias=False)
        self.down_proj = nn.Linear(8, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ModalityMoELayer(nn.Module):
    def __init__(self, num_experts: int = 2) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList([MistralMLP() for _ in range(num_experts)])
        self.routing_mask = torch.zeros(0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing_mask = self.routing_mask
        final_output = torch.zeros_like(hidden_states)
        vision_indices = torch.where(routing_mask == 0)
        text_indices = torch.where(routing_mask == 1)
        if vision_indices[0].numel() > 0:
            final_output[vision_indices] = self.experts[0](hidden_states[vision_indices])
        if text_indices[0].numel() > 0:
            final_output[text_indices] = self.experts[1](hidden_states[text_indices])
        return final_output


@pytest.mark.reliability("silent replays")
def test_moe_specialisation_modality_mask_layer_is_no_router_and_refused() -> None:
    """The modality layer's experts follow from a mask the caller sets, from no scores: there is no choice to record
    or force, and zero configuration finds no router and says so, the model left as it was."""
    model = _one_block(ModalityMoELayer)()
    layer = model.get_submodule("layers.0")
    layer.routing_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert_refused(model, _seq(), "no MoE router found")


# ----------------------------------------------------------------------- SteerMoE: one router, soft, for all layers
# forfrt/SteerMoE steer_moe/efficient_layer_wise_whisper.py (``EfficientLayerWiseSteeringWhisperEncoder``): a frozen
# Whisper encoder steered layer by layer; a single ``router`` Linear(d, E * L) runs on each layer's output, its slice
# of E logits for that layer is softmaxed, and the softmax-weighted sum of the layer's E steering vectors (``einsum``
# of ``[b, t, E]`` by ``[E, d]``) is added, scaled by a per-layer factor. Every expert is weighted: there is no choice.
class EfficientLayerWiseSteeringEncoder(nn.Module):
    def __init__(self, num_layers: int = 2, num_experts: int = 4, steering_scale: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU()) for _ in range(num_layers))
        self.num_experts = num_experts
        self.steering_vectors = nn.Parameter(torch.randn(num_layers, num_experts, D) * 0.01)
        self.router = nn.Linear(D, num_experts * num_layers)
        self.layer_scales = nn.Parameter(torch.ones(num_layers) * steering_scale)

    def forward(self, mel_spec: torch.Tensor) -> torch.Tensor:
        x = mel_spec
        for layer_idx, layer in enumerate(self.layers):
            layer_output = layer(x)
            router_output = self.router(layer_output)
            start_idx = layer_idx * self.num_experts
            end_idx = (layer_idx + 1) * self.num_experts
            gating_scores = F.softmax(router_output[:, :, start_idx:end_idx], dim=-1)
            steering_adjustment = torch.einsum("bte,ef->btf", gating_scores, self.steering_vectors[layer_idx])
            x = layer_output + self.layer_scales[layer_idx] * steering_adjustment
        return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("include", "match"), [(None, "no MoE router found"), ("router", "soft routing")], ids=["zero-config", "named"]
)
def test_steermoe_soft_layer_wise_steering_is_refused(include: str | None, match: str) -> None:
    """SteerMoE's steering router weights every steering vector (a softmax, no top-k): zero configuration finds no
    router, and the router named by hand is refused as soft routing, with nothing to record; the model as it was."""
    model = EfficientLayerWiseSteeringEncoder()
    attach = {} if include is None else {"include": include}
    assert_refused(model, _seq(), match, **attach)


# ----------------------------------------------------------------------- JiTMoE: DeepSeek-V3 routing in a diffusion DiT
# yhlleo/EfficientMoE JiTMoE/moe.py (``TopkRouter``, ``DSMoE``, ``DSNaiveMoE``, ``SwiGLUFFN``; the MoE of its pixel-
# space JiT diffusion transformer): the ``gate`` holds a bare ``weight`` Parameter and the
# ``e_score_correction_bias`` buffer and returns fp32 logits only; the block's ``route_tokens_to_experts`` takes
# DeepSeek-V3's group-limited top-k of the biased sigmoid scores (the groups' top-2 sums, ``topk_group`` groups kept by
# a 0/1 mask, ``masked_fill`` with 0), gathers the unbiased scores, renormalises them (``+ 1e-20``) and scales them.
# The experts run over ``expert_hit`` (the ``nonzero`` ids of the experts any token chose), each indexed by a one-
# element tensor; without the shared expert the block adds its input instead.
class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


class DSNaiveMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, moe_intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.blocks = nn.ModuleList(SwiGLUFFN(hidden_size, moe_intermediate_size) for _ in range(num_experts))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
            current_hidden_states = self.blocks[expert_idx](current_state) * top_k_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states


class JiTTopkRouter(nn.Module):
    def __init__(self, hidden_size: int, n_routed_experts: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.n_routed_experts = n_routed_experts
        self.weight = nn.Parameter(torch.randn(n_routed_experts, hidden_size) * 0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(n_routed_experts) * 0.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.reshape(-1, self.hidden_size)
        return F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))


class DSMoE(_Used):
    def __init__(self, use_shared_expert: bool, num_experts: int = 8, n_group: int = 4, topk_group: int = 2) -> None:
        super().__init__()
        self.experts = DSNaiveMoE(num_experts, D, 4)
        self.gate = JiTTopkRouter(D, num_experts)
        self.use_shared_expert = use_shared_expert
        if self.use_shared_expert:
            self.shared_experts = SwiGLUFFN(D, 4)
        self.n_routed_experts = num_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = True
        self.routed_scaling_factor = 2.5
        self.top_k = 2

    def route_tokens_to_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = router_logits.sigmoid()
        if self.forced is None:
            router_logits_for_choice = router_logits + self.gate.e_score_correction_bias
            group_scores = (
                router_logits_for_choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)
                .topk(2, dim=-1)[0]
                .sum(dim=-1)
            )
            groups_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, groups_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(-1, self.n_group, self.n_routed_experts // self.n_group)
                .reshape(-1, self.n_routed_experts)
            )
            scores_for_choice = router_logits_for_choice.masked_fill(~score_mask.bool(), 0.0)
            topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        else:
            topk_indices = self.forced
        self.used = topk_indices
        topk_weights = router_logits.gather(1, topk_indices)
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residuals = hidden_states
        orig_shape = hidden_states.shape
        router_logits = self.gate(hidden_states)
        topk_indices, topk_weights = self.route_tokens_to_experts(router_logits)
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        hidden_states = self.experts(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        if self.use_shared_expert:
            hidden_states = hidden_states + self.shared_experts(residuals)
        else:
            hidden_states = hidden_states + residuals
        return hidden_states


@pytest.mark.reliability("silent replays")
def test_jitmoe_group_limited_routing_replays_the_recorded_experts_as_by_hand() -> None:
    """JiTMoE's DeepSeek-V3 routing (the gate returns fp32 logits only; the group-limited top-k of the biased sigmoid
    scores in the block's method; the experts run over the ``nonzero`` ids of those hit): found with zero
    configuration (the gate), the recorded rows the experts used, a replay after the gate changes those experts forced
    by hand, in output and gradients."""
    model = _one_block(lambda: DSMoE(use_shared_expert=True))()
    assert_exact(model, _seq(), train=True)


# ----------------------------------------------------------------------- EC-DiT: expert choice, the gate a Parameter
# yhlleo/EfficientMoE DSMoE/models/models_ECDiT.py (``SparseMoEBlock``, the expert-choice baseline beside its DSMoE):
# the block holds a bare ``gate_weight`` Parameter (no gate module); the token-expert softmax affinities are turned
# ``[b, e, s]`` by an ``einsum``, and each expert takes its ``k = int(S / E * capacity)`` best tokens of the sequence
# (``torch.topk`` over the tokens); a one-hot of those token ids dispatches by ``einsum``, and the outputs are combined
# by another, weighted by the chosen affinities. A token may get any number of experts, none included.
class ExpertChoiceMlp(nn.Module):
    """timm's ``Mlp`` (fc1, tanh-approximated GELU, fc2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 8)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(8, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ECSparseMoEBlock(nn.Module):
    def __init__(self, num_experts: int = 4, capacity: float = 2) -> None:
        super().__init__()
        self.gate_weight = nn.Parameter(torch.randn(num_experts, D) * 0.5)
        self.experts = nn.ModuleList(ExpertChoiceMlp() for _ in range(num_experts))
        self.capacity = capacity
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        logits = F.linear(x, self.gate_weight, None)
        affinity = logits.softmax(dim=-1)
        affinity = torch.einsum("b s e->b e s", affinity)
        k = int((S / self.num_experts) * self.capacity)
        gating, index = torch.topk(affinity, k=k, dim=-1, sorted=False)
        dispatch = F.one_hot(index, num_classes=S).to(dtype=x.dtype)
        x_in = torch.einsum(" b e c s, b s d -> b e c d", dispatch, x)
        x_e = torch.stack([self.experts[e](x_in[:, e]) for e in range(self.num_experts)], dim=1)
        return torch.einsum("b e c s, b e c, b e c d -> b s d", dispatch, gating, x_e)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("shape", [(2, 8), (1, 4)], ids=["more-tokens-than-experts", "as-many-tokens-as-experts"])
def test_ec_dit_expert_choice_is_refused(shape: tuple[int, int]) -> None:
    """EC-DiT's expert choice (each expert's top-k tokens of the sequence, the gate a bare Parameter of the block) is no
    choice of k experts per token: it is refused at the first capture as expert-choice routing, not recorded as token
    choice, also where a sequence has as many tokens as there are experts; the model as it was."""
    model = _one_block(ECSparseMoEBlock)()
    x = torch.randn(*shape, D, generator=torch.Generator().manual_seed(1))
    assert_refused(model, x, "expert-choice routing")
