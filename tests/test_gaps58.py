"""A block's own side effects outside the process, made again by the runs that establish its router's decision.

A block that writes what it chose to a file (sample-ESFT's routing log, a count of its forwards it rewrites, an
in-memory log it holds) runs its own code in every run moe_replay makes of it: the runs that establish the decision,
those that tell the order of the tokens, ``verify()``'s forward. Each must leave the files as they were, so that the
file holds what the forwards the user made wrote, exactly as without a session; a file too large to keep before a
run writes over it is refused, the file and the model left as they were.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
import moe_replay._files as files
from tests.conftest import assert_untouched, snapshot

D, E, K = 8, 6, 2


def _ids_line(ids: torch.Tensor) -> str:
    return " ".join(str(i) for i in ids.reshape(-1).tolist()) + "\n"


class _LoggedBlock(nn.Module):
    """A softmax top-2 block over a loop of experts that writes the experts it used at every forward, by ``how``:
    ``"append"`` a line appended to a file it opens at each forward, ``"held"`` a line to a file object it holds
    (opened at ``__init__``), ``"memory"`` a line to an ``io.StringIO`` it holds, ``"count"`` a JSON file it reads
    and writes over with its count of forwards and its last experts, ``"path"`` a line appended through
    ``pathlib``'s ``Path.open``."""

    def __init__(self, how: str, path: Path) -> None:
        super().__init__()
        self.how, self.path = how, path
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(E))
        self.held: Any = None
        if how == "held":
            self.held = open(path, "a")  # (held open, as a log opened once)
        elif how == "memory":
            self.held = io.StringIO()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, D)
        weights, ids = torch.topk(F.softmax(self.gate(h), dim=-1), K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.how == "append":
            with open(self.path, "a") as f:
                f.write(_ids_line(ids))
        elif self.how in ("held", "memory"):
            self.held.write(_ids_line(ids))
        elif self.how == "count":
            count = json.loads(self.path.read_text())["count"] if self.path.exists() else 0
            with open(self.path, "w") as f:
                json.dump({"count": count + 1, "ids": ids.reshape(-1).tolist()}, f)
        elif self.how == "path":
            with self.path.open("a") as f:
                f.write(_ids_line(ids))
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(h[tok]) * weights[tok, slot, None])
        return out.reshape(x.shape)


class _Model(nn.Module):
    def __init__(self, how: str, path: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_LoggedBlock(how, path)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, D, generator=torch.Generator().manual_seed(seed))


def _written(model: _Model) -> str:
    """What the block's log holds now (flushed where it is held open)."""
    block = model.layers[0]
    assert isinstance(block, _LoggedBlock)
    if block.how == "memory":
        return str(block.held.getvalue())
    if block.how == "held":
        block.held.flush()
    return block.path.read_text() if block.path.exists() else ""


def _plain_log(how: str, path: Path, x: torch.Tensor, forwards: int) -> str:
    """The log a model without a session writes over ``forwards`` forwards of ``x``."""
    model = _Model(how, path)
    with torch.no_grad():
        for _ in range(forwards):
            model(x)
    out = _written(model)
    if isinstance(model.layers[0].held, io.IOBase):
        model.layers[0].held.close()
    return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["append", "held", "memory", "count", "path"])
def test_a_blocks_log_holds_what_the_forwards_wrote_as_without_a_session(how: str, tmp_path: Path) -> None:
    """Once silent: each run that establishes the decision wrote its line (or its count) too. A capture then a
    replay: the log holds what two plain forwards write, and its last experts are the routes recorded."""
    x = _x()
    expected = _plain_log(how, tmp_path / "plain.log", x, forwards=2)
    model = _Model(how, tmp_path / "session.log")
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        with torch.no_grad(), session.replay(routes):
            model(x)
        written = _written(model)
    assert written == expected
    ids = routes.layer(session.names[0]).reshape(-1).tolist()
    if how == "count":
        assert json.loads(written) == {"count": 2, "ids": ids}
    else:
        assert written.splitlines()[-1].split() == [str(i) for i in ids]
    if isinstance(model.layers[0].held, io.IOBase):
        model.layers[0].held.close()


@pytest.mark.reliability("silent replays")
def test_verify_leaves_a_blocks_log_as_it_was(tmp_path: Path) -> None:
    """``verify()`` runs a forward that records nothing and leaves the model as it was: its log too."""
    model = _Model("append", tmp_path / "log")
    (tmp_path / "log").write_text("before\n")
    with mr.attach(model) as session:
        session.verify(_x())
        assert (tmp_path / "log").read_text() == "before\n"
        with torch.no_grad(), session.capture():
            model(_x(2))
    assert (tmp_path / "log").read_text().splitlines()[0] == "before"
    assert len((tmp_path / "log").read_text().splitlines()) == 2


@pytest.mark.reliability("refusals")
def test_a_file_too_large_to_keep_written_over_in_a_run_is_refused_and_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the block writes over that is larger than what moe_replay keeps to put it back is refused before the
    run opens it: the file's bytes and the model stay as they were."""
    monkeypatch.setattr(files, "_CONTENT_BUDGET", 16)
    path = tmp_path / "count.json"
    kept = json.dumps({"count": 41, "ids": list(range(40))})
    path.write_text(kept)
    model = _Model("count", path)
    before = snapshot(model)
    with pytest.raises(mr.MoEReplayError, match=r"count\.json.*write over it") as caught:
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert "include=" in str(caught.value)
    assert path.read_text() == kept
    assert_untouched(model, before)
    assert builtins.open is files._ORIGINAL["open"] and io.open is files._ORIGINAL["io"]


@pytest.mark.reliability("silent replays")
def test_open_is_python_s_own_again_after_the_runs(tmp_path: Path) -> None:
    """The stand-ins for ``open`` are there only while runs are under way: after a capture (and a refusal above)
    ``open`` is Python's own, and a file the user writes after it is left alone."""
    original, original_io = builtins.open, io.open
    model = _Model("append", tmp_path / "log")
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_x())
        assert builtins.open is original and io.open is original_io
        (tmp_path / "other").write_text("mine")
    assert (tmp_path / "other").read_text() == "mine"
    assert len((tmp_path / "log").read_text().splitlines()) == 1


_LOGGER = logging.getLogger("tests.test_gaps58.routing")


class _LoggingBlock(_LoggedBlock):
    """The block of :class:`_LoggedBlock` that logs its experts through a module-level ``logging`` logger instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, D)
        weights, ids = torch.topk(F.softmax(self.gate(h), dim=-1), K, dim=-1)
        _LOGGER.info(_ids_line(ids).strip())
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(h[tok]) * weights[tok, slot, None] / weights.sum(-1)[tok, None])
        return out.reshape(x.shape)


@pytest.mark.reliability("silent replays")
def test_a_blocks_lines_logged_through_a_logging_file_handler_are_one_a_forward(tmp_path: Path) -> None:
    """Once silent: a block that logs its experts through ``logging`` (a ``FileHandler`` on a module-level logger)
    logged a line a run too, the handler's stream held by the logger, not the modules. Reached from the logger the
    block's code names, it is put back: one line a forward, as without a session."""
    handler = logging.FileHandler(tmp_path / "routing.log")
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.INFO)
    try:
        model = _Model("none", tmp_path / "unused")
        model.layers[0] = _LoggingBlock("none", tmp_path / "unused")
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
        handler.flush()
        lines = (tmp_path / "routing.log").read_text().splitlines()
        assert lines == [" ".join(str(i) for i in session.routes().layer(session.names[0]).reshape(-1).tolist())]
    finally:
        _LOGGER.removeHandler(handler)
        handler.close()
