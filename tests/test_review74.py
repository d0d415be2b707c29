"""A false refusal of round 54, fixed generally: the settings a router's capture keeps for a remap of its ids after
its decision (see ``Routes._ids_settings``) left in the state its code changes itself, so a count of its calls (kept
by its remap's code, by a name the code cannot be read for, or by a user's hook on it) moved with every forward and
refused every replay after the first, the replay's own forward counting too. Such state is left out, as the checks
inside a block leave it out; a real setting changed between the blocks is still refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_evidence import D
from tests.test_review71 import E, _Model

#: the counter's name, spelled so that the code reading it cannot be read for which attribute it names
_NAME = "cal" + "ls"


class _CountingShift(nn.Module):
    """The ids a router hands on, shifted by an offset its own code reads, counting its calls as ``how`` says:
    ``"statement"`` (``self.calls += 1``), ``"setattr"`` (through a name its code holds in a global)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.offset = [1]
        self.calls = 0
        self.how = how

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "statement":
            self.calls += 1
        else:
            setattr(self, _NAME, getattr(self, _NAME) + 1)
        return (ids + self.offset[0]) % E


def _model(how: str) -> _Model:
    """The router of test_review71 whose ids pass through a shift by an offset; a count of calls kept by the shift's
    code, or (``"hook"``) by a user's hook on it that shifts the ids by the router's ``offset``."""
    model = _Model()
    router = model.block.router
    if how == "hook":
        router.hook_calls = 0

        def shift(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            router.hook_calls += 1
            return (out + router.offset) % E

        router.remap.register_forward_hook(shift)
    else:
        router.remap = _CountingShift(how)
    return model


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", ["statement", "setattr", "hook"])
def test_a_count_of_calls_kept_by_the_remap_is_no_setting_of_the_routes(how: str) -> None:
    """Captured, then replayed three times: every replay runs the captured experts on the captured tokens (the count
    moved with each forward, the replays' own too, and refused each after the first); the offset changed after, the
    same routes are refused, naming it."""
    model = _model(how)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        captured = sorted(model.block.ran[-1])
        assert routes._ids_settings, "the router's ids pass through no code after its decision: the case tries nothing"
        for _ in range(3):
            with torch.no_grad(), session.replay(routes):
                model(x)
            assert sorted(model.block.ran[-1]) == captured
        if how == "hook":
            model.block.router.offset += 1
            setting = "'offset'"
        else:
            model.block.router.remap.offset[0] += 1
            setting = r"remap\.offset"
        with pytest.raises(mr.MoEReplayError, match=rf"router 'block\.router'.*{setting}.*captured"):
            with torch.no_grad(), session.replay(routes):
                model(x)
