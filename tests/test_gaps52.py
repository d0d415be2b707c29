"""Round 52's gaps: an iterator numpy gives over an array's items (``array.flat``) that a router draws from, positions
given under names of a model's own, a model that keeps its KV cache itself, and the refusal of a router whose output
differs between two runs naming the iterators it draws from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _first, _PerTokenFrom, _RouterBlock


# ----------------------------------------------------------------------------- numpy's flat iterators
def _flat_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        _RouterBlock(_PerTokenFrom(np.linspace(0.0, 50.0, 5000).flat)),
        _RouterBlock(_PerTokenFrom(np.arange(4000.0).reshape(40, 100)[:, ::2].flat)),
    )


@pytest.mark.reliability("the model is left as it was")
def test_a_router_drawing_per_token_from_a_numpy_flatiter_is_in_step_and_its_own() -> None:
    """Routers that draw one jitter item per token from ``ndarray.flat`` (one over a strided view): the captured
    forwards see the plain model's draws, a replay runs, and after detach() each router holds its
    own iterator, advanced by exactly what the forwards drew. Once refused as a router whose output differs between
    two runs: a flatiter's public attributes kept any stand-in out, so the runs that establish the decision drew on
    from it, and the refusal left it past the items they drew."""
    model, plain = _flat_model(0), _flat_model(0)
    held = [vars(b.router)["noise"] for b in model]
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in xs]
        routes = session.routes()
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
        assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own"
        assert [it.index for it in held] == [b.router.noise.index for b in plain], "drawn past the forwards"
        with session.replay(routes):
            again = [model(x) for x in xs]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    assert len(again) == len(want)
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own after detach"
    assert [it.index for it in held] == [b.router.noise.index for b in plain]
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]
