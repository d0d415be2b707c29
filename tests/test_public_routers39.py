"""MoE code of mistral-inference (Mistral's reference ``MoeLayer``), of IBM's foundation-model-stack
(``MOEFeedForward`` over its pure-PyTorch ``ConditionalFeedForward``), of ServiceNow's Fast-LLM
(``MixtureOfExpertMLP``: a scaled router input, shared experts as extra slots, jitter and losses by autograd
functions in training) and of lm-engine (IBM's dolomite-engine: experts run on ``split`` chunks by a ``bincount``
custom op, a top-1 by ``max``), with zero configuration where they are found so (see ``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_public_routers6 import _Used, assert_exact


# ----------------------------------------------------------------------- mistral-inference: the reference MoeLayer
# mistralai/mistral-inference src/mistral_inference/moe.py (``MoeArgs``, ``MoeLayer``) with transformer_layers.py
# (``FeedForward``, ``RMSNorm``, ``TransformerBlock``): the block's ``feed_forward`` is a ``MoeLayer`` given its
# experts and its gate (a bias-free ``nn.Linear``) from outside; over the flattened ``[tokens, dim]`` input,
# ``torch.topk`` of the gate's LOGITS, a float softmax over the k (``dim=1``), and for each expert the
# ``torch.where(selected_experts == i)`` pairs, its output times its weight ``+=`` into ``results[batch_idx]``.
@dataclasses.dataclass
class MistralMoeArgs:
    num_experts: int
    num_experts_per_tok: int


class MistralFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MistralRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class MistralMoeLayer(_Used):
    def __init__(self, experts: list[nn.Module], gate: nn.Module, moe_args: MistralMoeArgs) -> None:
        super().__init__()
        assert len(experts) > 0
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.args.num_experts_per_tok)
        if self.forced is not None:
            selected_experts = self.forced
            weights = gate_logits.gather(1, selected_experts)
        self.used = selected_experts
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


class MistralMoeBlock(nn.Module):
    """``TransformerBlock`` of mistral-inference, its attention left out: ``h = x``, then
    ``h + feed_forward(ffn_norm(h))``."""

    def __init__(self, dim: int = 16, hidden_dim: int = 24, num_experts: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ffn_norm = MistralRMSNorm(dim)
            self.feed_forward = MistralMoeLayer(
                experts=[MistralFeedForward(dim, hidden_dim) for _ in range(num_experts)],
                gate=nn.Linear(dim, num_experts, bias=False),
                moe_args=MistralMoeArgs(num_experts=num_experts, num_experts_per_tok=2),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        return h + self.feed_forward(self.ffn_norm(h))


@pytest.mark.reliability("silent replays")
def test_mistral_inference_moe_layer_replays_as_by_hand() -> None:
    """mistral-inference's ``MoeLayer``: its gate a Linear handed in, a top-2 of the logits softmaxed over the two in
    float, each expert run on its ``torch.where`` rows and added in place into the results. Found with zero
    configuration; the recorded rows are the experts each token ran, and a replay after the gate changes forces them,
    in output and gradients as by hand."""
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    session = assert_exact(MistralMoeBlock(), x)
    assert session.names == ("feed_forward.gate",), session.names


# ----------------------------------------------------------------------- foundation-model-stack: MOEFeedForward
# foundation-model-stack/foundation-model-stack fms/modules/feedforward.py (``ConditionalFeedForward``,
# ``MOEFeedForward``): a bias-free ``gate`` Linear over the flattened tokens, a softmax over all experts, ``torch.topk``
# of the PROBABILITIES, renormalised IN PLACE (``expert_weights /= ...sum``); the experts are stacked ``w13``
# ``[E, 2I, D]`` / ``w2`` ``[E, D, I]`` Parameters of ``cond_ffn``, which takes the expert ids as an argument. Its
# ``moe_impl`` attribute picks the path: ``"gpt-fast"`` (the pure-PyTorch one, taken here; ``"fms"`` / ``"vllm"``
# call Triton ops) gathers each token's experts' weights by index (``self.w13[expert_indices]``) and runs them by
# ``einsum``; the ``[T, A, D]`` outputs are combined by ``einsum("tai,ta -> ti")``.
class FmsConditionalFeedForward(nn.Module):
    def __init__(self, num_experts: int, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))
        self.moe_impl = "gpt-fast"
        # (upstream's are set by the model's ``reset_parameters`` or loaded)
        nn.init.normal_(self.w13, std=0.2)
        nn.init.normal_(self.w2, std=0.2)

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        if self.moe_impl == "gpt-fast":
            w13_weights = self.w13[expert_indices].transpose(-1, -2)  # [T, A, D, D]
            w2_weights = self.w2[expert_indices]  # [T, A, D, D]
            x1, x3 = torch.einsum("ti, taio -> tao", x, w13_weights).chunk(2, dim=2)
            expert_outs = torch.einsum("tao, taio -> tai", (F.silu(x1) * x3), w2_weights)
            return expert_outs
        return x


class FmsMOEFeedForward(_Used):
    def __init__(self, num_experts: int, num_activated_experts: int, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_ffn = FmsConditionalFeedForward(num_experts, dim, intermediate_size)
        self.dim = dim
        self.num_activated_experts = num_activated_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S = x.shape[:2]
        x = x.view(-1, self.dim)
        scores = self.gate(x)  # [T, E]
        expert_weights = F.softmax(scores, dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        if self.forced is not None:
            expert_indices = self.forced
            expert_weights = F.softmax(scores, dim=-1).gather(-1, expert_indices)
        self.used = expert_indices
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)  # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)
        int_v1 = torch.einsum("tai,ta -> ti", expert_outs, expert_weights)
        int_v2 = int_v1.view(B, S, self.dim)
        return int_v2


class FmsMoEBlock(nn.Module):
    """fms's Mixtral block, its attention left out: ``x + ff_sub_layer(ff_ln(x))``."""

    def __init__(self, dim: int = 16, intermediate_size: int = 24, num_experts: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ff_ln = nn.LayerNorm(dim)
            self.ff_sub_layer = FmsMOEFeedForward(num_experts, 2, dim, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff_sub_layer(self.ff_ln(x))


@pytest.mark.reliability("silent replays")
def test_fms_moe_feed_forward_with_experts_gathered_by_index_replays_as_by_hand() -> None:
    """foundation-model-stack's ``MOEFeedForward``: a top-2 of the softmax probabilities renormalised in place, the
    expert ids handed to the experts module, which gathers each token's experts' stacked weights by index and runs
    them by ``einsum`` (its pure-PyTorch ``moe_impl``). Found with zero configuration; the recorded rows are the
    experts whose weights each token gathered, and a replay after the gate changes forces them, in output and
    gradients as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    session = assert_exact(FmsMoEBlock(), x)
    assert session.names == ("ff_sub_layer.gate",), session.names


# ----------------------------------------------------------------------- Fast-LLM: MixtureOfExpertMLP, top-k routing
# ServiceNow/Fast-LLM fast_llm/layers/decoder/mlp/mixture_of_experts.py (``MixtureOfExpertMLP._forward``,
# ``_topk_routing``, ``_add_shared_experts``, ``_apply_input_jitter``, ``_forward_looped``), with
# fast_llm/functional/triton/mlp.py (``mlp_autograd_looped``) and fast_llm/layers/common/auxiliary_loss.py
# (``AuxiliaryLoss``, ``z_loss``): the router input multiplied by a learned per-channel ``router_scale`` (and a
# constant ``router_input_scale``), a bias-free ``router`` Linear over the UNSHARED experts; in training with a
# gradient scale, the z-loss joined to the logits and the load-balancing loss to the scores by ``AuxiliaryLoss``
# (an autograd Function that returns its input as is and gives the loss its gradient in backward), and the logits
# jittered by ``uniform_(1 - eps, 1 + eps)``; ``torch.topk`` of the logits, a float32 softmax over the k; the shared
# experts (the last ids) put FIRST in every token's row of ids, with scores of one. The looped path: one-hot masks
# ``permute(2, 1, 0)``, each expert's ``torch.where`` rows run through its chunk of the stacked ``layer_1`` /
# ``layer_2`` weights (``[E * 2F, D]`` / ``[E * F, D]``, the second used transposed), times ``scores[column, row]``,
# ``+=`` into the output. (Upstream's ``@torch.compile`` on the jitter and the input scaling, and the weight-chunk
# gradient-buffer Functions, are left out: they change no value.)
class FastLLMAuxiliaryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, aux_loss: torch.Tensor, grad: float) -> torch.Tensor:  # type: ignore[override]
        ctx.grad = torch.full_like(aux_loss, grad)
        return scores

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        return grad_output, ctx.grad, None


def _fast_llm_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.logsumexp(logits, dim=-1) ** 2)


def _fast_llm_mlp(x: torch.Tensor, weight_1: torch.Tensor, weight_2_t: torch.Tensor) -> torch.Tensor:
    """``mlp_autograd`` of one expert, gated, SiLU, its second weight transposed: ``(silu(g) * u) @ w2_t``."""
    hidden = F.linear(x, weight_1)
    gate, up = hidden.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ weight_2_t


@dataclasses.dataclass
class FastLLMMoEMLPConfig:
    """The fields of Fast-LLM's ``MoEMLPConfig`` that the forward reads (``unshared_experts`` a property upstream)."""

    experts: int = 5
    shared_experts: int = 1
    experts_per_token: int = 2
    jitter_eps: float = 0.1
    z_loss_coefficient: float = 0.01
    auxiliary_loss_coefficient: float = 0.01
    router_input_scale: float = 0.5

    @property
    def unshared_experts(self) -> int:
        return self.experts - self.shared_experts


class FastLLMMixtureOfExpertMLP(_Used):
    def __init__(self, config: FastLLMMoEMLPConfig, hidden_size: int = 16, intermediate_size: int = 12) -> None:
        super().__init__()
        self._config = config
        self.router = nn.Linear(hidden_size, self._config.unshared_experts, bias=False)
        self.router_normalization = None
        self.router_scale = nn.Parameter(torch.ones(hidden_size))
        self._router_input_scale = self._config.router_input_scale
        self.layer_1 = nn.Linear(hidden_size, self._config.experts * 2 * intermediate_size, bias=False)
        self.layer_2 = nn.Linear(hidden_size, self._config.experts * intermediate_size, bias=False)
        self.pre_norm = None
        self.post_norm = None
        self.losses: dict[str, list[torch.Tensor]] = {"router_z_loss": [], "load_balancing_loss": []}

    def forward(self, input_: torch.Tensor, kwargs: dict[str, float | None]) -> torch.Tensor:
        """``BlockWithBias.forward`` (no bias returned: ``return_bias=False``)."""
        return self._forward(input_, kwargs)

    def _scale_router_input(self, x: torch.Tensor, scale: torch.Tensor | None, input_scale: float) -> torch.Tensor:
        if scale is not None:
            x = x * scale
        if input_scale != 1.0:
            x = x * input_scale
        return x

    def _forward(self, input_: torch.Tensor, kwargs: dict[str, float | None]) -> torch.Tensor:
        hidden_states = input_.flatten(0, -2)
        router_input = (
            self.router_normalization(hidden_states) if self.router_normalization is not None else hidden_states
        )
        router_input = self._scale_router_input(router_input, self.router_scale, self._router_input_scale)
        logits = self.router(router_input)
        if self._config.z_loss_coefficient > 0.0:
            is_training = (grad_scale := kwargs.get("grad_output")) is not None and self.training
            if is_training:
                loss = _fast_llm_z_loss(logits)
                self.losses["router_z_loss"].append(loss.detach())
                assert grad_scale is not None
                logits = FastLLMAuxiliaryLoss.apply(logits, loss, self._config.z_loss_coefficient * grad_scale)
        if self.training and self._config.jitter_eps > 0.0:
            logits = self._apply_input_jitter(logits)
        scores, top_experts = self._topk_routing(logits, kwargs.get("grad_output"))
        if self._config.shared_experts > 0:
            scores, top_experts = self._add_shared_experts(scores, top_experts)
        expert_input = self.pre_norm(hidden_states) if self.pre_norm is not None else hidden_states
        out = self._forward_looped(expert_input, scores, top_experts).view_as(input_)
        if self.post_norm is not None:
            out = self.post_norm(out)
        return out

    def _apply_input_jitter(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * torch.empty_like(logits).uniform_(1.0 - self._config.jitter_eps, 1.0 + self._config.jitter_eps)

    def _topk_routing(self, logits: torch.Tensor, grad_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, top_experts = torch.topk(logits, k=self._config.experts_per_token, dim=-1)
        if self.forced is not None:
            top_experts = self.forced
            top_logits = logits.gather(-1, top_experts)
        self.used = top_experts
        scores = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        if self.training and grad_scale is not None:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            mask = F.one_hot(top_experts, num_classes=self._config.unshared_experts).sum(dim=1)
            aux_loss = torch.sum(
                probs.flatten(0, -2).mean(dim=0) * mask.flatten(0, -2).mean(dim=0, dtype=torch.float32)
            )
            self.losses["load_balancing_loss"].append(aux_loss.detach())
            scores = FastLLMAuxiliaryLoss.apply(
                scores, aux_loss, self._config.unshared_experts * self._config.auxiliary_loss_coefficient * grad_scale
            )
        return scores, top_experts

    def _add_shared_experts(self, scores: torch.Tensor, top_experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared_experts = torch.arange(
            self._config.unshared_experts, self._config.experts, device=top_experts.device, dtype=top_experts.dtype
        )[None].repeat(top_experts.size(0), 1)
        top_experts = torch.cat((shared_experts, top_experts), dim=1)
        scores = torch.cat((scores.new_ones(scores.size(0), self._config.shared_experts), scores), dim=1)
        return scores, top_experts

    def _forward_looped(
        self, hidden_states: torch.Tensor, scores: torch.Tensor, top_experts: torch.Tensor
    ) -> torch.Tensor:
        scores = scores.to(hidden_states.dtype)
        expert_mask = F.one_hot(top_experts, num_classes=self._config.experts).permute(2, 1, 0)
        output = torch.zeros_like(hidden_states)
        weight_1_chunked = self.layer_1.weight.chunk(self._config.experts)
        weight_2_t_chunked = self.layer_2.weight.chunk(self._config.experts)
        for expert_idx, (weight_1_chunk, weight_2_t_chunk) in enumerate(
            zip(weight_1_chunked, weight_2_t_chunked, strict=True)
        ):
            row, column = torch.where(expert_mask[expert_idx])
            if column.size(0) > 0:
                output[column] += (
                    _fast_llm_mlp(hidden_states[column], weight_1_chunk, weight_2_t_chunk) * scores[column, row, None]
                )
        return output


class FastLLMBlock(nn.Module):
    """A Fast-LLM decoder block, its mixer left out: ``x + mlp(norm_2(x))``, the MLP given a gradient scale of one
    in training (the runner's ``grad_output`` keyword)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm_2 = nn.LayerNorm(16)
            self.mlp = FastLLMMixtureOfExpertMLP(FastLLMMoEMLPConfig())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm_2(x), {"grad_output": 1.0 if self.training else None})


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fast_llm_moe_with_shared_expert_slots_replays_as_by_hand(train: bool) -> None:
    """Fast-LLM's ``MixtureOfExpertMLP`` with top-k routing: the router input scaled by a learned per-channel scale,
    a top-2 of the logits over the four unshared experts softmaxed over the two, the shared expert's id put first in
    every row with a score of one, each expert's rows run through its chunk of the stacked weights. In training the
    logits are jittered (a uniform factor drawn at every forward) and the z-loss and load-balancing loss are joined
    to the logits and the scores by an identity autograd Function. Found with zero configuration; the recorded rows
    are the routed experts each token ran, and a replay after the router changes forces them, in output and
    gradients (the auxiliary losses' included) as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6))
    session = assert_exact(FastLLMBlock(), x, train=train, include="mlp.router")
    assert session.names == ("mlp.router",), session.names


@pytest.mark.reliability("false refusals")
def test_fast_llm_moe_is_found_with_zero_configuration() -> None:
    """The same block with no configuration: its ``router`` Linear scores the four unshared experts, whose weights
    (and the shared expert's) are chunks of the rows of the ``layer_1`` / ``layer_2`` Linears (no experts module,
    no per-expert tensor), the counts in the module's ``_config``. The router is found (its width is the
    ``unshared_experts`` of the block's own config, and the forward reads two weights of whole chunks of rows per
    expert) and replays as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6))
    session = assert_exact(FastLLMBlock(), x)
    assert session.names == ("mlp.router",), session.names


# ----------------------------------------------------------------------- lm-engine (dolomite-engine): MoE
# open-lm-engine/lm-engine lm_engine/hf_models/modeling_utils/mlp_blocks/moe.py (``MoE``, ``ParameterizedExperts``,
# ``bincount``, ``compute_bincount``) with activations/glu.py (``GLUActivation``): the gate a bias-free Linear
# over the flattened tokens; ``_get_topk`` takes ``max(dim=-1, keepdim=True)`` when ``top_k == 1`` and ``topk``
# otherwise, of the logits then a float softmax over the k (``normalized_topk``), or of the softmax of all the
# logits (not normalized). Without the ScatterMoE kernel: under ``no_grad`` the flattened ids ``sort()``-ed and
# counted by a ``torch.library.custom_op`` bincount (``uint32``), each token's row gathered at
# ``sorted_scattered_idxs // top_k``, the experts' stacked ``[E, out, in]`` weights run by ``F.linear`` on the
# ``split(expert_frequency.tolist())`` chunks, an interleaved SwiGLU (``u = x[..., 1::2]``, ``g = x[..., ::2]``)
# between, times the gathered gates, ``index_add`` into zeros. A shared expert beside, scaled by the sigmoid of its
# own one-output gate; in training a switch loss of the counts plus a z-loss, collected for the model's loss.
@torch.library.custom_op("moe_replay_tests39::lm_engine_bincount", mutates_args={})
def _lm_engine_bincount(x: torch.Tensor, minlength: int) -> torch.Tensor:
    return x.bincount(minlength=minlength).to(torch.uint32)


@_lm_engine_bincount.register_fake
def _(x: torch.Tensor, minlength: int) -> torch.Tensor:
    return torch.empty(minlength, device=x.device, dtype=torch.uint32)


class LmEngineGLUActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base_activation = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x[..., 1::2]
        g = x[..., ::2]
        return u * self.base_activation(g)


class LmEngineParameterizedExperts(nn.Module):
    def __init__(self, num_experts: int, in_features: int, out_features: int, std: float) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        nn.init.normal_(self.weight, mean=0, std=self.std)

    def forward(self, x: torch.Tensor, expert_frequency: torch.Tensor) -> torch.Tensor:
        chunks = x.split(expert_frequency.tolist(), dim=0)
        outs = [F.linear(chunks[i], self.weight[i]) for i in range(self.num_experts)]
        return torch.cat(outs, dim=0)


class LmEngineMoE(_Used):
    def __init__(
        self,
        hidden_size: int = 16,
        intermediate_size: int = 12,
        shared_intermediate_size: int = 12,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        normalized_topk: bool = True,
        std: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.hidden_size = hidden_size
        self.normalized_topk = normalized_topk
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.c_fc = LmEngineParameterizedExperts(num_experts, hidden_size, 2 * intermediate_size, std)
        self.c_fc_shared = nn.Linear(hidden_size, 2 * shared_intermediate_size, bias=False)
        self.act = LmEngineGLUActivation()
        self.c_proj = LmEngineParameterizedExperts(num_experts, intermediate_size, hidden_size, std)
        self.c_proj_shared = nn.Linear(shared_intermediate_size, hidden_size, bias=False)
        self.aux_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, _ = x.shape
        x = x.view(-1, self.hidden_size)
        router_logits, router_weights, selected_experts = self._compute_routing_weights(x)
        moe_output, expert_frequency = self._compute_experts(x, router_weights, selected_experts)
        x = moe_output + self._compute_shared_experts(x)
        x = x.reshape(batch_size, sequence_length, self.hidden_size)
        if self.training:
            probs = torch.softmax(router_logits, dim=-1)
            self.aux_losses.append(self._compute_switch_loss(router_logits, probs, expert_frequency))
        return x

    def _compute_routing_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.gate(x)
        if self.normalized_topk:
            router_weights, selected_experts = self._get_topk(router_logits)
            if self.forced is not None:
                selected_experts = self.forced
                router_weights = router_logits.gather(-1, selected_experts)
            router_weights = F.softmax(router_weights.float(), dim=-1)
            router_weights = router_weights.type_as(x)
        else:
            router_weights = F.softmax(router_logits.float(), dim=-1)
            router_weights = router_weights.type_as(x)
            probs = router_weights
            router_weights, selected_experts = self._get_topk(router_weights)
            if self.forced is not None:
                selected_experts = self.forced
                router_weights = probs.gather(-1, selected_experts)
        self.used = selected_experts
        return router_logits, router_weights, selected_experts

    def _compute_experts(
        self, x: torch.Tensor, router_weights: torch.Tensor, selected_experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sorted_expert_idxs, sorted_scattered_idxs = selected_experts.flatten().sort()
            expert_frequency = _lm_engine_bincount(sorted_expert_idxs, self.num_experts)
        T = x.size(0)
        batch_index = sorted_scattered_idxs // self.top_k
        router_weights = router_weights.flatten()
        batch_gates = router_weights[sorted_scattered_idxs]
        x = x[batch_index]
        x = self.c_fc(x=x, expert_frequency=expert_frequency)
        x = self.act(x)
        x = self.c_proj(x=x, expert_frequency=expert_frequency)
        x = x * batch_gates.unsqueeze(-1)
        zeros = torch.zeros((T, self.hidden_size), dtype=x.dtype, device=x.device)
        x = zeros.index_add(0, batch_index, x)
        return x, expert_frequency

    def _compute_shared_experts(self, x: torch.Tensor) -> torch.Tensor:
        g = self.shared_expert_gate(x)
        x = self.c_fc_shared(x)
        x = self.act(x)
        x = self.c_proj_shared(x)
        return x * F.sigmoid(g)

    def _get_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.top_k == 1:
            x, indices = x.max(dim=-1, keepdim=True)
        else:
            x, indices = x.topk(self.top_k, dim=-1)
        return x, indices

    def _compute_switch_loss(
        self, logits: torch.Tensor, probs: torch.Tensor, expert_frequency: torch.Tensor
    ) -> torch.Tensor:
        logits = logits.view(-1, logits.size(-1))
        probs = probs.view(-1, probs.size(-1))
        num_experts = logits.size(1)
        acc_probs = probs.sum(0)
        expert_frequency = expert_frequency.float()
        switch_loss = (
            num_experts * (F.normalize(acc_probs, p=1, dim=0) * F.normalize(expert_frequency, p=1, dim=0)).sum()
        )
        z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        loss = switch_loss + 0.1 * z_loss
        return loss.type_as(logits)


class LmEngineBlock(nn.Module):
    """lm-engine's decoder block, its attention left out: ``x + mlp_block(ln_2(x))``."""

    def __init__(self, num_experts_per_tok: int, normalized_topk: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.ln_2 = nn.LayerNorm(16)
            self.mlp_block = LmEngineMoE(num_experts_per_tok=num_experts_per_tok, normalized_topk=normalized_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp_block(self.ln_2(x))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("top_k", "normalized_topk", "train"),
    [(2, True, False), (1, False, True)],
    ids=["top2-of-logits-eval", "max-of-probs-train"],
)
def test_lm_engine_moe_with_bincount_split_experts_replays_as_by_hand(
    top_k: int, normalized_topk: bool, train: bool
) -> None:
    """lm-engine's ``MoE``: a top-2 of the logits softmaxed over the two, or a top-1 by ``max(keepdim=True)`` of the
    softmax probabilities; the ids sorted and counted by a custom-op bincount under ``no_grad``, the experts run on
    the ``split`` chunks of the gathered rows, weighted and ``index_add``-ed back; a sigmoid-gated shared expert
    beside (in training the switch loss of the counts collected too). Found with zero configuration; the recorded
    rows are the experts each token ran, and a replay after the gate changes forces them, in output and gradients
    as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8))
    session = assert_exact(LmEngineBlock(top_k, normalized_topk), x, train=train)
    assert session.names == ("mlp_block.gate",), session.names


# ----------------------------------------------------------------------- OLMo-core: MoELinearRouter (v1)
# allenai/OLMo-core src/olmo_core/nn/moe/router.py (``MoERouter``, ``MoELinearRouter``: ``jitter``, ``get_top_k``,
# ``forward``) with src/olmo_core/ops/moe.py (``batched_histc``): a flat ``[E * d]`` weight viewed as ``[E, d]``,
# the input jittered in training (``x * (low + rand_like(x) * (high - low))``), fp32 logits, a softmax (or
# ``sigmoid + 1e-7``) of them; ``get_top_k`` takes ``max(keepdim=True)`` for a top-1, ``torch.topk`` otherwise, or,
# with ``bias_gamma`` (DeepSeek-V3's auxiliary-loss-free balancing), the top-k of ``scores + score_bias`` (a buffer
# the trainer's ``post_batch`` moves) under ``no_grad`` and the unbiased scores gathered; an optional p-norm
# normalisation of the weights; the ids counted per expert by ``scatter_add_`` under ``no_grad``. (The auxiliary
# losses, off by default, are left off; the experts stand in for its grouped-GEMM MLP with a loop over them.)
def _olmo_batched_histc(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    hist = torch.zeros((*x.shape[:-1], num_classes), dtype=x.dtype, device=x.device)
    ones = torch.ones_like(x)
    hist.scatter_add_(-1, x, ones)
    return hist


class OlmoMoELinearRouter(_Used):
    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int,
        jitter_eps: float | None,
        bias_gamma: float | None,
        gating_function: str,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter_eps = jitter_eps
        self.normalize_expert_weights: float | None = None
        self.bias_gamma = bias_gamma
        self.gating_function = gating_function
        if self.bias_gamma is not None:
            # (zeros upstream, moved by ``post_batch`` in training: a bias as it stands after some batches)
            self.register_buffer("score_bias", torch.linspace(-0.05, 0.05, num_experts))
        else:
            self.register_buffer("score_bias", None)
        self.weight = nn.Parameter(torch.empty(self.num_experts * self.d_model))
        nn.init.trunc_normal_(self.weight, std=0.3, a=-0.9, b=0.9)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        if self.jitter_eps is None or not self.training:
            return x
        low = 1.0 - self.jitter_eps
        high = 1.0 + self.jitter_eps
        noise = torch.rand_like(x)
        return x * (low + noise * (high - low))

    def get_top_k(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bias_gamma is None:
            if self.top_k == 1:
                expert_weights, expert_indices = scores.max(dim=-1, keepdim=True)
            else:
                expert_weights, expert_indices = torch.topk(scores, self.top_k, dim=-1)
            if self.forced is not None:
                expert_indices = self.forced.view(expert_indices.shape)
                expert_weights = scores.gather(-1, expert_indices)
        else:
            assert self.score_bias is not None
            with torch.no_grad():
                _, expert_indices = torch.topk(scores + self.score_bias.unsqueeze(0), self.top_k, dim=-1)
            if self.forced is not None:
                expert_indices = self.forced.view(expert_indices.shape)
            expert_weights = scores.gather(-1, expert_indices)
        self.used = expert_indices.reshape(-1, self.top_k)
        return expert_weights, expert_indices

    def get_expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.view(self.num_experts, self.d_model).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.jitter(x)
        logits = self.get_expert_logits(x).float()
        if self.gating_function == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.gating_function == "sigmoid":
            scores = F.sigmoid(logits) + 1e-7
        else:
            raise NotImplementedError(self.gating_function)
        expert_weights, expert_indices = self.get_top_k(scores)
        if self.normalize_expert_weights is not None:
            expert_weights = expert_weights.div(
                torch.norm(expert_weights, p=self.normalize_expert_weights, dim=-1, keepdim=True)
            )
        with torch.no_grad():
            batched_batch_size_per_expert = _olmo_batched_histc(expert_indices, self.num_experts)
            batched_batch_size_per_expert = batched_batch_size_per_expert.sum(dim=1)
            batch_size_per_expert = batched_batch_size_per_expert.sum(dim=0)
        return expert_weights, expert_indices, batch_size_per_expert


class OlmoMoEMLP(nn.Module):
    """Stacked ``[E, d, h]`` / ``[E, h, d]`` SwiGLU experts, run by a loop over the experts on their rows."""

    def __init__(self, d_model: int, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * 0.2)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden_size, d_model) * 0.2)
        self.w3 = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * 0.2)

    def forward(self, x: torch.Tensor, expert_weights: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        x, w, idx = x.view(-1, x.shape[-1]), expert_weights.flatten(0, -2), expert_indices.flatten(0, -2)
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows, slots = torch.where(idx == e)
            h = F.silu(x[rows] @ self.w1[e]) * (x[rows] @ self.w3[e])
            out.index_add_(0, rows, (h @ self.w2[e]) * w[rows, slots, None].to(x.dtype))
        return out


class OlmoMoEBlock(nn.Module):
    """OLMo-core's ``MoEBase.forward`` in a residual block, attention left out: the router's weights, ids and
    counts, the experts run by them."""

    def __init__(self, top_k: int, jitter_eps: float | None, bias_gamma: float | None, gating_function: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.feed_forward_norm = nn.LayerNorm(16)
            self.router = OlmoMoELinearRouter(
                d_model=16,
                num_experts=4,
                top_k=top_k,
                jitter_eps=jitter_eps,
                bias_gamma=bias_gamma,
                gating_function=gating_function,
            )
            self.experts = OlmoMoEMLP(16, 24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.feed_forward_norm(x)
        expert_weights, expert_indices, _ = self.router(h)
        return x + self.experts(h, expert_weights, expert_indices).view_as(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("top_k", "jitter_eps", "bias_gamma", "gating_function", "train"),
    [(2, 0.1, 1e-4, "softmax", True), (1, None, None, "sigmoid", False)],
    ids=["score-bias-jitter-train", "sigmoid-max-eval"],
)
def test_olmo_core_linear_router_replays_as_by_hand(
    top_k: int, jitter_eps: float | None, bias_gamma: float | None, gating_function: str, train: bool
) -> None:
    """OLMo-core's ``MoELinearRouter`` (v1): a flat weight viewed as ``[E, d]``; in training its input jittered and a
    top-2 of the softmax scores plus a score-bias buffer under ``no_grad``, the unbiased scores gathered; or a top-1
    by ``max(keepdim=True)`` of ``sigmoid + 1e-7``; the ids counted by ``scatter_add_``. Found with zero
    configuration; the recorded rows are the experts each token ran, and a replay after the router changes forces
    them, in output and gradients as by hand."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(10))
    session = assert_exact(OlmoMoEBlock(top_k, jitter_eps, bias_gamma, gating_function), x, train=train)
    assert session.names == ("router",), session.names
