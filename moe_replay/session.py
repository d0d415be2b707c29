"""``attach`` and ``Session``: install interception once, then capture and replay by state.

A session installs one wrapper per router (on the forward of the router, or of its MoE
block) and allocates one capture ring per router on the router's device. Switching
between idle, capture and replay changes flags, never hooks, so a compiled model or a
captured CUDA graph keeps working. ``detach`` (and leaving ``with attach(...)``) takes
out every wrapper of the session, and only those, wherever other code has put them since.

One thread holds a session while it has a block open (capture, replay, keep_scores,
verify); a forward or a block from another thread meanwhile is refused, so the rows of
every router stay in one order. Give each thread its own model and session.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .discovery import Adapter, Matcher, RouterSite, find_routers, format_sites
from .errors import (
    ArgumentTypeError,
    CaptureOverflowError,
    InvalidArgumentError,
    MoEReplayError,
    ReplayConsumptionError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    UnsupportedRouterError,
)
from .intercept import RouterHook, ScopedForward
from .losses import RouterScores
from .ring import CaptureRing, ReplaySource
from .routes import Routes, fingerprint

__all__ = ["DEFAULT_CAPACITY", "Session", "attach"]

#: Rows per router kept by a capture unless ``capacity=`` says otherwise.
DEFAULT_CAPACITY = 1 << 16

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()
_ATTACH_LOCK = threading.Lock()


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Owner:
    """The thread holding a session's open blocks (capture, replay, keep_scores, verify)."""

    __slots__ = ("blocks", "ident", "lock")

    def __init__(self) -> None:
        self.ident: int | None = None
        self.blocks = 0
        self.lock = threading.Lock()


def _other_thread(what: str, holder: int) -> SessionStateError:
    return SessionStateError(
        f"{what} in thread {threading.get_ident()}, while thread {holder} has a block (capture, replay, "
        "keep_scores or verify) open on this session: one session records the forwards of one thread, in "
        "order, or the rows of concurrent forwards would interleave differently in each router. Give each "
        "thread its own model and session (copy.deepcopy(model), then mr.attach), or run the forwards in the "
        "thread that opened the block"
    )


@dataclass(eq=False)
class _SessionHook(RouterHook):
    """A router hook that knows its session's block holder and the device the model is on.

    A forward from another thread while a block is open is refused before the router does
    anything (eager mode; a recompute in backward may run in autograd's own thread). A
    device error from a model moved inside a block is reported as such.
    """

    owner: _Owner | None = None

    def _run(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if torch.compiler.is_compiling():
            return super()._run(forward, args, kwargs)
        owner = self.owner
        if owner is not None and owner.ident not in (None, threading.get_ident()) and not _in_backward():
            raise _other_thread(f"a forward reached router '{self.name}'", owner.ident)  # type: ignore[arg-type]
        try:
            return super()._run(forward, args, kwargs)
        except RuntimeError as e:
            moved = None if isinstance(e, MoEReplayError) else self._moved()
            if moved is None:
                raise
            raise SessionStateError(moved) from e

    def _moved(self) -> str | None:
        held = self.capture_ring.device if self.capture_ring is not None else None
        if held is None and self.replay_source is not None:
            held = self.replay_source.buf.device
        now = _device_of(self.scope)
        if held is None or held == now:
            return None
        return (
            f"router '{self.name}' now runs on {now}, but this session's buffers for it are on {held}: the model "
            "was moved inside a capture() or replay() block. Move the model between blocks: each block starts "
            "on the model's current device"
        )


class _HostRows:
    """A detached session's copy of one capture ring, on the host (same reading interface)."""

    def __init__(self, ring: CaptureRing, written: int) -> None:
        self.capacity = ring.capacity
        self.written = torch.tensor(written)
        keep = ring.buf if written > ring.capacity else ring.buf[:written]
        self.buf = keep.to("cpu", copy=True)

    def rows(self, written: int, keep_newest: bool) -> torch.Tensor:
        if written <= self.capacity:
            return self.buf[:written]
        if not keep_newest:
            raise AssertionError("overflow must be handled by the caller")
        start = written % self.capacity
        return torch.cat([self.buf[start:], self.buf[:start]])


class Session:
    """Routing capture and replay on one model. Create it with :func:`attach`.

    Example:
        >>> import torch, moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
        >>> with mr.attach(model) as session:
        ...     with session.capture():
        ...         ref = model(x).logits
        ...     routes = session.routes()
        ...     with session.replay(routes):
        ...         out = model(x).logits
        >>> torch.equal(ref, out)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[RouterSite],
        capacity: int = DEFAULT_CAPACITY,
        keep_newest: bool = False,
    ) -> None:
        self._model_ref = weakref.ref(model)
        self._model_name = type(model).__name__
        self._sites = tuple(sites)
        self.capacity = int(capacity)
        self.keep_newest = bool(keep_newest)
        self._hooks: list[RouterHook] = []
        self._installed: list[tuple[nn.Module, Any]] = []
        self._capturing = False
        self._replaying = False
        self._attached = False
        self._has_capture = False
        self._interrupted: str | None = None  # the exception that ended the last capture, if one did
        self._owner = _Owner()
        self._wrappers: list[ScopedForward] = []
        self._kept_rows: list[_HostRows] | None = None  # the capture rows, copied at detach
        self._renamed: dict[str, str] | None = None  # the prefix map of the last replay, if it needed one

    # ------------------------------------------------------------- properties
    @property
    def sites(self) -> tuple[RouterSite, ...]:
        """The routers this session intercepts, in module order."""
        return self._sites

    @property
    def names(self) -> tuple[str, ...]:
        """Module paths of the routers."""
        return tuple(s.name for s in self._sites)

    @property
    def attached(self) -> bool:
        """False once :meth:`detach` ran."""
        return self._attached

    @property
    def state(self) -> str:
        """``idle``, ``capturing``, ``replaying``, ``replaying+capturing`` or ``detached``."""
        if not self._attached:
            return "detached"
        parts = [p for p, on in (("replaying", self._replaying), ("capturing", self._capturing)) if on]
        return "+".join(parts) or "idle"

    @property
    def fingerprint(self) -> str:
        """Hash of the router set; equals ``Routes.fingerprint`` of routes recorded here."""
        return fingerprint(self.names, [s.num_experts for s in self._sites], [s.top_k for s in self._sites])

    @property
    def renamed(self) -> dict[str, str] | None:
        """The prefix map that fitted the last replayed routes' router names to this model, if one did.

        Routes recorded on the bare model and replayed on it wrapped (DDP's ``module.``,
        ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.``, an attribute of a
        user's wrapper), or the reverse, match their routers one to one by a common suffix:
        e.g. ``{"": "module."}``. ``None`` when the names matched as they were.
        """
        return dict(self._renamed) if self._renamed is not None else None

    def __repr__(self) -> str:
        renamed = ""
        if self._renamed is not None:
            renamed = ", routes renamed " + ", ".join(f"{a!r}->{b!r}" for a, b in self._renamed.items())
        return (
            f"Session(model={self._model_name}, routers={len(self._sites)}, capacity={self.capacity}, "
            f"state={self.state}{renamed})"
        )

    def table(self) -> str:
        """The router table (name, class, E, k, how it is intercepted)."""
        return format_sites(self._sites)

    # ------------------------------------------------------------- install
    def _install(self) -> None:
        scopes: dict[int, str] = {}
        for s in self._sites:
            assert s.scope_module is not None
            if id(s.scope_module) in scopes:
                raise UnsupportedRouterError(
                    f"routers '{scopes[id(s.scope_module)]}' and '{s.name}' would both be intercepted in the "
                    f"forward of '{s.scope}'; exclude one of them or give one an Adapter with scope='router'"
                )
            scopes[id(s.scope_module)] = s.name
            if getattr(s.scope_module.forward, "__moe_replay_hook__", None) is not None:
                raise SessionStateError(
                    f"'{s.scope}' is already intercepted by another session; detach that session first"
                )
        try:
            # buffers are ordinary tensors even when attach runs under torch.inference_mode()
            with torch.inference_mode(False):
                for s in self._sites:
                    scope = s.scope_module
                    assert scope is not None
                    device = _device_of(s.module or scope)
                    hook = _SessionHook(
                        name=s.name,
                        num_experts=s.num_experts,
                        top_k=s.top_k,
                        decision=s.decision,
                        scope=scope,
                        capture_ring=CaptureRing(self.capacity, s.top_k, s.num_experts, device),
                        owner=self._owner,
                    )
                    own = scope.__dict__.get("forward", _MISSING)
                    wrapper = hook.wrap(scope.forward)
                    scope.forward = wrapper
                    self._installed.append((scope, own))
                    self._wrappers.append(wrapper)
                    self._hooks.append(hook)
        except BaseException:
            for action in self._removal_plan():
                action()
            self._installed.clear()
            self._wrappers.clear()
            self._hooks.clear()
            raise
        self._attached = True

    def _removal_plan(self) -> list[Callable[[], None]]:
        """How to take out every wrapper of this session, wherever it now sits; refuses if one cannot be.

        A wrapper still installed as the module's ``forward`` gives back what was there
        before attach. A wrapper that something installed later now wraps (accelerate's
        ``add_hook_to_module`` keeps it as ``_old_forward``; a closure, a ``functools.partial``
        or a callable object may hold it) is replaced, where it is held, by the forward it
        wrapped. A wrapper no longer reachable from the module was taken out by someone
        else: the module is left as it is. Nothing is changed until every wrapper is placed.
        """
        actions: list[Callable[[], None]] = []
        refused: list[str] = []
        for i in range(len(self._wrappers)):  # no zip/enumerate: their result tuples would hold the wrapper
            scope, own = self._installed[i]
            wrapper = self._wrappers[i]
            if scope.__dict__.get("forward", _MISSING) is wrapper:
                actions.append(functools.partial(_restore_forward, scope, own))
                continue
            setters, containers, opaque = _references(scope, wrapper)
            outside = _outside_referrers(wrapper, [*containers, self._wrappers])
            name = next((s.scope for s in self._sites if s.scope_module is scope), type(scope).__name__)
            if opaque or outside:
                refused.append(
                    f"'{name}' (its forward is now {_describe(scope.__dict__.get('forward'))}; the moe_replay "
                    f"wrapper is held by {', '.join([*opaque, *outside][:3])})"
                )
                continue
            inner = wrapper.__wrapped__
            actions.extend(functools.partial(setter, inner) for setter in setters)
        if refused:
            raise SessionStateError(
                "cannot detach without undoing other code's changes: something installed after attach wraps "
                f"the moe_replay wrapper where it cannot be taken out: {'; '.join(refused[:3])}"
                + (f" (+{len(refused) - 3} more)" if len(refused) > 3 else "")
                + ". Remove that wrapper first (e.g. accelerate's remove_hook_from_module), then detach; "
                "the session stays attached and nothing was changed"
            )
        return actions

    def detach(self) -> None:
        """Remove every wrapper of this session, and only those. Idempotent.

        Other code that changed a module's ``forward`` after attach keeps its change: a wrapper
        installed on top of this session's (accelerate's ``add_hook_to_module``, say) stays and
        now calls the original forward; a wrapper removed while attached stays removed. Where
        this session's wrapper is held in a way it cannot edit, detach refuses and changes nothing.

        The rows of the last capture are copied to the host, so :meth:`routes` still reads
        them after detach.

        Raises:
            SessionStateError: another thread has a block open, or a wrapper cannot be taken out.
        """
        if not self._attached:
            return
        self._check_thread("detach()")
        plan = self._removal_plan()
        self._set(capturing=False, replaying=False)
        self._keep_rows()
        for action in plan:
            action()
        self._installed.clear()
        self._wrappers.clear()
        self._hooks.clear()
        self._attached = False
        model = self._model_ref()
        with _ATTACH_LOCK:
            if model is not None and _ATTACHED.get(model) is self:
                del _ATTACHED[model]

    def _keep_rows(self) -> None:
        """Copy what the last capture recorded to the host, for :meth:`routes` after detach."""
        if not self._has_capture:
            return
        rings = [h.capture_ring for h in self._hooks if h.capture_ring is not None]
        if any(r.device.type == "meta" for r in rings):
            self._has_capture = False  # rows of a model on the meta device hold no values
            return
        written = _read_counters([r.written for r in rings])
        self._kept_rows = [_HostRows(r, w) for r, w in zip(rings, written, strict=True)]

    # ------------------------------------------------------------- threads, devices
    def _check_thread(self, what: str) -> None:
        holder = self._owner.ident
        if holder is not None and holder != threading.get_ident():
            raise _other_thread(what, holder)

    @contextlib.contextmanager
    def _block(self, what: str) -> Iterator[None]:
        """Hold the session for this thread while a capture/replay/keep_scores/verify block is open."""
        owner, me = self._owner, threading.get_ident()
        with owner.lock:
            if owner.ident is not None and owner.ident != me:
                raise _other_thread(what, owner.ident)
            owner.ident = me
            owner.blocks += 1
        try:
            yield
        finally:
            with owner.lock:
                owner.blocks -= 1
                if owner.blocks == 0:
                    owner.ident = None

    def _follow_devices(self) -> None:
        """Put each capture ring on its router's current device (the model moved since attach).

        Runs when a block starts, so a moved model is followed at no cost per forward.
        Rows already recorded move with the ring.
        """
        for h, s in zip(self._hooks, self._sites, strict=True):
            ring = h.capture_ring
            if ring is None:
                continue
            device = _device_of(s.module or h.scope)
            if ring.device == device:
                continue
            with torch.inference_mode(False):
                new = CaptureRing(self.capacity, s.top_k, s.num_experts, device)
                if "meta" not in (ring.device.type, device.type):
                    new.buf.copy_(ring.buf.to(device))
                    new.written.copy_(ring.written.to(device))
            h.capture_ring = new

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _check_attached(self) -> None:
        if not self._attached:
            raise SessionStateError("this session was detached; call mr.attach(model) again")

    def _set(self, *, capturing: bool | None = None, replaying: bool | None = None) -> None:
        if capturing is not None:
            self._capturing = capturing
        if replaying is not None:
            self._replaying = replaying
        for h in self._hooks:
            h.capturing = self._capturing
            h.replaying = self._replaying and h.replay_source is not None

    # ------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, *, clear: bool = True) -> Iterator[Session]:
        """Record the experts every router chooses, for any number of forwards.

        Args:
            clear: start from empty rings (default); ``False`` appends to the last capture.

        Inside :meth:`replay`, a capture records the forced experts.

        An exception that leaves the block ends the capture. The rows written before it
        stay in the rings (nothing is rewound: the routers that ran in the failed forward
        keep its rows, the others do not have them), so :meth:`routes` refuses them unless
        asked for ``allow_partial=True``, and ``clear=False`` cannot append to them. Rows
        kept for activation-checkpoint recomputes belong to each forward's autograd graph:
        a failed forward's go with its graph, a finished forward's backward still gets its own.
        """
        self._check_attached()
        with self._block("capture()"):
            with self._capture(clear):
                yield self

    @contextlib.contextmanager
    def _capture(self, clear: bool) -> Iterator[None]:
        if self._capturing:
            raise SessionStateError("a capture is already running on this session; captures do not nest")
        self._follow_devices()
        if not clear and self._interrupted is not None:
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}, so its rows may stop half-way "
                "through a forward and capture(clear=False) cannot append to them: start a new capture, "
                "or read them with routes(allow_partial=True)"
            )
        if clear:
            for h in self._hooks:
                assert h.capture_ring is not None
                h.capture_ring.reset()
            self._interrupted = None
        for h in self._hooks:
            h.calls = h.decisions = 0
        self._has_capture = True
        self._set(capturing=True)
        try:
            yield
        except BaseException as exc:
            self._interrupted = f"{type(exc).__name__}({str(exc)[:200]!r})"
            raise
        finally:
            self._set(capturing=False)

    def routes(self, *, allow_silent: bool = False, allow_partial: bool = False) -> Routes:
        """The rows recorded by the last capture, copied to the host in one pass.

        Still readable after :meth:`detach` (the rows were copied to the host then), as a
        profiler's results are after its context.

        Args:
            allow_silent: accept routers that recorded no row while others did (by default
                that is an error: such a router never ran, e.g. a module built twice).
            allow_partial: read the rows of a capture that an exception interrupted: each
                router's rows as written before the exception, so the routers that ran in
                the failed forward hold more rows than the others. Implies ``allow_silent``.

        Raises:
            SessionStateError: nothing was captured, the capture was interrupted, or another
                thread has a block open on this session.
            CaptureOverflowError: a router wrote more rows than ``capacity`` (unless the
                session keeps only the newest rows).
        """
        if not self._has_capture:
            if not self._attached:
                raise SessionStateError("this session was detached before it captured anything")
            raise SessionStateError("nothing was captured yet: run forwards inside `with session.capture():`")
        if self._attached:
            self._check_thread("routes()")
            rings: list[Any] = [h.capture_ring for h in self._hooks if h.capture_ring is not None]
        else:
            assert self._kept_rows is not None
            rings = self._kept_rows
        names = self.names
        written = _read_counters([r.written for r in rings])
        if self._interrupted is not None and not allow_partial:
            counts = ", ".join(f"'{n}': {w}" for n, w in list(zip(names, written, strict=True))[:4])
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}; a forward may have stopped half-way, "
                f"so the routers' rows may not line up (rows per router: {counts}"
                + (", ..." if len(written) > 4 else "")
                + "). Capture again, or call routes(allow_partial=True) to read the rows written before the exception"
            )
        allow_silent = allow_silent or allow_partial
        over = [(n, w) for n, w in zip(names, written, strict=True) if w > self.capacity]
        if over and not self.keep_newest:
            worst = max(w for _, w in over)
            detail = "; ".join(f"'{n}' wrote {w} rows" for n, w in over[:4])
            if len(over) > 4:
                detail += f" (+{len(over) - 4} more routers)"
            raise CaptureOverflowError(
                f"capture overflow: {detail}, but the capacity is {self.capacity} rows per router. Attach "
                f"with capacity={worst} or more, capture fewer tokens, or attach with keep_newest=True to "
                "keep only the newest rows"
            )
        if not allow_silent and written and max(written) > 0:
            silent = [n for n, w in zip(names, written, strict=True) if w == 0]
            if silent:
                raise UnsupportedRouterError(
                    f"routers {silent} recorded no row while others recorded up to {max(written)}: they never "
                    "ran during the capture (a module outside the forward path, or built twice?). Exclude "
                    "them with exclude=, or call routes(allow_silent=True)"
                )
        rows = [r.rows(w, self.keep_newest) for r, w in zip(rings, written, strict=True)]
        return Routes._trusted(rows, names, [s.num_experts for s in self._sites])

    # ------------------------------------------------------------- replay
    def _other_model(self, routes: Routes) -> str:
        return (
            f" The routes were recorded on a different router set: routes.fingerprint is {routes.fingerprint}, "
            f"session.fingerprint is {self.fingerprint} (a fingerprint hashes the router names, expert counts "
            "and k)."
        )

    def _fit_names(self, routes: Routes) -> tuple[Routes, dict[str, str] | None]:
        """Routes whose router names this model has: as given, or mapped by one common prefix change."""
        if all(n in self.names for n in routes.names):
            return routes, None
        candidates = _prefix_maps(routes.names, self.names)
        if len(candidates) == 1:
            (old, new), _ = candidates[0]
            return routes.rename({old: new}), {old: new}
        if len(candidates) > 1:
            listed = "; ".join(
                f"{old!r}->{new!r} (e.g. '{next(iter(m))}' -> '{next(iter(m.values()))}')"
                for (old, new), m in candidates[:4]
            )
            raise RouterNotFoundError(
                f"the routes' router names match this model's in more than one way: {listed}"
                + (f" (+{len(candidates) - 4} more)" if len(candidates) > 4 else "")
                + ". Say which: routes.rename({old_prefix: new_prefix}), then replay"
            )
        return routes, None

    def _check_routes(self, routes: Routes, strict: bool) -> tuple[Routes, list[tuple[RouterHook, RouterSite, int]]]:
        if not isinstance(routes, Routes):
            raise RoutesValidationError(
                f"replay takes a Routes object, got {type(routes).__name__}; build one with "
                "mr.Routes(...) or mr.Routes.from_numpy(...)"
            )
        routes._ensure_valid()  # routes built with validate=False are checked before any forward
        routes, renamed = self._fit_names(routes)
        unknown = [n for n in routes.names if n not in self.names]
        if unknown:
            raise RouterNotFoundError(
                f"the routes name routers that this model does not have: {unknown[:5]}"
                + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                + f". This model's routers are {list(self.names[:3])}"
                + ("..." if len(self.names) > 3 else "")
                + "."
                + self._other_model(routes)
                + " Record the routes on this model, or rename them: routes.rename({'old.prefix.': 'new.prefix.'})"
            )
        missing = [n for n in self.names if n not in routes.names]
        if missing and strict:
            raise RoutesValidationError(
                f"the routes hold no rows for routers {missing[:5]}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                + "; replay every router, or pass strict=False to route those natively"
            )
        plan = []
        wrong = []
        for h, s in zip(self._hooks, self._sites, strict=True):
            if s.name not in routes.names:
                continue
            j = routes.names.index(s.name)
            e, k = routes.experts_per_layer[j], routes.k_per_layer[j]
            if e != s.num_experts:
                wrong.append(f"router '{s.name}' has {s.num_experts} experts, but the routes were recorded for {e}")
            elif k != s.top_k:
                wrong.append(f"router '{s.name}' chooses k={s.top_k} experts per token, but its routes have k={k}")
            plan.append((h, s, j))
        if wrong:
            raise RoutesValidationError(
                "; ".join(wrong[:4])
                + (f" (+{len(wrong) - 4} more routers)" if len(wrong) > 4 else "")
                + "."
                + self._other_model(routes)
                + " Record the routes on this model"
            )
        self._renamed = renamed
        return routes, plan

    @contextlib.contextmanager
    def replay(self, routes: Routes, *, strict: bool = True) -> Iterator[Session]:
        """Force the recorded experts; combine weights come from the current scores.

        Every router consumes its rows in order, one row per token per forward; -1 rows
        route that token natively. Routes are checked against the model before any
        forward runs.

        A forward that raises is not rewound: the routers that ran before the exception
        have consumed its rows. An exception that leaves the block ends the replay there
        (no consumption check; the exception propagates as it is) and the next replay
        starts from row 0. Caught inside the block, the routers are out of step: a strict
        replay then fails at the forward that overdraws or when the block ends.

        Args:
            routes: what to replay (from :meth:`routes`, a file, or an engine's output).
            strict: on leaving, every router must have consumed exactly its rows, and
                every router must have routes. ``False`` allows partial replay.

        Raises:
            RoutesValidationError / RouterNotFoundError: before any forward, if the routes
                do not fit the model.
            ReplayConsumptionError: on leaving, if a router consumed too few or too many rows.
        """
        self._check_attached()
        with self._block("replay()"):
            with self._replay(routes, strict):
                yield self

    @contextlib.contextmanager
    def _replay(self, routes: Routes, strict: bool) -> Iterator[None]:
        if self._replaying:
            raise SessionStateError("a replay is already running on this session; replays do not nest")
        routes, plan = self._check_routes(routes, strict)
        self._follow_devices()
        layers = routes._data
        with torch.inference_mode(False):  # the cursors are ordinary tensors, whatever the caller's mode
            for h, s, j in plan:
                h.replay_source = ReplaySource(layers[j], s.num_experts, h.capture_ring.device)  # type: ignore[union-attr]
        self._set(replaying=True)
        ok = False
        try:
            yield
            ok = True
        finally:
            self._set(replaying=False)
            sources = [(h, h.replay_source) for h, _, _ in plan]
            for h, _, _ in plan:
                h.replay_source = None
        if ok and strict:
            used = _read_counters([src.consumed for _, src in sources if src is not None])
            bad = [
                (h.name, u, src.num_rows)
                for (h, src), u in zip(sources, used, strict=True)
                if src is not None and u != src.num_rows
            ]
            if bad:
                detail = "; ".join(f"'{n}' consumed {u} of {r} rows" for n, u, r in bad[:6])
                raise ReplayConsumptionError(
                    f"replay ended with unconsumed or overdrawn routes: {detail}"
                    + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
                    + ". Each forward consumes one row per token; run the forwards the routes were "
                    "recorded for, slice the routes, or pass strict=False. Routes captured around generate() "
                    "hold the prompt once and one row per new token in generation order (the last token "
                    "unrouted): for a teacher-forced forward convert them with mr.split_generation(...) "
                    "and lay them out with mr.BatchLayout"
                )

    # ------------------------------------------------------------- scores
    @contextlib.contextmanager
    def keep_scores(self) -> Iterator[RouterScores]:
        """Keep, for every router decision, the scores it was made on and the experts used.

        Works in any state (idle, capture, replay); the scores keep their autograd graph, for
        :func:`~moe_replay.load_balancing_loss`. Eager mode: under ``torch.compile`` the
        decision happens inside the compiled graph and nothing is kept.

        Yields:
            A :class:`RouterScores`, filled while the context is open.
        """
        self._check_attached()
        with self._block("keep_scores()"):
            if any(h.seen is not None for h in self._hooks):
                raise SessionStateError("scores are already being kept on this session; keep_scores() does not nest")
            kept = RouterScores(self.names)
            for h in self._hooks:
                h.seen = kept._calls[h.name]
            try:
                yield kept
            finally:
                for h in self._hooks:
                    h.seen = None

    # ------------------------------------------------------------- dry run
    def verify(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        """Run ``model(*args, **kwargs)`` once without gradients and check every router.

        Each router must run and its decision call must be seen. Nothing is recorded.

        Returns:
            How many times each router ran in that forward.
        """
        self._check_attached()
        if self._capturing or self._replaying:
            raise SessionStateError("verify() runs on an idle session, outside capture() and replay()")
        model = self._model_ref()
        if model is None:
            raise SessionStateError("the model of this session no longer exists")
        with self._block("verify()"):
            rings = [h.capture_ring for h in self._hooks]
            for h in self._hooks:
                h.capture_ring, h.calls, h.decisions = None, 0, 0
            try:
                self._set(capturing=True)
                with torch.no_grad():
                    model(*args, **kwargs)
            finally:
                self._set(capturing=False)
                for h, r in zip(self._hooks, rings, strict=True):
                    h.capture_ring = r
        never = [h.name for h in self._hooks if h.calls == 0]
        if never:
            raise UnsupportedRouterError(
                f"routers {never} did not run in this forward: they are not on the forward path (a module "
                "built twice, or replaced after loading?); exclude them or name the right ones with include="
            )
        return {h.name: h.calls for h in self._hooks}


class _Missing:
    pass


_MISSING = _Missing()


def _restore_forward(scope: nn.Module, own: Any) -> None:
    if own is _MISSING:
        scope.__dict__.pop("forward", None)
    else:
        scope.forward = own


def _describe(fn: Any) -> str:
    if fn is None:
        return "the class's forward"
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None)
    return f"{type(fn).__name__} {name}" if name else type(fn).__name__


#: How deep the callables reachable from a module's attributes are searched for a wrapper.
_MAX_WRAPPER_DEPTH = 8


def _references(scope: nn.Module, wrapper: ScopedForward) -> tuple[list[Callable[[Any], None]], list[Any], list[str]]:
    """Where the callables reachable from ``scope``'s attributes hold ``wrapper``.

    Returns setters that replace each reference (given the new value), the containers
    holding one (for :func:`_outside_referrers`), and the references no setter can reach.
    Copies of the wrapper's attributes that ``functools.update_wrapper`` made
    (``__moe_replay_hook__``, ``__wrapped__``) are found too.
    """
    hook = wrapper.__moe_replay_hook__
    setters: list[Callable[[Any], None]] = []
    containers: list[Any] = []
    opaque: list[str] = []
    seen: set[int] = set()

    def in_dict(d: dict[str, Any], depth: int) -> None:
        for key, value in list(d.items()):
            if value is wrapper:
                setters.append(lambda new, d=d, key=key: d.__setitem__(key, new))
                containers.append(d)
            elif key == "__moe_replay_hook__" and value is hook:
                setters.append(lambda new, d=d, key=key: d.pop(key, None))
                containers.append(d)
            elif callable(value):
                visit(value, depth + 1)

    def visit(obj: Any, depth: int) -> None:
        if depth > _MAX_WRAPPER_DEPTH or id(obj) in seen or isinstance(obj, nn.Module | torch.Tensor | type):
            return
        seen.add(id(obj))
        if isinstance(obj, types.MethodType):
            if obj.__func__ is wrapper:
                opaque.append(f"a method bound to {type(obj.__self__).__name__}")
            else:
                visit(obj.__func__, depth + 1)
            return
        if isinstance(obj, functools.partial):
            part = obj
            if part.func is wrapper:
                setters.append(lambda new, p=part: p.__setstate__((new, p.args, p.keywords, p.__dict__)))
                containers.append(part)
            else:
                visit(part.func, depth + 1)
            for i, arg in enumerate(part.args):
                if arg is wrapper:
                    setters.append(
                        lambda new, p=part, i=i: p.__setstate__(
                            (p.func, (*p.args[:i], new, *p.args[i + 1 :]), p.keywords, p.__dict__)
                        )
                    )
                    containers.append(part.args)
                elif callable(arg):
                    visit(arg, depth + 1)
            if part.keywords:
                in_dict(part.keywords, depth)
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if value is wrapper:
                    setters.append(lambda new, c=cell: setattr(c, "cell_contents", new))
                    containers.append(cell)
                elif callable(value):
                    visit(value, depth + 1)
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            in_dict(d, depth)

    try:
        in_dict(scope.__dict__, 0)
    finally:  # the two closures refer to each other: break that cycle, or a cell would keep holding the wrapper
        visit = in_dict = None  # type: ignore[assignment]
    return setters, containers, opaque


def _outside_referrers(wrapper: ScopedForward, known: Sequence[Any]) -> list[str]:
    """What else holds ``wrapper`` (besides ``known`` containers and running frames)."""
    ids = {id(k) for k in known}
    out = []
    for ref in gc.get_referrers(wrapper):
        if id(ref) in ids or isinstance(ref, types.FrameType):
            continue
        out.append(f"a {type(ref).__name__} that moe_replay cannot edit")
    return out


def _prefix_maps(names: Sequence[str], targets: Sequence[str]) -> list[tuple[tuple[str, str], dict[str, str]]]:
    """The ways one prefix change maps every name in ``names`` onto a distinct name in ``targets``.

    A wrapper adds, removes or swaps leading module names (``module.``, ``_orig_mod.``,
    ``base_model.model.``), so each candidate keeps a common suffix of whole module names.
    Only the candidates keeping the longest suffix (fewest names changed) are returned;
    more than one of them is an ambiguity.
    """
    if not names:
        return []
    wanted = set(targets)
    first = names[0].split(".")
    found: dict[tuple[str, str], tuple[int, dict[str, str]]] = {}
    for t in targets:
        parts = t.split(".")
        common = 0
        while common < min(len(parts), len(first)) and parts[-1 - common] == first[-1 - common]:
            common += 1
        if common == 0:
            continue
        old = ".".join(first[: len(first) - common]) + ("." if common < len(first) else "")
        new = ".".join(parts[: len(parts) - common]) + ("." if common < len(parts) else "")
        if (old, new) in found or not all(n.startswith(old) for n in names):
            continue
        mapping = {n: new + n[len(old) :] for n in names}
        if all(m in wanted for m in mapping.values()) and len(set(mapping.values())) == len(mapping):
            found[(old, new)] = (common, mapping)
    if not found:
        return []
    best = max(c for c, _ in found.values())
    out: dict[tuple[str, ...], tuple[tuple[str, str], dict[str, str]]] = {}
    for pair, (c, m) in found.items():
        if c == best:
            out.setdefault(tuple(m.values()), (pair, m))  # two prefix pairs may map the names alike
    return list(out.values())


def _read_counters(counters: Sequence[torch.Tensor]) -> list[int]:
    """Read device counters with one host copy per device."""
    out: list[int | None] = [None] * len(counters)
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(counters):
        by_device.setdefault(c.device, []).append(i)
    for _device, idx in by_device.items():
        vals = torch.stack([counters[i] for i in idx]).cpu().tolist()
        for i, v in zip(idx, vals, strict=True):
            out[i] = int(v)
    return [int(v) for v in out if v is not None]


def attach(
    model: nn.Module,
    capacity: int = DEFAULT_CAPACITY,
    *,
    include: Matcher | None = None,
    exclude: Matcher | None = None,
    adapters: Sequence[Adapter] = (),
    top_k: int | None = None,
    num_experts: int | None = None,
    keep_newest: bool = False,
) -> Session:
    """Find the routers of ``model`` and install interception on them, once.

    Args:
        model: any ``nn.Module`` MoE.
        capacity: rows (tokens) each router can record per capture.
        include, exclude, adapters, top_k, num_experts: see :func:`find_routers`.
        keep_newest: on overflow keep the newest ``capacity`` rows instead of raising.

    Returns:
        A :class:`Session`; also a context manager that detaches on exit.

    Raises:
        RouterNotFoundError: no router found.
        UnsupportedRouterError: a router whose decision cannot be intercepted.
        SessionStateError: the model already has a session.

    Example:
        >>> import moe_replay as mr
        >>> session = mr.attach(mr.models.build("top1_argmax"), capacity=4096)
        >>> session
        Session(model=MoETransformer, routers=2, capacity=4096, state=idle)
        >>> session.detach()
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"attach takes an nn.Module, got {type(model).__name__}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InvalidArgumentError(f"capacity must be a positive number of rows, got {capacity!r}")
    sites = find_routers(
        model, include=include, exclude=exclude, adapters=adapters, top_k=top_k, num_experts=num_experts
    )
    refused = [s for s in sites if s.unsupported]
    if refused:
        detail = "\n  ".join(f"'{s.name}' ({s.module_class}): {s.unsupported}" for s in refused[:4])
        raise UnsupportedRouterError(
            f"{len(refused)} router(s) cannot be replayed exactly:\n  {detail}\n"
            "Nothing was installed. Exclude them with exclude= to replay the others."
        )
    with _ATTACH_LOCK:
        other = _ATTACHED.get(model)
        if other is not None and other.attached:
            raise SessionStateError(
                f"{type(model).__name__} already has an attached session ({other!r}); detach it first"
            )
        session = Session(model, sites, capacity=capacity, keep_newest=keep_newest)
        session._install()
        _ATTACHED[model] = session
    return session
