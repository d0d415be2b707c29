"""Adversarial review, round 38: misuse and router code from outside the suite.

Each case must be exact (the recorded experts forced on the tokens they were recorded for) or refused with a
``MoEReplayError``: never silent, and never a refusal of an exact replay.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot

D, E, K, V = 16, 8, 2, 50


# ------------------------------------------------------------------- token ids given by the name of the first parameter
class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = K

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return vals / vals.sum(-1, keepdim=True), idx


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()
        self.w = nn.Parameter(torch.randn(E, D, D) / 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        w, idx = self.gate(x)
        out = torch.einsum("tkd,tkdf->tf", x[:, None] * w[..., None], self.w[idx])
        return (x + out).reshape(h.shape)


class _NamedIds(nn.Module):
    """A language model without an ``nn.Embedding`` (a table indexed by the ids), whose forward takes its ids as
    ``tokens`` (torchtitan's name; nanoGPT's is ``idx``); ``first``: its layers run ``[positions, batch, hidden]``."""

    def __init__(self, first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(V, D))
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.first = first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb[tokens]
        h = h.transpose(0, 1) if self.first else h
        for layer in self.layers:
            h = layer(h)
        h = h.transpose(0, 1) if self.first else h
        return h @ self.emb.T


class _KeywordOnlyIds(_NamedIds):
    def forward(self, *, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first", [False, True], ids=["batch_major", "sequence_first"])
@pytest.mark.parametrize("make", [_NamedIds, _KeywordOnlyIds], ids=["named", "keyword_only"])
def test_routes_of_a_model_fed_its_ids_by_the_name_of_its_first_parameter_are_checked(make: Any, first: bool) -> None:
    """Once silent: the ids were read only as ``input_ids=`` or the first positional argument, so a model called
    ``model(tokens=ids)`` recorded routes without token ids, and routes of another batch (the sequences swapped) were
    forced with no ``TokenMismatchError``. Given by the name of the forward's first parameter, they are read as given
    by position: the routes know their ids (in the order of their tokens where the layers see them sequence-first),
    the swapped batch is refused, and the batch they were recorded for replays its experts."""
    torch.manual_seed(0)
    model = make(first)
    a = torch.randint(0, V, (2, 8))
    session = mr.attach(model, include="layers.*.gate")
    with torch.no_grad(), session.capture():
        model(tokens=a)
    routes = session.routes()
    assert routes.token_ids is not None
    assert torch.equal(routes.in_token_order().token_ids, a.flatten())
    with pytest.raises(mr.TokenMismatchError), torch.no_grad(), session.replay(routes):
        model(tokens=a.flip(0))
    with torch.no_grad():  # (other router weights: a replay that forced nothing would choose other experts)
        for layer in model.layers:
            layer.gate.weight.add_(torch.randn(E, D) * 3)
        model(tokens=a)
    state = snapshot(model)
    with session.capture():
        with session.replay(routes):
            model(tokens=a).square().sum().backward()
        assert session.routes().equal(routes)
    session.detach()
    assert_untouched(model, state)
