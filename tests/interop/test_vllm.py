"""vLLM by release: fake outputs written as each release's code writes them (see engines.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .engines import (
    Model,
    megatron_routing_indices,
    sglang_meta_info,
    vllm_020_routed_experts,
    vllm_021_request_output,
    vllm_033_request_output,
    vllm_033_routed_experts,
    vllm_openai_field,
)

DEEPSEEK = Model()  # 4 hidden layers, layer 0 dense (first_k_dense_replace=1), 16 experts, top-2
ALL_MOE = Model(num_layers=3, moe_layers=(0, 1, 2))  # e.g. Qwen3-30B-A3B: every layer routes


# ----------------------------------------------------------------------------- 0.22 - 0.33
def test_single_turn_033_with_a_dense_layer() -> None:
    """vLLM 0.33.0: ``[prompt_len + gen_len - 1, num_hidden_layers, k]`` uint8, dense column 0.

    ``routed_experts_capturer.py:31-44`` (all hidden layers), ``:69`` (uint8), ``:89-98`` (dense
    columns stay 0); ``aux_output_connector/connector.py:197-219`` (rows up to ``num_tokens - 1``).
    """
    m = DEEPSEEK
    truth = m.truth(9)  # 5 prompt tokens, 4 generated
    out = vllm_033_request_output(m, list(range(5)), [(list(range(4)), truth)])
    arr = out.outputs[0].routed_experts
    assert arr.dtype == np.uint8 and arr.shape == (8, 4, 2) and not arr[:, 0].any()
    r = interop.from_vllm_output(out, m.layer_map)
    assert r.equal(m.routes(truth))
    # the CompletionOutput alone, with the prompt length (as a trainer holding one sample has it)
    assert interop.from_vllm_output(out.outputs[0], m.layer_map, prompt_len=5).equal(r)
    assert interop.from_vllm(arr, m.layer_map, prompt_len=5, completion_len=4).equal(r)
    back = interop.to_vllm(r, m.layer_map)
    assert back.dtype == np.uint8 and np.array_equal(back, arr)
    with pytest.raises(mr.RoutesValidationError, match="needs a CompletionOutput|pass prompt_len"):
        interop.from_vllm_output(out.outputs[0], m.layer_map)


@pytest.mark.parametrize("start_from_end", [0, 1, 3])
def test_multi_turn_prompt_start_reads_every_row_in_place(start_from_end: int) -> None:
    """The old misread: ``routed_experts_prompt_start`` of ``prompt_len`` or ``prompt_len - 1`` on an all-MoE model.

    vLLM 0.33.0 ``sampling_params.py:439-445`` (``routed_experts_prompt_start``), ``connector.py:197-219``
    (rows from that start). Such an array has fewer than ``total - 1`` rows and was routed to the
    0.21 split reader, which returned ``gen_len`` rows: the prompt missing, or all shifted by one.
    """
    m = ALL_MOE
    p, g = 6, 4
    start = p - start_from_end
    truth = m.truth(p + g, seed=3)
    out = vllm_033_request_output(m, list(range(p)), [(list(range(g)), truth)], prompt_start=start)
    assert out.outputs[0].routed_experts.shape[0] == p - start + g - 1
    r = interop.from_vllm_output(out, m.layer_map, prompt_start=start)
    assert r.num_tokens == p + g  # aligned to every token of the sequence
    assert r.equal(m.routes(truth, front=start))
    assert np.array_equal(interop.to_vllm(r, m.layer_map, prompt_start=start), out.outputs[0].routed_experts)
    # without prompt_start the row count does not fit: refused, with the start it would fit
    with pytest.raises(mr.RoutesValidationError, match=f"would fit prompt_start={start}"):
        interop.from_vllm_output(out, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="rows"):  # a start one off is refused too, never shifted
        interop.from_vllm_output(out, m.layer_map, prompt_start=start - 1)


def test_stop_string_trimming_drops_rows() -> None:
    """vLLM 0.33.0 ``v1/engine/output_processor.py:914-915``: tokens a stop string trims lose their rows."""
    m = DEEPSEEK
    truth = m.truth(10, seed=4)  # 4 prompt tokens, 6 generated, the last 2 trimmed by a stop string
    out = vllm_033_request_output(m, list(range(4)), [(list(range(6)), truth)], trim=2)
    comp = out.outputs[0]
    assert len(comp.token_ids) == 4 and comp.routed_experts.shape[0] == 4 + 4 - 1
    r = interop.from_vllm_output(out, m.layer_map)
    assert r.equal(m.routes(truth[:8]))
    with pytest.raises(mr.RoutesValidationError, match="= 9"):  # the untrimmed length does not fit
        interop.from_vllm(comp.routed_experts, m.layer_map, prompt_len=4, completion_len=6)


def test_prefix_cached_rows_are_real_routes() -> None:
    """vLLM 0.33.0 writes no sentinel: cached rows come from the block-hash route store.

    ``aux_output_connector/routed_experts.py:166-219`` (store keyed by KV block hash),
    ``connector.py:138-146`` (prefix hits capped to blocks whose routes exist). With 256
    experts an expert-255 row in uint8 is a real route, not a "-1 stored unsigned".
    """
    m = Model(num_layers=2, moe_layers=(0, 1), num_experts=256, k=1)
    truth = m.truth(7, seed=5)
    truth[:3] = 255  # the cached prefix chose expert 255 in every layer
    shared_prompt = list(range(4))
    first = vllm_033_request_output(m, shared_prompt, [(list(range(3)), truth)])
    second = vllm_033_request_output(m, shared_prompt, [(list(range(3)), truth)])  # prefix served from cache
    for out in (first, second):
        assert out.outputs[0].routed_experts.dtype == np.uint8
        r = interop.from_vllm_output(out, m.layer_map)
        assert r.equal(m.routes(truth)) and not bool(r[:3].missing.any())


def test_n_samples_each_carry_the_prompt_rows() -> None:
    """vLLM 0.33.0 ``v1/engine/output_processor.py:513-515``: each child request of ``n > 1`` has its full array."""
    m = DEEPSEEK
    prompt = list(range(5))
    t0, t1 = m.truth(8, seed=6), m.truth(9, seed=7)
    t1[:5] = t0[:5]  # the same prompt
    out = vllm_033_request_output(m, prompt, [(list(range(3)), t0), (list(range(4)), t1)])
    r0 = interop.from_vllm_output(out, m.layer_map, index=0)
    r1 = interop.from_vllm_output(out, m.layer_map, index=1)
    assert r0.equal(m.routes(t0)) and r1.equal(m.routes(t1)) and r0[:5].equal(r1[:5])
    with pytest.raises(mr.RoutesValidationError, match="2 completions"):
        interop.from_vllm_output(out, m.layer_map, index=2)
    assert interop.from_vllm_output(out, m.layer_map, index=np.int64(-1)).equal(r1)
    for index in (0.0, 1.0, True):  # never cut or read as an int: 1.0 is not completion 1
        with pytest.raises(mr.RoutesValidationError, match=f"index={index}"):
            interop.from_vllm_output(out, m.layer_map, index=index)
    with pytest.raises(mr.RoutesValidationError, match="prompt_len must be an integer"):
        interop.from_vllm_output(out, m.layer_map, prompt_len=5.5)  # was cut to 5, which matched the prompt


def test_more_than_256_experts_is_uint16() -> None:
    """vLLM 0.33.0 ``routed_experts_capturer.py:69``: ``"uint8" if num_experts <= 256 else "uint16"``."""
    m = Model(num_experts=300)
    truth = m.truth(6, seed=8)
    truth[0, 0] = [299, 256]
    out = vllm_033_request_output(m, list(range(3)), [(list(range(3)), truth)])
    arr = out.outputs[0].routed_experts
    assert arr.dtype == np.uint16
    r = interop.from_vllm_output(out, m.layer_map)
    assert r.equal(m.routes(truth))
    assert np.array_equal(interop.to_vllm(r, m.layer_map), arr)
    with pytest.raises(mr.RoutesValidationError, match="uint8, which holds expert numbers up to 255 only.*300 experts"):
        interop.from_vllm(arr.astype(np.uint8), m.layer_map, prompt_len=3, completion_len=3)


def test_openai_server_base64_npy() -> None:
    """vLLM 0.33.0 ``utils/serial_utils.py:67-71``: the choice field is base64 of an ``.npy`` file."""
    m = DEEPSEEK
    truth = m.truth(7, seed=9)
    arr = vllm_033_routed_experts(m, truth, 3)
    field = vllm_openai_field(arr)
    assert np.array_equal(interop.vllm_array_from_base64(field), arr)
    r = interop.from_vllm(field, m.layer_map, prompt_len=3, completion_len=4)
    assert r.equal(m.routes(truth))
    assert interop.vllm_array_to_base64(interop.to_vllm(r, m.layer_map)) == field
    with pytest.raises(mr.RoutesValidationError, match="not base64 of a .npy"):
        interop.from_vllm("bm90IGFuIG5weQ==", m.layer_map, prompt_len=3, completion_len=4)


@pytest.mark.parametrize(
    "arr", [np.array([1, "a"], dtype=object), np.zeros((2, 3)), [[1, 2], [3]]], ids=["object", "float", "ragged"]
)
def test_base64_of_an_array_that_holds_no_expert_indices_is_refused(arr: object) -> None:
    """Only an integer array is written: from_vllm reads nothing else back."""
    with pytest.raises(mr.RoutesValidationError, match="vLLM routed_experts"):
        interop.vllm_array_to_base64(arr)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- 0.21
def test_021_split_layout_and_cached_zero_rows() -> None:
    """vLLM 0.21.0: int16, MoE layers only, prompt rows split off; cached prompt rows stay 0.

    ``routed_experts_capturer.py:59, 103`` (int16), ``:225-242`` (MoE layers), ``:124-148``
    (``np.zeros`` host buffer), ``:666-702`` (``split_routed_experts``); ``outputs.py:124, 145``.
    """
    m = DEEPSEEK
    truth = m.truth(9, seed=10)
    out = vllm_021_request_output(m, list(range(5)), [(list(range(4)), truth)], cached=2)
    assert out.prompt_routed_experts.dtype == np.int16 and out.prompt_routed_experts.shape == (5, 3, 2)
    assert out.outputs[0].routed_experts.shape == (3, 3, 2)
    with pytest.raises(mr.RoutesValidationError, match="row 0 is all zeros.*cached_tokens="):
        interop.from_vllm_output(out, m.layer_map)
    r = interop.from_vllm_output(out, m.layer_map, cached_tokens=2)
    assert r.equal(m.routes(truth, front=2))
    assert r.token_ids.tolist() == list(range(5)) + list(range(4))
    with pytest.raises(mr.RoutesValidationError, match="cached_tokens=3, but prompt row 2 holds routes"):
        interop.from_vllm_output(out, m.layer_map, cached_tokens=3)
    p, g = interop.to_vllm_split(r, m.layer_map, prompt_len=5)
    assert p.dtype == np.int16 and np.array_equal(p, out.prompt_routed_experts)
    assert np.array_equal(g, out.outputs[0].routed_experts)
    uncached = vllm_021_request_output(m, list(range(5)), [(list(range(4)), truth)])
    assert interop.from_vllm_output(uncached, m.layer_map, cached_tokens=0).equal(m.routes(truth))
    with pytest.raises(mr.RoutesValidationError, match="prompt_start must be 0"):
        interop.from_vllm_output(uncached, m.layer_map, cached_tokens=0, prompt_start=1)


def test_021_zero_row_is_ambiguous_with_k1() -> None:
    """With k=1 an all-zero row is also a valid route (expert 0 everywhere): without the cached count it is refused."""
    m = Model(num_layers=2, moe_layers=(0, 1), num_experts=4, k=1)
    truth = m.truth(6, seed=11)
    truth[:, :, 0] = 1 + np.arange(6)[:, None] % 3
    truth[1] = 0  # a real token routed to expert 0 in every layer
    out = vllm_021_request_output(m, list(range(3)), [(list(range(3)), truth)])
    with pytest.raises(mr.RoutesValidationError, match="row 1 is all zeros"):
        interop.from_vllm_output(out, m.layer_map)
    assert interop.from_vllm_output(out, m.layer_map, cached_tokens=0).equal(m.routes(truth))


# ----------------------------------------------------------------------------- <= 0.20
def test_020_int32_all_layers() -> None:
    """vLLM 0.20.0 ``routed_experts_capturer.py:135, 153, 302``: int32, all hidden layers, ``num_tokens - 1`` rows."""
    m = DEEPSEEK
    truth = m.truth(8, seed=12)
    arr = vllm_020_routed_experts(m, truth)
    out = SimpleNamespace(prompt_token_ids=[1] * 5, outputs=[SimpleNamespace(token_ids=[2] * 3, routed_experts=arr)])
    r = interop.from_vllm_output(out, m.layer_map)
    assert r.equal(m.routes(truth))
    assert r.token_ids.tolist() == [1] * 5 + [2] * 3  # the tokens the output names: a replay fed others is refused
    assert interop.from_vllm_output(out.outputs[0], m.layer_map, prompt_len=5).token_ids.tolist() == [-1] * 5 + [2] * 3
    assert interop.from_vllm_legacy(arr, m.layer_map, num_tokens=8).equal(r)
    back = interop.to_vllm_legacy(r, m.layer_map)
    assert back.dtype == np.int32 and np.array_equal(back, arr)
    # 0.20 has no routed_experts_prompt_start: its whole array given one is refused by its row count (int32 rows
    # that do start there are 0.22+'s, as its OpenAI server may send them)
    with pytest.raises(mr.RoutesValidationError, match="covers the whole prompt"):
        interop.from_vllm(arr, m.layer_map, prompt_len=5, completion_len=3, prompt_start=2)
    assert interop.from_vllm(arr[2:], m.layer_map, prompt_len=5, completion_len=3, prompt_start=2).equal(
        m.routes(truth, front=2)
    )


def test_the_legacy_reader_refuses_the_arrays_of_later_releases() -> None:
    """from_vllm_legacy reads int32 only: a 0.22+ uint8 array may start at routed_experts_prompt_start.

    Read as starting at token 0 it would shift every row; from_vllm with prompt_start= reads it.
    """
    m = DEEPSEEK
    truth = m.truth(8, seed=13)
    later = vllm_033_routed_experts(m, truth, 5, prompt_start=2)
    with pytest.raises(mr.RoutesValidationError, match=r"uint8, which vLLM 0.22-0.33 writes.*from_vllm\("):
        interop.from_vllm_legacy(later, m.layer_map)
    r = interop.from_vllm(later, m.layer_map, prompt_len=5, completion_len=3, prompt_start=2)
    assert r.equal(m.routes(truth, front=2))
    split = vllm_021_request_output(m, [1] * 5, [([2] * 3, truth)])
    with pytest.raises(mr.RoutesValidationError, match="int16, which vLLM 0.21 writes.*from_vllm_split"):
        interop.from_vllm_legacy(split.outputs[0].routed_experts, m.layer_map)
    converted = vllm_020_routed_experts(m, truth).astype(np.int64)  # int32 widened on the way: still read
    assert interop.from_vllm_legacy(converted, m.layer_map, num_tokens=8).equal(m.routes(truth))


@pytest.mark.reliability("bad inputs")
def test_legacy_row_counts_that_fit_no_sequence_are_refused_by_name() -> None:
    """Once num_tokens=0 was refused as "a sequence of 0 tokens has -1" rows, and a [layers, tokens, k] array with
    num_tokens= was refused without saying that its axes may be swapped."""
    m = ALL_MOE
    arr = vllm_020_routed_experts(m, m.truth(5, seed=30))  # [4, 3, 2]
    with pytest.raises(mr.RoutesValidationError, match=r"num_tokens=0, but a sequence has at least one token"):
        interop.from_vllm_legacy(arr[:0], m.layer_map, num_tokens=0)
    with pytest.raises(mr.RoutesValidationError, match=r"3 rows; a sequence of 5 tokens has 4.*not \[layers, tokens"):
        interop.from_vllm_legacy(np.ascontiguousarray(arr.transpose(1, 0, 2)[:, :3]), m.layer_map, num_tokens=5)
    with pytest.raises(mr.RoutesValidationError, match="at least one token"):
        interop.from_megatron_inference(megatron_routing_indices(m, m.truth(5, seed=30))[:0], m.layer_map, num_tokens=0)


@pytest.mark.reliability("bad inputs")
def test_token_ids_that_are_no_integers_are_not_cut_to_ids() -> None:
    """Once a CompletionOutput whose token_ids were floats (1.5) gave routes that knew token 1 there, int() cutting
    them; now such ids are no ids, and the routes know none (torch and numpy integer ids are read exactly)."""
    m = DEEPSEEK
    truth = m.truth(6, seed=31)
    arr = vllm_033_routed_experts(m, truth, 3)
    floats = SimpleNamespace(token_ids=[1.5, 2.5, 3.5], routed_experts=arr)
    r = interop.from_vllm_output(floats, m.layer_map, prompt_len=3)
    assert r.equal(m.routes(truth)) and r.token_ids is None
    tensors = SimpleNamespace(
        prompt_token_ids=np.array([7, 8, 9]),
        outputs=[SimpleNamespace(token_ids=torch.tensor([1, 2, 3]), routed_experts=arr)],
    )
    assert interop.from_vllm_output(tensors, m.layer_map).token_ids.tolist() == [7, 8, 9, 1, 2, 3]


# ----------------------------------------------------------------------------- releases, dtypes, layers
def test_version_and_dtype_must_agree() -> None:
    m = DEEPSEEK
    truth = m.truth(6, seed=13)
    arr = vllm_033_routed_experts(m, truth, 3)
    kw = dict(prompt_len=3, completion_len=3)
    assert interop.vllm_layout("0.33.0") == "0.22-0.33" and interop.vllm_layout("v0.21.0") == "0.21"
    assert interop.vllm_layout((0, 18)) == "<=0.20"
    with pytest.raises(mr.RoutesValidationError, match="newer than the last release"):
        interop.from_vllm(arr, m.layer_map, version="0.34.0", **kw)
    with pytest.raises(mr.RoutesValidationError, match="uint8, which vLLM writes in releases 0.22-0.33"):
        interop.from_vllm(arr, m.layer_map, version="0.20", **kw)
    with pytest.raises(mr.RoutesValidationError, match="int64, which no vLLM release writes.*version="):
        interop.from_vllm(arr.astype(np.int64), m.layer_map, **kw)
    assert interop.from_vllm(arr.astype(np.int64), m.layer_map, version="0.33", **kw).equal(m.routes(truth))
    with pytest.raises(mr.RoutesValidationError, match="from_vllm_split"):
        interop.from_vllm(arr.astype(np.int16), m.layer_map, **kw)
    out = SimpleNamespace(prompt_token_ids=[0] * 3, outputs=[SimpleNamespace(token_ids=[0] * 3, routed_experts=arr)])
    with pytest.raises(mr.RoutesValidationError, match="cached_tokens= is for vLLM 0.21 only"):
        interop.from_vllm_output(out, m.layer_map, cached_tokens=1)
    out.outputs[0].routed_experts = None
    with pytest.raises(mr.RoutesValidationError, match="enable_return_routed_experts"):
        interop.from_vllm_output(out, m.layer_map)


def test_a_map_off_by_one_layer_is_caught_by_the_dense_column() -> None:
    """The dense-layer shift that breaks DeepSeek-V3 replay: routers placed one layer too low."""
    m = DEEPSEEK
    arr = vllm_033_routed_experts(m, m.truth(6, seed=14), 3)
    shifted = mr.LayerMap.from_names(m.names, m.num_layers, m.num_experts, m.k, layers=[0, 1, 2])
    with pytest.raises(mr.RoutesValidationError, match="column 3 holds expert choices"):
        interop.from_vllm(arr, shifted, prompt_len=3, completion_len=3)
    narrow = mr.LayerMap.from_names(m.names, 3, m.num_experts, m.k, layers=[0, 1, 2])  # num_layers too small
    with pytest.raises(mr.RoutesValidationError, match=r"needs \[tokens, 3, 2\]"):
        interop.from_vllm(arr, narrow, prompt_len=3, completion_len=3)


def test_mtp_routers_route_natively_when_asked() -> None:
    """Engines do not record MTP layers (vLLM 0.33.0 ``v1/worker/gpu/model_runner.py:822-825``)."""
    m = DEEPSEEK
    lm = mr.LayerMap.from_names([*m.names, "model.layers.4.mlp.gate"], m.num_layers, m.num_experts, m.k, mtp="native")
    truth = m.truth(6, seed=15)
    arr = vllm_033_routed_experts(m, truth, 3)
    r = interop.from_vllm(arr, lm, prompt_len=3, completion_len=3)
    assert bool(r.layer("model.layers.4.mlp.gate").eq(-1).all())
    assert r.select(m.names).equal(m.routes(truth))
    assert np.array_equal(interop.to_vllm(r, lm), arr)  # the MTP router is left out


def test_writers_refuse_rows_the_engine_cannot_hold() -> None:
    m = DEEPSEEK
    truth = m.truth(6, seed=16)
    routed = m.routes(truth, last=False)  # as a training forward records it
    with pytest.raises(mr.RoutesValidationError, match="drop_last=True"):
        interop.to_vllm(routed, m.layer_map)
    assert interop.to_vllm(routed, m.layer_map, drop_last=True).shape == (5, 4, 2)
    holes = m.routes(truth, front=2)
    with pytest.raises(mr.RoutesValidationError, match="no route for token 0"):
        interop.to_vllm(holes, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="no route for token 0"):
        interop.to_vllm_legacy(holes, m.layer_map)
    assert interop.to_vllm(holes, m.layer_map, prompt_start=2).shape == (3, 4, 2)


@pytest.mark.parametrize("count", [256.5, "300", 0, 2**16 + 1, True])
def test_vllm_dtype_refuses_what_is_no_expert_count(count: object) -> None:
    """256.5 is not cut to 256 (uint8) nor "300" parsed: the dtype follows an expert count only."""
    with pytest.raises(mr.RoutesValidationError, match="num_experts must be an integer"):
        interop.vllm_dtype(count)  # type: ignore[arg-type]
    assert interop.vllm_dtype(256) == np.uint8 and interop.vllm_dtype(257) == np.uint16


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("outputs", None, "RequestOutput.outputs is NoneType"),
        ("prompt_token_ids", 5, "RequestOutput.prompt_token_ids is int"),
        ("token_ids", None, "CompletionOutput.token_ids is NoneType"),
        ("token_ids", (t for t in range(3)), "CompletionOutput.token_ids is generator"),
        ("completion", "text", "outputs\\[0\\] is a str, not a vLLM CompletionOutput"),
    ],
)
def test_an_output_whose_fields_are_not_what_vllm_writes_is_refused(field: str, value: object, named: str) -> None:
    """A RequestOutput or CompletionOutput field of another kind is named, never a bare TypeError from len()."""
    m = DEEPSEEK
    out = vllm_033_request_output(m, list(range(3)), [(list(range(3)), m.truth(6, seed=17))])
    if field == "completion":
        out.outputs[0] = value
    elif field == "token_ids":
        out.outputs[0].token_ids = value
    else:
        setattr(out, field, value)
    with pytest.raises(mr.RoutesValidationError, match=named):
        interop.from_vllm_output(out, m.layer_map)


TOP1 = Model(num_layers=3, moe_layers=(0, 1, 2), k=1)  # top-1 routers: an all-zero row repeats no expert


@pytest.mark.parametrize("engine", ["vllm", "sglang", "megatron"])
def test_an_array_the_engine_never_wrote_is_refused_for_top1_routers(engine: str) -> None:
    """An engine whose capture did not run hands back its zero buffer (vllm#54730: a monolithic MoE kernel that
    records nothing). With k >= 2 a zero row repeats expert 0 and is refused; with k = 1 it read as every token
    routed to expert 0, and replay forced that with no error. Past a few tokens it is refused, naming the cause;
    a short real sequence all on expert 0 still reads."""
    m = TOP1

    def read(truth: np.ndarray) -> mr.Routes:
        t = truth.shape[0]
        if engine == "vllm":
            arr = vllm_033_routed_experts(m, truth, 4)
            return interop.from_vllm(arr, m.layer_map, prompt_len=4, completion_len=t - 4)
        if engine == "sglang":
            return interop.from_sglang(sglang_meta_info(m, truth, prompt_len=4), m.layer_map, num_tokens=t)
        return interop.from_megatron_inference(megatron_routing_indices(m, truth), m.layer_map, num_tokens=t)

    unwritten = np.zeros((40, 3, 1), dtype=np.int64)  # 39 routed tokens x 3 routers
    with pytest.raises(mr.RoutesValidationError, match=r"every route is expert 0 \(117 token x router.*did not run"):
        read(unwritten)
    written = unwritten.copy()
    written[7, 2, 0] = 5
    assert read(written).layer(m.names[2])[7].tolist() == [5]
    short = np.zeros((8, 3, 1), dtype=np.int64)  # 21 routes on expert 0: a real router may choose so
    assert read(short).layer(m.names[0])[:-1].eq(0).all()


@pytest.mark.parametrize("engine", ["vllm", "sglang", "megatron"])
def test_layers_the_engine_never_wrote_are_refused_for_top1_routers(engine: str) -> None:
    """Once silent: with top-1 routers, the zero columns of layers whose routes were never written (a pipeline
    stage whose capture was not gathered, as slime checks) read as every token of those layers sent to expert 0,
    while the other layers' real routes kept the whole-array check from firing."""
    m = TOP1
    t = 70  # 69 routed tokens per router: past the point where a real router sends them all to expert 0

    def read(truth: np.ndarray) -> mr.Routes:
        if engine == "vllm":
            arr = vllm_033_routed_experts(m, truth, 4)
            return interop.from_vllm(arr, m.layer_map, prompt_len=4, completion_len=t - 4)
        if engine == "sglang":
            return interop.from_sglang(sglang_meta_info(m, truth, prompt_len=4), m.layer_map, num_tokens=t)
        return interop.from_megatron_inference(megatron_routing_indices(m, truth), m.layer_map, num_tokens=t)

    truth = m.truth(t, seed=11)
    assert read(truth).layer(m.names[2])[:-1].eq(torch.from_numpy(truth[:-1, 2].astype(np.int64))).all()
    stage = truth.copy()
    stage[:, 1:] = 0  # the second pipeline stage (layers 1 and 2) never gathered: its columns stay zero
    with pytest.raises(mr.RoutesValidationError, match=r"router 'model\.layers\.1\.mlp\.gate'.*all 69 .*expert 0"):
        read(stage)
    stage[30, 1, 0] = 3  # one route written in each layer: a router that does use other experts
    stage[30, 2, 0] = 3
    assert read(stage).layer(m.names[1])[30].tolist() == [3]


def test_a_version_given_as_a_number_is_refused() -> None:
    """Once version=0.30 (a float, which is 0.3) was read as vLLM 0.3, a release of the <= 0.20 layout, and a
    0.30 array was refused for a dtype "not in 0.3", naming neither the version nor its type."""
    m = DEEPSEEK
    truth = m.truth(6, seed=13)
    arr = vllm_033_routed_experts(m, truth, 3)
    for number in (0.30, 0.33, 33):
        with pytest.raises(mr.RoutesValidationError, match=r"version must be vllm.__version__ \(a str"):
            interop.from_vllm(arr, m.layer_map, prompt_len=3, completion_len=3, version=number)
    assert interop.from_vllm(arr, m.layer_map, prompt_len=3, completion_len=3, version="0.30.0").equal(m.routes(truth))


@pytest.mark.reliability("bad inputs")
def test_a_033_array_with_prompt_start_in_any_integer_dtype_that_holds_its_experts_is_read() -> None:
    """vLLM 0.22+'s OpenAI server documents ``routed_experts`` as "uint8/uint16/int32"
    (``chat_completion/protocol.py:130-138``) and trainers keep it as int8/int16/int32: an int32 array with
    ``routed_experts_prompt_start`` (0.22+ only) was refused with a word to cast it to uint8. Every integer
    dtype that holds the experts reads the same routes; one that cannot hold them, or values past them, is refused.
    """
    m = DEEPSEEK
    truth = m.truth(7, seed=21)
    arr = vllm_033_routed_experts(m, truth, 4, prompt_start=2)
    kw = dict(prompt_len=4, completion_len=3, prompt_start=2)
    want = m.routes(truth, front=2)
    assert interop.from_vllm(arr, m.layer_map, **kw).equal(want)
    wide = arr.astype(np.int32)  # as the OpenAI server may send it, no version needed: only 0.22+ has prompt_start
    assert interop.from_vllm(wide, m.layer_map, **kw).equal(want)
    assert interop.from_vllm(vllm_openai_field(wide), m.layer_map, **kw).equal(want)
    out = SimpleNamespace(prompt_token_ids=[0] * 4, outputs=[SimpleNamespace(token_ids=[0] * 3, routed_experts=wide)])
    assert interop.from_vllm_output(out, m.layer_map, prompt_start=2).equal(want)
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint32):
        assert interop.from_vllm(arr.astype(dtype), m.layer_map, version="0.33.0", **kw).equal(want), dtype
    past = wide.copy()
    past[1, 2, 0] = m.num_experts  # one past the last expert
    with pytest.raises(mr.RoutesValidationError, match=r"each index must be in \[0, 15\]"):
        interop.from_vllm(past, m.layer_map, **kw)
    past[1, 2, 0] = -1
    with pytest.raises(mr.RoutesValidationError, match="negative expert number"):
        interop.from_vllm(past, m.layer_map, **kw)
    big = Model(num_experts=300)  # expert 299 cast to int8 reads 43: a real expert, so the dtype is refused
    big_arr = vllm_033_routed_experts(big, big.truth(7, seed=22), 4, prompt_start=2)
    with pytest.raises(mr.RoutesValidationError, match="int8, which holds expert numbers up to 127 only"):
        interop.from_vllm(big_arr.astype(np.int8), big.layer_map, version="0.33.0", **kw)
    assert interop.from_vllm(big_arr.astype(np.int32), big.layer_map, **kw).equal(
        big.routes(big.truth(7, seed=22), front=2)
    )
    # the guards that stay: int32 without prompt_start reads the same rows as 0.20's; int16 without version= is 0.21's
    assert interop.from_vllm(
        vllm_033_routed_experts(m, truth, 4).astype(np.int32), m.layer_map, prompt_len=4, completion_len=3
    ).equal(m.routes(truth))
    with pytest.raises(mr.RoutesValidationError, match="from_vllm_split"):
        interop.from_vllm(arr.astype(np.int16), m.layer_map, **kw)
