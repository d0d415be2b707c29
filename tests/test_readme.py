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
