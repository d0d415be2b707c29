"""The examples in the docstrings of the rollout-to-training and training modules run as written."""

from __future__ import annotations

import doctest

import pytest

from moe_replay import batch, distributed, generation, interop, losses, metrics


@pytest.mark.parametrize("module", [batch, distributed, generation, interop, losses, metrics], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0
