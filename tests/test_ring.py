"""The capture ring and replay source: device cursors, no reallocation, no host sync."""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr
from moe_replay.ring import CaptureRing, ReplaySource, index_dtype


def test_index_dtype_is_smallest() -> None:
    assert index_dtype(8) == index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(2**15 + 1) == torch.int32


def test_ring_wraps_and_counts_every_row() -> None:
    ring = CaptureRing(5, 2, 300, torch.device("cpu"))
    assert ring.buf.dtype == torch.int16
    rows = torch.arange(14).reshape(7, 2)
    ring.write(rows[:3])
    ring.write(rows[3:])
    assert int(ring.written) == 7
    assert torch.equal(ring.rows(7, keep_newest=True).long(), rows[2:])
    ring.reset()
    ring.write(rows[:2])
    assert torch.equal(ring.rows(2, keep_newest=False).long(), rows[:2])
    ring.reset()
    ring.write(rows)  # more rows in one call than the capacity
    assert int(ring.written) == 7
    assert torch.equal(ring.rows(7, keep_newest=True).long(), rows[2:])


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
def test_cuda_capture_and_replay_never_sync() -> None:
    model = mr.models.build("grouped_sigmoid", num_layers=2, expert_impl="dense").cuda()
    x = torch.randint(0, 128, (4, 16), device="cuda")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x)  # warm-up: lazy CUDA init may sync
        routes = session.routes()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                with session.capture():
                    model(x)
                with session.replay(routes, strict=False):
                    model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert session.routes().equal(routes)
