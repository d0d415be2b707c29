"""The settings a config object holds, kept between reads while its ``__dict__`` holds the same values.

A router scope's settings (:func:`moe_replay.intercept._fingerprint`) decide whether an established decision, and
the token order of the way to the routers, still hold: a setting read stale would keep a decision made under
another value of it. Each read here is compared with a fresh one of the same config, made with nothing kept.
"""

from __future__ import annotations

import enum
import random
import types
from collections.abc import Iterator
from typing import Any

import pytest
from torch import nn

from moe_replay import intercept

pytestmark = pytest.mark.reliability("silent replays")


class Scoring(enum.Enum):
    SOFTMAX = 1
    SIGMOID = 2


class Cfg:
    """A plain config object (weakly referable: its settings are kept between reads)."""

    def __init__(self) -> None:
        self.top_k = 2
        self.use_bias = False
        self.scale = 1.0
        self.name = "router"
        self.scoring = Scoring.SOFTMAX
        self.extra: Any = [1, 2]
        self.nothing = None


class Holder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg


def _fresh(module: nn.Module) -> dict[str, Any]:
    """The fingerprint read with nothing kept from earlier reads."""
    kept = dict(intercept._HELD)
    intercept._HELD.clear()
    try:
        return intercept._fingerprint(module, code=False)
    finally:
        intercept._HELD.clear()
        intercept._HELD.update(kept)


def _same(module: nn.Module) -> None:
    got = intercept._fingerprint(module, code=False)
    assert got == _fresh(module)
    assert intercept._fingerprint(module, code=False, memo={}, prefix="0 ") == {
        f"0 {k}": v for k, v in _fresh(module).items()
    }


@pytest.fixture
def held() -> Iterator[Holder]:
    holder = Holder(Cfg())
    _same(holder)  # (read once: kept from here on)
    assert id(holder.config) in intercept._HELD
    yield holder


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c, "top_k", 3),
        lambda c: setattr(c, "use_bias", True),
        lambda c: setattr(c, "scale", float("nan")),
        lambda c: setattr(c, "name", "other"),
        lambda c: setattr(c, "scoring", Scoring.SIGMOID),
        lambda c: setattr(c, "nothing", 0),
        lambda c: setattr(c, "extra", 7),  # (a value of no setting's type becomes one)
        lambda c: setattr(c, "top_k", [2]),  # (a setting becomes a value of no setting's type)
        lambda c: setattr(c, "added", 1),
        lambda c: delattr(c, "use_bias"),
        lambda c: (delattr(c, "top_k"), setattr(c, "top_k", 2)),  # (the same value, its name now last)
        lambda c: (delattr(c, "top_k"), setattr(c, "k", 2)),  # (as many names, one other)
        lambda c: (delattr(c, "nothing"), setattr(c, "other", None)),  # (the last name another, its value the same)
        lambda c: c.__dict__.update(top_k=4),
        lambda c: setattr(c, "_private", 5),
    ],
)
def test_a_changed_config_is_read_again(held: Holder, change: Any) -> None:
    """Whatever changes in the config (a value, its type, a name added, removed or moved), the settings read are the
    config's now, as a fresh read gives them."""
    before = intercept._fingerprint(held, code=False)
    change(held.config)
    _same(held)
    _same(held)  # (and kept again from the read after the change)
    if "_private" not in vars(held.config) and vars(held.config).get("top_k") != 2:
        assert intercept._fingerprint(held, code=False) != before


def test_a_value_set_again_reads_the_same(held: Holder) -> None:
    """The same value set again as another object (a str made anew): the settings read are equal, not stale."""
    held.config.name = "".join(["rou", "ter"])
    _same(held)


def test_a_config_gone_and_its_id_taken_is_read_anew() -> None:
    """A kept config that is gone leaves nothing behind: another config (at its ``id``, maybe) is read as it is."""
    for top_k in range(2, 12):
        holder = Holder(Cfg())
        holder.config.top_k = top_k
        assert intercept._fingerprint(holder, code=False)["config.top_k"] == top_k
        del holder  # (freed here: its entry goes with it)
    assert all(entry.ref() is not None for entry in intercept._HELD.values())


def test_a_config_with_no_weak_reference_is_read_every_time() -> None:
    ns = types.SimpleNamespace(top_k=2, use_bias=False)
    holder = Holder(ns)
    _same(holder)
    assert id(ns) not in intercept._HELD
    ns.use_bias = True
    _same(holder)
    assert intercept._fingerprint(holder, code=False)["config.use_bias"] is True


def test_random_changes_are_always_read() -> None:
    """A long random run of changes to two configs, shared by modules, each read after every change."""
    rng = random.Random(0)
    a, b = Cfg(), Cfg()
    holders = [Holder(a), Holder(a), Holder(b)]
    root = nn.ModuleList(holders)
    values: list[Any] = [0, 1, 2, True, False, 0.5, float("nan"), "x", "y", None, Scoring.SIGMOID, [1], (2,), {}]
    for _ in range(400):
        cfg = rng.choice((a, b))
        name = rng.choice(("top_k", "use_bias", "scale", "name", "scoring", "extra", "n1", "n2"))
        if rng.random() < 0.15 and name in vars(cfg):
            delattr(cfg, name)
        else:
            setattr(cfg, name, rng.choice(values))
        for h in rng.sample(holders, 2):
            _same(h)
        memo: dict[int, Any] = {}
        got = {i: intercept._fingerprint(h, code=False, memo=memo, prefix=f"{i} ") for i, h in enumerate(root)}
        assert got == {i: {f"{i} {k}": v for k, v in _fresh(h).items()} for i, h in enumerate(root)}
