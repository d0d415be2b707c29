"""The progress bar of the library's long work: drawn where a person watches, never changing a result."""

from __future__ import annotations

import importlib.util
import io
import sys
import types

import pytest
import torch

import moe_replay as mr
from moe_replay import _progress, interop
from moe_replay.__main__ import main
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


@pytest.fixture
def tqdm_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """tqdm as it is where it is not installed: ``import tqdm`` fails."""
    monkeypatch.setitem(sys.modules, "tqdm", None)


def _bars(err: str, total: int) -> bool:
    """Did the built-in bar reach ``total`` of ``total`` steps, and never more?"""
    return f"{total}/{total}" in err and f"{total + 1}/{total}" not in err


def test_the_caller_decides_before_the_command_line_setting_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", "1")
    with _progress.setting(False):
        assert not _progress.wanted(_Terminal())  # (--no-progress over the environment)
        assert Progress(1, "x", enabled=True, stream=io.StringIO())._on  # a function's progress=True over both
        with _progress.setting(None):
            assert _progress.wanted(io.StringIO())  # (None: the environment again)
    monkeypatch.delenv("MOE_REPLAY_PROGRESS")
    with _progress.setting(True):
        assert _progress.wanted(io.StringIO())
    assert not _progress.wanted(io.StringIO())  # the setting ends with its block


def test_other_ranks_of_a_distributed_run_draw_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_REPLAY_PROGRESS", raising=False)
    assert not _progress._other_rank()  # (no process group here)
    monkeypatch.setattr(_progress, "_other_rank", lambda: True)
    assert not _progress.wanted(_Terminal())
    with _progress.setting(True):  # asked for: shown on every rank
        assert _progress.wanted(_Terminal())


@pytest.mark.parametrize("bad", ["no", 1, 0.0, "False"])
def test_a_progress_that_is_no_flag_is_refused_before_any_work(bad: object) -> None:
    model = mr.models.build("softmax_topk", num_layers=1)
    calls = [
        lambda: model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1, progress=bad),
        lambda: mr.split_generation(mr.Routes([torch.zeros(2, 1, dtype=torch.long)], ["r"], [2]), progress=bad),
        lambda: interop.from_verl(torch.zeros(1, 2, 1, 1), torch.ones(1, 2), _verl_map(), progress=bad),
        lambda: interop.to_verl([], _verl_map(), prompt_lengths=[], progress=bad),
        lambda: _progress.setting(bad).__enter__(),
    ]
    for call in calls:
        with pytest.raises(mr.ArgumentTypeError, match="progress"):
            call()


def test_steps_counts_each_finished_step_and_takes_its_bar_off_when_the_loop_raises(
    no_tqdm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(1, 100))  # (a second between draws: every step is drawn, none skipped as too soon)
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    seen = []
    with pytest.raises(ValueError, match="stop"):
        for i in _progress.steps(4, "work", enabled=True):
            seen.append(i)
            if i == 2:
                raise ValueError("stop")
    text = stream.getvalue()
    assert seen == [0, 1, 2] and "2/4" in text and "3/4" not in text  # (step 2 never finished)
    assert text.endswith("\r\033[K")
    assert list(_progress.steps(3, "quiet", enabled=False)) == [0, 1, 2]


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_generate_shows_its_decode_steps_and_returns_the_same_tokens(
    tqdm_installed: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bars = []
    if tqdm_installed:
        tqdm = pytest.importorskip("tqdm")

        class Recorded(tqdm.tqdm):  # type: ignore[misc,name-defined]
            def close(self) -> None:
                bars.append((self.n, self.total))
                super().close()

        monkeypatch.setattr(tqdm, "tqdm", Recorded)
    else:
        request.getfixturevalue("tqdm_absent")
    model = mr.models.build("softmax_topk", num_layers=2)
    prompt = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(1))
    shown = model.generate(prompt, max_new_tokens=5, progress=True)
    err = capsys.readouterr().err
    assert "moe_replay: generating" in err
    assert (set(bars) == {(5, 5)}) if tqdm_installed else _bars(err, 5)  # (tqdm's bar at its close, or ours)
    hidden = model.generate(prompt, max_new_tokens=5, progress=False)
    auto = model.generate(prompt, max_new_tokens=5)  # (stderr is captured here: no terminal, no bar)
    assert capsys.readouterr().err == ""
    assert torch.equal(shown, hidden) and torch.equal(shown, auto)


def test_split_generation_shows_its_sequences_and_splits_the_same(
    tqdm_absent: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    prompt = torch.randint(1, model.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    with mr.attach(model) as session:
        with session.capture():
            seqs = model.generate(prompt, max_new_tokens=3, attention_mask=mask, progress=False)
        routes = session.routes()
    for keep_padding in (False, True):
        shown = mr.split_generation(
            routes, attention_mask=mask, sequences=seqs, keep_padding=keep_padding, progress=True
        )
        assert _bars(capsys.readouterr().err, 3)
        hidden = mr.split_generation(routes, attention_mask=mask, sequences=seqs, keep_padding=keep_padding)
        assert capsys.readouterr().err == ""
        assert len(shown) == len(hidden) == 3
        for a, b in zip(shown, hidden, strict=True):
            assert a.equal(b) and torch.equal(a.token_ids, b.token_ids)
    # the rows each sequence holds, read from the capture by hand: its prompt's real tokens, then its steps
    unpadded = mr.split_generation(routes, attention_mask=mask, progress=True)
    for i, part in enumerate(unpadded):
        real = mask[i].nonzero().flatten().tolist()
        rows = [i * 4 + j for j in real] + [12 + 3 * s + i for s in range(2)]
        assert torch.equal(part.indices[:-1], routes.indices[rows]) and bool((part.indices[-1] == -1).all())


def _verl_map() -> interop.LayerMap:
    return interop.LayerMap.from_names(["layers.0.mlp.gate"], 1, 4, 1)


def test_the_verl_converters_show_their_sequences_and_convert_the_same(
    tqdm_absent: None, capsys: pytest.CaptureFixture[str]
) -> None:
    lm = interop.LayerMap.from_names(["layers.0.mlp.gate", "layers.1.mlp.gate"], 2, 8, 2)
    g = torch.Generator().manual_seed(3)
    batch = torch.argsort(torch.rand(4, 6, 2, 8, generator=g), dim=-1)[..., :2].to(torch.int16)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :2] = mask[3, 4:] = 0
    batch[mask == 0] = 0
    batch[:, -1] = 0  # (the unrouted last token, as verl writes it)
    batch[3, 3] = 0
    told = "tokens,layers,k"  # (as many layers as k: the batch's data alone cannot tell its axes)
    shown = interop.from_verl(batch, mask, lm, progress=True, axes=told)
    assert _bars(capsys.readouterr().err, 4)
    hidden = interop.from_verl(batch, mask, lm, axes=told)
    assert capsys.readouterr().err == ""
    assert all(a.equal(b) for a, b in zip(shown, hidden, strict=True))
    for i, part in enumerate(shown):  # each sequence's own rows, the last one unrouted
        rows = batch[i][mask[i].bool()].long()
        assert torch.equal(part.indices[:-1], rows[:-1]) and bool((part.indices[-1] == -1).all())
    lengths = [4, 4, 4, 4]
    out = interop.to_verl(shown, lm, prompt_lengths=lengths, progress=True)
    assert _bars(capsys.readouterr().err, 4)
    assert torch.equal(out, interop.to_verl(shown, lm, prompt_lengths=lengths, progress=False))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_the_command_line_flag_shows_or_hides_the_bar_and_prints_the_same(
    flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tqdm_absent: None
) -> None:
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", "1" if flag == "--no-progress" else "0")  # (the flag wins)
    assert main(["inspect", "softmax_topk", "--layers", "2", "--verify", flag]) == 0
    shown = capsys.readouterr()
    assert main(["inspect", "softmax_topk", "--layers", "2", "--verify"]) == 0
    reference = capsys.readouterr()  # (the environment's choice)
    assert shown.out == reference.out and "verify: one forward" in shown.out
    assert _bars(shown.err, 2) == (flag == "--progress") and _bars(reference.err, 2) == (flag == "--no-progress")
    assert (shown.err == "") == (flag == "--no-progress")
