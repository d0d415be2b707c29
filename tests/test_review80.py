"""Routers beside experts that are no modules of their own, found with zero configuration, and the gates beside them
that must stay unfound.

A gate found beside experts held as whole blocks of rows of flat weights, or as entries of containers not named like
experts, needs the block itself to declare the gate's width as its expert count, its forward to read two such
holdings (an up and a down half) and to reach a decision; a router narrower than the block's experts list needs the
block to declare the shared experts that make up the difference. The oracle of the found ones is a replay forced by
hand on a copy never attached (``assert_exact``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_public_routers6 import _Used, assert_exact
from tests.test_public_routers7 import BesideMoE, HydraLoRALinear, Layers
from tests.test_public_routers7 import _x as _x7

D, E, F_, K = 16, 4, 6, 2


class _HeldExperts(_Used):
    """An MoE block whose ``E`` experts are whole blocks of ``F_`` rows of two flat weights (``"flat"``), or entries
    of two ModuleLists not named like experts (``"lists"``); a bare ``gate`` Linear, a top-k in the block's forward.
    ``halves`` 1: only the up half is split into experts, the down projection one dense Linear."""

    def __init__(self, held: str = "flat", halves: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.held = E, K, held
        self.gate = nn.Linear(D, E, bias=False)
        if held == "flat":
            self.w_in = nn.Parameter(torch.randn(E * F_, D) / math.sqrt(D))
            if halves == 2:
                self.w_out = nn.Parameter(torch.randn(E * F_, D) / math.sqrt(F_))
            else:
                self.down = nn.Linear(F_, D + 2, bias=False)
        else:
            self.ups = nn.ModuleList([nn.Linear(D, F_, bias=False) for _ in range(E)])
            self.downs = nn.ModuleList([nn.Linear(F_, D, bias=False) for _ in range(E)])

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.held == "flat":
            up = F.silu(h @ self.w_in[e * F_ : (e + 1) * F_].t())
            if hasattr(self, "w_out"):
                return up @ self.w_out[e * F_ : (e + 1) * F_]
            return self.down(up)[..., :D]
        return self.downs[e](F.silu(self.ups[e](h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, D)
        logits = self.gate(h)
        out = torch.zeros_like(h)
        weights, ids = torch.topk(logits.softmax(-1), self.top_k)
        if self.forced is not None:
            ids = self.forced.view(-1, self.top_k)
            weights = logits.softmax(-1).gather(-1, ids)
        self.used = ids
        for e in range(E):
            rows, slot = torch.where(ids == e)
            if rows.numel():
                out = out.index_add(0, rows, weights[rows, slot, None] * self._expert(e, h[rows]))
        return out.view_as(x)


class _SoftHeldExperts(_HeldExperts):
    """The same block weighing every expert by a softmax of the gate's logits: no decision call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, D)
        probs = self.gate(h).softmax(-1)
        out = torch.zeros_like(h)
        for e in range(E):
            out = out + probs[:, e : e + 1] * self._expert(e, h)
        return out.view_as(x)


class _Model(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(D)
            self.mlp = block
            for p in self.mlp.parameters():
                nn.init.normal_(p, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _x() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("held", ["flat", "lists"])
def test_a_gate_beside_experts_held_as_flat_rows_or_plain_lists_is_found_and_replays(held: str) -> None:
    """The gate of a block whose experts are whole blocks of rows of two flat weights, or the entries of two plain
    ModuleLists, the block declaring ``num_experts`` as wide as the gate: found with zero configuration, and a replay
    after the gate changes forces the recorded experts, in output and gradients, as by hand."""
    session = assert_exact(_Model(_HeldExperts(held)), _x())
    assert session.names == ("mlp.gate",), session.names
    assert [s.num_experts for s in session.sites] == [E]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("case", ["soft", "one_half"])
def test_a_gate_beside_flat_rows_that_choose_nothing_or_split_one_weight_is_not_found(case: str) -> None:
    """Beside the same flat weights, a block that weighs every expert (no decision call) or whose experts split one
    weight alone (the down projection a dense Linear) holds no router the gate's width and the rows tell: nothing is
    found, and the model is left as it was."""
    block = _SoftHeldExperts("flat") if case == "soft" else _HeldExperts("flat", halves=1)
    model = _Model(block)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(mr.RouterNotFoundError):
        mr.find_routers(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


class _GatedHeads(nn.Module):
    """Attention with a per-head sigmoid gate: ``gate`` scores ``H`` heads, whose query, key and value rows are whole
    blocks of the projections; a mask filled with the dtype's ``min`` (a name a decision reads too)."""

    def __init__(self, heads: int = E) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        heads = scores.softmax(-1) @ v
        heads = heads * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]
        return self.o_proj(heads.transpose(1, 2).reshape(b, t, D))


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E)])
        self.router = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(self.router(x).softmax(-1), K)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * expert(x)
        return out


def test_a_head_gate_in_a_model_whose_config_counts_as_many_experts_stays_unfound() -> None:
    """A per-head attention gate as wide as the expert count of the model's config, its projections whole blocks of
    rows per head and a ``min`` in its forward: the count is the model's, not the attention block's, so only the
    MoE's router is found."""
    model = nn.Module()
    model.config = SimpleNamespace(num_experts=E, num_experts_per_tok=K)
    model.attn = _GatedHeads()
    model.moe = _Experts()
    assert [s.name for s in mr.find_routers(model)] == ["moe.router"]


class _NarrowRouter(nn.Module):
    """A router one row narrower than the block's experts list, the block declaring ``shared`` shared experts (or
    none)."""

    def __init__(self, shared: int | None) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(D, D) for _ in range(E + 1)])
        if shared is not None:
            self.n_shared_experts = shared
        self.router = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(self.router(x).softmax(-1), K)
        out = self.experts[0](x)
        for e, expert in enumerate(self.experts[1:]):
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * expert(x)
        return out


@pytest.mark.parametrize("shared", [None, 2, 1])
def test_a_router_narrower_than_its_experts_list_is_found_only_by_the_shared_count_declared(
    shared: int | None,
) -> None:
    """A router one row narrower than the block's experts list is the router of the routed experts where the block
    declares one shared expert; declaring none, or two, says nothing of the missing row, and it stays unfound."""
    model = nn.Module()
    model.mlp = _NarrowRouter(shared)
    if shared == 1:
        sites = mr.find_routers(model)
        assert [(s.name, s.num_experts) for s in sites] == [("mlp.router", E)]
    else:
        with pytest.raises(mr.RouterNotFoundError):
            mr.find_routers(model)


@pytest.mark.reliability("false refusals")
def test_hydralora_beside_a_routed_moe_is_found_and_replays_exactly() -> None:
    """HydraLoRA's top-k ``router`` beside its block's ``num_experts`` and ``lora_A`` / ``lora_B`` lists of as many
    LoRA experts (four, where the MoE has eight), then a Mixtral-style MoE, in each of two layers: once refused as a
    choice outside every attached router, now found beside the MoE's gate, and both replayed as by hand."""
    experts = 4
    make = lambda: BesideMoE(lambda: HydraLoRALinear(num_experts=experts, clamp=False))  # noqa: E731
    session = assert_exact(Layers(make), _x7())
    assert session.names == (
        "layers.0.other.hydra.router",
        "layers.0.moe.gate",
        "layers.1.other.hydra.router",
        "layers.1.moe.gate",
    )
    assert [s.num_experts for s in session.sites][::2] == [experts, experts]
