"""``attach`` and ``Session``: install interception once, then capture and replay by state.

A session installs one wrapper per router (on the forward of the router, or of its MoE
block) and allocates one capture ring per router on the router's device. Switching
between idle, capture and replay changes flags, never hooks, so a compiled model or a
captured CUDA graph keeps working. ``detach`` (and leaving ``with attach(...)``) puts
every module back as it was.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .discovery import Adapter, Matcher, RouterSite, find_routers, format_sites
from .errors import (
    ArgumentTypeError,
    CaptureOverflowError,
    InvalidArgumentError,
    ReplayConsumptionError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    UnsupportedRouterError,
)
from .intercept import RouterHook
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

    def __repr__(self) -> str:
        return (
            f"Session(model={self._model_name}, routers={len(self._sites)}, capacity={self.capacity}, "
            f"state={self.state})"
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
            for s in self._sites:
                scope = s.scope_module
                assert scope is not None
                device = _device_of(s.module or scope)
                hook = RouterHook(
                    name=s.name,
                    num_experts=s.num_experts,
                    top_k=s.top_k,
                    decision=s.decision,
                    scope=scope,
                    capture_ring=CaptureRing(self.capacity, s.top_k, s.num_experts, device),
                )
                own = scope.__dict__.get("forward", _MISSING)
                scope.forward = hook.wrap(scope.forward)
                self._installed.append((scope, own))
                self._hooks.append(hook)
        except BaseException:
            self._uninstall()
            raise
        self._attached = True

    def _uninstall(self) -> None:
        for scope, own in reversed(self._installed):
            if own is _MISSING:
                scope.__dict__.pop("forward", None)
            else:
                scope.forward = own
        self._installed.clear()
        self._hooks.clear()

    def detach(self) -> None:
        """Remove every wrapper; the model is exactly as before :func:`attach`. Idempotent."""
        if not self._attached:
            return
        self._set(capturing=False, replaying=False)
        self._uninstall()
        self._attached = False
        model = self._model_ref()
        with _ATTACH_LOCK:
            if model is not None and _ATTACHED.get(model) is self:
                del _ATTACHED[model]

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
        if self._capturing:
            raise SessionStateError("a capture is already running on this session; captures do not nest")
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
            yield self
        except BaseException as exc:
            self._interrupted = f"{type(exc).__name__}({str(exc)[:200]!r})"
            raise
        finally:
            self._set(capturing=False)

    def routes(self, *, allow_silent: bool = False, allow_partial: bool = False) -> Routes:
        """The rows recorded by the last capture, copied to the host in one pass.

        Args:
            allow_silent: accept routers that recorded no row while others did (by default
                that is an error: such a router never ran, e.g. a module built twice).
            allow_partial: read the rows of a capture that an exception interrupted: each
                router's rows as written before the exception, so the routers that ran in
                the failed forward hold more rows than the others. Implies ``allow_silent``.

        Raises:
            SessionStateError: nothing was captured, or the capture was interrupted.
            CaptureOverflowError: a router wrote more rows than ``capacity`` (unless the
                session keeps only the newest rows).
        """
        self._check_attached()
        if not self._has_capture:
            raise SessionStateError("nothing was captured yet: run forwards inside `with session.capture():`")
        written = _read_counters([h.capture_ring.written for h in self._hooks if h.capture_ring is not None])
        if self._interrupted is not None and not allow_partial:
            counts = ", ".join(f"'{h.name}': {w}" for h, w in list(zip(self._hooks, written, strict=True))[:4])
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}; a forward may have stopped half-way, "
                f"so the routers' rows may not line up (rows per router: {counts}"
                + (", ..." if len(written) > 4 else "")
                + "). Capture again, or call routes(allow_partial=True) to read the rows written before the exception"
            )
        allow_silent = allow_silent or allow_partial
        over = [(h, w) for h, w in zip(self._hooks, written, strict=True) if w > self.capacity]
        if over and not self.keep_newest:
            worst = max(w for _, w in over)
            detail = "; ".join(f"'{h.name}' wrote {w} rows" for h, w in over[:4])
            if len(over) > 4:
                detail += f" (+{len(over) - 4} more routers)"
            raise CaptureOverflowError(
                f"capture overflow: {detail}, but the capacity is {self.capacity} rows per router. Attach "
                f"with capacity={worst} or more, capture fewer tokens, or attach with keep_newest=True to "
                "keep only the newest rows"
            )
        if not allow_silent and written and max(written) > 0:
            silent = [h.name for h, w in zip(self._hooks, written, strict=True) if w == 0]
            if silent:
                raise UnsupportedRouterError(
                    f"routers {silent} recorded no row while others recorded up to {max(written)}: they never "
                    "ran during the capture (a module outside the forward path, or built twice?). Exclude "
                    "them with exclude=, or call routes(allow_silent=True)"
                )
        rows = [
            h.capture_ring.rows(w, self.keep_newest)
            for h, w in zip(self._hooks, written, strict=True)
            if h.capture_ring
        ]
        return Routes._trusted(rows, self.names, [s.num_experts for s in self._sites])

    # ------------------------------------------------------------- replay
    def _other_model(self, routes: Routes) -> str:
        return (
            f" The routes were recorded on a different router set: routes.fingerprint is {routes.fingerprint}, "
            f"session.fingerprint is {self.fingerprint} (a fingerprint hashes the router names, expert counts "
            "and k)."
        )

    def _check_routes(self, routes: Routes, strict: bool) -> list[tuple[RouterHook, RouterSite, int]]:
        if not isinstance(routes, Routes):
            raise RoutesValidationError(
                f"replay takes a Routes object, got {type(routes).__name__}; build one with "
                "mr.Routes(...) or mr.Routes.from_numpy(...)"
            )
        routes._ensure_valid()  # routes built with validate=False are checked before any forward
        unknown = [n for n in routes.names if n not in self.names]
        if unknown:
            raise RouterNotFoundError(
                f"the routes name routers that this model does not have: {unknown[:5]}"
                + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                + f". This model's routers are {list(self.names[:3])}"
                + ("..." if len(self.names) > 3 else "")
                + "."
                + self._other_model(routes)
                + " Record the routes on this model, or map the names (see moe_replay.interop)"
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
        return plan

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
        if self._replaying:
            raise SessionStateError("a replay is already running on this session; replays do not nest")
        plan = self._check_routes(routes, strict)
        layers = routes._data
        for h, s, j in plan:
            h.replay_source = ReplaySource(layers[j], s.num_experts, h.capture_ring.device)  # type: ignore[union-attr]
        self._set(replaying=True)
        ok = False
        try:
            yield self
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
                    "recorded for, slice the routes, or pass strict=False"
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
