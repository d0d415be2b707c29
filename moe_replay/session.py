"""``attach`` and ``Session``: install interception once, then capture and replay by state.

A session installs one wrapper per router (on the forward of the router, or of its MoE
block) and allocates one capture ring per router on the router's device. Switching
between idle, capture and replay changes flags, never hooks, so a compiled model or a
captured CUDA graph keeps working. ``detach`` (and leaving ``with attach(...)``) puts
every module back as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import _torch_compat
from .discovery import Adapter, Matcher, RouterSite, _compile_matcher, find_routers, format_sites
from .errors import (
    CaptureOverflowError,
    ReplayConsumptionError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    UnsupportedRouterError,
)
from .evidence import VerifyReport
from .intercept import RouterHook
from .losses import RouterScores
from .orphans import OrphanWatch, watch_forward
from .ring import OVERFLOW_MARK, Budget, CaptureRing, ReplaySource, _fmt_bytes, index_dtype
from .routes import Routes, fingerprint

__all__ = ["DEFAULT_CAPACITY", "Session", "attach"]

#: Rows per router of a capture ring's first segment unless ``capacity=`` says otherwise: an
#: eager capture grows past it; under CUDA graphs, ``torch.compile`` and ``keep_newest`` it
#: is the fixed size of the ring.
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
        max_bytes: int | None = None,
        *,
        declared_top_k: bool = False,
        excluded: Callable[[str, nn.Module], bool] | None = None,
    ) -> None:
        self._model_ref = weakref.ref(model)
        self._model_name = type(model).__name__
        self._sites = list(sites)
        self._declared_top_k = declared_top_k
        self._excluded = excluded
        self._watch_pending = True  # the first capture's first forward is watched for orphan decisions
        self.capacity = int(capacity)
        self.keep_newest = bool(keep_newest)
        self.max_bytes = max_bytes
        self._budget = Budget(max_bytes)
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
        """The routers this session intercepts, in module order.

        ``top_k`` and ``num_experts`` are those of each router's established decision once it
        ran (discovery's hints before that; ``top_k`` is None where discovery had none).
        """
        return tuple(self._sites)

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
        extra = (", keep_newest=True" if self.keep_newest else "") + (
            f", max_bytes={self.max_bytes}" if self.max_bytes is not None else ""
        )
        return (
            f"Session(model={self._model_name}, routers={len(self._sites)}, capacity={self.capacity}{extra}, "
            f"held={self._held_text()}, state={self.state})"
        )

    def memory(self) -> dict[str, dict[str, int]]:
        """Capture memory held on each device: routers, rows (summed over them) and bytes.

        Example:
            >>> import moe_replay as mr
            >>> with mr.attach(mr.models.build("softmax_topk"), capacity=1024) as session:
            ...     session.memory()
            {'cpu': {'routers': 2, 'rows': 2048, 'bytes': 4096}}
        """
        out: dict[str, dict[str, int]] = {}
        for r in self._rings():
            d = out.setdefault(str(r.device), {"routers": 0, "rows": 0, "bytes": 0})
            d["routers"] += 1
            d["rows"] += r.rows_held
            d["bytes"] += r.nbytes
        return out

    def _held_text(self) -> str:
        if not self._hooks:
            return "nothing"
        parts = []
        for device in dict.fromkeys(str(r.device) for r in self._rings()):
            rings = [r for r in self._rings() if str(r.device) == device]
            lo, hi = min(r.rows_held for r in rings), max(r.rows_held for r in rings)
            rows = f"{lo}" if lo == hi else f"{lo}-{hi}"
            parts.append(f"{device}: {rows} rows x {len(rings)} routers, {_fmt_bytes(sum(r.nbytes for r in rings))}")
        return "; ".join(parts)

    def table(self) -> str:
        """The router table (name, class, E, k, how it is intercepted) and the capture memory held."""
        text = format_sites(self._sites)
        if not self._hooks:
            return text
        fixed = [r.name for r in self._rings() if r.fixed_by is not None]
        mode = (
            "fixed rings that wrap (keep_newest)"
            if self.keep_newest
            else f"grows in eager mode from {self.capacity} rows per router"
        )
        lines = [text, "", f"capture memory: {mode}"]
        lines += [
            f"  {dev}: {m['routers']} routers, {m['rows']} rows, {_fmt_bytes(m['bytes'])}"
            for dev, m in self.memory().items()
        ]
        if self.max_bytes is not None:
            lines.append(f"  limit: max_bytes={self.max_bytes}")
        if fixed:
            lines.append(f"  fixed at {self.capacity} rows by a CUDA graph or compiled region: {len(fixed)} routers")
        return "\n".join(lines)

    def _rings(self) -> list[CaptureRing]:
        return [h.capture_ring for h in self._hooks if h.capture_ring is not None]

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
                hook = RouterHook(
                    name=s.name,
                    num_experts=s.num_experts,
                    top_k=s.top_k,
                    decision=s.decision,
                    scope=scope,
                    call=s.call,
                    declared_top_k=self._declared_top_k,
                    on_established=self._established,
                )
                self._new_ring(hook, s)
                own = scope.__dict__.get("forward", _MISSING)
                scope.forward = hook.wrap(scope.forward)
                self._installed.append((scope, own))
                self._hooks.append(hook)
        except BaseException:
            self._uninstall()
            raise
        self._attached = True

    def _new_ring(self, hook: RouterHook, site: RouterSite) -> None:
        """A capture ring for ``hook`` once its k and E are known (from discovery, or its decision)."""
        if hook.top_k is None or hook.num_experts is None:
            hook.capture_ring = None
            return
        ring = hook.capture_ring
        if ring is not None and ring.top_k == hook.top_k and ring.buf.dtype == index_dtype(hook.num_experts):
            return
        if ring is not None:  # discovery's k or E was wrong: the decision says otherwise, nothing was written
            self._budget.held -= ring.nbytes
            self._budget.rings -= 1
        hook.capture_ring = CaptureRing(
            self.capacity,
            hook.top_k,
            hook.num_experts,
            _device_of(site.module or hook.scope),
            keep_newest=self.keep_newest,
            name=site.name,
            budget=self._budget,
        )

    def _established(self, hook: RouterHook) -> None:
        """A router's decision was established: its site and ring follow the evidence."""
        i = self._hooks.index(hook) if hook in self._hooks else len(self._hooks)
        site = self._sites[i]
        if (site.top_k, site.num_experts) != (hook.top_k, hook.num_experts):
            self._sites[i] = dataclasses.replace(site, top_k=hook.top_k, num_experts=hook.num_experts)
        self._new_ring(hook, site)

    def _watch(self) -> Callable[[], None] | None:
        """Watch the model's next forward for decisions outside every router (see :mod:`.orphans`)."""
        model = self._model_ref()
        if model is None or torch.compiler.is_compiling():
            return None
        return watch_forward(model, self._scopes(), self._widths(), self._excluded)

    def _scopes(self) -> list[str]:
        return [s.scope for s in self._sites]

    def _widths(self) -> set[int]:
        return {h.num_experts for h in self._hooks if h.num_experts}

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
    def capture(
        self, *, clear: bool = True, expected_tokens: int | None = None, max_bytes: int | None = None
    ) -> Iterator[Session]:
        """Record the experts every router chooses, for any number of forwards.

        In eager mode the rings grow as needed (see :meth:`reserve` for the CUDA-graph and
        ``torch.compile`` paths, where they cannot).

        Args:
            clear: start from empty rings (default); ``False`` appends to the last capture.
            expected_tokens: the tokens (rows per router) this block will record, allocated
                on entering: :meth:`reserve` for this capture. For a ``generate()`` call,
                :func:`~moe_replay.generation_capacity` computes it.
            max_bytes: the most bytes the capture rings of this session may hold during
                this block (default: ``attach``'s ``max_bytes``). A forward that would need
                more raises :class:`CaptureOverflowError` at once.

        Raises:
            CaptureOverflowError: ``expected_tokens`` do not fit a fixed ring, or
                ``max_bytes`` is below what the rings need. At a forward: a fixed ring
                (CUDA graph, ``torch.compile``) that would overflow where the host can
                see it, or growth past ``max_bytes``.

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
        for name, value in (("expected_tokens", expected_tokens), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        rings = self._rings()
        if expected_tokens is not None:
            self._check_fixed(rings, expected_tokens + (0 if clear else max(r.host_written for r in rings)))
        if clear:
            for r in rings:
                r.reset()
            self._interrupted = None
        limit = self._budget.limit
        try:
            if max_bytes is not None:
                self._budget.limit = max_bytes
            if self._budget.limit is not None and self._budget.held > self._budget.limit:
                for r in rings:
                    r.release()
                if self._budget.held > self._budget.limit:
                    raise CaptureOverflowError(
                        f"the capture rings already hold {_fmt_bytes(self._budget.held)}, more than "
                        f"max_bytes={self._budget.limit}: attach with a smaller capacity, or raise max_bytes"
                    )
            if expected_tokens is not None:
                for r in rings:
                    r.reserve(r.host_written + expected_tokens)
                self.capacity = max([self.capacity] + [r.capacity for r in rings])
        except BaseException:
            self._budget.limit = limit
            if clear:
                self._has_capture = False  # the rings were cleared: nothing to read
            raise
        for h in self._hooks:
            h.calls = h.decisions = 0
        self._has_capture = True
        stop = self._watch() if self._watch_pending else None
        self._watch_pending = False
        self._set(capturing=True)
        try:
            yield self
        except BaseException as exc:
            self._interrupted = f"{type(exc).__name__}({str(exc)[:200]!r})"
            if isinstance(exc, RuntimeError) and OVERFLOW_MARK in str(exc):
                raise self._device_overflow(exc) from exc
            raise
        finally:
            self._set(capturing=False)
            if stop is not None:
                stop()
            self._budget.limit = limit

    def reserve(self, rows: int) -> None:
        """Allocate every router's ring for ``rows`` rows now, before a capture needs them.

        Eager captures grow on their own; a CUDA graph or a compiled model writes into a
        ring of fixed size, baked in when the graph is captured or the model compiled. So
        size the rings first, for the whole capture (all forwards of one ``capture()``
        block), then capture the graph or compile. Call it between captures: rings smaller
        than ``rows`` are replaced by empty ones of ``rows`` rows, so read the last
        capture's routes first (``capture(expected_tokens=...)`` does the same on entering).

        Example:
            >>> import moe_replay as mr
            >>> session = mr.attach(mr.models.build("softmax_topk"), capacity=16)
            >>> session.reserve(mr.generation_capacity(batch_size=8, prompt_len=32, max_new_tokens=64))
            >>> session.capacity
            768
            >>> session.detach()

        Raises:
            CaptureOverflowError: a ring that a CUDA graph or compiled region already writes
                into holds fewer rows (it cannot be replaced), or ``max_bytes`` would be passed.
        """
        self._check_attached()
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        if self._capturing:
            raise SessionStateError(
                "reserve() runs between captures (it replaces rings); inside this block the rings grow on "
                "their own, or enter the capture with capture(expected_tokens=...)"
            )
        rings = self._rings()
        self._check_fixed(rings, rows)
        small = [r for r in rings if r.capacity < rows]
        for r in small:
            r.reset()
            r.reserve(rows)
        if small:  # the last capture's rows went with the old rings
            self._has_capture, self._interrupted = False, None
        self.capacity = max([self.capacity] + [r.capacity for r in rings])

    def _check_fixed(self, rings: Sequence[CaptureRing], rows: int) -> None:
        """Refuse, before anything changes, rows that a ring fixed in a graph cannot take."""
        small = [r for r in rings if r.fixed_by is not None and rows > r.capacity]
        if small:
            raise CaptureOverflowError(
                f"{len(small)} routers (first: '{small[0].name}') write into rings fixed at {small[0].capacity} "
                f"rows by {small[0].fixed_by}, which cannot be replaced by rings of {rows} rows. Reserve before "
                f"capturing the graph or compiling: session.reserve({rows}) right after attach, or "
                f"attach(..., capacity={rows})"
            )

    def _device_overflow(self, exc: BaseException) -> CaptureOverflowError:
        """The error for a fixed CPU ring's device check (raised inside compiled code)."""
        rings = [r for r in self._rings() if r.device.type == "cpu" and r.fixed_by is not None]
        counts = ", ".join(f"'{r.name}': {int(r.written)} of {r.capacity}" for r in rings[:4])
        return CaptureOverflowError(
            f"capture overflow at this forward: {str(exc).split(OVERFLOW_MARK, 1)[-1].strip()} (rows written so far "
            f"per router: {counts}{', ...' if len(rings) > 4 else ''}). A compiled region runs no Python per call, "
            "so its ring cannot grow: size it for the whole capture before compiling, with "
            "attach(..., capacity=rows) or session.reserve(rows); the rows recorded before this forward are "
            "readable with routes(allow_partial=True)"
        )

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
            CaptureOverflowError: rows went past a ring that a CUDA graph or a compiled
                region writes into (its fixed size); eager captures grow instead, and
                ``keep_newest`` rings keep the newest rows.
        """
        self._check_attached()
        if not self._has_capture:
            raise SessionStateError("nothing was captured yet: run forwards inside `with session.capture():`")
        rings = [h.capture_ring for h in self._hooks]
        counted = _read_counters([r.written for r in rings if r is not None])
        written = [counted.pop(0) if r is not None else 0 for r in rings]
        if self._interrupted is not None and not allow_partial:
            counts = ", ".join(f"'{h.name}': {w}" for h, w in list(zip(self._hooks, written, strict=True))[:4])
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}; a forward may have stopped half-way, "
                f"so the routers' rows may not line up (rows per router: {counts}"
                + (", ..." if len(written) > 4 else "")
                + "). Capture again, or call routes(allow_partial=True) to read the rows written before the exception"
            )
        allow_silent = allow_silent or allow_partial
        if not any(written) and not any(h.calls for h in self._hooks) and not allow_silent:
            raise UnsupportedRouterError(
                f"the capture recorded nothing: none of the {len(self._hooks)} routers of this session ran inside "
                "capture(). Was the model rebuilt or reloaded after attach (attach to the model you run), or did "
                "no forward run in the block?"
            )
        over = [
            (h, w)
            for h, w in zip(self._hooks, written, strict=True)
            if h.capture_ring is not None and h.capture_ring.overflowed(w)
        ]
        if over:
            worst = max(w for _, w in over)
            ring = over[0][0].capture_ring
            assert ring is not None
            detail = "; ".join(f"'{h.name}' wrote {w} rows" for h, w in over[:4])
            if len(over) > 4:
                detail += f" (+{len(over) - 4} more routers)"
            raise CaptureOverflowError(
                f"capture overflow: {detail}, but their rings are fixed at {ring.capacity} rows ({ring.fixed_by} "
                "writes into them, and a graph replay or compiled call runs no Python, so the overflow is seen "
                f"only now). capacity={worst} holds this run: attach with capacity={worst}, or call "
                f"session.reserve({worst}) right after attach, then capture the graph or compile (a fixed ring "
                "cannot be replaced in this session)"
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
            r.rows(w) if r is not None else torch.zeros(0, h.top_k or 1, dtype=torch.long)
            for h, r, w in zip(self._hooks, rings, written, strict=True)
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
            h.replay_source = ReplaySource(layers[j], s.num_experts, _device_of(s.module or h.scope))
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
    def verify(self, *args: Any, **kwargs: Any) -> VerifyReport:
        """Prove every router's decision on one forward ``model(*args, **kwargs)``, without gradients.

        Each router must run, and which of its calls decides is established by effect (the first
        forward under a session does this once per router; see :mod:`moe_replay.evidence`): a
        call whose choice is changed must change the output, calls whose choice does not reach the
        output (logging, a stable-softmax ``max``) are named and ignored. Nothing is recorded.

        Returns:
            A :class:`VerifyReport`: per router, how many times it ran (it is a ``dict`` of those
            counts), and ``report.evidence[name]``, which call decides and why. ``print`` it.

        Raises:
            UnsupportedRouterError: a router did not run, or no call of its forward decides.

        Example:
            >>> import torch, moe_replay as mr
            >>> model = mr.models.build("softmax_topk", num_layers=1)
            >>> with mr.attach(model) as session:
            ...     report = session.verify(torch.zeros(1, 4, dtype=torch.long))
            >>> report["layers.0.mlp.router"]
            1
        """
        self._check_attached()
        if self._capturing or self._replaying:
            raise SessionStateError("verify() runs on an idle session, outside capture() and replay()")
        model = self._model_ref()
        if model is None:
            raise SessionStateError("the model of this session no longer exists")
        for h in self._hooks:
            h.calls, h.decisions = 0, 0
            h.verifying = True
        watch = OrphanWatch(model, self._scopes(), self._widths(), self._excluded)
        try:
            with torch.no_grad(), watch:
                model(*args, **kwargs)
        finally:
            for h in self._hooks:
                h.verifying = False
        never = [h.name for h in self._hooks if h.calls == 0]
        if never:
            raise UnsupportedRouterError(
                f"routers {never} did not run in this forward: they are not on the forward path (a module "
                "built twice, or replaced after loading?); exclude them or name the right ones with include="
            )
        watch.check()
        evidence = {h.name: h.evidence[h.scope.training] for h in self._hooks if h.scope.training in h.evidence}
        return VerifyReport({h.name: h.calls for h in self._hooks}, evidence)


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
    max_bytes: int | None = None,
) -> Session:
    """Find the routers of ``model`` and install interception on them, once.

    Args:
        model: any ``nn.Module`` MoE.
        capacity: rows (tokens) per router allocated now. An eager capture grows past it
            (in segments, no host sync, no copy); under CUDA graphs and ``torch.compile``
            it is the fixed size of the ring (see :meth:`Session.reserve`).
        include, exclude, adapters, top_k, num_experts: see :func:`find_routers`.
        keep_newest: a fixed ring of ``capacity`` rows that wraps, keeping the newest rows
            and never raising: for monitoring, not for routes you train on.
        max_bytes: the most bytes the capture rings may hold, all routers together; a
            forward that would grow them past it raises :class:`CaptureOverflowError`.

    Returns:
        A :class:`Session`; also a context manager that detaches on exit.

    Raises:
        RouterNotFoundError: no router found.
        UnsupportedRouterError: a router whose decision cannot be intercepted.
        SessionStateError: the model already has a session.
        CaptureOverflowError: the first segments alone take more than ``max_bytes``.

    Example:
        >>> import moe_replay as mr
        >>> session = mr.attach(mr.models.build("top1_argmax"), capacity=4096)
        >>> session
        Session(model=MoETransformer, routers=2, capacity=4096, held=cpu: 4096 rows x 2 routers, 8.0 KiB, state=idle)
        >>> session.detach()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach takes an nn.Module, got {type(model).__name__}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive number of rows, got {capacity!r}")
    _torch_compat.check()  # a torch whose internals moved is refused here, before anything is installed
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    sites = find_routers(
        model, include=include, exclude=exclude, adapters=adapters, top_k=top_k, num_experts=num_experts
    )
    refused = [s for s in sites if s.unsupported]
    if refused:
        detail = "\n  ".join(f"'{s.name}' ({s.module_class}): {s.unsupported}" for s in refused[:4])
        raise UnsupportedRouterError(
            f"{len(refused)} router(s) cannot be replayed exactly:\n  {detail}\n"
            "Nothing was installed. "
            + (
                "Exclude them with exclude= to replay the others."
                if len(refused) < len(sites)
                else "No router of this model can be replayed exactly, so there is nothing to attach."
            )
        )
    with _ATTACH_LOCK:
        other = _ATTACHED.get(model)
        if other is not None and other.attached:
            raise SessionStateError(
                f"{type(model).__name__} already has an attached session ({other!r}); detach it first"
            )
        if max_bytes is not None:
            first = sum(capacity * (s.top_k or 1) * index_dtype(s.num_experts).itemsize for s in sites)
            if first > max_bytes:
                raise CaptureOverflowError(
                    f"the first capture segments of {len(sites)} routers take {_fmt_bytes(first)} "
                    f"({capacity} rows each), more than max_bytes={max_bytes}: attach with a smaller capacity "
                    "(eager captures grow as needed) or raise max_bytes. Nothing was installed"
                )
        session = Session(
            model,
            sites,
            capacity=capacity,
            keep_newest=keep_newest,
            max_bytes=max_bytes,
            declared_top_k=top_k is not None,
            excluded=_compile_matcher(exclude),
        )
        session._install()
        _ATTACHED[model] = session
    return session
