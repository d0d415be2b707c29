"""Router styles of other codebases (torchtitan, Megatron-core, DeepSpeed, MegaBlocks, gpt-fast,
mistral-inference, nanoGPT-MoE) pass the same four checks as the HF families, with no configuration."""

from __future__ import annotations

import pytest

import moe_replay as mr

from . import router_styles
from .replay_checks import CHECKS, check_model


@pytest.mark.parametrize("style", list(router_styles.STYLES))
def test_style_passes_the_four_checks(style: str) -> None:
    built, routers = router_styles.build(style)
    assert [s.name for s in mr.find_routers(built.model)] == routers
    res = check_model(style, built)
    assert res.status == "pass", f"{style} failed {[c for c in CHECKS if not res.checks[c]]}: {res.notes}"
