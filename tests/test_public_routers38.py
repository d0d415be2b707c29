"""MoE code of FairScale (GShard's top-2 gate with a Gumbel-sampled second expert and a capacity of ``2S / E``, the
``MOELayer`` dispatching by ``einsum``) and of mergoo (every chosen ``nn.Linear`` of a model made a mixture of Linear
experts, or of LoRA adapters over the frozen Linear), with zero configuration where they are found so (see
``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_public_routers6 import _Used, assert_exact


# ----------------------------------------------------------------------- FairScale: GShard top-2, Gumbel, capacity
# facebookresearch/fairscale fairscale/nn/moe/top2gate.py (``Top2Gate``, ``top2gating``, ``gumbel_rsample``,
# ``one_hot``) and fairscale/nn/moe/moe_layer.py (``MOELayer``): the gate's bias-free ``wg`` Linear, a float32
# softmax, the first expert by ``argmax`` of the probabilities, the second by ``argmax`` of the logits plus Gumbel
# noise (drawn at EVERY forward, in evaluation too) with the first ``masked_fill``-ed to -inf; each expert keeps
# ``2 * S // E`` tokens by the ``cumsum`` of the one-hot masks (the second choices placed after all the first ones),
# the two probabilities renormalised in place (``/=``, clamped at eps), and the ``[S, E, C]`` combine weights and
# their ``.bool()`` dispatch mask. The layer reshapes ``[B, S, M]`` to tokens, dispatches by
# ``einsum("sec,sm->ecm")``, runs each expert on its chunk of ``[world, 1, C, M]`` and combines by
# ``einsum("sec,ecm->sm")``. (The all-to-all is left out: a world of one, where it is the identity.)
def _fairscale_one_hot(tensor: torch.Tensor, num_classes: int) -> torch.Tensor:
    ret = torch.zeros((*tensor.shape, num_classes), device=tensor.device, dtype=tensor.dtype)
    ret.scatter_(-1, tensor.unsqueeze(-1), 1)
    return ret


def _gumbel_rsample(shape: torch.Size) -> torch.Tensor:
    return torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(shape)


class FairScaleTop2Gate(_Used):
    def __init__(self, model_dim: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def top2gating(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gates = F.softmax(logits, dim=1, dtype=torch.float)
        num_tokens = gates.shape[0]
        num_experts = gates.shape[1]
        capacity = 2 * num_tokens // num_experts
        assert num_tokens % num_experts == 0
        indices1_s = torch.argmax(gates, dim=1)
        if self.forced is not None:
            indices1_s = self.forced[:, 0]
        mask1 = _fairscale_one_hot(indices1_s, num_classes=num_experts)
        logits_w_noise = logits + _gumbel_rsample(logits.shape)
        logits_except1 = logits_w_noise.masked_fill(mask1.bool(), float("-inf"))
        indices2_s = torch.argmax(logits_except1, dim=1)
        if self.forced is not None:
            indices2_s = self.forced[:, 1]
        self.used = torch.stack([indices1_s, indices2_s], 1)
        mask2 = _fairscale_one_hot(indices2_s, num_classes=num_experts)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1
        locations2 += torch.sum(mask1, dim=0, keepdim=True)
        me = torch.mean(gates, dim=0)
        ce = torch.mean(mask1.float(), dim=0)
        l_aux = torch.mean(me * ce)
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        locations2_s = torch.sum(locations2 * mask2, dim=1)
        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom_s = gates1_s + gates2_s
        denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
        gates1_s /= denom_s
        gates2_s /= denom_s
        gates1 = gates1_s.unsqueeze(-1) * mask1
        gates2 = gates2_s.unsqueeze(-1) * mask2
        locations1_sc = _fairscale_one_hot(locations1_s, num_classes=capacity)
        locations2_sc = _fairscale_one_hot(locations2_s, num_classes=capacity)
        combine1_sec = gates1.unsqueeze(2) * locations1_sc.unsqueeze(1)
        combine2_sec = gates2.unsqueeze(2) * locations2_sc.unsqueeze(1)
        combine_weights = combine1_sec + combine2_sec
        dispatch_mask = combine_weights.bool()
        return l_aux.to(logits.dtype), combine_weights.to(logits.dtype), dispatch_mask

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.wg(input)
        return self.top2gating(logits)


class FairScaleExpert(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class FairScaleMOELayer(nn.Module):
    def __init__(self, gate: nn.Module, experts: nn.ModuleList) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.world_size = 1
        self.num_local_experts = len(self.experts)

    def forward(self, *input: torch.Tensor) -> torch.Tensor:
        assert len(input) == 1, "only single input Tensor supported"
        assert len(input[0].shape) == 3, "input Tensor must have dimensions: (s)equence, (t)oken, (m)odel"
        assert input[0].shape[0] % len(self.experts) == 0, "num tokens must be order of number of local experts"
        d_model = input[0].shape[2]
        reshaped_input = input[0].reshape(-1, d_model)
        self.l_aux, combine_weights, dispatch_mask = self.gate(reshaped_input)
        dispatched_input = torch.einsum("sec,sm->ecm", dispatch_mask.float(), reshaped_input)
        dispatched_input = dispatched_input.reshape(self.world_size, self.num_local_experts, -1, d_model)
        chunks = dispatched_input.chunk(self.num_local_experts, dim=1)
        expert_outputs = []
        for chunk, expert in zip(chunks, self.experts, strict=True):
            expert_outputs += [expert(chunk)]
        expert_output = torch.cat(expert_outputs, dim=1)
        expert_output = expert_output.reshape(self.world_size * self.num_local_experts, -1, d_model)
        combined_output = torch.einsum("sec,ecm->sm", combine_weights, expert_output)
        return combined_output.reshape(input[0].shape)


class FairScaleBlock(nn.Module):
    def __init__(self, d: int = 16, num_experts: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(d)
            experts = nn.ModuleList([FairScaleExpert(d, 2 * d) for _ in range(num_experts)])
            self.moe = FairScaleMOELayer(FairScaleTop2Gate(d, num_experts), experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


def _fairscale_tokens() -> torch.Tensor:
    return torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("silent replays")
def test_fairscale_top2_gate_with_gumbel_second_and_capacity_replays_as_by_hand() -> None:
    """FairScale's ``Top2Gate`` under its ``MOELayer``: the first expert by argmax of the float32 softmax, the second
    by argmax of Gumbel-noised logits (noise drawn in evaluation too), an expert capacity of ``2S / E`` by cumsum
    positions (tokens past it dropped), weights renormalised in place, and ``einsum`` dispatch and combine by
    ``[S, E, C]`` tensors whose ``.bool()`` is the dispatch mask. Found with zero configuration; the recorded rows are
    the experts each token chose, and a replay after the gate changes (moderately; more: see the test below) forces
    them, in output and gradients as by hand. (The gate's forward is the same in training: the noise is drawn
    either way.)"""
    session = assert_exact(FairScaleBlock(), _fairscale_tokens(), change=0.3)
    assert session.names == ("moe.gate",), session.names


@pytest.mark.reliability("false refusals")
def test_fairscale_top2_gate_replays_after_a_free_no_grad_forward_under_a_changed_gate() -> None:
    """The same block, the gate changed more (its logits up to ~34 apart), with a free forward under ``no_grad``
    between the capture and the replay (what ``assert_exact`` runs to check that the changed gate chooses otherwise).
    That forward establishes the decision afresh, on the changed gate, whose held decision on other inputs leaves
    some tokens' kept weights at zero: the ``clamp(denom, min=eps)`` guards them and chooses no expert, so the
    ``combine_weights.bool()`` dispatch mask stays the decision's own, and the replay is exact by hand (every slot
    its capacity position keeps has a weight over zero, the smallest ~1e-15)."""
    session = assert_exact(FairScaleBlock(), _fairscale_tokens(), change=1.0)
    assert session.names == ("moe.gate",), session.names


# ----------------------------------------------------------------------- mergoo: Linear layers made MoE
# Leeroo-AI/mergoo mergoo/compose_layers.py (``convert_linear_to_moe``, ``MoeLayer``, ``LoRAMoeLayer``) and
# mergoo/models/modeling_llama.py (the model's Linears built by ``convert_linear_to_moe``): each Linear named in the
# composer config's ``router_layers`` (e.g. ``gate_proj``, ``up_proj``, ``down_proj``) of the listed blocks becomes a
# ``MoeLayer``: a bias-free ``gate`` Linear, ``torch.topk`` of the LOGITS, a float softmax over the k (``dim=2``, the
# input being ``[b, s, d]``), and for each Linear expert the ``torch.where(selected_experts == ix)`` triples, its
# output times its weight ``+=`` into the results at ``[batch_idx, tok_idx]``. Three routers in one MLP, the last on
# the intermediate width.
class MergooMoeLayer(_Used):
    def __init__(self, in_features: int, out_features: int, bias: bool, num_experts: int, num_experts_per_tok: int = 2):
        super().__init__()
        self.gate = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList([nn.Linear(in_features, out_features, bias) for _ in range(num_experts)])
        self.num_experts_per_tok = num_experts_per_tok
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        if self.forced is not None:
            selected_experts = self.forced.view(*gate_logits.shape[:-1], self.num_experts_per_tok)
            weights = gate_logits.gather(-1, selected_experts)
        self.used = selected_experts.reshape(-1, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=2, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros(
            (inputs.shape[0], inputs.shape[1], self.out_features), device=inputs.device, dtype=inputs.dtype
        )
        for ix, expert in enumerate(self.experts):
            batch_idx, tok_idx, expert_idx = torch.where(selected_experts == ix)
            results[batch_idx, tok_idx] += expert(inputs[batch_idx, tok_idx]) * weights[
                batch_idx, tok_idx, expert_idx
            ].unsqueeze(-1)
        return results


class MergooLlamaMLP(nn.Module):
    """transformers' ``LlamaMLP`` as mergoo's modeling_llama.py builds it: its three Linears by
    ``convert_linear_to_moe`` (all three named in ``router_layers`` here)."""

    def __init__(self, hidden_size: int = 16, intermediate_size: int = 24, num_experts: int = 4) -> None:
        super().__init__()
        self.gate_proj = MergooMoeLayer(hidden_size, intermediate_size, False, num_experts)
        self.up_proj = MergooMoeLayer(hidden_size, intermediate_size, False, num_experts)
        self.down_proj = MergooMoeLayer(intermediate_size, hidden_size, False, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MergooBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.post_attention_layernorm = nn.LayerNorm(16)
            self.mlp = MergooLlamaMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


@pytest.mark.reliability("silent replays")
def test_mergoo_linear_layers_made_moe_replay_as_by_hand() -> None:
    """mergoo's ``MoeLayer`` in place of each of an MLP's three Linears: a top-k of the gate's logits softmaxed over
    the k, Linear experts run on the ``torch.where`` rows; the down projection's router reads the intermediate
    activations that the two routers before it gave. Found with zero configuration (three routers in one block); the
    recorded rows are the experts each token ran at each, and a replay after the gates change forces them, in
    output and gradients as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7))
    session = assert_exact(MergooBlock(), x)
    assert session.names == ("mlp.gate_proj.gate", "mlp.up_proj.gate", "mlp.down_proj.gate"), session.names


# mergoo's ``LoRAMoeLayer`` (with an ``adapter_configs`` composer config): the frozen ``base_layer`` Linear plus LoRA
# adapters as the experts, kept in ``lora_A`` / ``lora_B`` ModuleDicts keyed by the adapter's index as a string
# (``"0"``, ``"1"``, ...), their names in the Python list ``active_adapters``; the gate a bias-free Linear of the
# model's hidden size, ``torch.topk`` of the logits softmaxed over the k; the base output, then for each active
# adapter the ``torch.where`` rows of ``x`` (recast to the adapter's dtype), ``lora_B(lora_A(dropout(x)))`` times its
# scaling and its weight ``+=`` into them. Made in place of ``q_proj`` / ``v_proj`` (here: of an MLP's ``gate_proj``
# and ``up_proj``, the hidden size their input).
class MergooLoRAMoeLayer(_Used):
    def __init__(
        self, hidden_size: int, num_experts: int, num_experts_per_tok: int, in_features: int, out_features: int
    ):
        super().__init__()
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.base_layer = nn.Linear(self.in_features, self.out_features, bias=False)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.active_adapters: list[str] = []
        for ix in range(num_experts):
            self.update_layer(adapter_name=str(ix), r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, lora_dropout: float, use_rslora: bool) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout.update(
            nn.ModuleDict({adapter_name: nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()})
        )
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        # (upstream's B starts at zero and is trained, or loaded from a trained adapter; one stands in here)
        nn.init.normal_(self.lora_B[adapter_name].weight, std=0.1)
        self.active_adapters.append(adapter_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous_dtype = x.dtype
        gate_logits = self.gate(x)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        if self.forced is not None:
            selected_experts = self.forced.view(*gate_logits.shape[:-1], self.num_experts_per_tok)
            weights = gate_logits.gather(-1, selected_experts)
        self.used = selected_experts.reshape(-1, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=2, dtype=torch.float).to(previous_dtype)
        result = self.base_layer(x)
        for ix, active_adapter in enumerate(self.active_adapters):
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            x = x.to(lora_A.weight.dtype)
            batch_idx, tok_idx, expert_idx = torch.where(selected_experts == ix)
            x_adapter = x[batch_idx, tok_idx]
            x_adapter = lora_B(lora_A(dropout(x_adapter))) * scaling
            result[batch_idx, tok_idx] += x_adapter * weights[batch_idx, tok_idx, expert_idx].unsqueeze(-1)
        result = result.to(previous_dtype)
        return result


class MergooLoRAMLP(nn.Module):
    def __init__(self, hidden_size: int = 16, intermediate_size: int = 24, num_experts: int = 4) -> None:
        super().__init__()
        self.gate_proj = MergooLoRAMoeLayer(hidden_size, num_experts, 2, hidden_size, intermediate_size)
        self.up_proj = MergooLoRAMoeLayer(hidden_size, num_experts, 2, hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MergooLoRABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.post_attention_layernorm = nn.LayerNorm(16)
            self.mlp = MergooLoRAMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


@pytest.mark.reliability("silent replays")
def test_mergoo_lora_adapters_as_experts_replay_as_by_hand() -> None:
    """mergoo's ``LoRAMoeLayer``: the frozen base Linear plus LoRA adapters as experts, kept in ``lora_A`` /
    ``lora_B`` ModuleDicts keyed ``"0"`` to ``"E-1"`` and run in the order of a Python list of their names; a top-k
    of the gate's logits softmaxed over the k. Found with zero configuration (two routers in one MLP); the recorded
    rows are the adapters each token ran, and a replay after the gates change forces them, in output and gradients
    as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    session = assert_exact(MergooLoRABlock(), x, include=MergooLoRAMoeLayer)
    assert session.names == ("mlp.gate_proj", "mlp.up_proj"), session.names


@pytest.mark.reliability("false refusals")
def test_mergoo_lora_adapters_as_experts_are_found_with_zero_configuration() -> None:
    """The same block with no configuration: each ``LoRAMoeLayer`` holds a ``gate`` Linear scoring ``num_experts``
    adapters, ``num_experts`` / ``num_experts_per_tok`` attributes, and the adapters as ``num_experts`` entries
    ``"0"`` to ``"E-1"`` of its ``lora_A`` / ``lora_B`` ModuleDicts (no experts module). Each gate is found (the
    block declares its width as its expert count, and its forward reads two containers of as many adapters) and
    replays as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    session = assert_exact(MergooLoRABlock(), x)
    assert session.names == ("mlp.gate_proj.gate", "mlp.up_proj.gate"), session.names
