"""Every engine reader's rows know their places in their sequence.

Each reader of ``mr.interop`` reads the rows of one sequence from its first token (row t: token t), so each row holds
place t, as a capture's rows hold the places their forward gave them. The routes read without token ids and sliced for
sequence- or context-parallel ranks without a :class:`~moe_replay.BatchLayout` are then compared by place with the
positions the training forward is fed: another rank's slice, or a rank's chunks fed as one run, is refused instead of
forced on the wrong tokens (a), the right slice at its own positions replays exactly (b), and left-padded or packed
batches fed their position_ids (or an attention mask) are not refused (c).

The payloads come from the fake engines of ``tests/interop/engines.py``; the oracle is the test's own hooks on each
experts module: every token whose row names experts dispatches exactly those. ``from_megatron`` (a micro-batch of
packed or ``[S, B]`` sequences whose boundaries the tensors do not hold) keeps no places, and is not read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr

from .interop import engines
from .test_workflow import _dispatched, _state, _unchanged, _watch_experts

ENGINE = engines.Model(num_layers=3, moe_layers=(1, 2), num_experts=8, k=2)  # (the policy's shape, as engines see it)

#: The engines' order of axes, told where the MoE-layer columns are as many as k (either order would fit).
AXES = "tokens,layers,k"

#: Every reader of one sequence, with a variant where the engine was asked to leave out the prompt's first tokens.
READERS = [
    "vllm_output",
    "vllm",
    "vllm_prompt_start",
    "vllm_legacy",
    "vllm_split",
    "sglang",
    "sglang_start_len",
    "nemo_rl",
    "megatron_inference",
    "verl",
]


@pytest.fixture(scope="module")
def policy() -> Iterator[tuple[Any, ...]]:
    """A three-layer policy (one dense layer), attached, its decisions established, and its LayerMap."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(model)
    session = mr.attach(model)
    session.verify(torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(9)))
    yield model, session, mr.LayerMap.from_session(session, num_layers=3), _state(model)
    session.detach()


def _read(reader: str, seq: torch.Tensor, prompt_len: int, lm: mr.LayerMap, seed: int) -> mr.Routes:
    """The routes ``reader`` reads from its engine's payload of ``seq`` (its first ``prompt_len`` tokens the
    prompt), written by the fake engine from experts of its own."""
    n = seq.numel()
    prompt, gen = seq[:prompt_len].tolist(), seq[prompt_len:].tolist()
    truth = ENGINE.truth(n, seed=seed)
    if reader == "vllm_output":
        return mr.interop.from_vllm_output(engines.vllm_033_request_output(ENGINE, prompt, [(gen, truth)]), lm)
    if reader in ("vllm", "vllm_prompt_start"):
        start = 2 if reader == "vllm_prompt_start" else 0
        arr = engines.vllm_033_routed_experts(ENGINE, truth, prompt_len, prompt_start=start)
        return mr.interop.from_vllm(arr, lm, prompt_len=prompt_len, completion_len=len(gen), prompt_start=start)
    if reader in ("vllm_legacy", "vllm_legacy_untold"):
        arr = engines.vllm_020_routed_experts(ENGINE, truth)
        return mr.interop.from_vllm_legacy(arr, lm, num_tokens=None if reader.endswith("untold") else n)
    if reader == "vllm_split":
        req = engines.vllm_021_request_output(ENGINE, prompt, [(gen, truth)])
        return mr.interop.from_vllm_split(
            req.prompt_routed_experts,
            req.outputs[0].routed_experts,
            lm,
            completion_len=len(gen),
            prompt_len=prompt_len,
            axes=AXES,
        )
    if reader in ("sglang", "sglang_start_len"):
        start = 2 if reader == "sglang_start_len" else 0
        meta = engines.sglang_meta_info(ENGINE, truth, start_len=start)
        return mr.interop.from_sglang(meta, lm, num_tokens=n, start_len=start)
    if reader == "nemo_rl":
        payload = engines.nemo_rl_envelope(engines.nemo_rl_routed_experts(ENGINE, truth, prompt_len))
        return mr.interop.from_nemo_rl(payload, lm, num_tokens=n)
    if reader == "megatron_inference":
        arr = engines.megatron_routing_indices(ENGINE, truth)
        return mr.interop.from_megatron_inference(arr, lm, num_tokens=n, axes=AXES)
    assert reader == "verl"
    rows = engines.vllm_033_routed_experts(ENGINE, truth, prompt_len)
    experts, mask = engines.verl_padded([rows], [prompt_len], prompt_width=prompt_len + 3, response_width=len(gen) + 2)
    (routes,) = mr.interop.from_verl(experts, mask, lm)
    return routes


def _refused(model: torch.nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any]) -> bool:
    """Whether replaying ``routes`` around ``forward`` is refused (leaving the model's tensors as they were)."""
    before = _state(model)
    try:
        with session.replay(routes), torch.no_grad():
            forward()
    except mr.MoEReplayError:
        _unchanged(model, before)
        assert session.state == "idle"
        return True
    return False


def _experts_name(router: str) -> str:
    return router.rsplit(".", 1)[0] + ".experts"


def _assert_exact(
    model: torch.nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any], where: torch.Tensor
) -> None:
    """Replaying ``routes`` around ``forward`` dispatches, at the flat token positions ``where`` (row i of the routes
    at ``where[i]``), exactly the experts each row names (rows of -1: routed natively), and forces something."""
    with _dispatched(model) as rec, session.replay(routes), torch.no_grad():
        forward()
    forced = False
    for name in routes.names:
        want = routes.layer(name).long()
        held = want[:, 0] >= 0
        forced |= bool(held.any())
        got = rec[_experts_name(name)][0][where]
        assert torch.equal(got[held], want[held]), f"{name}: not the engine's experts"
    assert forced, "the test forced nothing"


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_gives_its_rows_their_places(reader: str, policy: tuple[Any, ...]) -> None:
    """Row t of a reader's routes of one sequence is token t, so it holds place t (where the engine left out leading
    tokens too: their -1 rows keep their places); a slice keeps its rows' places."""
    _, _, lm, _ = policy
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(1))
    routes = _read(reader, seq, 8, lm, seed=3)
    assert routes.num_tokens == 12
    assert routes._seq_pos is not None and torch.equal(routes._seq_pos, torch.arange(12))
    assert torch.equal(routes.with_token_ids(None)[5:9]._seq_pos, torch.arange(5, 9))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("misuse", ["another-ranks-slice", "chunks-fed-as-a-run"])
@pytest.mark.parametrize("reader", READERS)
def test_a_readers_rows_sliced_for_a_rank_and_fed_at_other_places_are_refused(
    reader: str, misuse: str, policy: tuple[Any, ...]
) -> None:
    """Each reader's routes of one sequence, without ids, sliced for sequence-parallel ranks with ``routes[...]``:
    rank 0's rows fed rank 1's tokens at rank 1's positions, or zigzag chunks fed as if they followed each other,
    are refused, as the same rows laid out through ``mr.BatchLayout.packed`` are. Once silent for every reader but
    ``from_vllm_output``: their rows kept no place, so sliced without a layout they were forced with nothing
    compared."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(12))
    routes = _read(reader, seq, 8, lm, seed=90).with_token_ids(None)
    pos = torch.arange(12)[None]
    if misuse == "another-ranks-slice":
        rows, fed = routes[:6], slice(6, 12)
        forward = lambda: model(seq[None, fed], position_ids=pos[:, fed])  # noqa: E731
        laid = mr.BatchLayout.packed([12]).routes([routes])[:6]
    else:
        at = torch.cat([torch.arange(0, 3), torch.arange(9, 12)])
        rows = routes[at]
        forward = lambda: model(seq[None, at], position_ids=torch.arange(6)[None])  # noqa: E731
        laid = mr.BatchLayout.packed([12]).routes([routes])[at]
    assert bool((~rows.missing.all(dim=1)).any()), "the slice forces nothing"
    assert _refused(model, session, laid, forward), "laid out: refused (the test's misuse is one)"
    assert _refused(model, session, rows, forward), f"{reader}: rows forced at other places than they were routed"


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("rank", ["contiguous", "zigzag"])
@pytest.mark.parametrize("reader", READERS)
def test_a_readers_rows_sliced_for_a_rank_and_fed_at_their_places_replay_exactly(
    reader: str, rank: str, policy: tuple[Any, ...]
) -> None:
    """The right rank's slice, fed that rank's tokens at their own positions (rank 1's second half, or a
    load-balanced context-parallel rank's two chunks), forces every row on its own token."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(13))
    routes = _read(reader, seq, 8, lm, seed=91).with_token_ids(None)
    at = torch.arange(6, 12) if rank == "contiguous" else torch.cat([torch.arange(0, 3), torch.arange(9, 12)])
    _assert_exact(
        model, session, routes[at], lambda: model(seq[None, at], position_ids=at[None]), torch.arange(at.numel())
    )


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize(
    "batch", ["left-padded-mask", "left-padded-position-ids", "left-padded-cat", "packed", "packed-cat"]
)
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
@pytest.mark.parametrize("reader", READERS)
def test_a_readers_rows_in_a_padded_or_packed_batch_are_not_refused(
    reader: str, batch: str, ids: str, policy: tuple[Any, ...]
) -> None:
    """Two sequences of other lengths read by the same reader, laid out left-padded (fed the attention mask alone,
    or with the layout's position_ids; laid out by ``BatchLayout.padded``, or joined by hand with -1 rows at the
    padding) or packed in one row (fed position_ids that restart at each sequence; laid
    out by ``BatchLayout.packed``, or joined with ``Routes.cat``): every row is forced on its own token, the places
    the readers give their rows agreeing with the places the forward gives its tokens."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(14)
    seqs = [torch.randint(1, 128, (n,), generator=g) for n in (12, 9)]
    per = [_read(reader, s, p, lm, seed=92 + i) for i, (s, p) in enumerate(zip(seqs, (8, 5), strict=True))]
    per = [r.with_token_ids(s if ids == "token-ids" else None) for r, s in zip(per, seqs, strict=True)]
    lengths = [s.numel() for s in seqs]
    if batch.startswith("left-padded"):
        layout = mr.BatchLayout.padded(lengths, side="left")
        x, mask = layout.tokens(seqs), layout.attention_mask()
        if batch == "left-padded-mask":
            forward = lambda: model(x, attention_mask=mask)  # noqa: E731
        else:
            forward = lambda: model(x, attention_mask=mask, position_ids=layout.position_ids())  # noqa: E731
        pad = _no_route(per[1], lengths[0] - lengths[1])
        routes = layout.routes(per) if batch != "left-padded-cat" else mr.Routes.cat([per[0], pad, per[1]])
    else:
        layout = mr.BatchLayout.packed(lengths)
        x, pos = layout.tokens(seqs), layout.position_ids()
        forward = lambda: model(x, position_ids=pos)  # noqa: E731
        routes = layout.routes(per) if batch == "packed" else mr.Routes.cat(per)
    where = torch.cat([layout.flat_positions(i) for i in range(len(seqs))])
    with _dispatched(model) as rec, session.replay(routes), torch.no_grad():
        forward()
    for name in routes.names:
        want = torch.cat([r.layer(name) for r in per]).long()
        held = want[:, 0] >= 0
        assert held.any()
        assert torch.equal(rec[_experts_name(name)][0][where][held], want[held]), f"{reader} {batch}: {name}"


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
@pytest.mark.parametrize("reader", READERS)
def test_a_readers_rows_fed_in_chunks_over_a_kv_cache_replay_exactly_and_a_chunk_without_its_cache_is_refused(
    reader: str, ids: str, policy: tuple[Any, ...]
) -> None:
    """A sequence's rows replayed over two forwards, the prompt then the completion given the prompt's KV cache (a
    chunked prefill): the cache gives the second chunk places 8.., where its rows were routed, and every row is
    forced on its own token. The second chunk fed without the cache (at places 0..3, a suffix without its prefix) is
    refused."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    seq = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(15))
    routes = _read(reader, seq[0], 8, lm, seed=93)
    routes = routes.with_token_ids(seq[0] if ids == "token-ids" else None)
    with _dispatched(model) as rec, session.replay(routes), torch.no_grad():
        out = model(seq[:, :8], use_cache=True)
        model(seq[:, 8:], past_key_values=out.past_key_values, use_cache=True)
    for name in routes.names:
        want = routes.layer(name).long()
        held = want[:, 0] >= 0
        got = torch.cat([rec[_experts_name(name)][0], rec[_experts_name(name)][1]])
        assert torch.equal(got[held], want[held]), f"{reader}: {name}"

    def without_cache() -> None:
        model(seq[:, :8], use_cache=True)
        model(seq[:, 8:])

    assert _refused(model, session, routes, without_cache), f"{reader}: a chunk fed without its cache was forced"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("source", ["capture", "engine"])
def test_rows_fed_by_a_forward_of_their_tokens_alone_at_other_places_are_refused(
    source: str, policy: tuple[Any, ...]
) -> None:
    """Rows that know their places but not their ids (a capture's with ``with_token_ids(None)``, an engine reader's),
    sliced for rank 1 and fed rank 1's tokens alone (no position_ids, mask or cache: the model counts them from 0):
    refused, the tokens being at places 0.. and the rows at 6..; rank 0's slice fed its tokens alone, and the whole
    sequence with labels, replay exactly. Once silent: a forward fed no position_ids nor mask was compared with
    nothing."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    seq = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(16))
    if source == "capture":
        with session.capture(), torch.no_grad():
            model(seq)
        routes = session.routes().with_token_ids(None)
    else:
        routes = _read("sglang", seq[0], 8, lm, seed=94).with_token_ids(None)
    assert _refused(model, session, routes[6:], lambda: model(seq[:, 6:])), "rank 1's rows forced at places 0.."
    assert _refused(model, session, routes[6:], lambda: model(seq[:, 6:], labels=seq[:, 6:]))
    _assert_exact(model, session, routes[:6], lambda: model(seq[:, :6]), torch.arange(6))
    _assert_exact(model, session, routes, lambda: model(seq, labels=seq), torch.arange(12))


def test_a_reader_told_no_token_count_keeps_no_places(policy: tuple[Any, ...]) -> None:
    """Rows a reader placed by their row count alone (``from_vllm_legacy`` without ``num_tokens``): which token the
    first row is is not known (a row too many at the front shifts them all), so they keep no places, and a slice of
    them is checked by its row count alone, as the readers' docs say."""
    _, _, lm, _ = policy
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(1))
    assert _read("vllm_legacy_untold", seq, 8, lm, seed=3)._seq_pos is None


def _no_route(like: mr.Routes, n: int) -> mr.Routes:
    """``n`` rows of -1 (route natively) for ``like``'s routers."""
    return mr.Routes(
        [torch.full((n, k), -1) for k in like.k_per_layer], names=like.names, num_experts=like.experts_per_layer
    )


def test_the_engine_payloads_hold_their_tokens_experts(policy: tuple[Any, ...]) -> None:
    """The test's readers read the fake engines' experts at their tokens (so the oracle above compares with them)."""
    _, _, lm, _ = policy
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(1))
    truth = ENGINE.truth(12, seed=3)
    for reader in READERS:
        routes = _read(reader, seq, 8, lm, seed=3)
        for j, name in enumerate(lm.names):
            rows = routes.layer(name).numpy()
            held = rows[:, 0] >= 0
            assert held.sum() >= 8, reader
            np.testing.assert_array_equal(rows[held], truth[held, j], err_msg=reader)
