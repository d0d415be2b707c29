"""More router code of public MoE libraries, with zero configuration (see ``test_public_routers``).

Each block keeps the decision structure of one upstream router (our own code, small). The rule checked: a
replay is proven exact (the experts used are the recorded ones, and the output and gradients are those of the
same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused with a
``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import (
    D,
    E,
    Experts,
    RouterBlock,
    T,
    TwoLayers,
    dispatch,
    perturb,
)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*(shape or (T,)), D, generator=torch.Generator().manual_seed(seed))


class _Forced(nn.Module):
    """A router whose decision can be forced by hand: ``forced`` rows replace its own choice."""

    forced: torch.Tensor | None = None


@contextlib.contextmanager
def _forced_by_hand(model: nn.Module, rows: list[torch.Tensor]) -> Iterator[None]:
    """The routers of ``model`` (in module order) choose ``rows`` until the block ends (a backward's recompute
    under activation checkpointing included)."""
    routers = [m for m in model.modules() if isinstance(m, _Forced)]
    try:
        for router, r in zip(routers, rows, strict=True):
            router.forced = r.long()
        yield
    finally:
        for router in routers:
            router.forced = None


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def assert_replay_is_forced_by_hand(model: nn.Module, x: torch.Tensor) -> mr.Session:
    """Capture with gradients: the captured rows forced by hand (on a copy never attached) give the captured output.
    After the routers change (alike on both), a free forward gives another output than those rows forced by hand,
    and a replay gives the very output and gradients of the rows forced by hand. The same seed before the forwards
    compared, so that noise in training is drawn alike."""
    ref = copy.deepcopy(model)
    with mr.attach(model) as session:
        torch.manual_seed(3)
        with session.capture():
            captured = model(x)
        captured.square().sum().backward()
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        torch.manual_seed(3)
        with torch.no_grad(), _forced_by_hand(ref, rows):
            assert torch.equal(ref(x), captured.detach()), "the rows are not the experts used"
        model.zero_grad()
        perturb(model)
        perturb(ref)
        torch.manual_seed(4)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            expected.square().sum().backward()
        torch.manual_seed(4)
        with torch.no_grad():
            free = model(x)
        assert not torch.equal(free, expected.detach()), "the changed routers choose the recorded experts anyway"
        torch.manual_seed(4)
        with session.replay(routes):
            replayed = model(x)
        replayed.square().sum().backward()
        assert torch.equal(replayed.detach(), expected.detach())
        got, want = _grads(model), _grads(ref)
        assert got.keys() == want.keys()
        for name in got:
            assert (got[name] is None) == (want[name] is None), name
            assert got[name] is None or torch.equal(got[name], want[name]), name
        routers = [m for m in model.modules() if isinstance(m, _Forced)]
        assert routers and all(p.grad is not None for r in routers for p in r.parameters()), "no gradient to a router"
    return session


# ----------------------------------------------------------------------- expert choice, as many tokens as experts
class MixturesExpertChoiceRouter(nn.Module):
    """jaisidhsingh/pytorch-mixtures ``routing.py`` ``ExpertChoiceRouter`` (after flaxformer): ``[b, n, d]`` inputs,
    softmax probabilities permuted to ``[b, E, n]``, each expert's top-``capacity`` tokens of its sequence, dispatch
    and combine tensors from a one-hot of the token indices."""

    def __init__(self) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(D, E))
        self.num_experts = E

    def forward(self, x: torch.Tensor, expert_capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(torch.einsum("bnd,de->bne", x, self.w_gate), dim=-1)
        n = probs.shape[1]
        gate, index = torch.topk(probs.permute(0, 2, 1), k=expert_capacity, dim=-1)
        dispatch_tensor = F.one_hot(index, n).permute(0, 3, 1, 2).float()  # [b, n, E, c]
        return dispatch_tensor, torch.einsum("bec,bnec->bnec", gate, dispatch_tensor)


class MixturesMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = MixturesExpertChoiceRouter()
        self.experts = Experts()
        self.num_experts, self.capacity_factor = E, 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dispatch_tensor, combine = self.router(x, int((x.shape[1] * self.capacity_factor) // E))
        inputs = torch.einsum("bnd,bnec->becd", x, dispatch_tensor)
        outputs = torch.stack([expert(inputs[:, e]) for e, expert in enumerate(self.experts)], 1)
        return torch.einsum("becd,bnec->bnd", outputs, combine)


class ExpertsByTokensRouter(nn.Module):
    """torchtune ``modules/moe/moe.py`` ``ExpertChoiceTopKRouter``: ``gate(x).transpose(0, 1)`` scores ``[E, tokens]``,
    a softmax over the experts (dim 0), each expert's top ``tokens * capacity_factor / E`` tokens (``dim=1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.capacity_factor = E, 2.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softmax(self.gate(x).transpose(0, 1), dim=0)
        tokens_per_expert = int(x.shape[0] * self.capacity_factor / self.num_experts)
        return torch.topk(scores, k=tokens_per_expert, dim=1)


class ExpertsByTokensBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = ExpertsByTokensRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, tok = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out.index_add(0, tok[e], w[e, :, None] * expert(x[tok[e]]))
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        pytest.param(MixturesMoELayer, (2, 12), id="pytorch-mixtures-batched"),
        pytest.param(MixturesMoELayer, (3, E), id="pytorch-mixtures-as-many-tokens-as-experts"),
        pytest.param(MixturesMoELayer, (1, E), id="pytorch-mixtures-one-sequence"),
        pytest.param(ExpertsByTokensBlock, (E,), id="torchtune-as-many-tokens-as-experts"),
    ],
)
def test_expert_choice_with_batch_rows_or_as_many_tokens_as_experts_is_refused(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """Once silent: expert choice whose top-k runs per sequence (``[b, E, n]`` scores), or on as many tokens as there
    are experts, has the shape of a token choice; it was recorded with E = the tokens of a sequence, token ids as
    experts, and the rows differed from the experts the tokens went to. Refused as expert choice, model untouched."""
    model = TwoLayers(make).eval()
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="expert-choice routing"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x(*shape))
    assert_untouched(model, before)


class SequenceRouter(_Forced):
    """Token choice on ``[b, s, d]`` inputs (the router sees the batch and sequence dimensions)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            return torch.topk(probs, self.top_k, dim=-1)
        idx = self.forced.view(*probs.shape[:-1], self.top_k)
        return probs.gather(-1, idx), idx


class SequenceBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = SequenceRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        flat = x.reshape(-1, D)
        return dispatch(self.experts, flat, idx.reshape(len(flat), -1), w.reshape(len(flat), -1)).view_as(x)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        pytest.param(lambda: RouterBlock(SequenceRouter()), (E,), id="flat"),
        pytest.param(SequenceBlock, (2, E), id="batch"),
        pytest.param(SequenceBlock, (1, E), id="one-sequence"),
    ],
)
def test_token_choice_on_as_many_tokens_as_experts_is_not_taken_for_expert_choice(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """The counterpart of the refusal above: a token choice whose sequences hold as many tokens as there are experts
    is replayed exactly, with gradients."""
    assert_replay_is_forced_by_hand(TwoLayers(make).train(), _x(*shape))


# ----------------------------------------------------------------------- batch-level top-k, gumbel, PEER, AoE
class BatchTopKRouter(nn.Module):
    """A batch-level (global) top-k, as in Expert Race routing: the top ``T * k`` of all token-expert scores at once,
    a dense gate of the kept ones."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).softmax(-1)
        _, flat = scores.flatten().topk(x.shape[0] * self.top_k)
        return scores * torch.zeros_like(scores).flatten().scatter(0, flat, 1.0).view_as(scores)


class DenseGateBlock(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = gates[:, e].nonzero().squeeze(-1)
            if tok.numel():
                out = out.index_add(0, tok, gates[tok, e, None] * expert(x[tok]))
        return out


def test_a_batch_level_top_k_over_flattened_scores_is_refused_naming_it() -> None:
    """Tokens and experts chosen together have no per-token choice: refused, naming the flat top-k (once named as
    soft routing with no decision-like call at all)."""
    model = TwoLayers(lambda: DenseGateBlock(BatchTopKRouter()))
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=rf"flat scores \(topk over all {T * E} values"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)
