"""More public MoE router code, with zero configuration (see ``test_public_routers11``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows are
the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_evidence import D, E, Experts, dispatch
from tests.test_public_routers2 import _x
from tests.test_public_routers6 import Layers, _Used, assert_exact
from tests.test_public_routers9 import _assert_refused, _pick


# ----------------------------------------------------------------------- GroveMoE: adjugate experts per group
class GroveMoEBlock(_Used):
    """inclusionAI GroveMoE (arXiv 2508.07785, ``GroveMoeSparseMoeBlock``): a Qwen3-MoE router (softmax, top-k,
    renormalised) over experts in groups; each group's small *adjugate* expert runs once for the tokens that chose
    any expert of the group, weighted by the group's summed routing weight times a scale. The adjugate experts are
    chosen by the ids alone (``idx // group_size``), not by scores."""

    def __init__(self, k: int = 2, groups: int = 4, scale: float = 0.5) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.groups, self.scale = E, k, groups, scale
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.chunk_experts = nn.ModuleList(nn.Linear(D, D) for _ in range(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, idx = _pick(probs, self.forced, self.top_k)
        w = w / w.sum(-1, keepdim=True)
        self.used = idx
        out = dispatch(self.experts, x, idx, w)
        group = idx // (E // self.groups)
        group_w = torch.zeros(x.shape[0], self.groups, dtype=w.dtype).scatter_add(1, group, w)
        for g, expert in enumerate(self.chunk_experts):
            tok = (group_w[:, g] > 0).nonzero(as_tuple=True)[0]
            if tok.numel():
                out = out.index_add(0, tok, self.scale * group_w[tok, g, None] * expert(x[tok]))
        return out


# ----------------------------------------------------------------------- HyperMoE: the unchosen experts' knowledge
class HyperMoEBlock(_Used):
    """HyperMoE (Zhao et al., ACL 2024, ``HyperMoE``): a Mixtral top-k, plus a hyper-expert whose weights a
    hypernetwork makes from the mean embedding of the experts the token did *not* choose (``1 - one_hot(idx).sum``):
    the output depends on the complement of the chosen set."""

    def __init__(self, k: int = 2, rank: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.rank = E, k, rank
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.expert_embeddings = nn.Parameter(torch.randn(E, 6) / 2)
        self.hypernet = nn.Linear(6, D * rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        out = dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))
        unchosen = 1.0 - F.one_hot(idx, E).sum(1).to(x.dtype)
        cond = unchosen @ self.expert_embeddings / unchosen.sum(-1, keepdim=True)
        down = self.hypernet(cond).view(-1, D, self.rank)
        h = F.gelu(torch.einsum("td,tdr->tr", x, down))
        return out + torch.einsum("tr,tdr->td", h, down)


# ----------------------------------------------------------------------- XVERSE-MoE: fine-grained, shared, unnormalised
class XverseMoEBlock(_Used):
    """XVERSE-MoE-A4.2B (``XverseMoEMLP``): fine-grained experts, softmax then top-k without renormalisation, and
    shared experts always added (the weights as the top-k values, the scores in float32)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.shared_experts = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).float().softmax(-1)
        w, idx = _pick(probs, self.forced, self.top_k)
        self.used = idx
        return dispatch(self.experts, x, idx, w.to(x.dtype)) + self.shared_experts(x)


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train``, ``change`` and attach options)
    "grovemoe-adjugate-experts-by-group": (lambda: Layers(GroveMoEBlock), _x, {}),
    "grovemoe-top3-two-groups-train": (lambda: Layers(lambda: GroveMoEBlock(3, 2)), _x, {"train": True}),
    "hypermoe-unchosen-experts-hypernetwork": (lambda: Layers(HyperMoEBlock), _x, {"change": 0.3}),
    "xverse-moe-shared-unnormalised-top3": (lambda: Layers(XverseMoEBlock), _x, {"change": 0.5}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """GroveMoE's adjugate experts chosen by the group of the chosen experts, HyperMoE's hyper-expert made from the
    experts not chosen, XVERSE-MoE's shared and unnormalised
    fine-grained experts: every router found and nothing else, the recorded rows the experts used, and a replay after
    the routers change those experts forced by hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)  # type: ignore[arg-type]


class TokenModel(nn.Module):
    """An embedding in front of two layers of a block above: ``[batch, seq]`` token ids in, so that a replay can tell
    the tokens it is fed from those its routes were recorded for."""

    def __init__(self, make: Callable[[], nn.Module], vocab: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, D)
        self.layers = Layers(make)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embed(input_ids).flatten(0, 1))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", ["grovemoe-top3-two-groups-train"])
def test_routes_of_another_batch_are_refused_and_those_of_the_batch_replay(case: str) -> None:
    """A block above fed token ids: routes of batch A replayed on batch B (or on A's sequences swapped) are refused
    with ``TokenMismatchError`` before any router reads a row; on A itself they replay the experts recorded."""
    make, _, options = EXACT[case]
    model = TokenModel(make).train(bool(options.get("train", False)))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 32, (2, 6), generator=g), torch.randint(0, 32, (2, 6), generator=g)
    assert not torch.equal(a, a.flip(0)) and not torch.equal(a, b)
    routers = [m for m in model.modules() if isinstance(m, _Used)]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(a)
        routes = session.routes()
        used = [r.used.clone() for r in routers if r.used is not None]
        for other in (b, a.flip(0)):
            with pytest.raises(mr.TokenMismatchError, match="other tokens than its routes were recorded for"):
                with torch.no_grad(), session.replay(routes):
                    model(other)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        with torch.no_grad(), session.replay(routes):
            model(a)
        assert len(used) == len(routers)
        for router, rows in zip(routers, used, strict=True):
            assert router.used is not None and torch.equal(router.used.long(), rows.long())


# ----------------------------------------------------------------------- a capacity by score on some batches only
class OverloadDropBlock(_Used):
    """Capacity-aware token drop at inference (He et al. 2025, "Capacity-Aware Inference: Mitigating the Straggler
    Effect in Mixture of Experts", arXiv 2503.05066): an overloaded expert keeps its ``capacity`` best tokens by
    routing weight, the others' slot is dropped. Written as such code is to spare work: the drop runs only where it
    has something to drop (``when="overloaded"``: an expert over its capacity; ``"large"``: a batch of more than 64
    tokens, as a prefill), and one expert's tokens are ranked by a one-dimensional ``topk``; ``"large-cut"``: a
    minimum weight instead, on such batches only; ``"read-back"``: a minimum weight, where the smallest weight
    read back to Python is under it. The block's first
    batch (24 tokens, spread over the experts) takes neither branch."""

    def __init__(self, when: str) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity, self.when = E, 2, 20, when
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = _pick(self.gate(x).softmax(-1), self.forced, self.top_k)
        keep = torch.ones_like(w, dtype=torch.bool)
        if self.when == "large-cut" and x.shape[0] > 64:  # (a minimum weight, on large batches only)
            keep = w > 0.15
        if self.when == "read-back" and float(w[:, -1].min()) < 0.05:  # (a minimum weight, where a weight is under)
            keep = w > 0.05
        overloaded = bool((torch.bincount(idx.flatten(), minlength=E) > self.capacity).any())
        if overloaded if self.when == "overloaded" else self.when == "large" and x.shape[0] > 64:
            for e in range(E):
                tok, slot = (idx == e).nonzero(as_tuple=True)
                if tok.numel() > self.capacity:
                    kept = torch.zeros(tok.numel(), dtype=torch.bool)
                    kept[torch.topk(w[tok, slot], self.capacity).indices] = True
                    keep[tok[~kept], slot[~kept]] = False
        self.used = idx
        return dispatch(self.experts, x, idx, w * keep)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["overloaded", "large", "large-cut", "read-back"])
def test_a_capacity_by_score_taken_only_on_other_batches_than_the_first_is_refused(when: str) -> None:
    """Once silent: a drop by score over a capacity (or a weight cut) that the first batch never reaches (no
    expert overloaded, or too few tokens for the branch that enforces it) made no later choice there, so it was
    never checked, and a later batch of 200 tokens that takes it made the same decision-like calls (its top-k over
    one expert's tokens has one dimension): its rows named experts its tokens did not use, and a replay dropped
    other slots, by the current weights. Now the decision is also held, at its first forward, on one token
    repeated past any capacity and on inputs four times as spread: refused there, saying why, the model as it
    was."""
    x = _x(24)
    model = Layers(lambda: OverloadDropBlock(when))
    first = model.layers[0]  # (the first batch takes no branch that drops: the case tries something)
    with torch.no_grad():
        idx = first.gate(x).softmax(-1).topk(2).indices
    assert torch.bincount(idx.flatten(), minlength=E).max() <= first.capacity
    assert float(first.gate(x).softmax(-1).topk(2).values[:, -1].min()) >= 0.05
    _assert_refused(model, x, "chooses again from the current scores on (more tokens|other inputs) than it was first")
