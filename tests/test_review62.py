"""Round 62's review of round 51's first merges (the check of the tokens a router decides for on its own token rows,
a KV cache kept in Python lists read as holding the tokens before a forward's positions), as a hostile user would run
them.

The oracle is the experts each token used (the blocks' own record, or the test's hooks on each experts module):
every token whose row names experts dispatches exactly those, or the replay is refused with the model as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_left51b import _DenseBlock, _tokens

D, E = 16, 8


class _HalfGate(nn.Module):
    """A gate deciding (a softmax top-2) for half of its tokens, the others all on expert 0. ``choose``: ``"value"``
    picks the half of highest first feature, ranked in Python (as many tokens every time, whatever their values);
    ``"place"`` picks every other token by its place. ``unit``: its forward asserts unit rows (every random input
    fails it, so the check runs on inputs made of its own rows)."""

    def __init__(self, choose: str, unit: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.choose, self.unit = choose, unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, D]`` in, a dense ``[tokens, E]`` weight matrix out."""
        if self.unit:
            assert torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5), "hidden states not unit rows"
        n = int(x.shape[0])
        chosen = torch.zeros(n, dtype=torch.bool)
        if self.choose == "value":
            chosen[sorted(range(n), key=lambda i: -float(x[i, 0]))[: n // 2]] = True
        else:
            chosen[::2] = True
        logits = F.linear(x, self.weight)
        out = torch.zeros_like(logits)
        out[:, 0] = 1.0
        w, i = logits[chosen].softmax(-1).topk(2, dim=-1)
        out[chosen] = torch.zeros_like(logits[chosen]).scatter(1, i, w)
        return out


class _HalfModel(nn.Module):
    """Two MoE layers of :class:`_HalfGate`, each fed its hidden states normalized to unit rows."""

    def __init__(self, choose: str, unit: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_DenseBlock(_HalfGate(choose, unit)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, D]`` in and out."""
        for layer in self.layers:
            x = x + layer(F.normalize(x, dim=-1))
        return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("unit", [False, True], ids=["runs on random inputs", "fails on random inputs"])
def test_as_many_tokens_chosen_by_value_each_time_are_refused(unit: bool) -> None:
    """A gate deciding for the half of its tokens of highest value, ranked in Python: every input (random, or made
    of its own rows) has it decide for as many tokens, so the count of its rows told nothing. Once silent: its routes
    held one row per chosen token, and a replay after the first layer's experts changed forced the second layer's
    rows on the half chosen afresh (other tokens). Refused now, naming the choice of tokens, the model unchanged."""
    model, x = _HalfModel("value", unit), _tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError) as info:
            with session.capture():
                model(x)
    assert "which tokens it decides for is chosen from their values" in str(info.value), str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("unit", [False, True], ids=["runs on random inputs", "fails on random inputs"])
def test_tokens_chosen_by_place_are_replayed_exactly(unit: bool) -> None:
    """The same gate deciding for every other token by its place: not refused, and a replay, the first layer's
    experts changed (the second layer's scores then differ), forces the experts each token used when captured."""
    model, x = _HalfModel("place", unit), _tokens()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        want = [layer.used[-1].clone() for layer in model.layers]
        g = torch.Generator().manual_seed(3)
        for expert in model.layers[0].experts:
            expert.weight.add_(torch.randn(expert.weight.shape, generator=g))
        for layer in model.layers:
            layer.gate.weight.add_(3 * torch.randn(E, D, generator=g))
        model(x)
        assert any(not torch.equal(layer.used[-1], w) for layer, w in zip(model.layers, want, strict=True))
        with session.replay(routes):
            model(x)
    for layer, name, w in zip(model.layers, session.names, want, strict=True):
        assert torch.equal(layer.used[-1], w), name
