"""More router code of public MoE libraries, with zero configuration (see ``test_public_routers``).

Each block keeps the decision structure of one upstream router (our own code, small). The rule checked: a
replay is proven exact (the experts used are the recorded ones, and the output and gradients are those of the
same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused with a
``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import (
    D,
    E,
    Experts,
    ExpertSpy,
    RouterBlock,
    T,
    TwoLayers,
    as_sets,
    assert_capture_and_replay_are_exact,
    dispatch,
    perturb,
)
from tests.test_public_routers import assert_exact_in_training


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


def assert_replay_is_forced_by_hand(
    model: nn.Module,
    x: torch.Tensor,
    *,
    router_grads: bool | None = True,
    change: float = 3.0,
    loss: Callable[[torch.Tensor], torch.Tensor] = lambda out: out.square().sum(),
    **attach: object,
) -> mr.Session:
    """Capture with gradients: the captured rows forced by hand (on a copy never attached) give the captured output.
    After the routers change (alike on both), a free forward gives another output than those rows forced by hand,
    and a replay gives the very output and gradients of the rows forced by hand. The same seed before the forwards
    compared, so that noise in training is drawn alike. ``router_grads``: the routers get a gradient (not where
    the combine weights are a one-hot, which has none; None: not checked, where the router module holds more than
    the gate). ``change``: the scale of the noise added to the routers (see ``perturb``); ``loss``: what is
    differentiated (of the model's output). ``attach``: options of
    :func:`moe_replay.attach`."""
    ref = copy.deepcopy(model)
    with mr.attach(model, **attach) as session:
        torch.manual_seed(3)
        with session.capture():
            captured = model(x)
        loss(captured).backward()
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        torch.manual_seed(3)
        with torch.no_grad(), _forced_by_hand(ref, rows):
            assert torch.equal(ref(x), captured.detach()), "the rows are not the experts used"
        model.zero_grad()
        perturb(model, change)
        perturb(ref, change)
        torch.manual_seed(4)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            loss(expected).backward()
        torch.manual_seed(4)
        with torch.no_grad():
            free = model(x)
        assert not torch.equal(free, expected.detach()), "the changed routers choose the recorded experts anyway"
        torch.manual_seed(4)
        with session.replay(routes):
            replayed = model(x)
        loss(replayed).backward()
        assert torch.equal(replayed.detach(), expected.detach())
        got, want = _grads(model), _grads(ref)
        assert got.keys() == want.keys()
        for name in got:
            assert (got[name] is None) == (want[name] is None), name
            assert got[name] is None or torch.equal(got[name], want[name]), name
        routers = [m for m in model.modules() if isinstance(m, _Forced)]
        assert routers
        if router_grads is not None:
            assert all((p.grad is not None) == router_grads for r in routers for p in r.parameters()), "router grads"
    return session


# ----------------------------------------------------------------------- neuronx-distributed
class NeuronRouter(_Forced):
    """aws-neuron ``neuronx_distributed/modules/moe/routing.py``: ``RouterTopK`` (a top-k of the logits whose values
    are dropped) or ``RouterSinkhorn`` (top-1 ``argmax`` of Sinkhorn-balanced logits in training, of the logits in
    eval, under ``no_grad``); both return the logits, the dense affinities (softmax in float64, or sigmoid) and the
    indices, the combine weights are left to the experts."""

    def __init__(self, top_k: int, sinkhorn: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.hidden_size = E, top_k, D
        self.act_fn = "sigmoid" if sinkhorn else "softmax"
        self.sinkhorn_iterations = 8 if sinkhorn else None
        self.linear_router = nn.Linear(D, E, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.linear_router(h)
        if self.act_fn == "sigmoid":
            affinities = torch.sigmoid(logits.to(torch.float64))
        else:
            affinities = F.softmax(logits, dim=1, dtype=torch.float64)
        affinities = affinities.to(h.dtype)
        if self.sinkhorn_iterations is None:
            index = self.forced if self.forced is not None else torch.topk(logits, self.top_k)[1]
            return logits, affinities, index.detach().long()
        with torch.no_grad():
            route = _sinkhorn(logits.detach().float(), self.sinkhorn_iterations) if self.training else logits.detach()
            index = self.forced if self.forced is not None else torch.argmax(route, dim=1, keepdim=True)
        return logits, affinities, index.long()


def _sinkhorn(cost: torch.Tensor, iterations: int) -> torch.Tensor:
    cost = torch.exp(cost)
    d0, d1 = torch.ones(cost.size(0)), torch.ones(cost.size(1))
    for _ in range(iterations):
        d0 = (1 / d0.size(0)) / (torch.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.size(0)) / (torch.sum(d0.unsqueeze(1) * cost, 0) + 1e-8)
    return d1 * cost * d0.unsqueeze(1)


class NeuronExpertMLPs(nn.Module):
    """neuronx-distributed ``ExpertMLPs``: a float64 k-hot mask built by comparing the indices with ``arange``, the
    affinities masked by it (L1-normalised), then one of ``forward_capacity_factor`` (positions by a cumulative sum,
    tokens past the capacity dropped by ``masked_fill_``, token/expert permutations by index arithmetic),
    ``forward_all_experts`` (every expert on every token, optionally scaling the inputs first) or
    ``forward_selective_loading`` (a loop over tokens with their chosen experts' weights)."""

    def __init__(self, top_k: int, mode: str, normalize: bool = True, early: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.mode, self.normalize, self.early = E, top_k, mode, normalize, early
        self.capacity_factor = 1.0
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * D) / 4)
        self.down_proj = nn.Parameter(torch.randn(E, D, D) / 4)

    def mlp(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj if experts is None else self.gate_up_proj[experts]
        down = self.down_proj if experts is None else self.down_proj[experts]
        gate, up = (x @ gate_up).chunk(2, -1)
        return (F.silu(gate) * up) @ down

    def expert_mask(self, index: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(index.shape[0], E, dtype=torch.float64)
        arange = torch.arange(E, dtype=torch.float64)
        for k in range(index.shape[1]):
            mask += (index[:, k].unsqueeze(1) == arange).to(torch.float64)
        return mask

    def masked(self, affinities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = affinities.masked_fill(torch.eq(mask, 0), 0)
        return F.normalize(out, p=1.0, dim=1) if self.normalize else out

    def forward(self, h: torch.Tensor, affinities: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        tokens = h.shape[0]
        if self.mode == "all":
            mask = self.expert_mask(index)
            weights = self.masked(affinities, mask)
            x = sum(h * weights[:, e : e + 1] for e in range(E)) if self.early else h
            out = self.mlp(x.unsqueeze(0).expand(E, -1, -1))
            scale = mask if self.early else weights
            return sum(out[e] * scale[:, e : e + 1].to(h.dtype) for e in range(E))
        if self.mode == "selective":
            chosen = affinities[torch.arange(tokens).unsqueeze(1), index]
            if self.normalize:
                chosen = F.normalize(chosen, p=1.0, dim=1)
            outs = []
            for t in range(tokens):
                y = self.mlp(h[t].view(1, 1, D).expand(index.shape[1], 1, D), index[t]).squeeze(1)
                outs.append(torch.sum(y * chosen[t].unsqueeze(1), dim=0))
            return torch.stack(outs)
        capacity = min(math.ceil(tokens * self.top_k * self.capacity_factor / E), tokens)
        mask = self.expert_mask(index)
        position = torch.cumsum(mask, dim=0)
        mask.masked_fill_(torch.gt(position, capacity), 0)
        weights = self.masked(affinities, mask)
        with_offset = position + torch.arange(E, dtype=torch.float64) * capacity
        with_offset.masked_fill_(torch.eq(mask, 0), 0)
        token_idx = torch.arange(tokens).unsqueeze(1)
        permutation = with_offset[token_idx, index].long()
        assignments = torch.zeros(capacity * E + 1, dtype=torch.long)
        assignments[permutation] = token_idx + 1
        assignments = assignments[1:].view(E, capacity)
        zero = torch.zeros(1, dtype=torch.long)
        permutation, assignments = torch.max(permutation - 1, zero), torch.max(assignments - 1, zero)
        out_e = self.mlp(h[assignments, :]).view(capacity * E, -1)
        out = torch.zeros_like(h)
        for k in range(index.shape[1]):
            out = out + out_e[permutation[:, k]] * weights[token_idx, index[:, k].unsqueeze(1)].to(h.dtype)
        return out


class NeuronMoE(nn.Module):
    def __init__(self, mode: str, top_k: int = 2, sinkhorn: bool = False, **experts: bool) -> None:
        super().__init__()
        self.router = NeuronRouter(top_k, sinkhorn)
        self.expert_mlps = NeuronExpertMLPs(top_k, mode, **experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, affinities, index = self.router(x)
        return self.expert_mlps(x, affinities, index)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: NeuronMoE("capacity"), id="topk-capacity-factor"),
        pytest.param(lambda: NeuronMoE("all", early=True), id="topk-all-experts-early-affinity"),
        pytest.param(lambda: NeuronMoE("selective", normalize=False), id="topk-selective-loading"),
        pytest.param(lambda: NeuronMoE("capacity", top_k=1, sinkhorn=True, normalize=False), id="sinkhorn-top1"),
    ],
)
def test_neuronx_distributed_routers_and_expert_mlps_replay_the_hand_forced_forward(
    make: Callable[[], nn.Module], training: bool
) -> None:
    """neuronx-distributed's routers return dense affinities beside indices whose values they drop; the experts mask
    the affinities with a k-hot built by comparisons, drop tokens over a capacity by position, or run every expert:
    a replay gives the output and gradients of the recorded experts forced by hand."""
    session = assert_replay_is_forced_by_hand(TwoLayers(make).train(training), _x())
    assert [s.num_experts for s in session.sites] == [E, E]


# ----------------------------------------------------------------------- OLMo-core
class OlmoRouterV2(_Forced):
    """allenai/OLMo-core ``nn/moe/v2/router.py`` ``MoERouterV2``: a flat ``[E * d]`` weight viewed as ``[E, d]``,
    fp32 softmax scores, ``topk`` then ``gather`` of the scores, and the ``use_recompute_cache`` option: the first
    forward with gradients keeps its indices on the module, the next one (an activation checkpoint's recompute)
    uses them and clears them."""

    def __init__(self) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.top_k = D, E, 2
        self.weight = nn.Parameter(torch.randn(E * D) * 0.3)
        self.use_recompute_cache = True
        self._recompute_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.view(self.num_experts, self.d_model)).softmax(dim=-1)
        if self.forced is None:
            _, indices = torch.topk(scores, self.top_k, dim=-1)
        else:
            indices = self.forced
        weights = scores.gather(-1, indices)
        if self.use_recompute_cache:
            if self._recompute_cache is None:
                if torch.is_grad_enabled():
                    self._recompute_cache = indices.detach()
            else:
                indices = self._recompute_cache
                self._recompute_cache = None
        return weights, indices


class CheckpointedLayers(TwoLayers):
    """Two residual MoE layers, each under a non-reentrant activation checkpoint when gradients are on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + (checkpoint(layer, x, use_reentrant=False) if torch.is_grad_enabled() else layer(x))
        return x


def test_olmo_core_router_caching_its_indices_for_the_recompute_is_exact_under_checkpointing() -> None:
    """The router's own recompute cache (indices kept on the module by the forward, used by the checkpoint's
    recompute) sees one forward and one recompute: a capture gives the plain output and gradients and leaves no
    cache behind, and a replay gives those of the recorded experts forced by hand."""
    model = CheckpointedLayers(lambda: RouterBlock(OlmoRouterV2())).train()
    plain = copy.deepcopy(model)
    x = _x()
    expected = plain(x)
    expected.square().sum().backward()
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session:
            with session.capture():
                captured = model(x)
            captured.square().sum().backward()
            assert torch.equal(captured, expected)
            got, want = _grads(model), _grads(plain)
            assert all(torch.equal(got[n], want[n]) for n in want if want[n] is not None)
            routes = session.routes()
            for b, name in enumerate(session.names):
                assert torch.equal(as_sets(routes.layer(name)), spy.experts_of(b)), name
            assert all(layer.router._recompute_cache is None for layer in model.layers)
    finally:
        spy.remove()
    assert_replay_is_forced_by_hand(CheckpointedLayers(lambda: RouterBlock(OlmoRouterV2())).train(), _x())


class EmoRouter(nn.Module):
    """OLMo-core ``nn/moe/emo_router.py`` ``EmoRouter`` (document-pool, two-level routing): each document's softmax
    summed over its tokens (``scatter_add_`` by document id, ``gather`` back), its experts ranked by a double
    ``argsort``, all but the top ``pool`` masked to -inf in the logits (the pool size drawn with ``randint`` per
    document in training), then softmax and ``topk`` over the masked logits, whose values are the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.num_choose_experts = E, 2, 2
        self.min_document_expert_pool, self.max_document_expert_pool, self.eval_document_expert_pool = 3, 6, 4
        self.weight = nn.Parameter(torch.randn(E * D) * 0.3)

    def forward(self, x: torch.Tensor, seg_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.view(E, D))
        batch, seq, n = logits.shape
        index = seg_id.unsqueeze(-1).expand(-1, -1, n)
        doc = torch.zeros(batch, seq, n).scatter_add_(1, index, logits.softmax(-1)).gather(1, index)
        if self.training:
            pool = torch.randint(self.min_document_expert_pool, self.max_document_expert_pool + 1, (batch, seq))
        else:
            pool = torch.full((batch, seq), self.eval_document_expert_pool, dtype=torch.long)
        rank = doc.argsort(dim=-1, descending=True).argsort(dim=-1)
        keep = rank < pool.gather(1, seg_id).unsqueeze(-1)
        scores = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        return torch.topk(scores, self.num_choose_experts, dim=-1)


class EmoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = EmoRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        seg_id = (torch.arange(seq) // 4).expand(batch, seq)  # documents of four tokens
        w, idx = self.router(x, seg_id=seg_id)
        flat = x.reshape(-1, D)
        return dispatch(self.experts, flat, idx.reshape(len(flat), -1), w.reshape(len(flat), -1)).view_as(x)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_olmo_core_document_pool_routing_is_refused_naming_the_pool(training: bool) -> None:
    """The pool masks the logits before the softmax whose top-k values are the weights: a forced expert outside the
    current pool would weigh 0. Refused at the first capture, naming the ranking call; the model is left as it was
    and its forward runs as before."""
    model = TwoLayers(EmoBlock).train(training)
    x = _x(2, 12)
    before = snapshot(model)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = model(x)
    with pytest.raises(mr.UnsupportedRouterError, match=r"argsort\(\).*masked weight"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(x)
    assert_untouched(model, before)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(model(x), plain)


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


class MultiHeadRouter(SequenceRouter):
    """The router of a Multi-Head MoE (MH-MoE; lhallee/Multi_Head_Mixture_of_Experts__MH-MOE ``MultiHeadMoeBlock``):
    it scores the sub-tokens, ``heads`` per token, of width ``d / heads``; the top-2 renormalised."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.gate = nn.Linear(D // heads, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = super().forward(x)
        return w / w.sum(-1, keepdim=True).clamp(min=1e-20), idx


class MultiHeadMoE(nn.Module):
    """MH-MoE: a ``multi_head_layer`` projection, tokens split into sub-tokens, sub-tokens routed to small experts,
    then merged back by a ``merge_layer``."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.multi_head_layer, self.merge_layer = nn.Linear(D, D), nn.Linear(D, D)
        self.router = MultiHeadRouter(heads)
        self.experts = nn.ModuleList(nn.Linear(D // heads, D // heads) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.multi_head_layer(x).reshape(-1, D // self.heads)
        w, idx = self.router(sub)
        return self.merge_layer(dispatch(self.experts, sub, idx, w).reshape(x.shape))


@pytest.mark.parametrize("shape", [(2, 6), (1, 2)], ids=["sub-tokens", "as-many-sub-tokens-as-experts"])
def test_multi_head_moe_routing_sub_tokens_is_exact(shape: tuple[int, ...]) -> None:
    """Rows are sub-tokens (``heads`` per token), also where there are as many of them as experts: exact, with
    gradients."""
    assert_replay_is_forced_by_hand(TwoLayers(MultiHeadMoE).train(), _x(*shape))


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


class PerExpertTopKBlock(nn.Module):
    """Expert choice written as a loop over the experts, each taking the top-``capacity`` tokens of its column."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.num_experts, self.capacity = E, 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).softmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w, tok = scores[:, e].topk(self.capacity)
            out = out.index_add(0, tok, w[:, None] * expert(x[tok]))
        return out


@pytest.mark.parametrize(
    ("make", "values"),
    [
        pytest.param(lambda: DenseGateBlock(BatchTopKRouter()), T * E, id="batch-level-top-k"),
        pytest.param(PerExpertTopKBlock, T, id="expert-choice-per-expert-loop"),
    ],
)
def test_a_top_k_over_flat_scores_is_refused_naming_it(make: Callable[[], nn.Module], values: int) -> None:
    """Tokens chosen together with experts, or by each expert in turn, make no per-token choice: refused, naming the
    flat top-k (once named as soft routing with no decision-like call at all), the model left as it was."""
    model = TwoLayers(make)
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=rf"flat scores \(topk over all {values} values"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class GumbelHardRouter(_Forced):
    """Straight-through Gumbel-softmax top-1 routing (``F.gumbel_softmax(hard=True)`` in training, the one-hot of the
    ``argmax`` in eval), the expert read back by an ``argmax`` of the one-hot and weighted by its value. ``form``:
    ``"one-hot"`` (the one-hot alone in eval), ``"straight-through"`` (``hard - soft.detach() + soft`` in eval too,
    so that the router has a gradient), ``"top-2"`` (a two-hot of a top-2, read back by a top-2)."""

    def __init__(self, form: str = "one-hot") -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.form = form
        self.num_experts, self.top_k = E, 2 if form == "top-2" else 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.training:
            gates = F.gumbel_softmax(logits, tau=1.0, hard=True)
        else:
            soft = logits.softmax(-1)
            chosen = soft.topk(self.top_k, dim=-1)[1] if self.forced is None else self.forced
            gates = torch.zeros_like(soft).scatter(-1, chosen, 1.0)
            if self.form == "straight-through":
                gates = gates - soft.detach() + soft
        idx = gates.topk(self.top_k, dim=-1)[1] if self.form == "top-2" else gates.argmax(-1, keepdim=True)
        return gates.gather(-1, idx), idx


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("form", ["one-hot", "straight-through", "top-2"])
def test_gumbel_softmax_hard_routing_in_eval_is_the_choice_its_one_hot_is_made_of(form: str) -> None:
    """Once a false refusal: in eval the expert is read back from a one-hot made by an earlier choice (the top-1 of
    the scores), and only that read-back was taken as the decision; forcing it alone would weigh a forced expert by
    the one-hot's 0, so the earlier choice was refused as reshaping its scores. The earlier choice is the decision
    (the read-back finds its experts, and moves with them): the replay is the recorded experts forced by hand."""
    model = TwoLayers(lambda: RouterBlock(GumbelHardRouter(form))).eval()
    assert_replay_is_forced_by_hand(model, _x(), router_grads=form == "straight-through")
    with mr.attach(model) as session:
        for ev in session.verify(_x()).evidence.values():
            assert ev.decision == (0,) and ev.followers == (1,) and "only reads it back" in ev.describe()


class DenseGumbelRouter(nn.Module):
    """The one-hot of ``F.gumbel_softmax(hard=True)`` as dense gates (no read-back: the block dispatches by its
    nonzeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gumbel_softmax(self.gate(x), tau=1.0, hard=True)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda: RouterBlock(GumbelHardRouter()), "random stream", id="read-back"),
        pytest.param(
            lambda: DenseGateBlock(DenseGumbelRouter()), r"at random inside one call \(gumbel_softmax", id="dense"
        ),
    ],
)
def test_gumbel_softmax_hard_routing_in_training_is_refused(make: Callable[[], nn.Module], match: str) -> None:
    """In training the experts are drawn (Gumbel noise, inside ``gumbel_softmax``), read back by an ``argmax`` of
    the one-hot or dispatched by its nonzeros: a replay could force a read-back but not the draw. Refused, the model
    left as it was; the dense one-hot (no decision-like call seen) once named soft routing, now the draw."""
    model = TwoLayers(make).train()
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match=match):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class StickyRouter(nn.Module):
    """A top-1 of the scores with a bonus on an earlier choice's expert (the argmax of the logits): the later
    top-1 finds the earlier choice's expert on the real tokens, but, that choice moved, reads the scores too."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        hot = F.one_hot(logits.argmax(-1), E).to(logits.dtype)
        return (logits + 0.3 * hot).softmax(-1).topk(1, dim=-1)


def test_a_later_choice_that_reads_the_scores_besides_an_earlier_one_is_not_taken_as_its_read_back() -> None:
    """The read-back rule takes an earlier choice as the decision only where the later call follows it: a bonus on
    its expert (which the current scores can outweigh once it is forced elsewhere) is still refused."""
    model = TwoLayers(lambda: RouterBlock(StickyRouter())).eval()
    before = snapshot(model)
    with pytest.raises(mr.UnsupportedRouterError, match="earlier choice"):
        with mr.attach(model) as session, torch.no_grad(), session.capture():
            model(_x())
    assert_untouched(model, before)


class PEER(nn.Module):
    """lucidrains/PEER-pytorch ``PEER`` (parameter-efficient expert retrieval): queries in two halves scored against
    per-head sub-keys, a top-k per half, the sums of the candidate pairs, a top-k of those; the experts are rows of
    two ``nn.Embedding`` tables gathered by the product indices."""

    def __init__(self, heads: int = 2, num_experts: int = 16, per_head: int = 2, dim_key: int = 4) -> None:
        super().__init__()
        self.heads, self.num_experts, self.num_experts_per_head, self.dim_key = heads, num_experts, per_head, dim_key
        self.num_keys, self.product_key_topk = math.isqrt(num_experts), per_head
        self.weight_down_embed = nn.Embedding(num_experts, D)
        self.weight_up_embed = nn.Embedding(num_experts, D)
        self.to_queries = nn.Linear(D, dim_key * heads * 2, bias=False)
        self.keys = nn.Parameter(torch.randn(heads, self.num_keys, 2, dim_key) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_queries(x).view(b, n, 2, self.heads, self.dim_key).permute(2, 0, 1, 3, 4)
        sim = torch.einsum("pbnhd,hkpd->pbnhk", q, self.keys)
        (scores_x, scores_y), (idx_x, idx_y) = sim.topk(self.product_key_topk, dim=-1)
        all_scores = (scores_x[..., :, None] + scores_y[..., None, :]).flatten(-2)
        all_idx = (idx_x[..., :, None] * self.num_keys + idx_y[..., None, :]).flatten(-2)
        scores, pk = all_scores.topk(self.num_experts_per_head, dim=-1)
        idx = all_idx.gather(-1, pk)
        hidden = F.gelu(torch.einsum("bnd,bnhkd->bnhk", x, self.weight_down_embed(idx))) * scores.softmax(-1)
        return torch.einsum("bnhk,bnhkd->bnd", hidden, self.weight_up_embed(idx))


def test_peer_product_key_retrieval_is_not_found_and_refused_when_named() -> None:
    """No router to find (no gate beside the expert tables); named with include=, the two chained top-k calls are
    refused as two choices (a product-key decision cannot be forced by a gather), the model left as it was."""
    model = TwoLayers(PEER)
    before = snapshot(model)
    with pytest.raises(mr.RouterNotFoundError, match="include="):
        mr.attach(model)
    with pytest.raises(mr.UnsupportedRouterError, match="more than one independent choice"):
        with mr.attach(model, include="layers.*") as session, torch.no_grad(), session.capture():
            model(_x(2, 12))
    assert_untouched(model, before)


class AutonomyOfExpertsBlock(nn.Module):
    """Autonomy-of-Experts (Lv et al. 2025): no router; each expert's low-rank down-projection of the token, the
    norms of those activations ranked by a ``topk``, the weights a softmax of the top norms."""

    def __init__(self, rank: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.w_down = nn.Parameter(torch.randn(E, D, rank) / 4)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.einsum("td,edr->ter", x, self.w_down).norm(dim=-1)
        w, idx = norms.topk(self.top_k, dim=-1)
        return dispatch(self.experts, x, idx, w.softmax(-1))


def test_autonomy_of_experts_is_not_found_and_exact_when_named() -> None:
    """Experts that rank themselves by their activation norms: no router module to find (refused with the way out),
    and exact once the blocks are named with include=."""
    model = TwoLayers(AutonomyOfExpertsBlock)
    with pytest.raises(mr.RouterNotFoundError, match="include="):
        mr.attach(model)
    assert_capture_and_replay_are_exact(model, include="layers.*")
    assert_exact_in_training(TwoLayers(AutonomyOfExpertsBlock).train(), include="layers.*")
