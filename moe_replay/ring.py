"""Device-resident buffers: the capture ring and the replay source.

A capture ring records one router's expert indices in call order. In eager mode it grows:
the host knows how many rows each call writes from the shape of its input, so it keeps
its own count and, when a write would pass the end of the current device segment,
continues in a new one (doubling what is held). Rows never move, nothing is read back to
the host, and :meth:`CaptureRing.rows` joins the segments when the capture is read.

Where addresses or shapes must stay fixed (inside a CUDA graph being captured, inside a
region ``torch.compile`` traced), the ring writes into its first segment at a device-side
cursor, exactly as a fixed ring: that code runs again later without any Python, so the
ring cannot grow there. A ring written that way is *fixed* from then on (its first
segment is baked into the graph). The replay source keeps its position in a device
cursor too.

Eager calls leave the device cursor behind: the host knows their rows, so each call is one
copy (capture) or no kernel at all (a replay read is a view of rows already cast), and the
rows the device cursor has not counted yet (the *lag*) are added to it in one kernel where a
reader needs it: reading ``written``/``consumed``, an eager call on a fixed ring, the first
run of compiled code, and the start of a CUDA-graph capture (:func:`_torch_compat.before_graph_capture`).
A graph capture that finds a lag all the same raises: it would bake a stale cursor in.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from . import _torch_compat, _triton
from ._checks import is_integer
from .errors import CaptureOverflowError, InvalidArgumentError

_SECOND = operator.itemgetter(1)
_CAPTURE_RING = operator.attrgetter("capture_ring")
# (endless: map() stops at its shortest argument, so these are never used up)
_EVERY_CALLS, _EVERY_NONE, _EVERY_SECOND = itertools.repeat("_calls"), itertools.repeat(()), itertools.repeat(_SECOND)

__all__ = ["OVERFLOW_MARK", "CaptureRing", "ReplaySource", "calls_made_by", "index_dtype"]

#: Rows a replay source turns into int64 at once for eager reads (one cast for many decode steps).
_CHUNK_ROWS = 4096
#: the most elements a tensor holds (torch reads its sizes as int64)
_MAX_NUMEL = 2**63 - 1

#: Views a ring or a source prepares at once for eager calls of one size (one op for many calls).
_VIEWS = 64

#: Rings and sources on CUDA: a CUDA-graph capture first brings their device cursors up to date.
_LAGGING: weakref.WeakSet[CaptureRing | ReplaySource] = weakref.WeakSet()


def _catch_up_all() -> None:
    """Add every CUDA ring's and source's lag to its device cursor, and wait for it (before a graph
    capture begins: the graph's replays may run on another stream)."""
    devices = set()
    for obj in list(_LAGGING):
        if obj._lag:
            obj._catch_up()
            devices.add(obj._cursor.device)
    for device in devices:
        torch.cuda.synchronize(device)


def _no_lag(obj: CaptureRing | ReplaySource, what: str) -> None:
    if obj._lag:
        raise CaptureOverflowError(
            f"router '{obj.name}': a CUDA graph is being captured while {obj._lag} eagerly {what} rows are not yet "
            "counted on the device, so the graph would start at a stale position. Capture graphs with "
            "torch.cuda.graph (or make_graphed_callables, or torch.compile), which moe_replay brings up to date "
            "first; or read session.routes() before capturing"
        )


#: Start of the message of the device-side check a fixed CPU ring runs (see :meth:`CaptureRing.write`).
OVERFLOW_MARK = "moe_replay capture overflow:"


def index_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype that holds the indices ``0 .. num_experts - 1``.

    uint8 up to 256 experts (1 byte per index), int16 up to 32768, int32 up to 2**31.

    Example:
        >>> import moe_replay as mr
        >>> mr.index_dtype(128), mr.index_dtype(384)
        (torch.uint8, torch.int16)
    """
    if not is_integer(num_experts) or int(num_experts) < 1:  # (a numpy integer or 0-d tensor is taken: its value)
        raise InvalidArgumentError(f"num_experts must be a positive int, got {num_experts!r}")
    num_experts = int(num_experts)
    if num_experts > 2**31:
        raise InvalidArgumentError(
            f"num_experts={num_experts} is more than int32 indices hold (2**31 experts); no MoE routes this many"
        )
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def _static_address(t: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that ``t`` keeps its address across calls, as parameters do.

    CUDA graphs of ``mode="reduce-overhead"`` then read and update the ring in place instead
    of skipping graphs for a mutated input or copying it per call (see ``_torch_compat``).
    """
    return _torch_compat.mark_static_address(t)


#: ``() -> bool``: is dynamo tracing the caller? torch's own function, called in the caller's frame: a function of
#: this package would be compiled as a frame of its own where dynamo falls back frame by frame, and answer True for an
#: eager caller
_compiling = torch.compiler.is_compiling


class _Positions:
    """A shared ``arange`` per device, so a call slices positions instead of building them."""

    _cache: ClassVar[dict[torch.device, torch.Tensor]] = {}

    @classmethod
    def get(cls, device: torch.device, n: int) -> torch.Tensor:
        cur = cls._cache.get(device)
        if cur is None or cur.numel() < n:
            cur = _static_address(torch.arange(max(n, 1024), device=device, dtype=torch.long))
            cls._cache[device] = cur
        return cur


class Budget:
    """Bytes held by the capture rings of one session, against an optional limit."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.rings = 0  # rings drawing on it: growth near the limit leaves each its share

    def room(self) -> int | None:
        """Bytes that may still be allocated (None: no limit)."""
        return None if self.limit is None else self.limit - self.held


def calls_made_by(hooks: Sequence[Any]) -> tuple[int, ...]:
    """:meth:`CaptureRing.calls_made` of each of ``hooks``' ``capture_ring`` (0 for a hook of none), as a tuple.

    In C, with no Python frame per ring: a capture asks it at every forward's start and end."""
    calls = map(getattr, map(_CAPTURE_RING, hooks), _EVERY_CALLS, _EVERY_NONE)  # (None has no _calls: ())
    return tuple(map(sum, map(map, _EVERY_SECOND, calls)))


class CaptureRing:
    """One router's recorded rows (``k`` expert indices each) on its device, in call order.

    ``capacity`` is the first segment's rows: in eager mode the ring grows past it by
    adding segments; under CUDA-graph capture and ``torch.compile`` it is a fixed ring of
    ``capacity`` rows. With ``keep_newest=True`` it is a fixed ring that wraps: past
    ``capacity`` rows it overwrites the oldest (for monitoring, never for training data).

    ``written`` is the device-side count of rows written since :meth:`reset` (every path
    advances it; graph replays and compiled calls only advance it). Eager writes leave it
    behind and reading it brings it up to date (see the module docstring).

    Example:
        >>> import torch
        >>> from moe_replay.ring import CaptureRing
        >>> ring = CaptureRing(4, 2, 8, torch.device("cpu"))
        >>> ring.write(torch.arange(20).reshape(10, 2) % 8)   # 10 rows: a segment of 6 more
        >>> ring.write(torch.zeros(3, 2, dtype=torch.long))   # 13 rows: doubles what it holds
        >>> ring.rows_held, ring.nbytes, ring.rows(13).shape
        (20, 40, torch.Size([13, 2]))
    """

    def __init__(
        self,
        capacity: int,
        top_k: int,
        num_experts: int,
        device: torch.device,
        *,
        keep_newest: bool = False,
        name: str = "",
        budget: Budget | None = None,
    ) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"capacity must be at least 1 row, got {capacity}")
        self.top_k = int(top_k)
        self.num_experts = int(num_experts)
        self.device = torch.device(device)
        self.dtype = index_dtype(num_experts)
        self.keep_newest = bool(keep_newest)
        self.name = name
        self.budget = budget if budget is not None else Budget()
        self.budget.rings += 1
        self._row_bytes = self.top_k * self.dtype.itemsize
        self._cuda = self.device.type == "cuda"
        #: what fixed the ring's first segment in place (a graph or a compiled region), if anything did
        self.fixed_by: str | None = None
        self._fixed = self.keep_newest  # writes go to the first segment at the device cursor
        self._cursor = _static_address(torch.zeros((), dtype=torch.long, device=self.device))
        self._lag = 0  # rows eager writes made that _cursor does not count yet
        # views of the next rows for eager writes of one size (_view_n rows each), by the host count they start
        # at; none while the ring is fixed
        self._at: dict[int, torch.Tensor] = {}
        self._view_n = 0
        if self._cuda:
            _torch_compat.before_graph_capture(_catch_up_all)
            _LAGGING.add(self)
        self._segments: list[torch.Tensor] = []
        self._end = 0  # rows held over every segment
        self._set_first(int(capacity))
        self.reset()

    # ------------------------------------------------------------- storage
    def _alloc(self, rows: int, *, zeros: bool = False) -> torch.Tensor:
        nbytes = rows * self._row_bytes
        room = self.budget.room()
        if room is not None and nbytes > room:
            raise CaptureOverflowError(
                f"router '{self.name}' needs {rows} more rows ({_fmt_bytes(nbytes)}) to go on recording, which "
                f"would pass max_bytes={self.budget.limit} ({_fmt_bytes(self.budget.held)} held now). Raise "
                "max_bytes, capture fewer tokens per capture() block, or read the rows recorded before this "
                "forward with routes(allow_partial=True)"
            )
        if rows * self.top_k > _MAX_NUMEL:  # (torch reads sizes as int64: past that, a TypeError of its own)
            raise CaptureOverflowError(
                f"router '{self.name}': cannot allocate {rows} rows ({_fmt_bytes(nbytes)}): more elements than a "
                "tensor can hold. Ask for fewer rows (capacity=, reserve(), capture(expected_tokens=))"
            )
        make = torch.zeros if zeros else torch.empty
        try:
            with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
                t = make(rows, self.top_k, dtype=self.dtype, device=self.device)
        except RuntimeError as e:  # out of memory, or a size torch cannot allocate at all
            raise CaptureOverflowError(
                f"router '{self.name}': cannot allocate {rows} rows ({_fmt_bytes(nbytes)}) on {self.device} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}). Ask for fewer rows (capacity=, reserve()), "
                "or capture fewer tokens per capture() block"
            ) from e
        self.budget.held += nbytes
        return t

    def _set_first(self, rows: int) -> None:
        """(Re)allocate the first segment with ``rows`` rows, dropping every segment."""
        freed = sum(s.shape[0] for s in self._segments) * self._row_bytes
        self.budget.held -= freed
        try:
            buf = self._alloc(rows, zeros=True)
        except BaseException:
            self.budget.held += freed
            raise
        self._install_first(buf)

    def _install_first(self, buf: torch.Tensor) -> None:
        """Make ``buf`` (allocated by :meth:`_alloc`, the segments' bytes taken off the budget) the only segment."""
        rows = buf.shape[0]
        self.buf = _static_address(buf)
        self._segments = [self.buf]
        self._at = {}
        self._end = rows
        self.capacity = rows
        self._arange = _Positions.get(self.device, rows)
        self._overflow_msg = f"{OVERFLOW_MARK} router '{self.name}' would write past the {rows} rows of its fixed ring"

    @property
    def fixed(self) -> bool:
        """Does the ring write into its first segment only (``keep_newest``, or fixed by a graph)?"""
        return self._fixed

    @property
    def rows_held(self) -> int:
        """Rows allocated on the device, over every segment."""
        return sum(s.shape[0] for s in self._segments)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (``top_k`` indices)."""
        return self._row_bytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the device, over every segment."""
        return self.rows_held * self._row_bytes

    @property
    def written(self) -> torch.Tensor:
        """The device cursor: rows written since :meth:`reset`, counted on the device (0-dim int64)."""
        if self._lag:
            self._catch_up()
        return self._cursor

    def _catch_up(self) -> None:
        """Count the eager rows the device cursor is behind by (one kernel; eager code only).

        The cursor is raised to the host's count, never past it nor back: where compiled code
        or a graph brought it up to date first (or further), this changes nothing.
        """
        if self._lag:
            self._cursor.clamp_min_(self._host)
            self._lag = 0

    @property
    def host_written(self) -> int:
        """Rows written by eager calls since :meth:`reset` (exact unless the ring is fixed)."""
        return self._host

    def reset(self) -> None:
        """Forget every row (one device write, no host sync); the segments stay for the next capture."""
        self._cursor.zero_()
        self._lag = 0
        self._at = {}
        self._host = 0  # rows written by eager calls (all rows, for a ring that is not fixed)
        # rows of the eager calls, in order, as [rows, calls] runs (decode steps repeat one size): they sum to _host
        self._calls: list[list[int]] = []

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows since the last reset, allocated now rather than during forwards.

        An empty ring that no graph has fixed gets a first segment of ``rows`` rows, so
        a CUDA graph or compiled region captured afterwards holds them too.

        Raises:
            CaptureOverflowError: the ring is fixed with fewer rows, or ``max_bytes`` is passed.
        """
        rows = int(rows)
        if rows <= self.capacity:
            return
        if self._fixed:
            why = "keep_newest=True" if self.fixed_by is None else f"{self.fixed_by} writes into its first segment"
            if self.fixed_by is not None or self._host:
                raise CaptureOverflowError(
                    f"router '{self.name}' cannot make room for {rows} rows: its ring is fixed at "
                    f"{self.capacity} rows ({why}). Reserve before capturing the graph or compiling the model "
                    f"(session.reserve({rows})), or attach with capacity={rows}"
                )
        if self._host == 0:
            self._set_first(rows)
            self.reset()
            return
        held = self.rows_held
        if rows > held:
            more = max(rows - held, 1)
            self._segments.append(self._alloc(more))
            self._end += more
            self._at = {}

    def first_after_reset(self, rows: int) -> torch.Tensor | None:
        """The first segment :meth:`reserve` would allocate for ``rows`` rows once the ring is reset, allocated now
        and not installed (None where the ring has room for them): where the allocation fails, the ring and the
        rows it holds are left as they were. The caller takes the bytes of the ring's segments off the budget
        first (:meth:`install_first_after_reset` frees them) and gives them back where it gives up.

        Raises:
            CaptureOverflowError: a graph or a compiled region fixed the ring with fewer rows, or the rows
                cannot be allocated (``max_bytes``, more elements than a tensor holds, out of memory).
        """
        rows = int(rows)
        if rows <= self.capacity:
            return None
        if self.fixed_by is not None:
            raise CaptureOverflowError(
                f"router '{self.name}' cannot make room for {rows} rows: its ring is fixed at {self.capacity} rows "
                f"({self.fixed_by} writes into its first segment). Reserve before capturing the graph or compiling "
                f"the model (session.reserve({rows})), or attach with capacity={rows}"
            )
        return self._alloc(rows, zeros=True)

    def install_first_after_reset(self, buf: torch.Tensor) -> None:
        """Reset the ring and make ``buf`` (from :meth:`first_after_reset`) its only segment."""
        self.reset()
        self._install_first(buf)

    def bytes_after(self, rows: int, *, clear: bool) -> int:
        """Bytes the ring holds once cleared (``clear``: :meth:`reset`, then :meth:`release`) and made room
        for ``rows`` more rows by :meth:`reserve`: what those would allocate, worked out without allocating."""
        host = 0 if clear else self._host
        base = self.capacity if self._fixed or host <= self.capacity else self.rows_held
        return max(base, host + rows) * self._row_bytes

    def grow_first(self, rows: int) -> None:
        """A first segment of ``rows`` rows (more than it has), the rows written since the last reset moved
        into it in order: a ring sized for a graph or a compiled region keeps the capture it holds.

        Raises:
            CaptureOverflowError: ``max_bytes`` would be passed (nothing changed).
        """
        rows = int(rows)
        if rows <= self.capacity:
            return
        written = int(self.written)
        kept = self.rows(written, keep_newest=True) if written else None
        calls = self.call_rows(written)
        self._set_first(max(rows, 0 if kept is None else kept.shape[0]))
        self.reset()
        if kept is not None:
            self.write_eager(kept.to(self.device))
            self.keep_call_rows(calls)

    def release(self) -> None:
        """Free the segments past the first that hold no row (those an earlier capture grew)."""
        if len(self._segments) > 1 and (self._fixed or self._host <= self.capacity):
            self.budget.held -= sum(s.shape[0] for s in self._segments[1:]) * self._row_bytes
            del self._segments[1:]
            self._end = self.capacity
            self._at = {}

    # ------------------------------------------------------------- writing
    def write(self, idx: torch.Tensor) -> None:
        """Append the rows of ``idx`` (``[n, k]``, any integer dtype).

        Eager: at the host's count, growing when the current segment is full (no host
        sync, no copy of earlier rows). Under CUDA-graph capture or ``torch.compile``:
        into the fixed first segment at the device cursor.

        Raises:
            CaptureOverflowError: a fixed ring that the host can see would overflow (one
                call larger than it, or eager rows past its end), or growth would pass
                ``max_bytes``.
        """
        if _compiling():
            if self._lag:  # rows of eager writes before: the compiled code's first run counts them (only that
                # run: dynamo guards on the lag, 0 from then on); raised to the host count: twice is harmless
                self._cursor.clamp_min_(self._host)
                self._lag = 0
            self._fixed, self.fixed_by, self._at = True, "a compiled region", {}
            self._write_fixed(idx, idx.shape[0])
            return
        if self._cuda and torch.cuda.is_current_stream_capturing():
            self._write_fixed_eager(idx, idx.shape[0])
            return
        self.write_eager(idx)

    def write_eager(self, idx: torch.Tensor) -> None:
        """:meth:`write` for a caller that knows it runs eagerly, outside CUDA-graph capture.

        At the host's count, growing when the current segment is full (no host sync, no copy
        of earlier rows); the device cursor moves too, so a graph or compiled region that
        writes next in the same capture writes after these rows. The copy is made now, so
        whatever changes ``idx`` later (in place, through ``.data`` or another view) does not
        change what was recorded. The device cursor is left behind (``_lag``): one copy per call.
        """
        n = idx.shape[0]
        start = self._host
        view = self._at.get(start) if n == self._view_n else None
        if view is not None:  # decode: the same rows each call
            view.copy_(idx)  # first: a copy that fails (another device) counts nothing
        elif self._fixed:
            self._write_fixed_eager(idx, n)
            return
        else:
            if start + n > self._end:
                self._grow(start + n - self._end)
            self._place(idx, start)
            if n:
                self._prepare_views(start + n, n)
        self._host = start + n
        self._lag += n
        calls = self._calls  # (_count_call, inline: this runs at every captured router call)
        if calls and (last := calls[-1])[0] == n:
            last[1] += 1
        elif n and (not self.keep_newest or self._host <= self.capacity):
            calls.append([n, 1])

    def _prepare_views(self, start: int, n: int) -> None:
        """Views of the rows ``start, start + n, ...`` of the segment holding ``start`` (up to ``_VIEWS``)."""
        first = 0
        for seg in self._segments:
            at = start - first
            size = seg.shape[0]
            if at < size:
                m = min(_VIEWS, (size - at) // n)
                if m > 1:
                    self._at = dict(zip(range(start, start + m * n, n), seg.narrow(0, at, m * n).split(n), strict=True))
                    self._view_n = n
                    return
                break
            first += size
        self._at = {}

    def _grow(self, need: int) -> None:
        """Add a segment for at least ``need`` more rows: double what is held (allocated first, so
        a refused growth changes nothing)."""
        rows = max(need, self.rows_held)
        room = self.budget.room()
        if room is not None:  # under a limit, at most a fair share of what is left (each router grows alike)
            rows = max(need, min(rows, room // (self._row_bytes * max(self.budget.rings, 1))))
        self._segments.append(self._alloc(rows))
        self._end += rows

    def _place(self, rows: torch.Tensor, start: int) -> None:
        """Copy ``rows`` to the ring's rows ``start, start + 1, ...`` (over segments, with the cast)."""
        n, done, first = rows.shape[0], 0, 0
        for seg in self._segments:
            size = seg.shape[0]
            at = start + done - first
            if at < size:
                take = min(size - at, n - done)
                seg[at : at + take].copy_(rows if take == n else rows[done : done + take])
                done += take
                if done == n:
                    return
            first += size

    def _write_fixed_eager(self, idx: torch.Tensor, n: int) -> None:
        graph = self._cuda and torch.cuda.is_current_stream_capturing()
        if graph:
            _no_lag(self, "written")
        else:
            self._catch_up()
        if graph and not self._fixed:
            self._fixed, self.fixed_by, self._at = True, "a CUDA graph", {}
        if not self.keep_newest:
            # the host sees this call, not the graph replays and compiled calls: its count is a lower bound
            if graph and n > self.capacity:
                what = f"each replay of the CUDA graph being captured would write {n} rows"
            elif not graph and self._host + n > self.capacity:
                what = f"this forward would bring it to at least {self._host + n} rows"
            else:
                what = ""
            if what:
                raise CaptureOverflowError(
                    f"router '{self.name}': {what}, but its ring is fixed at {self.capacity} rows ({self.fixed_by} "
                    "writes into it, so it cannot grow). Size the ring for the whole capture before capturing the "
                    "graph or compiling: attach(..., capacity=rows) or session.reserve(rows); "
                    "mr.generation_capacity(batch, prompt_len, max_new_tokens) gives the rows of a generate() call"
                )
        if not graph:
            self._host += n
            self._count_call(n)
        self._write_fixed(idx, n)

    def _write_fixed(self, idx: torch.Tensor, n: int) -> None:
        """Rows at the device cursor into the first segment (wrapping), and advance it."""
        cap = self.capacity
        cursor = self._cursor
        if not self.keep_newest and not self._cuda:  # CPU: the device check raises at once, in compiled code too
            _torch_compat.assert_async(cursor + n <= cap, self._overflow_msg)
        if n > cap:  # only the newest rows can fit; `written` still counts all (an overflow, unless keep_newest)
            cursor.add_(n - cap)
            idx = idx[n - cap :]
            n = cap
        if _triton.enabled(idx) and _triton.ring_write(self.buf, cursor, idx, n):
            return  # CUDA: one kernel did it all (cursor, wrap, cast, advance)
        arange = self._arange if n <= self._arange.numel() else _Positions.get(self.device, n)
        pos = torch.remainder(cursor + arange[:n], cap)
        self.buf.index_copy_(0, pos, idx.to(self.buf.dtype))
        cursor.add_(n)

    def _count_call(self, n: int) -> None:
        """One more eager call of ``n`` rows (after ``_host`` counts them). A ``keep_newest`` ring counts its calls
        until it wraps, no further: it then drops rows, and its calls, bounded by its rows, stop growing."""
        calls = self._calls
        if calls and calls[-1][0] == n:
            calls[-1][1] += 1
        elif n and (not self.keep_newest or self._host <= self.capacity):
            calls.append([n, 1])

    # ------------------------------------------------------------- reading
    def call_rows(self, written: int) -> tuple[tuple[int, int], ...] | None:
        """The rows of each call since :meth:`reset`, as ``(rows, calls)`` runs in order; None where unknown.

        Known when every one of the ``written`` rows came from an eager call: a graph replay
        or a compiled call writes rows that no host count sees, and a ``keep_newest`` ring
        that wrapped dropped its oldest ones. Calls of no rows are left out.
        """
        if (self.keep_newest and written > self.capacity) or sum(n * c for n, c in self._calls) != written:
            return None
        return tuple((n, c) for n, c in self._calls)

    def calls_made(self) -> int:
        """Eager calls of rows counted since :meth:`reset` (see :meth:`call_rows`)."""
        return sum(map(_SECOND, self._calls))  # (C-level: it runs for every router at each forward's start and end)

    def last_call_rows(self) -> int:
        """Rows of the last eager call counted (0 where none is)."""
        return self._calls[-1][0] if self._calls else 0

    def join_since(self, made: int) -> None:
        """Count the eager calls after the first ``made`` as one call of all their rows (a router that decides chunk
        by chunk of the tokens: one call per run of them, together one decision on every token of its forward)."""
        calls = self._calls
        extra = self.calls_made() - made
        if extra < 2:
            return
        left = extra
        for n, c in reversed(calls):  # (the calls to join, all of a known row count, or nothing is joined)
            if n < 0:
                return
            left -= min(c, left)
            if not left:
                break
        total = 0
        while extra:
            n, c = calls[-1]
            take = min(c, extra)
            total += n * take
            extra -= take
            if take == c:
                calls.pop()
            else:
                calls[-1][1] = c - take
        if calls and calls[-1][0] == total:
            calls[-1][1] += 1
        else:
            calls.append([total, 1])

    def keep_call_rows(self, calls: tuple[tuple[int, int], ...] | None) -> None:
        """The calls of rows that were written here in one call, copied from the ring that recorded them."""
        known = calls is not None and sum(n * c for n, c in calls) == self._host
        # unknown: a run of -1 rows never lets the calls sum to the rows written
        self._calls = [[n, c] for n, c in calls] if known and calls is not None else [[-1, 1]]

    def overflowed(self, written: int) -> bool:
        """Did rows go past what the ring holds (never for a growing ring; ``keep_newest`` wraps)?"""
        return self._fixed and not self.keep_newest and written > self.capacity

    def rows(self, written: int | None = None, keep_newest: bool | None = None) -> torch.Tensor:
        """The rows in write order, on the host, in one pass over the segments.

        Args:
            written: the device count, from one batched read of every ring (read here if None).
            keep_newest: for a fixed ring that wrapped, return its newest ``capacity`` rows
                (what a ring built with ``keep_newest=True`` always does).
        """
        if written is None:
            written = int(self.written)
        # copies: the rows returned outlive this ring's next writes (a CPU ring's .cpu() would be the ring itself)
        if self._fixed:
            if written <= self.capacity:
                return self.buf[:written].to("cpu", copy=True)
            if not (self.keep_newest or keep_newest):
                raise AssertionError("overflow must be handled by the caller")
            start = written % self.capacity
            return torch.cat([self.buf[start:], self.buf[:start]]).cpu()
        if written != self._host:
            raise AssertionError(f"ring '{self.name}': device count {written} != host count {self._host}")
        if written <= self.capacity:
            return self.buf[:written].to("cpu", copy=True)
        out = torch.empty(written, self.top_k, dtype=self.dtype)
        pos = 0
        for seg in self._segments:
            take = min(seg.shape[0], written - pos)
            if take <= 0:
                break
            out[pos : pos + take].copy_(seg[:take])
            pos += take
        return out


class _Fed:
    """Whether a forward of a level of an attached model (see ``moe_replay._feeds.FeedForward``) runs now: set by its
    eager forward and, as dynamo traces it, by its compiled one (a store dynamo replays after the graph). Compiled code
    that reads rows checks it as it is traced (dynamo guards on it: code compiled where no forward runs, a MoE block
    compiled on its own, is traced apart from code compiled inside one).

    Only a replay's token check that looks for such reads (:attr:`ReplaySource.checked`) reads it from eager code:
    an eager forward stores it only while one is open (:attr:`checks`), so that a capture, or a replay with no such
    check, pays nothing for it. Code compiled inside a forward sets it as it is traced either way, so what dynamo
    guards on there does not depend on which block is open."""

    def __init__(self) -> None:
        self.on = False
        #: the token checks (by ``id``) open now that mark reads of rows outside every forward (see
        #: ``moe_replay._feeds.FeedCheck.start``): while none is, an eager forward leaves :attr:`on` as it is
        self.checks: set[int] = set()


#: see :class:`_Fed`
FORWARD = _Fed()


class ReplaySource:
    """The recorded rows of one router on its device, consumed in order by a device cursor.

    ``has_missing`` is fixed when the routes are loaded: only then does a read also
    need the native choice for -1 rows. Eager reads leave the device cursor behind, as
    eager ring writes do (see the module docstring).
    """

    def __init__(self, rows: torch.Tensor, num_experts: int, device: torch.device, name: str = "") -> None:
        self.name = name
        self.device = torch.device(device)
        self.num_rows = int(rows.shape[0])
        self.top_k = int(rows.shape[1])
        self.num_experts = int(num_experts)
        self.has_missing = bool((rows < 0).any()) if rows.numel() else False
        dtype = (
            index_dtype(num_experts) if not self.has_missing else torch.int16 if num_experts < 2**15 else torch.int32
        )
        # one padding row keeps reads past the end in bounds; they are reported at exit
        pad = torch.full((1, self.top_k), -1 if self.has_missing else 0, dtype=rows.dtype)
        host = torch.cat([rows, pad]).to(dtype)
        if device.type == "cuda":
            host = host.pin_memory()  # an asynchronous upload: entering replay never syncs
        self.buf = _static_address(host.to(device=device, non_blocking=True))
        _torch_compat.maybe_mark_dynamic(self.buf, 0)  # compiled models: no recompile when the routes length changes
        self._cursor = _static_address(torch.zeros((), dtype=torch.long, device=device))
        self._lag = 0  # rows eager reads took that _cursor does not count yet
        self.limit = _static_address(torch.full((), self.num_rows, dtype=torch.long, device=device))
        self._arange = _Positions.get(device, max(self.num_rows + 1, 1))
        self.host_consumed = 0  # lower bound, advanced by eager calls only
        self.last_read = 0  # rows of the last eager read
        #: eager reads up to this row need no look: beyond it (short of ``num_rows``), ``guard`` is called first
        #: (a replay's token check clears the rows of each forward it sees)
        self.cleared = self.num_rows
        self.guard: Callable[[str, int, int], None] | None = None
        #: a replay's token check compares the ids each forward is fed with these rows: compiled code that reads them
        #: where no forward of the model runs (a MoE block compiled and called on its own) marks :attr:`stray`, a 0-d
        #: bool on the device that the check reads as the block ends (see ``FeedCheck.finish``)
        self.checked = False
        self.stray: torch.Tensor | None = None
        #: set by a replay's token check that no longer places the rows of its forwards on the host (a forward ran
        #: compiled): an eager read where no forward of the model runs calls it (it raises), as rows past ``cleared``
        #: call ``guard`` where the check knows its place
        self.outside: Callable[[str, int, int], None] | None = None
        self._by_device = False  # a graph or compiled region read: the host count is behind the device's
        self._chunk = self.buf[:0].long()  # the rows from _chunk_at on, as int64, for eager reads
        self._chunk_at = 0
        # views of the next rows of _chunk for eager reads of one size (_view_n rows each), by the host count
        # they start at
        self._at: dict[int, torch.Tensor] = {}
        self._view_n = 0
        if device.type == "cuda":
            _torch_compat.before_graph_capture(_catch_up_all)
            _LAGGING.add(self)

    @property
    def consumed(self) -> torch.Tensor:
        """The device cursor: rows read so far, counted on the device (0-dim int64)."""
        if self._lag:
            self._catch_up()
        return self._cursor

    @property
    def read_by_device(self) -> bool:
        """Has a CUDA graph or compiled region read from it? Those reads are clamped to a padding row past
        the end, where no host check runs: only the device cursor tells an overdraw."""
        return self._by_device

    def _catch_up(self) -> None:
        """Count the eager reads the device cursor is behind by (one kernel; eager code only): raised to
        the host's count, never past it nor back (see :meth:`CaptureRing._catch_up`)."""
        if self._lag:
            self._cursor.clamp_min_(self.host_consumed)
            self._lag = 0

    def next_row(self) -> torch.Tensor:
        """The row the next read starts at, on the device (0-dim int64; in compiled code too, as :meth:`read` counts
        the eager reads before it): what a forward compiled whole compares its token ids from."""
        cursor = self._cursor
        if self._lag:
            cursor.clamp_min_(self.host_consumed)
            self._lag = 0
        return cursor

    def read_eager(self, n: int) -> torch.Tensor:
        """:meth:`read` for an eager caller that checked ``n`` rows are left: rows at the host's count.

        The host's count is the device cursor as long as no CUDA graph or compiled region has
        read from this source (those move the device cursor alone); after one has, the read
        goes by the device cursor. Reads of one size are views prepared many at a time (no op).
        """
        h = self.host_consumed
        outside = self.outside
        if outside is not None and not FORWARD.on:  # (rows read outside every forward, after the check lost its place)
            outside(self.name, h, n)
        self.host_consumed = h + n
        self.last_read = n
        if self._by_device:
            self._catch_up()
            return self.read(n)
        self._lag += n
        view = self._at.get(h) if n == self._view_n else None
        if view is not None:  # decode: the same rows each call
            return view
        lo = self._chunk_at
        if h < lo or h + n > lo + self._chunk.shape[0]:  # int64 rows for many reads at once
            self._chunk_at = h
            self._chunk = self.buf[h : max(h + n, h + _CHUNK_ROWS)].long()
            lo = h
        m = min(_VIEWS, (self._chunk.shape[0] - (h - lo)) // n) if n else 0
        if m > 1:
            views = self._chunk.narrow(0, h - lo, m * n).split(n)
            self._at = dict(zip(range(h, h + m * n, n), views, strict=True))
            self._view_n = n
            return views[0]
        return self._chunk[h - lo : h - lo + n]

    def read(self, n: int) -> torch.Tensor:
        """The next ``n`` rows as int64 ``[n, k]`` (-1 rows stay -1); advances the cursor."""
        cursor = self._cursor
        if _compiling():
            if self._lag:  # eager reads before: the compiled code's first run counts them (see write())
                cursor.clamp_min_(self.host_consumed)
                self._lag = 0
            self._by_device = True  # replays of this code move the device cursor without the host
        elif self.buf.is_cuda and torch.cuda.is_current_stream_capturing():
            _no_lag(self, "read")
            self._by_device = True
        else:  # an eager read by the device cursor (code after a graph break): the host's count stays behind
            self._catch_up()
            self._by_device = True
        if self.checked and not FORWARD.on and self.stray is not None:  # (rows no forward was fed: see _Fed)
            self.stray.fill_(True)
        if _triton.enabled(self.buf):  # CUDA: one kernel (clamp, gather, cast, advance)
            out = _triton.source_read(self.buf, cursor, n, self.num_rows)
            if out is not None:
                return out
        arange = self._arange if n <= self._arange.numel() else _Positions.get(self.buf.device, n)
        pos = torch.minimum(cursor + arange[:n], self.limit)
        cursor.add_(n)
        return self.buf.index_select(0, pos).long()


def _fmt_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``16.0 KiB``, ``1.5 MiB``."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"
