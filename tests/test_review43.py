"""Adversarial review of the decision mechanism (round 43): router and block code written as people write it, each
captured and replayed; the replay forces the captured experts with the model's own output and gradients, or it is
refused. Never neither."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from tests.conftest import tried

E, D, K, T = 6, 12, 2, 40


def _tokens(seed: int = 1, shape: tuple[int, ...] = (T, D)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _DetachedGate(nn.Module):
    """The top-k of the detached probabilities; the weights read through a one-hot of the chosen experts (the
    indices reach no autograd node, so the code after the router may edit them in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        idx = probs.detach().topk(self.top_k).indices
        return (probs[:, None, :] * F.one_hot(idx, E).to(probs)).sum(-1), idx


class _CapacityCutInPlace(nn.Module):
    """A checkpointed MoE block that drops the slots past each expert's capacity (in token order) by writing a
    sentinel into the router's indices in place, weight 0 there: ``fill`` 0 (a zero-padded slot, as
    some code routes dropped slots to expert 0) or ``E`` (a zero expert appended to the experts)."""

    def __init__(self, fill: int, reentrant: bool) -> None:
        super().__init__()
        self.gate = _DetachedGate()
        self.w = nn.Parameter(torch.randn(E, D, D, generator=torch.Generator().manual_seed(11)) / math.sqrt(D))
        self.fill, self.reentrant = fill, reentrant
        self.capacity = T * K // E // 2  # (tight: some slots are dropped)

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        flat = idx.reshape(-1)
        place = F.one_hot(flat, E).cumsum(0).gather(1, flat[:, None]).reshape(idx.shape) - 1
        drop = place >= self.capacity
        w = w.masked_fill(drop, 0.0)
        idx.masked_fill_(drop, self.fill)
        every = torch.einsum("td,edf->tef", x, torch.cat([self.w, self.w.new_zeros(1, D, D)]))
        return x + (w[..., None] * every.gather(1, idx[..., None].expand(-1, -1, D))).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = checkpoint(self._inner, x, use_reentrant=self.reentrant)
        return out


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    x = x.clone().requires_grad_(True)  # (a reentrant checkpoint needs an input that takes gradients)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("fill", [0, E])
def test_indices_cut_in_place_after_the_decision_give_the_recompute_the_experts_as_chosen(
    fill: int, reentrant: bool
) -> None:
    """Once silent (and, with a sentinel out of the experts' range, an IndexError in backward): a checkpointed block
    that drops slots past a capacity by writing a sentinel into the router's indices in place (legal in plain torch:
    the indices reach no autograd node) changed the rows moe_replay kept for the block's recompute, so the recompute
    of a capture, or of a replay, was forced with the sentinel where the forward had its experts: the gradients
    differed from the plain model's, with every check passing. The rows are kept as chosen now: a capture and a
    replay of it on the same tokens give the plain model's output and gradients."""
    torch.manual_seed(0)
    model = _CapacityCutInPlace(fill, reentrant)
    x = _tokens()
    want_out, want_grads = _step(model, x)
    session = mr.attach(model, include=["gate"])
    try:
        for mode in ("capture", "replay"):
            tried()
            if mode == "capture":
                with session.capture():
                    out, grads = _step(model, x)
                routes = session.routes()
                assert routes.per_layer()[0].shape == (T, K)
            else:
                with session.replay(routes):
                    out, grads = _step(model, x)
            assert torch.equal(out, want_out), mode
            assert len(grads) == len(want_grads)
            for got, want in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{mode}: gradients differ")
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("mode", ["capture", "replay"])
@pytest.mark.parametrize("fill", [0, E])
def test_indices_cut_in_place_after_the_decision_are_kept_for_the_load_balancing_loss_as_chosen(
    fill: int, mode: str
) -> None:
    """Once a refusal of a sound forward (or, with a sentinel that makes no duplicate, a loss over other experts):
    ``keep_scores`` kept the very indices the router handed its block, so a block that writes a sentinel into them
    in place (slots past a capacity) left ``kept.indices`` holding the sentinel, and ``load_balancing_loss`` refused
    an expert used twice or one out of range. The rows kept are the experts as chosen, as ``routes()`` records
    them."""
    torch.manual_seed(0)
    model = _CapacityCutInPlace(fill, reentrant=False)
    x = _tokens()
    session = mr.attach(model, include=["gate"])
    try:
        with session.capture():
            model(x)
        routes = session.routes()
        tried()
        run = session.capture() if mode == "capture" else session.replay(routes)
        with run, session.keep_scores() as kept:
            model(x)
        (rows,) = routes.per_layer()
        assert torch.equal(kept.indices[0].long(), rows.long())
        loss = mr.load_balancing_loss(kept.scores, kept.indices)  # (refused before: an expert twice, or out of range)
        assert torch.isfinite(loss)
    finally:
        session.detach()


# ------------------------------------------------------------------------ indices handed to the block out of band
class _ScoreGate(nn.Module):
    """A softmax gate ``[E, D]`` whose top-k values are what its forward returns."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).softmax(-1)


class _IndicesInAnAttribute(_ScoreGate):
    """Returns the weights; the experts kept in ``self.chosen`` for the block to read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, self.chosen = self.probs(x).topk(self.top_k)
        return weights


class _IndicesInADictArgument(_ScoreGate):
    """Returns the weights; the experts written into a dict the block hands in."""

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        weights, state["chosen"] = self.probs(x).topk(self.top_k)
        return weights


class _IndicesIntoAnOutTensor(_ScoreGate):
    """Returns the weights; the experts copied into a dispatch buffer the block hands in."""

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.probs(x).topk(self.top_k)
        out.copy_(chosen)
        return weights


class _OutOfBandBlock(nn.Module):
    """The block of such a gate: it reads the experts where the gate left them."""

    def __init__(self, gate: _ScoreGate) -> None:
        super().__init__()
        self.gate = gate
        self.w = nn.Parameter(torch.randn(E, D, D, generator=torch.Generator().manual_seed(11)) / math.sqrt(D))
        self.last = torch.empty(0)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        every = torch.einsum("td,edf->tef", x, self.w)
        return x + (weights[..., None] * every.gather(1, chosen.long()[..., None].expand(-1, -1, D))).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate
        if isinstance(gate, _IndicesInAnAttribute):
            weights = gate(x)
            chosen = gate.chosen
        elif isinstance(gate, _IndicesInADictArgument):
            state: dict[str, torch.Tensor] = {}
            weights = gate(x, state)
            chosen = state["chosen"]
        else:
            chosen = torch.empty(x.shape[0], K, dtype=torch.long)
            weights = gate(x, chosen)
        self.last = chosen.detach().clone()
        return self.combine(x, weights, chosen)


OUT_OF_BAND = {
    "attribute": (_IndicesInAnAttribute, "attribute 'chosen' of the router"),
    "dict argument": (_IndicesInADictArgument, "an argument of its forward"),
    "out tensor argument": (_IndicesIntoAnOutTensor, "an argument of its forward"),
}


@pytest.mark.parametrize("how", list(OUT_OF_BAND))
def test_a_gate_that_hands_its_indices_to_its_block_out_of_band_is_refused_naming_where_and_the_fix(how: str) -> None:
    """Once a misleading refusal: a gate that returns its weights and leaves its experts in an attribute or an
    argument (its block reads them there) was refused as a threshold router ("its experts are chosen by comparing
    the scores with those values"), with no word of the fix. The refusal now names where the indices went and the
    Adapter that intercepts the block, under which the replay forces the captured experts with the hand-forced
    output."""
    make, where = OUT_OF_BAND[how]
    torch.manual_seed(0)
    block = _OutOfBandBlock(make())
    x1 = _tokens(1)
    session = mr.attach(block)
    tried()
    with pytest.raises(mr.UnsupportedRouterError) as err:
        session.verify(x1)
    session.detach()
    message = str(err.value)
    assert "leave its forward outside what it returns" in message and where in message, message
    assert "scope='parent'" in message, message
    adapter = mr.Adapter("parent", match=lambda name, module: name == "gate", scope="parent")
    session = mr.attach(block, adapters=[adapter])
    try:
        with torch.no_grad(), session.capture():
            block(x1)
        (rows,) = session.routes().per_layer()
        assert torch.equal(rows.long(), block.last)
        with torch.no_grad():
            block.gate.weight.mul_(-1.0)  # (the gate now chooses other experts: only a forced replay matches)
            block(x1)
        assert not torch.equal(block.last.sort(-1).values, rows.long().sort(-1).values)
        tried()
        with session.replay(session.routes()):
            out = block(x1)
            out.square().sum().backward()
        assert torch.equal(block.last.sort(-1).values, rows.long().sort(-1).values)
        forced = rows.long()
        with torch.no_grad():
            want = block.combine(x1, block.gate.probs(x1).gather(-1, forced), forced)
        torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
    finally:
        session.detach()


# ------------------------------------------------------------------------ control flow by the number of tokens
class _StableByLength(nn.Module):
    """A softmax gate that subtracts each row's maximum from its logits first (a stable softmax by hand) on long
    inputs only (``long=True``: prefill), or on a few tokens only (decode): one decision-like call more (a ``max``
    over the experts) before the decision in one of the two."""

    def __init__(self, long: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E
        self.long = long

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if (x.shape[0] > 16) == self.long:
            logits = logits - logits.max(-1, keepdim=True).values
        weights, chosen = logits.softmax(-1).topk(self.top_k)
        return weights, chosen


class _PlainBlock(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.w = nn.Parameter(torch.randn(E, D, D, generator=torch.Generator().manual_seed(11)) / math.sqrt(D))
        self.last = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x)
        self.last = chosen.detach().clone()
        every = torch.einsum("td,edf->tef", x, self.w)
        return x + (weights[..., None] * every.gather(1, chosen[..., None].expand(-1, -1, D))).sum(1)


def _two_rollouts(gate: nn.Module) -> None:
    """Two rollouts of a prefill (40 tokens) and decode steps (4 tokens), captured; the gate's weights moved; the
    captured experts replayed in every forward."""
    torch.manual_seed(0)
    block = _PlainBlock(gate)
    sizes = (40, 4, 4, 40, 4)
    xs = [_tokens(i, (n, D)) for i, n in enumerate(sizes)]
    session = mr.attach(block)
    try:
        native = []
        with torch.no_grad(), session.capture():
            for x in xs:
                block(x)
                native.append(block.last)
        routes = session.routes()
        (rows,) = routes.per_layer()
        assert torch.equal(rows.long(), torch.cat(native))
        with torch.no_grad():
            block.gate.weight.mul_(-1.0)  # (other experts now: only a forced replay matches)
            block(xs[0])
        assert not torch.equal(block.last.sort(-1).values, native[0].sort(-1).values)
        tried()
        with torch.no_grad(), session.replay(routes):
            for x, want in zip(xs, native, strict=True):
                block(x)
                assert torch.equal(block.last.sort(-1).values, want.sort(-1).values)
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_router_whose_calls_depend_on_its_number_of_tokens_captures_and_replays_prefills_after_decode_steps() -> None:
    """Once a false refusal: a gate that subtracts the logits' maximum on long inputs alone makes one more
    decision-like call at a prefill than at a decode step; its decision was established again at the decode step (a
    forward of other calls), but the next prompt's prefill, making more calls than the forward established last, was
    refused at its first call. A router seen making other calls from one forward to the next is now checked for the
    calls of its evidence before each eager forward, and established again on that forward's inputs where they
    differ: two rollouts are captured and replayed exactly."""
    _two_rollouts(_StableByLength(long=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.xfail(
    strict=True,
    reason="false refusal, once per router and mode: the first forward that makes another decision-like call before "
    "its decision than the forwards before it (a stable softmax's max on a few tokens alone: the first decode step "
    "after a prefill) is refused at that call, where nothing can establish it any more; later such forwards are "
    "checked before they run (see the test above) and replay",
)
def test_a_router_with_one_more_call_on_a_few_tokens_captures_its_first_decode_step() -> None:
    """As above, the maximum subtracted on a few tokens alone (decode steps), not on long inputs."""
    _two_rollouts(_StableByLength(long=False))


#: the experts of each decode step, logged by :class:`_DecodeStepsLogged` (a module-level list, as a notebook keeps)
DECODE_CHOICES: list[torch.Tensor] = []


class _DecodeStepsLogged(nn.Module):
    """A softmax top-k gate that appends its choices to a list on a few tokens alone (decode steps): a module-level
    list, or one it holds (``held=True``)."""

    def __init__(self, held: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E
        self.log: list[torch.Tensor] = [] if held else DECODE_CHOICES

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = F.linear(x, self.weight).softmax(-1).topk(self.top_k)
        if x.shape[0] < 16:
            if self.log is DECODE_CHOICES:
                DECODE_CHOICES.append(chosen.detach())
            else:
                self.log.append(chosen.detach())
        return weights, chosen


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("held", [False, True], ids=["module-level list", "list it holds"])
def test_a_gate_that_logs_to_a_list_on_some_forwards_captures_and_replays(held: bool) -> None:
    """Once a false refusal: a gate appending its decode steps' experts to a list (a module-level one, or one it
    holds), empty when its decision was established on a prefill, was refused as "the model changed inside this
    capture() block": the empty list was compared as a setting (a list of integers, such as a token order), and its
    entries' being written by the gate's own code did not make its contents the gate's state. Two rollouts now
    capture and replay, and the list holds one entry per decode step run (none for the runs that establish the
    decision)."""
    DECODE_CHOICES.clear()
    gate = _DecodeStepsLogged(held)
    try:
        _two_rollouts(gate)
        assert len(gate.log) == 2 * 3  # (3 decode steps captured, 3 replayed)
    finally:
        DECODE_CHOICES.clear()


class _DecodeStepsCounted(nn.Module):
    """A softmax top-k gate that counts its decode steps (a few tokens) in a 0-d integer buffer, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        self.top_k, self.num_experts = K, E
        self.register_buffer("decode_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = F.linear(x, self.weight).softmax(-1).topk(self.top_k)
        if x.shape[0] < 16:
            self.decode_steps += 1
        return weights, chosen


@pytest.mark.reliability("silent replays")
def test_a_gate_that_counts_some_forwards_in_a_buffer_captures_and_replays() -> None:
    """Once a false refusal: a gate counting its decode steps in a 0-d integer buffer (``self.decode_steps += 1``),
    not counted on the prefill its decision was established on, was refused at the first decode step as "the model
    changed inside this capture() block": the buffer was compared as a setting (a flag or a step count someone
    sets), though the gate's own code assigns it. Two rollouts now capture and replay, and the count is the decode
    steps run (none for the runs that establish the decision)."""
    gate = _DecodeStepsCounted()
    _two_rollouts(gate)
    assert int(gate.decode_steps) == 2 * 3  # (3 decode steps captured, 3 replayed)
