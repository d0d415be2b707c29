"""Every decision in a captured forward belongs to an attached router, or it is an error.

Discovery finds routers by pattern; a router it missed (a parametrized or flat weight, an
unusual name, a module added after attach) would simply not be recorded or forced. So the
first forward under capture or replay is watched as a whole (at every block until one forward
passes, and again once the modules on the way to the routers change), and so is every
``verify()``: a decision-like call (see :func:`moe_replay.evidence.decision_call`) over an expert width made in
a module inside an MoE block (a module that holds experts) that is neither an attached router's
scope (or inside one) nor a module the user excluded is an orphan, and the forward raises with
its module and line. That includes the block that holds a router module and takes a top-k of
its own over the router's scores to dispatch: the router's top-k (for an auxiliary loss, say)
would be forced while the dispatch ran native. A model's own forward, outside every MoE block,
may take a top-k of all router logits for its auxiliary loss: that is not watched.

Experts need not be modules nor stacked weights: they may be rows of a table (product keys, PEER's and a
product-key memory's ``nn.Embedding`` rows), chosen by a top-k over learned keys whose count is no expert
width (``sqrt(E)`` sub-keys, then ``k * k`` candidates). So the indices of a top-k outside every router, over as
many candidates as a weight of its module has along a dimension (keys), are followed through the integer
tensors made from them (sums, products, gathers, views), and the float masks made from them (a one-hot cast, the
chosen weights scattered along the keys); where they pick rows of a weight of the model (an embedding,
``index_select``, ``gather``, indexing), or such a mask multiplies one, that is a choice of experts outside every
router too. A top-k in
attention (a sparse-attention indexer, a kNN memory) is not followed, nor one whose indices pick activations
(tokens, cached keys and values: Mixture-of-Depths), nor an arg-max (a greedy token, a codebook's nearest row).

A choice may also be made one token (or one sample) at a time, in a Python loop: an ``argmax`` or ``topk`` of a
1-D vector of scores (Expert Gate picks the expert of each test sample so); drawn at random from the scores
(``torch.multinomial``, a ``Categorical`` sample: RL-R's policy; a hard ``gumbel_softmax``, whose one-hot may be
the mask itself) or from no scores (random routing: a ``torch.randint`` below the expert count, a ``randperm``);
or by a ``max`` or ``min`` along the scores, a ranking of them (a ``sort`` or ``argsort``: a
top-p, a top-k by slicing) or a ``kthvalue`` threshold.
Such a call over exactly as many scores as a bank of experts on its module's path holds, outside every attached
router, is an orphan too, whatever the attached routers' widths (a 1-D call over tokens or flat ids, a draw over
tokens, a sort of a row of ``k`` chosen ids, is no decision of a router, and is left alone where no bank is that
long). An equal width alone is no proof, though: the tokens can be as many as a bank's experts. So the dimensions of
the forward's input (its tokens; see :mod:`moe_replay._axes`) are followed through the calls whose dimensions are
known, and a draw, sort or ranking along one of them (or a top-k among tokens, which chooses no keys) is none; one
along any other dimension (a gate's output, a weight's, a dimension lost through a call not read) is judged by width.
A draw from no scores (``randint``, ``randint_like``, ``random_``, ``randperm``) has no dimension to read: it is
followed through the integer tensors made from it, and refused at the end of the forward unless it was seen picking
rows of the input along such a dimension (``x[perm]``) and nothing else (an expert's id compared, a Python number
made, rows of a weight).
A sample can also be drawn by hand, the count of cumulative probabilities under a uniform draw (or ``searchsorted``
of one), and a top-p taken in the experts' order by a threshold on the running total: a cumulative sum along as many
entries as a bank holds (not along the input's dimension: a capacity's running count of tokens), then compared, is
a choice among experts too.

A choice among MoE blocks is one among experts too: where a module holds a list of like modules that each hold
experts (each group with its own router: a hierarchical MoE, as a language-group gate over per-language MoE blocks),
a top-k or ranking it takes itself over as many entries as the list is long picks a group per token, and no attached
router records or forces it (a model's own stack of MoE layers, which its forward runs in turn, is none).

Three more forms are read by the dimensions they run along rather than by width alone. Bernoulli draws per entry
(``torch.bernoulli``, ``bernoulli_``, or by hand: ``rand_like(p) < p``) of probabilities that vary, along as many
entries as a bank holds, not along the input's tokens: experts kept at random by a policy (a dropout mask drawn by
hand, one probability for all, is none).
A ranking or draw along the input's tokens of scores with another dimension as wide as a bank on the path, not the
input's: each expert taking its tokens (expert choice; a top-k along each sequence of a batch, Mixture-of-Depths, has
the batch there); where that other dimension is made by a weight (learned routing tokens, maybe merged with the batch)
and the nearest module on the path holding a grouped convolution computes one group per routing token, attention too:
attention experts as a convolution's groups, each taking its tokens (mixture-of-attention; one routing token, CoLT5's
heavy tokens, has no groups; a top-k over each query's keys has the queries there, as many as the keys). And in
attention (a module on the path named for it, or, above a module of projections alone, one seen calling
``scaled_dot_product_attention`` in its own forward: attention written inline in a block), a decision-like call (a
top-k, an arg-max, a ``max``'s indices, a ranking) along a dimension a weight made (a projection's outputs, not
the keys nor the tokens, which are the input's), whatever the width, is followed: where its indices make a mask of
the chosen entries (a one-hot, a scatter) or pick an expert's weights (a weight of three or more dimensions), heads or
experts are chosen per token (mixture-of-heads, SwitchHead); rows of a learned memory read by them are no choice.
An integer input's dimensions are the input's only where as long as the tokens (a floating input's leading
dimensions, or else the first integer input's): a mask of the experts each token may use is not.

A choice can also be made after the router's, by the block that holds it: a capacity drop by a top-k of the weights the
router returned (per expert, over its tokens), a sort of them, a threshold on them. The routes carry the router's
choice, not this one, and a replay would make it again from the current scores. So the floating tensors an attached
router's scope returns (one holding no experts; nor whole numbers only: tokens counted per expert, ids cast to floats;
scores made whole since, a ``round`` cast to integers, are scores still) are followed through the calls that pick,
view, copy (``copy_``, ``new_tensor``), cast or scale them, join them with others (``cat``, ``stack``, ``pad``),
scatter them into a dense table (a combine tensor), reduce them (a token's total weight, an expert's load), map them
elementwise (``exp``, ``log``, any other call keeping their shape) or multiply them into no more entries (``w @ M``, an
``einsum``, or a dense table over a bank's experts), or into any number with weights or tables made in the forward alone
or with an operand alike for every token they run over (``w @ M`` as wide as the hidden states, ``M`` a buffer made
three-dimensional or made from ``x.mean(0)``, ``w[..., None] * bias``; not a product with a tensor made from the
forward's input that differs from token to token, the experts' outputs combined or the hidden states dispatched, nor an
elementwise product with anything larger), and in a module of an MoE block outside every router
(or one holding a router below it; not the model's own forward, whose top-k of all router logits feeds an auxiliary
loss) a ranking of them is refused as made (of a statistic over the tokens, only where its indices are read); a ``max``
or ``min`` along a dimension only where a later call reads its indices, and a threshold only where its mask is used
beyond a count or a mean over the tokens or all of it (a statistic kept aside; a count per token of its slots over the
threshold chooses as the mask does; the mask cast to numbers, scaled, shifted, counted along by ``cumsum`` and
compared, or numbers selected by it, ``torch.where(keep, 2, 1)``, tell its tokens still); ``!=``, ``nonzero`` and
``==`` (of the row's maximum: an arg-max by hand) are thresholds too. A threshold at zero of the router's own
weights is the pattern of the slots its decision filled (nonnegative values, no fuller per row than the ids beside
them); of raw scores with signs, a dense map fuller than the ids (a ReLU of the logits), or values moved off zero since,
it is a threshold like any. Their entries made Python numbers (``tolist()``, ``numpy()``, a row's ``item()``: sorted in
Python, the watch cannot see how they are used) are refused too, unless they are a statistic over the tokens (a loss, a
load per expert). ``verify()`` and a forward watched again after the model changed follow them as a first forward does.
"""

from __future__ import annotations

import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ._axes import DATA, ELEMENTWISE, WEIGHT, Axes
from ._output_guard import own_hook
from ._torch_compat import NO_TORCH_FUNCTION, module_call_kwargs
from .errors import UnsupportedRouterError
from .evidence import _FAMILY, _PEAKS, DECISION_FUNCS, NESTING, UNWRAP, _arg, _where, decision_call, unwrap
from .intercept import EAGER, ORDER_PROBE, ScopedForward

__all__ = ["OrphanWatch", "watch_first_runs", "watch_forward"]

_ATTENTION = re.compile(r"(attn|attention|indexer)", re.I)
#: Decision-like calls that return indices by nature (not a stable softmax's max).
_INDEX_CHOICES = frozenset(("topk", "argmax", "argmin"))
#: Calls that pick rows (or columns, or entries) of a table by indices: the positions of (table, indices) in the
#: call; ``__getitem__`` by a key that holds the indices at any place (``values[idx]``, ``values[:, idx]``).
_ROWS: dict[Any, tuple[int, str, int, str]] = {
    F.embedding: (1, "weight", 0, "input"),
    torch.embedding: (0, "weight", 1, "indices"),
    F.embedding_bag: (1, "weight", 0, "input"),
    torch.embedding_bag: (0, "weight", 1, "indices"),
    torch.index_select: (0, "input", 2, "index"),
    torch.Tensor.index_select: (0, "input", 2, "index"),
    torch.gather: (0, "input", 2, "index"),
    torch.Tensor.gather: (0, "input", 2, "index"),
    torch.take: (0, "input", 1, "index"),
    torch.Tensor.take: (0, "input", 1, "index"),
    torch.Tensor.__getitem__: (0, "self", 1, "key"),
}
#: Calls whose floating results carry the choice of followed indices: casts of them (a one-hot made a float mask)
#: and scatters by them (the chosen weights scattered into a dense ``[tokens, keys]`` mask). A float so made, and
#: what is computed from it, is followed as the indices are.
_SPREAD = frozenset(
    (
        torch.Tensor.to,
        torch.Tensor.float,
        torch.Tensor.half,
        torch.Tensor.bfloat16,
        torch.Tensor.double,
        torch.Tensor.type,
        torch.Tensor.type_as,
        torch.scatter,
        torch.Tensor.scatter,
        torch.Tensor.scatter_,
        torch.scatter_add,
        torch.Tensor.scatter_add,
        torch.Tensor.scatter_add_,
        torch.Tensor.scatter_reduce,
        torch.Tensor.scatter_reduce_,
    )
)
#: ... of which the scatters, whose choice is kept only where they scatter along the last dimension (over the keys)
_SCATTERS = frozenset(f for f in _SPREAD if "scatter" in getattr(f, "__name__", ""))
#: Products that read a table through a dense mask of followed choices (``one_hot(idx).float() @ values``).
_PRODUCTS = frozenset(
    (
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        F.linear,
        torch.einsum,
    )
)
#: Decision-like calls read as a choice outside every router only over exactly as many scores as a bank of experts
#: on the module's path holds (a ``max`` is often a stable softmax's, a ``sort`` of a row of ``k`` chosen ids is
#: dispatch; over a bank's width, they choose: a top-1, a top-p, a threshold).
_BANK_ONLY = frozenset(("sort", "argsort", "kthvalue", "max", "min"))
#: Random draws of indices (or of a one-hot) from a distribution over a dimension (``Categorical.sample`` calls
#: ``multinomial``).
_DRAWS = frozenset((torch.multinomial, torch.Tensor.multinomial, F.gumbel_softmax))
#: Random picks of indices below a bound, drawn from no scores (random routing: ``torch.randint(E, (T,))``, a
#: ``randperm`` of the experts): over exactly a bank's width outside every router, a choice among its experts.
_RANDOM_PICKS = frozenset((torch.randint, torch.randperm, torch.randint_like, torch.Tensor.random_))
#: Bernoulli draws, one per entry (a unit kept or dropped): of probabilities that vary along as many entries as a bank
#: holds, experts kept at random by a policy (conditional computation by Bernoulli units); of one probability for
#: all, a dropout mask drawn by hand, left alone.
_BERNOULLI = frozenset((torch.bernoulli, torch.Tensor.bernoulli, torch.Tensor.bernoulli_))
#: Calls that make a mask of chosen entries from indices (a one-hot, ones or weights scattered at them).
_MASKS = frozenset((F.one_hot, *(f for f in _SPREAD if "scatter" in getattr(f, "__name__", ""))))
#: Uniform draws, whose comparison with probabilities that vary is a Bernoulli draw by hand (``rand_like(p) < p``).
_UNIFORM = frozenset((torch.rand, torch.rand_like, torch.Tensor.uniform_))
#: Rankings that choose indices along any dimension, by where their ``dim`` is and its default: along the input's
#: tokens, for each entry of another dimension as wide as a bank (each expert taking its best tokens: expert choice).
_TOKEN_RANKINGS: dict[Any, tuple[int | None, int | None]] = {
    **{f: (2, -1) for f in (torch.topk, torch.Tensor.topk)},
    **{f: (1, -1) for f in (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort)},
    **{f: (1, None) for f in (torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin)},
    **{f: (None, -1) for f in (torch.multinomial, torch.Tensor.multinomial)},  # (drawn along the last dimension)
}
#: Rankings whose indices may choose which tokens reach the routers inside the module that takes them
#: (Mixture-of-Depths' top-k over each sequence, a sort of the tokens by a score): see :attr:`OrphanWatch.choosers`.
TOKEN_CHOICES = frozenset(
    (torch.topk, torch.Tensor.topk, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort)
)


def choice_indices(func: Any, out: Any) -> torch.Tensor | None:
    """The indices a call of :data:`TOKEN_CHOICES` returned (its second result, or the whole of an ``argsort``)."""
    if func in (torch.argsort, torch.Tensor.argsort):
        return out if isinstance(out, torch.Tensor) else None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor):
        return out[1]
    return None


#: Calls that pick tokens by a boolean mask (``x[mask]``, ``mask.nonzero()``): where the mask is a threshold on
#: floating scores, in the forward of a module holding routers, they choose which tokens reach those routers as a
#: ranking does (see :attr:`OrphanWatch.choosers`); every mask such a module picks by is recorded
TOKEN_MASKS = frozenset(
    (
        torch.Tensor.__getitem__,
        torch.nonzero,
        torch.Tensor.nonzero,
        torch.argwhere,
        torch.Tensor.argwhere,
        torch.masked_select,
        torch.Tensor.masked_select,
        torch.where,  # (of one argument, its condition: ``nonzero(as_tuple=True)``)
    )
)
#: Comparisons whose result, of floating scores, is a threshold's mask (see :data:`TOKEN_MASKS`); ``bool()`` of
#: floating scores is one too (a threshold at zero: ``relu(s).bool()``, ``heaviside(s, 0).bool()``)
_THRESHOLDS = frozenset(
    (
        torch.Tensor.__lt__,
        torch.Tensor.__le__,
        torch.Tensor.__gt__,
        torch.Tensor.__ge__,
        torch.Tensor.bool,
        *(f for name in ("lt", "le", "gt", "ge") for f in (getattr(torch, name), getattr(torch.Tensor, name))),
    )
)
#: Logical operations whose boolean result, of a threshold's mask, is one too (``keep & (rank < cap)``, ``~drop``)
_MASK_LOGIC = frozenset(
    (
        torch.Tensor.__and__,
        torch.Tensor.__rand__,
        torch.Tensor.__or__,
        torch.Tensor.__ror__,
        torch.Tensor.__xor__,
        torch.Tensor.__rxor__,
        torch.Tensor.__invert__,
        *(
            f
            for name in ("logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or")
            for f in (getattr(torch, name), getattr(torch.Tensor, name))
        ),
    )
)


#: Calls of :data:`TOKEN_MASKS` that return where their input is nonzero (a mask cast to numbers picks as the mask)
_NONZEROS = frozenset((torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.where))


def picking_mask(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The boolean mask a call of :data:`TOKEN_MASKS` picks by (an index of ``__getitem__``, the input of ``nonzero``,
    the mask of ``masked_select``), or None. The input of ``nonzero``, ``argwhere`` or ``where`` cast to numbers
    (``keep.long().nonzero()``) picks by where it is nonzero: that mask."""
    if func is torch.Tensor.__getitem__:
        index = args[1] if len(args) > 1 else None
        held = index if isinstance(index, tuple) else (index,)
        mask = next((v for v in held if isinstance(v, torch.Tensor) and v.dtype == torch.bool), None)
    elif func in (torch.masked_select, torch.Tensor.masked_select):
        mask = _arg(args, kwargs, 1, "mask")
    elif func is torch.where:  # (its condition, where given alone: the indices of its true entries)
        mask = args[0] if len(args) == 1 and not kwargs else None
    else:
        mask = _arg(args, kwargs, 0, "input")
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1:
        return None
    if mask.dtype != torch.bool and func in _NONZEROS:  # (the true entries of a mask cast to numbers: its nonzeros)
        return mask != 0
    return mask if mask.dtype == torch.bool else None


#: Casts and copies whose result carries a threshold's mask on, as its values in another dtype or on another device
#: (``keep.long()``, ``keep.to(torch.float32)``, ``keep.type(torch.int32)``, ``keep.cpu()``): ranked (an argsort of
#: the mask as integers) or picked by, they choose the tokens reaching the routers as the mask does
_MASK_CASTS = frozenset(
    getattr(torch.Tensor, name)
    for name in (
        "long int short char byte float double half bfloat16 bool to type type_as cpu cuda contiguous clone detach"
    ).split()
    if hasattr(torch.Tensor, name)
) | frozenset((torch.clone, torch.detach))
#: Calls that read a tensor's values on the host (whose use the watch cannot see): a threshold's mask read so, in a
#: module holding routers, may choose the tokens they see by Python indices (see :attr:`OrphanWatch.host_masks`)
_HOST_READS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("__index__", "__int__", "__float__", "__bool__", "item", "tolist", "numpy", "__array__")
    if hasattr(torch.Tensor, name)
)


#: Cumulative sums: along a bank's experts, a distribution's CDF, which a comparison turns into a choice (the count of
#: cumulative probabilities under a uniform draw is a sample drawn by hand; under a threshold, a top-p in order).
_CUMSUMS = frozenset((torch.cumsum, torch.Tensor.cumsum, torch.Tensor.cumsum_))
_COMPARES = frozenset(
    (
        torch.searchsorted,
        torch.bucketize,
        torch.Tensor.__lt__,
        torch.Tensor.__le__,
        torch.Tensor.__gt__,
        torch.Tensor.__ge__,
        *(
            f
            for name in ("lt", "le", "gt", "ge", "less", "less_equal", "greater", "greater_equal")
            for f in (getattr(torch, name), getattr(torch.Tensor, name))
        ),
    )
)
#: Calls that make a tensor's values Python numbers (whose use the watch cannot see: ``experts[int(i)]``).
_CONVERSIONS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("__index__", "__int__", "__float__", "__bool__", "__complex__", "item", "tolist", "numpy", "__array__")
    if hasattr(torch.Tensor, name)
)
#: Modules whose 3-D weights are filters, not experts.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _mask_arithmetic(
    thresholds: dict[int, tuple[weakref.ref[torch.Tensor], Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The largest threshold's mask (or mask cast) among the operands of this elementwise arithmetic (a scaling by a
    number, a shift, an addition of another tensor: ``keep.long() * 2``, ``keep.float() + bonus``), or None. The
    result, as many entries, keeps the mask's order: ranked, it tells the tokens the mask does."""
    held = [a for a in _flat(args, kwargs) if _weak_get(thresholds, a) is not None]
    return max(held, key=lambda t: t.numel()) if held else None


def _mask_select(
    thresholds: dict[int, tuple[weakref.ref[torch.Tensor], Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The threshold's mask a ``torch.where(mask, a, b)`` selects by, where ``a`` and ``b`` are numbers (or tensors
    of one entry): its result, as many entries, tells the tokens the mask does (``torch.where(keep, 2, 1)`` ranked),
    or None."""
    if len(args) + len(kwargs) != 3:
        return None
    mask = _arg(args, kwargs, 0, "condition")
    values = (_arg(args, kwargs, 1, "input"), _arg(args, kwargs, 2, "other"))
    if _weak_get(thresholds, mask) is None or not all(
        isinstance(v, (int, float, bool)) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in values
    ):
        return None
    return mask if isinstance(mask, torch.Tensor) else None


#: Writes of a value where a mask holds (``z.masked_fill(keep, 1)``, ``z[keep] = 1``): into a tensor of one value
#: throughout, a threshold's mask written so is that mask in numbers (see :func:`_mask_fill`)
_MASK_FILLS = frozenset(
    (torch.masked_fill, torch.Tensor.masked_fill, torch.Tensor.masked_fill_, torch.Tensor.__setitem__)
)


def _mask_fill(
    thresholds: dict[int, tuple[weakref.ref[torch.Tensor], Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The threshold's mask a call of :data:`_MASK_FILLS` writes one number at, into a tensor of its shape holding
    one other value throughout (``torch.zeros(n).masked_fill(keep, 1)``, ``z[keep] = 1``): the result, ranked, tells
    the tokens the mask does; or None (read before the write)."""
    target = _arg(args, kwargs, 0, "input")
    index = _arg(args, kwargs, 1, "mask")
    mask = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    value = _arg(args, kwargs, 2, "value")
    if (
        not isinstance(target, torch.Tensor)
        or not isinstance(mask, torch.Tensor)
        or _weak_get(thresholds, mask) is None
        or target.shape != mask.shape
        or not target.numel()
        or not (isinstance(value, (int, float, bool)) or (isinstance(value, torch.Tensor) and value.numel() == 1))
    ):
        return None
    flat = target.detach().reshape(-1)
    return mask if bool((flat == flat[0]).all()) and bool(flat[0] != value) else None


def _tensor_funcs(names: str) -> frozenset[Any]:
    """The functions of ``torch`` and methods of ``torch.Tensor`` of these names (those that exist)."""
    return frozenset(
        f for name in names.split() for owner in (torch, torch.Tensor) if callable(f := getattr(owner, name, None))
    )


#: Calls whose floating result holds values of their first argument, picked, viewed or cast (see
#: :meth:`OrphanWatch.returned`): an attached router's returned weights stay its scores through them.
_CARRIES = _tensor_funcs(
    "__getitem__ gather index_select take take_along_dim masked_select detach clone contiguous view reshape "
    "flatten unflatten squeeze unsqueeze view_as reshape_as t transpose permute movedim expand expand_as "
    "to float half bfloat16 double long int short byte type type_as narrow select unbind chunk split"
)
#: Elementwise scalings of such values (by a number, or by a tensor no larger than they: the weights renormalised,
#: scaled, shifted); a product with the hidden states (larger) is not followed, nor a matmul.
_SCALINGS = _tensor_funcs(
    "mul div true_divide add sub neg abs clamp clamp_min clamp_max __mul__ __rmul__ __truediv__ __rtruediv__ "
    "__add__ __radd__ __sub__ __rsub__ __neg__ __abs__"
)
#: Those of the scalings that move a zero off zero (a threshold at zero of their result is one at another value).
_SHIFTS = _tensor_funcs("add sub clamp clamp_min clamp_max __add__ __radd__ __sub__ __rsub__")
#: Calls that keep each zero of such values zero and each other value other (a renormalisation, a sign flip, a ``relu``
#: of non-negative weights, a ``where`` or ``masked_fill`` that zeroes slots): a threshold at zero of their result is
#: still the pattern of the slots the decision filled. Any other call made from them elementwise or along their rows
#: (see :meth:`OrphanWatch._derived`) moves that line: a ``log``, a ``floor``, a cast to integers, a ``heaviside``.
#: So do the reductions whose zeros, of nonnegative values, are where all their operands' are (``weights.sum(-1)``, a
#: token's total weight: zero where it filled no slot), not a running total (a ``cumsum`` moves the zeros after one).
_KEEP_ZERO = _tensor_funcs(
    "mul mul_ div div_ true_divide neg neg_ abs abs_ relu relu_ sign where masked_fill masked_fill_ __mul__ __rmul__ "
    "__imul__ __truediv__ __itruediv__ __neg__ __abs__ sum mean nansum nanmean amax amin norm"
) | {nn.functional.normalize}
#: Calls whose result holds none of such values, only their shape (``zeros_like(weights)``, ``fill_``), or tells
#: only which are no numbers (``isnan``: a guard, no choice by score).
_FRESH = _tensor_funcs(
    "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty "
    "new_full zero_ fill_ normal_ uniform_ random_ bernoulli_ exponential_ isnan isinf isfinite isposinf isneginf "
    "isreal"
)
#: Calls whose result holds the values of their second argument, not of their first (``buffer.copy_(weights)``,
#: ``weights.new_tensor(values)``): it holds such values only where that argument does.
_COPIES = {torch.Tensor.copy_: "src", torch.Tensor.new_tensor: "data"}
#: Rankings whose input, and whose values, are scores (see :meth:`OrphanWatch._note_scores`)
_RANKED_VALUES = _tensor_funcs("topk sort kthvalue")
#: Calls whose other tensor arguments are templates (a dtype, a device, a shape): their result holds only the
#: values of the first
_TEMPLATES = _tensor_funcs("to type_as view_as reshape_as expand_as")
#: Calls that make a tensor of the values they are handed (a list of a Python iteration's rows among them): it
#: holds such values where any of them does
_MADE_OF = frozenset((torch.tensor, torch.as_tensor, torch.asarray))
#: Calls whose result, of such values, is where they are not zero (``nonzero``, ``!= 0``) or compares them (``==``
#: the row's ``amax``): thresholds too, at zero where given the number 0 (see :func:`_at_zero`).
_PATTERNS = _tensor_funcs("nonzero argwhere ne eq not_equal __ne__ __eq__")
#: Those of the patterns that compare for equality.
_EQUALITY = _tensor_funcs("ne eq not_equal __ne__ __eq__")
#: Those of the patterns whose result is where such values are not zero.
_WHERE_NONZERO = _tensor_funcs("nonzero argwhere")
#: Rankings of such values outside every router: a later choice by score (a capacity drop by a top-k of the weights,
#: a sort of them, a top-p; ``unique``, whose inverse indices are their ranks), refused as made.
_LATER_RANKINGS = _tensor_funcs("topk sort argsort msort kthvalue argmax argmin unique unique_consecutive")
#: Extremes along a dimension, whose indices are a choice only where used (a ``max`` of the weights logged, or a
#: stable softmax's, is none): the indices are followed, and refused where a later call reads them.
_LATER_EXTREMES = _tensor_funcs("max min")
#: Calls a threshold's mask (or an extreme's indices) may pass through and still be only a statistic: counted,
#: averaged, cast or viewed for it. Any other use (picking tokens by it, a ``where``, a ``masked_fill``, a product)
#: makes it a choice.
_STATISTICS = _tensor_funcs("sum mean any all count_nonzero nansum numel")


#: Calls that gather such values with others into one tensor (joined, padded, written into a buffer, selected by a
#: mask, repeated): where any floating argument holds them, so does the result, whatever its size (a dense
#: ``[tokens, experts]`` table of the weights scattered at their ids, a combine tensor, is their scores still), its
#: zeros moved only where theirs were.
_GATHERS = _tensor_funcs(
    "cat concat concatenate stack hstack vstack dstack column_stack where masked_fill masked_fill_ masked_scatter "
    "masked_scatter_ scatter scatter_ scatter_add scatter_add_ scatter_reduce scatter_reduce_ index_put index_put_ "
    "index_add index_add_ index_copy index_copy_ repeat repeat_interleave tile roll flip fliplr flipud cpu cuda "
    "__setitem__ put put_ diag_embed diagonal"
) | {F.pad}
#: Those of the gathers that sum (or otherwise reduce) the values into the entries of a buffer: into fewer entries
#: than the values (an expert's summed weight over its tokens), a statistic of them.
_BINNING = _tensor_funcs("scatter_add scatter_add_ scatter_reduce scatter_reduce_ index_add index_add_ put put_")
#: Histograms of such values (counts, or weights summed per bin): a statistic of them all.
_HISTOGRAMS = _tensor_funcs("histc histogram bincount")
#: Reductions of such values (per token, per expert, or of them all: a total routing weight, an expert's load, an
#: auxiliary loss): the result holds their scores still (a ranking of the tokens by their total weight chooses by
#: them); a reduction to one number is a statistic, which may be made a Python number (logged) freely.
_REDUCTIONS = _tensor_funcs(
    "sum mean nansum nanmean amax amin logsumexp prod norm std var median nanmedian cumsum cumprod"
)
#: Those of the reductions that keep the dimension they run along (a running total per entry): never a statistic.
_RUNNING = _tensor_funcs("cumsum cumprod")
#: The Python iteration of a tensor (``for w in weights``, a list comprehension over it): its rows hold its values.
_ITERATE = frozenset((torch.Tensor.__iter__,))


#: Calls that read only the dtype, device or shape of their arguments after the first (``w.type_as(x)``,
#: ``w.expand_as(x)``): the data of the forward they are given is not carried into their result.
_SHAPE_OF_OTHERS = _tensor_funcs("type_as expand_as view_as reshape_as to new_zeros new_ones new_empty new_full")
#: In-place calls whose first argument takes in the values of the others (``out[tok] = y``, ``out.index_add_``).
_WRITES = frozenset((torch.Tensor.__setitem__,)) | _tensor_funcs(
    "copy_ index_add_ index_copy_ index_put_ masked_scatter_ scatter_ scatter_add_ scatter_reduce_ put_ add_ sub_ mul_ "
    "div_ addcmul_ addcdiv_ __iadd__ __isub__ __imul__ __itruediv__"
)

#: Logical combinations of masks (a threshold's mask combined with another stays a threshold's).
_LOGICAL = _tensor_funcs(
    "__and__ __or__ __xor__ __invert__ __rand__ __ror__ logical_and logical_or logical_not bitwise_not"
)


def _at_zero(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Is this threshold (of :data:`_THRESHOLDS` or :data:`_PATTERNS`) one at zero: ``bool()``, ``nonzero()``, or a
    comparison with the number 0? Of a router's returned weights, unshifted, it is the pattern of the slots its
    decision filled, not a choice by score."""
    if func is torch.Tensor.bool or func in _WHERE_NONZERO:
        return True
    other = [a for a in (*args, *kwargs.values()) if not isinstance(a, torch.Tensor)]
    return len(other) == 1 and isinstance(other[0], int | float) and not isinstance(other[0], bool) and other[0] == 0


def _id_compare(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Is this an equality comparison (of :data:`_EQUALITY`) of floating values with a whole number other than zero
    (``idx == e`` where the ids travel as floats)? Of scores it picks only the entries exactly that number, no range
    of them: an expert's id compared, no threshold. Scores compared with scores (``w == w.max(-1, keepdim=True)
    .values``, an arg-max by hand), integers made from them (``(w * 4).long() == 2``) or zero (the slots' pattern,
    :func:`_at_zero`) are thresholds still; so are values moved since (``(w * 4).floor() == 2``: the caller's to
    tell)."""
    if func not in _EQUALITY:
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    other = [a for a in (*args, *kwargs.values()) if not isinstance(a, torch.Tensor)]
    return (
        len(tensors) == 1
        and tensors[0].is_floating_point()
        and len(other) == 1
        and isinstance(other[0], int | float)
        and not isinstance(other[0], bool)
        and other[0] != 0
        and float(other[0]).is_integer()
    )


def _slot_pattern(t: torch.Tensor, ints: list[torch.Tensor]) -> bool:
    """Are the zeros of ``t``, a floating tensor a router returned beside the integer tensors ``ints``, the slots its
    decision left unfilled, so that a threshold at zero of it is the pattern the decision dispatched by, forced
    with it (:func:`_at_zero`)? So are nonnegative weights (a softmax's, a top-k's, them scattered into a dense map
    by the ids), but not raw scores with signs (``logits > 0`` sends a token to every expert whose logit is
    positive: a choice by score), nor a dense map of more nonzeros per row than the slots of ids beside it (a
    ReLU of the logits). Read where that can be (a tensor with values, no graph being captured); otherwise taken
    to be (as before this was read)."""
    if t.numel() == 0:
        return True
    try:
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        with NO_TORCH_FUNCTION():
            flat = t.detach()
            if bool((flat < 0).any()):
                return False
            for ids in ints:
                if ids.dim() == t.dim() and ids.shape[:-1] == t.shape[:-1] and ids.shape[-1] < t.shape[-1]:
                    if bool(((flat != 0).sum(-1) > ids.shape[-1]).any()):
                        return False
    except (RuntimeError, NotImplementedError):  # (a tensor without values: fake, meta)
        return True
    return True


def _tensors(value: Any, depth: int) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or those of a tuple, list or dict (nested up to ``depth`` levels)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth <= 0:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, depth - 1)]
    return []


def _flat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors a call was given: its arguments, and those in a tuple or list of them (an index's parts)."""
    return _tensors([*args, *kwargs.values()], 2)


def _ordering() -> bool:
    """Is this thread running a token-order run (:func:`moe_replay._feeds.token_order`: a probe forward that no
    block's check follows)?"""
    thread = ORDER_PROBE.thread
    return thread is not None and ORDER_PROBE.check is None and thread == threading.get_ident()


def _read(t: torch.Tensor, test: Callable[[torch.Tensor], torch.Tensor], unread: bool) -> bool:
    """``test`` (a boolean reduction) of ``t``'s values, read where that can be (a tensor with values, no graph being
    captured); ``unread`` otherwise."""
    if t.numel() == 0 or t.is_meta:
        return unread
    try:
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return unread
        with NO_TORCH_FUNCTION():
            return bool(test(t.detach()))
    except (RuntimeError, NotImplementedError):  # (a tensor without values: fake)
        return unread


def _negative(t: torch.Tensor) -> bool:
    """Does ``t`` hold a negative entry (where its values can be read)?"""
    return _read(t, lambda v: (v < 0).any(), False)


def _whole(t: torch.Tensor) -> bool:
    """Does ``t`` hold whole numbers only (tokens counted per expert by a ``histc``, ids cast to floats): no scores? A
    tensor whose values cannot be read is taken to hold scores."""
    return _read(t, lambda v: (v == v.round()).all(), False)


def _token_count(values: Iterable[Any]) -> int | None:
    """The tokens the first tensor of ``values`` holds: its rows of features where it is floating (all dimensions but
    the last), each entry where it is integer (token ids); None where there is no such tensor."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and not v.is_meta:
            if v.is_floating_point():
                return v.numel() // max(int(v.shape[-1]), 1) if v.dim() >= 2 else None
            return v.numel() if v.dtype != torch.bool else None
    return None


def _calling_module(names: dict[int, str], depth: int = 2) -> tuple[str | None, bool]:
    """Name of the innermost module of ``names`` whose method is on the Python stack (from ``depth`` frames up),
    and whether that method is torch's own call of the module (``_call_impl``: the call came from one of its
    hooks, not its forward). A router's forward called as ``module.forward(x)`` runs the session's replacement
    forward without torch's call of the module: its calls (the router's, and the session's own that establish its
    decision) are the router's."""
    f: types.FrameType | None = sys._getframe(depth)
    while f is not None:
        me = f.f_locals.get("self")
        if me is None:  # (a method whose first parameter has another name: ``def forward(module, x)``)
            me = _method_owner(f)
        if isinstance(me, ScopedForward):
            me = me.__moe_replay_hook__.scope
        if isinstance(me, nn.Module) and id(me) in names:
            return names[id(me)], f.f_code.co_filename == _MODULE_CALL
        f = f.f_back
    return None, False


_MODULE_CALL = nn.Module.__call__.__code__.co_filename  # torch/nn/modules/module.py: where hooks are run
#: the code of every function a module class defines (its own and its bases'), by class (see :func:`_method_owner`)
_METHOD_CODES: weakref.WeakKeyDictionary[type, frozenset[types.CodeType]] = weakref.WeakKeyDictionary()


def _codes_of(value: Any) -> Iterator[types.CodeType]:
    """The code of a function a class holds (a static or class method's, and those a decorator wrapped, a few
    deep)."""
    fn = getattr(value, "__func__", value) if isinstance(value, staticmethod | classmethod) else value
    for _ in range(4):
        if not isinstance(fn, types.FunctionType):
            return
        yield fn.__code__
        fn = getattr(fn, "__wrapped__", None)


def _method_owner(frame: types.FrameType) -> nn.Module | None:
    """The module a frame runs a method of, where that method names its first parameter otherwise than ``self``
    (``def forward(module, x)``): the frame's first argument, where it is a module whose class (or a base) defines
    the function the frame runs; else None (a hook or a helper given a module is none)."""
    code = frame.f_code
    if not code.co_argcount:
        return None
    me = frame.f_locals.get(code.co_varnames[0])
    if not isinstance(me, nn.Module):
        return None
    kind = type(me)
    codes = _METHOD_CODES.get(kind)
    if codes is None:
        codes = frozenset(c for base in kind.__mro__ for v in vars(base).values() for c in _codes_of(v))
        _METHOD_CODES[kind] = codes
    return me if code in codes else None


def _vector_choice(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, int, int] | None:
    """``(family, k, width)`` when this call picks indices from a 1-D vector of scores (an ``argmax``/``argmin``,
    a ``max``/``min`` along its dimension, a ``topk`` of fewer than all): a choice made one row at a time, which
    :func:`moe_replay.evidence.decision_call` (rows of ``[tokens, E]`` scores) does not read as one."""
    family = _FAMILY.get(func)
    if family not in ("topk", "argmax", "argmin", "max", "min"):
        return None
    x = _arg(args, kwargs, 0, "input")
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype == torch.bool or x.shape[0] < 2:
        return None
    width = int(x.shape[0])
    if family == "topk":
        k = _arg(args, kwargs, 1, "k")
        if isinstance(k, torch.Tensor) and k.numel() == 1:
            k = int(k.item())
        return (family, k, width) if isinstance(k, int) and not isinstance(k, bool) and 0 < k < width else None
    if family in ("max", "min") and _arg(args, kwargs, 1, "dim") is None:
        return None  # the value only, no index chosen (or a max of two tensors)
    return family, 1, width


def _random_bound(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """How many values a ``randint``, ``randint_like`` or ``random_`` (``high - low``) or ``randperm`` (``n``) call
    draws among; None where not told by plain integers."""
    if func is torch.randperm:
        n = _arg(args, kwargs, 0, "n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    low, high = (ints[0], ints[1]) if len(ints) >= 2 else (0, ints[0] if ints else None)
    low, high = kwargs.get("low", kwargs.get("from", low)), kwargs.get("high", kwargs.get("to", high))
    if not isinstance(low, int) or not isinstance(high, int) or isinstance(high, bool):
        return None
    return high - low if high - low >= 2 else None


def _varies(p: torch.Tensor) -> bool:
    """Do the probabilities ``p`` hold more than one value (read where that can be; otherwise taken to)?"""
    if p.numel() < 2:
        return False
    try:
        if p.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        flat = p.detach().reshape(-1)
        return bool((flat != flat[0]).any())
    except (RuntimeError, NotImplementedError):  # (a tensor without values: fake, meta)
        return True


def _storage(t: torch.Tensor) -> int:
    """Where ``t``'s data lies (its storage's address; a tensor without storage: its id)."""
    try:
        return int(t.untyped_storage().data_ptr()) or id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


def _weak_put(into: dict[int, tuple[weakref.ref[torch.Tensor], Any]], t: Any, value: Any) -> None:
    """Note ``value`` for the tensor ``t`` in ``into`` by its id, as long as ``t`` lives (the watch keeps no tensor
    alive, and a freed tensor's id may be another's next)."""
    if not isinstance(t, torch.Tensor):
        return
    key = id(t)

    def gone(_: weakref.ref[torch.Tensor]) -> None:
        into.pop(key, None)

    into[key] = (weakref.ref(t, gone), value)


def _weak_get(into: dict[int, tuple[weakref.ref[torch.Tensor], Any]], x: Any) -> Any:
    """What ``into`` notes for the tensor ``x`` (or the first of a list or tuple of them), or None."""
    for t in x if isinstance(x, (list, tuple)) else (x,):
        if isinstance(t, torch.Tensor):
            entry = into.get(id(t))
            if entry is not None and entry[0]() is t:
                return entry[1]
    return None


def _holds_experts(module: nn.Module) -> bool:
    """A child named ``expert*`` (not ``shared``), or a child with 3-D parameters (stacked experts)."""
    for child_name, child in module.named_children():
        low = child_name.lower()
        if "expert" in low and "shared" not in low:
            return True
        if any(p.dim() == 3 for p in child.parameters(recurse=False)):
            return True
    return False


def _expert_banks(module: nn.Module) -> set[int]:
    """How many experts ``module`` holds, by each bank it holds directly: the length of an ``expert*``
    module list, the first dimension of 3-D parameters of its own or of an ``expert*`` child (not a
    convolution's weight), each leading dimension of an ``expert*`` child's parameters of four or more (a grid
    of experts, one router per level: a hierarchical MoE), the output width of an ``expert*`` layer computing
    every expert at once (a multiple of the expert count), the length of a ``ParameterList`` of like weights,
    of a list of functions kept on the module (experts that are no modules), or of a list of like modules
    beside a ``Linear`` with as many outputs (LoRA experts, see :func:`_gated_lists`)."""
    banks: set[int] = set()
    if not isinstance(module, _CONV):
        banks |= {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
    for child_name, child in module.named_children():
        low = child_name.lower()
        if "expert" in low and "shared" not in low:
            if isinstance(child, nn.ModuleList | nn.ModuleDict | nn.Sequential):
                banks.add(len(child))
            elif not isinstance(child, _CONV):
                banks |= {p.shape[0] for p in child.parameters(recurse=False) if p.dim() in (2, 3)}
                # a grid of experts ``[outer, inner, ..., in, out]`` (a hierarchical MoE): each leading dimension
                banks |= {n for p in child.parameters(recurse=False) if p.dim() > 3 for n in p.shape[:-2]}
        if isinstance(child, nn.ParameterList) and len(child) >= 2:
            shapes = {tuple(p.shape) for p in child}
            if len(shapes) == 1 and len(next(iter(shapes))) >= 2:
                banks.add(len(child))
    for value in vars(module).values():
        if (
            isinstance(value, list | tuple)
            and len(value) >= 2
            and all(callable(f) and not isinstance(f, nn.Module | type) for f in value)
        ):
            banks.add(len(value))
    return banks | _gated_lists(module)


def _moe_groups(module: nn.Module) -> set[int]:
    """The lengths of the lists of like MoE blocks that ``module`` holds directly (two or more of one class, each
    holding experts): groups of experts, each with its own router, that a choice in ``module`` picks among (a
    hierarchical MoE whose first level, a language or task gate, chooses a group per token). Only the module that
    holds such a list counts: a model's stack of MoE layers is one too, and its forward chooses among no layers."""
    counts: set[int] = set()
    for child in module.children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(m) for m in child}) == 1:
            if all(_holds_experts(m) for m in child):
                counts.add(len(child))
    return counts


def _per_adapter(child: nn.Module) -> list[nn.Module]:
    """``child``, or the values of a ``ModuleDict`` keyed by adapter name (peft keeps each adapter's modules so)."""
    return list(child.values()) if isinstance(child, nn.ModuleDict) else [child]


def _gated_lists(module: nn.Module) -> set[int]:
    """The expert counts of banks of no telling name that ``module`` holds beside a ``Linear`` with as many outputs
    (a gate): lists of like modules, or stacked ``[E, ...]`` weights in a ``ParameterDict``, directly or per adapter
    name in a ``ModuleDict`` (the ``lora_A`` / ``lora_B`` experts of a mixture of LoRA experts beside its
    ``lora_router``; peft keeps each adapter's weights so). A stack of layers sits beside no layer as wide as it is
    long."""
    gates = {m.out_features for child in module.children() for m in _per_adapter(child) if isinstance(m, nn.Linear)}
    counts: set[int] = set()
    for child in module.children():
        for bank in _per_adapter(child):
            if isinstance(bank, nn.ModuleList) and len(bank) >= 2 and len(bank) in gates:
                kinds = {(type(m), tuple(tuple(p.shape) for p in m.parameters())) for m in bank}
                if len(kinds) == 1:
                    counts.add(len(bank))
            elif isinstance(bank, nn.ParameterDict):
                counts |= {p.shape[0] for p in bank.values() if p.dim() == 3 and p.shape[0] in gates}
    return counts


class OrphanWatch(TorchFunctionMode):
    """Watches one model forward for decision-like calls outside every attached router.

    Args:
        model: the model the session is attached to.
        scopes: module paths whose forwards are intercepted.
        widths: the expert widths of the attached routers.
        excluded: ``(name, module) -> bool`` for modules the user excluded from discovery.
    """

    def __init__(
        self,
        model: nn.Module,
        scopes: Iterable[str],
        widths: Iterable[int],
        excluded: Callable[[str, nn.Module], bool] | None = None,
        place: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        #: tells where the routers stand in their rows (see :attr:`places`), where given
        self.place = place
        #: where the routers stood in their rows at each of :attr:`choices` (what ``place`` told; None: not given)
        self.places: list[Any] = []
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        self.scopes = tuple(scopes)
        self.widths = frozenset(widths)
        self.excluded = excluded
        self.found: list[str] = []
        #: integer tensors made from the indices of a top-k outside every router (see :meth:`_follow`), by id:
        #: a weak reference to the tensor (the watch keeps no tensor alive) and where that top-k was taken
        self.picked: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self.reported: set[str] = set()  # the top-k's among keys found picking rows (each is named once)
        #: the followed choices made in attention along a learned projection's outputs (see :meth:`_head_choice`)
        self.heads: set[str] = set()
        #: the modules seen calling ``scaled_dot_product_attention`` (attention written inline in a block's forward)
        self.attending: set[str] = set()
        self.keys: dict[str, int] = {}  # the number of keys each followed top-k chose among (see _pick)
        self.weights: dict[int, str] | None = None  # the model's weights by their storage (read when first needed)
        #: the dimensions known to run over the forward's input (tokens, features): a draw, sort or ranking along
        #: one is no choice among experts, whatever its width (see :meth:`seed`)
        self.axes = Axes()
        #: integer tensors made from a draw among as many values as a bank holds, from no scores (``randint``,
        #: ``randperm``): what the draw is reported as, until it is seen picking rows of the input alone
        self.drawn: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self.pending: dict[str, bool] = {}  # those draws, and whether one picked rows of the input (see _drawn_use)
        #: cumulative sums along as many entries as a bank may hold, not known to be the input's: their width
        self.cdf: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        #: uniform draws (``rand``, ``rand_like``), whose comparison with probabilities is a Bernoulli draw by hand
        self.uniform: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}
        #: the grouped convolutions each module holds, by its name, as read (see :meth:`_grouped_experts`)
        self.grouped: dict[str, list[tuple[str, int]]] = {}
        #: the modules that ranked floating scores along the input's tokens in their own forward below a module holding
        #: an attached router (see :meth:`_holder_ranking`), by path: the nearest such holder's path, where the first
        #: such call was made, and whether one of its rankings put every token of a sequence in an order (a sort, or a
        #: top-k of all of them) rather than choosing some
        self.ranked: dict[str, tuple[str, str, bool]] = {}
        #: those of them whose routers ran after that ranking: the tokens reaching those routers may be the ones it
        #: chose (Mixture-of-Depths), so each such module's rankings are recorded at capture and compared at replay
        self.choosers: list[str] = []
        #: the indices of every ranking that a module holding an attached router took in its own forward, with its
        #: path, in call order (:meth:`chosen` keeps those of :attr:`choosers`)
        self.choices: list[tuple[str, torch.Tensor]] = []
        #: the masks made by a threshold on floating scores, and those cut or cast from them (see :meth:`_holder_mask`)
        self.thresholds: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}
        #: the modules below a module holding an attached router that read a threshold's mask on the host in their own
        #: forward (``mask.tolist()``, ``mask[i].item()``, ``mask.cpu().numpy()``), by path: that holder and where; one
        #: whose holder's routers then see fewer tokens, and that took no ranking nor mask pick the record holds, chose
        #: them by Python values no record can hold: refused (:attr:`host_found`)
        self.host_masks: dict[str, tuple[str, str]] = {}
        #: what each such refused choice is reported as (see :meth:`check`)
        self.host_found: list[str] = []
        self.tokens: int | None = None  # the watched forward's tokens (see seed), where its input tells them
        #: floating tensors holding an attached router's returned values (its weights or scores), picked, viewed,
        #: cast or scaled since (see :meth:`returned`), by id: the router's path
        self.scored: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        #: floating tensors made of scores by provenance, whatever their values (see :meth:`_note_scores`): those a
        #: ranking ranked, or the values it gave (a top-k's), and what floating calls made of them since; an
        #: attached router that returns one returns scores, though whole (a saturated softmax's ones and zeros)
        self.from_scores: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}
        #: those of :attr:`scored` whose zeros are not the slots the router left unfilled: shifted by an addition or a
        #: clamp since, or never (raw scores with signs, see :func:`_slot_pattern`)
        self.shifted: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}
        #: masks of a threshold on such values, and indices of an extreme of them, outside every router: what they are
        #: reported as once a later call reads them (see :meth:`_later`)
        self.later: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        #: those of :attr:`scored` that hold the router's own values, only picked, viewed or cast since (no value
        #: computed from them): where whole numbers, ids it packed beside its weights, not scores made whole (a
        #: ``round`` or ``floor`` of them, which still rank as the scores do)
        self.raw: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}
        #: those of :attr:`scored` that are a statistic of them all (a sum, a mean, an auxiliary loss: one number),
        #: which may be made a Python number (logged) without choosing anything
        self.reduced: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}
        #: the widths of the hidden states the routers read (their 2-D weights' inputs) and of the watched forward's
        #: floating inputs: a product of the values into this width is followed only with weights or tables (see
        #: :attr:`data`), as one into more entries is
        self.features = {
            int(p.shape[-1])
            for scope in self.scopes
            if scope in self.modules
            for p in self.modules[scope].parameters()
            if p.dim() == 2
        }
        #: the later choices by score found (see :meth:`_later`): reported by :meth:`check` apart from the orphans
        self.later_found: list[str] = []
        #: tensors made from the watched forward's input (see :meth:`seed`): the hidden states, the experts' outputs,
        #: any call's result given one (not a router's returned values, see :meth:`returned`). A product of a router's
        #: values with one is a combine (of the experts' outputs) or a dispatch of the hidden states, not followed;
        #: with a weight or a table made in the forward (``weights @ M``), its result holds their scores still
        self.data: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}
        #: whether each module run is an expert or a bank of them, or inside one (see :meth:`_in_bank`), by its path:
        #: what it returns is the experts' outputs, data of the forward whatever it was given
        self.banked: dict[str, bool] = {}

    def seed(self, args: Iterable[Any], kwargs: dict[str, Any] | None = None) -> None:
        """Mark the dimensions of the tensors the watched forward is called with as the input's (tokens, batch,
        features): along them, or dimensions made from them only, a draw, sort or ranking chooses no expert."""
        values = (*args, *(kwargs or {}).values())
        self.axes.seed(values)
        self.tokens = _token_count(values)
        self.features.update(int(t.shape[-1]) for t in _tensors(list(values), 1) if t.is_floating_point() and t.dim())
        for t in _tensors(list(values), 2):
            _weak_put(self.data, t, True)

    def _in_moe(self, name: str) -> bool:
        """Inside an MoE block (a module holding experts), and not inside attention?

        A sparse-attention indexer's top-k over keys can be as wide as the expert count; it
        is not a routing decision, and it sits in an attention module beside no experts.
        """
        parts = name.split(".") if name else []
        for i in range(len(parts), -1, -1):
            module = self.modules[".".join(parts[:i])]
            if _ATTENTION.search(parts[i - 1] if i else "") or _ATTENTION.search(type(module).__name__):
                return False
            if _holds_experts(module):
                return True
        return False

    def _chooses_among_experts(self, name: str, width: int) -> bool:
        """Does a module on the path (itself first) hold a bank of experts that a choice over ``width``
        picks from: ``width`` of them, or ``width`` per group of them (SwitchHead's experts per head)?
        For choices of indices (top-k, arg-max) only: attention that holds such a bank chooses experts
        too, and an MoE layer no router was found for may have another expert count than the routers."""
        parts = name.split(".") if name else []
        for i in range(len(parts), -1, -1):
            if any(n % width == 0 for n in _expert_banks(self.modules[".".join(parts[:i])])):
                return True
        return False

    def _vector_orphan(self, name: str, width: int) -> bool:
        """Is a choice over ``width`` scores in the module at ``name`` (one row at a time, a random draw, a ranking)
        one among experts outside every router: the module (outside attached, excluded, attention and expert
        modules), or one on its path, holds a bank of exactly ``width`` experts?"""
        if self._known(name) or self._in_attention(name) or (name and self._in_bank(name)):
            return False
        parts = name.split(".") if name else []
        return any(width in _expert_banks(self.modules[".".join(parts[:i])]) for i in range(len(parts), -1, -1))

    def _vector_found(self, what: str, width: int, over: str, noun: str = "scores", note: bool = True) -> str | None:
        """Note a choice made one row at a time, or drawn at random, over ``width`` scores (see
        :meth:`_vector_orphan`), where the module calling it makes it an orphan (each call site once); returns what
        it is reported as (not noted with ``note=False``)."""
        name, _ = _calling_module(self.names, 3)
        if name is None or not self._vector_orphan(name, width):
            return None
        found = f"'{name}' ({type(self.modules[name]).__name__}): {what} {over} {width} {noun} at {_where()}"
        if note and found not in self.found:
            self.found.append(found)
        return found

    def _in_attention(self, name: str) -> bool:
        """Is a module on the path (itself first) attention, by its attribute or class name?"""
        parts = name.split(".") if name else []
        return any(
            _ATTENTION.search(parts[i - 1] if i else "")
            or _ATTENTION.search(type(self.modules[".".join(parts[:i])]).__name__)
            for i in range(len(parts), -1, -1)
        )

    def _orphan(self, name: str, sig: tuple[str, int, int], x: Any = None) -> bool:
        """A call over an attached router's width in an MoE block, or a choice of indices over experts a
        module on its path holds, or over an attached router's width by a module holding no router.

        The last is an MoE layer whose experts no rule sees (one layer computing every expert, kept under
        another name): outside attention, a module that holds no router and a weight as wide as a router's
        experts, choosing among that many, is taken for one (a choice among tokens or keys, whose number
        is no weight's width, is not). The model's own forward (or a module holding routers: an auxiliary
        loss over all router scores) is not. A ranking (``max``, ``sort``, ``kthvalue``) along a dimension known to be
        the input's (its tokens) is none, whatever its width."""
        if sig[0] in _BANK_ONLY and not self.axes.may_choose(x, -1):
            return False
        if self._in_one_expert(name):
            return False  # (an expert's own top-k, over its hidden units: a k-sparse activation chooses no expert)
        if sig[2] in self.widths and self._in_moe(name):
            return True
        if name and sig[1] < sig[2] and sig[2] in _moe_groups(self.modules[name]) and not self._known(name):
            return True  # (a choice among the MoE blocks the module holds: the first level of a hierarchy)
        if sig[0] in _BANK_ONLY:
            return self._vector_orphan(name, sig[2])  # over exactly a bank's experts: a top-1, a top-p, a threshold
        if sig[0] not in _INDEX_CHOICES or sig[1] >= sig[2]:
            return False
        if self._chooses_among_experts(name, sig[2]):
            return True
        if sig[2] not in self.widths or any(not name or s == name or s.startswith(name + ".") for s in self.scopes):
            return False
        scores = any(sig[2] in p.shape for p in self.modules[name].parameters() if p.dim() == 2)
        return scores and not self._in_attention(name)

    def _scope(self, name: str) -> bool:
        """Is the module at ``name`` an attached router's scope, or inside one?"""
        return any(not scope or name == scope or name.startswith(scope + ".") for scope in self.scopes)

    def _known(self, name: str) -> bool:
        for scope in self.scopes:
            if not scope or name == scope or name.startswith(scope + "."):
                return True
        if self.excluded is not None:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if self.excluded(sub, self.modules[sub]):
                    return True
        return False

    def __enter__(self) -> OrphanWatch:
        # the watched forward runs eagerly, compiled modules on its way too: compiled code calls the routers'
        # decisions inlined in a graph, outside their scopes' forwards, where the watch would take each of them
        # for a decision outside every router (and a router's own checks would miss its calls)
        EAGER.__enter__()
        try:
            super().__enter__()
        except BaseException:
            EAGER.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            EAGER.__exit__(None, None, None)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in UNWRAP:  # (a lean wrapper or an aten operator: what it stands for)
            func = unwrap(func, kwargs)
        if NESTING.probing or NESTING.establishing or _ordering():
            # (the probe runs that establish a decision: its own calls, and a repeat of the forward's, and its reading
            # of them between the runs; and the token-order runs, a repeat of the forward up to its last router,
            # without gradients and hooks, before it: the watch judges the calls of the forward itself)
            return func(*args, **kwargs)
        ranking = None  # the path of a module holding a router that ranks in its own forward (see _holder_ranking)
        if func in TOKEN_CHOICES and not torch.compiler.is_compiling():
            ranking = self._holder_ranking(func, args, kwargs)
        masked = None  # the path of a module holding a router that thresholds or picks by a mask (_holder_mask)
        if (
            func in TOKEN_MASKS
            or func in _THRESHOLDS
            or func in _MASK_LOGIC
            or (
                self.thresholds
                and (
                    func in _MASK_CASTS
                    or func in _HOST_READS
                    or func in _SCALINGS
                    or func in _RUNNING
                    or func in _MASK_FILLS
                )
            )
        ) and not torch.compiler.is_compiling():
            masked = self._holder_mask(func, args, kwargs)
        source = None  # where a top-k among keys is taken outside every router, whose indices are followed
        drawn = None  # what a draw from no scores among a bank's width is reported as, unless it picks input rows
        if func is F.scaled_dot_product_attention and not torch.compiler.is_compiling():
            caller, _ = _calling_module(self.names)
            if caller:
                self.attending.add(caller)
        if func in _TOKEN_RANKINGS and len(self.found) < 8 and not torch.compiler.is_compiling():
            self._expert_choice(func, args, kwargs)
        if func in DECISION_FUNCS and not torch.compiler.is_compiling():
            sig = decision_call(func, args, kwargs)
            if sig is not None and (sig[0] != "topk" or sig[1] < sig[2]) and len(self.found) < 8:
                name, in_hook = _calling_module(self.names)
                x = _arg(args, kwargs, 0, "input")
                if name is not None and in_hook and NESTING.depth == 0 and self._scope(name) and sig[2] in self.widths:
                    self.found.append(
                        f"'{name}' ({type(self.modules[name]).__name__}): {sig[0]} over {sig[2]} in a hook of the "
                        f"module, outside its forward (which moe_replay intercepts), at {_where()}: remove the hook, "
                        "or make its choice inside the forward"
                    )
                elif name is not None and not self._known(name) and self._orphan(name, sig, x):
                    held = [s for s in self.scopes if not name or s.startswith(name + ".")]
                    cls = type(self.modules[name]).__name__
                    hint = (
                        f" (it holds the attached router '{held[0]}' but decides outside it: if this call dispatches, "
                        f"attach {name!r} as the router instead, include=[{name!r}])"
                        if held and name
                        else f" (the model's own forward holds the attached router '{held[0]}' but decides outside it: "
                        f"if this call dispatches, attach the model as the router instead, include={cls} (its class: "
                        f"the model's own path '' names no module); if it only feeds a loss or a metric, exclude={cls} "
                        "leaves it native)"
                        if held
                        else ""
                    )
                    self.found.append(
                        f"'{name}' ({type(self.modules[name]).__name__}): {sig[0]} over {sig[2]} at {_where()}{hint}"
                    )
                elif name is not None and self._head_choice(name, x):
                    # (followed: a choice of heads or experts where its indices make a mask or pick an expert's
                    # weights; rows of a learned memory read by them are none)
                    source = f"'{name}' ({type(self.modules[name]).__name__}): {sig[0]} over {sig[2]} at {_where()}"
                    self.keys[source] = sig[2]
                    self.heads.add(source)
                elif (
                    name is not None
                    and sig[0] == "topk"
                    and self.axes.may_choose(x, -1)  # (a top-k among the input's tokens chooses no keys)
                    and self._over_keys(name, sig[2])
                ):
                    source = f"'{name}' ({type(self.modules[name]).__name__}): topk over {sig[2]} at {_where()}"
                    self.keys[source] = sig[2]
            elif sig is None and len(self.found) < 8:
                vec = _vector_choice(func, args, kwargs)
                if vec is not None and self.axes.may_choose(_arg(args, kwargs, 0, "input"), 0):
                    self._vector_found(f"{vec[0]}, one row at a time,", vec[2], "over")
        elif func in _PEAKS and not torch.compiler.is_compiling() and len(self.found) < 8:
            self._peak(args, kwargs)
        elif func in _DRAWS and not torch.compiler.is_compiling() and len(self.found) < 8:
            x = _arg(args, kwargs, 0, "input" if func is not F.gumbel_softmax else "logits")
            if func is F.gumbel_softmax:  # a one-hot drawn inside the call (its arg-max is out of the watch's sight)
                dim = _arg(args, kwargs, 4, "dim", -1)
                if (
                    _arg(args, kwargs, 2, "hard", False)
                    and isinstance(x, torch.Tensor)
                    and isinstance(dim, int)
                    and self.axes.may_choose(x, dim)
                ):
                    self._vector_found("gumbel_softmax(hard=True) draw", int(x.shape[dim]), "from")
            elif isinstance(x, torch.Tensor) and x.dim() in (1, 2) and x.shape[-1] >= 2:
                if self.axes.may_choose(x, -1):
                    self._vector_found(f"{func.__name__} draw", int(x.shape[-1]), "from")
                elif int(x.shape[-1]) in self.axes.by_length:
                    # (along a dimension read as the input's by its length alone: an integer mask of the tokens each
                    # token sees, or of the experts each may use where the tokens are as many; judged by its use as
                    # a draw from no scores is: refused at the end unless it picks rows of the input alone)
                    drawn = self._vector_found(f"{func.__name__} draw", int(x.shape[-1]), "from", note=False)
                    if drawn is not None:
                        self.pending.setdefault(drawn, False)
        elif func in _BERNOULLI and not torch.compiler.is_compiling() and len(self.found) < 8:
            self._bernoulli(func, args, kwargs)
        elif func in _RANDOM_PICKS and not torch.compiler.is_compiling() and len(self.found) < 8:
            bound = _random_bound(func, args, kwargs)
            if bound is not None:  # (refused at the end unless it picks rows of the input, and nothing else)
                drawn = self._vector_found(f"{func.__name__} draw, from no scores,", bound, "among", "values", False)
                if drawn is not None:
                    self.pending.setdefault(drawn, False)
        elif func in _COMPARES and (self.cdf or self.uniform) and len(self.found) < 8:
            if not torch.compiler.is_compiling():
                width = next((w for w in map(lambda a: _weak_get(self.cdf, a), args) if w is not None), None)
                if width is not None:
                    self._vector_found(
                        "a cumulative sum compared (a sample drawn by hand, or a threshold on the running total)",
                        width,
                        "along",
                    )
                elif self.uniform:
                    self._uniform_compared(args)
        if (
            not self.picked
            and ranking is None
            and masked is None
            and source is None
            and not self.axes.known
            and not self.drawn
            and not self.cdf
            and not drawn
            and func not in _UNIFORM
            and not self.scored
            and not self.later
            and not self.data
            and not self.from_scores
            and func not in _RANKED_VALUES
        ):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not torch.compiler.is_compiling():
            if self.data:
                self._carry_data(func, args, kwargs, out)
            self._note_scores(func, args, kwargs, out)
        if (self.scored or self.later) and not torch.compiler.is_compiling():
            out = self._later(func, args, kwargs, out)
        if ranking is not None:
            indices = choice_indices(func, out)
            if indices is not None:
                self.choices.append((ranking, indices.detach().clone()))
                self.places.append(None if self.place is None else self.place())
        if masked is not None:
            self._mask_use(masked, func, args, kwargs, out)
        if func in _UNIFORM and not torch.compiler.is_compiling():
            _weak_put(self.uniform, out, True)
        if self.picked:
            self._follow(func, args, kwargs, out)
        if source is not None:
            self._pick(out[1] if isinstance(out, tuple) else out, source)
        if self.drawn:
            self._drawn_use(func, args, kwargs, out)
        if drawn is not None:
            _weak_put(self.drawn, out, drawn)
        if self.axes.known and self.axes.tracked(args, kwargs):
            self.axes.after(func, args, kwargs, out)
        if func in _CUMSUMS and isinstance(out, torch.Tensor):
            self._cumsum(args, kwargs, out)
        elif self.cdf and func in ELEMENTWISE and isinstance(out, torch.Tensor) and func not in _COMPARES:
            width = next((w for w in map(lambda a: _weak_get(self.cdf, a), args) if w is not None), None)
            if width is not None:  # (the running total shifted or scaled: ``cumsum - p``, ``cumsum / total``)
                _weak_put(self.cdf, out, width)
        return out

    def _note_scores(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note the floating tensors of ``out`` as made of scores (:attr:`from_scores`) where ``func`` ranks (its
        input and its values are scores, whatever their values), or computes from such a tensor into no more entries
        (the hidden states a combine of the experts' outputs makes are none): from its first argument, or from any it
        was handed where that is not a template (``to(other)``; ``zeros_like`` holds none of its values)."""
        if func in _RANKED_VALUES:
            made = [_arg(args, kwargs, 0, "input"), *_tensors(out, 1)[:1]]
        elif not self.from_scores or func in _FRESH:
            return
        else:
            sources = [_arg(args, kwargs, 0, "input")] if func in _TEMPLATES else _flat(args, kwargs)
            held = [a for a in sources if isinstance(a, torch.Tensor) and _weak_get(self.from_scores, a)]
            if not held:
                return
            largest = max(a.numel() for a in held)
            made = [t for t in _tensors(out, 1) if t.numel() <= largest]
        for t in made:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                _weak_put(self.from_scores, t, True)

    def returned(self, module: nn.Module, out: Any) -> None:
        """A module's forward ended in the watched forward, returning ``out``: where it is an attached router's scope
        that holds no experts, the floating tensors it returned (its weights, its scores; in a tuple, a list or a dict
        too) are followed (:attr:`scored`), so a later choice by them outside every router is seen (see
        :meth:`_later`)."""
        name = self.names.get(id(module))
        if name is not None and name not in self.scopes:
            banked = self.banked.get(name)
            if banked is None:
                banked = self.banked[name] = bool(name) and self._in_bank(name)
            if banked:  # (the experts' outputs: a product of a router's values with them is a combine)
                for t in _tensors(out, 2):
                    _weak_put(self.data, t, True)
        if name is None or name not in self.scopes or any(_holds_experts(m) for m in module.modules()):
            return
        tensors = _tensors(out, 2)
        for t in tensors:  # (the router's values: made from the hidden states, but a product with them is no combine)
            self.data.pop(id(t), None)
        ints = [t for t in tensors if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)]
        for t in tensors:
            # (not counts, nor ids cast to floats: whole numbers not made of scores; made of them, scores however
            # whole, a saturated gate's)
            if t.is_floating_point() and t.dim() >= 1 and (_weak_get(self.from_scores, t) or not _whole(t)):
                _weak_put(self.scored, t, name)
                _weak_put(self.raw, t, True)
                if not _slot_pattern(t, ints):  # (its zeros are not the unfilled slots: a threshold at zero chooses)
                    _weak_put(self.shifted, t, True)

    def _carry_data(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note the result of a call given a tensor made from the watched forward's input as one too
        (:attr:`data`), and the first argument of an in-place call that writes such a tensor's values into it; not
        where the call reads only their shape (:data:`_FRESH`, :data:`_SHAPE_OF_OTHERS` of the arguments after the
        first)."""
        if func in _FRESH and func is not torch.Tensor.copy_:
            return
        given = _tensors(args[0], 1) if func in _SHAPE_OF_OTHERS and args else _flat(args, kwargs)
        if not any(_weak_get(self.data, t) is not None for t in given):
            return
        for t in _tensors(out, 1):
            _weak_put(self.data, t, True)
        if func in _WRITES and args and isinstance(args[0], torch.Tensor):
            _weak_put(self.data, args[0], True)

    def follow_returns(self) -> Any:
        """A global forward hook (returned: its handle, to remove) that tells this watch what each module run returns,
        so an attached router's returned values are followed (see :meth:`returned`)."""
        from torch.nn.modules import module as _module

        def returned(module: nn.Module, args: Any, out: Any) -> None:
            if not torch.compiler.is_compiling():
                self.returned(module, out)

        return _module.register_module_forward_hook(own_hook(returned))

    def _later(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """Follow an attached router's returned values (:attr:`scored`) through a call that picks, views, casts,
        scales, gathers, reduces, maps or multiplies them into no more entries (``weights @ M``; not the hidden
        states), and find a later choice made by them outside every router: a ranking of them (a top-k, a sort, an
        arg-max), an extreme along a dimension or a threshold on them (a comparison, ``!=``, ``==`` of the row's
        maximum, ``nonzero``) whose indices or mask a later call reads (to pick tokens or slots by, to mask weights
        with), or their entries made Python numbers (``tolist()``, ``numpy()``, ``item()`` of one entry: sorted in
        Python, beyond the watch's sight). The routes record the router's choice, not this one: a replay would make it
        again from the current scores. Returns ``out`` (a Python iteration over such values made a tuple's, so each
        row is followed)."""
        first = _arg(args, kwargs, 0, "input")
        if self.later:
            held = _weak_get(self.later, first)
            if held is not None and (
                func in _CARRIES
                or func in _LOGICAL
                or (func in _STATISTICS and not self._statistic(first, args, kwargs))
            ):  # (a count or a mean per token, of slots over a threshold: ranked or picked by, it chooses as the mask)
                for t in _tensors(out, 1):
                    _weak_put(self.later, t, held)
            elif held is None and func not in _STATISTICS:
                held = next((h for h in map(lambda a: _weak_get(self.later, a), _flat(args, kwargs)) if h), None)
                if held is not None and held not in self.later_found:
                    self.later_found.append(held)
            elif held is not None and func not in _STATISTICS and held not in self.later_found:
                self.later_found.append(held)
        if not self.scored:
            return out
        router = _weak_get(self.scored, first)
        if router is not None and func in _ITERATE:
            rows = tuple(out)
            shifted, reduced = bool(_weak_get(self.shifted, first)), bool(_weak_get(self.reduced, first))
            for t in rows:
                self._scored_result(t, router, shifted, reduced, bool(_weak_get(self.raw, first)))
            return iter(rows)
        if router is not None and func in _CONVERSIONS:
            if not _weak_get(self.reduced, first):
                what = self._later_site(f"their entries made Python numbers ({func.__name__})", router)
                if what is not None and what not in self.later_found:
                    self.later_found.append(what)
            return out
        if router is not None and func in _CARRIES:
            shifted, reduced = bool(_weak_get(self.shifted, first)), bool(_weak_get(self.reduced, first))
            raw = bool(_weak_get(self.raw, first))
            for t in _tensors(out, 1):
                if t.dtype == torch.bool:  # (``.to(torch.bool)``: ``bool()`` by another name)
                    self._threshold(torch.Tensor.bool, (t,), {}, t, router, shifted)
                elif t.is_floating_point():
                    self._scored_result(t, router, shifted, reduced, raw)
                elif not (raw and _whole(first)):  # (a cast to integers: a ``floor``, its zeros no longer the router's;
                    self._scored_result(t, router, True, reduced)  # of whole numbers it returned, ids packed beside
                    # the weights: none; of scores made whole, a ``round``, still their ranking)
            return out
        tensors = _flat(args, kwargs)
        held = [a for a in tensors if _weak_get(self.scored, a) is not None]
        if func in _COPIES:  # (the values copied, not those of the tensor copied into or taken as a template)
            source = _arg(args, kwargs, 1, _COPIES[func])
            router = _weak_get(self.scored, source)
            if router is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
                flags = (_weak_get(self.shifted, source), _weak_get(self.reduced, source), _weak_get(self.raw, source))
                self._scored_result(out, router, *map(bool, flags))
            return out
        if held and func in _MADE_OF:  # (the values of the rows handed, a Python iteration's, made a tensor again)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                moved = any(_weak_get(self.shifted, a) for a in held)
                reduced = any(_weak_get(self.reduced, a) for a in held)
                raw = all(_weak_get(self.raw, a) for a in held)
                self._scored_result(out, _weak_get(self.scored, held[0]), moved, reduced, raw)
            return out
        if not held or func in _FRESH:
            return out
        router = _weak_get(self.scored, held[0])
        shifted = any(_weak_get(self.shifted, a) for a in held)
        if func in _THRESHOLDS or func in _PATTERNS:  # (at zero of the router's own weights, unshifted: the dispatch
            if isinstance(out, torch.Tensor) and (shifted or not _id_compare(func, args, kwargs)):  # mask; of scores,
                self._threshold(func, args, kwargs, out, router, shifted)  # ``==`` of the row's maximum too)
            return out
        if router is not None and first is held[0] and func in _LATER_RANKINGS:
            what = self._later_site(getattr(func, "__name__", "ranking"), router)
            if what is not None and _weak_get(self.reduced, first):  # (a statistic over the tokens ranked: the
                indices = out if isinstance(out, torch.Tensor) else out[1]  # experts by their load, say; a choice
                _weak_put(self.later, indices, what)  # only where its indices are read, as an extreme's are)
            elif what is not None and what not in self.later_found:
                self.later_found.append(what)
            return out
        if first is held[0] and func in _LATER_EXTREMES:
            if isinstance(out, tuple) and len(out) == 2:  # (along a dimension: indices too)
                name = getattr(func, "__name__", "max")
                what = self._later_site(f"the indices of a {name} along a dimension", router)
                if what is not None:
                    _weak_put(self.later, out[1], what)
            values = out[0] if isinstance(out, tuple) else out
            if isinstance(values, torch.Tensor) and values.is_floating_point():
                statistic = values.numel() == 1 or self._over_tokens(first, args, kwargs)
                self._scored_result(values, router, shifted, statistic)
            return out
        if func is torch.Tensor.__setitem__ and isinstance(first, torch.Tensor) and first is not held[0]:
            out = None  # (``buffer[rows] = weights``: the buffer holds them now)
            results = [first] if first.is_floating_point() else []
        else:
            results = [t for t in _tensors(out, 1) if t.is_floating_point()]
        largest = max(a.numel() for a in held)
        if results and func in _GATHERS:  # (summed into fewer bins, as an expert's load is: a statistic of them)
            binned = func in _BINNING and all(t.numel() < largest for t in results)
            raw = func not in _BINNING and all(_weak_get(self.raw, a) for a in held)  # (moved, not computed)
            for t in results:
                self._scored_result(t, router, shifted, binned, raw)
        elif results and func in _HISTOGRAMS:
            for t in results:
                self._scored_result(t, router, True, True)
        elif results and func in _REDUCTIONS and first is held[0]:
            moved = shifted or func not in _KEEP_ZERO
            statistic = func not in _RUNNING and self._over_tokens(first, args, kwargs)
            for t in results:
                self._scored_result(t, router, moved, statistic or t.numel() == 1)
        elif func in _PRODUCTS:  # (mixed by another operand: its zeros are the router's only where it has no negatives)
            others = [a for a in tensors if _weak_get(self.scored, a) is None and a.is_floating_point()]
            moved = shifted or any(map(_negative, others))
            # (into more entries or the hidden states' width: with a tensor made from the forward's input, the
            # experts' outputs or the hidden states, a combine or a dispatch, not followed; with only weights or
            # tables made in the forward, ``weights @ M`` however wide, their scores still)
            # (an operand the same for every token the values run over, ``weights @ proj(x.mean(0))``, a buffer or a
            # weight made 3-D, is no tokens' outputs whatever it is made from)
            shared = {id(a) for a in others if self._shared(func, args, kwargs, held[0], a)}
            table = not any(_weak_get(self.data, a) is not None and id(a) not in shared for a in tensors) and all(
                a.dim() <= 2 or self._weight(a) is not None or id(a) in shared for a in others
            )
            for t in results:  # (as many entries, or a dense table of them over a bank's experts)
                dense = t.dim() >= 1 and int(t.shape[-1]) in self.widths and t.numel() <= largest * max(self.widths)
                hidden = t.dim() >= 1 and int(t.shape[-1]) in self.features
                if ((t.numel() <= largest or dense) and not hidden) or table:
                    self._scored_result(t, router, moved, t.numel() == 1 and largest > 1)
        elif results and (func in _SCALINGS or func in ELEMENTWISE):
            moved = shifted or func in _SHIFTS or (func not in _SCALINGS and func not in _KEEP_ZERO)
            reduced = all(_weak_get(self.reduced, a) for a in held)
            # (into more entries only by operands the same for every token the values run over: ``w[..., None] *
            # torch.ones(D)`` ranks the tokens as ``w`` does; not by the hidden states, nor by the experts' outputs)
            others = [a for a in _flat(args, kwargs) if _weak_get(self.scored, a) is None]
            wider = len(held) == 1 and all(self._shared(func, args, kwargs, held[0], a) for a in others)
            for t in results:
                if t.numel() <= largest or wider:
                    self._scored_result(t, router, moved, reduced)
        elif func not in _STATISTICS:  # (any other call keeping their shape: a ``softmax``, a ``heaviside``, a mask)
            self._derived(func, args, kwargs, out, held)
        return out

    def _shared(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], held: torch.Tensor, other: torch.Tensor
    ) -> bool:
        """Is ``other``, an operand of this product or elementwise call beside ``held`` (values a router returned),
        the same for every token ``held`` runs over (broadcast along each of its dimensions known to be the input's,
        at least one of them of more than one token)? Then the result holds each token's values mixed with one table
        (``weights @ M``, ``w[..., None] * bias``), their order over the tokens the values' own, not a combine of the
        experts' outputs per token, which differ from token to token."""
        labels = self.axes.labels(held)
        tokens = [d for d, label in enumerate(labels) if label == DATA and held.shape[d] > 1]
        if not tokens:
            return False
        if func in _PRODUCTS:  # (``held @ other``: ``other`` alike for every row of ``held``, and for its batches
            # where ``other``'s are of one; not where ``held`` comes second, nor an ``einsum``)
            if func in (torch.einsum, torch.Tensor.__rmatmul__) or held.dim() < 2 or not (args and args[0] is held):
                return False
            rows = held.dim() - 2
            if func is F.linear:  # (``other`` is a weight of two dimensions, or the bias: alike for every row)
                return all(d != held.dim() - 1 for d in tokens) and other.dim() <= 2
            extra = other.shape[:-2]
            for d in tokens:
                if d == rows:
                    continue
                if d > rows:  # (the tokens summed over: a statistic of them, not the values per token)
                    return False
                at = d - rows + len(extra)
                if 0 <= at < len(extra) and extra[at] != 1:
                    return False
            return True
        if func not in _SCALINGS and func not in ELEMENTWISE:
            return False
        if not isinstance(other, torch.Tensor):
            return True  # (a number)
        for d in tokens:  # (aligned from the right, as broadcasting does)
            at = d - held.dim() + other.dim()
            if 0 <= at < other.dim() and other.shape[at] != 1:
                return False
        return True

    def _statistic(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Is this call of :data:`_STATISTICS` of ``x`` (a threshold's mask, an extreme's indices) a statistic kept
        aside: over all of it, or over every dimension known to be the input's (tokens), not a count per token?"""
        return x.dim() <= 1 or _arg(args, kwargs, 1, "dim") is None or self._over_tokens(x, args, kwargs)

    def _over_tokens(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Does this reduction of ``x`` (its ``dim`` the second argument) run over every dimension of ``x`` known to be
        the input's (its tokens)? Its result is then a statistic over the tokens (an expert's load, its mean weight),
        which chooses none of them however it is read."""
        labels = self.axes.labels(x)
        data = {i for i, b in enumerate(labels) if b == DATA}
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None:
            return True
        if not data:
            return False
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return all(type(d) is int for d in dims) and data <= {d % x.dim() for d in dims}

    def _scored_result(self, t: torch.Tensor, router: str, shifted: bool, reduced: bool, raw: bool = False) -> None:
        """Note ``t`` as holding the values the attached router at ``router`` returned (:attr:`scored`), its zeros
        moved off the router's (:attr:`shifted`), a statistic of them all (:attr:`reduced`) and still the router's own
        values (:attr:`raw`: only picked, viewed or cast; not made in place by a call that computes) where so."""
        _weak_put(self.scored, t, router)
        _weak_put(self.raw, t, raw)
        if shifted:
            _weak_put(self.shifted, t, True)
        if reduced:
            _weak_put(self.reduced, t, True)

    def _threshold(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor, router: str, shifted: bool
    ) -> None:
        """Note ``out``, a threshold's mask (or the indices where it holds) on values the attached router at ``router``
        returned, as a later choice once read (:attr:`later`); not where it is one at zero of values not shifted
        since (the pattern of the slots the decision filled)."""
        if not shifted and _at_zero(func, args, kwargs):
            return
        what = self._later_site(f"a threshold's mask ({getattr(func, '__name__', 'compare')})", router)
        if what is not None:
            _weak_put(self.later, out, what)

    def _derived(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, held: list[torch.Tensor]
    ) -> None:
        """Follow an attached router's returned values (:attr:`scored`, those of them in ``held``) through any call
        :meth:`_later` names no rule for whose result has their shape (made from them elementwise or along their
        rows: a ``softmax``, a ``heaviside``, a cast, an in-place shift): the result is followed too, shifted (its
        zeros no longer the router's) unless the call keeps zeros (:data:`_KEEP_ZERO`) and its inputs were not; a
        mask made from them so (``signbit(w - t)``, ``isclose``) is a threshold."""
        if not isinstance(out, torch.Tensor) or out.dim() < 1:
            return
        router = next((r for a in held if a.shape == out.shape and (r := _weak_get(self.scored, a)) is not None), None)
        if router is None:
            return
        if out.dtype == torch.bool:
            self._threshold(func, args, kwargs, out, router, True)
            return
        shifted = func not in _KEEP_ZERO or any(_weak_get(self.shifted, a) for a in held)
        self._scored_result(out, router, shifted, False)

    def _later_site(self, what: str, router: str) -> str | None:
        """What a later choice (``what``) by the values the attached router at ``router`` returned is reported as,
        where the module making it lies outside every attached router's scope, attention and any one expert, in an MoE
        block (a module holding experts) or holding a router below it (not the model's own forward: a top-k of all
        router logits for its auxiliary loss); else None."""
        name, _ = _calling_module(self.names, 3)
        if name is None or self._known(name) or self._in_attention(name) or self._in_one_expert(name):
            return None
        if not (self._in_moe(name) or (name and self._holds_router(name))):
            return None
        return (
            f"'{name}' ({type(self.modules[name]).__name__}): {what} of the values the attached router '{router}' "
            f"returned, at {_where()}"
        )

    def _holder_ranking(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The path of the module making this ranking call (:data:`TOKEN_CHOICES`) in its own forward, where a module
        on its path (itself first: a token router beside the block it feeds, a scorer nested deeper, the decoder layer
        or the model around the block) holds an attached router below it and it is neither a router's scope,
        excluded, nor attention; else None. Where it ranks floating scores along the input's tokens (a dimension known
        to be theirs, not one among keys for each query), it is noted in :attr:`ranked` with the nearest such holder:
        the tokens those routers see, or their order, may be those it chooses by their values."""
        name, in_hook = _calling_module(self.names, 3)
        if name is None or in_hook or self._known(name) or self._in_attention(name):
            return None
        holder = self._router_holder(name)
        if holder is None:
            return None
        is_topk = func in (torch.topk, torch.Tensor.topk)
        x = _arg(args, kwargs, 0, "input")
        dim = _arg(args, kwargs, 2 if is_topk else 1, "dim", -1)
        if (
            isinstance(x, torch.Tensor)
            and (x.is_floating_point() or _weak_get(self.thresholds, x) is not None)  # (or a threshold's mask, cast)
            and type(dim) is int
            and x.dim() >= 1
            and -x.dim() <= dim < x.dim()
            and x.shape[dim] >= 2
            and not self.axes.may_choose(x, dim)
        ):
            dim %= x.dim()
            labels = self.axes.labels(x)
            if any(i != dim and labels[i] == DATA and x.shape[i] == x.shape[dim] for i in range(x.dim())):
                return name  # (among keys for each query, as many as they: a sparse attention's indexer)
            k = _arg(args, kwargs, 1, "k", None) if is_topk else None
            whole = not is_topk or k == x.shape[dim]
            if name not in self.ranked:
                self.ranked[name] = (holder, _where(), whole)
            elif whole:
                self.ranked[name] = (*self.ranked[name][:2], True)
        return name

    def _router_holder(self, name: str) -> str | None:
        """The nearest module on the path to ``name`` (itself first) that holds an attached router's scope below it,
        or None."""
        path = name
        while True:
            if self._holds_router(path):
                return path
            if not path:
                return None
            path = path.rpartition(".")[0]

    def _holder_mask(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str] | None:
        """The path of the module making this call (of :data:`TOKEN_MASKS` or :data:`_THRESHOLDS`) in its own
        forward, and of the holder of an attached router it is or is a child of, where it thresholds floating scores,
        cuts such a threshold's mask, or picks by a boolean mask; else None (see :meth:`_holder_ranking`)."""
        cast = func in _MASK_CASTS or func in _HOST_READS
        if cast and _weak_get(self.thresholds, args[0] if args else None) is not None:
            pass  # (a threshold's mask cast, copied or read on the host: followed, or noted, in _mask_use)
        elif func in _SCALINGS or func in _RUNNING:  # (a threshold's mask, cast, then scaled, shifted or counted
            # along: followed in _mask_use)
            if _mask_arithmetic(self.thresholds, args, kwargs) is None:
                return None  # (arithmetic on anything else, a boolean input among them: no mask)
        elif func in _THRESHOLDS:  # (of floating scores, or of a threshold's mask made numbers: a cap on its count)
            x = _arg(args, kwargs, 0, "input")
            if not (isinstance(x, torch.Tensor) and x.dim() >= 1) or not (
                x.is_floating_point() or _weak_get(self.thresholds, x) is not None
            ):
                return None
        elif cast:  # (of anything else: no mask)
            return None
        elif func is torch.where and len(args) + len(kwargs) == 3:  # (numbers selected by a threshold's mask)
            if _mask_select(self.thresholds, args, kwargs) is None:
                return None
        elif func in _MASK_FILLS:  # (a number written at a threshold's mask into a tensor of one value)
            if _mask_fill(self.thresholds, args, kwargs) is None:
                return None
        elif func in _MASK_LOGIC:  # (of a threshold's mask: its result is one too)
            if not any(isinstance(v, torch.Tensor) and _weak_get(self.thresholds, v) is not None for v in args):
                return None
        elif picking_mask(func, args, kwargs) is None and not (
            func is torch.Tensor.__getitem__ and _weak_get(self.thresholds, args[0]) is not None
        ):
            return None
        name, in_hook = _calling_module(self.names, 3)
        if name is None or in_hook or self._known(name) or self._in_attention(name):
            return None
        holder = self._router_holder(name)
        return (name, holder) if holder is not None else None

    def _mask_use(
        self, where: tuple[str, str], func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """Follow a threshold's mask made or cut at ``where`` (the module and its holder), and record each mask that
        module picks by; one made by a threshold notes it in :attr:`ranked` (it may choose the tokens its routers
        see, as a ranking does)."""
        name, holder = where
        first = args[0] if args else None
        if func in _HOST_READS and _weak_get(self.thresholds, first) is not None:
            self.host_masks.setdefault(name, (holder, _where()))
            return
        if func in _MASK_CASTS and _weak_get(self.thresholds, first) is not None:
            if isinstance(out, torch.Tensor):  # (its values in another dtype, or on another device: the mask still)
                _weak_put(self.thresholds, out, True)
            return
        if func in _SCALINGS or func in _RUNNING:  # (scaled, shifted, added to or counted along (``keep.cumsum(0)``,
            # each token's place among those kept): as many entries ranked tell the tokens the mask does)
            mask = _mask_arithmetic(self.thresholds, args, kwargs)
            if mask is not None and isinstance(out, torch.Tensor) and out.numel() <= mask.numel():
                _weak_put(self.thresholds, out, True)
            return
        if func is torch.where and len(args) + len(kwargs) == 3:  # (one number where the mask holds, another not)
            if isinstance(out, torch.Tensor) and _mask_select(self.thresholds, args, kwargs) is not None:
                _weak_put(self.thresholds, out, True)
            return
        if func in _MASK_FILLS:  # (written in place, or a copy: the mask in numbers either way)
            made = out if isinstance(out, torch.Tensor) else first
            if isinstance(made, torch.Tensor):
                _weak_put(self.thresholds, made, True)
            return
        if func in _THRESHOLDS or func in _MASK_LOGIC:
            if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
                _weak_put(self.thresholds, out, True)
            return
        mask = picking_mask(func, args, kwargs)
        if mask is not None:
            self.choices.append((name, mask.detach().clone()))
            self.places.append(None if self.place is None else self.place())
            source = first if func in _NONZEROS else mask  # (a mask cast to numbers: the one followed)
            if _weak_get(self.thresholds, source) is not None:
                self.ranked.setdefault(name, (holder, _where(), False))
        elif isinstance(out, torch.Tensor) and (out.dtype == torch.bool or _weak_get(self.thresholds, first)):
            _weak_put(self.thresholds, out, True)  # (a row of a threshold's mask, or of one cast: one too)

    def _holds_router(self, name: str) -> bool:
        """Does the module at ``name`` hold an attached router's scope below it?"""
        return any(s and (not name or s.startswith(name + ".")) for s in self.scopes)

    def entered(self, module: nn.Module, args: Any) -> None:
        """A module's forward starts in the watched forward, called with ``args``: where it is an attached router's
        scope inside the holder of a module of :attr:`ranked`, and sees fewer tokens than the forward was fed (or
        tokens not told), that module chose, before it, which tokens it sees (:attr:`choosers`). A router that sees
        every token (a ranking of keys for attention, Mixture-of-Depths beside it) is fed no choice of tokens, unless
        the ranking put every token in an order (a sort of the tokens by a score): the router's rows may be in it."""
        if not self.ranked and not self.host_masks:
            return
        name = self.names.get(id(module))
        if name is None or name not in self.scopes:
            return
        rows = _token_count((*args, *module_call_kwargs(3).values()))
        every = rows is not None and self.tokens is not None and rows >= self.tokens
        for path, (holder, where) in self.host_masks.items():
            if (not holder or name.startswith(holder + ".")) and path not in self.ranked and not every:
                self.host_found.append(
                    f"'{path}' ({type(self.modules[path]).__name__}) read a threshold's mask of its own scores on the "
                    f"host at {where}, and the attached router '{name}' after it saw fewer tokens than the forward was "
                    "fed"
                )
        for path, (holder, _, whole) in self.ranked.items():
            if (not holder or name.startswith(holder + ".")) and path not in self.choosers and (whole or not every):
                self.choosers.append(path)

    def chosen(self) -> list[tuple[str, torch.Tensor]]:
        """The indices of the rankings :attr:`choosers` took in the watched forward, with their paths, in order."""
        return [(path, indices) for path, indices in self.choices if path in self.choosers]

    def chosen_places(self) -> list[Any]:
        """Where the routers stood in their rows at each of :meth:`chosen`, in order (what ``place`` told)."""
        return [at for (path, _), at in zip(self.choices, self.places, strict=True) if path in self.choosers]

    def _expert_choice(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note a ranking or draw along the input's tokens (a dimension known to be theirs) of scores with another
        dimension as wide as a bank of experts on the module's path, not known to be the input's: each expert taking
        its tokens (expert choice), outside every router."""
        x = _arg(args, kwargs, 0, "input")
        at, default = _TOKEN_RANKINGS[func]
        dim = default if at is None else _arg(args, kwargs, at, "dim", default)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or type(dim) is not int or not -x.dim() <= dim < x.dim():
            return
        dim %= x.dim()
        if self.axes.may_choose(x, dim):
            return  # (not along the tokens: the rules by width read it)
        labels = self.axes.labels(x)
        for i in range(x.dim()):
            if i != dim and labels[i] != DATA and x.shape[i] >= 2:
                name = getattr(func, "__name__", "ranking")
                what = f"{name} along the tokens for each expert (expert choice),"
                if self._vector_found(what, int(x.shape[i]), "among", "experts"):
                    return
        widths = {int(x.shape[i]) for i in range(x.dim()) if i != dim and labels[i] == WEIGHT and x.shape[i] >= 2}
        per_query = any(i != dim and labels[i] == DATA and x.shape[i] == x.shape[dim] for i in range(x.dim()))
        if widths and not per_query:  # (a choice among keys for each query, as many as they: attention's top-k)
            self._grouped_choice(func, widths)

    def _grouped_choice(self, func: Any, widths: set[int]) -> None:
        """Note a ranking along the input's tokens for each of several learned scorers (a dimension of the scores made
        by a weight, ``widths`` wide, maybe merged with the batch's) where the nearest module on the path that holds
        a grouped convolution computes as many experts as groups, one per scorer (a multiple of them): each expert
        taking its tokens, attention experts too (mixture-of-attention's groups). A plain attention's top-k over keys
        (its heads are no convolution's groups), a depthwise convolution (one channel a group) or a choice by one
        scorer (CoLT5's heavy tokens) is none."""
        name, _ = _calling_module(self.names, 3)
        if name is None or self._known(name) or self._in_one_expert(name):
            return
        found = self._grouped_experts(name)
        hit = next(((conv, g) for conv, g in found if any(w % g == 0 for w in widths)), None)
        if hit is None:
            return
        what = (
            f"'{name}' ({type(self.modules[name]).__name__}): {getattr(func, '__name__', 'ranking')} along the tokens "
            f"for each of {hit[1]} experts (expert choice), computed as the {hit[1]} groups of the grouped "
            f"convolution '{hit[0]}', at {_where()}"
        )
        if what not in self.found:
            self.found.append(what)

    def _grouped_experts(self, name: str) -> list[tuple[str, int]]:
        """The grouped convolutions (of two groups or more, two channels or more in and out of each) that the nearest
        module on the path of ``name`` (itself first, not the model) holding any holds, by name, with their groups."""
        parts = name.split(".") if name else []
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.grouped:
                found = self.grouped[prefix]
                if found:
                    return found
                continue
            found = self.grouped[prefix] = [
                (f"{prefix}.{sub}" if sub else prefix, int(m.groups))
                for sub, m in self.modules[prefix].named_modules()
                if isinstance(m, _CONV)
                and int(m.groups) >= 2
                and m.in_channels // m.groups >= 2
                and m.out_channels // m.groups >= 2
                and not self._known(f"{prefix}.{sub}" if sub else prefix)
            ]
            if found:
                return found
        return []

    def _head_choice(self, name: str, x: Any) -> bool:
        """Is a decision-like call in attention (outside attached and excluded modules) one along a learned projection's
        outputs (a dimension made by a weight, not the input's tokens nor keys: those are no weight's), so a choice
        among heads or experts per token (MoH's routed heads, SwitchHead's value experts) or among rows of a learned
        memory (followed: only the first is refused)?"""
        return (
            isinstance(x, torch.Tensor)
            and x.dim() >= 1
            and self.axes.labels(x)[-1] == WEIGHT
            and not self._known(name)
            and (self._in_attention(name) or self._attends_inline(name))
        )

    def _attends_inline(self, name: str) -> bool:
        """Does a module above ``name`` compute attention in its own forward (``scaled_dot_product_attention``, seen
        earlier in the watched forwards), ``name`` holding only projections (weights of two dimensions, no table of
        rows: a product-key memory's keys and rows are followed as keys)?"""
        module = self.modules.get(name)
        if module is None or any(p.dim() > 2 for p in module.parameters()):
            return False
        if any(isinstance(m, nn.Embedding) for m in module.modules()):
            return False
        parts = name.split(".")
        return any(".".join(parts[:i]) in self.attending for i in range(1, len(parts)))

    def _bernoulli(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note a Bernoulli draw per entry whose probabilities vary, along a dimension as wide as a bank of experts on
        the module's path, not known to be the input's: experts kept at random by a policy. A draw of one
        probability for every entry (a dropout mask drawn by hand) chooses by nothing the model computes."""
        x = _arg(args, kwargs, 0, "input")
        p = _arg(args, kwargs, 1, "p") if func is torch.Tensor.bernoulli_ else _arg(args, kwargs, 1, "p", x)
        if not isinstance(x, torch.Tensor) or not x.dim() or not isinstance(p, torch.Tensor) or not _varies(p):
            return
        for i in reversed(range(x.dim())):
            if x.shape[i] >= 2 and self.axes.may_choose(x, i):
                what = "bernoulli draw per entry (experts kept at random by varying probabilities)"
                if self._vector_found(what, int(x.shape[i]), "along", "entries"):
                    return

    def _uniform_compared(self, args: tuple[Any, ...]) -> None:
        """Note a uniform draw compared with probabilities that vary (Bernoulli draws by hand, ``rand_like(p) < p``)
        along as many entries as a bank of experts on the module's path holds, not along the input's tokens: experts
        kept at random by a policy. A draw compared with one number for all (a dropout mask by hand) chooses by
        nothing the model computes."""
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if len(tensors) != 2 or not any(_weak_get(self.uniform, t) for t in tensors):
            return
        p = next((t for t in tensors if not _weak_get(self.uniform, t)), None)
        if p is None or not p.dim() or not _varies(p):
            return
        for i in reversed(range(p.dim())):
            if p.shape[i] >= 2 and self.axes.may_choose(p, i):
                what = "a uniform draw compared with probabilities (Bernoulli draws by hand, experts kept at random)"
                if self._vector_found(what, int(p.shape[i]), "along", "entries"):
                    return

    def _cumsum(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        """Note a cumulative sum along a dimension not known to be the input's, of two or more entries."""
        x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim")
        if not isinstance(x, torch.Tensor) or type(dim) is not int or not x.dim() or not -x.dim() <= dim < x.dim():
            return
        if x.shape[dim] >= 2 and self.axes.may_choose(x, dim):
            _weak_put(self.cdf, out, int(x.shape[dim]))

    def _drawn_use(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Follow a draw from no scores among a bank's width (``randint``, ``randperm``) through the integer tensors
        made from it; where it picks rows of the input (tokens: ``x[perm]``, ``index_select`` along a dimension known
        to be the input's), note that; any other use (compared with an expert's id, made a Python number, a mask,
        rows of a weight) makes it a choice among the bank's experts."""
        found = None
        for a in (*args, *kwargs.values()):
            found = _weak_get(self.drawn, a)
            if found is not None:
                break
        if found is None:
            return
        if self._reads_input_rows(func, args, kwargs):
            self.pending[found] = True
            return
        items = out if isinstance(out, (tuple, list)) else (out,)
        if not any(isinstance(t, torch.Tensor) for t in items) and func not in _CONVERSIONS:
            return  # (its shape, dtype, device, length read: nothing chosen by it)
        made = [t for t in items if isinstance(t, torch.Tensor)]
        if made and len(made) == len(items) and all(not t.is_floating_point() and t.dtype != torch.bool for t in made):
            for t in made:  # (an integer tensor made from it: a slice, a view, a sum, an inverse permutation)
                if not t.is_complex():
                    _weak_put(self.drawn, t, found)
            return
        if found not in self.found:
            self.found.append(found)

    def _reads_input_rows(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Does this call pick, or write back, entries of a tensor along a dimension known to be the input's, by
        the followed draw (and by nothing else followed)?"""
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor) or _weak_get(self.drawn, x) is not None:
            return False
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            key = _arg(args, kwargs, 1, "key")
            keys = key if isinstance(key, tuple) else (key,)
            at = [i for i, k in enumerate(keys) if isinstance(k, torch.Tensor) and _weak_get(self.drawn, k) is not None]
            if len(at) != 1 or any(k is Ellipsis or k is None for k in keys[: at[0]]):
                return False
            others = [k for k in keys if isinstance(k, (torch.Tensor, list)) and k is not keys[at[0]]]
            return not others and not self.axes.may_choose(x, at[0])
        if func in (
            torch.index_select,
            torch.Tensor.index_select,
            torch.Tensor.index_add,
            torch.Tensor.index_add_,
            torch.index_add,
            torch.Tensor.index_copy,
            torch.Tensor.index_copy_,
            torch.index_copy,
        ):
            dim = _arg(args, kwargs, 1, "dim")
            return type(dim) is int and not self.axes.may_choose(x, dim)
        return False

    def _over_keys(self, name: str, width: int) -> bool:
        """Is a top-k over ``width`` in the module at ``name`` a choice among learned keys outside every router: the
        module (outside attached, excluded, attention and expert modules) has a weight of two or more dimensions
        ``width`` long along one (a choice among tokens has no such weight; one among the keys of a product-key
        table does)? A module of no parameters (a top-k helper of its own) is read as the nearest module above it
        that holds some (the keys beside it)."""
        while name and next(self.modules[name].parameters(), None) is None:
            name = name.rpartition(".")[0]
        if self._known(name) or self._in_attention(name) or (name and self._in_bank(name)):
            return False
        return any(p.dim() >= 2 and width in p.shape for p in self.modules[name].parameters())

    def _pick(self, t: Any, where: str, floats: bool = False) -> None:
        """Follow the integer tensor ``t`` (or floating, with ``floats``), made from the indices of the top-k
        ``where`` says."""
        if not isinstance(t, torch.Tensor) or t.is_complex() or t.dtype == torch.bool:
            return
        # (a float only with a dimension over the keys last: a mask of the choices, ``[..., keys]``, not the hidden
        # states that a choice among tokens, Mixture-of-Depths, scatters its tokens back into)
        if not t.is_floating_point() or (floats and t.dim() and self._per_key(where, t.shape[-1])):
            key, picked = id(t), self.picked

            def gone(_: weakref.ref[torch.Tensor]) -> None:  # (the tensor is freed: its id may be another's next)
                picked.pop(key, None)

            picked[key] = (weakref.ref(t, gone), where)

    def _per_key(self, where: str, size: int) -> bool:
        """Is ``size`` the number of keys the top-k ``where`` says chose among, or of their products with a second
        set as many (product keys: ``n * n`` experts from two sets of ``n`` sub-keys)?"""
        n = self.keys.get(where)
        return n is not None and size in (n, n * n)

    def _source(self, x: Any) -> str | None:
        """Where the top-k was taken whose indices ``x`` (a tensor, or a list or tuple of them) was made from."""
        if isinstance(x, torch.Tensor):
            entry = self.picked.get(id(x))
            return entry[1] if entry is not None and entry[0]() is x else None
        if isinstance(x, (tuple, list)):
            for item in x:
                if isinstance(item, torch.Tensor):
                    entry = self.picked.get(id(item))
                    if entry is not None and entry[0]() is item:
                        return entry[1]
        return None

    def _follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Carry the mark of followed indices from the arguments of a call to its integer results, and note a call
        that picks rows of a weight of the model by them (:meth:`_over_keys`): a choice of experts kept as rows."""
        where = None
        for arg in args:
            where = self._source(arg)
            if where is not None:
                break
        else:
            for arg in kwargs.values():
                where = self._source(arg)
                if where is not None:
                    break
        if where is None:
            return
        if where in self.heads and (func in _MASKS or func is torch.Tensor.__setitem__):
            self._report_heads(where, "make a mask of the chosen entries")
            return
        # (a float made from them carries the choice too: a cast of them, a scatter by them, and what follows from
        # such a float; a float merely read at them, ``scores.gather(-1, idx)``, does not)
        floats = func in _SPREAD or any(
            isinstance(a, torch.Tensor) and a.is_floating_point() and self._source(a) is not None
            for a in (*args, *kwargs.values())
        )
        if func in _SCATTERS and isinstance(out, torch.Tensor):  # (along the keys, not tokens scattered back)
            floats = _arg(args, kwargs, 1, "dim") in (-1, out.dim() - 1)
        if func is torch.Tensor.__setitem__ and args and isinstance(args[0], torch.Tensor):
            # (a mask of the choices written in place, ``mask[rows, idx] = w``: the indices over its last dimension)
            out, key = args[0], _arg(args, kwargs, 1, "key")
            keys = key if isinstance(key, tuple) else (key,)
            floats = bool(keys) and self._source(keys[-1]) is not None and (len(keys) == out.dim() or ... in keys)
        if isinstance(out, torch.Tensor):
            self._pick(out, where, floats)
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._pick(item, where, floats)
        if len(self.found) >= 8 or where in self.reported:
            return
        if func in _PRODUCTS:  # (a dense mask of the choices times a weight: its rows read by the choices)
            operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            operands += [t for a in args if isinstance(a, (tuple, list)) for t in a if isinstance(t, torch.Tensor)]
            table = next((t for t in operands if self._source(t) is None and self._weight(t) is not None), None)
            if table is None or table.dim() < 2 or not any(self._per_key(where, n) for n in table.shape):
                return
            mask = _arg(args, kwargs, 0, "input")  # (contracted over the keys: a row of the table each)
            if isinstance(mask, torch.Tensor) and mask is not table and mask.dim():
                side = -1 if func is F.linear else -2
                if func is not torch.Tensor.__rmatmul__ and mask.shape[-1] != table.shape[side]:
                    return
            self._report(where, table)
            return
        at = _ROWS.get(func)
        if at is None:
            return
        table, index = _arg(args, kwargs, at[0], at[1]), _arg(args, kwargs, at[2], at[3])
        if not isinstance(table, torch.Tensor) or table.dim() < 2:
            return
        dim: Any = 0 if func is torch.Tensor.__getitem__ else None
        if at[3] == "key" and isinstance(index, tuple):  # (the indices at any place of the key: rows, columns)
            dim = next((i for i, k in enumerate(index) if isinstance(k, torch.Tensor) and self._source(k)), None)
            index = index[dim] if dim is not None and Ellipsis not in index[:dim] else None
        if not isinstance(index, torch.Tensor) or self._source(index) is None:
            return
        if dim is None and func in (torch.gather, torch.Tensor.gather, torch.index_select, torch.Tensor.index_select):
            dim = _arg(args, kwargs, 1, "dim")
        if (
            where in self.heads
            and self._weight(table) is None
            and type(dim) is int
            and -table.dim() <= dim < table.dim()
        ):
            # (activations picked along a dimension a weight made, as many as the choice's entries: heads' outputs)
            if self.axes.labels(table)[dim] == WEIGHT and self._per_key(where, int(table.shape[dim])):
                self._report_heads(
                    where, f"pick entries of {list(table.shape)} along its dimension {dim % table.dim()}"
                )
            return
        self._report(where, table)

    def _report_heads(self, where: str, how: str) -> None:
        """Note the choice in attention ``where`` says (see :meth:`_head_choice`), whose indices ``how`` says."""
        if where in self.reported:
            return
        self.reported.add(where)
        for key in [key for key, entry in self.picked.items() if entry[1] == where]:
            del self.picked[key]
        self.found.append(
            f"{where}, whose indices {how} at {_where()} (in attention, among a learned projection's outputs, not "
            "among keys or tokens: heads or experts chosen per token, as mixture-of-heads and SwitchHead choose)"
        )

    def _report(self, where: str, table: torch.Tensor) -> None:
        """Note the top-k ``where`` says, whose indices read ``table``, where that is a weight of the model."""
        weight = self._weight(table)
        if where in self.heads:  # (rows of a learned memory read are no choice; an expert's weights picked are)
            if weight is not None and table.dim() >= 3:
                self._report_heads(where, f"pick an expert's weights of '{weight}' {list(table.shape)}")
            return
        if weight is not None and where not in self.reported:
            self.reported.add(where)
            for key in [key for key, entry in self.picked.items() if entry[1] == where]:
                del self.picked[key]  # (refused already: the rest of the forward need not follow it)
            self.found.append(
                f"{where}, whose indices pick rows of the weight '{weight}' {list(table.shape)} at {_where()} (experts "
                "kept as rows of a table, chosen among keys: product keys, as in PEER or a product-key memory)"
            )

    def _weight(self, t: torch.Tensor) -> str | None:
        """The name of the model's weight that ``t`` is (or is a view of), if any."""
        if self.weights is None:
            self.weights = {}
            for module_name, module in self.modules.items():
                for p_name, p in module.named_parameters(recurse=False):
                    self.weights.setdefault(_storage(p), f"{module_name}.{p_name}" if module_name else p_name)
        return self.weights.get(_storage(t))

    def _peak(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note an ``amax`` along an attached router's width in an MoE block, outside every router and expert.

        It reads the natively best expert's score by value alone (a block weighing the expert an attached router
        chose by ``probs.amax(-1)``): a replay forces the router, not that value, so the recorded expert would be
        weighed by another one's score. No decision-like call, so no other check sees it."""
        x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim", ())
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() < 2
            or type(dim) is not int
            or dim not in (-1, x.dim() - 1)
            or x.shape[-1] not in self.widths
            or not self.axes.may_choose(x, -1)  # (along the input's tokens: no expert's score)
        ):
            return
        name, _ = _calling_module(self.names)
        if name is not None and not self._known(name) and not self._in_bank(name) and self._in_moe(name):
            self.found.append(
                f"'{name}' ({type(self.modules[name]).__name__}): amax over {x.shape[-1]} at {_where()} (the best "
                "expert's score read by value, outside the router: a replay would weigh the forced experts by the "
                "natively best one's score; read it at the router's indices, scores.gather(-1, indices))"
            )

    def not_run(self, ran: set[int]) -> list[str]:
        """Paths of the modules inside MoE blocks, or holding a weight of two or more dimensions (learned keys and a
        table whose rows they pick may be anywhere), outside attention, attached scopes, excluded modules and expert
        banks, that the watched forward did not run, whose ids are not in ``ran``: a branch it did not take (another
        router for long inputs, a layer skipped) that a later forward may. The modules inside such a module are among
        them: a later forward may run them without it (a layer list held by a module whose own forward the model
        never calls, its layers called one by one).
        """
        found: list[str] = []
        for name, module in self.modules.items():
            if not name or id(module) in ran:
                continue
            if not self._known(name) and not self._in_bank(name) and (self._in_moe(name) or self._tables(name)):
                found.append(name)
        return found

    def _tables(self, name: str) -> bool:
        """Does the module at ``name``, outside attention, hold a weight of two or more dimensions (keys or rows of a
        table, which a top-k among keys may pick: see :meth:`_over_keys`) and a forward of its own (a container, a
        ``ModuleList`` of layers, is never run: its layers are)?"""
        module = self.modules[name]
        return (
            type(module).forward is not nn.Module.forward
            and any(p.dim() >= 2 for p in module.parameters())
            and not self._in_attention(name)
        )

    def _in_bank(self, name: str) -> bool:
        """Is the module an expert, or inside one (below an ``expert*`` child of a module holding experts)?"""
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            low = parts[i - 1].lower()
            if "expert" in low and "shared" not in low and _holds_experts(self.modules[".".join(parts[: i - 1])]):
                return True
        return False

    def _in_one_expert(self, name: str) -> bool:
        """Is the module one expert of a bank of expert modules, or inside one (``experts.3``, ``experts.3.act``: a
        member of an ``expert*`` list, dict or ``Sequential`` of a module holding experts), with no bank of its own on
        the way down (an expert that is an MoE block itself chooses among its own experts)? Such a module runs on the
        tokens dispatched to it, after the choice: a top-k of its own (a k-sparse activation over its hidden units,
        however many) chooses among none of the bank's experts. The bank itself (``experts``, stacked weights that may
        route inside their forward) is not one expert."""
        parts = name.split(".") if name else []
        for i in range(1, len(parts)):
            low = parts[i - 1].lower()
            bank = self.modules[".".join(parts[:i])]
            if (
                "expert" in low
                and "shared" not in low
                and isinstance(bank, nn.ModuleList | nn.ModuleDict | nn.Sequential)
                and _holds_experts(self.modules[".".join(parts[: i - 1])])
            ):
                return not any(_holds_experts(self.modules[".".join(parts[:j])]) for j in range(i + 1, len(parts) + 1))
        return False

    def settle(self) -> None:
        """Note the draws from no scores among a bank's width not seen picking rows of the input (see
        :meth:`_drawn_use`) as found: the forward is over, no later use can tell them apart."""
        for found, input_rows in self.pending.items():
            if not input_rows and found not in self.found:
                self.found.append(found)
        self.pending.clear()

    def check(self) -> None:
        """Raise if the watched forward made a decision outside every attached router (a draw from no scores among
        a bank's width too, unless it was seen picking rows of the input alone), or else a later choice by the values
        a router returned (see :meth:`_later`)."""
        self.settle()
        if self.found:
            detail = "\n  ".join(dict.fromkeys(self.found))
            raise UnsupportedRouterError(
                "decision-like calls over an expert width ran outside every attached router, so those routers "
                f"would be neither recorded nor forced:\n  {detail}\nAttach them too (include= their module, "
                "or the module that holds their gate), or exclude= them to leave them native on purpose"
            )
        if self.host_found:
            detail = "\n  ".join(dict.fromkeys(self.host_found))
            raise UnsupportedRouterError(
                "a module chose which tokens reach its routers by a threshold's mask read on the host (tolist(), "
                "item(), numpy(): Python values, whose use no record can follow), so a replay could not show that the "
                f"routers see the tokens their rows were recorded on:\n  {detail}\nPick the tokens by the mask on the "
                "device (x[mask], mask.nonzero(), torch.where(mask), or a top-k or argsort of the scores), where the "
                "capture records the choice and a replay checks it, or exclude= the routers inside that module to run "
                "them natively on purpose"
            )
        if self.later_found:
            detail = "\n  ".join(dict.fromkeys(self.later_found))
            raise UnsupportedRouterError(
                "a choice by score was made outside every attached router, by the values a router returned (a "
                "capacity drop by their top-k, a sort of them, a threshold on them; or their entries made Python "
                "numbers, whose use moe_replay cannot follow): the recorded routes cannot carry "
                "it, and a replay would force the router's experts and make this choice again from the current scores, "
                f"so other tokens could lose or gain an expert:\n  {detail}\nMake it part of the router's decision "
                "(inside its forward, where moe_replay checks it), or make it by a rule that reads no scores (token "
                "position, a fixed order); values only logged can be made Python numbers as a statistic over the "
                "tokens (a sum, a mean per expert), or outside the forward. Attaching the module that makes it as the "
                "router (include= its path) lets "
                "the router's own check read this choice, which refuses a later choice by the current scores too; "
                "exclude= the router leaves the block native, neither recorded nor forced"
            )


def watch_forward(
    model: nn.Module,
    scopes: Iterable[str],
    widths: Iterable[int],
    excluded: Callable[[str, nn.Module], bool] | None,
    on_pass: Callable[[str, list[str], OrphanWatch], None] | None = None,
    passed: Callable[[str], bool] | None = None,
    place: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """Watch the next forward of ``model``, or of the modules of it called on their own; returns a function
    that stops watching.

    Global module hooks (none stored on the model, which stays picklable) enter an
    :class:`OrphanWatch` when an outermost forward of a module of ``model`` starts (``model``'s own, or a
    part of it the caller runs by itself: ``model.model(x)``, a head called apart) and leave it when that
    forward ends, also when it raises. Once ``model``'s own forward has been watched they remove themselves;
    a part's forward passing leaves them in place for the rest of the model. ``on_pass`` is called with the
    module path once such a forward ran to its end with no decision outside the routers (not after one that
    raised), the paths of the modules in MoE blocks it did not run (:meth:`OrphanWatch.not_run`) and the watch (its
    :attr:`~OrphanWatch.choosers` of the tokens reaching routers, and what they chose); the
    forward of a path ``passed`` says passed before is not watched again. ``place`` is handed to each watch (see
    :attr:`OrphanWatch.places`).
    """
    from torch.nn.modules import module as _module

    state: dict[str, Any] = {}
    paths = {id(m): n for n, m in model.named_modules()}

    ran: set[int] = set()

    def pre(module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # (first: dynamo must read nothing else)
            return
        if "top" in state:
            if "watch" in state:
                ran.add(id(module))
                state["watch"].entered(module, args)
            return
        path = paths.get(id(module))
        if path is None:
            return
        state["top"] = module
        if path and passed is not None and passed(path):
            return  # (its forward, and the modules it runs, are left alone)
        ran.clear()
        ran.add(id(module))
        state["watch"] = OrphanWatch(model, scopes, widths, excluded, place)
        state["watch"].seed(args, module_call_kwargs())  # (the caller's input: tokens, features)
        state["watch"].__enter__()

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if state.get("top") is not module:
            if "watch" in state:
                state["watch"].returned(module, out)  # (a router's returned values are followed)
            return
        del state["top"]
        watch = state.pop("watch", None)
        if watch is None:
            return
        watch.__exit__(None, None, None)
        path = paths[id(module)]
        watch.settle()
        if not path or watch.found or watch.later_found:
            stop()
        watch.check()
        if on_pass is not None and sys.exc_info()[0] is None:  # (always_call: also run while the forward raises)
            on_pass(path, watch.not_run(ran) if not path else [], watch)
        ran.clear()

    handles = [
        _module.register_module_forward_pre_hook(pre),
        _module.register_module_forward_hook(own_hook(post), always_call=True),
    ]

    def stop() -> None:
        state.pop("top", None)
        watch = state.pop("watch", None)
        if watch is not None:
            watch.__exit__(None, None, None)
        for h in handles:
            h.remove()
        handles.clear()

    return stop


def watch_call(
    model: nn.Module,
    scopes: Iterable[str],
    widths: Iterable[int],
    excluded: Callable[[str, nn.Module], bool] | None,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    run: Callable[[], Any],
) -> Any:
    """Run ``run`` (a forward of ``model`` already under way, fed ``inputs``) watched for decisions outside every
    router, as :func:`watch_forward` watches a block's first forward; refuses one as it ends (not after a forward
    that raised). The modules it does not run are not noted: nothing is marked as passed by it."""
    watch = OrphanWatch(model, scopes, widths, excluded)
    watch.seed(*inputs)
    returns = watch.follow_returns()  # (a router's returned values are followed, as at a first run)
    watch.__enter__()
    try:
        out = run()
    finally:
        watch.__exit__(None, None, None)
        returns.remove()
    watch.settle()
    watch.check()
    return out


def _no_watch(module: nn.Module, *args: Any) -> None:
    """What a first-run hook becomes in a copy of the model (``copy.deepcopy``, ``pickle``): nothing."""


def _inert() -> Callable[..., None]:
    """:func:`_no_watch`, as an unpickled first-run hook is made."""
    return _no_watch


class _Inert:
    """Made into :func:`_no_watch` by a copy or a pickle of the model: the hooks of a session's block do not go
    with a copy (the copy is no session's; the hooks would refer to this model's watch)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _no_watch


class _Leave(_Inert):
    """The forward hook of a :class:`_FirstRun`."""

    def __init__(self, hook: _FirstRun) -> None:
        self.hook = hook

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        self.hook.leave(module, args, out)


class _FirstRun(_Inert):
    """The forward pre-hook (the instance) and forward hook (:class:`_Leave`) that watch one module's first run."""

    #: a first-run watch is open in this process (one at a time: a module it runs inside is watched with it)
    active = False

    def __init__(
        self, name: str, watch: Callable[[], OrphanWatch], on_pass: Callable[[str, OrphanWatch], None]
    ) -> None:
        self.name, self.watch, self.on_pass = name, watch, on_pass
        self.watching: OrphanWatch | None = None
        self.handles: list[Any] = []
        self.inner: Any = None  # the global pre-hook that tells the watch of each module run inside, while open
        #: the global forward hook that follows the routers' returned values while a watch is open
        self.returns: Any = None

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or _FirstRun.active:
            return
        self.watching = watch = self.watch()
        watch.seed(args, module_call_kwargs())  # (the module's input: its tokens, as the model's forward is seeded)
        watch.__enter__()
        _FirstRun.active = True
        from torch.nn.modules import module as _module

        def returned(module: nn.Module, args: Any, out: Any) -> None:  # (a router's returned values are followed)
            if not torch.compiler.is_compiling():
                watch.returned(module, out)

        self.returns = _module.register_module_forward_hook(own_hook(returned))

        def entered(inner: nn.Module, inner_args: Any) -> None:
            if inner is not module and not torch.compiler.is_compiling():
                watch.entered(inner, inner_args)  # (a router fed fewer tokens after a ranking: a chooser found)

        self.inner = _module.register_module_forward_pre_hook(entered)

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        watch = self.watching
        if torch.compiler.is_compiling() or watch is None:
            return
        self.watching, _FirstRun.active = None, False
        self._drop_inner()
        watch.__exit__(None, None, None)
        watch.check()
        if sys.exc_info()[0] is None:  # (always_call: also run while the forward raises)
            self.remove()
            self.on_pass(self.name, watch)

    def _drop_inner(self) -> None:
        """Remove the global hooks of the open watch: the one told of each module run inside, and the one that
        follows the routers' returned values (see :meth:`OrphanWatch.returned`)."""
        if self.inner is not None:
            self.inner.remove()
            self.inner = None
        if self.returns is not None:
            self.returns.remove()
            self.returns = None

    def remove(self) -> None:
        """Take the hooks off the module (and close a watch left open)."""
        self._drop_inner()
        if self.watching is not None:
            self.watching.__exit__(None, None, None)
            self.watching, _FirstRun.active = None, False
        for h in self.handles:
            h.remove()
        self.handles.clear()


def watch_first_runs(
    model: nn.Module,
    paths: Iterable[str],
    scopes: Iterable[str],
    widths: Iterable[int],
    excluded: Callable[[str, nn.Module], bool] | None,
    on_pass: Callable[[str, OrphanWatch], None],
    place: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """Watch the next run of each module of ``model`` at ``paths`` (modules in MoE blocks that the watched
    forward did not run) as :func:`watch_forward` watches the model's; returns a function that stops.

    Hooks on those modules only (the modules every forward runs pay nothing): an :class:`OrphanWatch`
    over the module's forward, seeded with its input and told of each module run inside it, refused as the
    model's is; once a run of it passes, its hooks go (and those of the modules at ``paths`` inside it, run with it)
    and ``on_pass`` is called with its path and the watch (its
    :attr:`~OrphanWatch.choosers` of the tokens reaching routers, found there as in the model's forward, and
    what they chose, and where ``place`` told the routers stood in their rows then).
    """
    scopes, widths = tuple(scopes), frozenset(widths)
    hooks: list[_FirstRun] = []

    def passed(path: str, watch: OrphanWatch) -> None:
        for inner in [h for h in hooks if h.name.startswith(path + ".")]:  # (run inside it, watched with it)
            inner.remove()
            hooks.remove(inner)
        on_pass(path, watch)

    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:  # (gone since: a change on the way to the routers watches the model again)
            continue
        hook = _FirstRun(path, lambda: OrphanWatch(model, scopes, widths, excluded, place), passed)
        hook.handles = [
            module.register_forward_pre_hook(hook),
            module.register_forward_hook(_Leave(hook), always_call=True),
        ]
        hooks.append(hook)

    def stop() -> None:
        for hook in hooks:
            hook.remove()
        hooks.clear()

    return stop
