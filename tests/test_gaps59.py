"""A choice of the tokens reaching the routers, compared forward by forward at replay.

A module that chooses which tokens reach its routers (Mixture-of-Depths) has its rankings recorded at capture with how
many each forward of the model took. A replay compares them forward by forward: where the choice is made in other
forwards than at the capture (the routers of one forward seeing every token, those of the next the chosen few), the
rankings and the rows may match in call order while each forward would be forced the other's rows. The rule checked:
such a replay is refused with a ``TokenMismatchError`` naming the forward, before a forward that chooses once too
often returns and before a forward that chooses too few returns; the same forwards replay exactly, also from routes
cut at a forward or joined from captures in the order they ran. A chooser whose module first runs in a later forward
than the block's first (layers called one by one from a list whose holder's forward the model never calls) is found
by the watch of that first run, and the capture's forwards are counted from the block's start.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_mod52 import _x as _mod_x
from tests.test_orphans import FFN, D, E, Layer, SigmaFFN, T
from tests.test_review66 import _EveryOtherForward


def _capture(model: _EveryOtherForward, session: mr.Session, x: torch.Tensor, forwards: int) -> mr.Routes:
    """The routes of ``forwards`` forwards of ``model`` on ``x``."""
    with session.capture(), torch.no_grad():
        for _ in range(forwards):
            model(x)
    return session.routes()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "first",
    [pytest.param(0, id="chosen-first-at-capture"), pytest.param(1, id="chosen-second-at-capture")],
)
def test_a_token_choice_made_in_the_other_forward_at_replay_is_refused_naming_it(first: int) -> None:
    """Two forwards captured, the tokens chosen in one of them; replayed with the choice in the other: as many
    rankings in the same order and as many rows in all. Refused at forward 1 of the replay: as it ends where the
    capture chose there (it chose nothing), at its first choice where the capture did not. Chosen second at the
    capture, the chooser first runs in the capture's second forward (its first ran every token): once silent, as
    that first run was watched for decisions only, and the capture recorded no choice."""
    model = _EveryOtherForward().eval()
    model.n = first
    x = _mod_x()
    with mr.attach(model) as session:
        routes = _capture(model, session, x, 2)
        model.n = first + 1
        why = "forward 1 of this replay took 0 of its choices" if first == 0 else "forward 1 of this replay chose"
        out: list[torch.Tensor] = []
        with pytest.raises(mr.TokenMismatchError, match=why), session.replay(routes), torch.no_grad():
            out.append(model(x))
            out.append(model(x))
        assert out == []  # (no output of a forward forced on other tokens came back)


@pytest.mark.reliability("silent replays")
def test_forwards_choosing_as_at_the_capture_replay_exactly_whole_cut_or_joined() -> None:
    """The same forwards replayed run and force the recorded rows (a capture inside the replay reads them back): the
    routes whole, the second forward's rows alone, and routes of two captures joined in the order their forwards run;
    joined the other way round (as many rankings and rows in all) they are refused."""
    model = _EveryOtherForward().eval()
    x = _mod_x()
    with mr.attach(model) as session:
        routes = _capture(model, session, x, 2)  # (forward 0 chooses, forward 1 sees every token)
        model.n = 0
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
            model(x)
        assert session.routes().equal(routes)
        model.n = 0
        chosen = _capture(model, session, x, 1)
        every = _capture(model, session, x, 1)
        assert chosen.num_tokens + every.num_tokens == routes.num_tokens
        second = routes[chosen.num_tokens :]
        assert second._choice_forwards == (0,)
        model.n = 1
        with session.replay(second), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(every)
        model.n = 0
        with session.replay(mr.Routes.cat([chosen, every])), session.capture(), torch.no_grad():
            model(x)
            model(x)
        assert session.routes().equal(routes)
        model.n = 0
        with pytest.raises(mr.TokenMismatchError, match="forward 1 of this replay chose"):
            with session.replay(mr.Routes.cat([every, chosen])), torch.no_grad():
                model(x)
                model(x)


class _Holder(nn.Module):
    """Holds an MoE layer no naming rule finds; its own forward is never called by the block below."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SigmaFFN(E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _SkipsItsHolder(nn.Module):
    """An MoE block that sends long inputs through the held layer, calling it past its holder."""

    def __init__(self) -> None:
        super().__init__()
        self.short = FFN()
        self.long = _Holder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.long.inner(x) if x.shape[0] > T else self.short(x)


@pytest.mark.reliability("silent replays")
def test_an_unfound_router_first_run_past_a_holder_never_called_is_refused() -> None:
    """Once silent: of the modules the watched forward did not run, only the outermost was watched at its first
    run, and a layer called past its holder (whose own forward never runs) ran natively, neither recorded nor
    forced. Each module inside such a module is watched at its first run too."""
    model = nn.Sequential(Layer(nn.Identity(), _SkipsItsHolder()))
    short, long = torch.randn(T, D), torch.randn(2 * T, D)
    with mr.attach(model) as session:
        assert session.names == ("0.mlp.short.gate",)
        with session.capture():
            model(short)  # watched, and passed
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.mlp\.long\.inner' \(SigmaFFN\): topk over 4"):
            with session.capture():
                model(long)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
