"""SGLang 0.5.23: fake ``meta_info`` written as SGLang's code writes it (see engines.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .engines import Model, sglang_meta_info

DEEPSEEK = Model()


def test_single_turn_int32_all_layers_without_a_dtype_field() -> None:
    """SGLang 0.5.23: flat int32 bytes, all hidden layers, fused shared-expert slots cut off.

    ``state_capturer/routed_experts.py:72-73`` (``num_hidden_layers``), ``:119-121`` and ``:145-147``
    (slots past k cut), ``state_capturer/base.py:38-42`` (int32), ``managers/detokenizer_manager.py:432-448``
    (base64 of ``tobytes()``; no dtype key).
    """
    m = DEEPSEEK
    truth = m.truth(8)
    meta = sglang_meta_info(m, truth)
    raw = base64.b64decode(meta["routed_experts"])
    assert len(raw) == 7 * 4 * 2 * 4  # seq_len - 1 rows of num_hidden_layers * k int32 values
    r = interop.from_sglang(meta, m.layer_map, num_tokens=8)
    assert r.equal(m.routes(truth))
    assert interop.from_sglang({"meta_info": meta}, m.layer_map).equal(r)  # the whole /generate response
    assert interop.from_sglang(meta["routed_experts"], m.layer_map).equal(r)  # the bare string
    back = interop.to_sglang(r, m.layer_map)
    assert back == {"routed_experts": meta["routed_experts"]}  # no routed_experts_dtype: SGLang sends none
    with pytest.raises(mr.RoutesValidationError, match="a sequence of 9 tokens"):
        interop.from_sglang(meta, m.layer_map, num_tokens=9)


def test_start_len_multi_turn() -> None:
    """SGLang 0.5.23 ``managers/io_struct.py:264-268``: ``routed_experts_start_len`` gives rows
    ``[start_len, seqlen - 1)``.
    """
    m = DEEPSEEK
    truth = m.truth(10, seed=1)
    meta = sglang_meta_info(m, truth, start_len=6)
    r = interop.from_sglang(meta, m.layer_map, num_tokens=10, start_len=6)
    assert r.equal(m.routes(truth, front=6))
    assert interop.to_sglang(r, m.layer_map, start_len=6) == {"routed_experts": meta["routed_experts"]}
    with pytest.raises(mr.RoutesValidationError, match="pass start_len=6"):
        interop.from_sglang(meta, m.layer_map, num_tokens=10)


def test_stop_trimming_and_prefix_cache() -> None:
    """Rows follow ``seqlen = len(origin_input_ids) + len(output_ids_through_stop)``
    (``scheduler_components/batch_result_processor.py:136-179``); a prefix-cached token keeps the route
    recorded in its KV slot (``state_capturer/base.py:173-188``): two requests sharing a cached prompt
    return the same prompt rows, with no marker.
    """
    m = DEEPSEEK
    truth = m.truth(9, seed=2)
    trimmed = sglang_meta_info(m, truth, trim=2)
    assert interop.from_sglang(trimmed, m.layer_map, num_tokens=7).equal(m.routes(truth[:7]))
    other = truth.copy()
    other[5:] = m.truth(4, seed=3)  # the same 5-token prompt, another completion
    a = interop.from_sglang(sglang_meta_info(m, truth), m.layer_map, num_tokens=9)
    b = interop.from_sglang(sglang_meta_info(m, other), m.layer_map, num_tokens=9)
    assert a[:5].equal(b[:5]) and not bool(a.missing[:8].any())


def test_n_samples_and_many_experts() -> None:
    """Each of ``n`` samples is its own response; int32 holds any expert index (here 300 experts)."""
    m = Model(num_experts=300)
    samples = [m.truth(6, seed=s) for s in range(3)]
    samples[1][0, 0] = [299, 256]
    for t in samples:
        meta = sglang_meta_info(m, t)
        r = interop.from_sglang(meta, m.layer_map, num_tokens=6)
        assert r.equal(m.routes(t))
        assert interop.to_sglang(r, m.layer_map) == {"routed_experts": meta["routed_experts"]}


def test_what_sglang_never_sends_is_refused() -> None:
    m = DEEPSEEK
    meta = sglang_meta_info(m, m.truth(5, seed=4))
    with pytest.raises(mr.RoutesValidationError, match="sends no such field"):
        interop.from_sglang({**meta, "routed_experts_dtype": "uint8"}, m.layer_map)
    assert interop.from_sglang({**meta, "routed_experts_dtype": "int32"}, m.layer_map).num_tokens == 5
    with pytest.raises(mr.RoutesValidationError, match="not whole rows"):
        interop.from_sglang({"routed_experts": base64.b64encode(b"\0" * 12).decode()}, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="--enable-return-routed-experts"):
        interop.from_sglang({"routed_experts": None}, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="not base64"):
        interop.from_sglang({"routed_experts": "***"}, m.layer_map)
    dense = np.zeros((2, 4, 2), np.int32)
    dense[:, 0] = [0, 1]  # an expert in the dense layer's column: the map is wrong
    with pytest.raises(mr.RoutesValidationError, match="column 0 holds expert choices"):
        interop.from_sglang(base64.b64encode(dense.tobytes()).decode(), m.layer_map)


@pytest.mark.parametrize("payload", [5, [[0, 1]], np.zeros((1, 1, 2), np.int32)])
def test_a_payload_that_is_not_a_base64_string_is_refused(payload: object) -> None:
    """SGLang sends a base64 string; anything else (decoded by another tool) is a RoutesValidationError."""
    lm = mr.LayerMap.from_names(["model.layers.0.mlp.gate"], num_layers=1, num_experts=4, top_k=2)
    with pytest.raises(mr.RoutesValidationError, match="base64"):
        interop.from_sglang({"routed_experts": payload}, lm)


def test_token_ids_make_routes_that_refuse_other_tokens() -> None:
    """Given the prompt's ids and the response's ``output_ids``, SGLang's routes know their tokens (a replay fed
    others is refused); ids of another length than the tokens SGLang routed are refused at once."""
    m = DEEPSEEK
    truth = m.truth(8)
    meta = sglang_meta_info(m, truth, start_len=2)
    ids = np.arange(100, 108)
    r = interop.from_sglang(meta, m.layer_map, start_len=2, token_ids=ids)
    assert r.token_ids.tolist() == ids.tolist()
    assert r.with_token_ids(None).equal(interop.from_sglang(meta, m.layer_map, start_len=2))
    with pytest.raises(mr.RoutesValidationError, match=r"token_ids holds 7 ids.*these rows fit 8 tokens"):
        interop.from_sglang(meta, m.layer_map, start_len=2, token_ids=ids[:7])


@pytest.mark.reliability("bad inputs")
def test_meta_info_token_counts_check_the_rows_without_num_tokens() -> None:
    """Once a response holding more rows than its own meta_info token counts allow was read without
    num_tokens=, as routes of more tokens than the sequence has."""
    m = DEEPSEEK
    truth = m.truth(9, seed=5)
    meta = sglang_meta_info(m, truth, prompt_len=4)
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (4, 5)
    assert interop.from_sglang({"meta_info": meta}, m.layer_map).equal(m.routes(truth))
    long = {**meta, "routed_experts": sglang_meta_info(m, m.truth(10, seed=6))["routed_experts"]}  # a row too many
    with pytest.raises(mr.RoutesValidationError, match=r"9 rows; a sequence of 9 tokens \(meta_info's prompt_tokens"):
        interop.from_sglang({"meta_info": long}, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="meta_info's prompt_tokens"):  # each count given must fit
        interop.from_sglang(long, m.layer_map, num_tokens=10)
    # fewer rows than the counts say may be a stop string's trim (completion_tokens = len(output_ids) in earlier
    # releases): the counts bound the rows, num_tokens= says how many
    short = {**meta, "routed_experts": sglang_meta_info(m, truth[:8])["routed_experts"]}
    assert interop.from_sglang({"meta_info": short}, m.layer_map).num_tokens == 8
    with pytest.raises(mr.RoutesValidationError, match=r"7 rows; a sequence of 9 tokens \(num_tokens=9\)"):
        interop.from_sglang(short, m.layer_map, num_tokens=9)
    turn = sglang_meta_info(m, truth, start_len=3, prompt_len=4)
    with pytest.raises(mr.RoutesValidationError, match="pass start_len=3"):
        interop.from_sglang(turn, m.layer_map, num_tokens=9)
    assert interop.from_sglang(turn, m.layer_map, start_len=3).equal(m.routes(truth, front=3))


@pytest.mark.reliability("bad inputs")
def test_counts_that_fit_no_sequence_are_refused_by_name() -> None:
    """Once num_tokens=0 or a start_len past the sequence was refused as a sequence of "-1" or "-2" rows, and token
    ids given as a dict were counted as one id."""
    m = DEEPSEEK
    meta = sglang_meta_info(m, m.truth(8, seed=6))
    with pytest.raises(mr.RoutesValidationError, match="at least one token"):
        interop.from_sglang(meta, m.layer_map, num_tokens=0)
    with pytest.raises(mr.RoutesValidationError, match="start_len=9 is past the 7 routed tokens"):
        interop.from_sglang(meta, m.layer_map, num_tokens=8, start_len=9)
    with pytest.raises(mr.ArgumentTypeError, match="got dict"):
        interop.from_sglang(meta, m.layer_map, token_ids={i: i for i in range(8)})
    with pytest.raises(mr.RoutesValidationError, match="these rows fit 8 tokens"):
        interop.from_sglang(meta, m.layer_map, token_ids=list(range(9)))


@pytest.mark.reliability("silent replays")
def test_a_whole_response_gives_routes_that_know_its_output_ids() -> None:
    """Once the ``output_ids`` of a whole ``/generate`` response were left unread: routes of two samples of equal
    length, given in the wrong order, replayed on each other's tokens without a word. Now they know the completion's
    ids (-1 for the prompt's, which SGLang does not send): the swap is refused, the right order replays exactly."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, num_experts=8)
    prompt = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture():
            out = model.generate(prompt, 4)
        seqs = mr.split_generation(session.routes(), prompt_len=prompt.shape[1], sequences=out)
        lm = mr.LayerMap.from_session(session, num_layers=3)
        p = prompt.shape[1]
        responses = [
            {
                "text": "",
                "output_ids": s.token_ids[p:].tolist(),
                "meta_info": {
                    **interop.to_sglang(s, lm),
                    "prompt_tokens": p,
                    "completion_tokens": s.num_tokens - p,
                },
            }
            for s in seqs
        ]
        read = [interop.from_sglang(r, lm) for r in responses]
        assert [r.token_ids.tolist() for r in read] == [[-1] * p + s.token_ids[p:].tolist() for s in seqs]
        layout = mr.BatchLayout.padded([s.num_tokens for s in seqs])
        ids = layout.tokens([s.token_ids for s in seqs])
        assert ids[0, p:].tolist() != ids[1, p:].tolist()  # (the completions differ: a swap changes the tokens)

        def logits(routes: mr.Routes, fed: torch.Tensor) -> torch.Tensor:
            with session.replay(routes), torch.no_grad():
                return model(fed).logits

        assert torch.equal(logits(layout.routes(read), ids), logits(layout.routes(seqs), ids))
        with pytest.raises(mr.TokenMismatchError):
            logits(layout.routes(read[::-1]), ids)
        unread = [interop.from_sglang(r["meta_info"], lm) for r in responses]  # (meta_info alone holds no ids)
        assert all(r.token_ids is None for r in unread)
        logits(layout.routes(unread[::-1]), ids)  # what a response's ids now refuse went through without them


def test_output_ids_that_cannot_be_placed_are_refused() -> None:
    """output_ids that are no ids, that no prompt_tokens places, that name fewer tokens than the rows cover (a
    streamed chunk's new tokens), or that token_ids= contradicts, are refused; rows stopping short of them (an
    earlier release's stop trim) take the ids of the tokens they cover."""
    m = DEEPSEEK
    truth = m.truth(9, seed=7)
    meta = sglang_meta_info(m, truth, prompt_len=4)
    outs = list(range(50, 55))
    r = interop.from_sglang({"output_ids": outs, "meta_info": meta}, m.layer_map)
    assert r.equal(m.routes(truth)) and r.token_ids.tolist() == [-1] * 4 + outs
    ids = list(range(10, 14)) + outs
    both = interop.from_sglang({"output_ids": outs, "meta_info": meta}, m.layer_map, token_ids=ids)
    assert both.token_ids.tolist() == ids
    with pytest.raises(mr.RoutesValidationError, match=r"token_ids\[5\] is 99"):
        interop.from_sglang({"output_ids": outs, "meta_info": meta}, m.layer_map, token_ids=[*ids[:5], 99, *ids[6:]])
    with pytest.raises(mr.RoutesValidationError, match="streamed chunk"):
        interop.from_sglang({"output_ids": outs[-1:], "meta_info": meta}, m.layer_map)
    with pytest.raises(mr.RoutesValidationError, match="no prompt_tokens"):
        interop.from_sglang({"output_ids": outs, "meta_info": {"routed_experts": meta["routed_experts"]}}, m.layer_map)
    for bad in ([50, 51.5, 52, 53, 54], [50, -1, 52, 53, 54], "abc"):
        with pytest.raises(mr.RoutesValidationError, match="output_ids"):
            interop.from_sglang({"output_ids": bad, "meta_info": meta}, m.layer_map)
    short = {**meta, "routed_experts": sglang_meta_info(m, truth[:8])["routed_experts"]}
    r = interop.from_sglang({"output_ids": outs, "meta_info": short}, m.layer_map)
    assert r.num_tokens == 8 and r.token_ids.tolist() == [-1] * 4 + outs[:4]
