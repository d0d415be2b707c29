"""Misuse of the public API by a hurried user: ``with session:`` on a session already detached; an attribute set on
the kept scores (``kept.scores = ...``, a misspelt name); an empty list given as ``eos_token_id``; text given to
``session.verify``. Each answer is the plain result, or a ``MoEReplayError`` that names what is wrong and what to do,
with the model left exactly as it was."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
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


def _kept(grad: bool = True) -> tuple[mr.RouterScores, torch.nn.Module, torch.Tensor]:
    model, x = _model(), _ids()
    with torch.set_grad_enabled(grad), mr.attach(model) as session, session.keep_scores() as kept:
        model(x)
        model(x[:1])  # (two forwards: both told to the kept scores, as before)
    return kept, model, x


@pytest.mark.reliability("bad inputs")
def test_an_attribute_set_on_the_kept_scores_is_refused_naming_what_to_do_instead() -> None:
    """Once silent: a misspelt name set on the ``RouterScores`` of ``keep_scores`` (``kept.indice = ...``,
    ``kept.mask = ...``) was kept without a word, ``kept.names = [...]`` replaced the routers it hands out, and
    ``kept.scores = [...]`` raised Python's own "no setter" error, which names nothing to do. Each public name is
    refused with an ``AttributeError`` that is a ``MoEReplayError`` naming what to do; what the scores hand out is
    unchanged, private state and a method wrapped on the instance (a spy) still work, and a copy or a pickle of
    scores kept without a graph holds the same."""
    kept, _, x = _kept()
    names, tokens = kept.names, [int(s.shape[0]) for s in kept.scores]
    assert tokens == [x.numel() + x.shape[1]] * len(names)
    cases = {
        "scores": "kept.scores, kept.indices, kept[name]",
        "indices": "kept.scores, kept.indices, kept[name]",
        "names": "kept.scores, kept.indices, kept[name]",
        "indice": "no attribute 'indice' (a misspelt one?",
        "mask": "no attribute 'mask' (a misspelt one?",
    }
    for name, how in cases.items():
        with pytest.raises(mr.MoEReplayError) as info:
            setattr(kept, name, [torch.zeros(1)])
        assert isinstance(info.value, AttributeError), name
        assert repr(name) in str(info.value) and how in str(info.value), (name, str(info.value))
        assert name not in vars(kept) or name == "names", name
    assert kept.names == names and [int(s.shape[0]) for s in kept.scores] == tokens
    loss = mr.load_balancing_loss(kept.scores, kept.indices)
    loss.backward()  # (the scores still hold their graph)
    # (private state is kept, and a method may be wrapped on the instance, as a spy or a mock does)
    kept._mine = 1
    assert kept._mine == 1
    seen: list[Any] = []
    original = kept.row_mask

    def spy(mask: Any) -> list[torch.Tensor]:
        seen.append(mask)
        return original(mask)

    kept.row_mask = spy  # type: ignore[method-assign]
    mask = torch.ones_like(x)
    assert [int(m.shape[0]) for m in kept.row_mask([mask, mask[:1]])] == tokens and len(seen) == 1
    del kept.row_mask
    # (copies and pickles of scores kept without a graph are built as before, and refuse setting as the original)
    plain, _, _ = _kept(grad=False)
    for other in (copy.copy(plain), copy.deepcopy(plain), pickle.loads(pickle.dumps(plain))):
        assert other.names == plain.names
        assert all(torch.equal(a, b) for a, b in zip(other.scores, plain.scores, strict=True))
        with pytest.raises(mr.MoEReplayError, match="'scores' cannot be set"):
            other.scores = []  # type: ignore[misc]


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "empty",
    [[], (), torch.tensor([], dtype=torch.long), np.array([], dtype=np.int64)],
    ids=["list", "tuple", "tensor", "numpy"],
)
def test_an_empty_eos_token_id_is_refused_naming_none_for_no_eos(empty: Any) -> None:
    """Once silent: ``generation_lengths(seqs, p, eos_token_id=[])`` (a list of end ids never filled) read every
    sequence as running all its steps, past the end-of-sequence token it holds, as ``None`` does; through
    ``split_generation`` each sequence then kept the rows after its end. An empty ``eos_token_id`` is refused,
    naming ``None`` for no end token; one id and ``None`` read as before."""
    seqs = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 8, 9, 4]])
    with pytest.raises(mr.InvalidArgumentError) as info:
        mr.generation_lengths(seqs, prompt_len=2, eos_token_id=empty)
    assert "eos_token_id is empty" in str(info.value) and "or None" in str(info.value), str(info.value)
    assert mr.generation_lengths(seqs, prompt_len=2, eos_token_id=2).tolist() == [2, 3]
    assert mr.generation_lengths(seqs, prompt_len=2, eos_token_id=None).tolist() == [3, 3]
    # (a generate() capture: the prompts' 2 x 2 rows, then 2 decode steps of 2 rows; the last token is never fed)
    routes = mr.Routes([torch.tensor([[0, 1]]).repeat(8, 1)], names=["r"], num_experts=4)
    with pytest.raises(mr.InvalidArgumentError, match="eos_token_id is empty"):
        mr.split_generation(routes, batch_size=2, prompt_len=2, sequences=seqs, eos_token_id=empty)
    ended, full = (
        [s.num_tokens for s in mr.split_generation(routes, batch_size=2, prompt_len=2, sequences=seqs, eos_token_id=e)]
        for e in (2, None)
    )
    assert ended[0] == full[0] - 1 and ended[1] == full[1]  # (the first stopped at its eos, a step early)
