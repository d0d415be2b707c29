"""Adversarial review of round 49's merges (round 50): the iterators a router draws from while its decision is
established, the per-router call check of compiled forwards, a token fed its place among its KV cache's tokens,
and detach() under Ctrl-C. A replay forces the captured experts on the tokens they were recorded for, or it is
refused; plain use is not refused, and the model is left as it was."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_left48 import _Block, _Router

_XS = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]


# --- iterators a router keeps in a dict or list it holds ------------------------------------------------------------


def _jittered(router: _Router, item: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x, router.weight) + 0.3 * torch.sin(torch.tensor(float(item))) * torch.arange(8.0)
    w, idx = logits.softmax(-1).topk(router.top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


class _JitterFromADict(_Router):
    """Draws its jitter from an iterator kept in a dict it holds (a table of named noise streams)."""

    def __init__(self, stream: Iterator[int] | None = None) -> None:
        super().__init__()
        self.streams = {"jitter": itertools.cycle(range(1000)) if stream is None else stream}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _jittered(self, next(self.streams["jitter"]), x)


class _JitterFromAList(_Router):
    """Draws its jitter from an iterator kept in a list it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.streams = [itertools.cycle(range(1000))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _jittered(self, next(self.streams[0]), x)


def _own() -> tuple[nn.Module, list[Iterator[int]]]:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_JitterFromADict()), _Block(_JitterFromAList()))
    return model, [model[0].router.streams["jitter"], model[1].router.streams[0]]


def _shared() -> tuple[nn.Module, list[Iterator[int]]]:
    torch.manual_seed(0)
    stream = itertools.cycle(range(1000))
    return nn.Sequential(_Block(_JitterFromADict(stream)), _Block(_JitterFromADict(stream))), [stream, stream]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("make", [_own, _shared], ids=["each its own", "one shared"])
def test_an_iterator_held_in_a_dict_or_list_attribute_replays_and_the_forwards_get_the_plain_draws(
    make: Callable[[], tuple[nn.Module, list[Iterator[int]]]],
) -> None:
    """Once refused as a router whose output differs between two runs on the same inputs: the runs that establish the
    decision stood in only for an iterator held in an attribute itself, so one kept in a dict or list the router holds
    was advanced by every run. Such iterators are stood in for too: the capture's forwards see the plain model's
    draws, a replay of them reproduces them, and after detach each place holds its own iterator, which gives its
    next item as the plain model's does."""
    plain, plain_streams = make()
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    model, streams = make()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in _XS]
        routes = session.routes()
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g), "a forward after attach saw other draws than the plain model"
    assert model[0].router.streams["jitter"] is streams[0]
    held_1 = model[1].router.streams[0] if isinstance(model[1].router.streams, list) else None
    assert held_1 is None or held_1 is streams[1]
    assert [next(s) for s in streams] == [next(s) for s in plain_streams]
    with mr.attach(model) as session, session.replay(routes), torch.no_grad():
        [model(x) for x in _XS]  # (not refused: every row consumed)
