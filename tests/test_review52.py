"""Review of round 51's merges for false refusals of ordinary use: the places of a capture's rows compared after
``with_token_ids(None)``, the per-router call check of forwards fed ``inputs_embeds``, and ``compare``'s checks of
places and wrapper prefixes.

Each replay here is exact, read by the test's own hooks on the experts modules after the routers were moved so that
a free forward chooses other experts; each comparison reports no difference between routings of the same tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.models import build

from .test_workflow import _dispatched, _joined, _perturb, _watch_experts

_LEFT = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
_RIGHT = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The ``position_ids`` HF ``generate()`` feeds a padded batch: 1 at padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _model() -> tuple[nn.Module, mr.Session]:
    torch.manual_seed(0)
    model = build("softmax_topk", num_layers=3, first_dense_layers=1).eval()
    _watch_experts(model)
    return model, mr.attach(model)


def _differs(report: mr.RoutingComparison) -> str:
    return str(report).split("decisions differing:")[1].split("\n")[0].strip()


_FEEDS: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {
    "no mask": ({}, {}),
    "left padded": ({"attention_mask": _LEFT}, {"attention_mask": _LEFT}),
    "left padded, HF positions at replay": (
        {"attention_mask": _LEFT},
        {"attention_mask": _LEFT, "position_ids": _hf_positions(_LEFT)},
    ),
    "left padded, HF positions at capture": (
        {"attention_mask": _LEFT, "position_ids": _hf_positions(_LEFT)},
        {"attention_mask": _LEFT},
    ),
    "right padded": ({"attention_mask": _RIGHT}, {"attention_mask": _RIGHT, "position_ids": _hf_positions(_RIGHT)}),
    "positions given at replay only": ({}, {"position_ids": torch.arange(8)[None].expand(2, 8)}),
}


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("feed", list(_FEEDS))
def test_a_captures_rows_without_ids_force_other_prompts_of_the_same_layout(feed: str) -> None:
    """``with_token_ids(None)`` as its docstring says: other tokens of the same layout take the rows. The places each
    row was recorded at are now compared; a batch of other prompts fed the same mask (or the positions HF computes
    from it, on either side) is at those places and dispatches the captured experts."""
    model, session = _model()
    capture, replay = _FEEDS[feed]
    x, y = torch.randint(1, 128, (2, 8)), torch.randint(1, 128, (2, 8))
    with torch.no_grad(), session.capture(), _dispatched(model) as rec:
        model(x, **capture)
    routes, want = session.routes().with_token_ids(None), _joined(rec)
    _perturb(model)
    with torch.no_grad(), session.replay(routes), _dispatched(model) as rec:
        model(y, **replay)
    got = _joined(rec)
    assert got.keys() == want.keys()
    for name, rows in want.items():
        assert torch.equal(got[name], rows), name
    session.detach()


@pytest.mark.reliability("false refusals")
def test_a_generate_capture_without_ids_forces_a_generate_of_other_prompts() -> None:
    """A capture of ``generate()`` on a left-padded batch, ids dropped, forces the decode loop of other prompts of the
    same padding: each decode step's rows are at the places after the prompt's cache it was recorded at."""
    model, session = _model()
    mask = _LEFT[:, :6]
    x, y = torch.randint(1, 128, (2, 6)), torch.randint(1, 128, (2, 6))
    with session.capture(), _dispatched(model) as rec:
        model.generate(x, max_new_tokens=5, attention_mask=mask, do_sample=True)
    routes, want = session.routes().with_token_ids(None), _joined(rec)
    _perturb(model)
    with session.replay(routes), _dispatched(model) as rec:
        model.generate(y, max_new_tokens=5, attention_mask=mask, do_sample=True)
    for name, rows in want.items():
        assert torch.equal(_joined(rec)[name], rows), name
    session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_rollout_without_ids_replays_other_tokens_in_a_checkpointed_training_forward(
    checkpointing: str, packed: bool
) -> None:
    """README's recipe with the rollout's ids dropped (a training batch of other tokens on purpose), under activation
    checkpointing: each sequence's rows are laid out at their places, every routed row is forced, in the forward and
    again in its recompute."""
    model, session = _model()
    prompt, mask = torch.randint(1, 128, (2, 6)), _LEFT[:, :6]
    with session.capture():
        out = model.generate(prompt, max_new_tokens=6, attention_mask=mask, do_sample=True)
    split = mr.split_generation(session.routes(), attention_mask=mask, sequences=out)
    rollout = [r.with_token_ids(None) for r in split]
    lengths = [len(r) for r in rollout]
    layout = mr.BatchLayout.packed(lengths) if packed else mr.BatchLayout.padded(lengths)
    ids = layout.tokens([torch.randint(1, 128, (n,)) for n in lengths])
    feed: dict[str, Any] = (
        {"position_ids": layout.position_ids()} if packed else {"attention_mask": layout.attention_mask()}
    )
    routes = layout.routes(rollout)
    _perturb(model)
    model.config.checkpointing = checkpointing
    try:
        with session.replay(routes), _dispatched(model) as rec:
            model(ids, labels=ids, **feed).loss.backward()
    finally:
        model.config.checkpointing = "none"
    routed = ~routes.missing.all(dim=1) if routes.missing.dim() == 2 else ~routes.missing
    for name in routes.names:
        calls = [c for n, cs in rec.items() if name.startswith(n.rsplit(".", 1)[0]) for c in cs]
        assert len(calls) == 2, f"{name}: {len(calls)} calls (a forward and its recompute)"
        for call in calls:
            assert torch.equal(call[routed].long(), routes.layer(name)[routed].long()), name
    session.detach()


class _Merged(nn.Module):
    """The tiny model fed ``inputs_embeds`` as a vision-language model feeds its language model: image features merged
    into the embeddings of the prompt, token ids at each decode step, a KV cache of plain tensors."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[Any] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, list[Any]]:
        h = self.base.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + s, dtype=torch.long)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        causal = torch.ones(s, past + s, dtype=torch.bool).tril(diagonal=past)
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        h = h + self.base.pos(positions)
        cache = []
        for i, layer in enumerate(self.base.layers):
            h, kv = layer(h, mask, past_key_values[i] if past_key_values else None)
            cache.append(kv)
        return self.base.lm_head(self.base.norm(h)), cache


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left padded"])
def test_a_vlm_rollout_fed_embeddings_replays_in_a_training_forward_fed_embeddings(padded: bool) -> None:
    """The per-router call check now runs in forwards fed embeddings: a rollout whose prompt forward was fed merged
    image embeddings and whose decode steps were fed ids, split and replayed in one training forward fed embeddings,
    dispatches the rollout's experts, and compare() of the two routings finds no difference."""
    torch.manual_seed(0)
    base = build("softmax_topk", num_layers=3, first_dense_layers=1).eval()
    model = _Merged(base)
    _watch_experts(model)
    session = mr.attach(model)
    mask = _LEFT[:, :6] if padded else torch.ones(2, 6, dtype=torch.long)
    prompt = torch.randint(1, 128, (2, 6))
    image = torch.randn(1, 1, base.config.hidden_size)

    def embeds(ids: torch.Tensor, at: list[list[int]]) -> torch.Tensor:
        e = base.embed(ids).detach().clone()
        for row, cols in enumerate(at):
            e[row, cols] = image[0, 0]
        return e

    seq, m = prompt, mask
    with session.capture(), torch.no_grad():
        logits, cache = model(inputs_embeds=embeds(prompt, [[2, 3]] * 2), attention_mask=m, use_cache=True)
        for _ in range(4):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            logits, cache = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
    rollout = mr.split_generation(session.routes(), attention_mask=mask, sequences=seq)
    tokens = [s[torch.cat([k.bool(), torch.ones(4, dtype=torch.bool)])] for s, k in zip(seq, mask, strict=True)]
    layout = mr.BatchLayout.padded([len(t) for t in tokens])
    ids = layout.tokens(tokens)
    offsets = [int((k == 0).sum()) for k in mask]  # (the image's columns among each sequence's real tokens)
    _perturb(model)
    with session.replay(layout.routes(rollout)), session.capture(), _dispatched(model) as rec:
        e = embeds(ids, [[2 - o, 3 - o] for o in offsets]).requires_grad_()
        model(inputs_embeds=e, attention_mask=layout.attention_mask())[0].sum().backward()
    replayed = layout.unpack(session.routes())
    assert _differs(mr.compare(mr.Routes.cat(rollout), mr.Routes.cat(replayed))).startswith("0.00% (0 of")
    routes = layout.routes(rollout)
    routed = ~routes.missing.all(dim=1) if routes.missing.dim() == 2 else ~routes.missing
    for name in routes.names:
        (call,) = [c for n, cs in rec.items() if name.startswith(n.rsplit(".", 1)[0]) for c in cs]
        assert torch.equal(call[routed].long(), routes.layer(name)[routed].long()), name
    session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("training", ["each alone", "chunked prefill", "packed", "left padded, padding rows cut"])
def test_compare_of_a_rollout_and_a_training_forward_of_its_tokens_finds_no_difference(training: str) -> None:
    """``compare`` now checks each row's place where both sides know ids and places: a rollout split from a
    left-padded ``generate()`` and the same tokens' training forward (each sequence alone, in two chunks over a KV
    cache, packed, or left-padded with the padding rows cut out) are the same tokens at the same places."""
    model, session = _model()
    prompt, mask = torch.randint(1, 128, (2, 6)), _LEFT[:, :6]
    with session.capture(), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, attention_mask=mask, do_sample=True)
    rollout = mr.split_generation(session.routes(), attention_mask=mask, sequences=out)
    tokens = [torch.cat([p[k.bool()], o[6:]]) for p, k, o in zip(prompt, mask, out, strict=True)]
    with session.capture(), torch.no_grad():
        if training == "each alone":
            for t in tokens:
                model(t[None])
        elif training == "chunked prefill":
            for t in tokens:
                cache = model(t[None, :5], use_cache=True).past_key_values
                model(t[None, 5:], past_key_values=cache)
        elif training == "packed":
            layout = mr.BatchLayout.packed([len(t) for t in tokens])
            model(layout.tokens(tokens), position_ids=layout.position_ids())
        else:
            full = torch.cat([mask, torch.ones(2, out.shape[1] - 6, dtype=mask.dtype)], 1)
            model(out, attention_mask=full)
    captured = session.routes()
    if training == "left padded, padding rows cut":
        captured = captured[full.flatten().bool()]
    report = mr.compare(mr.Routes.cat(rollout), captured)
    assert _differs(report).startswith("0.00% (0 of"), report
    session.detach()
