"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import collections
import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import moe_replay as mr

# The test models are tiny: intra-op threads buy nothing, and on a busy 2-core machine the
# spinning of torch's thread pool made each op up to ~100x slower. One thread keeps the
# suite's time steady. The processes tests start (notebook kernels, the CLI, examples, distributed
# workers) read OMP_NUM_THREADS when torch starts: a notebook kernel on two threads beside a busy
# worker ran its cells 16 times slower (notebook 03: 81 s, 5 s on one thread).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No test downloads anything: transformers must not even try (it reads this when it is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ----------------------------------------------------------------------------- hypothesis
# "ci" (the default): a fixed, bounded set of examples, so CI time and the case counts in
# docs/reliability.md do not drift. "explore": fresh random examples on every run; scale
# the number with MOE_REPLAY_EXAMPLES (a factor), e.g. MOE_REPLAY_HYPOTHESIS=explore MOE_REPLAY_EXAMPLES=20.
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MOE_REPLAY_HYPOTHESIS", "ci"))
_EXAMPLES_FACTOR = float(os.environ.get("MOE_REPLAY_EXAMPLES", "1"))


def examples(n: int) -> settings:
    """Settings for a property test: ``n`` examples in CI (times ``MOE_REPLAY_EXAMPLES``)."""
    return settings(max_examples=max(1, round(n * _EXAMPLES_FACTOR)))


# ----------------------------------------------------------------------------- case counts
# Reliability tests (marked ``@pytest.mark.reliability("topic")``) count the cases they try
# with ``tried()``: one per hypothesis example, per fault point, per thread iteration...
# A test that never calls it counts one case per run. With MOE_REPLAY_CASES=path.json the
# counts and outcomes are written there (tests/reliability_report.py renders them).
_CASES: collections.Counter[str] = collections.Counter()
_RUNS: dict[str, dict[str, Any]] = {}
_CURRENT: list[str] = []


def tried(n: int = 1) -> None:
    """Count ``n`` cases tried by the running reliability test."""
    if _CURRENT:
        _CASES[_CURRENT[-1]] += n


def _test_id(item: pytest.Item) -> str:
    return item.nodeid.split("[", 1)[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("reliability")
    if marker is None:
        yield
        return
    key = _test_id(item)
    before = _CASES[key]
    _CURRENT.append(key)
    try:
        yield
    finally:
        _CURRENT.pop()
        if _CASES[key] == before:
            _CASES[key] += 1
        doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip().split("\n")[0]
        run = _RUNS.setdefault(key, {"topic": marker.args[0] if marker.args else "other", "doc": doc})
        run["items"] = run.get("items", 0) + 1


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    key = report.nodeid.split("[", 1)[0]
    if key in _RUNS and (report.when == "call" or report.outcome != "passed"):
        outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        _RUNS[key].setdefault("outcomes", collections.Counter())[outcome] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("MOE_REPLAY_CASES")
    if path:
        out = {k: {**v, "cases": _CASES[k], "outcomes": dict(v.get("outcomes", {}))} for k, v in _RUNS.items()}
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # (each xdist worker its own file: the report merges them)
        with open(f"{path}.{worker}" if worker else path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state_dict, to compare against after an operation."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """No wrapper, hook or changed tensor left on the model."""
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"a forward override is left on '{name}'"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on '{name}'"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"'{k}' changed"


def perturb_routers(session: mr.Session, scale: float = 1.0, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in session.sites:
            w = s.module.weight
            w.add_(scale * w.std() * torch.randn(w.shape, generator=g).to(w))


@pytest.fixture(params=mr.models.STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.fixture(autouse=True)
def _compile_stance_left_as_it_was() -> Iterator[None]:
    """torch.compile's stance is global: no test may leave it changed (once the watch of a first forward, opened
    inside the token-order runs and closed after them, put back the runs' ``force_eager`` for good, and every
    later compiled call in the process ran eagerly)."""
    yield
    frame = getattr(torch._dynamo, "eval_frame", None)
    stance = getattr(getattr(frame, "_stance", None), "stance", "default")
    if stance != "default":
        torch.compiler.set_stance("default")
        pytest.fail(f"torch.compile's stance was left at {stance!r}")
