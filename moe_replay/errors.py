"""Exceptions raised by moe_replay.

Every error names what is wrong and what to do about it. All of them derive from
:class:`MoEReplayError`, so ``except mr.MoEReplayError`` catches any of them.
"""

from __future__ import annotations

__all__ = [
    "CaptureOverflowError",
    "LayerMapError",
    "MoEReplayError",
    "ReplayConsumptionError",
    "RouterNotFoundError",
    "RoutesValidationError",
    "SessionStateError",
    "UnsupportedRouterError",
]


class MoEReplayError(RuntimeError):
    """Base class of every error raised by moe_replay."""


class RouterNotFoundError(MoEReplayError, LookupError):
    """No router was found, or a named router is not in the model."""


class UnsupportedRouterError(MoEReplayError):
    """A router whose decision cannot be seen or forced; refused rather than skipped."""


class RoutesValidationError(MoEReplayError, ValueError):
    """Routes that do not fit the model or are malformed (range, k, duplicates, dtype)."""


class LayerMapError(MoEReplayError, ValueError):
    """A :class:`~moe_replay.LayerMap` that cannot place the routers on the engine's layers."""


class CaptureOverflowError(MoEReplayError):
    """A capture that does not fit: rows past a fixed ring (CUDA graph, torch.compile), or memory past ``max_bytes``."""


class ReplayConsumptionError(MoEReplayError):
    """A router consumed fewer or more rows than were recorded for it."""


class SessionStateError(MoEReplayError):
    """An operation that the session's current state does not allow (nesting, detached)."""
