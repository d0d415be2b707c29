"""Files a forward changes other than by opening them to write, put back after the runs moe_replay makes of it.

A block that saves a checkpoint with ``torch.save`` (whose writer opens the path itself), writes a file atomically
(a temporary file, then ``os.replace`` onto the name), removes a file, or rewrites a file it holds open in place
(``r+``, or ``w`` then sought back) changes the file in every run of its code that moe_replay makes: ``verify()``'s
forward must leave it as it was, and a capture must leave what one plain forward leaves. Temporary files a forward
makes and removes leave nothing behind, and an interrupt inside a run leaves Python's own functions in place.
"""

from __future__ import annotations

import builtins
import io
import os
import tempfile
import threading
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

_HOWS = ["save", "replace", "remove", "held r+", "held w", "registry", "closure", "relative"]

#: logs kept open outside the modules, by the key of the block that writes them
_REGISTRY: dict[int, Any] = {}


def _emitter(log: Any) -> Any:
    """A function that writes a line to ``log``, which only its closure holds."""

    def emit(line: str) -> None:
        log.write(line)
        log.flush()

    return emit


class _Block(nn.Module):
    """A softmax top-2 block over a loop of experts that changes the file at ``path`` at every forward, by ``how``:
    ``"save"`` a checkpoint of its experts written with ``torch.save``, ``"replace"`` its experts written to a
    temporary file then moved onto the path, ``"remove"`` the file removed, ``"held r+"``/``"held w"`` its experts
    written over the start of a file it holds open (``r+``, or ``w`` with a line written at ``__init__``),
    ``"registry"``/``"closure"`` its experts appended to a log opened at ``__init__`` that a module-level ``dict`` or
    the closure of a function it keeps holds, ``"relative"`` its experts appended to the path named relative to its
    folder, made the working directory inside the forward, ``"temp"``
    a ``NamedTemporaryFile`` and a ``mkstemp`` file made and removed, ``"interrupt"`` a ``KeyboardInterrupt`` raised in
    the runs that moe_replay makes, ``"thread"`` its experts appended to the path, and a line appended there by
    another thread during the first of those runs (which writes a witness file of its own beside it)."""

    def __init__(self, how: str, path: Path) -> None:
        super().__init__()
        self.how, self.path = how, path
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(E))
        self.held: Any = None
        if how == "held r+":
            self.held = open(path, "r+")  # (held open, as a statistics file rewritten in place)
        elif how == "held w":
            self.held = open(path, "w")
            self.held.write("opened\n")
        elif how == "registry":
            _REGISTRY[id(self)] = open(path, "a")  # (a log a module-level registry keeps, not the block)
        elif how == "closure":
            self.emit = _emitter(open(path, "a"))

    def _change(self, ids: torch.Tensor) -> None:
        line = " ".join(str(i) for i in ids.reshape(-1).tolist()) + "\n"
        if self.how == "save":
            torch.save({"ids": ids.clone()}, str(self.path))
        elif self.how == "replace":
            with open(f"{self.path}.tmp", "w") as f:
                f.write(line)
            os.replace(f"{self.path}.tmp", self.path)
        elif self.how == "remove" and self.path.exists():
            os.remove(self.path)
        elif self.how.startswith("held"):
            self.held.seek(0)
            self.held.write(line)
            self.held.truncate()
            self.held.flush()
        elif self.how == "registry":
            _REGISTRY[id(self)].write(line)
            _REGISTRY[id(self)].flush()
        elif self.how == "closure":
            self.emit(line)
        elif self.how == "relative":
            cwd = os.getcwd()
            os.chdir(self.path.parent)
            try:
                with open(self.path.name, "a") as f:
                    f.write(line)
            finally:
                os.chdir(cwd)
        elif self.how == "temp":
            with tempfile.NamedTemporaryFile(dir=self.path.parent) as t:
                t.write(line.encode())
                t.flush()
            fd, name = tempfile.mkstemp(dir=self.path.parent)
            os.write(fd, line.encode())
            os.close(fd)
            os.remove(name)
        elif self.how == "interrupt" and files._LOCAL.frames:
            raise KeyboardInterrupt
        elif self.how == "thread":
            with open(self.path, "a") as f:
                f.write(line)
            if files._LOCAL.frames and not (self.path.parent / "witness").exists():
                other = threading.Thread(target=self._other_line)
                other.start()
                other.join()

    def _other_line(self) -> None:
        with open(self.path, "a") as f:
            f.write("the other thread's line\n")
        with open(self.path.parent / "witness", "w") as f:  # (another thread's file: a run leaves it be)
            f.write("ran\n")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, D)
        weights, ids = torch.topk(F.softmax(self.gate(h), dim=-1), K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        self._change(ids)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(h[tok]) * weights[tok, slot, None])
        return out.reshape(x.shape)


class _Model(nn.Module):
    def __init__(self, how: str, path: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(how, path)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x() -> torch.Tensor:
    return torch.randn(2, 4, D, generator=torch.Generator().manual_seed(1))


def _model(how: str, folder: Path) -> _Model:
    """The model of ``how`` over a file ``f`` in ``folder`` that holds the user's line before it is built."""
    folder.mkdir()
    (folder / "f").write_text("the user's line\n")
    return _Model(how, folder / "f")


def _state(model: _Model) -> tuple[bytes | None, list[str], int | None]:
    """The file's bytes (None where there is none), the folder's names, and where the held file stands."""
    block = model.layers[0]
    assert isinstance(block, _Block)
    if block.held is not None:
        block.held.flush()
    data = block.path.read_bytes() if block.path.exists() else None
    return data, sorted(os.listdir(block.path.parent)), None if block.held is None else block.held.tell()


def _close(model: _Model) -> None:
    block = model.layers[0]
    if isinstance(block, _Block) and block.held is not None:
        block.held.close()
    log = _REGISTRY.pop(id(block), None)
    if log is not None:
        log.close()


def _functions() -> list[Any]:
    return [builtins.open, io.open, os.open, os.replace, os.rename, os.remove, os.unlink, os.truncate, torch.save]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", [*_HOWS, "temp"])
def test_a_file_a_forward_saves_replaces_removes_or_rewrites_in_place_is_as_without_a_session(
    how: str, tmp_path: Path
) -> None:
    """Once silent: ``torch.save`` to a path (its writer opens the path itself), ``os.replace`` of a temporary file
    onto the path, ``os.remove``, a held file rewritten in place and a log kept open in a registry or a closure were
    not put back after the runs, so ``verify()`` saved over, replaced or removed the user's file, and a capture left
    a line a run (many) in the log. ``verify()`` leaves the file (and a held file's
    place) as it was; a capture leaves what one plain forward leaves, and no temporary file."""
    x = _x()
    plain = _model(how, tmp_path / "plain")
    with torch.no_grad():
        plain(x)
    expected = _state(plain)
    _close(plain)
    functions = _functions()
    model = _model(how, tmp_path / "session")
    before = _state(model)
    with mr.attach(model) as session:
        session.verify(x)
        assert _state(model) == before
        with torch.no_grad(), session.capture():
            model(x)
        assert _state(model) == expected
    assert _functions() == functions
    _close(model)


@pytest.mark.reliability("silent replays")
def test_an_interrupt_inside_a_run_leaves_python_s_functions_and_the_file_as_they_were(tmp_path: Path) -> None:
    """A ``KeyboardInterrupt`` raised inside a run that establishes the decision reaches the user, with ``open``,
    ``os``'s functions and ``torch.save`` Python's own again, no block of runs left under way, and the model and its
    file as they were."""
    functions = _functions()
    model = _model("interrupt", tmp_path / "session")
    state, weights = _state(model), snapshot(model)
    with pytest.raises(KeyboardInterrupt), mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_x())
    assert _functions() == functions
    assert files._ACTIVE == 0 and not files._LOCAL.frames
    assert _state(model) == state
    assert_untouched(model, weights)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a file a run appends to is cut back to its size before the run: a line another thread appends to it "
    "during the run is cut with the run's own",
)
def test_a_line_another_thread_appends_during_a_run_is_kept(tmp_path: Path) -> None:
    """A block that appends its experts to a log, while another thread appends a line of its own to the same log
    during the runs that establish the decision: the other thread's line stays, beside one line a forward."""
    model = _model("thread", tmp_path / "session")
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_x())
    block = model.layers[0]
    assert isinstance(block, _Block)
    assert (block.path.parent / "witness").read_text() == "ran\n"
    lines = block.path.read_text().splitlines()
    routes = " ".join(str(i) for i in session.routes().layer(session.names[0]).reshape(-1).tolist())
    assert lines[0] == "the user's line"
    assert sorted(lines[1:]) == sorted([routes, "the other thread's line"])


@pytest.mark.reliability("refusals")
def test_first_blocks_opened_in_several_threads_at_once_define_the_thread_refusal_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a bare ``AssertionError`` from torch ("Library object has been destroyed"): threads that opened their
    first blocks at once each defined the operator that refuses another thread's compiled forward, and a second
    definition destroyed the first under the other thread. Threads that ask for it at once get one, defined once."""
    import moe_replay.session as session_module

    op = session_module._thread_refusal()
    defined: list[str] = []

    class _Defined:
        def register_fake(self, fn: Any) -> Any:
            return fn

        def register_autograd(self, fn: Any) -> None:
            return None

    def custom_op(name: str, **_: Any) -> Any:
        def define(fn: Any) -> _Defined:
            defined.append(name)
            threading.Event().wait(0.05)  # (a definition takes a while: the other threads ask meanwhile)
            return _Defined()

        return define

    monkeypatch.setattr(session_module, "_THREAD_REFUSAL", None)
    monkeypatch.setattr(torch.library, "custom_op", custom_op)
    start = threading.Barrier(4)
    got: list[Any] = []

    def ask() -> None:
        start.wait()
        got.append(session_module._thread_refusal())

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert defined == ["moe_replay::refuse_other_thread"]
    assert got == [op] * 4


class _DirectoryInPlace(nn.Module):
    """A block that appends a line to ``log`` at each forward, and in the runs moe_replay makes also appends to
    ``other`` and then removes it and makes a directory at its path, where no file can be put back."""

    def __init__(self, log: Path, other: Path) -> None:
        super().__init__()
        self.log, self.other = log, other
        self.inner = _Block("none", log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write("a forward\n")
        if files._LOCAL.frames and not self.other.is_dir():
            with open(self.other, "a") as f:
                f.write("a run\n")
            os.remove(self.other)
            os.mkdir(self.other)
        return self.inner(x)


@pytest.mark.reliability("refusals")
def test_a_file_a_run_leaves_beyond_putting_back_is_refused_naming_it_and_every_other_is_put_back(
    tmp_path: Path,
) -> None:
    """A run that removes a file and makes a directory at its path: that file cannot be put back, and the router is
    refused naming it, while the other file the run wrote is put back as it was, and ``open`` is Python's own."""
    log, other = tmp_path / "log", tmp_path / "other"
    log.write_text("the user's line\n")
    other.write_text("the user's other line\n")
    functions = _functions()
    model = nn.Sequential(_DirectoryInPlace(log, other))
    with pytest.raises(mr.MoEReplayError, match=r"other.*could not put it back"):
        with mr.attach(model) as session:
            session.verify(_x())
    assert log.read_text() == "the user's line\n"
    assert _functions() == functions and files._ACTIVE == 0
