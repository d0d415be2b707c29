"""The private torch internals moe_replay uses, each found once by feature detection.

Every use of a private torch name goes through this module, so a torch release that moved
one fails with a :class:`~moe_replay.errors.MoEReplayError` naming the internal, what it is
for and the torch version, at :func:`moe_replay.attach` (through :func:`check`), never with an
``AttributeError`` inside a forward. docs/concepts.md ("Torch internals used") says why each
one is needed.

Lookups happen at import; the names bound here are the torch functions themselves (or a
function that raises), so the hot path pays nothing for the indirection.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._quiet import aloud
from .errors import MoEReplayError

__all__ = [
    "COMPILER",
    "CUDA",
    "EXPORT",
    "FORK",
    "FX",
    "NO_TORCH_FUNCTION",
    "TESTED_TORCH",
    "BackwardCFunction",
    "CheckpointFrame",
    "bad_fork",
    "before_graph_capture",
    "build_namespace_caches",
    "check",
    "current_graph_task_id",
    "dispatch_modes",
    "dynamo_compiling",
    "engine_backward",
    "exporting",
    "frame_callback",
    "functorch_transform",
    "fwd_grad_enabled",
    "global_forward_hooks",
    "global_forward_pre_hooks",
    "graph_capturing",
    "hidden_from_dispatch_modes",
    "in_compiled_autograd",
    "is_batched",
    "jit_tracing",
    "mark_static_address",
    "maybe_mark_dynamic",
    "missing",
    "module_call_kwargs",
    "register_jit_builtin",
    "stream_capturing",
    "top_saved_tensors_hooks",
    "tracing",
    "transforms_active",
]

#: The torch versions the suite runs on, as pyproject.toml declares them.
TESTED_TORCH = ">=2.11,<2.15"

#: Internal -> what moe_replay needs it for; filled by the lookups below.
_MISSING: dict[str, str] = {}
#: The internals without which no capture or replay can run (checked by :func:`check`).
_REQUIRED = (
    "torch._C._current_graph_task_id",
    "torch._C._autograd._top_saved_tensors_default_hooks",
    "torch.autograd.function.BackwardCFunction",
)


def _message(path: str, why: str) -> str:
    return (
        f"moe_replay needs `{path}` ({why}), which torch {torch.__version__} does not have. moe_replay is "
        f"tested with torch{TESTED_TORCH}: install a torch in that range, or report this torch version"
    )


def _find(path: str, why: str) -> Any:
    """The object at the dotted ``path`` under ``torch``, or None (recorded in ``_MISSING``)."""
    obj: Any = torch
    for part in path.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            _MISSING[path] = why
            return None
    return obj


def _unavailable(path: str, why: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MoEReplayError(_message(path, why))

    fail.__qualname__ = fail.__name__ = f"missing:{path}"
    return fail


def _function(path: str, why: str) -> Callable[..., Any]:
    fn = _find(path, why)
    return fn if callable(fn) else _unavailable(path, why)


#: ``() -> int``: the id of the autograd graph task running now, -1 outside backward. It tells
#: the recompute of a checkpointed region (inside backward) from its forward, and one backward
#: from the next over a retained graph.
current_graph_task_id: Callable[[], int] = _function(
    "torch._C._current_graph_task_id", "to tell a recompute in backward from a forward"
)

#: ``(outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused, accumulate_grad) -> grads``: the
#: autograd engine's run of a backward, without ``torch.autograd.grad``'s own dispatch to ``__torch_function__``
#: modes (which runs the whole backward with the mode popped): a mode entered around it sees the calls that the
#: Python code of the backward makes (a custom ``autograd.Function``'s), as a router's decision is checked not to be
#: taken again there. None where torch has none: that check is not made.
engine_backward: Callable[..., Any] | None = _find(
    "torch.autograd.graph._engine_run_backward", "to watch the calls a router's backward makes"
)

#: ``() -> bool``: is forward-mode AD on? ``torch.no_grad()`` leaves it on; a custom
#: ``autograd.Function`` turns it off while its ``forward`` runs. So with gradients off and this
#: on, no reentrant checkpoint is running its forward, and the Python stack need not be searched.
fwd_grad_enabled: Callable[[], bool] = _find(
    "torch._C._is_fwd_grad_enabled", "to skip the search for reentrant checkpoints under no_grad"
) or (lambda: False)

#: ``(cond, msg) -> None``: a device-side assert, no host sync (a fixed CPU ring's overflow check
#: raises at the forward, in compiled code too).
assert_async: Callable[..., None] = _function("torch._assert_async", "to check a fixed capture ring on the device")

_top_hooks = _function(
    "torch._C._autograd._top_saved_tensors_default_hooks",
    "to find the non-reentrant activation checkpoint a router runs in",
)


#: ``() -> (pack, unpack) | None``: the innermost saved-tensor hooks, or None: how non-reentrant
#: ``torch.utils.checkpoint`` marks the region it runs (and recomputes). A partial, so that the
#: router's hot path calls torch's function with no Python frame between.
top_saved_tensors_hooks: Callable[[], tuple[Any, Any] | None] = functools.partial(_top_hooks, False)

#: torch's caches of the functions its namespaces hold, each built once per process (``functools.cache``) by
#: reading those namespaces: which functions dispatch to ``__torch_function__`` modes, and with what tests
#: (torch.overrides), which of them dynamo dispatches to a mode and how it traces each (dynamo's own: only loaded
#: where dynamo is; ``torch._dynamo.reset()`` leaves them, ``trace_rules.clear_lru_cache()`` empties the last).
_NAMESPACE_CACHES = (
    ("torch.overrides", "_get_overridable_functions"),
    ("torch.overrides", "get_testing_overrides"),
    ("torch.overrides", "get_ignored_functions"),
    ("torch._dynamo.variables.torch", "get_overridable_functions"),
    ("torch._dynamo.trace_rules", "get_torch_obj_rule_map"),
)


def build_namespace_caches() -> None:
    """Build the caches torch keeps of the functions in its namespaces now, while they hold torch's own functions.

    The lean interception puts wrappers of ``torch.topk``, ``torch.where``... in torch's namespace while an eager
    router forward runs (:mod:`moe_replay._lean`). A cache first built inside such a forward (a ``torch.compile``d
    helper the router calls is compiled there) holds the wrappers in place of torch's functions for the rest of
    the process: dynamo then never dispatches ``torch.topk`` to a ``__torch_function__`` mode, so a router traced
    in any later compiled forward takes its own top-k, and a replay there forces nothing. Called before the
    wrappers go in; a cache built already costs a call. A cache this torch lacks (or one that fails to build) is
    left to torch: torch raises its own errors where it uses it."""
    for module_name, name in _NAMESPACE_CACHES:
        module = sys.modules.get(module_name)  # (dynamo is not imported for this: its caches come with it)
        build = getattr(module, name, None) if module is not None else None
        if callable(build):
            with contextlib.suppress(Exception):
                build()


#: ``() -> bool``: is dynamo tracing the caller? One Python frame where ``is_compiling()`` takes
#: two; dynamo reads it as True. For code that only dynamo can trace: torch's own
#: ``is_compiling()`` is also True under export and AOT tracing.
dynamo_compiling: Callable[[], bool] = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)

#: ``() -> callback | None``: what dynamo does with a Python frame entered now: None where it runs as plain
#: Python; a callback (or False: cached compiled code only) where eager code runs inside a ``torch.compile``'d
#: call (a frame it skipped, a graph break's eager part), whose nested frames it compiles one by one.
frame_callback: Callable[[], Any] = _find(
    "torch._C._dynamo.eval_frame.get_eval_frame_callback", "to keep a router's own frame out of torch.compile"
) or (lambda: None)


#: torch's global module forward hooks (``register_module_forward_hook``), by handle id: they run after the
#: forward of every module, before the module's own hooks, and may replace what a router returned. The dict
#: itself (torch adds to it in place); an empty one where torch keeps none.
_global_hooks = _find(
    "torch.nn.modules.module._global_forward_hooks", "to see a global forward hook run after a router"
)
global_forward_hooks: dict[int, Any] = _global_hooks if isinstance(_global_hooks, dict) else {}
#: torch's global module forward pre-hooks (``register_module_forward_pre_hook``), by handle id, likewise.
_global_pre_hooks = _find(
    "torch.nn.modules.module._global_forward_pre_hooks", "to see a global forward pre-hook added after a decision"
)
global_forward_pre_hooks: dict[int, Any] = _global_pre_hooks if isinstance(_global_pre_hooks, dict) else {}


def in_compiled_autograd() -> bool:
    """Is compiled autograd running a backward graph (traced by dynamo, or eagerly once dynamo gave it up)?

    It runs a reentrant checkpoint's recompute from a frame of its own, outside the autograd engine's
    graph task: nothing else tells that recompute from a new forward. False where it never ran."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and bool(getattr(module, "in_compiled_autograd_region", False))


class _CompilingFlag:
    """``torch.compiler`` as far as ``_is_compiling_flag`` goes, on a torch that keeps no such flag."""

    @property
    def _is_compiling_flag(self) -> bool:
        return torch.compiler.is_compiling()


#: An object whose ``_is_compiling_flag`` is ``torch.compiler.is_compiling()`` in eager code (code
#: that dynamo is not tracing): ``torch.compiler`` itself, read with no call, where torch keeps it.
COMPILER: Any = (
    torch.compiler if isinstance(getattr(torch.compiler, "_is_compiling_flag", None), bool) else _CompilingFlag()
)


class _CudaState:
    """``torch.cuda`` as far as ``_initialized`` goes, on a torch that keeps no such flag."""

    @property
    def _initialized(self) -> bool:
        return torch.cuda.is_initialized()


#: An object whose ``_initialized`` says whether CUDA is initialised in this process (maybe a forked
#: child's inherited flag: :data:`bad_fork` tells): ``torch.cuda`` itself, read with no call, where it keeps it.
CUDA: Any = torch.cuda if isinstance(getattr(torch.cuda, "_initialized", None), bool) else _CudaState()
#: ``() -> bool``: is the current CUDA stream capturing a graph? (Ask once CUDA is initialised.)
stream_capturing: Callable[[], bool] = (
    getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
)


#: ``() -> bool``: is ``torch.export`` tracing the caller (strict or not)? Unlike a compiled graph, an exported
#: program keeps no guards on what it was traced under.
#: (The flag itself, read as a module global: dynamo reads its value, where torch 2.11's dynamo answers
#: ``is_exporting()`` with True inside ``torch.compile`` too.)
def exporting() -> bool:
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


class _NoExportFlag:
    """``torch.compiler`` as far as its export flag goes, on a torch that keeps none (:func:`exporting` reads False)."""

    _is_exporting_flag = False


#: An object whose ``_is_exporting_flag`` is :func:`exporting`'s answer: ``torch.compiler`` itself, read with no call
#: (for a caller that spells it inline at every forward), or a False one where torch keeps no such flag.
EXPORT: Any = (
    torch.compiler if isinstance(getattr(torch.compiler, "_is_exporting_flag", None), bool) else _NoExportFlag()
)


_jit_tracing: Callable[[], bool] = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing
_PROXY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)
_dispatch_mode: Callable[[Any], Any] = getattr(torch._C, "_get_dispatch_mode", None) or (lambda key: None)
#: ``() -> int``: how many torch dispatch modes are set in this thread, its infrastructure modes (``make_fx``'s proxy
#: mode, a fake tensor mode) counted: where none is, no proxy mode is either, known without the slower keyed read
_dispatch_modes: Callable[[], int] = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 1)


_fx_tracer: Any
try:
    from torch.fx import _symbolic_trace as _fx_tracer
except ImportError:  # pragma: no cover - depends on the torch version
    _fx_tracer = None
if not isinstance(getattr(_fx_tracer, "_is_fx_tracing_flag", None), bool):
    _fx_tracer = None
    _MISSING["torch.fx._symbolic_trace._is_fx_tracing_flag"] = "to refuse torch.fx.symbolic_trace inside a block"


def _tracing_any() -> bool:
    return (
        _jit_tracing()
        or (_PROXY is not None and _dispatch_mode(_PROXY) is not None)
        or (_fx_tracer is not None and _fx_tracer._is_fx_tracing_flag)
    )


def _tracing_usual() -> bool:  # (where torch has both: the same, without the tests of what it has)
    return (
        _jit_tracing()
        or (_dispatch_modes() != 0 and _dispatch_mode(_PROXY) is not None)  # (no mode at all: none is make_fx's)
        or _fx_tracer._is_fx_tracing_flag
    )


#: ``() -> bool``: is ``torch.jit.trace`` (the TorchScript ``torch.onnx.export`` too), ``make_fx`` or
#: ``torch.fx.symbolic_trace`` tracing the eager caller? Like an exported program, what they make keeps no guards on
#: what it was traced under. (Not to be asked in code dynamo traces.)
tracing: Callable[[], bool] = _tracing_usual if _PROXY is not None and _fx_tracer is not None else _tracing_any


class _NoFxFlag:
    """``torch.fx._symbolic_trace`` as far as its flag goes, on a torch that keeps none (:data:`tracing` reads none)."""

    _is_fx_tracing_flag = False


#: :data:`tracing` in parts, for a caller that runs at every router forward and spells it inline, with no Python
#: frame of its own: ``jit_tracing() or (dispatch_modes() != 0 and tracing()) or FX._is_fx_tracing_flag`` is
#: :data:`tracing`'s answer (``dispatch_modes()`` is never 0 where a proxy mode is set, nor where torch cannot count
#: its modes; ``FX`` holds the flag :data:`tracing` reads, or a False one where it reads none).
jit_tracing: Callable[[], bool] = _jit_tracing
dispatch_modes: Callable[[], int] = _dispatch_modes
FX: Any = _fx_tracer if _fx_tracer is not None else _NoFxFlag()


#: ``() -> object | None``: the innermost ``torch.func`` transform running now (``vmap``, ``grad``,
#: ``jvp``...), or None outside every transform.
functorch_transform: Callable[[], Any] = _find(
    "torch._C._functorch.peek_interpreter_stack", "to refuse a capture or replay inside torch.func transforms"
) or (lambda: None)
#: ``() -> bool``: is any ``torch.func`` transform running? Unlike :data:`functorch_transform`, dynamo traces it (and
#: guards on it): compiled code that runs a transform itself, or is called inside one, can tell.
transforms_active: Callable[[], bool] = _find(
    "torch._C._are_functorch_transforms_active", "to refuse a capture or replay inside torch.func transforms"
) or (lambda: False)
#: ``(tensor) -> bool``: is this a tensor batched by ``vmap``? Unlike :data:`functorch_transform`, dynamo traces it
#: (and guards on it), so compiled code called inside ``vmap`` can tell.
is_batched: Callable[[torch.Tensor], bool] = getattr(torch._C._functorch, "is_batchedtensor", None) or (lambda t: False)
#: ``() -> bool``: is this a forked child of a process that had initialised CUDA?
bad_fork: Callable[[], bool] = getattr(torch._C, "_cuda_isInBadFork", None) or (lambda: False)


class _Fork:
    """:data:`bad_fork`'s answer, kept as a field: read with no call where it runs at every router forward.

    It changes only at a fork, in the child, and :func:`os.register_at_fork` runs :func:`_forked` there,
    after torch's own handler has set its flag (a C-level ``pthread_atfork`` handler, run inside the fork
    itself) and before any Python code of the child runs on. A fork that skips CPython's handlers (C code
    that forks without ``PyOS_AfterFork_Child``) leaves the field False: the stream query it guards then
    raises torch's own error about CUDA in a forked subprocess, as without it."""

    __slots__ = ("bad",)

    def __init__(self) -> None:
        self.bad = bool(bad_fork())  # (imported in a child forked already)


#: ``FORK.bad``: :data:`bad_fork`'s answer, kept up to date at each fork (see :class:`_Fork`).
FORK = _Fork()


def _forked() -> None:
    """In a forked child, before it runs on: torch's flag read once (see :class:`_Fork`)."""
    FORK.bad = bool(bad_fork())


if hasattr(os, "register_at_fork"):  # (where a process can fork: every POSIX system)
    os.register_at_fork(after_in_child=_forked)


_eval_frame_callback: Callable[[], Any] = _find(
    "torch._C._dynamo.eval_frame.get_eval_frame_callback", "to run a token check's eager work inside a compiled call"
) or (lambda: None)


def compile_region() -> bool:
    """Does eager code run inside a ``torch.compile``d call (a frame dynamo gave up, run eagerly with its callback
    still set)? Each Python function it calls is then compiled as a frame of its own, where ``is_compiling()`` is True
    for its eager caller, and ``torch.compiler.set_stance`` refuses to run."""
    callback = _eval_frame_callback()
    return callback is not None and callback is not False


def graph_capturing() -> bool:
    """Is a CUDA graph being captured on the current stream?

    ``torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()`` with two Python
    frames fewer (it runs at every router forward): a stream can only capture once CUDA is
    initialised (in this process: not in a forked child, which :data:`FORK` tells with no call).
    """
    return CUDA._initialized and not FORK.bad and stream_capturing()


_dispatch_depth: Callable[[], int] = _find(
    "torch._C._len_torch_dispatch_stack", "to hide moe_replay's own ops from selective activation checkpointing"
) or (lambda: 0)
_mode_stack: Callable[[], list[Any]] = _find(
    "torch.utils._python_dispatch._get_current_dispatch_mode_stack",
    "to hide moe_replay's own ops from selective activation checkpointing",
) or (lambda: [])
_disable_modes: Callable[[], Any] = (
    _find(
        "torch.utils._python_dispatch._disable_current_modes",
        "to hide moe_replay's own ops from selective activation checkpointing",
    )
    or contextlib.nullcontext
)


#: ``() -> list``: the torch function modes on the stack now, innermost last.
function_mode_stack: Callable[[], list[Any]] = _find(
    "torch.overrides._get_current_function_mode_stack", "to take off a router's mode a Ctrl-C left on the stack"
) or (lambda: [])
_pop_function_mode: Callable[[], Any] = _find(
    "torch.overrides._pop_mode", "to take off a router's mode a Ctrl-C left on the stack"
) or (lambda: None)


def drop_function_mode(mode: Any) -> None:
    """Take ``mode`` off the torch function mode stack where it is still innermost: a ``KeyboardInterrupt`` that
    lands inside its ``__enter__``, after its push and before the ``with`` that pops it is in place, leaves it
    there for every later torch call of the thread. Where its ``with`` popped it, nothing is done."""
    stack = function_mode_stack()
    if stack and stack[-1] is mode:
        _pop_function_mode()


def hidden_from_dispatch_modes() -> contextlib.AbstractContextManager[Any]:
    """A context in which the torch dispatch modes now active do not see the ops run (eager code only).

    moe_replay's own ops in a router forward (the probe runs that establish a decision, the native
    choice under a capture or a replay, ring reads and writes) run in a forward but not in its
    recompute. Selective activation checkpointing (``create_selective_checkpoint_contexts``) caches
    ops by their order of call in the forward and hands them out in that order in the recompute: an op
    it saw in the forward alone would shift every later one of its kind. So these ops run with the
    dispatch modes off, unless one of them is one of torch's own (fake tensors, tracing), which must see
    every op. A no-op when no mode is active (the common case: one C call).
    """
    if not _dispatch_depth() or any(m.is_infra_mode() for m in _mode_stack()):
        return contextlib.nullcontext()
    return _disable_modes()


#: ``torch.utils.checkpoint._CheckpointFrame``: the object of one non-reentrant checkpoint
#: region, which its pack hooks hold. None when torch has no such class: a router inside a
#: non-reentrant checkpoint is then refused (intercept.py), other uses are not affected.
CheckpointFrame: type | None
try:
    from torch.utils.checkpoint import _CheckpointFrame as CheckpointFrame  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on the torch version
    CheckpointFrame = None
    _MISSING["torch.utils.checkpoint._CheckpointFrame"] = "to find the region of a non-reentrant checkpoint"

#: The class of the ``ctx`` of a custom ``autograd.Function``: how a reentrant checkpoint
#: (torch's, Megatron's, DeepSpeed's) is recognised on the Python stack.
BackwardCFunction: type = _find(
    "torch.autograd.function.BackwardCFunction", "to find reentrant activation checkpoints on the Python stack"
) or type("_MissingBackwardCFunction", (), {})


def mark_static_address(t: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that ``t`` keeps its address across calls, as parameters do.

    What ``torch._dynamo.mark_static_address(t)`` does (torch/_dynamo/decorators.py), without
    importing dynamo: it sets the private tensor attribute ``_dynamo_static_input_type``. CUDA
    graphs of ``mode="reduce-overhead"`` then read and update the ring in place instead of
    skipping graphs for a mutated input or copying it per call. If a torch release stops
    reading the attribute, those graphs are skipped (slower, still correct).
    """
    t._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]
    return t


#: ``torch._C.DisableTorchFunction``: a context in which no torch function mode (nor a tensor subclass's
#: ``__torch_function__``) sees the calls made. moe_replay's own reads of a tensor's metadata inside a probe run (its
#: dtype, its version counter) are calls each mode below the probe's would otherwise be handed, several per call
#: of the forward. Where torch lacks it, the reads are made as they are (seen by the modes, the same values).
NO_TORCH_FUNCTION: Callable[[], contextlib.AbstractContextManager[Any]] = (
    getattr(torch._C, "DisableTorchFunction", None) or contextlib.nullcontext
)


def version_of(t: torch.Tensor) -> int:
    """How many times ``t`` (or a tensor sharing its storage) was written in place: the private counter
    ``Tensor._version`` autograd keeps. A later read that differs says the tensor was written between the two."""
    return int(t._version)


_warned: set[str] = set()


def maybe_mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """``torch._dynamo.maybe_mark_dynamic(t, dim)`` when dynamo is loaded (compiled models):
    routes of another length then need no recompile. Without it, they recompile (a warning)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    fn = getattr(dynamo, "maybe_mark_dynamic", None)
    if fn is None:
        if "maybe_mark_dynamic" not in _warned:
            _warned.add("maybe_mark_dynamic")
            with aloud():  # (moe_replay's own: said inside the runs of a forward too)
                warnings.warn(
                    f"torch {torch.__version__} has no torch._dynamo.maybe_mark_dynamic: a compiled model "
                    "recompiles for routes of each new length (still correct)",
                    stacklevel=3,
                )
        return
    fn(t, dim)


_jit_register = _find("torch.jit._builtins._register_builtin", "to let TorchScript compile torch.topk while attached")


def register_jit_builtin(fn: Callable[..., Any], op: str) -> None:
    """Tell TorchScript that the Python function ``fn`` is the operator ``op`` (``aten::topk``):
    scripted code that calls ``torch.topk`` while a session has it wrapped compiles as before."""
    if _jit_register is not None:
        _jit_register(fn, op)


_BEFORE_CAPTURE: list[Callable[[], None]] = []


def before_graph_capture(callback: Callable[[], None]) -> None:
    """Run ``callback`` eagerly each time a CUDA graph capture begins, before it begins.

    ``torch.cuda.CUDAGraph.capture_begin`` (what ``torch.cuda.graph``,
    ``make_graphed_callables`` and torch.compile's CUDA graphs call) is wrapped once, the
    first time a callback is registered; the wrapper calls every registered callback, then
    torch's method. moe_replay's rings count eager rows on the host and bring their device
    cursors up to date there, so a graph never bakes in a stale position.
    """
    if callback not in _BEFORE_CAPTURE:
        _BEFORE_CAPTURE.append(callback)
    cls = getattr(torch.cuda, "CUDAGraph", None)
    original = getattr(cls, "capture_begin", None)
    if original is None or getattr(original, "__moe_replay__", False):
        return

    @functools.wraps(original)
    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        for cb in _BEFORE_CAPTURE:
            cb()
        return original(self, *args, **kwargs)

    capture_begin.__moe_replay__ = True  # type: ignore[attr-defined]
    cls.capture_begin = capture_begin  # type: ignore[union-attr]


_CALL_IMPL = getattr(getattr(torch.nn.Module, "_call_impl", None), "__code__", None)


def module_call_kwargs(depth: int = 2) -> dict[str, Any]:
    """The keyword arguments of the module call whose global forward pre-hook runs ``depth`` frames up (torch's
    ``Module._call_impl`` hands its hooks the positional ones only); empty where that frame is not found (another
    torch: the caller then reads the positional arguments alone)."""
    f = sys._getframe(depth)
    for _ in range(3):
        if f is None:
            break
        if _CALL_IMPL is not None and f.f_code is _CALL_IMPL:
            kwargs = f.f_locals.get("kwargs")
            return kwargs if isinstance(kwargs, dict) else {}
        f = f.f_back  # type: ignore[assignment]
    return {}


def missing() -> dict[str, str]:
    """The internals this torch lacks, each with what it is needed for (empty on tested versions)."""
    return dict(_MISSING)


def check() -> None:
    """Raise :class:`MoEReplayError` if this torch lacks an internal every capture and replay uses.

    Called by :func:`moe_replay.attach` before anything is installed.
    """
    for path in _REQUIRED:
        if path in _MISSING:
            raise MoEReplayError(_message(path, _MISSING[path]))


#: ``HOOK_HANDLES.next_id``: how many hook handles torch has made in this process (one per hook registered on any
#: module, tensor or globally), a stamp that moves whenever a hook is added anywhere (read as an attribute: no call)
HOOK_HANDLES = torch.utils.hooks.RemovableHandle
