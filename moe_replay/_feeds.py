"""What the forwards of a capture were fed, for :func:`~moe_replay.split_generation` to check.

A capture's rows say which experts each router chose, in call order, and nothing about the
tokens: rows split per sequence by their order alone go to other tokens wherever the
decode loop did not keep each sequence in its row (a beam search reorders its hypotheses
between steps), and nothing in the rows shows it. So while a session captures, it keeps, per
forward of the model it is attached to:

* the token ids it was fed (a copy on their device: no host sync per step);
* the attention mask of the tokens fed (given by name, or at its place among the forward's
  positional arguments; ``[batch, positions]``, or the ``[batch, heads, queries, keys]`` one
  that ``generate()`` gives with a static cache), where the forward fed more than one token
  per sequence (the prompt forward of ``generate()``);

and notes a call to a method of the KV cache passed to it (``cache``, ``past_key_values``)
that moves or copies the cache's rows between forwards: ``reorder_cache`` (beam search),
``batch_select_indices`` and ``batch_repeat_interleave`` (contrastive search), or to the
model's own ``_reorder_cache`` (which transformers' beam search calls instead, where a model
class defines one); and a call of the cache's ``crop`` or ``reset`` (SHRINKS) that took out tokens the
capture's forwards had put in, where a later forward followed (a decode loop that rolls back: speculative
decoding of one's own dropping its rejected draft tokens), read from the tokens the cache holds before and
after the call, as is a deep copy of the cache given to a forward after later forwards ran (a loop gone
back to a snapshot). Those methods are watched on the cache object (and the model) itself for
the length of the capture, and put back when it ends. It also notes a cache given to a
forward again after another cache was given in between: the forwards of two decode loops
interleaved (classifier-free guidance runs the model on the unconditional prompt after every
step, with a cache of its own), and a forward given a cache that held no tokens, or none, after a
forward was given one: a decode loop begun again (a second ``generate()`` call).

A forward is seen where it enters the model or any module between the model and its routers
(:func:`feed_levels`): from a session's attach until its detach, each of those modules has
a ``forward`` of the session's (:class:`FeedForward`) that feeds the outermost call to the blocks
open, then runs the module's own (a call fed no token ids nor embeddings, such as a layer fed
hidden states or a wrapper fed a batch of its own, is left to the modules it enters below). A call
fed token ids (or a batch given as one mapping of them, ``model({"input_ids": ...})``) at a module
with such a module inside it is left to those below too: the innermost fed ids takes it (a wrapper
that cuts the last token, puts a BOS first or reorders the sequences feeds the model the ids its
routers see), and it is the outer call's where a module below is fed none or none is entered. So a
wrapper around the model that calls an inner module (PEFT's ``PeftModel.generate`` runs the base
model's ``generate()``, whose forwards never enter the ``PeftModel``), or code that calls
``model.forward(...)`` itself, is seen too. It runs once per forward of the model, not per router
call, and not for the forward a checkpoint runs again in backward (that recompute reads its
forward's rows). It records nothing in code that ``torch.compile`` traces or a CUDA graph
captures (no host call sees such a forward's replays: the forwards of its rows are unknown too),
and the rows of such a capture are split by their order alone, unchecked.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import enum
import functools
import inspect
import operator
import re
import sys
import threading
import types
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from itertools import chain, compress, repeat
from typing import Any, TypeGuard, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._code_settings import is_generator_anywhere, static_attribute
from ._faults import forwards_call, inside_forward, note_fault, raised_inside, run_begins, run_ends
from ._files import files_as_they_were
from ._quiet import unheard
from ._torch_compat import (
    COMPILER,
    CUDA,
    EXPORT,
    FORK,
    FX,
    HOOK_HANDLES,
    compile_region,
    current_graph_task_id,
    dispatch_modes,
    dynamo_compiling,
    exporting,
    frame_callback,
    functorch_transform,
    hidden_from_dispatch_modes,
    jit_tracing,
    mark_static_address,
    maybe_mark_dynamic,
    stream_capturing,
    tracing,
    version_of,
)
from .errors import (
    MoEReplayError,
    RoutesValidationError,
    SessionStateError,
    TokenMismatchError,
    UnsupportedRouterError,
    _script_refusal,
)
from .evidence import _HOOKS, _autocast_cache_aside, _Snapshot
from .intercept import _CONTAINERS, EAGER, ORDER_PROBE, ClassForward, OrderStop, _code_of, _fingerprint
from .ring import FORWARD
from .routes import NO_FORWARD_ID, PADDING_ID, UNTOLD_RANK

__all__ = ["FeedCheck", "FeedForward", "FeedRecord", "MoveWatch", "feed_levels", "one_stream"]

#: cache methods that move or copy rows between forwards: beam search, contrastive search
ROW_MOVES = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")
#: cache methods that can take tokens out of a cache: ``crop`` (a speculative decode loop rolls back its rejected draft
#: tokens; its argument is the length to keep in older transformers, the count to remove in newer ones) and ``reset``.
#: Watched on a cache that has a method of ROW_MOVES, as those are; a call is read by the tokens the cache holds before
#: and after it (``get_seq_length()``), whatever its arguments mean
SHRINKS = ("crop", "reset")
#: how a rollback seen by the tokens a cache holds (not by a watched method) is named: ``"<class> " + HELD_FEWER``
HELD_FEWER = "held fewer tokens as a forward began than as the forward before it ended"
#: how a cache of plain tensors sliced back between two forwards is named (see ``FeedRecord._plain_given``)
PLAIN_SLICED = f"a cache of plain tensors, sliced back: it {HELD_FEWER}"
#: how a cache of plain tensors given back with its batch rows moved is named (see ``FeedRecord._plain_given``)
PLAIN_REORDERED = (
    "a cache of plain tensors given to a forward with batch rows of the cache the forward before it returned at other "
    "rows (index_select on its batch dimension)"
)
#: the values of each position of a batch row that tell the rows of a cache of plain tensors apart (see ``_row_sample``)
_SAMPLED = 4
#: a model's own method that reorders its KV cache's rows: transformers' beam search calls it where a model
#: class defines it, instead of the cache's reorder_cache (remote-code models do)
MODEL_MOVES = ("_reorder_cache",)
#: the methods of ROW_MOVES that a type has (none for tensors, ints...), by type
_MOVES_OF: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()
#: the token orders sessions found for a model level (see :func:`token_order`), each with what it was found under
#: (:class:`_Found`): a later session on the same model and routers takes the one whose modules on the way to the
#: first router are as they were, as it takes the routers' decisions, instead of running the model again at its
#: first block's first forward
_ORDER_OF: weakref.WeakKeyDictionary[nn.Module, list[_Found]] = weakref.WeakKeyDictionary()
#: the orders kept per model level (one per mode or layout its sessions ran under, the latest first)
_ORDERS_KEPT = 4
_CONSUMED = operator.attrgetter("host_consumed")
_NUM_ROWS = operator.attrgetter("num_rows")  # (a replay source's rows)
#: a record's or check's (``_inside``, ``_thread``): one fed a forward of this thread that runs now is inside it
_INSIDE_THREAD = operator.attrgetter("_inside", "_thread")
_get_ident = threading.get_ident
_MODULES = sys.modules
_GETITEM = operator.getitem  # (a replay source's rows read by the host)
_COMPILED = operator.attrgetter("compiled")  # (a level that a compiled call entered)
_BY_DEVICE = operator.attrgetter("_by_device")  # (a replay source's read_by_device, with no frame of a property)
#: the names under which a forward is given its KV cache, read where it is a list of tensors per layer
_CACHE_NAMES = ("past_key_values", "cache", "past_key_value", "past")
#: is a value given (not None)? For ``filter(_GIVEN, map(kwargs.get, _CACHE_NAMES))``: the caches a forward is given by
#: name, in C (no frame of a comprehension: this runs at every forward)
_GIVEN = functools.partial(operator.is_not, None)
#: a cache of plain tensors is given as either (a tuple of types, made once: ``list | tuple`` is a new object per test)
_LIST_OR_TUPLE = (list, tuple)
#: ``isinstance(value, torch.Tensor)`` and ``value.dim()``, in C (mapped over a forward's inputs)
_IS_TENSOR = functools.partial(type(torch.Tensor).__instancecheck__, torch.Tensor)
_DIM = operator.methodcaller("dim")
#: the names a forward is given its tokens by, read as such: a first parameter of another name given by name is read
#: in their stead only where neither is given
_INPUT_NAMES = frozenset({"input_ids", "inputs_embeds"})
#: the inputs of a forward the checks read by name (its mask, its tokens' places, its KV cache): given by position,
#: read as given by name (see ``FeedForward.named_at``)
_READ_BY_NAME = ("attention_mask", "position_ids", "cache_position", *_CACHE_NAMES)
#: types that are no cache (looked up in no table)
_PLAIN = frozenset({torch.Tensor, type(None), bool, int, float, str})


#: the routers see the tokens of ``[batch, positions]`` ids row by row (sequence 0's positions, then 1's...)
BATCH_MAJOR = "batch-major"
#: the routers see them position by position (every sequence's position 0, then position 1...), as layers that
#: run ``[positions, batch, hidden]`` do (fairseq, Megatron)
SEQUENCE_FIRST = "sequence-first"


class _GridTransposed(str):
    """:data:`SEQUENCE_FIRST` (equal to it, and read as it by every check that lays the ids out in the routers'
    order), told of a forward whose ids are themselves ``[positions, batch]`` (as ``nn.Transformer`` takes them),
    read as ``[batch, positions]``: its routers see every true sequence in turn (the ids' columns), so its rows are
    already in the order of its tokens, sequence by sequence, and are not reordered to the read grid's rows
    (``FeedRecord.ranks``)."""

    __slots__ = ()


#: the routers see the tokens of ids fed ``[positions, batch]`` (read as ``[batch, positions]``) sequence by sequence:
#: :data:`SEQUENCE_FIRST` of the read grid, whose rows follow its columns, the true sequences (``_GridTransposed``)
GRID_TRANSPOSED = _GridTransposed(SEQUENCE_FIRST)
#: neither: the routers' rows do not follow the tokens one to one in either order (told once, not checked)
OTHER_ORDER = "other"
#: the routers see the tokens batch-major, only those the forward's ``[batch, positions]`` attention mask keeps: the
#: padding taken out before them (``h[attention_mask.bool()]``), one row per token of a sequence. Told by the same runs
#: as the others (the changed token's row is its place among the tokens kept), and read per forward from its own mask
UNPADDED = "unpadded"
#: not told (a forward given a cache that holds tokens, one across processes, one of no other token to change to):
#: its ids are read as batch-major, and the rows of a forward fed embeddings are in the routers' order, whatever it is
#: (``Routes._order_untold``)
UNTOLD = "untold"
#: a later router sees the tokens of ``[batch, positions]`` ids in another order than the first router (a layer that
#: transposes, reverses or regroups the batch between them), or the first router sees them in an order of their own (a
#: layer before it sorts the sequences by length): no one order of ids fits every router's rows, so a
#: capture keeps none (its routes are refused), and a replay of such a forward of several sequences of several
#: positions is refused
MIXED = "mixed"

_SEQUENCE_FIRST_HINT = (
    "This model's routers see the tokens of a [batch, positions] forward sequence-first (position 0 of every "
    "sequence, then position 1...), not row by row as mr.BatchLayout, mr.pad_routes and the engine readers lay "
    "routes out: reorder such routes to the routers' order before replaying, routes[index] with index = "
    "torch.arange(batch * positions).view(batch, positions).t().reshape(-1)"
)


class _Forward:
    """What one forward of the model was fed."""

    # (what every forward sets; the rest is read from the class where a forward sets none, as a decode step: its
    # instance dict is made only where one does)
    __slots__ = ("__dict__", "calls", "count", "end", "ids", "mask", "places")
    #: the [batch, positions] of ids whose tokens its routers saw sequence-first (ids and mask kept in that order), or
    #: None: they saw them in the order of the ids
    shape: tuple[int, int] | None = None
    #: its ids were ``[positions, batch]``, read as ``shape`` (:data:`GRID_TRANSPOSED`): its rows, in the routers'
    #: order, are already sequence by sequence, position by position
    transposed = False
    #: fed embeddings of several sequences whose order its routers saw them in was not told (see ``ranks``)
    untold = False
    #: its routers saw only the tokens its kept ``mask`` marks (:data:`UNPADDED`): its ``count``, ``ids`` and ``mask``
    #: are those of the tokens it was fed until :meth:`unpad` (read with the routes: no host sync here)
    unpadded = False
    #: one sequence with padding, at a level not told :data:`UNPADDED`: its routers saw its tokens as fed or only those
    #: its mask keeps (in the same order either way), told by the rows they were called on (``_calls``)
    either = False
    #: after :meth:`unpad`: the ``[batch, positions]`` mask of the tokens its routers saw (on the host), which its
    #: ``mask`` no longer holds (split_generation lays the rows of such a prompt forward over it)
    grid: torch.Tensor | None = None
    width: int | None = None  # (the positions of the [batch, positions] it was fed, where it may unpad)
    #: the routers (by index) that saw only the tokens its mask keeps where the first saw every position: their rows
    #: are those of :meth:`view`
    later: frozenset[int] = frozenset()
    #: its lineage: the index (in ``FeedRecord.forwards``) of the latest earlier forward of the capture given or
    #: returning the KV cache it was given, or the cache it is a deep copy of (the forward whose cache it went on
    #: from), or None (none, or one no forward of the capture had: see :meth:`FeedRecord.lineage` and :class:`_Made`)
    parent: int | None = None

    def __init__(
        self, count: int, ids: torch.Tensor | None, mask: torch.Tensor | None, calls: tuple[int, ...] | None = None
    ) -> None:
        self.count = count  # tokens fed (rows per router call); -1 where unknown
        self.ids = ids  # a copy of the ids fed, None where fed embeddings
        self.mask = mask  # a copy of the attention mask of the tokens fed, or None
        #: each token's place in its sequence as the forward gave it (see :func:`places_fed`), in the order of ``ids``,
        #: -1 at padding; None where not known
        self.places: torch.Tensor | None = None
        #: each router's calls recorded before this forward (FeedRecord.calls_made), None where unknown
        self.calls = calls
        self.end: tuple[int, ...] | None = None  # and when it ended, None where unknown

    def view(self, router: int) -> _Forward:
        """This forward as router ``router`` saw it: itself, or, for a router of ``later``, one of only the tokens its
        mask keeps (read here: one host sync on a device)."""
        if router not in self.later:
            return self
        kept = _Forward(self.count, self.ids, self.mask, self.calls)
        kept.end, kept.unpadded, kept.width, kept.places = self.end, True, self.width, self.places
        kept.unpad()
        return kept

    def kept(self) -> int | None:
        """How many of its tokens its kept ``[batch, positions]`` mask keeps; None where it kept none of a known
        kind (one host sync on a device)."""
        keep = _kept_tokens(self.mask)
        return None if keep is None else int(keep.sum())

    def unpad(self) -> None:
        """Where its routers saw only the tokens its mask keeps, its count, ids and mask become theirs (one row each,
        every one a token of a sequence); a mask of no known kind (an additive one) leaves them as fed, and its rows
        then line up with no forward's (:meth:`FeedRecord.rows`)."""
        if not self.unpadded:
            return
        self.unpadded = False
        keep = _kept_tokens(self.mask)
        if keep is None:
            return
        width = self.width if keep.dim() == 1 else keep.shape[-1]
        self.grid = keep.bool().reshape(-1, width).cpu() if width and keep.numel() % width == 0 else None
        keep = keep.reshape(-1)
        if self.ids is not None:
            self.ids = self.ids.reshape(-1)[keep.to(self.ids.device)]
        if self.places is not None:
            self.places = self.places.reshape(-1)[keep.to(self.places.device)]
        self.count = int(keep.sum())
        self.mask = torch.ones(self.count, dtype=torch.bool, device=keep.device)


def _continues(forward: _Forward, places: torch.Tensor) -> bool:
    """Did ``forward`` go on from tokens its KV cache held, by the places its rows of one router call were fed at
    (``places``, -1 where not known)? Where its ids were a ``[batch, positions]`` grid of those rows, in their order:
    a sequence whose first known place is past 0 (a decode step, a prompt's second chunk; one sequence is enough);
    else where some place is past 0 and none is 0. A forward whose every sequence begins at place 0 (a prompt's forward
    on a fresh, reset or cropped cache) continues no earlier forward, whatever cache object it is given."""
    ids = forward.ids
    if forward.shape is None and not forward.unpadded and ids is not None and ids.dim() == 2:
        if ids.numel() == places.numel():
            grid = places.reshape(ids.shape)
            first = grid.masked_fill(grid < 0, torch.iinfo(grid.dtype).max).amin(dim=1)  # (places rise along each)
            return bool(((first > 0) & (grid >= 0).any(dim=1)).any())
    return bool((places > 0).any()) and not bool((places == 0).any())


class FeedRecord:
    """The inputs of each forward of one model during a capture, and any move of its cache's rows.

    Args:
        keep_inputs: keep each forward's ids and prompt mask. A capture whose rows cannot be
            lined up with its forwards watches the cache alone.
        limit: keep them for this many tokens at most, then none (a ``keep_newest`` ring of
            that capacity wraps there, drops its oldest rows and its count of calls, so
            :meth:`rows` could not use them; kept on, they would pile up for as long as it runs).
    """

    #: note forwards that begin a decode loop again (see :attr:`interleaved`)
    _notes_loops = True
    #: a forward an outer level was fed ids of, left to the levels inside it (see ``_take_deferred``), and the level
    #: whose forward it was taken as
    _deferred: tuple[Any, ...] | None = None
    _held_by: FeedForward | None = None
    #: the level whose forward no level took runs now (see :meth:`bare_began`), with the routers' calls as it began
    _bare: tuple[FeedForward, tuple[int, ...] | None] | None = None
    #: told of each deep copy of a watched cache, with the cache it copies (a replay's :meth:`FeedCheck.copied`)
    copies_to: Callable[[Any, Any], None] | None = None

    def __init__(self, keep_inputs: bool = True, limit: int | None = None) -> None:
        self.forwards: list[_Forward] = []
        #: the routers' calls as each forward no level took began and ended (a model fed a tensor of no known name:
        #: its tokens unknown), for :meth:`forward_calls`
        self.bare: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        #: the first cache method that moved rows during the capture, as ``Class.method``
        self.moved: str | None = None
        #: a call of a cache method of SHRINKS that took out tokens a forward of this capture had put in the cache, as
        #: (``Class.method``, whether it did: a bool, or a 0-d tensor of a static cache's counts, read with the
        #: routes), not yet followed by a forward; and one that a forward followed (see :attr:`rolled_back`)
        self._rollback: tuple[str, Any] | None = None
        self._rolled: tuple[str, Any] | None = None
        #: the tokens each cache watched in an earlier block of this record held as that block ended (a cache cropped
        #: between two capture() blocks that add to one capture), by id: (the cache, held then, held as first watched)
        self._left: dict[int, tuple[weakref.ref[Any], Any, Any]] = {}
        self._count = 0  # forwards fed to this record
        #: deep copies of watched caches made during the capture, by id: (the copy, the forwards fed before it was made)
        self._copies: dict[int, tuple[weakref.ref[Any], int]] = {}
        #: the type of a KV cache given again to a forward after another cache was given in between: the
        #: forwards of two decode loops interleaved (classifier-free guidance), or None (see :attr:`interleaved`)
        self._interleaved: str | None = None
        self._given_before = False  # a forward of this capture was given a KV cache
        #: forwards that began a decode loop again after a forward given a KV cache: (what they were given, the
        #: tokens it held then: an int, a 0-d tensor read when the routes are, or None for a forward given none)
        self._fresh: list[tuple[str, Any]] = []
        #: the first forward given a new cache that held tokens after a forward given another: (its type, the tokens
        #: it held, those the other held as its last forward ended), each an int or a 0-d tensor read with the routes;
        #: other tokens than before show a decode loop begun again from a copy of a prefix's cache (:attr:`interleaved`)
        self._switched: tuple[str, Any, Any] | None = None
        self._last: weakref.ref[Any] | None = None  # the KV cache given to the latest forward given one
        #: the kinds (types) of the values the forward fed last was given, and the place among them of its one cache,
        #: which is ``_last``'s: a forward given values of those kinds with ``_last`` there is read in brief (see
        #: :meth:`_watch_caches`); None where that forward was given no cache, or several
        self._same: tuple[tuple[type, ...], int] | None = None
        #: the tokens that cache held as that forward ended (an int; -1 where unknown or a static cache's count, which
        #: is on its device), and the tokens each watched cache held as this capture first watched it, by id: a cache
        #: the next forward is given holding fewer is a rollback between forwards, whatever took them out
        self._held_after: int = -1
        #: where that cache counts its tokens on its device (a static cache), the 0-d tensor it counts them in, kept
        #: (not read: no host sync per forward) for a forward given another cache once that one is let go
        self._count_after: torch.Tensor | None = None
        self._starts: dict[int, Any] = {}
        #: the shapes of the plain tensors of the cache given to the forward running now (None: none given), and the
        #: tensors the forward before returned in its cache, each (weakly) with the dimension it grew them along
        self._plain_in: list[tuple[int, ...]] | None = None
        self._plain_out: list[tuple[weakref.ref[torch.Tensor], int]] | None = None
        #: the first tensor of the cache of plain tensors the forward before returned, as (its shape, its storage's
        #: address, the dimension of its tokens, a few of its values at every token of each batch row: ``_row_sample``),
        #: for the next forward; and whether a forward was given one whose batch rows are those of the one returned
        #: before it at other rows (a bool, or a 0-d tensor on the device, read with the routes: see :attr:`reordered`)
        self._plain_rows: tuple[tuple[int, ...], int, int, torch.Tensor] | None = None
        self._reordered: bool | torch.Tensor = False
        self._shape_fed: torch.Size | None = None  # (the [batch, positions] of the forward fed last, where it has one)
        self._keep_inputs = keep_inputs
        #: the KV caches the forwards of this capture were given or returned (see :func:`places_fed`)
        self._built = _Built()
        #: the KV cache objects the forwards of this capture were given or returned, each with the index (in
        #: ``forwards``) of the latest forward that was (see :attr:`_Forward.parent`)
        self._made_by = _Made()
        #: a forward of this capture fed embeddings of several sequences of several positions: the order its routers
        #: saw them in is not told (its rows are in that order: see ``Routes._order_untold``)
        self.untold = False
        #: a forward of this capture whose routers saw its tokens sequence-first: its rows do not follow the tokens
        #: sequence by sequence (:meth:`ranks`)
        self.sequence_first = False
        #: why no ids are kept for the rows: a forward of several sequences whose routers saw its tokens in more than
        #: one order (:data:`MIXED`), or None
        self.mixed: str | None = None
        #: each router's scope module, by index (set by the session): a level's later routers that see only the tokens
        #: the mask keeps are told by scope (:meth:`unpads`)
        self.scopes: Sequence[nn.Module] = ()
        self._kept_now: _Forward | None = None  # (the forward kept for the forward running now, where kept)
        #: the cache given to the forward running now, where :meth:`_keep` noted it in ``_built`` and ``_made_by`` as
        #: that forward's, and the forward kept (:meth:`returned` notes a cache returned again only where another)
        self._noted: tuple[Any, _Forward] | None = None
        #: a forward of this capture that raised after its routers recorded rows, the exception caught inside the
        #: block (a retry after an out-of-memory error): its rows stop half-way, so the routers' rows no longer line
        #: up. The exception in words, or None
        self.raised: str | None = None
        self._limit = limit
        self._held = 0  # tokens of the forwards kept
        self._caches: dict[int, tuple[Any, list[tuple[str, Any, Any]]]] = {}
        self._active = False
        self._thread: int | None = None  # the thread whose forwards are recorded: the one that started it
        self._inside = False  # a recorded forward runs now (the modules it enters below are the same forward)
        #: the calls of rows each router recorded so far, read as each forward begins and ends: a router called
        #: several times per forward (one module at several layers, a loop of layers) has rows of each call, and
        #: :meth:`rows` gives each its forward's ids. None: one call per forward
        self.calls_made: Callable[[], tuple[int, ...]] | None = None
        self._began: tuple[int, ...] | None = None  # (calls_made as the forward fed now began: FeedForward._enter)

    # ------------------------------------------------------------- recording
    def start(self, levels: Sequence[FeedForward]) -> Callable[[], None]:
        """Record the forwards entering ``levels`` (:func:`feed_levels`) in this thread until the returned
        function is called.

        A forward in another thread is not the capture's (its routers refuse it): left out, it
        would leave the forwards out of line with the rows.
        """
        self._active = True
        self._thread = threading.get_ident()
        for level in levels:  # (the model's own cache reorder, where its class has one)
            names = tuple(name for name in MODEL_MOVES if callable(getattr(type(level.module), name, None)))
            if names:
                self._watch(level.module, names)
        remove = _enter_levels(levels, self)

        def stop() -> None:
            remove()
            self._active = False
            self._unwatch()
            self.calls_made = None  # (the next capture() sets it again: this one's forwards are counted)

        return stop

    def unseen(self) -> None:
        """A forward compiled, traced, captured in a CUDA graph or under a transform: nothing to record (nor a cache's
        rows kept from what it returns: see :meth:`returned`)."""
        self._shape_fed = self._plain_in = self._plain_rows = None

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: watch its cache; keep its ids and prompt mask (once per forward).

        Returns whether the forward is taken here: not where its inputs give no token count (a
        module on the way fed hidden states, a wrapper fed a batch of its own), so that a level it
        enters below is fed it, with the tokens. ``paired``: the level is an encoder-decoder, whose
        routers read the rows of two token streams (the encoder's, the decoder's): no one id per
        row, so none is kept. ``order``: how the routers see the tokens of ``[batch, positions]``
        ids (:func:`token_order`): the ids and mask are kept in that order, one per row.
        ``inputs``: ``_inputs(args, kwargs)``, where the caller read it already.
        """
        count, ids, fed = _inputs(args, kwargs) if inputs is None else inputs
        self._kept_now = self._noted = None
        self._shape_fed = None
        before = self._given_before
        given = self._watch_caches(args, kwargs)
        if not given:  # (a cache of plain tensors, as code of one's own keeps it: a list of (keys, values) per layer)
            plain = next(
                (kwargs[name] for name in _CACHE_NAMES if isinstance(kwargs.get(name), list | tuple) and kwargs[name]),
                None,
            )
            given = plain is not None
            if not given:  # (given no cache: one it returns is read against the positions it was fed, see returned)
                self._shape_fed = fed
            self._given_before = self._given_before or given
            if self._notes_loops:
                self._plain_given(plain)
        elif self._notes_loops:  # (_plain_given(None), inline: a cache object given, no plain tensors)
            self._plain_out = self._plain_rows = self._plain_in = None
        if paired:
            count, ids, fed = -1, None, None
        elif count < 0:
            return False
        if before and not given and self._notes_loops and count > 0:  # (its tokens start from no cached ones)
            self._fresh.append(("", None))
        untold = False
        if order != BATCH_MAJOR:
            if order == MIXED and fed is not None and min(int(fed[0]), int(fed[1])) > 1 and self.mixed is None:
                self.mixed = _mixed_words(int(fed[0]), int(fed[1]))
            if order == SEQUENCE_FIRST:
                self.sequence_first = True
            elif ids is None and fed is not None and min(int(fed[0]), int(fed[1])) > 1:
                self.untold = untold = True  # (embeddings whose order was not told, or told as neither)
        if self._keep_inputs:
            self._keep(count, ids, fed, kwargs, BATCH_MAJOR if order == UNTOLD else order, untold, args)  # (as before)
        if self._rollback is not None:  # (a forward after tokens were taken out of a cache: its rows follow theirs)
            self._follow()
        self._count += 1
        return True

    def bare_began(self, level: FeedForward) -> bool:
        """A forward enters ``level`` that it did not take (fed no token count), nor any level around it: count the
        router calls it makes (see :meth:`bare_left`) where the calls are counted. Returns whether it is counted."""
        if not self._keep_inputs or self.calls_made is None or self._began is None:
            return False
        self._bare = (level, self._began)
        return True

    def bare_left(self) -> None:
        """The forward of :meth:`bare_began` has ended."""
        bare, self._bare = self._bare, None
        if bare is not None and bare[1] is not None and self.calls_made is not None and self._keep_inputs:
            self.bare.append((bare[1], self.calls_made()))

    def unpads(self, scopes: Sequence[nn.Module]) -> None:
        """The routers of ``scopes`` see only the tokens the mask of the forward fed last keeps (the first router every
        position): their rows are read as those tokens' (:meth:`_Forward.view`)."""
        kept = self._kept_now
        if kept is not None and kept.mask is not None and kept.ids is not None:
            kept.later = frozenset(i for i, s in enumerate(self.scopes) if any(s is t for t in scopes))

    def _plain_given(self, plain: list[Any] | tuple[Any, ...] | None) -> None:
        """A forward is given ``plain``, a cache of plain tensors (or none: None): where its tensors are those the
        forward before it returned, sliced back along the dimension that forward grew them along (views from their
        start, still of the tensors it returned, with fewer tokens), tokens were taken out of the cache between the
        two forwards: a rollback (see :meth:`_shrunk`), as a speculative loop of one's own drops its rejected draft
        tokens. Copies of them, or a new cache, are not read (a second loop's own cache looks so)."""
        tensors = _plain_tensors(plain) if plain is not None else []
        returned, self._plain_out = self._plain_out, None
        if returned is not None and len(returned) == len(tensors):
            for t, (ref, dim) in zip(tensors, returned, strict=True):
                was = ref()
                if (
                    was is not None  # (alive, so its storage is no other tensor's)
                    and t is not was
                    and t.dim() == was.dim()
                    and t.shape[dim] < was.shape[dim]
                    and all(a == b for i, (a, b) in enumerate(zip(t.shape, was.shape, strict=True)) if i != dim)
                    and t.data_ptr() == was.data_ptr()
                    and t.untyped_storage().data_ptr() == was.untyped_storage().data_ptr()
                ):
                    self._shrunk(PLAIN_SLICED, 0, int(was.shape[dim]), int(t.shape[dim]))
                    break
        rows, self._plain_rows = self._plain_rows, None
        if rows is not None and tensors and self._reordered is not True:
            shape, storage, dim, sample = rows
            t = tensors[0]
            # (new tensors as long as those returned, not views of them: a copy, another loop's cache, or the same rows
            # moved, as a beam search of one's own reorders them with index_select; told apart by the rows' values)
            if tuple(t.shape) == shape and t.untyped_storage().data_ptr() != storage and t.device == sample.device:
                moved = _rows_elsewhere(_row_sample(t, dim), sample)
                if moved.device.type == "cpu":
                    if bool(moved):
                        self._reordered = True
                else:  # (no host sync per forward: read with the routes)
                    self._reordered = moved if self._reordered is False else self._reordered | moved
        self._plain_in = [tuple(t.shape) for t in tensors] if tensors else None

    def returned(self, out: Any) -> None:
        """The forward fed last returned ``out``: where it was given a cache of plain tensors and returns one grown
        along one dimension (its tokens'), keep those tensors (weakly) for the next forward (:meth:`_plain_given`)."""
        noted, self._noted = self._noted, None
        if self._keep_inputs:  # (the cache it returns: built by this capture's forwards, see _keep)
            returned = _returned_object(out)
            now = self._kept_now
            latest = now is not None and self.forwards and self.forwards[-1] is now
            # (the cache it was given, returned: noted in both as this forward's as it began, nothing since)
            if noted is None or returned is not noted[0] or not latest or noted[1] is not now:
                self._built.note(returned)
                if latest and returned is not None:  # (_note_object, inline)
                    self._made_by.note(returned, len(self.forwards) - 1)
        shapes, self._plain_in = self._plain_in, None
        fed, self._shape_fed = self._shape_fed, None
        if (shapes is None and fed is None) or not self._notes_loops:
            return
        cache = _returned_cache(out)
        tensors = _plain_tensors(cache) if cache is not None else []
        if not tensors:
            return
        if shapes is None:  # (given none: its tokens are along the one dimension as long as the positions it was fed)
            t = tensors[0]
            along = [] if fed is None else [i for i in range(1, t.dim()) if t.shape[i] == fed[1]]
            if fed is not None and t.dim() > 1 and t.shape[0] == fed[0] and len(along) == 1:
                self._keep_rows(t, along[0])
            return
        if len(tensors) != len(shapes):
            return
        kept: list[tuple[weakref.ref[torch.Tensor], int]] = []
        for t, shape in zip(tensors, shapes, strict=True):
            grown = [i for i, (a, b) in enumerate(zip(t.shape, shape, strict=False)) if a != b]
            if t.dim() != len(shape) or len(grown) != 1 or t.shape[grown[0]] < shape[grown[0]]:
                return
            kept.append((weakref.ref(t), grown[0]))
        self._plain_out = kept
        if kept[0][1] != 0:
            self._keep_rows(tensors[0], kept[0][1])

    def _keep_rows(self, t: torch.Tensor, dim: int) -> None:
        """Keep a few values at each token of each batch row of ``t``, the first tensor of a cache of plain tensors a
        forward returned (its tokens along ``dim``), for the next forward's (see :meth:`_plain_given`): one small copy
        per forward, on its device, and none once a move was seen on the host."""
        if self._reordered is True or t.dim() < 2 or dim == 0:
            return
        self._plain_rows = (tuple(t.shape), t.untyped_storage().data_ptr(), dim, _row_sample(t, dim).clone())

    @property
    def reordered(self) -> str | None:
        """:data:`PLAIN_REORDERED` where a forward of this capture was given a cache of plain tensors whose batch rows
        are those of the cache the forward before it returned at other rows (a beam search of one's own reorders its
        hypotheses so), else None. Reads a device's flag (one host sync, here and not per step)."""
        return PLAIN_REORDERED if bool(self._reordered) else None

    def left(self) -> None:
        """The forward fed last has ended: count the router calls it made (see :meth:`rows`), and the tokens its cache
        holds now (see :meth:`_watch_caches`)."""
        if self._keep_inputs and self.forwards and self.calls_made is not None:
            self.forwards[-1].end = self.calls_made()
        if self._notes_loops:
            cache = self._last() if self._last is not None else None
            if cache is None:
                self._held_after, self._count_after = -1, None
                return
            try:  # (_count_now, inline: it runs at every forward)
                held = type(cache).get_seq_length(cache)
            except Exception:
                held = -1
            if type(held) is int:
                self._held_after, self._count_after = held, None
            else:  # (a static cache's count, on its device: the tensor it adds to, kept, not read)
                self._held_after = -1
                self._count_after = held if isinstance(held, torch.Tensor) and held.numel() == 1 else None

    @property
    def rolled_back(self) -> str | None:
        """The cache method (``Class.method``) that took tokens out of a KV cache after forwards of this capture had put
        them in, where a later forward of the capture followed; else None.

        The rows of the tokens taken out stay in the capture, in order before the rows of the forwards that went on
        from the shorter cache: a speculative decode loop of one's own that rolls back its rejected draft tokens
        (``cache.crop(...)``), or one that empties its cache (``reset()``) and runs again. Tokens taken out by the
        capture's last call (an undone last forward) are no rollback: no row follows theirs. Reads a static cache's
        counts (one host sync, here and not per step).
        """
        if self._rolled is None:
            return None
        what, removed = self._rolled
        return what if bool(removed) else None

    def _shrunk(self, what: str, start: Any, before: Any, after: Any) -> None:
        """A call of ``what`` left a cache holding ``after`` tokens instead of ``before``; ``start``: the tokens it
        held when this capture first watched it (each an int, -1 where unknown, or a 0-d tensor: no host sync)."""
        if (  # (unrolled: it runs at every forward given a cache that holds fewer tokens than it did)
            (isinstance(start, int) and start < 0)
            or (isinstance(before, int) and before < 0)
            or (isinstance(after, int) and after < 0)
        ):
            return
        removed = (after < before) & (before > start)  # (tokens the capture's forwards had put in were taken out)
        if removed is False:
            return
        held = self._rollback
        self._rollback = (what, removed) if held is None else (held[0], held[1] | removed)

    def _taken_between(self, cache: Any) -> None:
        """A forward is given the cache the forward before it was given: fewer tokens in it than it held as that forward
        ended is a rollback, whatever took them out (a layer's own ``crop``, the class's method called on it, its
        tensors sliced back). Counts that only grow (a sliding window's, a linear-attention layer's) never read as
        one; a static cache's count, on its device, is not read per step."""
        try:  # (_count_now, inline: it runs at every forward given the cache again)
            held = type(cache).get_seq_length(cache)
        except Exception:
            return
        if type(held) is int and 0 <= held < (before := self._held_after):
            start = self._starts.get(id(cache), -1)
            if type(start) is not int:  # (a count first watched on a device)
                self._shrunk(f"{type(cache).__name__} {HELD_FEWER}", start, before, held)
            elif 0 <= start < before:  # (_shrunk on the host, inline: tokens the capture's forwards had put in went)
                was = self._rollback
                if was is None:
                    self._rollback = (f"{type(cache).__name__} {HELD_FEWER}", True)
                elif was[1] is not True:  # (a device's count: or'ed with True, as _shrunk does)
                    self._rollback = (was[0], was[1] | True)

    def _copied(self, copied: Any, original: Any = None) -> None:
        """A watched cache (``original``) was deep-copied (a snapshot a decode loop may go back to): note when, and
        that the copy continues the forward that last had the original (its lineage: see :attr:`_Forward.parent`; a
        replay's check is told by :attr:`copies_to`)."""
        if not self._active:
            return
        if original is not None:
            if self._keep_inputs:
                parent = self._made_by.end_of(original)
                if parent is not None and parent >= 0:
                    _note_object(self._made_by, copied, parent)
            if self.copies_to is not None:
                self.copies_to(copied, original)
        if self._notes_loops and id(copied) not in self._copies:
            try:
                self._copies[id(copied)] = (weakref.ref(copied), self._count)
            except TypeError:  # (no weak reference to it)
                pass

    def _follow(self) -> None:
        """A forward of the capture runs after tokens were taken out of a cache (:attr:`rolled_back`)."""
        pending, self._rollback = self._rollback, None
        if pending is not None:
            done = self._rolled
            self._rolled = pending if done is None else (done[0], done[1] | pending[1])

    @property
    def interleaved(self) -> str | None:
        """Where the capture's forwards were those of more than one decode loop, what shows it; else None.

        The type of a cache given again after another cache was given in between (two loops
        interleaved: classifier-free guidance); or ``"new <type>"``: a forward given a cache that
        held no tokens, or ``"no cache"``: a forward given none, after a forward of the capture was
        given a cache (a loop begun again: a second ``generate()`` call); or ``"switched <type> that held
        <n> tokens where ..."``: a forward given a new cache that held other tokens than the cache
        before it held as its forward ended (a second ``generate()`` call continued from a copy of a
        shared prompt's cache). Where a second loop's
        prompts are one token wide, its forwards have the row counts of the first loop's decode
        steps, and nothing else in the rows shows it.
        """
        if self._interleaved is not None:
            return self._interleaved
        for what, held in self._fresh:
            if held is None:
                return "no cache"
            if isinstance(held, int | torch.Tensor) and int(held) == 0:  # (a static cache's: read here, not per step)
                return f"new {what}"
        if self._switched is not None:
            what, held, before = self._switched
            if int(held) > 0 and int(before) >= 0 and int(held) != int(before):
                return (
                    f"switched {what} that held {int(held)} tokens where the cache before it held {int(before)} as "
                    "its last forward ended"
                )
        return None

    def _watch_caches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Watch the row moves of a cache among the inputs of a forward, and note a cache given again after another,
        or a new one; return whether the forward was given a cache."""
        values = (*args, *kwargs.values())
        kinds = tuple(map(type, values))
        same = self._same
        if same is not None and same[0] == kinds:  # (a decode step given what the forward before was)
            value = values[same[1]]
            if self._last is not None and value is self._last():
                # the cache given to the forward before, at its place, the other values of the kinds they were (none
                # of a kind that has a method of ROW_MOVES): the loop below, in brief
                if self._held_after > 0 and self._notes_loops:
                    self._taken_between(value)
                self._given_before = True
                return True
        given = False
        caches = 0  # (values of a kind that has a method of ROW_MOVES)
        for value in values:  # the cache, at any place or name (cache, past_key_values...)
            kind = type(value)
            if kind in _PLAIN:
                continue
            moves = _MOVES_OF.get(kind)
            if moves is None:
                moves = tuple(name for name in ROW_MOVES if callable(getattr(kind, name, None)))
                if moves:  # (and the methods that take tokens out, of a type that is a cache)
                    moves += tuple(name for name in SHRINKS if callable(getattr(kind, name, None)))
                _MOVES_OF[kind] = moves
            if moves:
                caches += 1
                seen = self._caches.get(id(value))
                again = seen is not None and seen[0]() is value
                if not again:
                    self._watch(value, moves if self._notes_loops else tuple(n for n in moves if n not in SHRINKS))
                if not given:  # (the first cache given: the forward's own)
                    given = True
                    last = self._last() if self._last is not None else None
                    if self._held_after > 0 and value is last and self._notes_loops:
                        self._taken_between(value)
                    if value is not last:  # (another cache than the forward before's)
                        if again and last is not None and self._interleaved is None:
                            self._interleaved = kind.__name__
                        elif not again and self._given_before and self._notes_loops:
                            held = _tokens_held(value)
                            if not isinstance(held, int) or held == 0:
                                self._fresh.append((kind.__name__, held))
                            if self._switched is None and not (isinstance(held, int) and held <= 0):
                                # (one that held the tokens the cache before held may continue them, a copy of it;
                                # one that held other tokens, a copy of a prefix's cache, begins a loop of its own:
                                # a static cache's counts are read with the routes, not here)
                                before: Any = self._held_after
                                if before < 0 and last is not None:
                                    before = _tokens_held(last)
                                elif before < 0 and self._count_after is not None:  # (a static cache let go: its
                                    # count as its last forward ended, which nothing changes since)
                                    before = self._count_after.detach().reshape(()).clone()
                                if not isinstance(before, int) or before >= 0:
                                    self._switched = (kind.__name__, held, before)
                        if id(value) in self._caches:
                            self._last = self._caches[id(value)][0]
        self._given_before = self._given_before or given
        # (where it was given one cache, now this record's latest, the next forward given values of the same kinds
        # with that cache at the same place takes the brief way above)
        last = self._last() if caches == 1 and self._last is not None else None
        at = next((i for i, v in enumerate(values) if v is last), None) if last is not None else None
        self._same = (kinds, at) if at is not None else None
        return given

    def _keep(
        self,
        count: int,
        ids: torch.Tensor | None,
        fed: torch.Size | None,
        kwargs: dict[str, Any],
        order: str = BATCH_MAJOR,
        untold: bool = False,
        args: tuple[Any, ...] = (),
    ) -> None:
        """Keep a copy of the ids a forward was fed (``_inputs``), of its prompt mask and of each token's place in its
        sequence (:func:`places_fed`, read from ``args`` and ``kwargs``), in the ``order`` its routers see them
        (:func:`token_order`); ``untold``: an order not told, its rows kept as if batch-major."""
        if self._limit is not None:
            self._held += max(count, 0)
            if self._held > self._limit:  # (past a keep_newest ring's capacity: its rows no longer start at a forward)
                self.forwards.clear()
                self._keep_inputs = False
                return
        kept = None  # (ids carry no autograd history)
        if ids is not None:
            kept = ids.clone() if order is BATCH_MAJOR else in_router_order(ids, order).clone()
        mask = None
        own = False  # (a [batch, positions] mask of its own, kept: the tokens its routers see where it unpads)
        if fed is not None and fed[1] > 1:  # [batch, positions] fed, several per sequence: a prompt forward (or a
            given = kwargs.get("attention_mask")  # training one); a decode step keeps no mask
            if (
                isinstance(given, torch.Tensor)
                and given.dim() == 2
                and given.shape[0] == fed[0]
                and given.shape[1] >= fed[1]
            ):
                width = fed[1]
                # a float mask is kept as it is: 0/1 or additive is read when the rows are (no host sync here)
                mask = given[:, -width:].clone() if given.is_floating_point() else given[:, -width:] != 0
                if order is not BATCH_MAJOR:
                    mask = in_router_order(mask, order)
                own = True
            elif isinstance(given, torch.Tensor) and given.dim() == 4:
                mask = _tokens_of_4d(given, fed[0], fed[1])  # (a static cache's: [batch, heads, queries, keys])
                if mask is not None and order is not BATCH_MAJOR:
                    mask = in_router_order(mask, order)
        forward = _Forward(count, kept, mask, self._began)
        caches = [*filter(_GIVEN, map(kwargs.get, _CACHE_NAMES))]  # (read once, for _given_cache and _cache_held)
        given = caches[0] if caches else None  # (_given_cache, inline)
        if given is not None:  # (its lineage: the forward whose cache it goes on from, see lineage)
            parent = self._made_by.note(given, len(self.forwards))  # (noted, and what it read before)
            if parent is not None and parent >= 0:
                forward.parent = parent
        if kept is not None:  # (each token's place in its sequence: a replay of its row elsewhere is refused)
            held: int | torch.Tensor | None = _cache_held(kwargs, caches)
            if held is None:  # (a static cache's count, on its device: read in stream order, no host sync)
                held = _device_held(kwargs)
            placed = fed if fed is not None else _flat_shape(ids, kwargs)
            _note_past(kwargs, placed)
            places = places_fed(args, kwargs, placed, held)
            if places is not None and places.numel() == count:
                cache = given  # (the cache given, read above: nothing since changes the arguments)
                if cache is not None:  # (noted, and whether it was before: _Built.holds)
                    if self._built.note(cache) is None:
                        # (after tokens of a cache no forward of this capture built: marked, see AFTER_OUTSIDE)
                        if isinstance(held, torch.Tensor):
                            outside = (places >= 0) & (held.to(places.device) > 0)
                            places = torch.where(outside, AFTER_OUTSIDE - places, places)
                        elif held:
                            places = torch.where(places >= 0, AFTER_OUTSIDE - places, places)
                    self._noted = (cache, forward)  # (noted in both as this forward's: see returned)
                forward.places = places.reshape(-1) if order is BATCH_MAJOR else in_router_order(places, order)
        if own and fed is not None:  # (else as made: not unpadded, no width, not either)
            forward.unpadded = unpadded = order == UNPADDED
            forward.width = int(fed[1])
            forward.either = not unpadded and order == BATCH_MAJOR and int(fed[0]) == 1
        if order == SEQUENCE_FIRST and fed is not None:  # (ids or embeddings: each row's place in the tokens' order)
            forward.shape = (int(fed[0]), int(fed[1]))
            if isinstance(order, _GridTransposed):
                forward.transposed = True
        if untold:
            forward.untold = True
        self.forwards.append(forward)
        self._kept_now = forward

    def _watch(self, cache: Any, names: tuple[str, ...]) -> None:
        """Note calls of ``cache``'s row-moving methods ``names`` while this capture runs."""
        try:
            ref = weakref.ref(cache)
            own = vars(cache)
        except TypeError:  # no weak reference or no instance dict: its moves cannot be watched
            return
        record = weakref.ref(self)
        patched = []
        start = _tokens_held(cache) if any(name in SHRINKS for name in names) else -1
        made = self._copies.pop(id(cache), None)
        if made is not None and made[0]() is cache and made[1] < self._count:  # (taken before forwards that ran since)
            self._rollback = (f"copy.deepcopy({type(cache).__name__}) given after later forwards", True)
        left = self._left.pop(id(cache), None)
        if left is not None and left[0]() is cache:  # (watched in an earlier block: cropped in between?)
            start = left[2]
            self._shrunk(f"{type(cache).__name__}.crop between capture() blocks", start, left[1], _tokens_held(cache))
        self._starts[id(cache)] = start if start != -1 or not self._notes_loops else _count_now(cache)
        for name in names:
            before = own.get(name)
            if name in MODEL_MOVES:  # (a static method too: called as looked up on the object)
                noting = _Noting(record, name, getattr(cache, name), ref)
            elif name in SHRINKS:
                noting = _Shrinking(record, name, before, ref, start)
            else:
                noting = _Noting(record, name, before, ref)
            own[name] = noting
            patched.append((name, noting, before))
        self._caches[id(cache)] = (ref, patched)

    def _unwatch(self) -> None:
        """Put back every cache method this record watches (where nothing replaced it since)."""
        for ref, patched in self._caches.values():
            cache = ref()
            if cache is None:
                continue
            own = vars(cache)
            for name, noting, before in patched:
                if isinstance(noting, _Shrinking) and id(cache) not in self._left:  # (once per cache and block)
                    self._left[id(cache)] = (ref, _tokens_held(cache), noting.start)
                if own.get(name) is noting:
                    if before is None or (
                        type(before) in (_Noting, _Shrinking) and before.record is None and before.before is None
                    ):
                        del own[name]  # (a copy's pass-through: its class's method again)
                    else:
                        own[name] = before
        self._caches.clear()
        self._last = self._same = None
        self._left = {key: left for key, left in self._left.items() if left[0]() is not None}
        self._copies = {key: made for key, made in self._copies.items() if made[0]() is not None}
        self._starts.clear()
        self._held_after, self._count_after = -1, None

    def to_host(self) -> None:
        """Move the kept inputs to the host, one copy per device and dtype: a detached session holds no device
        memory (its :meth:`Session.routes` still reads them)."""
        self._fresh = [(what, held.cpu() if isinstance(held, torch.Tensor) else held) for what, held in self._fresh]
        self._plain_rows = None  # (a later forward's cache is no continuation of the rows kept)
        if isinstance(self._reordered, torch.Tensor):
            self._reordered = self._reordered.cpu()
        if self._switched is not None:
            what, *counts = self._switched
            held, before = (c.cpu() if isinstance(c, torch.Tensor) else c for c in counts)
            self._switched = (what, held, before)
        for name in ("_rollback", "_rolled"):
            held = getattr(self, name)
            if held is not None and isinstance(held[1], torch.Tensor):
                setattr(self, name, (held[0], held[1].cpu()))
        for name in ("ids", "mask", "places"):
            groups: dict[tuple[torch.device, torch.dtype], list[_Forward]] = {}
            for f in self.forwards:
                t = getattr(f, name)
                if t is not None and t.device.type not in ("cpu", "meta"):
                    groups.setdefault((t.device, t.dtype), []).append(f)
            for held in groups.values():
                parts = [getattr(f, name) for f in held]
                flat = torch.cat([p.reshape(-1) for p in parts]).cpu()
                for f, p, host in zip(held, parts, flat.split([p.numel() for p in parts]), strict=True):
                    setattr(f, name, host.view(p.shape))

    # ------------------------------------------------------------- reading
    def lined_up(self) -> bool:
        """Did every router make its calls in the same forwards of the model, as counted where each began and ended?

        Routers of the same calls (rows per call) may still have made them in other forwards: a model held beside
        the attached one's forward and called on its own makes its calls outside every forward seen, or in the
        forwards of its own that its level sees. The rows of one router, read by the forwards' bounds, then give no
        other router's token ids. True where the bounds were not counted."""
        for f in self.forwards:
            if not f.count or f.calls is None or f.end is None:
                continue
            if len(set(f.calls)) > 1 or len(set(f.end)) > 1:
                return False
        return True

    def rows(
        self, calls: tuple[tuple[int, int], ...] | None, router: int = 0, outside: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The token id and prompt-mask value fed at each row of a capture whose router calls were ``calls``
        (those of every router, or of router ``router`` of the session alone).

        Two host tensors of one value per row (-1 where not known: a forward fed embeddings,
        or no prompt mask), or ``(None, None)`` where the forwards do not line up with the
        router calls (unknown calls, forwards in compiled code, a router called on a part of
        its forward's tokens, forwards of another model). ``outside``: calls of the router
        outside every forward (on hidden states of one's own) line up too, their rows'
        id ``NO_FORWARD_ID``.
        """
        parts = self._calls(calls, router, outside)
        if parts is None or calls is None:
            return None, None
        sizes = [n for n, c in calls for _ in range(c)]
        fed = [f for f in self.forwards if f.count]
        masks = [None if f is None else _zero_one(f.mask) for f in parts]
        ids = _flat([None if f is None else f.ids for f in parts], sizes, torch.long)
        if ids is None and outside and parts and all(f is None for f in parts) and any(f.ids is not None for f in fed):
            # (every call of it outside the forwards fed ids, while others' were in them: a model held beside the
            # attached one's forward, called on its own: the token of no forward, as a call on hidden states)
            ids = torch.full((sum(sizes),), NO_FORWARD_ID, dtype=torch.long)
        if ids is not None and any(f is None for f in parts):
            ids[torch.cat([torch.full((n,), f is None) for f, n in zip(parts, sizes, strict=True)])] = NO_FORWARD_ID
        return ids, _flat(masks, sizes, torch.int8)

    def places(self, calls: tuple[tuple[int, int], ...] | None) -> torch.Tensor | None:
        """Each row's place in its sequence as its forward gave it (see :func:`places_fed`), as :meth:`rows` reads the
        ids: one host int64 per row, -1 where not known (padding, a forward whose places were not read), marked
        :data:`AFTER_OUTSIDE` after tokens of a cache no forward of the capture built; None where the forwards do not
        line up with the router calls or no place is known."""
        parts = self._calls(calls)
        if parts is None or calls is None:
            return None
        sizes = [n for n, c in calls for _ in range(c)]
        flat = _flat([None if f is None else f.places for f in parts], sizes, torch.long)
        return flat if flat is not None and bool((flat != -1).any()) else None

    def lineage(self, calls: tuple[tuple[int, int], ...] | None, places: torch.Tensor | None) -> torch.Tensor | None:
        """Each row's lineage (``Routes._lineage``), as :meth:`rows` reads the ids: how many rows before it the rows of
        the forward whose KV cache its forward went on from begin (:attr:`_Forward.parent`), where that forward's rows
        are among them and the forward went on from tokens of it (a sequence of it whose first token is past place 0,
        of ``places``: :meth:`places`; see :func:`_continues`); 0 where not known (a fresh cache, one no forward of
        the capture had, one emptied before the forward: a forward whose every sequence begins there, at place 0,
        continues no earlier forward, whichever cache object it is given). One host int64 per row, or None where the
        forwards do not line up with the router calls or no row's lineage is known.

        A replay compares it at each forward's first row with the forward of its own block that was last given or
        returned the cache object that forward is given (:meth:`FeedCheck._check_lineage`): a decode step given
        another sequence's cache, built by the block and holding as many tokens, is refused."""
        if places is None:
            return None
        parts = self._calls(calls)
        if parts is None or calls is None:
            return None
        sizes = [n for n, c in calls for _ in range(c)]
        if sum(sizes) != places.numel():
            return None
        first: dict[int, int] = {}  # (each forward's first row, by id)
        at = 0
        for f, n in zip(parts, sizes, strict=True):
            if f is not None and id(f) not in first:
                first[id(f)] = at
            at += n
        out = torch.zeros(at, dtype=torch.long)
        at, known = 0, False
        for f, n in zip(parts, sizes, strict=True):
            parent = None if f is None or f.parent is None else self.forwards[f.parent]
            begins = None if parent is None else first.get(id(parent))
            # (it went on from tokens of the cache: a copy's are marked as after a cache no forward built; a sequence
            # whose first token is at place 0 begins there: emptied (reset, cropped) or fresh, whoever had it last)
            if begins is not None and n and _continues(cast(_Forward, f), unmarked_places(places[at : at + n])):
                out[at : at + n] = torch.arange(at, at + n) - begins
                known = True
            at += n
        return out if known else None

    def forward_calls(
        self, calls: tuple[tuple[int, int], ...] | None, router: int | None = None
    ) -> tuple[int, ...] | None:
        """The router calls each forward of this capture made, in order (``Routes._forward_calls``), where every
        router made as many calls in each forward, every call of theirs was in a forward, and the forwards were
        counted from the first call of ``calls`` (those of every router) to the last; else None. ``router``: the
        calls router ``router`` of the session made in each forward (``calls`` its own: ``Routes._router_calls``),
        whatever the others made, 0 in a forward that did not call it."""
        if calls is None or not self._keep_inputs or (router is None and not self.lined_up()):
            return None
        r = 0 if router is None else router
        taken: list[tuple[int, int]] = []
        for f in self.forwards:
            if not f.count:
                continue
            if f.calls is None or f.end is None or len(f.calls) <= r or len(f.end) <= r:
                return None  # (not counted)
            taken.append((f.calls[r], f.end[r]))
        spans = list(taken)
        for began, ended in self.bare:  # (those that hold no forward a level inside them took: those hold theirs)
            if len(began) <= r or len(ended) <= r or (router is None and (len(set(began)) > 1 or len(set(ended)) > 1)):
                return None
            if not any(began[r] <= a and b <= ended[r] for a, b in taken):
                spans.append((began[r], ended[r]))
        total, at, out = sum(c for _, c in calls), 0, []
        for a, b in sorted(spans):
            if a != at or b < a:
                return None  # (calls outside the forwards: a block called alone; or forwards that overlap)
            out.append(b - a)
            at = b
        return tuple(out) if out and at == total else None

    def apart(self, calls: tuple[tuple[int, int], ...], router: int) -> bool:
        """Did a forward call router ``router`` (whose calls were ``calls``) only on other row counts than it was fed
        tokens (a decoder's canvas of its own; a canvas as long as another forward's tokens too)? False where the
        forwards' calls were not counted."""
        sizes = [n for n, c in calls for _ in range(c)]
        for f in self.forwards:
            if not f.count or f.calls is None or f.end is None or len(f.calls) <= router or len(f.end) <= router:
                continue
            made = sizes[f.calls[router] : f.end[router]]
            if made and f.count not in made:
                return True
        return False

    def ranks(self, calls: tuple[tuple[int, int], ...] | None, rows: int) -> torch.Tensor | None:
        """Where a forward's routers saw its tokens sequence-first, each of the ``rows`` rows' place in the order of
        the tokens, sequence by sequence (``Routes._token_rank``), -1 where the rows do not line up with the forwards
        (:meth:`rows`); ``UNTOLD_RANK`` for the rows of a forward fed embeddings whose order was not told (every row,
        where they do not line up and no forward was seen sequence-first); None where every forward's routers saw the
        tokens in the order of their ids. The mark is the rows' own: slices, picks, joins, files and ranks keep it."""
        if not self.sequence_first and not self.untold:
            return None
        parts = self._calls(calls)
        if parts is None or sum(0 if f is None else f.count for f in parts) != rows:
            return torch.full((rows,), -1 if self.sequence_first else UNTOLD_RANK, dtype=torch.long)
        out, at = [], 0
        for f in parts:  # (each router call's rows, in their forward's token order)
            if f is None:  # (no call outside the forwards here: see _calls)
                continue
            if f.untold:  # (in the order its routers saw them, which is not told)
                out.append(torch.full((f.count,), UNTOLD_RANK, dtype=torch.long))
            elif f.shape is not None and not f.transposed and f.shape[0] * f.shape[1] == f.count:
                batch, positions = f.shape
                out.append(torch.arange(at, at + f.count).view(batch, positions).t().reshape(-1))
            else:
                out.append(torch.arange(at, at + f.count))
            at += f.count
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def _calls(
        self, calls: tuple[tuple[int, int], ...] | None, router: int = 0, outside: bool = False
    ) -> list[_Forward | None] | None:
        """The forward of each call of router ``router`` (where the routers' calls are ``calls``), or None where they
        do not line up (see :meth:`rows`); with ``outside``, None for each call outside every forward."""
        if calls is None or not self._keep_inputs or self.mixed is not None:
            return None
        for f in self.forwards:  # (the tokens of forwards whose routers saw only those their masks keep: read now)
            if f.unpadded:
                f.unpad()
        sizes = [n for n, c in calls for _ in range(c)]
        fed = [f.view(router) for f in self.forwards if f.count]  # (as this router saw each)
        gaps = [0] * (len(fed) + 1)  # (the calls before each forward, and after the last)
        # each forward's router calls, counted as it began and ended (one each where not counted)
        if any(f.calls is None or f.end is None or len(f.calls) <= router for f in fed):
            times = [1] * len(fed)
        else:
            bounds = [0] + [c for f in fed for c in (f.calls[router], f.end[router])] + [len(sizes)]  # type: ignore[index]
            gaps = [b - a for a, b in zip(bounds[::2], bounds[1::2], strict=True)]
            if any(gaps) and not outside:
                return None  # (router calls outside the model's forwards: a block called alone)
            if any(g < 0 for g in gaps):
                return None
            times = [f.end[router] - f.calls[router] for f in fed]  # type: ignore[index]
            for f in fed:  # (one sequence whose routers saw only the tokens its mask keeps: one row each)
                if f.either:
                    f.either = False
                    made = sizes[f.calls[router] : f.end[router]]  # type: ignore[index]
                    keep = _kept_tokens(f.mask)
                    if made and keep is not None and all(n == int(keep.sum()) != f.count for n in made):
                        f.unpadded = True
                        f.unpad()
        # (a router called on every token of its forward at each call, as often as it was called: each call's rows
        # are the forward's tokens; calls of any other size do not line up with the forwards)
        parts: list[_Forward | None] = []
        for f, m, g in zip(fed, times, gaps, strict=False):
            parts += [None] * g + [f] * m
        parts += [None] * gaps[-1]
        # (with ``outside``, one router's calls alone: a forward that did not call it, as a modality's router on a
        # batch without it, gives it no rows)
        if [n if f is None else f.count for f, n in zip(parts, sizes, strict=False)] != sizes:
            return None
        if 0 in times and not outside:
            return None
        return parts


class MoveWatch(FeedRecord):
    """During a replay: refuse a forward after the KV cache given to the model moved rows between forwards.

    Replayed rows are read in call order, so row ``j`` of a decode step gets the experts recorded for row ``j``
    of that step, chosen for the tokens before it in that row. A cache whose rows moved since the forward
    before (a beam search's ``reorder_cache``, a contrastive search's ``batch_select_indices``) puts other
    tokens before row ``j`` than the recorded forwards may have had, and no check of the tokens fed shows it
    where hypotheses share a token: the replay would force one hypothesis's experts on another. So a forward
    after such a move is refused before any router reads, whatever moves the capture saw.
    """

    _notes_loops = False

    def __init__(self) -> None:
        super().__init__(keep_inputs=False)
        #: forwards that entered the model in the block: where none did, whatever ran went around it (a program traced
        #: or exported from it, a copy), and a replay that forced nothing is refused (see ``Session.replay``)
        self.entered = 0

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: refused after a row move; its cache watched (at the first level it
        enters, which is given the cache that the levels below it are given too)."""
        self.entered += 1
        moved = self.moved
        if moved is not None:
            why = (
                "as a beam search (num_beams > 1) does between steps to reorder its hypotheses"
                if moved.endswith("reorder_cache")
                else "as a contrastive search (penalty_alpha) does to keep each sequence's chosen candidate"
            )
            raise RoutesValidationError(
                f"while this replay ran, the KV cache given to the model moved rows between forwards ({moved}, "
                f"{why}), so row j of this forward no longer continues row j of the forward before it in an order "
                "the routes can be checked against: the recorded rows would force one hypothesis's experts on "
                "another (not seen in the tokens fed where hypotheses share a token). Replay decoding with "
                "num_beams=1 (greedy or sampling), or replay a rollout teacher-forced over its sequences "
                "(mr.split_generation, mr.BatchLayout)"
            )
        self._watch_caches(args, kwargs)
        return True


class TracedFeedCheck:
    """The token check of a forward that ``torch.compile`` runs whole, one per model level (:class:`FeedForward`),
    kept for the session: what :meth:`FeedCheck.fed` compares in eager code, as tensor ops of the compiled code itself.

    Compiled code runs no Python per call and must not sync the host, so it cannot refuse a forward as it begins.
    Instead, the level's compiled forward compares the ids it is fed with the token ids of the rows its routers are
    about to read (from the routers' device cursors), and marks the first mismatch in :attr:`state`, a small tensor on
    the routers' device (its address kept across calls, as the rings': CUDA graphs of ``mode="reduce-overhead"``
    update it too). :meth:`FeedCheck.finish` reads it as the block ends (a strict replay syncs there anyway), and an
    eager forward of the block reads it where it is on the CPU: the refusal comes after the fact, but before the block
    returns. Only shapes are traced: other batches, routes or blocks run the same compiled code.

    Where the forward's order is not told (no eager forward established it), or a sequence's padding may be taken out
    before the routers, each order it may take is compared, and the forward is marked only where none fits.

    Routes whose rows are each router's own (``Routes._router_ids``: one MoE block called at several layers, a router
    also called outside every forward) are compared router by router (:attr:`wants`): each router's next rows, where
    the forward is fed, against its own ids, and a router is counted as the forward ends where it read rows in it (one
    that a forward does not call reads none, and its next rows are a later forward's).
    """

    #: the places in :attr:`state`: a mismatch found (0/1), the forward's first row, the first token that differs (in
    #: the routers' order), its id, the id its row was recorded for (-1: a token of a sequence at a row recorded at
    #: prompt padding; ``NO_FORWARD_ID``: a row recorded outside every forward), the tokens that differ, the forward's
    #: tokens, the compiled forwards found fed other tokens, and the router whose rows they are (-1: every router's)
    FOUND, START, AT, GOT, WANT, BAD, COUNT, FORWARDS, ROUTER = range(9)
    #: the places in :attr:`calls_state`: a forward found whose router calls are not those of one captured forward
    #: (0/1), the compiled forwards checked so far (the forward found: its number among them), the router (its place
    #: in :attr:`sources`), the rows it read in the forward (first, end), the captured forward they began in (its index
    #: in the router's captured calls), the tokens the forward was fed, another router that read in it and the
    #: captured forward it began in (-1: none), and what was found (``CALLS_MORE``, ``CALLS_WHOLE``, ``CALLS_OTHER``)
    CALL_FOUND, CALL_FORWARD, CALL_ROUTER, CALL_START, CALL_END, CALL_AT, CALL_COUNT, CALL_OTHER, CALL_OTHER_AT = range(
        9
    )
    CALL_KIND = 9
    #: a router read more rows than one call on each of the forward's tokens where the captured forward made one call;
    #: read other rows than all the calls of a captured forward of several; began in another captured forward than a
    #: router before it in the forward
    CALLS_MORE, CALLS_WHOLE, CALLS_OTHER = 1, 2, 3

    def __init__(self) -> None:
        #: armed by a replay's check for its block (see :meth:`arm`); compiled code is traced for either value
        self.active = False
        self.want: torch.Tensor | None = None  # [rows + 1] the token id of each row, -1: unknown (and past the end)
        self.padding: torch.Tensor | None = None  # [rows + 1] True for each row recorded at prompt padding
        self.sources: list[Any] = []  # the routers' replay sources (their device cursors)
        #: each source's own ``want`` and ``padding``, where the rows are each router's own; None: ``want`` for all
        self.wants: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.names: list[str] = []  # the sources' routers (what a refusal names; read in eager code only)
        self.state: torch.Tensor | None = None  # see FOUND..ROUTER
        #: each source's captured calls, where the routes know each router's own (``Routes._router_calls``): a
        #: ``[forwards, 4]`` tensor of each captured forward's first row, the row its calls end at, its number in the
        #: capture and whether it called the router more than once (see :meth:`_calls_ran`); None where not known
        self.calls: list[torch.Tensor | None] | None = None
        #: what the calls check marks (see CALL_FOUND..CALL_KIND), the address kept across calls as :attr:`state`'s
        self.calls_state: torch.Tensor | None = None
        #: a forward of the block armed last was fed its tokens here (its ids compared, or embeddings, which no check
        #: reads; set by the compiled code as it runs, an attribute it stores and never reads: no guard): its routers'
        #: rows are checked in :attr:`state` where the host saw no forward fed them (:meth:`FeedCheck._compiled_read`)
        self.covered = False
        #: each row's place in its sequence (-1 at padding, -2 where not known, and past the end) on the routers'
        #: device, where a replay of rows that know their places and no token ids is armed (:meth:`arm_places`): the
        #: positions a forward compiled whole is fed are compared with them (:meth:`feed_places`); None otherwise
        self.places: torch.Tensor | None = None
        #: what :meth:`feed_places` marks (see PLACE_FOUND..PLACE_KIND), the address kept across calls
        self.places_state: torch.Tensor | None = None
        self.place_sources: list[Any] = []

    #: the places in :attr:`places_state`: a forward found fed positions that do not fit its rows' places (0/1), the
    #: row it began at, the token (its place in the forward, batch-major), the forward's positions per batch row, and
    #: what was found (``PLACE_STEPS``: positions restarting or as far apart as no two rows; ``PLACE_VALUES``: a token
    #: at another place of its sequence than its row, fed no mask and nothing that may hold tokens before its own)
    PLACE_FOUND, PLACE_START, PLACE_AT, PLACE_WIDTH, PLACE_KIND = range(5)
    PLACE_STEPS, PLACE_VALUES = 1, 2

    def arm_places(self, places: torch.Tensor, sources: Sequence[Any]) -> torch.Tensor:
        """As a block of rows that know their places starts (eager): compare the positions of the forwards compiled
        whole with ``places`` (on the routers' device, one past the end); returns the cleared state read as it ends."""
        device = places.device
        with torch.inference_mode(False):
            if self.places_state is None or self.places_state.device != device:
                state = torch.zeros(self.PLACE_KIND + 1, dtype=torch.long, device=device)
                self.places_state = mark_static_address(state)
            else:
                self.places_state.zero_()
        self.places, self.place_sources = places, list(sources)
        return self.places_state

    def disarm_places(self) -> None:
        """As the block ends: no compiled forward's positions are compared again (the state is kept to be read)."""
        self.places = None
        self.place_sources = []

    def feed_places(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Traced as a forward compiled whole enters the level, where :meth:`arm_places` armed it: its integer
        ``position_ids`` (``[positions]`` or ``[1 or batch, positions]``; those read as theirs by name) against the
        places of the rows its routers read next, as :meth:`OrderCheck._check_places` compares an eager forward's:
        two rows one after the other in a sequence fed positions that do not follow each other, rows apart fed
        positions another distance apart, and, fed no mask and nothing that may hold earlier tokens, a token at
        another place than its row's. The first mismatch is marked in :attr:`places_state`. Tensor ops only."""
        places, state = self.places, self.places_state
        if places is None or state is None or not self.place_sources:
            return
        count, ids, shape = _inputs(args, kwargs)
        if shape is None:
            shape = _flat_shape(ids, kwargs)
        pos = kwargs.get("position_ids")
        if shape is None or count != int(shape[0]) * int(shape[1]) or int(shape[1]) < 2:
            return
        batch, width = int(shape[0]), int(shape[1])
        if not isinstance(pos, torch.Tensor) or pos.is_floating_point():
            return  # (floats: read on the host only, see _positions_form; fractions tell no place)
        if _positions_form(pos, batch, width) not in ("flat", "rows"):
            return
        device = places.device
        fed = pos.detach().to(device, torch.long).reshape(-1, width).expand(batch, width)
        cursors = [src.next_row() for src in self.place_sources]
        start = cursors[0] if len(cursors) == 1 else torch.stack(cursors).max()
        rows = torch.clamp(start + torch.arange(count, device=device), max=places.shape[0] - 1)
        grid = places.index_select(0, rows).view(batch, width)
        step, fed_step = grid[:, 1:] - grid[:, :-1], fed[:, 1:] - fed[:, :-1]
        known = grid[:, :-1].ge(0)
        steps = (known & step.eq(1) & fed_step.ne(1)) | (known & step.gt(1) & fed_step.ne(step))
        wrong = torch.cat([torch.zeros_like(steps[:, :1]), steps], 1)
        kind = torch.full_like(start, self.PLACE_STEPS)
        alone = (
            kwargs.get("attention_mask") is None
            and "cache_position" not in kwargs
            and all(kwargs.get(n) is None for n in _CACHE_NAMES)
            and _batch_alone(args, kwargs, shape)
        )
        if alone:
            values = grid.ge(0) & fed.ne(grid)
            kind = torch.where(wrong.any(), kind, torch.full_like(start, self.PLACE_VALUES))
            wrong = wrong | values
        flat = wrong.reshape(-1)
        at = torch.argmax(flat.to(torch.int32))
        found = flat.any() & (state[self.PLACE_FOUND] == 0)
        marked = torch.stack([torch.ones_like(start), start, at.to(torch.long), torch.full_like(start, width), kind])
        state.copy_(torch.where(found, marked, state))

    def arm(
        self,
        want: torch.Tensor,
        padding: torch.Tensor,
        sources: Sequence[Any],
        wants: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        calls: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """As a block starts (eager): compare the forwards compiled whole with ``want`` (on the routers' device), or
        each router's rows with its own ``wants`` and its reads in each forward with its captured ``calls`` (see
        :attr:`calls`); returns the cleared :attr:`state` the block reads as it ends."""
        device = want.device
        with torch.inference_mode(False):  # (an ordinary tensor, whatever the caller's mode)
            if self.state is None or self.state.device != device or self.state.numel() != 9:
                self.state = mark_static_address(torch.zeros(9, dtype=torch.long, device=device))
            else:
                self.state.zero_()
            if self.calls_state is None or self.calls_state.device != device:
                self.calls_state = mark_static_address(torch.zeros(self.CALL_KIND + 1, dtype=torch.long, device=device))
            else:
                self.calls_state.zero_()
        self.calls = calls if calls is not None and any(c is not None for c in calls) else None
        self.want, self.padding, self.sources, self.wants = want, padding, list(sources), wants
        self.names = [getattr(src, "name", "") for src in sources]
        self.active = True
        self.covered = False
        return self.state

    def disarm(self) -> None:
        """As the block ends: compiled code compares nothing again (the state is kept for the block to read)."""
        self.active = False
        self.want = self.padding = self.wants = self.calls = None
        self.sources = []

    def feed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        order: str | None,
        mask_at: int | None,
        began: Sequence[int] | None = None,
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Traced as a forward compiled whole enters the level: its ids against the rows its routers read next (or,
        eager, those they stood at as the forward began: ``began``, one row per source). Returns what :meth:`ran`
        compares as the forward ends, where the rows are each router's own (else None)."""
        want, padding, state = self.want, self.padding, self.state
        count, ids, _ = _inputs(args, kwargs)
        if want is not None and (ids is not None or isinstance(kwargs.get("inputs_embeds"), torch.Tensor)):
            self.covered = True  # (fed the forward's tokens, as an eager forward is: its ids compared below)
        if ids is None and count > 0 and self.calls is not None and want is not None and state is not None:
            # fed embeddings: no id to compare, but each router's calls are checked as the forward ends all the same,
            # by the forward's token count (a router called once more, a layer dropped: other forwards' rows)
            cursors = self._cursors(began, want.device)
            return [
                (j, c.clone(), *self._unmarked(count, want.device))
                for j, c in enumerate(cursors)
                if self.calls[j] is not None
            ]
        if ids is None or want is None or padding is None or state is None or not self.sources:
            return None
        if order in (MIXED, OTHER_ORDER) or ids.numel() == 0 or ids.dim() > 2:
            return (
                None  # (a mixed order is refused by an eager forward of several sequences; rows of no order: unknown)
            )
        given = kwargs.get("attention_mask")
        if given is None and mask_at is not None and len(args) > mask_at:
            given = args[mask_at]
        ids = ids.detach().to(want.device, torch.long)
        fed = _tokens_fed(given, ids) if ids.dim() == 2 else None  # (1: a token, 0: padding, -1: not known)
        fed = None if fed is None else fed.to(want.device)
        cursors = self._cursors(began, want.device)
        if self.wants is None:
            start = cursors[0] if len(cursors) == 1 else torch.stack(cursors).max()
            compared = self._compared(ids, fed, order, want, padding, start)
            if compared is not None:
                self._mark(*compared)
            if self.calls is None:
                return None
            return [(j, c.clone(), *self._unmarked(ids.numel(), want.device)) for j, c in enumerate(cursors)]
        # (per router: its place, the row it stood at, whether its rows differ, what a mismatch marks)
        pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for j, (start, (mine, at_padding)) in enumerate(zip(cursors, self.wants, strict=True)):
            start = start.clone()  # (the cursor itself moves as the router reads)
            compared = self._compared(ids, fed, order, mine, at_padding, start)
            if compared is not None:
                refused, found = compared
                pending.append((j, start, refused, torch.cat([found, torch.full_like(found[:1], j)])))
            elif self.calls is not None and self.calls[j] is not None:  # (its calls are checked all the same)
                pending.append((j, start, *self._unmarked(ids.numel(), want.device)))
        return pending

    def _cursors(self, began: Sequence[int] | None, device: torch.device) -> list[torch.Tensor]:
        """The row each source reads next (its device cursor), or, eager, the rows ``began`` they stood at."""
        if began is None:
            return [src.next_row() for src in self.sources]
        return list(torch.tensor(began, dtype=torch.long).to(device).unbind())

    def _unmarked(self, count: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`ran` takes of a router whose rows' ids are not compared: never refused for its tokens, the
        forward's token count (what the calls check reads)."""
        found = torch.zeros(self.ROUTER + 1, dtype=torch.long, device=device)
        found[self.COUNT] = count
        return torch.zeros((), dtype=torch.bool, device=device), found

    def ran(self, pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] | None) -> None:
        """Traced as the forward ends, where the rows are each router's own (``pending`` from :meth:`feed`): mark the
        first router that read rows in it and whose rows were recorded for other tokens."""
        if not pending:
            return
        ends = [self.sources[j].next_row() for j, _, _, _ in pending]
        refused = torch.stack([bad & (end > start) for (_, start, bad, _), end in zip(pending, ends, strict=True)])
        first = torch.argmax(refused.to(torch.int32))
        found = torch.stack([found for _, _, _, found in pending]).index_select(0, first.reshape(1))[0]
        self._mark(refused.any(), found)
        self._calls_ran(pending, ends)

    def _calls_ran(
        self, pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], ends: list[torch.Tensor]
    ) -> None:
        """As a forward ends, where the routes know each router's captured calls (:attr:`calls`): each router that
        read rows in it read those of the calls of one captured forward, the same one for every router (as
        :class:`RouterCallCheck` and :meth:`FeedCheck._in_one_forward` check on the host), or the first that did not is
        marked in :attr:`calls_state`, read as the block ends. Tensor ops only: no sync."""
        calls, state = self.calls, self.calls_state
        if calls is None or state is None:
            return
        marks: list[torch.Tensor] = []  # (per router: what it marks, its kind 0 where nothing is wrong)
        read_at: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []  # (read, captured number, index, j)
        for (j, start, _, found), end in zip(pending, ends, strict=True):
            held = calls[j]
            if held is None or held.shape[0] == 0:
                continue
            count = found[self.COUNT]
            raw = torch.searchsorted(held[:, 0].contiguous(), start.reshape(1), right=True)[0] - 1
            at = raw.clamp(min=0)
            row = held.index_select(0, at.reshape(1))[0]  # (first row, end row, number, several calls)
            read = (end > start) & (raw >= 0) & (start < row[1])
            several = row[3] > 0
            whole = several & ((start != row[0]) | (end != row[1]) | (row[3] > 1))  # (2: cut through by a slice)
            more = ~several & (end - start > count)
            kind = (whole.long() * self.CALLS_WHOLE + more.long() * self.CALLS_MORE) * read.long()
            minus = torch.full_like(start, -1)
            marks.append(torch.stack([kind, torch.full_like(start, j), start, end, at, count, minus, minus]))
            read_at.append((read, row[2], at, j))
        if not marks:
            return
        # (a router that read in this forward and began in another captured forward than the first that read)
        first_read = torch.stack([r for r, _, _, _ in read_at])
        lead = torch.argmax(first_read.to(torch.int32))
        numbers = torch.stack([n for _, n, _, _ in read_at])
        places = torch.stack([a for _, _, a, _ in read_at])
        routers = torch.tensor([j for _, _, _, j in read_at], dtype=torch.long, device=state.device)
        lead_number = numbers.index_select(0, lead.reshape(1))[0]
        table = torch.stack(marks)
        other = first_read & first_read.any() & (numbers != lead_number)
        kinds = torch.where((table[:, 0] == 0) & other, torch.full_like(table[:, 0], self.CALLS_OTHER), table[:, 0])
        table = torch.cat(
            [
                kinds.reshape(-1, 1),
                table[:, 1:6],
                torch.where(other, routers.index_select(0, lead.reshape(1)), table[:, 6]).reshape(-1, 1),
                torch.where(other, places.index_select(0, lead.reshape(1)), table[:, 7]).reshape(-1, 1),
            ],
            dim=1,
        )
        bad = table[:, 0] > 0
        pick = torch.argmax(bad.to(torch.int32))
        chosen = table.index_select(0, pick.reshape(1))[0]
        counted = state[self.CALL_FORWARD] + 1
        marked = torch.cat([torch.ones_like(counted).reshape(1), counted.reshape(1), chosen[1:], chosen[:1]])
        counted_kept = torch.where(state[self.CALL_FOUND] == 0, counted, state[self.CALL_FORWARD])
        kept = torch.cat([state[: self.CALL_FORWARD], counted_kept.reshape(1), state[self.CALL_ROUTER :]])
        state.copy_(torch.where(bad.any() & (state[self.CALL_FOUND] == 0), marked, kept))

    def _compared(
        self,
        ids: torch.Tensor,
        fed: torch.Tensor | None,
        order: str | None,
        want: torch.Tensor,
        padding: torch.Tensor,
        start: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Whether the ids fed differ from the rows ``want`` (with ``padding``) from ``start`` on, in every order the
        forward may take, and what a mismatch marks (:attr:`state`'s places up to ``FORWARDS``, that one 0)."""
        last = want.shape[0] - 1  # (the row past the end: -1, compared with nothing; an overdraw is refused at exit)
        ways: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (ids, their rows' ids, differ) per order
        orders = [order] if order in (BATCH_MAJOR, SEQUENCE_FIRST) else [BATCH_MAJOR, SEQUENCE_FIRST]
        if order == UNPADDED and fed is not None:
            orders = []
        if ids.dim() < 2 or ids.shape[0] == 1 or ids.shape[1] == 1:
            orders = orders[:1]  # (one sequence, or one position each: every order is the same)
        for o in orders:
            flat = in_router_order(ids, o).reshape(-1)
            rows = torch.clamp(start + torch.arange(flat.shape[0], device=want.device), max=last)
            wanted = want.index_select(0, rows)
            differ = ((wanted >= 0) & (flat != wanted)) | (wanted == NO_FORWARD_ID)
            if fed is not None:
                differ = differ | (padding.index_select(0, rows) & (in_router_order(fed, o).reshape(-1) == 1))
            ways.append((flat, wanted, differ))
        # (the routers may see only the tokens its mask keeps, batch-major: told so, or one sequence, or not told)
        unpadded = order not in (BATCH_MAJOR, SEQUENCE_FIRST) or (order == BATCH_MAJOR and ids.shape[0] == 1)
        if fed is not None and unpadded:
            flat = ids.reshape(-1)
            kept = fed.reshape(-1) == 1
            rows = torch.clamp(start + torch.cumsum(kept, 0) - 1, min=0, max=last)
            wanted = torch.where(kept, want.index_select(0, rows), -1)
            differ = kept & (
                ((wanted >= 0) & (flat != wanted)) | (wanted == NO_FORWARD_ID) | padding.index_select(0, rows)
            )
            ways.append((flat, wanted, differ))
        if not ways:
            return None
        refused = torch.stack([differ.any() for _, _, differ in ways]).all()
        flat, wanted, differ = ways[0]
        at = torch.argmax(differ.to(torch.int32))  # (the first that differs)
        found = torch.stack(
            [
                torch.ones_like(start),
                start,
                at,
                flat.index_select(0, at.reshape(1))[0],
                wanted.index_select(0, at.reshape(1))[0],
                differ.sum(),
                torch.ones_like(flat).sum(),
                torch.zeros_like(start),
            ]
        )
        return refused, found

    def _mark(self, refused: torch.Tensor, found: torch.Tensor) -> None:
        """Mark :attr:`state` with ``found`` (its places up to ``FORWARDS``, and ``ROUTER`` where given) where
        ``refused`` and nothing is marked yet; count the forward found fed other tokens."""
        state = self.state
        if state is None:
            return
        tally = state[self.FORWARDS] + refused.long()
        router = found[self.ROUTER :] if found.shape[0] > self.ROUTER else torch.full_like(found[:1], -1)
        marked = torch.cat([found[: self.FORWARDS], tally.reshape(1), router])
        kept_state = torch.cat([state[: self.FORWARDS], tally.reshape(1), state[self.ROUTER :]])
        state.copy_(torch.where(refused & (state[self.FOUND] == 0), marked, kept_state))

    def refusal(self, found: Sequence[int], hint: str, sequence_first: bool) -> TokenMismatchError:
        """The error for what :attr:`state` holds (``found``, read on the host: its FOUND is 1)."""
        start, at, got, want = found[self.START], found[self.AT], found[self.GOT], found[self.WANT]
        count, forwards = found[self.COUNT], found[self.FORWARDS]
        router = found[self.ROUTER] if len(found) > self.ROUTER else -1
        name = self.names[router] if 0 <= router < len(self.names) else ""
        rows = f"rows {start}..{start + count - 1} of the routes" + (f" of router '{name}'" if name else "")
        which = (
            f"a forward of this replay() that ran compiled (the model compiled whole, or code compiled inside its "
            f"forward), the one that read {rows},"
        )
        if want == NO_FORWARD_ID:
            what = (
                f"{which} read rows that the capture recorded from a call of router '{name}' outside every forward of "
                "the model (on hidden states of one's own, as an auxiliary loss computes them), the token of no "
                "forward, so it forced those experts on its tokens"
            )
            fix = "Replay the forwards and the router's own calls in the order they were captured"
        elif want < 0:
            what = (
                f"{which} fed token(s) of its sequences where its routes hold rows recorded at prompt padding (first: "
                f"token {at} of the forward, id {got}, read row {start + at}, recorded at a padding position: "
                "attention mask 0 in the capture), so those tokens took the experts that padding got. The batch is "
                "padded otherwise than the capture's (another padding side or length, or fed without its attention "
                "mask)"
            )
            fix = (
                "Replay the capture's batch with its attention mask, or lay the routes out for this batch "
                "(mr.split_generation, mr.BatchLayout), whose padding rows are routed natively"
            )
        else:
            what = (
                f"{which} was fed other tokens than its routes were recorded for: {found[self.BAD]} of its {count} "
                f"tokens differ (first: token {at} of the forward, row {start + at} of the routes, is {got}, but that "
                f"row was recorded for {want}), so it took the experts of other tokens"
            )
            fix = (
                "Are these the routes of another batch, micro-batch or rank, or the same sequences in another order? "
                "Replay the forwards the routes were recorded for, in their order, or reorder the routes to the batch "
                "(routes[index], mr.BatchLayout). Routes whose tokens differ on purpose: routes.with_token_ids(None) "
                "drops the check"
            )
        more = f" ({forwards} compiled forwards of this block were)" if forwards > 1 else ""
        return TokenMismatchError(
            what
            + more
            + ". Compiled code cannot stop a forward as it begins: this was found after it ran (as the block ended, or "
            "at its next eager forward), so its outputs, and whatever this block computed from them (a loss, a "
            "backward, an optimizer step), came from the experts of other tokens: discard them (and the weights a "
            "step changed). "
            + fix
            + (f". {_SEQUENCE_FIRST_HINT}" if sequence_first else "")
            + (f". {hint}" if hint else "")
        )


def _on_device(want: torch.Tensor, padding: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' token ids and which were recorded at prompt padding, with a row past the end (-1, no padding), on the
    routers' ``device`` for :class:`TracedFeedCheck` (an asynchronous upload: entering replay never syncs)."""
    with torch.inference_mode(False):
        host = torch.cat([want.reshape(-1).to(torch.long), torch.full((1,), -1, dtype=torch.long)])
        pads = torch.cat([padding.reshape(-1).to("cpu", torch.bool), torch.zeros(1, dtype=torch.bool)])
        if device.type == "cuda":
            host, pads = host.pin_memory(), pads.pin_memory()
        on = mark_static_address(host.to(device, non_blocking=True))
        at_padding = mark_static_address(pads.to(device, non_blocking=True))
    maybe_mark_dynamic(on, 0)  # (routes of another length: no recompile)
    maybe_mark_dynamic(at_padding, 0)
    return on, at_padding


class _CapturedCalls:
    """The router calls each forward of a capture made (``Routes._forward_calls`` over ``Routes._call_rows``, every
    router's the same): the captured forward a replay forward begins in, and the rows each of its calls read.

    A replay forward may read part of a captured forward of one call, or several of them in one call (the batch split
    or joined otherwise); where a captured forward called its routers more than once (a router shared by layers, a
    block that calls its router again), a replay forward reads all of its calls, from its first, one captured call each.
    A forward of several calls that the routes hold a part of (a slice cut through it: negated in
    ``Routes._forward_calls``) is read by no replay forward: its rows are parts of several calls, each of other tokens
    or layers than a forward beginning there would read them for.
    """

    __slots__ = ("begins", "bounds", "counted", "cut", "forwards", "own")

    def __init__(self, call_rows: tuple[tuple[int, int], ...], forward_calls: tuple[int, ...]) -> None:
        self.bounds = [0]  # the row each call begins at, then the row the last ends at
        for n, c in call_rows:
            for _ in range(c):
                self.bounds.append(self.bounds[-1] + n)
        self.begins: list[int] = []  # the row each forward of calls begins at
        self.forwards: list[tuple[int, int, int]] = []  # (its number in the capture, its first call, its calls)
        self.cut: set[int] = set()  # (the forwards of :attr:`forwards` the routes hold a part of)
        self.own = False  # the calls of one router (``Routes._router_calls``), not those of every router
        self.counted = forward_calls  # (every forward of the capture counted, those that made no call included)
        at = 0
        for i, c in enumerate(forward_calls):
            if c:
                if c < 0:
                    self.cut.add(len(self.forwards))
                self.begins.append(self.bounds[at])
                self.forwards.append((i, at, abs(c)))
            at += abs(c)

    @staticmethod
    def of(
        call_rows: tuple[tuple[int, int], ...] | None, forward_calls: tuple[int, ...] | None
    ) -> _CapturedCalls | None:
        """The calls of routes whose capture counted them (see ``Routes._forward_calls``), or None."""
        if call_rows is None or forward_calls is None or sum(map(abs, forward_calls)) != sum(c for _, c in call_rows):
            return None
        if any(n <= 0 for n, _ in call_rows):
            return None
        return _CapturedCalls(call_rows, forward_calls)

    def at(self, row: int) -> int | None:
        """The forward (an index of :attr:`forwards`) whose rows hold ``row``, or None past the last."""
        j = bisect.bisect_right(self.begins, row) - 1
        return j if j >= 0 and row < self.end(j) else None

    def end(self, j: int) -> int:
        """The row forward ``j``'s calls end at."""
        _, first, calls = self.forwards[j]
        return self.bounds[first + calls]

    def made(self, j: int, row: int) -> int:
        """The calls of forward ``j`` whose rows end at or before ``row``."""
        _, first, calls = self.forwards[j]
        return bisect.bisect_right(self.bounds, row, first + 1, first + calls + 1) - first - 1

    def describe(self, j: int) -> str:
        """Forward ``j`` in words: its number in the capture, its calls and their rows."""
        number, first, calls = self.forwards[j]
        rows = [self.bounds[c + 1] - self.bounds[c] for c in range(first, first + calls)]
        each = f"{rows[0]} rows each" if len(set(rows)) == 1 else f"of {', '.join(map(str, rows[:8]))} rows"
        whose = "the router" if self.own else "each router"
        return f"forward {number + 1} of the capture ({calls} call{'s' if calls != 1 else ''} of {whose}, {each})"


#: what a refusal of a forward whose routers make other calls than the captured one says to do
_OTHER_CALLS_HINT = (
    "A forward replays a captured forward by making the router calls it made, on the rows it made them on, or the "
    "routers read the rows of other calls (a call turned on or off since the capture: a log of the routing, an "
    "auxiliary loss; the layers run in another order). Replay with the model as it was captured (turn the call "
    "on or off again), or capture again with the model as it runs now"
)


def _calls_on_device(captured: _CapturedCalls, device: torch.device) -> torch.Tensor:
    """A router's captured calls as :attr:`TracedFeedCheck.calls` holds them: per captured forward that called it,
    its first row, the row its calls end at, its number in the capture, and 1 where it made several calls (2 where the
    routes hold a part of it, cut through by a slice: no forward may read it, as :meth:`FeedCheck._begin_in` says)."""
    rows = [
        (captured.begins[j], captured.end(j), number, 2 if j in captured.cut else int(calls > 1))
        for j, (number, _, calls) in enumerate(captured.forwards)
    ]
    with torch.inference_mode(False):
        host = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        if device.type == "cuda":
            host = host.pin_memory()  # (an asynchronous upload: entering replay never syncs)
        return host.to(device, non_blocking=True)


class FeedCheck:
    """During a replay: every forward of the model is fed the tokens its rows were recorded for.

    Routes that know their tokens (:attr:`~moe_replay.Routes.token_ids`) are read in order,
    one row per token fed; a forward fed other ids than the rows it is about to read were
    recorded for would take another batch's experts without a sign. The model's forward
    pre-hook compares them before any router runs where the ids are on the host, and for the
    first forward fed ids on a device (one host sync: a wrong batch is refused before any
    expert is forced or any optimizer step taken); the later device ids from a copy of them,
    compared in :meth:`finish` with one copy to the host when the block ends (no host sync
    per forward).

    Args:
        want: the token id of each row, -1 where unknown.
        position: the row the routers read next, or None where not known on the host
            (compiled code or a CUDA graph read rows on the device): the forwards from there
            on are not checked.
        hint: what a mismatch error adds about these routes.
        device_ids: check ids fed on a device too. Reading them back is a host sync when the
            block ends, which a strict replay makes anyway (it reads the routers' device
            cursors there); a replay with ``strict=False`` never syncs, and checks host ids only.
        padding: True for each row recorded at prompt padding (its id is -1: it was fed no token of a
            sequence), or None. A forward that feeds such a row a token of a sequence (its attention mask
            says token there, or it has none) is refused: that token would take the experts a padding
            token got.
        places: each row's place in its sequence as its forward gave it (``Routes._seq_pos``, -1 where not known), or
            None. A forward that feeds a row's token at another place (read by :func:`places_fed`, where it can be) is
            refused: its routers see that token after other tokens (none, where a suffix is fed without its prefix
            or KV cache) than the row was recorded after.
        lineage: each row's lineage (``Routes._lineage``: how many rows before it the rows of the forward whose KV
            cache its forward went on from begin, 0 where not known), or None. A forward given a cache object that
            a forward of this block was last given or returned, whose rows begin elsewhere than its first row's
            lineage says, is refused (:meth:`_check_lineage`): it goes on from another sequence's context.
    """

    #: the routers' scopes (by ``id``) that the forward fed last can reach, where that is not every router of the
    #: session: a level of a holder of several models, each called on its own (see :func:`feed_levels`); None: all
    reach: frozenset[int] | None = None
    #: each source's router scope (by ``id``), by the ``id`` of the source: set where some level reaches a part only
    scope_of: dict[int, int] | None = None
    #: a forward an outer level was fed ids of, left to the levels inside it (see ``_take_deferred``), and the level
    #: whose forward it was taken as
    _deferred: tuple[Any, ...] | None = None
    _held_by: FeedForward | None = None
    #: the calls each forward of the routes' capture made, where it counted them (see :meth:`know_calls`), and the
    #: forward of them (an index of its ``forwards``) and the row the forward that runs now began at
    _captured: _CapturedCalls | None = None
    _began_in: tuple[int, int] | None = None
    #: the level whose forward no level took runs now (see :meth:`bare_began`), and how many such forwards ran
    _bare: tuple[FeedForward] | None = None
    _bares = 0
    #: whether the host had lost the place of the block's forwards as it stopped (:meth:`start`'s stop opens every
    #: row after the block, so :meth:`finish` reads this); None before it stops
    _lost_at_stop: bool | None = None

    def __init__(
        self,
        want: torch.Tensor,
        position: Callable[[], int | None],
        hint: str = "",
        *,
        device_ids: bool = True,
        padding: torch.Tensor | None = None,
        places: torch.Tensor | None = None,
        origin: tuple[Any, int] | None = None,
        before: tuple[_Built, Any, _Made] | None = None,
        lineage: torch.Tensor | None = None,
    ) -> None:
        self.want = want
        self.lineage = lineage if lineage is not None and lineage.numel() == want.numel() else None
        #: the KV cache objects the forwards of this block were given or returned, each with the row of the routes
        #: the latest such forward began at (see :meth:`_check_lineage`), and the row the forward that runs now began
        #: at (None: one not checked); and the same with the row of the whole capture each began at (where the rows'
        #: origin is known), for the replay block after this one (see :meth:`_check_lineage`)
        self._made_by = _Made()
        self._made_whole = _Made()
        self._start_now: int | None = None
        self.places = places if places is not None and places.numel() == want.numel() else None
        #: the places of :attr:`places` with those marked :data:`AFTER_OUTSIDE` read as plain ones (compared)
        self._seq_plain = None if self.places is None else unmarked_places(self.places)
        #: (forward, first row, the places it fed its tokens at) of forwards whose places are on a device, compared
        #: when the block ends (see :meth:`_check_seq_places`)
        self._seq_later: list[tuple[int, int, torch.Tensor]] = []
        self._seq_read = False  # a forward's places on a device were read back once, at the first of them
        #: (forward, cache type, row, its place, the tokens the cache held: a 0-d tensor on a device) of forwards given
        #: a cache that counts on its device and that no forward of this block built, checked when the block ends
        self._cache_later: list[tuple[int, str, int, int, torch.Tensor]] = []
        #: the KV caches the forwards of this block were given or returned (see :meth:`_check_cache`), each with the
        #: row of the whole capture its forwards' rows end at; the row of the whole capture these routes' first row is
        #: (their capture's ``_Forwards``, the row), and the caches the replay block before built (with its capture's)
        self._built = _Built()
        self.origin = origin
        self._before = before
        self._end = -1  # (the row of the whole capture the rows of the forward that runs now end at)
        #: the cache given to the forward that runs now, where :meth:`_check_cache` noted it in ``_built`` as built by
        #: the rows ending at ``_end``, and that end (:meth:`returned` notes a cache returned again only where another)
        self._noted: tuple[Any, int] | None = None
        self.padding = padding if padding is not None and bool(padding.any()) else None
        self.position = position
        self.hint = hint  # what the error adds, about these routes
        self.device_ids = device_ids
        self.forwards = 0  # forwards of the model in the block
        #: (forward, first row, copy of its ids, which of them it fed as tokens or None) to compare
        self.pending: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        self._lost = False  # a forward's rows were read where the host does not see them
        #: the token checks of the levels' forwards compiled whole, armed for this block (see :meth:`_arm_traced`)
        self._traced: list[tuple[TracedFeedCheck, torch.Tensor, FeedForward]] = []
        #: why none could be armed, where these routes know token ids (see :meth:`unchecked`); None: armed, or no ids
        self._unarmed: str | None = None
        self._read_once = False  # device ids were read back once, at their first forward
        #: the tokens a forward of the block was fed, by its number, where they were more than the rows left to compare
        #: them with (see :meth:`_check` and :meth:`_counts_told`)
        self._fed_counts: dict[int, int] = {}
        self._thread: int | None = None
        self._inside = False  # a checked forward runs now (the modules it enters below are the same forward)
        self._sources: list[Any] = []
        self._levels: list[FeedForward] = []
        self._entry = "the model"
        #: a forward's routers saw its tokens sequence-first (what a mismatch error then says)
        self.sequence_first = False
        #: the token count of the forward that runs now and its ids in router order (None: fed embeddings, or not
        #: compared): a router called again in it on every one of its tokens reads the next rows, checked the same
        self._current: tuple[int, torch.Tensor | None] = (-1, None)
        #: the routers (by id) that a forward had read other row counts than it was fed tokens (a stream of their
        #: own: a decoder's canvas), out of the step check from then on; and the token count of the forward that runs
        #: now, with the routers in step and the row each stood at as it began (see _in_step and left)
        self._apart: set[int] = set()
        self._step_began: tuple[int, list[Any], list[int]] | None = None
        #: the attention mask and ``[batch, positions]`` of the forward fed last (see :meth:`unpads`)
        self._fed_mask: tuple[Any, torch.Size | None] = (None, None)

    def start(self, levels: Sequence[FeedForward], sources: Sequence[Any]) -> Callable[[], None]:
        """Check the forwards entering ``levels`` (:func:`feed_levels`) in this thread until the returned
        function is called.

        ``sources`` are the routers' :class:`~moe_replay.ring.ReplaySource`: their eager reads stop
        at the rows of the forwards this check has seen (``cleared``), so that rows read by a forward
        that went around every level (a submodule called alone) are refused at the router, not
        replayed unchecked.
        """
        self._thread = threading.get_ident()
        self._sources = list(sources)
        self._levels = list(levels)
        self._entry = type(levels[0].module).__name__ if levels else "the model"
        for level in self._levels:
            level.compiled = level.unchecked = False
        strays = type(self) is FeedCheck  # (a read of rows recorded outside every forward may be due elsewhere)
        for src in self._sources:
            src.cleared = 0
            src.guard, src.outside = self._guard, None
            if strays:
                with torch.inference_mode(False):
                    src.stray = mark_static_address(torch.zeros((), dtype=torch.bool, device=src.device))
                src.checked = True
        if strays:  # (eager forwards store FORWARD.on while it is open: see ring._Fed)
            FORWARD.checks.add(id(self))
        self._traced = self._arm_traced()
        self._unarmed = self._why_unarmed() if not self._traced else None
        remove = _enter_levels(levels, self)

        def stop() -> None:
            self._lost_at_stop = self._lost  # (what finish() reads of the block's forwards: before _open below)
            self._open()  # (before its levels let it go: see FeedForward.placing)
            remove()
            FORWARD.checks.discard(id(self))
            for src in self._sources:
                src.guard = src.outside = None
                src.checked = False
            for traced, _, _ in self._traced:
                traced.disarm()

        return stop

    def bare_began(self, level: FeedForward) -> bool:
        """A forward enters ``level`` that it did not take (fed no token count), nor any level around it: not checked
        here (see :meth:`OrderCheck.bare_began`)."""
        return False

    def bare_left(self) -> None:
        """The forward of :meth:`bare_began` has ended."""
        self._bare, self._began_in = None, None

    def know_calls(self, call_rows: tuple[tuple[int, int], ...] | None, forward_calls: tuple[int, ...] | None) -> None:
        """Check each forward against the router calls the captured forward it replays made (see
        :class:`_CapturedCalls`), where the routes know them: ``Routes._call_rows`` and ``Routes._forward_calls``."""
        self._captured = _CapturedCalls.of(call_rows, forward_calls)

    def _enter_captured(self, start: int) -> None:
        """A forward begins with its routers at row ``start``: the captured forward it begins in. Where that forward
        called its routers more than once, this one begins at its first call, or the one before made fewer calls than
        it (refused here, before a router reads a row)."""
        self._began_in = None
        if self._captured is not None:
            name = self._sources[0].name if self._sources else "its routers"
            self._began_in = self._begin_in(self._captured, start, name)

    def _begin_in(self, captured: _CapturedCalls, start: int, name: str) -> tuple[int, int] | None:
        """A forward's first call of router ``name`` (of every router, where all made the same calls) reads from row
        ``start`` on: the captured forward it begins in (an index of ``captured.forwards``) and ``start``, or None
        past the last; refused where it begins inside a forward of several calls (see :meth:`_enter_captured`)."""
        j = captured.at(start)
        if j is None:
            return None
        if j in captured.cut:
            raise TokenMismatchError(
                f"forward {self._number()} of this replay() begins at row {start} of the routes, in the part of a "
                f"forward of the capture that they hold ({captured.describe(j)}), cut through by a slice: its rows are "
                "parts of router calls the captured forward made on other layers' or tokens' hidden states, not the "
                f"calls a forward beginning there makes. Slice the routes at the forwards of their capture "
                f"(routes[a:b] where a and b are where forwards begin), or cut its tokens with split_routes()"
                + (f". {self.hint}" if self.hint else "")
            )
        calls = captured.forwards[j][2]
        if calls > 1 and start != captured.begins[j]:
            made = captured.made(j, start)
            raise TokenMismatchError(
                f"forward {self._number()} of this replay() begins at row {start} of the routes, inside "
                f"{captured.describe(j)}: the forward before it made {made} call{'s' if made != 1 else ''} of router "
                f"'{name}' where the captured forward made {calls}, so this one would read the rows of the calls it "
                f"left. {_OTHER_CALLS_HINT}" + (f". {self.hint}" if self.hint else "")
            )
        return j, start

    def _in_one_forward(self, began: dict[str, tuple[_CapturedCalls, tuple[int, int] | None]], name: str) -> None:
        """Router ``name`` began reading in the forward that runs now (``began``: each router's calls and the captured
        forward its first read in this forward began in, by name, ``name``'s last): where the routers' captured calls
        count the same forwards, the captured forward it began in is the one every router that read before it in this
        forward began in, or refused. A router that the capture called in some forwards only (a layer skipped, a
        block that called it again on a flag) would else read the rows of another forward of the capture, one that
        called it, on this forward's tokens, while every router's calls fit some captured forward."""
        mine = began[name]
        if mine[1] is None:
            return
        number = mine[0].forwards[mine[1][0]][0]
        for other, (captured, at) in began.items():
            if other == name or at is None or len(captured.counted) != len(mine[0].counted):
                continue
            theirs = captured.forwards[at[0]][0]
            if theirs != number:
                raise TokenMismatchError(
                    f"forward {self._number()} of this replay() reads router '{name}' from row {mine[1][1]} of its "
                    f"routes, in forward {number + 1} of the capture, while router '{other}' read its rows in it from "
                    f"row {at[1]} on, in forward {theirs + 1} of the capture: the capture called '{name}' in other "
                    "forwards than this replay does (a layer skipped or dropped, a block that calls its router on a "
                    "flag, a router called a number of times that its inputs decide), so its rows are those of "
                    f"another forward's tokens. {_OTHER_CALLS_HINT}" + (f". {self.hint}" if self.hint else "")
                )

    def _captured_call(self, router: str, start: int, n: int) -> None:
        """A router reads ``n`` rows from ``start`` on in the forward that runs now, past the rows of its first call:
        the next call the captured forward it began in made (as many rows, from there), or refused."""
        self._next_call(self._captured, self._began_in, router, start, n)

    def _next_call(
        self, captured: _CapturedCalls | None, began: tuple[int, int] | None, router: str, start: int, n: int
    ) -> None:
        """Router ``router`` reads ``n`` rows from ``start`` on in the forward that runs now, which began in captured
        forward ``began`` (see :meth:`_begin_in`): its first call, or the next call that forward made, or refused."""
        if captured is None or began is None or start == began[1]:
            return  # (not known, or its first call: a router that reads other row counts than it is fed tokens)
        j, row = began
        _, first, calls = captured.forwards[j]
        bounds = captured.bounds
        k = bisect.bisect_left(bounds, start, first + 1, first + calls)
        if k < first + calls and bounds[k] == start and bounds[k + 1] == start + n and row == captured.begins[j]:
            return
        made = captured.made(j, min(start, captured.end(j)))
        raise TokenMismatchError(
            f"router '{router}' is called again in forward {self._number()} of this replay(), on rows {start}.."
            f"{start + n - 1} of the routes, while that forward replays {captured.describe(j)} from row {row}: this "
            f"is call {made + 1} of the router or later in this forward where the captured forward made {calls}, or a "
            f"call on other rows than the captured call there, so it would read the rows of another call or forward. "
            f"{_OTHER_CALLS_HINT}" + (f". {self.hint}" if self.hint else "")
        )

    def _number(self) -> int:
        """The number of the forward that runs now in this block (1 for the first), those no level took counted."""
        return self.forwards + self._bares

    def _calls_at_end(self) -> None:
        """The block ends: refuse where its last forward made fewer calls than the captured forward it began in (where
        the host counts the rows read)."""
        if self._captured is None or self._place_lost():
            return
        self._stops_whole(self._captured, self.position(), self._sources[0].name if self._sources else "its routers")

    def _place_lost(self) -> bool:
        """Whether the host lost the place of this block's forwards (:attr:`_lost`) before the block stopped."""
        return self._lost if self._lost_at_stop is None else self._lost_at_stop

    def _stops_whole(self, captured: _CapturedCalls, at: int | None, name: str) -> None:
        """The block ends with router ``name`` (every router, where all made the same calls) at row ``at``: refused
        inside a captured forward of several calls (see :meth:`_calls_at_end`)."""
        j = None if at is None else captured.at(at)
        if j is None or at is None or captured.forwards[j][2] < 2 or at == captured.begins[j]:
            return
        made, calls = captured.made(j, at), captured.forwards[j][2]
        raise TokenMismatchError(
            f"the last forward of this replay() stops at row {at} of the routes, inside {captured.describe(j)}: it "
            f"made {made} call{'s' if made != 1 else ''} of router '{name}' where the captured forward made {calls}. "
            f"{_OTHER_CALLS_HINT}" + (f". {self.hint}" if self.hint else "")
        )

    def _guard(self, router: str, start: int, n: int) -> None:
        """A router reads past the rows of the forwards this check was fed: first the forward an outer level deferred
        to the levels inside it, where none of them took it (see ``_take_deferred``); then :meth:`_unseen_read`."""
        if self._deferred is not None and _take_deferred(self):
            src = next((s for s in self._sources if s.name == router), None)
            if src is not None and start + n <= src.cleared:
                return
        self._unseen_read(router, start, n)

    def _arm_traced(self) -> list[tuple[TracedFeedCheck, torch.Tensor, FeedForward]]:
        """Arm the token check of the forwards compiled whole on each level (see :class:`TracedFeedCheck`): the
        routes' ids (and rows recorded at padding) on the routers' device; returns each level's check, the state it
        marks and the level. A level that reaches a part of the routers only (one model of a holder of several, called
        on its own) compares its forwards with the rows of those routers alone. None armed where the routers' rows are
        on several devices."""
        if type(self) not in (FeedCheck, RouterFeedCheck) or not self._sources:
            return []
        devices = {src.device for src in self._sources}
        if len(devices) != 1:
            return []
        device = devices.pop()
        rows = self.want.numel()
        padding = self.padding if self.padding is not None else torch.zeros(rows, dtype=torch.bool)
        want, at_padding = _on_device(self.want, padding, device)
        each: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if isinstance(self, RouterFeedCheck):  # (each router's rows its own: compared router by router)
            each = {
                id(src): _on_device(w, w == PADDING_ID, device)
                for src, w in zip(self._sources, map(self.wants.__getitem__, map(id, self._sources)), strict=True)
            }
        calls = {key: _calls_on_device(captured, device) for key, captured in self._calls_by_source().items()}
        armed = []
        for level in self._levels:
            sources = self._reached(level)
            if not sources:
                continue
            wants = [each[id(src)] for src in sources] if each else None
            mine = [calls.get(id(src)) for src in sources] if calls else None
            armed.append((level.traced, level.traced.arm(want, at_padding, sources, wants, mine), level))
        return armed

    def _arm_calls_traced(self) -> list[tuple[TracedFeedCheck, torch.Tensor, FeedForward]]:
        """Arm each level's compiled check (see :class:`TracedFeedCheck`) with each router's captured calls alone, its
        rows' ids unknown (no id is compared, none read back): a forward that runs compiled counts its routers' reads
        on the device, where the host sees none, and is checked there as the host checks an eager one (read as the
        block ends). None armed where the routers' rows are on several devices."""
        devices = {src.device for src in self._sources}
        if len(devices) != 1 or not self._calls_by_source():
            return []
        device = devices.pop()
        with torch.inference_mode(False):
            unknown = {
                id(src): (
                    torch.full((src.num_rows + 1,), -1, dtype=torch.long, device=device),
                    torch.zeros(src.num_rows + 1, dtype=torch.bool, device=device),
                )
                for src in self._sources
            }
        calls = {key: _calls_on_device(captured, device) for key, captured in self._calls_by_source().items()}
        armed = []
        for level in self._levels:
            sources = self._reached(level)
            if not sources:
                continue
            wants = [unknown[id(src)] for src in sources]
            mine: list[torch.Tensor | None] = [calls.get(id(src)) for src in sources]
            armed.append((level.traced, level.traced.arm(*wants[0], sources, wants, mine), level))
        return armed

    def _calls_by_source(self) -> dict[int, _CapturedCalls]:
        """The captured calls of each router this check reads, by the ``id`` of its source: every router's the same
        (:meth:`know_calls`), where the routes know them."""
        captured = self._captured
        return {} if captured is None else {id(src): captured for src in self._sources}

    def _reached(self, level: FeedForward) -> list[Any]:
        """The sources whose rows the forwards of ``level`` read: its own model's routers, where it is one model of a
        holder of several (each called on its own: see :attr:`scope_of`), else every router's."""
        scope_of, below = self.scope_of, level.below
        if below is None or scope_of is None:
            return list(self._sources)
        return [src for src in self._sources if scope_of.get(id(src)) in below]

    def _why_unarmed(self) -> str | None:
        """Why :meth:`_arm_traced` armed no compiled token check, where these routes know token ids (a forward that
        runs compiled then compares its ids nowhere: see :meth:`unchecked`); None where the check has no ids to
        compare, or is not a check of token ids."""
        if type(self) not in (FeedCheck, RouterFeedCheck) or not self._sources or not self._levels:
            return None
        if len({src.device for src in self._sources}) != 1:
            return "its routers' rows are on several devices"
        return "no compiled token check could be armed for its routers"

    def unchecked(self) -> None:
        """Refuse the block where a forward ran compiled whose token ids no check compared (:attr:`_unarmed`: no
        compiled token check was armed, and no eager forward of the model that this check took held it, see
        :meth:`left`): its routers read rows on the device, which may be another batch's. Read on the host, no sync."""
        why = self._unarmed
        if why is None:
            return
        ran = next((level for level in self._levels if level.unchecked), None)
        if ran is None:
            return
        for level in self._levels:  # (told once)
            level.unchecked = False
        raise TokenMismatchError(
            f"a forward of this replay() ran compiled (torch.compile: {type(ran.module).__name__}'s forward) where no "
            f"check could compare its token ids with the ids its routes were recorded for ({why}: the compiled token "
            "check is not armed for them, and no eager forward of the model was fed its tokens), so its routers may "
            "have read another batch's rows: discard what the block computed. Replay through the eager model (or "
            "compile its layers, whose eager caller keeps the check), or drop the check with "
            "routes.with_token_ids(None) to replay by row order alone" + (f". {self.hint}" if self.hint else "")
        )

    def _refuse_traced(self, on_host_only: bool = False) -> None:
        """Refuse the block where a forward compiled whole was fed other tokens than its rows were recorded for (read
        from the levels' device states, where a forward ran compiled: one copy to the host; ``on_host_only``: only where
        they are on the CPU, no sync)."""
        armed = [(state, level) for _, state, level in self._traced if level.compiled]
        if not armed or (on_host_only and armed[0][0].device.type != "cpu"):
            return
        calls = [level.traced.calls_state for _, level in armed]
        held = [c for c in calls if c is not None]
        made: list[tuple[list[int], FeedForward]] = []
        if len(held) == len(armed):  # (one copy to the host for both)
            both = torch.cat([torch.stack([state for state, _ in armed]), torch.stack(held)], dim=1).tolist()
            read = [row[: TracedFeedCheck.ROUTER + 1] for row in both]
            made = [(row[TracedFeedCheck.ROUTER + 1 :], level) for row, (_, level) in zip(both, armed, strict=True)]
        else:
            read = torch.stack([state for state, _ in armed]).tolist()
        found = [(f, level) for f, (_, level) in zip(read, armed, strict=True) if f[TracedFeedCheck.FOUND]]
        if not found:
            self._refuse_traced_calls(made)  # (the tokens fit: the calls of each router in each forward)
            return
        first, level = min(found, key=lambda f: f[0][TracedFeedCheck.START])
        for state, _ in armed:  # (told once)
            state.zero_()
        raise level.traced.refusal(first, self.hint, level.order == SEQUENCE_FIRST)

    def _refuse_traced_calls(self, read: list[tuple[list[int], FeedForward]]) -> None:
        """Refuse the block where a compiled forward's routers did not make the calls of one captured forward (read
        from each level's :attr:`TracedFeedCheck.calls_state`, with its token state: see :meth:`_refuse_traced`)."""
        t = TracedFeedCheck
        found = [(f, level) for f, level in read if f[t.CALL_FOUND]]
        if not found:
            return
        f, level = found[0]
        for _, each in read:  # (told once)
            if each.traced.calls_state is not None:
                each.traced.calls_state.zero_()
        names = level.traced.names
        held = self._calls_by_source()
        by_name = {src.name: held.get(id(src)) for src in self._sources}

        def router(j: int, at: int) -> tuple[str, _CapturedCalls | None, int | None]:
            """The name of router ``j`` of the level, its captured calls and the captured forward ``at`` of them."""
            name = names[j] if 0 <= j < len(names) else "?"
            captured = by_name.get(name)
            return name, captured, at if captured is not None and 0 <= at < len(captured.forwards) else None

        name, captured, at = router(f[t.CALL_ROUTER], f[t.CALL_AT])
        start, end = f[t.CALL_START], f[t.CALL_END]
        which = (
            f"compiled forward {f[t.CALL_FORWARD]} of this replay() (the model compiled whole, or code compiled inside "
            "its forward)"
        )
        if f[t.CALL_KIND] == t.CALLS_OTHER:
            other, theirs, other_at = router(f[t.CALL_OTHER], f[t.CALL_OTHER_AT])
            number = "?" if captured is None or at is None else captured.forwards[at][0] + 1
            their = "?" if theirs is None or other_at is None else theirs.forwards[other_at][0] + 1
            what = (
                f"{which} read router '{name}' from row {start} of its routes, in forward {number} of the capture, "
                f"while router '{other}' read its rows in it in forward {their} of the capture: the capture called "
                "these routers in other forwards than this replay does (a layer skipped or dropped, a block that calls "
                "its router on a flag, a router called a number of times that its inputs decide), so "
                f"'{name}' took the rows of another forward's tokens"
            )
        else:
            began = "a captured forward" if captured is None or at is None else captured.describe(at)
            why = (
                "more than one call on every token, so a further call of it read the rows of another call or forward"
                if f[t.CALL_KIND] == t.CALLS_MORE
                else "other rows than all the calls of that forward, so it made more or fewer calls than the captured "
                "forward (or began inside it) and read the rows of other calls"
            )
            what = (
                f"{which} read rows {start}..{end - 1} of the routes of router '{name}', fed {f[t.CALL_COUNT]} tokens, "
                f"and began in {began}: {why}"
            )
        raise TokenMismatchError(
            what
            + ". Compiled code cannot stop a forward as it begins: this was found as the block ended, so its outputs, "
            "and whatever this block computed from them, are not a replay: discard them. "
            + _OTHER_CALLS_HINT
            + (f". {self.hint}" if self.hint else "")
        )

    def left(self) -> None:
        """The forward fed last has ended: a router that read in it other row counts than it was fed tokens routes a
        stream of its own, whose rows are not in step with the others' (see :meth:`_in_step`). Compiled code that ran
        inside it ran in a forward the check took (see :meth:`unchecked`)."""
        self._current, self._began_in = (-1, None), None
        if self._unarmed is not None:
            for level in self._levels:
                level.unchecked = False
        began, self._step_began = self._step_began, None
        if began is not None:
            count, steady, rows = began
            if not set(map(operator.sub, map(_CONSUMED, steady), rows)) <= {0, count}:  # (in C: none apart, as a rule)
                self._apart.update(
                    id(src) for src, row in zip(steady, rows, strict=True) if src.host_consumed - row not in (0, count)
                )

    def _lose_place(self) -> None:
        """The host no longer knows where the rows of this check's forwards begin (:attr:`_lost`): its levels' eager
        forwards look for it from here on (:attr:`FeedForward.placing`)."""
        self._lost = True
        for level in self._levels:
            level.placing = True

    def lost_place(self) -> None:
        """A forward of ids enters a level that leaves it to the levels inside: where a forward of the block ran
        compiled, the host no longer places its rows (as :meth:`fed` finds first), which the level must know before
        those inside take it, so that it compares the ids it holds on the device (``FeedForward._placed``)."""
        if not self._lost and any(map(_COMPILED, self._levels)):
            self._open()

    def _open(self) -> None:
        """Every row may be read unchecked from here on (the forwards past this one cannot be checked), inside a
        forward of the model: an eager read where none runs (a MoE block called on its own) is refused at the read
        (see :attr:`~moe_replay.ring.ReplaySource.outside`; compiled code marks ``stray`` instead)."""
        self._lose_place()
        outside = self._outside_read if id(self) in FORWARD.checks else None
        for src in self._sources:
            src.cleared = src.num_rows
            src.outside = outside

    def unseen(self) -> None:
        """A forward compiled, traced, captured in a CUDA graph or under a transform: its rows are read where the
        host does not count them, so this forward and those after it are not checked."""
        self._open()

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: its ids against the rows it will read, in the ``order`` its routers see
        them (:func:`token_order`).

        Returns whether the forward is taken here: not where its inputs give no token count (a
        module on the way fed hidden states, a wrapper fed a batch of its own). A level it enters
        below is fed it then; where none is, its routers find no rows cleared and refuse.
        ``paired``: the level is an encoder-decoder (see :meth:`FeedRecord.fed`), whose rows no one
        id each describes: this forward and those after it are not checked.
        """
        self._current, self._began_in, self._start_now, self._noted = (-1, None), None, None, None
        if paired or (not self._lost and any(map(_COMPILED, self._levels))):
            self._open()
        if self._lost:
            if (_inputs(args, kwargs) if inputs is None else inputs)[0] < 0:
                return False  # (fed hidden states: not taken, as where the host knows its place; see ring._Fed)
            if self._traced:  # (a forward compiled whole before it fed other tokens: refused here, where no sync)
                self._refuse_traced(on_host_only=True)
            elif self._unarmed is not None:  # (one compiled with no check of its tokens: refused here)
                self.unchecked()
            self.forwards += 1
            return True
        count, ids, shape = _inputs(args, kwargs) if inputs is None else inputs
        if count < 0:
            return False
        self.forwards += 1
        if order == MIXED:
            _refuse_mixed(order, shape, self.forwards, self.hint)
        self._fed_mask = (kwargs.get("attention_mask"), shape)
        start = self._in_step(count)
        if start is None:  # (rows read on the device: the host does not know where this forward's rows begin)
            self._open()
            return True
        self._enter_captured(start)
        if self.lineage is not None or self.origin is not None:
            self._check_lineage(start, kwargs)
        kept = None
        compared = ids is not None and (self.device_ids or ids.device.type == "cpu")
        if ids is not None and compared and order != BATCH_MAJOR:
            if order == UNPADDED:
                kept = _unpad_fed(ids, kwargs.get("attention_mask"))
        elif ids is not None and compared and shape is not None and shape[0] == 1:
            kept = self._either(ids, kwargs.get("attention_mask"), start)  # (one sequence: see _either)
        if kept is not None:  # (its routers see only the tokens its mask keeps: one row each)
            ids, count = kept, kept.numel()
        # the rows this forward may read: src.cleared = min(src.num_rows, start + count) for each (in C: it runs at
        # every forward, for every router)
        sources = self._sources
        deque(map(setattr, sources, repeat("cleared"), map(min, map(_NUM_ROWS, sources), repeat(start + count))), 0)
        self._current = (count, None)
        if ids is None or not compared:
            return True
        if order == SEQUENCE_FIRST:
            self.sequence_first = True
            flat = in_router_order(ids, order).reshape(-1)
        else:  # (in_router_order's, inline; integer ids carry no autograd history: nothing to detach)
            flat = ids.reshape(-1)
        self._current = (count, flat)
        tokens = None  # which of them it feeds as tokens of a sequence, where rows recorded at padding are read
        if self.padding is not None and bool(self.padding[start : start + count].any()):
            given = kwargs.get("attention_mask")  # (where its routers see only the tokens it keeps: each a token)
            fed = _tokens_fed(given, ids) if kept is None else torch.ones_like(kept, dtype=torch.int8)
            tokens = None if fed is None else in_router_order(fed, order).reshape(-1)
        self._check(start, flat, tokens)
        if self.places is not None:
            held = self._check_cache(start, count, kwargs)
            if kept is None and order in (BATCH_MAJOR, SEQUENCE_FIRST):
                self._check_seq_places(start, count, args, kwargs, shape, order, held)
        return True

    def _check_cache(self, start: int, count: int, kwargs: dict[str, Any]) -> int | torch.Tensor | None:
        """Refuse a forward given a KV cache that holds tokens where no forward of this block built it (given it, or
        returned it), while the rows it reads were recorded after earlier tokens of their sequences: the cache holds
        the context of other forwards (another batch's prompts, a prefill run outside the replay), which the recorded
        experts were not chosen in, and the places of its tokens may fit all the same. Caches this block's forwards
        build are noted as they are given and returned. Returns the tokens the cache holds (:func:`_cache_held`, or
        :func:`_device_held`'s count of a cache that counts on its device, whose refusal waits for :meth:`finish`
        where that device is not the host's: no host sync per forward)."""
        origin = self.origin
        self._end = -1 if origin is None else origin[1] + start + count
        caches = [*filter(_GIVEN, map(kwargs.get, _CACHE_NAMES))]  # (read once, for _cache_held and _given_cache)
        held: int | torch.Tensor | None = _cache_held(kwargs, caches)
        if held is None:
            held = _device_held(kwargs)
            if held is None:
                return None
        cache = caches[0] if caches else None  # (_given_cache, inline)
        if (
            (isinstance(held, torch.Tensor) or held)
            and self._built.end_of(cache) is None  # (_Built.holds, inline)
            and not self._continued(cache, start)
        ):
            want = cast(torch.Tensor, self.places)[start : start + count]
            # (rows recorded after tokens of a cache their capture's forwards built: see places_fed; those after a
            # cache built outside their capture are not checked for its origin)
            if bool((want > 0).any()):
                j = int((want > 0).nonzero()[0])
                found = (self.forwards, type(cache).__name__, start + j, int(want[j]))
                if not isinstance(held, torch.Tensor):
                    self._refuse_cache(*found, held)
                elif held.device.type == "cpu":
                    if int(held) > 0:
                        self._refuse_cache(*found, int(held))
                else:  # (its count now, compared when the block ends)
                    self._cache_later.append((*found, held.clone()))
        self._built.note(cache, self._end)
        if cache is not None:  # (see returned)
            self._noted = (cache, self._end)
        return held

    def _refuse_cache(self, forward: int, kind: str, row: int, place: int, held: int) -> None:
        """Refuse forward ``forward``, given a cache of type ``kind`` holding ``held`` tokens that no earlier forward
        of this replay built, while row ``row`` of its routes was recorded at place ``place`` (:meth:`_check_cache`)."""
        raise TokenMismatchError(
            f"forward {forward} of this replay() is given a KV cache ({kind}, holding {held} tokens) that no earlier "
            f"forward of this replay() built, while its rows were recorded after earlier tokens of their sequences "
            f"(row {row} of the routes, at place {place}): the cache holds the context of other forwards (another "
            "batch's prompts, a prefill run outside the replay), and the recorded experts would be forced on tokens "
            "that see another context. Replay the forwards that fill the cache from the start of the routes (the "
            "prompt's forward first) in this replay() block, or in the block just before it on the capture's rows "
            "just before these (routes[:n], then routes[n:]), and pass on the cache they return"
            + (f". {self.hint}" if self.hint else "")
        )

    def _continued(self, cache: Any, start: int) -> bool:
        """Did the replay block before this one (or one of the blocks in a row before it that replayed rows of the same
        capture: see :meth:`_Built.keep_older`) build ``cache`` from the rows of the same capture that end where the
        rows of this forward (from ``start`` on) begin (a decode loop replayed over two blocks, its prompt's forward in
        the first), or was the forward of that block that last had it the one the captured forward went on from (its
        whole capture's lineage: two interleaved loops replayed over two blocks)?"""
        before, origin = self._before, self.origin
        if before is None or origin is None or before[1] is not origin[0]:
            return False
        end = before[0].end_of(cache)
        if end is not None and end >= 0 and end == origin[1] + start:
            return True
        went = self._went_on_before(cache, start)
        return went is not None and went[0] == went[1]

    def _went_on_before(self, cache: Any, start: int) -> tuple[int, int] | None:
        """Where the replay block before this one replayed rows of the same capture and one of its forwards had
        ``cache`` last, and the whole capture's lineage (``_Forwards.lineage``) is known at the row of this forward
        (from ``start`` on): the row of the capture the forward its captured forward went on from began at, and the
        row that forward of the block before began at; else None."""
        before, origin = self._before, self.origin
        if before is None or origin is None or before[1] is not origin[0]:
            return None
        whole: torch.Tensor | None = getattr(origin[0], "lineage", None)
        row = origin[1] + start
        if whole is None or row >= whole.numel():
            return None
        want, had = int(whole[row]), before[2].end_of(cache)
        if not 0 < want <= row or had is None or had < 0:
            return None
        return row - want, had

    def returned(self, out: Any) -> None:
        """The forward fed last returned ``out``: note the KV cache it returns as built by this block."""
        begun, self._start_now = self._start_now, None
        noted, self._noted = self._noted, None
        if self.places is not None or begun is not None:
            returned = _returned_object(out)
            # (the cache it was given, returned: noted as built by the rows ending at the same row as it began)
            if self.places is not None and (noted is None or returned is not noted[0] or noted[1] != self._end):
                self._built.note(returned, self._end)
            if begun is not None:
                _note_object(self._made_by, returned, begun)
                if self.origin is not None:
                    _note_object(self._made_whole, returned, self.origin[1] + begun)

    def _check_lineage(self, start: int, kwargs: dict[str, Any]) -> None:
        """Refuse a forward whose rows begin at ``start`` given a KV cache object that an earlier forward of this block
        was last given or returned, where that forward's rows begin elsewhere than the lineage of the row at ``start``
        says the forward the captured one went on from began (:meth:`FeedRecord.lineage`): a decode step given another
        sequence's cache, holding as many tokens, would see another prompt. A cache that no forward of this block had
        is compared, where the replay block just before this one replayed the rows of the same capture just before
        these (``routes[:n]``, then ``routes[n:]``), with the forward of that block that last had it, by the lineage
        of the whole capture (which a slice's own cuts off). Where the routes know no lineage for the row (a fresh
        cache, one the rows do not reach back to) or no forward of either block had the cache (one built before, a
        copy of plain tensors), it is not compared. One dict lookup per forward; no host sync."""
        self._start_now = start  # (the cache it returns is noted as this forward's, given one or none)
        cache = _given_cache(kwargs)
        if cache is None:
            return
        begun = self._made_by.end_of(cache)
        lineage, origin = self.lineage, self.origin
        if lineage is not None and start < lineage.numel() and begun is not None and begun >= 0:
            want = int(lineage[start])
            if 0 < want <= start and start - want != begun:
                self._refuse_lineage(type(cache).__name__, start, start - want, begun, "of the routes")
        elif begun is None and origin is not None:  # (one the block before had, where it replayed the rows before)
            went = self._went_on_before(cache, start)
            if went is not None and went[0] != went[1]:
                where = "of the capture these routes were cut from (the replay block before this one, or one before it)"
                self._refuse_lineage(type(cache).__name__, origin[1] + start, went[0], went[1], where)
        self._made_by.note(cache, start)
        if origin is not None:
            self._made_whole.note(cache, origin[1] + start)

    def copied(self, copied: Any, original: Any) -> None:
        """``original``, a cache watched in this block (:class:`MoveWatch`), was deep-copied: the copy continues the
        forward that last had it (see :meth:`_check_lineage`)."""
        for made in (self._made_by, self._made_whole):
            begun = made.end_of(original)
            if begun is not None and begun >= 0:
                _note_object(made, copied, begun)

    def _refuse_lineage(self, kind: str, start: int, want: int, begun: int, where: str) -> None:
        """Refuse the forward that runs now (rows from ``start`` on), given a cache of type ``kind`` that the forward
        beginning at row ``begun`` last had, while its captured forward went on from the cache of the forward whose
        rows begin at row ``want`` (rows ``where``: of the routes, or of their whole capture; see
        :meth:`_check_lineage`)."""
        raise TokenMismatchError(
            f"forward {self._number()} of this replay() is given a KV cache ({kind}) that the replayed forward whose "
            f"rows begin at row {begun} {where} was last given or returned, while the forward it replays (rows from "
            f"{start} on) went on from the cache of the forward whose rows begin at row {want}: it goes on from "
            "another sequence's context (caches swapped between decode loops, or one loop given another's cache), and "
            "the recorded experts would be forced on tokens that see another prompt. Give each forward the cache its "
            f"captured forward went on from: the one the forward at row {want} was given or returned"
            + (f". {self.hint}" if self.hint else "")
        )

    def _check_seq_places(
        self,
        start: int,
        count: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        shape: torch.Size | None,
        order: str,
        held: int | torch.Tensor | None,
    ) -> None:
        """Compare the place in its sequence at which a forward feeds each token (:func:`places_fed`; ``held``: the
        tokens its cache holds) with the place its row from ``start`` on was recorded at, where both are known: host
        places now (and the first on a device: one host sync, before any router runs), later ones on a device when
        the block ends."""
        fed = places_fed(args, kwargs, shape, held)
        if fed is None or fed.numel() != count:
            return
        fed = fed if order is BATCH_MAJOR else in_router_order(fed, order)  # (batch-major: flattened below)
        flat = fed.reshape(-1)[: max(self.want.numel() - start, 0)]
        if flat.device.type == "cpu" or not self._seq_read:
            self._seq_read = self._seq_read or flat.device.type != "cpu"
            self._compare_seq_places(self.forwards, start, flat)
        else:
            self._seq_later.append((self.forwards, start, flat))

    def _compare_seq_places(self, forward: int, start: int, fed: torch.Tensor) -> None:
        """Refuse forward ``forward`` where it feeds the token of a row (its rows from ``start`` on) at another place in
        its sequence (``fed``, -1 at padding) than the row was recorded at."""
        got = fed.to("cpu", torch.long)
        want = cast(torch.Tensor, self._seq_plain)[start : start + got.numel()]
        if torch.equal(got, want):  # (every token at its row's place, in one op)
            return
        bad = (want >= 0) & (got >= 0) & (got != want)
        if not bool(bad.any()):
            return
        j = int(bad.nonzero()[0])
        token = int(self.want[start + j])
        raise TokenMismatchError(
            f"forward {forward} of this replay() feeds its tokens at other places in their sequences than its routes "
            f"were recorded at: {int(bad.sum())} of its {got.numel()} tokens (first: token {j} of the forward, row "
            f"{start + j} of the routes, id {token}, comes at place {int(got[j])} of its sequence, but its row was "
            f"recorded at place {int(want[j])}), so its routers see it after other tokens than the recorded experts "
            "were chosen after, and the replay would force the experts of another context. Was a part of a sequence "
            "fed without the tokens before it (a suffix without its prefix, a decode step without the KV cache of "
            "its prompt), or were rows picked out of their sequences (routes[::2])? Feed each sequence from its "
            "start, or pass the KV cache its earlier forwards made (the places are read from the cache's length, the "
            "attention mask and position_ids); slice the routes to whole sequences from their start"
            + (f". {self.hint}" if self.hint else "")
        )

    def _either(self, ids: torch.Tensor, mask: Any, start: int) -> torch.Tensor | None:
        """The ids of the tokens the host ``mask`` of a forward of one sequence with padding keeps, where the rows from
        ``start`` on were recorded for them alone (routers that take the padding out, at a level whose order no batch
        told: every order of one sequence is the same, but for the padding), and not for every position (rows
        recorded at its padding, unknown ids); else None: its ids are compared as fed. Its routers may then read no
        more rows than those tokens (a router that reads every position is refused as it reads past them)."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
            return None
        if not isinstance(mask, torch.Tensor) or mask.device.type != "cpu" or ids.device.type != "cpu":
            return None  # (a mask on a device is not read per forward: no host sync)
        kept = _unpad_fed(ids, mask)
        count = ids.numel()
        if kept is None or kept.numel() == count:
            return None
        want = self.want[start : start + count]
        got = ids.reshape(-1).to(torch.long)
        if want.numel() == count and bool(((want < 0) | (want == got)).all()):  # (every position's row: those at
            return None  # padding unknown)
        return kept if torch.equal(self.want[start : start + kept.numel()], kept.to(torch.long)) else None

    def unpads(self, scopes: Sequence[nn.Module]) -> None:
        """The routers of ``scopes`` see only the tokens the mask of the forward fed last keeps (see
        :meth:`FeedRecord.unpads`), the first router every position: routes of one row per token of the forward for
        every router do not fit both, and such a forward with padding is refused before any router reads (a mask on
        a device is not read here: no host sync; its routers' counts are checked as a strict replay ends)."""
        mask, shape = self._fed_mask
        if not self._sources or len({src.num_rows for src in self._sources}) != 1:  # (rows of each router's own)
            return
        if self._lost or shape is None or not isinstance(mask, torch.Tensor) or mask.device.type != "cpu":
            return
        if _padded(mask, int(shape[0]), int(shape[1])):
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() feeds a [{int(shape[0])}, {int(shape[1])}] batch with "
                "padding, whose first router sees every position and whose later routers see only the tokens its "
                "attention mask keeps, but its routes hold as many rows for every router, one per token of each "
                "forward: the later routers would read rows of other tokens. Replay routes this model captured on "
                "the batch, or give each router its own rows" + (f". {self.hint}" if self.hint else "")
            )

    def _in_step(self, count: int) -> int | None:
        """The row every router reads next as a forward fed ``count`` tokens begins, or None where the host does not
        count their reads.

        Routers out of step (at different rows) are refused: a forward that raised half-way, its exception caught
        inside the block, left its later routers behind its earlier ones, and each would read the rows of other
        tokens from here on (a replay with ``strict=False`` would end without a word). A router that an earlier
        forward had read other row counts than it was fed tokens (neither none nor one per token: a decoder's canvas)
        routes a stream of its own and is not compared.
        """
        start = self.position()
        if start is None:
            return None
        apart = self._apart
        steady = [src for src in self._sources if id(src) not in apart] if apart else list(self._sources)
        reach, scope_of = self.reach, self.scope_of
        if reach is not None and scope_of:  # (a forward of one model of a holder: its routers alone read its rows)
            steady = [src for src in steady if scope_of.get(id(src)) in reach]
            start = max(map(_CONSUMED, steady), default=start)
        rows = list(map(_CONSUMED, steady))  # (in C: this runs at every forward)
        ahead = max(rows, default=start)
        self._step_began = (count, steady, rows)
        if rows.count(ahead) != len(rows):  # (a forward that raised half-way, caught in the block: its later routers
            # did not read its rows)
            behind = [src for src, row in zip(steady, rows, strict=True) if row != ahead]
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() starts with its routers out of step: "
                f"'{behind[0].name}' is at row {behind[0].host_consumed} of the routes, others at row {ahead}, so "
                "they would read the rows of other tokens. Did an earlier forward in this block raise half-way and "
                "was the exception caught inside it? Let it leave the block, and replay again from the start"
            )
        return start

    def _check(self, start: int, flat: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Compare the ids ``flat`` of this forward (and ``tokens``, which of them it feeds as tokens) with the rows
        from ``start`` on: now where they are on the host (and the first time they are on a device: one host
        sync), else when the block ends."""
        room = self.want.numel() - start
        if flat.numel() > room:
            self._fed_counts[self.forwards] = flat.numel()  # (for the refusal's words: see _counts_told)
            flat = flat[: max(room, 0)]  # (past the end: the routers refuse)
        if not flat.numel():
            return
        if flat.is_meta:
            raise SessionStateError(
                "a replayed forward was fed token ids on the meta device, which hold no values to check against the "
                "routes' token ids: replay on a real device (a model of empty weights loaded first)"
            )
        if tokens is not None:
            tokens = tokens[: flat.numel()]
        if flat.device.type == "cpu" or not self._read_once:  # (the first device ids: one host sync, at once)
            self._read_once = flat.device.type != "cpu"
            self._compare(self.forwards, start, flat, tokens)
        else:
            self.pending.append((self.forwards, start, flat.clone(), None if tokens is None else tokens.clone()))

    def finish(self) -> None:
        """Compare the forwards whose ids were on a device, in order (one copy to the host per device), then those
        that ran compiled (see :class:`TracedFeedCheck`)."""
        pending, self.pending = self.pending, []
        host: dict[int, torch.Tensor] = {}
        for device in {ids.device for _, _, ids, _ in pending}:
            mine = [(i, ids) for i, (_, _, ids, _) in enumerate(pending) if ids.device == device]
            flat = torch.cat([ids.to(torch.long) for _, ids in mine]).cpu()
            host.update(zip([i for i, _ in mine], flat.split([ids.numel() for _, ids in mine]), strict=True))
        for i, (forward, start, _, tokens) in enumerate(pending):
            self._compare(forward, start, host[i], None if tokens is None else tokens.cpu())
        caches, self._cache_later = self._cache_later, []
        if caches:  # (one copy to the host)
            counts = torch.stack([held.to(caches[0][-1].device) for *_, held in caches]).tolist()
            for (forward, kind, row, place, _), held in zip(caches, counts, strict=True):
                if held > 0:
                    self._refuse_cache(forward, kind, row, place, held)
        later, self._seq_later = self._seq_later, []
        if later:  # (one copy to the host)
            read = torch.cat([fed for _, _, fed in later]).cpu().split([fed.numel() for _, _, fed in later])
            for (forward, start, _), fed in zip(later, read, strict=True):
                self._compare_seq_places(forward, start, fed)
        self._refuse_traced()
        self.unchecked()
        self._refuse_strays()
        self._calls_at_end()

    def _refuse_strays(self) -> None:
        """Refuse the block where compiled code read rows while no forward of the model ran (see
        :attr:`~moe_replay.ring.ReplaySource.stray`: a MoE block compiled and called on its own, fed hidden states):
        no check compared the tokens of those rows. Read where compiled code read rows (one copy to the host)."""
        marked = [src for src in self._sources if src.stray is not None and src.read_by_device]
        if not marked or not bool(torch.stack([src.stray.to(marked[0].device) for src in marked]).any()):
            return
        src = next(src for src in marked if bool(src.stray))
        for each in marked:  # (told once)
            each.stray.zero_()
        raise TokenMismatchError(
            f"router '{src.name}' read rows of this replay's routes in compiled code (torch.compile) that ran outside "
            f"every forward of {self._entry} (the module the session is attached to) and of the modules between it "
            "and its routers fed token ids: a submodule compiled and called on its own (fed hidden states), so the "
            "tokens of those rows were never compared with the ids the routes were recorded for. Compiled code "
            "cannot stop at the read: this was found as the block ended, so what it computed came from rows that "
            "may be another batch's: discard it. Run the forward through the attached model, attach the session to "
            "the module you call, or drop the check with routes.with_token_ids(None) to replay by row order alone"
            + (f". {self.hint}" if self.hint else "")
        )

    def _compiled_read(self, router: str, start: int, n: int) -> None:
        """A router reads rows no forward this check has seen was fed, where a forward of the block ran compiled (its
        routers read where the host does not count): the rows from here on are read unchecked by the host, which is
        sound only where a compiled forward's ids were compared with them on the device (:class:`TracedFeedCheck`,
        read as the block ends), or fed embeddings, as an eager forward's are taken unchecked. Where none was (the
        compiled code was fed hidden states only), refused."""
        if any(traced.covered for traced, _, _ in self._traced):
            self._open()
            return
        compiled = next((level for level in self._levels if level.compiled), None)
        name = type(compiled.module).__name__ if compiled is not None else self._entry
        raise TokenMismatchError(
            f"router '{router}' reads rows {start}..{start + n - 1} of this replay's routes in a forward that ran "
            f"compiled (torch.compile: {name}'s forward, or the frames dynamo compiled inside it after a graph break) "
            "where no check saw the token ids fed to it: neither an eager forward of the model nor its compiled code "
            "compared them with the ids the routes were recorded for, so these rows may be another batch's. Replay "
            "the block's first forward through the eager model (or compile the model whole, "
            "torch.compile(model, fullgraph=True) where it can), or drop the check with routes.with_token_ids(None) to "
            "replay by row order alone" + (f". {self.hint}" if self.hint else "")
        )

    def _unseen_read(self, router: str, start: int, n: int) -> None:
        """A router reads rows no forward this check has seen was fed: refuse (see :meth:`start`), unless it is
        called again in the forward that runs now, on all of its tokens (one router module at several layers, a
        loop of layers): those rows are checked against the forward's ids as its first call's were."""
        if any(level.compiled for level in self._levels):  # (a compiled forward, whose routers run eagerly inside)
            self._compiled_read(router, start, n)
            return
        count, flat = self._current
        src = next((s for s in self._sources if s.name == router), None)
        if self._inside and src is not None:
            if count > 0 and n == count and start == src.cleared:
                if flat is not None:
                    self._check(start, flat)
                self._captured_call(router, start, n)  # (a call the captured forward did not make: refused)
                src.cleared = min(src.num_rows, start + n)
                return
            raise TokenMismatchError(
                f"router '{router}' reads rows {start}..{start + n - 1} of this replay's routes in forward "
                f"{self.forwards}, which was fed {count} tokens: past the rows of that forward's tokens (up to row "
                f"{src.cleared - 1}), so the tokens of those rows cannot be checked against the ids the routes were "
                "recorded for. A router called again in a forward is checked where each call routes every token "
                "the forward was fed; was it called on other tokens (a subset, hidden states of another batch)? "
                "Replay the forwards the routes were recorded for, or drop the check with "
                "routes.with_token_ids(None) to replay by row order alone" + (f". {self.hint}" if self.hint else "")
            )
        self._outside_read(router, start, n)

    def _outside_read(self, router: str, start: int, n: int) -> None:
        """A router reads rows in a forward that entered no level fed tokens (a submodule called on its own): refuse."""
        raise TokenMismatchError(
            f"router '{router}' reads rows {start}..{start + n - 1} of this replay's routes in a forward that did not "
            f"enter {self._entry} (the module the session is attached to) nor any module between it and its routers "
            "fed token ids (input_ids) or inputs_embeds, so the tokens of those rows cannot be checked against the "
            "ids the routes were recorded for. Was a submodule called on its own (fed hidden states), or the model "
            "run through another path? Run the forward through the "
            "attached model, attach the session to the module you call, or drop the check with "
            "routes.with_token_ids(None) to replay by row order alone" + (f". {self.hint}" if self.hint else "")
        )

    def _compare(
        self,
        forward: int,
        start: int,
        ids: torch.Tensor,
        tokens: torch.Tensor | None = None,
        want: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> None:
        """Refuse a forward fed other ids than ``want`` (the rows' from ``start`` on; by default those of
        :attr:`want`, with :attr:`padding`) or tokens of its sequences at rows recorded at prompt ``padding``."""
        if want is None:
            want = self.want[start : start + ids.numel()]
            padding = None if self.padding is None else self.padding[start : start + ids.numel()]
        got = ids.to("cpu", torch.long)
        if want.dtype == torch.long and torch.equal(got, want):  # (every id that of its row: none bad, in one op)
            if tokens is not None and padding is not None:  # (_compare_padding's first test, inline)
                self._compare_padding(forward, start, got, tokens, padding)
            return
        bad = (want >= 0) & (got != want)
        if not bool(bad.any()):
            self._compare_padding(forward, start, got, tokens, padding)
            return
        j = int(bad.nonzero()[0])
        fed = self._fed_counts.get(forward, ids.numel())
        which = f"its {ids.numel()}" if fed <= ids.numel() else f"the first {ids.numel()} of its {fed}"
        raise TokenMismatchError(
            f"forward {forward} of this replay() was fed other tokens than its routes were recorded for: "
            f"{int(bad.sum())} of {which} tokens differ (first: token {j} of the forward, row {start + j} "
            f"of the routes, is {int(got[j])}, but that row was recorded for {int(want[j])}), so it would take the "
            f"experts of other tokens{self._counts_told(forward, start, fed)}. Are these the routes of "
            "another batch, micro-batch or rank, or the same "
            "sequences in another order (shuffled, sorted by length, regrouped)? Replay the forwards the routes were "
            "recorded for, in their order, or reorder the routes to the batch (routes[index], mr.BatchLayout). Routes "
            "whose tokens differ on purpose: routes.with_token_ids(None) drops the check"
            + (f". {_SEQUENCE_FIRST_HINT}" if self.sequence_first else "")
            + (f". {self.hint}" if self.hint else "")
        )

    def _counts_told(self, forward: int, start: int, fed: int) -> str:
        """What a refusal of forward ``forward`` (fed ``fed`` tokens, its rows from ``start`` on) adds where its token
        count does not fit the rows: more tokens than the routes hold from there on, or, where the routes know the
        forwards of their capture, another count than the captured forward beginning at that row was fed (routes of a
        prompt replayed on the prompt and its completion, or the reverse); else nothing."""
        left = self.want.numel() - start
        if fed > left:
            return (
                f" (it was fed {fed} tokens, but the routes hold {left} rows from row {start} on: the rows of shorter "
                "forwards, a prompt's capture replayed on the prompt and its completion, or fewer sequences?)"
            )
        captured = self._captured
        j = None if captured is None else captured.at(start)
        if captured is None or j is None or captured.begins[j] != start:
            return ""
        made = captured.end(j) - start
        if made == fed:
            return ""
        return (
            f" (it was fed {fed} tokens, but its rows from row {start} on were recorded by {captured.describe(j)}: "
            "routes of forwards of other shapes, a capture of prompts and their completions replayed on the prompts "
            "alone, or of another batch size?)"
        )

    def _compare_padding(
        self, forward: int, start: int, got: torch.Tensor, tokens: torch.Tensor | None, padding: torch.Tensor | None
    ) -> None:
        """Refuse a forward that feeds a token of a sequence (``tokens`` 1) at a row recorded at prompt ``padding``
        (True for each of the rows from ``start`` on)."""
        if tokens is None or padding is None:
            return
        at_padding = padding[: got.numel()] & (tokens.to("cpu") == 1)
        if not bool(at_padding.any()):
            return
        j = int(at_padding.nonzero()[0])
        raise TokenMismatchError(
            f"forward {forward} of this replay() feeds {int(at_padding.sum())} token(s) of its sequences where its "
            f"routes hold rows recorded at prompt padding (first: token {j} of the forward, id {int(got[j])}, reads "
            f"row {start + j}, recorded at a padding position: attention mask 0 in the capture), so those tokens "
            "would take the experts that padding got. The batch is padded otherwise than the capture's (another "
            "padding side or length, or fed without its attention mask). Replay the capture's batch with its "
            "attention mask, or lay the routes out for this batch (mr.split_generation, mr.BatchLayout), whose "
            "padding rows are routed natively" + (f". {self.hint}" if self.hint else "")
        )


class RouterFeedCheck(FeedCheck):
    """The check of a replay whose routers' rows are not one per token of the same forwards (``Routes._router_ids``:
    one MoE block called at several layers, a router also called on hidden states of one's own in the capture).

    Each router's rows are checked against its own ids as it reads them: a call in a forward reads rows of every one
    of the forward's tokens (a router called again in it reads the next rows, checked the same; one the forward does
    not call reads none), and a row recorded by a call outside every forward (``NO_FORWARD_ID``) is refused there, and
    so is a forward fed other ids or feeding a token of a sequence at a row recorded at prompt padding
    (``PADDING_ID``). A call of a router outside every forward reads rows of such calls only: they were recorded for
    no token, and are read in their order.

    Args:
        wants: each router's token ids, by the ``id`` of its :class:`~moe_replay.ring.ReplaySource`.
        hint: what a mismatch error adds about these routes.
        device_ids: check ids fed on a device too (see :class:`FeedCheck`).
        scopes: each router's scope module, by the ``id`` of its source: a level's later routers that see only the
            tokens the mask keeps read rows of those (:meth:`unpads`).
    """

    def __init__(
        self,
        wants: dict[int, torch.Tensor],
        hint: str = "",
        *,
        device_ids: bool = True,
        scopes: dict[int, nn.Module] | None = None,
    ) -> None:
        super().__init__(torch.zeros(0, dtype=torch.long), lambda: None, hint, device_ids=device_ids)
        self.wants = wants
        #: (forward, router, first row, its ids, which of them it feeds as tokens) to compare when the block ends
        self.later: list[tuple[int, Any, int, torch.Tensor, torch.Tensor | None]] = []
        self._tokens: Callable[[], torch.Tensor | None] = lambda: None  # the forward's tokens fed (see fed)
        self._scopes = scopes or {}
        #: the routers (by source id) that see only the tokens the mask of the forward running now keeps, and its ids
        #: and mask; (forward, router, first row, rows read, ids, mask) of their reads on a device, read when it ends
        self._kept_only: set[int] = set()
        self._fed_now: tuple[torch.Tensor, Any] | None = None
        self._kept_later: list[tuple[int, Any, int, int, torch.Tensor, torch.Tensor]] = []
        #: each router's own calls in each forward of the capture, by source id (see :meth:`know_router_calls`), and
        #: the captured forward each began in, in the forward that runs now, with the row it began at
        self._captured_each: dict[int, _CapturedCalls] = {}
        self._began_each: dict[int, tuple[int, int] | None] = {}
        #: the same by router name, with its calls (see :meth:`FeedCheck._in_one_forward`)
        self._began_named: dict[str, tuple[_CapturedCalls, tuple[int, int] | None]] = {}

    def know_router_calls(self, calls: dict[int, tuple[tuple[tuple[int, int], ...], tuple[int, ...]] | None]) -> None:
        """Check each router's calls in each forward against the calls of it that the captured forward it replays
        made (see :class:`_CapturedCalls`), where the routes know them: ``Routes._router_calls`` of each router, by
        the ``id`` of its source. Each router's reads pass :meth:`_unseen_read` already: no work is added per call."""
        each = {key: _CapturedCalls.of(*own) for key, own in calls.items() if own is not None}
        self._captured_each = {key: captured for key, captured in each.items() if captured is not None}
        for captured in self._captured_each.values():
            captured.own = True

    def _calls_by_source(self) -> dict[int, _CapturedCalls]:
        """Each router's own captured calls, by the ``id`` of its source."""
        return self._captured_each

    def unpads(self, scopes: Sequence[nn.Module]) -> None:
        """The routers of ``scopes`` see only the tokens the mask of the forward fed last keeps: each of their reads
        in it is checked against those tokens' ids (where its rows are as many: on a device, when the block ends)."""
        self._kept_only = {
            key for key, scope in self._scopes.items() if any(scope is t for t in scopes) and key in self.wants
        }

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: each router's next rows against its ids (see :meth:`FeedCheck.fed`)."""
        self._current = (-1, None)
        if paired or (not self._lost and any(map(_COMPILED, self._levels))):
            self._open()
        if self._lost:
            if (_inputs(args, kwargs) if inputs is None else inputs)[0] < 0:
                return False  # (fed hidden states: not taken, as where the host knows its place; see ring._Fed)
            if self._traced:  # (a forward compiled whole before it fed other tokens: refused here, where no sync)
                self._refuse_traced(on_host_only=True)
            elif self._unarmed is not None:  # (one compiled with no check of its tokens: refused here)
                self.unchecked()
            self.forwards += 1
            return True
        count, ids, shape = _inputs(args, kwargs) if inputs is None else inputs
        if count < 0:
            return False
        self.forwards += 1
        if order == MIXED:
            _refuse_mixed(order, shape, self.forwards, self.hint)
        self._kept_only, self._fed_now = set(), None
        if any(src.read_by_device for src in self._sources):  # (the host does not know where its rows begin)
            self._open()
            return True
        flat = None
        if ids is not None and (self.device_ids or ids.device.type == "cpu"):
            self._fed_now = (ids.detach(), kwargs.get("attention_mask"))
            if order == SEQUENCE_FIRST:
                self.sequence_first = True
            mask = kwargs.get("attention_mask")
            kept = _unpad_fed(ids, mask) if order == UNPADDED else None
            if kept is not None:  # (its routers see only the tokens its mask keeps: one row each)
                ids, count, mask = kept, kept.numel(), None  # (no mask: every one of them a token of a sequence)
            flat = in_router_order(ids.detach(), order).reshape(-1)
            held = ids.detach()
            fed: list[torch.Tensor | None] = []

            def tokens() -> torch.Tensor | None:  # (read where a row recorded at padding is: once per forward)
                if not fed:
                    got = _tokens_fed(mask, held) if held.dim() == 2 else torch.ones_like(held, dtype=torch.int8)
                    fed.append(None if got is None else in_router_order(got, order).reshape(-1))
                return fed[0]

            self._tokens = tokens
        else:
            self._tokens = lambda: None
        self._current = (count, flat)
        self._began_each = {}  # (each router's first call in it: see _router_call)
        self._began_named = {}
        for src in self._sources:  # (each read of this forward is looked at: see _unseen_read)
            src.cleared = src.host_consumed
        return True

    def _router_call(self, src: Any, start: int, n: int) -> None:
        """Router ``src`` reads ``n`` rows from ``start`` on in the forward that runs now: its first call there begins
        in a captured forward (at its first call, where that one made several), a further one is that forward's next
        call of it, on as many rows, or refused (:meth:`FeedCheck._begin_in`, :meth:`FeedCheck._next_call`)."""
        captured = self._captured_each.get(id(src))
        if captured is None:
            return
        if id(src) not in self._began_each:
            self._began_each[id(src)] = began = self._begin_in(captured, start, src.name)
            self._began_named[src.name] = (captured, began)
            self._in_one_forward(self._began_named, src.name)
            return
        self._next_call(captured, self._began_each[id(src)], src.name, start, n)

    def _check_router(self, src: Any, start: int, n: int, flat: torch.Tensor | None) -> None:
        """Router ``src``'s ``n`` rows from ``start`` on, read by the forward that runs now, fed ``flat``."""
        want = self.wants[id(src)][start : start + n]
        if not want.numel():  # (past the end: the routers refuse)
            return
        outside = want == NO_FORWARD_ID
        if bool(outside.any()):
            j = int(outside.nonzero()[0])
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() reaches router '{src.name}' at row {start + j} of its "
                "routes, which the capture recorded from a call of that router outside every forward of the model "
                "(on hidden states of one's own, as an auxiliary loss computes them): the token of no forward, so "
                "it would force those experts on this forward's tokens. Replay the forwards and the router's own "
                "calls in the order they were captured, or call the router outside the capture() block"
                + (f". {self.hint}" if self.hint else "")
            )
        if flat is None:
            return
        got = flat[: want.numel()]
        padding = want == PADDING_ID
        tokens = self._tokens() if bool(padding.any()) else None
        tokens = None if tokens is None else tokens[: want.numel()]
        if got.device.type == "cpu":
            self._compare(self.forwards, start, got, tokens, want, padding)
        else:  # (compared when the block ends: one copy to the host)
            self.later.append((self.forwards, src, start, got.clone(), None if tokens is None else tokens.clone()))

    def _kept_read(self, src: Any, start: int, n: int) -> bool:
        """Router ``src``, which sees only the tokens the mask of the forward running now keeps, reads ``n`` rows from
        ``start`` on: checked against those tokens' ids, now where they are on the host (False where they are not
        ``n``: refused as any other read), else when the block ends."""
        if self._fed_now is None:
            return False
        ids, mask = self._fed_now
        if not isinstance(mask, torch.Tensor) or ids.dim() != 2:
            return False
        if ids.device.type != "cpu" or mask.device.type != "cpu":  # (no host sync here: read when the block ends)
            self._kept_later.append((self.forwards, src, start, n, ids.clone(), mask.clone()))
            return True
        kept = _unpad_fed(ids, mask)
        if kept is None or kept.numel() != n:
            return False
        self._check_router(src, start, n, kept)
        return True

    def finish(self) -> None:
        """Compare the forwards whose ids were on a device, in order, then those that ran compiled (see
        :meth:`FeedCheck.finish`)."""
        kept_later, self._kept_later = self._kept_later, []
        for forward, src, start, n, ids, mask in kept_later:
            kept = _unpad_fed(ids.cpu(), mask.cpu())
            if kept is None or kept.numel() != n:
                raise TokenMismatchError(
                    f"forward {forward} of this replay() reaches router '{src.name}', which sees only the tokens its "
                    f"attention mask keeps, on {n} rows, not as many as the {0 if kept is None else kept.numel()} "
                    "tokens it keeps: which rows go to which token cannot be checked, and other tokens may have "
                    "taken their experts" + (f". {self.hint}" if self.hint else "")
                )
            want = self.wants[id(src)][start : start + n]
            self._compare(forward, start, kept[: want.numel()], None, want, want == PADDING_ID)
        later, self.later = self.later, []
        for forward, src, start, got, tokens in later:
            want = self.wants[id(src)][start : start + got.numel()]
            self._compare(forward, start, got.cpu(), None if tokens is None else tokens.cpu(), want, want == PADDING_ID)
        self._refuse_traced()
        self.unchecked()
        if not self._place_lost():  # (each router's last forward made every call of the captured forward it began in)
            for src in self._sources:
                captured = self._captured_each.get(id(src))
                if captured is not None:
                    self._stops_whole(captured, src.host_consumed, src.name)

    def _unseen_read(self, router: str, start: int, n: int) -> None:
        """A router reads its next rows: in the forward that runs now, on all of its tokens (checked against their
        ids), or outside every forward, rows recorded by such calls alone; else refused (see
        :meth:`FeedCheck._unseen_read`)."""
        if any(level.compiled for level in self._levels):
            self._compiled_read(router, start, n)
            return
        src = next((s for s in self._sources if s.name == router), None)
        if src is not None and start == src.cleared and n > 0:
            count, flat = self._current
            if self._inside and count > 0 and n == count:
                self._router_call(src, start, n)  # (a call the captured forward did not make: refused)
                self._check_router(src, start, n, flat)
                src.cleared = min(src.num_rows, start + n)
                return
            if self._inside and id(src) in self._kept_only and 0 < n < count and self._kept_read(src, start, n):
                self._router_call(src, start, n)
                src.cleared = min(src.num_rows, start + n)
                return
            want = self.wants[id(src)][start : start + n]
            if not self._inside and want.numel() == n and bool((want == NO_FORWARD_ID).all()):
                src.cleared = min(src.num_rows, start + n)
                return
        super()._unseen_read(router, start, n)


class RouterCallCheck(FeedCheck):
    """The check of a replay with ``strict=False`` by a model on a device, of routes whose routers' rows are each
    router's own (``Routes._router_ids``), where the routes know each router's calls (``Routes._router_calls``): the
    ids are never read back there (no sync), and no read of a router is looked at, so the calls are checked forward by
    forward, from the host's count of each router's reads as a forward begins and ends (:meth:`fed`, :meth:`left`).

    A forward's first call of a router begins in a captured forward, at its first call where it made several
    (refused as the forward begins, before a router reads a row); a forward that read more rows of a router than the
    calls of the captured forward it began in hold (a call turned on since the capture: its rows another call's or
    forward's), or more than one call's on every token of it where that one made one call, is refused as the next
    forward begins or the block ends, before the block returns; a block that ends inside a captured forward of several
    calls too. Per-forward work only: nothing is added per router call.

    Args:
        captured: each router's own calls (:class:`_CapturedCalls`), by the ``id`` of its source.
        hint: what a refusal adds about these routes.
    """

    def __init__(self, captured: dict[int, _CapturedCalls], hint: str = "") -> None:
        super().__init__(torch.zeros(0, dtype=torch.long), lambda: None, hint, device_ids=False)
        self._captured_each = captured
        #: each checked router's source, the captured forward its first call in the forward that runs now began in,
        #: the row it stood at as that forward began, and the token count it was fed
        self._open_reads: list[tuple[Any, tuple[int, int] | None, int, int]] = []
        self._overdrawn: str | None = None  # (a forward that read another call's rows: refused at the next point)

    def start(self, levels: Sequence[FeedForward], sources: Sequence[Any]) -> Callable[[], None]:
        """Check the forwards entering ``levels`` in this thread until the returned function is called (the routers'
        reads are not guarded: their counts are read as each forward begins and ends)."""
        self._thread = threading.get_ident()
        self._levels = list(levels)
        self._sources = [src for src in sources if id(src) in self._captured_each]
        for level in self._levels:
            level.compiled = False
        self._traced = self._arm_calls_traced()
        remove = _enter_levels(levels, self)

        def stop() -> None:
            remove()
            for traced, _, _ in self._traced:
                traced.disarm()

        return stop

    def _calls_by_source(self) -> dict[int, _CapturedCalls]:
        """Each router's own captured calls, by the ``id`` of its source."""
        return self._captured_each

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: each router's first call in it begins in a captured forward (see the class)."""
        self._refuse_overdrawn()
        self._open_reads = []
        count = (_inputs(args, kwargs) if inputs is None else inputs)[0]
        if count < 0:
            return False
        self.forwards += 1
        if paired or any(src.read_by_device for src in self._sources):
            self._lost = True  # (the host does not count the reads from here on)
        if self._lost:
            return True
        for src in self._sources:
            start = src.host_consumed
            began = self._begin_in(self._captured_each[id(src)], start, src.name)
            self._open_reads.append((src, began, start, count))
        return True

    def left(self) -> None:
        """The forward fed last has ended: each router read the rows of the calls of the captured forward it began
        in, or it is noted, and refused at the next forward or as the block ends (this runs in the cleanup of the
        forward: it does not raise)."""
        reads, self._open_reads = self._open_reads, []
        if self._lost or self._overdrawn is not None:
            return
        named: dict[str, tuple[_CapturedCalls, tuple[int, int] | None]] = {}
        for src, began, start, count in reads:
            at = src.host_consumed
            if began is None or at == start:
                continue
            named[src.name] = (self._captured_each[id(src)], began)
            try:  # (the routers that read in this forward: each began in the same captured forward)
                self._in_one_forward(named, src.name)
            except TokenMismatchError as refused:
                self._overdrawn = str(refused)
                return
            captured = self._captured_each[id(src)]
            j = began[0]
            calls = captured.forwards[j][2]
            over = at > captured.end(j) if calls > 1 else at - start > count
            if over:
                self._overdrawn = (
                    f"router '{src.name}' read rows {start}..{at - 1} of the routes in forward {self.forwards} of "
                    f"this replay(), which was fed {count} tokens and began in {captured.describe(j)}: more than "
                    f"{'the rows of its calls' if calls > 1 else 'one call on every token'}, so a further call of it "
                    f"read the rows of another call or forward. Its outputs are not a replay: discard them. "
                    f"{_OTHER_CALLS_HINT}" + (f". {self.hint}" if self.hint else "")
                )
                return

    def _refuse_overdrawn(self) -> None:
        if self._overdrawn is not None:
            why, self._overdrawn = self._overdrawn, None
            raise TokenMismatchError(why)

    def finish(self) -> None:
        """The block ends: refuse a forward noted in :meth:`left`, and a block that ends inside a captured forward of
        several calls of a router, and a forward that ran compiled whose routers did not make the calls of one
        captured forward (read on the device, see :meth:`_arm_calls_traced`)."""
        self._refuse_overdrawn()
        self._refuse_traced()
        if self._lost:
            return
        for src in self._sources:
            self._stops_whole(self._captured_each[id(src)], src.host_consumed, src.name)


class OrderCheck(FeedCheck):
    """The check of a replay whose routes know no token ids and no token order (an engine's rollout read without its
    ids, routes laid out by :class:`~moe_replay.BatchLayout` or :func:`~moe_replay.pad_routes` from such routes): their
    rows are read in order, and rows laid out sequence by sequence would go to other tokens wherever the routers see a
    ``[batch, positions]`` forward sequence-first. Such a forward is refused as it enters the model, before any router
    runs; every other forward runs unchecked, as before.

    Routes a capture recorded sequence-first carry their tokens' order (``Routes._token_rank``), and those of a capture
    fed embeddings are in the order its routers saw them (``Routes._order_untold``): they get no such check (``kept``).
    Rows that carry their place in the order of their tokens (``rank``) are checked against the order of each forward
    that reads them instead, where the host counts the rows read (``position``): rows of a forward cut through (a
    slice, ``split_routes``) or put in another order read by a forward of another shape hold other tokens' rows.
    Every forward begins with the routers of ``sources`` (those of as many rows each) in step, or is refused
    (:meth:`FeedCheck._in_step`).
    """

    #: the check of each router's calls forward by forward (see :class:`RouterCallCheck`), where the routers hold
    #: other row counts (one called at several layers, or skipped in some forwards) and the routes know their calls:
    #: finished with this one
    each_router: RouterCallCheck | None = None

    def __init__(
        self,
        hint: str = "",
        rank: torch.Tensor | None = None,
        position: Callable[[], int | None] = lambda: None,
        kept: bool = False,
        places: torch.Tensor | None = None,
        device_ids: bool = True,
        layout: torch.Tensor | None = None,
    ) -> None:
        super().__init__(torch.zeros(0, dtype=torch.long), position, hint, device_ids=device_ids)
        self._rank = rank
        #: each row's place in its sequence as the BatchLayout gave it (-1 at its padding), rows that force nothing
        #: too, or None: a sequence that runs on from one batch row into the next is refused by it
        self._layout = layout if places is not None else None
        self._kept = kept
        #: the places are those a capture recorded its rows at (routes whose ids were dropped), not a layout's
        self.captured = False
        #: where the places are a layout's: the places a capture recorded the same rows at (-2 where not known), or
        #: None. Rows a layout placed from 0 may be a turn laid out alone, fed after the tokens a static cache the
        #: model keeps holds; rows recorded at other places than the positions they are fed are not that turn
        self.recorded: torch.Tensor | None = None
        #: each row's place in its sequence in the batch a BatchLayout laid the rows out for, -1 at its padding, -2
        #: where not known (``Routes._layout_pos``), or None; and (forward, first row, the places of its rows, a copy
        #: of its attention mask and position_ids) of the forwards fed them on a device, read when the block ends
        self._places = places if places is not None and bool((places >= 0).any()) else None
        self._places_later: list[
            tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, tuple[int, ...]]
        ] = []
        #: a forward on the host whose position_ids were not its rows' places, let run on the evidence of a cache its
        #: modules keep holding the tokens before them (see :func:`_static_held`): its entry of :attr:`_places_later`
        #: and the caches that must show, when it ends, that it wrote them at its positions (:meth:`left`)
        self._static: (
            tuple[
                tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, tuple[int, ...]],
                list[_HeldCache],
            ]
            | None
        ) = None
        #: the forwards let run so whose positions are compared as the block ends (none of those caches written at
        #: their positions alone), and the names of the caches each wrote or kept: a refusal then comes after the
        #: forward ran, and says what it left written
        self._static_ran: dict[int, list[str]] = {}
        #: the forwards whose position_ids were read from a keyword of another name (``word_positions=``, taken for
        #: positions by its name, see :func:`_positions_among`), by forward: named where their positions are refused
        self._positions_under: dict[int, str] = {}
        #: the states of the levels whose compiled forwards compare their positions with the places (see
        #: :meth:`_arm_places`), read as the block ends
        self._places_armed: list[tuple[torch.Tensor, FeedForward]] = []

    def start(self, levels: Sequence[FeedForward], sources: Sequence[Any]) -> Callable[[], None]:
        """Check the forwards entering ``levels`` in this thread until the returned function is called (the routers'
        reads are not guarded: rows are not compared with ids; ``sources`` are checked to be in step), except where the
        routes know the calls each captured forward made (:meth:`know_calls`): a router called again in a forward is
        checked against them (:meth:`_order_guard`)."""
        self._thread = threading.get_ident()
        self._levels = list(levels)
        self._sources = list(sources)
        entered = _enter_levels(levels, self)
        placed = self._arm_places()

        def remove() -> None:
            entered()
            for level in placed:
                level.traced.disarm_places()

        if self._captured is None or not self._sources:
            return remove
        for src in self._sources:
            src.cleared, src.guard = src.num_rows, self._order_guard
        for level in self._levels:  # (forwards that run compiled: their calls checked on the device)
            level.compiled = False
        self._traced = self._arm_calls_traced()

        def stop() -> None:
            remove()
            for src in self._sources:
                src.guard = None
                src.cleared = src.num_rows
            for traced, _, _ in self._traced:
                traced.disarm()

        return stop

    def bare_began(self, level: FeedForward) -> bool:
        """A forward enters ``level`` that it did not take (fed no token count), nor any level around it: where the
        routes know the calls each captured forward made, the captured forward it begins in (its routers in step),
        whose first call its routers' first calls read unguarded (every row of it, where it made one call)."""
        if self._captured is None or self._lost or not self._sources:
            return False
        start = self.position()
        if start is None:
            self._place_calls(None, 0)
            return False
        rows = set(map(_CONSUMED, self._sources))
        if len(rows) != 1:  # (out of step: refused where a forward that gives its tokens enters, see _in_step)
            return False
        self._bares += 1
        self._bare = (level,)
        self._enter_captured(start)
        began = self._began_in
        captured = self._captured
        if began is None:
            end = start
        else:
            _, first, calls = captured.forwards[began[0]]
            end = captured.end(began[0]) if calls == 1 else captured.bounds[first + 1]
        sources = self._sources
        deque(map(setattr, sources, repeat("cleared"), map(min, map(_NUM_ROWS, sources), repeat(end))), 0)
        return True

    def _arm_places(self) -> list[FeedForward]:
        """Arm each level's compiled check with the rows' places (:meth:`TracedFeedCheck.arm_places`), where they are
        known and the routers' rows are on one device: a forward compiled whole has its positions compared there, as
        an eager one's are here. Returns the levels armed."""
        devices = {src.device for src in self._sources}
        if self._places is None or len(devices) != 1:
            return []
        device = devices.pop()
        with torch.inference_mode(False):
            places = torch.cat([self._places, torch.full((1,), -2, dtype=self._places.dtype)]).to(device)
        armed = []
        for level in self._levels:
            sources = self._reached(level)
            if sources:
                self._places_armed.append((level.traced.arm_places(places, sources), level))
                armed.append(level)
        return armed

    def _refuse_compiled_places(self) -> None:
        """Refuse the block where a forward compiled whole was fed positions that do not fit its rows' places (read
        from the levels' device states, see :meth:`_arm_places`)."""
        armed, self._places_armed = self._places_armed, []
        read = [(s.tolist(), level) for s, level in armed if level.compiled]
        found = [(f, level) for f, level in read if f[TracedFeedCheck.PLACE_FOUND]]
        if not found:
            return
        t = TracedFeedCheck
        f = min(found, key=lambda x: x[0][t.PLACE_START])[0]
        row, col = divmod(f[t.PLACE_AT], max(1, f[t.PLACE_WIDTH]))
        what = (
            "its position_ids put a token at another place in its sequence than its row holds (fed no mask and no KV "
            "cache)"
            if f[t.PLACE_KIND] == t.PLACE_VALUES
            else "its position_ids restart a sequence inside a sequence of the routes, or put two of its rows another "
            "distance apart than the routes hold them"
        )
        whose = (
            "a capture recorded at other places of their sequences (their token ids dropped, not their places)"
            if self.captured
            else "laid out by mr.BatchLayout for another batch"
        )
        raise TokenMismatchError(
            f"a forward of this replay() that ran compiled read rows {whose}: {what} (first at batch position "
            f"[{row}, {col}], row {f[t.PLACE_START] + f[t.PLACE_AT]} of the routes), so its tokens would take the "
            "experts of other tokens. Feed the tokens at the places their rows were captured at (a sequence-parallel "
            "rank its own slice of the rows), lay the routes out for the batch as fed (mr.BatchLayout), or give them "
            "their tokens' ids (routes.with_token_ids(ids)) so that every row is checked"
            + (f". {self.hint}" if self.hint else "")
        )

    def _order_guard(self, router: str, start: int, n: int) -> None:
        """A router reads past the rows of its forward's tokens (see :meth:`_place_calls`): its first call in the
        forward (rows of another count than its tokens: a decoder's canvas), or one outside every forward, as before;
        a further call, the next call the captured forward made (:meth:`FeedCheck._captured_call`), or refused."""
        src = next((s for s in self._sources if s.name == router), None)
        if src is None:
            return
        placed = (self._inside or self._bare is not None) and not self._lost
        if placed:
            self._captured_call(router, start, n)
        src.cleared = min(src.num_rows, start + n) if placed else src.num_rows

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: refused where its routers see its ``[batch, positions]`` tokens sequence-first
        (``order``, :func:`token_order`) and it holds two sequences of two positions or more."""
        count, _, shape = _inputs(args, kwargs) if inputs is None else inputs
        if count < 0:
            return False
        self.forwards += 1
        self._fed_mask = (kwargs.get("attention_mask"), shape)
        if paired:  # (an encoder-decoder's routers see the encoder's tokens and the decoder's: never in step)
            self._lose_place()
        start = self._in_step(count) if not self._lost else None
        self._began_in = None
        if self._captured is not None:
            self._place_calls(start, count)
        if not self._kept and order == MIXED:
            _refuse_mixed(order, shape, self.forwards, self.hint)
        if (
            not self._kept
            and order == SEQUENCE_FIRST
            and not isinstance(order, _GridTransposed)  # (its rows, in the routers' order, are sequence by sequence)
            and shape is not None
            and min(int(shape[0]), int(shape[1])) > 1
            and not self._ranked(count)
        ):
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() feeds a [{int(shape[0])}, {int(shape[1])}] batch whose "
                "routers see its tokens sequence-first (position 0 of every sequence, then position 1...), but its "
                "routes know neither their token ids nor the order of their tokens, and their rows are read in order: "
                "rows laid out sequence by sequence (an engine's rollout, mr.BatchLayout, mr.pad_routes) would force "
                "the experts of other tokens. Give the routes the ids of their tokens, one per row in the order of "
                "the rows (routes.with_token_ids(ids)), so that the replay checks each row's token; rows laid out "
                "sequence by sequence are then put in the order the routers see the tokens with routes[index], "
                "index = torch.arange(batch * positions).view(batch, positions).t().reshape(-1)"
                + (f". {self.hint}" if self.hint else "")
            )
        if self._rank is not None:
            self._check_rank(count, shape, order)
        if shape is None and self._places is not None and order in (BATCH_MAJOR, UNTOLD):
            # (a flat batch fed its positions: read as one [1, tokens] row, whose one order needs no telling, as a
            # [1, tokens] forward's is not told)
            shape = _flat_shape(_inputs(args, kwargs)[1] if inputs is None else inputs[1], kwargs)
            order = BATCH_MAJOR if shape is not None else order
        if self._places is not None and start is not None and shape is not None:
            if order == BATCH_MAJOR:
                self._check_places(start, count, shape, kwargs, args)
            elif order == SEQUENCE_FIRST:
                self._check_places_sequence_first(start, count, shape, kwargs, args)
        return True

    def _place_calls(self, start: int | None, count: int) -> None:
        """Where the routes know the calls each captured forward made: the rows this forward's first calls may read
        unguarded, ``src.cleared = min(src.num_rows, start + count)`` for each (in C: it runs at every forward), and the
        captured forward it begins in; where the host does not place its rows, every row from here on, unchecked."""
        sources = self._sources
        if start is None:
            self._lost = True
            deque(map(setattr, sources, repeat("cleared"), map(_NUM_ROWS, sources)), 0)
            return
        deque(map(setattr, sources, repeat("cleared"), map(min, map(_NUM_ROWS, sources), repeat(start + count))), 0)
        self._enter_captured(start)

    def _check_places(
        self, start: int, count: int, shape: torch.Size, kwargs: dict[str, Any], args: tuple[Any, ...] = ()
    ) -> None:
        """The rows a ``[batch, positions]`` forward reads from ``start`` on, laid out by a BatchLayout for a batch
        (each row's place in its sequence, -1 at padding), against the attention mask and ``position_ids`` it is fed:
        a row of a sequence at a position the mask marks padding (or padding of the layout where it marks a token),
        or a sequence the positions restart inside, means the batch is not the one the rows were laid out for
        (another padding side, order or lengths): its tokens would take the experts of others. Host tensors now,
        device ones when the block ends (a copy of them: no host sync per forward; none at all with
        ``strict=False``)."""
        batch, positions = int(shape[0]), int(shape[1])
        places = cast(torch.Tensor, self._places)[start : start + count]
        if count != batch * positions or places.numel() != count or not bool((places >= 0).any()):
            return  # (an overdraw is refused by the read)
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        under = None if pos is None else next((k for k, v in kwargs.items() if v is pos and k != "position_ids"), None)
        if under is not None:
            self._positions_under[self.forwards] = under
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            # (a [batch, heads, queries, keys] mask of a forward whose tokens start their sequences: which are tokens,
            # 1, and which padding, 0; -1 for a sequence it does not tell, read as none when compared)
            mask = _tokens_of_4d(mask, batch, positions)
        if not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, positions)):
            mask = None
        if (positions < 2 and not (self.captured or _one_token_rows_placed(args, kwargs, shape))) or _positions_form(
            pos, batch, positions
        ) is None:
            pos = None  # (of a form that tells the positions: read as text positions in _refuse_places)
        fed = [t for t in (mask, pos) if t is not None]
        grid = places.view(batch, positions)
        if self._layout is not None and self._layout.numel() >= start + count:
            self._refuse_run_on(self.forwards, start, self._layout[start : start + count].view(batch, positions))
        if not fed:
            given = kwargs.get("position_ids")
            if (
                kwargs.get("attention_mask") is None
                and positions > 1
                and isinstance(given, torch.Tensor)
                and given.is_floating_point()
                and given.device.type == "cpu"
                and given.dim()
                and int(given.shape[-1]) == positions
            ):
                self._refuse_placeless(self.forwards, start)
            if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None:
                self._refuse_unplaced(self.forwards, start, grid)
                if self._layout is None and _tokens_alone(args, kwargs, shape) and not _kept_counts(self._levels):
                    # (rows that hold their places, laid out by no BatchLayout (a capture's or an engine reader's
                    # rows, their ids dropped or sliced), fed their tokens alone: each token is at its column of its
                    # batch row, as the model counts them. A layout fed so replays by row order, as it did)
                    wrong = grid.ge(0) & grid.ne(torch.arange(positions).expand_as(grid))
                    at = wrong.nonzero()
                    if at.numel():
                        self._places_refused(self.forwards, start, wrong, at, "implied")
            return
        # (fed no mask and no KV cache, position_ids are each token's place in its sequence: compared by value; a
        # forward given anything else that may hold earlier tokens, a cache under a name of its own, is not compared)
        # (a mask of another shape, a 4-d one, is a mask fed all the same: compared by value only where it is a
        # [batch, positions] one, whose positions may also count the padding before a sequence, as an arange does)
        _note_past(kwargs, shape)
        whole = (
            (kwargs.get("attention_mask") is None or mask is not None)
            and pos is not None
            and _cache_held(kwargs) == 0
            and _batch_alone(args, kwargs, shape)
        )
        # (a capture's rows hold the places their forward's positions gave them, the tokens a cache held before
        # included: fed positions, whatever cache or mask beside them, each is compared with its place by value; a
        # decode step fed a mask over its cache, and a cache its modules keep, let another step's rows be forced)
        whole = whole or (self.captured and pos is not None)
        # (a count given beside positions that is the count of tokens a KV cache the model keeps itself holds: the
        # tokens before these, where the positions start there, see _refuse_places)
        counts = _counts_given(args, kwargs, shape) if whole else ()
        if counts:
            kept = _kept_counts(self._levels)
            counts = tuple(c for c in counts if c in kept)
        if all(t.device.type == "cpu" for t in fed):
            try:
                self._refuse_places(self.forwards, start, grid, mask, pos, whole, counts)
            except TokenMismatchError:
                # (a capture's rows hold the places their forward gave them, the tokens a cache held before included:
                # fed at other positions they are never a continuation after a cache; only rows a layout placed from
                # 0 in a sequence of their own may be, and not where a capture recorded them at other places)
                text = (
                    _text_positions(pos, batch, positions) if whole and pos is not None and not self.captured else None
                )
                if text is not None and not (
                    self._recorded_any(start, count) and self._at_recorded(start, count, text)
                ):
                    # (rows whose places only a layout gave, no capture or engine reader recorded them: a tensor the
                    # model keeps that holds something before the positions and is written at them (a static cache a
                    # capture left filled, a running statistic per position) does not tell a turn laid out alone from
                    # another rank's slice)
                    raise
                caches = _static_held(self._levels, text, batch) if text is not None else []
                if not caches:
                    raise
                # (positions after tokens a cache its modules keep holds: the other checks now, the values where the
                # forward ends, unless it wrote that cache at its positions, see left)
                self._refuse_places(self.forwards, start, grid, mask, pos, False, counts)
                self._static = ((self.forwards, start, grid, mask, pos, whole, counts), caches)
            if not whole and pos is not None and self.recorded is not None and not self.captured:
                # (rows a layout placed, fed beside something that may hold earlier tokens, a cache of a count not
                # read (stacked in one tensor of its own name): their positions are not compared with the layout's
                # places, as a turn laid out alone goes on after the tokens such a cache holds, but rows a capture
                # recorded at other places than the positions fed are not that turn: another turn's tokens)
                text = _text_positions(pos, batch, positions)
                if text is not None and not self._at_recorded(start, count, text):
                    self._refuse_places(self.forwards, start, grid, mask, pos, True, counts)
        elif self.device_ids:
            held = [None if t is None else t.detach().clone() for t in (mask, pos)]
            self._places_later.append((self.forwards, start, grid, held[0], held[1], whole, counts))

    def _check_places_sequence_first(
        self, start: int, count: int, shape: torch.Size, kwargs: dict[str, Any], args: tuple[Any, ...]
    ) -> None:
        """The rows a forward whose routers see its ``shape`` ids sequence-first reads from ``start`` on (in the
        routers' order: each column of the ids in turn), against the ``position_ids`` it is fed, of the ids' shape:
        each token's position must be its row's place, where they tell it by value (a capture's rows, whose places are
        those its positions gave them; or rows fed no attention mask and no KV cache). Which dimension of such ids holds
        a sequence is not known (a model that transposes its ``[batch, positions]`` ids, or one fed ``[positions,
        batch]`` ids, as ``nn.Transformer`` is), so only values are compared, token by token: another rank's slice fed
        its positions, a suffix fed without its prefix, are refused; positions of another form, a mask's padding or
        the tokens a cache holds are left to the ids (see :meth:`_check_places` for batch-major forwards)."""
        batch, positions = int(shape[0]), int(shape[1])
        places = cast(torch.Tensor, self._places)[start : start + count]
        if count != batch * positions or places.numel() != count or not bool((places >= 0).any()):
            return
        pos = kwargs.get("position_ids")
        if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != (batch, positions):
            return
        if _positions_form(pos, batch, positions) != "rows":
            return
        plain = kwargs.get("attention_mask") is None and _cache_held(kwargs) == 0 and _batch_alone(args, kwargs, shape)
        if not (self.captured or plain):
            return
        under = next((k for k, v in kwargs.items() if v is pos and k != "position_ids"), None)
        if under is not None:
            self._positions_under[self.forwards] = under
        grid = places.view(positions, batch).t()  # (each token's place, as its ids are laid out)
        if pos.device.type == "cpu":
            self._refuse_places(self.forwards, start, grid, None, pos, True)
        elif self.device_ids:
            self._places_later.append((self.forwards, start, grid, None, pos.detach().clone(), True, ()))

    def _recorded_any(self, start: int, count: int) -> bool:
        """Did a capture or an engine reader record the place of any of the ``count`` rows a forward reads from
        ``start`` on (:attr:`recorded`)? Rows a layout placed from an array (``Routes.from_numpy``) record none."""
        if self.recorded is None or self.recorded.numel() < start + count:
            return False
        return bool((self.recorded[start : start + count] >= 0).any())

    def _at_recorded(self, start: int, count: int, text: torch.Tensor) -> bool:
        """Whether the rows a forward reads from ``start`` on (``count`` of them) are fed at the places a capture
        recorded them at (:attr:`recorded`), where it recorded any: its text positions ``text`` (``[1 or batch,
        positions]``) hold each known one. True where none is known."""
        if self.recorded is None or self.recorded.numel() < start + count:
            return True
        rows = self.recorded[start : start + count].view(-1, int(text.shape[-1]))
        known = rows.ge(0)
        return bool(rows.eq(text.expand_as(rows)).logical_or(~known).all())

    def left(self) -> None:
        """The forward fed last has ended (see :meth:`FeedCheck.left`): one let run on the evidence of a static cache
        its modules keep (:attr:`_static`) has its positions compared by value when the block ends, unless it wrote
        one of those caches at its positions and nowhere else (:meth:`_HeldCache.written`)."""
        super().left()
        static, self._static = self._static, None
        if static is not None and not any(h.written() for h in static[1]):
            self._places_later.append(static[0])
            self._static_ran[static[0][0]] = [h.name for h in static[1]]

    def _refuse_places(
        self,
        forward: int,
        start: int,
        grid: torch.Tensor,
        mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        whole: bool = False,
        counts: tuple[int, ...] = (),
    ) -> None:
        """Refuse forward ``forward`` (its rows from ``start`` on, their places ``grid``) where its host ``mask`` or
        ``pos`` (position_ids) do not fit them; ``whole`` (fed no KV cache, and no mask or a ``[batch, positions]``
        one): where a row's position is not its place (nor, fed a mask, its column where its sequence's first row is
        in its batch row: positions counting the padding), unless every row's positions start at one of ``counts``
        (ints given beside them that a KV cache the model keeps itself holds as many tokens as, see
        :func:`_kept_counts`), as for a forward given a cache that holds tokens."""
        checks: list[tuple[torch.Tensor, str]] = []
        if mask is not None and bool(mask.lt(0).any()):
            mask = None  # (a 4-d mask that does not tell each token from padding: as none)
        if mask is not None:
            mask = mask.cpu()
            checks.append((grid.ge(0) & mask.eq(0), "mask"))
            checks.append((grid.eq(-1) & mask.ne(0), "padding"))
        if pos is not None:  # (mrope's rows or GLM's where they tell the text positions, see _text_positions)
            fed_pos = pos.cpu()
            pos = _text_positions(fed_pos, int(grid.shape[0]), int(grid.shape[1]))
            mrope = _mrope_starts(fed_pos, int(grid.shape[0]), int(grid.shape[1]))
            starts = mrope if pos is None else None
            if starts is not None and mask is None:  # (fed no mask: no positions that count a padding to compare)
                # (mrope's rows that differ (an image) tell no place, but still where each sequence starts: its first
                # token, and it alone, at 0 in every row)
                checks.append((grid.ge(0) & grid.eq(0).ne(starts.expand_as(grid)), "starts"))
        if whole and pos is not None and counts and pos.numel() and bool((pos[:, 0] == pos[0, 0]).all()):
            whole = int(pos[0, 0]) not in counts  # (positions on from a count of tokens the model holds itself)
        if pos is not None:
            # (two tokens of a sequence, one after the other in it: not its first after padding, -1 + 1)
            step = grid[:, 1:] - grid[:, :-1]
            inside = grid[:, :-1].ge(0) & step.eq(1)
            fed_step = (pos[:, 1:] - pos[:, :-1]).expand_as(inside)
            wrong = inside & fed_step.ne(1)
            checks.append((torch.cat([torch.zeros_like(wrong[:, :1]), wrong], 1), "positions"))
            # (two rows later in their sequence with a gap between them, as rows picked out of their sequences are: a
            # context-parallel rank's chunks of each sequence; the positions fed must be as far apart)
            apart = grid[:, :-1].ge(0) & step.gt(1) & fed_step.ne(step)
            checks.append((torch.cat([torch.zeros_like(apart[:, :1]), apart], 1), "gaps"))
            if mask is None:
                # (positions that run on through a batch row holding the layout's padding, one run from its start
                # to its end, tell nowhere a sequence starts: a batch padded on the other side reads the same)
                flat = pos[:, 1:].eq(pos[:, :-1] + 1).all(1, keepdim=True).expand_as(grid)
                checks.append((grid.eq(-1) & flat, "run on"))
            if whole:
                fed = pos.expand_as(grid)
                wrong = grid.ge(0) & fed.ne(grid)
                if mask is not None:  # (or the token's column, where the row holds its sequence's first token)
                    column = torch.arange(grid.shape[1]).expand_as(grid)
                    first = (column - grid).clamp(0, grid.shape[1] - 1)
                    counted = fed.eq(column) & column.ge(grid) & grid.gather(1, first).eq(0)
                    wrong = wrong & ~counted
                if mrope is not None:
                    # (mrope's text after an image goes on from the image's largest position, not from its place: a
                    # token is at its place only where its sequence starts in this forward, every row equal since)
                    column = torch.arange(grid.shape[1]).expand_as(grid)
                    first = (column - grid).clamp(0, grid.shape[1] - 1)
                    wrong = wrong & column.ge(grid) & grid.gather(1, first).eq(0)
                checks.append((wrong, "values"))
        for wrong, what in checks:
            at = wrong.nonzero()
            if at.numel():
                self._places_refused(forward, start, wrong, at, what, grid.stride())

    def _refuse_run_on(self, forward: int, start: int, grid: torch.Tensor) -> None:
        """Refuse forward ``forward`` where a sequence of the layout runs on from the end of one batch row into the
        next (the place at a row's start follows the place at the previous row's end): a BatchLayout puts each
        sequence in one row, so the rows were laid out for a batch of other rows (another row length, other
        sequences), and every row after the first would take other tokens' experts. Whatever the forward is fed."""
        if grid.shape[0] < 2:
            return
        first, last = grid[1:, 0], grid[:-1, -1]
        wrong = (first > 0) & (last >= 0) & (first == last + 1)
        at = wrong.nonzero().flatten()
        if not at.numel():
            return
        row = int(at[0]) + 1
        first_row = start + row * int(grid.shape[1])
        raise TokenMismatchError(
            f"forward {forward} of this replay() reads rows laid out by mr.BatchLayout for another batch: the "
            f"sequence at the end of its batch row {row - 1} runs on into row {row} (row {first_row} of the routes is "
            f"place {int(grid[row, 0])} of a sequence), but a layout puts each sequence in one row: "
            f"these rows were laid out for rows of another length than this [{int(grid.shape[0])}, "
            f"{int(grid.shape[1])}] batch (another micro-batch, padding trimmed otherwise), and its tokens would take "
            "the experts of other tokens. Lay the routes out for the batch as fed (mr.BatchLayout of its sequences), "
            "or give them their tokens' ids (routes.with_token_ids(ids)) so that every row is checked"
            + (f". {self.hint}" if self.hint else "")
        )

    def _refuse_placeless(self, forward: int, start: int) -> None:
        """Refuse forward ``forward``, fed no attention mask and floating ``position_ids`` that tell no place (their
        fractions are no whole number of one step: see :func:`_host_scale`): the routes know no token ids, so nothing
        tells that its tokens sit at the places its rows hold, and another rank's slice would be forced."""
        raise TokenMismatchError(
            f"forward {forward} of this replay() reads rows from row {start} of routes that know no token ids, each "
            "at its place in its sequence, but it is fed no attention mask and position_ids of fractions that tell "
            "no place (no whole number of one step: not positions scaled by one factor): nothing tells that its "
            "tokens sit at the places of their rows (another rank's slice, a suffix without its prefix would be "
            "forced). Pass integer position_ids (the model may scale them itself), or give the routes their tokens' "
            "ids (routes.with_token_ids(ids)) so that every row is checked" + (f". {self.hint}" if self.hint else "")
        )

    def _refuse_unplaced(self, forward: int, start: int, grid: torch.Tensor) -> None:
        """Refuse forward ``forward`` fed neither an attention mask nor ``position_ids`` where the rows it reads (their
        places ``grid``) hold padding of the layout: nothing then tells where its sequences sit in the batch. A batch
        padded on the other side, or holding sequences of other lengths, would put the recorded rows on padding and
        route its own tokens natively at the layout's padding, forcing nothing on them without a word."""
        at = grid.eq(-1).nonzero()
        if not at.numel():  # (no padding in these rows: a mask could not tell more than the row count does)
            return
        row, col = int(at[0, 0]), int(at[0, 1])
        raise TokenMismatchError(
            f"forward {forward} of this replay() reads rows laid out by mr.BatchLayout for a padded batch (the "
            f"layout's padding first at batch position [{row}, {col}], row {start + row * int(grid.shape[1]) + col} "
            "of the routes), but it is fed neither an attention_mask nor position_ids, and the routes know no token "
            "ids: nothing tells that its sequences sit where the layout put them. A batch padded on the other side, "
            "or with other lengths, would take the recorded experts on its padding and route its own tokens "
            "natively. Pass the batch's mask (attention_mask=layout.attention_mask()) or its position_ids "
            "(layout.position_ids()), or give the routes their tokens' ids (with_token_ids on each sequence's "
            "routes before the layout) so that every row is checked" + (f". {self.hint}" if self.hint else "")
        )

    def _places_refused(
        self,
        forward: int,
        start: int,
        wrong: torch.Tensor,
        at: torch.Tensor,
        what: str,
        strides: tuple[int, ...] | None = None,
    ) -> None:
        """The error of :meth:`_refuse_places`: ``wrong`` marks the positions that do not fit (``at``, theirs);
        ``strides``: those of the places' grid over the routes' rows (batch-major where not given)."""
        row, col = int(at[0, 0]), int(at[0, 1])
        step = (int(wrong.shape[1]), 1) if strides is None else (int(strides[0]), int(strides[1]))
        shown = {
            "mask": "its attention mask marks padding where the routes hold a token of a sequence",
            "padding": "its attention mask marks a token where the routes hold the layout's padding (a sequence "
            "longer than its routes: give every token a row, -1 for one no engine routed)",
            "positions": "its position_ids start a new sequence inside a sequence of the routes",
            "starts": "its mrope position_ids start a sequence (0 in every row) where the routes hold a token inside "
            "one, or go on where the routes start one",
            "gaps": "its position_ids put two rows of a sequence, picked out of it with a gap between them (a "
            "context-parallel rank's chunks of each sequence, routes[index]), another distance apart than the routes "
            "hold them (another rank's chunks, or tokens fed as if they followed each other)",
            "values": "it is fed position_ids (and no KV cache, or for rows a capture recorded at the places its "
            "positions gave them, a KV cache's tokens counted), and they put a token at another place in its sequence "
            "than its row holds (nor, with an attention mask, at its column in a batch row holding its sequence from "
            "its first token: positions that count the padding) (a sequence-parallel rank's slice fed another rank's "
            "tokens of the same sequence? mrope position_ids of three rows, whose text after an image goes on from "
            "the image's largest position and not from its place: give them with the text positions first, [4, "
            "batch, seq], as transformers does) (a static KV cache its modules keep lets such positions through where "
            "it holds something at every place before them and the forward writes it at its positions alone)",
            "implied": "it is fed its tokens alone (no position_ids, attention mask or KV cache), so each token is "
            "at its column of its batch row (0, 1, ...), and a token there is at another place in its sequence than "
            "its row holds (a suffix fed without its prefix or KV cache, another rank's slice, chunks fed as if they "
            "followed each other: pass the position_ids the tokens were routed at)",
            "run on": "it is fed no attention mask, and its position_ids run on, one after another, through a batch "
            "row where the routes hold the layout's padding, so they tell nothing of where its sequences start "
            "(pass the batch's attention_mask, or position_ids that restart at each sequence, "
            "layout.position_ids())",
        }[what]
        under = self._positions_under.get(forward)
        if under is not None and what not in ("mask", "padding"):
            shown += (
                f" (its position_ids are the {under}= it was given, taken for its tokens' positions by their name: "
                "where they hold something else than each token's place in its sequence, give the routes their "
                "tokens' ids, routes.with_token_ids(ids), whose rows are then checked by id)"
            )
        where = (
            f"(first at batch position [{row}, {col}], row {start + row * step[0] + col * step[1]} of the routes; "
            f"{int(wrong.sum())} such position(s)), so its tokens would take the experts of other tokens."
        )
        if self.captured:  # (a capture's rows, their ids dropped: each keeps the place it was recorded at)
            raise TokenMismatchError(
                f"forward {forward} of this replay() reads rows a capture recorded at other places of their sequences "
                f"than this batch puts its tokens at: {shown} {where} Their token ids were dropped "
                "(with_token_ids(None): other tokens may take them), not their places. Feed the tokens at the places "
                "they were captured at (a sequence-parallel rank its own slice of the rows), or lay the routes out "
                "for the batch as fed (mr.BatchLayout)" + (f". {self.hint}" if self.hint else "")
            )
        raise TokenMismatchError(
            f"forward {forward} of this replay() reads rows laid out by mr.BatchLayout for another batch: {shown} "
            f"{where} The batch "
            "holds its sequences in another order, with other lengths or padded on the other side than the layout "
            "(a shuffle, verl's rearrange_micro_batches, a re-tokenized prompt). The routes know no token ids to "
            "check each row: build the layout from the batch as fed (its sequences in its order, its padding side), "
            "or give the routes their tokens' ids (routes.with_token_ids(ids)) so that every row is checked"
            + (f". {self.hint}" if self.hint else "")
        )

    def finish(self) -> None:
        """Compare the forwards whose masks or positions were on a device (see :meth:`_check_places`), in order (no
        ids are compared: these routes know none), the calls of the forwards that ran compiled (read on the device, see
        :meth:`_arm_calls_traced`) and those of its last forward (see :meth:`_calls_at_end`)."""
        later, self._places_later = self._places_later, []
        ran, self._static_ran = self._static_ran, {}
        try:
            for forward, start, grid, mask, pos, whole, counts in later:
                try:
                    self._refuse_places(forward, start, grid, mask, pos, whole, counts)
                except TokenMismatchError as e:
                    if forward not in ran:
                        raise
                    raise TokenMismatchError(f"{e}. {_static_ran_note(ran[forward])}") from None
            self._refuse_compiled_places()
        finally:
            self._positions_under = {}
        self._refuse_traced()
        self._calls_at_end()
        if self.each_router is not None:
            self.each_router.finish()

    def _ranked(self, count: int) -> bool:
        """Do the ``count`` rows a forward reads next each know their place in their tokens' order (a capture's rows
        cut through or picked, ``Routes._token_rank``), where the host counts the rows read? Their order is then
        checked against the forward's by :meth:`_check_rank`, and rows read sequence-first need no refusing."""
        at = self.position()
        if self._rank is None or at is None:
            return False
        rank = self._rank[at : at + count]
        return rank.numel() == count and bool((rank >= 0).all())

    def _check_rank(self, count: int, shape: torch.Size | None, order: str) -> None:
        """The rows a ``[batch, positions]`` forward fed ``count`` tokens in ``order`` reads, by their place in their
        tokens' order: in the order its routers see its tokens, or refused (rows whose place is not known pass)."""
        at = self.position()
        if at is None or shape is None or order not in (SEQUENCE_FIRST, BATCH_MAJOR):
            return
        batch, positions = int(shape[0]), int(shape[1])
        rows = batch * positions
        rank = cast(torch.Tensor, self._rank)[at : at + rows]
        if rows != count or rank.numel() != rows:  # (an overdraw is refused by the read)
            return
        untold = rank == UNTOLD_RANK
        if bool(untold.any()) and not self._kept:
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() reads {int(untold.sum())} rows recorded from a forward fed "
                "embeddings of several sequences, in the order its routers saw them, which the capture could not "
                "tell, and these rows were cut from that forward or put in another order (a slice through it, "
                "split_routes, a pick): which of them belong to the tokens of this forward cannot be told. Replay "
                "the whole forwards they were recorded from, in order, or capture the batch fed input_ids"
                + (f". {self.hint}" if self.hint else "")
            )
        if bool((rank < 0).any()):
            return
        want = torch.arange(rows)
        across = order == SEQUENCE_FIRST and not isinstance(
            order, _GridTransposed
        )  # (ids [positions, batch]: in order)
        if across:
            want = want.view(batch, positions).t().reshape(-1)
        if not torch.equal(torch.argsort(torch.argsort(rank)), want):
            raise TokenMismatchError(
                f"forward {self.forwards} of this replay() feeds a [{batch}, {positions}] batch whose routers see its "
                f"tokens {'sequence-first' if across else 'sequence by sequence'}, but the rows it "
                "reads stand in another order of their tokens (rows of a capture that saw a batch of another shape, "
                "cut through one of its forwards by a slice or split_routes, or picked): they would force the experts "
                "of other tokens. Replay the forwards the rows were recorded from, or lay the rows out in token order "
                "first (routes.in_token_order()) and give them their token ids (routes.with_token_ids(ids))"
                + (f". {self.hint}" if self.hint else "")
            )


class OrderNote(FeedCheck):
    """While scores are kept (:meth:`~moe_replay.Session.keep_scores`): each forward of the model, its
    ``[batch, positions]`` and the order its routers see them in (:func:`token_order`, told as for a capture), handed
    to ``began`` as it begins, and ``ended`` called as it ends. A mask of the batch's tokens is put in the order of
    the kept rows with it (:func:`~moe_replay.load_balancing_loss`); nothing is checked or refused here.

    Args:
        began: called with the forward's ``[batch, positions]`` (None where it has none), whether its routers see
            them sequence-first (None where that is not known), and why not known (words, or "").
        ended: called as that forward ends.
        raised: called with the exception a forward raised, at each level it leaves (before ``ended``).
    """

    def __init__(
        self,
        began: Callable[[tuple[int, int] | None, bool | None, str], None],
        ended: Callable[[], None],
        raised: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(torch.zeros(0, dtype=torch.long), lambda: None)
        self._began, self._ended, self._raised = began, ended, raised

    def forward_raised(self, exc: BaseException) -> None:
        """A forward noted here raised ``exc`` (a level of it: called at each level it leaves)."""
        if self._raised is not None:
            self._raised(exc)

    def start(self, levels: Sequence[FeedForward], sources: Sequence[Any] = ()) -> Callable[[], None]:
        """Note the forwards entering ``levels`` in this thread until the returned function is called."""
        self._thread = threading.get_ident()
        return _enter_levels(levels, self)

    def unseen(self) -> None:
        """A forward compiled, traced, captured in a CUDA graph or under a transform: not noted (its decisions, where
        any are kept, are of no forward the session saw)."""

    def fed(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        paired: bool = False,
        order: str = BATCH_MAJOR,
        inputs: _Fed | None = None,
    ) -> bool:
        """A forward entering a level: noted with its ``[batch, positions]`` and the ``order`` its routers see them
        in (:func:`token_order`). Returns whether it is taken here (see :meth:`FeedCheck.fed`)."""
        count, ids, shape = _inputs(args, kwargs) if inputs is None else inputs
        if paired:
            self._began(None, None, " (an encoder-decoder: its routers see two streams of tokens)")
            return True
        if count < 0:
            return False
        grid = None if shape is None else (int(shape[0]), int(shape[1]))
        if grid is None:
            self._began(None, None, " (it was not fed [batch, positions] ids or embeddings)")
        elif min(grid) < 2 or order == BATCH_MAJOR:
            self._began(grid, False, "")
        elif order == SEQUENCE_FIRST:
            self._began(grid, True, "")
        elif order == MIXED:
            self._began(grid, None, " (its routers see its tokens in more than one order, or in one of their own)")
        elif order == UNTOLD and ids is not None:  # (a cache that holds tokens, across processes: read as a capture
            self._began(grid, False, "")  # reads its ids, batch-major)
        elif order == UNTOLD:
            self._began(grid, None, " (it was fed embeddings, and the order could not be told by running it again)")
        else:
            self._began(grid, None, " (its routers' rows do not follow its tokens one to one in either order)")
        return True

    def left(self) -> None:
        """The forward fed last has ended."""
        self._ended()

    def finish(self) -> None:
        """Nothing is left to compare."""


#: what a forward was fed (:func:`_inputs`): its token count, its ids, its ``[batch, positions]``
_Fed = tuple[int, torch.Tensor | None, torch.Size | None]


def _fed_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Was a forward fed token ids or embeddings (as :func:`_inputs` reads them, or as one mapping), not hidden states?
    Read from types and ranks alone (nothing a compiled forward would guard on besides)."""
    ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
    if isinstance(ids, Mapping):
        ids = ids.get("input_ids", ids.get("inputs_embeds"))
        return isinstance(ids, torch.Tensor) and ids.dim() > 0
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() > 0:
        return True
    embeds = kwargs.get("inputs_embeds")
    return isinstance(embeds, torch.Tensor) and embeds.dim() > 1


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Fed:
    """What a forward of the model was fed: its token count (-1 where unknown), its ids (None where it was
    fed embeddings), and its ``[batch, positions]`` shape where it has one."""
    ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
    if (  # (_plain, inline: it runs at every forward of every level)
        isinstance(ids, _TENSOR)
        and not ids.is_floating_point()
        and ids.layout == _STRIDED
        and not ids.is_nested
        and not ids.is_quantized
        and ids.device.type != "meta"
    ):
        shape = ids.shape
        if shape:  # (not 0-d)
            return ids.numel(), ids, shape if len(shape) == 2 else None
    embeds = kwargs.get("inputs_embeds")
    if not _plain(embeds):
        return -1, None, None
    count = int(embeds.shape[:-1].numel()) if embeds.dim() > 1 else -1
    return count, None, embeds.shape[:2] if embeds.dim() == 3 else None


def _flat_shape(ids: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Size | None:
    """The ``[1, tokens]`` shape a forward fed token ids of one dimension (an engine's flat batch, its sequences
    packed end to end, vLLM's) is read as where it is given ``position_ids`` of as many tokens (by their own name or
    one read as theirs: vLLM's ``positions``): they tell each token's place in its sequence, packed sequences
    restarting them, as a packed ``[1, tokens]`` row's do. None otherwise (flat ids given no positions tell no place:
    a decode step's tokens may each be a sequence of its own)."""
    if ids is None or ids.dim() != 1 or ids.numel() < 1:
        return None
    shape = torch.Size((1, int(ids.numel())))
    return shape if _positions_form(kwargs.get("position_ids"), 1, int(shape[1])) is not None else None


def _plain(value: Any) -> TypeGuard[torch.Tensor]:
    """A tensor of plain elements in memory, whose ids or embeddings a forward's records can read: not a nested
    (jagged) tensor, whose batch has no one ``[batch, positions]``, nor a sparse or quantized one, which have no
    strides to read rows by. A forward fed such a tensor is read as fed none: a module below it that is fed plain
    ids (a wrapper that unbinds a jagged batch and calls the model per sequence) takes the forward."""
    return (
        isinstance(value, torch.Tensor)
        and not value.is_nested
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type != "meta"
    )


class _Noting:
    """A cache's row-moving method while a capture watches it: notes the call in the record, then runs as before.

    It sits in the cache's instance dict, and holds the cache and the record by weak
    reference only: a cache that the decode loop drops during the capture (each
    ``generate()`` call makes its own) goes with its tensors at once, as it would unwatched,
    not at the end of the capture or at the next garbage collection.
    """

    __slots__ = ("before", "cache", "name", "record")

    def __init__(self, record: weakref.ref[FeedRecord] | None, name: str, before: Any, cache: weakref.ref[Any]) -> None:
        self.record = record
        self.name = name
        self.before = before  # what the instance dict held under ``name`` before, or None: the class's method
        self.cache = cache

    @inside_forward
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache()
        rec = self.record() if self.record is not None else None
        if rec is not None and rec._active and rec.moved is None:
            rec.moved = f"{type(cache).__name__}.{self.name}"
        return self._run(cache, args, kwargs)

    def _run(self, cache: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The method as it was before it was watched."""
        if self.before is not None:
            return self.before(*args, **kwargs)
        return getattr(type(cache), self.name)(cache, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # a deep copy of the cache (deepcopy keeps it in memo before it copies the instance dict) runs its
        # own method, unwatched: a capture watches it from the first forward it is given to
        copied = memo.get(id(self.cache()))
        if copied is None:
            return self
        rec = self.record() if self.record is not None else None
        if rec is not None:  # (a snapshot of the cache, made while the capture runs)
            rec._copied(copied, self.cache())
        return _Noting(None, self.name, copy.deepcopy(self.before, memo), weakref.ref(copied))

    def __reduce__(self) -> tuple[Any, ...]:
        # a pickled cache: its class's method, looked up on the cache as it is unpickled
        return (getattr, (self.cache(), self.name))


class _Shrinking(_Noting):
    """A cache's method that can take tokens out of it (SHRINKS) while a capture watches it: runs as before, and
    notes in the record a call that took out tokens the capture's forwards had put in (:attr:`FeedRecord.rolled_back`),
    read from the tokens the cache holds before and after the call, whatever its arguments mean (``crop``'s changed
    across transformers versions). A call that takes out nothing (``crop(0)``) notes nothing."""

    __slots__ = ("start",)

    def __init__(
        self, record: weakref.ref[FeedRecord] | None, name: str, before: Any, cache: weakref.ref[Any], start: Any
    ) -> None:
        super().__init__(record, name, before, cache)
        self.start = start  # the tokens the cache held as the capture first watched it

    @inside_forward
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache()
        rec = self.record() if self.record is not None else None
        if rec is None or not rec._active:
            return self._run(cache, args, kwargs)
        held = _tokens_held(cache)
        out = self._run(cache, args, kwargs)
        rec._shrunk(f"{type(cache).__name__}.{self.name}", self.start, held, _tokens_held(cache))
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = memo.get(id(self.cache()))
        if copied is None:
            return self
        rec = self.record() if self.record is not None else None
        if rec is not None:
            rec._copied(copied, self.cache())
        return _Shrinking(None, self.name, copy.deepcopy(self.before, memo), weakref.ref(copied), self.start)


def _plain_tensors(cache: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors of a cache of plain tensors (a list of ``(keys, values)`` per layer), in order."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    if depth > 3 or not isinstance(cache, _LIST_OR_TUPLE):
        return []
    return [t for v in cache for t in _plain_tensors(v, depth + 1)]


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    """The first tensor of a cache of plain tensors (that of :func:`_plain_tensors`, found without listing them), or
    None."""
    if isinstance(value, torch.Tensor):
        return value
    if depth > 3 or not isinstance(value, _LIST_OR_TUPLE):
        return None
    for v in value:
        found = _first_tensor(v, depth + 1)
        if found is not None:
            return found
    return None


def _row_sample(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A few values of ``t`` (batch rows along its dimension 0) at every token (along ``dim``): the first
    ``_SAMPLED`` along its last dimension (the first along the others), a view ``[batch, tokens, ...]``. Rows that hold
    other tokens differ there (a first layer's keys and values are their tokens' at their positions)."""
    index: list[Any] = [slice(None)] * t.dim()
    for i in range(1, t.dim()):
        if i != dim:
            index[i] = slice(0, _SAMPLED) if i == t.dim() - 1 else 0
    return t[tuple(index)]


def _rows_elsewhere(given: torch.Tensor, returned: torch.Tensor) -> torch.Tensor:
    """Does a batch row of ``given`` hold what another row of ``returned`` holds, and not what its own does (the rows
    moved between them)? Two samples of :func:`_row_sample`; a 0-d bool tensor on their device (no host sync)."""
    g, r = _row_hash(given), _row_hash(returned)
    same = g[:, None] == r[None, :]
    return (~same.diagonal() & same.any(dim=1)).any()


def _row_hash(rows: torch.Tensor) -> torch.Tensor:
    """One integer per batch row of ``rows`` from the bytes of its values (equal rows, equal integers; other rows,
    others but by a chance of one in 2**64): int64 arithmetic, exact in any order of summing."""
    bits = rows.reshape(rows.shape[0], -1).contiguous().view(torch.uint8).long()  # (any dtype's bytes, any device)
    weights = torch.arange(1, bits.shape[1] + 1, device=bits.device, dtype=torch.int64) * 2654435761 + 40503
    return (bits * weights).sum(dim=1)


def _returned_cache(out: Any) -> list[Any] | tuple[Any, ...] | None:
    """The cache of plain tensors a forward returned under the first of the names a cache is given by that it
    returns, or None (a cache object, such as transformers' ``DynamicCache``, is none: no other name is read)."""
    found = _returned_object(out)
    return found if isinstance(found, _LIST_OR_TUPLE) and found else None


def _returned_object(out: Any) -> Any:
    """The KV cache a forward returned under the first of the names a cache is given by that it returns (a cache
    object or one of plain tensors), or None."""
    mapping = isinstance(out, dict)
    for name in _CACHE_NAMES:
        try:
            found = out.get(name) if mapping else getattr(out, name, None)
        except Exception:  # (an output object whose attribute raises: it says nothing)
            return None
        if found is not None:
            return found
    return None


def _count_now(cache: Any) -> int:
    """The tokens a KV cache holds now where it counts them on the host (``get_seq_length()`` an int), else -1: read at
    every forward, so never a static cache's device count (no copy, no kernel)."""
    try:  # (none, one that is no method, or a cache of one's own whose count fails: it says nothing)
        held = type(cache).get_seq_length(cache)
    except Exception:
        return -1
    return held if type(held) is int else -1


def _tokens_held(cache: Any) -> int | torch.Tensor | None:
    """The tokens a KV cache held as a forward was given it (``get_seq_length()``): an int, or a 0-d tensor read
    later (a static cache counts on its device: no host sync here); -1 where it does not say."""
    count = getattr(type(cache), "get_seq_length", None)
    if not callable(count):
        return -1
    try:
        held = count(cache)
    except Exception:  # (a cache of one's own whose count fails: it says nothing, the forward runs on)
        return -1
    if isinstance(held, torch.Tensor) and held.numel() == 1 and not held.is_floating_point():
        return held.detach().reshape(()).clone()  # (a static cache counts in place: its count now, not later)
    return held if isinstance(held, int) and not isinstance(held, bool) else -1


def _attended(mask: torch.Tensor) -> torch.Tensor | None:
    """Which keys each query of a ``[batch, heads, queries, keys]`` attention mask attends, read from its first head
    (``[batch, queries, keys]``): a boolean mask as it is, an additive float one where it is not a large negative number
    (or -inf). None for a mask of another kind."""
    if mask.dtype == torch.bool:
        return mask[:, 0]
    if mask.is_floating_point():  # additive: 0 where attended, a large negative number (or -inf) where not
        return mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return None


def _tokens_of_4d(mask: torch.Tensor, batch: int, width: int) -> torch.Tensor | None:
    """Which of the ``width`` tokens of each sequence a forward fed are tokens (1) or padding (0), read from the
    ``[batch, heads, queries, keys]`` attention mask it was given (``generate()`` with a static cache gives one);
    -1 for a sequence whose mask is not that of a prompt forward, None where the mask is of no known kind.

    A token attends to itself and padding to nothing, under a causal or a sliding-window mask alike: query
    ``i``'s own key is key ``i`` in a forward whose tokens start the cache. A sequence one of whose queries
    attends to a later key (a forward after cached tokens, whose own keys come later; a row of padding
    unmasked to attend everything; a bidirectional mask) is not read. On the device: no host sync.
    """
    if mask.shape[0] != batch or mask.shape[2] != width or mask.shape[3] < width:
        return None
    attend = _attended(mask)
    if attend is None:
        return None
    queries = torch.arange(width, device=mask.device)
    keys = torch.arange(mask.shape[3], device=mask.device)
    later = (attend & (keys[None, None, :] > queries[None, :, None])).flatten(1).any(dim=1)
    own = attend[:, queries, queries]
    return torch.where(later[:, None], -1, own.to(torch.int8))


def _tokens_fed(mask: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """Which of the ``[batch, positions]`` ``ids`` a forward feeds as tokens of a sequence (1) or as padding (0), -1
    where not known, from its attention ``mask``; None where the mask is of no known kind. No mask: every position
    is a token. On the device: no host sync."""
    if ids.dim() != 2:
        return None
    batch, width = ids.shape
    if mask is None:
        return torch.ones(batch, width, dtype=torch.int8, device=ids.device)
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 4:
        return _tokens_of_4d(mask, batch, width)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < width:
        return None
    mask = mask[:, -width:]
    if not mask.is_floating_point():
        return (mask != 0).to(torch.int8)
    ones = mask == 1  # a float mask of 0s and 1s (with a 1) as an integer one; any other is additive (0: a token)
    zero_one = ones.any() & (ones | (mask == 0)).all()
    return torch.where(zero_one, ones, mask > torch.finfo(mask.dtype).min / 2).to(torch.int8)


#: a row's place ``p`` after tokens of a KV cache that no forward of its capture built (a prefill run before the
#: capture, a cache filled by hand) is kept as ``AFTER_OUTSIDE - p`` (see ``Routes._seq_pos``): its place is checked,
#: and the origin of the cache a replay gives its forward is not (the capture's was not known either)
AFTER_OUTSIDE = -2


def unmarked_places(places: torch.Tensor) -> torch.Tensor:
    """``places`` (``Routes._seq_pos``) with the places marked :data:`AFTER_OUTSIDE` read as plain places."""
    return torch.where(places <= AFTER_OUTSIDE, AFTER_OUTSIDE - places, places)


class _Built:
    """The KV caches that forwards of one capture or replay block were given or returned, each with the row of the
    routes the rows of the forwards that built it end at (-1 where not counted): cache objects by id (weakly), caches
    of plain tensors (a list of ``(keys, values)`` per layer, not weakly referable) by their first tensor's (address,
    shape). A cache of plain tensors freed and another made at the same address and of the same shape reads as noted
    (a cache of another origin is then not told apart)."""

    __slots__ = ("objects", "plain")

    def __init__(self) -> None:
        self.objects: dict[int, tuple[weakref.ref[Any], int]] = {}
        self.plain: dict[tuple[int, tuple[int, ...]], int] = {}

    def holds(self, cache: Any) -> bool:
        """Was ``cache`` noted?"""
        return self.end_of(cache) is not None

    def end_of(self, cache: Any) -> int | None:
        """The row the forwards that built ``cache`` end at, where it was noted (-1: not counted); else None."""
        if isinstance(cache, _LIST_OR_TUPLE):
            first = _first_tensor(cache)
            return None if first is None else self.plain.get((first.data_ptr(), tuple(first.shape)))
        held = self.objects.get(id(cache))
        return held[1] if held is not None and held[0]() is cache else None

    def keep_older(self, older: _Built) -> None:
        """Keep the cache objects ``older`` (an earlier replay block's, of the same capture) noted that this one did
        not note, and that are alive: a cache a later block has is compared by what the block that had it last did.
        Caches of plain tensors are not kept (told by their address, which a freed one's successor may take)."""
        for key, (ref, end) in older.objects.items():
            if key not in self.objects and ref() is not None:
                self.objects[key] = (ref, end)

    def note(self, cache: Any, end: int = -1) -> int | None:
        """Note ``cache`` (None: nothing), built by forwards whose rows end at row ``end``; returns what
        :meth:`end_of` read of it before (one lookup where a caller reads it, then notes it)."""
        if cache is None:
            return None
        if isinstance(cache, _LIST_OR_TUPLE):
            first = _first_tensor(cache)
            if first is None:
                return None
            key = (first.data_ptr(), tuple(first.shape))
            was = self.plain.get(key)
            self.plain[key] = end
            return was
        held = self.objects.get(id(cache))
        if held is not None and held[0]() is cache:
            if held[1] != end:
                self.objects[id(cache)] = (held[0], end)
            return held[1]
        try:
            self.objects[id(cache)] = (weakref.ref(cache), end)
        except TypeError:  # (no weak reference to it: not noted; a later forward given it reads it as another's)
            pass
        return None


class _Made:
    """The KV caches that forwards of one capture or replay block were given or returned, each with the forward (an
    index, or the row of the routes it began at) that was the latest to (see ``_Forward.parent``): cache objects by
    identity, caches of plain tensors (a list of ``(keys, values)`` per layer) by the identity of their first tensor
    (a forward that grows the cache returns new tensors; one given the tensors of another loop's cache is told by
    them). Both held weakly: a freed one is never read as another."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: dict[int, tuple[weakref.ref[Any], int]] = {}

    def end_of(self, cache: Any) -> int | None:
        """The forward noted with ``cache`` (-1: not counted), or None where it was not noted."""
        key = _first_tensor(cache) if isinstance(cache, _LIST_OR_TUPLE) else cache
        held = None if key is None else self.held.get(id(key))
        return held[1] if held is not None and held[0]() is key else None

    def keep_older(self, older: _Made) -> None:
        """Keep what ``older`` (an earlier replay block's, of the same capture, counted in its rows) noted of the
        caches this one did not note, where they are alive (see :meth:`_Built.keep_older`)."""
        for key, (ref, forward) in older.held.items():
            if key not in self.held and ref() is not None:
                self.held[key] = (ref, forward)

    def note(self, cache: Any, forward: int) -> int | None:
        """Note ``cache`` (None: nothing) as the forward ``forward``'s; returns what :meth:`end_of` read of it before
        (one lookup where a caller reads it, then notes it)."""
        key = _first_tensor(cache) if isinstance(cache, _LIST_OR_TUPLE) else cache
        if key is None:
            return None
        held = self.held.get(id(key))
        if held is not None and held[0]() is key:
            self.held[id(key)] = (held[0], forward)
            return held[1]
        try:
            self.held[id(key)] = (weakref.ref(key), forward)
        except TypeError:  # (no weak reference to it: it has no lineage)
            pass
        return None


def _note_object(made_by: _Made, cache: Any, forward: int) -> None:
    """Note in ``made_by`` that the forward (or row) ``forward`` was given or returned ``cache`` (None: nothing)."""
    if cache is not None:
        made_by.note(cache, forward)


def _given_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward is given by name, or None."""
    return next(filter(_GIVEN, map(kwargs.get, _CACHE_NAMES)), None)


def _batch_alone(args: tuple[Any, ...], kwargs: dict[str, Any], shape: torch.Size) -> bool:
    """Whether a ``[batch, positions]`` forward is given nothing that may hold tokens before its own but a KV cache
    under a known name (read by :func:`_cache_held`): no argument that :func:`_may_hold_tokens` may (its ids,
    embeddings, labels, a mask, position_ids, a count, ``cu_seqlens``, a dataclass of such may not), and
    ``cache_position`` read as that of a forward given no cache only where it starts at 0. A cache given under a name
    of its own (``kv_cache``, ``layer_past``, ``inference_params``: keys and values stacked in one tensor, a list,
    mapping or object holding them, a module) makes the positions fed no longer each token's place in what it
    attends. A name says more than a shape: one that names a cache (:data:`_CACHE_LIKE`) may hold earlier tokens
    in a tensor of two dimensions or more (a latent cache's ``[layers, batch, past, rank]``, a list of ``[past,
    hidden]``), one that names media (:data:`_MEDIA`: a video's 5-d pixels, a list of 3-d images) holds none."""
    lead = tuple(int(d) for d in shape[:2])
    for name, value in chain(enumerate(args), kwargs.items()):
        if name in _CACHE_NAMES:
            continue
        if name == "cache_position" and isinstance(value, torch.Tensor) and value.dim() == 1:
            if value.numel() != lead[1] or (value.device.type == "cpu" and value.numel() and int(value[0]) != 0):
                return False
            continue
        named = name if isinstance(name, str) else ""
        if _MEDIA.search(named) or _fixed_past(named, value):
            continue
        if _may_hold_tokens(value, least=(2, 2) if _CACHE_LIKE.search(named) else (5, 3)):
            return False
    return True


def _one_token_rows_placed(args: tuple[Any, ...], kwargs: dict[str, Any], shape: torch.Size) -> bool:
    """Whether the ``position_ids`` of a ``[batch, 1]`` forward place its tokens: fed no attention mask and nothing
    that may hold earlier tokens (a KV cache, by name or shape), each row is a sequence of one token at its position,
    as a forward fed its tokens sequence-first (``[positions, 1]``) reads them. A decode step given its cache is
    not compared by value."""
    return kwargs.get("attention_mask") is None and _cache_held(kwargs) == 0 and _batch_alone(args, kwargs, shape)


def _tokens_alone(args: tuple[Any, ...], kwargs: dict[str, Any], shape: torch.Size) -> bool:
    """Whether a ``[batch, positions]`` forward is given its tokens (ids or embeddings: the first tensor of that lead)
    and nothing else but ``labels``, flags and ``None``: nothing that may say where its tokens sit (positions under a
    name of its own, ``input_pos``, a count, a cache, ``cu_seqlens``), so each token is at its column of its batch
    row, as a model that counts positions from 0 puts it."""
    lead = tuple(int(d) for d in shape[:2])
    seen = False
    for name, value in chain(enumerate(args), kwargs.items()):
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == lead and (not seen or name == "labels"):
            seen = True
            continue
        return False
    return seen


#: the floating tensors of five dimensions or more given by a name that names neither media nor a cache (a video's
#: ``frames``, OpenFlamingo's ``vision_x``; or keys and values stacked in one tensor), by (name, shape, dtype), and the
#: first positions of the forwards given them (see :func:`_note_past`); at most :data:`_PAST_KEYS` of them
_PAST_SEEN: dict[tuple[str, tuple[int, ...], torch.dtype], set[int]] = {}
_PAST_KEYS = 256
#: of those, the ones whose tensor a forward given it wrote in place while it ran (a KV cache stacked in one
#: preallocated tensor, which each forward writes at its positions: a video's frames are read by the forward, and a
#: buffer the caller refills with the next clip between forwards is written by no forward); and the tensors noted
#: by forwards that have not ended yet, each with its key and version counter as the forward began (see
#: :func:`_past_ended`)
_PAST_WRITTEN: set[tuple[str, tuple[int, ...], torch.dtype]] = set()
_PAST_OPEN: list[_PastOpen] = []


class _PastOpen:
    """A floating tensor of five dimensions or more under a name of its own, noted as a forward fed positions
    ``first..last`` began (:func:`_note_past`): its version counter then, and the sum of its magnitudes at each index
    of each dimension that reaches past ``last`` (where a cache stacked in one tensor keeps its places), so that
    :meth:`written_at_positions` tells, once the forward has ended, whether it wrote it as such a cache is written."""

    __slots__ = ("first", "given", "key", "last", "sums", "version")

    def __init__(
        self, key: tuple[str, tuple[int, ...], torch.dtype], value: torch.Tensor, first: int, last: int
    ) -> None:
        self.key, self.given, self.first, self.last = key, weakref.ref(value), first, last
        self.version = version_of(value)
        self.sums = {d: _index_sums(value, d) for d in range(value.dim()) if int(value.shape[d]) > last + 1 - first}

    def written_at_positions(self, value: torch.Tensor) -> bool:
        """Whether the forward that ran since wrote ``value`` in place at its positions alone along one of the noted
        dimensions (the indices whose sums moved lie within ``first..last``, and that dimension has others): a frame
        normalized in place, written whole or where no position is, tells nothing. Where no value moved (a replay
        writing what a capture wrote), only a dimension holding nothing after ``last`` is read as written there, as
        :meth:`_HeldCache.written` reads it."""
        if version_of(value) == self.version:
            return False
        for d, before in self.sums.items():
            if int(value.shape[d]) <= self.last:
                continue
            moved = _index_sums(value, d).ne(before).nonzero().flatten()
            if not moved.numel():
                if not bool(before[self.last + 1 :].ne(0).any()) and self.first > 0:
                    return True
                continue
            if int(moved[0]) >= self.first and int(moved[-1]) <= self.last:
                return True
        return False


def _note_past(kwargs: dict[str, Any], shape: torch.Size | None) -> None:
    """Note the first position a forward of ``shape`` is fed (its ``position_ids`` on the host) beside each floating
    tensor of five dimensions or more it is given under a name of its own: a KV cache stacked in one tensor holds the
    tokens before the positions, so one of its dimensions grows as they start later (or it is preallocated: a static
    cache, whose name says so where the checks are to read it as one). The same name and shape seen beside two first
    positions is no cache (:func:`_fixed_past`), whatever the name, unless a forward given it wrote it in place
    while it ran (:func:`_past_ended`), as a cache is written at each forward's positions."""
    pos = kwargs.get("position_ids")
    if shape is None or not isinstance(pos, torch.Tensor):
        return
    # (in C, no frame per input: nearly every forward is given no tensor of five dimensions, nothing to read below)
    if max(map(_DIM, filter(_IS_TENSOR, kwargs.values())), default=0) < 5:
        return
    given = [
        (name, value)
        for name, value in kwargs.items()
        if isinstance(value, torch.Tensor)
        and value.dim() >= 5
        and value.is_floating_point()
        and name not in _CACHE_NAMES
        and not _CACHE_LIKE.search(name)
        and not _MEDIA.search(name)
    ]
    if not given:  # (nearly every forward: its positions are not read for this)
        return
    text = _text_positions(pos, int(shape[0]), int(shape[1]))
    if text is None or text.device.type != "cpu" or not text.numel():
        return
    first, last = int(text[:, 0].min()), int(text.max())
    for name, value in given:
        key = (name, tuple(int(n) for n in value.shape), value.dtype)
        starts = _PAST_SEEN.get(key)
        if starts is None:
            if len(_PAST_SEEN) >= _PAST_KEYS:
                continue
            starts = _PAST_SEEN[key] = set()
        fixed = len(starts) > 1  # (seen beside two starts before this forward, never written at its positions)
        if not fixed:
            starts.add(first)
        if not fixed and key not in _PAST_WRITTEN and len(_PAST_OPEN) < _PAST_KEYS:
            if any(int(n) > last + 1 for n in value.shape):  # (else no dimension keeps places past these)
                _PAST_OPEN.append(_PastOpen(key, value, first, last))


def _past_ended(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A forward given ``args`` and ``kwargs`` has ended: each tensor noted as it began (:func:`_note_past`) that it
    was given and that it wrote in place at its positions alone while it ran (:meth:`_PastOpen.written_at_positions`)
    is a cache, as a static cache stacked in one tensor is (:func:`_fixed_past`). Writes between forwards (a buffer
    refilled with the next clip of a video) are no forward's, and writes elsewhere (frames normalized in place) are
    no cache's: they tell nothing. Called only where some are open."""
    given = {id(v) for v in chain(args, kwargs.values()) if isinstance(v, torch.Tensor)}
    still = []
    for noted in _PAST_OPEN:
        value = noted.given()
        if value is None:
            continue
        if id(value) not in given:  # (an outer forward's, still running)
            still.append(noted)
        elif noted.written_at_positions(value):
            _PAST_WRITTEN.add(noted.key)
    _PAST_OPEN[:] = still


def _fixed_past(name: str, value: Any) -> bool:
    """Whether ``value``, given to a forward under ``name``, is a floating tensor whose name and shape were seen
    beside forwards whose positions start at two places (:func:`_note_past`): no dimension of it counts the tokens
    before a forward's own, so it holds none (a video's frames under a name of its own), as a cache would. One that a
    forward given it wrote in place while it ran is a cache preallocated for every place (a static cache stacked in
    one tensor), not fixed media; one the caller refilled between forwards (the next clip) is still media."""
    if not isinstance(value, torch.Tensor) or value.dim() < 5 or not value.is_floating_point():
        return False
    key = (name, tuple(int(n) for n in value.shape), value.dtype)
    starts = _PAST_SEEN.get(key)
    return starts is not None and len(starts) > 1 and key not in _PAST_WRITTEN


#: names of a forward's inputs that hold media (pixels, audio features, their grids and masks), never a token of a
#: sequence before the forward's own
_MEDIA = re.compile(r"^(pixel|image|video|audio|input_features|feature_attention_mask)|_grid_thw$")
#: names of a forward's inputs that say they hold a KV cache (under a name of its own: ``kv_cache``,
#: ``layer_past``, ``inference_params``)
_CACHE_LIKE = re.compile(r"^(?!cache_position$).*(cache|past|(^|_)kv(_|$)|inference_params)")


def _counts_given(args: tuple[Any, ...], kwargs: dict[str, Any], shape: torch.Size) -> tuple[int, ...]:
    """The counts a ``[batch, positions]`` forward is given beside its tokens, as plain ints of its own arguments
    (Llama's reference ``start_pos``, a ``past_length``, an ``offset``): each above 0 and none that is its own token
    count (``positions`` or ``batch * positions``: a sequence-parallel rank's slice length, a ``max_seqlen``, which
    equals where rank 1's positions start)."""
    own = {int(shape[1]), int(shape[0]) * int(shape[1])}
    return tuple(dict.fromkeys(v for v in chain(args, kwargs.values()) if type(v) is int and v > 0 and v not in own))


#: how many modules :func:`_kept_counts` reads at most, and the attributes of every module that are torch's own state
#: (its parameters', buffers' and submodules' dicts, its hooks, a forward's wrapper)
_KEPT_MODULES = 4096
_MODULE_STATE = frozenset(vars(nn.Module())) | {"forward"}


def _kept_counts(levels: Sequence[FeedForward]) -> frozenset[int]:
    """The tokens each KV cache the models of ``levels`` keep themselves holds, where it counts them on the host: an
    attribute of one of their modules (not a parameter, buffer or submodule) holding a cache object whose
    ``get_seq_length()`` is an int, or a list of ``(keys, values)`` whose first tensor is a floating ``[batch, heads,
    tokens, head_dim]`` one (a model that keeps its last forward's ``past_key_values`` and is told how many tokens it
    holds by a count). Static caches kept in buffers or preallocated attributes count nothing here."""
    out: set[int] = set()
    for level in levels:
        for i, m in enumerate(level.module.modules()):
            if i >= _KEPT_MODULES:
                break
            for k, v in vars(m).items():
                if k in _MODULE_STATE or type(v) in _NO_TOKENS or isinstance(v, nn.Module | torch.Tensor | type):
                    continue
                if isinstance(v, _LIST_OR_TUPLE):
                    first = _first_tensor(v)
                    if first is not None and first.dim() == 4 and first.is_floating_point():
                        out.add(int(first.shape[-2]))
                elif callable(getattr(type(v), "get_seq_length", None)) and (held := _count_now(v)) > 0:
                    out.add(held)
    return frozenset(out)


class _HeldCache:
    """A floating tensor a model's module keeps (a buffer, or a plain attribute as Meta's Llama reference keeps its
    ``cache_k``) that holds something at every index before ``first`` along its dimension ``dim`` before a forward
    fed positions ``first..last`` runs: a static KV cache may hold the tokens before them there. :meth:`written`
    tells, when the forward has ended, whether it wrote the tensor at those positions and nowhere else along ``dim``,
    as a static cache is written (gpt-fast's ``k_cache[:, :, input_pos] = k``, Meta's ``cache_k[:, start_pos:...]``,
    torchtune's at its ``cache_pos``): a rotary table, a mask, a batch dimension, a cache written elsewhere or not at
    all tell nothing."""

    def __init__(self, name: str, tensor: torch.Tensor, dim: int, sums: torch.Tensor, first: int, last: int) -> None:
        #: where the model keeps it (``layers.0.attn.kv_cache.k_cache``), for the error of a forward refused after it
        #: ran
        self.name = name
        self.tensor, self.dim, self.sums, self.first, self.last = tensor, dim, sums, first, last
        self.version = version_of(tensor)
        #: per other dimension of the tensor: which of its slices held something at every index before ``first``,
        #: and each slice's sum of magnitudes at ``first..last``, before the forward (see :meth:`written`)
        self.slices = _slice_sums(tensor, dim, first, last)

    def written(self) -> bool:
        """Whether the forward that ran since wrote the tensor (its version moved) and changed it along :attr:`dim` at
        its positions alone (the indices whose sum of magnitudes moved). Where it wrote the very values it held (a
        replay of the forward a capture saw, on a cache not put back), its values cannot tell where it wrote: a rotary
        table or a mask rewritten whole in place at each forward moves no value either. Such a write is read as one at
        its positions only where the tensor holds nothing after them, as a cache that holds the tokens up to the
        forward's last does, and a table does not."""
        if version_of(self.tensor) == self.version:
            return False
        moved = _index_sums(self.tensor, self.dim).ne(self.sums).nonzero().flatten()
        if not moved.numel():
            return not bool(self.sums[self.last + 1 :].ne(0).any())
        if int(moved[0]) < self.first or int(moved[-1]) > self.last:
            return False
        # (and only in slices that held the tokens before: a batch row written in a slot that held nothing beside
        # a slot holding another sequence's stale prefix was fed without the tokens before it)
        now = _slice_sums(self.tensor, self.dim, self.first, self.last)
        return all(
            bool(held.logical_or(after.eq(before)).all())
            for (held, before), (_, after) in zip(self.slices, now, strict=True)
        )


class _ListedCache(_HeldCache):
    """A Python list of floating tensors a model's module keeps (a hand-written decode loop's KV cache, each forward's
    keys appended) whose tensors together hold exactly ``first`` indices along their dimension ``dim``, something at
    each, before a forward fed positions ``first..last`` runs: it may hold the tokens before them. :meth:`written`
    tells, when the forward has ended, whether it kept those tensors and appended ones that hold as many indices
    along ``dim`` as it has positions, or replaced its last by one grown by concatenation to as many more, as such a
    cache is written."""

    def __init__(self, name: str, kept: list[Any], dim: int, first: int, last: int) -> None:
        self.name, self.dim, self.first, self.last = name, dim, first, last
        self.kept, self.held = kept, list(kept)
        self.version = version_of(kept[-1])

    def written(self) -> bool:
        """Whether the list still starts with the tensors it held, and what the forward appended holds its positions'
        count of indices along :attr:`dim` (tensors of the same other dimensions); or whether it holds as many tensors,
        the same but its last, replaced by one that starts with the last's values (unwritten) and holds that many more
        (``keys[-1] = torch.cat([keys[-1], k], dim)``)."""
        n = len(self.held)
        if len(self.kept) == n and all(a is b for a, b in zip(self.kept[:-1], self.held[:-1], strict=False)):
            now, old = self.kept[-1], self.held[-1]
            return (
                now is not old
                and _like(now, old, self.dim)
                and version_of(old) == self.version
                and int(now.shape[self.dim]) == int(old.shape[self.dim]) + self.last - self.first + 1
                and torch.equal(now.detach().narrow(self.dim, 0, int(old.shape[self.dim])), old.detach())
            )
        if len(self.kept) <= n or any(a is not b for a, b in zip(self.kept[:n], self.held, strict=False)):
            return False
        added = self.kept[n:]
        return all(_like(t, self.held[0], self.dim) for t in added) and sum(int(t.shape[self.dim]) for t in added) == (
            self.last - self.first + 1
        )


class _GrownCache(_HeldCache):
    """A floating tensor a module keeps under attribute ``attr`` (a plain attribute or a buffer) that holds exactly
    ``first`` indices along its dimension ``dim``, something at each, before a forward fed positions ``first..last``
    runs: a KV cache grown by concatenation (``self.k = torch.cat([self.k, k], 1)``) may hold the tokens before them.
    :meth:`written` tells, when the forward has ended, whether the module then keeps there a new tensor that starts
    with the one it held, unchanged, and reaches the last position, as such a cache is grown."""

    def __init__(
        self, name: str, module: nn.Module, attr: str, held: torch.Tensor, dim: int, first: int, last: int
    ) -> None:
        self.name, self.module, self.attr, self.dim, self.first, self.last = name, module, attr, dim, first, last
        self.held, self.version = held, version_of(held)

    def written(self) -> bool:
        """Whether the module keeps under :attr:`attr` a tensor other than the one it held, of its other dimensions,
        holding ``last + 1`` indices along :attr:`dim`, the first ``first`` of them the held tensor's values (which
        the forward did not write)."""
        m = self.module
        now = m._buffers[self.attr] if self.attr in m._buffers else vars(m).get(self.attr)
        if (
            not isinstance(now, torch.Tensor)
            or now is self.held
            or not _like(now, self.held, self.dim)
            or version_of(self.held) != self.version
        ):
            return False
        return int(now.shape[self.dim]) == self.last + 1 and torch.equal(
            now.detach().narrow(self.dim, 0, self.first), self.held.detach()
        )


def _like(t: Any, ref: torch.Tensor, dim: int) -> bool:
    """Whether ``t`` is a floating tensor of ``ref``'s dimensions, the same size as it along each but ``dim``."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dim() == ref.dim()
        and not t.is_meta
        and all(int(t.shape[d]) == int(ref.shape[d]) for d in range(t.dim()) if d != dim)
    )


def _listed_held(name: str, kept: list[Any], first: int, last: int, batch: int) -> list[_HeldCache]:
    """``kept`` as a cache holding the tokens before positions ``first..last`` (see :class:`_ListedCache`), along
    each dimension where its tensors (floating, of two dimensions or more, alike but along it) hold exactly ``first``
    indices together, something at each of them in as many slices as the forward has sequences
    (:func:`_held_per_slice`); none where it holds anything else or more than ``_HOLDS_ITEMS`` items."""
    if not kept or len(kept) > _HOLDS_ITEMS or not isinstance(kept[0], torch.Tensor) or kept[0].dim() < 2:
        return []
    out: list[_HeldCache] = []
    for dim in range(kept[0].dim()):
        if not all(_like(t, kept[0], dim) for t in kept) or sum(int(t.shape[dim]) for t in kept) != first:
            continue
        whole = torch.cat([t.detach() for t in kept], dim)
        if bool(_index_sums(whole, dim).ne(0).all()) and _held_per_slice(whole, dim, first, batch):
            out.append(_ListedCache(name, kept, dim, first, last))
    return out


def _static_ran_note(names: Sequence[str]) -> str:
    """What the error of a forward refused as its block ends, after it ran on the evidence of the static caches
    ``names`` (see :class:`_HeldCache`), adds: that it ran, why, and what it left written."""
    names = list(dict.fromkeys(names))  # (a tensor held along two dimensions is named once)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (
        "This forward ran before it was refused: tensors its modules keep held something at every place before its "
        f"positions, as a static KV cache holding the tokens before them does ({shown}), but it wrote none of them at "
        "its positions alone, so nothing tells that they hold those tokens. What it wrote stays in them (a static "
        "cache now holds this forward's keys and values, a cache's own count has moved on): reset or refill them "
        "before the next forward"
    )


def _slice_sums(t: torch.Tensor, dim: int, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each dimension of ``t`` but ``dim``: which of its slices hold something at every index before ``first``
    along ``dim``, and each slice's sum of magnitudes at the indices ``first..last`` along ``dim`` (on the host)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        whole = t.detach().abs()
        head = whole.narrow(dim, 0, first)
        span = whole.narrow(dim, first, last - first + 1)
        for other in range(t.dim()):
            if other == dim:
                continue
            rest = [d for d in range(t.dim()) if d not in (dim, other)]
            held = head.sum(dim=rest, dtype=torch.float64) if rest else head.double()
            held = held.ne(0).all(dim=0 if dim < other else 1)
            sums = span.movedim(other, 0).reshape(int(t.shape[other]), -1).sum(1, dtype=torch.float64)
            out.append((held.cpu(), sums.cpu()))
    return out


def _index_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum of magnitudes of ``t`` at each index of its dimension ``dim`` (0 where it holds nothing), on the host."""
    with torch.no_grad():
        return t.detach().abs().movedim(dim, 0).reshape(int(t.shape[dim]), -1).sum(1, dtype=torch.float64).cpu()


def _held_per_slice(t: torch.Tensor, dim: int, first: int, batch: int) -> bool:
    """Whether ``t`` holds something at every index before ``first`` along ``dim`` in at least ``batch`` slices of
    each other dimension that has that many (its batch dimension among them, wherever it is): a cache that holds the
    prefix of some sequences only sums to something at every place all the same. The slices that hold it are
    counted, not looked for first: a cache larger than the batch may keep a sequence in any of its slots (Meta's
    ``cache_k[:bsz]`` keeps them first, a slot allocator anywhere)."""
    with torch.no_grad():
        head = t.detach().narrow(dim, 0, first).abs()  # (the places before the positions alone)
        for other in range(t.dim()):
            if other == dim or int(t.shape[other]) < batch:
                continue
            rest = [d for d in range(t.dim()) if d not in (dim, other)]
            sums = head.sum(dim=rest, dtype=torch.float64) if rest else head.double()
            holding = sums.ne(0).all(dim=0 if dim < other else 1)  # (per slice of ``other``: every place held)
            if int(holding.sum()) < batch:
                return False
    return True


def _static_held(levels: Sequence[FeedForward], text: torch.Tensor, batch: int) -> list[_HeldCache]:
    """The tensors the modules of ``levels`` keep (buffers, and plain tensor attributes that are not parameters:
    floating, of two dimensions or more) that may be a static KV cache holding the tokens before the positions
    ``text`` (``[1 or batch, positions]``, the first above 0) for each of the forward's ``batch`` sequences: along a
    dimension that reaches the last position, each holds something at every index before the first (see
    :class:`_HeldCache`), and does so in as many slices as there are sequences along each of its other dimensions
    that has that many (:func:`_held_per_slice`: a batch row whose slot holds nothing beside one that holds its
    prefix is a sequence fed without the tokens before it); the tensors they keep that hold exactly the places before
    the positions, something at each (a cache grown by concatenation, see :class:`_GrownCache`); and the Python lists
    of tensors they keep that hold exactly those places together (:func:`_listed_held`). Read only for a forward
    whose positions would be refused otherwise: it reads those tensors on the host."""
    if not text.numel():
        return []
    first, last = int(text.min()), int(text.max())
    if first <= 0:
        return []
    out: list[_HeldCache] = []
    seen: set[int] = set()
    for level in levels:
        for i, (at, m) in enumerate(level.module.named_modules()):
            if i >= _KEPT_MODULES:
                break
            kept = chain(m._buffers.items(), ((k, v) for k, v in vars(m).items() if k not in _MODULE_STATE))
            for name, t in kept:
                if isinstance(t, list) and id(t) not in seen:
                    seen.add(id(t))
                    out.extend(_listed_held(f"{at}.{name}" if at else name, t, first, last, batch))
                    continue
                if (
                    not isinstance(t, torch.Tensor)
                    or isinstance(t, nn.Parameter)
                    or id(t) in seen
                    or not t.is_floating_point()
                    or t.dim() < 2
                    or t.is_meta
                ):
                    continue
                seen.add(id(t))
                for dim in range(t.dim()):
                    if int(t.shape[dim]) > last:
                        sums = _index_sums(t, dim)
                        if bool(sums[:first].ne(0).all()) and _held_per_slice(t, dim, first, batch):
                            out.append(_HeldCache(f"{at}.{name}" if at else name, t, dim, sums, first, last))
                    elif int(t.shape[dim]) == first:  # (a cache grown by concatenation: see _GrownCache)
                        if bool(_index_sums(t, dim).ne(0).all()) and _held_per_slice(t, dim, first, batch):
                            out.append(_GrownCache(f"{at}.{name}" if at else name, m, name, t, dim, first, last))
    return out


#: how deep the lists, mappings and plain objects a forward is given are read for a tensor that may hold earlier
#: tokens, and how many items of each at most (deeper or larger: read as one that may)
_HOLDS_DEPTH, _HOLDS_ITEMS = 3, 64
#: values that hold no tokens and no attributes to read
_NO_TOKENS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _may_hold_tokens(value: Any, depth: int = 0, least: tuple[int, int] = (5, 3)) -> bool:
    """Whether a forward's argument ``value`` may hold tokens before its own (a KV cache under a name of its own): a
    tensor of five or more dimensions (keys and values stacked over layers, ``[layers, 2, batch, heads, past,
    head_dim]``), or a list, tuple, mapping or plain object that holds a tensor of three or more (a legacy cache of
    ``(keys, values)`` tuples, Megatron's ``inference_params``); a module, a callable, an object whose attributes
    cannot be read, or one too deep or large to read may too. Never a plain value, nor a tensor given alone of four
    dimensions or fewer (a 0-d count as a trainer's ``num_items_in_batch``, ``cu_seqlens``, ids, a mask, embeddings,
    pixels), nor an object holding only small tensors and plain values (Megatron's ``PackedSeqParams``), nor an
    empty cache. ``least``: the dimensions of a tensor that may, given alone and inside a container."""
    if type(value) in _NO_TOKENS or isinstance(value, enum.Enum):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() >= least[1 if depth else 0] and value.numel() > 0
    if depth >= _HOLDS_DEPTH or isinstance(value, nn.Module) or callable(value):
        return True
    items: Any
    if isinstance(value, _LIST_OR_TUPLE):
        items = value
    elif type(value) is dict:
        items = list(value.values())
    else:
        space = getattr(value, "__dict__", None)
        if type(space) is not dict or getattr(type(value), "__slots__", None):
            return True  # (a mapping of the user's class, slots or a C object: not read, it may)
        items = list(space.values())
    if len(items) > _HOLDS_ITEMS:
        return True
    return any(_may_hold_tokens(item, depth + 1, least) for item in items)


def _cache_held(kwargs: dict[str, Any], given: list[Any] | None = None) -> int | None:
    """The tokens the KV cache a forward is given (by name) holds before it runs, where the host knows it: 0 for none
    (or an empty one), ``get_seq_length()`` where it is an int, the third of four dimensions of the first tensor of a
    cache of plain tensors (transformers' legacy ``[batch, heads, tokens, head_dim]``); None where not known (a static
    cache counts on its device: no host sync here). ``given``: the caches it is given by name, in the order of
    ``_CACHE_NAMES``, where the caller read them already."""
    if given is None:
        given = [*filter(_GIVEN, map(kwargs.get, _CACHE_NAMES))]
    if not given:
        return 0
    if len(given) > 1:
        return None
    cache = given[0]
    if isinstance(cache, _LIST_OR_TUPLE):
        first = _first_tensor(cache)
        if first is None:
            return None if any(cache) else 0
        return int(first.shape[-2]) if first.dim() == 4 else None
    held = _count_now(cache)
    return held if held >= 0 else None


def _device_held(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tokens the one KV cache object a forward is given (by name) holds before it runs, where it counts them on
    its device (a static cache's ``get_seq_length()``: a 0-d integer tensor, which it adds to in place): that tensor
    itself, to be read in stream order before the forward runs (no copy, no host sync); None for any other cache."""
    given = [*filter(_GIVEN, map(kwargs.get, _CACHE_NAMES))]
    if len(given) != 1 or isinstance(given[0], list | tuple):
        return None
    count = getattr(type(given[0]), "get_seq_length", None)
    if not callable(count):
        return None
    try:
        held = count(given[0])
    except Exception:  # (a cache of one's own whose count fails: it says nothing)
        return None
    if isinstance(held, torch.Tensor) and held.numel() == 1 and not held.is_floating_point() and not held.is_meta:
        return held.detach().reshape(())
    return None


#: an additive attention mask's values above this attend their key (0, or a small bias), and those at or below
#: :data:`_MASKED` leave it out (-inf, the dtype's lowest, -1e9, -10000: no weight after the softmax)
_ATTENDED, _MASKED = -1.0, -1e4


def _places_of_4d(mask: torch.Tensor, batch: int, own: torch.Tensor) -> torch.Tensor | None:
    """The places ``own`` (``[1 or batch, positions]``: the positions given, or the cache's count on from each token)
    of the tokens of a ``[batch, positions]`` forward given a ``[batch, heads, positions, keys]`` attention ``mask``
    (boolean, or additive float) whose keys are the cache's slots in order, where query ``i`` attends every key up
    to ``own[i]`` and none after it (its place is then the tokens before it); -1 elsewhere (not known: padding
    before it, a sliding window that dropped keys, a row of padding unmasked to attend everything, keys laid out
    otherwise). None where the mask is of no known kind. On the device: no host sync."""
    positions = own.shape[-1]
    if mask.shape[0] not in (1, batch) or mask.shape[2] != positions or mask.is_meta:
        return None
    unsure: torch.Tensor | None = None
    if mask.dtype == torch.bool:
        attend = mask[:, 0]
    elif mask.is_floating_point():
        # (additive: 0 (or a small bias) where attended; where not, a large negative number, whichever the code that
        # made it chose: -inf, the dtype's lowest, -1e9, -10000 all leave a key no weight. A value between tells
        # neither: that query's place is not known)
        attend = mask[:, 0] > _ATTENDED
        unsure = (attend | (mask[:, 0] <= _MASKED)).logical_not().any(dim=-1)
    else:
        return None
    own = own.to(mask.device, torch.long)
    keys = torch.arange(mask.shape[3], device=mask.device)
    upto = keys <= own[..., None]  # [1 or batch, positions, keys]: the keys up to each query's own
    whole = (attend == upto).all(dim=-1) & (own < mask.shape[3])
    if unsure is not None:
        whole = whole & ~unsure
    return torch.where(whole, own, -1).expand(batch, positions)


def places_fed(
    args: tuple[Any, ...], kwargs: dict[str, Any], shape: torch.Size | None, held: int | torch.Tensor | None = -1
) -> torch.Tensor | None:
    """Each token's place in its sequence as a ``[batch, positions]`` forward is fed it (``shape``): the real tokens
    before it in its sequence, those of its KV cache included, padding left out (-1 at padding), as ``[batch,
    positions]`` int64 on the device of what it is read from; None where not known (given anything but the ids
    positionally, an additive 2-d mask, a cache whose length is known nowhere, positions of several axes).

    Read from the ``position_ids`` given (packed rows restart them at each sequence), else from the ``[batch, cached +
    positions]`` attention mask (its tokens counted), else from the tokens the cache holds before the forward, as the
    model places them: counted on the host, or on the device by a static cache (its count read in stream order as the
    forward begins), a 4-d mask telling where the places are whole (:func:`_places_of_4d`). No host sync (a device's
    mask, positions or count are read on it). ``held``: :func:`_cache_held` (or :func:`_device_held`'s count), where
    the caller read it already (-1: not read). Given by position, the inputs read by name (its mask, position_ids,
    a KV cache: ``model(ids, mask)``, ``model(ids, None, positions)``) are read as given by name, where ``kwargs``
    holds them so (see ``FeedForward.named_at``); any other given by position after the ids is not read: None."""
    if shape is None or (len(args) > 1 and not all(_read_by_name(a, kwargs) for a in args[1:])):
        return None
    batch, positions = int(shape[0]), int(shape[1])
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    four = isinstance(mask, torch.Tensor) and mask.dim() == 4  # (read with the positions or the cache's count)
    if (
        mask is not None
        and not four
        and not (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[0] == batch
            and mask.shape[1] >= positions
            and not mask.is_floating_point()
        )
    ):
        return None  # (an additive 2-d mask: not read)
    if pos is not None:
        text = _text_positions(pos, batch, positions)
        if text is None:
            return None
        if four:
            return _places_of_4d(cast(torch.Tensor, mask), batch, text.detach())
        places = text.detach().to(torch.long).expand(batch, positions)
        if mask is not None:
            places = places.masked_fill(mask[:, -positions:] == 0, -1)
        return _after_cached(places, args, kwargs, shape, held, own=mask is not None)
    if isinstance(held, int) and held < 0:
        held = _cache_held(kwargs)
    if held is None:  # (not counted on the host: a static cache's count, on its device)
        held = _device_held(kwargs)
        if held is None:
            return None
    if four:
        own = torch.arange(positions, device=held.device if isinstance(held, torch.Tensor) else None) + held
        return _places_of_4d(cast(torch.Tensor, mask), batch, own[None])
    if mask is not None:
        if isinstance(held, int) and mask.shape[1] != held + positions:
            return None
        real = mask != 0
        # (four ops, not six: a bool's cumsum counts in int64 itself, and one where sets the padding)
        counted = torch.where(real[:, -positions:], real.cumsum(-1)[:, -positions:] - 1, -1)
        if isinstance(held, torch.Tensor):  # (a mask of other keys than the cache's and these tokens: not known)
            return torch.where(held.to(counted.device) + positions == mask.shape[1], counted, -1)
        return counted
    if isinstance(held, torch.Tensor):
        return (torch.arange(positions, device=held.device) + held).expand(batch, positions)
    ids = kwargs.get("input_ids", args[0] if args else None)
    device = ids.device if isinstance(ids, torch.Tensor) else None
    return torch.arange(held, held + positions, device=device).expand(batch, positions)


def _read_by_name(arg: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``arg``, given to a forward by position after its ids, is None or read as given by name: the very
    object ``kwargs`` holds under a name of :data:`_READ_BY_NAME` (mapped from its place in the signature)."""
    return arg is None or any(arg is kwargs.get(n) for n in _READ_BY_NAME)


def _positions_form(pos: Any, batch: int, positions: int) -> str | None:
    """The form of the ``position_ids`` a ``[batch, positions]`` forward is fed: ``"flat"`` (``[positions]``: one
    sequence's, or every row's), ``"rows"`` (``[1 or batch, positions]``), ``"mrope"`` (Qwen2-VL's and its heirs'
    ``[3, 1 or batch, positions]``: temporal, height and width rows; ``[4, ...]`` with the text positions first) or
    ``"glm"`` (GLM's ``[1 or batch, 2, positions]``: the positions, then the positions inside a generated block);
    None for anything else (another shape, a float tensor on a device or holding a fraction). No two forms share a
    shape for one batch size. Floats of whole numbers on the host are positions as integers are (a rotary embedding
    takes either): left unread, another rank's slice fed them would be forced with nothing compared."""
    if (
        not isinstance(pos, torch.Tensor)
        or int(pos.shape[-1] if pos.dim() else -1) != positions
        or (pos.is_floating_point() and _host_scale(pos) is None)
    ):
        return None
    lead = tuple(map(int, pos.shape[:-1]))
    if not lead:
        return "flat"
    if len(lead) == 1:
        return "rows" if lead[0] in (1, batch) else None
    if len(lead) != 2:
        return None
    if lead[0] in (3, 4) and lead[1] in (1, batch):
        return "mrope"
    return "glm" if lead[1] == 2 and lead[0] in (1, batch) else None


def _host_scale(t: torch.Tensor) -> float | None:
    """The step that floating positions ``t``, on the host, count their places in: 1.0 where they are whole numbers;
    where they hold fractions (a model that interpolates its positions, scaling them by one factor), the least step
    between two positions one after the other, where every position is a whole number of such steps; None where
    neither (positions that tell no place), or on a device (not read: no host sync)."""
    if _whole_on_host(t):
        return 1.0
    if t.device.type != "cpu" or t.dim() < 1 or t.shape[-1] < 2 or not bool(torch.isfinite(t).all()):
        return None
    steps = (t[..., 1:] - t[..., :-1]).to(torch.float64)
    ahead = steps[steps > 0]
    if not ahead.numel():
        return None
    step = float(ahead.min())
    counted = t.to(torch.float64) / step
    return step if bool(((counted - counted.round()).abs() <= 1e-4).all()) else None


def _whole_on_host(t: torch.Tensor) -> bool:
    """Does floating tensor ``t``, on the host, hold whole numbers only (read on a device: no host sync, so not)?"""
    return t.device.type == "cpu" and bool(torch.isfinite(t).all()) and bool((t == t.trunc()).all())


def _mrope_starts(pos: Any, batch: int, positions: int) -> torch.Tensor | None:
    """Where mrope ``position_ids`` (see :func:`_positions_form`) start a sequence, ``[1 or batch, positions]``: a
    sequence's first token is at 0 in every row (text, or an image's first patch) and no later token is, whether or
    not the rows tell the text positions (an image's tokens share a temporal position, the text after it goes on
    from the largest). None for another form, or on a device (read on the host only: no host sync)."""
    if _positions_form(pos, batch, positions) != "mrope" or pos.device.type != "cpu":
        return None
    return cast(torch.Tensor, pos.eq(0).all(0))


def _text_positions(pos: Any, batch: int, positions: int) -> torch.Tensor | None:
    """Each token's position in its sequence as the ``position_ids`` a ``[batch, positions]`` forward is fed give it,
    ``[1 or batch, positions]`` (see :func:`_positions_form`); None where they do not tell it. The rows of mrope tell
    it where all of them are equal (text: an image's tokens share a temporal position and the text after an image
    goes on from its largest), GLM's where no token is inside a generated block (its second row all zeros: a block's
    tokens share the first row's position). Those two are read on the host only: None on a device (no host sync).
    The text row of mrope's four (transformers' ``text_position_ids``) tells it whatever the other rows hold: three
    equal rows of text after an image go on from the image's largest position plus one, not from the token's
    place, so a sequence-parallel slice after an image is read by its text row where it is given one."""
    form = _positions_form(pos, batch, positions)
    if form is None:
        return None
    if pos.is_floating_point():  # (whole numbers, or whole numbers of one step: see _positions_form)
        pos = (pos.to(torch.float64) / cast(float, _host_scale(pos))).round().to(torch.long)
    if form == "flat":
        return cast(torch.Tensor, pos)[None]
    if form == "rows":
        return cast(torch.Tensor, pos)
    if form == "mrope" and int(pos.shape[0]) == 4 and (batch != 4 or int(pos.shape[1]) != 1):
        return cast(torch.Tensor, pos[0])  # (not [4, 1, seq] for a batch of 4: that may be [batch, 1, seq])
    if pos.device.type != "cpu":
        return None
    if form == "mrope":
        return cast(torch.Tensor, pos[0]) if bool((pos == pos[:1]).all()) else None
    return None if bool(pos[:, 1].any()) else cast(torch.Tensor, pos[:, 0])


def _after_cached(
    places: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shape: torch.Size,
    held: int | torch.Tensor | None,
    own: bool = True,
) -> torch.Tensor:
    """``places`` read from the ``position_ids`` a forward is given, but where a sequence's ids put a token among the
    real tokens its KV cache holds (a prompt fed from place 0 with a cache not reset, still holding another
    sequence's tokens, which its attention reads), that sequence's places as the cache and the mask count them: a
    token's place counts the tokens before it that it attends, whatever ids it is given. Packed rows that restart
    their ids in a forward given an empty cache keep them. No host sync (a static cache's count is read on its
    device); ``places`` where the cache's tokens are not counted, a copy where not ``own`` (a view of the caller's
    ``position_ids``, which it may change in place after the forward: what is kept of it must not change)."""
    if not any(map(_GIVEN, map(kwargs.get, _CACHE_NAMES))):
        return places if own else places.clone()
    given = kwargs.get("position_ids")  # (given by position too: read as none given, see _read_by_name)
    if args:  # (given by position too: read as none given; a generate() step is given none by position)
        args = tuple(None if a is given else a for a in args)
    if isinstance(held, int) and held < 0:
        held = _cache_held(kwargs)
    if isinstance(held, int) and kwargs.get("attention_mask") is None and len(args) <= 1:
        # (counted on the host, no mask: every sequence's places go on from the cache's count, `held, held + 1, ...`
        # in each row, so the least of each row is `held` itself: what the general case below finds in three ops)
        among = ((places >= 0) & (places < held)).any(dim=1, keepdim=True)
        return torch.where(among, torch.arange(held, held + int(shape[1]), device=places.device), places)
    counted = places_fed(args, {k: v for k, v in kwargs.items() if k != "position_ids"}, shape, held)
    if counted is None or counted.shape != places.shape:
        return places if own else places.clone()
    counted = counted.to(places.device)
    # (the real tokens the cache holds before each sequence's first token here: its first counted place)
    big = torch.iinfo(torch.long).max
    before = counted.masked_fill(counted < 0, big).amin(dim=1, keepdim=True)
    among = ((places >= 0) & (places < before)).any(dim=1, keepdim=True) & (before < big)
    return torch.where(among, counted, places)


def _unpad_fed(ids: torch.Tensor, mask: Any) -> torch.Tensor | None:
    """The ``[batch, positions]`` ``ids`` a forward feeds as tokens of its sequences by its ``[batch, >= positions]``
    attention ``mask`` (every one, given none), sequence by sequence: the rows of routers that see the tokens
    :data:`UNPADDED`; None where the mask is of another kind. On a device: one host sync (how many are kept)."""
    if ids.dim() != 2 or (mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)):
        return None
    if mask is None:
        return ids.detach().reshape(-1)
    if mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
        return None
    keep = _kept_tokens(mask[:, -ids.shape[1] :])
    return None if keep is None else ids.detach().reshape(-1)[keep.reshape(-1).to(ids.device)]


def _kept_tokens(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens an attention ``mask`` of one entry per token (``[batch, positions]``) keeps (True), as a model that
    takes the padding out reads it: an integer or boolean one's non-zeros, a float one of 0s and 1s (with a 1) its 1s,
    an additive float one (0 for a token, a negative bias for padding: ``-inf``, ``finfo.min``, ``-10000``) its
    entries of no negative bias (kept flat in the routers' order, a mask is read entry by entry). None for no mask.
    On a device: no host sync."""
    if mask is None:
        return None
    if not mask.is_floating_point():
        return mask != 0
    ones = mask == 1
    zero_one = ones.any() & (ones | (mask == 0)).all()
    return torch.where(zero_one, ones, mask >= 0)


def _zero_one(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A kept prompt mask as 1 = token, 0 = padding; None where a float mask is not one of 0s and 1s.

    A float mask of 0.0/1.0 (with at least one 1) marks tokens as an integer one does; any other float
    mask is additive (0 for a token, a large negative number for padding, all 0s without padding), or
    unknown: its forward's rows get no mask value rather than a guessed one.
    """
    if mask is None or not mask.is_floating_point():
        return mask
    ones = mask == 1
    if bool(ones.any()) and bool((ones | (mask == 0)).all()):
        return ones
    return None


def _flat(parts: list[torch.Tensor | None], sizes: list[int], dtype: torch.dtype) -> torch.Tensor | None:
    """``parts`` flattened into one host tensor of ``sum(sizes)`` values, -1 for a missing part; None if all are."""
    known = [p for p in parts if p is not None]
    if not known:
        return None
    device = known[0].device
    flat = torch.cat(
        [
            p.reshape(-1).to(device, dtype) if p is not None else torch.full((n,), -1, dtype=dtype, device=device)
            for p, n in zip(parts, sizes, strict=True)
        ]
    )
    return flat.cpu()  # one copy to the host


def _unseen() -> bool:
    """Is this forward traced, exported, captured in a CUDA graph or run under a ``torch.func`` transform? Its ids
    are symbols or batches, and no host call sees the forwards of what it makes.

    Not whether dynamo compiles it: the caller asks that in its own frame (``_compiling()``). Called from eager code
    while dynamo falls back frame by frame (a trace that raised), this function is compiled as a frame of its own,
    where ``is_compiling()`` is True for a caller that runs eagerly: its answer would open the token check of an eager
    forward. What it reads here is the same in a frame of its own."""
    # (graph_capturing(), tracing() and exporting() spelled inline, in their parts: it runs at every forward of every
    # level, and their frames cost more than their reads)
    return (
        COMPILER._is_compiling_flag  # (what export and AOT tracing set in eager code)
        or (CUDA._initialized and not FORK.bad and stream_capturing())
        or functorch_transform() is not None
        or jit_tracing()
        or (dispatch_modes() != 0 and tracing())
        or FX._is_fx_tracing_flag
        or EXPORT._is_exporting_flag
    )


def in_router_order(values: torch.Tensor, order: str) -> torch.Tensor:
    """``[batch, positions]`` ``values`` (ids, a mask) flattened in the ``order`` the routers see their tokens."""
    if order == SEQUENCE_FIRST and values.dim() == 2:
        return values.t().reshape(-1)
    return values.reshape(-1) if values.dim() == 2 else values


def _wants_ids(record: FeedRecord | FeedCheck) -> bool:
    """Does ``record`` keep or compare the ids of each forward (a capture keeping inputs, a token check)?"""
    if isinstance(record, FeedCheck):
        return True
    return not isinstance(record, MoveWatch) and record._keep_inputs


def _holds_state(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Is a forward given something its run would change (a KV cache object, a legacy cache of tuples)?"""
    for value in (*args, *kwargs.values()):
        if isinstance(value, _LIST_OR_TUPLE) and value:
            return True
        kind = type(value)
        if kind not in _PLAIN and not isinstance(value, torch.Tensor):
            return True
    return False


def _without_empty_caches(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``kwargs`` with a KV cache that holds no token yet (a prompt's, as ``generate()`` gives its first forward) given
    as None: what the forward computes before its first router is the same without it, and a token-order run fills no
    cache the forward itself is given. None where it holds one that holds tokens or cannot say (its tokens come
    before these: runs without them would see other rows)."""
    out = dict(kwargs)
    for name in _CACHE_NAMES:
        value = out.get(name)
        if value is None or isinstance(value, torch.Tensor | list | tuple) or type(value) in _PLAIN:
            continue
        if _count_now(value) != 0:
            return None
        out[name] = None
    return out


def token_order(
    run: Callable[[tuple[Any, ...], dict[str, Any]], Any],
    scopes: Sequence[nn.Module],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    module: nn.Module | None = None,
    path: list[nn.Module] | None = None,
    seen: list[torch.Tensor | None] | None = None,
    mask: Any = None,
    located: list[MaskPlace] | None = None,
    unpads: list[int] | None = None,
) -> str | None:
    """The order in which the routers see the tokens of the ``[batch, positions]`` ids this forward is fed, told by
    effect; None where this forward cannot tell (another may).

    Rows are assumed to follow the tokens row by row (:class:`~moe_replay.BatchLayout`, the engine readers,
    the ids a capture keeps), but a model whose layers run ``[positions, batch, hidden]`` (fairseq, Megatron)
    shows its routers every sequence's position 0, then position 1..., and its rows are another token's
    wherever a batch holds two sequences: a token check in batch-major order passes while the experts go
    elsewhere. So the forward runs twice more without gradients, up to the first router it reaches (which
    does nothing: the run stops before it; where the session has several routers, on past it, each router's own
    forward run plain, recording and forcing nothing, until every router was reached once), from the same state of the
    model and of every random generator it draws from (the global ones, those its modules hold or their code reads,
    any other a run is handed): as fed, and with
    the last token of sequence 0 that is no padding (position ``p``) changed. The rows of that router's input that
    change are that token's (and, where attention looks both ways, the other tokens of its sequence): its own row ``p``
    and rows within the first ``positions`` where the routers see the tokens batch-major, its row
    ``p * batch`` and rows at multiples of ``batch`` where they see them sequence-first. Rows one per token the
    forward's attention mask keeps (the padding taken out before the routers) are :data:`UNPADDED` where the changed
    token's row is its place among them, sequence by sequence (:func:`_unpadded`). Anything else (rows that are not
    one per token, no row changed, a run that fails) is :data:`OTHER_ORDER`, read as before: batch-major, unchecked;
    but where the row that changed most (the changed token's own) is neither of its two places, the tokens reach the
    first router reordered (a layer that sorts the sequences by length): :data:`MIXED`. A sort may leave sequence 0 in
    place (it moves others, or none at this forward and some at the next): an order told is kept only where a third
    run, on the batch with its sequences (and every input of one entry per sequence) rolled one place, shows the first
    router the rows of the run as fed moved with their sequences (:func:`_follows_roll`); else :data:`MIXED`.
    Fewer rows than the tokens that the attention mask does not explain are those of another of the forward's inputs
    where one alone does, or of the ids read by a pad id where no mask is given (:func:`_locate_mask`). A later
    router whose row the changed token moved most is a row of another sequence in the first router's order sees the
    tokens in another order: :data:`MIXED` (:func:`_mixed`).

    It runs where it changes nothing: not for one sequence or one position (every order is the same), not
    where the forward is given a cache it would update, not across processes (the other ranks would not run it
    in step). Those forwards are ``None``. What the runs change in ``module`` (the model whose forward ``run``
    runs) before they stop is put back as a decision's probe runs put it back: its buffers, small parameters and
    plain attributes (a forward counter, a batch norm's running statistics in training). ``path``, where given,
    gets the modules the runs went through before the router they stopped at, in the order they were called;
    ``seen``, where given, the router's input rows in the run as fed where the runs set the hooks aside (what the
    forward itself, run with them, is checked against: :func:`_order_check`). ``mask``: the forward's attention mask
    where it was given by position (``args`` and ``kwargs`` are what it was given, and what the runs are given).
    ``located``, where given, gets the place of the mask whose kept tokens the routers' rows are, where that is not
    ``mask`` read as marking tokens (one under another name, or of True at padding: :func:`_locate_mask`).
    ``unpads``, where given, gets the ids of the later routers' scopes that see only the tokens ``mask`` keeps, one
    row each, sequence by sequence, where the first sees every position batch-major (:func:`_later_unpadded`).
    """
    _, ids, _ = _inputs(args, kwargs)
    # (a forward fed embeddings: one token's embedding changed to another token's tells the order as an id does)
    embeds = kwargs.get("inputs_embeds") if ids is None else None
    grid = ids if ids is not None else embeds
    if not isinstance(grid, torch.Tensor) or grid.dim() != (2 if ids is not None else 3) or not scopes:
        return None
    if min(grid.shape[:2]) < 2 or grid.is_meta:  # (ids on the meta device hold no token to change)
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    key = "inputs_embeds" if ids is None else ("input_ids" if "input_ids" in kwargs else None)  # (None: by position)
    rest = _without_empty_caches({k: v for k, v in kwargs.items() if k != key})
    if rest is None or _holds_state(args[1:] if key is None else args, rest):
        return None
    emptied = any(rest[k] is not v for k, v in kwargs.items() if k in rest)  # (an empty cache given as None)
    batch, positions = int(grid.shape[0]), int(grid.shape[1])
    mask = kwargs.get("attention_mask") if mask is None else mask
    at = _last_token(mask, batch, positions)
    if at is None:  # (sequence 0 holds fewer than two tokens: its own row and another's are not told apart)
        return None
    flat = grid.detach().reshape(batch * positions, -1)
    other = (flat != flat[at]).any(dim=-1).nonzero().flatten()
    if not other.numel():  # (every token the same: no other id or embedding known to be one of the model's)
        return None
    changed = grid.detach().clone()
    changed.view(batch * positions, -1)[at] = flat[int(other[0])]

    def fed(x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if key is not None:
            return args, {**rest, key: x}
        return (x, *args[1:]), rest

    devices = [grid.device] if grid.device.type == "cuda" else []
    kept = _Snapshot(module) if module is not None else None
    aside = False
    # (the hooks of the model's modules first set aside, as in a decision's probe runs: a hook that collects
    # activations sees the one forward; where the runs fail without them, they run with them)
    notes: list[_Later] = []
    for aside in (True, False) if kept is not None else (False,):
        notes.clear()
        rows = _order_rows(
            run, fed, (grid, changed), devices, kept, aside, path, scopes if len(scopes) > 1 else None, notes
        )
        if rows is not None:
            if aside and seen is not None:
                seen.append(rows[0])
            break
    else:  # (runs that fail without the cache the forward was given say nothing of the forward: not told)
        return None if emptied else OTHER_ORDER
    first, second = rows

    def rolled(order: str, keep: torch.Tensor | None = None) -> str:
        # (a layer that reorders the sequences by what they hold (sorts them by length) may leave them in place at
        # this forward, or move only others than sequence 0, and reorder another forward otherwise: the order told is
        # kept only where the routers' rows follow the sequences when the batch is rolled one place)
        if order not in (BATCH_MAJOR, SEQUENCE_FIRST, UNPADDED) or first is None:
            return order
        moved_args = tuple(_roll_batch(a, batch, positions) for a in args)
        moved_rest = {k: _roll_batch(v, batch, positions) for k, v in rest.items()}

        def fed_rolled(x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if key is not None:
                return moved_args, {**moved_rest, key: x}
            return (x, *moved_args[1:]), moved_rest

        base, rows_as_fed = grid, first
        if second is not None and second.shape == first.shape and bool((grid == grid.roll(1, 0)).all()):
            # (every sequence the same as the one before it, as a batch of one prompt repeated: rolled, they tell
            # nothing. The changed batch's sequence 0 is another: a sort by what they hold moves it)
            base, rows_as_fed = changed, second
        got = _order_rows(run, fed_rolled, (base.roll(1, 0),), devices, kept, aside)
        if got is None:  # (a forward that fails on its sequences rolled: told as before)
            return order
        return order if _follows_roll(rows_as_fed, got[0], base.detach(), order, keep) else MIXED

    if (first is not None and first.is_meta) or (second is not None and second.is_meta):
        return None  # (a model on the meta device, fed real ids: its rows hold no values to compare)
    if first is None or second is None:
        return OTHER_ORDER
    if first.shape != second.shape:
        # (the changed token is taken out, or one taken out no longer is: a model that takes its padding out by the
        # ids' value, the token changed to its pad id. Fewer rows than the tokens are looked for among its inputs)
        if located is None or first.shape[0] >= batch * positions or first.shape[1:] != second.shape[1:]:
            return OTHER_ORDER
        moved = None
    else:
        moved = set((first != second).any(dim=-1).nonzero().flatten().tolist())
    if first.shape[0] != batch * positions:
        told = OTHER_ORDER if moved is None else _unpadded(moved, first.shape[0], mask, at, batch, positions)
        if told == UNPADDED:  # (sequence 0's kept tokens come first)
            seq0 = _kept_tokens(mask[:1, -positions:])
            told = _mixed(notes, told, first.shape[0], lambda j: seq0 is not None and j < int(seq0.sum()))
            return rolled(told, _kept_tokens(mask[:, -positions:]))
        if told == OTHER_ORDER and first.shape[0] < batch * positions and located is not None:
            # (fewer rows than the tokens, not those the attention mask keeps: a mask under another name, or of True
            # at padding, among the forward's own tensors, where one alone tells the rows as its kept tokens)

            def moved_at(place: int, keep: torch.Tensor) -> set[int] | None:
                # (the rows a change of the token at ``place`` to one of the tokens ``keep`` keeps moves)
                if place == at and moved is not None:
                    return moved
                others = ((flat != flat[place]).any(dim=-1) & keep.reshape(-1).to(flat.device)).nonzero().flatten()
                if not others.numel():
                    return None
                other_at = grid.detach().clone()
                other_at.view(batch * positions, -1)[place] = flat[int(others[0])]
                again = _order_rows(run, fed, (grid, other_at), devices, kept, aside)
                if again is None or again[0] is None or again[1] is None or again[0].shape != again[1].shape:
                    return None
                return set((again[0] != again[1]).any(dim=-1).nonzero().flatten().tolist())

            where = _locate_mask(moved_at, first.shape[0], args, kwargs, key, mask, batch, positions)
            if where is not None:
                located.append(where)
                found = mask_at(where, args, kwargs)
                seq0 = None if found is None else _kept_tokens(found[:1, -positions:])
                told = _mixed(notes, UNPADDED, first.shape[0], lambda j: seq0 is not None and j < int(seq0.sum()))
                return rolled(told, None if found is None else _kept_tokens(found[:, -positions:]))
        return told
    if moved is None:  # (the changed run saw another count of rows: none to compare)
        return OTHER_ORDER
    # (the row that changed most is the changed token's own, whose input changed itself: where that is neither its row
    # sequence by sequence nor position by position, the tokens reach the first router reordered, by a layer that
    # sorts the sequences by length or moves left padding to the right, say, and no order of the ids fits its rows)
    change = (second.double() - first.double()).norm(dim=-1)
    finite = bool(moved) and bool(torch.isfinite(change).all())
    # (the padding of sequence 0 after the changed token, the last it holds, sees that token where attention looks back
    # (a right-padded completion) and may change more than the token's own row: its rows, in each order's places,
    # are left out of the row that changed most)
    # (but never the changed token's own row in the other order where the rows that moved fit that order: in a
    # sequence-first model its row ``at * batch`` may lie among those of sequence 0's padding read batch-major, and
    # left out it would let another row of its sequence pass for its own)
    trailing = range(at + 1, positions)
    first_fits = at * batch in moved and all(q % batch == 0 for q in moved)
    kept_out = [q for q in trailing if not (first_fits and q == at * batch)]
    top = _top_change(change, kept_out) if finite else None
    top_first = _top_change(change, [q * batch for q in trailing]) if finite else None
    left = set(kept_out) | {q * batch for q in trailing}
    if finite and int(change.argmax()) in left:
        # (the row that changed most is one left out as sequence 0's padding: it is that, or the changed token's own
        # row moved among them by a layer that reorders the tokens (right padding moved before them, say). Told by
        # one run more, sequence 0's last padding token changed: its own row in an order must be the row that changes
        # most for that order to be told (a model whose padding's ids change nothing tells nothing: taken as padding))
        last = _padding_row(run, fed, grid, flat, positions - 1, devices, kept, aside)
        if last is not None and last != positions - 1:
            top = -1  # (not batch-major)
        if last is not None and last != (positions - 1) * batch:
            top_first = -1  # (not sequence-first)
    # (the changed token's own row changes, and only rows of its sequence: told apart as at >= 1 and batch >= 2)
    if at in moved and all(q < positions for q in moved) and top in (None, at):
        if unpads is not None:
            unpads.extend(_later_unpadded(notes, mask, at, batch, positions))
        return rolled(_mixed(notes, BATCH_MAJOR, batch * positions, lambda j: j < positions))
    if at * batch in moved and all(q % batch == 0 for q in moved) and top_first in (None, at * batch):
        told = SEQUENCE_FIRST
        if moved == {at * batch}:
            # (the changed token's own row alone: no token reaches another's row before the first router, so the
            # rows tell no sequence, and [batch, positions] ids of layers that run positions-first look as
            # [positions, batch] ids do. Told by the positions the forward is fed, where they tell it)
            told = _grid_axis(kwargs, batch, positions)
        return rolled(_mixed(notes, told, batch * positions, lambda j: j % batch == 0))
    # (a forward fed its tokens sequence-first, [positions, batch] read as [batch, positions]: its routers see every
    # sequence in turn, as position 0 of each read sequence, then position 1..., and its sequences run along the read
    # batch, so the changed token's own row and only rows of its true sequence, the read position's, change)
    column = range(at * batch, (at + 1) * batch)
    if at * batch in moved and all(q in column for q in moved) and top_first in (None, at * batch):
        return rolled(_mixed(notes, GRID_TRANSPOSED, batch * positions, lambda j: j in column))
    if top is not None and top not in (at, at * batch) and top_first not in (at, at * batch):
        return MIXED
    return OTHER_ORDER  # (rows of other tokens moved too, as a statistic over the batch moves them: read as before)


def _grid_axis(kwargs: dict[str, Any], batch: int, positions: int) -> str:
    """The order of a forward fed a ``[batch, positions]`` grid (ids, or embeddings) whose routers see its columns in
    turn, told by the positions it is fed (``position_ids``, or the one keyword named for positions): those that run
    along the grid's rows (``[positions]``, or increasing along each row and not down each column) tell
    :data:`SEQUENCE_FIRST`; those that run down its columns (``[batch]`` of another length, or increasing down each
    column and not along each row: ids ``[positions, batch]``) :data:`GRID_TRANSPOSED`. Fed no positions, a mask
    (a keyword named for one) ``[batch, positions]`` of the transposed grid's shape, none of the grid's own, tells
    :data:`GRID_TRANSPOSED` (``nn.Transformer``'s ``src_key_padding_mask`` beside ``[positions, batch]`` ids). Anything
    else (neither given, a square grid fed one row of positions, positions of another form) is read as the ids are
    everywhere else, ``[batch, positions]``: :data:`SEQUENCE_FIRST` (ids ``[positions, batch]`` fed neither are then
    laid out position by position: a known gap)."""
    name = "position_ids" if "position_ids" in kwargs else _positions_among(kwargs)
    pos = kwargs.get(name) if name is not None else None
    if not isinstance(pos, torch.Tensor) or pos.is_meta or pos.is_complex() or pos.dtype == torch.bool:
        shapes = {
            tuple(v.shape) for k, v in kwargs.items() if "mask" in k and isinstance(v, torch.Tensor) and v.dim() == 2
        }
        if (positions, batch) in shapes and (batch, positions) not in shapes:
            return GRID_TRANSPOSED
        return SEQUENCE_FIRST
    pos = pos.detach()
    if pos.dim() == 1 and batch != positions:
        if int(pos.shape[0]) == positions:
            return SEQUENCE_FIRST
        return GRID_TRANSPOSED if int(pos.shape[0]) == batch else SEQUENCE_FIRST
    if pos.dim() != 2 or tuple(pos.shape) != (batch, positions):
        return SEQUENCE_FIRST
    along = bool((pos[:, 1:] > pos[:, :-1]).all())
    down = bool((pos[1:] > pos[:-1]).all())
    if along != down:
        return SEQUENCE_FIRST if along else GRID_TRANSPOSED
    return SEQUENCE_FIRST


def _padding_row(
    run: Callable[..., Any],
    fed: Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]],
    grid: torch.Tensor,
    flat: torch.Tensor,
    place: int,
    devices: list[torch.device],
    kept: _Snapshot | None,
    aside: bool,
) -> int | None:
    """The first router's input row that changes most where the token at flat index ``place`` of the ``grid`` fed (a
    padding token of sequence 0) is changed to another of its tokens (:func:`token_order`); None where no row changes
    (a model whose padding's ids change nothing), rows of another count, or a run that fails."""
    others = (flat != flat[place]).any(dim=-1).nonzero().flatten()
    if not others.numel():
        return None
    changed = grid.detach().clone()
    changed.view(flat.shape[0], -1)[place] = flat[int(others[0])]
    rows = _order_rows(run, fed, (grid, changed), devices, kept, aside)
    if rows is None or rows[0] is None or rows[1] is None or rows[0].shape != rows[1].shape:
        return None
    change = (rows[1].double() - rows[0].double()).norm(dim=-1)
    if not bool((change > 0).any()) or not bool(torch.isfinite(change).all()):
        return None
    return int(change.argmax())


def _top_change(change: torch.Tensor, left_out: list[int]) -> int:
    """The row whose values changed most (``change``: one norm per row, finite), the rows ``left_out`` aside (those
    past the end of ``change`` ignored)."""
    rows = [q for q in left_out if q < change.shape[0]]
    if not rows or len(rows) >= change.shape[0]:
        return int(change.argmax())
    return int(change.index_fill(0, torch.tensor(rows, device=change.device), -1.0).argmax())


def _roll_batch(value: Any, batch: int, positions: int) -> Any:
    """``value`` with its sequences rolled one place along the batch (sequence ``b`` to place ``b + 1``), where it is a
    tensor of one entry per sequence (``[batch, ...]``: a mask, position ids; one of ``[batch]`` only where ``batch !=
    positions``, as a ``cache_position`` of as many entries is not one per sequence); else ``value`` as it is."""
    if not isinstance(value, torch.Tensor) or value.dim() < 1 or int(value.shape[0]) != batch:
        return value
    return value.roll(1, 0) if value.dim() >= 2 or batch != positions else value


def _token_rows(keep: torch.Tensor | None, order: str, batch: int, positions: int) -> torch.Tensor:
    """The row at which the routers see each token of a ``[batch, positions]`` forward whose routers see them in
    ``order`` (on the host), -1 where they see none (:data:`UNPADDED`: only the tokens ``keep`` keeps, sequence by
    sequence)."""
    if order == UNPADDED and keep is not None:
        rows = torch.full((batch, positions), -1, dtype=torch.long)
        rows[keep] = torch.arange(int(keep.sum()))
        return rows
    grid = torch.arange(batch * positions)
    return grid.view(positions, batch).t() if order == SEQUENCE_FIRST else grid.view(batch, positions)


def _follows_roll(
    plain: torch.Tensor, rolled: torch.Tensor | None, grid: torch.Tensor, order: str, keep: torch.Tensor | None
) -> bool:
    """Do the first router's input rows of a run on the ``[batch, positions]`` ids (or embeddings) ``grid`` with its
    sequences rolled one place (``rolled``) follow the sequences, in ``order``, from those of the run as fed
    (``plain``): each token's row of the rolled run closer to its row of the run as fed than to the row the rolled run
    holds at its place (the rows a layer that sorts the sequences by what they hold gives both runs alike)? Each
    sequence is weighed over its tokens whose rows the two readings tell apart (those of another id there); one of no
    such token (a sequence the same as the one before it) says nothing. ``keep``: the tokens kept, where the routers
    see only those (:data:`UNPADDED`)."""
    batch, positions = int(grid.shape[0]), int(grid.shape[1])
    if rolled is None or rolled.shape != plain.shape:
        return False
    keep = None if keep is None else keep.to("cpu", torch.bool)
    at = _token_rows(keep, order, batch, positions)  # (each token's row in the run as fed)
    moved = _token_rows(None if keep is None else keep.roll(1, 0), order, batch, positions).roll(-1, 0)
    if int(at.max()) >= plain.shape[0] or int(moved.max()) >= plain.shape[0]:
        return False
    ours = at.reshape(-1) >= 0
    owner = torch.full((plain.shape[0],), -1, dtype=torch.long)
    owner[at.reshape(-1)[ours]] = torch.arange(batch * positions)[ours]  # (the token at each row of the run as fed)
    flat = grid.reshape(batch * positions, -1).cpu()
    mine, there = moved.reshape(-1), at.reshape(-1)
    held = owner[mine.clamp(min=0)]  # (the token the run as fed holds at each token's row of the rolled run)
    tells = ours & (held >= 0) & (flat != flat[held.clamp(min=0)]).any(-1)
    if not bool(tells.any()):
        return True
    device = plain.device
    now = rolled.double()[mine.clamp(min=0).to(device)]
    follows = (now - plain.double()[there.clamp(min=0).to(device)]).norm(dim=-1).cpu()
    stays = (now - plain.double()[mine.clamp(min=0).to(device)]).norm(dim=-1).cpu()
    if not bool(torch.isfinite(follows).all() and torch.isfinite(stays).all()):
        return True  # (rows that hold no values to compare: told as before)
    sequence = torch.arange(batch).repeat_interleave(positions)
    for b in range(batch):
        weigh = tells & (sequence == b)
        if bool(weigh.any()) and not float(follows[weigh].sum()) < float(stays[weigh].sum()):
            return False
    return True


def _mixed_words(batch: int, positions: int) -> str:
    """Why a ``[batch, positions]`` forward's routers' rows know no one order of its tokens (:data:`MIXED`)."""
    return (
        f"the routers see the tokens of a [{batch}, {positions}] forward in more than one order, or in an order of "
        "their own: a later router sees them in another order than the first (a layer between them transposes, "
        "reverses or regroups the batch), or the first sees them neither sequence by sequence nor position by "
        "position (a layer before it sorts or regroups the sequences), so no one order of the ids fits every "
        "router's rows"
    )


def _refuse_mixed(order: str, shape: torch.Size | None, forward: int, hint: str) -> None:
    """Refuse forward ``forward`` of a replay, of ``[batch, positions]`` ``shape``, whose routers see its tokens in
    more than one order (``order`` :data:`MIXED`), where it holds several sequences of several positions: no one
    layout of the rows it reads fits every router, and which rows go to which token cannot be checked."""
    if order != MIXED or shape is None or min(int(shape[0]), int(shape[1])) < 2:
        return
    raise TokenMismatchError(
        f"forward {forward} of this replay(): {_mixed_words(int(shape[0]), int(shape[1]))}, and which of the rows it "
        "reads go to which token cannot be checked: rows laid out for one router's order would force the experts of "
        "other tokens on the other's. Replay such a batch one sequence per forward (every order of one sequence is "
        "the same), or replay a capture's own rows of the very forwards it recorded, in order, by row order "
        "(routes.with_token_ids(None))" + (f". {hint}" if hint else "")
    )


def _later_unpadded(notes: list[_Later], mask: Any, at: int, batch: int, positions: int) -> list[int]:
    """The ids of the later routers' scopes noted in both runs (``notes``) whose rows are one per token the ``[batch,
    >= positions]`` attention ``mask`` keeps, fewer than the positions, sequence by sequence (the padding taken out
    after the first router, which saw every position): as many rows as the kept tokens, and the one that changed most
    with the token at ``at`` of sequence 0 is that token's place among them."""
    if len(notes) != 2 or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        return []
    keep = _kept_tokens(mask[:, -positions:])
    if keep is None:
        return []
    kept = int(keep.sum())
    own = int(keep[0, :at].sum())
    if kept == batch * positions or not bool(keep[0, at]):
        return []
    found = []
    for scope, before in notes[0].rows.items():
        after = notes[1].rows.get(scope)
        if after is None or after.shape != before.shape or before.shape[0] != kept:
            continue
        change = (after - before).norm(dim=-1)
        if bool(torch.isfinite(change).all()) and bool((change > 0).any()) and int(change.argmax()) == own:
            found.append(scope)
    return found


def _mixed(notes: list[_Later], order: str, rows: int, first: Callable[[int], bool]) -> str:
    """``order``, the first router's (of ``rows`` rows), or :data:`MIXED` where a later router of as many rows, noted
    in both runs (``notes``), sees the tokens in another order: of its rows, the one that changed most with the token
    of sequence 0 the runs changed (its own row: its embedding changed) is a row that in the first router's order
    holds a token of another sequence (``first``: is row ``j`` one of sequence 0's there?), which that token cannot
    reach where sequences do not mix (a layer that transposes or reverses the batch). A later router of another count
    of rows (a stream of its own, the kept tokens alone) is left to the checks of its rows, as before."""
    if len(notes) != 2:
        return order
    for scope, before in notes[0].rows.items():
        after = notes[1].rows.get(scope)
        if after is None or after.shape != before.shape or before.shape[0] != rows:
            continue
        change = (after - before).norm(dim=-1)
        if not bool(torch.isfinite(change).all()) or not bool((change > 0).any()):
            continue
        if not first(int(change.argmax())):
            return MIXED
    return order


class _Later:
    """What a token-order run that goes on past its first router (:class:`~moe_replay.intercept.OrderProbe`'s
    ``note``) saw: the first router's input rows, and a sketch of each later router's (its first call), by scope."""

    def __init__(self, scopes: Sequence[nn.Module]) -> None:
        self.want = {id(s) for s in scopes}
        self.seen: set[int] = set()
        self.first: torch.Tensor | None = None
        self.rows: dict[int, torch.Tensor] = {}

    def note(self, scope: nn.Module, rows: torch.Tensor | None) -> bool:
        """Note router ``scope``'s input ``rows``; True where the run may stop here (every router's reached, or one
        again: a router called at several layers)."""
        if id(scope) in self.seen:
            return True
        if not self.seen:
            self.first = rows
        elif rows is not None:
            self.rows[id(scope)] = _sketch(rows)
        self.seen.add(id(scope))
        return self.seen >= self.want


#: the random projections of a router's input rows kept by the token-order runs, by width and device
_SKETCHES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _sketch(rows: torch.Tensor) -> torch.Tensor:
    """``[rows, features]`` projected on 8 fixed random directions (float32): how far each row moved between two runs
    is kept without a copy of the rows."""
    key = (int(rows.shape[-1]), rows.device)
    proj = _SKETCHES.get(key)
    if proj is None:
        proj = torch.randn(key[0], 8, generator=torch.Generator().manual_seed(0)).to(rows.device)
        _SKETCHES[key] = proj
    return rows.float() @ proj


#: where a level's padding mask is, where it is not its ``attention_mask`` of 1 at each token: the forward's parameter
#: name and place among its positional arguments (either None where it has none), and whether it marks padding (True,
#: as a key padding mask does) rather than tokens, or the pad id where it is the ids themselves (a token wherever they
#: hold another value: a model that takes its padding out by the ids' value, given no mask)
MaskPlace = tuple[str | None, int | None, bool, int | None]


def _mask_candidates(
    args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None, batch: int
) -> Iterator[tuple[str | int, torch.Tensor]]:
    """The tensors a forward was given (by name or place) that may be a mask of one entry per token of its ``[batch,
    positions]`` ids: ``[batch, ...]`` of one dimension past the batch that is not 1 (``[batch, keys]``, ``[batch, 1,
    1, keys]``), not floating-point embeddings; ``key``: the ids' own name (None: the first positional argument)."""
    given: list[tuple[str | int, Any]] = [(i, a) for i, a in enumerate(args) if i or key is not None]
    given += [(name, v) for name, v in kwargs.items() if name != key]
    for where, value in given:
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != batch:
            continue
        if sum(1 for n in value.shape[1:] if n != 1) != 1 or (value.is_floating_point() and value.dim() == 3):
            continue  # (hidden states, a 4-d mask of queries and keys)
        yield where, value


def mask_at(place: MaskPlace, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``[batch, keys]`` mask at ``place`` among a forward's inputs, 1 (True) at each token it keeps; None where the
    forward was given none there. On a device: no host sync (one comparison where it marks padding)."""
    name, at, marks_padding, pad = place
    value = kwargs.get(name) if name is not None else None
    if value is None and at is not None and len(args) > at:
        value = args[at]
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    flat = value.reshape(value.shape[0], -1)
    if pad is not None:
        return flat != pad
    return flat == 0 if marks_padding else flat


def _locate_mask(
    moved_at: Callable[[int, torch.Tensor], set[int] | None],
    rows: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str | None,
    mask: Any,
    batch: int,
    positions: int,
) -> MaskPlace | None:
    """Where the padding mask of a forward of ``[batch, positions]`` tokens whose routers saw ``rows`` rows, fewer,
    is among its inputs, read as marking tokens or padding: the one place and reading alone whose kept tokens the
    rows are, sequence by sequence (:func:`_unpadded`, with the rows ``moved_at`` each token changed to one the
    reading keeps moves); None where none or several are (its attention ``mask`` read as marking tokens was tried
    before). Given no mask, integer ids are read as one too, a token wherever they hold another value than one pad id
    (one of as many entries as the tokens the routers did not see). On a device: host syncs (at a forward that tells
    the order only)."""
    found: list[MaskPlace] = []
    ids = args[0] if key is None and args else kwargs.get(key) if key is not None else None
    if (
        mask is None
        and isinstance(ids, torch.Tensor)
        and ids.dim() == 2
        and not ids.is_floating_point()
        and tuple(ids.shape) == (batch, positions)
    ):
        values, counts = ids.unique(return_counts=True)
        for pad in values[counts == batch * positions - rows].tolist():
            reading = ids != pad
            at = _last_token(reading, batch, positions)
            moved = None if at is None else moved_at(at, reading)
            told = None if moved is None or at is None else _unpadded(moved, rows, reading, at, batch, positions)
            if told == UNPADDED:
                found.append((key, 0 if key is None else None, False, int(pad)))
    for where, value in _mask_candidates(args, kwargs, key, batch):
        flat = value.reshape(batch, -1)
        if flat.shape[1] < positions:
            continue
        readings = (False, True) if not value.is_floating_point() else (False,)
        for marks_padding in readings:
            if value is mask and not marks_padding and value.dim() == 2:  # (read so before)
                continue
            reading = flat == 0 if marks_padding else flat
            keep = _kept_tokens(reading[:, -positions:])
            if keep is None or int(keep.sum()) != rows:
                continue
            at = _last_token(reading, batch, positions)
            moved = None if at is None else moved_at(at, keep)
            if (
                moved is not None
                and at is not None
                and _unpadded(moved, rows, reading, at, batch, positions) == UNPADDED
            ):
                name, place = (where, None) if isinstance(where, str) else (None, where)
                found.append((name, place, marks_padding, None))
    return found[0] if len(found) == 1 else None


def _unpadded(moved: set[int], rows: int, mask: Any, at: int, batch: int, positions: int) -> str:
    """The order of the routers' ``rows`` input rows of a forward of ``[batch, positions]`` tokens whose token ``at`` of
    sequence 0 changed the rows ``moved``: :data:`UNPADDED` where they are one row per token its ``attention_mask``
    keeps, in order sequence by sequence (the changed token's row is its place among them, and only rows of sequence
    0's tokens changed), else :data:`OTHER_ORDER`.

    Tokens kept position by position would put that row elsewhere, unless no other sequence holds a token before it;
    there the runs cannot tell the two apart, and the order is told only where both are the same for every token."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < positions:
        return OTHER_ORDER
    kept = _kept_tokens(mask[:, -positions:])
    if kept is None:
        return OTHER_ORDER
    keep = kept.cpu()
    if rows != int(keep.sum()) or rows == batch * positions:
        return OTHER_ORDER
    own = int(keep[0, :at].sum())  # (the changed token's row sequence by sequence: sequence 0's tokens come first)
    if own not in moved or any(q >= int(keep[0].sum()) for q in moved):
        return OTHER_ORDER
    if int(keep[:, :at].sum()) == own:  # (its row position by position too: the same for every token?)
        grid = torch.arange(batch * positions).view(batch, positions)
        if not torch.equal(grid[keep], grid.t()[keep.t()]):
            return OTHER_ORDER
    return UNPADDED


def _order_rows(
    run: Callable[..., Any],
    fed: Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]],
    inputs: tuple[torch.Tensor, ...],
    devices: list[torch.device],
    kept: _Snapshot | None,
    aside: bool,
    path: list[nn.Module] | None = None,
    scopes: Sequence[nn.Module] | None = None,
    notes: list[_Later] | None = None,
) -> list[torch.Tensor | None] | None:
    """The first router's input rows in a run of each of ``inputs`` (None: no router reached), from one random
    state, with the submodules' hooks set ``aside``; None where a run fails (the forward's own error). ``kept`` is
    put back after them. ``path`` gets the modules the first run called before it stopped. An error of moe_replay's
    own code, in the runs or around them, refuses the forward (see :func:`_order_fault`): never an order untold."""
    try:
        return _told_rows(run, fed, inputs, devices, kept, aside, path, scopes, notes)
    except MoEReplayError:
        raise
    except Exception as e:  # (the runs' errors are the forward's, taken inside: this one is moe_replay's)
        raise _order_fault(e) from e


def _told_rows(
    run: Callable[..., Any],
    fed: Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]],
    inputs: tuple[torch.Tensor, ...],
    devices: list[torch.device],
    kept: _Snapshot | None,
    aside: bool,
    path: list[nn.Module] | None,
    scopes: Sequence[nn.Module] | None,
    notes: list[_Later] | None,
) -> list[torch.Tensor | None] | None:
    """:func:`_order_rows`, whose errors are moe_replay's own but those of the forward in its runs."""
    rows: list[torch.Tensor | None] = []
    entered: list[nn.Module] = []

    @inside_forward
    def note(module: nn.Module, args: Any) -> None:
        try:
            if not rows and not (later is not None and later.seen):  # (the first run's, to its first router)
                entered.append(module)
        except Exception as e:  # (its own error in a run: noted, whatever the forward's code does with it)
            note_fault(e)
            raise

    later: _Later | None = None

    hooks = kept.hooks_aside() if aside and kept is not None else contextlib.nullcontext()
    drawn = _Drawn()
    # (compiled modules on the way run eagerly here: the stop is Python that no graph holds. The runs are a forward
    # that a checkpoint's recompute does not make, so, as a decision's probe runs, they run unseen by the dispatch
    # modes (selective activation checkpointing hands out the ops it saved by their order of call) and leave
    # autocast's cache of cast weights as it was (or the forward after them takes the casts of the weights before
    # the first router from there, while its recompute casts them))
    with (
        torch.random.fork_rng(devices=devices),
        torch.no_grad(),
        EAGER,  # (counted: a watch opened inside these runs may close after them)
        hooks,
        hidden_from_dispatch_modes(),
        _autocast_cache_aside(),
        _noting_calls(note if path is not None else None),
        drawn,
        files_as_they_were(kept.files if kept is not None else ()),
        unheard(),
    ):
        state = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]
        ORDER_PROBE.check, ORDER_PROBE.thread = None, threading.get_ident()  # (its routers stop: none checks)
        try:
            for i, x in enumerate(inputs):
                if i:
                    # (each run from the model as it was, its generators too: those its modules hold or their code
                    # reads, and any other the first run drew from (NEFTune-like noise before the first router), or
                    # every row of the second run differs and the order is left untold)
                    if kept is not None:
                        kept.restore()
                    drawn.put_back()
                torch.set_rng_state(state)
                for d, s in zip(devices, cuda, strict=True):
                    torch.cuda.set_rng_state(s, d)
                if scopes is not None and notes is not None:  # (runs on past the first router: see _mixed)
                    later = _Later(scopes)
                    notes.append(later)
                    ORDER_PROBE.note = later.note
                given = fed(x)  # (moe_replay's own, outside the forward: see _order_rows)
                outer = run_begins()
                try:
                    run(*given)
                except OrderStop as stop:
                    _order_noted(run_ends(outer), stop)
                    rows.append(stop.rows if later is None else later.first)
                except Exception as e:  # (a forward that fails on the changed token: the order stays untold)
                    _order_noted(run_ends(outer), e)
                    if raised_inside(e):  # (moe_replay's code inside it; a refusal it made on purpose as it is)
                        if isinstance(e, MoEReplayError):
                            raise
                        raise _order_fault(e) from e
                    if later is None or not later.seen:
                        return None
                    rows.append(later.first)  # (it failed past its first router: told as far as it went)
                except BaseException:
                    run_ends(outer)
                    raise
                else:
                    _order_noted(run_ends(outer), None)
                    rows.append(None if later is None else later.first)  # (None: no router reached)
                finally:
                    ORDER_PROBE.note = None
        finally:
            ORDER_PROBE.thread = None
            ORDER_PROBE.note = None
            drawn.put_back()
            if kept is not None:
                kept.restore()
    if path is not None:
        path[:] = entered
    return rows


def _order_noted(fault: Exception | None, raised: BaseException | None) -> None:
    """Raise ``fault``, an error of moe_replay's code that left one of its entries inside a token-order run
    (``_faults.run_ends``), unless it is ``raised``, what the run itself raised: the forward's code caught it and went
    on, so the run told another forward's order. A refusal made on purpose is raised as it is."""
    if fault is None or fault is raised:
        return
    if isinstance(fault, MoEReplayError):
        raise fault
    raise _order_fault(fault) from fault


#: the attribute that marks the refusal :func:`_order_fault` makes (a plain MoEReplayError, chained from the error)
_ORDER_FAULT = "_moe_replay_order_fault"


def _order_fault(e: Exception) -> MoEReplayError:
    """The refusal of a forward whose token order could not be told for ``e``, an error of moe_replay's own code in
    the runs that tell it (a hook, a router's ``forward`` wrapper, the inputs it makes), which would otherwise leave
    the order untold and the checks that read it off."""
    err = MoEReplayError(
        f"moe_replay could not tell the order in which the routers see this forward's tokens, because its own code "
        f"raised in the runs that tell it ({type(e).__name__}: {e}). This is a fault of moe_replay, not of the model: "
        "please report it with this traceback. The model was left as it was"
    )
    setattr(err, _ORDER_FAULT, True)
    return err


class _Drawn(TorchFunctionMode):
    """The ``torch.Generator`` objects the calls made while it is active are handed (``torch.randn(...,
    generator=g)``), each with its state before the first of them: put back by :meth:`put_back`. The token-order runs
    draw from generators that no snapshot knows (one reached through a chain of calls or containers that reading the
    code does not follow) as they draw from the modules' own: each run from the same state, and the model left as it
    was."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[int, tuple[torch.Generator, torch.Tensor]] = {}

    @inside_forward
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        try:
            for value in (*args, *kwargs.values()):
                if is_generator_anywhere(value) and id(value) not in self.states:
                    self.states[id(value)] = (value, value.get_state())
            return forwards_call(func, args, kwargs)  # (the forward's call: its errors its own)
        except Exception as e:  # (its own error in a run: noted, whatever the forward's code does with it)
            note_fault(e)
            raise

    def put_back(self) -> None:
        """Every generator noted set back to its state before its first draw."""
        for generator, state in self.states.values():
            generator.set_state(state)


@contextlib.contextmanager
def _noting_calls(note: Callable[[nn.Module, Any], None] | None) -> Iterator[None]:
    """Call ``note`` with each module called while this runs (a global forward pre-hook; nothing where None)."""
    if note is None:
        yield
        return
    handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
    try:
        yield
    finally:
        handle.remove()


def _last_token(mask: Any, batch: int, positions: int) -> int | None:
    """The last position of sequence 0 that holds a token (its ``[batch, >= positions]`` attention mask keeps it:
    :func:`_kept_tokens`; the last position without one), or None where that is position 0."""
    at = positions - 1
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= positions:
        keep = _kept_tokens(mask[:1, -positions:])  # (an additive mask's tokens are its 0s)
        real = keep[0].nonzero().flatten() if keep is not None else torch.arange(positions)
        at = int(real[-1]) if real.numel() else 0
    return at if at >= 1 else None


def _padded(mask: Any, batch: int, positions: int) -> bool:
    """Does the ``[batch, >= positions]`` attention ``mask`` of a forward of ``[batch, positions]`` tokens hold padding
    (two values among its last ``positions`` columns, whether it marks tokens by 1 or by an additive 0)? False for
    no mask or one of another shape. On a device: one host sync (asked at the forwards that tell an order only)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < positions:
        return False
    cols = mask[:, -positions:]
    return bool((cols != cols.reshape(-1)[:1]).any()) if cols.numel() else False


def _uneven(mask: Any, batch: int, positions: int) -> bool:
    """Do the sequences of a forward of ``[batch, positions]`` tokens hold other counts of tokens (its ``[batch, >=
    positions]`` attention ``mask`` keeps other counts of each: :func:`_kept_tokens`)? False for no mask or one of
    another shape. On a device: one host sync (asked where :func:`_padded` is)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < positions:
        return False
    keep = _kept_tokens(mask[:, -positions:])
    if keep is None:
        return False
    counts = keep.sum(-1)
    return bool((counts != counts[:1]).any())


def _hooked(modules: Sequence[nn.Module]) -> bool:
    """Does one of ``modules`` hold a hook of its own (not a session's), which a token-order probe sets aside?"""
    return any(not _ours(hook) for m in modules for name in _HOOKS for hook in (m.__dict__.get(name) or {}).values())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Are the rows ``a`` those of ``b`` (up to the rounding of another kernel: a compiled module on the way)?"""
    return torch.allclose(a, b, rtol=1e-3, atol=1e-6, equal_nan=True)


def _order_check(
    before: torch.Tensor, order: str, shape: tuple[int, int], passed: Callable[[], None]
) -> Callable[[torch.Tensor | None], None]:
    """The check of the input rows of the first router of a forward whose token order (``order``, of ``[batch,
    positions]`` ids of ``shape``) was told by runs that set the hooks of the modules on the way aside, against the
    rows the run as fed saw there (``before``): rows that are those rows in the other order (hooks that transpose the
    hidden states on the way, as a pair of a pre-hook and a forward hook does) are refused. Rows that are the same, or
    that the hooks changed otherwise (noise added to the embeddings, a steering vector), are taken: ``passed`` is
    called."""
    batch, positions = shape

    def check(rows: torch.Tensor | None) -> None:
        if order == UNPADDED and rows is not None and rows.shape == before.shape:
            passed()  # (as many rows as the tokens kept: no other order of them is told apart here)
            return
        if rows is None or rows.shape != before.shape or rows.shape[0] != batch * positions:
            return
        now, then = rows.to(before.device, torch.float32), before.float()
        grid = (batch, positions) if order == BATCH_MAJOR else (positions, batch)
        flip = torch.arange(rows.shape[0], device=then.device).view(grid).t().reshape(-1)
        if not _close(now, then) and _close(now, then[flip]):
            other = SEQUENCE_FIRST if order == BATCH_MAJOR else BATCH_MAJOR
            raise UnsupportedRouterError(
                f"the routers see the tokens of this [{batch}, {positions}] forward {other}, but {order} without "
                "the hooks of the modules on the way to them: a hook of those modules reorders the hidden states "
                "(a pre-hook that transposes a module's input, a forward hook that transposes it back), so the "
                "order in which the routers see the tokens, which the capture and the token check read the ids "
                "in, cannot be told without running those hooks more often than the forward does. Do the "
                "reordering in the module's forward (a subclass or a wrapping module) instead of in hooks. This "
                "forward stopped before its first router; nothing was recorded or forced"
            )
        passed()  # (the same rows, or rows the hooks changed otherwise: the order as told, as before)

    return check


class _Found:
    """A token order found by :func:`token_order` at a model level, and what it was found under: the router scopes
    its runs stopped at, the level's forward (its class's, its own before), the modules the runs went through before
    the first router (the level first) and their state then (:func:`_path_state`), less the keys the level's own
    forward changes (a forward counter: its state, not a setting)."""

    __slots__ = ("mask", "order", "own", "padless", "path", "runs", "scopes", "state", "tied", "unpads")

    def __init__(
        self,
        order: str,
        scopes: Sequence[nn.Module],
        runs: tuple[Any, Any],
        path: Sequence[nn.Module],
        padless: bool = False,
        mask: MaskPlace | None = None,
    ) -> None:
        self.order = order
        #: where the mask whose kept tokens the routers see is, where not the forward's ``attention_mask`` read as 1 at
        #: each token (:func:`_locate_mask`)
        self.mask = mask
        #: the places among ``scopes`` of the later routers that see only the tokens the mask keeps (the first every
        #: position): :meth:`FeedRecord.unpads`
        self.unpads: frozenset[int] = frozenset()
        #: told at a forward without padding: whether the routers see only the tokens a mask keeps is not told, and a
        #: forward with padding tells the order again (:func:`_padded`)
        self.padless = padless and order != UNPADDED
        #: told at a forward whose sequences all hold as many tokens (its mask keeps as many of each, or it has none):
        #: a layer that sorts the sequences by length left them in place there, and a forward whose sequences hold
        #: other counts tells the order again (:func:`_uneven`)
        self.tied = False
        self.scopes = tuple(weakref.ref(s) for s in scopes)
        self.runs = runs
        self.path = tuple(weakref.ref(m) for m in path)
        self.state = _path_state(path)
        self.own: set[str] = set()  # (the keys the forward that found it changed itself, once it ended)

    def settle(self) -> None:
        """After the forward the order was found at: leave out the keys that forward changed itself."""
        now = self.now()
        if now is not None and self.state is not None:
            self.own.update(k for k in self.state.keys() | now.keys() if self.state.get(k) != now.get(k))
            for k in self.own:  # (what is compared from now on)
                self.state.pop(k, None)

    def now(self) -> dict[str, Any] | None:
        """The state of its path's modules now; None where one of them is gone."""
        modules = [ref() for ref in self.path]
        return None if any(m is None for m in modules) else _path_state(modules)  # type: ignore[arg-type]

    def holds(self, scopes: Sequence[nn.Module], runs: tuple[Any, Any]) -> bool:
        """Does it hold for a forward running ``runs`` to the router ``scopes``, with its path as it is now?"""
        if self.runs != runs or len(self.scopes) != len(scopes):
            return False
        if not all(ref() is scope for ref, scope in zip(self.scopes, scopes, strict=True)):
            return False
        now, then = self.now(), self.state
        if now is None or then is None:
            return False
        for k in self.own:
            now.pop(k, None)
        return now == then  # (the keys the forward changes itself left out of both)


class _Same:
    """An object compared by identity (no ``__eq__`` of the model's code runs), held weakly where it can be: a
    forward that is a bound method of the model, kept strongly in :data:`_ORDER_OF`, would keep the model alive."""

    __slots__ = ("obj", "ref")

    def __init__(self, obj: Any) -> None:
        self.obj: Any = None
        self.ref: weakref.ref[Any] | None = None
        if obj is not None:
            try:
                self.ref = weakref.ref(obj)
            except TypeError:  # (no weak reference to it: held as it is)
                self.obj = obj

    def get(self) -> Any:
        return self.ref() if self.ref is not None else self.obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        mine, theirs = self.get(), other.get()
        return mine is theirs and (mine is not None or (self.ref is None and other.ref is None))

    __hash__ = None  # type: ignore[assignment]


def _ours(hook: Any) -> bool:
    """Is ``hook`` one of moe_replay's (a session's hooks come and go with it)? Read without running user code."""
    plain = isinstance(hook, types.FunctionType | types.MethodType)
    where = hook.__module__ if plain else type(hook).__module__
    return isinstance(where, str) and where.startswith("moe_replay.")


def _own_forward(module: nn.Module) -> _Same:
    """The ``forward`` ``module`` has of its own (not its class's), compared by identity: a session's wrapper is
    looked through to the forward it runs, and a method bound to the module (made anew per session) is its
    function."""
    own = module.__dict__.get("forward")
    for _ in range(8):
        if isinstance(own, FeedForward):
            own = own.before
        elif own is not None and type(own).__module__.startswith("moe_replay."):
            inner = inspect.getattr_static(own, "__wrapped__", None)
            own = inner if callable(inner) and not isinstance(inner, property) else type(own)
        else:
            break
    if isinstance(own, types.MethodType) and own.__self__ is module:
        own = own.__func__
    return _Same(own)


def _path_state(modules: Sequence[nn.Module]) -> dict[str, Any] | None:
    """What of the ``modules`` a token-order probe went through (before the first router) could change the order in
    which the routers see the tokens, by key: each module's class and forward (its own, where it has one), the hooks
    on it (by handle, the session's own left out), its children (and those of a container it holds: a layer swapped
    in a ``ModuleList``), its mode, and its own settings (:func:`intercept._fingerprint` of it alone, without its
    code's reads: plain attributes, a config's, 0-d flag buffers; each config read once). Compared by ``==``
    (forwards and children by identity, held weakly: :class:`_Same`); read without running the model's code."""
    out: dict[str, Any] = {}
    configs: dict[int, list[tuple[str, Any]]] = {}
    for i, m in enumerate(modules):
        out[f"{i} forward"] = (type(m), static_attribute(type(m), "forward"), _own_forward(m))
        out[f"{i} hooks"] = (
            tuple(key for name in _HOOKS for key, hook in (m.__dict__.get(name) or {}).items() if not _ours(hook))
            if any(map(m.__dict__.get, _HOOKS))
            else ()  # (none: the common case, read in C)
        )
        children = []
        for name, child in m._modules.items():
            children.append((name, _Same(child)))
            if isinstance(child, _CONTAINERS):
                children.extend((f"{name}.{sub}", _Same(c)) for sub, c in child._modules.items())
        out[f"{i} children"] = tuple(children)
        out[f"{i} training"] = m.training
        out.update(_fingerprint(m, code=False, children=False, memo=configs, prefix=f"{i} "))  # (its keys: "{i} ...")
    return out


def feed_levels(model: nn.Module, scopes: Sequence[nn.Module]) -> list[nn.Module]:
    """The modules a forward of ``model`` enters on its way to every router, outermost first.

    ``model`` itself, then each submodule holding every router's module (``scopes``) down to their
    lowest common ancestor, leaving out containers that are never called (``ModuleList``,
    ``ModuleDict``). For a transformers ``...ForCausalLM``: the model and its base ``model``.

    Where no module on that way has a forward of its own (a ``ModuleDict`` or a plain holder of a
    policy and a reference model, each called on its own), no forward of the model enters any of
    them, and the capture would know none of its tokens: the levels are then those of each part
    below the common ancestor that holds routers, found the same way, so each part's forwards are seen.
    Where one does, a part below the common ancestor that may be a model of its own (it holds an
    ``nn.Embedding``: a reference model beside the language model that a policy's forward runs, an
    encoder beside its decoder) adds its levels too: called on its own, its forwards are seen there;
    called inside a forward of the model, they are that forward.
    """
    names = {id(m): name for name, m in model.named_modules()}
    paths = [names[id(s)].split(".")[:-1] if names.get(id(s)) else [] for s in scopes if id(s) in names]
    return [model, *(m for m in _levels_below(model, paths, _called(model)) if m is not model)]


def _called(module: nn.Module) -> bool:
    """Can a forward enter ``module``: has it a forward of its own (not a container's, nor ``nn.Module``'s, which
    raises)?"""
    if isinstance(module, nn.ModuleList | nn.ModuleDict | nn.ParameterList | nn.ParameterDict):
        return False
    return "forward" in module.__dict__ or type(module).forward is not nn.Module.forward


def _levels_below(module: nn.Module, paths: list[list[str]], entered: bool) -> list[nn.Module]:
    """The levels of :func:`feed_levels` from ``module`` on, for routers' scopes whose parents lie at ``paths``
    (relative to it); ``entered``: a module on the way to ``module`` (or itself) has a forward of its own."""
    levels = [module] if _called(module) else []
    common: list[str] = []
    for parts in zip(*paths, strict=False) if paths else ():
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    entered = entered or _called(module)
    for part in common:
        module = module.get_submodule(part)
        if _called(module):
            levels.append(module)
            entered = True
    rest = [p[len(common) :] for p in paths]
    heads = list(dict.fromkeys(p[0] for p in rest if p))
    if entered:
        # (a forward enters the routers' common ancestor, but need not enter each part below it that holds routers:
        # a part that is a model of its own, fed token ids through an embedding (a reference model beside the
        # language model that the policy's forward runs, an encoder that generate() calls apart), may be called on
        # its own too, and its forwards are then seen at its own levels; inside the ancestor's forward they are the
        # same forward)
        heads = _models_among(module, heads) if len(heads) > 1 else []
    # (else no module so far is entered by a forward: the parts below, each called on its own, are the levels)
    for head in heads:
        levels += _levels_below(module.get_submodule(head), [p[1:] for p in rest if p and p[0] == head], False)
    return levels


def _models_among(module: nn.Module, heads: list[str]) -> list[str]:
    """The parts ``heads`` of ``module`` that may be models of their own, called on their own token ids: each holds
    an ``nn.Embedding`` (where tokens come in), its own or one it shares with another part (an encoder and a decoder
    of one vocabulary). Layers of a stack and MoE blocks hold none; a level of one that does is entered inside the
    forwards of the levels above it, where it is the same forward."""
    return [head for head in heads if any(isinstance(m, nn.Embedding) for m in module.get_submodule(head).modules())]


class FeedForward:
    """A level's ``forward`` while its session is attached: the outermost forward in the thread of each record or
    check watching it (a capture or replay block) is fed to it, then the level's own forward runs. A forward fed no
    token count is fed on to the levels it enters below (see :meth:`FeedCheck.fed`), and one fed ids at a level with
    a level inside it is left to the innermost level fed ids (see ``_take_deferred``).

    Installed at attach and taken out at detach (a compiled model's guards then see one
    object for the whole session); with no block open it only passes the call on.
    """

    def __init__(self, module: nn.Module, before: Any) -> None:
        self.module = module
        self.before = before  # the module's own ``forward`` attribute before, or None: its class's (looked up)
        self.records: list[FeedRecord | FeedCheck] = []
        #: a forward ran compiled since the last block began (its routers read where the host does not count)
        self.compiled = False
        #: a forward fed token ids (or hidden states) ran compiled with no armed token check (set by the compiled code
        #: as it runs, an attribute it stores and never reads: no guard): its rows were compared by no check, unless
        #: an eager forward of the model that a check took holds it (see :meth:`FeedCheck.unchecked`)
        self.unchecked = False
        #: a check watching it may have lost the host's place in its routers' rows, or checks each router's own rows
        #: (see :meth:`_placed`): kept by the checks (set as one starts or loses its place, read again as one stops),
        #: so that an eager forward of a replay whose checks keep their place looks at none of them
        self.placing = False
        #: the token check of its forwards compiled whole (kept where a detached session's wrapper is made again:
        #: compiled code reaches it through this object)
        self.traced: TracedFeedCheck = getattr(self, "traced", None) or TracedFeedCheck()
        #: an encoder-decoder (a transformers config says so): its forwards feed two token streams
        self.paired = bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))
        #: the place of ``attention_mask`` among the forward's positional arguments (None: by name only)
        self.mask_at = _place_of(self.__wrapped__, "attention_mask")
        #: the places among the forward's positional arguments of each input the checks read by name (its mask,
        #: position_ids, cache_position, a KV cache), where it has one: given by position, read as given by name
        self.named_at = tuple(
            (name, at) for name in _READ_BY_NAME if (at := _place_of(self.__wrapped__, name)) is not None
        )
        #: the name the forward declares for its tokens' positions where it has no ``position_ids`` (vLLM's
        #: ``positions``, ``pos``, ``pos_ids``: see :func:`_positions_name`), given by name or by position: read as
        #: ``position_ids`` (compared with the rows' places where it is an integer tensor shaped like the tokens)
        self.positions_name = _positions_name(self.__wrapped__)
        if self.positions_name is not None and (at := _place_of(self.__wrapped__, self.positions_name)) is not None:
            self.named_at += (("position_ids", at),)
        #: the forward takes any keyword and declares no parameter for its positions: positions given under a name of
        #: :func:`_positions_among` (``positions=``, ``pos=``, ``position_idx=``) are read as ``position_ids``
        self.positions_open = _positions_open(self.__wrapped__)
        #: the fewest positional arguments that reach one of them (a forward given fewer, the common ``model(ids)``,
        #: is given none of them by position: no search at each forward)
        self.named_from = min((at + 1 for _, at in self.named_at), default=sys.maxsize)
        #: the name of the forward's first parameter, where that is not ``input_ids``: token ids given by that name
        #: (torchtitan's ``tokens=``, nanoGPT's ``idx=``) are read as those given by position are
        self.ids_name = _first_name(self.__wrapped__)
        #: the attached sessions it serves (two sessions, on the base model and on the whole, share a module)
        self.users = 1
        #: the router scopes (by ``id``) below it, where it holds some of its sessions' routers only: one model of a
        #: holder of several, each called on its own (see :func:`feed_levels`); None where it holds every router
        self.below: frozenset[int] | None = None
        #: what holds the blocks of each session it serves: ``.blocks``, the blocks open, and ``.admit_forward(what)``,
        #: which refuses a forward of an asyncio task whose rows would interleave with the block's
        self.owners: list[Any] = []
        #: the router scopes of the sessions it serves, where a token-order probe stops (see :func:`token_order`)
        self.scopes: list[nn.Module] = []
        #: the order in which the routers see the tokens of ``[batch, positions]`` ids, once established, and what it
        #: was found under: checked again at each block's first forward that reads it (a flag of the model switched,
        #: a layer swapped or a hook added since may have changed it)
        self.order: str | None = None
        self._found: _Found | None = None
        self._checked: weakref.WeakSet[FeedRecord | FeedCheck] = weakref.WeakSet()  # the blocks it was checked for
        self._settling: _Found | None = None  # found at the forward running now: settled as it ends
        #: the order was told at a forward without padding: a forward with padding tells it again (:func:`_padded`)
        self._padless = False
        #: the order was told at a forward whose sequences all hold as many tokens: one whose counts differ tells it
        #: again (:func:`_uneven`)
        self._tied = False
        #: the check of the first router's input in the forward running now (:func:`_order_check`), or None
        self._verify: Callable[[torch.Tensor | None], None] | None = None
        #: where the padding mask whose kept tokens the routers see is among the forward's inputs, where the order runs
        #: found it elsewhere than its ``attention_mask`` of 1 at each token (:func:`_locate_mask`): read as that mask
        self.mask_from: MaskPlace | None = None
        #: the later routers' scopes that see only the tokens the attention mask keeps, where the first sees every
        #: position (:func:`_later_unpadded`), as places among ``scopes``
        self.unpads: frozenset[int] = frozenset()
        #: a level of a session it serves lies inside its module (set by the session): a forward fed ids here is left
        #: to the levels it enters below, where one fed ids takes it, the innermost (the ids the routers' tokens come
        #: from); where none is before a router reads, it is this level's (see ``_take_deferred``)
        self.levels_inside = False

    def leave(self) -> None:
        """One of the sessions it serves detaches; it stays for the others."""
        self.users -= 1

    @inside_forward  # (an error of its own in a probe or token-order run is told by its traceback, see _faults)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _compiling():
            return self._compiled(args, kwargs)
        watched = None
        me = _get_ident()
        for owner in self.owners:
            if owner.abandoned:  # (a block made and dropped without `with`: the caller believes it open)
                owner.refuse_abandoned()
            if owner.blocks:  # (not a forward of another asyncio task while the block's awaits)
                # (_Owner.admit_forward's first tests, inline: another thread's forward, or no event loop here)
                aio = _MODULES.get("asyncio")
                if owner.ident == me and aio is not None and aio._get_running_loop() is not None:
                    owner.admit_forward(self.module)  # (named only where it refuses)
                stamp = owner.stamp  # (_Owner.moved, inline: a hook or a method changed on the way to the routers
                if stamp is not None:  # since the block's first forward passed the watch, or on their classes)
                    try:
                        moved = [
                            HOOK_HANDLES.next_id,
                            *map(len, owner.way),
                            *map(type, owner.mods),
                            *owner.classes,
                            *map(_GETITEM, owner.places, owner.keys),
                        ] != stamp
                    except Exception:  # (a value gone from its place, or one whose == raises: it changed)
                        moved = True
                    if moved:  # (watched again)
                        recheck = owner.recheck
                        if compile_region():  # (eager code inside a compiled call: dynamo would compile each of the
                            recheck = torch.compiler.disable(recheck)  # checks' functions as a frame of its own)
                        watched = recheck(args, kwargs) or watched
        if watched is not None:
            return watched(lambda: self._fed(args, kwargs))
        records = self.records  # (_fed, then _run, inline: they run at every forward of every level)
        if records:
            if ORDER_PROBE.thread == me and ORDER_PROBE.check is None:  # (a probe's forward: no block's)
                return self._called(args, kwargs)
            entered = list(compress(records, map((False, me).__eq__, map(_INSIDE_THREAD, records))))
            if entered:
                return self._enter(entered, args, kwargs)
        before = self.before
        if before is not None:
            return before(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)  # (a later patch of the class is followed)

    def _compiled(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A forward that dynamo compiles (traced once: its graph runs for every call it guards)."""
        # (dynamo reads nothing of the records, and stores a constant: no guard on what a block holds; a replay's
        # token check is armed or not, and compares on the device: see TracedFeedCheck)
        self.compiled = True
        traced = self.traced
        was = FORWARD.on
        if _fed_tokens(args, kwargs) or (not args and _fed_tokens(*self._by_first_name(args, kwargs)[:2])):
            FORWARD.on = True  # (fed tokens: the rows its routers read are this forward's, see ring._Fed)
        if traced.places is not None and not self.paired and not exporting():
            # (a replay of rows that know their places, no ids: its positions compared with them on the device)
            fed_args, fed_kwargs, _ = self._by_first_name(args, kwargs)
            if not self.levels_inside:
                fed_args, fed_kwargs, _ = self._unbatched(fed_args, fed_kwargs)
            traced.feed_places(fed_args, self._named(fed_args, fed_kwargs))
        try:
            if not traced.active or self.paired or exporting():
                if not self.paired and not exporting() and not isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
                    self.unchecked = True  # (fed embeddings: read unchecked, as an eager forward's are)
                return self._run(args, kwargs)
            fed_args, fed_kwargs, _ = self._by_first_name(args, kwargs)
            if not self.levels_inside:  # (a level inside may be fed the ids themselves, and compares them)
                fed_args, fed_kwargs, _ = self._unbatched(fed_args, fed_kwargs)
            pending = traced.feed(fed_args, fed_kwargs, self.order, self.mask_at)
            out = self._run(args, kwargs)
            traced.ran(pending)  # (routes of each router's own: the routers that read rows in this forward)
            return out
        finally:
            FORWARD.on = was

    def _placed(self, entered: list[FeedRecord | FeedCheck], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An eager forward of this level, in a replay whose compiled token check is armed: where a check that took it
        no longer places its rows on the host (code compiled inside an earlier forward, its layers compiled in place,
        read rows on the device), its ids are compared with the rows its routers read next on the device, as compiled
        code compares them (returns what :meth:`TracedFeedCheck.ran` compares as it ends); where a check of each
        router's own rows took it, which compares each read as the router makes it on the host, returns the rows its
        routers stand at (a :class:`_Began`), compared on the device as the forward ends if code compiled inside it
        read (no router read of a compiled layer passes the host). No op, no sync otherwise (returns False). Called
        only where :attr:`placing` says a check may need it."""
        lost = False
        own = False
        for r in entered:
            if isinstance(r, FeedCheck):
                lost = lost or r._lost
                own = own or isinstance(r, RouterFeedCheck)
        if lost:
            return self._traced_feed(args, kwargs)
        if own and not any(src.read_by_device for src in self.traced.sources):
            return _Began(src.host_consumed for src in self.traced.sources)
        return False

    def _deferred_placed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A forward of ids this level leaves to the levels inside (see ``levels_inside``), in a replay whose compiled
        token check is armed: a level inside compiled in place reads its rows on the device and takes no forward, so
        its ids are compared here, on the device, with the rows its routers read (as :meth:`_placed`): from their
        device cursors where compiled code read before, else from the rows they stand at (a :class:`_Began`, compared
        as the forward ends only if code compiled inside it read: an eager forward pays a list of counts)."""
        sources = self.traced.sources
        if any(map(_BY_DEVICE, sources)):
            return self._traced_feed(args, kwargs)
        return _Began(map(_CONSUMED, sources))

    def _traced_feed(self, args: tuple[Any, ...], kwargs: dict[str, Any], began: list[int] | None = None) -> Any:
        """An eager forward inside a compiled call (dynamo fell back from this level's forward to the frames inside
        it), or one whose routers read in compiled code (see :meth:`_placed`; ``began``: the rows they stood at as it
        began, else their device cursors now): its ids compared with the rows its routers read as compiled code
        compares them, on the device (:meth:`TracedFeedCheck.feed`), where a replay's check is armed; the level then
        counts as compiled, its state read as the block ends. Returns what :meth:`TracedFeedCheck.ran` compares as it
        ends, False where nothing."""
        traced = self.traced
        if not traced.active or self.paired or exporting():
            return False
        self.compiled = True
        fed_args, fed_kwargs, _ = self._by_first_name(args, kwargs)
        if not self.levels_inside:
            fed_args, fed_kwargs, _ = self._unbatched(fed_args, fed_kwargs)
        return traced.feed(fed_args, fed_kwargs, self.order, self.mask_at, began)

    def _fed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A forward in eager code: fed to the records and checks watching it, where some are, then run."""
        records = self.records
        if records:
            me = _get_ident()
            if ORDER_PROBE.thread == me and ORDER_PROBE.check is None:  # (a probe's forward: no block's)
                return self._called(args, kwargs)
            # (those not inside a forward already fed to them, of this thread: in C, no frame per record)
            entered = list(compress(records, map((False, me).__eq__, map(_INSIDE_THREAD, records))))
            if entered:  # (none inside a forward already fed to them: the modules it enters are the same forward)
                return self._enter(entered, args, kwargs)
        return self._run(args, kwargs)

    def _by_first_name(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], str | None]:
        """The inputs of a forward as the records and checks read them, and the name its ids were given by: the first
        parameter given by its name (:attr:`ids_name`), where no ``input_ids`` or ``inputs_embeds`` are given, is read
        as given by position (the forward itself runs as it was called); else ``args`` and ``kwargs``, and None."""
        name = self.ids_name
        if args or name is None or name not in kwargs or _INPUT_NAMES & kwargs.keys():
            return args, kwargs, None
        return (kwargs[name],), {k: v for k, v in kwargs.items() if k != name}, name

    def _unbatched(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], Mapping[str, Any] | None]:
        """The inputs of a forward given its batch as one mapping of its token ids (or embeddings) and the rest, its
        only positional argument, as the records and checks read them: its entries given by name (``model(batch)``
        read as ``model(**batch)``), and the mapping; else ``args`` and ``kwargs``, and None. At a level with a level
        inside it (:attr:`levels_inside`), the forward is taken by the innermost level fed ids (``_take_deferred``):
        the mapping's ids count only where no module inside is fed ids."""
        if len(args) != 1 or not isinstance(args[0], Mapping) or _INPUT_NAMES & kwargs.keys():
            return args, kwargs, None
        batch = args[0]
        ids = batch.get("input_ids")
        embeds = batch.get("inputs_embeds")
        if not (isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() > 0) and not (
            ids is None and isinstance(embeds, torch.Tensor) and embeds.dim() > 1
        ):
            return args, kwargs, None
        if not all(isinstance(k, str) for k in batch) or kwargs.keys() & batch.keys():
            return args, kwargs, None
        return (), {**kwargs, **batch}, batch

    def _called(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The level's own forward, called by the forward's code inside a token-order run (a level inside the level
        whose order it tells), as that code called it: what the call raises is the forward's own (arguments that fit
        none of its parameters among it), but an error of moe_replay's code it enters in turn."""
        if self.before is not None:
            return forwards_call(self.before, args, kwargs)
        return forwards_call(type(self.module).forward, (self.module, *args), kwargs)

    @inside_forward  # (what a token-order run calls: its own errors are moe_replay's, see _order_rows)
    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The level's own forward."""
        before = self.before
        if before is not None:
            return before(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)  # (a later patch of the class is followed)

    def _feed_records(
        self, entered: list[FeedRecord | FeedCheck], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[
        list[FeedRecord | FeedCheck], list[tuple[FeedRecord, tuple[int, ...] | None]], list[FeedRecord | FeedCheck]
    ]:
        """An eager forward's inputs fed to the records and checks ``entered`` (its token order told first, where
        not yet): those it is taken by (see :meth:`FeedCheck.fed`), the records with their routers' calls as it
        began, and those it is left to the levels inside this one for (see ``_take_deferred``)."""
        if args or self.ids_name is None:  # (_by_first_name's first test, inline: given its ids by position)
            fed_args, fed_kwargs, name = args, kwargs, None
        else:  # (what the records read, the runs run)
            fed_args, fed_kwargs, name = self._by_first_name(args, kwargs)
        batch = None
        if fed_args and type(fed_args[0]) is not _TENSOR:  # (given its batch as one mapping: read as given its
            fed_args, fed_kwargs, batch = self._unbatched(fed_args, fed_kwargs)  # entries by name; a tensor is none)
        # (what the records read: the mask by name, given by position too, or found elsewhere by the runs)
        named, place = fed_kwargs, self.mask_from
        if (
            place is not None
            or (
                len(fed_args) >= self.named_from
                and any(len(fed_args) > at and n not in fed_kwargs for n, at in self.named_at)
            )
            or (self.positions_name is not None and self.positions_name in fed_kwargs)
            or (
                self.positions_open
                and "position_ids" not in fed_kwargs
                and any(map(_POSITIONS_ANY.fullmatch, fed_kwargs))  # (in C: no frame at each forward)
            )
        ):
            named = self._named(fed_args, fed_kwargs)
        inputs = _inputs(fed_args, named)  # (read once: where its mask is found changes none of it)
        order = self.order  # (_order's first tests, inline: an order told and checked for these blocks, kept as told;
        # a forward of one token per sequence, a decode step, read as _order reads it: every order the same, but for
        # the padding of a model that takes it out, as told)
        if order is None or self._padless or self._tied or not all(map(self._checked.__contains__, entered)):
            shape = inputs[2]
            if shape is not None and int(shape[1]) < 2:
                order = UNPADDED if order == UNPADDED else BATCH_MAJOR
            else:
                order = self._order(entered, fed_args, named, fed_kwargs, name, inputs, batch)
        if self.mask_from is not place:  # (a mask found elsewhere by the runs at this forward, or no longer)
            named = self._named(fed_args, fed_kwargs)
        watching: list[tuple[FeedRecord, tuple[int, ...] | None]] = []
        taken: list[FeedRecord | FeedCheck] = []
        deferred: list[FeedRecord | FeedCheck] = []
        paired = self.paired
        unpads = self.unpads  # (none in the common case: no list made)
        later = [self.scopes[i] for i in unpads if i < len(self.scopes)] if unpads and order == BATCH_MAJOR else []
        # (fed ids at a level with a level inside: the forward is taken by the innermost level fed ids, whose forward
        # the routers' tokens come from, where one is entered before any router reads; else here, see _take_deferred)
        ids_fed = not paired and inputs[1] is not None
        defer = ids_fed and self.levels_inside
        for r in entered:
            if isinstance(r, FeedRecord):  # (its routers' calls as the forward begins, read once: see _keep)
                r._began = made = r.calls_made() if r.calls_made is not None else None
                # (a forward that raises is noted whether or not this level is fed it: see FeedRecord.raised)
                watching.append((r, made))
            if r._deferred is not None:  # (a forward an outer level was fed ids of, not yet taken)
                if not ids_fed:  # (fed no ids here: taken by that level, as its forward, before this one runs)
                    _take_deferred(r)
                    continue
                r._deferred = None  # (fed ids here too: taken here, or by a level inside)
            if defer and type(r) in _DEFERRED:
                if type(r) is not FeedRecord:  # (as it would be taken here: see FeedCheck.lost_place)
                    r.lost_place()  # type: ignore[union-attr]
                r._deferred = (self, fed_args, named, paired, order, later, self.below)
                deferred.append(r)
                continue
            # (fed no token count, it is left to the levels it enters below: they may see its tokens; where it is
            # no level's around it, its router calls are counted all the same, see bare_began)
            if r.fed(fed_args, named, paired, order, inputs):
                taken.append(r)
            elif r._bare is None:
                r.bare_began(self)
        entered = taken
        if later:  # (its later routers that see only the tokens its mask keeps)
            for r in entered:
                r.unpads(later)
        return entered, watching, deferred

    def _enter(self, entered: list[FeedRecord | FeedCheck], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A forward of the model, fed to the records and checks ``entered`` (then it runs)."""
        if _compiling():  # (a frame of its own that dynamo compiles, its caller run eagerly: dynamo fell back frame by
            # frame from a trace that raised, or a graph break. From here on the forward is compiled code, which only
            # the compiled token check sees)
            return self._compiled(args, kwargs)
        # (the records, and their routers' calls as the forward began)
        every = entered
        watching: list[tuple[FeedRecord, tuple[int, ...] | None]] = []
        deferred: list[FeedRecord | FeedCheck] = []
        pending: Any = False  # (what the token check of compiled code compares as the forward ends, where it ran)
        below = self.below
        for r in entered:  # (the routers this forward can reach: one model's of a holder, or every one)
            if isinstance(r, FeedCheck):
                r.reach = below
        if _unseen():
            # (nothing baked into a graph's every replay or a traced program; under vmap no row is one token)
            for r in entered:
                r.unseen()
        elif current_graph_task_id() == -1:
            feed = self._feed_records
            callback = frame_callback()  # (compile_region, inline: it runs at every forward of every level)
            if callback is not None and callback is not False:  # (eager code dynamo gave up inside a compiled call:
                # each function it calls would be compiled as a frame of its own, and the token-order runs could not
                # set their eager stance)
                feed = torch.compiler.disable(feed)
                entered, watching, deferred = feed(entered, args, kwargs)
                # (the levels inside may run compiled, where the host counts no read and a forward deferred to them
                # is not taken: its ids are compared on the device here, as compiled code compares them)
                pending = torch.compiler.disable(self._traced_feed)(args, kwargs)
            else:
                entered, watching, deferred = feed(entered, args, kwargs)
                if self.placing and self.traced.active:  # (a replay's check of token ids, where compiled code may
                    # read its rows: see placing; a forward of ids left to the levels inside is placed here, where
                    # its ids are, as none inside is fed them)
                    pending = self._placed([*entered, *deferred] if deferred else entered, args, kwargs)
                if pending is False and deferred and self.traced.active:  # (a check's forward left to those inside)
                    if set(map(type, deferred)) != _RECORD_ONLY:
                        pending = self._deferred_placed(args, kwargs)
        # (else a forward inside backward: a checkpoint's recompute, which reads its forward's rows, not the next)
        for r in entered:
            r._inside = True
        check, self._verify = self._verify, None
        if check is not None:  # (its first router hands its input to the check, then runs)
            ORDER_PROBE.check, ORDER_PROBE.thread = check, threading.get_ident()
        out: Any = None
        try:
            before = self.before
            checks = FORWARD.checks
            if (
                checks
                and not FORWARD.on
                and not (checks.isdisjoint(map(id, entered)) and checks.isdisjoint(map(id, deferred)))
            ):
                # (a forward a check took, or left to the levels inside: code compiled inside it reads its rows, see
                # ring._Fed; stored only while a check that reads it is open, and where no outer forward stored it;
                # not for a forward only a record took, as a capture's records take a forward fed hidden states)
                FORWARD.on = True
                try:
                    if before is not None:
                        out = before(*args, **kwargs)
                    else:
                        out = type(self.module).forward(self.module, *args, **kwargs)
                finally:
                    FORWARD.on = False
            elif before is not None:
                out = before(*args, **kwargs)
            else:
                out = type(self.module).forward(self.module, *args, **kwargs)
            if pending is not False:
                if type(pending) is _Began:  # (the rows its routers stood at, read by the host until now: see _placed)
                    read = any(map(_BY_DEVICE, self.traced.sources))  # (code compiled inside it read)
                    pending = self._traced_feed(args, kwargs, pending) if read else False
                if pending is not False:
                    torch.compiler.disable(self.traced.ran)(pending)
            return out
        except BaseException as exc:
            for r, made in watching:
                if r.calls_made is None or made is None or r.calls_made() != made:
                    r.raised = r.raised or f"{type(exc).__name__}({str(exc)[:200]!r}) in a forward"
            for r in entered:
                if type(r) is OrderNote:  # (scores kept: a forward that raised may have kept some routers' only)
                    r.forward_raised(exc)
            raise
        finally:
            if check is not None and ORDER_PROBE.check is check:  # (no router reached)
                ORDER_PROBE.check = ORDER_PROBE.thread = None
            for r in deferred:  # (fed this forward, but not taken by a level inside it)
                if r._deferred is not None and r._deferred[0] is self:  # (no level inside entered)
                    if isinstance(r, FeedRecord):  # (its routers, if any ran, ran in this forward: it is this one's)
                        _take_deferred(r)
                    r._deferred = None  # (a check: no router read a row, nothing to compare)
                if r._held_by is self:  # (taken here: see _take_deferred)
                    r._held_by = None
                    entered.append(r)
            if _PAST_OPEN:  # (a tensor of five dimensions or more noted as a forward began: written while it ran?)
                _past_ended(args, kwargs)
            for r in entered:
                r._inside = False
                if isinstance(r, FeedRecord) or type(r) is FeedCheck:
                    r.returned(out)
                r.left()
            for r in every:  # (a forward no level took, which began here: see bare_began)
                bare = r._bare
                if bare is not None and bare[0] is self:
                    r.bare_left()
            settling, self._settling = self._settling, None
            if settling is not None:
                settling.settle()

    def _named(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The inputs of a forward as the records read them: its attention mask, position_ids, cache_position and KV
        cache by name, where they were given by position (``named_at``), and the mask where the runs found the mask
        whose kept tokens its routers see elsewhere (``mask_from``)."""
        named = kwargs
        for name, at in self.named_at:
            if len(args) > at and name not in kwargs:
                named = {**named, name: args[at]}
        alias = self.positions_name
        if self.positions_open and "position_ids" not in kwargs:
            alias = _positions_among(kwargs)
        if (
            alias is not None
            and alias in kwargs
            and "position_ids" not in kwargs
            and not _no_places(alias, kwargs[alias], named.get("attention_mask"))
        ):
            named = {**named, "position_ids": kwargs[alias]}
        if self.mask_from is not None:
            named = {**named, "attention_mask": mask_at(self.mask_from, args, kwargs)}
        return named

    def _order(
        self,
        entered: list[FeedRecord | FeedCheck],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        given: dict[str, Any] | None = None,
        ids_name: str | None = None,
        inputs: _Fed | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> str:
        """The order in which the routers see this forward's tokens: established once (:func:`token_order`) at the
        first forward that can tell, for the records and checks that keep or compare ids. ``kwargs`` are those the
        forward was given with its attention mask by name, ``given`` those it was given (the mask by position).
        ``ids_name``: the forward was given its ids by that name, here ``args[0]``: the runs give them by it.
        ``inputs``: ``_inputs(args, kwargs)``, where the caller read it already. ``batch``: it was given its inputs as
        that one mapping, here its entries by name: the runs give them in a copy of it."""
        order = self.order
        # (whether it was checked for these blocks is read only where it is used: a decode step of an order told
        # without padding and with even sequences returns at its shape, before)
        if order is not None and not self._padless and not self._tied and all(map(self._checked.__contains__, entered)):
            return order
        shape = (_inputs(args, kwargs) if inputs is None else inputs)[2]
        if shape is not None and (int(shape[1]) < 2 or int(shape[0]) < 2):
            # (one token per sequence, a decode step, or one sequence: every order is the same, but for the padding
            # of a model that takes it out, as told at an earlier forward, or by an earlier session on this model)
            if order is not None:
                return UNPADDED if order == UNPADDED else BATCH_MAJOR
            if not (int(shape[0]) == 1 < int(shape[1])):  # (several sequences of one token each: none to take out)
                return BATCH_MAJOR
            runs = (type(self.module).forward, _Same(self.before))
            told = _ORDER_OF.get(self.module, ())
            unpads = next((f for f in told if f.order == UNPADDED and f.holds(self.scopes, runs)), None)
            if unpads is not None:
                self.mask_from = unpads.mask  # (the mask whose kept tokens they see, where found elsewhere)
            return UNPADDED if unpads is not None else BATCH_MAJOR
        # (told at a forward without padding, where its routers' rows were one per token whether or not they see only
        # the tokens a mask keeps: a forward with padding tells it again. Once told, a mask on a device is not read, as
        # that would cost a host sync per forward: where such a padded forward's routers saw fewer rows than its tokens,
        # their ids are refused as the routes are read, see session._unpadded_untold. Told where the sequences all held
        # as many tokens, a forward whose sequences hold other counts tells it again: a layer that sorts them by
        # length may reorder it)
        checked = order is not None and all(map(self._checked.__contains__, entered))
        mask = kwargs.get("attention_mask")
        host = not checked or not isinstance(mask, torch.Tensor) or mask.device.type == "cpu"
        padded = shape is not None and host and _padded(mask, int(shape[0]), int(shape[1]))
        uneven = padded and shape is not None and _uneven(mask, int(shape[0]), int(shape[1]))
        if order is not None and checked and not (padded and self._padless) and not (uneven and self._tied):
            return order
        if self.paired:
            return BATCH_MAJOR
        if not any(_wants_ids(r) for r in entered):
            return UNTOLD  # (no record here reads it)
        runs = (type(self.module).forward, _Same(self.before))
        # (found before in this session, or by an earlier one on this model, running the same forward to the same
        # scopes through modules as they were then: a switched flag, a swapped layer, a hook added tell it again)
        known = [self._found] if self._found is not None else []
        known += [f for f in _ORDER_OF.get(self.module, ()) if f is not self._found]
        for f in known:
            if f.holds(self.scopes, runs) and not (padded and f.padless) and not (uneven and f.tied):
                self._adopt(f, entered)
                return f.order
        # (an order told without padding, told again at this padded forward: kept where the runs cannot run here)
        prior = (order, self._found, True, self._tied) if order is not None and self._padless else None
        prior_place = self.mask_from
        self.order = self._found = self.mask_from = None
        self._padless = self._tied = False
        self.unpads = frozenset()
        path: list[nn.Module] = []
        seen: list[torch.Tensor | None] = []
        located: list[MaskPlace] = []
        kept_only: list[int] = []  # (the later routers' scopes that see only the kept tokens, by id)
        # (its forwards enter no block)
        mask = kwargs.get("attention_mask")  # (the runs are given what the forward was: a mask by position twice fails)
        runs_given = kwargs if given is None else given
        if prior_place is not None:  # (its mask as given: the one found elsewhere before is looked for again)
            mask = runs_given.get("attention_mask")
            if mask is None and self.mask_at is not None and len(args) > self.mask_at:
                mask = args[self.mask_at]
        run = self._run
        if ids_name is not None:  # (the runs call the forward as it was called: its ids by name)
            run = functools.partial(_by_name, self._run, ids_name)
        if batch is not None:  # (the runs call the forward as it was called: its inputs in one mapping)
            run = functools.partial(_in_batch, run, batch)
        try:
            found = token_order(run, self.scopes, args, runs_given, self.module, path, seen, mask, located, kept_only)
        except MoEReplayError as fault:
            if not (
                getattr(fault, _ORDER_FAULT, False)
                and isinstance(fault.__cause__, TypeError)
                and self._unbound(args, runs_given, ids_name, batch)
            ):
                raise
            # (the runs called the forward as the caller did, and the caller's call does not fit its parameters:
            # the caller's own error, which the forward raises as it runs, as it does unwatched)
            found = None
        if located:  # (given by name or by place at later forwards: both, where the forward's signature has them)
            name, at, marks_padding, pad = located[0]
            if name is None and at is not None:
                name = _name_at(self.__wrapped__, at)
            elif name is not None:
                at = _place_of(self.__wrapped__, name)
            located[0] = (name, at, marks_padding, pad)
        if found is not None:
            # (the router scope it stopped at ran none of its own code: compared as a scope)
            way = [m for m in path if all(m is not s for s in self.scopes)]
            f = _Found(found, self.scopes, runs, [self.module, *way], not padded, located[0] if located else None)
            reads = mask_at(located[0], args, runs_given) if located else kwargs.get("attention_mask")
            f.tied = found != MIXED and not (shape is not None and _uneven(reads, int(shape[0]), int(shape[1])))
            f.unpads = frozenset(i for i, scope in enumerate(self.scopes) if id(scope) in kept_only)
            fed = (_inputs(args, kwargs) if inputs is None else inputs)[2]
            if seen and seen[0] is not None and fed is not None and found not in (OTHER_ORDER, MIXED) and _hooked(way):
                # told with the hooks of the modules on the way set aside: the forward itself, run with them, is
                # checked at its first router (:func:`_order_check`), and the order kept for later blocks once it
                # passed (till then the first forward of each block tells it again)
                self.order, self._found, self._padless, self.mask_from = found, None, f.padless, f.mask
                self.unpads, self._tied = f.unpads, f.tied
                self._checked.update(entered)
                grid = (int(fed[0]), int(fed[1]))
                self._verify = _order_check(seen[0], found, grid, lambda: self._keep(f))
                return found
            self._adopt(f, entered)
            self._keep(f)
        elif prior is not None:  # (its routers' rows, where fewer than its tokens, are refused as read: _ids_lost)
            self.order, self._found, self._padless, self._tied = prior
            self.mask_from = None if prior[1] is None else prior[1].mask
            self.unpads = frozenset() if prior[1] is None else prior[1].unpads
            return prior[0]
        return found or UNTOLD

    def _unbound(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], ids_name: str | None, batch: Mapping[str, Any] | None
    ) -> bool:
        """Does the call the token-order runs make of this level's forward, given ``args`` and ``kwargs`` as
        :meth:`_order` gives them (its ids by ``ids_name``, its inputs in ``batch``), not fit the forward's parameters
        (the ``TypeError`` Python raises as it binds them, before any of its code runs)? False where its parameters
        cannot be read."""
        try:
            signature = inspect.signature(self.__wrapped__)
        except (TypeError, ValueError):
            return False

        def bind(a: tuple[Any, ...], k: dict[str, Any]) -> None:
            signature.bind(*a, **k)

        check: Callable[[tuple[Any, ...], dict[str, Any]], Any] = bind
        if ids_name is not None:  # (as the runs call it: see _order)
            check = functools.partial(_by_name, check, ids_name)
        if batch is not None:
            check = functools.partial(_in_batch, check, batch)
        try:
            check(args, kwargs)
        except TypeError:
            return True
        return False

    def _keep(self, found: _Found) -> None:
        """Keep ``found``, told at the forward running now, for this level's later blocks and later sessions (settled
        as that forward ends)."""
        self._found = self._settling = found
        kept = [found, *(k for k in _ORDER_OF.get(self.module, ()) if k.runs == found.runs)][:_ORDERS_KEPT]
        _ORDER_OF[self.module] = kept

    def _adopt(self, found: _Found, entered: list[FeedRecord | FeedCheck]) -> None:
        """Take ``found`` as the order of the blocks ``entered`` (and of the later forwards of these blocks)."""
        self.order, self._found, self._padless, self.mask_from = found.order, found, found.padless, found.mask
        self.unpads, self._tied = found.unpads, found.tied
        self._checked.update(entered)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The forward it runs (for ``inspect.signature``, and what detach puts back where it is held)."""
        return self.before if self.before is not None else types.MethodType(type(self.module).forward, self.module)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # a deep copy of the model (a reference policy): the plain forward, its class's or its own before
        if self.before is None:
            return ClassForward(copy.deepcopy(self.module, memo))
        return copy.deepcopy(self.before, memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (torch.save(model), spawn): the plain forward, as a deep copy gets
        if self.before is None:
            return (ClassForward, (self.module,))
        return (operator.itemgetter(0), ((self.before,),))

    @property
    def __globals__(self) -> dict[str, Any]:  # (what torch.jit.script reads first of a forward to compile)
        raise _script_refusal(self, self.module, copied=False)

    @property
    def __code__(self) -> types.CodeType:  # (what torch.export reads of the exported module's forward)
        return _code_of(self.__wrapped__)

    def __repr__(self) -> str:
        return f"<moe_replay forward of {type(self.module).__name__} (its inputs recorded in blocks)>"


#: the records and checks whose forwards a level with a level inside leaves to it (see ``_take_deferred``)
_DEFERRED = (FeedRecord, FeedCheck, RouterFeedCheck)
_RECORD_ONLY = {FeedRecord}  # (the types of forwards left to the levels inside where no check is among them)

_compiling = dynamo_compiling  # (one frame; export traces with dynamo too, make_fx is seen by _unseen)
_TENSOR = torch.Tensor
_STRIDED = torch.strided


def one_stream(levels: Sequence[FeedForward]) -> None:
    """A level below an encoder-decoder's level (its encoder's stack, which shares the model's config and so says
    ``is_encoder_decoder`` too) is fed one token stream where its forward names no ``decoder_input_ids``:
    ``generate()`` calls the encoder on its own, and its rows are those of the ids it is fed."""
    paired = [w for w in levels if w.paired]
    for w in paired:
        if _names(w.__wrapped__, "decoder_input_ids"):
            continue
        if any(o is not w and any(m is w.module for m in o.module.modules()) for o in paired):
            w.paired = False


def _names(forward: Callable[..., Any], name: str) -> bool:
    """Does ``forward`` name a parameter ``name`` (True where no signature can be read)?"""
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return True


def _place_of(forward: Callable[..., Any], name: str) -> int | None:
    """The place of parameter ``name`` among ``forward``'s positional arguments; None where it has none (or no
    signature can be read): a decode loop may give a model its attention mask by position."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, param in enumerate(params):
        if param.kind not in positional:
            return None
        if param.name == name:
            return i
    return None


#: the names a forward's parameter for its tokens' positions goes by besides ``position_ids``: ``positions``
#: (vLLM's models), ``pos``, ``position``, ``pos_ids``, ``position_id``, and gpt-fast's and torchtune's ``input_pos``,
#: which also place the tokens in the static KV cache their modules keep (positions after the tokens such a cache
#: holds are let through by the evidence of its writes, see :func:`_static_held`)
_POSITIONS_NAME = re.compile(r"(?:input_)?pos(?:itions?)?(?:_ids?)?")
#: the names read where a forward has none of :data:`_POSITIONS_NAME`: an index of positions (``position_idx``,
#: ``pos_index``, ``position_indices``) and positions of a kind (``token_positions``, ``text_positions``); a count
#: (``start_pos``, ``max_positions``: no tensor shaped like the tokens) is never read as positions, nor are a media
#: input's (:data:`_MEDIA`)
_POSITIONS_LIKE = re.compile(r"pos(?:itions?)?_(?:idx|index|indices)|[a-z]+_positions")
#: either (a quick test of a forward's keywords before they are read: :func:`_positions_among` reads them)
_POSITIONS_ANY = re.compile(f"{_POSITIONS_NAME.pattern}|{_POSITIONS_LIKE.pattern}")


def _positions_among(names: Collection[str]) -> str | None:
    """The one name of ``names`` that says it holds the tokens' positions: the one of :data:`_POSITIONS_NAME`, else
    the one of :data:`_POSITIONS_LIKE` (never a media input's); None where there is none, or more than one of the
    first kind found (which is the tokens' is not told)."""
    for pattern in (_POSITIONS_NAME, _POSITIONS_LIKE):
        found = [n for n in names if pattern.fullmatch(n) and not _MEDIA.search(n)]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def _no_places(name: str, value: Any, mask: Any) -> bool:
    """Does ``value``, given under ``name``, a name only like a name of positions (:data:`_POSITIONS_LIKE`:
    ``word_positions``, ``position_index``), hold something else than its tokens' places? Read on the host, a
    ``[batch, positions]`` tensor of whole numbers: where two tokens side by side in a row (both kept by the
    ``[batch, positions]`` attention ``mask``, where one is given) hold the same value (a word index, sub-words of one
    word sharing it), it tells no place, as two tokens of one sequence are never at one place. Such a keyword is then
    not read as the tokens' positions (a capture does not read it either); anything else is (a device tensor: no host
    sync)."""
    if _POSITIONS_NAME.fullmatch(name) or not isinstance(value, torch.Tensor) or value.dim() != 2:
        return False
    if value.device.type != "cpu" or value.is_floating_point() or value.dtype == torch.bool or value.shape[1] < 2:
        return False
    same = value[:, 1:] == value[:, :-1]
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(value.shape) and mask.device.type == "cpu":
        kept = mask.ne(0)
        same = same & kept[:, 1:] & kept[:, :-1]
    return bool(same.any())


def _positions_name(forward: Callable[..., Any]) -> str | None:
    """The parameter of ``forward`` that its name says holds its tokens' positions (:func:`_positions_among`), where
    it declares no ``position_ids`` (None where it has none, or no signature can be read)."""
    try:
        names = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return None
    if "position_ids" in names:
        return None
    return _positions_among(names)


def _positions_open(forward: Callable[..., Any]) -> bool:
    """Does ``forward`` take any keyword (``**kwargs``) and declare no parameter for its tokens' positions (neither
    ``position_ids`` nor one :func:`_positions_name` finds)? Its positions given by a name of their own are then
    looked for among the keywords of each forward it is given."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    if "position_ids" in params or _positions_name(forward) is not None:
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _first_name(forward: Callable[..., Any]) -> str | None:
    """The name of ``forward``'s first parameter where it can be given by name and is not ``input_ids`` (read by that
    name already); None where it has none (or no signature can be read)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or params[0].kind not in named or params[0].name == "input_ids":
        return None
    return params[0].name


@inside_forward
def _by_name(
    run: Callable[[tuple[Any, ...], dict[str, Any]], Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``run`` with ``args[0]`` given as ``name`` (a forward's first parameter, given by name)."""
    return run(args[1:], {**kwargs, name: args[0]})


def _take_deferred(r: FeedRecord | FeedCheck) -> bool:
    """Feed ``r`` the forward an outer level deferred to the levels inside it (:meth:`FeedForward._feed_records`),
    where none of them was fed its ids before a router read or a level inside was fed no ids: it is that level's
    forward, ended as that level's forward ends. Returns whether it was taken."""
    pending, r._deferred = r._deferred, None
    if pending is None:
        return False
    level, args, kwargs, paired, order, later, below = pending
    if isinstance(r, FeedCheck):
        r.reach = below
    if not r.fed(args, kwargs, paired, order):
        return False
    if later:
        r.unpads(later)
    r._inside = True
    r._held_by = level
    return True


@inside_forward
def _in_batch(
    run: Callable[[tuple[Any, ...], dict[str, Any]], Any],
    batch: Mapping[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``run`` given its inputs as ``batch`` was (:meth:`FeedForward._unbatched`): ``batch``'s entries taken from
    ``kwargs`` (a token-order run's, its ids changed or its sequences rolled) in a copy of it, its only argument."""
    given = {k: kwargs[k] for k in batch if k in kwargs}
    try:
        copied: Any = copy.copy(batch)
        copied.update(given)
    except Exception:  # (a mapping that cannot be copied or updated: a plain dict of its entries)
        copied = {**batch, **given}
    return run((copied, *args), {k: v for k, v in kwargs.items() if k not in batch})


def _name_at(forward: Callable[..., Any], at: int) -> str | None:
    """The name of ``forward``'s positional parameter at place ``at``; None where it has none there."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return params[at].name if at < len(params) and all(p.kind in positional for p in params[: at + 1]) else None


class _Began(list[int]):
    """The rows a forward's routers stood at as it began, where a check of each router's own rows took it (see
    :meth:`FeedForward._placed`): compared on the device as it ends, where code compiled inside it read rows."""


def _unplaced(record: FeedRecord | FeedCheck) -> bool:
    """Must an eager forward ask ``record`` where its rows begin (:meth:`FeedForward._placed`)? A check that lost the
    host's place in them, or that checks each router's own rows."""
    return isinstance(record, FeedCheck) and (record._lost or isinstance(record, RouterFeedCheck))


def _enter_levels(levels: Sequence[FeedForward], record: FeedRecord | FeedCheck) -> Callable[[], None]:
    """Feed ``record`` the forwards entering ``levels``; returns the function that stops it."""
    for wrapper in levels:
        wrapper.records.append(record)
        wrapper.placing = wrapper.placing or _unplaced(record)

    def remove() -> None:
        for wrapper in levels:
            if record in wrapper.records:
                wrapper.records.remove(record)
            wrapper.placing = any(map(_unplaced, wrapper.records))

    return remove
