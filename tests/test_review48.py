"""Adversarial review of round 47's checks (round 48): which KV cache each forward went on from (its lineage), each
router's calls in each forward, and the places read from a 4-d mask. A replay forces the captured experts on the
tokens they were recorded for, or it is refused; plain use is not refused."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay import _feeds
from tests.test_calls46 import _reports_a_device

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


@pytest.mark.reliability("silent replays")
def test_a_forward_continues_its_cache_where_one_of_its_sequences_does() -> None:
    """The lineage of a forward is recorded where it went on from tokens its cache held: a decode step, a prompt's
    second chunk, and a batch of which one sequence goes on while another (left-padded) begins (that one sequence
    is enough: its rows would see another context); not a prompt's forward whose every sequence begins at place 0."""
    ids = torch.zeros(2, 3, dtype=torch.long)
    forward = _feeds._Forward(6, ids, None)
    for places, continues in [
        ([[4, 5, 6], [-1, 0, 1]], True),  # (one sequence goes on, the other begins)
        ([[0, 1, 2], [-1, 0, 1]], False),  # (a prompt's forward on an emptied cache)
        ([[3, 4, 5], [2, 3, 4]], True),  # (a second chunk)
        ([[-1, -1, -1], [-1, 0, 1]], False),
    ]:
        assert _feeds._continues(forward, torch.tensor(places).reshape(-1)) is continues
    step = _feeds._Forward(2, torch.zeros(2, 1, dtype=torch.long), None)
    assert _feeds._continues(step, torch.tensor([5, 3]))
    assert not _feeds._continues(_feeds._Forward(3, None, None), torch.tensor([0, 1, 2]))  # (fed embeddings)
    assert _feeds._continues(_feeds._Forward(3, None, None), torch.tensor([3, 4, 5]))


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
def test_interleaved_decode_loops_replayed_one_forward_per_block_are_forced_not_refused() -> None:
    """Two decode loops interleaved, replayed one captured forward per replay block (routes[a:b] for each). Once
    refused though exact: a block compared a cache only with what the block just before it built, so a step given
    its own cache, built two blocks before, was taken for a cache of another context. The caches earlier blocks in a
    row of the same capture built are kept: each step given its own cache is forced; given the other loop's, refused."""
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


# --- each router's calls in each forward ----------------------------------------------------------------------------

E, D, K, T = 8, 16, 2, 6


class _Gate(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(seed)))
        self.top_k, self.num_experts = K, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, idx = torch.topk(F.linear(x, self.weight).softmax(-1), self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), idx


class _Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.gate = _Gate(seed)
        self.w = nn.Parameter(torch.randn(E, D, D, generator=torch.Generator().manual_seed(seed + 50)) / D**0.5)

    def forward(self, x: torch.Tensor, used: list[torch.Tensor]) -> torch.Tensor:
        weights, idx = self.gate(x)
        used.append(idx.detach().clone())  # (the experts this call dispatched to, as the block read them)
        every = torch.einsum("td,edf->tef", x, self.w)
        return x + (weights[..., None] * every.gather(1, idx[..., None].expand(-1, -1, D))).sum(1)


class _LayerDrop(nn.Module):
    """Three MoE layers fed token ids and a shift of their embeddings (a noise level, a prompt's style vector: two
    forwards of the same ids see other hidden states); ``skip`` names the layers a forward drops (LayerDrop, an early
    exit, a flag), ``loops`` how often the middle layer runs (a recurrent depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.layers = nn.ModuleList(_Block(10 + i) for i in range(3))
        self.skip: set[int] = set()
        self.loops = 1
        self.used: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        h = self.embed(input_ids) + shift
        self.used = []
        for j, layer in enumerate(self.layers):
            if j not in self.skip:
                for _ in range(self.loops if j == 1 else 1):
                    h = layer(h, self.used)
        return h


_X = torch.arange(T) % 50
_SHIFTS = (0.0, 3.0)


def _run(model: _LayerDrop, plan: list[tuple[set[int], int]]) -> list[list[torch.Tensor]]:
    """One forward of the same ids per shift, each with its layers skipped and middle layer looped as ``plan`` says;
    the experts each call dispatched to."""
    used = []
    for shift, (skip, loops) in zip(_SHIFTS, plan, strict=True):
        model.skip, model.loops = skip, loops
        model(_X, shift=shift)
        used.append(model.used)
    return used


def _carried(routes: mr.Routes, how: str, tmp_path: Path) -> mr.Routes:
    if how == "saved":
        routes.save(tmp_path / "r.npz")
        return mr.Routes.load(tmp_path / "r.npz")
    if how == "pickled":
        return pickle.loads(pickle.dumps(routes))
    if how == "cat":
        return mr.Routes.cat([routes])
    if how == "select":
        return routes.select(list(routes.names))
    if how == "without ids":  # (an engine's arrays: rows only)
        return routes.with_token_ids(None)
    return routes


_PLANS = {  # (captured, replayed): the second forward's layer 1 dropped, then the first's; layer 0 likewise
    "layer 1 dropped": ([(set(), 1), ({1}, 1)], [({1}, 1), (set(), 1)]),
    "layer 0 dropped": ([({0}, 1), (set(), 1)], [(set(), 1), ({0}, 1)]),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("plan", list(_PLANS))
@pytest.mark.parametrize("how", ["captured", "saved", "pickled", "cat", "select", "without ids"])
@pytest.mark.parametrize("where", ["cpu", "device, strict=False"])
def test_a_layer_dropped_in_another_forward_than_captured_is_refused(
    plan: str, how: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once silent: two forwards of the same ids (other hidden states), the first calling every router and the second
    dropping a layer; replayed with the first dropping it and the second not, every router's calls fit some captured
    forward (the dropped router's one call is its first forward's), so the second forward's call of the dropped
    router was forced with the rows of the first forward's tokens (routes without ids took no check of each router's
    calls at all). Each forward's routers must begin in the same captured forward: refused, with or without ids.
    Replayed as captured, each call is forced with its own rows."""
    captured, replayed = _PLANS[plan]
    model = _LayerDrop()
    strict = where == "cpu"
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = _run(model, captured)
        routes = _carried(session.routes(), how, tmp_path)
        assert routes._router_calls is not None
        if not strict:
            _reports_a_device(monkeypatch, model)
        with session.replay(routes, strict=strict):
            got = _run(model, captured)
        assert all(
            len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
            for g, w in zip(got, want, strict=True)
        )
        forced: list[list[torch.Tensor]] = []
        with pytest.raises(mr.TokenMismatchError, match=r"in forward 1 of the capture, while router"):
            with session.replay(routes, strict=strict):
                forced = _run(model, replayed)
        if strict and how != "without ids":  # (else the reads are counted as the forward ends: refused at the end)
            assert not forced


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("where", ["cpu", "device, strict=False"])
def test_a_recurrent_depth_replayed_as_captured_is_forced_and_moved_is_refused(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middle layer run twice in the first forward and once in the second: replayed as captured, every call is
    forced with its own rows; with the loop counts swapped, refused."""
    model = _LayerDrop()
    strict = where == "cpu"
    plan = [(set(), 2), (set(), 1)]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = _run(model, plan)
        routes = session.routes()
        if not strict:
            _reports_a_device(monkeypatch, model)
        with session.replay(routes, strict=strict):
            got = _run(model, plan)
        assert all(all(torch.equal(a, b) for a, b in zip(g, w, strict=True)) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes, strict=strict):
                _run(model, [(set(), 1), (set(), 2)])


# --- places from a 4-d mask -----------------------------------------------------------------------------------------


def _causal(dtype: torch.dtype, keys: int, own: torch.Tensor, low: float | None = None) -> torch.Tensor:
    """A ``[1, 1, queries, keys]`` mask where query ``i`` attends keys up to ``own[i]``: boolean, or additive with
    ``low`` (the dtype's lowest where None) where it does not."""
    attend = torch.arange(keys)[None, :] <= own[:, None]
    if dtype == torch.bool:
        return attend[None, None]
    fill = torch.finfo(dtype).min if low is None else low
    return torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, fill)[None, None]


_FILLS = [(torch.bool, None)] + [
    (dtype, low) for dtype in (torch.float32, torch.float16, torch.bfloat16) for low in (None, float("-inf"), -1e4)
]


@pytest.mark.parametrize(("dtype", "low"), _FILLS)
def test_places_of_a_causal_4d_mask_are_read_in_every_dtype_and_fill(dtype: torch.dtype, low: float | None) -> None:
    """A causal mask over a static cache's slots gives each query's place, whatever its dtype and the value that
    leaves a key out; a sliding window's band, a block-diagonal (packed) mask's second block, a mask whose fill
    leaves a key some weight, and one of [batch, 1, 1, keys] over several queries give none (-1 or None)."""
    own = torch.arange(3) + 4  # (three tokens after four cached)
    mask = _causal(dtype, 16, own, low)
    assert _feeds._places_of_4d(mask, 2, own[None]).tolist() == [own.tolist()] * 2
    band = mask.clone()
    band[..., :2] = False if dtype == torch.bool else torch.finfo(dtype).min  # (a window that dropped two keys)
    assert bool((_feeds._places_of_4d(band, 1, own[None]) == -1).all())
    packed = _causal(dtype, 16, torch.arange(6))  # (two sequences of three packed, positions restarting)
    packed[..., 3:, :3] = False if dtype == torch.bool else torch.finfo(dtype).min
    got = _feeds._places_of_4d(packed, 1, torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert got.tolist()[0][:3] == [0, 1, 2] and bool((got[0, 3:] == -1).all())
    assert _feeds._places_of_4d(mask[:, :, :1].expand(2, 1, 1, 16), 2, own[None]) is None
    if dtype != torch.bool:
        weak = _causal(dtype, 16, own, -5.0)  # (a fill that leaves the keys some weight: neither attended nor not)
        assert bool((_feeds._places_of_4d(weak, 1, own[None]) == -1).all())
