"""More router code a user might write that could fool the identification of the decision or of the routers: each
is captured, then replayed on other tokens with its router's weights moved. Exact (the block used the captured experts
and its output is the hand-forced one) or refused (a ``MoEReplayError``); never neither."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .conftest import snapshot

E, D, K, T = 6, 12, 2, 40
FORWARDS = 3  # per capture and per replay


class Experts(nn.Module):
    """``E`` linear experts with stacked weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = nn.Parameter(torch.randn(E, D, D, generator=g) / math.sqrt(D))

    def combine(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_j w[t, j] * expert_{idx[t, j]}(x[t]) over ``[..., D]`` tokens, every expert computed for every token."""
        shape = x.shape
        x, w, idx = x.reshape(-1, D), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
        every = torch.einsum("td,edf->tef", x, self.w)
        picked = every.gather(1, idx.long()[..., None].expand(-1, -1, D))
        return (w.to(x.dtype)[..., None] * picked).sum(1).reshape(shape)


class Router(nn.Module):
    """A gate ``[E, D]`` (``forward`` returns weights and experts ``[..., k]``); ``weights`` is the reference: the
    combine weights of experts ``idx`` under the current parameters."""

    def __init__(self, k: int = K) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(E, D, generator=g))
        self.top_k, self.num_experts = k, E

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1).gather(-1, idx.long())


class MoE(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.gate, self.experts = router, Experts()
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        self.last = idx.detach().reshape(-1, idx.shape[-1]).clone()
        return self.experts.combine(x, w, idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.reshape(*x.shape[:-1], -1)
        return self.experts.combine(x, self.gate.weights(x, idx), idx)


class Model(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.moe = block

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return x + self.moe(x, *args)


# ------------------------------------------------------------------------------------------------ the decision call
class AttributeBoundTopK(Router):
    """``torch.Tensor.topk`` (the unbound method) kept in an attribute at construction."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = torch.Tensor.topk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.pick(self.logits(x).softmax(-1), self.top_k, -1)
        return vals, idx


class BoundMethodTopK(Router):
    """The scores' own bound method taken first, called later: ``pick = probs.topk; pick(k)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        pick = probs.topk
        vals, idx = pick(self.top_k)
        return vals, idx


class PartialTensorTopK(Router):
    """``functools.partial(torch.Tensor.topk, dim=-1)`` held by the router."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = functools.partial(torch.Tensor.topk, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.pick(self.logits(x).softmax(-1), self.top_k)
        return vals, idx


class AtenTopKDefault(Router):
    """``torch.ops.aten.topk.default`` (the overload itself) called directly."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = torch.ops.aten.topk.default(probs, self.top_k, -1, True, True)
        return vals, idx


class _TopKFunction(torch.autograd.Function):
    """A user's own autograd function: the top-k in its forward, the gradient scattered back by hand."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = torch.topk(probs, k, dim=-1)
        ctx.save_for_backward(idx)
        ctx.shape = probs.shape
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx: Any, gv: torch.Tensor, gi: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        return torch.zeros(ctx.shape, dtype=gv.dtype).scatter(-1, idx, gv), None


class AutogradFunctionTopK(Router):
    """The decision inside the ``forward`` of the user's own ``torch.autograd.Function``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = _TopKFunction.apply(self.logits(x).softmax(-1), self.top_k)
        return vals, idx


def _eager_compiled_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(probs, k, dim=-1)


_COMPILED_TOPK = torch.compile(_eager_compiled_topk, backend="eager", dynamic=False)


class CompiledHelperTopK(Router):
    """The top-k in a ``torch.compile``d helper called from an eager router."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = _COMPILED_TOPK(self.logits(x).softmax(-1), self.top_k)
        return vals, idx


class NumpyRoundTrip(Router):
    """``scores.cpu().numpy().argsort()`` reversed, back to torch, the values gathered from the live scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        order = probs.detach().cpu().numpy().argsort(axis=-1)[:, ::-1][:, : self.top_k]
        idx = torch.as_tensor(np.ascontiguousarray(order)).to(probs.device)
        return probs.gather(-1, idx), idx


class NumpyArgpartition(Router):
    """``np.argpartition`` of the negated probabilities (its k winners unordered)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        part = np.argpartition(-probs.detach().numpy(), self.top_k - 1, axis=-1)[:, : self.top_k]
        idx = torch.from_numpy(part.copy())
        return probs.gather(-1, idx), idx


class Float32CopyOfBf16(Router):
    """bfloat16 scores; the top-k of a ``.float()`` copy (its values dropped), weights gathered from the bf16
    scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.bfloat16(), self.weight.bfloat16()).softmax(-1)
        idx = probs.float().topk(self.top_k).indices
        return probs.gather(-1, idx).float(), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(x.bfloat16(), self.weight.bfloat16()).softmax(-1).gather(-1, idx.long()).float()


class ArangeTieBreak(Router):
    """Ties broken toward the lower expert by ``- arange(E) * eps`` added to a copy; weights from the scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        ranked = probs - torch.arange(E, dtype=probs.dtype) * 1e-6
        idx = ranked.topk(self.top_k).indices
        return probs.gather(-1, idx), idx


class KFromShape(Router):
    """``k`` computed from the scores' shape: ``max(1, scores.shape[-1] // 3)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.topk(max(1, probs.shape[-1] // 3))
        return vals, idx


class KFromItem(Router):
    """``k`` read from a parameter-free tensor with ``.item()`` each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.k_tensor = torch.tensor(K)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(int(self.k_tensor.item()))
        return vals, idx


class Scores3DLastDim(Router):
    """``[B, S, E]`` scores, the top-k along ``dim=-1`` (no flattening)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k, dim=-1)
        return vals, idx


class Scores3DDim2(Router):
    """``[B, S, E]`` scores, the top-k along ``dim=2``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = torch.topk(self.logits(x).softmax(2), self.top_k, dim=2)
        return vals, idx


class Scores3DFlattened(Router):
    """``[B, S, E]`` scores flattened to ``[B*S, E]`` for the top-k, reshaped back."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.view(-1, E).topk(self.top_k)
        return vals.view(*x.shape[:-1], -1), idx.view(*x.shape[:-1], -1)


class NegatedLogitsSmallest(Router):
    """``topk(-logits, largest=False)``: the largest logits, weights a softmax over the chosen ``-values``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        neg, idx = torch.topk(-self.logits(x), self.top_k, dim=-1, largest=False)
        return (-neg).softmax(-1), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(x).gather(-1, idx.long()).softmax(-1)


class UnsortedTopK(Router):
    """``topk(sorted=False)`` and nothing after: the slots in whatever order the kernel leaves them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k, sorted=False)
        return vals, idx


class HeldOutBuffers(Router):
    """``torch.topk(..., out=(values, indices))`` into buffers the router allocates once and keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.vbuf = torch.empty(0)
        self.ibuf = torch.empty(0, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        if self.ibuf.shape[0] != probs.shape[0]:
            self.vbuf = torch.empty(probs.shape[0], self.top_k)
            self.ibuf = torch.empty(probs.shape[0], self.top_k, dtype=torch.long)
        torch.topk(probs.detach(), self.top_k, out=(self.vbuf, self.ibuf))
        return probs.gather(-1, self.ibuf), self.ibuf.clone()


class InPlaceKeepOnlyChosen(Router):
    """After the top-k, the scores cut in place to the chosen experts (``masked_fill_`` below the k-th value), then
    renormalised and gathered: the in-place cut rereads the decision's values."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.topk(self.top_k)
        kept = probs.clone()
        kept.masked_fill_(kept < vals.min(-1, keepdim=True).values, 0.0)
        kept = kept / kept.sum(-1, keepdim=True)
        return kept.gather(-1, idx), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = self.logits(x).softmax(-1).gather(-1, idx.long())
        return w / w.sum(-1, keepdim=True)


class InPlaceValuesCut(Router):
    """The values the top-k returned zeroed in place below 0.2 (``vals.masked_fill_``): a choice after the
    decision."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k)
        vals = vals.clone()
        vals.masked_fill_(vals < 0.2, 0.0)
        return vals, idx


class InPlaceGroupMasked(Router):
    """Group-limited routing (3 groups of 2, the best 2 groups kept) with the scores masked **in place**
    (``masked_fill_``) before the top-k: no unmasked copy is left to read a forced expert's score from."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        ranked = probs.detach().clone()
        groups = ranked.view(-1, 3, 2).amax(-1)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2).indices, True)
        probs = probs * 1.0
        probs.masked_fill_(~keep.repeat_interleave(2, -1), 0.0)
        vals, idx = probs.topk(self.top_k)
        return vals, idx


class SuperPostProcessed(Router):
    """A subclass of a plain router that calls ``super().forward()`` and renormalises what it returns."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = UnsortedTopK.forward(self, x)  # type: ignore[arg-type]
        return vals / vals.sum(-1, keepdim=True), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = super().weights(x, idx)
        return w / w.sum(-1, keepdim=True)


class _Plain(Router):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k)
        return vals, idx


class SuperThenReselect(_Plain):
    """A subclass that calls ``super().forward()`` and keeps the better of its two experts only (a top-1 of the
    returned weights): a choice after the decision."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = super().forward(x)
        best = vals.argmax(-1, keepdim=True)
        return vals * F.one_hot(best[:, 0], self.top_k).to(vals.dtype), idx


class SuperRenormalised(_Plain):
    """A subclass that calls ``super().forward()`` and renormalises."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = super().forward(x)
        return vals / vals.sum(-1, keepdim=True), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = super().weights(x, idx)
        return w / w.sum(-1, keepdim=True)


class CustomCallRouter(_Plain):
    """A router whose class defines ``__call__`` as ``self.forward(x)``: ``nn.Module.__call__`` (and its hooks)
    never run."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.forward(x)


class _RawSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ``__call__`` runs its members' ``forward`` directly (skipping hooks)."""

    def __call__(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        for m in self:
            x = type(m).forward(m, x)
        return x


class _Route(nn.Module):
    """The last stage of a router built as a sequence: softmax and top-k of the logits it is given."""

    top_k, num_experts = K, E

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = logits.softmax(-1).topk(self.top_k)
        return vals, idx


class SequentialRouterBlock(MoE):
    """The router an ``nn.Sequential(Linear, route)`` under a custom ``__call__`` that calls its members' class
    ``forward`` past their modules."""

    def __init__(self) -> None:
        gate = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        super().__init__(_RawSequential(gate, _Route()))

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate[0](x).softmax(-1).gather(-1, idx), idx)


class SequentialPlainBlock(SequentialRouterBlock):
    """The same router as a plain ``nn.Sequential``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sequential(*self.gate)


class PreHookRewritesInput(MoE):
    """A ``forward_pre_hook`` the user registered on the gate (before ``attach``) that normalises its input."""

    def __init__(self) -> None:
        super().__init__(_Plain())
        self.gate.register_forward_pre_hook(lambda m, args: (F.normalize(args[0], dim=-1) * 2.0,))

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate.weights(F.normalize(x, dim=-1) * 2.0, idx), idx)


class ScoresOnlyGate(nn.Module):
    """A gate that only scores."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).softmax(-1)


class Dispatcher(nn.Module):
    """The decision in a sibling of the gate: top-k and a one-hot dispatch mask the experts read."""

    def __init__(self) -> None:
        super().__init__()
        self.k = K

    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vals, idx = probs.topk(self.k)
        mask = F.one_hot(idx, E).sum(-2).bool()
        return vals, idx, mask


class SiblingDispatcherBlock(nn.Module):
    """Gate, dispatcher and experts siblings; the experts computed densely and masked by the dispatcher's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.dispatcher, self.experts = ScoresOnlyGate(), Dispatcher(), Experts()
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x)
        vals, idx, mask = self.dispatcher(probs)
        self.last = idx.detach().clone()
        dense = torch.zeros_like(probs).scatter(-1, idx, vals) * mask
        every = torch.einsum("td,edf->tef", x, self.experts.w)
        return (dense[..., None] * every).sum(1)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate(x).gather(-1, idx), idx)


class TaskGatesBlock(nn.Module):
    """Per-task routers in an ``nn.ModuleList`` (or ``nn.ModuleDict``) chosen by an integer argument."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        gates = [_Plain() for _ in range(2)]
        with torch.no_grad():
            gates[1].weight.mul_(-1.0)
        held = nn.ModuleDict({str(i): g for i, g in enumerate(gates)}) if as_dict else nn.ModuleList(gates)
        self.gates: nn.Module = held
        self.as_dict = as_dict
        self.experts = Experts()
        self.last: torch.Tensor | None = None
        self.task = 0

    def gate_for(self, task: int) -> nn.Module:
        return self.gates[str(task)] if self.as_dict else self.gates[task]  # type: ignore[index]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        w, idx = self.gate_for(task)(x)
        self.last = idx.detach().clone()
        return self.experts.combine(x, w, idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor, task: int) -> torch.Tensor:
        return self.experts.combine(x, self.gate_for(task).weights(x, idx), idx)


class WhereThresholdDenominator(Router):
    """The top-k, then the scores kept where they reach the k-th value (``torch.where``, out of place) and the
    chosen weights divided by what was kept: a renormalisation over a set the scores pick again."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.topk(self.top_k)
        kept = torch.where(probs >= vals[..., -1:], probs, torch.zeros_like(probs))
        return vals / kept.sum(-1, keepdim=True), idx

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = self.logits(x).softmax(-1).gather(-1, idx.long())
        return w / w.sum(-1, keepdim=True)


class PiecewiseOfTheChosen(Router):
    """A piecewise function of the chosen weights alone (halved under 0.3, then renormalised): a choice among the
    k forced experts' own scores, which a replay makes on the replayed scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k)
        return self.shape(vals), idx

    @staticmethod
    def shape(w: torch.Tensor) -> torch.Tensor:
        w = torch.where(w > 0.3, w, w * 0.5)
        return w / w.sum(-1, keepdim=True)

    def weights(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.shape(super().weights(x, idx))


class DenseMaskFromValues(Router):
    """Dense combine weights: the scores masked where they reach the k-th value the top-k returned."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.topk(self.top_k)
        return probs * (probs >= vals[..., -1:]), idx


class DenseMaskBlock(MoE):
    """A block that combines every expert by the router's dense weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, idx = self.gate(x)
        self.last = idx.detach().clone()
        every = torch.einsum("td,edf->tef", x, self.experts.w)
        return (dense[..., None] * every).sum(1)


class AuxAfter(Router):
    """The decision, then a second top-k of the same form for a load-balancing loss the router returns (its
    fraction of tokens per expert times the mean probability)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = probs.topk(self.top_k)
        return vals, idx, self.aux(probs)

    def aux(self, probs: torch.Tensor) -> torch.Tensor:
        counted = probs.detach().topk(self.top_k).indices
        load = F.one_hot(counted, E).sum((0, 1)).float() / counted.numel()
        return E * (load * probs.mean(0)).sum()


class AuxBefore(AuxAfter):
    """The same load-balancing top-k taken before the decision."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        aux = self.aux(probs)
        vals, idx = probs.topk(self.top_k)
        return vals, idx, aux


class AuxBlock(MoE):
    """A block around a router that returns its auxiliary loss third, added to the output (as a training loss
    would reach the gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx, aux = self.gate(x)
        self.last = idx.detach().clone()
        return self.experts.combine(x, w, idx) + 0.01 * aux

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The forced experts combined, the loss from the router's own (native) top-k: it is no decision."""
        return super().reference(x, idx) + 0.01 * self.gate.aux(self.gate.logits(x).softmax(-1))


class HookCutBlock(MoE):
    """A minimum-weight cut put in a forward hook on the router (a user patching a model without editing its code):
    weights under 0.25 zeroed after the router returns, a choice from the current scores after the decision."""

    def __init__(self) -> None:
        super().__init__(_Plain())
        self.gate.register_forward_hook(lambda m, args, out: (out[0] * (out[0] >= 0.25), out[1]))


class TemperatureHookBlock(MoE):
    """A forward hook on the router that sharpens its weights (a power and a renormalisation): no choice, a
    function of the forced experts' own weights."""

    def __init__(self) -> None:
        super().__init__(_Plain())
        self.gate.register_forward_hook(lambda m, args, out: (self.sharpen(out[0]), out[1]))

    @staticmethod
    def sharpen(w: torch.Tensor) -> torch.Tensor:
        w = w**2
        return w / w.sum(-1, keepdim=True)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.sharpen(self.gate.weights(x, idx)), idx)


class KByGradMode(Router):
    """One expert without gradients (rollouts), two with them (training): ``k`` from ``torch.is_grad_enabled()``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).topk(self.top_k if torch.is_grad_enabled() else 1)
        return vals, idx


class FusedSharedColumn(Router):
    """One linear for the routed experts and a shared expert's gate (``E + 1`` columns): the top-k over the first
    ``E``, the last column's sigmoid returned third."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.weight = nn.Parameter(torch.randn(E + 1, D, generator=g))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)[..., :E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        both = F.linear(x, self.weight)
        vals, idx = both[..., :E].softmax(-1).topk(self.top_k)
        return vals, idx, both[..., E:].sigmoid()


class SharedGateBlock(MoE):
    """A block adding the shared expert (here: the input itself) weighed by the fused gate's last column."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx, shared = self.gate(x)
        self.last = idx.detach().clone()
        return self.experts.combine(x, w, idx) + shared * x

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return super().reference(x, idx) + F.linear(x, self.gate.weight)[..., E:].sigmoid() * x


class _Renorm(nn.Module):
    """Combine weights renormalised to sum to one."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w / w.sum(-1, keepdim=True)


class CutInASubmodulesHook(nn.Module):
    """A bare ``nn.Linear`` gate (the top-k in the block, which is the scope) and a renormalising submodule after
    the top-k, with a user's forward hook on it that cuts weights under 0.3 to zero: a later choice made inside the
    scope, but in a hook of a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.renorm = _Renorm()
        self.renorm.register_forward_hook(lambda m, args, out: out * (out >= 0.3))
        self.experts, self.top_k, self.num_experts = Experts(), K, E
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.gate(x).softmax(-1).topk(self.top_k)
        self.last = idx.detach().clone()
        return self.experts.combine(x, self.renorm(vals), idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = self.gate(x).softmax(-1).gather(-1, idx)
        return self.experts.combine(x, w / w.sum(-1, keepdim=True), idx)


class LoggedTopKInAGatesHook(CutInASubmodulesHook):
    """:class:`CutInASubmodulesHook` without its cut, and a forward hook on the bare gate that logs the experts'
    load: a top-1 of the logits, kept aside (it reaches nothing the block returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.renorm._forward_hooks.clear()
        self.loads: list[torch.Tensor] = []
        self.gate.register_forward_hook(lambda m, args, out: self.loads.append(out.topk(1).indices))


class BiasInTheGatesHook(nn.Module):
    """A bare ``nn.Linear`` gate (the top-k in the block) with a forward hook that adds a balancing bias to its
    logits."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("bias", torch.linspace(-0.5, 0.5, E))
        self.gate.register_forward_hook(lambda m, args, out: out + self.bias)
        self.experts, self.top_k, self.num_experts = Experts(), K, E
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.gate(x).softmax(-1).topk(self.top_k)
        self.last = idx.detach().clone()
        return self.experts.combine(x, vals, idx)

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, self.gate(x).softmax(-1).gather(-1, idx), idx)


_POOL = ThreadPoolExecutor(max_workers=1)


class ThreadTopK(Router):
    """The top-k run on a worker thread (``executor.submit(torch.topk, ...)``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        vals, idx = _POOL.submit(torch.topk, probs, self.top_k).result()
        return vals, idx


class DisabledTorchFunctionTopK(Router):
    """The top-k under ``torch._C.DisableTorchFunction`` (as code built around tensor subclasses does)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        with torch._C.DisableTorchFunction():
            vals, idx = torch.topk(probs, self.top_k)
        return vals, idx


class HookDecidedBlock(MoE):
    """A gate that only scores; the decision made in a forward hook the user registered on it."""

    def __init__(self) -> None:
        super().__init__(ScoresOnlyGate())
        self.gate.register_forward_hook(lambda m, args, out: out.topk(K))

    def reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(x, F.linear(x, self.gate.weight).softmax(-1).gather(-1, idx), idx)


class SortSliced(Router):
    """``sort(descending=True)`` and the first k columns."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.logits(x).softmax(-1).sort(-1, descending=True)
        return vals[:, : self.top_k], idx[:, : self.top_k]


class ArgsortSliced(Router):
    """``argsort(descending=True)[:, :k]``, the values gathered."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(-1)
        idx = probs.argsort(-1, descending=True)[:, : self.top_k]
        return probs.gather(-1, idx), idx


# ------------------------------------------------------------------------------------------------ the harness
class _Silent(Exception):
    """A replay that was neither exact nor refused."""


def _hooks(model: nn.Module) -> dict[str, tuple[list[Any], list[Any]]]:
    return {n: (list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for n, m in model.named_modules()}


def _assert_untouched(model: nn.Module, state: dict[str, torch.Tensor], hooks: dict[str, Any]) -> None:
    """No wrapper left, the user's own hooks and nobody else's, the state as it was."""
    assert _hooks(model) == hooks
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"a forward override is left on '{name}'"
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach().float(), b.detach().float()
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 + tol * b.abs().max())


def _sets(idx: torch.Tensor) -> torch.Tensor:
    return idx.long().sort(-1).values


def _perturb(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("experts"):
                p.add_(torch.randn(p.shape, generator=g) * 1.5 * p.std())


def outcome(
    make: Callable[[], nn.Module], *, shape: tuple[int, ...] = (T, D), tasks: tuple[int, ...] = (), tol: float = 1e-4
) -> str:
    """Capture ``FORWARDS`` forwards on some tokens (one per task in ``tasks`` where given, each task's gate its own
    router), move the routers' weights, replay them on others with gradients (and a backward each):
    ``"exact"``, ``"refused: ..."`` or ``"silent: ..."`` (what was wrong)."""
    torch.manual_seed(0)
    made = make()
    block = made if hasattr(made, "experts") else MoE(made)
    model = Model(block)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    steps = [(t,) for t in tasks] or [() for _ in range(FORWARDS)]
    tokens = math.prod(shape[:-1])
    session = None
    state, hooks = snapshot(model), _hooks(model)
    try:
        session = mr.attach(model)
        native = []
        with torch.no_grad(), session.capture():
            for args in steps:
                model(x1, *args)
                native.append(block.last)
        routes = session.routes()
        recorded = routes.per_layer()
        by_step: list[torch.Tensor] = []
        if tasks:
            seen: dict[int, int] = {}
            names = [n.rsplit(".", 1)[-1] for n in routes.names]
            for (task,) in steps:
                rows = recorded[names.index(str(task))]
                at = seen.get(task, 0)
                by_step.append(rows[at * tokens : (at + 1) * tokens])
                seen[task] = at + 1
        else:
            (rows,) = recorded
            by_step = [rows[i * tokens : (i + 1) * tokens] for i in range(len(steps))]
        for got, want in zip(by_step, native, strict=True):
            if not torch.equal(_sets(got), _sets(want)):
                return "silent: the capture recorded other experts than the router chose"
        _perturb(block)
        with torch.no_grad():
            model(x2, *steps[0])
        assert not torch.equal(_sets(block.last), _sets(by_step[0])), "the test cannot tell forced from native"
        state = snapshot(model)
        with session.replay(routes):
            for forward, args in enumerate(steps):
                out = model(x2, *args)
                out.square().sum().backward()
                forced = by_step[forward].long()
                if not torch.equal(_sets(block.last), _sets(forced)):
                    raise _Silent(f"replayed forward {forward} used other experts than the recorded ones")
                with torch.no_grad():
                    want = x2 + block.reference(x2, forced.reshape(*shape[:-1], -1), *args)
                if not _close(out, want, tol):
                    raise _Silent(f"replayed forward {forward}'s output is not the hand-forced one")
        state = snapshot(model)
        session.detach()
        session = None
        _assert_untouched(model, state, hooks)
        return "exact"
    except _Silent as err:
        return f"silent: {err}"
    except mr.MoEReplayError as err:
        if session is not None:
            session.detach()
        _assert_untouched(model, state, hooks)
        return "refused: " + str(err).split("\n")[0]


class SparseRouter(MoE):
    """A block class named like a router (it holds the gate and the experts): the gate in it is the router."""


#: Each router and what must come of it: "exact" (the recorded experts forced, the hand-forced output) or
#: "refused" (a MoEReplayError; the comment says why that is right).
EXPECTED: dict[str, tuple[Callable[[], nn.Module], str, dict[str, Any]]] = {
    # the decision call reached in other ways than ``torch.topk(...)`` / ``scores.topk(...)``
    "tensor_topk_in_an_attribute": (AttributeBoundTopK, "exact", {}),
    "bound_method_taken_first": (BoundMethodTopK, "exact", {}),
    "partial_of_tensor_topk": (PartialTensorTopK, "exact", {}),
    "aten_topk_default_overload": (AtenTopKDefault, "exact", {}),
    "autograd_function_forward": (AutogradFunctionTopK, "exact", {}),
    "compiled_helper": (CompiledHelperTopK, "exact", {}),
    # the decision's inputs and arguments
    "float_copy_of_bf16_scores": (Float32CopyOfBf16, "exact", {"tol": 2e-2}),
    "arange_tie_break": (ArangeTieBreak, "exact", {}),
    "k_from_the_shape": (KFromShape, "exact", {}),
    "k_from_item": (KFromItem, "exact", {}),
    "scores_3d_last_dim": (Scores3DLastDim, "exact", {"shape": (4, 10, D)}),
    "scores_3d_dim2": (Scores3DDim2, "exact", {"shape": (4, 10, D)}),
    "scores_3d_flattened": (Scores3DFlattened, "exact", {"shape": (4, 10, D)}),
    "negated_logits_smallest": (NegatedLogitsSmallest, "exact", {}),
    "unsorted_topk": (UnsortedTopK, "exact", {}),
    "held_out_buffers": (HeldOutBuffers, "exact", {}),
    "fused_shared_expert_column": (lambda: SharedGateBlock(FusedSharedColumn()), "exact", {}),
    # other top-k calls beside the decision, after it
    "aux_topk_after": (lambda: AuxBlock(AuxAfter()), "exact", {}),
    "aux_topk_before": (lambda: AuxBlock(AuxBefore()), "exact", {}),
    "super_renormalised": (SuperRenormalised, "exact", {}),
    "piecewise_of_the_chosen_weights": (PiecewiseOfTheChosen, "exact", {}),
    "class_forward_of_another_class": (SuperPostProcessed, "exact", {}),
    # where the router is and how it is called
    "custom_call_router": (CustomCallRouter, "exact", {}),
    "sequential_custom_call": (SequentialRouterBlock, "exact", {}),
    "sequential_plain": (SequentialPlainBlock, "exact", {}),
    "pre_hook_rewrites_input": (PreHookRewritesInput, "exact", {}),
    "bias_in_the_gates_forward_hook": (BiasInTheGatesHook, "exact", {}),
    "temperature_in_the_routers_forward_hook": (TemperatureHookBlock, "exact", {}),
    "sibling_dispatcher": (SiblingDispatcherBlock, "exact", {}),
    "task_gates_module_list": (TaskGatesBlock, "exact", {"tasks": (0, 1, 1, 0)}),
    "task_gates_module_dict": (lambda: TaskGatesBlock(as_dict=True), "exact", {"tasks": (1, 0, 1)}),
    "block_class_named_like_a_router": (lambda: SparseRouter(_Plain()), "exact", {}),  # (once "no router found")
    # the top-k made in a forward hook on a gate that only scores (once refused: the runs that establish the decision
    # failed with the hook set aside; they run again with it in)
    "decision_in_a_forward_hook": (HookDecidedBlock, "exact", {}),
    # a top-k made only to log, in a forward hook of the gate (once refused: the runs that establish the decision set
    # the hook aside, so the real forward made one decision-like call more than they did; a call made in such a hook
    # is none of the decision's calls, and what the forward returns with it is compared with what they gave)
    "top_k_logged_in_a_gates_forward_hook": (LoggedTopKInAGatesHook, "exact", {}),
    # chosen out of torch's sight: no decision to force
    "numpy_round_trip": (NumpyRoundTrip, "refused", {}),
    "numpy_argpartition": (NumpyArgpartition, "refused", {}),
    "topk_on_a_worker_thread": (ThreadTopK, "refused", {}),  # (a torch function mode is the thread's own)
    "topk_with_torch_function_disabled": (DisabledTorchFunctionTopK, "refused", {}),
    # k of 1 in the captured rollouts (no gradients), 2 in the replayed training forward: no rows to force
    "k_by_grad_mode": (KByGradMode, "refused", {}),
    # a choice by sort (documented: write it as torch.topk)
    "sort_sliced": (SortSliced, "refused", {}),
    "argsort_sliced": (ArgsortSliced, "refused", {}),
    # chosen again from the scores after the decision: a replay would not use the recorded experts
    "in_place_values_cut": (InPlaceValuesCut, "refused", {}),
    "super_then_reselect": (SuperThenReselect, "refused", {}),
    "dense_mask_from_values": (lambda: DenseMaskBlock(DenseMaskFromValues()), "refused", {}),
    "later_cut_in_the_routers_forward_hook": (HookCutBlock, "refused", {}),  # (once silent: a hook is no scope)
    # a cut in a hook of a submodule inside the scope (once silent: the runs that establish the decision set the hook
    # aside; the real forward's output differs from theirs, so it is established again with the hooks in)
    "later_cut_in_a_submodules_forward_hook": (CutInASubmodulesHook, "refused", {}),
    # weights renormalised over the experts whose scores reach the decision's k-th value: forced, that set holds
    # experts the replay did not force, whose scores divide the weights (once silent: only zeros were compared)
    "in_place_keep_only_chosen": (InPlaceKeepOnlyChosen, "refused", {}),
    "where_threshold_denominator": (WhereThresholdDenominator, "refused", {}),
    # a group choice masked in place: a forced expert outside the groups would weigh the fill
    "in_place_group_mask": (InPlaceGroupMasked, "refused", {}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", list(EXPECTED))
def test_more_router_code_that_could_hide_its_decision_replays_exactly_or_is_refused(name: str) -> None:
    """Routers written as users write them (the top-k as a bound method, an aten overload, inside an autograd
    function or a compiled helper, numpy round trips, a float copy of bf16 scores, k from a shape or ``.item()``, 3-D
    scores, ``out=`` buffers, in-place cuts, subclasses, custom ``__call__``, input pre-hooks, sibling dispatchers,
    per-task gates): each captured, its weights moved, replayed on other tokens with a backward: the recorded experts
    forced and the hand-forced output, or a MoEReplayError."""
    make, expected, how = EXPECTED[name]
    got = outcome(make, **how)
    assert got.split(":")[0] == expected, got
