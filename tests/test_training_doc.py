"""The ``python`` blocks of docs/training.md run as written (``py`` blocks need a GPU or several processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_there_are_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[-2][:40])
def test_block_runs(block: str) -> None:
    exec(compile(block, str(DOC), "exec"), {})
