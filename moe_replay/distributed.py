"""Routes across processes: gather every rank's routes to one rank, send them back.

Under data parallelism (DDP, FSDP2) each rank attaches its own session and captures or
replays its own tokens; nothing in capture or replay talks across ranks. These helpers
move routes when one process must see all of them (save one file, compare with an
engine's output, hand each rank its share of routes recorded elsewhere). They use
``torch.distributed`` collectives on tensors: first the sizes, then one padded tensor per
rank; no pickling. With NCCL the tensors travel through the current CUDA device.

Example (every rank runs this, e.g. under ``torchrun``)::

    routes = session.routes()                     # this rank's tokens
    parts = mr.distributed.gather_routes(routes)  # on rank 0: one Routes per rank; else None
    if dist.get_rank() == 0:
        mr.Routes.cat(parts).save("routes.npz")
    mine = mr.distributed.scatter_routes(parts)   # each rank gets its own part back
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._checks import check_count, check_dense, is_integer
from ._choice_record import choices_from_ints, choices_to_ints
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    RoutesValidationError,
    SessionStateError,
)
from .routes import Routes

__all__ = ["gather_routes", "scatter_routes", "split_routes"]


def split_routes(routes: Routes, tokens: Sequence[int]) -> list[Routes]:
    """Cut routes along tokens into consecutive parts of the given sizes (per batch, per rank).

    Each part of a capture knows the rows of its forwards that it holds, so
    :func:`~moe_replay.split_generation` refuses a rank's share of a ``generate()`` capture
    (split the capture per sequence first, then share the sequences out).

    Example:
        >>> import torch, moe_replay as mr
        >>> r = mr.Routes([torch.arange(10).reshape(5, 2) % 4], names=["gate"], num_experts=4)
        >>> [p.num_tokens for p in mr.distributed.split_routes(r, [2, 3])]
        [2, 3]
    """
    if not isinstance(routes, Routes):
        raise ArgumentTypeError(f"split_routes takes Routes, got {type(routes).__name__}")
    sizes = [check_count(t, f"split size {i}") for i, t in enumerate(_ordered(tokens, "split_routes sizes"))]
    if sum(sizes) != routes.num_tokens:
        rest = routes.num_tokens - sum(sizes[:-1])
        fix = f" (the last part takes the rest: {[*sizes[:-1], rest]})" if sizes and rest >= 0 else ""
        raise InvalidArgumentError(
            f"split sizes {sizes} add up to {sum(sizes)}, not the {routes.num_tokens} tokens of these routes: give "
            f"sizes that cover every row once{fix}, so that no row is dropped or asked for twice; routes of a "
            "BatchLayout are cut at whole batch rows (multiples of its row_length)"
        )
    out, start = [], 0
    for t in sizes:
        part = routes[start : start + t]  # (a slice keeps the rows of the capture's forwards that it holds)
        # (each share of rows an engine reader placed by their count alone is placed so too: no rows chosen here)
        part._rows_untold = routes._rows_untold
        out.append(part)
        start += t
    return out


def _ordered(values: Sequence[int], what: str) -> Sequence[int]:
    """``values`` if they come in an order (a list, tuple, 1-D tensor or array), else a clear error.

    A set or a mapping iterates in an order of its own (``{3, 2}`` gives 2 first), which would
    cut the parts in the wrong sizes without a word.
    """
    if isinstance(values, torch.Tensor | np.ndarray):
        check_dense(values, what)
        if values.ndim != 1:
            raise InvalidArgumentError(f"{what} must be 1-D, one size per part; got shape {tuple(values.shape)}")
        return values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ArgumentTypeError(
            f"{what} must be one size per part, in order (a list, a tuple or a 1-D tensor), got {type(values).__name__}"
        )
    return values


def _check_initialized(what: str) -> None:
    """Refuse a collective before ``torch.distributed`` has a process group (not under ``torchrun``, say)."""
    if not dist.is_available():
        raise SessionStateError(f"{what} needs torch.distributed, which this build of torch does not include")
    if not dist.is_initialized():
        raise SessionStateError(
            f"{what} is a collective, but torch.distributed has no process group: call "
            "torch.distributed.init_process_group() on every rank first (torchrun sets up its environment)"
        )


def _members(group: dist.ProcessGroup | None, what: str) -> list[int]:
    """The global ranks of ``group``, in group-rank order; refuse a group this process is not in.

    A process outside the group takes no part in its collectives (torch skips them there): it
    is refused on its own, and the members go on without it.
    """
    outside = group is dist.GroupMember.NON_GROUP_MEMBER
    if not outside and group is not None and not isinstance(group, dist.ProcessGroup):
        raise ArgumentTypeError(f"{what} takes group=None or a torch.distributed ProcessGroup, got {group!r:.60}")
    if outside or dist.get_rank(group) < 0:
        raise InvalidArgumentError(
            f"{what}: this process (global rank {dist.get_rank()}) is not a member of the group (dist.new_group "
            "gives the processes left out a placeholder): call it only on the group's ranks"
        )
    return dist.get_process_group_ranks(group)


def _peer(rank: object, ranks: Sequence[int]) -> int:
    """``rank`` as the global rank of a member of the group, or -1 (refused after the ranks compared theirs)."""
    return int(rank) if is_integer(rank) and int(rank) in ranks else -1  # type: ignore[call-overload]


def _check_peers(mine: object, peers: Sequence[int], ranks: Sequence[int], what: str, name: str) -> int:
    """Refuse, on every rank, a ``name`` (``dst``/``src``) that is no member's rank or that the ranks disagree on.

    ``peers`` holds what each rank of the group passed (:func:`_peer`), as every rank received it,
    so every rank raises, where a collective with two roots would leave them all waiting.
    """
    if _peer(mine, ranks) < 0:
        raise InvalidArgumentError(
            f"{name}={mine!r} is not a rank of the group; give the global rank of one of its members {ranks}"
        )
    bad = [r for r, p in enumerate(peers) if p < 0]
    if bad:
        raise InvalidArgumentError(f"{what}: group rank(s) {bad} passed a {name} that is not a rank of the group")
    if len(set(peers)) != 1:
        raise InvalidArgumentError(
            f"{what}: the ranks passed different {name} values {list(peers)} (by group rank); every rank of the "
            f"group must pass the same {name}"
        )
    return int(mine)  # type: ignore[call-overload]


def _device(group: dist.ProcessGroup | None) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint_words(routes: Routes) -> list[int]:
    fp = int(routes.fingerprint, 16)  # 64 bits, sent as two non-negative 32-bit words
    return [fp >> 32, fp & 0xFFFFFFFF]


def _wire_dtype(routes: Routes) -> torch.dtype:
    # indices travel shifted by one (-1 rows become 0); NCCL has no int16
    return torch.uint8 if max(routes.experts_per_layer, default=0) < 256 else torch.int32


def _pack(routes: Routes, device: torch.device) -> torch.Tensor:
    dtype = _wire_dtype(routes)
    flat = [(d.reshape(-1).to(torch.int32) + 1).to(dtype) for d in routes._data]
    return torch.cat(flat).to(device) if flat else torch.empty(0, dtype=dtype, device=device)


def _known(routes: Routes) -> list[int]:
    """What a capture knows of its forwards, as ints: the ``(rows, calls)`` runs, what each row was fed, moves.

    :meth:`Session.routes` records them and :func:`~moe_replay.split_generation` checks them (and
    the rows a ``keep_newest`` capture dropped); routes sent to another rank are the same capture,
    so they travel with the rows and :func:`_restore` puts them back. Laid out as: the count of
    runs (-1: none known) and the runs flat; the count of forwards whose router calls are known (-1: none,
    ``Routes._forward_calls``) and each one's calls (< 0: sliced); the length of the name of the cache method that
    moved rows (0: none) and its UTF-8 bytes; likewise the name of the cache type given to two
    decode loops in turn, what picked rows out of order, and the engine reader that placed the rows
    by their count alone (``Routes._rows_untold``); the count of the routers the routes were
    recorded on (-1: not known) and each one's name, as its length and UTF-8 bytes (a replay
    tells a wrapper's prefix from a part of the model by them); the count of rows whose fed token
    ids are known (-1: none) and those ids; likewise the prompt-mask values, and each row's place
    in the order of the tokens (rows of routers that saw the tokens sequence-first), in the batch a layout laid it out
    for (``Routes._layout_pos``) and in its sequence as its forward gave it (``Routes._seq_pos``), and the rows back to
    the forward whose KV cache its forward went on from (``Routes._lineage``); last, 1
    where the rows are in the order their routers saw the tokens of forwards fed embeddings,
    not told (``Routes._order_untold``), plus 2 where they are a capture's rows in the order its
    routers saw the tokens, which it told (``Routes._routers_order``), plus 4 times the count of routes
    joined into them (``Routes._joined``); then why token ids were lost (length and
    UTF-8 bytes, 0: none), the settings a remap of each router's ids after its decision read at capture
    (``Routes._ids_settings``, as JSON: length and UTF-8 bytes, 0: none), the mask of the tokens its first
    forward's routers saw where the model took the padding out (``Routes._prompt_kept``: -1 where none, else its
    two sizes and values), the rankings by which a module chose the tokens reaching its routers
    (``Routes._token_choices``, ``Routes._choice_forwards`` and ``Routes._choice_places``: see
    :func:`~moe_replay._choice_record.choices_to_ints`), and each router's own token ids
    (``Routes._router_ids``: -1 where none, else each router's count of rows and its ids), followed where they are
    kept by each router's own calls (``Routes._router_calls``: -1 where none, else for each router -1 where not known,
    or its count of ``(rows, calls)`` runs, the runs flat, its count of forwards and each one's calls).
    """
    calls = routes._call_rows
    out = [-1] if calls is None else [len(calls), *(int(v) for run in calls for v in run)]
    each = routes._forward_calls if calls is not None else None  # (the router calls of each forward)
    out += [-1] if each is None else [len(each), *(int(c) for c in each)]
    for text in (routes._rows_moved, routes._caches_interleaved, routes._rows_picked, routes._rows_untold):
        encoded = (text or "").encode()
        out += [len(encoded), *encoded]
    recorded = routes._recorded_names
    out += [-1] if recorded is None else [len(recorded)]
    for name in recorded or ():
        encoded = name.encode()
        out += [len(encoded), *encoded]
    for fed in (
        routes._token_ids,
        routes._fed_mask,
        routes._token_rank,
        routes._layout_pos,
        routes._seq_pos,
        routes._lineage,
    ):
        out += [-1] if fed is None else [fed.numel(), *fed.tolist()]
    out.append(int(routes._order_untold) | 2 * int(routes._routers_order) | 4 * routes._joined)
    lost = (routes._ids_lost or "").encode()
    out += [len(lost), *lost]
    # (the settings a remap of a router's ids after its decision read at capture, by router: a replay compares them)
    held = json.dumps(routes._ids_settings).encode() if routes._ids_settings else b""
    out += [len(held), *held]
    kept = routes._prompt_kept  # (a first forward's mask of the tokens its routers saw: its shape, then its values)
    out += [-1] if kept is None else [*kept.shape, *kept.reshape(-1).long().tolist()]
    out += choices_to_ints(routes._token_choices, routes._choice_forwards, routes._choice_places, routes.names)
    if routes._router_ids is None:
        return [*out, -1]
    for ids in routes._router_ids:
        out += [ids.numel(), *ids.tolist()]
    if routes._router_calls is None:
        return [*out, -1]
    out.append(len(routes._router_calls))
    for own in routes._router_calls:
        if own is None:
            out.append(-1)
            continue
        runs, forwards = own
        out += [len(runs), *(int(v) for run in runs for v in run), len(forwards), *(int(c) for c in forwards)]
    return out


def _restore(routes: Routes, known: Sequence[int], dropped: int) -> Routes:
    """Routes received from another rank, with its capture's forwards and dropped rows (see :func:`_known`)."""
    runs, at = int(known[0]), 1
    if runs >= 0:
        routes._call_rows = tuple((int(known[at + 2 * i]), int(known[at + 2 * i + 1])) for i in range(runs))
        at += 2 * runs
    n, at = int(known[at]), at + 1
    if n >= 0:  # (the router calls of each forward, where the sender knew them)
        routes._forward_calls = tuple(int(c) for c in known[at : at + n])
        at += n
    texts: list[str | None] = []
    for _ in range(4):  # the cache method that moved rows, the cache type given to two loops in turn, rows picked,
        # and the engine reader that placed the rows by their count alone
        n, at = int(known[at]), at + 1
        texts.append(bytes(int(b) for b in known[at : at + n]).decode() if n else None)
        at += n
    routes._rows_moved, routes._caches_interleaved, routes._rows_picked, routes._rows_untold = texts
    count, at = int(known[at]), at + 1
    recorded = []
    for _ in range(max(count, 0)):  # the routers the routes were recorded on
        n, at = int(known[at]), at + 1
        recorded.append(bytes(int(b) for b in known[at : at + n]).decode())
        at += n
    routes._recorded_names = tuple(recorded) if count >= 0 else None
    fed: list[torch.Tensor | None] = []
    for dtype in (torch.long, torch.int8, torch.long, torch.long, torch.long, torch.long):
        n, at = int(known[at]), at + 1
        fed.append(torch.tensor(list(known[at : at + n]), dtype=dtype) if n >= 0 else None)
        at += max(n, 0)
    routes._token_ids, routes._fed_mask, routes._token_rank, routes._layout_pos, routes._seq_pos, routes._lineage = fed
    routes._order_untold, routes._routers_order = bool(int(known[at]) & 1), bool(int(known[at]) & 2)
    routes._joined = int(known[at]) >> 2
    at += 1
    n, at = int(known[at]), at + 1
    routes._ids_lost = bytes(int(b) for b in known[at : at + n]).decode() if n else None
    at += n
    n, at = int(known[at]), at + 1
    if n:
        held = json.loads(bytes(int(b) for b in known[at : at + n]).decode())
        routes._ids_settings = {name: tuple((k, v) for k, v in pairs) for name, pairs in held.items()}
    at += n
    if int(known[at]) >= 0:  # (a first forward's mask of the tokens its routers saw)
        rows, cols = int(known[at]), int(known[at + 1])
        flat = list(known[at + 2 : at + 2 + rows * cols])
        routes._prompt_kept = torch.tensor(flat, dtype=torch.bool).reshape(rows, cols)
        at += 2 + rows * cols
    else:
        at += 1
    # (which tokens the modules that choose them let reach their routers, and how many rankings each forward took)
    record = choices_from_ints(known, at, routes.names)
    routes._token_choices, routes._choice_forwards, routes._choice_places, at = record
    if int(known[at]) >= 0:  # (each router's own token ids)
        per = []
        for _ in routes.names:
            n, at = int(known[at]), at + 1
            per.append(torch.tensor(list(known[at : at + n]), dtype=torch.long))
            at += n
        routes._router_ids = tuple(per)
        count, at = int(known[at]), at + 1
        if count >= 0:  # (each router's own calls, where the sender knew them)
            each: list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]] | None] = []
            for _ in range(count):
                n, at = int(known[at]), at + 1
                if n < 0:
                    each.append(None)
                    continue
                own = tuple((int(known[at + 2 * i]), int(known[at + 2 * i + 1])) for i in range(n))
                at += 2 * n
                m, at = int(known[at]), at + 1
                each.append((own, tuple(int(c) for c in known[at : at + m])))
                at += m
            routes._router_calls = tuple(each)
    routes._dropped_rows = int(dropped)
    return routes


def _unpack(flat: torch.Tensor, tokens: Sequence[int], like: Routes, validated: bool) -> Routes:
    data, start = [], 0
    for t, k in zip(tokens, like.k_per_layer, strict=True):
        n = int(t) * k
        data.append((flat[start : start + n].to(torch.int32) - 1).reshape(int(t), k))
        start += n
    # rows of routes built with validate=False stay unchecked: replay checks them before any forward
    return Routes._trusted(data, like.names, like.experts_per_layer, validated)


def gather_routes(routes: Routes, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Routes] | None:
    """Collect every rank's routes on rank ``dst``.

    Every rank of ``group`` must call it, with the same ``dst``. Ranks may hold different
    token counts. What a capture knows of its forwards (which
    :func:`~moe_replay.split_generation` checks) comes along with its rows.

    Returns:
        On ``dst``: one :class:`Routes` per rank of the group, in rank order. Elsewhere: None.

    Raises:
        RoutesValidationError: on every rank, when the ranks' routes are for different routers.
        ArgumentTypeError: on every rank, when a rank passed something else than Routes.
        InvalidArgumentError: on every rank, when a rank's ``dst`` is not a rank of the group or
            the ranks passed different ones; on this rank alone, when it is not in ``group``.
        SessionStateError: no process group was initialized.
    """
    _check_initialized("gather_routes")
    ranks = _members(group, "gather_routes")
    device = _device(group)
    world = len(ranks)
    ok = isinstance(routes, Routes)
    known = _known(routes) if ok else []
    # a header of the same size on every rank, whatever it holds: a rank that cannot take part says so here,
    # and every rank raises, instead of one raising while the others wait in a collective
    fixed = (
        [1, *_fingerprint_words(routes), routes.num_layers, int(routes._validated), routes._dropped_rows, len(known)]
        if ok
        else [0] * 7
    )
    header = torch.tensor([*fixed, _peer(dst, ranks)], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    rows = [h.tolist() for h in headers]
    if not ok:
        raise ArgumentTypeError(f"gather_routes takes Routes, got {type(routes).__name__} (on every rank)")
    failed = [r for r, h in enumerate(rows) if not h[0]]
    if failed:
        raise ArgumentTypeError(f"gather_routes: group rank(s) {failed} passed something else than Routes")
    dst = _check_peers(dst, [h[7] for h in rows], ranks, "gather_routes", "dst")
    if len({tuple(h[1:4]) for h in rows}) != 1:
        raise RoutesValidationError(
            "the ranks hold routes of different router sets (names, expert counts or k differ): every rank "
            f"must capture with the same model; this rank's routes: {routes!r}"
        )
    # every rank's row counts per router
    sizes = torch.tensor(routes.tokens_per_layer, dtype=torch.int64, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    if sizes.numel():
        dist.all_gather(all_sizes, sizes, group=group)
    got = [t.tolist() for t in all_sizes]
    layers = routes.num_layers
    tokens = [g[:layers] for g in got]
    lengths = [sum(t * k for t, k in zip(ts, routes.k_per_layer, strict=True)) for ts in tokens]
    longest = max(lengths)
    mine = _pack(routes, device)
    padded = torch.zeros(longest, dtype=mine.dtype, device=device)
    padded[: mine.numel()] = mine
    is_dst = dist.get_rank() == dst
    bufs = [torch.empty_like(padded) for _ in range(world)] if is_dst else None
    dist.gather(padded, bufs, dst=dst, group=group)
    # then what its capture knows of its forwards, padded to the most any rank has
    most = max(h[6] for h in rows)
    sent = torch.tensor(known + [0] * (most - len(known)), dtype=torch.int64, device=device)
    knowns = [torch.empty_like(sent) for _ in range(world)] if is_dst else None
    dist.gather(sent, knowns, dst=dst, group=group)
    if not is_dst:
        return None
    assert bufs is not None and knowns is not None
    return [
        _restore(_unpack(b[:n].cpu(), ts, routes, bool(h[4])), k[: h[6]].tolist(), h[5])
        for b, n, ts, h, k in zip(bufs, lengths, tokens, rows, knowns, strict=True)
    ]


# why the source rank refused its parts, told to every rank so that all raise
_SCATTER_REFUSALS = {
    1: (
        InvalidArgumentError,
        "scatter_routes needs one Routes per rank ({world}) on the source rank {src}, got {given}. Cut one batch "
        "into {world} parts with split_routes(routes, sizes); parts gathered under another world size: join them "
        "with Routes.cat, then cut them again (other ranks pass None)",
    ),
    2: (ArgumentTypeError, "scatter_routes takes Routes parts; the source rank {src} was given something else"),
    3: (RoutesValidationError, "scatter_routes: the parts on source rank {src} hold routes of other router sets"),
}


def _scatter_refusal(parts: Sequence[Routes] | None, world: int) -> int:
    if parts is None or isinstance(parts, Routes | str) or not isinstance(parts, Sequence) or len(parts) != world:
        return 1
    if not all(isinstance(p, Routes) for p in parts):
        return 2
    if len({p.fingerprint for p in parts}) != 1:
        return 3
    return 0


#: What :func:`_given_count` sends for ``parts`` that are no list of parts: None, one Routes, anything else.
_GIVEN_NONE, _GIVEN_ROUTES, _GIVEN_OTHER = -1, -2, -3


def _given_count(parts: object) -> int:
    """What the source rank was given, as one int every rank receives: the number of parts, or a code for none."""
    if parts is None:
        return _GIVEN_NONE
    if isinstance(parts, Routes):
        return _GIVEN_ROUTES
    if isinstance(parts, str) or not isinstance(parts, Sequence):
        return _GIVEN_OTHER
    return len(parts)


def _given_text(count: int) -> str:
    """:func:`_given_count`'s int said in words."""
    words = {_GIVEN_NONE: "None", _GIVEN_ROUTES: "one Routes (not a list of parts)", _GIVEN_OTHER: "no list of parts"}
    return words.get(count, f"{count} part{'s' if count != 1 else ''}")


def scatter_routes(parts: Sequence[Routes] | None, src: int = 0, group: dist.ProcessGroup | None = None) -> Routes:
    """Send rank ``i`` of the group ``parts[i]`` from rank ``src``; the inverse of :func:`gather_routes`.

    Every rank of ``group`` must call it, with the same ``src``; only ``src`` passes ``parts``
    (one per rank; other ranks pass None). Use :func:`split_routes` to cut one global batch into
    the parts. What a capture knows of its forwards comes along with its rows.

    Returns:
        This rank's routes.

    Raises:
        InvalidArgumentError, ArgumentTypeError, RoutesValidationError: on every rank, when
            the source rank's ``parts`` are not one Routes per rank of the same routers.
        InvalidArgumentError: on every rank, when a rank's ``src`` is not a rank of the group or
            the ranks passed different ones; on this rank alone, when it is not in ``group``.
        SessionStateError: no process group was initialized.
    """
    _check_initialized("scatter_routes")
    ranks = _members(group, "scatter_routes")
    device = _device(group)
    world = len(ranks)
    root = _peer(src, ranks)
    is_src = root >= 0 and dist.get_rank() == root
    meta: list[int] = [0, 0, 0, 0, 0]
    sent: list[list[int]] = []  # on the source: what each part's capture knows of its forwards
    if is_src:
        refused = _scatter_refusal(parts, world)
        if refused:
            meta = [refused, _given_count(parts), 0, 0, 0]
        else:
            assert parts is not None
            first = parts[0]
            names = [n.encode() for n in first.names]
            sent = [_known(p) for p in parts]
            meta = [0, first.num_layers, sum(len(n) for n in names), int(_wire_dtype(first) == torch.int32)]
            meta.append(max(len(known) for known in sent))
            meta += [*first.experts_per_layer, *first.k_per_layer, *(len(n) for n in names)]
            meta += [int(p._validated) for p in parts]
            for p in parts:
                meta += list(p.tokens_per_layer)
            for p, known in zip(parts, sent, strict=True):
                meta += [p._dropped_rows, len(known)]
    # every rank says which rank it takes for the source (all must agree before a broadcast from it), and
    # the source its layout: whether it refused, router count, names length, index width, the longest of
    # what the parts' captures know of their forwards (scattered after the rows)
    head = torch.tensor([root, *meta[:5]], dtype=torch.int64, device=device)
    heads = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(heads, head, group=group)
    rows = [h.tolist() for h in heads]
    src = _check_peers(src, [h[0] for h in rows], ranks, "scatter_routes", "src")
    refused, layers, name_bytes, wide, longest_known = rows[ranks.index(src)][1:]
    if refused:
        cls, text = _SCATTER_REFUSALS[refused]
        raise cls(text.format(world=world, src=src, given=_given_text(layers)))
    body = torch.zeros(3 * layers + world + world * layers + 2 * world, dtype=torch.int64, device=device)
    names_t = torch.zeros(name_bytes, dtype=torch.uint8, device=device)
    if is_src:
        body.copy_(torch.tensor(meta[5:], dtype=torch.int64))
        if name_bytes:
            names_t.copy_(torch.frombuffer(bytearray(b"".join(names)), dtype=torch.uint8))
    dist.broadcast(body, src=src, group=group)
    if name_bytes:
        dist.broadcast(names_t, src=src, group=group)
    b = body.tolist()
    experts, ks, name_lens = b[:layers], b[layers : 2 * layers], b[2 * layers : 3 * layers]
    validated = b[3 * layers : 3 * layers + world]
    at = 3 * layers + world
    tokens = [b[at + r * layers : at + (r + 1) * layers] for r in range(world)]
    at += world * layers
    forwards = [(b[at + 2 * r], b[at + 2 * r + 1]) for r in range(world)]  # each part's (dropped rows, known)
    raw, names_list, start = bytes(names_t.cpu().tolist()), [], 0
    for n in name_lens:
        names_list.append(raw[start : start + n].decode())
        start += n
    like = Routes._trusted([torch.empty(0, k, dtype=torch.int32) for k in ks], names_list, experts)
    lengths = [sum(t * k for t, k in zip(ts, ks, strict=True)) for ts in tokens]
    longest = max(lengths)
    dtype = torch.int32 if wide else torch.uint8
    out = torch.zeros(longest, dtype=dtype, device=device)
    chunks = None
    if is_src:
        assert parts is not None
        chunks = []
        for p in parts:
            flat = _pack(p, device)
            chunks.append(torch.cat([flat, flat.new_zeros(longest - flat.numel())]))
    dist.scatter(out, chunks, src=src, group=group)
    known_rows = torch.zeros(longest_known, dtype=torch.int64, device=device)
    dist.scatter(
        known_rows,
        [torch.tensor(k + [0] * (longest_known - len(k)), dtype=torch.int64, device=device) for k in sent]
        if is_src
        else None,
        src=src,
        group=group,
    )
    me = dist.get_rank(group)
    dropped, count = forwards[me]
    routes = _unpack(out[: lengths[me]].cpu(), tokens[me], like, bool(validated[me]))
    return _restore(routes, known_rows[:count].tolist(), dropped)
