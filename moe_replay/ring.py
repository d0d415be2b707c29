"""Device-resident buffers: the capture ring and the replay source.

Both keep their position in a 0-d int64 tensor on the router's device, so the hot path
never reads a value back to the host, never grows a Python list and never reallocates
its storage: it works unchanged inside CUDA graphs and compiled regions.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch

from . import _triton
from .errors import InvalidArgumentError

__all__ = ["CaptureRing", "ReplaySource", "index_dtype"]


def index_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype that holds the indices ``0 .. num_experts - 1``.

    uint8 up to 256 experts (1 byte per index), int16 up to 32768, int32 beyond.

    Example:
        >>> import moe_replay as mr
        >>> mr.index_dtype(128), mr.index_dtype(384)
        (torch.uint8, torch.int16)
    """
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def _static_address(t: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that ``t`` keeps its address across calls, as parameters do.

    What ``torch._dynamo.mark_static_address(t)`` does (torch/_dynamo/decorators.py), without
    importing dynamo: CUDA graphs of ``mode="reduce-overhead"`` then read and update the
    ring in place instead of skipping graphs for a mutated input or copying it per call.
    """
    t._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]
    return t


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


class CaptureRing:
    """``capacity`` rows of ``k`` expert indices on one device, written in call order.

    ``written`` counts every row ever written since the last reset; rows past
    ``capacity`` overwrite the oldest ones, and the overflow is reported when the rows
    are read (see :meth:`rows`).
    """

    def __init__(self, capacity: int, top_k: int, num_experts: int, device: torch.device) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"capacity must be at least 1 row, got {capacity}")
        self.capacity = int(capacity)
        self.top_k = int(top_k)
        self.device = device
        self.buf = _static_address(
            torch.zeros(self.capacity, self.top_k, dtype=index_dtype(num_experts), device=device)
        )
        self.written = _static_address(torch.zeros((), dtype=torch.long, device=device))
        self._arange = _Positions.get(device, self.capacity)

    def reset(self) -> None:
        """Forget every row (one device write, no host sync)."""
        self.written.zero_()

    def write(self, idx: torch.Tensor) -> None:
        """Append the rows of ``idx`` (``[n, k]``, any integer dtype) at the device cursor."""
        n = idx.shape[0]
        if n > self.capacity:  # only the newest rows can fit; `written` still counts all
            self.written.add_(n - self.capacity)
            idx = idx[n - self.capacity :]
            n = self.capacity
        if _triton.enabled(idx) and _triton.ring_write(self.buf, self.written, idx, n):
            return  # CUDA: one kernel did it all (cursor, wrap, cast, advance)
        pos = torch.remainder(self.written + self._arange[:n], self.capacity)
        self.buf.index_copy_(0, pos, idx.to(self.buf.dtype))
        self.written.add_(n)

    def rows(self, written: int, keep_newest: bool) -> torch.Tensor:
        """The rows in write order, on the host; ``written`` comes from one batched read."""
        if written <= self.capacity:
            return self.buf[:written].cpu()
        if not keep_newest:
            raise AssertionError("overflow must be handled by the caller")
        start = written % self.capacity
        return torch.cat([self.buf[start:], self.buf[:start]]).cpu()


class ReplaySource:
    """The recorded rows of one router on its device, consumed in order by a device cursor.

    ``has_missing`` is fixed when the routes are loaded: only then does a read also
    need the native choice for -1 rows.
    """

    def __init__(self, rows: torch.Tensor, num_experts: int, device: torch.device) -> None:
        self.num_rows = int(rows.shape[0])
        self.top_k = int(rows.shape[1])
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
        if "torch._dynamo" in sys.modules:  # compiled models: no recompile when the routes length changes
            torch._dynamo.maybe_mark_dynamic(self.buf, 0)
        self.consumed = _static_address(torch.zeros((), dtype=torch.long, device=device))
        self.limit = _static_address(torch.full((), self.num_rows, dtype=torch.long, device=device))
        self._arange = _Positions.get(device, max(self.num_rows + 1, 1))
        self.host_consumed = 0  # lower bound, advanced by eager calls only

    def read(self, n: int) -> torch.Tensor:
        """The next ``n`` rows as int64 ``[n, k]`` (-1 rows stay -1); advances the cursor."""
        if _triton.enabled(self.buf):  # CUDA: one kernel (clamp, gather, cast, advance)
            out = _triton.source_read(self.buf, self.consumed, n, self.num_rows)
            if out is not None:
                return out
        arange = self._arange if n <= self._arange.numel() else _Positions.get(self.buf.device, n)
        pos = torch.minimum(self.consumed + arange[:n], self.limit)
        self.consumed.add_(n)
        return self.buf.index_select(0, pos).long()
