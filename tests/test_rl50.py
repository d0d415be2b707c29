"""An RL trainer's routing-replay pipeline end to end, in the shapes verl, slime and OpenRLHF give it.

Rollout routes come from an engine's batch (verl's padded ``routed_experts`` with its mask and ids) or from the
trainer's own old-log-prob capture (R2), and are replayed in training forwards that the trainer builds its own way:
micro-batches regrouped by token count (verl's ``use_dynamic_bsz``) read per micro-batch from the batch's tensors,
remove-padding rows with restarting ``position_ids``, Ulysses sequence-parallel slices of those rows (verl pads them
to a multiple of the ranks with a dummy sequence), sequences balanced across data-parallel ranks, OpenRLHF's packed
mask of sequence numbers, a pipeline's 1F1B order under activation checkpointing, a token appended after the rollout,
routes of another model revision, prompts of one token, a batch of one sequence, EOS in the middle of a batch.

The experts every MoE layer dispatched are read by the test's own hooks on its experts modules; the router weights are
perturbed after the capture, so only a forced replay dispatches the captured experts again. Outcome: exact, or a
``MoEReplayError`` with the model's tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay.distributed import split_routes

from .test_workflow import _dispatched, _joined, _perturb, _state, _unchanged, _watch_experts

Oracle = dict[str, torch.Tensor]

PROMPTS = [3, 1, 4, 2, 1]  # (two prompts of one token)
RESPONSES = [4, 2, 1, 3, 4]
LENGTHS = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def _no_route(like: mr.Routes, n: int = 1) -> mr.Routes:
    """``n`` rows of -1 (route natively) for ``like``'s routers."""
    return mr.Routes(
        [torch.full((n, k), -1) for k in like.k_per_layer], names=like.names, num_experts=like.experts_per_layer
    )


@pytest.fixture(scope="module")
def rollout() -> Iterator[tuple[Any, ...]]:
    """Five sequences captured one per forward, the experts each token dispatched (the test's hooks), and the batch
    verl hands the trainer: ``routed_experts`` [batch, prompt_width + response_width, layers, k] (int16, zeros at
    padding and at the last token, which no engine routes), its attention mask and input ids; then a policy update."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(model)
    session = mr.attach(model)
    layer_map = mr.LayerMap.from_session(session, num_layers=3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 128, (n,), generator=g) for n in LENGTHS]
    per, want = [], []
    for s in seqs:
        with _dispatched(model) as rec, session.capture():
            model(s[None])
        per.append(session.routes())
        want.append(_joined(rec))
    engine = [mr.Routes.cat([r[:-1].with_token_ids(None), _no_route(r)]) for r in per]  # (the last token: no row)
    pw, rw = max(PROMPTS), max(RESPONSES)
    batch = mr.interop.to_verl(engine, layer_map, prompt_lengths=PROMPTS, prompt_width=pw, response_width=rw)
    batch = batch.clamp(min=0)  # (verl writes 0 where the engine returned no row)
    mask = torch.zeros(len(LENGTHS), pw + rw, dtype=torch.long)
    ids = torch.zeros_like(mask)
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True)):
        mask[i, pw - p : pw - p + n] = 1
        ids[i, pw - p : pw - p + n] = seqs[i]
    _perturb(model)
    yield model, session, layer_map, seqs, per, want, (batch, mask, ids), _state(model)
    session.detach()


def _outcome(
    model: torch.nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any]
) -> Oracle | None:
    """The experts dispatched by ``forward`` replaying ``routes``, or None where the replay was refused (then the
    model's tensors must be as they were)."""
    before = _state(model)
    try:
        with _dispatched(model) as rec, session.replay(routes):
            forward()
    except mr.MoEReplayError:
        _unchanged(model, before)
        assert session.state == "idle"
        return None
    return _joined(rec)


def _assert_exact(got: Oracle, layout: mr.BatchLayout, idx: list[int], want: list[Oracle], last: bool = True) -> None:
    """Each sequence ``idx[j]`` of ``layout`` dispatched its captured experts (``last=False``: but at its last token,
    which the engine did not route)."""
    for j, i in enumerate(idx):
        for name, rows in got.items():
            where = layout.flat_positions(j)
            cut = len(where) if last else len(where) - 1
            assert torch.equal(rows[where][:cut], want[i][name][:cut]), f"sequence {i} at {name}"


# ----------------------------------------------------------------------------- verl: dynamic batch size
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("feed", ["remove-padding", "padded-mask-and-positions"])
@pytest.mark.parametrize("ids", ["input_ids", "no-ids"])
def test_verl_dynamic_batch_micro_batches_read_from_the_batch_tensors(
    ids: str, feed: str, rollout: tuple[Any, ...]
) -> None:
    """verl's ``use_dynamic_bsz``: the batch's tensors (routed_experts, mask, input_ids) index-selected into
    micro-batches regrouped by token count, in another order than the rollout; each micro-batch's routes read with
    ``from_verl`` and laid out for its forward (remove-padding rows with restarting position_ids, or verl's padded
    rows fed mask and position_ids): exact. The rollout-order routes of the same sizes fed to a regrouped micro-batch:
    refused."""
    model, session, lm, seqs, _, want, (batch, mask, input_ids), state = rollout
    model.load_state_dict(state)
    for idx in ([1, 4], [3, 0, 2]):
        ix = torch.tensor(idx)
        mb_mask, mb_ids = mask[ix], input_ids[ix]
        parts = mr.interop.from_verl(batch[ix], mb_mask, lm, input_ids=mb_ids if ids == "input_ids" else None)
        lengths = [LENGTHS[i] for i in idx]
        if feed == "remove-padding":
            layout = mr.BatchLayout.packed(lengths)
            tokens = layout.tokens([seqs[i] for i in idx])

            def forward(layout: mr.BatchLayout = layout, tokens: torch.Tensor = tokens) -> None:
                model(tokens, position_ids=layout.position_ids()).logits.sum().backward()

        else:  # (prompts left-padded, responses right-padded, as the batch holds them)
            layout = mr.BatchLayout.split(
                [PROMPTS[i] for i in idx], lengths, prompt_width=max(PROMPTS), row_length=mask.shape[1]
            )
            positions = (mb_mask.cumsum(-1) - 1).clamp(min=0)

            def forward(m: torch.Tensor = mb_mask, x: torch.Tensor = mb_ids, p: torch.Tensor = positions) -> None:
                model(x, attention_mask=m, position_ids=p).logits.sum().backward()

        got = _outcome(model, session, layout.routes(parts), forward)
        assert got is not None, f"refused though exact: micro-batch {idx}"
        _assert_exact(got, layout, idx, want, last=False)
    # (the rollout's first sequences, as many as the regrouped micro-batch holds, read in the rollout's order)
    src = mr.interop.from_verl(batch[:2], mask[:2], lm, input_ids=input_ids[:2] if ids == "input_ids" else None)
    idx = [1, 0]  # (regrouped: 3 and 7 tokens where the routes hold 7 and 3; without ids the positions show it)
    layout = mr.BatchLayout.packed([LENGTHS[i] for i in idx])
    tokens = layout.tokens([seqs[i] for i in idx])
    wrong = mr.BatchLayout.packed([LENGTHS[i] for i in (0, 1)]).routes(src)
    if wrong.num_tokens != layout.rows * layout.row_length:
        pytest.fail("the test's wrong routes must fit the micro-batch's row count, to be refused by what they know")
    assert _outcome(model, session, wrong, lambda: model(tokens, position_ids=layout.position_ids())) is None


# ----------------------------------------------------------------------------- Ulysses sequence parallel
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_ulysses_ranks_replay_their_slices_of_remove_padding_rows(ids: str, rollout: tuple[Any, ...]) -> None:
    """Ulysses sequence parallel over remove-padding rows (verl's ``ulysses_pad_and_slice_inputs``): the packed
    tokens padded to a multiple of the ranks (the pad's position_ids restart at 0, a dummy sequence of its own, routed
    natively), each rank fed its slice of tokens and position_ids and replaying the same slice of the routes: exact,
    though a rank's slice starts inside a sequence; the other rank's slice of routes: refused."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    idx = [0, 1, 2, 3]  # (7 + 3 + 5 + 5 = 20 tokens: 4 pad tokens for 3 ranks)
    layout = mr.BatchLayout.packed([LENGTHS[i] for i in idx])
    n, ranks = layout.row_length, 3
    pad = -n % ranks
    tokens = torch.nn.functional.pad(layout.tokens([seqs[i] for i in idx]), (0, pad))
    positions = torch.cat([layout.position_ids(), torch.arange(pad)[None]], 1)
    routes = mr.Routes.cat([layout.routes([source[i] for i in idx]), _no_route(per[0], pad)])
    width = (n + pad) // ranks
    for rank in range(ranks):
        sl = slice(rank * width, (rank + 1) * width)
        got = _outcome(
            model, session, routes[sl], lambda sl=sl: model(tokens[:, sl], position_ids=positions[:, sl]).logits.sum()
        )
        assert got is not None, f"rank {rank}: refused though exact"
        for name, rows in got.items():
            full = torch.cat([want[i][name] for i in idx])
            real = min(width, n - rank * width)
            assert torch.equal(rows[:real], full[sl][:real]), f"rank {rank} at {name}"
    sl = slice(width, 2 * width)  # (rank 1's tokens, rank 0's rows: as many)
    other = _outcome(model, session, routes[:width], lambda: model(tokens[:, sl], position_ids=positions[:, sl]))
    assert other is None, "rank 1 was forced with rank 0's rows"


def _zigzag(lengths: list[int], rank: int, ranks: int) -> torch.Tensor:
    """The rows of packed sequences a context-parallel rank holds, Megatron's load-balanced split: each sequence cut
    into ``2 * ranks`` chunks, rank ``r`` taking chunks ``r`` and ``2 * ranks - 1 - r``."""
    out, at = [], 0
    for n in lengths:
        chunks = torch.arange(at, at + n).tensor_split(2 * ranks)
        out += [chunks[rank], chunks[2 * ranks - 1 - rank]]
        at += n
    return torch.cat(out)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_context_parallel_ranks_replay_their_chunks_of_each_sequence(ids: str, rollout: tuple[Any, ...]) -> None:
    """Context parallel with Megatron's load-balanced chunks: each rank holds two chunks of every sequence (the rows
    picked with ``routes[index]``), fed their tokens and their position_ids in their sequences: exact. Rank 0's rows
    on rank 1's chunks, or a rank's chunks fed as if they followed each other: refused. Once silent without token
    ids: the positions were only checked where two rows follow each other in a sequence, and the chunks of the two
    ranks restart nowhere inside each other."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    idx = [0, 2, 3]  # (7, 5 and 5 tokens)
    lengths = [LENGTHS[i] for i in idx]
    layout = mr.BatchLayout.packed(lengths)
    routes = layout.routes([source[i] for i in idx])
    tokens, positions = layout.tokens([seqs[i] for i in idx]), layout.position_ids()
    full = {name: torch.cat([want[i][name] for i in idx]) for name in want[0]}
    chunks = [_zigzag(lengths, rank, 2) for rank in range(2)]
    for rank, at in enumerate(chunks):
        got = _outcome(model, session, routes[at], lambda at=at: model(tokens[:, at], position_ids=positions[:, at]))
        assert got is not None, f"rank {rank}: refused though exact"
        for name, rows in got.items():
            assert torch.equal(rows, full[name][at]), f"rank {rank} at {name}"
    other = _outcome(
        model, session, routes[chunks[0]], lambda: model(tokens[:, chunks[1]], position_ids=positions[:, chunks[1]])
    )
    assert other is None, "rank 1's chunks were forced with rank 0's rows"
    run = torch.arange(len(chunks[0]))[None]  # (the chunks fed as one run of tokens)
    assert _outcome(model, session, routes[chunks[0]], lambda: model(tokens[:, chunks[0]], position_ids=run)) is None


# ----------------------------------------------------------------------------- R2 under dynamic batches, DP balance
@pytest.mark.reliability("false refusals")
def test_r2_capture_of_dynamic_micro_batches_balanced_across_ranks(rollout: tuple[Any, ...]) -> None:
    """R2: the old-log-prob forward over two remove-padding micro-batches regrouped by length, in one capture; each
    micro-batch's rows unpacked by its layout, put back in the rollout's order (verl's ``rev_idx``), reordered to
    balance tokens across two data-parallel ranks and cut into their shards (``split_routes``): each rank's training
    forward, packed or right-padded, is exact; a rank fed the other's sequences is refused."""
    model, session, _, seqs, _, _, _, state = rollout
    model.load_state_dict(state)
    micro = [[1, 4, 2], [0, 3]]
    layouts = [mr.BatchLayout.packed([LENGTHS[i] for i in mb]) for mb in micro]
    with _dispatched(model) as rec, session.capture(), torch.no_grad():
        for lay, mb in zip(layouts, micro, strict=True):
            model(lay.tokens([seqs[i] for i in mb]), position_ids=lay.position_ids())
    captured, seen = session.routes(), _joined(rec)
    per: dict[int, mr.Routes] = {}
    want: dict[int, Oracle] = {}
    at = 0
    for lay, mb in zip(layouts, micro, strict=True):
        rows = lay.rows * lay.row_length
        for j, (i, part) in enumerate(zip(mb, lay.unpack(captured[at : at + rows]), strict=True)):
            per[i] = part
            want[i] = {k: v[at : at + rows][lay.flat_positions(j)] for k, v in seen.items()}
        at += rows
    _perturb(model, seed=4)  # (the policy update between the old-log-prob forward and training)
    balanced = [3, 0, 4, 1, 2]  # (7 + 5 + 5 | 3 + 5 tokens)
    shards = split_routes(mr.Routes.cat([per[i] for i in balanced]), [17, 8])
    groups = [balanced[:3], balanced[3:]]
    wants = [want[i] for i in range(len(LENGTHS))]
    for rank, (shard, grp) in enumerate(zip(shards, groups, strict=True)):
        packed = mr.BatchLayout.packed([LENGTHS[i] for i in grp])
        x = packed.tokens([seqs[i] for i in grp])
        got = _outcome(model, session, shard, lambda p=packed, x=x: model(x, position_ids=p.position_ids()))
        assert got is not None, f"rank {rank}: refused though exact"
        _assert_exact(got, packed, grp, wants)
        padded = mr.BatchLayout.padded([LENGTHS[i] for i in grp])
        x = padded.tokens([seqs[i] for i in grp])
        got = _outcome(
            model,
            session,
            padded.routes(packed.unpack(shard)),
            lambda p=padded, x=x: model(x, attention_mask=p.attention_mask()).logits.sum().backward(),
        )
        assert got is not None, f"rank {rank} right-padded: refused though exact"
        _assert_exact(got, padded, grp, wants)
    x = mr.BatchLayout.packed([LENGTHS[i] for i in groups[1]])
    assert _outcome(model, session, shards[0], lambda: model(x.tokens([seqs[i] for i in groups[1]]))) is None


# ----------------------------------------------------------------------------- sequences changed after the rollout
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_a_token_appended_after_the_rollout(ids: str, rollout: tuple[Any, ...]) -> None:
    """The trainer appends a token (an EOS) to sequences the rollout ended without it: the rollout's routes as they
    are hold one row too few and are refused (alone, or laid out for the longer sequences); with a -1 row appended
    for the new token, each rollout token is forced to its experts and the new token is routed natively."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    longer = [torch.cat([seqs[i], torch.tensor([7])]) for i in (0, 1)]
    assert _outcome(model, session, source[0], lambda: model(longer[0][None])) is None
    layout = mr.BatchLayout.padded([len(t) for t in longer])
    with pytest.raises(mr.RoutesValidationError, match="one less"):
        layout.routes([source[0], source[1]])
    routes = layout.routes([mr.Routes.cat([source[i], _no_route(per[i])]) for i in (0, 1)])
    got = _outcome(model, session, routes, lambda: model(layout.tokens(longer), attention_mask=layout.attention_mask()))
    assert got is not None, "refused though exact"
    for j, i in enumerate((0, 1)):
        for name, rows in got.items():
            assert torch.equal(rows[layout.flat_positions(j)][:-1], want[i][name]), f"sequence {i} at {name}"


_REVISIONS = {
    "one-layer-more": dict(num_layers=4, first_dense_layers=1),
    "one-layer-less": dict(num_layers=2, first_dense_layers=1),
    "no-dense-layer": dict(num_layers=3),
    "more-experts": dict(num_layers=3, first_dense_layers=1, num_experts=16),
    "fewer-experts": dict(num_layers=3, first_dense_layers=1, num_experts=4),
    "k-3": dict(num_layers=3, first_dense_layers=1, top_k=3),
    "k-1": dict(num_layers=3, first_dense_layers=1, top_k=1),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("revision", list(_REVISIONS))
def test_routes_of_another_model_revision_are_refused(revision: str, rollout: tuple[Any, ...]) -> None:
    """A rollout of one model revision replayed on another (a layer more or less, a dense layer made MoE, other E,
    other k): the routes themselves, with or without token ids, are refused naming the routers; the engine's verl
    batch read with the new revision's LayerMap is refused where its shape or values cannot be the new model's."""
    _, _, lm, seqs, per, _, (batch, mask, input_ids), _ = rollout
    model = mr.models.build("softmax_topk", **_REVISIONS[revision])
    session = mr.attach(model)
    try:
        before = _state(model)
        for routes in (per[0], per[0].with_token_ids(None)):
            with pytest.raises(mr.MoEReplayError, match="router"), session.replay(routes):
                model(seqs[0][None])
            _unchanged(model, before)
        new_map = mr.LayerMap.from_session(session, num_layers=model.config.num_layers)
        if revision == "more-experts":  # (an engine's 8 experts are some of 16: nothing in the batch shows otherwise)
            return
        with pytest.raises(mr.MoEReplayError):
            mr.interop.from_verl(batch, mask, new_map, input_ids=input_ids)
    finally:
        session.detach()


# ----------------------------------------------------------------------------- OpenRLHF's packed mask
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_openrlhf_packed_mask_of_sequence_numbers(ids: str, rollout: tuple[Any, ...]) -> None:
    """OpenRLHF's packed samples: one row, an attention mask holding each sequence's number (1, 2, 3...) and
    position_ids restarting per sequence: exact; routes packed in another order on that batch: refused."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    source = per if ids == "token-ids" else [r.with_token_ids(None) for r in per]
    idx = [0, 1, 2]  # (7, 3 and 5 tokens)
    layout = mr.BatchLayout.packed([LENGTHS[i] for i in idx])
    numbers = torch.repeat_interleave(torch.arange(1, len(idx) + 1), torch.tensor([LENGTHS[i] for i in idx]))[None]
    x, positions = layout.tokens([seqs[i] for i in idx]), layout.position_ids()

    def forward() -> None:
        model(x, attention_mask=numbers, position_ids=positions).logits.sum().backward()

    got = _outcome(model, session, layout.routes([source[i] for i in idx]), forward)
    assert got is not None, "refused though exact"
    _assert_exact(got, layout, idx, want)
    other = [2, 0, 1]
    wrong = mr.BatchLayout.packed([LENGTHS[i] for i in other]).routes([source[i] for i in other])
    assert _outcome(model, session, wrong, forward) is None


# ----------------------------------------------------------------------------- pipeline order under checkpointing
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("order", ["1F1B-in-one-block", "backward-in-the-next-block", "backward-in-a-capture"])
def test_micro_batches_backward_out_of_order_under_checkpointing(checkpointing: str, order: str) -> None:
    """Micro-batches whose backward (and so the recompute of their routers) runs after later micro-batches' forwards:
    a pipeline's 1F1B order inside one replay block, a backward deferred into the next micro-batch's replay block, or
    into the capture of the next old-log-prob forward: every recompute dispatches its own forward's experts, and the
    capture records only its own forward."""
    model = mr.models.build("softmax_topk", num_layers=2, checkpointing=checkpointing)
    _watch_experts(model)
    session = mr.attach(model)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randint(1, 128, shape, generator=g) for shape in ((2, 5), (3, 4), (1, 6))]
    with _dispatched(model) as rec, session.capture(), torch.no_grad():
        for x in xs:
            model(x)
    routes, seen = session.routes(), _joined(rec)
    bounds = [0, 10, 22, 28]
    wants = [{k: v[bounds[i] : bounds[i + 1]] for k, v in seen.items()} for i in range(3)]
    _perturb(model)
    try:
        with _dispatched(model) as rec:
            if order == "1F1B-in-one-block":
                with session.replay(routes):
                    l0, l1 = model(xs[0]).logits.sum(), model(xs[1]).logits.sum()
                    l0.backward()
                    l2 = model(xs[2]).logits.sum()
                    l1.backward()
                    l2.backward()
                expected = [0, 1, 0, 2, 1, 2]
            elif order == "backward-in-the-next-block":
                with session.replay(routes[:10]):
                    l0 = model(xs[0]).logits.sum()
                with session.replay(routes[10:22]):
                    l1 = model(xs[1]).logits.sum()
                    l0.backward()
                l1.backward()
                expected = [0, 1, 0, 1]
            else:
                with session.replay(routes[:10]):
                    l0 = model(xs[0]).logits.sum()
                with session.capture():
                    with torch.no_grad():
                        model(xs[1])
                    l0.backward()
                assert session.routes().num_tokens == 12, "the recompute was recorded in the capture"
                expected = [0, None, 0]
        for name, calls in rec.items():
            assert len(calls) == len(expected), f"{name}: {len(calls)} calls"
            for got, i in zip(calls, expected, strict=True):
                if i is not None:
                    assert torch.equal(got, wants[i][name]), f"{name}: micro-batch {i} took other experts"
    finally:
        session.detach()


# ----------------------------------------------------------------------------- generation edge batches
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("case", ["prompts-of-one-token", "one-sequence", "one-sequence-of-one-token", "eos-mid-batch"])
def test_transformers_rollouts_of_edge_batches(case: str) -> None:
    """A tiny transformers Qwen3-MoE sampling a rollout (prompts of one token, a batch of one sequence, a sequence
    that stops at an EOS while the others go on and ``generate()`` feeds it padding), split with
    ``split_generation`` and replayed in one right-padded training forward with a backward: every token but the last
    of each sequence dispatches its rollout experts."""
    pytest.importorskip("transformers")
    from . import tiny_hf

    model = tiny_hf.build("qwen3_moe")
    _watch_experts(model)
    session = mr.attach(model)
    g = torch.Generator().manual_seed(1)
    shape = {"prompts-of-one-token": (2, 1), "one-sequence": (1, 4), "one-sequence-of-one-token": (1, 1)}
    prompt = torch.randint(1, 100, shape.get(case, (3, 3)), generator=g)
    mask = torch.ones_like(prompt)
    if case == "eos-mid-batch":
        mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])

    def generate(eos: int | None) -> torch.Tensor:
        torch.manual_seed(3)
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=eos
        )

    try:
        eos = None
        if case == "eos-mid-batch":
            eos = int(generate(None)[0, 5])  # (the second token sequence 0 samples: it stops there)
        with _dispatched(model) as rec, session.capture():
            out = generate(eos)
        parts = mr.split_generation(session.routes(), attention_mask=mask, sequences=out, eos_token_id=eos)
        if case == "eos-mid-batch":
            assert parts[0].num_tokens < int(mask[0].sum()) + 6 and out[0, -1] == 0, (
                "the test's EOS did not stop sequence 0 early"
            )
        b, p = prompt.shape
        tokens, want = [], []
        for i, part in enumerate(parts):
            tokens.append(torch.cat([prompt[i][mask[i].bool()], out[i, p:]])[: part.num_tokens])
            want.append(
                {
                    k: torch.cat([calls[0].reshape(b, p, -1)[i][mask[i].bool()], *(c[i : i + 1] for c in calls[1:])])
                    for k, calls in rec.items()
                }
            )
        _perturb(model, seed=7)
        layout = mr.BatchLayout.padded([len(t) for t in tokens])
        x, attn = layout.tokens(tokens), layout.attention_mask()
        got = _outcome(
            model,
            session,
            layout.routes(parts),
            lambda: model(input_ids=x, attention_mask=attn).logits.sum().backward(),
        )
        assert got is not None, f"refused though exact: {case}"
        _assert_exact(got, layout, list(range(b)), want, last=False)
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_ulysses_slice_of_one_sequence_fed_another_ranks_tokens_without_ids(rollout: tuple[Any, ...]) -> None:
    """One sequence of the rollout in two Ulysses slices, its routes laid out without token ids: rank 0's rows fed
    rank 1's tokens of the same sequence with their position_ids (no attention mask, no KV cache) are refused, as
    other sequences' rows are; each rank fed its own slice is exact. Once silent: the positions fed were compared by
    their steps only, and rank 1's run on from 4 as rank 0's rows do from 0."""
    model, session, _, seqs, per, want, _, state = rollout
    model.load_state_dict(state)
    layout = mr.BatchLayout.packed([LENGTHS[0]])
    routes = layout.routes([per[0].with_token_ids(None)])
    tokens, positions = layout.tokens([seqs[0]]), layout.position_ids()
    half = LENGTHS[0] // 2
    for own in (slice(0, half), slice(half, LENGTHS[0])):
        got = _outcome(model, session, routes[own], lambda s=own: model(tokens[:, s], position_ids=positions[:, s]))
        assert got is not None, "refused though exact"
        for name, rows in got.items():
            assert torch.equal(rows, want[0][name][own]), f"slice {own} at {name}"
    wrong = slice(LENGTHS[0] - half, LENGTHS[0])  # (rank 1's tokens, as many as rank 0's rows)
    assert (
        _outcome(model, session, routes[:half], lambda: model(tokens[:, wrong], position_ids=positions[:, wrong]))
        is None
    )
