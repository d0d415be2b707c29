"""Engine and trainer formats, both ways, on arrays built from each format's documented layout."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

# a model of 4 hidden layers: layer 0 dense, routers at layers 1..3, 16 experts, top-2
NUM_LAYERS, MOE_LAYERS, E, K = 4, (1, 2, 3), 16, 2
NAMES = tuple(f"model.layers.{i}.mlp.gate" for i in MOE_LAYERS)
LM = mr.LayerMap.from_names(NAMES, NUM_LAYERS, E, K)


def engine_rows(tokens: int, seed: int = 0) -> np.ndarray:
    """``[tokens, len(MOE_LAYERS), K]`` distinct experts per row."""
    g = np.random.default_rng(seed)
    return np.stack([[g.choice(E, K, replace=False) for _ in MOE_LAYERS] for _ in range(tokens)])


def all_layers(moe: np.ndarray, dtype=np.int32) -> np.ndarray:
    """The "all hidden layers" layout: a zero column for the dense layer 0, as engines leave it."""
    out = np.zeros((moe.shape[0], NUM_LAYERS, K), dtype=dtype)
    out[:, list(MOE_LAYERS)] = moe
    return out


def expected(moe: np.ndarray, missing_last: bool = True) -> mr.Routes:
    """What the routes of those rows must be: one router per MoE column, plus the unrouted last token."""
    layers = [torch.from_numpy(moe[:, j].astype(np.int64)) for j in range(len(MOE_LAYERS))]
    if missing_last:
        layers = [torch.cat([x, torch.full((1, K), -1)]) for x in layers]
    return mr.Routes(layers, names=NAMES, num_experts=E)


# ----------------------------------------------------------------------------- LayerMap
def test_layer_map_from_names_and_session() -> None:
    assert LM.layers == MOE_LAYERS and LM.dense_layers == (0,) and LM.moe_layers == MOE_LAYERS
    assert [LM.column(n, "all") for n in NAMES] == [1, 2, 3]
    assert [LM.column(n, "moe") for n in NAMES] == [0, 1, 2]
    assert (LM.width("all"), LM.width("moe")) == (4, 3)
    assert repr(LM) == "LayerMap(routers=3, num_layers=4, moe_layers=3, dense_layers=[0], mtp=[])"
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    with mr.attach(model) as session:
        lm = mr.LayerMap.from_session(session, num_layers=3)
    assert lm.names == ("layers.1.mlp.router", "layers.2.mlp.router") and lm.dense_layers == (0,)


def test_layer_map_errors() -> None:
    with pytest.raises(ValueError, match="MTP.*mtp='native'"):
        mr.LayerMap.from_names([*NAMES, "model.layers.4.mlp.gate"], NUM_LAYERS, E, K)
    with pytest.raises(ValueError, match="both map to hidden layer 1"):
        mr.LayerMap.from_names(["model.layers.1.mlp.gate", "model.layers.1.mlp.shared_gate"], NUM_LAYERS, E, K)
    with pytest.raises(ValueError, match="cannot find a layer index in router name 'gate'"):
        mr.LayerMap.from_names(["gate"], NUM_LAYERS, E, K)
    assert mr.LayerMap.from_names(["gate"], NUM_LAYERS, E, K, layers=[2]).moe_layers == (2,)
    with pytest.raises(ValueError, match="engine arrays hold one k"):
        _ = mr.LayerMap.from_names(NAMES[:2], NUM_LAYERS, E, [2, 4]).k


def test_wrong_map_is_caught_by_the_dense_column() -> None:
    """A map off by one layer (the dense-layer shift that breaks DeepSeek-V3 replay) fails loudly."""
    shifted = mr.LayerMap.from_names(NAMES, NUM_LAYERS, E, K, layers=[0, 1, 2])  # wrongly starts at 0
    with pytest.raises(mr.RoutesValidationError, match="column 3 holds expert choices"):
        interop.from_vllm_legacy(all_layers(engine_rows(5)), shifted)


def test_mtp_routers_route_natively_when_asked() -> None:
    lm = mr.LayerMap.from_names([*NAMES, "model.layers.4.mlp.gate"], NUM_LAYERS, E, K, mtp="native")
    moe = engine_rows(5)
    r = interop.from_vllm_legacy(all_layers(moe), lm)
    assert bool(r.layer("model.layers.4.mlp.gate").eq(-1).all())
    assert r.select(NAMES).equal(expected(moe))
    assert np.array_equal(interop.to_vllm_legacy(r, lm), all_layers(moe))  # the MTP router is left out


# ----------------------------------------------------------------------------- vLLM
def test_vllm_legacy_both_ways() -> None:
    moe = engine_rows(7)
    arr = all_layers(moe)  # [seq_len - 1, num_hidden_layers, k] int32
    r = interop.from_vllm_legacy(arr, LM, num_tokens=8)
    assert r.equal(expected(moe))
    back = interop.to_vllm_legacy(r, LM)
    assert back.dtype == np.int32 and np.array_equal(back, arr)
    with pytest.raises(mr.RoutesValidationError, match="a sequence of 9 tokens has 8"):
        interop.from_vllm_legacy(arr, LM, num_tokens=9)
    with pytest.raises(mr.RoutesValidationError, match="fits layout='moe'"):
        interop.from_vllm_legacy(moe.astype(np.int32), LM)


def test_last_row_is_dropped_only_when_unrouted_or_asked() -> None:
    routed = expected(engine_rows(6), missing_last=False)  # as a training forward records it
    with pytest.raises(mr.RoutesValidationError, match="drop_last=True"):
        interop.to_vllm_legacy(routed, LM)
    assert interop.to_vllm_legacy(routed, LM, drop_last=True).shape == (5, NUM_LAYERS, K)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
def test_vllm_split_arrays_both_ways(dtype) -> None:
    prompt, gen = engine_rows(5, seed=1), engine_rows(3, seed=2)  # 5 prompt tokens, 4 generated
    prompt_arr, gen_arr = prompt.astype(dtype), gen.astype(dtype)
    sentinel = -1 if np.issubdtype(dtype, np.signedinteger) else np.iinfo(dtype).max
    prompt_arr[:2] = sentinel  # prefix-cached rows
    r = interop.from_vllm(prompt_arr, gen_arr, LM, completion_len=4)
    assert r.num_tokens == 9
    want = expected(np.concatenate([prompt, gen]))
    assert bool(r[:2].missing.all()) and r[2:].equal(want[2:])
    p2, g2 = interop.to_vllm(r, LM, prompt_len=5, dtype=dtype)
    assert p2.dtype == dtype and np.array_equal(p2, prompt_arr) and np.array_equal(g2, gen_arr)
    # an array with a row for every generated token: its last row was never routed
    padded_gen = np.concatenate([gen_arr, gen_arr[:1]])
    assert interop.from_vllm(prompt_arr, padded_gen, LM, completion_len=4).equal(r)
    skipped = interop.from_vllm(prompt_arr[3:], gen_arr, LM, completion_len=4, prompt_start=3)
    assert bool(skipped[:3].missing.all()) and skipped[3:].equal(r[3:])
    with pytest.raises(mr.RoutesValidationError, match="vLLM gives 5"):
        interop.from_vllm(prompt_arr, gen_arr, LM, completion_len=6)


def test_vllm_request_output_either_layout() -> None:
    moe = engine_rows(7)
    ids = SimpleNamespace(prompt=list(range(5)), completion=list(range(3)))
    legacy = SimpleNamespace(
        prompt_token_ids=ids.prompt,
        outputs=[SimpleNamespace(token_ids=ids.completion, routed_experts=all_layers(moe))],
    )
    split = SimpleNamespace(
        prompt_token_ids=ids.prompt,
        prompt_routed_experts=moe[:5].astype(np.int16),
        outputs=[SimpleNamespace(token_ids=ids.completion, routed_experts=moe[5:].astype(np.int16))],
    )
    assert interop.from_vllm_output(legacy, LM).equal(expected(moe))
    assert interop.from_vllm_output(split, LM).equal(expected(moe))
    split.outputs[0].routed_experts = None
    with pytest.raises(mr.RoutesValidationError, match="enable_return_routed_experts"):
        interop.from_vllm_output(split, LM)


# ----------------------------------------------------------------------------- SGLang
def test_sglang_base64_both_ways() -> None:
    moe = engine_rows(6)
    flat = all_layers(moe).reshape(-1)  # flat [seq_len - 1, num_hidden_layers, k], dense included
    meta = {"routed_experts": base64.b64encode(flat.astype(np.int32).tobytes()).decode()}
    r = interop.from_sglang(meta, LM, num_tokens=7)
    assert r.equal(expected(moe))
    out = interop.to_sglang(r, LM)
    assert out["routed_experts"] == meta["routed_experts"] and out["routed_experts_dtype"] == "int32"
    small = interop.to_sglang(r, LM, dtype="uint8")
    assert small["routed_experts_dtype"] == "uint8" and len(base64.b64decode(small["routed_experts"])) == flat.size
    assert interop.from_sglang(small, LM).equal(r)
    assert interop.from_sglang(meta["routed_experts"], LM).equal(r)  # the bare string works too


def test_sglang_start_offset_and_fallback() -> None:
    moe = engine_rows(6)
    meta = {"routed_experts": base64.b64encode(all_layers(moe[2:]).tobytes()).decode()}
    r = interop.from_sglang(meta, LM, start=2, num_tokens=7)
    assert bool(r[:2].missing.all()) and r[2:].equal(expected(moe)[2:])
    # -1 rows do not fit uint8: SGLang's encoder falls back to int32 and says so
    assert interop.to_sglang(r, LM, dtype="uint8")["routed_experts_dtype"] == "int32"
    with pytest.raises(mr.RoutesValidationError, match="not a multiple of num_hidden_layers"):
        interop.from_sglang({"routed_experts": base64.b64encode(b"\0" * 12).decode()}, LM)
    with pytest.raises(mr.RoutesValidationError, match="--enable-return-routed-experts"):
        interop.from_sglang({"routed_experts": None}, LM)


# ----------------------------------------------------------------------------- Megatron
def test_megatron_list_and_token_order() -> None:
    seqs = [expected(engine_rows(4, seed=s), missing_last=False) for s in range(3)]
    batch = mr.pad_routes(seqs)  # batch-major [3 sequences, 4 positions]
    layers = interop.to_megatron(batch, layer_map=LM)
    assert len(layers) == 3 and all(t.dtype == torch.int64 and t.shape == (12, K) for t in layers)
    assert torch.equal(layers[0], batch.layer(NAMES[0]))
    seq_first = interop.to_megatron(batch, batch_size=3)  # Megatron's unpacked [S, B] order
    s, b = 1, 2
    assert torch.equal(seq_first[0][s * 3 + b], batch.layer(NAMES[0])[b * 4 + s])
    assert interop.from_megatron(seq_first, NAMES, E, batch_size=3).equal(batch)
    with pytest.raises(mr.RoutesValidationError, match="cannot route a token natively"):
        interop.to_megatron(expected(engine_rows(3)))
    filled = interop.to_megatron(expected(engine_rows(3)), fill=5)
    assert filled[0][-1].tolist() == [5, 6]


# ----------------------------------------------------------------------------- verl
def test_verl_from_agent_loop_layout() -> None:
    """verl places the engine's rows from prompt_width - len(prompt), zeros elsewhere."""
    prompt_width, response_width = 6, 5
    prompts, responses = [4, 6], [3, 5]
    batch = np.zeros((2, prompt_width + response_width, NUM_LAYERS, K), dtype=np.int32)
    mask = torch.zeros(2, prompt_width + response_width, dtype=torch.long)
    rows = []
    for i, (p, c) in enumerate(zip(prompts, responses, strict=True)):
        moe = engine_rows(p + c - 1, seed=i)  # what the engine returned for this sequence
        start = prompt_width - p
        batch[i, start : start + p + c - 1] = all_layers(moe)
        mask[i, start : prompt_width + c] = 1
        rows.append(moe)
    seqs = interop.from_verl(torch.from_numpy(batch), mask, LM)
    assert all(s.equal(expected(m)) for s, m in zip(seqs, rows, strict=True))
    back = interop.to_verl(seqs, LM, prompt_lengths=prompts, prompt_width=prompt_width, response_width=response_width)
    last = [prompt_width + c - 1 for c in responses]
    for i in range(2):
        assert bool((back[i, last[i], list(MOE_LAYERS)] == -1).all())  # the unrouted last token stays -1
        back[i, last[i]] = 0
    assert torch.equal(back, torch.from_numpy(batch))
    moe_layout = interop.to_verl(seqs, LM, prompt_lengths=prompts, layout="moe")
    assert moe_layout.shape == (2, prompt_width + max(responses), 3, K)


# ----------------------------------------------------------------------------- from a real capture
def test_capture_round_trips_through_every_format() -> None:
    model = mr.models.build("grouped_sigmoid", num_layers=3, first_dense_layers=1, num_experts=16, n_group=4)
    prompt = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with mr.attach(model) as session:
        with session.capture():
            model.generate(prompt, 5, attention_mask=mask)
        seqs = mr.split_generation(session.routes(), attention_mask=mask)
        lm = mr.LayerMap.from_session(session, num_layers=model.config.num_layers)
    plen = mask.sum(dim=1).tolist()
    for s, p in zip(seqs, plen, strict=True):
        assert interop.from_vllm_legacy(interop.to_vllm_legacy(s, lm), lm).equal(s)
        assert interop.from_vllm(*interop.to_vllm(s, lm, p), lm).equal(s)
        assert interop.from_vllm(*interop.to_vllm(s, lm, p, dtype=np.uint8), lm).equal(s)
        assert interop.from_sglang(interop.to_sglang(s, lm), lm).equal(s)
    verl = interop.to_verl(seqs, lm, prompt_lengths=plen)
    verl_mask = mr.BatchLayout.split(plen, [s.num_tokens for s in seqs]).attention_mask()
    assert all(a.equal(b) for a, b in zip(interop.from_verl(verl, verl_mask, lm), seqs, strict=True))
    packed = mr.pack_routes([s[:-1] for s in seqs])  # Megatron needs a route for every token
    assert interop.from_megatron(interop.to_megatron(packed, layer_map=lm), lm.names, 16).equal(packed)
