"""Optional Triton kernels for the CUDA hot path: one launch per ring write or replay read.

The torch-op path in :mod:`moe_replay.ring` (positions, cast, indexed copy, cursor
update: five small kernels) is the reference and the fallback. On CUDA, when triton
imports, one kernel does all of it: it reads the device cursor, writes (or reads) the
rows with the cast, and moves the cursor, so a ring write costs one launch per router
and per step (two for very large writes: the kernel, then the cursor update). No host
synchronisation and no allocation beyond the output of a read, so both work inside CUDA
graphs. Not used while torch.compile traces (inductor fuses the torch ops itself), nor
for an eager write into a growing ring (one copy at a host-known offset and the cursor
update: no positions to compute); it serves the fixed-ring path (CUDA-graph capture,
``keep_newest``, a ring fixed by a graph) and replay reads.

Off by default: measured on an H200 (torch 2.11, bf16, benchmarks/RESULTS.md), a Triton
launch from Python costs more than the five torch kernels in an eager decode step
(capture 1.052x against 1.005x of the plain step), and inside a CUDA graph both are
within 1% of the plain graph (0.998x and 1.002x). Set ``MOE_REPLAY_TRITON=1`` to use
the kernels, or use :func:`forced` in a block.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._quiet import aloud

__all__ = ["disabled", "enabled", "forced", "ring_write", "source_read"]

#: Elements one program handles while also moving the cursor (a decode step: batch x k).
_ONE_PROGRAM = 8192
#: Elements per program when a write is split over several (then the cursor moves after).
_SPLIT_BLOCK = 1024

_kernel: Any = None
_tried = False


def _build() -> Any:
    try:
        import triton  # type: ignore[import-not-found]
        import triton.language as tl  # type: ignore[import-not-found]
    except Exception:  # not installed, or broken: the torch ops serve
        return None

    @triton.jit
    def copy_rows_kernel(
        src_ptr,
        dst_ptr,
        cursor_ptr,
        total,
        n_rows,
        bound,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ADVANCE: tl.constexpr,
        INTO_RING: tl.constexpr,
    ):
        # INTO_RING: flat [n, K] rows -> ring rows cursor.. (wrapping at `bound` rows);
        # otherwise ring rows cursor.. (clamped to row `bound`) -> flat [n, K] rows.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        start = tl.load(cursor_ptr)
        row = offs // K
        col = offs - row * K
        if INTO_RING:
            src = offs
            dst = ((start + row) % bound) * K + col
        else:
            src = tl.minimum(start + row, bound) * K + col
            dst = offs
        vals = tl.load(src_ptr + src, mask=mask, other=0)
        tl.store(dst_ptr + dst, vals.to(dst_ptr.dtype.element_ty), mask=mask)
        if ADVANCE:
            tl.debug_barrier()  # every thread has read the cursor before it moves
            tl.store(cursor_ptr, start + n_rows)

    return copy_rows_kernel


def _get() -> Any:
    global _kernel, _tried
    if not _tried:
        _tried = True
        _kernel = _build() if os.environ.get("MOE_REPLAY_TRITON", "0") == "1" else None
    return _kernel


def enabled(t: torch.Tensor) -> bool:
    """Use the kernels for this tensor? (CUDA, triton importable, not while compiling)."""
    return t.is_cuda and not torch.compiler.is_compiling() and _get() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the torch ops inside this block (to compare against them, or to rule the kernels out)."""
    global _kernel, _tried
    saved = _get()
    _kernel = None
    try:
        yield
    finally:
        _kernel, _tried = saved, True


@contextlib.contextmanager
def forced() -> Iterator[bool]:
    """Use the kernels inside this block where triton imports; yields whether they are on."""
    global _kernel, _tried
    saved, saved_tried = _kernel, _tried
    _kernel, _tried = _build(), True
    try:
        yield _kernel is not None
    finally:
        _kernel, _tried = saved, saved_tried


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, cursor: torch.Tensor, n: int, bound: int, into_ring: bool) -> bool:
    """Launch the kernel over ``n`` rows; False when it could not run (the kernels are then off)."""
    kernel = _get()
    k = (dst if into_ring else src).shape[1]
    total = n * k
    args = (src, dst, cursor, total, n, bound)
    try:  # a failure (e.g. no compiler for this GPU) is raised before anything was enqueued
        if total <= _ONE_PROGRAM:
            block = max(16, 1 << (total - 1).bit_length())
            warps = 1 if block <= 1024 else 4
            kernel[(1,)](*args, K=k, BLOCK=block, ADVANCE=True, INTO_RING=into_ring, num_warps=warps)
            return True
        grid = ((total + _SPLIT_BLOCK - 1) // _SPLIT_BLOCK,)
        kernel[grid](*args, K=k, BLOCK=_SPLIT_BLOCK, ADVANCE=False, INTO_RING=into_ring, num_warps=4)
    except Exception as err:
        _give_up(err)
        return False
    cursor.add_(n)  # split over programs: the cursor moves after all of them
    return True


def _give_up(err: Exception) -> None:
    global _kernel
    _kernel = None
    with aloud():  # (moe_replay's own: said inside the runs of a forward too)
        warnings.warn(
            f"moe_replay: the Triton ring kernels failed to run ({type(err).__name__}: {err}); using torch ops "
            "from now on (set MOE_REPLAY_TRITON=0 to skip the kernels)",
            RuntimeWarning,
            stacklevel=4,
        )


def ring_write(buf: torch.Tensor, cursor: torch.Tensor, idx: torch.Tensor, n: int) -> bool:
    """Write the ``n`` rows of ``idx`` into ``buf`` at ``cursor`` (wrapping), and advance it.

    False (nothing written) when the kernel could not run; the kernels are then off for good.
    """
    return _copy_rows(idx.contiguous(), buf, cursor, n, buf.shape[0], into_ring=True)


def source_read(buf: torch.Tensor, cursor: torch.Tensor, n: int, last_row: int) -> torch.Tensor | None:
    """Rows ``cursor .. cursor + n - 1`` of ``buf`` (clamped to ``last_row``) as int64; advance it.

    None (nothing read) when the kernel could not run; the kernels are then off for good.
    """
    out = torch.empty(n, buf.shape[1], dtype=torch.long, device=buf.device)
    return out if _copy_rows(buf, out, cursor, n, last_row, into_ring=False) else None
