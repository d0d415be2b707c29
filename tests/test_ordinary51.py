"""Ordinary workflows replay exactly, with no refusal, beside round 51's new refusals.

Each test runs what users run on tiny models (transformers' MoE families, ``moe_replay.models``, small modules with
a floating input beside the hidden states): capture, then replay, and checks that the experts forced are those
recorded (after the routers were moved, so that free routing would differ) and that the outputs equal the capture's
where nothing was changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .conftest import perturb_routers
from .test_gaps57 import _Transposing

B, P, N = 3, 5, 4


def _hf(family: str = "qwen3_moe") -> nn.Module:
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    return tiny_hf.build(family)


def _left_padded(seed: int = 3, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :1] = 0
    return torch.randint(3, vocab, (B, P), generator=g).masked_fill(mask == 0, 0), mask


def _recorded(routes: mr.Routes) -> torch.Tensor:
    """The rows of ``routes`` that name experts (a -1 row is a token no forward routed)."""
    return ~routes.missing.all(dim=1)


def _assert_forced(want: list[mr.Routes], got: list[mr.Routes]) -> None:
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        kept = _recorded(w)
        assert int(kept.sum()) > 0
        assert torch.equal(g.indices[kept], w.indices[kept]), f"sequence {i}"


def _teacher_forced(session: mr.Session, model: nn.Module, seqs: list[mr.Routes], tokens: list[torch.Tensor]) -> None:
    """Replay per-sequence routes in a right-padded, a left-padded and a packed batch after the routers moved (free
    routing differs from them there, else forcing them proves nothing); each must force them."""
    perturb_routers(session, scale=2.0)
    lengths = [len(t) for t in tokens]
    layouts = {
        "right": mr.BatchLayout.padded(lengths),
        "left": mr.BatchLayout.padded(lengths, side="left"),
        "packed": mr.BatchLayout.packed(lengths),
    }
    for kind, layout in layouts.items():
        kw: dict[str, Any] = {"position_ids": layout.position_ids()}
        if kind == "packed":
            kw["use_cache"] = False
        else:
            kw["attention_mask"] = layout.attention_mask()
        with torch.no_grad(), session.capture():
            model(layout.tokens(tokens), **kw)
        assert mr.compare(mr.Routes.cat(seqs), mr.Routes.cat(layout.unpack(session.routes()))).overall > 0.05, kind
        with torch.no_grad(), session.replay(layout.routes(seqs)), session.capture():
            model(layout.tokens(tokens), **kw)
        _assert_forced(seqs, layout.unpack(session.routes()))


def _drifts(session: mr.Session, model: nn.Module, run: Callable[[], Any], want: mr.Routes) -> None:
    """Move the routers so that free routing differs from ``want`` (else forcing it proves nothing)."""
    perturb_routers(session, scale=2.0)
    with torch.no_grad(), session.capture():
        run()
    assert mr.compare(want, session.routes()).overall > 0.05, "free routing did not move"


# ----------------------------------------------------------------------------- generation
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_left_padding_then_teacher_forced_replay(cache: str) -> None:
    """generate() over left-padded prompts (a dynamic or a static cache), split per sequence, replayed teacher-forced
    in padded and packed batches after the routers moved; the static cache's generate() replayed through generate()
    gives the same tokens."""
    model = _hf()
    prompt, mask = _left_padded()
    kw: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            seq = model.generate(prompt, **kw)
        captured = session.routes()
        with torch.no_grad(), session.replay(captured), session.capture():
            again = model.generate(prompt, **kw)
        assert torch.equal(again, seq)
        assert torch.equal(session.routes().indices, captured.indices)
        seqs = mr.split_generation(captured, attention_mask=mask, sequences=seq)
        tokens = [torch.cat([prompt[i][mask[i].bool()], seq[i, P:]]) for i in range(B)]
        _teacher_forced(session, model, seqs, tokens)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_chunked_prefill_replays_a_whole_forward_capture(cache: str) -> None:
    """One forward of 12 tokens captured, replayed as three chunks of 4 through a KV cache: the same experts and
    the same logits."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    transformers = pytest.importorskip("transformers")
    model = tiny_hf.build("qwen3_moe")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    name = tiny_hf.cache_kwarg(model)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            full = model(ids).logits
        captured = session.routes()
        store = (
            transformers.DynamicCache()
            if cache == "dynamic"
            else transformers.StaticCache(config=model.config, max_cache_len=16)
        )
        outs = []
        with torch.no_grad(), session.replay(captured), session.capture():
            for a in range(0, 12, 4):
                out = model(ids[:, a : a + 4], **{name: store}, use_cache=True, cache_position=torch.arange(a, a + 4))
                store = out.past_key_values
                outs.append(out.logits)
        assert torch.equal(session.routes().indices, captured.indices)
        torch.testing.assert_close(torch.cat(outs, 1), full)


@pytest.mark.reliability("false refusals")
def test_beam_search_capture_then_teacher_forced_replay_of_its_best_beam() -> None:
    """A beam search is captured (nothing refused); its best beams, fed again as a batch, are captured and replayed
    after the routers moved: the recorded experts are forced."""
    model = _hf()
    prompt, mask = _left_padded()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            seq = model.generate(prompt, attention_mask=mask, max_new_tokens=N, num_beams=2, pad_token_id=0)
        assert session.routes().num_tokens > 0
        full = torch.cat([mask, torch.ones(B, seq.shape[1] - P, dtype=torch.long)], 1)
        with torch.no_grad(), session.capture():
            model(seq, attention_mask=full)
        captured = session.routes()
        _drifts(session, model, lambda: model(seq, attention_mask=full), captured)
        with torch.no_grad(), session.replay(captured), session.capture():
            model(seq, attention_mask=full)
        assert torch.equal(session.routes().indices[_recorded(captured)], captured.indices[_recorded(captured)])


# ----------------------------------------------------------------------------- batches
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_varied_lengths_with_a_mask_and_packed_sequences_replay_exactly(family: str) -> None:
    """Sequences of 5, 3 and 7 tokens: a right-padded batch with its attention mask, and one packed row (positions
    restarting, no mask). Replayed on the same weights the outputs equal the capture's; after the routers moved the
    recorded experts are forced, also laid out the other way."""
    model = _hf(family)
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(3, 128, (n,), generator=g) for n in (5, 3, 7)]
    padded, packed = mr.BatchLayout.padded([5, 3, 7]), mr.BatchLayout.packed([5, 3, 7])
    feeds = {
        "padded": (padded, {"attention_mask": padded.attention_mask()}),
        "packed": (packed, {"position_ids": packed.position_ids()}),
    }
    with mr.attach(model) as session:
        per: dict[str, list[mr.Routes]] = {}
        for kind, (layout, kw) in feeds.items():
            ids = layout.tokens(tokens)
            with torch.no_grad(), session.capture():
                first = model(ids, **kw).logits
            captured = session.routes()
            with torch.no_grad(), session.replay(captured), session.capture():
                second = model(ids, **kw).logits
            assert torch.equal(second, first), kind
            assert torch.equal(session.routes().indices, captured.indices), kind
            per[kind] = layout.unpack(captured)
        perturb_routers(session, scale=2.0)
        for (layout, kw), other in zip(feeds.values(), ("packed", "padded"), strict=True):
            with torch.no_grad(), session.replay(layout.routes(per[other])), session.capture():
                model(layout.tokens(tokens), **kw)
            _assert_forced(per[other], layout.unpack(session.routes()))


@pytest.mark.reliability("false refusals")
def test_ranks_replay_their_slices_of_the_routes() -> None:
    """A batch of 4 sequences captured once; each of two data-parallel ranks replays ``routes[a:b]`` over its two
    sequences: the outputs equal the whole batch's, and after the routers moved the slice is still forced."""
    model = _hf()
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(4))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            full = model(ids).logits
        captured = session.routes()
        for moved in (False, True):
            if moved:
                _drifts(session, model, lambda: model(ids), captured)
            for rank in range(2):
                part = captured[rank * 12 : (rank + 1) * 12]
                with torch.no_grad(), session.replay(part), session.capture():
                    out = model(ids[rank * 2 : (rank + 1) * 2]).logits
                assert torch.equal(session.routes().indices, part.indices)
                if not moved:
                    torch.testing.assert_close(out, full[rank * 2 : (rank + 1) * 2])


# ----------------------------------------------------------------------------- losses and training
def _kept_losses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, kw: dict[str, Any]) -> list[float]:
    """The load-balancing loss of a replay, from kept probabilities with the kept indices (the reference) and with
    the indices of the routes replayed (``routes.indices`` split per router, and ``routes.layer(name)``)."""
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(ids, **kw)
        routes = session.routes()
        perturb_routers(session, scale=2.0)
        with session.replay(routes), session.keep_scores() as kept:
            model(ids, **kw)
        probs = [s.softmax(-1) for s in kept.scores]
        given = {} if mask is None else {"mask": mask}
        out = [mr.load_balancing_loss(probs, kept.indices, **given)]
        out.append(mr.load_balancing_loss(probs, list(routes.indices.unbind(1)), **given))
        out.append(mr.load_balancing_loss(probs, [routes.layer(n) for n in routes.names], **given))
        if mask is not None:  # (the mask read row by row, in the order of the batch: last)
            out.append(mr.load_balancing_loss(probs, kept.indices, mask=mask.reshape(-1)))
        out[0].backward()  # (the gradient flows to the routers)
        assert all(s.module.weight.grad is not None for s in session.sites)
        return [float(x.detach()) for x in out]


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("model_kind", ["batch-major", "sequence-first"])
def test_load_balancing_loss_of_kept_scores_with_the_routes_indices_and_an_attention_mask(model_kind: str) -> None:
    """Probabilities made from kept scores, indices from the routes replayed and the batch's ``[batch, positions]``
    attention mask: the mask is put in the order of the kept rows, as with the kept indices (refused before as rows
    whose order was not known). On routers that see the batch sequence-first the mask read row by row would give
    another loss: it must equal the kept indices' one."""
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    if model_kind == "batch-major":
        model, ids = _hf(), torch.randint(3, 128, (3, 7), generator=g)
        kw: dict[str, Any] = {"attention_mask": mask}
    else:
        model, ids = _Transposing(), torch.randint(3, 128, (3, 7), generator=g)
        kw = {"position_ids": torch.arange(7).expand(3, 7)}
    reference, *given, row_by_row = _kept_losses(model, ids, mask, kw)
    for x in given:
        assert x == pytest.approx(reference, abs=1e-6)
    # (read row by row the mask weighs other tokens where the routers see the batch sequence-first: the check above
    # tells the two orders apart)
    assert (row_by_row == pytest.approx(reference, abs=1e-6)) == (model_kind == "batch-major")


@pytest.mark.reliability("false refusals")
def test_a_trl_style_step_replays_the_rollout_over_prompt_and_completion() -> None:
    """Two steps of a GRPO-like loop without the trainer: generate() from left-padded prompts (captured, sampling),
    completions cut at their own lengths, per-sequence routes, a ``[prompt | completion]`` batch laid out by
    ``BatchLayout.split``, replayed in train mode with kept scores, an aux loss with the attention mask, backward and
    an optimiser step that moves the routers before the second rollout. Every recorded expert is forced."""
    pytest.importorskip("trl")  # (the integration needs TRL, a test extra)
    from moe_replay.integrations.trl import rollout_routes_from_generate

    model = _hf()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 5, 4)]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    att = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], att[i, width - len(p) :] = torch.tensor(p), 1
    with mr.attach(model) as session:
        for step in range(2):
            model.eval()
            torch.manual_seed(step)
            with torch.no_grad(), session.capture():
                out = model.generate(ids, attention_mask=att, max_new_tokens=N, do_sample=True, top_k=0, pad_token_id=0)
            comps = [out[i, width:].tolist()[:k] for i, k in enumerate((4, 2, 3))]
            seqs = rollout_routes_from_generate(session.routes(), prompts, comps)
            c = max(map(len, comps))
            layout = mr.BatchLayout.split(
                [len(p) for p in prompts], [len(p) + len(x) for p, x in zip(prompts, comps, strict=True)],
                prompt_width=width, row_length=width + c,
            )  # fmt: skip
            batch = layout.tokens([torch.tensor(p + x) for p, x in zip(prompts, comps, strict=True)])
            model.train()
            with session.replay(layout.routes(seqs)), session.capture(), session.keep_scores() as kept:
                logits = model(batch, attention_mask=layout.attention_mask(), logits_to_keep=c + 1).logits
            _assert_forced(seqs, layout.unpack(session.routes()))
            probs = [s.softmax(-1) for s in kept.scores]
            aux = mr.load_balancing_loss(probs, kept.indices, mask=layout.attention_mask())
            (logits.float().logsumexp(-1).mean() + aux).backward()
            opt.step()
            opt.zero_grad()


# ----------------------------------------------------------------------------- moe_replay.models (list caches)
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("style", ["softmax_topk", "grouped_sigmoid", "top1_argmax"])
def test_reference_model_generate_chunked_prefill_and_rows_from_arrays(style: str) -> None:
    """``moe_replay.models`` keeps its KV cache in Python lists: generate() replayed through generate(), a prefill
    in two chunks through that cache, and per-sequence rows rebuilt from arrays (as an engine hands them) replayed
    teacher-forced in a packed batch in train mode and per rank, one sequence each, after the routers moved."""
    model = mr.models.build(style, seed=1)
    prompt, mask = _left_padded(vocab=model.config.vocab_size)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            seq = model.generate(prompt, max_new_tokens=N, attention_mask=mask)
        captured = session.routes()
        with torch.no_grad(), session.replay(captured), session.capture():
            assert torch.equal(model.generate(prompt, max_new_tokens=N, attention_mask=mask), seq)
        assert torch.equal(session.routes().indices, captured.indices)
        ids = seq[1:2, :8]
        with torch.no_grad(), session.capture():
            whole = model(ids).logits
        one = session.routes()
        with torch.no_grad(), session.replay(one), session.capture():
            head = model(ids[:, :3], use_cache=True)
            tail = model(ids[:, 3:], past_key_values=head.past_key_values, use_cache=True)
        assert torch.equal(session.routes().indices, one.indices)
        torch.testing.assert_close(torch.cat([head.logits, tail.logits], 1), whole)
        seqs = mr.split_generation(captured, attention_mask=mask, sequences=seq)
        bare = [mr.Routes.from_numpy(s.to_numpy(), names=s.names, num_experts=s.experts_per_layer) for s in seqs]
        tokens = [torch.cat([prompt[i][mask[i].bool()], seq[i, P:]]) for i in range(B)]
        _teacher_forced(session, model, bare, tokens)
        layout = mr.BatchLayout.packed([len(t) for t in tokens])
        model.train()
        with session.replay(layout.routes(bare)), session.capture():
            model(layout.tokens(tokens), position_ids=layout.position_ids()).logits.sum().backward()
        model.eval()
        _assert_forced(bare, layout.unpack(session.routes()))
        for rows, toks in zip(bare, tokens, strict=True):
            alone = mr.BatchLayout.packed([len(toks)])
            with torch.no_grad(), session.replay(alone.routes([rows])), session.capture():
                model(toks[None])
            _assert_forced([rows], [session.routes()])


# ----------------------------------------------------------------------------- a floating input beside the states
D, E, K = 16, 8, 2


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, D, D) * 0.2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return sum(wt[:, k : k + 1] * torch.einsum("td,tde->te", x, self.w[idx[:, k]]) for k in range(idx.shape[1]))


def _route(gate: nn.Linear, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, i = torch.topk(gate(h).softmax(-1), K, dim=-1)
    return w / w.sum(-1, keepdim=True), i


class _Weighted(nn.Module):
    """An MoE block given a weight per token beside its hidden states (a loss weight, a 0/1 keep mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.experts = nn.Linear(D, E, bias=False), _Experts()

    def forward(self, h: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, D)
        w, i = _route(self.gate, x)
        return h + (self.experts(x, i, w) * token_weight.reshape(-1, 1)).reshape(h.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


class _RopeLayer(nn.Module):
    """A decoder layer that holds its gate itself (the decision's scope is the layer), fed ``(cos, sin)``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.gate, self.experts = nn.Linear(D, E, bias=False), _Experts()

    def forward(self, h: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = position_embeddings
        q, k = _rotate(self.q(h), cos, sin), _rotate(self.k(h), cos, sin)
        h = h + F.scaled_dot_product_attention(q, k, self.v(h), is_causal=True)
        x = h.reshape(-1, D)
        w, i = _route(self.gate, x)
        return h + self.experts(x, i, w).reshape(h.shape)


class _DiTBlock(nn.Module):
    """A DiT-like MoE block: its gate reads states modulated by the timestep embedding (adaLN)."""

    def __init__(self) -> None:
        super().__init__()
        self.ada, self.gate, self.experts = nn.Linear(D, 2 * D), nn.Linear(D, E, bias=False), _Experts()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(temb)).chunk(2, -1)
        h = F.layer_norm(x, (D,)) * (1 + scale[:, None]) + shift[:, None]
        w, i = _route(self.gate, h.reshape(-1, D))
        return x + self.experts(h.reshape(-1, D), i, w).reshape(x.shape)


def _timestep_embedding(t: torch.Tensor) -> torch.Tensor:
    f = torch.exp(-torch.arange(D // 2) / (D // 2) * 4.0)
    a = t[:, None].float() * f[None]
    return torch.cat([a.cos(), a.sin()], -1)


class _Stack(nn.Module):
    """Two layers of one kind behind an input of their own: token ids, or a DiT's patches and timesteps."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp: nn.Module = nn.Linear(4, D) if kind == "dit" else nn.Embedding(50, D)
        layer = {"weighted": _Weighted, "rope": _RopeLayer, "dit": _DiTBlock}[kind]
        self.layers = nn.ModuleList(layer() for _ in range(2))

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        side: Any = extra
        if self.kind == "rope":
            f = extra[..., None].float() / (10000 ** (torch.arange(D // 2) / (D // 2)))
            side = (torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin())
        elif self.kind == "dit":
            side = _timestep_embedding(extra)
        for layer in self.layers:
            h = layer(h, side)
        return h


def _side_inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    if kind == "dit":
        return torch.randn(2, 5, 4, generator=g), torch.tensor([10, 500])
    ids = torch.randint(0, 50, (2, 6), generator=g)
    if kind == "rope":
        return ids, torch.arange(6).expand(2, 6)
    return ids, (torch.rand(2, 6, generator=g) > 0.3).float() * torch.rand(2, 6, generator=g)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("kind", ["weighted", "rope", "dit"])
def test_a_floating_input_beside_the_hidden_states_replays_exactly(kind: str) -> None:
    """A weight per token, ``(cos, sin)`` handed to a decoder layer that is the decision's scope, a timestep
    embedding modulating a DiT block's states: attach finds one router per layer, the replay on the same weights
    gives the capture's outputs, and after the routers moved (training mode, gradients on) it forces the recorded
    experts."""
    torch.manual_seed(0)
    model = _Stack(kind)
    x, extra = _side_inputs(kind)
    with mr.attach(model) as session:
        assert len(session.names) == 2
        with torch.no_grad(), session.capture():
            first = model(x, extra)
        captured = session.routes()
        with torch.no_grad(), session.replay(captured), session.capture():
            assert torch.equal(model(x, extra), first)
        assert torch.equal(session.routes().indices, captured.indices)
        _drifts(session, model, lambda: model(x, extra), captured)
        model.train()
        with session.replay(captured), session.capture():
            model(x, extra).sum().backward()
        assert torch.equal(session.routes().indices, captured.indices)


# ----------------------------------------------------------------------------- a [positions, batch] forward
@pytest.mark.reliability("false refusals")
def test_in_token_order_of_a_positions_first_forward_keeps_each_sequence_whole() -> None:
    """A model fed ``[positions, batch]`` ids (as ``nn.Transformer`` takes them) whose layers run batch-major: its
    routers see sequence 0, then sequence 1. ``in_token_order()`` must hold the rows sequence by sequence (their
    token ids those of each column of the ids), and a data-parallel rank fed one sequence replays its slice of them
    after the routers moved."""
    from .test_review57 import _SequenceFirst

    torch.manual_seed(0)
    model = _SequenceFirst()
    ids = torch.randint(1, 128, (6, 2), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(6)[:, None].expand(6, 2)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(ids, position_ids=pos)
        ordered = session.routes().in_token_order()
        assert ordered.token_ids is not None
        assert torch.equal(ordered.token_ids.long(), ids.t().reshape(-1))
        perturb_routers(session, scale=2.0)
        for b in range(2):
            part = ordered[b * 6 : (b + 1) * 6]
            with torch.no_grad(), session.replay(part), session.capture():
                model(ids[:, b : b + 1], position_ids=pos[:, b : b + 1])
            assert torch.equal(session.routes().indices, part.indices), b
