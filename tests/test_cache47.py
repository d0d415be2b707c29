"""Which KV cache each forward went on from (its lineage): a replay that gives a decode step another sequence's cache,
one the block built and holding as many tokens, is refused; decode loops that pass their own caches on are forced."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_replay as mr

tiny_hf = pytest.importorskip("tests.tiny_hf")

_STEP = torch.tensor([[7]])


def _prompts(n: int, width: int = 4) -> list[torch.Tensor]:
    return [torch.randint(3, 128, (1, width), generator=torch.Generator().manual_seed(s)) for s in range(1, n + 1)]


def _made(model: Any, kind: str) -> Any:
    if kind == "DynamicCache":
        return tiny_hf.transformers.DynamicCache(config=model.config)
    return tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=16)


def _interleaved(model: Any, kind: str, steps: int, swap_at: int | None) -> list[torch.Tensor]:
    """Prompts A and B prefilled into a cache each, then ``steps`` decode steps of each in turn; from step ``swap_at``
    on, each loop is given the other's cache (None: never)."""
    name = tiny_hf.cache_kwarg(model)
    caches = [_made(model, kind), _made(model, kind)]
    for prompt, cache in zip(_prompts(2), caches, strict=True):
        model(prompt, use_cache=True, **{name: cache})
    out = []
    for step in range(steps):
        if step == swap_at:
            caches.reverse()
        for cache in caches:
            out.append(model(_STEP + step, use_cache=True, **{name: cache}).logits)
    return out


def _carried(routes: mr.Routes, how: str, tmp_path: Path) -> mr.Routes:
    """``routes`` as a file, a pickle, the wire or a copy gives them back."""
    if how == "file":
        routes.save(tmp_path / "r.npz")
        return mr.Routes.load(tmp_path / "r.npz")
    if how == "pickle":
        return pickle.loads(pickle.dumps(routes))
    if how == "wire":
        from moe_replay.distributed import _known, _restore

        bare = mr.Routes._trusted(routes._data, routes.names, routes.experts_per_layer)
        return _restore(bare, _known(routes), routes._dropped_rows)
    return routes.select(list(routes.names))  # (the same rows of the same routers)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["DynamicCache", "StaticCache"])
@pytest.mark.parametrize("how", ["routes", "file", "pickle", "wire", "select"])
def test_a_decode_step_given_the_other_loops_cache_is_refused_wherever_the_routes_went(
    kind: str, how: str, tmp_path: Path
) -> None:
    """Two decode loops interleaved, each on its own cache: replayed in the same interleaving they are forced exactly;
    with the caches swapped after the first step (each cache as long as the other) the first step given the other
    loop's cache is refused, naming the forward, through a file, a pickle, the wire and a router selection too."""
    model = tiny_hf.build("qwen3_moe")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = _interleaved(model, kind, steps=2, swap_at=None)
        routes = _carried(session.routes(), how, tmp_path)
        assert routes._lineage is not None
        with session.capture(), torch.no_grad():
            swapped = _interleaved(model, kind, steps=2, swap_at=1)
        assert not torch.allclose(swapped[2], want[2])  # (the premise: the step sees the other prompt)
        with session.replay(routes), session.capture(), torch.no_grad():
            got = _interleaved(model, kind, steps=2, swap_at=None)
        assert session.routes().equal(routes)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
        # forwards: prefill A, prefill B, A's step 0, B's step 0, then A's step 1 (forward 5) given B's cache
        with pytest.raises(mr.TokenMismatchError, match=r"forward 5 of this replay\(\) is given a KV cache"):
            with session.replay(routes), torch.no_grad():
                _interleaved(model, kind, steps=2, swap_at=1)


def _loop(model: Any, prompt: torch.Tensor, steps: int, copied: bool = False, **kwargs: Any) -> torch.Tensor:
    """A decode loop of one's own on a batch: its prompt's forward, then ``steps`` steps on the cache it returns (or,
    ``copied``, on a deep copy of it, as a loop that keeps the prompt's cache for later does)."""
    out = model(prompt, use_cache=True, **kwargs)
    cache = copy.deepcopy(out.past_key_values) if copied else out.past_key_values
    logits = [out.logits[:, -1]]
    mask = kwargs.get("attention_mask")
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            kwargs["attention_mask"] = mask
        out = model(token, past_key_values=cache, use_cache=True, **kwargs)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def _generate(model: Any, **kwargs: Any) -> Callable[[], Any]:
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, **kwargs)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize(
    "use",
    ["generate", "generate static", "beam search", "decode loop", "batched decode loop", "deep copy", "two blocks"],
)
def test_plain_decode_loops_on_their_own_caches_are_forced_not_refused(use: str) -> None:
    """Plain use on a cache of its own is never refused by the lineage check: ``generate()`` (dynamic and static
    cache; beam search is refused by its cache's row moves, as before), a decode loop of one's own (one sequence, a
    left-padded batch), one that goes on from a deep copy of its prompt's cache, and one replayed over two blocks
    (routes[:n], then routes[n:]). Each is forced exactly: a capture inside the replay records the very routes."""
    model = tiny_hf.build("qwen3_moe")
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    run: Callable[[], Any]
    if use == "generate":
        run = _generate(model)
    elif use == "generate static":
        run = _generate(model, cache_implementation="static")
    elif use == "beam search":
        run = _generate(model, num_beams=2)
    elif use == "batched decode loop":
        run = lambda: _loop(model, prompt, 3, attention_mask=mask.clone())  # noqa: E731
    elif use == "deep copy":
        run = lambda: _loop(model, prompt[1:], 3, copied=True)  # noqa: E731
    else:
        run = lambda: _loop(model, prompt[1:], 3)  # noqa: E731
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = run()
        routes = session.routes()
        if use not in ("beam search", "generate static"):  # (each decode step went on from the one before's cache)
            assert routes._lineage is not None
        if use == "two blocks":
            cut = 5  # (the prompt's forward, then the decode steps)
            with session.replay(routes[:cut]), torch.no_grad():
                out = model(prompt[1:], use_cache=True)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            with session.replay(routes[cut:]), torch.no_grad():
                for _ in range(3):
                    out = model(logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    logits.append(out.logits[:, -1])
            assert torch.allclose(torch.stack(logits), want, atol=1e-5)
            return
        if use == "beam search":  # (refused by the cache's row moves, not by the lineage)
            with pytest.raises(mr.RoutesValidationError, match=r"reorder_cache"):
                with session.replay(routes), torch.no_grad():
                    run()
            return
        with session.replay(routes), session.capture(), torch.no_grad():
            got = run()
        assert session.routes().equal(routes)
        if isinstance(want, torch.Tensor) and want.is_floating_point():
            assert torch.allclose(got, want, atol=1e-5)
        else:
            assert torch.equal(got, want)


@pytest.mark.reliability("false refusals")
def test_per_sequence_routes_of_a_generate_capture_replay_in_a_teacher_forced_forward() -> None:
    """split_generation's per-sequence routes (rows of no decode loop of their own) and a slice of a batch's rows
    (a micro-batch) carry no lineage that would refuse a forward with no cache."""
    model = tiny_hf.build("qwen3_moe")
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            seq = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        seqs = mr.split_generation(session.routes(), attention_mask=mask, sequences=seq)
        for i, part in enumerate(seqs):
            ids = seq[i][mask[i].bool().tolist() + [True] * (seq.shape[1] - mask.shape[1])][None, : part.num_tokens]
            with session.replay(part), session.capture(), torch.no_grad():
                model(ids)
            known = part.indices[:, 0, 0] >= 0  # (its last token's row: routed natively)
            assert torch.equal(session.routes().indices[known], part.indices[known])
        batch = torch.randint(3, 128, (4, 3), generator=torch.Generator().manual_seed(4))
        with session.capture(), torch.no_grad():
            model(batch)
        whole = session.routes()
        for half in (0, 1):
            with session.replay(whole[6 * half : 6 * half + 6]), torch.no_grad():
                model(batch[2 * half : 2 * half + 2])


@pytest.mark.reliability("silent replays")
def test_a_swapped_cache_in_the_second_of_two_replay_blocks_is_refused() -> None:
    """Two interleaved loops captured in one block, replayed over two: their prompts' forwards in the first, and the
    first loop's decode step, given the second loop's cache (the last one the first block built), in the second.
    Once silent: routes[n:] cut the lineage of their first step, and a cache the block before built ending where the
    block begins passed for the one it continues; the whole capture's lineage compares it now. Given its own cache
    (built by the block before, though not by its last forward), the step is forced: once refused as a cache no
    forward of the replay built."""
    model = tiny_hf.build("qwen3_moe")
    name = tiny_hf.cache_kwarg(model)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            _interleaved(model, "DynamicCache", steps=1, swap_at=None)
        routes = session.routes()
        cut = 8  # (the two prompts' forwards, 4 rows each)
        caches = [_made(model, "DynamicCache"), _made(model, "DynamicCache")]
        with session.replay(routes[:cut]), torch.no_grad():
            for prompt, cache in zip(_prompts(2), caches, strict=True):
                model(prompt, use_cache=True, **{name: cache})
        with pytest.raises(mr.TokenMismatchError, match="the replay block before this one"):
            with session.replay(routes[cut : cut + 1]), torch.no_grad():
                model(_STEP, use_cache=True, **{name: caches[1]})
        caches = [_made(model, "DynamicCache"), _made(model, "DynamicCache")]
        with session.replay(routes[:cut]), torch.no_grad():
            for prompt, cache in zip(_prompts(2), caches, strict=True):
                model(prompt, use_cache=True, **{name: cache})
        with session.replay(routes[cut : cut + 1]), session.capture(), torch.no_grad():
            model(_STEP, use_cache=True, **{name: caches[0]})
        assert session.routes().equal(routes[cut : cut + 1])


@pytest.mark.reliability("silent replays")
def test_a_decode_step_given_a_copy_of_the_other_loops_cache_is_refused() -> None:
    """Two prompts prefilled into a cache each; each loop's step goes on from a deep copy of its own cache (a loop
    that keeps its prompt's cache for later): replayed with each step given a copy of the other's, it is refused (once
    silent: a copy had no lineage); each copy continues the forward that last had the cache it copies."""
    model = tiny_hf.build("qwen3_moe")
    name = tiny_hf.cache_kwarg(model)

    def loop(swapped: bool) -> list[torch.Tensor]:
        caches = [_made(model, "DynamicCache"), _made(model, "DynamicCache")]
        for prompt, cache in zip(_prompts(2), caches, strict=True):
            model(prompt, use_cache=True, **{name: cache})
        copies = [copy.deepcopy(c) for c in (reversed(caches) if swapped else caches)]
        return [model(_STEP, use_cache=True, **{name: c}).logits for c in copies]

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = loop(False)
        routes = session.routes()
        with session.replay(routes), torch.no_grad():  # (the loop as captured: forced)
            same = loop(False)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(same, want, strict=True))
        with session.capture(), torch.no_grad():
            assert not torch.allclose(loop(True)[0], want[0])  # (the premise: the step sees the other prompt)
        with pytest.raises(mr.TokenMismatchError, match="went on from the cache of the forward"):
            with session.replay(routes), torch.no_grad():
                loop(True)


@pytest.mark.reliability("silent replays")
def test_a_decode_step_given_the_other_loops_plain_tensor_cache_is_refused() -> None:
    """The reference model's cache of plain tensors: two prompts prefilled, one step each on its own cache, replayed
    with the caches swapped, is refused: a cache of plain tensors is told by its first tensor (each forward returns
    new ones), held weakly."""
    model = mr.models.build("softmax_topk")
    prompts = [torch.randint(3, 128, (1, 3), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    def loop(swapped: bool) -> list[torch.Tensor]:
        caches = [model(p, use_cache=True).past_key_values for p in prompts]
        if swapped:
            caches.reverse()
        return [model(_STEP, past_key_values=c, use_cache=True).logits for c in caches]

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = loop(False)
        routes = session.routes()
        with session.capture(), torch.no_grad():
            assert not torch.allclose(loop(True)[0], want[0])  # (the premise: the step sees the other prompt)
        with session.replay(routes), torch.no_grad():  # (the loop as captured: forced)
            same = loop(False)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(same, want, strict=True))
        with pytest.raises(mr.TokenMismatchError, match="went on from the cache of the forward"):
            with session.replay(routes), torch.no_grad():
                loop(True)


@pytest.mark.reliability("silent replays")
def test_a_decode_step_given_the_other_loops_cache_that_the_model_made_is_refused() -> None:
    """Each prompt's forward given no cache makes one (a DynamicCache the model returns): a step given the other
    loop's is refused, and each loop's steps on its own are forced."""
    model = tiny_hf.build("qwen3_moe")
    prompts = _prompts(2)

    def loop(swapped: bool) -> list[torch.Tensor]:
        caches = [model(p, use_cache=True).past_key_values for p in prompts]
        if swapped:
            caches.reverse()
        return [model(_STEP, past_key_values=c, use_cache=True).logits for c in caches]

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = loop(False)
        routes = session.routes()
        with session.replay(routes), torch.no_grad():
            same = loop(False)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(same, want, strict=True))
        with pytest.raises(mr.TokenMismatchError, match=r"forward 3 of this replay\(\) is given a KV cache"):
            with session.replay(routes), torch.no_grad():
                loop(True)
