"""Misuse of the public API that no other test tries: blocks left in the wrong order, sessions on parts
of one model, copies run inside a block, errors inside ``verify`` and ``keep_scores``.

Each case must end in a ``MoEReplayError`` or in exactly the rows a correct use gives: never rows
given to other tokens, a replay that forces nothing, or a model left changed.
"""

from __future__ import annotations

import copy
import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import moe_replay as mr

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
