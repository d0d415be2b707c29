"""State a router's forward is handed in its inputs, written in place by the runs that establish its decision.

A run of the forward gets fresh copies of the tensors, lists, tuples and dicts among its inputs; an object of the
user's (a dataclass of statistics the layers add to, a ``SimpleNamespace`` of logs) and a named tuple are handed to it
as they are. What a run writes into them (a tensor added to in place, a list appended to, an attribute rebound) is put
back after each run, so the captured forward's output and the object after it are those of a plain forward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import moe_replay as mr

D, E, K = 8, 4, 2


@dataclass
class Stats:
    load: torch.Tensor
    total: torch.Tensor
    calls: list[int]


class Pair(NamedTuple):
    load: torch.Tensor
    seen: torch.Tensor


def _write_stats(stats: Any, idx: torch.Tensor, p: torch.Tensor) -> None:
    """What a block writes into the state it is handed: an add in place, a rebinding, an append."""
    counts = torch.bincount(idx.flatten(), minlength=E).float()
    if isinstance(stats, Pair):
        stats.load.add_(counts)
        stats.seen.add_(p.mean(0))
    elif isinstance(stats, dict):
        _write_stats(stats["inner"], idx, p)
    else:
        stats.load.add_(counts)
        stats.total = stats.total + p.sum()
        stats.calls.append(int(idx.shape[0]))


class Block(nn.Module):
    """A top-k gate inline in an MoE block that writes its routing statistics into the object it is handed, and reads
    them back into its output (a load term, as a training loss does)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor, stats: Any) -> torch.Tensor:
        p = self.gate(x).softmax(-1)
        v, idx = torch.topk(p, K)
        _write_stats(stats, idx, p)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = idx == e
            rows = hit.any(-1)
            if rows.any():
                out[rows] += expert(x[rows]) * (v * hit).sum(-1, keepdim=True)[rows]
        held = stats["inner"] if isinstance(stats, dict) else stats
        return out + held.load.sum() * 1e-3


class Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def fresh(self) -> Any:
        zeros = torch.zeros(E)
        if self.kind == "namedtuple":
            return Pair(zeros, torch.zeros(E))
        if self.kind == "namespace":
            return types.SimpleNamespace(load=zeros, total=torch.zeros(()), calls=[])
        stats = Stats(zeros, torch.zeros(()), [])
        return {"inner": stats} if self.kind == "dict" else stats

    def forward(self, x: torch.Tensor, stats: Any = None) -> tuple[torch.Tensor, Any]:
        stats = self.fresh() if stats is None else stats
        for block in self.blocks:
            x = x + block(x, stats)
        return x, stats


def _state(stats: Any) -> list[Any]:
    held = stats["inner"] if isinstance(stats, dict) else stats
    if isinstance(held, Pair):
        return [held.load.clone(), held.seen.clone()]
    return [held.load.clone(), held.total.clone(), list(held.calls)]


def _same(a: list[Any], b: list[Any]) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


@pytest.mark.reliability("probe side effects")
@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "namespace", "dict"])
def test_state_handed_to_a_block_is_as_a_plain_forward_leaves_it(kind: str) -> None:
    """The first captured forward (at which each block's decision is established by runs of its forward) returns
    the plain forward's output, and the statistics object it filled holds one forward's writes per block; a replay of
    the capture after the gates change gives the same output and statistics as the capture."""
    torch.manual_seed(0)
    model = Model(kind).eval()
    x = torch.randn(6, D)
    with torch.no_grad():
        plain, plain_stats = model(x)
        with mr.attach(model) as session:
            with session.capture():
                captured, captured_stats = model(x)
            assert torch.equal(captured, plain), "the capture changed the model's output"
            assert _same(_state(captured_stats), _state(plain_stats)), (
                f"the runs left their writes: {_state(captured_stats)} against {_state(plain_stats)}"
            )
            routes = session.routes()
            for block in model.blocks:
                block.gate.weight.add_(torch.randn_like(block.gate.weight))
            with session.replay(routes):
                replayed, replayed_stats = model(x)
    assert _same(_state(replayed_stats)[:1], _state(captured_stats)[:1]), "the replay's loads are not the capture's"
    if kind == "namedtuple":
        return
    assert _state(replayed_stats)[2] == _state(captured_stats)[2]


@pytest.mark.reliability("probe side effects")
def test_the_callers_own_object_gets_the_forwards_writes_once() -> None:
    """The object the caller hands the model is the one the real forward writes into (put back after the runs, not
    replaced by a copy): after the first captured forward it holds one write per block, as after a plain one."""
    torch.manual_seed(1)
    model = Model("dataclass").eval()
    x = torch.randn(5, D)
    with torch.no_grad():
        plain_stats = model.fresh()
        model(x, plain_stats)
        stats = model.fresh()
        with mr.attach(model) as session, session.capture():
            _, returned = model(x, stats)
    assert returned is stats
    assert stats.calls == [5, 5], f"the caller's object holds {stats.calls}"
    assert torch.equal(stats.load, plain_stats.load) and torch.equal(stats.total, plain_stats.total)
