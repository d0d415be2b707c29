"""A multi-turn conversation, each turn returned from where the previous one ended, stitched into one sequence."""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from ..conftest import tried
from .engines import Model, sglang_meta_info, vllm_033_request_output

M = Model()
#: turn 1: 4 prompt tokens + 3 generated; turn 2: those 7 + 2 user tokens as prompt + 3 generated
P1, G1, U2, G2 = 4, 3, 2, 3
T1, T2 = P1 + G1, P1 + G1 + U2 + G2


def _ids(n: int) -> list[int]:
    return [10 + i for i in range(n)]


def test_vllm_turns_with_prompt_start_stitch_into_the_conversation() -> None:
    """vLLM 0.33.0 ``sampling_params.py:439-445``: turn 2 asks for rows from ``routed_experts_prompt_start``,
    here turn 1's last token (the first one turn 1 has no row for).
    """
    truth = M.truth(T2, seed=1)
    out1 = vllm_033_request_output(M, _ids(P1), [(_ids(T1)[P1:], truth[:T1])])
    start = T1 - 1
    out2 = vllm_033_request_output(M, _ids(T1 + U2), [(_ids(T2)[T1 + U2 :], truth)], prompt_start=start)
    turns = [
        interop.from_vllm_output(out1, M.layer_map),
        interop.from_vllm_output(out2, M.layer_map, prompt_start=start),
    ]
    whole = interop.stitch_turns(turns, token_ids=[_ids(T1), _ids(T2)])
    assert whole.equal(M.routes(truth))
    # the conversation's tokens, from the ids given or those vLLM's outputs name: a replay on others is refused
    assert whole.token_ids.tolist() == _ids(T2)
    assert interop.stitch_turns(turns).token_ids.tolist() == _ids(T2)
    # one token too far: turn 1's last token is routed by no turn
    late = vllm_033_request_output(M, _ids(T1 + U2), [(_ids(T2)[T1 + U2 :], truth)], prompt_start=T1)
    turns[1] = interop.from_vllm_output(late, M.layer_map, prompt_start=T1)
    with pytest.raises(mr.RoutesValidationError, match=f"token {T1 - 1} of {T2} is routed by no turn"):
        interop.stitch_turns(turns)
    gap = interop.stitch_turns(turns, gaps="native")
    assert bool(gap.missing[T1 - 1].all()) and gap[T1:].equal(M.routes(truth)[T1:])


def test_sglang_turns_with_start_len() -> None:
    """SGLang 0.5.23 ``managers/io_struct.py:264-268``: ``routed_experts_start_len``."""
    truth = M.truth(T2, seed=2)
    r1 = interop.from_sglang(sglang_meta_info(M, truth[:T1]), M.layer_map, num_tokens=T1)
    r2 = interop.from_sglang(sglang_meta_info(M, truth, start_len=T1 - 1), M.layer_map, num_tokens=T2, start_len=T1 - 1)
    assert interop.stitch_turns([r1, r2]).equal(M.routes(truth))


def test_overlapping_turns_must_agree_unless_told() -> None:
    """A turn that returns the whole prefix again: equal routes stitch; differing ones need a choice."""
    truth = M.truth(T2, seed=3)
    r1 = M.routes(truth[:T1])
    same = M.routes(truth)
    assert interop.stitch_turns([r1, same]).equal(same)
    recomputed = truth.copy()
    recomputed[2] = M.truth(1, seed=4)[0]  # turn 2's prefill routed token 2 differently
    r2 = M.routes(recomputed)
    with pytest.raises(mr.RoutesValidationError, match="token 2: turn 0 routed it to .* turn 1"):
        interop.stitch_turns([r1, r2])
    assert interop.stitch_turns([r1, r2], overlap="first").equal(M.routes(truth))
    assert interop.stitch_turns([r1, r2], overlap="last").equal(r2)


def test_turns_that_are_not_one_sequence_are_refused() -> None:
    truth = M.truth(T2, seed=5)
    r1, r2 = M.routes(truth[:T1]), M.routes(truth)
    retokenised = _ids(T2)
    retokenised[3] = 99
    with pytest.raises(mr.RoutesValidationError, match="differ from turn 0's at position 3"):
        interop.stitch_turns([r1, r2], token_ids=[_ids(T1), retokenised])
    with pytest.raises(mr.RoutesValidationError, match="turn 1's tokens disagree at position 3: 99 there, 13"):
        interop.stitch_turns([r1.with_token_ids(_ids(T1)), r2.with_token_ids(retokenised)])  # (the ids they know)
    with pytest.raises(mr.RoutesValidationError, match="turn 1's tokens disagree at position 3"):
        interop.stitch_turns([r1, r2.with_token_ids(retokenised)], token_ids=[_ids(T1), _ids(T2)])
    with pytest.raises(mr.RoutesValidationError, match="must extend the previous one"):
        interop.stitch_turns([r2, r1])
    with pytest.raises(mr.RoutesValidationError, match="overlap must be"):
        interop.stitch_turns([r1, r2], overlap="any")


def test_bad_turn_lists_raise_library_errors() -> None:
    with pytest.raises(mr.RoutesValidationError, match="need at least one turn"):
        interop.stitch_turns([])
    with pytest.raises(mr.RoutesValidationError, match="not Routes"):
        interop.stitch_turns([M.routes(M.truth(3)), "turn"])
    other = mr.Routes([M.routes(M.truth(3)).layer(M.names[0])], names=["model.layers.1.mlp.gate"], num_experts=32)
    with pytest.raises(mr.RoutesValidationError, match="different models"):
        interop.stitch_turns([M.routes(M.truth(3)), other])


@pytest.mark.reliability("silent replays")
def test_rows_recorded_at_prompt_padding_stay_so_once_stitched() -> None:
    """Once silent: a turn captured from a left-padded batch holds rows recorded at prompt padding, and its replay
    refuses a forward that feeds tokens of the sequence there (the batch fed without its mask); stitched, the rows
    lost that mark, and the same forward was forced the padding rows' experts on its tokens without a word. The
    stitched routes now refuse it as the turn's own do, and replay the forward fed its mask exactly."""
    model = mr.models.build("softmax_topk", num_layers=2)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        turn = session.routes()[:5]
        for routes in (turn, interop.stitch_turns([turn]), interop.stitch_turns([turn[:3], turn], overlap="first")):
            with pytest.raises(mr.TokenMismatchError, match="prompt padding"):
                with session.replay(routes), torch.no_grad():
                    model(ids[:1])  # (fed without its mask: tokens of the sequence at the padding rows)
            with session.replay(routes), session.capture(), torch.no_grad():
                model(ids[:1], attention_mask=mask[:1])
            assert session.routes().equal(turn)
            tried()
