"""LayerMap: router names to the engine's hidden-layer columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_replay as mr

from ..conftest import tried

NAMES = tuple(f"model.layers.{i}.mlp.gate" for i in (1, 2, 3))
LM = mr.LayerMap.from_names(NAMES, 4, 16, 2)


def test_layer_map_from_names_and_session() -> None:
    assert LM.layers == (1, 2, 3) and LM.dense_layers == (0,) and LM.moe_layers == (1, 2, 3)
    assert [LM.column(n, "all") for n in NAMES] == [1, 2, 3]
    assert [LM.column(n, "moe") for n in NAMES] == [0, 1, 2]
    assert (LM.width("all"), LM.width("moe"), LM.max_experts) == (4, 3, 16)
    assert repr(LM) == "LayerMap(routers=3, num_layers=4, moe_layers=3, dense_layers=[0], mtp=[])"
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    with mr.attach(model) as session:
        lm = mr.LayerMap.from_session(session, num_layers=3)
    assert lm.names == ("layers.1.mlp.router", "layers.2.mlp.router") and lm.dense_layers == (0,)


def test_from_session_names_a_wrong_layer_count() -> None:
    """A 4-layer model mapped with num_layers=3: the message says the count is wrong, not that layer 3 is MTP."""
    model = mr.models.build("softmax_topk", num_layers=4)
    with mr.attach(model) as session:
        with pytest.raises(mr.LayerMapError, match="num_layers=3, but the model's config says 4 hidden layers"):
            mr.LayerMap.from_session(session, num_layers=3)
        assert mr.LayerMap.from_session(session, num_layers=4).moe_layers == (0, 1, 2, 3)


@pytest.mark.reliability("bad inputs")
def test_from_session_given_no_session_is_refused() -> None:
    """Once an AttributeError: from_session given None, or the routes of a session instead of the session."""
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model) as session:
        with session.capture():
            model(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(mr.ArgumentTypeError, match="got NoneType"):
            mr.LayerMap.from_session(None, num_layers=2)
        with pytest.raises(mr.ArgumentTypeError, match=r"got Routes; for routes, LayerMap\.from_names"):
            mr.LayerMap.from_session(session.routes(), num_layers=2)
        routes = session.routes()
        lm = mr.LayerMap.from_names(routes.names, 2, routes.experts_per_layer, routes.k_per_layer)
        assert lm == mr.LayerMap.from_session(session, num_layers=2)


def test_layer_map_errors() -> None:
    with pytest.raises(mr.LayerMapError, match="num_layers is wrong.*at least 5.*MTP.*mtp='native'"):
        mr.LayerMap.from_names([*NAMES, "model.layers.4.mlp.gate"], 4, 16, 2)
    with pytest.raises(mr.LayerMapError, match="both map to hidden layer 1"):
        mr.LayerMap.from_names(["model.layers.1.mlp.gate", "model.layers.1.mlp.shared_gate"], 4, 16, 2)
    with pytest.raises(mr.LayerMapError, match="cannot find a layer index in router name 'gate'"):
        mr.LayerMap.from_names(["gate"], 4, 16, 2)
    assert mr.LayerMap.from_names(["gate"], 4, 16, 2, layers=[2]).moe_layers == (2,)
    with pytest.raises(mr.LayerMapError, match="engine arrays hold one k"):
        _ = mr.LayerMap.from_names(NAMES[:2], 4, 16, [2, 4]).k
    with pytest.raises(mr.LayerMapError, match="layout must be"):
        LM.width("dense")
    assert issubclass(mr.LayerMapError, ValueError) and issubclass(mr.LayerMapError, mr.MoEReplayError)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("args", "kwargs", "what"),
    [
        ((NAMES, 4.7, 16, 2), {}, "num_layers must be an integer"),  # int() made it 4
        ((NAMES, "4", 16, 2), {}, "num_layers must be an integer"),
        ((NAMES, 4, 16, [2.5, 2, 2]), {}, "top_k must be integers"),  # int() made it 2
        ((NAMES, 4, 16, 2.5), {}, "top_k must be an int"),
        ((NAMES, 4, 16, 0), {}, "top_k must be at least 1"),
        ((NAMES, 4, 16, 17), {}, "top_k=17 is more than the 16 experts"),
        ((NAMES, 4, 0, 2), {}, "num_experts must be at least 1"),
        ((NAMES, 4, 16, 2), {"layers": [1.5, 2, 3]}, "layers must be integers"),  # int() made it 1
        ((NAMES[0], 4, 16, 2), {}, "names must be router module paths"),  # a str read as one name per letter
    ],
)
def test_a_layer_map_value_that_is_not_what_it_names_is_refused(args, kwargs, what) -> None:
    """LayerMap refuses a float layer count, layer index or k, a k of 0 or past the experts: never cut to an int."""
    with pytest.raises(mr.MoEReplayError, match=what):
        mr.LayerMap.from_names(*args, **kwargs)


def test_layer_map_fields_are_stored_as_ints() -> None:
    lm = mr.LayerMap.from_names(NAMES, np.int64(4), np.int32(16), np.int64(2), layers=np.array([1, 2, 3]))
    assert lm == LM and all(type(v) is int for v in (*lm.layers, lm.num_layers, *lm.num_experts, *lm.top_k))
    with pytest.raises(mr.LayerMapError, match="num_layers must be an integer"):
        mr.LayerMap(NAMES, (1, 2, 3), 3.5, (16,) * 3, (2,) * 3)


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        ("(", "is not a regular expression"),
        (r"layers\.\d+", "has no group"),  # its match has no group 1 to read a layer from
        (r"layers\.(\d+)?x", "cannot find a layer index"),  # the group is optional: it may match nothing
        (r"(layers)\.\d+", "whose first group is not a number"),
    ],
)
def test_a_pattern_that_reads_no_layer_index_is_refused(pattern: str, what: str) -> None:
    with pytest.raises(mr.LayerMapError, match=what):
        mr.LayerMap.from_names(["model.layers.3.mlp.gate"], 4, 8, 2, pattern=pattern)
    assert mr.LayerMap.from_names(["model.layers.3.mlp.gate"], 4, 8, 2, pattern=r"layers\.(\d+)").layers == (3,)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("name", [None, 1, b"model.layers.0.mlp.gate"], ids=["None", "int", "bytes"])
def test_names_that_are_no_str_are_refused(name: object) -> None:
    """Once from_names turned a name that was no str into one (None mapped a router named 'None')."""
    with pytest.raises(mr.LayerMapError, match="names must be router module paths"):
        mr.LayerMap.from_names([name], num_layers=1, num_experts=4, top_k=2, layers=[0])


@pytest.mark.reliability("bad inputs")
def test_a_router_named_twice_is_refused() -> None:
    """Once a map naming a router twice was taken: to_vllm wrote its routes in the first column only (the second
    layer's column left zero) and to_megatron sent its rows for both layers."""
    with pytest.raises(mr.LayerMapError, match=r"router names repeat: \['a'\]"):
        mr.LayerMap.from_names(["a", "a"], 2, 4, 2, layers=[0, 1])


def test_names_and_counts_given_as_iterators_or_arrays_are_read() -> None:
    """Once names given as a generator were read twice, the second time empty, and refused as "needs at least one
    router"; and per-router expert counts as an array or tensor were refused while top_k as one was read."""
    names = [f"model.layers.{i}.mlp.gate" for i in (1, 2)]
    want = mr.LayerMap.from_names(names, 3, [8, 16], [2, 2])
    assert mr.LayerMap.from_names((n for n in names), 3, [8, 16], [2, 2]) == want
    assert mr.LayerMap.from_names(names, 3, np.array([8, 16]), np.array([2, 2])) == want
    assert mr.LayerMap.from_names(names, 3, torch.tensor([8, 16]), torch.tensor([2, 2])) == want
    with pytest.raises(mr.InvalidArgumentError, match="num_experts must be an int or one int per router"):
        mr.LayerMap.from_names(names, 3, np.array([8.5, 16.0]), 2)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "build",
    [
        lambda: mr.LayerMap(("model.layers.1.mlp.gate", "model.layers.2.mlp.gate"), (2, 1), 3, (8, 8), (2, 2)),
        lambda: mr.LayerMap.from_names(["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"], 3, 8, 2, layers=[2, 1]),
        lambda: mr.LayerMap.from_names(
            [f"model.layers.{i}.mlp.gate" for i in (3, 1, 2)], 4, 8, 2, layers=[1, 2, 3]
        ),  # (names out of order, layers in order: router 3 at layer 1)
        lambda: mr.LayerMap.from_names(["h.0.moe.gate", "h.10.moe.gate", "h.2.moe.gate"], 11, 8, 2, layers=[0, 2, 10]),
    ],
    ids=["hand-built swap", "from_names swap", "names out of order", "10 before 2"],
)
def test_a_map_whose_names_and_layers_contradict_each_other_is_refused(build) -> None:
    """Once taken: a map giving ``layers.1``'s router hidden layer 2 and ``layers.2``'s layer 1 read each engine
    column into the other router, every token replayed with another layer's experts. Maps that keep the order of
    the names' numbers (an offset, another stack's numbers, names of no number) are taken as before."""
    with pytest.raises(mr.LayerMapError, match="contradict each other"):
        build()
    kept = [
        mr.LayerMap(("model.layers.1.mlp.gate", "model.layers.2.mlp.gate"), (1, 2), 3, (8, 8), (2, 2)),
        mr.LayerMap.from_names(["decoder.layers.0.gate", "decoder.layers.1.gate"], 13, 8, 2, layers=[11, 12]),
        mr.LayerMap.from_names(["encoder.layers.1.gate", "decoder.layers.0.gate"], 3, 8, 2, layers=[1, 2]),
        mr.LayerMap.from_names(["b", "a"], 2, 8, 2, layers=[1, 0]),
        mr.LayerMap.from_names([f"model.layers.{i}.mlp.gate" for i in (2, 0, 1)], 3, 8, 2),
    ]
    assert [m.layers for m in kept] == [(1, 2), (11, 12), (1, 2), (1, 0), (2, 0, 1)]
    tried()
