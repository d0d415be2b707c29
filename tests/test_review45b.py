"""Adversarial review of round 45's changes: the places of forwards given a 4-d attention mask, the token order told
from the changed token's own row with sequence 0's padding left out, and blocks opened inside a compiled function.
Each case is forced exactly, refused clearly, or (strict xfail) a silence left to fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr


@pytest.mark.reliability("bad inputs")
def test_a_block_opened_inside_a_fullgraph_compile_names_what_to_do() -> None:
    """torch.compile(fullgraph=True) allows no graph break, and a block runs eagerly at one: the error says to open the
    block outside the compiled function, and the same step compiled with graph breaks is forced."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with torch.no_grad():
            model(x)
        with session.capture(), torch.no_grad():
            want = model(x).logits
        routes = session.routes()

        def step(x: torch.Tensor) -> Any:
            with session.replay(routes), torch.no_grad():
                return model(x).logits

        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"open the block outside the compiled function"):
            torch.compile(step, fullgraph=True, backend="eager")(x)
        torch._dynamo.reset()
        with session.capture():
            got = torch.compile(step, backend="eager")(x)
        assert session.routes().equal(routes) and torch.allclose(got, want, atol=1e-5)
