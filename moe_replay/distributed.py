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

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._checks import check_count
from .errors import (
    InvalidArgumentError,
    RoutesValidationError,
    SessionStateError,
)
from .routes import Routes

__all__ = ["gather_routes", "scatter_routes", "split_routes"]


def split_routes(routes: Routes, tokens: Sequence[int]) -> list[Routes]:
    """Cut routes along tokens into consecutive parts of the given sizes (per batch, per rank).

    Example:
        >>> import torch, moe_replay as mr
        >>> r = mr.Routes([torch.arange(10).reshape(5, 2) % 4], names=["gate"], num_experts=4)
        >>> [p.num_tokens for p in mr.distributed.split_routes(r, [2, 3])]
        [2, 3]
    """
    sizes = [check_count(t, f"split size {i}") for i, t in enumerate(tokens)]
    if sum(sizes) != routes.num_tokens:
        raise InvalidArgumentError(f"split sizes {sizes} must add up to the {routes.num_tokens} tokens")
    out, start = [], 0
    for t in sizes:
        out.append(routes[start : start + t])
        start += t
    return out


def _check_initialized(what: str) -> None:
    """Refuse a collective before ``torch.distributed`` has a process group (not under ``torchrun``, say)."""
    if not dist.is_available():
        raise SessionStateError(f"{what} needs torch.distributed, which this build of torch does not include")
    if not dist.is_initialized():
        raise SessionStateError(
            f"{what} is a collective, but torch.distributed has no process group: call "
            "torch.distributed.init_process_group() on every rank first (torchrun sets up its environment)"
        )


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


def _unpack(flat: torch.Tensor, tokens: Sequence[int], like: Routes) -> Routes:
    data, start = [], 0
    for t, k in zip(tokens, like.k_per_layer, strict=True):
        n = int(t) * k
        data.append((flat[start : start + n].to(torch.int32) - 1).reshape(int(t), k))
        start += n
    return Routes._trusted(data, like.names, like.experts_per_layer)


def _header(routes: Routes) -> list[int]:
    return [*_fingerprint_words(routes), *routes.tokens_per_layer]


def _check_same_routers(headers: list[list[int]], routes: Routes) -> None:
    fps = {tuple(h[:2]) for h in headers}
    lengths = {len(h) for h in headers}
    if len(fps) != 1 or len(lengths) != 1:
        raise RoutesValidationError(
            "the ranks hold routes of different router sets (names, expert counts or k differ): every rank "
            f"must capture with the same model; this rank's routes: {routes!r}"
        )


def gather_routes(routes: Routes, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Routes] | None:
    """Collect every rank's routes on rank ``dst``.

    Every rank of ``group`` must call it. Ranks may hold different token counts.

    Returns:
        On ``dst``: one :class:`Routes` per rank of the group, in rank order. Elsewhere: None.

    Raises:
        RoutesValidationError: on every rank, when the ranks' routes are for different routers.
        SessionStateError: no process group was initialized.
    """
    _check_initialized("gather_routes")
    device = _device(group)
    world = dist.get_world_size(group)
    header = torch.tensor(_header(routes), dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    rows = [h.tolist() for h in headers]
    _check_same_routers(rows, routes)
    lengths = [sum(t * k for t, k in zip(r[2:], routes.k_per_layer, strict=True)) for r in rows]
    longest = max(lengths)
    mine = _pack(routes, device)
    padded = torch.zeros(longest, dtype=mine.dtype, device=device)
    padded[: mine.numel()] = mine
    is_dst = dist.get_rank() == dst
    bufs = [torch.empty_like(padded) for _ in range(world)] if is_dst else None
    dist.gather(padded, bufs, dst=dst, group=group)
    if not is_dst:
        return None
    assert bufs is not None
    return [_unpack(b[:n].cpu(), r[2:], routes) for b, n, r in zip(bufs, lengths, rows, strict=True)]


def scatter_routes(parts: Sequence[Routes] | None, src: int = 0, group: dist.ProcessGroup | None = None) -> Routes:
    """Send rank ``i`` of the group ``parts[i]`` from rank ``src``; the inverse of :func:`gather_routes`.

    Every rank of ``group`` must call it; only ``src`` passes ``parts`` (one per rank; other
    ranks pass None). Use :func:`split_routes` to cut one global batch into the parts.

    Returns:
        This rank's routes.

    Raises:
        SessionStateError: no process group was initialized.
    """
    _check_initialized("scatter_routes")
    device = _device(group)
    world = dist.get_world_size(group)
    is_src = dist.get_rank() == src
    if is_src:
        if parts is None or len(parts) != world:
            raise InvalidArgumentError(f"scatter_routes needs one Routes per rank ({world}) on the source rank")
        first = parts[0]
        for p in parts[1:]:
            if p.fingerprint != first.fingerprint:
                raise RoutesValidationError("scatter_routes: the parts hold routes of different router sets")
        names = "\n".join(first.names).encode()
        meta = [len(first.names), len(names), int(_wire_dtype(first) == torch.int32)]
        meta += [*first.experts_per_layer, *first.k_per_layer]
        for p in parts:
            meta += list(p.tokens_per_layer)
    # broadcast the layout: router count and names length first, then the rest
    head = torch.tensor(meta[:3] if is_src else [0, 0, 0], dtype=torch.int64, device=device)
    dist.broadcast(head, src=src, group=group)
    layers, name_bytes, wide = (int(v) for v in head.tolist())
    body = torch.zeros(2 * layers + world * layers, dtype=torch.int64, device=device)
    names_t = torch.zeros(name_bytes, dtype=torch.uint8, device=device)
    if is_src:
        body.copy_(torch.tensor(meta[3:], dtype=torch.int64))
        names_t.copy_(torch.frombuffer(bytearray(names), dtype=torch.uint8))
    dist.broadcast(body, src=src, group=group)
    dist.broadcast(names_t, src=src, group=group)
    b = body.tolist()
    experts, ks = b[:layers], b[layers : 2 * layers]
    tokens = [b[2 * layers + r * layers : 2 * layers + (r + 1) * layers] for r in range(world)]
    names_list = bytes(names_t.cpu().tolist()).decode().split("\n") if layers else []
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
    me = dist.get_rank(group)
    return _unpack(out[: lengths[me]].cpu(), tokens[me], like)
