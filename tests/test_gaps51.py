"""Known gaps closed in round 51, and the cases beside each that must stay as they were.

- A ``map`` a router draws from, of one of Python's own pure functions over iterators of data: copied for the runs
  that establish a decision, as a ``zip`` is, so detach() hands back the user's own object (see
  ``tests/test_review51.py``); a map of the user's own function, or one that meets an item that is not a plain
  value, is still drawn from itself, each item's function called once, as in the plain model.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _first, _PerTokenFrom, _RouterBlock


# ----------------------------------------------------------------------------- a map a router draws from
class _Counted:
    """An item whose conversion to a float is counted (by the item's own value): code of the user's that a copy of
    the map must not run a second time."""

    def __init__(self, value: int, calls: Counter[int]) -> None:
        self.value, self.calls = value, calls

    def __float__(self) -> float:
        self.calls[self.value] += 1
        return float(self.value)


def _of_the_users_function(calls: Counter[int]) -> Iterator[Any]:
    def halved(v: int) -> float:
        calls[v] += 1
        return v / 2

    return map(halved, range(100000))


def _with_an_item_not_plain(calls: Counter[int]) -> Iterator[Any]:
    return map(float, iter([_Counted(i, calls) if i % 5 == 3 else float(i) for i in range(5000)]))


_MAPS: dict[str, Callable[[Counter[int]], Iterator[Any]]] = {
    "the user's function": _of_the_users_function,
    "an item that is not a plain value": _with_an_item_not_plain,
}


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("case", list(_MAPS))
def test_a_map_that_cannot_be_copied_runs_the_users_code_once_per_item_and_draws_in_step(case: str) -> None:
    """A router draws per token from a map whose function is the user's own (which may count or draw), or a map of
    ``float`` over items one of which converts by the user's code: no copy calls that code, so each item's is called
    once at most (as the plain model calls it), the captured forwards see the plain model's draws, and after detach()
    the router's attribute gives the plain model's next item."""
    make = _MAPS[case]
    calls: list[Counter[int]] = [Counter(), Counter()]
    torch.manual_seed(0)
    model = nn.Sequential(*(_RouterBlock(_PerTokenFrom(make(c))) for c in calls))
    torch.manual_seed(0)
    plain = nn.Sequential(*(_RouterBlock(_PerTokenFrom(make(Counter()))) for _ in range(2)))
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a generator of the waiting items may be handed back)
        with mr.attach(model) as session, session.capture(), torch.no_grad():
            got = [model(x) for x in xs]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
    assert all(c and max(c.values()) == 1 for c in calls), "the user's code ran twice on an item"
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]
