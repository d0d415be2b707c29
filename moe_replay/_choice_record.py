"""The record of a choice, made outside the routers, of which tokens reach them, as routes carry it.

A capture of a model whose module chooses, by a ranking of its own scores, which tokens reach its routers
(Mixture-of-Depths; see :mod:`moe_replay._token_choices`) keeps the indices of each such ranking on its routes
(``Routes._token_choices``: ``(module path, indices)`` in call order) and how many of them each forward of the capture
took (``Routes._choice_forwards``), and where each router stood in its rows as each was taken
(``Routes._choice_places``: by router name, its rows written then; None where not told). This module keeps that
record meaningful where routes are cut, joined, renamed, written to a file or sent to another process: the rankings
of the forwards kept stay, those of a forward cut through per sequence are cut alike where each ranking holds one row
per sequence, and anything else drops the record (a replay of such routes on such a model is then refused, never run
on tokens it cannot show are the recorded ones). The places follow the rows: shifted by the rows cut off before them
or joined before them, renamed with their routers; in a forward cut through per sequence, a place at the forward's
first or last row is that of the rows kept, and any other is not told.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "Choices",
    "Places",
    "choices_from_ints",
    "choices_to_ints",
    "cut_choices",
    "cut_record",
    "dtype_code",
    "join_choices",
    "join_places",
    "places_from_rows",
    "places_to_rows",
    "read_choices",
    "rename_places",
]

#: ``(module path, indices)`` of each ranking, in call order
Choices = tuple[tuple[str, torch.Tensor], ...]
#: where each router stood in its rows at each ranking, by name (None: not told)
Places = tuple[dict[str, int] | None, ...]
#: the dtypes a record holds (a ranking's indices, a boolean mask picked by), by the code files and the wire give them
_DTYPES = (torch.int64, torch.bool, torch.int32)


def dtype_code(idx: torch.Tensor) -> int:
    """The code of ``idx``'s dtype for files and the wire (:data:`_DTYPES`; another: as int64)."""
    return _DTYPES.index(idx.dtype) if idx.dtype in _DTYPES else 0


def _forward_bounds(
    call_rows: tuple[tuple[int, int], ...] | None, forward_calls: tuple[int, ...] | None
) -> list[tuple[int, int]] | None:
    """The rows ``[start, end)`` each forward of a capture holds, from its ``(rows, calls)`` runs and the calls each
    forward made; None where they are not known whole (a forward sliced: negative calls)."""
    if call_rows is None or forward_calls is None or any(c < 0 for c in forward_calls):
        return None
    per_call = [rows for rows, calls in call_rows for _ in range(calls)]
    if sum(forward_calls) != len(per_call):
        return None
    bounds, at_call, at_row = [], 0, 0
    for c in forward_calls:
        n = sum(per_call[at_call : at_call + c])
        bounds.append((at_row, at_row + n))
        at_call, at_row = at_call + c, at_row + n
    return bounds


def _per_sequence(group: Choices, start: int, end: int, rows: int) -> Choices | None:
    """The rankings of one forward of ``rows`` rows, cut to its rows ``[start, end)``: where each ranking holds one
    row per sequence (as many sequences in all, each holding as many of the forward's rows) and the cut falls between
    sequences, those sequences' rows of each; else None."""
    batch = {int(idx.shape[0]) if idx.dim() >= 2 else -1 for _, idx in group}
    if len(batch) != 1:
        return None
    b = batch.pop()
    if b <= 0 or rows % b:
        return None
    per = rows // b
    if per == 0 or start % per or end % per:
        return None
    return tuple((path, idx[start // per : end // per].clone()) for path, idx in group)


def _cut_place(place: dict[str, int] | None, a: int, b: int, s: int, e: int, start: int) -> dict[str, int] | None:
    """Where the routers stood at a ranking of the forward of rows ``[a, b)`` kept as its rows ``[s, e)``, in routes
    whose rows start at ``start``: a place at the forward's first row is the first row kept, at its last the last, and
    one inside a forward cut through is not told (dropped)."""
    if place is None:
        return None
    out = {}
    for name, row in place.items():
        if (s, e) == (a, b) and a <= row <= b:
            out[name] = row - start
        elif row == a:
            out[name] = s - start
        elif row == b:
            out[name] = e - start
    return out


def cut_record(
    choices: Choices | None,
    counts: tuple[int, ...] | None,
    places: Places | None,
    call_rows: tuple[tuple[int, int], ...] | None,
    forward_calls: tuple[int, ...] | None,
    start: int,
    end: int,
) -> tuple[Choices | None, tuple[int, ...] | None, Places | None]:
    """The record of routes cut to their rows ``[start, end)`` (consecutive): the rankings of each forward whose
    rows are kept whole, and those of a forward cut between its sequences cut alike, with where the routers stood at
    each (see :func:`_cut_place`; None where ``places`` is); ``(None, None, None)`` where that cannot be told (the
    rankings per forward or the forwards' rows not known, a cut inside a sequence, a forward of no rows: nothing
    shows which rankings its replay takes)."""
    bounds = _forward_bounds(call_rows, forward_calls)
    if choices is None or counts is None or bounds is None or len(bounds) != len(counts) or sum(counts) != len(choices):
        return None, None, None
    if places is not None and len(places) != len(choices):
        places = None
    kept: list[tuple[str, torch.Tensor]] = []
    kept_places: list[dict[str, int] | None] = []
    kept_counts: list[int] = []
    at = 0
    for (a, b), n in zip(bounds, counts, strict=True):
        group, at = choices[at : at + n], at + n
        if a == b:  # (a forward of no rows: whether a replay of these rows runs it is not told)
            if start <= a < end or (a == b == start == end):
                return None, None, None
            continue
        s, e = max(a, start), min(b, end)
        if e <= s:
            continue
        if (s, e) != (a, b):
            cut = _per_sequence(group, s - a, e - a, b - a)
            if cut is None:
                return None, None, None
            group = cut
        kept.extend(group)
        if places is not None:
            kept_places.extend(_cut_place(p, a, b, s, e, start) for p in places[at - n : at])
        kept_counts.append(n)
    return tuple(kept), tuple(kept_counts), None if places is None else tuple(kept_places)


def cut_choices(
    choices: Choices | None,
    counts: tuple[int, ...] | None,
    call_rows: tuple[tuple[int, int], ...] | None,
    forward_calls: tuple[int, ...] | None,
    start: int,
    end: int,
) -> tuple[Choices | None, tuple[int, ...] | None]:
    """The rankings and counts of :func:`cut_record`, without the places."""
    kept, kept_counts, _ = cut_record(choices, counts, None, call_rows, forward_calls, start, end)
    return kept, kept_counts


def join_places(parts: Sequence[tuple[Choices | None, Places | None, dict[str, int]]]) -> Places | None:
    """Where the routers stood at each ranking of routes joined one after another, from each part's rankings, places
    and rows per router: each part's places shifted by the rows of the parts before it (a part's not told: None for
    each of its rankings); None where no part tells them."""
    if all(p is None for _, p, _ in parts):
        return None
    out: list[dict[str, int] | None] = []
    before: dict[str, int] = {}
    for choices, places, rows in parts:
        n = len(choices or ())
        if places is None or len(places) != n:
            out.extend([None] * n)
        else:
            out.extend(None if p is None else {k: v + before.get(k, 0) for k, v in p.items()} for p in places)
        for k, v in rows.items():
            before[k] = before.get(k, 0) + v
    return tuple(out)


def rename_places(places: Places | None, renamed: dict[str, str]) -> Places | None:
    """The places under the routers' new names (``renamed``: old name to new); a router not renamed is dropped."""
    if places is None:
        return None
    return tuple(None if p is None else {renamed[k]: v for k, v in p.items() if k in renamed} for p in places)


def places_to_rows(places: Places, names: Sequence[str]) -> torch.Tensor:
    """The places as ``[rankings, routers]`` int64, the routers in the order of ``names``, -1 where not told (a
    ranking whose place is not told: -1 for every router)."""
    out = torch.full((len(places), len(names)), -1, dtype=torch.long)
    for i, p in enumerate(places):
        for j, name in enumerate(names):
            if p is not None and name in p:
                out[i, j] = p[name]
    return out


def places_from_rows(rows: torch.Tensor, names: Sequence[str]) -> Places:
    """The places read from :func:`places_to_rows`' values (a ranking of -1 for every router: not told)."""
    return tuple(
        None if bool((row < 0).all()) else {name: int(v) for name, v in zip(names, row.tolist(), strict=True) if v >= 0}
        for row in rows
    )


def join_choices(
    parts: Sequence[tuple[Choices | None, tuple[int, ...] | None]],
) -> tuple[Choices | None, tuple[int, ...] | None]:
    """The record of routes joined one after another: each part's rankings in turn (their forwards run in turn at
    replay); none where a part holds none. The counts per forward, where every part knows its own."""
    if not parts or any(c is None for c, _ in parts):
        return None, None
    choices = tuple(one for c, _ in parts for one in c or ())
    counts = tuple(n for _, k in parts for n in k or ()) if all(k is not None for _, k in parts) else None
    return choices, counts


def choices_to_ints(
    choices: Choices | None,
    counts: tuple[int, ...] | None,
    places: Places | None = None,
    names: Sequence[str] = (),
) -> list[int]:
    """The record as ints for the wire: -1 where none, else the count of rankings and, for each, its path (length
    and UTF-8 bytes), its dtype's code (:func:`dtype_code`), its dimensions and shape and its values; then -1 or the
    count of forwards and each one's rankings; then -1 or, for each ranking, the row of each of ``names`` as it was
    taken (-1: not told; see :func:`places_to_rows`)."""
    if choices is None:
        return [-1]
    out = [len(choices)]
    for path, idx in choices:
        encoded = path.encode()
        out += [len(encoded), *encoded, dtype_code(idx), idx.dim(), *idx.shape, *idx.reshape(-1).long().tolist()]
    out += [-1] if counts is None else [len(counts), *counts]
    told = places is not None and len(places) == len(choices)
    out += [-1] if not told else [len(names), *places_to_rows(places or (), names).reshape(-1).tolist()]
    return out


def choices_from_ints(
    known: Sequence[int], at: int, names: Sequence[str] = ()
) -> tuple[Choices | None, tuple[int, ...] | None, Places | None, int]:
    """The record read from the wire at ``at`` (see :func:`choices_to_ints`), with the places under ``names``, and
    where the next field starts."""
    n, at = int(known[at]), at + 1
    if n < 0:
        return None, None, None, at
    choices = []
    for _ in range(n):
        size, at = int(known[at]), at + 1
        path = bytes(int(b) for b in known[at : at + size]).decode()
        at += size
        code, dims, at = int(known[at]), int(known[at + 1]), at + 2
        shape = [int(v) for v in known[at : at + dims]]
        at += dims
        numel = 1
        for v in shape:
            numel *= v
        values = torch.tensor([int(v) for v in known[at : at + numel]], dtype=torch.long).reshape(shape)
        choices.append((path, values.to(_DTYPES[code])))
        at += numel
    m, at = int(known[at]), at + 1
    counts = None
    if m >= 0:
        counts = tuple(int(v) for v in known[at : at + m])
        at += m
    width, at = int(known[at]), at + 1
    places = None
    if width >= 0:
        values = torch.tensor([int(v) for v in known[at : at + n * width]], dtype=torch.long).reshape(n, width)
        places = places_from_rows(values, names) if width == len(names) else None
        at += n * width
    return tuple(choices), counts, places, at


def read_choices(meta: Any, flat: torch.Tensor | None) -> tuple[Choices, tuple[int, ...] | None] | str:
    """The record read from a file: its metadata (``{"paths", "shapes", "dtypes", "forwards"}``) and its values, all
    rankings' one after another; or why they are not a record (the file is then corrupted)."""
    if not isinstance(meta, dict) or flat is None:
        return "its record of the tokens chosen before the routers is incomplete"
    paths, shapes, forwards = meta.get("paths"), meta.get("shapes"), meta.get("forwards")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return "the module paths of its record of the tokens chosen before the routers are not strings"
    if not isinstance(shapes, list) or len(shapes) != len(paths):
        return "its record of the tokens chosen before the routers holds no shape for each ranking"
    if not all(isinstance(s, list) and all(type(v) is int and v >= 0 for v in s) for s in shapes):
        return "the shapes of its record of the tokens chosen before the routers are not lists of sizes"
    dtypes = meta.get("dtypes", [0] * len(paths))
    if not isinstance(dtypes, list) or len(dtypes) != len(paths) or any(d not in range(len(_DTYPES)) for d in dtypes):
        return "its record of the tokens chosen before the routers holds no known dtype for each ranking"
    if flat.dim() != 1:
        return "the values of its record of the tokens chosen before the routers are not one list"
    if forwards is not None and (
        not isinstance(forwards, list)
        or not all(type(v) is int and v >= 0 for v in forwards)
        or sum(forwards) != len(paths)
    ):
        return "its record of the tokens chosen before the routers counts other rankings per forward than it holds"
    choices, at = [], 0
    for path, shape, code in zip(paths, shapes, dtypes, strict=True):
        numel = 1
        for v in shape:
            numel *= v
        if at + numel > flat.numel():
            return "its record of the tokens chosen before the routers holds fewer values than its shapes"
        choices.append((path, flat[at : at + numel].to(_DTYPES[code]).reshape(shape).clone()))
        at += numel
    if at != flat.numel():
        return "its record of the tokens chosen before the routers holds more values than its shapes"
    return tuple(choices), None if forwards is None else tuple(forwards)
