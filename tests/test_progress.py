"""The progress bar of the library's long work: drawn where a person watches, never changing a result."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

import moe_replay as mr
from moe_replay import _progress
from moe_replay._progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))


def test_the_bar_is_drawn_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_REPLAY_PROGRESS", raising=False)
    assert _progress.wanted(_Terminal())
    assert not _progress.wanted(io.StringIO())
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", "0")
    assert not _progress.wanted(_Terminal())
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", "1")
    assert _progress.wanted(io.StringIO())


def test_the_built_in_bar_advances_to_its_total_and_clears_its_line(no_tqdm: None) -> None:
    stream = _Terminal()
    with Progress(5, "work", stream=stream) as bar:
        for _ in range(7):  # (more updates than steps: the count stops at the total)
            bar.update()
    text = stream.getvalue()
    assert bar.done == 5 and "5/5" in text and "6/5" not in text
    assert text.endswith("\r\033[K")
    assert "Progress('work', 5/5" in repr(bar)


def test_a_hidden_bar_writes_nothing(no_tqdm: None) -> None:
    stream = io.StringIO()
    with Progress(3, "work", stream=stream) as bar:
        bar.update(3)
    assert bar.done == 3 and stream.getvalue() == ""


def test_tqdm_draws_the_bar_where_it_is_installed() -> None:
    pytest.importorskip("tqdm")
    stream = _Terminal()
    with Progress(4, "work", stream=stream) as bar:
        bar.update(4)
        assert bar._tqdm is not None and bar._tqdm.n == 4
    assert "work:" in stream.getvalue() and "/4" in stream.getvalue()  # (tqdm's own bar, taken off at the end)


@pytest.mark.parametrize("shown", ["1", "0"])
def test_verify_shows_the_routers_it_reaches_and_reports_the_same_either_way(
    shown: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_tqdm: None
) -> None:
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", shown)
    reports = []
    for _ in range(2):  # (a fresh model each time: the first forward establishes every decision)
        torch.manual_seed(0)
        model = mr.models.build("softmax_topk", num_layers=3)
        with mr.attach(model) as session:
            reports.append((session.verify(torch.zeros(1, 4, dtype=torch.long)), len(session.names)))
        monkeypatch.setenv("MOE_REPLAY_PROGRESS", "0")  # the second run, hidden, is the reference
    err = capsys.readouterr().err
    (shown_report, n), (hidden_report, _) = reports
    assert dict(shown_report) == dict(hidden_report) and str(shown_report) == str(hidden_report)
    assert (f"{n}/{n}" in err) == (shown == "1")
    assert (err == "") == (shown == "0")
