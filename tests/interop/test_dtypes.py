"""Every reader takes the expert ids in any integer dtype that holds them, numpy's or torch's, and refuses the rest.

An engine's array is often cast on the way (a trainer keeps int16 or int32, a converter int64, a server uint16):
the ids it holds are the same, so the routes read must be the same. A dtype that cannot hold every expert of the
map (an id may have wrapped around to another expert), floats (even whole ones: nothing is cast) and bools are
refused with a :class:`~moe_replay.MoEReplayError`. The readers whose own format fixes a dtype that says which
release wrote it (``from_vllm`` without ``version=``, ``from_vllm_legacy``, ``from_vllm_split``,
``from_megatron_inference``) refuse another release's dtype by design: their own tests cover those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from . import engines as E

_INTEGERS: list[Any] = [
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
]
_P, _C = 3, 3  # prompt and completion lengths


def _cast(values: Any, dtype: Any) -> np.ndarray | torch.Tensor:
    """``values`` (ids >= 0 only, so that every dtype holds them exactly) in ``dtype``, numpy's or torch's."""
    arr = np.asarray(values).astype(np.int64)
    assert arr.min() >= 0, "the case must hold no -1: an unsigned dtype could not hold it"
    if isinstance(dtype, torch.dtype):
        return torch.from_numpy(arr).to(dtype)
    return arr.astype(dtype)


def _vllm(m: E.Model, truth: np.ndarray, dtype: Any) -> mr.Routes:
    arr = E.vllm_033_routed_experts(m, truth, _P)
    return interop.from_vllm(_cast(arr, dtype), m.layer_map, prompt_len=_P, completion_len=_C, version="0.25")


def _megatron(m: E.Model, truth: np.ndarray, dtype: Any) -> mr.Routes:
    layers = interop.to_megatron(m.routes(truth, last=False), layer_map=m.layer_map)
    return interop.from_megatron([_cast(t, dtype) for t in layers], m.names, m.num_experts)


def _verl(m: E.Model, truth: np.ndarray, dtype: Any) -> mr.Routes:
    batch = interop.to_verl([m.routes(truth, last=False)], m.layer_map, prompt_lengths=[_P])
    mask = torch.ones(batch.shape[:2], dtype=torch.long)
    return interop.from_verl(_cast(batch, dtype), mask, m.layer_map, last_routed=True)[0]  # type: ignore[arg-type]


def _nemo_rl(m: E.Model, truth: np.ndarray, dtype: Any) -> mr.Routes:
    rows = E.capture_buffer(m, truth)  # a row per token, all hidden layers, the last NeMo-RL's placeholder
    rows[-1] = np.arange(m.k)
    return interop.from_nemo_rl(_cast(rows, dtype), m.layer_map, num_tokens=_P + _C)


def _numpy(m: E.Model, truth: np.ndarray, dtype: Any) -> mr.Routes:
    return mr.Routes.from_numpy(_cast(truth, dtype), names=m.names, num_experts=m.num_experts)  # type: ignore[arg-type]


#: reader: (read a sequence's routes from ``truth`` given in a dtype, whether its last token is -1)
_READERS: dict[str, tuple[Callable[[E.Model, np.ndarray, Any], mr.Routes], bool]] = {
    "vllm-version": (_vllm, True),
    "megatron": (_megatron, False),
    "verl": (_verl, False),
    "nemo_rl-array": (_nemo_rl, True),
    "routes-from_numpy": (_numpy, False),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("dtype", _INTEGERS, ids=str)
@pytest.mark.parametrize("reader", list(_READERS))
def test_every_integer_dtype_that_holds_the_experts_reads_the_same_routes(reader: str, dtype: Any) -> None:
    """vLLM 0.22+ with ``version=`` refused uint16 for a model of 256 experts or fewer ("vLLM writes uint8"), though
    its docstring reads any integer dtype that holds them; from_megatron failed inside torch (``min`` of uint16 and
    uint32 is not implemented) with no MoEReplayError."""
    read, last_unrouted = _READERS[reader]
    m = E.Model()
    truth = m.truth(_P + _C, seed=5)
    assert read(m, truth, dtype).equal(m.routes(truth, last=last_unrouted))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reader", list(_READERS))
def test_a_dtype_that_cannot_hold_the_experts_or_no_integer_is_refused(reader: str) -> None:
    """int8 for 300 experts (expert 299 would read 43, another real expert), float ids (whole ones too: nothing is
    cast) and bools are refused, never read. from_verl and from_nemo_rl's array (the legacy list) read int8 rows of
    a 300-expert map: an expert wrapped around on the way would have been replayed as another, without a word."""
    read, _ = _READERS[reader]
    big = E.Model(num_experts=300)
    truth = E.Model(num_experts=100).truth(_P + _C, seed=6)  # (ids int8 holds: its width alone says it cannot)
    with pytest.raises(mr.MoEReplayError, match="int8"):
        read(big, truth, np.int8)
    m = E.Model()
    truth = m.truth(_P + _C, seed=7)
    for dtype in (np.float32, torch.float16, np.bool_, torch.bool):
        with pytest.raises(mr.MoEReplayError, match="must hold integers|integer"):
            read(m, truth, dtype)


@pytest.mark.reliability("bad inputs")
def test_a_vllm_array_widened_to_uint16_reads_without_version() -> None:
    """uint16 is a dtype vLLM 0.22+ writes (above 256 experts): an array of a 16-expert model widened to it was
    refused ("vLLM writes uint8 for 16 experts"), though it holds the same experts; uint8 for 300 experts still
    cannot hold them, and is refused."""
    m = E.Model()
    truth = m.truth(_P + _C, seed=8)
    arr = E.vllm_033_routed_experts(m, truth, _P)
    read = interop.from_vllm(arr.astype(np.uint16), m.layer_map, prompt_len=_P, completion_len=_C)
    assert read.equal(m.routes(truth))
    big = E.Model(num_experts=300)
    arr = E.vllm_033_routed_experts(big, E.Model(num_experts=200).truth(_P + _C, seed=9), _P)
    with pytest.raises(mr.RoutesValidationError, match="uint8, which holds expert numbers up to 255 only"):
        interop.from_vllm(arr.astype(np.uint8), big.layer_map, prompt_len=_P, completion_len=_C)
