"""Token order of a forward whose routers see the columns of its ids in turn where no token reaches another's row
before the first router: the probe's changed token moves its own row alone, so ``[positions, batch]`` ids (as
``nn.Transformer`` takes them) look as ``[batch, positions]`` ids of layers that run positions-first do. The
positions the forward is fed tell the two apart; where none are given, the layouts that would guess (``in_token_order``,
the engine writers) must be refused (a known gap), while a replay on the forwards captured stays exact."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay import interop
from moe_replay.models import MoEBlock, MoEConfig

from .conftest import perturb_routers
from .test_gaps53 import _static_model


class _RoutedFirst(nn.Module):
    """test_order51's ``[positions, batch]`` model (a static-cache decoder's layers, attention before each MoE block)
    with an MoE block first, right after the embeddings: no token reaches another's row before its first router.
    ``position_ids`` ``[positions, batch]`` where given, else every sequence at 0, 1..."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _static_model("tables", "position_ids")
        self.first = MoEBlock(
            MoEConfig(hidden_size=32, num_heads=4, num_experts=8, top_k=2, expert_size=16, vocab_size=128)
        )

    def run(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of ``input_ids`` ``[positions, batch]`` at positions ``pos`` ``[positions]``, batch-major inside."""
        x = self.inner.embed(input_ids.t()) + self.inner.pos(pos)[None]
        x = x + self.first(x)
        for layer in self.inner.layers:
            x = layer(x, pos, 0)
        return self.inner.lm_head(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids, position_ids[:, 0])


class _Unplaced(_RoutedFirst):
    """:class:`_RoutedFirst` fed its ids alone, its positions added after its first router: nothing it is given or
    does before that router tells which axis holds its sequences (its rows follow a roll of either)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pos = torch.arange(input_ids.shape[0])
        x = self.inner.embed(input_ids.t())
        x = x + self.first(x) + self.inner.pos(pos)[None]
        for layer in self.inner.layers:
            x = layer(x, pos, 0)
        return self.inner.lm_head(x)


def _capture(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor | None) -> mr.Routes:
    """The routes of one capture of ``model`` fed ``ids`` (at ``pos``, where given)."""
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(ids) if pos is None else model(ids, position_ids=pos)
        return session.routes()


def _batch(positions: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[positions, batch]`` ids and their position ids (every sequence at the same positions)."""
    ids = torch.randint(1, 128, (positions, batch), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(positions)[:, None].expand(positions, batch)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("shape", [(5, 2), (4, 3)])
def test_a_positions_first_forward_mixing_nothing_before_its_router_told_by_its_positions_keeps_sequences_whole(
    shape: tuple[int, int], tmp_path: Path
) -> None:
    """Fed ``[positions, batch]`` ids and their ``position_ids``: in token order (and saved and loaded), each
    sequence's rows, ids, array and engine array are those of the sequence captured alone."""
    torch.manual_seed(0)
    model = _RoutedFirst()
    positions, batch = shape
    ids, pos = _batch(positions, batch, seed=7)
    with mr.attach(model) as session:
        lm = mr.LayerMap.from_session(session, num_layers=3, layers=[0, 1, 2])
    _capture(model, ids, pos).save(tmp_path / "r.pt")
    for ordered in (_capture(model, ids, pos).in_token_order(), mr.Routes.load(tmp_path / "r.pt").in_token_order()):
        assert ordered.token_ids is not None
        assert torch.equal(ordered.token_ids.long(), ids.t().reshape(-1))
        arr = ordered.to_numpy()
        for b in range(batch):
            own = _capture(model, ids[:, b : b + 1], pos[:, b : b + 1])
            part = ordered[b * positions : (b + 1) * positions]
            assert torch.equal(part.indices, own.indices), b
            assert np.array_equal(arr[b * positions : (b + 1) * positions], own.to_numpy()), b
            written = interop.to_vllm_legacy(part, lm, drop_last=True)
            assert np.array_equal(written, interop.to_vllm_legacy(own, lm, drop_last=True)), b


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a forward fed [positions, batch] ids alone, no token reaching another's row before its first router and "
    "no positions before it, is read as [batch, positions] ids of layers that run positions-first: in_token_order() "
    "and the engine writers lay its rows out position by position without a word",
)
def test_a_forward_whose_sequence_axis_nothing_tells_refuses_every_layout_by_token(tmp_path: Path) -> None:
    """Fed ``[positions, batch]`` ids alone: ``in_token_order()``, the engine writers and a grid of ids given to the
    rows are refused, naming ``position_ids``, also after a save and a load; the rows as captured still replay their
    forward exactly, and rows laid out sequence by sequence without ids are refused."""
    torch.manual_seed(0)
    model = _Unplaced()
    ids, _ = _batch(5, 2, seed=3)
    with mr.attach(model) as session:
        lm = mr.LayerMap.from_session(session, num_layers=3, layers=[0, 1, 2])
    routes = _capture(model, ids, None)
    routes.save(tmp_path / "r.pt")
    for held in (routes, mr.Routes.load(tmp_path / "r.pt")):
        with pytest.raises(mr.MoEReplayError, match="position_ids"):
            held.in_token_order()
        with pytest.raises(mr.MoEReplayError, match="position_ids"):
            interop.to_vllm_legacy(held, lm, drop_last=True)
        with pytest.raises(mr.MoEReplayError):
            held.with_token_ids(ids.t())
    by_token = mr.Routes.cat([_capture(model, ids[:, b : b + 1], None) for b in range(2)]).with_token_ids(None)
    with mr.attach(model) as session:
        perturb_routers(session, scale=2.0)
        with torch.no_grad(), session.replay(routes), session.capture():
            model(ids)
        assert torch.equal(session.routes().indices, routes.indices)
        with pytest.raises(mr.MoEReplayError), torch.no_grad(), session.replay(by_token):
            model(ids)


@pytest.mark.reliability("silent replays")
def test_positions_of_a_batch_major_grid_tell_its_rows_to_be_put_back_sequence_by_sequence() -> None:
    """The same layers fed ``[batch, positions]`` ids (transposed inside) and ``[batch, positions]`` position ids:
    their rows in token order are each sequence's, ``ids`` read row by row."""

    class _BatchFirst(_RoutedFirst):
        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            return self.run(input_ids.t(), position_ids[0]).transpose(0, 1)

    torch.manual_seed(0)
    model = _BatchFirst()
    ids, pos = _batch(5, 2, seed=2)
    ids, pos = ids.t().contiguous(), pos.t().contiguous()
    ordered = _capture(model, ids, pos).in_token_order()
    assert ordered.token_ids is not None
    assert torch.equal(ordered.token_ids.long(), ids.reshape(-1))


@pytest.mark.reliability("silent replays")
def test_a_positions_first_forward_fed_a_key_padding_mask_of_its_sequences_keeps_them_whole() -> None:
    """Fed ``[positions, batch]`` ids alone and a ``[batch, positions]`` key padding mask (as ``nn.Transformer``
    takes them): the mask's shape tells the sequences, and in token order each sequence's rows are those of the
    sequence captured alone; a mask of the ids' own shape tells nothing of the kind."""

    class _Masked(_Unplaced):
        def forward(  # type: ignore[override]
            self, input_ids: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
        ) -> torch.Tensor:
            return super().forward(input_ids)

    torch.manual_seed(0)
    model = _Masked()
    ids, _ = _batch(5, 2, seed=4)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(ids, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        ordered = session.routes().in_token_order()
    other = _Masked()  # (the order told is kept by the model: another one, fed a mask of the ids' shape)
    with mr.attach(other) as session:
        with torch.no_grad(), session.capture():
            other(ids, src_key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
        same = session.routes()
    assert ordered.token_ids is not None
    assert torch.equal(ordered.token_ids.long(), ids.t().reshape(-1))
    for b in range(2):
        own = _capture(model, ids[:, b : b + 1], None)
        assert torch.equal(ordered[b * 5 : (b + 1) * 5].indices, own.indices), b
    assert same.in_token_order().token_ids is not None
    assert torch.equal(cast(torch.Tensor, same.in_token_order().token_ids).long(), ids.reshape(-1))
