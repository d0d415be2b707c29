"""What a capture records of the forwards it runs: token ids, prompt masks, moves of the KV cache's rows."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch

import moe_replay as mr

B, P, N = 3, 5, 4


def _prompt() -> torch.Tensor:
    return torch.randint(3, 128, (B, P), generator=torch.Generator().manual_seed(1))


def test_a_cache_dropped_during_a_capture_goes_at_once() -> None:
    """Each generate() call of a capture makes a KV cache and drops it when done; watching its row moves must not
    keep it (and its tensors) alive until the capture ends, nor leave it to the garbage collector."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("qwen3_moe")
    caches = []
    with mr.attach(model) as session:
        enabled = gc.isenabled()
        gc.disable()  # freed by reference counting, as without a capture: no cycle through the watched methods
        try:
            with session.capture(), torch.no_grad():
                for _ in range(3):
                    out = model.generate(_prompt(), max_new_tokens=N, pad_token_id=0, return_dict_in_generate=True)
                    caches.append(weakref.ref(out.past_key_values))
                    assert "reorder_cache" in vars(out.past_key_values)  # the premise: it is watched
                    del out
                    assert caches[-1]() is None
        finally:
            if enabled:
                gc.enable()
        assert len(session.routes()._call_rows) == 6  # three prompt forwards and their decode steps


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_watched_cache_moves_its_own_rows(how: str) -> None:
    """A cache copied while a capture watches it: the copy's row moves act on the copy (and are seen once
    a later forward is given it), the original's methods are put back at the end."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    transformers = pytest.importorskip("transformers")
    model = tiny_hf.build("mixtral")
    with mr.attach(model) as session:
        cache = transformers.DynamicCache(config=model.config)
        with session.capture(), torch.no_grad():
            model(_prompt(), use_cache=True, **{tiny_hf.cache_kwarg(model): cache})
            copied = copy.deepcopy(cache) if how == "deepcopy" else pickle.loads(pickle.dumps(cache))
            keys = cache.layers[0].keys.clone()
            copied.reorder_cache(torch.tensor([2, 0, 1]))
            assert torch.equal(cache.layers[0].keys, keys)  # the original did not move
            assert torch.equal(copied.layers[0].keys, keys[[2, 0, 1]])
            assert session._feeds.moved is None  # not the rows of a cache the capture's forwards were given
            model(_prompt()[:, :1], use_cache=True, **{tiny_hf.cache_kwarg(model): copied})
            copied.reorder_cache(torch.tensor([1, 2, 0]))
        assert "reorder_cache" not in vars(cache)
        assert session.routes()._rows_moved == "DynamicCache.reorder_cache"


def test_a_keep_newest_capture_keeps_no_inputs_but_sees_row_moves() -> None:
    """A keep_newest session keeps a bounded ring for a capture of any length; the inputs of its forwards, which
    no split can line up with its rows, must not pile up beside it. Its cache's row moves are still seen."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("qwen3_moe")
    with mr.attach(model, keep_newest=True, capacity=4 * B * P) as session:
        with session.capture(), torch.no_grad():
            for _ in range(20):
                model(_prompt())
            assert session._feeds.forwards == []
            model.generate(_prompt(), max_new_tokens=N, num_beams=2, pad_token_id=0)
        routes = session.routes()
    assert routes._fed_ids is None and routes._rows_moved == "DynamicCache.reorder_cache"


def test_a_forward_in_another_thread_leaves_the_capture_checked() -> None:
    """A forward of the model in another thread while a capture runs is refused by the routers; it must not count
    as one of the capture's forwards either, or the recorded inputs no longer line up with the rows and the checks
    of what each row was fed are silently dropped."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    prompt = _prompt()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            model(prompt[:1, :2])
        except mr.MoEReplayError as e:
            errors.append(e)

    with mr.attach(model) as session:
        with session.capture():
            seq = model.generate(prompt, N)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        capture = session.routes()
    assert len(errors) == 1  # the premise: the other thread's forward was refused
    assert len(mr.split_generation(capture, batch_size=B, prompt_len=P, sequences=seq)) == B
    with pytest.raises(mr.RoutesValidationError, match="do not hold the prompts"):
        mr.split_generation(capture, batch_size=B, prompt_len=P, sequences=seq[[1, 0, 2]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_detached_session_keeps_what_its_forwards_were_fed_on_the_host() -> None:
    """detach() copies the rows to the host; the ids and prompt masks the capture kept go with them (a detached
    session holds no device memory), and split_generation still checks them."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1).cuda()
    prompt = _prompt().cuda()
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    with mr.attach(model) as session:
        with session.capture():
            seq = model.generate(prompt, N, attention_mask=mask)
    kept = [t for f in session._feeds.forwards for t in (f.ids, f.mask) if t is not None]
    assert len(kept) == N + 1 and all(t.device.type == "cpu" for t in kept)
    capture = session.routes()
    assert len(mr.split_generation(capture, attention_mask=mask, sequences=seq)) == B
    with pytest.raises(mr.RoutesValidationError, match="not the attention mask"):
        mr.split_generation(capture, prompt_len=P, sequences=seq)
    with pytest.raises(mr.RoutesValidationError, match="do not hold the prompts"):
        mr.split_generation(capture, attention_mask=mask, sequences=seq[[1, 0, 2]])


class _Cache(list):
    """The reference model's KV cache (a list of layers), updated in place, that can reorder its rows."""

    def reorder_cache(self, order: torch.Tensor) -> None:
        self[:] = [(k[order], v[order]) for k, v in self]


@pytest.mark.parametrize("positional", [False, True])
def test_a_cache_given_at_any_place_is_watched(positional: bool) -> None:
    """A decode loop of one's own that reorders its cache's rows between steps: seen whether the loop gives the
    model its cache by name or by position."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    prompt = _prompt()
    cache, step = _Cache(), prompt
    with mr.attach(model) as session:
        with session.capture():
            for _ in range(N - 1):
                if positional:
                    out = model(step, None, cache, True)
                else:
                    out = model(step, past_key_values=cache, use_cache=True)
                cache[:] = out.past_key_values
                cache.reorder_cache(torch.tensor([2, 0, 1]))
                step = out.logits[:, -1:].argmax(-1)
        with pytest.raises(mr.RoutesValidationError, match=r"_Cache\.reorder_cache"):
            mr.split_generation(session.routes(), batch_size=B, prompt_len=P)
    assert "reorder_cache" not in vars(cache)
