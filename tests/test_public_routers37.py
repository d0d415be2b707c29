"""MoE code of image-fusion research codebases (TC-MoA's task-customized mixture of adapters with one gate matrix per
fusion task, MoE-Fusion's mixture of local experts routing whole images and dispatching two modalities to two halves
of its experts, Rau's sparsely-gated MoE they copy), of nanotron's MoE example (a top-1 by ``max``, dropless bins) and
of LLaMA2-Accessory's sparse Mixtral (flat expert weights, a loss list on the class), with zero configuration where
they are found so (see ``test_public_routers33``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from tests.test_public_routers6 import _Used, assert_exact, assert_refused


class _SparseDispatcher:
    """davidmrau's ``SparseDispatcher`` as these repositories copy it: the rows sorted by expert (``nonzero`` of the
    ``[N, E]`` gates, sorted), split by the experts' counts, and combined in log space (the experts' outputs ``exp``ed,
    times their gates, ``index_add``ed, exact zeros set to ``eps`` and ``log``ed back). ``drop_below``: TC-MoA first
    sets the gates at or under ``1e-4`` to zero in place (an expert with such a gate takes no row)."""

    def __init__(self, num_experts: int, gates: torch.Tensor, drop_below: float | None = None) -> None:
        if drop_below is not None:
            gates[gates <= drop_below] = 0
        self._gates = gates
        self._num_experts = num_experts
        sorted_experts, index_sorted_experts = torch.nonzero(gates).sort(0)
        _, self._expert_index = sorted_experts.split(1, dim=1)
        self._batch_index = torch.nonzero(gates)[index_sorted_experts[:, 1], 0]
        self._part_sizes = (gates > 0).sum(0).tolist()
        gates_exp = gates[self._batch_index.flatten()]
        self._nonzero_gates = torch.gather(gates_exp, 1, self._expert_index)

    def dispatch(self, inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inp_exp = inp[self._batch_index].squeeze(1)
        return torch.split(inp_exp, self._part_sizes, dim=0)

    def expert_to_gates(self) -> tuple[torch.Tensor, ...]:
        return torch.split(self._nonzero_gates, self._part_sizes, dim=0)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    eps = 1e-10
    if x.shape[0] == 1:
        return torch.tensor([0], device=x.device, dtype=x.dtype)
    return x.float().var() / (x.float().mean() ** 2 + eps)


def _prob_in_top_k(
    k: int,
    normal: Normal,
    clean_values: torch.Tensor,
    noisy_values: torch.Tensor,
    noise_stddev: torch.Tensor,
    noisy_top_values: torch.Tensor,
) -> torch.Tensor:
    batch = clean_values.size(0)
    m = noisy_top_values.size(1)
    top_values_flat = noisy_top_values.flatten()
    threshold_positions_if_in = torch.arange(batch, device=clean_values.device) * m + k
    threshold_if_in = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in), 1)
    is_in = torch.gt(noisy_values, threshold_if_in)
    threshold_if_out = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in - 1), 1)
    prob_if_in = normal.cdf((clean_values - threshold_if_in) / noise_stddev)
    prob_if_out = normal.cdf((clean_values - threshold_if_out) / noise_stddev)
    return torch.where(is_in, prob_if_in, prob_if_out)


class _RauGate(_Used):
    """The noisy top-k gating that davidmrau's ``MoE.noisy_top_k_gating`` writes and these repositories copy: clean
    logits ``x @ w_gate``, in training plus Gaussian noise of std ``softplus(x @ w_noise) + noise_epsilon``, the
    ``topk`` of ``k + 1``, the first k softmaxed and scattered into dense ``[N, E]`` gates, and the load (in training
    the probability of each expert being in the top k, read from the (k+1)-th value; else the rows per expert)."""

    def __init__(self, num_experts: int, k: int) -> None:
        super().__init__()
        self.noisy_gating = True
        self.num_experts, self.k = num_experts, k
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    def _gating(
        self, x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, train: bool, noise_epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clean_logits = x @ w_gate
        noise_stddev = noisy_logits = None
        if self.noisy_gating and train:
            raw_noise_stddev = x @ w_noise
            noise_stddev = self.softplus(raw_noise_stddev) + noise_epsilon
            noisy_logits = clean_logits + (torch.randn_like(clean_logits) * noise_stddev)
            logits = noisy_logits
        else:
            logits = clean_logits
        top_logits, top_indices = logits.topk(min(self.k + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, : self.k]
        top_k_indices = top_indices[:, : self.k]
        if self.forced is not None:
            top_k_indices = self.forced.view(-1, self.k)
            top_k_logits = logits.gather(1, top_k_indices)
        self.used = top_k_indices
        top_k_gates = self.softmax(top_k_logits)
        zeros = torch.zeros_like(logits, requires_grad=True)
        gates = zeros.scatter(1, top_k_indices, top_k_gates)
        if self.noisy_gating and self.k < self.num_experts and train:
            assert noise_stddev is not None and noisy_logits is not None
            normal = Normal(self.mean, self.std)
            load = _prob_in_top_k(self.k, normal, clean_logits, noisy_logits, noise_stddev, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0)
        return gates, load


def _combine(dispatcher: _SparseDispatcher, gates: torch.Tensor, expert_outputs: list[torch.Tensor]) -> torch.Tensor:
    """``SparseDispatcher.combine`` of ``[rows, d]`` outputs: in log space."""
    stitched = torch.cat(expert_outputs, 0).exp().mul(dispatcher._nonzero_gates)
    zeros = torch.zeros(gates.size(0), expert_outputs[-1].size(1), requires_grad=True, device=stitched.device)
    combined = zeros.index_add(0, dispatcher._batch_index, stitched.float())
    combined[combined == 0] = np.finfo(float).eps
    return combined.log()


# ----------------------------------------------------------------------- TC-MoA: one gate matrix per fusion task
# YangSun22/TC-MoA model/MMOE.py (``MMoE``, ``SparseDispatcher``, ``MLP``) and model/TC_MoA.py
# (``BiMixtureOfAdapters``): a task-customized mixture of adapters for image fusion (visible-infrared, multi-exposure,
# multi-focus). The gate's ``w_gate`` / ``w_noise`` are ``[task_num, d, E]`` parameters, the slice of the task index the
# caller passes used (``x @ self.w_gate[task_index]``); noisy logits in training (``softplus`` std plus ``1e-1``), the
# ``topk`` of ``k + 1``, the first k softmaxed and scattered into ``[N, E]`` gates; the dispatcher first zeroes the
# gates at or under ``1e-4`` in place, then sorts the rows by expert and combines in log space. The adapter concatenates
# the two sources' tokens, normalises and reduces them (``dimReduction``), routes every token, splits the result in two
# prompts, averages each over its channels (``AdaptiveAvgPool1d``), and scales each source by its sigmoid, plus a
# per-(task, source) shift (upstream a Python list of ``.cuda()`` parameters; here a ``ParameterList``).
class TCMoAMMoE(_RauGate):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        num_experts: int,
        hidden_size: int,
        k: int = 2,
        task_num: int = 3,
    ) -> None:
        super().__init__(num_experts, k)
        self.task_num = task_num
        self.experts = nn.ModuleList([TCMoAMLP(input_size, output_size, hidden_size) for _ in range(num_experts)])
        self.w_gate = nn.Parameter(torch.zeros(task_num, input_size, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(task_num, input_size, num_experts))

    def noisy_top_k_gating(
        self, x: torch.Tensor, train: bool, task_index: int, noise_epsilon: float = 1e-1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gating(x, self.w_gate[task_index], self.w_noise[task_index], train, noise_epsilon)

    def forward(self, x: torch.Tensor, task_index: int, loss_coef: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        gates, load = self.noisy_top_k_gating(x, self.training, task_index)
        importance = gates.sum(0)
        loss = (_cv_squared(importance) + _cv_squared(load)) * loss_coef
        dispatcher = _SparseDispatcher(self.num_experts, gates, drop_below=1e-4)
        expert_inputs = dispatcher.dispatch(x)
        expert_outputs = [self.experts[i](expert_inputs[i]) for i in range(self.num_experts)]
        return _combine(dispatcher, gates, expert_outputs), loss


class TCMoAMLP(nn.Module):
    def __init__(self, input_size: int, output_size: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class TCMoABiMixtureOfAdapters(nn.Module):
    def __init__(self, dim: int = 64, task_num: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.dimReduction = nn.Linear(dim * 2, dim // 4, bias=False)
        self.MoA = TCMoAMMoE(dim // 4, dim // 4, 4, dim // 32, k=2, task_num=task_num)
        self.modal_shifts = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(2 * task_num)])
        self.MoA_sigmoid = nn.Sigmoid()
        self.norm1 = nn.LayerNorm(dim * 2)
        self.norm2 = nn.LayerNorm(dim // 4)
        self.gap = nn.AdaptiveAvgPool1d(1)
        for layer in self.modal_shifts:
            nn.init.normal_(layer, std=0.02)
        nn.init.xavier_uniform_(self.dimReduction.weight)
        # (upstream's gate starts at zero and is trained; a trained gate stands in here)
        nn.init.normal_(self.MoA.w_gate)
        nn.init.normal_(self.MoA.w_noise, std=0.1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, task_index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.cat([x, t], dim=-1)
        B, N, C = x.shape
        y = self.norm1(y)
        y = self.dimReduction(y)
        y = self.norm2(y)
        y = y.view(B * N, C // 4)
        y, aux_loss = self.MoA(y, task_index)
        y = y.view(B, N, C // 4)
        prompt_x, prompt_t = torch.chunk(y, 2, dim=-1)
        prompt_x = self.MoA_sigmoid(self.gap(prompt_x))
        prompt_t = self.MoA_sigmoid(self.gap(prompt_t))
        out_x = torch.add(prompt_x * x, self.modal_shifts[task_index * 2 + 0], alpha=1)
        out_t = torch.add(prompt_t * t, self.modal_shifts[task_index * 2 + 1], alpha=1)
        return out_x, out_t, prompt_x, prompt_t, aux_loss


class TCMoAFusion(nn.Module):
    """One adapter over two sources' tokens (the input's two halves), for the fusion task ``task_index``."""

    def __init__(self, task_index: int) -> None:
        super().__init__()
        self.task_index = task_index
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.adapter = TCMoABiMixtureOfAdapters()

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        x, t = xt.chunk(2, dim=-1)
        out_x, out_t, _, _, _ = self.adapter(x, t, self.task_index)  # (the loss left out: see ``MoEFusionEncoder``)
        return torch.cat([out_x, out_t], dim=-1)


def _line_of(cls: type, text: str) -> int:
    """The line of this file where ``cls``'s source holds ``text`` (for a refusal that names where it found a cut)."""
    lines, first = inspect.getsourcelines(cls)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_tc_moa_gate_cutting_small_weights_after_its_top_k_is_refused(train: bool) -> None:
    """TC-MoA's adapter gate as written: one ``[d, E]`` slice of a ``[task_num, d, E]`` gate per fusion task, the
    ``topk`` of ``k + 1`` with the first k softmaxed, and then the dispatcher's ``gates[gates <= 1e-4] = 0``: a
    recomputed weight that small drops its expert after the decision, so a replay could run other experts than the
    recorded ones. Named (the task-sliced gate is not found with zero configuration), it is refused with a
    ``MoEReplayError`` that names that cut, the model left as it was."""
    xt = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    cut = _line_of(_SparseDispatcher, "gates[gates <= drop_below] = 0")
    match = rf"chooses again from the current scores \(at [^)]*test_public_routers37\.py:{cut}\b"
    assert_refused(TCMoAFusion(task_index=2), xt, match, train=train, include=TCMoAMMoE)


# ----------------------------------------------------------------------- MoE-Fusion: whole images, two modalities
# SunYM2020/MoE-Fusion mmdet/models/bbox_heads/MoLE.py (``MoELocal``, ``SparseDispatcher``, ``ConvLayer``) and
# MoE_fusion_head.py (``Encoder.atten_downsample``, ``Encoder.forward``): infrared-visible fusion. The encoder splits
# each modality's features by an attention map into foreground and background, concatenates the two modalities of
# each, and downsamples them (``F.interpolate``, a quarter) into the flat ``x_ds`` that the gate reads: one route per
# IMAGE. ``MoELocal``'s gate is davidmrau's noisy top-k (``w_gate`` / ``w_noise`` ``[ds, E]`` parameters, noise in
# training, ``topk`` of ``k + 1``, the first k softmaxed); the dispatcher sends the visible features to every expert
# and the infrared ones too, but the first half of the experts run the visible rows and the second half the
# infrared ones; their outputs are ``cat``ed in that order, ``exp``ed, times the gates, ``index_add``ed and ``log``ed
# back. Two such layers (foreground, background), the fusions concatenated. The module sets ``self.training`` from
# its ``trainingmode`` argument at construction (``True`` upstream); ``train()`` / ``eval()`` set it after.
class MoEFusionConvLayer(nn.Module):
    def __init__(self, input_size: int, output_size: int, hidden_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_size, hidden_size, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden_size, output_size, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class MoEFusionLocal(_RauGate):
    def __init__(
        self, ds_inputsize: int, input_size: int, output_size: int, num_experts: int, hidden_size: int, k: int = 2
    ) -> None:
        super().__init__(num_experts, k)
        self.training = True
        self.experts = nn.ModuleList(
            [MoEFusionConvLayer(input_size, output_size, hidden_size) for _ in range(num_experts)]
        )
        self.w_gate = nn.Parameter(torch.zeros(ds_inputsize, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(ds_inputsize, num_experts))

    def noisy_top_k_gating(
        self, x: torch.Tensor, train: bool, noise_epsilon: float = 1e-2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gating(x, self.w_gate, self.w_noise, train, noise_epsilon)

    def forward(
        self, x_ds: torch.Tensor, x_rgb: torch.Tensor, x_tir: torch.Tensor, loss_coef: float = 1e-2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates, load = self.noisy_top_k_gating(x_ds, self.training)
        importance = gates.sum(0)
        loss = (_cv_squared(importance) + _cv_squared(load)) * loss_coef
        dispatcher = _SparseDispatcher(self.num_experts, gates)
        expert_inputs_rgb = dispatcher.dispatch(x_rgb)
        expert_inputs_tir = dispatcher.dispatch(x_tir)
        half = self.num_experts // 2
        expert_outputs_rgb = [self.experts[i](expert_inputs_rgb[i]) for i in range(half)]
        expert_outputs_tir = [self.experts[i](expert_inputs_tir[i]) for i in range(half, self.num_experts)]
        stitched_rgb = torch.cat(expert_outputs_rgb, 0).exp()
        stitched_tir = torch.cat(expert_outputs_tir, 0).exp()
        stitched = torch.cat((stitched_rgb, stitched_tir), 0)
        stitched = stitched.mul(dispatcher._nonzero_gates.unsqueeze(1).unsqueeze(1))
        out = expert_outputs_rgb[-1]
        zeros = torch.zeros(
            (gates.size(0), out.size(1), out.size(2), out.size(3)), requires_grad=True, device=stitched.device
        )
        combined = zeros.index_add(0, dispatcher._batch_index, stitched.float())
        combined[combined == 0] = np.finfo(float).eps
        return combined.log(), loss


class MoEFusionEncoder(nn.Module):
    """The encoder's MoE part over one conv stem per modality (upstream's dense convolutions before it left out);
    the input's channels: visible, infrared, and the logits of the attention map (upstream the detector's). Of the
    two layers, the foreground one (the background one, its twin on the complementary features, left out: the
    background features are passed on as they are)."""

    def __init__(self, channels: int = 2, size: int = 8) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv_r = nn.Conv2d(1, channels, 3, 1, 1)
            self.conv_i = nn.Conv2d(1, channels, 3, 1, 1)
            ds = 2 * channels * (size // 4) ** 2
            self.moe_fg = MoEFusionLocal(ds, channels, channels, num_experts=4, hidden_size=2, k=2)
            nn.init.normal_(self.moe_fg.w_gate)  # (upstream's starts at zero and is trained)
            nn.init.normal_(self.moe_fg.w_noise, std=0.1)

    @staticmethod
    def atten_downsample(
        x1: torch.Tensor, x2: torch.Tensor, att: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x1_fg, x1_bg, x2_fg, x2_bg = x1 * att, x1 * (1 - att), x2 * att, x2 * (1 - att)
        x12_channel_fg = torch.cat((x1_fg, x2_fg), dim=1)
        x12_channel_bg = torch.cat((x1_bg, x2_bg), dim=1)
        xc_fg_ds = F.interpolate(
            x12_channel_fg, scale_factor=0.25, mode="bilinear", align_corners=True, recompute_scale_factor=True
        )
        xc_bg_ds = F.interpolate(
            x12_channel_bg, scale_factor=0.25, mode="bilinear", align_corners=True, recompute_scale_factor=True
        )
        return x1_fg, x1_bg, x2_fg, x2_bg, xc_fg_ds, xc_bg_ds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x_r = F.relu(self.conv_r(images[:, 0:1]))
        x_i = F.relu(self.conv_i(images[:, 1:2]))
        att = torch.sigmoid(images[:, 2:3])
        xr_fg, xr_bg, xi_fg, xi_bg, xc_fg_ds, xc_bg_ds = self.atten_downsample(x_r, x_i, att)
        # (the load-balancing loss, returned beside the fusion upstream, is left out of the output: in training it
        # reads the (k+1)-th noisy value, which a replay gives as the best expert left)
        xf_fg, _ = self.moe_fg(xc_fg_ds.view(xc_fg_ds.shape[0], -1), xr_fg, xi_fg)
        return torch.cat((xf_fg, xr_bg + xi_bg), dim=1)


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.reliability("silent replays")
def test_moe_fusion_local_experts_routing_whole_images_replays_as_by_hand() -> None:
    """MoE-Fusion's mixture of local experts at inference: the gate reads a downsampled, flattened copy of each
    image's two modalities (one route per image), top-k of k + 1; the visible features go to the first half of the
    experts and the infrared ones to the second, combined in log space (the foreground layer).
    Found with zero configuration; the recorded rows are the experts each image ran, and a replay after the gates
    change forces them, in output and gradients as by hand."""
    session = assert_exact(MoEFusionEncoder(), _images())
    assert session.names == ("moe_fg",), session.names


# ----------------------------------------------------------------------- Rau's dispatcher before ReLU experts
# davidmrau/mixture-of-experts moe.py (``MoE``, ``SparseDispatcher``, ``MLP``): the experts are ``fc1``, ``ReLU``,
# ``fc2`` and a softmax; the rows each expert runs are gathered by ``nonzero`` of the dense ``[N, E]`` gates (the
# top-k softmax scattered), sorted by expert, and combined in log space. With the decision held, the rows an expert
# gets are fixed (a softmax weight is never zero), and an expert's ReLU reads its own units of those rows, not the
# scores: the rows indexed by integers made from the gates carry none of their values, so the ReLU is no later choice.
class RauMLP(nn.Module):
    def __init__(self, input_size: int, output_size: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)
        self.relu = nn.ReLU()
        self.soft = nn.Softmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.soft(self.fc2(self.relu(self.fc1(x))))


class RauSparseMoE(_RauGate):
    def __init__(self, d: int = 16, num_experts: int = 4, hidden_size: int = 8, k: int = 2) -> None:
        super().__init__(num_experts, k)
        self.experts = nn.ModuleList([RauMLP(d, d, hidden_size) for _ in range(num_experts)])
        self.w_gate = nn.Parameter(torch.zeros(d, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d, num_experts))
        nn.init.normal_(self.w_gate)  # (upstream's starts at zero and is trained)

    def forward(self, x: torch.Tensor, loss_coef: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
        gates, load = self._gating(x, self.w_gate, self.w_noise, self.training, 1e-2)
        loss = (_cv_squared(gates.sum(0)) + _cv_squared(load)) * loss_coef
        dispatcher = _SparseDispatcher(self.num_experts, gates)
        expert_inputs = dispatcher.dispatch(x)
        expert_outputs = [self.experts[i](expert_inputs[i]) for i in range(self.num_experts)]
        return _combine(dispatcher, gates, expert_outputs), loss


class RauModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.moe = RauSparseMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.moe(x)
        return y


@pytest.mark.reliability("false refusals")
def test_relu_experts_fed_by_a_sparse_dispatcher_replay_as_by_hand() -> None:
    """Rau's sparsely-gated MoE (its ReLU experts fed by its ``SparseDispatcher``): with the decision held, an
    expert's rows are fixed and its ReLU reads its own units, so the replay is exact (as it is with GELU experts).
    It was refused, "its forward chooses again from the current scores (at" the experts' ReLU); MoE-Fusion's local
    experts in training and TC-MoA's gate without its cut replay too (see ``test_review72``)."""
    session = assert_exact(RauModel(), torch.randn(10, 16, generator=torch.Generator().manual_seed(3)))
    assert session.names == ("moe",), session.names


# ----------------------------------------------------------------------- nanotron: a top-1 by max, dropless bins
# huggingface/nanotron examples/moe/moe.py (``dMoE``, ``LearnedRouter``, ``ParallelDroplessMLP.forward_once``; adapted
# there from megablocks): the router's bias-free ``layer`` Linear, a float32 softmax, and with one expert per token
# ``scores.max(dim=-1, keepdim=True)`` (else ``torch.topk`` of the scores), the weights never renormalised, the ids
# cast with ``.int()``. The dropless MLP sorts the flat ids (megablocks' radix ``ops.sort``, stable), counts them
# (``ops.histogram``), takes the bins' ends by a cumulative sum, gathers each slot's token, runs each expert on its
# contiguous bin and scatters the rows back times their weights. The block-sparse kernels (``stk``, CUDA) are run
# here as one dense matmul per bin, GELU between (megablocks' default activation).
class NanotronLearnedRouter(_Used):
    def __init__(self, hidden_size: int, moe_num_experts: int, num_experts_per_tok: int) -> None:
        super().__init__()
        self.num_experts_per_tok = num_experts_per_tok
        self.layer = nn.Linear(hidden_size, moe_num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.layer(x)
        scores = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        if self.num_experts_per_tok == 1:
            expert_weights, expert_indices = scores.max(dim=-1, keepdim=True)
        else:
            expert_weights, expert_indices = torch.topk(scores, self.num_experts_per_tok, dim=-1)
        if self.forced is not None:
            expert_indices = self.forced.view(-1, self.num_experts_per_tok)
            expert_weights = scores.gather(-1, expert_indices)
        self.used = expert_indices
        return scores, expert_weights, expert_indices.int()


class NanotronDroplessMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, num_experts_per_tok: int) -> None:
        super().__init__()
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate_size, hidden_size) / hidden_size**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, intermediate_size, hidden_size) / intermediate_size**0.5)

    def forward_once(self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            bin_ids, indices = torch.sort(top_experts.long(), stable=True)
            tokens_per_expert = torch.bincount(top_experts.long(), minlength=self.num_experts)
            bins = torch.cumsum(tokens_per_expert, 0)
        rows = x[indices // self.num_experts_per_tok]
        out = torch.zeros_like(rows)
        start = 0
        for e, end in enumerate(bins.tolist()):
            if end > start:
                out[start:end] = F.gelu(rows[start:end] @ self.w1[e].t()) @ self.w2[e]
            start = end
        scattered = torch.zeros_like(x)
        weighted = out * expert_weights[indices].unsqueeze(-1).to(out.dtype)
        return scattered.index_add(0, indices // self.num_experts_per_tok, weighted)

    def forward(
        self, x: torch.Tensor, scores: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_once(x, expert_weights.flatten(), top_experts.flatten())


class NanotronDMoE(nn.Module):
    def __init__(self, num_experts_per_tok: int, hidden_size: int = 16, num_experts: int = 4) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gate = NanotronLearnedRouter(hidden_size, num_experts, num_experts_per_tok)
        self.experts = NanotronDroplessMLP(hidden_size, 2 * hidden_size, num_experts, num_experts_per_tok)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, _ = x.size()
        x = x.view(-1, self.hidden_size)
        scores, expert_weights, top_experts = self.gate(x)
        x = self.experts(x, scores, expert_weights, top_experts)
        return x.reshape(batch_size, sequence_length, -1)


class NanotronBlock(nn.Module):
    def __init__(self, num_experts_per_tok: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(16)
            self.mlp = NanotronDMoE(num_experts_per_tok)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("k", [1, 2], ids=["max", "topk"])
def test_nanotron_learned_router_with_dropless_bins_replays_as_by_hand(k: int) -> None:
    """nanotron's ``LearnedRouter``: a float32 softmax, one expert by ``max(keepdim=True)`` or two by ``topk``,
    weights not renormalised, ids cast to int32, and a dropless MLP that sorts the flat ids, counts them into bins
    and runs each expert on its bin. Found with zero configuration; the recorded rows are the experts each token ran,
    and a replay after the router changes forces them, in output and gradients as by hand."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(7))
    session = assert_exact(NanotronBlock(k), x)
    assert session.names == ("mlp.gate",), session.names


# ----------------------------------------------------------------------- LLaMA2-Accessory: flat experts, loss list
# Alpha-VLLM/LLaMA2-Accessory accessory/model/LLM/mixtral_sparse.py (``MoE``, ``TransformerBlock._forward_ffn``,
# ``Transformer.forward``): SPHINX-MoE's sparse Mixtral block. The block owns the bias-free ``gate`` Linear and the
# experts as three flat ``[E * F, d]`` parameters (``w1`` / ``w3`` / ``w2``, expert e's rows ``e * F`` to
# ``(e + 1) * F``); a float softmax, ``torch.topk`` of the probabilities, the ids flattened, sorted and counted into
# bins (megablocks' ``ops.sort`` / ``ops.histogram`` / ``inclusive_cumsum``); in training a load-balancing loss of the
# probabilities and the counts appended to a CLASS-level list (``MoE.LOAD_BALANCING_LOSSES``, cleared by the model's
# forward, averaged after it); the top-k values renormalised IN PLACE (``weights /= weights.sum(...)``), then the
# tokens gathered per bin, a SwiGLU per expert (block-sparse ``stk`` products upstream, one dense product per bin
# here) and scattered back times their weights.
class AccessorySparseMoE(_Used):
    LOAD_BALANCING_LOSSES: ClassVar[list[torch.Tensor]] = []

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.hidden_dim_per_partition = hidden_dim
        self.w1 = nn.Parameter(torch.empty(self.hidden_dim_per_partition * num_experts, dim))
        self.w2 = nn.Parameter(torch.empty(self.hidden_dim_per_partition * num_experts, dim))
        self.w3 = nn.Parameter(torch.empty(self.hidden_dim_per_partition * num_experts, dim))
        for w in (self.w1, self.w2, self.w3):
            nn.init.kaiming_uniform_(w.data, a=math.sqrt(5))
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts_per_tok = num_experts_per_tok

    def _load_balancing_loss(self, expert_scores: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        n_tokens = expert_scores.shape[0]
        assert not tokens_per_expert.requires_grad
        scores = expert_scores.mean(dim=0)
        scale = self.num_experts / (n_tokens * self.num_experts_per_tok)
        return scale * torch.dot(tokens_per_expert.to(scores), scores)

    def indices_and_bins(
        self, selected_experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        selected_experts = selected_experts.int()
        bin_ids, indices = torch.sort(selected_experts, stable=True)
        tokens_per_expert = torch.bincount(selected_experts, minlength=self.num_experts)
        bins = torch.cumsum(tokens_per_expert, 0)
        return indices, bin_ids, bins, tokens_per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape
        x = x.view(-1, input_shape[-1])
        x_for_score, x_for_ffn = x, x
        gate_logits = self.gate(x_for_score)
        all_probs = F.softmax(gate_logits, dim=1, dtype=torch.float)
        weights, selected_experts = torch.topk(all_probs, self.num_experts_per_tok, dim=-1)
        if self.forced is not None:
            selected_experts = self.forced.view(-1, self.num_experts_per_tok)
            weights = all_probs.gather(-1, selected_experts)
        self.used = selected_experts
        selected_experts = selected_experts.flatten()
        indices, _, bins, tokens_per_expert = self.indices_and_bins(selected_experts)
        if self.training:
            AccessorySparseMoE.LOAD_BALANCING_LOSSES.append(self._load_balancing_loss(all_probs, tokens_per_expert))
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.flatten().to(x_for_score.dtype)
        rows = x_for_ffn[indices.long() // self.num_experts_per_tok]
        out = torch.zeros_like(rows)
        f, start = self.hidden_dim_per_partition, 0
        for e, end in enumerate(bins.tolist()):
            if end > start:
                w1, w2, w3 = (w[e * f : (e + 1) * f] for w in (self.w1, self.w2, self.w3))
                h = rows[start:end]
                out[start:end] = (F.silu(h @ w1.t()) * (h @ w3.t())) @ w2
            start = end
        y = torch.zeros_like(x_for_ffn).index_add(
            0, indices.long() // self.num_experts_per_tok, out * weights[indices.long()].unsqueeze(-1)
        )
        return y.view(*input_shape)


class AccessoryModel(nn.Module):
    """A block's feed-forward half (attention left out) and the model's use of the class-level list."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norms = nn.ModuleList([nn.LayerNorm(16)])
            self.feed_forwards = nn.ModuleList([AccessorySparseMoE(16, 8, 4, 2)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        AccessorySparseMoE.LOAD_BALANCING_LOSSES.clear()
        for norm, feed_forward in zip(self.norms, self.feed_forwards, strict=True):
            h = h + feed_forward(norm(h))
        if self.training:  # (upstream returns it beside the logits; kept out of the output here)
            losses = AccessorySparseMoE.LOAD_BALANCING_LOSSES
            self.load_balancing = float(torch.stack(losses).mean().detach()) if losses else 0.0
        return h


def _accessory_tokens() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_llama2_accessory_sparse_moe_with_flat_experts_replays_as_by_hand(train: bool) -> None:
    """LLaMA2-Accessory's sparse Mixtral block: the gate beside flat ``[E * F, d]`` expert weights, a top-k of the
    float softmax renormalised in place, sorted bins, and in training a loss appended to a class-level list. Named
    by its gates, the recorded rows are the experts each token ran, and a replay after the gates change forces them,
    in output and gradients as by hand. (The change is moderate: forced experts whose probabilities both underflow
    to zero make the in-place renormalisation ``0 / 0``, NaN by hand and in the replay alike.)"""
    session = assert_exact(
        AccessoryModel(), _accessory_tokens(), train=train, change=1.0, include="feed_forwards.*.gate"
    )
    assert session.names == ("feed_forwards.0.gate",), session.names


@pytest.mark.reliability("false refusals")
def test_llama2_accessory_sparse_moe_with_flat_experts_is_found_with_zero_configuration() -> None:
    """The same block with no configuration: its gate Linear scores ``num_experts`` experts whose weights are rows
    of three flat ``[E * F, d]`` parameters of the block (no experts module, no per-expert tensor), beside
    ``num_experts`` / ``num_experts_per_tok`` attributes. The gate is found (the block declares its width as its
    expert count, and its forward reads flat weights of whole blocks of rows per expert) and replays as by hand."""
    session = assert_exact(AccessoryModel(), _accessory_tokens(), change=1.0)
    assert session.names == ("feed_forwards.0.gate",), session.names
