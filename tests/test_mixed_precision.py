"""bf16 autocast: replayed indices are exact, weights are gathered in the dtype the model computes scores in."""

from __future__ import annotations

import torch

import moe_replay as mr

from .conftest import perturb_routers
from .test_session import _reference_model


def bf16() -> torch.autocast:
    # a fresh autocast region per step: autocast caches its casts of the weights within one region
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_autocast_replay(style: str, tokens: torch.Tensor) -> None:
    model = mr.models.build(style, num_layers=3, first_dense_layers=1)
    with mr.attach(model) as session:
        with bf16(), session.capture(), session.keep_scores() as native:
            ref = model(tokens).logits
        routes = session.routes()
        with bf16(), session.replay(routes):
            assert torch.equal(model(tokens).logits, ref)  # bit for bit
        perturb_routers(session, scale=2.0)
        with bf16(), session.replay(routes), session.capture(), session.keep_scores() as forced:
            loss = model(tokens, labels=tokens).loss
        assert session.routes().equal(routes)  # exact indices
    reference = _reference_model(model, routes)
    with bf16():
        ref_loss = reference(tokens, labels=tokens).loss
    # the weights are gathered from the scores the router computes, in their dtype: the same
    # loss as the gather-based reference written by hand, bit for bit, under the same autocast
    assert torch.equal(loss, ref_loss)
    dtypes = {s.dtype for s in forced.scores}
    assert dtypes == {s.dtype for s in native.scores}
    assert dtypes == {torch.bfloat16 if style == "topk_softmax" else torch.float32}  # top-k on bf16 logits
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(("router.weight", "gate.weight")))
