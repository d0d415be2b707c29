"""MoE code of expert-specialised fine-tuning, expert offloading and RL routing replay, with zero configuration (see
``test_public_routers29``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was. The runs that establish a decision leave no trace
in the state the upstream code keeps beside the routers (a routing-replay buffer of its own).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
import tests.test_public_routers6 as routers6
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, perturb
from tests.test_public_routers6 import _Used, assert_exact, assert_refused


def _seq() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``make`` with its parameters drawn from a fixed seed (the global generator left as it was)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return make()

    return build


class _GatedMLP(nn.Module):
    """A SwiGLU feed-forward (``gate_proj``, ``up_proj``, ``down_proj``), as the experts of these blocks."""

    def __init__(self, d: int = D, f: int = 8) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------- ESFT: frozen modules as buffers
# deepseek-ai/ESFT esft.py (``to_esft``, ``to_buffer``, ``to_param``) over deepseek/modeling_deepseek.py
# (DeepSeek-V2-Lite's ``MoEGate``, ``DeepseekV2MoE``, ``AddAuxiliaryLoss``): expert-specialised fine-tuning turns every
# parameter of the model into a non-persistent buffer (the gate's ``weight`` too), then the experts chosen for the
# task (and with ``non_expert_modules`` everything but the experts) back into parameters. The gate: fp32 logits,
# softmax, a greedy unsorted ``torch.topk``, weights scaled by ``routed_scaling_factor`` (no renormalisation), and in
# training the sequence-level aux loss from ``scatter_add_`` of the chosen ids, attached to the output by an
# autograd Function. The block dispatches by ``repeat_interleave`` and a boolean mask per expert in training, and by
# ``moe_infer`` (an argsort of the flat ids, the counts read on the host) in eval, plus a shared expert.
class MoEGate(_Used):
    def __init__(self, n_routed_experts: int = 6, top_k: int = 2, alpha: float = 0.001) -> None:
        super().__init__()
        self.top_k = top_k
        self.n_routed_experts = n_routed_experts
        self.routed_scaling_factor = 1.0
        self.alpha = alpha
        self.weight = nn.Parameter(torch.randn(n_routed_experts, D) * 0.3)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.forced is None:
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            topk_idx = self.forced
            topk_weight = scores.gather(1, topk_idx)
        self.used = topk_idx
        topk_weight = topk_weight * self.routed_scaling_factor
        aux_loss = None
        if self.training and self.alpha > 0.0:
            topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
            scores_for_seq_aux = scores.view(bsz, seq_len, -1)
            ce = torch.zeros(bsz, self.n_routed_experts)
            ce.scatter_add_(1, topk_idx_for_aux_loss, torch.ones(bsz, seq_len * self.top_k)).div_(
                seq_len * self.top_k / self.n_routed_experts
            )
            aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """The aux loss's gradient handed to it as the output's own backward runs (the output itself unchanged)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_loss = torch.ones(1, dtype=ctx.dtype) if ctx.required_aux_loss else None
        return grad_output, grad_loss


class DeepseekV2MoE(nn.Module):
    def __init__(self, n_routed_experts: int = 6, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts_per_tok = top_k
        self.experts = nn.ModuleList(_GatedMLP() for _ in range(n_routed_experts))
        self.gate = MoEGate(n_routed_experts, top_k)
        self.shared_experts = _GatedMLP()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(*orig_shape)
            assert aux_loss is not None
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        return y + self.shared_experts(identity)

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0).cpu().numpy()
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        weighted = new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(dim=-1))
        return weighted.sum(dim=1).type(new_x.dtype)


class DeepseekLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.mlp = DeepseekV2MoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.input_layernorm(x))


class DeepseekLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DeepseekLayer(), DeepseekLayer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def to_buffer(module: nn.Module, mark_param: bool = True) -> None:
    """ESFT's ``to_buffer``: every parameter of ``module`` and its children a non-persistent buffer."""
    modules = module.modules()
    module = next(modules)
    delattrs = [(module, name, param) for name, param in module.named_parameters(recurse=False)]
    if mark_param and delattrs:
        module.param_list = getattr(module, "param_list", []) + [name for _, name, _ in delattrs]
    for m, name, _ in delattrs:
        delattr(m, name)
    for m, name, param in delattrs:
        m.register_buffer(name, param.data, persistent=False)
    for m in modules:
        to_buffer(m, mark_param=mark_param)


def to_param(module: nn.Module) -> None:
    """ESFT's ``to_param``: the buffers ``to_buffer`` made parameters again."""
    modules = module.modules()
    module = next(modules)
    for name in getattr(module, "param_list", []):
        buffer = getattr(module, name)
        delattr(module, name)
        setattr(module, name, nn.Parameter(buffer))
    for m in modules:
        to_param(m)


def to_esft(model: DeepseekLayers, adapter_config: dict[str, Any]) -> DeepseekLayers:
    if not adapter_config.get("non_expert_modules", False):
        to_buffer(model)
    else:
        to_param(model)
    for idx, layer in enumerate(model.layers):
        if type(layer.mlp).__name__ != "DeepseekV2MoE":
            continue
        if adapter_config.get("shared_experts", False):
            to_param(layer.mlp.shared_experts)
        else:
            to_buffer(layer.mlp.shared_experts)
        trainable_experts = adapter_config["experts"][str(idx)]
        for expert_id in range(len(layer.mlp.experts)):
            if expert_id in trainable_experts:
                to_param(layer.mlp.experts[expert_id])
            else:
                to_buffer(layer.mlp.experts[expert_id])
    return model


def _esft(non_expert_modules: bool) -> Callable[[], nn.Module]:
    config = {"non_expert_modules": non_expert_modules, "experts": {"0": [1, 3], "1": [0, 5]}}
    return _seeded(lambda: to_esft(DeepseekLayers(), config))


def _perturb_gate_buffers(model: nn.Module, scale: float = 3.0) -> None:
    """:func:`perturb`, and the gates' weights where ESFT made them buffers (as a base model swapped for another)."""
    perturb(model, scale)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.weight"):
                b.add_(scale * torch.randn(b.shape, generator=g))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("non_expert_modules", "train"),
    [
        # (in eval nothing of the ESFT model with frozen non-expert modules has a gradient: ``moe_infer`` runs
        # without, and every other module is buffers)
        pytest.param(False, True, id="gate-a-buffer-train"),
        pytest.param(True, False, id="non-expert-modules-trained-eval"),
        pytest.param(True, True, id="non-expert-modules-trained-train"),
    ],
)
def test_esft_replays_the_recorded_experts_as_by_hand(
    non_expert_modules: bool, train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ESFT's fine-tuning of a few experts (the gate a non-persistent buffer, or a parameter with the non-expert
    modules trained; unchosen experts buffers): every gate found with zero configuration, the recorded rows the
    experts used, a replay after the gates change those experts forced by hand, in output and gradients (the
    chosen experts', and the aux loss's where it trains)."""
    monkeypatch.setattr(routers6, "perturb", _perturb_gate_buffers)
    model = _esft(non_expert_modules)()
    trained = {n for n, _ in model.named_parameters()}
    assert "layers.0.mlp.gate.weight" in trained or not non_expert_modules
    assert "layers.0.mlp.experts.1.up_proj.weight" in trained and "layers.0.mlp.experts.0.up_proj.weight" not in trained
    assert_exact(model, _seq(), train=train)


# ----------------------------------------------------------------------- ESFT's routing log: a file each forward
# aws-samples/sample-ESFT model_patch/patch_qwen3_moe.py (``patch_qwen3_moe``: ``Qwen3MoeSparseMoeBlock.forward``
# replaced): the block's own softmax, ``torch.topk`` and renormalisation, then, where the config asks for it, one line
# per forward appended to ``expert_weights_{layer}.txt`` with the chosen ids and weights (``.tolist()``), which
# ``generate_expert_config.py`` counts to pick the experts ESFT trains; the experts are dispatched by a one-hot mask.
class _LogConfig:
    def __init__(self, log_dir: Path) -> None:
        self.log_expert_weights = True
        self.expert_log_dir = str(log_dir)


class LoggedQwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, layer_idx: int, config: _LogConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = 6, 2, True
        self.gate = nn.Linear(D, self.num_experts, bias=False)
        self.experts = nn.ModuleList(_GatedMLP() for _ in range(self.num_experts))
        self.layer_idx = layer_idx
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        if getattr(self.config, "log_expert_weights", False):
            log_dir = self.config.expert_log_dir
            os.makedirs(log_dir, exist_ok=True)
            file_path = os.path.join(log_dir, f"expert_weights_{self.layer_idx}.txt")
            with open(file_path, "a") as f:
                tk_idx_list = selected_experts.view(-1).tolist()
                tk_weight_list = routing_weights.view(-1).tolist()
                f.write(
                    "\t".join([str(i) for i in tk_idx_list])
                    + "\t\t"
                    + "\t".join([str(round(i, 4)) for i in tk_weight_list])
                    + "\n"
                )
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class LoggedLayers(nn.Module):
    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.config = _LogConfig(log_dir)
        self.layers = nn.ModuleList([LoggedQwen3MoeSparseMoeBlock(i, self.config) for i in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


def _logged_ids(log_dir: Path, layer: int) -> list[list[int]]:
    """The expert ids of each line of a layer's ESFT log (one line a forward)."""
    path = log_dir / f"expert_weights_{layer}.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [[int(i) for i in line.split("\t\t")[0].split("\t")] for line in lines]


def _assert_logged_once(model: LoggedLayers, log_dir: Path, x: torch.Tensor) -> None:
    """A capture, and a replay after the gates change, each log one line a layer: the routes (the experts used)."""
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        rows = [routes.layer(name).reshape(-1).tolist() for name in session.names]
        assert [_logged_ids(log_dir, i) for i in range(2)] == [[r] for r in rows]
        with torch.no_grad():
            for layer in model.layers:
                layer.gate.weight.add_(
                    3 * torch.randn(layer.gate.weight.shape, generator=torch.Generator().manual_seed(5))
                )
            model(x)
        assert _logged_ids(log_dir, 0)[-1] != rows[0], "the changed gates choose the recorded experts anyway"
        with torch.no_grad(), session.replay(routes):
            model(x)
        assert [_logged_ids(log_dir, i)[-1] for i in range(2)] == rows


@pytest.mark.reliability("silent replays")
def test_esft_routing_logs_hold_one_line_per_forward_under_a_capture(tmp_path: Path) -> None:
    """sample-ESFT's routing log, written as the first capture establishes the decisions: one line a layer and a
    forward, the experts used, as without the session (the lines are counted to pick the experts ESFT trains)."""
    model = _seeded(lambda: LoggedLayers(tmp_path))()
    assert isinstance(model, LoggedLayers)
    _assert_logged_once(model.eval(), tmp_path, _seq())


# ----------------------------------------------------------------------- MoE-Infinity: an expert executor
# EfficientMoE/MoE-Infinity moe_infinity/models/mixtral.py (``SyncMixtralSparseMoeBlock``), with the expert drop of
# moe_infinity/runtime/expert_drop.py (``select_expert_drops``) that its ``DistributedExpertExecutor`` applies: the
# block's softmax top-2, renormalised, turned into a ``[tokens, E]`` boolean mask (``logical_or`` of the two slots'
# one-hots) and a ``[tokens, E]`` weight mask handed to an executor object (not a module; the offloading engine, here a
# loop over the block's experts) by ``dispatch_local``, the result read back by ``wait_dispatch_local``. With a mass
# budget the executor drops, per token on the host, the lightest experts not resident in GPU memory whose weights
# sum under the budget (``argsort``, ``cumsum``, the flatness of the row checked first) and renormalises the rest.
def select_expert_drops(
    router_mask: torch.Tensor,
    router_weights: torch.Tensor,
    resident: torch.Tensor,
    *,
    min_k: int,
    mass_budget: float,
    flatness_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if mass_budget == 0:
        return router_mask, router_weights
    out_mask = router_mask.to(device="cpu", dtype=torch.bool, copy=True)
    out_w = router_weights.to(device="cpu", copy=True)
    resident_cpu = resident.to(device="cpu", dtype=torch.bool)
    tokens_changed = 0
    for r in range(out_mask.shape[0]):
        mask_row, w_row = out_mask[r], out_w[r]
        selected_count = int(mask_row.sum().item())
        if selected_count <= min_k:
            continue
        selected_weights = w_row[mask_row]
        if not bool(torch.isfinite(selected_weights).all()) or bool((selected_weights < 0).any()):
            continue
        max_weight = float(selected_weights.max().item())
        if max_weight == 0.0:
            continue
        if float(selected_weights.min().item()) / max_weight > flatness_floor:
            continue
        candidate_ids = torch.nonzero(mask_row & ~resident_cpu, as_tuple=False).flatten().flip(0)
        if candidate_ids.numel() == 0:
            continue
        if candidate_ids.numel() > 1:
            candidate_ids = candidate_ids[torch.argsort(w_row[candidate_ids], stable=True)]
        cumulative_mass = torch.cumsum(w_row[candidate_ids], dim=0, dtype=torch.float64)
        dropped_here = min(int((cumulative_mass <= mass_budget).sum().item()), selected_count - min_k)
        if dropped_here == 0:
            continue
        dropped_ids = candidate_ids[:dropped_here]
        out_mask[r, dropped_ids] = False
        out_w[r, dropped_ids] = 0
        tokens_changed += 1
        surviving = out_mask[r]
        surviving_sum = out_w[r][surviving].sum()
        if float(surviving_sum.item()) != 0.0:
            out_w[r][surviving] = out_w[r][surviving] / surviving_sum
    if tokens_changed == 0:
        return router_mask, router_weights
    return out_mask.to(router_mask.device), out_w.to(router_weights.device)


class ExpertExecutor:
    """The offloading engine's executor (a plain object): runs each expert on the tokens its mask column holds."""

    def __init__(self, experts: nn.ModuleList, mass_budget: float) -> None:
        self.experts = experts
        self.resident = torch.tensor([True, False, True, False, False, True])
        self.mass_budget = mass_budget
        self.result: torch.Tensor | None = None
        self.executed: torch.Tensor | None = None

    def dispatch_local(
        self,
        layer_id: int,
        hidden_states: torch.Tensor,
        router_mask: torch.Tensor,
        routing_weights_mask: torch.Tensor,
        router_logits: torch.Tensor | None = None,
    ) -> None:
        mask, weights = select_expert_drops(
            router_mask, routing_weights_mask, self.resident, min_k=1, mass_budget=self.mass_budget, flatness_floor=1.0
        )
        self.executed = mask
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            tokens = torch.nonzero(mask[:, e]).flatten()
            if tokens.numel():
                out = out.index_add(0, tokens, expert(hidden_states[tokens]) * weights[tokens, e, None])
        self.result = out

    def wait_dispatch_local(self) -> torch.Tensor:
        assert self.result is not None
        return self.result


class SyncMixtralSparseMoeBlock(_Used):
    def __init__(self, layer_id: int, mass_budget: float = 0.0) -> None:
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k, self.layer_id = D, 6, 2, layer_id
        self.gate = nn.Linear(D, self.num_experts, bias=False)
        self.experts = nn.ModuleList(_GatedMLP() for _ in range(self.num_experts))
        self.expert_executor = ExpertExecutor(self.experts, mass_budget)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            selected_experts = self.forced
            routing_weights = routing_weights.gather(1, selected_experts)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        router_mask = F.one_hot(selected_experts, num_classes=self.num_experts)
        routing_weights_mask = (routing_weights[:, :, None] * router_mask).permute(0, 2, 1)
        router_mask = router_mask.permute(0, 2, 1)
        router_mask = torch.logical_or(router_mask[:, :, 0], router_mask[:, :, 1])
        routing_weights_mask = torch.sum(routing_weights_mask, dim=-1)
        self.expert_executor.dispatch_local(
            self.layer_id, hidden_states, router_mask, routing_weights_mask, router_logits=router_logits
        )
        final_hidden_states = self.expert_executor.wait_dispatch_local()
        # (the experts the executor ran: the top-2, where it dropped none)
        self.used = selected_experts if self.expert_executor.executed is router_mask else None
        return final_hidden_states.view(batch_size, sequence_length, hidden_dim), router_logits


# EfficientMoE/MoE-Infinity moe_infinity/models/qwen.py (``Qwen3MoEBlock``): the same hand-off for Qwen3-MoE, any k
# (``torch.any`` of the slots' one-hots for the mask), the top-k weights renormalised only with ``norm_topk_prob``.
class Qwen3MoEBlock(_Used):
    def __init__(self, layer_id: int, top_k: int = 3, norm_topk_prob: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob, self.layer_id = 6, top_k, norm_topk_prob, layer_id
        self.gate = nn.Linear(D, self.num_experts, bias=False)
        self.experts = nn.ModuleList(_GatedMLP() for _ in range(self.num_experts))
        self.expert_executor = ExpertExecutor(self.experts, 0.0)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        if self.forced is None:
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        else:
            selected_experts = self.forced
            routing_weights = routing_weights.gather(1, selected_experts)
        self.used = selected_experts
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        router_mask = F.one_hot(selected_experts, num_classes=self.num_experts)
        routing_weights_mask = (routing_weights[:, :, None] * router_mask).permute(0, 2, 1)
        router_mask = router_mask.permute(0, 2, 1)
        router_mask = torch.any(router_mask, dim=-1)
        routing_weights_mask = torch.sum(routing_weights_mask, dim=-1)
        self.expert_executor.dispatch_local(
            self.layer_id, hidden_states, router_mask, routing_weights_mask, router_logits=router_logits
        )
        final_hidden_states = self.expert_executor.wait_dispatch_local()
        return final_hidden_states.view(batch_size, sequence_length, hidden_dim).to(hidden_states.dtype), router_logits


class OffloadedLayers(nn.Module):
    def __init__(self, mass_budget: float = 0.0, qwen3: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Qwen3MoEBlock(i) if qwen3 else SyncMixtralSparseMoeBlock(i, mass_budget) for i in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


# ----------------------------------------------------------------------- slime: Megatron's top-k with a replay
# THUDM/slime slime/utils/routing_replay.py (``RoutingReplay``, ``get_routing_replay_compute_topk``,
# ``register_routing_replay``) around Megatron-core's ``topk_routing_with_score_function`` (``compute_topk``, the
# softmax after the top-k of the logits, ``routing_probs`` and a boolean ``routing_map`` scattered to ``[tokens, E]``):
# each router holds a ``RoutingReplay`` (a plain object) that a forward pre-hook makes the global one; the stage (an
# environment variable) makes the top-k record its indices (host copies appended to the object's list: pinned memory
# on CUDA), or pop them back for the forward or its recompute in place of the top-k.
ROUTING_REPLAY: RoutingReplay | None = None


def set_routing_replay(replay: RoutingReplay) -> None:
    global ROUTING_REPLAY
    ROUTING_REPLAY = replay


class RoutingReplay:
    def __init__(self) -> None:
        self.forward_index = 0
        self.backward_index = 0
        self.top_indices_list: list[torch.Tensor] = []

    def record(self, top_indices: torch.Tensor) -> None:
        buf = torch.empty_like(top_indices, device="cpu")
        buf.copy_(top_indices)
        self.top_indices_list.append(buf)

    def pop_forward(self) -> torch.Tensor:
        top_indices = self.top_indices_list[self.forward_index]
        self.forward_index += 1
        return top_indices

    def pop_backward(self) -> torch.Tensor:
        top_indices = self.top_indices_list[self.backward_index]
        self.backward_index += 1
        return top_indices


def _megatron_compute_topk(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(scores, k=topk, dim=1)


def compute_topk(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_routing_replay_compute_topk(_megatron_compute_topk)``."""
    if os.environ.get("ENABLE_ROUTING_REPLAY", "0") != "1":
        return _megatron_compute_topk(scores, topk)
    stage = os.environ["ROUTING_REPLAY_STAGE"]
    if stage == "fallthrough":
        return _megatron_compute_topk(scores, topk)
    assert ROUTING_REPLAY is not None
    if stage == "record":
        probs, top_indices = _megatron_compute_topk(scores, topk)
        ROUTING_REPLAY.record(top_indices)
    else:
        top_indices = ROUTING_REPLAY.pop_forward() if stage == "replay_forward" else ROUTING_REPLAY.pop_backward()
        assert top_indices.shape[0] == scores.shape[0] and top_indices.shape[1] == topk
        probs = scores.gather(1, top_indices)
    return probs, top_indices


def register_routing_replay(module: nn.Module) -> None:
    if os.environ.get("ENABLE_ROUTING_REPLAY", "0") == "1":
        module.routing_replay = RoutingReplay()

        def pre_forward_hook(*args: Any, **kwargs: Any) -> None:
            set_routing_replay(module.routing_replay)

        module.register_forward_pre_hook(pre_forward_hook)


class TopKRouter(_Used):
    routing_replay: RoutingReplay

    def __init__(self, num_experts: int = 6, topk: int = 2) -> None:
        super().__init__()
        self.topk = topk
        self.weight = nn.Parameter(torch.randn(num_experts, D) * 0.3)

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(input, self.weight)
        if self.forced is None:
            scores, top_indices = compute_topk(logits, self.topk)
        else:
            top_indices = self.forced
            scores = logits.gather(1, top_indices)
        self.used = top_indices
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
        routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
        return routing_probs, routing_map


class MegatronMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = TopKRouter()
        self.experts = nn.ModuleList(_GatedMLP() for _ in range(6))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs, routing_map = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens = routing_map[:, e].nonzero().flatten()
            out = out.index_add(0, tokens, expert(x[tokens]) * probs[tokens, e, None])
        return out.view(hidden_states.shape)


class SlimeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MegatronMoELayer(), MegatronMoELayer()])
        for layer in self.layers:
            register_routing_replay(layer.router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.fixture
def slime_stage(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """slime's routing replay turned on, and a setter of its stage."""
    monkeypatch.setenv("ENABLE_ROUTING_REPLAY", "1")
    monkeypatch.setattr(f"{__name__}.ROUTING_REPLAY", None)

    def set_stage(stage: str) -> None:
        monkeypatch.setenv("ROUTING_REPLAY_STAGE", stage)

    set_stage("record")
    return set_stage


def _slime_lists(model: SlimeLayers) -> list[list[torch.Tensor]]:
    return [layer.router.routing_replay.top_indices_list for layer in model.layers]


@pytest.mark.reliability("silent replays")
def test_slimes_routing_replay_records_one_entry_per_forward_under_a_capture(
    slime_stage: Callable[[str], None],
) -> None:
    """Once silent: slime's own routing replay, recording, beside a capture: the runs that establish each decision
    ran the top-k that records, and left their entries in the list of the ``RoutingReplay`` object each router holds
    (112 a router, the runs with moved indices among them), so slime's replay popped a run's entry for a later
    forward. The plain objects the modules hold are put back after each run: one entry a forward, the routes;
    slime's replay of them after the routers change (the session idle) uses the recorded experts."""
    model = _seeded(SlimeLayers)().eval()
    assert isinstance(model, SlimeLayers)
    x = _seq()
    with mr.attach(model) as session:
        assert session.names == ("layers.0.router", "layers.1.router")
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        lists = _slime_lists(model)
        assert [len(entries) for entries in lists] == [1, 1]
        assert all(torch.equal(entries[0], r) for entries, r in zip(lists, rows, strict=True))
        perturb(model)
        with torch.no_grad():
            model(x)
        assert not torch.equal(model.layers[0].router.used, rows[0]), "the changed routers choose the same experts"
        slime_stage("replay_forward")
        for layer in model.layers:
            layer.router.routing_replay.forward_index = 0
        with torch.no_grad():
            model(x)
        assert all(torch.equal(layer.router.used, r) for layer, r in zip(model.layers, rows, strict=True))


@pytest.mark.reliability("silent replays")
def test_slimes_routing_replay_while_recording_replays_as_by_hand(slime_stage: Callable[[str], None]) -> None:
    """slime's routing replay recording under a capture and a replay: the routers found with zero configuration, the
    recorded rows the experts used, a replay after the routers change those experts forced by hand, in output and
    gradients (train mode)."""
    assert_exact(_seeded(SlimeLayers)(), _seq(), train=True)


@pytest.mark.reliability("silent replays")
def test_slimes_own_replay_under_a_capture_is_refused_naming_why(slime_stage: Callable[[str], None]) -> None:
    """slime replaying its own recorded indices (no top-k in the forward: a gather of them) under a capture: refused
    with a ``MoEReplayError`` that says the forward makes no decision-like call; slime's entries and the model as
    they were."""
    model = _seeded(SlimeLayers)().eval()
    assert isinstance(model, SlimeLayers)
    x = _seq()
    with torch.no_grad():
        model(x)
    slime_stage("replay_forward")
    before = snapshot(model)
    hooks = [dict(layer.router._forward_pre_hooks) for layer in model.layers]
    for layer in model.layers:
        layer.router.routing_replay.forward_index = 0
    with pytest.raises(mr.MoEReplayError, match=r"router 'layers\.0\.router': its forward makes no decision-like call"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert [len(entries) for entries in _slime_lists(model)] == [1, 1]
    assert [layer.router.routing_replay.forward_index for layer in model.layers] == [0, 0]
    assert [dict(layer.router._forward_pre_hooks) for layer in model.layers] == hooks
    for layer in model.layers:
        layer.router._forward_pre_hooks.clear()
    assert_untouched(model, before)


# ----------------------------------------------------------------------- the cases
EXACT: dict[str, tuple[Callable[[], nn.Module], dict[str, object]]] = {
    # name: (model, options: ``train`` and attach options)
    "moe-infinity-executor": (_seeded(OffloadedLayers), {}),
    "moe-infinity-executor-train": (_seeded(OffloadedLayers), {"train": True}),
    "moe-infinity-qwen3-any": (_seeded(lambda: OffloadedLayers(qwen3=True)), {}),
    "moe-infinity-qwen3-any-train": (_seeded(lambda: OffloadedLayers(qwen3=True)), {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """MoE-Infinity's Mixtral and Qwen3-MoE blocks handing a ``[tokens, E]`` mask and weights to an executor object
    (no expert dropped): every router found and nothing else, the recorded rows the experts used, and a replay after
    the routers change those experts forced by hand, in output and gradients."""
    make, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_exact(make(), _seq(), train=train, **opts)  # type: ignore[arg-type]


REFUSED: dict[str, tuple[Callable[[], nn.Module], str, dict[str, object]]] = {
    # name: (model, what the error says, options: ``train`` and attach options)
    "moe-infinity-expert-drop": (
        _seeded(lambda: OffloadedLayers(mass_budget=0.5)),
        r"router 'layers\.0\.gate': after its decision .* chooses again from the current scores",
        {},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_why(case: str) -> None:
    """MoE-Infinity's executor dropping the lightest experts not resident under a mass budget (a later choice from
    the weights, made per token on the host): refused with a ``MoEReplayError`` saying why, the model as it was."""
    make, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), _seq(), match, train=train, **opts)
