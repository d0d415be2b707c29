"""``Routes``: the routing decisions of T tokens through L routers.

A route is the list of ``k`` expert indices one router chose for one token. A row of
``-1`` means "no recorded route": during replay that token is routed natively.

Routes live on the host in the smallest signed integer dtype that holds every expert
index and ``-1`` (int16 up to 32767 experts), and convert to int64 on demand.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import os
import stat
import struct
import uuid
import weakref
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from numpy.lib import format as npformat

from ._checks import (
    _del_own,
    _set_own,
    as_tensor,
    check_count,
    check_dense,
    check_flag,
    check_values,
    is_collection,
    is_integer,
    router_names,
)
from ._choice_record import (
    Choices,
    Places,
    cut_record,
    dtype_code,
    join_choices,
    join_places,
    places_from_rows,
    places_to_rows,
    read_choices,
    rename_places,
)
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    MissingFileError,
    NotAFileError,
    RoutesValidationError,
    TokenIndexError,
    UnknownRouterError,
    _ReadOnlyError,
)
from .losses import note_router, note_stack

__all__ = ["FORMAT_VERSION", "MAX_LOAD_BYTES", "Routes"]

#: Version of the ``.npz`` layout written by :meth:`Routes.save`.
FORMAT_VERSION = 1
_MAGIC = "moe_replay.routes"
#: The most bytes :meth:`Routes.load` decompresses unless ``max_bytes=`` says otherwise.
MAX_LOAD_BYTES = 1 << 33
_MAX_META_BYTES = 1 << 24
#: the most runs of a capture's forwards (calls, prompt mask) that a routes file keeps in its metadata
_MAX_RUNS = 1 << 16
#: one router's own calls (``Routes._router_calls``): its ``(rows, calls)`` runs and the calls each forward made of it
_RouterCalls = tuple[tuple[tuple[int, int], ...], tuple[int, ...]]
#: Unsigned dtypes whose values do not all fit int64 (uint64) or that torch compares only partly.
_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))

TokenIndex = int | slice | Sequence[int] | np.ndarray | torch.Tensor
#: the ``Routes._token_rank`` of a row recorded from a forward fed embeddings of several sequences whose order its
#: routers saw them in was not told: a mark of the row's own, which every Routes made from it keeps (slices, picks,
#: cat, files, gather and scatter carry the ranks), and which whatever reads rows in token order refuses
UNTOLD_RANK = -2
#: in a router's own token ids (``Routes._router_ids``, kept where the routers' rows are not one per token of the same
#: forwards): a row of a call of the router outside every forward of the model (hidden states of one's own, as an
#: auxiliary loss computes them), the token of no forward: a forward that reads it is refused
NO_FORWARD_ID = -2
#: ... and a row a forward fed at prompt padding (attention mask 0): a forward that feeds a token of a sequence there
#: is refused (see ``Routes._fed_mask``)
PADDING_ID = -3
#: ... and a row of a router whose token ids the capture could not keep (a call on a part of a forward's tokens) where
#: it kept the other routers' (``Routes._ids_lost`` says why): such rows go with their router, so routes of the other
#: routers alone (``select``) are checked by their ids, and routes holding such rows are refused
LOST_ID = -4


def _storage_dtype(num_experts: int) -> torch.dtype:
    """Smallest signed dtype holding ``0 .. num_experts - 1`` and ``-1``."""
    if num_experts <= 2**15 - 1:
        return torch.int16
    return torch.int32


def _expert_count(value: Any) -> int:
    """A positive integer expert count, or a clear error (never a silent ``int(8.5)``)."""
    try:
        e = operator.index(value) if not _on_meta(value) else None
    except TypeError:
        e = None
    if e is None or isinstance(value, bool):  # (True is not 1 expert)
        raise RoutesValidationError(f"an expert count must be an integer, got {value!r}")
    if e < 1:
        raise RoutesValidationError(f"an expert count must be at least 1, got {e}")
    if e > _MAX_EXPERTS:
        raise RoutesValidationError(f"an expert count must be at most {_MAX_EXPERTS}, got {e}")
    return int(e)


def _on_meta(value: Any) -> bool:
    """A tensor on the meta device: shapes only, no value to read."""
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


#: The most experts one router may have (expert numbers must fit an int32 on every engine).
_MAX_EXPERTS = 2**31 - 1


def _path(path: Any, what: str) -> str | os.PathLike[str]:
    """``path`` if it names a file (a ``str`` or ``os.PathLike`` of one), else a clear error."""
    if not isinstance(path, str | os.PathLike):
        hint = ""
        named = getattr(path, "name", None)
        if hasattr(path, "read") or hasattr(path, "write"):  # (an open file, or a buffer of one)
            hint = (
                f": an open file is not read or written here; pass its path, file.name ({named!r})"
                if isinstance(named, str) and os.path.isfile(named)
                else ": an open file or a buffer is not read or written here; pass the path of a file on disk"
            )
        elif isinstance(path, bytes | bytearray | memoryview) and (len(path) > 4096 or bytes(path[:2]) == b"PK"):
            hint = ": these look like a file's contents, not its path; write them to a file and pass its path"
        raise ArgumentTypeError(f"{what} takes a file path (a str or os.PathLike), got {type(path).__name__}{hint}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{what} takes a file path (a str or os.PathLike), got a path of bytes {text!r}")
    if "\0" in text:  # (os.path's functions raise a bare ValueError on it, or answer "no such file")
        raise InvalidArgumentError(f"{what} got a path holding a NUL character, which no file name may hold: {text!r}")
    return path


def _unexpanded(path: str | os.PathLike[str]) -> str:
    """A hint for a path that names a missing file or folder because it begins with an unexpanded ``~``."""
    if os.fspath(path).startswith("~") and os.path.expanduser(path) != os.fspath(path):
        return f" ('~' is not expanded here: pass os.path.expanduser({os.fspath(path)!r}))"
    return ""


def _file_in_the_way(path: str | os.PathLike[str]) -> str:
    """A hint for a path that names no file because a folder on its way is a file: the nearest existing folder
    of ``path`` that is not a directory, or ``""`` where there is none."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while folder and not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return ""
        folder = parent
    if folder and os.path.lexists(folder) and not os.path.isdir(folder):
        return f" ({folder} is a file, not a folder: a path through it names nothing; give a path in a folder)"
    return ""


def _numpy_name(dtype: object) -> str | None:
    """The name of the numpy dtype a torch dtype stands for (``int32`` for ``torch.int32``), or None."""
    if not isinstance(dtype, torch.dtype):
        return None
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype.name
    except (TypeError, RuntimeError):  # (bfloat16, quantized dtypes: numpy has none)
        return None


def _named_otherwise(path: str | os.PathLike[str]) -> str:
    """A hint for a missing routes file whose name with the suffix ``.npz`` added or taken off names a file: save()
    writes the path as given (a name without ``.npz`` stays without it), where ``np.savez`` adds the suffix."""
    text = os.fspath(path)
    root, ext = os.path.splitext(text)
    other = root if ext == ".npz" else f"{text}.npz"
    if other == text or not os.path.isfile(other):
        return ""
    return (
        f" ({other!r} is a file: save() writes the name it is given, adding no suffix, and np.savez adds '.npz'; "
        "load the name the file was written to)"
    )


def _name_max(folder: str) -> int:
    """The longest file name (in bytes) the file system of ``folder`` takes (255 where it does not say)."""
    try:
        return int(os.pathconf(folder or ".", "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _heads(prefix: str, name: str) -> bool:
    """``prefix`` is whole leading module names of the router path ``name`` ('' heads every name)."""
    return not prefix or name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def _renamed(names: Sequence[str], prefixes: Mapping[str, str], keys: Sequence[str]) -> tuple[str, ...]:
    """``names``, each with its longest prefix of ``keys`` (longest first, whole module names) replaced."""
    out: list[str] = []
    for n in names:
        old = next((k for k in keys if _heads(k, n)), None)
        if old is None:
            out.append(n)
            continue
        rest = n[len(old) :]
        if not prefixes[old] and old and not old.endswith("."):  # ({"module": ""}: no name starts with '.')
            rest = rest.removeprefix(".")
        out.append(prefixes[old] + rest)
    return tuple(out)


def fingerprint(names: Sequence[str], num_experts: Sequence[int | None], top_k: Sequence[int | None]) -> str:
    """A short hash of a router set (names, expert counts, k; None where not known yet), to tell models apart."""
    text = json.dumps([list(names), list(num_experts), list(top_k)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _exact_int64(rows: torch.Tensor, num_experts: int, name: str) -> torch.Tensor:
    """Wide unsigned rows as int64, refusing values that int64 would wrap (uint64 all-ones is not -1)."""
    arr = rows.detach().cpu().numpy()
    over = (arr >= num_experts).any(axis=1) if arr.ndim == 2 else np.zeros(0, bool)
    if over.any():
        t = int(np.flatnonzero(over)[0])
        raise RoutesValidationError(
            f"router '{name}' has {num_experts} experts, but token {t} has indices {arr[t].tolist()} "
            f"({rows.dtype}): each index must be in [0, {num_experts - 1}]; an unsigned dtype has no -1 "
            "(missing rows need a signed dtype)"
        )
    return torch.from_numpy(arr.astype(np.int64))


def validate_rows(rows: torch.Tensor, num_experts: int, top_k: int | None, name: str, *, rows_too: bool = True) -> None:
    """Check one router's ``[T, k]`` rows: integer dtype, range, -1 rows, duplicates.

    ``rows_too=False`` checks only what a conversion to the storage dtype needs (dtype,
    shape, range) and leaves the per-row checks (whole -1 rows, distinct experts).

    Raises:
        RoutesValidationError: naming the router and the first offending token.
    """
    if not isinstance(rows, torch.Tensor):
        raise RoutesValidationError(f"routes for router '{name}' must be a tensor, got {type(rows).__name__}")
    check_dense(rows, f"the routes of router '{name}'", RoutesValidationError)
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise RoutesValidationError(
            f"routes for router '{name}' have dtype {rows.dtype}; expert indices must be integers "
            "(cast with .long() only if the values are exact integers; NaN is never a valid index)"
        )
    if rows.dim() != 2:
        raise RoutesValidationError(
            f"routes for router '{name}' must be 2-D [tokens, k], got shape {tuple(rows.shape)}"
        )
    if rows.shape[1] == 0:
        raise RoutesValidationError(
            f"routes for router '{name}' have shape {tuple(rows.shape)}: k=0 experts per token, but a router picks at "
            "least one. Pass [tokens, k] rows (a token without a route is a row of k times -1)"
        )
    if top_k is not None and rows.shape[1] != top_k:
        raise RoutesValidationError(
            f"router '{name}' chooses k={top_k} experts per token, but its routes have k={rows.shape[1]}"
        )
    if rows.numel() == 0:
        return
    r = _exact_int64(rows, num_experts, name) if rows.dtype in _WIDE_UNSIGNED else rows.long()
    low, high = (int(v) for v in torch.aminmax(r))  # (one pass; the rows are found only where one is bad)
    if low < -1 or high >= num_experts:
        bad = ((r < -1) | (r >= num_experts)).any(dim=1)
        t = int(bad.nonzero()[0, 0])
        raise RoutesValidationError(
            f"router '{name}' has {num_experts} experts, but token {t} has indices {r[t].tolist()}: "
            f"each index must be in [0, {num_experts - 1}], or the whole row -1 (route natively)"
        )
    if rows_too:
        _check_row_sets(r, name, missing=low < 0)


def _check_row_sets(r: torch.Tensor, name: str, missing: bool = True) -> None:
    """Each row is all -1 or k distinct experts (``r``: int64 ``[T, k]``, in range; ``missing=False``: it holds
    no -1)."""
    if missing:
        _check_whole_missing(r, name)
    if r.shape[1] > 1:
        s = r.sort(dim=1).values
        dup = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any(dim=1)
        if bool(dup.any()):
            t = int(dup.nonzero()[0, 0])
            raise RoutesValidationError(
                f"router '{name}', token {t}: row {r[t].tolist()} repeats an expert; a router picks "
                "k distinct experts (zero padding often causes this: mark missing rows with -1)"
            )


def _check_whole_missing(r: torch.Tensor, name: str) -> None:
    """Each row holding a -1 is all -1."""
    missing = r == -1
    partial = missing.any(dim=1) & ~missing.all(dim=1)
    if bool(partial.any()):
        t = int(partial.nonzero()[0, 0])
        raise RoutesValidationError(
            f"router '{name}', token {t}: row {r[t].tolist()} mixes -1 with expert indices; "
            "a row is either all -1 (route natively) or k valid experts"
        )


def _native(arr: np.ndarray, *, copy: bool = False) -> np.ndarray:
    """``arr`` in the machine's byte order, C-contiguous (a copy when ``copy``): what torch.from_numpy takes.

    A file or buffer written on a machine of the other byte order holds the same numbers;
    torch refuses such an array, numpy converts it exactly.
    """
    return np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True if copy else None)


def integer_array(data: Any, what: str, holds: str = "expert indices") -> np.ndarray:
    """``data`` (a numpy array, a tensor on any device, nested lists) as an integer numpy array.

    Anything that holds no exact expert numbers is refused, never cast: a tensor or array of
    floats, bools or objects, a meta tensor, ragged lists, and uint64 values past int64 (which
    an int64 cast would turn into negative numbers).

    Raises:
        RoutesValidationError: naming ``what`` and what is wrong with it.
    """
    check_dense(data, what, RoutesValidationError)
    if isinstance(data, np.ma.MaskedArray) and np.ma.getmaskarray(data).any():
        raise RoutesValidationError(
            f"{what} is a masked array with masked entries: the values under the mask would be read as experts. "
            "Cut the masked rows, or fill them (array.filled(-1)) where the format has a no-route row"
        )
    if isinstance(data, torch.Tensor):
        if data.device.type == "meta":
            raise RoutesValidationError(f"{what} is a tensor on the meta device: it holds no values")
        if not _int_dtype(data.dtype):
            raise RoutesValidationError(f"{what} must hold integers ({holds}), got a tensor of {data.dtype}")
        data = data.detach().cpu().resolve_conj().resolve_neg().numpy()
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError) as e:  # ragged lists, objects numpy cannot hold
        raise RoutesValidationError(f"{what} is not a rectangular array: {e}") from None
    if arr.dtype.kind not in "iu":  # (timedelta64 counts as an integer to numpy: not an expert number)
        raise RoutesValidationError(f"{what} must hold integers ({holds}), got dtype {arr.dtype}")
    arr = _native(arr)  # (uint64 of the other byte order is not np.uint64 to the check below)
    if arr.dtype == np.uint64 and arr.ndim and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        past = (arr > np.iinfo(np.int64).max).reshape(arr.shape[0], -1).any(axis=1)
        t = int(np.argmax(past))
        raise RoutesValidationError(
            f"{what}: token {t} has indices up to {int(arr[t].max())} ({arr.dtype}), past int64: no expert "
            "number (an int64 cast would make it negative, and -1 means 'route natively')"
        )
    return arr


def check_exact(values: np.ndarray, converted: np.ndarray | torch.Tensor, what: str) -> None:
    """Refuse a conversion of ``values`` that changed any of them.

    ``converted`` holds ``values`` in another dtype: one that cannot hold every value
    exactly (uint8 and -1 rows, int8 and 200 experts, bool) wraps them around or collapses
    them, which is refused rather than written. ``what`` names the conversion.
    """
    if isinstance(converted, torch.Tensor):  # (uint64 to int64 would turn a wrapped -1 back into -1: compare as is)
        converted = converted.numpy() if converted.dtype == torch.uint64 else converted.to(torch.int64).numpy()
    if values.size and not np.array_equal(converted, values):
        lo, hi = int(values.min()), int(values.max())
        raise RoutesValidationError(
            f"{what} would change values: "
            + (f"they are all {lo}" if lo == hi else f"they run from {lo} to {hi}")
            + (" (-1 marks unrecorded rows)" if lo < 0 else "")
            + "; pick a dtype that holds them"
        )


def _check_dtype_holds(dtype: torch.dtype | np.dtype, num_experts: int, name: str) -> None:
    """Refuse rows given in a dtype that cannot write every expert of their router (uint8 rows of a router of 300).

    Such rows were cast before they got here: an expert past the dtype's largest value wrapped around on the way
    (expert 300 of uint8 reads 44, a real expert too), and rows that hold only small experts cannot show it did not.
    Engines and moe_replay write a dtype that holds every expert (:func:`~moe_replay.index_dtype`).
    """
    high = int(torch.iinfo(dtype).max if isinstance(dtype, torch.dtype) else np.iinfo(dtype).max)
    if num_experts - 1 > high:
        kind = str(dtype).removeprefix("torch.")
        raise RoutesValidationError(
            f"router '{name}' has {num_experts} experts, but its rows are {kind}, which holds expert numbers up to "
            f"{high} only: experts {high + 1}..{num_experts - 1} cannot be written in it, so rows cast to {kind} on "
            "the way may have wrapped around (a wrapped expert reads as a smaller one). Pass the rows as they were "
            "recorded, in a dtype that holds every expert (int16 or int32; .long() before any cast), or check "
            "num_experts"
        )


def _wrapped_missing(dtype: Any, num_experts: int, k: int) -> int | None:
    """The value an unrecorded row (-1) takes once cast to ``dtype``, where it is also an expert of a top-1 router.

    An unsigned dtype of ``b`` bits holds no -1: cast to it, -1 reads ``2**b - 1``. For a router of
    ``2**b`` experts (uint8 and 256, uint16 and 65536) choosing one expert per token, that value is
    also its last expert, so a row holding it cannot be told from a row routed natively (for k > 1
    a wrapped row repeats an expert and is refused as such). None where no such value exists.
    """
    try:
        dt = np.dtype(dtype) if not isinstance(dtype, torch.dtype) else np.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        return None
    if dt.kind != "u" or k != 1 or dt.itemsize > 2 or num_experts != 1 << (8 * dt.itemsize):
        return None
    return num_experts - 1


def _ambiguous_rows(name: str, num_experts: int, dtype: Any, value: int, writing: bool) -> RoutesValidationError:
    """The error for rows of ``dtype`` holding ``value``, which is expert ``value`` and a wrapped -1 alike."""
    kind = np.dtype(dtype).name if not isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch.")
    signed = "int16" if value < 2**15 else "int32"  # (the narrowest that holds the expert and -1)
    fix = (
        f"to_numpy({kind}) would write an array that no reader can take back (Routes.from_numpy refuses it): "
        f"pick a signed dtype (np.{signed} holds every expert and -1)"
        if writing
        else "Pass the rows in a signed dtype: with -1 for unrecorded rows (cast before they wrapped), or, where "
        f"{value} is the expert, array.astype(np.{signed}) (tensor.long())"
    )
    return RoutesValidationError(
        f"the {kind} routes hold {value} for router '{name}' of {num_experts} experts and one expert per token: "
        f"{kind} holds no -1, and an unrecorded row cast to {kind} outside moe_replay reads {value} too, so "
        f"expert {value} and a row routed natively cannot be told apart. {fix}"
    )


def _check_no_wrapped_missing(
    rows: Any, num_experts: int, name: str, came_as: Any = None, *, writing: bool = False
) -> None:
    """Refuse one router's rows (given in ``came_as``, else their own dtype) holding a wrapped -1 (see
    :func:`_wrapped_missing`); ``writing``: they are :meth:`Routes.to_numpy`'s output."""
    dtype = came_as if came_as is not None else rows.dtype
    k = int(rows.shape[1]) if rows.ndim == 2 else 0
    value = _wrapped_missing(dtype, num_experts, k)
    if value is None or not (rows.numel() if isinstance(rows, torch.Tensor) else rows.size):
        return
    host = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if bool((host == value).any()):
        raise _ambiguous_rows(name, num_experts, dtype, value, writing)


class Routes:
    """Routing decisions of T tokens through L routers.

    Routes are values: ``==`` compares the routers, their expert counts and every row; ``bool(r)``
    says whether any router holds a row (it never raises); ``len(r)`` is the token count (0 for
    routes of no router). Like a list they are unhashable (``hash(r)`` raises ``TypeError``, so
    they are no ``dict`` key or ``set`` member): key by ``id(r)``, or by ``r.fingerprint`` for
    the router set alone. Nothing is set on them (``r.token_ids = ids`` raises an ``AttributeError``
    that names ``r.with_token_ids(ids)``, which returns the routes of those ids).

    Args:
        layers: one integer tensor ``[T_l, k_l]`` per router, in router order.
        names: module path of each router, as in ``model.named_modules()``.
        num_experts: expert count, one for all routers or one per router.
        validate: ``False`` skips the per-row checks (whole -1 rows, distinct experts) here;
            :meth:`Session.replay` then runs them before any forward. The dtype and the
            range of the indices are always checked.

    Example:
        >>> import torch, moe_replay as mr
        >>> r = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
        >>> r.indices.shape
        torch.Size([2, 1, 2])
        >>> r[1:].per_layer()[0].tolist()
        [[2, 3]]
    """

    #: (see _trusted; a class default for routes pickled before it was kept)
    _forward_calls: tuple[int, ...] | None = None
    _router_calls: tuple[_RouterCalls | None, ...] | None = None
    #: where each router's rows were cut from, where these routes are a run of rows of routes that kept each router's
    #: own calls: for each router, None or ``(its calls in those routes, start, end)``, the calls the very object
    #: (in memory only). Slices of one router's rows that meet again in :meth:`cat` hold the calls of the rows they
    #: make up together, not each slice's parts of calls one after another (see :func:`_cat_router_calls`)
    _router_cut: tuple[tuple[_RouterCalls, int, int] | None, ...] | None = None
    #: (see _trusted; a class default for routes pickled before it was kept)
    _lineage: torch.Tensor | None = None
    #: (see _trusted; a class default for routes pickled before it was kept)
    _choice_forwards: tuple[int, ...] | None = None
    #: where each router stood in its rows at each of ``_token_choices`` (by name; None: not told): it travels with
    #: the record (see _trusted and ``moe_replay._choice_record``; a class default as above)
    _choice_places: Places | None = None
    #: (see _trusted; a class default for routes pickled before it was kept)
    _ids_settings: dict[str, tuple[tuple[str, str], ...]] | None = None

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        names: Sequence[str],
        num_experts: int | Sequence[int],
        *,
        validate: bool = True,
    ) -> None:
        validate = check_flag(validate, "validate")
        if isinstance(layers, torch.Tensor | np.ndarray) and layers.ndim > 0:
            # one array holds no router axis of its own: iterating it would take its first dimension as the
            # routers, so the [tokens, routers, k] of routes.indices and to_numpy() would pass transposed
            # wherever tokens and routers are as many
            raise ArgumentTypeError(
                f"layers must be a list of [tokens, k] tensors, one per router; got one {type(layers).__name__} of "
                f"shape {tuple(layers.shape)}, whose axes are not known. A [tokens, routers, k] array (as "
                "routes.indices and routes.to_numpy() give) goes to Routes.from_numpy(array, names=..., "
                "num_experts=...); for [routers, tokens, k] pass list(array)"
            )
        if not is_collection(layers):
            raise ArgumentTypeError(f"layers must be one [tokens, k] tensor per router (a list), got {layers!r:.60}")
        names = router_names(names, "names=")
        layers = list(layers)
        if len(layers) != len(names):
            raise RoutesValidationError(f"got {len(layers)} routing tensors for {len(names)} router names")
        if len(set(names)) != len(names):
            raise RoutesValidationError(f"router names repeat: {sorted(n for n in names if names.count(n) > 1)}")
        if not is_collection(num_experts):  # one count for all routers (an int, a 0-d array or tensor)
            experts = (_expert_count(num_experts),) * len(names)
        else:
            given: Any = num_experts  # (a collection: checked just above)
            experts = tuple(_expert_count(e) for e in given)
            if len(experts) != len(names):
                raise RoutesValidationError(f"got {len(experts)} expert counts for {len(names)} routers")
        data: list[torch.Tensor] = []
        for name, rows, e in zip(names, layers, experts, strict=True):
            if isinstance(rows, np.ndarray):
                if rows.dtype.hasobject or rows.dtype.kind not in "iub":
                    raise RoutesValidationError(
                        f"router '{name}': rows must be integers (expert numbers), got a numpy array of {rows.dtype}"
                    )
                rows = torch.from_numpy(_native(rows, copy=True))
            if isinstance(rows, torch.Tensor) and rows.device.type == "meta":
                raise RoutesValidationError(f"router '{name}': rows on the meta device hold no values")
            # dtype and range are always checked: the storage dtype is narrower than int64
            if isinstance(rows, torch.Tensor) and _int_dtype(rows.dtype):  # (before the range: int8 wraps to -1)
                _check_dtype_holds(rows.dtype, e, name)
            validate_rows(rows, e, None, name, rows_too=validate)
            _check_no_wrapped_missing(rows, e, name)
            if rows.dtype in _WIDE_UNSIGNED:
                rows = _exact_int64(rows, e, name)
            data.append(rows.detach().to("cpu", _storage_dtype(e), copy=True).contiguous())  # never the caller's
        self._names = names
        self._experts = experts
        self._data = data
        self._validated = validate
        self._call_rows: tuple[tuple[int, int], ...] | None = None
        self._dropped_rows = 0
        self._token_ids: torch.Tensor | None = None
        self._fed_mask: torch.Tensor | None = None
        self._seq_pos: torch.Tensor | None = None
        self._lineage: torch.Tensor | None = None
        self._layout_pos: torch.Tensor | None = None
        self._token_rank: torch.Tensor | None = None
        self._order_untold = False
        self._routers_order = False
        self._rows_moved: str | None = None
        self._caches_interleaved: str | None = None
        self._rows_picked: str | None = None
        self._rows_untold: str | None = None
        self._token_choices: Choices | None = None
        self._choice_forwards = None
        self._choice_places: Places | None = None
        self._joined = 0
        self._recorded_names: tuple[str, ...] | None = None
        self._router_ids: tuple[torch.Tensor, ...] | None = None
        self._ids_lost: str | None = None
        self._prompt_kept: torch.Tensor | None = None
        self._cut_from: tuple[_Forwards, int, int] | None = None  # (see _trusted)
        self._forward_calls = None
        self._router_calls = None
        self._ids_settings = None

    # ------------------------------------------------------------------ shape
    @property
    def names(self) -> tuple[str, ...]:
        """Module path of each router."""
        return self._names

    @property
    def experts_per_layer(self) -> tuple[int, ...]:
        """Expert count of each router."""
        return self._experts

    @property
    def k_per_layer(self) -> tuple[int, ...]:
        """Experts chosen per token by each router."""
        return tuple(int(d.shape[1]) for d in self._data)

    @property
    def tokens_per_layer(self) -> tuple[int, ...]:
        """Rows recorded for each router."""
        return tuple(int(d.shape[0]) for d in self._data)

    @property
    def num_experts(self) -> int:
        """Expert count shared by all routers (raises if they differ: see ``experts_per_layer``)."""
        return self._uniform(self._experts, "expert counts", "experts_per_layer")

    @property
    def top_k(self) -> int:
        """k shared by all routers (raises if they differ: see ``k_per_layer``)."""
        return self._uniform(self.k_per_layer, "k values", "k_per_layer")

    @property
    def num_tokens(self) -> int:
        """Token count shared by all routers (raises if they differ: see ``tokens_per_layer``)."""
        return self._uniform(self.tokens_per_layer, "token counts", "tokens_per_layer")

    @property
    def num_layers(self) -> int:
        """Number of routers."""
        return len(self._names)

    @property
    def fingerprint(self) -> str:
        """Hash of the router set (names, expert counts, k); equal for routes of the same model."""
        return fingerprint(self._names, self._experts, self.k_per_layer)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the indices."""
        return sum(d.numel() * d.element_size() for d in self._data)

    def __len__(self) -> int:
        """Token count (``num_tokens``): 0 for routes of no router; raises where routers differ in it."""
        return self.num_tokens if self._data else 0

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(routes)``: the ``[T, L, k]`` array of :meth:`to_numpy` (a new array each time).

        Without it numpy would read routes as a sequence of tokens, each a sequence of one token, and fail after
        64 dimensions with no word of what to pass.

        Raises:
            InvalidArgumentError: ``copy=False`` (the array is always a new one), or routers that differ in their
                token counts or k (no one ``[T, L, k]`` array holds them: see :meth:`to_numpy`).
        """
        if copy is False:
            raise InvalidArgumentError(
                "np.asarray(routes, copy=False): routes hold one tensor per router, so their [tokens, routers, k] "
                "array is always a new one; leave copy unset, or call routes.to_numpy()"
            )
        return self.to_numpy(dtype)

    def __bool__(self) -> bool:
        """Does any router hold a row? Never raises (routes of no router, or routers that differ in
        their token counts, have no one ``len``)."""
        return any(d.shape[0] > 0 for d in self._data)

    def __contains__(self, name: object) -> bool:
        """Does a router of this name hold rows here (``"layers.0.gate" in routes``)?

        Without it, ``in`` would iterate the rows (routes are indexed by token) and answer False
        for every router name without a word.
        """
        if not isinstance(name, str):
            raise ArgumentTypeError(
                f"'in' asks for a router by name (a str, one of .names), got {type(name).__name__}; rows are picked "
                "by index (routes[i])"
            )
        return name in self._names

    def _uniform(self, values: Sequence[int], what: str, alt: str) -> int:
        if not values:
            raise InvalidArgumentError("these routes hold no router")
        if len(set(values)) != 1:
            groups: dict[int, list[str]] = {}
            for n, v in zip(self._names, values, strict=True):
                groups.setdefault(int(v), []).append(n)
            held = "; ".join(f"{v}: {ns[:2]}{' ...' if len(ns) > 2 else ''}" for v, ns in sorted(groups.items()))
            raise InvalidArgumentError(
                f"routers differ in {what} ({held}), and this needs one for all routers: take the routers that "
                f"share one with routes.select([...]) first, or read each router's with .{alt} or routes.layer(name)"
            )
        return int(values[0])

    # ------------------------------------------------------------------ views
    @property
    def indices(self) -> torch.Tensor:
        """int64 tensor ``[T, L, k]``; -1 rows are unrecorded tokens.

        Raises ``ValueError`` when routers differ in T or k; use :meth:`per_layer` then.

        Rows are in the order the routers saw the tokens: for a capture of routers that see a
        ``[batch, positions]`` batch sequence-first (layers that run ``[positions, batch, hidden]``),
        position 0 of every sequence first, then position 1..., not sequence by sequence;
        :meth:`in_token_order` gives them in the order of their tokens.
        """
        self.num_tokens, self.top_k  # noqa: B018 - raise early with a clear message
        if not self._data:
            return torch.empty(0, 0, 0, dtype=torch.long)
        return note_stack(torch.stack([d.long() for d in self._data], dim=1), self._names, 1, self._data)

    def in_token_order(self) -> Routes:
        """These routes with their rows in the order of their tokens, sequence by sequence.

        A capture of routers that see a ``[batch, positions]`` batch sequence-first (layers that
        run ``[positions, batch, hidden]``, as fairseq's and Megatron's) holds each forward's rows
        position by position, as :meth:`to_numpy`, :attr:`indices` and :meth:`layer` give them;
        here they are put sequence by sequence (each forward's among its own, with their
        :attr:`token_ids`), the order :class:`~moe_replay.BatchLayout` and the engine formats
        lay rows out in. Routes already in that order are returned as they are. The result is
        no longer in the routers' order: replay the routes as captured.

        Raises:
            RoutesValidationError: rows whose tokens' order the capture could not tell (rows
                recorded sequence-first by forwards that did not line up with the rows, a
                ``keep_newest`` ring that wrapped; forwards fed embeddings given a KV cache that
                held tokens, or across processes).

        Example:
            >>> import torch, moe_replay as mr
            >>> r = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
            >>> r.in_token_order().layer("layers.0.gate").tolist()  # (built in token order: as it is)
            [[0, 1], [2, 3]]
        """
        return in_token_order(self, "Routes.in_token_order()")

    def per_layer(self) -> tuple[torch.Tensor, ...]:
        """One int64 tensor ``[T_l, k_l]`` per router, in router order.

        Rows are in the order the routers saw the tokens: for a capture of routers that see a
        ``[batch, positions]`` batch sequence-first (layers that run ``[positions, batch, hidden]``),
        position 0 of every sequence first, then position 1..., not sequence by sequence;
        :meth:`in_token_order` gives them in the order of their tokens.
        """
        return tuple(note_router(d.long(), n) for d, n in zip(self._data, self._names, strict=True))

    def layer(self, name: str) -> torch.Tensor:
        """The int64 ``[T, k]`` routes of one router, by module path.

        Rows are in the order the routers saw the tokens: for a capture of routers that see a
        ``[batch, positions]`` batch sequence-first (layers that run ``[positions, batch, hidden]``),
        position 0 of every sequence first, then position 1..., not sequence by sequence;
        :meth:`in_token_order` gives them in the order of their tokens.

        Raises:
            UnknownRouterError: no router of these routes has that name.
            ArgumentTypeError: ``name`` is no str (a router's number: ``routes.layer(routes.names[i])``).
        """
        if not isinstance(name, str):
            number = int(name) if is_integer(name) else None
            which = (
                f": for router number {number}, routes.layer(routes.names[{number}]) ({self._names[number]!r})"
                if number is not None and -len(self._names) <= number < len(self._names)
                else f"; routers: {list(self._names)[:4]}" + (" ..." if len(self._names) > 4 else "")
            )
            raise ArgumentTypeError(
                f"layer() takes a router's name (its module path), got {type(name).__name__} {name!r:.40}{which}"
            )
        try:
            return note_router(self._data[self._names.index(name)].long(), name)
        except ValueError:
            raise UnknownRouterError(
                f"no router named '{name}' in these routes; routers: {list(self._names)}"
            ) from None

    @property
    def missing(self) -> torch.Tensor:
        """Boolean ``[T, L]``: True where a token has no recorded route (a -1 row)."""
        self.num_tokens  # noqa: B018
        return torch.stack([(d < 0).all(dim=1) for d in self._data], dim=1)

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The token each row was recorded for: int64 ``[T]``, -1 where unknown; None where no row's is known.

        A capture records them (the ids each forward of the attached model was fed, -1 at
        prompt padding and where a forward was fed embeddings); :meth:`with_token_ids` sets
        them on routes from elsewhere (an engine's rollout and its token ids). Slicing,
        :meth:`select`, :meth:`cat`, :meth:`save`/:meth:`load`, the batch layouts and
        :func:`~moe_replay.split_generation` keep them with their rows, and
        :meth:`Session.replay` checks that every forward is fed these tokens, refusing
        routes recorded for other tokens (another batch, order or rank) where the replayed
        forwards would otherwise take them silently. They are no part of :meth:`equal`. A capture also
        keeps each row's place in its sequence (the tokens before it, its KV cache's included), which
        goes where the row goes and is checked with its id: the row's token fed in another context (a
        suffix without its prefix or KV cache, rows picked out of their sequences) is refused.

        None too where the routers' rows are not one per token of the same forwards (one MoE block
        called at several layers, a router also called on hidden states of one's own in the
        capture): the capture then keeps each router's own ids, which a replay checks alike.
        """
        return None if self._token_ids is None else self._token_ids.clone()

    def with_token_ids(self, token_ids: torch.Tensor | np.ndarray | Sequence[int] | None) -> Routes:
        """The same routes, recorded for these tokens (see :attr:`token_ids`); ``None`` drops them.

        Dropping them lets other tokens take the rows, not other places: rows of a capture keep the place in its
        sequence each was recorded at, and a replay forces a row only at that place of a forward (its
        ``position_ids``, or the places its mask and KV cache give), so a slice of them fed another slice's
        positions (a wrong sequence-parallel rank) is refused as it is with the ids.

        Args:
            token_ids: one id per row in row order, -1 where unknown; or the ``[batch, positions]``
                ids of the forwards, read row-major, sequence by sequence. That is the row order of
                routers that see a batch batch-major; the rows of routers that saw it sequence-first
                (a capture of layers that run ``[positions, batch, hidden]``) get each its own token's id.

        Raises:
            RoutesValidationError: not one id per row, routers of different row counts, an id below -1, or
                ``[batch, positions]`` ids for rows recorded sequence-first whose tokens the capture could not tell,
                or for rows of forwards fed embeddings whose order the capture could not tell.

        Example:
            >>> import torch, moe_replay as mr
            >>> r = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
            >>> r.with_token_ids(torch.tensor([[17, 42]])).token_ids.tolist()
            [17, 42]
        """
        return self._with_token_ids(token_ids, "with_token_ids()")

    def _with_token_ids(self, token_ids: torch.Tensor | np.ndarray | Sequence[int] | None, what: str) -> Routes:
        """:meth:`with_token_ids`, its refusals said as ``what``'s (the argument of the call that gave the ids)."""
        ids = None if token_ids is None else _ids(token_ids, self, what)
        rank = self._token_rank
        grid = token_ids.dim() > 1 if isinstance(token_ids, torch.Tensor) else np.ndim(cast(Any, token_ids)) > 1
        if ids is not None and rank is None and grid and self._order_untold:
            raise RoutesValidationError(
                f"{what}: ids of shape {tuple(np.shape(cast(Any, token_ids)))} list the tokens sequence by "
                "sequence, but these rows were recorded from forwards fed embeddings in the order their routers saw "
                "them, which the capture could not tell (it may be position 0 of every sequence first); give one id "
                "per row, in row order"
            )
        if ids is not None and rank is not None and grid:
            # (a [batch, positions] grid lists the tokens sequence by sequence: rows recorded sequence-first hold
            # them position by position, so each row takes the id at its own token's place, not at its row's)
            if bool((rank == UNTOLD_RANK).any()):
                raise RoutesValidationError(
                    f"{what}: ids of shape {tuple(np.shape(cast(Any, token_ids)))} list the tokens sequence "
                    f"by sequence, but {int((rank == UNTOLD_RANK).sum())} of these rows were recorded from forwards "
                    "fed embeddings in the order their routers saw them, which the capture could not tell (it may be "
                    "position 0 of every sequence first); give one id per row, in row order"
                )
            if bool((rank < 0).any()):
                raise RoutesValidationError(
                    f"{what}: ids of shape {tuple(np.shape(cast(Any, token_ids)))} list the tokens "
                    "sequence by sequence, but these rows were recorded by routers that saw them sequence-first, and "
                    "the capture could not tell which token each row was; give one id per row, in row order"
                )
            ids = ids.clone().index_put_((torch.argsort(rank, stable=True),), ids)
        out = Routes._trusted(self._data, self._names, self._experts, self._validated)
        out._same_forwards(self)
        out._token_ids = ids
        out._ids_lost = None  # (the caller's ids, or the check dropped on purpose: each router's own go too)
        return out

    def _same_forwards(self, source: Routes) -> None:
        """Keep what ``source``'s capture knows of its forwards: these routes hold its rows, in its order.

        Its forwards, prompt mask, dropped rows and cache moves (:func:`~moe_replay.split_generation`
        checks them) stay with routes of the same rows under other ids, other names or fewer routers.
        """
        self._call_rows, self._dropped_rows = source._call_rows, source._dropped_rows
        self._fed_mask, self._rows_moved = source._fed_mask, source._rows_moved
        self._seq_pos, self._lineage = source._seq_pos, source._lineage
        self._layout_pos = source._layout_pos
        self._caches_interleaved, self._rows_picked = source._caches_interleaved, source._rows_picked
        self._token_rank, self._order_untold = source._token_rank, source._order_untold
        self._routers_order = source._routers_order
        self._rows_untold = source._rows_untold
        self._token_choices, self._choice_forwards = source._token_choices, source._choice_forwards
        self._choice_places = source._choice_places
        self._joined = source._joined
        self._recorded_names = source._recorded_names
        self._ids_lost = source._ids_lost
        self._prompt_kept = source._prompt_kept
        self._cut_from = source._cut_from
        self._forward_calls = source._forward_calls
        self._router_calls = source._router_calls
        self._ids_settings = source._ids_settings
        if source._router_cut is not None:  # (in memory only: not a mark of a file or the wire)
            self._router_cut = source._router_cut

    def to_numpy(self, dtype: np.dtype | type | None = None) -> np.ndarray:
        """``[T, L, k]`` array (int16 up to 32767 experts, -1 for unrecorded rows).

        ``dtype`` converts the array; a dtype that cannot hold every expert of a router (int8
        and 200 experts) or every value exactly (uint8 and -1 rows) is refused rather than
        wrapped around: :meth:`from_numpy` could not read it back. Nor could it read rows that
        ``validate=False`` let through (a repeated expert, ``-1`` beside an expert): they are checked
        here, as :meth:`save` and the engine writers check them.

        Rows are in the order the routers saw the tokens: for a capture of routers that see a
        ``[batch, positions]`` batch sequence-first (layers that run ``[positions, batch, hidden]``),
        position 0 of every sequence first, then position 1..., not sequence by sequence;
        :meth:`in_token_order` gives them in the order of their tokens.
        """
        if dtype is not None:
            try:
                dtype = np.dtype(dtype)
            except (TypeError, ValueError) as e:
                named = _numpy_name(dtype)
                raise ArgumentTypeError(
                    f"to_numpy() takes a numpy dtype, got {dtype!r:.60}: {e}"
                    + (f"; pass np.{named}" if named else "; pass np.int16, np.int32 or another numpy integer dtype")
                ) from None
            if dtype.kind not in "biuf":  # (bool and narrow dtypes are checked value by value below)
                raise ArgumentTypeError(
                    f"to_numpy() takes a numeric dtype (np.int16, np.int32...), got {dtype}: it holds no expert numbers"
                )
        if self._data:
            self.num_tokens, self.top_k  # noqa: B018 - one [T, L, k] array needs one T and one k
        self._ensure_valid()  # (the row checks validate=False deferred: an array from_numpy would refuse)
        arr = torch.stack(self._data, dim=1).numpy() if self._data else np.empty((0, 0, 0), np.int16)
        if dtype is None:
            return arr.copy()
        if np.dtype(dtype).kind in "iu":  # (what from_numpy would refuse to read back: refused as it is written)
            for name, experts in zip(self._names, self._experts, strict=True):
                _check_dtype_holds(np.dtype(dtype), experts, name)
        out = arr.astype(dtype)
        check_exact(arr, out, f"to_numpy({np.dtype(dtype).name})")
        for i, (name, experts) in enumerate(zip(self._names, self._experts, strict=True)):
            # exact, yet no reader could tell its last expert from a -1 cast the same way: from_numpy refuses it
            _check_no_wrapped_missing(out[:, i], experts, name, writing=True)
        return out

    @classmethod
    def from_numpy(
        cls,
        array: np.ndarray,
        *,
        names: Sequence[str],
        num_experts: int | Sequence[int],
    ) -> Routes:
        """Build routes from a ``[T, L, k]`` integer array (-1 rows are unrecorded)."""
        array = integer_array(array, "the routes array")
        names = list(router_names(names, "names="))
        if array.ndim != 3:
            raise RoutesValidationError(f"expected a [tokens, layers, k] array, got shape {array.shape}")
        if array.shape[1] != len(names):
            raise RoutesValidationError(f"array has {array.shape[1]} layers but {len(names)} names were given")
        t = torch.from_numpy(array.astype(np.int64))  # uint64 past int64 was refused above (a copy: never read-only)
        if is_collection(num_experts):  # (the dtype they came in must write every expert: as Routes checks its rows)
            counts: Any = num_experts
            for name, e in zip(names, counts, strict=False):
                _check_dtype_holds(array.dtype, _expert_count(e), str(name))
        else:
            _check_dtype_holds(array.dtype, _expert_count(num_experts), str(names[0]) if names else "")
        out = cls([t[:, i] for i in range(array.shape[1])], names=names, num_experts=num_experts)
        for i, (name, e) in enumerate(zip(out.names, out.experts_per_layer, strict=True)):  # (the dtype they came in)
            _check_no_wrapped_missing(array[:, i], e, name, array.dtype)
        return out

    # ------------------------------------------------------------------ slicing
    def __getitem__(self, index: TokenIndex) -> Routes:
        """Select tokens (rows) of every router: ``routes[a:b]``, an index list or a mask.

        An integer selects one token (a ``Routes`` of one row); out of range it raises
        :class:`~moe_replay.TokenIndexError` (an ``IndexError``). Only tokens are indexed:
        ``routes[0, 1]`` is refused (pick routers with :meth:`select` or :meth:`layer`), and so
        are integer positions that hold one 0 or 1 per token (past two tokens): an integer
        attention mask, which torch and numpy would read as positions 0 and 1 over and over
        (pass ``mask.bool()``).
        """
        n = self.num_tokens  # (token slicing needs one T)
        rows = _token_rows(index, n)
        _one_token_per_row(self, "routes[index]")
        data = [d[rows] for d in self._data]
        out = Routes._trusted(data, self._names, self._experts, self._validated)
        out._token_ids = None if self._token_ids is None else _known_or_none(self._token_ids[rows])
        out._seq_pos = None if self._seq_pos is None else self._seq_pos[rows].clone()
        if self._router_ids is not None:
            out._router_ids = tuple(v[rows] for v in self._router_ids)
        out._ids_lost = self._ids_lost
        out._ids_settings = self._ids_settings  # (the same routers, fewer rows: captured under the same settings)
        out._recorded_names = self._recorded_names  # (the same routers, fewer rows)
        out._joined = self._joined  # (rows of several routes joined may still be several sequences')
        out._token_rank = None if self._token_rank is None else _out_of_order(self._token_rank[rows])
        # (rows of an embeddings capture stay in the routers' order where they hold whole router calls, each in order)
        out._order_untold = self._order_untold and _whole_calls(rows, self._call_rows, n)
        if self._order_untold and not out._order_untold and out._token_rank is None:
            # (and where they do not, each row keeps the mark as its own, as a capture's ranks mark it: a layout of
            # them is refused, never taken as rows in token order)
            out._token_rank = torch.full((out._data[0].shape[0] if out._data else 0,), UNTOLD_RANK, dtype=torch.long)
        start = _run_start(rows, n)
        if start is not None and self._router_calls is not None:  # (each router's calls: the rows of them held)
            end = start + (data[0].shape[0] if data else 0)
            out._router_calls = tuple(None if c is None else _cut_calls(c, start, end) for c in self._router_calls)
            held = self._router_cut or (None,) * len(self._router_calls)  # (a slice of a slice: of the first's rows)
            out._router_cut = tuple(
                None if c is None else (c, start, end) if was is None else (was[0], was[1] + start, was[1] + end)
                for c, was in zip(self._router_calls, held, strict=True)
            )
        if start is not None:
            if self._lineage is not None:  # (a run of rows: each lineage that reaches back past its first row is cut)
                out._lineage = _cut_lineage(self._lineage[rows])
            out._clip_forwards(self, start)
            out._routers_order = self._routers_order  # (a run of rows: still in the order the routers saw them)
            if out.tokens_per_layer == self.tokens_per_layer:  # (every row, routes[:]: no rows chosen, the mark stays)
                out._rows_untold = self._rows_untold
                out._token_choices, out._choice_forwards = self._token_choices, self._choice_forwards
                out._choice_places = self._choice_places
            else:  # (the rankings of the forwards kept, those of a forward cut between sequences cut alike)
                out._token_choices, out._choice_forwards, out._choice_places = cut_record(
                    self._token_choices,
                    self._choice_forwards,
                    self._choice_places,
                    self._call_rows,
                    self._forward_calls,
                    start,
                    start + (data[0].shape[0] if data else 0),
                )
        else:
            out._pick_forwards(self, rows)
        return out

    def _clip_forwards(self, source: Routes, start: int) -> None:
        """Keep what ``source``'s capture knows of its forwards for these rows, its rows from ``start`` on, in order.

        Each forward of the capture gives these rows the rows of it that they hold: a run of whole
        forwards keeps them as they ran, and a run cut through one (a rank's share of one forward over
        every rank's sequences) holds a forward of its share. So :func:`~moe_replay.split_generation`
        refuses a share of a ``generate()`` capture, whose rows are the prompts of some sequences and
        the decode steps of others, rather than split it as a ``generate()`` of its own.
        """
        self._rows_moved, self._caches_interleaved = source._rows_moved, source._caches_interleaved
        self._rows_picked = source._rows_picked
        end = start + (self._data[0].shape[0] if self._data else 0)
        if source._prompt_kept is not None and start == 0 and source._call_rows and end >= source._call_rows[0][0]:
            self._prompt_kept = source._prompt_kept  # (its first forward, whole)
        if source._fed_mask is not None:
            self._fed_mask = source._fed_mask[start:end].clone()
        if source._layout_pos is not None:
            self._layout_pos = source._layout_pos[start:end].clone()
        self._dropped_rows = source._dropped_rows if start == 0 else 0
        if source._call_rows is None:
            self._dropped_rows = source._dropped_rows  # (no forwards to tell where these rows start: keep it)
            return
        self._call_rows = _clip_calls(source._call_rows, start, end)
        if source._cut_from is not None:  # (a slice of a slice: the rows of the first capture it holds)
            whole, at, _ = source._cut_from
            self._cut_from = (whole, at + start, at + end)
        else:
            self._cut_from = (source._whole_forwards(), start, end)
        self._forward_calls = _whole_calls_of(self._cut_from)

    def _whole_forwards(self) -> _Forwards:
        """What these routes know of their forwards, as one object for every slice cut from them."""
        held = self.__dict__.get("_forwards")
        if held is None or held.call_rows is not self._call_rows or held.prompt_kept is not self._prompt_kept:
            assert self._call_rows is not None
            held = self._forwards = _Forwards(self._call_rows, self._prompt_kept)
        if held.forward_calls is None:
            held.forward_calls = self._forward_calls
        if held.lineage is None and self._cut_from is None and self._lineage is not None:
            held.lineage = self._lineage  # (these routes' rows are the capture's: see _rows_origin)
        return held

    def _pick_forwards(self, source: Routes, rows: slice | torch.Tensor) -> None:
        """Keep what ``source``'s capture knows of its forwards for rows picked out of order (a list, a mask, a step).

        Such rows no longer follow the capture's forwards, whose rows cannot be told for them: where
        the capture knew its forwards, these routes say they were picked
        (:func:`~moe_replay.split_generation` refuses them rather than split them by their row count).
        What holds for every row of the capture (rows a ``keep_newest`` capture dropped, cache moves,
        interleaved loops, the engine reader that placed them by their count alone) and each row's prompt
        mask stay with them.
        """
        self._keep_row_marks([source])
        if source._fed_mask is not None:
            self._fed_mask = source._fed_mask[rows].clone()
        if source._layout_pos is not None:
            self._layout_pos = source._layout_pos[rows].clone()
        if source._call_rows is not None or source._rows_picked is not None:
            held = self._data[0].shape[0] if self._data else 0
            self._rows_picked = source._rows_picked or (
                f"routes[...] picked {held} of its {source.num_tokens} rows by a list, mask or step"
            )

    def select(self, names: Iterable[str]) -> Routes:
        """Keep only the named routers, in the order given."""
        names = list(router_names(names, "select()"))
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise RoutesValidationError(f"select() names a router more than once: {twice[:4]}; name each once")
        pos = []
        for n in names:
            if n not in self._names:
                raise UnknownRouterError(f"no router named '{n}' in these routes; routers: {list(self._names)}")
            pos.append(self._names.index(n))
        out = Routes._trusted([self._data[i] for i in pos], names, [self._experts[i] for i in pos], self._validated)
        if pos:  # (the same rows of the same forwards, of fewer routers)
            out._same_forwards(self)
        out._token_ids = self._token_ids if pos else None
        if self._router_ids is not None and pos:
            out._router_ids = tuple(self._router_ids[i] for i in pos)
            if self._router_calls is not None:
                out._router_calls = tuple(self._router_calls[i] for i in pos)
            if self._router_cut is not None:
                out._router_cut = tuple(self._router_cut[i] for i in pos)
            # (why the ids were lost holds where a router that lost them is kept: the others' are known, and checked)
            if not any(bool((v == LOST_ID).any()) for v in out._router_ids):
                out._ids_lost = None
        return out

    def rename(self, prefixes: Mapping[str, str]) -> Routes:
        """The same routes under other router names: each name's longest matching prefix is replaced.

        A prefix is whole module names: ``"layers.1"`` (or ``"layers.1."``) heads
        ``layers.1.mlp.gate``, never ``layers.10.mlp.gate``.

        The explicit way to replay routes recorded under other module paths (a model wrapped
        by DDP, ``torch.compile``, PEFT or a module of one's own; :meth:`Session.replay` does
        it by itself when one prefix change fits every name and moves a whole model, and refuses
        when several do, or when the prefix is one part of a model beside others: an encoder's
        routes on a session of the decoder). The routers the routes were recorded on are renamed
        alike.

        Args:
            prefixes: ``{old_prefix: new_prefix}``; ``""`` matches every name (adds a prefix).

        Raises:
            RoutesValidationError: two routers would get the same name.
            InvalidArgumentError: a prefix ends inside a module name of every router it starts
                (``"lay"``), so it heads none.

        Example:
            >>> import torch, moe_replay as mr
            >>> r = mr.Routes([torch.tensor([[0, 1]])], names=["layers.0.gate"], num_experts=4)
            >>> r.rename({"": "module."}).names
            ('module.layers.0.gate',)
            >>> r.rename({"": "module."}).rename({"module.": ""}).equal(r)
            True
        """
        if not isinstance(prefixes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prefixes.items()
        ):
            raise ArgumentTypeError(f"rename() takes a mapping of str prefixes {{old: new}}, got {prefixes!r:.60}")
        keys = sorted(prefixes, key=len, reverse=True)
        names = self._names
        inside = [k for k in keys if not any(_heads(k, n) for n in names) and any(n.startswith(k) for n in names)]
        if inside:
            cut = next(n for n in self._names if n.startswith(inside[0]))
            raise InvalidArgumentError(
                f"rename(): the prefix {inside[0]!r} ends inside a module name of router {cut!r}, and matches no "
                "router name at a '.': a prefix is whole module names (e.g. 'layers.1' is layers.1, never "
                "layers.10). Give the whole module names (with or without the trailing '.')"
            )
        names = _renamed(self._names, prefixes, keys)
        if len(set(names)) != len(names):
            twice = sorted({m for m in names if names.count(m) > 1})
            raise RoutesValidationError(f"rename({dict(prefixes)!r}) gives two routers the same name: {twice[:4]}")
        out = Routes._trusted(self._data, names, self._experts, self._validated)
        out._same_forwards(self)
        out._choice_places = rename_places(self._choice_places, dict(zip(self._names, names, strict=True)))
        out._token_ids = self._token_ids
        out._router_ids = self._router_ids
        if self._ids_settings is not None:  # (each router's, under its new name)
            new = dict(zip(self._names, names, strict=True))
            out._ids_settings = {new.get(n, n): v for n, v in self._ids_settings.items()}
        if self._recorded_names is not None:  # (the model they were recorded on, under the names given)
            out._recorded_names = tuple(dict.fromkeys(_renamed(self._recorded_names, prefixes, keys)))
        return out

    @classmethod
    def cat(cls, parts: Sequence[Routes]) -> Routes:
        """Concatenate routes along tokens; all parts must hold the same routers.

        Where every part comes from a capture, the result knows their forwards, one after another:
        :func:`~moe_replay.split_generation` splits a capture cut in two blocks as one, and refuses
        the captures of several ``generate()`` calls (the ranks' rollouts, gathered) as one.
        """
        if not is_collection(parts):
            raise ArgumentTypeError(f"Routes.cat takes a list of Routes, got {type(parts).__name__}")
        parts = list(parts)
        if not parts:
            raise InvalidArgumentError("Routes.cat needs at least one Routes")
        for i, p in enumerate(parts):
            if not isinstance(p, Routes):
                raise ArgumentTypeError(f"Routes.cat takes Routes only; part {i} is a {type(p).__name__}")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if p.names != first.names or p.experts_per_layer != first.experts_per_layer:
                hint = reorder_hint(p, first, i) or (
                    ": parts joined are rows of the same routers, of the same expert counts (routes of one model); "
                    "replay routes of other routers or models in blocks of their own"
                )
                raise RoutesValidationError(
                    f"Routes.cat: part {i} holds routers {list(p.names)} with experts {p.experts_per_layer}, "
                    f"part 0 holds {list(first.names)} with {first.experts_per_layer}" + hint
                )
            if p.k_per_layer != first.k_per_layer:
                raise RoutesValidationError(
                    f"Routes.cat: part {i} has k {p.k_per_layer}, part 0 {first.k_per_layer}: a router's rows hold "
                    "one k, so parts joined are routes recorded with the same top_k; replay routes of another k in a "
                    "block of their own"
                )
        data = [torch.cat([p._data[j] for p in parts]) for j in range(first.num_layers)]
        out = cls._trusted(data, first.names, first.experts_per_layer, all(p._validated for p in parts))
        # a part of unknown tokens: -1 for each of its rows; a part of several row counts: no one id per row fits
        if any(p._router_ids is not None for p in parts):  # (each router's own ids, of the parts that know one)
            out._router_ids = tuple(torch.cat([_rows_ids(p, j) for p in parts]) for j in range(first.num_layers))
            out._router_calls, out._router_cut = _cat_router_calls(parts)
        elif any(p._token_ids is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            out._token_ids = torch.cat(
                [p._token_ids if p._token_ids is not None else torch.full((p.num_tokens,), -1) for p in parts]
            )
        out._cat_forwards(parts)
        # (each part's choices of the tokens reaching its routers, in turn: its forwards run in turn at replay; a part
        # cut through a forward, a rank's sequences of it, is no forward of its own once joined to another's rows)
        if len(parts) == 1 or not any(p._forward_calls and min(p._forward_calls) < 0 for p in parts):
            out._token_choices, out._choice_forwards = join_choices(
                [(p._token_choices, p._choice_forwards) for p in parts]
            )
            if out._token_choices is not None:  # (where the routers stood: after the rows of the parts before)
                out._choice_places = join_places(
                    [
                        (p._token_choices, p._choice_places, dict(zip(p.names, p.tokens_per_layer, strict=True)))
                        for p in parts
                    ]
                )
        # (routes of rows joined: consecutive slices of one capture's rows, joined again, are one part of them)
        pieces = _rejoined([p for p in parts if p._data and p._data[0].shape[0]])
        out._joined = len(pieces) if len(pieces) > 1 else max((p._joined for p in parts), default=0)
        if any(p._token_rank is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            out._token_rank = _out_of_order(_cat_ranks([(p._token_rank, p.num_tokens) for p in parts]))
        # (rows each in the order their routers saw them, one part after another: so are those of the whole)
        held = [p for p in parts if any(p.tokens_per_layer)]
        rank = out._token_rank  # (every row of the whole in the untold order of its routers, or not all are)
        untold = rank is None or bool((rank == UNTOLD_RANK).all())
        out._order_untold = bool(held) and all(p._order_untold for p in held) and untold
        out._routers_order = all(p._routers_order for p in parts)
        return out

    def _cat_forwards(self, parts: Sequence[Routes]) -> None:
        """Keep what the parts' captures know of their forwards, where every part knows its own.

        The forwards of the parts, one after another, are those of these rows: a capture cut in two
        (a prefill captured apart from its decode steps) keeps the forwards of one ``generate()``,
        while the captures of two ``generate()`` calls (the ranks' rollouts, gathered) keep two
        prompt forwards, which :func:`~moe_replay.split_generation` refuses to split as one. Rows a
        ``keep_newest`` capture dropped, its cache moves and interleaved loops come along too.
        """
        # what holds for every row of a part (rows dropped before it, cache moves, interleaved loops, rows picked
        # out of order) holds for the rows of the whole, whether or not every part knows its forwards
        self._keep_row_marks(parts)
        recorded = {p._recorded_names for p in parts}  # (parts recorded on different router sets: none of them)
        self._recorded_names = recorded.pop() if len(recorded) == 1 else None
        self._rows_picked = next((p._rows_picked for p in parts if p._rows_picked), None)
        joined = _rejoined(parts)  # (slices of one capture's rows that meet again: one slice of them)
        self._prompt_kept = joined[0]._prompt_kept  # (the first forward of the whole is the first part's)
        if len(joined) == 1:
            self._cut_from = joined[0]._cut_from
        # each row's prompt mask is the row's own, whatever is known of the forwards (rows picked out of order, a
        # part of unknown forwards): a row a capture recorded at prompt padding stays one (compare, replay read it)
        if any(p._fed_mask is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            self._fed_mask = torch.cat(
                [
                    p._fed_mask if p._fed_mask is not None else torch.full((p.num_tokens,), -1, dtype=torch.int8)
                    for p in parts
                ]
            )
        if any(p._seq_pos is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            self._seq_pos = torch.cat(
                [p._seq_pos if p._seq_pos is not None else torch.full((p.num_tokens,), -1) for p in parts]
            )
        if any(p._lineage is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            # (each part's own: a lineage that reaches back past its part's first row is cut)
            self._lineage = _cut_lineage(
                torch.cat(
                    [
                        torch.arange(p.num_tokens) + 1 if p._lineage is None else p._lineage  # (past its row: cut)
                        for p in parts
                    ]
                ),
                torch.cat([torch.arange(p.num_tokens) for p in parts]),
            )
        if any(p._layout_pos is not None for p in parts) and all(len(set(p.tokens_per_layer)) == 1 for p in parts):
            self._layout_pos = torch.cat(
                [p._layout_pos if p._layout_pos is not None else torch.full((p.num_tokens,), -2) for p in parts]
            )
        if any(p._call_rows is None for p in joined):
            return  # (a part of unknown forwards: so are the forwards of the whole)
        runs: list[tuple[int, int]] = []
        for rows, calls in (run for p in joined for run in p._call_rows):
            if runs and runs[-1][0] == rows:
                runs[-1] = (rows, runs[-1][1] + calls)
            else:
                runs.append((rows, calls))
        self._call_rows = tuple(runs)
        # (the calls of each forward, where every part holds whole forwards that know theirs: one after another)
        each = [p._forward_calls for p in joined]
        self._forward_calls = tuple(c for e in each for c in e) if all(e is not None for e in each) else None

    def _keep_row_marks(self, parts: Sequence[Routes]) -> None:
        """Keep what holds for every row of ``parts`` on these routes, made of their rows in other places (a pick,
        a join, a batch layout, a stitched conversation): the rows a ``keep_newest`` capture dropped before them
        (a replay without token ids refuses them), the cache moves and interleaved decode loops of their capture
        (:func:`~moe_replay.split_generation` refuses them), the engine reader that placed them by their row count
        alone (a ``strict=False`` replay that leaves rows of them unread is refused), and why their routers' token ids
        could not be kept (a replay refuses them). Dropped rows add up: each part's are a hole before its rows."""
        self._dropped_rows = sum(p._dropped_rows for p in parts)
        self._rows_moved = next((p._rows_moved for p in parts if p._rows_moved), None)
        self._caches_interleaved = next((p._caches_interleaved for p in parts if p._caches_interleaved), None)
        self._rows_untold = next((p._rows_untold for p in parts if p._rows_untold), None)
        self._ids_lost = next((p._ids_lost for p in parts if p._ids_lost), None)
        self._ids_settings = _joined_settings(parts)

    @classmethod
    def _trusted(
        cls, data: Sequence[torch.Tensor], names: Sequence[str], experts: Sequence[int], validated: bool = True
    ) -> Routes:
        """Build from storage tensors of checked routes without checking again."""
        obj = cls.__new__(cls)
        obj._names = tuple(names)
        obj._experts = tuple(int(e) for e in experts)
        obj._data = [d.to(_storage_dtype(e)).contiguous() for d, e in zip(data, obj._experts, strict=True)]
        obj._validated = validated
        #: a capture's rows per router call, as (rows, calls) runs, set by Session.routes() (and kept by the
        #: methods that keep every row in place: with_token_ids, select, rename, save and load; cut to the rows
        #: held by a slice of consecutive rows; joined by cat): rows picked out of order follow no calls
        obj._call_rows = None
        #: rows per router (at most) that a keep_newest capture dropped before the first it holds,
        #: set by Session.routes() only: such rows no longer start at a forward (split_generation refuses them)
        obj._dropped_rows = 0
        #: the token id of each row, -1 where unknown (see token_ids); every Routes of the same rows keeps them
        obj._token_ids = None
        #: set by Session.routes() only, one value per row: the attention mask of a forward that fed several
        #: tokens per sequence (-1 where unknown); and the cache method that moved rows between forwards, if
        #: one did (split_generation checks them)
        obj._fed_mask = None
        #: set by Session.routes() only, one int64 per row: the row's place in its sequence as its forward gave it (the
        #: tokens before it in its sequence, cached ones included, padding left out), -1 where not known, ``-2 - p``
        #: for place ``p`` after tokens of a KV cache no forward of the capture built (_feeds.AFTER_OUTSIDE). A replay
        #: that checks token ids refuses a forward that feeds a row's token at another place (a suffix fed without
        #: its prefix or KV cache, rows picked out of their sequences), or gives it a cache holding tokens that no
        #: forward of the replay built where the capture's forwards built theirs: its routers would see another
        #: context
        obj._seq_pos = None
        #: set by Session.routes() only, one int64 per row: how many rows before it the rows of the forward whose KV
        #: cache the row's forward went on from begin (its lineage: the latest earlier forward of the capture given or
        #: returning that cache, or the one it is a deep copy of), 0 where not known (a fresh cache, one no forward of
        #: the capture had, a forward the rows do not reach back to). A replay refuses a forward given a cache that
        #: another forward of its block had last (a decode step given another sequence's cache of as many tokens).
        #: Runs of rows and joins cut a lineage that reaches back past their first row (a replay block of such a run
        #: reads the whole capture's, ``_Forwards.lineage``); rows picked out of order keep none
        obj._lineage = None
        #: set by BatchLayout.routes() only, one int64 per row: the row's place in its sequence in the batch it was
        #: laid out for (0, 1, ...), -1 at that batch's padding, -2 where not known. A replay of routes that know no
        #: token ids refuses a forward whose attention mask or position_ids show its rows fall on other positions
        #: (see OrderCheck)
        obj._layout_pos = None
        #: set where a capture's routers saw the tokens of a [batch, positions] forward sequence-first (as layers that
        #: run [positions, batch, hidden] do), so that its rows do not follow their tokens sequence by sequence: one
        #: int64 per row, its place in that order (sorting the rows by it puts them in token order, see
        #: in_token_order), -1 where it is not known; None where the rows follow their tokens in order
        obj._token_rank = None
        #: set by Session.routes() only (kept by the methods that keep every row in place, by slices and picks of whole
        #: router calls in order, by cat of parts that all have it, by save and load, gather and scatter): every forward
        #: of the capture was fed embeddings of several sequences, whose order its routers saw them in is not told. Its
        #: rows are in that order, whatever it is: a replay of them is not refused for routers that see the tokens
        #: sequence-first. What refuses such rows a layout is each row's own mark, its rank UNTOLD_RANK (see
        #: order_untold), which every Routes made from them keeps, cut through a forward or joined with others too
        obj._order_untold = False
        #: set by Session.routes() only, where the capture told its tokens' order (``_token_rank``), and kept by
        #: the methods that keep its rows in the order the routers saw them (a run of rows, routes joined from such
        #: routes, other routers): a replay of them without token ids is not refused for routers that see the tokens
        #: sequence-first. Rows picked by a list, a mask or a step may stand in another order, their rank with them
        #: (sequences swapped by a batch-major index): such routes are refused there unless given their token ids
        obj._routers_order = False
        obj._rows_moved = None
        #: set by Session.routes() only: the type of a KV cache given to a forward again after another was given
        #: in between (the forwards of two decode loops interleaved: split_generation refuses them), or None
        obj._caches_interleaved = None
        #: set where rows were picked out of order from a capture that knew its forwards (routes[[...]], a mask,
        #: a step): what picked them; such rows follow no forwards, and split_generation refuses them
        obj._rows_picked = None
        #: set by an engine reader given no token count or id (``from_vllm_legacy`` without ``num_tokens``...): the
        #: reader's words for it. Nothing but the row count places these rows on their tokens (one too many at the
        #: front shifts every token), so a replay with ``strict=False`` that leaves any of them unconsumed is refused.
        #: Kept by the methods that keep every row (token ids, other routers, names, picks, cat, save and load, a
        #: slice of every row); a slice of fewer rows is rows the caller chose (``routes[:n]``), and drops it
        obj._rows_untold = None
        #: set by Session.routes(): the indices of the rankings by which modules holding routers chose which tokens
        #: reach them (Mixture-of-Depths), ``(module path, indices)`` in call order; a replay compares them (see
        #: ``moe_replay._token_choices``). Kept by the methods that keep every row in place, by files and the wire,
        #: joined by cat, cut by slices of whole forwards or sequences (see ``moe_replay._choice_record``). None: no
        #: record (routes of no capture, or cut where it cannot be told which rankings the rows kept were fed by)
        obj._token_choices = None
        #: how many of ``_token_choices`` each forward of the capture took, in order (None: not known; the record is
        #: then kept whole only): a slice of whole forwards keeps theirs (see ``moe_replay._choice_record``)
        obj._choice_forwards = None
        #: set by Session.routes(): where each router stood in its rows at each of ``_token_choices``, by name (None
        #: for a ranking not told), kept as the record is; a file or the wire holds it as one row of each router's
        #: place per ranking (see ``moe_replay._choice_record``); None: not told (routes saved before it was kept)
        obj._choice_places = None
        #: set by Routes.cat: how many routes of rows it joined (0 where none did; kept by the methods that keep every
        #: row in place). Joined routes may be several sequences' (a batch's, as an engine call returns them), which
        #: stitch_turns refuses as one conversation's turn where no token ids show they are pieces of one sequence
        obj._joined = 0
        #: set by Session.routes(): the router names of the session the routes were recorded on, every one (kept by
        #: select, slices, rename, save and load...), so that a replay fitting their names onto another model by a
        #: prefix change can tell a wrapper's prefix (every recorded router under it) from one part of the model
        #: beside others (an encoder's routes on a session of the decoder). A session that took some routers only
        #: (include=, exclude=) records the model's routers the search finds without them (see _model_routers in
        #: session.py); None for routes built from rows, and where that search does not find the session's routers
        obj._recorded_names = None
        #: set by Session.routes() where the routers' rows are not one per token of the same forwards (one MoE block
        #: called at several layers, a router also called on hidden states of one's own): each router's token id of
        #: each row (-1 where unknown, NO_FORWARD_ID and PADDING_ID), which a replay checks router by router; None
        #: where ``_token_ids`` holds them for every router, or none is known. Every Routes of the same rows keeps them
        obj._router_ids = None
        #: set by Session.routes() where its forwards were fed token ids that it could not keep for every row (a
        #: router called on a part of a forward's tokens): why. A replay of such routes is refused rather than
        #: taken unchecked (with_token_ids drops it); every Routes made from them keeps it
        obj._ids_lost = None
        #: set by Session.routes() where the capture's first forward was fed a [batch, positions] batch whose padding
        #: the model took out before its routers (one row per token its attention mask keeps): that mask, as bool
        #: ``[batch, positions]``, which split_generation lays the prompt rows over. Kept with that forward's rows
        #: (methods that keep every row in place, slices and cat that begin with that forward whole, files, the wire)
        obj._prompt_kept = None
        #: set on a slice of consecutive rows of routes that knew their forwards: what the capture knew of them
        #: (one object for every slice of it) and the rows the slice holds, ``(forwards, start, end)``, so that
        #: cat() of slices that meet again (a forward cut through, joined) keeps that forward whole
        obj._cut_from = None
        #: the router calls each forward of the capture made (every router as many, each call's rows those of
        #: ``_call_rows`` in order), set by Session.routes() where its forwards line up with its rows, kept by the
        #: methods that keep every forward's rows in place (with_token_ids, select, rename, in_token_order) and by
        #: none else: a replay checks that each of its forwards makes the calls of the captured forward it reads. A
        #: forward of several calls that a slice cuts through counts the calls of it the slice holds, negated: no
        #: forward of a replay may read them (they hold parts of several calls, another layer's rows where it begins)
        obj._forward_calls = None
        #: each router's own calls, where the routers' differ (``_call_rows`` None) and each keeps its own token ids
        #: (``_router_ids``: a block called at two layers beside a block of its own): for each router, None where not
        #: known, else its ``(rows, calls)`` runs and the calls each forward of the capture made of it, as
        #: ``_call_rows`` and ``_forward_calls`` are for every router (a forward that did not call it: 0). Set by
        #: Session.routes(), cut by slices, picked by select, joined by cat: a replay checks each router's calls in
        #: each of its forwards against those of the captured forward it reads (see ``RouterFeedCheck``)
        obj._router_calls = None
        #: set by Session.routes(), by router name: for a router whose ids reach its caller through code after its
        #: decision (a remap of the top-k's indices by an offset, in its code or a hook of its modules), the settings
        #: its decision was established under, ``(key, repr(value))``, as the capture ran. The rows are the top-k's,
        #: not the experts the remapped ids name: a replay under other values of them is refused (see
        #: ``Session._check_ids_settings``). Kept by every method that keeps a router's rows (names changed with it,
        #: joined by cat: a setting the parts differ in reads as such), by files and the wire; None: none known
        obj._ids_settings = None
        return obj

    def _forwards_meta(self) -> dict[str, Any] | None:
        """What the capture knows of its forwards, as JSON for :meth:`save` (None where it knows nothing).

        The prompt mask is kept as ``[value, rows]`` runs (-1 where unknown): a capture's is -1
        but for its prompt forwards, a few runs per sequence. A mask of more runs than :data:`_MAX_RUNS`
        is left out here and saved as an array of its own (``prompt_mask``, see :meth:`save`).
        """
        calls = self._call_rows
        mask = None
        if self._fed_mask is not None and self._fed_mask.numel():
            values, counts = torch.unique_consecutive(self._fed_mask, return_counts=True)
            if values.numel() <= _MAX_RUNS:
                mask = [[int(v), int(c)] for v, c in zip(values.tolist(), counts.tolist(), strict=True)]
        known_calls = calls is not None and len(calls) <= _MAX_RUNS
        known = {
            "calls": [[int(n), int(c)] for n, c in calls] if calls is not None and known_calls else None,
            "mask_runs": mask,
            "rows_moved": self._rows_moved,
            "caches_interleaved": self._caches_interleaved,
            "rows_picked": self._rows_picked,
            "dropped_rows": int(self._dropped_rows),
            "rows_untold": self._rows_untold,
            "joined": self._joined or None,
            # (rows in the order the routers saw the tokens: a replay without ids is not refused for them)
            "routers_order": self._routers_order or None,
            # (a slice of a capture: the capture's forwards, so that slices saved apart join again as in memory)
            "cut_from": self._cut_meta(),
            # (the router calls each forward made, as [calls, forwards] runs: a replay checks each forward's calls)
            "forward_calls": _calls_runs(self._forward_calls) if known_calls else None,
        }
        own = _router_calls_meta(self._router_calls)
        if own is not None:  # (each router's own calls and its forwards', where the routers' differ: a key of its own)
            known["router_calls"] = own
        if not any(v for v in known.values()):
            return None
        return known

    def _cut_meta(self) -> dict[str, Any] | None:
        """Where these rows are a slice of a capture's: that capture's forwards and the rows the slice holds, as JSON
        for :meth:`save` (None otherwise, or where the capture or the slice ran more calls than :data:`_MAX_RUNS`, whose
        calls the file does not keep)."""
        if self._cut_from is None or self._call_rows is None or len(self._call_rows) > _MAX_RUNS:
            return None
        whole, start, end = self._cut_from
        if len(whole.call_rows) > _MAX_RUNS:
            return None
        calls = [[int(n), int(c)] for n, c in whole.call_rows]
        meta: dict[str, Any] = {"key": whole.key, "calls": calls, "start": int(start), "end": int(end)}
        if whole.prompt_kept is not None:  # (the mask of the tokens its prompt forward's routers saw, as bits)
            kept = whole.prompt_kept.reshape(-1).numpy().astype(bool)
            meta["kept"] = {
                "shape": [int(v) for v in whole.prompt_kept.shape],
                "bits": np.packbits(kept).tobytes().hex(),
            }
        return meta

    def _ensure_valid(self) -> None:
        """Run the per-row checks that ``validate=False`` skipped (once)."""
        if not self._validated:
            for name, d in zip(self._names, self._data, strict=True):
                if d.numel():
                    _check_row_sets(d.long(), name)
            self._validated = True

    # ------------------------------------------------------------------ compare
    def equal(self, other: Routes) -> bool:
        """True when both hold the same routers and identical rows."""
        return (
            isinstance(other, Routes)
            and self._names == other._names
            and self._experts == other._experts
            and all(torch.equal(a.long(), b.long()) for a, b in zip(self._data, other._data, strict=True))
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Routes) and self.equal(other)

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> None:
        """Routes are values: their own state is private (``_``-named); any other attribute set on them is refused,
        naming the call that returns routes of what was meant (``routes.token_ids = ids`` is
        ``routes.with_token_ids(ids)``), where it would otherwise be dropped (a property has no setter) or kept
        beside the routes without a word (a misspelt name, ``routes.token_id = ids``). A method may be wrapped on
        the instance (a spy or a mock of it)."""
        if not _set_own(self, name, value):
            raise _ReadOnlyError(f"Routes are values, and {name!r} cannot be set on them: {_instead(name)}")

    def __delattr__(self, name: str) -> None:
        """Routes are values: an attribute deleted from them is refused as one set on them is (a method wrapped on the
        instance may be taken off again)."""
        if not _del_own(self, name):
            raise _ReadOnlyError(f"Routes are values, and {name!r} cannot be deleted from them: {_instead(name)}")

    def __repr__(self) -> str:
        t = set(self.tokens_per_layer)
        k = set(self.k_per_layer)
        e = set(self._experts)

        def one(s: set[int]) -> str:
            return str(next(iter(s))) if len(s) == 1 else f"{min(s)}..{max(s)}"

        missing = self.__dict__.get("_missing_count")
        if missing is None:  # the rows never change: counted once
            missing = self.__dict__["_missing_count"] = sum(_missing_rows(d, self._validated) for d in self._data)
        return (
            f"Routes(tokens={one(t) if t else 0}, routers={self.num_layers}, k={one(k) if k else '-'}, "
            f"experts={one(e) if e else '-'}, missing_rows={missing}, nbytes={self.nbytes}"
            + ("" if self._token_ids is None else f", token_ids={int((self._token_ids >= 0).sum())} known")
            + ")"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.npz`` file (numpy arrays and JSON metadata, never pickle).

        The rows are checked first (those of routes built with ``validate=False`` too), so a file
        written here is one :meth:`load` reads back. The file keeps the token ids, and what a
        capture knows of its forwards (their rows, their prompt mask, moves of the KV cache's
        rows, the order of the tokens of rows whose routers saw them sequence-first, or that their
        order was not told, the forwards fed embeddings), which
        :func:`~moe_replay.split_generation` and :meth:`BatchLayout.unpack` read after :meth:`load`
        as before; and, for a slice of a capture, the capture's forwards it was cut from (with the
        mask of the tokens its prompt forward's routers saw, where it recorded one), so that slices
        saved apart (a capture written in chunks of rows, cut through a forward) and loaded again
        join with :meth:`cat` into the capture's forwards, as in memory.

        The file is written whole or not at all: it is written beside ``path`` first and moved
        there once complete, so a write that fails (a full disk, an interrupt) leaves a file that
        was at ``path`` as it was.

        Raises:
            RoutesValidationError: rows that :meth:`load` would refuse (a mixed ``-1`` row, duplicates).
            NotAFileError: ``path`` is a directory, or no regular file (a pipe, a device).
            MissingFileError: the folder of ``path`` does not exist.
        """
        _path(path, "save()")
        self._ensure_valid()
        if not os.fspath(path):  # (open("") fails with a bare FileNotFoundError naming no file)
            raise MissingFileError("cannot write routes to '': the path is empty; give a file name (routes.npz)")
        if os.path.isdir(path):
            raise NotAFileError(f"cannot write routes to {path}: it is a directory; give a file name (routes.npz)")
        if os.path.exists(path) and not os.path.isfile(path):
            raise NotAFileError(
                f"cannot write routes to {path}: it is no regular file (a pipe, a device, a socket); give a file name "
                "(routes.npz)"
            )
        folder = os.path.dirname(os.fspath(path))
        if folder and not os.path.isdir(folder):
            raise MissingFileError(
                f"cannot write routes to {path}: no folder {folder}"
                + (_file_in_the_way(path) or "; create it first" + _unexpanded(path))
            )
        name = os.path.basename(os.fspath(path))
        if len(os.fsencode(name)) > _name_max(folder):  # (open() would raise a bare OSError, "File name too long")
            raise InvalidArgumentError(
                f"cannot write routes to {path}: its file name is {len(os.fsencode(name))} bytes long, longer than the "
                f"{_name_max(folder)} this file system takes; give a shorter name"
            )
        meta = {
            "magic": _MAGIC,
            "format_version": FORMAT_VERSION,
            "names": list(self._names),
            "num_experts": list(self._experts),
            "fingerprint": self.fingerprint,
        }
        forwards = self._forwards_meta()
        if forwards is not None:
            meta["forwards"] = forwards
        if self._recorded_names is not None:  # (an optional key: a reader that does not know it reads the rest)
            meta["recorded_names"] = list(self._recorded_names)
        if self._ids_settings is not None:  # (the settings a remap of a router's ids read: a replay compares them)
            meta["ids_settings"] = {n: [list(p) for p in v] for n, v in self._ids_settings.items()}
        arrays: dict[str, Any] = {f"layer_{i}": d.numpy() for i, d in enumerate(self._data)}
        if self._token_ids is not None:
            arrays["token_ids"] = self._token_ids.numpy()
        if self._router_ids is not None:  # (each router's own, one after another)
            arrays["router_ids"] = torch.cat(self._router_ids).numpy()
        if self._ids_lost is not None:  # (an array: a reader that does not know it refuses the file, never drops it)
            arrays["ids_lost"] = np.frombuffer(self._ids_lost.encode(), dtype=np.uint8)
        if self._token_rank is not None:  # (rows of routers that saw their tokens sequence-first: their tokens' order)
            arrays["token_order"] = self._token_rank.numpy()
        if self._order_untold:  # (rows of forwards fed embeddings: in the order their routers saw them, not told)
            arrays["order_untold"] = np.array(True)
        if self._prompt_kept is not None:  # (a first forward's mask of the tokens its routers saw)
            arrays["prompt_kept"] = self._prompt_kept.numpy()
        if self._layout_pos is not None:  # (each row's place in the batch a BatchLayout laid it out for)
            arrays["layout_places"] = self._layout_pos.numpy()
        if self._seq_pos is not None:  # (each row's place in its sequence, as its forward gave it)
            arrays["token_places"] = self._seq_pos.numpy()
        if self._lineage is not None:  # (the rows back to the forward whose cache each row's forward went on from)
            arrays["token_lineage"] = self._lineage.numpy()
        mask = self._fed_mask
        if mask is not None and mask.numel() and (forwards is None or forwards["mask_runs"] is None):
            # (too many runs for the metadata: the padded sequences of a large rollout) one value per row, not dropped
            arrays["prompt_mask"] = mask.numpy()
        calls = self._call_rows
        if calls is not None and (forwards is None or forwards["calls"] is None):
            # (too many runs for the metadata: a capture of many forwards of changing sizes) an array, not dropped
            arrays["call_runs"] = np.asarray(calls, dtype=np.int64).reshape(-1, 2)
        if self._token_choices is not None:  # (which tokens a module let reach its routers: a replay compares them)
            meta["token_choices"] = {
                "paths": [path for path, _ in self._token_choices],
                "shapes": [list(idx.shape) for _, idx in self._token_choices],
                "dtypes": [dtype_code(idx) for _, idx in self._token_choices],
                "forwards": None if self._choice_forwards is None else list(self._choice_forwards),
            }
            flat = [idx.reshape(-1).to(torch.long) for _, idx in self._token_choices]
            arrays["token_choices"] = (torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)).numpy()
            places = self._choice_places
            if places is not None and len(places) == len(self._token_choices):
                # (where the routers stood at each ranking: an array, so a reader that does not know it refuses the
                # file rather than compare the rankings without it)
                arrays["token_choice_places"] = places_to_rows(places, self._names).numpy()
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _write_whole(os.fspath(path), lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, max_bytes: int | None = MAX_LOAD_BYTES) -> Routes:
        """Read a file written by :meth:`save`; every field is validated.

        The array headers are checked before anything is decompressed: a file that would
        take more than ``max_bytes`` bytes when decompressed, whose headers disagree with
        its contents or its stored fingerprint, or that holds arrays the format does not
        have, is refused without reading its data.

        Args:
            path: the ``.npz`` file.
            max_bytes: refuse files larger than this once decompressed (``None``: no limit).

        Raises:
            MissingFileError: no file at ``path`` (a ``FileNotFoundError``).
            NotAFileError: ``path`` is a directory, or no regular file (a pipe, a device); an
                ``IsADirectoryError``.
            RoutesValidationError: the file is not a routes file, is truncated or corrupted,
                is over ``max_bytes``, or has an unknown format version.
            InvalidArgumentError: ``max_bytes`` is not a byte count (2.5, "10", NaN) or None.
        """
        _path(path, "load()")
        if max_bytes is not None:  # (a NaN limit compares false: it would be no limit, without a word)
            max_bytes = check_count(max_bytes, "load(): max_bytes (a byte count, or None for no limit)")
        if not os.fspath(path):  # (it would be read as "cannot read routes from : no such file")
            raise MissingFileError(
                "cannot read routes from '': the path is empty; give the name of the file the routes were saved to "
                "(an unset variable or an empty config entry?)"
            )
        if os.path.isdir(path):
            raise NotAFileError(f"cannot read routes from {path}: it is a directory, not a routes file")
        if not os.path.exists(path):
            raise MissingFileError(
                f"cannot read routes from {path}: no such file"
                + (_file_in_the_way(path) or _unexpanded(path) or _named_otherwise(path))
            )
        if not stat.S_ISREG(os.stat(path).st_mode):  # (a pipe's open() would wait for a writer, for ever)
            raise NotAFileError(
                f"cannot read routes from {path}: it is not a regular file (a pipe, a device or a socket), and a "
                "routes file is read by seeking in it; write the routes to a file first and load that"
            )
        # (opened apart: a file that cannot be opened, unreadable to this user, raises the OS's own error naming it,
        # never "truncated or corrupted")
        file = open(path, "rb")
        try:
            # (read in place: only the zip directory, the headers and the members named, never the whole file, so a
            # large file that is no routes file, a checkpoint given by mistake, is refused without being read)
            with file as f, zipfile.ZipFile(f) as zf:
                meta, layers, ids, mask, rank, untold, extra = _read_members(zf, path, max_bytes)
        except RoutesValidationError:
            raise
        except _READ_ERRORS as e:
            held = _other_file(path) if isinstance(e, zipfile.BadZipFile) else None
            if held is not None:
                raise RoutesValidationError(f"cannot read routes from {path}: {held}") from e
            raise RoutesValidationError(
                f"cannot read routes from {path}: the file is truncated or corrupted ({type(e).__name__}: {e})"
            ) from e
        try:
            names, experts = _read_meta(meta, path)
            routes = cls(layers, names=names, num_experts=experts)
            if ids is not None:
                routes._token_ids = _ids(ids, routes, "its token_ids")
            _read_forwards(routes, meta.get("forwards"), path)
            _read_call_runs(routes, extra.get("call_runs"), path)
            _read_router_ids(routes, extra, path)  # (after the forwards: a prompt's kept tokens are of the first)
            recorded = meta.get("recorded_names")
            if recorded is not None:
                if not isinstance(recorded, list) or not all(isinstance(n, str) for n in recorded):
                    raise _corrupted(path, "the router names it was recorded on are not a list of strings")
                routes._recorded_names = tuple(recorded)
            settings = meta.get("ids_settings")
            if settings is not None:
                routes._ids_settings = _read_ids_settings(settings, path)
            if mask is not None:
                if len(set(routes.tokens_per_layer)) != 1 or mask.shape != (routes.num_tokens,):
                    raise _corrupted(path, f"its prompt mask holds {mask.numel()} values for {routes.num_tokens} rows")
                if not bool(((mask >= -1) & (mask <= 1)).all()):
                    raise _corrupted(path, "its prompt mask holds values other than -1, 0 and 1")
                routes._fed_mask = mask.to(torch.int8)
            if rank is not None:
                if len(set(routes.tokens_per_layer)) != 1 or rank.shape != (routes.num_tokens,):
                    raise _corrupted(path, f"its token order holds {rank.numel()} values for {routes.num_tokens} rows")
                known = rank[rank >= 0]
                if bool((rank < UNTOLD_RANK).any()) or known.unique().numel() != known.numel():
                    raise _corrupted(path, f"its token order holds values below {UNTOLD_RANK} or the same place twice")
                routes._token_rank = _out_of_order(rank.to(torch.long))
            if untold is not None:
                if rank is not None and not bool((rank == UNTOLD_RANK).all()):
                    raise _corrupted(path, "it holds its tokens' order and says that the order was not told")
                routes._order_untold = bool(untold)
            places = extra.get("layout_places")
            if places is not None:
                if len(set(routes.tokens_per_layer)) != 1 or places.shape != (routes.num_tokens,):
                    held = f"{places.numel()} values for {routes.num_tokens} rows"
                    raise _corrupted(path, f"its layout places hold {held}")
                if bool((places < -2).any()):
                    raise _corrupted(path, "its layout places hold values below -2")
                routes._layout_pos = places.to(torch.long)
            places = extra.get("token_places")
            if places is not None:
                if len(set(routes.tokens_per_layer)) != 1 or places.shape != (routes.num_tokens,):
                    held = f"{places.numel()} values for {routes.num_tokens} rows"
                    raise _corrupted(path, f"its token places hold {held}")
                routes._seq_pos = places.to(torch.long).clone()
            lineage = extra.get("token_lineage")
            if lineage is not None:
                if len(set(routes.tokens_per_layer)) != 1 or lineage.shape != (routes.num_tokens,):
                    held = f"{lineage.numel()} values for {routes.num_tokens} rows"
                    raise _corrupted(path, f"its token lineage holds {held}")
                if bool((lineage < 0).any()):
                    raise _corrupted(path, "its token lineage holds values below 0")
                routes._lineage = _cut_lineage(lineage.to(torch.long).clone())
            if "token_choices" in meta or "token_choices" in extra:
                record = read_choices(meta.get("token_choices"), extra.get("token_choices"))
                if isinstance(record, str):
                    raise _corrupted(path, record)
                routes._token_choices, routes._choice_forwards = record
            _read_choice_places(routes, extra.get("token_choice_places"), path)
        except RoutesValidationError as e:  # (named once: a field's own check may have named the file already)
            raise RoutesValidationError(str(e) if os.fspath(path) in str(e) else f"{path}: {e}") from e
        except (ArgumentTypeError, TypeError, ValueError, OverflowError) as e:  # fields of the wrong kind
            raise _corrupted(path, f"{type(e).__name__}: {e}") from e
        if meta.get("fingerprint") not in (None, routes.fingerprint):
            raise RoutesValidationError(f"{path}: the stored fingerprint does not match its contents (corrupted)")
        return routes


def _missing_rows(rows: torch.Tensor, whole: bool) -> int:
    """How many of one router's ``[T, k]`` host rows are all -1, read fast enough for a repr.

    A -1 row starts with -1; in validated rows (``whole``) every row that starts with -1 is
    one, so one column is read: 48 routers of a million tokens count in a fraction of a second.
    """
    if not rows.numel():
        return 0
    host = rows.detach().cpu().numpy()
    if int(host[:, 0].min()) >= 0:
        return 0
    first = host[:, 0] < 0
    if whole:
        return int(np.count_nonzero(first))
    return int(np.count_nonzero((host[first] < 0).all(axis=1)))


def reorder_hint(part: Routes, first: Routes, i: int, what: str = "part") -> str:
    """What to do when ``part`` (number ``i``) holds the routers of ``first`` in another order ("" when not)."""
    if set(part.names) != set(first.names):
        from .session import _prefix_maps  # (session builds on routes)

        fits = _prefix_maps(part.names, first.names) if len(part.names) == len(first.names) else []
        if not fits:
            return ""
        ways = " or ".join(f".rename({{{old!r}: {new!r}}})" for (old, new), _ in fits[:3])
        return (
            f": where these are the same routers under other module names (a model wrapped by DDP, torch.compile or "
            f"PEFT), rename {what} {i} to the names of {what} 0 first with {ways}"
        )
    if part.names == first.names:
        return ""
    return f": the same routers in another order; reorder {what} {i} with .select() and the names of {what} 0"


#: what a setting reads as in routes joined from parts captured under different values of it
SETTING_DIFFERS = "(different in the routes joined)"


def _joined_settings(parts: Sequence[Routes]) -> dict[str, tuple[tuple[str, str], ...]] | None:
    """The settings each router's rows of ``parts`` were captured under (see ``Routes._ids_settings``), joined: a
    setting the parts hold different values of reads :data:`SETTING_DIFFERS` (no replay runs under both)."""
    held = [p._ids_settings for p in parts if p._ids_settings]
    if not held:
        return None
    out: dict[str, dict[str, str]] = {}
    for one in held:
        for name, pairs in one.items():
            into = out.get(name)
            if into is None:
                out[name] = dict(pairs)
                continue
            for key, value in pairs:
                if into.get(key, value) != value:
                    into[key] = SETTING_DIFFERS
                else:
                    into[key] = value
    return {name: tuple(sorted(pairs.items())) for name, pairs in out.items()}


def _read_ids_settings(value: Any, path: str | os.PathLike[str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """The settings a file keeps per router (see ``Routes._ids_settings``), checked."""
    if not isinstance(value, dict) or not all(
        isinstance(n, str)
        and isinstance(pairs, list)
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)
        for n, pairs in value.items()
    ):
        raise _corrupted(path, "the settings its routers were captured under are not lists of [name, value] strings")
    return {n: tuple((k, v) for k, v in pairs) for n, pairs in value.items()}


def _unique_keys(pairs: list[tuple[str, Any]], twice: list[str]) -> dict[str, Any]:
    """A JSON object of the metadata, its keys named more than once added to ``twice``: :meth:`Routes.save` never
    writes one, and ``json`` alone keeps the last silently (an edited file's second ``"names"`` read over the first).
    """
    keys = [k for k, _ in pairs]
    twice.extend(sorted({k for k in keys if keys.count(k) > 1}))
    return dict(pairs)


def _header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str | os.PathLike[str]
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one ``.npy`` member, read from its header; its size must match them."""
    with zf.open(info) as f:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npformat.read_array_header_2_0(f)
        else:
            raise _corrupted(path, f"array {info.filename} has .npy version {version}")
        start = f.tell()
    if dtype.hasobject:
        raise _corrupted(path, f"array {info.filename} holds Python objects")
    size = start + math.prod(shape) * dtype.itemsize
    if size != info.file_size:
        raise _corrupted(path, f"array {info.filename} declares {size} bytes but holds {info.file_size}")
    return tuple(int(d) for d in shape), dtype


#: The call that gives routes of what setting each public attribute of theirs would have meant.
_SETTERS = {
    "token_ids": "routes.with_token_ids(ids) returns the same routes recorded for those tokens (None drops them)",
    "names": "routes.rename({old_prefix: new_prefix}) returns them under other router names",
    "num_experts": "build routes of other expert counts: mr.Routes(list(routes.per_layer()), names=routes.names, "
    "num_experts=...)",
    "indices": "build routes of other rows: mr.Routes.from_numpy(array, names=routes.names, "
    "num_experts=routes.experts_per_layer)",
}
_SETTERS["experts_per_layer"] = _SETTERS["num_experts"]


def _instead(name: str) -> str:
    """What to call instead of setting the attribute ``name`` on routes."""
    if name in _SETTERS:
        return _SETTERS[name]
    if isinstance(getattr(Routes, name, None), property):
        return f"it is read from their rows; build new routes ({_SETTERS['indices']})"
    held = sorted(n for n in dir(Routes) if not n.startswith("_") and isinstance(getattr(Routes, n), property))
    return (
        f"Routes have no attribute {name!r} (a misspelt one? theirs: {', '.join(held)}); keep your own data beside "
        "the routes (a dict or a dataclass holding them)"
    )


#: What ``Routes.save`` writes, said where a file of another writer is refused.
_SAVED_BY = (
    "Routes.save writes an archive that holds the router names and expert counts beside each router's rows, which "
    "Routes.load reads"
)


def _other_file(path: str | os.PathLike[str]) -> str | None:
    """What the file at ``path``, no zip archive, holds where its first bytes tell a writer other than
    :meth:`Routes.save` (one ``.npy`` array, a pickle), and how to read it; None where they tell none."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    if head == b"\x93NUMPY":
        return (
            f"it holds one numpy array (as np.save writes it), not a moe_replay routes file ({_SAVED_BY}). Read "
            "the array and say what it holds: Routes.from_numpy(np.load(path), names=[...], num_experts=...) for a "
            "[tokens, routers, k] array"
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # (a pickle's PROTO opcode, protocols 2 to 5)
        return (
            "it is a Python pickle (as pickle.dump, or torch.save with _use_new_zipfile_serialization=False, writes "
            f"one), not a moe_replay routes file ({_SAVED_BY}). Only if you trust the file: read it with "
            "pickle.load or torch.load(path, weights_only=False), then save the routes it holds with routes.save(path)"
        )
    return None


def _other_archive(infos: Mapping[str, zipfile.ZipInfo]) -> str:
    """What a zip archive of the members ``infos`` holds where it is no routes file (no metadata), and how to read
    it: torch.save's, an ``.npz`` of arrays as ``np.savez`` writes it, or another archive."""
    names = sorted(infos)
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return (
            f"it is a torch.save archive (of routes, or a checkpoint), not a moe_replay routes file ({_SAVED_BY}). "
            "Only if you trust the file: read it with torch.load(path, weights_only=False), then save the routes it "
            "holds with routes.save(path)"
        )
    if names and all(n.endswith(".npy") for n in names):
        arrays = [n[: -len(".npy")] for n in names]
        return (
            f"it holds the numpy arrays {arrays[:4]}{'...' if len(arrays) > 4 else ''} (as np.savez writes them), "
            f"not a moe_replay routes file ({_SAVED_BY}). Read the array and say what it holds: "
            f"Routes.from_numpy(np.load(path)[{arrays[0]!r}], names=[...], num_experts=...) for a "
            "[tokens, routers, k] array"
        )
    shown = names[:4]
    return (
        f"it is a zip archive of {len(names)} members ({shown}{'...' if len(names) > 4 else ''}) with no "
        f"'{_MAGIC}' metadata, not a moe_replay routes file ({_SAVED_BY})"
    )


def _corrupted(path: str | os.PathLike[str], why: str) -> RoutesValidationError:
    return RoutesValidationError(f"cannot read routes from {path}: the file is truncated or corrupted ({why})")


def _read_members(
    zf: zipfile.ZipFile, path: str | os.PathLike[str], max_bytes: int | None
) -> tuple[
    dict[str, Any],
    list[torch.Tensor],
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
    bool | None,
    dict[str, torch.Tensor],
]:
    """The metadata, layer arrays, token ids, prompt mask, token order and whether that order was left untold (each
    if saved) of a routes ``.npz``, each checked before decompressing; last, each router's own token ids and why
    the ids were lost, by name (where saved)."""
    infos = {i.filename: i for i in zf.infolist()}
    total = sum(i.file_size for i in infos.values())
    if max_bytes is not None and total > max_bytes:
        raise RoutesValidationError(
            f"{path} would take {total} bytes once decompressed, more than max_bytes={max_bytes}; "
            "if the file is trusted, load it with a larger max_bytes (or max_bytes=None)"
        )
    meta_info = infos.get("meta.npy")
    if meta_info is None:
        raise RoutesValidationError(f"cannot read routes from {path}: {_other_archive(infos)}")
    shape, dtype = _header(zf, meta_info, path)
    if len(shape) != 1 or dtype != np.uint8 or meta_info.file_size > _MAX_META_BYTES:
        raise RoutesValidationError(f"{path} is not a moe_replay routes file (its metadata is not short JSON)")
    with zf.open(meta_info) as f:
        twice: list[str] = []
        meta = json.loads(
            bytes(npformat.read_array(f, allow_pickle=False)).decode(),
            object_pairs_hook=lambda pairs: _unique_keys(pairs, twice),
        )
    if twice:
        raise _corrupted(path, f"its metadata names the key {twice[0]!r} twice")
    names, experts = _read_meta(meta, path)
    wanted = ["meta.npy", *(f"layer_{i}.npy" for i in range(len(names)))]
    optional = [
        "token_ids.npy",
        "prompt_mask.npy",
        "token_order.npy",
        "order_untold.npy",
        "router_ids.npy",
        "ids_lost.npy",
        "prompt_kept.npy",
        "layout_places.npy",
        "token_places.npy",
        "token_lineage.npy",
        "call_runs.npy",
        "token_choices.npy",
        "token_choice_places.npy",
    ]
    extra = sorted(set(infos) - set(wanted) - set(optional))
    if extra:
        raise RoutesValidationError(
            f"{path} holds arrays that a routes file of {len(names)} routers does not have: "
            f"{[n.removesuffix('.npy') for n in extra[:5]]}" + (" ..." if len(extra) > 5 else "") + " (corrupted, "
            "or written by something else)"
        )
    missing = [n.removesuffix(".npy") for n in wanted if n not in infos]
    if missing:
        raise RoutesValidationError(f"{path} has no array {missing[0]} (truncated or corrupted)")
    headers = [_header(zf, infos[n], path) for n in wanted[1:]]
    if meta.get("fingerprint") is not None and all(len(s) == 2 for s, _ in headers):
        if meta["fingerprint"] != fingerprint(names, experts, [s[1] for s, _ in headers]):
            raise RoutesValidationError(f"{path}: the stored fingerprint does not match its contents (corrupted)")
    if "token_ids.npy" in infos:
        shape, dtype = _header(zf, infos["token_ids.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its token_ids are a {dtype} array of shape {shape}, not one int per row")
    if "prompt_mask.npy" in infos:
        shape, dtype = _header(zf, infos["prompt_mask.npy"], path)
        if len(shape) != 1 or dtype != np.int8:
            raise _corrupted(path, f"its prompt mask is a {dtype} array of shape {shape}, not one int8 per row")
    if "token_order.npy" in infos:
        shape, dtype = _header(zf, infos["token_order.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its token order is a {dtype} array of shape {shape}, not one int per row")
    if "order_untold.npy" in infos:
        shape, dtype = _header(zf, infos["order_untold.npy"], path)
        if shape != () or dtype != np.bool_:
            raise _corrupted(path, f"its untold token order is a {dtype} array of shape {shape}, not one bool")
    if "router_ids.npy" in infos:
        shape, dtype = _header(zf, infos["router_ids.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its routers' token ids are a {dtype} array of shape {shape}, not one int per row")
    if "ids_lost.npy" in infos:
        shape, dtype = _header(zf, infos["ids_lost.npy"], path)
        if len(shape) != 1 or dtype != np.uint8:
            raise _corrupted(path, f"its lost token ids are a {dtype} array of shape {shape}, not text")
    if "prompt_kept.npy" in infos:
        shape, dtype = _header(zf, infos["prompt_kept.npy"], path)
        if len(shape) != 2 or dtype != np.bool_:
            raise _corrupted(path, f"its prompt's kept tokens are a {dtype} array of shape {shape}, not a bool grid")
    if "layout_places.npy" in infos:
        shape, dtype = _header(zf, infos["layout_places.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its layout places are a {dtype} array of shape {shape}, not one int per row")
    if "token_places.npy" in infos:
        shape, dtype = _header(zf, infos["token_places.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its token places are a {dtype} array of shape {shape}, not one int per row")
    if "token_lineage.npy" in infos:
        shape, dtype = _header(zf, infos["token_lineage.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its token lineage is a {dtype} array of shape {shape}, not one int per row")
    if "call_runs.npy" in infos:
        shape, dtype = _header(zf, infos["call_runs.npy"], path)
        if len(shape) != 2 or shape[1] != 2 or dtype.kind != "i":
            raise _corrupted(path, f"its forwards' calls are a {dtype} array of shape {shape}, not [rows, calls] pairs")
    if "token_choices.npy" in infos:
        shape, dtype = _header(zf, infos["token_choices.npy"], path)
        if len(shape) != 1 or dtype.kind != "i":
            raise _corrupted(path, f"its record of chosen tokens is a {dtype} array of shape {shape}, not one list")
    if "token_choice_places.npy" in infos:
        shape, dtype = _header(zf, infos["token_choice_places.npy"], path)
        if len(shape) != 2 or shape[1] != len(names) or dtype.kind != "i":
            raise _corrupted(
                path,
                f"its routers' rows at each chosen token set are a {dtype} array of shape {shape}, not one row "
                f"of {len(names)} ints per ranking",
            )
    layers = []
    held = [n for n in optional if n in infos]
    for n in wanted[1:] + held:
        with zf.open(infos[n]) as f:
            layers.append(torch.from_numpy(_native(npformat.read_array(f, allow_pickle=False))))
    found = dict(zip(held, layers[len(wanted) - 1 :], strict=True))
    del layers[len(wanted) - 1 :]
    untold = found.get("order_untold.npy")
    return (
        meta,
        layers,
        found.get("token_ids.npy"),
        found.get("prompt_mask.npy"),
        found.get("token_order.npy"),
        None if untold is None else bool(untold),
        {
            n.removesuffix(".npy"): found[n]
            for n in (
                "router_ids.npy",
                "ids_lost.npy",
                "prompt_kept.npy",
                "layout_places.npy",
                "token_places.npy",
                "token_lineage.npy",
                "call_runs.npy",
                "token_choices.npy",
                "token_choice_places.npy",
            )
            if n in found
        },
    )


def _read_choice_places(routes: Routes, rows: torch.Tensor | None, path: str | os.PathLike[str]) -> None:
    """Where the routers stood in their rows at each ranking of the record, read from a file into ``routes`` (see
    ``load``; a file without it, written before it was kept, tells none: the rankings are compared without it)."""
    if rows is None:
        return
    choices = routes._token_choices
    if choices is None:
        raise _corrupted(path, "it holds the routers' rows at chosen token sets, and no record of those choices")
    if rows.shape != (len(choices), routes.num_layers):
        raise _corrupted(
            path,
            f"its routers' rows at each chosen token set are of shape {tuple(rows.shape)}, not one row of "
            f"{routes.num_layers} per each of its {len(choices)} rankings",
        )
    held = torch.tensor(routes.tokens_per_layer, dtype=torch.long)
    if bool((rows < -1).any()) or bool((rows > held).any()):
        raise _corrupted(path, "its routers' rows at a chosen token set lie outside the rows those routers hold")
    routes._choice_places = places_from_rows(rows.to(torch.long), routes.names)


def _read_router_ids(routes: Routes, extra: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Each router's own token ids and why the ids were lost, read from a file into ``routes`` (see ``load``)."""
    flat = extra.get("router_ids")
    if flat is not None:
        if flat.numel() != sum(routes.tokens_per_layer):
            raise _corrupted(
                path, f"its routers' token ids hold {flat.numel()} values for {sum(routes.tokens_per_layer)} rows"
            )
        if bool((flat < LOST_ID).any()):
            raise _corrupted(path, f"its routers' token ids hold values below {LOST_ID}")
        if bool((flat == LOST_ID).any()) and extra.get("ids_lost") is None:
            raise _corrupted(path, "its routers' token ids say some were lost, and it does not say why")
        routes._router_ids = tuple(p.to(torch.long).clone() for p in flat.split(list(routes.tokens_per_layer)))
    kept = extra.get("prompt_kept")
    if kept is not None:
        calls = routes._call_rows
        if not calls or int(kept.sum()) != calls[0][0]:
            raise _corrupted(path, "its prompt's kept tokens are not as many as the rows of its first forward")
        routes._prompt_kept = kept.to(torch.bool).clone()
    lost = extra.get("ids_lost")
    if lost is not None:
        routes._ids_lost = bytes(lost.to(torch.uint8).tolist()).decode(errors="replace") or "not told"


#: What reading a damaged ``.npz`` can raise: zip structure, deflate stream, npy header, JSON.
_READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,  # zipfile: a flag or method that a flipped bit turned on
    RuntimeError,  # zipfile: a flipped bit that turned on the "encrypted" flag ("password required")
    UnicodeError,
    TypeError,  # an array of a kind torch does not take (str, datetime64)
    OverflowError,
    RecursionError,  # JSON nested past the interpreter's depth
)


def _int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _cut_lineage(lineage: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """``lineage`` (``Routes._lineage``) with 0 (not known) where it reaches back past the first row, each row at
    ``rows`` (its own index where None): the forward it names is not among the rows. None where no row's is known."""
    at = torch.arange(lineage.numel()) if rows is None else rows
    cut = torch.where(lineage <= at, lineage, 0)
    return cut if bool(cut.any()) else None


def _token_rows(index: Any, n: int) -> slice | torch.Tensor:
    """``index`` of :meth:`Routes.__getitem__` as rows of ``n`` tokens: a slice of positive step, or a 1-D
    ``int64`` tensor of positions in range (a boolean mask of ``n`` becomes its positions)."""
    if _is_integer(index):
        i = operator.index(index)
        if not -n <= i < n:
            raise TokenIndexError(f"token index {i} is out of range for routes of {n} tokens")
        i %= n
        return slice(i, i + 1)
    if isinstance(index, slice):
        for part in (index.start, index.stop, index.step):
            if part is not None and not _is_integer(part):
                raise ArgumentTypeError(f"a token slice takes integers, got {index!r}")
        if index.step is not None and operator.index(index.step) <= 0:
            raise TokenIndexError(
                f"a token slice needs a positive step, got {index!r}; to reverse, index with a list: "
                "routes[list(range(n - 1, -1, -1))]"
            )
        parts = [None if p is None else operator.index(p) for p in (index.start, index.stop, index.step)]
        start, stop, step = slice(*parts).indices(n)  # (bounds past int64 are clamped to the tokens, as Python does)
        return slice(start, max(start, stop), min(step, max(n, 1)))  # (a step past the tokens takes the first only)
    if isinstance(index, tuple):  # routes[0, 1]: one index per dimension in numpy's reading, not two tokens
        raise ArgumentTypeError(
            f"routes[...] indexes tokens only, got {len(index)} indices {index!r:.60}: pass token positions as a "
            "list (routes[[0, 1]]), and pick routers with routes.select([...]) or routes.layer(name)"
        )
    if isinstance(index, range):  # (positions, as a list of them: routes[range(a, b, -1)] reverses)
        index = list(index)
    if isinstance(index, torch.Tensor) and index.dtype == torch.uint8:
        raise ArgumentTypeError(
            f"a torch.uint8 tensor of {index.numel()} entries is ambiguous as token indices: torch indexes with it as "
            "a mask, numpy as positions. Pass index.bool() for a mask or index.long() for positions"
        )
    if isinstance(index, np.ndarray | list | torch.Tensor):
        check_values(index, "the token index")
        if isinstance(index, np.ndarray) and index.dtype == np.uint64 and index.size and int(index.max()) >= n:
            raise TokenIndexError(f"token index {int(index.max())} is out of range for routes of {n} tokens")
        if (
            isinstance(index, list)
            and any(isinstance(i, bool | np.bool_) for i in index)
            and not all(isinstance(i, bool | np.bool_) for i in index)
        ):
            raise ArgumentTypeError(
                f"token indices mix bools and integers ({index!r:.60}): numpy would read True as position 1. Pass "
                "positions (ints) or a boolean mask with one entry per token"
            )
        try:
            rows = as_tensor(index if isinstance(index, torch.Tensor) else np.asarray(index))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ArgumentTypeError(f"token indices must be integers or a boolean mask, got {index!r}") from e
        if rows.device.type == "meta":
            raise ArgumentTypeError("token indices on the meta device hold no values; pass them on the host")
        rows = rows.detach().cpu()  # routes live on the host: a mask or positions on an accelerator are read here
        if rows.dim() != 1:
            raise TokenIndexError(f"token indices must be 1-D (one entry per token), got shape {tuple(rows.shape)}")
        if rows.dtype == torch.bool:
            if rows.numel() != n:
                raise TokenIndexError(f"a boolean token mask must have one entry per token ({n}), got {rows.numel()}")
            return rows.nonzero().flatten()
        if rows.numel() == 0 and (isinstance(index, list) or _int_dtype(rows.dtype)):
            return rows.long()  # (an empty list is no rows, whatever dtype numpy gives it; an empty float array is not)
        if not _int_dtype(rows.dtype):
            raise ArgumentTypeError(f"token indices must be integers or a boolean mask, got dtype {rows.dtype}")
        rows = rows.long()
        if n > 2 and rows.numel() == n and int(rows.min()) >= 0 and int(rows.max()) <= 1:
            # (n positions that are all 0 or 1 repeat tokens 0 and 1: an int attention mask, read as positions)
            raise ArgumentTypeError(
                f"token indices of one 0 or 1 per token ({index!r:.60}) look like an integer mask (an attention mask) "
                "and would be read as positions, repeating tokens 0 and 1: pass mask.bool() to select the tokens "
                "it marks, or token positions"
            )
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.numel():
            raise TokenIndexError(f"token index {int(bad[0])} is out of range for routes of {n} tokens")
        return rows % max(n, 1)
    raise ArgumentTypeError(
        f"routes[...] takes an integer, a slice, a list or tensor of token positions, or a boolean mask, got "
        f"{type(index).__name__} {index!r}"
    )


def _run_start(rows: slice | torch.Tensor, n: int) -> int | None:
    """The first of ``rows`` (of :func:`_token_rows`) where they are consecutive rows in order, else None."""
    if isinstance(rows, slice):
        return rows.start if rows.step in (None, 1) or len(range(rows.start, rows.stop, rows.step)) <= 1 else None
    if rows.numel() == 0:
        return 0
    first = int(rows[0])
    return first if torch.equal(rows, torch.arange(first, first + rows.numel())) else None


class _Forwards:
    """What a capture knew of its forwards (its rows per call, its prompt mask), shared by the slices cut from it.

    ``key`` names it in files and pickles: slices of one capture saved, pickled or copied apart and read again share
    one object (:data:`_FORWARDS_BY_KEY`), so that they join as in memory (see :func:`_rejoined`)."""

    __slots__ = ("__weakref__", "call_rows", "forward_calls", "key", "lineage", "prompt_kept")

    def __init__(
        self, call_rows: tuple[tuple[int, int], ...], prompt_kept: torch.Tensor | None, key: str | None = None
    ) -> None:
        self.call_rows, self.prompt_kept = call_rows, prompt_kept
        #: the router calls each forward made (``Routes._forward_calls``), where known (in memory only)
        self.forward_calls: tuple[int, ...] | None = None
        #: the whole capture's lineage (``Routes._lineage``), where known (in memory only): a replay block of a slice
        #: compares a cache the block before it built by it (``FeedCheck._check_lineage``), as the slice's own cuts it
        self.lineage: torch.Tensor | None = None
        self.key = uuid.uuid4().hex if key is None else key
        _FORWARDS_BY_KEY[self.key] = self

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled and copied by its key (a slice sent to another process, or deep-copied, joins its capture's)."""
        return (_loaded_forwards, (self.key, self.call_rows, self.prompt_kept))


#: Every :class:`_Forwards` alive, by its key: the slices of one capture read from files find their capture's.
_FORWARDS_BY_KEY: weakref.WeakValueDictionary[str, _Forwards] = weakref.WeakValueDictionary()


def _loaded_forwards(
    key: str, call_rows: tuple[tuple[int, int], ...], prompt_kept: torch.Tensor | None = None
) -> _Forwards:
    """The forwards of the capture named ``key`` (see :class:`_Forwards`), as a slice read from a file or a pickle
    holds them: the object of the slices of that capture already in memory where it holds the same calls, a new one
    otherwise (one that names other calls under that key is no slice of the same capture: it joins none of them)."""
    held = _FORWARDS_BY_KEY.get(key)
    if held is not None:
        return held if held.call_rows == call_rows else _Forwards(call_rows, prompt_kept, uuid.uuid4().hex)
    return _Forwards(call_rows, prompt_kept, key)


def _clip_calls(call_rows: tuple[tuple[int, int], ...], start: int, end: int) -> tuple[tuple[int, int], ...]:
    """The (rows, calls) runs of the calls of ``call_rows`` that rows ``start:end`` hold: each call the rows of it
    held there (a call cut through is a call of its held rows)."""
    at = 0
    runs: list[tuple[int, int]] = []
    for rows, count in call_rows:
        for _ in range(count):
            held = max(0, min(end, at + rows) - max(start, at))
            at += rows
            if not held:
                continue
            if runs and runs[-1][0] == held:
                runs[-1] = (held, runs[-1][1] + 1)
            else:
                runs.append((held, 1))
    return tuple(runs)


class _Rejoined:
    """The forwards of slices of one capture's rows that meet again, as one slice of its rows ``start:end`` holds
    them (what ``Routes._cat_forwards`` reads of a part)."""

    __slots__ = ("_call_rows", "_cut_from", "_forward_calls", "_prompt_kept")

    def __init__(self, whole: _Forwards, start: int, end: int) -> None:
        self._call_rows = _clip_calls(whole.call_rows, start, end)
        self._forward_calls = _whole_calls_of((whole, start, end))
        first = whole.call_rows[0][0] if whole.call_rows else 0
        self._prompt_kept = whole.prompt_kept if start == 0 and end >= first else None
        self._cut_from = (whole, start, end)


def _whole_calls_of(cut: tuple[_Forwards, int, int] | None) -> tuple[int, ...] | None:
    """The router calls each forward made (``Routes._forward_calls``) that rows ``start:end`` of a capture hold
    (``cut``: its forwards, start, end): each forward they hold whole, its calls; one they cut through, one call of the
    rows they hold where it made one call; where it made several (those rows hold parts of several calls, on other
    tokens each), the calls of it they hold, negated: no forward of a replay may read them (see ``_CapturedCalls``).
    None where the capture's calls are not known."""
    if cut is None:
        return None
    whole, start, end = cut
    if whole.forward_calls is None:
        return None
    return _calls_held(whole.call_rows, whole.forward_calls, start, end)


def _calls_held(
    call_rows: tuple[tuple[int, int], ...], forward_calls: tuple[int, ...], start: int, end: int
) -> tuple[int, ...]:
    """The router calls each forward made that rows ``start:end`` of routes whose calls were ``call_rows`` and
    ``forward_calls`` hold (see :func:`_whole_calls_of`)."""
    sizes = [n for n, c in call_rows for _ in range(c)]
    out: list[int] = []
    at = call = 0
    for calls in forward_calls:
        made = abs(calls)  # (a forward already cut through: negated, see above)
        rows = sum(sizes[call : call + made])
        lo, hi = max(start, at), min(end, at + rows)
        if made and hi > lo:
            if lo == at and hi == at + rows:
                out.append(calls)
            elif calls == 1:
                out.append(1)
            else:  # (the calls of it whose rows the slice holds, each cut through or whole)
                edges = [at + sum(sizes[call : call + i]) for i in range(made + 1)]
                out.append(-sum(1 for i in range(made) if edges[i] < hi and edges[i + 1] > lo))
        at, call = at + rows, call + made
    return tuple(out)


def _cut_calls(calls: _RouterCalls, start: int, end: int) -> _RouterCalls:
    """One router's own calls (``Routes._router_calls``) that its rows ``start:end`` hold: each call the rows of it
    held there, each forward the calls of it held (negated where a forward of several calls is cut through, see
    :func:`_whole_calls_of`)."""
    call_rows, forward_calls = calls
    return _clip_calls(call_rows, start, end), _calls_held(call_rows, forward_calls, start, end)


def _cat_router_calls(
    parts: Sequence[Routes],
) -> tuple[tuple[_RouterCalls | None, ...] | None, tuple[tuple[_RouterCalls, int, int] | None, ...] | None]:
    """Each router's own calls (``Routes._router_calls``) of ``parts`` joined by :meth:`Routes.cat`, one part's after
    another's: a part whose routers all made the same calls gives each of them those (``_call_rows`` and
    ``_forward_calls``); a router whose calls a part does not know, None. None where no part keeps its routers' own
    (routes whose routers all made the same calls keep them in ``_call_rows`` alone, as before) or no router's are
    known. Consecutive parts whose rows of a router are consecutive slices of the same calls (``Routes._router_cut``:
    a forward of several calls cut through, joined again) give the calls of the rows they make up together: a forward
    whole again is whole. Also where each router's rows of the whole were cut from, where they are one such slice."""
    if all(p._router_calls is None for p in parts):
        return None, None
    out: list[_RouterCalls | None] = []
    cuts: list[tuple[_RouterCalls, int, int] | None] = []
    for j in range(parts[0].num_layers):
        pieces: list[tuple[_RouterCalls, tuple[_RouterCalls, int, int] | None]] = []
        for p in parts:
            own = p._router_calls[j] if p._router_calls is not None else None
            if own is None and p._call_rows is not None and p._forward_calls is not None:
                own = (p._call_rows, p._forward_calls)
            if own is None and not p._data[j].shape[0]:
                continue  # (a part of no rows: no calls)
            if own is None:
                break
            cut = p._router_cut[j] if p._router_cut is not None else None
            last = pieces[-1][1] if pieces else None
            if cut is not None and last is not None and cut[0] is last[0] and cut[1] == last[2]:
                joined = (cut[0], last[1], cut[2])  # (the slice before it goes on in it: one slice of both)
                pieces[-1] = (_cut_calls(cut[0], joined[1], joined[2]), joined)
            else:
                pieces.append((own, cut))
        else:
            runs: list[tuple[int, int]] = []
            forwards: list[int] = []
            for own, _ in pieces:
                for rows, count in own[0]:
                    if runs and runs[-1][0] == rows:
                        runs[-1] = (rows, runs[-1][1] + count)
                    else:
                        runs.append((rows, count))
                forwards.extend(own[1])
            out.append((tuple(runs), tuple(forwards)))
            cuts.append(pieces[0][1] if len(pieces) == 1 else None)
            continue
        out.append(None)
        cuts.append(None)
    if not any(c is not None for c in out):
        return None, None
    return tuple(out), (tuple(cuts) if any(c is not None for c in cuts) else None)


def _router_calls_meta(each: tuple[_RouterCalls | None, ...] | None) -> list[Any] | None:
    """``Routes._router_calls`` as JSON for a file: for each router, None or ``[runs, forward runs]`` (see
    :func:`_calls_runs`); a router of more runs than :data:`_MAX_RUNS` is None. None where none is known."""
    if each is None:
        return None
    out: list[Any] = []
    for calls in each:
        runs = None if calls is None or len(calls[0]) > _MAX_RUNS else _calls_runs(calls[1])
        out.append(None if calls is None or runs is None else [[[int(n), int(c)] for n, c in calls[0]], runs])
    return out if any(c is not None for c in out) else None


def _read_router_calls(
    value: Any, routes: Routes, path: str | os.PathLike[str]
) -> tuple[_RouterCalls | None, ...] | None:
    """Each router's own calls that a file keeps (:func:`_router_calls_meta`), checked against its rows."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != routes.num_layers:
        raise _corrupted(path, "its routers' own calls are not one entry per router")
    out: list[_RouterCalls | None] = []
    for j, entry in enumerate(value):
        if entry is None:
            out.append(None)
            continue
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], list)
            and all(isinstance(r, list) and len(r) == 2 and all(type(v) is int and v > 0 for v in r) for r in entry[0])
            and sum(n * c for n, c in entry[0]) == routes.tokens_per_layer[j]
        )
        if not ok:
            raise _corrupted(path, f"the own calls of router '{routes.names[j]}' do not describe its rows")
        call_rows = tuple((int(n), int(c)) for n, c in entry[0])
        forward_calls = _read_forward_calls(entry[1], call_rows, path)
        out.append(None if forward_calls is None else (call_rows, forward_calls))
    return tuple(out)


def _rejoined(parts: Sequence[Any]) -> list[Any]:
    """``parts`` with each run of consecutive slices of one capture's rows, each starting where the one before it
    ends (a forward cut through by ``split_routes`` or slices, joined again), taken as one slice of them all: the
    forward cut through is one forward again, and a first forward whole again keeps its prompt mask."""
    out: list[Any] = []
    for p in parts:
        cut = p._cut_from
        last = out[-1]._cut_from if out else None
        if cut is not None and last is not None and cut[0] is last[0] and cut[1] == last[2]:
            out[-1] = _Rejoined(cut[0], last[1], cut[2])
        elif cut is not None and cut[1] == cut[2] and last is not None:  # (a slice of no rows: nothing to join)
            continue
        else:
            out.append(p)
    return out


def _whole_calls(rows: slice | torch.Tensor, calls: tuple[tuple[int, int], ...] | None, n: int) -> bool:
    """Do ``rows`` (of :func:`_token_rows`, of ``n``) hold whole router calls of a capture of ``calls`` (``(rows,
    calls)`` runs), each call's rows in the order they were recorded? Where the calls are not known: every row, in
    order. Such rows are in the order their routers saw the tokens, call by call (``Routes._order_untold``)."""
    picked = torch.arange(n)[rows] if isinstance(rows, slice) else rows
    if not picked.numel():
        return True
    if calls is None or sum(r * c for r, c in calls) != n or any(r <= 0 for r, _ in calls):
        return picked.numel() == n and torch.equal(picked, torch.arange(n))
    sizes = torch.tensor([r for r, _ in calls]).repeat_interleave(torch.tensor([c for _, c in calls]))
    ends = sizes.cumsum(0)
    first, last = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    first[ends - sizes], last[ends - 1] = True, True
    # each row the next of the one before it in its call, or the first of a call after the last of another
    steps = (picked[1:] == picked[:-1] + 1) & ~last[picked[:-1]] | last[picked[:-1]] & first[picked[1:]]
    return bool(first[picked[0]]) and bool(last[picked[-1]]) and bool(steps.all())


def _is_integer(index: Any) -> bool:
    if isinstance(index, bool):
        return False
    if isinstance(index, int | np.integer):
        return True
    if isinstance(index, np.ndarray):  # (a 0-d array of an integer dtype, as a 0-d tensor)
        return index.ndim == 0 and np.issubdtype(index.dtype, np.integer)
    return (
        isinstance(index, torch.Tensor)
        and index.dim() == 0
        and _int_dtype(index.dtype)
        and index.device.type != "meta"  # (no value: refused as no index, never torch's error at .item())
    )


def _calls_runs(forward_calls: tuple[int, ...] | None) -> list[list[int]] | None:
    """``Routes._forward_calls`` as ``[calls, forwards]`` runs for a file (None where unknown or of more runs than
    :data:`_MAX_RUNS`)."""
    if forward_calls is None:
        return None
    runs: list[list[int]] = []
    for c in forward_calls:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([int(c), 1])
    return runs if len(runs) <= _MAX_RUNS else None


def _read_forward_calls(
    value: Any, call_rows: tuple[tuple[int, int], ...] | None, path: str | os.PathLike[str]
) -> tuple[int, ...] | None:
    """The router calls of each forward a file keeps (:func:`_calls_runs`), checked against its calls of rows."""
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and all(isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and r[1] >= 0 for r in value)
        and call_rows is not None
        and sum(abs(c) * n for c, n in value) == sum(c for _, c in call_rows)
    )
    if not ok:
        raise _corrupted(path, "its forwards' router calls do not describe its calls of rows")
    return tuple(c for c, n in value for _ in range(n))


def _read_forwards(routes: Routes, forwards: Any, path: str | os.PathLike[str]) -> None:
    """Give loaded ``routes`` what their file keeps of the capture's forwards (:meth:`Routes._forwards_meta`)."""
    if forwards is None:
        return
    t = set(routes.tokens_per_layer)
    rows = t.pop() if len(t) == 1 else -1

    def runs(value: Any, what: str, values: set[int] | None) -> list[tuple[int, int]] | None:
        """``[first, repeats]`` pairs: ``[rows, calls]`` (``values`` None) or ``[value, rows]``, over every row."""
        if value is None:
            return None
        pairs = (
            [(r[0], r[1]) for r in value]
            if isinstance(value, list)
            and all(isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and r[1] > 0 for r in value)
            else None
        )
        ok = pairs is not None and all((a in values) if values is not None else a > 0 for a, _ in pairs)
        if pairs is None or not ok or sum(b if values is not None else a * b for a, b in pairs) != rows:
            raise _corrupted(path, f"its forwards' {what} do not describe its {rows} rows per router")
        return pairs

    def text(value: Any, what: str) -> str | None:
        if value is not None and (not isinstance(value, str) or len(value) > 4000):  # (names a cache class)
            raise _corrupted(path, f"its {what} is not a short string")
        return value

    if not isinstance(forwards, dict):
        raise _corrupted(path, "its forwards are not a JSON object")
    calls = runs(forwards.get("calls"), "calls", None)
    mask = runs(forwards.get("mask_runs"), "prompt mask", {-1, 0, 1})
    dropped = forwards.get("dropped_rows", 0)
    if type(dropped) is not int:
        raise _corrupted(path, "its dropped rows are not an integer")
    routes._call_rows = tuple(calls) if calls is not None else None
    if mask is not None:
        routes._fed_mask = torch.cat([torch.full((n,), v, dtype=torch.int8) for v, n in mask])
    routes._rows_moved = text(forwards.get("rows_moved"), "cache move")
    routes._caches_interleaved = text(forwards.get("caches_interleaved"), "cache interleaving")
    routes._rows_picked = text(forwards.get("rows_picked"), "rows picked")
    routes._rows_untold = text(forwards.get("rows_untold"), "reader without a token count")
    routes._dropped_rows = dropped
    routes._routers_order = forwards.get("routers_order") is True
    joined = forwards.get("joined")
    if joined is not None and (type(joined) is not int or joined < 2):
        raise _corrupted(path, "its count of routes joined is not an integer over 1")
    routes._joined = joined or 0
    routes._forward_calls = _read_forward_calls(forwards.get("forward_calls"), routes._call_rows, path)
    routes._router_calls = _read_router_calls(forwards.get("router_calls"), routes, path)
    cut = forwards.get("cut_from")
    if cut is not None:
        routes._cut_from = _read_cut(cut, routes, rows, path)


def _read_call_runs(routes: Routes, runs: torch.Tensor | None, path: str | os.PathLike[str]) -> None:
    """The capture's ``(rows, calls)`` runs that :meth:`Routes.save` kept as an array (more than :data:`_MAX_RUNS`
    of them), checked against the rows per router, into loaded ``routes``."""
    if runs is None:
        return
    t = set(routes.tokens_per_layer)
    if routes._call_rows is not None or len(t) != 1:
        raise _corrupted(path, "it keeps its forwards' calls twice, or for routers of different row counts")
    pairs = [(int(r), int(c)) for r, c in runs.tolist()]
    if any(r <= 0 or c <= 0 for r, c in pairs) or sum(r * c for r, c in pairs) != t.pop():
        raise _corrupted(path, f"its forwards' calls do not describe its {routes.num_tokens} rows per router")
    routes._call_rows = tuple(pairs)


def _read_cut(cut: Any, routes: Routes, rows: int, path: str | os.PathLike[str]) -> tuple[_Forwards, int, int]:
    """The capture's forwards a slice saved in a file was cut from, and the rows it holds of them (see
    :meth:`Routes._cut_meta`), checked against the slice's own forwards."""
    if not isinstance(cut, dict) or set(cut) - {"kept"} != {"key", "calls", "start", "end"}:
        raise _corrupted(path, "the capture it was cut from is not described as a slice")
    key, calls, start, end = cut["key"], cut["calls"], cut["start"], cut["end"]
    if not isinstance(key, str) or not 0 < len(key) <= 64 or not all(type(v) is int for v in (start, end)):
        raise _corrupted(path, "the capture it was cut from is not named, or its rows are not integers")
    if not isinstance(calls, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(type(v) is int and v > 0 for v in r) for r in calls
    ):
        raise _corrupted(path, "the forwards of the capture it was cut from are not [rows, calls] runs")
    whole = tuple((r[0], r[1]) for r in calls)
    total = sum(r * c for r, c in whole)
    if not 0 <= start <= end <= total or end - start != rows or _clip_calls(whole, start, end) != routes._call_rows:
        raise _corrupted(path, f"its rows are no slice {start}:{end} of the capture it says it was cut from")
    kept = None if cut.get("kept") is None else _read_cut_kept(cut["kept"], whole, path)
    return (_loaded_forwards(key, whole, kept), start, end)


def _read_cut_kept(kept: Any, whole: tuple[tuple[int, int], ...], path: str | os.PathLike[str]) -> torch.Tensor:
    """The mask of the tokens the prompt forward's routers saw, of the capture a slice was cut from (see
    :meth:`Routes._cut_meta`): as many tokens kept as that forward's rows."""
    shape = kept.get("shape") if isinstance(kept, dict) else None
    bits = kept.get("bits") if isinstance(kept, dict) else None
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(v) is int and v > 0 for v in shape)
        or not isinstance(bits, str)
        or len(bits) != 2 * -(-shape[0] * shape[1] // 8)
    ):
        raise _corrupted(path, "the prompt mask of the capture it was cut from is not a [rows, positions] bit mask")
    try:
        flat = np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8))[: shape[0] * shape[1]]
    except ValueError:
        raise _corrupted(path, "the prompt mask of the capture it was cut from is not hexadecimal") from None
    mask = torch.from_numpy(flat.astype(bool)).reshape(shape[0], shape[1])
    if not whole or int(mask.sum()) != whole[0][0]:
        raise _corrupted(
            path, "the prompt mask of the capture it was cut from keeps other than its first forward's rows"
        )
    return mask


def _read_meta(meta: Any, path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """Check the JSON metadata of a routes file; returns (names, expert counts)."""
    if not isinstance(meta, dict) or meta.get("magic") != _MAGIC:
        raise RoutesValidationError(f"{path} is not a moe_replay routes file (no '{_MAGIC}' metadata)")
    version = meta.get("format_version")
    if version is None:
        raise RoutesValidationError(f"{path} has no routes format version: it is corrupted")
    if version != FORMAT_VERSION or type(version) is not int:
        raise RoutesValidationError(
            f"{path} has routes format version {version!r}; this moe_replay reads version "
            f"{FORMAT_VERSION}: upgrade moe_replay or re-save the routes"
        )
    names, experts = meta.get("names"), meta.get("num_experts")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RoutesValidationError(f"{path}: the router names are not a list of strings (corrupted)")
    if (
        not isinstance(experts, list)
        or len(experts) != len(names)
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts)
    ):
        raise RoutesValidationError(f"{path}: the expert counts are not one integer per router (corrupted)")
    return names, experts


def _one_token_per_row(routes: Routes, what: str) -> None:
    """Refuse to pick rows of ``routes`` by one index for every router where their rows are not the same tokens: each
    router keeps its own token ids (``Routes._router_ids``), and they differ (a router of a stream of its own, a
    decoder's canvas, or one called another number of times per forward, as many rows in all by chance). Its row
    ``i`` is another token than another router's: the rows picked would be forced on other tokens, unchecked where
    their ids are unknown."""
    each = routes._router_ids
    if each is None or len(each) < 2:
        return
    first = each[0]
    unknown = (-1, NO_FORWARD_ID, LOST_ID)  # (rows whose token is not known: nothing tells they line up)
    other = next(
        (
            j
            for j, v in enumerate(each)
            if not torch.equal(v, first) or bool(torch.isin(v, torch.tensor(unknown)).any())
        ),
        None,
    )
    if other is None:
        return
    names = routes.names
    against = f"other rows than '{names[0]}'" if other else "rows whose tokens are not known"
    raise RoutesValidationError(
        f"{what}: these routes' routers hold as many rows, but not of the same tokens: the capture kept each router's "
        f"own token ids, and '{names[other]}' has {against} (a router of a stream of its own, a "
        "decoder's canvas, or one called another number of times per forward), so one row index picks other tokens "
        "of each. Pick the rows of each router on its own (routes.select([name])[index]), or replay the routes whole"
    )


def _rows_ids(routes: Routes, j: int) -> torch.Tensor:
    """Router ``j``'s token id of each of its rows in ``routes``, as ``Routes._router_ids`` holds them (-1 where
    unknown, ``PADDING_ID`` at a row recorded at prompt padding)."""
    if routes._router_ids is not None:
        return routes._router_ids[j]
    n = routes.tokens_per_layer[j]
    if routes._ids_lost is not None:  # (no router's kept: each row's lost, whatever routes it is joined with)
        return torch.full((n,), LOST_ID, dtype=torch.long)
    ids, fed = routes._token_ids, routes._fed_mask
    if ids is None or ids.numel() != n:
        return torch.full((n,), -1, dtype=torch.long)
    if fed is not None and fed.shape == ids.shape:
        return torch.where((fed == 0) & (ids < 0), PADDING_ID, ids)
    return ids


def _ids(token_ids: Any, routes: Routes, what: str) -> torch.Tensor | None:
    """``token_ids`` as :attr:`Routes.token_ids` of ``routes``: int64 ``[T]`` on the host (None if none is known)."""
    check_dense(token_ids, f"{what}: token_ids", RoutesValidationError)
    if isinstance(token_ids, Mapping):  # (its keys are no ids in row order)
        raise ArgumentTypeError(f"{what}: token ids must be a tensor or a list of ints, got {type(token_ids).__name__}")
    if isinstance(token_ids, torch.Tensor) and token_ids.dtype in _WIDE_UNSIGNED:
        token_ids = token_ids.detach().cpu().numpy()  # (uint64 past int64 is refused below, not wrapped)
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype.hasobject or (token_ids.dtype.kind not in "iu" and token_ids.size):
            # (no id at all: np.array([]) is float64, and holds no value an int64 would change)
            raise RoutesValidationError(f"{what}: token ids must be integers, got a numpy array of {token_ids.dtype}")
        token_ids = _native(token_ids)
        if token_ids.size and token_ids.dtype.kind == "u" and int(token_ids.max()) > np.iinfo(np.int64).max:
            raise RoutesValidationError(f"{what}: token id {int(token_ids.max())} does not fit int64")
        token_ids = torch.from_numpy(token_ids.astype(np.int64))
    elif not isinstance(token_ids, torch.Tensor):
        if not is_collection(token_ids):
            raise ArgumentTypeError(f"{what}: token ids must be a tensor or a list of ints, got {token_ids!r:.60}")
        try:
            values = list(token_ids)
            token_ids = torch.as_tensor(values) if values else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ArgumentTypeError(f"{what}: token ids must be integers: {e}") from None
    if token_ids.device.type == "meta":
        raise RoutesValidationError(
            f"{what}: token ids on the meta device hold no values; give the ids the model was fed"
        )
    if not _int_dtype(token_ids.dtype) and token_ids.numel():
        raise RoutesValidationError(f"{what}: token ids must be integers, got {token_ids.dtype} on {token_ids.device}")
    tokens = set(routes.tokens_per_layer)
    if len(tokens) > 1:
        raise RoutesValidationError(
            f"{what}: these routes hold different row counts per router {sorted(tokens)}, so no one id per row fits"
        )
    n = tokens.pop() if tokens else 0
    if token_ids.dim() > 2:  # (no layout of rows reads a third axis: [batch, positions, 1], [micro, batch, pos]...)
        raise RoutesValidationError(
            f"{what}: token ids of shape {tuple(token_ids.shape)}: give one id per row ([T]) or the forwards' "
            "[batch, positions] ids"
        )
    flat = token_ids.detach().reshape(-1).to("cpu", torch.long, copy=True)
    if flat.numel() != n:
        raise RoutesValidationError(
            f"{what}: {flat.numel()} token ids (shape {tuple(token_ids.shape)}) for routes of {n} rows; give one id "
            "per row, in row order (-1 where unknown)"
        )
    if flat.numel() and int(flat.min()) < -1:
        raise RoutesValidationError(f"{what}: token id {int(flat.min())}; ids are >= 0, or -1 where unknown")
    return _known_or_none(flat)


def _known_or_none(ids: torch.Tensor) -> torch.Tensor | None:
    """``ids``, or None where not one of them is known."""
    return ids if bool((ids >= 0).any()) else None


def order_untold(routes: Routes, every: bool = False) -> bool:
    """Do some of ``routes``' rows (``every``: all of them) stand in an order no one told (see :data:`UNTOLD_RANK`)?"""
    rank = routes._token_rank
    if rank is None:
        return routes._order_untold
    untold = rank == UNTOLD_RANK
    return bool(untold.all() if every else untold.any())


def _out_of_order(rank: torch.Tensor) -> torch.Tensor | None:
    """``rank`` (see ``Routes._token_rank``), or None where it puts no row elsewhere: every place known, increasing."""
    if bool((rank >= 0).all()) and bool((rank[1:] > rank[:-1]).all()):
        return None
    return rank


def _cat_ranks(parts: Sequence[tuple[torch.Tensor | None, int]]) -> torch.Tensor:
    """The token order of routes joined from parts of ``(rank, rows)``: each part's rows after the rows of the parts
    before it (a part of no rank follows its tokens in row order), places not known staying as they are (-1, or
    ``UNTOLD_RANK``). A part whose places none of the parts before it hold keeps them: the slices of one capture cut
    through a forward (``split_routes``), joined again, hold the places of its tokens, interleaved as they were."""
    out, at = [], 0
    held = torch.zeros(0, dtype=torch.long)
    for rank, n in parts:
        r = torch.arange(n) if rank is None else rank
        known = r >= 0
        if bool(known.any()):
            if rank is None or bool(torch.isin(r[known], held).any()):
                r = torch.where(known, r - r[known].min() + at, r)
            held = torch.cat([held, r[known]])
            at = max(at, int(r.max()) + 1)
        out.append(r)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def in_token_order(routes: Routes, what: str) -> Routes:
    """``routes`` with their rows in the order of their tokens, sequence by sequence (``[batch, positions]``
    batch-major, the order :class:`~moe_replay.BatchLayout` and the engine formats lay rows out in).

    A capture of routers that saw the tokens of a ``[batch, positions]`` forward sequence-first (layers that run
    ``[positions, batch, hidden]``, as fairseq's and Megatron's) holds each forward's rows position by position;
    its rows are put back sequence by sequence here, each forward's among its own, with their token ids and prompt
    mask (what the capture knows of its forwards stays: each keeps its rows). Other routes are returned as they are.

    Raises:
        RoutesValidationError: rows of routers that saw their tokens sequence-first whose tokens' order the capture
            could not tell (forwards that did not line up with the rows, a ``keep_newest`` ring that wrapped), or
            rows of forwards fed embeddings whose order the capture could not tell (``Routes._order_untold``).
    """
    rank = routes._token_rank
    untold = int((rank == UNTOLD_RANK).sum()) if rank is not None else routes.num_tokens if routes._order_untold else 0
    if untold:  # (rows that carry the mark: every Routes made from the capture's rows keeps it with them)
        raise RoutesValidationError(
            f"{what}: {untold} of these {routes.num_tokens} rows"
            " were recorded from forwards fed embeddings of several sequences of several positions "
            "(inputs_embeds) whose order the routers saw them in the capture could not tell (a forward given a KV"
            " cache that already held tokens, forwards across processes, a batch of one embedding repeated): they"
            " are in the routers' order, which may be position 0 of every sequence first (layers that run "
            "[positions, batch, hidden]), so they cannot be laid out sequence by sequence. Capture the batch fed "
            "input_ids, or fed embeddings in one process with no cache holding tokens (the order is then told), "
            "or build mr.Routes of rows you laid out in token order yourself; a replay of these routes on the "
            "forwards they were captured from needs no layout"
        )
    if rank is None:
        return routes
    if bool((rank < 0).any()):
        raise RoutesValidationError(
            f"{what}: {int((rank < 0).sum())} of these {rank.numel()} rows were recorded by routers that saw the "
            "tokens of a [batch, positions] forward sequence-first (position 0 of every sequence, then position "
            "1...), and the capture could not tell which token each of them was (its forwards did not line up with "
            "the rows: compiled forwards, a router called on a part of the tokens, a keep_newest ring that wrapped), "
            "so they cannot be laid out sequence by sequence. Capture the forwards eagerly with one router call per "
            "token, or build mr.Routes of rows you laid out in token order yourself"
        )
    order = torch.argsort(rank, stable=True)
    out = Routes._trusted([d[order] for d in routes._data], routes.names, routes.experts_per_layer, routes._validated)
    out._same_forwards(routes)
    out._token_rank, out._order_untold, out._routers_order = None, False, False
    if routes._token_ids is not None:
        out._token_ids = routes._token_ids[order]
    if routes._router_ids is not None:
        out._router_ids = tuple(v[order] for v in routes._router_ids)
    if routes._fed_mask is not None and routes._fed_mask.numel() == order.numel():
        out._fed_mask = routes._fed_mask[order]
    if routes._layout_pos is not None and routes._layout_pos.numel() == order.numel():
        out._layout_pos = routes._layout_pos[order]
    if routes._seq_pos is not None and routes._seq_pos.numel() == order.numel():
        out._seq_pos = routes._seq_pos[order]
    out._lineage = None  # (counted in rows of the order they were recorded in: not kept)
    return out


def _write_in_place(path: str, write: Any) -> None:
    """Replace the bytes of the file at ``path`` (in a folder that takes no new file) with what ``write(file)``
    writes, never leaving it half-written: the new bytes are made in memory first, so a ``write`` that fails (an
    interrupt, a value it cannot write) leaves the file as it was; where putting them in the file fails (a full disk),
    its old bytes are put back (where they could be read and written: else :meth:`Routes.load` refuses what is left as
    truncated)."""
    buf = io.BytesIO()
    write(buf)
    data = buf.getvalue()
    try:
        with open(path, "rb") as f:
            old: bytes | None = f.read()
    except OSError:  # (a file that may be written but not read: nothing to put back)
        old = None
    try:
        with open(path, "wb") as f:
            f.write(data)
    except BaseException:
        if old is not None:
            try:
                with open(path, "wb") as f:
                    f.write(old)
            except OSError:  # (left as the failed write left it: load refuses it as truncated, never reads it)
                pass
        raise


def _write_whole(path: str, write: Any) -> None:
    """Run ``write(file)`` on a new file beside ``path`` and move it to ``path`` once complete (``os.replace``, atomic
    on one file system); where ``write`` fails, the new file goes and a file at ``path`` stays as it was. A symbolic
    link at ``path`` is followed: its target is the file replaced."""
    target = os.path.realpath(path)
    # (the new file's name is kept short: one that added to a name of the longest length a folder takes would not fit)
    stem = hashlib.sha256(os.fsencode(os.path.basename(target))).hexdigest()[:12]
    part = os.path.join(os.path.dirname(target), f".{stem}.{os.getpid()}.{id(write):x}.part")
    try:
        f = open(part, "xb")  # (created as open() creates any file: the mode the umask leaves)
    except PermissionError:  # a folder that takes no new file, a file in it that may be written: in place
        _write_in_place(path, write)
        return
    try:
        with f:
            write(f)
        os.replace(part, target)
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
