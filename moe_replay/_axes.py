"""Which dimensions of a tensor in a watched forward are known to run over the forward's input (its tokens, batch,
sequence or hidden features), and so over no bank of experts.

A draw, sort or ranking outside every router is read as a choice among experts when it runs over as many entries as a
bank holds (see :mod:`moe_replay.orphans`); the tokens of an input can be as many. So the dimensions of the tensors the
watched forward is called with are marked as *data*, and the mark is carried through the calls whose dimensions are
known: elementwise calls (broadcast from the right), transposes, reshapes (the leading and trailing dimensions they
keep), reductions, indexing, products (a ``Linear``'s output features come from its weight: never data), ``einsum``.
Every other call's results are unmarked. An unmarked dimension may run over experts: the mark only ever exempts, so a
call this module does not know leaves the rules as strict as they were.

Each dimension is one of three: :data:`DATA` (the input's), :data:`WEIGHT` (a weight's, or a dimension made by a
product with one, a one-hot, a stack: never the input's) or :data:`UNKNOWN` (made by a call not read: a buffer made by
its shape, ``torch.zeros(tokens, d)``, a fused kernel). An elementwise call of operands that run along one dimension
together gives it what they hold, a weight's where any holds one, else the input's where any does: a block's output
written into a buffer made by its shape, added back to the residual stream, runs along the stream's tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["DATA", "ELEMENTWISE", "UNKNOWN", "WEIGHT", "Axes"]

#: ``(func, ...)``: for a call of ``func``, a dimension of its result holds what its operands' dimensions at that
#: place (counted from the right, after broadcasting) hold.
_NAMES_ELEMENTWISE = (
    "add sub rsub mul div true_divide floor_divide remainder fmod pow neg abs exp exp2 log log2 log1p expm1 sqrt rsqrt "
    "sigmoid tanh relu relu_ gelu silu softplus softmax log_softmax clamp clamp_min clamp_max clip where masked_fill "
    "lt le gt ge eq ne less less_equal greater greater_equal logical_and logical_or logical_not logical_xor "
    "bitwise_and bitwise_or bitwise_not bitwise_xor maximum minimum detach clone contiguous to float half bfloat16 "
    "double int long bool type type_as cumsum cumprod dropout layer_norm rms_norm normalize sign floor ceil round "
    "reciprocal square nan_to_num sin cos erf mish leaky_relu elu hardtanh requires_grad_ add_ sub_ mul_ div_ clamp_ "
    "masked_fill_ relu_ sigmoid_ zero_ fill_ copy_ zeros_like ones_like empty_like full_like rand_like randn_like "
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ "
    "__itruediv__ __floordiv__ __rfloordiv__ __mod__ __pow__ __rpow__ __neg__ __abs__ __lt__ __le__ __gt__ __ge__ "
    "__eq__ __ne__ __and__ __or__ __xor__ __invert__ __rand__ __ror__ __iand__ __ior__"
).split()
_NAMES_TRANSPOSE = "t transpose swapaxes swapdims permute movedim moveaxis".split()
_NAMES_RESHAPE = "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split()
_NAMES_EXPAND = "expand expand_as broadcast_to".split()
_NAMES_REDUCE = (
    "sum mean amax amin max min argmax argmin prod logsumexp any all std var median mode count_nonzero nansum nanmean"
).split()
_NAMES_KEEP = "cummax cummin".split()  # (the dimension taken along keeps its meaning)
_NAMES_SPLIT = "unbind chunk split tensor_split".split()
_NAMES_SELF = (
    "index_add index_add_ index_copy index_copy_ index_fill index_fill_ scatter scatter_ scatter_add scatter_add_ "
    "scatter_reduce scatter_reduce_ masked_scatter masked_scatter_ index_put index_put_"
).split()


def _funcs(names: Iterable[str]) -> frozenset[Any]:
    found: set[Any] = set()
    for name in names:
        for owner in (torch, torch.Tensor, F):
            f = getattr(owner, name, None)
            if f is not None and callable(f):
                found.add(f)
    return frozenset(found)


ELEMENTWISE = _ELEMENTWISE = _funcs(_NAMES_ELEMENTWISE)
_TRANSPOSE = _funcs(_NAMES_TRANSPOSE)
_RESHAPE = _funcs(_NAMES_RESHAPE)
_EXPAND = _funcs(_NAMES_EXPAND)
_REDUCE = _funcs(_NAMES_REDUCE)
_KEEP = _funcs(_NAMES_KEEP)
#: rankings, by where their ``dim`` is: the dimension ranked along runs over the slots chosen (the input's where it
#: was: tokens chosen), not over what it ran along (of experts chosen, a row of ``k`` ids: dispatch reads the tokens'
#: rows through them)
_RANKS = {f: 2 if "topk" in getattr(f, "__name__", "") else 1 for f in _funcs("topk sort argsort".split())}
_SPLIT = _funcs(_NAMES_SPLIT)
_UNBIND = _funcs(["unbind"])
_KTHVALUE = _funcs(["kthvalue"])
#: ``max``/``min`` as imported (inside a forward ``torch.max`` may be a lean wrapper, see moe_replay._lean)
_EXTREMES = (torch.max, torch.Tensor.max, torch.min, torch.Tensor.min)
_SELF = _funcs(_NAMES_SELF)
_MATMUL = frozenset(
    (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm)
)
_DESCRIPTORS: dict[Any, str] = {torch.Tensor.T: "T", torch.Tensor.mT: "mT", torch.Tensor.H: "T", torch.Tensor.mH: "mT"}

#: what a dimension of a tensor runs along: the input's (tokens, batch, sequence), unknown, a weight's
DATA, UNKNOWN, WEIGHT = 0, 1, 2
Labels = tuple[int, ...]  # per dimension: DATA, UNKNOWN or WEIGHT


def _dim(d: Any, n: int) -> int | None:
    """``d`` as a dimension of a tensor of ``n`` dimensions, counted from the left; None where no plain int."""
    if type(d) is not int or not -n <= d < max(n, 1):
        return None
    return d % n if n else 0


class Axes:
    """The data dimensions of the tensors of one watched forward (see the module's docstring)."""

    def __init__(self) -> None:
        #: tensors with a data dimension, by id: a weak reference to it and its labels
        self.known: dict[int, tuple[weakref.ref[torch.Tensor], Labels]] = {}
        #: the lengths of the dimensions marked as the input's by their length alone (an integer input's other than
        #: the ids, as long as the tokens): a mask of the tokens each token sees, or of the experts each token may use
        #: where the tokens are as many as the experts; what runs along them is no proof either way
        self.by_length: set[int] = set()

    def seed(self, values: Iterable[Any]) -> None:
        """Mark the dimensions of the tensors in ``values`` (and in lists, tuples and dicts of them), the inputs of
        the watched forward, as data: all but the last of floating ones (their tokens, not their features: a layer
        may read its first features as scores), and those of integer ones (token ids, positions, masks) as long as a
        dimension of the tokens: a floating input's but its last, or the first input's where that is an integer one
        (the ids). An integer input's other dimensions (a mask of the experts each token may use) are not marked."""
        tensors = list(_tensors(values))
        tokens = {s for t in tensors if t.is_floating_point() for s in t.shape[:-1]}
        if tensors and not tensors[0].is_floating_point():  # (ids first: a model fed ids, and pixels or features)
            tokens |= set(tensors[0].shape)
        for i, t in enumerate(tensors):
            n = t.dim()
            if t.is_floating_point():
                self._set(t, (DATA,) * (n - 1) + (WEIGHT,))
            else:
                self._set(t, tuple(DATA if s in tokens or s == 1 else UNKNOWN for s in t.shape))
                if i:  # (not the ids the model is fed first, which tell the tokens' lengths: a mask, say)
                    self.by_length.update(s for s in t.shape if s in tokens and s > 1)

    def labels(self, t: torch.Tensor) -> Labels:
        """Per dimension of ``t``: what it runs along (a weight's for a parameter, unknown for one not followed)."""
        entry = self.known.get(id(t))
        if entry is not None and entry[0]() is t and len(entry[1]) == t.dim():
            return entry[1]
        return (WEIGHT if isinstance(t, torch.nn.Parameter) else UNKNOWN,) * t.dim()

    def may_choose(self, t: Any, dim: int) -> bool:
        """Does a call along ``dim`` of ``t`` possibly run over experts (not over a dimension of the input)?"""
        if not isinstance(t, torch.Tensor):
            return True
        d = _dim(dim, t.dim())
        return d is None or not t.dim() or self.labels(t)[d] != DATA

    def _set(self, t: Any, labels: Labels | None) -> None:
        """Note ``t``'s labels (a tensor of unknown dimensions, or none told, is forgotten: written in place, it may
        hold other things than before)."""
        if not isinstance(t, torch.Tensor):
            return
        if labels is None or len(labels) != t.dim() or all(b == UNKNOWN for b in labels):
            self.known.pop(id(t), None)
            return
        key, known = id(t), self.known

        def gone(_: weakref.ref[torch.Tensor]) -> None:
            known.pop(key, None)

        known[key] = (weakref.ref(t, gone), labels)

    def tracked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Is any tensor among the arguments marked (so its call's results may be)?"""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if id(a) in self.known or isinstance(a, torch.nn.Parameter):
                    return True
            elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and id(t) in self.known for t in a):
                return True
        return False

    def after(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Mark the results of the call ``func(*args, **kwargs) -> out`` from its arguments' marks."""
        try:
            self._after(func, args, kwargs, out)
        except (TypeError, ValueError, IndexError, RuntimeError):  # (a call of a form not read: its results unmarked)
            return

    def _after(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        descriptor = _DESCRIPTORS.get(getattr(func, "__self__", None))
        if descriptor is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            lab = self.labels(x)
            if descriptor == "T":
                self._set(out, lab[::-1])
            elif len(lab) >= 2:
                self._set(out, (*lab[:-2], lab[-1], lab[-2]))
            return
        if func in _ELEMENTWISE:
            if isinstance(out, torch.Tensor):
                self._set(out, self._broadcast(out, (*args, *kwargs.values())))
            return
        if not isinstance(x, torch.Tensor):
            if func is torch.einsum:
                self._einsum(args, out)
            elif func in (torch.cat, torch.concat, torch.stack) and isinstance(x, (list, tuple)):
                self._cat(func, x, args, kwargs, out)
            return
        lab = self.labels(x)
        if func in _EXTREMES and isinstance(_at(args, kwargs, 1, "other", "dim"), torch.Tensor):
            if isinstance(out, torch.Tensor):
                self._set(out, self._broadcast(out, args))
            return
        if func in _TRANSPOSE:
            self._transpose(func, x, lab, args, kwargs, out)
        elif func in _RESHAPE:
            if isinstance(out, torch.Tensor):
                self._set(out, _reshaped(tuple(x.shape), lab, tuple(out.shape)))
        elif func in _EXPAND:
            if isinstance(out, torch.Tensor):
                n = out.dim() - x.dim()
                kept = zip(lab, x.shape, out.shape[n:], strict=True)
                self._set(out, (UNKNOWN,) * n + tuple(a if s == o else UNKNOWN for a, s, o in kept))
        elif func in _REDUCE:
            self._reduce(x, lab, _at(args, kwargs, 1, "dim"), out)
        elif func in _KTHVALUE:
            self._reduce(x, lab, _at(args, kwargs, 2, "dim", default=-1), out)
        elif func in _KEEP:
            for item in out if isinstance(out, tuple) else (out,):
                if isinstance(item, torch.Tensor) and item.dim() == x.dim():
                    self._set(item, lab)
        elif func in _RANKS:
            d = _dim(_at(args, kwargs, _RANKS[func], "dim", default=-1), x.dim())
            if d is not None:
                ranked = (*lab[:d], DATA if lab[d] == DATA else UNKNOWN, *lab[d + 1 :])
                for item in out if isinstance(out, tuple) else (out,):
                    if isinstance(item, torch.Tensor) and item.dim() == x.dim():
                        self._set(item, ranked)
        elif func in _SPLIT:
            at = 1 if func in _UNBIND else 2
            dim = _dim(_at(args, kwargs, at, "dim", default=0), x.dim())
            for item in out if isinstance(out, (tuple, list)) else ():
                if isinstance(item, torch.Tensor):
                    self._set(item, lab[:dim] + lab[dim + 1 :] if item.dim() < x.dim() and dim is not None else lab)
        elif func in _SELF:  # (rows written back along its own dimensions: a block's output into zeros_like(x))
            if isinstance(out, torch.Tensor) and out.dim() == x.dim():
                self._set(out, lab)
        elif func is torch.Tensor.__getitem__:
            if isinstance(out, torch.Tensor):
                self._set(out, self._index(x, lab, args[1] if len(args) > 1 else None, out))
        elif func in (torch.index_select, torch.Tensor.index_select):
            index, dim = _at(args, kwargs, 2, "index"), _dim(_at(args, kwargs, 1, "dim"), x.dim())
            if isinstance(index, torch.Tensor) and dim is not None and isinstance(out, torch.Tensor):
                by = self.labels(index)
                self._set(out, (*lab[:dim], max(lab[dim], by[0] if by else UNKNOWN), *lab[dim + 1 :]))
        elif func in (torch.gather, torch.Tensor.gather):
            index = _at(args, kwargs, 2, "index")
            if isinstance(index, torch.Tensor) and isinstance(out, torch.Tensor) and index.dim() == x.dim():
                self._set(out, tuple(max(a, b) for a, b in zip(lab, self.labels(index), strict=True)))
        elif func in (F.one_hot,):
            if isinstance(out, torch.Tensor):
                self._set(out, (*lab, WEIGHT))
        elif func in (F.linear,):
            if isinstance(out, torch.Tensor) and x.dim():
                self._set(out, (*lab[:-1], WEIGHT))
        elif func is F.scaled_dot_product_attention:  # (each query's row of the values' features)
            v = _at(args, kwargs, 2, "value")
            if isinstance(out, torch.Tensor) and isinstance(v, torch.Tensor) and out.dim() == x.dim() and v.dim():
                self._set(out, (*lab[:-1], self.labels(v)[-1]))
        elif func in (F.embedding, torch.embedding):
            ids = x if func is F.embedding else _at(args, kwargs, 1, "indices")
            if isinstance(ids, torch.Tensor) and isinstance(out, torch.Tensor):
                self._set(out, (*self.labels(ids), WEIGHT))
        elif func in _MATMUL:
            other = _at(args, kwargs, 1, "other", "mat2")
            if isinstance(other, torch.Tensor) and isinstance(out, torch.Tensor):
                self._set(out, self._matmul(x, lab, other, out))

    def _broadcast(self, out: torch.Tensor, operands: Iterable[Any]) -> Labels:
        """Labels of an elementwise result: at each place from the right, what the operands that run along it (not
        broadcast there from a size of 1) hold together (see :func:`_together`)."""
        along: list[list[int]] = [[] for _ in range(out.dim())]
        shape = out.shape
        for a in operands:
            if not isinstance(a, torch.Tensor) or not a.dim():
                continue
            if a.dim() > out.dim():
                return (UNKNOWN,) * out.dim()
            lab = self.labels(a)
            for i in range(1, a.dim() + 1):
                if a.shape[-i] == shape[-i]:
                    along[-i].append(lab[-i])
                elif a.shape[-i] != 1:
                    return (UNKNOWN,) * out.dim()
        return tuple(_together(held) if size != 1 else DATA for held, size in zip(along, shape, strict=True))

    def _transpose(
        self, func: Any, x: torch.Tensor, lab: Labels, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != x.dim():
            return
        n, name = x.dim(), getattr(func, "__name__", "")
        if name == "t":
            self._set(out, lab[::-1])
        elif name == "permute":
            dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else None
            if dims is None:
                dims = _at(args, kwargs, 1, "dims")
            order = [_dim(d, n) for d in dims]
            if None not in order and sorted(order) == list(range(n)):  # type: ignore[type-var]
                self._set(out, tuple(lab[d] for d in order))  # type: ignore[index]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = _dim(_at(args, kwargs, 1, "dim0", "axis0"), n), _dim(_at(args, kwargs, 2, "dim1", "axis1"), n)
            if a is not None and b is not None:
                new = list(lab)
                new[a], new[b] = new[b], new[a]
                self._set(out, tuple(new))
        elif name in ("movedim", "moveaxis"):
            src, dst = _at(args, kwargs, 1, "source"), _at(args, kwargs, 2, "destination")
            if type(src) is int and type(dst) is int:
                s, d = _dim(src, n), _dim(dst, n)
                if s is not None and d is not None:
                    new = list(lab)
                    new.insert(d, new.pop(s))
                    self._set(out, tuple(new))

    def _reduce(self, x: torch.Tensor, lab: Labels, dims: Any, out: Any) -> None:
        if isinstance(dims, (list, tuple)):
            gone = {_dim(d, x.dim()) for d in dims}
        elif type(dims) is int:
            gone = {_dim(dims, x.dim())}
        else:
            return  # (over every element: a number, or a reduction read another way)
        if None in gone:
            return
        keep = [lab[i] for i in range(x.dim()) if i not in gone]
        for item in out if isinstance(out, tuple) else (out,):
            if not isinstance(item, torch.Tensor):
                continue
            if item.dim() == len(keep):
                self._set(item, tuple(keep))
            elif item.dim() == x.dim():  # (keepdim: the reduced dimensions are of size 1)
                self._set(item, lab)

    def _index(self, x: torch.Tensor, lab: Labels, key: Any, out: torch.Tensor) -> Labels | None:
        """Labels of ``x[key]``: basic indexing (ints, slices, ``None``, ``...``), and one integer tensor or list
        (its dimensions in place of the one it indexes, data where both are)."""
        keys = key if isinstance(key, tuple) else (key,)
        advanced = [k for k in keys if isinstance(k, (torch.Tensor, list))]
        if len(advanced) > 1:
            return None
        if advanced and isinstance(advanced[0], torch.Tensor) and advanced[0].dtype == torch.bool:
            return None
        taken = sum(1 for k in keys if k is not None and k is not Ellipsis and not isinstance(k, bool))
        labels: list[int] = []
        i = 0
        for k in keys:
            if k is Ellipsis:
                skip = x.dim() - taken
                labels.extend(lab[i : i + skip])
                i += skip
            elif k is None:
                labels.append(DATA)  # (a new dimension of size 1: nothing to choose along)
            elif isinstance(k, slice):
                labels.append(lab[i])
                i += 1
            elif isinstance(k, torch.Tensor):
                by = self.labels(k) if k.dim() else ()
                labels.extend(max(b, lab[i]) for b in by)
                i += 1
            elif isinstance(k, list):
                labels.append(UNKNOWN)
                i += 1
            elif isinstance(k, int) and not isinstance(k, bool):
                i += 1
            else:
                return None
        labels.extend(lab[i:])
        return tuple(labels) if len(labels) == out.dim() else None

    def _matmul(self, x: torch.Tensor, lab: Labels, other: torch.Tensor, out: torch.Tensor) -> Labels | None:
        olab = self.labels(other)
        if x.dim() < 2 or other.dim() < 2:
            if x.dim() >= 2 and other.dim() == 1:
                return lab[:-1] if out.dim() == x.dim() - 1 else None
            if x.dim() == 1 and other.dim() >= 2:
                return (*olab[:-2], olab[-1]) if out.dim() == other.dim() - 1 else None
            return None
        batch = out.dim() - 2
        head: list[list[int]] = [[] for _ in range(batch)]
        for t, tl in ((x, lab), (other, olab)):
            for i in range(1, t.dim() - 1):
                if i > batch:
                    return None
                if t.shape[-2 - i] == out.shape[-2 - i]:
                    head[-i].append(tl[-2 - i])
                elif t.shape[-2 - i] != 1:
                    return None
        return (*(_together(held) for held in head), lab[-2], olab[-1])

    def _einsum(self, args: tuple[Any, ...], out: Any) -> None:
        if not args or not isinstance(args[0], str) or not isinstance(out, torch.Tensor):
            return
        operands = list(args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        eq = args[0].replace(" ", "")
        if "->" not in eq or "." in eq:
            return
        lhs, rhs = eq.split("->")
        terms = lhs.split(",")
        if len(terms) != len(operands):
            return
        letters: dict[str, list[int]] = {}
        for term, t in zip(terms, operands, strict=True):
            if not isinstance(t, torch.Tensor) or len(term) != t.dim():
                return
            for c, b, size in zip(term, self.labels(t), t.shape, strict=True):
                if size != 1:
                    letters.setdefault(c, []).append(b)
        self._set(out, tuple(_together(letters[c]) if c in letters else DATA for c in rhs))

    def _cat(
        self, func: Any, tensors: list[Any] | tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        if not isinstance(out, torch.Tensor) or not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            return
        n = tensors[0].dim()
        if any(t.dim() != n for t in tensors):
            return
        labels = [max(self.labels(t)[i] for t in tensors) for i in range(n)]
        # (the dimension they are joined along, or a new one over them, runs over the tensors joined too: experts'
        # outputs, say)
        dim = _dim(_at(args, kwargs, 1, "dim", default=0), n + 1 if func is torch.stack else n)
        if dim is None:
            return
        if func is torch.stack:
            labels.insert(dim, WEIGHT)
        else:
            labels[dim] = max(labels[dim], UNKNOWN)
        self._set(out, tuple(labels))


def _tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    """The tensors in ``values`` and in lists, tuples and dicts of them, in order (parameters left out, and nested
    tensors, whose batch has no one shape to mark: a strided one has no sizes to read at all)."""
    for value in values:
        if isinstance(value, torch.nn.Parameter) or (isinstance(value, torch.Tensor) and value.is_nested):
            continue
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())


def _together(held: list[int]) -> int:
    """What a dimension holds that operands run along together: a weight's where any holds one (a gate's experts
    beside the tokens are experts), else the input's where any holds it (a buffer of unknown dimensions added to the
    residual stream runs along its tokens), else unknown."""
    if WEIGHT in held:
        return WEIGHT
    return DATA if DATA in held else UNKNOWN


def _at(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, *names: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return default


def _reshaped(before: tuple[int, ...], lab: Labels, after: tuple[int, ...]) -> Labels:
    """Labels of a reshape of ``before`` (labelled ``lab``) to ``after``: the dimensions it keeps keep theirs; each
    run of dimensions it merges or splits into another run of the same number of elements (``[batch, seq, 3 * d]`` to
    ``[batch * seq, 3, heads, d / heads]``: the tokens merged, the features split) holds the most of what that run held
    (a weight's, unknown, the input's); new dimensions of size 1 are data (nothing runs along them). Where the runs
    cannot be told apart, see :func:`_reshaped_ends`."""
    kept = [(s, b) for s, b in zip(before, lab, strict=True) if s != 1]
    sizes = [s for s in after if s != 1]
    inner: list[int] = []
    i = j = 0
    while i < len(kept) and j < len(sizes):
        held, n_before, n_after, made = [kept[i][1]], kept[i][0], sizes[j], 1
        i, j = i + 1, j + 1
        while n_before != n_after:
            if n_before < n_after and i < len(kept):
                n_before, i = n_before * kept[i][0], i + 1
                held.append(kept[i - 1][1])
            elif n_after < n_before and j < len(sizes):
                n_after, j, made = n_after * sizes[j], j + 1, made + 1
            else:
                return _reshaped_ends(before, lab, after)
        inner += [max(held)] * made
    if i != len(kept) or j != len(sizes):
        return _reshaped_ends(before, lab, after)
    it = iter(inner)
    return tuple(DATA if s == 1 else next(it) for s in after)


def _reshaped_ends(before: tuple[int, ...], lab: Labels, after: tuple[int, ...]) -> Labels:
    """Labels of a reshape of ``before`` (labelled ``lab``) to ``after``: the leading and trailing dimensions it keeps
    (equal sizes, in order) keep theirs; those it merges or splits hold the most of what the merged held (a weight's,
    unknown, the input's); new dimensions of size 1 are data (nothing runs along them)."""
    kept = [(s, b) for s, b in zip(before, lab, strict=True) if s != 1]
    sizes = [s for s in after if s != 1]
    head: list[int] = []
    while kept and sizes and kept[0][0] == sizes[0]:
        head.append(kept.pop(0)[1])
        sizes.pop(0)
    tail: list[int] = []
    while kept and sizes and kept[-1][0] == sizes[-1]:
        tail.insert(0, kept.pop()[1])
        sizes.pop()
    middle = max((b for _, b in kept), default=UNKNOWN)
    inner = head + [middle] * len(sizes) + tail
    it = iter(inner)
    return tuple(DATA if s == 1 else next(it) for s in after)
