"""Misuse of the public API by a hurried user: probabilities made over the tokens given to the load-balancing
loss. Each answer is the plain result, or a ``MoEReplayError`` that names what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr


@pytest.mark.reliability("silent wrong answers")
def test_probabilities_made_over_the_tokens_are_refused() -> None:
    """Once silent: ``load_balancing_loss(logits.softmax(0), ...)``, a softmax over the tokens of ``[tokens,
    experts]`` logits (every value from 0 to 1, every column summing to 1, no row), gave a loss of other values with
    no error. Refused, naming the dimension to take; rows of other sums alone (the sigmoid scores of a top-1 sigmoid
    router) are taken as before, and a row of weight 0 is not read."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    indices = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    with pytest.raises(mr.InvalidArgumentError, match=r"router 0: .*over the tokens.*row \d+ to .*softmax\(-1\)"):
        mr.load_balancing_loss(logits.softmax(0), indices)
    good = logits.softmax(-1)
    expected = mr.load_balancing_loss(good[:3], indices[:3])
    # a row of weight 0 is not counted, whatever it holds (padding zeroed out)
    padded = torch.cat([good[:3], torch.zeros(3, 4)])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(mr.load_balancing_loss(padded, indices, mask=mask), expected)
    # rounding of a bfloat16 softmax, and sigmoid scores, are no reason to refuse
    assert torch.isfinite(mr.load_balancing_loss(logits.softmax(-1).bfloat16(), indices))
    top1 = logits.argmax(-1, keepdim=True)
    sig = logits.sigmoid()
    assert torch.allclose(
        mr.load_balancing_loss(sig, top1), 4 * (torch.bincount(top1[:, 0], minlength=4) / 6 * sig.mean(0)).sum()
    )
