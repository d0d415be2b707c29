"""Misuse of the public API that tests/test_misuse.py and tests/test_misuse2.py do not try: rows cast to a dtype
too narrow for their router's experts, counts given as numpy integers, and what a session is left with after
misuse.

Each bad input must end in a ``MoEReplayError`` naming what is wrong, with the model and the session left as they
were; each good one in the answer of its plain spelling, never a refusal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop as io_

from .conftest import tried

_NAMES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def _rows(e: int, t: int = 6, k: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Two routers' ``[t, k]`` int64 rows of distinct experts below ``e``, some past 255 where ``e`` allows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) for _ in _NAMES]


_WIDE = _rows(300)  # (experts up to 299: some wrap in uint8)
assert any(bool((r > 255).any()) for r in _WIDE)

#: rows cast on the way to a dtype that cannot write every expert of their routers: the experts past its largest
#: value wrapped around and read as smaller experts, so each must be refused, never read
_NARROW: dict[str, Callable[[], object]] = {
    "Routes uint8 of 300 experts": lambda: mr.Routes([r.to(torch.uint8) for r in _WIDE], _NAMES, 300),
    "Routes uint8 numpy of 300 experts": lambda: mr.Routes([r.numpy().astype(np.uint8) for r in _WIDE], _NAMES, 300),
    "Routes int8 of 200 experts": lambda: mr.Routes([r.to(torch.int8) for r in _rows(200)], _NAMES, 200),
    "Routes uint8 of 300 experts, one of 8": lambda: mr.Routes(
        [_WIDE[0].to(torch.uint8), _rows(8)[1].to(torch.uint8)], _NAMES, [300, 8]
    ),
    "Routes int16 of 40000 experts": lambda: mr.Routes([r.to(torch.int16) for r in _rows(40000)], _NAMES, 40000),
    "from_numpy uint8 of 300 experts": lambda: mr.Routes.from_numpy(
        np.stack([r.numpy() for r in _WIDE], axis=1).astype(np.uint8), names=_NAMES, num_experts=300
    ),
    "from_megatron uint8 of 300 experts": lambda: io_.from_megatron([r.to(torch.uint8) for r in _WIDE], _NAMES, 300),
    "from_megatron uint8 numpy of 300 experts": lambda: io_.from_megatron(
        [r.numpy().astype(np.uint8) for r in _WIDE], _NAMES, 300
    ),
    "int8 expert 255 of 300, top-1 (reads -1)": lambda: mr.Routes(
        [torch.tensor([[3], [255]]).to(torch.int8)], ["model.layers.0.mlp.gate"], 300
    ),
    "uint8 -1 row of 257 experts, top-1": lambda: mr.Routes(
        [torch.tensor([[3], [-1]]).to(torch.uint8)], ["model.layers.0.mlp.gate"], 257
    ),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_NARROW.values()), ids=list(_NARROW))
def test_rows_in_a_dtype_too_narrow_for_their_routers_experts_are_refused(call: Callable[[], object]) -> None:
    """Once silent: rows of a router of 300 experts given as uint8 (a cast for transport, or NCCL) were read as
    they came, so expert 300 read as expert 44 and a -1 row of a router of 257 experts as expert 255. A dtype that
    cannot write every expert of the router is refused, naming the dtype and what it holds."""
    with pytest.raises(mr.RoutesValidationError, match=r"rows are u?int(8|16), which holds expert numbers up to"):
        call()
    tried()


@pytest.mark.parametrize(
    ("dtype", "experts"),
    [(torch.uint8, 256), (torch.int8, 128), (torch.int16, 32768), (torch.int32, 300), (torch.uint8, 8)],
)
def test_rows_in_a_dtype_that_holds_every_expert_are_read_as_the_same_routes(dtype: torch.dtype, experts: int) -> None:
    """A dtype that writes every expert of the router (as narrow as :func:`mr.index_dtype` picks) is taken."""
    rows = _rows(experts)
    plain = mr.Routes(rows, _NAMES, experts)
    assert mr.Routes([r.to(dtype) for r in rows], _NAMES, experts).equal(plain)
    assert io_.from_megatron([r.to(dtype) for r in rows], _NAMES, experts).equal(plain)


@pytest.mark.parametrize("count", [np.int64(300), np.int32(300), torch.tensor(300), 300])
def test_index_dtype_takes_an_expert_count_given_as_a_numpy_integer(count: object) -> None:
    """Once falsely refused: ``mr.index_dtype(config.num_experts)`` of a count read from a numpy array or a 0-d
    tensor raised "must be a positive int"; it is the plain int's answer."""
    assert mr.index_dtype(count) == mr.index_dtype(300) == torch.int16  # type: ignore[arg-type]


def _verl_batch() -> tuple[torch.Tensor, torch.Tensor, mr.LayerMap, list[mr.Routes]]:
    """verl's padded batch of two sequences (prompts 2 and 3, the last token of each unrouted) and its mask."""
    seqs = []
    for t, seed in ((5, 0), (7, 1)):
        rows = _rows(8, t=t, seed=seed)
        for r in rows:
            r[-1] = -1
        seqs.append(mr.Routes(rows, _NAMES, 8))
    lm = mr.LayerMap.from_names(_NAMES, 3, 8, 2, layers=[1, 2])
    batch = io_.to_verl(seqs, lm, prompt_lengths=[2, 3])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    return batch, mask, lm, seqs


@pytest.mark.reliability("bad inputs")
def test_verls_uint8_view_of_its_routes_is_refused_as_such_and_read_as_int16() -> None:
    """verl sends its int16 routed_experts as a uint8 view (twice k per row). Given that view, from_verl said the
    last token held a route and the rows were shifted against the mask: the width is checked first, and the message
    names the view and the way back."""
    batch, mask, lm, seqs = _verl_batch()
    view = batch.view(torch.uint8)
    with pytest.raises(mr.RoutesValidationError, match=r"uint8 view of its int16 routes.*view\(torch\.int16\)"):
        io_.from_verl(view, mask, lm)
    with pytest.raises(mr.RoutesValidationError, match=r"needs \[\.\.\., 2, 2\].*Check num_layers"):
        io_.from_verl(batch, mask, lm, layout="moe")  # (a width of another layout: no view named)
    back = io_.from_verl(view.view(torch.int16), mask, lm)
    assert all(a.equal(b) for a, b in zip(back, seqs, strict=True))


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.long, device="meta")


_SEQS = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 8, 9, 4]])
_ONE = mr.Routes(_rows(8), _NAMES, 8)
_LM = mr.LayerMap.from_names(_NAMES, 3, 8, 2, layers=[1, 2])

#: a tensor on the meta device (shapes only, as a model built under ``torch.device("meta")`` holds) given where a
#: count, a length, an index or token ids are read: each is refused with a MoEReplayError, never torch's own
#: "Cannot copy out of meta tensor" or "Tensor.item() cannot be called on meta tensors"
_META: dict[str, Callable[[], object]] = {
    "Routes num_experts 0-d": lambda: mr.Routes(_rows(8), _NAMES, _meta()),
    "Routes num_experts per router": lambda: mr.Routes(_rows(8), _NAMES, _meta(2)),
    "from_numpy num_experts": lambda: mr.Routes.from_numpy(_ONE.to_numpy(), names=_NAMES, num_experts=_meta()),
    "routes[0-d]": lambda: _ONE[_meta()],
    "routes[positions]": lambda: _ONE[_meta(2)],
    "load max_bytes": lambda: mr.Routes.load("unused.npz", max_bytes=_meta()),
    "pad_routes length": lambda: mr.pad_routes([_ONE], length=_meta()),
    "pack_routes row_length": lambda: mr.pack_routes([_ONE], row_length=_meta()),
    "BatchLayout.padded lengths": lambda: mr.BatchLayout.padded(_meta(2)),
    "BatchLayout.packed row_length": lambda: mr.BatchLayout.packed([3, 2], row_length=_meta()),
    "BatchLayout.split prompt_lengths": lambda: mr.BatchLayout.split(_meta(2), [3, 4]),
    "generation_capacity": lambda: mr.generation_capacity(_meta(), 3, 4),
    "generation_lengths sequences": lambda: mr.generation_lengths(_meta(2, 5), 2, 2),
    "generation_lengths eos 0-d": lambda: mr.generation_lengths(_SEQS, 2, _meta()),
    "generation_lengths eos ids": lambda: mr.generation_lengths(_SEQS, 2, _meta(2)),
    "split_generation batch_size": lambda: mr.split_generation(_ONE, batch_size=_meta(), prompt_len=1),
    "index_dtype": lambda: mr.index_dtype(_meta()),
    "LayerMap num_layers": lambda: mr.LayerMap.from_names(_NAMES, _meta(), 8, 2),
    "LayerMap num_experts": lambda: mr.LayerMap.from_names(_NAMES, 3, _meta(2), 2),
    "vllm_dtype": lambda: io_.vllm_dtype(_meta()),
    "nemo_rl_dtype": lambda: io_.nemo_rl_dtype(_meta()),
    "from_sglang num_tokens": lambda: io_.from_sglang(
        io_.to_sglang(_ONE, _LM, drop_last=True), _LM, num_tokens=_meta()
    ),
    "from_megatron num_experts": lambda: io_.from_megatron(io_.to_megatron(_ONE), _NAMES, _meta()),
    "to_verl prompt_lengths": lambda: io_.to_verl([_ONE], _LM, prompt_lengths=_meta(1)),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_META.values()), ids=list(_META))
def test_a_meta_tensor_given_for_a_value_is_refused_with_a_moe_replay_error(call: Callable[[], object]) -> None:
    """Once a builtin error: a 0-d meta tensor passed the integer check (its dtype is an integer) and failed at
    ``.item()``, and meta lengths or token ids failed at their first read. A meta tensor holds no value: refused."""
    with pytest.raises(mr.MoEReplayError):
        call()
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("num_layers", "num_experts", "refused"),
    [
        (2**70, 8, "more hidden layers than a model has"),
        (2**16 + 1, 8, "more hidden layers than a model has"),
        (3, 2**31, r"num_experts must be at most 2147483647"),
        (3, 2**70, r"num_experts must be at most 2147483647"),
        (2**16, 2**31 - 1, None),
    ],
)
def test_a_layer_map_of_more_layers_or_experts_than_engines_hold_is_refused(
    num_layers: int, num_experts: int, refused: str | None
) -> None:
    """Once silent until it hung: LayerMap.from_names(names, 2**70, ...) was built, and its repr (or any writer)
    then listed its dense layers one by one for ever; 2**70 experts were taken, which no Routes holds."""
    if refused is None:
        lm = mr.LayerMap.from_names(_NAMES, num_layers, num_experts, 2, layers=[1, 2])
        assert len(lm.dense_layers) == num_layers - 2 and "LayerMap(" in repr(lm)
        return
    with pytest.raises(mr.LayerMapError, match=refused):
        mr.LayerMap.from_names(_NAMES, num_layers, num_experts, 2, layers=[1, 2])
    tried()
