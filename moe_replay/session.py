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

import collections
import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import itertools
import operator
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from . import _lean, _torch_compat
from ._checks import _del_own, _set_own, check_flag, is_integer
from ._code_settings import assigned_on_others
from ._feeds import (
    FeedCheck,
    FeedForward,
    FeedRecord,
    MoveWatch,
    OrderCheck,
    OrderNote,
    RouterCallCheck,
    RouterFeedCheck,
    _CapturedCalls,
    feed_levels,
    one_stream,
    unmarked_places,
)
from ._interrupts import hold_interrupts, interrupts_held
from ._output_guard import is_guard
from ._progress import Progress
from ._token_choices import ChoiceLog, count_forwards, tap_choices
from .discovery import (
    Adapter,
    Matcher,
    RouterSite,
    _compile_matcher,
    _frozen_matcher,
    find_routers,
    format_sites,
    shared_scope,
)
from .errors import (
    ArgumentTypeError,
    CaptureOverflowError,
    InvalidArgumentError,
    MoEReplayError,
    ReplayConsumptionError,
    RouterNotFoundError,
    RoutesValidationError,
    SessionStateError,
    TokenMismatchError,
    UnsupportedRouterError,
    _from_compiler,
    _ReadOnlyError,
)
from .evidence import AXES, VerifyReport, give_back_iterators, left_as_it_was
from .intercept import CACHED_SUFFIX, EAGER, ClassForward, RouterHook, ScopedForward, _own_keys
from .losses import RouterScores
from .orphans import OrphanWatch, watch_call, watch_first_runs, watch_forward
from .ring import OVERFLOW_MARK, Budget, CaptureRing, ReplaySource, _fmt_bytes, calls_made_by, index_dtype
from .routes import (
    LOST_ID,
    PADDING_ID,
    SETTING_DIFFERS,
    UNTOLD_RANK,
    Routes,
    _known_or_none,
    _missing_rows,
    _out_of_order,
    fingerprint,
)

__all__ = ["DEFAULT_CAPACITY", "Session", "attach"]

#: Rows per router of a capture ring's first segment unless ``capacity=`` says otherwise: an
#: eager capture grows past it; under CUDA graphs, ``torch.compile`` and ``keep_newest`` it
#: is the fixed size of the ring.
DEFAULT_CAPACITY = 1 << 16

#: The attached session of each model, held weakly both ways: a session reaches its model (through the forwards it
#: installed), and a model dropped while attached must go with its session. The model keeps its session alive while
#: attached (each router's forward holds it).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Session]] = weakref.WeakKeyDictionary()


def _attached_sessions() -> list[Session]:
    """The sessions attached now (call under ``_ATTACH_LOCK``)."""
    return [s for ref in list(_ATTACHED.values()) if (s := ref()) is not None]


def _session_of(model: nn.Module) -> Session | None:
    """The session attached to ``model`` (the last one attached, whether or not detached since), or None."""
    ref = _ATTACHED.get(model)
    return None if ref is None else ref()


#: Models whose forward passed the watch for decisions outside every router: by router scopes and
#: training flag, the modules on the way to the routers that it passed with.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _Skeleton]] = weakref.WeakKeyDictionary()
_ATTACH_LOCK = threading.Lock()

#: The wrappers of detached sessions, emptied, by the module they were taken off and their class: the next session
#: attached to that module puts the same object back (made new). ``torch.compile`` guards a module's ``forward``
#: attribute on its identity, so a new session on a compiled model then runs the code compiled for the sessions
#: before it instead of compiling again (until torch's recompile limit). Keyed weakly; an emptied wrapper holds
#: nothing of its module, so the model is freed as without a session.
_SPARE: weakref.WeakKeyDictionary[nn.Module, dict[type, Any]] = weakref.WeakKeyDictionary()


class _Retired:
    """A wrapper of a detached session, emptied, kept to be put back (see :data:`_SPARE`). A reference kept from
    before detach that calls it is told so: a forward kept aside (``f = model.forward``), or a shallow copy of the
    module made while the session was attached (``copy.copy``), whose instance dict holds this very object. It holds
    the class name of the module it was taken off, for the error, and nothing of the module."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.__dict__.get("_owner", "the module")
        raise SessionStateError(
            f"this is a moe_replay forward of a session that has detached, taken off {owner} and called through a "
            "reference kept from before detach: a forward kept aside (f = model.forward), or a shallow copy of the "
            "model made while the session was attached (copy.copy shares the instance dict's forward, which was the "
            "session's). Call the module itself, which runs its own forward; make a copy after detach, or with "
            "copy.deepcopy (which gets the plain forward); or attach a session again"
        )


def _reused(module: nn.Module, cls: type, *args: Any) -> Any:
    """``cls(*args)``, made in the object of that class a detached session left on ``module`` if there is one."""
    spare = _SPARE.get(module)
    old = spare.pop(cls, None) if spare else None
    if old is None:
        return cls(*args)
    old.__dict__.clear()  # (what it held retired)
    old.__class__ = cls
    old.__init__(*args)
    return old


def _runs_nothing(module: nn.Module) -> bool:
    """Has ``module`` no forward to run (``nn.Module``'s placeholder, which raises: a holder of models)?"""
    forward = module.__dict__.get("forward", getattr(type(module), "forward", None))
    forward = getattr(forward, "__wrapped__", forward)  # (a feed level's wrapper: what it runs)
    return getattr(forward, "__func__", forward) is nn.Module.forward


def _interrupts_held() -> contextlib.AbstractContextManager[None]:
    """Hold a Ctrl-C (``SIGINT``) that arrives inside the block, and raise it once the block is over.

    Taking out a session's wrappers changes many modules' forwards and the session's
    lists of them one after the other: a ``KeyboardInterrupt`` raised half-way (a notebook's interrupt
    lands between any two bytecodes) would leave some routers wrapped and others not, a session that
    believes itself attached to forwards it no longer wraps, and a model that neither a second
    ``detach()`` nor a new ``attach()`` could put right. See :func:`~moe_replay._interrupts.interrupts_held`.
    """
    return interrupts_held()


def _gone(module: nn.Module, wrapper: Any) -> bool:
    """Did a detach take ``wrapper`` off ``module`` (not left there, nor for another session a feed level serves)?"""
    return module.__dict__.get("forward") is not wrapper and not (isinstance(wrapper, FeedForward) and wrapper.owners)


def _retire(module: nn.Module, wrapper: Any) -> None:
    """Keep ``wrapper``, taken off ``module`` by a detach, emptied, for the next attach (see :data:`_SPARE`)."""
    cls = type(wrapper)
    wrapper.__dict__.clear()
    wrapper.__class__ = _Retired
    wrapper.__dict__["_owner"] = type(module).__name__  # (a name only: the model is freed as without a session)
    _SPARE.setdefault(module, {})[cls] = wrapper


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its tensors' device, or for weights offloaded by accelerate (on ``meta``
    between forwards: ``cpu_offload``, ``dispatch_model``/``device_map`` with CPU or disk offload) the
    execution device of its hooks. A ring on ``meta`` would hold no rows."""
    device = next((t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu"))
    if device.type == "meta":
        for m in module.modules():
            hook = getattr(m, "_hf_hook", None)
            for h in (hook, *getattr(hook, "hooks", ())):
                run = getattr(h, "execution_device", None)
                if run is not None:
                    return run if isinstance(run, torch.device) else torch.device(run)
    return device


_READ_BY_DEVICE = operator.attrgetter("_by_device")  # (ReplaySource.read_by_device's own: no frame per router)
_HOST_CONSUMED = operator.attrgetter("host_consumed")
_HOOKS = _torch_compat.HOOK_HANDLES


def _in_backward() -> bool:
    return _torch_compat.current_graph_task_id() != -1


def _running_coroutine() -> Any:
    """The coroutine of the asyncio task running now in this thread, or None (no event loop runs here)."""
    aio = sys.modules.get("asyncio")
    if aio is None or aio._get_running_loop() is None:  # never imported, or no loop runs in this thread
        return None
    task = aio.current_task()
    return task.get_coro() if task is not None else None


def _suspended(coro: Any) -> bool:
    """Whether ``coro`` waits at an ``await`` (neither running, which a forward nested in it sees, nor finished)."""
    running = getattr(coro, "cr_running", None)
    return running is False and getattr(coro, "cr_frame", None) is not None


#: the block a context (an asyncio task and the tasks it starts) belongs to: the ``_Owner.mark`` of the block
#: open when it was entered or copied
_BLOCK_MARK: contextvars.ContextVar[object | None] = contextvars.ContextVar("moe_replay_block", default=None)


class _Owner:
    """The thread holding a session's open blocks (capture, replay, keep_scores, verify), and, where asyncio runs
    there, which of its tasks may run forwards in them."""

    __slots__ = (
        "abandoned",
        "blocks",
        "checker",
        "classes",
        "coro",
        "entered",
        "ident",
        "keys",
        "last",
        "lock",
        "mark",
        "mods",
        "places",
        "stamp",
        "way",
    )

    def __init__(self) -> None:
        self.ident: int | None = None
        self.blocks = 0
        #: the blocks (``"replay()"``...) dropped since the last forward without being entered (False), or entered
        #: and never left (True)
        self.abandoned: list[tuple[str, bool]] = []
        #: the blocks entered and not left yet, innermost last (weakly: dropping one ends it, see :class:`_Block`)
        self.entered: list[weakref.ref[_Block]] = []
        self.lock = threading.Lock()
        self.coro: Any = None  # the coroutine of the asyncio task that opened the outermost block, or None
        self.last: Any = None  # the coroutine of the task that ran the block's last forward (at first: ``coro``)
        self.mark: object | None = None  # the outermost block's mark, in the context that opened it
        #: the session's :meth:`Session._recheck`, held weakly (the session holds its owner): see :meth:`recheck`
        self.checker: weakref.WeakMethod[Callable[..., Any]] | None = None
        #: the modules on the way to the routers and their ``__dict__``, the ``__dict__`` of their classes up to
        #: ``nn.Module``, and the places of the code they hold (``places[i][keys[i]]``: a callable set on one of them,
        #: a module-level helper a forward names); and the stamp they had as the model's forward last passed the
        #: watch in the open block (hooks torch has made; those dicts' lengths and the modules' classes; a copy of
        #: each class's dict; the code at each place), None outside, or before it passed. Compared at each forward
        #: where it is read (:meth:`moved`), with no Python frame, as one list
        self.mods: list[nn.Module] = []
        self.way: list[dict[str, Any]] = []
        self.classes: list[types.MappingProxyType[str, Any]] = []
        self.places: list[Any] = []
        self.keys: list[str] = []
        self.stamp: list[Any] | None = None

    def moved(self) -> bool:
        """Whether the stamp moved since the open block's forward passed the watch (a hook made anywhere; an
        attribute of a module on the way to the routers set or deleted, or a callable there replaced; a module's
        class swapped; an attribute of one of their classes set or deleted; a helper their code names replaced);
        callers inline it on their hot path."""
        stamp = self.stamp
        if stamp is None:
            return False
        try:  # (a class's dict is compared with its copy, entry by entry: each the same object, or equal)
            return [
                _HOOKS.next_id,
                *map(len, self.way),
                *map(type, self.mods),
                *self.classes,
                *map(operator.getitem, self.places, self.keys),
            ] != stamp
        except Exception:  # (a value gone from its place, or one whose == raises: it changed)
            return True

    def recheck(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Callable[[], Any]], Any] | None:
        """At a forward of the model while a block is open, where the stamp moved (:meth:`moved`): None, or a
        function that runs the forward (given as a function of no arguments) watched for decisions outside the
        routers, where a hook or a method changed on the way to them since the block's first forward passed the
        watch (see ``Session._recheck``)."""
        check = self.checker() if self.checker is not None else None
        return None if check is None else check(args, kwargs)

    def refuse_abandoned(self) -> None:
        """Refuse, once, the forward after a block was made and dropped without being entered, or entered and dropped
        without being left (see :class:`_Block`)."""
        dropped, self.abandoned = self.abandoned, []
        left_open = [what for what, was_open in dropped if was_open]
        if left_open:
            what = left_open[0]
            raise SessionStateError(
                f"a session.{what} block was entered and then dropped without being left"
                + (f" (and {len(dropped) - 1} more block(s))" if len(dropped) > 1 else "")
                + ": nothing held its context manager after __enter__() (session."
                f"{what[:-1]}...).__enter__() on a value no name keeps), so it was garbage collected, which ended the "
                "block, and this forward would have run natively, neither forced nor recorded. Write "
                f"`with session.{what[:-1]}...):` around the forwards (or keep the block and call its __exit__ "
                "when done; contextlib.ExitStack keeps it). This forward did not run; the next one runs"
            )
        made = [what for what, _ in dropped]
        what = made[0]
        raise SessionStateError(
            f"session.{what} was called but its block was never entered"
            + (f" (and {len(made) - 1} more block(s): {', '.join(made[1:4])})" if len(made) > 1 else "")
            + f": {what} returns a context manager, and nothing is forced, recorded or kept until a `with` "
            f"statement enters it, so this forward would have run natively, neither forced nor recorded. Write "
            f"`with session.{what[:-1]}...):` around the forwards. This forward did not run; the next one runs"
        )

    def open(self) -> None:
        """The outermost block opens: mark the context that opens it (tasks started in it inherit the mark)."""
        self.coro = self.last = _running_coroutine()
        self.mark = object()
        _BLOCK_MARK.set(self.mark)

    def close(self) -> None:
        """The outermost block ends."""
        self.ident = self.coro = self.last = self.mark = None

    def admit_forward(self, what: str | nn.Module) -> None:
        """Refuse a forward (or a block) in the owner's thread whose rows would interleave with the block's.

        Where asyncio tasks run the forwards: one from a task that is not the block's (started before it: a
        sibling) while the task that opened the block waits at an ``await``; or one from a task other than the
        last to run a forward in the block while that one waits at an ``await`` and is not the block's opener
        (two tasks the block started, forwarding in turn). A task the opener awaits, or one that ran its forwards
        and ended, is a sequence, not an interleaving. ``what`` names the block or forward (or is the module
        whose forward it is: named only where it is refused).
        """
        if self.ident != threading.get_ident():
            return  # (another thread's forward: its routers refuse it)
        aio = sys.modules.get("asyncio")  # (_running_coroutine's first test, inline: this runs at every forward)
        if aio is None or aio._get_running_loop() is None:
            return  # (no event loop runs in this thread: no task)
        coro = _running_coroutine()
        last = self.last
        if coro is None or coro is last or _in_backward():
            return
        if not isinstance(what, str):  # a forward of this module
            what = f"a forward of {type(what).__name__}"
        if _BLOCK_MARK.get() is not self.mark:
            if self.coro is not None and _suspended(self.coro):
                raise SessionStateError(
                    f"{what} from an asyncio task running {_named(coro)}, while the task that opened a block "
                    f"(capture, replay, keep_scores or verify) of this session, running {_named(self.coro)}, waits "
                    f"at an await: {_INTERLEAVE}"
                )
        elif last is not None and last is not self.coro and _suspended(last):
            raise SessionStateError(
                f"{what} from an asyncio task running {_named(coro)}, while another task started inside a block "
                f"(capture, replay, keep_scores or verify) of this session, running {_named(last)}, ran forwards "
                f"and waits at an await before its next: {_INTERLEAVE}"
            )
        self.last = coro


_GRAPH_BREAK = (
    "a moe_replay session's replay(), capture() or other block runs eagerly, at a graph break, and "
    "torch.compile(fullgraph=True) allows none: open the block outside the compiled function (with "
    "session.replay(routes): compiled_step(batch)), or compile without fullgraph=True"
)


def _eager_block(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` never traced by torch.compile (it runs eagerly at a graph break), with the reason a compile with
    ``fullgraph=True`` names where it meets it: open the block outside the compiled function."""
    try:
        return torch.compiler.disable(fn, recursive=True, reason=_GRAPH_BREAK)
    except TypeError:  # (a torch whose disable takes no reason)
        return torch.compiler.disable(fn, recursive=True)


class _Block:
    """What :meth:`Session.capture`, :meth:`Session.replay` and :meth:`Session.keep_scores` return: their context
    manager, entered once (or a decorator whose every call enters a block of its own, as
    :func:`contextlib.contextmanager`'s is).

    Called without ``with`` (``session.replay(routes)`` as a statement), the block would never open and the
    forwards after it would run natively while the caller believes them forced or recorded. A block dropped
    without being entered is noted on the session, and the model's next forward is refused (once) saying so. So is
    a block entered and dropped without being left (``session.replay(routes).__enter__()``, whose context manager
    is then garbage collected): dropping it ends the block, and the forwards the caller believes inside it would
    run natively. A block kept and not entered (held by a name, or by a notebook's output history) is not seen.
    """

    __slots__ = ("__weakref__", "_cm", "_entered", "_make", "_open", "_owner", "_what")

    def __init__(self, owner: _Owner, what: str, make: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self._make = make  # (the block's own context manager, made as it is entered)
        self._cm: contextlib.AbstractContextManager[Any] | None = None
        self._owner = owner
        self._what = what
        self._entered = False
        self._open = False  # entered and not left yet

    @_eager_block
    def __enter__(self) -> Any:
        if self._entered:
            raise SessionStateError(
                f"this {self._what} block was entered already: a block's context manager is entered once. Call "
                f"session.{self._what[:-1]}...) again for each `with`"
            )
        self._entered = True
        # Ctrl-C held from making the block's context manager until the block knows itself open: `with` calls no
        # __exit__ when __enter__ raises, so an interrupt landing after the context manager was entered would leave
        # the block open (the session capturing or replaying) for as long as anything, a traceback say, kept it
        release = hold_interrupts()
        try:
            self._cm = self._make()
            value = self._cm.__enter__()
            self._open = True
            self._owner.entered.append(weakref.ref(self))
        except BaseException:
            release()
            raise
        try:
            release()  # (a Ctrl-C held since is raised here, and leaves the block at once)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return value

    @_eager_block
    def __exit__(self, *exc: Any) -> bool | None:
        if self._cm is None or not self._open:
            return None  # (never entered, or left already: nothing to leave)
        self._open = False
        self._owner.entered[:] = [b for b in self._owner.entered if b() not in (self, None)]
        return self._cm.__exit__(*exc)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Used as a decorator: each call of ``fn`` runs inside a block of its own.

        Raises:
            SessionStateError: ``fn`` is an ``async def`` or a generator function (or a call of it returns a
                coroutine or a generator): the call returns before any of its body runs, so the block would
                end first and the forwards in it would run natively.
        """
        self._entered = True  # (used: not a block dropped unentered)
        owner, what, make = self._owner, self._what, self._make
        if not callable(fn):
            raise ArgumentTypeError(f"session.{what[:-1]}...) decorates a function, got {type(fn).__name__}")
        lazy = _lazy_kind(fn)
        if lazy is not None:
            raise _lazy_body(what, lazy, getattr(fn, "__qualname__", repr(fn)))

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _Block(owner, what, make):
                result = fn(*args, **kwargs)
                if isinstance(result, types.CoroutineType | types.GeneratorType | types.AsyncGeneratorType):
                    # (its body never ran: nothing forced or recorded, and no warning of a lost await; an async
                    # generator never started has nothing to close)
                    if not isinstance(result, types.AsyncGeneratorType):
                        result.close()
                    kind = "async generator" if isinstance(result, types.AsyncGeneratorType) else type(result).__name__
                    raise _lazy_body(what, kind, getattr(fn, "__qualname__", repr(fn)))
                return result

        return run

    def __del__(self) -> None:
        if not hasattr(self, "_open"):  # (made without its __init__: never handed out, nothing to note)
            return
        if not self._entered or self._open:  # (dropped open: its context manager goes with it and ends the block)
            try:
                self._owner.abandoned.append((self._what, self._open))
            except Exception:  # (interpreter shutdown: nothing will run a forward)
                pass

    def __repr__(self) -> str:
        return f"<session.{self._what} block{' (entered)' if self._entered else ': enter it with `with`'}>"


def _lazy_kind(fn: Callable[..., Any]) -> str | None:
    """What calling ``fn`` returns before its body runs (``"coroutine"``, ``"generator"``...), or None."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if inspect.iscoroutinefunction(target):
        return "coroutine"
    if inspect.isasyncgenfunction(target):
        return "async generator"
    if inspect.isgeneratorfunction(target):
        return "generator"
    return None


def _lazy_body(what: str, kind: str, name: str) -> SessionStateError:
    call = f"session.{what[:-1]}...)"
    article = "an" if kind[0] in "aeiou" else "a"
    return SessionStateError(
        f"@{call} decorates {name}, whose call returns {article} {kind} before any of its body runs: the block would "
        f"end as the call returns, and the forwards in its body would run natively, neither forced nor recorded. Write "
        f"`with {call}:` inside its body, around the forwards"
    )


def _without_self(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` of a method without its ``self`` and its annotations, as its callers write it."""
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in list(signature.parameters.values())[1:]]
    return signature.replace(parameters=parameters, return_annotation=empty)


def _block_method(what: str) -> Callable[[Callable[..., Iterator[Any]]], Callable[..., Any]]:
    """A session method made of a generator, as :func:`contextlib.contextmanager` makes it, returning a
    :class:`_Block` (named ``what``) that makes its context manager as it is entered."""

    def make(fn: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        cm = contextlib.contextmanager(fn)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def method(self: Session, *args: Any, **kwargs: Any) -> _Block:
            try:  # (here, not as the block is entered: the `with` line would name no argument of the call)
                signature.bind(self, *args, **kwargs)
            except TypeError as err:
                bare = len(args) == 1 and callable(args[0]) and not kwargs and what != "replay()"
                raise ArgumentTypeError(
                    f"session.{what[:-1]}...) was called with arguments it does not take: {err}. It takes "
                    f"session.{what[:-2]}{_without_self(signature)} (options after `*` by name)"
                    + (f"; as a decorator it is called first: @session.{what}" if bare else "")
                ) from None
            return _Block(self._owner, what, functools.partial(cm, self, *args, **kwargs))

        # (host-side bookkeeping, never traced: a block opened inside a compiled training step runs it eagerly at a
        # graph break, as a block opened around the compiled call does)
        return _eager_block(method)

    return make


_INTERLEAVE = (
    "the forwards of the two would interleave in the block in no defined order (a capture would record their rows "
    "mixed, a replay would give one task's rows to the other's tokens). Run the forwards of a block one task after "
    "another (await each task before the next forwards), give concurrent tasks their own model and session "
    "(copy.deepcopy(model), then mr.attach), or hold one asyncio.Lock around each block and each other forward of "
    "the model"
)


def _named(coro: Any) -> str:
    return f"{getattr(coro, '__name__', type(coro).__name__)}()"


_ONE_THREAD = (
    "One session records the forwards of one thread, in order, or the rows of concurrent forwards would interleave "
    "differently in each router. Give each thread its own model and session (copy.deepcopy(model), then "
    "mr.attach), or run the forwards in the thread that opened the block"
)
_THREAD_REFUSAL: Any = None
#: held while :func:`_thread_refusal` defines its operator: two threads opening their first blocks at once define it
#: once (a second definition would destroy the first's library under the other thread)
_THREAD_REFUSAL_DEFINING = threading.Lock()


def _thread_refusal() -> Any:
    """The operator that compiled code traced in another thread than a block's runs ahead of a router's forward:
    ``(tensor, router name, the block's thread) -> tensor``, which raises the :class:`SessionStateError` of an eager
    forward in that thread. Defined as the first block opens (the code that defines it cannot be traced), once."""
    if _THREAD_REFUSAL is None:
        with _THREAD_REFUSAL_DEFINING:
            _define_thread_refusal()
    return _THREAD_REFUSAL


def _define_thread_refusal() -> None:
    """:func:`_thread_refusal`'s operator defined, unless another thread defined it first."""
    global _THREAD_REFUSAL
    if _THREAD_REFUSAL is None:

        @torch.library.custom_op("moe_replay::refuse_other_thread", mutates_args=())
        def refuse(t: torch.Tensor, router: str, holder: int) -> torch.Tensor:
            raise _other_thread(f"a forward reached router '{router}'", holder)

        @refuse.register_fake
        def _(t: torch.Tensor, router: str, holder: int) -> torch.Tensor:
            return torch.empty_like(t)

        refuse.register_autograd(lambda ctx, grad: (grad, None, None))
        _THREAD_REFUSAL = torch.ops.moe_replay.refuse_other_thread


def _other_thread(what: str, holder: int) -> SessionStateError:
    if not any(t.ident == holder for t in threading.enumerate()):
        return SessionStateError(
            f"{what} in thread {threading.get_ident()}, while thread {holder}, which has ended, left a block "
            "(capture, replay, keep_scores or verify) open on this session: it entered the block's context manager "
            "(__enter__) and never left it, so the session still counts the block as running. Leave that block: "
            "call __exit__(None, None, None) on the context manager it entered (or drop every reference to it: "
            "the model's next forward is then refused once, saying so), then use the session again; open blocks "
            "with `with` so that they end with the code inside them"
        )
    return SessionStateError(
        f"{what} in thread {threading.get_ident()}, while thread {holder} has a block (capture, replay, "
        f"keep_scores or verify) open on this session. {_ONE_THREAD}"
    )


@dataclass(eq=False)
class _SessionHook(RouterHook):
    """A router hook that knows its session's block holder and the device the model is on.

    A forward from another thread while a block is open is refused before the router does
    anything (eager mode; a recompute in backward may run in autograd's own thread). A
    device error from a model moved inside a block is reported as such.
    """

    def _run(
        self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], lean_ok: bool = True
    ) -> Any:
        if torch.compiler.is_compiling():
            return super()._run(forward, args, kwargs, lean_ok)
        self._admit()
        try:
            return super()._run(forward, args, kwargs, lean_ok)
        except RuntimeError as e:
            self._failed(e)
            raise

    def _admit(self) -> None:
        owner = self.owner
        if owner is not None and owner.ident not in (None, threading.get_ident()) and not _in_backward():
            raise _other_thread(f"a forward reached router '{self.name}'", owner.ident)

    def _refuse_thread_traced(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Dynamo traces a forward of this router in a thread other than the one holding the block: the region
        traced raises, as it runs, what an eager forward raises (an operator dynamo cannot look into, on one
        tensor the forward takes, ahead of it). Its rows are neither recorded nor forced: the router's forward is
        traced as it runs natively, and never runs (the region is guarded on this thread, see ``_ThisThread``)."""
        holder, op = self.owner.ident, _thread_refusal()
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                return forward(*args[:i], op(a, self.name, holder), *args[i + 1 :], **kwargs)
        for key, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                return forward(*args, **{**kwargs, key: op(a, self.name, holder)})
        raise SessionStateError(  # (no tensor to hang the refusal on: refused as it is traced)
            f"a forward reached router '{self.name}' in a thread other than thread {holder}, which has a block "
            f"(capture, replay, keep_scores or verify) open on this session. {_ONE_THREAD}"
        )

    def _failed(self, error: RuntimeError) -> None:
        moved = None if isinstance(error, MoEReplayError) else self._moved()
        if moved is not None:
            raise SessionStateError(moved) from error
        if type(error).__module__.startswith("torch._dynamo") and self.mode() not in self._lean:
            # a compiled model whose router ran its first forward under the session outside the graph (at a
            # graph break): dynamo then compiles the router's own frame under the interception, and may fail
            raise UnsupportedRouterError(
                f"router '{self.name}' ran its first forward under this session inside a torch.compile'd model, "
                f"outside the compiled graph (at a graph break), and torch.compile failed on it under the "
                f"interception ({type(error).__name__}). {self.establish_hint()} before the first compiled call"
            ) from error

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
    """A detached session's copy of one capture ring's rows, on the host (the ring's reading interface)."""

    def __init__(self, ring: CaptureRing, written: int) -> None:
        self.capacity, self.fixed_by, self.num_experts = ring.capacity, ring.fixed_by, ring.num_experts
        self.written = torch.tensor(written)
        self._over = ring.overflowed(written)
        self._rows = None if self._over else ring.rows(written)
        self._calls = ring.call_rows(written)

    def call_rows(self, written: int) -> tuple[tuple[int, int], ...] | None:
        """The ring's rows per call when it was copied (see :meth:`CaptureRing.call_rows`)."""
        return self._calls

    def overflowed(self, written: int) -> bool:
        return self._over

    def rows(self, written: int | None = None, keep_newest: bool | None = None) -> torch.Tensor:
        assert self._rows is not None, "overflow must be handled by the caller"
        return self._rows


def _router_call_check(
    routes: Routes,
    sources: Sequence[ReplaySource | None],
    layers: Sequence[int],
    generated: bool,
    checked: Callable[[int], bool],
) -> RouterCallCheck | None:
    """The check of each router's calls forward by forward (:class:`~moe_replay._feeds.RouterCallCheck`) for the
    replay sources ``sources`` of the routes' routers ``layers``, those whose router ``checked`` accepts and whose
    calls the routes know (``Routes._router_calls``); None where there are none."""
    own = routes._router_calls
    mine: dict[int, _CapturedCalls] = {}
    for src, j in zip(sources, layers, strict=True):
        made = None if own is None or not checked(j) else own[j]
        captured = None if src is None or made is None else _CapturedCalls.of(*made)
        if src is not None and captured is not None:
            captured.own = True
            mine[id(src)] = captured
    return RouterCallCheck(mine, _GENERATE_HINT if generated else "") if mine else None


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
        #: the modules of each model watched that ``excluded`` matches (see ``_left_out``)
        self._left_out_of: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
        #: routers chosen by include= or exclude=: the session's routers may be a part of the model's, so its
        #: routes do not name every router of the model they were recorded on (see ``Routes._recorded_names``)
        self._filtered = False
        #: where ``_filtered``: every router of the model, as the search without include= and exclude= finds them
        #: (the session's own in place of those they hold or sit in), which its routes record as the routers they
        #: were recorded on; None where that search does not find every router of the session (see
        #: :func:`_model_routers`): its routes then know no such routers, as routes built from rows
        self._model_routers: tuple[str, ...] | None = None
        self._watching = False  # a block of this session watches the model's next forward (see _watch)
        self._capacity = int(capacity)
        self._keep_newest = bool(keep_newest)
        self._max_bytes = max_bytes
        self._budget = Budget(max_bytes)
        self._hooks: list[RouterHook] = []
        self._installed: list[tuple[nn.Module, Any]] = []
        #: the modules between the model and its routers, and the forwards this session gave them (at attach)
        self._feed_installed: list[tuple[nn.Module, Any]] = []
        self._feed_wrappers: list[FeedForward] = []
        self._reached: dict[int, Any] = {}  # a scope's forward, other than the wrapper, found to lead to it
        self._paths: dict[int, str] = {}  # where a scope wrapped after attach now sits (its path, wrappers inserted)
        self._capturing = False
        self._replaying = False
        #: the rankings of the modules that choose which tokens reach their routers (see :mod:`._token_choices`)
        self._choices = ChoiceLog()
        self._choices.place = self._row_places
        self._tapped: set[str] = set()  # the paths of those tapped in the open block
        self._counting = False  # whether the model's forwards are counted in the open block (see _count_forwards)
        self._attached = False
        self._has_capture = False
        self._interrupted: str | None = None  # the exception that ended the last capture, if one did
        self._owner = _Owner()
        self._owner.checker = weakref.WeakMethod(self._recheck)
        #: the modules' ``__dict__`` on the way to the routers, and the stamp (hooks made, their lengths) they had
        #: as the model's forward last passed the watch in the open block; None outside, or before it passed
        self._rewatching = False  # a forward runs under the watch of _recheck
        self._wrappers: list[ScopedForward] = []
        self._kept_rows: list[_HostRows | None] | None = None  # the capture rows, copied at detach
        self._kept_ran: list[bool] = []  # per router: it ran in the last capture (kept with its rows)
        #: per router name: the settings a remap of its ids after its decision read as the capture ran (see
        #: RouterHook.ids_settings and Routes._ids_settings), for routes() to carry
        self._ids_settings: dict[str, tuple[tuple[str, str], ...]] = {}
        self._renamed: dict[str, str] | None = None  # the prefix map of the last replay, if it needed one
        self._feeds: FeedRecord | None = None  # what the model's forwards were fed during the last capture
        #: the KV caches the forwards of the last replay block built, with the capture its rows were cut from (a
        #: decode loop replayed over two blocks goes on from them: see FeedCheck._continued), and those earlier
        #: blocks in a row of the same capture built that it did not have
        self._replay_built: tuple[Any, Any, Any] | None = None

    # ------------------------------------------------------------- properties
    def __setattr__(self, name: str, value: Any) -> None:
        """A session's settings are given where it is made or per block: an attribute set on it is refused, naming
        the call that does what was meant, where it would otherwise change nothing the session does
        (``session.max_bytes = n`` set no limit, though ``repr`` showed it) or be kept without a word (a misspelt
        name, ``session.strict = False``). A method may be wrapped on the instance (a spy or a mock of it)."""
        if not _set_own(self, name, value):
            raise _ReadOnlyError(f"{name!r} cannot be set on a Session: {_session_instead(name)}")

    def __delattr__(self, name: str) -> None:
        """An attribute deleted from a session is refused as one set on it is (a method wrapped on the instance may be
        taken off again)."""
        if not _del_own(self, name):
            raise _ReadOnlyError(f"{name!r} cannot be deleted from a Session: {_session_instead(name)}")

    @property
    def capacity(self) -> int:
        """Rows per router the capture rings hold now (``attach``'s ``capacity``, or more after
        :meth:`reserve` or a capture that grew them)."""
        return self._capacity

    @property
    def keep_newest(self) -> bool:
        """Whether the capture rings are fixed rings that wrap, keeping the newest rows (``attach``'s
        ``keep_newest``)."""
        return self._keep_newest

    @property
    def max_bytes(self) -> int | None:
        """The most bytes the capture rings may hold, all routers together (``attach``'s ``max_bytes``; None: no
        limit). A ``capture(max_bytes=...)`` block sets its own."""
        return self._max_bytes

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

    @property
    def renamed(self) -> dict[str, str] | None:
        """The prefix map that fitted the last replayed routes' router names to this model, if one did.

        Routes recorded on the bare model and replayed on it wrapped (DDP's ``module.``,
        ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.``, an attribute of a
        user's wrapper), or the reverse, match their routers one to one by a common suffix:
        e.g. ``{"": "module."}``. Wrappers of each layer (FSDP1's ``_fsdp_wrapped_module.``,
        ``checkpoint_wrapper``'s ``_checkpoint_wrapped_module.``) put names inside the paths:
        routes that differ only by those match one to one, each name mapped whole. ``None``
        when the names matched as they were.

        A prefix change is fitted only where it moves a whole model: routes from a capture keep
        every router they were recorded on, and a prefix with routers beside it there (the
        ``encoder.`` of an encoder-decoder, replayed on a session of the decoder) is one part of
        that model, not a wrapper's, so the replay is refused (so is one that fits routes onto
        one part of this model whose routers are not those recorded): fit them explicitly with
        :meth:`Routes.rename`.
        """
        return dict(self._renamed) if self._renamed is not None else None

    def __repr__(self) -> str:
        extra = (", keep_newest=True" if self.keep_newest else "") + (
            f", max_bytes={self.max_bytes}" if self.max_bytes is not None else ""
        )
        if self._renamed is not None:
            extra += ", routes renamed " + ", ".join(f"{a!r}->{b!r}" for a, b in self._renamed.items())
        if self._interrupted is not None:  # (routes() refuses it unless allow_partial=True)
            extra += f", last capture interrupted by {self._interrupted}"
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
        """The router table (name, class, E, k, how it is intercepted) and the capture memory held.

        Then, for eager forwards, how many routers run **lean** (plain calls, no per-call
        overhead), how many run under the ``TorchFunctionMode`` (exact, but slower in a
        host-bound decode step; the line of code that keeps each one there follows), and how
        many are not audited yet (that happens at their next capture or replay forward). See
        "Lean forwards" in docs/concepts.md.
        """
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
        how = {h.name: h.interception() for h in self._hooks}
        counts = {k: sum(v.startswith(k) for v in how.values()) for k in ("lean", "mode", "not")}
        lines += [
            "",
            f"eager forwards: {counts['lean']} routers lean, {counts['mode']} under the TorchFunctionMode"
            + (f", {counts['not']} not audited yet (at their next capture or replay forward)" if counts["not"] else ""),
        ]
        slow = [(n, v) for n, v in how.items() if v.startswith("mode")]
        lines += [f"  {n}: {v[len('mode: ') :]}" for n, v in slow[:4]]
        if len(slow) > 4:
            lines.append(f"  ... {len(slow) - 4} more")
        return "\n".join(lines)

    def _rings(self) -> list[CaptureRing]:
        return [h.capture_ring for h in self._hooks if h.capture_ring is not None]

    # ------------------------------------------------------------- install
    def _install(self) -> None:
        scopes: dict[int, RouterSite] = {}
        for s in self._sites:
            assert s.scope_module is not None
            if id(s.scope_module) in scopes:
                raise UnsupportedRouterError(shared_scope(scopes[id(s.scope_module)], s))
            scopes[id(s.scope_module)] = s
            held = getattr(s.scope_module.forward, "__moe_replay_hook__", None)
            if held is not None:
                other = next((o for o in _attached_sessions() if o._attached and held in o._hooks), None)
                raise _held_by(
                    f"'{s.scope}' is already intercepted by another session"
                    + ("" if other is None else f" ({other!r})"),
                    other,
                )
        try:
            # buffers are ordinary tensors even when attach runs under torch.inference_mode()
            with torch.inference_mode(False):
                for s in self._sites:
                    scope = s.scope_module
                    assert scope is not None
                    hook = _SessionHook(
                        name=s.name,
                        num_experts=s.num_experts,
                        top_k=s.top_k,
                        decision=s.decision,
                        scope=scope,
                        call=s.call,
                        declared_top_k=self._declared_top_k,
                        on_established=self._established,
                        owner=self._owner,
                    )
                    self._new_ring(hook, s)
                    own = scope.__dict__.get("forward", _MISSING)
                    if isinstance(own, ClassForward) and own.module is scope:  # (a copy of an attached model's)
                        own = _MISSING
                    wrapper = _reused(scope, ScopedForward, hook, scope.forward)
                    scope.forward = wrapper
                    self._installed.append((scope, own))
                    self._wrappers.append(wrapper)
                    self._hooks.append(hook)
            model = self._model_ref()
            if model is not None:
                self._install_feed_levels(model)
        except BaseException:
            for action in self._removal_plan():
                action()
            self._installed.clear()
            self._wrappers.clear()
            self._feed_installed.clear()
            self._feed_wrappers.clear()
            self._hooks.clear()
            raise
        self._attached = True

    def _new_ring(self, hook: RouterHook, site: RouterSite) -> None:
        """A capture ring for ``hook`` once its k and E are known (from discovery, or its decision)."""
        if hook.top_k is None or hook.num_experts is None:
            hook.capture_ring = None
            return
        ring = hook.capture_ring
        if ring is not None and (ring.top_k, ring.num_experts) == (hook.top_k, hook.num_experts):
            return
        if ring is not None and ring.host_written and not self._capturing:
            return  # the decision changed since the last capture: its rows stay readable until the next one
        if ring is not None:  # discovery's k or E was wrong, or the model changed: no row of this capture is held
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
            experts = hook.num_experts if hook.num_experts is not None else site.num_experts  # (known once established)
            self._sites[i] = dataclasses.replace(site, top_k=hook.top_k, num_experts=experts)
        self._new_ring(hook, site)

    def _watch(self) -> Callable[[], None] | None:
        """Watch the model's next forward for decisions outside every router (see :mod:`.orphans`).

        At the start of every capture and replay block, until one forward passes the watch, and again
        once a module on the way to the routers was added or replaced (a new MoE layer, a dense MLP
        swapped for an MoE block): a router that discovery never saw would run natively, neither
        recorded nor forced. A part of the model run by itself (``model.model(x)``) is watched the
        same way, by its path, until the whole model's forward passes. Once per model, set of routers,
        mode and module skeleton: a later session on the same routers (a trainer or a benchmark
        attaching again) does not pay for it again.
        """
        model = self._model_ref()
        if model is None or self._watching or torch.compiler.is_compiling():
            return None
        scopes = self._scopes()
        stops: list[Callable[[], None]] = [self._unstamp]
        passed_as_is = self._passed(model, scopes, "", self._left_out(model))
        if passed_as_is is not None:
            if passed_as_is.not_run and not passed_as_is.choosers:  # (a chooser a first run finds: its forward's)
                stops.append(self._count_forwards(model))
            if passed_as_is.choosers:  # (first: the stamp counts the hooks made)
                stops.append(self._tap_choosers(model, passed_as_is.choosers))
            self._stamp(model, scopes)
            if passed_as_is.not_run:
                stops.append(self._watch_first_runs(model, passed_as_is, stops))
        else:
            ref = weakref.ref(model)

            def on_pass(path: str, not_run: list[str], watch: OrphanWatch) -> None:
                watched = ref()
                if watched is not None:
                    skeleton = self._mark_watched(watched, path, not_run, watch.choosers)
                    # (the choices of the watched forward, made before its choosers were known: those of a module
                    # tapped already were noted as it made them)
                    placed = zip(watch.chosen(), watch.chosen_places(), strict=True)
                    chosen = [(c, i, a) for (c, i), a in placed if c not in self._tapped]
                    # (the model's forwards are counted from here on where a module may choose its routers' tokens:
                    # one that chose, or a first run still to watch; this one, over now, counted first)
                    if not path and (chosen or not_run) and not self._counting:
                        self._choices.begin()
                        if not_run:
                            stops.append(self._count_forwards(watched))
                    elif path and chosen and not self._counting:  # (a part's forward: which of the model's is not told)
                        self._choices.counts = None
                    for chooser, indices, at in chosen:  # (after the fact: where the routers stood as it was taken)
                        self._choices.note(chooser, indices, at=at)
                    if watch.choosers:
                        stops.append(self._tap_choosers(watched, watch.choosers))
                    if not path:
                        self._stamp(watched, self._scopes())
                    if not_run:  # (the rest of this block too)
                        stops.append(self._watch_first_runs(watched, skeleton, stops))

            def passed(path: str) -> bool:
                watched = ref()
                return (
                    watched is not None
                    and self._passed(watched, self._scopes(), path, self._left_out(watched)) is not None
                )

            stops.append(
                watch_forward(
                    model,
                    scopes,
                    self._widths(),
                    self._excluded,
                    on_pass=on_pass,
                    passed=passed,
                    place=self._choices.snapshot,
                )
            )
        self._watching = True

        def stop_watching() -> None:
            self._watching = self._counting = False
            for stop in stops:
                stop()
            self._tapped.clear()

        return stop_watching

    def _tap_choosers(self, model: nn.Module, paths: Sequence[str]) -> Callable[[], None]:
        """Tap, for the open block, the modules at ``paths`` that choose which tokens reach their routers (see
        :mod:`._token_choices`), those not tapped already."""
        new = [p for p in paths if p not in self._tapped]
        count = not self._counting  # (the first taps of the block count the model's forwards too, where none do)
        self._counting = True
        self._tapped.update(new)
        return tap_choices(model, new, self._choices, count=count)

    def _count_forwards(self, model: nn.Module) -> Callable[[], None]:
        """Count, for the open block, the forwards of ``model`` itself (where each one's rankings start: see
        :mod:`._token_choices`), before any module is known to choose its routers' tokens."""
        self._counting = True
        return count_forwards(model, self._choices)

    def _stamp(self, model: nn.Module, scopes: list[str]) -> None:
        """Note, as the model's forward is known to pass the watch in the open block, what :meth:`_recheck`
        compares at each later forward in it."""
        owner = self._owner
        owner.mods = _on_the_way(model, scopes)
        owner.way = [m.__dict__ for m in owner.mods]
        owner.classes = [vars(klass) for klass in _classes_of(owner.mods)]
        owner.places, owner.keys = _code_places(owner.mods)
        owner.stamp = [
            _HOOKS.next_id,
            *map(len, owner.way),
            *map(type, owner.mods),
            *map(dict, owner.classes),
            *map(operator.getitem, owner.places, owner.keys),
        ]

    def _unstamp(self) -> None:
        owner = self._owner
        owner.mods, owner.way, owner.classes, owner.places, owner.keys, owner.stamp = [], [], [], [], [], None

    def _recheck(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Callable[[], Any]], Any] | None:
        """At each forward of the model in an open block, after its first passed the watch for decisions outside
        the routers: None where nothing changed on the way to the routers since; else a function that runs this
        forward watched again.

        The watch runs as a block starts; a forward hook added inside the block (on an MoE block, or a global one)
        or a method set on a module on the way (``block.route = ...``) may dispatch the block's tokens by a top-k of
        its own, the forced router's choice dropped, and so may a method replaced on their classes, a class swapped
        or a helper their code names replaced. What is compared per forward is a stamp, one list built and compared
        in C (see :meth:`_Owner.moved`): the number of hooks torch has made (any hook, anywhere, moves it), the
        number of attributes and the class of each module on the way, the ``__dict__`` of each of their classes up to
        ``nn.Module`` (against a copy: each entry the same object), and the callables set on those modules and the
        helpers their classes' code names, each at its place. Where it moved, the skeleton the watch passed is
        compared in full; a change there (not a tensor's hook, nor an attribute a forward set, nor a constant set
        on a class) runs this forward under the watch, which refuses a decision outside the routers as it ends, and
        so on for each forward of the block (the next block watches and notes the model as it is then)."""
        if not self._owner.moved() or self._rewatching or _in_backward():
            return None
        model = self._model_ref()
        if model is None:
            return None
        scopes = self._scopes()
        if self._passed(model, scopes, "", self._left_out(model)) is not None:
            self._stamp(model, scopes)
            return None
        return functools.partial(self._rewatch, model, scopes, (args, kwargs))

    def _rewatch(
        self,
        model: nn.Module,
        scopes: list[str],
        inputs: tuple[tuple[Any, ...], dict[str, Any]],
        run: Callable[[], Any],
    ) -> Any:
        """Run one forward of ``model`` (``run``) under the watch for decisions outside the routers."""
        self._rewatching = True
        try:
            return watch_call(model, scopes, self._widths(), self._excluded, inputs, run)
        finally:
            self._rewatching = False

    def _watch_first_runs(
        self, model: nn.Module, skeleton: _Skeleton, stops: list[Callable[[], None]]
    ) -> Callable[[], None]:
        """Watch the first run of each module in an MoE block that the watched forward of ``model`` did not
        run (a branch it did not take: a router there would be neither recorded nor forced). A module that chooses
        which tokens reach its routers, found in such a run (Mixture-of-Depths first run in a later forward), is
        noted on ``skeleton`` (tapped in every later block), its choice in that run noted, and it is tapped for the
        rest of the block (its taps' removal added to ``stops``)."""
        ref = weakref.ref(model)

        def on_pass(path: str, watch: OrphanWatch) -> None:
            skeleton.not_run.difference_update([p for p in skeleton.not_run if p == path or p.startswith(path + ".")])
            watched = ref()
            if watched is None or not watch.choosers:
                return
            skeleton.choosers = tuple(dict.fromkeys((*skeleton.choosers, *watch.choosers)))
            chosen = [(c, i, a) for (c, i), a in zip(watch.chosen(), watch.chosen_places(), strict=True)]
            for chooser, indices, at in chosen:
                if chooser not in self._tapped:  # (after the fact: where the routers stood as the watch saw it)
                    self._choices.note(chooser, indices, at=at)
            stops.append(self._tap_choosers(watched, watch.choosers))

        return watch_first_runs(
            model,
            list(skeleton.not_run),
            self._scopes(),
            self._widths(),
            self._excluded,
            on_pass,
            self._choices.snapshot,
        )

    @staticmethod
    def _passed(model: nn.Module, scopes: list[str], path: str, left_out: frozenset[str]) -> _Skeleton | None:
        """The record of a forward of the module at ``path`` (``""``: the model) that passed the watch with
        these routers and these modules left out on purpose (exclude=), the model made as it is now; None if none
        did. (A pass of a session that excluded a router is none of a session that did not: that router would run
        natively there, unsaid.)"""
        passed = _WATCHED.get(model, {}).get((tuple(scopes), model.training, path, left_out))
        return passed if passed is not None and passed.holds(model, scopes) else None

    def _mark_watched(
        self, model: nn.Module, path: str = "", not_run: Sequence[str] = (), choosers: Sequence[str] = ()
    ) -> _Skeleton:
        """Record that a forward of ``model`` (or of its module at ``path``) passed the watch with these
        routers, as the model is now, which modules in MoE blocks it did not run, and which modules chose the
        tokens that reach their routers (:attr:`OrphanWatch.choosers`)."""
        scopes = self._scopes()
        key = (tuple(scopes), model.training, path, self._left_out(model))
        skeleton = _WATCHED.setdefault(model, {})[key] = _Skeleton(model, scopes)
        skeleton.not_run.update(not_run)
        skeleton.choosers = tuple(choosers)
        return skeleton

    def _left_out(self, model: nn.Module) -> frozenset[str]:
        """The paths of the modules of ``model`` that exclude= leaves native on purpose (read once per model)."""
        if self._excluded is None:
            return frozenset()
        held = self._left_out_of.get(model)
        if held is None:
            excluded = self._excluded
            held = frozenset(n for n, m in model.named_modules(remove_duplicate=False) if excluded(n, m))
            self._left_out_of[model] = held
        return held

    def _scopes(self) -> list[str]:
        """Where the scopes sit in the model now (their paths at attach, with any wrapper inserted since)."""
        return [self._paths.get(i, s.scope) for i, s in enumerate(self._sites)]

    def _widths(self) -> set[int]:
        return {h.num_experts for h in self._hooks if h.num_experts}

    def _uninstall(self) -> None:
        for h in self._hooks:
            h.drop_guard()
        for scope, own in reversed(self._installed):
            if own is _MISSING:
                scope.__dict__.pop("forward", None)
            else:
                scope.forward = own
        self._installed.clear()
        self._hooks.clear()

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
        # the feed levels first: where one sits right over a router's wrapper (the model is the router's scope),
        # the router's is the module's forward once it is out
        under: dict[int, Any] = {}
        self._plan_removal(self._feed_installed, self._feed_wrappers, actions, refused, under)
        self._plan_removal(self._installed, self._wrappers, actions, refused, under)
        if refused:
            raise SessionStateError(
                "cannot detach without undoing other code's changes: something installed after attach wraps "
                f"the moe_replay wrapper where it cannot be taken out: {'; '.join(refused[:3])}"
                + (f" (+{len(refused) - 3} more)" if len(refused) > 3 else "")
                + ". Remove that wrapper first (e.g. accelerate's remove_hook_from_module), then detach; "
                "the session stays attached and nothing was changed"
            )
        return actions

    def _plan_removal(
        self,
        installed: list[tuple[nn.Module, Any]],
        wrappers: list[Any],
        actions: list[Callable[[], None]],
        refused: list[str],
        under: dict[int, Any],
    ) -> None:
        """:meth:`_removal_plan` for the wrappers of one list (``installed[i]`` is where ``wrappers[i]`` went).

        ``under`` maps a module whose forward an earlier action gives back to what it gives back (added to).
        """
        for i in range(len(wrappers)):  # no zip/enumerate: their result tuples would hold the wrapper
            scope, own = installed[i]
            wrapper = wrappers[i]
            if isinstance(wrapper, FeedForward):
                if wrapper.users > 1:  # another attached session watches this module too: it stays for that one
                    actions.append(wrapper.leave)
                    continue
                # what it runs now (the detach of another session it served may have replaced a wrapper it held)
                own = _MISSING if wrapper.before is None else wrapper.before
            if under.get(id(scope), scope.__dict__.get("forward", _MISSING)) is wrapper:
                actions.append(functools.partial(_restore_forward, scope, own))
                under[id(scope)] = own
                continue
            setters, containers, opaque = _references(scope, wrapper)
            outside = _outside_referrers(wrapper, [*containers, wrappers])
            name = next((s.scope for s in self._sites if s.scope_module is scope), type(scope).__name__)
            if opaque or outside:
                refused.append(
                    f"'{name}' (its forward is now {_describe(scope.__dict__.get('forward'))}; the moe_replay "
                    f"wrapper is held by {', '.join([*opaque, *outside][:3])})"
                )
                continue
            inner = wrapper.__wrapped__
            actions.extend(functools.partial(setter, inner) for setter in setters)

    def detach(self) -> None:
        """Remove every wrapper of this session, and only those. Idempotent.

        Other code that changed a module's ``forward`` after attach keeps its change: a wrapper
        installed on top of this session's (accelerate's ``add_hook_to_module``, say) stays and
        now calls the original forward; a wrapper removed while attached stays removed. Where
        this session's wrapper is held in a way it cannot edit, detach refuses and changes nothing.

        The rows of the last capture are copied to the host, so :meth:`routes` still reads
        them after detach.

        Raises:
            SessionStateError: a block of this session is open (in any thread), a replayed forward's
                checkpointed region still awaits its recompute in backward (not checked while an
                exception unwinds: in a ``finally:`` clause the graph goes with the error), or a
                wrapper cannot be taken out.
        """
        # while an exception unwinds (a finally: clause), the graph of a replayed forward goes with it
        self._detach(recompute_check=sys.exc_info()[0] is None)

    def _detach(self, *, recompute_check: bool) -> None:
        if not self._attached:
            return
        self._check_thread("detach()")
        if self._owner.blocks:
            raise SessionStateError(
                "detach() inside an open capture(), replay() or keep_scores() block of this session: the forwards "
                "later in the block would be neither recorded nor forced. Leave the block first, then detach"
            )
        if recompute_check:
            self._check_no_forced_recompute()
        plan = self._removal_plan()
        with _interrupts_held():  # (a Ctrl-C half-way would leave some forwards wrapped: it waits for the end)
            self._detach_now(plan)

    def _detach_now(self, plan: list[Callable[[], None]]) -> None:
        """Carry out :meth:`_detach` once nothing refuses it: take out every wrapper by ``plan``, forget the model."""
        self._set(capturing=False, replaying=False)
        self._keep_rows()
        if self._feeds is not None:
            self._feeds.to_host()  # (as the rows are)
        for action in plan:
            action()
        for feed in self._feed_wrappers:
            if self._owner in feed.owners:
                feed.owners.remove(self._owner)
        for installed, wrappers in ((self._installed, self._wrappers), (self._feed_installed, self._feed_wrappers)):
            for i in range(len(wrappers)):  # (no zip: its tuples would hold the wrapper)
                module, wrapper = installed[i][0], wrappers[i]
                if _gone(module, wrapper):
                    _retire(module, wrapper)
        self._installed.clear()
        self._wrappers.clear()
        self._feed_installed.clear()
        self._feed_wrappers.clear()
        for hook in self._hooks:  # (a choice read along another dimension: read again as it is by a later session)
            AXES.pop(hook.scope, None)
        self._hooks.clear()
        self._attached = False
        model = self._model_ref()
        with _ATTACH_LOCK:
            if model is not None and _session_of(model) is self:
                del _ATTACHED[model]
        given = give_back_iterators(list(model.modules())) if model is not None else []
        if given:  # (the items the plain model would draw, in an object other than the user's)
            warnings.warn(
                f"moe_replay: detach() gave {given[:4]} a generator of its own, not the iterator the model held: the "
                "runs that established a router's decision drew more items from it (a generator, which cannot be "
                "copied) than the forwards since did. It gives those items first and then the iterator's own, so the "
                "model draws what it would have; code that holds the old iterator elsewhere sees it past those items",
                RuntimeWarning,
                stacklevel=4,
            )

    def _check_no_forced_recompute(self) -> None:
        """Refuse to go while a checkpointed region of a replayed forward still awaits its recompute."""

        def waiting(h: RouterHook) -> bool:  # forced rows whose region no backward has begun to recompute
            return any(k.forced and k.graph_task == -1 for k in h.kept.values())

        pending = [h.name for h in self._hooks if waiting(h)]
        if pending:
            gc.collect()  # a freed graph's regions may sit in a reference cycle
            pending = [h.name for h in self._hooks if waiting(h)]
        if pending:
            raise SessionStateError(
                f"routers {pending[:4]} hold replayed rows for the recompute of a checkpointed region whose backward "
                "has not run: after detach that recompute would choose its experts natively, and the gradients "
                "would follow other experts than the forward. Run backward (or free the graph: del the loss) "
                "before detach"
            )

    def _keep_rows(self) -> None:
        """Copy what the last capture recorded to the host, for :meth:`routes` after detach."""
        if not self._has_capture:
            return
        rings = [h.capture_ring for h in self._hooks]
        if any(r is not None and r.device.type == "meta" for r in rings):
            self._has_capture = False  # rows of a model on the meta device hold no values
            return
        counted = _read_counters([r.written for r in rings if r is not None])
        self._kept_rows = [_HostRows(r, counted.pop(0)) if r is not None else None for r in rings]
        self._kept_ran = [h.calls > 0 for h in self._hooks]

    # ------------------------------------------------------------- threads, devices
    def _check_thread(self, what: str) -> None:
        holder = self._owner.ident
        if holder is not None and holder != threading.get_ident():
            raise _other_thread(what, holder)

    @contextlib.contextmanager
    def _block(self, what: str) -> Iterator[None]:
        """Hold the session for this thread while a capture/replay/keep_scores/verify block is open."""
        self._check_outside_forward(what)
        owner, me = self._owner, threading.get_ident()
        release = hold_interrupts()  # (a Ctrl-C after the count rose and before the try would keep it raised)
        try:
            with owner.lock:
                if owner.ident is not None and owner.ident != me:
                    raise _other_thread(what, owner.ident)
                if owner.blocks:
                    owner.admit_forward(what)
                else:
                    owner.open()
                    _thread_refusal()  # (for compiled code traced in another thread while the block is open)
                    _lean.settle()  # (torch's caches of its namespace built before a lean forward puts wrappers there)
                owner.ident = me
                owner.blocks += 1
        except BaseException:
            release()
            raise
        try:
            release()  # (a Ctrl-C held since the count rose is raised here, where the finally lowers it)
            for h in self._hooks:
                h.prepare_guard(_device_of)
            yield
        except Exception as e:  # a refusal that torch.compile traced comes out as its own error: ours again
            ours = _from_compiler(e)
            if ours is None:
                raise
            raise ours from e
        finally:
            with interrupts_held(), owner.lock:  # (the count and the guards alike, or neither)
                owner.blocks -= 1
                if owner.blocks == 0:
                    owner.close()
                    for h in self._hooks:  # (hooks run after a router only count in blocks)
                        h.drop_guard()

    def _check_outside_forward(self, what: str) -> None:
        """Refuse a block entered while a forward of the model runs in this thread (a hook inside it): the routers
        that ran earlier in that forward would be left out of the block, the later ones not, and their rows would
        not line up. Read from the frames of this thread as the block starts, not in any forward."""
        feeds = self._feed_wrappers
        if not feeds:
            return
        code = FeedForward.__call__.__code__
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code is code and any(frame.f_locals.get("self") is f for f in feeds):
                raise SessionStateError(
                    f"{what} entered inside a forward of the model (a hook or callback that runs in it): the routers "
                    "that ran earlier in this forward would be left out of the block and the later ones not, so "
                    "their rows would not line up. Enter the block before the forward (a forward pre-hook of the "
                    "model runs before it) or after it returns"
                )
            frame = frame.f_back

    def _check_in_place(self) -> None:
        """Refuse a block where a router would run without this session's wrapper.

        Its ``forward`` no longer reaching the wrapper: set back to the plain one after attach
        (accelerate's ``remove_hook_from_module`` on a hook added before attach puts back the forward
        it kept, dropping the wrapper too), or wrapped again around that forward (accelerate's
        ``add_hook_to_module`` on a module hooked before attach); its module replaced in the model
        (``layer.mlp.gate = new``), or a copy of it running at its path. Each would route natively,
        which only a strict replay's count would notice. A router module moved to another path (a layer
        removed, inserted or reordered) is refused too: its rows would go under a path that now names
        another module. Wrapped where it sits (a checkpoint or PEFT wrapper: its path with segments
        inserted), it goes on under its name. One lookup per router when nothing changed.
        """
        model = self._model_ref()
        for i in range(len(self._wrappers)):
            scope, wrapper = self._installed[i][0], self._wrappers[i]
            name = self._sites[i].scope
            now = scope.__dict__.get("forward", _MISSING)
            if now is not wrapper and now is not self._reached.get(i, wrapper):
                if not self._reaches(scope, wrapper, now):
                    raise SessionStateError(
                        f"the forward of '{name}' no longer calls this session's wrapper: it was set back to the "
                        "forward from before attach, or wrapped again around that one (accelerate's "
                        "remove_hook_from_module does that to a hook added before attach, and add_hook_to_module on "
                        "such a module too), so its router would route natively. Detach and attach again"
                    )
                self._reached[i] = now  # (not checked again while the forward stays this object)
            # (a wrapper around this session's may change what the router returns: guarded in the block)
            hook = self._hooks[i]
            hook.wrapped = now is not wrapper
            if hook.wrapped:
                hook.install_guard()
            if model is None or _module_at(model, self._paths.get(i, name)) is scope:
                continue
            held = _module_at(model, name)
            dup = next((m for m in (held.modules() if held is not None else ()) if _copy_of_router(m)), None)
            if dup is not None:  # what runs at that path now is a copy of it made after attach
                raise SessionStateError(
                    f"'{name}' now holds a copy of the router module this session intercepts, made after attach "
                    f"({type(held).__name__}; PEFT's modules_to_save makes one), and the copy is not intercepted: "
                    "it would route natively. Attach after wrapping the model (get_peft_model, then mr.attach)"
                )
            found = [p for p, m in model.named_modules(remove_duplicate=False) if m is scope]
            if not found:
                raise SessionStateError(
                    f"'{name}' is no longer the {type(scope).__name__} module this session intercepts ("
                    + (f"it now holds another {type(held).__name__}" if held is not None else "it is gone")
                    + "): a router module replaced after attach would route natively. Detach and attach again "
                    "to intercept the new one"
                )
            wrapped = [p for p in found if _inserted_into(name, p)]
            if not wrapped:
                raise SessionStateError(
                    f"the module this session intercepts as '{name}' now sits at '{found[0]}': the model's modules "
                    "moved after attach (a layer removed, inserted or reordered), so its rows would be recorded and "
                    "replayed under a path that names another module of the model as it is now. Detach and attach "
                    "again"
                )
            self._paths[i] = wrapped[0]  # its path with wrappers inserted (a PEFT or checkpoint wrapper around it)
        for i in range(len(self._feed_wrappers)):  # the forwards that feed the blocks the model's inputs
            fed, feed = self._feed_installed[i][0], self._feed_wrappers[i]
            now = fed.__dict__.get("forward", _MISSING)
            if now is not feed and now is not self._reached.get(-1 - i, feed):
                # (every attached session's list of them: one module's may serve two sessions)
                with _ATTACH_LOCK:
                    lists = [s._feed_wrappers for s in _attached_sessions() if s._attached]
                if not self._reaches(fed, feed, now, [self._feed_wrappers, *lists]):
                    raise SessionStateError(
                        f"the forward of the {type(fed).__name__} this session watches (the attached model, or a "
                        "module between it and its routers) no longer calls this session's wrapper: it was set back "
                        "to the forward from before attach, or wrapped again around that one (accelerate's "
                        "remove_hook_from_module does that to a hook added before attach), so the tokens fed to the "
                        "model would go unseen. Detach and attach again"
                    )
                self._reached[-1 - i] = now

    def _follow_settings(self) -> None:
        """As a block starts: a router whose settings changed since its decision was established (a cut turned
        on, a config flag that picks which call dispatches) has it established again at its next forward."""
        for h, around in zip(self._hooks, self._around(), strict=True):
            h.follow_settings(around)

    def _keep_ids_settings(self, clear: bool) -> None:
        """As a capture ends (its settings checked unchanged inside it): keep, per router whose ids pass through code
        after its decision, the settings it ran under (see :meth:`RouterHook.ids_settings`). A capture appended to
        the last (``clear=False``) under other values of one keeps that it differs: no replay runs under both."""
        was = {} if clear else self._ids_settings
        now: dict[str, tuple[tuple[str, str], ...]] = {}
        for h in self._hooks:
            held = h.ids_settings() if h.calls > 0 else None
            if held is not None:
                now[h.name] = held
        for name, pairs in was.items():
            if name not in now:
                now[name] = pairs
            elif pairs != now[name]:
                joined = dict(now[name])
                for key, value in pairs:
                    if joined.get(key, value) != value:
                        joined[key] = SETTING_DIFFERS
                now[name] = tuple(sorted(joined.items()))
        self._ids_settings = now

    def _check_ids_settings(self, routes: Routes, plan: Sequence[tuple[RouterHook, Any, int]]) -> None:
        """Refuse routes whose rows a router's ids were remapped from under other settings than it has now.

        The rows recorded are those of the router's decision call (its top-k); where its ids reach its caller
        through code after that (a shift by an offset in its code, or in a hook of its modules), the experts they
        name follow the settings that code reads, so rows captured under one value of them and forced under another
        run other experts. Only the settings such a router's capture recorded (``Routes._ids_settings``) are
        compared; routes without them (built from rows, an engine's, files written before they were kept) replay
        as before."""
        held = routes._ids_settings
        if not held:
            return
        for h, _, j in plan:
            then = held.get(routes.names[j])
            if then is None:
                continue
            now = dict(h.ids_settings(always=True) or ())
            for key, was in then:
                if key.endswith(CACHED_SUFFIX):
                    raise SessionStateError(
                        f"router '{h.name}': its ids pass through code after its decision (it does not return the "
                        f"indices its decision call returned, as they are), and that code calls the cached function "
                        f"'{key.removesuffix(CACHED_SUFFIX)}': the rows recorded are its decision call's, and what "
                        "the cache returns (cleared and filled again under other values since the capture) is no "
                        "setting these routes can keep, so forced they may run other experts than the capture did. "
                        "Hold the table the ids pass through in a buffer of the router's (its values are kept and "
                        "compared), or force the experts by hand"
                    )
                is_ = now.get(key, "unset")
                if is_ != was:
                    if key == "training":
                        key = "training (train() or eval())"
                    raise SessionStateError(
                        f"router '{h.name}': its ids pass through code after its decision (it does not return the "
                        f"indices its decision call returned, as they are), and '{key}' of it is {is_} now, but was "
                        f"{was} when these routes were captured: the rows recorded are its decision call's, and "
                        "forced under another value of a setting that code may read they would run other experts "
                        "than the capture did. Set it back as it was for the replay, or capture again under the new "
                        "value"
                    )

    def _around(self) -> list[frozenset[str]]:
        """For each router, the attribute names the code of the modules on the way from the model to its scope assigns
        on other objects, a constant each time (flags a forward sets around its routers: see
        :meth:`RouterHook.changed_setting`). Read from the code, once per class and forward."""
        model = self._model_ref()
        if model is None:
            return [frozenset()] * len(self._hooks)
        # (by class and own forward: what assigned_on_others reads of a module, the same for each layer of one class)
        memo: dict[tuple[type, int], frozenset[str]] = {}
        out = []
        for scope in self._scopes():
            names: set[str] = set()
            m: nn.Module | None = model
            for part in [*scope.split(".")[:-1], None] if scope else [None]:  # (model, then each module on the way)
                assert m is not None
                key = (type(m), id(m.__dict__.get("forward")))
                found = memo.get(key)
                if found is None:
                    found = memo[key] = assigned_on_others(m)
                names.update(found)
                m = m._modules.get(part) if part is not None else None
                if m is None:
                    break
            out.append(frozenset(names))
        return out

    def _skeleton(self) -> dict[int, nn.Module]:
        """The modules on the way to the routers and their children as a block starts, for
        :meth:`_check_unchanged` as it ends (held for the block, so no id is reused meanwhile)."""
        model = self._model_ref()
        return {} if model is None else _on_the_way_and_children(model, self._scopes())

    def _check_unchanged(self, what: str, skeleton: dict[int, nn.Module], calls: Sequence[int]) -> None:
        """Refuse, as a block ends, a model whose routers or the modules on the way to them changed inside it.

        The checks of :meth:`_check_in_place` and the watch for routers no one attached run as a
        block starts; a change inside the block (a router module replaced, removed or moved, a
        layer added, a wrapper taken off) would leave the forwards after it routing natively, their
        rows dropped or recorded under another router's name. One lookup per router, as at the start.
        So would a setting of a router that ran in the block (``calls``: each router's count as it
        started) changed since its decision was established: the forwards after it may have made
        another decision than the one recorded or forced.
        """
        model = self._model_ref()
        try:
            self._check_in_place()
        except SessionStateError as e:
            raise SessionStateError(
                f"the model changed inside this {what} block: {e}. The forwards after the change were neither "
                "recorded nor forced as this session's routers: change the model between blocks"
                + (", and capture again (routes(allow_partial=True) reads the rows)" if what == "capture()" else "")
            ) from None
        for h, before, around in zip(self._hooks, calls, self._around(), strict=True):
            changed = h.changed_setting(around)
            if changed is not None:
                h.forget(every_mode=True, why=f"a change of its settings or code inside a block: {changed}")
                if h.calls == before:  # it did not run in the block: established again at its next forward
                    continue
                raise SessionStateError(
                    f"the model changed inside this {what} block: {changed}. A decision holds for the settings it "
                    "was established under (under others another call may decide, or a choice may follow it), so "
                    "the forwards after the change may have been recorded or forced as another decision than the "
                    "one that dispatched. Change settings between blocks (each block starts by checking them; the "
                    "decision is established again at the next forward)"
                    + ("; capture again (routes(allow_partial=True) reads the rows)" if what == "capture()" else "")
                )
        for h in self._hooks:  # (compiled code marks weights a hook cut to zero: read as the block ends)
            h.check_guard()
        gained = (
            []
            if model is None
            else [m for i, m in _on_the_way_and_children(model, self._scopes()).items() if i not in skeleton]
        )
        if gained:
            raise SessionStateError(
                f"the model changed inside this {what} block: a module on the way to its routers was added or "
                f"replaced (a {type(gained[0]).__name__}), so a forward after the change may have run a router that "
                "no session intercepts (it would route natively, neither recorded nor forced), and nothing watched "
                "for one. "
                "Change the model between blocks (each block starts by checking it)"
                + ("; capture again (routes(allow_partial=True) reads the rows)" if what == "capture()" else "")
            )

    def _reaches(self, scope: nn.Module, wrapper: Any, now: Any, held: Sequence[Any] | None = None) -> bool:
        """Does the ``forward`` of ``scope`` (``now``, another than ``wrapper``) still lead to ``wrapper``? (``held``:
        the sessions' lists holding it, this session's routers' by default)"""
        if now is _MISSING or (
            isinstance(now, types.MethodType)
            and now.__self__ is scope
            and (now == wrapper.__wrapped__ or now.__func__ is type(scope).forward)
        ):
            return False  # the plain forward
        setters, containers, opaque = _references(scope, wrapper)
        return bool(setters or opaque or _outside_referrers(wrapper, [*containers, *(held or [self._wrappers])]))

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
                self._budget.held -= ring.nbytes
                self._budget.rings -= 1
                h.capture_ring = None
                self._new_ring(h, s)
                new = h.capture_ring
                assert new is not None
                if "meta" not in (ring.device.type, device.type):
                    written = int(ring.written)
                    if written and not ring.overflowed(written):
                        new.write(ring.rows(written).to(device))
                        new.keep_call_rows(ring.call_rows(written))

    def __enter__(self) -> Session:
        if not self._attached:  # (else the block would run, and each call in it be refused on its own)
            raise SessionStateError(
                "`with session:` on a session that was detached: it intercepts nothing now, so the block's "
                "capture(), replay() and keep_scores() would each be refused. Attach again and enter that "
                "session: `with mr.attach(model) as session:`"
            )
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._leave_blocks(exc)
        # leaving on an error, the graph of a replayed forward goes with it: nothing awaits a recompute
        self._detach(recompute_check=exc_type is None)

    def _leave_blocks(self, exc: BaseException) -> None:
        """Leaving the session's ``with`` on an exception: leave the blocks this thread entered by hand inside it
        and never left, innermost first, as the exception would have left them had they been ``with`` blocks.

        Otherwise detach refuses (a block is open), its error takes the place of the exception on its way out
        (a ``KeyboardInterrupt`` raised as a ``SessionStateError``) and the model stays attached. What leaving a
        block says of it (a model changed inside it) is added to the exception as a note, never raised over it.
        """
        if self._owner.ident != threading.get_ident():
            return  # (another thread's blocks: detach names them)
        for ref in reversed(list(self._owner.entered)):
            block = ref()
            if block is None:
                continue
            try:
                block.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException as e:  # (said on the exception that is leaving, not raised over it)
                note = getattr(exc, "add_note", None)  # (Python 3.11+)
                if e is not exc and note is not None:
                    note(f"moe_replay: leaving the open {block._what} block also raised {e!r:.300}")

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refuse ``copy.copy``, ``copy.deepcopy`` and ``pickle``: a session is the interception on one live model.

        A copy would share this session's wrappers and rings (detaching it would leave this one
        attached with nothing installed), and a pickle could not hold them.
        """
        raise SessionStateError(
            "a Session cannot be copied or pickled: it is the interception installed on one live model (its "
            "wrappers, capture rings and thread lock), and a copy would share them. Keep what it recorded with "
            "session.routes() (a Routes pickles, or .save(path)); for another model, copy the model (a copy of an "
            "attached model comes out plain) and mr.attach the copy. An object that keeps the session as an "
            "attribute (a trainer, a module) cannot be copied while it holds it"
        )

    def _check_attached(self) -> None:
        if not self._attached:
            raise SessionStateError("this session was detached; call mr.attach(model) again")

    def _row_places(self, replay: bool) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """Where each router stands in its rows now, a copy of their device cursors in one tensor (no sync): the rows
        its replay read so far (``replay``), else those its capture wrote; the routers with none left out. None where
        none has any."""
        names: list[str] = []
        rows: list[torch.Tensor] = []
        for h in self._hooks:
            src, ring = h.replay_source, h.capture_ring
            cursor = (src.consumed if src is not None else None) if replay else (ring.written if ring else None)
            if cursor is not None:
                names.append(h.name)
                rows.append(cursor.reshape(()) if not rows else cursor.reshape(()).to(rows[0].device))
        return (tuple(names), torch.stack(rows)) if rows else None

    def _set(self, *, capturing: bool | None = None, replaying: bool | None = None) -> None:
        if capturing is not None:
            self._capturing = capturing
        if replaying is not None:
            self._replaying = replaying
        self._choices.capturing = self._capturing
        for h in self._hooks:
            h.capturing = self._capturing
            h.replaying = self._replaying and h.replay_source is not None

    # ------------------------------------------------------------- capture
    @_block_method("capture()")
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
            SessionStateError: on leaving, if the model changed inside the block (a router
                replaced or moved, a module added on the way to the routers); the capture is
                then marked interrupted.

        Inside :meth:`replay`, a capture records the forced experts.

        Once per forward of the model (not per router call), a capture also keeps a copy of
        the token ids fed, on their device, and the attention mask of a prompt forward (not
        with ``keep_newest``, whose rows no longer line up with the forwards), and watches
        the KV cache given to the model for calls that move its rows (beam search's
        ``reorder_cache``): :func:`~moe_replay.split_generation` checks a ``generate()``
        capture against them.

        An exception that leaves the block ends the capture. The rows written before it
        stay in the rings (nothing is rewound: the routers that ran in the failed forward
        keep its rows, the others do not have them), so :meth:`routes` refuses them unless
        asked for ``allow_partial=True``, and ``clear=False`` cannot append to them. Caught
        inside the block (a retry after an out-of-memory error), a forward of the model that
        raised after a router recorded rows marks the capture so too, as the block ends; one
        caught inside the model's own code is not seen, and leaves the routers out of step:
        let it leave the model's forward, or capture again. Rows kept for activation-checkpoint
        recomputes belong to each forward's autograd graph: a failed forward's go with its graph,
        a finished forward's backward still gets its own.
        """
        clear = check_flag(clear, "capture(clear=)")
        self._check_attached()
        with self._block("capture()"):
            with self._capture(clear, expected_tokens, max_bytes):
                yield self

    @contextlib.contextmanager
    def _capture(self, clear: bool, expected_tokens: int | None, max_bytes: int | None) -> Iterator[None]:
        if self._capturing:
            raise SessionStateError("a capture is already running on this session; captures do not nest")
        self._check_in_place()
        self._follow_settings()
        self._follow_devices()
        if clear:  # (kept again as it ends: a capture that fails keeps none of the last one's)
            self._ids_settings = {}
        if not clear and self._interrupted is not None:
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}, so its rows may stop half-way "
                "through a forward and capture(clear=False) cannot append to them: start a new capture, "
                "or read them with routes(allow_partial=True)"
            )
        for name, value in (("expected_tokens", expected_tokens), ("max_bytes", max_bytes)):
            if value is not None and (not is_integer(value) or value < 0):  # (numpy's ints too: np.prod of a shape)
                raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
        expected_tokens = None if expected_tokens is None else int(expected_tokens)
        max_bytes = None if max_bytes is None else int(max_bytes)
        rings = self._rings()
        if expected_tokens is not None:
            self._check_fixed(rings, expected_tokens + (0 if clear else max(r.host_written for r in rings)))
        cap = max_bytes if max_bytes is not None else self._budget.limit
        need = sum(r.bytes_after(expected_tokens or 0, clear=clear) for r in rings)
        if cap is not None and need > cap:  # refused before the last capture is cleared
            raise CaptureOverflowError(
                f"this capture needs capture rings of at least {_fmt_bytes(need)}"
                + (f" for expected_tokens={expected_tokens}" if expected_tokens else "")
                + f", more than max_bytes={cap}; nothing was cleared. Attach with a smaller capacity, expect "
                "fewer tokens per capture() block, or raise max_bytes"
            )
        stale = [h.name for h in self._hooks if _stale_ring(h)]
        if stale and not clear:
            raise SessionStateError(
                f"routers {stale[:4]} choose another number of experts (k or E) than when the last capture recorded "
                "their rows (the model changed since), so capture(clear=False) cannot append to those rows: start a "
                "new capture"
            )
        if clear:
            firsts = self._first_segments(rings, expected_tokens)  # (allocated before the last capture is cleared)
            for r, first in zip(rings, firsts, strict=True):
                if first is None:
                    r.reset()
                else:
                    r.install_first_after_reset(first)
            self._interrupted = None
            for h, site in zip(self._hooks, self._sites, strict=True):
                if _stale_ring(h):  # rings of the last capture, kept readable until now
                    self._new_ring(h, site)
            rings = self._rings()
        release = hold_interrupts()  # (held until the try that puts every setting back is in place)
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
                self._capacity = max([self._capacity] + [r.capacity for r in rings])
        except BaseException:
            self._budget.limit = limit
            if clear:
                self._has_capture = False  # the rings were cleared: nothing to read
            release()
            raise
        stop_feeds = stop = None
        running = False
        try:
            for h in self._hooks:
                h.calls = 0
            self._has_capture = True
            if clear or self._feeds is None:
                self._feeds = FeedRecord(limit=self.capacity if self.keep_newest else None)
                self._choices.clear()
            if rings:  # (each router's calls: routes() reads each router's ids where the routers' calls differ)
                # (the calls of rows each router's ring counts now: 0 for a router of none; _hooks changes in place)
                self._feeds.calls_made = functools.partial(calls_made_by, self._hooks)
            self._feeds.scopes = [h.scope for h in self._hooks]  # (a later router that sees only the kept tokens)
            model = self._model_ref()
            stop_feeds = self._feeds.start(self._feed_wrappers) if model is not None else None
            skeleton, calls = self._skeleton(), [h.calls for h in self._hooks]
            stop = self._watch()
            self._set(capturing=True)
            running = True
            release()  # (a Ctrl-C held since the settings changed is raised here, where the finally puts them back)
            yield
            self._check_unchanged("capture()", skeleton, calls)
            self._keep_ids_settings(clear)
            if self._feeds is not None and self._feeds.raised is not None:  # (caught inside the block: no exit error)
                self._interrupted = f"{self._feeds.raised}, caught inside the block"
        except BaseException as exc:
            if running:  # (an error in the setup above recorded nothing: not an interrupted capture)
                self._interrupted = f"{type(exc).__name__}({str(exc)[:200]!r})"
            if isinstance(exc, RuntimeError) and OVERFLOW_MARK in str(exc):
                raise self._device_overflow(exc) from exc
            raise
        finally:
            try:
                with interrupts_held():  # (every router's flag and every watch put back, or a Ctrl-C waits for it)
                    self._set(capturing=False)
                    if stop is not None:
                        stop()
                    if stop_feeds is not None:
                        stop_feeds()
                    self._budget.limit = limit
            finally:
                release()  # (where the setup raised first: a Ctrl-C held since then)

    def _first_segments(self, rings: Sequence[CaptureRing], rows: int | None) -> list[torch.Tensor | None]:
        """The first segments the rings need for ``rows`` rows once reset, allocated while they still hold the last
        capture: where one cannot be allocated, the refusal leaves every ring, and the capture it holds, as it was."""
        if rows is None:
            return [None] * len(rings)
        replaced = sum(r.nbytes for r in rings if rows > r.capacity)
        self._budget.held -= replaced  # (freed once installed: the allocations are checked against the budget after)
        firsts: list[torch.Tensor | None] = []
        try:
            for r in rings:
                firsts.append(r.first_after_reset(rows))
        except BaseException:
            made = sum(f.shape[0] * r.row_bytes for f, r in zip(firsts, rings, strict=False) if f is not None)
            self._budget.held += replaced - made
            raise
        return firsts

    def reserve(self, rows: int) -> None:
        """Allocate every router's ring for ``rows`` rows now, before a capture needs them.

        Eager captures grow on their own; a CUDA graph or a compiled model writes into a
        ring of fixed size, baked in when the graph is captured or the model compiled. So
        size the rings first, for the whole capture (all forwards of one ``capture()``
        block), then capture the graph or compile. Call it between captures: rings smaller
        than ``rows`` are replaced by rings of ``rows`` rows that keep the rows of the last
        capture (``routes()`` still reads them, ``capture(clear=False)`` appends after them).

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
        if not is_integer(rows) or rows < 1:  # (numpy's ints too)
            raise InvalidArgumentError(f"rows must be a positive int, got {rows!r}")
        rows = int(rows)
        if self._capturing:
            raise SessionStateError(
                "reserve() runs between captures (it replaces rings); inside this block the rings grow on "
                "their own, or enter the capture with capture(expected_tokens=...)"
            )
        rings = self._rings()
        self._check_fixed(rings, rows)
        need = sum(max(rows, r.host_written) * r.row_bytes if r.capacity < rows else r.nbytes for r in rings)
        if self._budget.limit is not None and need > self._budget.limit:
            raise CaptureOverflowError(
                f"reserve({rows}) would bring the capture rings to {_fmt_bytes(need)}, more than "
                f"max_bytes={self._budget.limit}; nothing was changed. Reserve fewer rows, or raise max_bytes"
            )
        for r in rings:
            if r.capacity < rows:
                r.grow_first(rows)  # (the last capture's rows move into the new ring)
        self._capacity = max([self._capacity] + [r.capacity for r in rings])

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
        cpu = [r for r in self._rings() if r.device.type == "cpu"]
        # (the compiled run that overflowed first raised before it marked its rings fixed)
        rings = [r for r in cpu if r.fixed_by is not None] or cpu
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

        Inside an open ``capture()`` block, the rows of the forwards run in it so far. Still readable
        after :meth:`detach` (the rows were copied to the host then), as a profiler's results are after
        its context.

        Args:
            allow_silent: accept routers that recorded no row while others did (by default
                that is an error: such a router never ran, e.g. a module built twice).
            allow_partial: read the rows of a capture that an exception interrupted: each
                router's rows as written before the exception, so the routers that ran in
                the failed forward hold more rows than the others. Implies ``allow_silent``.

        Raises:
            SessionStateError: nothing was captured, the capture was interrupted, another
                thread has a block open on this session, or a forward of the model is running
                (a hook that reads the routes mid-forward).
            UnsupportedRouterError: the capture recorded nothing (no router ran in it; read inside an open
                ``capture()`` block, none ran in it yet), or, without ``allow_silent``, some routers recorded no
                row while others did (they never ran: a module outside the forward path, or built twice).
            CaptureOverflowError: rows went past a ring that a CUDA graph or a compiled
                region writes into (its fixed size); eager captures grow instead, and
                ``keep_newest`` rings keep the newest rows.
        """
        allow_silent = check_flag(allow_silent, "routes(allow_silent=)")
        allow_partial = check_flag(allow_partial, "routes(allow_partial=)")
        if not self._has_capture:
            if not self._attached:
                raise SessionStateError("this session was detached before it captured anything")
            raise SessionStateError("nothing was captured yet: run forwards inside `with session.capture():`")
        if self._attached:
            self._check_thread("routes()")
            if self._feeds is not None and self._feeds._inside:
                raise SessionStateError(
                    "routes() inside a forward of the model (a hook or callback that runs in it): the routers later "
                    "in this forward have not recorded its rows yet, so the routers' rows would not line up. Read "
                    "routes() once the forward has returned"
                )
            rings: list[Any] = [h.capture_ring for h in self._hooks]
        else:
            assert self._kept_rows is not None
            rings = list(self._kept_rows)
        names = self.names
        counted = _read_counters([r.written for r in rings if r is not None])
        written = [counted.pop(0) if r is not None else 0 for r in rings]
        if self._interrupted is not None and not allow_partial:
            counts = ", ".join(f"'{n}': {w}" for n, w in list(zip(names, written, strict=True))[:4])
            raise SessionStateError(
                f"the last capture was interrupted by {self._interrupted}; a forward may have stopped half-way, "
                f"so the routers' rows may not line up (rows per router: {counts}"
                + (", ..." if len(written) > 4 else "")
                + (
                    "). Capture again"
                    if self._attached
                    else "). This session was detached since: attach the model again, mr.attach(model), and capture "
                    "again"
                )
                + ", or call routes(allow_partial=True) to read the rows written before the exception"
            )
        allow_silent = allow_silent or allow_partial
        if not any(written) and not any(h.calls for h in self._hooks) and not allow_silent:
            if self._attached and self._capturing:  # (read inside the open block, before its first forward)
                raise UnsupportedRouterError(
                    f"the capture() block still open has recorded nothing yet: none of the {len(names)} routers of "
                    "this session ran in it so far. routes() read inside the block gives the rows of the forwards "
                    "run in it before: call it after the model's forward (or once the block is left)"
                )
            raise UnsupportedRouterError(
                f"the capture recorded nothing: none of the {len(names)} routers of this session ran inside "
                "capture(). Was the model rebuilt or reloaded after attach (attach to the model you run), or did "
                "no forward run in the block?"
            )
        over = [(n, r, w) for n, r, w in zip(names, rings, written, strict=True) if r is not None and r.overflowed(w)]
        if over:
            worst = max(w for _, _, w in over)
            ring = over[0][1]
            detail = "; ".join(f"'{n}' wrote {w} rows" for n, _, w in over[:4])
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
            # (a router that ran on no token, a modality's router on a batch without it, recorded no row rightly)
            ran = [h.calls > 0 for h in self._hooks] if self._attached else self._kept_ran
            silent = [n for n, w, r in zip(names, written, ran, strict=True) if w == 0 and not r]
            if silent:
                raise UnsupportedRouterError(
                    f"routers {silent} recorded no row while others recorded up to {max(written)}: they never "
                    "ran during the capture (a module outside the forward path, or built twice?)"
                    + _aliases_of_silent(silent, self._sites, written)
                    + ". Exclude them with exclude=, or call routes(allow_silent=True)"
                )
        rows = [
            r.rows(w) if r is not None else torch.zeros(0, s.top_k or 1, dtype=torch.long)
            for s, r, w in zip(self._sites, rings, written, strict=True)
        ]
        experts = [r.num_experts if r is not None else s.num_experts for s, r in zip(self._sites, rings, strict=True)]
        routes = Routes._trusted(rows, names, experts)  # (a ring kept from before a change: the E it recorded)
        # (every router of the model, where the session took them all: a replay elsewhere tells a part from a wrapper)
        routes._recorded_names = self._model_routers if self._filtered else names
        kept = {n: self._ids_settings[n] for n in names if n in self._ids_settings}
        routes._ids_settings = kept or None
        # the forwards the rows came from, where every router saw the same ones (split_generation checks them)
        each = [r.call_rows(w) if r is not None else None for r, w in zip(rings, written, strict=True)]
        calls = set(each)
        routes._call_rows = calls.pop() if len(calls) == 1 else None
        if self._feeds is not None:  # what each row's forward was fed, where the forwards line up with the rows
            # (one router's rows, read by the forwards' bounds, give every router's ids where all made their calls in
            # the same forwards; else each router's own, below)
            ids, routes._fed_mask = self._feeds.rows(routes._call_rows) if self._feeds.lined_up() else (None, None)
            if ids is not None and routes._fed_mask is not None:
                ids = torch.where(routes._fed_mask == 0, -1, ids)  # prompt padding: the token of no sequence
            routes._token_ids = None if ids is None else _known_or_none(ids)
            if routes._token_ids is not None:  # (each row's place in its sequence: checked with its id at replay)
                routes._seq_pos = self._feeds.places(routes._call_rows)
                # (and the forward whose KV cache each row's forward went on from: checked at replay)
                routes._lineage = self._feeds.lineage(routes._call_rows, routes._seq_pos)
            if routes._token_ids is None and all(c is not None for c in each):  # (rows of no one id each)
                _router_ids(routes, self._feeds, each)
                if routes._call_rows is None:  # (each router's own calls, too: known from the forwards' bounds, ids
                    # or none; forwards fed embeddings keep none, and their routers' calls are checked all the same)
                    routes._router_calls = tuple(
                        None if (made := self._feeds.forward_calls(c, i)) is None or c is None else (c, made)
                        for i, c in enumerate(each)
                    )
            if self._feeds.mixed is not None:  # (routers that saw a forward's tokens in more than one order: each
                routes._ids_lost = self._feeds.mixed  # row in its router's own, which a replay by row order keeps)
            rank = None
            if len(set(routes.tokens_per_layer)) == 1:  # (rows of routers that saw their tokens sequence-first, or
                rank = self._feeds.ranks(routes._call_rows, routes.num_tokens)  # of forwards of an untold order)
                routes._token_rank = None if rank is None else _out_of_order(rank)
            # (every row in the untold order of its routers: a replay of them needs no order check)
            routes._order_untold = self._feeds.untold and (rank is None or bool((rank == UNTOLD_RANK).all()))
            routes._routers_order = (routes._token_rank is not None and not routes._order_untold) or (
                self._feeds.mixed is not None
            )
            routes._rows_moved = (  # (a plain cache's rows moved, tokens taken out of a cache too)
                self._feeds.moved or self._feeds.reordered or self._feeds.rolled_back
            )
            routes._caches_interleaved = self._feeds.interleaved
            routes._forward_calls = self._feeds.forward_calls(routes._call_rows)
            fed = [f for f in self._feeds.forwards if f.count]  # (read after rows(): the padding taken out)
            runs = routes._call_rows
            if fed and fed[0].grid is not None and runs and runs[0][0] == fed[0].count == int(fed[0].grid.sum()):
                routes._prompt_kept = fed[0].grid  # (the first forward's tokens its routers saw, of its grid)
        if self.keep_newest:  # a ring that wrapped holds its newest rows only
            routes._dropped_rows = max(
                (w - r.capacity for r, w in zip(rings, written, strict=True) if r is not None), default=0
            )
        # (which tokens the modules that choose them let reach their routers: a replay compares; rows dropped took
        # the choices of their forwards with them, which no longer line up)
        routes._token_choices = self._choices.kept() if not routes._dropped_rows else None
        # (where the routers stood in their rows at each ranking: a replay compares, as its rows are read in order)
        routes._choice_places = self._choices.kept_places() if routes._token_choices is not None else None
        # (how many rankings each forward took, where they line up with the forwards the routes know: slices of whole
        # forwards keep theirs)
        per_forward = self._choices.forwards()
        told = routes._forward_calls
        fits = routes._token_choices is not None and told is not None and per_forward is not None
        routes._choice_forwards = per_forward if fits and len(per_forward or ()) == len(told or ()) else None
        return routes

    # ------------------------------------------------------------- replay
    def _ids_lost_check(self, routes: Routes) -> None:
        """Refuse routes whose capture knew its forwards' token ids but could not keep them for every row."""
        lost = routes._ids_lost
        if lost is None and any(bool((v == LOST_ID).any()) for v in routes._router_ids or ()):
            lost = "rows of a router whose ids were lost"  # (the mark of each such row, whatever became of the why)
        if lost is None:
            return
        raise TokenMismatchError(
            f"these routes come from a capture whose forwards were fed token ids that it could not keep for every "
            f"row: {lost}. A replay could not check which tokens those rows go to, and would force "
            "them on whichever tokens come first. Call the router outside the capture() block where it is not "
            "part of the model's forward (an auxiliary loss on hidden states of one's own), or drop the check on "
            "purpose with routes.with_token_ids(None) to replay by row order alone"
        )

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
            self._check_whole(routes, old, new)
            return routes.rename({old: new}), {old: new}
        if not candidates and (by_path := _unwrapped_map(routes.names, self.names)) is not None:
            return routes.rename(by_path), by_path
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

    def _check_whole(self, routes: Routes, old: str, new: str) -> None:
        """Refuse the prefix change ``old`` -> ``new`` where it would take one part of a model for another.

        A wrapper (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, PEFT's ``base_model.model.``, a causal LM's
        ``model.`` around its base model) holds the whole model: every router the routes were recorded on lies under
        ``old``, and every router of this session under ``new``. A recorded router outside ``old`` names a sibling
        part (the decoder beside an encoder whose routes these are): ``old`` is a part of that model, and which part
        this session is, names cannot tell, so the rows of one part would be forced on another of the same form.
        Routers of this session outside ``new`` make ``new`` a part of this model: the change is taken only where
        that part holds exactly the routers the routes were recorded on (a capture of that part, replayed on the
        whole), never routes of some routers fitted onto the one part they happen to fit.
        """
        dropped = [p for p in old.split(".") if p and p not in _WRAPPER_NAMES]
        if routes._recorded_names is None and dropped:
            # (rows of no capture, or whose recorded routers were lost on the way: numpy, an engine, Routes(...) of
            # a capture's rows, or never known: see _model_routers): nothing tells whether the module names dropped
            # wrap that model or are one part of it
            raise RouterNotFoundError(
                f"the routes' router names (e.g. {routes.names[0]!r}) fit this session's (e.g. {self.names[0]!r}) "
                f"only by dropping {'.'.join(dropped)!r} from them ({old!r} -> {new!r}), and these routes do not "
                "know the routers they were recorded on (built from rows, read from numpy or an engine, or captured "
                "by a session whose include= took modules the router search does not find): "
                f"{dropped[0]!r} may be one part of that "
                "model (an encoder beside a decoder), not a wrapper, and the names cannot tell which part this "
                "session is. If these rows are meant for these routers, fit "
                f"them explicitly: routes.rename({{{old!r}: {new!r}}}), then replay"
            )
        recorded = routes._recorded_names if routes._recorded_names is not None else routes.names
        beside = [n for n in recorded if not n.startswith(old)]
        here = [n for n in self.names if not n.startswith(new)]
        if not beside and (
            not here or {n for n in self.names if n.startswith(new)} == {new + n[len(old) :] for n in recorded}
        ):
            return
        if beside:
            why = (
                f"the routes were recorded on a model with routers outside {old!r} too ({beside[0]!r}"
                + (f", +{len(beside) - 1} more" if len(beside) > 1 else "")
                + f"), so {old!r} is one part of that model, not a wrapper around it"
            )
        else:
            why = (
                f"this session's model has routers outside {new!r} too ({here[0]!r}"
                + (f", +{len(here) - 1} more" if len(here) > 1 else "")
                + f"), and its routers under {new!r} are not those the routes were recorded on, so {new!r} is one "
                "part of it that these routes happen to fit, not a wrapper around the model they were recorded on"
            )
        raise RouterNotFoundError(
            f"the routes' router names (under {old!r}, e.g. {routes.names[0]!r}) fit this session's (under {new!r}, "
            f"e.g. {self.names[0]!r}) only by the prefix change {old!r} -> {new!r}, and {why}: which part of the "
            "model each side is, the names cannot tell (an encoder's routes on a session of the decoder fit alike). "
            f"If these rows are meant for these routers, fit them explicitly: routes.rename({{{old!r}: {new!r}}}) "
            "(routes.select([...]) first to keep one part's routers), then replay"
        )

    def _check_routes(self, routes: Routes, strict: bool) -> tuple[Routes, list[tuple[RouterHook, RouterSite, int]]]:
        if not isinstance(routes, Routes):
            parts = isinstance(routes, list | tuple) and bool(routes) and all(isinstance(r, Routes) for r in routes)
            raise RoutesValidationError(
                f"replay takes a Routes object, got {type(routes).__name__}; "
                + (
                    f"these are {len(routes)} Routes (one per sequence, as split_generation returns them): lay "
                    "them out as the batch you replay, mr.BatchLayout.padded(lengths).routes(parts) (or .packed), "
                    "or mr.Routes.cat(parts) for generate()'s grid (keep_padding=True)"
                    if parts
                    else f"read the file first: session.replay(mr.Routes.load({str(routes)!r}))"
                    if isinstance(routes, str | os.PathLike)
                    else "build one with mr.Routes(...) or mr.Routes.from_numpy(...)"
                )
            )
        routes._ensure_valid()  # routes built with validate=False are checked before any forward
        self._ids_lost_check(routes)
        if routes._dropped_rows and routes._token_ids is None:
            raise RoutesValidationError(
                f"these routes come from a keep_newest capture whose ring wrapped: it dropped {routes._dropped_rows} "
                "rows per router before the first it holds, so they start part-way through a forward and know no "
                "token ids, and a replay would force them on whichever tokens come first, unchecked. keep_newest is "
                "for monitoring: capture without it to replay (an eager capture grows), or give the rows their tokens "
                "(routes.with_token_ids(ids)) to replay them checked"
            )
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
        if not routes.names:  # (strict=False: every router native, a block that forces nothing and says nothing)
            raise RoutesValidationError(
                "the routes hold no router, so this replay would force nothing and every forward would route "
                "natively; replay routes of this model's routers (an empty select(), or a filter of the names "
                "that matched none?)"
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
            if h.reestablishing:  # (its settings changed since its decision was established: its k and E are those
                pass  # of the decision its next forward establishes, checked against these routes before any forcing)
            elif e != s.num_experts:
                wrong.append(f"router '{s.name}' has {s.num_experts} experts, but the routes were recorded for {e}")
            elif s.top_k is not None and k != s.top_k:  # (a k no attribute says: checked when its decision is
                # established, at its first forward, which refuses routes of another k before forcing them)
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
        if strict:
            _check_forces_some(routes, [j for _, _, j in plan])
        self._renamed = renamed
        return routes, plan

    @_block_method("replay()")
    def replay(self, routes: Routes, *, strict: bool = True) -> Iterator[Session]:
        """Force the recorded experts; combine weights come from the current scores.

        Every router consumes its rows in order, one row per token per forward; -1 rows
        route that token natively. Routes are checked against the model before any
        forward runs; the k of a router that no attribute gives, not run yet under this
        session, is checked when its first forward establishes its decision, before
        anything is forced.

        Routes that know their tokens (:attr:`Routes.token_ids`: a capture's, kept through
        slicing, files, :func:`split_generation` and the batch layouts) are checked against
        the token ids each forward of the model is fed: a forward fed other tokens than its
        rows were recorded for (another batch, micro-batch or rank, sequences in another
        order), or tokens of its sequences at rows a capture recorded at prompt padding (a
        batch padded otherwise, or fed without its attention mask), raises
        :class:`TokenMismatchError`, before any router reads a row where the
        ids are on the host, and for the first forward fed ids on a device (one host sync);
        the later forwards' device ids when the block ends (no host sync per forward). With
        ``strict=False``, which never syncs the host, only a model on the CPU is checked (on a device, each forward
        is still checked to make the router calls of the captured forward it replays, where the host counts the reads,
        and in compiled code as below). A forward of a model compiled whole (``torch.compile(model)``) compares its ids
        on the device, in the compiled code, and its routers' reads with the calls of the captured forward it replays
        (where the routes know them: each router's calls, as an eager forward's are checked, with or without ids),
        and is refused when the block ends (on the CPU, at its next eager forward): after it ran, so its outputs, and
        whatever the block computed from them, must be discarded. Forwards fed embeddings, and
        eager ones after a compiled or CUDA-graph forward (whose reads the host does not count), are not checked.
        Routes that know no token ids but were
        laid out by :class:`~moe_replay.BatchLayout` (or :func:`~moe_replay.pad_routes`,
        :func:`~moe_replay.pack_routes`) are checked against the ``attention_mask`` and
        ``position_ids`` keywords each forward is fed: a sequence's row where the mask marks padding,
        padding of the layout where it marks a token, positions that restart inside a sequence
        (another padding side, order or lengths than the layout's), or positions another distance apart than
        two rows picked out of a sequence with a gap between them (``routes[index]``: a context-parallel rank's
        chunks, fed another rank's), or, fed no KV cache (nor anything else that may hold earlier tokens),
        positions that are not the rows' places, nor, fed a ``[batch, positions]`` mask, their columns in a batch
        row that holds their sequence from its first token (a sequence-parallel rank's slice of a sequence fed
        another rank's) raise :class:`TokenMismatchError`, and
        so do a forward fed neither where the rows it reads hold the layout's padding (nothing then
        tells where its sequences sit), or fed no mask and positions that run on through a batch row
        holding that padding (they tell no more), and one whose rows run a sequence on from one batch row into the
        next (rows laid out for a batch of another row length); sequences of the same lengths in another
        order cannot be told apart without ids. A
        forward is seen where it enters the attached model or a module between it and the
        routers (a wrapper calling the inner model, ``.forward`` called directly); one that
        enters none of them (a block called alone) is refused at its first router.

        A forward that raises is not rewound: the routers that ran before the exception
        have consumed its rows. An exception that leaves the block ends the replay there
        (no consumption check; the exception propagates as it is) and the next replay
        starts from row 0. Caught inside the block, the routers are out of step: the next
        forward of the model is refused as it begins (:class:`TokenMismatchError`, strict or
        not, where the host counts the routers' reads and they hold as many rows each), else
        a strict replay fails at the forward that overdraws or when the block ends.

        Args:
            routes: what to replay (from :meth:`routes`, a file, or an engine's output).
            strict: on leaving, every router must have consumed exactly its rows, and
                every router must have routes. ``False`` allows partial replay (rows left
                unconsumed, routers without routes); reading past the end of a router's rows
                is an error either way, and so are rows left unconsumed of routes an engine
                reader placed by their row count alone (read without a token count or id:
                a row too many at the front would shift every token's experts; a slice of
                them, ``routes[:n]``, replays partially).

        Raises:
            RoutesValidationError / RouterNotFoundError: before any forward, if the routes
                do not fit the model (at a router's first forward, for its k as above), or hold
                no router at all (strict or not: such a block would force nothing), or (strict)
                hold rows that are all -1, every row of every router: such a block would force no
                expert and run as a plain forward (pass ``strict=False`` to route natively on purpose).
            ReplayConsumptionError: on leaving, if a router consumed too few (strict, or of routes read
                without a token count) or too many rows,
                or if no forward entered the model and no router read a row of routes that hold some (strict
                or not: what ran went around the interception, a program traced or exported while idle or a
                copy of the model, and forced nothing); in eager mode, at the forward that reads past the end of
                its rows.
            TokenMismatchError: a forward fed other tokens than its rows were recorded for, or one
                whose tokens no check saw (a forward of a model compiled whole: as the block ends).
            SessionStateError: on leaving, if the model changed inside the block (a router
                replaced or moved, a module added on the way to the routers).

        Example:
            >>> import torch, moe_replay as mr
            >>> model, ids = mr.models.build("softmax_topk"), torch.randint(0, 128, (2, 5))
            >>> with mr.attach(model) as session:
            ...     with session.capture():
            ...         _ = model(ids)
            ...     with session.replay(session.routes()):
            ...         _ = model(ids)  # the same tokens: forced
            ...     with session.replay(session.routes()):
            ...         _ = model(ids.flip(0))  # doctest: +IGNORE_EXCEPTION_DETAIL
            Traceback (most recent call last):
            moe_replay.errors.TokenMismatchError: forward 1 of this replay() was fed other tokens ...
        """
        strict = check_flag(strict, "replay(strict=)")
        self._check_attached()
        with self._block("replay()"):
            with self._replay(routes, strict):
                yield self

    @contextlib.contextmanager
    def _replay(self, routes: Routes, strict: bool) -> Iterator[None]:
        if self._replaying:
            raise SessionStateError("a replay is already running on this session; replays do not nest")
        # routes of forwards of several sizes (a generate() capture) replayed in one forward: say how to lay them out
        generated = isinstance(routes, Routes) and routes._call_rows is not None and len(routes._call_rows) > 1
        # (routes an engine reader placed by their row count alone: strict=False may not leave rows of them unread)
        untold = routes._rows_untold if isinstance(routes, Routes) and not strict else None
        self._follow_settings()  # (first: a router whose settings changed has its k and E checked at its next forward)
        routes, plan = self._check_routes(routes, strict)
        self._check_ids_settings(routes, plan)
        self._check_in_place()
        self._follow_devices()
        layers = routes._data
        with torch.inference_mode(False):  # the cursors are ordinary tensors, whatever the caller's mode
            for h, s, j in plan:
                h.replay_source = ReplaySource(layers[j], s.num_experts, _device_of(s.module or h.scope), name=h.name)
        check, stop_check = self._token_check(
            routes, [h.replay_source for h, _, _ in plan], generated, strict, [j for _, _, j in plan]
        )
        moves = MoveWatch() if self._model_ref() is not None else None
        if moves is not None and isinstance(check, FeedCheck):  # (a copy of a cache continues its lineage)
            moves.copies_to = check.copied
        stop_moves = moves.start(self._feed_wrappers) if moves is not None else None
        skeleton, calls = self._skeleton(), [h.calls for h in self._hooks]
        stop = self._watch()
        self._set(replaying=True)
        recorded = getattr(routes, "_token_choices", None) if isinstance(routes, Routes) else None
        self._choices.start_replay(
            recorded,
            getattr(routes, "_choice_forwards", None) if isinstance(routes, Routes) else None,
            getattr(routes, "_choice_places", None) if isinstance(routes, Routes) else None,
        )
        unmet = 0
        ok = False
        try:
            yield
            self._choices.finish()  # (a forward whose end its taps did not see: the rankings it took)
            self._check_unchanged("replay()", skeleton, calls)
            ok = True
        except ReplayConsumptionError as e:  # a forward that overdrew: one fed other tokens is the likelier cause
            if check is not None:
                try:
                    check.finish()
                except TokenMismatchError as mismatch:
                    raise mismatch from e
            raise
        finally:
            self._set(replaying=False)
            unmet = self._choices.end_replay()
            if stop is not None:
                stop()
            if stop_check is not None:
                stop_check()
            if stop_moves is not None:
                stop_moves()
            sources = [(h, h.replay_source) for h, _, _ in plan]
            for h, _, _ in plan:
                h.replay_source = None
        if ok and check is not None:
            check.finish()  # (before the row counts: forwards fed other tokens are why they would differ)
        # (the caches this block's forwards built, for the next block to go on from: see FeedCheck._continued; with
        # those the blocks before it built from the same capture, which it did not have: interleaved decode loops
        # replayed one forward per block go on from caches built blocks before)
        before, self._replay_built = (
            self._replay_built,
            (
                (check._built, check.origin[0], check._made_whole)
                if ok and type(check) is FeedCheck and check.origin is not None
                else None
            ),
        )
        if before is not None and self._replay_built is not None and before[1] is self._replay_built[1]:
            self._replay_built[0].keep_older(before[0])
            self._replay_built[2].keep_older(before[2])
        held = [src for _, src in sources if src is not None]
        every = [(h, src) for h, src in sources if src is not None]
        # (a forward that entered the model, refused by either watch or not, was seen: none went around it alone; so
        # was one that ran a router, on a part of the model, of no token: nothing to read there)
        entered = (
            (moves.entered if moves is not None else 0)
            + (check.forwards if check is not None else 0)
            + sum(h.calls != c for h, c in zip(self._hooks, calls, strict=False))
        )
        if not strict:  # unconsumed rows are fine; an overdraw never is (eager forwards raise at once)
            sources = [(h, src) for h, src in sources if src is not None and src.read_by_device]
        used = _read_counters([src.consumed for _, src in sources if src is not None]) if ok and sources else []
        if ok and not entered:  # (the device's counts of what compiled code or a graph read: read once, above)
            _check_forced(held, strict, any(used))
        if ok and sources:
            bad = [
                (h.name, u, src.num_rows)
                for (h, src), u in zip(sources, used, strict=True)
                if src is not None and (u > src.num_rows or (strict and u != src.num_rows))
            ]
            if bad and not strict:
                detail = "; ".join(f"'{n}' read {u} of {r} rows" for n, u, r in bad[:6])
                raise ReplayConsumptionError(
                    f"replay read past the end of its routes in compiled code or a CUDA graph: {detail}"
                    + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
                    + ". The tokens past the end were not given recorded experts (a compiled read is clamped to a "
                    "padding row, where no forward can raise): their outputs are not a replay. strict=False allows "
                    "rows left unconsumed, never too few; slice the forwards to the routes, or pass longer routes"
                )
            if bad:
                detail = "; ".join(f"'{n}' consumed {u} of {r} rows" for n, u, r in bad[:6])
                raise ReplayConsumptionError(
                    f"replay ended with unconsumed or overdrawn routes: {detail}"
                    + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
                    + ". Each forward consumes one row per token; run the forwards the routes were "
                    f"recorded for, slice the routes, or pass strict=False. {_GENERATE_HINT}"
                )
        if ok and untold is not None and every:
            _check_untold_rows(every, dict(zip((id(src) for _, src in sources), used, strict=False)), untold)
        # (every row consumed, yet a recorded choice of the tokens reaching the routers never made: nothing showed
        # the routers were fed the tokens their rows were recorded on)
        if ok and unmet and recorded is not None and every:
            read = _read_counters([src.consumed for _, src in every])  # (read only here: a choice went unmade)
            if all(u == src.num_rows for (_, src), u in zip(every, read, strict=True)):
                raise ChoiceLog.unmet_error(unmet, len(recorded))

    def _token_check(
        self,
        routes: Routes,
        sources: Sequence[ReplaySource | None],
        generated: bool,
        strict: bool,
        layers: Sequence[int],
    ) -> tuple[FeedCheck | None, Callable[[], None] | None]:
        """The check that each forward of the model is fed the tokens its rows were recorded for (where known);
        ``layers``: the routes' router of each source."""
        model = self._model_ref()
        held = [src for src in sources if src is not None]
        if model is None or not held:
            return None, None
        if routes._router_ids is not None:  # (each router's own ids: its rows are not one per token of a forward)
            if not strict and _device_of(model).type != "cpu":
                # (its ids are on the device: not read back at no sync; each router's calls are checked forward by
                # forward where the routes know them; the routers the strict check compares only: a router of a
                # stream of its own, its ids unknown, not)
                ids_of = routes._router_ids
                calls = _router_call_check(routes, sources, layers, generated, lambda j: bool((ids_of[j] != -1).any()))
                if calls is None:
                    return None, None
                return calls, calls.start(self._feed_wrappers, held)
            # (a router of a stream of its own, every id unknown, a decoder's beside an encoder's: read unchecked, as
            # before; the forwards' order is checked by the others)
            known = [
                (src, j)
                for src, j in zip(sources, layers, strict=True)
                if src is not None and bool((routes._router_ids[j] != -1).any())
            ]
            wants = {id(src): routes._router_ids[j] for src, j in known}
            scopes = {h.name: h.scope for h in self._hooks}
            each = RouterFeedCheck(
                wants,
                _GENERATE_HINT if generated else "",
                device_ids=strict,
                scopes={id(src): scopes[src.name] for src, _ in known if src is not None and src.name in scopes},
            )
            if routes._router_calls is not None:  # (each router's calls in each forward: checked as it reads)
                each.know_router_calls({id(src): routes._router_calls[j] for src, j in known})
            return each, each.start(self._feed_wrappers, [src for src, _ in known])

        def position() -> int | None:  # the row the routers read next, where the host counts their reads
            # (in C, no frame per router: it runs at every forward)
            return None if any(map(_READ_BY_DEVICE, held)) else max(map(_HOST_CONSUMED, held))

        # (ids on a device, which strict=False never reads back: checked as routes of no ids are, by the host's count
        # of the routers' reads, so that each forward still makes the calls of the captured forward it replays)
        ids_unread = routes._token_ids is not None
        if routes._token_ids is None or (not strict and _device_of(model).type != "cpu"):
            # (a capture's rows: in the routers' order; or rows whose ids, unread, would tell their order)
            kept = routes._routers_order or routes._order_untold or ids_unread
            # (rows that know their place in their tokens' order are checked against each forward's order by it; and
            # each forward begins with its routers in step, where every router holds as many rows)
            places = routes._layout_pos if len(set(routes.tokens_per_layer)) == 1 and not ids_unread else None
            layout = places
            if places is None and routes._seq_pos is not None and len(set(routes.tokens_per_layer)) == 1:
                # a capture's rows whose ids were dropped (with_token_ids(None): other tokens may take them), not laid
                # out: each still holds the place in its sequence it was recorded at, and is forced only there
                places = _places_of_capture(routes._seq_pos) if not ids_unread else None
            captured = places is not None and layout is None
            if places is not None and routes.num_layers:
                # (a sequence's rows that force nothing, -1 padding of its own a mask may mark padding: not known there)
                places = torch.where((places >= 0) & routes.missing.all(dim=1), -2, places)
            order = OrderCheck(
                hint=_GENERATE_HINT if generated else "",
                rank=None if ids_unread else routes._token_rank,
                position=position,
                kept=kept,
                places=places,
                device_ids=strict,
                layout=layout,
            )
            order.scope_of = self._scope_of(held)
            order.captured = captured
            if layout is not None and routes._seq_pos is not None and routes._seq_pos.numel() == layout.numel():
                order.recorded = _places_of_capture(routes._seq_pos)
            if len({src.num_rows for src in held}) == 1:  # (every router in step: each forward's calls are checked)
                call_rows, forward_calls = routes._call_rows, routes._forward_calls
                own = routes._router_calls
                if call_rows is None and own is not None and own[0] is not None and all(c == own[0] for c in own):
                    # (the same calls of every router, kept router by router: slices of a forward cut through, joined
                    # again in another order, make no calls of a captured forward)
                    call_rows, forward_calls = own[0]
                order.know_calls(call_rows, forward_calls)
                return order, order.start(self._feed_wrappers, held)
            stop_order = order.start(self._feed_wrappers, [])
            # (routers of other row counts: each one's calls are checked forward by forward, where the routes know them)
            order.each_router = _router_call_check(routes, sources, layers, generated, lambda j: True)
            if order.each_router is None:
                return order, stop_order
            stop_calls = order.each_router.start(self._feed_wrappers, held)

            def stop_both() -> None:
                stop_order()
                stop_calls()

            return order, stop_both

        # (device ids are read back when the block ends: a strict replay syncs there anyway, strict=False never does)
        # the rows recorded at prompt padding (mask 0; their id -1, unless since given one): fed no token of a sequence
        ids, fed_mask = routes._token_ids, routes._fed_mask
        padding = (fed_mask == 0) & (ids < 0) if fed_mask is not None and fed_mask.shape == ids.shape else None
        check = FeedCheck(
            ids,
            position,
            hint=_GENERATE_HINT if generated else "",
            device_ids=strict,
            padding=padding,
            places=routes._seq_pos,
            origin=_rows_origin(routes),
            before=self._replay_built,
            lineage=routes._lineage,
        )
        check.scope_of = self._scope_of(held)
        check.know_calls(routes._call_rows, routes._forward_calls)
        return check, check.start(self._feed_wrappers, held)

    def _scope_of(self, held: Sequence[ReplaySource]) -> dict[int, int] | None:
        """Each replay source's router scope (by ``id``), by the source's ``id``, where a level of the model reaches
        some of its routers only (one model of a holder of several, each called on its own: its forwards read the rows
        of its routers alone); None where every level reaches every router."""
        if all(w.below is None for w in self._feed_wrappers):
            return None
        scopes = {h.name: h.scope for h in self._hooks}
        return {id(src): id(scopes[src.name]) for src in held if src.name in scopes}

    def _install_feed_levels(self, model: nn.Module) -> None:
        """A forward of the session's on each module a forward of the model enters on its way to the routers (see
        :func:`~moe_replay._feeds.feed_levels`): the capture and replay blocks see the model's forwards there."""
        scopes = [h.scope for h in self._hooks]
        for module in feed_levels(model, scopes):
            own = module.__dict__.get("forward", _MISSING)
            if isinstance(own, FeedForward) and own.module is module:
                # another attached session's (one on the base model, one on the whole): theirs serves both, and
                # stays until the last of them detaches, whichever that is
                own.users += 1
                own.owners.append(self._owner)
                inside = {id(m) for m in module.modules()}
                own.scopes.extend(s for s in scopes if id(s) in inside and all(s is not t for t in own.scopes))
                if own.below is not None:  # (one model of a holder: this session's routers in it too)
                    own.below = own.below | {id(s) for s in scopes if id(s) in inside}
                self._feed_installed.append((module, _MISSING))  # (what it gives back is read at detach)
                self._feed_wrappers.append(own)
                continue
            if isinstance(own, ClassForward) and own.module is module:  # (a copy of an attached model's)
                own = _MISSING
            wrapper = _reused(module, FeedForward, module, None if own is _MISSING else own)
            wrapper.owners.append(self._owner)
            inside = {id(m) for m in module.modules()}
            # (one model of a holder of several, each called on its own: its forwards reach its routers alone, see
            # feed_levels)
            wrapper.scopes.extend(s for s in scopes if id(s) in inside)
            if len(wrapper.scopes) < len(scopes):
                wrapper.below = frozenset(map(id, wrapper.scopes))
            module.forward = wrapper
            self._feed_installed.append((module, own))
            self._feed_wrappers.append(wrapper)
        for wrapper in self._feed_wrappers:  # (a batch given as one mapping is read only where no level lies inside)
            inside = {id(m) for m in wrapper.module.modules() if m is not wrapper.module}
            if any(id(o.module) in inside for o in self._feed_wrappers):
                wrapper.levels_inside = True
        one_stream(self._feed_wrappers)  # (an encoder's stack below its encoder-decoder: fed one token stream)

    # ------------------------------------------------------------- scores
    @_block_method("keep_scores()")
    def keep_scores(self) -> Iterator[RouterScores]:
        """Keep, for every router decision, the scores it was made on and the experts used.

        Works in any state (idle, capture, replay); the scores keep their autograd graph, for
        :func:`~moe_replay.load_balancing_loss`. Eager mode: under ``torch.compile`` the
        decision happens inside the compiled graph and nothing is kept.

        Each forward of the model is noted with its ``[batch, positions]`` and the order its
        routers see the tokens in, told as a capture tells it (at the first forward of a
        batch of several sequences that can show it, by running the model twice more up to
        its last router, once per model: later blocks take it from there), so that a mask
        of the batch's tokens weighs each kept row's own token
        (:meth:`RouterScores.row_mask`).

        Yields:
            A :class:`RouterScores`, filled while the context is open.

        Example:
            The load-balancing loss of the experts a replay forced:

            >>> import torch, moe_replay as mr
            >>> model = mr.models.build("softmax_topk")
            >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
            >>> with mr.attach(model) as session:
            ...     with session.capture():
            ...         _ = model(x)
            ...     with session.replay(session.routes()), session.keep_scores() as kept:
            ...         loss = model(x, labels=x).loss
            >>> aux = mr.load_balancing_loss(kept.scores, kept.indices)
            >>> aux.requires_grad
            True
        """
        self._check_attached()
        with self._block("keep_scores()"):
            if any(h.seen is not None for h in self._hooks):
                raise SessionStateError("scores are already being kept on this session; keep_scores() does not nest")
            kept = RouterScores(self.names)
            for h in self._hooks:
                h.seen = kept._calls[h.name]
            # (each forward of the model, with the order its routers see its tokens in: a mask of the batch's tokens
            # is put in the order of the kept rows with it)
            stop_notes = OrderNote(kept._began, kept._ended, kept._raised).start(self._feed_wrappers)
            try:
                yield kept
            finally:
                stop_notes()
                kept._ended()
                for h in self._hooks:
                    h.seen = None

    # ------------------------------------------------------------- dry run
    def verify(self, *args: Any, **kwargs: Any) -> VerifyReport:
        """Prove every router's decision on one forward ``model(*args, **kwargs)``, without gradients.

        Each router must run, and which of its calls decides is established by effect (the first
        forward under a session does this once per router; see :mod:`moe_replay.evidence`): a
        call whose choice is changed must change the output, calls whose choice does not reach the
        output (logging, a stable-softmax ``max``) are named and ignored. Nothing is recorded, and the model is
        left as it was: what the forward changes is put back after it (in train mode a norm's running statistics and
        ``num_batches_tracked``, counters in buffers or attributes, the random streams dropout draws from, a hook its
        code registers at a first forward), as after the runs that establish a decision.

        The forward runs eagerly, also on a compiled model (``torch.compile``'s wrapper,
        ``model.compile()``, compiled layers): compiled code cannot establish a decision, so
        this is the eager forward a compiled model needs once after ``attach``.

        The arguments are the model's: what its forward raises on them (its own ``TypeError`` for a keyword it
        does not take, as ``model(*args, **kwargs)`` raises it) comes out as it is, the model and the session left
        as they were.

        On a terminal a progress bar counts the routers the forward reaches (``MOE_REPLAY_PROGRESS=0``
        hides it, ``MOE_REPLAY_PROGRESS=1`` shows it where stderr is no terminal); it changes nothing else.

        Returns:
            A :class:`VerifyReport`: per router, how many times it ran (it is a ``dict`` of those
            counts), ``report.evidence[name]``, which call decides and why, and ``report.idle``, the
            routers that ran on no token (their decision is established at a later forward that
            reaches them). ``print`` it.

        Raises:
            InvalidArgumentError: no input was given (``session.verify()``): the forward needs an
                example batch to run the routers on.
            UnsupportedRouterError: a router did not run, no call of its forward decides, or no
                router chose for any token (an input with no tokens).

        Example:
            >>> import torch, moe_replay as mr
            >>> model = mr.models.build("softmax_topk", num_layers=1)
            >>> with mr.attach(model) as session:
            ...     report = session.verify(torch.zeros(1, 4, dtype=torch.long))
            >>> report["layers.0.mlp.router"]
            1
        """
        self._check_attached()
        if not args and not kwargs:  # the model's own error would say only that forward() lacks an argument
            raise InvalidArgumentError(
                "session.verify() was called without an input: it runs one forward, model(*args, **kwargs), "
                "and proves each router's decision on it. Pass an example batch as you would call the model, "
                "e.g. session.verify(input_ids) or session.verify(**inputs)"
            )
        if self._capturing or self._replaying:
            raise SessionStateError("verify() runs on an idle session, outside capture() and replay()")
        model = self._model_ref()
        if model is None:
            raise SessionStateError("the model of this session no longer exists")
        if _runs_nothing(model):
            held = [name for name, child in model.named_children() if not _runs_nothing(child)]
            raise InvalidArgumentError(
                f"session.verify() runs model(*args, **kwargs), but the module this session is attached to "
                f"({type(model).__name__}) has no forward of its own: it only holds "
                f"{', '.join(repr(n) for n in held[:4]) or 'other modules'}. Run one eager forward of each model it "
                "holds instead (e.g. under torch.no_grad(), holder.policy(input_ids)): that establishes their routers "
                "as verify() would"
            )
        with self._block("verify()"):
            self._check_in_place()
            self._follow_settings()
            for h in self._hooks:
                h.calls = 0
                h.verifying = True
            watch = OrphanWatch(model, self._scopes(), self._widths(), self._excluded)
            watch.seed(args, kwargs)  # (the example batch: its tokens and features are no experts)
            ran: set[int] = set()  # the modules this forward runs (the others are watched at their first run)
            scopes = {id(h.scope) for h in self._hooks}
            bar = Progress(len(scopes), "moe_replay: establishing routers")  # (shown on a terminal only)

            def _ran(module: nn.Module, args: Any) -> None:
                watch.entered(module, args)
                key = id(module)
                if key in scopes and key not in ran:
                    bar.update()  # (a router reached: the one before it is established)
                ran.add(key)

            seen = register_module_forward_pre_hook(_ran)
            returns = watch.follow_returns()  # (a later choice by a router's returned values is refused as at capture)
            try:  # eagerly, also where the model or some of its modules are compiled: the decisions are
                # established by running forwards, which compiled code cannot (the fix every refusal names); the
                # model is left as it was (a norm's running statistics, a step count, the random streams)
                with left_as_it_was(model, "verify()'s forward"), torch.no_grad(), EAGER, watch:
                    model(*args, **kwargs)
            finally:
                seen.remove()
                returns.remove()
                bar.close()
                for h in self._hooks:
                    h.verifying = False
        never = [h.name for h in self._hooks if h.calls == 0]
        if never:
            raise UnsupportedRouterError(
                f"routers {never} did not run in this forward: they are not on the forward path (a module "
                "built twice, or replaced after loading?); exclude them or name the right ones with include="
            )
        watch.check()
        with torch.no_grad():
            evidence = {h.name: h.evidence[h.mode()] for h in self._hooks if h.mode() in h.evidence}
        deciding = [h.name for h in self._hooks if h.decision != "lookup"]
        idle = [n for n in deciding if n not in evidence]
        if idle and len(idle) == len(deciding):
            raise UnsupportedRouterError(
                f"no router chose experts for any token in this forward ({idle[:4]} ran on none: an input with no "
                "tokens?), so nothing was established. Verify on an example with tokens"
            )
        # a capture need not watch this model's forward again
        self._mark_watched(model, "", watch.not_run(ran), watch.choosers)
        return VerifyReport({h.name: h.calls for h in self._hooks}, evidence, idle)


_GENERATE_HINT = (
    "Routes captured around generate() hold the prompt once and one row per new token in generation order (the last "
    "token unrouted): for a teacher-forced forward convert them with mr.split_generation(...) and lay them out with "
    "mr.BatchLayout"
)


class _Skeleton:
    """The modules on the paths from a model to its router scopes, and the children of each, held weakly.

    A module added or replaced there (a new MoE layer in the layer list, a dense MLP swapped for an
    MoE block, a head added to the model) changes it, so the watch runs again; what lies off those
    paths is not compared (a deep walk of every module at each block would cost more than a forward
    of a small model).
    """

    __slots__ = ("_code", "_hooks", "_parts", "_snaps", "choosers", "not_run")

    def __init__(self, model: nn.Module, scopes: Sequence[str]) -> None:
        #: paths of the modules in MoE blocks that the watched forward did not run, and no run of them since
        self.not_run: set[str] = set()
        #: paths of the modules that chose which tokens reach their routers (tapped at every block)
        self.choosers: tuple[str, ...] = ()
        modules = _on_the_way(model, scopes)
        self._parts = [
            (weakref.ref(m), tuple(weakref.ref(c) for c in m._modules.values() if c is not None)) for m in modules
        ]
        self._hooks = (_scope_hooks(model, scopes), _way_hooks(modules))
        self._code = _code_on_the_way(modules)
        #: each class's dict as the code was read (see :func:`_class_snapshot`), with its group in ``_code``
        self._snaps = _class_snapshots(modules, self._code)

    def holds(self, model: nn.Module, scopes: Sequence[str]) -> bool:
        """Is ``model`` still made of the modules this skeleton was taken from, on the way to ``scopes``, with
        the same forward hooks on the scopes (a hook runs outside a scope's intercepted forward: one added
        since may choose the experts again) and the same code on the way (a block's method patched since may
        take a top-k of its own over the router's scores, and dispatch by it)?"""
        modules = _on_the_way(model, scopes)
        if len(modules) != len(self._parts) or (_scope_hooks(model, scopes), _way_hooks(modules)) != self._hooks:
            return False
        for m, (ref, kids) in zip(modules, self._parts, strict=True):
            now = [c for c in m._modules.values() if c is not None]
            if ref() is not m or len(now) != len(kids) or any(r() is not c for r, c in zip(kids, now, strict=True)):
                return False
        return _same_code(self._code, _code_on_the_way(modules, self._snaps, self._code))


def _way_hooks(modules: Sequence[nn.Module]) -> tuple[tuple[int, ...], ...]:
    """The handles of the forward hooks and pre-hooks of one's own on ``modules`` (those on the way to the routers)
    and on their children, and of the global module forward hooks (``register_module_forward_hook``), in order. A
    hook added since the watched forward ran outside it: one on an MoE block may dispatch the block's tokens again by
    a top-k of its own, the forced router's choice dropped."""
    out = [tuple(k for k, h in _torch_compat.global_forward_hooks.items() if not _ours_hook(h))]
    for m in modules:
        for c in (m, *m._modules.values()):
            if c is not None:
                hooks, pre = c.__dict__.get("_forward_hooks"), c.__dict__.get("_forward_pre_hooks")
                if type(hooks) in _HOOK_DICT_TYPES and type(pre) in _HOOK_DICT_TYPES and not hooks and not pre:
                    out.append(())  # (none: the common case, read without a walk)
                    continue
                out.append(tuple(k for d in _HOOK_DICTS for k, h in getattr(c, d, {}).items() if not _ours_hook(h)))
    return tuple(out)


def _ours_hook(hook: Any) -> bool:
    """Is ``hook`` moe_replay's own (a guard, the watch's or a feed's note), not the user's?"""
    if is_guard(hook) or _ours(hook):
        return True
    module = getattr(hook, "__module__", "") or ""
    return module == "moe_replay" or module.startswith("moe_replay.")


_Code = tuple[tuple[str, int, Any], ...]  # (the code one module or class holds, by key: see _code_on_the_way)
#: a class's dict as its code was read, and what was read (:func:`_class_snapshot`)
_Snap = tuple[Any, tuple[Any, ...], list[int], list[Any], list[Any], _Code]


def _code_on_the_way(
    modules: Sequence[nn.Module], snaps: Sequence[_Snap] = (), then: Sequence[_Code] = ()
) -> tuple[_Code, ...]:
    """The code held by ``modules`` (those on the way to the routers), as it is now: each module's own callable
    attributes (a ``forward`` or a method set on the instance), and the attributes of its classes up to
    ``nn.Module``, each by identity (held weakly where it can be). A method patched on one of them, or on its class,
    after a forward passed the watch is code that forward never ran: a block whose ``route`` now takes a top-k of
    its own over the router's scores would dispatch by it, neither recorded nor forced. So are the module-level
    functions named by the ``forward`` of each class, and by every method of a class outside torch and transformers
    (a helper the block calls, replaced). moe_replay's own wrappers are left out: a later session brings new ones.

    ``snaps``: the classes' snapshots (:func:`_class_snapshots`) taken with an earlier result. A class whose dict
    still matches its snapshot, every value it held alive, holds the code it held then: its group is that result's
    (the same object: :func:`_same_code` compares it as such), not read again entry by entry."""
    out: list[_Code] = []
    for m in modules:
        d = vars(m)
        out.append(tuple(_held(k, v) for k in _own_keys(d) if callable(v := d[k]) and not _ours(v) and not _torchs(v)))
    for i, klass in enumerate(_classes_of(modules)):
        group = snaps[i][5] if i < len(snaps) and _unchanged_class(klass, snaps[i]) else None
        if group is None:
            group = (
                ("", id(klass), None),
                *(_held(k, v) for k, v in vars(klass).items() if callable(v) or isinstance(v, _DESCRIPTORS)),
            )
        out.append(group)
        for fn in _helpers_read(klass):
            out.append(tuple(_held(name, fn.__globals__[name]) for name in _globals_named(fn)))
    return tuple(out)


_DEREF = weakref.ref.__call__  # (what a weak reference holds, called in C: map(_DEREF, refs))


def _class_snapshots(modules: Sequence[nn.Module], code: Sequence[_Code]) -> list[_Snap]:
    """The dict of each class of ``modules`` as it is now, cheap to compare again (in C, no entry read in Python):
    the class, its keys in order, the id and the type of each value, and the weak references and the group of
    ``code`` (:func:`_code_on_the_way` of ``modules``, just read) that hold the code read from it. The class and the
    types are held weakly, as the code is (a class whose method closes over the model would keep it alive)."""
    out: list[_Snap] = []
    for klass in _classes_of(modules):
        group = next(g for g in code[len(modules) :] if g[:1] == (("", id(klass), None),))
        space = vars(klass)
        refs = [ref for _, _, ref in group[1:] if ref is not None]
        kinds = [weakref.ref(type(v)) for v in space.values()]
        out.append((weakref.ref(klass), tuple(space), list(map(id, space.values())), kinds, refs, group))
    return out


def _unchanged_class(klass: type, snap: _Snap) -> bool:
    """Does ``klass``'s dict match ``snap``: the same class, the same keys in order, each value of the same id and
    type, and each callable or descriptor read from it then still alive? Then it holds those same objects (a value
    that took the id of a dead one is caught by its weak reference; one with none is compared by id alone, as
    :func:`_same_code` does), which of them are code is read from their types, and the code read from it holds."""
    space = vars(klass)
    return (
        snap[0]() is klass
        and tuple(space) == snap[1]
        and list(map(id, space.values())) == snap[2]
        and all(map(operator.is_, map(type, space.values()), map(_DEREF, snap[3])))
        and None not in map(_DEREF, snap[4])
    )


def _classes_of(modules: Sequence[nn.Module]) -> list[type]:
    """The classes of ``modules`` and their bases up to ``nn.Module`` (each once, in order): the code they run."""
    classes: dict[type, None] = {}
    for m in modules:
        for klass in type(m).__mro__:
            if klass is nn.Module or klass is object or klass in classes:
                break
            classes[klass] = None
    return list(classes)


def _helpers_read(klass: type) -> list[types.FunctionType]:
    """The functions of ``klass`` whose module-level helpers are compared: its ``forward``, and every method of a
    class outside torch, transformers and moe_replay."""
    if _library(getattr(klass, "__module__", "") or ""):  # (its forward alone: one lookup, not a walk of its dict)
        forward = vars(klass).get("forward")
        return [forward] if isinstance(forward, types.FunctionType) else []
    return [v for v in vars(klass).values() if isinstance(v, types.FunctionType)]


def _globals_named(fn: types.FunctionType) -> list[str]:
    """The names of the functions ``fn`` names as globals (a module-level helper its forward calls)."""
    space = fn.__globals__
    return [
        name
        for name in fn.__code__.co_names
        if isinstance(space.get(name), types.FunctionType) and not _library(space[name].__module__ or "")
    ]


def _code_places(modules: Sequence[nn.Module]) -> tuple[list[Any], list[str]]:
    """Where the code ``modules`` hold sits, as ``(places, keys)`` (``places[i][keys[i]]``): each callable set on
    one of them, and each module-level helper named by the code of their classes (see :func:`_code_on_the_way`).
    A replacement there between two forwards of a block is read at the second (see :meth:`_Owner.moved`)."""
    places: list[Any] = []
    keys: list[str] = []
    for m in modules:
        d = m.__dict__
        for k in _own_keys(d):
            if callable(d[k]):
                places.append(d)
                keys.append(k)
    for klass in _classes_of(modules):
        for fn in _helpers_read(klass):
            for name in _globals_named(fn):
                places.append(fn.__globals__)
                keys.append(name)
    return places, keys


def _torchs(value: Any) -> bool:
    """Is ``value`` torch's own code set on a module (``module.compile()``'s compiled call, a ``functools.partial``
    of ``torch.utils.checkpoint.checkpoint``): it runs the module's code as it is, nothing of its own?"""
    fn = getattr(value, "func", value)
    module = getattr(fn, "__module__", "") or ""
    return module.split(".", 1)[0] == "torch"


def _library(module: str) -> bool:
    """Code of torch, transformers or moe_replay itself (not read for the helpers it names)."""
    return module.split(".", 1)[0] in ("torch", "transformers", "moe_replay")


_DESCRIPTORS = (property, staticmethod, classmethod, functools.partialmethod)


def _held(key: str, value: Any) -> tuple[str, int, Any]:
    """``value`` at ``key`` by identity: its id, and a weak reference where it takes one (an id alone could be
    reused once the value is gone), compared by :func:`_same_code`."""
    try:
        ref: Any = weakref.ref(value)
    except TypeError:
        ref = None
    return key, id(value), ref


def _same_code(
    then: tuple[tuple[tuple[str, int, Any], ...], ...], now: tuple[tuple[tuple[str, int, Any], ...], ...]
) -> bool:
    """Do two :func:`_code_on_the_way` results name the same code (the same keys, each the same live object)?"""
    if len(then) != len(now):
        return False
    for a, b in zip(then, now, strict=True):
        if a is b:  # (a class's group, taken as it was: its dict unchanged, its code alive, see _unchanged_class)
            continue
        if len(a) != len(b):
            return False
        for (k, i, ref), (k2, i2, _) in zip(a, b, strict=True):
            if k != k2 or i != i2 or (ref is not None and ref() is None):
                return False
    return True


def _ours(value: Any) -> bool:
    """Is ``value`` one of moe_replay's own wrappers (a forward it installed)?"""
    module = getattr(type(value), "__module__", "") or ""
    return module == "moe_replay" or module.startswith("moe_replay.")


#: The hook dicts of a module whose hooks run around its forward (outside a scope's intercepted forward).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_DICT_TYPES = (dict, collections.OrderedDict)  # (what torch keeps them in)


def _router_ids(routes: Routes, feeds: FeedRecord, calls: Sequence[tuple[tuple[int, int], ...] | None]) -> None:
    """Each router's own token id of each of its rows, where no one id per row fits them all (one MoE block called at
    several layers, a router also called on hidden states of one's own): ``Routes._router_ids``. Where the routers'
    calls differ and a forward was fed ids that a router's rows do not line up with (a call on a part of its
    forward's tokens), why they were lost (``Routes._ids_lost``): a replay of such routes is refused, never taken
    unchecked. A router none of whose calls is on as many rows as a forward was fed tokens (a decoder's canvas beside
    an encoder's tokens) routes a stream of its own: its ids are unknown (-1), the other routers' are kept."""
    if not any(f.ids is not None for f in feeds.forwards):
        return  # (no forward's ids kept: nothing to check, nothing lost)
    per = []
    apart = None  # (a router told apart by a forward's calls alone, see below)
    lost_here: list[str] = []  # (why each router whose ids were lost lost them: its rows are LOST_ID, see below)
    fewer = _fewer_untold(feeds, calls, routes.names)
    for i, (name, c) in enumerate(zip(routes.names, calls, strict=True)):
        ids, mask = feeds.rows(c, i, outside=True)
        if ids is None and len(set(calls)) == 1:
            # (routers whose rows are all alike and follow no forward's tokens: unknown, as they always were, unless a
            # forward fed ids called them on every one of its tokens and again on other rows, or every router on
            # fewer rows than its tokens: refused, as below)
            routes._ids_lost = _part_call(feeds, c, i, name) or _unpadded_untold(feeds, c, i, name) or fewer
            return
        # (rows of no forward's tokens, or of some forwards' only: a forward may have called it on the tokens its
        # mask keeps in an order not told, whose rows line up with none)
        lost = (_unpadded_untold(feeds, c, i, name) or fewer) if ids is None else None
        if lost is not None:  # (not a stream of its own: the tokens of a forward its mask keeps, in an untold order)
            lost_here.append(lost)
            per.append(torch.full((routes.tokens_per_layer[i],), LOST_ID, dtype=torch.long))
            continue
        if ids is None and c is not None and not {n for n, _ in c} & {f.count for f in feeds.forwards if f.count}:
            # (no call of it on as many rows as a forward was fed tokens: it routes a stream of its own, a decoder's
            # canvas beside an encoder's tokens: its rows' ids unknown, as they always were, the others' checked)
            per.append(torch.full((routes.tokens_per_layer[i],), -1, dtype=torch.long))
            continue
        if ids is None and c is not None and feeds.apart(c, i):
            # (a forward called it on other row counts alone than it was fed tokens: a stream of its own too, whose
            # calls in another forward are as long as that one's tokens by chance, a canvas as long as a prompt. Its
            # ids unknown where the other routers' are checked; else they were lost, as below)
            apart = apart or (
                f"router '{name}' made calls ({', '.join(f'{n} rows x {k}' for n, k in c[:4])}) that are not each on "
                "every token of one forward of the model nor outside every forward, and no other router's are"
            )
            per.append(torch.full((routes.tokens_per_layer[i],), -1, dtype=torch.long))
            continue
        if ids is None:
            runs = ", ".join(f"{n} rows x {k}" for n, k in (c or ())[:4])
            lost_here.append(
                f"router '{name}' made calls ({runs}) that are not each on every token of one forward of the model "
                "nor outside every forward (a call on a part of a forward's tokens?)"
            )
            per.append(torch.full((routes.tokens_per_layer[i],), LOST_ID, dtype=torch.long))
            continue
        if mask is not None:
            ids = torch.where(mask == 0, PADDING_ID, ids)  # prompt padding: the token of no sequence
        per.append(ids)
    lost_rows = [bool((v == LOST_ID).all()) and v.numel() > 0 for v in per]
    routes._ids_lost = lost_here[0] if lost_here else None
    if any(bool((v != -1).any()) for v, lost in zip(per, lost_rows, strict=True) if not lost):
        # (the other routers' ids kept: a replay of the routers whose ids were lost is refused (their rows LOST_ID,
        # which select keeps with them), one of the others alone is checked)
        routes._router_ids = tuple(per)
    elif apart is not None:
        routes._ids_lost = routes._ids_lost or apart


def _unpadded_untold(
    feeds: FeedRecord, calls: tuple[tuple[int, int], ...] | None, router: int, name: str
) -> str | None:
    """Why the token ids of router ``router`` (``name``, whose calls were ``calls``) are lost, where a forward fed ids
    with padding called it on as many rows as the tokens its attention mask keeps, fewer than it was fed, at a level
    whose routers were not told to see only those (the order runs could not run at such a forward: a filled cache,
    several processes, a first sequence of one token), or as many as the positions it marks as padding (a mask of
    True at padding, read as one of 1 at each token): which row is which token is not told. None where none did."""
    sizes = [n for n, c in calls or () for _ in range(c)]
    for f in feeds.forwards:
        if f.ids is None or f.count <= 0 or f.calls is None or f.end is None or len(f.calls) <= router:
            continue
        made = sizes[f.calls[router] : f.end[router]]
        if not made or any(n == f.count for n in made):
            continue
        kept = f.kept()
        if kept is not None and kept != f.count and all(n == kept for n in made):
            return (
                f"router '{name}' was called in a forward of the model on {kept} rows, as many as the tokens its "
                f"attention mask keeps of the {f.count} it was fed (the padding taken out before the routers?), in an "
                "order the token-order runs could not tell at that forward (a cache that holds tokens, several "
                "processes, a first sequence of one token, a mask on a device once the order was told at a forward "
                "without padding, or an order of the model's own: its sequences packed by length); capture a forward "
                "of the same model with padding that they can run at first"
            )
        if kept is not None and 0 < kept < f.count and all(n == f.count - kept for n in made):
            return (
                f"router '{name}' was called in a forward of the model on {f.count - kept} rows, as many as the "
                f"positions its attention mask holds 0 (False) at, of the {f.count} it was fed: a mask of True at "
                "padding (as a key padding mask is), the padding taken out before the routers? Which row is which "
                "token is not told; pass the model an attention_mask of 1 at each token and 0 at padding"
            )
    return None


def _fewer_untold(
    feeds: FeedRecord, calls: Sequence[tuple[tuple[int, int], ...] | None], names: Sequence[str]
) -> str | None:
    """Why the routers' token ids are lost, where a forward fed ids called every router it called on fewer rows than
    it was fed tokens, each call (padding taken out before the routers by a mask the capture did not find: one of a
    layout of its own, or given at a forward whose order the runs could not tell), in no order told: which row is
    which token is not told. A router beside them called on every token (an encoder's, beside a decoder's canvas)
    shows the forward's tokens reach the routers: no such forward. None where none did."""
    sizes = [[n for n, k in c or () for _ in range(k)] for c in calls]
    for f in feeds.forwards:
        if f.ids is None or f.count <= 0 or f.calls is None or f.end is None:
            continue
        if len(f.calls) < len(calls) or len(f.end) < len(calls):
            continue
        made = [(name, s[f.calls[i] : f.end[i]]) for i, (name, s) in enumerate(zip(names, sizes, strict=True))]
        made = [(name, m) for name, m in made if m]
        if made and all(0 < n < f.count for _, m in made for n in m):
            name, m = made[0]
            return (
                f"router '{name}' was called in a forward of the model on {m[0]} rows, fewer than the {f.count} "
                "tokens it was fed, and so was every router that forward called (the padding taken out before the "
                "routers by a mask the capture could not find among the forward's inputs, or at a forward whose "
                "token order could not be told: one sequence, a cache that holds tokens, several processes), in an "
                "order not told; pass the model its mask as attention_mask (1 at each token, 0 at padding), and "
                "capture a forward of several padded sequences first. Or the module the session is attached to "
                "changed the ids before the model it calls (a wrapper that cuts the last token for next-token "
                "inputs): attach the session to that model, whose ids are the ones its routers see"
            )
    return None


def _part_call(feeds: FeedRecord, calls: tuple[tuple[int, int], ...] | None, router: int, name: str) -> str | None:
    """Why the token ids of router ``router`` (``name``, whose calls were ``calls``) are lost, where a forward fed ids
    called it on every one of its tokens and again on another number of rows (a block called once more on a part of
    them): the rows of the first call are those tokens', the others' are not told. None where no forward did."""
    sizes = [n for n, c in calls or () for _ in range(c)]
    for f in feeds.forwards:
        if f.ids is None or f.count <= 0 or f.calls is None or f.end is None or len(f.calls) <= router:
            continue
        made = sizes[f.calls[router] : f.end[router]]
        other = [n for n in made if n != f.count]
        if f.count in made and other:
            return (
                f"router '{name}' was called in a forward of the model on every one of its {f.count} tokens and "
                f"again on {other[0]} rows (a call on a part of its tokens?), whose tokens cannot be told"
            )
    return None


def _scope_hooks(model: nn.Module, scopes: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The handles of the forward hooks and pre-hooks on each scope module, in order (ids torch never reuses)."""
    out = []
    for scope in scopes:
        m = _module_at(model, scope)
        out.append(
            () if m is None else tuple(k for d in _HOOK_DICTS for k, h in getattr(m, d, {}).items() if not is_guard(h))
        )
    return tuple(out)


def _on_the_way_and_children(model: nn.Module, scopes: Sequence[str]) -> dict[int, nn.Module]:
    """``model``, the modules on the paths to ``scopes`` and the children of each, by id."""
    found: dict[int, nn.Module] = {}
    for m in _on_the_way(model, scopes):
        found[id(m)] = m
        for c in m._modules.values():
            if c is not None:
                found[id(c)] = c
    return found


def _on_the_way(model: nn.Module, scopes: Sequence[str]) -> list[nn.Module]:
    """``model`` and the modules on the paths to ``scopes`` (not the scopes themselves), once each, in order."""
    found: dict[int, nn.Module] = {id(model): model}
    for scope in scopes:
        m: nn.Module | None = model
        for part in scope.split(".")[:-1] if scope else ():
            m = m._modules.get(part) if m is not None else None
            if m is None:
                break
            found.setdefault(id(m), m)
    return list(found.values())


class _Missing:
    pass


_MISSING = _Missing()


def _stale_ring(hook: RouterHook) -> bool:
    """Does ``hook``'s ring hold rows of another k or E than its decision now has (kept for ``routes()``)?"""
    ring = hook.capture_ring
    return ring is not None and (ring.top_k, ring.num_experts) != (hook.top_k, hook.num_experts)


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` of ``model``, or None (``get_submodule`` without its getattr per level)."""
    held: nn.Module | None = model
    for part in path.split(".") if path else ():
        held = held._modules.get(part) if held is not None else None
    return held


def _inserted_into(old: str, new: str) -> bool:
    """Is ``new`` the path ``old`` with segments inserted (wrappers around the module or a parent)?"""
    rest = iter(new.split(".") if new else ())
    return all(part in rest for part in (old.split(".") if old else ()))


def _copy_of_router(module: nn.Module) -> bool:
    """Is ``module`` a copy of an attached router's scope (deepcopy, pickle), not attached itself?"""
    own = module.__dict__.get("forward")
    return isinstance(own, ClassForward) and own.module is module


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


def _references(scope: nn.Module, wrapper: Any) -> tuple[list[Callable[[Any], None]], list[Any], list[str]]:
    """Where the callables reachable from ``scope``'s attributes hold ``wrapper``.

    Returns setters that replace each reference (given the new value), the containers
    holding one (for :func:`_outside_referrers`), and the references no setter can reach.
    Copies of the wrapper's attributes that ``functools.update_wrapper`` made
    (``__moe_replay_hook__``, ``__wrapped__``) are found too.
    """
    hook = getattr(wrapper, "__moe_replay_hook__", _MISSING)  # (a router's wrapper; a feed level's has none)
    setters: list[Callable[[Any], Any]] = []
    containers: list[Any] = []
    opaque: list[str] = []
    seen: set[int] = set()

    def in_dict(d: dict[str, Any], depth: int) -> None:
        for key, value in list(d.items()):
            if value is wrapper:
                setters.append(lambda new, d=d, key=key: d.__setitem__(key, new))  # type: ignore[misc]
                containers.append(d)
            elif key == "__moe_replay_hook__" and value is hook:
                setters.append(lambda new, d=d, key=key: d.pop(key, None))  # type: ignore[misc]
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
                setters.append(lambda new, p=part: p.__setstate__((new, p.args, p.keywords, p.__dict__)))  # type: ignore[misc]
                containers.append(part)
            else:
                visit(part.func, depth + 1)
            for i, arg in enumerate(part.args):
                if arg is wrapper:
                    setters.append(
                        lambda new, p=part, i=i: p.__setstate__(  # type: ignore[misc]
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
                    setters.append(lambda new, c=cell: setattr(c, "cell_contents", new))  # type: ignore[misc]
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


#: The module names that torch's wrappers put inside a model's paths: FSDP1's units, ``checkpoint_wrapper``'s
#: (``apply_activation_checkpointing``), ``torch.compile``'s of a submodule.
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
#: The leading module names of wrappers around a whole model: DDP's and DeepSpeed's ``module``, PEFT's
#: ``base_model.model``, a causal LM's ``model`` around its base model (and the segments above). A prefix fit of
#: routes that do not know the routers they were recorded on may drop these, never another module name
_WRAPPER_NAMES = _WRAPPER_SEGMENTS | {"module", "base_model", "model"}


def _unwrapped(name: str) -> str:
    """``name`` without the module names torch's wrappers put inside it (see :data:`_WRAPPER_SEGMENTS`)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _unwrapped_map(names: Sequence[str], targets: Sequence[str]) -> dict[str, str] | None:
    """Each of ``names`` mapped onto the one name of ``targets`` that differs from it only by wrappers' module
    names inside the path (FSDP1 and ``checkpoint_wrapper`` wrap each layer, so no one prefix change fits);
    None where a name has no such target, or more than one, or two names would share one."""
    by_path: dict[str, list[str]] = {}
    for t in targets:
        by_path.setdefault(_unwrapped(t), []).append(t)
    out = {}
    for n in names:
        hits = by_path.get(_unwrapped(n), [])
        if len(hits) != 1:
            return None
        out[n] = hits[0]
    if len(set(out.values())) != len(out) or all(a == b for a, b in out.items()):
        return None
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
        lead, other = first[: len(first) - common], parts[: len(parts) - common]
        if any(part.isdigit() for part in (*lead, *other)):
            # an index into a module list changed, dropped or added (routes of one layer of a whole model on a
            # session of another, or of that layer): another layer, or one that no name tells, not a wrapper's prefix
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


def _check_untold_rows(sources: Sequence[tuple[Any, ReplaySource]], read: dict[int, int], reader: str) -> None:
    """A ``strict=False`` replay of routes that ``reader`` placed by their row count alone read every row.

    Such routes hold nothing else that puts each row on its token: a row too many at the front
    shifts every token's experts by one, and only the rows left over tell. ``read`` holds the
    device counts of the sources a compiled region or a graph read; the others' eager count is exact.
    """
    left = [
        (h.name, read.get(id(src), src.host_consumed), src.num_rows)
        for h, src in sources
        if read.get(id(src), src.host_consumed) < src.num_rows
    ]
    if left:
        detail = "; ".join(f"'{n}' read {u} of {r} rows" for n, u, r in left[:4])
        raise ReplayConsumptionError(
            f"replay(strict=False) left rows unread of routes {reader} read without a token count: {detail}"
            + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
            + ". Nothing but their row count places these rows on their tokens (a row too many at the front gives "
            "every token its neighbour's experts), so rows left over may mean they are shifted. Pass the reader its "
            "num_tokens= (or the tokens' ids), or slice the routes to the tokens you replay (routes[:n])"
        )


def _check_forces_some(routes: Routes, layers: list[int]) -> None:
    """Refuse a strict replay of ``routes`` whose rows for the routers it replays (``layers``) are all -1.

    A -1 row routes its token natively, so routes of such rows only would force no expert: the
    block would run as a plain forward and say nothing (the routes of a prompt vLLM served wholly
    from its prefix cache, padding alone, a slice holding only a generation's last token). Routes
    of no row are left to the consumption checks. The rows are validated: one column is read.
    """
    rows = [routes._data[j] for j in layers]
    total = sum(int(r.shape[0]) for r in rows)
    if not total or sum(_missing_rows(r, True) for r in rows) != total:
        return
    raise RoutesValidationError(
        f"every row of these routes is -1 ({total} rows over {len(rows)} router(s)): -1 means 'route this token "
        "natively', so this replay would force no expert and run as a plain forward. Replay routes that hold "
        "recorded experts (a capture's, an engine's output read with its token count), or pass strict=False to "
        "route natively on purpose"
    )


def _places_of_capture(seq_pos: torch.Tensor) -> torch.Tensor:
    """The places a capture's rows were recorded at (``Routes._seq_pos``), as :class:`~moe_replay._feeds.OrderCheck`
    reads a layout's: each row's place in its sequence, -2 where not known (a place after a cache no forward of the
    capture built is a place all the same)."""
    plain = unmarked_places(seq_pos.to(torch.long))
    return torch.where(seq_pos == -1, -2, plain)


def _rows_origin(routes: Routes) -> tuple[Any, int] | None:
    """Where the rows of ``routes`` sit in the capture they come from: (its ``_Forwards``, the row of the capture their
    first row is), or None where they are no capture's run of rows (see ``FeedCheck._continued``)."""
    if routes._cut_from is not None:
        whole, start, _ = routes._cut_from
        return whole, start
    if routes._call_rows is not None and routes._rows_picked is None and routes._joined <= 1:
        return routes._whole_forwards(), 0
    return None


def _check_forced(sources: Sequence[ReplaySource], strict: bool, device_read: bool) -> None:
    """A replay in which no forward entered the model and no router read a row, its routes holding rows: refused,
    ``strict=False`` too (a forward that entered the model and was refused, the refusal caught, was told).

    Whatever the block ran went around the interception: a program made from the model while the session was idle
    (``torch.jit.trace``, ``torch.export``, ``torch.fx.symbolic_trace``, ``make_fx``) or a copy of it runs none, and
    routes natively. ``strict=False`` allows routers left native and rows left unread
    (a partial replay), never a block of which nothing was a replay. Eager reads are counted on the host, those
    of compiled code or a graph on the device (``device_read``: some router's count there is not 0)."""
    if device_read or not any(src.num_rows for src in sources) or any(src.host_consumed for src in sources):
        return
    detail = "; ".join(f"'{src.name}' read 0 of {src.num_rows} rows" for src in sources[:4])
    raise ReplayConsumptionError(
        f"this replay{'' if strict else '(strict=False)'} forced nothing: no router read a row of its routes ({detail}"
        + (f"; +{len(sources) - 4} more" if len(sources) > 4 else "")
        + "), so whatever ran in the block routed natively. A program made from the model while the session "
        "was idle (torch.jit.trace, torch.export, torch.fx.symbolic_trace, make_fx), a copy of the model "
        "(copy.deepcopy, pickle) or a model rebuilt or reloaded after attach runs none of this session's "
        "interception: run the attached model itself inside the block, or attach a session to the copy"
        + (
            ". strict=False allows routers without routes and rows left unread, not a replay that forces nothing; "
            "a block meant to run no forward need not be opened"
            if not strict
            else ""
        )
    )


def _aliases_of_silent(silent: Sequence[str], sites: Sequence[RouterSite], written: Sequence[int]) -> str:
    """What the error for routers that recorded no row adds where one of them is a module that another path of the
    same module recorded rows for (a wrapper that holds a block and its gate again under its own names): the idle
    path's block never ran, its module did, under the other path; ``""`` where none is.
    """
    recorded = {id(s.module): s for s, w in zip(sites, written, strict=True) if w > 0}
    pairs = [
        (s.name, recorded[id(s.module)].name)
        for s in sites
        if s.name in silent and id(s.module) in recorded and _scopes_nested(s, recorded[id(s.module)])
    ]
    if not pairs:
        return ""
    said = "; ".join(f"'{idle}' is the module that '{other}' recorded rows for" for idle, other in pairs[:4])
    return (
        f" ({said}: one module at two paths, whose block at the idle path never ran, the module itself running under "
        "the other path; its rows are there)"
    )


def _scopes_nested(one: RouterSite, other: RouterSite) -> bool:
    """Is either site's scope module inside the other's (the block a wrapper holds, whose gate it holds again)? Two
    blocks side by side that share one gate module (a gate tied across layers, one layer skipped) are not: the idle
    block's rows are under no other path."""
    a, b = one.scope_module, other.scope_module
    if a is None or b is None:
        return (
            one.scope == other.scope
            or one.scope.startswith(other.scope + ".")
            or other.scope.startswith(one.scope + ".")
        )
    return any(m is b for m in a.modules()) or any(m is a for m in b.modules())


def _read_counters(counters: Sequence[torch.Tensor]) -> list[int]:
    """Read device counters with one host copy per device."""
    out: list[int | None] = [None] * len(counters)
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(counters):
        by_device.setdefault(c.device, []).append(i)
    for device, idx in by_device.items():
        if device.type == "meta":
            raise SessionStateError(
                "the model ran on the meta device in this block, where rows and counts hold no values: capture "
                "and check a replay on a real device (a strict replay on meta cannot be checked; strict=False "
                "skips the check)"
            )
        vals = torch.stack([counters[i] for i in idx]).cpu().tolist()
        for i, v in zip(idx, vals, strict=True):
            out[i] = int(v)
    return [int(v) for v in out if v is not None]


def _held_by(what: str, other: Session | None) -> SessionStateError:
    """The error of an attach that ``other`` is in the way of, carrying it (see :class:`SessionStateError`)."""
    err = SessionStateError(
        f"{what}; detach that session first: session.detach()"
        + (", or, where no name holds it any more, this error's .session.detach()" if other is not None else "")
    )
    err.session = other
    return err


def _model_routers(
    model: nn.Module, names: Sequence[str], adapters: Sequence[Adapter], num_experts: int | None
) -> tuple[str, ...] | None:
    """Every router of ``model``, for a session of some of them only (``names``, chosen by include= or exclude=):
    the routers the search finds without include= and exclude=, each of ``names`` in place of those it holds or
    sits in (include= may name a router's block, or a gate inside it), in module order.

    None where a router of ``names`` is none that search finds, nor holds or sits in one: include= took a module
    the search misses, so it may miss the model's other routers too, and which routers the model has is not known
    (a replay of its routes that fits their names onto another model by dropping a module name is then refused, as
    for routes built from rows)."""

    def related(a: str, b: str) -> bool:
        return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")

    found: list[str] = []
    for count in dict.fromkeys((num_experts, None)):  # (num_experts= finds routers whose weight does not say E)
        try:
            found += [s.name for s in find_routers(model, adapters=adapters, num_experts=count)]
        except MoEReplayError:
            continue
    if not all(any(related(n, f) for f in found) for n in names):
        return None
    order = {n: i for i, n in enumerate(dict(model.named_modules(remove_duplicate=False)))}
    whole = set(names) | {f for f in found if not any(related(f, n) for n in names)}
    return tuple(sorted(whole, key=lambda n: order.get(n, len(order))))


#: The call that does what setting each setting of a session would have meant.
_SESSION_SETTERS = {
    "capacity": "session.reserve(rows) grows the capture rings to hold that many rows per router",
    "max_bytes": "give the limit to attach(model, max_bytes=...), or to one block: session.capture(max_bytes=...)",
    "keep_newest": "it is how the capture rings are made: detach, then mr.attach(model, keep_newest=True)",
    "strict": "pass it to each replay: session.replay(routes, strict=False)",
    "clear": "pass it to each capture: session.capture(clear=False)",
    "top_k": "the k of each router is read from its decision, or given to mr.attach(model, top_k=...)",
    "num_experts": "the expert count of each router is read from it, or given to mr.attach(model, num_experts=...)",
}


def _session_instead(name: str) -> str:
    """What to call instead of setting the attribute ``name`` on a session."""
    if name in _SESSION_SETTERS:
        return _SESSION_SETTERS[name]
    if isinstance(getattr(Session, name, None), property):
        return "it is read from the session's state, which its calls change"
    return (
        f"a Session has no attribute {name!r} (a misspelt one?); keep your own data beside the session (a dict or a "
        "dataclass holding it)"
    )


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
            and never raising: for monitoring, not for routes you train on (a replay refuses
            the routes of a ring that wrapped, which know no token ids, unless given them).
        max_bytes: the most bytes the capture rings may hold, all routers together; a
            forward that would grow them past it raises :class:`CaptureOverflowError`.

    Returns:
        A :class:`Session`; also a context manager that detaches on exit (an exception leaving it first leaves
        the blocks entered by hand inside it and still open, as it would leave ``with`` blocks).

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
        raise ArgumentTypeError(f"attach takes an nn.Module, got {type(model).__name__}")
    if not is_integer(capacity) or capacity < 1:  # (numpy's ints too)
        raise InvalidArgumentError(f"capacity must be a positive number of rows, got {capacity!r}")
    capacity = int(capacity)
    _torch_compat.check()  # a torch whose internals moved is refused here, before anything is installed
    keep_newest = check_flag(keep_newest, "keep_newest")
    if max_bytes is not None and (not is_integer(max_bytes) or max_bytes < 0):
        raise InvalidArgumentError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    max_bytes = None if max_bytes is None else int(max_bytes)
    exclude = _frozen_matcher(exclude)  # (read twice: by the search and by the watch for routers left out)
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
        other = _session_of(model)
        if other is not None and other.attached:
            raise _held_by(f"{type(model).__name__} already has an attached session ({other!r})", other)
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
            excluded=_compile_matcher(exclude, "exclude"),
        )
        session._filtered = include is not None or exclude is not None
        if session._filtered:
            session._model_routers = _model_routers(model, [s.name for s in sites], adapters, num_experts)
        session._install()
        _ATTACHED[model] = weakref.ref(session)
    return session
