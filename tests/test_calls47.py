"""The router calls of each forward, router by router, where the routers' calls differ and each keeps its own token
ids (a block called at two layers beside a block of its own): a replay forward makes each router's calls of the
captured forward it replays, on their rows, or is refused, with the routes as captured or back from a slice, cat,
select, a file, a pickle or the wire. Plain uses are not refused."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from moe_replay.distributed import _known, _restore
from tests.conftest import tried
from tests.test_calls46 import _reports_a_device, _SharedAndOwn
from tests.test_review44 import T, _FedIds, _LogsItsRouting


def _x(seed: int = 0) -> torch.Tensor:
    """A forward's token ids (the same for every seed but the order: ids alone cannot tell two forwards apart)."""
    return torch.randperm(T, generator=torch.Generator().manual_seed(seed)) % 50


def _used(model: _SharedAndOwn) -> list[torch.Tensor]:
    """The experts each call of a forward dispatched to: the shared block's first call, the own block's, the shared
    block's second."""
    return [model.first_used.clone().long(), model.own.used.clone().long(), model.shared.used.clone().long()]


def _travelled(routes: mr.Routes, how: str, tmp_path: Path) -> mr.Routes:
    """``routes`` back from a file, a pickle, the wire or cat of itself alone, or as captured."""
    if how == "saved":
        routes.save(tmp_path / "r.npz")
        return mr.Routes.load(tmp_path / "r.npz")
    if how == "pickled":
        return pickle.loads(pickle.dumps(routes))
    if how == "wire":
        bare = mr.Routes._trusted(routes._data, routes.names, routes.experts_per_layer)
        return _restore(bare, _known(routes), routes._dropped_rows)
    if how == "cat":
        return mr.Routes.cat([routes])
    return routes


_TRAVELS = ["captured", "saved", "pickled", "wire", "cat"]


def _captured(model: _SharedAndOwn, session: mr.Session, xs: list[torch.Tensor]) -> tuple[mr.Routes, list[Any]]:
    with session.capture(), torch.no_grad():
        used = []
        for x in xs:
            model(x)
            used.append(_used(model))
    return session.routes(), used


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _TRAVELS)
@pytest.mark.parametrize("logs", ["shared", "own"])
def test_a_router_called_once_more_per_forward_is_refused_router_by_router_however_the_routes_travelled(
    logs: str, how: str, tmp_path: Path
) -> None:
    """Once silent: two forwards of the same tokens captured; one block's second call of its router turned on (a log
    of its routing): the first forward's extra call would read the rows of the router's next captured call, every id
    matching. Refused at that call, before it reads them, naming the router, with the routes as captured or back from
    a file, a pickle, the wire or cat; the routers' weights are as they were."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, _ = _captured(model, session, [_x(), _x()])
        assert routes._router_ids is not None and routes._call_rows is None
        routes = _travelled(routes, how, tmp_path)
        block = model.shared if logs == "shared" else model.own
        block.log = True
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(mr.TokenMismatchError, match=rf"router '{logs}\.gate' is called again in forward 1"):
            with session.replay(routes), torch.no_grad():
                model(_x())
                model(_x())
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _TRAVELS)
def test_a_router_called_once_less_per_forward_is_refused_router_by_router(how: str, tmp_path: Path) -> None:
    """The capture ran the shared block's log (three calls of its router per forward, one of the own block's); the
    replay does not: the shared router's calls of the second forward would begin in the first forward's third call.
    Refused as the second forward's first call of it begins there, and, with the first forward alone
    (strict=False), as the block ends inside the captured forward."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        model.shared.log = True
        routes, _ = _captured(model, session, [_x(), _x()])
        routes = _travelled(routes, how, tmp_path)
        model.shared.log = False
        with pytest.raises(mr.TokenMismatchError, match=r"forward 2 of this replay\(\) begins at row 40 .*'shared"):
            with session.replay(routes), torch.no_grad():
                model(_x())
                model(_x())
        with pytest.raises(mr.TokenMismatchError, match=r"the last forward .* stops at row 40 .*'shared\.gate'"):
            with session.replay(routes, strict=False), torch.no_grad():
                model(_x())
    tried(2)


@pytest.mark.reliability("silent replays")
def test_routes_of_one_router_selected_or_sliced_keep_its_calls() -> None:
    """The shared router's routes alone (select), and slices of them: the forwards as captured, the second alone, and
    the two halves joined again are not refused; a forward that calls it once more is; a slice cut through a forward
    of its two calls is refused where a forward begins in it (its rows are parts of both calls)."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, used = _captured(model, session, [_x(0), _x(0)])
        shared = routes.select(["shared.gate"])
        assert shared._router_calls == (routes._router_calls[0],)
        assert shared[40:]._router_calls == ((((20, 2),), (2,)),)  # (the second forward: its two calls)
        assert shared[30:]._router_calls == ((((10, 1), (20, 2)), (-1, 2)),)  # (a part of the first's second call)
        for part, forwards in ((shared, 2), (shared[40:], 1), (mr.Routes.cat([shared[:40], shared[40:]]), 2)):
            with session.replay(part, strict=False), torch.no_grad():  # (the own block's router left free)
                for _ in range(forwards):
                    model(_x(0))
                    assert torch.equal(model.shared.used.long(), used[1][2])
        for cut in (shared[30:], shared[20:60]):
            with pytest.raises(mr.TokenMismatchError, match="cut through by a slice"):
                with session.replay(cut, strict=False), torch.no_grad():
                    model(_x(0))
        model.shared.log = True
        with pytest.raises(mr.TokenMismatchError, match=r"'shared\.gate' is called again in forward 1"):
            with session.replay(shared, strict=False), torch.no_grad():
                model(_x(0))
    tried(3)


@pytest.mark.reliability("silent replays")
def test_the_wire_and_a_file_keep_each_routers_calls_and_routes_of_the_same_calls_are_as_before(
    tmp_path: Path,
) -> None:
    """Each router's own calls travel through a file, a pickle and the wire as they are; routes whose routers all
    made the same calls keep none (their calls are every router's, in the file's fields as before)."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, _ = _captured(model, session, [_x(), _x(1)])
    want = routes._router_calls
    assert want is not None and len(want) == 2
    for how in ("saved", "pickled", "wire", "cat"):
        assert _travelled(routes, how, tmp_path)._router_calls == want, how
    plain = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=0)
    with mr.attach(plain) as session:
        with session.capture(), torch.no_grad():
            plain(torch.randint(1, 128, (2, 5)))
        same = session.routes()
    assert same._router_calls is None and same._forward_calls == (1,)
    same.save(tmp_path / "s.npz")
    with zipfile.ZipFile(tmp_path / "s.npz") as z:
        names = [n for n in z.namelist() if n.endswith(".json") or "meta" in n]
        text = "".join(z.read(n).decode(errors="ignore") for n in names)
    assert "router_calls" not in text and "forward_calls" in text
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _TRAVELS)
def test_forwards_replayed_as_captured_are_exact_router_by_router(how: str, tmp_path: Path) -> None:
    """Plain uses are not refused: the captured forwards (two micro-batches of other tokens) replayed in order force
    each call's own experts, with the routes as captured or back from a file, a pickle, the wire or cat; the first
    micro-batch alone with strict=False too."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, used = _captured(model, session, [_x(0), _x(1)])
        routes = _travelled(routes, how, tmp_path)
        with torch.no_grad():
            for layer in (model.shared.gate, model.own.gate):
                layer.weight.mul_(-1.0)  # (the routers drift: left free, they would choose otherwise)
        with session.replay(routes), torch.no_grad():
            got = []
            for x in (_x(0), _x(1)):
                model(x)
                got.append(_used(model))
        assert all(torch.equal(g, w) for a, b in zip(got, used, strict=True) for g, w in zip(a, b, strict=True))
        with session.replay(routes, strict=False), torch.no_grad():
            model(_x(0))
            assert all(torch.equal(g, w) for g, w in zip(_used(model), used[0], strict=True))
        joined = mr.Routes.cat([routes, routes])  # (a capture's routes twice: its forwards twice, in order)
        with session.replay(joined), torch.no_grad():
            for x in (_x(0), _x(1), _x(0), _x(1)):
                model(x)
    tried(3)


class _Checkpointed(_SharedAndOwn):
    """:class:`_SharedAndOwn` whose blocks run under activation checkpointing (recomputed in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        first = checkpoint(self.shared, h, use_reentrant=False)
        self.first_used = self.shared.used
        own = checkpoint(self.own, first, use_reentrant=False)
        return checkpoint(self.shared, own, use_reentrant=False)


@pytest.mark.reliability("silent replays")
def test_checkpoint_recomputes_of_a_shared_router_are_not_refused_router_by_router() -> None:
    """Each block under activation checkpointing: the recomputes in backward read their forward's rows again, which
    is no further call of the routers; replayed with gradients, the forwards as captured are not refused."""
    model = _Checkpointed()
    with mr.attach(model) as session:
        routes, used = _captured(model, session, [_x(0), _x(1)])
        assert routes._router_calls is not None
        with session.replay(routes):
            for x, want in zip((_x(0), _x(1)), used, strict=True):
                model(x).sum().backward()
                assert all(torch.equal(g, w) for g, w in zip(_used(model)[:2], want[:2], strict=True))
        assert model.shared.gate.weight.grad is not None
    tried()


@pytest.mark.reliability("silent replays")
def test_generate_with_a_layer_shared_by_some_layers_replays_step_by_step() -> None:
    """A decoder whose last layer is the one before it again (its router called twice per forward, the first
    layer's once): generate() captured, then replayed step by step by generate() and by a loop of forwards without a
    cache, is not refused and gives the same tokens; a step that calls the shared router once more is."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=0)
    model.layers[2] = model.layers[1]
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            out = model.generate(prompt, max_new_tokens=4)
        routes = session.routes()
        assert routes._router_calls is not None and routes._router_calls[1][1] == (2, 2, 2, 2)
        with session.replay(routes):
            again = model.generate(prompt, max_new_tokens=4)
        assert torch.equal(again, out)
        with session.capture():
            seq = prompt
            for _ in range(3):
                seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        loop = session.routes()
        with session.replay(loop):
            step = prompt
            for _ in range(3):
                step = torch.cat([step, model(step).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(step, seq)
        model.layers.append(model.layers[1])  # (the shared layer once more: a third call of its router per forward)
        with pytest.raises(mr.TokenMismatchError, match=r"'layers\.1\.mlp\.router' is called again in forward 1"):
            with session.replay(loop):
                model(prompt)
    tried(2)


@pytest.mark.reliability("silent replays")
def test_the_last_forward_of_routes_with_ids_making_fewer_calls_is_refused_as_the_block_ends() -> None:
    """Once silent: routes of one token id per row (every router's calls the same), replayed with strict=False: a
    block whose last forward made fewer calls of its routers than the captured forward it began in (a log of the
    routing turned off since the capture) ended unrefused, its calls having read the rows of other calls: the check
    as the block ends read that the host had lost its place, as the block's stop sets it. Refused; the first forward
    alone of routes captured as the model runs is not."""
    model = _FedIds()
    for layer in model.body.layers:
        layer.__class__ = _LogsItsRouting
    x = torch.arange(T) % 50
    with mr.attach(model) as session, torch.no_grad():
        for layer in model.body.layers:
            layer.log = True
        with session.capture():
            model(x)
            model(x)
        logged = session.routes()
        assert logged.token_ids is not None and logged._forward_calls == (2, 2)
        for layer in model.body.layers:
            layer.log = False
        with pytest.raises(mr.TokenMismatchError, match=r"the last forward of this replay\(\) stops at row 20"):
            with session.replay(logged, strict=False):
                model(x)
        with session.capture():
            model(x)
            model(x)
        with session.replay(session.routes(), strict=False):
            model(x)
    tried(2)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("logs", ["shared", "own"])
def test_a_router_called_once_more_or_less_is_refused_on_a_device_with_strict_false(
    logs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once silent: routes of each router's own token ids, replayed with strict=False by a model on a device, took no
    check (the ids are never read back there), so a router called once more per forward read another call's rows.
    Its calls are now counted forward by forward on the host: a forward that read more is refused as the next one
    begins or the block ends, one that begins inside a captured forward of several calls as it begins, and a block
    that ends inside one as it ends; the forwards as captured, and the first alone, are exact and not refused."""
    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, used = _captured(model, session, [_x(), _x()])
        _reports_a_device(monkeypatch, model)
        with session.replay(routes, strict=False), torch.no_grad():
            for want in used:
                model(_x())
                assert all(torch.equal(g, w) for g, w in zip(_used(model), want, strict=True))
        with session.replay(routes, strict=False), torch.no_grad():
            model(_x())
        block = model.shared if logs == "shared" else model.own
        block.log = True
        with pytest.raises(mr.TokenMismatchError, match=rf"router '{logs}\.gate' read rows 0\.\.\d+ .* forward 1"):
            with session.replay(routes, strict=False), torch.no_grad():
                model(_x())
        with pytest.raises(mr.TokenMismatchError, match=rf"router '{logs}\.gate' read rows"):
            with session.replay(routes, strict=False), torch.no_grad():
                model(_x())
                model(_x())
        block.log = False
        model.shared.log = True
        with session.capture(), torch.no_grad():
            model(_x())
            model(_x())
        logged = session.routes()
        model.shared.log = False
        with pytest.raises(mr.TokenMismatchError, match=r"forward 2 of this replay\(\) begins at row 40 .*'shared"):
            with session.replay(logged, strict=False), torch.no_grad():
                model(_x())
                model(_x())
        with pytest.raises(mr.TokenMismatchError, match=r"the last forward .* stops at row 40 .*'shared\.gate'"):
            with session.replay(logged, strict=False), torch.no_grad():
                model(_x())
    tried(5)


@pytest.mark.reliability("silent replays")
def test_generate_with_a_shared_layer_replays_on_a_device_with_strict_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward-by-forward count of each router's calls refuses no plain use: generate() and a loop of forwards
    without a cache, captured and replayed step by step with strict=False on a device, give the same tokens."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=0)
    model.layers[2] = model.layers[1]
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            out = model.generate(prompt, max_new_tokens=4)
        routes = session.routes()
        with session.capture():
            seq = prompt
            for _ in range(3):
                seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        loop = session.routes()
        _reports_a_device(monkeypatch, model)
        with session.replay(routes, strict=False):
            assert torch.equal(model.generate(prompt, max_new_tokens=4), out)
        with session.replay(loop, strict=False):
            step = prompt
            for _ in range(3):
                step = torch.cat([step, model(step).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(step, seq)
    tried(2)
