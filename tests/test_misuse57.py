"""Misuse of the public API by a hurried user: a one-dimensional mask of the wrong length (or one weight) given to
``RouterScores.row_mask``; an attribute set on (or deleted from) the frozen values the library hands out
(``LayerMap``, ``BatchLayout``, ``RouterSite``, ``Adapter``, ``RoutingComparison``). Each answer is the plain
result, or a ``MoEReplayError`` that names what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kept(x: torch.Tensor) -> tuple[mr.Session, mr.RouterScores]:
    model = _model()
    session = mr.attach(model)
    with session.keep_scores() as kept:
        model(x)
    return session, kept


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("weights", [1, 5, 13, 0], ids=["one weight", "too few", "too many", "a 0-d tensor"])
def test_row_mask_of_a_one_dimensional_mask_of_another_length_is_refused(weights: int) -> None:
    """Once silent: ``kept.row_mask(mask)`` gave a one-dimensional mask back as it was, whatever its length, so one
    weight (``torch.tensor([0.])``) broadcast over every row of a loss of one's own (a z-loss weighed to nothing),
    and a mask of the wrong length was handed on as each router's weights. It is refused with an
    ``InvalidArgumentError`` that says how many rows the router kept and what to give; the right length, and the
    ``[batch, positions]`` mask, still give each router one weight per row."""
    x = _ids()
    session, kept = _kept(x)
    rows = kept.scores[0].shape[0]
    mask = torch.tensor(1.0) if weights == 0 else torch.ones(weights)
    with pytest.raises(mr.InvalidArgumentError, match=rf"gives {max(weights, 1)} weight\(s\).*kept {rows} rows"):
        kept.row_mask(mask)
    attention = torch.ones_like(x)
    attention[0, :2] = 0
    flat = kept.row_mask(attention.reshape(-1))
    grid = kept.row_mask(attention)
    assert [w.shape[0] for w in flat] == [s.shape[0] for s in kept.scores]
    for a, b in zip(flat, grid, strict=True):
        assert torch.equal(a, b)
    session.detach()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_row_mask_refuses_weights_load_balancing_loss_refuses(bad: float) -> None:
    """``row_mask`` reads a mask "the way load_balancing_loss reads its mask", and that loss refuses a negative or
    non-finite weight; ``row_mask`` handed it on (a NaN weight made a loss of one's own NaN). Both refuse it, with
    the same ``InvalidArgumentError``."""
    x = _ids()
    session, kept = _kept(x)
    mask = torch.ones(x.shape, dtype=torch.float32)
    mask[1, 3] = bad
    with pytest.raises(mr.InvalidArgumentError, match="finite and not negative"):
        kept.row_mask(mask)
    with pytest.raises(mr.InvalidArgumentError, match="finite and not negative"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=mask)
    session.detach()
