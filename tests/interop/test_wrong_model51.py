"""Engine payloads of another model revision than the one they are read for, replayed on the target model.

Every reader gets a payload written (by the fake engines of :mod:`tests.interop.engines`) for a model
with other layers, another k or E, a dense layer elsewhere, an MTP layer, or for another sequence; each
must be refused with a :class:`~moe_replay.MoEReplayError`, at read time where the data proves it, else
by the replay on the target model: never forced on other layers or tokens. Ordinary payloads (a
prefix-cached SGLang request, vLLM's n > 1 samples, a stop-trimmed response) are read and replay.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from . import engines
from .engines import Model

pytestmark = pytest.mark.reliability("silent replays")

#: The target: 4 hidden layers, layer 0 dense, 16 experts, k=2 (as engines.Model's default).
TARGET = Model()
PROMPT, TOKENS = 4, 8

#: Other revisions of the model that wrote the payload.
OTHERS: dict[str, Model] = {
    "fewer_layers": Model(num_layers=3, moe_layers=(1, 2)),
    "more_layers": Model(num_layers=5, moe_layers=(1, 2, 3, 4)),
    "mtp_layer": Model(num_layers=5, moe_layers=(1, 2, 3, 4)),  # an MTP layer after the hidden layers
    "dense_moved": Model(moe_layers=(0, 2, 3)),
    "more_dense": Model(moe_layers=(2, 3)),
    "all_moe_fewer_layers": Model(num_layers=3, moe_layers=(0, 1, 2)),  # as many layers as the target's MoE layers
    "larger_k": Model(k=4),
    "smaller_k": Model(k=1),
    "ids_past_E": Model(num_experts=64),
}


@pytest.fixture(scope="module")
def target() -> tuple[Any, mr.Session, mr.LayerMap]:
    model = mr.models.build("softmax_topk", num_layers=4, first_dense_layers=1, num_experts=16, top_k=2)
    session = mr.attach(model)
    lm = mr.LayerMap.from_session(session, num_layers=4)
    assert lm.layers == TARGET.moe_layers and lm.max_experts == TARGET.num_experts and lm.k == TARGET.k
    yield model, session, lm
    session.detach()


#: What a test fails with where a payload of another model was forced (its strict xfails expect this alone).
FORCED = pytest.fail.Exception


def _ids(n: int = TOKENS, seed: int = 0) -> list[int]:
    return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _refused(target: tuple[Any, mr.Session, mr.LayerMap], read: Callable[[mr.LayerMap], Any], ids: list[int]) -> str:
    """Where the payload is refused: "read" or "replay" (and the message); fails where it is forced."""
    model, session, lm = target
    try:
        routes = read(lm)
    except mr.MoEReplayError as e:
        return f"read: {e}"
    if isinstance(routes, list):
        (routes,) = routes
    try:
        with session.replay(routes):
            model(torch.tensor([ids]))
    except mr.MoEReplayError as e:
        return f"replay: {e}"
    pytest.fail(f"a payload of another model was forced without complaint: {routes}")


def _replays(target: tuple[Any, mr.Session, mr.LayerMap], routes: Any, ids: list[int]) -> None:
    model, session, _ = target
    if isinstance(routes, list):
        (routes,) = routes
    with session.replay(routes):
        model(torch.tensor([ids]))


# ----------------------------------------------------------------------------- one reader each
def _vllm(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    arr = engines.vllm_033_routed_experts(src, truth, PROMPT)
    return lambda lm: interop.from_vllm(arr, lm, prompt_len=PROMPT, completion_len=TOKENS - PROMPT)


def _vllm_b64(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    text = engines.vllm_openai_field(engines.vllm_033_routed_experts(src, truth, PROMPT))
    return lambda lm: interop.from_vllm(
        interop.vllm_array_from_base64(text), lm, prompt_len=PROMPT, completion_len=TOKENS - PROMPT
    )


def _vllm_output(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    out = engines.vllm_033_request_output(src, ids[:PROMPT], [(ids[PROMPT:], truth)])
    return lambda lm: interop.from_vllm_output(out, lm)


def _vllm_legacy(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    arr = engines.vllm_020_routed_experts(src, truth)
    return lambda lm: interop.from_vllm_legacy(arr, lm, num_tokens=TOKENS)


def _vllm_split(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    out = engines.vllm_021_request_output(src, ids[:PROMPT], [(ids[PROMPT:], truth)])
    return lambda lm: interop.from_vllm_split(
        out.prompt_routed_experts,
        out.outputs[0].routed_experts,
        lm,
        completion_len=TOKENS - PROMPT,
        cached_tokens=0,
        axes="tokens,layers,k",  # (3 rows of 3 MoE layers: the order is told, as vLLM writes it)
    )


def _sglang_meta(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    meta = engines.sglang_meta_info(src, truth, prompt_len=PROMPT)
    return lambda lm: interop.from_sglang(meta, lm)


def _sglang_response(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    meta = engines.sglang_meta_info(src, truth, prompt_len=PROMPT)
    response = {"output_ids": ids[PROMPT:], "meta_info": meta}
    return lambda lm: interop.from_sglang(response, lm)


def _sglang_counted(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    meta = engines.sglang_meta_info(src, truth)  # slime: the rows counted against len(tokens)
    return lambda lm: interop.from_sglang(meta, lm, num_tokens=TOKENS)


def _megatron_inference(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    arr = engines.megatron_routing_indices(src, truth)
    return lambda lm: interop.from_megatron_inference(arr, lm, num_tokens=TOKENS)


def _megatron(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    # RouterReplay.get_recorded_data(): one [tokens, k] tensor per MoE layer, every token routed
    tensors = [torch.from_numpy(truth[:, j].astype(np.int64)) for j in range(len(src.moe_layers))]
    return lambda lm: interop.from_megatron(tensors, lm.names, lm.num_experts)


def _verl(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    rows = engines.capture_buffer(src, truth)[: truth.shape[0] - 1]
    width = max(truth.shape[0], TOKENS) - PROMPT + 1
    out, _ = engines.verl_padded([rows], [PROMPT], PROMPT + 1, width)
    _, mask = engines.verl_padded([np.zeros((TOKENS - 1, 1, 1))], [PROMPT], PROMPT + 1, width)  # the batch's
    return lambda lm: interop.from_verl(out, mask, lm)


def _nemo_rl(src: Model, truth: np.ndarray, ids: list[int]) -> Callable[[mr.LayerMap], Any]:
    full = engines.nemo_rl_routed_experts(src, truth, PROMPT)
    msg = {
        "routed_experts": engines.nemo_rl_envelope(full),
        "prompt_token_ids": ids[:PROMPT],
        "generation_token_ids": ids[PROMPT:],
    }
    return lambda lm: interop.from_nemo_rl(msg, lm)


READERS = {
    "vllm": _vllm,
    "vllm_b64": _vllm_b64,
    "vllm_output": _vllm_output,
    "vllm_legacy": _vllm_legacy,
    "vllm_split": _vllm_split,
    "sglang_meta": _sglang_meta,
    "sglang_response": _sglang_response,
    "sglang_counted": _sglang_counted,
    "megatron_inference": _megatron_inference,
    "megatron": _megatron,
    "verl": _verl,
    "nemo_rl": _nemo_rl,
}


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_payload_of_the_target_model_replays(target, reader: str) -> None:
    """The target's own payload, through every reader, replays on its tokens."""
    ids = _ids()
    _replays(target, READERS[reader](TARGET, TARGET.truth(TOKENS), ids)(target[2]), ids)


#: Payloads no reader can tell from the target's: (reader, case) -> why.
UNTOLD = {
    ("megatron", "dense_moved"): "MoE layers only: no hidden-layer index shows the dense layer moved",
    ("megatron_inference", "dense_moved"): "MoE layers only: no hidden-layer index shows the dense layer moved",
    ("vllm_split", "dense_moved"): "MoE layers only: no hidden-layer index shows the dense layer moved",
    **{
        (r, "all_moe_fewer_layers"): "as many layers as the target has MoE layers: read as the target's MoE columns"
        for r in ("megatron", "megatron_inference", "vllm_split", "nemo_rl")  # (NeMo-RL reads either width)
    },
    ("vllm_split", TOKENS + 1): "vLLM 0.21 may return completion_len rows (a draft's clipped row): one more token fits",
}


def _cases(reader_cases: list[tuple[str, Any]]) -> list[Any]:
    untold = {rc: pytest.mark.xfail(strict=True, reason=why, raises=FORCED) for rc, why in UNTOLD.items()}
    return [pytest.param(r, c, marks=untold[(r, c)]) if (r, c) in untold else (r, c) for r, c in reader_cases]


@pytest.mark.parametrize(("reader", "other"), _cases([(r, o) for r in sorted(READERS) for o in sorted(OTHERS)]))
def test_a_payload_of_another_model_revision_is_refused(target, reader: str, other: str) -> None:
    """A payload of a model with other layers, k or E is refused when read, naming what does not fit."""
    ids = _ids()
    src = OTHERS[other]
    where = _refused(target, READERS[reader](src, src.truth(TOKENS, seed=1), ids), ids)
    if reader == "megatron" and other.endswith("_k"):  # (from_megatron is given no k: the replay checks it first)
        assert where.startswith("replay: ") and "k=2" in where, where
    else:
        assert where.startswith("read: "), where  # the payload's own shape, values or counts prove it
    named = {"ids_past_E": "expert", "larger_k": r"\bk\b", "smaller_k": r"\bk\b"}.get(other, r"layers?\b(?!\.)")
    assert re.search(named, where), where  # (what does not fit is named: the layers, k or the experts)


LENGTHS = (TOKENS - 2, TOKENS - 1, TOKENS + 1, TOKENS + 3)


@pytest.mark.parametrize(("reader", "tokens"), _cases([(r, t) for r in sorted(READERS) for t in LENGTHS]))
def test_a_payload_of_another_sequence_length_is_refused(target, reader: str, tokens: int) -> None:
    """A payload of a sequence a token or more longer or shorter, read with the target's counts, is refused."""
    ids = _ids()
    where = _refused(target, READERS[reader](TARGET, TARGET.truth(tokens, seed=2), _ids(tokens, seed=3)), ids)
    assert where.startswith("read: ") or "rows" in where or "tokens" in where, where


# ----------------------------------------------------------------------------- SGLang's meta_info counts
#: A model whose every hidden layer routes (Qwen3-MoE-like): no dense column to tell another model's rows.
ALL_MOE = Model(num_layers=4, moe_layers=(0, 1, 2, 3))


@pytest.fixture(scope="module")
def all_moe() -> tuple[Any, mr.Session, mr.LayerMap]:
    model = mr.models.build("softmax_topk", num_layers=4, first_dense_layers=0, num_experts=16, top_k=2)
    session = mr.attach(model)
    yield model, session, mr.LayerMap.from_session(session, num_layers=4)
    session.detach()


@pytest.mark.parametrize("other", [Model(num_layers=2, moe_layers=(0, 1)), Model(moe_layers=(0, 1, 2, 3), k=1)])
def test_an_sglang_payload_of_a_model_with_fewer_layers_or_a_smaller_k_is_refused_by_meta_info(all_moe, other) -> None:
    """Once a payload of a model with half the layers (or half the k), given with meta_info, was read as half as many
    rows (taken as a stop string's trim): replayed on the prompt's tokens alone, another model's experts were forced."""
    meta = engines.sglang_meta_info(other, other.truth(2 * PROMPT - 1, seed=4), prompt_len=PROMPT)  # 6 rows: 3 here
    model, session, lm = all_moe
    with pytest.raises(mr.RoutesValidationError, match=r"3 rows of num_hidden_layers\*k = 4\*2 .* at least 5 tokens"):
        interop.from_sglang(meta, lm)
    with pytest.raises(mr.RoutesValidationError, match="another model"):
        interop.from_sglang({"output_ids": [1, 2, 3], "meta_info": meta}, lm)


@pytest.mark.xfail(
    strict=True,
    raises=FORCED,
    reason="rows of a model with half the k (or layers) over a long completion still cover more than the prompt: "
    "meta_info's completion_tokens may count stop-trimmed tokens in earlier releases, so nothing bounds them from "
    "below there, and a replay fed exactly as many tokens as they cover forces them",
)
def test_an_sglang_payload_of_a_smaller_k_over_a_long_completion_is_refused_by_meta_info(all_moe) -> None:
    other, generated = Model(moe_layers=(0, 1, 2, 3), k=1), 3 * PROMPT - 3  # 12 rows of k=1: 6 of k=2
    t = PROMPT + generated
    truth = (np.arange(t)[:, None, None] * 4 + np.arange(4)[None, :, None]) % other.num_experts  # no pair repeats
    meta = engines.sglang_meta_info(other, truth, prompt_len=PROMPT)
    _refused(all_moe, lambda lm: interop.from_sglang(meta, lm), _ids(2 * PROMPT - 1))


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("generated", [0, 1, 3])
def test_meta_info_counts_do_not_refuse_a_trimmed_cached_or_start_len_payload(all_moe, generated: int) -> None:
    """A stop string's trim (earlier releases' completion_tokens count the trimmed tokens), prefix-cached prompt
    tokens (SGLang routes them from their KV slots; meta_info's cached_tokens) and routed_experts_start_len read."""
    model, session, lm = all_moe
    m = ALL_MOE
    truth = m.truth(PROMPT + generated, seed=5)
    trimmed = generated - 1 if generated else 0  # the stop's last token stays
    meta = engines.sglang_meta_info(m, truth, trim=trimmed)
    meta.update(prompt_tokens=PROMPT, completion_tokens=generated, cached_tokens=PROMPT - 1)  # len(output_ids)
    routes = interop.from_sglang(meta, lm)
    assert routes.num_tokens == truth.shape[0] - trimmed
    want = m.routes(truth[: routes.num_tokens]).per_layer()
    assert all(a.equal(b) for a, b in zip(routes.per_layer(), want, strict=True))
    _replays(all_moe, routes, _ids(routes.num_tokens))
    turn = engines.sglang_meta_info(m, truth, start_len=2, trim=trimmed)
    turn.update(prompt_tokens=PROMPT, completion_tokens=generated)
    assert interop.from_sglang(turn, lm, start_len=2).num_tokens == routes.num_tokens
    with pytest.raises(mr.RoutesValidationError, match="pass start_len=2"):  # rows from token 2 are not from token 0
        interop.from_sglang(turn, lm)


# ----------------------------------------------------------------------------- what no payload tells
@pytest.mark.xfail(strict=True, raises=FORCED, reason="ids all below a smaller E fit this E: no engine format holds E")
@pytest.mark.parametrize("reader", ["vllm", "sglang_meta", "nemo_rl"])
def test_a_payload_of_a_model_with_fewer_experts_is_refused(target, reader: str) -> None:
    ids, src = _ids(), Model(num_experts=8)
    _refused(target, READERS[reader](src, src.truth(TOKENS, seed=7), ids), ids)


@pytest.mark.parametrize("reader", ["vllm_output", "sglang_response", "nemo_rl"])
def test_a_payload_of_another_prompt_of_the_same_length_is_refused_where_it_carries_its_ids(target, reader) -> None:
    """Readers given the engine's token ids make routes that know them: the replay on other tokens is refused."""
    ids = _ids()
    where = _refused(target, READERS[reader](TARGET, TARGET.truth(TOKENS, seed=8), _ids(seed=9)), ids)
    assert where.startswith("replay: ") and "other tokens" in where, where


# ----------------------------------------------------------------------------- ordinary payloads
@pytest.mark.reliability("false refusals")
def test_every_sample_of_a_vllm_request_with_n_samples_reads_and_replays(target) -> None:
    """n > 1: each child request carries its own full array, the prompt's rows repeated."""
    ids = _ids()
    samples = [(_ids(seed=s)[PROMPT:], TARGET.truth(TOKENS, seed=s)) for s in (10, 11, 12)]
    samples = [(g, np.concatenate([samples[0][1][:PROMPT], t[PROMPT:]])) for g, t in samples]
    out = engines.vllm_033_request_output(TARGET, ids[:PROMPT], samples)
    for i, (gen, truth) in enumerate(samples):
        routes = interop.from_vllm_output(out, target[2], index=i)
        assert routes.num_tokens == TOKENS and routes.per_layer()[0][:-1].numpy().tolist() == truth[:-1, 0].tolist()
        _replays(target, routes, ids[:PROMPT] + gen)


@pytest.mark.reliability("false refusals")
def test_a_stop_trimmed_vllm_response_reads_and_replays(target) -> None:
    ids = _ids(TOKENS + 2)
    out = engines.vllm_033_request_output(TARGET, ids[:PROMPT], [(ids[PROMPT:], TARGET.truth(TOKENS + 2))], trim=2)
    routes = interop.from_vllm_output(out, target[2])
    assert routes.num_tokens == TOKENS
    _replays(target, routes, ids[:TOKENS])
