"""Round 60's review: a video kept in one preallocated buffer the user's loop refills in place between forwards,
beside positions that start at two places, and rows a loss pairs with their router by where they start in its
storage."""

from __future__ import annotations

import inspect

import pytest
import torch

from .test_review55 import _by_name, _slices, _wrapper

_P = inspect.Parameter


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("name", ["frames", "clip", "vision_x"])
def test_a_slice_fed_another_ranks_tokens_beside_a_video_buffer_refilled_in_place_is_refused(name: str) -> None:
    """A video's frames kept in one preallocated buffer that the loop refills in place (``buf.copy_(clip)``) before
    each forward, under a name that names no media: another rank's slice fed beside it is refused, as beside a video
    handed on as a new tensor each time (a buffer written between forwards is not thereby a cache)."""
    shape = (1, 3, 3, 4, 4) if name != "vision_x" else (1, 1, 3, 3, 4, 4)
    clip = torch.rand(shape)
    buf = torch.empty(shape)
    model = _wrapper(
        [("position_ids", _P.POSITIONAL_OR_KEYWORD), (name, _P.POSITIONAL_OR_KEYWORD)],
        _by_name("position_ids"),
    )

    def run(ids: torch.Tensor, pos: torch.Tensor) -> object:
        buf.copy_(clip)  # (the loop's next clip, here the same one)
        return model(ids, position_ids=pos, **{name: buf})

    exact, refused = _slices(model, run)
    assert exact, "refused though exact"
    assert refused, "rank 0's rows forced on rank 1's"
