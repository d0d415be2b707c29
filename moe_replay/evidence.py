"""Which call of a router's forward is its decision: established by effect, once per router.

A router's forward may make several calls that look like a decision: a ``topk`` taken for
logging, a ``max`` for a numerically stable softmax, a group ``topk`` before the expert
``topk``, two ``topk(k=1)`` calls that together choose two experts. Their signatures do not
say which one chooses the experts; their effect does. So, the first time a router's forward
runs eagerly under a session (in any state), moe_replay runs that forward a few more times
without gradients, with the same inputs, the same random state and the same buffers:

1. twice as it is, to record every decision-like call (``topk``, ``argmax``/``max`` over a
   dimension, ``sort``/``argsort``) and to measure the run-to-run noise of the output;
2. once per candidate call, with that call's *indices* changed (its values kept), to see
   whether the forward's output changes. A call whose indices never reach the output
   (logging, a stable-softmax ``max``, a dispatch that only reads values) is not a decision;
3. the decision is the last call that matters over the expert width: the one that fixes
   the final choice. An earlier call over the same width is part of the decision too
   (successive top-1 slots) when changing it still changes the output while the later
   calls are held at their own choice; otherwise it only shaped the scores (a group
   selection) and runs natively.

k is the number of indices the decision calls produce together, E the width they choose
from; attribute names and weight shapes found by discovery are hints that narrow the
search, never a substitute for it. Where no call matters, or the evidence contradicts what
the user declared, the router is refused with the calls that were seen. The model is left
as it was: random state, buffers and the files a run writes are put back after every probe run, and the real
forward then runs once, exactly as it would have.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import dataclasses
import functools
import heapq
import itertools
import math
import numbers
import operator
import os
import queue
import random
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _torch_compat
from ._axes import ELEMENTWISE
from ._checks import frozen_value
from ._code_settings import (
    CONTAINERS,
    Home,
    OutsideState,
    container_contents,
    hook_written,
    is_generator,
    is_generator_anywhere,
    is_host_stream,
    is_written,
    named_places,
    refill_container,
)
from ._code_settings import generators as code_generators
from ._code_settings import written as code_written
from ._faults import (
    FORWARDS_OWN,
    forwards_call,
    inside_forward,
    note_fault,
    raised_by_library,
    raised_inside,
    run_begins,
    run_ends,
)
from ._files import files_as_they_were, reachable_files, writable_file
from ._quiet import unheard
from ._torch_compat import NO_TORCH_FUNCTION
from .errors import MoEReplayError, UnsupportedRouterError

__all__ = [
    "Call",
    "Evidence",
    "VerifyReport",
    "decision_call",
    "establish",
    "faults_refused",
    "left_as_it_was",
    "makes_its_calls",
    "run_unestablished",
    "still_decides",
    "through_out",
    "unwrap",
]

_FAMILY: dict[Any, str] = {
    torch.topk: "topk",
    torch.Tensor.topk: "topk",
    torch.argmax: "argmax",
    torch.Tensor.argmax: "argmax",
    torch.max: "max",
    torch.Tensor.max: "max",
    torch.sort: "sort",
    torch.Tensor.sort: "sort",
    torch.argsort: "argsort",
    torch.Tensor.argsort: "argsort",
    torch.argmin: "argmin",
    torch.Tensor.argmin: "argmin",
    torch.min: "min",
    torch.Tensor.min: "min",
    torch.kthvalue: "kthvalue",
    torch.Tensor.kthvalue: "kthvalue",
}
#: A one-hot drawn with Gumbel noise inside one call (its argmax is out of sight): named in refusals.
_GUMBEL = torch.nn.functional.gumbel_softmax
#: Elementwise calls (along the decision's own entries): where one takes a later choice's integers or booleans and the
#: decision's results, that choice cuts the decision (see ``_ProbeMode._cut_follow``); not those that take a shape.
_ALONG: frozenset[Any] = frozenset()  # (set below, once _SHAPE_ONLY is)
#: Families whose indices the replay can answer with forced experts.
FORCEABLE = frozenset({"topk", "argmax", "max", "argmin", "min"})
#: The torch functions whose calls may be a decision.
DECISION_FUNCS = frozenset(_FAMILY)

#: The lean wrappers of torch's functions, each to the function it wraps (filled by moe_replay._lean).
#: Traced code may hand a mode the wrapper itself (dynamo calls what ``torch.topk`` names); modes
#: read it as the function it wraps.
UNWRAP: dict[Any, Any] = {}

#: torch's operators of the decision-like and masking functions by their aten names, each overload whose call
#: reads as the function's (``torch.ops.aten.topk``, ``torch.ops.aten.topk.default``, ``torch.ops.aten.max.dim``...)
#: to that function: a router that calls the operator makes the same choice, and is read (and answered) as
#: one that calls the function. The overloads that write into given tensors (``.out``, ``.values``) are not.
_ATEN_OVERLOADS = {
    "topk": ("default",),
    "argmax": ("default",),
    "argmin": ("default",),
    "max": ("default", "dim", "other"),
    "min": ("default", "dim", "other"),
    "sort": ("default", "stable"),
    "argsort": ("default", "stable"),
    "kthvalue": ("default",),
    "masked_fill": ("Scalar", "Tensor"),
    "where": ("default", "self", "ScalarOther", "ScalarSelf", "Scalar"),
}
_ATEN: dict[Any, Any] = {}
for _name, _overloads in _ATEN_OVERLOADS.items():
    _packet = getattr(torch.ops.aten, _name)
    _ATEN[_packet] = getattr(torch, _name)
    _ATEN.update({getattr(_packet, o): getattr(torch, _name) for o in _overloads if o in _packet.overloads()})
UNWRAP.update(_ATEN)
#: Keywords of an aten operator that torch's function does not take (its ``self``, the tensors an ``out``
#: overload writes into): a call with them is run as it is, not read as the function's.
_ATEN_ONLY_KEYWORDS = frozenset({"self", "out", "values", "indices", "max", "max_values", "min", "min_indices"})


def unwrap(func: Any, kwargs: Mapping[str, Any] | None) -> Any:
    """The torch function a call of ``func`` is read as: what a lean wrapper or an aten operator stands for."""
    found = UNWRAP.get(func)
    if found is None or (kwargs and func in _ATEN and not _ATEN_ONLY_KEYWORDS.isdisjoint(kwargs)):
        return func
    return found


class _Nesting(threading.local):
    """What runs in this thread: how deep in router scopes, and which lean router (if any) gets calls."""

    depth = 0  # scope forwards running in this thread (eager): a mode sees only its own scope's calls
    lean: Any = None  # the router hook whose lean forward runs innermost now (see moe_replay._lean)
    auditing = False  # a forward is checking that its calls come through the lean wrappers
    via: Any = None  # the original torch function a lean wrapper is calling right now
    probing = 0  # probe runs in progress in this thread: routers nested in a probed scope run plainly
    #: a decision is being established (or checked) in this thread: between its probe runs, the calls are its own
    #: reading of them (comparisons, copies, inputs of its own making), no forward's: the orphan watch lets them by
    establishing = 0


NESTING = _Nesting()

_MASKS = frozenset({torch.masked_fill, torch.Tensor.masked_fill, torch.where, torch.Tensor.where})
#: ``masked_fill`` as imported: torch's own function, read once (inside a forward ``torch.masked_fill`` may be a lean
#: wrapper, see moe_replay._lean, and the mode is handed torch's own)
_MASKED_FILLS = (torch.masked_fill, torch.Tensor.masked_fill)
#: Families whose result carries values beside the indices.
_VALUED = frozenset({"topk", "max", "min", "sort", "kthvalue"})
#: Maxima by value alone: natively the value of the best expert, where taken along the experts (see _ProbeMode.peaks);
#: torch's operator too (``torch.ops.aten.amax(probs, [-1])``), which is the same maximum.
_PEAKS = frozenset({torch.amax, torch.Tensor.amax, torch.ops.aten.amax, torch.ops.aten.amax.default})


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def decision_call(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """``(family, k, width)`` when this torch call chooses indices along the last dimension.

    ``k`` is the number of indices per row it returns (1 for ``argmax``/``max``, the width for a
    ``sort``); ``width`` the size of the dimension chosen from. Calls along another dimension,
    a ``max`` of two tensors and a ``max``/``argmax`` over all elements are not decisions.
    """
    family = _FAMILY.get(func)
    if family is None:
        return None
    x = _arg(args, kwargs, 0, "input")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.dtype == torch.bool:
        return None  # a router scores [tokens, E] (or [..., tokens, E]); 1-D calls sort tokens
    width = int(x.shape[-1])
    if family == "topk":
        k, dim = _arg(args, kwargs, 1, "k"), _arg(args, kwargs, 2, "dim", -1)
    elif family in ("argmax", "max", "argmin", "min"):
        k, dim = 1, _arg(args, kwargs, 1, "dim")
    elif family == "kthvalue":
        k, dim = 1, _arg(args, kwargs, 2, "dim", -1)
    else:
        k, dim = width, _arg(args, kwargs, 1, "dim", -1)
    if type(k) is not int or type(dim) is not int:  # the common case is plain ints: no ABC checks
        k, dim = _count(k), _count(dim)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or isinstance(dim, bool):
            return None
        if not isinstance(dim, numbers.Integral):
            return None
        k, dim = int(k), int(dim)
    if dim not in (-1, x.dim() - 1) or width < 2:
        return None
    return family, k, width


#: What :func:`through_out` returns for a call that gives no ``out=`` tensors (answered as it is).
NO_OUT: Any = object()


def through_out(
    func: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    answer: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any],
) -> Any:
    """A decision-like call that writes into tensors given as ``out=`` (``torch.topk(s, k, out=(values, indices))``):
    answered without them, by ``answer(func, args, kwargs)`` as any such call is (natively, forced, or moved by a
    probe run), then that answer written into them as torch writes its own (resized where their shape differs),
    and what torch returns for it returned. So the indices the router reads from its ``out=`` tensor are the very
    ones recorded or forced. :data:`NO_OUT` for a call without ``out=``, or one torch refuses as it is (with
    gradients, or ``out=`` tensors of another dtype): its own error is raised when it runs."""
    out = kwargs.get("out")
    if out is None or func not in DECISION_FUNCS:
        return NO_OUT
    targets = tuple(out) if isinstance(out, tuple | list) else (out,)
    if not all(isinstance(t, torch.Tensor) for t in targets) or (
        torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in _leaves((args, kwargs), []))
    ):
        return NO_OUT
    result = answer(func, args, {k: v for k, v in kwargs.items() if k != "out"})
    made = tuple(result) if isinstance(result, tuple) else (result,)
    if len(made) != len(targets) or any(t.dtype != m.dtype for t, m in zip(targets, made, strict=False)):
        _native(func, args, kwargs)  # (torch's own error, as the call makes it)
        raise UnsupportedRouterError(
            f"a {getattr(func, '__name__', func)} call writes into out= tensors moe_replay cannot fill with its answer "
            "(another number or dtype of tensors than it returns); call it without out="
        )
    with torch.no_grad():
        for t, m in zip(targets, made, strict=True):
            if t.shape != m.shape:
                t.resize_(m.shape)
            t.copy_(m)
    if not isinstance(result, tuple):
        return targets[0]
    kind = getattr(torch.return_types, f"{type(result).__name__}_out", None)
    return kind(targets) if kind is not None else type(result)(targets)


def _count(v: Any) -> Any:
    """``v`` as an ``int`` where it is a one-element integer tensor (``torch.topk(s, torch.tensor(2))``, a ``k``
    kept in a buffer), which torch reads as that number; else ``v`` itself (also while compiling: no host read)."""
    if (
        isinstance(v, torch.Tensor)
        and not torch.compiler.is_compiling()
        and v.numel() == 1
        and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)
    ):
        return int(v.item())
    return v


@frozen_value("it records a call seen as a decision was established; it changes nothing if edited")
@dataclass(frozen=True)
class Call:
    """One decision-like call seen in a router's forward.

    Attributes:
        ordinal: its position among the decision-like calls of that forward (0-based).
        family: ``topk``, ``argmax``, ``max``, ``sort`` or ``argsort``.
        k: indices per row it returns.
        width: size of the dimension it chooses from.
        rows: rows (tokens) it chose for in the forward it was seen in.
        where: ``file:line`` of the model code that made it.
        effect: whether changing its indices changed the forward's output (None: not probed).
        site: the code object of the model code that made it and the offset of the call in it (None: not known),
            from which the settings its code reads only to compute what it is handed are told apart (see
            :func:`moe_replay._code_settings.only_into_calls`); not compared.
    """

    ordinal: int
    family: str
    k: int
    width: int
    rows: int
    where: str
    effect: bool | None = None
    site: tuple[types.CodeType, int] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def signature(self) -> tuple[str, int, int]:
        return self.family, self.k, self.width

    def describe(self) -> str:
        """``#1 topk(k=2) over 8 at model.py:42``."""
        k = f"k={self.k}" if self.family == "topk" else ""
        return f"#{self.ordinal} {self.family}({k}) over {self.width} at {self.where}"


@frozen_value(
    "it records how a decision was established; to choose the call that decides, give the router an "
    "mr.Adapter(..., call=n) or decision= and attach again"
)
@dataclass(frozen=True)
class Evidence:
    """How a router's decision was established.

    Attributes:
        calls: every decision-like call of its forward, in call order, with its effect.
        decision: ordinals of the calls that make the decision, in slot order.
        top_k: experts chosen per token (the decision calls' indices together).
        num_experts: the width the decision chooses from.
        training: the module's ``training`` flag when it was established.
        reason: one sentence saying why these calls decide.
        mirrors: later calls that choose again from the decision's own scores and find its experts
            (Switch's ``max`` of the probabilities after their ``argmax``): a replay answers them with
            the forced experts too, so that the weight they read is the forced expert's.
        followers: later calls that find the decision's experts again in scores it made (an ``argmax`` of the
            one-hot of its choice, straight-through routing): checked as later choices (with the decision held,
            they read nothing else), then answered as mirrors in a replay.
        squashed: the decision's scores were made through an elementwise squashing (a ``sigmoid``) after the
            matrix product that makes the logits (a sigmoid router's, DeepSeek-V3 style), as the calls of its
            forward show; None where not traced. Their softmax is not the router's probabilities.
        chunks: the decision's calls each make the whole choice for their own run of the tokens, in call order,
            together every token once (routing in chunks of tokens, proven by effect): each records and is forced
            with its own rows, one after the other.
        chunk_dims: the dimensions of the hidden states the chunks were proven on (0 where not in chunks): a forward
            of as many calls on hidden states of as many dimensions makes its chunks as that one did; others are
            proven again.
        hooks_aside: it was established with the user's forward hooks of the scope's submodules (torch's own aside)
            set aside (see :data:`HOOKS_NEEDED`): they were shown to change nothing on the forward that established
            it alone, so each later forward checks that they hand on what they are given (see
            :mod:`moe_replay._inner_hooks`).
        axis: ``(dim, ndim, width)`` where the forward chooses along another dimension than the last (a top-k along
            the expert channels of ``[batch, E, H, W]`` scores, one choice per pixel): its decision-like calls along
            ``dim`` of ``ndim``-dimensional scores ``width`` wide are read, recorded and forced as the same calls on
            the scores with that dimension moved last (see :class:`MovedAxis`); None for a choice along the last.
    """

    calls: tuple[Call, ...]
    decision: tuple[int, ...]
    top_k: int
    num_experts: int
    training: bool
    reason: str
    mirrors: tuple[int, ...] = ()
    followers: tuple[int, ...] = ()
    squashed: bool | None = None
    chunks: bool = False
    chunk_dims: int = 0
    hooks_aside: bool = False
    axis: tuple[int, int, int] | None = None

    @property
    def count(self) -> int:
        """Decision-like calls per forward."""
        return len(self.calls)

    @property
    def twins(self) -> tuple[int, ...]:
        """Ordinals of the calls that could decide in another forward, beside the decision and its mirrors: a forward
        whose branch moves dispatch to one of them makes the very same calls, so only their effect tells which one
        decides (see :func:`still_decides`). They are the calls over a decision call's width (the experts), whatever
        their family or k (a top-1 warm-up that dispatches by ``argmax`` beside a ``topk(s, 1)``); and the calls over
        another width that choose one row per token as the decision does, whose indices did not reach the output
        when it was established (a top-k over a subset of the experts, or over the experts and a null column, that
        dispatches on some inputs). A call over another width whose indices reach the output through the decision's
        scores (the group top-k of group-limited routing) shapes them, and one over other rows (the top-2 inside
        each group) chooses for no token: neither is one."""
        widths = {self.calls[i].signature[2] for i in self.decision}
        rows = {self.calls[i].rows for i in self.decision}
        return tuple(
            c.ordinal
            for c in self.calls
            if (c.signature[2] in widths or (c.rows in rows and c.effect is not True))
            and c.ordinal not in self.decision
            and c.ordinal not in self.mirrors
            and c.ordinal not in self.followers
        )

    def describe(self) -> str:
        """A few lines for ``verify()`` and error messages."""
        lines = [f"decides with {' + '.join(self.calls[i].describe() for i in self.decision)}: {self.reason}"]
        if self.axis is not None:
            dim, ndim, width = self.axis
            lines.append(
                f"  reads its choice along dim {dim} of {ndim}-dimensional scores ({width} experts), moved last: "
                "one row per position of the other dimensions"
            )
        for c in self.calls:
            if c.ordinal in self.mirrors:
                lines.append(f"  answers {c.describe()} with the same experts (it finds the decision's again)")
            elif c.ordinal in self.followers:
                lines.append(f"  answers {c.describe()} with the same experts (it reads the decision back)")
            elif c.ordinal not in self.decision:
                why = (
                    "not of the family the Adapter names"
                    if c.effect is None
                    else "shapes the scores only"
                    if c.effect
                    else "its indices do not reach the output"
                )
                lines.append(f"  ignores {c.describe()} ({why})")
        return "\n".join(lines)


class VerifyReport(dict[str, int]):
    """What :meth:`Session.verify` returns: per router, how many times it ran in the forward.

    ``evidence`` holds, per router, the :class:`Evidence` of its decision; ``idle``, the
    routers that ran but chose for no token (a modality this input lacks), whose decision is
    not established by this forward; ``str(report)`` is a readable account of which call
    decides in every router and why.
    """

    def __init__(self, calls: Mapping[str, int], evidence: Mapping[str, Evidence], idle: Sequence[str] = ()) -> None:
        super().__init__(calls)
        self.evidence: dict[str, Evidence] = dict(evidence)
        self.idle: tuple[str, ...] = tuple(idle)

    def __str__(self) -> str:
        head = f"verified {len(self) - len(self.idle)} routers"
        lines = [head + (f", {len(self.idle)} idle:" if self.idle else ":")]
        for name, n in self.items():
            ev = self.evidence.get(name)
            if ev is not None:
                how = ev.describe().replace("\n", "\n    ")
            elif name in self.idle:
                how = "chose for no token: not established (verify on an input that reaches it)"
            else:
                how = "hash table lookup (declared)"
            k = f"k={ev.top_k} of {ev.num_experts}, " if ev is not None else ""
            lines.append(f"  {name}: {k}ran {n}x, {how}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / notebooks
        printer.text(str(self))


# ----------------------------------------------------------------------------- probe runs
_MACHINERY = ("evidence.py", "intercept.py", "orphans.py", "session.py", "_lean.py")


def _model_frame(f: types.FrameType | None) -> tuple[types.FrameType, str] | None:
    """The innermost frame of model code (outside torch and this interception) from ``f`` outwards, with its file's
    name as :func:`_model_file` gives it, or None."""
    while f is not None:
        name = f.f_code.co_filename
        model = _MODEL_FILES.get(name, _UNREAD)
        if model is _UNREAD:
            model = _model_file(name)
        if isinstance(model, str):
            return f, model
        f = f.f_back
    return None


def _where() -> str:
    """``file:line`` of the innermost frame of model code (outside torch and this interception)."""
    found = _model_frame(sys._getframe(2))
    return "?" if found is None else f"{found[1]}:{found[0].f_lineno}"


def _site() -> tuple[types.CodeType, int] | None:
    """The code object of the innermost frame of model code (as :func:`_where` finds it) and the offset of the
    instruction it runs (the call being made), or None."""
    found = _model_frame(sys._getframe(2))
    return None if found is None else (found[0].f_code, found[0].f_lasti)


def _model_file(name: str) -> str | None:
    """The base name of code file ``name`` where it is model code (outside torch and this interception), else None.
    Kept for an absolute name, which reads the same from any working directory (at most :data:`_MODEL_FILES_KEPT`)."""
    here = os.path.dirname(os.path.abspath(__file__))
    own = {os.path.join(here, machinery) for machinery in _MACHINERY}
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    path = os.path.abspath(name)
    model = None if path in own or path.startswith(torch_dir) else os.path.basename(path)
    if os.path.isabs(name):
        if len(_MODEL_FILES) >= _MODEL_FILES_KEPT:
            _MODEL_FILES.clear()
        _MODEL_FILES[name] = model
    return model


#: :func:`_model_file` of each absolute code file name :func:`_where` has passed (read once per file).
_MODEL_FILES: dict[str, str | None] = {}
_UNREAD = object()
_MODEL_FILES_KEPT = 4096


def _changed(family: str, out: Any, width: int) -> Any:
    """``out`` with its indices moved to other experts and its values kept."""
    if family in ("argmax", "argmin"):
        return (out + 1) % width
    if family == "argsort":
        return out.roll(1, dims=-1)
    values, idx = out[0], out[1]
    idx = idx.roll(1, dims=-1) if family == "sort" else (idx + 1) % width
    return type(out)((values, idx))


def _changed_slot(out: Any, slot: int, width: int) -> Any:
    """A ``topk`` result with only slot ``slot`` moved to an expert the row does not hold; in a row that holds
    every expert (a top-k of all of them, sliced after), swapped with the last slot (the last with the one before):
    a slot the forward drops still changes nothing, and a top-E sliced to its first k is found to choose k."""
    values, idx = out[0], out[1]
    taken = torch.zeros(*idx.shape[:-1], width, dtype=torch.bool, device=idx.device).scatter(-1, idx, True)
    free = (~taken).to(torch.int8).argmax(-1)
    moved = idx.clone()
    moved[..., slot] = free
    last = idx.shape[-1] - 1
    if last > 0:  # a row that holds every expert (a top-k of all of them) has none free: the slot swaps with another
        partner = last if slot != last else last - 1
        swapped = idx.clone()
        swapped[..., slot], swapped[..., partner] = idx[..., partner], idx[..., slot]
        moved = torch.where(taken.all(-1, keepdim=True), swapped, moved)
    return type(out)((values, moved))


#: In a floating dtype of a narrow range (float16: its exponential overflows past 11), a moved value is moved by
#: at most this much (see :func:`_changed_values`).
_NARROW_MOVE = 2.0
#: In a floating dtype of a wide range (float32, bfloat16, float64), a moved value is moved by at most this much: a
#: stable softmax's maximum moved further (another row's, on logits tens apart) would make the exponentials of
#: probabilities of 1e-5 underflow to 0, a change of the scores that no mask made. Moved by 16, an exponential is
#: scaled by e^16 at most, and only what was already under float32's smallest normal number falls to 0.
_WIDE_MOVE = 16.0


def _changed_values(out: Any) -> Any:
    """A ``(values, indices)`` result with its values moved (the best of a row and the k-th swap places, or
    rows take each other's values), its indices kept; ``out`` itself where neither is possible.

    Each value moves by at most :data:`_NARROW_MOVE` towards the one it takes in a dtype of a narrow range (float16),
    :data:`_WIDE_MOVE` in others: logits shifted by another row's maximum, or by a row's least, would make exponentials
    overflow to infinity or fall to subnormal numbers or 0, changes of the scores that no mask made."""
    values, idx = out[0], out[1]
    if values.dim() and values.shape[-1] > 1 and values.dim() == idx.dim():
        moved = values.flip(-1)
    elif values.dim() and values.shape[0] > 1:
        moved = values.roll(1, 0)
    else:
        return out
    if values.is_floating_point():
        most = _NARROW_MOVE if torch.finfo(values.dtype).max < 1e6 else _WIDE_MOVE
        finite = values.isfinite() & moved.isfinite()  # (a masked row's -inf is moved as it was)
        moved = torch.where(finite, values + (moved - values).clamp(-most, most), moved)
    return type(out)((moved, idx))


#: Elementwise squashings (by call name, in place or not): scores made through one after the logits are no logits
#: (see Evidence.squashed).
_SQUASHINGS = frozenset({"sigmoid", "tanh", "softplus", "relu", "elu", "gelu", "silu", "hardsigmoid", "hardtanh"})
#: The calls (by name) that make logits: a matrix product, where reading back stops.
_PRODUCTS = frozenset({"linear", "mm", "addmm", "matmul", "bmm", "baddbmm", "einsum", "rmatmul", "conv1d", "conv2d"})


def _floats(t: Any) -> bool:
    """Is ``t`` a tensor of floating values?"""
    if not isinstance(t, torch.Tensor):
        return False
    with _metadata_reads((t,)):
        return t.is_floating_point()


def _discrete_dtype(t: torch.Tensor) -> bool:
    """Does ``t`` hold integers or booleans (neither floating nor complex values)?"""
    with _metadata_reads((t,)):
        return not (t.is_floating_point() or t.is_complex())


#: torch's own tensor types: no ``__torch_function__`` of theirs answers a read of their metadata (a Parameter's is
#: disabled), so moe_replay reads it without handing it to the modes below (see :func:`_metadata_reads`).
_PLAIN_TENSORS = frozenset({torch.Tensor, nn.Parameter})


def _metadata_reads(ts: Iterable[Any]) -> contextlib.AbstractContextManager[Any]:
    """The context of moe_replay's own reads of the dtype or version counter of the tensors among ``ts`` inside a probe
    run: :data:`NO_TORCH_FUNCTION` where each is of torch's own types (the same values, not handed to the modes below,
    see _torch_compat), else none. A subclass's ``__torch_function__`` may answer for a tensor it holds (its version
    counter, its dtype): read with it disabled, a write into the held tensor would go unseen, and not be undone."""
    for t in ts:
        if type(t) not in _PLAIN_TENSORS and isinstance(t, torch.Tensor):
            return contextlib.nullcontext()
    return NO_TORCH_FUNCTION()


def _is_peak(t: torch.Tensor, peak: torch.Tensor, forced: torch.Tensor) -> bool:
    """Is ``t`` (one value per row) ``peak`` (the row maxima of some scores) and none of ``forced`` (those scores
    read at the forced experts, slot by slot: a forced weight that equals the maximum by a tie is no twin)?"""
    if t.dtype != peak.dtype or t.shape != peak.shape:
        return False
    t = t.to(peak.device)  # (scores on a device, a maximum of their host copy: one value per row either way)
    if not torch.equal(t, peak):
        return False
    return not any(torch.equal(t, f.to(peak.device)) for f in forced)


def _raised(out: Any, leaf: int) -> Any:
    """``out`` (a tensor, or a tuple of them) with its ``leaf``-th tensor raised by 1."""
    if isinstance(out, torch.Tensor):
        return out + 1
    items = list(out)
    items[leaf] = items[leaf] + 1
    if hasattr(type(out), "_fields"):  # (a named tuple of Python's)
        return type(out)(*items)
    return type(out)(items)


def _lifted_values(family: str, out: Any) -> Any:
    """A ``(values, indices)`` result with its values raised, slot ``j`` of a row by ``j + 1`` (a one-value call by 1):
    a shift or a scale that a softmax or a renormalisation cancels stays cancelled, while weights read from them
    change, renormalised too (their ratios move), however close the scores are."""
    values, idx = out[0], out[1]
    if family in ("topk", "sort") and values.dim():
        lift = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    else:
        lift = torch.ones((), device=values.device, dtype=values.dtype)
    return type(out)((values + lift, idx))


def _rounding(*dtypes: torch.dtype) -> tuple[float, float]:
    """The relative change that rounding alone can make to scores computed in the coarsest of ``dtypes`` (a few
    steps of a shift, an exponential, a sum and a division): 1% in float32 and wider, 16 units in the last place of
    a half-precision type (12.5% in bfloat16), where one rounding of a logit moves its exponential by a unit; and
    the magnitude under which they lose precision or underflow to 0 (the smallest normal number)."""
    floats = [torch.finfo(d) for d in dtypes if d.is_floating_point]
    return max(1e-2, 16 * max((f.eps for f in floats), default=0.0)), max((f.tiny for f in floats), default=0.0)


def _shift_or_scale(a: torch.Tensor, b: torch.Tensor, tol: float, tiny: float) -> torch.Tensor:
    """Per row of ``a`` and ``b`` (float64, rows of scores): is ``b`` the row ``a`` shifted (``a + c``) or scaled
    (``r * a``, ``r > 0``), rounding aside (``tol`` of each score, and ``tiny``, scaled as the row)? Equal
    infinities (scores masked alike) fit.

    The shift is fitted at the score nearest 0 (a stable softmax's maximum, less itself), where rounding moves it
    least; the scale at the largest score, a score ``s`` times smaller allowed ``1 + ln s`` times the rounding (an
    exponential turns a logit's rounding, which grows with its distance from the best, into a relative change).
    """
    alike, finite = (a == b) & ~a.isfinite(), a.isfinite() & b.isfinite()
    a0, b0 = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)

    def fits(fit: torch.Tensor, size: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
        return ((finite & ((b - fit).abs() <= tol * size + floor)) | alike).all(-1)

    j = (a0.abs() + b0.abs()).masked_fill(~finite, math.inf).argmin(-1, keepdim=True)
    c = b0.gather(-1, j) - a0.gather(-1, j)
    shifted = fits(a + c, torch.maximum(torch.maximum(a.abs(), b.abs()), c.abs().expand_as(a)), tiny)
    j = a0.abs().argmax(-1, keepdim=True)
    top, bj = a0.gather(-1, j), b0.gather(-1, j)
    r = torch.where(top != 0, bj / top.masked_fill(top == 0, 1.0), torch.zeros_like(top))
    depth = 1 + (top.abs() / a0.abs().clamp_min(torch.finfo(torch.float64).tiny)).log()
    scaled = (r > 0).squeeze(-1) & fits(r * a, depth * torch.maximum(a.abs() * r, b.abs()), tiny * r.clamp_min(1))
    return shifted | scaled


def _masks_some(before: torch.Tensor, after: torch.Tensor, *coarse: torch.dtype) -> bool:
    """Did some scores of a row change (beyond rounding) other than by a shift or a scale of the whole row (a mask
    that moved; before a softmax, it moves every probability of the row)? A row that is the other shifted or
    scaled (a rescaling by the row's best; a stable softmax's maximum moved, its probabilities changed by rounding
    alone, several percent in half precision) masks nothing. ``coarse``: the dtypes of what moved the scores (the
    earlier call's values), whose rounding counts too."""
    if before.shape != after.shape or before.dim() == 0:
        return False
    a, b = before.detach().flatten(0, -2) if before.dim() > 1 else before.detach()[None], after.detach()
    b = b.flatten(0, -2) if b.dim() > 1 else b[None]
    tol, tiny = _rounding(before.dtype, after.dtype, *coarse)
    a, b = a.double(), b.double()
    changed = (a - b).abs() > tol * torch.maximum(a.abs(), b.abs())  # (rounding is not a change)
    rows = changed.any(-1)
    if not bool(rows.any()):
        return False
    return bool((~_shift_or_scale(a[rows], b[rows], tol, tiny)).any())


class _ProbeMode(TorchFunctionMode):
    """Counts the decision-like calls of one forward; changes or holds some of them."""

    def __init__(
        self,
        change: int | None,
        hold: dict[int, Any],
        slot: int | None = None,
        values: int | None = None,
        force: dict[int, tuple[Any, int]] | None = None,
        choices: list[Any] | None = None,
        fill: float | None = None,
        early: list[Any] | None = None,
        scramble: int | None = None,
        peak: int | None = None,
        lift: bool = False,
        watch: tuple[int, torch.Tensor, torch.Tensor] | None = None,
        bump: tuple[int, int] | None = None,
        trace: bool = False,
    ) -> None:
        super().__init__()
        self.lift = (
            lift  # with ``values`` (or ``peak``): that call's values raised, slot j by j + 1 (see _lifted_values)
        )
        # the maxima along the last dimension taken by value alone (``amax``): each one's width, rows and the experts
        # where it is reached; ``peak`` (an ordinal among them): that one's values raised by 1
        self.peaks: list[tuple[int, int, torch.Tensor, str]] = []
        self.peak = peak
        # maxima over the experts taken out of every other check's sight (see _watched): with ``watch`` (a width and
        # the decision's native best expert per row), the calls of this scope whose results are the row maxima of
        # scores of that width that natively pick that expert, each as (ordinal, leaf, description); with ``bump``
        # (an ordinal and a leaf of its result), that leaf raised by 1
        self.watch, self.bump = watch, bump
        # with ``trace``: what made each floating result of this scope, by id: (when, the call's name, its tensor
        # inputs by id), read back from each decision-like call's scores as it is made (see :meth:`squashed`)
        self.trace: dict[int, tuple[int, str, tuple[int, ...]]] | None = {} if trace else None
        self.squashes: list[bool | None] = []  # per decision-like call, with ``trace``: its scores squashed
        self.ordinal = 0  # calls of this scope so far (counted where watch or bump is given)
        self.maxima: list[tuple[torch.Tensor, torch.Tensor]] = []  # per watched score tensor: row maxima, forced
        self._seen_scores: dict[int, weakref.ref[torch.Tensor]] = {}
        self._constant: list[bool] = []  # per watched score tensor: its row maximum the same in every row
        # what each tensor of a watched run was made of (see _lineage), by id
        self._lineages: dict[int, tuple[weakref.ref[torch.Tensor], frozenset[int]]] = {}
        #: results of decision-like calls and maxima seen by value, and views of them (a sort's values[:, :1]),
        #: which the checks of value twins judge: not judged again as hidden maxima
        self._judged: dict[int, weakref.ref[torch.Tensor]] = {}
        self.hidden: list[tuple[int, int, str]] = []
        self.change, self.hold, self.slot, self.values = change, hold, slot, values
        # values leaving torch (see _opaque): where, in this run; with ``scramble`` (a width), those of that width
        # are handed over with their last dimension rolled by one (their experts moved)
        self.escapes: list[str] = []
        self.scramble = scramble
        self._rolled: list[torch.Tensor] = []
        self.fill = fill  # with ``values``: that call's values all replaced by this number, not moved
        # ordinal -> (a result, the slots of it the decision uses): that call is answered as a replay would
        self.force = force or {}
        self.answered = 0  # forced calls answered so far in this run
        # after a forced call: the results of the later choices, in order (see _after), and where each was made;
        # ``held`` given, each is answered with its own result there
        self.choices: list[Any] = []
        self.where: list[str] = []
        self.held = choices
        self.unheld = False
        self.depth = NESTING.depth
        self.calls: list[Call] = []
        self.ins: list[torch.Tensor] = []  # each call's scores
        self.outs: list[Any] = []
        self.aside: list[str] = []  # choices along another dimension than the last (not decisions), described
        self.axes: list[tuple[int, int, int]] = []  # those of a forceable family: (dim, ndim, width) each
        self.flat: list[str] = []  # top-ks of flat score tensors (not decisions), described
        self.drawn: list[str] = []  # one-hots drawn inside one call (``gumbel_softmax(hard=True)``), described
        # random draws the forward makes (see _note_draw), described, each with whether the forced decision was
        # answered before it; and those whose results reached integers or booleans made by no decision-like call
        # (experts sampled: ``multinomial``, ``rand_like(p) < p``), described
        self.draws: list[tuple[str, bool]] = []
        self.sampled: list[str] = []
        self._random: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}  # what is made of a draw: which one
        self._keeps: set[int] = set()  # the draws (by place in draws) that keep values and choose none: dropout
        self.masked: list[torch.Tensor] = []
        self.unmasked: list[bool] = []  # per call: its input is a masked copy that was seen
        self.sources: list[tuple[torch.Tensor, torch.Tensor]] = []  # (masked copy, the scores it masks), forcing
        # what is read from the scores: before the decision, each floating result's tensor inputs (by id); from
        # the forced decision on, the tensors its scores, its values and what is made of them are (see _scored)
        self._made: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, ...]]] = {}
        self._scores: dict[int, weakref.ref[torch.Tensor]] = {}
        self.scored: list[bool] = []  # per later choice: made from the scores
        # per later choice: its integers or booleans (or what an elementwise call makes of them alone) meet the forced
        # decision's own results (its indices, its values, what elementwise calls and views make of them) in one
        # elementwise call: a cut of the decision by something else than the scores (a slot dropped for tokens of a
        # large hidden state), see _cut_follow
        self.cuts: list[bool] = []
        self._decided: dict[int, weakref.ref[torch.Tensor]] = {}
        self._cut_by: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        # per later choice: a cut of values that cannot be told from zero only, or one that only raises values to a
        # floor (see _Selection.faint, _Selection.floors): no choice among the experts
        self.faint: list[bool] = []
        self.widths: list[int] = []  # per later choice: the last dimension of what it made (0: fewer dimensions)
        # before a forced decision: the choices that make integers or booleans of floating values and are no
        # decision-like call (a number of experts per token from a threshold), as later choices are kept/held
        self.early: list[Any] = []
        self.early_where: list[str] = []
        self.early_held = early
        self.early_unheld = False
        # before a forced decision: what piecewise cuts (``relu``, ``clamp``) made, so that a comparison of it
        # with 0 is a threshold (``relu(scores - t) > 0``), not a test for zero
        self._cut: dict[int, weakref.ref[torch.Tensor]] = {}
        #: where given, told of each generator a call is handed, before it draws (see :meth:`_Snapshot.note_generator`)
        self.snapshot: _Snapshot | None = None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        try:
            return self._answer(func, types, args, kwargs)
        except UnsupportedRouterError:
            raise  # (a refusal made on purpose, see through_out)
        except Exception as e:  # (the forward's calls' own errors are marked by _native: theirs to see)
            _only_forwards(e)
            raise

    def _answer(self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
        """The answer to one torch call the forward makes (see :meth:`__torch_function__`)."""
        kwargs = kwargs or {}
        if func in UNWRAP:  # (a lean wrapper or an aten operator: what it stands for)
            func = unwrap(func, kwargs)
        generator = kwargs.get("generator")
        if generator is not None and self.snapshot is not None and is_generator_anywhere(generator):
            self.snapshot.note_generator(generator)
        _, collective, foreign = _operator(func)  # (read once per call: see _collective, _foreign)
        if collective:  # before it runs: a probe run on this rank alone never talks to the others
            raise _Communicates(getattr(func, "__name__", None) or str(func))
        if "out" in kwargs:  # (a decision-like call into out= tensors: answered as one without, then written there)
            written = through_out(func, args, kwargs, lambda f, a, k: self.__torch_function__(f, types, a, k))
            if written is not NO_OUT:
                return written
        answered = self.answered
        out = self._call(func, args, kwargs, foreign)
        if NESTING.depth == self.depth:
            self._note_draw(func, args, kwargs, out)
        if func in _PEAKS and NESTING.depth == self.depth:
            out = self._peaked(args, kwargs, out)
        if (self.watch is not None or self.bump is not None) and NESTING.depth == self.depth:
            out = self._watched(func, args, kwargs, out)
        if self.trace is not None and NESTING.depth == self.depth:
            ins = tuple(id(t) for t in _leaves((args, kwargs), []) if isinstance(t, torch.Tensor))
            named = getattr(func, "__name__", "").partition(".")[0].strip("_")  # (an aten operator: sigmoid.default)
            for t in _leaves(out, []):
                if _floats(t):
                    self.trace[id(t)] = (len(self.trace), named, ins)
        if not self.force or NESTING.depth != self.depth:  # (a call of a router nested inside: its own)
            return out
        # the tensors of the call's arguments, of those whose values it reads, and of its result: read once here
        given = _leaves(args, [], 1)  # (as _leaves((args, kwargs), []) reads them)
        if kwargs:
            _leaves(kwargs, given, 1)
        # the arguments whose values it reads: all of them, but the tensor whose shape alone an ``expand_as``/
        # ``view_as``/``reshape_as`` (or whose type alone a ``type_as``) takes: a mask of the chosen experts expanded
        # as the floating rows it will multiply is no choice made from those rows
        read = _leaves(args[:1], []) if getattr(func, "__name__", "") in _SHAPE_OF_OTHER else given
        made = _leaves(out, [])
        if not answered:  # before the decision: where each floating result came from, and earlier choices
            if self.answered == answered:
                ins = tuple(id(t) for t in given if isinstance(t, torch.Tensor))
                for t in made:
                    if _floats(t):
                        self._made[id(t)] = (weakref.ref(t), ins)
                ranks = func in DECISION_FUNCS and _ranks_one_row(args, kwargs) and _names_integers(out)
                chooses = func not in DECISION_FUNCS or ranks
                written = _chooses(func, args, kwargs, read, made) if chooses else None
                compared = None if func in DECISION_FUNCS else self._cut_compared(func, args, kwargs, made)
                written = compared if written is None else written
                if written is not None and (ranks or _discrete(out) or _steps(func, kwargs)):
                    n = len(self.early)
                    self.early.append(_clone(out))
                    self.early_where.append(_where())
                    if self.early_held is not None:
                        out, unheld = _hold(out, written, self.early_held[n] if n < len(self.early_held) else None)
                        self.early_unheld |= unheld
            return out
        scored = self._mark(func, read, made)
        if self.answered == answered:  # a call after the forced decision (not one of its slots)
            if func in _ALONG or func in _VIEWS:
                self._cut_follow(func, given, made)
            return self._after(func, args, kwargs, out, scored, read, made)
        return out

    def _note_draw(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note a draw from a random stream (see :data:`_SAMPLING`) and follow what is made of it through every
        call that reads its values: where integers or booleans are made of it by a call that is no decision-like
        one (``multinomial`` itself, ``rand_like(p) < p``, ``bernoulli(p).bool()``), the draw chose them, and that
        draw is noted in :attr:`sampled`. A decision-like call over drawn scores (noise on the logits, then a
        top-k) chooses by the scores as a replay forces them, and a test for zero tells an underflow from a weight:
        neither is a sampling. A dropout that draws is noted and followed too (its zeros may move the weights), but
        it keeps values and samples no choice."""
        full = getattr(func, "__name__", "")
        name = full.partition(".")[0].strip("_")  # (an aten operator: bernoulli.p)
        dropping = name in _DROPOUTS and _dropping(args, kwargs)
        if name in _SAMPLING or dropping:
            made = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
            origin = len(self.draws)
            if origin >= 8:
                return
            # (after the decision: once every call of it was answered, a draw between two of its calls is before)
            self.draws.append((f"{name} at {_where()}", bool(self.force) and self.answered >= len(self.force)))
            if dropping:  # (named where its zeros move the weights, but it keeps values: it samples no choice)
                self._keeps.add(origin)
            chooses = not dropping and (name in _DISCRETE_DRAWS or any(_discrete_dtype(t) for t in made))
        else:
            if not self._random or func in _SHAPE_ONLY:
                return
            origins = [
                got[1]
                for t in _leaves((args, kwargs), [])
                if isinstance(t, torch.Tensor) and (got := self._random.get(id(t))) is not None and got[0]() is t
            ]
            if not origins:
                return
            origin = min((o for o in origins if o not in self._keeps), default=min(origins))
            made = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor)]
            if func in DECISION_FUNCS:  # (its indices are a decision over drawn scores, forced as any: its values
                made = [t for t in made if not _discrete_dtype(t)]  # still carry the draw)
                chooses = False
            elif _tests_zero(full, args, kwargs, made):  # (an underflow told from a weight: no choice of its own)
                return
            else:
                chooses = any(_discrete_dtype(t) for t in made)
        for t in made:
            if len(self._random) < 65536:
                self._random[id(t)] = (weakref.ref(t), origin)
        drawn = self.draws[origin][0]
        if chooses and origin not in self._keeps and drawn not in self.sampled:
            self.sampled.append(drawn)

    def _cut_follow(self, func: Any, given: list[Any], made: list[Any]) -> None:
        """After the forced decision: follow its own results through elementwise calls and views (``w / w.sum()``,
        ``idx.masked_fill(...)``), and the integers or booleans of the later choices through elementwise calls that
        make integers or booleans of them alone (``large & (slot == 1)``); an elementwise call that takes both notes
        those choices as cuts of the decision (:attr:`cuts`). ``given``: the leaves of the call's arguments;
        ``made``: those of its result (see :func:`_leaves`)."""
        if func not in _ALONG and func not in _VIEWS:
            return
        decided = False  # (a weak reference's tensor is no other leaf: ``given`` is read as its tensors)
        for t in given:
            ref = self._decided.get(id(t))
            if ref is not None and ref() is t:
                decided = True
                break
        cuts: set[int] = set()
        if self._cut_by:
            for t in given:
                got = self._cut_by.get(id(t))
                if got is not None and got[0]() is t:
                    cuts.add(got[1])
        if decided and cuts and func in _ALONG:
            for n in cuts:
                self.cuts[n] = True
        if not decided and not cuts:
            return
        for t in made:
            if not isinstance(t, torch.Tensor):
                continue
            if decided:
                self._decided[id(t)] = weakref.ref(t)
            elif _discrete_dtype(t):  # (``cuts`` is not empty here)
                self._cut_by[id(t)] = (weakref.ref(t), min(cuts))

    def _peaked(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """Note a maximum along the last dimension by value alone (see :attr:`peaks`); ``out``, raised if asked."""
        x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim", ())
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if (
            not isinstance(x, torch.Tensor)
            or not isinstance(out, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() < 2
            or type(dim) is not int
            or dim not in (-1, x.dim() - 1)
            or x.shape[-1] < 2
        ):
            return out
        n = len(self.peaks)
        width = int(x.shape[-1])
        self.peaks.append((width, x.numel() // width, x.detach().argmax(-1).reshape(-1, 1), _where()))
        if self.peak == n:
            return out + 1
        return out

    def _watched(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """Note the scores of the watched width and the results that are their row maxima (see :attr:`hidden`), by
        value: a ``max`` along the tokens of a transposed view, a max-pool, an infinity norm, a ``cummax``'s last
        value take one without any decision-like call along the experts. ``out``, raised if asked."""
        n = self.ordinal
        self.ordinal += 1
        direct = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else []
        if self.bump is not None and n == self.bump[0]:
            return _raised(out, self.bump[1])
        if self.watch is None or len(self.hidden) >= 4:
            return out
        width, best, others = self.watch
        rows = best.numel()
        for t in _leaves((args, kwargs, out), []):
            if not _floats(t) or not t.dim() or t.shape[-1] != width or t.numel() != rows * width:
                continue
            known = self._seen_scores.get(id(t))
            if (known is not None and known() is t) or len(self.maxima) >= 16:
                continue
            self._seen_scores[id(t)] = weakref.ref(t)
            flat = t.detach().reshape(rows, width)
            peak = flat.amax(-1)
            if torch.equal(flat.argmax(-1), best.to(flat.device)):
                self._made_of(t, {len(self.maxima)})
                self.maxima.append((peak, flat.gather(-1, others.to(flat.device)).T))
                self._constant.append(bool((peak == peak[:1]).all()))  # (one row: one maximum, alike)
        decides = func in DECISION_FUNCS and decision_call(func, args, kwargs) is not None
        made = self._lineage(_leaves((args, kwargs), [])) | ({-1} if decides else set())
        for t in _leaves(out, []):
            self._made_of(t, made)
        if func in _PEAKS or decides:
            self._judge(direct)
            return out  # (seen by the checks of the calls and of the maxima by value alone)
        if getattr(func, "__name__", None) in _VIEWING and any(
            (r := self._judged.get(id(t))) is not None and r() is t
            for t in _leaves((args, kwargs), [])
            if isinstance(t, torch.Tensor)
        ):
            self._judge(direct)
            return out  # (a view or copy of one: its values as seen)
        # a maximum the same in every row (a stable softmax's exp(0)) is matched by a weight of 1 made from the
        # decision's values (a softmax over one, a renormalised sum) or by no score at all (``ones``): only a result
        # made from those scores and not from the decision is read from their maximum
        for j, t in enumerate(direct):
            if (
                _floats(t)
                and t.numel() == rows
                and any(
                    _is_peak(t.detach().reshape(-1), *peak) and (not constant or (m in made and -1 not in made))
                    for m, (peak, constant) in enumerate(zip(self.maxima, self._constant, strict=True))
                )
            ):
                self.hidden.append((n, j, f"{getattr(func, '__name__', func)}() at {_where()}"))
                break
        return out

    def _lineage(self, leaves: list[Any]) -> set[int]:
        """The watched score tensors (by their place in :attr:`maxima`; -1: a decision-like call's result) that
        the tensors among ``leaves`` were made from, in this run."""
        out: set[int] = set()
        for t in leaves:
            if isinstance(t, torch.Tensor) and (known := self._lineages.get(id(t))) is not None and known[0]() is t:
                out |= known[1]
        return out

    def _made_of(self, t: Any, lineage: set[int]) -> None:
        if isinstance(t, torch.Tensor) and lineage and len(self._lineages) < 65536:
            self._lineages[id(t)] = (weakref.ref(t), frozenset(lineage | self._lineage([t])))

    def _judge(self, results: list[Any]) -> None:
        for t in results:
            if isinstance(t, torch.Tensor) and len(self._judged) < 256:
                self._judged[id(t)] = weakref.ref(t)

    def squashed(self, x: torch.Tensor) -> bool | None:
        """Were the scores ``x`` made through an elementwise squashing after the matrix product of the logits (see
        :attr:`Evidence.squashed`)? Read back through what each result was made of; None where not traced."""
        if self.trace is None:
            return None
        todo: list[tuple[int, int]] = [(id(x), len(self.trace))]
        seen: set[int] = set()
        while todo and len(seen) < 4096:
            i, after = todo.pop()
            made = self.trace.get(i)
            if i in seen or made is None or made[0] >= after:  # (an id taken again by a later result: not it)
                continue
            seen.add(i)
            if made[1] in _SQUASHINGS:
                return True
            if made[1] not in _PRODUCTS:  # (the logits' product: no further back)
                todo.extend((j, made[0]) for j in made[2])
        return False

    def _cut_compared(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], made: list[Any]
    ) -> list[Any] | None:
        """Before the decision: note what a piecewise cut makes (``made``: the leaves of its result); a comparison of
        it with 0 is a choice (by the threshold the cut applied), answered as :func:`_chooses` answers one (``[]``: it
        wrote into nothing)."""
        name = getattr(func, "__name__", "").partition(".")[0].strip("_")  # (an aten operator: gt.Tensor)
        base = name[:-1] if name.endswith("_") else name
        if base in _CUT_NAMES and base not in _COMPARISONS:
            for t in made:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self._cut[id(t)] = weakref.ref(t)
            return None
        if base not in _COMPARISONS or base in _EQUALITIES:
            return None
        if not any(isinstance(a, numbers.Number) and a == 0 for a in (*args, *kwargs.values())):
            return None
        cut = any(isinstance(t, torch.Tensor) and (r := self._cut.get(id(t))) is not None and r() is t for t in args)
        return [] if cut else None

    def _is_scored(self, t: Any) -> bool:
        ref = self._scores.get(id(t))
        return ref is not None and ref() is t

    def _score(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            self._scores[id(t)] = weakref.ref(t)

    def _mark(self, func: Any, read: list[Any], made: list[Any]) -> bool:
        """After the decision: is this call read from the scores (``read``: the leaves of the arguments whose values
        it reads, see :meth:`_answer`)? Its results (``made``: the leaves of its result) are then too (not those of a
        call that takes only their shape, as ``zeros_like``: a mask of the chosen experts scattered into it is no
        score).

        Only floating values carry the scores' values into floating results: integers or booleans made from the
        scores (the rows of ``nonzero(gates)``, a mask) only place or pick other values, whose floating results
        (an expert's rows gathered by them, its hidden units and their ``relu``) are not the scores. Such integers
        are either fixed by the decision held (a test for zero, see :func:`_tests_zero`) or made by a later choice
        of their own, which is held and varied where it is made; they stay scored themselves, and so do the integers
        and booleans made of them."""
        if func in _SHAPE_ONLY or not self._scores:
            return False
        scores = self._scores
        valued = False  # (a floating or complex score read: its results all carry the scores' values)
        placed = False  # (an integer or boolean one only: its integer or boolean results are scored, no others)
        for t in read:
            ref = scores.get(id(t))
            if ref is not None and ref() is t and isinstance(t, torch.Tensor):
                if t.is_floating_point() or t.is_complex():
                    valued = True
                    break
                placed = True
        if not valued and not placed:
            return False
        for t in made:
            if valued or (isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())):
                self._score(t)
        return valued

    def _seed(self, x: torch.Tensor, out: Any) -> None:
        """The forced decision's scores (and the tensors of their width they were made of in this forward,
        back to its inputs) and the values it answers: what a later choice from the scores reads."""
        width = x.shape[-1] if x.dim() else 0
        todo = [x, self._unmasked(x)]
        while todo:
            t = todo.pop()
            if self._is_scored(t):
                continue
            self._score(t)
            made = self._made.get(id(t))
            if made is None or made[0]() is not t:
                continue
            for i in made[1]:
                parent = self._made.get(i)
                p = parent[0]() if parent is not None else None
                if p is not None and p.dim() and p.shape[-1] == width:
                    todo.append(p)
        # and those of its width made from them before the decision: probabilities beside the logits it chose
        # from (``softmax(logits)`` next to ``argmax(logits)``), which a capacity by probability reads after it
        grown = True
        while grown:
            grown = False
            for ref, ins in list(self._made.values()):
                kin = ref()
                if kin is None or self._is_scored(kin) or not kin.dim() or kin.shape[-1] != width:
                    continue
                if any((scored := self._scores.get(i)) is not None and scored() is not None for i in ins):
                    self._score(kin)
                    grown = True
        for t in _leaves(out, []):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self._score(t)

    def _note_aside(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Describe a top-k or arg-max of a score matrix along another dimension than the last, or a top-k of flat
        scores."""
        x = _arg(args, kwargs, 0, "input")
        family = _FAMILY.get(func)
        pos, default = (2, -1) if family in ("topk", "kthvalue") else (1, None)
        dim = _arg(args, kwargs, pos, "dim", default)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.is_floating_point() and isinstance(dim, int):
            if dim not in (-1, x.dim() - 1):
                if len(self.aside) < 4:
                    self.aside.append(f"{family} along dim {dim} of {tuple(x.shape)} at {_where()}")
                # (every one: a sort along it, or a call writing into out=, is no choice read moved last)
                forceable = family in FORCEABLE and -x.dim() <= dim < x.dim() and "out" not in kwargs
                d = dim % x.dim() if -x.dim() <= dim < x.dim() else -1
                self.axes.append((d if forceable else -1, x.dim(), int(x.shape[d]) if d >= 0 else 0))
        elif (
            isinstance(x, torch.Tensor)
            and x.dim() == 1
            and x.is_floating_point()
            and family == "topk"
            and len(self.flat) < 4
            and len(self.aside) < 4
        ):
            self.flat.append(f"topk over all {x.numel()} values of a flat tensor at {_where()}")

    def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], foreign: bool) -> Any:
        """The answer to a call of the forward (``foreign``: it is another library's operator, see :func:`_foreign`)."""
        if (func in _ESCAPES or foreign) and NESTING.depth == self.depth:
            return self._escape(func, args, kwargs)
        if func in _MASKS:
            out = _native(func, args, kwargs)
            if isinstance(out, torch.Tensor):
                self.masked.append(out)
                if self.force and (src := _mask_source(func, args, kwargs, out)) is not None:
                    self.sources.append((out, src))
            return out
        sig = decision_call(func, args, kwargs) if func in DECISION_FUNCS else None
        if func is _GUMBEL and _arg(args, kwargs, 2, "hard", False) and len(self.drawn) < 4:
            self.drawn.append(f"gumbel_softmax(hard=True) at {_where()}")
        if sig is None or NESTING.depth != self.depth:  # not a decision, or one of a router nested inside
            if sig is None and func in DECISION_FUNCS:
                self._note_aside(func, args, kwargs)
            return _native(func, args, kwargs)
        i = len(self.calls)
        x = _arg(args, kwargs, 0, "input")
        self.calls.append(Call(i, *sig, rows=x.numel() // sig[2], where=_where(), site=_site()))
        if self.trace is not None:
            self.squashes.append(self.squashed(x))
        self.ins.append(x)
        self.unmasked.append(any(m is x for m in self.masked))
        if i in self.hold:
            out = _clone(self.hold[i])  # (the forward may write into what it gets)
        elif i in self.force:
            out = _forced(sig[0], *self.force[i], self._unmasked(x), args, kwargs)
            self.answered += 1
            self._seed(x, out)
            for t in _leaves(out, []):
                if isinstance(t, torch.Tensor):
                    self._decided[id(t)] = weakref.ref(t)
        else:
            out = _native(func, args, kwargs)
            if i == self.change:
                out = _changed(sig[0], out, sig[2]) if self.slot is None else _changed_slot(out, self.slot, sig[2])
            elif i == self.values and sig[0] in _VALUED:
                if self.lift:
                    out = _lifted_values(sig[0], out)
                else:
                    out = (
                        _changed_values(out)
                        if self.fill is None
                        else type(out)((out[0].detach() * 0 + self.fill, out[1]))
                    )
        self.outs.append(_clone(out))  # as made: the forward may write into it later
        return out

    def _escape(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call that takes floating values out of torch's sight (see :data:`_ESCAPES`): noted, and with
        ``scramble``, made on copies of its inputs of that width with their experts moved."""
        out = _native(func, args, kwargs)
        floating = [t for t in _leaves((args, kwargs), []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not any(t.dim() and t.shape[-1] >= 2 for t in floating) or (func not in _ESCAPES and _floating(out)):
            return out  # (nothing of a width to choose from; an operator that makes values only chooses nothing)
        self.escapes.append(f"{getattr(func, '__name__', func)} at {_where()}")
        width = self.scramble
        if width is None or not any(t.dim() and t.shape[-1] == width for t in floating):
            return out

        def moved(t: Any) -> Any:  # (after the decision, only what is read from its scores: not counts of its experts)
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.dim()
                and t.shape[-1] == width
                and (not self.answered or self._is_scored(t))
            ):
                self._rolled.append(rolled := t.detach().roll(1, -1))
                return rolled
            return t

        return _native(func, tuple(moved(a) for a in args), {k: moved(v) for k, v in kwargs.items()})

    def _unmasked(self, x: torch.Tensor) -> torch.Tensor:
        """The scores ``x`` is a masked copy of (through any chain of masks), else ``x``: a replay reads there."""
        for out, src in self.sources:
            if out is x:
                return self._unmasked(src)
        return x

    def _after(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        scored: bool,
        read: list[Any],
        made: list[Any],
    ) -> Any:
        """A call after the forced decision: a *later choice* when it makes integers or booleans out of
        floating values (a comparison with a threshold, a ``topk``/``argmax``/``sort`` of weights, a
        rounding cast) or cuts them piecewise (``relu``, ``clamp``, ``threshold``...). Its result is kept,
        or answered with the one held for it. Tests for an exact zero or a non-finite value (``bool()``,
        ``nonzero``, ``isnan``, ``x > 0``...) are not choices: they tell an underflow from a weight. ``read`` and
        ``made``: the leaves of the arguments whose values it reads and of its result (see :func:`_chooses`)."""
        written = _chooses(func, args, kwargs, read, made)
        if written is None:
            return out
        held = self._choice(out, written, scored, None if written else _selection(func, args, kwargs, out))
        return out if held is out or written else _regathered(func, args, kwargs, held)

    def _choice(self, out: Any, written: list[torch.Tensor], scored: bool, selection: _Selection | None = None) -> Any:
        """Keep a later choice's result, or answer it with the one held for it (of the same structure only;
        :data:`_FRESH` held: made afresh); what the call wrote into (``out=``, in place) gets the held result too.
        A cut that selects (``selection``) is kept as where it cut and what it put there, and held by that place:
        its other places take this run's values (see :class:`_Selection`)."""
        n = len(self.choices)
        self.choices.append(selection.choice if selection is not None else _clone(out))
        self.where.append(_where())
        self.scored.append(scored)
        self.cuts.append(False)
        out = self._held_choice(n, out, written, selection)
        for t in _leaves(out, []):
            if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()):
                self._cut_by[id(t)] = (weakref.ref(t), n)
        return out

    def _held_choice(self, n: int, out: Any, written: list[torch.Tensor], selection: _Selection | None) -> Any:
        """Later choice ``n``'s result as this run answers it (see :meth:`_choice`)."""
        self.faint.append(selection is not None and (selection.faint() or selection.floors()))
        wide = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor) and t.dim() >= 2]
        self.widths.append(wide[0].shape[-1] if wide else 0)
        if self.held is None:
            return out
        held = self.held[n] if n < len(self.held) else None
        if held is _FRESH:
            return out
        if selection is not None:
            made = selection.held(held)
            if made is not None:
                return made
        out, unheld = _hold(out, written, held)
        self.unheld |= unheld  # the later choices differ in number or shape: they cannot be held
        return out


#: Views and selections of a tensor's own entries: what the decision's results are still, made into another shape.
_VIEWS = frozenset(
    getattr(torch.Tensor, name)
    for name in (
        "__getitem__ view reshape view_as reshape_as flatten unflatten squeeze unsqueeze expand expand_as t "
        "transpose permute narrow select unbind split chunk"
    ).split()
)
#: The names of torch's calls that draw from a random stream (functions, methods, in-place fills, aten operators),
#: followed by :meth:`_ProbeMode._note_draw`; not dropout, which keeps values rather than choosing among them.
_SAMPLING = frozenset(
    (
        "multinomial bernoulli rand rand_like randn randn_like randint randint_like randperm normal poisson uniform "
        "exponential geometric cauchy log_normal random gumbel_softmax"
    ).split()
)
#: The names of torch's dropouts: draws that keep or zero values (in training, ``p > 0``), named where the zeros they
#: make move the weights, never a sampling of experts (see :func:`_dropping`).
_DROPOUTS = frozenset(
    "dropout feature_dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d".split()
)


def _dropping(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Does a dropout called with ``args`` and ``kwargs`` draw (``p > 0`` in training: ``F.dropout(x, p, training)``,
    ``torch.dropout(x, p, train)``)?"""
    p = _arg(args, kwargs, 1, "p", 0.5)
    training = kwargs.get("train", _arg(args, kwargs, 2, "training", True))
    return bool(training) and isinstance(p, numbers.Number) and float(p) > 0  # type: ignore[arg-type]


#: Those of :data:`_SAMPLING` whose draws are choices themselves (indices, counts, 0/1 of a coin), whatever their dtype.
_DISCRETE_DRAWS = frozenset("multinomial bernoulli randint randint_like randperm random poisson geometric".split())
#: Calls whose results take only the shape, type and device of their tensor arguments, none of their values.
_SHAPE_ONLY = frozenset(
    {
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.Tensor.new_zeros,
        torch.Tensor.new_ones,
        torch.Tensor.new_empty,
        torch.Tensor.new_full,
    }
)
_ALONG = ELEMENTWISE - _SHAPE_ONLY
#: Methods that take only the shape (or the type and device) of their second tensor, none of its values.
_SHAPE_OF_OTHER = frozenset({"expand_as", "view_as", "reshape_as", "type_as"})


#: Calls that hand a tensor's values over to code outside torch (numpy, a Python list), where no mode sees what
#: is chosen from them; so are the operators of other libraries (``torch.ops.<library>``) that make integers.
_ESCAPES = frozenset({torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__})
#: Operator namespaces of torch's own, whose operators are read like torch's functions.
_OWN_OPS = frozenset({"aten", "prims"})


#: The namespaces of torch's operators that communicate across ranks (c10d's, and the functional collectives').
_COLLECTIVE_OPS = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"})


def _collective(func: Any) -> bool:
    """Is ``func`` a ``torch.distributed`` collective or point-to-point call, or one of their operators (an
    overload, or the packet of them that ``torch.ops.<namespace>.<name>`` is, as the functional collectives
    call it)?"""
    return _operator(func)[1]


class _Communicates(BaseException):
    """A probe run reached a call that communicates across ranks (named in ``args[0]``).

    A ``BaseException``, as :class:`_Overtime` is, so that no ``except Exception`` around a probe
    run takes it: :func:`establish` refuses the router with it.
    """


class _LibraryFault(BaseException):
    """An error raised by moe_replay's own code while it established or checked a decision (in the probe's mode,
    inside the user's forward, or in the code that reads its runs), chained from that error.

    A ``BaseException``, as :class:`_Communicates` is, so that no ``except Exception`` (the forward's own code's, or
    the probe's around a run that may fail on other inputs) takes it for the forward's error and goes on without the
    check: :func:`establish` and :func:`faults_refused` refuse the router with it.
    """


#: The attribute that marks an exception as the forward's own: raised by its code, or by a torch call it made, as
#: opposed to moe_replay's code running inside it or around its runs (see :func:`_only_forwards`).
_FORWARDS_OWN = FORWARDS_OWN


def _mark_forwards(e: BaseException) -> None:
    """Mark ``e`` as raised by the forward (see :data:`_FORWARDS_OWN`)."""
    with contextlib.suppress(AttributeError, TypeError):  # (an exception class that takes no attribute: unmarked)
        setattr(e, _FORWARDS_OWN, True)


def _forwards_own(e: BaseException) -> bool:
    """Was ``e`` raised by the forward's code or a torch call it made (not by moe_replay's own)?"""
    return getattr(e, _FORWARDS_OWN, False) is True


def _native(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``func(*args, **kwargs)``, a call the forward made, answered natively: what it raises is the forward's own, but
    an error of moe_replay's code that the call entered in turn (a checkpoint's recompute of a nested router in a
    backward run: see ``_faults.raised_inside``)."""
    try:
        return func(*args, **kwargs)
    except Exception as e:
        if not raised_inside(e):
            _mark_forwards(e)
        raise


def _only_forwards(e: Exception) -> None:
    """Let a probe go on past ``e`` only where the forward raised it (a forward tied to its number of tokens, or to its
    inputs' values); an error of moe_replay's own code is raised again as a :class:`_LibraryFault`, so that no check
    is passed over for it. A refusal of moe_replay's code made on purpose is raised as it is."""
    if _forwards_own(e):
        return
    if isinstance(e, MoEReplayError):
        raise e
    raise _library_fault(e) from e


def _refuse_noted(fault: Exception | None, raised: BaseException | None) -> None:
    """Raise ``fault``, an error of moe_replay's code that left one of its entries inside a run of the forward
    (``_faults.run_ends``), unless it is ``raised``, what the run itself raised (told apart by its caller): the
    forward's code caught it and went on, so the run was another forward than the router's. A refusal made on purpose
    is raised as it is; any other error as a :class:`_LibraryFault`, which refuses the router by name."""
    if fault is None or fault is raised:
        return
    if isinstance(fault, MoEReplayError):
        raise fault
    raise _library_fault(fault) from fault


def _library_fault(e: Exception) -> _LibraryFault:
    """A :class:`_LibraryFault` for ``e``, an error of moe_replay's own code, chained from it."""
    fault = _LibraryFault(f"{type(e).__name__}: {e}")
    fault.__cause__ = e
    return fault


def _named_refusal(name: str, refusal: UnsupportedRouterError) -> UnsupportedRouterError:
    """``refusal``, made on purpose by moe_replay's code inside a run of router ``name``'s forward (which knows the
    call, not the router), naming the router it refuses."""
    return UnsupportedRouterError(
        f"router '{name}': {refusal}. The model was left as it was; nothing was recorded or forced"
    )


def _fault_refusal(name: str, fault: _LibraryFault) -> UnsupportedRouterError:
    """The refusal of router ``name`` whose decision could not be established or checked for ``fault``."""
    cause = fault.__cause__ if fault.__cause__ is not None else fault
    err = UnsupportedRouterError(
        f"router '{name}': moe_replay could not make its check of this router's decision, because moe_replay's own "
        f"code raised while checking it ({fault.args[0] if fault.args else type(cause).__name__}). This is a fault "
        "of moe_replay, not of the model: please report it with this traceback. The model was left as it was; "
        "nothing was recorded or forced"
    )
    err.__cause__ = cause
    return err


@contextlib.contextmanager
def faults_refused(name: str) -> Iterator[None]:
    """Within it, an error of moe_replay's own code while establishing or checking router ``name``'s decision (a
    :class:`_LibraryFault`) is raised as the :class:`~moe_replay.UnsupportedRouterError` that refuses the router."""
    try:
        yield
    except _LibraryFault as fault:
        raise _fault_refusal(name, fault) from fault.__cause__


def _namespace(func: Any) -> str | None:
    """The namespace of an operator (``torch.ops.<namespace>.<name>``, or an overload of it), else None. Asked of
    every call of every probe run: read once per function (see :data:`_NAMESPACES`)."""
    return _operator(func)[0]


def _operator(func: Any) -> tuple[str | None, bool, bool]:
    """``(namespace, collective, foreign)`` of ``func``: its :func:`_namespace`, whether it is a collective (see
    :func:`_collective`) and whether another library's operator (see :func:`_foreign`), read once per function."""
    known = _NAMESPACES.get(id(func))
    if known is not None and known[0] is func:
        return known[1]
    namespace = _read_namespace(func)
    collective = getattr(func, "__module__", None) == "torch.distributed.distributed_c10d"
    traits = (
        namespace,
        collective or namespace in _COLLECTIVE_OPS,
        namespace is not None and namespace not in _OWN_OPS,
    )
    if len(_NAMESPACES) >= _NAMESPACES_KEPT:
        _NAMESPACES.clear()
    _NAMESPACES[id(func)] = (func, traits)
    return traits


#: The :func:`_operator` traits of each function it was asked of (a namespace of None: no operator's), by its id, the
#: function held beside it (so that its id is no other's), at most :data:`_NAMESPACES_KEPT` of them (then read
#: afresh): torch's functions and operators, and a model's own. (No ``==`` nor hash of the model's objects runs.)
_NAMESPACES: dict[int, tuple[Any, tuple[str | None, bool, bool]]] = {}
_NAMESPACES_KEPT = 4096


def _read_namespace(func: Any) -> str | None:
    namespace = getattr(func, "namespace", None)
    if namespace is None and callable(overloads := getattr(func, "overloads", None)):  # a packet: its overloads'
        try:
            names = overloads()
        except Exception:  # (not an operator after all)
            return None
        namespace = getattr(getattr(func, names[0], None), "namespace", None) if names else None
    return namespace if isinstance(namespace, str) else None


def _foreign(func: Any) -> bool:
    """Is ``func`` an operator registered by another library (``torch.ops.mylib.route``, or an overload of it)?"""
    return _operator(func)[2]


def _floating(result: Any) -> bool:
    """Does a call's result hold floating tensors only (no integers, no booleans)?"""
    ts = [t for t in _leaves(result, []) if isinstance(t, torch.Tensor)]
    return all(t.is_floating_point() or t.is_complex() for t in ts)


def _chooses(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], read: list[Any], made: list[Any]
) -> list[torch.Tensor] | None:
    """Is this call a choice (see :meth:`_ProbeMode._after`)? The tensors it wrote into (``out=``, in place) if so.
    ``read``: the leaves of the arguments whose values it reads (see :meth:`_ProbeMode._answer`);
    ``made``: those of its result (see :func:`_leaves`)."""
    with _metadata_reads(read):  # (reads of metadata alone: not handed to the modes below, see _torch_compat)
        for t in read:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                break
        else:
            return None
    name = getattr(func, "__name__", "").partition(".")[0]  # (an aten operator: gt.Tensor)
    if name.startswith("_") and not name.startswith("__"):
        name = name.lstrip("_")  # (F.threshold is torch's _threshold)
    outs = made  # (its tensors: all of it, but objects nested past what _leaves reads)
    for t in made:
        if not isinstance(t, torch.Tensor):
            outs = [t for t in made if isinstance(t, torch.Tensor)]
            break
    discrete = False
    with _metadata_reads(outs):
        for t in outs:
            if not (t.is_floating_point() or t.is_complex()):
                discrete = True
                break
    if not (discrete or _cuts(name, args, kwargs)) or _tests_zero(name, args, kwargs, outs):
        return None
    if name.endswith("_like") or name.startswith("new_"):  # (the shape of a tensor, not its values)
        return None
    in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE
    written = _leaves(kwargs.get("out"), []) or ([args[0]] if in_place and args else [])
    return [t for t in written if isinstance(t, torch.Tensor)]


def _ranks_one_row(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Does a decision-like call rank a 1-D tensor of floating values (the tokens by a priority, not a choice
    among columns per row)? Before the decision such a ranking is an earlier choice: the tokens ranked by their
    best score and kept past a capacity in that order (batch prioritized routing) drop other tokens when the
    scores move, which a replay of the decision alone does not hold."""
    x = _arg(args, kwargs, 0, "input")
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 1 and x.numel() > 1


#: Calls that return ``(values, indices)`` with the values their input's own at the indices.
_VALUES_AT = frozenset({"topk", "sort", "max", "min", "kthvalue", "mode", "median", "nanmedian"})


def _regathered(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], held: Any) -> Any:
    """A held later ``topk``/``max`` (a choice of some of its input's entries) answered as a replay answers a
    forced one: its held indices, and the values its input has there *now* (as the call itself reads them), not
    the values it had on the run it was held from; any other held result as it is (a full sort chooses no entry,
    only their order). A held top-k of the current scores with stale values would move the output where nothing
    but its values did (on other inputs, a weight read from another run)."""
    name = getattr(func, "__name__", "")
    leaves = _leaves(held, [])
    source = args[0] if args else kwargs.get("input")
    if name not in _VALUES_AT or len(leaves) != 2 or not isinstance(source, torch.Tensor):
        return held
    values, indices = leaves
    if not (
        isinstance(values, torch.Tensor)
        and isinstance(indices, torch.Tensor)
        and values.is_floating_point()
        and indices.dtype == torch.int64
        and values.shape == indices.shape
        and values.dtype == source.dtype
    ):
        return held
    at = {"topk": 2, "kthvalue": 2}.get(name, 1)
    dim = kwargs.get("dim", args[at] if len(args) > at else -1)
    if not isinstance(dim, int) or isinstance(dim, bool) or source.dim() == 0:
        return held
    keep = indices.dim() == source.dim()
    if keep and indices.shape[dim] >= source.shape[dim]:
        return held  # (a full sort orders what it was given and chooses none of it: held as it was)
    try:
        at_dim = indices if keep else indices.unsqueeze(dim)
        got = source.gather(dim, at_dim)
        got = got if keep else got.squeeze(dim)
    except (RuntimeError, IndexError):  # (indices of another shape than a gather takes: kept as held)
        return held
    with contextlib.suppress(TypeError):
        return type(held)((got, indices)) if type(held) is not tuple else (got, indices)
    return held


def _hold(out: Any, written: list[torch.Tensor], held: Any) -> tuple[Any, bool]:
    """A choice's result answered with ``held`` (what it wrote into, ``out=`` or in place, gets it too), and
    False; or ``out`` and True where ``held`` is missing or of another structure (it cannot be held)."""
    got, want = _leaves(out, []), _leaves(held, [])
    if (
        held is None
        or len(got) != len(want)
        or any(
            isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor)
            or (isinstance(a, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype))
            for a, b in zip(got, want, strict=True)
        )
    ):
        return out, True
    with torch.no_grad():
        for t in written:
            source = next((b for a, b in zip(got, want, strict=True) if a is t), want[0])
            if isinstance(source, torch.Tensor) and t.shape == source.shape:
                t.copy_(source)
    return (out if written and any(out is t for t in written) else _clone(held)), False


#: Operators that write into their first argument.
_IN_PLACE = frozenset(
    {"__setitem__"}
    | {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul")}
    | {f"__i{op}__" for op in ("and", "or", "xor", "lshift", "rshift")}
)
#: Calls that only tell zero (or a non-finite value) from the rest: not a choice by a threshold.
_ZERO_TESTS = frozenset(
    {"bool", "nonzero", "nonzero_static", "argwhere", "count_nonzero", "any", "all"}
    | {"isnan", "isinf", "isfinite", "isposinf", "isneginf", "isreal"}
)
#: Comparisons, which are a zero test against the number 0.
_COMPARISONS = frozenset(
    {"ne", "eq", "not_equal", "gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal"}
    | {f"__{op}__" for op in ("ne", "eq", "gt", "ge", "lt", "le")}
)
#: Piecewise functions that cut floating values (to zero, a bound or a step) without making integers.
_CUT_NAMES = frozenset(
    {"relu", "relu6", "threshold", "heaviside", "hardtanh", "clamp", "clamp_min", "clamp_max", "clip"}
    | {"maximum", "minimum", "fmax", "fmin", "sign", "sgn", "signbit", "round", "floor", "ceil", "trunc", "fix"}
    | {"hardshrink", "softshrink", "hardsigmoid", "hardswish", "floor_divide", "remainder", "fmod"}
    | _COMPARISONS
)


#: Cuts that select, place by place, their input or a value they do not take from it (a bound, zero, their
#: second operand): a choice of places, which :class:`_Selection` holds.
_SELECTING = frozenset(
    {"relu", "relu6", "threshold", "hardtanh", "hardshrink", "clamp", "clamp_min", "clamp_max", "clip"}
    | {"maximum", "minimum", "fmax", "fmin", "max", "min"}
)


@dataclass(frozen=True)
class _Selection:
    """A later choice made by a cut that selects (``clamp``, ``relu``, ``maximum``...): where it cut.

    Its result on other inputs is not its choice: ``w / clamp(w.sum(), min=eps)`` that cuts nowhere keeps
    the sums of the inputs it ran on, and a sum held from other inputs scales weights by an unrelated
    number (in float16, to zero: weights "dropped" by a division that never cut). So it is kept as the
    places it cut and the values it put there (:attr:`choice`, equal between runs that cut in the same
    places to the same bounds), and held by those places: where it cut, the bound (or this run's second
    operand), elsewhere this run's input, as the cut would have passed it.
    """

    x: torch.Tensor
    other: torch.Tensor | None
    cut: torch.Tensor
    put: torch.Tensor

    @property
    def choice(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where it cut and what it put there (zero elsewhere)."""
        return self.cut.clone(), self.put.clone()

    def faint(self) -> bool:
        """Did it cut only values that cannot be told from zero, and put such values there: under the dtype's
        epsilon times the largest value of the same token (the row along the last dimension; each value alone
        in a tensor of fewer than two dimensions), or times 1 where that is smaller? That is an underflow
        guard, ``w / clamp(w.sum(), min=eps)`` or ``scores.clamp_min(1e-20)``, which cuts only where the values
        underflowed (a sharp router's forced experts that its current scores rate at ~0), not a choice of
        experts: a threshold cut (``F.threshold(w, 1e-3, 0)``) cuts values that a sum with the token's other
        weights still tells from zero.

        Per token, not against the batch's largest value: one peaked or huge token (an attention sink) would
        make a real cut of every other token's small weights read as a guard."""
        with torch.no_grad():
            if not bool(self.cut.any()):
                return True
            x = self.x.detach().abs().nan_to_num(0, 0, 0)
            largest = x.amax(-1, keepdim=True) if x.dim() >= 2 else x
            tiny = (torch.finfo(self.x.dtype).eps * largest.clamp_min(1)).expand_as(x)[self.cut]
            put = self.put.detach().abs().nan_to_num(0, 0, 0)[self.cut]
            return bool((x[self.cut] <= tiny).all()) and bool((put <= tiny).all())

    def floors(self) -> bool:
        """Did it only raise values to a floor: put a nonzero value, of at least the magnitude of the one it
        replaced, wherever it cut (``w.clamp_min(1e-6)``, ``w / w.sum(-1, keepdim=True).clamp(min=1e-6)``,
        ``torch.maximum(w, floor)``)? Such a cut weighs every expert it is given, each at least as much as
        before it: a function of the forced experts' own weights, no choice among them, whatever the floor (one
        above the dtype's epsilon rounds a sharp gate's tiny weights up, which :meth:`faint` does not take for a
        guard). A cut that puts zero (``F.threshold(w, 1e-3, 0)``, ``relu(w - t)``), or lowers a value
        (``F.threshold(w, 0.1, 1e-9)``, a ceiling), drops or all but drops an expert: a choice."""
        with torch.no_grad():
            if not bool(self.cut.any()):
                return True
            x = self.x.detach()[self.cut]
            put = self.put.detach()[self.cut]
            return bool(((put != 0) & put.isfinite() & (put.abs() >= x.abs())).all())

    def held(self, choice: Any) -> torch.Tensor | None:
        """The cut's result with ``choice`` (another run's :attr:`choice`) held, or None if it does not fit."""
        if not (isinstance(choice, tuple) and len(choice) == 2 and all(isinstance(t, torch.Tensor) for t in choice)):
            return None
        cut, put = choice
        if cut.shape != self.cut.shape or cut.dtype != torch.bool or put.shape != self.put.shape:
            return None
        with torch.no_grad():
            bound = put if self.other is None else self.other
            return torch.where(cut, bound, self.x).to(self.put.dtype)


def _selection(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> _Selection | None:
    """The places a cut that selects cut (see :class:`_Selection`), or None for any other call, one that
    writes into a tensor, or bounds of tensors (which of two it put cannot be told)."""
    name = getattr(func, "__name__", "").partition(".")[0].lstrip("_")  # (an aten operator; F.threshold)
    x = _arg(args, kwargs, 0, "input")
    if name not in _SELECTING or not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
        return None
    if not (out.is_floating_point() and x.is_floating_point()) or x.shape != out.shape:
        return None
    rest = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]
    tensors = [t for t in rest if isinstance(t, torch.Tensor)]
    if name in ("maximum", "minimum", "fmax", "fmin", "max", "min"):
        if len(tensors) != 1 or len(rest) != 1:
            return None
        other: torch.Tensor | None = tensors[0]
    elif tensors:
        return None
    else:
        other = None
    with torch.no_grad():
        cut = out != x
        return _Selection(x.detach(), None if other is None else other.detach(), cut, torch.where(cut, out, 0).detach())


#: Cuts to a step (a count as a float): earlier choices like comparisons, unlike ``relu``/``clamp`` of scores.
_STEP_NAMES = frozenset(
    {"sign", "sgn", "signbit", "round", "floor", "ceil", "trunc", "fix", "heaviside", "floor_divide"}
)


def _steps(func: Any, kwargs: Mapping[str, Any]) -> bool:
    """Does this call round floating values to steps (``round``, ``ceil``, a floor division)?"""
    name = getattr(func, "__name__", "").partition(".")[0].lstrip("_")  # (an aten operator: round.decimals)
    base = name[:-1] if name.endswith("_") else name
    return base in _STEP_NAMES or (base in ("div", "divide", "true_divide") and kwargs.get("rounding_mode") is not None)


def _cuts(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Is this call a piecewise cut of floating values (in place, or ``torch.max(a, b)``, too)?"""
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if base in _CUT_NAMES:
        return True
    if base in ("div", "divide", "true_divide"):
        return kwargs.get("rounding_mode") is not None  # (a floor or a truncation)
    return base in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor)


def _tests_zero(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[torch.Tensor]) -> bool:
    """Does this call only tell zero from nonzero (``bool()``, ``x != 0``, ``x > 0``, ``.to(torch.bool)``...)?

    An ordering comparison with 0 of values of both signs (``logits - threshold > 0``) is no zero test: it
    cuts them at a threshold folded into them, a choice like any other comparison with a threshold."""
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if base in _ZERO_TESTS:
        return True
    if base in _COMPARISONS:
        if not any(isinstance(a, numbers.Number) and a == 0 for a in (*args, *kwargs.values())):
            return False
        return base in _EQUALITIES or not any(_signed(a) for a in (*args, *kwargs.values()))
    return name in ("to", "type") and bool(outs) and all(t.dtype == torch.bool for t in outs)


#: Comparisons for equality: with 0, a zero test whatever the signs of the values.
_EQUALITIES = frozenset({"ne", "eq", "not_equal", "__ne__", "__eq__"})


def _signed(t: Any) -> bool:
    """Does ``t`` hold floating values of both signs (strictly below and strictly above 0)?"""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() < 2:
        return False
    with torch.no_grad():
        return bool((t < 0).any()) and bool((t > 0).any())


def _mask_source(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> torch.Tensor | None:
    """The scores ``out`` is a masked copy of: ``masked_fill``'s input; of ``torch.where``'s two value
    arguments, the one of the output's shape that is not a fill (constant along the last dimension)."""
    if out.dim() == 0:
        return None
    if func in _MASKED_FILLS:
        x = _arg(args, kwargs, 0, "input")
        return x if isinstance(x, torch.Tensor) and x.shape == out.shape else None
    a = (args[0] if args else None) if func is torch.Tensor.where else _arg(args, kwargs, 1, "input")
    b = _arg(args, kwargs, 2, "other")
    full = [t for t in (a, b) if isinstance(t, torch.Tensor) and t.shape == out.shape]
    if len(full) == 2:
        full = [t for t in full if not bool((t == t[..., :1]).all())]
    return full[0] if len(full) == 1 else None


def _forced(
    family: str, held: Any, used: int, scores: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """The answer a replay gives a decision call: the first ``used`` indices of ``held`` (the slots past
    them, which only feed a statistic, are the best others of the current scores), the values read from
    ``scores``."""
    idx = (held if family in ("argmax", "argmin") else held[1]).clone()  # (the forward may write into it)
    if family == "topk" and used < idx.shape[-1]:
        lead, span = idx.shape[:-1], idx.shape[-1]
        rows, source = idx.reshape(-1, span)[:, :used], scores.reshape(-1, scores.shape[-1])
        idx = torch.cat([rows, best_others(source, rows, span - used, args, dict(kwargs))], dim=1).reshape(*lead, span)
    at = idx if idx.dim() == scores.dim() else idx.unsqueeze(-1)
    values = scores.gather(-1, at)
    if at is not idx:
        values = values.squeeze(-1)
    return idx if family in ("argmax", "argmin") else type(held)((values, idx))


def best_others(
    source: torch.Tensor, chosen: torch.Tensor, m: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """The ``m`` best experts of each row of ``source`` outside ``chosen`` (-1 entries of ``chosen`` hold
    none), for a ``topk`` called with ``args``/``kwargs``: what a replay answers the slots past the decision."""
    largest = bool(args[3] if len(args) > 3 else kwargs.get("largest", True))
    fill = float("-inf") if largest else float("inf")
    scores = source.detach().clone()
    scores.scatter_(-1, chosen.clamp(min=0), torch.where(chosen >= 0, fill, scores.gather(-1, chosen.clamp(min=0))))
    return scores.topk(m, dim=-1, largest=largest).indices


_ATOMS = frozenset(
    {int, float, bool, complex, str, bytes, type(None), slice, type(Ellipsis), torch.dtype, torch.device, torch.layout}
)  # (what holds no tensor: a slice's bounds are read as ints, never as tensors, here)


#: torch's structured results (``torch.return_types.topk``...): tuples, read as :func:`_leaves` reads a tuple.
_RESULT_TYPES = frozenset(getattr(torch.return_types, "all_return_types", ()))


def _leaves(obj: Any, out: list[Any], depth: int = 0, ints: bool = False) -> list[Any]:
    """The tensors in nested containers and result objects (``ints``: Python ints too), in order."""
    kind = type(obj)  # (the common cases first: every torch call of a probe run reads its arguments here)
    if kind is torch.Tensor or depth > 8:
        out.append(obj)
        return out
    if kind in _ATOMS:
        if ints and kind is int:
            out.append(obj)
        return out
    if kind is tuple or kind is list or kind is dict or kind in _RESULT_TYPES:
        for v in obj.values() if kind is dict else obj:  # (its tensors and atoms read here, without a call each)
            inner = type(v)
            if inner is torch.Tensor or (ints and inner is int):
                out.append(v)
            elif depth >= 8 or not (inner in _ATOMS or (inner is dict and not v)):  # (no keywords: nothing)
                _leaves(v, out, depth + 1, ints)
        return out
    if isinstance(obj, torch.Tensor) or (ints and kind is int):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _leaves(v, out, depth + 1, ints)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _leaves(v, out, depth + 1, ints)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _leaves(getattr(obj, f.name), out, depth + 1, ints)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | nn.Module) and not callable(obj):
        for v in vars(obj).values():  # a plain result object
            _leaves(v, out, depth + 1, ints)
    return out


def _leaf_spans(
    obj: Any, out: list[tuple[int, ...]], spans: tuple[int, ...] = (), depth: int = 0
) -> list[tuple[int, ...]]:
    """For each tensor :func:`_leaves` finds in ``obj`` (in its order, ``ints`` off), the lengths of the lists,
    tuples and mappings of tensors alike (one shape, one dtype) it sits in, outermost first: a list of one tensor per
    expert lays them along the experts as a dimension of their stack would. A tuple of unlike tensors (weights and
    indices) is no such dimension."""
    if isinstance(obj, torch.Tensor) or depth > 8:
        out.append(spans)
    elif isinstance(obj, Mapping | list | tuple):
        items = list(obj.values()) if isinstance(obj, Mapping) else list(obj)
        alike = bool(items) and all(
            isinstance(v, torch.Tensor) and v.shape == items[0].shape and v.dtype == items[0].dtype for v in items
        )
        for v in items:
            _leaf_spans(v, out, (*spans, len(items)) if alike else spans, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _leaf_spans(getattr(obj, f.name), out, spans, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | nn.Module) and not callable(obj):
        for v in vars(obj).values():  # a plain result object
            _leaf_spans(v, out, spans, depth + 1)
    return out


def _distance(a: Any, b: Any, tol: float = 0.0) -> tuple[float, int]:
    """How far two forward outputs are apart, and in how many elements (by more than ``tol``).

    ``(0, 0)`` when equal; ``inf`` when their structure differs. Python ints count as elements too (a router
    may return its tokens per expert as a list: JetMoE's ``expert_size``).
    """
    la, lb = _leaves(a, [], ints=True), _leaves(b, [], ints=True)
    if len(la) != len(lb):
        return math.inf, sys.maxsize
    worst, count = 0.0, 0
    for x, y in zip(la, lb, strict=True):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if type(x) is int and type(y) is int and x != y:
                worst, count = math.inf, count + 1
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return math.inf, sys.maxsize
        if not x.is_floating_point():
            unequal = int((x != y).sum())
            if unequal:
                worst, count = math.inf, count + unequal
            continue
        x, y = x.detach().double(), y.detach().double()
        same = (x == y) | (x.isnan() & y.isnan())
        if bool(same.all()):
            continue
        diff = (x - y).abs().masked_fill(same, 0.0).nan_to_num(nan=math.inf)
        worst = max(worst, float(diff.max()))
        count += int((diff > tol).sum())
    return worst, count


def _indices(out: Any, family: str, rows: int) -> torch.Tensor:
    idx = out if family in ("argmax", "argmin", "argsort") else out[1]
    return idx.reshape(rows, -1)


def _disjoint(call: Call, out: Any, slots: list[tuple[Call, Any]]) -> bool:
    """Do the indices of ``out`` share no expert with those of ``slots`` in any row (slots of one decision)?"""
    try:
        mine = _indices(out, call.family, call.rows)
        rest = torch.cat([_indices(o, c.family, call.rows) for c, o in slots], 1)
    except (RuntimeError, IndexError, TypeError):
        return False
    return not bool((mine[:, :, None] == rest[:, None, :]).any())


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Tokens in the forward's first input tensor of two or more dimensions (``[..., tokens, hidden]``)."""
    x = next((a for a in _leaves((args, kwargs), []) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    return None if x is None else x.numel() // max(int(x.shape[-1]), 1)


def _clone(obj: Any, own: torch.Tensor | None = None) -> Any:
    """``obj`` with a fresh copy of each tensor it holds, but ``own`` (made for one run alone: detached only)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj is own else obj.detach().clone()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        items = tuple(_clone(v, own) for v in obj)
        if type(obj) is not tuple:  # torch.return_types (topk, max...): the same type back
            with contextlib.suppress(TypeError):
                return type(obj)(items)
        return items
    if isinstance(obj, list):
        return [_clone(v, own) for v in obj]
    if type(obj) is dict:
        return {k: _clone(v, own) for k, v in obj.items()}
    return obj


def _passed_through(obj: Any, depth: int = 0) -> list[Any]:
    """What :func:`_clone` hands a run as it is, among a forward's inputs ``obj``, that may hold state a run writes:
    the plain objects of the user's (:func:`_plain_object`) and the named tuples (whose tensors are not copied), a
    few containers deep."""
    if isinstance(obj, torch.Tensor) or depth > 3:
        return []
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return [obj, *(x for v in obj for x in _passed_through(v, depth + 1))]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in _passed_through(v, depth + 1)]
    if type(obj) is dict:
        return [x for v in obj.values() for x in _passed_through(v, depth + 1)]
    return [obj] if _held_object(obj) and (not _standard(type(obj)) or type(obj) is types.SimpleNamespace) else []


def _grad_like(obj: Any, ref: Any) -> Any:
    """``obj`` (fresh copies of a forward's inputs, or inputs of the probe's own making) with each floating tensor
    requiring gradients where the real input ``ref`` in its place does: a forward that branches on
    ``x.requires_grad`` (CompeteSMoE's competition step, aux losses computed only then) takes the branch its real
    inputs take. A non-leaf real input gets a non-leaf copy, so that an in-place write into it runs as it would."""
    if isinstance(obj, torch.Tensor):
        if not (isinstance(ref, torch.Tensor) and ref.requires_grad) or obj.requires_grad:
            return obj
        if not (obj.is_floating_point() or obj.is_complex()):
            return obj
        leaf = obj.detach().requires_grad_()
        if ref.is_leaf:
            return leaf
        with torch.enable_grad():
            return leaf.clone()
    if isinstance(obj, tuple) and isinstance(ref, tuple) and len(obj) == len(ref) and not hasattr(obj, "_fields"):
        items = tuple(_grad_like(o, r) for o, r in zip(obj, ref, strict=True))
        if type(obj) is not tuple:
            with contextlib.suppress(TypeError):
                return type(obj)(items)
        return items
    if isinstance(obj, list) and isinstance(ref, list) and len(obj) == len(ref):
        return [_grad_like(o, r) for o, r in zip(obj, ref, strict=True)]
    if type(obj) is dict and isinstance(ref, dict):
        return {k: _grad_like(v, ref.get(k)) for k, v in obj.items()}
    return obj


#: Parameters up to this many elements are copied before probing and put back after each run;
#: larger ones (expert weights) are only checked not to change.
_COPY_LIMIT = 1 << 20
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"forward"}  # torch's own state (hook dicts...) is not ours
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
_HOOK_FNS = ("_forward_hooks", "_forward_pre_hooks")  # (the others map a hook's id to a flag)

#: Router scopes whose forward is shown to depend on the user's own hooks of their submodules: their probe runs keep
#: those hooks in (see :meth:`_Snapshot.hooks_aside`). A scope joins where a run with the hooks set aside fails on the
#: forward's own inputs, or where the real forward's output differs from what such a run gave (see
#: :data:`PREDICTED`): a hook that makes or cuts the choice (a top-k of a gate that only scores, a cut of the combine
#: weights) is then seen as the forward's own code is.
HOOKS_NEEDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

#: The output of the run with the hooks of its submodules set aside on the forward's own inputs, unchanged (its
#: tensors' leaves, detached), and the run-to-run tolerance, for a scope whose decision was just established with
#: user hooks set aside: the real forward that follows, with them, is compared with it (see
#: :func:`differs`).
PREDICTED: weakref.WeakKeyDictionary[nn.Module, tuple[list[Any], float]] = weakref.WeakKeyDictionary()

#: Per scope whose decision is made along another dimension than the last: ``(dim, ndim, width)`` of
#: :attr:`Evidence.axis`, set as it is established that way (every probe run of the scope reads its choice moved last,
#: see :class:`MovedAxis`) and dropped where it is established afresh or its session detaches.
AXES: weakref.WeakKeyDictionary[nn.Module, tuple[int, int, int]] = weakref.WeakKeyDictionary()


class MovedAxis(TorchFunctionMode):
    """Reads a choice along another dimension than the last as one along the last.

    Entered inside the modes that watch a router's forward (the innermost, so that it sees each call first), it
    answers a ``topk``, ``argmax``/``argmin`` or ``max``/``min`` along ``dim`` of ``ndim``-dimensional floating scores
    whose ``dim`` is ``width`` wide (the experts) by the same call on the scores with that dimension moved last,
    made through the modes outside it (which record, force or probe it as any choice among experts, one row per
    position of the other dimensions), its results moved back where the call puts them. The choice is the same:
    a top-k along a dimension chooses per position of the others. Every other call goes through as it is.

    ``any_width``: calls along that dimension of any width are moved (the runs that establish the decision: a
    dimension whose width follows the number of tokens, a choice among tokens, is so seen as one, and refused).
    """

    def __init__(self, axis: tuple[int, int, int], any_width: bool = False) -> None:
        super().__init__()
        self.dim, self.ndim, self.width = axis
        self.any_width = any_width

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in DECISION_FUNCS:
            moved = _moved_call(unwrap(func, kwargs), args, kwargs, (self.dim, self.ndim, self.width), self.any_width)
            if moved is not None:
                margs, mkwargs, back = moved
                return _moved_back(func(*margs, **mkwargs), self.dim, back)
        return func(*args, **kwargs)


def _moved_call(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], axis: tuple[int, int, int], any_width: bool = False
) -> tuple[tuple[Any, ...], dict[str, Any], bool] | None:
    """``(args, kwargs, back)`` of ``func``'s call with its scores' dimension ``axis[0]`` moved last and the call
    made along the last (``back``: its results keep that dimension, to be moved back), or None where the call is
    not one along that dimension of such scores (another family, another dimension or width unless ``any_width``,
    ``out=``)."""
    family = _FAMILY.get(func)
    if family not in FORCEABLE or "out" in kwargs:
        return None
    dim, ndim, width = axis
    x = _arg(args, kwargs, 0, "input")
    if type(x) is not torch.Tensor or x.dim() != ndim or not x.is_floating_point():
        return None
    if int(x.shape[dim]) != width and not any_width:
        return None
    pos = 2 if family == "topk" else 1
    given = _arg(args, kwargs, pos, "dim", -1 if family == "topk" else None)
    if type(given) is not int or not -ndim <= given < ndim or given % ndim != dim or dim == ndim - 1:
        return None
    back = family == "topk" or bool(_arg(args, kwargs, pos + 1, "keepdim", False))
    moved = x.movedim(dim, -1)
    new_args, new_kwargs = list(args), dict(kwargs)
    if args:
        new_args[0] = moved
    else:
        new_kwargs["input"] = moved
    if len(new_args) > pos:
        new_args[pos] = -1
    else:
        new_kwargs["dim"] = -1
    return tuple(new_args), new_kwargs, back


def _moved_back(out: Any, dim: int, back: bool) -> Any:
    """The results of a call made on scores with ``dim`` moved last, as the call along ``dim`` returns them: that
    dimension moved back where it keeps it (``back``), laid out contiguously as torch lays out its own."""
    if not back:
        return out
    if isinstance(out, torch.Tensor):
        return out.movedim(-1, dim).contiguous()
    if isinstance(out, tuple):
        return type(out)(tuple(t.movedim(-1, dim).contiguous() for t in out))
    return out


def _own_hook(hook: Any) -> bool:
    """Is ``hook`` one of moe_replay's own (a guard, a watch, a nested router's), not the user's? Read without
    running user code."""
    if getattr(hook, "__moe_replay_own__", False):
        return True
    plain = isinstance(hook, types.FunctionType | types.MethodType)
    where = hook.__module__ if plain else type(hook).__module__
    return isinstance(where, str) and (where == "moe_replay" or where.startswith("moe_replay."))


def torchs_hook(hook: Any) -> bool:
    """Is ``hook`` torch's own (``FlopCounterMode``'s module tracker, FSDP's): it chooses no experts, and comes and
    goes with a context a user may open inside a block."""
    where = getattr(hook, "__module__", None) if isinstance(hook, types.FunctionType | types.MethodType) else None
    where = where if where is not None else type(hook).__module__
    return isinstance(where, str) and where.startswith("torch.")


def _watched_hooks_inside(scope: nn.Module) -> bool:
    """Does a submodule of ``scope`` hold a forward hook or pre-hook of the user's, torch's own aside (FSDP's: they
    gather and free parameters, and choose nothing): those a later forward watches (:attr:`Evidence.hooks_aside`)?"""
    return any(
        not _own_hook(h) and not torchs_hook(h)
        for m in scope.modules()
        if m is not scope
        for name in _HOOK_FNS
        for h in list((vars(m).get(name) or {}).values())
    )


def user_hooks_inside(scope: nn.Module) -> bool:
    """Does a submodule of ``scope`` (not ``scope`` itself, whose hooks run outside its forward) hold a forward hook
    or pre-hook of the user's own?"""
    return any(
        not _own_hook(h)
        for m in scope.modules()
        if m is not scope
        for name in _HOOK_FNS
        for h in (vars(m).get(name) or {}).values()
    )


def differs(base: list[Any], out: Any, tolerance: float) -> bool:
    """Does ``out``, a forward's output, differ from ``base`` (the leaves of a run's, see :data:`PREDICTED`) by more
    than ``tolerance``?"""
    worst, _ = _distance(base, _leaves(out, [], ints=True), tolerance)
    return worst > tolerance


def _detached_leaves(out: Any) -> list[Any]:
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in _leaves(out, [], ints=True)]


def forced_leaves(
    scope: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ev: Evidence,
    rows: torch.Tensor | None,
) -> list[Any] | None:
    """The leaves of the output of a run of ``scope``'s forward on these inputs, with the user's hooks of its
    submodules set aside and its decision (one top-k) answered with ``rows`` as a replay answers it: what a replay's
    forward that established ``ev`` returns where no hook changes it. None where it cannot be told (a decision in
    slots or chunks, not one top-k, no rows, a run that fails)."""
    if rows is None or len(ev.decision) != 1 or ev.chunks or ev.calls[ev.decision[0]].family != "topk":
        return None
    held = torch.return_types.topk((rows, rows))
    force = {i: (held, ev.top_k) for i in (*ev.decision, *ev.mirrors)}
    probe = _Prober(forward, args, kwargs, scope)
    NESTING.establishing += 1
    try:
        out, _ = probe.run(force=force)
        return _detached_leaves(out)
    except Exception:
        return None
    finally:
        NESTING.establishing -= 1
        probe.snapshot.restore()


class _AlongAnother(UnsupportedRouterError):
    """The refusal of a forward that chooses only along another dimension than the last; ``axes``: ``(dim, ndim,
    width)`` of each such choice of a forceable family, read as a choice among experts where they show one (see
    :func:`_expert_axis`)."""

    def __init__(self, message: str, axes: Sequence[tuple[int, int, int]]) -> None:
        super().__init__(message)
        self.axes = tuple(axes)


def _over_tokens(
    axes: Sequence[tuple[int, int, int]], args: tuple[Any, ...], kwargs: dict[str, Any], num_experts: int | None
) -> str | None:
    """Where every choice a forward makes along another dimension than the last is along one as wide as a dimension
    of its tokens (one of its first input's, the hidden dimension aside: ``topk(dim=-2)`` of ``[batch, tokens,
    experts]`` scores), and as wide as no number of experts discovery expects, that dimension in words: each expert
    chooses its tokens (expert-choice routing). None otherwise (a choice among experts put along another dimension
    than the last, or widths that cannot tell)."""
    x = next((a for a in _leaves((args, kwargs), []) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if x is None or not axes:
        return None
    sizes = [int(n) for n in x.shape[:-1]]
    widths = {width for _, _, width in axes}
    if len(widths) != 1:
        return None
    width = next(iter(widths))
    if width < 2 or width == num_experts or width not in sizes:
        return None
    return f"dim {sizes.index(width)} of its input {tuple(x.shape)} ({width}, its tokens)"


def _expert_axis(axes: Sequence[tuple[int, int, int]], num_experts: int | None) -> tuple[int, int, int] | None:
    """The one axis along which a forward's choices are all made, where it may be the experts' dimension: at least
    two wide, as wide as the experts discovery expects (where it expects a number); else None."""
    found = set(axes)
    if len(found) != 1:
        return None
    axis = next(iter(found))
    if axis[0] < 0 or axis[2] < 2 or (num_experts is not None and axis[2] != num_experts):
        return None
    return axis


class _HooksNeeded(Exception):
    """A probe run with the user's hooks of the scope's submodules set aside failed on the forward's own inputs: the
    forward may need them (a pre-hook that loads offloaded weights, a hook that takes the top-k of a gate that only
    scores); the decision is established again with them in."""


def _shallow(v: Any) -> Any:
    """The contents of a container attribute (a list, dict, set or deque: see :func:`container_contents`), or a copy
    of a numpy array of numbers (a step count or a statistic a router moves in place, ``self.step += 1``), else None:
    the same object is refilled in place where they changed (:func:`_refill`), so that other code holding it (a
    model's aux-loss list handed to each of its routers) keeps seeing the router's."""
    if isinstance(v, np.ndarray):
        numeric = v.dtype.kind in "biufc" and v.flags.writeable and v.size <= _COPY_LIMIT
        return (np.ndarray, v.copy()) if numeric else None
    return container_contents(v) if isinstance(v, CONTAINERS) else None


def _refill(v: Any, contents: Any) -> None:
    """Put back in place what :func:`_shallow` read of ``v``, where it changed."""
    kind, held = contents
    if kind is np.ndarray:
        if v.shape == held.shape and not np.array_equal(v, held):
            np.copyto(v, held)
        return
    refill_container(v, contents)


#: how deep inside a container attribute, or a plain object's, the containers and plain objects it holds are put back
#: (``self.stats = {"aux": []}``, ``self.buffer.per_layer = [LayerLog()]``: one and two deep)
_NESTED_DEPTH = 3
#: the most containers and plain objects held inside attributes put back per snapshot, and the most items looked at
_NESTED_CONTAINERS = 256
_NESTED_ITEMS = 1 << 16


def _held_within(tops: Iterable[Any], holders: Iterable[Any]) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """What the values ``tops``, and the objects ``holders`` (whose own attributes are put back: an iterator of the
    user's class among them), hold, a few deep (:data:`_NESTED_DEPTH`), each once, through the containers (a list,
    dict, set or deque) and the plain objects (:func:`_plain_object`) among them: the plain objects found, and the
    containers found, with their contents (see :func:`container_contents`).
    Putting back an attribute's own value and contents leaves a list it holds grown (a log of aux losses kept per name
    in a dict, a routing-replay buffer's per-layer logs kept in a list), which a later forward or the training loop
    reads as the forward's."""
    todo = [(v, 1) for v in tops if isinstance(v, CONTAINERS) or _plain_object(v)]
    todo += [(v, 1) for v in holders]
    seen = {id(v) for v, _ in todo}
    objects: list[Any] = []
    containers: list[tuple[Any, Any]] = []
    budget = _NESTED_ITEMS
    while todo and len(objects) + len(containers) < _NESTED_CONTAINERS and budget > 0:
        holder, depth = todo.pop(0)
        if isinstance(holder, CONTAINERS):
            kind, items = container_contents(holder)
            values = [value for _, value in items] if issubclass(kind, dict) else items
        else:
            own, slots = _own_state(holder)
            values = [v for v, _ in itertools.chain(own.values(), slots.values())]
        budget -= len(values)
        for v in values:
            if id(v) in seen or len(objects) + len(containers) >= _NESTED_CONTAINERS:
                continue
            if isinstance(v, CONTAINERS):
                containers.append((v, container_contents(v)))
            elif _plain_object(v):
                objects.append(v)
            else:
                continue
            seen.add(id(v))
            if depth < _NESTED_DEPTH:
                todo.append((v, depth + 1))
    return objects, containers


def _plain_iterator(v: Any) -> bool:
    """An iterator whose one use is ``next()``: a generator, one of Python's own (``iter(a_list)``,
    ``itertools.cycle``, ``map``) or of compiled code with nothing but the iterator protocol (a deque's): what
    :class:`_Redrawn` stands in for. Not an object of the user's class, whose other methods a stand-in would hide, nor
    a file."""
    kind = type(v)
    if isinstance(v, _Redrawn | types.GeneratorType):
        return True
    return hasattr(kind, "__next__") and (kind.__module__ in ("builtins", "itertools") or _bare_iterator_type(kind))


#: :func:`_bare_iterator_type` of each type asked about
_BARE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _bare_iterator_type(kind: type) -> bool:
    """Is ``kind`` an iterator type of compiled code that has nothing but the iterator protocol (a
    ``collections.deque``'s, an ``array``'s): no public name a stand-in would hide, and no method written in Python
    (a class of the user's, whose ``__next__`` may do more than draw)? Not numpy's ``flatiter`` (its ``index``,
    ``coords``, ``base``)."""
    bare = _BARE.get(kind)
    if bare is None:
        bare = _BARE[kind] = not any(not name.startswith("_") for name in dir(kind)) and not any(
            isinstance(v, types.FunctionType | staticmethod | classmethod | property)
            for k in kind.__mro__
            for v in vars(k).values()
        )
    return bare


#: a place an iterator is held in: a namespace (a module's ``__dict__``, a global namespace, a plain object's) or a
#: dict or list a module's attribute holds, with the key or index it is held at there, or a closure cell or class
#: read and set by name (:class:`~moe_replay._code_settings.Home`)
_Home = dict[Any, Any] | list[Any] | Home


def _held_at(home: _Home, key: Any) -> Any:
    """What ``home`` holds at ``key`` now (None where nothing is: a list cut shorter, a key deleted), none of a
    subclass's own methods run."""
    if isinstance(home, dict):
        return dict.get(home, key)
    if not isinstance(home, list):
        return home.get(key)
    return list.__getitem__(home, key) if isinstance(key, int) and 0 <= key < list.__len__(home) else None


def _put_at(home: _Home, key: Any, value: Any) -> None:
    """Hold ``value`` at ``key`` in ``home`` (a list cut shorter since is left as it is)."""
    if isinstance(home, dict):
        dict.__setitem__(home, key, value)
    elif not isinstance(home, list):
        home[key] = value
    elif isinstance(key, int) and 0 <= key < list.__len__(home):
        list.__setitem__(home, key, value)


def _homes_in(m: nn.Module, attrs: dict[str, tuple[Any, Any]]) -> Iterator[tuple[_Home, Any, Any]]:
    """Each place module ``m``'s attributes hold a value at: its own namespace, and one level into the dicts and
    lists they hold (``self.noise = {"jitter": itertools.cycle(...)}``), as (home, key, value)."""
    for k, (v, contents) in attrs.items():
        yield m.__dict__, k, v
        if contents is None or not isinstance(v, dict | list):
            continue
        kind, items = contents
        pairs = items if issubclass(kind, dict) else enumerate(items)
        for key, item in pairs:
            yield v, key, item


#: how deep inside the plain objects a module keeps an iterator is looked for (``self.cfg.seeds``: one object deep)
_KEPT_DEPTH = 3
#: the most plain objects looked into per snapshot (a config of many nested sections is not walked whole)
_KEPT_OBJECTS = 256


def _plain_object(v: Any) -> bool:
    """An object of the user's kept in an attribute, whose own attributes may hold an iterator (a config, a noise
    source): one with a ``__dict__`` of its own that is not a module, a tensor, a class, a function or a Python
    module, nor an iterator (stood in for itself)."""
    return (
        isinstance(getattr(v, "__dict__", None), dict)
        and not isinstance(v, nn.Module | torch.Tensor | type | types.ModuleType | _Redrawn)
        and not callable(getattr(type(v), "__next__", None))
        and not isinstance(v, types.FunctionType | types.MethodType | types.BuiltinFunctionType | functools.partial)
    )


def _held_object(v: Any) -> bool:
    """A plain object of the user's (:func:`_plain_object`), or one of a class of theirs that keeps its state in
    slots declared instead of a ``__dict__`` (``__slots__ = ("n",)``): what :func:`_own_state` reads and
    :func:`_put_own_state` puts back alike."""
    return _plain_object(v) or (
        bool(_slot_names(type(v)))
        and not _standard(type(v))
        and not isinstance(v, nn.Module | torch.Tensor | type | types.ModuleType | _Redrawn)
        and not callable(getattr(type(v), "__next__", None))
        and not isinstance(v, types.FunctionType | types.MethodType | types.BuiltinFunctionType | functools.partial)
    )


def _kept_iterators(
    attrs: list[tuple[nn.Module, dict[str, tuple[Any, Any]]]],
) -> list[tuple[_Home, Any, _Tape]]:
    """The plain iterators held by the attributes of plain objects the modules keep (``self.noise = NoiseSource()``,
    ``next(self.noise.it)``), a few objects deep, each object once (no cycle is followed), as
    ``(the object's dict, the attribute, its tape)``."""
    return [(space, k, _tape_of(v)) for space, k, v in _kept_values(attrs, _plain_iterator)]


def _is_flat(v: Any) -> bool:
    """Is ``v`` numpy's flat iterator over an array (``array.flat``)?"""
    return isinstance(v, np.flatiter)


def _unstood(v: Any) -> bool:
    """Is ``v`` an iterator no stand-in takes the place of in the runs that establish a decision (one of the user's
    class, a file: see :func:`_plain_iterator`), so that each run draws on from it? Not numpy's flat iterator (each
    run draws from a copy of it, see :func:`_flat_copy`), nor a module or a tensor."""
    return (
        callable(getattr(type(v), "__next__", None))
        and not isinstance(v, nn.Module | torch.Tensor | np.flatiter | type)
        and not _plain_iterator(v)
    )


def _slot_names(kind: type) -> list[str]:
    """The slots the classes of ``kind``'s MRO declare (not ``__dict__`` nor ``__weakref__``)."""
    out: list[str] = []
    for k in kind.__mro__:
        slots = vars(k).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if isinstance(name, str) and name not in ("__dict__", "__weakref__") and name not in out:
                out.append(name)
    return out


def _stateful(v: Any) -> bool:
    """Does iterator ``v`` keep its state where :func:`_own_state` can read it and put it back: a ``__dict__`` of its
    own, or slots its classes declare (not a C iterator's state, which nothing reads)?"""
    return type(getattr(v, "__dict__", None)) is dict or bool(_slot_names(type(v)))


#: a slot that held nothing when :func:`_own_state` read it
_UNSET = object()


def _own_state(obj: Any) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """An iterator's own attributes, those of its ``__dict__`` and those of its slots: each value (:data:`_UNSET`
    for a slot that holds none), and a shallow copy of a list, dict, set or deque's contents."""
    space = getattr(obj, "__dict__", None)
    held = {k: (v, _shallow(v)) for k, v in space.items()} if type(space) is dict else {}
    slots = {}
    for name in _slot_names(type(obj)):
        v = getattr(obj, name, _UNSET)
        slots[name] = (v, None if v is _UNSET else _shallow(v))
    return held, slots


def _standard(kind: type) -> bool:
    """Is ``kind`` a class of Python's standard library (a ``logging.Logger``, a ``ThreadPoolExecutor``)?"""
    return str(getattr(kind, "__module__", "")).partition(".")[0] in sys.stdlib_module_names


def _with_kept_objects(iterators: list[Any]) -> list[Any]:
    """``iterators`` (of the user's class, see :func:`_stateful`), then the plain objects (:func:`_plain_object`) their
    own attributes hold, a few objects deep (:data:`_KEPT_DEPTH`), each once (no cycle is followed): an iterator may
    keep its state in an object of its own (``self.box.n += 1``), which putting back its own attributes alone leaves
    moved."""
    out = list(iterators)
    seen = {id(v) for v in out}
    todo = [(v, 1) for v in out]
    while todo and len(out) < _KEPT_OBJECTS:
        obj, depth = todo.pop(0)
        own, slots = _own_state(obj)
        for v, _ in itertools.chain(own.values(), slots.values()):
            if id(v) not in seen and _held_object(v):
                seen.add(id(v))
                out.append(v)
                if depth < _KEPT_DEPTH:
                    todo.append((v, depth + 1))
    return out


def _put_own_state(obj: Any, state: tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]) -> None:
    """Put an iterator's own attributes back as :func:`_own_state` read them (attributes added since taken out), none
    of its class's ``__setattr__`` run."""
    held, slots = state
    space = getattr(obj, "__dict__", None)
    if type(space) is dict:
        for k in [k for k in space if k not in held]:
            del space[k]
        for k, (v, contents) in held.items():
            if contents is not None:
                _refill(v, contents)
            space[k] = v
    for name, (v, contents) in slots.items():
        if v is _UNSET:
            if hasattr(obj, name):
                object.__delattr__(obj, name)
            continue
        if contents is not None:
            _refill(v, contents)
        object.__setattr__(obj, name, v)


def _unstood_words(snapshot: _Snapshot) -> str:
    """Words for a refusal of a router whose runs differ: the iterators of :meth:`_Snapshot.unstood`, named as the
    likely cause, and what to do; empty where there is none."""
    names = snapshot.unstood()
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f" (likely cause: it draws from {shown}, an iterator that no copy or stand-in takes the place of while the "
        "runs that establish the decision run, so each run draws on from it and gets other items. Draw from a "
        "random stream (a torch.Generator the module holds), or an iterator of Python's own (iter(a_list), "
        "itertools.cycle), which the runs give back in step, or precompute the values into a buffer)"
    )


def _flat_copy(flat: Any, index: int) -> Any:
    """A flat iterator over the same array as numpy's ``flat``, at ``index``: it gives the very items ``flat`` gives
    from there, with the same public attributes, and leaves ``flat`` where it stands as it is drawn from."""
    out = flat.base.flat
    collections.deque(itertools.islice(out, index), maxlen=0)
    return out


def _unstood_holder(v: Any) -> bool:
    """Is ``v`` an iterator of the user's class with a ``__dict__`` of its own (see :func:`_unstood`), whose attributes
    may hold an iterator of Python's it draws from (``self.src = iter(items)``)?"""
    return _unstood(v) and type(getattr(v, "__dict__", None)) is dict


def _kept_values(
    attrs: list[tuple[nn.Module, dict[str, tuple[Any, Any]]]], wanted: Callable[[Any], bool]
) -> list[tuple[dict[str, Any], str, Any]]:
    """The values ``wanted`` picks held by the attributes of plain objects the modules keep (and of the iterators of
    the user's class they hold: :func:`_unstood_holder`), a few objects deep, each object once, as ``(the object's
    dict, the attribute, the value)`` (see :func:`_kept_iterators`)."""
    out: list[tuple[dict[str, Any], str, Any]] = []
    seen: set[int] = set()
    todo = [(v, 1) for _, values in attrs for v, _ in values.values() if _plain_object(v) or _unstood_holder(v)]
    while todo and len(seen) < _KEPT_OBJECTS:
        obj, depth = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        space = vars(obj)
        for k, v in list(space.items()):
            if not isinstance(k, str):
                continue
            if wanted(v):
                out.append((space, k, v))
            elif depth < _KEPT_DEPTH and _plain_object(v):
                todo.append((v, depth + 1))
    return out


class _Tape:
    """What runs that establish a decision drew from one iterator and no forward after them was given yet: each item
    with the value ``send()`` passed for it (None for ``next()``), in the order drawn. One per iterator, however many
    attributes or globals hold it (two routers that draw from one shared stream draw from one sequence), kept while
    an item waits. ``running`` counts the snapshots whose runs run now (one inside another's forward too), ``at`` is
    where the run that runs now reads."""

    __slots__ = ("__weakref__", "at", "homes", "items", "modules", "replica", "running", "source")

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        #: the modules whose runs stood in for it (weakly): a session's detach gives back those of its model's
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.items: list[tuple[Any, Any]] = []
        #: a copy of the source made where the forwards stand, which the runs draw from instead of the source (see
        #: :func:`_replica`); None where the source cannot be copied (a generator): the runs then draw from it
        self.replica: Iterator[Any] | None = None
        self.homes: list[tuple[_Home, Any]] = []
        self.at = 0
        self.running = 0

    def hold(self, home: _Home, key: Any) -> None:
        """Note ``home[key]`` as a place that holds the iterator (given back there once no item waits)."""
        if not any(h is home and k == key for h, k in self.homes):
            self.homes.append((home, key))

    def settle(self) -> None:
        """The runs are over and drew from a replica, never from the source: what they drew is not kept, and every
        place that holds a stand-in holds the source again, where the forwards stand (no more drawn from it than
        they drew)."""
        self.items.clear()
        self.replica = None
        self.hand_back()

    def catch_up(self) -> None:
        """Give the replica up in the middle of the runs (a ``map``'s met an item that is not a plain value, see
        :class:`_Pure`): the source is drawn from as the replica was, so that it stands where the runs do and the items
        they drew are the source's own (the same values: the replica's function is pure on the plain values it was
        called on), kept for the forwards after them as for an iterator that cannot be copied."""
        self.replica = None
        self.items[:] = [(value, next(self.source)) for value, _ in self.items]

    def hand_back(self) -> None:
        """Every place that holds a stand-in of this tape holds the iterator itself again."""
        for home, key in self.homes:
            held = _held_at(home, key)
            if isinstance(held, _Redrawn) and held.tape is self:
                _put_at(home, key, self.source)
        self.homes.clear()


#: iterators of data alone, which a shallow copy replicates (the same items, in the same order, from the same place)
_SHALLOW_COPIED = (
    *{type(it) for it in (iter([]), iter(()), iter(range(1)), iter(range(2**64)), iter(""), iter(b""))},
    type(reversed([])),
    type(iter(collections.deque())),
    type(reversed(collections.deque())),
    itertools.count,
    itertools.repeat,
)


#: iterators over other iterators that draw nothing else (no function of the user's is called): rebuilt from their
#: ``__reduce__`` over replicas of the iterators they draw from
_REBUILT = (zip, enumerate, itertools.islice)
#: how deep iterators over iterators are replicated
_REPLICA_DEPTH = 4

#: functions a ``map`` may call on a replica's items as well as on the source's: Python's own, which run no code of
#: the user's on plain values (see :data:`_PLAIN_VALUES`), draw nothing and change nothing
_PURE_FUNCTIONS: frozenset[Any] = frozenset(
    {int, float, complex, bool, str, bytes, abs, round, divmod, pow, ord, chr, hex, oct, bin, repr, ascii}
    | {getattr(math, n) for n in dir(math) if callable(getattr(math, n)) and not n.startswith("_")}
    | {
        getattr(operator, n)
        for n in (
            "abs add and_ eq floordiv ge gt index inv invert le lshift lt mod mul ne neg not_ or_ pos pow rshift sub "
            "truediv truth xor"
        ).split()
    }
)
#: the items a pure function of a ``map``'s replica is called on (a tuple of them too): values whose conversions and
#: arithmetic run no code of the user's
_PLAIN_VALUES = (int, float, complex, bool, str, bytes, type(None))


class _NotPlain(Exception):
    """A ``map``'s replica met an item that is not a plain value: calling the function on it may run the user's code
    (a ``__float__`` that counts), so the replica is given up (see :meth:`_Tape.catch_up`)."""


class _Pure:
    """A function of :data:`_PURE_FUNCTIONS` as a ``map``'s replica calls it: on plain values only (see
    :data:`_PLAIN_VALUES`), else :class:`_NotPlain` before any call."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        if not all(_plain_value(a) for a in args):
            raise _NotPlain
        return self.fn(*args)


def _plain_value(v: Any) -> bool:
    """A value of :data:`_PLAIN_VALUES`' exact types, or a tuple of them (a ``zip``'s item)."""
    if type(v) is tuple:
        return all(type(a) in _PLAIN_VALUES for a in v)
    return type(v) in _PLAIN_VALUES


def _replica(source: Any, depth: int = 0, memo: dict[int, Any] | None = None) -> Iterator[Any] | None:
    """A copy of iterator ``source`` that gives the very items it would give from now on, and leaves it where it
    stands as the copy is drawn from: for iterators over data alone (a list's, a range's, ``count``, ``repeat``), and
    ``cycle``, ``zip``, ``enumerate`` and ``islice`` of such iterators (an iterator they draw from twice, as
    ``zip(it, it)`` does, replicated once: ``memo``). None for anything else (a generator, ``map`` of a function
    that may draw or count): the runs then draw from the source itself, and a stand-in gives what they drew to the
    forwards after them."""
    memo = {} if memo is None else memo
    if id(source) in memo:
        return cast(Iterator[Any], memo[id(source)])
    out: Any = None
    if type(source) in _SHALLOW_COPIED:
        try:
            out = copy.copy(source)  # (over the same data, from the same place)
        except Exception:  # (a copy refused: no replica)
            return None
    elif type(source) in (itertools.cycle, map, *_REBUILT) and depth < _REPLICA_DEPTH:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (their state, read as a copy reads it)
            try:
                out = _rebuilt(source, depth, memo)
            except Exception:  # (a Python that keeps their state otherwise: no replica)
                return None
    if out is not None:
        memo[id(source)] = out
    return cast("Iterator[Any] | None", out)


def _pure_function(fn: Any) -> bool:
    """Is ``fn`` one of :data:`_PURE_FUNCTIONS` (by identity: a user's object that compares equal is not)?"""
    return any(fn is f for f in _PURE_FUNCTIONS)


def _rebuilt(source: Any, depth: int, memo: dict[int, Any]) -> Any:
    """A ``cycle``, ``zip``, ``enumerate`` or ``islice`` made again from its ``__reduce__``, over replicas of the
    iterators it draws from (see :func:`_replica`); None where one of those has none."""
    reduced: Any = source.__reduce__()
    made, args = reduced[0], reduced[1]
    if made is not type(source):
        return None
    if made is itertools.cycle:
        (inner,), (saved, firstpass) = args, reduced[2]
        inner = _replica(inner, depth + 1, memo)
        if inner is None:
            return None
        out: Any = itertools.cycle(inner)
        out.__setstate__((list(saved), firstpass))
        return out
    given: list[Any] = []
    if made is map:  # (a known function over replicas: called on plain values only, see _Pure)
        fn, *args = args
        if not _pure_function(fn):
            return None
        given.append(_Pure(fn))
    for arg in args:
        if isinstance(arg, Iterator):
            arg = _replica(arg, depth + 1, memo)
            if arg is None:
                return None
        given.append(arg)
    out = made(*given)
    if len(reduced) > 2 and reduced[2] is not None:
        out.__setstate__(reduced[2])
    return out


#: the tape of each iterator an item of which waits, by the iterator's id (its tape holds it, so the id is its own)
_TAPES: weakref.WeakValueDictionary[int, _Tape] = weakref.WeakValueDictionary()


def _tape_of(v: Any) -> _Tape:
    """The tape of iterator ``v``: a stand-in's, the one of the iterator it is (where another place's stand-in keeps
    items of it), or a new one."""
    if isinstance(v, _Redrawn):
        return v.tape
    tape = _TAPES.get(id(v))
    if tape is None or tape.source is not v:
        tape = _TAPES[id(v)] = _Tape(v)
    return tape


def _same_sent(a: Any, b: Any) -> bool:
    """Were ``a`` and ``b`` (values passed to a generator's ``send()``) the same? Tensors by value; anything whose
    comparison fails or gives no plain truth value counts as other."""
    if a is b:
        return True
    try:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        same = a == b
        return same if isinstance(same, bool) else False
    except Exception:  # (a comparison that raises: not known to be the same)
        return False


def _drawn_from(it: Any, value: Any, sent: bool) -> Any:
    """The next item of iterator ``it`` (for ``value``, where ``sent`` and not None, as ``send()`` gives it), drawn for
    the forward: what it raises, its end among them, is the forward's own (see ``_faults.raised_inside``)."""
    return forwards_call(_next_item, (it, value, sent), {})


def _next_item(it: Any, value: Any, sent: bool) -> Any:
    """``it.send(value)`` where ``sent`` and ``value`` is not None, else ``next(it)``."""
    return it.send(value) if sent and value is not None else next(it)


class _Redrawn:
    """Stands in a module's attribute (or a global) for an iterator the module holds (``self.noise_iter``, an
    ``itertools.cycle`` of seeds), which no state can be read from and put back as a random stream's is.

    While the runs of a snapshot run, every run draws first what the runs before it drew (its :class:`_Tape`, from
    where the forward the runs are made in stands), then on from the iterator, keeping what it draws. Put back after
    them, it gives the forwards that follow what the runs drew, in order, then hands every place that holds it the
    iterator back: the model's forwards see the very items they would have seen with no run made, and the iterator
    itself afterwards. A generator driven with ``send()`` gets an item again only for the value it was drawn for;
    another value is refused, as what the generator gives for it cannot be known without the draw the runs made."""

    __slots__ = ("home", "key", "tape")

    def __init__(self, tape: _Tape, home: _Home, key: Any):
        self.tape, self.home, self.key = tape, home, key
        tape.hold(home, key)

    def __iter__(self) -> _Redrawn:
        return self

    @inside_forward
    def __next__(self) -> Any:
        try:
            return self._draw(None, sent=False)
        except Exception as e:  # (its own error or refusal inside a run: noted, whatever the forward does with it)
            note_fault(e)
            raise

    @inside_forward
    def send(self, value: Any) -> Any:
        """The next item for ``value``, as a generator's ``send()`` gives it (``None``: as ``next()``)."""
        try:
            return self._draw(value, sent=True)
        except Exception as e:  # (its own error or refusal inside a run: noted, whatever the forward does with it)
            note_fault(e)
            raise

    def _draw(self, value: Any, *, sent: bool) -> Any:
        tape = self.tape
        if tape.running:
            if tape.at < len(tape.items):
                item = self._again(tape.items[tape.at], value)
            else:
                if not tape.items and tape.replica is None:  # (no item waits: the source stands where forwards do)
                    tape.replica = _replica(tape.source)
                item = self._from_source(value, sent)  # (the end of a finite one ends the run, as the forward's)
                tape.items.append((value, item))
            tape.at += 1
            return item
        if tape.replica is not None:  # (the runs drew from a replica: the source stands where the forwards do)
            tape.settle()
        if not tape.items:
            tape.hand_back()
            return self._from_source(value, sent)
        item = self._again(tape.items.pop(0), value)
        if not tape.items:
            tape.hand_back()
        return item

    @inside_forward
    def close(self) -> None:
        """Close the iterator as a generator's ``close()`` does: the items the runs drew that no forward was given
        yet are let go (a closed generator gives none), every place holds the iterator itself again, and it is
        closed where it can be."""
        try:
            self._close()
        except Exception as e:  # (its own error or refusal inside a run: noted, whatever the forward does with it)
            note_fault(e)
            raise

    def _close(self) -> None:
        """:meth:`close`'s work."""
        tape = self.tape
        if tape.running:
            raise UnsupportedRouterError(
                f"'{self.key}' is closed inside a forward whose router's decision is being established: the runs that "
                "establish it run the forward again and need the same items. Close the iterator outside the forward"
            )
        source: Any = tape.source
        # (an iterator with no close(), one of a list: its own AttributeError, nothing changed)
        closing = forwards_call(getattr, (source, "close"), {})
        tape.items.clear()
        tape.hand_back()
        forwards_call(closing, (), {})

    @inside_forward
    def throw(self, *args: Any) -> Any:
        """Throw into the iterator as a generator's ``throw()`` does, where no item the runs drew waits (the
        generator is where the model's forwards left it); refused where one does, as the generator stands past the
        point a forward without the runs would throw into, and what it gives there cannot be known."""
        try:
            return self._throw(args)
        except Exception as e:  # (its own error or refusal inside a run: noted, whatever the forward does with it)
            note_fault(e)
            raise

    def _throw(self, args: tuple[Any, ...]) -> Any:
        """:meth:`throw`'s work."""
        tape = self.tape
        if tape.running or tape.items:
            raise UnsupportedRouterError(
                f"'{self.key}' is a generator thrown into while items the runs that establish a router's decision "
                "drew from it wait for the forwards that follow: the generator stands past the point the model's own "
                "forwards reached, so what it gives for the throw cannot be known. Throw into it once those items "
                "were drawn (or draw with next() only), or keep the state it carries in an attribute or buffer of the "
                "router"
            )
        source: Any = tape.source
        # (an iterator with no throw(): its own AttributeError, nothing changed)
        throwing = forwards_call(getattr, (source, "throw"), {})
        tape.hand_back()
        return forwards_call(throwing, args, {})

    def _from_source(self, value: Any, sent: bool) -> Any:
        tape = self.tape
        if tape.running and tape.replica is not None:
            replica: Any = tape.replica
            try:  # (what the copy raises, the end of the items among them, the source would raise: the forward's)
                return _drawn_from(replica, value, sent)
            except _NotPlain:  # (a map's replica met an item its function may run the user's code on)
                tape.catch_up()
        source: Any = tape.source
        # (the source's own items and errors, its end among them: the forward's, as it would draw them unwatched)
        return _drawn_from(source, value, sent)

    def _again(self, drawn: tuple[Any, Any], value: Any) -> Any:
        if not _same_sent(drawn[0], value):
            raise UnsupportedRouterError(
                f"'{self.key}' is a generator driven with send(): the runs that establish a router's decision drew "
                f"an item from it for {drawn[0]!r:.40}, and a forward now sends {value!r:.40}; what the generator "
                "gives for that value cannot be known without the draw those runs made. Send it values that do not "
                "change between a forward and its runs (or draw with next()), or keep the state it carries in an "
                "attribute or buffer of the router"
            )
        return drawn[1]


class _Primed:
    """Iterator ``source`` with one item drawn from it already, given first: what ``yield from`` delegates to once
    the items the runs drew are given (``send()``, ``throw()`` and ``close()`` reach the source itself)."""

    __slots__ = ("first", "source")

    def __init__(self, first: Any, source: Any) -> None:
        self.first, self.source = [first], source

    def __iter__(self) -> _Primed:
        return self

    def __next__(self) -> Any:
        return self.first.pop() if self.first else next(self.source)

    def send(self, value: Any) -> Any:
        if self.first:
            return self.first.pop()
        return self.source.send(value) if value is not None else next(self.source)

    def throw(self, *args: Any) -> Any:
        return self.source.throw(*args)

    def close(self) -> None:
        closing = getattr(self.source, "close", None)
        if closing is not None:
            closing()


def _rest_of(items: list[tuple[Any, Any]], source: Any, key: Any) -> Generator[Any, Any, Any]:
    """A generator that gives the items the runs drew from ``source`` and no forward was given (each for the value
    it was drawn for, as :class:`_Redrawn` gives them), then the source's own from where it stands: what the source
    would give a model whose forwards made no run. ``close()`` closes the source too; ``throw()`` while an item
    waits is refused, as :meth:`_Redrawn.throw` refuses it. Started at once by its maker (it first gives None), so a
    throw before its first item is refused too: a generator not started would raise it without running a line."""
    sent: Any = None
    started = False
    for value, item in [(None, None), *items]:
        if started and not _same_sent(value, sent):
            raise UnsupportedRouterError(
                f"'{key}' is a generator driven with send(): the runs that establish a router's decision drew an "
                f"item from it for {value!r:.40}, and the model now sends {sent!r:.40}; what the generator gives for "
                "that value cannot be known without the draw those runs made. Send it values that do not change "
                "between a forward and its runs (or draw with next())"
            )
        try:
            sent = yield item
        except GeneratorExit:  # (close(): the source is closed too, as a closed generator gives nothing more)
            closing = getattr(source, "close", None)
            if closing is not None:
                closing()
            raise
        except BaseException:
            raise UnsupportedRouterError(
                f"'{key}' is a generator thrown into while items the runs that establish a router's decision drew "
                "from it wait: the generator stands past the point the model's own forwards reached, so what it "
                "gives for the throw cannot be known. Throw into it once those items were drawn (or draw with "
                "next() only)"
            ) from None
        started = True
    try:
        first = next(source) if sent is None else source.send(sent)
    except StopIteration as stop:
        return stop.value
    return (yield from _Primed(first, source))


def give_back_iterators(modules: list[nn.Module]) -> list[str]:
    """Every place that holds a stand-in (:class:`_Redrawn`) for an iterator the runs of ``modules`` drew from holds
    the iterator itself again, where no item the runs drew waits for a forward. Where one waits (a generator, which
    cannot be copied, drawn from more by the runs than by the forwards), it holds a generator that gives the waiting
    items and then the iterator's own: the same items the plain model would draw, in another object. Returns the
    names of the places given such a generator (empty where every place holds the user's own iterator)."""
    mine = {id(m) for m in modules}
    given: list[str] = []
    for tape in list(_TAPES.values()):
        if tape.running or not any(id(m) in mine for m in list(tape.modules)):
            continue
        if tape.replica is not None:  # (the runs drew from a replica: the source stands where the forwards do)
            tape.settle()
        if not tape.items:
            tape.hand_back()
            continue
        homes = [
            (home, key)
            for home, key in tape.homes
            if isinstance(held := _held_at(home, key), _Redrawn) and held.tape is tape
        ]
        rest = _rest_of(list(tape.items), tape.source, homes[0][1] if homes else "")
        next(rest)  # (started: see _rest_of)
        for home, key in homes:
            _put_at(home, key, rest)
            given.append(str(key))
        tape.items.clear()
        tape.homes.clear()
    return given


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter; None for an inference tensor, which keeps none (made under inference_mode)."""
    return None if t.is_inference() else t._version


def _attr_tensors(v: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors an attribute holds: itself, or the items of a list, tuple or dict (nested a little)."""
    if isinstance(v, torch.Tensor):
        yield v
    elif depth < 2 and isinstance(v, list | tuple):
        for item in v:
            yield from _attr_tensors(item, depth + 1)
    elif depth < 2 and isinstance(v, dict):
        for item in v.values():
            yield from _attr_tensors(item, depth + 1)


class _HostStream:
    """A random stream of the host's that is not torch's (``random.Random``, a numpy ``Generator`` or
    ``RandomState``: see :func:`~moe_replay._code_settings.is_host_stream`), read, put back, compared and seeded as
    :class:`_Snapshot` does a ``torch.Generator``."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def state(self) -> Any:
        s = self.stream
        if isinstance(s, random.Random):
            return s.getstate()
        return _copy_state(s.bit_generator.state if isinstance(s, np.random.Generator) else s.get_state())

    def put(self, state: Any) -> None:
        s = self.stream
        if isinstance(s, random.Random):
            s.setstate(state)
        elif isinstance(s, np.random.Generator):
            s.bit_generator.state = state
        else:
            s.set_state(state)

    def holds(self, state: Any) -> bool:
        """Is the stream at ``state`` still (no run drew from it)?"""
        return _same_state(self.state(), state)

    def seed(self, seed: int) -> None:
        s = self.stream
        if isinstance(s, np.random.Generator):
            s.bit_generator.state = type(s.bit_generator)(seed).state
        else:
            s.seed(seed)


def _copy_state(state: Any) -> Any:
    """A copy of a numpy stream's state (its arrays copied: the stream may write them in place)."""
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, tuple | list):
        return type(state)(_copy_state(v) for v in state)
    return state.copy() if isinstance(state, np.ndarray) else state


def _same_state(a: Any, b: Any) -> bool:
    """Are two states of a stream (nested dicts, tuples and arrays, as numpy gives them) equal?"""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class _Snapshot:
    """What a probe run could change in the scope, put back after each run.

    The global and CUDA random state, every generator a module holds (a ``torch.Generator``, or the host's
    ``random.Random`` or numpy stream: :class:`_HostStream`; or its code reads, or a probe run
    is handed: :meth:`note_generator`), the buffers and small
    parameters (in place, as a forward may update a balancing bias), the plain attributes
    of every module in the scope (step counters, cached statistics), and what their code
    changes outside them (a global step count, a warn-once registry: ``OutsideState``). While a probe runs, the
    forward hooks of the scope's submodules are set aside, so that user hooks (utilisation
    counters, loggers) see one forward, not the probe runs.
    """

    def __init__(self, scope: nn.Module, *, runs: str = "a forward of this router") -> None:
        self.runs = runs  # (what the runs put back are, as a refusal names them)
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        self.py_random, self.np_random = random.getstate(), np.random.get_state()
        self.modules = list(scope.modules())
        #: the user's hooks of the submodules run in the probe runs (see :data:`HOOKS_NEEDED`); only moe_replay's own
        #: are set aside
        self.hooks_in = scope in HOOKS_NEEDED
        self.held: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = [
            (m, dict(m._buffers), dict(m._parameters)) for m in self.modules
        ]  # rebinding, too
        self.tensors = [(b, b.detach().clone(), _version(b)) for b in scope.buffers()]
        #: tensors held by the forward's inputs that runs are handed as they are (see :meth:`hold_inputs`)
        self.inputs_held: list[tuple[torch.Tensor, torch.Tensor, int | None]] = []
        self.big: list[tuple[torch.Tensor, int | None]] = []
        for p in scope.parameters():
            if p.numel() <= _COPY_LIMIT:
                self.tensors.append((p, p.detach().clone(), _version(p)))
            else:
                self.big.append((p, _version(p)))
        #: each module's attributes: (the object, a shallow copy of a list, dict or set's contents)
        self.attrs = [
            (m, {k: (v, _shallow(v)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS}) for m in self.modules
        ]
        held = {id(t) for t, _, _ in self.tensors}
        budget = _COPY_LIMIT  # (a list of past logits kept for logging is watched, not copied)
        for _, attrs in self.attrs:  # tensors kept as plain attributes (statistics updated in place),
            for v, _ in attrs.values():  # also inside a dict or list attribute (OLMo-core's BufferCache)
                for t in _attr_tensors(v):
                    if id(t) in held:
                        continue
                    held.add(id(t))
                    if t.numel() <= budget:
                        budget -= t.numel()
                        self.tensors.append((t, t.detach().clone(), _version(t)))
                    else:
                        self.big.append((t, _version(t)))
        #: the plain iterators the modules hold and the globals their code names hold (see :class:`_Redrawn`): the
        #: namespace (or the dict or list an attribute holds) holding each, its key there, and the iterator's tape
        self.iterators: list[tuple[_Home, Any, _Tape]] = [
            (home, k, _tape_of(v))
            for m, attrs in self.attrs
            for home, k, v in _homes_in(m, attrs)
            if _plain_iterator(v)
        ]
        self.iterators += _kept_iterators(self.attrs)
        self.iterators += [
            (space, name, _tape_of(v))
            for space, name in named_places(self.modules)
            if _plain_iterator(v := space.get(name))
        ]
        #: numpy's flat iterators the modules hold (``array.flat``), which no stand-in takes the place of (their
        #: ``index``, ``coords`` and ``base`` are public): each run draws from a copy made where the forwards stand,
        #: and every place holds the iterator itself again once the runs are put back (see :func:`_flat_copy`)
        self.flats: list[tuple[_Home, Any, Any, int]] = [
            (home, k, v, int(v.index))
            for m, attrs in self.attrs
            for home, k, v in _homes_in(m, attrs)
            if isinstance(v, np.flatiter)
        ]
        self.flats += [(space, k, v, int(v.index)) for space, k, v in _kept_values(self.attrs, _is_flat)]
        self.flats += [
            (space, name, v, int(v.index))
            for space, name in named_places(self.modules)
            if isinstance(v := space.get(name), np.flatiter)
        ]
        #: the iterators of the user's class the modules hold, which no stand-in takes the place of, that keep their
        #: state in their own ``__dict__`` or slots (a counter, a position in a list): that state, put back after
        #: each run as a module's plain attributes are (see :func:`_own_state`), so each run draws what the forward
        #: would
        own = {
            id(v): v
            for _, _, v in [
                *(x for m, attrs in self.attrs for x in _homes_in(m, attrs)),
                *_kept_values(self.attrs, _unstood),
                *((space, name, space.get(name)) for space, name in named_places(self.modules)),
            ]
            if _unstood(v) and _stateful(v)
        }
        #: the plain objects of the user's the modules hold (a routing-replay buffer whose list each forward appends
        #: to, an executor that keeps its last result, a config whose step moves): their own attributes put back after
        #: each run as a module's are, so that a run leaves no entry a later forward would read as the forward's
        for _, _, v in (x for m, attrs in self.attrs for x in _homes_in(m, attrs)):
            if _plain_object(v):
                own.setdefault(id(v), v)
        # (and those the globals their code names hold: a progress bar a forward moves, a counter object; not those
        # of the standard library's classes, process-wide machinery other threads share: a logger, an executor)
        for space, name in named_places(self.modules):
            if _plain_object(v := space.get(name)) and not _standard(type(v)):
                own.setdefault(id(v), v)
        # (and the plain objects they keep their state in, a few deep: a counter object, a config whose step moves)
        kept_objects = _with_kept_objects(list(own.values()))
        #: the containers held inside the attributes of the modules and of the objects put back, a few deep (a dict of
        #: lists each forward appends to), their contents put back in place after each run as the attributes' are, and
        #: the plain objects held inside those containers (a buffer's per-layer logs in a list), put back as the others
        deeper, self.nested = _held_within((v for _, attrs in self.attrs for v, _ in attrs.values()), kept_objects)
        kept_ids = {id(v) for v in kept_objects}
        kept_objects += [v for v in deeper if id(v) not in kept_ids]
        self.own_states = [(obj, _own_state(obj)) for obj in kept_objects]
        #: the open file objects the modules hold that can be written and sought (a log opened at ``__init__``, an
        #: ``io.StringIO``), and those reached from their attributes and the places their code names (a log kept in a
        #: registry dict, or in a closure): where each stands is put back as each run ends (see
        #: :func:`files_as_they_were` and :func:`reachable_files`)
        files = {
            id(v): v
            for _, _, v in [
                *(x for m, attrs in self.attrs for x in _homes_in(m, attrs)),
                *_kept_values(self.attrs, writable_file),
                *((space, name, space.get(name)) for space, name in named_places(self.modules)),
            ]
            if writable_file(v)
        }
        roots = [v for _, attrs in self.attrs for v, _ in attrs.values()]
        for v in reachable_files([*roots, *(space.get(name) for space, name in named_places(self.modules))]):
            files.setdefault(id(v), v)
        self.files = list(files.values())
        #: where each tape's runs begin: where the run of another snapshot these runs are made inside stands
        self.starts = {id(tape): tape.at for _, _, tape in self.iterators if tape.running}
        #: the generators the modules hold, and those their code reads outside them (a class's, a global)
        held_generators = {
            id(g): g for m in self.modules for g in vars(m).values() if is_generator(g) or is_host_stream(g)
        }
        for g in code_generators(self.modules):
            held_generators.setdefault(id(g), g)
        for _, (attrs, slots) in self.own_states:  # (a random stream an iterator of the user's class draws from:
            for g, _ in itertools.chain(attrs.values(), slots.values()):  # its state moves inside the object put back)
                if is_generator(g) or is_host_stream(g):
                    held_generators.setdefault(id(g), g)
        self.generators = [(g, g.get_state()) for g in held_generators.values() if is_generator(g)]
        #: the host's other random streams they hold or read (``random.Random``, numpy's): see :class:`_HostStream`
        self.streams = [
            (h, h.state()) for g in held_generators.values() if not is_generator(g) for h in (_HostStream(g),)
        ]
        self._generator_ids = set(held_generators)
        #: what the modules' code changes outside them (a step count in a global, a warn-once registry)
        self.outside = OutsideState(self.modules)
        #: a norm's running statistics, which its kernel updates in place without a new version: put back by value
        self.by_value = {
            id(t)
            for m in self.modules
            if getattr(m, "track_running_stats", False) is True
            for t in (dict(m._buffers).get("running_mean"), dict(m._buffers).get("running_var"))
            if isinstance(t, torch.Tensor)
        }

    def hold_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Put back, after each run, the state a forward's inputs hold where a run is handed them as they are, not
        copied (see :func:`_clone`): the plain objects of the user's among them (a dataclass of statistics each layer
        adds to in place, handed from layer to layer) and the named tuples, a few objects deep: the tensors they hold
        (up to what is copied of the modules' own), and the objects' own attributes. Without it, every run of the
        forward adds once more to what the model reads after the layer (its loss's load term), and the forward's
        output is not the model's."""
        found = _passed_through((args, kwargs))
        if not found:
            return
        kept = {id(o) for o, _ in self.own_states}
        objects = [o for o in _with_kept_objects([v for v in found if _held_object(v)]) if id(o) not in kept]
        self.own_states += [(o, _own_state(o)) for o in objects]
        held = {id(t) for t, _, _ in itertools.chain(self.tensors, self.inputs_held)}
        budget = _COPY_LIMIT - sum(v.numel() for _, v, _ in self.inputs_held)
        values: list[Any] = [v for v in found if not _held_object(v)]  # (the named tuples' fields)
        for o in objects:
            own, slots = _own_state(o)
            values += [v for v, _ in itertools.chain(own.values(), slots.values())]
        for value in values:
            for t in _attr_tensors(value):
                if id(t) in held or t.numel() > budget:  # (a larger one, a KV cache's, say, stays as before)
                    continue
                held.add(id(t))
                budget -= t.numel()
                self.inputs_held.append((t, t.detach().clone(), _version(t)))

    def _put_tensors(self, tensors: list[tuple[torch.Tensor, torch.Tensor, int | None]]) -> None:
        """Each of ``tensors`` that a run wrote (its version moved, or its value where the kernel keeps no version)
        put back in place to the copy taken before the runs."""
        with torch.no_grad():
            for i, (t, v, version) in enumerate(tensors):
                if version is None:  # an inference tensor: changed in place only under inference_mode, by value
                    if torch.is_inference_mode_enabled() and t.shape == v.shape and not torch.equal(t, v):
                        t.copy_(v)
                    continue
                with _metadata_reads((t,)):  # (a read of metadata alone: not handed to the modes below)
                    written = t._version != version
                if written and t.shape == v.shape:  # only what a run changed: no needless bump
                    t.copy_(v)
                    tensors[i] = (t, v, t._version)
                elif id(t) in self.by_value and t.shape == v.shape and not torch.equal(t, v):
                    t.data.copy_(v)  # (as the kernel wrote it: no new version, which a graph that saved it would see)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.py_random)
        np.random.set_state(self.np_random)
        for m, buffers, params in self.held:
            for now, then in ((m._buffers, buffers), (m._parameters, params)):
                if not isinstance(now, dict):  # a TorchScript module's (a view of its slots: none are rebound)
                    continue
                if len(now) != len(then) or not _same_entries(now, then):
                    now.clear()
                    now.update(then)
        for g, state in self.generators:
            g.set_state(state)
        for h, state in self.streams:
            h.put(state)
        self._put_tensors(self.tensors)
        self._put_tensors(self.inputs_held)
        self.outside.restore()
        for m, attrs in self.attrs:
            if vars(m).keys() - attrs.keys() - _MODULE_INTERNALS:  # (attributes a run added: taken off, in order)
                for k in [k for k in vars(m) if k not in attrs and k not in _MODULE_INTERNALS]:
                    delattr(m, k)
            for k, (v, contents) in attrs.items():
                if contents is not None:
                    _refill(v, contents)
                m.__dict__[k] = v
        for obj, state in self.own_states:
            _put_own_state(obj, state)
        for container, contents in self.nested:
            refill_container(container, contents)
        for home, k, flat, _ in self.flats:  # (the runs drew from copies: the iterator itself stands untouched)
            _put_at(home, k, flat)
        for home, k, tape in self.iterators:  # (what the runs drew, given to the forwards that follow first)
            if tape.replica is not None and not tape.running:  # (drawn from a replica: the source itself is in step)
                tape.settle()
            _put_at(home, k, _Redrawn(tape, home, k) if tape.items or tape.running else tape.source)
        changed = [p for p, version in self.big if version is not None and p._version != version]
        changed += self.outside.unrestorable()
        if changed:
            raise UnsupportedRouterError(
                f"{self.runs} changes a tensor of {tuple(changed[0].shape)} in place (a large parameter, one of "
                "many tensors it keeps in attributes, or a very large one outside the model); moe_replay does not "
                "copy such tensors and cannot put it back after the runs that establish the decision. Keep such "
                "state in a buffer"
            )

    @contextlib.contextmanager
    def drawn_again(self) -> Iterator[None]:
        """Runs in the block draw from the iterators the modules hold through a :class:`_Redrawn` each, which keeps
        what they draw for the forwards after them (each run draws the same, from where the forward stands that the
        runs are made in: the first item no forward was given, or where another snapshot's run stands)."""
        tapes = list({id(tape): tape for _, _, tape in self.iterators}.values())
        for home, k, tape in self.iterators:
            _put_at(home, k, _Redrawn(tape, home, k))
        for home, k, flat, index in self.flats:
            _put_at(home, k, _flat_copy(flat, index))
        for tape in tapes:
            tape.modules.update(self.modules)
            tape.at = self.starts.get(id(tape), 0)  # (each run draws from where the forward it is made in stands)
            tape.running += 1
        try:
            yield
        finally:
            for tape in tapes:
                tape.at = self.starts.get(id(tape), 0)  # (the forward they were made in goes on from there)
                tape.running -= 1

    def unstood(self) -> list[str]:
        """The iterators the modules hold (in their attributes, one level into the lists and dicts those hold, in
        plain objects they keep) or their code names outside them that no stand-in took the place of in the runs
        (an iterator of the user's class, a file: see :func:`_plain_iterator`), as ``'name' (a Kind held by
        Module)``: what each run drew on from, where the runs differ."""
        out: list[str] = []
        for m, attrs in self.attrs:
            for _, k, v in _homes_in(m, attrs):
                if _unstood(v):
                    out.append(f"'{k}' (a {type(v).__name__} held by {type(m).__name__})")
        out += [
            f"'{k}' (a {type(v).__name__} in an object a module keeps)"
            for _, k, v in _kept_values(self.attrs, _unstood)
        ]
        out += [
            f"'{name}' (a {type(v).__name__} the code reads outside the modules)"
            for space, name in named_places(self.modules)
            if _unstood(v := space.get(name))
        ]
        return list(dict.fromkeys(out))

    def drew(self) -> bool:
        """Has a run since the last :meth:`restore` drawn from a random stream the snapshot puts back?"""
        if not torch.equal(torch.get_rng_state(), self.cpu) or random.getstate() != self.py_random:
            return True
        if self.cuda is not None and any(
            not torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), self.cuda, strict=True)
        ):
            return True
        np_now: Any = np.random.get_state()
        np_then: Any = self.np_random
        if np_now[0] != np_then[0] or not np.array_equal(np_now[1], np_then[1]) or np_now[2:] != np_then[2:]:
            return True
        if any(not h.holds(state) for h, state in self.streams):
            return True
        return any(not torch.equal(g.get_state(), state) for g, state in self.generators)

    def note_generator(self, generator: torch.Generator) -> None:
        """A generator a run is handed (``torch.rand(..., generator=g)``) that the snapshot does not hold yet (one
        reached through a container or a call that reading the code does not follow), as it is before that run draws
        from it: put back, compared and reseeded with the others from now on."""
        if id(generator) not in self._generator_ids:
            self._generator_ids.add(id(generator))
            self.generators.append((generator, generator.get_state()))

    def reseed(self, seed: int) -> None:
        """Every random stream the snapshot puts back set to another state (``seed``), until the next restore."""
        torch.default_generator.manual_seed(seed)  # (not torch.manual_seed: it queues a seed for a CUDA not started)
        if self.cuda is not None:
            torch.cuda.manual_seed_all(seed)
        random.seed(seed)
        np.random.seed(seed)
        for g, _ in self.generators:
            g.manual_seed(seed)
        for h, _ in self.streams:
            h.seed(seed)

    def small_state(self, width: int) -> list[torch.Tensor]:
        """The floating tensors of at most ``width`` elements (one per expert, or one) that the scope holds and a
        run may write: a threshold, a per-expert minimum or scale, state that training or a schedule moves. Not a
        plain tensor of one element that takes no gradient: the code that reads one reads a setting, compared at
        every block (a change establishes the decision again: see :mod:`moe_replay._code_settings`)."""
        return [
            t
            for t, _, version in self.tensors
            if version is not None
            and t.is_floating_point()
            and t.numel() in (1, width)
            and not (type(t) is torch.Tensor and t.numel() == 1 and not t.requires_grad)
        ]

    def move_small(self, seed: int, width: int) -> None:
        """The tensors of :meth:`small_state` set to random values in ``[0, 1)`` (drawn from their own generator:
        the random streams the forward reads are not touched), until the next restore."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in self.small_state(width):
                t.copy_(torch.rand(t.shape, generator=g).to(t))

    @contextlib.contextmanager
    def hooks_aside(self) -> Iterator[None]:
        """The forward hooks of the scope's submodules are not called during a probe run (where the forward is shown
        to depend on them, :data:`HOOKS_NEEDED`, moe_replay's own alone are not), and hooks registered during
        it are dropped with it: code that registers its hooks at its first forward and notes so in an attribute
        (transformers' output recording, ``output_router_logits``) does it again in the forward after the runs, as
        the attribute is put back, and would otherwise leave a hook per run (each output then recorded several
        times)."""
        saved: list[tuple[nn.Module, str, Any, dict[str, Any] | None]] = []
        for m in self.modules[1:]:
            attrs = _plain_attributes(m)
            for name in _HOOKS:
                held = getattr(m, name, None)
                if held is not None:
                    saved.append((m, name, held, attrs if attrs is not None and name in attrs else None))
        for m, name, held, attrs in saved:
            if self.hooks_in and name in _HOOK_FNS:  # (a copy: hooks registered during the run are dropped with it)
                table = type(held)((k, h) for k, h in held.items() if not _own_hook(h))
            else:
                table = type(held)(held) if self.hooks_in else type(held)()
            if attrs is not None:
                attrs[name] = table
            else:
                setattr(m, name, table)
        try:
            yield
        finally:
            for m, name, hooks, attrs in saved:
                if attrs is not None:
                    attrs[name] = hooks
                else:
                    setattr(m, name, hooks)


@contextlib.contextmanager
def left_as_it_was(model: nn.Module, runs: str) -> Iterator[None]:
    """``model`` after the block as it was before it, whatever its forwards in the block changed: what the runs that
    establish a decision put back (:class:`_Snapshot`: the random streams, buffers and small parameters, a norm's
    running statistics, plain attributes, what the modules' code changes outside them) and the forward hooks its
    code registered in the block (transformers' output recording, registered at a first forward and noted in an
    attribute that is put back: the next forward registers them again). moe_replay's own hooks stay. ``runs``
    names the forwards, for a refusal of a large tensor changed in place."""
    snapshot = _Snapshot(model, runs=runs)
    before = [(m, name, set(getattr(m, name, None) or ())) for m in snapshot.modules for name in _HOOK_FNS]
    try:
        with snapshot.drawn_again(), files_as_they_were(snapshot.files), unheard():
            yield
    finally:
        for m, name, keys in before:
            held = getattr(m, name, None)
            if not isinstance(held, dict):
                continue
            for key in [k for k, hook in held.items() if k not in keys and not _own_hook(hook)]:
                for extra in _HOOK_EXTRAS[name]:  # (torch's flags of a hook, by its id: with_kwargs, always_call)
                    flags = getattr(m, extra, None)
                    if isinstance(flags, dict):
                        flags.pop(key, None)
                del held[key]
        snapshot.restore()


#: the dicts of flags torch keeps by a hook's id beside each dict of hooks
_HOOK_EXTRAS = {
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
}


@contextlib.contextmanager
def _syncs_allowed() -> Iterator[None]:
    """Establishing runs once and reads values back; a sync-debug mode must not trip on it. (Read only where CUDA is
    initialized, as setting the mode initializes it: reading it would initialize CUDA inside the forward, which a
    checkpoint preserving the RNG state refuses.)"""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _same_entries(now: dict[str, Any], then: dict[str, Any]) -> bool:
    """Does ``now`` hold each entry of ``then`` (the same object under the same name)?"""
    for k, v in then.items():
        if now.get(k) is not v:
            return False
    return True


def _plain_attributes(m: nn.Module) -> dict[str, Any] | None:
    """``m``'s attributes (its ``__dict__``) where it keeps ``nn.Module``'s own attribute setting, else None. A hook
    table (one of :data:`_HOOKS`, no parameter, buffer nor module) set there is what that setting does with it,
    without its checks: every probe run sets each table of each submodule twice."""
    attrs = getattr(m, "__dict__", None)
    return attrs if type(m).__setattr__ is nn.Module.__setattr__ and isinstance(attrs, dict) else None


@contextlib.contextmanager
def _autocast_cache_aside() -> Iterator[None]:
    """Autocast's cache of cast weights is neither read nor filled while this runs.

    A probe run inside an autocast region would otherwise leave the casts of the router's weights in
    that cache, and the forward after it would take them from there instead of casting: an op fewer in
    the forward than in its recompute, which selective activation checkpointing (ops handed out by
    their order of call) cannot match.
    """
    if not torch.is_autocast_cache_enabled():
        yield
        return
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(True)


class _Prober:
    def __init__(
        self,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: nn.Module,
        snapshot: _Snapshot | None = None,
        limit: float | None = None,
    ):
        self.forward, self.args, self.kwargs, self.scope = forward, args, kwargs, scope
        self.took = 0.0  # seconds of the longest run on the real inputs
        self.limit = limit  # seconds a run on ``args``/``kwargs`` may take (None: no limit; they are the forward's)
        self.snapshot = _Snapshot(scope) if snapshot is None else snapshot
        self.snapshot.hold_inputs(args, kwargs)  # (what the runs are handed as it is: put back after each)
        #: ``(seed, width)`` of :meth:`_Snapshot.move_small` for every run that names none (see :func:`_vary_state`)
        self.moved: tuple[int, int] | None = None
        #: the real forward's inputs, whose tensors requiring gradients the inputs of every run mirror
        self.grads: tuple[tuple[Any, ...], dict[str, Any]] = (args, kwargs)
        #: inputs of the shape of its own made of real values (the real forward's other tokens, each alone, for a
        #: forward on one of them): later and earlier choices are varied on them first
        self.others: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        #: the inputs the last run was given (copies), as it left them
        self.ran: tuple[tuple[Any, ...], dict[str, Any]] = (args, kwargs)

    def run(
        self,
        change: int | None = None,
        hold: dict[int, Any] | None = None,
        slot: int | None = None,
        values: int | None = None,
        force: dict[int, Any] | None = None,
        inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        choices: list[Any] | None = None,
        fill: float | None = None,
        early: list[Any] | None = None,
        scramble: int | None = None,
        reseed: int | None = None,
        peak: int | None = None,
        lift: bool = False,
        watch: tuple[int, torch.Tensor, torch.Tensor] | None = None,
        bump: tuple[int, int] | None = None,
        trace: bool = False,
        own: torch.Tensor | None = None,
        moved: tuple[int, int] | None = None,
    ) -> tuple[Any, _ProbeMode]:
        """One run of the forward (on ``inputs``, else its own), its calls changed or held as asked; returns its
        output and the mode that saw its calls. Every tensor of the inputs is copied first (the forward may write
        into them), but ``own``: a tensor of ``inputs`` made for this run alone, that nothing reads after it.
        ``moved``: ``(seed, width)`` of :meth:`_Snapshot.move_small`, the scope's small floating state moved for
        this run (put back by the next restore)."""
        mode = _ProbeMode(
            change, hold or {}, slot, values, force, choices, fill, early, scramble, peak, lift, watch, bump, trace
        )
        mode.snapshot = self.snapshot
        args, kwargs = inputs if inputs is not None else (self.args, self.kwargs)
        # on inputs of its own making, a forward may loop on where its real inputs never take it (an iteration
        # to a tolerance that extreme values never reach): such a run is given up, as one that raises
        limit = self.limit if inputs is None else max(_PROBE_SECONDS, _PROBE_FACTOR * self.took, self.limit or 0.0)
        self.snapshot.restore()
        if reseed is not None:  # (another random state than the forward's: what it draws comes out otherwise)
            self.snapshot.reseed(reseed)
        moved = moved if moved is not None else self.moved
        if moved is not None:
            self.snapshot.move_small(*moved)
        NESTING.probing += 1
        start = time.perf_counter()
        try:
            # the caller's grad mode (a router may compute more with gradients on), saving nothing
            # through a checkpoint's saved-tensor hooks, and leaving autocast's cache of casts as it was
            with (
                torch.autograd.graph.saved_tensors_hooks(_keep, _keep),
                self.snapshot.hooks_aside(),
                self.snapshot.drawn_again(),
                files_as_they_were(self.snapshot.files),
                unheard(),
                _autocast_cache_aside(),
                mode,
                contextlib.nullcontext() if (axis := AXES.get(self.scope)) is None else MovedAxis(axis, any_width=True),
            ):
                run_args, run_kwargs = _grad_like((_clone(args, own), _clone(kwargs, own)), self.grads)
                self.ran = (run_args, run_kwargs)  # (what the run wrote into them is read by _escaped_indices)
                outer = run_begins()
                try:
                    out = _within(limit, self.forward, *run_args, **run_kwargs)
                except Exception as e:  # (a _LibraryFault, raised by moe_replay's code inside it, is no Exception)
                    _refuse_noted(run_ends(outer), e)
                    if raised_inside(e):  # (moe_replay's code the forward entered, outside this mode: a nested
                        if isinstance(e, MoEReplayError):  # router's, a stand-in's; a refusal it made on purpose is
                            raise  # raised as it is, never the forward's own)
                        raise _library_fault(e) from e
                    if isinstance(e, MoEReplayError) and raised_by_library(e):  # (a refusal this mode made on purpose,
                        raise  # entered through torch's dispatch, not an entry: never the forward's own either)
                    _mark_forwards(e)
                    raise
                except BaseException:
                    run_ends(outer)
                    raise
                _refuse_noted(run_ends(outer), None)
        finally:
            NESTING.probing -= 1
        if inputs is None:
            self.took = max(self.took, time.perf_counter() - start)
        return out, mode


#: A probe run on other inputs is given up after this many seconds, or this many times the longest run on
#: the real inputs, whichever is longer.
_PROBE_SECONDS = 1.0
_PROBE_FACTOR = 50.0


class ProbeTimeout(Exception):
    """A probe run on inputs of the probe's own making that did not end in time (see ``_Prober.run``)."""


class _Overtime(BaseException):
    """Raised in the probing thread at its deadline: a ``BaseException``, so that no ``except Exception`` of
    the forward's own code takes it for one of its errors and goes on."""


def _within(seconds: float | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising :class:`ProbeTimeout` if it still runs after ``seconds`` (None: no limit).

    The stop is raised in this thread by the process's one watchdog thread (:func:`_watchdog`), at the next bytecode
    it runs (a loop in Python stops there; a long C call first returns), and raised again every quarter of a second
    while ``fn`` runs (a bare ``except:`` in its code may take one). Once ``fn`` has returned or raised, none is raised
    any more. Arming a run costs a lock and a queue entry, not a thread of its own (a first step establishes many
    routers, each with runs on inputs of the probe's own making).

    ``seconds`` counts the processor time of this thread where the platform tells it (``time.pthread_getcpuclockid``):
    a run that waits, its process descheduled on a loaded machine or its thread waiting on a device, is not stopped for
    the time it waited (a stop there made a router whose probe ran slow under load look like one that loops, and
    refused it), up to :data:`_WAITING_FACTOR` times ``seconds`` of wall time.

    A stop fired at a run leaves nothing set once the run ended (see :func:`_take_back`).
    """
    if seconds is None or _SET_ASYNC_EXC is None:
        return fn(*args, **kwargs)
    # (no Event nor plain Lock in this thread's way out: a stop raised just as one was taken would leave it taken, and
    # the next take would wait forever; the re-entrant lock is given back, as often as this thread took it, and the
    # watchdog is handed the run through a queue written in C)
    arm = _Armed(threading.get_ident(), seconds)
    over = False
    try:
        try:
            _watchdog().put(arm)  # (inside: a stop landing as it is handed over is still disarmed below)
            return fn(*args, **kwargs)
        except _Overtime:
            over = True
    except _Overtime:  # (raised as the inner handler began)
        over = True
    finally:
        fired = False
        while True:  # disarm; a stop raised while disarming is the one fired, taken here
            try:
                arm.lock.acquire()
                arm.done = True  # (no stop is fired after this)
                fired = arm.fired
                _release_all(arm.lock)
                break
            except _Overtime:
                over = True
        while fired:  # (one may be set, not raised yet: taken back)
            try:
                over = _take_back(arm.thread) or over
                fired = False
            except _Overtime:  # (raised as it was called)
                over = True
    if over:
        raise ProbeTimeout(f"a probe run on other inputs still ran after {seconds:.1f} s")
    raise AssertionError("unreachable")


class _Disarmed(BaseException):
    """Set by a run's own thread for itself in place of a stop fired at it that may not be raised yet, and taken at
    once (see :func:`_take_back`): never seen outside it."""


def _land() -> None:
    """Nothing: a call, at whose start the thread raises the exception set for it from outside."""


#: How many times :func:`_take_back` sets its exception and calls :func:`_land` (CPython raises it at the first call).
_TAKE_BACK_TRIES = 8
_LAND_CALLS = 64


def _take_back(thread: int) -> bool:
    """Take back, in ``thread`` (this one: a run that ended, disarmed), a stop the watchdog fired at it; returns
    whether a stop was raised here first (the run is then one that timed out).

    The stop, raised or not yet, is replaced by :class:`_Disarmed`, which is raised at the next call and taken. Not
    by setting the pending exception to none: CPython (3.11 at least) then leaves the interpreter's signal that one
    is pending set, cleared only where one is raised, and while it is set each call in a thread that runs a trace
    function (a debugger, a coverage tool) loops at its first instruction for ever, and every other thread checks for
    pending work at each call and loop. Where the exception is never raised here, it is set to none after all."""
    over = False
    interrupted: BaseException | None = None
    tries = 0
    while True:
        try:
            while tries < _TAKE_BACK_TRIES:
                tries += 1
                _SET_ASYNC_EXC(ctypes.c_ulong(thread), ctypes.py_object(_Disarmed))
                for _ in range(_LAND_CALLS):
                    _land()
            _SET_ASYNC_EXC(ctypes.c_ulong(thread), None)  # (never raised: nothing is left to land elsewhere)
            break
        except _Disarmed:
            break
        except _Overtime:  # (raised just before it was replaced: replaced again)
            over = True
        except BaseException as e:  # (a KeyboardInterrupt raised first: raised once the stop is taken back)
            interrupted = e
    if interrupted is not None:
        raise interrupted
    return over


class _Armed:
    """One run :func:`_within` limits: its thread, its deadline, and whether it ended (``done``) or was stopped
    (``fired``), both changed under ``lock`` by the run's thread and by the watchdog."""

    __slots__ = ("clock", "cpu_start", "cutoff", "deadline", "done", "fired", "lock", "owner", "seconds", "thread")

    def __init__(self, thread: int, seconds: float) -> None:
        now = time.monotonic()
        self.thread, self.seconds, self.deadline = thread, seconds, now + seconds
        self.cutoff = now + _WAITING_FACTOR * seconds  # (stopped here, whatever it ran)
        self.clock = _cpu_clock(thread)  # (read in the run's own thread: its processor time, or None)
        self.cpu_start = _cpu_time(self.clock)
        self.lock = threading.RLock()
        self.done = self.fired = False
        # (the run's thread itself: once it ended, its id may be another thread's, which no stop must reach)
        self.owner = threading.current_thread()

    def waited(self, now: float) -> float:
        """At its deadline (under :attr:`lock`): how much longer the run is given, 0 where it is stopped now. A run
        that used less processor time than its limit spent the rest waiting; it is given the processor time it has
        left, up to :attr:`cutoff`."""
        if self.fired or self.clock is None or now >= self.cutoff:
            return 0.0
        used = _cpu_time(self.clock) - self.cpu_start
        if used != used or used >= self.seconds:  # (NaN: the clock could not be read)
            return 0.0
        return min(max(self.seconds - used, 0.01), self.cutoff - now)


#: A run whose thread used less processor time than its limit is stopped at the latest after this many times the
#: limit in wall time (a forward that waits on a device in a loop still stops).
_WAITING_FACTOR = 20.0


def _cpu_clock(thread: int) -> int | None:
    """The processor-time clock of ``thread`` (its ``threading.get_ident()``), or None where the platform has none."""
    get = getattr(time, "pthread_getcpuclockid", None)
    if get is None:
        return None
    try:
        clock = get(thread)
        time.clock_gettime(clock)
    except (OSError, OverflowError, ValueError):
        return None
    return int(clock)


def _cpu_time(clock: int | None) -> float:
    """The processor time ``clock`` tells, NaN where it cannot be read (a thread gone)."""
    if clock is None:
        return float("nan")
    try:
        return time.clock_gettime(clock)
    except (OSError, OverflowError, ValueError):
        return float("nan")


#: The queue of the process's watchdog thread (see :func:`_watchdog`), None until a limited run first needs it, and
#: again in a process forked since (the thread is not forked with it).
_WATCHED: queue.SimpleQueue[_Armed] | None = None
#: The watchdog thread, and the runs it was handed, by deadline (kept here: a thread started again takes them over).
_WATCHER: threading.Thread | None = None
_DUE: list[tuple[float, int, _Armed]] = []
_WATCHDOG_START = threading.Lock()
#: How often a stop is raised again while a run still runs past its deadline.
_AGAIN_SECONDS = 0.25


def _watchdog() -> queue.SimpleQueue[_Armed]:
    """The queue through which :func:`_within` hands its runs to the one watchdog thread of the process (started
    at its first use, and again where it was found ended): at each run's deadline, unless it ended, the thread raises
    :class:`_Overtime` in the run's thread, then again every :data:`_AGAIN_SECONDS` until it ends."""
    global _WATCHED, _WATCHER
    watched, watcher = _WATCHED, _WATCHER
    if watched is not None and watcher is not None and watcher.is_alive():
        return watched
    with _WATCHDOG_START:  # (before the run is armed: no stop can land here)
        if _WATCHED is None:
            _WATCHED = queue.SimpleQueue()
        if _WATCHER is None or not _WATCHER.is_alive():
            thread = threading.Thread(target=_watch, args=(_WATCHED, _DUE), name="moe_replay probe limit", daemon=True)
            thread.start()
            _WATCHER = thread
        return _WATCHED


def _watch(armed: queue.SimpleQueue[_Armed], due: list[tuple[float, int, _Armed]]) -> None:
    """The watchdog thread's loop: the runs handed to it, by deadline (``due``); each stopped at its deadline unless
    done. Nothing ends it: a run whose judging raised is stopped as one past its limit (never left unlimited), and
    an exception raised in the loop itself (one set for this thread from outside) is dropped."""
    order = itertools.count(len(due))
    while True:
        try:
            _watch_once(armed, due, order)
        except BaseException:  # (the thread must outlive anything; each run's state is in ``due``)
            continue


def _watch_once(armed: queue.SimpleQueue[_Armed], due: list[tuple[float, int, _Armed]], order: Iterator[int]) -> None:
    """One turn of :func:`_watch`: wait for the next run handed over or the next deadline, then stop every run due."""
    wait = None if not due else max(0.0, due[0][0] - time.monotonic())
    try:
        arm = armed.get(timeout=wait)
    except queue.Empty:
        pass
    else:
        heapq.heappush(due, (arm.deadline, next(order), arm))
        return
    now = time.monotonic()
    while due and due[0][0] <= now:
        arm = due[0][2]
        with arm.lock:
            try:
                again = _judged(arm, now)
            except Exception:  # (stopping it failed: tried again later, the loop never spinning on it)
                again = now + _AGAIN_SECONDS
            if again is None:
                heapq.heappop(due)
            else:  # (popped only once judged: a fault while judging leaves it due)
                heapq.heapreplace(due, (again, next(order), arm))


def _judged(arm: _Armed, now: float) -> float | None:
    """Under ``arm``'s lock, at its deadline: when to look at it again, None where it is done with. A run that waited
    more than it ran is given the time it has left; one past its limit is stopped (also where judging it failed)."""
    if arm.done:
        return None
    try:
        more = arm.waited(now)
    except Exception:  # (judged past its limit: a run is never left unlimited)
        more = 0.0
    if more > 0.0:
        return now + more
    if not arm.owner.is_alive():  # (ended without disarming: its id may be reused, no stop is sent)
        arm.done = True
        return None
    arm.fired = True
    if not _SET_ASYNC_EXC(ctypes.c_ulong(arm.thread), ctypes.py_object(_Overtime)):
        arm.done = True  # (no such thread any more)
        return None
    return now + _AGAIN_SECONDS


def _forget_watchdog() -> None:
    global _WATCHED, _WATCHER, _DUE, _WATCHDOG_START
    _WATCHED, _WATCHER, _DUE = None, None, []
    _WATCHDOG_START = threading.Lock()  # (a lock another thread held as the process forked stays held in the child)


if hasattr(os, "register_at_fork"):  # (a forked child has no watchdog thread: it starts its own)
    os.register_at_fork(after_in_child=_forget_watchdog)


_SET_ASYNC_EXC: Any = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)


def _release_all(lock: Any) -> None:
    """Give back every hold this thread has on the re-entrant ``lock`` (a stop raised between a take and its
    ``try`` leaves one more than the code counts)."""
    while True:
        try:
            lock.release()
        except RuntimeError:  # (not held by this thread any more)
            return


# ----------------------------------------------------------------------------- establish
def _left_outside(probe: _Prober) -> list[tuple[str, torch.Tensor]]:
    """What the last run of the forward left in its scope's modules' attributes and in its arguments, with where."""
    found: list[tuple[str, torch.Tensor]] = []
    for mod_name, m in probe.scope.named_modules():
        for key, v in vars(m).items():
            if key not in _MODULE_INTERNALS:
                found += [
                    (f"attribute {key!r} of {f'{mod_name!r}' if mod_name else 'the router'}", t) for t in _leaves(v, [])
                ]
    run_args, run_kwargs = probe.ran
    found += [("an argument of its forward", t) for t in _leaves([run_args, run_kwargs], [])]
    return found


def _escaped_indices(probe: _Prober, calls: Sequence[Call], read: Call | None = None) -> tuple[Call, str] | None:
    """A decision-like call whose indices a run of the forward leaves outside its output: in an attribute of a module
    of the scope (``self.idx = idx``, or a cast of it) or in an argument (a dict it fills, a tensor it writes them
    into), with where; None where no call's are. Read after one more run (not a hot path: a refusal's wording).
    ``read``: a call whose values the output reads; what moves with its values (experts picked by comparing the
    scores with a ``max``'s values) is made from the values, not the indices, though it may hold the same numbers."""
    _, seen = probe.run()
    found = _left_outside(probe)
    from_values: set[int] | None = None
    for c, out in zip(calls, seen.outs, strict=False):
        if c.family not in FORCEABLE:
            continue
        idx = _leaves(out, [])[-1] if c.family in ("topk", "max", "min") else out
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
            continue
        for at, (where, t) in enumerate(found):
            if (
                isinstance(t, torch.Tensor)
                and not t.is_floating_point()
                and t.dtype != torch.bool
                and t.numel() == idx.numel() > 0
                and torch.equal(t.detach().reshape(-1).long().cpu(), idx.detach().reshape(-1).long().cpu())
            ):
                if read is not None:
                    if from_values is None:  # (one more run, its values lifted: what moves with them is theirs)
                        probe.run(values=read.ordinal, lift=True)
                        moved = _left_outside(probe)
                        from_values = {
                            i
                            for i, ((_, before), (_, after)) in enumerate(zip(found, moved, strict=False))
                            if isinstance(before, torch.Tensor)
                            and isinstance(after, torch.Tensor)
                            and (after.shape != before.shape or not torch.equal(after.cpu(), before.cpu()))
                        }
                    if at in from_values:
                        continue
                return c, where
    return None


def _refuse(name: str, calls: Sequence[Call], why: str, fix: str) -> UnsupportedRouterError:
    seen = "\n  ".join(c.describe() + ("" if c.effect is None else f" (changes the output: {c.effect})") for c in calls)
    return UnsupportedRouterError(
        f"router '{name}': {why}. Decision-like calls seen in its forward:\n  {seen or '(none)'}\n{fix}; "
        "nothing was recorded or forced"
    )


@torch.compiler.disable  # (never traced: a forward that reaches it inside a compiled model runs it eagerly)
@_syncs_allowed()  # establishing runs once and reads values back
def establish(
    name: str,
    scope: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_experts: int | None,
    top_k: int | None,
    declared_top_k: bool = False,
    call: int | None = None,
    family: str | None = None,
) -> Evidence | None:
    """Find the decision of ``scope``'s forward on these inputs by changing each candidate's choice, and check
    it on other numbers of tokens.

    A forward may take another branch on another number of tokens (a decode step's one token, a prefill's
    many): a choice made only there before or after the decision, or a decision whose indices do not reach
    the output there. So the decision found is checked (not found again: the search is weak on one token)
    on one of the tokens alone, where the forward took more, and on random inputs of at least ``_FEW_TOKENS``
    tokens, where it took fewer (see :func:`_check_elsewhere`).

    Args:
        name: the router's name, for messages.
        scope: the module whose forward is run.
        forward: its original forward.
        args, kwargs: the inputs of the forward being run.
        num_experts: the expert width discovery expects, or None.
        top_k: k discovery expects (a hint), or None.
        declared_top_k: ``top_k`` was given by the user: a different k is refused, not learned.
        call: an ordinal that an :class:`~moe_replay.Adapter` names as the decision.
        family: only calls of this family may decide (``topk``, ``argmax``, ``max``, ``argmin``, ``min``).

    Returns:
        The evidence, or None when the forward chose for no token (empty inputs): nothing to
        establish, record or force yet.

    Raises:
        UnsupportedRouterError: no call decides, or the evidence contradicts what was declared, or the
            decision does not hold on another number of tokens.
    """
    NESTING.establishing += 1
    try:
        _refuse_sharded_inside(name, scope)  # (on empty inputs too: every rank refuses at the same forward)
        if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in _leaves((args, kwargs), [])):
            return None
        AXES.pop(scope, None)  # (established afresh: along the last dimension first)
        try:
            return _established(name, scope, forward, args, kwargs, num_experts, top_k, declared_top_k, call, family)
        except _AlongAnother as e:
            axis = _expert_axis(e.axes, num_experts)
            if axis is None:
                raise UnsupportedRouterError(str(e)) from None
            refusal = e
        # its only choices are along one other dimension: read them moved last, proven as any other decision (a top-k
        # over tokens along it is refused as such there, and then as it was refused here)
        AXES[scope] = axis
        try:
            ev = _established(name, scope, forward, args, kwargs, num_experts, top_k, declared_top_k, call, family)
        except UnsupportedRouterError:
            AXES.pop(scope, None)
            raise UnsupportedRouterError(str(refusal)) from None
        except BaseException:
            AXES.pop(scope, None)
            raise
        if ev is None:
            AXES.pop(scope, None)
            return None
        return dataclasses.replace(ev, axis=axis)
    finally:
        NESTING.establishing -= 1


def _established(
    name: str,
    scope: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_experts: int | None,
    top_k: int | None,
    declared_top_k: bool,
    call: int | None,
    family: str | None,
) -> Evidence | None:
    """:func:`establish` on inputs with tokens, its calls between the probe runs let by the orphan watch.

    The probe runs set the user's hooks of the scope's submodules aside (so that a hook counting or logging sees one
    forward); where a run so fails on the forward's own inputs, the forward needs them (a pre-hook that loads offloaded
    weights, a top-k made in a gate's hook): the scope joins :data:`HOOKS_NEEDED` and the decision is established with
    them in."""
    try:
        return _established_with(name, scope, forward, args, kwargs, num_experts, top_k, declared_top_k, call, family)
    except _HooksNeeded:
        pass
    HOOKS_NEEDED.add(scope)
    try:
        return _established_with(name, scope, forward, args, kwargs, num_experts, top_k, declared_top_k, call, family)
    except BaseException:
        HOOKS_NEEDED.discard(scope)
        raise


def _established_with(
    name: str,
    scope: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_experts: int | None,
    top_k: int | None,
    declared_top_k: bool,
    call: int | None,
    family: str | None,
) -> Evidence | None:
    """:func:`_established` with the hooks set aside or kept in, as :data:`HOOKS_NEEDED` says."""
    probe = _Prober(forward, args, kwargs, scope)
    try:
        ev = _establish(
            name,
            probe,
            num_experts=num_experts,
            top_k=top_k,
            declared_top_k=declared_top_k,
            call=call,
            family=family,
        )
        if ev is None:
            return None
        if torch.is_grad_enabled():
            _refuse_backward_choice(name, probe, ev)
        limit = max(_PROBE_SECONDS, _PROBE_FACTOR * probe.took)  # (inputs of the probe's own making)
        for what, inputs, others in _other_counts(args, kwargs):
            other = _Prober(forward, *inputs, scope, snapshot=probe.snapshot, limit=limit)
            other.grads = probe.grads
            other.others = others
            try:
                _check_elsewhere(name, other, ev, what)
            except UnsupportedRouterError:
                raise
            except Exception as e:  # a forward tied to its number of tokens (another input of that length)
                _only_forwards(e)  # (its own only: an error of moe_replay refuses the router)
                continue
            finally:
                probe.snapshot.restore()
    except _Communicates as e:
        raise _communicates(name, scope, e.args[0]) from None
    except _LibraryFault as fault:
        probe.snapshot.restore()
        raise _fault_refusal(name, fault) from fault.__cause__
    except UnsupportedRouterError as e:
        if type(e) is UnsupportedRouterError and not str(e).startswith("router '"):
            raise _named_refusal(name, e) from e  # (a refusal made inside a run, by the probe's mode: see through_out)
        raise
    except (MoEReplayError, _HooksNeeded):
        raise
    except Exception as e:  # (the forward's own, on its own inputs: raised to its caller as it raises natively)
        if _forwards_own(e):
            raise
        probe.snapshot.restore()  # (moe_replay's own, outside any run: the router refused, not a bare error of ours)
        raise _fault_refusal(name, _library_fault(e)) from e
    if not probe.snapshot.hooks_in and _watched_hooks_inside(scope):  # (each later forward watches them: see Evidence)
        ev = dataclasses.replace(ev, hooks_aside=True)
    return ev


@torch.compiler.disable
@_syncs_allowed()
def still_decides(
    scope: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ev: Evidence
) -> bool:
    """Does the decision of ``ev`` still decide on these inputs, and none of its twins (:attr:`Evidence.twins`)?

    A check for a forward that makes calls of its decision's form beside it and changes its own state (a step
    count that moves dispatch from one to the other after a warm-up): those calls look the same at every
    forward, so only their effect tells. The forward is run as it is twice (for the run-to-run noise), then
    once with each of those calls' indices moved, state put back after each run: the decision's calls must
    still change the output, and no twin as broadly (an auxiliary statistic reaches a sliver of it). False
    when they do not, or when a run raises or makes other calls: the decision is then established afresh.
    """
    if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in _leaves((args, kwargs), [])):
        return True  # (no token to choose for: nothing is recorded or forced in this forward)
    probe = _Prober(forward, args, kwargs, scope)
    NESTING.establishing += 1
    try:
        base, seen = probe.run()
        if [c.signature for c in seen.calls] != [c.signature for c in ev.calls]:
            return False
        again, _ = probe.run()
        noise, _ = _distance(base, again)
        tolerance = 0.0 if noise == 0 else 16 * noise

        def reach(i: int) -> int:
            out, _ = probe.run(change=i)
            worst, count = _distance(base, out, tolerance)
            return count if worst > tolerance else 0

        decided = [reach(i) for i in ev.decision]
        if not all(decided):
            return False
        least = min(decided)
        return all(8 * reach(i) < least for i in ev.twins)
    except Exception as e:  # (raised again, in words, by the establishment that follows)
        _only_forwards(e)  # (moe_replay's own error: refused by the caller, see faults_refused)
        return False
    except _Communicates:
        return False
    finally:
        NESTING.establishing -= 1
        probe.snapshot.restore()


def makes_its_calls(
    scope: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ev: Evidence
) -> bool:
    """Does the forward make the decision-like calls ``ev`` was established on, on these inputs?

    A check for a router whose forward was seen to make other decision-like calls from one forward to the next (a
    branch on the number of its tokens: a stable softmax's ``max`` on long inputs alone): such a forward would be
    refused at its first call that is not the plan's, where nothing could establish it any more. One run, state put
    back after it; False where it makes other calls or raises (the decision is then established afresh on them).
    """
    probe = _Prober(forward, args, kwargs, scope)
    NESTING.establishing += 1
    try:
        _, seen = probe.run()
        return [c.signature for c in seen.calls] == [c.signature for c in ev.calls]
    except Exception as e:  # (raised again, in words, by the establishment that follows)
        _only_forwards(e)  # (moe_replay's own error: refused by the caller, see faults_refused)
        return False
    except _Communicates:
        return False
    finally:
        NESTING.establishing -= 1
        probe.snapshot.restore()


def _communicates(name: str, scope: nn.Module, call: str, tokens: bool = True) -> UnsupportedRouterError:
    """The refusal of a router whose forward reached ``call``, a collective (``tokens``: while its decision was
    being established; else in a forward for no token, before it was)."""
    why = (
        "establishing which call decides runs it again on this rank alone, where the other ranks would not join "
        "that collective (a hang, or their next collective answering this one)"
        if tokens
        else "the ranks with tokens in this forward refuse it (establishing which call decides runs it again on "
        "one rank alone), so this rank, with none, refuses it too rather than wait in a collective they do not join"
    )
    return UnsupportedRouterError(
        f"router '{name}': its forward ({type(scope).__name__}) communicates across ranks ({call}), and {why}. Keep "
        "the router's forward local: compute what it shares across ranks (expert counts for a load-balancing loss, "
        "say) after it, outside its module; nothing was forced"
    )


class _BackwardWatch(TorchFunctionMode):
    """The decision-like calls a backward makes over ``width`` (the experts) in the backward code of the forward's
    autograd Functions, each described; with ``move="indices"``, each answered with its indices moved to other
    experts (see :func:`_changed`), its values kept; with ``move="values"``, each that returns values answered with
    its values moved (see :func:`_changed_values`), its indices kept. A forward recomputed in the backward (an
    activation checkpoint inside the scope) runs with gradients on, and is the forward's own calls again: not
    watched."""

    def __init__(self, width: int, move: str | None) -> None:
        super().__init__()
        self.width, self.move = width, move
        self.seen: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        try:
            return self._answer(func, args, kwargs or {})
        except Exception as e:  # (the backward's calls' own errors are marked by _native: theirs to see)
            _only_forwards(e)
            raise

    def _answer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The answer to one torch call the backward makes (see :meth:`__torch_function__`)."""
        out = _native(func, args, kwargs)
        if torch.is_grad_enabled() or "out" in kwargs:
            return out
        found = decision_call(unwrap(func, kwargs), args, kwargs)
        if found is None or found[2] != self.width:
            return out
        self.seen.append(f"{found[0]} over {found[2]} at {_where()}")
        if self.move == "indices":
            return _changed(found[0], out, found[2])
        if self.move == "values" and isinstance(out, tuple) and len(out) == 2:
            return _changed_values(out)
        return out


def _requiring(obj: Any, depth: int = 0) -> Any:
    """``obj`` with each floating tensor it holds as a leaf that requires gradients (a detached alias)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().requires_grad_() if obj.is_floating_point() or obj.is_complex() else obj
    if depth > 8:
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        items = tuple(_requiring(v, depth + 1) for v in obj)
        if type(obj) is not tuple:
            with contextlib.suppress(TypeError):
                return type(obj)(items)
        return items
    if isinstance(obj, list):
        return [_requiring(v, depth + 1) for v in obj]
    if type(obj) is dict:
        return {k: _requiring(v, depth + 1) for k, v in obj.items()}
    return obj


def _refuse_backward_choice(name: str, probe: _Prober, ev: Evidence) -> None:
    """Refuse a router whose backward chooses again: a decision-like call over its experts in the backward code of
    an autograd Function of its forward (a top-k of the saved scores, taken again to place the gradient) whose
    indices, or values beyond rounding, reach the gradients. A replay answers the forward's decision only: such a
    backward would send the router's gradients to the experts the current scores choose, not the forced ones.

    One run of the forward on its own inputs with gradients (its floating inputs as leaves that require them, so
    that the backward reaches every call of the forward; not the parameters, whose hooks and ``.grad`` stay as they
    were), then its backward from fixed random output gradients to those inputs, watched (see
    :class:`_BackwardWatch`); where it makes such a call, the backward again with that call's indices moved, then
    with its values moved (a threshold at the k-th largest score chooses by values alone)."""
    made: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        made.append((args, kwargs))
        return probe.forward(*args, **kwargs)

    run = _Prober(forward, probe.args, probe.kwargs, probe.scope, snapshot=probe.snapshot)
    run.grads = _requiring((probe.args, probe.kwargs))
    try:
        out, _ = run.run()
    except Exception as e:  # (established on this very forward: one that fails with gradients fails for its caller too)
        _only_forwards(e)
        return
    finally:
        probe.snapshot.restore()
    outs = [
        t
        for t in _leaves(out, [])
        if isinstance(t, torch.Tensor) and t.grad_fn is not None and (t.is_floating_point() or t.is_complex())
    ]
    wrt = [t for t in _leaves(made, []) if isinstance(t, torch.Tensor) and t.requires_grad]
    engine = _torch_compat.engine_backward
    if not outs or not wrt or engine is None:
        return
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in outs]

    def backward(move: str | None, last: bool = False) -> tuple[Any, list[str]]:
        watch = _BackwardWatch(ev.num_experts, move)
        NESTING.probing += 1
        outer = run_begins()
        try:
            with (
                probe.snapshot.hooks_aside(),
                _autocast_cache_aside(),
                files_as_they_were(probe.snapshot.files),
                unheard(),
                watch,
            ):
                got = _native(engine, (tuple(outs), tuple(grads), not last, False, tuple(wrt), True, False), {})
        except Exception as e:
            _refuse_noted(run_ends(outer), e)
            raise
        except BaseException:
            run_ends(outer)
            raise
        else:
            _refuse_noted(run_ends(outer), None)
        finally:
            NESTING.probing -= 1
            probe.snapshot.restore()
        return got, watch.seen

    try:
        native, seen = backward(None)
        if not seen:
            return
        again, _ = backward(None)
    except Exception as e:  # (a backward that fails natively fails for its caller too)
        _only_forwards(e)
        return
    noise, _ = _distance(native, again)
    try:
        moved, _ = backward("indices")
        worst, _ = _distance(native, moved)
    except Exception:  # (a backward that cannot run on other indices reads them)
        worst = math.inf
    how = "indices"
    if worst <= (0.0 if noise == 0 else 16 * noise):
        # a choice made again by its values alone (a threshold at the k-th largest score, the gradient placed where
        # the scores reach it) follows the current scores as well; a value read for numerical stability (a row's
        # maximum subtracted before an exponential) moves the gradients by rounding only
        how = "values"
        try:
            shifted, _ = backward("values", last=True)
            beyond = _moved_past_rounding(native, shifted, noise)
        except Exception:  # (a backward that cannot run on other values reads them)
            beyond = True
        if not beyond:
            return
    raise _refuse(
        name,
        ev.calls,
        f"its backward chooses among its experts again ({seen[0]}, by its {how}), in the backward of an autograd "
        "Function of its forward, and the gradients follow that choice: a replay forces the forward's decision "
        "only, so the "
        "router's gradients would go to the experts the current scores choose, not to the forced ones",
        "Place the gradient at the experts the forward chose: save the indices the forward's top-k returns "
        "(ctx.save_for_backward(indices)) and scatter the gradient at them in backward, instead of choosing again",
    )


def _moved_past_rounding(native: Any, moved: Any, noise: float) -> bool:
    """Are the gradients ``moved`` apart from ``native`` by more than rounding (the square root of their dtype's
    epsilon, relative to each tensor's largest magnitude) and more than ``noise`` (two native runs apart)?"""
    la, lb = _leaves(native, []), _leaves(moved, [])
    if len(la) != len(lb):
        return True
    for a, b in zip(la, lb, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return True
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return True
            continue
        x, y = a.detach().double(), b.detach().double()
        if bool(((x - y).isnan() & ~(x.isnan() & y.isnan())).any()):
            return True
        scale = float(x.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()) if x.numel() else 0.0
        tol = max(16 * noise, math.sqrt(torch.finfo(a.dtype).eps) * scale)
        diff = (x - y).abs().masked_fill(x == y, 0.0).nan_to_num(nan=0.0)
        if x.numel() and float(diff.max()) > tol:
            return True
    return False


class _LocalOnly(TorchFunctionMode):
    """A forward whose decision is not established yet, run for no token: stopped at a collective, before it runs."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        func = unwrap(func, kwargs)
        if _collective(func):
            raise _Communicates(getattr(func, "__name__", None) or str(func))
        return func(*args, **kwargs)


def run_unestablished(
    name: str, scope: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run a forward that :func:`establish` found nothing to establish on (no token to choose for).

    A rank whose micro-batch is empty establishes nothing, while the others establish the decision
    on their tokens and refuse a router whose forward communicates (:func:`establish`). So this
    forward is refused at its first collective, before it runs, as theirs are: every rank refuses at
    the same forward, and none is left waiting in a collective that the others never join.

    Without a process group no collective can run: the forward runs as it is.

    Raises:
        UnsupportedRouterError: the forward calls a ``torch.distributed`` collective (what it changed in the
            scope before is put back, as after a probe run).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return forward(*args, **kwargs)
    snapshot = _Snapshot(scope)
    try:
        with _LocalOnly():
            return forward(*args, **kwargs)
    except _Communicates as e:
        snapshot.restore()
        raise _communicates(name, scope, e.args[0], tokens=False) from None


def _sharded_inside(scope: nn.Module) -> tuple[str, nn.Module] | None:
    """A module inside ``scope`` whose parameters are distributed across ranks, and its path (``""``: ``scope``).

    Such a module gathers or redistributes them when it runs: FSDP2's ``fully_shard`` and tensor
    parallelism's ``parallelize_module`` in hooks around its call (set aside in a probe run, so that
    its parameters stay DTensors among plain tensors), FSDP1's wrapper in its own forward (a
    collective every rank must join). ``scope`` itself may be FSDP's (its hooks gathered its
    parameters before this forward: they are plain tensors in it), but not hold DTensor parameters
    while its forward runs (tensor parallelism on it: its forward computes on DTensors, among the
    probe's plain tensors, and redistributes them in collectives no mode sees).
    """
    fsdp, dtensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None)) if k)
    dt = getattr(dtensor, "DTensor", None)
    if not kinds and dt is None:  # (never imported: no module of the model is distributed by them)
        return None
    for path, m in scope.named_modules():
        if (kinds and m is not scope and isinstance(m, kinds)) or (
            dt is not None and any(isinstance(p, dt) for p in m.parameters(recurse=False))
        ):
            return path, m
    return None


def _refuse_sharded_inside(name: str, scope: nn.Module) -> None:
    """Refuse to establish a decision by running a forward that holds a module whose parameters are distributed.

    The probe runs the forward again on this rank alone, with the hooks of the modules inside set
    aside: such a module would run on its shards, or gather them in a collective that the other
    ranks do not join (a hang, an abort, or other tensors received in its place).
    """
    found = _sharded_inside(scope)
    if found is None:
        return
    path, module = found
    if module is scope:
        what = (
            f"{type(scope).__name__}, whose own parameters are distributed across ranks while it runs (tensor "
            "parallelism on it): its forward computes on them and redistributes them across ranks"
        )
    else:
        what = (
            f"{type(scope).__name__}, which runs '{path}' ({type(module).__name__}), whose parameters are distributed "
            "across ranks on their own (FSDP on that module, or tensor parallelism): it gathers them from the other "
            "ranks when it runs"
        )
    raise UnsupportedRouterError(
        f"router '{name}' decides in the forward of {what}, and establishing which call decides runs this forward "
        "again on this rank alone, where it cannot. Shard the MoE block as one unit (fully_shard the layer or the "
        "block, not a module inside it), or establish before sharding: attach, run one forward in each mode the "
        "model will run (training with gradients, eval without), detach, then shard and attach again; nothing was "
        "forced"
    )


def _slot_reaches_elsewhere(probe: _Prober, calls: Sequence[Call], ordinal: int, slot: int) -> bool:
    """Does moving slot ``slot`` of call ``ordinal`` alone change the output on another input of the probe's shape
    (``probe.others``, then the probe's inputs rolled and random ones of their mean and spread, then scaled down:
    :func:`_scaled_down`)?

    Asked of a slot whose move leaves the output unchanged on the probe's own inputs. That may be rounding, not
    structure: a token whose scores are very peaked (a huge hidden state, as the first token of many half-precision
    LLMs has) gives its last slot a weight under the output's resolution, and moving its expert changes nothing
    representable. A slot the forward drops by its code (a cut or a branch) changes nothing on any input of that
    shape; one it drops by value on some inputs only (a minimum weight, a threshold) is a later or earlier choice
    from the scores, refused as such (:func:`_refuse_later_choice`). Inputs on which the forward makes other
    decision-like calls, or fails, tell nothing and are passed over.
    """
    signature = [c.signature for c in calls]
    for inputs in itertools.chain(probe.others, _other_inputs(probe.args, probe.kwargs), _scaled_down(probe)):
        try:
            base, seen = probe.run(inputs=inputs)
            if [c.signature for c in seen.calls] != signature:
                continue
            again, _ = probe.run(inputs=inputs)
            noise, _ = _distance(base, again)
            if not math.isfinite(noise):
                continue
            tolerance = 0.0 if noise == 0 else 16 * noise
            out, _ = probe.run(change=ordinal, slot=slot, inputs=inputs)
        except Exception as e:  # (a forward that fails on other inputs tells nothing either way)
            _only_forwards(e)
            continue
        if _distance(base, out, tolerance)[0] > tolerance:
            return True
    return False


def _scaled_down(probe: _Prober) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The probe's inputs with their hidden states scaled down by 2**-4 and 2**-8 (exactly, in any binary float
    type), then random ones of the smaller one's mean and spread: less peaked scores, where every token of the
    inputs (one token alone, a sink whose hidden state is huge) and every random one of their spread is peaked."""
    found = _first_floating((probe.args, probe.kwargs))
    if found is None:
        return
    path, x = found
    for scale in (2.0**-4, 2.0**-8):
        scaled = _replaced((probe.args, probe.kwargs), path, x.detach() * scale)
        yield scaled
    yield from _other_inputs(*scaled)


def _check_elsewhere(name: str, probe: _Prober, ev: Evidence, what: str) -> None:
    """Check the decision ``ev`` on the inputs ``probe`` runs (``what``: a few words saying what they are).

    Where the forward makes the same decision-like calls there (other calls are refused at the forward that
    makes them): changing the decision's last call must change the output, and so must changing the last of
    the k slots of a top-k alone; the slots past k of a top-(k+1) must not; and the choices made after (and
    before) it and the values handed out of torch are refused as on the real inputs
    (:func:`_refuse_later_choice`, :func:`_refuse_escapes`), varied on ``probe.others`` first.
    """
    base, seen = probe.run()
    calls = seen.calls
    if [c.signature for c in calls] != [c.signature for c in ev.calls] or not any(c.rows for c in calls):
        return
    again, _ = probe.run()
    noise, _ = _distance(base, again)
    if not math.isfinite(noise):
        return
    tolerance = 0.0 if noise == 0 else 16 * noise
    there = dataclasses.replace(ev, calls=tuple(calls))
    anchor = calls[ev.decision[-1]]
    try:

        def reaches(slot: int | None = None) -> bool:
            out, _ = probe.run(change=anchor.ordinal, slot=slot)
            return _distance(base, out, tolerance)[0] > tolerance

        def last_reaches(slot: int) -> bool:  # (on these inputs, else on others of their shape: rounding aside)
            return reaches(slot) or _slot_reaches_elsewhere(probe, calls, anchor.ordinal, slot)

        def any_slot_reaches() -> bool:
            # (moving every slot by one expert may keep the expert that carries the weight: a token whose chosen
            # scores are one saturated sigmoid and a bias-picked expert of weight 1e-18, [1, 0] moved to [2, 1],
            # changes nothing representable; a slot moved alone to an expert the row does not hold does). The slots
            # of the last call alone: a decision of several calls (successive top-1s) holds fewer in it than k
            return anchor.family == "topk" and any(reaches(s) for s in range(min(ev.top_k, anchor.k)))

        if not reaches() and not any_slot_reaches():
            raise _refuse(
                name,
                calls,
                f"on {what}, changing the choice of its decision ({_chosen(ev)}) does not change the output, as it "
                "does on the tokens it was established on: its forward takes another branch there, where the "
                "experts are chosen otherwise (from the values, a dense mask) or none is used (a capacity computed "
                "from the number of tokens that is zero there drops every token), and forcing this decision would "
                "not force the experts used",
                "Choose the experts with the decision's indices whatever the number of tokens (a capacity of at least "
                "one token per expert)",
            )
        last = ev.top_k - 1  # (a cut or a threshold drops the last slots first)
        if len(ev.decision) == 1 and anchor.family == "topk" and last > 0 and not last_reaches(last):
            raise _refuse(
                name,
                calls,
                f"on {what}, slot {last + 1} of its decision ({_chosen(ev)}) does not reach the output, as it does "
                "on the tokens it was established on: its forward uses fewer experts there (a threshold or a cut "
                "in another branch), and the rows recorded would name experts it did not use",
                "Use the same number of the decision's slots whatever the number of tokens",
            )
        if len(ev.decision) == 1 and anchor.family == "topk" and ev.top_k < anchor.k:
            past = next((j for j in range(ev.top_k, anchor.k) if reaches(j)), None)
            if past is not None:
                raise _refuse(
                    name,
                    calls,
                    f"on {what}, slot {past + 1} of its decision ({_chosen(ev)}) reaches the output, but on the "
                    f"tokens it was established on only its first {ev.top_k} do: its forward uses another number of "
                    "experts there, and the rows recorded hold only the first ones",
                    "Use the same number of the decision's slots whatever the number of tokens, or declare k "
                    "with mr.Adapter(..., top_k=K)",
                )
        _refuse_later_choice(name, probe, calls, seen, there)
        _refuse_escapes(name, probe, calls, seen, there, tolerance)
    except UnsupportedRouterError as e:
        raise UnsupportedRouterError(
            f"{e}. (Found on {what}: a router's decision is checked on another number of tokens too, as a "
            "forward may take another branch there: a decode step's one token, a prefill's many)"
        ) from e


def _chooses_tokens(probe: _Prober, anchor: Call, tokens: int) -> bool:
    """Does ``anchor``, a decision as wide as a token dimension of the forward's hidden states, choose among tokens?

    An expert-choice router's ``[experts, tokens]`` scores (``[batch, experts, tokens]`` per sequence) have the
    shape of a token choice's ``[tokens, experts]`` where there are as many tokens as experts, and rows that are
    not tokens can look like tokens where there are batch rows. So the forward is run once more with that
    dimension of its hidden states given twice: the width of a choice among experts stays, that of a choice among
    tokens doubles. A choice among tokens padded to a multiple (rows of ``-inf`` appended to the scores, each
    expert's capacity taken from a padded token dimension) is wider than the tokens: where no dimension of the
    hidden states is as wide as the decision, each narrower one is repeated until it is wider than the decision,
    and a decision made at the same place that grows with it follows the tokens (a choice among experts keeps its
    width). A forward that cannot run on more tokens is read as before."""
    found = _first_floating((probe.args, probe.kwargs))
    if found is None:
        return False
    path, x = found
    dims = [d for d in range(x.dim() - 1) if x.shape[d] == anchor.width]
    if not dims and anchor.width == tokens:
        dims = [x.dim() - 2]
    padded = not dims
    if padded:  # (a padded token dimension: narrower than the decision's width)
        dims = [d for d in range(x.dim() - 1) if 1 < x.shape[d] < anchor.width]
    for d in dims:
        if padded and _per_token_along(probe, anchor, path, x, d):
            continue  # (its rows are the tokens of ``d``, its positions are not: no run on as many tokens as experts)
        more = torch.cat([x.detach()] * (anchor.width // x.shape[d] + 1 if padded else 2), dim=d)
        try:
            _, seen = probe.run(inputs=_replaced((probe.args, probe.kwargs), path, more))
        except Exception as e:
            _only_forwards(e)
            continue
        calls = seen.calls
        there = calls[anchor.ordinal] if anchor.ordinal < len(calls) else None
        if there is None or there.family != anchor.family:
            continue
        if there.width == 2 * anchor.width or (padded and there.where == anchor.where and there.width > anchor.width):
            return True
    return anchor.rows != tokens and _positions_are_tokens(probe, anchor, path, x)


def _positions_are_tokens(probe: _Prober, anchor: Call, path: tuple[Any, ...], x: torch.Tensor) -> bool:
    """Are the positions ``anchor`` chooses among tokens that the forward grouped itself?

    Expert choice over tokens the block cuts into groups of its own (``x.reshape(groups, -1, d)``, then each
    expert's top-C of each group) has no dimension of the hidden states as wide as the decision, and rows that are
    not one per token. Told by one run with the first token changed: a choice among experts has that token's scores
    in one row, while a choice among tokens has them in one position of several rows (one per expert)."""
    width = anchor.width
    changed = x.detach().clone()
    flat = changed.reshape(-1, changed.shape[-1])
    if flat.shape[0] < 2 or flat.data_ptr() != changed.data_ptr():
        return False
    flat[0] = 0.5 - flat[0]
    try:
        _, before = probe.run()
        _, after = probe.run(inputs=_replaced((probe.args, probe.kwargs), path, changed))
    except Exception as e:
        _only_forwards(e)
        return False
    if anchor.ordinal >= min(len(before.ins), len(after.ins)):
        return False
    a, b = before.ins[anchor.ordinal], after.ins[anchor.ordinal]
    if a.shape != b.shape or a.numel() % width or after.calls[anchor.ordinal].signature != anchor.signature:
        return False
    with torch.no_grad():
        moved = (a.detach() != b.detach()).reshape(-1, width)
    per_row = moved.sum(-1)
    return int((per_row > 0).sum()) > 1 and bool((per_row <= 1).all())


def _per_token_along(probe: _Prober, anchor: Call, path: tuple[Any, ...], x: torch.Tensor, d: int) -> bool:
    """Does ``anchor`` choose per token of dimension ``d`` of the hidden states ``x``, not among its tokens?

    Told by one run with those tokens rolled by one: the decision's scores, laid out as the hidden states' leading
    dimensions, come out rolled along ``d`` row by row, and not as they would if their positions were those tokens
    too (the first ``x.shape[d]`` of them rolled as well). A choice among tokens (of ``d``) has its positions
    following them, and one among the tokens of another dimension, or whose scores mix the tokens, has no rows
    that follow ``d``'s alone; so where this is not shown (equal tokens, rounding that differs with the order of
    the rows, another layout), the forward is run on more tokens than the decision is wide, as before. This run
    costs what the forward costs on its own inputs; that one, as many tokens as there are experts."""
    lead, n, width = x.shape[:-1], x.shape[d], anchor.width
    try:
        _, before = probe.run()
        _, after = probe.run(inputs=_replaced((probe.args, probe.kwargs), path, x.detach().roll(1, d)))
    except Exception as e:
        _only_forwards(e)
        return False
    if anchor.ordinal >= min(len(before.ins), len(after.ins)):
        return False
    a, b = before.ins[anchor.ordinal], after.ins[anchor.ordinal]
    if (
        a.shape != b.shape
        or a.numel() != math.prod(lead) * width
        or after.calls[anchor.ordinal].signature != anchor.signature
    ):
        return False
    with torch.no_grad():
        a, b = a.detach().reshape(*lead, width), b.detach().reshape(*lead, width)
        rows = a.roll(1, d)
        if not torch.equal(b, rows):
            return False
        positions = torch.cat([rows[..., :n].roll(1, -1), rows[..., n:]], dim=-1)
        return not torch.equal(b, positions)


def _chosen(ev: Evidence) -> str:
    """The calls that make a decision, as ``#0 topk(k=2) over 8 at model.py:42``."""
    return " + ".join(ev.calls[i].describe() for i in ev.decision)


def _other_counts(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, tuple[tuple[Any, ...], dict[str, Any]], list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """The inputs with their hidden states (their first floating tensor of two or more dimensions) replaced by
    the first token alone (where there are more), and by random values of their mean and spread, at least
    ``_FEW_TOKENS`` tokens (where there are fewer); each with a few words saying what it is, and other inputs
    of its shape made of real values to vary its choices on (the next ``_FEW_TOKENS`` tokens, each alone: one
    token's random variations seldom move a threshold)."""
    found = _first_floating((args, kwargs))
    if found is None:
        return []
    path, x = found
    rows = x.detach().reshape(-1, x.shape[-1])
    n = rows.shape[0]
    out = []
    if n > 1:
        one = (1,) * (x.dim() - 1)
        # (from the first token whose hidden state is not all zeros: left padding of a zero embedding, through a
        # block whose experts map zeros to zeros, changes with no expert, and would read as another branch)
        nonzero = rows.detach().ne(0).any(dim=-1).nonzero().flatten()
        start = int(nonzero[0]) if nonzero.numel() and int(nonzero[0]) < n - 1 else 0
        alone = [
            rows[i : i + 1].reshape(*one, x.shape[-1]).clone() for i in range(start, min(n, start + _FEW_TOKENS + 1))
        ]
        inputs = [_replaced((args, kwargs), path, t) for t in alone]
        out.append(("one of its tokens alone", inputs[0], inputs[1:]))
    if n < _FEW_TOKENS:
        m = math.ceil(_FEW_TOKENS / n)
        shape = (x.shape[0] * m, *x.shape[1:])
        ref = x.detach().float()
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(len(_OTHER_INPUTS)))
        many = (noise.to(x.device) * ref.std(unbiased=False) + ref.mean()).to(x.dtype)
        out.append((f"{n * m} tokens of random values", _replaced((args, kwargs), path, many), []))
    return out


def _establish(
    name: str,
    probe: _Prober,
    *,
    num_experts: int | None,
    top_k: int | None,
    declared_top_k: bool = False,
    call: int | None = None,
    family: str | None = None,
    lead: tuple[int, int] | None = None,
) -> Evidence | None:
    """:func:`establish` on the inputs ``probe`` runs, on them alone.

    ``lead`` (the ordinals of a call and of the later one that reads its choice back, see :func:`_leader`): the
    first is the decision, the second a later choice, checked as every other.
    """
    args, kwargs = probe.args, probe.kwargs
    try:
        aside = not probe.snapshot.hooks_in and user_hooks_inside(probe.scope)
        try:
            base, seen = probe.run(trace=True)
        except Exception as e:
            _only_forwards(e)
            if aside:  # (established again with them in)
                raise _HooksNeeded() from e
            raise
        calls: Sequence[Call] = seen.calls
        if calls and not any(c.rows for c in calls):
            return None  # no token to choose for
        again, seen2 = probe.run()
        if [c.signature for c in seen2.calls] != [c.signature for c in calls]:
            raise _refuse(
                name,
                calls,
                "its forward makes different decision-like calls from one run to the next on the same inputs"
                + _unstood_words(probe.snapshot),
                "Make the forward's control flow deterministic, or name the decision with an Adapter",
            )
        noise, _ = _distance(base, again)
        tolerance = 0.0 if noise == 0 else 16 * noise
        if aside:  # the real forward runs them: what it returns is compared with this (see differs)
            PREDICTED[probe.scope] = (_detached_leaves(base), tolerance)
        fix = (
            "If a fused kernel or soft routing (every expert weighted, no choice) makes the decision, it cannot be "
            "replayed, nor where the experts are chosen out of sight (a custom operator, a TorchScript function, "
            "numpy or Python lists, a random draw such as torch.multinomial): choose them with torch.topk (or "
            "argmax) in the router's Python code; identical experts (an upcycled model before training) hide "
            "every choice: establish it on a trained model; otherwise name the module that makes it with "
            "include=, or the call with mr.Adapter(..., call=N); a layer whose experts follow from no scores (a table "
            "of experts per token id, a hash layer) has nothing to replay: leave it out with exclude="
        )
        if call is not None:
            if not 0 <= call < len(calls):
                raise _refuse(name, calls, f"the Adapter names call #{call}, which its forward does not make", fix)
            chosen = calls[call]
            unchecked = _refuse_chosen_tokens(name, probe, calls, chosen)
            k = chosen.k
            named = "named by an Adapter"
            ev = _verdict(name, calls, (call,), chosen.width, k, top_k, declared_top_k, probe.scope, named)
            ev = dataclasses.replace(ev, mirrors=_mirrors(calls, seen, ev))
            _refuse_later_choice(name, probe, calls, seen, ev)
            _refuse_escapes(name, probe, calls, seen, ev, tolerance)
            _refuse_value_twins(name, probe, calls, seen, ev, base)
            _refuse_shifted_ids(name, calls, seen, ev, base, _tokens(args, kwargs))
            if unchecked is not None:
                raise unchecked
            return dataclasses.replace(ev, squashed=_squashed(seen, ev))

        reach: dict[int, int] = {}  # output elements that changing each call changes

        def effect(i: int, hold: dict[int, Any] | None = None, slot: int | None = None) -> bool:
            out, _ = probe.run(change=i, hold=hold, slot=slot)
            worst, count = _distance(base, out, tolerance)
            if hold is None and slot is None:
                reach[i] = count
            return worst > tolerance

        candidates = [c for c in calls if family is None or c.family == family]
        effects = {c.ordinal: effect(c.ordinal) for c in candidates}
        calls = tuple(dataclasses.replace(c, effect=effects.get(c.ordinal)) for c in calls)
        mattering = [c for c in calls if c.effect]
        if not mattering:
            why = "no decision-like call in its forward changes the output when its choice changes"
            # (a draw that chose, where no call's values reach the output either: a comparison with a decision's
            # values, as Gumbel noise compared with its maximum, is told as such, and noise before a decision-like
            # call replays; values handed out of torch come first: what a draw is made into there is out of sight)
            sampled = _sampled_choice(probe, seen, base, tolerance) if not calls and not seen.escapes else None
            if sampled is not None:
                why, fix = sampled
                why = f"its forward makes no decision-like call (topk, argmax, max, sort): {why}"
            elif not calls:
                why = (
                    "its forward makes no decision-like call (topk, argmax, max, sort): soft routing (every expert "
                    "weighted), or a threshold (the experts whose weight passes a relu or a comparison, a count that "
                    "varies per token), has no expert choice to record or replay"
                )
                over = _over_tokens(seen.axes, args, kwargs, num_experts) if seen.aside else None
                if over is not None:
                    why = (
                        f"its forward chooses only along another dimension than the last ({seen.aside[0]}), one as "
                        f"wide as {over}: each expert chooses its tokens (expert-choice routing), so there is no "
                        "per-token choice for routes to record or replay"
                    )
                    fix = "Route by token choice (a top-k over experts per token)"
                elif seen.aside:
                    why = (
                        f"its forward chooses only along another dimension than the last ({seen.aside[0]}): "
                        "moe_replay reads a choice among experts along the last dimension of the scores. Put the "
                        "experts last (scores.transpose(...)) and choose with dim=-1"
                    )
                elif seen.drawn:
                    why = (
                        f"its forward draws its experts at random inside one call ({seen.drawn[0]}: Gumbel noise, "
                        "then the one-hot of the best): no decision-like call is seen, and a random draw is not "
                        "replayed. Route by the argmax of the logits (as in eval) to record and replay the choice"
                    )
                elif seen.flat:
                    why = (
                        f"its forward chooses only over flat scores ({seen.flat[0]}): a top-k across tokens (each "
                        "expert's choice of its tokens, or a batch-level top-k over tokens and experts at once) makes "
                        "no per-token choice to record or replay"
                    )
                elif seen.escapes:
                    why = (
                        "its forward makes no decision-like call (topk, argmax, max, sort) in torch, and hands "
                        f"floating values out of torch ({seen.escapes[0]}): experts chosen there (an argsort or a "
                        "beam search in numpy, a Python loop over .tolist()) are out of moe_replay's sight, and soft "
                        "routing (every expert weighted) has no choice to record or replay"
                    )
            elif noise > 0 and not math.isfinite(noise):
                why = "its output differs between two runs on the same inputs, so no effect can be measured" + (
                    _unstood_words(probe.snapshot)
                )
            else:  # the values of a call reach the output where no call's indices do: a threshold?
                moves = _beyond_rounding(base)
                read = next(
                    (c for c in calls if c.family in _VALUED and moves(probe.run(values=c.ordinal, lift=True)[0])),
                    None,
                )
                escaped = _escaped_indices(probe, calls, read)
                if escaped is not None:
                    call_of, where = escaped
                    why = (
                        f"the indices of {call_of.describe()} leave its forward outside what it returns ({where}), "
                        "and what it returns does not change with them: the module that reads them there (its MoE "
                        "block) dispatches by them, out of the router's forward"
                    )
                    fix = (
                        "Intercept the router in the block that reads its indices: attach with adapters=[mr.Adapter("
                        f"'parent', match=lambda name, module: name == {name!r}, scope='parent')], or return the "
                        "indices from the router's forward"
                    )
                    read = None
                if escaped is None and read is not None:
                    why = (
                        f"its output reads the values of {read.describe()} but the indices of no decision-like "
                        "call: its experts are chosen by comparing the scores with those values (a threshold, "
                        "such as probs >= probs.topk(k).values[..., -1:]), or weights are read apart from their "
                        "experts, or the experts are identical; moe_replay records and forces a call's indices, so "
                        "there is no choice it can replay"
                    )
                    fix = (
                        "Choose the experts by the call's indices (values, indices = torch.topk(scores, k)), "
                        "dispatch the tokens by those indices and read their weights at them (the values, or "
                        f"scores.gather(-1, indices)). {fix[0].upper()}{fix[1:]}"
                    )
                elif escaped is None and (sampled := _sampled_choice(probe, seen, base, tolerance)) is not None:
                    why, fix = sampled
            refusal = _refuse(name, calls, why, fix)
            if (
                not calls
                and seen.aside
                and sampled is None
                and not (seen.flat or seen.drawn or seen.escapes)
                and call is None
                and (family is None or family in FORCEABLE)
            ):
                raise _AlongAnother(str(refusal), seen.axes)
            raise refusal
        if lead is None and _in_chunks(probe, calls, seen):
            chunk_of = calls[0]
            if all(not _slot_unreached(probe, effect, calls, c.ordinal, chunk_of.k - 1) for c in calls):
                why = (
                    f"{len(calls)} calls, each the whole choice for its own run of the tokens, in order (routing in "
                    "chunks of tokens): changing one token's hidden state changes only its own call's scores"
                )
                ordinals = tuple(c.ordinal for c in calls)
                ev = _verdict(
                    name, calls, ordinals, chunk_of.width, chunk_of.k, top_k, declared_top_k, probe.scope, why
                )
                found = _first_floating((probe.args, probe.kwargs))
                ev = dataclasses.replace(ev, chunks=True, chunk_dims=0 if found is None else found[1].dim())
                _refuse_later_choice(name, probe, calls, seen, ev)
                _refuse_rows_out_of_order(name, probe, calls, ordinals, own=False)
                _refuse_escapes(name, probe, calls, seen, ev, tolerance)
                for c in calls:  # (each chunk's call as the decision, the others held as its mirrors)
                    others = tuple(o.ordinal for o in calls if o is not c)
                    one = dataclasses.replace(ev, decision=(c.ordinal,), mirrors=others, chunks=False)
                    _refuse_value_twins(name, probe, calls, seen, one, base)
                _refuse_shifted_chunks(name, calls, seen, ev, base)
                return dataclasses.replace(ev, squashed=_squashed(seen, ev))
        # the decision fixes the final choice: the last call that matters over the expert width
        pool = [c for c in mattering if c.width == num_experts] or [
            c for c in mattering if c.width == max(m.width for m in mattering)
        ]
        # a call whose change reaches only a sliver of the output (one auxiliary-loss value) is not
        # the decision, which changes the tokens' hidden states; of the rest, the last fixes the choice
        # (a change that changes the output's shape, a capacity set by the busiest expert, say, reaches a count
        # that cannot be compared: such a call is broad, and the others are measured against the finite counts
        # and against one element per token for it, less than any slot of a decision reaches, as it moves every
        # token: an auxiliary-loss call stays a sliver when every slot of the decision reshapes the output)
        tokens = _tokens(args, kwargs)
        counted = [reach.get(c.ordinal, 0) for c in mattering if reach.get(c.ordinal, 0) != sys.maxsize]
        if tokens is not None and any(reach.get(c.ordinal) == sys.maxsize for c in mattering):
            counted.append(tokens)
        most = max(counted, default=0)
        broad = [c for c in mattering if 8 * reach.get(c.ordinal, 0) >= most]
        pool = [c for c in pool if c in broad] or pool
        anchor = pool[-1]
        followers: tuple[int, ...] = ()  # later calls that only read the decision back (made mirrors once checked)
        if lead is not None:  # (established again, the decision in the call that the anchor reads back)
            anchor, followers = calls[lead[0]], (lead[1],)
            if anchor not in broad or calls[lead[1]] is not pool[-1]:
                raise _refuse(name, calls, "the call its decision reads back moved between runs", fix)
        slots = [anchor.ordinal]
        hold = {anchor.ordinal: seen.outs[anchor.ordinal]}
        for c in reversed([m for m in broad if m.ordinal < anchor.ordinal]):
            pairs = [(calls[i], seen.outs[i]) for i in slots]
            if c.width != anchor.width or not _disjoint(c, seen.outs[c.ordinal], pairs):
                continue  # a slot of the decision never repeats an expert the other slots chose
            if effect(c.ordinal, hold):  # its indices still reach the output: a slot of the decision
                slots.insert(0, c.ordinal)
                hold[c.ordinal] = seen.outs[c.ordinal]
        odd = next((calls[i].family for i in slots if calls[i].family not in FORCEABLE), None)
        if odd is not None:
            raise _refuse(
                name,
                calls,
                f"its experts are chosen by {'an' if odd[0] in 'aeiou' else 'a'} {odd} of the scores; moe_replay "
                "forces topk, argmax/argmin and "
                "max/min decisions",
                "Select the experts with torch.topk(scores, k), or name another call with mr.Adapter(..., call=N)",
            )
        if tokens is not None and (anchor.width == tokens != anchor.rows or _chooses_tokens(probe, anchor, tokens)):
            raise _refuse(
                name,
                calls,
                f"its decision {anchor.describe()} is a top-k over tokens, not over experts: it chooses among tokens "
                f"(its width follows the number of tokens, {tokens} in this forward"
                + (
                    ""
                    if anchor.width == tokens
                    else f"; it chooses among {anchor.width}: per sequence, in groups, or padded"
                )
                + "): each expert chooses its tokens (expert-choice routing), so there is no per-token choice for "
                "routes to record or replay",
                "Route by token choice (a top-k over experts per token)",
            )
        unchecked = _refuse_chosen_tokens(name, probe, calls, anchor)
        _refuse_rows_out_of_order(name, probe, calls, (anchor.ordinal,), seen=seen2)  # (its plain run: no other)
        used = calls[anchor.ordinal].k

        def unreached(slot: int) -> bool:  # on these inputs and on every other of their shape (rounding aside)
            return not effect(anchor.ordinal, slot=slot) and not _slot_reaches_elsewhere(
                probe, calls, anchor.ordinal, slot
            )

        if len(slots) == 1 and anchor.family == "topk" and 1 < used <= anchor.width and unreached(used - 1):
            # a top-(k+1) whose last slots only feed a statistic (noisy top-k gating's load estimate)
            used -= 1
            while used > 1 and unreached(used - 1):
                used -= 1
        shapers = [c for c in broad if c.ordinal not in slots and c.ordinal < slots[0]]

        held = {i: seen.outs[i] for i in slots}

        def harmless(change: int | None = None, values: int | None = None) -> bool:
            """Can a mask moe_replay cannot read through not reach the output? Where the decision's values
            never do (its values set to 0, then 1: its weights are read elsewhere, a gather of unmasked
            scores at its indices) and moving the earlier choice with the decision held changes nothing."""
            for fill in (0.0, 1.0):
                for i in slots:
                    if calls[i].family in _VALUED:
                        out, _ = probe.run(values=i, fill=fill)
                        if _distance(base, out, tolerance)[0] > tolerance:
                            return False
            out, _ = probe.run(change=change, values=values, hold=held)
            return _distance(base, out, tolerance)[0] <= tolerance

        unmasked = seen.unmasked[slots[0]]
        if not shapers and not unmasked:  # a mask built from an earlier call's values?
            for c in calls[: slots[0]]:
                if c.family in _VALUED and c.ordinal not in slots:
                    _, moved = probe.run(values=c.ordinal)
                    coarse = [t.dtype for t in _leaves(seen.outs[c.ordinal], []) if isinstance(t, torch.Tensor)]
                    masks = len(moved.ins) > slots[0] and _masks_some(seen.ins[slots[0]], moved.ins[slots[0]], *coarse)
                    if masks and not harmless(values=c.ordinal):
                        raise _refuse(
                            name,
                            calls,
                            f"the values of an earlier call ({c.describe()}) select which scores of its decision "
                            "are masked, by an operation moe_replay cannot undo (it reads through masked_fill and "
                            "where only), so a forced expert outside that selection would get a masked weight",
                            "Mask the scores with masked_fill or torch.where",
                        )
        if shapers and unmasked:
            _refuse_shaped_source(name, probe, calls, seen, tuple(slots), used, shapers, tolerance)
        if shapers and not unmasked and not all(harmless(change=c.ordinal) for c in shapers):
            last = shapers[-1]
            _, moved = probe.run(change=last.ordinal)
            a = seen.ins[slots[0]]
            b = moved.ins[slots[0]] if len(moved.ins) > slots[0] else None
            if b is not None and a.shape == b.shape and torch.equal(a, b):  # it does not touch the decision's scores
                choices = [*shapers, *(calls[i] for i in slots)]
                fix_choices = (
                    "Two routers, or one choice per slice: give each choice a module of its own whose forward makes "
                    "it and attach those (include= each), or an Adapter(call=N) naming the one to record. A choice "
                    "made in steps: route with one top-k (or mask the scores before one top-k)"
                )
                why = (
                    "Either they are two routers in one module's forward (per-modality gates, one per projection), "
                    "or one choice in each slice of the experts (expert prototyping: a top-1 in each of k groups of "
                    "E/k experts), or the experts are chosen in steps that no one call holds (top-p: a sort, a "
                    "cumulative sum and an argmax of where it crosses p), none of which is replayed as one decision"
                )
                if (
                    num_experts
                    and len({c.width for c in choices}) == 1
                    and len(choices) * choices[0].width == num_experts
                ):  # (k choices over E/k experts each: its expert count in slices)
                    why = (
                        f"Its {len(choices)} choices are over {choices[0].width} experts each, which together make "
                        f"its {num_experts}: one choice in each slice of the experts (expert prototyping, k top-1 "
                        "gating), whose indices are positions in their slice; moe_replay records and forces one "
                        "choice over all the experts per router, not one per slice"
                    )
                    fix_choices = (
                        "Give each slice's choice a module of its own (its top-1 over its slice, returning positions "
                        "in it) and attach those with include=: each is then a router of "
                        f"{choices[0].width} experts, recorded and replayed on its own"
                    )
                raise _refuse(
                    name,
                    calls,
                    f"its forward makes more than one independent choice that reaches the output ({last.describe()} "
                    f"and its decision {calls[slots[0]].describe()}): moving the earlier one leaves the decision's "
                    f"scores as they were, and one router is one choice per call. {why}",
                    fix_choices,
                )
            leader = _leader(probe, calls, seen, broad, anchor) if lead is None else anchor
            if leader is not anchor:  # the anchor reads back the choice of an earlier call: that one decides
                with contextlib.suppress(UnsupportedRouterError):  # (if not, refused as an earlier choice)
                    return _establish(
                        name,
                        probe,
                        num_experts=num_experts,
                        top_k=top_k,
                        declared_top_k=declared_top_k,
                        family=family,
                        lead=(leader.ordinal, anchor.ordinal),
                    )
            raise _refuse(
                name,
                calls,
                f"an earlier choice ({last.describe()}) reshapes the scores of its decision by an operation "
                "moe_replay cannot undo (it reads through masked_fill and where only, made out of place: not "
                "masked_fill_ in place nor a mask on a view of the scores), so a forced expert outside that choice "
                "would get a masked weight",
                "Mask the scores with masked_fill or torch.where, out of place, and read the weights from scores "
                "the mask leaves untouched (an in-place masked_fill_ on a view also masks the tensor it views)",
            )
        why = "changing its choice changes the output"
        if len(slots) > 1:
            why = f"{len(slots)} successive calls, each of whose choices reaches the output"
        if shapers:
            why += "; earlier choices only shape its scores"
        k = sum(calls[i].k for i in slots) if len(slots) > 1 else used
        if k < calls[anchor.ordinal].k:
            why += f"; only its first {k} of {calls[anchor.ordinal].k} slots reach the output"
        if followers:
            why += f"; {' and '.join(calls[i].describe() for i in followers)} only reads it back"
        ev = _verdict(name, calls, tuple(slots), anchor.width, k, top_k, declared_top_k, probe.scope, why)
        if any(calls[i].k != k for i in followers):  # (answered as a mirror: with the decision's k)
            raise _refuse(name, calls, "the call that reads its decision back takes another k than it", fix)
        ev = dataclasses.replace(ev, mirrors=_mirrors(calls, seen, ev), followers=followers)
        # (a follower is a later choice in these checks, made afresh on other inputs with the decision held: one
        # that reads anything but the decision is refused)
        _refuse_later_choice(name, probe, calls, seen, ev)
        _refuse_escapes(name, probe, calls, seen, ev, tolerance)
        _refuse_value_twins(name, probe, calls, seen, ev, base)
        _refuse_shifted_ids(name, calls, seen, ev, base, _tokens(args, kwargs))
        if unchecked is not None:  # (the other checks passed: this one could not run)
            raise unchecked
        return dataclasses.replace(ev, squashed=_squashed(seen, ev))
    finally:
        probe.snapshot.restore()


def _slot_unreached(
    probe: _Prober, effect: Callable[..., bool], calls: Sequence[Call], ordinal: int, slot: int
) -> bool:
    """Does the last ``slot`` of call ``ordinal`` reach the output neither on these inputs nor on others of their
    shape (a top-(k+1) whose last slot feeds a statistic)? Slot 0 of a call always counts as reached."""
    if slot <= 0:
        return False
    return not effect(ordinal, slot=slot) and not _slot_reaches_elsewhere(probe, calls, ordinal, slot)


def _in_chunks(probe: _Prober, calls: Sequence[Call], seen: _ProbeMode) -> bool:
    """Are the forward's decision-like calls (two or more, all of one form, each changing the output) one choice
    made chunk by chunk of the tokens: each call's rows the tokens of one run of them, the runs in call order and
    together every token once (``x.split(chunk)``, a top-k per chunk)?

    Proven by effect, not read from shapes: the hidden states (the forward's first floating input) are changed on
    the tokens whose bit ``b`` of their position is 1, then on those whose bit is 0, for every bit of the token
    count; a call's row ``r`` must change exactly in the runs that change token ``offset + r`` (the rows of the
    calls before it, then ``r``), and in no other. A row made of another token, of several tokens or of none, a
    call over the same tokens as another (a second opinion), overlapping or reordered chunks: not in chunks. Masked
    scores, rows that are not tokens, or a forward whose calls change with the changed values: not either. Nor
    calls made at different places of the code, over runs of unequal length but a shorter last one, or in a forward
    given any tensor beside its hidden states (gates over the parts of a mask, whose runs another input may
    interleave, are not chunks of the tokens), nor on hidden states with a dimension of one among several of tokens
    (runs of a ``[1, S]`` input's tokens, ``x.split(c, dim=1)``, are runs of every row at once on ``[B, S]``). And a
    chunk's choice, changed, must leave the later chunks' scores as they were: a choice that shapes the next chunk's
    scores (the experts filled so far masked there) is an earlier choice, not a chunk of one decision."""
    if len(calls) < 2 or any(c.signature != calls[0].signature or not c.effect for c in calls):
        return False
    if calls[0].family not in FORCEABLE or any(seen.unmasked[c.ordinal] for c in calls):
        return False
    if any(c.where != calls[0].where for c in calls) or any(c.rows != calls[0].rows for c in calls[:-1]):
        return False  # (one loop over equal chunks, the last one shorter at most: not gates over parts of a mask)
    if calls[-1].rows > calls[0].rows:
        return False
    found = _first_floating((probe.args, probe.kwargs))
    if found is None:
        return False
    path, x = found
    if x.dim() > 2 and any(int(s) == 1 for s in x.shape[:-1]):
        return False  # (runs of [1, S] tokens may be runs of each row of [B, S] in another forward: not provable)
    if any(isinstance(t, torch.Tensor) and t is not x for t in _leaves((probe.args, probe.kwargs), [])):
        return False  # (a mask or ids beside the hidden states may split the tokens otherwise in another forward)
    tokens = x.numel() // max(int(x.shape[-1]), 1)
    rows = [c.rows for c in calls]
    if sum(rows) != tokens or any(r < 1 for r in rows) or len(seen.ins) < len(calls):
        return False
    base = [seen.ins[c.ordinal].detach().reshape(c.rows, -1) for c in calls]
    position = torch.arange(tokens)
    flat = x.detach().reshape(tokens, -1)
    spread = flat.float().std(unbiased=False).clamp_min(1e-3)
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(tokens)).to(flat.device)
    bumped = flat + (noise * spread + spread).to(dtype=flat.dtype)  # (made once: each run picks its rows of it)
    for bit in range(max(1, (tokens - 1).bit_length())):
        for side in (1, 0):
            picked = ((position >> bit) & 1) == side
            changed = torch.where(picked.to(flat.device)[:, None], bumped, flat).reshape(x.shape)
            try:  # (``changed``, made for this run alone, is handed to the forward as it is)
                _, moved = probe.run(inputs=_replaced((probe.args, probe.kwargs), path, changed), own=changed)
            except Exception as e:
                _only_forwards(e)
                return False
            if [c.signature for c in moved.calls] != [c.signature for c in calls] or len(moved.ins) < len(calls):
                return False
            offset = 0
            for c, before in zip(calls, base, strict=True):
                after = moved.ins[c.ordinal].detach()
                if after.numel() != before.numel():
                    return False
                differs = (after.reshape(c.rows, -1) != before).any(dim=1).cpu()
                if not torch.equal(differs, picked[offset : offset + c.rows]):
                    return False
                offset += c.rows
    for c in calls[:-1]:  # (a chunk's choice moved leaves the later chunks' scores as they were: none shapes them)
        try:
            _, moved = probe.run(change=c.ordinal)
        except Exception as e:
            _only_forwards(e)
            return False
        if len(moved.ins) < len(calls) or any(
            moved.ins[o.ordinal].numel() != base[o.ordinal].numel()
            or not torch.equal(moved.ins[o.ordinal].detach().reshape(base[o.ordinal].shape), base[o.ordinal])
            for o in calls[c.ordinal + 1 :]
        ):
            return False
    return True


def _refuse_shifted_chunks(name: str, calls: Sequence[Call], seen: _ProbeMode, ev: Evidence, base: Any) -> None:
    """:func:`_refuse_shifted_ids` for a decision made in chunks of tokens: the chunks' chosen positions, in order,
    handed on shifted by a constant (``idx + 1``) as the ids the router returns are positions in a slice of its
    scores, not its experts' ids."""
    try:
        mine = torch.cat([_indices(seen.outs[i], calls[i].family, calls[i].rows).long() for i in ev.decision])
    except (RuntimeError, IndexError, TypeError):
        return
    for t in _leaves(base, []):
        if (
            not isinstance(t, torch.Tensor)
            or t.is_floating_point()
            or t.is_complex()
            or t.dtype == torch.bool
            or t.numel() != mine.numel()
            or not t.numel()
        ):
            continue
        shift = t.detach().reshape(mine.shape).long().to(mine.device) - mine
        c = int(shift.flatten()[0])
        if c and bool((shift == c).all()):
            raise _refuse(
                name,
                calls,
                f"its decision ({_chosen(ev)}) chooses from {calls[ev.decision[0]].width} scores chunk by chunk of "
                f"the tokens, and it returns the chosen positions shifted by {c:+d}: what moe_replay records and "
                "forces are positions among those scores, not the expert ids the model uses, so the routes' loads "
                f"and expert counts and the routes exchanged with an inference engine would be off by {c:+d}",
                "Take the top-k over all the scores with the excluded columns masked "
                "(scores.masked_fill(excluded, float('-inf')).topk(k)), so that its indices are the experts' own ids",
            )


def _leader(probe: _Prober, calls: Sequence[Call], seen: _ProbeMode, broad: Sequence[Call], anchor: Call) -> Call:
    """The earlier call whose choice ``anchor`` only reads back, or ``anchor`` itself.

    Straight-through one-hot routing (Gumbel-softmax top-1 in eval: ``one_hot(argmax(logits))``, the expert then
    read back by an ``argmax`` of the one-hot and weighted by its value) makes its decision in an earlier call
    over the same experts; the last call finds those experts again in scores that the earlier one made. Forcing
    the last alone would weigh a forced expert by the one-hot's 0; forcing the earlier one is the decision. It is
    the leader where it is a forceable call of the same width, k and rows, its experts are the anchor's, and
    with its experts moved, the anchor finds the moved ones (per row, as sets). Whether the anchor reads anything
    but the leader is checked afterwards, as for every later choice (see :func:`_refuse_later_choice`).
    """
    mine = _indices(seen.outs[anchor.ordinal], anchor.family, anchor.rows).sort(-1).values
    for c in reversed([m for m in broad if m.ordinal < anchor.ordinal]):
        if c.family not in FORCEABLE or (c.width, c.k, c.rows) != (anchor.width, anchor.k, anchor.rows):
            continue
        if not torch.equal(_indices(seen.outs[c.ordinal], c.family, c.rows).sort(-1).values, mine):
            continue
        _, moved = probe.run(change=c.ordinal)
        if [m.signature for m in moved.calls] != [m.signature for m in calls]:
            continue
        lead = _indices(moved.outs[c.ordinal], c.family, c.rows).sort(-1).values
        follow = _indices(moved.outs[anchor.ordinal], anchor.family, anchor.rows).sort(-1).values
        if not torch.equal(lead, mine) and torch.equal(follow, lead):
            return c
    return anchor


def _refuse_shaped_source(
    name: str,
    probe: _Prober,
    calls: Sequence[Call],
    seen: _ProbeMode,
    slots: tuple[int, ...],
    used: int,
    shapers: Sequence[Call],
    tolerance: float,
) -> None:
    """Refuse a decision whose masked scores read through to scores an earlier choice still shapes,
    or reach the output by another way than the decision's values.

    A replay reads a forced expert's value through the ``masked_fill``/``where`` that made the
    decision's scores. When what it reads through to was itself built from an earlier choice (a
    top-4 scattered into zeros, then masked and a top-2 taken), a forced expert outside the
    earlier choice gets a weight of zero. Seen by holding the decision and moving each earlier
    choice: the scores read through must not be filled (zero or infinite) in other places.
    Only the decision's values are read through: where the forward also reads the masked scores
    themselves (the combine weights taken from them at the chosen experts, as Hunyuan's
    ``topkgating`` does), a forced expert outside the earlier choice gets a masked weight too.
    Seen the same way: with the decision held, moving an earlier choice must leave the output.
    """
    force = {i: (seen.outs[i], used if len(slots) == 1 else calls[i].k) for i in slots}
    held, ref = probe.run(force=force)
    before = ref._unmasked(ref.ins[slots[0]]) if len(ref.ins) > slots[0] else None
    moves = []
    for c in shapers:
        out, moved = probe.run(change=c.ordinal, force=force)
        moves.append((c, out))
        if before is None or before is ref.ins[slots[0]]:
            continue  # (no mask seen in this run)
        if len(moved.ins) > slots[0] and _fills_moved(before, moved._unmasked(moved.ins[slots[0]])):
            raise _refuse(
                name,
                calls,
                f"its decision's scores are masked with masked_fill or where, but what that mask reads through "
                f"to is itself shaped by an earlier choice ({c.describe()}), so a forced expert outside that "
                "choice would get a masked weight",
                "Mask the unmasked scores themselves (masked_fill/torch.where on the scores the earlier choice "
                "was made from)",
            )
    for c, out in moves:
        if _distance(held, out, tolerance)[0] > tolerance:
            raise _refuse(
                name,
                calls,
                f"its decision's scores are masked with masked_fill or where after an earlier choice "
                f"({c.describe()}), and its forward reads the masked scores by another way than the decision's "
                "values (its weights taken from the masked scores, say): with the decision held, the output "
                "changes when that choice moves, so a forced expert outside it would get a masked weight",
                "Take the weights from the decision's values (topk of the masked scores) or gather them from "
                "the unmasked scores at the chosen experts",
            )


def _fills_moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Are other places of the scores filled (zero, or infinite as a mask makes them) after than before?"""
    if before.shape != after.shape:
        return True
    a, b = before.detach(), after.detach()
    return bool((((a == 0) | a.isinf()) != ((b == 0) | b.isinf())).any())


#: Random inputs a decision is held on, beside the real inputs with their tokens rolled (seeds).
_OTHER_INPUTS = (0, 1, 2, 3, 4, 5)


def _mirrors(calls: Sequence[Call], seen: _ProbeMode, ev: Evidence) -> tuple[int, ...]:
    """Later calls of a one-call decision that choose from its very scores tensor, k of the same width, and
    find its experts (Switch's ``max(probs).values`` after ``argmax(probs)``): natively the same choice,
    so a replay answers them with the forced experts (their values read at those experts)."""
    if len(ev.decision) != 1:
        return ()
    d = calls[ev.decision[0]]
    mine = _indices(seen.outs[d.ordinal], d.family, d.rows)[:, : ev.top_k]
    found = []
    for c in calls[d.ordinal + 1 :]:
        if (
            c.family in FORCEABLE
            and c.width == d.width
            and c.k == ev.top_k
            and c.rows == d.rows
            and seen.ins[c.ordinal] is seen.ins[d.ordinal]
            and torch.equal(_indices(seen.outs[c.ordinal], c.family, c.rows), mine)
        ):
            found.append(c.ordinal)
    return tuple(found)


#: A value twin (see :func:`_refuse_value_twins`) whose values raised (see :func:`_lifted_values`) move the output by
#: less than this part of its largest magnitude only shifts or scales what cancels (a stable softmax's maximum, scores
#: divided by their best and renormalised): rounding, in any floating dtype.
_SHIFT_ROUNDING = 0.05


def _beyond_rounding(base: Any) -> Callable[[Any], bool]:
    """Does another output than ``base`` differ from it by more than :data:`_SHIFT_ROUNDING` of its largest
    magnitude, in its floating values (the weights; not the indices, where rounding may settle a tie the other
    way)?"""
    floats = [t for t in _leaves(base, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    scale = max(
        (float(t.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max()) for t in floats if t.numel()), default=0.0
    )

    def moves(out: Any) -> bool:
        theirs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return _distance(floats, theirs)[0] > _SHIFT_ROUNDING * scale

    return moves


def _moved_leaves(base: Any, out: Any) -> set[int]:
    """Which floating tensors of an output (by position among them) another output moves beyond rounding (as
    :func:`_beyond_rounding` judges the whole)."""
    floats = [t for t in _leaves(base, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    theirs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(floats) != len(theirs):
        return set(range(max(len(floats), len(theirs))))
    scale = max(
        (float(t.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max()) for t in floats if t.numel()), default=0.0
    )
    pairs = enumerate(zip(floats, theirs, strict=True))
    return {i for i, (a, b) in pairs if _distance(a, b)[0] > _SHIFT_ROUNDING * scale}


def _refuse_value_twins(
    name: str, probe: _Prober, calls: Sequence[Call], seen: _ProbeMode, ev: Evidence, base: Any
) -> None:
    """Refuse a router whose output reads the values of another call that natively makes its decision's choice.

    ``w = probs.max(-1).values`` beside ``idx = probs.argmax(-1)`` (in either order, or over the logits), the values
    of one ``topk`` and the indices of another, a ``sort``'s leading values: natively the weights of the chosen
    experts. A replay forces the decision, not that call, which still reads the natively best experts' scores, so
    the recorded experts would be weighted (and get gradients) as other experts, with no error. Only a later call
    over the decision's very scores is answered with the forced experts (a mirror); any other such call whose
    values reach the output is refused. A call whose values only shift or scale what cancels (a stable softmax's
    maximum, scores divided by their best, then renormalised) moves the output by rounding when its values are
    raised (slot ``j`` by ``j + 1``: weights read from them change, renormalised too, however close the scores
    of a router near its initialisation are), and passes.
    """
    first = calls[ev.decision[0]]
    skip = {*ev.decision, *ev.mirrors, *ev.followers}
    try:
        mine = _indices(seen.outs[first.ordinal], first.family, first.rows)[:, :1]
    except (RuntimeError, IndexError, TypeError):
        return
    moves = _beyond_rounding(base)
    held = _force(calls, seen, ev)

    def tips_only(**lifted: Any) -> bool:
        # (with the decision held at its native choice the lift moves nothing: it only settled a tie among scores
        # that round alike, as bfloat16 probabilities do, the other way, which dense weights show)
        return not moves(probe.run(force=held, lift=True, **lifted)[0])

    for c in calls:
        if c.ordinal in skip or c.family not in _VALUED or c.width != first.width or c.rows != first.rows:
            continue
        try:
            theirs = _indices(seen.outs[c.ordinal], c.family, c.rows)
        except (RuntimeError, IndexError, TypeError):
            continue
        # a sort's best is its first slot, or its last where ascending (probs.sort(-1).values[..., -1:])
        ends = (theirs[:, :1], theirs[:, -1:]) if c.family == "sort" else (theirs[:, :1],)
        if not any(end.shape == mine.shape and torch.equal(end, mine) for end in ends):
            continue  # not natively the decision's choice
        moved, _ = probe.run(values=c.ordinal, lift=True)
        if moves(moved) and not tips_only(values=c.ordinal):
            _refuse_twin(name, probe, calls, ev, c.describe(), base, moved)
    for n, (width, rows, theirs, where) in enumerate(seen.peaks):
        if width != first.width or rows != first.rows or theirs.shape != mine.shape or not torch.equal(theirs, mine):
            continue
        moved, _ = probe.run(peak=n, lift=True)
        if moves(moved) and not tips_only(peak=n):
            _refuse_twin(name, probe, calls, ev, f"amax() over {width} at {where}", base, moved)
    _refuse_hidden_maxima(name, probe, calls, ev, seen, mine)


def _refuse_hidden_maxima(
    name: str, probe: _Prober, calls: Sequence[Call], ev: Evidence, seen: _ProbeMode, mine: torch.Tensor
) -> None:
    """Refuse a router whose output reads the natively best expert's score through a maximum no decision-like call
    along the experts takes (``probs.t().max(0)``, a max-pool, an infinity norm, a ``cummax``'s last value), checked
    by effect: with the decision (and its mirrors) answered as a replay answers other experts than the native ones,
    a result that is still the row maximum of scores that natively pick the decision's best expert is the native
    best's score, not the forced experts'; where raising it by 1 moves the output beyond rounding (it is no shift
    or scale that cancels), the recorded experts would be weighted as the natively best one.

    A row maximum the same in every row (a stable softmax's exp(0), probabilities that round to 1, scores that
    are one row repeated) is matched by a weight of 1 made otherwise (a softmax over the decision's one value, a
    renormalised sum, ``ones``): there only a result made from those scores, not from the decision's result,
    counts (see :meth:`_ProbeMode._watched`)."""
    first = calls[ev.decision[0]]
    width, best = first.width, mine.reshape(-1)
    if ev.top_k >= width:
        return  # (every expert chosen: no other to force)
    others = _runners_up(seen.ins[first.ordinal], best, width)
    native, force = _force(calls, seen, ev), {}
    start = 0
    for i in ev.decision:  # (successive slots: each its own next experts)
        held, used = native[i]
        force[i] = (_avoiding(calls[i].family, held, others[:, start:]), used)
        start += calls[i].k if len(ev.decision) > 1 else 0
    for i in (*ev.mirrors, *ev.followers):
        force[i] = (_avoiding(calls[i].family, seen.outs[i], others), ev.top_k)
    if any(held is None for held, _ in force.values()):
        return  # (indices of another shape than one row per token: judged by the other checks)
    base, watched = probe.run(force=force, watch=(width, best, others[:, : ev.top_k]))
    # (elements the forced run leaves non-finite, weights of forced experts whose probabilities a narrow dtype
    # rounds to 0, tell nothing: the others are judged)
    finite = _finite_in(base)
    moves = _beyond_rounding(finite(base))
    for n, leaf, what in watched.hidden:
        moved, _ = probe.run(force=force, bump=(n, leaf))
        if moves(finite(moved)):
            _refuse_twin(name, probe, calls, ev, what, base, moved)


def _finite_in(base: Any) -> Callable[[Any], list[torch.Tensor]]:
    """The floating tensors of an output (by position) with the elements where those of ``base`` are not finite set
    to 0; an output of another structure is left as it is (judged as differing)."""
    floats = [t for t in _leaves(base, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = [~t.detach().isfinite() for t in floats]

    def finite(out: Any) -> list[torch.Tensor]:
        theirs = [t for t in _leaves(out, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(theirs) != len(floats) or any(t.shape != m.shape for t, m in zip(theirs, bad, strict=True)):
            return theirs
        return [t.detach().masked_fill(m, 0.0) for t, m in zip(theirs, bad, strict=True)]

    return finite


#: functions whose result holds values of their input as they are (a view, a slice, a copy): such a result of a
#: decision-like call's values is judged with them
_VIEWING = frozenset(
    {
        "__getitem__", "narrow", "select", "view", "reshape", "squeeze", "unsqueeze", "expand", "contiguous",
        "clone", "detach", "flatten", "unflatten", "to", "float", "double", "half", "bfloat16", "type_as",
    }
)  # fmt: skip


def _runners_up(scores: Any, best: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's experts other than its native best, ``[rows, width - 1]``: by the decision's scores, best first,
    where they are one row of ``width`` per token (the experts a replay most likely forces, whose weights are the
    largest of the others: in a narrow dtype the least rounded); else in the order of their numbers after it."""
    rows = best.shape[0]
    if (
        isinstance(scores, torch.Tensor)
        and scores.is_floating_point()
        and tuple(scores.shape) == (rows, width)
        and scores.device == best.device
    ):
        order = scores.detach().float().argsort(dim=-1, descending=True, stable=True)
        kept = order != best[:, None].to(order.dtype)
        if bool((kept.sum(-1) == width - 1).all()):
            return order[kept].reshape(rows, width - 1)
    return (best[:, None] + 1 + torch.arange(width - 1, device=best.device)) % width


def _avoiding(family: str, held: Any, others: torch.Tensor) -> Any:
    """``held`` (a decision-like call's result) with its indices the first of ``others`` (``[rows, n]``: experts
    other than each row's native best, in slot order), its values kept; None where its indices are not ``k`` per
    row of ``others``."""
    idx = held if family in ("argmax", "argmin") else held[1]
    rows = others.shape[0]
    if not isinstance(idx, torch.Tensor) or not rows or idx.numel() % rows:
        return None
    k = idx.numel() // rows
    if k > others.shape[1]:
        return None
    new = others[:, :k].reshape(idx.shape).to(device=idx.device, dtype=idx.dtype)
    return new if family in ("argmax", "argmin") else type(held)((held[0], new))


def _squashed(seen: _ProbeMode, ev: Evidence) -> bool | None:
    """:attr:`Evidence.squashed`, from a traced run: that of the decision's first call's scores."""
    first = ev.decision[0]
    return seen.squashes[first] if first < len(seen.squashes) else None


def _column_offset(x: torch.Tensor) -> tuple[int, int]:
    """Where along the last dimension of the rows it views ``x`` starts, and their width: ``(0, width)`` for a
    tensor of its own, ``(j, n)`` for a slice ``scores[..., j:]`` of rows of ``n`` (read from its strides, not
    from the tensor it views)."""
    width = int(x.shape[-1]) if x.dim() else 0
    if x.dim() < 2 or x.stride(-1) <= 0 or x.stride(-2) <= 0 or x.stride(-2) % x.stride(-1):
        return 0, width
    row = x.stride(-2) // x.stride(-1)  # the width of the rows it views, in elements
    if row <= width:
        return 0, width
    return (x.storage_offset() // x.stride(-1)) % row, row


def _refuse_shifted_ids(
    name: str, calls: Sequence[Call], seen: _ProbeMode, ev: Evidence, base: Any, tokens: int | None = None
) -> None:
    """Refuse a router that hands on its decision's chosen positions shifted by a constant (``idx + 1``) as the ids
    it returns: its decision chose from a slice of its scores (``scores[..., 1:]`` past a null expert, viewed or
    copied before the top-k), or its ids are offset for another reason.

    What is recorded (and forced) are the decision's indices, positions in the slice; the experts the model uses
    are those positions shifted. A replay would be exact, but the routes would name other experts than the model
    uses: their loads and expert counts, and the routes handed to or taken from an inference engine (which counts
    the model's expert ids), off by the shift, with no error. Where the router hands on the positions unchanged,
    they are its expert ids, and it passes.

    The same for one decision over ``G`` groups of scores at once (a top-k over the last dimension of ``[..., G,
    W]`` scores, the group's offset ``g * W`` added to its positions: mixture of grouped experts, k top-1 gating in
    one call): each group of each token is a row of the decision, choosing among ``W``, and the routes would name
    positions within a group, ``G`` rows per token. ``tokens`` (those of the forward's hidden states): where the
    decision has one row per token and the router also hands on the positions unchanged (its ids), its ``[..., G,
    W]`` scores may be ``[batch, positions, experts]`` scores, and positions with ``position * W`` added a flat
    index into them (a scatter's), not ids: that passes. (A router fed each head's part of a token, ``[tokens,
    H, d / H]``, has one row per head and token too: handing on only shifted positions, it is refused.)"""
    if len(ev.decision) != 1:
        return
    d = calls[ev.decision[0]]
    scores = seen.ins[d.ordinal]
    groups = int(scores.shape[-2]) if isinstance(scores, torch.Tensor) and scores.dim() >= 3 else 1
    offset, row = _column_offset(scores)
    try:
        mine = _indices(seen.outs[d.ordinal], d.family, d.rows)[:, : ev.top_k].long()
    except (RuntimeError, IndexError, TypeError):
        return
    shifts = [
        t.detach().reshape(mine.shape).long().to(mine.device) - mine
        for t in _leaves(base, [])
        if isinstance(t, torch.Tensor)
        and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        and t.numel() == mine.numel()
        and t.numel()
    ]
    if d.rows == tokens and any(not bool(shift.any()) for shift in shifts):
        groups = 1  # (one row per token, its ids handed on as they are: no groups of experts)
    for shift in shifts:
        if groups > 1 and mine.shape[0] % groups == 0:
            per_group = (torch.arange(groups, device=mine.device) * d.width).repeat(mine.shape[0] // groups)
            if bool((shift == per_group[:, None]).all()):
                raise _refuse(
                    name,
                    calls,
                    f"its decision ({d.describe()}) chooses in each of {groups} groups of {d.width} scores at once "
                    f"(a choice over the last dimension of scores shaped {tuple(scores.shape)}), and it returns the "
                    f"chosen positions shifted by their group's offset (group g by g * {d.width}): what moe_replay "
                    f"would record and force are positions within a group, {groups} rows per token, not the expert "
                    "ids the model uses, so the routes' loads and expert counts and the routes exchanged with an "
                    "inference engine would be wrong",
                    "Give each group's choice a module of its own (its top-k over its group's scores, returning "
                    f"positions in it) and attach those with include=: each is then a router of {d.width} experts, "
                    "recorded and replayed on its own",
                )
        c = int(shift.flatten()[0])
        if c and bool((shift == c).all()):
            where = (
                f"a slice of its scores (columns {offset} to {offset + d.width - 1} of {row})"
                if offset
                else f"{d.width} scores"
            )
            raise _refuse(
                name,
                calls,
                f"its decision ({d.describe()}) chooses from {where}, and it returns the chosen positions shifted by "
                f"{c:+d}: what moe_replay records and forces are positions among those scores, not the expert ids "
                "the model uses, so "
                "the routes' loads and expert counts and the routes exchanged with an inference engine would be off "
                f"by {c:+d}",
                "Take the top-k over all the scores with the excluded columns masked "
                "(scores.masked_fill(excluded, float('-inf')).topk(k)), so that its indices are the experts' own ids",
            )


def _refuse_twin(
    name: str, probe: _Prober, calls: Sequence[Call], ev: Evidence, what: str, base: Any, moved: Any
) -> None:
    """The refusal of :func:`_refuse_value_twins` (``moved``: the output with that call's values raised).

    Where those values reach only other outputs than the weights (those that raising the decision's own values
    moves), as a confidence returned beside the weights for a log or an auxiliary loss, the router alone cannot
    tell whether its caller weighs the experts by them: the refusal says so, and how to let moe_replay check the
    block that reads them."""
    decision = " + ".join(calls[i].describe() for i in ev.decision)
    twin = _moved_leaves(base, moved)
    weights: set[int] = set()
    for i in ev.decision:
        if calls[i].family in _VALUED:
            weights |= _moved_leaves(base, probe.run(values=i, lift=True)[0])
    if weights and twin and twin.isdisjoint(weights):
        raise _refuse(
            name,
            calls,
            f"it returns the values of {what} (the score of the natively best expert: a confidence) beside its "
            f"weights, and that call natively chooses as its decision ({decision}) does. A replay forces the "
            "decision but not that call, which still reads the natively best expert's score; whether its caller "
            "weighs the experts by it (wrong for the recorded experts) or only logs it or feeds an auxiliary loss "
            "cannot be told from the router alone",
            'Let moe_replay check the block that reads it: mr.Adapter(name, match=..., scope="parent") '
            "intercepts the router's parent block (a confidence that reaches its output only as a log or a loss "
            "then replays; one that weighs the experts stays refused), or return the confidence at the "
            "decision's own indices (scores.gather(-1, indices))",
        )
    raise _refuse(
        name,
        calls,
        f"its output reads the values of {what}, which natively chooses as its decision ({decision}) does: the "
        "scores of the natively best experts, used as their weights. A replay forces the decision but not that "
        "call, so the recorded experts would be weighted (and get gradients) as other experts",
        "Read the weights at the decision's own indices (scores.gather(-1, indices)), or take them from the "
        "decision's values (values, indices = torch.topk(scores, k)), or name the module whose forward "
        "returns both with include=",
    )


def _refuse_later_choice(name: str, probe: _Prober, calls: Sequence[Call], seen: _ProbeMode, ev: Evidence) -> None:
    """Refuse a router whose forward chooses again from the current scores after its decision.

    A replay forces the decision; a later choice made from the scores (a top-p or minimum-weight
    cut, tokens dropped by score over a capacity) would run on the replayed forward's own scores
    and keep other experts than the recorded ones, with no error. So the decision is held as a
    replay answers it (the recorded indices, the values read from the current scores), and the
    calls after it that make integers or booleans out of floating values, or cut them piecewise,
    are its later choices (see :meth:`_ProbeMode._after`). Where there are any, the forward runs
    on other inputs (the tokens rolled; random values of the inputs' mean and spread) twice:
    the later choices made afresh, and held at their results on the real inputs (those made from
    the scores or that cut the decision; the others, an expert's ``relu`` of its own units, made
    afresh in both: see :func:`_by_scores`). If the
    output's structure differs between the two (other experts named, zeros in other places: a
    weight cut to zero is an expert dropped), the later choices pick the experts: refused. So is
    one whose later choices over every expert, held, change the values of the weights it returns
    (:func:`_reweighed`: a renormalisation over the experts that reach the decision's k-th value), and
    a forward with later choices that cannot be checked (no other input runs). Choices that do
    not reach the output (a statistic, a log) or always agree (a guarded division) pass, and so
    does a weight under a thousandth of the largest, too small to tell from rounding. A forward of
    fewer than ``_FEW_TOKENS`` tokens is checked again on random inputs of that many, where it
    runs on them: a choice among tokens (a capacity by score) has nothing to choose from in one.
    Then on one of its tokens repeated (at least ``_MANY_TOKENS`` times), which sends every token to
    the same experts: a capacity that the real tokens, spread over the experts, left unfilled is
    filled there, so tokens dropped by score over it are seen whatever the batch the router was
    first run on.

    A forward that draws from a random stream with the decision held is run again so under another
    random state (see :func:`_refuse_drawn_choice`): experts dropped at random after the decision
    (DeepSpeed's random token selection) are refused too. A cut by values that are not the scores
    (the hidden states' own) that none of those inputs trips is varied once more on the real inputs
    with the later half of the tokens' hidden states zeroed (:func:`_padded_inputs`): padding tokens,
    which a router may drop after its decision (Flaxformer's ``ignore_padding_tokens``), so that a
    router first run on a batch without padding is not accepted to record a later padded batch's
    padding tokens under experts they did not use.
    """
    force = _force(calls, seen, ev)
    _, first = probe.run(force=force)
    drew = probe.snapshot.drew()
    if first.early:
        _refuse_earlier_choice(name, probe, calls, force, first, ev)
    if first.choices:
        _refuse_scored_choice(name, probe, calls, force, first, ev)
    else:
        _refuse_choice_on_more_tokens(name, probe, calls, force, ev)
    if drew:
        _refuse_drawn_choice(name, probe, calls, force, ev, seen.drawn, first.draws)


def _refuse_scored_choice(
    name: str, probe: _Prober, calls: Sequence[Call], force: dict[int, tuple[Any, int]], first: _ProbeMode, ev: Evidence
) -> None:
    """The part of :func:`_refuse_later_choice` that varies the later choices ``first`` made (the decision held)."""
    chosen = " + ".join(calls[i].describe() for i in ev.decision)
    later = ", ".join(dict.fromkeys(first.where))
    fix = (
        "Make that choice part of the decision (mask the scores with masked_fill or torch.where before the "
        "top-k), or drop tokens and experts after it only by rules that neither read the scores nor draw from "
        "the random stream (position, a fixed capacity)"
    )
    checked, where = _vary(probe, force, first, probe.args, probe.kwargs, ev, early=False)
    if where is None and checked and any(first.cuts) and not any(first.scored):
        # (a cut by the hidden states' own values that no rolled or random input trips: padding tokens, whose rows
        # are zeros where T5 and Flaxformer feed them, dropped after the decision on a later, padded batch)
        padded = _padded_inputs(probe.args, probe.kwargs)
        _, where = _vary(probe, force, first, probe.args, probe.kwargs, ev, early=False, others=padded)
        where = None if where is None else f"{where}, with some tokens' hidden states all zeros as padding,"
    if where is None and checked and calls[ev.decision[0]].rows < _FEW_TOKENS:
        where = _check_on_more_tokens(probe, calls, ev)
    if where is None and checked:
        where = _check_on_more_tokens(probe, calls, ev, one_token=True)
    if where is None and checked:
        moved = _vary_state(probe, force, first, ev)
        if moved is not None:
            raise _refuse(
                name,
                calls,
                f"after its decision ({chosen}) its forward chooses again by comparing values with tensors it "
                f"holds (at {later}): with the decision held and those tensors moved, as training or a schedule "
                f"moves them (a minimum weight, a threshold per expert), {moved} changes. On the state it was "
                "first run under that choice cut nothing, but once it does, a replay forces the decision and "
                "not that later choice, and the rows recorded name experts it dropped",
                fix,
            )
    if where is not None and not any(first.scored) and any(first.cuts):
        raise _refuse(
            name,
            calls,
            f"after its decision ({chosen}) its forward cuts it by values that are not its scores (at {later}: "
            f"the hidden states' own, say): with the decision held, {where} changes when those values change. "
            "The rows recorded for a token it cuts name an expert that token did not use, so routes handed on "
            "(to an engine, a load count) would not be the experts used",
            "Drop a slot by a rule the routes can carry: make the cut part of the decision (mask the scores "
            "before the top-k), or record the routes of a module that returns the experts kept",
        )
    if where is not None:
        raise _refuse(
            name,
            calls,
            f"after its decision ({chosen}) its forward chooses again from the current scores (at {later}): "
            f"with the decision held, {where} changes when the scores change. A replay forces the decision "
            "but not that later choice (a top-p or minimum-weight cut, tokens dropped by score over a "
            "capacity), so the experts used would not be the recorded ones",
            fix,
        )
    if not checked:
        raise _refuse(
            name,
            calls,
            f"after its decision ({chosen}) its forward makes choices from floating values (at {later}) that "
            "could not be checked: it takes no floating input of two or more dimensions to vary, or fails on "
            "every other input tried. A later choice from the current scores would not be replayed",
            fix + "; or name the module whose forward returns the decision with include=",
        )


def _refuse_choice_on_more_tokens(
    name: str, probe: _Prober, calls: Sequence[Call], force: dict[int, tuple[Any, int]], ev: Evidence
) -> None:
    """The part of :func:`_refuse_later_choice` for a forward that makes no later choice on its real inputs.

    Its code may still choose after the decision on other batches: a branch on the token count (a capacity
    enforced on large batches only), one on a capacity the real tokens left unfilled (``if counts.max() >
    capacity:``), or one on a value read back to Python (``if float(w.min()) < eps:``). None runs on the real
    inputs, and a later forward that takes it makes the same decision-like calls (a top-k of one expert's
    weights over its tokens has one dimension), so nothing would tell it there. So the decision is held on one
    of the tokens repeated ``_MANY_TOKENS`` times, which sends every token to the same experts (any capacity
    below that count fills), and on the inputs of the real ones' shape four times as spread (sharper scores,
    more lopsided weights): later choices made there are varied as on the real inputs (:func:`_vary`), and
    refused where they pick the experts. A branch taken only on still more tokens, or on values none of these
    reach, is not run."""
    where = _check_on_more_tokens(probe, calls, ev, one_token=True)
    on = "on more tokens than it was first run on"
    if where is None:
        on = "on other inputs than it was first run on"
        spread = list(_other_inputs(probe.args, probe.kwargs))[-2:]  # (the two four times as spread)
        for args, kwargs in spread if _first_floating((probe.args, probe.kwargs)) is not None else ():
            try:
                _, first = probe.run(force=force, inputs=(args, kwargs))
            except Exception as e:  # (a forward that fails on other inputs tells nothing either way)
                _only_forwards(e)
                continue
            if first.choices:
                where = _vary(probe, force, first, args, kwargs, ev, early=False)[1]
                if where is not None:
                    break
    if where is None:
        return
    raise _refuse(
        name,
        calls,
        f"after its decision ({_chosen(ev)}) its forward chooses again from the current scores {on}: with the "
        f"decision held, {where} changes when the scores change. A replay of such a batch forces the decision "
        "but not that later choice (tokens dropped by score over a capacity, a cut taken on some batches only), "
        "so the experts used would not be the recorded ones",
        "Make that choice part of the decision (mask the scores with masked_fill or torch.where before the "
        "top-k), or drop tokens and experts after it only by rules that neither read the scores nor draw from "
        "the random stream (position, a fixed capacity)",
    )


def _refuse_escapes(
    name: str, probe: _Prober, calls: Sequence[Call], seen: _ProbeMode, ev: Evidence, tolerance: float
) -> None:
    """Refuse a router whose forward hands values of the expert width out of torch (``tensor.numpy()``,
    ``.tolist()``, another library's operator) and gets back what reaches its output.

    No mode sees what code outside torch does with them: it may choose the experts the tokens go to
    (an ``argsort`` in numpy, a fused kernel) while a ``torch.topk`` beside it sets only their weights,
    and a replay would force that top-k alone. So, with the decision held as a replay answers it, the
    forward runs again with those values handed over with their experts moved (the last dimension rolled
    by one): an output that changes (past the run-to-run noise) reads something chosen there. Logging a
    copy changes nothing, and passes; a forward that makes no such call costs nothing here.
    """
    if not seen.escapes:
        return
    force = _force(calls, seen, ev)
    held, _ = probe.run(force=force)
    mode = _ProbeMode(None, {}, scramble=ev.num_experts)  # (what a run that raises noted is lost with it)
    try:
        moved, mode = probe.run(force=force, scramble=ev.num_experts)
    except Exception as e:  # the forward fails on what comes back (split sizes read from the moved values, say)
        _only_forwards(e)  # (moe_replay's own error there refuses as such, never as the forward's failure)
        mode.escapes, mode._rolled = seen.escapes, [held]
    else:
        if not mode._rolled or _distance(held, moved, tolerance)[0] <= tolerance:
            return
    chosen = " + ".join(calls[i].describe() for i in ev.decision)
    where = ", ".join(dict.fromkeys(mode.escapes))
    raise _refuse(
        name,
        calls,
        f"its forward hands values over {ev.num_experts} experts out of torch ({where}) "
        f"and what comes back reaches its output: with its decision ({chosen}) held, the output changes when "
        "those values' experts are moved. What is chosen there (the experts the tokens go to, say) is out of "
        "moe_replay's sight: a replay would force the decision but not that choice",
        "Choose the experts with torch.topk (or argmax/max) of the scores in the router's forward, and use its "
        "indices; a fused kernel's choice cannot be recorded or forced",
    )


def _refuse_earlier_choice(
    name: str, probe: _Prober, calls: Sequence[Call], force: dict[int, tuple[Any, int]], first: _ProbeMode, ev: Evidence
) -> None:
    """Refuse a router whose forward chooses from floating values before its decision what picks experts
    after it (a number of experts per token from a threshold, the slots past it weighed 0).

    A replay forces the decision, not such a choice: it is made again from the current values. So, with
    the decision held, the forward runs on other inputs (as for later choices) with the earlier choices
    made afresh and held at their results on the real inputs; an output of another structure (other
    experts named, zeros in other places) refuses it. Comparisons that only test for zero, and the
    choices of the decision-like calls (a group selection, which the decision reads through), are not
    held here. Earlier choices that no other input could vary (none to make, or the forward fails on every one)
    are refused as unchecked, as later ones are: nothing shows them harmless.
    """
    checked, where = _vary(probe, force, first, probe.args, probe.kwargs, ev, early=True)
    chosen = " + ".join(calls[i].describe() for i in ev.decision)
    if not checked:  # (no other input ran: the earlier choices were never varied, so nothing shows them harmless)
        raise _refuse(
            name,
            calls,
            f"before its decision ({chosen}) its forward makes choices from floating values (at "
            f"{', '.join(dict.fromkeys(first.early_where))}) that could not be checked: it takes no floating input "
            "of two or more dimensions to vary, or fails on every other input tried. A choice before the decision "
            "that picks experts after it (a number of experts per token from a threshold) would not be replayed",
            "Make every choice of experts part of the decision (mask the scores with masked_fill or torch.where "
            "before the top-k), let the forward run on other inputs of the same shape, or name the module whose "
            "forward returns the experts used with include=",
        )
    if where is not None:
        raise _refuse(
            name,
            calls,
            f"before its decision ({chosen}) its forward chooses from floating values (at "
            f"{', '.join(dict.fromkeys(first.early_where))}) what picks experts after it: with the decision "
            f"held, {where} changes with that choice. A replay forces the decision but makes that choice "
            "again from the current values (a number of experts per token from a threshold, say), so the "
            "experts used would not be the recorded ones",
            "Make every choice of experts part of the decision (mask the scores with masked_fill or "
            "torch.where before the top-k), or name the module whose forward returns the experts used "
            "with include=",
        )


#: Below this many tokens, later choices are checked again on random inputs of this many.
_FEW_TOKENS = 32
#: Later choices are also checked on one token repeated at least this many times (a fixed capacity below it fills).
_MANY_TOKENS = 256


def _force(calls: Sequence[Call], seen: _ProbeMode, ev: Evidence) -> dict[int, tuple[Any, int]]:
    """The decision (and its mirrors) as ``seen`` made it, to be held in a probe run."""
    single = len(ev.decision) == 1
    force = {i: (seen.outs[i], ev.top_k if single else calls[i].k) for i in ev.decision}
    force.update({i: (seen.outs[i], ev.top_k) for i in ev.mirrors})
    return force


def _vary(
    probe: _Prober,
    force: dict[int, tuple[Any, int]],
    first: _ProbeMode,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ev: Evidence,
    *,
    early: bool,
    others: Iterable[tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
) -> tuple[int, str | None]:
    """Run the held decision on other inputs than ``args``/``kwargs``, the later choices (``early``: the
    earlier ones) made afresh and held at ``first``'s: how many inputs ran (of those varying the hidden states: the
    inputs beside them, varied after, count for none), and what changed structure (None: nothing). Later choices
    are also read in the hidden states a scope returns (:func:`_hidden_moved`).
    ``others``: the inputs to run instead of the usual ones (:func:`_other_inputs`)."""
    checked = 0
    own = args is probe.args and kwargs is probe.kwargs
    usual = itertools.chain(probe.others if own else (), _other_inputs(args, kwargs))
    # (the inputs beside the hidden states varied too, counted as no check: a forward that runs on them alone has
    # varied nothing its hidden states choose from)
    tried = ((i, True) for i in (usual if others is None else others))
    beside = ((i, False) for i in (_beside_inputs(args, kwargs) if others is None else ()))
    for inputs, counts in itertools.chain(tried, beside):
        try:
            fresh, again = probe.run(force=force, inputs=inputs)
        except Exception as e:  # (a forward that fails on other inputs tells nothing either way)
            _only_forwards(e)
            continue
        checked += counts
        if _same(again.early, first.early) if early else _same_choices(again.choices, first.choices, ev.top_k):
            continue  # the choices come out as on the real inputs: holding them changes nothing
        kept = None if early else _by_scores(first, again)
        if kept is not None and len(again.choices) == len(first.choices) and all(c is _FRESH for c in kept):
            continue  # (none to hold: the run that holds them is this one, and none reads the scores to reweigh)
        try:
            if early:
                held, holding = probe.run(force=force, inputs=inputs, early=first.early)
            else:
                held, holding = probe.run(force=force, inputs=inputs, choices=kept)
            hidden = _hidden_shape(inputs)
            if holding.early_unheld if early else holding.unheld:
                where: str | None = f"the number or shape of its {'earlier' if early else 'later'} choices"
            elif early:
                where = _restructured(fresh, held, ev, hidden, _decided_rows(again, ev))
                where = where or _hidden_differs(fresh, held, hidden, ev)
            else:
                where = _restructured(fresh, held, ev, hidden, _decided_rows(again, ev))
                where = where or _hidden_moved(probe, force, fresh, first, again, inputs, ev)
                where = where or _reweighed(probe, force, fresh, first, again, inputs, ev)
        except Exception as e:  # (the forward's own error when they are held; moe_replay's own refuses as such)
            _only_forwards(e)
            where = f"whether its forward runs at all ({type(e).__name__} when they are held)"
        if where is not None:
            return checked, where
    return checked, None


def _by_scores(first: _ProbeMode, again: _ProbeMode) -> list[Any]:
    """The later choices of ``first`` to hold on other inputs: those made from the scores, or that cut the decision
    (in either run); the others are made afresh (:data:`_FRESH`). A choice that reads neither (an expert's ``relu``
    of its own hidden units, whose zeros a pooled output keeps) follows the other inputs as the forward does, and a
    replay makes it so too: held at the real inputs' result, its zeros would move with the inputs, not with what
    the scores choose. Nor is an underflow guard or a floor held (a cut faint in both runs, see
    :meth:`_Selection.faint` and :meth:`_Selection.floors`): it chooses no expert, and held at the places the real
    inputs cut it lets through the zeros it guards on the other inputs (``w / clamp(w.sum(), min=eps)`` made
    ``0 / 0``, a NaN that a ``.bool()`` mask reads as an expert kept), a difference no replay makes."""

    def kept(flags: list[bool], n: int) -> bool:
        return n < len(flags) and flags[n]

    return [
        c
        if (kept(first.scored, n) or kept(first.cuts, n) or kept(again.scored, n) or kept(again.cuts, n))
        and not (kept(first.faint, n) and kept(again.faint, n))
        else _FRESH
        for n, c in enumerate(first.choices)
    ]


def _vary_state(probe: _Prober, force: dict[int, tuple[Any, int]], first: _ProbeMode, ev: Evidence) -> str | None:
    """The later choices of ``first`` (on the real inputs, the decision held) made afresh and held at ``first``'s
    with the scope's small floating state moved (see :meth:`_Snapshot.move_small`): what changes structure, or None.
    A cut by a threshold the router holds in a tensor (a minimum weight at 0, a per-expert floor) cuts nothing on
    the state the decision was established under; raised later (by a schedule, by training), it drops experts the
    rows still name. Moving that state shows it, on the forward's own inputs. Tried twice, and put back after."""
    if not probe.snapshot.small_state(ev.num_experts):
        return None
    inputs = (probe.args, probe.kwargs)
    hidden = _hidden_shape(inputs)
    try:
        for seed in (1, 2):
            probe.moved = (seed, ev.num_experts)  # (every run below, those of _hidden_moved too)
            fresh, again = probe.run(force=force)
            if len(again.choices) != len(first.choices) or _same_choices(again.choices, first.choices, ev.top_k):
                continue
            held, holding = probe.run(force=force, choices=first.choices)
            if holding.unheld:
                return "the number or shape of its later choices"
            where = _restructured(fresh, held, ev, hidden, _decided_rows(again, ev))
            where = where or _hidden_moved(probe, force, fresh, first, again, inputs, ev)
            if where is not None:
                return where
    except Exception as e:  # (a forward that fails on the moved state tells nothing either way)
        _only_forwards(e)
        return None
    finally:
        probe.moved = None
        probe.snapshot.restore()
    return None


def _discrete(result: Any) -> bool:
    """Does a call's result hold integers or booleans only?"""
    ts = [t for t in _leaves(result, []) if isinstance(t, torch.Tensor)]
    return bool(ts) and not any(t.is_floating_point() or t.is_complex() for t in ts)


def _names_integers(result: Any) -> bool:
    """Does a call's result hold integers or booleans (alone, or beside values: a ``topk`` or ``sort`` of
    priorities, whose indices choose)?"""
    return any(
        isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()) for t in _leaves(result, [])
    )


#: A later choice to make afresh in a probe run that holds the others (see ``_ProbeMode._choice``).
_FRESH: Any = object()


def _hidden_moved(
    probe: _Prober,
    force: dict[int, tuple[Any, int]],
    fresh: Any,
    first: _ProbeMode,
    again: _ProbeMode,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    ev: Evidence,
) -> str | None:
    """Where the output shows no experts (a block that returns its hidden states): do the later choices made
    from the scores move those states? Only those that make integers or booleans (a comparison with a
    threshold) are held at ``first``'s, the others made afresh (an expert's ``relu`` reads the hidden
    states, not the scores; a ``clamp`` of a weight holds values, not a choice), and the floating outputs
    of neither the decision's nor the experts' width are compared (``fresh``: the output with every later
    choice made afresh): a cut that drops an expert after the top-k shows there."""
    differ = [
        n
        for n, (a, b) in enumerate(zip(again.choices, first.choices, strict=False))
        if (again.scored[n] or again.cuts[n] or (n < len(first.cuts) and first.cuts[n]))
        and _names_integers(a)
        and not _same_choices([a], [b], ev.top_k)
        and not (n < len(first.faint) and again.faint[n] and first.faint[n])  # (an underflow guard: no choice)
    ]
    if not differ or len(again.choices) != len(first.choices):
        return None
    choices = [c if n in differ else _FRESH for n, c in enumerate(first.choices)]
    held, holding = probe.run(force=force, inputs=inputs, choices=choices)
    if holding.unheld:
        return "the number or shape of its later choices"
    return _hidden_differs(fresh, held, _hidden_shape(inputs), ev)


def _reweighed(
    probe: _Prober,
    force: dict[int, tuple[Any, int]],
    fresh: Any,
    first: _ProbeMode,
    again: _ProbeMode,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    ev: Evidence,
) -> str | None:
    """Do the later choices made over every expert from the scores (a comparison of all ``E`` scores with the
    decision's k-th value) change the values of the weights the forward returns, with no weight cut to zero? A
    renormalisation over the experts whose scores reach the decision's smallest value divides, in a replay, by
    the scores of experts it did not force (those above a forced one). Only the choices of the experts' width
    that differ from those on the real inputs are held (a choice among the k chosen weights, a piecewise
    function of them, is the router's own function of the forced experts' scores), and only floating outputs of
    the experts' width or k are compared (a scalar loss or statistic is not)."""
    differ = [
        n
        for n, (a, b) in enumerate(zip(again.choices, first.choices, strict=False))
        if again.scored[n]
        and n < len(again.widths)
        and again.widths[n] == ev.num_experts
        and not _same_choices([a], [b], ev.top_k)
        and not (n < len(first.faint) and again.faint[n] and first.faint[n])
    ]
    if not differ or len(again.choices) != len(first.choices):
        return None
    choices = [c if n in differ else _FRESH for n, c in enumerate(first.choices)]
    held, holding = probe.run(force=force, inputs=inputs, choices=choices)
    if holding.unheld:
        return "the number or shape of its later choices"
    hidden = _hidden_shape(inputs)
    for n, (x, y) in enumerate(zip(_leaves(fresh, []), _leaves(held, []), strict=False)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.is_floating_point()):
            continue
        if x.dim() < 2 or x.shape != y.shape or x.shape[-1] not in (ev.top_k, ev.num_experts):
            continue
        if _hidden_like(x, hidden, ev):
            continue
        tol = max(1e-3, 2 * torch.finfo(x.dtype).eps)
        x, y = x.detach().double(), y.detach().double()
        scale = float(torch.maximum(x.abs(), y.abs()).nan_to_num(0, 0, 0).max())
        if float((x - y).abs().nan_to_num(0, 0, 0).max()) > tol * scale:
            return f"tensor #{n} of its output (its weights, divided or scaled by experts chosen again)"
    return None


def _hidden_shape(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Size | None:
    """The shape of the hidden states a forward takes (its first floating input of two or more dimensions)."""
    found = _first_floating(inputs)
    return None if found is None else found[1].shape


def _hidden_like(t: Any, hidden: torch.Size | None, ev: Evidence) -> bool:
    """Is ``t`` hidden states, as the forward took them (their shape, of neither the decision's width nor k)?"""
    return (
        hidden is not None
        and isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.shape == hidden
        and t.shape[-1] not in (ev.top_k, ev.num_experts)
    )


def _hidden_differs(a: Any, b: Any, hidden: torch.Size | None, ev: Evidence) -> str | None:
    """Which hidden states of two outputs of one forward differ past rounding, or None."""
    la, lb = _leaves(a, []), _leaves(b, [])
    for n, (x, y) in enumerate(zip(la, lb, strict=False)):
        if not (_hidden_like(x, hidden, ev) and isinstance(y, torch.Tensor) and y.shape == x.shape):
            continue
        tol = max(1e-3, 2 * torch.finfo(x.dtype).eps)
        x, y = x.detach().double(), y.detach().double()
        scale = float(torch.maximum(x.abs(), y.abs()).nan_to_num(0, 0, 0).max())
        if float((x - y).abs().nan_to_num(0, 0, 0).max()) > tol * scale:
            return f"tensor #{n} of its output (the hidden states it returns: the experts they are made of)"
    return None


def _check_on_more_tokens(
    probe: _Prober, calls: Sequence[Call], ev: Evidence, *, one_token: bool = False
) -> str | None:
    """:func:`_vary` of the later choices from random inputs of at least ``_FEW_TOKENS`` tokens (``one_token``:
    the first token repeated, at least ``_MANY_TOKENS`` times; the decision held as made on them), where the
    forward runs on such inputs and makes the same calls; None otherwise."""
    more = _more_tokens(probe, one_token=one_token)
    if more is None:
        return None
    args, kwargs, tokens = more
    try:
        _, seen = probe.run(inputs=(args, kwargs))
        if [c.signature for c in seen.calls] != [c.signature for c in calls]:
            return None
        force = _force(seen.calls, seen, ev)
        _, first = probe.run(force=force, inputs=(args, kwargs))
    except Exception as e:  # (a forward tied to its token count: checked on its own only)
        _only_forwards(e)
        return None
    if not first.choices:
        return None
    _, where = _vary(probe, force, first, args, kwargs, ev, early=False)
    return None if where is None else f"{where} (on {tokens} {'copies of one token' if one_token else 'tokens'})"


def _sampled_choice(probe: _Prober, seen: _ProbeMode, base: Any, tolerance: float) -> tuple[str, str] | None:
    """Where no decision-like call's choice changes the output: the refusal's reason and fix where the forward's
    random draws choose its experts (integers or booleans made of a draw by no decision-like call, see
    :meth:`_ProbeMode._note_draw`: ``torch.multinomial`` over the probabilities, a mask ``rand_like(p) < p``) and its
    output changes with the random state; None where it draws no choice, or its output does not move with the draw
    (a choice made aside, for a statistic), so that the other reasons are told."""
    if not seen.sampled:
        return None
    try:
        other, _ = probe.run(reseed=_RESEED)
    except Exception as e:  # (a forward that fails under another random state tells nothing more here)
        _only_forwards(e)
        return None
    if _distance(base, other)[0] <= tolerance:
        return None
    shown = ", ".join(seen.sampled[:3])
    why = (
        f"its experts are sampled: {shown} draws from the random stream what its forward chooses (integers or "
        "booleans made of the draw by no decision-like call), and its output changes with the random state. A random "
        "draw is not a decision that can be recorded and forced: sampling cannot be replayed"
    )
    fix = (
        "Route by the scores in evaluation (model.eval(), where the router chooses by torch.topk or argmax), or "
        "choose the experts with torch.topk (or argmax) over the scores with noise drawn before it (Gumbel noise "
        "added to the logits), so that the choice is a decision-like call whose indices are recorded and forced; a "
        "seeded draw (generator=) still draws again on each forward, so record the sampled experts yourself"
    )
    return why, fix


def _more_tokens(probe: _Prober, *, one_token: bool = False) -> tuple[tuple[Any, ...], dict[str, Any], int] | None:
    """The probe's inputs with their hidden states replaced by random ones of at least ``_FEW_TOKENS`` tokens
    (``one_token``: the first token repeated, at least ``_MANY_TOKENS`` times), and that number of tokens;
    None where the inputs hold no floating tensor of two or more dimensions."""
    found = _first_floating((probe.args, probe.kwargs))
    if found is None:
        return None
    x = found[1]
    m = math.ceil((_MANY_TOKENS if one_token else _FEW_TOKENS) / max(1, x.numel() // x.shape[-1]))
    shape = (x.shape[0] * m, *x.shape[1:])
    if one_token:  # every token the same: all go to the same experts, and any capacity below their count fills
        big = x.detach().reshape(-1, x.shape[-1])[:1].expand(math.prod(shape[:-1]), -1).reshape(shape).clone()
    else:
        ref = x.detach().float()
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(len(_OTHER_INPUTS)))
        big = (noise.to(x.device) * ref.std(unbiased=False) + ref.mean()).to(x.dtype)
    args, kwargs = _replaced((probe.args, probe.kwargs), found[0], big)
    return args, kwargs, big.numel() // big.shape[-1]


def _refuse_drawn_choice(
    name: str,
    probe: _Prober,
    calls: Sequence[Call],
    force: dict[int, tuple[Any, int]],
    ev: Evidence,
    drawn: Sequence[str] = (),
    draws: Sequence[tuple[str, bool]] = (),
) -> None:
    """Refuse a router that drops experts at random after its decision.

    Called where its forward drew from a random stream with the decision held (``force``) as a replay holds
    it. Run so under its own random state and under another, an output of another structure (other experts
    named, zeros in other places), or hidden states that move with the choices (integers or booleans from
    floating values) that came out otherwise, is a choice of experts drawn after the decision: DeepSpeed's
    random token selection over a capacity, a second expert kept by a coin. A replay forces the decision, but
    the training forward draws under another random state than the capture did, so it would drop other
    experts than the capture dropped, with no error. Checked on the real inputs, then (a capacity the real
    tokens left unfilled has nothing to drop) on one of their tokens repeated ``_MANY_TOKENS`` times. What
    is drawn before the decision (jitter, Gumbel noise on the scores) is held with it, and dropout does not
    choose (it makes no integers): hidden states that only its draws move are not a refusal.

    ``drawn``: one-hots the forward drew inside one call (``gumbel_softmax(hard=True)``): where there are, the
    decision reads back experts drawn at random there (an ``argmax`` of the one-hot), and the refusal says so.
    ``draws``: the random draws the forward made with the decision held, each with whether it came after the
    decision (see :attr:`_ProbeMode.draws`), named in the refusal. Where only the zeros of its weights move and no
    draw came after the decision (noise on the scores, drawn before it, loud enough that a forced expert's weight
    underflows to exactly zero), the refusal says that a forced expert's weight is exactly zero, not that the
    forward chooses again.
    """
    where = _drawn(probe, force, None, ev)
    more = _more_tokens(probe, one_token=True) if where is None else None
    if more is not None:
        args, kwargs, tokens = more
        try:
            _, seen = probe.run(inputs=(args, kwargs))
            if [c.signature for c in seen.calls] == [c.signature for c in calls]:
                where = _drawn(probe, _force(seen.calls, seen, ev), (args, kwargs), ev)
                where = where and f"{where} (on {tokens} copies of one token)"
        except Exception as e:  # (a forward tied to its token count: checked on its own only)
            _only_forwards(e)
            where = None
    if where is not None and drawn:
        raise _refuse(
            name,
            calls,
            f"its decision ({_chosen(ev)}) reads back experts drawn from the random stream inside one call "
            f"({drawn[0]}: Gumbel noise, then the one-hot of the best, out of sight): with the decision held, "
            f"{where} changes with the random state. A replay forces the decision, not that draw, so the experts "
            "used would not be the recorded ones",
            "Draw the noise before the decision and choose in the router's own code: y_soft = ((logits + gumbels) / "
            "tau).softmax(-1), idx = y_soft.argmax(-1, keepdim=True), and build the straight-through one-hot from "
            "idx (or route by the argmax of the logits, as in eval)",
        )
    after = [d for d, late in draws if late]
    if where is not None and _ZEROS in where and not after:
        before = [d for d, late in draws if not late]
        shown = f" ({', '.join(before[:3])}, before its decision)" if before else ""
        beside = _beside_the_weights(probe, calls, force, ev)
        what = (
            "values it returns beside its weights are exactly zero in other places under one random state than "
            "under another"
            if beside
            else "a forced expert's weight is exactly zero under one random state and not under another"
        )
        raise _refuse(
            name,
            calls,
            f"with its decision ({_chosen(ev)}) held, {what}: {where} changes with the random state. Its forward "
            f"draws from the random stream{shown}, and what it makes of the draw underflows (or is masked) to "
            "exactly zero under some draws (noise that underflows, or experts masked at random in the scores its "
            "weights are read from, so that a forced expert weighs zero: expert dropout); where a token runs an "
            "expert only where its weight is not zero, "
            "whether a forced expert runs depends on the draw, which a replay does not keep (a replayed forward "
            "runs under another random state than the capture), and the experts used would not be the recorded ones",
            "Keep the weights of the chosen experts from reaching exactly zero under a draw from the random stream: "
            "bound the noise (or route without it: model.eval()), mask experts at random only in the scores the "
            "decision reads (the weights read from the unmasked scores, without the noise), or dispatch each token "
            "to its chosen experts by the "
            "decision's indices rather than by which of its weights are not zero" + beside,
        )
    if where is not None:
        shown = f" ({', '.join(after[:3])})" if after else ""
        raise _refuse(
            name,
            calls,
            f"after its decision ({_chosen(ev)}) its forward draws from the random stream and chooses again"
            f"{shown}: with the decision held, {where} changes with the random state. A replay forces the "
            "decision, not those draws (tokens over a capacity dropped by a random priority, a second expert kept by "
            "a coin, experts masked at random in the scores its weights are read from, so that a forced expert weighs "
            "zero: expert dropout, even where the mask is drawn before the decision), and a replayed forward runs "
            "under another random state than the capture, so the experts used would not be the recorded ones",
            "Turn the random choice after the decision off (DeepSpeed: use_rts=False), draw it before the "
            "decision (noise on the scores, as jitter), mask experts at random only in the scores the decision "
            "reads (the weights read from the unmasked scores), or drop tokens and experts after it only by rules "
            "that neither read the scores nor draw from the random stream (position, a fixed capacity)"
            + _beside_the_weights(probe, calls, force, ev),
        )


def _beside_the_weights(probe: _Prober, calls: Sequence[Call], force: dict[int, tuple[Any, int]], ev: Evidence) -> str:
    """A hint for :func:`_refuse_drawn_choice`: where the outputs whose zeros move with the random state (the decision
    held) are none of those that the decision's own values move (its weights: each output judged by its own
    magnitude), as logits with dropout on them returned beside the weights for a loss, the router alone cannot tell
    whether its caller weighs the experts by them; the hint names the scope that can."""
    try:
        own, _ = probe.run(force=force)
        other, _ = probe.run(force=force, reseed=_RESEED)
        base, _ = probe.run()
        lifted = [probe.run(values=i, lift=True)[0] for i in ev.decision if calls[i].family in _VALUED]
    except Exception:  # (runs that fail here tell nothing more: the refusal stands as it is)
        return ""

    def values(out: Any) -> list[torch.Tensor]:
        return [t for t in _leaves(out, []) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    mine, theirs, plain = values(own), values(other), values(base)
    floats = [values(o) for o in lifted]
    if not lifted or len({len(mine), len(theirs), len(plain), *map(len, floats)}) != 1:
        return ""
    weights = {
        n
        for leaves in floats
        for n, (a, b) in enumerate(zip(plain, leaves, strict=True))
        if a.shape != b.shape or _distance(a, b)[0] > _SHIFT_ROUNDING * float(a.detach().abs().nan_to_num().max())
    }
    zeros = {
        n
        for n, (a, b) in enumerate(zip(mine, theirs, strict=True))
        if a.shape != b.shape or bool(((a == 0) != (b == 0)).any())
    }
    if not weights or not zeros or not zeros.isdisjoint(weights):
        return ""
    return (
        ". The zeros that move are in no output that the decision's values weigh (its weights): where they are "
        "the router's logits or scores returned beside them for a loss (dropout drawn before the decision), "
        'mr.Adapter(name, match=..., scope="parent") lets moe_replay check the block that reads them (a replay '
        "is then exact where the block weighs the experts by the weights alone, and refused where it reads them)"
    )


def _drawn(
    probe: _Prober,
    force: dict[int, tuple[Any, int]],
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None,
    ev: Evidence,
) -> str | None:
    """With the decision held (``force``) on ``inputs`` (None: the real ones), what of the output changes
    between the forward's own random state and another (see :func:`_refuse_drawn_choice`), or None."""
    own, first = probe.run(force=force, inputs=inputs)
    other, again = probe.run(force=force, inputs=inputs, reseed=_RESEED)
    hidden = _hidden_shape(inputs if inputs is not None else (probe.args, probe.kwargs))
    where = _restructured(own, other, ev, hidden, _decided_rows(first, ev) + _decided_rows(again, ev))
    if where is not None or len(again.choices) != len(first.choices):
        return where
    differ = [n for n, (a, b) in enumerate(zip(again.choices, first.choices, strict=True)) if not _same([a], [b])]
    if not differ or not any(_names_integers(again.choices[n]) for n in differ):
        return None
    # under the other random state, the choices that came out otherwise held at their own state's: what they move
    choices = [c if n in differ and _names_integers(c) else _FRESH for n, c in enumerate(first.choices)]
    held, holding = probe.run(force=force, inputs=inputs, choices=choices, reseed=_RESEED)
    return None if holding.unheld else _hidden_differs(other, held, hidden, ev)


#: The seed of the other random state :func:`_refuse_drawn_choice` runs a forward under.
_RESEED = 0x5EED


def _free_state(scope: nn.Module) -> list[tuple[nn.Module, bool, str, torch.Tensor]]:
    """The tensors the scope's modules hold that may set an order of its tokens without being settings of its
    decision (which are compared as each block starts, see ``intercept._fingerprint``): buffers and plain attributes
    (not parameters) of two or more rows, floating ones (an order held as floats, ``x[self.order.long()]``) and
    integer or boolean ones its code writes itself (an order it rotates at each forward: its state, not a setting).
    Each as ``(module, is a buffer, name, tensor)``; none of more than ``_COPY_LIMIT`` elements."""
    out: list[tuple[nn.Module, bool, str, torch.Tensor]] = []
    ids: set[int] = set()
    for m in scope.modules():
        own: frozenset[str] | None = None
        for buffer, store in ((True, m._buffers), (False, m.__dict__)):
            for k, v in list(store.items()):
                if not isinstance(v, torch.Tensor) or isinstance(v, nn.Parameter) or id(v) in ids:
                    continue
                if v.dim() == 0 or int(v.shape[0]) < 2 or v.numel() > _COPY_LIMIT:
                    continue
                if not (v.is_floating_point() or v.is_complex()):
                    if own is None:
                        own = code_written(m, m.__dict__.get("forward")) | hook_written(m)
                    if not is_written(f"self.{k}", own):
                        continue
                ids.add(id(v))
                out.append((m, buffer, k, v))
    return out


@contextlib.contextmanager
def _state_flipped(held: Sequence[tuple[nn.Module, bool, str, torch.Tensor]]) -> Iterator[None]:
    """The tensors ``held`` (see :func:`_free_state`) replaced by copies of them with their rows in reverse order (the
    held objects themselves untouched), put back on the way out."""
    try:
        for m, buffer, k, v in held:
            flipped = v.detach().flip(0)
            if buffer:
                m._buffers[k] = flipped
            else:
                m.__dict__[k] = flipped
        yield
    finally:
        for m, buffer, k, v in held:
            if buffer:
                m._buffers[k] = v
            else:
                m.__dict__[k] = v


def _rows_order(
    probe: _Prober, calls: Sequence[Call], ordinals: Sequence[int], seen: _ProbeMode | None = None
) -> torch.Tensor | None:
    """The token whose hidden state each row of the scores of the calls ``ordinals`` (their rows one after another)
    follows, by position; None where the runs tell nothing (a run that fails or makes other calls, rows that are not
    one per token, or a row that follows several tokens or none: a mix).

    Proven by effect as for chunks (see :func:`_in_chunks`): the hidden states are changed on the tokens whose bit
    ``b`` of their position is 1, for every bit of the token count; where every row changes exactly with the tokens
    of its own position, the rows follow the tokens in order (or some rows are mixes: nothing to refuse either).
    Only otherwise are the tokens whose bit is 0 changed too, to tell a row that follows one token from a mix.
    ``seen``: the mode of a plain run of ``probe`` on its own inputs and state made already (the runs that establish
    the decision make two), whose rows the changed runs are compared with; else one is made here."""
    found = _first_floating((probe.args, probe.kwargs))
    if found is None or any(o >= len(calls) for o in ordinals):
        return None
    path, x = found
    tokens = x.numel() // max(int(x.shape[-1]), 1)
    if sum(calls[o].rows for o in ordinals) != tokens or tokens < 2:
        return None
    signature = [c.signature for c in calls]
    if seen is None:
        try:
            _, seen = probe.run()
        except Exception as e:
            _only_forwards(e)
            return None
    if [c.signature for c in seen.calls] != signature or len(seen.ins) < len(calls):
        return None
    base = [seen.ins[o].detach() for o in ordinals]
    if any(b.numel() % max(calls[o].rows, 1) for o, b in zip(ordinals, base, strict=True)):
        return None
    base = [b.reshape(calls[o].rows, -1) for o, b in zip(ordinals, base, strict=True)]
    position = torch.arange(tokens)
    flat = x.detach().reshape(tokens, -1)
    spread = flat.float().std(unbiased=False).clamp_min(1e-3)
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(tokens)).to(flat.device)
    bumped = flat + (noise * spread + spread).to(dtype=flat.dtype)  # (made once: each run picks its rows of it)
    on_device = position.to(flat.device)

    def changed(bit: int, side: int) -> torch.Tensor | None:  # the rows that change with the tokens of that side
        picked = ((on_device >> bit) & 1) == side
        values = torch.where(picked[:, None], bumped, flat).reshape(x.shape)
        try:  # (``values``, made for this run alone, is handed to the forward as it is: no copy of it)
            _, moved = probe.run(inputs=_replaced((probe.args, probe.kwargs), path, values), own=values)
        except Exception as e:
            _only_forwards(e)
            return None
        if [c.signature for c in moved.calls] != signature or len(moved.ins) < len(calls):
            return None
        parts = []
        for o, before in zip(ordinals, base, strict=True):
            after = moved.ins[o].detach()
            if after.numel() != before.numel():
                return None
            parts.append((after.reshape(before.shape) != before).any(dim=1).cpu())
        return torch.cat(parts)

    bits = range(max(1, (tokens - 1).bit_length()))
    ones: list[torch.Tensor] = []
    for bit in bits:
        rows = changed(bit, 1)
        if rows is None:
            return None
        ones.append(rows)
    of_row = torch.zeros(tokens, dtype=torch.long)
    for bit, rows in zip(bits, ones, strict=True):
        of_row |= rows.long() << bit
    if torch.equal(of_row, position):
        return of_row  # (in order; a mix of lower tokens reads so too, and tells nothing either)
    for bit, rows in zip(bits, ones, strict=True):
        zeros = changed(bit, 0)
        if zeros is None or bool((zeros == rows).any()):
            return None  # (a row that follows both sides or neither: not one token's)
    return of_row


def _follows_tokens(of_row: torch.Tensor, x: torch.Tensor) -> bool:
    """Do rows that follow the tokens ``of_row`` (see :func:`_rows_order`) follow them in their order: in order, or
    the transpose of a ``[batch, positions]`` input (a router that sees the batch sequence-first: an order of its
    code, not of its state, which the model's token order tells)?"""
    position = torch.arange(of_row.numel())
    if torch.equal(of_row, position):
        return True
    return x.dim() == 3 and torch.equal(of_row, position.reshape(x.shape[0], x.shape[1]).t().reshape(-1))


def _refuse_rows_out_of_order(
    name: str,
    probe: _Prober,
    calls: Sequence[Call],
    ordinals: Sequence[int],
    own: bool = True,
    seen: _ProbeMode | None = None,
) -> None:
    """Refuse a decision made over its tokens in another order than theirs (``topk(gate(x[order]))`` or
    ``topk(gate(x.flip(0)))``, its results put back in token order after it): its rows are recorded and forced in
    call order, so row ``r`` would be another token's. ``ordinals``: the calls of the decision, their rows one
    after another (one call, or the chunks of one).

    Checked by effect (see :func:`_rows_order`) on the state the router holds (``own``: the chunks' order is proven
    already), then on the tensors it holds that are no settings of its decision (see :func:`_free_state`: floats,
    and integers its code writes itself) with their rows reversed: an order they set is the same now and another
    later (permuted between blocks, or rotated by the router at each forward), unseen by the checks made as each
    block starts, so a decision whose rows follow them is refused. Runs that tell nothing keep the decision as it
    was established. The runs cost a forward of the router per bit of the token count, twice where it holds such
    tensors, once when it is established. ``seen``: a plain run of ``probe`` made already, that the runs on its own
    state compare with (see :func:`_rows_order`)."""
    found = _first_floating((probe.args, probe.kwargs))
    if found is None:
        return
    x = found[1]
    described = " + ".join(calls[o].describe() for o in ordinals if o < len(calls))
    if own:
        of_row = _rows_order(probe, calls, ordinals, seen)
        if of_row is not None and not _follows_tokens(of_row, x) and of_row.unique().numel() < of_row.numel():
            raise _refuse(  # (rows that follow no token of their own: no order, the other tokens' states mixed in)
                name,
                calls,
                f"its decision ({described}) is made over scores that follow other tokens than their own (changing "
                "one token's hidden state changes the rows of others, and the rows do not each follow a token of their "
                "own: a draw seeded by the input, a normalisation across the tokens): its rows cannot be told apart by "
                "token, so forcing them would not force each token's own choice",
                "Score each token from its own hidden state, or name the module whose forward returns the experts "
                "in token order with include=",
            )
        if of_row is not None and not _follows_tokens(of_row, x):
            raise _refuse(
                name,
                calls,
                f"its decision ({described}) is made over its tokens in another order than theirs (changing a "
                "token's hidden state changes another row of its scores: an order it holds, x[self.order], or one "
                "its code takes, x.flip(0)): its rows would be recorded and forced in that order, each on another "
                "token",
                "Take the decision over the tokens in their own order (permute the tokens after it, not before), or "
                "name the module whose forward returns the experts in token order with include=",
            )
    held = _free_state(probe.scope)
    if not held:
        return

    def out_of_order(flip: Sequence[tuple[nn.Module, bool, str, torch.Tensor]]) -> bool:
        probe.snapshot.restore()
        try:
            with _state_flipped(flip):
                other = _Prober(probe.forward, probe.args, probe.kwargs, probe.scope, limit=probe.limit)
                other.grads, other.took = probe.grads, probe.took
                of_row = _rows_order(other, calls, ordinals)
        except Exception as e:  # (the runs let the forward's own errors go: what is left is moe_replay's)
            _only_forwards(e)  # (a fault flipping the state or reading the runs refuses, never keeps the order)
            return False
        finally:
            probe.snapshot.restore()
        return of_row is not None and not _follows_tokens(of_row, x)

    if not out_of_order(held):
        return
    names = {id(m): f"{n}." if n else "self." for n, m in probe.scope.named_modules()}
    culprits = [h for h in held if len(held) == 1 or out_of_order([h])] or held
    spelled = ", ".join(
        f"{names.get(id(m), 'self.')}{k} ({str(v.dtype).removeprefix('torch.')})" for m, _, k, v in culprits
    )
    raise _refuse(
        name,
        calls,
        f"its decision ({described}) is made over its tokens in an order that a tensor it holds sets ({spelled}: "
        "with its rows reversed, changing a token's hidden state changes another row of the decision's scores). "
        "Such a tensor (floats, or integers its forward writes itself) is no setting compared as each block starts: "
        "once its values change (between blocks, or at each forward), the rows would be recorded and forced in "
        "that order, each on another token",
        "Take the decision over the tokens in their own order (permute the tokens after it, not before), or name "
        "the module whose forward returns the experts in token order with include=",
    )


def _refuse_chosen_tokens(
    name: str, probe: _Prober, calls: Sequence[Call], decision: Call
) -> UnsupportedRouterError | None:
    """Refuse a decision made for the tokens that their values pick (top-any gating: the tokens no expert's
    threshold takes get a fallback top-k of their own, ``topk(logits[inactive], k)``).

    Its rows are a subset of the tokens chosen afresh at every forward, so they are not one per token, and a
    replay would make that choice again from the current values. Seen as a decision made for another share
    of the tokens on random inputs of the same shape (their values' mean, the second four times as spread),
    or not made at all on them. Few tokens hold little to choose from (one token is all in or all out): more
    such inputs are tried where the forward has fewer than ``_FEW_TOKENS``, none of other shapes (a branch
    taken on more tokens only is never run for it). A forward that fails on every random input (it asserts
    a property of its inputs, or indexes a table with their values) is tried on inputs made of its own
    tokens' rows instead (one token's row in every row, then its rows drawn again with repeats: see
    :func:`_real_rows_inputs`); where no such input runs either, nothing shows the decision made for every
    token: the refusal as unchecked is returned, for the caller to raise once its other checks (which may
    name what is wrong more closely) have passed. None where the check ran and passed.
    """
    found = _first_floating((probe.args, probe.kwargs))
    tokens = _tokens(probe.args, probe.kwargs)
    if found is None or not tokens:
        return None
    x = found[1]
    ref = x.detach().float()
    nth = [c.ordinal for c in calls if c.signature == decision.signature].index(decision.ordinal)
    tries = 2 if tokens >= _FEW_TOKENS else min(_FEW_CHOICE_TRIES, 1 + math.ceil(_FEW_TOKENS / tokens))

    def randoms() -> Iterator[torch.Tensor]:
        for n in range(tries):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(len(_OTHER_INPUTS) + 1 + n))
            spread = ref.std(unbiased=False) * (4 if n == 1 else 1)
            yield (noise.to(x.device) * spread + ref.mean()).to(x.dtype)

    ran = False
    for others in (randoms(), _real_rows_inputs(x)):
        for other in others:
            try:
                _, seen = probe.run(inputs=_replaced((probe.args, probe.kwargs), found[0], other))
            except Exception as e:  # (a forward tied to its inputs' values: nothing to compare)
                _only_forwards(e)
                continue
            ran = True
            same = [c for c in seen.calls if c.signature == decision.signature][nth : nth + 1]
            if same and same[0].rows == decision.rows:
                continue
            made = f"for {same[0].rows}" if same else "for none"
            raise _refuse(
                name,
                calls,
                f"its decision ({decision.describe()}) is made for {decision.rows} of the {tokens} tokens it took, "
                f"and {made} of as many tokens of other values: which tokens it decides for is chosen from their "
                "values before it (top-any or threshold gating, with a fallback top-k for the tokens no threshold "
                "takes), so its rows are not one per token, and a replay would choose those tokens again from the "
                "current values",
                "Decide for every token in one call (mask the scores with masked_fill or torch.where before one "
                "top-k), or name the module whose forward returns the experts used with include=",
            )
        if ran:
            if 0 < decision.rows < tokens and _follows_its_rows(probe, found, decision, nth):
                raise _refuse(
                    name,
                    calls,
                    f"its decision ({decision.describe()}) is made for {decision.rows} of the {tokens} tokens it "
                    "took, and with every token's row moved places on it is made for the same rows, now at other "
                    "places: which tokens it decides for is chosen from their values before it "
                    "(as many each time: the tokens of highest value, a capacity filled by value), not by their "
                    "places, so its rows are not one per token, and a replay would choose those tokens again from "
                    "the current values",
                    "Decide for every token in one call (mask the scores with masked_fill or torch.where before one "
                    "top-k), or name the module whose forward returns the experts used with include=",
                )
            return None
    return _refuse(
        name,
        calls,
        f"whether its decision ({decision.describe()}, made for {decision.rows} of the {tokens} tokens it took) is "
        "made for every token could not be checked: its forward fails on every other input tried (random values "
        "of its hidden states' mean and spread, and its own tokens' rows repeated or drawn again), so nothing "
        "shows that the tokens it decides for are not chosen from their values before it (top-any or threshold "
        "gating), which a replay would choose again from the current values",
        "Let the forward run on other inputs of the same shape (check its inputs' values outside the router), "
        "or name the module whose forward returns the experts used with include=",
    )


def _follows_its_rows(probe: _Prober, found: tuple[Any, torch.Tensor], decision: Call, nth: int) -> bool:
    """Whether ``decision`` (the ``nth`` call of its signature), made for fewer rows than its forward has tokens,
    follows the tokens' values rather than their places: run on the hidden states ``found`` (its inputs' first
    floating tensor, where it is and the tensor) with every token's row moved ``s`` places on (by one, and by about
    half, ``s`` prime to the count of rows; each row then differs from the one at its place before), its scores are
    those of the same rows in the same order, the last ``c`` of them first (the chosen rows among the last ``s``
    moved to the first places), for some ``c`` that moves them. A choice by place (the tokens a mask keeps, every
    other one) would now decide for the rows before those it decided for, whose scores differ; a choice per pixel of
    a feature map, or per sequence from the mean of its rows, would be made on rows that mix others; a choice over
    rows the hidden states do not make (a table of task embeddings) does not move. False for a decision made once
    per sequence, where the forward does not run on the moved rows, where a row equals the one ``s`` before it
    (nothing would tell them apart), or past ``_FOLLOW_ROWS`` rows."""
    x = found[1].detach()
    rows = x.reshape(-1, x.shape[-1])
    n = int(rows.shape[0])
    if n < 2 or decision.rows > _FOLLOW_ROWS or decision.rows == x.numel() // (x.shape[-2] * x.shape[-1]):
        return False

    def scores(inputs: tuple[tuple[Any, ...], dict[str, Any]] | None) -> torch.Tensor | None:
        try:
            _, seen = probe.run(inputs=inputs)
        except Exception as e:  # (a forward tied to its rows' places: nothing to compare)
            _only_forwards(e)
            return None
        same = [c for c in seen.calls if c.signature == decision.signature][nth : nth + 1]
        if not same or same[0].rows != decision.rows or len(seen.ins) <= same[0].ordinal:
            return None
        return seen.ins[same[0].ordinal].detach().reshape(decision.rows, -1)

    before: torch.Tensor | None = None
    # (shifts prime to the count of rows: no choice by place of some of them maps onto itself moved so)
    half = next((s for s in range(n // 2, 1, -1) if math.gcd(s, n) == 1), 1)
    for shift in dict.fromkeys((1, half)):
        moved = rows.roll(shift, 0)
        if not 0 < shift < n or not bool(moved.ne(rows).any(-1).all()):
            continue
        before = scores(None) if before is None else before
        if before is None:
            return False
        after = scores(_replaced((probe.args, probe.kwargs), found[0], moved.reshape(x.shape)))
        if after is None:
            continue
        for j in range(1, decision.rows):  # (after's first row is before's row j: the last rows - j moved first)
            if torch.allclose(before[j], after[0], rtol=1e-3, atol=1e-6) and torch.allclose(
                before.roll(decision.rows - j, 0), after, rtol=1e-3, atol=1e-6
            ):
                return True
    return False


#: At most this many rows of a decision made for some of its tokens are compared by :func:`_follows_its_rows`.
_FOLLOW_ROWS = 4096


def _real_rows_inputs(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inputs of ``x``'s shape made of its own token rows (its last dimension's vectors): one token's row in
    every row (the first, middle and last token's), then its rows drawn again with repeats (seeded). Each row
    is one the forward took, so a check of each row's values (a norm, a range, a table index) holds on them,
    while a choice of tokens by their values is made for all of them or none where one row fills them. Those
    equal to ``x`` are left out (one token, or all rows alike: nothing new to run)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    n = rows.shape[0]
    picks = [torch.full((n,), j, dtype=torch.long) for j in dict.fromkeys((0, n // 2, n - 1))]
    picks.append(torch.randint(n, (n,), generator=torch.Generator().manual_seed(len(_OTHER_INPUTS) + 1)))
    for pick in picks:
        other = rows[pick.to(rows.device)].reshape(x.shape)
        if not torch.equal(other, x.detach()):
            yield other


#: At most this many random inputs tried by :func:`_refuse_chosen_tokens` on a forward of few tokens.
_FEW_CHOICE_TRIES = 8


def _other_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs with their first floating tensor of two or more dimensions (the hidden states, also in a
    list, tuple or dict) replaced: its tokens rolled (by one, and by half), then random values of its
    mean and spread (the last two of four times its spread). Nothing when there is none."""
    found = _first_floating((args, kwargs))
    if found is None:
        return
    x = found[1]
    rows = x.detach().reshape(-1, x.shape[-1])
    ref = x.detach().float()
    others: list[torch.Tensor] = []
    for shift in dict.fromkeys((1, rows.shape[0] // 2)):
        if 0 < shift < rows.shape[0]:
            others.append(rows.roll(shift, 0).reshape(x.shape))
    for seed in _OTHER_INPUTS:  # the last ones four times as spread: sharper scores, more lopsided weights
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        spread = ref.std(unbiased=False) * (4 if seed >= len(_OTHER_INPUTS) - 2 else 1)
        others.append((noise.to(x.device) * spread + ref.mean()).to(x.dtype))
    for other in others:
        new_args, new_kwargs = _replaced((args, kwargs), found[0], other)
        yield new_args, new_kwargs


def _beside_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs with each floating tensor of one or more dimensions and values but the hidden states (the first of
    two or more dimensions, which :func:`_other_inputs` replaces) replaced in turn: its rows (a vector's values)
    rolled by one, then, where its values and their spread are finite (no mask of -inf, nor one of the dtype's least
    value), random values four times its spread. A choice made from such a tensor (a number of experts per token from
    a threshold on a second input, or on a weight per token) is varied so, not only one made from the hidden
    states. A tensor of zeros and ones is a mask the caller hands in (DeepSpeed's ``used_token``, padding routed
    nowhere): data the same forward is given again at its replay, as its token ids are, not varied; not one that
    requires gradients, which the model computed from its weights (a straight-through keep-mask it learns) and a
    replay after training computes anew."""
    first = _first_floating((args, kwargs))
    seen = {id(first[1])} if first is not None else set()
    for path, x in _floating_paths((args, kwargs), []):
        if id(x) in seen:
            continue
        seen.add(id(x))
        if not x.requires_grad and bool(((x == 0) | (x == 1)).all()):  # (a mask: see above)
            continue
        rows = x.detach().reshape(-1, x.shape[-1] if x.dim() > 1 else 1)
        others: list[torch.Tensor] = []
        if rows.shape[0] > 1:
            others.append(rows.roll(1, 0).reshape(x.shape))
        ref = x.detach().float()
        spread, mean = ref.std(unbiased=False) * 4, ref.mean()
        if bool(torch.isfinite(ref).all() and torch.isfinite(spread) and torch.isfinite(mean)):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(len(_OTHER_INPUTS)))
            others.append((noise.to(x.device) * spread + mean).to(x.dtype))
        for other in others:
            yield _replaced((args, kwargs), path, other)


def _floating_paths(
    obj: Any, out: list[tuple[tuple[Any, ...], torch.Tensor]], path: tuple[Any, ...] = (), depth: int = 0
) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    """``(path, tensor)`` of each floating tensor of one or more dimensions and values in nested tuples, lists, dicts,
    as deep as :func:`_first_floating` reads them."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.dim() >= 1 and obj.numel() > 1:
            out.append((path, obj))
        return out
    if depth > 4:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for key, value in items:
        _floating_paths(value, out, (*path, key), depth + 1)
    return out


def _padded_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs with the later half of their first floating tensor's token rows (the hidden states, see
    :func:`_other_inputs`) set to zero, as padding tokens' rows are where the model zeroes them before the MoE
    layer. Nothing when there is no such tensor or it holds one token row."""
    found = _first_floating((args, kwargs))
    if found is None:
        return
    x = found[1]
    rows = x.detach().reshape(-1, x.shape[-1]).clone()
    if rows.shape[0] < 2:
        return
    rows[rows.shape[0] // 2 :] = 0
    yield _replaced((args, kwargs), found[0], rows.reshape(x.shape))


def _same(a: list[Any], b: list[Any]) -> bool:
    """Are two runs' later choices the same, result for result?"""
    la, lb = _leaves(a, []), _leaves(b, [])
    return len(la) == len(lb) and all(
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and x.shape == y.shape
        and x.dtype == y.dtype
        and torch.equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def _same_choices(a: list[Any], b: list[Any], k: int) -> bool:
    """Are two runs' later choices the same choices, result for result? As :func:`_same`, but a later ``topk``
    (or ``sort``, ``max``) of ``k`` that names the same experts in each row (in any order, whatever its values) is
    the same choice: with the decision held, a second top-k over scores masked to the decision's experts (a dense
    ``[tokens, E]`` tensor zero elsewhere, as TensorRT-LLM's DeepSeek-V3 routing takes it) only reads the decision
    back, sorted by the current values, and a replay makes it so too. Its values are the current scores there,
    which differ on other inputs without any choice."""
    return len(a) == len(b) and all(_same([x], [y]) or _reads_back(x, y, k) for x, y in zip(a, b, strict=True))


def _reads_back(a: Any, b: Any, k: int) -> bool:
    """Are ``a`` and ``b`` each a ``(values, indices)`` result of ``k`` per row naming the same experts per row?"""
    la, lb = _leaves(a, []), _leaves(b, [])
    if len(la) != 2 or len(lb) != 2 or not all(isinstance(t, torch.Tensor) for t in (*la, *lb)):
        return False
    (va, ia), (vb, ib) = la, lb
    return (
        va.is_floating_point()
        and vb.is_floating_point()
        and not (ia.is_floating_point() or ia.is_complex() or ia.dtype == torch.bool)
        and ia.dtype == ib.dtype
        and va.shape == ia.shape == vb.shape == ib.shape
        and ia.dim() >= 1
        and ia.shape[-1] == k
        and torch.equal(ia.sort(-1).values, ib.sort(-1).values)
    )


def _first_floating(obj: Any, depth: int = 0) -> tuple[tuple[Any, ...], torch.Tensor] | None:
    """``(path, tensor)`` of the first floating tensor of two or more dimensions in nested tuples, lists, dicts."""
    if isinstance(obj, torch.Tensor):
        ok = obj.is_floating_point() and obj.dim() >= 2 and obj.numel() > 1
        return ((), obj) if ok else None
    if depth > 4:
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for key, value in items:
        found = _first_floating(value, depth + 1)
        if found is not None:
            return (key, *found[0]), found[1]
    return None


def _replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``obj`` with the item at ``path`` replaced (containers copied along the path)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, key: _replaced(obj[key], rest, value)}
    items = list(obj)
    items[key] = _replaced(items[key], rest, value)
    return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else tuple(items)


def _decided_rows(mode: _ProbeMode, ev: Evidence) -> tuple[int, ...]:
    """The rows (tokens) the decision's calls chose for in the run ``mode`` watched."""
    return tuple(mode.calls[i].rows for i in ev.decision if i < len(mode.calls))


def _weighs_experts(
    t: torch.Tensor, hidden: torch.Size | None, ev: Evidence, rows: tuple[int, ...] = (), spans: tuple[int, ...] = ()
) -> bool:
    """Can floating ``t`` hold weights of experts, so that its zeros say which experts are used? Such weights are
    laid along the experts (``E``), the slots (``k``, or each expert's slots: a multiple of ``E``) or the tokens (one
    weight per token, a top-1 gate; ``[tokens * k]`` or ``[tokens * E]`` flattened): a dimension of one of those
    sizes, the tokens read from the hidden states the forward took (each of their leading dimensions, and all of them
    together) and from the rows the decision chose for (``rows``: the tokens it kept, packed). A tensor with none (a
    mask over the edges of a graph) holds no expert's weight: its zeros are the model's own function of the scores,
    as its other values are. Where neither says the tokens, every tensor can. ``spans``: the lengths of the lists,
    tuples and mappings of tensors alike ``t`` sits in (see :func:`_leaf_spans`); one of E (or a multiple) lays its
    tensors along the experts (each expert's slots a tensor of its own)."""
    tokens = set(rows)
    if hidden is not None and len(hidden) >= 2:
        tokens.update((*hidden[:-1], math.prod(hidden[:-1])))
    if not tokens:
        return True
    k, e = ev.top_k, ev.num_experts
    sizes = {k, e, *tokens, *(n * k for n in tokens), *(n * e for n in tokens)}
    # (a multiple of E: each expert's slots laid flat, ``[E * capacity]``, GShard's dispatch buffer)
    if any(e > 1 and span % e == 0 for span in spans):
        return True
    return any(size in sizes or (e > 1 and size % e == 0) for size in t.shape)


#: How :func:`_restructured` names a tensor whose zeros moved (weights of experts zero in other places).
_ZEROS = "which of its weights are zero"


def _restructured(
    a: Any, b: Any, ev: Evidence, hidden: torch.Size | None = None, rows: tuple[int, ...] = ()
) -> str | None:
    """Which tensor of two outputs of one forward has another structure, or None: other integers (rows of
    ``k`` compared as sets: an order of slots is no other choice), or zeros in other places. Scalars
    (statistics) are not compared, nor the zeros of hidden states (see :func:`_hidden_like`; in bf16 a
    sum of experts rounds to 0 here or there): :func:`_hidden_differs` reads those; nor those of a tensor
    that holds no weights of experts (see :func:`_weighs_experts`; ``rows``: the decision's rows in the run)."""
    k = ev.top_k
    la, lb = _leaves(a, []), _leaves(b, [])
    if len(la) != len(lb):
        return "the number of tensors it returns"
    spans = _leaf_spans(a, [])
    for n, (x, y) in enumerate(zip(la, lb, strict=True)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0:
            continue
        what = f"tensor #{n} of its output"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"the shape of {what}"
        x, y = x.detach(), y.detach()
        if _hidden_like(x, hidden, ev):
            continue
        if not (x.is_floating_point() or x.is_complex()):
            if x.dtype != torch.bool and x.shape[-1] == k:
                x, y = x.sort(-1).values, y.sort(-1).values
            if not torch.equal(x, y):
                return f"{what} ({str(x.dtype).removeprefix('torch.')}: the experts it names)"
            continue
        if not _weighs_experts(x, hidden, ev, rows, spans[n]):
            continue
        tol = max(1e-3, 2 * torch.finfo(x.dtype).eps) if x.is_floating_point() else 1e-3  # (bf16 rounds to 0 too)
        x, y = x.abs().double(), y.abs().double()
        moved = (x == 0) != (y == 0)
        if bool(moved.any()):
            scale = float(torch.maximum(x.nan_to_num(0, 0, 0).max(), y.nan_to_num(0, 0, 0).max()))
            if bool((moved & (torch.maximum(x, y) > tol * scale)).any()):
                return f"{what} ({_ZEROS})"
    return None


def _verdict(
    name: str,
    calls: Sequence[Call],
    slots: tuple[int, ...],
    width: int,
    k: int,
    top_k: int | None,
    declared_top_k: bool,
    scope: nn.Module,
    why: str,
) -> Evidence:
    if declared_top_k and top_k is not None and top_k != k:
        raise _refuse(
            name,
            calls,
            f"top_k={top_k} was given, but its decision ({' + '.join(calls[i].describe() for i in slots)}) "
            f"chooses {k} experts per token",
            f"Pass top_k={k}, or leave top_k out: k is read from the decision",
        )
    return Evidence(tuple(calls), slots, k, width, bool(scope.training), why)
