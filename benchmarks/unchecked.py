"""Diagnostic capture variants for paired decode steps: what the checks of a router call cost.

Each is capture with part of the library's per-call work taken out or made free. None is safe to use: they
drop guarantees (compile, tracing, transforms, graph capture, checkpoints, threads) to measure what those
guarantees cost on a host-bound decode step. ``benchmarks.paired --variants`` runs them by name.

- ``capture_unchecked``: a lean router's call does only what records its decision (the wrappers in and out,
  the decision's learned form armed, the forward run), none of the checks around it.
- ``capture_nofeeds``: the model's forward is not fed to the session's records (no ids kept, no cache
  watched): the per-forward work alone taken out.
- ``capture_unchecked_nofeeds``: both.
- ``capture_warm_checks``: every check kept, but the calls into torch that read its state (compile, tracing,
  transforms, graph capture, saved-tensor hooks) answered by builtins of the interpreter: what those calls cost
  beyond the Python around them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

from moe_replay import _feeds, _lean, intercept
from moe_replay.evidence import NESTING

__all__ = ["NAMES", "patched"]

NAMES = ("capture_unchecked", "capture_nofeeds", "capture_unchecked_nofeeds", "capture_warm_checks")

_CHECKED_CALL = intercept.ScopedForward.__call__


def _unchecked_call(self: intercept.ScopedForward, *args: Any, **kwargs: Any) -> Any:
    """A lean router's capture with no check: its decision's learned form armed, the wrappers in, the forward run."""
    hook = self.__moe_replay_hook__
    if hook._form is None or not hook.capturing or hook.replaying:  # (not yet answered in full: the real call)
        return _CHECKED_CALL(self, *args, **kwargs)
    hook._decided, hook._ordinal, hook._answered = False, 0, None
    hook._entry_grad, hook._eager, hook._slow = False, True, False
    hook._fast = (hook._form, None, hook.capture_ring)
    names = _lean.NAMES
    names.update(_lean.ON)
    state = NESTING
    outer = state.lean
    state.depth += 1
    state.lean = hook
    try:
        out = self.__wrapped__(*args, **kwargs)
    finally:
        state.lean = outer
        state.depth -= 1
        names.update(_lean.OFF)
    hook._fast = None
    hook.calls += 1
    return out


def _unfed_call(self: _feeds.FeedForward, *args: Any, **kwargs: Any) -> Any:
    return self._run(args, kwargs)


@contextlib.contextmanager
def patched(name: str) -> Iterator[None]:
    """The library patched for the diagnostic variant ``name`` (one of :data:`NAMES`) while the block runs."""
    patches: list[Any] = []
    if name in ("capture_unchecked", "capture_unchecked_nofeeds"):
        patches.append(mock.patch.object(intercept.ScopedForward, "__call__", _unchecked_call))
    if name in ("capture_nofeeds", "capture_unchecked_nofeeds"):
        patches.append(mock.patch.object(_feeds.FeedForward, "__call__", _unfed_call))
    if name == "capture_warm_checks":
        none, minus_one, one = type(None), (-1).__pos__, (1).__pos__
        patches.append(
            mock.patch.multiple(
                intercept,
                _cuda_capturing=bool,
                _tracing=bool,
                _jit_tracing=bool,
                _dispatch_modes=int,
                _transform=none,
                _top_hooks=none,
                _graph_task=minus_one,
                _dynamo_compiling=bool,
                _fwd_grad=one,
            )
        )
        patches.append(mock.patch.multiple(_lean, _compiling=bool))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield
