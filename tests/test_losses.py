"""load_balancing_loss and Session.keep_scores: the loss follows the experts the forward used."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_replay as mr

from .conftest import examples, perturb_routers, tried


def by_hand(probs: torch.Tensor, indices: torch.Tensor, mask: list[float] | None = None) -> float:
    """E * sum_e f_e * P_e written out with loops."""
    t, e = probs.shape
    w = mask or [1.0] * t
    total = sum(w)
    loss = 0.0
    for expert in range(e):
        f = sum(w[i] * sum(1 for j in indices[i].tolist() if j == expert) for i in range(t)) / total
        p = sum(w[i] * float(probs[i, expert]) for i in range(t)) / total
        loss += f * p
    return e * loss


def test_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(7, 5, generator=g).softmax(-1)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(7)])
    assert mr.load_balancing_loss(probs, idx).item() == pytest.approx(by_hand(probs, idx), abs=1e-6)
    mask = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    got = mr.load_balancing_loss(probs, idx, mask=torch.tensor(mask)).item()
    assert got == pytest.approx(by_hand(probs, idx, mask), abs=1e-6)
    two = mr.load_balancing_loss([probs, probs.flip(0)], [idx, idx[:, :1].flip(0)]).item()
    assert two == pytest.approx((by_hand(probs, idx) + by_hand(probs.flip(0), idx[:, :1].flip(0))) / 2, abs=1e-6)


def test_uniform_routing_gives_k() -> None:
    probs = torch.full((8, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    assert mr.load_balancing_loss(probs, idx).item() == pytest.approx(2.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same tokens"):
        mr.load_balancing_loss(torch.rand(4, 3), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="one probability tensor per index tensor"):
        mr.load_balancing_loss([torch.rand(4, 3)], [])
    with pytest.raises(ValueError, match="mask"):
        mr.load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), mask=torch.ones(3))


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        (torch.full((4, 2), 0.9), "must be integers"),  # would count expert 0
        (torch.full((4, 2), 8), "experts 0..7"),
        (torch.full((4, 2), -1), "unrecorded row"),
    ],
)
def test_indices_that_are_not_experts_are_refused(indices: torch.Tensor, match: str) -> None:
    with pytest.raises(mr.InvalidArgumentError, match=match):
        mr.load_balancing_loss(torch.rand(4, 8).softmax(-1), indices)


def test_a_router_with_no_token_counted_contributes_zero_not_nan() -> None:
    """An all-padding micro-batch must not turn the training loss into NaN."""
    probs = torch.rand(4, 8).softmax(-1).requires_grad_()
    idx = torch.tensor([[0, 1]] * 4)
    loss = mr.load_balancing_loss(probs, idx, mask=torch.zeros(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(probs.grad).all()
    assert mr.load_balancing_loss(torch.rand(0, 8), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0
    both = mr.load_balancing_loss([probs, probs], [idx, idx], mask=torch.tensor([1.0, 0, 0, 0]))
    assert torch.isfinite(both) and both > 0


def test_follows_replayed_routes_and_reaches_routers(tokens: torch.Tensor) -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model) as session:
        with session.capture():
            model(tokens)
        routes = session.routes()
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.keep_scores() as seen:
            model(tokens)
        assert repr(seen) == f"RouterScores(routers=2, tokens={[tokens.numel()] * 2})"
        for got, rows in zip(seen.indices, routes.per_layer(), strict=True):
            assert torch.equal(got, rows)
        loss = mr.load_balancing_loss(seen.scores, seen.indices)
        hand = sum(by_hand(p.detach(), i) for p, i in zip(seen.scores, routes.per_layer(), strict=True)) / 2
        assert loss.item() == pytest.approx(hand, abs=1e-6)
        # what a model's own aux loss computes: top-k again on the current scores
        native = [p.topk(2, dim=-1).indices for p in seen.scores]
        assert not all(torch.equal(a, b) for a, b in zip(native, seen.indices, strict=True))
        assert mr.load_balancing_loss(seen.scores, native).item() != pytest.approx(loss.item(), abs=1e-4)
        loss.backward()
    assert all(model.layers[i].mlp.router.weight.grad.abs().sum() > 0 for i in range(2))


def test_keep_scores_idle_under_checkpointing_and_nesting(tokens: torch.Tensor) -> None:
    model = mr.models.build("topk_softmax", num_layers=2, checkpointing="non_reentrant")
    with mr.attach(model) as session:
        with session.keep_scores() as seen:
            model(tokens, labels=tokens).loss.backward()  # the recompute is not kept again
            with pytest.raises(mr.SessionStateError, match="nest"):
                with session.keep_scores():
                    pass
        assert session.state == "idle"
        assert repr(seen) == f"RouterScores(routers=2, tokens={[tokens.numel()] * 2})"
        # this router's top-k runs on logits: softmax gives the probabilities
        probs = [s.softmax(-1) for s in seen.scores]
        assert all(torch.allclose(p.sum(-1), torch.ones(tokens.numel())) for p in probs)
        name = session.names[0]
        assert torch.equal(seen[name][1], seen.indices[0])
        with pytest.raises(KeyError, match="no router named"):
            seen["nope"]
        model(tokens)  # outside the context: nothing more is kept
        assert seen.scores[0].shape == (tokens.numel(), 8)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_equals_transformers_aux_loss_per_layer_on_native_routing() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[],
    )
    model = transformers.Qwen3MoeForCausalLM(cfg)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, session.keep_scores() as seen:
        out = model(x, output_router_logits=True, use_cache=False)
    for logits, probs, idx in zip(out.router_logits, seen.scores, seen.indices, strict=True):
        theirs = load_balancing_loss_func((logits,), 8, 2)
        assert mr.load_balancing_loss(probs, idx).item() == pytest.approx(theirs.item(), abs=1e-6)


def test_compiles_in_one_graph() -> None:
    """The index checks spend no host sync in compiled code (training steps compile with fullgraph=True)."""
    g = torch.Generator().manual_seed(0)  # (k distinct experts per token, whatever ran before)
    probs = torch.rand(6, 8, generator=g).softmax(-1)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    compiled = torch.compile(mr.load_balancing_loss, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(probs, idx), mr.load_balancing_loss(probs, idx))


def test_inputs_that_are_not_tensors_are_refused_clearly() -> None:
    probs, idx = torch.rand(2, 4).softmax(-1), torch.tensor([[0], [1]])
    for bad_probs, bad_idx in ((probs.numpy(), idx), (probs, idx.numpy()), (probs, [[0], [1]]), (probs, 3)):
        with pytest.raises(mr.ArgumentTypeError, match="a tensor or a list of tensors"):
            mr.load_balancing_loss(bad_probs, bad_idx)
    with pytest.raises(mr.ArgumentTypeError, match="mask must be a tensor"):
        mr.load_balancing_loss(probs, idx, mask=[1, 0])
    # any iterable of tensors, a generator too
    gen = mr.load_balancing_loss((p for p in [probs]), (i for i in [idx]))
    assert gen.item() == pytest.approx(mr.load_balancing_loss(probs, idx).item())


def test_indices_on_another_device_follow_the_probabilities() -> None:
    """Routes are on the host while the scores are on the accelerator: the indices are moved."""
    probs, idx = torch.rand(3, 4).softmax(-1), torch.tensor([[0], [1], [1]])
    want = mr.load_balancing_loss(probs, idx)
    meta = torch.empty(3, 4, device="meta")  # another device than the indices', without an accelerator
    assert mr.load_balancing_loss(meta, idx).device.type == "meta"
    if torch.cuda.is_available():
        assert mr.load_balancing_loss(probs.cuda(), idx).item() == pytest.approx(want.item())
        assert mr.load_balancing_loss(probs, idx.cuda()).item() == pytest.approx(want.item())


@pytest.mark.parametrize(
    ("probs", "indices", "mask", "match"),
    [
        (torch.randn(4, 6) - 3, torch.tensor([[0], [1], [2], [3]]), None, r"minimum of .*softmax\(-1\)"),
        (torch.full((4, 6), float("nan")), torch.tensor([[0], [1], [2], [3]]), None, "NaN or infinite"),
        (torch.ones(4, 6, dtype=torch.long), torch.tensor([[0], [1], [2], [3]]), None, "floating-point"),
        (torch.full((4, 6), 1 / 6), torch.tensor([[0, 0], [1, 2], [2, 3], [3, 4]]), None, "uses an expert twice"),
        (torch.full((4, 6), 1 / 6), torch.tensor([[0], [1], [2], [3]]), torch.tensor([1.0, -1, 1, 1]), "not negative"),
        (torch.full((4, 6), 1 / 6), torch.tensor([[0], [1], [2], [3]]), torch.tensor([1, math.nan, 1, 1]), "finite"),
    ],
    ids=["logits", "nan-probs", "integer-probs", "repeated-expert", "negative-mask", "nan-mask"],
)
@pytest.mark.reliability("bad inputs")
def test_values_that_are_no_probabilities_or_decisions_are_refused(
    probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None, match: str
) -> None:
    """Once silent: logits, NaN or integer probs, a repeated expert or a negative mask gave a plausible number."""
    with pytest.raises(mr.InvalidArgumentError, match=match):
        mr.load_balancing_loss(probs, indices, mask=mask)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reentrant", [True, False])
def test_scores_kept_in_a_reentrant_checkpoints_forward_are_refused_for_a_loss(reentrant: bool) -> None:
    """Once silent: scores kept in a reentrant checkpoint's forward (run without gradients) gave an aux loss with none.

    ``(out.loss + 0.01 * load_balancing_loss(seen.scores, seen.indices)).backward()`` then reached the routers
    through the main loss only; now reading the scores for a loss with gradients on is refused, and with
    ``use_reentrant=False`` the aux gradient reaches the routers.
    """
    model = mr.models.build("softmax_topk", num_layers=2, checkpointing="reentrant" if reentrant else "non_reentrant")
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as seen:
            out = model(x, labels=x)
        if reentrant:
            with pytest.raises(mr.MoEReplayError, match="use_reentrant=False"):
                seen.scores
            scores, indices = seen[session.names[0]]
            with pytest.raises(mr.MoEReplayError, match="reentrant activation checkpoint"):
                mr.load_balancing_loss(scores, indices)
            with torch.no_grad():  # (read without gradients, as for a metric: no loss to lose them)
                assert len(seen.scores) == len(session.names)
            out.loss.backward()
        else:
            aux = mr.load_balancing_loss(seen.scores, seen.indices)
            aux.backward(retain_graph=True)
            routers = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
            assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
            out.loss.backward()


def transformers_formula(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One layer of transformers' ``load_balancing_loss_func``, written out: softmax, its own top-k, one-hot counts."""
    probs = logits.float().softmax(-1)
    chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, logits.shape[-1]).float()  # [T, k, E]
    w = torch.ones(logits.shape[0]) if mask is None else mask.reshape(-1).float()
    tokens_per_expert = (chosen * w[:, None, None]).sum(0) / w.sum()  # [k, E]
    prob_per_expert = (probs * w[:, None]).sum(0) / w.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * logits.shape[-1]


@given(
    routers=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 8, 255, 256, 257]), st.integers(1, 4), st.integers(0, 2**16)),
        min_size=1,
        max_size=3,
    ),
    tokens=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    masked=st.booleans(),
    shuffle=st.booleans(),
)
@examples(30)
def test_value_and_gradient_equal_the_transformers_formula_per_router(
    routers: list[tuple[int, int, int]], tokens: int, dtype: torch.dtype, masked: bool, shuffle: bool
) -> None:
    """Routers of 255 to 257 experts, k = 1 to 4, half-precision logits, a padding mask, slots in any order: the
    mean over routers of the per-layer formula, and its gradient in the logits."""
    logits, indices, want = [], [], []
    g = torch.Generator().manual_seed(sum(seed for _, _, seed in routers))
    mask = (torch.rand(tokens, generator=g) < 0.7).long() if masked else None
    if mask is not None:
        mask[0] = 1
    for e, k, _ in routers:
        k = min(k, e)
        lg = torch.randn(tokens, e, generator=g).to(dtype).requires_grad_()
        idx = lg.float().softmax(-1).topk(k, dim=-1).indices
        logits.append(lg)
        indices.append(idx[:, torch.randperm(k, generator=g)] if shuffle else idx)
        want.append(transformers_formula(lg, k, mask))
    got = mr.load_balancing_loss([lg.float().softmax(-1) for lg in logits], indices, mask=mask)
    reference = torch.stack(want).mean()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(torch.autograd.grad(got, logits), torch.autograd.grad(reference, logits), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.reliability("bad inputs")
def test_indices_of_no_expert_are_refused_not_counted_as_zero() -> None:
    """Once silent: ``[T, 0]`` indices (k = 0, e.g. a slice ``idx[:, :0]``) gave a loss of 0 with no gradient."""
    probs = torch.rand(3, 4).softmax(-1).requires_grad_()
    with pytest.raises(mr.InvalidArgumentError, match=r"k >= 1 of E >= 1 experts"):
        mr.load_balancing_loss(probs, torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(mr.InvalidArgumentError, match=r"k >= 1 of E >= 1 experts"):
        mr.load_balancing_loss(torch.rand(3, 0), torch.zeros(3, 0, dtype=torch.long))
    assert mr.load_balancing_loss(probs, torch.zeros(3, 1, dtype=torch.long)).requires_grad  # k = 1: counted


@pytest.mark.reliability("other")
def test_router_scores_read_as_a_mapping_of_router_names() -> None:
    """Once a crash: ``name in kept`` and ``list(kept)`` fell back on ``kept[0]`` and raised "no router named '0'";
    a name of another type raised a bare ``TypeError`` from a dict."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session, session.keep_scores() as kept:
        model(x)
    name = session.names[0]
    assert name in kept and "nope" not in kept and 0 not in kept
    assert list(kept) == list(session.names) == list(kept.names)
    assert {n: kept[n][1].shape[0] for n in kept} == {n: x.numel() for n in session.names}
    with pytest.raises(mr.ArgumentTypeError, match="by router name"):
        kept[[name]]  # type: ignore[index]
    with pytest.raises(mr.UnknownRouterError, match="no router named 'nope'"):
        kept["nope"]


def _balance_by_hand(probs: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e over the weighted tokens (the Switch formula, written out; never moe_replay's)."""
    e = probs.shape[1]
    used = torch.zeros(probs.shape[0], e).scatter_(1, experts, 1.0)
    w = weights.float()[:, None]
    return e * ((used * w).sum(0) / w.sum() * (probs * w).sum(0) / w.sum()).sum()


@pytest.mark.reliability("silent replays")
def test_an_attention_mask_weighs_each_tokens_own_row_of_routers_that_see_the_batch_sequence_first() -> None:
    """Once silent: a [batch, positions] mask was read row by row onto rows kept position by position, so padding
    weighed on other tokens' rows. Scores kept from routers that see a right-padded [2, 4] batch sequence-first (row
    p * 2 + b is token (b, p)), and the batch's attention mask as it is: each row gets its own token's weight."""
    from tests.test_feeds import _batch, _SequenceFirst

    model = _SequenceFirst().eval()
    ids, mask = _batch(rows=2, width=4), mr.BatchLayout.padded([3, 4]).attention_mask()
    with mr.attach(model) as session, session.keep_scores() as kept, torch.no_grad():
        model(ids, attention_mask=mask)
    rows = mask.t().reshape(-1)  # (each row's own token's weight: position by position)
    want = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(kept.scores, kept.indices, strict=True)]).mean()
    assert torch.allclose(mr.load_balancing_loss(kept.scores, kept.indices, mask=rows), want)  # (row order: exact)
    assert torch.allclose(mr.load_balancing_loss(kept.scores, kept.indices, mask=mask), want)
    for got, rows_of in zip(kept.row_mask(mask), [rows] * len(kept.names), strict=True):
        assert torch.equal(got, rows_of)
    probs = [s.softmax(-1) for s in kept.scores]  # (probabilities made from the kept scores: the indices tell)
    want_p = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(probs, kept.indices, strict=True)]).mean()
    assert torch.allclose(mr.load_balancing_loss(probs, kept.indices, mask=mask), want_p)


class _Rolled(torch.nn.Module):
    """A model whose routers see the tokens of a [batch, positions] batch neither row by row nor position by position
    (each row is the next token's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 64)
        self.block = mr.models.MoEBlock(mr.models.MoEConfig(num_experts=8, top_k=2))
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        b, p, h = x.shape
        return self.block(x.reshape(b * p, h).roll(1, 0)).view(b, p, h)


def _row_weights_by_hand(masks: list[torch.Tensor], sequence_first: list[bool]) -> torch.Tensor:
    """Each kept row's own token's weight, forward by forward, from the layout the test models are written with."""
    return torch.cat([(m.t() if first else m).reshape(-1) for m, first in zip(masks, sequence_first, strict=True)])


@pytest.mark.reliability("silent replays")
def test_a_batch_major_attention_mask_is_read_as_before() -> None:
    """Routers that see the tokens row by row (transformers models): a [batch, positions] mask, the same mask
    flattened, and probabilities made from the kept scores give the loss of each row's own token's weight."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = mr.BatchLayout.padded([5, 2, 4]).attention_mask()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x, attention_mask=mask)
        with session.replay(session.routes()), session.keep_scores() as kept:
            out = model(x, attention_mask=mask, labels=x)
    rows = mask.reshape(-1)
    want = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(kept.scores, kept.indices, strict=True)]).mean()
    aux = mr.load_balancing_loss(kept.scores, kept.indices, mask=mask)
    assert torch.allclose(aux, want)
    assert torch.equal(aux, mr.load_balancing_loss(kept.scores, kept.indices, mask=rows))
    name = session.names[0]
    assert torch.allclose(mr.load_balancing_loss(*kept[name], mask=mask), _balance_by_hand(*kept[name], rows))
    (out.loss + 0.01 * aux).backward()  # (its gradient reaches the routers)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("router.weight"))


@pytest.mark.reliability("bad inputs")
def test_a_mask_of_the_batch_for_rows_of_no_known_order_is_refused() -> None:
    """A [batch, positions] mask given with tensors that do not know whose token each row is, for rows that follow
    the tokens in neither order, or for decisions kept outside any forward of the model: refused, not read row by
    row. One weight per row, in the order of the rows, keeps its meaning."""
    probs, idx = torch.rand(8, 4).softmax(-1), torch.randint(0, 4, (8, 1))
    with pytest.raises(mr.InvalidArgumentError, match="whose order is not known"):
        mr.load_balancing_loss(probs, idx, mask=torch.ones(2, 4))
    assert torch.equal(mr.load_balancing_loss(probs, idx, mask=torch.ones(8)), mr.load_balancing_loss(probs, idx))
    model = _Rolled().eval()
    ids, mask = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(0)), torch.ones(2, 4)
    mask[0, 3] = 0
    with mr.attach(model) as session, session.keep_scores() as kept, torch.no_grad():
        model(ids, attention_mask=mask)
        model.block(torch.randn(1, 3, 64))  # (a layer called alone: no forward of the model)
    with pytest.raises(mr.InvalidArgumentError, match="order in which the routers saw the tokens of forward 0"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=mask)
    with pytest.raises(mr.InvalidArgumentError, match="decision 1 was kept in no forward of the model"):
        kept.row_mask([mask.reshape(-1).roll(1)])  # (the forward's rows in their order: the layer's are not known)
    with pytest.raises(mr.InvalidArgumentError, match="give one per forward"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=[mask, mask])
    with pytest.raises(mr.ArgumentTypeError, match="mask must be a tensor"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=[mask, None])  # type: ignore[list-item]
    rows = torch.cat([mask.reshape(-1).roll(1), torch.ones(3)])  # (each row's own token, in the order of the rows)
    want = _balance_by_hand(*kept[session.names[0]], rows)
    assert torch.allclose(mr.load_balancing_loss(kept.scores, kept.indices, mask=rows), want)


@pytest.mark.reliability("silent replays")
def test_forwards_of_other_shapes_and_orders_kept_in_one_block_weigh_each_rows_own_token() -> None:
    """Several forwards in one keep_scores() block: a [2, 4] batch its routers see sequence-first, a [3, 5] one, one
    sequence of 6 and a decode-like [3, 1] step (where every order is the same). One mask per forward, or, where the
    forwards share their positions, one mask stacked along the batch; a mask that does not match them is refused."""
    from tests.test_feeds import _SequenceFirst

    model = _SequenceFirst().eval()
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4), (3, 5), (1, 6), (3, 1)]
    feeds = [torch.randint(3, 128, s, generator=g) for s in shapes]
    masks = [(torch.rand(s, generator=g) < 0.7).float() for s in shapes]
    for m in masks:
        m[:, 0] = 1
    with mr.attach(model) as session, session.keep_scores() as kept:
        for ids, m in zip(feeds, masks, strict=True):
            model(ids, attention_mask=m)
    rows = _row_weights_by_hand(masks, [True, True, True, True])  # (the model runs [positions, batch, hidden])
    want = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(kept.scores, kept.indices, strict=True)]).mean()
    aux = mr.load_balancing_loss(kept.scores, kept.indices, mask=masks)
    assert torch.allclose(aux, want)
    assert all(torch.equal(w, rows) for w in kept.row_mask(masks))
    aux.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("router.weight"))
    with pytest.raises(mr.InvalidArgumentError, match="stacked along the batch"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=torch.ones(9, 5))
    with pytest.raises(mr.InvalidArgumentError, match=r"mask of forward 1 is \(5, 3\)"):
        kept.row_mask([masks[0], masks[1].t(), masks[2], masks[3]])
    # forwards of one width: their masks stacked along the batch, as one
    narrow = [masks[0], masks[1][:, :4]]
    with mr.attach(model) as session, session.keep_scores() as kept:
        for ids, m in zip([feeds[0], feeds[1][:, :4]], narrow, strict=True):
            model(ids, attention_mask=m)
    stacked = torch.cat(narrow)
    rows = _row_weights_by_hand(narrow, [True, True])
    want = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(kept.scores, kept.indices, strict=True)]).mean()
    assert torch.allclose(mr.load_balancing_loss(kept.scores, kept.indices, mask=stacked), want)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "fed",
    [
        pytest.param(
            "ids",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="a forward given a KV cache that already holds tokens, before any forward told the order, is "
                "read batch-major (as a capture reads its ids): on routers that see the batch sequence-first a "
                "[batch, positions] mask weighs other tokens' rows",
            ),
        ),
        "embeddings",
    ],
)
def test_an_attention_mask_of_a_batch_whose_order_is_not_told_is_exact_or_refused(fed: str) -> None:
    """A [2, 4] batch given a cache that already holds tokens (the order-telling runs would see other rows), on
    routers that see it sequence-first: a [batch, positions] mask weighs each row's own token, or is refused."""
    from tests.test_feeds import _batch, _CachedLayout, _Held

    model = _CachedLayout().eval()
    ids, mask = _batch(rows=2, width=4), mr.BatchLayout.padded([3, 4]).attention_mask()
    with mr.attach(model) as session, session.keep_scores() as kept, torch.no_grad():
        if fed == "ids":
            model(ids, past_key_values=_Held(3))
        else:
            model(inputs_embeds=model.embed(ids), past_key_values=_Held(3))
    rows = mask.t().reshape(-1)  # (each row's own token's weight: position by position)
    want = torch.stack([_balance_by_hand(p, i, rows) for p, i in zip(kept.scores, kept.indices, strict=True)]).mean()
    try:
        got = mr.load_balancing_loss(kept.scores, kept.indices, mask=mask)
    except mr.MoEReplayError:
        return
    assert torch.allclose(got, want)


@pytest.mark.reliability("silent replays")
def test_probs_and_indices_of_routers_in_other_orders_are_paired_by_router_or_refused() -> None:
    """Once silent: kept scores with indices of the same shapes in another router order (a Routes' rows of another
    order, a list reordered) counted each router's probabilities with another router's experts, a wrong loss without
    a word. Where both lists name their routers (kept by keep_scores, Routes.per_layer(), Routes.layer()), each
    router's probabilities now meet its own experts; where only some do and they disagree, the call is refused."""
    model = mr.models.build("softmax_topk", num_layers=3)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept, torch.no_grad():
            model(ids)
        names = list(kept.names)
        # each router's own probabilities with its own experts, by hand
        want = sum(by_hand(kept[n][0], kept[n][1]) for n in names) / len(names)
        losses = [by_hand(kept[n][0], kept[names[(i + 1) % 3]][1]) for i, n in enumerate(names)]
        assert abs(sum(losses) / 3 - want) > 1e-4  # (paired with other routers' experts, the loss is another)
        back = names[::-1]
        paired = {
            "kept in order": (kept.scores, kept.indices),
            "kept indices reversed": (kept.scores, kept.indices[::-1]),
            "routes of another order": (kept.scores, routes.select(back).per_layer()),
            "routes' layers by name": ([kept[n][0] for n in back], [routes.layer(n) for n in names]),
            "renamed routes in order": (kept.scores, routes.rename({"": "module."}).per_layer()),
            "unnamed indices in order": (kept.scores, [x.clone() for x in kept.indices]),
        }
        for case, (probs, idx) in paired.items():
            assert mr.load_balancing_loss(probs, idx).item() == pytest.approx(want, abs=1e-5), case
        refused = {
            "one named index out of place": (kept.scores, [kept.indices[1], kept.indices[0].clone(), kept.indices[2]]),
            "routes of fewer routers": (kept.scores[:2], routes.select(back[:2]).per_layer()),
            "one prob out of place": ([kept.scores[2].detach().clone(), *kept.scores[1:]], kept.indices[::-1]),
        }
        for probs, idx in refused.values():
            with pytest.raises(mr.InvalidArgumentError, match="other orders"):
                mr.load_balancing_loss(probs, idx)
            tried()
    tried(len(paired))


class _TwoStacks(torch.nn.Module):
    """An encoder and a decoder of the same module tree: routers named alike past ``encoder.`` and ``decoder.``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = mr.models.build("softmax_topk", num_layers=1, seed=1)
        self.decoder = mr.models.build("softmax_topk", num_layers=1, seed=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids).logits + self.decoder(ids).logits


@pytest.mark.reliability("silent replays")
def test_routers_named_alike_in_other_stacks_are_not_taken_for_one_router() -> None:
    """Once silent: an encoder's router and a decoder's, named alike past ``encoder.`` and ``decoder.``, were taken for
    one router under other wrappers: their indices in another router order than the probs were counted with the
    other stack's probabilities, a wrong loss without a word. They are paired by router, as other routers are."""
    model = _TwoStacks()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept, torch.no_grad():
            model(ids)
        names = list(kept.names)
        assert len(names) == 2 and names[0].startswith("encoder.") and names[1].startswith("decoder.")
        want = sum(by_hand(kept[n][0], kept[n][1]) for n in names) / 2
        crossed = (by_hand(kept[names[0]][0], kept[names[1]][1]) + by_hand(kept[names[1]][0], kept[names[0]][1])) / 2
        assert abs(crossed - want) > 1e-4  # (the premise: paired with the other stack's experts, another loss)
        got = mr.load_balancing_loss(kept.scores, routes.select(names[::-1]).per_layer())
        assert got.item() == pytest.approx(want, abs=1e-5)


@pytest.mark.reliability("silent replays")
def test_unnamed_indices_in_another_router_order_are_refused() -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept, torch.no_grad():
            model(ids)
        want = sum(by_hand(kept[n][0], kept[n][1]) for n in kept.names) / 2
        got = mr.load_balancing_loss(kept.scores, list(routes.indices.unbind(1))[::-1]).item()  # (no error)
        assert got == pytest.approx(want, abs=1e-5)


def test_routers_named_past_a_module_name_on_one_side_in_another_order_are_paired_by_name() -> None:
    """Once a false refusal: probabilities named by a session of a model's backbone ('layers.1.router', ...) and the
    rows of routes captured on the model that holds it ('backbone.layers.0.router', ...), in another router order,
    were refused as naming other routers, though each name is one router past the module name on one side. Paired
    by name, as the same lists in one order; names that fit two routers at once are still refused."""
    from moe_replay.losses import note_router

    torch.manual_seed(0)
    probs = [note_router(torch.rand(6, 4).softmax(-1), f"layers.{i}.router") for i in (1, 0)]
    rows = [torch.stack([torch.randperm(4)[:2] for _ in range(6)]) for _ in range(2)]
    indices = [note_router(r, f"backbone.layers.{i}.router") for i, r in enumerate(rows)]
    assert torch.equal(mr.load_balancing_loss(probs, indices), mr.load_balancing_loss(probs, indices[::-1]))
    in_order = [rows[1].clone(), rows[0].clone()]  # (unnamed: paired by place, each with its own router)
    assert torch.equal(mr.load_balancing_loss(probs, indices), mr.load_balancing_loss(probs, in_order))
    twice = [note_router(rows[0], "layers.0.router"), note_router(rows[1], "module.layers.0.router")]
    with pytest.raises(mr.InvalidArgumentError, match="other orders"):
        mr.load_balancing_loss(probs, twice)


class _ScoresRouter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(16, 8, bias=False)
        self.top_k, self.num_experts = 2, 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.gate(x).softmax(-1)
        weights, idx = torch.topk(probs, self.top_k)
        return probs, weights, idx


class _BlockThatMasksItsScores(torch.nn.Module):
    """A block that, after its router returned, masks the small probabilities of the tensor the top-k read."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.router = _ScoresRouter()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(8))
        self.num_experts, self.in_place = 8, in_place
        self.masked: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, weights, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (idx == e)).sum(-1, keepdim=True) * expert(x)
        small = probs < 0.1
        self.masked = probs.masked_fill_(small, 0.0) if self.in_place else probs.masked_fill(small, 0.0)
        return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
def test_scores_written_in_place_after_the_decision_are_refused_by_keep_scores(in_place: bool) -> None:
    """The scores ``keep_scores()`` keeps are the tensor the top-k read, held by reference: a write into it after the
    decision (the block masking small probabilities in place) would make a load-balancing loss count other values than
    the experts were chosen from. It is refused, naming the router; a write into a new tensor changes nothing."""
    torch.manual_seed(0)
    block = _BlockThatMasksItsScores(in_place)
    model = torch.nn.Sequential(block)
    x = torch.randn(6, 16)
    with torch.no_grad():
        want = block.router(x)[0].clone()  # (the probabilities the decision is made on)
    with torch.no_grad(), mr.attach(model) as session, session.keep_scores() as kept:
        model(x)
    if in_place:
        assert block.masked is not None and not torch.equal(block.masked, want)  # (the write did change them)
        with pytest.raises(mr.UnsupportedRouterError, match=r"'0\.router''s scores .* written in place"):
            mr.load_balancing_loss(kept.scores, kept.indices)
        with pytest.raises(mr.UnsupportedRouterError, match="written in place"):
            kept["0.router"]
    else:
        scores, indices = kept["0.router"]
        torch.testing.assert_close(scores, want)
        assert torch.isfinite(mr.load_balancing_loss(kept.scores, kept.indices))
