"""What a capture records of the forwards it runs: token ids, prompt masks, moves of the KV cache's rows."""

from __future__ import annotations

import copy
import functools
import gc
import pickle
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay.routes import UNTOLD_RANK

from .conftest import tried

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
    assert routes.token_ids is None and routes._rows_moved == "DynamicCache.reorder_cache"


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


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("positional", [False, True])
def test_a_prompt_mask_given_at_its_place_is_recorded(positional: bool) -> None:
    """Once silent: a decode loop of one's own that gave the model its attention mask by position recorded no
    prompt mask, so prompt lengths padded on the wrong side split without an error, giving padding's rows to
    real tokens. The mask is read at the place the model's forward takes it, as by name."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    prompt = _prompt()
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    prompt = prompt.masked_fill(mask == 0, 0)
    seq, step, cache, m = prompt, prompt, None, mask
    with mr.attach(model) as session:
        with session.capture():
            for _ in range(N):  # N new tokens, the last never fed
                if positional:
                    out = model(step, m, cache, True)
                else:
                    out = model(step, attention_mask=m, past_key_values=cache, use_cache=True)
                cache, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
                seq, m = torch.cat([seq, step], dim=1), torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], dim=1)
        capture = session.routes()
    with pytest.raises(mr.RoutesValidationError, match=r"padded on the left: pass padding_side='left'"):
        mr.split_generation(capture, prompt_lengths=mask.sum(1), prompt_len=P, padding_side="right", sequences=seq)
    parts = mr.split_generation(capture, prompt_lengths=mask.sum(1), prompt_len=P, sequences=seq)
    assert [p.num_tokens for p in parts] == (mask.sum(dim=1) + N).tolist()


# ----------------------------------------------------------------------------- replays checked against their tokens
def _batch(seed: int = 0, rows: int = 4, width: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (rows, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "mistake",
    ["rows shuffled", "another batch", "micro-batches swapped", "one token changed"],
)
def test_a_replay_fed_other_tokens_than_its_routes_is_refused_before_any_router_reads(mistake: str) -> None:
    """Routes of a capture know the tokens their rows were recorded for: a forward fed others (a shuffled or
    regrouped batch, another micro-batch, another rank's rows of the same size) is refused, not replayed."""
    from tests.conftest import assert_untouched, snapshot

    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    ids = _batch()
    wrong = {
        "rows shuffled": [ids[[2, 0, 3, 1]]],
        "another batch": [_batch(seed=7)],
        "micro-batches swapped": [ids[2:], ids[:2]],
        "one token changed": [torch.where(torch.arange(ids.numel()).view_as(ids) == 13, ids + 1, ids)],
    }[mistake]
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids[:2])
            model(ids[2:])
        routes = session.routes()
        with session.replay(routes, strict=False), torch.no_grad():
            with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for") as e:
                for part in wrong:
                    model(part)
            assert all(h.replay_source.host_consumed == 0 for h in session._hooks)  # refused before any read
        assert isinstance(e.value, mr.RoutesValidationError)
        # the right tokens, in one forward or in the forwards they were recorded in: replayed
        with session.replay(routes), torch.no_grad():
            model(ids)
        with session.capture(), session.replay(routes), torch.no_grad():
            model(ids[:2])
            model(ids[2:])
        assert session.routes().equal(routes)
        # tokens that differ on purpose: the check goes with the routes' ids
        with session.replay(routes.with_token_ids(None)), torch.no_grad():
            for part in wrong:
                model(part)
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_saved_routes_refuse_another_batch_after_loading(tmp_path: object) -> None:
    """The ids travel with the rows: routes saved, loaded elsewhere and sliced still refuse the wrong tokens."""
    model = mr.models.build("softmax_topk")
    ids = _batch()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        path = f"{tmp_path}/routes.npz"
        session.routes().save(path)
        routes = mr.Routes.load(path)
        assert torch.equal(routes.token_ids, ids.reshape(-1))
        second = routes[2 * ids.shape[1] :]  # the rows of sequences 2 and 3
        with session.replay(second), torch.no_grad():
            model(ids[2:])
        with pytest.raises(mr.TokenMismatchError, match=r"row 0 of the routes"):
            with session.replay(second), torch.no_grad():
                model(ids[:2])


@pytest.mark.reliability("silent replays")
def test_padding_is_no_token_of_the_routes() -> None:
    """A padded batch replayed with another pad id passes (padding was fed no token of a sequence); a real
    token changed under the same mask is refused."""
    model = mr.models.build("softmax_topk")
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the first sequence
    mask[3, 4:] = 0  # right padding of the last
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(torch.where(mask.bool(), ids, 0), attention_mask=mask)
        routes = session.routes()
        assert int((routes.token_ids < 0).sum()) == int((mask == 0).sum())
        with session.replay(routes), torch.no_grad():
            model(torch.where(mask.bool(), ids, 5), attention_mask=mask)
        changed = ids.clone()
        changed[0, 2] += 1  # the first real token of the padded sequence
        with pytest.raises(mr.TokenMismatchError, match=r"token 2 of the forward"):
            with session.replay(routes), torch.no_grad():
                model(torch.where(mask.bool(), changed, 0), attention_mask=mask)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("batch", ["padding filled with tokens", "no attention mask", "a longer padded sequence"])
def test_rows_recorded_at_padding_are_refused_for_tokens_of_a_sequence(batch: str) -> None:
    """Once silent: rows recorded at prompt padding (token id -1: no token to compare) were replayed on the real
    tokens of a batch padded otherwise (padding filled, the mask left out), which took the experts padding got."""
    from tests.conftest import assert_untouched, snapshot

    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[3, 3:] = 0  # right padding of the last sequence
    padded = torch.where(mask.bool(), ids, 0)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(padded, attention_mask=mask)
        routes = session.routes()
        with session.replay(routes), torch.no_grad():  # the capture's batch and mask: replayed
            model(padded, attention_mask=mask)
        feed = {
            "padding filled with tokens": ((ids,), {"attention_mask": torch.ones_like(mask)}),
            "no attention mask": ((padded,), {}),
            "a longer padded sequence": ((padded,), {"attention_mask": torch.where(mask.bool(), 1, mask.roll(1, 1))}),
        }
        args, kwargs = feed[batch]
        with pytest.raises(mr.TokenMismatchError, match=r"token 21 of the forward, id \d+, reads row 21, recorded at"):
            with session.replay(routes), torch.no_grad():
                model(*args, **kwargs)
        with session.replay(routes), torch.no_grad():  # (refused before any router read: the session goes on)
            model(padded, attention_mask=mask)
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_a_teacher_forced_replay_of_a_rollout_is_checked_against_its_sequences() -> None:
    """split_generation gives each sequence's routes its tokens: a training batch laid out with those sequences
    replays; the same routes with the sequences in another order are refused."""
    model = mr.models.build("softmax_topk")
    prompt = _prompt()
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            seqs = model.generate(prompt, max_new_tokens=N, attention_mask=mask)
        parts = mr.split_generation(session.routes(), attention_mask=mask, sequences=seqs)
        real = [s[torch.cat([m.bool(), torch.ones(N, dtype=torch.bool)])] for s, m in zip(seqs, mask, strict=True)]
        for part, tokens in zip(parts, real, strict=True):
            assert torch.equal(part.token_ids, tokens)  # the last token too: its row routes natively
        layout = mr.BatchLayout.padded([p.num_tokens for p in parts])
        with session.replay(layout.routes(parts)):
            model(layout.tokens(real), attention_mask=layout.attention_mask()).logits.sum().backward()
        swapped = [parts[2], parts[1], parts[0]]  # (sequences 0 and 2 are as long: only their tokens differ)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(layout.routes(swapped)):
                model(layout.tokens(real), attention_mask=layout.attention_mask())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_first_device_ids_are_checked_before_any_router_reads() -> None:
    """The first forward of a block fed ids on a GPU is compared at once (one host sync): a wrong batch is
    refused before any expert is forced, so an optimizer step after it never runs on the wrong routes."""
    model = mr.models.build("softmax_topk").cuda()
    ids = _batch().cuda()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        with session.replay(session.routes(), strict=True):
            with pytest.raises(mr.TokenMismatchError, match=r"forward 1 of this replay"):
                model(ids.flip(0))
            assert all(h.replay_source.host_consumed == 0 for h in session._hooks)
            model(ids)  # (the block's rows, read by the right batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overdraw", [False, True])
def test_ids_on_the_device_are_checked_when_the_block_ends(overdraw: bool) -> None:
    """Later ids on a GPU are compared once the block ends (no host sync per forward), naming the forward; a
    forward that then reads past the end gets that error too (the likelier cause), raised from the overdraw."""
    model = mr.models.build("softmax_topk").cuda()
    ids = _batch().cuda()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids[:2])
            model(ids[2:])
        routes = session.routes()
        with session.replay(routes), torch.no_grad():
            model(ids[:2])
            model(ids[2:])
        with pytest.raises(mr.TokenMismatchError, match=r"forward 2 of this replay") as e:
            with session.replay(routes), torch.no_grad():
                model(ids[:2])  # (the first forward's ids are compared at once: these are right)
                model(ids[[3, 2]])
                if overdraw:
                    model(ids[2:])  # past the end of the routes
        assert isinstance(e.value.__cause__, mr.ReplayConsumptionError) is overdraw


@pytest.mark.parametrize("mode", ["capture", "replay"])
def test_a_checkpoint_recompute_of_the_whole_model_is_no_forward_of_its_own(mode: str) -> None:
    """A model checkpointed as a whole runs its forward again in backward (the recompute reads its forward's rows,
    not the next ones): a capture keeps each micro-batch's ids once, and a replay of micro-batches each followed
    by its backward compares every forward with its own rows."""
    from torch.utils.checkpoint import checkpoint

    model = mr.models.build("softmax_topk").train()
    ids = _batch()

    def step(part: torch.Tensor) -> None:
        checkpoint(model, part, use_reentrant=False).logits.sum().backward()

    with mr.attach(model) as session:
        with session.capture():
            if mode == "capture":
                step(ids[:2])
                step(ids[2:])
            else:
                model(ids).logits.sum().backward()
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids.reshape(-1))
        with session.replay(routes), session.capture():
            step(ids[:2])
            step(ids[2:])
        assert session.routes().equal(routes)
        with pytest.raises(mr.TokenMismatchError, match=r"forward 2 of this replay"):
            with session.replay(routes):
                step(ids[:2])
                step(ids[[3, 2]])


# ----------------------------------------------------------------------------- forwards through another door
class _Wrapper(torch.nn.Module):
    """A wrapper of the kind PEFT puts around a model: its generate() runs the inner model's own."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: object) -> object:
        return self.inner(**kwargs)

    def generate(self, **kwargs: object) -> torch.Tensor:
        return self.inner.generate(**kwargs)


@pytest.mark.reliability("silent replays")
def test_a_wrapper_whose_generate_runs_the_inner_model_is_seen() -> None:
    """A session attached to a wrapper (PEFT's PeftModel) whose generate() calls the inner model's: the forwards never
    enter the wrapper, yet a beam search in them is seen and its split refused, and the ids are recorded."""
    from tests import tiny_hf

    wrapped = _Wrapper(tiny_hf.build("qwen3_moe"))
    prompt = _prompt()
    with mr.attach(wrapped) as session:
        with session.capture(), torch.no_grad():
            out = wrapped.generate(
                input_ids=prompt, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False
            )
        routes = session.routes()
        assert routes.token_ids is not None
        assert torch.equal(routes.token_ids[: B * 2 * P], prompt.repeat_interleave(2, dim=0).reshape(-1))
        with pytest.raises(mr.RoutesValidationError, match="reorder_cache"):
            mr.split_generation(routes, attention_mask=torch.ones(B * 2, P, dtype=torch.long), sequences=out)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("door", ["model.forward(...)", "the base model alone", "a wrapper calling .forward"])
def test_a_forward_that_does_not_enter_the_attached_model_is_still_checked(door: str) -> None:
    """Forwards that go around the attached module's __call__ (its forward called as a method, as wrappers do; the
    base model of a ...ForCausalLM called alone) are checked against the routes' tokens too: wrong ids are refused."""
    from tests import tiny_hf

    model = tiny_hf.build("qwen3_moe")
    ids = _batch()

    def run(x: torch.Tensor) -> None:
        if door == "model.forward(...)":
            model.forward(input_ids=x)
        elif door == "the base model alone":
            model.model(input_ids=x)
        else:
            type("Around", (), {"__call__": lambda self, **kw: model.forward(**kw)})()(input_ids=x)

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            run(ids)
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids.reshape(-1))
        with session.replay(routes), torch.no_grad():
            run(ids)
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes), torch.no_grad():
                run(ids[[1, 0, 3, 2]])


@pytest.mark.reliability("silent replays")
def test_a_submodule_called_alone_reads_no_rows_unchecked() -> None:
    """A block of the model called on its own in a replay of routes that know their tokens: no check can see the
    tokens of its rows, so its router refuses to read them (naming what to do) instead of forcing them."""
    from tests.conftest import assert_untouched, snapshot

    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    ids = _batch()
    hidden = torch.randn(ids.shape[0], ids.shape[1], model.config.hidden_size)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with pytest.raises(mr.TokenMismatchError, match=r"did not enter MoETransformer.*with_token_ids\(None\)"):
            with session.replay(routes, strict=False), torch.no_grad():
                model.layers[0].mlp(hidden)
        # after a forward of the model, its rows only: the block called alone then reads past them
        with pytest.raises(mr.TokenMismatchError, match=r"reads rows 24\.\.47"):
            with session.replay(mr.Routes.cat([routes, routes]), strict=False), torch.no_grad():
                model(ids)
                model.layers[0].mlp(hidden)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():  # by row order alone: replayed
            model.layers[0].mlp(hidden)
            model.layers[1].mlp(hidden)
    assert_untouched(model, before)


def test_the_forwards_between_the_model_and_its_routers_are_their_own_again_after_detach() -> None:
    """The modules a session watches (the model and its base model) get their forward back at detach; one that
    another library replaced meanwhile keeps the replacement, which still runs; a copy made while attached runs
    plainly, deep-copied or pickled."""
    from tests import tiny_hf

    model = tiny_hf.build("qwen3_moe")
    ids = _batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with mr.attach(model) as session:
        assert "forward" in vars(model) and "forward" in vars(model.model)
        with session.capture(), torch.no_grad():
            twin = copy.deepcopy(model)
            model(input_ids=ids)
        with torch.no_grad():
            assert torch.equal(twin(input_ids=ids).logits, want)
            assert torch.equal(pickle.loads(pickle.dumps(twin))(input_ids=ids).logits, want)
        with mr.attach(twin) as other:  # (the copy is a model of its own)
            with other.capture(), torch.no_grad():
                twin(input_ids=ids)
            assert other.routes().equal(session.routes())
        assert all("forward" not in vars(m) for m in twin.modules())
        calls = []
        theirs = model.forward

        def patched(*args: object, **kwargs: object) -> object:
            calls.append(1)
            return theirs(*args, **kwargs)

        model.forward = patched
    assert vars(model)["forward"] is patched and "forward" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    assert calls == [1]


@pytest.mark.reliability("silent replays")
def test_a_model_forward_set_back_after_attach_is_refused_at_the_next_block() -> None:
    """The attached model's forward set back to its class's after attach (accelerate's remove_hook_from_module on a
    hook added before attach does this): its forwards would go unseen, so the next block refuses, as for a router."""
    model = mr.models.build("softmax_topk")
    ids = _batch()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        ours = vars(model)["forward"]
        model.forward = type(model).forward.__get__(model)
        for block in (session.capture, lambda: session.replay(routes)):
            with pytest.raises(mr.SessionStateError, match="MoETransformer this session watches"):
                with block():
                    pass
        model.forward = ours  # (put back: the blocks run again)
        with session.replay(routes), torch.no_grad():
            model(ids)


class _BatchWrapper(torch.nn.Module):
    """A wrapper fed a batch of its own (a dict), whose forward calls the inner model with its token ids."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, torch.Tensor]) -> object:
        return self.inner(batch["input_ids"])


@pytest.mark.reliability("silent replays")
def test_a_module_on_the_way_fed_no_tokens_leaves_the_check_to_the_modules_below() -> None:
    """With one MoE layer, that layer and its MoE block lie on the way to the routers too. Called alone with hidden
    states they give no tokens to check: the router refuses the rows as for any block called alone, and the forwards
    after it are still checked. A wrapper fed a batch of its own leaves its tokens to the model it calls."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    ids = _batch()
    hidden = torch.randn(*ids.shape, model.config.hidden_size)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with pytest.raises(mr.TokenMismatchError, match=r"reads rows 0\.\..*fed hidden states"):
            with session.replay(routes, strict=False), torch.no_grad():
                model.layers[1].mlp(hidden)
        with pytest.raises(mr.TokenMismatchError, match="forward 1 of this replay"):
            with session.replay(routes, strict=False), torch.no_grad():
                with pytest.raises(mr.TokenMismatchError, match="did not enter"):
                    model.layers[1](hidden, None, None)
                model(ids.flip(0))  # (not checked before: the layer alone left the rest of the block unchecked)
    wrapped = _BatchWrapper(model)
    with mr.attach(wrapped) as session:
        with session.capture(), torch.no_grad():
            wrapped({"input_ids": ids})
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids.reshape(-1))
        with session.replay(routes), torch.no_grad():
            wrapped({"input_ids": ids})
        with pytest.raises(mr.TokenMismatchError, match="forward 1 of this replay"):
            with session.replay(routes), torch.no_grad():
                wrapped({"input_ids": ids.flip(0)})


@pytest.mark.parametrize("first", ["inner", "outer"])
def test_two_sessions_that_watch_one_module_detach_in_either_order(first: str) -> None:
    """A session on the base model and one on the whole model, each with its own routers, both watch the base
    model's forward: either may detach first, the other still checks its tokens, and after both the model's modules
    hold nothing of theirs."""
    from tests import tiny_hf
    from tests.conftest import assert_untouched, snapshot

    model = tiny_hf.build("qwen3_moe")
    before = snapshot(model)
    ids = _batch()
    inner = mr.attach(model.model, exclude="layers.1.mlp.gate")
    outer = mr.attach(model, exclude="model.layers.0.mlp.gate")
    with inner.capture(), outer.capture(), torch.no_grad():
        model(input_ids=ids)
    routes = {inner: inner.routes(), outer: outer.routes()}
    gone, kept = (inner, outer) if first == "inner" else (outer, inner)
    gone.detach()
    with kept.replay(routes[kept]), torch.no_grad():
        model(input_ids=ids)
    with pytest.raises(mr.TokenMismatchError, match="other tokens"):
        with kept.replay(routes[kept]), torch.no_grad():
            model(input_ids=ids.flip(0))
    kept.detach()
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_an_encoder_decoder_forward_gives_its_rows_no_token_ids() -> None:
    """An encoder-decoder's decoder routers read rows of the decoder's tokens, its encoder routers those of the
    input: no one id per row describes them. With inputs and targets of one length the rows lined up with the input
    ids all the same, and a replay fed other decoder tokens passed the check. Its routes know no tokens now."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    ids, targets = _batch(0), _batch(1)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(input_ids=ids, decoder_input_ids=targets)
        routes = session.routes()
        assert routes.token_ids is None
        with session.replay(routes.with_token_ids(ids.reshape(-1))), torch.no_grad():  # (given ids: left unchecked)
            model(input_ids=ids, decoder_input_ids=targets)


def test_a_forward_replaced_on_a_module_two_sessions_watch_is_refused_by_both() -> None:
    """The base model's forward, watched by a session on it and one on the whole model, replaced after attach by one
    that never calls theirs: the tokens fed there would go unseen by both, so each refuses its next block."""
    from tests import tiny_hf

    model = tiny_hf.build("qwen3_moe")
    inner = mr.attach(model.model, exclude="layers.1.mlp.gate")
    outer = mr.attach(model, exclude="model.layers.0.mlp.gate")
    theirs = model.model.forward
    model.model.forward = functools.partial(type(model.model).forward, model.model)  # (another library's own, say)
    for session in (inner, outer):
        with pytest.raises(mr.SessionStateError, match="Qwen3MoeModel this session watches"):
            with session.capture():
                pass
    model.model.forward = theirs
    outer.detach()
    inner.detach()


@pytest.mark.reliability("silent replays")
def test_routers_out_of_step_after_a_caught_failure_are_refused_at_the_next_forward() -> None:
    """A forward that raises half-way, caught inside a replay block, leaves its first routers a forward ahead of the
    later ones; with strict=False nothing at exit would tell. The next forward is refused before any router reads."""
    model = mr.models.build("softmax_topk")
    ids = _batch()
    experts = model.layers[0].mlp.experts  # (after the first router, before the second)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
            model(ids)
        routes = session.routes()
        with session.replay(routes, strict=False), torch.no_grad():
            experts.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("an expert failed"))
            with pytest.raises(RuntimeError, match="an expert failed"):
                model(ids)
            del experts.forward
            out_of_step = r"out of step: 'layers.1.mlp.router' is at row 0 of the routes, others at row 24"
            with pytest.raises(mr.TokenMismatchError, match=out_of_step):
                model(ids)
        with session.replay(routes), torch.no_grad():  # from the start: replayed
            model(ids)
            model(ids)


@pytest.mark.reliability("silent replays")
def test_a_replay_whose_cache_moves_rows_between_forwards_is_refused() -> None:
    """Once silent: a replayed decode loop whose KV cache moved rows between steps (a beam search reordering its
    hypotheses) read row j of each step for whatever hypothesis now sat there, so hypotheses that share a token
    (the token check passes) took each other's recorded experts. A forward after a row move in a replay is now
    refused before any router reads; the cache's methods and the model are as before, and a replay with no move
    runs exactly."""
    from tests import tiny_hf

    from .conftest import assert_untouched, snapshot

    transformers = pytest.importorskip("transformers")
    model = tiny_hf.build("qwen3_moe")
    before = snapshot(model)
    prompt = _prompt()

    def decode(order: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        cache = transformers.DynamicCache()
        kwargs = {tiny_hf.cache_kwarg(model): cache, "use_cache": True}
        with torch.no_grad():
            logits = [model(prompt, **kwargs).logits]
            for _ in range(N - 1):
                if order is not None:
                    cache.reorder_cache(order)  # as beam search does between its steps
                logits.append(model(torch.full((B, 1), 7), **kwargs).logits)  # one token shared by every row
        return torch.cat(logits, dim=1), cache

    session = mr.attach(model)
    with session.capture():
        decode(torch.arange(B))
    routes = session.routes()
    assert routes.token_ids is not None and routes._rows_moved == "DynamicCache.reorder_cache"  # the premise
    with pytest.raises(mr.RoutesValidationError, match=r"moved rows between forwards \(DynamicCache\.reorder_cache"):
        with session.replay(routes):
            decode(torch.tensor([2, 0, 1]))  # other moves, the same tokens fed: no token check can see it
    with pytest.raises(mr.RoutesValidationError, match="num_beams=1"):
        with session.replay(routes):
            decode(torch.arange(B))  # the capture's own moves are refused too: a replay cannot check them
    with session.capture():
        reference, _ = decode(None)
    plain = session.routes()
    with session.replay(plain):
        replayed, cache = decode(None)
    assert torch.equal(replayed, reference)
    assert "reorder_cache" not in vars(cache)
    session.detach()
    assert_untouched(model, before)


def test_a_4d_mask_is_read_as_tokens_only_where_each_token_attends_no_later_key() -> None:
    """A [batch, heads, queries, keys] mask gives a token where its query attends its own key, padding where not;
    a sequence whose queries attend later keys (a forward after cached tokens, a row of padding unmasked to
    attend everything) is not read: -1, never a guess."""
    from moe_replay._feeds import _tokens_of_4d

    causal = torch.ones(4, 6, dtype=torch.bool).tril()  # 4 queries, 6 keys (2 free slots of a static cache)
    left = causal.clone()
    left[:, 0] = False  # the first token is padding: no query attends it
    mask = torch.stack([causal, left])[:, None]
    assert _tokens_of_4d(mask, 2, 4).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    additive = torch.zeros(2, 1, 4, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert _tokens_of_4d(additive, 2, 4).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    after = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)[None, None]  # 2 cached tokens before these
    assert _tokens_of_4d(after, 1, 4).tolist() == [[-1, -1, -1, -1]]
    unmasked = left.clone()
    unmasked[0] = True  # the padding's query row made to attend every key
    assert _tokens_of_4d(torch.stack([causal, unmasked])[:, None], 2, 4).tolist() == [[1, 1, 1, 1], [-1] * 4]
    assert _tokens_of_4d(mask, 3, 4) is None and _tokens_of_4d(mask.long(), 2, 4) is None


@pytest.mark.reliability("silent replays")
def test_positions_a_caller_changes_in_place_after_its_forward_leave_the_recorded_places_as_fed() -> None:
    """A forward given ``position_ids`` with no cache and no mask (a training batch of packed sequences, say): the
    places recorded for its tokens are those it was fed, even where the caller then reuses its positions' buffer
    for its next batch (in place). Kept as a view of the caller's tensor, they followed it: the replay of that very
    forward, fed the very same positions, was refused for feeding its tokens at other places than recorded."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("qwen3_moe").eval()
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    buffer = torch.arange(4).expand(2, 4).clone()
    with torch.no_grad(), mr.attach(model) as session:
        with session.capture():
            model(input_ids=ids, position_ids=buffer, use_cache=False)
        buffer.add_(10)  # (the caller's buffer, filled for its next batch)
        with session.replay(session.routes()):
            model(input_ids=ids, position_ids=torch.arange(4).expand(2, 4).clone(), use_cache=False)
        with pytest.raises(mr.MoEReplayError, match="other places"):  # (the check itself still holds)
            with session.replay(session.routes()):
                model(input_ids=ids, position_ids=buffer, use_cache=False)


@pytest.mark.parametrize("held", [0, 3])
def test_positions_given_after_a_host_count_of_cached_tokens_are_read_as_after_a_device_count(held: int) -> None:
    """Positions given to a forward after a KV cache's tokens: a row whose positions fall among the cached tokens (a
    prompt fed from place 0 into a cache not reset) takes its places from the cache's count, the others keep theirs.
    A count the host knows (an int) is read by a shortcut of its own, one the device holds (a 0-d tensor) by the
    general ops: the same places from both."""
    from moe_replay._feeds import places_fed

    class _Counting:
        def __init__(self, held: int | torch.Tensor) -> None:
            self.held = held

        def get_seq_length(self) -> int | torch.Tensor:
            return self.held

    ids = torch.zeros(3, 2, dtype=torch.long)
    positions = torch.tensor([[0, 1], [held, held + 1], [held + 2, held + 3]])
    for given in (positions, positions[:1]):  # (a row per sequence; one row for every sequence)
        host = places_fed((ids,), {"past_key_values": _Counting(held), "position_ids": given}, ids.shape)
        on_device = {"past_key_values": _Counting(torch.tensor(held)), "position_ids": given}
        device = places_fed((ids,), on_device, ids.shape)
        assert host is not None and device is not None
        assert host.dtype == device.dtype == torch.long
        assert host.tolist() == device.tolist()
        fed = given.expand(3, 2).tolist()
        kept = [row == own for row, own in zip(host.tolist(), fed, strict=True)]
        assert kept == [own[0] >= held for own in fed]  # (a row fed among the cached tokens: placed after them)


def test_places_after_a_device_count_of_cached_tokens_are_read_where_a_4d_mask_leaves_out_no_key() -> None:
    """A static cache counts its tokens on its device (a 0-d tensor): the places of a forward's tokens are read from
    that count on the device, and, given a [batch, heads, queries, keys] mask, only where each query attends every key
    up to its own and none after it. Padding before a token, keys a sliding window dropped, a row of padding unmasked
    to attend everything, or a 2-d mask of other keys than the cache's and the tokens' leave the place unknown: -1,
    never a guess."""
    from moe_replay._feeds import places_fed

    class _Counting:  # (a cache that counts its tokens on its device, as a static one does)
        def __init__(self, held: int) -> None:
            self.held = torch.tensor(held)

        def get_seq_length(self) -> torch.Tensor:
            return self.held

    ids = torch.zeros(2, 1, dtype=torch.long)
    cache = _Counting(3)
    steps = torch.ones(4, 6, dtype=torch.bool).tril()[3:]  # a step after 3 cached tokens, 6 slots
    padded = steps.clone()
    padded[:, 0] = False  # its sequence's first token was padding
    window = steps.clone()
    window[:, :2] = False  # a sliding window of 2 keys: the 2 oldest dropped
    everything = torch.ones(1, 6, dtype=torch.bool)  # a row of padding made to attend every key
    mask = torch.stack([steps, padded])[:, None]
    got = places_fed((ids,), {"past_key_values": cache, "attention_mask": mask}, ids.shape)
    assert got is not None and got.tolist() == [[int(cache.held)], [-1]]
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    fed = {"past_key_values": cache, "attention_mask": additive}
    assert places_fed((ids,), fed, ids.shape).tolist() == got.tolist()
    for odd in (window, everything):
        fed = {"past_key_values": cache, "attention_mask": torch.stack([steps, odd])[:, None]}
        assert places_fed((ids,), fed, ids.shape).tolist() == [[int(cache.held)], [-1]]
    assert places_fed((ids,), {"past_key_values": cache}, ids.shape).tolist() == [[int(cache.held)]] * 2
    positions = torch.tensor([[3], [3]])  # (positions given: the same check of the mask)
    fed = {"past_key_values": cache, "attention_mask": mask, "position_ids": positions}
    assert places_fed((ids,), fed, ids.shape).tolist() == got.tolist()
    two_d = torch.ones(2, 4, dtype=torch.long)
    two_d[1, 0] = 0
    fed = {"past_key_values": cache, "attention_mask": two_d}
    counted = (two_d.sum(dim=1, keepdim=True) - 1).tolist()  # (its tokens counted: padding left out)
    assert places_fed((ids,), fed, ids.shape).tolist() == counted
    fed = {"past_key_values": cache, "attention_mask": torch.ones(2, 6, dtype=torch.long)}  # (the cache's slots)
    assert places_fed((ids,), fed, ids.shape).tolist() == [[-1], [-1]]
    cache.held.add_(1)  # (read as it is when the forward begins, not as it was)
    assert places_fed((ids,), {"past_key_values": cache}, ids.shape).tolist() == [[int(cache.held)]] * 2


class _SequenceFirst(torch.nn.Module):
    """A model fed ``[batch, positions]`` ids whose layers run sequence-first ``[positions, batch, hidden]`` (as
    fairseq and Megatron do): its routers see the tokens of position 0 of every sequence, then position 1..."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(num_experts=8, top_k=2)
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 64)
        self.blocks = torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        self.head = torch.nn.Linear(64, 128)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        if attention_mask is not None:  # padding holds nothing: changing a pad token changes no row
            x = x * attention_mask[..., None]
        x = x.transpose(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(0, 1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("padded", [False, True], ids=["full", "right-padded"])
def test_routers_that_see_the_tokens_sequence_first_are_checked_in_their_order(padded: bool) -> None:
    """Once silent: a model whose routers see a [batch, positions] batch sequence-first recorded each row with the
    token of the batch-major position, and a replay of routes laid out batch-major (mr.BatchLayout, an engine's)
    passed the token check while every row but the first went to another token. The order the routers see the
    tokens is now established by effect, the rows know their true tokens, and such routes are refused."""
    from tests.conftest import assert_untouched, snapshot

    model = _SequenceFirst().eval()
    before = snapshot(model)
    ids = _batch(rows=2, width=4)
    lengths = [3, 4] if padded else [4, 4]  # (padded: sequence 0's last position is padding, which shows nothing)
    mask = mr.BatchLayout.padded(lengths).attention_mask()
    with mr.attach(model) as session:
        parts = []
        for row, n in zip(ids, lengths, strict=True):  # the rollout: each sequence alone (one row: no order to tell)
            with session.capture(), torch.no_grad():
                model(row[None, :n])
            parts.append(session.routes())
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        native = session.routes()
        want = torch.where(mask.bool(), ids, -1).t().reshape(-1)  # each row's own token, as the routers saw it
        assert torch.equal(native.token_ids, want)
        # the same batch replayed from its capture: forced, and checked
        with session.capture(), session.replay(native), torch.no_grad():
            model(ids, attention_mask=mask)
        assert session.routes().equal(native)
        with pytest.raises(mr.TokenMismatchError, match="sequence-first"):
            with session.replay(native), torch.no_grad():
                model(ids.flip(0), attention_mask=mask.flip(0))
        # routes laid out batch-major would force sequence 0's experts on sequence 1's tokens: refused
        with pytest.raises(mr.TokenMismatchError, match="sequence-first"):
            with session.replay(mr.pad_routes(parts)), torch.no_grad():
                model(ids, attention_mask=mask)
    assert_untouched(model, before)


def test_a_later_session_on_the_model_takes_the_token_order_found_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once slow: every session ran the model again up to its first router at its first block's first forward to tell
    the token order (a training step of a session attached per step cost 5% more). A later session on the same model
    and routers now takes the order found; one whose routers changed tells it again."""
    from moe_replay import _feeds

    runs: list[str | None] = []
    told = _feeds.token_order

    def counted(*args: Any, **kwargs: Any) -> str | None:
        runs.append(told(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(_feeds, "token_order", counted)
    model = _SequenceFirst().eval()
    ids = _batch(rows=2, width=4)
    want = ids.t().reshape(-1)  # (each row's own token, as the routers see them: sequence-first)
    for _ in range(2):
        with mr.attach(model) as session, session.capture(), torch.no_grad():
            model(ids)
        assert torch.equal(session.routes().token_ids, want)
        assert runs == [_feeds.SEQUENCE_FIRST]  # (told once, by the first session)
    model.blocks[0] = _SequenceFirst().blocks[0]  # another router on the way: the order is told again
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        model(ids)
    assert torch.equal(session.routes().token_ids, want)
    assert runs == [_feeds.SEQUENCE_FIRST] * 2


class _Stack(torch.nn.Module):
    """MoE blocks that run the hidden states in the layout they are given."""

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class _SequenceFirstStack(_Stack):
    """The same blocks run sequence-first: ``[positions, batch, hidden]``, as fairseq's and Megatron's layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(0, 1)).transpose(0, 1)


class _Layout(torch.nn.Module):
    """A model whose routers see the tokens batch-major or sequence-first, as a flag of its own says."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(num_experts=8, top_k=2)
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 64)
        self.stack = _Stack(torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)]))
        self.head = torch.nn.Linear(64, 128)
        self.sequence_first = False
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.sequence_first:
            return self.head(self.stack(x.transpose(0, 1)).transpose(0, 1))
        return self.head(self.stack(x))


def _to_sequence_first(model: _Layout, how: str) -> None:
    if how == "flag":
        model.sequence_first = True
    elif how == "layer swapped":  # (the same blocks and routers, in a stack that runs them sequence-first)
        model.stack = _SequenceFirstStack(model.stack.blocks)
    elif how == "forward patched":  # (on the instance, as a notebook patches a module)
        plain = model.stack.forward
        model.stack.forward = lambda x: plain(x.transpose(0, 1)).transpose(0, 1)
    else:
        raise AssertionError(how)


_CHANGES = ["flag", "layer swapped", "forward patched"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _CHANGES)
@pytest.mark.parametrize("when", ["between sessions", "between blocks"])
def test_a_token_order_found_before_is_told_again_once_the_model_changed(how: str, when: str) -> None:
    """Once silent: the order in which the routers see the tokens, found once and kept for the model, was taken
    after a flag of the model, a layer on the way to the routers or its forward made them see the tokens
    sequence-first: the capture recorded each row with a batch-major position's token, and routes laid out
    batch-major passed the token check while every row but the first went to another token. The modules on the
    way to the first router are compared with what they were when the order was found; changed, it is told again."""
    model = _Layout().eval()
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        batch_major = session.routes()
        assert torch.equal(batch_major.token_ids, ids.reshape(-1))
        if when == "between blocks":
            _to_sequence_first(model, how)
            with session.capture():
                model(ids)
            assert torch.equal(session.routes().token_ids, ids.t().reshape(-1))
            with pytest.raises(mr.TokenMismatchError, match="sequence-first"), session.replay(batch_major):
                model(ids)
    if when == "between sessions":
        _to_sequence_first(model, how)
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(ids)
            assert torch.equal(session.routes().token_ids, ids.t().reshape(-1))
            with pytest.raises(mr.TokenMismatchError, match="sequence-first"), session.replay(batch_major):
                model(ids)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_hooks_that_make_the_routers_see_the_tokens_sequence_first_are_seen(block: str) -> None:
    """Once silent: hooks on a module on the way to the routers transpose its input and output, so its routers see the
    tokens sequence-first; the token-order runs, which leave such hooks out (a hook collecting activations sees the
    one forward), found them batch-major, and routes laid out batch-major were taken while every row but the first
    went to another token. The block's first forward, run with the hooks, now hands its first router's input to a
    check against the runs': the rows in the other order are refused before any router records or forces."""
    from tests.conftest import assert_untouched, snapshot

    model = _Layout().eval()
    before = snapshot(model)
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        batch_major = session.routes()  # (without the hooks: each row its own token's)
        pre = model.stack.register_forward_pre_hook(lambda module, args: (args[0].transpose(0, 1),))
        post = model.stack.register_forward_hook(lambda module, args, out: out.transpose(0, 1))
        for _ in range(2):  # (at each block: an order told without the hooks is not kept)
            with pytest.raises(mr.UnsupportedRouterError, match="hook of those modules reorders"):
                with session.capture() if block == "capture" else session.replay(batch_major):
                    model(ids)
            tried()
        pre.remove()
        post.remove()
        with session.capture(), session.replay(batch_major):  # (the hooks gone: taken, and forced as recorded)
            model(ids)
        assert session.routes().equal(batch_major)
    assert_untouched(model, before)


def test_hooks_that_change_the_hidden_states_on_the_way_but_not_their_order_are_taken() -> None:
    """A forward hook that adds noise to the embeddings (as NEFTune's does) changes the first router's input in the
    block's forward from what the token-order runs (without it) saw, but not its order: captured and replayed."""
    model = _Layout().eval()
    ids = _batch(rows=2, width=4)
    noise = torch.Generator().manual_seed(0)
    model.embed.register_forward_hook(lambda module, args, out: out + 1e-3 * torch.randn(out.shape, generator=noise))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes()
        assert torch.equal(routes.token_ids, ids.reshape(-1))
        with session.replay(routes):
            model(ids)


@pytest.mark.parametrize("forward", ["bound method", "partial"])
def test_a_model_whose_forward_is_its_own_is_freed_after_its_session(forward: str) -> None:
    """Once a leak: the token order kept for a model held its own forward (a bound method, accelerate's partial
    over the model), and with it the model, for as long as the process ran."""
    model = mr.models.build("softmax_topk")
    if forward == "bound method":
        model.forward = model.forward
    else:
        model.forward = functools.partial(type(model).forward, model)
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        model(_batch(rows=2))
    gone = weakref.ref(model)
    del model, session
    gc.collect()
    assert gone() is None


class _Counted(torch.nn.Module):
    """A model whose forward updates state before its first router: a forward counter and a batch norm in training."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(router="softmax_topk")
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = torch.nn.BatchNorm1d(cfg.hidden_size)
        self.block = mr.models.MoEBlock(cfg)
        self.forwards = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h = self.norm(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return h + self.block(h)


@pytest.mark.parametrize("block", ["capture", "replay"])
def test_the_token_order_probe_leaves_the_model_as_one_forward_does(block: str) -> None:
    """Once the forwards that tell the order in which the routers see the tokens (run up to the first router) left
    their updates in the model: a forward counter and a batch norm's running statistics moved three times for the
    block's first forward. One forward in a block now changes the model as one forward without a session does."""
    torch.manual_seed(0)
    model, plain = _Counted(), _Counted()
    plain.load_state_dict(model.state_dict())
    ids = _batch()
    plain(ids)
    with mr.attach(model) as session:
        rows = torch.tensor([0, 1]).repeat(ids.numel(), 1)  # (rows checked against their tokens)
        routes = mr.Routes([rows], names=session.names, num_experts=8).with_token_ids(ids)
        with session.capture() if block == "capture" else session.replay(routes):
            model(ids)
    assert model.forwards == plain.forwards == 1
    assert int(model.norm.num_batches_tracked) == 1
    assert torch.equal(model.norm.running_mean, plain.norm.running_mean)


def test_the_token_order_probe_runs_no_hook_of_the_model() -> None:
    """Once silent: a forward hook collecting the activations of a module before the first router saw three forwards
    for the first forward of a block (the token-order runs); it now sees the one forward."""
    model = _Counted()
    seen: list[torch.Size] = []
    model.embed.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with mr.attach(model) as session, session.capture():
        model(_batch())
    assert len(seen) == 1


class _RecordsOutputs(torch.nn.Module):
    """A model that registers forward hooks on its blocks at its first forward and notes so in an attribute, as
    transformers' output recording does (``output_router_logits``, ``output_hidden_states``): it returns what they
    recorded in the forward."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(router="softmax_topk")
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.1)
        self.recorded: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not getattr(self, "_hooks_installed", False):
            for block in self.blocks:
                block.register_forward_hook(lambda module, args, out: self.recorded.append(out))
            self._hooks_installed = True
        self.recorded.clear()
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return h, list(self.recorded)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", ["capture", "keep_scores"])
def test_hooks_a_model_registers_at_its_first_forward_are_registered_once(block: str) -> None:
    """Once silent: hooks a model registers at its first forward (transformers' output recording) were registered
    in each token-order run too, while the attribute that notes them was put back: every later forward recorded each
    output three times (``out.router_logits`` of a two-layer model held six, ``out.hidden_states`` were shifted)."""
    model = _RecordsOutputs().eval()
    plain = copy.deepcopy(model)
    ids = _batch()
    with mr.attach(model) as session, torch.no_grad():
        for _ in range(2):
            with session.capture() if block == "capture" else session.keep_scores():
                _, recorded = model(ids)
            _, want = plain(ids)
            assert len(recorded) == len(want) == 2
            assert all(torch.equal(a, b) for a, b in zip(recorded, want, strict=True))


class _Looped(torch.nn.Module):
    """A universal-transformer-like model: one MoE block applied ``steps`` times per forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(router="softmax_topk")
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.block = mr.models.MoEBlock(cfg)
        torch.manual_seed(0)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5)

    def forward(self, input_ids: torch.Tensor, steps: int = 2, again: int = 0) -> torch.Tensor:
        h = self.embed(input_ids)
        for _ in range(steps):
            h = h + self.block(h)
        if again:  # (the block once more, on the first ``again`` sequences only)
            h = h + self.block(h[:again]).sum() * 0
        return h


@pytest.mark.reliability("silent replays")
def test_a_router_called_several_times_per_forward_records_and_checks_its_tokens() -> None:
    """Once silent: a router called at every step of a loop (one MoE block shared by its layers) recorded no token
    ids, so routes replayed on the batches in another order were taken; and routes that knew their ids were refused
    at its second call, as if a submodule had been called alone."""
    model = _Looped()
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            ref_a, ref_b = model(a, steps=2), model(b, steps=3)  # a data-dependent number of steps
        routes = session.routes()
        assert routes.num_tokens == 5 * a.numel()
        assert torch.equal(routes.token_ids, torch.cat([a.reshape(-1)] * 2 + [b.reshape(-1)] * 3))
        with session.replay(routes), torch.no_grad():  # the same forwards: taken, exact
            assert torch.equal(model(a, steps=2), ref_a)
            assert torch.equal(model(b, steps=3), ref_b)
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes), torch.no_grad():
                model(b, steps=3)
        with pytest.raises(mr.TokenMismatchError, match=r"forward 1 .* row 48 of the routes"):
            with session.replay(routes), torch.no_grad():  # its third step would read b's rows
                model(a, steps=3)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():  # by row order alone: replayed
            model(a, steps=2)
            model(b, steps=3)
        with session.capture(), torch.no_grad():  # the block called alone between forwards, on as many tokens
            model(a, steps=1)
            model.block(model.embed(b))
            model(b, steps=1)
        assert session.routes().token_ids is None  # (its rows are no forward's tokens)


def test_a_router_called_again_on_other_tokens_in_a_forward_says_so() -> None:
    """Once misleading: a router called a second time in a forward on part of its tokens was refused as though the
    forward had not entered the model; the error names the forward and its token count."""
    model = _Looped()
    a = _batch(1)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(a, steps=1, again=1)
        routes = session.routes()
        assert routes.token_ids is None  # (its second call's rows are no tokens of the forward each)
        routes = routes.with_token_ids(torch.cat([a.reshape(-1), a[:1].reshape(-1)]))
        with pytest.raises(mr.TokenMismatchError, match=r"in forward 1, which was fed 24 tokens: past the rows"):
            with session.replay(routes), torch.no_grad():
                model(a, steps=1, again=1)


@pytest.mark.reliability("silent replays")
def test_a_router_called_again_on_part_of_the_tokens_in_every_forward_is_refused() -> None:
    """Once silent: the one block of a looped model is called once more on the first sequence of each forward; its rows
    are no one id per token, so the routes knew none, and a replay of the two batches in the other order was taken.
    Which tokens the second call's rows are cannot be told: the routes are refused in any order, as where routers'
    calls differ (a false refusal of the capture's own order), and replay by row order alone where the check is
    dropped on purpose."""
    model = _Looped()
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, steps=1, again=1), model(b, steps=1, again=1)]
        routes = session.routes()
        for first, second in ((b, a), (a, b)):
            with pytest.raises(mr.TokenMismatchError, match=r"called in a forward .* on every one of its 24 tokens"):
                with session.replay(routes), torch.no_grad():
                    model(first, steps=1, again=1)
                    model(second, steps=1, again=1)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():  # by row order alone: replayed
            got = [model(a, steps=1, again=1), model(b, steps=1, again=1)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with session.capture(), torch.no_grad():  # (the same forwards without the call on a part: their ids known)
            model(a, steps=2)
        assert session.routes()._ids_lost is None and session.routes().token_ids is not None


@pytest.mark.reliability
def test_routers_called_a_different_number_of_times_per_forward_check_their_tokens() -> None:
    """Once silent: one MoE block shared by two of three layers is called twice per forward, the other once; the
    capture knew no token ids (no one id per row fits routers of different row counts), so its routes replayed on the
    batches in another order were taken. Each router keeps its own ids: the capture's order replays exactly (and
    forces), another order is refused; routes built from rows alone replay unchecked, as before."""
    model = mr.models.build("softmax_topk", num_layers=3)
    model.layers[2].mlp = model.layers[0].mlp
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [model(a).logits, model(b).logits]
        routes = session.routes()
        assert routes.tokens_per_layer == (4 * a.numel(), 2 * a.numel())  # the premise: the block's rows, twice
        with session.replay(routes), torch.no_grad():
            got = [model(a).logits, model(b).logits]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        forced = _moved(routes)
        with session.replay(forced), session.capture(), torch.no_grad():
            moved = model(a).logits
            model(b)
        assert session.routes().equal(forced) and not torch.equal(moved, want[0])
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes), torch.no_grad():
                model(b)
                model(a)
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(mr.Routes.cat([routes, routes])), torch.no_grad():  # (joined: each router's own)
                model(a)
                model(b)
                model(b)
        rows = mr.Routes(routes.per_layer(), names=routes.names, num_experts=routes.experts_per_layer)
        with session.replay(rows), torch.no_grad():  # no ids known: by row order, unchecked, as before
            model(b)
            model(a)


def _moved(routes: mr.Routes) -> mr.Routes:
    """``routes`` with every expert moved by one (what no native forward chooses), each router's token ids kept."""
    rows = [
        torch.where(t >= 0, (t + 1) % e, t) for t, e in zip(routes.per_layer(), routes.experts_per_layer, strict=True)
    ]
    out = mr.Routes(rows, names=routes.names, num_experts=routes.experts_per_layer)
    out._router_ids = routes._router_ids
    return out


@pytest.mark.reliability("silent replays")
def test_rows_recorded_at_prompt_padding_keep_their_mark_among_each_routers_own_ids() -> None:
    """Routers of different row counts (one block at two layers) keep each row recorded at prompt padding as such: a
    replay of the batch fed without its attention mask (tokens of its sequences at those rows) is refused, with it
    the replay is exact."""
    model = mr.models.build("softmax_topk", num_layers=3)
    model.layers[2].mlp = model.layers[0].mlp
    a = _batch(1)
    mask = torch.ones_like(a)
    mask[0, :2] = 0  # (left padding of the first sequence)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = model(a, attention_mask=mask).logits
        routes = session.routes()
        assert len(set(routes.tokens_per_layer)) == 2  # the premise
        with session.replay(routes):
            assert torch.equal(model(a, attention_mask=mask).logits, want)
        with pytest.raises(mr.TokenMismatchError, match="recorded at prompt padding"):
            with session.replay(routes):
                model(a)


class _Switched(torch.nn.Module):
    """An MoE block that a forward may leave out (``on`` False: nothing added), as a modality's router sees no batch
    without its modality."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block, self.on = block, True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block(hidden) if self.on else torch.zeros_like(hidden)


@pytest.mark.reliability("silent replays")
def test_each_routers_own_tokens_are_checked_as_it_reads_them_a_router_a_forward_leaves_out_reads_none() -> None:
    """Routers of different row counts (one block at two layers) beside one that the first forward leaves out: each
    router's rows are checked as it reads them, so the router left out is not checked against the next forward's
    tokens (no false refusal); the capture's order replays exactly, the other order is refused. And one router also
    called on hidden states of its own, the model's only router, keeps its forwards' tokens too."""
    model = mr.models.build("softmax_topk", num_layers=3)
    model.layers[2].mlp = model.layers[0].mlp
    model.layers[1].mlp = _Switched(model.layers[1].mlp)
    a, b = _batch(1), _batch(2)

    def run(x: torch.Tensor, on: bool) -> torch.Tensor:
        model.layers[1].mlp.on = on
        return model(x).logits

    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = [run(a, False), run(b, True)]
        routes = session.routes()
        assert routes.tokens_per_layer == (4 * a.numel(), a.numel())  # the premise: no rows of a at the second
        with session.replay(routes):
            got = [run(a, False), run(b, True)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes):
                run(b, True)
                run(a, False)
    alone = mr.models.build("softmax_topk", num_layers=1)
    router = alone.layers[0].mlp.router
    with mr.attach(alone) as session, torch.no_grad():
        with session.capture():
            for x in (a, b):
                alone(x)
                router(alone.embed(x).reshape(-1, alone.config.hidden_size))
        routes = session.routes()
        with session.replay(routes):
            for x in (a, b):
                alone(x)
                router(alone.embed(x).reshape(-1, alone.config.hidden_size))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                for x in (b, a):
                    alone(x)
                    router(alone.embed(x).reshape(-1, alone.config.hidden_size))


@pytest.mark.reliability("silent replays")
def test_a_router_called_on_a_part_of_a_forwards_tokens_in_a_capture_is_refused_not_replayed_unchecked() -> None:
    """Once silent: a router also called inside the forward on a part of its tokens (a hook of one's own) has rows
    that follow no forward's tokens one to one: the capture kept no ids and a replay in another order was taken. Its
    routes now say the ids were lost: a replay is refused until the check is dropped on purpose, and the mark stays
    with the routes through a file, select and cat."""
    model = mr.models.build("softmax_topk", num_layers=2)
    router, hidden = model.layers[0].mlp.router, model.config.hidden_size

    def aside(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:  # (its output replaces nothing)
        router(args[0].reshape(-1, hidden)[:5])

    model.layers[1].register_forward_hook(aside)
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [model(a).logits, model(b).logits]
        routes = session.routes()
        assert routes.tokens_per_layer == (2 * a.numel() + 10, 2 * a.numel())  # the premise
        for kept in (routes, routes.select(routes.names), mr.Routes.cat([routes, routes])):
            with pytest.raises(mr.TokenMismatchError, match=r"could not keep for every row.*with_token_ids\(None\)"):
                with session.replay(kept):
                    model(b)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():  # by row order alone, on purpose
            got = [model(a).logits, model(b).logits]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class _Canvas(torch.nn.Module):
    """An encoder of MoE blocks on the tokens fed, then a decoder MoE block on a canvas of its own making (three rows
    per sequence, made from the encoder's mean): as a diffusion decoder refines a canvas beside an encoder's tokens."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.embed = torch.nn.Embedding(128, 16)
        self.encoder = torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        self.canvas = torch.nn.Parameter(torch.empty(3, 16))
        self.decoder = mr.models.MoEBlock(cfg)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5)

    def forward(self, input_ids: torch.Tensor, fail: bool = False) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.encoder:
            h = h + block(h)
            if fail:  # (half-way: the later routers read nothing)
                raise RuntimeError("failed half-way")
        canvas = self.canvas + h.mean(1, keepdim=True)  # [batch, 3, hidden]
        return canvas + self.decoder(canvas)


@pytest.mark.reliability("silent replays")
def test_a_decoder_routing_a_canvas_of_its_own_beside_checked_encoder_routers_replays() -> None:
    """Once a false refusal (a diffusion decoder's canvas, HF's DiffusionGemma): routers none of whose calls are on the
    forward's tokens route a stream of their own; their ids are unknown, the encoder's are kept. The capture's order
    replays exactly and forces the decoder's recorded experts too; the batches in another order are refused."""
    torch.manual_seed(0)
    model = _Canvas()
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = [model(a), model(b)]
        routes = session.routes()
        assert routes.tokens_per_layer == (2 * a.numel(), 2 * a.numel(), 2 * 3 * a.shape[0])  # the premise
        with session.replay(routes), torch.no_grad():
            got = [model(a), model(b)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        forced = _moved(routes)
        with session.replay(forced), session.capture(), torch.no_grad():
            model(a)
            model(b)
        assert session.routes().equal(forced)  # (every router forced, the decoder's too)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                model(b)
                model(a)


class _Unpadding(torch.nn.Module):
    """Embeddings, then MoE blocks that see only the tokens the attention mask keeps (padding taken out first): sequence
    by sequence (``h[attention_mask.bool()]``), or position by position where ``first`` (layers that run
    ``[positions, batch, hidden]``)."""

    def __init__(self, first: bool = False) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.embed = torch.nn.Embedding(128, 16)
        self.layers = torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        self.first = first
        g = torch.Generator().manual_seed(0)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5, generator=g)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h, keep = self.embed(input_ids), attention_mask.bool()
        h = h.transpose(0, 1)[keep.t()] if self.first else h[keep]  # [real tokens, hidden]: one row per token kept
        for layer in self.layers:
            h = h + layer(h)
        return h


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(seed))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("side", "shared"), [("right", False), ("left", False), ("right", True)])
def test_routers_fed_only_the_unpadded_tokens_check_their_tokens(side: str, shared: bool) -> None:
    """Once silent: a model that takes the padding out before its MoE layers (h[attention_mask.bool()]) records one row
    per real token, fewer than the ids it was fed; such routes knew no token ids, and replayed on a batch of other
    tokens with as many real ones (other sequences, the same sequences in another order) they were forced without a
    word. The runs that tell the routers' token order show the changed token's row at its place among the tokens the
    mask keeps: the routes know the ids of those tokens, the capture's batches replay exactly (and force), others are
    refused; where one block is called at two layers too, each router's own ids."""
    model = _Unpadding()
    if shared:
        model.layers.append(model.layers[0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    if side == "left":
        mask = mask.flip(1)
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, mask), model(b[1:], mask[1:])]  # (the mask given by position; a batch of two after)
        routes = session.routes()
        fed = torch.cat([a[mask.bool()], b[1:][mask[1:].bool()]])
        if shared:  # (each router's own: the block's rows are its two calls' in each forward)
            two = torch.cat([a[mask.bool()]] * 2 + [b[1:][mask[1:].bool()]] * 2)
            assert routes.token_ids is None and routes._router_ids is not None
            assert all(torch.equal(t, w) for t, w in zip(routes._router_ids, [two, fed], strict=True))
        else:
            assert torch.equal(routes.token_ids, fed)
        with session.replay(routes), session.capture(), torch.no_grad():  # the same batches: exact, as recorded
            got = [model(a, mask), model(b[1:], attention_mask=mask[1:])]
        assert session.routes().equal(routes) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        forced = _moved(routes) if shared else _moved(routes).with_token_ids(fed)
        with session.replay(forced), session.capture(), torch.no_grad():
            model(a, mask)
            model(b[1:], mask[1:])
        assert session.routes().equal(forced)
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes), torch.no_grad():  # other tokens, as many real ones
                model(b, mask)
        swap = torch.tensor([2, 1, 0])
        with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
            with session.replay(routes), torch.no_grad():  # the same sequences in another order
                model(a[swap], mask[swap])
                model(b[1:], mask[1:])


@pytest.mark.reliability("silent replays")
def test_routers_fed_the_unpadded_tokens_position_by_position_are_not_told_sequence_by_sequence() -> None:
    """Routers that see the tokens a mask keeps position by position are not read as seeing them sequence by sequence:
    the changed token's row is elsewhere, and the capture keeps no ids laid out in an order its rows do not follow; nor
    where the runs cannot tell the two orders apart (no other sequence holds a token before the changed one)."""
    for mask, apart in (
        (torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]), True),
        (torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), True),
        # (sequence 0's last token, at position 1, has the same row in both orders, the others' do not: not told)
        (torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]), False),
    ):
        for first in (True, False):
            model = _Unpadding(first=first)
            with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
                with session.capture(), torch.no_grad():
                    model(_ids(0), mask)
                ids = session.routes().token_ids
            assert ids is None if first or not apart else torch.equal(ids, _ids(0)[mask.bool()])


class _AdditiveUnpadding(_Unpadding):
    """``_Unpadding`` given an additive float mask (0 for a token, a negative bias for padding): ``h[mask == 0]``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)[attention_mask == 0]
        for layer in self.layers:
            h = h + layer(h)
        return h


class _SortedUnpadding(_Unpadding):
    """``_Unpadding`` whose sequences are packed longest first (a varlen kernel's packing by length)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(attention_mask.sum(1), descending=True, stable=True)
        h = self.embed(input_ids)[order][attention_mask[order].bool()]
        for layer in self.layers:
            h = h + layer(h)
        return h


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("side", "bias"), [("right", float("-inf")), ("left", float("-inf")), ("right", -10000.0)])
def test_routers_fed_the_tokens_an_additive_mask_keeps_check_their_tokens(side: str, bias: float) -> None:
    """Once silent: a model given an additive float mask (0 for a token, ``-inf`` or ``-10000`` for padding) that takes
    the padding out (``h[mask == 0]``) was read as keeping the padding (the mask's non-zeros), its order not told, and
    its routes knew no ids: a replay of its batches in another order was forced without a word. An additive mask's
    tokens are its 0s: the capture keeps their ids, its batches replay exactly, in another order they are refused."""
    model = _AdditiveUnpadding()
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    if side == "left":
        keep = keep.flip(1)
    mask = torch.zeros(keep.shape).masked_fill(~keep, bias)
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, mask), model(b, mask)]
        routes = session.routes()
        assert torch.equal(routes.token_ids, torch.cat([a[keep], b[keep]]))
        with session.replay(routes), torch.no_grad():
            got = [model(a, mask), model(b, mask)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                model(b, mask)
                model(a, mask)


@pytest.mark.reliability("silent replays")
def test_routers_fed_the_kept_tokens_in_an_order_of_their_own_are_refused_not_forced_unchecked() -> None:
    """Once silent: routers fed the tokens a mask keeps in an order of the model's own (sequences packed longest
    first) are told no order (their rows are no place among the kept tokens sequence by sequence), and their rows,
    fewer than the ids fed, kept no ids: a replay of the batches in another order was forced without a word. Routes
    whose rows are as many as the kept tokens of a forward, in an order not told, now say why their ids are lost, and
    a replay of them is refused (by row order, on purpose, it runs)."""
    model = _SortedUnpadding()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, mask), model(b, mask)]
        routes = session.routes()
        with pytest.raises(mr.MoEReplayError, match="as many as the tokens its attention mask keeps"):
            with session.replay(routes), torch.no_grad():
                model(b, mask)
                model(a, mask)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():
            got = [model(a, mask), model(b, mask)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class _PaddingMarked(_Unpadding):
    """``_Unpadding`` given, as ``attention_mask``, a mask of True at padding (a key padding mask): ``h[~mask]``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)[~attention_mask]
        for layer in self.layers:
            h = h + layer(h)
        return h


@pytest.mark.reliability("silent replays")
def test_routers_fed_the_tokens_a_mask_of_true_at_padding_keeps_are_refused_not_forced_unchecked() -> None:
    """Once silent: a model given, as its attention mask, one of True at padding (a key padding mask) that takes the
    padding out: its routers' rows, as many as the mask's False entries, fewer than the ids fed, were read as a stream
    of their own and kept no ids, and a replay of the batches in another order was forced without a word; then refused
    even in their own order. The order runs find the mask read as marking padding: the capture keeps the ids of the
    tokens it keeps, its batches replay exactly, in another order they are refused."""
    model = _PaddingMarked()
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]).bool()
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, pad), model(b, pad)]
        routes = session.routes()
        assert torch.equal(routes.token_ids, torch.cat([a[~pad], b[~pad]]))
        with pytest.raises(mr.MoEReplayError):
            with session.replay(routes), torch.no_grad():
                model(b, pad)
                model(a, pad)
        with session.replay(routes), torch.no_grad():
            got = [model(a, pad), model(b, pad)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class _OtherNamedMask(_Unpadding):
    """``_Unpadding`` given its mask under another name than ``attention_mask`` (fairseq's ``padding_mask``, True at
    padding): ``h[~padding_mask]``."""

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.embed(input_ids)[~padding_mask]
        for layer in self.layers:
            h = h + layer(h)
        return h


@pytest.mark.reliability("silent replays")
def test_routers_fed_the_tokens_a_mask_of_another_name_keeps_are_refused_on_batches_in_another_order() -> None:
    """Once silent: a model given its padding mask as ``padding_mask`` that takes the padding out: the capture could
    not read that mask, its routers' rows looked like a stream of their own, and a replay of its batches in another
    order was forced by row order. The order runs find the mask whose kept tokens the rows are among the forward's
    inputs: the capture keeps their ids, its batches replay exactly, in another order they are refused."""
    model = _OtherNamedMask()
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]).bool()
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, pad), model(b, pad)]
        routes = session.routes()
        assert torch.equal(routes.token_ids, torch.cat([a[~pad], b[~pad]]))
        with pytest.raises(mr.MoEReplayError):
            with session.replay(routes), torch.no_grad():
                model(b, pad)
                model(a, pad)
        with session.replay(routes), torch.no_grad():
            got = [model(a, pad), model(b, padding_mask=pad)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class _MaskOfItsOwn(_Unpadding):
    """``_Unpadding`` given its padding under another name or layout than an ``attention_mask`` of 1 at each token
    (``how``): fairseq's ``padding_mask`` (True, or 1, at padding), an additive ``[batch, 1, 1, keys]`` ``src_mask``, a
    float ``keep`` of 1.0 at each token, the ``lengths`` of the sequences, or ``padding_mask`` and ``keep`` both."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        src_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, width = input_ids.shape
        if attention_mask is not None:  # (an additive [batch, 1, 1, keys] one, as BERT's extended mask)
            kept = attention_mask.reshape(batch, width) == 0
        elif position_ids is not None:
            kept = position_ids >= 0
        elif padding_mask is not None:
            kept = padding_mask == 0
        elif src_mask is not None:
            kept = src_mask.reshape(batch, width) == 0
        elif keep is not None:
            kept = keep == 1
        else:
            assert lengths is not None
            kept = torch.arange(width)[None, :] < lengths[:, None]
        h = self.embed(input_ids)[kept]
        for layer in self.layers:
            h = h + layer(h)
        return h


def _given(how: str, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs ``_MaskOfItsOwn(how)`` takes its padding from, for the tokens ``keep`` marks."""
    if how == "padding_mask":
        return {"padding_mask": ~keep}
    if how == "padding_mask uint8":
        return {"padding_mask": (~keep).to(torch.uint8)}
    if how in ("src_mask", "attention_mask 4d"):  # (-inf at padding, or the dtype's least value)
        bias = float("-inf") if how == "src_mask" else torch.finfo(torch.float32).min
        return {how.split()[0]: torch.zeros(keep.shape).masked_fill(~keep, bias)[:, None, None, :]}
    if how == "keep":
        return {"keep": keep.float()}
    if how == "lengths":
        return {"lengths": keep.sum(1)}
    if how == "position_ids":  # (-1 at padding: no reading of it as a mask keeps the tokens)
        return {"position_ids": torch.where(keep, keep.long().cumsum(1) - 1, -1)}
    return {"padding_mask": ~keep, "keep": keep.float()}  # (two masks that tell the same: which is read is not told)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("how", "side", "exact"),
    [
        ("padding_mask", "left", True),
        ("padding_mask uint8", "right", True),
        ("src_mask", "right", True),
        ("attention_mask 4d", "left", True),
        ("keep", "left", True),
        ("lengths", "right", False),
        ("position_ids", "left", False),
        ("both", "right", False),
    ],
)
def test_routers_fed_the_tokens_a_mask_of_its_own_keeps_are_exact_or_refused(how: str, side: str, exact: bool) -> None:
    """Once silent: a model that takes the padding out by a mask the capture did not read (under another name, of
    True at padding, of another layout or dtype, the sequences' lengths, positions of -1 at padding) had routers' rows
    fewer than its ids, read as
    a stream of their own, replayed by row order on batches in another order. Where one of the forward's inputs alone
    tells the rows as its kept tokens, the capture keeps their ids: its batches replay exactly (the mask given by name
    or by place), in another order they are refused; where none or two do, the routes are refused, and replay by row
    order only on purpose."""
    model = _MaskOfItsOwn(how)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    keep = keep.flip(1) if side == "left" else keep
    given = _given(how, keep)
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, **given), model(b, **given)]
        routes = session.routes()
        if not exact:
            assert routes.token_ids is None
            with pytest.raises(mr.TokenMismatchError, match="could not keep for every row"):
                with session.replay(routes), torch.no_grad():
                    model(a, **given)
            routes = routes.with_token_ids(None)  # (by row order, on purpose)
        else:
            assert torch.equal(routes.token_ids, torch.cat([a[keep], b[keep]]))
            with pytest.raises(mr.TokenMismatchError):
                with session.replay(routes), torch.no_grad():
                    model(b, **given)
                    model(a, **given)
        with session.replay(routes), torch.no_grad():
            place = how.startswith("padding_mask")  # (its mask the first argument after the ids: by place too)
            got = [model(a, **given), model(b, *given.values()) if place else model(b, **given)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("then", ["one sequence", "another session", "told without padding"])
def test_routers_fed_the_tokens_a_padding_mask_keeps_at_later_forwards_are_exact_or_refused(then: str) -> None:
    """A model given ``padding_mask`` (True at padding) that takes the padding out, its mask found at a padded batch:
    a later forward of one padded sequence (no order runs there), and a capture in a later session on the model, keep
    the ids of the tokens it keeps and replay exactly, in another order refused. Told first at a batch without padding
    (the mask not found: every row a token), later padded batches' routes are refused, never replayed unchecked."""
    model = _MaskOfItsOwn("padding_mask")
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]).bool()
    a, b = _ids(0), _ids(1)
    if then == "one sequence":
        a, b, keep = a[:1], b[:1], keep[:1]
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            first = (
                torch.ones(3, 5, dtype=torch.bool)
                if then == "told without padding"
                else torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
            )
            model(_ids(2), padding_mask=~first)  # (the order told here)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, padding_mask=~keep), model(b, padding_mask=~keep)]
        routes = session.routes()
        if then == "told without padding":
            with pytest.raises(mr.TokenMismatchError, match="could not keep for every row"):
                with session.replay(routes), torch.no_grad():
                    model(a, padding_mask=~keep)
            return
        assert torch.equal(routes.token_ids, torch.cat([a[keep], b[keep]]))
        with session.replay(routes), torch.no_grad():
            got = [model(a, padding_mask=~keep), model(b, padding_mask=~keep)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                model(b, padding_mask=~keep)
                model(a, padding_mask=~keep)


class _LaterUnpadding(_Unpadding):
    """``_Unpadding`` whose first MoE layer sees every position of the batch, and the later ones only the tokens the
    mask keeps (the padding taken out after the first layer)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = (h + self.layers[0](h.reshape(-1, h.shape[-1])).view_as(h))[attention_mask.bool()]
        for layer in self.layers[1:]:
            h = h + layer(h)
        return h


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("side", "device"),
    [
        ("right", "cpu"),
        ("left", "cpu"),
        pytest.param("right", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_routers_fed_the_unpadded_tokens_after_a_router_fed_every_position_replay_their_capture(
    side: str, device: str
) -> None:
    """Once a false refusal: on a model whose first MoE layer sees every position and whose later ones see only the
    tokens the mask keeps, the order told at the first router was batch-major, and the later routers' rows, fewer than
    the ids, were refused as ids lost. The runs go on past the first router and tell the later ones' rows those of the
    kept tokens: each router keeps its own ids, the capture's batches replay exactly, in another order refused (on a
    device, as the block ends: no host sync per forward)."""
    model = _LaterUnpadding().to(device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    mask = (mask.flip(1) if side == "left" else mask).to(device)
    a, b = _ids(0).to(device), _ids(1).to(device)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(a, mask), model(b, mask)]
        routes = session.routes()
        assert torch.equal(routes._router_ids[1], torch.cat([a[mask.bool()], b[mask.bool()]]).cpu())
        with session.replay(routes), torch.no_grad():
            got = [model(a, mask), model(b, mask)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                model(b, mask)
                model(a, mask)
        with pytest.raises(mr.TokenMismatchError):  # (another padding: the later routers' kept tokens differ)
            with session.replay(routes), torch.no_grad():
                model(a, torch.ones_like(mask))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", [True, False])
def test_routes_of_as_many_rows_per_router_on_later_routers_that_see_the_kept_tokens_are_refused(ids: bool) -> None:
    """Routes of one row per position for every router (a capture of the batch without padding, with or without its
    ids), replayed on a padded batch of a model whose later routers see only the tokens the mask keeps: those routers
    would read rows of other tokens (without a word where the replay is not strict). Refused before any router reads;
    the batch they were recorded for replays exactly."""
    model = _LaterUnpadding()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    a = _ids(0)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            model(_ids(2), mask)  # (the order told at a padded batch)
        with session.capture(), torch.no_grad():
            want = model(a, torch.ones_like(mask))
        routes = session.routes()
        routes = routes if ids else routes.with_token_ids(None)
        assert len(set(routes.tokens_per_layer)) == 1  # the premise: as many rows for every router
        # (without ids, the places its capture was fed its mask at, by position, already tell the padding from them)
        with pytest.raises(mr.TokenMismatchError, match="see only the tokens|marks padding where the routes hold"):
            with session.replay(routes, strict=False), torch.no_grad():
                model(a, mask)
        with session.replay(routes), torch.no_grad():
            assert torch.equal(model(a, torch.ones_like(mask)), want)


def _steps(model, cache: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    """A forward over ``ids`` given ``cache``, then one per new token (greedy): ``new`` tokens appended."""
    name = pytest.importorskip("tests.tiny_hf").cache_kwarg(model)
    out = model(ids, use_cache=True, **{name: cache})
    seq = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    for _ in range(new - 1):
        out = model(seq[:, -1:], use_cache=True, **{name: cache})
        seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
    return seq


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("how", ["crop", "static crop", "reset", "static reset", "between blocks"])
def test_tokens_taken_out_of_a_cache_before_later_forwards_are_noted(how: str) -> None:
    """Once silent: a decode loop that takes tokens its captured forwards had put in its KV cache out of it (crop, or
    reset and a new loop of one-token prompts on the same cache, or a crop between two capture() blocks that add to one
    capture) and runs on has rows of tokens no sequence kept among the rows of those it kept, and the row counts of one
    loop. Noted from the tokens the cache holds before and after the call (a static cache's counts read with the
    routes), and split_generation refuses it; the methods are the cache's own again after the capture."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    if how == "static crop" and not tiny_hf.static_cache_crops():
        pytest.skip("this transformers version's StaticCache has no crop")
    model = tiny_hf.build("mixtral")
    prompt = _prompt()[:, :1]  # (one-token prompts: a second loop has the row counts of more decode steps)
    if how.startswith("static"):
        cache = tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=4 * N)
    else:
        cache = tiny_hf.transformers.DynamicCache(config=model.config)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            seq = _steps(model, cache, prompt, N)
            if how.endswith("crop"):
                cache.crop(-2)
            elif how.endswith("reset"):
                cache.reset()
                if cache.get_seq_length() != 0:  # (5.17's DynamicCache.reset zeroes its tensors, keeping their length)
                    pytest.skip("this transformers version's reset() takes no token out of the cache")
        if how == "between blocks":
            cache.crop(-2)
        with session.capture(clear=False):
            _steps(model, cache, seq[:, -3:-2] if how.endswith("crop") or how == "between blocks" else prompt, N)
        capture = session.routes()
        assert capture._call_rows == ((B, 2 * N),)  # the premise: the row counts of one loop of 2N tokens
        assert capture._rows_moved is not None and capture._rows_moved.startswith(type(cache).__name__)
        with pytest.raises(mr.RoutesValidationError, match=r"taken out of it .*later forwards went on"):
            mr.split_generation(capture, batch_size=B, prompt_len=1)
    assert not {"crop", "reset", "reorder_cache"} & set(vars(cache))


@pytest.mark.reliability("bad inputs")
def test_a_static_cache_emptied_before_the_capture_begins_a_loop_again() -> None:
    """Once silent: a static cache emptied (reset()) before the capture and given to a second decode loop in it was
    read as holding tokens, because its count, read when the routes were, had grown in place since: the second loop
    was taken for a continuation of the first. Its count is copied as the loop begins."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("mixtral")
    prompt = _prompt()[:, :1]
    static = tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=2 * N)
    with torch.no_grad():
        _steps(model, static, prompt, 2)  # (used before: its layers hold their count as a tensor)
    static.reset()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            _steps(model, tiny_hf.transformers.DynamicCache(config=model.config), prompt, N)
            _steps(model, static, prompt, N)
        capture = session.routes()
        assert capture._call_rows == ((B, 2 * N),)
        with pytest.raises(mr.RoutesValidationError, match="a new StaticCache that held no tokens"):
            mr.split_generation(capture, batch_size=B, prompt_len=1)


_EMBED_RNG = torch.Generator().manual_seed(21)  # drawn from by _NoisyEmbedding("a global")


class _Sampler:
    """Noise from a generator kept in a dict of its own (held by the module in a dict: read by no chain of the code)."""

    def __init__(self) -> None:
        self.state = {"generator": torch.Generator().manual_seed(24)}

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.state["generator"])


def _noise(x: torch.Tensor) -> torch.Tensor:
    """Noise from a global generator, four calls down (deeper than the code is read)."""
    return _noise_1(x)


def _noise_1(x: torch.Tensor) -> torch.Tensor:
    return _noise_2(x)


def _noise_2(x: torch.Tensor) -> torch.Tensor:
    return _noise_3(x)


def _noise_3(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape, generator=_DEEP_RNG)


_DEEP_RNG = torch.Generator().manual_seed(25)


class _NoisyEmbedding(torch.nn.Embedding):
    """Embeddings with noise added in the forward (NEFTune-like), drawn from a generator of its own, a global one,
    one its class holds, or one its code reaches through containers or calls."""

    class_rng = torch.Generator().manual_seed(22)

    def __init__(self, where: str) -> None:
        super().__init__(128, 64)
        self.where = where
        self.rng = torch.Generator().manual_seed(23)
        self.tools = {"noise": _Sampler()}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        if self.where == "held by the module":
            noise = torch.randn(x.shape, generator=self.rng)
        elif self.where == "a global":
            noise = torch.randn(x.shape, generator=_EMBED_RNG)
        elif self.where == "the class's":
            noise = torch.randn(x.shape, generator=_NoisyEmbedding.class_rng)
        elif self.where == "in a container":
            noise = self.tools["noise"].draw(x)
        else:
            noise = _noise(x)
        return x + 0.05 * noise


class _NoisySequenceFirst(_SequenceFirst):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.embed = _NoisyEmbedding(where)
        torch.nn.init.normal_(self.embed.weight, std=0.1)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("where", ["held by the module", "a global", "the class's", "in a container", "calls down"])
def test_noise_from_a_generator_before_the_routers_leaves_the_token_order_told(where: str) -> None:
    """Once silent: the token-order runs reset only the global random state between them, so noise drawn from another
    generator before the first router (a module's own, a global one) changed every row of the second run, the order
    was untold and read batch-major, and routes laid out batch-major were forced on a model whose routers see the
    tokens sequence-first. The generators are now set back between the runs and after them: the order is told, and
    the block's forward draws the noise a forward without a session draws."""
    model = _NoisySequenceFirst(where).eval()
    rngs = [model.embed.rng, _EMBED_RNG, _NoisyEmbedding.class_rng, model.embed.tools["noise"].state["generator"]]
    rngs.append(_DEEP_RNG)
    start = [g.get_state() for g in rngs]
    ids = _batch(rows=2, width=4)
    with torch.no_grad():
        want = model(ids)  # (a forward without a session, and what it leaves)
    plain = [g.get_state() for g in rngs]
    for g, state in zip(rngs, start, strict=True):
        g.set_state(state)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = model(ids)
        assert all(torch.equal(g.get_state(), s) for g, s in zip(rngs, plain, strict=True))
        assert torch.equal(got, want)
        native = session.routes()
        assert torch.equal(native.token_ids, ids.t().reshape(-1))  # (each row's own token: sequence-first)
        parts = []
        for row in ids:  # (each sequence alone: one row, no order to tell)
            with session.capture():
                model(row[None])
            parts.append(session.routes())
        with session.replay(native):
            model(ids)
        with pytest.raises(mr.TokenMismatchError, match="sequence-first"), session.replay(mr.pad_routes(parts)):
            model(ids)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed", ["ids", "embeddings"])
def test_batch_major_routes_without_ids_are_not_forced_on_routers_that_see_the_batch_sequence_first(fed: str) -> None:
    """An engine's per-sequence routes of a [2, 4] batch, joined sequence by sequence and read without their token
    ids, replayed on a model whose routers see the batch position by position: either refused, or every token gets
    its own recorded experts (as a capture of the batch records them). Once silent fed embeddings: the order of a
    forward fed embeddings was not told, and the rows were forced on other tokens."""
    model = _EmbedsSequenceFirst().eval()
    ids = _batch(rows=2, width=4)

    def forward() -> torch.Tensor:
        return model(ids) if fed == "ids" else model(inputs_embeds=model.embed(ids))

    with mr.attach(model) as session, torch.no_grad():
        alone = []
        for row in ids:  # (one sequence: no order to tell)
            with session.capture():
                model(row[None])
            alone.append(session.routes())
        engine = mr.Routes.cat(alone).with_token_ids(None)
        try:  # (the model's first forward of two sequences: the order is told here)
            with session.capture(), session.replay(engine):
                forward()
        except mr.MoEReplayError:
            return
        forced = session.routes()
        with session.capture():
            model(ids)
        assert forced.equal(session.routes())


@pytest.mark.reliability("silent replays")
def test_routes_without_ids_refused_on_routers_that_see_the_batch_sequence_first_say_how_to_replay_them() -> None:
    """Routes that know neither their token ids nor their tokens' order, replayed on a [2, 4] batch whose routers see
    it sequence-first, are refused before any router runs, the model left as it was; given their ids, they are
    checked, and laid out in the routers' order as the error says, they replay what a capture of the batch records."""
    from tests.conftest import assert_untouched, snapshot

    model = _SequenceFirst().eval()
    before = snapshot(model)
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        alone = []
        for row in ids:
            with session.capture():
                model(row[None])
            alone.append(session.routes())
        with session.capture():
            model(ids)
        captured = session.routes()
        laid_out = mr.Routes.cat(alone)  # (sequence by sequence, as an engine's)
        engine = laid_out.with_token_ids(None)
        index = torch.arange(ids.numel()).view(ids.shape).t().reshape(-1)
        for routes in (engine, mr.BatchLayout.padded([4, 4]).routes([engine[:4], engine[4:]])):
            with pytest.raises(mr.TokenMismatchError, match=r"with_token_ids.*routes\[index\]"):
                with session.replay(routes):
                    model(ids)
        with (
            pytest.raises(mr.TokenMismatchError, match="sequence-first"),
            session.replay(engine.with_token_ids(laid_out.token_ids)),
        ):
            model(ids)
        with session.capture(), session.replay(engine.with_token_ids(laid_out.token_ids)[index]):
            model(ids)
        assert session.routes().equal(captured)
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["picked", "picked, saved", "run", "joined", "saved"])
def test_a_sequence_first_captures_rows_put_in_another_order_without_ids_are_not_forced_on_other_tokens(
    how: str, tmp_path: Path
) -> None:
    """Once silent: a sequence-first capture's rows, their ids dropped, kept their tokens' order through a pick by a
    list (the sequences swapped by a batch-major index, which the rows do not follow), so a replay of them took them
    for rows in the order the routers see the batch and forced other tokens' experts on the swapped batch. Either
    refused, or every token gets its own recorded experts (as a capture of that batch records them); a run of the
    capture's rows, routes joined from such runs and the capture saved and loaded keep replaying in the routers'
    order."""
    model = _SequenceFirst().eval()
    ids = _batch(rows=2, width=4)
    fed = ids.flip(0) if how.startswith("picked") else ids
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes().with_token_ids(None)
        with session.capture():
            model(fed)
        native = session.routes()
        if how.startswith("picked"):  # (the sequences swapped as if the rows were laid out sequence by sequence)
            routes = routes[torch.arange(ids.numel()).view(ids.shape).flip(0).reshape(-1)]
        elif how == "run":
            routes = routes[0:]
        elif how == "joined":
            routes = mr.Routes.cat([routes[:4], routes[4:]])
        if how.endswith("saved"):
            routes.save(tmp_path / "routes.npz")
            routes = mr.Routes.load(tmp_path / "routes.npz")
        assert routes._token_rank is not None
        try:
            with session.capture(), session.replay(routes):
                model(fed)
        except mr.TokenMismatchError:
            assert how.startswith("picked")
            return
        assert session.routes().equal(native)


class _EmbedsSequenceFirst(_SequenceFirst):
    """:class:`_SequenceFirst` fed ids or embeddings."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = (self.embed(input_ids) if inputs_embeds is None else inputs_embeds).transpose(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(0, 1))


class _Held:
    """A KV cache as far as the order of the tokens goes: it counts the tokens the forwards given it put in."""

    def __init__(self, held: int = 0) -> None:
        self.held = held

    def get_seq_length(self) -> int:
        return self.held


class _CachedLayout(_EmbedsSequenceFirst):
    """:class:`_EmbedsSequenceFirst` given a KV cache (its tokens come before those fed, and change no row here), its
    blocks run sequence-first or, ``sequence_first=False``, batch-major."""

    def __init__(self, sequence_first: bool = True) -> None:
        super().__init__()
        self.sequence_first = sequence_first

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: _Held | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if past_key_values is not None:
            past_key_values.held += x.shape[1]
        x = x.transpose(0, 1) if self.sequence_first else x
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(0, 1) if self.sequence_first else x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("sequence_first", [True, False], ids=["sequence-first", "batch-major"])
@pytest.mark.parametrize("feed", ["embeddings", "embeddings after ids", "ids, empty cache", "embeddings, empty cache"])
def test_the_order_routers_see_a_batch_in_is_told_for_embeddings_and_for_a_prompt_given_an_empty_cache(
    feed: str, sequence_first: bool
) -> None:
    """Once silent: the order in which the routers see a [2, 4] batch was told from its ids alone, in a forward given
    no cache. A forward fed embeddings after a forward that told it sequence-first kept no place per row (its rows
    were laid out batch-major, each sequence getting the other's rows, and a replay of its own capture was refused);
    one given an empty cache (a prompt's, as generate() gives it) was read batch-major, ids and all. The order is now
    told by changing one token's embedding as one token's id, and with the empty cache left out of the runs that
    tell it (which fill no cache the forward is given): each sequence gets the rows a capture of it alone records,
    on routers that see the batch either way, and the capture replays exactly."""
    from tests.conftest import assert_untouched, snapshot

    model = _CachedLayout(sequence_first).eval()
    before = snapshot(model)
    ids = _batch(rows=2, width=4)
    cache = _Held() if "cache" in feed else None

    def forward() -> torch.Tensor:
        if feed.startswith("embeddings"):
            return model(inputs_embeds=model.embed(ids), past_key_values=cache)
        return model(ids, past_key_values=cache)

    with mr.attach(model) as session, torch.no_grad():
        alone = []
        for row in ids:  # (one sequence: no order to tell)
            with session.capture():
                model(row[None])
            alone.append(session.routes())
        if feed == "embeddings after ids":
            with session.capture():
                model(ids)
        with session.capture():
            out = forward()
        routes = session.routes()
        assert cache is None or cache.held == 4  # (given to the forward once)
        for got, want, row in zip(mr.BatchLayout.padded([4, 4]).unpack(routes), alone, ids, strict=True):
            assert got.equal(want)
            assert feed.startswith("embeddings") or torch.equal(got.token_ids, row)
        if cache is not None:
            cache.held = 0
        with session.capture(), session.replay(routes):
            replayed = forward()
        assert session.routes().equal(routes) and torch.equal(replayed, out)
    assert_untouched(model, before)
    tried(2)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a forward given a KV cache that already holds tokens, before any forward told the order, is read "
    "batch-major: on routers that see the batch sequence-first the rows of one fed ids get other tokens' ids, and are "
    "laid out and checked in that order; routes laid out batch-major are forced unchecked on one fed embeddings",
)
@pytest.mark.parametrize("fed", ["ids", "embeddings"])
def test_a_batch_given_a_cache_that_holds_tokens_on_routers_that_see_it_sequence_first_is_exact_or_refused(
    fed: str,
) -> None:
    """A [2, 4] batch fed ids (or embeddings) with a cache that already holds tokens (a prompt's second chunk, a
    reused prefix), the first forward of the model: runs without the cache would see other rows, so the order is not
    told. Laid out sequence by sequence, each sequence gets the rows a capture of it alone records, and those rows
    laid out batch-major replay as the batch's own capture records; or either is refused."""
    model = _CachedLayout().eval()
    ids = _batch(rows=2, width=4)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if fed == "ids":
            return model(x, past_key_values=_Held(3))
        return model(inputs_embeds=model.embed(x), past_key_values=_Held(3))

    with mr.attach(model) as session, torch.no_grad():
        alone = []
        for row in ids:  # (one sequence: no order to tell)
            with session.capture():
                forward(row[None])
            alone.append(session.routes())
        with session.capture():
            forward(ids)
        routes = session.routes()
        try:
            with session.capture(), session.replay(mr.Routes.cat(alone)):
                forward(ids)
            forced: mr.Routes | None = session.routes()
        except mr.MoEReplayError:
            forced = None
    assert forced is None or forced.equal(routes)  # (each token forced its own experts: what it routes natively)
    try:
        parts = mr.BatchLayout.padded([4, 4]).unpack(routes)
    except mr.MoEReplayError:
        return
    assert all(got.equal(want) for got, want in zip(parts, alone, strict=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", ["ids dropped", "fed embeddings", "batch-major model", "one sequence"])
def test_routes_without_ids_in_the_order_the_routers_saw_the_tokens_keep_replaying(case: str) -> None:
    """Routes without token ids that are in the order the routers see the batch replay as before: a sequence-first
    capture's with its ids dropped, a capture of forwards fed embeddings (whose order is not told), an engine's
    sequence-by-sequence routes on routers that see the batch batch-major, and one sequence in any order. (Fed
    embeddings with a cache that held tokens: their order is not told.)"""
    model = _Layout() if case == "batch-major model" else _CachedLayout().eval()
    ids = _batch(rows=1 if case == "one sequence" else 2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        if case == "fed embeddings":
            with session.capture():
                model(inputs_embeds=model.embed(ids), past_key_values=_Held(1))
            routes = session.routes()
            untold = routes._token_rank is not None and bool((routes._token_rank == UNTOLD_RANK).all())
            assert routes._token_ids is None and untold and routes._order_untold  # (each row marked, all in order)
        elif case == "batch-major model":
            parts = []
            for row in ids:
                with session.capture():
                    model(row[None])
                parts.append(session.routes())
            routes = mr.Routes.cat(parts).with_token_ids(None)
        else:
            with session.capture():
                model(ids)
            routes = session.routes().with_token_ids(None)
        with session.capture():
            model(ids)
        captured = session.routes()
        with session.capture(), session.replay(routes):
            model(ids)
        assert session.routes().equal(captured)


@pytest.mark.reliability("round trips")
def test_routes_of_an_embeddings_capture_keep_replaying_once_sliced_joined_saved_or_split(tmp_path) -> None:
    """Once a false refusal: routes of a capture fed embeddings (their rows in the order the routers saw the tokens,
    which no one told) lost that mark when sliced, picked, joined, saved or split, and a replay of them with ids on
    routers that see a [2, 4] batch sequence-first was refused. Whole forwards, in their order, replay exactly as a
    capture of the same forwards records them; rows cut through a forward or put out of order are refused. (Fed with a
    cache that held tokens: no order told.)"""
    model = _CachedLayout().eval()
    first, second = _batch(rows=2, width=4), _batch(seed=1, rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for ids in (first, second):  # (given a cache that holds tokens: the order is not told)
                model(inputs_embeds=model.embed(ids), past_key_values=_Held(1))
        routes = session.routes()
        assert routes._order_untold and routes._token_ids is None
        with session.capture():
            model(first)
            model(second)
        native = session.routes()
        routes.save(tmp_path / "r.npz")
        mask = torch.arange(routes.num_tokens) >= 8
        swap = torch.cat([torch.arange(8, 16), torch.arange(8)])
        derived = {  # (the derived routes, the forwards they are for, the rows of the capture they hold)
            "slice": (routes[8:], [second], slice(8, None)),
            "mask": (routes[mask], [second], slice(8, None)),
            "whole forwards swapped": (routes[swap], [second, first], swap),
            "cat": (mr.Routes.cat([routes[:8], routes[8:]]), [first, second], slice(None)),
            "saved and loaded": (mr.Routes.load(tmp_path / "r.npz"), [first, second], slice(None)),
            "split_routes": (mr.distributed.split_routes(routes, [8, 8])[0], [first], slice(None, 8)),
        }
        for name, (part, forwards, rows) in derived.items():
            with session.capture(), session.replay(part):
                for ids in forwards:
                    model(ids)
            assert session.routes().equal(native[rows]), name
        # rows that break a forward are no longer in the routers' order of any forward: refused, as without the mark
        for part in (routes[4:12], routes[torch.arange(7, -1, -1)]):  # (cut through the forwards; one reversed)
            with pytest.raises(mr.TokenMismatchError, match="sequence-first"), session.replay(part):
                model(first)
    tried(len(derived) + 2)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("told", [True, False], ids=["order told", "order untold"])
def test_a_cut_of_an_embeddings_capture_replayed_on_a_forward_of_another_shape_is_exact_or_refused(told: bool) -> None:
    """Once silent: a [2, 4] batch fed embeddings to routers that see it sequence-first, its routes cut in two by
    split_routes (as a rank's share), replayed on the first sequence alone: its rows are positions 0 and 1 of both
    sequences, and they were forced on positions 0-3 of the first, strict or not. Rows that know their place in their
    tokens' order are checked against each forward's order now (a [2, 2] batch of those positions replays them
    exactly); rows of an order not told, cut from their forward, are refused."""
    model = _CachedLayout().eval()
    embeds = model.embed(_batch(rows=2, width=4)).detach()
    cache = {} if told else {"past_key_values": _Held(3)}  # (a cache that holds tokens: the order is not told)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(inputs_embeds=embeds, **cache)
        part = mr.distributed.split_routes(session.routes(), [4, 4])[0]
        with session.capture():
            model(inputs_embeds=embeds[:1])
        own = session.routes()  # (what the first sequence's tokens chose, alone: the rows it must be given)
        for strict in (True, False):
            try:
                with session.capture(), session.replay(part, strict=strict):
                    model(inputs_embeds=embeds[:1])
            except mr.TokenMismatchError:
                continue
            assert session.routes().equal(own), "other tokens' rows were forced"
        if told:  # (the positions the rows hold, of both sequences: the forward they fit, replayed exactly)
            with session.capture():
                model(inputs_embeds=embeds[:, :2])
            own = session.routes()
            assert own.equal(part)
            with session.capture(), session.replay(part):
                model(inputs_embeds=embeds[:, :2])
            assert session.routes().equal(own)


class _TransposedLater(torch.nn.Module):
    """A first MoE block on the batch as fed (batch-major), a second on it transposed (sequence-first): as a decoder's
    canvas as long as the input but laid out otherwise, or any later layer that sees the tokens in another order."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.embed = torch.nn.Embedding(128, 16)
        self.first, self.later = mr.models.MoEBlock(cfg), mr.models.MoEBlock(cfg)
        g = torch.Generator().manual_seed(0)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.5, generator=g)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.first(h)
        return h + self.later(h.transpose(0, 1).contiguous()).transpose(0, 1)


@pytest.mark.reliability("silent replays")
def test_a_later_router_that_sees_the_tokens_in_another_order_than_the_first_is_exact_or_refused() -> None:
    """Once silent: the runs that tell the order routers see a batch in stopped at the first router, so a later router
    that sees the tokens in another order (a transposed batch) had its rows labelled with the first router's ids, and
    one sequence's rows cut from a batch's capture, replayed on that sequence alone, passed the check and forced other
    sequences' experts on it. The runs go on past the first router: such routes know no ids and are refused (cut or
    whole); rows without ids are refused on such a batch; the capture's own forward replays by row order on purpose,
    and one sequence a forward replays checked."""
    model = _TransposedLater()
    a = _batch(1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            full = model(a)
        routes = session.routes()
        want = model(a[1:2])  # (each sequence's routing is its own: the batch's rows of it are what it chooses)
        try:
            with session.replay(routes[a.shape[1] : 2 * a.shape[1]]):
                got = model(a[1:2])
            assert torch.equal(got, want)
        except mr.MoEReplayError:
            pass
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(a)
        with pytest.raises(mr.TokenMismatchError, match="more than one order"):
            with session.replay(mr.Routes(routes.per_layer(), names=routes.names, num_experts=8)):
                model(a)
        with session.replay(routes.with_token_ids(None)):
            assert torch.equal(model(a), full)
        with session.capture():
            alone = [model(a[i : i + 1]) for i in range(2)]
        routes = session.routes()
        assert torch.equal(routes.token_ids, a[:2].reshape(-1))
        with session.replay(routes):
            assert all(torch.equal(model(a[i : i + 1]), alone[i]) for i in range(2))


class _LaterLayout(_TransposedLater):
    """``_TransposedLater`` whose layer between its MoE blocks is ``how``: it reverses the batch (``flip``), the first
    block sees the batch transposed and the later one as fed (``first transposed``), or it mixes each sequence's
    positions (``within``: the mean of the sequence added, as attention that looks both ways does)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.how == "flip":
            h = h + self.first(h)
            return h + self.later(h.flip(0)).flip(0)
        if self.how == "first transposed":
            h = h + self.first(h.transpose(0, 1).contiguous()).transpose(0, 1)
            return h + self.later(h)
        h = h + self.first(h)
        h = h + h.mean(dim=1, keepdim=True)
        return h + self.later(h)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["flip", "first transposed", "within"])
def test_a_later_router_in_another_order_is_refused_and_one_in_the_same_replays(how: str) -> None:
    """A later router that sees the batch reversed, or as fed after a first router that saw it transposed, is told
    apart from the first: its routes are refused, cut or whole (by row order, on purpose, they replay exactly). Where a
    layer between them mixes each sequence's own positions only, the order is the same: a cut replays exactly."""
    model = _LaterLayout(how)
    a = _batch(1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            full = model(a)
        routes = session.routes()
        cut = routes[a.shape[1] : 2 * a.shape[1]] if how != "first transposed" else routes
        want = model(a[1:2])
        if how == "within":
            assert torch.equal(routes.token_ids, a.reshape(-1))
            with session.replay(cut):
                assert torch.equal(model(a[1:2]), want)
            return
        assert routes.token_ids is None
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(cut):
                model(a[1:2] if how != "first transposed" else a)
        with session.replay(routes.with_token_ids(None)):
            assert torch.equal(model(a), full)


@pytest.mark.reliability("silent replays")
def test_a_decoder_canvas_as_long_as_one_forwards_tokens_replays() -> None:
    """Once a false refusal: the decoder of ``_Canvas`` routes three rows per sequence; one forward is fed three
    tokens per sequence, the other six. Its calls are as long as the first forward's tokens by chance, and the
    capture said its ids were lost (as for a call on part of a forward's tokens). The other forward tells it routes a
    stream of its own: the capture's order replays exactly, the encoder's rows checked (the other order refused)."""
    torch.manual_seed(0)
    model = _Canvas()
    a, b = _batch(1, width=3), _batch(2)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = [model(a), model(b)]
        routes = session.routes()
        with session.replay(routes):
            got = [model(a), model(b)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes):
                model(_batch(3, width=3))


class _FirstOnly(torch.nn.Module):
    """Two MoE blocks, on every sequence of the batch or (``first``) on the first one, and two, sequences alone."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        self.embed = torch.nn.Embedding(128, 16)
        self.blocks = torch.nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        self.first = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return torch.cat([block(h[: i + 1] if self.first else h) for i, block in enumerate(self.blocks)])


@pytest.mark.reliability("silent replays")
def test_routers_each_called_on_part_of_a_forwards_tokens_alone_are_refused_not_replayed_unchecked() -> None:
    """A forward that calls each router on a part of its tokens alone (other parts) tells no router's rows apart
    from checked ones (none is): the ids are lost, and a replay is refused, not taken unchecked."""
    model = _FirstOnly()
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(a)
            model.first = True
            model(b)
        routes = session.routes()
        assert len(set(routes.tokens_per_layer)) == 2  # the premise: the routers' calls differ
        with pytest.raises(mr.TokenMismatchError, match="could not keep for every row"):
            with session.replay(routes):
                model(b)


@pytest.mark.reliability("silent replays")
def test_a_decoder_canvas_of_as_many_rows_in_all_replays_by_row_order_alone() -> None:
    """Once a false refusal: the decoder of ``_Canvas`` routes as many rows in all as each encoder router (12 then
    18, beside 24 then 6), so a replay by row order alone (the check dropped, or an engine's rows) took it for routers
    out of step at the second forward. A router that a forward read other row counts than its tokens routes a stream
    of its own: the capture's forwards replay exactly; the encoders are still checked to be in step."""
    torch.manual_seed(0)
    model = _Canvas()
    a, b = _batch(1, rows=4, width=6), _batch(2, rows=6, width=1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            want = [model(a), model(b)]
        routes = session.routes()
        assert len(set(routes.tokens_per_layer)) == 1  # the premise: as many rows each
        rows = mr.Routes(routes.per_layer(), names=routes.names, num_experts=routes.experts_per_layer)
        for kept in (routes.with_token_ids(None), rows):
            with session.replay(kept):
                got = [model(a), model(b)]
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError, match="out of step"):
            with session.replay(rows, strict=False):
                try:
                    model(a, fail=True)
                except RuntimeError:
                    pass
                model(a)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("first", ["ones", "no mask", "earlier session"])
def test_routers_fed_the_unpadded_tokens_told_first_without_padding_are_checked_on_padded_batches(first: str) -> None:
    """Once silent: the token order is told once per model and kept; told at a forward without padding (a mask of all
    ones, or none) the routers of a model that takes the padding out see its tokens as batch-major ones, and later
    padded forwards gave them fewer rows than ids: their ids were dropped, and a replay of the padded batches in
    another order was forced unchecked. A padded forward of such a level tells the order again (or its routes are
    refused): the capture's batches replay exactly, the batches in another order are refused."""
    model = _Unpadding()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    ones = torch.ones_like(mask)
    a, b = _ids(0), _ids(1)

    def unpadded() -> None:  # (the first forward this model is probed at: no padding)
        model(a, ones if first != "no mask" else None)

    if first == "no mask":
        inner = model.forward
        model.forward = lambda input_ids, attention_mask=None: inner(  # type: ignore[method-assign]
            input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask
        )
    if first == "earlier session":
        with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
            with session.capture(), torch.no_grad():
                unpadded()
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            if first != "earlier session":
                unpadded()
            want = [model(a, mask), model(b, mask)]
        routes = session.routes()
        with session.replay(routes), torch.no_grad():  # the capture's batches: exact
            if first != "earlier session":
                unpadded()
            got = [model(a, mask), model(b, mask)]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.MoEReplayError):  # the padded batches in another order: refused, never forced unchecked
            with session.replay(routes), torch.no_grad():
                if first != "earlier session":
                    unpadded()
                model(b, mask)
                model(a, mask)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("told_before", [False, True])
def test_routers_fed_the_unpadded_tokens_at_a_forward_whose_order_is_not_told_are_refused(told_before: bool) -> None:
    """Once silent: where the token-order runs cannot run at a padded forward (here its first sequence holds one token;
    a cache that holds tokens, several processes) of a model that takes the padding out, its routers' rows are fewer
    than its ids, which were dropped: a replay of its batches in another order was forced unchecked. Such routes now
    say why their ids are lost, and a replay of them is refused; so too after an order told at a forward without
    padding (``told_before``), which such a forward cannot tell again."""
    model = _Unpadding()
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    a, b = _ids(0), _ids(1)
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            if told_before:
                model(_ids(2), torch.ones_like(mask))
            model(a, mask)
            model(b, mask)
        routes = session.routes()
        assert routes.token_ids is None  # (the premise: no rows one per token fed)
        with pytest.raises(mr.MoEReplayError, match="as many as the tokens its attention mask keeps"):
            with session.replay(routes), torch.no_grad():
                if told_before:
                    model(_ids(2), torch.ones_like(mask))
                model(b, mask)
                model(a, mask)
        with session.replay(routes.with_token_ids(None)), torch.no_grad():  # (by row order, on purpose)
            if told_before:
                model(_ids(2), torch.ones_like(mask))
            model(a, mask)
            model(b, mask)


def _one_padded(model: torch.nn.Module, swap: bool = False) -> list[torch.Tensor]:
    """Two forwards of one left-padded sequence each (``swap``: in the other order)."""
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    pair = [_ids(0)[:1], _ids(1)[:1]]
    return [model(ids, mask) for ids in (pair[::-1] if swap else pair)]


@pytest.mark.reliability("silent replays")
def test_one_padded_sequence_at_a_level_never_told_unpadded_keeps_the_ids_its_routers_saw() -> None:
    """Once silent: one sequence with padding cannot tell the token order (every order is the same but for the padding
    a model may take out), and was read batch-major: the routers of a model that takes the padding out saw fewer rows,
    the ids were dropped and a replay of the forwards in another order was forced unchecked. The rows its routers were
    called on tell which: the capture keeps the ids of the tokens its mask keeps, and a replay in another order is
    refused; a later session on the model, told the order at a padded batch, replays the capture exactly."""
    model = _Unpadding()
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = _one_padded(model)
        routes = session.routes()
        assert torch.equal(routes.token_ids, torch.cat([_ids(0)[:1, 2:], _ids(1)[:1, 2:]]).reshape(-1))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                _one_padded(model, swap=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            model(_ids(2), mask)  # (a padded batch: the order told)
        with session.replay(routes), torch.no_grad():
            got = _one_padded(model)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                _one_padded(model, swap=True)


class _MaybeUnpadding(_Unpadding):
    """``_Unpadding`` that takes the padding out unless ``every`` is set (then its routers see every position)."""

    every = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h.reshape(-1, h.shape[-1]) if self.every else h[attention_mask.bool()]
        for layer in self.layers:
            h = h + layer(h)
        return h


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("side", ["left", "right"])
def test_one_padded_sequence_replayed_at_a_level_never_told_unpadded_replays(side: str) -> None:
    """Once a false refusal: the capture's forwards of one padded sequence each, at a level never told that its routers
    see only the tokens the mask keeps, replayed in the same session: each replay forward's ids were compared as read
    batch-major (all of them, padding included), not as the rows its routers read. Rows recorded for the kept tokens
    alone are compared with those: exact; in another order, refused; and a forward whose routers read every position
    of such rows is refused as it reads past them."""
    model = _MaybeUnpadding()
    mask = torch.tensor([[0, 0, 1, 1, 1]] if side == "left" else [[1, 1, 1, 0, 0]])
    pair = [_ids(0)[:1], _ids(1)[:1]]
    with mr.attach(model, include="layers.*", top_k=2, num_experts=8) as session:
        with session.capture(), torch.no_grad():
            want = [model(ids, mask) for ids in pair]
        routes = session.routes()
        with session.replay(routes), torch.no_grad():
            got = [model(ids, mask) for ids in pair]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                for ids in pair[::-1]:
                    model(ids, mask)
        model.every = True
        with pytest.raises(mr.MoEReplayError):
            with session.replay(routes, strict=False), torch.no_grad():
                model(pair[0], mask)


@pytest.mark.reliability("silent replays")
def test_the_routers_whose_ids_a_capture_kept_replay_checked_without_the_one_that_lost_them(tmp_path: Any) -> None:
    """Once a false refusal: a router also called inside the forward on a part of its tokens loses its rows' ids,
    and the capture kept no other router's either, so routes of the other routers alone (select) were refused as
    lost too. Each router's ids are kept where they can be, the lost router's rows marked as such: the others alone
    replay, checked against their tokens (another order refused), through a file, cat and slices; any routes that
    hold the lost router's rows are refused as before."""
    model = mr.models.build("softmax_topk", num_layers=2)
    router, hidden = model.layers[0].mlp.router, model.config.hidden_size

    def aside(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:  # (its output replaces nothing)
        router(args[0].reshape(-1, hidden)[:5])

    model.layers[1].register_forward_hook(aside)
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(a)
            model(b)
        routes = session.routes()
        lost, kept = routes.names
        other = routes.select([kept])
        other.save(tmp_path / "other.npz")
        n = a.numel()
        for given in (other, mr.Routes.load(tmp_path / "other.npz"), mr.Routes.cat([other[:n], other[n:]])):
            assert given._ids_lost is None
            with session.replay(given, strict=False), torch.no_grad():
                model(a)
                model(b)
            with pytest.raises(mr.TokenMismatchError, match="other tokens"):
                with session.replay(given, strict=False), torch.no_grad():
                    model(b)
                    model(a)
        for given in (routes, routes.select([lost]), routes.select([kept, lost]), mr.Routes.cat([routes, routes])):
            with pytest.raises(mr.TokenMismatchError, match="could not keep for every row"):
                with session.replay(given, strict=False), torch.no_grad():
                    model(a)
                    model(b)
    tried(9)


class _NoGradStatistic(mr.models.MoEBlock):
    """An MoE block that, in a forward without gradients only (an evaluation pass), keeps which experts its router's
    logits rank first, by a top-k of its own outside the router: a decision-like call no training forward makes."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            logits = hidden.reshape(-1, hidden.shape[-1]) @ self.router.weight.t()
            self.ranked = torch.topk(logits, self.top_k, dim=-1).indices
        return super().forward(hidden)


class _TwoNoGradBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(num_experts=8, top_k=2)
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 64)
        self.blocks = torch.nn.ModuleList([_NoGradStatistic(cfg) for _ in range(2)])
        self.head = torch.nn.Linear(64, 128)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.reliability("silent replays")
def test_the_token_order_runs_are_not_judged_as_the_forward_by_the_orphan_watch() -> None:
    """Once falsely refused, and slower: the watch of a block's first forward for decisions outside every router judged
    the calls of the token-order runs too (run without gradients, before the forward), so a top-k outside the routers
    that only a forward without gradients makes refused a training forward that never made it. The watch now judges
    the forward's own calls: the training capture passes (its order told, its routes exact), and a forward without
    gradients, which makes that top-k, is still refused."""
    model = _TwoNoGradBlocks()
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session:
        with session.capture():
            model(ids).sum().backward()
        routes = session.routes()
    assert torch.equal(routes.token_ids, ids.reshape(-1))  # (the order told: batch-major)
    with mr.attach(model) as session, session.replay(routes):
        model(ids).sum().backward()
    other = _TwoNoGradBlocks()
    with (
        mr.attach(other) as session,
        pytest.raises(mr.UnsupportedRouterError, match="topk over 8"),
        session.capture(),
        torch.no_grad(),
    ):
        other(ids)


def test_a_levels_placing_flag_follows_the_checks_that_may_lose_the_hosts_place_in_their_rows() -> None:
    """An eager forward of a replay asks the checks it entered where its rows begin only where its level's flag says
    one may need it: set while a check of each router's own rows watches it or a check lost the host's place in its
    rows (whichever stops first), clear once none of them watches it, and never set by a check that keeps its place."""
    from moe_replay._feeds import FeedCheck, FeedForward, RouterFeedCheck

    level = FeedForward(torch.nn.Linear(2, 2), None)
    kept = FeedCheck(torch.zeros(4, dtype=torch.long), lambda: 0)
    stop_kept = kept.start([level], [])
    assert not level.placing
    own = RouterFeedCheck({})
    stop_own = own.start([level], [])
    assert level.placing  # (a check of each router's own rows)
    kept._open()  # (the host lost its place in the rows of the other)
    stop_own()
    assert level.placing  # (the check that lost its place still watches it)
    stop_kept()
    assert not level.placing and not level.records
    again = FeedCheck(torch.zeros(4, dtype=torch.long), lambda: 0)
    stop_again = again.start([level], [])
    assert not level.placing  # (a new block starts in place)
    stop_again()
