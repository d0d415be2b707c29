"""Round 52's gaps: an iterator numpy gives over an array's items (``array.flat``) that a router draws from, positions
given under names of a model's own, a model that keeps its KV cache itself, and the refusal of a router whose output
differs between two runs naming the iterators it draws from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr

from .test_review51 import _first, _PerTokenFrom, _RouterBlock


# ----------------------------------------------------------------------------- numpy's flat iterators
def _flat_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        _RouterBlock(_PerTokenFrom(np.linspace(0.0, 50.0, 5000).flat)),
        _RouterBlock(_PerTokenFrom(np.arange(4000.0).reshape(40, 100)[:, ::2].flat)),
    )


@pytest.mark.reliability("the model is left as it was")
def test_a_router_drawing_per_token_from_a_numpy_flatiter_is_in_step_and_its_own() -> None:
    """Routers that draw one jitter item per token from ``ndarray.flat`` (one over a strided view): the captured
    forwards see the plain model's draws, a replay runs, and after detach() each router holds its
    own iterator, advanced by exactly what the forwards drew. Once refused as a router whose output differs between
    two runs: a flatiter's public attributes kept any stand-in out, so the runs that establish the decision drew on
    from it, and the refusal left it past the items they drew."""
    model, plain = _flat_model(0), _flat_model(0)
    held = [vars(b.router)["noise"] for b in model]
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            got = [model(x) for x in xs]
        routes = session.routes()
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
        assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own"
        assert [it.index for it in held] == [b.router.noise.index for b in plain], "drawn past the forwards"
        with session.replay(routes):
            again = [model(x) for x in xs]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    assert len(again) == len(want)
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "not its own after detach"
    assert [it.index for it in held] == [b.router.noise.index for b in plain]
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]


# ----------------------------------------------------------------------------- the refusal names the iterator
class _Jitter:
    """An iterator of the user's class, with a method of its own besides ``next()``: no stand-in takes its place."""

    def __init__(self) -> None:
        self.at = 0

    def __iter__(self) -> _Jitter:
        return self

    def __next__(self) -> float:
        self.at += 1
        return float(self.at)

    def rewind(self) -> None:
        """Start again."""
        self.at = 0


class _Drawn(nn.Module):
    """A top-2 router over 8 experts whose first choice per token is the item it draws (mod 8) from an iterator it
    holds, itself (``self.noise``) or in a plain object it keeps (``self.cfg.jitter``): runs that draw other items
    choose other experts."""

    def __init__(self, kept: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.top_k = 2
        if kept:
            self.cfg = _Cfg()
        else:
            self.noise = _Jitter()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and experts of each token."""
        drawn = torch.tensor([int(self.item()) % 8 for _ in range(x.shape[0])])
        logits = nn.functional.linear(x, self.weight) + 10.0 * nn.functional.one_hot(drawn, 8)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx

    def item(self) -> float:
        """The next item drawn."""
        return next(self.cfg.jitter if hasattr(self, "cfg") else self.noise)


class _ByCall(_Drawn):
    """:class:`_Drawn` drawing by calling a bound method of an iterator's (``self.draw()``), holding no iterator."""

    def __init__(self) -> None:
        super().__init__(kept=False)
        self.draw = self.noise.__next__
        del self.noise

    def item(self) -> float:
        """The next item drawn."""
        return self.draw()


class _Cfg:
    """A plain object a router keeps, holding the iterator it draws from."""

    def __init__(self) -> None:
        self.jitter = _Jitter()


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("held", ["in an attribute", "in an object the router keeps"])
def test_a_router_whose_runs_differ_by_an_iterator_of_its_own_is_refused_naming_it(held: str) -> None:
    """A router that draws per token from an iterator of the user's class (no copy nor stand-in can take its place
    in the runs that establish the decision, so each run draws on from it): refused as one whose output differs
    between two runs, the refusal naming the iterator as the likely cause."""
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_Drawn(kept=held != "in an attribute")))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with pytest.raises(mr.MoEReplayError) as err, mr.attach(model) as session, session.capture(), torch.no_grad():
        model(x)
    text = str(err.value)
    assert "differs between two runs" in text, text
    name = "'noise'" if held == "in an attribute" else "'jitter'"
    assert f"likely cause: it draws from {name} (a _Jitter" in text, text


@pytest.mark.reliability("clear errors")
def test_a_router_whose_runs_differ_by_another_cause_names_no_iterator() -> None:
    """The same refusal for a router whose runs differ by what a method it calls draws (it holds no iterator) names
    none."""
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_ByCall()))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    with pytest.raises(mr.MoEReplayError) as err, mr.attach(model) as session, session.capture(), torch.no_grad():
        model(x)
    assert "differs between two runs" in str(err.value), str(err.value)
    assert "likely cause" not in str(err.value), str(err.value)
