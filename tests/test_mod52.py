"""A choice, made outside the routers, of which tokens reach them (Mixture-of-Depths around an MoE block).

Routes are rows in the order a router sees its tokens: where a choice upstream of the router (MoD's top-k over the
sequence) picks other tokens at replay than at capture, the recorded rows would be forced on other tokens. The rule
checked: such a replay is refused with a ``MoEReplayError`` that says why, never run silently.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_evidence import D
from tests.test_public_routers32 import MixtralDecoderLayer, MixtralSparseMoeBlock, MoDStack


def _x() -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))


def _chosen(model: MoDStack, x: torch.Tensor) -> list[torch.Tensor]:
    """The tokens each MoD layer passes to its block, by the model's own threshold (never by moe_replay)."""
    out = []
    with torch.no_grad():
        for layer in model.layers:
            weights = layer.router(x)
            k = int(layer.capacity * x.shape[1])
            threshold = torch.topk(weights, k, dim=1, sorted=True)[0][:, -1]
            out.append(weights > threshold.unsqueeze(-1))
            x = layer(x)
    return out


def _move_mod_choice(model: MoDStack, x: torch.Tensor) -> None:
    """Change the MoD routers only (not the MoE gates) until other tokens, as many, reach the first MoE block."""
    before = _chosen(model, x)
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        with torch.no_grad():
            for layer in model.layers:
                layer.router.weight_predictor.weight.copy_(
                    torch.randn(layer.router.weight_predictor.weight.shape, generator=g)
                )
        after = _chosen(model, x)
        same_count = all(torch.equal(a.sum(dim=1), b.sum(dim=1)) for a, b in zip(after, before, strict=True))
        if same_count and not torch.equal(after[0], before[0]):
            return
    raise AssertionError("no MoD router weights found that choose other tokens")


@pytest.mark.reliability("silent replays")
def test_mod_choosing_other_tokens_at_replay_is_refused() -> None:
    """Capture, change only MoD's token routers so that other tokens (as many) reach the Mixtral gates, replay: the
    recorded rows would be forced on other tokens; the replay is refused, naming the router and why."""
    model = MoDStack().eval()
    x = _x()
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." not in n}
    with mr.attach(model) as session:
        assert session.names == ("layers.0.block.block_sparse_moe.gate", "layers.1.block.block_sparse_moe.gate")
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        _move_mod_choice(model, x)
        assert all(torch.equal(model.get_parameter(n), p) for n, p in gates.items())
        with pytest.raises(mr.MoEReplayError, match="other tokens"), session.replay(routes), torch.no_grad():
            model(x)


class _CheckpointedMoD(MoDStack):
    """The same stack, each MoD layer run under non-reentrant activation checkpointing (its forward, and so its
    choice of tokens, runs again in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if hasattr(m, "cursor"):
                m.cursor, m.used = 0, None
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return x


def _gates_changed(model: MoDStack) -> None:
    """Only the MoE gates change: MoD chooses the tokens it chose at the capture."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("block_sparse_moe.gate.weight"):
                p.add_(3.0 * torch.randn(p.shape, generator=g))


def test_mod_choosing_the_same_tokens_replays_the_recorded_rows() -> None:
    """Where MoD chooses the same tokens at replay (only the gates changed), the replay runs and forces the recorded
    rows: a capture inside it records them again, while the changed gates alone choose others."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        _gates_changed(model)
        with session.capture(), torch.no_grad():
            model(x)
        assert not session.routes().equal(routes), "the changed gates choose the recorded experts anyway"
        with session.replay(routes), session.capture(), torch.no_grad():
            model(x)
        assert session.routes().equal(routes)


def test_mod_routes_without_a_record_of_the_choice_are_refused() -> None:
    """Routes that hold no record of MoD's choice (built from the captured rows by hand: they keep no such record)
    cannot show that the routers see the tokens they were recorded on: refused, naming the module, even where the
    choice is the same."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        captured = session.routes()
        by_hand = mr.Routes(captured.per_layer(), names=captured.names, num_experts=captured.experts_per_layer)
        with pytest.raises(mr.TokenMismatchError, match="'layers.0'.*no record"), session.replay(by_hand):
            with torch.no_grad():
                model(x)
        with session.replay(session.routes()), torch.no_grad():  # (the routes read from the capture: replayed)
            model(x)


@pytest.mark.reliability("silent replays")
def test_mod_choice_found_by_verify_is_checked_from_the_first_capture() -> None:
    """A session whose routers were established by verify() (the watch ran there, not in the capture) taps MoD's
    choice from the first forward of the capture: another choice at replay is refused as well."""
    model = MoDStack().eval()
    x = _x()
    with mr.attach(model) as session:
        session.verify(x)
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        assert routes._token_choices is not None
        assert list(dict.fromkeys(p for p, _ in routes._token_choices)) == ["layers.0", "layers.1"]
        _move_mod_choice(model, x)
        with pytest.raises(mr.TokenMismatchError, match="other tokens"), session.replay(routes), torch.no_grad():
            model(x)


def test_mod_under_activation_checkpointing_replays_with_its_recompute_uncounted() -> None:
    """MoD's forward runs again in backward under checkpointing: that repeat of its choice is no new one, so a replay
    with backward passes where the choice is the same, and is refused where it is not."""
    model = _CheckpointedMoD().train()
    x = _x()
    with mr.attach(model) as session:
        with session.capture():
            model(x).square().sum().backward()
        routes = session.routes()
        _gates_changed(model)
        with session.replay(routes):
            model(x).square().sum().backward()
        _move_mod_choice(model, x)
        with pytest.raises(mr.TokenMismatchError, match="other tokens"), session.replay(routes):
            model(x).square().sum().backward()


class _IndexRouter(nn.Module):
    """A token router that takes the top-k of its own scores over each sequence and returns the chosen places."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight_predictor = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = torch.topk(self.weight_predictor(x).squeeze(-1), self.k, dim=1)
        idx, order = idx.sort(dim=1)
        return w.gather(1, order).sigmoid(), idx


class _GatherMoD(nn.Module):
    """Mixture-of-Depths whose choice is made inside its token router (a child beside the block it feeds): the chosen
    tokens gathered, run through the Mixtral layer as one batch, scattered back scaled by their score."""

    def __init__(self) -> None:
        super().__init__()
        self.router = _IndexRouter(3)
        self.block = MixtralDecoderLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        at = idx[..., None].expand(-1, -1, x.shape[-1])
        out = self.block(x.gather(1, at))[0] * w[..., None]
        return x.scatter_add(1, at, out)


class _GatherStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList([_GatherMoD() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if isinstance(m, MixtralSparseMoeBlock):
                m.cursor, m.used = 0, None
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.reliability("silent replays")
def test_mod_choice_made_inside_its_token_router_is_checked() -> None:
    """The top-k over each sequence taken inside a token router beside the MoE layer it feeds (its indices gather
    the tokens): recorded at capture; a replay where it chooses the same tokens runs, one where the token router's
    weights moved so that it chooses others is refused."""
    model = _GatherStack().eval()
    x = _x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        assert routes._token_choices is not None
        assert {p for p, _ in routes._token_choices} == {"layers.0.router", "layers.1.router"}
        with session.replay(routes), torch.no_grad():
            model(x)
        before = model.layers[0].router(x)[1]
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            while torch.equal(model.layers[0].router(x)[1], before):
                model.layers[0].router.weight_predictor.weight.copy_(torch.randn(1, D, generator=g))
        with pytest.raises(mr.TokenMismatchError, match="'layers.0.router'.*other tokens"), session.replay(routes):
            with torch.no_grad():
                model(x)
