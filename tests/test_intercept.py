"""Replay of decisions made on masked scores (``masked_fill``/``where`` copies read through).

A router that masks its own scores (an availability mask, a padding mask, group-limited routing
with too few groups) may leave fewer than k selectable experts for a token: its top-k then picks
masked experts, whose values are the mask's fill (``-inf``, or 0 after a softmax). A replay reads
forced experts' values through the mask (a forced expert outside the groups the current scores
chose gets its real score), but the experts the call itself could have picked must get the very
values the call returns: otherwise a replay of the captured routes gives other weights than the
capture, with no error.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr

E, D, T, K = 8, 16, 12, 3


def allowed_of(x: torch.Tensor) -> torch.Tensor:
    """Which experts each token may use: every third token two, the next one, the rest all (k = 3)."""
    allowed = torch.ones(x.shape[0], E, dtype=torch.bool)
    allowed[0::3, 2:] = False
    allowed[1::3, 1:] = False
    return allowed


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k, self.num_experts = K, E
        self.kept: torch.Tensor | None = None  # the experts its mask left selectable in the last forward


class InfMaskedLogits(Router):
    """Unavailable experts' logits set to -inf, a softmax over the top-k values (weight 0 for a masked pick)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kept = allowed_of(x)
        logits = F.linear(x, self.weight).masked_fill(~self.kept, float("-inf"))
        values, idx = logits.topk(self.top_k, dim=-1)
        return values.softmax(-1), idx


class ZeroAfterSoftmax(Router):
    """Unavailable experts' probabilities set to 0 (``torch.where``, through torch's functions), renormalised."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kept = allowed_of(x)
        probs = torch.where(self.kept, F.linear(x, self.weight).softmax(-1), 0.0)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


class GroupLimitedGreedy(Router):
    """DeepSeek-V2 group-limited greedy: the weights are the top-k values of the group-masked scores; with
    ``topk_group`` groups of 2 experts kept, fewer than k = 3 are selectable."""

    def __init__(self, n_group: int = 4, topk_group: int = 1) -> None:
        super().__init__()
        self.n_group, self.topk_group = n_group, topk_group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, self.weight).softmax(-1)
        group_scores = scores.view(x.shape[0], self.n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        keep = group_mask.unsqueeze(-1).expand(-1, self.n_group, E // self.n_group).reshape(x.shape[0], -1)
        self.kept = keep.bool()
        return torch.topk(scores.masked_fill(~self.kept, 0.0), k=self.top_k, dim=-1, sorted=False)


class BiasedGroupLimited(Router):
    """DeepSeek-V3 style: sigmoid scores, a selection-only bias (some choices below 0), group mask to 0.0;
    the weights are the top-k values less the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.linspace(-0.6, 0.3, E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, 4, E // 4).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).repeat_interleave(E // 4, dim=1)
        self.kept = keep.bool()
        values, idx = torch.topk(choice.masked_fill(~self.kept, 0.0), k=self.top_k, dim=-1, sorted=False)
        w = values - self.e_score_correction_bias[idx]
        return w / w.sum(-1, keepdim=True), idx


class Block(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


class TwoLayers(nn.Module):
    def __init__(self, make: Callable[[], nn.Module], checkpointed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(make()), Block(make())])
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + (checkpoint(layer, x, use_reentrant=False) if self.checkpointed else layer(x))
        return x


ROUTERS: dict[str, Callable[[], nn.Module]] = {
    "inf-masked-logits": InfMaskedLogits,
    "zero-after-softmax": ZeroAfterSoftmax,
    "group-limited-greedy": GroupLimitedGreedy,
    "biased-group-limited": BiasedGroupLimited,
}


class RouterOutputs:
    """What each router returned (weights, indices), forward by forward."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [
            layer.router.register_forward_hook(lambda m, a, o: self.seen.append((o[0].detach().clone(), o[1].clone())))
            for layer in model.layers
        ]

    def last(self, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.seen[-n:]


def tokens() -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1))


def masked_picks(model: nn.Module, x: torch.Tensor) -> int:
    """How many of the first router's choices its own mask excludes (the premise of these tests)."""
    router = model.layers[0].router
    with torch.no_grad():
        idx = router(x)[1]
    return int((~router.kept.gather(1, idx)).sum())


@pytest.mark.parametrize("name", list(ROUTERS))
def test_a_mask_that_leaves_fewer_than_k_experts_replays_the_captured_weights(name: str) -> None:
    """Captured in eval without gradients, replayed with and without gradients in train mode: the
    router returns the captured weights, and the gradients are those of a plain forward."""
    model, x = TwoLayers(ROUTERS[name]), tokens()
    assert masked_picks(model, x) > 0
    out = model(x)
    out.square().sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    spy = RouterOutputs(model)
    with mr.attach(model) as session:
        model.eval()
        with torch.no_grad(), session.capture():
            captured = model(x)
        captured_weights = spy.last()
        routes = session.routes()
        with torch.no_grad(), session.replay(routes):
            assert torch.equal(model(x), captured)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(spy.last(), captured_weights, strict=True))
        model.train()
        with session.replay(routes):
            replayed = model(x)
            replayed.square().sum().backward()
        assert torch.equal(replayed.detach(), captured)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == plain_grads.keys()
        assert all(torch.equal(grads[n], plain_grads[n]) for n in grads), name
        with session.capture():  # with gradients on, the capture answers with a gather too
            assert torch.equal(model(x).detach(), out.detach())


@pytest.mark.parametrize("name", ["inf-masked-logits", "zero-after-softmax"])
def test_whichever_tied_masked_expert_was_captured_its_weight_is_replayed(name: str) -> None:
    """Which of several masked experts (tied at the fill) a top-k returns is up to the implementation (CPU
    and GPU may differ): routes naming other masked experts replay them, with the captured weights."""
    model, x = TwoLayers(ROUTERS[name]), tokens()
    allowed = allowed_of(x)
    spy = RouterOutputs(model)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured = spy.last()
        routes = session.routes()
        layers = []
        for layer_name in routes.names:
            rows = routes.layer(layer_name).long().clone()
            for t in range(T):
                unused = [e for e in range(E) if not allowed[t, e] and e not in rows[t].tolist()]
                for slot in range(K):
                    if not allowed[t, rows[t, slot]] and unused:
                        rows[t, slot] = unused.pop()  # another masked expert: a tie another top-k may return
            layers.append(rows)
        others = mr.Routes(layers, routes.names, E)
        assert not others.equal(routes)
        with torch.no_grad(), session.replay(others):
            model(x)
    for i, ((w, idx), (w0, _), rows) in enumerate(zip(spy.last(), captured, layers, strict=True)):
        assert torch.equal(idx, rows)
        if i == 0:
            assert torch.equal(w, w0)
        else:  # its input went through other (zero-weight) experts above, summed in another order: rounding only
            torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["inf-masked-logits", "group-limited-greedy"])
def test_a_checkpointed_replay_of_masked_picks_recomputes_the_same_values(name: str) -> None:
    """Under non-reentrant activation checkpointing the recompute reads the masked values as its forward
    did (the same saved tensors), and the gradients are a plain forward's."""
    model, x = TwoLayers(ROUTERS[name], checkpointed=True), tokens()
    model(x).square().sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            captured = model(x)
        with session.replay(session.routes()):
            replayed = model(x)
            replayed.square().sum().backward()
    assert torch.equal(replayed.detach(), captured)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(grads[n], plain_grads[n]) for n in plain_grads)


def test_forced_experts_outside_the_current_groups_still_get_their_scores() -> None:
    """With enough groups kept the call never picks a masked expert itself: after the router changed, a
    forced expert outside the groups its scores now choose gets its real score, not the mask's 0."""
    model, x = TwoLayers(lambda: GroupLimitedGreedy(n_group=4, topk_group=2)), tokens()
    spy = RouterOutputs(model)
    router = model.layers[0].router
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        with torch.no_grad():
            router.weight.add_(3 * torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(2)))
            native = router(x)[1]
        assert not torch.equal(native.sort(-1).values, routes.layer(session.names[0]).long().sort(-1).values)
        with torch.no_grad(), session.replay(routes):
            model(x)
    w, idx = spy.last()[0]
    assert torch.equal(w, F.linear(x, router.weight).softmax(-1).gather(1, idx))


class NaNAmongTheScores(Router):
    """A NaN score (an overflow upstream) for expert 0 of some tokens, unavailable experts' logits set to -inf:
    the top-k returns the NaN as it returns any value, and the weights of its row are zeroed after."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kept = allowed_of(x)
        logits = F.linear(x, self.weight)
        broken = torch.zeros_like(logits, dtype=torch.bool)
        broken[0::4, 0] = True
        logits = torch.where(broken, float("nan"), logits).masked_fill(~self.kept, float("-inf"))
        values, idx = logits.topk(self.top_k, dim=-1)
        return values.softmax(-1).nan_to_num(0.0), idx


class NaNFill(Router):
    """Unavailable experts' probabilities set to NaN, picked last (``largest=False`` over negated
    probabilities), their weights zeroed after the top-k."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kept = allowed_of(x)
        cost = torch.where(self.kept, -F.linear(x, self.weight).softmax(-1), float("nan"))
        values, idx = cost.topk(self.top_k, dim=-1, largest=False)
        return -values.nan_to_num(0.0), idx


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaNs at the same places included."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("make", [NaNAmongTheScores, NaNFill], ids=["nan-score", "nan-fill"])
def test_a_nan_among_the_masked_values_is_replayed_as_the_call_returns_it(make: Callable[[], nn.Module]) -> None:
    """A NaN is not equal to itself: the forced experts of a row holding one are still the call's own choice, and
    get the masked values the call returns (not their real scores), in a replay and in a capture with gradients."""
    model, x = TwoLayers(make), tokens()
    assert masked_picks(model, x) > 0
    with torch.no_grad():
        weights = model.layers[0].router(x)[0]
    assert not weights.isnan().any()
    plain = model(x)
    spy = RouterOutputs(model)
    with mr.attach(model) as session:
        with session.capture():  # with gradients on, the capture answers with a gather
            assert torch.equal(model(x), plain)
        with torch.no_grad(), session.capture():
            captured = model(x)
        captured_weights = spy.last()
        routes = session.routes()
        with torch.no_grad(), session.replay(routes):
            assert torch.equal(model(x), captured)
        assert all(_same(a[0], b[0]) for a, b in zip(spy.last(), captured_weights, strict=True))


class MarginOverTheNext(Router):
    """A top-(k+1) of the masked probabilities: each weight is its probability less half the best one left out
    (0 where the mask left no other)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kept = allowed_of(x)
        probs = F.linear(x, self.weight).softmax(-1).masked_fill(~self.kept, 0.0)
        values, idx = probs.topk(self.top_k + 1, dim=-1)
        return values[:, : self.top_k] - 0.5 * values[:, self.top_k :], idx[:, : self.top_k]


def test_the_slots_past_k_of_a_masked_top_k_plus_one_are_those_the_call_returns() -> None:
    """The slot past k of a top-(k+1) over a masked copy is the best expert the mask left, at its masked value: a
    capture with gradients gives the plain forward's outputs and gradients, and a replay the captured weights."""
    model, x = TwoLayers(MarginOverTheNext), tokens()
    assert masked_picks(model, x) > 0
    plain = model(x)
    plain.square().sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    spy = RouterOutputs(model)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            captured = model(x)
        captured_weights = spy.last()
        routes = session.routes()
        with session.capture():
            assert torch.equal(model(x), plain)
        with torch.no_grad(), session.replay(routes):
            assert torch.equal(model(x), captured)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(spy.last(), captured_weights, strict=True))
        with session.replay(routes):
            model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)


# ----------------------------------------------------------------------------- settings changed since the decision
# (routers from tests/test_evidence.py: a bare Linear gate, the top-k and the dispatch in the block, which returns
# hidden states only)
from . import test_evidence as ev  # noqa: E402


class MinWeightBlock(ev.LinearGateBlock):
    """Drops a slot weighing under ``min_weight`` after the top-k; 0 (no cut) until a setting turns it on."""

    def __init__(self) -> None:
        super().__init__()
        self.min_weight = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        if self.min_weight > 0:
            idx = torch.where(w >= self.min_weight, idx, torch.full_like(idx, -1))
        return ev.dispatch(self.experts, x, idx, w)


class BiasFlagBlock(ev.LinearGateBlock):
    """Two top-k calls of one form every forward; ``cfg.use_bias`` (a config object) picks which one dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.linspace(-1.0, 1.0, ev.E))
        self.cfg = types.SimpleNamespace(use_bias=False)
        self.runs = 0  # its own count of forwards (probe runs included): state, not a setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        s = self.gate(x).sigmoid()
        plain = torch.topk(s, 2, dim=-1).indices
        biased = torch.topk(s + self.bias, 2, dim=-1).indices
        idx = biased if self.cfg.use_bias else plain
        return ev.dispatch(self.experts, x, idx, s.gather(-1, idx))


class QuietBiasFlagBlock(BiasFlagBlock):
    """:class:`BiasFlagBlock` without a count of its own: its forward changes none of its attributes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(x).sigmoid()
        plain = torch.topk(s, 2, dim=-1).indices
        biased = torch.topk(s + self.bias, 2, dim=-1).indices
        idx = biased if self.cfg.use_bias else plain
        return ev.dispatch(self.experts, x, idx, s.gather(-1, idx))


def _turn_on(model: nn.Module) -> None:
    for block in model.layers:
        if isinstance(block, MinWeightBlock):
            block.min_weight = 0.3
        else:
            block.cfg.use_bias = True


def _experts_used_are_the_routes(model: nn.Module, session: mr.Session, forwards: Callable[[], None]) -> bool:
    """Run ``forwards`` (one model forward) under a spy: did every block's experts get what the routes say?"""
    spy = ev.ExpertSpy(model)
    try:
        forwards()
        routes = session.routes()
        return all(
            torch.equal(spy.experts_of(b), ev.as_sets(routes.layer(name)[-ev.T :]))
            for b, name in enumerate(session.names)
        )
    finally:
        spy.remove()


@pytest.mark.parametrize("block", [MinWeightBlock, BiasFlagBlock], ids=["cut-turned-on", "flag-on-a-config"])
def test_a_setting_changed_between_blocks_establishes_the_decision_again(block: type[nn.Module]) -> None:
    """Once silent: a setting changed after the decision was established (a cut turned on, a config flag that
    picks which top-k dispatches) kept the old decision, and captures recorded experts the model did not use."""
    model = ev.TwoLayers(block)
    x = torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(x)  # (the second one lean)
        _turn_on(model)
        if block is MinWeightBlock:  # a cut after the top-k by the current scores cannot be replayed: refused
            with pytest.raises(mr.UnsupportedRouterError, match="chooses again from the current scores"):
                with session.capture():
                    model(x)
            return

        def capture() -> None:
            with session.capture():
                model(x)

        assert _experts_used_are_the_routes(model, session, capture)
        routes = session.routes()
        ev.perturb(model)

        def replay() -> None:
            with session.replay(routes), session.capture():
                model(x)

        assert _experts_used_are_the_routes(model, session, replay)


def test_a_setting_changed_inside_a_block_is_refused_as_it_ends() -> None:
    """Once silent: a config flag flipped inside a capture block left the later forwards recording the
    experts of the call that no longer dispatched. A setting that a choice after the decision reads (a cut turned
    on) is refused as the block ends. A flag that picks which of two top-k calls dispatches, in a block that returns
    none of its decision's indices, has which call decides checked at each forward, whether or not the block changes
    its own state (a count of its forwards): the flip is seen at the forward after it, and that forward's decision
    established afresh."""
    model = ev.TwoLayers(MinWeightBlock)
    x = torch.randn(ev.T, ev.D)
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(
            mr.SessionStateError,
            match=r"changed inside this capture\(\) block: 'min_weight' of router 'layers\.0\.gate'",
        ):
            with session.capture():
                model(x)
                _turn_on(model)
                model(x)
    for block in (QuietBiasFlagBlock, BiasFlagBlock):
        counting = ev.TwoLayers(block)
        with mr.attach(counting) as session, torch.no_grad():

            def flipped_inside(model: nn.Module = counting, session: mr.Session = session) -> None:
                with session.capture():
                    model(x)
                    _turn_on(model)
                    model(x)

            assert _experts_used_are_the_routes(counting, session, flipped_inside), block.__name__


def test_state_a_router_changes_itself_does_not_establish_its_decision_again() -> None:
    """A count the router keeps itself changes at every forward: it is no setting, and the probes run once."""
    model = ev.TwoLayers(BiasFlagBlock)
    x = torch.randn(ev.T, ev.D)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        after_first = [b.runs for b in model.layers]
        for _ in range(3):
            with session.capture():
                model(x)
    assert [b.runs for b in model.layers] == [n + 3 for n in after_first]


class CountlessBiasFlagBlock(BiasFlagBlock):
    """:class:`BiasFlagBlock` keeping no count of its forwards: its settings stay as they are between them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.runs = 0
        return out


def test_a_config_flag_changed_between_sessions_establishes_the_decision_again() -> None:
    """Once silent: a later session on the same model reused the decision an earlier one established, with the
    config flag that picks the dispatching top-k changed in between (plain attributes alone were compared)."""
    model = ev.TwoLayers(CountlessBiasFlagBlock)
    x = torch.randn(ev.T, ev.D)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    _turn_on(model)
    with mr.attach(model) as session, torch.no_grad():

        def capture() -> None:
            with session.capture():
                model(x)

        assert _experts_used_are_the_routes(model, session, capture)


class BufferFlaggedBias(ev.FlaggedBias):
    """:class:`~tests.test_evidence.FlaggedBias` whose flag is a boolean buffer: state, not a setting."""

    def __init__(self) -> None:
        super().__init__(types.SimpleNamespace(use_bias=False))
        self.register_buffer("use_bias", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.linear(x, self.weight).sigmoid()
        plain, biased = self.pick(s), self.pick(s + self.bias)
        idx = biased if bool(self.use_bias) else plain
        return s.gather(-1, idx), idx


@pytest.mark.reliability("silent replays")
def test_a_switch_of_the_dispatching_call_between_sessions_is_forced_exactly() -> None:
    """Once silent: a flag that no setting shows, switched between two sessions on one model, made the second
    session (which reuses the decision) learn the new branch as the one returned, and force the other call; then
    refused. A router with twin calls has its decision checked by its effect at a later session's first forward
    too: the second session forces the call that now dispatches."""
    model = ev.TwoLayers(lambda: ev.RouterBlock(BufferFlaggedBias()))
    x = torch.randn(ev.T, ev.D)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    for block in model.layers:
        block.router.use_bias.fill_(True)  # the bias steers routing from now on
    g = torch.Generator().manual_seed(2)
    rows = [torch.stack([torch.randperm(ev.E, generator=g)[:2] for _ in range(ev.T)]) for _ in range(2)]
    spy = ev.ExpertSpy(model)
    try:
        with mr.attach(model) as session, torch.no_grad():
            forced = mr.Routes(rows, names=session.names, num_experts=ev.E)
            with session.replay(forced):
                model(x)
            for b in range(2):
                assert torch.equal(spy.experts_of(b), ev.as_sets(rows[b]))
    finally:
        spy.remove()


class _GateBlock(nn.Module):
    """Mixtral-style: a bare ``Linear`` gate, the top-k in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(2):
            for e, expert in enumerate(self.experts):
                out = out + (idx[:, slot] == e)[:, None] * w[:, slot : slot + 1] * expert(x)
        return out


@pytest.mark.reliability("clear errors")
def test_a_gate_hook_that_logs_a_top_k_is_refused_by_name() -> None:
    """A forward hook on the gate counting the experts' load takes a top-k of its logits. The runs that
    establish the decision set such hooks aside, so every real forward made one call more than the one
    established and was refused as a change of control flow, with no word of the hook."""
    model = nn.Sequential(_GateBlock(), _GateBlock())
    load = torch.zeros(E)

    def expert_load(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        load.add_(torch.bincount(out.topk(2, dim=-1).indices.flatten(), minlength=E))

    model[0].gate.register_forward_hook(expert_load)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match=r"hooks are registered .* on 'gate' \(.*expert_load\)"):
            with session.capture():
                model(torch.randn(T, D))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.reliability("clear errors")
def test_a_gate_of_another_width_in_another_mode_names_both_modes_and_the_way_out() -> None:
    """A gate's weight replaced by a narrower one after a training forward: the first forward without
    gradients chose from the new width and was refused as a router choosing otherwise by mode, naming one
    mode as a tuple and an Adapter as the only way out. Setting the width re-establishes every mode."""
    torch.manual_seed(0)
    model = nn.Sequential(_GateBlock(), _GateBlock())
    x = torch.randn(T, D)
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        for block in model:
            block.gate.weight = nn.Parameter(torch.randn(E - 2, D))
        with pytest.raises(
            mr.UnsupportedRouterError,
            match=r"2 of 8 experts in train mode with gradients, but "
            r"chooses 2 of 6 in train mode without gradients.*out_features",
        ):
            with torch.no_grad(), session.capture():
                model(x)
        for block in model:
            block.gate.out_features = E - 2
        with torch.no_grad(), session.capture():
            model(x)
        with session.capture():
            model(x)
        assert session.routes().experts_per_layer == (E - 2, E - 2)


class ReturnsIndicesOnRequest(nn.Module):
    """One top-k; returns ``(weights, indices)`` when its caller asks for them (a ``return_indices`` flag), or in
    eval mode (``by_mode``), else dense combine weights alone (``[T, E]``, the weights scattered at its indices), or
    with ``unrouted`` its scores alone: a branch whose output its decision does not make."""

    def __init__(self, by_mode: bool = False, unrouted: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ev.E, ev.D))
        self.top_k, self.by_mode, self.unrouted = 2, by_mode, unrouted

    def forward(self, x: torch.Tensor, return_indices: bool = True) -> tuple[torch.Tensor, ...]:
        probs = F.linear(x, self.weight).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if (not self.training) if self.by_mode else return_indices:
            return w, idx
        return (probs,) if self.unrouted else (torch.zeros_like(probs).scatter(1, idx, w),)


class AsksForIndicesSometimes(nn.Module):
    """Asks its router for the indices on every other forward; dispatches on the dense weights otherwise."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router, self.experts = router, ev.Experts()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.router(x, return_indices=self.calls % 2 == 1)
        if len(out) == 2:
            return ev.dispatch(self.experts, x, out[1], out[0])
        (dense,) = out
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = (dense[:, e] > 0).nonzero()[:, 0]
            if tok.numel():
                y = y.index_add(0, tok, dense[tok, e, None] * expert(x[tok]))
        return y


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("by_mode", [False, True], ids=["flag", "mode"])
def test_a_router_that_returns_its_indices_on_some_forwards_only_is_captured_and_replayed_exactly(
    by_mode: bool,
) -> None:
    """Once refused as "other indices" (a branch switched after the decision): a router of one top-k that
    returned its indices at its first forward, and only dense weights at a later one. It returns no other
    indices, and its dense weights are made from its decision: captured and replayed exactly, forward by forward."""
    model = ev.TwoLayers(lambda: AsksForIndicesSometimes(ReturnsIndicesOnRequest(by_mode)))
    xs = [torch.randn(ev.T, ev.D, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    spy = ev.ExpertSpy(model)

    def forwards() -> list[list[torch.Tensor]]:
        used = []
        for i, x in enumerate(xs):
            model.train(by_mode and i % 2 == 1)
            model(x)
            used.append([spy.experts_of(b) for b in range(2)])
        return used

    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                captured = forwards()
            routes = session.routes()
            for b, name in enumerate(session.names):
                rows = routes.layer(name)
                assert torch.equal(ev.as_sets(rows), torch.cat([used[b] for used in captured])), f"capture of {name}"
            ev.perturb(model)
            with session.replay(routes):
                replayed = forwards()
            for was, now in zip(captured, replayed, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(was, now, strict=True))
    finally:
        spy.remove()


def test_a_router_whose_output_without_indices_is_not_made_from_its_decision_is_refused() -> None:
    """The other side: the branch without indices returns the unrouted scores, so its decision reaches nothing it
    returns there; the forward is refused, not taken as routed by the recorded rows. The flag is an argument of the
    router's forward, a setting of its decision: its change establishes the decision again on this forward, where
    no call changes the output, and the refusal says so and names the argument."""
    model = ev.TwoLayers(lambda: AsksForIndicesSometimes(ReturnsIndicesOnRequest(unrouted=True)))
    x = torch.randn(ev.T, ev.D)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
        with pytest.raises(mr.UnsupportedRouterError, match="no decision-like call in its forward changes") as caught:
            model(x)
    assert "argument 'return_indices' of its forward is False, but was True" in str(caught.value)


class ChoosesByMode(nn.Module):
    """Top-2 in train mode, top-1 in eval mode: one decision per mode, of two shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ev.E, ev.D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight).softmax(-1).topk(2 if self.training else 1, dim=-1)


@pytest.mark.reliability("clear errors")
def test_a_decision_established_mid_block_is_refused_for_what_happened_not_as_a_changed_model() -> None:
    """Once misleading: a decision established in the middle of a block with another k than the rows in use was
    refused as "the model changed inside this block", where nothing was changed: a warm-up moved dispatch to a
    top-2 (the router's own state), or a forward ran in another mode, where the router chooses otherwise. The
    refusal says which, and the model is left as it was."""
    torch.manual_seed(7)
    block, x = ev._Top1WarmupBlock(top_k=2), torch.randn(10, ev.D)
    with mr.attach(block) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match="now chooses 2 of 8") as caught, session.capture():
            block(x)  # (the warm-up: the argmax dispatches)
            block(x)
    assert "another of its calls over the experts decided instead" in str(caught.value)
    assert "model changed" not in str(caught.value)

    model = ev.TwoLayers(lambda: ev.RouterBlock(ChoosesByMode())).eval()
    with mr.attach(model) as session, torch.no_grad():
        with pytest.raises(mr.UnsupportedRouterError, match="now chooses 2 of 8") as caught, session.capture():
            model(x)
            model.train()
            model(x)
        model.eval()
        with session.capture():
            model(x)
        model.train()
        with pytest.raises(mr.RoutesValidationError, match="hold rows of 1 of 8") as replayed:
            with session.replay(session.routes()):
                model(x)
    for err in (caught, replayed):
        assert "chooses otherwise by mode" in str(err.value) and "model changed" not in str(err.value)
    assert "capture each mode in a block of its own" in str(caught.value)
    assert "replay in the mode the routes were recorded in" in str(replayed.value)
