"""Misuse by faults in the first forward under a session: the router's own code raises (a device error, an interrupt)
in one of the runs that first forward makes of it (the runs that tell the order of the routers' rows, those that
establish which call decides, the forward itself). Each such fault either reaches the caller as the model's own
exception or leaves a forward whose output and rows are the native ones; the model is left as it was, and the next
capture and a replay of it, after the routers were moved, are exact. A replay that is the first forward under a
session and meets such a fault still refuses another batch."""

from __future__ import annotations

import copy
import ctypes
import gc
import pickle
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot, tried
from .router_styles import DIM, VOCAB, StyleModel, SwiGLU

E, K = 8, 2

#: The router call at which the fault is raised (0: none), and the count of calls so far. Held in C integers, out of
#: the Python state the runs that establish a decision put back after each run: a fault of the device or an interrupt
#: does not come back when a run is rewound either.
_AT = ctypes.c_int(0)
_CALLS = ctypes.c_int(0)
_RAISE: list[type[BaseException]] = [RuntimeError]


class _FaultyRouter(nn.Module):
    """A softmax top-k router whose forward raises at the router call numbered ``_AT`` (counted over every run)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, E, bias=False)
        self.top_k, self.num_experts = K, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        _CALLS.value += 1
        if _CALLS.value == _AT.value:
            raise _RAISE[0]("injected fault")
        return torch.topk(probs, K, dim=-1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = _FaultyRouter()
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for slot in range(K):
            for e, expert in enumerate(self.experts):
                chosen = (idx[..., slot] == e).unsqueeze(-1)
                out = out + torch.where(chosen, w[..., slot : slot + 1] * expert(x), 0)
        return out


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return StyleModel(_Block).eval(), torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def _move_routers(model: nn.Module) -> None:
    """Move every router's weight far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.layers:
            block.router.gate.weight.add_(3 * torch.randn(block.router.gate.weight.shape, generator=g))


def _first_forward_calls() -> int:
    """How many router calls the first forward under a session makes on :func:`_model` (no fault)."""
    model, ids = _model()
    _AT.value, _CALLS.value = 0, 0
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(ids)
    session.detach()
    return _CALLS.value


@pytest.fixture(scope="module")
def calls() -> int:
    return _first_forward_calls()


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("at", ["first", "second", "third", "fifth", "middle", "last"])
def test_a_fault_in_any_run_of_the_first_forward_is_the_models_own_or_leaves_the_native_forward(
    calls: int, at: str, exc: type[BaseException]
) -> None:
    """A fault raised by the router's code at the first, second, ... or last of the router calls the first forward
    under a capture makes (runs that tell the rows' order, runs that establish the decision, the forward itself): the
    caller gets the model's own exception unchanged, or a forward whose output is the native one and whose capture
    (when it is readable) holds the native rows. The model is left as it was, and the next capture and a replay of it
    on moved routers are exact."""
    nth = {"first": 1, "second": 2, "third": 3, "fifth": 5, "middle": calls // 2, "last": calls}[at]
    model, ids = _model()
    with torch.no_grad():
        native = model(ids)
    before = snapshot(model)
    session = mr.attach(model)
    _RAISE[0] = exc
    _AT.value, _CALLS.value = nth, 0
    raised: BaseException | None = None
    try:
        with session.capture(), torch.no_grad():
            out = model(ids)
    except BaseException as e:  # (the model's own fault, whatever its kind: checked below)
        raised = e
    finally:
        _AT.value = 0
    assert _CALLS.value >= nth  # the fault was reached
    if raised is not None:
        assert type(raised) is exc and str(raised) == "injected fault", f"not the model's own: {raised!r}"
        assert session.state == "idle"
    else:
        assert torch.equal(out, native)
    with session.capture(), torch.no_grad():
        assert torch.equal(model(ids), native)
    routes = session.routes()
    if raised is None:
        assert routes.num_tokens == ids.numel()
    _move_routers(model)
    with session.capture(), torch.no_grad():
        model(ids)
    assert not session.routes().equal(routes)  # the moved routers choose other experts when left free
    with session.replay(routes), session.capture(), torch.no_grad():
        model(ids)
    assert session.routes().equal(routes)  # every router forced the recorded experts
    session.detach()
    with torch.no_grad():
        for block, name in zip(model.layers, ("layers.0", "layers.1"), strict=True):
            block.router.gate.weight.copy_(before[f"{name}.router.gate.weight"])
    assert_untouched(model, before)
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("at", ["first", "second", "third", "middle"])
def test_a_replay_that_is_the_first_forward_and_meets_a_fault_still_refuses_another_batch(calls: int, at: str) -> None:
    """Routes captured under one session, replayed as the first forward of a new one (a restarted job), while the
    router's code raises in one of the extra runs that forward makes: on the batch flipped the replay is refused with
    the token check's error, never forced on the other sequences; on the batch it was recorded for, it forces every
    recorded expert or passes on the model's own exception."""
    nth = {"first": 1, "second": 2, "third": 3, "middle": calls // 2}[at]
    model, ids = _model()
    before = snapshot(model)
    session = mr.attach(model)
    _AT.value, _CALLS.value = 0, 0
    with session.capture(), torch.no_grad():
        model(ids)
    routes = session.routes()
    session.detach()
    _move_routers(model)
    _RAISE[0] = RuntimeError
    for batch, same in ((ids.flip(0), False), (ids, True)):
        session = mr.attach(model)
        _AT.value, _CALLS.value = nth, 0
        try:
            if not same:
                with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
                    with session.replay(routes), torch.no_grad():
                        model(batch)
            else:
                try:
                    with session.replay(routes), session.capture(), torch.no_grad():
                        model(batch)
                except RuntimeError as e:
                    assert str(e) == "injected fault" and session.state == "idle"
                else:
                    assert session.routes().equal(routes)
        finally:
            _AT.value = 0
            session.detach()
    with torch.no_grad():
        for block, name in zip(model.layers, ("layers.0", "layers.1"), strict=True):
            block.router.gate.weight.copy_(before[f"{name}.router.gate.weight"])
    assert_untouched(model, before)
    tried(2)


class _SequenceFirst(nn.Module):
    """A model fed ``[batch, positions]`` ids whose layers run sequence-first (``[positions, batch, hidden]``, as
    fairseq and Megatron do), its routers the faulty ones: they see position 0 of every sequence first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).transpose(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(0, 1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("nth", [1, 2, 6, 12])
def test_a_fault_in_the_first_forward_of_routers_that_see_the_batch_sequence_first_keeps_each_rows_token(
    nth: int,
) -> None:
    """The first forward under a session runs the model again to tell the order in which its routers see the tokens;
    a fault raised by a router's code in those runs (or in the runs that establish its decision) must not leave the
    rows of routers that see the batch sequence-first labelled batch-major: the capture's rows then know their true
    tokens or the model's own exception comes out, and routes laid out batch-major (each sequence captured alone,
    padded into one batch) are refused on that batch, never forced on other tokens."""
    model = _SequenceFirst().eval()
    before = snapshot(model)
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    want = ids.t().reshape(-1)  # each row's own token, as the routers see them
    session = mr.attach(model)
    _RAISE[0] = RuntimeError
    _AT.value, _CALLS.value = nth, 0
    try:
        with session.capture(), torch.no_grad():
            model(ids)
    except RuntimeError as e:
        assert str(e) == "injected fault" and session.state == "idle"
    else:
        assert torch.equal(session.routes().token_ids, want)
    finally:
        _AT.value = 0
    assert _CALLS.value >= nth  # the fault was reached
    parts = []
    for row in ids:  # each sequence alone (one row: no order to tell)
        with session.capture(), torch.no_grad():
            model(row[None])
        parts.append(session.routes())
    with session.capture(), torch.no_grad():
        model(ids)
    assert torch.equal(session.routes().token_ids, want)
    with pytest.raises(mr.TokenMismatchError, match="sequence-first"):
        with session.replay(mr.pad_routes(parts)), torch.no_grad():
            model(ids)
    session.detach()
    assert_untouched(model, before)
    tried()


@pytest.mark.reliability("files")
@pytest.mark.parametrize("how", ["files", "pickles", "deep copies"])
@pytest.mark.parametrize("cut", [3, 5, 8, 9, 11], ids=lambda c: f"cut at row {c}")
def test_a_capture_sent_in_chunks_cut_through_a_forward_splits_once_read_and_joined(
    tmp_path: Any, cut: int, how: str
) -> None:
    """Once a false refusal: a generate() capture sent on in two chunks of rows cut through a forward (written to two
    files, pickled to another process, deep-copied), read back and joined with Routes.cat, was refused by
    split_generation as forwards of 3 and 5 rows where one prompt forward of 8 ran, while the same slices joined in
    memory split as the capture. A slice now carries the capture's forwards it was cut from by name: read back (in
    either order, the capture itself gone), the slices join into those forwards and split into the capture's very
    routes and token ids; slices of another capture of the same shape join none of them, and are refused as
    before."""
    model = mr.models.build("softmax_topk", seed=0)
    ids = torch.randint(1, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, attention_mask=mask)
    capture = session.routes()
    with session.capture(), torch.no_grad():  # another rollout of the same shape
        model.generate(ids.flip(0), max_new_tokens=4, attention_mask=mask.flip(0))
    other = session.routes()
    session.detach()
    # (what the split gives, as plain tensors: no object that holds the capture's forwards stays alive)
    want = [(r.per_layer(), r.token_ids) for r in mr.split_generation(capture, attention_mask=mask, sequences=out)]
    whole = capture.per_layer()
    sent: dict[str, Any] = {}
    for name, part in (("a", capture[:cut]), ("b", capture[cut:]), ("c", other[cut:])):
        if how == "files":
            part.save(tmp_path / f"{name}.npz")
        elif how == "pickles":
            sent[name] = pickle.dumps(part)
        else:
            sent[name] = copy.deepcopy(part)
    del capture, other, part
    gc.collect()  # (the capture gone, as in another process)

    def read(name: str) -> mr.Routes:
        if how == "files":
            return mr.Routes.load(tmp_path / f"{name}.npz")
        return pickle.loads(sent[name]) if how == "pickles" else sent[name]

    b, a = read("b"), read("a")  # (in either order)
    joined = mr.Routes.cat([a, b])
    assert all(torch.equal(x, y) for x, y in zip(joined.per_layer(), whole, strict=True))
    got = mr.split_generation(joined, attention_mask=mask, sequences=out)
    assert len(got) == len(want)
    for g, (rows, token_ids) in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.per_layer(), rows, strict=True))
        assert torch.equal(g.token_ids, token_ids)
    with pytest.raises(mr.RoutesValidationError):  # (forwards that do not fit, or other tokens)
        mr.split_generation(mr.Routes.cat([a, read("c")]), attention_mask=mask, sequences=out)
    tried(2)
