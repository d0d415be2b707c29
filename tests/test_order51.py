"""Token order of a forward fed ``[positions, batch]`` ids (as ``nn.Transformer`` takes them) whose layers run
batch-major: its routers see sequence 0, then sequence 1, which in the grid read as ``[batch, positions]`` is
sequence-first. Its rows are already sequence by sequence: ``in_token_order()``, the files and the engine writers
that lay rows out by token must keep each true sequence whole, while a ``[batch, positions]`` model whose layers run
``[positions, batch, hidden]`` still has its rows put back sequence by sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .conftest import perturb_routers
from .test_gaps57 import _Transposing
from .test_review57 import _SequenceFirst


def _alone(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> mr.Routes:
    """The routes of one capture of ``model`` fed ``ids`` at ``pos``."""
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(ids, position_ids=pos)
        return session.routes()


def _batch(positions: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[positions, batch]`` ids and their position ids (every sequence at the same positions)."""
    ids = torch.randint(1, 128, (positions, batch), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(positions)[:, None].expand(positions, batch)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("shape", [(6, 2), (4, 3)])
def test_rows_of_a_positions_first_forward_in_token_order_are_each_sequence_captured_alone(
    shape: tuple[int, int],
) -> None:
    """The capture of a ``[positions, batch]`` forward, in token order, holds each sequence's rows as a capture of
    that sequence alone does (the experts and the token ids), sequence after sequence; so does its array."""
    torch.manual_seed(0)
    model = _SequenceFirst()
    positions, batch = shape
    ids, pos = _batch(positions, batch, seed=7)
    ordered = _alone(model, ids, pos).in_token_order()
    assert ordered.token_ids is not None
    assert torch.equal(ordered.token_ids.long(), ids.t().reshape(-1))
    arr = ordered.to_numpy()
    for b in range(batch):
        own = _alone(model, ids[:, b : b + 1], pos[:, b : b + 1])
        part = ordered[b * positions : (b + 1) * positions]
        assert torch.equal(part.indices, own.indices), b
        assert np.array_equal(arr[b * positions : (b + 1) * positions], own.to_numpy()), b


@pytest.mark.reliability("silent replays")
def test_a_saved_capture_of_a_positions_first_batch_loads_with_each_sequence_whole(tmp_path: Path) -> None:
    """The capture of a ``[positions, batch]`` forward, saved and loaded, in token order, holds each sequence's rows
    as a capture of that sequence alone does; and each sequence's engine array (vLLM's legacy one) is that of the
    sequence captured alone."""
    torch.manual_seed(0)
    model = _SequenceFirst()
    ids, pos = _batch(5, 2, seed=11)
    with mr.attach(model) as session:
        lm = mr.LayerMap.from_session(session, num_layers=2)
    _alone(model, ids, pos).save(tmp_path / "r.pt")
    loaded = mr.Routes.load(tmp_path / "r.pt").in_token_order()
    for b in range(2):
        own = _alone(model, ids[:, b : b + 1], pos[:, b : b + 1])
        part = loaded[b * 5 : (b + 1) * 5]
        assert torch.equal(part.indices, own.indices), b
        written = interop.to_vllm_legacy(part, lm, drop_last=True)
        assert np.array_equal(written, interop.to_vllm_legacy(own, lm, drop_last=True)), b


@pytest.mark.reliability("silent replays")
def test_a_batch_major_model_whose_layers_run_positions_first_is_still_put_back_sequence_by_sequence() -> None:
    """A ``[batch, positions]`` model whose layers run ``[positions, batch, hidden]`` (fairseq's shape): its rows
    in token order are still each sequence's, ``ids`` read row by row."""
    model = _Transposing()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(5)[None].expand(2, 5)
    ordered = _alone(model, ids, pos).in_token_order()
    assert ordered.token_ids is not None
    assert torch.equal(ordered.token_ids.long(), ids.reshape(-1))
    for b in range(2):
        own = _alone(model, ids[b : b + 1], pos[b : b + 1])
        assert torch.equal(ordered[b * 5 : (b + 1) * 5].indices, own.indices), b


@pytest.mark.reliability("silent replays")
def test_a_later_session_on_a_positions_first_model_keeps_its_sequences_whole() -> None:
    """The order told at the first session on a ``[positions, batch]`` model, adopted by a later one on the same
    model, still keeps each sequence's rows whole."""
    torch.manual_seed(0)
    model = _SequenceFirst()
    ids, pos = _batch(4, 2, seed=5)
    first = _alone(model, ids, pos).in_token_order()
    again = _alone(model, ids, pos).in_token_order()
    assert again.token_ids is not None
    assert torch.equal(again.token_ids.long(), ids.t().reshape(-1))
    assert torch.equal(again.indices, first.indices)


@pytest.mark.reliability("false refusals")
def test_sequences_captured_alone_joined_without_ids_replay_a_positions_first_batch_exactly() -> None:
    """Each sequence of a ``[positions, batch]`` batch captured alone, the captures joined sequence after sequence
    and their ids dropped (rows laid out by token, as an engine writes them): the batch replays them exactly after
    the routers moved (its routers see it sequence by sequence, as the rows are), and fed other positions it is
    refused."""
    torch.manual_seed(0)
    model = _SequenceFirst()
    ids, pos = _batch(4, 2, seed=9)
    parts = [_alone(model, ids[:, b : b + 1], pos[:, b : b + 1]) for b in range(2)]
    joined = mr.Routes.cat(parts).with_token_ids(None)
    with mr.attach(model) as session:
        perturb_routers(session, scale=2.0)
        with torch.no_grad(), session.replay(joined), session.capture():
            model(ids, position_ids=pos)
        assert torch.equal(session.routes().indices, joined.indices)
        with pytest.raises(mr.MoEReplayError), torch.no_grad(), session.replay(joined):
            model(ids, position_ids=pos + 3)
