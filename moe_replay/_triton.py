"""Optional Triton kernels for the CUDA hot path: one launch per ring write or replay read.

The torch-op path in :mod:`moe_replay.ring` (positions, cast, indexed copy, cursor
update: five small kernels) is the reference and the fallback. On CUDA, when triton
imports, one kernel does all of it: it reads the device cursor, writes (or reads) the
rows with the cast, and moves the cursor, so a ring write costs one launch per router
and per step (two for very large writes: the kernel, then the cursor update). No host
synchronisation and no allocation beyond the output of a read, so both work inside CUDA
graphs. Not used while torch.compile traces (inductor fuses the torch ops itself).

Set the environment variable ``MOE_REPLAY_TRITON=0`` to use the torch ops everywhere.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["disabled", "enabled", "ring_write", "source_read"]

#: Elements one program handles while also moving the cursor (a decode step: batch x k).
_ONE_PROGRAM = 8192
#: Elements per program when a write is split over several (then the cursor moves after).
_SPLIT_BLOCK = 1024

_kernels: tuple[Any, Any] | None = None
_tried = False


def _build() -> tuple[Any, Any] | None:
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or broken: the torch ops serve
        return None

    @triton.jit
    def ring_write_kernel(
        idx_ptr,
        buf_ptr,
        cursor_ptr,
        total,
        n_rows,
        capacity,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ADVANCE: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        start = tl.load(cursor_ptr)
        row = offs // K
        vals = tl.load(idx_ptr + offs, mask=mask, other=0)
        dst = ((start + row) % capacity) * K + (offs - row * K)
        tl.store(buf_ptr + dst, vals.to(buf_ptr.dtype.element_ty), mask=mask)
        if ADVANCE:
            tl.debug_barrier()  # every thread has read the cursor before it moves
            tl.store(cursor_ptr, start + n_rows)

    @triton.jit
    def source_read_kernel(
        buf_ptr,
        out_ptr,
        cursor_ptr,
        total,
        n_rows,
        last_row,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ADVANCE: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        start = tl.load(cursor_ptr)
        row = offs // K
        src = tl.minimum(start + row, last_row) * K + (offs - row * K)
        vals = tl.load(buf_ptr + src, mask=mask, other=0)
        tl.store(out_ptr + offs, vals.to(tl.int64), mask=mask)
        if ADVANCE:
            tl.debug_barrier()
            tl.store(cursor_ptr, start + n_rows)

    return ring_write_kernel, source_read_kernel


def _get() -> tuple[Any, Any] | None:
    global _kernels, _tried
    if not _tried:
        _tried = True
        _kernels = _build() if os.environ.get("MOE_REPLAY_TRITON", "1") != "0" else None
    return _kernels


def enabled(t: torch.Tensor) -> bool:
    """Use the kernels for this tensor? (CUDA, triton importable, not while compiling)."""
    return t.is_cuda and not torch.compiler.is_compiling() and _get() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the torch ops inside this block (to compare against them, or to rule the kernels out)."""
    global _kernels, _tried
    saved = _get()
    _kernels = None
    try:
        yield
    finally:
        _kernels, _tried = saved, True


def _launch(kernel: Any, total: int, *args: Any, k: int) -> bool:
    """Run ``kernel`` over ``total`` elements; True when it also moved the cursor."""
    if total <= _ONE_PROGRAM:
        block = max(16, 1 << (total - 1).bit_length())
        kernel[(1,)](*args, K=k, BLOCK=block, ADVANCE=True, num_warps=1 if block <= 1024 else 4)
        return True
    kernel[((total + _SPLIT_BLOCK - 1) // _SPLIT_BLOCK,)](*args, K=k, BLOCK=_SPLIT_BLOCK, ADVANCE=False, num_warps=4)
    return False


def _give_up(err: Exception) -> None:
    global _kernels
    _kernels = None
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
    kernels = _get()
    assert kernels is not None
    k = buf.shape[1]
    try:
        moved = _launch(kernels[0], n * k, idx.contiguous(), buf, cursor, n * k, n, buf.shape[0], k=k)
    except Exception as err:  # e.g. no compiler for this GPU: raised before anything ran
        _give_up(err)
        return False
    if not moved:
        cursor.add_(n)
    return True


def source_read(buf: torch.Tensor, cursor: torch.Tensor, n: int, last_row: int) -> torch.Tensor | None:
    """Rows ``cursor .. cursor + n - 1`` of ``buf`` (clamped to ``last_row``) as int64; advance it.

    None (nothing read) when the kernel could not run; the kernels are then off for good.
    """
    kernels = _get()
    assert kernels is not None
    k = buf.shape[1]
    out = torch.empty(n, k, dtype=torch.long, device=buf.device)
    try:
        moved = _launch(kernels[1], n * k, buf, out, cursor, n * k, n, last_row, k=k)
    except Exception as err:
        _give_up(err)
        return None
    if not moved:
        cursor.add_(n)
    return out
