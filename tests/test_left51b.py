"""Items left alone before: a router whose forward fails on every random input (the check of the tokens it decides
for could not run, and passed).

The oracle is the test's own hooks on each experts module (or the routes' rows against the experts each token used):
every token whose row names experts dispatches exactly those, or the replay is refused with the model as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

D, E = 16, 8


class _UnitRowsGate(nn.Module):
    """A gate whose forward asserts that its hidden states are unit rows (the model normalizes them before each
    layer), so that every random input fails it. ``choose``: ``"values"`` decides (a softmax top-2) only for the
    tokens whose first feature is positive, chosen in Python from their values, the others all on expert 0;
    ``"all"`` decides for every token (an ordinary top-2). ``distinct``: it also asserts that no two rows are alike
    (nothing made of the tokens' own rows drawn again runs either)."""

    def __init__(self, choose: str, distinct: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.choose, self.distinct = choose, distinct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, D]`` unit rows in, a dense ``[tokens, E]`` weight matrix out."""
        assert torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5), "hidden states not unit rows"
        if self.distinct:
            assert torch.unique(x, dim=0).shape[0] == x.shape[0], "two tokens' rows alike"
        logits = F.linear(x, self.weight)
        if self.choose == "all":
            w, i = logits.softmax(-1).topk(2, dim=-1)
            return torch.zeros_like(logits).scatter(1, i, w)
        chosen = torch.tensor([v > 0 for v in x[:, 0].tolist()], dtype=torch.bool)
        out = torch.zeros_like(logits)
        out[:, 0] = 1.0
        if chosen.any():
            w, i = logits[chosen].softmax(-1).topk(2, dim=-1)
            out[chosen] = torch.zeros_like(logits[chosen]).scatter(1, i, w)
        return out


class _DenseBlock(nn.Module):
    """Dispatch by the gate's dense weights: each expert runs on the tokens it weighs (the experts it is given
    noted per token as ``[tokens, E]`` booleans)."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.used: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, D]`` in and out."""
        w = self.gate(x)
        self.used.append(w != 0)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = torch.where(w[:, e] != 0)[0]
            if tok.numel():
                out = out.index_add(0, tok, w[tok, e, None] * expert(x[tok]))
        return out


class _UnitModel(nn.Module):
    """Two MoE layers, each fed its hidden states normalized to unit rows."""

    def __init__(self, choose: str, distinct: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_DenseBlock(_UnitRowsGate(choose, distinct)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, D]`` in and out."""
        for layer in self.layers:
            x = x + layer(F.normalize(x, dim=-1))
        return x


def _tokens(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _refused(model: nn.Module, x: torch.Tensor) -> str:
    """The message of the refusal to capture ``model(x)``, the model left as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError) as info:
            with session.capture():
                model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return str(info.value)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("tokens", [12, 3])
def test_tokens_chosen_by_value_are_refused_where_the_forward_fails_on_every_random_input(tokens: int) -> None:
    """A gate deciding only for the tokens their values pick, whose forward fails on every random input (it asserts
    unit rows): refused, naming the choice of tokens, from inputs made of its own tokens' rows. Once silent: the
    check ran no input and passed, and the routes held one row per chosen token (not one per token), forced on
    whichever tokens a replay chose afresh."""
    x = _tokens(tokens)
    assert 0 < int((F.normalize(x, dim=-1)[:, 0] > 0).sum()) < tokens, "some tokens chosen, not all"
    message = _refused(_UnitModel("values"), x)
    assert "which tokens it decides for is chosen from their values" in message, message


@pytest.mark.reliability("silent replays")
def test_a_check_of_the_tokens_decided_for_that_no_input_can_run_refuses_as_unchecked() -> None:
    """The same gate, its forward also failing on any two rows alike (so on its own rows drawn again too): nothing
    shows which tokens it decides for, and it is refused as unchecked, naming how to let the check run."""
    message = _refused(_UnitModel("values", distinct=True), _tokens())
    assert "could not be checked" in message and "fails on every other input tried" in message, message


@pytest.mark.reliability("false refusals")
def test_a_gate_deciding_for_every_token_that_fails_on_random_inputs_is_replayed_exactly() -> None:
    """An ordinary top-2 whose forward asserts unit rows (every random input fails it) is not refused: its own rows
    drawn again run, and show a decision for every token. The replay, router weights perturbed, forces the experts
    each token used when captured (and the perturbed model alone would use others)."""
    model = _UnitModel("all")
    x = _tokens()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        want = [layer.used[-1].clone() for layer in model.layers]
        for layer in model.layers:
            layer.gate.weight.add_(3 * torch.randn(E, D, generator=torch.Generator().manual_seed(2)))
        model(x)
        assert any(not torch.equal(layer.used[-1], w) for layer, w in zip(model.layers, want, strict=True))
        with session.replay(routes):
            model(x)
    for layer, name, w in zip(model.layers, session.names, want, strict=True):
        assert torch.equal(layer.used[-1], w), name
        rows = torch.zeros_like(w).scatter(1, routes.layer(name).long(), True)
        assert torch.equal(rows, w), name
