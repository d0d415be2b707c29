"""Router code of more public libraries, with zero configuration (see ``test_public_routers2``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). The
rule checked: a replay is proven exact (the experts used are the recorded ones, and the output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, E, Experts, RouterBlock, T, TwoLayers, dispatch, perturb
from tests.test_public_routers2 import _Forced, _forced_by_hand, _x, assert_replay_is_forced_by_hand


# ----------------------------------------------------------------------- Hetu: k top-1 (expert prototyping)
class KTop1Gate(_Forced):
    """Hsword/Hetu ``python/hetu/layers/KTop1Gate.py`` ``ktop1gating`` (M6-T's expert prototyping), in torch: the
    logits split into ``k`` prototypes of ``E / k`` experts, a softmax and a top-1 in each, the local index moved to
    the global one by the prototype's offset, each weighted by its own prototype's probability."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.k = E, k
        self.wg = nn.Linear(D, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.num_experts // self.k
        logits = self.wg(x)
        gates, indices = [], []
        for i, chunk in enumerate(logits.split(per, dim=1)):
            probs = F.softmax(chunk, dim=1)
            if self.forced is None:
                local = torch.topk(probs, 1, dim=1).indices
            else:
                local = self.forced[:, i : i + 1] - i * per
            gates.append(probs.gather(1, local))
            indices.append(local + i * per)
        return torch.cat(gates, 1), torch.cat(indices, 1)


class SAMGate(_Forced):
    """Hsword/Hetu ``python/hetu/layers/SAMGate.py`` ``samgating`` (switch-and-mixture), in torch: softmax gates
    summed per device group, the top-1 group, a top-k of the gates inside that group (Hetu's ``group_topk_idx_op``)
    moved to global indices by the group's offset, weighted by the gates."""

    def __init__(self, k: int = 2, groups: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.num_local_gpus = E, k, groups
        self.wg = nn.Linear(D, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.num_experts // self.num_local_gpus
        gates = F.softmax(self.wg(x), dim=1)
        grouped = gates.view(-1, self.num_local_gpus, per)
        top1_group = torch.topk(grouped.sum(-1), 1, dim=1).indices
        if self.forced is None:
            inside = grouped.gather(1, top1_group[..., None].expand(-1, 1, per)).squeeze(1)
            idx = torch.topk(inside, self.top_k, dim=1).indices + top1_group * per
        else:
            idx = self.forced
        return gates.gather(1, idx), idx


# ----------------------------------------------------------------------- DeepSpeed: residual MoE (PR-MoE)
class DeepSpeedTop1Gate(_Forced):
    """microsoft/DeepSpeed ``deepspeed/moe/sharded_moe.py`` ``TopKGate`` with ``top1gating`` (no token dropping):
    softmax gates, ``argmax`` top-1, a one-hot mask, the gate of the chosen expert by ``(gates * mask).sum``,
    positions by a cumulative sum; returns the combine weights ``[T, E]``."""

    def __init__(self) -> None:
        super().__init__()
        self.wg = nn.Linear(D, E, bias=False)
        self.num_experts, self.k = E, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.softmax(self.wg(x).float(), dim=1)
        indices1_s = torch.argmax(gates, dim=1) if self.forced is None else self.forced[:, 0]
        mask1 = F.one_hot(indices1_s, num_classes=E)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations1_s = torch.sum(locations1 * mask1, dim=1)  # (its dispatch slots; unused here)
        del locations1_s
        gates1_s = (gates * mask1).sum(dim=1)
        return gates1_s[:, None] * mask1


class DeepSpeedResidualMoE(nn.Module):
    """DeepSpeed ``deepspeed/moe/layer.py`` ``MoE(use_residual=True)`` (PR-MoE / Residual-MoE): the MoE output
    mixed with a dense MLP's by a softmax over a ``Linear(hidden, 2)`` ``coefficient`` (two weights per token, no
    choice: not a router)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = DeepSpeedTop1Gate()
        self.experts = Experts()
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.coefficient = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine = self.gate(x)
        out = sum(combine[:, e : e + 1].to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
        coef = F.softmax(self.coefficient(x), dim=-1)
        return out * coef[..., 0:1] + self.mlp(x) * coef[..., 1:]


# ----------------------------------------------------------------------- vLLM grouped_topk without a bias
class VllmGroupedTopK(_Forced):
    """vLLM ``vllm/model_executor/layers/fused_moe/fused_moe.py`` ``grouped_topk`` without
    ``e_score_correction_bias`` (DeepSeek-V2): softmax scores, each group scored by its ``max``, a
    ``topk(sorted=False)`` of groups, a ``scatter_`` group mask, ``masked_fill(~mask, -inf)``, and the weights are
    the values of the expert ``topk`` of the masked scores, scaled by ``routed_scaling_factor`` (no renormalisation).
    Forced by hand: the recorded experts' scores, as a gather from the unmasked scores gives them."""

    def __init__(self, groups: int = 4, topk_group: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k, self.num_expert_group, self.topk_group = E, 2, groups, topk_group
        self.routed_scaling_factor = 2.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(self.gate(x).float(), dim=-1)
        num_token = scores.shape[0]
        group_scores = scores.view(num_token, self.num_expert_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_token, self.num_expert_group, scores.shape[-1] // self.num_expert_group)
            .reshape(num_token, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
        if self.forced is None:
            topk_weights, topk_ids = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_ids = self.forced
            topk_weights = scores.gather(1, topk_ids)
        return topk_weights * self.routed_scaling_factor, topk_ids.to(torch.int32)


class IntRouterBlock(RouterBlock):
    """:class:`RouterBlock` for routers that return int32 ids."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        return dispatch(self.experts, x, idx.long(), w.to(x.dtype))


# ----------------------------------------------------------------------- peft: X-LoRA top-k adapters
class XLoraClassifier(nn.Module):
    """huggingface/peft ``src/peft/tuners/xlora/classifier.py`` ``XLoraClassifier``: one head scoring every adapter
    of every layer at once, ``[batch, seq, n_layers, n_classes]``, softmax over the adapters."""

    def __init__(self, n_layers: int, n_classes: int = E) -> None:
        super().__init__()
        self.n_layers, self.n_classes = n_layers, n_classes
        self.layers = nn.Linear(D, n_layers * n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.layers(x).view(*x.shape[:-1], self.n_layers, self.n_classes)
        return logits.softmax(-1)


class XLoraLinearLayer(_Forced):
    """peft ``src/peft/tuners/xlora/layer.py`` ``XLoraLinearLayer``: this layer's slice of the classifier's
    scalings (handed in as ``scalings=``), ``get_maybe_topk_scalings`` (a ``topk`` whose values are dropped, a
    ``scatter_`` boolean mask, the scalings times it; with ``enable_softmax_topk`` a softmax over the nonzero
    entries, read and written by a boolean index), then every adapter on every token, its input scaled by its
    scaling (``apply_scalings_to_x``), added to the base layer's output."""

    def __init__(self, layer_number: int, top_k_lora: int = 2, softmax_topk: bool = True) -> None:
        super().__init__()
        self.layer_number, self.top_k_lora, self.enable_softmax_topk = layer_number, top_k_lora, softmax_topk
        self.base_layer = nn.Linear(D, D)
        self.lora_A = nn.ModuleList(nn.Linear(D, 4, bias=False) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(4, D, bias=False) for _ in range(E))
        self.scaling, self.global_scaling_weight = 2.0, 1.0

    def get_maybe_topk_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        xlora_scalings = scalings[:, :, self.layer_number, :]
        if self.forced is None:
            _, topk_indices = torch.topk(xlora_scalings, k=self.top_k_lora, dim=-1)
        else:
            topk_indices = self.forced.view(*xlora_scalings.shape[:-1], -1)
        mask = torch.zeros_like(xlora_scalings, dtype=torch.bool)
        mask.scatter_(-1, topk_indices, True)
        xlora_scalings = xlora_scalings * mask.to(xlora_scalings.dtype)
        if self.enable_softmax_topk:
            nonzero_mask = xlora_scalings != 0
            softmax_res_nonzero = torch.softmax(xlora_scalings[nonzero_mask], dim=-1)
            xlora_scalings[nonzero_mask] = softmax_res_nonzero
        return xlora_scalings

    def forward(self, x: torch.Tensor, *, scalings: torch.Tensor) -> torch.Tensor:
        xlora_scalings = self.get_maybe_topk_scalings(scalings)
        result = self.base_layer(x)
        for n, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            x_mod = x * xlora_scalings[:, :, n].unsqueeze(-1)
            result = result + lora_b(lora_a(x_mod)) * self.scaling * self.global_scaling_weight
        return result


class XLoraModel(nn.Module):
    """peft ``XLoraModel``: the classifier runs first, its scalings handed to every X-LoRA layer."""

    def __init__(self, softmax_topk: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.internal_xlora_classifier = XLoraClassifier(2)
        self.layers = nn.ModuleList(XLoraLinearLayer(i, softmax_topk=softmax_topk) for i in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalings = self.internal_xlora_classifier(x)
        for layer in self.layers:
            x = x + layer(x, scalings=scalings)
        return x


class XLoraSequenceLayer(nn.Module):
    """EricLBuehler/xlora ``src/xlora/xlora_insertion.py`` (the first X-LoRA): ``get_maybe_topk_scalings`` with
    ``torch.topk(xlora_scalings, k, dim=1)`` and ``mask.scatter_(1, ...)`` on ``[batch, seq, n_classes]``
    scalings: a top-k over the sequence, not the adapters. Its own classifier head here."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k_lora = 2
        self.classifier = nn.Linear(D, E)
        self.base_layer = nn.Linear(D, D)
        self.lora_A = nn.ModuleList(nn.Linear(D, 4, bias=False) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(4, D, bias=False) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xlora_scalings = self.classifier(x).softmax(-1)
        _, topk_indices = torch.topk(xlora_scalings, k=self.top_k_lora, dim=1)
        mask = torch.zeros_like(xlora_scalings, dtype=torch.bool)
        mask.scatter_(1, topk_indices, True)
        xlora_scalings = xlora_scalings * mask.to(xlora_scalings.dtype)
        result = self.base_layer(x)
        for n, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            result = result + lora_b(lora_a(x * xlora_scalings[:, :, n].unsqueeze(-1)))
        return result


# ----------------------------------------------------------------------- MoEfication: experts as neuron groups
class MoEficationFFN(_Forced):
    """thunlp/MoEfication ``moefication/utils.py`` ``change_forward``: a dense FFN whose neurons are split into
    experts (``patterns``, one 0/1 row per expert), an MLP router's ``topk`` labels (values dropped), the neurons
    of the chosen experts by ``F.embedding(labels, patterns).sum(-2)``, the others zeroed by a boolean index
    assignment on the hidden pre-activations; no combine weight (the router gets no gradient)."""

    def __init__(self, k: int = 2, d_ff: int = 32) -> None:
        super().__init__()
        self.k, self.num_experts = k, E
        self.wi, self.wo = nn.Linear(D, d_ff, bias=False), nn.Linear(d_ff, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, E))
        labels = torch.arange(d_ff) % E
        self.register_buffer("patterns", (labels[None, :] == torch.arange(E)[:, None]).float())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, hidden_size = hidden_states.shape
        score = self.mlp(hidden_states.view(-1, hidden_size))
        labels = torch.topk(score, k=self.k, dim=-1)[1] if self.forced is None else self.forced
        cur_mask = F.embedding(labels.view(bsz, seq_len, self.k), self.patterns).sum(-2)
        h = self.wi(hidden_states)
        h[cur_mask == False] = 0  # noqa: E712 (as written upstream)
        return self.wo(F.relu(h))


# ----------------------------------------------------------------------- LoRAMoE: every adapter weighted
class LoRAMoELinear(nn.Module):
    """Ablustrund/LoRAMoE ``peft/tuners/lora.py`` ``Linear.forward``: a softmax ``lora_route`` over the LoRA
    experts, every expert added with its weight (dense, no choice to record)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_num = E
        self.base = nn.Linear(D, D)
        self.lora_route = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 4), nn.Linear(4, D)) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route_weight = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(x.dtype)
        result = self.base(x)
        for i, expert in enumerate(self.experts):
            result = result + route_weight[..., i : i + 1] * expert(x)
        return result


# ----------------------------------------------------------------------- a top-k in a TorchScript helper
@torch.jit.script
def _scripted_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_k_gates, top_k_indices = probs.topk(k, dim=1)
    return top_k_gates / top_k_gates.sum(1, keepdim=True), top_k_indices


class ScriptedGate(nn.Module):
    """A gate whose top-k runs in a ``torch.jit.script`` helper (as ModuleFormer's and JetMoE's scripted
    ``compute_gating`` helpers, here holding the top-k itself), with a max-subtracted softmax before it."""

    def __init__(self) -> None:
        super().__init__()
        self.w_gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_gate(x)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return _scripted_top_k(logits.softmax(-1), self.top_k)


# ----------------------------------------------------------------------- SGLang: expert-location dispatch (EPLB)
class SglangEplbTopK(_Forced):
    """sgl-project/sglang ``srt/layers/moe/topk.py`` ``TopK`` with an ``ExpertLocationDispatchInfo``
    (``srt/eplb/expert_location_dispatch.py``): a softmax ``topk`` of the logical experts, then
    ``topk_ids_logical_to_physical``: ``"static"`` looks each id up in this rank's logical-to-physical map,
    ``"random"`` picks one of its replicas with ``torch.randint`` (``_topk_ids_logical_to_physical_dynamic``); the
    padded tokens' ids are set to -1 (``_mask_topk_ids_padded_region``). Logical experts 0 and 3 have a replica
    (physical 8 and 9); the ids recorded and forced are the logical ones."""

    def __init__(self, algorithm: str) -> None:
        super().__init__()
        self.top_k, self.ep_dispatch_algorithm, self.num_token_non_padded = 2, algorithm, T - 4
        rank_map = torch.arange(E)
        rank_map[0] = E
        all_map = torch.arange(E)[:, None].repeat(1, 2)
        all_map[0, 1], all_map[3, 1] = E, E + 1
        self.register_buffer("partial_logical_to_rank_dispatch_physical_map", rank_map)
        self.register_buffer("partial_logical_to_all_physical_map", all_map)
        self.register_buffer("partial_logical_to_all_physical_map_num_valid", 1 + (torch.arange(E) % 3 == 0).long())

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float)
        if self.forced is None:
            topk_weights, topk_ids = torch.topk(scores, self.top_k, dim=-1)
        else:
            topk_ids = self.forced
            topk_weights = scores.gather(1, topk_ids)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.ep_dispatch_algorithm == "static":
            topk_ids = self.partial_logical_to_rank_dispatch_physical_map[topk_ids]
        else:
            shape, flat = topk_ids.shape, topk_ids.flatten()
            draw = torch.randint(0, 65536, flat.shape, dtype=torch.int32)
            chosen = draw % self.partial_logical_to_all_physical_map_num_valid[flat]
            topk_ids = self.partial_logical_to_all_physical_map[flat, chosen].view(shape)
        topk_ids = topk_ids.to(torch.int32)
        topk_ids[torch.arange(topk_ids.shape[0]) >= self.num_token_non_padded, :] = -1
        return topk_weights, topk_ids


class SglangEplbMoE(nn.Module):
    """SGLang's MoE block: the gate, the ``TopK`` module and the physical experts (replicas load the same weights,
    as the expert-location updater keeps them); -1 ids run no expert."""

    def __init__(self, algorithm: str) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.topk = SglangEplbTopK(algorithm)
        self.experts = Experts(E + 2)
        self.num_experts = E
        self.experts[E].load_state_dict(self.experts[0].state_dict())
        self.experts[E + 1].load_state_dict(self.experts[3].state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.topk(x, self.gate(x))
        return dispatch(self.experts, x, ids.long(), w)


# ----------------------------------------------------------------------- MoEUT: one layer group applied n times
class MoEUTSigmaMoE(_Forced):
    """RobertCsordas/moeut ``moeut/moeut.py`` ``SigmaMoE``: ``expert_sel`` ``[E, d]``, sigmoid scores, the scores
    kept for the entropy regulariser in training (``sel_hist``), ``sel.topk(k, sorted=False)``, the values the
    combine weights; stacked ``keys``/``values``. ``layer_index`` (which repeat this call is) is read only by the
    hand-forced copy, to take its own rows."""

    def __init__(self, n_repeats: int, k: int = 2, expert_size: int = 8) -> None:
        super().__init__()
        self.n_experts, self.n_heads, self.n_repeats = E, k, n_repeats
        self.keys = nn.Parameter(torch.randn(E, D, expert_size) * D**-0.5)
        self.values = nn.Parameter(torch.randn(E, expert_size, D) * (E * expert_size) ** -0.5)
        self.expert_sel = nn.Parameter(torch.randn(E, D) * D**-0.5)
        self.sel_hist: list[torch.Tensor] = []

    def forward(self, input: torch.Tensor, layer_index: int) -> torch.Tensor:
        sel = F.linear(input, self.expert_sel, None)
        if self.training:
            self.sel_hist.append(sel)
        sel = F.sigmoid(sel)
        if self.forced is None:
            sel_val, sel_index = sel.topk(self.n_heads, dim=-1, sorted=False)
        else:
            sel_index = self.forced.view(self.n_repeats, *sel.shape[:-1], self.n_heads)[layer_index]
            sel_val = sel.gather(-1, sel_index)
        scores = F.relu(torch.einsum("btd,btkdf->btkf", input, self.keys[sel_index]))
        out = torch.einsum("btkf,btkfd->btkd", scores, self.values[sel_index])
        return (out * sel_val[..., None]).sum(-2)


class MoEUT(nn.Module):
    """moeut ``MoEUT.forward``: the layer group run ``n_repeats`` times over the same weights (one group of one
    layer here), each application under activation checkpointing (``"none"``, ``"non_reentrant"`` or
    ``"reentrant"``), so that backward recomputes the router's calls in reverse order."""

    def __init__(self, checkpointing: str, n_repeats: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointing, self.n_repeats = checkpointing, n_repeats
        self.ln = nn.LayerNorm(D)
        self.ffn = MoEUTSigmaMoE(n_repeats)

    def layer(self, x: torch.Tensor, li_abs: int) -> torch.Tensor:
        return x + self.ffn(self.ln(x), li_abs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        for r in range(self.n_repeats):
            if self.checkpointing == "none":
                x = self.layer(x, r)
            else:
                x = checkpoint(self.layer, x, r, use_reentrant=self.checkpointing == "reentrant")
        self.ffn.sel_hist = []
        return x


# ----------------------------------------------------------------------- Megatron: forced load balancing
class RandomSTE(torch.autograd.Function):
    """NVIDIA/Megatron-LM ``megatron/core/transformer/moe/moe_utils.py`` ``RandomSTE``: the logits replaced by
    normal noise from a generator the class holds (seeded once), the gradient passed straight through."""

    generator: torch.Generator | None = None

    @staticmethod
    def forward(ctx: object, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if RandomSTE.generator is None:
            RandomSTE.generator = torch.Generator(device=logits.device)
            RandomSTE.generator.manual_seed(42)
        return logits.clone().normal_(generator=RandomSTE.generator)

    @staticmethod
    def backward(ctx: object, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_output


class ForceBalancedRouter(_Forced):
    """Megatron-core ``TopKRouter`` with ``moe_router_force_load_balancing`` (``apply_random_logits``): a top-k of
    the random logits, softmax of the top values."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.topk, self.num_experts = 2, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = RandomSTE.apply(F.linear(x, self.weight))
        if self.forced is None:
            scores, top_indices = torch.topk(logits, self.topk, dim=-1)
        else:
            top_indices = self.forced
            scores = logits.gather(-1, top_indices)
        return torch.softmax(scores, dim=-1, dtype=torch.float32), top_indices


# ----------------------------------------------------------------------- the tests
FORCED: dict[str, Callable[[], nn.Module]] = {
    "deepspeed-residual-moe": DeepSpeedResidualMoE,
    "vllm-grouped-topk-no-bias": lambda: IntRouterBlock(VllmGroupedTopK()),
    "sglang-eplb-static": lambda: SglangEplbMoE("static"),
    "sglang-eplb-random-replica": lambda: SglangEplbMoE("random"),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(FORCED))
def test_replay_is_the_recorded_experts_forced_by_hand(case: str) -> None:
    """The recorded experts are the ones the block used (the logical ids, where SGLang maps them to physical
    replicas after the decision; the residual MoE's two-way ``coefficient`` no router), and a replay after the
    routers change is those experts forced by hand, in output and gradients."""
    model = TwoLayers(FORCED[case])
    session = assert_replay_is_forced_by_hand(model, _x(), router_grads=None if "eplb" in case else True)
    assert [(s.num_experts, s.top_k) for s in session.sites] == [(E, 1 if "deepspeed" in case else 2)] * 2
    assert not any("coefficient" in name for name in session.names)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(
            lambda: RouterBlock(KTop1Gate()),
            r"(?s)more than one independent choice.*Its 2 choices are over 4 experts each, which together make its 8"
            r".*one choice in each slice of the experts.*Give each slice's choice a module of its own",
            id="hetu-ktop1",
        ),
        pytest.param(lambda: RouterBlock(SAMGate()), "an earlier choice .* reshapes the scores", id="hetu-sam"),
    ],
)
def test_choices_local_to_a_prototype_or_group_are_refused(make: Callable[[], nn.Module], match: str) -> None:
    """A top-1 in each of k expert prototypes (k calls over E/k experts each), or a top-k inside the one group
    chosen first (over E/G experts, moved by the group's offset): no single call over the experts holds the choice,
    and a gather cannot force an expert outside the group. Refused (a false refusal for the prototypes, whose k
    choices could each be forced), the model left as it was."""
    model = TwoLayers(make)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=match):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class Prototype(_Forced):
    """One expert prototype's top-1 over its ``E / k`` experts, in a module of its own (positions in its slice)."""

    def __init__(self, per: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = per, 1

    def forward(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(chunk, dim=1)
        local = torch.topk(probs, 1, dim=1).indices if self.forced is None else self.forced
        return probs.gather(1, local), local


class KTop1Prototypes(nn.Module):
    """Hetu's k top-1 (``KTop1Gate``) written as the refusal above says: each prototype's choice made by a module of
    its own, the local positions moved to global ids by the prototype's offset in the gate."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k, self.num_experts = k, E
        self.wg = nn.Linear(D, E)
        self.prototypes = nn.ModuleList(Prototype(E // k) for _ in range(k))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.num_experts // self.k
        gates, indices = [], []
        for i, (chunk, prototype) in enumerate(zip(self.wg(x).split(per, dim=1), self.prototypes, strict=True)):
            gate, local = prototype(chunk)
            gates.append(gate)
            indices.append(local + i * per)
        return torch.cat(gates, 1), torch.cat(indices, 1)


@pytest.mark.reliability("silent replays")
def test_expert_prototypes_in_modules_of_their_own_replay_as_forced_by_hand() -> None:
    """The way the refusal of Hetu's k top-1 names: one module per prototype, attached with include=, each a router
    of E/k experts (its positions recorded); a replay is the recorded experts forced by hand."""
    model = TwoLayers(lambda: RouterBlock(KTop1Prototypes()))
    session = assert_replay_is_forced_by_hand(model, _x(), router_grads=None, include="*.prototypes.*")
    assert [(s.num_experts, s.top_k) for s in session.sites] == [(E // 2, 1)] * 4


def _bt(seed: int = 1) -> torch.Tensor:
    return _x(2, T // 2, seed=seed)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("softmax_topk", [False, True])
def test_xlora_top_k_adapters_replay_is_forced_by_hand(softmax_topk: bool) -> None:
    assert_replay_is_forced_by_hand(XLoraModel(softmax_topk), _bt(), router_grads=None, include="layers.*")


@pytest.mark.reliability("silent replays")
def test_moefication_neuron_groups_replay_is_forced_by_hand() -> None:
    model = TwoLayers(MoEficationFFN)
    assert_replay_is_forced_by_hand(model, _bt(), router_grads=None, include="layers.*")


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "attach", "error", "match"),
    [
        pytest.param(LoRAMoELinear, {}, mr.RouterNotFoundError, "no MoE router found", id="loramoe-dense"),
        pytest.param(LoRAMoELinear, {"include": "layers.*"}, mr.UnsupportedRouterError, "", id="loramoe-dense-named"),
        pytest.param(
            lambda: RouterBlock(ScriptedGate()),
            {},
            mr.UnsupportedRouterError,
            "no decision-like call in its forward changes the output",
            id="torchscript-top-k",
        ),
        pytest.param(
            XLoraSequenceLayer,
            {"include": "layers.*"},
            mr.UnsupportedRouterError,
            "chooses only along another dimension",
            id="xlora-top-k-over-tokens",
        ),
    ],
)
def test_routers_with_no_choice_in_sight_are_refused(
    make: Callable[[], nn.Module], attach: dict[str, object], error: type[Exception], match: str
) -> None:
    """No per-token choice among experts that moe_replay can see: every adapter weighted (LoRAMoE: not found, or
    refused once named), a top-k inside a TorchScript function (only the max of a stable softmax in sight, which
    decides nothing), a top-k over the sequence (the first X-LoRA's ``dim=1``). Refused, the model left as it was."""
    model = TwoLayers(make)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        with mr.attach(model, **attach) as session, torch.no_grad(), session.capture():
            model(_x(2, T // 2))
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_a_top_k_of_noise_from_a_class_held_generator_replays_as_forced_by_hand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Megatron's forced load balancing: a top-k of normal noise drawn from a generator ``RandomSTE`` holds. Once
    refused as differing between two runs on the same inputs (each probe run drew from the generator, which was not
    put back). Now the capture draws from it as one plain forward does (the recorded experts are those a forward
    from the same generator state uses when forced by hand), and a replay is those experts forced by hand, with
    combine weights from the replay's own noise, in output and gradients."""
    g = torch.Generator().manual_seed(42)
    monkeypatch.setattr(RandomSTE, "generator", g)
    model = TwoLayers(lambda: RouterBlock(ForceBalancedRouter()))
    ref, x = copy.deepcopy(model), _x()
    start = g.get_state()
    with mr.attach(model) as session:
        with session.capture():
            captured = model(x)
        after = g.get_state()
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        g.set_state(start)
        with torch.no_grad(), _forced_by_hand(ref, rows):
            assert torch.equal(ref(x), captured.detach()), "the rows are not the experts used"
        assert torch.equal(g.get_state(), after), "the capture drew more than one forward does"
        perturb(model)
        perturb(ref)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            expected.square().sum().backward()
        g.set_state(after)
        with session.replay(routes):
            replayed = model(x)
        replayed.square().sum().backward()
    assert torch.equal(replayed.detach(), expected.detach())
    assert [(s.num_experts, s.top_k) for s in session.sites] == [(E, 2)] * 2
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert (got.grad is None) == (want.grad is None) and (got.grad is None or torch.equal(got.grad, want.grad)), (
            name
        )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant", "reentrant"])
def test_a_layer_applied_several_times_under_checkpointing_replays_each_call_its_rows(checkpointing: str) -> None:
    """MoEUT's weight-shared layers: one router called once per repeat, each repeat checkpointed, so that backward
    recomputes the calls last first. Every call, and its recompute, gets its own rows: the output and gradients
    of the recorded experts forced by hand, per call."""
    model = MoEUT(checkpointing).train()
    x = _x(2, T // 2).requires_grad_(checkpointing == "reentrant")
    session = assert_replay_is_forced_by_hand(model, x, router_grads=True)
    assert session.names == ("ffn",) and [s.top_k for s in session.sites] == [2]
