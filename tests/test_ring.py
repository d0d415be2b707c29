"""The capture ring and replay source: device cursors, no reallocation, no host sync."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_replay as mr
from moe_replay.ring import CaptureRing, ReplaySource, calls_made_by, index_dtype

from .conftest import examples


def test_index_dtype_is_smallest() -> None:
    assert index_dtype(8) == index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(2**15 + 1) == index_dtype(2**31) == torch.int32
    with pytest.raises(mr.InvalidArgumentError, match="int32"):
        index_dtype(2**31 + 1)  # expert 2**31 does not fit


def test_keep_newest_ring_wraps_and_counts_every_row() -> None:
    ring = CaptureRing(5, 2, 300, torch.device("cpu"), keep_newest=True)
    assert ring.buf.dtype == torch.int16
    rows = torch.arange(14).reshape(7, 2)
    ring.write(rows[:3])
    ring.write(rows[3:])
    assert int(ring.written) == 7 and ring.rows_held == 5
    assert torch.equal(ring.rows(7).long(), rows[2:])
    ring.reset()
    ring.write(rows[:2])
    assert torch.equal(ring.rows(2).long(), rows[:2])
    ring.reset()
    ring.write(rows)  # more rows in one call than the capacity
    assert int(ring.written) == 7
    assert torch.equal(ring.rows(7).long(), rows[2:])


def test_growing_ring_never_moves_a_row() -> None:
    """Past its first segment the ring adds segments (doubling what it holds); written rows stay where they are."""
    ring = CaptureRing(4, 3, 64, torch.device("cpu"))
    rows = torch.randint(0, 64, (200, 3))
    seen: dict[int, int] = {}  # segment data_ptr -> its rows, as first seen
    start = 0
    for n in [1, 3, 0, 5, 2, 17, 1, 40, 3, 128]:
        ring.write(rows[start : start + n])
        start += n
        for seg in ring._segments:
            assert seen.setdefault(seg.data_ptr(), seg.shape[0]) == seg.shape[0]
        assert ring.host_written == int(ring.written) == start
        assert start <= ring.rows_held <= max(4, 2 * start)
    assert len(seen) == len(ring._segments) > 4
    assert torch.equal(ring.rows(start).long(), rows[:start])
    held = ring.rows_held
    ring.reset()  # the segments stay for the next capture of the same size
    ring.write(rows[:start])
    assert ring.rows_held == held and torch.equal(ring.rows(start).long(), rows[:start])


def test_reserve_sizes_the_first_segment_of_an_empty_ring() -> None:
    ring = CaptureRing(4, 2, 8, torch.device("cpu"))
    ring.write(torch.zeros(9, 2, dtype=torch.long))
    ring.reset()
    ring.reserve(100)  # empty: one first segment of 100 rows, what a graph captured next would write into
    assert ring.capacity == ring.rows_held == 100 and len(ring._segments) == 1
    ring.write(torch.ones(60, 2, dtype=torch.long))
    ring.reserve(150)  # holds rows: a segment more, nothing moves
    assert ring.capacity == 100 and ring.rows_held == 150
    ring.write(torch.ones(90, 2, dtype=torch.long))
    assert ring.rows_held == 150 and bool((ring.rows(150) == 1).all())


def test_replay_source_reads_in_order_and_clamps() -> None:
    rows = torch.arange(8).reshape(4, 2)
    src = ReplaySource(rows, 8, torch.device("cpu"))
    assert torch.equal(src.read(3), rows[:3])
    assert torch.equal(src.read(1), rows[3:])
    src.read(2)  # past the end: in bounds, counted, reported by the session
    assert int(src.consumed) == 6


def test_capture_hot_path_does_not_reallocate(tokens: torch.Tensor) -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model, capacity=4096) as session:
        hooks = session._hooks
        ptrs = [(h.capture_ring.buf.data_ptr(), h.capture_ring.written.data_ptr()) for h in hooks]
        with session.capture(), torch.no_grad():
            for _ in range(20):
                model(tokens)
        assert [(h.capture_ring.buf.data_ptr(), h.capture_ring.written.data_ptr()) for h in hooks] == ptrs
        assert all(len(h.kept) == 0 for h in hooks)  # no per-call bookkeeping without gradients
        assert session.routes().num_tokens == 20 * tokens.numel()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capacity", [mr.DEFAULT_CAPACITY, 8], ids=["preallocated", "growing"])
@pytest.mark.parametrize("kind", ["grouped_sigmoid", "softmax_topk"])  # under the mode; lean
def test_cuda_capture_and_replay_never_sync(capacity: int, kind: str) -> None:
    """No host sync in capture or replay; with capacity=8 the rings grow several times inside the checked block."""
    model = mr.models.build(kind, num_layers=2, expert_impl="dense").cuda()
    x = torch.randint(0, 128, (4, 16), device="cuda")
    with mr.attach(model, capacity=capacity) as session:
        with session.capture(), torch.no_grad():
            model(x)  # warm-up: lazy CUDA init may sync
        routes = session.routes()
        held = sum(m["rows"] for m in session.memory().values())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                with session.capture():
                    for _ in range(6):  # 6 x 64 rows per router
                        model(x)
                with session.replay(routes, strict=False):
                    model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert session.routes().equal(mr.Routes.cat([routes] * 6))
        if capacity == 8:
            assert sum(m["rows"] for m in session.memory().values()) > held  # it grew while checked


def test_capture_grows_past_ten_times_its_capacity_and_keeps_every_row_in_order() -> None:
    """Eager capture: many forwards of varied lengths, more than 10x the first segment, every row back in order."""
    model = mr.models.build("softmax_topk", num_layers=2)
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 40, (60,), generator=g)]
    xs = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in lengths]
    total = sum(lengths)
    with mr.attach(model, capacity=total) as session:  # the reference: one preallocated ring
        with session.capture(), torch.no_grad():
            for x in xs:
                model(x)
        full = session.routes()
    capacity = 64
    assert total > 10 * capacity
    with mr.attach(model, capacity=capacity) as session:
        with session.capture(), torch.no_grad():
            for x in xs:
                model(x)
        routes = session.routes()
        held = session.memory()["cpu"]
    assert routes.num_tokens == total and routes.equal(full)
    assert held["rows"] >= 2 * total and held["rows"] <= 2 * 2 * total  # two routers, at most doubled
    # the rows of forward i are rows start_i .. start_i + n_i of the capture, in order
    with mr.attach(model, capacity=total) as session:
        start = 0
        for x, n in zip(xs, lengths, strict=True):
            with session.capture(), torch.no_grad():
                model(x)
            per_forward = session.routes()
            assert per_forward.equal(routes[start : start + n])
            start += n


def test_max_bytes_stops_at_the_forward_that_would_pass_it(tokens: torch.Tensor) -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k = 2
    with pytest.raises(mr.CaptureOverflowError, match="max_bytes=100"):
        mr.attach(model, capacity=1000, max_bytes=100)  # the first segments alone: refused, nothing installed
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())
    assert "forward" not in model.layers[0].mlp.router.__dict__
    limit = 2 * 64 * k * 3  # two routers, up to 3 x 64 rows each
    with mr.attach(model, capacity=16, max_bytes=limit) as session:
        assert session.sites[0].top_k == k
        ran = 0
        with pytest.raises(mr.CaptureOverflowError, match=r"would pass max_bytes=768") as err:
            with session.capture(), torch.no_grad():
                for _ in range(20):
                    model(tokens)  # 24 rows per forward
                    ran += 1
        assert ran == limit // (2 * 24 * k)  # stops at the first forward whose rows pass the limit
        assert "routes(allow_partial=True)" in str(err.value)
        assert session.memory()["cpu"]["bytes"] <= limit
        partial = session.routes(allow_partial=True)
        assert partial.tokens_per_layer[1] == 8 * 24
        with session.capture(max_bytes=10**6), torch.no_grad():  # a larger limit for one block
            for _ in range(20):
                model(tokens)
        assert session.routes().num_tokens == 20 * 24
        assert session._budget.limit == limit  # the block's limit ended with it
        first = 2 * 16 * k  # the first segments
        with session.capture(max_bytes=first):  # a lower limit: the segments an earlier capture grew are freed
            assert session.memory()["cpu"]["bytes"] == first
        with pytest.raises(mr.CaptureOverflowError, match=f"more than max_bytes={first - 1}; nothing was cleared"):
            with session.capture(max_bytes=first - 1):
                pass


@pytest.mark.reliability("lifecycle")
def test_reserve_and_a_refused_capture_keep_the_last_capture(tokens: torch.Tensor) -> None:
    """reserve() between captures moves the rows held into the larger rings (routes() reads them, clear=False
    appends after them), and a capture() refused on entering (max_bytes, expected_tokens) clears nothing."""
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model, capacity=16) as session, torch.no_grad():
        with session.capture():
            model(tokens)
        first = session.routes()
        session.reserve(4096)
        assert session.capacity == 4096 and session.routes().equal(first)
        with session.capture(clear=False):
            model(tokens[:, :3])
        both = session.routes()
        assert both.num_tokens == first.num_tokens + tokens.shape[0] * 3
        assert both[: first.num_tokens].equal(first)
        for bad in ({"max_bytes": 10}, {"expected_tokens": 10**9, "max_bytes": 10**6}, {"expected_tokens": 2.5}):
            with pytest.raises(mr.MoEReplayError), session.capture(**bad):  # type: ignore[arg-type]
                model(tokens)
            assert session.routes().equal(both), bad
        limit = session.memory()["cpu"]["bytes"]
    with mr.attach(model, capacity=16, max_bytes=2 * 16 * 2 * 4) as session, torch.no_grad():
        with session.capture():
            model(tokens)
        kept = session.routes()
        with pytest.raises(mr.CaptureOverflowError, match="nothing was changed"):
            session.reserve(limit)
        assert session.routes().equal(kept) and session.capacity == 16


def test_expected_tokens_and_reserve_allocate_before_the_forwards(tokens: torch.Tensor) -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model, capacity=8) as session:
        with session.capture(expected_tokens=5 * 24), torch.no_grad():
            assert session.memory()["cpu"]["rows"] == 2 * 5 * 24
            ptrs = [r.buf.data_ptr() for r in session._rings()]
            for _ in range(5):
                model(tokens)
            assert [r.buf.data_ptr() for r in session._rings()] == ptrs  # nothing allocated during forwards
            assert all(len(r._segments) == 1 for r in session._rings())
        assert session.routes().num_tokens == 5 * 24
        need = mr.generation_capacity(batch_size=4, prompt_len=100, max_new_tokens=50)
        assert need == 4 * 150
        session.reserve(need)
        assert session.capacity == need and session.memory()["cpu"]["rows"] == 2 * need
        assert f"capacity={need}" in repr(session)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mr.generation_capacity(1, 2, -1)


# runs of equal sizes (what decode writes), changes of size, empty writes, and reads of the cursor between
_RUNS = st.lists(st.tuples(st.integers(0, 9), st.integers(1, 80), st.booleans()), min_size=1, max_size=6)


@examples(150)
@given(capacity=st.integers(1, 300), runs=_RUNS)
def test_eager_writes_of_any_sizes_keep_every_row_and_the_device_count(
    capacity: int, runs: list[tuple[int, int, bool]]
) -> None:
    """Eager writes leave the device cursor behind; every row and the count still come back exact."""
    ring = CaptureRing(capacity, 3, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(capacity)
    expected = []
    for size, times, look in runs:
        for _ in range(times):
            idx = torch.randint(0, 64, (size, 3), generator=g)
            ring.write(idx)
            expected.append(idx.clone())
            idx.fill_(63)  # a later change to what the router returned changes nothing recorded
        total = sum(t.shape[0] for t in expected)
        assert ring.host_written == total
        if look:  # a reader of the device count sees every row written so far
            assert int(ring.written) == total
    total = sum(t.shape[0] for t in expected)
    assert int(ring.written) == total
    assert torch.equal(ring.rows(total).long(), torch.cat(expected))


@examples(150)
@given(runs=_RUNS)
def test_eager_reads_of_any_sizes_take_the_rows_in_order(runs: list[tuple[int, int, bool]]) -> None:
    """Eager reads are views prepared many at a time; each is the next rows, and the device count follows."""
    need = sum(size * times for size, times, _ in runs)
    rows = torch.randint(0, 64, (need, 3), generator=torch.Generator().manual_seed(need))
    src = ReplaySource(rows, 64, torch.device("cpu"))
    done = 0
    for size, times, look in runs:
        for _ in range(times):
            got = src.read_eager(size)
            assert torch.equal(got, rows[done : done + size])
            done += size
        if look:
            assert int(src.consumed) == done == src.host_consumed
    assert int(src.consumed) == done == need
    assert torch.equal(src.read(1), torch.zeros(1, 3, dtype=torch.long))  # past the end: the padding row


def test_a_graph_captured_behind_eager_writes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backstop: a capture that did not go through torch.cuda.CUDAGraph.capture_begin, with rows not yet
    counted on the device, would bake in a stale cursor. It raises, and the rows stay."""
    ring = CaptureRing(16, 2, 8, torch.device("cpu"))
    src = ReplaySource(torch.ones(8, 2, dtype=torch.long), 8, torch.device("cpu"), name="r")
    ring.write(torch.ones(3, 2, dtype=torch.long))
    src.read_eager(3)
    ring._cuda = True  # as if on a GPU, in the middle of a capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    with pytest.raises(mr.CaptureOverflowError, match="3 eagerly written rows are not yet counted"):
        ring.write(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(mr.CaptureOverflowError, match="'r': .*3 eagerly read rows are not yet counted"):
        src.read(3)
    monkeypatch.undo()
    assert not ring.fixed and ring.host_written == 3 and int(ring.written) == 3
    assert int(src.consumed) == 3


def test_eager_reads_then_a_read_by_the_device_cursor_then_eager_reads_stay_in_order() -> None:
    """Code after a graph break reads by the device cursor: it starts after the eager reads, and eager reads
    after it go by the device cursor too (the host's count no longer follows)."""
    rows = torch.arange(40).reshape(20, 2)
    src = ReplaySource(rows, 64, torch.device("cpu"))
    got = [src.read_eager(3), src.read_eager(3), src.read(4), src.read_eager(3), src.read_eager(2)]
    assert torch.equal(torch.cat(got), rows[:15])
    assert int(src.consumed) == 15


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("experts", [8, 300])  # 300: the ring's dtype is the routes' storage dtype (int16)
def test_routes_read_from_a_cpu_ring_outlive_its_next_capture(experts: int) -> None:
    """Rows read from a CPU ring are a copy: the next capture into the ring leaves them as they were."""
    ring = CaptureRing(16, 2, experts, torch.device("cpu"))
    ring.write(torch.tensor([[1, 2], [3, 4]]))
    first = ring.rows(2)
    ring.reset()
    ring.write(torch.tensor([[5, 6], [7, 0]]))
    assert first.tolist() == [[1, 2], [3, 4]]


def test_calls_after_a_count_are_joined_into_one_call_of_their_rows() -> None:
    """A decision made chunk by chunk of the tokens writes one call per chunk: joined, its forward's chunks count as
    one call of all their rows (so its rows line up with the forward's tokens); earlier calls stay as they were."""
    ring = CaptureRing(4, 2, 64, torch.device("cpu"))
    for n in (8, 4, 4, 4, 3):  # a call of 8, then a forward in chunks of 4, 4, 4, 3
        ring.write_eager(torch.zeros(n, 2, dtype=torch.long))
    assert ring.call_rows(23) == ((8, 1), (4, 3), (3, 1))
    ring.join_since(1)
    assert ring.call_rows(23) == ((8, 1), (15, 1))
    assert ring.calls_made() == 2
    for n in (4, 4):  # the next forward in chunks, whose rows add up to the first call's
        ring.write_eager(torch.zeros(n, 2, dtype=torch.long))
    ring.join_since(2)
    assert ring.call_rows(31) == ((8, 1), (15, 1), (8, 1))
    ring.join_since(ring.calls_made() - 1)  # (one call since: nothing to join)
    assert ring.call_rows(31) == ((8, 1), (15, 1), (8, 1))


def test_calls_made_by_counts_each_hooks_ring_calls_and_none_for_a_hook_of_no_ring() -> None:
    """The tuple a capture reads at every forward's start and end: each hook's ring's calls, as the ring counts them
    (joined calls as one, a ring whose calls were replaced), 0 where a hook has no ring."""

    class Hook:
        def __init__(self, ring: CaptureRing | None) -> None:
            self.capture_ring = ring

    a, b = CaptureRing(4, 2, 64, torch.device("cpu")), CaptureRing(4, 2, 64, torch.device("cpu"))
    hooks = [Hook(a), Hook(None), Hook(b)]
    assert calls_made_by(hooks) == (0, 0, 0)
    for n in (8, 4, 4, 3):
        a.write_eager(torch.zeros(n, 2, dtype=torch.long))
    b.write_eager(torch.zeros(5, 2, dtype=torch.long))
    assert calls_made_by(hooks) == (4, 0, 1)
    a.join_since(1)
    assert calls_made_by(hooks) == (a.calls_made(), 0, b.calls_made()) == (2, 0, 1)
    b.keep_call_rows(((2, 1), (3, 1)))  # (a list of its calls put in place of the one it had)
    hooks[1].capture_ring = a
    assert calls_made_by(hooks) == (2, 2, 2)
