"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _python_blocks()
    assert blocks, "the README has a python quick start"
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "README quick start", "exec"), scope)
    model = scope["model"]
    assert (tmp_path / "routes.npz").exists()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("router.weight"))
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert 10 <= len(blocks[0].strip().splitlines()) <= 20


def test_every_other_python_block_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks()[1:]
    assert blocks, "the README has a rollout-to-training example"
    scopes = []
    for i, block in enumerate(blocks, 1):
        scope: dict[str, object] = {}
        exec(compile(block, f"README python block {i + 1}", "exec"), scope)
        scopes.append(scope)
    rollout = next(s for s in scopes if "report" in s)
    report = rollout["report"]
    assert report.tokens > 0 and report.overall == 0.0  # replay reproduced every recorded route
    assert not rollout["session"].attached
    assert all(p.grad is not None for n, p in rollout["model"].named_parameters() if n.endswith("router.weight"))
