"""More public MoE router code, with zero configuration (see ``test_public_routers17``).

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
from tests.test_evidence import D, E
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact, assert_refused


# ----------------------------------------------------------------------- BALM: routers with a capacity per expert
# brineylab/BALM src/balm/modules/router.py (``TopKRouter``, ``TopPRouter``, ``ExpertChoiceRouter`` and the
# ``_assign_tokens_to_experts`` of their base) and src/balm/modules/ffn.py (``SparseFFN``): the router returns, per
# expert, the ids of the tokens it takes (``-1`` in empty slots) and their weights; the token-choice routers pick the
# experts by a ``torch.topk`` (or a ``torch.sort`` and a cumulative-sum threshold), then each expert keeps at most
# ``expert_capacity`` of the tokens that chose it, by a second ``torch.topk`` of their unnormalised probabilities
# (``-1``: no capacity, every token kept); the expert-choice router takes a ``torch.topk`` over the tokens.
class BalmBaseRouter(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.linear = nn.Linear(D, E, bias=False)

    def _assign_tokens_to_experts(
        self,
        flat_expert_ids: torch.Tensor,
        flat_token_ids: torch.Tensor,
        flat_probs: torch.Tensor,
        flat_unnorm_probs: torch.Tensor,
        num_tokens: int,
        expert_capacity: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if expert_capacity == -1:
            expert_capacity = num_tokens
        expert_probs = torch.zeros((self.num_experts, expert_capacity), dtype=flat_probs.dtype)
        expert_indices = torch.full((self.num_experts, expert_capacity), fill_value=-1, dtype=torch.long)
        for e in range(self.num_experts):
            mask = flat_expert_ids == e
            chosen_token_ids = flat_token_ids[mask]
            chosen_unnorm_probs = flat_unnorm_probs[mask]
            chosen_probs = flat_probs[mask]
            if chosen_token_ids.numel() > 0:
                keep = min(expert_capacity, chosen_token_ids.numel())
                _, sorted_idx = torch.topk(chosen_unnorm_probs, keep, sorted=False)
                expert_probs[e, :keep] = chosen_probs[sorted_idx]
                expert_indices[e, :keep] = chosen_token_ids[sorted_idx]
        return expert_probs, expert_indices

    def _record(self, expert_indices: torch.Tensor, num_tokens: int) -> None:
        """``used``: per token, the experts whose kept slots name it (a row of ``-1`` padding where fewer)."""
        per_token: list[list[int]] = [[] for _ in range(num_tokens)]
        for e, row in enumerate(expert_indices.tolist()):
            for t in row:
                if t >= 0:
                    per_token[t].append(e)
        width = max(len(r) for r in per_token)
        self.used = torch.tensor([r + [-1] * (width - len(r)) for r in per_token])


class BalmTopKRouter(BalmBaseRouter):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor, expert_capacity: int) -> tuple[torch.Tensor, ...]:
        num_tokens = x.size(0)
        k = min(self.k, self.num_experts)
        logits = self.linear(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if self.forced is None:
            topk_probs, topk_expert_ids = torch.topk(probs, k, dim=-1, sorted=False)
        else:
            topk_probs, topk_expert_ids = probs.gather(-1, self.forced), self.forced
        topk_probs = topk_probs.to(x.dtype)
        unnorm_topk_probs = topk_probs.clone().detach()
        topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
        flat_token_ids = torch.arange(num_tokens * k) // k
        expert_probs, expert_indices = self._assign_tokens_to_experts(
            topk_expert_ids.flatten(),
            flat_token_ids,
            topk_probs.flatten(),
            unnorm_topk_probs.flatten(),
            num_tokens,
            expert_capacity,
        )
        self._record(expert_indices, num_tokens)
        return logits, probs, expert_probs, expert_indices


class BalmTopPRouter(BalmBaseRouter):
    """``TopPRouter`` (after Dynamic MoE): the experts of each token the fewest whose sorted probabilities reach
    ``threshold`` (the first always kept): as many experts as the scores say, per token."""

    def __init__(self, threshold: float = 0.4) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor, expert_capacity: int) -> tuple[torch.Tensor, ...]:
        num_tokens = x.size(0)
        logits = self.linear(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        sorted_probs, sorted_indices = torch.sort(probs, descending=True)
        cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
        mask = cumulative_probs <= self.threshold
        mask[..., 0] = True
        expert_probs, expert_indices = self._assign_tokens_to_experts(
            sorted_indices[mask],
            torch.nonzero(mask, as_tuple=True)[0],
            sorted_probs[mask],
            sorted_probs[mask],
            num_tokens,
            expert_capacity,
        )
        self._record(expert_indices, num_tokens)
        return logits, probs, expert_probs, expert_indices


class BalmExpertChoiceRouter(BalmBaseRouter):
    """``ExpertChoiceRouter``: the softmax over the tokens and each expert's ``torch.topk`` of ``expert_capacity``
    tokens."""

    def forward(self, x: torch.Tensor, expert_capacity: int) -> tuple[torch.Tensor, ...]:
        logits = self.linear(x)
        probs = F.softmax(logits, dim=0, dtype=torch.float32)
        expert_probs, expert_indices = torch.topk(probs, k=expert_capacity, dim=0)
        self._record(expert_indices.T, x.size(0))
        return logits, probs, expert_probs.T.to(x.dtype), expert_indices.T


class BalmSparseFFN(nn.Module):
    """``SparseFFN``: the router fed the flat tokens and the capacity (``-1``, absolute, or a multiplier of the
    tokens per expert), each expert run on the valid token ids of its slots and weighed by their probabilities, the
    shared expert added on every token."""

    def __init__(self, router: Callable[[], BalmBaseRouter], capacity: float = -1) -> None:
        super().__init__()
        self.router = router()
        self.num_experts = E
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.shared_experts = nn.ModuleList([nn.Linear(D, D)])
        self.capacity_multiplier = capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, d_model = x.shape
        num_tokens = batch_size * seq_len
        x_flat = x.view(-1, d_model)
        capacity = -1 if self.capacity_multiplier < 0 else int(self.capacity_multiplier * num_tokens / self.num_experts)
        _logits, _probs, expert_probs, expert_indices = self.router(x_flat, expert_capacity=capacity)
        output = torch.zeros_like(x_flat)
        for expert_idx, expert in enumerate(self.experts):
            token_indices = expert_indices[expert_idx]
            token_probs = expert_probs[expert_idx]
            valid = token_indices >= 0
            valid_token_indices = token_indices[valid]
            if valid_token_indices.numel() == 0:
                continue
            expert_output = expert(x_flat[valid_token_indices]) * token_probs[valid].unsqueeze(1)
            output = output.index_add(0, valid_token_indices, expert_output)
        for expert in self.shared_experts:
            output = output + expert(x_flat)
        return output.view(batch_size, seq_len, d_model)


# ----------------------------------------------------------------------- DLG-MoE: language groups, then experts
# kaihuhuang/Language-Group src/DLG-MoE/wenet/transformer/moe_block.py (``GroupMoELayer``, ``MoEBlock``) and
# moe_layer.py (``ConformerMoELayer``): a code-switching speech recogniser whose MoE routes twice. The language gate is
# one ``Linear`` (the frame-level language-id CTC head, ``FrameLID.ctc_lid``) handed to *every* layer and fed a
# bottleneck of the encoder, not the layer's input; its softmax loses the blank class (``[:, 1:3]`` where it has more
# than three) and a top-1 of the rest picks each frame's language group; each group's ``MoEBlock`` then takes a
# ``torch.topk`` of its own gate over its experts for the frames sent to it, the softmax of the top values weighing
# them. In training with ``use_dynamic_topk`` the in-group ``k`` is drawn at random for each forward.
class DlgMoEBlock(_Used):
    def __init__(self, n_expert: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(D, n_expert, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)) for _ in range(n_expert)
        )

    def forward(self, xs: torch.Tensor, top_k: int) -> torch.Tensor:
        router = self.gate(xs)
        if self.forced is None:
            logits, selected_experts = torch.topk(router, top_k)
        else:
            logits, selected_experts = router.gather(-1, self.forced), self.forced
        self.used = selected_experts
        weights = F.softmax(logits, dim=1, dtype=torch.float).to(dtype=xs.dtype)
        output = torch.zeros_like(xs)
        for i, expert in enumerate(self.experts):
            token_ids, ith_expert = torch.where(selected_experts == i)
            output = output.index_add(0, token_ids, weights[token_ids, ith_expert, None] * expert(xs[token_ids]))
        return output


class DlgGroupMoELayer(_Used):
    def __init__(self, gate: nn.Linear, dynamic: bool = False) -> None:
        super().__init__()
        self.language_gate = gate
        self.num_groups, self.top_k, self.is_dynamic = 2, 2, dynamic
        self.group_moe = nn.ModuleList(DlgMoEBlock() for _ in range(self.num_groups))

    def forward(self, xs: torch.Tensor, bottle_neck: torch.Tensor) -> torch.Tensor:
        b, s, d = xs.size()
        xs = xs.view(-1, d)
        router = self.language_gate(bottle_neck).softmax(-1).view(b * s, -1)
        if router.shape[-1] > 3:
            router = router[:, 1:3]
        top_k = int(torch.randint(1, self.top_k + 1, (1,)).item()) if self.training and self.is_dynamic else self.top_k
        if self.forced is None:
            _, selected_groups = torch.topk(router, 1)
        else:
            selected_groups = self.forced
        self.used = selected_groups
        output = torch.zeros_like(xs)
        for i, moe_block in enumerate(self.group_moe):
            token_ids, _ = torch.where(selected_groups == i)
            if token_ids.size(0) > 0:
                output = output.index_add(0, token_ids, moe_block(xs[token_ids], top_k))
        return output.view(b, s, d)


class DlgConformerMoELayer(nn.Module):
    """The feed-forward half of ``ConformerMoELayer``: the norm, the group MoE fed the bottleneck too, the residual."""

    def __init__(self, gate: nn.Linear, dynamic: bool) -> None:
        super().__init__()
        self.norm_ff = nn.LayerNorm(D, eps=1e-5)
        self.moe_group = DlgGroupMoELayer(gate, dynamic)

    def forward(self, x: torch.Tensor, bottle_neck: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.moe_group(self.norm_ff(x), bottle_neck)


class DlgEncoder(nn.Module):
    """Two MoE layers sharing the language-id head; the bottleneck is the output of a dense layer before them."""

    def __init__(self, dynamic: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(D, D)
        self.ctc_lid = nn.Linear(D, 4)  # blank, zh, en, other
        self.layers = nn.ModuleList(DlgConformerMoELayer(self.ctc_lid, dynamic) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottle_neck = torch.tanh(self.embed(x))
        for layer in self.layers:
            x = layer(x, bottle_neck)
        return x


# ----------------------------------------------------------------------- UniMoE-Audio: top-p, then SparseMixer
# foggy-frost-forest/UniMoE-Audio utils/GrinMoE.py ``GRINMoESparseMoeBlock`` (the evaluation path, no token drop):
# ``dynamic_expert_selection`` sorts each token's softmax and counts the experts whose cumulative sum stays under
# ``top_p`` (plus one): each token's own ``k``; the tokens of each ``k`` are routed together by GRIN's
# ``sparsemixer``, ``k`` rounds of ``max`` under ``no_grad``, each round's expert masked to ``-inf`` by ``scatter``
# for the next; the combine weights are written into a dense ``[tokens, E]`` tensor, renormalised, and every expert
# runs on the tokens whose mask names it.
def _grin_sparsemixer(scores: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    masked_scores = scores
    multipliers, selected = [], []
    for _ in range(top_k):
        with torch.no_grad():
            threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=threshold.abs())
            mask = ((threshold - scores) / factor) > (2 * jitter_eps)
        masked_gates = torch.softmax(masked_scores.masked_fill(mask, float("-inf")), dim=-1)
        multipliers.append(masked_gates.gather(dim=-1, index=max_ind))
        selected.append(max_ind)
        masked_scores = torch.scatter(masked_scores, -1, max_ind, float("-inf"))
    return torch.cat(multipliers, dim=-1), torch.cat(selected, dim=-1)


class UniMoEGrinBlock(nn.Module):
    def __init__(self, top_p: float = 0.5, jitter: float = 0.01) -> None:
        super().__init__()
        self.num_experts, self.top_p, self.jitter = E, top_p, jitter
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        logits = self.gate(x)
        scores_sorted, _ = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        dynamic_top_k = (~(scores_sorted.cumsum(dim=-1) >= self.top_p)).sum(dim=-1) + 1
        expert_mask = torch.zeros((b * s, self.num_experts), dtype=torch.int)
        routing_weights = torch.zeros((b * s, self.num_experts), dtype=x.dtype)
        for top_k in range(1, self.num_experts + 1):
            group_idx = torch.nonzero(dynamic_top_k == top_k, as_tuple=True)[0]
            if len(group_idx) == 0:
                continue
            weights, selected = _grin_sparsemixer(logits[group_idx], top_k, self.jitter)
            group_weight = torch.zeros((len(group_idx), self.num_experts), dtype=x.dtype).scatter(-1, selected, weights)
            routing_weights = routing_weights.index_add(0, group_idx, group_weight)
            expert_mask = expert_mask.index_add(0, group_idx, F.one_hot(selected, self.num_experts).sum(1).int())
        routing_weights = routing_weights / (routing_weights.sum(dim=-1, keepdim=True) + 1e-6)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = expert_mask[:, e].nonzero().squeeze(-1)
            if tok.numel():
                out = out.index_add(0, tok, routing_weights[tok, e, None] * expert(x[tok]))
        return out.view(b, s, d)


# ----------------------------------------------------------------------- PLE: customised gate control, dense
# Progressive Layered Extraction (Tang et al. 2020) as recommendation libraries port it to PyTorch (e.g.
# rixwew/pytorch-fm-style ``ProgressiveLayeredExtractionModel``; shenweichen/DeepCTR's ``PLE``): per level, each task
# has its own experts and a gate, a ``Linear`` to its experts plus the shared ones, softmaxed, weighing all of them;
# the shared gate weighs every expert. Dense soft gates: no choice to record or force.
class PleCGC(nn.Module):
    def __init__(self, num_tasks: int = 2, specific: int = 2, shared: int = 2) -> None:
        super().__init__()
        self.num_tasks, self.specific, self.shared = num_tasks, specific, shared
        self.task_experts = nn.ModuleList(
            nn.ModuleList(nn.Linear(D, D) for _ in range(specific)) for _ in range(num_tasks)
        )
        self.shared_experts = nn.ModuleList(nn.Linear(D, D) for _ in range(shared))
        self.task_gates = nn.ModuleList(nn.Linear(D, specific + shared) for _ in range(num_tasks))
        self.shared_gate = nn.Linear(D, num_tasks * specific + shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared_out = [torch.relu(e(x)) for e in self.shared_experts]
        task_out = [[torch.relu(e(x)) for e in experts] for experts in self.task_experts]
        outs = []
        for i in range(self.num_tasks):
            stacked = torch.stack(task_out[i] + shared_out, dim=-2)
            gate = torch.softmax(self.task_gates[i](x), dim=-1).unsqueeze(-1)
            outs.append((gate * stacked).sum(-2))
        every = torch.stack([o for t in task_out for o in t] + shared_out, dim=-2)
        shared = (torch.softmax(self.shared_gate(x), dim=-1).unsqueeze(-1) * every).sum(-2)
        return sum(outs) + shared


# ----------------------------------------------------------------------- MoEBERT: top-1 by argmax, split by counts
# SimiaoZuo/MoEBERT src/transformers/moebert/moe_layer.py ``MoELayer._forward_gate``: an fp32 ``gate`` Linear, the
# softmax, ``torch.argmax``; the tokens ordered by expert (``argsort``), split by the per-expert counts made Python
# numbers (``.tolist()``), each chunk run by its expert and weighed by its gathered probability, stacked and put back
# in order by the inverse permutation; the load-balancing loss from the counts returned beside.
class MoEBertMoELayer(_Used):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)) for _ in range(E))
        self.gate = nn.Linear(D, E, bias=False).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq_len, dim = x.size()
        x = x.view(-1, dim)
        prob_gate = F.softmax(self.gate(x), dim=-1)
        gate = torch.argmax(prob_gate, dim=-1) if self.forced is None else self.forced[:, 0]
        self.used = gate.unsqueeze(-1)
        order = gate.argsort(0)
        num_tokens = F.one_hot(gate, self.num_experts).gt(0).sum(0)
        chunks = x[order].split(num_tokens.tolist(), dim=0)
        f = num_tokens.float() / num_tokens.float().sum(0, keepdim=True)
        balance_loss = self.num_experts * torch.sum(prob_gate.mean(0) * f)
        probs = prob_gate.gather(dim=1, index=gate.unsqueeze(1))[order].split(num_tokens.tolist(), dim=0)
        out = torch.vstack([self.experts[i](chunks[i]) * probs[i] for i in range(self.num_experts)])
        return out[order.argsort(0)].view(bsz, seq_len, dim), balance_loss, num_tokens


class MoEBertLayer(nn.Module):
    """The BERT layer's feed-forward half as MoEBERT rewires it: the MoE output (first of its tuple), the residual
    and the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoEBertMoELayer()
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _loss, _load = self.moe(x)
        return self.norm(out)


# ----------------------------------------------------------------------- MoE-Adapters: a gate fed its weights
# JiazuoYu/MoE-Adapters4CL mtil/siglip/moe/dynamic_gate.py ``DynamicGate`` (the router of CLIP/SigLIP adapters for
# continual learning): no weight of its own; ``forward(x, w_gate, w_noise, current_expert_num)`` takes the layer's
# ``[d, E]`` gate and noise matrices as arguments (``x @ w_gate``), adds softplus-scaled Gaussian noise in training,
# takes a ``topk`` of ``k + 1`` (``min`` with the experts in use) for the load estimate and keeps its first ``k``,
# their softmax scattered into dense ``[tokens, E]`` gates. The adapter layer runs each expert on the tokens whose
# gate is non-zero (Shazeer's ``SparseDispatcher``, as the repository's ``moe_layer.py`` does).
class MoEAdaptersDynamicGate(_Used):
    def __init__(self, num_global_experts: int = E, k: int = 2, is_train: bool = True) -> None:
        super().__init__()
        self.softplus, self.softmax = nn.Softplus(), nn.Softmax(1)
        self.noisy_gating, self.noise_epsilon = True, 1e-2
        self.global_expert_num, self.top_k, self.is_train = num_global_experts, k, is_train

    def forward(
        self, x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, current_expert_num: int
    ) -> torch.Tensor:
        clean_logits = x @ w_gate.to(x)
        train = self.is_train and self.training
        if self.noisy_gating and train:
            noise_stddev = self.softplus(x @ w_noise.to(x)) + self.noise_epsilon
            logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        else:
            logits = clean_logits
        expert_num = self.global_expert_num if train else current_expert_num
        if self.forced is None:
            top_logits, top_indices = logits.topk(min(self.top_k + 1, expert_num), dim=1)
            top_k_logits, top_k_indices = top_logits[:, : self.top_k], top_indices[:, : self.top_k]
        else:
            top_k_logits, top_k_indices = logits.gather(1, self.forced), self.forced
        self.used = top_k_indices
        return torch.zeros_like(logits).scatter(1, top_k_indices, self.softmax(top_k_logits))


class MoEAdaptersLayer(nn.Module):
    """The adapter block as the repository's CLIP blocks keep it: one ``[d, E]`` router weight and noise weight per
    task in ``router_list`` / ``w_noise_list`` (``ParameterList``), the adapters in ``adaptmlp_list``, the gate
    called with the current task's pair."""

    def __init__(self, tasks: int = 2) -> None:
        super().__init__()
        self.router_list = nn.ParameterList(nn.Parameter(torch.randn(D, E) / D**0.5) for _ in range(tasks))
        self.w_noise_list = nn.ParameterList(nn.Parameter(torch.randn(D, E) / D**0.5) for _ in range(tasks))
        self.router = MoEAdaptersDynamicGate()
        self.adaptmlp_list = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.experts_num, self.task_id = E, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gates = self.router(flat, self.router_list[self.task_id], self.w_noise_list[self.task_id], self.experts_num)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.adaptmlp_list):
            tok = (gates[:, e] > 0).nonzero().squeeze(-1)
            if tok.numel():
                out = out.index_add(0, tok, gates[tok, e, None] * expert(flat[tok]))
        return out.view(shape)


# ----------------------------------------------------------------------- Octavius: one sample-level gate, LoRA experts
# OpenGVLab/LAMM src/model/Octavius/moe/layer.py ``Top2Gating`` and ``MoeLinear`` (with moe_lora.py's
# ``MoeLoraModel``): one gate for the whole language model, called once per forward on the instruction's token
# embeddings with ``reduce_token=True`` (the mean over the tokens: one choice per sample); its ``w_gating`` is
# ``[dim, E]`` (``einsum('...bnd,...de->...bne')``); the top-2 is two ``topk(k=1)`` calls, the second over the scores
# with the first expert zeroed; the second-expert policy (``"random"`` by default, in evaluation too) draws a coin
# into a mask that the dense gate never reads; the ``[b, E]`` gate is handed to every LoRA layer by ``set_gate``,
# which weighs every expert's output (``einsum('bned,be->bned')``, zeros for the others).
class OctaviusTop2Gating(_Used):
    def __init__(self, num_gates: int = E, second_policy: str = "random", threshold: float = 0.2) -> None:
        super().__init__()
        self.eps, self.num_gates = 1e-9, num_gates
        self.w_gating = nn.Parameter(torch.randn(D, num_gates))
        self.second_policy, self.second_threshold = second_policy, threshold

    @staticmethod
    def top1(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, index = tensor.topk(k=1, dim=-1)
        return values.squeeze(dim=-1), index.squeeze(dim=-1)

    def forward(self, x: torch.Tensor, reduce_token: bool = True) -> torch.Tensor:
        b = x.shape[-3]
        raw_gates = torch.einsum("...bnd,...de->...bne", x, self.w_gating)
        if reduce_token:
            raw_gates = raw_gates.mean(dim=1).unsqueeze(dim=1)
        raw_gates = raw_gates.softmax(dim=-1)
        if self.forced is None:
            gate_1, index_1 = self.top1(raw_gates)
        else:
            index_1 = self.forced[:, None, 0]
            gate_1 = raw_gates.gather(-1, index_1.unsqueeze(-1)).squeeze(-1)
        mask_1 = F.one_hot(index_1, self.num_gates).float()
        gates_without_top_1 = raw_gates * (1.0 - mask_1)
        if self.forced is None:
            gate_2, index_2 = self.top1(gates_without_top_1)
        else:
            index_2 = self.forced[:, None, 1]
            gate_2 = gates_without_top_1.gather(-1, index_2.unsqueeze(-1)).squeeze(-1)
        mask_2 = F.one_hot(index_2, self.num_gates).float()
        denom = gate_1 + gate_2 + self.eps
        gate_1, gate_2 = gate_1 / denom, gate_2 / denom
        if self.second_policy == "random":
            probs = torch.zeros_like(gate_2).uniform_(0.0, 1.0)
            mask_2 = mask_2 * (probs < (gate_2 / max(self.second_threshold, self.eps))).float().unsqueeze(-1)
        self.used = torch.cat([index_1, index_2], dim=-1)
        soft_gate = torch.zeros(b, self.num_gates, dtype=gate_1.dtype)
        soft_gate = soft_gate.scatter(1, index_1, gate_1)
        return soft_gate.scatter(1, index_2, gate_2)


class OctaviusMoeLinear(nn.Linear):
    """``MoeLinear``: the frozen base ``Linear`` plus ``E`` LoRA experts stacked in ``ParameterDict``s keyed by the
    adapter name, every expert computed and weighed by the gate set on it."""

    moe_gate: torch.Tensor | None = None

    def __init__(self, r: int = 4) -> None:
        super().__init__(D, D)
        self.weight.requires_grad = False
        self.lora_moe_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(E, D, r) / D**0.5)})
        self.lora_moe_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(E, r, D) / r**0.5)})
        self.active_adapter, self.scaling = "default", 1.0

    def set_gate(self, gate: torch.Tensor) -> None:
        self.moe_gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, bias=self.bias)
        out = torch.einsum("bnd,edh->bneh", x, self.lora_moe_A[self.active_adapter])
        out = torch.einsum("bneh,ehd->bned", out, self.lora_moe_B[self.active_adapter])
        assert self.moe_gate is not None
        out = torch.einsum("bned,be->bned", out, self.moe_gate)
        return result + out.sum(dim=2)


class OctaviusModel(nn.Module):
    """The language model with ``MoeLinear`` projections: the gate called on the embedded instruction, its output set
    on every LoRA layer, the layers run in turn."""

    def __init__(self, second_policy: str = "random") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(D, D)
        self.gate = OctaviusTop2Gating(second_policy=second_policy)
        self.layers = nn.ModuleList(OctaviusMoeLinear() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        soft_gate = self.gate(h, reduce_token=True)
        for layer in self.layers:
            layer.set_gate(soft_gate)
            h = h + torch.tanh(layer(h))
        return h


# ----------------------------------------------------------------------- the cases
def _balm(router: Callable[[], BalmBaseRouter], capacity: float = -1) -> Callable[[], nn.Module]:
    return lambda: Layers(lambda: BalmSparseFFN(router, capacity))


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "moebert-argmax-split-by-counts": (lambda: Layers(MoEBertLayer), lambda: _x(2, 12), {}),
    "moebert-argmax-split-by-counts-train": (lambda: Layers(MoEBertLayer), lambda: _x(2, 12), {"train": True}),
    "moe-adapters-gate-fed-its-weights": (lambda: Layers(MoEAdaptersLayer), lambda: _x(2, 12), {}),
    "moe-adapters-gate-fed-its-weights-noisy-train": (
        lambda: Layers(MoEAdaptersLayer),
        lambda: _x(2, 12),
        {"train": True, "change": 0.5},  # (a larger change underflows a softmax weight to 0: refused, rightly)
    ),
    # Octavius's gate named (no experts beside it, its expert count ``num_gates``: zero configuration finds no router,
    # see ``REFUSED``); its ``w_gating`` is unscaled ``randn``, as upstream: a larger change saturates its softmax
    "octavius-sample-gate-set-on-lora-layers": (OctaviusModel, lambda: _x(3, 8), {"change": 0.5, "include": "gate"}),
    "octavius-sample-gate-set-on-lora-layers-train": (
        OctaviusModel,
        lambda: _x(3, 8),
        {"train": True, "change": 0.5, "include": "gate"},
    ),
    "octavius-sample-gate-all-policy": (
        lambda: OctaviusModel("all"),
        lambda: _x(3, 8),
        {"change": 0.5, "include": "gate"},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """MoEBERT's top-1 by ``argmax`` with the tokens split by counts made Python numbers, and MoE-Adapters' gate that
    owns no weight (the block's per-task ``[d, E]`` router and noise matrices are passed to it, its expert count an
    ``*_expert_num`` attribute) with its noisy top-(k+1) in training: every router found and nothing else, the
    recorded rows the experts used, and a replay after the routers change those experts forced by hand, in output and
    gradients; Octavius's sample-level top-2 (two ``topk(k=1)`` calls over the mean of the instruction's tokens), made
    once in the model and handed to every LoRA layer as a dense gate tensor, with its second-expert coin drawn (and
    never read) or not, its gate named with ``include=``.

    Once falsely refused: the MoE-Adapters gate was not found (no experts beside it, and its expert counts,
    ``experts_num`` / ``global_expert_num``, were no attributes discovery read)."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


@pytest.mark.xfail(
    strict=True,
    raises=mr.UnsupportedRouterError,
    reason="false refusal: with no capacity each expert keeps every token that chose it, by a top-k over them as "
    "many as they are (a permutation); the order of the token ids in its slots follows the scores, so the router's "
    "output changes with the decision held and is read as a second choice, though the block's output does not depend "
    "on that order (the evidence reads the router's output, not what the block makes of it)",
)
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_balm_top_k_with_no_capacity_replays_exactly(train: bool) -> None:
    """BALM's ``TopKRouter`` with ``expert_capacity=-1``: the top-k decides, then each expert keeps all its tokens in
    an order by score. Nothing is dropped: a replay forcing the recorded experts is exact."""
    assert_exact(_balm(BalmTopKRouter)(), _x(2, 12), train=train)


_GROUPS = r"(?s)outside every attached router.*'layers\.0\.moe_group' \(DlgGroupMoELayer\): topk over 2"
REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "balm-topk-capacity-drops-by-score": (
        _balm(BalmTopKRouter, 1.0),
        lambda: _x(2, 12),
        r"'layers\.0\.router': after its decision .* chooses again from the current scores",
        {},
    ),
    "balm-top-p-by-sort": (_balm(BalmTopPRouter), lambda: _x(2, 12), "its experts are chosen by a sort", {}),
    "balm-expert-choice": (
        _balm(BalmExpertChoiceRouter, 2.0),
        lambda: _x(2, 12),
        "chooses only along another dimension than the last",
        {},
    ),
    "unimoe-audio-top-p-then-sparsemixer": (
        lambda: Layers(UniMoEGrinBlock),
        lambda: _x(2, 12),
        r"'layers\.0\.gate': its decision .* is made for \d+ of the 24 tokens",
        {},
    ),
    "ple-cgc-dense-gates": (lambda: Layers(PleCGC), lambda: _x(2, 12), "no MoE router found", {}),
    "octavius-gate-with-no-experts-beside-it": (OctaviusModel, lambda: _x(3, 8), "no MoE router found", {}),
    "dlg-moe-language-groups-then-experts": (DlgEncoder, lambda: _x(2, 12), _GROUPS, {}),
    "dlg-moe-dynamic-k-train": (lambda: DlgEncoder(True), lambda: _x(2, 12), _GROUPS, {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """BALM's token-choice router with a capacity (each expert keeps its best tokens by a second top-k: the experts
    used are not all the recorded ones), its top-p router (a sort and a cumulative threshold: as many experts per
    token as the scores say) and its expert-choice router (a top-k over the tokens); UniMoE-Audio's GRIN block (a
    per-token ``k`` from a sorted softmax, then SparseMixer's rounds of ``max`` over the tokens of each ``k``); PLE's
    dense customised gates (nothing to record); Octavius's gate with no expert beside it and its expert count in
    ``num_gates`` (not found: naming it replays exactly, above); DLG-MoE's language-group gate, a top-1 among the
    block's MoE groups (each with its own in-group router) made in the block that holds them: refused with a
    ``MoEReplayError`` saying why, the model as it was.

    Once silent: DLG-MoE's in-group routers were found and captured while its group choice, over two MoE blocks and
    no expert width, was watched by nothing; a replay forced the in-group rows in order on whatever tokens the
    current group choice sent each group (refused only where the counts happened to differ)."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)
