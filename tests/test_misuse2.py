"""More misuse of the public API: inputs a user gets wrong that tests/test_misuse.py and tests/test_validation.py do
not try (int masks read as positions, flags spelt as text, misspelt config keys, detached sessions, arguments of
the right kind but the wrong meaning), and inputs that look wrong but are right (int32 rows, views, numpy scalars,
pickled routes), which must give exactly what the plain input gives.

Each bad input must end in a ``MoEReplayError`` naming what is wrong, with the model and the session left as they
were; each good one in the answer of its plain spelling, never a refusal.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop as io_
from moe_replay.__main__ import main

from .conftest import assert_untouched, snapshot


def _R(t: int = 6, layers: int = 2, k: int = 2, e: int = 8, seed: int = 0, last_missing: bool = False) -> mr.Routes:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) for _ in range(layers)]
    if last_missing:
        for r in rows:
            r[-1] = -1
    return mr.Routes(rows, names=[f"model.layers.{i + 1}.mlp.gate" for i in range(layers)], num_experts=e)


_r = _R()
_I = _r.layer(_r.names[0])
_P = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)).softmax(-1)
_E = _R(5, last_missing=True)  # an engine's sequence: the last token unrouted
_LM = mr.LayerMap.from_names(list(_E.names), 3, 8, 2)  # hidden layer 0 dense
_G = _R(8)  # one generate() over B=2, P=2, N=3 by its row count: 2 * 2 + 2 * 2
_S = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 8, 9, 4]])
_L = mr.BatchLayout.padded([3, 2])


def _verl() -> tuple[torch.Tensor, torch.Tensor, list[mr.Routes]]:
    seqs = [_E, _R(4, seed=1, last_missing=True)]
    batch = io_.to_verl(seqs, _LM, prompt_lengths=[2, 3])
    mask = torch.zeros(batch.shape[:2], dtype=torch.long)
    mask[0, 1:6], mask[1, 0:4] = 1, 1
    return batch, mask, seqs


_VERL, _VMASK, _VSEQS = _verl()


#: bad input to the public API that no other test gives; each must end in a MoEReplayError
_REFUSED: dict[str, Callable[[], object]] = {
    # Routes construction
    "Routes experts negative": lambda: mr.Routes([_I], names=["a"], num_experts=-8),
    "Routes experts NaN": lambda: mr.Routes([_I], names=["a"], num_experts=float("nan")),
    "Routes experts text": lambda: mr.Routes([_I], names=["a"], num_experts="8"),
    "Routes experts list too long": lambda: mr.Routes([_I], names=["a"], num_experts=[8, 8]),
    "Routes name int": lambda: mr.Routes([_I], names=[0], num_experts=8),
    "Routes name bytes": lambda: mr.Routes([_I], names=[b"a"], num_experts=8),
    "Routes names None": lambda: mr.Routes([_I], names=None, num_experts=8),
    "Routes fewer names": lambda: mr.Routes([_I, _I], names=["a"], num_experts=8),
    "Routes more names": lambda: mr.Routes([_I], names=["a", "b"], num_experts=8),
    "Routes one [T, L, k] tensor": lambda: mr.Routes(_r.indices, names=list(_r.names), num_experts=8),
    "Routes row None": lambda: mr.Routes([None], names=["a"], num_experts=8),
    "Routes rows on meta": lambda: mr.Routes([_I.to("meta")], names=["a"], num_experts=8),
    "Routes rows sparse": lambda: mr.Routes([_I.to_sparse()], names=["a"], num_experts=8),
    "Routes rows float with grad": lambda: mr.Routes([_I.float().requires_grad_()], names=["a"], num_experts=8),
    "Routes k above E": lambda: mr.Routes([torch.tensor([[0, 1, 2]])], names=["a"], num_experts=2),
    "Routes k=0": lambda: mr.Routes([torch.zeros(3, 0, dtype=torch.long)], names=["a"], num_experts=2),
    "Routes validate=None": lambda: mr.Routes([_I], names=["a"], num_experts=8, validate=None),
    "Routes validate=1": lambda: mr.Routes([_I], names=["a"], num_experts=8, validate=1),
    # indexing
    "routes[int 0/1 tensor of T]": lambda: _r[torch.tensor([1, 0, 1, 0, 1, 0])],
    "routes[int 0/1 list of T]": lambda: _r[[1, 1, 1, 0, 0, 0]],
    "routes[int 0/1 numpy of T]": lambda: _r[np.array([0, 1, 1, 1, 1, 0])],
    "routes[attention_mask.flatten()]": lambda: _r[torch.ones(2, 3, dtype=torch.long).flatten()],
    "routes[int32 0/1 of T]": lambda: _r[torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.int32)],
    "routes[float]": lambda: _r[1.0],
    "routes[str]": lambda: _r["a"],
    "routes[None]": lambda: _r[None],
    "routes[...]": lambda: _r[...],
    "routes[True]": lambda: _r[True],
    "routes[np.bool_]": lambda: _r[np.bool_(True)],
    "routes[short bool list]": lambda: _r[[True, False]],
    "routes[short bool numpy]": lambda: _r[np.array([True, False])],
    "routes[2-d positions]": lambda: _r[torch.tensor([[0, 1]])],
    "routes[float positions]": lambda: _r[torch.tensor([0.0, 1.0])],
    "routes[-7] list": lambda: _r[[-7]],
    "routes[::0]": lambda: _r[::0],
    "routes[::-1]": lambda: _r[::-1],
    "routes[0:2.5]": lambda: _r[0:2.5],
    "routes[2**70]": lambda: _r[2**70],
    # select / rename / layer / cat / to_numpy / from_numpy
    "select None": lambda: _r.select(None),
    "select bytes": lambda: _r.select([b"model.layers.1.mlp.gate"]),
    "rename None": lambda: _r.rename(None),
    "rename to an int": lambda: _r.rename({"model.": 3}),
    "layer None": lambda: _r.layer(None),
    "layer bytes": lambda: _r.layer(b"model.layers.1.mlp.gate"),
    "cat None": lambda: mr.Routes.cat(None),
    "cat routers in another order": lambda: mr.Routes.cat([_r, _r.select(_r.names[::-1])]),
    "to_numpy torch dtype": lambda: _r.to_numpy(torch.int64),
    "to_numpy datetime": lambda: _r.to_numpy("M8[s]"),
    "to_numpy timedelta": lambda: _r.to_numpy("m8"),
    "to_numpy complex": lambda: _r.to_numpy(np.complex64),
    "to_numpy unknown name": lambda: _r.to_numpy("notadtype"),
    "to_numpy structured": lambda: _r.to_numpy([("a", "i4")]),
    "from_numpy bool": lambda: mr.Routes.from_numpy(np.zeros((1, 1, 1), bool), names=["a"], num_experts=8),
    "from_numpy 4-d": lambda: mr.Routes.from_numpy(np.zeros((1, 1, 1, 1), np.int64), names=["a"], num_experts=8),
    "from_numpy 0-d": lambda: mr.Routes.from_numpy(np.int64(0), names=["a"], num_experts=8),
    "from_numpy masked entries": lambda: mr.Routes.from_numpy(
        np.ma.masked_array(np.array([[[0, 1]]]), mask=[[[0, 1]]]), names=["a"], num_experts=8
    ),
    # with_token_ids
    "ids [1, 2, 3]": lambda: _r.with_token_ids(torch.zeros(1, 2, 3, dtype=torch.long)),
    "ids [6, 1, 1] numpy": lambda: _r.with_token_ids(np.zeros((6, 1, 1), np.int64)),
    "ids [2, 4] for 6 rows": lambda: _r.with_token_ids(torch.zeros(2, 4, dtype=torch.long)),
    "ids NaN floats": lambda: _r.with_token_ids([float("nan")] * 6),
    "ids whole floats": lambda: _r.with_token_ids([1.0] * 6),
    "ids texts": lambda: _r.with_token_ids(["1"] * 6),
    "ids meta": lambda: _r.with_token_ids(torch.zeros(6, dtype=torch.long, device="meta")),
    "ids 0-d": lambda: _r.with_token_ids(torch.tensor(3)),
    "ids past int64": lambda: _r.with_token_ids([2**63] * 6),
    "ids ragged": lambda: _r.with_token_ids([[1, 2, 3], [4, 5]]),
    "ids bools": lambda: _r.with_token_ids([True] * 6),
    # save / load
    "save None": lambda: _r.save(None),
    "load None": lambda: mr.Routes.load(None),
    "load int": lambda: mr.Routes.load(3),
    "load empty path": lambda: mr.Routes.load(""),
    # losses
    "lbl probs above 1 (exp of logits)": lambda: mr.load_balancing_loss(_P.log().add(3).exp(), _I),
    "lbl probs x100": lambda: mr.load_balancing_loss(_P * 100, _I),
    "lbl relu logits": lambda: mr.load_balancing_loss(torch.randn(6, 8).relu() + 1, _I),
    "lbl probs inf": lambda: mr.load_balancing_loss(torch.full((6, 8), float("inf")), _I),
    "lbl mask complex": lambda: mr.load_balancing_loss(_P, _I, mask=torch.ones(6, dtype=torch.complex64)),
    "lbl mask list of one complex": lambda: mr.load_balancing_loss(_P, _I, mask=[torch.ones(6, dtype=torch.cfloat)]),
    "lbl mask meta": lambda: mr.load_balancing_loss(_P, _I, mask=torch.ones(6, device="meta")),
    "lbl mask inf": lambda: mr.load_balancing_loss(_P, _I, mask=torch.full((6,), float("inf"))),
    "lbl mask 0-d": lambda: mr.load_balancing_loss(_P, _I, mask=torch.tensor(1.0)),
    "lbl mask float scalar": lambda: mr.load_balancing_loss(_P, _I, mask=1.0),
    "lbl mask list of ints": lambda: mr.load_balancing_loss(_P, _I, mask=[1, 1, 1, 0, 0, 0]),
    "lbl idx 1-d": lambda: mr.load_balancing_loss(_P, _I[:, 0]),
    "lbl idx numpy": lambda: mr.load_balancing_loss(_P, _I.numpy()),
    "lbl idx list": lambda: mr.load_balancing_loss(_P, _I.tolist()),
    "lbl idx bool": lambda: mr.load_balancing_loss(_P, _I.bool()),
    "lbl k above E": lambda: mr.load_balancing_loss(torch.rand(6, 2).softmax(-1), torch.tensor([[0, 1, 0]] * 6)),
    "lbl probs 1-d": lambda: mr.load_balancing_loss(_P[0], _I[0]),
    # compare
    "compare mode 'SET'": lambda: mr.compare(_r, _r, mode="SET"),
    "compare names repeated": lambda: mr.compare(_r, _r, names=[_r.names[0]] * 2),
    "compare 3 labels": lambda: mr.compare(_r, _r, labels=("a", "b", "c")),
    "compare int labels": lambda: mr.compare(_r, _r, labels=(1, 2)),
    "compare with None": lambda: mr.compare(_r, None),
    "compare other k": lambda: mr.compare(_r, _R(k=3)),
    "compare rows not decisions": lambda: mr.compare(
        mr.Routes([torch.zeros(6, 2, dtype=torch.long)] * 2, _r.names, 8, validate=False), _r
    ),
    # batch
    "pad side None": lambda: mr.pad_routes([_r], side=None),
    "pad side 'LEFT'": lambda: mr.pad_routes([_r], side="LEFT"),
    "pad length True": lambda: mr.pad_routes([_r], length=True),
    "pad k differ": lambda: mr.pad_routes([_r, _R(2, k=3)]),
    "pack row_length 4.0": lambda: mr.pack_routes([_r], row_length=4.0),
    "pack row_length -1": lambda: mr.pack_routes([_r], row_length=-1),
    "pack row_length True": lambda: mr.pack_routes([_r], row_length=True),
    "pack empty": lambda: mr.pack_routes([]),
    "pack one Routes": lambda: mr.pack_routes(_r),
    "layout float lengths tensor": lambda: mr.BatchLayout.padded(torch.tensor([3.0, 2.0])),
    "layout 0-d lengths": lambda: mr.BatchLayout.padded(torch.tensor(3)),
    "layout packed -1": lambda: mr.BatchLayout.packed([-1]),
    "layout packed past row": lambda: mr.BatchLayout.packed([3, 5], row_length=4),
    "layout split prompt longer": lambda: mr.BatchLayout.split([4], [3]),
    "layout split narrow prompt_width": lambda: mr.BatchLayout.split([4], [6], prompt_width=3),
    "layout split -1": lambda: mr.BatchLayout.split([-1], [3]),
    "layout flat_positions 5": lambda: _L.flat_positions(5),
    "layout flat_positions -3": lambda: _L.flat_positions(-3),
    "layout flat_positions 1.0": lambda: _L.flat_positions(1.0),
    "layout flat_positions True": lambda: _L.flat_positions(True),
    "layout routes of tensors": lambda: _L.routes([_r.indices, _r.indices]),
    "layout routes swapped": lambda: _L.routes([_R(2), _R(3)]),
    "layout unpack a tensor": lambda: _L.unpack(_r.indices),
    "layout unpack a list": lambda: _L.unpack([_r]),
    "layout tokens float": lambda: _L.tokens([torch.zeros(3), torch.zeros(2)]),
    "layout tokens bool": lambda: _L.tokens([torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]),
    "layout tokens pad_id None": lambda: _L.tokens([torch.arange(3), torch.arange(2)], pad_id=None),
    "layout tokens pad_id True": lambda: _L.tokens([torch.arange(3), torch.arange(2)], pad_id=True),
    "layout overlapping placements": lambda: mr.BatchLayout(1, 5, ((0, 0, 3), (0, 1, 3))),
    "layout placement before row": lambda: mr.BatchLayout(1, 5, ((0, -1, 3),)),
    "layout placement past rows": lambda: mr.BatchLayout(1, 5, ((1, 0, 3),)),
    "layout rows 1.0": lambda: mr.BatchLayout(1.0, 5, ((0, 0, 3),)),
    # generation
    "gen cap '2'": lambda: mr.generation_capacity("2", 3, 4),
    "gen lengths prompt_len past width": lambda: mr.generation_lengths(_S, 6, 2),
    "gen lengths prompt_len -1": lambda: mr.generation_lengths(_S, -1, 2),
    "gen lengths prompt_len 2.0": lambda: mr.generation_lengths(_S, 2.0, 2),
    "gen lengths eos True": lambda: mr.generation_lengths(_S, 2, True),
    "gen lengths eos '2'": lambda: mr.generation_lengths(_S, 2, "2"),
    "gen lengths 1-d": lambda: mr.generation_lengths(_S[0], 2, 2),
    "gen lengths numpy": lambda: mr.generation_lengths(_S.numpy(), 2, 2),
    "split padding_side 'middle'": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, padding_side="middle"),
    "split padding_side None with a mask": lambda: mr.split_generation(
        _G, attention_mask=torch.ones(2, 2, dtype=torch.long), padding_side=None
    ),
    "split padding_side 'Left'": lambda: mr.split_generation(
        _G, prompt_lengths=[2, 2], prompt_len=2, padding_side="Left"
    ),
    "split mask of 0.5": lambda: mr.split_generation(_G, attention_mask=torch.full((2, 2), 0.5)),
    "split 1-d mask": lambda: mr.split_generation(_G, attention_mask=torch.ones(4, dtype=torch.long)),
    "split lengths past N": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, lengths=[5, 3]),
    "split lengths 0": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, lengths=[0, 3]),
    "split lengths 3.0": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, lengths=[3.0, 3]),
    "split new_tokens 4": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, new_tokens=4),
    "split eos without sequences": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, eos_token_id=2),
    "split float sequences": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, sequences=torch.zeros(2, 5)),
    "split sequences of 3": lambda: mr.split_generation(
        _G, batch_size=2, prompt_len=2, sequences=torch.zeros(3, 5, dtype=torch.long)
    ),
    "split keep_padding=1": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, keep_padding=1),
    "split progress='yes'": lambda: mr.split_generation(_G, batch_size=2, prompt_len=2, progress="yes"),
    "split batch_size 0": lambda: mr.split_generation(_G, batch_size=0, prompt_len=2),
    # vLLM
    "from_vllm list (int64)": lambda: io_.from_vllm(io_.to_vllm(_E, _LM).tolist(), _LM, prompt_len=2, completion_len=3),
    "from_vllm prompt_len True": lambda: io_.from_vllm(io_.to_vllm(_E, _LM), _LM, prompt_len=True, completion_len=4),
    "from_vllm version ('0', '25')": lambda: io_.from_vllm(
        io_.to_vllm(_E, _LM), _LM, prompt_len=2, completion_len=3, version=("0", "25")
    ),
    "from_vllm version (0,)": lambda: io_.from_vllm(
        io_.to_vllm(_E, _LM), _LM, prompt_len=2, completion_len=3, version=(0,)
    ),
    "from_vllm version 1.0": lambda: io_.from_vllm(
        io_.to_vllm(_E, _LM), _LM, prompt_len=2, completion_len=3, version="1.0"
    ),
    "from_vllm uint8 read as 0.21": lambda: io_.from_vllm(
        io_.to_vllm(_E, _LM), _LM, prompt_len=2, completion_len=3, version="0.21"
    ),
    "from_vllm MoE columns only": lambda: io_.from_vllm(
        io_.to_vllm(_E, _LM)[:, 1:], _LM, prompt_len=2, completion_len=3
    ),
    "from_vllm k=1 of 2": lambda: io_.from_vllm(io_.to_vllm(_E, _LM)[:, :, :1], _LM, prompt_len=2, completion_len=3),
    "from_vllm None": lambda: io_.from_vllm(None, _LM, prompt_len=2, completion_len=3),
    "from_vllm bool": lambda: io_.from_vllm(io_.to_vllm(_E, _LM).astype(bool), _LM, prompt_len=2, completion_len=3),
    "from_vllm meta tensor": lambda: io_.from_vllm(
        torch.from_numpy(io_.to_vllm(_E, _LM)).to("meta"), _LM, prompt_len=2, completion_len=3
    ),
    "from_vllm base64 cut": lambda: io_.from_vllm(
        io_.vllm_array_to_base64(io_.to_vllm(_E, _LM))[:-8], _LM, prompt_len=2, completion_len=3
    ),
    "from_vllm layer_map None": lambda: io_.from_vllm(io_.to_vllm(_E, _LM), None, prompt_len=2, completion_len=3),
    "to_vllm prompt_start 1.0": lambda: io_.to_vllm(_E, _LM, prompt_start=1.0),
    "to_vllm None": lambda: io_.to_vllm(None, _LM),
    "to_vllm map of 16 experts": lambda: io_.to_vllm(_E, mr.LayerMap.from_names(list(_E.names), 3, 16, 2)),
    "from_vllm_legacy num_tokens True": lambda: io_.from_vllm_legacy(io_.to_vllm_legacy(_E, _LM), _LM, num_tokens=True),
    "from_vllm_legacy num_tokens -5": lambda: io_.from_vllm_legacy(io_.to_vllm_legacy(_E, _LM), _LM, num_tokens=-5),
    "from_vllm_split cached -1": lambda: io_.from_vllm_split(
        *io_.to_vllm_split(_E, _LM, 2), _LM, completion_len=3, cached_tokens=-1
    ),
    "from_vllm_split cached 1.0": lambda: io_.from_vllm_split(
        *io_.to_vllm_split(_E, _LM, 2), _LM, completion_len=3, cached_tokens=1.0
    ),
    "to_vllm_split prompt_len 2.0": lambda: io_.to_vllm_split(_E, _LM, 2.0),
    "vllm_layout ''": lambda: io_.vllm_layout(""),
    "vllm_layout None": lambda: io_.vllm_layout(None),
    "vllm_layout (0, -1)": lambda: io_.vllm_layout((0, -1)),
    "vllm_layout (-1, 25)": lambda: io_.vllm_layout((-1, 25)),
    "vllm_layout (True, 22)": lambda: io_.vllm_layout((True, 22)),
    "vllm_dtype True": lambda: io_.vllm_dtype(True),
    "vllm_array_from_base64 int": lambda: io_.vllm_array_from_base64(3),
    # SGLang
    "from_sglang {}": lambda: io_.from_sglang({}, _LM, num_tokens=5),
    "from_sglang a list": lambda: io_.from_sglang([1, 2], _LM, num_tokens=5),
    "from_sglang num_tokens 5.0": lambda: io_.from_sglang(io_.to_sglang(_E, _LM), _LM, num_tokens=5.0),
    "from_sglang start_len -1": lambda: io_.from_sglang(io_.to_sglang(_E, _LM), _LM, num_tokens=5, start_len=-1),
    "from_sglang float token_ids": lambda: io_.from_sglang(io_.to_sglang(_E, _LM), _LM, token_ids=[1.5] * 5),
    "from_sglang routed_experts None": lambda: io_.from_sglang({"routed_experts": None}, _LM, num_tokens=5),
    "from_sglang routed_experts int": lambda: io_.from_sglang({"meta_info": {"routed_experts": 3}}, _LM, num_tokens=5),
    "to_sglang start_len -1": lambda: io_.to_sglang(_E, _LM, start_len=-1),
    "to_sglang start_len past": lambda: io_.to_sglang(_E, _LM, start_len=10),
    "to_sglang drop_last=1": lambda: io_.to_sglang(_E, _LM, drop_last=1),
    # Megatron
    "from_megatron float": lambda: io_.from_megatron([t.float() for t in io_.to_megatron(_r)], _r.names, 8),
    "from_megatron batch_size 4 of 6": lambda: io_.from_megatron(io_.to_megatron(_r), _r.names, 8, batch_size=4),
    "from_megatron batch_size 2.0": lambda: io_.from_megatron(io_.to_megatron(_r), _r.names, 8, batch_size=2.0),
    "from_megatron missing 'skip'": lambda: io_.from_megatron(io_.to_megatron(_r), _r.names, 8, missing="skip"),
    "from_megatron 3-d layer": lambda: io_.from_megatron([t[None] for t in io_.to_megatron(_r)], _r.names, 8),
    "to_megatron fill 1.0": lambda: io_.to_megatron(_r, fill=1.0),
    "to_megatron fill -1": lambda: io_.to_megatron(_r, fill=-1),
    "from_megatron_inference all layers": lambda: io_.from_megatron_inference(
        io_.to_vllm_legacy(_E, _LM), _LM, num_tokens=5
    ),
    "from_megatron_inference float": lambda: io_.from_megatron_inference(
        io_.to_megatron_inference(_E, _LM).astype(np.float32), _LM, num_tokens=5
    ),
    "megatron config typo": lambda: io_.check_megatron_config(
        {"moe_enable_routing_replays": True, "moe_router_fusion": True}
    ),
    "megatron config dashes": lambda: io_.check_megatron_config(
        {"moe-enable-routing-replay": True, "moe_router_fusion": True}
    ),
    "megatron config typo of fusion": lambda: io_.check_megatron_config(
        {"moe_enable_routing_replay": True, "moe_router_fussion": True}
    ),
    "megatron config flag 'maybe'": lambda: io_.check_megatron_config(
        {"moe_enable_routing_replay": "maybe", "moe_router_fusion": True}
    ),
    "megatron config flag 2": lambda: io_.check_megatron_config(
        {"moe_enable_routing_replay": 2, "moe_router_fusion": 1}
    ),
    "megatron config flag list": lambda: io_.check_megatron_config(
        SimpleNamespace(moe_enable_routing_replay=[True], moe_router_fusion=True)
    ),
    "megatron config argv list": lambda: io_.check_megatron_config(["--moe-enable-routing-replay"]),
    # verl
    "from_verl mask of 0.5": lambda: io_.from_verl(_VERL, _VMASK.float() * 0.5, _LM),
    "from_verl 1-d mask": lambda: io_.from_verl(_VERL, _VMASK[0], _LM),
    "from_verl transposed mask": lambda: io_.from_verl(_VERL, _VMASK.t(), _LM),
    "from_verl uint8 (-1 wrapped)": lambda: io_.from_verl(_VERL.to(torch.uint8), _VMASK, _LM),
    "from_verl float": lambda: io_.from_verl(_VERL.float(), _VMASK, _LM),
    "from_verl layout 'moe' of all": lambda: io_.from_verl(_VERL, _VMASK, _LM, layout="moe"),
    "from_verl fill 0.0": lambda: io_.from_verl(_VERL, _VMASK, _LM, fill=0.0),
    "from_verl last_routed=1": lambda: io_.from_verl(_VERL, _VMASK, _LM, last_routed=1),
    "from_verl float input_ids": lambda: io_.from_verl(_VERL, _VMASK, _LM, input_ids=torch.zeros(_VMASK.shape)),
    "from_verl row of no token": lambda: io_.from_verl(
        _VERL, torch.stack([_VMASK[0], torch.zeros_like(_VMASK[1])]), _LM
    ),
    "to_verl prompt_lengths [True, 3]": lambda: io_.to_verl(_VSEQS, _LM, prompt_lengths=[True, 3]),
    "to_verl [[2, 3]]": lambda: io_.to_verl(_VSEQS, _LM, prompt_lengths=torch.tensor([[2, 3]])),
    "to_verl one Routes": lambda: io_.to_verl(_E, _LM, prompt_lengths=[2]),
    # NeMo-RL
    "from_nemo_rl cut": lambda: io_.from_nemo_rl(io_.to_nemo_rl(_E, _LM)[:-4], _LM, num_tokens=5),
    "from_nemo_rl nrlre2": lambda: io_.from_nemo_rl(
        io_.to_nemo_rl(_E, _LM).replace("nrlre1", "nrlre2", 1), _LM, num_tokens=5
    ),
    "from_nemo_rl num_tokens 4": lambda: io_.from_nemo_rl(io_.to_nemo_rl(_E, _LM), _LM, num_tokens=4),
    "from_nemo_rl None": lambda: io_.from_nemo_rl(None, _LM),
    "to_nemo_rl int64": lambda: io_.to_nemo_rl(_E, _LM, dtype="int64"),
    "nemo_rl_dtype 8.0": lambda: io_.nemo_rl_dtype(8.0),
    # turns and layer maps
    "stitch gaps 'x'": lambda: io_.stitch_turns([_E], gaps="x"),
    "stitch ids of one turn for two": lambda: io_.stitch_turns([_E, _E], token_ids=[[1, 2, 3, 4, 5]]),
    "stitch a tensor": lambda: io_.stitch_turns([_E.indices]),
    "LayerMap layers [1.0, 2.0]": lambda: mr.LayerMap.from_names(list(_E.names), 3, 8, 2, layers=[1.0, 2.0]),
    "LayerMap num_layers True": lambda: mr.LayerMap.from_names(list(_E.names), True, 8, 2),
    "LayerMap pattern '('": lambda: mr.LayerMap.from_names(list(_E.names), 3, 8, 2, pattern="("),
    "LayerMap pattern of no group": lambda: mr.LayerMap.from_names(list(_E.names), 3, 8, 2, pattern=r"layers\.\d+"),
    "LayerMap width None": lambda: _LM.width(None),
    "LayerMap k differ": lambda: mr.LayerMap.from_names(list(_E.names), 3, 8, [2, 1]).k,
    "LayerMap fields of other lengths": lambda: mr.LayerMap(
        names=tuple(_E.names), layers=(1,), num_layers=3, num_experts=(8, 8), top_k=(2, 2)
    ),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_REFUSED.values()), ids=list(_REFUSED))
def test_bad_input_to_the_public_api_is_refused_with_a_moe_replay_error(call: Callable[[], object]) -> None:
    """Routes, token ids, losses, comparisons, batch layouts, generation helpers and engine formats given a value of
    the wrong kind, range or meaning (an int 0/1 mask read as positions, a config flag spelt as text, a misspelt
    config key): each is refused with a MoEReplayError, never a builtin error nor an answer of other rows."""
    with pytest.raises(mr.MoEReplayError):
        call()


def _reference_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The loss of load_balancing_loss's docstring, computed by hand: E * sum_e f_e * P_e."""
    e = probs.shape[1]
    f = torch.zeros(e).index_add_(0, idx.reshape(-1).long(), torch.ones(idx.numel())) / idx.shape[0]
    return e * (f * probs.float().mean(0)).sum()


#: inputs that look wrong but are right, each with what it must equal (its plain spelling's answer)
_EXACT: dict[str, Callable[[], tuple[object, object]]] = {
    "Routes of int32 rows": lambda: (mr.Routes([_I.int()], ["a"], 8).layer("a"), _I),
    "Routes of int16 rows": lambda: (mr.Routes([_I.short()], ["a"], 8).layer("a"), _I),
    "Routes of a transposed view": lambda: (mr.Routes([_I.t().contiguous().t()], ["a"], 8).layer("a"), _I),
    "Routes of expanded rows": lambda: (
        mr.Routes([_I[:1].expand(6, 2)], ["a"], 8).layer("a"),
        _I[:1].repeat(6, 1),
    ),
    "Routes of numpy rows": lambda: (mr.Routes([_I.numpy()], ["a"], 8).layer("a"), _I),
    "Routes from a generator of rows": lambda: (mr.Routes((t for t in [_I]), ["a"], 8).layer("a"), _I),
    "Routes experts np.int64": lambda: (mr.Routes([_I], ["a"], np.int64(8)).experts_per_layer, (8,)),
    "Routes experts 0-d tensor": lambda: (mr.Routes([_I], ["a"], torch.tensor(8)).experts_per_layer, (8,)),
    "from_numpy big-endian": lambda: (
        mr.Routes.from_numpy(_r.to_numpy(">i4"), names=_r.names, num_experts=8).indices,
        _r.indices,
    ),
    "from_numpy reversed view": lambda: (
        mr.Routes.from_numpy(_r.to_numpy()[::-1], names=_r.names, num_experts=8).indices,
        _r.indices.flip(0),
    ),
    "from_numpy Fortran order": lambda: (
        mr.Routes.from_numpy(np.asfortranarray(_r.to_numpy()), names=_r.names, num_experts=8).indices,
        _r.indices,
    ),
    "from_numpy of nested lists": lambda: (
        mr.Routes.from_numpy(_r.to_numpy().tolist(), names=_r.names, num_experts=8).indices,
        _r.indices,
    ),
    "to_numpy '>i2'": lambda: (torch.from_numpy(_r.to_numpy(">i2").astype(np.int64)), _r.indices),
    "to_numpy 'int16' by name": lambda: (torch.from_numpy(_r.to_numpy("int16").astype(np.int64)), _r.indices),
    "to_numpy float16": lambda: (torch.from_numpy(_r.to_numpy(np.float16).astype(np.int64)), _r.indices),
    "routes[np.arange int32]": lambda: (_r[np.arange(6, dtype=np.int32)].indices, _r.indices),
    "routes[torch int32 positions]": lambda: (_r[torch.arange(6, dtype=torch.int32)].indices, _r.indices),
    "routes[range]": lambda: (_r[range(6)].indices, _r.indices),
    "routes[0/1 positions of fewer rows]": lambda: (_r[[0, 1, 1]].indices, _r.indices[[0, 1, 1]]),
    "routes[bool mask from an int mask]": lambda: (
        _r[torch.tensor([1, 0, 1, 0, 1, 0]).bool()].indices,
        _r.indices[[0, 2, 4]],
    ),
    "routes of 2 tokens [[1, 0]]": lambda: (_r[:2][[1, 0]].indices, _r.indices[[1, 0]]),
    "select from a generator": lambda: (_r.select(n for n in _r.names).indices, _r.indices),
    "cat of a generator": lambda: (mr.Routes.cat(x for x in [_r, _r]).indices, torch.cat([_r.indices] * 2)),
    "ids int32": lambda: (_r.with_token_ids(torch.arange(6, dtype=torch.int32)).token_ids, torch.arange(6)),
    "ids numpy uint8": lambda: (_r.with_token_ids(np.arange(6, dtype=np.uint8)).token_ids, torch.arange(6)),
    "ids [2, 3] read row-major": lambda: (_r.with_token_ids(torch.arange(6).view(2, 3)).token_ids, torch.arange(6)),
    "pickle": lambda: (pickle.loads(pickle.dumps(_r)).indices, _r.indices),
    "pickle keeps ids": lambda: (pickle.loads(pickle.dumps(_r.with_token_ids(range(6)))).token_ids, torch.arange(6)),
    "deepcopy": lambda: (copy.deepcopy(_r).indices, _r.indices),
    "lbl int32 indices": lambda: (mr.load_balancing_loss(_P, _I.int()), _reference_loss(_P, _I)),
    "lbl uint8 indices": lambda: (mr.load_balancing_loss(_P, _I.to(torch.uint8)), _reference_loss(_P, _I)),
    "lbl transposed-view indices": lambda: (
        mr.load_balancing_loss(_P, _I.t().contiguous().t()),
        _reference_loss(_P, _I),
    ),
    "lbl bool mask of all": lambda: (
        mr.load_balancing_loss(_P, _I, mask=torch.ones(6, dtype=torch.bool)),
        _reference_loss(_P, _I),
    ),
    "lbl uint8 mask of all": lambda: (
        mr.load_balancing_loss(_P, _I, mask=torch.ones(6, dtype=torch.uint8)),
        _reference_loss(_P, _I),
    ),
    "lbl mask of 2 everywhere": lambda: (
        mr.load_balancing_loss(_P, _I, mask=torch.full((6,), 2.0)),
        _reference_loss(_P, _I),
    ),
    "lbl half the rows masked": lambda: (
        mr.load_balancing_loss(_P, _I, mask=torch.tensor([1, 1, 1, 0, 0, 0])),
        _reference_loss(_P[:3], _I[:3]),
    ),
    "lbl probs of exactly 1": lambda: (
        mr.load_balancing_loss(torch.eye(8)[:6], _I[:, :1]),
        _reference_loss(torch.eye(8)[:6], _I[:, :1]),
    ),
    "lbl bf16 one-hot probs": lambda: (
        mr.load_balancing_loss(torch.eye(8)[:6].bfloat16(), _I[:, :1]),
        _reference_loss(torch.eye(8)[:6], _I[:, :1]),
    ),
    "lbl bf16 softmax": lambda: (
        mr.load_balancing_loss((_P * 40).log_softmax(-1).bfloat16().softmax(-1), _I),
        _reference_loss((_P * 40).log_softmax(-1).bfloat16().softmax(-1), _I),
    ),
    "lbl sigmoid scores": lambda: (
        mr.load_balancing_loss(torch.randn(6, 8).mul(30).sigmoid(), _I),
        None,  # (any value: not refused)
    ),
    "lbl tuples": lambda: (mr.load_balancing_loss((_P,), (_I,)), _reference_loss(_P, _I)),
    "compare names tuple": lambda: (mr.compare(_r, _r, names=tuple(_r.names)).overall, 0.0),
    "compare labels list": lambda: (mr.compare(_r, _r, labels=["x", "y"]).overall, 0.0),
    "compare routers in another order": lambda: (mr.compare(_r, _r.select(_r.names[::-1])).overall, 0.0),
    "pad length np.int64": lambda: (mr.pad_routes([_r], length=np.int64(8)).num_tokens, 8),
    "pad a tuple": lambda: (mr.pad_routes((_r, _r)).indices, torch.cat([_r.indices] * 2)),
    "layout padded numpy": lambda: (mr.BatchLayout.padded(np.array([3, 2])).lengths, (3, 2)),
    "layout flat_positions np.int64": lambda: (_L.flat_positions(np.int64(1)), _L.flat_positions(1)),
    "layout tokens of lists": lambda: (
        _L.tokens([[1, 2, 3], [4, 5]]),
        _L.tokens([torch.tensor([1, 2, 3]), torch.tensor([4, 5])]),
    ),
    "layout tokens of int32 and uint8": lambda: (
        _L.tokens([torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([4, 5], dtype=torch.uint8)]),
        _L.tokens([torch.tensor([1, 2, 3]), torch.tensor([4, 5])]),
    ),
    "gen cap np.int64": lambda: (mr.generation_capacity(np.int64(2), 3, 4), mr.generation_capacity(2, 3, 4)),
    "gen lengths int32": lambda: (mr.generation_lengths(_S.int(), 2, 2), mr.generation_lengths(_S, 2, 2)),
    "gen lengths eos tensor": lambda: (
        mr.generation_lengths(_S, 2, torch.tensor([2, 9])),
        mr.generation_lengths(_S, 2, [2, 9]),
    ),
    "split bool mask": lambda: (
        [p.indices for p in mr.split_generation(_G, attention_mask=torch.ones(2, 2, dtype=torch.bool))],
        [p.indices for p in mr.split_generation(_G, attention_mask=torch.ones(2, 2, dtype=torch.long))],
    ),
    "split numpy mask": lambda: (
        [p.indices for p in mr.split_generation(_G, attention_mask=np.ones((2, 2), np.int64))],
        [p.indices for p in mr.split_generation(_G, attention_mask=torch.ones(2, 2, dtype=torch.long))],
    ),
    "split padding_side 'right' by name": lambda: (
        [p.indices for p in mr.split_generation(_G, batch_size=2, prompt_len=2, padding_side="right")],
        [p.indices for p in mr.split_generation(_G, batch_size=2, prompt_len=2)],
    ),
    "from_vllm torch uint8": lambda: (
        io_.from_vllm(torch.from_numpy(io_.to_vllm(_E, _LM)), _LM, prompt_len=2, completion_len=3).indices,
        _E.indices,
    ),
    "from_vllm Fortran order": lambda: (
        io_.from_vllm(np.asfortranarray(io_.to_vllm(_E, _LM)), _LM, prompt_len=2, completion_len=3).indices,
        _E.indices,
    ),
    "from_vllm prompt_len np.int64": lambda: (
        io_.from_vllm(io_.to_vllm(_E, _LM), _LM, prompt_len=np.int64(2), completion_len=3).indices,
        _E.indices,
    ),
    "from_vllm bytes of base64": lambda: (
        io_.from_vllm(
            io_.vllm_array_to_base64(io_.to_vllm(_E, _LM)).encode(), _LM, prompt_len=2, completion_len=3
        ).indices,
        _E.indices,
    ),
    "from_vllm int64 told its version": lambda: (
        io_.from_vllm(
            io_.to_vllm(_E, _LM).astype(np.int64), _LM, prompt_len=2, completion_len=3, version="0.25"
        ).indices,
        _E.indices,
    ),
    "from_vllm_legacy int64": lambda: (
        io_.from_vllm_legacy(io_.to_vllm_legacy(_E, _LM).astype(np.int64), _LM, num_tokens=5).indices,
        _E.indices,
    ),
    "vllm_layout 'v0.20'": lambda: (io_.vllm_layout("v0.20"), io_.vllm_layout((0, 20))),
    "vllm_layout dev build": lambda: (io_.vllm_layout("0.20.1.dev0+g123"), io_.vllm_layout((0, 20))),
    "vllm_dtype np.int64": lambda: (io_.vllm_dtype(np.int64(300)), io_.vllm_dtype(300)),
    "from_sglang bytes": lambda: (
        io_.from_sglang(io_.to_sglang(_E, _LM)["routed_experts"].encode(), _LM, num_tokens=5).indices,
        _E.indices,
    ),
    "from_megatron int32": lambda: (
        io_.from_megatron([t.int() for t in io_.to_megatron(_r)], _r.names, 8).indices,
        _r.indices,
    ),
    "from_megatron numpy": lambda: (
        io_.from_megatron([t.numpy() for t in io_.to_megatron(_r)], _r.names, 8).indices,
        _r.indices,
    ),
    "from_megatron_inference lists": lambda: (
        io_.from_megatron_inference(io_.to_megatron_inference(_E, _LM).tolist(), _LM, num_tokens=5).indices,
        _E.indices,
    ),
    "from_verl bool mask": lambda: (
        [s.indices for s in io_.from_verl(_VERL, _VMASK.bool(), _LM)],
        [s.indices for s in _VSEQS],
    ),
    "from_verl float mask": lambda: (
        [s.indices for s in io_.from_verl(_VERL, _VMASK.float(), _LM)],
        [s.indices for s in _VSEQS],
    ),
    "from_verl int32": lambda: (
        [s.indices for s in io_.from_verl(_VERL.int(), _VMASK, _LM)],
        [s.indices for s in _VSEQS],
    ),
    "from_verl transposed view": lambda: (
        [s.indices for s in io_.from_verl(_VERL.transpose(0, 1).contiguous().transpose(0, 1), _VMASK, _LM)],
        [s.indices for s in _VSEQS],
    ),
    "to_verl numpy prompt_lengths": lambda: (
        io_.to_verl(_VSEQS, _LM, prompt_lengths=np.array([2, 3])),
        _VERL,
    ),
    "from_nemo_rl bytes": lambda: (
        io_.from_nemo_rl(io_.to_nemo_rl(_E, _LM).encode(), _LM, num_tokens=5).indices,
        _E.indices,
    ),
    "LayerMap of lists": lambda: (
        mr.LayerMap(names=list(_E.names), layers=[1, 2], num_layers=3, num_experts=[8, 8], top_k=[2, 2]).names,
        _LM.names,
    ),
}


def _same(got: object, want: object) -> bool:
    if isinstance(want, list):
        return (
            isinstance(got, list) and len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))
        )
    if isinstance(want, torch.Tensor) and want.dtype.is_floating_point:  # (a loss: summed in another order)
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got.to(want.dtype), want)
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.to(want.dtype), want)
    return bool(got == want)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_EXACT.values()), ids=list(_EXACT))
def test_inputs_that_look_wrong_but_are_right_give_the_plain_answer(call: Callable[[], tuple[object, object]]) -> None:
    """int32/int16/uint8 rows and indices, views, expanded and Fortran-order arrays, numpy scalars, generators,
    bytes of base64, pickled and copied routes, probabilities of exactly 1 in bfloat16: each gives exactly what
    its plain spelling gives, never a refusal."""
    got, want = call()
    if want is not None:
        assert _same(got, want), f"{got!r} != {want!r}"


def test_load_takes_a_numpy_integer_as_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.npz"
    _r.save(path)
    assert mr.Routes.load(path, max_bytes=np.int64(10**9)).equal(_r)
    assert mr.Routes.load(str(path), max_bytes=None).equal(_r)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([1, 0, 1, 0, 1, 0]),
        [1, 1, 1, 0, 0, 0],
        np.array([0, 1, 1, 1, 1, 1]),
        torch.tensor([0, 0, 0, 0, 0, 0]),
        torch.tensor([1, 1, 1, 1, 1, 1], dtype=torch.int32),
    ],
    ids=["tensor", "list", "numpy", "all 0", "all 1 int32"],
)
def test_an_int_mask_given_as_token_positions_is_refused_never_read_as_rows_0_and_1(mask: Any) -> None:
    """``routes[attention_mask.flatten()]``: an int64 mask (transformers' attention masks are int64) indexes as
    positions in torch and numpy, so it silently gave rows 0 and 1 over and over instead of the tokens it marks.
    One 0 or 1 per token, past two tokens, always repeats a token: refused, naming ``mask.bool()``; the bool mask
    selects exactly the marked rows, and fewer 0/1 positions than tokens are still positions."""
    with pytest.raises(mr.ArgumentTypeError, match=r"mask\.bool\(\)"):
        _r[mask]
    flags = torch.as_tensor(np.asarray(mask)).bool()
    picked = _r[flags]
    assert torch.equal(picked.indices, _r.indices[flags])
    assert torch.equal(_r[[1, 0, 1]].indices, _r.indices[[1, 0, 1]])  # (positions: fewer than the tokens)


@pytest.mark.parametrize(
    ("replay", "fusion", "refused"),
    [
        ("false", "true", False),
        ("False", "True", False),
        ("0", "1", False),
        ("no", "yes", False),
        ("", "true", False),
        ("true", "false", False),
        ("true", "true", True),
        ("True", " TRUE ", True),
        ("1", "1", True),
        ("on", "yes", True),
        (np.bool_(True), torch.tensor(True), True),
        (1, 1, True),
        (torch.tensor(0), 1, False),
        (None, True, False),
    ],
)
@pytest.mark.parametrize("holder", ["dict", "object"])
def test_megatron_flags_spelt_as_text_or_numbers_are_read_as_the_flags_they_spell(
    replay: object, fusion: object, refused: bool, holder: str
) -> None:
    """A config read from an env var, a CLI string or a JSON written by hand holds ``"false"``: its truth as a
    Python string is True, so ``moe_enable_routing_replay="false"`` with fusion on was refused (a false refusal),
    and text that is no flag would be guessed at. Each spelling is read as the flag it spells."""
    settings = {"moe_enable_routing_replay": replay, "moe_router_fusion": fusion}
    config = settings if holder == "dict" else SimpleNamespace(**settings)
    if refused:
        with pytest.raises(mr.UnsupportedRouterError, match="moe_router_fusion=False"):
            io_.check_megatron_config(config)
    else:
        io_.check_megatron_config(config)


def test_a_misspelt_megatron_setting_is_named_not_read_as_off() -> None:
    """``{"moe_enable_routing_replays": True, "moe_router_fusion": True}`` found the fusion flag, read the missing
    replay flag as off and passed: the one pair the check exists for, with a typo, went through unchecked."""
    with pytest.raises(mr.InvalidArgumentError, match="'moe_enable_routing_replays', not 'moe_enable_routing_replay'"):
        io_.check_megatron_config({"moe_enable_routing_replays": True, "moe_router_fusion": True})
    # (keys beside the settings that merely resemble nothing are fine)
    io_.check_megatron_config({"moe_enable_routing_replay": True, "moe_router_fusion": False, "moe_router_topk": 2})


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("as_array", [lambda t: t, lambda t: t.numpy()], ids=["tensor", "numpy"])
def test_one_array_given_to_from_megatron_is_refused_never_read_transposed(as_array: Callable[[Any], Any]) -> None:
    """``from_megatron(routes.indices, names, E)``: iterating a ``[tokens, layers, k]`` array took its tokens as the
    layers, so with as many tokens as layers every router got the other routers' experts, without a word (Routes()
    refuses one array for this reason). Megatron's list, or the array unbound along its layer axis, reads exactly."""
    square = _R(t=2)  # two tokens, two routers
    with pytest.raises(mr.ArgumentTypeError, match="whose axes are not known"):
        io_.from_megatron(as_array(square.indices), square.names, 8)
    assert io_.from_megatron(square.indices.unbind(1), square.names, 8).equal(square)
    assert io_.from_megatron(io_.to_megatron(square), square.names, 8).equal(square)


def test_split_generation_refuses_a_padding_side_it_does_not_know_whatever_else_is_given() -> None:
    """``padding_side`` was checked only beside ``prompt_lengths``: with ``batch_size``/``prompt_len`` or a mask a
    typo ('middle', 'Left') passed unread; the user meant something the split never did."""
    for side in ("middle", "Left", None, 0):
        with pytest.raises(mr.InvalidArgumentError, match="padding_side must be 'left' or 'right'"):
            mr.split_generation(_G, batch_size=2, prompt_len=2, padding_side=side)
    left = mr.split_generation(_G, prompt_lengths=[1, 2], prompt_len=2, padding_side="left")
    right = mr.split_generation(_G, prompt_lengths=[1, 2], prompt_len=2, padding_side="right")
    assert [p.num_tokens for p in left] == [p.num_tokens for p in right] == [4, 5]
    assert not left[0].equal(right[0])  # (the prompt's real row differs by side)


def test_token_ids_of_three_dimensions_are_refused() -> None:
    """``with_token_ids(ids[None])`` or ``ids.unsqueeze(-1)`` of ``[batch, positions]`` were read flat whatever
    their axes; only ``[T]`` and ``[batch, positions]`` have a row order."""
    ids = torch.arange(6).view(2, 3)
    for bad in (ids[None], ids[..., None], ids.reshape(1, 2, 3, 1)):
        with pytest.raises(mr.RoutesValidationError, match=r"\[batch, positions\]"):
            _r.with_token_ids(bad)
    assert torch.equal(_r.with_token_ids(ids).token_ids, torch.arange(6))


def test_the_loss_refuses_probabilities_above_one_and_complex_masks() -> None:
    """Positive logits (or ``exp`` of logits) passed as ``probs`` gave a loss scaled by their size without a word:
    only negative values were caught. A complex mask was cast to its real part with at most a warning."""
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).abs() + 1
    with pytest.raises(mr.InvalidArgumentError, match="from 0 to 1.*maximum"):
        mr.load_balancing_loss(logits, _I)
    with pytest.raises(mr.ArgumentTypeError, match="real token weights"):
        mr.load_balancing_loss(_P, _I, mask=torch.ones(6, dtype=torch.complex64))
    assert torch.allclose(mr.load_balancing_loss(logits.softmax(-1), _I), _reference_loss(logits.softmax(-1), _I))


def test_the_command_line_never_asks_for_re_compile(capsys) -> None:
    """A regex given to ``inspect --include`` was told "for a regex pass re.compile(...)", which no command line
    can do; it now names the glob that the command line reads."""
    assert main(["inspect", "softmax_topk", "--include", r"layers\.\d+\.mlp\.router"]) == 2
    err = capsys.readouterr().err
    assert "re.compile" not in err and "glob" in err and err.count("\n") == 1
    assert main(["inspect", "softmax_topk", "--include", "layers.*.mlp.router"]) == 0
    assert "2 router(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- sessions


def _model() -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(seed))


def _forced(routes: mr.Routes) -> mr.Routes:
    """The same tokens' routes with every expert moved by one: what a native forward would not choose."""
    moved = [
        torch.where(t >= 0, (t + 1) % e, t) for t, e in zip(routes.per_layer(), routes.experts_per_layer, strict=True)
    ]
    return mr.Routes(moved, routes.names, routes.experts_per_layer).with_token_ids(routes.token_ids)


@pytest.fixture(scope="module")
def shared() -> Iterator[SimpleNamespace]:
    """One attached model and its capture for the cases below that leave the session idle (its first forward, which
    establishes the decisions, is the slow part); once every case ran, detach leaves the model exactly as it was."""
    model = _model()
    before = snapshot(model)
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(_ids())
    yield SimpleNamespace(model=model, session=session, captured=session.routes())
    session.detach()
    assert_untouched(model, before)


_DETACHED: dict[str, Callable[[mr.Session, mr.Routes], object]] = {
    "capture": lambda s, r: s.capture().__enter__(),
    "replay": lambda s, r: s.replay(r).__enter__(),
    "keep_scores": lambda s, r: s.keep_scores().__enter__(),
    "reserve": lambda s, r: s.reserve(100),
    "verify": lambda s, r: s.verify(_ids()),
}


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("call", list(_DETACHED.values()), ids=list(_DETACHED))
def test_a_detached_session_refuses_every_block_and_keeps_its_last_capture(
    call: Callable[[mr.Session, mr.Routes], object],
) -> None:
    """A session used after ``detach`` (its ``with`` left, a second ``detach``): each block and call is refused with
    SessionStateError, the model stays plain, and the routes of its last capture are still read whole."""
    model = _model()
    before = snapshot(model)
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(_ids())
    captured = session.routes()
    session.detach()
    session.detach()  # (idempotent)
    with pytest.raises(mr.SessionStateError, match="detached"):
        call(session, captured)
    assert session.state == "detached" and session.routes().equal(captured)
    assert_untouched(model, before)
    with mr.attach(model) as again:  # (a new session attaches cleanly)
        with again.replay(captured), again.capture(), torch.no_grad():
            model(_ids())
        assert again.routes().equal(captured)
    assert_untouched(model, before)


_BAD_CALLS: dict[str, Callable[[mr.Session], object]] = {
    **{f"reserve({v!r})": (lambda s, v=v: s.reserve(v)) for v in (-1, 0, 1.5, "10", None, True, float("inf"))},
    "reserve(2**62)": lambda s: s.reserve(2**62),
    "reserve(np.float64)": lambda s: s.reserve(np.float64(10)),
    "reserve(0-d float tensor)": lambda s: s.reserve(torch.tensor(10.0)),
    **{
        f"capture({k}={v!r})": (lambda s, k=k, v=v: s.capture(**{k: v}).__enter__())
        for k, v in (
            ("expected_tokens", -1),
            ("expected_tokens", 1.5),
            ("expected_tokens", True),
            ("max_bytes", -1),
            ("max_bytes", 0),
            ("max_bytes", 1.5),
            ("clear", None),
            ("clear", 0),
            ("clear", "no"),
        )
    },
    "replay(strict=1)": lambda s: s.replay(s.routes(), strict=1).__enter__(),
    "replay(routes of int mask rows)": lambda s: s.replay(s.routes()[torch.ones(12, dtype=torch.long)]),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_BAD_CALLS.values()), ids=list(_BAD_CALLS))
def test_bad_arguments_to_a_sessions_calls_change_nothing(
    call: Callable[[mr.Session], object], shared: SimpleNamespace
) -> None:
    """Sizes that are no row counts (negative, fractional, text, bool, numpy scalars, past a tensor's reach), byte
    limits of 0, flags given as 0 or text: refused with a MoEReplayError before anything is cleared, so the last
    capture is still read whole, the session is idle and forces routes exactly, and (the fixture's teardown) detach
    leaves the model plain."""
    session, model = shared.session, shared.model
    with session.capture(), torch.no_grad():
        model(_ids())
    captured = session.routes()
    with pytest.raises(mr.MoEReplayError):
        call(session)
    assert session.state == "idle" and session.routes().equal(captured)
    forced = _forced(captured)
    with session.replay(forced), session.capture(), torch.no_grad():
        model(_ids())
    assert session.routes().equal(forced)


@pytest.mark.reliability("overflow")
def test_a_capture_refused_for_rows_it_cannot_allocate_keeps_the_last_capture() -> None:
    model = _model()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(_ids())
        captured = session.routes()
        with pytest.raises(mr.CaptureOverflowError, match="cannot allocate"):
            session.capture(expected_tokens=2**62).__enter__()
        assert session.state == "idle"
        assert session.routes().equal(captured)


@pytest.mark.reliability("overflow")
def test_a_capture_refused_for_one_routers_rows_keeps_every_ring_and_the_byte_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second router's rows cannot be allocated (out of memory on its device) after the first router's were:
    the refusal keeps the last capture of both, frees what it allocated for the first (a capture whose byte limit
    is what the rings held before then fits), and that capture records and forces routes exactly."""
    model = _model()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(_ids())
        captured, held = session.routes(), session.memory()
        real, calls = mr.ring.CaptureRing._alloc, []

        def second_fails(ring: mr.ring.CaptureRing, rows: int, *, zeros: bool = False) -> torch.Tensor:
            calls.append(ring.name)
            if len(calls) == 2:
                raise mr.CaptureOverflowError(f"router '{ring.name}': cannot allocate {rows} rows (out of memory)")
            return real(ring, rows, zeros=zeros)

        monkeypatch.setattr(mr.ring.CaptureRing, "_alloc", second_fails)
        with pytest.raises(mr.CaptureOverflowError, match="cannot allocate"):
            session.capture(expected_tokens=2 * session.capacity).__enter__()
        monkeypatch.undo()
        assert len(calls) == 2 and session.state == "idle"
        assert session.routes().equal(captured) and session.memory() == held
        forced = _forced(captured)
        with session.replay(forced), session.capture(expected_tokens=64, max_bytes=held["cpu"]["bytes"]):
            with torch.no_grad():
                model(_ids())
        assert session.routes().equal(forced) and session.memory() == held


@pytest.mark.reliability("bad inputs")
def test_row_counts_and_byte_limits_given_as_numpy_integers_are_taken() -> None:
    """``capacity=np.prod(shape)``, ``reserve(np.int64(n))``, ``capture(expected_tokens=...)`` from numpy: refused
    as "not a positive int" (a false refusal) where every other count of the API takes numpy's integers."""
    model = _model()
    before = snapshot(model)
    with mr.attach(model, capacity=np.int64(16), max_bytes=np.int64(10**6)) as session:
        assert session.capacity == 16 and type(session.capacity) is int
        session.reserve(np.int64(32))
        assert session.capacity == 32
        with session.capture(expected_tokens=np.int32(40), max_bytes=np.int64(10**6)), torch.no_grad():
            model(_ids())
        captured = session.routes()
        assert session.capacity == 40 and captured.num_tokens == 12
        forced = _forced(captured)
        with session.replay(forced), session.capture(), torch.no_grad():
            model(_ids())
        assert session.routes().equal(forced)
    assert_untouched(model, before)


_SAME_ROUTES: dict[str, Callable[[mr.Routes, str], mr.Routes]] = {
    "pickled": lambda r, d: pickle.loads(pickle.dumps(r)),
    "deepcopied": lambda r, d: copy.deepcopy(r),
    "torch.save": lambda r, d: (lambda b: (torch.save(r, b), b.seek(0), torch.load(b, weights_only=False))[2])(
        io.BytesIO()
    ),
    "saved and loaded": lambda r, d: (r.save(os.path.join(d, "x.npz")), mr.Routes.load(os.path.join(d, "x.npz")))[1],
    "from_numpy int32, ids given back": lambda r, d: mr.Routes.from_numpy(
        r.to_numpy(np.int32), names=r.names, num_experts=8
    ).with_token_ids(r.token_ids),
    "from_numpy uint8, ids of numpy": lambda r, d: mr.Routes.from_numpy(
        r.to_numpy(np.uint8), names=r.names, num_experts=8
    ).with_token_ids(_ids().numpy()),
    "ids set as [batch, positions]": lambda r, d: r.with_token_ids(None).with_token_ids(_ids()),
    "halves joined": lambda r, d: mr.Routes.cat([r[:6], r[6:]]),
    "joined with no rows": lambda r, d: mr.Routes.cat([r, r[0:0]]),
    "every row by a bool mask": lambda r, d: r[torch.ones(12, dtype=torch.bool)],
    "every row by numpy positions": lambda r, d: r[np.arange(12)],
    "every row by int32 positions": lambda r, d: r[torch.arange(12, dtype=torch.int32)],
    "every row by a range": lambda r, d: r[range(12)],
    "unpacked and padded again": lambda r, d: mr.pad_routes(mr.BatchLayout.padded([6, 6]).unpack(r)),
    "routers selected in reverse": lambda r, d: r.select(r.names[::-1]),
}

_FEEDS: dict[str, Callable[[], torch.Tensor]] = {
    "int64 ids": _ids,
    "int32 ids": lambda: _ids().int(),
    "transposed-view ids": lambda: _ids().t().contiguous().t(),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("feed", list(_FEEDS.values()), ids=list(_FEEDS))
@pytest.mark.parametrize("same", list(_SAME_ROUTES.values()), ids=list(_SAME_ROUTES))
def test_routes_carried_any_way_replay_forced_on_ids_of_any_dtype_or_layout(
    same: Callable[[mr.Routes, str], mr.Routes],
    feed: Callable[[], torch.Tensor],
    tmp_path: Path,
    shared: SimpleNamespace,
) -> None:
    """Routes pickled, copied, saved, rebuilt from numpy of another dtype, re-joined or re-selected, replayed on the
    same tokens fed as int32 or as a view: forced exactly (every expert moved from the native choice), never
    refused as other tokens."""
    session, model = shared.session, shared.model
    forced = _forced(shared.captured)
    carried = same(forced, str(tmp_path))
    with session.replay(carried), session.capture(), torch.no_grad():
        model(feed())
    assert session.routes().equal(forced)


@pytest.mark.reliability("bad inputs")
def test_an_expert_count_above_the_routers_weight_is_refused_as_one_below_it_is() -> None:
    model = _model()
    before = snapshot(model)
    with pytest.raises(mr.RouterNotFoundError, match="expert count of no router"):
        mr.attach(model, num_experts=3)
    try:
        with pytest.raises(mr.RouterNotFoundError, match="expert count of no router"):
            session = mr.attach(model, num_experts=16)
            session.detach()
    finally:
        assert_untouched(model, before)
