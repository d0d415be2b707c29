"""Adversarial review of round 47's checks (round 48): which KV cache each forward went on from (its lineage), each
router's calls in each forward, and the places read from a 4-d mask. A replay forces the captured experts on the
tokens they were recorded for, or it is refused; plain use is not refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import moe_replay as mr

tiny_hf = pytest.importorskip("tests.tiny_hf")

_STEP = torch.tensor([[7]])


def _prompts(n: int, width: int = 4) -> list[torch.Tensor]:
    return [torch.randint(3, 128, (1, width), generator=torch.Generator().manual_seed(s)) for s in range(1, n + 1)]


# --- cache lineage ---------------------------------------------------------------------------------------------------


def _pool(model: Any, assign: list[int], reset: bool = True) -> list[torch.Tensor]:
    """A pool of two static caches serving three prompts (a prompt and one decode step each): prompt ``i`` takes
    cache ``assign[i]``, reset before it (``reset``), as a server reuses the caches it allocated once."""
    name = tiny_hf.cache_kwarg(model)
    caches = [tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    out = []
    for prompt, i in zip(_prompts(3), assign, strict=True):
        if reset:
            caches[i].reset()
        out.append(model(prompt, use_cache=True, **{name: caches[i]}).logits)
        out.append(model(_STEP, use_cache=True, **{name: caches[i]}).logits)
    return out


@pytest.mark.reliability("false refusals")
def test_a_pool_of_reset_caches_handed_to_other_prompts_than_captured_is_forced_not_refused() -> None:
    """Once refused though exact: a prompt's forward given a cache the pool reset (it begins its sequence, at place 0)
    was recorded as going on from the forward that last had that cache object, so a replay that handed the prompt
    the other free cache of the pool was refused as another sequence's context. A forward that begins a sequence
    continues none: the replay is forced exactly (a capture inside it records the very routes); given the other
    cache without a reset (holding another prompt), it is refused."""
    model = tiny_hf.build("qwen3_moe")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = _pool(model, [0, 1, 0])
        routes = session.routes()
        with session.replay(routes), session.capture(), torch.no_grad():
            got = _pool(model, [0, 1, 1])
        assert session.routes().equal(routes)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError, match="forward 5 of this replay"):  # (the third prompt's)
            with session.replay(routes), torch.no_grad():
                _pool(model, [0, 1, 1], reset=False)


def _interleaved_forwards(model: Any, swap: bool) -> list[Callable[[], torch.Tensor]]:
    """Two prompts' forwards, each on a cache of its own, then one decode step of each (given the other's: ``swap``)."""
    name = tiny_hf.cache_kwarg(model)
    caches = [tiny_hf.transformers.DynamicCache(config=model.config) for _ in range(2)]
    out: list[Callable[[], torch.Tensor]] = []
    for prompt, cache in zip(_prompts(2), caches, strict=True):
        out.append(lambda p=prompt, c=cache: model(p, use_cache=True, **{name: c}).logits)
    for cache in reversed(caches) if swap else caches:
        out.append(lambda c=cache: model(_STEP, use_cache=True, **{name: c}).logits)
    return out


@pytest.mark.reliability("false refusals")
@pytest.mark.xfail(
    strict=True,
    reason="a replay block compares a cache only with the forwards of the block just before it: a decode step given "
    "its own cache, built two blocks before (interleaved loops replayed one forward per block), is refused",
)
def test_interleaved_decode_loops_replayed_one_forward_per_block_are_forced_not_refused() -> None:
    """Two decode loops interleaved, replayed one captured forward per replay block (routes[a:b] for each): each
    step given its own cache is forced; given the other loop's, refused (that half holds today)."""
    model = tiny_hf.build("qwen3_moe")
    cuts = [0, 4, 8, 9, 10]  # (two prompts of 4 tokens, then a step each)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [f() for f in _interleaved_forwards(model, swap=False)]
        routes = session.routes()
        with pytest.raises(mr.TokenMismatchError):
            for i, forward in enumerate(_interleaved_forwards(model, swap=True)):
                with session.replay(routes[cuts[i] : cuts[i + 1]]), torch.no_grad():
                    forward()
        got = []
        for i, forward in enumerate(_interleaved_forwards(model, swap=False)):
            with session.replay(routes[cuts[i] : cuts[i + 1]]), torch.no_grad():
                got.append(forward())
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
