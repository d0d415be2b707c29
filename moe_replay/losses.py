"""Training losses that follow the replayed routes, and the router scores they need.

A model's own load-balancing (auxiliary) loss usually runs its own top-k again on the
router logits: transformers' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE...)
takes ``router_logits`` and calls ``torch.topk`` on them, outside the router's forward.
During a replay that top-k is neither seen nor forced by moe_replay, so such a loss
counts the experts the *current* router would choose, not the experts the forward used.
:func:`load_balancing_loss` counts the experts that were actually used (the replayed
ones) and takes its probabilities from the scores each router computed in this forward,
so its gradient reaches the routers.

Get both from the session with :meth:`Session.keep_scores`:

Example:
    >>> import torch, moe_replay as mr
    >>> model = mr.models.build("softmax_topk")
    >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
    >>> session = mr.attach(model)
    >>> with session.capture():
    ...     _ = model(x)
    >>> routes = session.routes()
    >>> with session.replay(routes), session.keep_scores() as seen:
    ...     out = model(x, labels=x)
    >>> seen
    RouterScores(routers=2, tokens=[16, 16])
    >>> aux = mr.load_balancing_loss(seen.scores, seen.indices)  # this router's top-k runs on probabilities
    >>> (out.loss + 0.01 * aux).backward()
    >>> session.detach()
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, SupportsIndex, cast

import torch

from ._arguments import _version  # (a tensor's version counter; None for an inference tensor)
from ._checks import _del_own, _set_own, check_dense, is_collection
from ._torch_compat import dynamo_compiling
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    RouterNotFoundError,
    SessionStateError,
    UnknownRouterError,
    UnsupportedRouterError,
    _ReadOnlyError,
)

__all__ = ["RouterScores", "load_balancing_loss"]

#: score tensors kept in the forward of an ``autograd.Function`` (a reentrant activation checkpoint's runs without
#: gradients): a loss on them would get no gradient, while the model's own outputs get theirs through the recompute
_OUTSIDE_GRAPH: dict[int, weakref.ref[torch.Tensor]] = {}


def _mark_outside_graph(t: torch.Tensor) -> None:
    """Note ``t`` as kept in the forward of an ``autograd.Function`` (held weakly, by identity)."""
    key = id(t)

    def forget(_: object, key: int = key) -> None:
        _OUTSIDE_GRAPH.pop(key, None)

    _OUTSIDE_GRAPH[key] = weakref.ref(t, forget)


def _kept_outside_graph(t: torch.Tensor) -> bool:
    ref = _OUTSIDE_GRAPH.get(id(t))
    return ref is not None and ref() is t


def _outside_graph_error(what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what} kept inside the forward of a reentrant activation checkpoint (use_reentrant=True, or another "
        "autograd.Function that runs its forward again in backward): that forward runs without gradients, so a "
        "loss on these scores would silently give the routers no gradient. Checkpoint with use_reentrant=False "
        "(the kept scores then carry their gradients), or compute the loss inside the checkpointed function"
    )


def _outside_graph(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and _kept_outside_graph(t)


class _Fed(NamedTuple):
    """One forward of the model while scores were kept: how a ``[batch, positions]`` mask of its tokens is put in the
    order its routers saw them."""

    #: its ``[batch, positions]``, or None where it has none (ids of another shape, an encoder-decoder's two streams)
    grid: tuple[int, int] | None
    #: its routers saw the tokens sequence-first (position 0 of every sequence, then position 1...): True; row by row:
    #: False; None where the order is not known (then ``why`` says why)
    sequence_first: bool | None
    why: str = ""


class _RowOrder(NamedTuple):
    """Whose tokens one router's kept rows are: the forwards kept in the block, and per decision (call order) its
    rows and the forward it was made in (-1: in none the session saw)."""

    forwards: tuple[_Fed, ...]
    calls: tuple[tuple[int, int], ...]


#: the row order of kept score and index tensors handed out by :class:`RouterScores` (held weakly, by identity): a
#: mask of more than one dimension is put in the order of their rows (:func:`load_balancing_loss`)
_ROW_ORDER: dict[int, tuple[weakref.ref[torch.Tensor], _RowOrder]] = {}


def _note_row_order(t: torch.Tensor, order: _RowOrder) -> None:
    key = id(t)

    def forget(_: object, key: int = key) -> None:
        _ROW_ORDER.pop(key, None)

    _ROW_ORDER[key] = (weakref.ref(t, forget), order)


def _row_order_of(t: torch.Tensor) -> _RowOrder | None:
    held = _ROW_ORDER.get(id(t))
    return held[1] if held is not None and held[0]() is t else None


#: the router whose rows a tensor holds, for the per-router tensors handed out by :class:`RouterScores` and by
#: ``Routes.per_layer()`` / ``Routes.layer()`` (held weakly, by identity): :func:`load_balancing_loss` pairs each
#: router's probabilities with its own experts by it, where the two lists are in other router orders
_ROUTER_OF: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}


def note_router(t: torch.Tensor, name: str) -> torch.Tensor:
    """Note ``t`` as holding rows of the router ``name`` (see :func:`load_balancing_loss`); returns ``t``."""
    key = id(t)

    def forget(_: object, key: int = key) -> None:
        _ROUTER_OF.pop(key, None)

    _ROUTER_OF[key] = (weakref.ref(t, forget), name)
    node = t.grad_fn  # (and on the op that made it: probabilities computed from it name the router too)
    if node is not None:
        _metadata(node).setdefault(_ROUTER_KEY, set()).add(name)  # (a node of several routers' outputs names none)
    return t


def _router_of(t: torch.Tensor) -> str | None:
    held = _ROUTER_OF.get(id(t))
    if held is not None and held[0]() is t:
        return held[1]
    return _router_in_stack(t) or _router_made_from(t)


#: tensors that stack several routers' rows along one dimension, handed out by ``Routes.indices`` (``[T, L, k]``),
#: by the address of their storage (held weakly), with their routers, that dimension, their version counter and the
#: rows each router's slot was made from: a slice of one router's rows out of them (``unbind(1)``, ``indices[:, j]``)
#: shares that storage and names its router by where it starts, while no write has moved the counter and its rows are
#: still that router's (a write that moves no counter, through ``.data`` or numpy, is seen by its values; see
#: :func:`_router_in_stack`)
_STACKS: dict[int, tuple[weakref.ref[torch.Tensor], tuple[str, ...], int, int, tuple[torch.Tensor, ...]]] = {}


def note_stack(t: torch.Tensor, names: Sequence[str], dim: int, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Note ``t`` as holding the rows of the routers ``names`` along its dimension ``dim``, one router at each index,
    made from ``rows`` (each router's, in any integer dtype, held as they are: the routes' own, no copy; see
    :func:`load_balancing_loss`); returns ``t``."""
    key, version = _storage_address(t), _version(t)
    if key is None or version is None or int(t.shape[dim]) != len(names) or len(rows) != len(names):
        return t

    def forget(_: object, key: int = key) -> None:
        held = _STACKS.get(key)
        if held is not None and held[0]() is None:
            del _STACKS[key]

    _STACKS[key] = (weakref.ref(t, forget), tuple(names), dim, version, tuple(rows))
    return t


def _storage_address(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or None where it has none that can be read (a meta tensor, or any tensor
    while ``torch.compile`` traces: compiled code reads no address)."""
    if dynamo_compiling() or t.layout is not torch.strided or t.is_meta:
        return None
    try:
        return int(t.untyped_storage().data_ptr()) or None
    except (RuntimeError, NotImplementedError):
        return None


def _router_in_stack(t: torch.Tensor) -> str | None:
    """The router whose rows ``t`` is, where ``t`` is one router's slice of a stack :func:`note_stack` noted that
    is still alive: it shares the stack's storage, has its shape and strides without the stacked dimension, and
    starts at one of that dimension's indices. None otherwise: a copy names nothing, nor does a slice of a stack
    written in place since it was handed out (by the caller, or through any slice of it: routers reordered with
    ``ind.copy_(ind.flip(1))``, one slot refilled with another's rows), whose slots may hold other routers' rows;
    a write no version counter sees (through ``.data``, or numpy's view of it) is told by the slice's values, which
    must be the rows its router's slot held when the stack was handed out."""
    key = _storage_address(t)
    held = _STACKS.get(key) if key is not None else None
    stack = held[0]() if held is not None else None
    if held is None or stack is None or _storage_address(stack) != key or _version(stack) != held[3]:
        return None
    names, dim = held[1], held[2]
    shape, strides = list(stack.shape), list(stack.stride())
    step = strides.pop(dim)
    del shape[dim]
    if t.dtype != stack.dtype or list(t.shape) != shape or list(t.stride()) != strides or step <= 0:
        return None
    at, off = divmod(int(t.storage_offset()) - int(stack.storage_offset()), int(step))
    if off != 0 or not 0 <= at < len(names) or not torch.equal(t, held[4][at].to(t.dtype)):
        return None
    return names[at]


#: the key under which :func:`note_router` marks the autograd node that made a router's noted tensor
_ROUTER_KEY = "moe_replay.router"
#: how many ops back from a tensor :func:`_router_made_from` looks for a noted router's scores
_ROUTER_DEPTH = 3


#: the indices each router's kept scores were kept with (see :meth:`RouterScores.scores`), by the scores' id (held
#: weakly): a copy of indices that names no router is compared with them (see :func:`_copies_in_order`)
_KEPT: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
#: the key of an autograd node's metadata under which kept scores note their indices, by router (see :data:`_KEPT`):
#: probabilities computed from them find them a few ops back
_KEPT_KEY = "moe_replay.kept_indices"


def _note_kept(scores: torch.Tensor, name: str, indices: torch.Tensor) -> None:
    """Note ``indices`` as the experts router ``name``'s kept ``scores`` were kept with (see :data:`_KEPT`)."""
    key = id(scores)

    def forget(_: object, key: int = key) -> None:
        _KEPT.pop(key, None)

    _KEPT[key] = (weakref.ref(scores, forget), indices)
    node = scores.grad_fn
    if node is not None:
        _metadata(node).setdefault(_KEPT_KEY, {})[name] = indices


def _kept_with(p: torch.Tensor, name: str) -> torch.Tensor | None:
    """The indices router ``name``'s kept scores were kept with, where ``p`` are those scores or were computed from
    them a few ops back (as :func:`_router_made_from` finds them); None where not known."""
    held = _KEPT.get(id(p))
    if held is not None and held[0]() is p:
        return held[1]
    if dynamo_compiling():
        return None
    level = [] if p.grad_fn is None else [p.grad_fn]
    seen: dict[int, Any] = {}
    for _ in range(_ROUTER_DEPTH + 1):
        below = []
        for node in level:
            if id(node) in seen:
                continue
            seen[id(node)] = node
            found = _metadata(node).get(_KEPT_KEY, {}).get(name)
            if found is not None:
                return cast(torch.Tensor, found)
            below += [n for n, _ in node.next_functions if n is not None]
        level = below[:64]
    return None


def _copies_in_order(
    probs: list[torch.Tensor], indices: list[torch.Tensor], mine: list[str | None], theirs: list[str | None]
) -> None:
    """Refuse indices that name no router (a copy: a clone, numpy rows) given beside probabilities that name theirs,
    where on the host they hold exactly the rows another router's scores were kept with and not those of the router
    whose probabilities they are paired with: lists in other router orders, each router's probabilities counted with
    another's experts. ``mine``, ``theirs``: the routers ``probs`` and ``indices`` name (:func:`_router_of`). Copies
    of other rows (an engine's) are not told apart, and on an accelerator nothing is read (no host sync)."""
    kept = [None if n is None else _kept_with(p, n) for p, n in zip(probs, mine, strict=True)]
    if sum(k is not None for k in kept) < 2:
        return
    for i, x in enumerate(indices):
        own = kept[i]
        if own is None or theirs[i] is not None or not _host_rows(x) or _same_rows(x, own):
            continue
        other = next((j for j, k in enumerate(kept) if j != i and k is not None and _same_rows(x, k)), None)
        if other is not None:
            raise InvalidArgumentError(
                f"load_balancing_loss: probs[{i}] are router '{mine[i]}''s, but indices[{i}], which name no router "
                f"(a copy: a clone, numpy rows), hold exactly the experts router '{mine[other]}''s scores were kept "
                f"with (probs[{other}]), not router '{mine[i]}''s: the two lists hold their routers in other orders, "
                "and each router's probabilities would be counted with another router's experts. Pass them in one "
                "order, or pass indices that name their routers (kept.indices, routes.per_layer(), routes.layer(n))"
            )


def _host_rows(x: torch.Tensor) -> bool:
    """Are ``x``'s values readable at no cost (on the host, outside compiled code)?"""
    return x.device.type == "cpu" and not dynamo_compiling()


def _same_rows(x: torch.Tensor, kept: torch.Tensor) -> bool:
    """Does ``x`` hold exactly the rows ``kept`` (on the host: else not compared, no host sync)?"""
    if not _host_rows(kept) or tuple(x.shape) != tuple(kept.shape) or x.dtype.is_floating_point:
        return False
    return bool(torch.equal(x.long(), kept.long()))


def _router_made_from(t: torch.Tensor) -> str | None:
    """The router whose noted scores ``t`` was computed from, a few ops back (``scores.softmax(-1)``,
    ``scores.float().sigmoid()``, a renormalisation), through its autograd graph.

    None where no op within :data:`_ROUTER_DEPTH` made noted scores, where the nearest such ops are of several
    routers, or where ``t`` has no graph (made without gradients, or traced by ``torch.compile``). Probabilities made
    from kept scores then pair with their own router's indices as the kept scores do, in whichever order the two
    lists hold the routers."""
    if dynamo_compiling():  # (a traced tensor's graph is not the one its values will have: not read)
        return None
    level = [] if t.grad_fn is None else [t.grad_fn]
    # (the nodes seen, held: torch makes a new Python object for a node at each access, and an id of one let go
    # could come back as another node's)
    seen: dict[int, Any] = {}
    for _ in range(_ROUTER_DEPTH + 1):
        names: set[str] = set()
        below = []
        for node in level:
            if id(node) in seen:
                continue
            seen[id(node)] = node
            names |= _metadata(node).get(_ROUTER_KEY, set())
            below += [n for n, _ in node.next_functions if n is not None]
        if names:  # (the nearest noted ops: a router's own scores come before those of the layers under it)
            return next(iter(names)) if len(names) == 1 else None
        level = below[:64]
    return None


def _metadata(node: Any) -> dict[str, Any]:
    """An autograd node's ``metadata`` dict (an attribute of torch's nodes, typed as a method in its stubs)."""
    held = node.metadata
    return cast(dict[str, Any], held() if callable(held) else held)


def _same_router(a: str, b: str) -> bool:
    """Do router names ``a`` and ``b`` name one router, under other wrappers at most? Past their common trailing
    module names, what differs holds no index into a module list (``module.layers.0.gate`` is ``layers.0.gate``;
    ``layers.0.gate`` is not ``layers.2.gate``), and the names other than a wrappers' are on one side only or the
    same on both (``decoder.layers.0.gate`` is ``layers.0.gate``, not ``encoder.layers.0.gate``;
    ``language_model.model.layers.0.gate`` is ``model.language_model.layers.0.gate``)."""
    if a == b:
        return True
    x, y = a.split("."), b.split(".")
    common = 0
    while common < min(len(x), len(y)) and x[-1 - common] == y[-1 - common]:
        common += 1
    rest = [[p for p in v[: len(v) - common] if p not in _WRAPPERS] for v in (x, y)]
    # (past the common names, one side holds wrapper names at most: ``encoder.layers.0.gate`` is no
    # ``decoder.layers.0.gate``, nor ``vision.layers.0.gate`` a ``text.layers.0.gate``)
    apart = rest[0] and rest[1] and sorted(rest[0]) != sorted(rest[1])  # (a VLM's parts in another order: one router)
    return bool(common) and not apart and not any(p.isdigit() for p in (*rest[0], *rest[1]))


#: module names that wrappers put in front of a router's path (DDP's and DeepSpeed's ``module``, PEFT's
#: ``base_model.model``, a causal LM's ``model``, FSDP1's, activation checkpointing's and ``torch.compile``'s)
_WRAPPERS = frozenset(
    {"module", "model", "base_model", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
)


def _by_router(probs: list[torch.Tensor], indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """``indices`` in the router order of ``probs``, where both name their routers (see :func:`note_router`).

    Two lists of the same shapes in other router orders (kept scores with a Routes' rows of another order, one
    list reordered) would pair each router's probabilities with another router's experts: a wrong loss, without a
    word. Where every tensor of both lists names its router, the same routers on both sides, the indices are put in
    the order of the probabilities (the loss is then each router's own); where only some do and they disagree, a
    clear error. Names that differ only by leading module names (routes renamed, ``module.`` of DDP) name one router.
    """
    mine, theirs = [_router_of(p) for p in probs], [_router_of(x) for x in indices]
    if None in theirs and len(probs) == len(indices):
        _copies_in_order(probs, indices, mine, theirs)
    wrong = [
        i
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True))
        if a is not None and b is not None and not _same_router(a, b)
    ]
    if not wrong:
        return indices
    known = None not in mine and None not in theirs
    if known and len(set(mine)) == len(mine) and set(mine) == set(theirs):
        exact = {n: j for j, n in enumerate(theirs)}
        return [indices[exact[n]] for n in mine if n is not None]
    if known and len(set(mine)) == len(mine) and len(set(theirs)) == len(theirs):
        # (each router of the probabilities, one of the indices' under other wrappers or a module name on one side
        # only, as a capture's routes of a model held in 'backbone.' replayed on the backbone: paired by name)
        at = [[j for j, b in enumerate(theirs) if b is not None and _same_router(a, b)] for a in mine if a is not None]
        if all(len(c) == 1 for c in at) and len({c[0] for c in at}) == len(at):
            return [indices[c[0]] for c in at]
    i = wrong[0]
    raise InvalidArgumentError(
        f"load_balancing_loss: probs[{i}] are router '{mine[i]}''s, but indices[{i}] are router '{theirs[i]}''s: the "
        "two lists hold their routers in other orders, and each router's probabilities would be counted with "
        "another router's experts. Pass them in one order: kept.scores with kept.indices, or the rows of Routes in "
        "the order of the scores ([routes.layer(n) for n in kept.names], routes.select(kept.names).per_layer())"
    )


#: one kept decision: the scores, the experts used, the masked copy of the scores the top-k ran on (or None), and
#: whether the scores were made through a squashing after the logits (None: unknown)
_Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool | None]


class _Calls(list[_Call]):
    """One router's kept decisions (what its hook appends), each noted with the forward it was made in."""

    def __init__(self, owner: RouterScores) -> None:
        super().__init__()
        self.owner = owner
        self.forward_of: list[int] = []  # per decision, its forward in owner._forwards (-1: none seen)
        #: per decision, its scores' version counter as kept (views share it): moved, something wrote into them since
        self.versions: list[int | None] = []

    def append(self, item: _Call) -> None:
        self.forward_of.append(self.owner._now)
        self.versions.append(None if dynamo_compiling() else _version(item[0]))  # (compiled: not traced, not checked)
        super().append(item)

    def extend(self, items: Iterable[_Call]) -> None:
        for item in items:
            self.append(item)

    def __reduce__(self) -> tuple[object, ...]:
        # (copied or pickled as a whole: the default puts the items back through append() before the state that notes
        # their forwards, which then fails or notes every item twice)
        return _rebuilt_calls, (self.owner, list(self), list(self.forward_of))


def _rebuilt_calls(owner: RouterScores, items: list[_Call], forward_of: list[int]) -> _Calls:
    """A :class:`_Calls` of a copy or an unpickled :class:`RouterScores`: its items and their forwards as they were."""
    calls = _Calls.__new__(_Calls)
    list.extend(calls, items)
    calls.owner, calls.forward_of = owner, forward_of
    calls.versions = [_version(item[0]) for item in items]  # (a copy's own tensors, as they are now)
    return calls


def _check_unwritten(name: str, calls: _Calls) -> None:
    """Refuse one router's kept scores where something wrote into them in place after its decision was made on them
    (the model's code after the router returned: a ``masked_fill_``, an in-place softmax or division): they no longer
    hold what the decision was made on, and a loss on them would count other values."""
    moved = [
        i for i, (c, v) in enumerate(zip(calls, calls.versions, strict=False)) if v is not None and _version(c[0]) != v
    ]
    if moved:
        raise UnsupportedRouterError(
            f"router '{name}''s scores kept by keep_scores() were written in place after its decision was made on "
            f"them (decision {moved[0]} of {len(calls)} kept): the model's code after the router changed the tensor "
            "the top-k read (an in-place masked_fill_, division or softmax), so the kept scores no longer hold what "
            "the experts were chosen from, and a load-balancing loss on them would count other values. Make the "
            "later write out of place (scores = scores.masked_fill(...)), or compute the loss from the router's "
            "own outputs"
        )


class RouterScores:
    """What each router's decision call saw while :meth:`Session.keep_scores` was open.

    For every router: the score tensor its top-k (or argmax) ran on, ``[tokens, E]``, with
    its autograd graph, and the experts the forward used, ``[tokens, k]`` int64 (the
    forced ones during a replay). Several forwards are concatenated in call order.
    Recomputes of activation checkpointing are not counted again. Read by router name
    (``kept[name]``, ``name in kept``); iterating gives the names.

    The scores are what the model passed to its top-k: probabilities for routers that
    pick on softmax outputs (Qwen-MoE, Mixtral in transformers), logits for routers that
    pick first and softmax the k after (``softmax(scores)`` gives the probabilities), and
    whatever a biased or group-limited router selects on (DeepSeek-V3 selects on detached
    scores plus a bias: no gradient flows through those).

    The rows are in the order the router saw the tokens. Each forward of the model is noted
    with its ``[batch, positions]`` and that order, told as a capture tells it (by effect, at
    the first forward that can show it): row by row for most models, position by position
    for layers that run ``[positions, batch, hidden]`` (fairseq, Megatron), where row
    ``p * batch + b`` is token ``(b, p)``. The tensors handed out (``scores``, ``indices``,
    ``kept[name]``) carry it, so that :func:`load_balancing_loss` and :meth:`row_mask` give each
    row its own token's weight of an attention mask in either order.

    A forward of the model that raises after some of its routers' decisions were kept (Ctrl-C, or
    an error caught inside the block and the forward retried) leaves rows of a forward that stopped
    half-way: reading them (``scores``, ``indices``, ``kept[name]``, :meth:`row_mask`) then raises
    ``SessionStateError``, as :meth:`Session.routes` does after an interrupted capture; keep the
    scores again around forwards that complete.

    Example:
        >>> import torch, moe_replay as mr
        >>> model = mr.models.build("softmax_topk")
        >>> x = torch.randint(0, model.config.vocab_size, (2, 8))
        >>> with mr.attach(model) as session, session.keep_scores() as kept:
        ...     out = model(x, labels=x)
        >>> kept
        RouterScores(routers=2, tokens=[16, 16])
        >>> scores, experts = kept["layers.0.mlp.router"]
        >>> tuple(scores.shape), tuple(experts.shape)
        ((16, 8), (16, 2))
        >>> aux = mr.load_balancing_loss(kept.scores, kept.indices)  # differentiable in the scores
        >>> (out.loss + 0.01 * aux).backward()
        >>> mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])  # the batch's attention mask
        >>> [tuple(w.shape) for w in kept.row_mask(mask)]  # each kept row's own token's weight
        [(16,), (16,)]
    """

    #: the routers, in module order (what iterating gives)
    names: tuple[str, ...]
    # per decision: the scores, the experts used, the masked copy of the scores the top-k ran on where a group-limited
    # router masks them first (None otherwise: the top-k ran on the scores themselves), and whether the scores were
    # made through a squashing after the logits (see Evidence.squashed; None: unknown)
    _calls: dict[str, _Calls]
    # the forwards of the model that entered it while the scores were kept, in call order (told by the session's
    # forward of the model: see _began), and the one running now (-1: none)
    _forwards: list[_Fed]
    _now: int
    # decisions kept when the forward that began last began (see _raised)
    _kept_at_begin: int
    # a forward that raised after some of its routers' decisions were kept (what it raised), else None
    _interrupted: str | None

    def __init__(self, names: Sequence[str]) -> None:
        # (its state is written into its __dict__, past __setattr__, which refuses public names: built per block of
        # keep_scores() and told of each forward of the model, it costs no more than a plain object)
        own = self.__dict__
        own["names"] = tuple(names)
        own["_calls"] = {n: _Calls(self) for n in self.names}
        own.update(_forwards=[], _now=-1, _kept_at_begin=0, _interrupted=None)

    def __setattr__(self, name: str, value: Any) -> None:
        """Kept scores are what the routers saw: an attribute set on them is refused, naming what to do instead,
        where it would otherwise be kept without a word (a misspelt name) or change what they hand out
        (``kept.scores = ...``, which :func:`load_balancing_loss` would never read). A method may be wrapped on the
        instance (a spy or a mock of it)."""
        if not _set_own(self, name, value):
            raise _ReadOnlyError(f"{name!r} cannot be set on RouterScores: {_scores_instead(name)}")

    def __delattr__(self, name: str) -> None:
        """An attribute deleted from kept scores is refused as one set on them is (a method wrapped on the instance
        may be taken off again)."""
        if not _del_own(self, name):
            raise _ReadOnlyError(f"{name!r} cannot be deleted from RouterScores: {_scores_instead(name)}")

    def __copy__(self) -> RouterScores:
        # (a shallow copy shares the scores, their graph too: only a deep copy or a pickle cuts them from it)
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # a copy of scores with their autograd graph would be cut from it (torch pickles them as leaves, and a deep
        # copy of a non-leaf raises): a loss on them would then send no gradient to any router, without an error
        live = [n for n, calls in self._calls.items() if any(c[0].grad_fn is not None for c in calls)]
        if live:
            raise InvalidArgumentError(
                f"these RouterScores hold the autograd graph of the forward they were kept in (router '{live[0]}'"
                f"{f' and {len(live) - 1} more' if len(live) > 1 else ''}): a copy or a pickle would cut the scores "
                "from it, and a loss on them would send no gradient to any router. Compute the loss on these scores, "
                "or copy what you need detached: [s.detach() for s in kept.scores] and kept.indices"
            )
        return super().__reduce_ex__(protocol)

    def _began(self, grid: tuple[int, int] | None, sequence_first: bool | None, why: str = "") -> None:
        """A forward of the model begins: its ``[batch, positions]`` (None: none) and whether its routers see them
        sequence-first (None: not known, ``why``)."""
        self._forwards.append(_Fed(grid, sequence_first, why))
        own = self.__dict__  # (past __setattr__: see __init__)
        own["_now"] = len(self._forwards) - 1
        own["_kept_at_begin"] = self._kept()

    def _kept(self) -> int:
        """Decisions kept so far, over all routers."""
        return sum(len(calls) for calls in self._calls.values())

    def _raised(self, exc: BaseException) -> None:
        """A forward of the model raised ``exc``: where some of its routers' decisions were kept before it did, the
        kept rows hold a forward that stopped half-way (a router after the one that raised kept none of its tokens,
        and the tokens of the ones before never reached the loss), which :meth:`_get` refuses from then on."""
        if self._interrupted is None and self._kept() != self._kept_at_begin:
            self._interrupted = f"{type(exc).__name__}({str(exc)[:200]!r})"

    def _ended(self) -> None:
        """The forward of the model that began last has ended."""
        self.__dict__["_now"] = -1  # (past __setattr__: see __init__)

    def _row_order(self, name: str) -> _RowOrder:
        calls = self._calls[name]
        rows = [int(c[0].shape[0]) for c in calls]
        seen = getattr(calls, "forward_of", [])
        forwards = [*seen[: len(rows)], *[-1] * (len(rows) - len(seen))]  # (-1: decisions put in otherwise)
        return _RowOrder(tuple(self._forwards), tuple(zip(rows, forwards, strict=True)))

    def _squashed(self, name: str) -> bool | None:
        """Were one router's scores made through a squashing (a sigmoid) after its logits, as its forward showed when
        its decision was established? None where that is not known (see :attr:`Evidence.squashed`)."""
        marks = {c[3] for c in self._calls[name]}
        return True if True in marks else (False if marks == {False} else None)

    def _get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._interrupted is not None:
            tokens = ", ".join(f"'{n}': {sum(int(c[0].shape[0]) for c in self._calls[n])}" for n in self.names[:4])
            raise SessionStateError(
                f"a forward of the model raised {self._interrupted} while these scores were kept, after some of its "
                f"routers' decisions were kept: the rows hold a forward that stopped half-way (rows per router: "
                f"{tokens}{' ...' if len(self.names) > 4 else ''}), and a loss on them would count tokens the model "
                "never finished, or some routers' only. Keep the scores again, around forwards that complete (a "
                "forward retried after an error in its own `with session.keep_scores():` block)"
            )
        calls = self._calls[name]
        if not calls:
            raise RouterNotFoundError(
                f"router '{name}' made no decision while the scores were kept; run the forward inside "
                "`with session.keep_scores():`"
            )
        _check_unwritten(name, calls)
        if len(calls) == 1:
            scores, indices = calls[0][0], calls[0][1]
        else:
            scores, indices = torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls])
            if any(_kept_outside_graph(c[0]) for c in calls):
                _mark_outside_graph(scores)
        order = self._row_order(name)  # (what a mask of the batch's tokens is put in the order of: _in_row_order)
        _note_row_order(scores, order)
        _note_row_order(indices, order)
        _note_kept(scores, name, indices)
        return note_router(scores, name), note_router(indices, name)

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [T, E], indices [T, k])`` of one router."""
        if not isinstance(name, str):
            raise ArgumentTypeError(f"RouterScores are read by router name (a str, one of .names), got {name!r:.60}")
        if name not in self._calls:
            raise UnknownRouterError(f"no router named '{name}'; the routers are {list(self.names)}")
        return self._get(name)

    def _choice_scores(self, name: str) -> torch.Tensor:
        """``[T, E]`` detached: what one router's top-k picked from, whose top-k is its free choice (the masked
        copy of a group-limited router's scores, where its group mask leaves out experts; else the scores)."""
        self._get(name)  # (a router that made no decision: the error that says so)
        parts = [(c[2] if c[2] is not None else c[0].detach()) for c in self._calls[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def scores(self) -> list[torch.Tensor]:
        """Per router, the ``[T, E]`` scores its decision was made on (with gradients).

        Raises:
            InvalidArgumentError: with gradients on, scores kept in the forward of a reentrant
                activation checkpoint, which has none (a loss on them would give the routers none).
            SessionStateError: a forward raised after some of its routers' decisions were kept.
        """
        out = [self._get(n)[0] for n in self.names]
        bad = [n for n, s in zip(self.names, out, strict=True) if _outside_graph(s)]
        if bad:
            raise _outside_graph_error(f"the scores of router '{bad[0]}' were")
        return out

    def _outside_graph_router(self) -> str | None:
        """The first router whose scores, with gradients on, were kept where they have none (the forward of a
        reentrant activation checkpoint): :attr:`scores` refuses them. None where every router's carry theirs."""
        return next((n for n in self.names if _outside_graph(self._get(n)[0])), None)

    @property
    def indices(self) -> list[torch.Tensor]:
        """Per router, the ``[T, k]`` experts the forward used."""
        return [self._get(n)[1] for n in self.names]

    def row_mask(self, mask: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per router, the weight of each kept row's own token, ``[T]``, from a mask of the batch's tokens.

        For a loss of one's own on the kept scores (a router z-loss, a per-token statistic)
        the way :func:`load_balancing_loss` reads its ``mask``.

        Args:
            mask: the attention mask of the forwards kept: one ``[batch, positions]`` tensor
                (several forwards' stacked along the batch), or a list of masks, one per
                forward of the model kept, in call order (each its ``[batch, positions]``, or its
                tokens' weights in the order its routers saw them, one dimension). A
                one-dimensional tensor is one weight per row, in the order of the rows, and is
                given as it is.

        Returns:
            One ``[T]`` tensor per router, in the order of :attr:`names`, on ``mask``'s device.

        Raises:
            InvalidArgumentError: a mask that does not match the forwards kept (a one-dimensional
                one of another length than a router's rows included), or one of a
                forward whose routers' order is not known (one fed embeddings whose order could
                not be told, an encoder-decoder's, one whose rows are not one per token), or
                decisions kept in no forward of the model the session saw; on the CPU, a mask with
                negative or non-finite weights.
            RouterNotFoundError: a router that made no decision while the scores were kept.
        """
        masks = _masks(mask)
        if masks is None:
            raise ArgumentTypeError("row_mask takes a mask of the batch's tokens, got None")
        listed = not isinstance(mask, torch.Tensor)
        out = []
        for n in self.names:
            rows = int(self._get(n)[0].shape[0])  # (a router that made no decision: the error that says so)
            if listed or masks[0].dim() > 1:
                w = _in_row_order(masks, listed, self._row_order(n), f"router '{n}'")
            else:
                w = masks[0].reshape(-1)
            host = w.device.type == "cpu" and not torch.compiler.is_compiling()  # (no sync spent elsewhere)
            _check_row_weights(w, rows, f"router '{n}'", host=host)
            out.append(w)
        return out

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        """The router names, as a mapping's keys (``kept[name]`` reads one)."""
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._calls

    def __repr__(self) -> str:
        tokens = [sum(int(c[0].shape[0]) for c in self._calls[n]) for n in self.names]
        shown = str(tokens) if len(tokens) <= 8 else f"[{', '.join(map(str, tokens[:8]))}, ...]"
        cut = f", interrupted by {self._interrupted}" if self._interrupted is not None else ""
        return f"RouterScores(routers={len(self.names)}, tokens={shown}{cut})"


def _scores_instead(name: str) -> str:
    """What to do instead of setting the attribute ``name`` on :class:`RouterScores`."""
    if name == "names" or isinstance(getattr(RouterScores, name, None), property):
        return (
            "it is read from what the routers' decisions kept while keep_scores() was open. Compute on what they "
            "hand out (kept.scores, kept.indices, kept[name]) into values of your own"
        )
    held = sorted({"names", *(n for n in dir(RouterScores) if not n.startswith("_"))})
    return (
        f"RouterScores have no attribute {name!r} (a misspelt one? theirs: {', '.join(held)}); keep your own data "
        "beside them (a dict or a dataclass holding them)"
    )


def load_balancing_loss(
    probs: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss from the experts used and the current router probabilities.

    For each router, ``E * sum_e f_e * P_e``, where ``f_e`` is the number of (token, slot)
    assignments to expert ``e`` divided by the number of tokens (so ``sum_e f_e = k``) and
    ``P_e`` the mean probability of ``e`` over the tokens; the result is the mean over
    routers. It is 1 per slot (``k`` in all) when routing is uniform. This is the formula of
    transformers' ``load_balancing_loss_func`` (models/mixtral/modeling_mixtral.py) for one
    layer; that function pools the tokens of all layers into one count instead of averaging
    per layer, and re-runs top-k on the logits. Divide by ``k`` for Megatron's normalisation.

    Models' own aux losses re-run top-k on the router logits, so they do not follow the
    replay: use this one, with ``probs`` and ``indices`` from :meth:`Session.keep_scores`.

    Args:
        probs: ``[T, E]`` router probabilities (one tensor, or one per router); gradients
            flow through them. Pass ``scores.softmax(-1)`` for routers whose top-k runs on
            logits.
        indices: ``[T, k]`` experts each token used (one tensor, or one per router), on any
            device (``Routes.layer(name)`` is on the host): they are moved to ``probs``' device.
            Each is paired with the probabilities of its router: where both lists are tensors that
            name their routers (those of :meth:`Session.keep_scores`, probabilities computed from its scores with
            gradients on, a few ops back such as ``scores.softmax(-1)``, ``Routes.per_layer()``,
            ``Routes.layer(name)``, one router's rows sliced out of a live ``Routes.indices`` such as
            ``routes.indices.unbind(1)``) and hold the same routers in other orders, by those names;
            where only some name them and they disagree, the call is refused. A copy (a clone, numpy
            rows), and a slice of a ``Routes.indices`` written in place since, name no router; on the
            host, beside kept scores (or probabilities made from them), one that holds exactly the rows
            another router's scores were kept with, not its own router's, is refused.
        mask: optional weights of the tokens to count, e.g. the attention mask; padding gets
            0. One dimension: one weight per row, ``[T]``, in the order of the rows. More than one
            (the batch's ``[batch, positions]`` attention mask, or several forwards' stacked along
            the batch), or a list of masks, one per forward kept: only with the scores and
            indices of :meth:`Session.keep_scores` (``kept.scores``, ``kept.indices``,
            ``kept[name]``, or probabilities made from the kept scores, row for row, with the kept
            indices or the indices of the routes replayed), which know whose token each row is:
            each row gets its own token's weight, also where the routers saw the batch sequence-first
            (see :meth:`RouterScores.row_mask`). A router with no token counted (all padding, or
            no token at all) contributes 0. Rows of ``indices`` that are all -1 (a token Routes hold
            no route for: the padding of a :class:`~moe_replay.BatchLayout`) count for nothing where
            the mask gives them weight 0.

    Returns:
        A scalar float32 tensor.

    Raises:
        InvalidArgumentError: shapes that do not match or hold no expert (k or E of 0), indices
            that are not integers, probs that are not floating point, probs that are scores kept
            (with gradients on) in the forward of a reentrant activation checkpoint, which has no
            gradients, probs and indices that name other routers at one place, copies of another router's kept
            rows beside its probabilities (see ``indices``), a mask of more
            than one dimension (or a list of masks) for rows whose
            tokens are not known (tensors not kept by :meth:`Session.keep_scores`, a forward whose
            routers' order is not known: see :meth:`RouterScores.row_mask`) or that does not match
            the forwards kept; or (on the CPU) indices that are not experts ``0..E-1`` (a -1 row
            of a token the mask counts) or repeat an expert in a counted row, probs that are
            negative or above 1 (logits) or not finite, or that sum to 1 over the tokens, not the
            experts (``scores.softmax(0)``), a mask with negative or non-finite weights.
            On an accelerator, and in compiled code, out-of-range indices stop the kernel that
            counts them instead, and the other values are not checked (no host sync is spent on
            the checks).
        ArgumentTypeError: ``probs``, ``indices`` or ``mask`` that are not tensors (or lists of them),
            ``probs`` or ``indices`` that are not dense (sparse, nested, quantized), or a complex mask.

    Example:
        >>> import torch, moe_replay as mr
        >>> probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
        >>> mr.load_balancing_loss(probs, torch.tensor([[0], [0]]))  # 2 * (1.0 * 0.65 + 0.0 * 0.35)
        tensor(1.3000)
    """
    probs, indices = _tensors(probs, "probs"), _tensors(indices, "indices")
    for what, values in (("probs", probs), ("indices", indices)):
        for i, x in enumerate(values):
            check_dense(x, f"{what}[{i}]")  # (sparse, nested, quantized: torch's own error at some later step)
            if x.device.type == "meta" and what == "indices":
                raise InvalidArgumentError(f"indices[{i}] are on the meta device: they hold no experts")
    bad = [i for i, p in enumerate(probs) if _outside_graph(p)]
    if bad:
        raise _outside_graph_error(f"probs of router {bad[0]} are scores")
    if len(probs) != len(indices) or not probs:
        stacked = [
            f"{what} is one tensor of shape {tuple(v[0].shape)}"
            for what, v in (("probs", probs), ("indices", indices))
            if len(v) == 1 and v[0].dim() == 3
        ]
        raise InvalidArgumentError(
            f"load_balancing_loss takes one probability tensor per index tensor, got {len(probs)} and {len(indices)}"
            + (
                f"; {stacked[0]}, the [tokens, routers, ...] of all routers at once (as routes.indices): pass one "
                "tensor per router, e.g. routes.per_layer() or list(t.unbind(1))"
                if stacked
                else ""
            )
        )
    indices = _by_router(probs, indices)  # (each router's probabilities with its own experts)
    masks = _masks(mask)
    listed = masks is not None and not isinstance(mask, torch.Tensor)  # (one mask per forward kept)
    # (a mask of the batch's tokens, of more than one dimension: put in the order of each router's kept rows)
    by_token = masks is not None and (listed or masks[0].dim() > 1)
    orders = (
        [_pair_order(p, idx, i) for i, (p, idx) in enumerate(zip(probs, indices, strict=False))] if by_token else []
    )
    losses = []
    for i, (p, idx) in enumerate(zip(probs, indices, strict=True)):
        if p.device.type == "cpu":
            idx = idx.cpu()  # checked below at no cost
        if p.dim() != 2 or idx.dim() != 2 or p.shape[0] != idx.shape[0]:
            raise InvalidArgumentError(
                f"router {i}: probs must be [tokens, experts] and indices [tokens, k] with the same tokens, "
                f"got {tuple(p.shape)} and {tuple(idx.shape)}"
            )
        t, e = p.shape
        if idx.shape[1] == 0 or e == 0:  # (the formula would give 0 and no gradient: no decision was counted)
            raise InvalidArgumentError(
                f"router {i}: a router picks k >= 1 of E >= 1 experts per token, got indices {tuple(idx.shape)} over "
                f"probs {tuple(p.shape)}"
            )
        if not p.dtype.is_floating_point:
            raise InvalidArgumentError(f"router {i}: probs must be floating-point probabilities, got {p.dtype}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise InvalidArgumentError(f"router {i}: indices must be integers (expert numbers), got {idx.dtype}")
        host = p.device.type == "cpu" and not torch.compiler.is_compiling()
        if host and p.numel():
            low, high = torch.stack([p.detach().min(), p.detach().max()]).float().tolist()
            # (above 1 by more than rounding: positive logits, or exp() of them, are no probabilities either)
            over = high > 1 + 8 * torch.finfo(p.dtype).eps
            if not math.isfinite(float(p.detach().sum())) or low < 0 or over:
                got = "a NaN or infinite value"
                if math.isfinite(low) and math.isfinite(high) and (low < 0 or over):
                    got = f"a minimum of {low:.4g}" if low < 0 else f"a maximum of {high:.4g}"
                raise InvalidArgumentError(
                    f"router {i}: probs must be probabilities (finite, from 0 to 1), got {got}: for scores that are "
                    "logits pass scores.softmax(-1)"
                )
        if masks is None:
            w = torch.ones(t, device=p.device)
        else:
            w = _in_row_order(masks, listed, orders[i], f"router {i}") if by_token else masks[0].reshape(-1)
            w = w.to(p.device, torch.float32)
        if mask is not None:
            _check_row_weights(w, t, f"router {i}", host=host)
        if host and t:
            _check_distributions(p, w, f"router {i}")
        if mask is not None and idx.numel():
            idx = _skip_unrecorded(idx, w)  # (-1 rows of Routes at padding, weight 0: no expert counted there)
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            # on the host at no cost; on an accelerator, or compiled, the kernel refuses them (no sync here)
            low, high = torch.stack([idx.min(), idx.max()]).tolist()
            if low < 0 or high >= e:
                raise InvalidArgumentError(
                    f"router {i}: indices must be experts 0..{e - 1}, got values from {low} to {high} (-1 marks an "
                    "unrecorded row of Routes: select the recorded tokens, or give such rows weight 0 in mask)"
                )
        if host and idx.device.type == "cpu" and idx.shape[1] > 1 and t:
            repeats = (idx.sort(dim=1).values.diff(dim=1) == 0).any(dim=1) & (w > 0)
            if bool(repeats.any()):
                raise InvalidArgumentError(
                    f"router {i}: token {int(repeats.nonzero()[0, 0])} uses an expert twice; a token uses k distinct "
                    "experts (zero padding often causes this: give padding weight 0 in mask)"
                )
        total = w.sum().clamp_min(torch.finfo(torch.float32).tiny)  # no token counted: 0, not 0 / 0
        counts = torch.zeros(e, device=p.device).index_add_(
            0, idx.reshape(-1).to(p.device, torch.long), w.repeat_interleave(idx.shape[1])
        )
        f = counts / total
        p_mean = (p.float() * w[:, None]).sum(0) / total
        losses.append(e * (f * p_mean).sum())
    return torch.stack(losses).mean()


def _check_distributions(p: torch.Tensor, w: torch.Tensor, what: str) -> None:
    """Refuse host probabilities made over the tokens, not over the experts: every column sums to 1 and the rows
    counted (weight above 0) do not, as ``scores.softmax(0)`` of ``[tokens, experts]`` scores gives. Such values lie
    from 0 to 1, and gave a loss of other values with no error. Rows that sum to other than 1 alone are taken (the
    sigmoid scores of a top-1 sigmoid router are its probabilities); sums are compared within a few of the dtype's
    rounding steps (a softmax rounded to bfloat16 sums to 1 only that closely).

    Raises:
        InvalidArgumentError: the columns, not the rows, sum to 1.
    """
    if p.shape[0] < 2:  # (one token: its row is the only column-wise distribution too)
        return
    tol = max(1e-3, 2 * torch.finfo(p.dtype).eps)
    rows, columns = p.detach().float().sum(-1), p.detach().float().sum(0)
    off = ((rows - 1).abs() > tol) & (w.to(rows.device) > 0)
    if bool(off.any()) and bool(((columns - 1).abs() <= tol).all()):
        row = int(off.nonzero()[0, 0])
        raise InvalidArgumentError(
            f"{what}: probs sum to 1 over the tokens, not over the experts (every column sums to 1, row {row} to "
            f"{float(rows[row]):.4g}): a softmax over dimension 0 of [tokens, experts] scores. Take it over the "
            "experts, the last dimension: scores.softmax(-1)"
        )


def _skip_unrecorded(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``idx`` with its unrecorded rows (all -1, as Routes mark a token routed natively: padding of a layout) that the
    mask gives weight 0 set to expert 0: they count for nothing, and are no error. A -1 row of a counted token, or a
    row mixing -1 with experts, is left as it is (refused by the range check, or by the kernel on an accelerator).
    Host indices are read on the host (their weights brought there only where some row is -1: no sync otherwise);
    others beside their weights, with no sync."""
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool((idx < 0).any()):
            return idx
        weights = w.detach().cpu()
    else:
        weights = w.detach().to(idx.device)
    skipped = (idx < 0).all(dim=1) & (weights == 0)
    return torch.where(skipped[:, None], torch.zeros_like(idx), idx)


def _check_row_weights(w: torch.Tensor, rows: int, what: str, *, host: bool) -> None:
    """Refuse ``w``, the weights of one router's ``rows`` rows read from a mask, where they are not one per row
    (a one-dimensional mask of another length, which a loss on the rows would broadcast: one weight for every row)
    or, where ``host`` (on the CPU, eagerly: no sync spent), not token weights (negative, NaN or infinite)."""
    if w.dim() != 1 or w.shape[0] != rows:
        raise InvalidArgumentError(
            f"{what}: the mask gives {w.numel()} weight(s), but the router kept {rows} rows: a one-dimensional mask "
            "is one weight per row, in the order of the rows. Give the [batch, positions] attention mask of the "
            "forwards kept (a list of them, one per forward, in call order), or one weight per row"
        )
    if host and w.numel() and not bool(((w >= 0) & w.isfinite()).all()):
        raise InvalidArgumentError(
            f"{what}: mask must hold token weights, finite and not negative (1 counts, 0 skips): pass the attention "
            "mask, or weights of your own that are"
        )


def _masks(mask: object) -> list[torch.Tensor] | None:
    """The ``mask`` argument as a list of tensors (one, or one per forward kept), None where none is given."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        _real_masks([mask])
        return [mask]
    need = "mask must be a tensor of token weights, or a list of them (one per forward kept)"
    if isinstance(mask, str | bytes) or not isinstance(mask, Iterable) or hasattr(mask, "shape"):
        raise ArgumentTypeError(f"{need}; got a {type(mask).__name__}")
    out = list(mask)
    bad = next((i for i, x in enumerate(out) if not isinstance(x, torch.Tensor)), None)
    if bad is not None or not out:
        got = f"mask[{bad}] is a {type(out[bad]).__name__}" if bad is not None else "got an empty list"
        raise ArgumentTypeError(f"{need}; {got}")
    _real_masks(out)
    return out


def _real_masks(masks: list[torch.Tensor]) -> None:
    """Refuse masks whose values are no token weights: complex ones (a cast to float drops their imaginary part,
    with a warning at most), those with no values (meta) and those whose values are not plain elements (sparse,
    nested, quantized: torch's own error at the reshape that reads them)."""
    for i, m in enumerate(masks):
        check_dense(m, "mask" if len(masks) == 1 else f"mask[{i}]")
        if m.dtype.is_complex:
            raise ArgumentTypeError(
                f"mask must hold real token weights (1 counts, 0 skips), got a {m.dtype} tensor: pass mask.real or "
                "the attention mask itself"
            )
        if m.device.type == "meta":
            raise ArgumentTypeError("mask is on the meta device and holds no values; pass the attention mask")


def _pair_order(probs: torch.Tensor, indices: torch.Tensor, i: int) -> _RowOrder | None:
    """The order of one router's kept rows, as the tensors kept by :class:`RouterScores` know it (the probabilities,
    or the indices where the probabilities were made from the kept scores, ``scores.softmax(-1)``); None: unknown."""
    a, b = _row_order_of(probs), _row_order_of(indices)
    if a is not None and b is not None and a != b:
        raise InvalidArgumentError(
            f"router {i}: the probs and indices are rows kept for other forwards or routers (another keep_scores() "
            "block, another router's): pass the scores and indices of one router, kept in one block"
        )
    if a is None and b is None:
        a = _made_from_kept_order(probs)
    return a if a is not None else b


def _made_from_kept_order(probs: torch.Tensor) -> _RowOrder | None:
    """The order of the rows of probabilities computed from one router's kept scores a few ops back, row for row
    (``kept.scores[i].softmax(-1)``): that of the scores they were made from, whatever indices they are paired
    with (``routes.indices`` of the same forward, a copy of the kept indices), which hold one row per row of them.
    None where they were made from no kept scores, or hold another number of rows than those (a slice)."""
    name = _router_made_from(probs)
    kept = None if name is None else _kept_with(probs, name)
    order = None if kept is None else _row_order_of(kept)
    if order is None or kept is None or kept.shape[0] != probs.shape[0]:
        return None
    return order


def _in_row_order(masks: list[torch.Tensor], listed: bool, order: _RowOrder | None, what: str) -> torch.Tensor:
    """The weight of each kept row's own token, from a mask of the batch's tokens: one ``[batch, positions]`` tensor
    (the kept forwards' masks stacked along the batch), or one mask per forward kept (its ``[batch, positions]``, or
    its tokens' weights in the order its routers saw them, one dimension). On the first mask's device."""
    shape = f"a list of {len(masks)}" if listed else "x".join(str(n) for n in masks[0].shape)
    if order is None:
        raise InvalidArgumentError(
            f"{what}: a mask of the batch's tokens ({shape}) was given for rows whose order is not known, and routers "
            "that see a batch sequence-first (position 0 of every sequence, then position 1...) keep their rows in "
            "another order than the batch's: read row by row, padding would weigh on other tokens' rows. Pass the "
            "scores and indices kept by session.keep_scores() (kept.scores, kept.indices, kept[name]: they know the "
            "order of their rows; probs made from them, kept.scores[i].softmax(-1), with kept.indices), or give one "
            "weight per row in the order of the rows (mask.reshape(-1) where the rows follow the tokens sequence by "
            "sequence)"
        )
    forwards = order.forwards
    per = _per_forward(masks, listed, forwards, shape, what)
    parts = []
    for n, (rows, j) in enumerate(order.calls):
        if j < 0:
            raise InvalidArgumentError(
                f"{what}: decision {n} was kept in no forward of the model the session saw (a submodule called "
                "alone, a forward compiled or traced): the tokens of its rows are not known, so a mask of the batch's "
                "tokens cannot be put in their order. Give one weight per row, in the order of the rows"
            )
        fed, m = forwards[j], per[j]
        if m.dim() > 1:
            if fed.grid is None or tuple(m.shape) != fed.grid:
                raise InvalidArgumentError(
                    f"{what}: the mask of forward {j} is {tuple(m.shape)}, but that forward was fed "
                    + (f"a {list(fed.grid)} batch" if fed.grid is not None else f"no [batch, positions] batch{fed.why}")
                    + ": give that forward's [batch, positions] attention mask, or its tokens' weights in the order "
                    "its routers saw them"
                )
            if fed.sequence_first is None and min(fed.grid) > 1:
                raise InvalidArgumentError(
                    f"{what}: the order in which the routers saw the tokens of forward {j} is not known{fed.why}, so "
                    "its [batch, positions] mask cannot be put in the order of the rows: give its rows' weights in "
                    "their order (one dimension)"
                )
            m = m.t() if fed.sequence_first else m
        flat = m.reshape(-1)
        if flat.numel() != rows:
            raise InvalidArgumentError(
                f"{what}: decision {n} kept {rows} rows in forward {j}, which was fed {flat.numel()} tokens: its rows "
                "are not one per token of the batch, so a mask of the batch's tokens cannot weigh them; give one "
                "weight per row, in the order of the rows"
            )
        parts.append(flat.to(masks[0].device))
    return torch.cat(parts) if parts else masks[0].new_zeros(0)


def _per_forward(
    masks: list[torch.Tensor], listed: bool, forwards: tuple[_Fed, ...], shape: str, what: str
) -> list[torch.Tensor]:
    """One mask per forward kept: as given (``listed``), or one ``[batch, positions]`` mask cut along the batch."""
    grids = ", ".join("x".join(map(str, f.grid)) if f.grid is not None else "no grid" for f in forwards) or "none"
    if listed:
        if len(masks) != len(forwards):
            raise InvalidArgumentError(
                f"{what}: {len(masks)} masks were given for the {len(forwards)} forwards of the model kept ({grids}): "
                "give one per forward, in call order"
            )
        return masks
    m = masks[0]
    m = m.reshape(m.shape[0], -1) if m.dim() > 2 else m
    batches = [f.grid[0] if f.grid is not None else -1 for f in forwards]
    if not forwards or any(f.grid is None or f.grid[1] != m.shape[1] for f in forwards) or sum(batches) != m.shape[0]:
        raise InvalidArgumentError(
            f"{what}: a {shape} mask does not hold the tokens of the forwards of the model kept ({grids}) stacked "
            "along the batch: give each forward's [batch, positions] attention mask, as a list in call order"
        )
    return list(m.split(batches)) if len(forwards) > 1 else [m]


def _tensors(value: object, what: str) -> list[torch.Tensor]:
    """One tensor, or a sequence of them, as a list (a clear error for anything else)."""
    if isinstance(value, torch.Tensor):
        return [value]
    need = f"{what} must be a tensor or a list of tensors, one per router"
    if isinstance(value, RouterScores):  # (iterating it gives its routers' names: "probs[0] is a str" said nothing)
        raise ArgumentTypeError(
            f"{need}; got the RouterScores of a keep_scores() block, which holds both: pass "
            "load_balancing_loss(kept.scores, kept.indices) (kept.scores' softmax(-1), one per router, for routers "
            "whose top-k runs on logits)"
        )
    if not is_collection(value) or hasattr(value, "shape"):  # (a dict or a set: keys, or no order, unsaid)
        hint = ""
        if isinstance(value, Mapping):
            hint = ": a dict iterates over its keys; pass its values as a list, in the routers' order"
        elif type(value).__name__ == "Routes":  # (by name: routes imports this module, not the other way)
            hint = ": pass routes.per_layer() (one [tokens, k] tensor per router), or routes.layer(name)"
        raise ArgumentTypeError(f"{need}; got a {type(value).__name__}{hint}")
    out = list(cast(Iterable[Any], value))  # (a collection: checked just above)
    bad = next((i for i, x in enumerate(out) if not isinstance(x, torch.Tensor)), None)
    if bad is not None:
        raise ArgumentTypeError(f"{need}; {what}[{bad}] is a {type(out[bad]).__name__}")
    return out
