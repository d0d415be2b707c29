"""A choice among experts made along another dimension than the last (experts as the channels of ``[batch, E, ...]``
scores, one choice per position of the other dimensions) is recorded and forced along that dimension; a choice
along another dimension that is not the experts' (a top-k over tokens) stays refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_public_routers6 import _Used, assert_exact, assert_refused

E, D, N, K = 6, 8, 5, 2


class ChannelMoE(_Used):
    """Experts along dim 1 of ``[batch, E, positions]`` scores (a 1x1 convolution gate over channels-first features),
    chosen per position by ``choose`` along that dimension; each expert a 1x1 convolution, weighted by the chosen
    probabilities. ``used``: the experts of each position, rows in ``[batch, positions]`` order."""

    def __init__(self, choose: str = "topk", k: int = K) -> None:
        super().__init__()
        self.choose, self.k, self.num_experts = choose, 1 if choose != "topk" else k, E
        self.gate = nn.Conv1d(D, E, 1, bias=False)
        self.experts = nn.Parameter(torch.randn(E, D, D) / D**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(dim=1)  # [B, E, N]
        if self.forced is not None:
            b, _, n = probs.shape
            idx = self.forced.view(b, n, self.k).permute(0, 2, 1)
            w = probs.gather(1, idx)
        elif self.choose == "topk":
            w, idx = probs.topk(self.k, dim=1)
        elif self.choose == "argmax":
            idx = probs.argmax(dim=1)[:, None]
            w = probs.gather(1, idx)
        else:  # max with keepdim
            w, idx = torch.max(probs, 1, keepdim=True)
        self.used = idx.permute(0, 2, 1).reshape(-1, self.k)
        outs = torch.einsum("eoi,bin->beon", self.experts, x)  # [B, E, D, N]
        chosen = outs.gather(1, idx[:, :, None, :].expand(-1, -1, D, -1))  # [B, k, D, N]
        return x + (w[:, :, None, :] * chosen).sum(1)


class TwoChannelMoE(nn.Module):
    def __init__(self, choose: str = "topk") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(ChannelMoE(choose) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _features(batch: int = 2, positions: int = N) -> torch.Tensor:
    return torch.randn(batch, D, positions, generator=torch.Generator().manual_seed(1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("choose", ["topk", "argmax", "max"])
def test_a_choice_along_the_expert_channels_is_recorded_and_forced(choose: str) -> None:
    """A top-k, an ``argmax`` and a ``max(..., keepdim=True)`` along dim 1 of ``[batch, E, positions]`` scores, named
    with ``include=``: the recorded rows are the experts each position used, and a replay after the routers changed
    gives the output and gradients of the recorded experts forced by hand; ``verify()`` says along which dimension."""
    model = TwoChannelMoE(choose)
    session = assert_exact(model, _features(), include=ChannelMoE)
    with mr.attach(model, include=ChannelMoE) as again:
        report = str(again.verify(_features()))
    assert "along dim 1 of 3-dimensional scores" in report, report
    assert session.names == again.names


@pytest.mark.reliability("silent replays")
def test_routes_of_a_choice_along_the_channels_follow_the_positions() -> None:
    """Rows are the positions in ``[batch, positions]`` order, on forwards of other sizes too: the routes of a capture
    of two forwards replay them both, and fewer positions than experts (one) are recorded as such."""
    model = TwoChannelMoE()
    inputs = [_features(2, N), _features(1, 1), _features(3, 2 * E)]
    with mr.attach(model, include=ChannelMoE) as session:
        with torch.no_grad(), session.capture():
            for x in inputs:
                model(x)
        routes = session.routes()
        assert routes.num_tokens == sum(x.shape[0] * x.shape[2] for x in inputs)
        with torch.no_grad(), session.capture():
            free = [model(x) for x in inputs]
        with torch.no_grad(), session.replay(routes):
            forced = [model(x) for x in inputs]
    assert all(torch.equal(a, b) for a, b in zip(free, forced, strict=True))


class ExpertChoice(_Used):
    """Expert-choice routing over ``[tokens, E]`` or ``[batch, tokens, E]`` scores: each expert picks its ``capacity``
    best tokens along the tokens' dimension (``dim``), a top-k or (Hunyuan's top-1 over tokens) an ``argmax``."""

    def __init__(self, choose: str = "topk", capacity: int = 2) -> None:
        super().__init__()
        self.choose, self.capacity, self.num_experts = choose, capacity, E
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.Parameter(torch.randn(E, D, D) / D**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        dim = x.dim() - 2
        if self.choose == "topk":
            w, idx = probs.topk(self.capacity, dim=dim)  # [..., capacity, E]: each expert's tokens
        else:
            idx = probs.argmax(dim=dim, keepdim=True)
            w = probs.gather(dim, idx)
        out = torch.zeros_like(x)
        for e in range(E):
            rows = idx[..., e]  # [..., capacity]
            at = rows.unsqueeze(-1).expand(*rows.shape, D)
            out = out.scatter_add(dim, at, w[..., e, None] * (x.gather(dim, at) @ self.experts[e]))
        return x + out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("choose", "shape"),
    [
        ("topk", (10, D)),
        ("topk", (E, D)),  # as many tokens as experts: the tokens' dimension as wide as the experts'
        ("topk", (2, E, D)),
        ("argmax", (10, D)),
        ("argmax", (E, D)),
    ],
    ids=["topk-tokens", "topk-as-many-tokens-as-experts", "topk-batch-as-many", "argmax-tokens", "argmax-as-many"],
)
def test_a_choice_over_tokens_along_another_dimension_stays_refused(choose: str, shape: tuple[int, ...]) -> None:
    """Expert choice (each expert's top-k of the tokens along their dimension, or Hunyuan's top-1 over tokens), named
    with ``include=``: the choice is made along another dimension than the last but among tokens, not experts, so
    reading it moved last would record each expert's tokens as tokens' experts; refused as before (also where there
    are as many tokens as experts), the model as it was."""
    torch.manual_seed(0)
    model = ExpertChoice(choose)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    assert_refused(model, x, "another dimension than the last", include=ExpertChoice)


class ChannelMoEWithTokenOrder(ChannelMoE):
    """:class:`ChannelMoE` whose forward also ranks the batch's rows along dim 0 (each expert's and position's best
    rows first: a priority among the rows, as a capacity would take), that ranking weighting the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(dim=1)
        rank = probs.argsort(dim=0, descending=True).argsort(dim=0)  # [B, E, N]: each row's rank per expert
        return super().forward(x) * (1 + 0.1 * rank.float().mean(1, keepdim=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["argsort-of-rows", "topk-of-rows"])
def test_a_choice_along_the_channels_beside_one_along_another_dimension_stays_refused(how: str) -> None:
    """Where the forward also chooses along another dimension than the experts' (a ranking or a top-k of the batch's
    rows), which is no choice among experts that the moved dimension reads, it is refused as before, the model as it
    was."""
    torch.manual_seed(0)
    if how == "argsort-of-rows":
        model: nn.Module = ChannelMoEWithTokenOrder()
    else:

        class _TopRows(ChannelMoE):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                best = self.gate(x).softmax(dim=1).topk(1, dim=0).values  # [1, E, N]: each expert's best row
                return super().forward(x) * (1 + 0.1 * best.mean(1, keepdim=True))

        model = _TopRows()
    assert_refused(model, _features(3), "another dimension than the last", include=ChannelMoE)


def _compiled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(model, fullgraph=True, backend="eager")  # type: ignore[return-value]


@pytest.mark.reliability("silent replays")
def test_a_choice_along_the_channels_is_recorded_and_forced_in_a_compiled_model() -> None:
    """Established by one eager forward, the decision along dim 1 is recorded and forced in a compiled forward
    (``fullgraph=True``: no graph break) as in an eager one."""
    torch._dynamo.reset()
    try:
        model, eager = TwoChannelMoE(), TwoChannelMoE()
        x = _features()
        compiled = _compiled(model)
        with mr.attach(model, include=ChannelMoE) as session, mr.attach(eager, include=ChannelMoE) as plain:
            with torch.no_grad():
                session.verify(x)
                with session.capture():
                    compiled(x)
                with plain.capture():
                    eager(x)
            routes = session.routes()
            assert routes.equal(plain.routes())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
                free = model(x)
                with session.replay(routes), session.capture():
                    forced = compiled(x)
            assert session.routes().equal(routes)
            with torch.no_grad(), session.replay(routes):
                assert torch.equal(model(x), forced)
            assert not torch.equal(free, forced), "the changed routers choose the recorded experts anyway"
    finally:
        torch._dynamo.reset()
