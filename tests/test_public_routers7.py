"""Mixture-of-LoRA adapters and more public MoE router code, with zero configuration (see ``test_public_routers6``).

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
from tests.test_evidence import D, E, Experts, T, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers4 import VOCAB, HashLayer
from tests.test_public_routers6 import GateBlock, Layers, _Used, assert_exact, assert_refused


# ----------------------------------------------------------------------- HydraLoRA: one A, E B's, a router
class HydraLoRA(_Used):
    """A HydraLoRA adapter with sparse routing (Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture", in
    its top-k form): the router's logits shifted by their ``max`` (a stable softmax) and ``clamp``-ed, a ``topk`` of
    them over ``[batch, seq, E]``, the softmax of the chosen logits the weights; every expert's LoRA output computed,
    stacked on dim -2, the chosen ones picked by ``gather`` and summed in place. ``zero_router``: the router
    initialised to zero as upstream (every logit tied at the first step); ``clamp=False``: without the clamp."""

    def __init__(
        self, r: int = 4, num_experts: int = E, top_k: int = 2, zero_router: bool = False, clamp: bool = True
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.scaling, self.clamp = num_experts, top_k, 2.0, clamp
        self.lora_A = nn.ModuleList(nn.Linear(D, r, bias=False) for _ in range(num_experts))
        self.lora_B = nn.ModuleList(nn.Linear(r, D, bias=False) for _ in range(num_experts))
        self.router = nn.Linear(D, num_experts)
        if zero_router:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        if self.clamp:
            logits = torch.clamp(logits, -20, 20)
        if self.forced is None:
            topk_vals, topk_idx = torch.topk(logits, k=self.top_k, dim=-1)
        else:
            topk_idx = self.forced.view(*x.shape[:-1], -1)
            topk_vals = logits.gather(-1, topk_idx)
        self.used = topk_idx.reshape(-1, self.top_k)
        gates = F.softmax(topk_vals, dim=-1)
        expert_outs = torch.stack(
            [b(a(x)) * self.scaling for a, b in zip(self.lora_A, self.lora_B, strict=True)], dim=-2
        )
        out = torch.zeros_like(expert_outs[..., 0, :])
        for i in range(self.top_k):
            index = topk_idx[..., i, None, None].expand(*topk_idx.shape[:-1], 1, expert_outs.size(-1))
            out += gates[..., i, None] * torch.gather(expert_outs, dim=-2, index=index).squeeze(-2)
        return out


class HydraLoRALinear(nn.Module):
    """The adapter wrapping a frozen base ``Linear``: ``base(x) + hydra(x)``."""

    def __init__(self, **hydra: object) -> None:
        super().__init__()
        self.base = nn.Linear(D, D)
        self.base.requires_grad_(False)
        self.hydra = HydraLoRA(**hydra)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.hydra(x)


class HydraLoRASoftLinear(nn.Module):
    """Clin0212/HydraLoRA ``HydraLoRALinear`` (soft routing, the paper's own): one shared ``lora_A [d, r]``, the
    ``lora_B [E, r, d]`` heads, a ``lora_router`` Linear whose softmax weighs every head by ``einsum``: dense, no
    decision to record or force."""

    def __init__(self, r: int = 4, expert_num: int = E) -> None:
        super().__init__()
        self.expert_num = expert_num
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(D, r) / 4)
        self.lora_B = nn.Parameter(torch.randn(expert_num, r, D) / 4)
        self.lora_router = nn.Linear(D, expert_num, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gating_probs = F.softmax(self.lora_router(x), dim=-1)
        mid = torch.einsum("td,edr->ter", x, self.lora_A.unsqueeze(0).expand(self.expert_num, -1, -1))
        mid = torch.einsum("ter,erd->ted", mid, self.lora_B)
        return self.base_layer(x) + torch.einsum("ted,te->td", mid, gating_probs)


class HydraLoRAPeftTopK(_Used):
    """A HydraLoRA layer in peft's layout (Clin0212/HydraLoRA's ``HydraLoRALayer``: per adapter name, ``lora_A [d,
    r]`` and ``lora_B [E, r, d]`` in ``ParameterDict``-s, the ``lora_router`` in a ``ModuleDict``) routed sparsely:
    a softmax, a ``topk``, the chosen heads' weights renormalised."""

    def __init__(self, expert_num: int = 4, top_k: int = 2, r: int = 4) -> None:
        super().__init__()
        self.expert_num, self.top_k = {"default": expert_num}, top_k
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(D, r) / 4)})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(expert_num, r, D) / 4)})
        self.lora_router = nn.ModuleDict({"default": nn.Linear(D, expert_num, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.lora_router["default"](x), dim=-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        mid = x @ self.lora_A["default"]  # [T, r]
        heads = torch.einsum("tr,tkrd->tkd", mid, self.lora_B["default"][idx])
        return self.base_layer(x) + ((w / w.sum(-1, keepdim=True))[..., None] * heads).sum(1)


class HydraSoftBesideMoE(nn.Module):
    """An attention-like projection with a soft HydraLoRA adapter, then a routed MoE (a Mixtral-style gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = HydraLoRASoftLinear()
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q_proj(x))
        return h + self.moe(x + h)


# ----------------------------------------------------------------------- MoLA: layer-wise expert counts
class MoLALinear(_Used):
    """GCYZSL/MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"), peft-style: a frozen ``base_layer``,
    per adapter name a ``ModuleList`` of ``lora_A`` / ``lora_B`` experts and a ``lora_router`` Linear, as many experts
    as the layer's entry in ``number_experts`` (2, 4, 6, 8 from the bottom up), a softmax, ``topk(obtain_k)``,
    renormalised, each chosen expert run on its tokens."""

    def __init__(self, number_experts: int, top_k: int = 2, r: int = 4) -> None:
        super().__init__()
        self.number_experts, self.top_k = number_experts, top_k
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict(
            {"default": nn.ModuleList(nn.Linear(D, r, bias=False) for _ in range(number_experts))}
        )
        self.lora_B = nn.ModuleDict(
            {"default": nn.ModuleList(nn.Linear(r, D, bias=False) for _ in range(number_experts))}
        )
        self.lora_router = nn.ModuleDict({"default": nn.Linear(D, number_experts, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        flat = x.view(-1, D)
        probs = F.softmax(self.lora_router["default"](flat), dim=-1, dtype=torch.float32)
        if self.forced is None:
            weights, selected = torch.topk(probs, self.top_k, dim=-1)
        else:
            selected = self.forced
            weights = probs.gather(1, selected)
        self.used = selected
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        mixed = torch.zeros_like(flat)
        for e in range(self.number_experts):
            tok, slot = torch.where(selected == e)
            h = self.lora_B["default"][e](self.lora_A["default"][e](flat[tok]))
            mixed = mixed.index_add(0, tok, weights[tok, slot, None] * h)
        return result + mixed.view_as(result)


class MoLAModel(nn.Module):
    """Four residual layers whose ``o_proj`` is a MoLA adapter with 2, 4, 6, 8 experts (the paper's "2468")."""

    def __init__(self, counts: tuple[int, ...] = (2, 4, 6, 8)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"o_proj": MoLALinear(n)}) for n in counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer["o_proj"](x))
        return x


# ----------------------------------------------------------------------- AdaMoLE: a learned threshold
class AdaMoeLayer(nn.Module):
    """zefang-liu/AdaMoLE ``AdaMoeLayer``: softmax gates minus a per-token threshold (``sigmoid(threshold_fn(x)) *
    max_threshold``), the experts those at or above it (``torch.ge``): a variable count per token, no top-k."""

    def __init__(self, num_experts: int = E) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(num_experts))
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.threshold_fn = nn.Linear(D, 1)
        self.max_threshold = 1 / num_experts

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.view(-1, inputs.shape[-1])
        gate_logits = F.softmax(self.gate(flat), dim=-1)
        thresholds = torch.sigmoid(self.threshold_fn(flat)) * self.max_threshold
        adapted = gate_logits - thresholds
        selected = torch.ge(adapted, 0).to(torch.float)
        weights = adapted * selected
        sums = torch.sum(weights, dim=-1, keepdim=True)
        weights = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
        results = torch.zeros_like(flat)
        for i, expert in enumerate(self.experts):
            batch_idx = torch.where(selected[:, i])[0]
            if len(batch_idx) > 0:
                results = results.index_add(0, batch_idx, weights[batch_idx, i, None] * expert(flat[batch_idx]))
        return results.view_as(inputs)


class AdaMoLELinear(nn.Module):
    """AdaMoLE's ``LinearAdaMoleLayer``: a frozen base Linear plus the adaptive MoE of LoRA experts."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.moe_layer = nn.ModuleDict({"default": AdaMoeLayer()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.moe_layer["default"](x)


# ----------------------------------------------------------------------- ReMoE: ReLU routing
class ReLURouter(nn.Module):
    """thu-ml/ReMoE ``ReLURouter`` (Wang et al. 2024): ``relu`` of the gating logits are the weights, the experts
    those with a positive weight (``routing_map = probs > 0``): a variable count per token, no top-k."""

    def __init__(self, num_experts: int = E) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.randn(num_experts, D) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.relu(F.linear(x, self.weight))
        return probs, probs > 0


class ReMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = ReLURouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, routing_map = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = routing_map[:, e].nonzero()[:, 0]
            out = out.index_add(0, tok, probs[tok, e, None] * expert(x[tok]))
        return out


class BesideMoE(nn.Module):
    """A layer of ``other`` (an adapter or MoE no top-k chooses in), then a routed MoE (a Mixtral-style gate)."""

    def __init__(self, other: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.other = other()
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.other(x))
        return h + self.moe(x + h)


# ----------------------------------------------------------------------- DiT-MoE
class DiTMoEGate(_Used):
    """feizc/DiT-MoE ``MoEGate`` (DeepSeek-MoE's): ``[batch, seq, d]`` flattened, ``F.linear`` with a ``[E, d]``
    weight, softmax, ``topk(sorted=False)``, no renormalisation; in training the sequence-free aux loss from the
    chosen ids' one-hot."""

    def __init__(self, num_experts: int = E, num_experts_per_tok: int = 2, aux_loss_alpha: float = 0.01) -> None:
        super().__init__()
        self.top_k, self.n_routed_experts, self.alpha = num_experts_per_tok, num_experts, aux_loss_alpha
        self.weight = nn.Parameter(torch.randn(num_experts, D) / 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = hidden_states.shape[-1]
        scores = F.linear(hidden_states.view(-1, h), self.weight, None).softmax(dim=-1)
        if self.forced is None:
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_idx = self.forced
            topk_weight = scores.gather(1, topk_idx)
        self.used = topk_idx
        aux_loss = None
        if self.training and self.alpha > 0.0:
            mask_ce = F.one_hot(topk_idx.view(-1), num_classes=self.n_routed_experts)
            fi = mask_ce.float().mean(0) * self.n_routed_experts
            aux_loss = (scores.mean(0) * fi).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """DiT-MoE's (DeepSeek-MoE's) ``AddAuxiliaryLoss``: the output unchanged, a gradient of one for the aux loss."""

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


class DiTSparseMoeBlock(nn.Module):
    """feizc/DiT-MoE ``SparseMoeBlock``: in training the tokens ``repeat_interleave``-d k times and each expert's
    rows written by a boolean mask, the aux loss attached by ``AddAuxiliaryLoss``; in eval ``moe_infer`` (under
    ``no_grad``): the flat ids ``argsort``-ed, ``bincount``-ed, each expert's outputs scaled in place and
    ``scatter_reduce_``-d; two shared experts always added."""

    def __init__(self, num_experts_per_tok: int = 2) -> None:
        super().__init__()
        self.num_experts_per_tok = num_experts_per_tok
        self.experts = Experts()
        self.gate = DiTMoEGate(num_experts_per_tok=num_experts_per_tok)
        self.shared_experts = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, orig_shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i]).float()
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).view(*orig_shape)
            assert aux_loss is not None
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


# ----------------------------------------------------------------------- peft LoRA on a router's gate
class LinearGateMoE(_Used):
    """A block with a bare ``nn.Linear`` gate and its top-k in the block (DBRX, gpt-fast): the gate the target of a
    peft LoRA in the tests, so that it becomes a ``lora.Linear`` wrapping the ``base_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


def _peft(make: Callable[[], nn.Module], targets: list[str], dropout: float = 0.0) -> nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = make()
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


# ----------------------------------------------------------------------- LD-MoLE: a sparsegen projection
class SparsegenRouter(nn.Module):
    """eshentw/LD-MoLE (Zhuang et al. 2025) ``sparsegen`` routing: the logits ``sort``-ed (values only), their
    cumulative sums find the support size ``k*`` per token and the threshold ``tau`` (with a per-token ``lambda``
    from a shared MLP), the weights ``clamp((z - tau) / (1 - lambda), min=0)``: the experts those above ``tau``, a
    variable count, no top-k."""

    def __init__(self, num_experts: int = E) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(D, num_experts, bias=False)
        self.lambda_mlp = nn.Sequential(nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.gate(x)
        lam = torch.sigmoid(self.lambda_mlp(x)) * 0.9
        z_sorted, _ = torch.sort(z, dim=-1, descending=True)
        cum = z_sorted.cumsum(-1)
        k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
        k_star = ((1 - lam) + k * z_sorted > cum).sum(-1, keepdim=True)
        tau = (cum.gather(-1, k_star - 1) - 1 + lam) / k_star
        return torch.clamp((z - tau) / (1 - lam), min=0)


class SparsegenMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = SparsegenRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = w[:, e].nonzero()[:, 0]
            out = out.index_add(0, tok, w[tok, e, None] * expert(x[tok]))
        return out


# ----------------------------------------------------------------------- MoLE: a dense gate over LoRA outputs
class MoLELayer(nn.Module):
    """Mixture of LoRA Experts (Wu et al. 2024, ICLR): the outputs of ``N`` trained LoRAs concatenated, normalised,
    scored by a learnable gate and weighed by its softmax with a temperature: every LoRA weighted, no choice."""

    def __init__(self, n: int = 4, r: int = 2, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.loras = nn.ModuleList(
            nn.Sequential(nn.Linear(D, r, bias=False), nn.Linear(r, D, bias=False)) for _ in range(n)
        )
        self.gate = nn.Linear(n * D, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([lora(x) for lora in self.loras], dim=-2)  # [T, N, D]
        eps = F.softmax(self.gate(F.layer_norm(outs.flatten(-2), (outs.shape[-2] * D,))) / self.temperature, -1)
        return self.base_layer(x) + (eps[..., None] * outs).sum(-2)


# ----------------------------------------------------------------------- hash layers beside learned routing
class HashBesideMoE(nn.Module):
    """Roller et al.'s hash layers at the bottom and a learned router above (the paper's mix): the first layer's
    experts looked up from the token ids (ParlAI's ``hash_bin_map``), no decision to record; a replay on the same
    tokens looks up the same experts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.hash = HashLayer()
        self.moe = GateBlock()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x + self.hash(x, input_ids)
        return x + self.moe(x)


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (T,), generator=torch.Generator().manual_seed(2))


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "hydralora-soft-beside-moe": (lambda: Layers(HydraSoftBesideMoE), _x, {}),
    "hydralora-soft-beside-moe-train": (lambda: Layers(HydraSoftBesideMoE), _x, {"train": True}),
    "mole-dense-beside-moe": (lambda: Layers(lambda: BesideMoE(MoLELayer)), _x, {}),
    "hash-layer-beside-moe": (HashBesideMoE, _ids, {"change": 0.3}),
    "dit-moe-infer": (lambda: Layers(DiTSparseMoeBlock), lambda: _x(2, 12), {}),
    "dit-moe-train": (lambda: Layers(DiTSparseMoeBlock), lambda: _x(2, 12), {"train": True}),
    "peft-lora-on-block-gate": (lambda: _peft(lambda: Layers(LinearGateMoE), ["gate"]), _x, {"change": 0.3}),
    "peft-lora-on-gate-and-experts": (
        lambda: _peft(lambda: Layers(LinearGateMoE), ["gate", r"experts\.\d+"]),
        _x,
        {"change": 0.3},
    ),
    "peft-lora-dropout-on-block-gate-train": (
        lambda: _peft(lambda: Layers(LinearGateMoE), ["gate"], dropout=0.2),
        _x,
        {"change": 0.3, "train": True},
    ),
    "peft-lora-on-router-gate": (lambda: _peft(lambda: Layers(GateBlock), ["gate.gate"]), _x, {"change": 0.3}),
    "mola-2468-named": (MoLAModel, _x, {"change": 0.5, "include": MoLALinear}),
    "mola-2468-named-train": (MoLAModel, _x, {"change": 0.5, "include": MoLALinear, "train": True}),
    "hydralora-topk-named": (
        lambda: Layers(lambda: HydraLoRALinear(clamp=False)),
        lambda: _x(2, 12),
        {"include": HydraLoRA},
    ),
    "hydralora-peft-layout-topk-named": (
        lambda: Layers(HydraLoRAPeftTopK),
        _x,
        {"change": 0.3, "include": HydraLoRAPeftTopK},
    ),
    "hydralora-topk-zero-router-named": (
        lambda: Layers(lambda: HydraLoRALinear(clamp=False, zero_router=True)),
        lambda: _x(2, 12),
        {"include": HydraLoRA},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Dense LoRA mixtures (HydraLoRA's soft routing, MoLE's gate over LoRA outputs) and a hash layer (its experts
    looked up from the token ids) beside a routed MoE: nothing of them found, nothing to force; DiT-MoE's block
    (``repeat_interleave`` in training, ``argsort`` and ``scatter_reduce_`` under ``no_grad`` in eval, an aux loss
    from the chosen ids); peft's LoRA on a router's gate (the gate a ``lora.Linear`` wrapping the base one, its
    dropout drawn before the decision in training) and on the experts; MoLA's layer-wise expert counts (2, 4, 6, 8,
    a top-2 of 2 at the bottom) and HydraLoRA's top-k (its router at zero, every logit tied, as upstream initialises
    it; in peft's layout), named: every router found and nothing else, the recorded rows the experts used, and a
    replay after the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)


_NO_CHOICE = r"makes no decision-like call .* or a threshold \(the experts whose weight passes"
_NOT_FOUND = "no MoE router found"
REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the refusal says, options: ``train`` and attach options)
    "adamole-threshold": (lambda: Layers(AdaMoLELinear), _x, _NO_CHOICE, {}),
    "adamole-beside-moe": (lambda: Layers(lambda: BesideMoE(AdaMoLELinear)), _x, _NO_CHOICE, {}),
    "remoe-relu": (lambda: Layers(ReMoELayer), _x, _NO_CHOICE, {}),
    "remoe-relu-train": (lambda: Layers(ReMoELayer), _x, _NO_CHOICE, {"train": True}),
    "remoe-beside-moe": (lambda: Layers(lambda: BesideMoE(ReMoELayer)), _x, _NO_CHOICE, {}),
    "ld-mole-sparsegen": (lambda: Layers(SparsegenMoE), _x, r"reads the values of #0 sort", {}),
    "ld-mole-sparsegen-beside-moe": (
        lambda: Layers(lambda: BesideMoE(SparsegenMoE)),
        _x,
        r"reads the values of #0 sort",
        {},
    ),
    "hydralora-soft-alone": (lambda: Layers(HydraLoRASoftLinear), _x, _NOT_FOUND, {}),
    "mole-dense-alone": (lambda: Layers(MoLELayer), _x, _NOT_FOUND, {}),
    "hydralora-peft-layout-topk-4-beside-moe": (
        lambda: Layers(lambda: BesideMoE(HydraLoRAPeftTopK)),
        _x,
        r"\(HydraLoRAPeftTopK\): topk over 4",
        {},
    ),
    "mola-4-beside-moe": (
        lambda: Layers(lambda: BesideMoE(lambda: MoLALinear(4))),
        _x,
        r"\(MoLALinear\): topk over 4",
        {},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_choices_no_top_k_holds_and_unfound_lora_experts_are_refused(case: str) -> None:
    """A threshold learned per token (AdaMoLE), ReLU routing (ReMoE), a sparsegen projection whose ``sort`` only
    finds the threshold (LD-MoLE): a variable count of experts per token, which no call's indices hold, refused
    alone and beside a routed MoE; dense LoRA mixtures alone: no router to find; a LoRA mixture's top-k (HydraLoRA
    in peft's layout, MoLA) that discovery does not find, beside a routed MoE, whatever its expert count (once
    silent for a count other than the MoE's: its choice was neither recorded nor forced): refused, saying why, the
    model as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            "mola",
            marks=pytest.mark.xfail(
                strict=True,
                raises=mr.RouterNotFoundError,
                reason="a mixture of LoRA experts kept per adapter name (MoLA's lora_A/lora_B ModuleDicts of expert "
                "lists beside a lora_router) is not found with zero configuration: a clear RouterNotFoundError, "
                "include= attaches it",
            ),
        ),
        "hydralora",
    ],
)
def test_a_mixture_of_lora_experts_is_found_with_zero_configuration(case: str) -> None:
    """MoLA's and HydraLoRA's top-k routers, in a model of nothing else: found and replayed as by hand (HydraLoRA's
    ``router`` beside its block's ``num_experts`` and ``lora_A`` / ``lora_B`` lists of as many experts)."""
    if case == "mola":
        assert_exact(MoLAModel(), _x(), change=0.5)
    else:
        assert_exact(Layers(lambda: HydraLoRALinear(clamp=False)), _x(2, 12))


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    raises=mr.UnsupportedRouterError,
    reason="HydraLoRA's logits shifted by their max, then clamp(-20, 20), before its top-k: once the logits spread "
    "past the clamp, moving the max's values changes which are clamped, the pattern of a mask made from an earlier "
    "call's values (relu(probs - 0.3 * best), which test_evidence keeps refused), so it is refused too; a gather "
    "from the clamped logits is what the block forced by hand computes: a false refusal",
)
def test_a_stable_shift_then_a_clamp_before_the_top_k_replays_exactly() -> None:
    """HydraLoRA's top-k with upstream's clamp, named: replayed as by hand after the router changes."""
    assert_exact(Layers(HydraLoRALinear), _x(2, 12), include=HydraLoRA)
