"""Megatron-core 0.19: RouterReplay's per-layer list and inference ``routing_indices``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType, SimpleNamespace

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from .engines import Model, megatron_routing_indices

M = Model()


def test_router_replay_list_and_token_order() -> None:
    """megatron-core 0.19.2 ``transformer/moe/router_replay.py:29-42``: ``set_replay_data`` takes one
    ``[num_tokens, topk]`` tensor per router in instantiation (layer) order; REPLAY_FORWARD gathers
    every index (``:167-173``), so there is no "route natively" row.
    """
    seqs = [M.routes(M.truth(4, seed=s), last=False) for s in range(3)]
    batch = mr.pad_routes(seqs)  # batch-major [3 sequences, 4 positions]
    layers = interop.to_megatron(batch, layer_map=M.layer_map)
    assert len(layers) == 3 and all(t.dtype == torch.int64 and t.shape == (12, 2) for t in layers)
    assert torch.equal(layers[0], batch.layer(M.names[0]))
    seq_first = interop.to_megatron(batch, batch_size=3)  # Megatron's unpacked [S, B] order
    s, b = 1, 2
    assert torch.equal(seq_first[0][s * 3 + b], batch.layer(M.names[0])[b * 4 + s])
    assert interop.from_megatron(seq_first, M.names, M.num_experts, batch_size=3).equal(batch)
    with pytest.raises(mr.RoutesValidationError, match="cannot route a token natively"):
        interop.to_megatron(M.routes(M.truth(3)))
    filled = interop.to_megatron(M.routes(M.truth(3)), fill=5)
    assert filled[0][-1].tolist() == [5, 6]
    with pytest.raises(mr.RoutesValidationError, match="must exist"):
        interop.to_megatron(M.routes(M.truth(3)), fill=15)


def test_layers_of_different_token_counts_are_refused() -> None:
    """Once accepted: layers of two micro-batches mixed in one list made Routes that failed only at replay."""
    layers = interop.to_megatron(M.routes(M.truth(4), last=False), layer_map=M.layer_map)
    layers[1] = layers[1][:3]
    with pytest.raises(mr.RoutesValidationError, match=r"different token counts \[4, 3, 4\]"):
        interop.from_megatron(layers, M.names, M.num_experts)


def test_inference_routing_indices() -> None:
    """megatron-core 0.19.2 ``inference/inference_request.py:376-377, 470-477``: ``[total_tokens - 1,
    num_moe_layers, topk]``; ``inference/contexts/routing_metadata.py:50-54``: int32.
    """
    truth = M.truth(7, seed=5)
    arr = megatron_routing_indices(M, truth)
    assert arr.dtype == np.int32 and arr.shape == (6, 3, 2)
    r = interop.from_megatron_inference(arr, M.layer_map, num_tokens=7)
    assert r.equal(M.routes(truth))
    assert np.array_equal(interop.to_megatron_inference(r, M.layer_map), arr)
    with pytest.raises(mr.RoutesValidationError, match="a sequence of 8 tokens"):
        interop.from_megatron_inference(arr, M.layer_map, num_tokens=8)
    with pytest.raises(mr.RoutesValidationError, match="fits layout='all'"):  # an all-layer array is not this format
        interop.from_megatron_inference(np.zeros((6, 4, 2), np.int32), M.layer_map)
    for narrow in (np.uint8, np.int16):  # a cast may have wrapped ids: the refusal says which array to pass
        with pytest.raises(mr.RoutesValidationError, match=r"pass the int32 array of DynamicInferenceRequest"):
            interop.from_megatron_inference(arr.astype(narrow), M.layer_map, num_tokens=7)


def test_router_fusion_bypass_is_refused() -> None:
    """megatron-core 0.19.2 ``transformer/moe/moe_utils.py:772-792``: the fused top-k returns before replay."""
    with pytest.raises(mr.UnsupportedRouterError, match="moe_router_fusion=False"):
        interop.check_megatron_config(SimpleNamespace(moe_enable_routing_replay=True, moe_router_fusion=True))
    interop.check_megatron_config(SimpleNamespace(moe_enable_routing_replay=True, moe_router_fusion=False))


@pytest.mark.parametrize("as_config", [dict, lambda **kw: MappingProxyType(kw)], ids=["dict", "mapping"])
def test_a_config_mapping_is_read_by_key(as_config: Callable[..., Mapping[str, bool]]) -> None:
    """A YAML/JSON config or ``vars(config)`` holds the same settings as keys: checked the same way."""
    with pytest.raises(mr.UnsupportedRouterError, match="moe_router_fusion=False"):
        interop.check_megatron_config(as_config(moe_enable_routing_replay=True, moe_router_fusion=True))
    interop.check_megatron_config(as_config(moe_enable_routing_replay=True, moe_router_fusion=False))
    interop.check_megatron_config(as_config(moe_router_fusion=True))  # replay off (Megatron's default)


@pytest.mark.parametrize(
    ("config", "error"),
    [(None, mr.ArgumentTypeError), (object(), mr.ArgumentTypeError), ({"model": {}}, mr.InvalidArgumentError)],
    ids=["None", "object", "mapping without the settings"],
)
def test_a_config_it_cannot_read_is_refused(config: object, error: type[mr.MoEReplayError]) -> None:
    """A config holding neither setting is refused, naming what it accepts, rather than passed unchecked."""
    with pytest.raises(error, match=r"neither moe_enable_routing_replay nor moe_router_fusion.*TransformerConfig"):
        interop.check_megatron_config(config)


def test_a_negative_index_in_megatrons_list_is_refused_unless_native() -> None:
    """Once silent: from_megatron read a -1 row as "route natively", though Megatron gathers every index and records
    none (a padded micro-batch's -1 rows came back as tokens to route natively, a format fact nowhere written).
    Refused by default; missing="native" reads whole -1 rows as no route (NeMo-RL's patched Megatron does)."""
    rows = torch.tensor([[0, 1], [-1, -1], [2, 3]])
    with pytest.raises(mr.RoutesValidationError, match="layer 0 .*negative index at token 1.*missing='native'"):
        interop.from_megatron([rows], ["gate"], 4)
    got = interop.from_megatron([rows.numpy().astype(np.int32)], ["gate"], 4, missing="native")
    assert got.layer("gate").tolist() == rows.tolist() and got.missing[:, 0].tolist() == [False, True, False]
    for bad in ([[0, 1], [-2, -2], [2, 3]], [[0, 1], [-1, 2], [2, 3]]):  # no -1 row of Routes: refused either way
        with pytest.raises(mr.RoutesValidationError):
            interop.from_megatron([torch.tensor(bad)], ["gate"], 4, missing="native")
    with pytest.raises(mr.RoutesValidationError, match="missing must be"):
        interop.from_megatron([rows], ["gate"], 4, missing="skip")


@pytest.mark.reliability("bad inputs")
def test_routers_out_of_layer_order_are_refused_not_given_other_layers_routes() -> None:
    """Once silent: Megatron gives set_replay_data's tensors to its routers in the order they were built (layer
    order, ``router_replay.py:29-42``). Routes whose routers were sorted as text (a dict written with sorted keys:
    ``layers.10`` before ``layers.2``) went out in that order without a layer_map, and from_megatron named a list
    with such names: each router got another layer's routes. Both are refused; layer_map= orders them."""
    layers = (1, 10, 11, 2)  # sorted(f"...layers.{i}...") of layers 1, 2, 10, 11
    names = [f"decoder.layers.{i}.mlp.router" for i in layers]
    rows = {i: torch.tensor([[i % 8, (i + 1) % 8], [(i + 3) % 8, (i + 5) % 8], [(i + 2) % 8, i % 8]]) for i in layers}
    routes = mr.Routes([rows[i] for i in layers], names=names, num_experts=8)
    with pytest.raises(
        mr.RoutesValidationError, match=r"layers\.11.*\(layer 11\) comes before .*layers\.2.*layer_map="
    ):
        interop.to_megatron(routes)
    ordered = interop.to_megatron(routes, layer_map=mr.LayerMap.from_routes(routes, num_layers=12))
    assert [t.tolist() for t in ordered] == [rows[i].tolist() for i in sorted(layers)]
    with pytest.raises(mr.RoutesValidationError, match=r"comes before .*Pass names in the order of Megatron's list"):
        interop.from_megatron(ordered, names, 8)
    back = interop.from_megatron(ordered, sorted(names, key=lambda n: int(n.split(".")[2])), 8)
    assert back.select(names).equal(routes)
    # names in layer order per stack (MTP's own numbering after the decoder's) and names without a layer pass
    mtp = mr.Routes(
        [rows[1], rows[2], rows[1], rows[2]],
        names=["decoder.layers.1.mlp.router", "decoder.layers.2.mlp.router", "mtp.layers.0.mlp.router", "gate"],
        num_experts=8,
    )
    assert len(interop.to_megatron(mtp)) == 4
