"""Misuse of the public API by a hurried user: ``with session:`` on a session already detached; an attribute set on
the kept scores (``kept.scores = ...``, a misspelt name); an empty list given as ``eos_token_id``; text given to
``session.verify``. Each answer is the plain result, or a ``MoEReplayError`` that names what is wrong and what to do,
with the model left exactly as it was."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything of ``model`` that the library may change: its tensors, and each module's class, hooks and
    instance ``forward``."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": {
            name: (
                type(m),
                list(m._forward_hooks.values()),
                list(m._forward_pre_hooks.values()),
                m.__dict__.get("forward"),
            )
            for name, m in model.named_modules()
        },
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"].keys() == after["modules"].keys()
    for name, (cls, hooks, pre, fwd) in before["modules"].items():
        cls2, hooks2, pre2, fwd2 = after["modules"][name]
        assert cls is cls2 and fwd is fwd2, name
        assert hooks == hooks2 and pre == pre2, name
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key


@pytest.mark.reliability("bad inputs")
def test_entering_a_detached_session_is_refused_naming_attach_again() -> None:
    """Once silent: ``with session:`` on a session already detached entered without a word, and only the calls
    inside the block were refused, one by one. Entering it is refused with a ``SessionStateError`` that says it was
    detached and to attach again; the model is left as it was, and a session attached again enters and captures."""
    model, x = _model(), _ids()
    pristine = _state(model)
    session = mr.attach(model)
    session.detach()
    ran = False
    with pytest.raises(mr.SessionStateError) as info:
        with session:
            ran = True
    assert not ran
    message = str(info.value)
    assert "detached" in message and "mr.attach(model)" in message, message
    assert not session.attached
    _assert_same(pristine, _state(model))
    # (a session left by its own `with` is detached too: entering it again is refused the same way)
    with mr.attach(model) as again, torch.no_grad(), again.capture():
        model(x)
    assert again.routes().num_tokens == x.numel()
    with pytest.raises(mr.SessionStateError, match="detached"):
        with again:
            pass
    _assert_same(pristine, _state(model))
