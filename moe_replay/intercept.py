"""Interception of a router's decision inside its own forward.

While the scope module of a router (the router itself, or its MoE block for a bare
``nn.Linear`` gate) runs, a :class:`torch.overrides.TorchFunctionMode` watches its
decision-like calls (``topk``, ``argmax``/``max`` over a dimension, ``sort``/``argsort``)
and counts them. Which of them make the decision is not guessed from signatures: it is
established once per router by its effect (:mod:`moe_replay.evidence`), at the router's
first eager forward under a session, and every later forward must make the same calls.
For hash routing an :class:`~moe_replay.Adapter` declares a lookup of a ``[vocab, top_k]``
integer table instead. The mode is thread-local and active for that forward alone.

Once a router has been audited (one forward under the mode with the lean wrappers of
:mod:`moe_replay._lean` in place, every call the mode acted on having come through them),
its eager forwards run *lean*: no mode, the wrappers hand its decision-like calls to
:meth:`RouterHook.on_lean`, which answers them as the mode would.

* capture: the decision runs natively and its indices are written to the ring;
* replay: the call is answered with ``(source.gather(-1, forced), forced)``, where
  ``source`` is the score tensor (or, when that tensor is a ``masked_fill``/``where``
  of another one, the unmasked scores: group-limited routers mask out groups before
  the top-k, and a forced expert outside the chosen groups must still get its score;
  forced experts that the call itself could have picked get their masked values);
* recompute (activation checkpointing): a router running again during backward gets
  the very rows its forward got, whatever mode the session is in by then.

With gradients on, the values are always produced by ``gather`` (never by the top-k
itself) so that a forward and its recompute save the same tensors: non-reentrant
checkpointing checks that.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import enum
import functools
import hashlib
import inspect
import operator
import sys
import threading
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _lean, _torch_compat
from ._arguments import ArgumentStamp, _version, stamp_arguments
from ._code_settings import (
    HeldStamp,
    attribute_names_read,
    code_settings,
    comparable,
    flag_buffers,
    hook_names_read,
    hook_written,
    is_setting,
    is_written,
    modules_codes_read,
    only_into_calls,
    read_after_calls,
    reads_state,
    settings_in,
    written,
)
from ._faults import forwards_call, inside_forward, note_fault
from ._inner_hooks import HookWatch
from ._interrupts import _nothing as _no_hold
from ._interrupts import hold_interrupts
from ._output_guard import OutputGuard, _integer_tensors, runs_foreign_hooks
from .errors import ReplayConsumptionError, RoutesValidationError, UnsupportedRouterError, _script_refusal
from .evidence import (
    _HOOK_FNS,
    DECISION_FUNCS,
    HOOKS_NEEDED,
    NESTING,
    NO_OUT,
    PREDICTED,
    UNWRAP,
    Evidence,
    MovedAxis,
    _first_floating,
    _own_hook,
    best_others,
    decision_call,
    differs,
    establish,
    faults_refused,
    forced_leaves,
    makes_its_calls,
    run_unestablished,
    still_decides,
    through_out,
    unwrap,
)
from .evidence import torchs_hook as _torchs_hook
from .losses import _mark_outside_graph
from .ring import CaptureRing, ReplaySource

__all__ = ["ClassForward", "RouterHook"]

_TOPK = {torch.topk, torch.Tensor.topk}
_ARGMAX = {torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin}  # calls that return indices only
_MIN = {torch.min, torch.Tensor.min}
_MASKS = {torch.masked_fill, torch.Tensor.masked_fill}
_WHERE = {torch.where, torch.Tensor.where}
_LOOKUP = {torch.Tensor.__getitem__}
# with the lean wrappers: traced code may hand the mode a wrapper itself (read as what it wraps)
_WATCHED = frozenset(DECISION_FUNCS | _MASKS | _WHERE | set(UNWRAP))
# a declared table lookup: its decision-like calls too, each of which would make the table's choice ambiguous
_WATCHED_LOOKUP = frozenset(_WATCHED | _LOOKUP)

#: Decision kinds a router can declare (``auto``: whichever calls the evidence shows).
DECISIONS = ("auto", "topk", "argmax", "max", "argmin", "min", "lookup")


_compiling = torch.compiler.is_compiling


_UNCOMPILED = threading.local()  # .on: this thread runs a router forward through _uncompiled


class _EagerStance:
    """torch.compile's ``force_eager`` stance while any thread runs eager work of the session's (``with EAGER:``).

    The stance is global: the first user sets it and the last one puts back what was there, so users that overlap
    in several threads never leave it set (each entering and leaving it would: the second thread to enter keeps
    ``force_eager`` as what to put back). Router forwards under the mode (:func:`_uncompiled`) and
    :meth:`Session.verify` share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.held: Any = None  # the stance's context manager, entered by the first user

    def __enter__(self) -> None:
        with self.lock:
            if self.users == 0:
                held = torch.compiler.set_stance("force_eager")
                held.__enter__()
                self.held = held
            self.users += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                held, self.held = self.held, None
                held.__exit__(None, None, None)


#: The one counted ``force_eager`` stance of the process (see :class:`_EagerStance`).
EAGER = _EagerStance()


@torch.compiler.disable
def _uncompiled(run: Callable[..., Any], *args: Any) -> Any:
    """An eager router forward under the session's interception, eager all the way down.

    Eager code may run inside a compiled model (at a graph break around the router) or call
    compiled code (a compiled experts module or helper inside the scope). torch.compile would
    then compile those frames one by one, with the mode on the stack, which it cannot trace,
    and with the hook's eager bookkeeping (host counts, eager ring writes) in them. So dynamo
    skips the frames of this forward, and compiled code inside it runs as plain Python.
    """
    with EAGER:
        _UNCOMPILED.on = True
        try:
            return run(*args)
        finally:
            _UNCOMPILED.on = False


def _in_backward() -> bool:
    return _torch_compat.current_graph_task_id() != -1


def _run_nested(hook: RouterHook, *args: Any) -> Any:
    """:meth:`RouterHook._run` nested as :meth:`ScopedForward._nested` nests it: the modes of scopes around
    it ignore its calls, their lean forwards get none."""
    state = NESTING
    state.depth += 1
    lean, state.lean = state.lean, None
    try:
        return hook._run(*args)
    finally:
        state.depth -= 1
        state.lean = lean


# ----------------------------------------------------------------- activation checkpointing
# A router inside a checkpointed region runs twice: in the forward, and again in backward
# when the region is recomputed. The rows of the forward are kept per region object
# (weakly: they go when the autograd graph goes), and the recompute of that region takes
# them back in call order. So backward needs no ordering assumption: it works after the
# capture/replay context exited, for any number of micro-batches in any backward order,
# and again for a second backward over a retained graph.
#
# A region object is
# * non-reentrant torch.utils.checkpoint: its `_CheckpointFrame`. The forward's pack hook
#   holds it, the recompute's pack hook a weak reference to it (torch/utils/checkpoint.py:
#   `_checkpoint_hook`, `_recomputation_hook`); only the innermost one is visible;
# * reentrant checkpointing (torch's `CheckpointFunction`, and any autograd.Function that
#   runs its forward again in its backward, as Megatron's and DeepSpeed's do): that
#   Function's ctx, found on the Python stack in its `forward` and in its `backward`.

_CheckpointFrame = _torch_compat.CheckpointFrame  # None on a torch without it
_FunctionCtx = _torch_compat.BackwardCFunction
_CTX_METHODS = frozenset(("forward", "backward"))

#: Evidence established on a module, kept for later sessions on it (a benchmark or a trainer may
#: attach many times): by mode, forward function and what was declared. Every forward still checks
#: that it makes the calls the evidence lists.
_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Evidence]] = weakref.WeakKeyDictionary()

#: Per router scope and mode (training, gradients): the evidence a forward was audited under, whether all its
#: calls came through the lean wrappers (and why not), and the code its forward reached as it was read (a patch
#: of a method it calls is seen by that: :class:`~moe_replay._lean.CodeWitness`). Kept for later sessions, as the
#: evidence is.
#: Last, whether its forward takes more than one tensor (see :func:`~moe_replay._lean.takes_only_tensors`): then each
#: lean forward looks at its arguments, and one handed code runs under the mode.
_Verdict = tuple[Evidence, bool, str, "_lean.CodeWitness | None", bool]
_LEAN_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, bool], _Verdict]] = weakref.WeakKeyDictionary()

#: Per router scope: where its output held the indices of its decision call when first seen under each evidence
#: (see :meth:`RouterHook._check_returned`), and the output's type. Kept for later sessions, as the evidence is: a
#: session that learned it afresh would take a branch switched since (between sessions) for the one established.
_RETURNS_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[Evidence, tuple[int | None, type]]] = (
    weakref.WeakKeyDictionary()
)

#: Per router scope whose decision is made chunk by chunk of the tokens (``Evidence.chunks``), per such evidence:
#: what its forwards were shown on (see :class:`_ChunkState`). Kept for later sessions, as the evidence is.
_CHUNKS_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[Evidence, _ChunkState]] = weakref.WeakKeyDictionary()

#: Per router scope, per key of ``_KNOWN``: the settings among the arguments its forward was given as that evidence
#: was established (see :mod:`moe_replay._arguments`), or None where its forward takes its tokens alone. Kept for later
#: sessions, as the evidence is: one handed another minimum weight establishes it again.
_ARG_STAMPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], ArgumentStamp | None]] = (
    weakref.WeakKeyDictionary()
)

#: Why the evidence of a router with twin calls was dropped where one of them decided (see ``_still_holds``).
_TWIN_DECIDES = (
    "another of its calls over the experts decided instead (its own state, a warm-up or step count, or its inputs "
    "switched which call dispatches)"
)

#: How many Python frames above a router call are searched for reentrant checkpoints.
MAX_STACK_DEPTH = 128


def _frame_of_hook(fn: Any) -> tuple[Any, bool]:
    """The ``_CheckpointFrame`` a pack hook of torch.utils.checkpoint refers to, and whether it recomputes."""
    for _ in range(3):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            recompute = isinstance(v, weakref.ref)
            if recompute:
                v = v()
            if _CheckpointFrame is not None and isinstance(v, _CheckpointFrame):
                return v, recompute
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            break
    return None, False


_top_hooks = _torch_compat.top_saved_tensors_hooks
_graph_task = _torch_compat.current_graph_task_id
_fwd_grad = _torch_compat.fwd_grad_enabled
_graph_capturing = _torch_compat.graph_capturing
_dynamo_compiling = _torch_compat.dynamo_compiling
_frame_callback = _torch_compat.frame_callback
_COMPILER = _torch_compat.COMPILER
_CUDA = _torch_compat.CUDA
_cuda_capturing = _torch_compat.stream_capturing
_FORK = _torch_compat.FORK  # (its field bad: is this a forked child of a process that had initialised CUDA?)
_in_compiled_autograd = _torch_compat.in_compiled_autograd
_transform = _torch_compat.functorch_transform
_is_batched = _torch_compat.is_batched
_transforms_active = _torch_compat.transforms_active
_exporting = _torch_compat.exporting
_tracing = _torch_compat.tracing
_jit_tracing = _torch_compat.jit_tracing  # (_tracing in parts, spelled inline where every router forward asks it)
_dispatch_modes = _torch_compat.dispatch_modes
_FX = _torch_compat.FX
_grad = torch.is_grad_enabled
_get_ident = threading.get_ident
_hidden = _torch_compat.hidden_from_dispatch_modes
_GLOBAL_HOOKS = _torch_compat.global_forward_hooks
_HANDLES = _torch_compat.HOOK_HANDLES  # (its next_id moves whenever a hook is registered anywhere)
_NOTHING = contextlib.nullcontext()
_LEAN_NAMES, _LEAN_SWAP, _lean_current = _lean.NAMES, _lean.SWAP, _lean.CURRENT
_LEAN_OURS, _LEAN_THEIRS, _LEAN_ON, _LEAN_OFF = _lean.OURS, _lean.THEIRS, _lean.ON, _lean.OFF
_code_in_arguments = _lean.code_in_arguments
_pick = _lean.pick
_NO_REGIONS: list[tuple[Any, bool]] = []  # returned, never changed, when a call is in no region


class _ThisThread(threading.local):
    """The thread that runs the code reading it: ``ident`` is set in each thread as that thread first reads it.

    Compiled code runs no Python per call, only dynamo's guards, and an attribute of a ``threading.local`` is
    guarded in the thread that runs the code: a region traced inside a block compares ``ident`` with the thread
    that holds the block, and runs in no other thread (another thread's call traces its own, which refuses)."""

    def __init__(self) -> None:
        self.ident = threading.get_ident()


_THIS_THREAD = _ThisThread()


def _regions() -> list[tuple[Any, bool]]:
    """The checkpoint regions around this router call, innermost first, each with "being recomputed?"."""
    hooks = _top_hooks()
    # the common case first: no saved-tensor hooks, not in backward, and not inside an autograd.Function's
    # forward (which runs with gradients and forward-mode AD off)
    if hooks is None and _graph_task() == -1:
        if torch.is_grad_enabled() or _fwd_grad() or torch.is_inference_mode_enabled():
            return _NO_REGIONS
    out: list[tuple[Any, bool]] = []
    if hooks is not None:
        frame, recompute = _frame_of_hook(hooks[0])
        if frame is not None:
            out.append((frame, recompute))
        elif getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint":
            raise UnsupportedRouterError(
                "moe_replay does not know this torch version's non-reentrant checkpoint (no checkpoint frame in "
                "its saved-tensor hooks), so a recompute could not be given the experts of its forward; "
                "checkpoint with use_reentrant=True, or report the torch version"
            )
    # an autograd.Function runs its forward with gradients (and forward-mode AD) off, its backward
    # inside a graph task
    if _in_backward():
        pass
    elif torch.is_grad_enabled() or _torch_compat.fwd_grad_enabled() or torch.is_inference_mode_enabled():
        return out
    f: types.FrameType | None = sys._getframe(2)
    for _ in range(MAX_STACK_DEPTH):
        if f is None:
            break
        code = f.f_code
        if code.co_name in _CTX_METHODS and code.co_argcount and code.co_varnames[0] == "ctx":
            ctx = f.f_locals.get("ctx")
            if isinstance(ctx, _FunctionCtx):
                out.append((ctx, code.co_name == "backward"))
        f = f.f_back
    return out


#: What a router's modules hold that may say which tokens each chunk of its decision holds, as seen: the dict it is
#: held in, the key, its name (for messages), the object, and what tells it changed (a tensor's version counter, a
#: list's items).
_Held = tuple[dict[str, Any], str, str, Any, Any]


class _EveryCall(dict[int, tuple[str, int, int]]):
    """The plan of a decision made chunk by chunk of the tokens: every decision-like call of a forward, whatever its
    ordinal, is one of its chunks (a forward of more tokens makes more of them), of one signature."""

    def __init__(self, sig: tuple[str, int, int]) -> None:
        super().__init__()
        self.sig = sig

    def get(self, key: int, default: Any = None) -> tuple[str, int, int]:  # type: ignore[override]
        return self.sig

    def __contains__(self, key: object) -> bool:
        return True


@dataclass
class _ChunkState:
    """What a decision made chunk by chunk of the tokens was shown to hold on (see ``Evidence.chunks``).

    ``shown``: the (dimensions of the hidden states, number of calls) of the forwards whose calls were proven each a
    run of the tokens, in order, together every token once; one call of all the tokens always is. ``held``: the
    integer and boolean tensors its modules hold (an order, a chunk size, an index map), as each forward left them,
    or None before the first: which tokens a chunk holds may hang on them, so one changed between forwards (written
    in place, or replaced) makes the decision unproven."""

    shown: set[tuple[int, int]]
    held: tuple[_Held, ...] | None = None


def _held_indices(scope: nn.Module, unread: frozenset[str] | None = None) -> tuple[_Held, ...]:
    """What the scope and its children outside containers hold that may order or size its chunks: tensors of
    integers or booleans (parameters, buffers, plain attributes), with their version counters (read on the host:
    no sync), and lists or tuples of plain values (a chunk order, chunk sizes), with their items. Those its code
    never reads (see :func:`_unread`; ``unread``, where read already) are left out."""
    out: list[_Held] = []
    if unread is None:
        unread = _unread(scope)
    for prefix, m in _scope_modules(scope):
        own = m.__dict__
        keys = _own_keys(own)
        for store, items in (
            (m._parameters, m._parameters.items()),
            (m._buffers, m._buffers.items()),
            (own, zip(keys, map(own.__getitem__, keys), strict=True)),
        ):
            for k, v in items:
                if unread and prefix + k in unread:
                    continue
                if isinstance(v, torch.Tensor):
                    if not (v.is_floating_point() or v.is_complex()):
                        out.append((store, k, prefix + k, v, None if v.is_inference() else v._version))
                elif isinstance(v, list | tuple) and len(v) <= 256 and all(type(i) in (int, bool) for i in v):
                    out.append((store, k, prefix + k, None, tuple(v)))
    return tuple(out)


#: the containers whose own attributes no code of theirs reads (never called, or torch's forward over the children)
_PLAIN_CONTAINERS = frozenset((nn.ModuleList, nn.ModuleDict, nn.Sequential))


class _HookReads:
    """What the user's hooks ever seen on a router scope's modules (and the global module hooks) may read: the
    names (see :func:`moe_replay._code_settings.hook_names_read`), whether one could not be read (then every
    attribute is a setting), and the hooks read (by handle id)."""

    __slots__ = ("complete", "names", "seen")

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.complete = True
        self.seen: set[int] = set()


#: per router scope, what the user's hooks seen on its modules may read (only ever grows, see :func:`_unread`)
_HOOK_READS: weakref.WeakKeyDictionary[nn.Module, _HookReads] = weakref.WeakKeyDictionary()
#: per router scope, the last :func:`_unread` and what it was read under (see :func:`_unread_stamp`)
_UNREAD: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], frozenset[str]]] = weakref.WeakKeyDictionary()


def _hook_reads(scope: nn.Module) -> _HookReads:
    """What the user's hooks on ``scope``'s modules (the scope's own too) and the global module hooks may read, those
    seen before added: a hook once seen counts for good, so that the same keys are left out whether or not it runs
    at the time (set aside in the runs that establish a decision, or removed since; the hooks themselves are a
    setting of their own, :data:`_HOOKS_KEY`)."""
    reads = _HOOK_READS.get(scope)
    if reads is None:
        reads = _HOOK_READS[scope] = _HookReads()
    tables = [d for m in scope.modules() for n in _HOOK_FNS if (d := vars(m).get(n))]
    tables += [_GLOBAL_HOOKS, _torch_compat.global_forward_pre_hooks]
    for table in tables:
        for key, hook in list(table.items()):
            if key in reads.seen or not _user_hook(hook):
                continue
            reads.seen.add(key)
            found = hook_names_read(hook)
            if found is None:
                reads.complete = False
            else:
                reads.names |= found
    return reads


def _unread_stamp(scope: nn.Module) -> tuple[Any, ...]:
    """What :func:`_unread` of ``scope`` depends on, read cheaply: each module's class, its own attributes' keys
    and the callables among them (a forward set on it, a function it calls), its hook tables, and the next hook
    handle id (it moves whenever a hook is registered anywhere)."""
    out: list[Any] = [_HANDLES.next_id, len(_GLOBAL_HOOKS), len(_torch_compat.global_forward_pre_hooks)]
    for m in scope.modules():
        own = m.__dict__
        out.append(type(m))
        out.append(getattr(type(m), "forward", None))
        out.append(tuple(own))
        # (moe_replay's own wrapper by identity only: a stamp kept here that held it would be a holder detach cannot
        # edit, where another wrapper installed since holds it too; its code is no router's to read names from)
        out.extend(
            (ScopedForward, id(v)) if isinstance(v, ScopedForward) else v
            for v in own.values()
            if callable(v) and not isinstance(v, nn.Module | torch.Tensor)
        )
        out.extend(len(d) for n in _HOOK_FNS if (d := own.get(n)) is not None)
        out.append(tuple(m._parameters.keys()))  # (keys(): a scripted module's tables iterate by no index)
        out.append(tuple(m._buffers.keys()))
    return tuple(out)


def _unread(scope: nn.Module) -> frozenset[str]:
    """The keys (as :func:`_fingerprint` names the scope modules' own attributes, parameters and buffers) of what
    the code of the scope and its submodules never reads: an attribute whose name none of that code may read it by
    (see :func:`moe_replay._code_settings.attribute_names_read`), such as a record the code around the router keeps
    on it (the ids a block stores on its gate after the gate returns, for its loss). Its forward cannot depend on
    it, so it is no setting. The code of the user's hooks on those modules (the scope's own too) and of the global
    module hooks counts as theirs (:func:`_hook_reads`): a temperature only a hook on the gate reads is a setting.
    Empty where the reading is not complete for one of those modules or hooks. Kept per scope until what it is read
    from changes (:func:`_unread_stamp`)."""
    stamp = _unread_stamp(scope)
    kept = _UNREAD.get(scope)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    result = _read_unread(scope)
    _UNREAD[scope] = (stamp, result)
    return result


def _read_unread(scope: nn.Module) -> frozenset[str]:
    """:func:`_unread`, read afresh."""
    reads = _hook_reads(scope)
    if not reads.complete:
        return frozenset()
    names: set[str] = set(reads.names)
    for m in scope.modules():
        if type(m) in _PLAIN_CONTAINERS:
            continue
        read = attribute_names_read(m)
        if read is None:
            return frozenset()
        names |= read
    out: set[str] = set()
    for prefix, m in _scope_modules(scope):
        for store in (m.__dict__.keys() - _MODULE_OWN, m._parameters.keys(), m._buffers.keys()):
            out.update(prefix + k for k in store if k not in names)
    return frozenset(out)


def _own_keys(own: dict[str, Any]) -> list[str]:
    """The keys of a module's ``__dict__`` (``own``) but those every module has, whose values torch keeps (dicts of
    parameters, buffers, children and hooks, a set, flags: no tensor, list or callable among them), sorted: what a
    walk of the dict for anything else (a tensor, a list, code set on the module) reads, found in C. Where one of
    those holds another type than torch keeps there, it is read too (after the others)."""
    standard = own.keys() & _MODULE_OWN
    keys = sorted(own.keys() - _MODULE_OWN)
    if not _MODULE_OWN_TYPES.issuperset(map(type, map(own.__getitem__, standard))):
        keys += sorted(standard)
    return keys


def _by_attribute(scope: nn.Module, settings: dict[str, str]) -> dict[str, str]:
    """``settings`` keyed by the attribute a module of ``scope`` reads (``gate.offset``), where a key names it as the
    class attribute it falls back to (``Gate.offset``): an instance attribute set since over a class attribute of the
    same name (``self.forced = None`` over ``forced = None``) is read the same way, and keyed so, compares as the
    same setting. The instance's own value wins where both are kept."""
    modules = [("", scope)] + [
        (f"{name}.", m) for name, m in scope._modules.items() if m is not None and not isinstance(m, _CONTAINERS)
    ]
    out: dict[str, str] = {}
    for key, value in settings.items():
        owner, _, attr = key.rpartition(".")
        where = [
            prefix
            for prefix, m in modules
            if owner
            and any(c.__qualname__ == owner for c in type(m).__mro__)
            and inspect.getattr_static(type(m), attr, _UNSET_ATTR) is not _UNSET_ATTR
        ]
        for name in [prefix + attr for prefix in where] or [key]:
            out.setdefault(name, value)
    for prefix, m in modules:  # (an instance's own value over the class attribute it shadows)
        for attr in vars(m):
            if prefix + attr in settings:
                out[prefix + attr] = settings[prefix + attr]
    return out


def _held_values(stamp: HeldStamp) -> str | None:
    """The values of the tensor of integers or booleans ``stamp`` stands for, in words that compare as they do and
    survive a file (its shape and dtype, and its entries where few, else a digest of them); None where it is gone or
    has no values to read (meta, fake). Read at block boundaries, outside the forwards."""
    tensor = stamp.ref()
    if tensor is None or tensor.is_meta:
        return None
    try:
        with _torch_compat.NO_TORCH_FUNCTION():
            flat = tensor.detach().reshape(-1).cpu()
            head = f"a tensor of {str(flat.dtype).removeprefix('torch.')} {list(tensor.shape)}"
            if flat.numel() <= 64:
                return f"{head}: {flat.tolist()}"
            return f"{head}, digest {hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]}"
    except (RuntimeError, NotImplementedError, TypeError):  # (a tensor without values: fake, functional)
        return None


#: (no class attribute of that name, see _by_attribute)
_UNSET_ATTR = object()


def _setting_name(scope: nn.Module, key: str) -> str | None:
    """The name the code of ``scope`` reads the setting ``key`` (of :func:`_settings_and_held`) by, where it is
    read by one name alone: an attribute of the scope or of one of its children (``temperature``,
    ``gate.temperature``), a global (``package.module.SCALE``), a class attribute of one of their classes
    (``Gate.offset``) or a closure cell (``<offset>``). None for any other (a value a config object holds, a
    chain): it may be read otherwise, by code not read here."""
    parts = key.removesuffix(_HELD_SUFFIX).split(".")
    name = parts[-1]
    if len(parts) == 1:
        return name[1:-1] if name.startswith("<") and name.endswith(">") else name
    owner = ".".join(parts[:-1])
    if len(parts) == 2 and isinstance(scope._modules.get(owner), nn.Module):
        return name
    if isinstance(sys.modules.get(owner), types.ModuleType):
        return name
    for m in scope.modules():
        if any(c.__qualname__ == owner for c in type(m).__mro__):
            return name
    return None


#: how :meth:`RouterHook.ids_settings` names the mode of a router's modules (``train()`` / ``eval()``)
_TRAINING_KEY = "training"


#: how :meth:`RouterHook.ids_settings` names a cached function its code calls after its decision
CACHED_SUFFIX = " (a cached function)"


def _cached_functions(scope: nn.Module) -> list[str]:
    """The names by which the code of ``scope``'s modules may call a cached function (``functools.lru_cache``,
    ``functools.cache``): a global of a module class's module, or an attribute of its class. Its results are kept
    by the cache, out of sight: cleared and filled again under other values (a placement of the experts moved),
    they differ, and no setting tells."""
    out: set[str] = set()
    for cls in dict.fromkeys(type(m) for m in scope.modules()):
        if cls.__module__.startswith("torch."):
            continue
        found = dict(vars(sys.modules[cls.__module__])) if cls.__module__ in sys.modules else {}
        for c in reversed(cls.__mro__):
            found.update(vars(c))
        for name, value in found.items():
            inner = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            if callable(inner) and hasattr(inner, "cache_clear") and hasattr(inner, "cache_info"):
                out.add(name)
    return sorted(out)


#: how many code objects :func:`_classes_codes` reads at most (beyond: None, not read completely)
_MAX_CLASS_CODES = 4096


def _classes_codes(scope: nn.Module) -> list[types.CodeType] | None:
    """The code of the functions of the classes of ``scope``'s modules (torch's own aside), those defined in it, and
    the functions of their modules that code names, followed until no more are found: where the code a forward runs
    is not read completely, all it may run of its own (a function held on an instance aside). None beyond
    :data:`_MAX_CLASS_CODES` of them."""
    fns: list[Any] = [
        value.__func__ if isinstance(value, staticmethod | classmethod) else value
        for cls in dict.fromkeys(type(m) for m in scope.modules())
        for c in cls.__mro__
        if not c.__module__.startswith("torch.") and c is not object
        for value in vars(c).values()
    ]
    fns += [p.fget for f in list(fns) if isinstance(p := f, property) and p.fget is not None]
    todo = [f for f in fns if isinstance(f, types.FunctionType)]
    seen: set[types.CodeType] = set()
    out: list[types.CodeType] = []
    while todo:
        fn = todo.pop()
        codes = [fn.__code__]
        while codes:
            code = codes.pop()
            if code in seen:
                continue
            seen.add(code)
            out.append(code)
            if len(out) > _MAX_CLASS_CODES:
                return None
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
            for n in code.co_names:
                g = fn.__globals__.get(n)
                if isinstance(g, types.FunctionType) and g.__code__ not in seen:
                    if not (g.__module__ or "").startswith("torch."):
                        todo.append(g)
    return out


def _named_by_classes(scope: nn.Module, name: str) -> bool:
    """Does the code of a function of the classes of ``scope``'s modules (torch's own aside), or one defined in it,
    name ``name``? Where that code is not read completely, what it may call by name."""
    todo = [
        inner.__code__
        for cls in dict.fromkeys(type(m) for m in scope.modules())
        for c in cls.__mro__
        if not c.__module__.startswith("torch.") and c is not object
        for value in vars(c).values()
        if isinstance(
            inner := value.__func__ if isinstance(value, staticmethod | classmethod) else value, types.FunctionType
        )
    ]
    while todo:
        code = todo.pop()
        if name in code.co_names:
            return True
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def _training_flags(scope: nn.Module) -> str:
    """The mode of ``scope``'s modules in words: ``'True'`` (training) or ``'False'`` where all agree, the paths of
    those in training else."""
    flags = {m.training for m in scope.modules()}
    if len(flags) == 1:
        return repr(flags.pop())
    return "in training: " + ", ".join(repr(p or "(the router)") for p, m in scope.named_modules() if m.training)


#: how :func:`_settings_and_held` names what a module holds that may order its tokens
_HELD_SUFFIX = " (held)"


def _settings_and_held(scope: nn.Module) -> dict[str, Any]:
    """:func:`_fingerprint` of ``scope``, with what its modules hold that may order its tokens (see
    :func:`_held_indices`: a tensor of integers by identity and version, a list of them by its items), keyed
    ``'<name> (held)'``. One top-k over the tokens in an order such a tensor sets (``x[self.order]``) records its
    rows in that order: a decision established under one order does not hold under another, written in place or
    replaced since."""
    out = _fingerprint(scope)
    unread = _unread(scope)
    for key in unread:  # (a plain value its code never reads: a record kept on it, no setting)
        out.pop(key, None)
    for _, _, name, tensor, value in _held_indices(scope, unread):
        out[f"{name}{_HELD_SUFFIX}"] = HeldStamp(tensor, value) if tensor is not None else value
    out[_HOOKS_KEY] = _user_hooks(scope)
    return out


#: The setting that stands for the user's forward hooks of a scope's submodules and the global module hooks.
_GLOBAL_KINDS = ("global", "global pre")  # (where the global module hooks are said to be, in place of a path)
_HOOKS_KEY = "(forward hooks inside its scope, and global module hooks)"


def _user_hooks(scope: nn.Module) -> tuple[tuple[str, int], ...]:
    """The user's forward hooks and pre-hooks of ``scope``'s submodules (where, by handle id), and the global module
    hooks (``register_module_forward_hook``, ``register_module_forward_pre_hook``), moe_replay's own left out. A
    decision is established with the first set aside and the second in, and checked against the first by the real
    forward's output (:meth:`RouterHook._hooks_checked`): one added since (a cut of the combine weights after the
    top-k) was in neither, so it is a setting: established again as the next block starts, refused where added
    inside a block in which the router ran."""
    out = [
        (path, key)
        for path, m in scope.named_modules()
        if m is not scope
        for name in _HOOK_FNS
        for key, h in (vars(m).get(name) or {}).items()
        if not _own_hook(h) and not _torchs_hook(h)
    ]
    for kind, hooks in zip(_GLOBAL_KINDS, (_GLOBAL_HOOKS, _torch_compat.global_forward_pre_hooks), strict=True):
        out.extend((kind, key) for key, h in list(hooks.items()) if not _own_hook(h) and not _torchs_hook(h))
    return tuple(out)


def _user_hook(hook: Any) -> bool:
    """Is ``hook`` the user's: neither moe_replay's own nor torch's (see :func:`_user_hooks`)?"""
    return not _own_hook(hook) and not _torchs_hook(hook)


def _hooked_submodules(scope: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The submodules of ``scope`` (not ``scope`` itself) that hold forward hooks or pre-hooks of the user's, by
    path."""
    return tuple(
        (path, m)
        for path, m in scope.named_modules()
        if m is not scope and any(_user_hook(h) for name in _HOOK_FNS for h in list((vars(m).get(name) or {}).values()))
    )


def _count_user_hooks(dicts: list[dict[int, Any]]) -> int:
    """How many hooks of the user's (moe_replay's own and torch's aside, as :func:`_user_hooks` counts) ``dicts``
    hold."""
    return sum(1 for d in dicts if d for h in list(d.values()) if not _own_hook(h) and not _torchs_hook(h))


def _hook_code(hook: Any) -> types.CodeType | None:
    """The code object a call of ``hook`` runs (a function's, a method's, a partial's, a callable object's
    ``__call__``), or None."""
    for _ in range(8):
        if isinstance(hook, functools.partial):
            hook = hook.func
        elif isinstance(hook, types.MethodType):
            hook = hook.__func__
        elif isinstance(hook, types.FunctionType):
            return hook.__code__
        else:
            hook = getattr(type(hook), "__call__", None)  # noqa: B004  # (a callable object's own __call__)
    return None


def _held_moved(then: tuple[_Held, ...], scope: nn.Module) -> str | None:
    """The name of what ``then`` holds that the scope's modules no longer hold as it was (written in place since,
    replaced, removed), or of one they hold now and did not; None where none moved."""
    now = _held_indices(scope)
    for a, b in zip(then, now, strict=False):
        if a[0] is not b[0] or a[1] != b[1] or a[3] is not b[3] or a[4] != b[4]:
            return a[2]
    if len(then) != len(now):
        return (then if len(then) > len(now) else now)[min(len(then), len(now))][2]
    return None


class _Kept:
    """The rows one router got inside one checkpointed region, and the recompute's position in them."""

    __slots__ = ("forced", "given", "graph_task", "pos", "rows")

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []  # (copies, as the decision made them)
        #: per row, the tensor the router was handed and its version counter then (None: none kept)
        self.given: list[tuple[torch.Tensor, int | None] | None] = []
        self.graph_task = -1
        self.pos = 0
        self.forced = False  # some rows were forced (replayed), not chosen by the scores


@dataclass
class RouterHook:
    """Per-router interception state; one per found router, owned by a session.

    ``num_experts`` and ``top_k`` start as discovery's hints (None when it had none) and
    become the facts of the established decision.
    """

    name: str
    num_experts: int | None
    top_k: int | None
    decision: str  # one of DECISIONS
    scope: nn.Module
    capture_ring: CaptureRing | None = None
    replay_source: ReplaySource | None = None
    capturing: bool = False
    replaying: bool = False
    verifying: bool = False  # run through the decision, record nothing
    kept: weakref.WeakKeyDictionary[Any, _Kept] = field(default_factory=weakref.WeakKeyDictionary)
    #: (scores, indices, the masked scores its top-k ran on) per decision, while scores are kept
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool | None]] | None = None
    calls: int = 0  # scope forwards since the counter was reset (eager only)
    call: int | None = None  # the decision call an Adapter names
    declared_top_k: bool = False  # top_k was given by the user: evidence must agree
    on_established: Callable[[RouterHook], None] | None = None
    owner: Any = None  # what holds the session's blocks: ``.ident`` is the thread allowed to run forwards
    evidence: dict[tuple[bool, bool], Evidence] = field(default_factory=dict)  # by mode()
    # the scope's settings (see _fingerprint) when each mode's decision was established, by mode; the keys its
    # own forward changes (counters, timings: state, not settings); and the settings of a decision just
    # established, until the forward that follows shows which keys that forward changes itself
    _settled: dict[tuple[bool, bool], dict[str, Any]] = field(default_factory=dict)
    _own: set[str] = field(default_factory=set)
    # the flags the modules on the way to the scope set on it for their forward (see changed_setting) as its
    # modules read them at the last block boundary, outside the forwards: None until read, or where none is set
    _outside: dict[str, Any] | None = None
    _restless: bool = False  # it changes state the runs of _still_holds put back (its modules', a global count)
    _pending: tuple[tuple[bool, bool], dict[str, Any]] | None = None
    # how many hooks torch had made (``HOOK_HANDLES.next_id``) when this router last compared the user's hooks inside
    # its scope with those its decisions were established under (see follow_hooks)
    _hooks_at: int = -1
    # the hook dicts of the scope's submodules and the global ones, and how many hooks of the user's they held when it
    # last looked: where none was added since, the count does not grow (see follow_hooks)
    _hook_dicts: list[dict[int, Any]] = field(default_factory=list)
    _hook_count: int = 0
    # the submodules of the scope that held hooks of the user's when a decision was last established (by path): a
    # forward under a decision established with them set aside watches them (see moe_replay._inner_hooks)
    _inner_hooked: tuple[tuple[str, nn.Module], ...] = ()
    _decided: bool = False
    _masks: list[tuple[torch.Tensor, torch.Tensor | _EitherSide]] = field(default_factory=list)
    _ordinal: int = 0  # decision-like calls seen so far in this forward
    _plan: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # decision ordinal -> signature
    _armed: Evidence | None = None  # the evidence _plan was built from
    _mirrors: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # later calls answered like the decision
    # the other calls (not the decision's), by ordinal, where they choose over a width that was not the count of tokens
    # (see on_call): one of another family or width at that ordinal in a later forward is another branch
    _others: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    # a decision may span several calls (successive top-1 slots): the slots answered so far
    _slots: list[torch.Tensor] = field(default_factory=list)
    _chunks: bool = False  # the decision is made chunk by chunk of the tokens: each call is a whole row of its own
    # a decision established as one call that made a second call of its signature in this eager forward: taken as
    # chunks of its tokens from then on, proven at the forward's end (see _grow_into_chunks): the capture's calls and
    # rows, and the replay's rows, as the forward began
    _grown: tuple[int, int, int] | None = None
    _row: torch.Tensor | None = None  # [n, k] rows the decision is answered with (replay, recompute)
    _recompute: bool = False  # the decision is a checkpoint recompute
    _entry_grad: bool = False  # gradients were on when this forward began (a backward may recompute it)
    _regions: list[tuple[Any, bool]] = field(default_factory=list)
    _source: torch.Tensor | None = None  # the scores of the decision's first call (kept for keep_scores)
    _choice: torch.Tensor | None = None  # the masked copy the decision picks from, where one does (keep_scores)
    _compiled: bool = False  # this forward is being traced by torch.compile
    _eager: bool = True  # this forward runs eagerly, outside CUDA-graph capture: host-side counts hold
    # per mode: the evidence a forward was audited under, and whether every call it acted on came
    # through the lean wrappers (then later forwards run without the mode)
    _lean: dict[tuple[bool, bool], _Verdict] = field(default_factory=dict)
    _missed: bool = False  # the audit saw a call that did not come through a lean wrapper
    # the lean fast path: the form of the decision call it answers, learned at the last one answered in full
    # (its ordinal, the arguments after the scores and the keywords, the scores' shape after their rows and
    # their dtype: compared as one tuple); and, in a forward where the ``topk`` wrapper may answer it at
    # once (eager, outside checkpointing, nothing kept, the rows at hand), that form with the replay source to
    # read (None in capture) and the capture ring to write (None in replay alone), else None
    _form: tuple[int, tuple[Any, ...], dict[str, Any], tuple[int], torch.dtype] | None = None
    _fast: tuple[tuple[int, tuple[Any, ...], dict[str, Any], tuple[int], torch.dtype], Any, Any] | None = None
    _slow: bool = False  # this lean forward went through the general path: its per-forward fields are renewed
    # the indices a top-k decision call of this forward returned (None: not a top-k answered in one call); and
    # per evidence, where the router's output held them when first seen (None: it did not return them)
    _answered: torch.Tensor | None = None
    _looked_up: torch.Tensor | None = None  # what a declared table lookup answered in this forward
    _returns: tuple[Evidence, int | None, type[Any]] | None = None
    _returned_at: dict[Evidence, tuple[int | None, type]] = field(default_factory=dict)  # (shared: see __post_init__)
    # the decisions in use that a captured forward of it made not answered by one top-k (an argmax, slots): where it
    # returns their indices is not learned, so their ids count as passing through code after them (see ids_settings);
    # the last one added, to add each once by identity
    _unanswered: set[Evidence] = field(default_factory=set)
    _unanswered_last: Evidence | None = None
    # per evidence whose forward returned its decision's indices: the forms of output (type, length) holding no
    # integer tensor at all that it also returns, shown to be made from its decision (see _check_returned)
    _bare_forms: set[tuple[Evidence, type, int | None]] = field(default_factory=set)
    # per mode whose evidence was dropped since it was established: why, in words (a refusal of the rows in use
    # after the decision is established again tells what happened, not a change of the model it may not be)
    _dropped: dict[tuple[bool, bool], str] = field(default_factory=dict)
    # per mode whose evidence was dropped: the signatures of the decision-like calls it was established on; and the
    # modes in which its forward was seen making other decision-like calls from one forward to the next (a branch
    # on its number of tokens), whose eager forwards are checked for the calls of their evidence before they run
    _calls_dropped: dict[tuple[bool, bool], tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
    _varies: set[tuple[bool, bool]] = field(default_factory=set)
    # during a block in which forward hooks run after the scope's forward: the last of them, which checks
    # that they left the integer tensors it returned as they were (see moe_replay._output_guard)
    _guard: OutputGuard | None = None
    # the guard of an earlier block, off the scope since: installed again for the next block that needs one (a new
    # object per block would make compiled code traced with the last one recompile, see OutputGuard.install)
    _spare: OutputGuard | None = None
    wrapped: bool = False  # the scope's forward is a wrapper (accelerate's, a user's) around the session's
    # per mode: the settings among the arguments its forward was given as its decision was established (a minimum
    # weight, a temperature, a flag handed at each call: see moe_replay._arguments), None where it takes its tokens
    # alone; and those of the decision armed, which each lean forward compares its arguments with
    _arg_stamps: dict[tuple[bool, bool], ArgumentStamp | None] = field(default_factory=dict)
    _arg_stamp: ArgumentStamp | None = None
    # where a decision was established with tensors among its forward's settings: set by compiled code where one's
    # value is not the one it was established with (see ArgumentStamp.mark_moved), cleared as each block starts and
    # read as it ends; one tensor for the hook's life, so that code compiled in one block runs again in the next
    _settings_moved: torch.Tensor | None = None
    # compiled code compared them in a forward of the block running now (stored by it, never read there: no guard)
    _settings_compared: bool = False

    def __post_init__(self) -> None:
        self._lean = _LEAN_KNOWN.setdefault(self.scope, {})  # shared by every session on this scope
        self._returned_at = _RETURNS_KNOWN.setdefault(self.scope, {})  # so is where it returned its indices

    # ------------------------------------------------------------- evidence
    def interception(self) -> str:
        """How this router's eager forwards run in the current (training, gradients) mode:
        ``"lean"``, ``"mode: <why>"`` (under the TorchFunctionMode), or ``"not audited yet"``."""
        verdict = self._lean.get(self.mode())
        if self.decision == "lookup":
            return "mode: a declared table lookup"
        if verdict is None:
            return "not audited yet"
        return "lean" if verdict[1] else f"mode: {verdict[2]}"

    def unproven(self) -> bool:
        """No decision established yet for the scope's current ``training`` flag."""
        return self.decision != "lookup" and self.mode() not in self.evidence

    def mode(self) -> tuple[bool, bool]:
        """What the evidence is kept by: the scope's ``training`` flag and whether gradients are on
        (a router may make other calls in each, Megatron's aux-loss top-k only with gradients)."""
        return bool(self.scope.training), torch.is_grad_enabled()

    def describe_mode(self) -> str:
        """The current mode in words, as a refusal names it: ``"train mode with gradients"`` and the like."""
        training, grad = self.mode()
        return f"{'train' if training else 'eval'} mode {'with' if grad else 'without'} gradients"

    def establish_hint(self) -> str:
        """What establishes the decision in the current mode, for a refusal of a compiled or captured first forward.

        The evidence is kept per mode: ``session.verify(example)`` runs without gradients, so it does not
        establish the mode of a compiled training step, and ``model.compile()`` leaves no other eager forward.
        """
        training, grad = self.mode()
        done = sorted(self.evidence)
        seen = (
            " (established so far: "
            + ", ".join(f"{'train' if t else 'eval'} mode {'with' if g else 'without'} gradients" for t, g in done)
            + ")"
            if done
            else ""
        )
        state = "model.train()" if training else "model.eval()"
        if not grad:
            return (
                f"Run one eager forward of the model after attach under {state} and torch.no_grad(){seen}: "
                "session.verify(example) does it"
            )
        return (
            f"Run one eager forward of the model after attach under {state} with gradients on{seen}: "
            "session.verify(example) runs without gradients, so it does not; call the uncompiled module, or the "
            "compiled one inside torch.compiler.set_stance('force_eager') (model.compile() leaves no other eager "
            "forward), once"
        )

    def _establish(
        self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], family: str | None
    ) -> Evidence | None:
        """:func:`establish` on these inputs, hidden from the session's own checks and run eagerly: the probe runs
        are not the forward's (a checkpoint's recompute makes none), and they run under a mode that torch.compile
        cannot trace (compiled code the forward calls runs eagerly there)."""
        with _hidden(), EAGER:
            return establish(
                self.name,
                self.scope,
                forward,
                args,
                kwargs,
                num_experts=self.num_experts,
                top_k=self.top_k,
                declared_top_k=self.declared_top_k,
                call=self.call,
                family=family,
            )

    def prove(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Evidence | None:
        """Establish the decision on these inputs (eager only; see :mod:`moe_replay.evidence`).

        None when the forward chose for no token (empty inputs): established at a later forward.
        """
        if _compiling() or _graph_capturing():
            raise UnsupportedRouterError(
                f"router '{self.name}' runs for the first time in {self.describe_mode()} inside torch.compile or "
                "CUDA graph capture, so which of its calls decides has not been established (that takes one eager "
                f"forward in that mode). {self.establish_hint()} before the compiled call or the graph capture"
            )
        family = self.decision if self.decision not in ("auto", "lookup") else None
        known = _KNOWN.setdefault(self.scope, {})
        key = (
            self.mode(),
            getattr(forward, "__func__", forward),
            self.call,
            family,
            self.top_k if self.declared_top_k else None,
            # (and the user's hooks inside the scope: a decision established before one was added, by an earlier
            # session, was never compared with what the forward returns with it)
            (_settings(self.scope), _user_hooks(self.scope)),
        )
        ev = known.get(key)
        stamps = _ARG_STAMPS.setdefault(self.scope, {})
        stamp = stamps.get(key)
        if ev is not None and stamp is not None and not stamp.holds(args, kwargs):
            ev = None  # (established by an earlier session with other settings among its forward's arguments)
        if ev is not None and self._has_twins(ev) and not self._still_holds(ev, forward, args, kwargs):
            ev = None  # (established by an earlier session, on inputs where another of its calls decided)
        if ev is not None and ev.chunks and self._chunks_moved(ev) is not None:
            ev = None  # (in chunks, and a tensor its modules hold changed since: which tokens a chunk holds may too)
        if ev is None and any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values())):
            raise UnsupportedRouterError(
                f"router '{self.name}' runs for the first time under a session on the meta device, where its "
                "decision cannot be established (that takes forwards with values). Run one forward of the model "
                "on a real device after attach (session.verify(example) does it), then move it to meta"
            )
        if ev is None:  # not established by an earlier session on this module
            # (the probe runs are not the forward's: a checkpoint's recompute makes none; and they run under the
            # mode, which torch.compile cannot trace: compiled code the forward calls runs eagerly there, also
            # where the forward itself runs outside the session's eager stance, idle)
            ev = self._establish(forward, args, kwargs, family)
            if ev is None:
                return None
            known[key] = ev
            stamp = stamps[key] = stamp_arguments(forward, args, kwargs, ev.num_experts)
            self._has_twins(ev)
            if ev.chunks:
                chunks = _CHUNKS_KNOWN.setdefault(self.scope, {})
                chunks[ev] = _ChunkState({(ev.chunk_dims, ev.count)}, _held_indices(self.scope))
        self._check_rows_fit(ev)
        shape = (ev.top_k, ev.num_experts)
        for mode, was in list(self.evidence.items()):
            if (was.top_k, was.num_experts) != (ev.top_k, ev.num_experts) and not any(
                v is was and k[-1] == key[-1] for k, v in known.items()
            ):  # established in another mode under other settings (its k, changed since): it no longer holds
                self._forget_modes({mode})
        other_mode, other = next(iter(self.evidence.items()), (None, None))
        if other_mode is not None and other is not None and (other.top_k, other.num_experts) != shape:
            then = "train" if other_mode[0] else "eval", "with" if other_mode[1] else "without"
            raise UnsupportedRouterError(
                f"router '{self.name}' chose {other.top_k} of {other.num_experts} experts in {then[0]} mode {then[1]} "
                f"gradients, but chooses {ev.top_k} of {ev.num_experts} in {self.describe_mode()}: one set of routes "
                "cannot serve both. If the model changed since (a gate's weight replaced by one of another width), "
                "set the attribute that says its width or k to the new value (out_features, num_experts, top_k): "
                "a changed setting establishes the decision again in every mode. If the router chooses otherwise "
                "by mode, name the decision with an Adapter. Nothing was recorded or forced"
            )
        self.evidence[self.mode()] = ev
        self._arg_stamps[self.mode()] = stamp
        if stamp is not None and stamp.tensors:
            self._arm_settings(stamp)
        self._dropped.pop(self.mode(), None)
        self._hooks_at = _HANDLES.next_id  # (first: a hook registered from here on is after these settings)
        self._hook_dicts = [
            *(
                d
                for m in self.scope.modules()
                if m is not self.scope
                for n in _HOOK_FNS
                if (d := vars(m).get(n)) is not None
            ),
            _GLOBAL_HOOKS,
            _torch_compat.global_forward_pre_hooks,
        ]
        self._hook_count = _count_user_hooks(self._hook_dicts)
        self._inner_hooked = _hooked_submodules(self.scope)
        self._pending = (self.mode(), _settings_and_held(self.scope))  # (the probe runs put every attribute back)
        self.top_k, self.num_experts = ev.top_k, ev.num_experts
        if self.on_established is not None:
            self.on_established(self)
        return ev

    def _arguments_changed(
        self, stamp: ArgumentStamp, args: tuple[Any, ...], kwargs: dict[str, Any], compiling: bool
    ) -> str:
        """The settings among this forward's arguments differ from those its decision was established with (see
        :mod:`moe_replay._arguments`): drop the decision of this mode, so that this forward establishes it again on
        them, and say what changed; refused in compiled code and inside a CUDA-graph capture, where it cannot be
        established (nor a tensor's value read)."""
        if compiling or _graph_capturing():
            changed = stamp.changed(args, kwargs, tensors=not compiling)
            raise UnsupportedRouterError(
                f"router '{self.name}': {changed}, or it could not be read here; its decision is established on "
                "the settings among its forward's arguments (a minimum weight, a temperature, a flag handed at each "
                "call), and a change establishes it again, which takes an eager forward, outside torch.compile and "
                "CUDA graph capture. Run one eager forward of the model with the new arguments first "
                "(session.verify(example) does it, or call the uncompiled module)"
            )
        why = f"a change of its forward's arguments: {stamp.changed(args, kwargs)}"
        self.forget(why=why)
        return why

    def _makes_its_calls(
        self, ev: Evidence, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        """Does this forward make the decision-like calls ``ev`` was established on? Asked, before each eager
        forward, of a router seen making other calls from one forward to the next in this mode (``_varies``): one run
        of its forward, its state put back. Where it makes others, the evidence of this mode is dropped (the caller
        establishes it afresh on this forward's inputs), rather than the forward refused at its first other call."""
        with _hidden(), EAGER, faults_refused(self.name):
            same = makes_its_calls(self.scope, forward, args, kwargs, ev)
        if not same:
            self.forget(
                why="a forward that makes other decision-like calls (a branch on its inputs, such as their number)"
            )
        return same

    def _has_twins(self, ev: Evidence) -> bool:
        """Does ``ev`` have twins (other calls over its decision's width)? Which of them dispatches may then hang on
        the forward's inputs (a branch on their values, a ``torch.where`` between two top-k), and the calls look the
        same whichever does: its decision is checked by its effect at every eager forward (``_restless``), as a
        router's that keeps a step count is. What the router returns does not spare it that: the indices it returns
        may be its decision's while a twin dispatches (a statistic returned for a loss beside a biased top-k that
        dispatches on some inputs)."""
        if not ev.twins:
            return False
        self._restless = True
        return True

    def _still_holds(
        self,
        ev: Evidence,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        why: str = _TWIN_DECIDES,
    ) -> bool:
        """Does the decision of ``ev`` still decide in this forward? Asked of a router whose forward makes other
        calls of its decision's form (``ev.twins``) and changes its modules' own attributes or 0-d flag buffers
        (``_restless``: a step count), or what its code changes outside them (a count in a global, a closure cell,
        a module-level dict), before each eager forward: which of those calls dispatches may hang on that state (a
        warm-up), and the calls look the same whichever does. The runs that check it put that state back; routers
        that change no state never come here. Where it no longer decides, the evidence of this mode is dropped (the
        caller establishes it afresh on this forward's inputs; ``why`` says, as :meth:`forget` takes it). Routers of
        one such call never come here."""
        if _in_backward():  # (a recompute gets its forward's rows)
            return True
        if _graph_capturing():
            if ev.twins:  # (a torch.where between two top-k branches inside a graph)
                raise UnsupportedRouterError(
                    f"router '{self.name}' makes other calls over its decision's width beside the one that decided "
                    "when it was established, and which of them dispatches is checked by its effect at each forward, "
                    "which a CUDA graph's replays cannot do: a graph captured now would record that one call at every "
                    "replay. Run this router eagerly, outside the graph (capture graphs of the parts around it)"
                )
            return True  # (a step count: a graph cannot branch on it)
        with _hidden(), EAGER, faults_refused(self.name):
            holds = still_decides(self.scope, forward, args, kwargs, ev)
        if not holds:
            self.forget(why=why)
        return holds

    def _check_rows_fit(self, ev: Evidence) -> None:
        """Refuse a decision whose k or E differs from the rows in use: routes for a router whose k no
        attribute said (checked only now), or a decision established again after the model changed
        inside a block. Forced rows of another k would be cut or padded, and a capture would mix rows of
        two shapes in one router's routes. Nothing is adopted, so every later forward in the block
        refuses too; the block's end clears the rows and the decision is adopted at the next one."""
        now = (ev.top_k, ev.num_experts)
        src = self.replay_source
        if src is not None and (src.top_k, src.num_experts) != now:
            why, by_mode = self._established_why((src.top_k, src.num_experts))
            raise RoutesValidationError(
                f"router '{self.name}' chooses {ev.top_k} of {ev.num_experts} experts ({why}), but the routes being "
                f"replayed hold rows of {src.top_k} of {src.num_experts} experts for it"
                + (
                    ". Nothing was forced in this forward; replay in the mode the routes were recorded in"
                    if by_mode
                    else ": they were recorded on another model, or before what changed. Nothing was forced in this "
                    "forward; leave the block and replay routes recorded on the model as it is now"
                )
            )
        ring = self.capture_ring
        if self.capturing and ring is not None and ring.host_written and (ring.top_k, ring.num_experts) != now:
            why, by_mode = self._established_why((ring.top_k, ring.num_experts))
            raise UnsupportedRouterError(
                f"router '{self.name}' now chooses {ev.top_k} of {ev.num_experts} experts ({why}), but this "
                f"capture already holds {ring.host_written} rows of {ring.top_k} of {ring.num_experts} experts for "
                "it, and one router's routes hold rows of one shape. Nothing was recorded in this forward; "
                + (
                    "capture each mode in a block of its own (routes(allow_partial=True) reads the rows recorded "
                    "before)"
                    if by_mode
                    else "start a new capture (routes(allow_partial=True) reads the rows recorded before)"
                )
            )

    def _established_why(self, rows: tuple[int, int]) -> tuple[str, bool]:
        """Why the decision of the mode now running is established at this forward, where the rows in use (of
        ``rows``: k, E) are of another shape, in words; and whether it is its first forward in a mode other than
        the one those rows' decision was established in (the router chooses otherwise by mode)."""
        mode = self.mode()
        dropped = self._dropped.get(mode)
        if dropped is not None:
            return f"its decision was established again at this forward, after {dropped}", False
        other = next((m for m, e in self.evidence.items() if m != mode and (e.top_k, e.num_experts) == rows), None)
        if other is not None:
            then = f"{'train' if other[0] else 'eval'} mode {'with' if other[1] else 'without'} gradients"
            return (
                f"its decision in {self.describe_mode()}, established at this forward, its first in that mode; it "
                f"chooses {rows[0]} of {rows[1]} in {then}: it chooses otherwise by mode",
                True,
            )
        return "its decision, established at this forward: the model changed since, or its routes are another's", False

    def _settle(self) -> None:
        """After the forward that followed an establishment: keep the settings it was established under, less
        the keys that forward changed itself (a count of its calls, a timing: its state, not a setting)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        mode, before = pending
        now = _settings_and_held(self.scope)
        self._own.update(k for k in before.keys() | now.keys() if before.get(k, _ABSENT) != now.get(k, _ABSENT))
        # what its code assigns (a flag set once a warning is given, a cache filled on first use, an entry of a
        # module-level registry): state it changes itself, whether or not that forward did
        self._own.update(_written(self.scope))
        # state of its own modules (a step count, private too), or state its code changes outside them that it reads
        # as it reads a setting (a step count in a global, an entry of a module-level dict): the runs that check its
        # decision put both back
        own, mine = self._own, _module_state(self.scope)
        self._restless = (
            self._restless
            or not own.isdisjoint(mine)
            or any(k not in mine and is_written(k, own) for k in before.keys() | now.keys())
            or any(reads_state(m, m.__dict__.get("forward")) for _, m in _scope_modules(self.scope))
        )
        if mode in self.evidence:
            self._settled[mode] = {k: v for k, v in before.items() if not is_written(k, own)}

    def changed_setting(self, around: frozenset[str] = frozenset()) -> str | None:
        """A setting of the scope changed since a decision in use was established (a cut turned on, a config
        flag that picks which call dispatches), in words; None when none did. A decision is established on
        the settings of its forward: under others, another call may decide, or a choice may follow it. Read at
        block boundaries, outside the forwards.

        ``around``: the attribute names the code of the modules on the way from the model to the scope assigns on
        other objects, a constant each time (see :func:`moe_replay._code_settings.assigned_on_others`). A setting
        of such a name that reads otherwise now than when the decision was established inside a forward is a flag
        the model's forward sets around its routers for the forward and puts back (MixtureKit's
        ``collect_aux_loss``): the value the router ran under is the one read at its establishment, inside; outside,
        it is compared with its value at the last block boundary instead, so a change of it between blocks (or
        one left by a forward that did not put it back) still counts."""
        self._settle()
        code = self._changed_code()
        if code is not None:
            return code
        for ev in self.evidence.values():
            moved = self._chunks_moved(ev) if ev.chunks else None
            if moved is not None:
                return moved
        outside, self._outside = self._outside, _around_values(self.scope, around) if around else None
        if not self._settled:
            return None
        # (the flags set around the routers read outside as at the last boundary: a change of any is a change)
        kept = outside is not None and outside == self._outside
        now = _settings_and_held(self.scope)
        own = self._own
        for mode, then in self._settled.items():
            if mode not in self.evidence:
                continue
            for key in then.keys() | now.keys():
                if then.get(key, _ABSENT) != now.get(key, _ABSENT) and not is_written(key, own):
                    if kept and key.rsplit(".", 1)[-1] in around:
                        continue  # (set by the model's forward around its routers, as it was outside before)
                    was, is_ = then.get(key, _ABSENT), now.get(key, _ABSENT)
                    if key == _HOOKS_KEY:
                        if self._hooks_changed(was, is_, _HANDLES.next_id) is None:
                            continue  # (only hooks its decision was established without removed)
                        return (
                            f"a forward hook was added or removed inside the scope of router '{self.name}'"
                            f"{_hooks_inside(self.scope, short=True)}, or a global module hook, since its decision "
                            "was established"
                        )
                    return (
                        f"'{key}' of router '{self.name}' is {'unset' if is_ is _ABSENT else repr(is_)}, but was "
                        f"{'unset' if was is _ABSENT else repr(was)} when its decision was established"
                    )
        return None

    def ids_settings(self, always: bool = False) -> tuple[tuple[str, str], ...] | None:
        """The settings of the scope now, ``(key, repr(value))``, where a decision of this router in use returns no
        indices of its decision call to its caller (see :meth:`_check_returned`): its ids pass through code after the
        decision (a remap by an offset in its code, or in a hook of its modules), which may read them, so the rows
        recorded (the top-k's) name the experts run only under those values. A decision not answered by one top-k
        (an ``argmax``, a sort, a pick in slots) is not learned to return its indices as they are, so it counts as
        such a decision. None where every decision in use returns its call's indices as they are (no code after it
        makes the ids), or none is known yet. Its floating tensors (weights a training step updates) and its hooks
        are left out: they change the scores, or are checked at each forward. Its tensors of integers or booleans (a
        table of the experts each id names, a buffer a placement updates in place) are kept by their values (see
        :func:`_held_values`): the ids remapped through them name other experts once they are written. What its code
        (or a hook of its modules) assigns, or a forward of it was seen to change (a count of its calls, in a buffer
        too: see :meth:`_settle`), is its state, not a setting, and is left out too: it moves with every forward, the
        replay's own as well. So is a setting read only to compute what its decision calls are handed (a temperature
        dividing the scores: see :meth:`_read_before`): it moves the scores alone, which a replay recomputes. Read as
        a capture ends, outside the forwards. ``always``: the settings now, whatever its decisions return (a replay
        compares them with those a capture kept)."""
        if not always and not any(
            ev in self._unanswered or ((known := self._returned_at.get(ev)) is not None and known[0] is None)
            for ev in self.evidence.values()
        ):
            return None
        now = _settings_and_held(self.scope)
        own = self._own | _written(self.scope)
        kept = {
            key: repr(value)
            for key, value in now.items()
            if key != _HOOKS_KEY and not isinstance(value, HeldStamp | torch.Tensor) and not is_written(key, own)
        }
        for key, value in now.items():
            if isinstance(value, HeldStamp) and not is_written(key, own):
                values = _held_values(value)
                if values is not None:
                    kept[key] = values
        if not always:
            before = self._read_before(kept)
            kept = {k: v for k, v in kept.items() if k not in before}
        out = _by_attribute(self.scope, kept)
        after = self._read_after()
        if always or after is None or after("training"):
            out[_TRAINING_KEY] = _training_flags(self.scope)
        for name in _cached_functions(self.scope):
            if always or (after(name) if after is not None else _named_by_classes(self.scope, name)):
                out[f"{name}{CACHED_SUFFIX}"] = "its cached results"
        return tuple(sorted(out.items()))

    def _read_after(self) -> Callable[[str], bool] | None:
        """Whether the code of the scope (or a hook of the user's on its modules) may read a name after its decision
        (see :func:`moe_replay._code_settings.read_after_calls`; the calls as their establishment saw them made),
        by name: ``training`` so read remaps its ids by mode, which ``train()`` or ``eval()`` between the capture
        and the replay would change; read only before (jitter on the scores, a dropout), it moves the scores alone,
        which a replay recomputes. None where that code is not read completely, or a decision call's place in it is
        not known: any name may be."""
        sites: dict[types.CodeType, set[int]] = {}
        for ev in self.evidence.values():
            for k in ev.decision:
                site = ev.calls[k].site
                if site is None:
                    return None
                sites.setdefault(site[0], set()).add(site[1])
        hooks = _hook_reads(self.scope)
        if not sites or not hooks.complete:
            return None
        codes = modules_codes_read([m for m in self.scope.modules() if type(m) not in _PLAIN_CONTAINERS])
        if codes is None:  # (what its classes' functions, and the functions of their modules those name, hold)
            codes = _classes_codes(self.scope)
            if codes is None:
                return None
        at = {code: frozenset(offsets) for code, offsets in sites.items()}
        return lambda name: name in hooks.names or read_after_calls(codes, at, name)

    def _read_before(self, settings: dict[str, str]) -> set[str]:
        """The keys of ``settings`` the code of the scope reads only to compute what its decision calls are handed
        (see :func:`moe_replay._code_settings.only_into_calls`; the calls as their establishment saw them made): a
        module's own attribute, a global, a class attribute or a closure cell, each of whose reads in that code goes
        straight into a decision call. Empty where the code, or that of a hook of the user's on its modules, is not
        read completely, or a decision call's place in it is not known. A setting read anywhere else (after the
        decision, in a hook, by a helper it is handed to, or one a config object holds) is kept."""
        sites: dict[types.CodeType, set[int]] = {}
        for ev in self.evidence.values():
            for k in ev.decision:
                site = ev.calls[k].site
                if site is None:
                    return set()
                sites.setdefault(site[0], set()).add(site[1])
        hooks = _hook_reads(self.scope)
        if not sites or not hooks.complete:
            return set()
        codes = modules_codes_read([m for m in self.scope.modules() if type(m) not in _PLAIN_CONTAINERS])
        if codes is None:
            return set()
        at = {code: frozenset(offsets) for code, offsets in sites.items()}
        out: set[str] = set()
        for key in settings:
            name = _setting_name(self.scope, key)
            if name is not None and name not in hooks.names and only_into_calls(codes, at, name):
                out.add(key)
        return out

    @property
    def reestablishing(self) -> bool:
        """Its decision was dropped after a change of its settings or code (see :meth:`follow_settings`) and is
        not established again yet: the k and E it had are no longer known to hold."""
        return bool(self._dropped) and not self.evidence

    def _changed_code(self) -> str | None:
        """The code a lean forward of this router reaches, changed since it was read (a method it calls patched on
        the router or its class, a helper module's function replaced), in words; None where none did. Its lean
        forwards would run the new code unseen by the wrappers (a tensor method's mask, say), so like a changed
        setting it drops what was established."""
        own = {key.rsplit(".", 1)[-1] for key in self._own}  # (what its own forward assigns: its state, not code)
        for verdict in self._lean.values():
            witness = verdict[3]
            changed = witness.changed(own) if witness is not None else None
            if changed is not None:
                return f"{changed} (code that router '{self.name}' runs)"
        return None

    def follow_settings(self, around: frozenset[str] = frozenset()) -> None:
        """Drop the decisions established under settings of the scope that changed since (see
        :meth:`changed_setting`, and ``around`` there), or whose lean forwards reach code changed since: each is
        established again at its mode's next forward. Run as a block starts."""
        if self._settled or self._lean or around:
            changed = self.changed_setting(around)
            if changed is not None:
                self.forget(every_mode=True, why=f"a change of its settings or code: {changed}")

    def follow_hooks(self) -> None:
        """At a forward in a block, where torch made a hook since this router last looked (``HOOK_HANDLES.next_id``
        moved: any hook, anywhere, moves it): drop its decisions where hooks of the user's were added inside its
        scope, or global module hooks, since they were established, so that this forward establishes its decision
        again with them (see :func:`_user_hooks`: they are a setting of the decision). The runs that establish it
        set the new hooks of the scope's submodules aside, and what this forward returns is compared with them (see
        :meth:`_hooks_checked`): a hook that only reads or logs changes nothing, and the replay goes on exactly; one
        that cuts the combine weights, or changes the decision, is refused there as the forward's own code would be.

        Only hooks registered since this router last looked, every one of those the decisions were established
        under still there: the forwards of this router before ran without them (each started with the count as it
        was). A hook removed, one put in a module's hook dict by other means, or one on a submodule added since, is
        left to the block's end, which refuses a block whose router ran under settings its decision was not
        established under (see :meth:`changed_setting`). Where the hook dicts of its submodules (as they were when
        its decision was established) and the global ones hold no more hooks of the user's than when it last looked,
        none was added there: nothing more is read (torch's count moves with every tensor's hook too, at each
        forward under FSDP)."""
        if _in_backward() or _graph_capturing() or self._pending is not None:
            return  # (a recompute gets its forward's rows; a graph capture cannot establish: the block end refuses)
        at, self._hooks_at = self._hooks_at, _HANDLES.next_id
        count, was = _count_user_hooks(self._hook_dicts), self._hook_count
        self._hook_count = count
        if count <= was or not self._settled or is_written(_HOOKS_KEY, self._own):
            return  # (none added to the hook dicts it holds: a tensor's hook, one elsewhere; or one removed as well,
            # or added to a submodule added since: refused as the block ends)
        now = _user_hooks(self.scope)
        changes = {self._hooks_changed(then.get(_HOOKS_KEY, now), now, at) for m, then in self._settled.items()}
        if changes == {"added"} or changes == {None, "added"}:  # (another change: refused as the block ends)
            self.forget(
                every_mode=True,
                why=f"a forward hook added inside a block inside the scope of router '{self.name}'"
                f"{_hooks_inside(self.scope, short=True)}, or a global module hook",
            )

    def _hooks_changed(self, was: tuple[tuple[str, int], ...], now: tuple[tuple[str, int], ...], at: int) -> str | None:
        """How the user's hooks of the scope (see :func:`_user_hooks`) changed from ``was``, those a decision was
        established under, to ``now``: None where they did not, or only by every hook of its submodules removed
        where its decision was established with them set aside (its forwards then run as the runs that established
        it did; with some of them left, they would run under a set of hooks no run saw); ``"added"`` where, besides,
        hooks were registered since torch had made ``at`` hooks; ``"other"`` otherwise (a global module hook
        removed, some hooks of the submodules removed, a hook put in a module's hook dict by other means)."""
        then, here = set(was), set(now)
        gone = then - here
        if gone and (self.scope in HOOKS_NEEDED or gone != {h for h in then if h[0] not in _GLOBAL_KINDS}):
            return "other"
        new = here - then
        if not new:
            return None
        return "added" if all(key >= at for _, key in new) else "other"

    def forget(self, *, every_mode: bool = False, why: str | None = None) -> None:
        """Drop the evidence of the mode now running, or of every mode (here and for later sessions): it no
        longer holds. ``why``: what happened, in words (``after ...``), for a refusal of the rows in use once the
        decision is established again (see :meth:`_established_why`)."""
        self._forget_modes({*self.evidence, *self._lean} if every_mode else {self.mode()}, why)

    def _forget_modes(self, modes: set[tuple[bool, bool]], why: str | None = None) -> None:
        """Drop the evidence of ``modes``, here and for later sessions."""
        known = _KNOWN.get(self.scope)
        for mode in modes:
            if why is not None and mode in self.evidence:
                self._dropped[mode] = why
            dropped = self.evidence.pop(mode, None)
            if dropped is not None and not dropped.chunks:
                self._calls_dropped[mode] = tuple(c.signature for c in dropped.calls)
            self._lean.pop(mode, None)
            self._settled.pop(mode, None)
            self._arg_stamps.pop(mode, None)
            if known is not None:
                stamps = _ARG_STAMPS.get(self.scope)
                for key in [k for k in known if k[0] == mode]:
                    del known[key]
                    if stamps is not None:
                        stamps.pop(key, None)
        self._armed = None
        self._arg_stamp = None
        self._form = None

    def _arm(self, ev: Evidence) -> None:
        """The plan of the mode now running: built when it changes in eager code, at every trace when compiled."""
        if ev.chunks:  # (every call of a forward is one of its chunks, as many as its tokens make)
            self._plan, self._mirrors, self._others = _EveryCall(ev.calls[0].signature), {}, {}
        else:
            self._plan = {i: ev.calls[i].signature for i in ev.decision}
            self._mirrors = {i: ev.calls[i].signature for i in (*ev.mirrors, *ev.followers)}
            tokens = {ev.calls[i].rows for i in ev.decision}
            plan = self._plan
            self._others = {c.ordinal: c.signature for c in ev.calls if c.ordinal not in plan and c.width not in tokens}
        self._armed = ev
        self._arg_stamp = self._arg_stamps.get(self.mode())
        self._chunks = ev.chunks
        self._form = None

    # ------------------------------------------------------------- decisions in chunks
    def _chunk_state(self, ev: Evidence) -> _ChunkState:
        """What the decision of ``ev``, made chunk by chunk of the tokens, was shown to hold on (shared by the
        sessions on this scope)."""
        known = _CHUNKS_KNOWN.setdefault(self.scope, {})
        state = known.get(ev)
        if state is None:
            state = known[ev] = _ChunkState({(ev.chunk_dims, ev.count)})
        return state

    def _chunks_moved(self, ev: Evidence) -> str | None:
        """A tensor of integers or booleans the scope's modules hold that changed since the last forward of the
        decision of ``ev`` in chunks (or since it was established), in words; None where none did."""
        state = _CHUNKS_KNOWN.setdefault(self.scope, {}).get(ev)
        moved = None if state is None or state.held is None else _held_moved(state.held, self.scope)
        if moved is None:
            return None
        return (
            f"'{moved}' of router '{self.name}' (a tensor of integers or booleans, or a list of them, it holds) "
            "changed since its last "
            "forward, and its decision is made chunk by chunk of the tokens: which tokens each chunk holds may hang "
            "on it (an order, a chunk size)"
        )

    def _chunks_begin(
        self, ev: Evidence | None, args: tuple[Any, ...], kwargs: dict[str, Any], compiled: bool
    ) -> tuple[int, int | None, int, int, int, bool, bool] | None:
        """A forward of a decision made chunk by chunk of the tokens begins: refused where a tensor its modules hold
        changed since its last forward; in a replay whose token check guards the reads, the rows of all of its
        tokens are cleared at once, as for one call of them all (its chunks then read within them). Returns what
        :meth:`_chunks_end` compares: the dimensions and tokens of its hidden states, the capture's calls and rows
        and the replay's rows so far, whether the host counts them, and whether the forward is being compiled."""
        if ev is None or not ev.chunks:
            return None
        if not compiled:
            moved = self._chunks_moved(ev)
            if moved is not None:
                self.forget(every_mode=True, why=f"a change of a tensor it holds: {moved}")
                raise UnsupportedRouterError(
                    f"{moved}, so the calls of this forward are not shown to be runs of its tokens in order: "
                    "nothing was recorded or forced. The decision is established again at the next forward (its "
                    "first forward in a block, once such a change is made between blocks)"
                )
        found = _first_floating((args, kwargs))
        dims = 0 if found is None else found[1].dim()
        tokens = None if found is None else found[1].numel() // max(int(found[1].shape[-1]), 1)
        ring, src = self.capture_ring, self.replay_source
        eager = self._eager and not compiled and not _in_backward()
        if eager and tokens and self.replaying and src is not None and src.guard is not None:
            at = src.host_consumed
            if src.cleared < at + tokens <= src.num_rows:
                src.guard(self.name, at, tokens)  # (it raises where no forward the token check saw was fed them)
        return (
            dims,
            tokens,
            0 if ring is None else ring.calls_made(),
            0 if ring is None else ring.host_written,
            0 if src is None else src.host_consumed,
            eager,
            compiled,
        )

    def _chunks_end(
        self,
        began: tuple[int, int | None, int, int, int, bool, bool],
        ev: Evidence | None,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """A forward of a decision made chunk by chunk of the tokens returned: its calls' rows are counted as one
        call of them all; they must be one per token it was fed; a number of calls (on hidden states of a number of
        dimensions) never shown to be runs of the tokens in order is proven now, on this forward's inputs, or
        refused (compiled: refused as it is traced); the tensors its modules hold are noted as this forward left
        them."""
        dims, tokens, made, written, read, eager, compiled = began
        count = self._ordinal
        assert ev is not None
        state = self._chunk_state(ev)
        if compiled:
            if count > 1 and (dims, count) not in state.shown:
                raise UnsupportedRouterError(
                    f"router '{self.name}' routes its tokens chunk by chunk, and this compiled forward makes {count} "
                    f"calls on hidden states of {dims} dimensions: a number of chunks never shown, eagerly, to be "
                    "runs of its tokens in order. Run one eager forward of this shape first (outside torch.compile, "
                    "or inside torch.compiler.set_stance('force_eager')); nothing was recorded or forced"
                )
            return
        ring, src = self.capture_ring, self.replay_source
        if ring is not None:
            ring.join_since(made)
        if not count:  # (no decision: _check_ran refuses)
            return
        if eager:
            rows = max(
                0 if ring is None else ring.host_written - written, 0 if src is None else src.host_consumed - read
            )
            if rows and tokens is not None and rows != tokens:
                self.forget(why=f"a forward whose {count} calls in chunks chose for {rows} rows of its {tokens} tokens")
                raise UnsupportedRouterError(
                    f"router '{self.name}' routes its tokens chunk by chunk, and the {count} calls of this forward "
                    f"chose for {rows} rows, where it was fed {tokens} tokens: its chunks are not every token once "
                    "(a chunk left out, or a call on other rows), so the rows recorded or forced are not shown to be "
                    "its tokens'. The decision is established again at the next forward"
                )
        if count > 1 and (dims, count) not in state.shown and not _in_backward():
            if not self._eager:  # (inside CUDA-graph capture: the runs that prove it are not made there)
                raise UnsupportedRouterError(
                    f"router '{self.name}' routes its tokens chunk by chunk, and this forward, captured in a CUDA "
                    f"graph, makes {count} calls on hidden states of {dims} dimensions: a number of chunks never "
                    "shown, eagerly, to be runs of its tokens in order. Run one eager forward of this shape before "
                    "the graph capture; its rows were recorded or forced in call order: this forward is refused"
                )
            why = ""
            try:
                again = self._establish(
                    forward, args, kwargs, self.decision if self.decision not in ("auto", "lookup") else None
                )
            except UnsupportedRouterError as e:
                again, why = None, f": {e}"
            if (
                again is not None
                and again.chunks
                and again.count == count
                and again.calls[0].signature == ev.calls[0].signature
            ):
                state.shown.add((dims, count))
            else:
                self.forget(why=f"a forward of {count} calls that are not shown to be chunks of its tokens")
                raise UnsupportedRouterError(
                    f"router '{self.name}' routes its tokens chunk by chunk ({ev.count} calls when its decision "
                    f"was established), and this forward made {count} calls on hidden states of {dims} dimensions, "
                    "which are not each a run of its tokens in order, together every token once, on these inputs"
                    f"{why or ''}. Its rows were recorded or forced in call order: this forward is refused; the "
                    "decision is established again at the next forward"
                )
        state.held = _held_indices(self.scope)

    def _may_grow(self, i: int, sig: tuple[str, int, int]) -> bool:
        """Is decision-like call #``i`` (no call of its plan) the second chunk of a decision established as one call
        (first run on fewer tokens than one chunk)? The second call of this eager forward, after the decision, of
        its very signature; the forward is proven to route in chunks as it ends (see :meth:`_grow_into_chunks`)."""
        ev = self._armed
        return (
            i == 1
            and ev is not None
            and not ev.chunks
            and ev.count == 1
            and ev.decision == (0,)
            and ev.calls[0].signature == sig
            and self._decided
            and self._eager
            and not self._compiled
            and not self._recompute
            and not _compiling()
            and not _in_backward()
            and self.decision != "lookup"
        )

    def _grow_into_chunks(self, sig: tuple[str, int, int]) -> None:
        """Take this forward's decision-like calls of ``sig`` as chunks of its tokens from its second one on (the
        decision was established on a forward of one call): each records or is forced with the next rows, and the
        forward's end proves, on its own inputs, that they are runs of its tokens in order, or refuses it."""
        ring, src = self.capture_ring, self.replay_source
        wrote = ring is not None and self.capturing and not self.verifying  # (the first call's rows: recorded,
        read = src is not None and self.replaying  # or read, or both)
        first = ring.last_call_rows() if wrote and ring is not None else src.last_read if read and src else 0
        self._grown = (
            0 if ring is None else ring.calls_made() - (1 if wrote and first else 0),
            0 if ring is None else ring.host_written - (first if wrote else 0),
            0 if src is None else src.host_consumed - (first if read else 0),
        )
        self._plan, self._mirrors, self._others = _EveryCall(sig), {}, {}
        self._chunks, self._slots = True, []  # (the first call's row was recorded: the next call starts a row)
        self._armed = None  # (the plan is this forward's: armed again from the evidence at the next one)

    def _grown_end(
        self,
        grown: tuple[int, int, int],
        ev: Evidence,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Evidence:
        """A forward grown into chunks (see :meth:`_grow_into_chunks`) returned: its calls' rows count as one call
        of them all, one per token it was fed; its calls are proven, on its inputs, to be runs of its tokens in
        order (the decision then is established in chunks, as if first run on this forward), or it is refused."""
        made, written, read = grown
        count = self._ordinal
        ring, src = self.capture_ring, self.replay_source
        if ring is not None:
            ring.join_since(made)
        found = _first_floating((args, kwargs))
        dims = 0 if found is None else found[1].dim()
        tokens = None if found is None else found[1].numel() // max(int(found[1].shape[-1]), 1)
        rows = max(0 if ring is None else ring.host_written - written, 0 if src is None else src.host_consumed - read)
        why = ""
        if rows and tokens is not None and rows != tokens:
            again = None
            why = f": its calls chose for {rows} rows, where it was fed {tokens} tokens"
        else:
            try:
                again = self._establish(
                    forward, args, kwargs, self.decision if self.decision not in ("auto", "lookup") else None
                )
            except UnsupportedRouterError as e:
                again, why = None, f": {e}"
        if (
            again is None
            or not again.chunks
            or again.count != count
            or again.calls[0].signature != ev.calls[0].signature
            or (again.top_k, again.num_experts) != (ev.top_k, ev.num_experts)
        ):
            self.forget(why=f"a forward of {count} calls where it made one when it was established")
            raise UnsupportedRouterError(
                f"router '{self.name}' made one decision-like call in the forward its decision was established on "
                f"({ev.describe()}), and {count} of that signature in this forward, which are not shown to be each a "
                f"run of its tokens in order, together every token once, on these inputs{why}. Its rows were "
                "recorded or forced in call order: this forward is refused; the decision is established again at "
                f"the next forward{_hooks_inside(self.scope)}"
            )
        self._adopt(ev, again)
        _CHUNKS_KNOWN.setdefault(self.scope, {})[again] = _ChunkState(
            {(again.chunk_dims, again.count), (dims, count)}, _held_indices(self.scope)
        )
        self._arm(again)
        return again

    # ------------------------------------------------------------- scope forward
    def __reduce__(self) -> tuple[Any, ...]:
        # a copy of the model (deepcopy, pickle) reaches a hook only through another wrapper's attributes that
        # functools.update_wrapper copied from the session's (accelerate's add_hook_to_module after attach):
        # the copy has no session, so it holds None there (the hook's lock and rings cannot be copied)
        return (type(None), ())

    def _run(
        self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], lean_ok: bool = True
    ) -> Any:
        compiling = _compiling()
        if not compiling and not getattr(_UNCOMPILED, "on", False):
            return _uncompiled(RouterHook._run, self, forward, args, kwargs, lean_ok)
        ev: Evidence | None = None
        how = "mode"
        fresh = False  # the decision was established at this forward
        if self.decision != "lookup":
            if not compiling and _HANDLES.next_id != self._hooks_at and (self.capturing or self.replaying):
                self.follow_hooks()  # (a hook added inside its scope in a block: established again at this forward)
            mode = self.mode()
            ev = self.evidence.get(mode)
            stamp = self._arg_stamps.get(mode) if ev is not None else None
            moved = None  # (the settings among its arguments that changed since, in words)
            if stamp is not None and not stamp.holds(args, kwargs, not compiling) and (compiling or not _in_backward()):
                moved = self._arguments_changed(stamp, args, kwargs, compiling)
                ev = None  # (established afresh on this forward's arguments)
            elif compiling and stamp is not None and stamp.tensors and (flag := self._settings_moved) is not None:
                stamp.mark_moved(flag, args, kwargs)  # (a tensor setting's value, compared on the device)
                self._settings_compared = True
            if ev is not None and mode in self._varies and not compiling and not ev.chunks and not _in_backward():
                if not _graph_capturing() and not self._makes_its_calls(ev, forward, args, kwargs):
                    ev = None  # (established afresh on this forward's inputs)
            if ev is not None and self._restless and ev.twins:
                if compiling:
                    # which of its twin calls dispatches is checked by its effect at each forward, which compiled
                    # code cannot do (a 0-d torch.where between two top-k traces into one graph): this router's
                    # forward runs eagerly, at a graph break (fullgraph=True refuses that break)
                    return _uncompiled(_run_nested, self, forward, args, kwargs, lean_ok)
                if not self._still_holds(ev, forward, args, kwargs):
                    ev = None  # another of its calls of the decision's form decides now: established afresh
            if ev is None:
                PREDICTED.pop(self.scope, None)
                try:
                    ev = self.prove(forward, args, kwargs)
                except UnsupportedRouterError as e:
                    if moved is None:
                        raise
                    raise UnsupportedRouterError(
                        f"{e}. (Its decision was established again at this forward, after {moved})"
                    ) from None
                fresh = ev is not None
                was = self._calls_dropped.pop(mode, None)
                if ev is not None and was is not None and not ev.chunks and was != tuple(c.signature for c in ev.calls):
                    self._varies.add(mode)  # (other calls than the forward before: checked before each forward)
            if ev is None:  # no token to choose for: nothing to record or force
                if not compiling:
                    self.calls += 1
                    return run_unestablished(self.name, self.scope, forward, args, kwargs)
                return forward(*args, **kwargs)
            if compiling or ev is not self._armed:
                self._arm(ev)
            if not compiling and lean_ok and ev.axis is None:  # (a choice along another dimension: the mode alone)
                lean = self._lean.get(mode)
                how = (
                    "audit"
                    if lean is None or lean[0] is not ev
                    else "lean"
                    if lean[1] and not (lean[4] and _lean.code_in_arguments(args, kwargs))
                    else "mode"  # (code handed to it in this forward is no code its audit read)
                )
        self._decided = False
        self._ordinal = 0
        self._answered = self._looked_up = None
        self._masks = []
        self._slots, self._row, self._source = [], None, None
        self._fast = None  # (the lean fast path is ScopedForward's alone)
        # where this forward runs, found once for its decision: eager or not, and its checkpoint regions
        self._compiled = compiling
        self._eager = not compiling and not _graph_capturing()
        self._regions = [] if compiling else _regions()
        self._entry_grad = torch.is_grad_enabled()
        chunks = None
        state = NESTING
        watch = decider = None
        # each change below that a finally undoes is made inside its try, or with Ctrl-C held until the try is in
        # place (release: called there, and again, harmlessly, by the outer finally)
        release = _no_hold
        try:
            if ev is not None and ev.hooks_aside and self._inner_hooked and self._eager and not _in_backward():
                # its decision was established with the user's hooks inside set aside, shown to change nothing on
                # that forward alone: each must hand on what it is given at this one too (see moe_replay._inner_hooks)
                watch = HookWatch(self._inner_hooked, _user_hook)
                watch.install()
            if self._chunks:  # (its calls joined as it returns)
                chunks = self._chunks_begin(ev, args, kwargs, compiling)
            if how == "lean":
                release = hold_interrupts()  # (the wrappers' depth raised: held until the try that lowers it)
                if not _lean.enter():  # another library wraps one of the names: the mode
                    _lean.leave()
                    release()
                    how = "mode"
            if how == "lean":  # the lean wrappers hand this forward's decision-like calls to on_lean
                try:
                    state.lean = self
                    release()
                    out = forward(*args, **kwargs)
                finally:
                    state.lean = None
                    _lean.leave()
            elif how == "audit":  # the mode decides, and checks that every call it acts on came through a wrapper
                self._missed = False
                release = hold_interrupts()  # (held until the try that sets both back)
                auditing, state.auditing = state.auditing, True
                _lean.enter()
                try:
                    release()
                    decider = _DecisionMode(self, compiling, audit=True)
                    with decider:
                        out = forward(*args, **kwargs)
                finally:
                    state.auditing = auditing
                    _lean.leave()
            else:
                decider = _DecisionMode(self, compiling)
                if ev is None or ev.axis is None:
                    with decider:
                        out = forward(*args, **kwargs)
                else:  # (a choice along another dimension than the last, read moved last inside the decider)
                    with decider, MovedAxis(ev.axis):
                        out = forward(*args, **kwargs)
        except BaseException:
            if decider is not None:  # (a Ctrl-C inside the mode's __enter__, after its push: its with never popped it)
                _torch_compat.drop_function_mode(decider)
            raise
        finally:
            try:
                if watch is not None:
                    watch.remove()
                self._masks = []
                seen, self._slots, self._row, self._source, self._regions = len(self._slots), [], None, None, []
                self._choice = None
                grown, self._grown = self._grown, None
                if grown is not None:  # (armed again from the evidence: by _grown_end, or at the next forward)
                    self._chunks = False
                if self._pending is not None:  # the decision was established at this forward
                    self._settle()
            finally:
                release()  # (last: a Ctrl-C held is raised once everything above is undone)
        changed = watch.changed if watch is not None else None
        if (fresh or changed is not None) and ev is not None:
            ev = self._hooks_checked(ev, out, forward, args, kwargs, changed)
        if chunks is not None:  # a decision chunk by chunk of the tokens: one call of every row, as one of a call
            self._chunks_end(chunks, ev, forward, args, kwargs)
        elif grown is not None and ev is not None:  # its second call of one established as one: chunks, proven now
            ev = self._grown_end(grown, ev, forward, args, kwargs)
        if not compiling:
            self.calls += 1
            self._check_ran(ev, seen)
            if ev is not None:
                self._check_returned(ev, out, forward, args, kwargs)
            elif self._looked_up is not None:
                self._check_lookup_returned(out)
            if how == "audit" and ev is not None:  # later forwards in this mode go lean when every call came
                # through a wrapper, and no other branch of the router's code could make one that does not
                witness = _lean.CodeWitness()
                places = _lean.bypasses(forward, witness) + _lean.held_in_arguments(args, kwargs)
                why = (
                    f"its code calls {places[0]}, not through torch's function"
                    if places
                    else "a call the mode acted on did not come through torch's function"
                    if self._missed
                    else "its forward makes other calls over its decision's width: which of them decides (by a step "
                    "count, by its inputs' values) is checked at each forward"
                    if ev is not None and self._restless and ev.twins
                    else ""
                )
                scan = not _lean.takes_only_tensors(forward, args, kwargs)
                self._lean[self.mode()] = (ev, not why, why, None if why else witness, scan)
        return out

    def _hooks_checked(
        self,
        ev: Evidence,
        out: Any,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        changed: str | None = None,
    ) -> Evidence:
        """The evidence of the forward that established ``ev`` and returned ``out``, checked against the user's
        forward hooks inside the scope.

        The runs that establish a decision set the user's hooks of the scope's submodules aside, so that a hook that
        counts or logs sees one forward. The real forward runs them: where it returned other values than those runs
        did on its inputs (see :data:`~moe_replay.evidence.PREDICTED`), a hook changes what the forward
        computes (a bias on a gate's logits, a cast, or a choice: a cut of the combine weights after the top-k), and
        the decision is established again with the hooks in (the scope joins ``HOOKS_NEEDED``): a choice a hook makes
        is then seen as the forward's own code's. Where that refuses, or finds another decision than the one this
        forward recorded or forced, this forward is refused. A replay's forward is forced: it is compared with a run so
        forced with its rows (:func:`~moe_replay.evidence.forced_leaves`), and where none can be made (a decision in
        slots, an ``argmax``), the decision is established again with the hooks in as well.

        ``changed``: at a later forward of a decision so established, the hooks (named) that handed on other values
        than they were given (see :mod:`moe_replay._inner_hooks`): shown to change nothing on the forward that
        established it alone (a cut that cut nothing on its tokens), they do on this one's, so the decision is
        established again with them in on this forward's inputs, and this forward refused where that refuses or
        finds another decision."""
        predicted = PREDICTED.pop(self.scope, None)
        if changed is None:
            if predicted is None:  # (no hook of the user's was set aside)
                return ev
            base: list[Any] | None = predicted[0]
            if self.replaying:  # forced: compared with such a run forced with the same rows, where one can be made
                with _hidden(), EAGER, faults_refused(self.name):
                    base = forced_leaves(self.scope, forward, args, kwargs, ev, self._answered)
            if base is not None and not differs(base, out, predicted[1]):
                return ev
        HOOKS_NEEDED.add(self.scope)
        lead = (
            f"router '{self.name}': the forward of {type(self.scope).__name__} returned other values than the runs "
            "that established its decision on the same inputs, with the forward hooks of its submodules set aside "
            f"(so that hooks counting or logging see one forward){_hooks_inside(self.scope, short=True)}: a hook "
            "changes what it computes, so its decision was established again with them in"
            if changed is None
            else f"router '{self.name}': {changed} handed on other values than they were given at this forward "
            f"(replaced or changed in place){_hooks_inside(self.scope, short=True)}, where its decision was "
            "established with the forward hooks of its submodules set aside (so that hooks counting or logging see "
            "one forward) on a forward where they changed nothing: a hook changes what it computes, so its decision "
            "was established again with them in, on this forward's inputs"
        )
        family = self.decision if self.decision not in ("auto", "lookup") else None
        try:
            again = self._establish(forward, args, kwargs, family)
        except UnsupportedRouterError as e:
            self.forget(why="a forward hook inside its scope changed its output")
            raise UnsupportedRouterError(
                f"{lead}, and there: {str(e).removeprefix(f'router {self.name!r}: ')}"
            ) from None
        if (
            again is None
            or again.decision != ev.decision
            or [again.calls[i].signature for i in again.decision] != [ev.calls[i].signature for i in ev.decision]
        ):
            self.forget(why="a forward hook inside its scope changed its output")
            raise UnsupportedRouterError(
                f"{lead}, and with them another call decides ({again.describe() if again is not None else 'none'}; "
                f"without them: {ev.describe()}). This forward is refused (its rows were recorded or forced by the "
                "other); the next forward runs with the decision established with the hooks in"
            )
        self._adopt(ev, again)
        self._has_twins(again)
        if again.chunks:
            _CHUNKS_KNOWN.setdefault(self.scope, {})[again] = _ChunkState(
                {(again.chunk_dims, again.count)}, _held_indices(self.scope)
            )
        self._arm(again)
        return again

    def _refused_lean(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A lean forward refused at :class:`ScopedForward` (another library wraps one of torch's names since
        it was imported): this forward runs under the mode, nested as :class:`ScopedForward` nests."""
        state = NESTING
        state.depth += 1
        outer, state.lean = state.lean, None
        try:
            return self._run(forward, args, kwargs, lean_ok=False)
        finally:
            state.depth -= 1
            state.lean = outer

    def guard_output(self, out: Any) -> None:
        """A forward of the scope returned ``out`` in a block, and forward hooks (the module's, or global ones) run
        after it: have the last of them check that they left its indices as they were.

        Traced by dynamo, the hooks are traced with the forward and the check is made as they are (see
        :meth:`OutputGuard.expect_traced`): the guard must be there and last already (compiled code cannot add
        one), as :meth:`prepare_guard` leaves it as a block starts."""
        if not (self.capturing or self.replaying or self.verifying):
            return
        compiling = _dynamo_compiling()
        if not (self.wrapped or runs_foreign_hooks(self.scope)):  # (only moe_replay's own: its watch, this guard)
            if not compiling:
                self.drop_guard()
            return
        if not compiling:
            self.install_guard().expect(self.scope, out)
            return
        guard = self._guard
        if guard is None or not guard.is_last(self.scope):
            raise UnsupportedRouterError(
                f"forward hooks run after router '{self.name}' (on its module, or global module hooks) were added "
                "inside the block, after it started, and compiled code cannot check that they leave the expert "
                "indices the router returned as they were. Add them before the block starts (or remove them)"
            )
        guard.expect_traced(out)

    def prepare_guard(self, device_of: Callable[[nn.Module], torch.device]) -> None:
        """As a block starts: the output guard on the scope, last of its forward hooks, where hooks other than
        moe_replay's run after its forward (compiled code, which cannot add it, then finds it there)."""
        if (self.scope._forward_hooks or _GLOBAL_HOOKS) and (self.wrapped or runs_foreign_hooks(self.scope)):
            guard = self.install_guard()
            guard.keep_last(self.scope)
            guard.arm(device_of(self.scope))
        if self._settings_moved is not None:
            self._arm_settings()
            self._settings_compared = False

    def _arm_settings(self, stamp: ArgumentStamp | None = None) -> None:
        """The flag compiled code marks where a tensor among its forward's settings moved: cleared as a block starts
        (no ``stamp``); made where none is, or where ``stamp``'s first tensor setting is on another device (a decision
        established with it)."""
        with torch.inference_mode(False):  # (an ordinary tensor, whatever the caller's mode)
            flag = self._settings_moved
            held = stamp.tensors[0].value if stamp is not None and stamp.tensors else None
            if flag is None or (held is not None and flag.device != held.device):
                device = held.device if held is not None else torch.device("cpu")
                # (its address kept across calls, as the rings': CUDA graphs of mode="reduce-overhead" update it)
                self._settings_moved = _torch_compat.mark_static_address(
                    torch.zeros((), dtype=torch.bool, device=device)
                )
            elif stamp is None:  # (as a block starts; one established inside a block keeps what compiled code marked)
                flag.zero_()

    def check_guard(self) -> None:
        """As a block ends: refuse float tensors that compiled code found cut to zero by a hook after this router, and
        a tensor among its forward's settings that compiled code found written since its decision was established."""
        if self._guard is not None:
            self._guard.cut_in_compiled_code(self.scope)
        flag = self._settings_moved
        # (one read, a sync: only where compiled code compared a tensor setting of this router in the block)
        if flag is not None and self._settings_compared and bool(flag):
            flag.zero_()
            stamps = [s for s in self._arg_stamps.values() if s is not None and s.tensors]
            names = stamps[0].tensor_names() if stamps else "a tensor argument"
            raise UnsupportedRouterError(
                f"router '{self.name}': the value of a tensor among the settings of its forward ({names}) is not "
                "the one its decision was established with (written in place since); its decision holds for the "
                "settings it was established on (a minimum weight may cut slots the rows name), and compiled code, "
                "which cannot establish it again, ran on the new value. Found in compiled code, which cannot stop at "
                "the forward: this block's forwards ran with it, discard what they computed. Run one eager forward of "
                "the model with the new value first (session.verify(example) does it, or call the uncompiled module)"
            )

    def install_guard(self) -> OutputGuard:
        """The output guard on the scope, put there if it is not (for a block whose scope's forward is wrapped,
        as the block starts: then every forward comes to :meth:`guard_output`)."""
        guard = self._guard
        if guard is None:
            guard, self._spare = self._spare, None
            if guard is None:
                guard = OutputGuard(self.name, self.scope)
            else:
                guard.install(self.scope)
            self._guard = guard
        return guard

    def drop_guard(self) -> None:
        """Take the output guard off the scope (as the session's last block ends, and at detach)."""
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.remove()
            self._spare = guard

    def _admit(self) -> None:
        """May an eager forward of this router run now? (A session refuses other threads' forwards.)"""

    def _refuse_thread_traced(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Dynamo traces a forward of this router in a thread other than the one holding the session's block:
        the code traced refuses it (a session's hook makes it raise as it runs)."""
        raise UnsupportedRouterError(f"router '{self.name}' was traced in a thread that does not hold its block")

    def _failed(self, error: RuntimeError) -> None:
        """A runtime error in an eager forward of this router: raise a clearer one where there is one."""

    def _refuse_transform(self) -> None:
        """A forward inside a ``torch.func`` transform while a block is open: refused, before anything is recorded."""
        raise UnsupportedRouterError(
            f"router '{self.name}' ran inside a torch.func transform (vmap, grad, jvp, jacrev...) while a "
            "capture, replay, keep_scores or verify block is open. A transform batches or wraps the router's "
            "tensors: under vmap one call routes the tokens of every batch entry with one row per token of one "
            "entry, so rows can be neither recorded nor forced one per token. Run the forward outside the "
            "transform (for gradients: loss.backward(); for a batch: concatenate the inputs); nothing was "
            "recorded or forced in this forward"
        )

    def _refuse_export(self) -> None:
        """``torch.export`` or a tracer tracing a forward while a block is open: refused (the program would keep
        the block)."""
        raise UnsupportedRouterError(
            f"router '{self.name}' is being exported (torch.export, torch.jit.trace, make_fx, torch.fx.symbolic_trace) "
            "while a capture, "
            "replay, keep_scores or verify block is open. An exported or traced program keeps no guards, so what the "
            "block adds to the forward (writes into this session's capture ring, forced rows) would run at every "
            "later call of the program, inside blocks or not. Export outside the blocks: the program then routes "
            "natively"
        )

    def _check_ran(self, ev: Evidence | None, seen: int) -> None:
        """After an eager forward: it made the calls its evidence lists, and its decision."""
        if ev is not None and self._ordinal != ev.count and not (ev.chunks and self._ordinal):  # (chunks: _chunks_end)
            self.forget(
                why=f"a forward that made {self._ordinal} decision-like calls where it made {ev.count} when it was "
                "established (its control flow changed)"
            )
            raise UnsupportedRouterError(
                f"router '{self.name}' made {self._ordinal} decision-like calls in this forward, but "
                f"{ev.count} in the forward its decision was established on; its control flow changed, so "
                f"this forward's decision cannot be told (established: {ev.describe()}). If the model was "
                "changed on purpose, the decision is established again at the next forward; nothing more "
                f"was recorded or forced{_hooks_inside(self.scope)}"
            )
        if not self._decided:
            expected = (
                f"a lookup of a [vocab, {self.top_k}] expert table"
                if ev is None
                else " + ".join(ev.calls[i].describe() for i in ev.decision)
            )
            partial = f" (saw {seen} of its {len(ev.decision)} calls)" if seen and ev is not None else ""
            raise UnsupportedRouterError(
                f"router '{self.name}' ran, but its decision was not made in its forward{partial}: expected "
                f"{expected}. Nothing was recorded or forced"
            )

    def _check_returned(
        self,
        ev: Evidence,
        out: Any,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """After an eager forward: a router that returned its decision's indices still returns them, and no others.

        Learned at the first forward under ``ev`` whose top-k decision was answered in one call: where the
        router's output (a tensor, tuple or list) holds the indices that call returned, or a view of them
        (the same storage), if it does. A later forward that returns other indices there took another branch
        after the decision (a flag that picks which of two top-k calls of the same form dispatches): what was
        recorded or forced is not what the router returned, and the forward raises. (The hot path compares
        identities and comes here only when they differ.) A decision not answered by one top-k (an ``argmax``, a
        decision in slots) returns no indices to compare. A router with twins is checked by its effect at every
        forward whatever it returns (see :meth:`_has_twins`): the indices it returns need not be the dispatched ones.

        A forward that returns no integer tensor at all (its weights alone, dense combine weights: a flag of its
        caller, ``return_indices=False``, or its mode says so) returns no other indices: its decision is then
        checked by its effect on what it returns, on this forward's inputs (``forward``, ``args``, ``kwargs``),
        once per form of output (its type and length), and the forward raises where it has none.
        """
        answered, self._answered = self._answered, None
        if answered is None:  # (a decision not answered by one top-k, an argmax say: where it returns them is not
            # learned, nor are its returned indices compared, so with twins it shows no switch among them)
            if self.capturing and self._unanswered_last is not ev:  # (its ids count as passing through code after
                # it, in what a capture keeps: see ids_settings)
                self._unanswered.add(ev)
                self._unanswered_last = ev
            if ev.twins and ev not in self._returned_at:
                self._returned_at[ev] = (None, type(out))
            return
        pos = -1 if _holds(out, answered) else None
        if pos is None and isinstance(out, tuple | list):
            pos = next((i for i, o in enumerate(out) if _holds(o, answered)), None)
        known = self._returns
        if known is None or known[0] is not ev:
            learned = self._returned_at.get(ev)  # (by an earlier session on this scope, or in another mode)
            known = self._returns = (ev, pos, type(out)) if learned is None else (ev, *learned)
            self._returned_at[ev] = known[1:]
            if learned is None:
                return
        if known[1] is None or pos == known[1]:
            return
        if pos is None and not _integer_tensors(out):  # no indices returned at all: none to tell apart
            form = (ev, type(out), len(out) if isinstance(out, tuple | list) else None)
            if form in self._bare_forms:
                return
            if self._still_holds(ev, forward, args, kwargs, why="a forward whose output was not made from it"):
                self._bare_forms.add(form)
                return
            self._returns = None
            self._returned_at.pop(ev, None)
            decision = " + ".join(ev.calls[i].describe() for i in ev.decision)
            raise UnsupportedRouterError(
                f"router '{self.name}' returned no indices in this forward ({_form_words(out)}), where it returned "
                f"those of its decision call ({decision}) when its decision was established, and what it returned "
                "here does not change when that call's indices do: its output does not show which experts were "
                "chosen (a branch that returns its scores unrouted, or the indices kept aside in an attribute?), so "
                "the rows recorded or forced in this forward are not shown to be the experts it used. Return the "
                "decision's indices in every branch (a caller may leave them unused), or weights made from them "
                "(weights scattered at its indices); the decision is established again at the next forward"
            )
        self._returns = None
        self._returned_at.pop(ev, None)
        self.forget(why="a forward that returned other indices than its decision call's (another branch after it)")
        where = "as its output" if known[1] < 0 else f"as item {known[1]} of its output"
        decision = " + ".join(ev.calls[i].describe() for i in ev.decision)
        raise UnsupportedRouterError(
            f"router '{self.name}' returned the indices of its decision call ({decision}) {where} when its "
            "decision was established, and other indices in this forward: it took another branch after the "
            "decision (a setting or a config flag that picks which call dispatches?), so what was recorded or "
            "forced in this forward is not what it returned. The decision is established again at the next "
            "forward"
        )

    def _adopt(self, ev: Evidence, again: Evidence) -> None:
        """``again``, established again, in place of ``ev`` for this router's mode and wherever the decision is
        known by; its lean form is learned anew."""
        mode = self.mode()
        known = _KNOWN.get(self.scope)
        if known is not None:
            for key in [k for k, v in known.items() if v is ev]:
                known[key] = again
        self.evidence[mode] = again
        self._lean.pop(mode, None)

    def on_lean(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call of a wrapped torch function in this router's lean forward (see :mod:`moe_replay._lean`)
        that the ``topk`` wrapper's fast path did not answer: answered as the mode would."""
        state = NESTING
        state.lean = None  # the router's own torch calls while it answers are not its forward's
        try:
            return self._on_lean(func, args, kwargs)
        finally:
            state.lean = self

    def _on_lean(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """:meth:`on_lean`, with this thread's lean router cleared."""
        self._slow = True
        self._compiled = False
        if "out" in kwargs:  # (a decision-like call into out= tensors: answered as one without, then written there)
            written = through_out(func, args, kwargs, self._on_lean)
            if written is not NO_OUT:
                return written
        if func is _TOPK_FN:
            sig = _topk_call(args, kwargs)
        elif func in _MASKS or func in _WHERE:
            out = func(*args, **kwargs)
            if self.note_mask(func, args, kwargs, out):
                self._fast = None  # the decision reads the unmasked scores
            return out
        else:
            sig = decision_call(func, args, kwargs)
        if sig is None:
            return func(*args, **kwargs)
        i = self._ordinal
        if (
            self._plan.get(i) == sig
            and sig[1] == self.top_k
            and not (self._regions or self._slots or self._masks or self.verifying or self._mirrors)
            and self.seen is None
        ):  # the common cases: the whole decision in this call, outside checkpointing
            x = args[0] if args else kwargs["input"]
            n = x.numel() // sig[2]
            if (
                func is _TOPK_FN
                and type(x) is _TENSOR
                and x.dim() == 2
                and _plain(args[1:], kwargs)
                and self._rows_on(x.device)  # (the fast path gathers with rows of the router's own device)
            ):
                self._form = (i, args[1:], dict(kwargs), (sig[2],), x.dtype)  # the fast path answers the next
            if self._entry_grad and _in_backward():  # (in no checkpoint region it can see: not its forward's)
                self._refuse_unseen_recompute()
            if self.replaying:
                src = self.replay_source
                self._refuse_inner_checkpoint()
                if src is not None and not src.has_missing and self._eager:
                    self._ordinal = i + 1
                    forced = src.read_eager(n) if src.host_consumed + n <= src.cleared else self._forced(n)
                    forced = _on_device_of(forced, x)
                    self._decided = True
                    if self.capturing and self.capture_ring is not None:
                        self.capture_ring.write_eager(forced)
                    if func is _TOPK_FN and x.dim() == 2:  # the common form, answered directly
                        self._answered = forced
                        return _TOPK_RESULT((_pick(x, forced), forced))
                    source = x if x.dim() == 2 else x.reshape(-1, sig[2])
                    return self._answer(func, args, kwargs, source, forced, x.shape[:-1])
            elif not (x.requires_grad and torch.is_grad_enabled()):  # capture, or the decision alone
                self._ordinal = i + 1
                out = func(*args, **kwargs)
                self._decided = True
                ring = self.capture_ring
                if self.capturing and ring is not None:
                    idx = out[1] if func is _TOPK_FN and out[1].dim() == 2 else self._indices_of(func, out, n, sig[1])
                    if self._eager:
                        ring.write_eager(idx)
                    else:
                        ring.write(idx)
                if func is _TOPK_FN:
                    self._answered = out[1]
                return out
        return self.on_call(func, args, kwargs, sig)

    # ------------------------------------------------------------- the decision
    def on_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], sig: tuple[str, int, int]) -> Any:
        """A decision-like call of the scope forward: the decision's, or passed through."""
        i = self._ordinal
        expected = self._plan.get(i)
        armed = self._armed
        if (
            (
                expected != sig
                if expected is not None
                else armed is not None and (i >= armed.count or self._others.get(i, sig)[::2] != sig[::2])
            )
            and not _compiling()
            and self._in_hook_set_aside()
        ):  # (not one of the calls its decision was established on: see _in_hook_set_aside)
            return func(*args, **kwargs)
        self._ordinal = i + 1
        if expected is None and self._may_grow(i, sig):
            self._grow_into_chunks(sig)
            expected = sig
        if expected is None:
            if self._row is not None and self._mirrors.get(i) == sig:  # forced rows: answer it with them too
                return self._mirror(func, args, kwargs, sig[1])
            was = self._others.get(i)
            if was is not None and (was[0] != sig[0] or was[2] != sig[2]):
                self._refuse_moved(i, was, sig)
            return func(*args, **kwargs)
        if sig != expected:
            if not _compiling():
                self._varies.add(self.mode())  # (its next forwards are checked for their calls before they run)
                self.forget(
                    why=f"a forward whose decision-like call #{i} was {sig[0]}(k={sig[1]}) over {sig[2]} where it was "
                    f"{expected[0]}(k={expected[1]}) over {expected[2]} (its control flow changed: its k?)"
                )
            raise UnsupportedRouterError(
                f"router '{self.name}': decision-like call #{i} of its forward is now {sig[0]}(k={sig[1]}) over "
                f"{sig[2]}, but it was {expected[0]}(k={expected[1]}) over {expected[2]} when its decision was "
                "established; its control flow changed (an attribute such as its k, or a branch on its input: "
                "a call made only on a few tokens, or only on many). Nothing was recorded or forced; if the change "
                "was on purpose, the decision is established again at the next forward"
                f"{_hooks_inside(self.scope)}"
            )
        out = self.decide(func, args, kwargs, sig[1])
        if type(out) is _TOPK_RESULT and self._decided and not self._compiled:  # (eager forwards are checked)
            self._answered = out[1]
        return out

    def _in_hook_set_aside(self) -> bool:
        """Is the decision-like call being made (one its decision's plan does not hold there) made in a forward hook
        of the user's on a submodule of the scope, which the runs that established the decision set aside (a top-k
        of a gate's logits to log the experts' load)? Such a call was in none of those runs, so it is none of the
        calls its decision was established on: it runs as it is, uncounted. What the forward returns with the hooks
        in was compared with what those runs gave as the decision was established (see :meth:`_hooks_checked`): a
        call in a hook that changes it had the decision established again with the hooks in, and is seen there as
        the forward's own code's. Read from the Python stack, only for a call out of plan."""
        if self.scope in HOOKS_NEEDED:
            return False
        codes = {
            code
            for m in self.scope.modules()
            if m is not self.scope
            for name in _HOOK_FNS
            for h in (vars(m).get(name) or {}).values()
            if not _own_hook(h) and (code := _hook_code(h)) is not None
        }
        f: types.FrameType | None = sys._getframe(1) if codes else None
        for _ in range(MAX_STACK_DEPTH):
            if f is None:
                return False
            if f.f_code in codes:
                return True
            f = f.f_back
        return False

    def _check_lookup_returned(self, out: Any) -> None:
        """After an eager forward of a declared table lookup: indices it returns are the lookup's, each row as a
        set (slots sorted for a kernel are the same experts). A router that returns no indices of the lookup's
        shape, only weights, is not checked."""
        answer, self._looked_up = self._looked_up, None
        if answer is None or not self._eager:  # (no comparison, a host sync, while a CUDA graph is captured)
            return
        n, k = answer.numel(), answer.shape[-1]
        shaped = [t for t, _ in _integer_tensors(out) if t.numel() == n and t.dim() >= 1 and t.shape[-1] == k]
        if not shaped:
            return
        with self._aside():  # (unseen by a mode around this router's: these are moe_replay's calls)
            rows = answer.reshape(-1, k).sort(-1).values
            if any(torch.equal(t.reshape(-1, k).to(rows.dtype).sort(-1).values, rows) for t in shaped):
                return
        raise UnsupportedRouterError(
            f"router '{self.name}' is read as a hash router, its experts looked up in a [rows, {self.top_k}] table "
            "of expert ids, but the indices it returns are not those the lookup gave: it chooses its experts by "
            "other means than the table (a random draw, a choice made out of sight; the table holding something "
            "else, such as a cache of past choices), so the rows recorded or forced are not the experts it uses. "
            "Nothing was recorded or forced; choose the experts with torch.topk (or argmax) in the router's Python "
            "code"
        )

    def refuse_rival_of_lookup(self, sig: tuple[str, int, int]) -> None:
        """A router declared a table lookup (hash routing) made a decision-like call over its experts' scores:
        which of the two chooses the experts cannot be told, and only the lookup would be recorded or forced."""
        tables = [
            f"'{n}' {list(b.shape)}"
            for n, b in self.scope.named_buffers(recurse=False)
            if b.dim() == 2 and not b.dtype.is_floating_point and b.dtype != torch.bool
        ]
        held = f" (its integer buffer {', '.join(tables)})" if tables else ""
        raise UnsupportedRouterError(
            f"router '{self.name}' is read as a hash router, its experts looked up in a [rows, {self.top_k}] "
            f"table of expert ids{held}, but its forward also makes {sig[0]}(k={sig[1]}) over its {sig[2]} "
            "experts' scores: which of the two chooses the experts cannot be told, and only the lookup would be "
            "recorded or forced. Nothing was recorded or forced. If that call chooses them (the table holds "
            "something else: preallocated output buffers, a cache of past choices), attach with "
            f"adapters=[mr.Adapter('{sig[0]}', match=lambda name, module: name == '{self.name}', "
            f"decision='{sig[0] if sig[0] in DECISIONS else 'auto'}')]; if the lookup chooses them (that call a "
            "statistic), make that call outside the router's forward"
        )

    def _refuse_moved(self, i: int, was: tuple[str, int, int], sig: tuple[str, int, int]) -> None:
        """Refuse a forward whose decision-like call #``i`` (not the decision's) is of another family or width than
        when the decision was established, in as many calls: another branch of its code (on its inputs' values, a
        flag) that may dispatch by that call (a top-k over a subset of the experts, or over the experts and a null
        column) while the call at the decision's ordinal is a statistic. Counted, the calls look the same; only
        their effect could tell, on inputs the establishment never saw. The decision is established again at the
        next forward (on its inputs, which then shows which call dispatches)."""
        if not _compiling():
            self._varies.add(self.mode())  # (its next forwards are checked for their calls before they run)
            self.forget(
                why=f"a forward whose decision-like call #{i} was {sig[0]}(k={sig[1]}) over {sig[2]} where it was "
                f"{was[0]}(k={was[1]}) over {was[2]} (another branch of its code)"
            )
        raise UnsupportedRouterError(
            f"router '{self.name}': decision-like call #{i} of its forward is now {sig[0]}(k={sig[1]}) over {sig[2]}, "
            f"but it was {was[0]}(k={was[1]}) over {was[2]} when its decision was established: its forward took "
            "another branch (on its inputs' values, or a flag), which may dispatch by another call than the one "
            "established. Nothing more was recorded or forced in this forward; the decision is established again at "
            f"the next forward{_hooks_inside(self.scope)}"
        )

    def _mirror(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], span: int) -> Any:
        """A later call that natively finds the decision's experts again (see ``Evidence.mirrors``): the
        forced rows of this forward, their values read from its scores."""
        x: torch.Tensor = args[0] if args else kwargs["input"]
        assert self._row is not None and self.num_experts is not None
        forced = _on_device_of(self._row if self._row.shape[1] == span else self._row[:, :span], x)
        if not self._recompute and self.replay_source is not None and self.replay_source.has_missing:
            native = self._native(func, x, args, kwargs, forced.shape[0], span)
            with self._aside():
                forced = torch.where(forced < 0, native, forced)
        scores = self._unmasked(x) if self._masks else x
        source = scores.reshape(-1, self.num_experts)
        values = None
        if scores is not x:  # a masked copy: read as the call itself would where it could have chosen these
            n = forced.shape[0]
            native = self._native(func, x, args, kwargs, n, span)
            values = self._through_mask(x.reshape(-1, self.num_experts), source, forced, native)
        return self._answer(func, args, kwargs, source, forced, x.shape[:-1], values)

    def _rows_on(self, device: torch.device) -> bool:
        """Are the rows this forward records or forces kept on ``device`` (the router's own)?"""
        return all(r is None or r.device == device for r in (self.replay_source, self.capture_ring))

    def is_lookup(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Is this call the table lookup of a hash router?"""
        if self._decided or func not in _LOOKUP:
            return False
        x = args[0] if args else kwargs.get("input")
        index = args[1] if len(args) > 1 else None
        return (
            isinstance(x, torch.Tensor)
            and _is_int(x)
            and x.dim() == 2
            and x.shape[1] == self.top_k
            and isinstance(index, torch.Tensor)
            and _is_int(index)
        )

    def decide(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], span: int) -> Any:
        """Answer one decision call: native (capture), forced (replay) or recompute.

        A ``topk`` or a table lookup answers ``span`` slots at once; an ``argmax``/``max``
        answers the next slot. The row is recorded when its last slot is answered.
        """
        x: torch.Tensor = args[0] if args else kwargs["input"]
        lookup = func in _LOOKUP
        num_experts = self.num_experts
        assert self.top_k is not None and num_experts is not None
        if lookup:
            index: torch.Tensor = args[1]
            n, lead = index.numel(), index.shape
            scores = x
        else:
            n, lead = x.numel() // num_experts, x.shape[:-1]
            scores = self._unmasked(x) if self._masks else x  # what a forced expert's value is read from
        first = not self._slots
        if first:
            self._start(n)
            if self.seen is not None and not lookup:
                with self._aside():
                    self._source = scores.reshape(-1, num_experts)
                    # a group-limited router picks from a masked copy of its scores: its free choice is read there
                    self._choice = None if scores is x else x.detach().reshape(-1, num_experts)
        start = 0 if first else sum(t.shape[1] for t in self._slots)
        take = min(span, self.top_k - start)  # this call's slots that the decision uses
        row = self._row
        native: torch.Tensor | None = None  # the call's own choice, where it was made aside
        if row is not None:  # replay or recompute: the recorded slots
            if take != row.shape[1]:
                with self._aside():
                    row = row[:, start : start + take]
            forced = row = _on_device_of(row, x)
            if not self._recompute and self.replay_source is not None and self.replay_source.has_missing:
                native = self._native(func, x, args, kwargs, n, span, take)
                with self._aside():
                    forced = torch.where(forced < 0, native, forced)
        elif self._recompute or (
            not self._regions and (lookup or not (scores.requires_grad and torch.is_grad_enabled()))
        ):
            out = func(*args, **kwargs)  # native, answered by the call itself
            with self._aside():
                forced = self._indices_of(func, out, n, span)
                self._slots.append(forced if take == span else forced[:, :take])
            if start + take == self.top_k:
                self._finish()
            if lookup:
                self._looked_up = out
            return out
        else:  # native decision, answered as its recompute will be: with gradients, the same saved tensors;
            # in a checkpointed region, the same ops (selective checkpointing hands out its ops in call order)
            forced = native = self._native(func, x, args, kwargs, n, span, take)
        self._slots.append(forced)
        if start + take == self.top_k:
            self._finish()
        if lookup:
            self._looked_up = forced.reshape(*lead, span)
            return self._looked_up
        source = scores.reshape(-1, num_experts)
        if take < span:  # slots past the decision (a top-(k+1) for a load estimate): the best others of what
            # the call sees (a masked copy's, as the call would pick them: never an expert its mask left out)
            shown = source if scores is x else x.reshape(-1, num_experts)
            forced = torch.cat([forced, best_others(shown, forced, span - take, args, kwargs)], dim=1)
        values = None
        if scores is not x:  # a masked copy decides: forced experts it could have chosen read their masked values
            if native is None:
                native = self._native(func, x, args, kwargs, n, span, take)
            values = self._through_mask(x.reshape(-1, num_experts), source, forced, native)
        return self._answer(func, args, kwargs, source, forced, lead, values)

    def _start(self, n: int) -> None:
        """The first call of a decision: where its rows come from."""
        self._row, self._recompute = None, False
        if self._regions and _in_backward():  # a recompute: its forward's rows, never recorded nor counted again
            self._recompute = True
            self._row = self._recomputed(self._regions, n)  # None: its forward ran while the session was idle
            return
        if not self._compiled and self._entry_grad and _in_backward():  # (compiled code cannot ask)
            self._refuse_unseen_recompute()
        if self.replaying:
            if not self._compiled:
                self._refuse_inner_checkpoint()
            self._row = self._forced(n)

    def _refuse_unseen_recompute(self) -> None:
        """Refuse a forward with gradients inside backward that belongs to no checkpoint region it can see.

        Such a forward is the recompute of a region whose object is hidden (compiled autograd runs a
        reentrant checkpoint's backward from a frame of its own, where its ``ctx`` is not on the stack),
        or a forward made by a backward hook. Taken as a new forward, a replay would force it with the
        next rows (or, after the block, route it natively) and a capture would record it a second time.
        Nothing here is kept or pending only in idle sessions, which run it as it ran.
        """
        if not (self.replaying or self.capturing or self.kept):
            return
        raise UnsupportedRouterError(
            f"router '{self.name}' runs with gradients inside backward, in no activation checkpoint moe_replay "
            "can see (a reentrant checkpoint under compiled autograd, or a forward made by a backward hook): "
            "the recompute of a checkpointed region would get other experts than its forward, or be recorded "
            "again. Checkpoint with use_reentrant=False (its recompute is seen under compiled autograd too), or "
            "turn compiled autograd off; nothing was forced or recorded"
        )

    def _refuse_inner_checkpoint(self) -> None:
        """Refuse to force a decision made inside an activation checkpoint opened in the router's own forward.

        In backward such a checkpoint runs the code inside it again, the decision with it, where no
        router forward runs: nothing could force that decision, and the gradients would come from
        the experts the current scores choose, not the replayed ones. A checkpoint around the router
        (or its layer) is recomputed exactly. Only a forward that began with gradients on can be
        recomputed; the common case (no saved-tensor hooks, not inside an ``autograd.Function``'s
        forward) costs two flag reads.
        """
        if not self._entry_grad or (_top_hooks() is None and _fwd_grad()):
            return
        outer = {id(region) for region, _ in self._regions}
        for region, recomputing in _regions():
            if id(region) in outer or recomputing:
                continue
            name = type(region).__name__
            if (_CheckpointFrame is not None and isinstance(region, _CheckpointFrame)) or "checkpoint" in name.lower():
                raise UnsupportedRouterError(
                    f"router '{self.name}' makes its decision inside an activation checkpoint opened in its own "
                    f"forward ({name}): in backward that checkpoint runs the decision again where it cannot be "
                    "forced, so the replayed gradients would come from other experts. Checkpoint around the "
                    "router or its layer instead (those recomputes get the replayed experts); nothing was forced"
                )

    def _finish(self) -> None:
        """The last slot is answered: record the row, keep it for recomputes and for ``keep_scores``."""
        if len(self._slots) == 1:
            row = self._slots[0]
        else:
            with self._aside():
                row = torch.cat(self._slots, dim=1)
        if self._chunks:  # the next call of the decision starts the rows of the next chunk of tokens
            self._slots = []
        self._decided = True
        if self._recompute:
            return
        if self.capturing and not self.verifying and self.capture_ring is not None:
            if self._eager:
                with self._aside():
                    self.capture_ring.write_eager(row)
            else:
                self.capture_ring.write(row)
        if self._regions:
            # a copy: code after the decision may edit the indices it was handed in place (a capacity cut writing
            # its sentinel, an offset for expert parallelism), and the recompute must get the experts as chosen
            with self._aside():
                kept = row.clone()
            self._keep(self._regions, kept, self._row is not None, given=row)
            if self._row is None:  # a later call that finds these experts again is answered as in the recompute
                self._row = kept
        if self.seen is not None and self._source is not None:
            if any(isinstance(region, _FunctionCtx) and not again for region, again in self._regions):
                _mark_outside_graph(self._source)  # (kept in a reentrant checkpoint's forward: no gradients)
            ev = self.evidence.get(self.mode())
            with self._aside():  # (a copy, as for a recompute: the code after the decision may edit its indices)
                chosen = row.clone()
            self.seen.append((self._source, chosen, self._choice, None if ev is None else ev.squashed))
            self._choice = None

    def _keep(
        self, regions: list[tuple[Any, bool]], rows: torch.Tensor, forced: bool, given: torch.Tensor | None = None
    ) -> None:
        """Keep the rows on every region that may be recomputed later (all of them, in a forward);
        ``forced``: they were replayed, not chosen by the scores; ``given``: the tensor the router was handed, whose
        rows these are a copy of (the recompute hands it again where nothing wrote into it since)."""
        for region, recomputing in regions:
            if not recomputing:
                kept = self.kept.get(region)
                if kept is None:
                    kept = self.kept[region] = _Kept()
                kept.rows.append(rows)
                kept.given.append(None if given is None else (given, _version(given)))
                kept.forced = kept.forced or forced

    def _recomputed(self, regions: list[tuple[Any, bool]], n: int) -> torch.Tensor | None:
        """The rows this router got in the forward of the innermost region now being recomputed."""
        kept = next((k for r, recomputing in regions if recomputing and (k := self.kept.get(r)) is not None), None)
        if kept is None:
            if self.kept and not any(recomputing for _, recomputing in regions):
                raise UnsupportedRouterError(
                    f"router '{self.name}' runs in a checkpointed region that is itself run again inside the "
                    "recompute of an outer non-reentrant checkpoint: moe_replay cannot see the outer region to "
                    "give it the experts of its forward. Do not nest non-reentrant checkpoints, or make the "
                    "outer one reentrant"
                )
            return None
        task = _torch_compat.current_graph_task_id()
        if kept.graph_task != task:  # a new backward recomputes the region from its start
            kept.graph_task, kept.pos = task, 0
        if kept.pos >= len(kept.rows):
            raise ReplayConsumptionError(
                f"router '{self.name}' ran {kept.pos + 1} times in the recompute of a checkpointed region but "
                f"{len(kept.rows)} times in its forward: the checkpointed function must run the same routers "
                "each time"
            )
        forced = kept.rows[kept.pos]
        given = kept.given[kept.pos]
        kept.pos += 1
        if forced.shape[0] != n:
            raise ReplayConsumptionError(
                f"router '{self.name}' is recomputed for {n} tokens during backward, but its forward had "
                f"{forced.shape[0]}: the checkpointed function must see the same inputs each time"
            )
        self._keep(regions, forced, kept.forced)  # regions first run inside this recompute (nested checkpoints)
        if kept.forced:  # (under an outer reentrant checkpoint the forward ran without gradients: checked now)
            self._refuse_inner_checkpoint()
        if given is not None and _version(given[0]) == given[1]:  # (nothing wrote into what its forward was handed:
            return given[0]  # handed again, as a router that keeps the indices it returned for its recompute expects)
        with self._aside():  # (a copy: the recompute's code may edit what it is handed in place, as its forward
            return forced.clone()  # did, and a later backward of the same forward reads the kept rows again)

    def _forced(self, n: int) -> torch.Tensor:
        """The next ``n`` recorded rows ``[n, k]`` (-1 rows stay -1)."""
        src = self.replay_source
        assert src is not None
        if self._eager:
            if src.host_consumed + n > src.num_rows:
                raise ReplayConsumptionError(
                    f"router '{self.name}' needs rows {src.host_consumed}..{src.host_consumed + n - 1} "
                    f"but only {src.num_rows} were recorded for it: the routes are too short for "
                    "these forwards (check the batch against the routes, or slice the routes). Routes captured "
                    "around generate() are in generation order: for a teacher-forced forward, convert them "
                    "with mr.split_generation(...) and lay them out with mr.BatchLayout"
                )
            if src.host_consumed + n > src.cleared and src.guard is not None:
                src.guard(self.name, src.host_consumed, n)  # (rows no forward the token check saw was fed: it raises)
            with self._aside():
                return src.read_eager(n)
        return src.read(n)

    def _native(
        self,
        func: Any,
        x: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        n: int,
        span: int,
        take: int | None = None,
    ) -> torch.Tensor:
        """The indices ``[n, take]`` (all ``span`` by default) the model's own call would choose, without
        autograd and unseen by dispatch modes."""
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        with self._aside():
            idx = self._indices_of(func, func(x.detach(), *args[1:], **rest), n, span)
            return idx if take is None or take == span else idx[:, :take]

    def _aside(self) -> contextlib.AbstractContextManager[Any]:
        """Where moe_replay's own ops of an eager forward run: unseen by the dispatch modes active (see
        :func:`~moe_replay._torch_compat.hidden_from_dispatch_modes`); in compiled code, as they are."""
        return _NOTHING if self._compiled else _hidden()

    @staticmethod
    def _indices_of(func: Any, out: Any, n: int, span: int) -> torch.Tensor:
        idx = out if (func in _ARGMAX or func in _LOOKUP) else out[1]
        return idx if idx.dim() == 2 and idx.shape[1] == span else idx.reshape(n, span)

    def _through_mask(
        self, masked: torch.Tensor, source: torch.Tensor, forced: torch.Tensor, native: torch.Tensor
    ) -> torch.Tensor:
        """The values ``[n, span]`` of the ``forced`` experts of a decision made on ``masked``, a masked copy of
        ``source`` (``masked_fill``/``where``), given the call's own choice ``native`` ``[n, take]``.

        Where a row's forced experts are a choice the call itself could return (their masked values are those
        of its own choice: the same experts, or others tied with them), they get the masked values, exactly
        as the call returns them. A mask that leaves fewer than k selectable experts for a token (an
        availability mask, too few groups kept) makes the call pick masked experts at the fill (0, -inf):
        replayed on the forward they were captured from, such routes get back the captured values, whichever
        of the tied masked experts the capture's top-k returned. In every other row the values are read
        through the mask from ``source``: a forced expert outside the groups the current scores chose gets
        its real score. NaN values are equal to each other here (a top-k returns a NaN score, or a NaN fill,
        as it returns any other). The slots past ``native``'s (the best others of a top-(k+1)) were chosen
        from ``masked``, as the call chooses them, and read it.
        """
        take = native.shape[1]
        with self._aside():
            held = masked.detach()
            ours = held.gather(-1, forced[:, :take]).sort(-1).values
            theirs = held.gather(-1, native).sort(-1).values  # (sorted: NaNs last on both sides)
            own = ((ours == theirs) | (ours.isnan() & theirs.isnan())).all(-1, keepdim=True)
            if take < forced.shape[1]:
                own = own | (torch.arange(forced.shape[1], device=forced.device) >= take)
        return torch.where(own, _pick(masked, forced), _pick(source, forced))

    @staticmethod
    def _answer(
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        source: torch.Tensor,
        forced: torch.Tensor,
        lead: torch.Size,
        values: torch.Tensor | None = None,
    ) -> Any:
        """The decision call's result with the ``forced`` indices ``[n, span]``; their values read from
        ``source``, or ``values`` where given."""
        span = forced.shape[1]
        if values is None:
            values = _pick(source, forced)
        idx = forced
        if len(lead) != 1:  # scores of more than two dimensions
            values, idx = values.reshape(*lead, span), idx.reshape(*lead, span)
        if func in _TOPK:
            return torch.return_types.topk((values, idx))
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if not keepdim:
            values, idx = values.squeeze(-1), idx.squeeze(-1)
        if func in _ARGMAX:
            return idx
        if func in _MIN:
            return torch.return_types.min((values, idx))
        return torch.return_types.max((values, idx))

    # ------------------------------------------------------------- masked sources
    def note_mask(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> bool:
        """Remember that ``out`` is a masked copy of a score tensor (group-limited routing); True if it is.

        ``masked_fill(scores, mask, value)`` masks its first argument. ``torch.where(cond, a, b)``
        (and ``a.where(cond, b)``) keeps ``a`` where ``cond`` holds and ``b`` elsewhere, so the
        scores may be either: the one of the output's shape when the other is a number or
        broadcast; when both are, the one that is not a fill (constant along the experts), told on
        the device when a forced expert's value is read (:class:`_EitherSide`).
        """
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[-1] != self.num_experts:
            return False
        src: torch.Tensor | _EitherSide | None = None
        if func in _MASKS:
            x = args[0] if args else kwargs.get("input")
            src = x if isinstance(x, torch.Tensor) and x.shape == out.shape else None
        else:
            if func is torch.Tensor.where:  # a.where(cond, b)
                a = args[0] if args else None
            else:  # torch.where(cond, a, b)
                a = args[1] if len(args) > 1 else kwargs.get("input")
            b = args[2] if len(args) > 2 else kwargs.get("other")
            full_a = isinstance(a, torch.Tensor) and a.shape == out.shape
            full_b = isinstance(b, torch.Tensor) and b.shape == out.shape
            if full_a and full_b:
                src = _EitherSide(a, b)  # type: ignore[arg-type]  # (both tensors: full_a and full_b)
            elif full_a or full_b:
                src = a if full_a else b
        if src is None:
            return False
        self._masks.append((out, src))
        return True

    def _unmasked(self, x: torch.Tensor) -> torch.Tensor:
        """The scores ``x`` is a masked copy of (through any chain of masks), else ``x``."""
        for out, src in self._masks:
            if out is x:
                if isinstance(src, _EitherSide):
                    return src.scores(out, self._unmasked)
                return self._unmasked(src)
        return x


class _EitherSide:
    """Both value arguments of a ``torch.where`` have its output's shape: the scores are the side that is
    not a fill. Told on the device (no host sync, so in compiled code and CUDA graphs too): a side
    whose every row is one value is the fill; where neither or both are, the output itself is read."""

    __slots__ = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def scores(self, out: torch.Tensor, unmasked: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        a, b = self.a, self.b
        a_fill = (a == a[..., :1]).all()
        b_fill = (b == b[..., :1]).all()
        return torch.where(a_fill & ~b_fill, unmasked(b), torch.where(b_fill & ~a_fill, unmasked(a), out))


class OrderStop(BaseException):
    """Raised at the first router scope a token-order probe reaches (see :class:`OrderProbe`): the probe's forward
    ends there, before any router decides, records or reads a row. A ``BaseException``, so that a model's own
    ``except Exception`` does not take it."""

    def __init__(self, rows: torch.Tensor | None) -> None:
        super().__init__("token-order probe")
        self.rows = rows


class OrderProbe(threading.local):
    """The thread running a token-order probe forward (:func:`moe_replay._feeds.token_order`), or None.

    Its fields are each thread's own: sessions on other models in other threads probe their token orders at the
    same time (each session's lock serialises its own blocks only), and one thread's probe must neither stop the
    other's routers nor lose its own mark (its runs would then record rows as a block's forward).

    While it is set, the first router scope that this thread's forward reaches raises :class:`OrderStop` with
    its input as ``[rows, features]``, before anything of the router runs. Where ``check`` is set too, the forward
    is a block's own (the order told by runs that set the hooks of the modules on the way aside): the first router
    scope it reaches hands its input rows to ``check`` (which may refuse the forward), and the forward goes on.
    Where ``note`` is set instead, the probe runs on past the routers: each router scope it reaches (not one inside
    another) hands ``note`` its scope module and input rows, then runs its own forward, plain (it records and
    forces nothing), until ``note`` returns True (the probe then stops there, as at a first router).
    """

    def __init__(self) -> None:
        self.thread: int | None = None
        self.check: Callable[[torch.Tensor | None], None] | None = None
        self.note: Callable[[Any, torch.Tensor | None], bool] | None = None
        self.depth = 0  # (router scopes running plain inside a probe that runs on)

    def stop(self, args: tuple[Any, ...], kwargs: dict[str, Any], forward: Any = None) -> tuple[Any] | None:
        """Raise :class:`OrderStop` with the scope's first floating input as rows (None where it has none); or,
        where ``check`` is set, hand them to it once (then neither is set) and return None: the router goes on. Where
        ``note`` is set, note them and run the scope's own forward (``forward``, its :class:`ScopedForward`), plain:
        its output, in a tuple."""
        try:
            return self._stop(args, kwargs, forward)
        except Exception as e:  # (an error of its own in a token-order run: noted, whatever the forward's code around
            note_fault(e)  # this call does with it, see _faults)
            raise

    def _stop(self, args: tuple[Any, ...], kwargs: dict[str, Any], forward: Any) -> tuple[Any] | None:
        """:meth:`stop`'s work."""
        rows = None
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
                rows = value.detach().reshape(-1, value.shape[-1])  # (the run ends: nothing changes it)
                break
        check, note = self.check, self.note
        if check is None and note is not None and forward is not None:
            if not self.depth and note(forward.__moe_replay_hook__.scope, rows):
                raise OrderStop(rows)
            self.depth += 1
            try:  # (the scope's own forward, called as the forward's code called it: its errors its own)
                return (forwards_call(forward.__wrapped__, args, kwargs),)
            finally:
                self.depth -= 1
        if check is None:
            raise OrderStop(rows)
        self.thread = self.check = None
        check(rows)
        return None


#: the probe of the token order in which the routers see a forward's tokens (one at a time in each thread: it runs
#: under the lock of the session's blocks; each thread's fields its own)
ORDER_PROBE = OrderProbe()


class ScopedForward:
    """The scope module's ``forward`` while a session is attached.

    Idle, it calls the original forward and nothing else. A deep copy of the model
    (a reference policy, say) gets the plain original forward, not a link to this session.
    """

    def __init__(self, hook: RouterHook, inner: Callable[..., Any]) -> None:
        self.__moe_replay_hook__ = hook
        self.__wrapped__: Callable[..., Any] = inner
        #: the class's forward it wraps (the module had none of its own), or None: a later patch of the class
        #: (a kernel library's, a fix) is followed, as it would be without the session
        self._class_fn: Any = cast(Any, inner).__func__ if self._class_forward() else None
        self._class_raw = _raw_forward(type(hook.scope)) if self._class_fn is not None else None

    @inside_forward  # (an error of its own raised in a probe run is told by its traceback: nothing added to its calls)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if ORDER_PROBE.thread is not None and ORDER_PROBE.thread == _get_ident():
            ran = ORDER_PROBE.stop(
                args, kwargs, self
            )  # (a token-order probe: it ends before this router does anything,
            if ran is not None:  # or, one that runs on past it, this router's own forward ran, plain)
                return ran[0]
        hook = self.__moe_replay_hook__
        if type(hook.scope).forward is not (fn := self._class_fn) and fn is not None:  # (the class's, when it wraps it)
            self._follow_class()
        if _dynamo_compiling():
            out = self._call(args, kwargs)
            if _GLOBAL_HOOKS or hook.scope._forward_hooks:  # hooks run after this forward (see OutputGuard)
                hook.guard_output(out)
            return out
        if not (hook.capturing or hook.replaying):
            if (
                not hook.verifying
                and hook.seen is None
                and not hook.kept.data  # type: ignore[attr-defined]  # (a region kept may be recomputed in backward)
                and NESTING.depth == 0  # no scope around this one, whose mode or lean forward must not see its calls
                and ((hook.scope.training, _grad()) in hook.evidence or hook.decision == "lookup")
            ):  # idle and established: the plain forward
                return self.__wrapped__(*args, **kwargs)
            return self._nested(args, kwargs)
        if _transform() is not None and not _compiling():  # (export and AOT tracing run transforms of their own)
            hook._refuse_transform()
        grad = _grad()
        if _HANDLES.next_id != hook._hooks_at:  # a hook was made somewhere since this router last looked
            hook.follow_hooks()
        lean = hook._lean.get((hook.scope.training, grad))
        if (
            lean is None
            or not lean[1]
            or (ev := lean[0]) is not hook._armed
            or ev.hooks_aside  # (the user's hooks inside its scope are watched at each forward: see _run)
            or (
                lean[4]  # (its forward takes more than its tokens: code handed to it runs under the mode; other
                # settings among its arguments than its decision was established with establish it again)
                and (
                    _code_in_arguments(args, kwargs) is not None
                    or ((stamp := hook._arg_stamp) is not None and not stamp.holds(args, kwargs))
                )
            )
            or NESTING.probing
            or _COMPILER._is_compiling_flag  # (export, AOT tracing: is_compiling() in eager code)
            # (jit.trace, make_fx, fx.symbolic_trace: refused in _call; _tracing() inline, with no frame of its own)
            or _jit_tracing()
            or (_dispatch_modes() != 0 and _tracing())
            or _FX._is_fx_tracing_flag
            or _frame_callback() is not None  # (eager inside a compiled call: dynamo would compile its forward)
        ):
            return self._nested(args, kwargs)
        # The hot path, a lean router armed: RouterHook._run without the mode, in this one frame (it runs
        # at every router call of an eager decode step: each line counts). Every per-forward field of the
        # hook starts as _run leaves it (reset in its finally).
        owner = hook.owner
        if owner is not None and owner.ident != _get_ident() and owner.ident is not None:
            hook._admit()  # raises, unless this is a recompute in autograd's thread
        hook._decided = False
        hook._ordinal = 0
        hook._answered = None
        hook._entry_grad = grad
        # (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing(), inline: the fork's answer is
        # kept, as it changes only at a fork)
        hook._eager = eager = not (_CUDA._initialized and not _FORK.bad and _cuda_capturing())
        chunks = hook._chunks_begin(ev, args, kwargs, False) if hook._chunks else None  # (joined as it returns)
        # before the wrappers go in, as it may raise: the checkpoint regions, none in the common case
        if _top_hooks() is None and _graph_task() == -1 and (grad or _fwd_grad()):
            hook._slow = False
            fast: Any = hook._form if eager and not hook.verifying and hook.seen is None else None
            if fast is None:
                pass
            elif hook.replaying:  # the rows are at hand, none missing, and a capture has its ring
                src = hook.replay_source
                if src is None or src.has_missing:
                    fast = None
                elif not hook.capturing:
                    fast = (fast, src, None)
                else:
                    fast = None if (ring := hook.capture_ring) is None else (fast, src, ring)
            elif grad or (ring := hook.capture_ring) is None:  # with gradients, the values must come from a gather
                fast = None
            else:
                fast = (fast, None, ring)
            hook._fast = fast
        else:
            hook._regions, hook._slow, hook._fast = _regions(), True, None
        # the wrappers in place (_lean.enter, inline), unless another library wraps one of the names since
        swap = _LEAN_SWAP
        with swap.lock:
            swap.depth = depth = swap.depth + 1
            if depth == 1 and _lean_current(_LEAN_NAMES) == _LEAN_THEIRS:  # the usual case, in one go
                _LEAN_NAMES.update(_LEAN_ON)
            elif _lean_current(_LEAN_NAMES) != _LEAN_OURS:
                swap.depth, depth = depth - 1, 0  # (refused)
        if not depth:  # (with the lock let go: the forward may nest routers)
            return hook._refused_lean(self.__wrapped__, args, kwargs)
        state = NESTING
        outer = state.lean
        state.depth += 1  # the modes of scopes around this one ignore its calls
        state.lean = hook  # the wrappers hand this forward's calls to the hook
        try:
            try:
                out = self.__wrapped__(*args, **kwargs)
            finally:
                state.lean = outer
                state.depth -= 1
                with swap.lock:  # (_lean.leave, inline)
                    swap.depth = depth = swap.depth - 1
                    if depth == 0:
                        if _lean_current(_LEAN_NAMES) == _LEAN_OURS:
                            _LEAN_NAMES.update(_LEAN_OFF)
                        else:
                            _lean.put_back()
        except RuntimeError as e:
            hook._failed(e)  # (with the wrappers out and the nesting undone)
            raise
        finally:
            hook._fast = None  # (it holds the replay source and the ring: they go with their session's block)
            seen, grown = 0, None
            if hook._slow:  # what the general path may have set in this forward goes
                seen = len(hook._slots)
                hook._slots, hook._masks, hook._row, hook._source = [], [], None, None
                hook._regions = _NO_REGIONS
                grown, hook._grown = hook._grown, None
                if grown is not None:  # (armed again from the evidence: by _grown_end, or at the next forward)
                    hook._chunks = False
        if chunks is not None:  # a decision chunk by chunk of the tokens: one call of every row, as one of a call
            hook._chunks_end(chunks, ev, self.__wrapped__, args, kwargs)
        elif grown is not None:  # its second call of one established as one: chunks, proven now
            ev = hook._grown_end(grown, ev, self.__wrapped__, args, kwargs)
        hook.calls += 1
        if hook._ordinal != len(ev.calls) or not hook._decided:
            hook._check_ran(ev, seen)
        returns = hook._returns  # (it returned the decision's indices: where, and in what)
        if returns is None or returns[0] is not ev:
            hook._check_returned(ev, out, self.__wrapped__, args, kwargs)
        elif (at := returns[1]) is not None:
            try:
                other = type(out) is not returns[2] or (out if at < 0 else out[at]) is not hook._answered
            except IndexError:  # a shorter tuple than when established
                other = True
            if other:
                hook._check_returned(ev, out, self.__wrapped__, args, kwargs)
        hook._answered = None
        if _GLOBAL_HOOKS or hook.scope._forward_hooks:  # hooks run after this forward (see OutputGuard)
            hook.guard_output(out)
        return out

    def _nested(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """:meth:`_call`, nested in this thread's scopes: their modes ignore its calls, their lean forwards get none."""
        state = NESTING
        state.depth += 1
        lean, state.lean = state.lean, None
        try:
            out = self._call(args, kwargs)
            hook = self.__moe_replay_hook__
            if _GLOBAL_HOOKS or hook.scope._forward_hooks:  # hooks run after this forward (see OutputGuard)
                hook.guard_output(out)
        except Exception as e:  # (an error of its own in a run moe_replay makes: noted, whatever the forward's code
            note_fault(e)  # around this call does with it, see _faults)
            raise
        finally:
            state.depth -= 1
            state.lean = lean
        return out

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hook = self.__moe_replay_hook__
        if NESTING.probing:  # inside another router's probe run (in this thread): run plainly (its errors its own)
            return forwards_call(self.__wrapped__, args, kwargs)
        if hook.kept and _grad() and (_dynamo_compiling() or _in_compiled_autograd()) and _top_hooks() is None:
            # rows wait for a checkpoint's recompute, and compiled autograd (traced or run eagerly) runs this
            # forward with gradients in no non-reentrant checkpoint: a reentrant checkpoint's recompute, whose
            # region cannot be seen (a new forward in a reentrant checkpoint runs without gradients)
            hook._refuse_unseen_recompute()
        if (
            hook.capturing
            or hook.replaying
            or hook.verifying
            or hook.seen is not None
            or (not _compiling() and hook.kept and _in_backward())
        ):
            if not _compiling() and _transform() is not None:
                hook._refuse_transform()
            if _dynamo_compiling() and (
                _transforms_active()
                or any(isinstance(a, torch.Tensor) and _is_batched(a) for a in (*args, *kwargs.values()))
            ):
                # compiled code that runs a torch.func transform itself (grad inside the compiled function) or is called
                # inside one (dynamo cannot ask for the transform itself, but traces and guards these two)
                hook._refuse_transform()
            if _exporting() or (not _compiling() and _tracing()):
                hook._refuse_export()
            if _dynamo_compiling() and hook.owner is not None and hook.owner.ident not in (None, _THIS_THREAD.ident):
                # traced in a thread other than the one holding the block (see _ThisThread): code that refuses
                return hook._refuse_thread_traced(self.__wrapped__, args, kwargs)
            return hook._run(self.__wrapped__, args, kwargs)
        if not _compiling() and hook.unproven() and not _graph_capturing() and _transform() is None and not _tracing():
            # (not under jit.trace or make_fx: the probe's ops would be traced into the program, which routes natively)
            if hook.prove(self.__wrapped__, args, kwargs) is None:  # once: which call decides, by its effect
                return run_unestablished(hook.name, hook.scope, self.__wrapped__, args, kwargs)  # (no token)
            try:
                return self.__wrapped__(*args, **kwargs)
            finally:
                hook._settle()
        return self.__wrapped__(*args, **kwargs)

    def _follow_class(self) -> None:
        """The class's forward was patched since attach: wrap the new one; its decision is established again.

        A descriptor that makes a new callable at each access (``functools.partialmethod``) is the
        same forward as long as the class holds the same descriptor."""
        hook = self.__moe_replay_hook__
        cls = type(hook.scope)
        raw = _raw_forward(cls)
        if raw is self._class_raw:
            return
        fn = cls.forward
        get = getattr(raw, "__get__", None)
        self.__wrapped__ = get(hook.scope, cls) if get is not None else raw
        self._class_fn, self._class_raw = fn, raw
        hook.forget(every_mode=True, why=f"a change of its code: {cls.__name__}.forward was replaced")

    def _class_forward(self) -> bool:
        """Does it wrap its module's class forward (the module had no ``forward`` of its own)?"""
        inner, scope = self.__wrapped__, self.__moe_replay_hook__.scope
        return (
            isinstance(inner, types.MethodType)
            and inner.__self__ is scope
            and inner.__func__ is getattr(type(scope), "forward", None)
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., Any]:
        # a deep copy of the model: the plain forward it wraps (the copy's class forward, looked up at each call)
        if self._class_forward():
            return ClassForward(copy.deepcopy(self.__moe_replay_hook__.scope, memo))
        return copy.deepcopy(self.__wrapped__, memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (torch.save(model), spawn, Ray): the plain forward it wraps, as a deep copy gets
        if self._class_forward():
            return (ClassForward, (self.__moe_replay_hook__.scope,))
        return (operator.itemgetter(0), ((self.__wrapped__,),))

    @property
    def __globals__(self) -> dict[str, Any]:  # (what torch.jit.script reads first of a forward to compile)
        raise _script_refusal(self, self.__moe_replay_hook__.scope, copied=False)

    @property
    def __code__(self) -> types.CodeType:  # (what torch.export reads of the exported module's forward)
        return _code_of(self.__wrapped__)

    def __repr__(self) -> str:
        return f"<moe_replay forward of router '{self.__moe_replay_hook__.name}'>"


def _code_of(fn: Any) -> types.CodeType:
    """The code object of the function ``fn`` runs (through wrappers and bound methods).

    Read as the ``__code__`` of moe_replay's ``forward`` wrappers: ``torch.export`` names the exported module's
    inputs from its ``forward.__code__``. Where ``fn`` runs no Python function, the read fails as it would on
    ``fn`` itself (an ``AttributeError``: ``hasattr`` says there is none)."""
    fn = inspect.unwrap(fn, stop=lambda f: isinstance(getattr(f, "__code__", None), types.CodeType))
    return fn.__code__


def _raw_forward(cls: type) -> Any:
    """The ``forward`` a class holds, as stored (the descriptor, not what an access makes of it)."""
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


class ClassForward:
    """The ``forward`` a copy of an attached router gets (a deep copy, ``pickle``, ``torch.save``): its class's
    forward, looked up at each call as for a module with no ``forward`` of its own, so a later patch of the
    class reaches it. :func:`~moe_replay.attach` on the copy takes it for no forward of its own (and removes
    it at detach)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __self__(self) -> nn.Module:  # (read as a bound method is: its module, its function, its signature)
        return self.module

    @property
    def __func__(self) -> Callable[..., Any]:
        return type(self.module).forward

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return types.MethodType(type(self.module).forward, self.module)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ClassForward, (self.module,))

    @property
    def __globals__(self) -> dict[str, Any]:  # (what torch.jit.script reads first of a forward to compile)
        raise _script_refusal(self, self.module, copied=True)

    @property
    def __code__(self) -> types.CodeType:  # (what torch.export reads of the exported module's forward)
        return _code_of(type(self.module).forward)

    def __deepcopy__(self, memo: dict[int, Any]) -> ClassForward:
        return ClassForward(copy.deepcopy(self.module, memo))

    def __repr__(self) -> str:
        return f"<forward of {type(self.module).__name__} (its class's)>"


def _hooks_inside(scope: nn.Module, short: bool = False) -> str:
    """A sentence naming the forward hooks inside ``scope`` (none: ``""``), for an error on its decision-like calls.

    The runs that establish a decision set the forward hooks of the scope's submodules aside (so that a hook
    counting or logging sees one forward): a decision-like call made in one (a gate's hook taking a top-k of
    the logits to log the experts' load) is in every real forward but in none of those runs, so every forward
    differs from the one the decision was established on. Read without running anything (``vars``). ``short``: only
    where they are (`` (hooks on ...)``).
    """
    hooked = []
    for path, m in scope.named_modules():
        if m is scope:
            continue
        fns = [f for h in _HOOK_FNS for f in (vars(m).get(h) or {}).values() if not _own_hook(f)]
        if fns:
            names = ", ".join(getattr(f, "__qualname__", None) or type(f).__name__ for f in fns[:2])
            hooked.append(f"'{path}' ({names}{', ...' if len(fns) > 2 else ''})")
    if not hooked:
        return ""
    more = ", ..." if len(hooked) > 3 else ""
    if short:
        return f" (hooks on {', '.join(hooked[:3])}{more})"
    return (
        f". Forward hooks are registered inside its scope, on {', '.join(hooked[:3])}{more}. A decision-like call "
        "made in one that the runs establishing its decision set aside runs uncounted; where a hook changed the "
        "forward's output, they ran with the hooks in, and a call made in one counts as the forward's own, so one "
        "made at some forwards only (a top-k of the gate's logits to log the experts' load every few steps) makes "
        "them differ from the established one. Read the experts chosen from session.routes() (or the scores from "
        "session.keep_scores()) instead of taking a top-k in a hook"
    )


def _on_device_of(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Forced ``rows`` on the device of the decision call's scores ``x``: a router may take its top-k of a copy
    on another device (``scores.cpu()``, then the indices moved back), and the call's answer must be where its
    own indices would have been."""
    return rows if rows.device == x.device else rows.to(x.device)


def _form_words(out: Any) -> str:
    """What a router returned, in words: ``a tuple of 1 item``, ``a Tensor``."""
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)} item{'s' if len(out) != 1 else ''} with no integer tensor"
    return f"a {type(out).__name__}" + (" of floats" if isinstance(out, torch.Tensor) else "")


def _holds(out: Any, indices: torch.Tensor) -> bool:
    """Is ``out`` these indices, or a view of them?"""
    if out is indices:
        return True
    if not isinstance(out, torch.Tensor) or out.device != indices.device or out.dtype != indices.dtype:
        return False
    if out.numel() == 0 or indices.numel() == 0:
        return out.numel() == indices.numel()
    return out.untyped_storage().data_ptr() == indices.untyped_storage().data_ptr()


def _settings(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    """The plain settings of a module and its children (``top_k = 2``...), with those one level into a config
    object or dict they hold (``self.cfg.use_bias``): a decision established under other settings is not reused."""
    out: list[tuple[str, Any]] = []
    for name, m in module.named_modules():
        for k, v in sorted(vars(m).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, int | float | str | bool):
                out.append((f"{name}.{k}", v))
            elif isinstance(v, dict) or _config_like(v):
                out.extend((f"{name}.{k}.{sub}", w) for sub, w in _held_settings(v))
    return tuple(out)


def _held_settings(v: Any) -> list[tuple[str, Any]]:
    """The plain settings a config object or a dict holds, by name (as compared)."""
    return settings_in(v.items() if isinstance(v, dict) else vars(v).items())


class _HeldSettings:
    """What a config object held as its settings were last read (:func:`_config_settings`): the names in its
    ``__dict__`` and their values' types, in order, and the values :func:`settings_in` reads (those of a plain type
    or an ``enum``), all by identity; with the settings, and those keyed under each head they were asked for."""

    __slots__ = ("at", "by_head", "held", "keys", "kinds", "ref", "values")

    def __init__(self, v: Any, own: dict[Any, Any], held: list[tuple[str, Any]]) -> None:
        self.ref = weakref.ref(v, functools.partial(_forget_held, id(v)))
        self.keys = tuple(own)
        values = tuple(own.values())
        self.kinds = tuple(map(type, values))
        # (the places settings_in reads, told as it tells them)
        read = [i for i, x in enumerate(values) if type(x) in _PLAIN_SETTINGS or isinstance(x, enum.Enum)]
        # (each place twice: an itemgetter of one place returns the value itself, of two or more a tuple)
        self.at = operator.itemgetter(*read, *read) if read else None
        self.values = self.at(values) if self.at is not None else ()
        self.held = held
        self.by_head: dict[str, dict[str, Any]] = {}

    def holds(self, own: dict[Any, Any]) -> bool:
        """Does ``own`` (the object's ``__dict__`` now) hold what it did: the same names in the same order, values of
        the same types, the very same values where they are settings? Compared by identity, in C (nothing of the
        model's code runs): a value set again (``config.use_bias = False`` once more, an int that is not cached)
        reads as changed, and the settings are read again."""
        keys = self.keys
        if len(own) != len(keys) or not all(map(operator.is_, keys, own)):
            return False
        values = tuple(own.values())
        if not all(map(operator.is_, self.kinds, map(type, values))):
            return False
        at = self.at
        return at is None or all(map(operator.is_, self.values, at(values)))


#: the settings of the config objects read (by ``id``; each entry goes with its object): a router's path and its
#: scope read the same config at every block, its dozens of settings unchanged
_HELD: dict[int, _HeldSettings] = {}


def _forget_held(key: int, ref: weakref.ref[Any]) -> None:
    entry = _HELD.get(key)
    if entry is not None and entry.ref is ref:
        del _HELD[key]


def _config_settings(v: Any, head: str, memo: dict[int, list[tuple[str, Any]]] | None) -> dict[str, Any]:
    """The settings a config object or a dict ``v`` holds (:func:`_held_settings`), keyed under ``head``
    (``"config."``). A config object's are kept from the last read while its ``__dict__`` holds the same names and
    the same values (:meth:`_HeldSettings.holds`); ``memo``: those read in this call, by ``id`` (a dict's too)."""
    held = memo.get(id(v)) if memo is not None else None
    if isinstance(v, dict):
        if held is None:
            held = _held_settings(v)
            if memo is not None:
                memo[id(v)] = held
        return {head + sub: w for sub, w in held}
    kept = _HELD.get(id(v))
    if held is None:
        own = vars(v)
        if kept is not None and type(own) is dict and kept.ref() is v and kept.holds(own):
            held = kept.held
        else:
            held = settings_in(own.items())
            kept = None
            if type(own) is dict:
                try:
                    kept = _HeldSettings(v, own, held)
                except TypeError:  # (no weak reference to it: read at every call)
                    pass
                else:
                    _HELD[id(v)] = kept
        if memo is not None:
            memo[id(v)] = held
    if kept is None or kept.held is not held:  # (read in this call, not kept)
        return {head + sub: w for sub, w in held}
    made = kept.by_head.get(head)
    if made is None:
        made = kept.by_head[head] = {head + sub: w for sub, w in held}
    return made


_ABSENT = object()  # a setting a module does not have
_PLAIN_SETTINGS = frozenset((int, float, str, bool, type(None)))  # (as is_setting reads them, with enum members)
#: the attributes every module has (private, and ``training``: decisions are kept by mode), none of them a setting
_MODULE_OWN = frozenset((*vars(nn.Module()), "training"))
#: what torch keeps under them (dicts of parameters, buffers, children and hooks, a set, flags): no tensor, no list
_MODULE_OWN_TYPES = frozenset((dict, collections.OrderedDict, set, bool, type(None)))
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)  # (experts: their settings do not decide)


def _fingerprint(
    scope: nn.Module,
    *,
    code: bool = True,
    children: bool = True,
    memo: dict[int, list[tuple[str, Any]]] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """The settings a router scope's decision may depend on, by name: the plain values (``int``, ``float``,
    ``str``, ``bool``, ``None``) of the scope and of its children outside containers (a gate, a router module,
    not the experts of a ``ModuleList``), and those one level into a config object or a dict they hold
    (``self.cfg.use_bias``), with what their code reads from outside them (a module-level flag, a class
    attribute, a closure cell, a 0-d boolean or integer buffer, a chain such as ``self.config.routing.use_bias`` or
    ``os.environ.get("X")``, a default argument: :mod:`moe_replay._code_settings`). ``training`` is not
    one: decisions are kept by mode. Cheap enough for every block. ``code=False``: the modules' own attributes and
    flag buffers alone (what the runs that establish a decision put back after each run). ``memo``: the settings of
    the configs read already, by ``id``, for calls that read the same config through many modules at one time.
    ``children=False``: the scope's own alone. ``prefix``: put before the keys of the modules' own attributes and
    buffers (not before those of globals their code reads)."""
    out: dict[str, Any] = {}
    modules = [(prefix, scope)]
    if children:
        modules += [
            (f"{prefix}{name}.", m)
            for name, m in scope._modules.items()
            if m is not None and not isinstance(m, _CONTAINERS)
        ]
    for prefix, m in modules:
        own = vars(m)
        for k in sorted(own.keys() - _MODULE_OWN):  # (the attributes every module has left out at once, in C)
            if k.startswith("_"):
                continue
            v = own[k]
            kind = type(v)
            if kind in _PLAIN_SETTINGS:  # (is_setting and comparable, inline: the common case)
                out[prefix + k] = "nan" if kind is float and v != v else v
            elif isinstance(v, enum.Enum):
                out[prefix + k] = comparable(v)
            elif isinstance(v, dict) or _config_like(v):
                out.update(_config_settings(v, f"{prefix}{k}.", memo))
        # what its code reads besides: module-level globals, class attributes, closure cells, 0-d flag buffers
        read = code_settings(m, m.__dict__.get("forward")) if code else flag_buffers(m)
        if read:
            out.update(
                (f"{prefix}{k[5:]}" if k.startswith("self.") else f"{prefix}{k}" if k.startswith("buffer ") else k, v)
                for k, v in read.items()
            )
    return out


def _around_values(scope: nn.Module, names: frozenset[str]) -> dict[str, Any]:
    """The values of the attributes ``names`` as the scope's modules read them (their own, or their class's: looked
    up statically, nothing of theirs runs), the plain ones, by the keys of :func:`_fingerprint`."""
    out: dict[str, Any] = {}
    for prefix, m in _scope_modules(scope):
        for name in names:
            value = inspect.getattr_static(m, name, _ABSENT)
            out[prefix + name] = comparable(value) if is_setting(value) else type(value)
    return out


def _scope_modules(scope: nn.Module) -> list[tuple[str, nn.Module]]:
    """The scope and its children outside containers, with the prefixes of their keys in :func:`_fingerprint`."""
    return [("", scope)] + [
        (f"{name}.", m) for name, m in scope._modules.items() if m is not None and not isinstance(m, _CONTAINERS)
    ]


def _written(scope: nn.Module) -> set[str]:
    """The keys of :func:`_fingerprint` that the code of the scope's modules assigns (``self._step += 1``, a global
    set once a warning is given), their forward hooks and pre-hooks too (a hook counting calls: ``m.calls += 1``):
    their state, not settings (see :func:`moe_replay._code_settings.written` and ``hook_written``). A 0-d buffer
    the code assigns or changes in place (``self.steps += 1`` on a count of decode steps) is its state too: keyed
    ``"buffer <name>"``, as :func:`_fingerprint` keys its flag buffers."""
    out: set[str] = set()
    for prefix, m in _scope_modules(scope):
        buffers = m._buffers
        for k in written(m, m.__dict__.get("forward")) | hook_written(m):
            if not k.startswith("self."):
                out.add(k)
                continue
            out.add(prefix + k[5:])
            if k[5:] in buffers:
                out.add(f"{prefix}buffer {k[5:]}")
    return out


def _module_state(scope: nn.Module) -> set[str]:
    """The keys of :func:`_fingerprint` that are attributes of the scope's modules, private ones too, and their 0-d
    flag buffers: what the runs that establish or check a decision put back after each run."""
    keys = set(_fingerprint(scope, code=False))
    keys.update(prefix + k for prefix, m in _scope_modules(scope) for k in vars(m) if k.startswith("_"))
    return keys


_NO_CONFIGS = (nn.Module, torch.Tensor, type, types.ModuleType)


def _config_like(v: Any) -> bool:
    """Is ``v`` an object that holds settings (a config, a namespace, a dataclass), read one level deep?

    As ``isinstance(v, nn.Module | torch.Tensor | type | types.ModuleType)`` tells, with ``v.__class__`` read once:
    ``isinstance`` reads it again for each class ``type(v)`` is not, through a config's own ``__getattribute__``
    (transformers' ``PretrainedConfig`` maps names in Python at every read), and this runs at every block."""
    kind = type(v)
    if issubclass(kind, _NO_CONFIGS) or callable(v) or not hasattr(v, "__dict__"):
        return False
    told = getattr(v, "__class__", kind)  # (a proxy may say another class, as isinstance reads it)
    return told is kind or not (isinstance(told, type) and issubclass(told, _NO_CONFIGS))


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


_TOPK_FN = torch.topk  # as imported: torch's own function (the lean wrapper hands over this one)


_TOPK_RESULT = torch.return_types.topk
_TENSOR = torch.Tensor
_PLAIN = (int, bool, type(None))


def _plain(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Are these arguments plain values (``k``, ``dim``, ``largest``...), compared by ``==`` safely?"""
    return all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values())


_TOPK_KWARGS = frozenset(("dim", "largest", "sorted"))


def _topk_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, int, int] | None:
    """:func:`~moe_replay.evidence.decision_call` for ``torch.topk``, its common forms read directly."""
    if len(args) >= 2 and type(args[1]) is int and (not kwargs or kwargs.keys() <= _TOPK_KWARGS):
        x = args[0]
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1) if kwargs else -1
        if type(x) is torch.Tensor and type(dim) is int and x.dim() >= 2 and x.dtype != torch.bool:
            width = x.shape[-1]
            if (dim == -1 or dim == x.dim() - 1) and width >= 2:
                return "topk", args[1], width
            return None
    return decision_call(_TOPK_FN, args, kwargs)


class _DecisionMode(TorchFunctionMode):
    """Routes the scope forward's torch calls: decisions to the hook, the rest through.

    Auditing, it also notes (``hook._missed``) a call it acts on that did not come through a
    lean wrapper: the router then keeps the mode.
    """

    def __init__(self, hook: RouterHook, compiling: bool, audit: bool = False) -> None:
        super().__init__()
        self.hook = hook
        self.watched = _WATCHED_LOOKUP if hook.decision == "lookup" else _WATCHED
        self.depth = -1 if compiling else NESTING.depth  # -1: compiled, no nesting to tell
        self.audit = audit

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func not in self.watched:  # the hot path: every other torch call of the scope forward
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if self.depth >= 0 and NESTING.depth != self.depth:  # a call of a router nested in this scope
            return func(*args, **kwargs)
        func = unwrap(func, kwargs)
        if "out" in kwargs:  # (a decision-like call into out= tensors: answered as one without, then written there)
            written = through_out(func, args, kwargs, lambda f, a, k: self.__torch_function__(f, types, a, k))
            if written is not NO_OUT:
                return written
        hook = self.hook
        wrapped = not self.audit or NESTING.via is func
        if func in _MASKS or func in _WHERE:
            out = func(*args, **kwargs)
            if hook.note_mask(func, args, kwargs, out) and not wrapped:
                hook._missed = True
            return out
        if func in _LOOKUP:
            if hook.is_lookup(func, args, kwargs):
                return hook.decide(func, args, kwargs, hook.top_k or 1)
            return func(*args, **kwargs)
        sig = decision_call(func, args, kwargs)
        if sig is None:
            return func(*args, **kwargs)
        if hook.decision == "lookup":  # (not one over another width: a group's top-k, a sort of tokens)
            if sig[2] == hook.num_experts:
                hook.refuse_rival_of_lookup(sig)
            return func(*args, **kwargs)
        if not wrapped:
            hook._missed = True
        return hook.on_call(func, args, kwargs, sig)
