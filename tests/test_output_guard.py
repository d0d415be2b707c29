"""Forward hooks run after a router's intercepted forward: those that change its indices are refused."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import moe_replay as mr

from .conftest import assert_untouched, snapshot
from .tinymoe import RouterSpec, TinyMoE

E, K = 8, 2


def _model() -> TinyMoE:
    return TinyMoE([RouterSpec(E, K), RouterSpec(E, K, score="sigmoid_topk")], hidden=8, seed=0)


def _remap(module: nn.Module, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """Every token to the next expert (a user's ablation of routing, written as a hook)."""
    if isinstance(module, type(_model().layers[0].router)):
        return out[0], (out[1] + 1) % E
    return None


def _remap_in_place(module: nn.Module, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    if isinstance(module, type(_model().layers[0].router)):
        out[1].add_(1).remainder_(E)


def _sharpen(module: nn.Module, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """A temperature on the combine weights: the experts stay the router's."""
    if isinstance(module, type(_model().layers[0].router)):
        return out[0] ** 2, out[1]
    return None


@contextmanager
def _hooked(model: TinyMoE, where: str, fn: Callable[..., Any]) -> Iterator[None]:
    """``fn`` as a forward hook of every router (``module``) or as a global module forward hook (``global``)."""
    handles = (
        [register_module_forward_hook(fn)]
        if where == "global"
        else [layer.router.register_forward_hook(fn) for layer in model.layers]
    )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _chosen(model: TinyMoE) -> list[torch.Tensor]:
    """The experts each layer dispatched in the last forward."""
    return [layer.chosen.clone() for layer in model.layers]


@pytest.mark.reliability
@pytest.mark.parametrize("where", ["module", "global"])
@pytest.mark.parametrize("change", [_remap, _remap_in_place], ids=["replaced", "in place"])
@pytest.mark.parametrize("when", ["between blocks", "inside the block"])
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_hook_that_changes_the_indices_a_router_returned_is_refused(
    where: str, change: Callable[..., Any], when: str, block: str
) -> None:
    """Once silent: a forward hook of a router (or a global module hook) that remapped the indices it returned,
    after its intercepted forward, made the layer dispatch other experts than those recorded or forced."""
    model = _model()
    before = snapshot(model)
    x = model.inputs((2, 5))
    with mr.attach(model) as session, torch.no_grad():
        model(x)  # (the decisions established, the watch passed: the hook comes after)
        with session.capture():
            model(x)
        routes = session.routes()
        run = session.capture() if block == "capture" else session.replay(routes)
        with pytest.raises(mr.UnsupportedRouterError, match=r"replaced or changed the integer tensors"):
            if when == "between blocks":
                with _hooked(model, where, change), run:
                    model(x)
            else:
                with run, _hooked(model, where, change):
                    model(x)
    assert_untouched(model, before)


@pytest.mark.parametrize("where", ["module", "global"])
def test_hooks_that_keep_the_indices_pass_and_the_replay_is_exact(where: str) -> None:
    """A hook that reads the output, or replaces only its float tensors, leaves the experts as forced; the guard
    goes with the block, and the user's hooks stay."""
    model = _model()
    x = model.inputs((2, 5))
    seen: list[torch.Tensor] = []
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured = _chosen(model)
        routes = session.routes()
        model.perturb(scale=3.0)
        with _hooked(model, where, _sharpen), _hooked(model, where, lambda m, a, o: seen.append(o[1])):
            with session.replay(routes):
                model(x).sum().backward()
            assert [torch.equal(a, b) for a, b in zip(_chosen(model), captured, strict=True)] == [True, True]
            assert seen, "the reading hook ran"
            hooks = [h for layer in model.layers for h in layer.router._forward_hooks.values()]
            assert len(hooks) == (4 if where == "module" else 0), "only the user's hooks stay after the block"
    assert model.layers[0].router.weight.grad is not None


def test_a_model_guarded_inside_a_block_copies_and_pickles() -> None:
    """Inside a block whose routers carry the guard, a deep copy and a pickle of the model run as the plain model."""
    model = _model()
    x = model.inputs((3,))
    with mr.attach(model) as session, torch.no_grad(), _hooked(model, "module", _sharpen):
        model(x)
        with session.capture():
            model(x)
            assert any(type(h).__name__ == "OutputGuard" for h in model.layers[0].router._forward_hooks.values())
            twin = copy.deepcopy(model)
            torch.save(model, io.BytesIO())
            pickled = pickle.loads(pickle.dumps(model))
        expected = model(x)
        for other in (twin, pickled):
            assert torch.equal(other(x), expected)


@contextmanager
def _wrapped(model: TinyMoE, change: bool) -> Iterator[None]:
    """Each router's forward wrapped after attach, around the session's (a user's patch, accelerate's hook)."""
    inners = [layer.router.forward for layer in model.layers]
    for layer, inner in zip(model.layers, inners, strict=True):

        def forward(*args: Any, inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            w, idx = inner(*args, **kwargs)
            return (w, (idx + 1) % E) if change else (w, idx)

        layer.router.forward = forward
    try:
        yield
    finally:
        for layer, inner in zip(model.layers, inners, strict=True):
            layer.router.forward = inner


@pytest.mark.reliability
@pytest.mark.parametrize("block", ["capture", "replay"])
def test_a_wrapper_around_the_router_forward_that_remaps_its_indices_is_refused(block: str) -> None:
    """Once silent: a forward wrapped after attach around the session's wrapper (so still reaching it) remapped
    the indices the router returned, and the layer dispatched other experts than those recorded or forced."""
    model = _model()
    x = model.inputs((2, 5))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
        routes = session.routes()
        with _wrapped(model, change=True):
            run = session.capture() if block == "capture" else session.replay(routes)
            with pytest.raises(mr.UnsupportedRouterError, match=r"or a wrapper around its forward, replaced"), run:
                model(x)


def test_a_wrapper_that_passes_the_indices_through_replays_exactly() -> None:
    """A wrapper that returns what the session's forward returned is guarded, passes, and leaves no hook."""
    model = _model()
    x = model.inputs((2, 5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        captured, routes = _chosen(model), session.routes()
        model.perturb(scale=3.0)
        with _wrapped(model, change=False):
            with session.replay(routes):
                assert [len(layer.router._forward_hooks) for layer in model.layers] == [1, 1]  # (the guards)
                model(x).sum().backward()
            assert [torch.equal(a, b) for a, b in zip(_chosen(model), captured, strict=True)] == [True, True]
            assert [len(layer.router._forward_hooks) for layer in model.layers] == [0, 0]
