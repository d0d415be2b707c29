"""The router calls of each forward, where the check of them did not run: a replay forward makes the calls of the
captured forward it replays, on its rows, or is refused; slices cut through a forward of several calls, a replay that
does not read its ids back, routes whose ids are each router's own. Plain uses are not refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
import moe_replay.session as mr_session
from moe_replay.distributed import split_routes
from tests.conftest import tried
from tests.test_review44 import D, T, _Block, _FedIds, _Gate, _LogsItsRouting, _Model, _tokens, _used


class _SharedGate(nn.Module):
    """Two blocks that call one router (a router shared by every layer): two calls of it per forward, each on other
    hidden states. Fed token ids (``ids``) or embeddings; each block may run under activation checkpointing."""

    def __init__(self, ids: bool = False, checkpointed: str = "") -> None:
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.ids, self.checkpointed = ids, checkpointed
        gate = _Gate()
        self.layers = nn.ModuleList(_Block(gate, 10 + i) for i in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.ids else x
        for layer in self.layers:
            h = checkpoint(layer, h, use_reentrant=self.checkpointed == "reentrant") if self.checkpointed else layer(h)
        return h


def _inputs(ids: bool, seed: int) -> torch.Tensor:
    """A forward's tokens: ids (the same for every seed: ids cannot tell the forwards apart) or embeddings."""
    return torch.arange(T) % 50 if ids else _tokens(seed)


def _travelled(routes: mr.Routes, how: str, tmp_path: Path) -> mr.Routes:
    if how == "saved":
        routes.save(tmp_path / "r.npz")
        return mr.Routes.load(tmp_path / "r.npz")
    if how == "pickled":
        return pickle.loads(pickle.dumps(routes))
    return routes


# slices of the routes of two forwards of the shared router (rows 0..19: layer 0 of the first forward, 20..39: its
# layer 1, 40..59 and 60..79: the second forward's), each cut through a forward of two calls, and what a forward of
# the model fed the tokens the slice begins with would read for its layer 0
_CUTS = {
    "[20:60]": lambda r: r[20:60],  # (the first forward's layer 1, the second's layer 0)
    "[5:35]": lambda r: r[5:35],  # (tokens 5.. at layer 0, then tokens 0..14 at layer 1)
    "[20:80]": lambda r: r[20:80],  # (the first forward's layer 1, then the whole second forward)
    "cat([20:40], [40:60])": lambda r: mr.Routes.cat([r[20:40], r[40:60]]),  # (slices that meet again)
    "cat([20:40], [60:80])": lambda r: mr.Routes.cat([r[20:40], r[60:80]]),  # (each forward's layer 1)
    "[20:80][0:40]": lambda r: r[20:80][0:40],  # (a slice of a slice)
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["captured", "saved", "pickled"])
@pytest.mark.parametrize("cut", list(_CUTS))
@pytest.mark.parametrize("ids", [False, True], ids=["embeddings", "ids"])
def test_a_slice_cut_through_a_forward_of_several_router_calls_is_refused(
    ids: bool, cut: str, how: str, tmp_path: Path
) -> None:
    """Once silent: a slice of routes cut inside a captured forward that called its router twice (a router shared by
    both layers) begins with another layer's rows, or with a part of a call; a forward of the model replayed from it
    forced the rows of the second layer (or of other tokens) on the first with every check passing (the same tokens
    twice: ids alike). Refused as the forward begins, before a router reads a row; also from a file or a pickle."""
    model = _SharedGate(ids)
    x = _inputs(ids, 1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(_inputs(ids, 2))
        routes = session.routes()
        part = _travelled(_CUTS[cut](routes), how, tmp_path)
        begins = 5 if cut == "[5:35]" else 0
        with pytest.raises(mr.TokenMismatchError, match=r"forward 1 of this replay\(\) begins at row 0 .* cut through"):
            with session.replay(part, strict=False):
                model(x[begins:])
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", [False, True], ids=["embeddings", "ids"])
def test_whole_forwards_of_a_shared_router_replay_exactly_however_sliced_or_joined(ids: bool) -> None:
    """Not refused: slices at the forwards of the capture (micro-batches of whole forwards), those slices joined
    again (in their order or another), the parts of a forward joined again (slices, split_routes): each replays the
    calls of its forwards exactly."""
    model = _SharedGate(ids)
    first, second = _inputs(ids, 1), _inputs(ids, 2)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(first)
            used_first = _used(model)
            model(second)
            used_second = _used(model)
        routes = session.routes()
        for part, fed, want in [
            (routes[0:40], [first], [used_first]),
            (routes[40:80], [second], [used_second]),
            (mr.Routes.cat([routes[0:40], routes[40:80]]), [first, second], [used_first, used_second]),
            (mr.Routes.cat([routes[0:25], routes[25:40]]), [first], [used_first]),
            (mr.Routes.cat([routes[40:80], routes[0:40]]), [second, first], [used_second, used_first]),
        ]:
            assert part._forward_calls is not None and min(part._forward_calls) > 0
            with session.replay(part):
                for x, used in zip(fed, want, strict=True):
                    model(x)
                    assert torch.equal(_used(model).long(), used.long())
        one = routes[0:40]
        halves = split_routes(one, [25, 15])  # (cut inside its second call, joined again)
        with session.replay(mr.Routes.cat(halves)):
            model(first)
            assert torch.equal(_used(model).long(), used_first.long())
    tried(6)


@pytest.mark.reliability("silent replays")
def test_a_slice_inside_a_forward_of_one_router_call_is_a_micro_batch() -> None:
    """Where each captured forward called each router once, routes[i:j] inside a forward is its tokens i..j: not
    refused, and each token gets its own rows."""
    model = _Model(_Gate)
    x = _tokens(1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        used = _used(model)
        for a, b in [(0, 7), (7, 20), (3, 11)]:
            with session.replay(routes[a:b]):
                model(x[a:b])
                assert torch.equal(_used(model).long(), used[a:b].long())
    tried(3)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_a_checkpointed_shared_router_recomputes_its_forwards_calls_in_a_replay(mode: str) -> None:
    """A router shared by both layers, each layer under activation checkpointing: the recompute in backward reads
    its forward's rows again, call by call, and is not refused; the experts of each forward are those captured."""
    model = _SharedGate(checkpointed=mode)
    first, second = _tokens(1).requires_grad_(), _tokens(2).requires_grad_()
    with mr.attach(model) as session:
        with session.capture():
            model(first)
            used_first = _used(model)
            model(second)
            used_second = _used(model)
        routes = session.routes()
        assert routes._forward_calls == (2, 2)
        with session.replay(routes):
            for x, want in [(first, used_first), (second, used_second)]:
                model(x).sum().backward()
                assert torch.equal(_used(model).long(), want.long())  # (as the recompute left them)
        assert model.layers[0].gate.weight.grad is not None
    tried()


@pytest.mark.reliability("silent replays")
def test_a_generate_capture_replays_step_by_step() -> None:
    """generate() captured, then replayed by the same generate(): every step's forward makes the calls of its captured
    step (a prompt forward, then one token per sequence), not refused, the same tokens."""
    model = mr.models.build("softmax_topk", num_layers=2)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            seq = model.generate(prompt, 4)
        routes = session.routes()
        assert routes._forward_calls is not None and len(routes._forward_calls) == 4
        with session.replay(routes):
            again = model.generate(prompt, 4)
        assert torch.equal(again, seq)
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("routers", ["every", "one"])
@pytest.mark.parametrize("fed", ["embeddings", "ids"])
def test_a_router_called_once_more_is_refused_by_a_partial_replay_on_the_cpu(fed: str, routers: str) -> None:
    """strict=False (rows left unread, routers without routes): a router called once more per forward than in the
    capture is refused at its second call in the forward, routes of every router or of one, with ids (the same tokens
    in both forwards) or fed embeddings; the forward as captured replays its rows."""
    model: nn.Module = _FedIds() if fed == "ids" else _Model(_Gate)
    body = model.body if isinstance(model, _FedIds) else model
    for layer in body.layers:
        layer.__class__ = _LogsItsRouting
    x = _inputs(fed == "ids", 1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            used = _used(body)
            model(_inputs(fed == "ids", 2))
        routes = session.routes()
        if routers == "one":
            routes = routes.select(routes.names[:1])
        with session.replay(routes, strict=False):
            model(x)
            assert torch.equal(_used(body)[:, 0].long(), used[:, 0].long())
        for layer in body.layers:
            layer.log = True
        with pytest.raises(mr.TokenMismatchError, match=r"layers\.0\.gate' is called again in forward 1"):
            with session.replay(routes, strict=False):
                model(x)
    tried(2)


def _reports_a_device(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> None:
    """The session takes ``model`` to run on a GPU (its ids there, never read back by a strict=False replay), the
    rest as they are: the path a model on a device takes, on the CPU."""
    real = mr_session._device_of

    def device_of(module: nn.Module) -> torch.device:
        return torch.device("cuda") if module is model else real(module)

    monkeypatch.setattr(mr_session, "_device_of", device_of)


@pytest.mark.reliability("silent replays")
def test_a_router_called_once_more_is_refused_by_a_replay_that_does_not_read_its_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once silent: routes that know their token ids, replayed with strict=False by a model on a device, were checked
    for nothing (the ids are not read back at no sync), so a router called once more per forward read the next
    forward's rows. The host counts the routers' reads: refused as with routes of no ids; replayed as captured, not."""
    model = _FedIds()
    for layer in model.body.layers:
        layer.__class__ = _LogsItsRouting
    x = torch.arange(T) % 50
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            used = _used(model.body)
            model(x)
        routes = session.routes()
        assert routes.token_ids is not None
        _reports_a_device(monkeypatch, model)
        with session.replay(routes, strict=False):  # (as captured, a forward of the two)
            model(x)
            assert torch.equal(_used(model.body).long(), used.long())
        for layer in model.body.layers:
            layer.log = True
        with pytest.raises(mr.TokenMismatchError, match=r"layers\.0\.gate' is called again in forward 1"):
            with session.replay(routes, strict=False):
                model(x)
    tried(2)


class _SharedAndOwn(nn.Module):
    """Embeddings, a block called at two layers and one of its own between (each router's rows its own ids: the
    shared one's two calls per forward, the other's one)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.shared, self.own = _LogsItsRouting(_Gate(), 10), _LogsItsRouting(_Gate(), 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        first = self.shared(h)
        self.first_used = self.shared.used
        return self.shared(self.own(first))


@pytest.mark.reliability("silent replays")
def test_a_router_called_once_more_with_each_routers_own_ids_is_refused() -> None:
    """Two forwards of the same tokens captured; a log of each router's routing turned on (a second call per block
    call): a replay of one forward makes as many calls of each router as the capture recorded for both, every id
    matches; its real calls must be forced with their own rows, or the replay refused."""
    model = _SharedAndOwn()
    x = torch.arange(T) % 50
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            want = (model.first_used.clone(), model.own.used.clone(), model.shared.used.clone())
            model(x)
        routes = session.routes()
        assert routes._router_ids is not None
        model.shared.log = model.own.log = True
        try:
            with session.replay(routes):
                model(x)
                got = (model.first_used, model.own.used, model.shared.used)
        except mr.TokenMismatchError:
            return
        assert all(torch.equal(g.long(), w.long()) for g, w in zip(got, want, strict=True)), "another call's rows"
    tried()
