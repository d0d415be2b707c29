"""RL-trainer workflows between rollout and training, end to end, each exact or refused.

What verl, slime, NeMo-RL, OpenRLHF and TRL do with a rollout's routes before the training forward: remove-padding
rows packed with restarting ``position_ids`` (in the rollout's order or regrouped by length, as verl's dynamic batch
size does with ``rearrange_micro_batches``), micro-batches of other sizes with gradient accumulation, PPO epochs,
shuffled micro-batches, left or right padding, padding to a multiple of 8, truncated responses, re-tokenized prompts,
the last generated token that no engine routes, R2 and R3 side by side with a reference forward, two replicas
replaying their own shards. Each is run with routes that know their token ids (a capture's, an engine reader's given
the ids) and with routes that know none (an engine's arrays read alone, ``with_token_ids(None)``).

The experts every MoE layer dispatched are read by the test's own hooks on its experts modules (independently of
moe_replay); the router weights are perturbed after the capture, so that only a forced replay dispatches the
captured experts again. Outcome: exact (every token of every sequence dispatches its own captured experts), or a
``MoEReplayError`` with the model's tensors unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay.distributed import split_routes

from .test_workflow import (
    _dispatched,
    _ids,
    _joined,
    _perturb,
    _state,
    _unchanged,
    _watch_experts,
    rollout,  # noqa: F401  (the README's rollout recipe, perturbed)
)

Oracle = dict[str, torch.Tensor]

LENGTHS = [5, 7, 4, 6, 7]  # sequences 1 and 4 have the same length


@pytest.fixture(scope="module")
def sequences() -> Iterator[tuple[Any, ...]]:
    """Five sequences captured one per forward (the rollout, R2-style), with the experts each token dispatched there
    (read by the test's hooks); then the router weights perturbed."""
    model = mr.models.build("softmax_topk", num_layers=2)
    _watch_experts(model)
    session = mr.attach(model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 128, (n,), generator=g) for n in LENGTHS]
    per, want = [], []
    for s in seqs:
        with _dispatched(model) as rec, session.capture():
            model(s[None])
        per.append(session.routes())
        want.append(_joined(rec))
    _perturb(model)
    with _dispatched(model) as rec:  # (the perturbation moves the free choice)
        model(seqs[0][None])
    assert any(not torch.equal(v, want[0][k]) for k, v in _joined(rec).items())
    yield model, session, seqs, per, want, _state(model)
    session.detach()


def _layout(kind: str, lengths: list[int]) -> tuple[mr.BatchLayout, str]:
    """A layout of ``kind`` for these lengths and how its forward is fed ("positions": remove-padding rows)."""
    if kind == "packed":
        return mr.BatchLayout.packed(lengths), "positions"
    if kind == "packed-rows-of-16":  # (several remove-padding rows, each right-padded)
        return mr.BatchLayout.packed(lengths, row_length=16), "positions"
    if kind == "left+positions":  # (verl's left-padded batch: its mask and position_ids from it, both fed)
        return mr.BatchLayout.padded(lengths, side="left"), "both"
    if kind.startswith(("right", "left")):
        side = kind[:-1] if kind.endswith("8") else kind
        width = -(-max(lengths) // 8) * 8 if kind.endswith("8") else None
        return mr.BatchLayout.padded(lengths, side=side, length=width), "mask"
    raise AssertionError(kind)


def _forward(model: Any, layout: mr.BatchLayout, how: str, tokens: list[torch.Tensor]) -> None:
    ids = layout.tokens(tokens)
    if how == "positions":  # (verl's use_remove_padding: one row, positions restarting per sequence)
        out = model(ids, position_ids=layout.position_ids())
    elif how == "both":
        mask = layout.attention_mask()
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    else:
        out = model(ids, attention_mask=layout.attention_mask())
    out.logits.float().pow(2).mean().backward()  # (gradient accumulation over the micro-batches)


#: name: (micro-batches fed: (layout kind, sequences in batch order), the routes: (layout kind, sequences), outcome
#: with token ids, outcome without)
_CASES: dict[str, tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]], str, str]] = {
    "remove-padding-rollout-order": ([("packed", [0, 1, 2, 3, 4])], [("packed", [0, 1, 2, 3, 4])], "exact", "exact"),
    "remove-padding-routes-in-other-order": (
        [("packed", [0, 1, 2, 3, 4])],
        [("packed", [1, 0, 2, 3, 4])],
        "refused",
        "refused",
    ),
    "rearranged-by-length-routes-rearranged": (
        [("packed", [1, 4]), ("packed", [3, 0, 2])],
        [("packed", [1, 4]), ("packed", [3, 0, 2])],
        "exact",
        "exact",
    ),
    "rearranged-by-length-routes-in-rollout-order": (
        [("packed", [1, 4]), ("packed", [3, 0, 2])],
        [("packed", [0, 1, 2, 3, 4])],
        "refused",
        "refused",
    ),
    "micro-batches-2+3-of-one-rollout": (
        [("right", [0, 1]), ("right", [2, 3, 4])],
        [("right", [0, 1]), ("right", [2, 3, 4])],
        "exact",
        "exact",
    ),
    "micro-batches-routes-padded-as-one-batch": (
        [("right", [0, 2]), ("right", [1, 3, 4])],
        [("right", [0, 1, 2, 3, 4])],
        "refused",
        "refused",
    ),
    "shuffled-micro-batch-routes-shuffled": (
        [("right", [3, 0, 4, 2, 1])],
        [("right", [3, 0, 4, 2, 1])],
        "exact",
        "exact",
    ),
    "shuffled-micro-batch-routes-not": (
        [("right", [3, 0, 4, 2, 1])],
        [("right", [0, 1, 2, 3, 4])],
        "refused",
        "refused",
    ),
    "left-padded-batch-left-routes": ([("left", [0, 1, 2, 3])], [("left", [0, 1, 2, 3])], "exact", "exact"),
    "left-padded-with-positions": (
        [("left+positions", [0, 1, 2, 3])],
        [("left", [0, 1, 2, 3])],
        "exact",
        "exact",
    ),
    "left-padded-with-positions-routes-reordered": (
        [("left+positions", [0, 1, 2, 3])],
        [("left", [1, 0, 2, 3])],
        "refused",
        "refused",
    ),
    "remove-padding-rows-of-16": (
        [("packed-rows-of-16", [0, 1, 2, 3, 4])],
        [("packed-rows-of-16", [0, 1, 2, 3, 4])],
        "exact",
        "exact",
    ),
    "remove-padding-rows-of-16-routes-in-one-row": (
        [("packed-rows-of-16", [0, 1, 2, 3, 4])],
        [("packed", [0, 1, 2, 3, 4]), ("packed", [0, 1])],
        "refused",
        "refused",
    ),
    "left-padded-batch-right-routes": ([("left", [0, 1, 2, 3])], [("right", [0, 1, 2, 3])], "refused", "refused"),
    "right-padded-batch-left-routes": ([("right", [0, 1, 2, 3])], [("left", [0, 1, 2, 3])], "refused", "refused"),
    "padded-to-a-multiple-of-8": ([("right8", [0, 1, 2, 3])], [("right8", [0, 1, 2, 3])], "exact", "exact"),
    "left-padded-to-8-routes-to-the-longest": (
        [("left8", [0, 1, 2, 3])],
        [("left", [0, 1, 2, 3]), ("left", [0, 1, 2, 3])],
        "refused",
        "refused",
    ),
}


def _routes(parts: list[tuple[str, list[int]]], per: list[mr.Routes]) -> mr.Routes:
    laid = [_layout(kind, [per[i].num_tokens for i in idx])[0].routes([per[i] for i in idx]) for kind, idx in parts]
    return mr.Routes.cat(laid)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
@pytest.mark.parametrize("case", list(_CASES))
def test_training_batches_of_a_rollout(case: str, ids: str, sequences: tuple[Any, ...]) -> None:
    """Per-sequence routes laid out for the training batches a trainer builds (packed remove-padding rows, verl's
    micro-batches regrouped by length, micro-batches of other sizes with gradient accumulation, shuffles, either
    padding side, padding to a multiple of 8): each sequence's tokens dispatch their own captured experts, or the
    replay is refused. Routes that know no token ids are refused too wherever the batch's attention mask or
    position_ids show that the layout is not the batch's."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    batches, parts, known, unknown = _CASES[case]
    outcome = known if ids == "token-ids" else unknown
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    routes = _routes(parts, source)
    fed = [(*_layout(kind, [LENGTHS[i] for i in idx]), idx) for kind, idx in batches]
    before = _state(model)
    try:
        with _dispatched(model) as rec, session.replay(routes):
            for layout, how, idx in fed:
                _forward(model, layout, how, [seqs[i] for i in idx])
    except mr.MoEReplayError:
        assert outcome == "refused", f"refused though exact: {case}"
        _unchanged(model, before)
        assert session.state == "idle"
        return
    assert outcome == "exact", f"replay ran where it forces other tokens' experts: {case}"
    for name, calls in rec.items():
        assert len(calls) == len(fed)
        for got, (layout, _, idx) in zip(calls, fed, strict=True):
            for j, i in enumerate(idx):
                assert torch.equal(got[layout.flat_positions(j)], want[i][name]), f"sequence {i} at {name}"


def _replay_rows(model: Any, session: mr.Session, routes: mr.Routes, forward: Any) -> Oracle:
    with _dispatched(model) as rec, session.replay(routes):
        forward()
    return _joined(rec)


@pytest.mark.reliability("silent replays")
def test_routes_of_one_sequence_on_another_of_the_same_length(sequences: tuple[Any, ...]) -> None:
    """Sequence 4's routes replayed on sequence 1 (both 7 tokens), alone and in a padded batch: refused where the
    routes know their token ids. Routes that know none (an engine's arrays read without ids) hold nothing that tells
    the two apart: they are replayed by row order, each row on the token at its place (what the layout and the
    replay docstring say); giving the engine reader the ids (``token_ids=``) is what refuses it."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    layout = mr.BatchLayout.padded([LENGTHS[i] for i in (0, 1)])
    before = _state(model)
    for routes, ids in ((per[4], seqs[1][None]), (layout.routes([per[0], per[4]]), layout.tokens([seqs[0], seqs[1]]))):
        with pytest.raises(mr.TokenMismatchError), session.replay(routes):
            model(ids, attention_mask=torch.ones_like(ids) if ids.shape[0] == 1 else layout.attention_mask())
        _unchanged(model, before)
        blind = routes.with_token_ids(None)
        # (fed the batch's mask: a padded batch fed none is refused, nothing telling where its sequences sit)
        mask = torch.ones_like(ids) if ids.shape[0] == 1 else layout.attention_mask()
        got = _replay_rows(model, session, blind, lambda ids=ids, mask=mask: model(ids, attention_mask=mask))
        for name, rows in got.items():  # (forced by row order: sequence 4's experts on sequence 1's tokens)
            forced = blind.layer(name.replace("experts", "router")).long()
            held = forced[:, 0] >= 0  # (padding rows: routed natively)
            assert torch.equal(rows[held], forced[held])


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
@pytest.mark.parametrize("change", ["truncated", "truncated-routes-sliced", "prompt-token-added", "eos-dropped"])
def test_sequences_changed_between_rollout_and_training(change: str, ids: str, sequences: tuple[Any, ...]) -> None:
    """The response truncated to a max_response_length after the rollout (the routes cut to it too: exact; left
    whole: refused), the prompt re-tokenized with one token more (a chat template's), the last token dropped from
    the batch: exact or refused, with or without token ids (then by the layout's row counts, or the attention
    mask)."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    idx, cut = [0, 1, 3], 5
    tokens, routes_of, outcome = [seqs[i] for i in idx], [source[i] for i in idx], "refused"
    if change.startswith("truncated"):
        tokens = [t[:cut] for t in tokens]
        if change == "truncated-routes-sliced":
            routes_of, outcome = [r[:cut] for r in routes_of], "exact"
    elif change == "prompt-token-added":
        tokens = [torch.cat([t[:2], torch.tensor([3]), t[2:]]) if j == 0 else t for j, t in enumerate(tokens)]
    else:
        tokens = [t[:-1] for t in tokens]
    fed = mr.BatchLayout.padded([len(t) for t in tokens])
    before = _state(model)
    try:
        # (the layout of the routes as they are: the batch's own layout refuses routes of other row counts at once)
        laid = mr.BatchLayout.padded([r.num_tokens for r in routes_of], length=fed.row_length).routes(routes_of)
        got = _replay_rows(model, session, laid, lambda: model(fed.tokens(tokens), attention_mask=fed.attention_mask()))
    except mr.MoEReplayError:
        assert outcome == "refused", f"refused though exact: {change}"
        _unchanged(model, before)
        return
    assert outcome == "exact", f"replay ran on other tokens than recorded: {change}"
    for j, i in enumerate(idx):
        for name, rows in got.items():
            assert torch.equal(rows[fed.flat_positions(j)], want[i][name][:cut])


_SOURCES = ["R2-training-capture", "R3-engine-with-ids", "R3-engine-without-ids"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reference", ["copy-in-the-block", "actor-outside-the-block", "actor-in-the-block"])
@pytest.mark.parametrize("source", _SOURCES)
def test_r2_and_r3_with_a_reference_forward(
    source: str,
    reference: str,
    rollout: tuple[Any, ...],  # noqa: F811
) -> None:
    """The README's rollout replayed as R3 (its routes through SGLang's format, read with the sequences' ids or
    without; the last generated token has no row and routes natively) or as R2 (the training policy's own capture of
    the old-logprob forward), with the reference policy's forward beside the actor's: a copy of the model (made
    after attach) inside the replay block, or the actor itself run free between two replayed blocks: the reference
    is never forced, the actor exact. The actor run a second time inside the block (a reference forward on the same
    model by mistake) reads rows its routes do not hold: refused."""
    model, session, parts, tokens, per_seq, _ = rollout
    layout = mr.BatchLayout.padded([len(t) for t in tokens])
    ids, attn = layout.tokens(tokens), layout.attention_mask()
    want: list[Oracle] = per_seq
    if source == "R2-training-capture":
        with _dispatched(model) as rec, session.capture(), torch.no_grad():
            model(ids, attention_mask=attn)
        routes = session.routes()
        want = [{k: v[layout.flat_positions(i)] for k, v in _joined(rec).items()} for i in range(len(tokens))]
        _perturb(model, seed=5)  # (the policy update between the old-logprob forward and the training forward)
    else:
        lm = mr.LayerMap.from_session(session, num_layers=model.config.num_layers)
        known = source == "R3-engine-with-ids"
        engine = [
            mr.interop.from_sglang(mr.interop.to_sglang(p, lm), lm, token_ids=t if known else None)
            for p, t in zip(parts, tokens, strict=True)
        ]
        routes = layout.routes(engine)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        free = ref(ids, attention_mask=attn).logits
    before = _state(model)

    def actor() -> None:
        model(ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss.backward()

    try:
        if reference == "actor-outside-the-block":
            with torch.no_grad():
                model(ids, attention_mask=attn)
        with _dispatched(model) as rec, session.replay(routes):
            with torch.no_grad():
                ref_out = (model if reference == "actor-in-the-block" else ref)(ids, attention_mask=attn).logits
            actor()
    except mr.MoEReplayError:
        assert reference == "actor-in-the-block", "refused though exact"
        _unchanged(model, before)
        return
    assert reference != "actor-in-the-block", "a second forward of the actor read rows its routes do not hold"
    assert torch.equal(ref_out, free), "the reference policy was forced"
    for name, calls in rec.items():
        got = calls[-1]  # (the actor's: the copy's experts hooks, copied with it, write here too)
        for i, w in enumerate(want):
            where = layout.flat_positions(i)[: len(w[name])]
            assert torch.equal(got[where], w[name]), f"sequence {i} at {name}: other experts than its rollout's"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("copied", ["before-attach", "after-attach"])
def test_two_replicas_replay_their_own_shards(copied: str) -> None:
    """Two data-parallel replicas (model copies in one process, each attached) replay their own shard of one
    rollout's routes (``split_routes``): exact; each other's shard: refused (the shards know their token ids)."""
    first = mr.models.build("softmax_topk", num_layers=2)
    x = _ids(4, 6)
    second = copy.deepcopy(first) if copied == "before-attach" else None
    _watch_experts(first)
    s1 = mr.attach(first)
    with _dispatched(first) as rec, s1.capture():
        first(x)
    want = _joined(rec)
    if second is None:
        second = copy.deepcopy(first)
    s2 = mr.attach(second)
    try:
        for m in (first, second):
            _perturb(m)
        shards = split_routes(s1.routes(), [12, 12])
        replicas = [(first, s1, x[:2]), (second, s2, x[2:])]
        for rank, (m, s, xs) in enumerate(replicas):
            with _dispatched(m) as got, s.replay(shards[rank]):
                m(xs).logits.sum().backward()
            for name, rows in _joined(got).items():
                assert torch.equal(rows[-12:], want[name][12 * rank : 12 * rank + 12]), f"rank {rank} at {name}"
        for rank, (m, s, xs) in enumerate(replicas):
            before = _state(m)
            with pytest.raises(mr.TokenMismatchError), s.replay(shards[1 - rank]):
                m(xs)
            _unchanged(m, before)
    finally:
        s1.detach()
        s2.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("order", ["as-laid-out", "micro-batches-swapped"])
def test_slices_and_joins_of_laid_out_routes_without_ids(order: str, sequences: tuple[Any, ...]) -> None:
    """Routes that know no token ids, laid out for a right-padded batch, then cut into its micro-batches
    (``routes[a:b]``) and joined with a capture's rows of one more sequence: replayed micro-batch by micro-batch in
    the layout's order, exact (the joined rows, not laid out, pass unchecked); the two micro-batches swapped
    (other lengths, so their attention masks show it): refused."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    blind = [r.with_token_ids(None) for r in per]
    layout = mr.BatchLayout.padded(LENGTHS[:4])
    laid = layout.routes(blind[:4])
    half = 2 * layout.row_length
    halves = [(laid[:half], [0, 1]), (laid[half:], [2, 3])]
    routes = mr.Routes.cat([*(r for r, _ in halves), blind[4]])
    if order == "micro-batches-swapped":  # (the routes as laid out, the micro-batches fed the other way round)
        halves.reverse()
    before = _state(model)
    try:
        with _dispatched(model) as rec, session.replay(routes):
            for _, idx in halves:
                mb = mr.BatchLayout.padded([LENGTHS[i] for i in idx], length=layout.row_length)
                model(mb.tokens([seqs[i] for i in idx]), attention_mask=mb.attention_mask())
            model(seqs[4][None], attention_mask=torch.ones(1, LENGTHS[4], dtype=torch.long))
    except mr.MoEReplayError:
        assert order == "micro-batches-swapped", "refused though exact"
        _unchanged(model, before)
        return
    assert order == "as-laid-out", "micro-batches swapped were forced on each other's tokens"
    for name, calls in rec.items():
        for got, (_, idx) in zip(calls, halves, strict=False):
            for j, i in enumerate(idx):
                assert torch.equal(got[j * layout.row_length + torch.arange(LENGTHS[i])], want[i][name])
        assert torch.equal(calls[-1], want[4][name])


@pytest.mark.reliability("silent replays")
def test_transformers_batches_of_routes_without_ids() -> None:
    """A tiny transformers Qwen3-MoE: per-sequence routes that know no token ids, laid out for a left-padded batch fed
    its mask and position_ids (as verl feeds it) and for remove-padding rows: exact; laid out right-padded, or packed
    in another order: refused by the mask and the positions the model is fed."""
    pytest.importorskip("transformers")
    from . import tiny_hf

    model = tiny_hf.build("qwen3_moe")
    _watch_experts(model)
    session = mr.attach(model)
    lengths = LENGTHS[:4]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 100, (n,), generator=g) for n in lengths]
    per, want = [], []
    for s in seqs:
        with _dispatched(model) as rec, session.capture():
            model(input_ids=s[None])
        per.append(session.routes().with_token_ids(None))
        want.append(_joined(rec))
    _perturb(model)
    left, packed = mr.BatchLayout.padded(lengths, side="left"), mr.BatchLayout.packed(lengths)
    mask = left.attention_mask()
    feeds = {
        "left": (left, dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))),
        "packed": (packed, dict(position_ids=packed.position_ids())),
    }
    try:
        for layout, kwargs in feeds.values():
            with _dispatched(model) as rec, session.replay(layout.routes(per)):
                model(input_ids=layout.tokens(seqs), **kwargs)
            for name, rows in _joined(rec).items():
                for i in range(len(seqs)):
                    assert torch.equal(rows[layout.flat_positions(i)], want[i][name]), f"sequence {i} at {name}"
        swapped = [per[i] for i in (1, 0, 2, 3)]
        wrong = {
            "left": mr.BatchLayout.padded(lengths).routes(per),
            "packed": mr.BatchLayout.packed([lengths[i] for i in (1, 0, 2, 3)]).routes(swapped),
        }
        for what, (layout, kwargs) in feeds.items():
            before = _state(model)
            with pytest.raises(mr.TokenMismatchError), session.replay(wrong[what]):
                model(input_ids=layout.tokens(seqs), **kwargs)
            _unchanged(model, before)
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_sequences_padded_with_rows_of_their_own_that_the_mask_marks_padding(sequences: tuple[Any, ...]) -> None:
    """Routes without ids, each sequence padded with -1 rows of its own to a response width (as verl's padded
    responses are, past their end), laid out right-padded and fed with a mask that marks those positions padding: the
    padding rows force nothing and every token gets its own row, so the replay runs and is exact; fed with the
    layout's sequences in another order it is still refused."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    width = max(LENGTHS[:4])
    padded = []
    for r in per[:4]:
        fill = mr.Routes(
            [torch.full((width - r.num_tokens, k), -1) for k in r.k_per_layer],
            names=r.names,
            num_experts=r.experts_per_layer,
        )
        padded.append(mr.Routes.cat([r.with_token_ids(None), fill]))
    layout = mr.BatchLayout.padded([width] * 4)
    tokens = mr.BatchLayout.padded(LENGTHS[:4])
    routes = layout.routes(padded)
    with _dispatched(model) as rec, session.replay(routes):
        model(tokens.tokens(seqs[:4]), attention_mask=tokens.attention_mask())
    for name, rows in _joined(rec).items():
        for i in range(4):
            assert torch.equal(rows[tokens.flat_positions(i)], want[i][name]), f"sequence {i} at {name}"
    shuffled = [3, 0, 2, 1]
    fed = mr.BatchLayout.padded([LENGTHS[i] for i in shuffled], length=width)
    before = _state(model)
    with pytest.raises(mr.TokenMismatchError), session.replay(routes):
        model(fed.tokens([seqs[i] for i in shuffled]), attention_mask=fed.attention_mask())
    _unchanged(model, before)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_ppo_epochs_with_micro_batches_shuffled_each_epoch(ids: str, sequences: tuple[Any, ...]) -> None:
    """Two PPO epochs over one rollout, its sequences shuffled into other micro-batches each epoch and an optimizer
    step after each: the routes laid out again for each epoch's micro-batches are exact every time; the first epoch's
    routes kept for the second epoch's shuffle are refused."""
    model, session, seqs, per, want, state = sequences
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs = [[[2, 0], [4, 1, 3]], [[1, 3, 4], [0, 2]]]
    kept: list[mr.Routes] = []
    for micro in epochs:
        layouts = [mr.BatchLayout.padded([LENGTHS[i] for i in mb]) for mb in micro]
        routes = mr.Routes.cat([lay.routes([source[i] for i in mb]) for lay, mb in zip(layouts, micro, strict=True)])
        kept.append(routes)
        with _dispatched(model) as rec, session.replay(routes):
            for lay, mb in zip(layouts, micro, strict=True):
                _forward(model, lay, "mask", [seqs[i] for i in mb])
        opt.step()
        opt.zero_grad()
        for name, calls in rec.items():
            for got, lay, mb in zip(calls, layouts, micro, strict=True):
                for j, i in enumerate(mb):
                    assert torch.equal(got[lay.flat_positions(j)], want[i][name]), f"sequence {i} at {name}"
    before = _state(model)
    with pytest.raises(mr.MoEReplayError), session.replay(kept[0]):
        for mb in epochs[1]:
            _forward(model, mr.BatchLayout.padded([LENGTHS[i] for i in mb]), "mask", [seqs[i] for i in mb])
    _unchanged(model, before)
    opt.zero_grad()
