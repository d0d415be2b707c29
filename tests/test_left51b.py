"""Items left alone before: a router whose forward fails on every random input (the check of the tokens it decides
for could not run, and passed), and rows laid out after a KV cache kept in Python lists, fed at the very places a
capture recorded them at (refused though exact), other places and a missing prefix still refused.

The oracle is the test's own hooks on each experts module (or the routes' rows against the experts each token used):
every token whose row names experts dispatches exactly those, or the replay is refused with the model as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_review51 import _outcome
from .test_review58 import _list_cache_model
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

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
    assert "is made for every token could not be checked" in message, message
    assert "its own tokens' rows repeated or drawn again" in message, message


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


def _list_cache_turn() -> tuple[nn.Module, mr.Session, torch.Tensor, mr.Routes, dict[str, torch.Tensor], list]:
    """The model keeping its KV cache in Python lists, a prompt fed, then a 4-token turn at places 5 to 8 captured:
    the model, its session, the turn, its rows laid out alone (ids dropped), the experts it dispatched, and the
    caches' lists after the prompt."""
    model = _list_cache_model()
    _watch_experts(model)
    g = torch.Generator().manual_seed(6)
    prompt, turn = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 4), generator=g)
    session = mr.attach(model)
    with torch.no_grad():
        model(prompt, position_ids=torch.arange(5)[None])
        after_prompt = [(list(layer.attn.keys), list(layer.attn.values)) for layer in model.layers]
        with _dispatched(model) as rec, session.capture():
            model(turn, position_ids=torch.arange(5, 9)[None])
    routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
    return model, session, turn, routes, _joined(rec), after_prompt


def _put_back_lists(model: nn.Module, after_prompt: list) -> None:
    for layer, (keys, values) in zip(model.layers, after_prompt, strict=True):
        layer.attn.keys[:], layer.attn.values[:] = keys, values


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("part", ["whole turn", "last two"])
def test_laid_out_rows_fed_at_their_recorded_places_after_a_list_cache_replay_exactly(part: str) -> None:
    """Rows laid out with BatchLayout after a KV cache kept in Python lists, fed at exactly the places a capture
    recorded them at, the lists holding every token before them (the whole turn at 5 to 8 after the prompt, or its
    last two rows at 7 and 8 after the turn's first two were fed): the replay forces the captured experts. Once
    refused, naming with_token_ids: their positions were compared with the layout's places (0 to 3), and nothing a
    list held was read as a cache holding the tokens before them."""
    model, session, turn, routes, want, after_prompt = _list_cache_turn()
    try:
        cut = 0 if part == "whole turn" else 2
        _perturb(model)

        def before() -> None:
            _put_back_lists(model, after_prompt)
            if cut:
                model(turn[:, :cut], position_ids=torch.arange(5, 5 + cut)[None])

        with torch.no_grad(), _dispatched(model) as rec:
            before()
            model(turn[:, cut:], position_ids=torch.arange(5 + cut, 9)[None])
        native = {k: v[cut:] for k, v in _joined(rec).items()}
        with torch.no_grad():
            before()
            forward = lambda: model(turn[:, cut:], position_ids=torch.arange(5 + cut, 9)[None])  # noqa: E731
            got = _outcome(model, session, routes[cut:], forward, model)
        assert got is not None, "rows fed at their recorded places refused"
        assert got.keys() == want.keys()
        assert any(not torch.equal(native[k], want[k][cut:]) for k in want), "the perturbed model alone routes alike"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer][cut:]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("held", ["nothing", "the prompt alone"])
def test_laid_out_rows_fed_at_their_recorded_places_after_a_list_cache_missing_their_prefix_are_refused(
    held: str,
) -> None:
    """The same rows fed at their recorded places while the lists do not hold every token before them (emptied: the
    whole turn fed without its prompt; or holding the prompt alone while the turn's last two rows are fed at 7 and 8):
    refused, the model unchanged, as a suffix fed without its prefix is after a static cache."""
    model, session, turn, routes, _, after_prompt = _list_cache_turn()
    try:
        if held == "nothing":
            _put_back_lists(model, [([], []) for _ in after_prompt])
            cut = 0
        else:
            _put_back_lists(model, after_prompt)
            cut = 2
        forward = lambda: model(turn[:, cut:], position_ids=torch.arange(5 + cut, 9)[None])  # noqa: E731
        with torch.no_grad():
            assert _outcome(model, session, routes[cut:], forward, model) is None
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("at", [6, 4])
def test_laid_out_rows_fed_other_places_than_recorded_after_a_list_cache_stay_refused(at: int) -> None:
    """The same rows fed at other places than recorded and than the layout's (the turn one place on, or one place
    back): refused, the model unchanged."""
    model, session, turn, routes, _, after_prompt = _list_cache_turn()
    try:
        _put_back_lists(model, after_prompt)
        forward = lambda: model(turn, position_ids=torch.arange(at, at + 4)[None])  # noqa: E731
        with torch.no_grad():
            assert _outcome(model, session, routes, forward, model) is None
    finally:
        session.detach()
