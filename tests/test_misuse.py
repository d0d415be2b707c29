"""Misuse of the public API that no other test tries: blocks left in the wrong order, sessions on parts
of one model, copies run inside a block, errors inside ``verify`` and ``keep_scores``.

Each case must end in a ``MoEReplayError`` or in exactly the rows a correct use gives: never rows
given to other tokens, a replay that forces nothing, or a model left changed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import moe_replay as mr
from moe_replay import interop as io

from .conftest import assert_untouched, perturb_routers, snapshot, tried


def _model(layers: int = 2) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=layers)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(seed))


def _forced(routes: mr.Routes) -> mr.Routes:
    """The same tokens' routes with every expert moved by one: what a native forward would not choose."""
    moved = [
        torch.where(t >= 0, (t + 1) % e, t) for t, e in zip(routes.per_layer(), routes.experts_per_layer, strict=True)
    ]
    return mr.Routes(moved, routes.names, routes.experts_per_layer).with_token_ids(routes.token_ids)


def _forced_by_hand(model: mr.models.MoETransformer, x: torch.Tensor, routes: mr.Routes) -> torch.Tensor:
    """The logits of ``model(x)`` on a copy whose routers (``SoftmaxTopKRouter``) take their experts from ``routes``,
    row after row in call order, with the combine weights gathered from their own softmax: no moe_replay."""
    ref = copy.deepcopy(model)
    rows = {name: routes.layer(name) for name in routes.names}
    used = dict.fromkeys(rows, 0)
    for name, module in ref.named_modules():
        if name not in rows:
            continue

        def forward(h: torch.Tensor, module: torch.nn.Module = module, name: str = name) -> tuple[torch.Tensor, ...]:
            logits = F.linear(h, module.weight)
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            indices = rows[name][used[name] : used[name] + h.shape[0]]
            used[name] += h.shape[0]
            weights = probs.gather(-1, indices)
            if module.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(h.dtype), indices

        module.forward = forward
    out = ref(x).logits
    assert all(used[n] == rows[n].shape[0] for n in rows), "the reference did not consume every row"
    return out


@pytest.mark.reliability("re-entrance")
def test_a_capture_left_before_the_replay_entered_inside_it_records_no_later_forward() -> None:
    """capture() entered, then replay() inside it by hand, then the capture left first: the forward after it is
    still forced (the replay is open) and counted by the replay's strict check, and recorded nowhere."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
            model(x)
        forced = _forced(session.routes())
        with session.replay(forced[:12]):
            want = model(x).logits
        cap, rep = session.capture(), session.replay(forced)
        cap.__enter__()
        rep.__enter__()
        model(x)
        assert session.state == "replaying+capturing"
        cap.__exit__(None, None, None)
        assert session.state == "replaying"
        got = model(x).logits  # the second forward: forced, not recorded
        rep.__exit__(None, None, None)  # strict: both forwards' rows consumed
        assert session.state == "idle"
        assert torch.equal(got, want)
        assert session.routes().equal(forced[:12]) and session.routes().num_tokens == 12


@pytest.mark.reliability("re-entrance")
def test_keep_scores_does_not_nest_and_an_exception_inside_it_leaves_it_usable() -> None:
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.keep_scores(), pytest.raises(mr.SessionStateError, match="does not nest"):
            session.keep_scores().__enter__()
        with pytest.raises(RuntimeError, match="in the block"), session.keep_scores() as failed:
            model(x)
            raise RuntimeError("in the block")
        with session.keep_scores() as kept:
            model(x)
        model(x)  # after the block: nothing more kept
        for name in session.names:
            assert kept[name][0].shape[0] == 12 and torch.equal(kept[name][1], failed[name][1])
        assert session.state == "idle"


@pytest.mark.reliability("lifecycle")
def test_sessions_on_sibling_layers_replay_exactly_and_the_parent_is_not_attached_over_them() -> None:
    """A session on each layer of one model: both capture in one forward, both replay it exactly, and a session
    on the whole model is refused while they hold its routers (a router intercepted twice would record twice)."""
    model, x = _model(), _ids()
    before = snapshot(model)
    native = model(x).logits
    first, second = mr.attach(model.layers[0]), mr.attach(model.layers[1])
    with pytest.raises(mr.SessionStateError, match="already intercepted by another session"):
        mr.attach(model)
    with first.capture(), second.capture():
        assert torch.equal(model(x).logits, native)
    a, b = first.routes(), second.routes()
    assert a.names == b.names == ("mlp.router",)  # (paths inside each layer: the same name)
    perturb_routers(first)
    perturb_routers(second)
    with first.replay(a), second.replay(b), first.capture():
        model(x)
    assert first.routes().equal(a)
    first.detach()
    second.detach()
    with torch.no_grad():
        model.load_state_dict(before)
    assert_untouched(model, before)


@pytest.mark.reliability("lifecycle")
def test_a_copy_of_the_model_run_inside_a_capture_adds_no_row_to_it() -> None:
    """A deep copy made inside a capture() block (a reference policy) is a plain model: its forwards are neither
    recorded in the block nor refused, and the block holds exactly the original's rows."""
    model, x, y = _model(), _ids(0), _ids(1)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        alone = session.routes()
        with session.capture():
            ref = copy.deepcopy(model)
            native = ref(y).logits
            model(x)
            assert torch.equal(ref(y).logits, native)
        assert session.routes().equal(alone)
        assert torch.equal(session.routes().token_ids, alone.token_ids)


@pytest.mark.reliability("faults")
def test_a_verify_that_raises_half_way_leaves_the_model_and_the_session_exact() -> None:
    """verify() whose forward raises after the first layer's router ran: the error is the model's own, and the model,
    the session and every later capture and replay are as if it had never run."""
    model, x = _model(3), _ids()
    before = snapshot(model)
    native = model(x).logits
    session = mr.attach(model)
    left = [1]

    def fail_once(*_: object) -> None:
        if left[0]:
            left[0] -= 1
            raise RuntimeError("layer 1 failed")

    handle = model.layers[1].register_forward_hook(fail_once)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        session.verify(x)
    handle.remove()
    assert session.state == "idle"
    with session.capture():
        assert torch.equal(model(x).logits, native)
    routes = session.routes()
    assert routes.num_tokens == 12
    with session.replay(routes):
        assert torch.equal(model(x).logits, native)
    session.detach()
    assert_untouched(model, before)
    assert torch.equal(model(x).logits, native)
    tried(2)


_BAD_BLOCK_CALLS: dict[str, Callable[[mr.Session, mr.Routes], object]] = {
    "capture(False)": lambda s, r: s.capture(False),
    "capture(clr=False)": lambda s, r: s.capture(clr=False),
    "replay(routes, False)": lambda s, r: s.replay(r, False),
    "replay()": lambda s, r: s.replay(),
    "keep_scores(1)": lambda s, r: s.keep_scores(1),
    "@capture": lambda s, r: s.capture(lambda: None),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_BAD_BLOCK_CALLS))
def test_a_block_called_with_arguments_it_does_not_take_is_refused_at_the_call(call: str) -> None:
    """``session.capture(False)`` (meant: clear=False) or ``replay(routes, False)``: an ArgumentTypeError at the
    call, naming the signature, not Python's TypeError from the `with` line; the session and model go on as before."""
    model, x = _model(), _ids()
    before = snapshot(model)
    with mr.attach(model) as session:
        with session.capture():
            native = model(x).logits
        routes = session.routes()
        with pytest.raises(mr.ArgumentTypeError, match=r"does not take.*It takes session\.\w+\(") as err:
            _BAD_BLOCK_CALLS[call](session, routes)
        assert ("@session.capture()" in str(err.value)) == call.startswith("@")
        assert session.state == "idle" and session.routes().equal(routes)
        assert torch.equal(model(x).logits, native)  # (no block noted as dropped: the next forward is not refused)
        with session.replay(routes):
            assert torch.equal(model(x).logits, native)
    assert_untouched(model, before)


@pytest.mark.reliability("files")
def test_load_of_a_pipe_or_a_device_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A named pipe given to ``Routes.load`` used to block in ``open()`` until some writer came, then fail as a
    corrupted file; it and a device are no routes files: NotAFileError, before anything is opened."""
    pipe = tmp_path / "routes.npz"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_bytes(b"not a zip " * 10), daemon=True)
    writer.start()  # (so that an open() of the pipe returns rather than hangs, were it tried)
    try:
        with pytest.raises(mr.NotAFileError, match="not a regular file"):
            mr.Routes.load(pipe)
    finally:
        fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # (lets the writer's open() return)
        writer.join(5)
        os.close(fd)
    if os.path.exists(os.devnull):
        with pytest.raises(mr.NotAFileError, match="not a regular file"):
            mr.Routes.load(os.devnull)
    tried(2)


@pytest.mark.reliability("files")
def test_load_of_a_large_file_that_is_no_routes_file_does_not_read_it_whole(tmp_path: Path) -> None:
    """A checkpoint given by mistake: refused as no routes file from its zip directory alone, not read into memory
    first (the file here is sparse: 256 MiB on disk that take no space)."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
            mr.Routes.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"load() held {peak} bytes for a file it refuses"


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("tied", ["router", "block", "layer"])
def test_a_router_shared_by_two_layers_records_and_replays_both_calls_in_order(tied: str) -> None:
    """One router module (or MoE block, or whole layer) used by two layers: one name, two calls per forward, both
    recorded in call order and both forced exactly as a hand-written replay would force them."""
    model, x = _model(3), _ids()
    if tied == "router":
        model.layers[1].mlp.router = model.layers[0].mlp.router
    elif tied == "block":
        model.layers[1].mlp = model.layers[0].mlp
    else:
        model.layers[1] = model.layers[0]
    before = snapshot(model)
    with mr.attach(model) as session:
        with session.capture():
            native = model(x).logits
        routes = session.routes()
        assert routes.names == ("layers.0.mlp.router", "layers.2.mlp.router")
        assert routes.tokens_per_layer == (24, 12)
        forced = _forced(routes)
        with session.replay(forced):
            got = model(x).logits
        with session.replay(routes):
            assert torch.equal(model(x).logits, native)
    assert torch.equal(got, _forced_by_hand(model, x, forced))
    assert not torch.equal(got, native)
    assert_untouched(model, before)


def _grow_experts(model: mr.models.MoETransformer, experts: int) -> None:
    """Re-configure every MoE layer in place for ``experts`` experts (new rows of the router, copies of experts)."""
    with torch.no_grad():
        for layer in model.layers:
            router, bank = layer.mlp.router, layer.mlp.experts
            extra = experts - router.weight.shape[0]
            router.weight = torch.nn.Parameter(torch.cat([router.weight, router.weight[:extra].flip(1)]))
            bank.gate_up = torch.nn.Parameter(torch.cat([bank.gate_up, bank.gate_up[:extra]]))
            bank.down = torch.nn.Parameter(torch.cat([bank.down, bank.down[:extra]]))
            router.num_experts = layer.mlp.num_experts = bank.num_experts = experts


@pytest.mark.reliability("silent replays")
def test_routes_of_a_model_re_configured_for_more_experts_after_capture_are_refused() -> None:
    """Experts added to every router after the capture (parameters replaced, not modules): the 8-expert routes fit
    the index range of 16 experts, yet they are refused at the first forward, and a new capture records the 16."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        _grow_experts(model, 16)
        with pytest.raises(mr.RoutesValidationError, match="2 of 16 experts.*2 of 8"), session.replay(routes):
            model(x)
        with session.capture():
            model(x)
        assert session.routes().experts_per_layer == (16, 16)


@pytest.mark.reliability("silent replays")
def test_an_input_buffer_refilled_in_place_keeps_each_forwards_token_ids() -> None:
    """A loader that copies each batch into one buffer: the capture keeps the ids of each forward as it was fed (not
    the buffer's last contents), and a replay whose buffer is refilled with other tokens is refused."""
    model, first, second = _model(), _ids(0), _ids(1)
    buffer = first.clone()
    with mr.attach(model) as session:
        with session.capture():
            model(buffer)
            buffer.copy_(second)
            model(buffer)
        buffer.copy_(_ids(2))
        routes = session.routes()
        assert torch.equal(routes.token_ids, torch.cat([first, second]).flatten())
        forced = _forced(routes)
        buffer.copy_(first)
        with session.replay(forced):
            model(buffer)
            buffer.copy_(second)
            got = model(buffer).logits
        assert torch.equal(got, _forced_by_hand(model, second, forced[12:]))
        buffer.copy_(first)
        with pytest.raises(mr.TokenMismatchError, match="forward 2 "), session.replay(forced):
            model(buffer)
            buffer.copy_(_ids(2))
            model(buffer)


def _to_double(model: torch.nn.Module, session: mr.Session) -> None:
    model.to(torch.float64)


def _load_other_weights(model: torch.nn.Module, session: mr.Session) -> None:
    model.load_state_dict(mr.models.build("softmax_topk", num_layers=2, seed=3).state_dict())


def _replace_router_weights(model: torch.nn.Module, session: mr.Session) -> None:
    g = torch.Generator().manual_seed(5)
    for site in session.sites:
        site.module.weight = torch.nn.Parameter(torch.randn(site.module.weight.shape, generator=g))


def _parametrize_router_weights(model: torch.nn.Module, session: mr.Session) -> None:
    class Doubled(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    for site in session.sites:  # (this swaps the router's class for a subclass made on the fly)
        parametrize.register_parametrization(site.module, "weight", Doubled())


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize(
    "change", [_to_double, _load_other_weights, _replace_router_weights, _parametrize_router_weights]
)
def test_a_model_changed_between_capture_and_replay_replays_exactly(
    change: Callable[[torch.nn.Module, mr.Session], None],
) -> None:
    """Between blocks: ``model.to(float64)``, ``load_state_dict`` of other weights, router weights replaced by new
    Parameters, a parametrization of them: the replay forces the recorded experts exactly as a hand-written one
    does on the changed model, the state_dict keeps its keys, and detach leaves no trace."""
    model, x = _model(), _ids()
    keys = list(model.state_dict())
    session = mr.attach(model)
    with session.capture():
        model(x)
    forced = _forced(session.routes())
    change(model, session)
    with session.replay(forced):
        got = model(x).logits
    assert torch.equal(got, _forced_by_hand(model, x, forced))
    with session.capture():
        native = model(x).logits
    assert list(model.state_dict()) == keys or change is _parametrize_router_weights
    session.detach()
    assert_untouched(model, snapshot(model))
    assert torch.equal(model(x).logits, native)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("ids", [[], (), "np.array([])", "torch.tensor([])"])
def test_no_token_ids_for_routes_of_no_row_are_taken(ids: object) -> None:
    """``routes[:0].with_token_ids([])``: an empty list (or numpy's float64 ``array([])``, torch's float32
    ``tensor([])``) holds no value a cast could change; it was refused as "not integers". Ids with values of a float
    dtype still are."""
    made = {"np.array([])": np.array([]), "torch.tensor([])": torch.tensor([])}.get(str(ids), ids)
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
    empty = routes[:0].with_token_ids(made)
    assert empty.num_tokens == 0 and empty.token_ids is None and empty.equal(routes[:0])
    assert mr.Routes.cat([empty, routes]).equal(routes)
    with pytest.raises(mr.RoutesValidationError, match="must be integers"):
        routes[:1].with_token_ids(torch.tensor([1.0]))
    with pytest.raises(mr.RoutesValidationError, match="must be integers"):
        routes[:1].with_token_ids(np.array([1.0]))


def _set_top_k(model: mr.models.MoETransformer, k: int) -> None:
    for layer in model.layers:
        layer.mlp.router.top_k = k


@pytest.mark.reliability("lifecycle")
def test_routes_of_a_k_set_back_after_a_capture_of_another_k_replay_exactly() -> None:
    """k=2 captured, k set to 1 and captured, k set back to 2: the k=2 routes fit the router as it is now, and
    were refused against the k=1 of the decision established in between ("chooses k=1 experts"), before any
    forward could establish it again. Routes of the stale k are still refused, at that forward, nothing forced."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        _set_top_k(model, 1)
        with session.capture():
            model(x)
        top_1 = session.routes()
        assert top_1.k_per_layer == (1, 1)
        _set_top_k(model, 2)
        with session.replay(forced), session.capture():
            got = model(x).logits
        assert torch.equal(got, _forced_by_hand(model, x, forced))
        assert session.routes().equal(forced)
        _set_top_k(model, 1)
        with session.capture():
            model(x)
        _set_top_k(model, 2)
        with pytest.raises(mr.RoutesValidationError, match="chooses 2 of 8.*rows of 1 of 8"), session.replay(top_1):
            model(x)
        with session.replay(forced):
            assert torch.equal(model(x).logits, got)


@pytest.mark.reliability("silent replays")
def test_rename_of_one_layer_never_renames_the_layers_whose_number_it_begins() -> None:
    """``rename({"layers.1": "layers.2", "layers.2": "layers.1"})`` to swap two layers' routes swapped layers 10-19
    with 20-29 too (a string prefix of their names), and a replay on a model of 30 layers forced them on other
    layers without a word. A prefix is whole module names; one that ends inside a name of every router it starts
    (``"lay"``) is refused."""
    swap = {"layers.1": "layers.2", "layers.2": "layers.1"}
    rows = [torch.tensor([[i, i + 1]]) for i in range(4)]
    names = ["layers.1.gate", "layers.2.gate", "layers.10.gate", "layers.20.gate"]
    assert mr.Routes(rows, names, 8).rename(swap).names == ("layers.2.gate", "layers.1.gate", *names[2:])
    model, x = _model(12), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = _forced(session.routes())
        swapped = routes.rename(swap)
        moved = {a: b for a, b in zip(routes.names, swapped.names, strict=True) if a != b}
        assert moved == {"layers.1.mlp.router": "layers.2.mlp.router", "layers.2.mlp.router": "layers.1.mlp.router"}
        with session.replay(swapped):
            got = model(x).logits
        assert torch.equal(got, _forced_by_hand(model, x, swapped))
    assert routes.rename({"": "module."}).rename({"module": ""}).equal(routes)
    assert routes.rename({"layers.0.mlp.router": "gate"}).names[:2] == ("gate", "layers.1.mlp.router")
    assert routes.rename({"model.": ""}).equal(routes)  # (a prefix no name has: nothing to rename)
    for cut in ("lay", "layers.1.mlp.rout"):
        with pytest.raises(mr.InvalidArgumentError, match="ends inside a module name"):
            routes.rename({cut: "x"})


@pytest.mark.reliability("bad inputs")
def test_token_positions_given_as_a_range_select_those_rows() -> None:
    """``routes[range(...)]`` (a ``Sequence[int]``, as the index type says) was refused as no index; it takes the
    rows a list of the same positions takes, their token ids with them, reversed ranges and empty ones too."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
    for positions in (range(3), range(11, -1, -1), range(2, 12, 4), range(5, 5)):
        picked = routes[positions]
        assert picked.equal(routes[list(positions)])
        want = routes.token_ids[list(positions)] if len(positions) else None
        got = picked.token_ids
        assert (got is None and want is None) or torch.equal(got, want)
    with pytest.raises(mr.TokenIndexError, match="out of range"):
        routes[range(10, 13)]


@pytest.mark.reliability("files")
def test_save_to_an_empty_path_is_refused_as_such(tmp_path: Path) -> None:
    """``routes.save("")`` (a path variable left empty) raised the bare FileNotFoundError of ``open("")``."""
    routes = mr.Routes([torch.tensor([[0, 1]])], names=["r"], num_experts=8)
    with pytest.raises(mr.MissingFileError, match="the path is empty"):
        routes.save("")
    with pytest.raises(mr.NotAFileError, match="is a directory"):
        routes.save(Path(""))  # (that is Path("."))
    routes.save(tmp_path / "r.npz")
    assert mr.Routes.load(tmp_path / "r.npz").equal(routes)


@pytest.mark.reliability("files")
def test_a_save_that_fails_leaves_the_file_it_would_replace_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """A write that fails half-way (a full disk, an interrupt) used to leave a truncated file where the routes saved
    before were: the previous file stays, whole, and nothing else is left in its folder."""
    old = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["r"], num_experts=8)
    new = mr.Routes([torch.tensor([[4, 5]] * 50)], names=["r"], num_experts=8)
    path = tmp_path / "r.npz"
    old.save(path)
    before = path.read_bytes()

    def half_then_full(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.npz"]
    assert mr.Routes.load(path).equal(old)
    link = tmp_path / "link.npz"
    link.symlink_to(path)
    new.save(link)  # (through a link: the file it names is replaced, the link stays one)
    assert link.is_symlink() and mr.Routes.load(path).equal(new)


@pytest.mark.reliability("files")
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_save_to_a_pipe_is_refused(tmp_path: Path) -> None:
    """Saving over a named pipe would block until a reader came (and a device, /dev/null, swallows the routes)."""
    pipe = tmp_path / "p.npz"
    os.mkfifo(pipe)
    with pytest.raises(mr.NotAFileError, match="no regular file"):
        mr.Routes([torch.tensor([[0, 1]])], names=["r"], num_experts=8).save(pipe)
    assert pipe.exists() and not pipe.is_file()


_BLOCKS_IN_A_HOOK: dict[str, Callable[[mr.Session, mr.Routes, torch.Tensor], object]] = {
    "capture": lambda s, r, x: s.capture().__enter__(),
    "replay": lambda s, r, x: s.replay(r).__enter__(),
    "keep_scores": lambda s, r, x: s.keep_scores().__enter__(),
    "verify": lambda s, r, x: s.verify(x),
}


@pytest.mark.reliability("re-entrance")
@pytest.mark.parametrize("block", list(_BLOCKS_IN_A_HOOK))
def test_a_block_entered_by_a_hook_in_the_middle_of_a_forward_is_refused(block: str) -> None:
    """A capture entered by a forward hook of layer 0 recorded layer 1's rows of that forward and not layer 0's: the
    capture held 12 rows for one router and 24 for the other, and routes() read them. Every block entered while a
    forward of the model runs is refused; one entered by a forward pre-hook of the model, before it, is not."""
    model, x = _model(), _ids()
    before = snapshot(model)
    with mr.attach(model) as session:
        with session.capture():
            native = model(x).logits
        routes = session.routes()
        opened: list[object] = []

        def open_in_the_forward(*_: object) -> None:
            _BLOCKS_IN_A_HOOK[block](session, routes, x)

        def open_before_the_forward(*_: object) -> None:
            opened.append(session.capture())
            opened[-1].__enter__()

        hook = model.layers[0].register_forward_hook(open_in_the_forward)
        with pytest.raises(mr.SessionStateError, match=f"{block}\\(\\) entered inside a forward of the model"):
            model(x)
        hook.remove()
        assert session.state == "idle"
        hook = model.register_forward_pre_hook(open_before_the_forward)
        model(x)
        hook.remove()
        opened[-1].__exit__(None, None, None)
        assert session.routes().equal(routes) and torch.equal(session.routes().token_ids, routes.token_ids)
        with session.replay(routes):
            assert torch.equal(model(x).logits, native)
    assert_untouched(model, before)


# ----------------------------------------------------------------------------- the model changed between blocks
def _model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[object, ...]]]:
    """Every tensor of the state_dict (values and dtypes) and, per module, its class, hooks and own ``forward``."""
    modules = {
        name: (
            type(m),
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._backward_hooks),
            m.__dict__.get("forward"),
        )
        for name, m in model.named_modules()
    }
    return snapshot(model), modules


def _assert_same_state(model: torch.nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, tuple]]) -> None:
    tensors, modules = _model_state(model)
    assert tensors.keys() == before[0].keys()
    for key, value in before[0].items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), f"'{key}' changed"
    assert modules == before[1], "a module's class, hooks or forward changed"


def _half(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    model.half()
    return contextlib.nullcontext()


def _bfloat16(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    model.to(torch.bfloat16)
    return contextlib.nullcontext()


def _frozen(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    model.requires_grad_(False)
    return contextlib.nullcontext()


def _train(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    model.train()
    return contextlib.nullcontext()


def _experts_in_data_parallel(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    # DataParallel as on a host without GPUs, where it runs the module it wraps (on a host with one, it would move the
    # experts' inputs to it, away from this CPU model)
    module = importlib.import_module("torch.nn.parallel.data_parallel")
    with mock.patch.object(module, "_get_available_device_type", lambda: None):
        for layer in model.layers:
            layer.mlp.experts = torch.nn.DataParallel(layer.mlp.experts)
    return contextlib.nullcontext()


def _autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def _default_float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _default_dtype(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    return _default_float64()


def _anomaly(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    return torch.autograd.set_detect_anomaly(True)


@contextlib.contextmanager
def _deterministic_on() -> Iterator[None]:
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def _deterministic(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    return _deterministic_on()


_CHANGES: dict[str, Callable[[torch.nn.Module], contextlib.AbstractContextManager[object]]] = {
    "half()": _half,
    "to(bfloat16)": _bfloat16,
    "requires_grad_(False)": _frozen,
    "train()": _train,
    "experts in DataParallel": _experts_in_data_parallel,
    "autocast": _autocast,
    "default dtype float64": _default_dtype,
    "detect_anomaly": _anomaly,
    "deterministic algorithms": _deterministic,
}


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_model_cast_frozen_wrapped_or_run_in_another_mode_after_capture_replays_exactly(change: str) -> None:
    """Between capture and replay the model is cast (half, bfloat16), frozen, put in train mode, its experts wrapped
    in DataParallel, or the replay runs under autocast, a float64 default dtype, anomaly detection or deterministic
    algorithms: the recorded experts are forced exactly as a hand-written replay forces them there, backward runs,
    and detach leaves the model as it was before attach."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with session.capture():
        native = model(x).logits
    forced = _forced(session.routes())
    with _CHANGES[change](model):
        before = snapshot(model)  # (the state_dict of an attached model is the model's own)
        with session.replay(forced), session.capture():
            got = model(x).logits
            if got.requires_grad:
                got.float().sum().backward()
        want = _forced_by_hand(model, x, forced)
    assert session.routes().equal(forced)
    assert torch.equal(got, want) and not torch.equal(got.float(), native.to(got).float())
    model.zero_grad(set_to_none=True)
    session.detach()
    assert_untouched(model, before)


@pytest.mark.reliability("lifecycle")
def test_a_forward_through_functional_call_with_another_models_weights_replays_exactly() -> None:
    """``torch.func.functional_call(model, other_params, x)`` inside a replay (a reference policy evaluated on the
    policy's module): the forced experts are those of the routes, weighted by the other weights' scores."""
    model, x = _model(), _ids()
    other = mr.models.build("softmax_topk", num_layers=2, seed=7)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        with session.replay(forced), session.capture():
            got = torch.func.functional_call(model, dict(other.named_parameters()), (x,)).logits
        assert session.routes().equal(forced)
    assert torch.equal(got, _forced_by_hand(other, x, forced))
    assert not torch.equal(got, _forced_by_hand(model, x, forced))


def _grown_params(model: mr.models.MoETransformer) -> dict[str, torch.Tensor]:
    big = copy.deepcopy(model)
    _grow_experts(big, 16)
    return dict(big.named_parameters())


def _shrink_experts(model: mr.models.MoETransformer, experts: int) -> None:
    with torch.no_grad():
        for layer in model.layers:
            router, bank = layer.mlp.router, layer.mlp.experts
            router.weight = torch.nn.Parameter(router.weight[:experts].clone())
            bank.gate_up = torch.nn.Parameter(bank.gate_up[:experts].clone())
            bank.down = torch.nn.Parameter(bank.down[:experts].clone())
            router.num_experts = layer.mlp.num_experts = bank.num_experts = experts


_IN_BLOCK: dict[str, Callable[[mr.models.MoETransformer], Callable[[torch.Tensor], object]]] = {
    # (each changes the model and gives the forward to run on it)
    "experts grown": lambda m: (_grow_experts(m, 16), m)[1],
    "experts cut": lambda m: (_shrink_experts(m, 4), m)[1],
    "functional_call with 16 experts": lambda m: functools.partial(torch.func.functional_call, m, _grown_params(m)),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
@pytest.mark.parametrize("change", list(_IN_BLOCK))
def test_an_expert_count_changed_inside_a_block_is_refused_at_the_forward(change: str, block: str) -> None:
    """The expert count changed between two forwards of one block (parameters replaced, or swapped in for one forward
    by ``functional_call``): an 8-expert row could be forced on 16 experts, or a 16-expert capture labelled 8. The
    forward is refused before anything is recorded or forced, and the model stays as it was."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with session.capture():
        model(x)
    routes = session.routes()
    opened = session.capture() if block == "capture" else session.replay(mr.Routes.cat([routes, routes]))
    changed = r"is now topk\(k=2\) over (16|4), but it was topk\(k=2\) over 8"
    with pytest.raises(mr.UnsupportedRouterError, match=changed):
        with opened:
            model(x)
            run = _IN_BLOCK[change](model)
            before = _model_state(model)
            run(x) if isinstance(run, torch.nn.Module) else run((x,))
    _assert_same_state(model, before)
    session.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("block", ["capture", "replay"])
@pytest.mark.parametrize("edit", ["a new layer appended", "a layer removed"])
def test_a_layer_added_or_removed_after_attach_is_refused_and_detach_leaves_no_trace(edit: str, block: str) -> None:
    """A fresh MoE layer appended after attach (its router is no router of the session: neither recorded nor forced),
    or an attached layer removed: the next block's forward is refused, naming the router; after detach the model,
    and the removed layer put back, run exactly as before attach."""
    model, x = _model(3), _ids()
    native = model(x).logits
    session = mr.attach(model)
    with session.capture():
        model(x)
    routes = session.routes()
    removed = model.layers[2]
    if edit == "a new layer appended":
        model.layers.append(mr.models.build("softmax_topk", num_layers=4, seed=3).layers[3])
        error, pattern = mr.UnsupportedRouterError, r"(?s)ran outside every attached router.*'layers\.3\.mlp\.router'"
    else:
        del model.layers[2]
        error, pattern = mr.SessionStateError, r"'layers\.2\.mlp\.router' is no longer .* \(it is gone\)"
    with pytest.raises(error, match=pattern):
        with session.capture() if block == "capture" else session.replay(routes):
            model(x)
    session.detach()
    if edit == "a new layer appended":
        del model.layers[3]
    else:
        model.layers.append(removed)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x).logits, native)
    with mr.attach(model) as again:
        with again.replay(routes):
            assert torch.equal(model(x).logits, native)


# ----------------------------------------------------------------------------- routes edited by hand
_EDITS: dict[str, Callable[[mr.Routes], None]] = {
    "per_layer()": lambda r: r.per_layer()[0].__setitem__((0, 0), 99),
    "layer(name)": lambda r: r.layer(r.names[0]).__setitem__((0, 1), int(r.layer(r.names[0])[0, 0])),
    "indices": lambda r: r.indices.__setitem__((0, 0, 0), -5),
    "token_ids": lambda r: r.token_ids.__setitem__(0, 0),  # type: ignore[union-attr]
    "to_numpy()": lambda r: r.to_numpy().__setitem__((0, 0, 0), 99),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("edit", list(_EDITS))
def test_a_tensor_read_from_routes_and_edited_in_place_leaves_the_routes_as_validated(edit: str) -> None:
    """An index out of range, a repeated expert or another token id written into a tensor read from the routes would
    reach the model unchecked, were it the routes' own storage: the routes keep what was validated, and replay it."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            native = model(x).logits
        routes = session.routes()
        kept = [t.clone() for t in routes.per_layer()], routes.token_ids.clone()
        _EDITS[edit](routes)
        assert all(torch.equal(a, b) for a, b in zip(routes.per_layer(), kept[0], strict=True))
        assert torch.equal(routes.token_ids, kept[1])
        with session.replay(routes), session.capture():
            assert torch.equal(model(x).logits, native)
        assert session.routes().equal(routes)


class _IntSubclass(torch.Tensor):
    """A tensor subclass, as some data loaders hand out."""


_ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int32": lambda t: t.int(),
    "int16": lambda t: t.short(),
    "int8": lambda t: t.to(torch.int8),
    "uint8": lambda t: t.to(torch.uint8),
    "non-contiguous": lambda t: t.t().contiguous().t(),
    "a tensor subclass": lambda t: t.as_subclass(_IntSubclass),
}


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("rows", list(_ROWS))
def test_rows_of_any_integer_dtype_or_layout_force_exactly_the_same_experts(rows: str) -> None:
    """Rows built by hand as int32/int16/int8/uint8, as a transposed (non-contiguous) view, or as a tensor subclass:
    the replay forces the experts they hold, as a hand-written replay forces them."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        made = [_ROWS[rows](t) for t in forced.per_layer()]
        assert rows != "non-contiguous" or not made[0].is_contiguous()
        routes = mr.Routes(made, forced.names, forced.experts_per_layer).with_token_ids(forced.token_ids)
        with session.replay(routes), session.capture():
            got = model(x).logits
        assert session.routes().equal(forced)
    assert torch.equal(got, _forced_by_hand(model, x, forced))


# ----------------------------------------------------------------------------- blocks left or entered oddly
_BLOCK_OF: dict[str, Callable[[mr.Session, mr.Routes], Any]] = {
    "capture": lambda s, r: s.capture(),
    "replay": lambda s, r: s.replay(r),
    "keep_scores": lambda s, r: s.keep_scores(),
}


@pytest.mark.reliability("re-entrance")
@pytest.mark.parametrize("misuse", ["left without being entered", "left twice"])
@pytest.mark.parametrize("block", list(_BLOCK_OF))
def test_a_block_left_without_being_entered_or_twice_changes_nothing(block: str, misuse: str) -> None:
    """``block.__exit__`` called by hand on a block never entered, or once more after it was left: nothing is opened,
    closed or recorded by it, the session is idle and its last capture, and the next replay, are exact."""
    model, x = _model(), _ids()
    with mr.attach(model) as session:
        with session.capture():
            native = model(x).logits
        routes = session.routes()
        opened = _BLOCK_OF[block](session, routes)
        if misuse == "left twice":
            opened.__enter__()
            model(x)
            opened.__exit__(None, None, None)
            if block == "capture":
                routes = session.routes()
        opened.__exit__(None, None, None)
        assert session.state == "idle"
        assert session.routes().equal(routes)
        with session.replay(routes), session.capture():
            assert torch.equal(model(x).logits, native)
        assert session.routes().equal(routes)


@pytest.mark.reliability("re-entrance")
def test_a_capture_held_by_a_generator_that_is_dropped_is_marked_interrupted() -> None:
    """A ``with session.capture():`` around a ``yield`` in a generator that is dropped before it ends: the block
    is left by GeneratorExit when the generator is collected; the forwards run while it was suspended are in it (the
    capture was open), and routes() says how the capture ended, reading the rows only with allow_partial=True."""
    model, x, y = _model(), _ids(0), _ids(1)
    with mr.attach(model) as session:

        def rollout() -> Iterator[torch.Tensor]:
            with session.capture():
                yield model(x).logits
                yield model(x).logits

        steps = rollout()
        next(steps)
        model(y)
        assert session.state == "capturing"
        del steps
        assert session.state == "idle"
        with pytest.raises(mr.SessionStateError, match=r"interrupted by GeneratorExit.*allow_partial=True"):
            session.routes()
        partial = session.routes(allow_partial=True)
        assert torch.equal(partial.token_ids, torch.cat([x, y]).flatten())


# ----------------------------------------------------------------------------- what the first forward leaves
class _StatefulRouter(torch.nn.Module):
    """A softmax top-k router whose forward also keeps state, in one of the ways routers do: an aux-free balancing
    bias (a Parameter updated in place), a buffer of counts, a call counter, a list of loads, a plain tensor
    attribute, a tensor of its MoE block, a global list."""

    def __init__(self, router: torch.nn.Module, keep: str, block_stats: torch.Tensor, log: list[int]) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.keep = router.top_k, router.num_experts, keep
        self.weight = torch.nn.Parameter(router.weight.detach().clone())
        self.bias = torch.nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)
        self.register_buffer("counts", torch.zeros(self.num_experts))
        self.calls, self.loads, self.stats = 0, [], torch.zeros(self.num_experts)
        self.block_stats, self.log = block_stats, log

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        _, indices = torch.topk(probs + self.bias, self.top_k, dim=-1)
        weights = probs.gather(-1, indices)
        with torch.no_grad():
            load = torch.bincount(indices.flatten(), minlength=self.num_experts).float()
            if self.keep == "parameter":
                self.bias.add_(0.01 * (load.mean() - load).sign())
            elif self.keep == "buffer":
                self.counts += load
            elif self.keep == "counter":
                self.calls += 1
            elif self.keep == "list":
                self.loads.append(load)
            elif self.keep == "tensor attribute":
                self.stats.add_(load)
            elif self.keep == "block tensor":
                self.block_stats.add_(load)
            else:
                self.log.append(int(load.argmax()))
        return logits, weights.to(x.dtype), indices


def _stateful(keep: str) -> tuple[mr.models.MoETransformer, list[int]]:
    model, log = _model(), []
    for layer in model.layers:
        layer.mlp.stats = torch.zeros(model.config.num_experts)
        layer.mlp.router = _StatefulRouter(layer.mlp.router, keep, layer.mlp.stats, log)
    return model, log


def _kept(model: mr.models.MoETransformer, log: list[int]) -> list[object]:
    out: list[object] = [list(log)]
    for layer in model.layers:
        r = layer.mlp.router
        out += [r.calls, [t.tolist() for t in r.loads], r.stats.tolist(), r.block_stats.tolist(), r.bias.tolist()]
        out += [r.counts.tolist()]
    return out


_KEEPS = ["parameter", "buffer", "counter", "list", "tensor attribute", "block tensor", "global list"]


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize(
    ("keep", "block"), [(keep, "capture") for keep in _KEEPS] + [("parameter", "replay"), ("global list", "replay")]
)
def test_the_first_forward_under_a_block_keeps_the_state_a_native_forward_keeps(keep: str, block: str) -> None:
    """The first forward under a session runs the router's forward more times to establish its decision: a router
    that keeps state as it routes (a balancing bias, counts, a counter, a log, in it, its block or a global) must end
    that forward with the state one native forward leaves, and the same output."""
    native_model, native_log = _stateful(keep)
    x = _ids()
    want = native_model(x).logits
    model, log = _stateful(keep)
    session = mr.attach(model)
    if block == "capture":
        with session.capture():
            got = model(x).logits
    else:
        twin, _ = _stateful(keep)  # (the native experts, from a twin not yet used)
        with mr.attach(twin) as other:
            with other.capture():
                twin(x)
            routes = other.routes()
        with session.replay(routes):
            got = model(x).logits
    session.detach()
    assert torch.equal(got, want)
    assert _kept(model, log) == _kept(native_model, native_log) != _kept(*_stateful(keep))  # (it did keep state)


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("block", ["capture", "replay", "verify"])
def test_the_first_forward_under_a_block_leaves_the_random_state_a_native_forward_leaves(block: str) -> None:
    """The runs that establish a decision draw random inputs: torch's, Python's and numpy's global random state
    after the first forward (or verify) are those a native forward leaves, so a seeded run stays reproducible."""
    import random

    def state() -> tuple[torch.Tensor, object, list[int]]:
        return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()

    def seed() -> None:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)

    model, x = _model(), _ids()
    seed()
    model(x)
    want = state()
    session = mr.attach(model)
    routes = mr.Routes([torch.tensor([[0, 1]] * 12)] * 2, session.names, 8)
    seed()
    if block == "capture":
        with session.capture():
            model(x)
    elif block == "replay":
        with session.replay(routes):
            model(x)
    else:
        session.verify(x)
    got = state()
    session.detach()
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_forward_that_raises_in_a_block_leaves_no_global_hook_or_torch_function_mode(block: str) -> None:
    """A layer's hook raises in a block's first forward, while the decisions are watched: no global module hook and
    no torch-function mode is left behind (a mode left on the stack would watch every later torch call)."""
    from torch.nn.modules import module as torch_module

    def global_hooks() -> tuple[dict[Any, Any], ...]:
        names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
        return tuple(dict(getattr(torch_module, n)) for n in names)

    model, x = _model(), _ids()
    hooks, modes = global_hooks(), len(torch.overrides._get_current_function_mode_stack())
    session = mr.attach(model)
    routes = mr.Routes([torch.tensor([[0, 1]] * 12)] * 2, session.names, 8)

    def fail(*_: object) -> None:
        raise ValueError("in layer 1")

    handle = model.layers[1].register_forward_hook(fail)
    with (
        pytest.raises(ValueError, match="in layer 1"),
        session.capture() if block == "capture" else session.replay(routes),
    ):
        model(x)
    handle.remove()
    assert global_hooks() == hooks
    assert len(torch.overrides._get_current_function_mode_stack()) == modes
    with session.replay(routes), session.capture():
        model(x)
    assert session.routes().equal(routes)
    session.detach()


# ----------------------------------------------------------------------------- batches of another shape
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("batch", ["padded longer", "padding moved to the other side"])
def test_routes_replayed_on_the_same_sequences_padded_otherwise_are_refused(batch: str) -> None:
    """The same sequences, re-padded: to a longer width (pad tokens where the routes hold real ones) or left-padded
    where the capture was right-padded. Rows would go to other positions than they were recorded for: refused."""
    model = _model()
    x = _ids()
    x[0, -2:] = 0
    mask = (x != 0).long()
    with mr.attach(model) as session:
        with session.capture():
            model(x, attention_mask=mask)
        routes = session.routes()
        if batch == "padded longer":
            y = torch.cat([x, torch.zeros(2, 2, dtype=torch.long)], dim=1)
        else:
            y = x.clone()
            y[0] = torch.cat([x[0, -2:], x[0, :-2]])
        with pytest.raises(mr.TokenMismatchError, match="fed other tokens than its routes were recorded for"):
            with session.replay(routes):
                model(y, attention_mask=(y != 0).long())
        with session.replay(routes), session.capture():
            model(x, attention_mask=mask)
        assert session.routes().equal(routes)


# ----------------------------------------------------------------------------- a router given to attach
def test_attach_to_a_router_itself_says_so_and_include_of_its_class_records_it() -> None:
    """``mr.attach(model.layers[0].mlp.router)``: the module given is never a router of itself, so nothing is found;
    the error says the module is a router and what to pass. ``include=`` its class records exactly its rows of the
    model's forward."""
    model, x = _model(), _ids()
    router = model.layers[0].mlp.router
    with pytest.raises(mr.RouterNotFoundError, match=r"SoftmaxTopKRouter looks like a router itself.*include="):
        mr.attach(router)
    assert "forward" not in router.__dict__
    with mr.attach(model) as whole:
        with whole.capture():
            model(x)
        want = whole.routes().layer("layers.0.mlp.router")
    with mr.attach(router, include=type(router)) as alone:
        with alone.capture():
            model(x)
        assert torch.equal(alone.routes(allow_silent=True).layer(""), want)
    with pytest.raises(mr.RouterNotFoundError) as err:
        mr.attach(torch.nn.Linear(4, 4))
    assert "looks like a router itself" not in str(err.value)


@pytest.mark.reliability("silent replays")
def test_a_router_also_called_on_its_own_in_a_capture_keeps_the_token_check() -> None:
    """Once silent: inside the capture, the first router is also called directly on the batch's hidden states (an
    auxiliary loss computed by hand), in the capture and again in the replay. Its rows outnumber the other router's,
    so the routes knew no token ids, and a replay of the two batches in the other order was taken. Its rows of the
    forwards keep their tokens and those of its own calls none: the capture's order replays exactly, another order
    is refused, and so is a forward that would read the rows of a call of its own (that call left out)."""
    model, a, b = _model(), _ids(0), _ids(1)
    router = model.layers[0].mlp.router

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x).logits
        return logits, router(model.embed(x).reshape(-1, model.config.hidden_size))[1]

    with mr.attach(model) as session:
        with session.capture():
            want = [step(a), step(b)]
        routes = session.routes()
        assert routes.tokens_per_layer == (48, 24)
        with session.replay(routes):
            got = [step(a), step(b)]
        assert all(torch.equal(g, w) for pair in zip(got, want, strict=True) for g, w in zip(*pair, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                step(b)
                step(a)
        with pytest.raises(mr.TokenMismatchError, match="outside every forward of the model"):
            with session.replay(routes):
                model(a)
                model(b)  # (its first router would take the experts of the call on a's hidden states)
        with pytest.raises(mr.TokenMismatchError, match="did not enter"):
            with session.replay(routes):
                router(model.embed(a).reshape(-1, model.config.hidden_size))  # (rows of a's forward)


# ----------------------------------------------------------------------------- HF models and PEFT changed after attach
@pytest.mark.reliability("lifecycle")
def test_a_hf_routers_top_k_changed_after_capture_is_refused_and_its_config_alone_is_not_read() -> None:
    """Qwen3-MoE: ``config.num_experts_per_tok`` changed after the capture is read by no forward, and the replay is
    the same as before it; the gate's own ``top_k`` changed is refused (nothing forced) and, set back, replays."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model, x = tiny_hf.build("qwen3_moe"), _ids()
    before = snapshot(model)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        with session.replay(forced), session.capture():
            want = model(x).logits
        assert session.routes().equal(forced)
        model.config.num_experts_per_tok = 3
        with session.replay(forced):
            assert torch.equal(model(x).logits, want)
        for layer in model.model.layers:
            layer.mlp.gate.top_k = 3
        with pytest.raises(mr.RoutesValidationError, match=r"'top_k' of router .* is 3, but was 2"):
            with session.replay(forced):
                model(x)
        for layer in model.model.layers:
            layer.mlp.gate.top_k = 2
        with session.replay(forced):
            assert torch.equal(model(x).logits, want)
    assert_untouched(model, before)


@pytest.mark.reliability("wrappers")
def test_peft_lora_on_a_hf_gates_weight_added_after_attach_is_replayed_through() -> None:
    """PEFT's LoRA on the gate's weight parameter (``target_parameters``, a parametrization that swaps the gate's
    class) added after attach: the replay forces the recorded experts, weighted by the adapted gate's scores."""
    peft = pytest.importorskip("peft")
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model, x = tiny_hf.build("qwen3_moe"), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        with session.replay(forced):
            plain = model(x).logits
        config = peft.LoraConfig(target_modules=[], target_parameters=["mlp.gate.weight"], r=2, init_lora_weights=False)
        adapted = peft.get_peft_model(model, config)
        with session.replay(forced), session.capture():
            got = adapted(input_ids=x).logits
        assert session.routes().equal(forced)
        assert not torch.equal(got, plain)  # (the adapted scores weigh the same experts)
        with adapted.disable_adapter(), session.replay(forced):
            assert torch.equal(adapted(input_ids=x).logits, plain)
    assert all("forward" not in m.__dict__ for m in adapted.modules())


@pytest.mark.reliability("wrappers")
def test_peft_lora_on_a_gate_module_merged_and_unloaded_after_attach_replays_and_detaches_clean() -> None:
    """LoRA on the ``gate`` Linear (the router) added after attach, then merged and unloaded: the replay forces the
    recorded experts through the LoRA layer and through the merged gate, and detach leaves no wrapper on either."""
    peft = pytest.importorskip("peft")
    model, x = mr.models.build("linear_gate", num_layers=2), _ids()
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        forced = _forced(session.routes())
        adapted = peft.get_peft_model(model, peft.LoraConfig(target_modules=["gate"], r=2, init_lora_weights=False))
        with session.replay(forced), session.capture():
            through_lora = adapted(x).logits
        assert session.routes().equal(forced)
        merged = adapted.merge_and_unload()
        with session.replay(forced), session.capture():
            assert torch.allclose(merged(x).logits, through_lora, atol=1e-5)
        assert session.routes().equal(forced)
    assert all("forward" not in m.__dict__ for m in merged.modules())


class _Logits(torch.nn.Module):
    """A module around the model that returns its logits (a tensor, which ``torch.jit.trace`` can follow)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


_PAST_THE_SESSION: dict[str, Callable[[mr.models.MoETransformer], Callable[[torch.Tensor], object]]] = {
    "a deep copy": lambda m: copy.deepcopy(m),
    "a program traced while attached": lambda m: torch.jit.trace(_Logits(m), (_ids(),), check_trace=False),
    "the model rebuilt after attach": lambda m: mr.models.build("softmax_topk", num_layers=2),
    "no forward": lambda m: lambda x: None,
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("run", list(_PAST_THE_SESSION))
def test_a_non_strict_replay_whose_forwards_never_reach_the_routers_is_refused(run: str) -> None:
    """Once silent: ``replay(routes, strict=False)`` around a forward of a copy of the model, of a program traced from
    it, of the model rebuilt (reloaded) after attach, or around no forward at all, forced nothing and ended without a
    word (strict=False allows rows left unread). A lax block in which no router read a row is refused as it exits;
    one that read some rows, and one whose forward of the model was refused inside it, are not."""
    model, x = _model(), _ids()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        forward = _PAST_THE_SESSION[run](model)
        with pytest.raises(mr.ReplayConsumptionError, match=r"forced nothing: no router read a row of its routes"):
            with session.replay(routes, strict=False):
                forward(x)
        with session.replay(routes, strict=False), session.capture():  # a prefix: forced, and fine
            model(x[:1])
        assert session.routes().equal(routes[:6])
        with session.replay(routes, strict=False):  # refused inside the block: told there, not again as it exits
            with pytest.raises(mr.TokenMismatchError):
                model(x.flip(0))


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("state", ["idle", "capturing", "replaying"])
def test_an_attached_model_shows_the_modules_parameters_and_state_dict_of_a_plain_one(state: str) -> None:
    """While attached (idle, or inside a block): named modules, parameters and buffers, the state_dict's keys and
    values, and ``load_state_dict(strict=True)`` of a plain twin's weights are those of the plain model: an
    optimizer, a checkpoint or an EMA built then sees nothing of the session."""
    model, twin, x = _model(), mr.models.build("softmax_topk", num_layers=2, seed=4), _ids()
    want = (
        [n for n, _ in model.named_modules()],
        [n for n, _ in model.named_parameters()],
        [n for n, _ in model.named_buffers()],
    )
    keys = list(model.state_dict())
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        blocks: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
            "idle": contextlib.nullcontext,
            "capturing": session.capture,
            "replaying": lambda: session.replay(routes),
        }
        block = blocks[state]()
        with block:
            model(x)
            got = (
                [n for n, _ in model.named_modules()],
                [n for n, _ in model.named_parameters()],
                [n for n, _ in model.named_buffers()],
            )
            assert got == want and list(model.state_dict()) == keys
            loaded = model.load_state_dict(twin.state_dict(), strict=True)
            assert not loaded.missing_keys and not loaded.unexpected_keys
            assert all(
                torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True)
            )
    assert_untouched(model, snapshot(twin))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("part", ["mlp", "router"])
def test_a_non_strict_replay_of_a_part_of_the_model_on_no_token_is_not_refused(part: str) -> None:
    """Once falsely refused: ``replay(routes, strict=False)`` around a forward of an MoE block (or its router) alone,
    on no token, entered no level of the model and read no row, as a forward past the session does; but its routers
    ran, on nothing to force. It passes, as the same forward of the whole model on no token does; the same part on
    tokens reads its rows (forced); a forward past the session stays refused."""
    model, x = _model(), _ids()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        module = model.layers[0].mlp if part == "mlp" else model.layers[0].mlp.router
        hidden = model.embed(x)
        with session.replay(routes, strict=False):
            module(hidden[:0])
        with session.replay(routes.with_token_ids(None), strict=False):
            module(hidden)  # (the first layer's rows, read by a part: forced, and fine)
        with pytest.raises(mr.ReplayConsumptionError, match="forced nothing: no router read a row"):
            with session.replay(routes, strict=False):
                copy.deepcopy(model)(x)


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("strict", [False, True], ids=["strict=False", "strict"])
def test_a_forward_retried_after_a_failure_caught_in_a_replay_of_routes_without_ids_is_refused(strict: bool) -> None:
    """Once silent: a forward that raised half-way, its exception caught inside the replay block, left its later
    routers behind; retried, its earlier routers read the next forward's rows. Routes that know their tokens refused
    the retry (routers out of step); routes without ids (an engine's, from_numpy, with_token_ids(None)) under
    strict=False forced those rows on the retried tokens and ended without a word. Now any replay refuses a forward
    that begins with its routers out of step, and the session replays exactly after."""
    model = mr.models.build("softmax_topk", num_layers=2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 128, (1, 6), generator=gen), torch.randint(1, 128, (1, 6), generator=gen)
    fail = []

    def fault(module: torch.nn.Module, args: Any) -> None:
        if fail:
            fail.clear()
            raise RuntimeError("out of memory")

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(a)
            model(b)
        captured = session.routes()
        handle = model.layers[1].register_forward_pre_hook(fault)  # after router 0 read its rows, before router 1
        try:
            for routes in (
                captured.with_token_ids(None),
                mr.Routes.from_numpy(captured.to_numpy(), names=captured.names, num_experts=8),
            ):
                with pytest.raises(mr.TokenMismatchError, match="starts with its routers out of step"):
                    with session.replay(routes, strict=strict), torch.no_grad():
                        fail.append(True)
                        with pytest.raises(RuntimeError, match="out of memory"):
                            model(a)
                        model(a)  # the retry: router 0 is at b's rows, router 1 at a's
                tried()
        finally:
            handle.remove()
        with session.replay(captured.with_token_ids(None), strict=strict), session.capture(), torch.no_grad():
            model(a)
            model(b)
        assert session.routes().equal(captured)


def _R(t: int = 6, layers: int = 2, k: int = 2, e: int = 8, seed: int = 0, names: list[str] | None = None) -> mr.Routes:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) for _ in range(layers)]
    return mr.Routes(rows, names=names or [f"model.layers.{i}.mlp.gate" for i in range(layers)], num_experts=e)


_r = _R()
_I = _r.layer(_r.names[0])
_P = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)).softmax(-1)
_lm = mr.LayerMap.from_names(list(_r.names), 2, 8, 2)
_HOLES = mr.Routes.from_numpy(np.full((2, 2, 2), -1), names=_r.names, num_experts=8)


def _saved(folder: str, **kwargs: Any) -> mr.Routes:
    path = os.path.join(folder, "r.npz")
    _r.save(path)
    return mr.Routes.load(path, **kwargs)


#: misuse of the public API, each of which must end in a MoEReplayError (never a builtin error, a wrapped or cut
#: value, or a result of other rows); ``d`` is a folder of the test's own
_MISUSE: dict[str, Callable[[str], object]] = {
    # Routes construction
    "Routes layers dict": lambda d: mr.Routes({"a": torch.zeros(2, 1, dtype=torch.long)}, names=["a"], num_experts=2),
    "Routes names str": lambda d: mr.Routes([torch.zeros(2, 1, dtype=torch.long)], names="a", num_experts=2),
    "Routes experts float": lambda d: mr.Routes([torch.zeros(2, 1, dtype=torch.long)], names=["a"], num_experts=2.0),
    "Routes experts bool": lambda d: mr.Routes([torch.zeros(2, 1, dtype=torch.long)], names=["a"], num_experts=True),
    "Routes experts list short": lambda d: mr.Routes(
        [torch.zeros(2, 1, dtype=torch.long)] * 2, names=["a", "b"], num_experts=[2]
    ),
    "Routes -2": lambda d: mr.Routes([torch.tensor([[-2]])], names=["a"], num_experts=2),
    "Routes partial -1": lambda d: mr.Routes([torch.tensor([[-1, 0]])], names=["a"], num_experts=2),
    "Routes dup": lambda d: mr.Routes([torch.tensor([[1, 1]])], names=["a"], num_experts=2),
    "Routes 1-D rows": lambda d: mr.Routes([torch.tensor([1, 0])], names=["a"], num_experts=2),
    "Routes 3-D rows": lambda d: mr.Routes([torch.zeros(1, 1, 1, dtype=torch.long)], names=["a"], num_experts=2),
    "Routes list rows": lambda d: mr.Routes([[[0, 1]]], names=["a"], num_experts=2),
    "Routes float rows": lambda d: mr.Routes([torch.tensor([[0.0, 1.0]])], names=["a"], num_experts=2),
    "Routes bool tensor rows": lambda d: mr.Routes([torch.tensor([[True, False]])], names=["a"], num_experts=2),
    "Routes uint8 255 top1 256": lambda d: mr.Routes(
        [torch.tensor([[255]], dtype=torch.uint8)], names=["a"], num_experts=256
    ),
    "Routes experts 0": lambda d: mr.Routes([torch.zeros(0, 1, dtype=torch.long)], names=["a"], num_experts=0),
    "Routes names dup": lambda d: mr.Routes([torch.zeros(1, 1, dtype=torch.long)] * 2, names=["a", "a"], num_experts=2),
    "Routes validate str": lambda d: mr.Routes(
        [torch.zeros(1, 1, dtype=torch.long)], names=["a"], num_experts=2, validate="no"
    ),
    "Routes np 2-d object": lambda d: mr.Routes([np.array([[0, None]], dtype=object)], names=["a"], num_experts=2),
    "Routes different T": lambda d: (
        mr.Routes(
            [torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)], names=["a", "b"], num_experts=2
        ).num_tokens
    ),
    "from_numpy 2-d": lambda d: mr.Routes.from_numpy(np.zeros((3, 2), np.int64), names=["a", "b"], num_experts=2),
    "from_numpy names mismatch": lambda d: mr.Routes.from_numpy(
        np.zeros((3, 2, 1), np.int64), names=["a"], num_experts=2
    ),
    "from_numpy float": lambda d: mr.Routes.from_numpy(np.zeros((3, 1, 1)), names=["a"], num_experts=2),
    "from_numpy uint8 255 e256 k1": lambda d: mr.Routes.from_numpy(
        np.full((3, 1, 1), 255, np.uint8), names=["a"], num_experts=256
    ),
    # to_numpy
    "to_numpy uint8 -1": lambda d: mr.Routes([torch.tensor([[-1]])], names=["a"], num_experts=2).to_numpy(np.uint8),
    "to_numpy int8 200": lambda d: mr.Routes([torch.tensor([[199]])], names=["a"], num_experts=200).to_numpy(np.int8),
    "to_numpy str": lambda d: _r.to_numpy("U4"),
    "to_numpy bool": lambda d: _r.to_numpy(bool),
    "to_numpy float16 big": lambda d: mr.Routes([torch.tensor([[4097]])], names=["a"], num_experts=5000).to_numpy(
        np.float16
    ),
    "to_numpy object": lambda d: _r.to_numpy(object),
    "to_numpy diff T": lambda d: mr.Routes(
        [torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)], names=["a", "b"], num_experts=2
    ).to_numpy(),
    # select / rename / layer
    "select str": lambda d: _r.select("model.layers.0.mlp.gate"),
    "select missing": lambda d: _r.select(["x"]),
    "select dup": lambda d: _r.select([_r.names[0]] * 2),
    "rename non-map": lambda d: _r.rename([("a", "b")]),
    "rename collide": lambda d: _r.rename({"model.layers.0.": "model.layers.1."}),
    "rename inside name": lambda d: _r.rename({"model.lay": "x"}),
    "rename int keys": lambda d: _r.rename({1: "x"}),
    "layer int": lambda d: _r.layer(0),
    "layer missing": lambda d: _r.layer("x"),
    # with_token_ids
    "ids float": lambda d: _r.with_token_ids(torch.zeros(6)),
    "ids wrong len": lambda d: _r.with_token_ids(list(range(5))),
    "ids -2": lambda d: _r.with_token_ids([-2] * 6),
    "ids bool": lambda d: _r.with_token_ids(torch.ones(6, dtype=torch.bool)),
    "ids str": lambda d: _r.with_token_ids("abcdef"),
    "ids dict": lambda d: _r.with_token_ids({i: i for i in range(6)}),
    "ids np float empty len": lambda d: _r.with_token_ids(np.zeros(6)),
    "ids uint64 big": lambda d: _r.with_token_ids(np.full(6, 2**63, np.uint64)),
    "ids set": lambda d: _r.with_token_ids(set(range(6))),
    # cat
    "cat empty": lambda d: mr.Routes.cat([]),
    "cat non routes": lambda d: mr.Routes.cat([_r, _I]),
    "cat k differ": lambda d: mr.Routes.cat([_r, _R(k=3)]),
    "cat experts differ": lambda d: mr.Routes.cat([_r, _R(e=9)]),
    "cat routes itself (not list)": lambda d: mr.Routes.cat(_r),
    # equal / eq
    "len of diff T": lambda d: len(
        mr.Routes(
            [torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)], names=["a", "b"], num_experts=2
        )
    ),
    # save/load
    "save int path": lambda d: _r.save(3),
    "save bytes path": lambda d: _r.save(b"/tmp/x.npz"),
    "save dir": lambda d: _r.save(d),
    "save no folder": lambda d: _r.save(os.path.join(d, "no", "x.npz")),
    "save tilde": lambda d: _r.save("~nonexistent_user_x/x.npz"),
    "load missing": lambda d: mr.Routes.load(os.path.join(d, "nope.npz")),
    "load text file": lambda d: (
        open(os.path.join(d, "t.npz"), "w").write("hello"),
        mr.Routes.load(os.path.join(d, "t.npz")),
    ),
    "load plain npz": lambda d: (
        np.savez(os.path.join(d, "p.npz"), a=np.zeros(3)),
        mr.Routes.load(os.path.join(d, "p.npz")),
    ),
    "load max_bytes 0": lambda d: _saved(d, max_bytes=0),
    "load max_bytes float": lambda d: _saved(d, max_bytes=1e9),
    "load max_bytes bool": lambda d: _saved(d, max_bytes=True),
    "load max_bytes neg": lambda d: _saved(d, max_bytes=-1),
    # losses
    "lbl probs numpy": lambda d: mr.load_balancing_loss(_P.numpy(), _I),
    "lbl indices Routes": lambda d: mr.load_balancing_loss(_P, _r),
    "lbl probs dict": lambda d: mr.load_balancing_loss({"a": _P}, [_I]),
    "lbl count mismatch": lambda d: mr.load_balancing_loss([_P, _P], [_I]),
    "lbl empty lists": lambda d: mr.load_balancing_loss([], []),
    "lbl logits": lambda d: mr.load_balancing_loss(torch.randn(6, 8), _I),
    "lbl nan": lambda d: mr.load_balancing_loss(torch.full((6, 8), float("nan")), _I),
    "lbl idx float": lambda d: mr.load_balancing_loss(_P, _I.float()),
    "lbl idx -1": lambda d: mr.load_balancing_loss(_P, torch.full((6, 2), -1)),
    "lbl idx >= E": lambda d: mr.load_balancing_loss(_P, torch.full((6, 1), 8)),
    "lbl probs int": lambda d: mr.load_balancing_loss(_P.long(), _I),
    "lbl T mismatch": lambda d: mr.load_balancing_loss(_P[:5], _I),
    "lbl 3-d probs": lambda d: mr.load_balancing_loss(_P[None], _I[None]),
    "lbl mask neg": lambda d: mr.load_balancing_loss(_P, _I, mask=-torch.ones(6)),
    "lbl mask nan": lambda d: mr.load_balancing_loss(_P, _I, mask=torch.full((6,), float("nan"))),
    "lbl mask wrong len": lambda d: mr.load_balancing_loss(_P, _I, mask=torch.ones(5)),
    "lbl mask 2-d unknown": lambda d: mr.load_balancing_loss(_P, _I, mask=torch.ones(2, 3)),
    "lbl mask list of floats": lambda d: mr.load_balancing_loss(_P, _I, mask=[1.0] * 6),
    "lbl mask numpy": lambda d: mr.load_balancing_loss(_P, _I, mask=np.ones(6)),
    "lbl mask empty list": lambda d: mr.load_balancing_loss(_P, _I, mask=[]),
    "lbl dup expert": lambda d: mr.load_balancing_loss(_P, torch.zeros(6, 2, dtype=torch.long)),
    "lbl k0": lambda d: mr.load_balancing_loss(_P, torch.zeros(6, 0, dtype=torch.long)),
    "lbl probs complex": lambda d: mr.load_balancing_loss(_P.to(torch.complex64), _I),
    "lbl idx meta": lambda d: mr.load_balancing_loss(_P, torch.empty(6, 2, dtype=torch.long, device="meta")),
    "lbl probs str": lambda d: mr.load_balancing_loss("p", _I),
    "lbl probs sparse": lambda d: mr.load_balancing_loss(_P.to_sparse(), _I),
    # compare
    "compare tensor": lambda d: mr.compare(_r, _I),
    "compare diff routers": lambda d: mr.compare(_r, _R(names=["x", "y"])),
    "compare mode": lambda d: mr.compare(_r, _r, mode="sets"),
    "compare names str": lambda d: mr.compare(_r, _r, names="model.layers.0.mlp.gate"),
    "compare names empty": lambda d: mr.compare(_r, _r, names=[]),
    "compare names unknown": lambda d: mr.compare(_r, _r, names=["x"]),
    "compare T diff": lambda d: mr.compare(_r, _r[:3]),
    "compare labels": lambda d: mr.compare(_r, _r, labels="ab"),
    "compare diff ids": lambda d: mr.compare(_r.with_token_ids(range(6)), _r.with_token_ids(range(1, 7))),
    # batch
    "pad side": lambda d: mr.pad_routes([_r], side="middle"),
    "pad length short": lambda d: mr.pad_routes([_r], length=3),
    "pad length float": lambda d: mr.pad_routes([_r], length=7.0),
    "pad empty": lambda d: mr.pad_routes([]),
    "pad routes not list": lambda d: mr.pad_routes(_r),
    "pad diff routers": lambda d: mr.pad_routes([_r, _R(names=["x", "y"])]),
    "pack row_length short": lambda d: mr.pack_routes([_r], row_length=3),
    "pack row_length 0": lambda d: mr.pack_routes([_r], row_length=0),
    "layout neg": lambda d: mr.BatchLayout.padded([-1]),
    "layout float": lambda d: mr.BatchLayout.padded([2.5]),
    "layout bool": lambda d: mr.BatchLayout.padded([True]),
    "layout str": lambda d: mr.BatchLayout.padded("34"),
    "layout empty": lambda d: mr.BatchLayout.padded([]),
    "layout routes count": lambda d: mr.BatchLayout.padded([6, 6]).routes([_r]),
    "layout routes len": lambda d: mr.BatchLayout.padded([5]).routes([_r]),
    "layout unpack wrong": lambda d: mr.BatchLayout.padded([3]).unpack(_r),
    "layout tokens wrong": lambda d: mr.BatchLayout.padded([3]).tokens([torch.arange(4)]),
    "layout tokens pad float": lambda d: mr.BatchLayout.padded([3]).tokens([torch.arange(3)], pad_id=0.5),
    "layout 2-d tensor": lambda d: mr.BatchLayout.padded(torch.tensor([[3, 2]])),
    # generation
    "gen cap neg": lambda d: mr.generation_capacity(-1, 2, 3),
    "gen cap bool": lambda d: mr.generation_capacity(True, 2, 3),
    "gen cap float": lambda d: mr.generation_capacity(1, 2.0, 3),
    # layer map / interop
    "lm from_routes non routes": lambda d: mr.LayerMap.from_routes(_I, 2),
    "lm num_layers 0": lambda d: mr.LayerMap.from_names(["layers.0.gate"], 0, 8, 2),
    "lm k > e": lambda d: mr.LayerMap.from_names(["layers.0.gate"], 1, 2, 3),
    "lm two at one layer": lambda d: mr.LayerMap.from_names(["layers.0.a", "layers.0.b"], 1, 8, 2),
    "lm mtp bad": lambda d: mr.LayerMap.from_names(["layers.0.gate"], 1, 8, 2, mtp="skip"),
    "lm layers str": lambda d: mr.LayerMap.from_names(["layers.0.gate"], 1, 8, 2, layers="0"),
    "lm names set": lambda d: mr.LayerMap.from_names({"layers.0.gate"}, 1, 8, 2).names,
    "to_vllm routes of other routers": lambda d: io.to_vllm(_R(names=["a.layers.0.g", "a.layers.1.g"]), _lm),
    "to_vllm routes missing row": lambda d: io.to_vllm(
        mr.Routes.from_numpy(np.full((3, 2, 2), -1), names=_r.names, num_experts=8), _lm
    ),
    "to_vllm routes fewer routers": lambda d: io.to_vllm(_r.select([_r.names[0]]), _lm),
    "to_vllm experts mismatch": lambda d: io.to_vllm(_R(e=6), _lm, drop_last=True),
    "to_vllm k mismatch": lambda d: io.to_vllm(_R(k=3), _lm, drop_last=True),
    "to_vllm non map": lambda d: io.to_vllm(_r, {"a": 0}),
    "to_vllm prompt_start neg": lambda d: io.to_vllm(_r, _lm, prompt_start=-1, drop_last=True),
    "to_vllm prompt_start past": lambda d: io.to_vllm(_r, _lm, prompt_start=10, drop_last=True),
    "to_vllm drop_last str": lambda d: io.to_vllm(_r, _lm, drop_last="yes"),
    "from_vllm float arr": lambda d: io.from_vllm(np.zeros((5, 2, 2)), _lm, prompt_len=3, completion_len=3),
    "from_vllm 2-d": lambda d: io.from_vllm(np.zeros((5, 2), np.uint8), _lm, prompt_len=3, completion_len=3),
    "from_vllm wrong len": lambda d: io.from_vllm(np.zeros((4, 2, 2), np.uint8), _lm, prompt_len=3, completion_len=3),
    "from_vllm transposed": lambda d: io.from_vllm(
        np.tile(np.array([0, 1], np.uint8), (2, 5, 1)).transpose(1, 0, 2).copy().transpose(1, 0, 2),
        _lm,
        prompt_len=3,
        completion_len=3,
    ),
    "from_vllm_legacy num_tokens wrong": lambda d: io.from_vllm_legacy(
        np.tile(np.array([0, 1], np.int32), (5, 2, 1)), _lm, num_tokens=5
    ),
    "from_vllm_legacy num_tokens float": lambda d: io.from_vllm_legacy(
        np.tile(np.array([0, 1], np.int32), (5, 2, 1)), _lm, num_tokens=6.0
    ),
    "stitch diff routers": lambda d: io.stitch_turns([_r, _R(names=["x", "y"])]),
    "stitch shorter": lambda d: io.stitch_turns([_r, _r[:3]]),
    "stitch overlap bad": lambda d: io.stitch_turns([_r], overlap="any"),
    "stitch ids not prefix": lambda d: io.stitch_turns([_r[:3], _r], token_ids=[[1, 2, 3], [1, 2, 4, 5, 6, 7]]),
    "stitch single routes": lambda d: io.stitch_turns(_r),
    "layout split lengths differ": lambda d: mr.BatchLayout.split([2, 3], [1]),
    "generation_lengths float": lambda d: mr.generation_lengths(torch.ones(2, 3), 2, eos_token_id=0),
    "generation_lengths eos float": lambda d: mr.generation_lengths(torch.ones(2, 3, dtype=torch.long), 2, 0.5),
    "split_generation of a tensor": lambda d: mr.split_generation(_R().indices, batch_size=1, prompt_len=3),
    "split_generation batch 4 of 6 rows": lambda d: mr.split_generation(_R(), batch_size=4, prompt_len=1),
    "base64 junk": lambda d: io.vllm_array_from_base64("!!!"),
    "base64 of no npy": lambda d: io.vllm_array_from_base64("aGVsbG8="),
    "to_megatron of a tensor": lambda d: io.to_megatron(_R().indices),
    "to_megatron routers out of order": lambda d: io.to_megatron(_R().select(_R().names[::-1])),
    "to_megatron fill past experts": lambda d: io.to_megatron(_HOLES, fill=7),
    "to_megatron no fill": lambda d: io.to_megatron(_HOLES),
    "from_megatron names out of order": lambda d: io.from_megatron(list(_R().per_layer())[::-1], _R().names[::-1], 8),
    "from_megatron fewer names": lambda d: io.from_megatron(list(_R().per_layer()), _R().names[:1], 8),
    "Routes in int": lambda d: 0 in _R(),
    "Routes in Routes": lambda d: _R()[0] in _R(),
    "lbl probs meta indices": lambda d: mr.load_balancing_loss(_P, torch.empty(6, 2, dtype=torch.long, device="meta")),
    "lbl indices sparse": lambda d: mr.load_balancing_loss(_P, _I.to_sparse()),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_MISUSE.values()), ids=list(_MISUSE))
def test_misuse_of_the_public_api_is_refused_with_a_moe_replay_error(
    call: Callable[[str], object], tmp_path: Path
) -> None:
    """Routes built, indexed, joined, converted, saved and loaded wrongly; losses, comparisons, batch layouts,
    generation helpers, layer maps and engine readers and writers given what they do not take: each is refused with
    a MoEReplayError naming what is wrong, never answered with a builtin error or with values cut or wrapped."""
    with pytest.raises(mr.MoEReplayError):
        call(str(tmp_path))
    tried()


def _session_misuse() -> dict[str, Callable[[Any], object]]:
    """Misuse of a session and of what it keeps, each given ``(model, session, captured, kept, ids)``."""

    def replay(routes: Any, strict: bool = True, x: torch.Tensor | None = None) -> Callable[[Any], object]:
        def run(c: Any) -> object:
            with c.session.replay(routes(c) if callable(routes) else routes, strict=strict), torch.no_grad():
                return c.model(c.ids if x is None else x)

        return run

    return {
        "replay a list of routes": replay(lambda c: [c.captured]),
        "replay a tensor": replay(lambda c: c.captured.indices),
        "replay None": replay(None),
        "replay the rows reversed": replay(lambda c: c.captured[list(range(9, -1, -1))]),
        "replay another batch": replay(lambda c: c.captured, x=_ids().flip(0)),
        "replay half the rows": replay(lambda c: c.captured[:5]),
        "replay twice the rows": replay(lambda c: mr.Routes.cat([c.captured, c.captured])),
        "replay one router strictly": replay(lambda c: c.captured.select([c.captured.names[0]])),
        "replay no router": replay(lambda c: c.captured.select([]), strict=False),
        "replay strict='yes'": replay(lambda c: c.captured, strict="yes"),  # type: ignore[arg-type]
        "replay routes of more experts": replay(
            lambda c: mr.Routes(list(c.captured.per_layer()), c.captured.names, 16).with_token_ids(c.captured.token_ids)
        ),
        "replay routes of another k": replay(
            lambda c: mr.Routes([t[:, :1] for t in c.captured.per_layer()], c.captured.names, 8)
        ),
        "routes() of no capture": lambda c: mr.attach(_model()).routes(),
        "attach twice": lambda c: mr.attach(c.model),
        "attach capacity=True": lambda c: mr.attach(_model(), capacity=True),
        "attach capacity=0": lambda c: mr.attach(_model(), capacity=0),
        "attach a function": lambda c: mr.attach(lambda x: x),  # type: ignore[arg-type]
        "attach top_k='2'": lambda c: mr.attach(_model(), top_k="2"),  # type: ignore[arg-type]
        "attach include of nothing": lambda c: mr.attach(_model(), include="nothing.*"),
        "attach exclude of all": lambda c: mr.attach(_model(), exclude="*"),
        "kept['x']": lambda c: c.kept["x"],
        "kept[0]": lambda c: c.kept[0],
        "row_mask of another batch": lambda c: c.kept.row_mask(torch.ones(3, 6)),
        "row_mask None": lambda c: c.kept.row_mask(None),
        "row_mask of two forwards": lambda c: c.kept.row_mask([torch.ones(2, 6), torch.ones(2, 6)]),
        "mask transposed": lambda c: mr.load_balancing_loss(c.kept.scores, c.kept.indices, mask=torch.ones(6, 2)),
        "kept indices in another order, one unnamed": lambda c: mr.load_balancing_loss(
            c.kept.scores, [c.kept.indices[1], c.kept.indices[0].clone()]
        ),
        "compare rows of other tokens": lambda c: mr.compare(c.captured, c.captured.with_token_ids(torch.arange(12))),
        "split_generation of a longer prompt": lambda c: mr.split_generation(c.captured, batch_size=2, prompt_len=7),
        "split_generation of 3 prompts": lambda c: mr.split_generation(c.captured, batch_size=3, prompt_len=6),
        "split_generation batch_size=2.0": lambda c: mr.split_generation(c.captured, batch_size=2.0, prompt_len=6),
        "to_megatron routers out of order": lambda c: io.to_megatron(c.captured.select(c.captured.names[::-1])),
        "to_megatron batch_size=5": lambda c: io.to_megatron(c.captured, batch_size=5),
        "from_megatron names out of order": lambda c: io.from_megatron(
            list(c.captured.per_layer())[::-1], c.captured.names[::-1], 8
        ),
        "verify() of no example": lambda c: c.session.verify(),
        "LayerMap of layers swapped": lambda c: mr.LayerMap.from_session(c.session, 2, layers=[1, 0]),
    }


_SESSION_MISUSE = _session_misuse()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_SESSION_MISUSE.values()), ids=list(_SESSION_MISUSE))
def test_misuse_of_a_session_is_refused_and_leaves_the_model_as_it_was(call: Callable[[Any], object]) -> None:
    """Replays of what does not fit, attach of what cannot be, and what keep_scores kept read wrongly: each is
    refused with a MoEReplayError, the model left with no hook, wrapper or changed tensor once detached, and the
    session still replays its capture exactly."""
    model = _model()
    before = snapshot(model)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(_ids())
        captured = session.routes()
        with session.replay(captured), session.keep_scores() as kept, torch.no_grad():
            model(_ids())
        case = SimpleNamespace(model=model, session=session, captured=captured, kept=kept, ids=_ids())
        with pytest.raises(mr.MoEReplayError):
            call(case)
        with session.replay(captured), session.capture(), torch.no_grad():
            model(_ids())
        assert session.routes().equal(captured)
    assert_untouched(model, before)
    tried()
