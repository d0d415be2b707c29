"""One conversation's routes from the routes of its turns.

A multi-turn conversation is one growing sequence: each turn's prompt is the previous
turn's whole sequence plus new tokens. With ``routed_experts_prompt_start`` (vLLM 0.22+)
or ``routed_experts_start_len`` (SGLang) each turn returns only the rows after the part
already received, and its converted routes hold -1 rows for the rest.
:func:`stitch_turns` lays the turns over each other into the routes of the final sequence.

Example:
    >>> import torch, moe_replay as mr
    >>> def routes(rows):
    ...     return mr.Routes([torch.tensor(rows)], names=["model.layers.0.mlp.gate"], num_experts=4)
    >>> turn1 = routes([[0], [1], [-1]])                 # 3 tokens, the last one unrouted
    >>> turn2 = routes([[-1], [-1], [2], [3], [-1]])     # 5 tokens, returned from token 2 on
    >>> mr.interop.stitch_turns([turn1, turn2]).layer("model.layers.0.mlp.gate").tolist()
    [[0], [1], [2], [3], [-1]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_values, is_collection, is_one_of
from ..batch import check_same_routers, routes_list
from ..errors import ArgumentTypeError, RoutesValidationError
from ..routes import PADDING_ID, Routes, _ids, in_token_order

__all__ = ["stitch_turns"]

_OVERLAP = ("check", "first", "last")
_GAPS = ("error", "native")


def stitch_turns(
    turns: Sequence[Routes],
    *,
    token_ids: Sequence[Sequence[int]] | None = None,
    overlap: str = "check",
    gaps: str = "error",
) -> Routes:
    """The routes of a conversation's final sequence from the routes of its turns, in order.

    Each turn's routes are aligned to all tokens of that turn's sequence (prompt plus
    completion), as every ``from_*`` reader returns them, and each turn's sequence
    starts with the previous one's. Row ``t`` of the result is row ``t`` of the turns
    that hold a route there.

    Args:
        turns: routes of each turn, oldest first.
        token_ids: each turn's whole token sequence; when given, each must start with the
            previous one (a re-tokenised history does not, and cannot be stitched). The
            result knows the conversation's tokens (:attr:`~moe_replay.Routes.token_ids`):
            these, and those the turns' routes know (an engine reader's), which must agree.
        overlap: a token routed by more than one turn: ``"check"`` (default) requires the
            same experts (as a vLLM 0.22+ prefix-cache hit or SGLang's KV slot gives),
            ``"first"`` keeps the earliest turn's route (the one its tokens were sampled
            with), ``"last"`` the latest.
        gaps: a token other than the last routed by no turn: ``"error"`` (default; usually
            an off-by-one ``prompt_start``) or ``"native"`` (a -1 row, routed natively).

    Raises:
        RoutesValidationError: turns of different models, a turn shorter than the one
            before, token ids that are not prefixes, disagreeing overlaps, gaps; a turn
            joined from several routes (``Routes.cat``: the turn of several conversations
            at once, as an engine call returns a batch) where no token ids, given or known
            for its every row, check it as one sequence's.
    """
    if not is_one_of(overlap, _OVERLAP):
        raise RoutesValidationError(f"overlap must be one of {_OVERLAP}, got {overlap!r}")
    if not is_one_of(gaps, _GAPS):
        raise RoutesValidationError(f"gaps must be one of {_GAPS}, got {gaps!r}")
    parts = routes_list(turns, "turn")
    try:
        check_same_routers(parts, "turn")
    except (TypeError, ValueError) as e:
        raise RoutesValidationError(str(e)) from None
    if token_ids is None and len(parts) > 1:
        _refuse_joined(parts)
    parts = [in_token_order(p, f"stitch_turns: turn {i}") for i, p in enumerate(parts)]  # (row t: token t)
    for i in range(1, len(parts)):
        if parts[i].num_tokens < parts[i - 1].num_tokens:
            raise RoutesValidationError(
                f"turn {i} has {parts[i].num_tokens} tokens, turn {i - 1} {parts[i - 1].num_tokens}: each turn's "
                "sequence must extend the previous one"
            )
    if token_ids is not None:
        turn_ids = list(token_ids) if is_collection(token_ids) else None
        for i, given in enumerate(turn_ids or []):  # (meta, sparse, nested, quantized: no ids to read, torch's own
            check_values(given, f"stitch_turns: token_ids[{i}]")  # error; said as such, before "no list of lists")
        if turn_ids is None or not all(is_collection(t) for t in turn_ids):
            raise ArgumentTypeError(
                f"token_ids must hold each turn's token ids (a list of lists, one per turn), got {token_ids!r:.60}"
            )
        ids = [list(t) for t in turn_ids]
        if len(ids) != len(parts):
            raise RoutesValidationError(f"got token_ids for {len(ids)} turns and routes for {len(parts)}")
        for i, (seq, r) in enumerate(zip(ids, parts, strict=True)):
            if len(seq) != r.num_tokens:
                raise RoutesValidationError(f"turn {i}: {len(seq)} token ids, {r.num_tokens} routed tokens")
            # (ids first, as the ids they are: 3.0 would pass the prefix check below as 3, then be refused in
            # another call's words)
            _ids(seq, r, f"stitch_turns: token_ids[{i}]")
            if i and seq[: len(ids[i - 1])] != ids[i - 1]:
                at = next(j for j, (a, b) in enumerate(zip(seq, ids[i - 1], strict=False)) if a != b)
                raise RoutesValidationError(
                    f"turn {i}'s tokens differ from turn {i - 1}'s at position {at}: the history was re-tokenised, "
                    "so the turns are not one sequence"
                )
    total = parts[-1].num_tokens
    tokens = _conversation_tokens(parts, ids if token_ids is not None else None, total)
    out = []
    for j, name in enumerate(parts[-1].names):
        k = parts[-1].k_per_layer[j]
        acc = torch.full((total, k), -1, dtype=torch.long)
        seen = torch.zeros(total, dtype=torch.bool)
        owner = torch.full((total,), -1, dtype=torch.long)
        for i, r in enumerate(parts):
            rows = r.layer(name)
            n = rows.shape[0]
            has = ~(rows < 0).all(dim=1)
            both = has & seen[:n]
            if bool(both.any()) and overlap == "check":
                diff = both & (rows.sort(dim=1).values != acc[:n].sort(dim=1).values).any(dim=1)
                if bool(diff.any()):
                    t = int(diff.nonzero()[0, 0])
                    raise RoutesValidationError(
                        f"router '{name}', token {t}: turn {int(owner[t])} routed it to {acc[t].tolist()}, turn {i} "
                        f"to {rows[t].tolist()}. Pass overlap='first' (the routes its tokens were sampled with) or "
                        "'last', or request each turn from where the previous one ended (prompt_start/start_len)"
                    )
            take = has if overlap == "last" else has & ~seen[:n]
            acc[:n][take] = rows[take]
            owner[:n][take] = i
            seen[:n] |= has
        out.append(acc)
        if gaps == "error" and bool(seen.any()):  # a router no turn routes at all (MTP) has no gaps
            hole = ~seen[: total - 1]
            if bool(hole.any()):
                t = int(hole.nonzero()[0, 0])
                raise RoutesValidationError(
                    f"router '{name}': token {t} of {total} is routed by no turn. A turn's start (prompt_start / "
                    "start_len) is probably one too far: the previous turn's last token has no route of its own, "
                    "so the next turn must start at or before it. Pass gaps='native' to route such tokens natively"
                )
    stitched = Routes(out, names=parts[-1].names, num_experts=parts[-1].experts_per_layer).with_token_ids(tokens)
    stitched._keep_row_marks(parts)  # (the turns' rows in their places: what holds for every row of them holds here)
    recorded = {p._recorded_names for p in parts}  # (the routers the turns were recorded on, where all say the same)
    stitched._recorded_names = recorded.pop() if len(recorded) == 1 else None
    stitched._fed_mask = _conversation_mask(parts, total)
    stitched._seq_pos = _conversation_places(parts, total)
    if token_ids is None and len(parts) == 1:  # (one turn, checked as nothing: rows joined stay so marked)
        stitched._joined = parts[0]._joined
    return stitched


def _refuse_joined(parts: list[Routes]) -> None:
    """Refuse turns joined by ``Routes.cat`` from routes of several parts where no token id of theirs is unknown:
    the turns of a batch of conversations (each turn the routes of an engine call over all of them) would be laid
    over each other as one conversation's, the second conversation's rows at other positions in each turn, and
    nothing in the rows shows it. Token ids (given, or known for every row) are checked as one sequence instead."""
    for i, r in enumerate(parts):
        ids = r._token_ids
        if r._joined > 1 and (ids is None or ids.numel() != r.num_tokens or bool((ids < 0).any())):
            raise RoutesValidationError(
                f"turn {i} holds the routes of {r._joined} parts joined (Routes.cat), and no token ids show that "
                "they are pieces of one sequence: the turns of several conversations at once (an engine call's "
                "batch) stitched as one conversation would lay one conversation's rows over another's. Stitch each "
                "conversation's turns apart (the routes of its own sequence in each turn), or pass token_ids= "
                "(each turn's whole token sequence), which are checked as one conversation"
            )


def _conversation_mask(parts: list[Routes], total: int) -> torch.Tensor | None:
    """The prompt mask of each position of the conversation (see ``Routes._fed_mask``): 0 where a turn recorded it
    at prompt padding (in its mask, or in a router's own ids), 1 where a turn fed it as a token and none as padding,
    -1 where no turn knows; None where none knows any. A position recorded at padding stays one: a replay that feeds
    a token of a sequence there is refused, as it is for the turn's own routes."""
    mask = torch.full((total,), -1, dtype=torch.int8)
    known = False
    for r in parts:
        n = r.num_tokens
        fed = r._fed_mask
        if fed is not None and fed.numel() == n:
            known = True
            mask[:n] = torch.where((fed == 1) & (mask[:n] == -1), 1, mask[:n]).to(torch.int8)
            mask[:n][fed == 0] = 0
        for ids in r._router_ids or ():
            if ids.numel() == n and bool((ids == PADDING_ID).any()):
                known = True
                mask[:n][ids == PADDING_ID] = 0
    return mask if known else None


def _conversation_places(parts: list[Routes], total: int) -> torch.Tensor | None:
    """Each position's place in the conversation as the turns that routed it were fed it (see ``Routes._seq_pos``), -1
    where no turn knows it or two turns disagree; None where none knows any. A replay checks them with the ids."""
    places = torch.full((total,), -1, dtype=torch.long)
    differ = torch.zeros(total, dtype=torch.bool)
    known = False
    for r in parts:
        n, mine = r.num_tokens, r._seq_pos
        if mine is None or mine.numel() != n:
            continue
        known = True
        now = places[:n]
        differ[:n] |= (now != -1) & (mine != -1) & (mine != now)
        places[:n] = torch.where(now == -1, mine, now)
    return places.masked_fill(differ, -1) if known else None


def _conversation_tokens(parts: list[Routes], given: list[list[int]] | None, total: int) -> torch.Tensor:
    """The token of each position of the conversation, -1 where no turn knows it: from the ids given, and from
    those each turn's routes know (:attr:`Routes.token_ids`, as read from an engine's output), which must agree."""
    tokens = torch.full((total,), -1, dtype=torch.long)
    for i, r in enumerate(parts):
        for mine in (r.with_token_ids(given[i])._token_ids if given is not None else None, r._token_ids):
            if mine is None:
                continue
            n = mine.numel()
            clash = (tokens[:n] >= 0) & (mine >= 0) & (tokens[:n] != mine)
            if bool(clash.any()):
                at = int(clash.nonzero()[0])
                raise RoutesValidationError(
                    f"turn {i}'s tokens disagree at position {at}: {int(mine[at])} there, {int(tokens[at])} in an "
                    "earlier turn or the ids given. The history was re-tokenised, or the ids given are not those the "
                    "engine routed: the turns are not one sequence"
                )
            tokens[:n] = torch.where(mine >= 0, mine, tokens[:n])
    return tokens
