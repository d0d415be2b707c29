"""Misuse of the batch-layout, packing and distributed APIs as an RL engineer builds training batches from rollout
routes: a layout of another packing or padding side, micro-batches cut through a sequence, zero-length sequences,
routes of another model. Each answer is exact (checked against each sequence's own capture) or refused with a
``MoEReplayError`` that says what is wrong, with the model left as it was."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr

LENGTHS = (5, 3)


def _move_routers(model: torch.nn.Module) -> None:
    """Move every router's weight far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.add_(3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def rollout() -> tuple[Any, ...]:
    """A model, its session, two sequences, and each sequence's routes captured on its own."""
    model = mr.models.build("softmax_topk", seed=0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in LENGTHS]
    session = mr.attach(model)
    per = []
    for seq in seqs:
        with session.capture(), torch.no_grad():
            model(seq[None])
        per.append(session.routes())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, session, seqs, per, state


def _layout(kind: str, lengths: list[int]) -> mr.BatchLayout:
    if kind == "packed":
        return mr.BatchLayout.packed(lengths)
    return mr.BatchLayout.padded(lengths, side=kind)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize(
    ("fed", "read"),
    [
        ("packed", "packed"),
        ("right", "right"),
        ("left", "left"),
        ("packed", "packed-other"),
        ("right", "left"),
        ("left", "right"),
    ],
)
def test_unpack_of_a_capture_fed_position_ids_by_another_layout_is_refused(
    rollout: tuple[Any, ...], fed: str, read: str, ids: bool
) -> None:
    """Once silent: a capture of a forward fed the ``position_ids`` of one layout (no attention mask: packed rows
    take none) unpacked by a layout of another packing ([3, 5] for [5, 3]) or the other padding side gave each
    sequence the rows of other tokens (a whole sequence of another's rows, cut or padded), with no error. The places
    the forward gave its tokens are now checked: a layout holding one sequence where the forward restarted one is
    refused; the layout that was fed gives each sequence its own capture."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    lengths = list(LENGTHS)
    layout = _layout(fed, lengths)
    with session.capture(), torch.no_grad():
        model(layout.tokens(seqs), position_ids=layout.position_ids())
    captured = session.routes() if ids else session.routes().with_token_ids(None)
    if read == fed:
        got = layout.unpack(captured)
        for i, want in enumerate(per):
            assert got[i].with_token_ids(None).equal(want.with_token_ids(None)), f"sequence {i} got other rows"
        return
    other = mr.BatchLayout.packed(lengths[::-1]) if read == "packed-other" else _layout(read, lengths)
    with pytest.raises(mr.RoutesValidationError, match="saw other sequences there than this layout"):
        other.unpack(captured)


@pytest.mark.reliability("silent replays")
def test_unpack_of_a_packed_capture_fed_no_positions_keeps_each_tokens_row(rollout: tuple[Any, ...]) -> None:
    """A packed batch fed no ``position_ids`` is one sequence to the model: its places run on across the layout's
    sequences, which is no other packing than the layout's (each token's row is still its own), so the capture is
    unpacked by row; the rows match a capture of the same forward cut by hand."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    layout = mr.BatchLayout.packed(list(LENGTHS))
    with session.capture(), torch.no_grad():
        model(layout.tokens(seqs))
    whole = session.routes()
    got = layout.unpack(whole)
    assert [g.num_tokens for g in got] == list(LENGTHS)
    for name in whole.names:
        assert torch.equal(torch.cat([g.layer(name) for g in got]), whole.layer(name))
