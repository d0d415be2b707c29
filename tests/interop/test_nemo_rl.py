"""NeMo-RL @7ea279ab: the ``nrlre1`` envelope, written as NeMo-RL's code writes it (see engines.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .engines import Model, nemo_rl_envelope, nemo_rl_routed_experts

DEEPSEEK = Model()


def test_every_token_a_row_the_last_a_placeholder() -> None:
    """``nemo_rl/models/generation/vllm/utils.py:238-303``: one row per prompt and completion token, the
    vLLM 0.22+ rows (all hidden layers) from the front, the last token's row ``arange(K)``; int8 for 16 experts
    (``interfaces.py:61-69``). The reader gives the last token -1 and the writer gives back the same string.
    """
    m = DEEPSEEK
    truth = m.truth(9)
    full = nemo_rl_routed_experts(m, truth, prompt_len=5)
    payload = nemo_rl_envelope(full)
    assert payload.startswith("nrlre1:int8:9x4x2:")
    r = interop.from_nemo_rl(payload, m.layer_map, num_tokens=9)
    assert r.equal(m.routes(truth))
    assert interop.to_nemo_rl(r, m.layer_map) == payload
    message = {"routed_experts": payload, "prompt_token_ids": [1] * 5, "generation_token_ids": [2] * 4}
    assert interop.from_nemo_rl({"message": message}, m.layer_map).equal(r)  # a chat choice
    assert interop.from_nemo_rl(message, m.layer_map).token_ids.tolist() == [1] * 5 + [2] * 4  # its tokens
    assert r.token_ids is None  # (an envelope alone names none)
    with pytest.raises(mr.RoutesValidationError, match="one per token, prompt and completion: 10"):
        interop.from_nemo_rl(payload, m.layer_map, num_tokens=10)
    with pytest.raises(mr.RoutesValidationError, match="one per token, prompt and completion: 8"):
        interop.from_nemo_rl({**message, "generation_token_ids": [2] * 3}, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="holds 9 token ids"):
        interop.from_nemo_rl(message, m.layer_map, num_tokens=8)


def test_moe_only_layers_and_the_legacy_list() -> None:
    """vLLM 0.21's MoE-only rows (``utils.py:154-169``) give ``L = num_moe_layers``, which NeMo-RL's Megatron side
    takes as well (``megatron/router_replay.py:167-188``); the legacy payload is the nested list
    (``routed_experts_codec.py:76-77``), or the tensor NeMo-RL decoded it to.
    """
    m = DEEPSEEK
    truth = m.truth(7, seed=1)
    full = nemo_rl_routed_experts(m, truth, prompt_len=3, split=True)
    assert full.shape == (7, 3, 2)
    r = interop.from_nemo_rl(nemo_rl_envelope(full), m.layer_map, num_tokens=7)
    assert r.equal(m.routes(truth))
    assert interop.to_nemo_rl(r, m.layer_map, layout="moe") == nemo_rl_envelope(full)
    assert interop.from_nemo_rl(full.tolist(), m.layer_map, num_tokens=7).equal(r)
    assert interop.from_nemo_rl(torch.from_numpy(full.astype(np.int16)), m.layer_map).equal(r)
    every = Model(num_layers=3, moe_layers=(0, 1, 2))  # no dense layer: both widths are 3, and one layout
    t = every.truth(4, seed=2)
    assert interop.from_nemo_rl(nemo_rl_envelope(nemo_rl_routed_experts(every, t, 2)), every.layer_map).equal(
        every.routes(t)
    )


def test_rows_vllm_did_not_return_are_refused_unless_native() -> None:
    """``utils.py:230-234``: vLLM returned fewer rows; NeMo-RL copies them from the front and writes all -1 rows
    after them, which its Megatron side routes natively (``megatron/router_replay.py:325-348``). Where vLLM lost
    the rows cannot be told, so the reader asks for ``missing="native"``; then the writer gives back the string.
    """
    m = DEEPSEEK
    truth = m.truth(8, seed=3)
    payload = nemo_rl_envelope(nemo_rl_routed_experts(m, truth, prompt_len=4, returned=5))
    with pytest.raises(mr.RoutesValidationError, match="token 5 is all -1.*missing='native'"):
        interop.from_nemo_rl(payload, m.layer_map, num_tokens=8)
    r = interop.from_nemo_rl(payload, m.layer_map, num_tokens=8, missing="native")
    assert r[:5].equal(m.routes(truth)[:5]) and bool(r.missing[5:].all())
    assert interop.to_nemo_rl(r, m.layer_map) == payload
    with pytest.raises(mr.RoutesValidationError, match="missing must be"):
        interop.from_nemo_rl(payload, m.layer_map, missing="skip")


def test_a_single_routers_missing_row_reads_back_as_written() -> None:
    """Once refused: to_nemo_rl writes a single router's -1 row as -1 in its column (NeMo-RL's Megatron side routes
    that token natively in that layer), but from_nemo_rl refused any -1 short of a whole token row unless
    missing="native", so what moe_replay wrote it could not read back. Only whole token rows (NeMo-RL's fill for
    rows vLLM did not return, whose alignment is a guess) need missing="native"."""
    m = DEEPSEEK
    truth = m.truth(6, seed=3)
    one = list(m.routes(truth).per_layer())
    one[1][0] = -1
    one[0][2] = -1
    one[2][2] = -1
    single = mr.Routes(one, names=m.layer_map.names, num_experts=16)
    for layout in ("all", "moe"):
        payload = interop.to_nemo_rl(single, m.layer_map, layout=layout)
        for missing in ("error", "native"):
            assert interop.from_nemo_rl(payload, m.layer_map, missing=missing).equal(single)
    every = list(single.per_layer())  # token 3 of no router: NeMo-RL's fill, read back only as missing="native"
    for x in every:
        x[3] = -1
    whole = mr.Routes(every, names=m.layer_map.names, num_experts=16)
    payload = interop.to_nemo_rl(whole, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="token 3 is all -1.*missing='native'"):
        interop.from_nemo_rl(payload, m.layer_map)
    assert interop.from_nemo_rl(payload, m.layer_map, missing="native").equal(whole)
    arr = np.stack([np.asarray(x.tolist()) for x in single.per_layer()], axis=1)  # a -2 is nobody's -1
    arr = np.concatenate([np.zeros((6, 1, 2), np.int64), arr], axis=1).astype(np.int8)
    arr[2, 1] = [-2, -2]
    arr[-1] = [0, 1]
    for missing in ("error", "native"):
        with pytest.raises(mr.RoutesValidationError, match="token 2, column 1 holds \\[-2, -2\\]"):
            interop.from_nemo_rl(nemo_rl_envelope(arr), m.layer_map, missing=missing)


@pytest.mark.parametrize("experts", [128, 129, 300])
def test_dtype_by_expert_count(experts: int) -> None:
    """``interfaces.py:61-69``: the narrowest signed dtype holding ids ``0 .. E - 1`` (int8 up to 128 experts);
    one too narrow is refused on write, and an envelope too narrow for the map on read (its ids wrapped).
    """
    m = Model(num_experts=experts)
    truth = m.truth(5, seed=4)
    truth[0, 0] = [experts - 1, 0]
    payload = nemo_rl_envelope(nemo_rl_routed_experts(m, truth, prompt_len=2))
    assert payload.split(":")[1] == interop.nemo_rl_dtype(experts)
    r = interop.from_nemo_rl(payload, m.layer_map, num_tokens=5)
    assert r.equal(m.routes(truth))
    assert interop.to_nemo_rl(r, m.layer_map) == payload
    assert interop.from_nemo_rl(interop.to_nemo_rl(r, m.layer_map, dtype="int32"), m.layer_map).equal(r)
    if experts > 128:
        with pytest.raises(mr.RoutesValidationError, match="int8 cannot hold expert index"):
            interop.to_nemo_rl(r, m.layer_map, dtype="int8")
        wrapped = np.frombuffer(base64.b64decode(payload.split(":")[3]), np.int16).astype(np.int8)
        with pytest.raises(mr.RoutesValidationError, match="int8, which cannot hold"):
            interop.from_nemo_rl(nemo_rl_envelope(wrapped.reshape(5, 4, 2)), m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="dtype must be one of"):
        interop.to_nemo_rl(r, m.layer_map, dtype="uint8")


def test_the_last_token_holds_no_route() -> None:
    m = DEEPSEEK
    routed = m.routes(m.truth(4, seed=5), last=False)
    with pytest.raises(mr.RoutesValidationError, match="drop_last=True"):
        interop.to_nemo_rl(routed, m.layer_map)
    payload = interop.to_nemo_rl(routed, m.layer_map, drop_last=True)
    r = interop.from_nemo_rl(payload, m.layer_map)
    assert r[:3].equal(routed[:3]) and bool(r.missing[3].all())


def test_turns_stitch_as_nemo_gym_does() -> None:
    """``environments/nemo_gym.py:886-891``: the next turn's prefill gives the previous turn's last token its route."""
    m = DEEPSEEK
    truth = m.truth(10, seed=6)
    first = interop.from_nemo_rl(nemo_rl_envelope(nemo_rl_routed_experts(m, truth[:6], 3)), m.layer_map)
    second = interop.from_nemo_rl(nemo_rl_envelope(nemo_rl_routed_experts(m, truth, 8)), m.layer_map)
    assert interop.stitch_turns([first, second]).equal(m.routes(truth))


def _envelope(head: str, rows: np.ndarray) -> str:
    return head + base64.b64encode(rows.tobytes()).decode()


_LM = DEEPSEEK.layer_map
_ROWS = nemo_rl_routed_experts(DEEPSEEK, DEEPSEEK.truth(3, seed=7), 2)  # int8 [3, 4, 2]
_DENSE = _ROWS.copy()
_DENSE[0, 0] = [0, 1]
_RANGE = _ROWS.copy()
_RANGE[0, 1] = [16, 0]
_DUP = _ROWS.copy()
_DUP[1, 2] = [3, 3]
_LAST = _ROWS.copy()
_LAST[-1, 1] = [1, 0]
_PARTIAL = _ROWS.copy()
_PARTIAL[0, 1] = [-1, 2]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        pytest.param(_envelope("nrlre2:int8:3x4x2:", _ROWS), "version 'nrlre2' is not read", id="version"),
        pytest.param(_envelope("nrl:int8:3x4x2:", _ROWS), "not a 'nrlre1:", id="magic"),
        pytest.param("nrlre1:int8:3x4x2", "not a 'nrlre1:", id="no data field"),
        pytest.param(_envelope("nrlre1:uint8:3x4x2:", _ROWS), "dtype 'uint8' is not one", id="dtype"),
        pytest.param(_envelope("nrlre1:int8:3x8:", _ROWS), "not three integers", id="two dims"),
        pytest.param(_envelope("nrlre1:int8:3x4x2x1:", _ROWS), "not three integers", id="four dims"),
        pytest.param(_envelope("nrlre1:int8:-3x4x2:", _ROWS), "not three integers", id="negative"),
        pytest.param(_envelope("nrlre1:int8:4x4x2:", _ROWS), "24 bytes.*needs 32", id="bytes short"),
        pytest.param(_envelope("nrlre1:int16:3x4x2:", _ROWS), "24 bytes.*needs 48", id="dtype lies"),
        pytest.param("nrlre1:int8:3x4x2:***", "not base64", id="base64"),
        pytest.param(_envelope("nrlre1:int8:3x5x2:", np.zeros((3, 5, 2), np.int8)), "needs \\[tokens, 3", id="L"),
        pytest.param(_envelope("nrlre1:int8:3x4x1:", np.zeros((3, 4, 1), np.int8)), "needs \\[tokens", id="K"),
        pytest.param(_envelope("nrlre1:int8:0x4x2:", _ROWS[:0]), "holds no token", id="empty"),
        pytest.param(nemo_rl_envelope(_LAST), "not NeMo-RL's placeholder", id="last row"),
        pytest.param(nemo_rl_envelope(_DENSE), "column 0 holds expert choices", id="dense column"),
        pytest.param(nemo_rl_envelope(_RANGE), "index must be in \\[0, 15\\]", id="range"),
        pytest.param(nemo_rl_envelope(_DUP), "k distinct experts", id="duplicate"),
        pytest.param(nemo_rl_envelope(_PARTIAL), "whole row of k.*or a whole token row", id="partial -1"),
        pytest.param({"content": "hi"}, "has no routed_experts", id="message without routes"),
        pytest.param(
            {"routed_experts": nemo_rl_envelope(_ROWS), "prompt_token_ids": 2, "generation_token_ids": [1]},
            "must be lists of token ids",
            id="token ids not lists",
        ),
        pytest.param(_envelope("nrlre1:int8:\u0663x4x2:", _ROWS), "not three integers", id="non-ASCII digit"),
        pytest.param(np.zeros((3, 4), np.int32), "needs \\[tokens", id="2-d list"),
    ],
)
def test_what_nemo_rl_never_writes_is_refused(payload: object, match: str) -> None:
    with pytest.raises(mr.RoutesValidationError, match=match):
        interop.from_nemo_rl(payload, _LM)


def test_nemo_rl_dtype_needs_an_expert_count() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(mr.MoEReplayError):
            interop.nemo_rl_dtype(bad)  # type: ignore[arg-type]
