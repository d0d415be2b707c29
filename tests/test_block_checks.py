"""A block's own checks, read faster, still catch what they are there for.

The checks a capture or replay block runs at its start and end read the classes on the way to the routers through a
snapshot of their dicts, a module's attributes less those every module has, and each layer class's assigned flags
once per class: each test changes one thing those shortcuts could miss and expects it caught as before.
"""

from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moe_replay as mr
from moe_replay.errors import MoEReplayError
from moe_replay.intercept import _held_indices, _own_keys
from moe_replay.session import _Skeleton
from tests.tinymoe import RouterSpec, TinyBlock, TinyMoE


def _holder() -> tuple[nn.Module, type]:
    """A model whose layer is of a class of its own (patched here, nowhere else)."""

    class Layer(nn.Module):
        scale = 2

        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x)

        def route(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Layer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    return Holder(), Layer


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("change", ["method replaced", "method added", "method removed", "class swapped"])
def test_code_changed_on_a_class_on_the_way_is_seen_by_the_skeleton(change: str) -> None:
    model, layer_cls = _holder()
    skeleton = _Skeleton(model, ["layer.gate"])
    assert skeleton.holds(model, ["layer.gate"])
    assert skeleton.holds(model, ["layer.gate"])  # (read again from the class's snapshot: still the same)
    if change == "method replaced":
        layer_cls.route = lambda self, x: x.topk(2).indices  # type: ignore[attr-defined]
    elif change == "method added":
        layer_cls.other = lambda self, x: x  # type: ignore[attr-defined]
    elif change == "method removed":
        del layer_cls.route  # type: ignore[attr-defined]
    else:
        model.layer.__class__ = type("Other", (layer_cls,), {})
    assert not skeleton.holds(model, ["layer.gate"])


@pytest.mark.reliability("silent replays")
def test_a_constant_changed_on_a_class_on_the_way_is_no_code_change() -> None:
    """The snapshot of a class's dict differs, but what it holds of code does not: no second watch is needed."""
    model, layer_cls = _holder()
    skeleton = _Skeleton(model, ["layer.gate"])
    layer_cls.scale = 3  # type: ignore[attr-defined]
    assert skeleton.holds(model, ["layer.gate"])
    layer_cls.route = lambda self, x: x  # type: ignore[attr-defined]
    assert not skeleton.holds(model, ["layer.gate"])


@pytest.mark.reliability("lifecycle")
def test_the_skeleton_of_a_watched_model_keeps_none_of_its_classes_alive() -> None:
    """Held per model as long as the model lives, a skeleton holding a class whose method closes over the model
    would keep the model alive for good: it holds the classes and their code weakly."""
    model, layer_cls = _holder()
    skeleton = _Skeleton(model, ["layer.gate"])
    gone = weakref.ref(layer_cls)
    del model, layer_cls
    gc.collect()
    assert gone() is None
    assert skeleton.not_run == set()


@pytest.mark.reliability("silent replays")
def test_a_block_method_patched_on_its_class_between_blocks_is_watched_again() -> None:
    """A top-k of its own added to an MoE block's class between two blocks is a decision outside the routers, found
    at the next block's first forward, as when the class was read entry by entry."""

    class Block(TinyBlock):
        pass

    model = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)])
    for layer in model.layers:
        layer.__class__ = Block
    x = model.inputs((2, 3))
    with torch.no_grad(), mr.attach(model) as s:
        for _ in range(2):
            with s.capture():
                model(x)

        def forward(self: TinyBlock, x: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
            TinyBlock.forward(self, x, forced)
            idx = torch.topk(x @ self.router.weight.t(), 2, dim=-1).indices  # (dispatched by its own choice)
            return x + self.expert_emb[idx].sum(dim=-2)

        Block.forward = forward  # type: ignore[method-assign]
        with pytest.raises(MoEReplayError):
            with s.capture():
                model(x)


def test_own_keys_leaves_out_only_what_every_module_holds_as_torch_keeps_it() -> None:
    m = nn.Linear(2, 2)
    m.order = [1, 0]
    m._private = 3
    assert _own_keys(vars(m)) == sorted(k for k in vars(m) if k not in vars(nn.Module()) and k != "training")
    own = dict(vars(m))
    own["_non_persistent_buffers_set"] = [1, 0]  # (not the set torch keeps there: those keys are read too, after)
    assert _own_keys(own) == _own_keys(vars(m)) + sorted(k for k in own if k not in _own_keys(vars(m)))


@pytest.mark.reliability("silent replays")
class _ReadsHeld(nn.Linear):
    """A Linear whose forward reads the integer tensors and the list it holds (an order, sizes, a permutation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (never run: its code is read)
        return F.linear(x[..., self.order], self.weight) * len(self.sizes) + self.perm.sum()


def test_held_indices_still_reads_a_module_s_own_integer_tensors_and_lists() -> None:
    m = _ReadsHeld(2, 2)
    m.order = torch.tensor([1, 0])
    m.sizes = [2, 1]
    m.register_buffer("perm", torch.tensor([0, 1]))
    m.__dict__["_is_full_backward_hook"] = torch.tensor([3])  # (a tensor where torch keeps a flag: read too)
    names = {h[2] for h in _held_indices(m)}
    assert {"order", "sizes", "perm", "_is_full_backward_hook"} <= names
    before = _held_indices(m)
    m.order.add_(1)  # (written in place: its version moves)
    assert [h[4] for h in _held_indices(m)] != [h[4] for h in before]


@pytest.mark.reliability("silent replays")
def test_flags_assigned_around_routers_are_read_per_layer_not_per_class() -> None:
    """Two layers of one class, one with a forward of its own that sets a flag on its router: the flag is read as
    set around that layer's router alone (the class's answer is not reused for a module with its own forward)."""
    model = TinyMoE([RouterSpec(8, 2), RouterSpec(8, 2)])
    x = model.inputs((2, 3))
    layer = model.layers[1]

    def forward(self: TinyBlock, x: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        router = self.router
        router.use_flag = True
        return TinyBlock.forward(self, x, forced)

    layer.forward = types.MethodType(forward, layer)
    with torch.no_grad(), mr.attach(model) as s:
        with s.capture():
            model(x)
        around = s._around()
    assert "use_flag" in around[1] and "use_flag" not in around[0]
