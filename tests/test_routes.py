"""Routes: views, slicing, files and numpy round trips."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr

from .conftest import tried


def make(t: int = 10, layers: int = 3, k: int = 2, e: int = 8, seed: int = 0) -> mr.Routes:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) for _ in range(layers)]
    return mr.Routes(rows, names=[f"layers.{i}.gate" for i in range(layers)], num_experts=e)


def test_views_agree() -> None:
    r = make()
    assert r.indices.shape == (10, 3, 2) and r.indices.dtype == torch.long
    for i, layer in enumerate(r.per_layer()):
        assert torch.equal(layer, r.indices[:, i])
        assert torch.equal(r.layer(f"layers.{i}.gate"), layer)
    assert (r.num_tokens, r.num_layers, r.top_k, r.num_experts) == (10, 3, 2, 8)
    assert repr(r) == "Routes(tokens=10, routers=3, k=2, experts=8, missing_rows=0, nbytes=120)"


def test_slicing_and_cat() -> None:
    r = make(t=12)
    assert r[2:5].equal(mr.Routes([t[2:5] for t in r.per_layer()], names=r.names, num_experts=8))
    assert mr.Routes.cat([r[:4], r[4:9], r[9:]]).equal(r)
    assert torch.equal(r[[0, 5]].indices, r.indices[[0, 5]])
    mask = torch.arange(12) % 2 == 0
    assert torch.equal(r[mask].indices, r.indices[mask])
    assert r[3].num_tokens == 1 and r[-1].equal(r[11:])
    with pytest.raises(mr.RoutesValidationError, match="part 1 holds routers"):
        mr.Routes.cat([r, r.select(["layers.1.gate"])])
    with pytest.raises(mr.RoutesValidationError, match=r"another order; reorder part 1 with \.select\(\)"):
        mr.Routes.cat([r, r.select(r.names[::-1])])


@pytest.mark.reliability("round trips")
def test_numpy_round_trip_keeps_missing_rows() -> None:
    """to_numpy/from_numpy keeps -1 rows; a float array is refused."""
    r = make()
    arr = r.to_numpy()
    arr[4] = -1
    back = mr.Routes.from_numpy(arr, names=r.names, num_experts=8)
    assert back.missing[4].all() and not back.missing[3].any()
    assert np.array_equal(back.to_numpy(), arr)
    assert "missing_rows=3" in repr(back)
    with pytest.raises(mr.RoutesValidationError, match="integers"):
        mr.Routes.from_numpy(arr.astype(np.float32), names=r.names, num_experts=8)


@pytest.mark.parametrize("e", [8, 256, 300, 40000])
@pytest.mark.reliability("round trips")
def test_save_load_round_trip(tmp_path, e: int) -> None:
    """save/load is exact for 8, 256, 300 and 40000 experts, in plain arrays without pickle."""
    r = make(e=e)
    path = tmp_path / "routes.npz"
    r.save(path)
    back = mr.Routes.load(path)
    assert back.equal(r) and back.fingerprint == r.fingerprint
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle needed
        assert set(z.files) == {"meta", "layer_0", "layer_1", "layer_2"}


@pytest.mark.reliability("files")
def test_load_rejects_corrupt_truncated_and_future_files(tmp_path) -> None:
    """Half a file, junk bytes, a future format version and a foreign .npz are refused."""
    r = make()
    good = tmp_path / "good.npz"
    r.save(good)
    raw = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
        mr.Routes.load(tmp_path / "cut.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
        mr.Routes.load(tmp_path / "junk.npz")
    meta = {"magic": "moe_replay.routes", "format_version": 99, "names": ["a"], "num_experts": [8]}
    np.savez(tmp_path / "v99.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), layer_0=np.zeros((1, 2)))
    with pytest.raises(mr.RoutesValidationError, match="format version 99"):
        mr.Routes.load(tmp_path / "v99.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(mr.RoutesValidationError, match="not a moe_replay routes file"):
        mr.Routes.load(tmp_path / "other.npz")


@pytest.mark.reliability("files")
@pytest.mark.parametrize("damage", ["flip every byte", "cut at every length"])
def test_every_damaged_copy_is_refused_or_identical(tmp_path, damage: str) -> None:
    """Every single-byte change and every truncation of a routes file: refused, or read back identical."""
    r = make(t=6, layers=2, e=300)
    good = tmp_path / "good.npz"
    r.save(good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.npz"
    outcomes = {"refused": 0, "identical": 0}
    for i in range(len(raw)):
        if damage == "flip every byte":
            data = bytearray(raw)
            data[i] ^= 0xFF
        else:
            data = raw[:i]
        bad.write_bytes(bytes(data))
        try:
            back = mr.Routes.load(bad)
        except mr.RoutesValidationError:
            outcomes["refused"] += 1
        else:  # a byte the format does not depend on (zip padding, a header field numpy ignores)
            assert back.equal(r), f"byte {i}: damaged file read back as different routes"
            outcomes["identical"] += 1
    tried(len(raw))
    assert outcomes["refused"] > 0.5 * len(raw)


_META = {"magic": "moe_replay.routes", "format_version": 1, "names": ["a", "b"], "num_experts": [8, 8]}
_LAYERS = {"layer_0": np.array([[0, 1]] * 3, np.int16), "layer_1": np.array([[2, 3]] * 3, np.int16)}

# each case: (metadata, layer arrays) of a damaged file, and what the error must say
MALFORMED = {
    "metadata is a list": ([1, 2], _LAYERS, "not a moe_replay routes file"),
    "wrong magic": ({**_META, "magic": "other"}, _LAYERS, "not a moe_replay routes file"),
    "no format version": ({k: v for k, v in _META.items() if k != "format_version"}, _LAYERS, "no routes format"),
    "format version as text": ({**_META, "format_version": "1"}, _LAYERS, "format version '1'"),
    "format version from the future": ({**_META, "format_version": 2}, _LAYERS, "format version 2.*upgrade"),
    "names missing": ({k: v for k, v in _META.items() if k != "names"}, _LAYERS, "names are not a list"),
    "names as one string": ({**_META, "names": "ab"}, _LAYERS, "names are not a list of strings"),
    "names as numbers": ({**_META, "names": [1, 2]}, _LAYERS, "names are not a list of strings"),
    "expert counts missing": ({k: v for k, v in _META.items() if k != "num_experts"}, _LAYERS, "expert counts"),
    "expert counts as text": ({**_META, "num_experts": ["8", "8"]}, _LAYERS, "expert counts are not one integer"),
    "expert count fractional": ({**_META, "num_experts": [8.5, 8]}, _LAYERS, "expert counts are not one integer"),
    "expert counts short": ({**_META, "num_experts": [8]}, _LAYERS, "expert counts are not one integer"),
    "expert count zero": ({**_META, "num_experts": [0, 8]}, _LAYERS, "at least 1"),
    "a layer missing": ({**_META, "names": ["a", "b", "c"], "num_experts": [8] * 3}, _LAYERS, "layer_2"),
    "float indices": (_META, {**_LAYERS, "layer_0": np.zeros((3, 2))}, "dtype torch.float64"),
    "1-D indices": (_META, {**_LAYERS, "layer_0": np.zeros(3, np.int16)}, "2-D"),
    "index out of range": (_META, {**_LAYERS, "layer_1": np.array([[2, 8]] * 3, np.int16)}, r"in \[0, 7\]"),
    "stored fingerprint differs": ({**_META, "fingerprint": "0" * 16}, _LAYERS, "fingerprint does not match"),
    # what a capture knew of its forwards: it must describe the rows it holds
    "forwards not an object": ({**_META, "forwards": [1]}, _LAYERS, "forwards are not a JSON object"),
    "calls over other rows": ({**_META, "forwards": {"calls": [[2, 2]]}}, _LAYERS, "calls do not describe its 3"),
    "calls of no rows": ({**_META, "forwards": {"calls": [[0, 1], [3, 1]]}}, _LAYERS, "calls do not describe"),
    # (each router's own calls, where the routers' differ: one entry per router, describing its rows)
    "own calls of one router": ({**_META, "forwards": {"router_calls": [None]}}, _LAYERS, "not one entry per router"),
    "own calls over other rows": (
        {**_META, "forwards": {"router_calls": [[[[2, 1]], [[1, 1]]], None]}},
        _LAYERS,
        "own calls of router 'a' do not describe its rows",
    ),
    "own forwards of other calls": (
        {**_META, "forwards": {"router_calls": [None, [[[3, 1]], [[2, 1]]]]}},
        _LAYERS,
        "forwards' router calls do not describe",
    ),
    "mask of other values": ({**_META, "forwards": {"mask_runs": [[2, 3]]}}, _LAYERS, "mask do not describe"),
    "mask of fewer rows": ({**_META, "forwards": {"mask_runs": [[1, 2]]}}, _LAYERS, "mask do not describe"),
    "cache move not text": ({**_META, "forwards": {"rows_moved": 5}}, _LAYERS, "cache move is not a short string"),
    "dropped rows as text": ({**_META, "forwards": {"dropped_rows": "3"}}, _LAYERS, "dropped rows are not an int"),
}


@pytest.mark.reliability("files")
@pytest.mark.parametrize("case", list(MALFORMED))
def test_load_rejects_malformed_metadata(tmp_path, case: str) -> None:
    """A routes file whose metadata or arrays are malformed is refused with a message naming the file."""
    meta, layers, pattern = MALFORMED[case]
    path = tmp_path / "routes.npz"
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **layers)
    with pytest.raises(mr.RoutesValidationError, match=pattern) as err:
        mr.Routes.load(path)
    assert str(path) in str(err.value)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("count", "pattern"),
    [(0, "at least 1"), (-8, "at least 1"), (8.5, "integer, got 8.5"), ("8", "integer, got '8'"), (True, "got True")],
)
def test_expert_counts_are_positive_integers(count: object, pattern: str) -> None:
    """An expert count of 0, negative, fractional, text or a bool is refused, never rounded."""
    with pytest.raises(mr.RoutesValidationError, match=pattern):
        mr.Routes([torch.tensor([[0, 1]])], names=["gate"], num_experts=count)  # type: ignore[arg-type]
    with pytest.raises(mr.RoutesValidationError, match=pattern):
        mr.Routes([torch.tensor([[0, 1]])], names=["gate"], num_experts=[count])  # type: ignore[list-item]


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("e", "dtype", "missing", "fits"),
    [
        (256, np.uint8, False, True),
        (256, np.uint8, True, False),  # -1 would become 255, a valid expert
        (257, np.uint8, False, False),
        (128, np.int8, True, True),
        (200, np.int8, False, False),
        (40000, np.int16, False, False),
        (40000, np.int32, True, True),
    ],
)
def test_to_numpy_refuses_a_dtype_that_changes_values(e: int, dtype: type, missing: bool, fits: bool) -> None:
    """to_numpy(dtype) never wraps an index or a -1 row around: it converts exactly or refuses."""
    r = make(t=64, e=e, k=1, seed=3)
    rows = [t.clone() for t in r.per_layer()]
    rows[0][: e % 64] = e - 1  # the largest index appears
    if missing:
        rows[1][5] = -1
    r = mr.Routes(rows, names=r.names, num_experts=e)
    if fits:
        back = mr.Routes.from_numpy(r.to_numpy(dtype), names=r.names, num_experts=e)
        assert back.equal(r)
    else:
        name = np.dtype(dtype).name  # (a dtype that cannot write every expert is refused as such, values aside)
        match = f"to_numpy\\({name}\\) would change values|rows are {name}, which holds expert numbers up to"
        with pytest.raises(mr.RoutesValidationError, match=match):
            r.to_numpy(dtype)


def test_heterogeneous_routers_need_per_layer() -> None:
    a = make(t=4, layers=1, k=2, e=8)
    b = mr.Routes([torch.tensor([[1], [2], [3]])], names=["mtp.gate"], num_experts=4)
    r = mr.Routes([*a.per_layer(), *b.per_layer()], names=[*a.names, *b.names], num_experts=[8, 4])
    assert r.tokens_per_layer == (4, 3) and r.k_per_layer == (2, 1)
    for whole in (lambda: r.indices, r.to_numpy):
        with pytest.raises(mr.InvalidArgumentError, match="per_layer"):
            whole()
    assert "tokens=3..4" in repr(r)


# ----------------------------------------------------------------------------- edges
@pytest.mark.reliability("bad inputs")
def test_token_index_out_of_range_is_an_index_error() -> None:
    """routes[i] outside the tokens raises IndexError (a MoEReplayError); numpy and 0-d tensor ints index too,
    and a 0-d numpy array as a 0-d tensor does (it was refused as not 1-D)."""
    r = make(t=3)
    for i in (3, 100, -4, np.int64(7), torch.tensor(3), np.array(5)):
        with pytest.raises(mr.TokenIndexError, match=r"out of range for routes of 3 tokens") as err:
            r[i]
        assert isinstance(err.value, IndexError)
        tried()
    for i in (0, 2, -1, -3, np.int64(1), torch.tensor(2), np.array(1), np.array(-1, dtype=np.int8)):
        j = int(i) % 3
        assert r[i].equal(r[j : j + 1])
        tried()


@pytest.mark.reliability("bad inputs")
def test_token_indices_that_are_not_token_positions_are_refused() -> None:
    """routes[...] with a float, None, a string, a reversed slice, a 2-D or out-of-range list, a tuple
    (``routes[0, 1]``) or a mask of another length: a MoEReplayError naming the index, never a malformed Routes
    or a plain error."""
    r = make(t=4)
    bad: list[tuple[object, type[Exception]]] = [
        (1.5, mr.ArgumentTypeError),
        (None, mr.ArgumentTypeError),
        ("a", mr.ArgumentTypeError),
        (slice(None, None, -1), mr.TokenIndexError),
        (slice(0, 2.5), mr.ArgumentTypeError),
        ([0, 4], mr.TokenIndexError),
        ([0, -5], mr.TokenIndexError),
        ([[0, 1], [2, 3]], mr.TokenIndexError),
        ([0.0, 1.0], mr.ArgumentTypeError),
        ((0, 1), mr.ArgumentTypeError),  # routes[0, 1]: a token and a router, in numpy's reading
    ]
    for index, error in bad:
        with pytest.raises(error):
            r[index]  # type: ignore[index]
        tried()
    for mask in (torch.tensor([True, False]), np.ones(5, dtype=bool)):
        with pytest.raises(mr.TokenIndexError, match="one entry per token"):
            r[mask]
        tried()
    with pytest.raises(mr.ArgumentTypeError, match="part 1 is a Tensor"):
        mr.Routes.cat([r, torch.zeros(1)])  # type: ignore[list-item]
    assert r[[3, -4]].equal(mr.Routes.cat([r[3], r[0]]))  # negative positions count from the end
    assert r[[]].num_tokens == 0
    assert r[np.array([1, 2])].equal(r[1:3])


def test_token_indices_on_the_meta_device_are_refused() -> None:
    with pytest.raises(mr.ArgumentTypeError, match="meta device"):
        make(t=4)[torch.ones(4, dtype=torch.bool, device="meta")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_indices_on_an_accelerator_are_read_on_the_host() -> None:
    """An attention mask on the GPU selects tokens of host-side routes (it raised torch's device-mismatch error)."""
    r = make(t=4)
    mask = torch.tensor([True, False, True, True])
    for index in (mask, mask.nonzero().flatten(), torch.zeros(0, dtype=torch.long)):
        assert r[index.cuda()].equal(r[index])


def test_a_uint8_token_index_is_refused_as_ambiguous() -> None:
    """torch reads a uint8 index tensor as a mask, numpy as positions: neither reading is taken silently."""
    r = make(t=4)
    byte_mask = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    with pytest.raises(mr.ArgumentTypeError, match=r"uint8 .* ambiguous.*\.bool\(\).*\.long\(\)"):
        r[byte_mask]
    assert r[byte_mask.bool()].equal(r[[0, 2]])
    assert r[byte_mask[:3].long()].equal(r[[1, 0, 1]])  # (positions; a 0/1 per token is refused: test_misuse2)


@pytest.mark.reliability("files")
def test_what_save_writes_load_reads_back_or_save_refuses(tmp_path) -> None:
    """save() checks the rows of routes built with validate=False, and refuses a directory or a missing folder,
    so no file is written that load() would refuse; select() refuses a name given twice."""
    unchecked = mr.Routes([torch.tensor([[0, -1]])], names=["a"], num_experts=4, validate=False)
    with pytest.raises(mr.RoutesValidationError):
        unchecked.save(tmp_path / "mixed.npz")
    assert not (tmp_path / "mixed.npz").exists()
    r = make(t=3)
    with pytest.raises(mr.RoutesValidationError, match="more than once"):
        r.select(["layers.0.gate", "layers.0.gate"])
    with pytest.raises(mr.NotAFileError, match="is a directory"):
        r.save(tmp_path)
    with pytest.raises(mr.MissingFileError, match="create it first"):
        r.save(tmp_path / "no" / "such" / "r.npz")
    r.save(tmp_path / "r.npz")
    assert mr.Routes.load(tmp_path / "r.npz").equal(r)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_wide_unsigned_values_are_never_read_as_missing_rows(kind: str) -> None:
    """A uint64 all-ones index is refused as out of range, not read as -1 (a native row); small values are exact."""
    names = ["a", "b"]
    for big in (2**64 - 1, 2**63, 2**32 + 1, 8):
        arr = np.array([[[0, 1], [2, 3]], [[big, big], [4, 5]]], dtype=np.uint64)
        with pytest.raises(mr.RoutesValidationError, match=r"token 1 has indices") as err:
            if kind == "numpy":
                mr.Routes.from_numpy(arr, names=names, num_experts=8)
            else:
                t = torch.from_numpy(arr)
                mr.Routes([t[:, 0], t[:, 1]], names=names, num_experts=8)
        assert str(big) in str(err.value)
        tried()
    ok = np.array([[[7, 0]], [[1, 6]]], dtype=np.uint64)
    r = mr.Routes.from_numpy(ok, names=["a"], num_experts=8)
    assert r.indices.tolist() == [[[7, 0]], [[1, 6]]]
    for dtype in (np.uint16, np.uint32):
        assert mr.Routes.from_numpy(ok.astype(dtype), names=["a"], num_experts=8).equal(r)


@pytest.mark.reliability("files")
def test_load_of_a_missing_file_or_a_directory(tmp_path) -> None:
    """Routes.load: a missing path is a FileNotFoundError, a directory an IsADirectoryError (both MoEReplayError)."""
    with pytest.raises(mr.MissingFileError, match="no such file") as err:
        mr.Routes.load(tmp_path / "nope.npz")
    assert isinstance(err.value, FileNotFoundError) and str(tmp_path) in str(err.value)
    with pytest.raises(mr.NotAFileError, match="is a directory") as err2:
        mr.Routes.load(tmp_path)
    assert isinstance(err2.value, IsADirectoryError)


def _zip_with(path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _meta(names: list[str], experts: list[int]) -> bytes:
    meta = {"magic": "moe_replay.routes", "format_version": 1, "names": names, "num_experts": experts}
    return _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))


@pytest.mark.reliability("files")
def test_load_checks_sizes_before_decompressing(tmp_path) -> None:
    """A file over max_bytes once decompressed, or whose array header lies about its size, is refused unread."""
    import tracemalloc

    big = tmp_path / "bomb.npz"
    rows = np.zeros((4_000_000, 1), np.int16)  # 8 MB of zeros: about 8 KB compressed
    _zip_with(big, {"meta.npy": _meta(["a"], [8]), "layer_0.npy": _npy(rows)})
    assert big.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(mr.RoutesValidationError, match=r"more than max_bytes=1000000"):
            mr.Routes.load(big, max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert mr.Routes.load(big).num_tokens == 4_000_000  # under the default limit it is a valid file

    # a header that claims 10**12 rows over a few bytes of data: refused before numpy allocates
    liar = _npy(np.zeros((3, 2), np.int16)).replace(b"(3, 2)", b"(1000000000000, 2)")
    _zip_with(tmp_path / "liar.npz", {"meta.npy": _meta(["a"], [8]), "layer_0.npy": liar})
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted.*declares"):
        mr.Routes.load(tmp_path / "liar.npz")


@pytest.mark.reliability("files")
@pytest.mark.parametrize("extra", ["layer_2", "notes", "meta_copy"])
def test_load_refuses_extra_arrays(tmp_path, extra: str) -> None:
    """A routes file holding arrays beyond its metadata and one per router is refused, naming them."""
    path = tmp_path / "extra.npz"
    layers = {f"layer_{i}": np.array([[0, 1]], np.int16) for i in range(2)}
    np.savez(
        path,
        meta=np.frombuffer(json.dumps({**_META_OK}).encode(), np.uint8),
        **layers,
        **{extra: np.zeros(2, np.int16)},
    )
    with pytest.raises(mr.RoutesValidationError, match=rf"does not have: \['{extra}'\]"):
        mr.Routes.load(path)


_META_OK = {"magic": "moe_replay.routes", "format_version": 1, "names": ["a", "b"], "num_experts": [8, 8]}


@pytest.mark.reliability("silent replays")
def test_routes_never_hold_the_callers_tensor() -> None:
    """Rows in the storage dtype already (int16) are copied: editing the caller's buffer changes nothing."""
    rows = torch.tensor([[0, 1], [2, 3]], dtype=torch.int16)
    routes = mr.Routes([rows], names=["r"], num_experts=8)
    rows[0] = torch.tensor([3, 3], dtype=torch.int16)  # the caller reuses its buffer: a duplicate expert now
    assert routes.layer("r").tolist() == [[0, 1], [2, 3]]


@pytest.mark.reliability("bad inputs")
def test_one_array_of_every_router_is_refused_not_read_router_first() -> None:
    """Routes(routes.indices, ...) took the first axis of the [tokens, routers, k] tensor as the routers: with as
    many tokens as routers the rows came out transposed, replayed without an error. One array is refused."""
    r = make(t=3, layers=3)
    for stacked in (r.indices, r.to_numpy(), torch.stack(r.per_layer())):
        with pytest.raises(mr.ArgumentTypeError, match="from_numpy"):
            mr.Routes(stacked, names=r.names, num_experts=8)
        tried()
    assert mr.Routes.from_numpy(r.to_numpy(), names=r.names, num_experts=8).equal(r)
    assert mr.Routes(list(torch.stack(r.per_layer())), names=r.names, num_experts=8).equal(r)


@pytest.mark.parametrize(
    "make",
    [lambda a: a[::-1], lambda a: a[:, ::-1], lambda a: (a.setflags(write=False), a)[1], np.asfortranarray],
    ids=["reversed", "reversed columns", "read-only", "fortran"],
)
def test_numpy_rows_of_any_layout_are_taken_exactly(make) -> None:
    rows = make(np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int64))
    assert mr.Routes([rows], names=["r"], num_experts=8).layer("r").tolist() == rows.tolist()


def test_numpy_rows_that_are_not_integers_are_refused() -> None:
    for rows in (np.array([[0, 1]], dtype=object), np.array([[0.0, 1.0]])):
        with pytest.raises(mr.RoutesValidationError, match="must be integers"):
            mr.Routes([rows], names=["r"], num_experts=8)


@pytest.mark.parametrize(
    "array",
    [
        [[[0, 1]], [[1]]],
        torch.zeros(2, 1, 2, dtype=torch.bfloat16),
        torch.zeros(2, 1, 2, dtype=torch.long, device="meta"),
    ],
    ids=["ragged lists", "bfloat16 tensor", "meta tensor"],
)
def test_from_numpy_refuses_what_holds_no_expert_numbers(array) -> None:
    with pytest.raises(mr.RoutesValidationError, match="rectangular|must hold integers|holds no values"):
        mr.Routes.from_numpy(array, names=["r"], num_experts=8)


@pytest.mark.reliability("bad inputs")
def test_an_argument_of_the_wrong_kind_is_a_moe_replay_error() -> None:
    """Routes, Routes.from_numpy, select, cat and to_numpy given a value of the wrong kind for one argument (names
    that are a number or a 0-d array, a structured dtype) raise a MoEReplayError, never a bare TypeError."""
    r = make(t=3)
    wrong = [None, "x", 2.5, -1, True, np.array(3), torch.tensor(3), object(), {"a": 1}, 10**30, [("a", "<i4")]]
    calls = {
        "Routes": (mr.Routes, {"layers": r.per_layer(), "names": r.names, "num_experts": 8}),
        "from_numpy": (mr.Routes.from_numpy, {"array": r.to_numpy(), "names": r.names, "num_experts": 8}),
        "select": (r.select, {"names": r.names}),
        "cat": (mr.Routes.cat, {"parts": [r, r]}),
        "to_numpy": (r.to_numpy, {"dtype": np.int32}),
    }
    for name, (fn, good) in calls.items():
        fn(**good)
        for arg in good:
            for value in wrong:
                try:
                    fn(**{**good, arg: value})
                except mr.MoEReplayError:
                    pass
                except Exception as e:
                    pytest.fail(f"{name}({arg}={value!r:.30}) raised {type(e).__name__}: {e}")
                tried()


def test_one_expert_count_for_all_routers_may_be_a_0d_array_or_tensor() -> None:
    r = make(t=3)
    for count in (np.array(8), torch.tensor(8), np.int64(8)):
        assert mr.Routes(r.per_layer(), names=r.names, num_experts=count).equal(r)


@pytest.mark.reliability("bad inputs")
def test_arrays_of_the_other_byte_order_hold_the_same_numbers(tmp_path) -> None:
    """Big-endian rows (a file or buffer from a machine of the other byte order) are read exactly: torch refuses
    them as they are, and a big-endian uint64 all-ones index was cast to -1 (a native row) instead of refused."""
    rows = np.array([[0, 1], [2, 3], [-1, -1]])
    r = mr.Routes([torch.from_numpy(rows)], names=["a"], num_experts=4)
    for dtype in (">i2", ">i4", ">i8"):
        assert mr.Routes([rows.astype(dtype)], names=["a"], num_experts=4).equal(r)
        assert mr.Routes.from_numpy(rows.astype(dtype)[:, None], names=["a"], num_experts=4).equal(r)
        path = tmp_path / f"{dtype[1:]}.npz"
        meta = {"magic": "moe_replay.routes", "format_version": 1, "names": ["a"], "num_experts": [4]}
        np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), layer_0=rows.astype(dtype))
        assert mr.Routes.load(path).equal(r)
        tried()
    for dtype in (">u2", ">u8"):
        assert mr.Routes.from_numpy(rows[:2].astype(dtype)[:, None], names=["a"], num_experts=4).equal(r[:2])
    ones = np.full((1, 1, 2), 2**64 - 1, ">u8")
    with pytest.raises(mr.RoutesValidationError, match="past int64"):
        mr.Routes.from_numpy(ones, names=["a"], num_experts=4)


# ----------------------------------------------------------------------------- token ids
def _with_ids() -> mr.Routes:
    rows = [torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]), torch.tensor([[4, 5], [5, 6], [6, 7], [7, 4]])]
    return mr.Routes(rows, names=["a.gate", "b.gate"], num_experts=8).with_token_ids(torch.tensor([[11, -1], [13, 14]]))


def test_token_ids_follow_their_rows_through_every_transform(tmp_path: object) -> None:
    """Each Routes made from routes with ids gives each of its rows the id of the row it came from."""
    r = _with_ids()
    assert r.token_ids.tolist() == [11, -1, 13, 14]
    assert "token_ids=3 known" in repr(r)
    assert r[2:].token_ids.tolist() == [13, 14]
    assert r[[3, 0]].token_ids.tolist() == [14, 11]
    assert r[torch.tensor([False, True, False, False])].token_ids is None  # (not one known)
    assert r.select(["b.gate"]).token_ids.tolist() == [11, -1, 13, 14]
    assert r.rename({"": "m."}).token_ids.tolist() == [11, -1, 13, 14]
    plain = r.with_token_ids(None)
    assert plain.token_ids is None and plain.equal(r)  # (ids are no part of the routing)
    assert mr.Routes.cat([r[:1], plain[1:2], r[3:]]).token_ids.tolist() == [11, -1, 14]
    assert mr.pad_routes([r[:2], r[2:3]]).token_ids.tolist() == [11, -1, 13, -1]
    path = f"{tmp_path}/r.npz"
    r.save(path)
    assert mr.Routes.load(path).token_ids.tolist() == [11, -1, 13, 14]
    plain.save(path)
    assert mr.Routes.load(path).token_ids is None
    r.token_ids[0] = 99  # a copy: the routes' own ids do not change
    assert r.token_ids[0] == 11


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1, 2, 3], r"3 token ids .* routes of 4 rows"),
        ([1.0, 2.0, 3.0, 4.0], "must be integers"),
        ([True, False, True, False], "must be integers"),
        ([1, -2, 3, 4], "token id -2"),
        (np.array([2**64 - 1, 1, 2, 3], dtype=np.uint64), "does not fit int64"),
        (np.array(["a", "b", "c", "d"]), "must be integers"),
        ("abcd", "a tensor or a list of ints"),
        (torch.zeros(4, device="meta", dtype=torch.long), "on the meta device hold no values"),
        (torch.tensor([1, 2, 3, 4]).to_sparse(), "a dense tensor"),
        (torch.tensor([[1, 2], [3, 4]]).to_sparse_csr(), "a dense tensor"),
        ({11: "a", 12: "b", 13: "c", 14: "d"}, "a tensor or a list of ints"),  # (its keys are no ids in row order)
    ],
)
def test_with_token_ids_refuses_what_is_not_one_id_per_row(ids: object, match: str) -> None:
    """Token ids of another count, floats, bools, ids below -1, uint64 past int64, strings: refused."""
    r = _with_ids()
    with pytest.raises(mr.MoEReplayError, match=match):
        r.with_token_ids(ids)
    assert r.token_ids.tolist() == [11, -1, 13, 14]  # unchanged


def test_with_token_ids_needs_one_row_count() -> None:
    r = mr.Routes([torch.tensor([[0, 1]]), torch.tensor([[0, 1], [1, 2]])], names=["a", "b"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match="different row counts"):
        r.with_token_ids([1, 2])


def test_cat_with_a_part_of_several_row_counts_keeps_its_rows_and_no_ids() -> None:
    """Parts whose routers hold different row counts (a partial capture) concatenate per router, as routes without
    ids do; no one id per row fits the result, so it has none."""
    rows = [torch.tensor([[0, 1]]), torch.tensor([[0, 1], [1, 2]])]
    uneven = mr.Routes(rows, names=["a.gate", "b.gate"], num_experts=8)
    known = _with_ids()
    for parts in ([known, uneven], [uneven, known]):
        out = mr.Routes.cat(parts)
        assert out.tokens_per_layer == tuple(known.num_tokens + n for n in uneven.tokens_per_layer)
        assert out.token_ids is None
        assert mr.Routes.cat([p.with_token_ids(None) if p is known else p for p in parts]).equal(out)


@pytest.mark.reliability("files")
def test_a_file_with_bad_token_ids_is_refused(tmp_path: object) -> None:
    """token_ids of another shape, dtype or range in a routes file: refused as corrupted, never read as ids."""
    import zipfile

    good = f"{tmp_path}/good.npz"
    _with_ids().save(good)
    for name, arr, match in [
        ("short", np.array([1, 2], dtype=np.int64), "2 token ids"),
        ("float", np.array([1.0, 2, 3, 4]), "not one int per row"),
        ("below", np.array([1, -5, 3, 4], dtype=np.int64), "token id -5"),
    ]:
        path = f"{tmp_path}/{name}.npz"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                if item.filename != "token_ids.npy":
                    dst.writestr(item, src.read(item.filename))
            buf = io.BytesIO()
            np.save(buf, arr)
            dst.writestr("token_ids.npy", buf.getvalue())
        with pytest.raises(mr.RoutesValidationError, match=match):
            mr.Routes.load(path)


@pytest.mark.reliability("bad inputs")
def test_repr_of_routes_of_many_routers_and_tokens_is_one_line_counting_missing_rows() -> None:
    """Once repr(routes) read every row of every router: 48 routers x 1e6 tokens took seconds to print."""
    rows = torch.arange(8, dtype=torch.int16).repeat(200_000, 1)
    r = mr.Routes([rows] * 48, names=[f"model.layers.{i}.mlp.gate" for i in range(48)], num_experts=128, validate=False)
    text = repr(r)
    assert text == "Routes(tokens=200000, routers=48, k=8, experts=128, missing_rows=0, nbytes=153600000)"
    half = r[::2]
    assert repr(half).startswith("Routes(tokens=100000,") and "missing_rows=0" in repr(half)
    gaps = mr.Routes([torch.tensor([[0, 1], [-1, -1], [2, 3], [-1, -1]])] * 2, names=["a", "b"], num_experts=4)
    assert "missing_rows=4" in repr(gaps) and "missing_rows=2" in repr(gaps[:2])


@pytest.mark.reliability("bad inputs")
def test_slices_of_any_bounds_take_exactly_pythons_rows() -> None:
    """Once a slice step past 2**62 raised torch's RuntimeError (its strides wrapped negative) instead of taking
    the first row, as Python's slicing does."""
    r = make(t=5)
    rows = list(range(5))
    for s in (slice(None, None, 2**62), slice(None, None, 2**63), slice(1, None, 2**70), slice(-(2**70), 2**70, 2)):
        assert r[s].equal(r[rows[s]]), s
    assert r[3:1].num_tokens == 0


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "index, error, match",
    [
        (torch.tensor([0, 1]).to_sparse(), mr.ArgumentTypeError, "sparse_coo tensor"),
        (np.array([2**63 + 1], np.uint64), mr.TokenIndexError, "token index 9223372036854775809 is out of range"),
        ([True, 2], mr.ArgumentTypeError, "mix bools and integers"),
    ],
    ids=["sparse", "uint64-past-int64", "bools-and-ints"],
)
def test_token_indices_that_hold_no_positions_are_refused(index: object, error: type, match: str) -> None:
    """Once a sparse index raised torch's NotImplementedError, a uint64 index past int64 was reported as a negative
    one, and [True, 2] selected tokens 1 and 2 (numpy reads True as 1)."""
    with pytest.raises(error, match=match):
        make(t=3)[index]


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # (quantized tensors are deprecated, still made)
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.tensor([[0.0, 1.0]]), 1.0, 0, torch.qint8)


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():  # (nested tensors are a prototype)
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.tensor([0, 1])])


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "rows, match",
    [
        (lambda: torch.tensor([[0, 1]]).to_sparse(), "sparse_coo tensor"),
        (_nested, "nested tensor"),
        (_quantized, "quantized tensor"),
    ],
    ids=["sparse", "nested", "quantized"],
)
def test_rows_that_are_no_dense_tensor_are_refused(rows: Callable[[], torch.Tensor], match: str) -> None:
    """Once a sparse, nested or quantized tensor of rows raised torch's own NotImplementedError or RuntimeError."""
    with pytest.raises(mr.RoutesValidationError, match=match):
        mr.Routes([rows()], names=["a"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match=match):
        mr.Routes.from_numpy(rows(), names=["a"], num_experts=4)


@pytest.mark.reliability("bad inputs")
def test_arrays_whose_numbers_are_no_expert_numbers_are_refused() -> None:
    """Once a timedelta64 array (an integer to numpy) was read as experts, and a masked array's masked values too."""
    arr = np.array([[[0, 1]], [[2, 3]]])
    with pytest.raises(mr.RoutesValidationError, match="timedelta64"):
        mr.Routes.from_numpy(arr.astype("m8[s]"), names=["a"], num_experts=4)
    masked = np.ma.masked_array(arr, mask=arr == 3)
    with pytest.raises(mr.RoutesValidationError, match="masked entries"):
        mr.Routes.from_numpy(masked, names=["a"], num_experts=4)
    assert mr.Routes.from_numpy(np.ma.masked_array(arr), names=["a"], num_experts=4).indices.tolist() == arr.tolist()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("name", [None, 1, b"layers.0.gate"], ids=["None", "int", "bytes"])
def test_router_names_that_are_no_str_are_refused(name: object) -> None:
    """Once a name that was no str was turned into one (None became a router named 'None', b'x' one named "b'x'"),
    which no module of the model has."""
    with pytest.raises(mr.ArgumentTypeError, match="router names must be str"):
        mr.Routes([torch.tensor([[0, 1]])], names=[name], num_experts=4)
    assert mr.Routes([torch.tensor([[0, 1]])], names=[np.str_("a")], num_experts=4).names == ("a",)


@pytest.mark.reliability("bad inputs")
def test_rows_of_no_expert_per_token_are_refused() -> None:
    """Once [tokens, 0] rows were taken as a router of k=0, every token of it 'missing' (no router picks none)."""
    with pytest.raises(mr.RoutesValidationError, match="k=0 experts per token"):
        mr.Routes([torch.zeros(3, 0, dtype=torch.long)], names=["a"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match="k=0 experts per token"):
        mr.Routes.from_numpy(np.zeros((3, 1, 0), np.int64), names=["a"], num_experts=4)


@pytest.mark.reliability("files")
@pytest.mark.parametrize("limit", ["10", 2.5, float("nan"), True, -1], ids=["str", "float", "nan", "bool", "negative"])
def test_a_load_limit_that_is_no_byte_count_is_refused(tmp_path: object, limit: object) -> None:
    """Once max_bytes=NaN loaded any file (a NaN limit compares false: no limit), and max_bytes="10" was reported
    as a truncated or corrupted file."""
    path = f"{tmp_path}/r.npz"
    make(t=2).save(path)
    with pytest.raises(mr.InvalidArgumentError, match="max_bytes"):
        mr.Routes.load(path, max_bytes=limit)
    assert mr.Routes.load(path, max_bytes=None).equal(make(t=2))


def _two_generates() -> tuple[mr.Routes, mr.Routes, torch.Tensor]:
    """A capture of two generate() calls of 2 prompts x 4 tokens and 3 new tokens, and a capture of one."""
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)
    prompt = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model.generate(prompt, 3)
            model.generate(prompt, 3, do_sample=True)
        two = session.routes()
        with session.capture(), torch.no_grad():
            seq = model.generate(prompt, 3)
        one = session.routes()
    return two, one, seq


def test_a_slice_of_a_capture_keeps_its_forwards() -> None:
    """Once silent: routes[a:b] dropped what a capture knew of its forwards, so routes[:] of two generate() calls
    split as one generate() of twice the prompts (each sequence got another's routes); a slice now keeps the
    rows of each forward it holds, as split_routes does."""
    two, one, seq = _two_generates()
    with pytest.raises(mr.RoutesValidationError, match="ran forwards of"):
        mr.split_generation(two, batch_size=4, prompt_len=4)
    for cut in (two[:], two[0 : two.num_tokens], two[torch.ones(two.num_tokens, dtype=torch.bool)]):
        assert cut._call_rows == two._call_rows
        with pytest.raises(mr.RoutesValidationError, match="ran forwards of"):
            mr.split_generation(cut, batch_size=4, prompt_len=4)
    # each generate()'s rows, sliced out, know the forwards of one call and split as it
    half = two.num_tokens // 2
    assert two[:half]._call_rows == two[half:]._call_rows == ((8, 1), (2, 2))
    got = mr.split_generation(one[:], batch_size=2, prompt_len=4, sequences=seq)
    want = mr.split_generation(one, batch_size=2, prompt_len=4, sequences=seq)
    assert all(a.equal(b) and torch.equal(a.token_ids, b.token_ids) for a, b in zip(got, want, strict=True))
    # a slice through a forward holds part of it: refused, not split as a generate() of its own
    with pytest.raises(mr.RoutesValidationError, match="ran forwards of"):
        mr.split_generation(one[1:], batch_size=1, prompt_len=7)  # (11 rows: 7 + 4 steps of 1 by the count)


def test_rows_picked_out_of_order_from_a_capture_are_refused_by_split_generation(tmp_path: Path) -> None:
    """Once silent: rows picked from a capture by a list, a mask or a step lost its forwards and split by their
    row count (as routes of an engine); they follow no forwards, so split_generation refuses them, saying so,
    also after save/load, Routes.cat and the wire of gather/scatter_routes."""
    from moe_replay.distributed import _known, _restore

    _, one, _ = _two_generates()
    n = one.num_tokens
    picks = [one[list(range(n - 1, -1, -1))], one[::2], one[torch.arange(n) != 3], one[[0, 2, 1, *range(3, n)]]]
    for picked in picks:
        assert picked._call_rows is None and picked._rows_picked is not None
        with pytest.raises(mr.RoutesValidationError, match="picked out of a capture's order"):
            mr.split_generation(picked, batch_size=2, prompt_len=4)
    picked = picks[-1]
    path = tmp_path / "picked.npz"
    picked.save(path)
    for back in (
        mr.Routes.load(path),
        mr.Routes.cat([picked[:5], picked[5:]]),
        mr.Routes.cat([one[:5], picked[5:]]),
        _restore(mr.Routes._trusted(picked._data, picked.names, picked.experts_per_layer), _known(picked), 0),
    ):
        assert back._rows_picked == picked._rows_picked
        with pytest.raises(mr.RoutesValidationError, match="picked out of a capture's order"):
            mr.split_generation(back, batch_size=2, prompt_len=4)
    # routes of unknown forwards (an engine's) are picked from as before: nothing to lose
    engine = mr.Routes(one.per_layer(), one.names, one.experts_per_layer)
    assert engine[::2]._rows_picked is None


def test_a_routes_file_whose_flipped_bit_marks_it_encrypted_is_refused_as_corrupted(tmp_path: Path) -> None:
    """Once a RuntimeError: a flipped bit that set a zip member's "encrypted" flag made Routes.load raise zipfile's
    "password required" RuntimeError, not the RoutesValidationError of a corrupted file."""
    path = tmp_path / "r.npz"
    make(t=3).save(path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x03\x04")  # the first local header: its general-purpose flags follow version (2 bytes)
    central = raw.find(b"PK\x01\x02")  # and the central directory's, which zipfile reads
    raw[at + 6] |= 1
    raw[central + 8] |= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
        mr.Routes.load(path)


@pytest.mark.reliability("bad inputs")
def test_a_uint8_top_1_array_of_256_experts_holding_255_is_refused_as_ambiguous() -> None:
    """Once silent: an unrecorded row (-1) cast to uint8 outside moe_replay reads 255, a valid expert of a top-1
    router of 256 experts (for k > 1 such a row repeats an expert and is refused): refused, naming the way out."""
    rows = np.array([[[3, 7]], [[-1, 0]]])[:, :, :1]
    wrapped = rows.astype(np.uint8)
    with pytest.raises(mr.RoutesValidationError, match="expert 255 and a row routed natively cannot be told apart"):
        mr.Routes.from_numpy(wrapped, names=["r"], num_experts=256)
    with pytest.raises(mr.RoutesValidationError, match="router 'b'"):
        mr.Routes.from_numpy(
            np.concatenate([rows.clip(0), wrapped], 1).astype(np.uint8), names=["a", "b"], num_experts=[200, 256]
        )
    assert mr.Routes.from_numpy(rows, names=["r"], num_experts=256).layer("r").flatten().tolist() == [3, -1]
    assert mr.Routes.from_numpy(wrapped.astype(np.int16), names=["r"], num_experts=256).layer(
        "r"
    ).flatten().tolist() == [3, 255]
    with pytest.raises(mr.RoutesValidationError, match="rows are uint8, which holds expert numbers up to 255"):
        mr.Routes.from_numpy(wrapped, names=["r"], num_experts=257)  # (255 may be a wrapped -1 here too)


@pytest.mark.reliability("bad inputs")
def test_a_wrapped_missing_row_is_refused_however_the_rows_come_in() -> None:
    """Once silent: only Routes.from_numpy (with the expert counts as an int, list or tuple) refused a uint8 top-1
    array of 256 experts holding 255. Routes([...]) given the same rows as uint8 tensors or arrays (routes.indices
    cast to uint8 for transport, then split per router) read a -1 row wrapped to 255 as expert 255, and from_numpy
    with the counts as an array did too; and to_numpy(np.uint8) wrote such an array, which from_numpy then refused."""
    names = ["model.layers.0.mlp.gate"]
    wrapped = torch.tensor([[3], [-1]]).to(torch.uint8)  # [[3], [255]]: the unrecorded row of token 1
    for rows in (wrapped, wrapped.numpy()):
        with pytest.raises(mr.RoutesValidationError, match="expert 255 and a row routed natively cannot be told apart"):
            mr.Routes([rows], names=names, num_experts=256)
    with pytest.raises(mr.RoutesValidationError, match="expert 255 and a row routed natively"):
        mr.Routes.from_numpy(wrapped.numpy()[:, None], names=names, num_experts=np.array([256]))
    if hasattr(torch, "uint16"):
        with pytest.raises(mr.RoutesValidationError, match=r"expert 65535 .*np\.int32"):
            mr.Routes([torch.tensor([[65535]], dtype=torch.uint16)], names=names, num_experts=65536)
    real = mr.Routes([torch.tensor([[3], [255]])], names=names, num_experts=256)  # 255 is the expert here
    with pytest.raises(mr.RoutesValidationError, match=r"to_numpy\(uint8\) would write .*np\.int16"):
        real.to_numpy(np.uint8)
    assert mr.Routes.from_numpy(real.to_numpy(np.int16), names=names, num_experts=256).equal(real)
    # nothing else is refused: k > 1 (a wrapped row repeats an expert), fewer experts, signed rows
    assert mr.Routes([torch.tensor([[255, 3]]).to(torch.uint8)], names=names, num_experts=256).num_tokens == 1
    assert mr.Routes([torch.tensor([[3], [200]]).to(torch.uint8)], names=names, num_experts=255).num_tokens == 2
    # (more experts than uint8 writes: 255 may be a wrapped -1 as well, and is refused with the dtype named)
    with pytest.raises(mr.RoutesValidationError, match="rows are uint8, which holds expert numbers up to 255"):
        mr.Routes([wrapped], names=names, num_experts=257)
    assert mr.Routes([torch.tensor([[3], [-1]])], names=names, num_experts=256).missing.flatten().tolist() == [
        False,
        True,
    ]


@pytest.mark.reliability("round trips")
def test_cat_keeps_which_rows_a_capture_recorded_at_prompt_padding() -> None:
    """Once silent: Routes.cat of rows picked out of order, or of a capture's rows beside routes of unknown
    forwards, dropped each row's prompt mask: compare() then counted the rows recorded at padding as decisions."""
    model = mr.models.build("softmax_topk")
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=mask)
        a = session.routes()
    plain = mr.Routes(list(a.per_layer()), names=a.names, num_experts=a.experts_per_layer)
    assert mr.compare(a, plain).padding_rows == 8
    even, odd = torch.arange(0, 12, 2), torch.arange(1, 12, 2)
    picked = mr.Routes.cat([a[even], a[odd]])
    assert mr.compare(picked, mr.Routes.cat([plain[even], plain[odd]])).padding_rows == 8
    mixed = mr.Routes.cat([a[:6], plain[6:]])  # (the second part's padding is not known: its rows are compared)
    assert mixed._fed_mask is not None and mixed._fed_mask.tolist() == [0, 0, 1, 1, 1, 1] + [-1] * 6
    c = mr.compare(mixed, plain)
    assert c.padding_rows == 4 and c.tokens == 10


@pytest.mark.reliability("files")
def test_a_prompt_mask_of_more_runs_than_the_metadata_holds_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once silent: a capture's prompt mask of more runs than a file's metadata keeps (the padded sequences of a
    large rollout) was left out of the file: loaded, its rows recorded at padding were compared as decisions, and a
    replay no longer knew them."""
    model = mr.models.build("softmax_topk")
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=mask)
        a = session.routes()
    monkeypatch.setattr(mr.routes, "_MAX_RUNS", 2)  # (a mask of 6 runs: past it)
    a.save(tmp_path / "a.npz")
    back = mr.Routes.load(tmp_path / "a.npz")
    assert back._fed_mask is not None and back._fed_mask.tolist() == a._fed_mask.tolist()
    assert mr.compare(back, a) == mr.compare(a, a) and mr.compare(back, a).padding_rows == 10
    # a mask of another length than the rows is refused, as a corrupted file
    with np.load(tmp_path / "a.npz") as f:
        arrays = dict(f)
    arrays["prompt_mask"] = arrays["prompt_mask"][:-1]
    np.savez_compressed(tmp_path / "bad.npz", **arrays)
    with pytest.raises(mr.RoutesValidationError, match="prompt mask"):
        mr.Routes.load(tmp_path / "bad.npz")


@pytest.mark.reliability("files")
def test_a_capture_of_more_call_runs_than_the_metadata_holds_keeps_its_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once dropped without a word: the rows of each router call of a capture of more runs of calls than a file's
    metadata keeps (forwards of changing sizes) were left out of the file, so the loaded routes no longer knew where
    one forward ends and the next begins."""
    model = mr.models.build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            for n in (3, 5, 2, 4):
                model(torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n)))
        a = session.routes()
    assert a._call_rows is not None and len(a._call_rows) == 4
    monkeypatch.setattr(mr.routes, "_MAX_RUNS", 2)  # (4 runs of calls: past it)
    a.save(tmp_path / "a.npz")
    back = mr.Routes.load(tmp_path / "a.npz")
    assert back._call_rows == a._call_rows and back.equal(a)
    with np.load(tmp_path / "a.npz") as f:
        arrays = dict(f)
    for bad in (arrays["call_runs"][:-1], arrays["call_runs"] * np.array([1, 0]), arrays["call_runs"][:, :1]):
        np.savez_compressed(tmp_path / "bad.npz", **{**arrays, "call_runs": bad})
        with pytest.raises(mr.RoutesValidationError, match="calls"):
            mr.Routes.load(tmp_path / "bad.npz")


def test_a_long_cache_class_name_in_what_routes_say_of_their_forwards_loads(tmp_path: Path) -> None:
    """save() wrote the text of a cache move that names its cache's class, and load() refused its own file as
    corrupted where that text passed 200 characters (a cache class of a long qualified name)."""
    model = mr.models.build("softmax_topk")
    with mr.attach(model) as session:
        with session.capture():
            model(torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(1)))
        a = session.routes()
    a._rows_moved = "a cache of class " + "pkg.module." * 40 + "Cache rolled back"
    a.save(tmp_path / "a.npz")
    assert mr.Routes.load(tmp_path / "a.npz")._rows_moved == a._rows_moved


@pytest.mark.reliability("round trips")
def test_the_token_order_of_rows_captured_sequence_first_stays_with_them() -> None:
    """Routes captured from routers that see a [2, 4] batch sequence-first hold row ``p * 2 + b`` for token ``(b, p)``.
    Slices, picks, cat, select, rename and with_token_ids keep each row's place in the order of the tokens, so that
    the rows they hold are laid out sequence by sequence where they are (an engine format, a batch layout)."""
    from moe_replay.routes import in_token_order
    from tests.test_batch import _sequence_first_captures

    captured, alone, _ = _sequence_first_captures([4, 4])
    batch_major = mr.Routes.cat(alone)  # (token (b, p) at row b * 4 + p)

    def token_of(row: int) -> int:  # the batch-major place of the token of a captured row
        return (row % 2) * 4 + row // 2

    picks = {
        "all": list(range(8)),
        "slice": list(range(2, 7)),
        "reversed": list(range(7, -1, -1)),
        "picked": [5, 0, 3],
    }
    for name, rows in picks.items():
        got = in_token_order(captured[torch.tensor(rows)] if name != "slice" else captured[2:7], "test")
        want = batch_major[torch.tensor(sorted(token_of(r) for r in rows))]
        assert got.equal(want) and torch.equal(got.token_ids, want.token_ids), name
    for name, same in {
        "select": captured.select(list(captured.names)),
        "rename": captured.rename({"": "module."}).rename({"module.": ""}),
        "with_token_ids": captured.with_token_ids(None),
    }.items():
        assert in_token_order(same, "test").equal(batch_major), name
    two = in_token_order(mr.Routes.cat([captured[4:], batch_major[:2], captured]), "test")
    want = mr.Routes.cat(
        [batch_major[torch.tensor(sorted(token_of(r) for r in range(4, 8)))], batch_major[:2], batch_major]
    )
    assert two.equal(want) and torch.equal(two.token_ids, want.token_ids)
    tried(len(picks) + 4)


@pytest.mark.reliability("bad inputs")
def test_batch_ids_given_to_rows_captured_sequence_first_go_to_their_own_tokens() -> None:
    """Once a false refusal: ``with_token_ids(ids)`` read a ``[batch, positions]`` grid row-major onto the rows, but
    routers that see the batch sequence-first record position 0 of every sequence first, so each row got another
    token's id and a replay of the very batch the capture ran was refused (and the layouts and engine writers gave
    sequences the ids of other tokens). The grid now goes to each row's own token; ids in row order, one per row,
    are taken as they are; and a grid for rows whose tokens the capture could not tell is refused."""
    from tests.test_batch import _sequence_first_captures

    captured, _, ids = _sequence_first_captures([4, 4])
    bare = captured.with_token_ids(None)
    for given in (ids, ids.numpy(), ids.tolist()):
        assert torch.equal(bare.with_token_ids(given).token_ids, captured.token_ids)
    assert torch.equal(bare.with_token_ids(captured.token_ids).token_ids, captured.token_ids)  # (row order)
    assert not torch.equal(captured.token_ids, ids.reshape(-1))  # (the rows are not in the grid's order)
    sliced = bare[2:7]
    assert torch.equal(sliced.with_token_ids(captured.token_ids[2:7]).token_ids, captured.token_ids[2:7])
    from tests.test_feeds import _batch, _SequenceFirst

    model = _SequenceFirst().eval()
    with mr.attach(model, capacity=8, keep_newest=True) as session, torch.no_grad():
        with session.capture():  # (a ring that wrapped: which token each row was is not known)
            for seed in range(2):
                model(_batch(seed, rows=2, width=4))
        unknown = session.routes()
    last = _batch(1, rows=2, width=4)
    with pytest.raises(mr.RoutesValidationError, match="sequence-first.*one id per row, in row order"):
        unknown.with_token_ids(last)
    assert torch.equal(unknown.with_token_ids(last.t().reshape(-1)).token_ids, last.t().reshape(-1))
    tried(6)


@pytest.mark.reliability("round trips")
def test_rows_in_the_untold_order_of_their_routers_keep_it_where_their_router_calls_stay_whole(tmp_path) -> None:
    """Rows of a capture fed embeddings are in the order the routers saw the tokens, which no one told
    (``_order_untold``: no order check when replayed). Slices and picks of whole router calls, each in order, cat of
    parts that all have it, and save/load keep it; rows that break a call, and cat with other rows, drop it (a
    replay of them is then checked). Where the calls are not known, only all the rows in order keep it."""
    rows = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]])
    routes = mr.Routes([rows], names=["gate"], num_experts=4)
    routes._call_rows, routes._order_untold = ((2, 1), (3, 1)), True  # (two forwards: rows 0-1, then rows 2-4)
    kept = {
        "all": slice(None),
        "first call": slice(0, 2),
        "second call": slice(2, 5),
        "second call by index": torch.arange(2, 5),
        "calls swapped": [2, 3, 4, 0, 1],
        "a call twice": [0, 1, 0, 1],
        "mask": torch.tensor([False, False, True, True, True]),
        "nothing": slice(0, 0),
    }
    dropped = {"cut": slice(1, 3), "one row": 0, "reversed": [1, 0], "step": slice(0, 5, 2), "short": [2, 3]}
    for name, index in {**kept, **dropped}.items():
        assert routes[index]._order_untold is (name in kept), name
    unknown = mr.Routes([rows], names=["gate"], num_experts=4)
    unknown._order_untold = True  # (forwards that did not line up with the rows)
    assert unknown[:]._order_untold and not unknown[:2]._order_untold and not unknown[[0, 1, 2, 3, 4]][1:]._order_untold
    plain = mr.Routes([rows[:1]], names=["gate"], num_experts=4)
    empty = mr.Routes([rows[:0]], names=["gate"], num_experts=4)
    assert mr.Routes.cat([routes[:2], routes[2:], empty])._order_untold
    assert not mr.Routes.cat([routes, plain])._order_untold
    routes.save(tmp_path / "r.npz")
    back = mr.Routes.load(tmp_path / "r.npz")
    assert back._order_untold and back.equal(routes) and back._call_rows == routes._call_rows
    plain.save(tmp_path / "p.npz")
    assert not mr.Routes.load(tmp_path / "p.npz")._order_untold
    with np.load(tmp_path / "r.npz") as f:
        arrays = dict(f)
    for bad in ({"order_untold": np.array([True])}, {"order_untold": np.array(1)}, {"token_order": np.arange(5)[::-1]}):
        np.savez_compressed(tmp_path / "bad.npz", **{**arrays, **bad})
        with pytest.raises(mr.RoutesValidationError, match="corrupted"):
            mr.Routes.load(tmp_path / "bad.npz")
    tried(len(kept) + len(dropped) + 9)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("sequence_first", [True, False], ids=["sequence-first", "batch-major"])
def test_rows_whose_order_the_capture_could_not_tell_replay_but_are_not_laid_out_by_token(sequence_first: bool) -> None:
    """Once silent: a [2, 4] batch fed as embeddings with a KV cache that already held tokens (a second chunk of a
    prompt) is a forward whose token order the capture cannot tell (runs without the cache would see other rows), and
    its rows, in the order the routers saw them, were laid out and compared sequence by sequence: on routers that
    see the batch sequence-first, each sequence got the other's rows. They still replay exactly on the forward they
    were captured from, but whatever reads them in token order (the batch layouts, split_generation, compare with
    rows in token order, an engine format) refuses them, saying to feed the ids."""
    from tests.test_feeds import _batch, _CachedLayout, _Held

    model = _CachedLayout(sequence_first).eval()
    ids = _batch(rows=2, width=4)
    embeds = model.embed(ids).detach()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            out = model(inputs_embeds=embeds, past_key_values=_Held(3))
        routes = session.routes()
        with session.capture(), session.replay(routes):
            replayed = model(inputs_embeds=embeds, past_key_values=_Held(3))
        assert session.routes().equal(routes) and torch.equal(replayed, out)
        alone = []
        for row in embeds:  # (each sequence alone, fed the same way: the rows it must get)
            with session.capture():
                model(inputs_embeds=row[None], past_key_values=_Held(3))
            alone.append(session.routes())
    batch_major = mr.Routes.cat(alone)  # (the rows in token order, as an engine or a layout holds them)
    assert batch_major.equal(routes) is not sequence_first  # (read sequence by sequence: others' rows)
    uses: dict[str, Callable[[], object]] = {
        "BatchLayout.unpack": lambda: mr.BatchLayout.padded([4, 4]).unpack(routes),
        "split_generation": lambda: mr.split_generation(routes, batch_size=2, prompt_len=4),
        "compare": lambda: mr.compare(routes, batch_major),
        "to_megatron": lambda: mr.interop.to_megatron(routes, batch_size=2),
    }
    for use in uses.values():
        with pytest.raises(mr.RoutesValidationError, match="could not tell.*input_ids"):
            use()
    # (a [batch, positions] grid of ids lists the tokens sequence by sequence: it fits no row order that is not told)
    with pytest.raises(mr.RoutesValidationError, match="could not tell.*give one id per row, in row order"):
        routes.with_token_ids(ids)
    tried(len(uses) + 2)


@pytest.mark.reliability("round trips")
def test_the_rows_of_a_sequence_first_capture_are_read_in_token_order_through_a_public_method(tmp_path) -> None:
    """to_numpy(), indices and layer() give rows in the order the routers saw them: position 0 of every sequence first
    for routers that see the batch sequence-first. Routes.in_token_order() gives them sequence by sequence, each row
    with its own token's id, as captures of each sequence alone record them (saved and loaded too); routes already
    in that order come back as they are; rows whose order is not known are refused."""
    from tests.test_batch import _sequence_first_captures

    captured, alone, ids = _sequence_first_captures([4, 4])
    batch_major = mr.Routes.cat(alone)
    assert not np.array_equal(captured.to_numpy(), batch_major.to_numpy())  # (the routers' order)
    captured.save(tmp_path / "r.npz")
    for routes in (captured, mr.Routes.load(tmp_path / "r.npz")):
        ordered = routes.in_token_order()
        assert np.array_equal(ordered.to_numpy(), batch_major.to_numpy())
        assert torch.equal(ordered.token_ids, ids.reshape(-1))
    assert batch_major.in_token_order() is batch_major
    unknown = mr.Routes.from_numpy(captured.to_numpy(), names=list(captured.names), num_experts=8)
    unknown._token_rank = torch.full((8,), -1)  # (rows recorded sequence-first by forwards that did not line up)
    with pytest.raises(mr.RoutesValidationError, match="Routes.in_token_order.*could not tell"):
        unknown.in_token_order()
    tried(4)


@pytest.mark.reliability("files")
@pytest.mark.parametrize("call", ["save", "load"])
def test_a_path_holding_a_nul_character_is_refused_as_such(tmp_path: Path, call: str) -> None:
    """A path built from bytes with a NUL in it: save() raised os.path's bare ValueError ("embedded null byte") and
    load() answered "no such file"; both name the character."""
    path = str(tmp_path / "routes\0.npz")
    with pytest.raises(mr.InvalidArgumentError, match="NUL character"):
        make().save(path) if call == "save" else mr.Routes.load(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability("files")
def test_a_file_name_of_the_longest_length_is_saved_and_a_longer_one_refused(tmp_path: Path) -> None:
    """A name as long as the file system takes could not be saved: the new file written beside it first was named
    after it, plus a suffix, and that name was too long (a bare OSError). It is saved now; a longer one is refused by
    save(), naming the limit, and nothing is left in the folder."""
    routes = make()
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    longest = tmp_path / ("r" * (limit - 4) + ".npz")
    routes.save(longest)
    assert mr.Routes.load(longest).equal(routes)
    assert [p.name for p in tmp_path.iterdir()] == [longest.name]
    with pytest.raises(mr.InvalidArgumentError, match=f"longer than the {limit} this file system takes"):
        routes.save(tmp_path / ("r" * limit + ".npz"))
    assert [p.name for p in tmp_path.iterdir()] == [longest.name]


@pytest.mark.reliability("files")
@pytest.mark.parametrize("call", ["save", "load"])
def test_a_path_beginning_with_a_tilde_that_names_nothing_says_it_is_not_expanded(call: str) -> None:
    """``save("~/runs/routes.npz")``: the folder ``~`` does not exist (no shell expands it), and "create it first"
    would have the user make a folder named ``~``; the error says it is not expanded and how to expand it."""
    path = "~/no-such-folder-of-moe-replay/routes.npz"
    error = mr.MissingFileError
    with pytest.raises(error, match=r"'~' is not expanded here: pass os\.path\.expanduser"):
        make().save(path) if call == "save" else mr.Routes.load(path)
    assert not os.path.exists("~")


@pytest.mark.reliability("files")
def test_a_file_that_cannot_be_opened_is_not_called_corrupted(tmp_path: Path, monkeypatch) -> None:
    """A routes file this user may not read was refused as "truncated or corrupted (PermissionError ...)": the error
    is the OS's own, naming the file, and the same file loads once it can be opened."""
    import builtins

    import moe_replay.routes as routes_module

    path = tmp_path / "r.npz"
    make().save(path)

    def denied(file: object, *args: object, **kwargs: object) -> object:
        if os.fspath(file) == os.fspath(path):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return builtins.open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(routes_module, "open", denied, raising=False)
    with pytest.raises(PermissionError, match="Permission denied") as err:
        mr.Routes.load(path)
    assert "corrupted" not in str(err.value)
    monkeypatch.undo()
    assert mr.Routes.load(path).equal(make())


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("sequence_first", [True, False], ids=["sequence-first", "batch-major"])
def test_rows_of_an_untold_order_keep_their_mark_through_every_routes_made_from_them(
    sequence_first: bool, tmp_path
) -> None:
    """Once silent: the rows of a forward fed embeddings whose token order the capture could not tell lost that mark
    once sliced through the forward, picked, joined with rows of a told order, or captured beside a forward fed ids
    (routers that see the batch sequence-first): layouts, compare and the engine formats then read them sequence by
    sequence. The mark is each row's own now, carried by every Routes made from them (slices, picks, cat, files, the
    wire, rename, select, ids), while the rows of the forward fed ids are still laid out."""
    from moe_replay.distributed import _known, _restore
    from tests.test_feeds import _batch, _CachedLayout, _Held

    model = _CachedLayout(sequence_first).eval()
    ids = _batch(rows=2, width=4)
    embeds = model.embed(ids).detach()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(inputs_embeds=embeds, past_key_values=_Held(3))
        untold = session.routes()
        with session.capture():  # (before any forward fed ids: the order is not told yet)
            model(inputs_embeds=embeds, past_key_values=_Held(3))  # (rows 0-7: in an order not told)
            model(ids)  # (rows 8-15: fed ids, their order told)
        mixed = session.routes()
        with session.capture():
            model(ids)
        alone = session.routes()
    assert untold._order_untold and not mixed._order_untold  # (every row of one in an untold order; half of the other)
    told = mixed[8:]
    assert told.in_token_order().equal(alone.in_token_order())  # (the forward fed ids: laid out as captured alone)
    untold[1:5].save(tmp_path / "cut.npz")
    cut = untold[1:5]
    bare = mr.Routes._trusted(cut._data, cut.names, cut.experts_per_layer)  # (as a rank receives the rows)
    made = {
        "the capture beside a forward fed ids": mixed,
        "a slice through the forward": untold[:3],
        "a slice of the mixed capture through both forwards": mixed[6:10],
        "a pick": untold[[5, 0, 3]],
        "a mask": untold[torch.arange(8) % 3 == 0],
        "a step": untold[::2],
        "one row": untold[0],
        "cat with rows of a told order": mr.Routes.cat([untold[:4], told]),
        "cat after rows of a told order": mr.Routes.cat([told, untold]),
        "saved and loaded": mr.Routes.load(tmp_path / "cut.npz"),
        "sent to another rank": _restore(bare, _known(cut), 0),
        "renamed": cut.rename({"": "model."}),
        "selected": cut.select(cut.names[:1]),
        "given ids": cut.with_token_ids(torch.arange(cut.num_tokens)),
    }
    for name, routes in made.items():
        plain = mr.Routes(list(routes.per_layer()), names=routes.names, num_experts=routes.experts_per_layer)
        uses: dict[str, Callable[[], object]] = {
            "in_token_order": routes.in_token_order,
            "BatchLayout.unpack": lambda r=routes: mr.BatchLayout.padded([r.num_tokens]).unpack(r),
            "compare": lambda r=routes, p=plain: mr.compare(r, p),
            "an engine format": lambda r=routes: mr.interop.to_megatron(r, batch_size=1),
        }
        for use, run in uses.items():
            with pytest.raises(mr.RoutesValidationError, match="could not tell.*input_ids"):
                run()
                pytest.fail(f"{name}: {use} read rows of an untold order")
    tried(len(made) * 4 + 1)


@pytest.mark.reliability("round trips")
def test_a_sequence_first_capture_cut_through_a_forward_and_joined_again_keeps_its_tokens_order() -> None:
    """Once silent: Routes.cat put each part's tokens after the parts before it, so the two halves of a [2, 4] forward
    of routers that see it sequence-first (split_routes, a rank's share each), joined again, were laid out as tokens
    (0, 0), (0, 1), (1, 0), (1, 1), (0, 2)...: every layout and engine format put rows at other tokens. Parts holding
    places none of the parts before them hold keep them; parts of their own (each from place 0) follow each other."""
    from tests.test_feeds import _batch, _SequenceFirst

    model = _SequenceFirst().eval()
    ids = _batch(rows=2, width=4)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes()
        with session.capture():
            model(ids[:1])
        first = session.routes()
    want = routes.in_token_order()
    for parts in ([4, 4], [3, 5], [1, 6, 1]):
        joined = mr.Routes.cat(mr.distributed.split_routes(routes, parts)).in_token_order()
        assert joined.equal(want) and torch.equal(joined.token_ids, want.token_ids), parts
    twice = mr.Routes.cat([routes, routes]).in_token_order()  # (two captures of their own: one after the other)
    assert twice.equal(mr.Routes.cat([want, want])) and twice[:4].equal(first.in_token_order())


@pytest.mark.reliability("round trips")
def test_each_routers_own_token_ids_and_their_loss_stay_with_every_routes_made_from_them(tmp_path) -> None:
    """Once silent: routes whose routers hold different row counts (one MoE block at two layers) knew no token ids,
    so a replay took them in any order. Each router's own ids, and the mark of a capture that could not keep them,
    travel with every Routes made from them (a file, the wire, select, rename, slices, cat, layouts): what they make
    replays in the capture's order and refuses another."""
    from moe_replay.distributed import _known, _restore
    from tests.test_feeds import _batch

    model = mr.models.build("softmax_topk", num_layers=3)
    model.layers[2].mlp = model.layers[0].mlp
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(a)
            model(b)
        routes = session.routes()
        shared = routes.names[0]
        routes.save(tmp_path / "r.npz")
        wired = _restore(mr.Routes._trusted(routes._data, routes.names, routes.experts_per_layer), _known(routes), 0)
        made = [
            mr.Routes.load(tmp_path / "r.npz"),
            wired,
            routes.rename({"": "module."}).rename({"module.": ""}),
            mr.Routes.cat([routes.select(routes.names)]),
        ]
        for kept in made:
            with session.replay(kept):
                model(a)
                model(b)
            with pytest.raises(mr.TokenMismatchError, match="other tokens"):
                with session.replay(kept):
                    model(b)
                    model(a)
        one = routes.select([shared])  # (one router: one row count again, its two calls per forward)
        n = 2 * a.numel()
        for part, x in ((one[:n], a), (one[n:], b), (mr.BatchLayout.packed([n]).routes([one[:n]]), a)):
            with session.replay(part, strict=False):
                model(x)
            with pytest.raises(mr.TokenMismatchError, match="other tokens"):
                with session.replay(part, strict=False):
                    model(b if x is a else a)
        lost = routes.with_token_ids(None)
        lost._ids_lost = "a router called on a part of a forward's tokens"  # (as a capture marks it)
        wired = _restore(mr.Routes._trusted(lost._data, lost.names, lost.experts_per_layer), _known(lost), 0)
        lost.save(tmp_path / "lost.npz")
        for kept in (mr.Routes.load(tmp_path / "lost.npz"), wired, lost.select([shared])[:3], mr.Routes.cat([lost])):
            assert kept._ids_lost == lost._ids_lost
            with pytest.raises(mr.TokenMismatchError, match="could not keep for every row"):
                with session.replay(kept, strict=False):
                    model(a)


@pytest.mark.reliability("silent replays")
def test_rows_of_routers_of_as_many_rows_but_other_tokens_are_not_picked_by_one_index() -> None:
    """Once silent: a decoder's canvas routes 12, 6 and 18 rows beside the encoder's 24, 6 and 6, as many in all; a
    slice of the rows of the second forward held its encoder rows but other rows of the decoder (the third forward's,
    unchecked: its ids are unknown), and replayed on that forward forced them without a word. A pick or a layout of
    such rows by one index is refused; one router's rows are picked as before."""
    from tests.test_feeds import _batch, _Canvas

    torch.manual_seed(0)
    model = _Canvas()
    a, c, b = _batch(1, rows=4, width=6), _batch(3, rows=2, width=3), _batch(2, rows=6, width=1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(a)
            model(c)
            model(b)
        routes = session.routes()
        assert len(set(routes.tokens_per_layer)) == 1  # the premise: as many rows each
        with pytest.raises(mr.RoutesValidationError, match="not of the same tokens"):
            routes[24:30]
        with pytest.raises(mr.RoutesValidationError, match="not of the same tokens"):
            mr.BatchLayout.packed([36]).routes([routes])
        encoder = routes.select(routes.names[:1])[24:30]
        with session.replay(encoder, strict=False):
            model(c)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(encoder, strict=False):
                model(_batch(4, rows=2, width=3))


_NO_POSITIONS = {
    "empty float tensor": torch.tensor([]),
    "empty float64 array": np.array([], dtype=np.float64),
    "empty float16 tensor": torch.zeros(0, dtype=torch.float16),
    "empty complex tensor": torch.zeros(0, dtype=torch.complex64),
    "float tensor": torch.tensor([0.0, 1.0]),
    "complex tensor": torch.tensor([0, 1], dtype=torch.complex64),
    "float list": [0.0, 1.0],
    "short bool mask": torch.tensor([True, False]),
    "long bool mask": np.ones(4, dtype=bool),
    "empty bool mask": torch.zeros(0, dtype=torch.bool),
    "short bool list": [True, False],
    "2-d positions": torch.zeros(1, 1, dtype=torch.long),
    "0-d bool": torch.tensor(True),
    "0-d float": torch.tensor(1.0),
    "bool": True,
    "float": 1.0,
    "str": "0",
    "None": None,
    "dict": {0: 1},
    "set": {0, 1},
    "float slice": slice(0.0, 2.0),
    "zero step": slice(None, None, 0),
    "negative step": slice(None, None, -1),
    "tuple": (0, 1),
    "ellipsis": Ellipsis,
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("index", list(_NO_POSITIONS.values()), ids=list(_NO_POSITIONS))
def test_token_indices_of_no_positions_are_refused_like_every_bad_index(index: object) -> None:
    """Once an empty float index (``routes[torch.tensor([])]``, ``np.array([])``) was taken as no rows, while a float
    index of any length is refused: floats, complex numbers and masks of another length hold no token positions,
    whatever their length. An empty list stays an empty pick (numpy and torch take it alike)."""
    r = make(t=3)
    with pytest.raises(mr.MoEReplayError):
        r[index]  # type: ignore[index]
    assert r[[]].num_tokens == 0 and r[torch.zeros(0, dtype=torch.long)].num_tokens == 0
    assert r[np.zeros(0, dtype=np.int64)].num_tokens == 0 and r[torch.zeros(3, dtype=torch.bool)].num_tokens == 0
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "take",
    [
        lambda r: r[:],
        lambda r: r[0 : r.num_tokens],
        lambda r: r[-r.num_tokens :],
        lambda r: r[::1],
        lambda r: r[: 2**40],
        lambda r: r[:][:],
        lambda r: mr.distributed.split_routes(r, [r.num_tokens])[0],
        lambda r: mr.Routes.cat(mr.distributed.split_routes(r, [3, r.num_tokens - 3])),
    ],
    ids=["[:]", "[0:n]", "[-n:]", "[::1]", "[:huge]", "[:][:]", "split_routes(n)", "split_routes then cat"],
)
def test_every_row_of_routes_an_engine_reader_placed_by_their_count_keeps_refusing_a_partial_replay(
    take: Callable[[mr.Routes], mr.Routes],
) -> None:
    """Once silent: a slice that takes every row (``routes[:]``) and the shares of ``split_routes`` dropped the mark of
    rows an engine reader placed by their row count alone, so a ``strict=False`` replay of them that left rows unread
    (a row too many at the front: every token given its neighbour's experts) was taken without a word. A slice of
    fewer rows (``routes[:n]``, the partial replay the readers' docs give) still drops it, by the caller's choice."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(ids)
        captured = session.routes()
        lm = mr.LayerMap.from_session(session, num_layers=3)
        arr = mr.interop.to_vllm_legacy(captured, lm, drop_last=True)
        exact = mr.interop.from_vllm_legacy(arr, lm)  # (read without num_tokens: placed by the row count alone)
        front = mr.interop.from_vllm_legacy(np.concatenate([arr[-1:], arr]), lm)  # a row too many at the front

        def replayed(routes: mr.Routes) -> mr.Routes:
            with session.replay(routes, strict=False), session.capture(), torch.no_grad():
                model(ids)
            return session.routes()

        assert replayed(take(exact)).equal(captured)
        with pytest.raises(mr.ReplayConsumptionError, match="left rows unread of routes from_vllm_legacy"):
            replayed(take(front))
        assert replayed(front[1:]).equal(captured)  # (rows chosen by the caller: a partial replay, as documented)
    tried(2)


@pytest.mark.reliability("bad inputs")
def test_in_asks_for_a_router_by_name() -> None:
    """Once ``"layers.0.gate" in routes`` iterated the rows (routes are indexed by token) and answered False for every
    router name without a word; now it asks for a router by name, and anything else is refused."""
    r = make(layers=2)
    assert "layers.0.gate" in r and "layers.1.gate" in r and "layers.2.gate" not in r
    assert "layers.0.gate" not in r.select(["layers.1.gate"])
    for other in (0, r[0], None):
        with pytest.raises(mr.ArgumentTypeError, match="by name"):
            other in r  # noqa: B015
    tried(4)


#: every mark a Routes keeps beside its rows (the attributes ``Routes._trusted`` sets past names, counts, rows)
_MARKS = (
    "_call_rows",
    "_dropped_rows",
    "_token_ids",
    "_fed_mask",
    "_seq_pos",
    "_layout_pos",
    "_token_rank",
    "_order_untold",
    "_routers_order",
    "_rows_moved",
    "_caches_interleaved",
    "_rows_picked",
    "_rows_untold",
    "_recorded_names",
    "_router_ids",
    "_ids_lost",
    "_prompt_kept",
    "_cut_from",
    "_joined",
    "_forward_calls",
    "_router_calls",
    "_lineage",
    "_token_choices",
    "_choice_forwards",
    "_choice_places",
    "_ids_settings",
)
#: the marks that hold one value per row (``_router_ids``: per router and row)
_ROW_MARKS = ("_token_ids", "_fed_mask", "_seq_pos", "_layout_pos", "_token_rank", "_router_ids", "_lineage")


def _marked(kind: str) -> mr.Routes:
    """Routes of 2 routers and 8 rows (two forwards of 4) with every mark set, as a capture sets them: ``ids`` one
    token id per row and a told order of routers that saw the tokens sequence-first, ``routers`` each router's own
    ids (one of them at prompt padding) and an order left untold."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(8)]) for _ in range(2)]
    r = mr.Routes(rows, names=["enc.layers.0.gate", "enc.layers.1.gate"], num_experts=6)
    r._call_rows, r._dropped_rows = ((4, 2),), 2
    r._forward_calls = (1, 1)  # (each router called once in each of the two forwards)
    r._fed_mask = torch.tensor([1, 1, 0, 1, -1, -1, -1, -1], dtype=torch.int8)
    r._layout_pos = torch.tensor([0, 1, 2, -1, 0, 1, -1, -2])  # (a BatchLayout's places, then rows not laid out)
    r._seq_pos = torch.tensor([0, 1, -1, 2, 3, 3, 4, -1])  # (each row's place in its sequence, -1 at padding)
    r._lineage = torch.tensor([0, 0, 0, 0, 4, 5, 6, 7])  # (the second forward went on from the first's cache)
    r._rows_moved, r._caches_interleaved, r._rows_untold = "DynamicCache.crop", "DynamicCache", "from_vllm"
    r._recorded_names = (*r.names, "dec.layers.0.gate")
    r._joined = 2  # (joined by Routes.cat from the routes of two sequences)
    r._prompt_kept = torch.tensor([[False, True, True], [True, True, False]])  # (its first forward's 4 rows)
    r._token_choices = (("enc.mod", torch.tensor([[2, 0]])), ("enc.mod", torch.tensor([[1, 3]])))  # (a MoD's choices)
    r._choice_forwards = (1, 1)  # (one ranking in each forward)
    r._choice_places = (
        {"enc.layers.0.gate": 0, "enc.layers.1.gate": 0},
        {"enc.layers.0.gate": 4, "enc.layers.1.gate": 4},
    )
    r._ids_settings = {"enc.layers.1.gate": (("offset", "1"), ("remap.k", "2"))}  # (a remap of its ids read them)
    if kind != "routers":  # (a capture that kept no router's ids, or kept one router's and lost the other's)
        r._ids_lost = "router 'x' made calls on a part of a forward's tokens"
    if kind == "lost":
        r._router_ids = (torch.full((8,), mr.routes.LOST_ID), torch.tensor([10, 11, -3, 13, 14, 15, 16, 17]))
    elif kind == "ids":
        r._token_ids = torch.arange(8) + 10
        r._token_rank, r._routers_order = torch.tensor([0, 2, 1, 3, 4, 6, 5, 7]), True
    else:
        ids = torch.tensor([10, 11, -3, 13, 14, 15, 16, 17])
        r._router_ids, r._order_untold = (ids, ids.clone()), True
        r._router_calls = ((((4, 2),), (1, 1)),) * 2  # (each router's own calls: one in each forward)
    return r


def _same_mark(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and a and isinstance(a[0], tuple | str):  # (names; paths and indices: token choices)
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_mark(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, tuple) and a and isinstance(a[0], torch.Tensor):
        return isinstance(b, tuple) and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b and type(a) is type(b)


def _expected(base: mr.Routes, rows: torch.Tensor, routers: list[int], **changed: Any) -> dict[str, Any]:
    """The marks of routes holding rows ``rows`` of routers ``routers`` of ``base``: each row's marks go with it,
    what holds for every row stays, but for ``changed``."""
    from moe_replay.routes import _out_of_order

    want = {m: getattr(base, m) for m in _MARKS}
    if base._token_ids is not None:
        want["_token_ids"] = base._token_ids[rows]
    if base._fed_mask is not None:
        want["_fed_mask"] = base._fed_mask[rows]
    if base._seq_pos is not None:
        want["_seq_pos"] = base._seq_pos[rows]
    if base._lineage is not None:
        want["_lineage"] = base._lineage[rows]
    if base._layout_pos is not None:
        want["_layout_pos"] = base._layout_pos[rows]
    if base._token_rank is not None:
        want["_token_rank"] = _out_of_order(base._token_rank[rows])
    if base._router_ids is not None:
        want["_router_ids"] = tuple(base._router_ids[j][rows] for j in routers)
    if base._router_calls is not None:  # (each router's own calls go with it)
        want["_router_calls"] = tuple(base._router_calls[j] for j in routers)
    want.update(changed)
    return want


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("kind", ["ids", "routers", "lost"])
def test_every_routes_transformation_carries_every_mark_exactly_where_it_holds(kind: str, tmp_path: Path) -> None:
    """Each mark a Routes keeps (what its capture knew of its forwards, each row's token, prompt mask and place,
    each router's own ids, why ids were lost, the routers it was recorded on) goes with every Routes made from it:
    kept where it still holds (a file, the wire, a pickle, other names, other routers, cat of its slices), cut with
    the rows where it is one per row, dropped where it no longer holds (forwards of rows picked out of order, a
    reader's untold placing of rows chosen by a slice, ids replaced). A mark added to Routes fails here until every
    transformation's row of this table says what becomes of it."""
    import copy
    import pickle

    from moe_replay.distributed import _known, _restore

    fresh = mr.Routes._trusted([], [], [])
    assert set(vars(fresh)) - {"_names", "_experts", "_data", "_validated"} == set(_MARKS)
    base = _marked(kind)
    every, names = torch.arange(8), list(base.names)
    base.save(tmp_path / "r.npz")
    wired = _restore(mr.Routes._trusted(base._data, base.names, base.experts_per_layer), _known(base), 2)
    order = torch.argsort(base._token_rank, stable=True) if base._token_rank is not None else every
    # (each made lazily where it is made of rows: routes of a router that lost its ids are not picked by one index)
    whole = base._whole_forwards()  # (what a slice keeps of the capture's forwards, to be joined again by cat)
    table: dict[str, tuple[Any, torch.Tensor, list[int], dict[str, Any]]] = {
        "r[:]": (lambda: base[:], every, [0, 1], {"_cut_from": (whole, 0, 8)}),
        "r[:4]": (
            lambda: base[:4],
            every[:4],
            [0, 1],
            {
                "_call_rows": ((4, 1),),
                "_rows_untold": None,
                "_cut_from": (whole, 0, 4),
                "_forward_calls": (1,),
                "_lineage": None,  # (its first forward went on from no cache)
            },
        ),
        "r[2:6]": (
            lambda: base[2:6],
            every[2:6],
            [0, 1],
            {
                "_call_rows": ((2, 2),),
                "_dropped_rows": 0,
                "_rows_untold": None,
                "_prompt_kept": None,
                "_cut_from": (whole, 2, 6),
                "_lineage": None,  # (the second forward's rows reach back to the first's, cut off)
            },
        ),
        "r[[5, 1]]": (
            lambda: base[[5, 1]],
            torch.tensor([5, 1]),
            [0, 1],
            {
                "_call_rows": None,
                "_rows_picked": "routes[...] picked 2 of its 8 rows by a list, mask or step",
                "_routers_order": False,
                "_order_untold": False,
                "_prompt_kept": None,
                "_forward_calls": None,
                "_lineage": None,  # (rows out of order: no forward to reach back to)
            },
        ),
        "select(reversed)": (base.select(names[::-1]), every, [1, 0], {}),
        "select(one)": (base.select(names[1:]), every, [1], {}),
        "rename": (
            base.rename({"enc.": "module.enc."}),
            every,
            [0, 1],
            {
                "_recorded_names": tuple("module." + n if n.startswith("enc.") else n for n in base._recorded_names),
                "_ids_settings": {"module." + n: v for n, v in base._ids_settings.items()},
            },
        ),
        # (the halves are rows the caller chose by a slice: no longer placed by the reader's count alone)
        "cat(halves)": (
            lambda: mr.Routes.cat([base[:4], base[4:]]),
            every,
            [0, 1],
            # (each part's lineage that reaches back past its first row is cut, joined again or not)
            {"_rows_untold": None, "_cut_from": (whole, 0, 8), "_lineage": None},
        ),
        # (the forward cut by the split is one again once joined: its forwards and prompt mask are the capture's)
        "cat(split_routes)": (
            lambda: mr.Routes.cat(mr.distributed.split_routes(base, [3, 5])),
            every,
            [0, 1],
            {"_cut_from": (whole, 0, 8), "_lineage": None},
        ),
        "save, load": (mr.Routes.load(tmp_path / "r.npz"), every, [0, 1], {}),
        "pickle": (pickle.loads(pickle.dumps(base)), every, [0, 1], {}),
        "deepcopy": (copy.deepcopy(base), every, [0, 1], {}),
        "the wire": (wired, every, [0, 1], {}),
        "with_token_ids": (
            base.with_token_ids(torch.arange(8) + 50),
            every,
            [0, 1],
            {"_token_ids": torch.arange(8) + 50, "_router_ids": None, "_ids_lost": None},
        ),
    }
    if kind == "ids":
        table["stitch_turns (one turn)"] = (
            mr.interop.stitch_turns([base]),
            order,
            [0, 1],
            {
                "_call_rows": None,
                "_token_rank": None,
                "_routers_order": False,
                "_prompt_kept": None,  # (a conversation's rows, in token order: no forward's)
                "_layout_pos": None,  # (nor a batch's: laid out again, they get places of their own)
                "_forward_calls": None,
                "_lineage": None,
            },
        )
        table["in_token_order"] = (
            base.in_token_order(),
            order,
            [0, 1],
            {"_token_rank": None, "_routers_order": False, "_lineage": None},  # (rows counted in another order)
        )
    if kind == "lost":  # (one router's ids lost: its rows and another router's are not one token each, no pick)
        table = {w: table[w] for w in table if not w.startswith(("r[", "cat"))}
        table["cat(whole)"] = (mr.Routes.cat([base]), every, [0, 1], {})
        table["select(one)"][3]["_ids_lost"] = None  # (the router kept has its ids: checked by them)
        table["select(lost one)"] = (base.select(names[:1]), every, [0], {})
    if kind == "routers":  # (rows of forwards of an untold order, cut through a forward: each row keeps the mark)
        for what, held in (("r[2:6]", 4), ("r[[5, 1]]", 2)):
            table[what][3].update(_order_untold=False, _token_rank=torch.full((held,), mr.routes.UNTOLD_RANK))
        # (and, joined again, each row keeps the mark as its own: a layout of them is refused, never taken as rows
        # in token order)
        table["cat(split_routes)"][3].update(_order_untold=False, _token_rank=torch.full((8,), mr.routes.UNTOLD_RANK))
        # (each router's own calls: the rows of them a slice holds; slices that meet again in cat hold the calls of
        # the rows they make up together: the parts of split_routes joined are the capture's calls again, as its
        # forwards are, not a forward of one call cut in two taken as two calls of one forward each)
        table["r[:4]"][3]["_router_calls"] = ((((4, 1),), (1,)),) * 2
        table["r[2:6]"][3]["_router_calls"] = ((((2, 2),), (1, 1)),) * 2
        table["r[[5, 1]]"][3]["_router_calls"] = None
    # (MoD's choices of tokens hold for the capture's forwards as they ran: kept with the forwards they were taken in,
    # dropped where a forward is cut inside its sequences or rows are picked out of order)
    for what in table:
        if what.startswith(("r[2:6]", "r[[", "cat(split_routes)", "stitch_turns")):
            table[what][3].update(_token_choices=None, _choice_forwards=None)
    if "r[:4]" in table:  # (its first forward, whole: that forward's ranking)
        table["r[:4]"][3].update(_token_choices=base._token_choices[:1], _choice_forwards=(1,))
    # (where the routers stood in their rows at each ranking: it goes with the rankings, under the routers' names;
    # a slice keeps those of its forwards, shifted by the rows cut off before them, and cat shifts them back)
    for what in table:
        if "_token_choices" in table[what][3] and table[what][3]["_token_choices"] is None:
            table[what][3].update(_choice_places=None)
    if "r[:4]" in table:  # (its first forward, whole, from the first row: that ranking's places as they were)
        table["r[:4]"][3].update(_choice_places=base._choice_places[:1])
    table["rename"][3].update(
        _choice_places=tuple({"module." + k: v for k, v in p.items()} for p in base._choice_places)
    )
    for what, (made, rows, routers, changed) in table.items():
        made = made() if callable(made) else made
        want = _expected(base, rows, routers, **changed)
        assert made.names == tuple(names[j] for j in routers) or what == "rename", what
        pairs = zip(made.names, routers, strict=True)
        assert all(torch.equal(made.layer(n), base.layer(names[j])[rows]) for n, j in pairs), what
        wrong = [m for m in _MARKS if not _same_mark(getattr(made, m), want[m])]
        assert not wrong, f"{what}: {[(m, getattr(made, m), want[m]) for m in wrong]}"
        from moe_replay.losses import _router_of

        assert [_router_of(t) for t in made.per_layer()] == list(made.names), what  # (tensors that name their router)
        assert _router_of(made.layer(made.names[0])) == made.names[0], what
    tried(len(table))


def _chains(r: mr.Routes, tmp: Path, a: torch.Tensor, b: torch.Tensor) -> dict[str, tuple[Any, list[torch.Tensor]]]:
    """Routes made from a capture ``r`` of the forwards ``a`` then ``b`` by a chain of transformations, each with
    the forwards to replay it on: an exception type where the replay must be refused (rows of other tokens)."""
    import pickle

    from moe_replay.distributed import _known, _restore

    n, names = a.numel(), list(r.names)

    def saved(x: mr.Routes, name: str) -> mr.Routes:
        x.save(tmp / f"{name}.npz")
        return mr.Routes.load(tmp / f"{name}.npz")

    def wire(x: mr.Routes) -> mr.Routes:
        return _restore(mr.Routes._trusted(x._data, x.names, x.experts_per_layer), _known(x), x._dropped_rows)

    per_seq = [r[i * a.shape[1] : (i + 1) * a.shape[1]] for i in range(a.shape[0])]
    refused = mr.TokenMismatchError
    return {
        "slice, save, load": (saved(r[:n], "s1"), [a]),
        "second slice on the first batch": (r[n:], [a], refused),
        "select reversed": (r.select(names[::-1]), [a, b]),
        "select one, save, load": (saved(r.select(names[1:]), "s2"), [a, b]),
        "rename to a wrapper's": (r.rename({"": "module."}), [a, b]),
        "halves swapped": (mr.Routes.cat([r[n:], r[:n]]), [a, b], refused),
        "halves swapped, batches swapped": (mr.Routes.cat([r[n:], r[:n]]), [b, a]),
        "rows reversed": (r[list(range(n - 1, -1, -1))], [a], refused),
        "split_routes, each": (mr.distributed.split_routes(r, [n, n])[1], [b]),
        "split_routes, cat, save, load": (
            saved(mr.Routes.cat(mr.distributed.split_routes(r, [5, 2 * n - 5])), "s3"),
            [a, b],
        ),
        "in_token_order of a slice": (r[:n].in_token_order(), [a]),
        "layout of the sequences": (mr.BatchLayout.padded([a.shape[1]] * a.shape[0]).routes(per_seq), [a]),
        "layout of the sequences reversed": (
            mr.BatchLayout.padded([a.shape[1]] * a.shape[0]).routes(per_seq[::-1]),
            [a],
            refused,
        ),
        "pickle of a selected slice": (pickle.loads(pickle.dumps(r[:n].select(names[::-1]))), [a]),
        "select, slice, rename there and back": (r.select(names)[:n].rename({"": "x."}).rename({"x.": ""}), [a]),
        "a slice twice": (mr.Routes.cat([r[:n], r[:n]]), [a, a]),
        "a slice twice on two batches": (mr.Routes.cat([r[:n], r[:n]]), [a, b], refused),
        "other ids": (r[:n].with_token_ids(torch.arange(n) % 100 + 3), [a], refused),
        "select none": (r.select([]), [a], mr.RoutesValidationError),
        "the wire of a slice": (wire(r[:n]), [a]),
        "the wire of a slice, on the other batch": (wire(r[:n]), [b], refused),
        "numpy, given ids": (
            mr.Routes.from_numpy(r[:n].to_numpy(), names=names, num_experts=r.experts_per_layer).with_token_ids(a),
            [a],
        ),
        "numpy, given ids, other batch": (
            mr.Routes.from_numpy(r[:n].to_numpy(), names=names, num_experts=r.experts_per_layer).with_token_ids(a),
            [b],
            refused,
        ),
        "one router's slices joined": (mr.Routes.cat([r.select(names[:1])[:n], r.select(names[:1])[n:]]), [a, b]),
        "a slice through a forward, on the first batch": (saved(r[3 : n + 3], "s4"), [a], refused),
        "rename, select, slice, cat, save, load, rename back": (
            saved(
                mr.Routes.cat([x[:n], x[n:]]) if (x := r.rename({"": "m."}).select([f"m.{k}" for k in names])) else x,
                "s5",
            ).rename({"m.": ""}),
            [a, b],
        ),
        "the wire of the sequences' layout": (
            wire(mr.BatchLayout.padded([a.shape[1]] * a.shape[0]).routes(per_seq)),
            [a],
        ),
        "the wire of the sequences' layout reversed": (
            wire(mr.BatchLayout.padded([a.shape[1]] * a.shape[0]).routes(per_seq[::-1])),
            [a],
            refused,
        ),
        "a mask of the rows of the first batch": (r[torch.arange(2 * n) < n], [a]),
        "a mask of the rows of the first batch, on the second": (r[torch.arange(2 * n) < n], [b], refused),
    }


@pytest.mark.reliability("silent replays")
def test_chained_routes_transformations_replay_exactly_or_are_refused(tmp_path: Path) -> None:
    """Routes made from a capture by chains of transformations (slices then cat, select then a file, a layout then
    the wire, numpy with ids given...) replay their rows exactly on the forwards they were recorded from, each row
    forced on its own token (the routers perturbed, so that native routing differs), and are refused on forwards of
    other tokens, never forced there by row order."""
    from .conftest import perturb_routers
    from .test_feeds import _batch

    model = mr.models.build("softmax_topk", num_layers=2)
    a, b = _batch(1), _batch(2)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(a)
            model(b)
        r = session.routes()
        perturb_routers(session, scale=2.0)
        with session.capture():
            model(a)
            model(b)
        assert not session.routes().equal(r), "the perturbation changes no decision: the test would prove nothing"
        chains = _chains(r, tmp_path, a, b)
        for what, (made, forwards, *refusal) in chains.items():
            if refusal:
                with pytest.raises(refusal[0]):
                    with session.replay(made, strict=False):
                        for x in forwards:
                            model(x)
                continue
            plain = made.rename({"module.": ""}) if made.names[0].startswith("module.") else made
            with session.replay(made, strict=False), session.capture():
                for x in forwards:
                    model(x)
            got = session.routes().select(list(plain.names))
            assert got.equal(plain), what
    tried(len(chains))


@pytest.mark.reliability("bad inputs")
def test_routes_are_values_whose_truth_never_raises_and_that_are_unhashable() -> None:
    """``if routes:`` on routes of no router, or of routers with other token counts, answers instead of
    raising; ``len`` of routes of no router is their 0 tokens; ``hash`` says unhashable the way a list does,
    and ``==`` compares the rows."""
    none = mr.Routes([], names=[], num_experts=[])
    empty = mr.Routes([torch.zeros(0, 2, dtype=torch.long)], names=["a"], num_experts=4)
    one = mr.Routes([torch.tensor([[0, 1]])], names=["a"], num_experts=4)
    ragged = mr.Routes([torch.tensor([[0, 1]]), torch.zeros(0, 2, dtype=torch.long)], names=["a", "b"], num_experts=4)
    assert [bool(r) for r in (none, empty, one, ragged)] == [False, False, True, True]
    assert (len(none), len(empty), len(one)) == (0, 0, 1)
    with pytest.raises(mr.InvalidArgumentError, match="differ in token counts"):
        len(ragged)  # no one count: said, not guessed
    for r in (none, one):
        with pytest.raises(TypeError, match="unhashable"):
            hash(r)
        with pytest.raises(TypeError, match="unhashable"):
            {r}
    assert one == mr.Routes([torch.tensor([[0, 1]])], names=["a"], num_experts=4)
    assert one != mr.Routes([torch.tensor([[1, 0]])], names=["a"], num_experts=4)
    assert none == mr.Routes([], names=[], num_experts=[]) and none != empty and one != "a"
