"""Adversarial review of round 50's probe-run speedups (round 51): a probe run's own reads of a tensor's metadata
(its dtype, its version counter) read what they read before, for tensors of a subclass whose ``__torch_function__``
answers for a tensor it holds too. A replay forces the captured experts on the tokens they were recorded for, or it
is refused; plain use is not refused, and the model is left as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree

import moe_replay as mr
from tests.test_left48 import _Block, _Router

_XS = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]


def _inner(a: Any) -> Any:
    return a.elem if isinstance(a, _Holder) else a


class _Holder(torch.Tensor):
    """A tensor that holds another and hands every call to it (its ``__torch_function__`` unwraps it): a write in
    place goes into the held tensor, whose version counter a read of ``_version`` through that function answers."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> _Holder:
        made = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)
        made.elem = elem
        return made

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        args = tuple(_pytree.tree_map(_inner, list(args)))
        kwargs = _pytree.tree_map(_inner, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        return func(*_pytree.tree_map(_inner, list(args)), **_pytree.tree_map(_inner, kwargs or {}))


class _CountsInAHeldBuffer(_Router):
    """Counts its forwards into a buffer that holds its tensor in another (``_Holder``); ``biased``: the count also
    shifts its logits (a bias that drifts with each forward)."""

    def __init__(self, biased: bool) -> None:
        super().__init__()
        self.biased = biased
        self.register_buffer("count", _Holder(torch.zeros(8)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.biased:
            logits = logits + 0.5 * self.count
        self.count.add_(torch.arange(8.0))
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


def _model(biased: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(_CountsInAHeldBuffer(biased)), _Block(_CountsInAHeldBuffer(biased)))


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("biased", [False, True], ids=["count alone", "count biases the logits"])
def test_a_buffer_that_holds_its_tensor_in_another_is_put_back_after_each_probe_run(biased: bool) -> None:
    """Silent before: a probe run read a buffer's version counter with every ``__torch_function__`` off, so a buffer
    of a subclass that hands its writes to a tensor it holds read as unwritten and was not put back: each run's
    count was left in the model (the plain model counts 3 forwards; the attached one counted every probe run too),
    and a count that biases the logits made two runs on the same inputs differ (refused). The counter is read as
    the snapshot read it: the forwards count what the plain model's count, the outputs are the plain model's, and
    the captured experts replay."""
    make: Callable[[bool], nn.Module] = _model
    plain = make(biased)
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    model = make(biased)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in _XS]
        routes = session.routes()
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g), "a forward after attach differs from the plain model's"
    for name in ("0", "1"):
        held = model.get_submodule(f"{name}.router").count.elem
        assert torch.equal(held, plain.get_submodule(f"{name}.router").count.elem), "a probe run's count was left"
    replayed = make(biased)
    with mr.attach(replayed) as session, session.replay(routes), torch.no_grad():
        again = [replayed(x) for x in _XS]
    for w, g in zip(want, again, strict=True):
        assert torch.equal(w, g), "the replay of the captured experts differs from the forwards captured"
