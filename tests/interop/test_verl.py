"""verl 0.9.1: the agent loop's padded int16 ``routed_experts``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .engines import Model, capture_buffer, verl_padded

M = Model()


def test_padded_agent_loop_layout() -> None:
    """verl 0.9.1 ``verl/experimental/agent_loop/agent_loop.py:783-809``: int16, the engine's rows placed
    from ``start_pos = prompt_width - len(prompt_ids)``, zeros elsewhere (the last token's row too).
    """
    prompt_width, response_width = 6, 5
    prompts, responses = [4, 6], [3, 5]
    truths = [M.truth(p + c, seed=i) for i, (p, c) in enumerate(zip(prompts, responses, strict=True))]
    engine_rows = [capture_buffer(M, t)[:-1] for t in truths]  # what SGLang / vLLM 0.22+ returned: all layers
    batch, mask = verl_padded(engine_rows, prompts, prompt_width, response_width)
    seqs = interop.from_verl(batch, mask, M.layer_map)
    assert all(s.equal(M.routes(t)) for s, t in zip(seqs, truths, strict=True))
    # with the batch's input_ids, each sequence's routes know their tokens (padding is none of them)
    input_ids = torch.arange(mask.numel()).view(mask.shape) + 100
    known = interop.from_verl(batch, mask, M.layer_map, input_ids=input_ids)
    assert [r.token_ids.tolist() for r in known] == [i[m.bool()].tolist() for i, m in zip(input_ids, mask, strict=True)]
    assert all(a.equal(b) for a, b in zip(known, seqs, strict=True))
    for bad in (input_ids[:, 1:], input_ids.float()):
        with pytest.raises(mr.MoEReplayError, match="input_ids"):
            interop.from_verl(batch, mask, M.layer_map, input_ids=bad)
    back = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, prompt_width=prompt_width, response_width=5)
    assert back.dtype == torch.int16
    for i, c in enumerate(responses):
        last = prompt_width + c - 1
        assert bool((back[i, last, list(M.moe_layers)] == -1).all())  # the unrouted last token stays -1
        back[i, last] = 0
    assert torch.equal(back, batch)
    moe_layout = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, layout="moe")
    assert moe_layout.shape == (2, prompt_width + max(responses), 3, 2)
    assert np.array_equal(moe_layout[0, 2:8].numpy().astype(np.int64), truths[0][:6])  # MoE columns only


_CHANGED = r"to_verl\(dtype=.*would change values"
_NO_INTEGER = r"to_verl\(dtype=.*from_verl reads only integer arrays.*torch.int16"


@pytest.mark.parametrize(
    ("dtype", "fill", "refused"),
    [
        (torch.int16, 0, None),
        (torch.int32, 300, None),
        (torch.int64, -1, None),
        (torch.int8, 0, None),
        (torch.float32, 300, _NO_INTEGER),  # exact, but from_verl reads no floats: refused at write time
        (torch.float64, 0, _NO_INTEGER),
        (torch.bfloat16, 0, _NO_INTEGER),
        (torch.complex64, 0, _NO_INTEGER),
        (torch.quint8, 0, _NO_INTEGER),  # (a quantized dtype: torch would fail to build it, unnamed)
        (torch.int8, 300, _CHANGED),  # the padding value wraps around
        (torch.uint8, 0, _CHANGED),  # -1 rows would become 255
        (torch.uint8, 300, _CHANGED),
        (torch.uint64, 0, _CHANGED),  # -1 rows would become 2**64 - 1 (an int64 view turns them back into -1)
        (torch.bool, 0, _NO_INTEGER),  # every expert would become True
    ],
)
def test_a_dtype_that_changes_a_value_is_refused(dtype: torch.dtype, fill: int, refused: str | None) -> None:
    """to_verl(dtype=...) writes every route, -1 row and ``fill`` exactly in a dtype from_verl reads back, or
    refuses, as Routes.to_numpy does."""
    seqs = [M.routes(M.truth(5, seed=i)) for i in range(2)]  # each ends in a -1 row: the unrouted last token
    prompts = [2, 3]  # the first sequence is padded: its row holds fill
    wide = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, fill=fill, dtype=torch.int64)
    assert bool((wide == -1).any()) and bool((wide == fill).any())
    if refused is None:
        got = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, fill=fill, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got.to(torch.int64), wide)
        back = interop.from_verl(got, (wide != fill).any(dim=(2, 3)).long(), M.layer_map, fill=fill)
        assert all(a.equal(b) for a, b in zip(back, seqs, strict=True))
    else:
        with pytest.raises(mr.RoutesValidationError, match=refused):
            interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, fill=fill, dtype=dtype)


@pytest.mark.parametrize("bad", [{"fill": 2.5}, {"dtype": "int16"}, {"dtype": np.int16}])
def test_a_fill_or_dtype_of_the_wrong_type_is_refused(bad: dict) -> None:
    seqs = [M.routes(M.truth(5))]
    with pytest.raises(mr.ArgumentTypeError, match="fill must be an integer|dtype must be a torch.dtype"):
        interop.to_verl(seqs, M.layer_map, prompt_lengths=[2], **bad)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[mr.Routes]]:
    """verl's padded batch of two sequences (prompts 4 and 6 of width 6, responses 3 and 5) and its mask."""
    prompts, responses = [4, 6], [3, 5]
    truths = [M.truth(p + c, seed=i) for i, (p, c) in enumerate(zip(prompts, responses, strict=True))]
    batch, mask = verl_padded([capture_buffer(M, t)[:-1] for t in truths], prompts, 6, 5)
    return batch, mask, [M.routes(t) for t in truths]


@pytest.mark.reliability("bad inputs")
def test_a_mask_that_does_not_belong_to_the_routes_is_refused() -> None:
    """from_verl drops no route: a mask that leaves a routed position out, has a gap, or is not 0/1 is refused."""
    batch, mask, truths = _padded_batch()
    assert all(a.equal(b) for a, b in zip(interop.from_verl(batch, mask, M.layer_map), truths, strict=True))
    shifted = mask.clone()
    shifted[0, 2] = 0  # the first prompt token of sequence 0 left out: its routes would be dropped
    with pytest.raises(mr.RoutesValidationError, match="sequence 0, position 2 is padding .* holds"):
        interop.from_verl(batch, shifted, M.layer_map)
    gap = mask.clone()
    gap[1, 3] = 0
    with pytest.raises(mr.RoutesValidationError, match="sequence 1: attention_mask is 0 at position 3"):
        interop.from_verl(batch, gap, M.layer_map)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # position_ids passed for the mask
    with pytest.raises(mr.RoutesValidationError, match="not only 0 and 1"):
        interop.from_verl(batch, positions, M.layer_map)
    for bad in ("mask", torch.ones(2, 11, device="meta")):
        with pytest.raises(mr.RoutesValidationError, match="attention_mask"):
            interop.from_verl(batch, bad, M.layer_map)


def test_padding_of_another_value_reads_back_with_the_same_fill() -> None:
    batch, mask, truths = _padded_batch()
    prompts = [4, 6]
    for fill in (0, -1, 7):
        written = interop.to_verl(truths, M.layer_map, prompt_lengths=prompts, fill=fill, response_width=5)
        back = interop.from_verl(written, mask, M.layer_map, fill=fill)
        assert all(a.equal(b) for a, b in zip(back, truths, strict=True))
        if fill:
            with pytest.raises(mr.RoutesValidationError, match="not fill=0.*fill="):
                interop.from_verl(written, mask, M.layer_map)
    with pytest.raises(mr.ArgumentTypeError, match="fill must be an integer"):
        interop.from_verl(batch, mask, M.layer_map, fill=0.5)


@pytest.mark.reliability("bad inputs")
def test_a_route_at_the_unrouted_last_token_is_refused_not_dropped() -> None:
    """The last token's row holds no route in verl's batch; a route there is refused, never overwritten with -1.

    With k=1 an engine's zero row is a valid route (expert 0), so rows shifted one position
    against the mask were read as a whole sequence one token off, the last route dropped.
    """
    top1 = Model(k=1)
    truth = top1.truth(6, seed=3)
    rows = capture_buffer(top1, truth)[:-1]  # the engine's rows: all but the last token
    batch, mask = verl_padded([rows], [3], 4, 3)
    assert interop.from_verl(batch, mask, top1.layer_map)[0].equal(top1.routes(truth))
    shifted = torch.zeros_like(batch)
    shifted[:, 1:] = batch[:, :-1]  # one position later than the mask says
    with pytest.raises(mr.RoutesValidationError, match="sequence 0: the last token .* holds"):
        interop.from_verl(shifted, mask, top1.layer_map)
    trained = M.routes(M.truth(5, seed=4), last=False)  # a training forward's capture routes the last token
    written = interop.to_verl([trained], M.layer_map, prompt_lengths=[2])
    with pytest.raises(mr.RoutesValidationError, match="last_routed=True"):
        interop.from_verl(written, torch.ones(1, 5, dtype=torch.long), M.layer_map)
    back = interop.from_verl(written, torch.ones(1, 5, dtype=torch.long), M.layer_map, last_routed=True)
    assert back[0].equal(trained)


@pytest.mark.reliability("bad inputs")
def test_input_ids_that_are_no_integers_are_refused_as_token_ids() -> None:
    """Once float input_ids were refused as holding no "expert indices", naming the wrong thing."""
    r = mr.Routes([torch.tensor([[0, 1], [2, 3], [-1, -1]])], names=["model.layers.0.mlp.gate"], num_experts=4)
    lm = mr.LayerMap.from_routes(r, num_layers=1)
    batch = interop.to_verl([r], lm, prompt_lengths=[2])
    mask = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(mr.RoutesValidationError, match=r"input_ids must hold integers \(token ids\)"):
        interop.from_verl(batch, mask, lm, input_ids=torch.zeros(1, 3))


def test_a_response_cut_at_response_length_keeps_the_route_of_its_last_token() -> None:
    """Once a multi-turn batch with a response cut at response_length could not be read: verl's tool agent loop
    keeps ``routed_experts[: len(prompt_ids) + response_length]`` of an engine that generated past it, so that
    sequence's last token holds the engine's route and was refused as shifted rows, while last_routed=True read
    the other sequences' unrouted zero rows as routes."""
    prompt_width, response_width = 6, 5
    long_truth = M.truth(4 + 8, seed=5)  # the engine generated 8 response tokens; verl keeps 5
    cut = capture_buffer(M, long_truth)[:-1][: 4 + response_width]  # (tool_agent_loop.py, AgentLoopOutput)
    short_truth = M.truth(3 + 2, seed=6)
    batch, mask = verl_padded([cut, capture_buffer(M, short_truth)[:-1]], [4, 3], prompt_width, response_width)
    mask[0, prompt_width - 4 :] = 1  # the cut sequence: every row a route, up to the batch's last position
    with pytest.raises(mr.RoutesValidationError, match=r"sequence 0: the last token .*truncated=True"):
        interop.from_verl(batch, mask, M.layer_map)
    cut_seq, short_seq = interop.from_verl(batch, mask, M.layer_map, truncated=True)
    assert cut_seq.equal(M.routes(long_truth[: 4 + response_width], last=False))  # its last token routed
    assert short_seq.equal(M.routes(short_truth))  # the other's last token: -1, as engines leave it
    # a sequence that ends before the batch's last position is never cut: a route at its last token stays refused
    shifted = torch.zeros_like(batch)
    shifted[1, 1:] = batch[1, :-1]
    shifted[0] = batch[0]
    with pytest.raises(mr.RoutesValidationError, match="sequence 1: the last token"):
        interop.from_verl(shifted, mask, M.layer_map, truncated=True)
    with pytest.raises(mr.ArgumentTypeError, match="truncated"):
        interop.from_verl(batch, mask, M.layer_map, truncated="yes")
