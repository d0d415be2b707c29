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
