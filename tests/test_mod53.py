"""The record of a choice, made outside the routers, of which tokens reach them, carried wherever routes go.

A module that ranks its own scores to choose which tokens reach its routers (Mixture-of-Depths) has its rankings
recorded at capture; routes saved and loaded, joined, cut at whole forwards or sent over the wire keep them, so such a
replay runs where the choice is the same and is refused where it is not. Routes whose record cannot be kept (a cut
inside a sequence) are refused, never replayed on tokens that cannot be shown to be the recorded ones. A choice made
by a threshold on the scores (a boolean mask the module picks its tokens by) is recorded and checked alike, and a mask
given as input (unpadding) is the same at replay.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe_replay as mr
from moe_replay._choice_record import cut_choices
from moe_replay.distributed import _known, _pack, _restore, _unpack
from tests.test_mod52 import _move_mod_choice, _x
from tests.test_public_routers32 import MixtralDecoderLayer, MoD, MoDStack


def _captured(session: mr.Session, model: MoDStack, *inputs: torch.Tensor) -> mr.Routes:
    with session.capture(), torch.no_grad():
        for x in inputs:
            model(x)
    return session.routes()


def _replays(session: mr.Session, model: MoDStack, routes: mr.Routes, *inputs: torch.Tensor) -> None:
    with session.replay(routes), torch.no_grad():
        for x in inputs:
            model(x)


def _refused(session: mr.Session, model: MoDStack, routes: mr.Routes, *inputs: torch.Tensor, match: str) -> None:
    with pytest.raises(mr.TokenMismatchError, match=match):
        _replays(session, model, routes, *inputs)


def _wire(routes: mr.Routes) -> mr.Routes:
    """Routes as another rank receives them (the same ints the collectives send)."""
    flat = _pack(routes, torch.device("cpu"))
    return _restore(_unpack(flat, routes.tokens_per_layer, routes, True), _known(routes), routes._dropped_rows)


@pytest.mark.reliability("silent replays")
def test_saved_and_loaded_routes_keep_the_choice_and_refuse_another(tmp_path: Path) -> None:
    """Routes of two forwards written to a file and read back replay them exactly (a capture inside the replay
    records the same rows); once MoD's weights move so that it chooses other tokens, the loaded routes are refused."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        routes = _captured(session, model, x, x[:1])
        path = tmp_path / "routes.npz"
        routes.save(path)
        loaded = mr.Routes.load(path)
        assert loaded._token_choices is not None
        with session.replay(loaded), session.capture(), torch.no_grad():
            model(x)
            model(x[:1])
        assert session.routes().equal(routes)
        _move_mod_choice(model, x)
        _refused(session, model, loaded, x, x[:1], match="other tokens")


@pytest.mark.reliability("silent replays")
def test_joined_routes_and_the_wire_keep_each_forwards_choice() -> None:
    """Two ranks' captures gathered over the wire and joined replay both in turn, and each rank's share cut back out
    of the join (split_routes at whole forwards, sent again) replays its own; after MoD moves, each is refused."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        first = _captured(session, model, x)
        second = _captured(session, model, x[1:])
        joined = mr.Routes.cat([_wire(first), _wire(second)])
        _replays(session, model, joined, x, x[1:])
        shares = [_wire(p) for p in mr.distributed.split_routes(joined, [first.num_tokens, second.num_tokens])]
        _replays(session, model, shares[0], x)
        _replays(session, model, shares[1], x[1:])
        with pytest.raises(mr.MoEReplayError):  # (the first rank's share replayed on the second's tokens)
            _replays(session, model, shares[0], x[1:])
        _move_mod_choice(model, x)
        _refused(session, model, joined, x, x[1:], match="other tokens")
        _refused(session, model, shares[0], x, match="other tokens")


@pytest.mark.reliability("silent replays")
def test_a_slice_of_whole_forwards_keeps_theirs_and_a_cut_inside_one_is_refused() -> None:
    """routes[a:b] at the bounds of the capture's forwards keeps those forwards' choices (the second forward alone
    replays); a slice inside a sequence's rows keeps no record of which tokens its routers saw: refused."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        routes = _captured(session, model, x, x[:1])
        whole = routes.tokens_per_layer[0] - 2  # (the first forward's rows: two sequences' of two rows each)
        assert routes[:whole]._token_choices is not None and routes[whole:]._token_choices is not None
        _replays(session, model, routes[whole:], x[:1])
        _replays(session, model, routes[:whole], x)
        cut = routes[1:3]
        assert cut._token_choices is None
        with pytest.raises(mr.MoEReplayError):
            _replays(session, model, cut, x[:1])
        _move_mod_choice(model, x)
        _refused(session, model, routes[whole:], x[:1], match="other tokens")


def test_a_cut_between_sequences_keeps_their_rows_of_each_ranking() -> None:
    """A forward of two sequences of three rows each, cut at its second sequence: each ranking of one row per
    sequence keeps that sequence's row; a cut inside a sequence, or of a ranking not per sequence, keeps none."""
    idx = torch.tensor([[4, 1, 2], [0, 5, 3]])
    flat = torch.tensor([7, 2, 9, 1])
    choices = (("mod", idx), ("mod.inner", idx + 1))
    kept, counts = cut_choices(choices, (2,), ((6, 1),), (1,), 3, 6)
    assert kept is not None and counts == (2,)
    assert [p for p, _ in kept] == ["mod", "mod.inner"]
    assert torch.equal(kept[0][1], idx[1:]) and torch.equal(kept[1][1], idx[1:] + 1)
    assert cut_choices(choices, (2,), ((6, 1),), (1,), 2, 6) == (None, None)
    assert cut_choices((("mod", flat),), (1,), ((6, 1),), (1,), 3, 6) == (None, None)
    assert cut_choices(choices, None, ((6, 1),), (1,), 0, 6) == (None, None)


class _ThresholdMoD(MoD):
    """Mixture-of-Depths choosing its tokens by a fixed threshold on its scores (no ranking): each sequence's tokens
    whose score is over 0 go through the Mixtral layer, by boolean indexing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x)
        chosen = weights > 0
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            if bool(chosen[i].any()):
                out[i][chosen[i]] = self.block(x[i][chosen[i]].unsqueeze(0))[0][0] * weights[i][chosen[i]][:, None]
        return out + x * (~chosen)[..., None].to(x.dtype)


class _ThresholdStack(MoDStack):
    """One such layer: only its threshold, and so only the tokens its gate sees, moves."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = torch.nn.ModuleList([_ThresholdMoD(0.5, MixtralDecoderLayer())])  # (one: one gate)


@pytest.mark.reliability("silent replays")
def test_a_threshold_choice_of_other_tokens_at_replay_is_refused() -> None:
    """MoD's threshold on its own scores lets other tokens (as many in each sequence) reach the first Mixtral gate
    once its weights move: the recorded rows would be forced on other tokens; the replay must be refused."""
    model = _ThresholdStack().eval()
    x = _x()
    with mr.attach(model) as session:
        routes = _captured(session, model, x)
        layer = model.layers[0]
        before = layer.router(x) > 0
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _ in range(200):
                layer.router.weight_predictor.weight.copy_(
                    torch.randn(layer.router.weight_predictor.weight.shape, generator=g)
                )
                after = layer.router(x) > 0
                if torch.equal(after.sum(dim=1), before.sum(dim=1)) and not torch.equal(after, before):
                    break
            else:
                raise AssertionError("no MoD router weights found that choose other tokens, as many")
        with pytest.raises(mr.TokenMismatchError, match="other tokens"):
            _replays(session, model, routes, x)


class _Unpadding(torch.nn.Module):
    """A block holding a Mixtral layer that takes out the padding by a float attention mask given as input (compared
    with 0.5, then boolean indexing): its gate sees fewer tokens than fed, by a choice the input makes."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.block = MixtralDecoderLayer()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if hasattr(m, "cursor"):
                m.cursor, m.used = 0, None
        kept = mask > 0.5
        out = torch.zeros_like(x)
        out[kept] = self.block(x[kept].unsqueeze(0))[0][0]
        return out


@pytest.mark.reliability("false refusals")
def test_unpadding_by_a_mask_given_as_input_and_a_threshold_choosing_the_same_tokens_replay() -> None:
    """A mask given as input (the same at replay) and a threshold that lets the same tokens through (only the gates
    changed) are recorded and found the same: the replays run and force the recorded rows."""
    model = _Unpadding().eval()
    x = _x()
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x, mask)
        routes = session.routes()
        assert routes._token_choices, "the mask the block picks its tokens by is recorded"
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            gate = model.block.block_sparse_moe.gate.weight
            gate.add_(3.0 * torch.randn(gate.shape, generator=g))
        with session.capture(), torch.no_grad():
            model(x, mask)
        assert not session.routes().equal(routes), "the changed gate chooses the recorded experts anyway"
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x, mask)
        assert session.routes().equal(routes)
    model = _ThresholdStack().eval()
    with mr.attach(model) as session:
        routes = _captured(session, model, x)
        with torch.no_grad():
            model.layers[0].block.block_sparse_moe.gate.weight.mul_(-1.0)
        with session.capture(), torch.no_grad():
            model(x)
        assert not session.routes().equal(routes), "the changed gate chooses the recorded experts anyway"
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(routes)
