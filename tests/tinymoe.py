"""A tiny configurable MoE for property and fault tests.

Each layer is a block with one standalone router of its own configuration (E, k, score
function, groups, how the decision call is written) and a table of expert embeddings:
``x + sum_j w_j * emb[idx_j]``, so the output depends on both the chosen experts and
their weights. Every router can also be run with *forced* indices (``-1`` rows route
natively): that path is a hand-written gather that never calls moe_replay, the
reference a replay must match bit for bit.

Faults are injected at named points of the forward (``Fault``), with any exception type.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: Router score functions, as real routers write them.
SCORES = ("softmax_topk", "sigmoid_topk", "topk_softmax", "grouped", "argmax", "max")
#: How a top-k decision call is spelled (all must be intercepted the same way).
TOPK_CALLS = ("torch", "method", "kwargs", "unsorted", "posdim")
#: Where a fault can be injected, per layer.
FAULT_POINTS = ("before_router", "in_router_before_decision", "in_router_after_decision", "in_experts")


@dataclass(frozen=True)
class RouterSpec:
    """One router's configuration."""

    num_experts: int
    top_k: int
    score: str = "softmax_topk"
    call: str = "torch"
    keepdim: bool = False  # top-1 routers: argmax/max with keepdim
    n_group: int = 1  # grouped: groups of experts, topk_group of them kept
    topk_group: int = 1
    weights_from_topk: bool = False  # grouped: DeepSeek-V2 weights from the masked top-k values
    mask_with_where: bool = False  # grouped: torch.where instead of masked_fill
    normalize: bool = True

    def __post_init__(self) -> None:
        assert self.score in SCORES and self.call in TOPK_CALLS
        assert 1 <= self.top_k <= self.num_experts
        if self.score in ("argmax", "max"):
            assert self.top_k == 1
        if self.score == "grouped":
            assert self.num_experts % self.n_group == 0 and 1 <= self.topk_group <= self.n_group
            assert self.top_k <= self.topk_group * (self.num_experts // self.n_group)

    @property
    def ambiguous(self) -> bool:
        """A grouped router whose group-score top-k has the decision's signature too."""
        if self.score != "grouped":
            return False
        per_group = self.num_experts // self.n_group
        inner = per_group == self.num_experts and min(2, per_group) == self.top_k
        groups = self.n_group == self.num_experts and self.topk_group == self.top_k
        return inner or groups


@dataclass
class Fault:
    """Raise ``exc`` at ``point`` of layer ``layer`` (once per ``raise_`` call while armed)."""

    layer: int
    point: str
    exc: BaseException = field(default_factory=lambda: RuntimeError("injected fault"))
    armed: bool = True

    def check(self, layer: int, point: str) -> None:
        if self.armed and layer == self.layer and point == self.point:
            raise self.exc


#: the fault armed in each router, held outside it: an injected fault stands for an error deep inside the forward,
#: not for a setting of the router (read from its code, a changed one has its decision established again)
_ARMED: weakref.WeakKeyDictionary[nn.Module, Fault] = weakref.WeakKeyDictionary()


class TinyRouter(nn.Module):
    """A standalone router; returns (weights ``[..., k]``, indices ``[..., k]``)."""

    def __init__(self, spec: RouterSpec, hidden: int, dtype: torch.dtype, generator: torch.Generator) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.weight = nn.Parameter(torch.randn(spec.num_experts, hidden, generator=generator).to(dtype))
        self.register_buffer("bias", (0.1 * torch.randn(spec.num_experts, generator=generator)).to(dtype))
        self.layer = 0

    def _topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        call = self.spec.call
        if call == "torch":
            out = torch.topk(x, k, dim=-1)
        elif call == "method":
            out = x.topk(k)
        elif call == "kwargs":
            out = torch.topk(x, k=k, dim=-1, largest=True, sorted=True)
        elif call == "unsorted":
            out = torch.topk(x, k, dim=-1, sorted=False)
        else:  # a positive dim
            out = x.topk(k, dim=x.dim() - 1)
        return out[0], out[1]

    def _decide(self, scores: torch.Tensor, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the decision, or the gather at ``forced`` (-1: native)."""
        fault = _ARMED.get(self)
        if fault is not None:
            fault.check(self.layer, "in_router_before_decision")
        spec = self.spec
        if spec.score == "argmax":
            idx = torch.argmax(scores, dim=-1, keepdim=spec.keepdim)
            idx = idx if spec.keepdim else idx.unsqueeze(-1)
            values = scores.gather(-1, idx)
        elif spec.score == "max":
            values, idx = torch.max(scores, dim=-1, keepdim=spec.keepdim)
            if not spec.keepdim:
                values, idx = values.unsqueeze(-1), idx.unsqueeze(-1)
        else:
            values, idx = self._topk(scores, spec.top_k)
        if forced is not None:
            idx = torch.where(forced < 0, idx, forced)
            values = scores.gather(-1, idx)
        if fault is not None:
            fault.check(self.layer, "in_router_after_decision")
        return values, idx

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        logits = F.linear(x, self.weight)
        if spec.score in ("softmax_topk", "argmax", "max"):
            probs = logits.softmax(dim=-1)
            w, idx = self._decide(probs, forced)
            if spec.normalize and spec.top_k > 1:
                w = w / w.sum(dim=-1, keepdim=True)
            return w, idx
        if spec.score == "sigmoid_topk":
            w, idx = self._decide(torch.sigmoid(logits), forced)
            return (w / (w.sum(dim=-1, keepdim=True) + 1e-6) if spec.normalize else w), idx
        if spec.score == "topk_softmax":
            v, idx = self._decide(logits, forced)
            return v.softmax(dim=-1), idx
        return self._grouped(logits, forced)

    def _grouped(self, logits: torch.Tensor, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3 (bias for selection, weights gathered) or V2 (weights = masked top-k values)."""
        spec = self.spec
        scores = torch.sigmoid(logits)
        choice = scores if spec.weights_from_topk else scores.detach() + self.bias
        lead = choice.shape[:-1]
        grouped = choice.reshape(*lead, spec.n_group, spec.num_experts // spec.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        group_idx = torch.topk(group_scores, spec.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(-1, group_idx, 1.0)
        keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape) > 0
        if spec.mask_with_where:
            masked = torch.where(keep, choice, torch.zeros_like(choice))
        else:
            masked = choice.masked_fill(~keep, 0.0)
        if forced is None:
            values, idx = self._decide(masked, None)
        else:  # the reference: forced experts keep their unmasked score
            _, native = self._decide(masked, None)
            idx = torch.where(forced < 0, native, forced)
            values = choice.gather(-1, idx)
        w = values if spec.weights_from_topk else scores.gather(-1, idx)
        if spec.normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-6)
        return 2.5 * w, idx


class TinyBlock(nn.Module):
    def __init__(self, spec: RouterSpec, hidden: int, dtype: torch.dtype, generator: torch.Generator) -> None:
        super().__init__()
        self.num_experts = spec.num_experts
        self.router = TinyRouter(spec, hidden, dtype, generator)
        self.expert_emb = nn.Parameter(torch.randn(spec.num_experts, hidden, generator=generator).to(dtype))

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        w, idx = self.router(x) if forced is None else self.router(x, forced)
        self.chosen = idx.reshape(-1, idx.shape[-1])  # what this layer routed to, for the tests to read
        fault = _ARMED.get(self.router)
        if fault is not None:
            fault.check(self.router.layer, "in_experts")
        return x + (w.unsqueeze(-1).to(x.dtype) * self.expert_emb[idx]).sum(dim=-2)


class TinyMoE(nn.Module):
    """Layers ``layers.{i}`` with routers ``layers.{i}.router``; input ``[..., hidden]``."""

    def __init__(
        self, specs: list[RouterSpec], hidden: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden, self.dtype = hidden, dtype
        self.layers = nn.ModuleList(TinyBlock(s, hidden, dtype, g) for s in specs)
        for i, layer in enumerate(self.layers):
            layer.router.layer = i
        self.fault: Fault | None = None

    def inject(self, fault: Fault | None) -> None:
        """Arm (or with None, clear) a fault."""
        self.fault = fault
        for layer in self.layers:
            if fault is None:
                _ARMED.pop(layer.router, None)
            else:
                _ARMED[layer.router] = fault

    @property
    def router_names(self) -> list[str]:
        return [f"layers.{i}.router" for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor, forced: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``forced``: per layer ``[n_tokens, k]`` indices (``-1``: native) for the reference path."""
        lead = x.shape[:-1]
        for i, layer in enumerate(self.layers):
            if self.fault is not None:
                self.fault.check(i, "before_router")
            f = None if forced is None else forced[i].reshape(*lead, forced[i].shape[-1])
            x = layer(x, f)
        return x

    def inputs(self, lead: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*lead, self.hidden, generator=g).to(self.dtype)

    def perturb(self, seed: int = 1, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                w = layer.router.weight
                w.add_(scale * torch.randn(w.shape, generator=g).to(w.dtype))
