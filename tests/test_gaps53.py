"""Round 53's gaps: static KV caches a model keeps in its modules (gpt-fast's ``KVCache`` buffers written at
``input_pos``, Meta's Llama reference ``cache_k``/``cache_v`` written from ``start_pos``, torchtune's ``KVCache``
written at its own ``cache_pos``), whose continuations fed their positions were refused as if nothing held the
tokens before them; and long-standing known gaps closed.

The small models here rebuild the forms of:

- pytorch-labs/gpt-fast ``mixtral-moe/model.py``: ``KVCache`` registers ``k_cache``/``v_cache`` buffers
  ``[batch, heads, max_seq_length, head_dim]`` of zeros, ``update(input_pos, k, v)`` writes them at ``input_pos``;
  the forward takes ``(idx, input_pos)``;
- meta-llama/llama ``llama/model.py``: ``Attention`` holds ``cache_k``/``cache_v`` tensors (plain attributes,
  ``[max_batch, max_seq_len, heads, head_dim]`` of zeros) written at ``start_pos:start_pos + seqlen``;
- pytorch/torchtune ``torchtune/modules/kv_cache.py``: ``KVCache`` registers ``k_cache``/``v_cache`` and a
  ``cache_pos`` buffer (an arange), writes at ``cache_pos[:seq_len]`` and moves ``cache_pos`` on.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from moe_replay.models import MoEBlock, MoEConfig

from .test_review51 import _outcome
from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_MAX = 32


class _GptFastCache(nn.Module):
    """gpt-fast's ``KVCache``: buffers written at the positions the forward is given."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, _MAX, head_dim))
        self.register_buffer("v_cache", torch.zeros(1, heads, _MAX, head_dim))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both caches, written at ``input_pos``."""
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class _TorchtuneCache(nn.Module):
    """torchtune's ``KVCache``: buffers written at its own ``cache_pos``, which moves on by the tokens written."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, _MAX, head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, _MAX, head_dim), persistent=False)
        self.register_buffer("cache_pos", torch.arange(_MAX), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both caches, written at the next ``k.shape[2]`` places of ``cache_pos``."""
        n = k.shape[2]
        self.k_cache[:, :, self.cache_pos[:n]] = k
        self.v_cache[:, :, self.cache_pos[:n]] = v
        self.cache_pos.add_(n)
        return self.k_cache, self.v_cache


class _StaticAttention(nn.Module):
    """Causal attention over a static cache of ``style``: "gpt-fast", "llama" or "torchtune"; "tables": none, a
    rotary table and an additive causal mask kept in buffers instead."""

    def __init__(self, hidden: int, heads: int, style: str) -> None:
        super().__init__()
        self.heads, self.style = heads, style
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        d = hidden // heads
        if style == "gpt-fast":
            self.kv_cache: nn.Module = _GptFastCache(heads, d)
        elif style == "torchtune":
            self.kv_cache = _TorchtuneCache(heads, d)
        elif style == "llama":  # (Meta's reference keeps plain tensors, [batch, positions, heads, head_dim])
            self.cache_k = torch.zeros(1, _MAX, heads, d)
            self.cache_v = torch.zeros(1, _MAX, heads, d)
        else:  # (no cache: a rotary table and an additive causal mask kept in buffers, never written)
            angles = torch.arange(_MAX, dtype=torch.float)[:, None] * 0.1 ** torch.arange(d // 2, dtype=torch.float)
            self.register_buffer("freqs", torch.stack([angles.cos(), angles.sin()], -1))
            self.register_buffer("bias", torch.full((_MAX, _MAX), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The attention's output; ``pos``: the tokens' positions ``[positions]``."""
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.style == "gpt-fast":
            keys, values = self.kv_cache.update(pos, k, v)  # type: ignore[operator]
        elif self.style == "torchtune":
            keys, values = self.kv_cache.update(k, v)  # type: ignore[operator]
        elif self.style == "llama":
            self.cache_k[:b, start_pos : start_pos + s] = k.transpose(1, 2)
            self.cache_v[:b, start_pos : start_pos + s] = v.transpose(1, 2)
            keys, values = self.cache_k[:b].transpose(1, 2), self.cache_v[:b].transpose(1, 2)
        else:
            turn = self.freqs[pos, 0, 0][None, None, :, None]
            q, k = q * turn.cos(), k * turn.cos()
            bias = self.bias[pos][:, pos]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, None])
            return self.o_proj(out.transpose(1, 2).reshape(b, s, h))
        mask = torch.arange(_MAX)[None, :] <= pos[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class _StaticLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, style: str) -> None:
        super().__init__()
        self.attn = _StaticAttention(cfg.hidden_size, cfg.num_heads, style)
        self.mlp = MoEBlock(cfg)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        x = x + self.attn(x, pos, start_pos)
        return x + self.mlp(x)


class _StaticModel(nn.Module):
    """A small MoE decoder keeping a static KV cache of ``style`` in its attention modules, fed its tokens' positions
    (and, for Meta's form, the count of tokens before them, ``start_pos``)."""

    def __init__(self, style: str, layers: int = 2) -> None:
        super().__init__()
        cfg = MoEConfig(hidden_size=32, num_heads=4, num_experts=8, top_k=2, expert_size=16, vocab_size=128)
        self.style = style
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(_MAX, cfg.hidden_size)
        self.layers = nn.ModuleList(_StaticLayer(cfg, style) for _ in range(layers))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def run(self, input_ids: torch.Tensor, pos: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Logits of ``input_ids`` at positions ``pos`` (``[positions]`` or ``[1, positions]``)."""
        flat = pos.reshape(-1)
        x = self.embed(input_ids) + self.pos(flat)[None]
        for layer in self.layers:
            x = layer(x, flat, start_pos)
        return self.lm_head(x)


def _static_model(style: str, name: str) -> _StaticModel:
    """A :class:`_StaticModel` whose forward takes the positions under ``name`` (``position_ids``, or gpt-fast's and
    torchtune's ``input_pos``), and Meta's ``start_pos`` after them."""

    class _Named(_StaticModel):
        def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            pos = args[0] if args else kwargs[name]
            start = args[1] if len(args) > 1 else kwargs.get("start_pos", 0)
            return self.run(input_ids, pos, start)

    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("self", "input_ids", name)]
    params.append(P("start_pos", P.POSITIONAL_OR_KEYWORD, default=0))
    _Named.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    torch.manual_seed(3)
    return _Named(style)


_FORMS = [
    ("gpt-fast", "input_pos"),
    ("gpt-fast", "position_ids"),
    ("llama", "position_ids"),
    ("torchtune", "position_ids"),
    ("torchtune", "input_pos"),
]


def _feed(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, name: str, style: str) -> Any:
    """``model``'s forward on ``ids`` at ``pos`` (``[1, positions]``), by the name its forward takes them under."""
    given = pos.reshape(-1) if name == "input_pos" else pos
    if style == "llama":
        return model(ids, **{name: given}, start_pos=int(pos.reshape(-1)[0]))
    return model(ids, **{name: given})


def _caches(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every static cache tensor of ``model`` (buffers and Meta's plain attributes)."""
    out = {k: v.clone() for k, v in model.named_buffers()}
    for n, m in model.named_modules():
        for k in ("cache_k", "cache_v"):
            if isinstance(getattr(m, k, None), torch.Tensor):
                out[f"{n}.{k}"] = getattr(m, k).clone()
    return out


def _put_back(model: nn.Module, held: dict[str, torch.Tensor]) -> None:
    """Put the static caches ``held`` (see :func:`_caches`) back into ``model``."""
    with torch.no_grad():
        for k, v in held.items():
            owner, _, attr = k.rpartition(".")
            getattr(model.get_submodule(owner), attr).copy_(v)


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize(("style", "name"), _FORMS, ids=[f"{s}-{n}" for s, n in _FORMS])
def test_a_continuation_of_a_model_keeping_a_static_cache_is_exact(style: str, name: str) -> None:
    """A second turn of a model that keeps a static KV cache in its modules (buffers, or plain tensors as Meta's
    reference), fed the positions after the tokens its cache holds, its rows laid out as a sequence of their own: the
    replay is exact, as where a cache is given to the forward. Its cache's writes at the positions it is given are
    the evidence that the tokens before them are held."""
    model = _static_model(style, name)
    _watch_experts(model)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    with torch.no_grad():
        _feed(model, first, torch.arange(5)[None], name, style)
    kept = _caches(model)
    session = mr.attach(model)
    try:
        later = torch.arange(5, 9)[None]
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            _feed(model, second, later, name, style)
        want, turn = _joined(rec), session.routes()
        routes = mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)])
        # (first on the cache as the capture left it, rewritten with the values it holds, where the forward writes it
        # at the positions it is given (torchtune's moves on from its own cache_pos); then, the routers moved, on the
        # cache put back as it was before the capture)
        for perturbed in (False, True) if style != "torchtune" else (True,):
            if perturbed:
                _perturb(model)
                _put_back(model, kept)
            with torch.no_grad():
                got = _outcome(model, session, routes, lambda: _feed(model, second, later, name, style), model)
            assert got is not None, "refused though exact"
            assert got.keys() == want.keys()
            for layer, rows in got.items():
                assert torch.equal(rows, want[layer]), layer
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("style", "name"), [*_FORMS, ("tables", "position_ids")], ids=[*(f"{s}-{n}" for s, n in _FORMS), "tables"]
)
def test_a_slice_fed_another_ranks_positions_beside_an_empty_static_cache_is_refused(style: str, name: str) -> None:
    """A sequence-parallel rank's rows of a 12-token sequence (laid out without ids) fed the third rank's tokens and
    positions, to a model whose static cache holds nothing before them (or that keeps no cache, only a rotary table
    and a causal mask in buffers, never written): refused, its tensors and caches unchanged; each rank's own first
    slice is exact. The evidence of a cache holding the tokens before the positions must not open this."""
    model = _static_model(style, name)
    _watch_experts(model)
    fresh = _caches(model)
    seq = torch.randint(1, 128, (1, 12))
    pos = torch.arange(12)[None]
    session = mr.attach(model)
    try:
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            _feed(model, seq, pos, name, style)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([12]).routes([session.routes().with_token_ids(None)])
        _perturb(model)
        with torch.no_grad():
            _put_back(model, fresh)
            got = _outcome(model, session, routes[:4], lambda: _feed(model, seq[:, :4], pos[:, :4], name, style), model)
            assert got is not None, "rank 0's own slice refused though exact"
            for layer, rows in got.items():
                assert torch.equal(rows, want[layer][:4]), layer
            _put_back(model, fresh)
            wrong = lambda: _feed(model, seq[:, 8:], pos[:, 8:], name, style)  # noqa: E731
            assert _outcome(model, session, routes[:4], wrong, model) is None, "rank 0's rows forced on rank 2's"
            after = _caches(model)
            if style != "tables":
                assert all(torch.equal(after[k], v) for k, v in fresh.items()), "a refusal wrote the cache"
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_continuation_whose_static_cache_is_written_elsewhere_than_its_positions_is_refused() -> None:
    """torchtune's cache writes at its own ``cache_pos``, moved on past the turn by the capture: a replay of the
    turn fed the turn's positions writes the cache after them, so the positions do not say where its tokens sit in
    what the cache holds. Refused (as the block ends: only the forward's writes tell it)."""
    model = _static_model("torchtune", "position_ids")
    _watch_experts(model)
    first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
    with torch.no_grad():
        _feed(model, first, torch.arange(5)[None], "position_ids", "torchtune")
    session = mr.attach(model)
    try:
        later = torch.arange(5, 9)[None]
        with torch.no_grad(), session.capture():
            _feed(model, second, later, "position_ids", "torchtune")
        routes = mr.BatchLayout.packed([4]).routes([session.routes().with_token_ids(None)])
        with pytest.raises(mr.MoEReplayError, match="static KV cache"), torch.no_grad(), session.replay(routes):
            _feed(model, second, later, "position_ids", "torchtune")
        assert session.state == "idle"
    finally:
        session.detach()


# ----------------------------------------------------------------------------- mrope's three rows across an image
def _text_mrope(n: int) -> torch.Tensor:
    """Three-row mrope position_ids ``[3, 1, n]`` of a sequence of text alone: each token's place in every row."""
    return torch.arange(n).expand(3, 1, n)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed", ["as a run", "farther apart", "text closer"])
def test_context_parallel_chunks_fed_three_row_mrope_positions_at_other_distances_are_refused(fed: str) -> None:
    """A context-parallel rank's two chunks of a capture's sequence (ids dropped) fed three-row mrope positions that
    put them at another distance than their places: as if the chunks followed each other, farther apart (the image
    between them in the sequence), or, a sequence of text alone, closer: refused. Bounds on the distance (an image
    spans fewer positions than tokens, one at least) would let the chunks around an image through (test_rl52's
    strict xfail) but also the last, which nothing in the forward tells from it: it stays refused."""
    from .test_review54 import _capture_and_slices

    model, inner, session, tokens, pos = _capture_and_slices(9)
    at = torch.cat([torch.arange(0, 1), torch.arange(9, 12)])
    given = {
        "as a run": torch.arange(4).expand(3, 1, 4),
        "farther apart": torch.cat([pos[..., :1], pos[..., 9:] + 4], -1),
        "text closer": torch.cat([_text_mrope(12)[..., :1], _text_mrope(12)[..., 9:] - 3], -1),
    }[fed]
    with session:
        with session.capture(), torch.no_grad():
            model(tokens, position_ids=_text_mrope(12) if fed == "text closer" else None)
        routes = session.routes().with_token_ids(None)
        _perturb(inner)
        got = _outcome(model, session, routes[at], lambda: model(tokens[:, at], position_ids=given), inner)
        assert got is None, "chunks forced under positions that put them at other distances"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed", ["restarted", "later than their places", "with a jump", "text shifted"])
def test_a_slice_fed_three_row_mrope_positions_at_other_places_is_refused(fed: str) -> None:
    """A capture's rows with their ids, a sequence-parallel slice of the sequence's end: fed three-row mrope
    positions that restart at 0 (a suffix fed without its prefix), that put its tokens later than their places, that
    jump inside it, or, a sequence of text alone, that put them earlier than their places: refused. Read as places up
    to what an image before the slice saved (test_review54's strict xfail), the last would go through, and nothing
    in the forward tells it from a slice after an image."""
    from .test_review54 import _capture_and_slices

    model, inner, session, tokens, pos = _capture_and_slices(11)
    own = pos[..., 7:]
    given = {
        "restarted": own - own[..., :1],
        "later than their places": own + 4,
        "with a jump": torch.cat([own[..., :2], own[..., 2:] + 1], -1),
        "text shifted": _text_mrope(12)[..., 7:] - 3,
    }[fed]
    with session:
        with session.capture(), torch.no_grad():
            model(tokens, position_ids=_text_mrope(12) if fed == "text shifted" else None)
        routes = session.routes()
        _perturb(inner)
        got = _outcome(model, session, routes[7:], lambda: model(tokens[:, 7:], position_ids=given), inner)
        assert got is None, "a slice forced under positions at other places than its rows"
