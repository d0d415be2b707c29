"""Engine formats against what the engines write (shared reference of engine formats, December 2026).

Every case writes one sequence's routes the way an engine or trainer does (``tests/interop/engines.py`` follows
each engine's own code), then damages or mislabels it the way a pipeline does: a row short or long at the
response's last token or at the front, another padding side, a map off by the dense prefix or onto interleaved
dense layers, expert ids out of range or physical, another top-k, one engine's payload given to another's reader.
Each reader must then give back exactly the routes the engine was given, or raise a
:class:`~moe_replay.MoEReplayError`; never routes shifted, of another length, or of other experts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from ..conftest import tried
from . import engines as E

#: a dense prefix (DeepSeek's first_k_dense_replace), dense layers interleaved (decoder_sparse_step=2), every layer
#: routed with k=1 (a zero row is a route: expert 0 everywhere), 300 experts (vLLM's uint16), k=3
_MODELS = {
    "dense prefix k2": E.Model(num_layers=5, moe_layers=(2, 3, 4), num_experts=16, k=2),
    "interleaved k2": E.Model(num_layers=4, moe_layers=(1, 3), num_experts=8, k=2),
    "all moe k1": E.Model(num_layers=3, moe_layers=(0, 1, 2), num_experts=8, k=1),
    "300 experts k3": E.Model(num_layers=3, moe_layers=(1, 2), num_experts=300, k=3),
}
_P, _C = 5, 4  # prompt and completion lengths
_N = _P + _C
_ENGINE = "tokens,layers,k"  # (the order engines write; said where a small square array cannot prove it)


def _sglang_payload(model: E.Model, truth: np.ndarray, start: int = 0) -> str:
    meta = E.sglang_meta_info(model, truth, start_len=start)
    return str(meta["routed_experts"])


def _raw(payload: Any, model: E.Model) -> np.ndarray:
    """The ``[rows, width, k]`` array a payload carries (to damage it)."""
    if isinstance(payload, str) and payload.startswith("nrlre1:"):
        head, data = payload.rsplit(":", 1)
        dtype = np.dtype(head.split(":")[1])
        dims = [int(x) for x in head.split(":")[2].split("x")]
        return np.frombuffer(base64.b64decode(data), dtype).reshape(-1, *dims[1:])
    if isinstance(payload, str):
        return np.frombuffer(base64.b64decode(payload), "<i4").reshape(-1, model.num_layers, model.k)
    return np.asarray(payload)


def _rewrap(fmt: str, arr: np.ndarray) -> Any:
    """``arr`` sent again in the encoding of ``fmt``."""
    if fmt.startswith("sglang"):
        return base64.b64encode(np.ascontiguousarray(arr).astype("<i4").tobytes()).decode()
    if fmt == "nemo-rl":
        return E.nemo_rl_envelope(np.ascontiguousarray(arr))
    return arr


#: format -> (what the engine writes for (model, truth over every token), reader given the sequence's counts)
_ENGINES: dict[str, tuple[Callable[[E.Model, np.ndarray], Any], Callable[[Any, mr.LayerMap], mr.Routes], int]] = {
    # (the last field: how many leading tokens the engine was asked to leave out)
    "vllm 0.33": (
        lambda m, t: E.vllm_033_routed_experts(m, t, _P),
        lambda a, lm: interop.from_vllm(a, lm, prompt_len=_P, completion_len=_C),
        0,
    ),
    "vllm 0.33 prompt_start": (
        lambda m, t: E.vllm_033_routed_experts(m, t, _P, prompt_start=_P - 1),
        lambda a, lm: interop.from_vllm(a, lm, prompt_len=_P, completion_len=_C, prompt_start=_P - 1),
        _P - 1,
    ),
    "vllm 0.20": (
        lambda m, t: E.vllm_020_routed_experts(m, t),
        lambda a, lm: interop.from_vllm_legacy(a, lm, num_tokens=_N),
        0,
    ),
    "sglang": (
        lambda m, t: _sglang_payload(m, t),
        lambda a, lm: interop.from_sglang(a, lm, num_tokens=_N, axes=_ENGINE),
        0,
    ),
    "sglang start_len": (
        lambda m, t: _sglang_payload(m, t, start=2),
        lambda a, lm: interop.from_sglang(a, lm, num_tokens=_N, start_len=2, axes=_ENGINE),
        2,
    ),
    "megatron inference": (
        lambda m, t: E.megatron_routing_indices(m, t),
        lambda a, lm: interop.from_megatron_inference(a, lm, num_tokens=_N),
        0,
    ),
    "nemo-rl": (
        lambda m, t: E.nemo_rl_envelope(E.nemo_rl_routed_experts(m, t, _P)),
        lambda a, lm: interop.from_nemo_rl(a, lm, num_tokens=_N),
        0,
    ),
}


def _truth(model: E.Model, seed: int = 0) -> tuple[np.ndarray, mr.Routes]:
    truth = model.truth(_N, seed=seed)
    return truth, model.routes(truth)


def _want(model: E.Model, truth: np.ndarray, front: int) -> mr.Routes:
    return model.routes(truth, front=front)


def _exact_or_refused(read: Callable[..., mr.Routes], args: tuple[Any, ...], want: mr.Routes, what: str) -> bool:
    """``read(*args)``: True when it gave ``want`` exactly, False when refused; anything else fails the test."""
    tried()
    try:
        got = read(*args)
    except mr.MoEReplayError:
        return False
    assert got.num_tokens == want.num_tokens and got.equal(want), f"{what}: read silently as other routes"
    return True


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("model", list(_MODELS))
def test_every_engine_format_reads_what_the_engine_wrote_and_writes_it_back(model: str) -> None:
    """Each engine's own layout reads back as the routes it was given (the last token, and the tokens it was
    asked to leave out, -1), and moe_replay's writer gives back the engine's bytes."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, _ = _truth(m)
    writers = {
        "vllm 0.33": lambda r: interop.to_vllm(r, lm),
        "vllm 0.33 prompt_start": lambda r: interop.to_vllm(r, lm, prompt_start=_P - 1),
        "vllm 0.20": lambda r: interop.to_vllm_legacy(r, lm),
        "sglang": lambda r: interop.to_sglang(r, lm)["routed_experts"],
        "sglang start_len": lambda r: interop.to_sglang(r, lm, start_len=2)["routed_experts"],
        "megatron inference": lambda r: interop.to_megatron_inference(r, lm),
        "nemo-rl": lambda r: interop.to_nemo_rl(r, lm),
    }
    for fmt, (write, read, front) in _ENGINES.items():
        tried()
        engine = write(m, truth)
        got = read(engine, lm)
        assert got.equal(_want(m, truth, front)), fmt
        back = writers[fmt](got)
        if isinstance(engine, np.ndarray):
            assert back.dtype == engine.dtype and np.array_equal(back, engine), fmt
        else:
            assert np.array_equal(_raw(back, m), _raw(engine, m)), fmt
    # vLLM 0.21's split arrays, a whole 0.33 RequestOutput with n=2, and verl's padded batch
    ids = list(range(100, 100 + _C))
    out = E.vllm_021_request_output(m, list(range(_P)), [(ids, truth)])
    assert interop.from_vllm_output(out, lm, cached_tokens=0).equal(m.routes(truth))
    second = m.truth(_N, seed=9)
    out = E.vllm_033_request_output(m, list(range(_P)), [(ids, truth), (ids, second)])
    assert interop.from_vllm_output(out, lm, index=1).equal(m.routes(second))
    rows = [E.vllm_033_routed_experts(m, t, _P) for t in (truth, second)]
    batch, mask = E.verl_padded(rows, [_P, _P], prompt_width=_P + 2, response_width=_C + 1)
    got = interop.from_verl(batch, mask, lm)
    assert got[0].equal(m.routes(truth)) and got[1].equal(m.routes(second))


def _cut(arr: np.ndarray) -> dict[str, np.ndarray]:
    """The array a row short or long at either end: the response's last token, or the front (the prompt's start)."""
    zero = np.zeros_like(arr[:1])
    return {
        "last row lost": arr[:-1],
        "first row lost": arr[1:],
        "zero row for the last token": np.concatenate([arr, zero]),
        "last row repeated": np.concatenate([arr, arr[-1:]]),
        "zero row at the front": np.concatenate([zero, arr]),
        "first row repeated": np.concatenate([arr[:1], arr]),
    }


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", list(_MODELS))
def test_a_row_short_or_long_at_either_end_is_refused(model: str) -> None:
    """The engine's rows stop one short of the last token; an array a row short or long (at the response's last
    token or at the front) is refused, never read shifted."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, _ = _truth(m, seed=1)
    for fmt, (write, read, front) in _ENGINES.items():
        arr = _raw(write(m, truth), m)
        nemo = fmt == "nemo-rl"
        body, tail = (arr[:-1], arr[-1:]) if nemo else (arr, arr[:0])  # (NeMo-RL's placeholder row stays last)
        for what, bad in _cut(body).items():
            bad = np.concatenate([bad, tail]).astype(arr.dtype)
            assert not _exact_or_refused(read, (_rewrap(fmt, bad), lm), _want(m, truth, front), f"{fmt}: {what}")


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", list(_MODELS))
def test_one_engines_payload_given_to_another_engines_reader_is_exact_or_refused(model: str) -> None:
    """vLLM's uint8 array read as SGLang's int32 bytes, SGLang's or NeMo-RL's payload read as vLLM's, an array
    that starts at prompt_start read as a whole sequence, MoE-only columns read as all hidden layers...: the
    reader gives back the engine's routes exactly (formats that are the same bytes, vLLM <= 0.20 and Megatron
    inference on an all-MoE model) or refuses."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, _ = _truth(m, seed=2)
    payloads: dict[str, Any] = {fmt: write(m, truth) for fmt, (write, _, _) in _ENGINES.items()}
    payloads["vllm 0.33 openai"] = E.vllm_openai_field(payloads["vllm 0.33"])
    payloads["vllm 0.33 bytes"] = base64.b64encode(payloads["vllm 0.33"].tobytes()).decode()
    payloads["vllm 0.21 completion"] = (
        E.vllm_021_request_output(m, list(range(_P)), [([1] * _C, truth)]).outputs[0].routed_experts
    )
    payloads["nemo-rl list"] = E.nemo_rl_routed_experts(m, truth, _P).tolist()
    payloads["verl sequence"] = E.verl_padded([payloads["vllm 0.33"]], [_P], _P, _C)[0][0].numpy()
    for fmt, payload in payloads.items():
        for reader, (_, read, front) in _ENGINES.items():
            want = _want(m, truth, front)
            if fmt == reader:
                assert read(payload, lm).equal(want)
                continue
            # (what the reader gives back must be the engine's routes over the tokens it covers, the same -1 rows)
            _exact_or_refused(read, (payload, lm), want, f"{fmt} read as {reader}")


def _wrong_maps(m: E.Model) -> dict[str, Callable[[], mr.LayerMap]]:
    """Maps a user builds for ``m`` by mistake: off by the dense prefix, by one layer, MoE ordinals as layers."""
    moe = list(m.moe_layers)
    dense = m.num_layers - len(moe)
    return {
        "MoE ordinals as hidden layers": lambda: mr.LayerMap.from_names(
            m.names, m.num_layers, m.num_experts, m.k, layers=list(range(len(moe)))
        ),
        "num_layers without the dense layers": lambda: mr.LayerMap.from_names(
            m.names, len(moe), m.num_experts, m.k, layers=list(range(len(moe)))
        ),
        "num_layers without the dense layers, names parsed": lambda: mr.LayerMap.from_names(
            m.names, len(moe), m.num_experts, m.k
        ),
        "one layer early": lambda: mr.LayerMap.from_names(
            m.names, m.num_layers, m.num_experts, m.k, layers=[i - 1 for i in moe]
        ),
        "one layer late": lambda: mr.LayerMap.from_names(
            m.names, m.num_layers + 1, m.num_experts, m.k, layers=[i + 1 for i in moe]
        ),
        "one hidden layer too many": lambda: mr.LayerMap.from_names(m.names, m.num_layers + 1, m.num_experts, m.k),
        "one hidden layer too few": lambda: mr.LayerMap.from_names(m.names, m.num_layers - 1, m.num_experts, m.k),
        "the dense prefix counted twice": lambda: mr.LayerMap.from_names(
            m.names, m.num_layers + dense, m.num_experts, m.k, layers=[i + dense for i in moe]
        ),
    }


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", ["dense prefix k2", "interleaved k2", "300 experts k3"])
def test_a_layer_map_off_by_the_dense_layers_is_refused(model: str) -> None:
    """A map whose layers are off by the dense prefix, by one, counted as MoE ordinals or past the dense layers
    interleaved between routed ones reads each engine's layout exactly (where it is the right map for that layout:
    MoE ordinals for Megatron inference) or is refused; never one layer's routes under another router's name."""
    m = _MODELS[model]
    truth, _ = _truth(m, seed=3)
    for fmt, (write, read, front) in _ENGINES.items():
        payload = write(m, truth)
        for what, build in _wrong_maps(m).items():
            tried()
            try:
                lm = build()
            except mr.MoEReplayError:
                continue
            # (MoE ordinals are Megatron inference's own numbering: that map reads it exactly)
            _exact_or_refused(read, (payload, lm), _want(m, truth, front), f"{fmt}, {what}")


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", list(_MODELS))
def test_expert_ids_out_of_range_or_physical_are_refused(model: str) -> None:
    """An expert id past the router's experts is refused by every reader: a physical id of a redundant expert
    (EPLB slots past the logical experts), the -1 of a cached row as uint8 wraps it (255), an SGLang fused shared
    expert's slot (id num_experts), a negative id where the format has no -1."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, _ = _truth(m, seed=4)
    col = m.moe_layers[-1]
    for fmt, (write, read, front) in _ENGINES.items():
        arr = _raw(write(m, truth), m)
        width_col = col if arr.shape[1] == m.num_layers else len(m.moe_layers) - 1
        values = {m.num_experts, m.num_experts + 7, np.iinfo(arr.dtype).max, -1, -2}
        if fmt == "nemo-rl" and m.k == 1:
            values.discard(-1)  # (NeMo-RL's -1 across a layer's row of k: that layer routes the token natively)
        for value in values:
            if not np.can_cast(np.min_scalar_type(value), arr.dtype) and not (
                np.iinfo(arr.dtype).min <= value <= np.iinfo(arr.dtype).max
            ):
                continue
            bad = arr.copy()
            bad[front + 1 if front + 1 < bad.shape[0] - 1 else 0, width_col, 0] = value
            assert not _exact_or_refused(
                read, (_rewrap(fmt, bad), lm), _want(m, truth, front), f"{fmt}: expert {value}"
            )


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", list(_MODELS))
def test_routes_and_arrays_of_another_top_k_are_refused(model: str) -> None:
    """Routes of another k given to a writer, and an engine array of another k given to a reader (a map built
    with the model's k, rows written with a shared expert's slot or a config override), are refused."""
    m = _MODELS[model]
    lm = m.layer_map
    for k in {1, m.k + 1, 2 * m.k} - {m.k}:
        other = E.Model(m.num_layers, m.moe_layers, m.num_experts, k)
        truth = other.truth(_N, seed=5)
        routes = other.routes(truth)
        for write in (
            lambda r: interop.to_vllm(r, lm),
            lambda r: interop.to_vllm_legacy(r, lm),
            lambda r: interop.to_vllm_split(r, lm, _P),
            lambda r: interop.to_sglang(r, lm),
            lambda r: interop.to_megatron_inference(r, lm),
            lambda r: interop.to_nemo_rl(r, lm),
            lambda r: interop.to_verl([r], lm, prompt_lengths=[_P]),
            lambda r: interop.to_megatron(r, layer_map=lm, fill=0),
        ):
            tried()
            with pytest.raises(mr.MoEReplayError):
                write(routes)
        for fmt, (write_engine, read, front) in _ENGINES.items():
            assert not _exact_or_refused(
                read, (write_engine(other, truth), lm), _want(m, m.truth(_N), front), f"{fmt} of k={k}"
            )


def _vllm_021(m: E.Model, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = E.vllm_021_request_output(m, list(range(_P)), [([1] * _C, truth)])
    return out.prompt_routed_experts, out.outputs[0].routed_experts


@pytest.mark.reliability("silent replays")
def test_vllm_021_prompt_rows_read_without_the_prompt_length_are_not_replayed_shifted() -> None:
    """Once silent: from_vllm_split read prompt_routed_experts without knowing the prompt's length, so a prompt
    array with a row too many at the front gave routes one token too long, and a replay with strict=False (which
    allows rows left unread) forced every token's neighbour's experts. Now prompt_len= checks the count, and
    routes read without it are refused by a replay that leaves rows unread, as the other readers' are."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, num_experts=8)
    ids = torch.randint(1, 128, (1, _N), generator=torch.Generator().manual_seed(4))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        captured = session.routes()
        lm = mr.LayerMap.from_session(session, num_layers=3)

        def logits(routes: mr.Routes, strict: bool) -> torch.Tensor:
            with session.replay(routes, strict=strict), torch.no_grad():
                return model(ids).logits

        reference = logits(captured, True)
        prompt, gen = interop.to_vllm_split(captured, lm, _P, drop_last=True)
        front = np.concatenate([prompt[-1:], prompt])  # a row too many at the front: every row one token late
        shifted = interop.from_vllm_split(front, gen, lm, completion_len=_C, cached_tokens=0, axes=_ENGINE)
        for strict in (False, True):
            with pytest.raises(mr.ReplayConsumptionError):
                logits(shifted, strict)
        with pytest.raises(mr.RoutesValidationError, match="prompt of 5 tokens"):
            interop.from_vllm_split(front, gen, lm, completion_len=_C, cached_tokens=0, prompt_len=_P)
        for given in (None, _P):
            exact = interop.from_vllm_split(
                prompt, gen, lm, completion_len=_C, cached_tokens=0, prompt_len=given, axes=_ENGINE
            )
            assert torch.equal(logits(exact, False), reference)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", list(_MODELS))
def test_vllm_021_completion_rows_clipped_to_the_output_leave_the_last_token_unrouted(model: str) -> None:
    """vLLM 0.21 clips the completion rows it captured to the output's length (rows past it are a speculative or
    MTP draft's), so a completion of c tokens may come with c rows, the last at the last token's place: no forward
    routed the last token, so that row is a rejected draft's. Once it was read as the last token's route (and
    forced there on replay); now the last token is -1 as with c - 1 rows, and the other rows stay in place."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, want = _truth(m, seed=6)
    prompt, gen = _vllm_021(m, truth)
    draft = m.truth(1, seed=7)[0]  # the route of the draft token the target model rejected at the last place
    clipped = np.concatenate([gen, draft[None].astype(gen.dtype)])
    for rows in (gen, clipped):
        tried()
        got = interop.from_vllm_split(prompt, rows, lm, completion_len=_C, cached_tokens=0, prompt_len=_P, axes=_ENGINE)
        assert got.equal(want)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.21's completion rows are taken up to completion_len and aligned from the front (0.21 clips "
    "rows captured past the output, a draft's, to the output's length); rows sliced from prompt_len - 1, as "
    "logprobs are, have as many rows and are read one token early for every completion token",
)
def test_vllm_021_completion_rows_sliced_one_early_are_refused() -> None:
    """A completion array sliced from the last prompt token (``rows[prompt_len - 1:]``, the logprob convention)
    with the prompt rows as vLLM wrote them: refused, never read one token early."""
    m = _MODELS["dense prefix k2"]
    lm = m.layer_map
    truth, want = _truth(m, seed=8)
    prompt, gen = _vllm_021(m, truth)
    early = np.concatenate([prompt[-1:], gen])
    assert not _exact_or_refused(
        lambda: interop.from_vllm_split(prompt, early, lm, completion_len=_C, cached_tokens=0, prompt_len=_P),
        (),
        want,
        "completion rows one early",
    )


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("layout", ["all", "moe"])
def test_verl_batches_of_turns_returned_from_a_start_round_trip_in_either_layout(layout: str) -> None:
    """Sequences whose first tokens the engine left out (-1 rows) and whole ones, with prompts of other lengths
    (left-padded) and responses of other lengths (right-padded), go through to_verl and from_verl unchanged, in
    the all-layer layout (SGLang, vLLM 0.22+) and the MoE-only one (vLLM 0.21)."""
    m = _MODELS["interleaved k2"]
    lm = m.layer_map
    truth, whole = _truth(m, seed=10)
    turn = m.routes(truth, front=_P - 1)
    short = m.routes(m.truth(_N - 3, seed=11))
    seqs, prompts = [turn, whole, short], [_P, _P - 1, 2]
    batch = interop.to_verl(seqs, lm, prompt_lengths=prompts, layout=layout)
    mask = mr.BatchLayout.split(prompts, [s.num_tokens for s in seqs]).attention_mask()
    got = interop.from_verl(batch, mask, lm, layout=layout, axes=_ENGINE)
    assert all(a.equal(b) for a, b in zip(got, seqs, strict=True))
    other = "moe" if layout == "all" else "all"
    with pytest.raises(mr.RoutesValidationError):
        interop.from_verl(batch, mask, lm, layout=other)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="Megatron's list of an unpacked [S, B] batch is sequence-first; read by from_megatron without "
    "batch_size= its rows are taken in the order given, and a replay on a model that routes the batch "
    "batch-major forces each token another sequence's experts: nothing in the list says how it was laid out",
)
def test_megatron_rows_of_an_unpacked_batch_read_without_batch_size_are_refused_on_a_batch_major_model() -> None:
    """get_recorded_data() of a [S, B] micro-batch read without batch_size=, replayed on a batch-major model."""
    model = mr.models.build("softmax_topk", num_layers=2, num_experts=8)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            reference = model(ids).logits
        captured = session.routes()
        lm = mr.LayerMap.from_session(session, num_layers=2)
        recorded = interop.to_megatron(captured, layer_map=lm, batch_size=2)  # Megatron's [S, B] order
        assert interop.from_megatron(recorded, lm.names, 8, batch_size=2).equal(captured)
        tried()
        try:
            read = interop.from_megatron(recorded, lm.names, 8)
            with session.replay(read), torch.no_grad():
                out = model(ids).logits
        except mr.MoEReplayError:
            return
        assert torch.equal(out, reference), "sequence-first rows replayed batch-major"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("model", ["all moe k1", "dense prefix k2"])
def test_a_prompt_start_or_start_len_other_than_the_requests_is_refused(model: str) -> None:
    """vLLM 0.22+'s routed_experts_prompt_start and SGLang's routed_experts_start_len leave the first tokens out; a
    reader told another start (or none) refuses the array, on an all-MoE model too, where a start of prompt_len or
    prompt_len - 1 once gave rows that fit another reader's count (the prompt missing, or shifted by one). SGLang's
    meta_info counts only bound the rows (a stop string may leave them fewer): read without num_tokens, fewer rows
    give routes shorter than the sequence, which a replay of its tokens refuses."""
    m = _MODELS[model]
    lm = m.layer_map
    truth, _ = _truth(m, seed=12)
    ids = list(range(100, 100 + _C))
    for start in range(_P + 1):
        out = E.vllm_033_request_output(m, list(range(_P)), [(ids, truth)], prompt_start=start)
        meta = E.sglang_meta_info(m, truth, start_len=start, prompt_len=_P)
        want = _want(m, truth, start)
        for told in range(_P + 1):
            for read, args in (
                (lambda o, s: interop.from_vllm_output(o, lm, prompt_start=s), (out, told)),
                (lambda o, s: interop.from_sglang(o, lm, start_len=s, num_tokens=_N, axes=_ENGINE), (meta, told)),
            ):
                assert _exact_or_refused(read, args, want, f"start {start} read as {told}") == (told == start)
            tried()
            try:
                bounded = interop.from_sglang(meta, lm, start_len=told, axes=_ENGINE)
            except mr.MoEReplayError:
                assert told != start
                continue
            assert bounded.equal(want) if told == start else bounded.num_tokens < _N


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("k", [1, 2])
def test_nemo_rl_payloads_of_vllm_021_with_cached_zero_rows_are_refused_or_read_natively(k: int) -> None:
    """Once silent: NeMo-RL copies vLLM 0.21's arrays (MoE-layer columns only), whose prefix-cached prompt rows are
    zero, and from_nemo_rl read such a row of a top-1 model (Llama-4's interleaved MoE layers) as expert 0 in every
    layer, forced on replay. Now a zero row of a MoE-only payload is refused as ambiguous unless cached_tokens=
    says how many leading tokens came from the cache; those are routed natively."""
    m = E.Model(num_layers=4, moe_layers=(1, 3), num_experts=8, k=k)
    lm = m.layer_map
    truth = m.truth(_N, seed=13)
    full = E.nemo_rl_routed_experts(m, truth, _P, split=True)
    full[:2] = 0  # vLLM 0.21: the first two prompt tokens came from the prefix cache
    payload = E.nemo_rl_envelope(full)
    read = lambda p: interop.from_nemo_rl(p, lm, num_tokens=_N)  # noqa: E731
    assert not _exact_or_refused(read, (payload,), m.routes(truth), "cached rows")
    got = interop.from_nemo_rl(payload, lm, num_tokens=_N, cached_tokens=2)
    assert got.equal(m.routes(truth, front=2))
    for wrong in (3, _N):
        with pytest.raises(mr.MoEReplayError):
            interop.from_nemo_rl(payload, lm, num_tokens=_N, cached_tokens=wrong)
    # every hidden layer's columns: vLLM 0.22+, whose cached rows hold their routes (cached_tokens= is refused)
    whole = E.nemo_rl_envelope(E.nemo_rl_routed_experts(m, truth, _P))
    assert interop.from_nemo_rl(whole, lm, num_tokens=_N).equal(m.routes(truth))
    with pytest.raises(mr.RoutesValidationError, match="vLLM 0.22"):
        interop.from_nemo_rl(whole, lm, num_tokens=_N, cached_tokens=0)


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("model", list(_MODELS))
def test_megatron_lists_round_trip_packed_and_sequence_first(model: str) -> None:
    """to_megatron then from_megatron gives the routes back: a packed batch as it is, an unpacked [S, B] batch
    through batch_size= both ways; the list holds the MoE layers in layer order; a -1 row (the last token) is
    refused without fill=, since Megatron gathers every index."""
    m = _MODELS[model]
    lm = m.layer_map
    seqs = [m.routes(m.truth(_N, seed=s))[:-1] for s in (14, 15)]  # (Megatron needs a route for every token)
    packed = mr.Routes.cat(seqs)
    tried()
    listed = interop.to_megatron(packed, layer_map=lm)
    assert len(listed) == len(m.moe_layers) and all(t.dtype == torch.int64 for t in listed)
    assert interop.from_megatron(listed, lm.names, m.num_experts).equal(packed)
    seq_first = interop.to_megatron(packed, layer_map=lm, batch_size=2)
    assert torch.equal(seq_first[0][:2], torch.stack([seqs[0].per_layer()[0][0], seqs[1].per_layer()[0][0]]))
    assert interop.from_megatron(seq_first, lm.names, m.num_experts, batch_size=2).equal(packed)
    with pytest.raises(mr.RoutesValidationError, match="fill="):
        interop.to_megatron(m.routes(m.truth(_N, seed=16)), layer_map=lm)


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize(("num_experts", "k"), [(128, 1), (129, 1), (256, 1), (256, 2), (257, 1)])
def test_the_last_expert_at_a_dtype_boundary_round_trips_through_every_writer(num_experts: int, k: int) -> None:
    """Expert ids at the edge of the narrow dtypes the engines pick (vLLM's uint8 up to 256 experts, NeMo-RL's int8
    up to 128): the last expert is a route, never taken for a wrapped -1, in every writer and reader."""
    m = E.Model(num_layers=3, moe_layers=(1, 2), num_experts=num_experts, k=k)
    lm = m.layer_map
    truth = m.truth(_N, seed=17)
    truth[:, :, 0] = num_experts - 1
    if k == 1:
        truth[1] = 0
    want = m.routes(truth)
    pairs: list[tuple[Callable[[mr.Routes], Any], Callable[[Any], mr.Routes]]] = [
        (lambda r: interop.to_vllm(r, lm), lambda a: interop.from_vllm(a, lm, prompt_len=_P, completion_len=_C)),
        (lambda r: interop.to_vllm_legacy(r, lm), lambda a: interop.from_vllm_legacy(a, lm, num_tokens=_N)),
        (
            lambda r: interop.to_vllm_split(r, lm, _P),
            lambda a: interop.from_vllm_split(*a, lm, completion_len=_C, cached_tokens=0, prompt_len=_P),
        ),
        (lambda r: interop.to_sglang(r, lm), lambda a: interop.from_sglang(a, lm, num_tokens=_N)),
        (lambda r: interop.to_nemo_rl(r, lm), lambda a: interop.from_nemo_rl(a, lm, num_tokens=_N)),
        (
            lambda r: interop.to_megatron_inference(r, lm),
            lambda a: interop.from_megatron_inference(a, lm, num_tokens=_N),
        ),
        (
            lambda r: interop.to_verl([r], lm, prompt_lengths=[_P]),
            lambda a: interop.from_verl(a, torch.ones(1, _N, dtype=torch.long), lm)[0],
        ),
    ]
    for write, read in pairs:
        tried()
        assert read(write(want)).equal(want)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_partial_rollout_resumed_and_concatenated_is_exact_only_from_the_last_token_routed(engine: str) -> None:
    """A generation cut off and resumed (verl's and slime's partial rollouts concatenate only the new rows): the
    resumed request must start its rows at the last token of the first part, which no forward of the first part
    routed. Started there the concatenation reads back exactly; a token later (a row short) or earlier (the row
    twice) is refused."""
    m = _MODELS["dense prefix k2"]
    lm = m.layer_map
    truth, want = _truth(m, seed=18)
    cut = _P + 2  # the first part: the prompt and two generated tokens

    def rows(tokens: int, prompt: int, start: int) -> np.ndarray:
        if engine == "vllm":
            return E.vllm_033_routed_experts(m, truth[:tokens], prompt, prompt_start=start)
        return _raw(_sglang_payload(m, truth[:tokens], start), m)

    first = rows(cut, _P, 0)
    for start in (cut - 2, cut - 1, cut):
        joined = np.concatenate([first, rows(_N, cut, start)])  # (the resumed request's prompt: the first part)
        tried()
        if engine == "vllm":
            joined = joined.astype(first.dtype)
            read = lambda a: interop.from_vllm(a, lm, prompt_len=_P, completion_len=_C)  # noqa: E731
        else:
            read = lambda a: interop.from_sglang(_rewrap("sglang", a), lm, num_tokens=_N, axes=_ENGINE)  # noqa: E731
        assert _exact_or_refused(read, (joined,), want, f"resumed from {start}") == (start == cut - 1)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="on a model whose every hidden layer routes, a NeMo-RL payload of vLLM 0.21 (MoE columns) has as many "
    "columns as one of 0.22+ (every hidden layer), so nothing tells its zero rows are 0.21's prefix-cached ones; "
    "with k=1 they read as expert 0 in every layer unless cached_tokens= is passed",
)
def test_nemo_rl_payloads_of_vllm_021_on_an_all_moe_top1_model_with_cached_zero_rows_are_refused() -> None:
    """The all-MoE counterpart of the interleaved case above, without cached_tokens=."""
    m = E.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=1)
    lm = m.layer_map
    truth = m.truth(_N, seed=19)
    full = E.nemo_rl_routed_experts(m, truth, _P, split=True)
    full[:2] = 0  # the first two prompt tokens came from the prefix cache
    read = lambda p: interop.from_nemo_rl(p, lm, num_tokens=_N)  # noqa: E731
    assert not _exact_or_refused(read, (E.nemo_rl_envelope(full),), m.routes(truth), "cached rows")
