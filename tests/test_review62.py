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
from .test_review51 import _outcome
from .test_review58 import _list_cache_model, _ListAttention
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

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


class _LogAttention(_ListAttention):
    """Causal attention over the forward's own tokens alone (no KV cache): the module keeps a log of each forward's
    keys and values in two Python lists, for inspection, that no forward reads."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``[1, positions, hidden]`` in and out."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        self.keys.append(k.detach())
        self.values.append(v.detach())
        n = int(k.shape[1])
        seen = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        return (q @ k.transpose(1, 2)).masked_fill(~seen, float("-inf")).softmax(-1) @ v


def _log_model() -> nn.Module:
    """:func:`_list_cache_model` whose attention keeps a log in lists instead of a KV cache (see
    :class:`_LogAttention`), its experts watched."""
    model = _list_cache_model()
    for layer in model.layers:
        qkv = layer.attn.qkv
        layer.attn = _LogAttention()
        layer.attn.qkv = qkv
    _watch_experts(model)
    return model


def _emptied(model: nn.Module) -> None:
    for layer in model.layers:
        layer.attn.keys.clear()
        layer.attn.values.clear()


def _suffix_after_a_log(logged: int) -> dict[str, torch.Tensor] | None:
    """A 9-token sequence captured in one forward (no cache), its last 4 rows laid out alone (ids dropped) and fed
    at their recorded places 5 to 8 without the tokens before them, after a forward of ``logged`` other tokens
    filled the logs: what the replay dispatched, or None where refused."""
    model = _log_model()
    g = torch.Generator().manual_seed(6)
    seq, other = torch.randint(1, 128, (1, 9), generator=g), torch.randint(1, 128, (1, 5), generator=g)
    session = mr.attach(model)
    try:
        with torch.no_grad():
            with _dispatched(model) as rec, session.capture():
                model(seq, position_ids=torch.arange(9)[None])
            assert _joined(rec), "nothing dispatched: the oracle could not fail"
            routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)[5:]])
            _perturb(model)
            _emptied(model)
            if logged:
                model(other[:, :logged], position_ids=torch.arange(logged)[None])
            return _outcome(
                model, session, routes, lambda: model(seq[:, 5:], position_ids=torch.arange(5, 9)[None]), model
            )
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("logged", [0, 3])
def test_laid_out_rows_fed_without_their_prefix_beside_a_log_of_other_length_are_refused(logged: int) -> None:
    """Rows laid out alone, fed at their recorded places without the tokens before them, on a model that keeps no
    cache but a log of each forward's keys in lists (empty, or holding 3 tokens of another forward): refused, the
    model unchanged; the lists do not hold as many tokens as the places before the positions."""
    assert _suffix_after_a_log(logged) is None, "a suffix fed without its prefix forced"


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="lists of tensors a module keeps that hold exactly the places before a forward's positions, appended as "
    "many as it has, are read as a KV cache holding the tokens before them, whether or not attention reads them: a "
    "log of each forward's keys lets a suffix fed without its prefix through",
)
def test_laid_out_rows_fed_without_their_prefix_beside_a_log_of_as_many_tokens_are_refused() -> None:
    """The same rows fed after a forward of 5 other tokens filled the logs (as many as the places before the
    positions): the model reads no cache, so the suffix runs without its prefix, its routers' context is not the
    capture's, and the replay must be refused. Today the logs are read as a KV cache and the rows are forced."""
    assert _suffix_after_a_log(5) is None, "a suffix fed without its prefix forced beside a log read as a cache"


class _CatAttention(_ListAttention):
    """Causal attention over a KV cache the module grows by concatenation: ``kept="tensor"`` keeps it as plain
    tensor attributes, reassigned at each forward (``self.k = torch.cat([self.k, k], 1)``); ``kept="slot"`` as the
    one tensor of each of two Python lists, replaced in its slot; ``kept="last"`` keeps no cache (each forward
    attends to its own tokens) but its last forward's keys and values, reassigned."""

    def __init__(self, kept: str) -> None:
        super().__init__()
        self.kept = kept
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        if kept == "slot":
            self.keys, self.values = [], []

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``[1, positions, hidden]`` in and out; ``pos``: the tokens' places ``[positions]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.kept == "slot":
            if not self.keys:
                self.keys.append(k)
                self.values.append(v)
            else:
                self.keys[0] = torch.cat([self.keys[0], k], 1)
                self.values[0] = torch.cat([self.values[0], v], 1)
            keys, values = self.keys[0], self.values[0]
        elif self.kept == "tensor":
            self.k = k if self.k is None else torch.cat([self.k, k], 1)
            self.v = v if self.v is None else torch.cat([self.v, v], 1)
            keys, values = self.k, self.v
        else:
            self.k, self.v = keys, values = k, v
            pos = pos - pos[0]
        seen = torch.arange(keys.shape[1])[None, :] <= pos[:, None]
        return (q @ keys.transpose(1, 2)).masked_fill(~seen, float("-inf")).softmax(-1) @ values


def _cat_cache_turn(kept: str) -> tuple[nn.Module, mr.Session, torch.Tensor, mr.Routes, dict[str, torch.Tensor]]:
    """A model of :class:`_CatAttention` (``kept``), a 5-token prompt fed, then a 4-token turn at places 5 to 8
    captured: the model, its session, the turn, its rows laid out alone (ids dropped), the experts it dispatched;
    the caches are left as the prompt left them."""
    model = _list_cache_model()
    for layer in model.layers:
        qkv = layer.attn.qkv
        layer.attn = _CatAttention(kept)
        layer.attn.qkv = qkv
    _watch_experts(model)
    g = torch.Generator().manual_seed(6)
    prompt, turn = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 4), generator=g)
    session = mr.attach(model)
    with torch.no_grad():
        model(prompt, position_ids=torch.arange(5)[None])
        held = [(a.k, a.v, list(a.keys), list(a.values)) for a in (layer.attn for layer in model.layers)]
        with _dispatched(model) as rec, session.capture():
            model(turn, position_ids=torch.arange(5, 9)[None])
        want = _joined(rec)
        for layer, (k, v, keys, values) in zip(model.layers, held, strict=True):
            layer.attn.k, layer.attn.v, layer.attn.keys[:], layer.attn.values[:] = k, v, keys, values
    routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
    return model, session, turn, routes, want


@pytest.mark.reliability("false refusals")
def test_laid_out_rows_fed_at_their_recorded_places_after_a_cache_grown_by_concatenation_replay_exactly() -> None:
    """Rows laid out alone after a KV cache a module keeps as tensor attributes grown by concatenation (a
    hand-written decoder's ``self.k = torch.cat([self.k, k], 1)``), fed at the very places a capture recorded them at,
    the cache holding the prompt: the replay forces the captured experts (the perturbed model alone would use others).
    Once refused, naming with_token_ids: a tensor holding exactly the places before the positions, replaced by one
    that starts with it, was not read as a cache holding the tokens before them."""
    model, session, turn, routes, want = _cat_cache_turn("tensor")
    try:
        _perturb(model)
        forward = lambda: model(turn, position_ids=torch.arange(5, 9)[None])  # noqa: E731
        held = [(layer.attn.k, layer.attn.v) for layer in model.layers]
        with torch.no_grad(), _dispatched(model) as rec:
            forward()
        native = _joined(rec)
        assert any(not torch.equal(native[k], want[k]) for k in want), "the perturbation moved no decision"
        for layer, (k, v) in zip(model.layers, held, strict=True):
            layer.attn.k, layer.attn.v = k, v
        with torch.no_grad():
            got = _outcome(model, session, routes, forward, model)
        assert got is not None, "rows fed at their recorded places refused"
        assert got.keys() == want.keys()
        for layer, experts in got.items():
            assert torch.equal(experts, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("held", ["nothing", "the last forward's keys"])
def test_laid_out_rows_fed_at_their_recorded_places_without_a_grown_cache_of_their_prefix_are_refused(
    held: str,
) -> None:
    """The same rows fed at their recorded places where the module holds no cache of the tokens before them (the
    cache emptied; or a model keeping only its last forward's keys, five of them, reassigned with the turn's four):
    refused, the model unchanged."""
    model, session, turn, routes, _ = _cat_cache_turn("tensor" if held == "nothing" else "last")
    try:
        if held == "nothing":
            for layer in model.layers:
                layer.attn.k = layer.attn.v = None
        forward = lambda: model(turn, position_ids=torch.arange(5, 9)[None])  # noqa: E731
        with torch.no_grad():
            assert _outcome(model, session, routes, forward, model) is None
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
def test_laid_out_rows_fed_at_their_recorded_places_after_a_list_slot_grown_by_concatenation_replay_exactly() -> None:
    """As above, the cache kept as the one tensor of each of two lists, replaced in its slot by the grown tensor
    (``self.keys[0] = torch.cat([self.keys[0], k], 1)``): the replay forces the captured experts. Once refused: only a
    list the forward appended to was read as holding the tokens before the positions."""
    model, session, turn, routes, want = _cat_cache_turn("slot")
    try:
        _perturb(model)
        forward = lambda: model(turn, position_ids=torch.arange(5, 9)[None])  # noqa: E731
        with torch.no_grad():
            got = _outcome(model, session, routes, forward, model)
        assert got is not None, "rows fed at their recorded places refused"
        assert got.keys() == want.keys()
        for layer, experts in got.items():
            assert torch.equal(experts, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_the_last_rows_fed_at_their_recorded_places_after_a_list_slot_holding_the_prompt_alone_are_refused() -> None:
    """The turn's last two rows fed at 7 and 8 while the list slots hold the prompt alone (5 tokens, not the 7 before
    them): refused, the model unchanged."""
    model, session, turn, routes, _ = _cat_cache_turn("slot")
    try:
        forward = lambda: model(turn[:, 2:], position_ids=torch.arange(7, 9)[None])  # noqa: E731
        with torch.no_grad():
            assert _outcome(model, session, routes[2:], forward, model) is None
    finally:
        session.detach()
