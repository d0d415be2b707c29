"""Misuse of a session by a hurried user: copies of an attached model made the shallow way, a second model that
shares a layer with the attached one, a hook that changes a router's input added after attach, captures appended to
after other blocks. Each answer is the plain model's (checked against a computation of the user's own) or a
``MoEReplayError`` that says what is wrong, and the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _plain_state(model: nn.Module) -> list[object]:
    """What a session could leave behind on ``model``: instance dicts' keys, hooks, parameters and buffers."""
    out: list[object] = []
    for name, m in model.named_modules():
        out.append((name, type(m), sorted(vars(m)), list(m._forward_hooks), list(m._forward_pre_hooks)))
    out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _same_state(a: list[object], b: list[object]) -> bool:
    *mods_a, sd_a = a
    *mods_b, sd_b = b
    assert isinstance(sd_a, dict) and isinstance(sd_b, dict)
    return mods_a == mods_b and sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


class _Scaled(nn.Module):
    """A model of one's own around an MoE: its own forward reads a plain attribute of its own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scale = 1.0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids).logits * self.scale


@pytest.mark.reliability("clear errors")
def test_a_shallow_copy_made_while_attached_and_called_after_detach_is_told_why() -> None:
    """Once unclear: ``copy.copy`` of an attached model shares its instance dict's values, the session's forward
    among them; after ``detach()`` a call of the copy (``copy.copy(model)`` as an exporter makes one) was refused with
    "call the module itself", which the user had done. The refusal now names the shallow copy and the two ways out,
    and both work: a copy made after detach, and a deep copy made while attached."""
    model, x = _model(), _ids()
    with torch.no_grad():
        want = model(x).logits
    session = mr.attach(model)
    shallow = copy.copy(model)
    deep = copy.deepcopy(model)
    with torch.no_grad(), session.capture():
        assert torch.equal(shallow(x).logits, want)  # (the same modules: it runs as the model does)
    session.detach()
    told = r"(?s)detached, taken off MoETransformer.*shallow copy.*copy\.copy.*copy\.deepcopy"
    with pytest.raises(mr.SessionStateError, match=told):
        shallow(x)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)
        assert torch.equal(copy.copy(model)(x).logits, want)
        assert torch.equal(deep(x).logits, want)
    # a new session on the model puts its wrapper back in place of the one the copy holds, and runs exactly
    with mr.attach(model) as again, torch.no_grad():
        with again.capture():
            model(x)
        routes = again.routes()
        with again.replay(routes):
            assert torch.equal(model(x).logits, want)


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="a shallow copy (copy.copy) of an attached model holds the session's forward of the model it was copied "
    "from, which runs that model's own forward: an attribute set on the copy alone is not read",
)
def test_a_shallow_copy_of_an_attached_model_runs_its_own_forward() -> None:
    """A shallow copy of a model of one's own whose forward reads an attribute, set otherwise on the copy: without a
    session the copy's call reads its own attribute. Attached, the copy's instance dict holds the session's forward
    of the original, so the copy runs the original's forward, with the original's attribute, and says nothing."""
    top, x = _Scaled(_model()), _ids()
    session = mr.attach(top)
    copied = copy.copy(top)
    copied.scale = 2.0
    with torch.no_grad():
        want = top.inner(x).logits * 2.0  # (what the copy computes without a session: its own scale)
        got = copied(x)
    session.detach()
    assert torch.equal(got, want)
