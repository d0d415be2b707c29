"""The host work of establishing a decision: the shortcuts of the probe's reading of each call read what the general
reading reads (tensors of nested arguments and results, hook tables set aside), no less."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from moe_replay import evidence


def _general_leaves(obj: Any, out: list[Any], depth: int = 0, ints: bool = False) -> list[Any]:
    """The reading of nested values that ``evidence._leaves`` makes, without any of its shortcuts."""
    if type(obj) is torch.Tensor or depth > 8:
        out.append(obj)
    elif type(obj) in evidence._ATOMS:
        if ints and type(obj) is int:
            out.append(obj)
    elif isinstance(obj, torch.Tensor) or (ints and type(obj) is int):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _general_leaves(v, out, depth + 1, ints)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _general_leaves(v, out, depth + 1, ints)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _general_leaves(getattr(obj, f.name), out, depth + 1, ints)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | nn.Module) and not callable(obj):
        for v in vars(obj).values():
            _general_leaves(v, out, depth + 1, ints)
    return out


def _nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf, {}, i] if i % 2 else ({"k": leaf, "none": {}}, 1.5)
    return leaf


@dataclasses.dataclass
class _Result:
    a: torch.Tensor
    b: Any


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("ints", [False, True])
def test_the_leaves_of_a_call_are_what_the_general_reading_finds(ints: bool) -> None:
    """Arguments and results as probe runs meet them (keywords empty or not, torch's structured results, mappings,
    result objects, nesting past the depth read): the same objects, in the same order."""
    x = torch.randn(3, 4)
    top = torch.topk(x, 2)
    cases: list[Any] = [
        ((x, 1), {}),
        ((x,), {"dim": -1, "out": (x, x)}),
        ((x, [x, 3, None]), {"k": {}}),
        top,
        (top, [top]),
        {"a": {}, "b": [x, {}], "c": collections.OrderedDict(z=x)},
        _Result(x, {"n": 2, "t": (x, {})}),
        _nested(7, x),
        _nested(8, x),
        _nested(9, x),
        _nested(12, x),
        ((_nested(9, {}),), {"deep": _nested(10, 4)}),
    ]
    for case in cases:
        got = evidence._leaves(case, [], 0, ints)
        want = _general_leaves(case, [], 0, ints)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True)), case


class _Logged(nn.Module):
    """A module that notes each attribute set on it."""

    def __init__(self) -> None:
        super().__init__()
        self.set: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __setattr__(self, name: str, value: Any) -> None:
        if "set" in self.__dict__:
            self.set.append(name)
        super().__setattr__(name, value)


@pytest.mark.reliability("faults")
def test_hook_tables_set_aside_for_a_probe_run_go_through_a_modules_own_attribute_setting() -> None:
    """A probe run sets the user's hooks of a scope's submodules aside and puts them back: straight into the
    attributes of a module that keeps ``nn.Module``'s own setting, through the setting of one that has its own; the
    hooks are out of the run and back after it either way."""
    logged = _Logged()
    scope = nn.Sequential(nn.Linear(2, 2), logged)
    calls: list[str] = []
    for m in scope:
        m.register_forward_hook(lambda *_: calls.append("hook"))
    before = [(m, dict(vars(m)["_forward_hooks"])) for m in scope]
    snapshot = evidence._Snapshot(scope)
    with snapshot.hooks_aside():
        scope[0](torch.zeros(1, 2))
        logged(torch.zeros(1, 2))
        assert not calls
    assert sorted(set(logged.set)) == sorted(evidence._HOOKS)  # (set aside and put back through its own setting)
    scope[0](torch.zeros(1, 2))
    logged(torch.zeros(1, 2))
    assert calls == ["hook", "hook"]
    assert all(vars(m)["_forward_hooks"] == hooks for m, hooks in before)
