"""Misuse of the public API in a training workflow: per-sequence routes that know no token ids (an engine's arrays),
laid out by a BatchLayout for a padded batch and replayed on a forward that is fed the batch without its attention
mask or position_ids. Nothing then tells where the sequences sit in the batch: a batch padded on the other side would
take the recorded experts on its padding and route its own tokens natively. Each replay is exact (every sequence's
tokens dispatch their recorded experts, checked by a capture inside it after the routers were moved) or refused,
with the model left as it was."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr

LENGTHS = (5, 3)


def _move_routers(model: torch.nn.Module) -> None:
    """Move every router's weight far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.add_(3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def rollout() -> tuple[Any, ...]:
    """A model, its session, two sequences, and each sequence's routes captured on its own, without ids."""
    model = mr.models.build("softmax_topk", seed=0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in LENGTHS]
    session = mr.attach(model)
    per = []
    for seq in seqs:
        with session.capture(), torch.no_grad():
            model(seq[None])
        per.append(session.routes().with_token_ids(None))  # (an engine's arrays: rows only)
    _move_routers(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, session, seqs, per, state


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed_side", ["right", "left"])
@pytest.mark.parametrize("feeds", ["attention_mask", "position_ids", "nothing"])
def test_laid_out_routes_without_ids_on_a_padded_batch_fed_no_mask_are_exact_or_refused(
    rollout: tuple[Any, ...], feeds: str, fed_side: str
) -> None:
    """Once silent: routes laid out for a right-padded batch, replayed on the same sequences padded on the left and
    fed without an attention mask or position_ids, forced the second sequence's experts on its padding and routed
    its tokens natively; every check passed. A forward fed neither is now refused where the rows it reads hold the
    layout's padding (a mask or the positions shows where the sequences sit; the ids would check every row)."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    routes = mr.BatchLayout.padded(list(LENGTHS), side="right").routes(per)
    fed = mr.BatchLayout.padded(list(LENGTHS), side=fed_side)
    ids = fed.tokens(seqs)
    kwargs = {} if feeds == "nothing" else {feeds: getattr(fed, feeds)()}
    before = _state(model)
    exact = fed_side == "right" and feeds != "nothing"  # (fed nothing: where the sequences sit is not told)
    if not exact:
        with pytest.raises(mr.TokenMismatchError), session.replay(routes), torch.no_grad():
            model(ids, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert session.state == "idle"
        return
    with session.replay(routes), session.capture(), torch.no_grad():
        model(ids, **kwargs)
    got = fed.unpack(session.routes().with_token_ids(None))
    for i, want in enumerate(per):
        assert got[i].equal(want), f"sequence {i} did not dispatch its recorded experts"


@pytest.mark.reliability("silent replays")
def test_laid_out_routes_without_padding_on_a_batch_fed_no_mask_replay(rollout: tuple[Any, ...]) -> None:
    """A layout with no padding (sequences packed in one row) holds nothing a mask could tell: a forward fed neither
    mask nor positions replays it by row order, as before."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    layout = mr.BatchLayout.packed(list(LENGTHS))
    with session.replay(layout.routes(per)), session.capture(), torch.no_grad():
        model(layout.tokens(seqs))
    got = layout.unpack(session.routes().with_token_ids(None))
    assert all(g.equal(w) for g, w in zip(got, per, strict=True))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("other", ["capture", "layout"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_compare_of_routes_laid_out_for_another_batch_is_refused(
    rollout: tuple[Any, ...], side: str, other: str
) -> None:
    """Once silent: an engine's routes (no ids) laid out right-padded, compared with a capture of the batch padded on
    the left (or with the same routes laid out left-padded), compared each row with another token's: the figures were
    of misaligned rows. Rows of a sequence's token at a row the capture recorded at padding, or at another place in the
    other layout, are now refused; laid out for the same batch, the comparison is the hand count."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    fed = mr.BatchLayout.padded(list(LENGTHS), side=side)
    if other == "capture":
        with session.capture(), torch.no_grad():
            model(fed.tokens(seqs), attention_mask=fed.attention_mask())
        b = session.routes().with_token_ids(None)
    else:
        b = fed.routes(per)
    a = mr.BatchLayout.padded(list(LENGTHS), side="right").routes(per)
    if side == "left":
        with pytest.raises(mr.RoutesValidationError, match="laid out for other batches"):
            mr.compare(a, b)
        return
    got = mr.compare(a, b)
    # (by hand: each sequence's own rows, the capture's on the moved routers, at the positions the layout gives it)
    ours = fed.unpack(b) if other == "capture" else per
    differ = sum(
        int((~(x.layer(n).sort(1).values == y.layer(n).sort(1).values).all(1)).sum())
        for x, y in zip(per, ours, strict=True)
        for n in a.names
    )
    assert got.compared.sum() == sum(LENGTHS) * len(a.names)
    assert got.differ.sum() == differ


def _by_hand(probs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> float:
    """Switch's E * sum_e f_e * P_e over the tokens of weight w, counted one (token, slot) at a time."""
    e = probs.shape[1]
    f = [0.0] * e
    for row, weight in zip(idx.tolist(), w.tolist(), strict=True):
        for expert in row:
            if weight:
                f[expert] += weight
    total = float(w.sum())
    p_mean = (probs.double() * w[:, None].double()).sum(0) / total
    return e * sum(f[j] / total * float(p_mean[j]) for j in range(e))


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("mask_dims", [1, 2])
def test_load_balancing_loss_on_laid_out_routes_skips_their_padding_rows(
    rollout: tuple[Any, ...], mask_dims: int
) -> None:
    """Once a false refusal: the replay routes of a padded batch (-1 rows at its padding) given as the experts used,
    with the batch's attention mask, were refused as indices out of 0..E-1, though the mask gives those rows weight 0.
    They now count for nothing; the loss is the hand count, and equals the one on the kept indices. A -1 row of a token
    the mask counts is still refused."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    layout = mr.BatchLayout.padded(list(LENGTHS), side="left")
    routes = layout.routes(per)
    mask = layout.attention_mask()
    with session.replay(routes), session.keep_scores() as kept:
        model(layout.tokens(seqs), attention_mask=mask)
    probs = kept.scores  # (this router's top-k runs on probabilities)
    used = [routes.layer(n) for n in kept.names]
    given = mask.reshape(-1) if mask_dims == 1 else mask
    loss = mr.load_balancing_loss(probs, used, mask=given)
    w = mask.reshape(-1).float()
    want = sum(_by_hand(p.detach(), u.clamp(min=0), w) for p, u in zip(probs, used, strict=True)) / len(used)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(mr.load_balancing_loss(probs, kept.indices, mask=given).item(), rel=1e-6)
    loss.backward()  # (the gradient reaches the routers through the kept scores)
    assert all(s.module.weight.grad is not None for s in session.sites)
    model.zero_grad()
    counted = torch.ones_like(w)  # (every row counted: the -1 rows are tokens of no recorded route)
    with pytest.raises(mr.InvalidArgumentError, match="indices must be experts"):
        mr.load_balancing_loss([p.detach() for p in probs], used, mask=counted)


def _engine_rows(routes: mr.Routes) -> mr.Routes:
    """As an engine returns them: no ids, and no route for the last token (never fed back)."""
    rows = [r.clone() for r in routes.per_layer()]
    for r in rows:
        r[-1] = -1
    return mr.Routes(rows, names=routes.names, num_experts=list(routes.experts_per_layer))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("rows", ["captured", "engine"])
def test_laid_out_routes_on_a_batch_of_other_rows_are_refused_before_any_router_reads(
    rollout: tuple[Any, ...], rows: str
) -> None:
    """Once silent with strict=False (and refused only by the row count as a strict block ended, after the forward
    ran): routes laid out for a [2, 5] batch replayed on a [2, 3] micro-batch of the second sequence twice read the
    first sequence's rows 3 and 4 at the start of the second batch row, and the mask and padding matched. A
    sequence that runs on from one batch row into the next is no layout of this batch: refused as the forward
    begins, whatever the forward is fed, with the rows that force nothing (an engine's last token) too."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    source = per if rows == "captured" else [_engine_rows(r) for r in per]
    routes = mr.BatchLayout.padded(list(LENGTHS)).routes(source)
    fed = mr.BatchLayout.padded([LENGTHS[1], LENGTHS[1]])
    before = _state(model)
    with pytest.raises(mr.TokenMismatchError, match="runs on into row 1"):
        with session.replay(routes, strict=False), session.capture(), torch.no_grad():
            model(fed.tokens([seqs[1], seqs[1]]), attention_mask=fed.attention_mask())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert session.state == "idle"
    with session.replay(routes, strict=False), session.capture(), torch.no_grad():  # (the batch it was laid out for)
        model(
            mr.BatchLayout.padded(list(LENGTHS)).tokens(seqs),
            attention_mask=mr.BatchLayout.padded(list(LENGTHS)).attention_mask(),
        )
    got = mr.BatchLayout.padded(list(LENGTHS)).unpack(session.routes().with_token_ids(None))
    for g, want in zip(got, source, strict=True):
        held = ~want.missing.all(dim=1)
        assert all(torch.equal(g.layer(n)[held], want.layer(n)[held]) for n in want.names)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("other", ["left", "other lengths"])
def test_unpack_of_routes_laid_out_by_another_layout_is_refused(rollout: tuple[Any, ...], other: str) -> None:
    """Once silent: routes laid out right-padded, unpacked through a left-padded layout (or one of other lengths,
    the same row count), gave each sequence the rows of other positions. Their own layout gives each sequence its
    routes back."""
    _, _, _, per, _ = rollout
    routes = mr.BatchLayout.padded(list(LENGTHS)).routes(per)
    wrong = (
        mr.BatchLayout.padded(list(LENGTHS), side="left")
        if other == "left"
        else mr.BatchLayout.padded([LENGTHS[1], LENGTHS[0]])
    )
    with pytest.raises(mr.RoutesValidationError, match="laid out by another BatchLayout"):
        wrong.unpack(routes)
    back = mr.BatchLayout.padded(list(LENGTHS)).unpack(routes)
    assert all(b.equal(p) for b, p in zip(back, per, strict=True))


@pytest.mark.reliability("silent replays")
def test_compare_of_laid_out_routes_with_a_capture_fed_no_mask_is_exact_or_refused(rollout: tuple[Any, ...]) -> None:
    """Once silent: engine routes (no ids) laid out right-padded, compared with a capture of the same sequences
    padded on the left and fed without a mask (its ids kept or dropped): the rows are other tokens', so the
    comparison must be refused. Fed its mask, the capture is compared where it is the same batch."""
    model, session, seqs, per, state = rollout
    model.load_state_dict(state)
    right = mr.BatchLayout.padded(list(LENGTHS))
    for side in ("left", "right"):
        layout = mr.BatchLayout.padded(list(LENGTHS), side=side)
        with session.capture(), torch.no_grad():
            model(layout.tokens(seqs))
        captured = session.routes()
        for r in (captured, captured.with_token_ids(None)):
            with pytest.raises(mr.RoutesValidationError, match="attention_mask"):
                mr.compare(r, right.routes(per))
        with session.capture(), torch.no_grad():
            model(layout.tokens(seqs), attention_mask=layout.attention_mask())
        fed = session.routes().with_token_ids(None)
        if side == "left":
            with pytest.raises(mr.RoutesValidationError, match="laid out for other batches"):
                mr.compare(fed, right.routes(per))
        else:
            assert mr.compare(fed, right.routes(per)).tokens == sum(LENGTHS)
