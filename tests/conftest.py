"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moe_replay as mr


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
