"""Engine arrays whose shape fits more than one order of their axes: proven from what is known, or refused.

An engine writes ``[tokens, layers, k]``. An array with as many rows as layer columns (or as many
layer columns as k) has the shape of a stack of per-layer arrays too, and was read without complaint
in the wrong order, every token given another token's experts. Each case here is checked against a
capture of the same tokens in PyTorch.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_replay as mr
from moe_replay import interop

from ..conftest import examples, tried
from . import engines as E

_ENGINE = "tokens,layers,k"
_STACKED = "layers,tokens,k"


def _captured(num_layers: int, first_dense: int, tokens: int, top_k: int = 2, seed: int = 0) -> tuple[Any, ...]:
    """A model, its LayerMap, ``tokens`` ids, the captured routes and the logits of that forward."""
    model = mr.models.build(
        "softmax_topk", num_layers=num_layers, first_dense_layers=first_dense, num_experts=8, top_k=top_k, seed=seed
    )
    ids = torch.randint(1, 128, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            logits = model(ids).logits
        lm = mr.LayerMap.from_session(session, num_layers=num_layers)
        routes = session.routes()
    return model, lm, ids, routes, logits


def _replayed(model: Any, ids: torch.Tensor, routes: mr.Routes) -> torch.Tensor:
    with mr.attach(model) as session, session.replay(routes), torch.no_grad():
        return model(ids).logits


def _unrouted_last(routes: mr.Routes) -> mr.Routes:
    """The routes as an engine returns them: the last token's row -1 (never routed)."""
    return mr.Routes(
        [x.index_fill(0, torch.tensor([routes.num_tokens - 1]), -1) for x in routes.per_layer()],
        routes.names,
        routes.experts_per_layer,
    )


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr.astype("<i4")).tobytes()).decode()


#: name -> (engine array of the sequence from the routes, reader taking (array, layer_map, axes=...)); p: prompt length
_READERS: dict[str, tuple[Callable[..., np.ndarray], Callable[..., mr.Routes]]] = {
    "vllm 0.22+": (
        lambda r, lm: interop.to_vllm(r, lm),
        lambda a, lm, n, **kw: interop.from_vllm(a, lm, prompt_len=n - 2, completion_len=2, **kw),
    ),
    "vllm <=0.20": (
        lambda r, lm: interop.to_vllm_legacy(r, lm),
        lambda a, lm, n, **kw: interop.from_vllm_legacy(a, lm, num_tokens=n, **kw),
    ),
    "megatron inference": (
        lambda r, lm: interop.to_megatron_inference(r, lm),
        lambda a, lm, n, **kw: interop.from_megatron_inference(a, lm, num_tokens=n, **kw),
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reader", list(_READERS))
def test_a_square_array_of_an_all_moe_model_stacked_per_layer_is_refused_naming_axes(reader: str) -> None:
    """Once silent: on a model whose every layer routes, an array of as many routed tokens as layers, given stacked
    per layer ([layers, tokens, k]), fit every check and was read with each token given another's experts. Nothing
    in it tells the order (no dense column, every expert in range, none repeated in either reading): it is refused
    naming axes=, and read exactly with the order told; the engine's own order is refused without axes= too."""
    write, read = _READERS[reader]
    model, lm, ids, routes, logits = _captured(4, 0, tokens=5)
    truth = _unrouted_last(routes)
    arr = write(truth, lm)
    assert arr.shape[0] == arr.shape[1]  # (the case: as many routed tokens as layer columns)
    stacked = np.ascontiguousarray(arr.transpose(1, 0, 2))
    for either in (stacked, arr):
        tried()
        with pytest.raises(mr.RoutesValidationError, match="cannot tell its axes.*axes='tokens,layers,k'"):
            read(either, lm, 5)
    assert read(stacked, lm, 5, axes=_STACKED).equal(truth)
    assert read(arr, lm, 5, axes=_ENGINE).equal(truth)
    assert torch.equal(_replayed(model, ids, read(stacked, lm, 5, axes=_STACKED)), logits)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reader", ["vllm 0.22+", "vllm <=0.20"])
def test_a_square_array_of_a_model_with_a_dense_layer_is_proven_by_its_dense_column(reader: str) -> None:
    """With a dense first layer (DeepSeek's first_k_dense_replace) the engine's own order is proven by its data: the
    dense column is zero, while read stacked the dense layer's row (zero) lands in every token's routes. So the
    engine's array reads without axes= (exactly the capture), and the stacked one is refused as in another order."""
    write, read = _READERS[reader]
    model, lm, ids, routes, logits = _captured(4, 1, tokens=5)
    truth = _unrouted_last(routes)
    arr = write(truth, lm)
    assert arr.shape[0] == arr.shape[1]
    got = read(arr, lm, 5)
    assert got.equal(truth)
    assert torch.equal(_replayed(model, ids, got), logits)
    with pytest.raises(mr.RoutesValidationError, match="column 0 holds expert choices.*axes='layers,tokens,k'"):
        read(np.ascontiguousarray(arr.transpose(1, 0, 2)), lm, 5)
    assert read(np.ascontiguousarray(arr.transpose(1, 0, 2)), lm, 5, axes=_STACKED).equal(truth)


@pytest.mark.reliability("silent replays")
def test_an_engine_output_object_holds_its_array_in_the_engines_order() -> None:
    """vLLM's own RequestOutput and SGLang's own meta_info (whole response or not: it always counts prompt_tokens and
    completion_tokens) hold the array as the engine wrote it: a square one of an all-MoE model reads without axes=,
    exactly the capture. The payload alone, or in a dict without SGLang's counts, carries no shape: refused."""
    model, lm, ids, routes, logits = _captured(4, 0, tokens=5)
    truth = _unrouted_last(routes)
    tok = ids[0].tolist()
    arr = interop.to_vllm(truth, lm)
    out = SimpleNamespace(
        prompt_token_ids=tok[:3], outputs=[SimpleNamespace(index=0, token_ids=tok[3:], routed_experts=arr)]
    )
    assert interop.from_vllm_output(out, lm).equal(truth)
    response = {
        "output_ids": tok[3:],
        "meta_info": {"routed_experts": _b64(arr), "prompt_tokens": 3, "completion_tokens": 2},
    }
    assert interop.from_sglang(response, lm).equal(truth)
    assert interop.from_sglang(response["meta_info"], lm).equal(truth)


@pytest.mark.reliability("false refusals")
def test_sglangs_payload_alone_is_read_in_sglangs_order_and_a_stacks_bytes_say_theirs() -> None:
    """SGLang's base64 payload is its wire encoding, [tokens, layers, k] with no shape: given alone (the string
    kept from meta_info, or in a dict without SGLang's counts) on an all-MoE model it reads exactly in SGLang's
    order, as SGLang wrote it; the bytes of a per-layer stack made by other code say their order with axes=."""
    model, lm, ids, routes, logits = _captured(4, 0, tokens=5)
    truth = _unrouted_last(routes)
    arr = interop.to_vllm_legacy(truth, lm)
    payload = interop.to_sglang(truth, lm)["routed_experts"]
    assert payload == _b64(arr)  # (this library's writer writes SGLang's order)
    for bare in (payload, payload.encode(), {"routed_experts": payload}):
        got = interop.from_sglang(bare, lm, num_tokens=5)
        assert got.equal(truth)
        assert torch.equal(_replayed(model, ids, got), logits)
    stacked = _b64(np.ascontiguousarray(arr.transpose(1, 0, 2)))
    assert interop.from_sglang(stacked, lm, num_tokens=5, axes=_STACKED).equal(truth)
    assert not interop.from_sglang(stacked, lm, num_tokens=5).equal(truth)  # (what axes= is for)


@pytest.mark.reliability("silent replays")
def test_an_array_stacked_on_its_last_axis_when_k_equals_the_layers_is_exact_or_refused() -> None:
    """k == number of layers: [tokens, k, layers] (per-layer arrays stacked on the last axis) has the engine's
    shape. Read without axes= it is refused (or, where its data proves the order, read exactly), never read with
    each token's experts mixed across layers; told, it reads exactly."""
    model, lm, ids, routes, logits = _captured(2, 0, tokens=4, top_k=2)
    truth = _unrouted_last(routes)
    arr = interop.to_vllm(truth, lm)
    swapped = np.ascontiguousarray(arr.transpose(0, 2, 1))
    tried()
    try:
        got = interop.from_vllm(swapped, lm, prompt_len=2, completion_len=2)
    except mr.RoutesValidationError as e:
        assert "axes" in str(e)
    else:
        assert got.equal(truth)
    assert interop.from_vllm(swapped, lm, prompt_len=2, completion_len=2, axes="tokens,k,layers").equal(truth)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("axes", ["tokens,layers", "tokens,layers,experts", 3, "k,k,tokens"])
def test_axes_that_name_no_order_of_the_three_axes_are_refused(axes: Any) -> None:
    lm = E.Model(num_layers=4, moe_layers=(0, 1, 2, 3)).layer_map
    arr = np.zeros((4, 4, 2), np.uint8)
    with pytest.raises(mr.RoutesValidationError, match="permutation of 'tokens,layers,k'"):
        interop.from_vllm(arr, lm, prompt_len=3, completion_len=2, axes=axes)


def _megatron_list(num_layers: int = 4, tokens: int = 6) -> tuple[Any, ...]:
    """An all-MoE model's captured routes and Megatron's list of them (layer order), its names and layer_numbers."""
    model, lm, ids, routes, logits = _captured(num_layers, 0, tokens=tokens)
    tensors = interop.to_megatron(routes, layer_map=lm)
    numbers = [i + 1 for i in lm.layers]  # (Megatron's RouterReplay.layer_number counts from 1)
    return model, lm, ids, routes, logits, tensors, numbers


@pytest.mark.reliability("silent replays")
def test_a_megatron_list_reordered_on_the_way_is_refused_given_its_layer_numbers() -> None:
    """Megatron's list holds no layer number: a list reversed (or sorted as text) on the way reads each router
    another layer's routes. With the RouterReplay layer_numbers of its tensors the order is proven: in order it
    reads exactly (the replay gives the captured logits), reordered it is refused, and so are layer numbers that
    keep no one distance to the layers the names say (names of other routers)."""
    model, lm, ids, routes, logits, tensors, numbers = _megatron_list()
    got = interop.from_megatron(tensors, lm.names, 8, layer_numbers=numbers)
    assert got.equal(routes)
    assert torch.equal(_replayed(model, ids, got), logits)
    with pytest.raises(mr.RoutesValidationError, match="reordered on the way"):
        interop.from_megatron(tensors[::-1], lm.names, 8, layer_numbers=numbers[::-1])
    with pytest.raises(mr.RoutesValidationError, match="not one distance"):
        interop.from_megatron(tensors, lm.names, 8, layer_numbers=[1, 2, 4, 5])
    with pytest.raises(mr.RoutesValidationError, match="3 layer_numbers for 4"):
        interop.from_megatron(tensors, lm.names, 8, layer_numbers=numbers[:3])
    with pytest.raises(mr.MoEReplayError, match="layer_numbers must be"):
        interop.from_megatron(tensors, lm.names, 8, layer_numbers="1234")


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="Megatron's per-layer list holds no layer number: a list reversed on the way, read with the names in "
    "layer order and no layer_numbers=, gives each router another layer's routes, and nothing in the tensors tells",
)
def test_a_reversed_megatron_list_without_layer_numbers_is_refused() -> None:
    model, lm, ids, routes, logits, tensors, numbers = _megatron_list()
    tried()
    try:
        got = interop.from_megatron(tensors[::-1], lm.names, 8)
    except mr.MoEReplayError:
        return
    assert got.equal(routes), "a reversed list read silently as other routes"


@pytest.mark.reliability("silent replays")
def test_a_verl_batch_as_wide_as_the_layers_given_stacked_per_layer_is_refused_naming_axes() -> None:
    """Once silent: a verl batch of routes recorded in a training forward (last_routed=True, no padding) as wide as
    the model has layers, given as [batch, layers, seq, k], read every token with another token's experts. It is
    refused naming axes= where nothing proves the order, and read exactly with the order told."""
    model, lm, ids, routes, logits = _captured(4, 0, tokens=4)
    batch = interop.to_verl([routes], lm, prompt_lengths=[2])
    mask = torch.ones(1, 4, dtype=torch.long)
    stacked = batch.transpose(1, 2).contiguous()
    tried()
    with pytest.raises(mr.RoutesValidationError, match="cannot tell its axes"):
        interop.from_verl(stacked, mask, lm, last_routed=True)
    got = interop.from_verl(stacked, mask, lm, last_routed=True, axes=_STACKED)[0]
    assert got.equal(routes)
    assert torch.equal(_replayed(model, ids, got), logits)
    assert interop.from_verl(batch, mask, lm, last_routed=True, axes=_ENGINE)[0].equal(routes)


@pytest.mark.reliability("silent replays")
def test_a_megatron_tensor_given_as_k_by_tokens_when_tokens_equal_k_is_refused() -> None:
    """Once silent: from_megatron takes no k and no LayerMap, so a per-layer tensor given as [k, tokens] where tokens
    == k (a micro-batch of k tokens) has the shape of Megatron's [tokens, k], and was read with each token given the
    experts of one choice rank across tokens. Where no layer holds an expert twice in a row read either way it is
    refused naming axes=, and told the order either way it reads exactly (the replay gives the captured logits)."""
    for seed in range(8):
        model, lm, ids, routes, logits = _captured(2, 0, tokens=2, seed=seed)
        tensors = interop.to_megatron(routes, layer_map=lm)
        swapped = [t.T.contiguous() for t in tensors]
        if all(torch.equal(t, s) for t, s in zip(tensors, swapped, strict=True)):
            continue  # (a tensor its own transpose reads the same either way)
        tried()
        try:
            got = interop.from_megatron(swapped, lm.names, 8)
        except mr.MoEReplayError as e:
            assert "axes=" in str(e) or "repeats an expert" in str(e), e
        else:
            raise AssertionError(f"a [k, tokens] list read silently as other routes: {got.equal(routes)}")
        told = interop.from_megatron(swapped, lm.names, 8, axes="k,tokens")
        assert told.equal(routes)
        assert torch.equal(_replayed(model, ids, told), logits)
        assert interop.from_megatron(tensors, lm.names, 8, axes="tokens,k").equal(routes)
    with pytest.raises(mr.MoEReplayError, match="axes names the order"):
        interop.from_megatron(tensors, lm.names, 8, axes="tokens,layers,k")


@pytest.mark.reliability("silent replays")
def test_a_one_token_megatron_step_of_a_top1_model_and_an_ordinary_batch_read_without_axes() -> None:
    """The square-tensor refusal leaves ordinary outputs alone: a one-token step of a top-1 model ([1, 1] per
    layer), a micro-batch of more tokens than k, and a square micro-batch whose data proves the order (an expert
    twice in a row of the transposed reading) read exactly without axes=."""
    for tokens, top_k in ((1, 1), (5, 2), (1, 2)):
        model, lm, ids, routes, logits = _captured(2, 0, tokens=tokens, top_k=top_k)
        got = interop.from_megatron(interop.to_megatron(routes, layer_map=lm), lm.names, 8)
        assert got.equal(routes)
        assert torch.equal(_replayed(model, ids, got), logits)
    proven = [torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 4], [3, 5]])]  # (the transpose repeats expert 0, 3)
    got = interop.from_megatron(proven, ["layers.0.router", "layers.1.router"], 8)
    assert [t.tolist() for t in got.per_layer()] == [t.tolist() for t in proven]
    with pytest.raises(mr.RoutesValidationError, match="axes='k,tokens'"):
        interop.from_megatron([proven[0].T, proven[1]], ["layers.0.router", "layers.1.router"], 8)


@st.composite
def _shapes(draw: st.DrawFn) -> tuple[E.Model, int, int, int]:
    """Small models and sequences, where as many routed tokens as layers (or layers as k) are common."""
    num_layers = draw(st.integers(1, 5))
    dense = draw(st.integers(0, num_layers - 1))
    num_experts = draw(st.sampled_from([2, 4, 8, 300]))
    k = draw(st.integers(1, min(num_experts, 4)))
    model = E.Model(num_layers=num_layers, moe_layers=tuple(range(dense, num_layers)), num_experts=num_experts, k=k)
    tokens = draw(st.integers(2, 7))
    return model, tokens, draw(st.integers(1, tokens - 1)), draw(st.integers(0, 2**16))


_ORDERS = {"engine": (0, 1, 2), "stacked": (1, 0, 2), "stacked last": (0, 2, 1)}


@pytest.mark.reliability("silent replays")
@examples(60)
@given(_shapes(), st.sampled_from(list(_ORDERS)))
def test_an_array_in_any_order_of_its_axes_reads_exactly_or_is_refused(case: Any, order: str) -> None:
    """Any model shape, any sequence, the engine's array given as the engine wrote it or stacked per layer (on the
    first or the last axis): every bare-array reader gives the engine's routes exactly or refuses; none reads
    another token's (or layer's) experts. Told the order with axes=, it reads exactly."""
    m, tokens, prompt, seed = case
    truth = m.truth(tokens, seed=seed)
    want = m.routes(truth)
    lm = m.layer_map
    arr = E.vllm_033_routed_experts(m, truth, prompt)
    moe = E.megatron_routing_indices(m, truth)
    perm = _ORDERS[order]
    names = ",".join(np.array(["tokens", "layers", "k"])[list(perm)])
    reads: dict[str, tuple[np.ndarray, Callable[..., mr.Routes]]] = {
        "vllm": (
            arr,
            lambda a, **kw: interop.from_vllm(a, lm, prompt_len=prompt, completion_len=tokens - prompt, **kw),
        ),
        "megatron inference": (moe, lambda a, **kw: interop.from_megatron_inference(a, lm, num_tokens=tokens, **kw)),
    }
    for name, (a, read) in reads.items():
        tried()
        try:
            got = read(np.ascontiguousarray(a.transpose(perm)))
        except mr.MoEReplayError:
            pass
        else:
            assert got.equal(want), f"{name}: an array {order} read silently as other routes"
        assert read(np.ascontiguousarray(a.transpose(perm)), axes=names).equal(want), name
    # (SGLang's bytes hold no shape: read in SGLang's order unless told, and told any order they read exactly)
    told = interop.from_sglang(_b64(np.ascontiguousarray(arr.transpose(perm))), lm, num_tokens=tokens, axes=names)
    assert told.equal(want)


@pytest.mark.reliability("silent replays")
def test_a_nemo_rl_payload_stacked_per_layer_is_refused_where_its_placeholder_row_does_not_tell() -> None:
    """Once silent: NeMo-RL's [S, L, K] payload ends with the placeholder row arange(k); stacked per layer its last
    row is the last layer's routes, which on a top-1 model sending every token there to expert 0 looks the same,
    and the array was read with each token given another token's experts. Such a payload is refused naming axes=;
    a message with its token ids holds it as NeMo-RL writes it; told, either order reads exactly."""
    model, lm, ids, routes, logits = _captured(4, 0, tokens=4, top_k=1)
    truth = _unrouted_last(routes)
    rows = interop.to_vllm(truth, lm).astype(np.int8)  # [3, 4, 1]
    rows[:, 3] = 0  # (the last layer sends every routed token to expert 0)
    full = np.concatenate([rows, np.zeros((1, 4, 1), np.int8)])  # NeMo-RL's placeholder row: arange(1)
    want = interop.from_vllm(rows, lm, prompt_len=2, completion_len=2, version="0.33", axes=_ENGINE)
    stacked = np.ascontiguousarray(full.transpose(1, 0, 2))
    for payload in (E.nemo_rl_envelope(stacked), stacked.tolist(), E.nemo_rl_envelope(full)):
        tried()
        with pytest.raises(mr.RoutesValidationError, match="cannot tell its axes"):
            interop.from_nemo_rl(payload, lm, num_tokens=4)
    assert interop.from_nemo_rl(E.nemo_rl_envelope(stacked), lm, num_tokens=4, axes=_STACKED).equal(want)
    assert interop.from_nemo_rl(E.nemo_rl_envelope(full), lm, num_tokens=4, axes=_ENGINE).equal(want)
    tok = ids[0].tolist()
    message = {"routed_experts": E.nemo_rl_envelope(full), "prompt_token_ids": tok[:2], "generation_token_ids": tok[2:]}
    got = interop.from_nemo_rl({"message": message}, lm)
    assert got.equal(want)
    with mr.attach(model) as session, session.replay(got), torch.no_grad():
        model(ids)  # (the replay reads every row, on the tokens the message names)
