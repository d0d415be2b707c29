"""Misuse of the engine formats by a hurried RL engineer (round 45): outputs read at the wrong moment of a request."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import moe_replay as mr
from moe_replay import interop

from .engines import Model, vllm_033_request_output

DEEPSEEK = Model()  # 4 hidden layers, layer 0 dense, 16 experts, top-2


def _request(prompt: list[int], completion: list[int]) -> SimpleNamespace:
    """A finished vLLM 0.22-0.33 RequestOutput of one sample, as the engine writes it."""
    truth = DEEPSEEK.truth(len(prompt) + len(completion))
    out = vllm_033_request_output(DEEPSEEK, prompt, [(completion, truth)])
    out.finished = True
    out.outputs[0].finish_reason = "length"
    return out


@pytest.mark.reliability("bad inputs")
def test_an_output_without_routes_says_why_its_own_fields_tell() -> None:
    """vLLM sets routed_experts on a request's final output only: a streamed chunk (finished False) and an aborted
    request have none with the option on, and the error sent the user to turn on an option the server had."""
    lm = DEEPSEEK.layer_map
    chunk = _request([1, 2, 3], [4, 5])
    chunk.finished, chunk.outputs[0].finish_reason, chunk.outputs[0].routed_experts = False, None, None
    with pytest.raises(mr.RoutesValidationError, match="not finished") as info:
        interop.from_vllm_output(chunk, lm)
    assert "enable_return_routed_experts" not in str(info.value)
    with pytest.raises(mr.RoutesValidationError, match="not finished"):  # the chunk's CompletionOutput alone
        interop.from_vllm_output(chunk.outputs[0], lm, prompt_len=3)
    aborted = _request([1, 2, 3], [4, 5])
    aborted.outputs[0].finish_reason, aborted.outputs[0].routed_experts = "abort", None
    with pytest.raises(mr.RoutesValidationError, match="aborted") as info:
        interop.from_vllm_output(aborted, lm)
    assert "enable_return_routed_experts" not in str(info.value)
    off = _request([1, 2, 3], [4, 5])  # finished, and no routes: the option was off
    off.outputs[0].routed_experts = None
    with pytest.raises(mr.RoutesValidationError, match="enable_return_routed_experts=True"):
        interop.from_vllm_output(off, lm)


@pytest.mark.reliability("bad inputs")
def test_the_final_chunk_of_a_delta_stream_is_refused_naming_the_completion_it_fits() -> None:
    """With output_kind=DELTA the final chunk's token_ids are its own tokens only, while routed_experts covers the
    whole sequence: refused (never shifted), and the error names the completion length the rows fit."""
    prompt, completion = [1, 2, 3, 4], [5, 6, 7, 8]
    whole = _request(prompt, completion)
    routes = interop.from_vllm_output(whole, DEEPSEEK.layer_map)
    assert routes.num_tokens == len(prompt) + len(completion)
    delta = _request(prompt, completion)
    delta.outputs[0].token_ids = completion[-1:]  # the last chunk's new token
    with pytest.raises(mr.RoutesValidationError, match=f"fit completion_len={len(completion)}"):
        interop.from_vllm_output(delta, DEEPSEEK.layer_map)
    arr = np.asarray(whole.outputs[0].routed_experts)
    with pytest.raises(mr.RoutesValidationError, match=f"fit completion_len={len(completion)}.*DELTA"):
        interop.from_vllm(arr, DEEPSEEK.layer_map, prompt_len=len(prompt), completion_len=1)


@pytest.mark.reliability("silent replays")
def test_a_completion_is_read_by_its_own_number_not_its_place_in_a_streamed_output() -> None:
    """A streamed output of n > 1 samples holds the samples that changed in that step, in any order: read by its
    place in ``outputs``, ``index=1`` gave another sample's routes."""
    prompt = [1, 2, 3]
    samples = [([4, 5], DEEPSEEK.truth(5, seed=0)), ([6, 7], DEEPSEEK.truth(5, seed=1)), ([8, 9], DEEPSEEK.truth(5, 2))]
    full = vllm_033_request_output(DEEPSEEK, prompt, samples)
    for i, c in enumerate(full.outputs):
        c.index = i
    lm = DEEPSEEK.layer_map
    want = [interop.from_vllm_output(full, lm, index=i) for i in range(3)]
    streamed = SimpleNamespace(prompt_token_ids=prompt, outputs=[full.outputs[2], full.outputs[1]])
    for i in (1, 2):
        got = interop.from_vllm_output(streamed, lm, index=i)
        assert got.equal(want[i]) and got.token_ids.tolist() == want[i].token_ids.tolist()
    with pytest.raises(mr.RoutesValidationError, match=r"numbered \[1, 2\]"):
        interop.from_vllm_output(streamed, lm, index=0)
    assert interop.from_vllm_output(streamed, lm, index=-1).equal(want[1])  # (from the end: by place)


def _in_place_only(monkeypatch: pytest.MonkeyPatch, fail_first_write: bool = False) -> None:
    """Make Routes.save meet a folder that takes no new file (its file may still be written), as for a user whose
    folder is read-only to them; ``fail_first_write``: the first write of the file's bytes stops halfway (a full
    disk)."""
    import builtins

    import moe_replay.routes as routes_module

    writes = {"n": 0}

    class _HalfWritten(io.FileIO):
        def write(self, data: Any) -> int:  # type: ignore[override]
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "x" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", file)
        if "w" in mode:
            writes["n"] += 1
            if fail_first_write and writes["n"] == 1:
                return _HalfWritten(file, "w")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(routes_module, "open", fake_open, raising=False)


@pytest.mark.reliability("files")
def test_a_save_that_fails_midway_in_a_folder_that_takes_no_new_file_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the folder takes no new file, save wrote the file in place: a save that failed midway (an interrupt, a
    full disk) left it half-written, the routes saved there before lost."""
    path = tmp_path / "routes.npz"
    lm = DEEPSEEK.layer_map
    old = interop.from_vllm_output(_request([1, 2, 3], [4, 5]), lm)
    new = interop.from_vllm_output(_request([1, 2, 3, 4, 5, 6], [7, 8]), lm)
    old.save(path)
    _in_place_only(monkeypatch)
    real = np.savez_compressed

    def interrupted(file: Any, **arrays: Any) -> None:
        file.write(b"PK\x03\x04" + b"\0" * 64)  # (a zip's first bytes, then the interrupt)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    assert mr.Routes.load(path).equal(old)
    monkeypatch.setattr(np, "savez_compressed", real)
    _in_place_only(monkeypatch, fail_first_write=True)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    assert mr.Routes.load(path).equal(old)
    _in_place_only(monkeypatch)  # (and where nothing fails, the file is replaced)
    new.save(path)
    assert mr.Routes.load(path).equal(new)


@pytest.mark.reliability("bad inputs")
def test_a_batch_of_outputs_given_to_a_reader_of_one_sequence_says_to_read_each() -> None:
    """LLM.generate returns a list of RequestOutputs and a batched /generate a list of responses: passed whole, the
    error said only "got list", not that the reader takes one sequence."""
    lm = DEEPSEEK.layer_map
    batch = [_request([1, 2, 3], [4, 5]), _request([6, 7], [8])]
    want = [interop.from_vllm_output(out, lm) for out in batch]
    for whole in (batch, tuple(batch), [out.outputs[0] for out in batch]):
        with pytest.raises(mr.RoutesValidationError, match=rf"of {len(batch)}.* reads one sequence. Read each"):
            interop.from_vllm_output(whole, lm)
    meta = {
        "meta_info": {"routed_experts": interop.to_sglang(interop.from_vllm_output(batch[1], lm), lm)["routed_experts"]}
    }
    assert interop.from_sglang(meta, lm, num_tokens=want[1].num_tokens).equal(want[1])  # (one response: read)
    with pytest.raises(mr.RoutesValidationError, match=r"a list of 2.* reads one sequence. Read each"):
        interop.from_sglang([meta, meta], lm)
