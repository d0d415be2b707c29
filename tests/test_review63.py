"""Round 63's review: a mask of zeros and ones a router is handed beside its hidden states, read as data given again at
the replay; the model computes some such masks from its own weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay.models import MoEBlock, MoEConfig

from .test_harden50 import _as_it_was, _hooks, _state
from .test_review51 import _outcome
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_D, _E, _K, _T = 8, 4, 2, 6


class _MaskedRouter(nn.Module):
    """A top-k router that cuts the slots a mask it is handed (``keep``: one value per slot) holds no more than 0.5 at,
    and weighs the others by it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(F.softmax(self.gate(x), dim=-1), _K, dim=-1)
        return torch.where(keep > 0.5, w * keep, torch.zeros_like(w)), idx


class _KeepModel(nn.Module):
    """A model that computes its router's keep-mask from weights of its own (``straight``: a straight-through
    estimator, whose zeros and ones carry the gradient of the soft scores; else a hard threshold)."""

    def __init__(self, straight: bool) -> None:
        super().__init__()
        self.router = _MaskedRouter()
        self.keeper = nn.Linear(_D, _K, bias=False)
        self.straight = straight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = torch.sigmoid(self.keeper(x))
        hard = (soft > 0.5).to(x.dtype)
        return self.router(x, hard + (soft - soft.detach()) if self.straight else hard)


def _used(w: torch.Tensor, idx: torch.Tensor) -> set[tuple[int, int]]:
    """The (token, expert) pairs a router's output weighs more than 0."""
    return {(t, int(idx[t, j])) for t in range(idx.shape[0]) for j in range(idx.shape[1]) if float(w[t, j]) > 0}


def _replayed_after_training(model: _KeepModel, x: torch.Tensor, grad: bool) -> tuple[Any, Any]:
    """The pairs a capture of ``model(x)`` used, and those its replay uses after the keep-mask's weights moved."""
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session:
        with session.capture(), torch.set_grad_enabled(grad):
            w, idx = model(x)
        routes = session.routes()
        with torch.no_grad():
            model.keeper.weight.neg_()  # (training moved the keep-mask's weights: other slots are kept now)
        with session.replay(routes), torch.no_grad():
            w2, idx2 = model(x)
    return _used(w.detach(), idx), _used(w2, idx2)


@pytest.mark.reliability("silent replays")
def test_a_straight_through_keep_mask_the_model_computes_is_varied_not_read_as_data() -> None:
    """A mask of zeros and ones that requires gradients (a straight-through estimator over a keep-mask the model
    learns) is computed from the model's weights, not handed in by the caller: a replay after training cuts other
    slots by it, forcing experts the capture's tokens never used. It was read as data given again (as DeepSpeed's
    ``used_token`` is) and the router accepted; it is varied as any second input is now, and the cut after the
    decision refused by name, the model as it was."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _KeepModel(straight=True)
    kept = torch.sigmoid(model.keeper(x)) > 0.5
    assert not bool(kept.all()) and bool(kept.any())  # (the mask cuts some slots, not all)
    state, hooks = _state(model), _hooks(model)
    with pytest.raises(mr.UnsupportedRouterError) as info:
        _replayed_after_training(model, x, grad=True)
    assert "router 'router'" in str(info.value) and "after its" in str(info.value)
    _as_it_was(model, state, hooks)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a hard keep-mask of zeros and ones the model computes from its weights is read as data given again",
)
def test_a_hard_keep_mask_the_model_computes_is_not_read_as_data_given_again() -> None:
    """A keep-mask the model thresholds from weights of its own (no gradient) and hands its router is read as data the
    replay is given again (DeepSpeed's ``used_token``): after training, the replay keeps other slots than the capture
    did and forces experts on tokens that never used them, though every check passes. Exact or refused once fixed."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _KeepModel(straight=False)
    try:
        captured, replayed = _replayed_after_training(model, x, grad=False)
    except mr.UnsupportedRouterError:
        return  # (refused: what a fix may do)
    assert replayed <= captured, f"forced experts the capture's tokens never used: {sorted(replayed - captured)}"


@pytest.mark.reliability("silent replays")
def test_a_mask_the_caller_hands_in_is_still_read_as_data() -> None:
    """The change leaves a caller's own mask of zeros and ones (padding routed nowhere, DeepSpeed's ``used_token``)
    read as data: the router is accepted and its replay of the same batch keeps exactly the experts its capture
    used."""

    class _Given(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = _MaskedRouter()

        def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.router(x, keep)

    torch.manual_seed(0)
    x, keep = torch.randn(_T, _D), (torch.arange(_T * _K).reshape(_T, _K) % 3 != 0).float()
    model = _Given()
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            w, idx = model(x, keep)
        routes = session.routes()
        model.router.gate.weight.neg_()
        with session.replay(routes):
            w2, idx2 = model(x, keep)
    assert _used(w2, idx2) == _used(w, idx) and bool((w2 == 0).any())


class _AvailabilityRouter(nn.Module):
    """A top-k router over the softmax of logits an availability mask of the model's sets to ``-inf`` (an expert out of
    service: ``avail`` 0 for it), the mask applied before the softmax, not to the top-k's input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)

    def forward(self, x: torch.Tensor, avail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x).masked_fill(avail == 0, float("-inf"))
        return torch.topk(F.softmax(logits, dim=-1), _K, dim=-1)


class _AvailabilityModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = _AvailabilityRouter()
        self.register_buffer("avail", torch.ones(_E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x, self.avail)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a forced expert masked to -inf before a softmax that feeds the top-k gets a weight of 0 at the replay",
)
def test_a_forced_expert_masked_before_the_softmax_of_the_top_k_input_keeps_a_weight() -> None:
    """An availability mask applied to the logits before the softmax whose top-k decides: the capture's experts, one
    of them taken out of service since (its logit ``-inf`` now), are forced at the replay, but the forced expert is
    gathered from the masked softmax and weighs exactly 0, so the token uses one expert fewer than the capture
    recorded, with every check passing. A mask applied to the top-k's input itself (``masked_fill`` of the scores,
    then ``topk``) is read through (its forced experts keep their unmasked values); through a softmax it is not.
    Every forced expert weighs more than 0 once fixed, or the replay is refused."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _AvailabilityModel()
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            w, idx = model(x)
        routes = session.routes()
        assert bool((w > 0).all())  # (every captured slot used)
        model.avail[int(idx[0, 0])] = 0  # (the expert token 0 chose first taken out of service)
        try:
            with session.replay(routes):
                w2, idx2 = model(x)
        except mr.MoEReplayError:
            return  # (refused: what a fix may do)
    assert torch.equal(idx2, idx)
    assert bool((w2 > 0).all()), f"forced experts weighed 0: {(w2 == 0).nonzero().tolist()}"


@pytest.mark.reliability("silent replays")
def test_a_forced_expert_masked_in_the_top_k_input_itself_keeps_its_unmasked_weight() -> None:
    """Beside the gap above: the same mask applied to the top-k's input itself (the softmax's probabilities filled
    with 0 where an expert is out of service) leaves every forced expert its unmasked probability at the replay."""

    class _Filled(_AvailabilityRouter):
        def forward(self, x: torch.Tensor, avail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.topk(F.softmax(self.gate(x), dim=-1).masked_fill(avail == 0, 0.0), _K, dim=-1)

    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _AvailabilityModel()
    model.router = _Filled()
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, torch.no_grad():
        with session.capture():
            _, idx = model(x)
        routes = session.routes()
        model.avail[int(idx[0, 0])] = 0
        with session.replay(routes):
            w2, idx2 = model(x)
    want = F.softmax(model.router.gate(x), dim=-1).gather(-1, idx)
    assert torch.equal(idx2, idx) and torch.allclose(w2, want)


class _CountsItsPositions(nn.Module):
    """``nn.Transformer``'s shape of a model: ids fed ``[positions, batch]``, no ``position_ids`` (it counts its
    tokens' places itself and adds a learned embedding of each), a causal mixer along each sequence before each MoE
    block (its routers see the batch sequence by sequence; ``mix=False``: none, each token's row its own alone).
    ``sort``: a layer before them that orders the sequences by their first token's id."""

    def __init__(self, sort: bool = False, mix: bool = True) -> None:
        super().__init__()
        torch.manual_seed(5)
        cfg = MoEConfig(hidden_size=16, num_heads=2, num_experts=4, top_k=2, expert_size=8, vocab_size=64)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(16, cfg.hidden_size)
        self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(2))
        self.sort, self.mix = sort, mix

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        seq = src.t()  # ([batch, positions])
        if self.sort:
            seq = seq[seq[:, 0].argsort(stable=True)]
        x = self.embed(seq) + self.pos(torch.arange(seq.shape[1]))[None]
        for block in self.blocks:
            if self.mix:
                x = x + x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
            x = x + block(x)
        return x.transpose(0, 1)


def _sequence_first_ids() -> torch.Tensor:
    """Three sequences of five tokens, fed ``[positions, batch]``, each sequence's first token another."""
    ids = torch.randint(1, 64, (5, 3), generator=torch.Generator().manual_seed(3))
    ids[0] = torch.tensor([40, 7, 21])
    return ids


@pytest.mark.reliability("false refusals")
@pytest.mark.xfail(
    strict=True,
    reason="a [positions, batch] forward fed no position_ids has its order checked by rolling its positions, which a "
    "model that counts them itself sees moved: its ids are dropped and its capture's routes refused",
)
def test_a_positions_first_forward_that_counts_its_own_positions_replays_its_capture_exactly() -> None:
    """A model fed ``[positions, batch]`` ids and no ``position_ids`` (it counts them itself, as ``nn.Transformer``'s
    positional encoding does): its capture's routes are refused on the very forward they were captured from, its
    ids dropped as of no one order, since the check that the routers' rows follow the sequences rolls the positions
    (read as the batch), which such a model sees moved. Rolling its true batch instead tells the order, but the
    places its rows are recorded at are then read as the ids' columns (its true sequences), not its positions
    (see the test below, which such a fix must keep passing). Once fixed: the replay forces exactly the captured
    experts, and the same routes fed the sequences in another order are refused by their ids."""
    model = _CountsItsPositions()
    _watch_experts(model)
    ids = _sequence_first_ids()
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(ids)
        want, routes = _joined(rec), session.routes()
        assert routes.token_ids is not None
        _perturb(model)
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(ids), model)
            swapped = _outcome(model, session, routes, lambda: model(ids[:, [1, 0, 2]]), model)
        assert got is not None, "the capture's routes refused on the forward they were captured from"
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert swapped is None, "routes forced on the sequences in another order"
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_positions_first_forward_that_sorts_its_sequences_keeps_no_ids() -> None:
    """Beside it: the same model with a layer that orders the sequences by their first token before the routers still
    has its order refused as its own (the rows do not follow its sequences when they are rolled), so its routes
    replayed by ids are refused, not checked in an order its routers do not see."""
    model = _CountsItsPositions(sort=True)
    ids = _sequence_first_ids()
    assert not bool((ids[0].argsort() == torch.arange(3)).all())  # (the sort moves the sequences)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes()
        state = _state(model)
        with pytest.raises(mr.TokenMismatchError, match="in an order of their own"):
            with session.replay(routes):
                model(ids)
        assert all(torch.equal(v, state[k]) for k, v in _state(model).items())


@pytest.mark.reliability("false refusals")
@pytest.mark.xfail(
    strict=True,
    reason="a [positions, batch] forward that counts its own positions and mixes no tokens before its first router "
    "has its order checked by rolling its positions, which it sees moved: its capture's routes are refused",
)
def test_a_positions_first_forward_that_mixes_no_tokens_before_its_routers_replays_its_capture_exactly() -> None:
    """The same model with no mixer: a change of one token moves its own row alone, which both readings of the ids
    place alike, so the order is told as the ids read batch-first are and checked by rolling their first dimension,
    the positions, which the model sees moved (it counts them itself). Its capture's routes are refused on the very
    forward they came from; rolling the other dimension alike would let a layer that sorts the sequences by what a
    roll along them keeps (their lengths) pass. Exact once fixed."""
    model = _CountsItsPositions(mix=False)
    _watch_experts(model)
    ids = _sequence_first_ids()
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(ids)
        want, routes = _joined(rec), session.routes()
        _perturb(model)
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(ids), model)
        assert got is not None, "the capture's routes refused on the forward they were captured from"
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_rows_without_ids_of_a_positions_first_forward_counting_its_positions_fed_another_slice_are_refused() -> None:
    """The rows of positions 0..2 of a ``[positions, batch]`` capture fed no ``position_ids``, their ids dropped, are
    refused on the tokens of positions 3..5: places read from such ids without positions are the ids' columns (the
    true sequences), which both slices share, so a forward whose order is told must not compare them as places."""
    model = _CountsItsPositions()
    ids = torch.randint(1, 64, (6, 2), generator=torch.Generator().manual_seed(3))
    session = mr.attach(model)
    try:
        with torch.no_grad(), session.capture():
            model(ids)
        rows = torch.tensor([b * 6 + p for b in range(2) for p in range(3)])  # (positions 0..2 of each sequence)
        routes = session.routes()[rows].with_token_ids(None)
        _perturb(model)
        with torch.no_grad():
            other = _outcome(model, session, routes, lambda: model(ids[3:]), model)
        assert other is None, "rows forced on the tokens of other positions"
    finally:
        session.detach()
