"""MoE code of research and training libraries, with zero configuration (see ``test_public_routers22``).

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

from tests.test_evidence import D, E, Experts
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused, one_layer


# ----------------------------------------------------------------------- Flaxformer: padding tokens ignored
# google/flaxformer flaxformer/architectures/moe/routing.py (``Router.__call__`` with ``ignore_padding_tokens``,
# ``TokensChooseMaskedRouter._compute_routing_instructions``) and moe_layers.py (``MoeLayer._mask_and_dispatch_to_
# experts``): tokens in groups ``[groups, tokens_per_group, d]``; the router's ``RouterWeights`` Dense (with a bias)
# in fp32, softmax; a padding token is one whose input is all zeros (T5 zeroes them upstream), its logits multiplied
# by the mask (for the z-loss only). ``top_k`` of the probs; for padding tokens the gates are zeroed and the indices
# made negative (``expert_index *= 2 * mask - 1``, then ``+= mask - 1``), so that the one-hot drops them; with
# ``batch_prioritized_routing`` the tokens are sorted by their top gate (``argsort``) before the capacity is filled;
# top-1 choices fill every expert's capacity before the top-2 choices (the slot axis first, a ``cumsum`` over it);
# the priority is one-hot encoded over the capacity into a dispatch mask, and the combine array is the (masked)
# router probs at the dispatched places.
class FlaxformerTokensChooseMaskedRouter(_Used):
    """``TokensChooseMaskedRouter`` with ``ignore_padding_tokens``; returns ``(dispatch_mask, combine_array)``,
    both ``[groups, tokens, E, capacity]``. ``used``: the experts of its ``top_k``, ``-1`` for a padding token (it
    uses none). Forced rows of ``-1`` are chosen natively (the token's row of the ``top_k``)."""

    def __init__(self, num_selected_experts: int = 2, batch_prioritized_routing: bool = False) -> None:
        super().__init__()
        self.num_selected_experts = num_selected_experts
        self.batch_prioritized_routing = batch_prioritized_routing
        self.ignore_padding_tokens = True
        self.router_weights = nn.Linear(D, E)  # ``RouterWeights``: a Dense with a bias

    def forward(self, token_inputs: torch.Tensor, expert_capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.router_weights(token_inputs.float())
        router_probs = F.softmax(router_logits, dim=-1)
        padding_mask = (token_inputs.abs().sum(-1) > 0).to(token_inputs.dtype) if self.ignore_padding_tokens else None
        if padding_mask is not None:
            router_logits = router_logits * padding_mask.unsqueeze(-1)  # (for the z-loss, not computed here)
        self.z_loss = torch.logsumexp(router_logits, dim=-1).square().mean()
        return self._compute_routing_instructions(router_probs, padding_mask, expert_capacity)

    def _compute_routing_instructions(
        self, router_probs: torch.Tensor, padding_mask: torch.Tensor | None, expert_capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_groups, tokens_per_group, num_experts = router_probs.shape
        k = self.num_selected_experts
        expert_gate, expert_index = torch.topk(router_probs, k=k, dim=-1)
        if self.forced is not None:
            forced = self.forced.view(num_groups, tokens_per_group, k)
            expert_index = torch.where(forced < 0, expert_index, forced)
            expert_gate = router_probs.gather(-1, expert_index)
        self.used = expert_index.reshape(-1, k)
        if padding_mask is not None:
            self.used = self.used.masked_fill(padding_mask.reshape(-1, 1) == 0, -1)
            gate_mask = padding_mask.unsqueeze(-1)
            expert_gate = expert_gate * gate_mask
            long_mask = gate_mask.long()
            expert_index = expert_index * (2 * long_mask - 1)
            expert_index = expert_index + (long_mask - 1).repeat(1, 1, k)
            router_probs = router_probs * gate_mask
        if self.batch_prioritized_routing:
            permutation = torch.argsort(-expert_gate[..., 0], dim=-1)
            expert_index = torch.take_along_dim(expert_index, permutation.unsqueeze(-1), dim=-2)
        expert_index = expert_index.transpose(1, 2).reshape(num_groups, -1)
        # (``jax.nn.one_hot`` of a negative index is a zero row: a comparison with ``arange`` here)
        expert_mask = (expert_index.unsqueeze(-1) == torch.arange(num_experts)).long()
        token_priority = torch.cumsum(expert_mask, dim=1) * expert_mask - 1
        token_priority = token_priority.view(num_groups, k, tokens_per_group, num_experts).transpose(1, 2)
        token_priority = token_priority.amax(dim=2)
        if self.batch_prioritized_routing:
            inverse_permutation = torch.argsort(permutation, dim=-1)
            token_priority = torch.take_along_dim(token_priority, inverse_permutation.unsqueeze(-1), dim=-2)
        dispatch_mask = (token_priority.unsqueeze(-1) == torch.arange(expert_capacity)).to(router_probs.dtype)
        combine_array = torch.einsum("...te,...tec->...tec", router_probs, dispatch_mask)
        return dispatch_mask, combine_array


class FlaxformerMoeLayer(nn.Module):
    """``MoeLayer`` with a masked router: the expert capacity from the group size and ``capacity_factor``
    (``_compute_expert_capacity``: ``ceil(tokens_per_group * num_selected / E * factor)``, at least
    ``min_expert_capacity``); the tokens dispatched by an ``einsum`` with the mask, every expert run on its capacity
    rows, the outputs combined by an ``einsum`` with the combine array."""

    def __init__(self, batch_prioritized_routing: bool = False, capacity_factor: float = 2.0) -> None:
        super().__init__()
        self.router = FlaxformerTokensChooseMaskedRouter(2, batch_prioritized_routing)
        self.experts = Experts()
        self.num_experts, self.capacity_factor, self.min_expert_capacity = E, capacity_factor, 4

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens_per_group = inputs.shape[1]
        capacity = math.ceil(tokens_per_group * self.router.num_selected_experts / self.num_experts)
        capacity = max(int(capacity * self.capacity_factor), self.min_expert_capacity)
        dispatch_mask, combine_array = self.router(inputs, capacity)
        expert_inputs = torch.einsum("gtd,gtec->gecd", inputs, dispatch_mask)
        expert_outputs = torch.stack([expert(expert_inputs[:, e]) for e, expert in enumerate(self.experts)], 1)
        return torch.einsum("gecd,gtec->gtd", expert_outputs, combine_array)


def _padded() -> torch.Tensor:
    """Two sequences of 12, the first right-padded by 4 zero rows (as T5 zeroes padding upstream)."""
    x = _x(2, 12)
    x[0, 8:] = 0.0
    return x


# ----------------------------------------------------------------------- FastMoE: FasterGate, topology-aware
# laekov/fastmoe fmoe/gates/faster_gate.py (``FasterGate``, FasterMoE, PPoPP'22) over ``NaiveGate``: ``self.gate``
# Linear (with a bias) over ``num_expert * world_size`` experts; a ``topk(k=2)`` of the scores gives the top-1
# experts for the balance loss (``set_loss``) and for counting the tokens whose top-1 expert lives on another node
# (``self.mask``: the experts outside this node's ``ne_per_node``); if fewer than ``ogn_ratio`` of the tokens go out
# (a ``.item()`` branch), the plain ``topk`` and a softmax over the k values; otherwise (under no_grad) the
# ``ogn_thres`` outgoing tokens with the best top-1 score keep it (a ``topk`` over the tokens), every token's top-2
# is taken among this node's experts only (the others ``-inf`` in a clone), the kept tokens' second slot overwritten
# with their remote top-1, and the k weights read by advanced indexing of the scores, softmaxed. One process here:
# ``world_size`` and the node's experts emulated (``FMOE_TOPO_GPUS_PER_NODE=1``, node 0 holds the first half).
class FastMoEFasterGate(_Used):
    def __init__(self, num_expert: int = E // 2, world_size: int = 2, ogn_ratio: float = 0.14) -> None:
        super().__init__()
        self.num_expert, self.world_size, self.tot_expert = num_expert, world_size, num_expert * world_size
        self.top_k = 2
        self.gate = nn.Linear(D, self.tot_expert)
        self.ne_per_node = 1 * num_expert
        self.ogn_ratio = ogn_ratio
        self.node_rank = 0
        # (as upstream: a plain tensor attribute, no buffer)
        self.mask = torch.tensor([i // self.ne_per_node != self.node_rank for i in range(self.tot_expert)])
        self.policy_fn = None

    def set_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_score = self.gate(inp)
        lim_mask = self.mask
        top2_val, top2_idx = torch.topk(gate_score, k=2, dim=-1)
        S = gate_score.shape[0]
        top_k = 2
        with torch.no_grad():
            top1_idx = top2_idx.view((-1, top_k))[:, 0]
            top1_val = top2_val.view((-1, top_k))[:, 0]
        c_e = (
            torch.scatter_add(
                torch.zeros(self.tot_expert, device=top1_idx.device),
                0,
                top1_idx,
                torch.ones_like(top1_idx, dtype=torch.float),
            )
            / S
        )
        m_e = torch.mean(F.softmax(gate_score, dim=1), dim=0)
        self.set_loss(torch.mean(c_e * m_e) * (self.num_expert**2))
        with torch.no_grad():
            stored_models = torch.zeros(self.num_expert * self.world_size, dtype=torch.bool)
            lim_mask = lim_mask & ~stored_models.view(-1)
            ogn_mask = lim_mask[top1_idx]
            ogn_thres = int(inp.shape[0] * self.ogn_ratio)
        if self.forced is not None:
            # (by hand: the forced ids, their weights read from the scores as both branches read them)
            self.used = self.forced
            return self.forced, F.softmax(gate_score.gather(-1, self.forced), dim=-1)
        if ogn_mask.sum().item() < ogn_thres:
            topk_val, topk_idx = torch.topk(gate_score, k=self.top_k)
            self.used = topk_idx
            return topk_idx, F.softmax(topk_val, dim=-1)
        with torch.no_grad():
            top1_val[~ogn_mask] = float("-inf")
            _, top_ogn = torch.topk(top1_val.view(-1), k=ogn_thres)
            cand = gate_score.clone()
            cand[:, lim_mask] = float("-inf")
            _, topk_idx = torch.topk(cand, k=self.top_k)
            topk_idx[top_ogn, 1] = top1_idx.view(-1)[top_ogn]
        idx_x = torch.arange(inp.shape[0], device=inp.device).repeat_interleave(2)
        topk_val = gate_score[idx_x, topk_idx.view(-1)].view(-1, self.top_k)
        self.used = topk_idx
        return topk_idx, F.softmax(topk_val, dim=-1)


# laekov/fastmoe fmoe/gates/zero_gate.py (``ZeroGate``): every token to expert 0, weight ``1 / top_k`` per slot,
# whatever the input; no parameters, no choice.
class FastMoEZeroGate(nn.Module):
    def __init__(self, num_expert: int = E, top_k: int = 2) -> None:
        super().__init__()
        self.num_expert, self.top_k = num_expert, top_k

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.zeros(inp.shape[0] * self.top_k, dtype=torch.int64, device=inp.device)
        gate_score = torch.ones(inp.shape[0] * self.top_k, device=inp.device) / self.top_k
        return idx, gate_score.reshape(-1, 1, self.top_k)


class FastMoELayer(nn.Module):
    """fmoe/layers.py ``FMoE``: the gate gives ``(gate_top_k_idx, gate_score)``, the experts run on the tokens
    routed to them, the outputs weighted by ``gate_score`` (``[tokens, 1, k]`` or ``[tokens, k]``)."""

    def __init__(self, gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.gate = gate()
        self.experts = Experts()
        self.top_k = 2

    def forward(self, moe_inp: torch.Tensor) -> torch.Tensor:
        gate_top_k_idx, gate_score = self.gate(moe_inp)
        idx = gate_top_k_idx.view(-1, self.top_k)
        w = gate_score.reshape(-1, self.top_k)
        out = torch.zeros_like(moe_inp)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, w[tok, slot, None] * expert(moe_inp[tok]))
        return out


# laekov/fastmoe fmoe/gates/dc_gate.py (``DCGate``, a distributed-capacity GShard gate) over ``NaiveGate``: the top-2
# of the gate's scores with a softmax over the two values (``return_all_scores``), the balance loss from the top-1,
# a capacity of ``ceil(cap_rate * tokens)`` (1.2 in training, 2.4 in eval: every token fits on one worker) applied by
# ``limit_by_capacity`` (a CUDA op writing -1 into the ids past an expert's capacity, by position here), then, with
# ``random_routing``, the second slot set to -1 where twice its weight is under a uniform draw.
class FastMoEDCGate(_Used):
    def __init__(self, capacity: tuple[float, float] = (1.2, 2.4), random_routing: bool = True) -> None:
        super().__init__()
        self.num_expert, self.world_size, self.tot_expert, self.top_k = E, 1, E, 2
        self.gate = nn.Linear(D, E)
        self.capacity, self.random_routing = capacity, random_routing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_score = self.gate(x)
        if self.forced is None:
            gate_top_k_val, topk_idx = torch.topk(gate_score, k=self.top_k, dim=-1, largest=True, sorted=False)
        else:
            topk_idx = self.forced
            gate_top_k_val = gate_score.gather(-1, topk_idx)
        topk_val = F.softmax(gate_top_k_val.view(-1, self.top_k), dim=-1)
        S = gate_score.shape[0]
        top1_idx = topk_idx.view((-1, self.top_k))[:, 0]
        c_e = torch.scatter_add(torch.zeros(self.tot_expert), 0, top1_idx, torch.ones_like(top1_idx, dtype=torch.float))
        m_e = torch.mean(F.softmax(gate_score, dim=1), dim=0)
        self.loss = torch.mean(c_e / S * m_e) * (self.num_expert**2)
        cap_rate = self.capacity[0 if self.training else 1]
        capacity = math.ceil(cap_rate * x.shape[0])
        flat = topk_idx.reshape(-1)
        places = (F.one_hot(flat, self.tot_expert).cumsum(0) - 1).gather(1, flat[:, None])[:, 0]
        topk_idx = flat.masked_fill(places >= capacity, -1).view(-1, self.top_k)
        if self.random_routing:
            rand_routing_prob = torch.rand(gate_score.size(0), device=x.device)
            mask = 2 * topk_val[:, 1] < rand_routing_prob
            topk_idx[:, 1].masked_fill_(mask, -1)
        self.used = topk_idx
        return topk_idx, topk_val


class FastMoEDCLayer(nn.Module):
    """``FMoE`` with ids of -1 skipped (no expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = FastMoEDCGate()
        self.experts = Experts()

    def forward(self, moe_inp: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(moe_inp)
        out = torch.zeros_like(moe_inp)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, w[tok, slot, None] * expert(moe_inp[tok]))
        return out


# ----------------------------------------------------------------------- tutel v0.1: the gate runs the experts
# microsoft/tutel tutel/impls/moe_layer.py (the v0.1 ``TopKGate.apply_on_expert_fn`` and ``MOELayer.forward``): the
# layer calls its gate's ``apply_on_expert_fn(input, expert_fn, group)``, never the gate's forward (it has none);
# there: ``wg`` logits, the ``topk`` of the *logits*, a one-hot per slot, the weights ``(softmax(logits) *
# one_hot).sum(1)`` renormalised over the k slots, each token's place in its expert's buffer by a cumulative sum
# (``fast_cumsum_sub_one``), the top-2 slots after every top-1; the capacity fixed from the first call's sample size
# (``if not hasattr(self, '_fdr')``) and the places past it dropped by the dispatch kernel; the layer's ``expert_fn``
# runs the batched experts on ``[E, capacity, d]``. ``MOELayer.forward`` keeps the first call's sample size and pads
# a smaller batch with zero rows up to it (routed like any token), the output cut back. Upstream ``expert_fn`` is a
# closure over the layer; a bound method here, so that a copy's experts are its own.
class TutelV01TopKGate(_Used):
    def __init__(self, top_k: int = 2, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.top_k, self.num_global_experts = top_k, E
        self.wg = nn.Linear(D, E, bias=False)
        self.capacity_factor = capacity_factor
        self._capacity: int | None = None

    def apply_on_expert_fn(
        self, input: torch.Tensor, expert_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.wg(input)
        if self.forced is None:
            topk_indices = torch.topk(logits, self.top_k, dim=1).indices
        else:
            topk_indices = self.forced
        self.used = topk_indices
        indices_s = [x.view(-1) for x in topk_indices.chunk(self.top_k, dim=1)]
        masks_se = [
            torch.zeros(x.size(0), self.num_global_experts, dtype=x.dtype).scatter_(1, x.unsqueeze(-1), 1)
            for x in indices_s
        ]
        gates = F.softmax(logits, dim=1)
        gates_s = [(gates * x).sum(dim=1) for x in masks_se]
        me = torch.sum(gates.float(), dim=0)
        ce = torch.sum(masks_se[0].to(me.dtype), dim=0)
        l_loss = torch.sum(me * ce) * (self.num_global_experts / (gates.size(0) * gates.size(0)))
        locations1 = torch.cumsum(masks_se[0], dim=0) - 1
        locations_s = [torch.sum(locations1 * masks_se[0], dim=1).to(torch.int32)]
        if self.top_k > 1:
            acc_base = None
            for k in range(1, self.top_k):
                acc_base = (
                    torch.sum(masks_se[k - 1], dim=0, keepdim=True)
                    if acc_base is None
                    else acc_base + torch.sum(masks_se[k - 1], dim=0, keepdim=True)
                )
                locations2 = torch.cumsum(masks_se[k], dim=0) - 1
                locations2 += acc_base
                locations_s.append(torch.sum(locations2 * masks_se[k], dim=1).to(torch.int32))
            denom_s = torch.clamp(sum(gates_s), min=torch.finfo(gates_s[0].dtype).eps)  # type: ignore[arg-type]
            gates_s = [x / denom_s for x in gates_s]
        S, M, GE = input.size(0), input.size(1), self.num_global_experts
        if self._capacity is None:
            self._capacity = self.top_k * int(self.capacity_factor * ((S + GE - 1) // GE))
        capacity = self._capacity
        # (the dispatch kernel: each kept (token, slot) copied to its expert's place; the decode sums them weighted)
        dispatched = torch.zeros(GE * capacity, M, dtype=input.dtype)
        kept = []
        for i, loc in zip(indices_s, locations_s, strict=True):
            keep = loc < capacity
            kept.append(keep)
            dispatched = dispatched.index_add(0, (i * capacity + loc.long())[keep], input[keep])
        expert_output = expert_fn(dispatched.view(GE, capacity, M)).reshape(GE * capacity, M)
        result = torch.zeros_like(input)
        for i, loc, g, keep in zip(indices_s, locations_s, gates_s, kept, strict=True):
            rows = expert_output[(i * capacity + loc.long()).clamp(max=GE * capacity - 1)]
            result = result + (g * keep)[:, None] * rows
        return result, l_loss


class TutelV01MOELayer(nn.Module):
    def __init__(self, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.gate = TutelV01TopKGate(2, capacity_factor)
        self.fc1_weight = nn.Parameter(torch.randn(E, D, 12) / 4)
        self.fc2_weight = nn.Parameter(torch.randn(E, 12, D) / 4)
        self.num_global_experts, self.model_dim = E, D
        self.expected_sample_size = 0

    def expert_fn(self, dispatched_input: torch.Tensor) -> torch.Tensor:
        return torch.matmul(F.relu(torch.matmul(dispatched_input, self.fc1_weight)), self.fc2_weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        original_shape = input.shape
        reshaped_input = input.reshape(-1, input.shape[-1])
        reshaped_input_samples = reshaped_input.shape[0]
        self.expected_sample_size = self.expected_sample_size or reshaped_input.size(0)
        if reshaped_input.size(0) != self.expected_sample_size:
            pad_input = torch.zeros([self.expected_sample_size, self.model_dim], dtype=reshaped_input.dtype)
            pad_input[: reshaped_input.size(0)] = reshaped_input
            reshaped_input = pad_input
        result_output, l_aux = self.gate.apply_on_expert_fn(reshaped_input, self.expert_fn)
        self.l_aux = l_aux
        return result_output[:reshaped_input_samples, :].view(original_shape)


def _tutel_v01_padded() -> nn.Module:
    """Two v0.1 layers that saw 30 tokens first: a batch of 24 is padded to 30 rows, and the capacity is the first
    call's."""
    model = Layers(lambda: TutelV01MOELayer(2.0))
    with torch.no_grad():
        model(_x(30, seed=5))
    return model


# ----------------------------------------------------------------------- tutel: adaptive capacity
# microsoft/tutel tutel/impls/fast_dispatch.py (``extract_critical``, ``fast_encode``/``fast_decode``) as
# tutel/impls/moe_layer.py calls it: ``LinearTopKGate`` gives the logits, the layer softmaxes them; ``topk`` of the
# scores, a one-hot per slot, weights by ``(scores * one_hot).sum(1)`` renormalised, places by a cumulative sum;
# ``capacity_factor > 0``: a fixed capacity; ``== 0``: the capacity is the largest place + 1 (all-reduced; nothing
# dropped); ``< 0``: that, but at most ``-capacity_factor`` times the even share (places past it dropped);
# ``is_postscore=False`` weights the tokens on the way in (encode) instead of the experts' outputs (decode).
class TutelLinearTopKGate(nn.Module):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.top_k = k
        self.wg = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wg(x.float())


class TutelAdaptiveMOELayer(_Used):
    """``MOELayer`` with ``self.gates = ModuleList([gate])``: the choice in the layer (``extract_critical``)."""

    def __init__(self, capacity_factor: float = 0.0, is_postscore: bool = True) -> None:
        super().__init__()
        self.gates = nn.ModuleList([TutelLinearTopKGate()])
        self.experts = Experts()
        self.num_global_experts = E
        self.capacity_factor, self.is_postscore = capacity_factor, is_postscore

    def _extract_critical(self, gates: torch.Tensor, top_k: int) -> tuple[list, list, list, int]:
        topk_indices = torch.topk(gates, top_k, dim=1).indices if self.forced is None else self.forced
        self.used = topk_indices
        num_global_experts = gates.size(1)
        indices_s = [x.view(-1) for x in topk_indices.chunk(top_k, dim=1)]
        masks_se = [
            torch.zeros(x.size(0), num_global_experts, dtype=x.dtype).scatter_(1, x.unsqueeze(-1), 1) for x in indices_s
        ]
        gates_s = [(gates * x).sum(dim=1) for x in masks_se]
        locations1 = torch.cumsum(masks_se[0], dim=0) - 1
        locations_s = [torch.sum(locations1 * masks_se[0], dim=1).to(torch.int32)]
        acc_base = None
        for k in range(1, top_k):
            acc_base = (
                torch.sum(masks_se[k - 1], dim=0, keepdim=True)
                if acc_base is None
                else acc_base + torch.sum(masks_se[k - 1], dim=0, keepdim=True)
            )
            locations2 = torch.cumsum(masks_se[k], dim=0) - 1
            locations2 += acc_base
            locations_s.append(torch.sum(locations2 * masks_se[k], dim=1).to(torch.int32))
        if top_k > 1:
            denom_s = torch.clamp(sum(gates_s), min=torch.finfo(gates_s[0].dtype).eps)  # type: ignore[arg-type]
            gates_s = [x / denom_s for x in gates_s]
        share = (int(gates.size(0)) + num_global_experts - 1) // num_global_experts
        if self.capacity_factor > 0:
            capacity = top_k * int(self.capacity_factor * share)
        else:
            capacity = int(torch.max(torch.concat(locations_s, dim=0))) + 1
            if self.capacity_factor < 0:
                capacity = min(capacity, top_k * int(-self.capacity_factor * share))
        return indices_s, locations_s, gates_s, capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gates[0]
        scores = F.softmax(gate(x), dim=1)
        indices_s, locations_s, gates_s, capacity = self._extract_critical(scores, gate.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            for i, loc, g in zip(indices_s, locations_s, gates_s, strict=True):
                tok = ((i == e) & (loc < capacity)).nonzero(as_tuple=True)[0]
                if tok.numel():
                    if self.is_postscore:
                        y = g[tok, None] * expert(x[tok])
                    else:
                        y = expert(g[tok, None] * x[tok])
                    out = out.index_add(0, tok, y)
        return out


# ----------------------------------------------------------------------- Mixture of Vectors: IA3 vectors merged
# for-ai/parameter-efficient-moe src/models/mov.py (Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit",
# ``MoV``): a router Dense over the token, a softmax over E (IA)^3 vectors, the vectors merged by the soft weights
# and multiplied into the hidden state (``top_k`` unset: every vector weighs in). No discrete choice.
class MixtureOfVectors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.router = nn.Linear(D, E, bias=False)
        self.ia3_vectors = nn.Parameter(torch.ones(E, D) + torch.randn(E, D) / 4)
        self.dense = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_probs = F.softmax(self.router(x), dim=-1)
        merged = torch.einsum("...e,ed->...d", router_probs, self.ia3_vectors)
        return self.dense(x) * merged


# ----------------------------------------------------------------------- NLLB-MoE: padding cut by the attention mask
# huggingface/transformers src/transformers/models/nllb_moe/modeling_nllb_moe.py (``NllbMoeTop2Router.route_tokens``
# with ``padding_mask``, ``NllbMoeSparseMLP``, ``NllbMoeEncoderLayer``): the encoder layer hands its extended
# attention mask (0 where attended, the dtype's minimum where padded, ``[b, 1, s, s]``) to the MoE MLP as
# ``padding_mask``; after both ``argmax`` choices, unless ``router_ignore_padding_tokens``, the last query row of
# the mask picks the padding tokens (``padding_mask[:, :, -1, :].reshape(-1)[-nb_tokens:]``) and both one-hot masks
# are multiplied by ``~padding_mask.bool()``: a padding token uses no expert. (The capacity is left large here.)
class NllbMoePaddingRouter(_Used):
    """``route_tokens`` with ``padding_mask``; ``used``: the experts each token is dispatched to, ``-1`` for a
    padding token (none)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.classifier = nn.Linear(D, E, bias=False)
        self.router_ignore_padding_tokens = False
        self.expert_capacity = 4 * 24

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.classifier(hidden_states.reshape(-1, hidden_states.shape[-1]))
        nb_tokens = router_logits.shape[0]
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_1 = torch.argmax(router_probs, dim=-1) if self.forced is None else self.forced[:, 0]
        top_1_mask = F.one_hot(top_1, num_classes=self.num_experts)
        logits_except_top_1 = router_logits.masked_fill(top_1_mask.bool(), float("-inf"))
        top_2 = torch.argmax(logits_except_top_1, dim=-1) if self.forced is None else self.forced[:, 1]
        top_2_mask = F.one_hot(top_2, num_classes=self.num_experts)
        kept = torch.ones(nb_tokens, dtype=torch.bool)
        if padding_mask is not None and not self.router_ignore_padding_tokens:
            if len(padding_mask.shape) == 4:
                padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-nb_tokens:]
            non_padding = ~padding_mask.bool()
            kept = non_padding
            top_1_mask = top_1_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
            top_2_mask = top_2_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
        locations1 = torch.cumsum(top_1_mask, dim=0) - 1
        locations2 = torch.cumsum(top_2_mask, dim=0) - 1
        locations2 += torch.sum(top_1_mask, dim=0, keepdim=True)
        top_1_mask = top_1_mask * torch.lt(locations1, self.expert_capacity)
        top_2_mask = top_2_mask * torch.lt(locations2, self.expert_capacity)
        self.used = torch.stack([top_1, top_2], 1).masked_fill(~kept[:, None], -1)
        top_1_max_probs = (router_probs * top_1_mask).sum(dim=1)
        top_2_max_probs = (router_probs * top_2_mask).sum(dim=1)
        denom_s = torch.clamp(top_1_max_probs + top_2_max_probs, min=torch.finfo(router_probs.dtype).eps)
        gates1 = (top_1_max_probs / denom_s)[:, None] * top_1_mask
        gates2 = (top_2_max_probs / denom_s)[:, None] * top_2_mask
        return top_1_mask, gates1 + gates2


class NllbMoeSparseMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = NllbMoePaddingRouter()
        self.experts = Experts()

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        _, router_probs = self.router(hidden_states, padding_mask)
        router_mask = router_probs.bool()
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        masked = torch.einsum("bm,be->ebm", flat, router_mask.to(flat.dtype))
        out = torch.zeros_like(flat)
        for idx, expert in enumerate(self.experts):
            token_indices = router_mask[:, idx]
            combining_weights = router_probs[token_indices, idx]
            out[token_indices] += combining_weights[:, None] * expert(masked[idx, token_indices])
        return out.view_as(hidden_states)


class NllbMoePaddedEncoder(nn.Module):
    """Two MoE layers over ``[2, 12, d]`` hidden states, the first sequence right-padded by 4 tokens: the
    attention mask (held here, upstream the encoder's argument) extended as the encoder does and handed to each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([NllbMoeSparseMLP(), NllbMoeSparseMLP()])
        attention_mask = torch.ones(2, 12, dtype=torch.long)
        attention_mask[0, 8:] = 0
        self.register_buffer("attention_mask", attention_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        inverted = 1.0 - self.attention_mask[:, None, None, :].to(x.dtype)
        extended = inverted.expand(b, 1, s, s) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = x + layer(x, extended)
        return x


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "fastmoe-faster-gate-few-tokens-out": (
        lambda: Layers(lambda: FastMoELayer(lambda: FastMoEFasterGate(ogn_ratio=1.0))),
        _x,
        {},
    ),
    "fastmoe-faster-gate-few-tokens-out-train": (
        lambda: Layers(lambda: FastMoELayer(lambda: FastMoEFasterGate(ogn_ratio=1.0))),
        _x,
        {"train": True},
    ),
    "tutel-v01-gate-runs-the-experts": (one_layer(lambda: TutelV01MOELayer(2.0)), _x, {}),
    "tutel-v01-gate-runs-the-experts-train": (one_layer(lambda: TutelV01MOELayer(2.0)), _x, {"train": True}),
    "tutel-v01-smaller-batch-padded-to-the-first": (_tutel_v01_padded, _x, {}),
    "tutel-adaptive-capacity-nothing-dropped": (one_layer(TutelAdaptiveMOELayer), _x, {}),
    "tutel-adaptive-capacity-nothing-dropped-train": (one_layer(TutelAdaptiveMOELayer), _x, {"train": True}),
    # (the adaptive capacity capped at the even share per slot: places past it dropped, by position)
    "tutel-adaptive-capacity-capped": (one_layer(lambda: TutelAdaptiveMOELayer(-1.0)), _x, {}),
    "tutel-adaptive-capacity-prescore": (
        one_layer(lambda: TutelAdaptiveMOELayer(0.0, is_postscore=False)),
        _x,
        {},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """FastMoE's
    topology-aware ``FasterGate`` where few tokens' top-1 expert is remote (the plain top-k, after a first top-2 for
    the balance loss and the count); tutel v0.1's gate that runs the experts itself from a method other than its
    forward (capacity fixed from the first call; a smaller batch padded with zero rows to the first one's size);
    tutel's adaptive capacity (``capacity_factor=0``: nothing dropped, or ``< 0``: capped, places past it dropped by
    position; weights applied before or after the experts):
    every router found and nothing else, the recorded rows the experts used, and a replay after the routers change
    those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "fastmoe-zero-gate": (
        lambda: Layers(lambda: FastMoELayer(FastMoEZeroGate)),
        _x,
        r"'layers\.0\.gate': its forward makes no decision-like call",
        {},
    ),
    # (outgoing tokens keep their remote top-1 from a first top-k in the second slot of a top-k over the local
    # experts: a choice that no one call holds)
    "fastmoe-faster-gate-many-tokens-out": (
        lambda: Layers(lambda: FastMoELayer(FastMoEFasterGate)),
        _x,
        r"'layers\.0\.gate': its forward makes more than one independent choice that reaches the output",
        {},
    ),
    "fastmoe-faster-gate-many-tokens-out-train": (
        lambda: Layers(lambda: FastMoELayer(FastMoEFasterGate)),
        _x,
        r"'layers\.0\.gate': its forward makes more than one independent choice that reaches the output",
        {"train": True},
    ),
    # (no padding token in the first batch: the mask keeps every token there, but a later padded batch's padding
    # tokens would use no expert while their rows named some; once accepted on such a batch and recorded silently)
    "flaxformer-tokens-choose-masked-padding-ignored-no-padding-yet": (
        lambda: Layers(FlaxformerMoeLayer),
        lambda: _x(2, 12),
        r"'layers\.0\.router': after its decision .* cuts it by values that are not its scores .* all zeros as padding",
        {},
    ),
    "flaxformer-tokens-choose-masked-padding-ignored": (
        lambda: Layers(FlaxformerMoeLayer),
        _padded,
        r"'layers\.0\.router': after its decision .* cuts it by values that are not its scores",
        {},
    ),
    # (tokens sorted by their top gate before the capacity is filled: a token dropped by score)
    "flaxformer-tokens-choose-masked-batch-prioritized": (
        lambda: Layers(lambda: FlaxformerMoeLayer(batch_prioritized_routing=True)),
        lambda: _x(2, 12),
        r"'layers\.0\.router': after its decision .* its forward chooses again from the current scores",
        {},
    ),
    # (capped at half the even share: ``int(0.5 * 1) == 0`` on a batch of fewer tokens than experts, every token
    # dropped there, as upstream)
    "tutel-adaptive-capacity-capped-at-zero-on-few-tokens": (
        lambda: Layers(lambda: TutelAdaptiveMOELayer(-0.5)),
        _x,
        r"'layers\.0\.gates\.0': on one of its tokens alone, changing the choice of its decision .* does not change",
        {},
    ),
    # (the second slot dropped at random after the choice, by a draw against twice its weight)
    "fastmoe-dc-gate-random-routing": (
        lambda: Layers(FastMoEDCLayer),
        _x,
        r"'layers\.0\.gate': after its decision .* its forward chooses again from the current scores",
        {},
    ),
    "fastmoe-dc-gate-random-routing-train": (
        lambda: Layers(FastMoEDCLayer),
        _x,
        r"'layers\.0\.gate': after its decision .* its forward chooses again from the current scores",
        {"train": True},
    ),
    "mixture-of-vectors-soft-merge": (lambda: Layers(MixtureOfVectors), _x, "no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """FastMoE's ``ZeroGate`` (every token to expert 0 whatever the input: no choice); FastMoE's ``FasterGate``
    where many tokens' top-1 expert is remote (a top-k over this node's experts whose second slot is overwritten,
    for the outgoing tokens with the best top-1, by a first top-k's top-1); Flaxformer's batch-prioritized routing
    (tokens sorted by their top gate before the capacity is filled); FastMoE's ``DCGate`` (the second slot dropped
    where twice its weight is under a uniform draw); Flaxformer's ``ignore_padding_tokens`` (gates
    zeroed and indices made negative after the ``top_k`` for all-zero tokens, whether or not the first batch holds
    any: the padding tokens' rows would name experts they did not use); tutel's capacity capped at half the even
    share (zero on a batch of fewer tokens than experts, where every token is dropped); Mixture of Vectors (IA3
    vectors merged by a softmax, no discrete choice): refused with a ``MoEReplayError`` saying why, the model as
    it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="false refusal: Flaxformer's ignore_padding_tokens drops every slot of an all-zero (padding) token after "
    "the top-k, a cut by the router's input that a replay of the same batch repeats; the padding rows could be "
    "recorded as -1 (route natively), yet the router is refused as one that cuts by values not its scores",
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_flaxformer_padding_tokens_ignored_replay_exactly(train: bool) -> None:
    """Flaxformer's masked tokens-choose router over a right-padded batch (padding rows all zeros, as T5 feeds it):
    the padding tokens' gates zeroed and their indices made negative after the ``top_k``, so they use no expert.
    The model's output depends on the same batch's padding alone, so a replay of that batch could be exact, with the
    padding tokens' rows recorded as ``-1``. Today the router is refused (loudly: no silent replay)."""
    assert_exact(Layers(FlaxformerMoeLayer), _padded(), train=train)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="silent: NLLB-MoE's router drops padding tokens after its argmax choices by the attention mask handed "
    "in; they use no expert, yet their rows are recorded naming the experts chosen, where a cut by the hidden "
    "states' own values is refused",
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_nllb_moe_padding_tokens_cut_by_the_attention_mask(train: bool) -> None:
    """NLLB-MoE's ``route_tokens`` over a right-padded batch, the encoder's extended attention mask handed to each
    MoE layer: the padding tokens' one-hot masks are zeroed after both ``argmax`` choices, so they use no expert.
    The replay is exact (the same mask cuts them again), but the rows recorded for them name experts they did not
    use (a load count or an engine would count them), with no error; exact would record them as ``-1``, refused
    would say why, as for a cut by the hidden states' own values."""
    assert_exact(NllbMoePaddedEncoder(), _x(2, 12), train=train)
