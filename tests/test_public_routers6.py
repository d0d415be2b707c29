"""Router code of more public MoE libraries and papers, with zero configuration (see ``test_public_routers5``).

Each block keeps the decision structure of one upstream router (our own code, small, named after its source). Each
router module keeps the expert ids its forward dispatched by in its last run (``used``), in its own code, not from
moe_replay. The rule checked: a replay is proven exact (every router found and nothing else, the recorded rows
are the experts used, a replay after the routers change uses the recorded experts, and its output and gradients are
those of the same forward with the recorded experts forced by hand, which never calls moe_replay), or it is refused
with a ``MoEReplayError`` that says why, the model left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.conftest import assert_untouched, snapshot
from tests.test_evidence import D, E, Experts, T, dispatch, perturb
from tests.test_public_routers import ResidualStack
from tests.test_public_routers2 import _Forced, _forced_by_hand, _x


class _Used(_Forced):
    """A router that can be forced by hand and keeps the experts it used in its last forward: ``used``, one row of
    expert ids per routed row."""

    used: torch.Tensor | None = None


def _sets(rows: torch.Tensor) -> torch.Tensor:
    """Rows of expert ids as sorted rows (the slot order is the model's business, the set of experts is not)."""
    return rows.long().sort(-1).values


def _routers(model: nn.Module) -> dict[str, _Used]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Used)}


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum()


def assert_exact(
    model: nn.Module,
    x: torch.Tensor,
    *,
    change: float = 3.0,
    train: bool = False,
    make_ref: Callable[[nn.Module], nn.Module] = copy.deepcopy,
    as_used: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows,
    same_forwards: bool = False,
    holders: bool = False,
    **attach: object,
) -> mr.Session:
    """Capture, then replay after the routers change, against the recorded experts forced by hand on a copy never
    attached: discovery finds exactly the ``_Used`` modules (or one module inside each), the captured rows are the
    experts used, the replay's routers use the recorded experts, and its output and gradients are the hand-forced
    ones. The same seed before the forwards compared, so that noise in training is drawn alike. ``as_used``: the
    expert ids that recorded rows name (where the routes hold positions in a group of the experts).
    ``same_forwards``: the copy also runs the free forward the model runs before its replay (a model that changes its
    own parameters in place at every forward). ``holders``: a router found may hold the ``_Used`` module instead (a
    proxy whose forward calls it)."""
    model.train(train)
    ref = make_ref(model)
    routers = _routers(model)
    with mr.attach(model, **attach) as session:
        assert len(session.names) == len(routers), (session.names, list(routers))
        for name, own in zip(session.names, routers, strict=True):
            assert name == own or name.startswith(own + ".") or (holders and own.startswith(name + ".")), (name, own)
        torch.manual_seed(3)
        with session.capture():
            captured = model(x)
        routes = session.routes()
        rows = [routes.layer(name) for name in session.names]
        for (name, router), r in zip(routers.items(), rows, strict=True):
            assert router.used is not None
            assert torch.equal(_sets(as_used(r)), _sets(router.used)), f"'{name}': the routes are not the experts used"
        torch.manual_seed(3)
        with torch.no_grad(), _forced_by_hand(ref, rows):
            assert torch.equal(ref(x), captured.detach()), "the rows forced by hand do not give the captured output"
        perturb(model, change)
        perturb(ref, change)
        if same_forwards:
            torch.manual_seed(4)
            with torch.no_grad():
                ref(x)
        torch.manual_seed(4)
        with _forced_by_hand(ref, rows):
            expected = ref(x)
            _loss(expected).backward()
        held = [(b, b.clone()) for b in model.buffers()]  # (a router's EMA moves in training: this forward is a probe)
        torch.manual_seed(4)
        with torch.no_grad():
            model(x)
            for buffer, value in held:
                buffer.copy_(value)
        assert any(
            not torch.equal(_sets(as_used(r)), _sets(m.used))
            for m, r in zip(routers.values(), rows, strict=True)
            if m.used is not None
        ), "the changed routers choose the recorded experts anyway: the case tries nothing"
        torch.manual_seed(4)
        with session.replay(routes):
            replayed = model(x)
        for (name, router), r in zip(routers.items(), rows, strict=True):
            assert router.used is not None
            assert torch.equal(_sets(as_used(r)), _sets(router.used)), f"'{name}': the replay did not force them"
        _loss(replayed).backward()
        assert torch.equal(replayed.detach(), expected.detach()), (
            "the replay is not the recorded experts forced by hand"
        )
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert (p.grad is None) == (want[name].grad is None), name
            assert p.grad is None or torch.equal(p.grad, want[name].grad), name
    return session


def assert_refused(model: nn.Module, x: torch.Tensor, match: str, *, train: bool = False, **attach: object) -> None:
    """Refused with a ``MoEReplayError`` saying ``match`` at attach or at the first capture, the model as it was."""
    model.train(train)
    before = snapshot(model)
    with pytest.raises(mr.MoEReplayError, match=match):
        with mr.attach(model, **attach) as session, torch.no_grad(), session.capture():
            model(x)
    assert_untouched(model, before)


#: two residual layers (over ``[tokens, d]`` or ``[batch, seq, d]``)
Layers = ResidualStack


def one_layer(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A maker of :data:`Layers` of one block: for a router whose probe runs cost many times a vectorised router's (a
    Python loop over every token and slot, a data-dependent iteration), whose decision is established on hundreds of
    tokens, a second block alike adds minutes of CI time and no check."""

    def build() -> nn.Module:
        stack = Layers(make)
        del stack.layers[1]
        return stack

    return build


class MixtralGate(_Used):
    """A Mixtral-style gate: softmax, top-k, renormalised."""

    def __init__(self, n: int = E, k: int = 2, d: int = D) -> None:
        super().__init__()
        self.num_experts, self.top_k = n, k
        self.gate = nn.Linear(d, n, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        return w / w.sum(-1, keepdim=True), idx


class GateBlock(nn.Module):
    def __init__(self, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = gate if gate is not None else MixtralGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        return dispatch(self.experts, x, idx, w)


# ----------------------------------------------------------------------- product keys: PEER, PKM
class PEER(_Used):
    """lucidrains/PEER-pytorch ``PEER`` (He 2024, "Mixture of A Million Experts"): per head, queries against two
    sub-key sets (``sim [2, b, n, h, keys]``), one ``topk`` over both at once, the ``k * k`` sums of their scores
    and ids ``i * keys + j``, a second ``topk`` over those sums whose positions ``gather`` the expert ids; the experts
    are rows of ``nn.Embedding`` down and up weights, weighted by the softmax of the chosen sums."""

    def __init__(self, heads: int = 2, num_keys: int = 4, k: int = 2, dim_key: int = 4) -> None:
        super().__init__()
        self.heads, self.num_keys, self.num_experts = heads, num_keys, num_keys * num_keys
        self.product_key_topk = self.num_experts_per_head = k
        self.weight_down_embed = nn.Embedding(self.num_experts, D)
        self.weight_up_embed = nn.Embedding(self.num_experts, D)
        self.to_queries = nn.Linear(D, dim_key * heads * 2, bias=False)
        self.keys = nn.Parameter(torch.randn(heads, num_keys, 2, dim_key))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        queries = self.to_queries(x).view(b, n, 2, self.heads, -1).permute(2, 0, 1, 3, 4)
        sim = torch.einsum("pbnhd,hkpd->pbnhk", queries, self.keys)
        if self.forced is None:
            (scores_x, scores_y), (indices_x, indices_y) = sim.topk(self.product_key_topk, dim=-1)
            all_scores = (scores_x[..., :, None] + scores_y[..., None, :]).flatten(-2)
            all_indices = (indices_x[..., :, None] * self.num_keys + indices_y[..., None, :]).flatten(-2)
            scores, pk_indices = all_scores.topk(self.num_experts_per_head, dim=-1)
            indices = all_indices.gather(-1, pk_indices)
        else:
            indices = self.forced.view(b, n, self.heads, -1)
            scores = sim[0].gather(-1, indices // self.num_keys) + sim[1].gather(-1, indices % self.num_keys)
        self.used = indices.reshape(b * n, -1)
        h = torch.einsum("bnd,bnhkd->bnhk", x, self.weight_down_embed(indices))
        h = F.gelu(h) * scores.softmax(-1)
        return torch.einsum("bnhk,bnhkd->bnd", h, self.weight_up_embed(indices))


class HashingMemory(_Used):
    """facebookresearch/XLM ``src/model/memory/memory.py`` ``HashingMemory`` (Lample et al. 2019, product-key
    memory), one head: the query split in halves, each scored against its sub-keys and ``topk``-ed, the ``knn * knn``
    sums and ids, a ``topk`` of the sums whose positions ``gather`` the ids; the values an ``nn.EmbeddingBag(mode=
    'sum')`` fed the softmax of the chosen sums as ``per_sample_weights``."""

    def __init__(self, n_keys: int = 4, knn: int = 2, k_dim: int = 8) -> None:
        super().__init__()
        self.n_keys, self.knn, self.size = n_keys, knn, n_keys * n_keys
        self.keys = nn.Parameter(torch.randn(2, n_keys, k_dim // 2))
        self.query_proj = nn.Linear(D, k_dim)
        self.values = nn.EmbeddingBag(self.size, D, mode="sum")

    def get_indices(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q1, q2 = query.chunk(2, -1)
        scores1, scores2 = F.linear(q1, self.keys[0]), F.linear(q2, self.keys[1])
        if self.forced is not None:
            idx = self.forced
            return scores1.gather(1, idx // self.n_keys) + scores2.gather(1, idx % self.n_keys), idx
        scores1, indices1 = scores1.topk(self.knn, dim=1)
        scores2, indices2 = scores2.topk(self.knn, dim=1)
        all_scores = (scores1.view(-1, self.knn, 1) + scores2.view(-1, 1, self.knn)).view(-1, self.knn**2)
        all_indices = (indices1.view(-1, self.knn, 1) * self.n_keys + indices2.view(-1, 1, self.knn)).view(
            -1, self.knn**2
        )
        scores, best = torch.topk(all_scores, k=self.knn, dim=1)
        return scores, all_indices.gather(1, best)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, indices = self.get_indices(self.query_proj(x))
        self.used = indices
        scores = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.values(indices, per_sample_weights=scores)


# ----------------------------------------------------------------------- MH-MoE: sub-tokens routed
class MHRouter(nn.Module):
    """lhallee MH-MoE ``MHRouter``: the sub-tokens times ``expert_embedding [head_dim, E]`` (logits only)."""

    def __init__(self, num_experts: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.expert_embedding = nn.Parameter(torch.randn(hidden_dim // num_heads, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.expert_embedding)


class MultiHeadMoeBlock(_Used):
    """lhallee/Multi_Head_Mixture_of_Experts__MH-MOE ``MultiHeadMoeBlock`` (Wu et al. 2024): each token split into
    ``num_heads`` sub-tokens by a ``multi_head_layer``, the sub-tokens routed (softmax, ``topk`` in the block, not
    renormalised), every expert run on every sub-token and the chosen outputs picked by advanced indexing, the
    sub-tokens merged back by a ``merge_layer``."""

    def __init__(self, num_heads: int = 2, topk: int = 2) -> None:
        super().__init__()
        self.num_experts, self.num_heads, self.topk, self.head_dim = E, num_heads, topk, D // num_heads
        self.multi_head_layer = nn.Linear(D, D)
        self.router = MHRouter(E, D, num_heads)
        self.experts = nn.ModuleList(nn.Linear(self.head_dim, self.head_dim) for _ in range(E))
        self.merge_layer = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        x = self.multi_head_layer(x).reshape(tokens * self.num_heads, self.head_dim)
        router_weights = self.router(x).softmax(dim=-1)
        if self.forced is None:
            router_weights, selected = torch.topk(router_weights, self.topk, dim=-1)
        else:
            selected = self.forced
            router_weights = router_weights.gather(1, selected)
        self.used = selected
        outs = torch.stack([expert(x) for expert in self.experts], dim=1)
        chosen = outs[torch.arange(outs.size(0)).unsqueeze(1), selected]
        x = (chosen * router_weights.unsqueeze(-1)).sum(dim=1)
        return self.merge_layer(x.reshape(tokens, D))


# ----------------------------------------------------------------------- Mixture-of-Recursions: token-choice depth
class MoRTokenChoiceRouter(_Used):
    """Mixture-of-Recursions (Bae et al. 2025) token-choice router: a softmax over the ``num_recursions`` depths, the
    ``topk(1)`` the depth of the token, its probability the weight of each recursion step."""

    def __init__(self, num_recursions: int = 3) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_recursions, 1
        self.router = nn.Linear(D, num_recursions, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.router(x).softmax(-1)
        if self.forced is None:
            w, depth = probs.topk(1, dim=-1)
        else:
            depth = self.forced
            w = probs.gather(1, depth)
        self.used = depth
        return w, depth


class MoRBlock(nn.Module):
    """The shared recursion block applied ``num_recursions`` times, each step to the tokens whose depth reaches it."""

    def __init__(self, num_recursions: int = 3) -> None:
        super().__init__()
        self.num_recursions = num_recursions
        self.mor_router = MoRTokenChoiceRouter(num_recursions)
        self.shared_block = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, depth = self.mor_router(x)
        h = x
        for r in range(self.num_recursions):
            active = (depth[:, 0] >= r).nonzero()[:, 0]
            h = h.index_add(0, active, w[active] * self.shared_block(h[active]))
        return h - x


# ----------------------------------------------------------------------- Gumbel straight-through top-1
class GumbelHardGate(_Used):
    """A top-1 router trained by the Gumbel trick (Switch-NeRF and other Gumbel-routed MoEs): in training
    ``F.gumbel_softmax(logits, tau, hard=True)`` (the choice its internal ``max`` of the noisy softmax, a one-hot with
    the soft probabilities' gradient), the expert its ``argmax``, the weight the one-hot read there (1, with a
    gradient); in eval a plain one-hot of the logits' ``argmax``."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.tau = E, 1, tau
        self.w_gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_gate(x)
        if self.forced is None:
            if self.training:
                y = F.gumbel_softmax(logits, tau=self.tau, hard=True)
            else:
                y = F.one_hot(logits.argmax(-1), E).to(logits.dtype)
        elif self.training:  # F.gumbel_softmax's own arithmetic, with the hand-forced index
            gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
            y_soft = ((logits + gumbels) / self.tau).softmax(-1)
            y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(
                -1, self.forced, 1.0
            )
            y = y_hard - y_soft.detach() + y_soft
        else:
            y = torch.zeros_like(logits).scatter_(-1, self.forced, 1.0)
        idx = y.argmax(-1, keepdim=True)
        self.used = idx
        return y.gather(1, idx), idx


class GumbelByHandGate(_Used):
    """The Gumbel top-1 as the refusal of :class:`GumbelHardGate` asks for it: the noise drawn before the decision
    and the ``argmax`` of the noisy softmax in the router's own code, the straight-through one-hot built from it."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.tau = E, 1, tau
        self.w_gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_gate(x)
        gumbels = -torch.empty_like(logits).exponential_().log() if self.training else torch.zeros_like(logits)
        y_soft = ((logits + gumbels) / self.tau).softmax(-1)
        idx = y_soft.argmax(-1, keepdim=True) if self.forced is None else self.forced
        self.used = idx
        y = torch.zeros_like(logits).scatter_(-1, idx, 1.0) - y_soft.detach() + y_soft
        return y.gather(1, idx), idx


# ----------------------------------------------------------------------- Expert Race: a global top-k
class ExpertRaceBlock(nn.Module):
    """Expert Race (Yuan et al. 2025, race-DiT): every token-expert pair competes at once, one ``topk`` over the
    flattened ``[tokens * E]`` scores keeps ``tokens * k`` of them (a token gets from 0 to E experts), the weights
    the kept scores' sigmoid."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        _, flat = logits.flatten().topk(x.shape[0] * self.top_k)
        keep = torch.zeros(logits.numel(), dtype=torch.bool).scatter(0, flat, True).view_as(logits)
        w = logits.sigmoid() * keep
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = keep[:, e].nonzero()[:, 0]
            out = out.index_add(0, tok, w[tok, e, None] * expert(x[tok]))
        return out


# ----------------------------------------------------------------------- Mixture of Nested Experts
class MoNEBlock(nn.Module):
    """Mixture of Nested Experts (Jain et al. 2024) Expert Preferred Routing: the experts are nested slices of one
    MLP (widths ``D/8 .. D``); from the largest down, each expert takes its ``capacity`` best remaining tokens by a
    ``topk`` over the token dimension of its column of the router's softmax, the others masked to ``-inf``."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.num_experts = n
        self.router = nn.Linear(D, n, bias=False)
        self.up = nn.Linear(D, 4 * D)
        self.down = nn.Linear(4 * D, D)
        self.capacity = [T // n] * n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router(x).softmax(-1)
        taken = torch.zeros(x.shape[0], dtype=torch.bool)
        out = torch.zeros_like(x)
        for e in reversed(range(self.num_experts)):
            score = r[:, e].masked_fill(taken, float("-inf"))
            w, tok = score.topk(self.capacity[e])
            taken[tok] = True
            width = 4 * D >> (self.num_experts - 1 - e)
            h = F.gelu(F.linear(x[tok], self.up.weight[:width], self.up.bias[:width]))
            out = out.index_add(0, tok, w[:, None] * F.linear(h, self.down.weight[:, :width], self.down.bias))
        return out


# ----------------------------------------------------------------------- torchscale Multiway (no router) beside MoE
class MultiwayNetwork(nn.Module):
    """microsoft/torchscale ``component/multiway_network.py`` ``MultiwayNetwork`` (VLMo, BEiT-3): two copies ``A``
    and ``B`` of a module, the tokens before ``split_position`` to ``A`` (vision), the rest to ``B`` (text). A
    modality switch, no router."""

    def __init__(self, module: nn.Module, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.A = module
        self.B = copy.deepcopy(module)
        self.split_position = T // 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_position == -1:
            return self.A(x)
        if self.split_position == 0:
            return self.B(x)
        x1, x2 = torch.split(x, [self.split_position, x.size(self.dim) - self.split_position], dim=self.dim)
        return torch.cat([self.A(x1), self.B(x2)], dim=self.dim)


class MultiwayMoELayer(nn.Module):
    """A BEiT-3-style layer: a multiway FFN (experts by modality) and a routed MoE FFN after it."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = MultiwayNetwork(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.ffn(x)
        return h + self.moe(h) - x


# ----------------------------------------------------------------------- sequence-level routing
class SequenceRouter(_Used):
    """Task/sentence-level routing (Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts"):
    one decision per sequence, a softmax ``topk`` of the gate over the mean of its tokens; every token of the sequence
    goes to those experts with those weights."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.wg = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.wg(x.mean(1)).softmax(-1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        return w, idx


class SequenceMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = SequenceRouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        b, s, _ = x.shape
        flat = x.reshape(b * s, D)
        return dispatch(self.experts, flat, idx.repeat_interleave(s, 0), w.repeat_interleave(s, 0)).view_as(x)


# ----------------------------------------------------------------------- routing in chunks of tokens
class ChunkedGate(_Used):
    """Memory-bounded routing: the tokens scored and ``topk``-ed chunk by chunk (``x.split(chunk_size)``), the
    chunks' weights and ids concatenated."""

    def __init__(self, chunk_size: int = 10) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.chunk_size = E, 2, chunk_size
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ws, ids = [], []
        forced = None if self.forced is None else self.forced.split(self.chunk_size)
        for c, chunk in enumerate(x.split(self.chunk_size)):
            probs = self.gate(chunk).softmax(-1)
            if forced is None:
                w, idx = torch.topk(probs, self.top_k, dim=-1)
            else:
                idx = forced[c]
                w = probs.gather(1, idx)
            ws.append(w / w.sum(-1, keepdim=True))
            ids.append(idx)
        self.used = torch.cat(ids)
        return torch.cat(ws), self.used


# ----------------------------------------------------------------------- weights read by advanced indexing
class IndexedWeightGate(_Used):
    """The top-k's indices taken under ``no_grad`` from the logits, the weights read from the probabilities by
    advanced indexing (``probs[arange(T)[:, None], idx]``), not by a gather."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.forced is None:
            with torch.no_grad():
                idx = torch.topk(logits, self.top_k, dim=-1).indices
        else:
            idx = self.forced
        self.used = idx
        probs = logits.softmax(-1)
        return probs[torch.arange(x.shape[0])[:, None], idx], idx


# ----------------------------------------------------------------------- Pangu Pro MoE: mixture of grouped experts
class MoGEGate(_Used):
    """Pangu Pro MoE (Tang et al. 2025, MoGE): the experts in ``G`` equal groups (one per device), every token takes
    ``k / G`` experts in each group: one ``topk`` over the last dimension of the ``[T, G, E / G]`` softmax scores,
    the group offsets added to the local ids; weights renormalised."""

    def __init__(self, groups: int = 2, k: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.num_groups = E, k, groups
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).softmax(-1)
        per_group = E // self.num_groups
        if self.forced is None:
            w, local = scores.view(-1, self.num_groups, per_group).topk(self.top_k // self.num_groups, dim=-1)
            idx = (local + torch.arange(self.num_groups)[None, :, None] * per_group).flatten(1)
            w = w.flatten(1)
        else:
            idx = self.forced
            w = scores.gather(1, idx)
        self.used = idx
        return w / w.sum(-1, keepdim=True), idx


# ----------------------------------------------------------------------- slot order changed after the top-k
class SortedSlotsGate(_Used):
    """Kernel-friendly code that wants each token's expert ids ascending: after the ``topk``, ``idx.sort(-1)`` and
    the weights permuted alike by a ``gather``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 3
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        idx, order = idx.sort(-1)
        w = w.gather(-1, order)
        self.used = idx
        return w / w.sum(-1, keepdim=True), idx


# ----------------------------------------------------------------------- k kept as a tensor
class TensorKGate(_Used):
    """``top_k`` kept as a 0-d integer buffer (a config value saved with the state dict), handed to ``torch.topk``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("top_k", torch.tensor(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        return w, idx


# ----------------------------------------------------------------------- a convolutional gate on feature maps
class ConvGate(_Used):
    """A convolutional MoE's gate on feature maps (channels first): a ``1x1`` ``Conv2d(C, E)``, a softmax over the
    channel dimension and a ``topk(k, dim=1)`` per pixel, weights renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.conv = nn.Conv2d(D, E, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.conv(x).softmax(1)
        if self.forced is None:
            w, idx = probs.topk(self.top_k, dim=1)
        else:
            b, _, h, wd = x.shape
            idx = self.forced.view(b, h, wd, -1).permute(0, 3, 1, 2)
            w = probs.gather(1, idx)
        self.used = idx.permute(0, 2, 3, 1).reshape(-1, self.top_k)
        return w / w.sum(1, keepdim=True), idx


class ConvMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = ConvGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        b, c, h, wd = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, c)
        out = dispatch(
            self.experts, pixels, idx.permute(0, 2, 3, 1).reshape(-1, 2), w.permute(0, 2, 3, 1).reshape(-1, 2)
        )
        return out.view(b, h, wd, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------- the top-k's named tuple returned
class NamedTupleGate(_Used):
    """A gate that returns the ``torch.return_types.topk`` of its softmax as it is; the block reads ``.values`` and
    ``.indices`` from it (by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.return_types.topk:
        probs = self.gate(x).softmax(-1)
        if self.forced is None:
            out = probs.topk(self.top_k, dim=-1)
        else:
            out = torch.return_types.topk((probs.gather(1, self.forced), self.forced))
        self.used = out.indices
        return out


class NamedTupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = NamedTupleGate()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.gate(x)
        return dispatch(self.experts, x, top.indices, top.values / top.values.sum(-1, keepdim=True))


# ----------------------------------------------------------------------- task-conditioned gates
class TaskGates(_Used):
    """Multi-task MoE (Mod-Squad, M3ViT): one ``[d, E]`` gate per task in a ``ParameterList``, the task's picked at
    every forward; softmax, ``topk``, renormalised over their sum plus ``1e-6``."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.num_experts, self.k = E, 2
        self.w_gate = nn.ParameterList(nn.Parameter(torch.randn(D, E) / 4) for _ in range(tasks))
        self.task = 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (x @ self.w_gate[self.task]).softmax(-1)
        if self.forced is None:
            top_k_gates, top_k_indices = probs.topk(self.k, dim=1)
        else:
            top_k_indices = self.forced
            top_k_gates = probs.gather(1, top_k_indices)
        self.used = top_k_indices
        return top_k_gates / (top_k_gates.sum(1, keepdim=True) + 1e-6), top_k_indices


# ----------------------------------------------------------------------- DTS-Gate (EvoMoE): a threshold, no top-k
class DTSGate(nn.Module):
    """EvoMoE's Dense-to-Sparse gate (Nie et al. 2021): Gumbel noise, a softmax at a temperature annealed during
    training, the experts those whose probability passes a threshold (no top-k: a token uses from 0 to E)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        self.wg = nn.Linear(D, E, bias=False)
        self.temperature, self.threshold = 0.5, 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.wg(x)
        if self.training:
            logits = logits - torch.empty_like(logits).exponential_().log()
        probs = (logits / self.temperature).softmax(-1)
        return probs * (probs > self.threshold)


class DenseGateBlock(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok = w[:, e].nonzero()[:, 0]
            out = out.index_add(0, tok, w[tok, e, None] * expert(x[tok]))
        return out


# ----------------------------------------------------------------------- LoRA experts inside a Linear (MixLoRA)
class MixLoRALinear(_Used):
    """TUDB-Labs/MixLoRA (``mixlora/model.py``): a frozen ``base_layer`` Linear plus ``E`` LoRA experts held as
    stacked ``lora_A [E, r, d]`` / ``lora_B [E, d, r]`` parameters, chosen per token by its own ``gate`` (softmax in
    float32, ``topk``, renormalised); the chosen experts' LoRA outputs added with their weights."""

    def __init__(self, r: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.base_layer = nn.Linear(D, D)
        self.base_layer.requires_grad_(False)
        self.gate = nn.Linear(D, E, bias=False)
        self.lora_A = nn.Parameter(torch.randn(E, r, D) / 4)
        self.lora_B = nn.Parameter(torch.randn(E, D, r) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        if self.forced is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        else:
            idx = self.forced
            w = probs.gather(1, idx)
        self.used = idx
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        a, b = self.lora_A[idx], self.lora_B[idx]  # [T, k, r, d], [T, k, d, r]
        lora = torch.einsum("tkdr,tkr->tkd", b, torch.einsum("tkrd,td->tkr", a, x))
        return self.base_layer(x) + (w[..., None] * lora).sum(1)


class BalancingBiasGate(_Used):
    """DeepSeek-V3's loss-free balancing with the bias moved inside the forward in training (as several open
    re-implementations do): sigmoid scores, the top-k over scores plus a per-expert bias, weights from the scores
    alone, then the bias stepped against each expert's load, in place, under ``no_grad``."""

    def __init__(self, n: int = E, k: int = 2, d: int = D, rate: float = 0.05) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.rate = n, k, rate
        self.gate = nn.Linear(d, n, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).sigmoid()
        idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices if self.forced is None else self.forced
        if self.training:
            with torch.no_grad():
                load = torch.bincount(idx.flatten(), minlength=self.num_experts).float()
                self.expert_bias.add_(self.rate * (load.mean() - load).sign())
        self.used = idx
        w = scores.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


class RunningScaleGate(_Used):
    """A router that divides its logits by a running scale, an EMA of their spread moved in place in training before
    it is used, so that both the choice and the weights of a forward depend on every forward before it."""

    def __init__(self, n: int = E, k: int = 2, d: int = D, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.momentum = n, k, momentum
        self.gate = nn.Linear(d, n, bias=False)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.training:
            with torch.no_grad():
                self.scale.mul_(1 - self.momentum).add_(self.momentum * logits.std())
        probs = (logits / self.scale).softmax(-1)
        idx = probs.topk(self.top_k, dim=-1).indices if self.forced is None else self.forced
        self.used = idx
        w = probs.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


EXACT: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]] = {
    # name: (model, input, options: ``train`` and attach options)
    "mh-moe-sub-tokens": (lambda: Layers(MultiHeadMoeBlock), _x, {}),
    "mixture-of-recursions-depth": (lambda: Layers(MoRBlock), _x, {}),
    "gumbel-by-hand-top1-train": (lambda: Layers(lambda: GateBlock(GumbelByHandGate())), _x, {"train": True}),
    "multiway-beside-moe": (lambda: Layers(MultiwayMoELayer), _x, {"change": 0.3}),
    "weights-by-advanced-indexing": (lambda: Layers(lambda: GateBlock(IndexedWeightGate())), _x, {}),
    "sequence-level": (lambda: Layers(SequenceMoE), lambda: _x(3, 8), {}),
    "sorted-slots": (lambda: Layers(lambda: GateBlock(SortedSlotsGate())), _x, {}),
    "tensor-k": (lambda: Layers(lambda: GateBlock(TensorKGate())), _x, {}),
    "returned-named-tuple": (lambda: Layers(NamedTupleBlock), _x, {}),
    "task-gates": (lambda: Layers(lambda: GateBlock(TaskGates())), _x, {}),
    "mixlora-linear": (lambda: Layers(MixLoRALinear), _x, {"change": 0.3}),
    "moa-map-reduce": (lambda: Layers(MoAAttention), _x, {"change": 0.5}),
    "speechmoe-embedding-input": (lambda: SpeechMoE(), _x, {}),
    "thor-beside-moe": (lambda: Layers(ThorAndMoE), _x, {}),
    "running-scale-moved-in-training": (lambda: Layers(lambda: GateBlock(RunningScaleGate())), _x, {"train": True}),
    "balancing-bias-moved-in-training": (lambda: Layers(lambda: GateBlock(BalancingBiasGate())), _x, {"train": True}),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(EXACT))
def test_replay_forces_the_recorded_experts_as_by_hand(case: str) -> None:
    """Sub-tokens routed (MH-MoE), a recursion depth chosen per token (Mixture-of-Recursions), a Gumbel top-1 drawn
    before the router's own argmax, one choice per sequence (task-level MoE), a modality switch beside a routed MoE
    (torchscale Multiway), weights read by advanced indexing, ids sorted after the top-k, k as a tensor, the top-k's
    named tuple returned, task-conditioned gates, LoRA experts in a Linear (MixLoRA), attention heads as experts
    routed in a method that is not forward (MoA), a router fed a second tensor (SpeechMoE), stochastic experts
    beside an MoE (THOR), a running scale or a balancing bias moved in place in training: every router found and
    nothing else, the recorded rows the experts used, and a replay after the routers change those experts forced by
    hand, in output and gradients."""
    make, x, options = EXACT[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    change = float(opts.pop("change", 3.0))  # type: ignore[arg-type]
    assert_exact(make(), x(), train=train, change=change, **opts)


class MoGEBlock(_Used):
    """Pangu Pro MoE's grouped choice in a block with a bare ``Linear`` gate: the top-k over ``[T, G, E / G]`` and
    the group offsets in the block, which returns hidden states (no ids for moe_replay to compare)."""

    def __init__(self, groups: int = 2, k: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.num_groups = E, k, groups
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).softmax(-1).view(-1, self.num_groups, E // self.num_groups)
        if self.forced is None:
            w, local = scores.topk(self.top_k // self.num_groups, dim=-1)
        else:
            local = self.forced.view(-1, self.num_groups, self.top_k // self.num_groups)
            w = scores.gather(-1, local)
        idx = (local + torch.arange(self.num_groups)[None, :, None] * (E // self.num_groups)).flatten(1)
        self.used = idx
        w = w.flatten(1)
        return dispatch(self.experts, x, idx, w / w.sum(-1, keepdim=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("groups", [2, 4])
def test_a_grouped_choice_in_a_block_replays_positions_within_groups_exactly(groups: int) -> None:
    """Pangu's grouped choice made in the block (the group offsets added where moe_replay cannot see them): each
    group of each token is a row of the decision, as each head of SwitchHead's, so the routes hold ``G`` rows per
    token of positions within a group; those rows are the experts used, shifted by their group, and a replay forces
    them, as by hand."""
    per_group = E // groups

    def as_used(rows: torch.Tensor) -> torch.Tensor:
        local = rows.long().view(-1, groups, rows.shape[-1])
        return (local + torch.arange(groups)[None, :, None] * per_group).flatten(1)

    assert_exact(Layers(lambda: MoGEBlock(groups=groups)), _x(), as_used=as_used)


class GroupedScoresRouter(_Used):
    """:class:`MoGEGate` with its scores a ``[d, E]`` parameter of no telling name (``proj``) and no expert count
    attribute: discovery cannot count its experts (attached by ``include=``)."""

    def __init__(self, groups: int = 2, k: int = 4) -> None:
        super().__init__()
        self.top_k, self.num_groups = k, groups
        self.proj = nn.Parameter(torch.randn(D, E) / 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (x @ self.proj).softmax(-1)
        per_group = E // self.num_groups
        w, local = scores.view(-1, self.num_groups, per_group).topk(self.top_k // self.num_groups, dim=-1)
        idx = (local + torch.arange(self.num_groups)[None, :, None] * per_group).flatten(1)
        self.used = idx
        return w.flatten(1), idx


_FLAT = "chooses only over flat scores"
_STEPS = "more than one independent choice"
_GROUPS = r"chooses in each of \d+ groups of \d+"
REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, dict[str, object]]] = {
    # name: (model, input, what the refusal says, options: ``train`` and attach options)
    "peer-product-keys": (lambda: Layers(PEER), lambda: _x(2, 12), _STEPS, {"include": PEER}),
    "peer-one-head": (lambda: Layers(lambda: PEER(heads=1)), lambda: _x(2, 12), _STEPS, {"include": PEER}),
    "peer-not-found": (lambda: Layers(PEER), lambda: _x(2, 12), "no MoE router found", {}),
    "pkm-hashing-memory": (lambda: Layers(HashingMemory), _x, _STEPS, {"include": HashingMemory}),
    "expert-race-global-topk": (lambda: Layers(ExpertRaceBlock), _x, _FLAT, {}),
    "mone-expert-preferred": (lambda: Layers(MoNEBlock), _x, _FLAT, {"include": MoNEBlock}),
    "dts-gate-threshold": (lambda: Layers(lambda: DenseGateBlock(DTSGate())), _x, "makes no decision-like call", {}),
    "dts-gate-threshold-train": (
        lambda: Layers(lambda: DenseGateBlock(DTSGate())),
        _x,
        "makes no decision-like call",
        {"train": True},
    ),
    "gumbel-hard-top1-train": (
        lambda: Layers(lambda: GateBlock(GumbelHardGate())),
        _x,
        r"reads back experts drawn from the random stream inside one call \(gumbel_softmax\(hard=True\)",
        {"train": True},
    ),
    "moge-router": (lambda: Layers(lambda: GateBlock(MoGEGate())), _x, _GROUPS, {}),
    "moge-router-k-top1": (lambda: Layers(lambda: GateBlock(MoGEGate(groups=4, k=4))), _x, _GROUPS, {}),
    "grouped-no-expert-count": (
        lambda: Layers(lambda: GateBlock(GroupedScoresRouter())),
        _x,
        r"groups of 4 scores at once",
        {"include": GroupedScoresRouter},
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(REFUSED))
def test_choices_that_no_one_call_holds_are_refused(case: str) -> None:
    """Product keys (PEER, XLM's product-key memory: a top-k per sub-key set, then a top-k of their sums, whose
    positions pick the experts), a top-k over every token-expert pair at once (Expert Race), experts choosing
    tokens in turn (Mixture of Nested Experts), a threshold (EvoMoE's DTS gate), a Gumbel-softmax draw inside one
    call, and one top-k in each group of the experts at once (Pangu's
    mixture of grouped experts, k top-1 gating in one call: the recorded rows would be positions within a group,
    ``G`` per token): refused, saying why, the model left as it was."""
    make, x, match, options = REFUSED[case]
    opts = dict(options)
    train = bool(opts.pop("train", False))
    assert_refused(make(), x(), match, train=train, **opts)


@pytest.mark.reliability("silent replays")
def test_a_choice_along_the_channels_of_a_feature_map_replays_exactly() -> None:
    """Once refused as a choice along another dimension than the last: a convolutional MoE's gate on feature maps
    (channels first) takes its top-k over the channel dimension, one choice per pixel. That dimension is the
    experts' and every choice is along it, so the decision is read with it moved last: a capture records each pixel's
    experts, and a replay forces them, as by hand, in training too."""
    assert_exact(Layers(ConvMoE), _x(2, 3, 4).permute(0, 3, 1, 2))
    assert_exact(Layers(ConvMoE), _x(2, 3, 4).permute(0, 3, 1, 2), train=True)


@pytest.mark.reliability("silent replays")
def test_routing_in_chunks_of_tokens_replays_exactly() -> None:
    """Once refused as several independent choices: a router that takes its top-k chunk by chunk over the tokens
    makes one choice per token in all: a replay forces the recorded experts, as by hand, in training too."""
    assert_exact(Layers(lambda: GateBlock(ChunkedGate())), _x())
    assert_exact(Layers(lambda: GateBlock(ChunkedGate(chunk_size=7))), _x(), train=True)


class RowMemory(nn.Module):
    """Experts as rows of a weight picked by plain indexing (or ``index_select``): a ``topk`` over flat learned keys
    (6 of them, no attached router's width), the chosen rows of ``values`` weighted by the softmax of their scores.
    ``how`` reads them otherwise: a one-hot of the indices made a float mask times the values, the chosen weights
    scattered into a dense mask times the values, columns of a transposed table, a ``gather`` or a ``take``."""

    def __init__(self, n: int = 6, k: int = 2, select: bool = False, how: str = "index") -> None:
        super().__init__()
        self.keys = nn.Linear(D, n, bias=False)
        self.values = nn.Parameter(torch.randn(D, n) if how == "columns" else torch.randn(n, D))
        self.k, self.how = k, "index_select" if select else how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, idx = self.keys(x).topk(self.k, dim=-1)
        w = scores.softmax(-1)
        if self.how == "scatter":
            return torch.zeros(*idx.shape[:-1], self.keys.out_features).scatter(-1, idx, w) @ self.values
        if self.how == "one_hot":
            rows = F.one_hot(idx, self.keys.out_features).to(x.dtype) @ self.values
        elif self.how == "columns":
            rows = self.values[:, idx].movedim(0, -1)
        elif self.how == "gather":
            rows = self.values.gather(0, idx.reshape(-1, 1).expand(-1, D)).view(*idx.shape, D)
        elif self.how == "take":
            rows = torch.take(self.values, idx[..., None] * D + torch.arange(D)).view(*idx.shape, D)
        elif self.how == "index_select":
            rows = self.values.index_select(0, idx.flatten()).view(*idx.shape, D)
        else:
            rows = self.values[idx]
        return (rows * w[..., None]).sum(-2)


class Beside(nn.Module):
    """A found router's layer, then a layer whose experts are rows of a table (no router name, no expert bank
    discovery or the orphan watch reads), over ``[tokens, d]`` (``flat``) or ``[batch, seq, d]``."""

    def __init__(self, make: Callable[[], nn.Module], flat: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.moe = GateBlock()
        self.table = make()
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(x.flatten(0, -2)).view_as(x)
        return x + (self.table(x.flatten(0, -2)).view_as(x) if self.flat else self.table(x))


BESIDE: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    # name: (model, input)
    "peer": (lambda: Beside(PEER, flat=False), lambda: _x(2, 12)),
    "peer-one-head": (lambda: Beside(lambda: PEER(heads=1), flat=False), lambda: _x(2, 12)),
    "pkm-embedding-bag": (lambda: Beside(HashingMemory), _x),
    "rows-indexed": (lambda: Beside(RowMemory), _x),
    "rows-index-select": (lambda: Beside(lambda: RowMemory(select=True)), _x),
    # (once silent: the indices read the table by other means than rows picked from them)
    "rows-one-hot-times-values": (lambda: Beside(lambda: RowMemory(how="one_hot")), _x),
    "rows-scattered-mask-times-values": (lambda: Beside(lambda: RowMemory(how="scatter")), _x),
    "rows-columns-indexed": (lambda: Beside(lambda: RowMemory(how="columns")), _x),
    "rows-gathered": (lambda: Beside(lambda: RowMemory(how="gather")), _x),
    "rows-taken": (lambda: Beside(lambda: RowMemory(how="take")), _x),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("case", list(BESIDE))
def test_a_product_key_layer_beside_a_found_router_is_not_left_out_silently(case: str) -> None:
    """A layer whose experts are rows of a table (PEER with one or two heads, XLM's product-key memory through an
    ``nn.EmbeddingBag``, flat learned keys whose top rows are indexed or ``index_select``-ed) in a model whose other
    MoE layer is found: the capture is refused (its choice can be neither recorded nor forced), not recorded
    without it, and the model is left as it was; excluding it on purpose leaves it native and records the router."""
    make, x = BESIDE[case]
    assert_refused(make(), x(), r"'table' \(\w+\): topk over \d+ .* whose indices pick rows of the weight 'table\.")
    model = make()
    with mr.attach(model, exclude=["table"]) as session:
        assert session.names == ("moe.gate",)
        with torch.no_grad(), session.capture():
            model(x())
        assert session.routes().layer("moe.gate").shape[-1] == 2


class TopKOf(nn.Module):
    """A top-k helper module of no parameters: the scores' ``k`` best."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scores.topk(self.k, dim=-1)


class HelperMemory(nn.Module):
    """Flat learned keys whose top-k a helper module takes (``pick``); the chosen rows of an ``nn.Embedding``."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.keys = nn.Linear(D, n, bias=False)
        self.values = nn.Embedding(n, D)
        self.pick = TopKOf()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, idx = self.pick(self.keys(x))
        return (self.values(idx) * scores.softmax(-1)[..., None]).sum(-2)


@pytest.mark.reliability("silent replays")
def test_a_product_key_layer_whose_top_k_a_helper_module_takes_is_not_left_out_silently() -> None:
    """Once silent: the top-k among learned keys taken by a helper module of no parameters (its module holds no keys)
    was not followed, and the rows it picked were left native beside the recorded router. The keys of the module
    above it count: the capture is refused, and the model is left as it was."""
    assert_refused(Beside(HelperMemory), _x(), r"'table\.pick' \(TopKOf\): topk over 6 .* rows of the weight 'table\.")


class LongOnly(nn.Module):
    """A table layer (flat learned keys, rows indexed) that runs on inputs longer than ``T`` tokens only."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = RowMemory()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x) if x.shape[0] > T else torch.zeros_like(x)


@pytest.mark.reliability("silent replays")
def test_a_table_layer_the_first_forward_skips_is_not_left_out_silently() -> None:
    """Once silent: a layer of rows chosen among learned keys that the first forward does not run (on long inputs
    only), outside every MoE block, got no watch of its own at its first run, so a later capture recorded the found
    router alone. Modules holding a weight of two or more dimensions are watched at their first run too: refused."""
    model = Beside(LongOnly)
    with pytest.raises(mr.UnsupportedRouterError, match=r"'table\.rows' \(RowMemory\): topk over 6 .* rows of"):
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(_x())
            with session.capture():
                model(_x(2 * T))


class SparseAttention(nn.Module):
    """DeepSeek-V3.2's sparse attention in small: a lightning ``indexer`` scores the earlier tokens and a ``topk`` of
    them picks the key and value rows attended to; beside them, learned memory slots (a ``topk`` over learned keys
    whose rows of a learned value table are read, as a kNN memory inside attention does). No expert choice."""

    def __init__(self, slots: int = 6, k: int = 4) -> None:
        super().__init__()
        self.indexer = nn.Linear(D, D, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.mem_keys = nn.Parameter(torch.randn(slots, D))
        self.mem_values = nn.Parameter(torch.randn(slots, D))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, key, value = (self.qkv(x) / D).chunk(3, -1)
        _, picked = (self.indexer(x) @ x.T).topk(self.k, dim=-1)  # [t, k]: the key rows each query reads
        att = torch.einsum("td,tkd->tk", q, key[picked])
        out = torch.einsum("tk,tkd->td", att.softmax(-1), value[picked])
        mem, slot = (q @ self.mem_keys.T).topk(2, dim=-1)  # [t, 2]: the memory slots each query reads
        return out + (mem.softmax(-1)[..., None] * self.mem_values[slot]).sum(-2)


class SlotMemory(nn.Module):
    """A kNN memory outside attention: a ``topk`` over learned slot keys reads rows of stored values (a buffer the
    model writes outside the forward, no weight), weighted by the softmax of their scores. No expert choice."""

    def __init__(self, slots: int = 6) -> None:
        super().__init__()
        self.slot_keys = nn.Parameter(torch.randn(slots, D))
        self.register_buffer("stored", torch.randn(slots, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, slot = (x @ self.slot_keys.T / D).topk(2, dim=-1)
        return (scores.softmax(-1)[..., None] * self.stored[slot]).sum(-2)


class DepthsCut(nn.Module):
    """Mixture-of-Depths on the first ``D`` tokens (as many candidates as the hidden size, a width of its weights):
    a ``topk`` of them by a learned score is processed, scattered back into the hidden states along the tokens, and
    a mask of the tokens chosen scattered too. No expert choice: the hidden states are no table's rows."""

    def __init__(self, cap: int = 6) -> None:
        super().__init__()
        self.score = nn.Linear(D, 1)
        self.mlp = nn.Linear(D, D)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.score(x[:D]).T.topk(self.cap, dim=-1)  # ([1, D]: the first D tokens' scores)
        w, idx = w[0], idx[0]
        out = self.mlp(x.index_select(0, idx)) * w.sigmoid()[:, None]
        chosen = torch.zeros(D).scatter(0, idx, 1.0)
        h = x.scatter_add(0, idx[:, None].expand(-1, D), out) * (1 + chosen.sum() / D)
        return self.mlp(h) - x  # (its weight reads the hidden states, as wide as the tokens it chose among)


class RowsReadBeside(nn.Module):
    """A layer whose top-k reads rows that are no experts, then a found router's layer."""

    def __init__(self, make: Callable[[], nn.Module], name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.add_module(name, make())
        self.name = name
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + getattr(self, self.name)(x)
        return x + self.moe(x)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("make", "name"), [(SparseAttention, "self_attn"), (SlotMemory, "memory"), (DepthsCut, "depths")]
)
def test_a_top_k_that_reads_rows_of_no_expert_beside_a_found_router_is_not_refused(
    make: Callable[[], nn.Module], name: str
) -> None:
    """Top-k's that pick the key and value rows read (a sparse-attention indexer), rows of a learned memory in
    attention, rows of stored values (a kNN memory outside attention, whose keys are learned), or tokens scattered
    back into the hidden states with a mask of them (Mixture-of-Depths over as many tokens as the hidden size, which
    the router's weight then reads) are no expert choice: the router beside them is found and replayed exactly, as by
    hand."""
    assert_exact(RowsReadBeside(make, name), _x(), change=0.5)


class DepthsPositions(nn.Module):
    """Mixture-of-Depths whose chosen tokens read their rows of a learned position table as long as the sequence: a
    ``topk`` among tokens, whose indices pick rows of a weight as wide as the candidates. No expert choice."""

    def __init__(self, cap: int = 6) -> None:
        super().__init__()
        self.score = nn.Linear(D, 1)
        self.pos = nn.Parameter(torch.randn(T, D))
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.score(x).T.topk(self.cap, dim=-1)  # ([1, T]: the tokens' scores)
        w, idx = w[0], idx[0]
        out = (x[idx] + self.pos[idx]) * w.sigmoid()[:, None]
        return torch.zeros_like(x).index_add(0, idx, out)


@pytest.mark.reliability("silent replays")
def test_tokens_chosen_that_read_their_rows_of_a_position_table_beside_a_found_router_are_not_refused() -> None:
    """Once a false refusal: Mixture-of-Depths reading the chosen tokens' learned positions looked like a top-k among
    learned keys picking rows of a table (product keys). Its top-k runs along the input's tokens (the dimension of the
    forward's input), so it chooses no keys: the router beside it is replayed exactly, as by hand."""
    assert_exact(RowsReadBeside(DepthsPositions, "depths"), _x(), change=0.5)


# ----------------------------------------------------------------------- MoA: attention heads as experts, map/reduce
class TopKGating(_Used):
    """yikangshen/MoA ``moa_layer/gate.py`` ``top_k_gating`` (ModuleFormer's, no noise): a bias-free ``w_gate``,
    softmax, ``topk``, renormalised."""

    def __init__(self, input_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.w_gate = nn.Linear(input_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.w_gate(x).softmax(1)
        if self.forced is None:
            top_k_gates, top_k_indices = probs.topk(self.top_k, dim=1)
        else:
            top_k_indices = self.forced
            top_k_gates = probs.gather(1, top_k_indices)
        self.used = top_k_indices
        return top_k_gates / (top_k_gates.sum(1, keepdim=True) + 1e-6), top_k_indices


class MoAProjection(nn.Module):
    """yikangshen/MoA ``moa_layer/moe.py`` ``MoE`` as the query projection: ``map`` (not ``forward``) routes the
    tokens and keeps the gates and indices on the module (``self.top_k_indices``), runs the chosen input experts;
    ``reduce``, called later by the attention, runs the same experts' output projections and combines them."""

    def __init__(self, head_size: int = 4, num_experts: int = E, k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.input_experts = nn.Parameter(torch.randn(num_experts, head_size, D) / 4)
        self.output_experts = nn.Parameter(torch.randn(num_experts, D, head_size) / 4)
        self.router = TopKGating(D, num_experts, k)
        self.top_k_gates: torch.Tensor | None = None
        self.top_k_indices: torch.Tensor | None = None

    def map(self, x: torch.Tensor) -> torch.Tensor:
        self.top_k_gates, self.top_k_indices = self.router(x)
        return torch.einsum("td,tkod->tko", x, self.input_experts[self.top_k_indices])

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        assert self.top_k_gates is not None and self.top_k_indices is not None
        y = torch.einsum("tko,tkdo->tkd", h, self.output_experts[self.top_k_indices])
        return (y * self.top_k_gates[..., None]).sum(1)


class MoAAttention(nn.Module):
    """MoA's attention: the routed heads' queries against one shared key and value projection, causal."""

    def __init__(self, head_size: int = 4) -> None:
        super().__init__()
        self.head_size = head_size
        self.q_proj = MoAProjection(head_size)
        self.kv_proj = nn.Linear(D, 2 * head_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj.map(x)  # [T, k, h]
        k, v = self.kv_proj(x).chunk(2, -1)
        att = torch.einsum("tkh,sh->kts", q, k) * self.head_size**-0.5
        causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.q_proj.reduce(torch.einsum("kts,sh->tkh", att, v))


# ----------------------------------------------------------------------- SpeechMoE: a router fed an embedding too
class SpeechMoERouter(_Used):
    """SpeechMoE (You et al. 2021): the router's input the hidden state concatenated with a shared embedding that
    another network of the model computes (handed to every MoE layer), a softmax and a top-1 by ``argmax``, the
    weight the chosen probability."""

    def __init__(self, emb: int = 4) -> None:
        super().__init__()
        self.num_experts, self.top_k = E, 1
        self.linear = nn.Linear(D + emb, E)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.linear(torch.cat([x, embedding], -1)).softmax(-1)
        idx = probs.argmax(-1, keepdim=True) if self.forced is None else self.forced
        self.used = idx
        return probs.gather(1, idx), idx


class SpeechMoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = SpeechMoERouter()
        self.experts = Experts()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, embedding)
        return dispatch(self.experts, x, idx, w)


class SpeechMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared_embedding = nn.Sequential(nn.Linear(D, 4), nn.Tanh())
        self.layers = nn.ModuleList([SpeechMoELayer(), SpeechMoELayer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.shared_embedding(x)
        for layer in self.layers:
            x = x + layer(x, embedding)
        return x


# ----------------------------------------------------------------------- THOR: stochastic experts, no router
class ThorFFN(nn.Module):
    """THOR (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts"): ``experts`` chosen
    uniformly at random per batch in training (Python's ``random``), none chosen by data; in eval the first. No
    router: discovery must take nothing of it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 2
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[0](x)  # (in eval)


class ThorAndMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.thor = ThorFFN()
        self.moe = GateBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + torch.tanh(self.thor(x))
        return h + self.moe(h) - x
