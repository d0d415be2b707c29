"""The optional Triton kernels of the ring: same rows and cursors as the torch ops."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

import moe_replay as mr
from moe_replay import _triton
from moe_replay.ring import CaptureRing, ReplaySource

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (capacity, k, experts, rows per write): wrap-around, one write larger than the one-program
# limit (split over programs, cursor moved after), uint8 / int16 / int32 storage.
WRITES = [
    (50, 2, 8, [3, 20, 40, 7]),
    (20000, 8, 128, [9000, 64, 12000]),
    (7, 4, 300, [1, 5, 6, 2]),
    (100, 3, 70000, [30, 90]),
]
# (rows, k, experts, rows per read): reads past the end clamp to the padding row.
READS = [(10, 2, 8, [3, 4, 5, 2]), (20000, 8, 128, [9000, 64, 12000]), (5, 3, 300, [2, 2, 2])]


def compare_with_torch_ops(device: torch.device) -> None:
    """Drive a kernel-backed and a torch-op ring / source side by side and compare every step."""
    g = torch.Generator().manual_seed(0)
    for cap, k, experts, sizes in WRITES:
        ref, tri = (CaptureRing(cap, k, experts, device, keep_newest=True) for _ in "ab")
        for n in sizes:
            idx = torch.randint(0, experts, (n, k), generator=g).to(device)
            with _triton.disabled():
                ref.write(idx)
            if n > cap:  # what CaptureRing.write does before either path
                tri.written.add_(n - cap)
                idx, n = idx[n - cap :], cap
            _triton.ring_write(tri.buf, tri.written, idx, n)
            assert int(ref.written) == int(tri.written)
            assert torch.equal(ref.buf, tri.buf), (cap, k, n)
    for rows_n, k, experts, reads in READS:
        rows = torch.randint(0, experts, (rows_n, k), generator=g)
        rows[1] = -1
        a, b = (ReplaySource(rows, experts, device) for _ in "ab")
        for n in reads:
            with _triton.disabled():
                want = a.read(n)
            got = _triton.source_read(b.buf, b.consumed, n, b.num_rows)
            assert got.dtype == torch.long and torch.equal(want, got)
            assert int(a.consumed) == int(b.consumed)


@pytest.fixture
def kernels_on() -> Iterator[None]:
    """The kernels are opt-in (MOE_REPLAY_TRITON=1); these tests switch them on."""
    with _triton.forced() as on:
        assert on
        yield


def test_kernels_are_off_by_default() -> None:
    if os.environ.get("MOE_REPLAY_TRITON") != "1":
        assert not _triton.enabled(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_match_torch_ops_in_the_interpreter() -> None:
    """The kernels' indexing, on the CPU through Triton's interpreter (set before triton imports)."""
    code = textwrap.dedent(
        """
        import torch
        from moe_replay import _triton
        from tests.test_triton import compare_with_torch_ops
        assert _triton._get() is not None
        compare_with_torch_ops(torch.device("cpu"))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "MOE_REPLAY_TRITON": "1",
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_disabled_restores_and_cpu_never_uses_kernels() -> None:
    before = _triton._get()
    with _triton.disabled():
        assert not _triton.enabled(torch.zeros(1))
        with _triton.disabled():
            pass
        assert _triton._get() is None
    assert _triton._get() is before
    assert not _triton.enabled(torch.zeros(1))  # CPU tensors always take the torch ops


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_cuda_kernels_match_torch_ops(kernels_on: None) -> None:
    assert _triton.enabled(torch.zeros(1, device="cuda"))
    compare_with_torch_ops(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_cuda_graph_replays_write_in_order_without_sync(kernels_on: None) -> None:
    ring = CaptureRing(64, 4, 128, torch.device("cuda"), keep_newest=True)  # a wrapping ring, every write a kernel
    static = torch.zeros(8, 4, dtype=torch.long, device="cuda")
    ring.write(static)  # compile the kernel before capturing
    ring.reset()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ring.write(static)
    ring.reset()
    steps = [torch.randint(0, 128, (8, 4), device="cuda") for _ in range(11)]  # 88 rows: wraps the 64
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in steps:
            static.copy_(s)
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(ring.written) == 88
    want = torch.cat(steps)[-64:].cpu()
    assert torch.equal(ring.rows(88).long(), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_session_records_the_same_with_and_without_kernels(kernels_on: None) -> None:
    model = mr.models.build("softmax_topk", num_layers=2, num_experts=16, top_k=4).cuda()
    x = torch.randint(0, 128, (3, 40), device="cuda")
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        fast = session.routes()
        with _triton.disabled(), session.capture():
            model(x)
        assert session.routes().equal(fast)
        with session.replay(fast), session.capture():
            model(x)
        assert session.routes().equal(fast)


class _Broken:
    """A kernel whose launch fails (as when triton cannot compile for the GPU)."""

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        def launch(*args: object, **kwargs: object) -> None:
            raise RuntimeError("no compiler for this device")

        return launch


def test_a_failing_kernel_turns_the_kernels_off_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "_kernel", _Broken())
    monkeypatch.setattr(_triton, "_tried", True)
    ring = CaptureRing(8, 2, 8, torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="torch ops from now on"):
        assert not _triton.ring_write(ring.buf, ring.written, torch.ones(3, 2, dtype=torch.long), 3)
    assert _triton._get() is None
    assert int(ring.written) == 0 and not ring.buf.any()
    monkeypatch.setattr(_triton, "_kernel", _Broken())
    src = ReplaySource(torch.ones(4, 2, dtype=torch.long), 8, torch.device("cpu"))
    with pytest.warns(RuntimeWarning):
        assert _triton.source_read(src.buf, src.consumed, 2, src.num_rows) is None
    assert int(src.consumed) == 0
