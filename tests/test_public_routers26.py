"""MoE code outside language models (graphs, diffusion, reinforcement learning, adapters), with zero configuration
(see ``test_public_routers25``).

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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, MixtralGate, _Used, assert_exact, assert_refused


# ----------------------------------------------------------------------- GMoE: graph experts of one and two hops
# VITA-Group/Graph-Mixture-of-Experts graphproppred/moe.py (``MoE``, adapted from davidmrau's mixture-of-experts): the
# nodes of a batch of graphs are the routed rows; ``w_gate`` / ``w_noise`` are ``[d, E]`` parameters on the MoE
# module, a noisy top-(k+1) in training of which the first k are softmaxed and scattered into dense ``[nodes, E]``
# gates; the experts are graph convolutions handed in from outside (``experts_conv``, ``experts_bn``), the first
# ``num_experts_1hop`` over the graph's edges and the rest over its two-hop edges, each run on every node; the output
# is the gate-weighted outputs averaged over the experts (``y.mean(dim=1)``); the cv-squared importance and load loss
# is returned beside it (the graph network adds it to its training loss).
class GraphConvExpert(nn.Module):
    """A GIN-like convolution: each node adds its neighbours' messages (node features plus an edge embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.edge_encoder = nn.Linear(4, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D))
        self.eps = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        msg = F.relu(x[src] + self.edge_encoder(edge_attr))
        agg = torch.zeros_like(x).index_add(0, dst, msg)
        return self.mlp((1 + self.eps) * x + agg)


class GMoE(_Used):
    def __init__(
        self, experts_conv: nn.ModuleList, experts_bn: nn.ModuleList, k: int = 2, num_experts_1hop: int = E // 2
    ) -> None:
        super().__init__()
        self.noisy_gating, self.num_experts, self.k, self.loss_coef = True, len(experts_conv), k, 1e-2
        self.num_experts_1hop = num_experts_1hop
        self.experts_conv, self.experts_bn = experts_conv, experts_bn
        # upstream initialises both to zeros (every logit tied until trained): a trained gate is what gets replayed
        self.w_gate = nn.Parameter(torch.randn(D, self.num_experts) / D**0.5)
        self.w_noise = nn.Parameter(torch.randn(D, self.num_experts) / D**0.5)
        self.softplus, self.softmax = nn.Softplus(), nn.Softmax(1)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    @staticmethod
    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.tensor([0], device=x.device, dtype=x.dtype)
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def noisy_top_k_gating(
        self, x: torch.Tensor, train: bool, noise_epsilon: float = 1e-2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clean_logits = x @ self.w_gate
        if self.noisy_gating and train:
            noise_stddev = self.softplus(x @ self.w_noise) + noise_epsilon
            logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        else:
            logits = clean_logits
        if self.forced is None:
            top_logits, top_indices = logits.topk(min(self.k + 1, self.num_experts), dim=1)
            top_k_logits, top_k_indices = top_logits[:, : self.k], top_indices[:, : self.k]
        else:
            top_k_indices = self.forced
            top_k_logits = logits.gather(1, top_k_indices)
        self.used = top_k_indices
        top_k_gates = self.softmax(top_k_logits)
        zeros = torch.zeros_like(logits, requires_grad=True)
        gates = zeros.scatter(1, top_k_indices, top_k_gates)
        load = (gates > 0).sum(0)  # (the noisy load estimate reads the (k+1)-th value: left out, as it is a loss)
        return gates, load

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_index_2hop: torch.Tensor,
        edge_attr_2hop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates, load = self.noisy_top_k_gating(x, self.training)
        loss = (self.cv_squared(gates.sum(0)) + self.cv_squared(load)) * self.loss_coef
        expert_outputs = []
        for i in range(self.num_experts):
            if i < self.num_experts_1hop:
                out = self.experts_conv[i](x, edge_index, edge_attr)
            else:
                out = self.experts_conv[i](x, edge_index_2hop, edge_attr_2hop)
            expert_outputs.append(self.experts_bn[i](out))
        stacked = torch.stack(expert_outputs, dim=1)
        y = (gates.unsqueeze(dim=-1) * stacked).mean(dim=1)
        return y, loss


class GMoEGraphNetwork(nn.Module):
    """``GNN_node`` with an MoE convolution per layer (a residual, ReLU between layers); the graphs' edges and
    two-hop edges (``construct_two_hops.py``) held on the model, as a data loader would hand them over."""

    def __init__(self, num_layer: int = 2, nodes: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(
            GMoE(nn.ModuleList(GraphConvExpert() for _ in range(E)), nn.ModuleList(nn.BatchNorm1d(D) for _ in range(E)))
            for _ in range(num_layer)
        )
        g = torch.Generator().manual_seed(5)
        edge_index = torch.randint(0, nodes, (2, 3 * nodes), generator=g)
        adj = torch.zeros(nodes, nodes, dtype=torch.bool)
        adj[edge_index[0], edge_index[1]] = True
        two_hop = ((adj.float() @ adj.float()) > 0).nonzero().t()
        self.register_buffer("edge_index", edge_index)
        self.register_buffer("edge_attr", torch.randn(edge_index.shape[1], 4, generator=g))
        self.register_buffer("edge_index_2hop", two_hop)
        self.register_buffer("edge_attr_2hop", torch.randn(two_hop.shape[1], 4, generator=g))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer, conv in enumerate(self.convs):
            out, _ = conv(h, self.edge_index, self.edge_attr, self.edge_index_2hop, self.edge_attr_2hop)
            h = h + (F.relu(out) if layer < len(self.convs) - 1 else out)
        return h


# ----------------------------------------------------------------------- Switch-DiT: one choice per timestep task
# byeongjun-park/Switch-DiT models/MoE.py (``TaskMoE``), util/model_util.py (``compute_gating``, TorchScript) and
# models/DiT/models.py (``DiT`` with ``routing_method == "DMoE"``): the gate (``SiLU``, ``Linear``) scores the
# embeddings of every timestep task (``full_time``, ``[taskcount, d]``), ``probs.topk`` picks k experts per task, and
# the rows of the active tasks (one per sample, the sample's timestep, set on each router by ``set_active_task``
# through ``model.apply``) are kept; each sample's whole sequence goes through its experts (a ``ParallelExperts``
# weight ``[E, d, d]``), weighted, and ``1 + out`` is the channel mask that the DiT block routes by (``x * mask``
# through attention and MLP, ``(1 - mask) * x`` passed by). The decision is made over the task rows, not the tokens.
@torch.jit.script
def compute_gating(
    k: int, zeros: torch.Tensor, top_k_gates: torch.Tensor, top_k_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gates = zeros.scatter(1, top_k_indices, top_k_gates)
    top_k_gates = top_k_gates.flatten()
    top_k_experts = top_k_indices.flatten()
    nonzeros = top_k_gates.nonzero().squeeze(-1)
    top_k_experts_nonzero = top_k_experts[nonzeros]
    _, _index_sorted_experts = top_k_experts_nonzero.sort(0)
    expert_size = (gates > 0).long().sum(0)
    index_sorted_experts = nonzeros[_index_sorted_experts]
    batch_index = index_sorted_experts.div(k, rounding_mode="trunc")
    batch_gates = top_k_gates[index_sorted_experts]
    return batch_gates, batch_index, expert_size


class ParallelExperts(nn.Module):
    def __init__(self, num_experts: int, input_size: int, output_size: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_experts, input_size, output_size) / input_size**0.5)
        self.b = nn.Parameter(torch.randn(num_experts, output_size) * 0.1)

    def forward(self, inputs: torch.Tensor, expert_size: torch.Tensor) -> torch.Tensor:
        outs = [chunk @ self.w[i] + self.b[i] for i, chunk in enumerate(inputs.split(expert_size.tolist(), dim=0))]
        return torch.cat(outs, dim=0)


class SwitchDiTTaskMoE(_Used):
    def __init__(self, hidden_size: int = D, num_experts: int = E, k: int = 2) -> None:
        super().__init__()
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.f_gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_experts, bias=True))
        self.experts = ParallelExperts(num_experts, hidden_size, hidden_size)
        self.active_task: torch.Tensor | int = 0

    def set_active_task(self, active_task: torch.Tensor) -> None:
        self.active_task = active_task

    def top_k_gating(self, task_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.f_gate(task_full)
        probs = torch.softmax(logits, dim=1)
        if self.forced is None:
            top_k_gates, top_k_indices = probs.topk(self.k, dim=1)
        else:
            top_k_indices = self.forced
            top_k_gates = probs.gather(1, top_k_indices)
        self.used = top_k_indices
        zeros_quantized = torch.zeros((task_full.size(0), self.num_experts), dtype=torch.float32, device=logits.device)
        probs_full_quantized = zeros_quantized.scatter(1, top_k_indices, 1)
        active_probs = probs[self.active_task]
        active_top_k_gates = top_k_gates[self.active_task]
        active_top_k_indices = top_k_indices[self.active_task]
        batch_gates, batch_index, expert_size = compute_gating(
            self.k, torch.zeros_like(active_probs), active_top_k_gates, active_top_k_indices
        )
        self.expert_size, self.batch_index, self.batch_gates = expert_size, batch_index, batch_gates
        return active_probs, probs_full_quantized

    def forward(self, x: torch.Tensor, task_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, length, emb_size = x.size()
        probs, probs_full_quantized = self.top_k_gating(task_full)
        expert_inputs = x[self.batch_index].reshape(-1, emb_size)
        expert_outputs = self.experts(expert_inputs, self.expert_size * length)
        expert_outputs = expert_outputs.view(-1, length, emb_size) * self.batch_gates[:, None, None]
        zeros = torch.zeros((batch_size, length, emb_size), dtype=expert_outputs.dtype, device=expert_outputs.device)
        out = zeros.index_add(0, self.batch_index, expert_outputs)
        return 1 + out, probs, probs_full_quantized


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero (attention stood in by a token mixer), routed by a channel mask when given one."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Linear(seq, seq)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(approximate="tanh"), nn.Linear(2 * D, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)

        def attn(h: torch.Tensor) -> torch.Tensor:
            return self.attn(h.transpose(1, 2)).transpose(1, 2)

        routed_x = x * mask if mask is not None else x
        routed_x = routed_x + gate_msa.unsqueeze(1) * attn(_modulate(self.norm1(routed_x), shift_msa, scale_msa))
        routed_x = routed_x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(routed_x), shift_mlp, scale_mlp))
        return routed_x + (1 - mask) * x if mask is not None else routed_x


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, frequency_embedding_size: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, D), nn.SiLU(), nn.Linear(D, D))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(_timestep_embedding(t, self.frequency_embedding_size))


def _change_task(active_task: torch.Tensor) -> Callable[[nn.Module], None]:
    def change(m: nn.Module) -> None:
        if hasattr(m, "active_task"):
            m.set_active_task(active_task)  # type: ignore[operator]

    return change


class SwitchDiT(nn.Module):
    """``DiT`` in its DMoE routing: ``full_time = t_embedder(arange(taskcount))``, ``c = full_time[t]``, a router per
    block called with the tokens and every task's embedding (the timesteps of the batch held on the model, as the
    diffusion loop would pass them; the class label and the JSD prior left out)."""

    def __init__(self, depth: int = 2, taskcount: int = 10, seq: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t_embedder = _TimestepEmbedder()
        self.register_buffer("full_time", torch.arange(0, taskcount))
        self.routers = nn.ModuleList(SwitchDiTTaskMoE() for _ in range(depth))
        self.blocks = nn.ModuleList(_DiTBlock(seq) for _ in range(depth))
        for block in self.blocks:  # (trained weights: adaLN is zero-initialised upstream)
            nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
        self.register_buffer("t", torch.tensor([3, 7]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.apply(_change_task(self.t))
        full_time = self.t_embedder(self.full_time)
        c = full_time[self.t]
        for router, block in zip(self.routers, self.blocks, strict=True):
            mask, _, _ = router(x, full_time)
            x = block(x, c, mask)
        return x


# ----------------------------------------------------------------------- DiT-MoE: DeepSeek-MoE in a diffusion model
# feizc/DiT-MoE models.py (``MoEGate``, ``SparseMoeBlock``, ``MoeMLP``, ``DiTBlock``): a ``weight`` parameter
# ``[E, d]`` on the gate, softmax, ``torch.topk(sorted=False)``, no renormalisation; the sequence-free aux loss added
# to the output's gradient by ``AddAuxiliaryLoss`` (an autograd function) in training; in training each token
# repeated k times and ``y[flat_topk_idx == i] = expert(...)`` written in place into ``empty_like``; in eval
# ``moe_infer`` under ``no_grad`` (``argsort`` of the flat ids, ``bincount().cpu().numpy().cumsum``,
# ``scatter_reduce_``); two shared experts' width always added; the experts' ``pretraining_tp = 2`` slices.
class DiTMoEGate(_Used):
    def __init__(self, embed_dim: int = D, num_experts: int = E, num_experts_per_tok: int = 2) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts = num_experts_per_tok, num_experts
        self.scoring_func, self.alpha, self.seq_aux, self.norm_topk_prob = "softmax", 0.01, False, False
        self.gating_dim = embed_dim
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, self.gating_dim)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        scores = F.linear(hidden_states, self.weight, None).softmax(dim=-1)
        if self.forced is None:
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_idx = self.forced
            topk_weight = scores.gather(-1, topk_idx)
        self.used = topk_idx
        if self.training and self.alpha > 0.0:
            mask_ce = F.one_hot(topk_idx.view(bsz, -1).view(-1), num_classes=self.n_routed_experts)
            ce = mask_ce.float().mean(0)
            aux_loss = (scores.mean(0) * ce * self.n_routed_experts).sum() * self.alpha
        else:
            aux_loss = None
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype = loss.dtype  # type: ignore[attr-defined]
        ctx.required_aux_loss = loss.requires_grad  # type: ignore[attr-defined]
        return x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grad_loss = None
        if ctx.required_aux_loss:  # type: ignore[attr-defined]
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)  # type: ignore[attr-defined]
        return grad_output, grad_loss  # type: ignore[return-value]


class DiTMoeMLP(nn.Module):
    def __init__(self, hidden_size: int = D, intermediate_size: int = 2 * D) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.pretraining_tp = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        piece = self.intermediate_size // self.pretraining_tp
        gate_slices = self.gate_proj.weight.split(piece, dim=0)
        up_slices = self.up_proj.weight.split(piece, dim=0)
        down_slices = self.down_proj.weight.split(piece, dim=1)
        gate = torch.cat([F.linear(x, gate_slices[i]) for i in range(self.pretraining_tp)], dim=-1)
        up = torch.cat([F.linear(x, up_slices[i]) for i in range(self.pretraining_tp)], dim=-1)
        inter = (F.silu(gate) * up).split(piece, dim=-1)
        return sum(F.linear(inter[i], down_slices[i]) for i in range(self.pretraining_tp))  # type: ignore[return-value]


class DiTSparseMoeBlock(nn.Module):
    def __init__(self, num_experts_per_tok: int = 2) -> None:
        super().__init__()
        self.num_experts_per_tok = num_experts_per_tok
        self.experts = nn.ModuleList(DiTMoeMLP() for _ in range(E))
        self.gate = DiTMoEGate(num_experts_per_tok=num_experts_per_tok)
        self.n_shared_experts = 2
        self.shared_experts = DiTMoeMLP(intermediate_size=D * self.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, orig_shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).view(*orig_shape)
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, flat_topk_idx, topk_weight.view(-1, 1)).view(*orig_shape)
        return y + self.shared_experts(identity)

    @torch.no_grad()
    def moe_infer(
        self, x: torch.Tensor, flat_expert_indices: torch.Tensor, flat_expert_weights: torch.Tensor
    ) -> torch.Tensor:
        expert_cache = torch.zeros_like(x)
        idxs = flat_expert_indices.argsort()
        tokens_per_expert = flat_expert_indices.bincount().cpu().numpy().cumsum(0)
        token_idxs = idxs // self.num_experts_per_tok
        for i, end_idx in enumerate(tokens_per_expert):
            start_idx = 0 if i == 0 else tokens_per_expert[i - 1]
            if start_idx == end_idx:
                continue
            exp_token_idx = token_idxs[start_idx:end_idx]
            expert_out = self.experts[i](x[exp_token_idx])
            expert_out.mul_(flat_expert_weights[idxs[start_idx:end_idx]])
            expert_cache.scatter_reduce_(0, exp_token_idx.view(-1, 1).repeat(1, x.shape[-1]), expert_out, reduce="sum")
        return expert_cache


class DiTMoEBlock(nn.Module):
    def __init__(self, seq: int = 6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Linear(seq, seq)
        self.moe = DiTSparseMoeBlock()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))
        nn.init.normal_(self.adaLN_modulation[-1].weight, std=0.1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h.transpose(1, 2)).transpose(1, 2)
        return x + gate_mlp.unsqueeze(1) * self.moe(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTMoE(nn.Module):
    """Two ``DiTBlock``s conditioned on ``c = t_embedder(t)`` (the batch's timesteps held on the model)."""

    def __init__(self, seq: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t_embedder = _TimestepEmbedder()
        self.blocks = nn.ModuleList(DiTMoEBlock(seq) for _ in range(2))
        self.register_buffer("t", torch.tensor([120, 870]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(self.t)
        for block in self.blocks:
            x = block(x, c)
        return x


# ----------------------------------------------------------------------- a sticky top-k router of an RL policy
# TSUITUENYUE/Praxis_Cognito Model/MoE.py (``MoEActorCritic``, on rsl_rl's ``ActorCritic``): a PPO policy whose action
# mean mixes frozen expert policies (a plain Python list, not registered as submodules); the ``gate`` MLP scores the
# experts and ``_sticky_topk_route`` keeps experts chosen at earlier steps: an expert active for fewer than
# ``dwell_min`` steps is locked, an active one within ``hysteresis`` of the best logit (``logits.max``) is kept, and the
# slots left are filled in the order of a full ``torch.topk(logits, k=K)`` by a Python loop over the ranks; the
# weights are a masked softmax mixed with the previous step's (``stickiness``); the selection, the dwell counts and the
# weights are buffers assigned anew at every forward (the state of the rollout). The decision depends on the earlier
# steps' choices, not only on the scores.
class _ExpertPolicy(nn.Module):
    """A frozen rsl_rl ``ActorCritic``'s actor (``act_inference``)."""

    def __init__(self, obs: int, actions: int) -> None:
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(obs, 32), nn.ELU(), nn.Linear(32, actions))

    def act_inference(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actor(observations)


class StickyMoEActorCritic(_Used):
    def __init__(
        self,
        num_obs: int = D,
        num_actions: int = 6,
        num_experts: int = 4,
        num_cmd: int = 3,
        topk: int = 2,
        stickiness: float = 0.85,
        hysteresis: float = 0.5,
        dwell_min: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = [_ExpertPolicy(num_obs, num_actions) for _ in range(num_experts)]
        for ex in self.experts:
            ex.eval()
            for p in ex.parameters():
                p.requires_grad_(False)
        self.K, self.num_cmd = num_experts, num_cmd
        self.register_buffer("cmd_lows", -torch.ones(num_cmd))
        self.register_buffer("cmd_highs", torch.ones(num_cmd))
        self.register_buffer("cmd_masks", (torch.rand(num_experts, num_cmd) > 0.3).float())
        self.cmd_head = nn.Sequential(nn.Linear(num_obs, 32), nn.ELU(), nn.Linear(32, num_cmd))
        self.gate = nn.Sequential(nn.Linear(num_obs, 32), nn.ELU(), nn.Linear(32, num_experts))
        self.critic = nn.Sequential(nn.Linear(num_obs, 32), nn.ELU(), nn.Linear(32, 1))
        self.topk, self.stickiness, self.hysteresis = topk, stickiness, hysteresis
        self.register_buffer("prev_w", None, persistent=False)
        self.register_buffer("active_mask", None, persistent=False)
        self.register_buffer("dwell", None, persistent=False)
        self.register_buffer("dwell_min", torch.full((num_experts,), dwell_min, dtype=torch.long))

    @property  # type: ignore[override]
    def used(self) -> torch.Tensor | None:
        """The experts of the last step's selection (read after the forward, outside it)."""
        selected = getattr(self, "_selected", None)
        if selected is None:
            return None
        width = max(self.topk, int(selected.sum(-1).max()))
        ids = torch.arange(self.K).expand_as(selected).masked_fill(~selected, self.K)
        rows = ids.sort(-1).values[:, :width]
        return rows.masked_fill(rows == self.K, -1)  # (-1: a slot the step left empty)

    def _ensure_router_state(self, b: int, device: torch.device) -> None:
        if self.prev_w is None or self.prev_w.shape[0] != b:
            self.prev_w = torch.full((b, self.K), 1.0 / self.K, device=device)
            self.active_mask = torch.zeros((b, self.K), device=device, dtype=torch.bool)
            self.dwell = torch.zeros((b, self.K), device=device, dtype=torch.long)

    def _sticky_topk_route(self, logits: torch.Tensor) -> torch.Tensor:
        b, k = logits.shape
        active, dwell = self.active_mask, self.dwell
        assert active is not None and dwell is not None
        if self.forced is None:
            locked = active & (dwell < self.dwell_min.view(1, k))
            maxz, _ = logits.max(dim=-1, keepdim=True)
            keep = active & (~locked) & (logits >= (maxz - self.hysteresis))
            base = locked | keep
            slots_left = torch.clamp(self.topk - base.sum(dim=-1, keepdim=True), min=0)
            _, idx = torch.topk(logits, k=k, dim=-1)
            selected = base.clone()
            for r in range(k):
                cand = idx[:, r]
                not_sel = ~selected.gather(1, cand.view(b, 1)).squeeze(1)
                can_take = not_sel & (slots_left.squeeze(1) > 0)
                if can_take.any():
                    selected.scatter_(1, cand.view(b, 1), can_take.view(b, 1))
                    slots_left = slots_left - can_take.view(b, 1).to(slots_left.dtype)
        else:
            selected = torch.zeros_like(active).scatter(1, self.forced, True)
        self._selected = selected
        mask = selected.float()
        w_step = torch.softmax(logits.masked_fill(~selected, -1e9), dim=-1) * mask
        w_step = w_step / w_step.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        w = self.stickiness * self.prev_w + (1.0 - self.stickiness) * w_step
        w = (w * mask) / (w * mask).sum(dim=-1, keepdim=True).clamp_min(1e-8)
        self.active_mask = selected
        self.dwell = torch.where(selected, dwell + 1, torch.zeros_like(dwell))
        self.prev_w = w.detach()
        return w

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        self._ensure_router_state(obs.shape[0], obs.device)
        cmd01 = torch.sigmoid(self.cmd_head(obs))
        gate_in = obs.clone()
        gate_in[:, : self.num_cmd] = self.cmd_lows + (self.cmd_highs - self.cmd_lows) * cmd01
        w = self._sticky_topk_route(self.gate(gate_in))
        mus = []
        for k, ex in enumerate(self.experts):
            obs_k = obs.clone()
            obs_k[:, : self.num_cmd] = cmd01 * self.cmd_masks[k]
            mus.append(ex.act_inference(obs_k))
        mu_mix = (w.unsqueeze(-1) * torch.stack(mus, dim=1)).sum(dim=1)
        return torch.cat([mu_mix, self.critic(obs)], dim=-1)


# ----------------------------------------------------------------------- AdaMix beside a routed MoE
# microsoft/AdaMix (``MixtureSoup`` in its adapter code): a mixture of adapter copies with no router; in training one
# copy is drawn at random per forward (``torch.randint(...).item()``), in eval the copies' parameters are averaged by
# the softmax of a frozen ``expert_score_weight`` (the "soup") and applied with ``F.linear``. It sits here in the
# adapter of a layer whose feed-forward is a Mixtral-style routed MoE: the random draw is no routing decision (a
# replay leaves it to the seed, as dropout), and the soup chooses nothing; only the gate is a router.
class MixtureSoup(nn.Module):
    def __init__(self, expert: nn.Linear, num_local_experts: int = 4) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_local_experts))
        for e in self.deepspeed_experts:
            nn.init.normal_(e.weight, std=0.2)
        self.num_local_experts = num_local_experts
        self.expert_score_weight = nn.Parameter(torch.zeros(num_local_experts), requires_grad=False)
        self.parameter_dict: dict[str, torch.Tensor] = {}

    def expert_soup(self) -> None:
        weight = F.softmax(self.expert_score_weight, dim=-1)
        self.parameter_dict = {"weight": 0, "bias": 0}  # type: ignore[dict-item]
        for idx in range(self.num_local_experts):
            for s_name, s_param in self.deepspeed_experts[idx].named_parameters():
                p_name = "weight" if "weight" in s_name else "bias"
                self.parameter_dict[p_name] = self.parameter_dict[p_name] + weight[idx] * s_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deepspeed_experts[0].training:
            expert_idx = torch.randint(low=0, high=self.num_local_experts, size=(1,)).item()
            return self.deepspeed_experts[int(expert_idx)](x)
        self.expert_soup()
        return F.linear(x, self.parameter_dict["weight"], self.parameter_dict["bias"])


class AdaMixAdapter(nn.Module):
    def __init__(self, num_experts: int = 4, bottleneck: int = 4) -> None:
        super().__init__()
        self.adapter_down = MixtureSoup(nn.Linear(D, bottleneck), num_experts)
        self.adapter_up = MixtureSoup(nn.Linear(bottleneck, D), num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.adapter_up(F.gelu(self.adapter_down(x)))


class AdaMixMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adapter = AdaMixAdapter()
        self.gate = MixtralGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.adapter(x)
        w, idx = self.gate(h)
        return dispatch(self.experts, h, idx, w)


class AdaMixOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(AdaMixAdapter() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change``, ``same_forwards`` and attach options)
    "gmoe-graph-experts-one-and-two-hops": (lambda: GMoEGraphNetwork(num_layer=1), lambda: _x(12), {}),
    "gmoe-graph-experts-one-and-two-hops-noisy-train": (
        lambda: GMoEGraphNetwork(num_layer=1),
        lambda: _x(12),
        {"train": True},
    ),
    "switch-dit-one-choice-per-timestep-task": (SwitchDiT, lambda: _x(2, 6), {}),
    "switch-dit-one-choice-per-timestep-task-train": (SwitchDiT, lambda: _x(2, 6), {"train": True}),
    "dit-moe-adaln-shared-experts-moe-infer": (DiTMoE, lambda: _x(2, 6), {}),
    "dit-moe-adaln-shared-experts-aux-train": (DiTMoE, lambda: _x(2, 6), {"train": True}),
    "adamix-soup-beside-a-router": (lambda: Layers(AdaMixMoELayer), _x, {}),
    "adamix-random-adapter-excluded-beside-a-router-train": (
        lambda: Layers(AdaMixMoELayer),
        _x,
        {"train": True, "exclude": "*adapter*"},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """GMoE's noisy top-(k+1) over graph nodes with one- and two-hop convolution experts run on every node; Switch-DiT's
    top-k over every timestep task's embedding, the rows of the batch's timesteps kept (a TorchScript dispatch, a
    channel mask as the expert output); DiT-MoE's DeepSeek-style gate in an adaLN DiT (``moe_infer`` in eval, in-place
    writes and ``AddAuxiliaryLoss`` in training); AdaMix's adapter soup (eval) beside a routed MoE, and its random
    adapter (training) once excluded on purpose: every router found and nothing else, the recorded rows the experts
    used, and a replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    same = bool(opts.pop("same_forwards", False))
    assert_exact(make(), x(), train=train, change=change, same_forwards=same, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the error says, options: ``train`` and attach options)
    "adamix-soup-alone": (AdaMixOnly, _x, "no MoE router found", {}),
    "adamix-random-adapter-alone-train": (AdaMixOnly, _x, "no MoE router found", {"train": True}),
    "adamix-random-adapter-beside-a-router-train": (
        lambda: Layers(AdaMixMoELayer),
        _x,
        r"'layers\.0\.adapter\.adapter_down' \(MixtureSoup\): randint draw, from no scores, among 4 values",
        {"train": True},
    ),
    "rl-sticky-top-k-policy": (StickyMoEActorCritic, lambda: _x(6), "no MoE router found", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """AdaMix alone (a random adapter in training, a parameter soup in eval: no router); AdaMix's random adapter in
    training beside a routed MoE (a draw among the adapter copies that no router records: named, with ``exclude=`` to
    leave it native); the RL policy's sticky top-k (a ``gate`` MLP, ``topk`` and ``K`` attributes that no pattern
    reads): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a sticky top-k's selection keeps the experts of earlier steps: the evidence, made from a fresh state, "
    "finds the first k slots of its full ranking decisive, and a replay forces those while the kept experts "
    "(active, within the hysteresis of the best logit) still enter the selection; no error is raised",
)
def test_rl_sticky_top_k_named_is_forced_or_refused() -> None:
    """The RL policy's router named with ``include=``: its selection depends on the experts it chose at the previous
    step (kept while near the best logit) as well as on its ranking, so forcing the ranking's first k slots does not
    force the experts used. It must be replayed exactly (the recorded experts used) or refused; today the replay
    runs with other experts than the recorded ones, silently."""
    assert_exact(StickyMoEActorCritic(), _x(6), same_forwards=True, include=StickyMoEActorCritic)
