"""A session in real training code: other wrappers, detach, pickling, inference mode, device moves, renamed routers."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.intercept import ScopedForward
from moe_replay.session import _prefix_maps

from .conftest import assert_untouched, perturb_routers, snapshot, tried
from .tinymoe import RouterSpec, TinyMoE

SPECS = [RouterSpec(8, 2), RouterSpec(6, 1, "argmax"), RouterSpec(16, 3, "grouped", n_group=4, topk_group=2)]


def model_and_input(seed: int = 0) -> tuple[TinyMoE, torch.Tensor]:
    model = TinyMoE(SPECS, seed=seed)
    return model, model.inputs((2, 5), seed=seed)


def plain_routes(model: nn.Module, x: torch.Tensor) -> mr.Routes:
    with mr.attach(model) as s, torch.no_grad(), s.capture():
        model(x)
    return s.routes()


def ours_reachable(model: nn.Module) -> list[str]:
    """Module attributes (and what they wrap) that still lead to a moe_replay wrapper or hook."""
    found = []
    for name, m in model.named_modules():
        for key, value in m.__dict__.items():
            seen: set[int] = set()
            todo = [value]
            while todo:
                v = todo.pop()
                if id(v) in seen or isinstance(v, nn.Module | torch.Tensor):
                    continue
                seen.add(id(v))
                if isinstance(v, ScopedForward) or getattr(v, "__moe_replay_hook__", None) is not None:
                    found.append(f"{name}.{key}")
                    break
                if isinstance(v, functools.partial):
                    todo += [v.func, *v.args]
                for cell in getattr(v, "__closure__", None) or ():
                    todo.append(cell.cell_contents)
                d = getattr(v, "__dict__", None)
                if isinstance(d, dict) and callable(v):
                    todo += list(d.values())
    return found


# ----------------------------------------------------------------------------- other wrappers (point 2)
class CountingHook:
    """A stand-in for accelerate's ModelHook: counts the forwards it sees."""

    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls += 1
        return args, kwargs


def add_hook_to_module(module: nn.Module, hook: CountingHook) -> None:
    """What accelerate.hooks.add_hook_to_module does to a module's forward."""
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        old_forward = module._old_forward
    else:
        old_forward = module.forward
        module._old_forward = old_forward
    module._hf_hook = hook

    def new_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
        return module._old_forward(*args, **kwargs)

    module.forward = functools.update_wrapper(functools.partial(new_forward, module), old_forward)


def remove_hook_from_module(module: nn.Module) -> None:
    """What accelerate.hooks.remove_hook_from_module does."""
    if hasattr(module, "_hf_hook"):
        delattr(module, "_hf_hook")
    if hasattr(module, "_old_forward"):
        module.forward = module._old_forward
        delattr(module, "_old_forward")


def _closure_wrapper(m: nn.Module, log: list[str]) -> None:
    inner = m.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        log.append("closure")
        return inner(*args, **kwargs)

    m.forward = forward


class _ObjectWrapper:
    def __init__(self, fn: Callable[..., Any], log: list[str]) -> None:
        self.fn, self.log = fn, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append("object")
        return self.fn(*args, **kwargs)


WRAPPERS: dict[str, Callable[[nn.Module, list[str]], None]] = {
    "accelerate hook": lambda m, log: add_hook_to_module(m, CountingHook()),
    "closure": _closure_wrapper,
    "callable object": lambda m, log: setattr(m, "forward", _ObjectWrapper(m.forward, log)),
    "functools.partial": lambda m, log: setattr(
        m, "forward", functools.partial(lambda fn, *a, **k: (log.append("partial"), fn(*a, **k))[1], m.forward)
    ),
}


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_detach_keeps_a_wrapper_added_after_attach(kind: str) -> None:
    """A wrapper added after attach (accelerate-style, closure, object, partial) survives detach; only ours goes."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    with torch.no_grad():
        ref = model(x)
    session = mr.attach(model)
    log: list[str] = []
    routers = [model.layers[i].router for i in range(len(SPECS))]
    for r in routers:
        WRAPPERS[kind](r, log)
    with torch.no_grad(), session.capture():
        model(x)
    assert session.routes().equal(want)  # the chain still records
    session.detach()
    assert not ours_reachable(model), ours_reachable(model)
    calls = len(log) + sum(getattr(getattr(r, "_hf_hook", None), "calls", 0) for r in routers)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = len(log) + sum(getattr(getattr(r, "_hf_hook", None), "calls", 0) for r in routers)
    assert after == calls + len(routers)  # every added wrapper still runs
    assert plain_routes(model, x).equal(want)  # and a new session attaches and records through it
    if kind == "accelerate hook":
        for r in routers:
            remove_hook_from_module(r)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
    tried(len(routers))


def _logged_forward(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return inner(*args, **kwargs)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_through_a_wrapper_that_copied_ours_attributes_is_plain(how: str) -> None:
    """A wrapper added after attach with functools.update_wrapper (accelerate's add_hook_to_module) holds a copy
    of the session's hook among its attributes: a copy of the model used to fail on the hook's lock
    (TypeError: cannot pickle '_thread.lock' object); it now comes out plain."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    session = mr.attach(model)
    routers = [model.layers[i].router for i in range(len(SPECS))]
    if how == "deepcopy":
        for r in routers:
            add_hook_to_module(r, CountingHook())
        copied = copy.deepcopy(model)
    else:  # a picklable wrapper of the same form
        for r in routers:
            r.forward = functools.update_wrapper(functools.partial(_logged_forward, r.forward), r.forward)
        copied = pickle.loads(pickle.dumps(model))
    assert not ours_reachable(copied)
    with torch.no_grad(), session.capture():
        copied(x)  # not recorded by the original's session
        model(x)
    assert session.routes().equal(want)
    assert plain_routes(copied, x).equal(want)
    session.detach()
    tried(1)


@pytest.mark.reliability("wrappers")
def test_detach_does_not_put_back_a_wrapper_removed_while_attached() -> None:
    """An accelerate-style hook added before attach and removed while attached stays removed after detach."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    router = model.layers[0].router
    add_hook_to_module(router, CountingHook())
    session = mr.attach(model)
    remove_hook_from_module(router)  # this also drops the session's wrapper of that router
    session.detach()
    assert not hasattr(router, "_hf_hook")
    with torch.no_grad():
        model(x)  # no AttributeError: '_hf_hook'
    assert plain_routes(model, x).equal(want)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("strict", [True, False])
def test_a_block_refuses_a_router_whose_wrapper_was_removed(strict: bool) -> None:
    """accelerate re-hooking or unhooking a router hooked before attach drops the session's wrapper: refused.

    A replay(strict=False) used to route that router natively with no error, and a capture
    blamed a router that "never ran"."""
    model, x = model_and_input()
    router = model.layers[0].router
    add_hook_to_module(router, CountingHook())
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    add_hook_to_module(router, CountingHook())  # hooked again: accelerate wraps the forward from before attach
    with pytest.raises(mr.SessionStateError, match=r"forward of 'layers\.0\.router' no longer calls.*attach again"):
        with torch.no_grad(), session.replay(want, strict=strict):
            model(x)
    remove_hook_from_module(router)
    with pytest.raises(mr.SessionStateError, match="remove_hook_from_module"), session.capture():
        pass
    del router.forward  # the same with no instance forward at all
    with pytest.raises(mr.SessionStateError, match="no longer calls"), session.capture():
        pass
    session.detach()
    assert not ours_reachable(model)
    assert plain_routes(model, x).equal(want)  # attach again: recorded and replayed as before
    tried(3)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("strict", [True, False])
def test_a_block_refuses_a_router_module_replaced_after_attach(strict: bool) -> None:
    """A router module replaced in the model after attach is not intercepted: refused, not routed natively."""
    model, x = model_and_input()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    old = model.layers[1].router
    new = copy.deepcopy(old)
    new.__dict__.pop("forward", None)
    model.layers[1].router = new
    with pytest.raises(mr.SessionStateError, match=r"'layers\.1\.router' is no longer the .*attach again"):
        with torch.no_grad(), session.replay(want, strict=strict):
            model(x)
    model.layers[1].router = nn.Sequential(old)  # held elsewhere in the model (as a PEFT wrapper holds it): fine
    with torch.no_grad(), session.capture():
        model.layers[1].router = old
        model(x)
    assert session.routes().equal(want)
    session.detach()
    tried(2)


class _Wrapped(nn.Module):
    """A module wrapped where it sits (as torch's checkpoint_wrapper or FSDP1 wrap a layer): its path gets a segment."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.wrapped = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)


def _swap_layers(model: nn.Module) -> None:
    model.layers[1], model.layers[2] = model.layers[2], model.layers[1]


def _drop_dense_layer(model: nn.Module) -> None:
    del model.layers[0]


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("move", [_swap_layers, _drop_dense_layer], ids=["swap", "drop"])
@pytest.mark.parametrize("block", ["capture", "replay", "verify"])
def test_a_block_refuses_routers_moved_to_other_paths_after_attach(
    move: Callable[[nn.Module], None], block: str
) -> None:
    """Routers moved to other paths after attach are refused at the next block, not recorded under their old paths."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    move(model)
    opened = {
        "capture": session.capture,
        "replay": lambda: session.replay(want),
        "verify": lambda: contextlib.nullcontext(session.verify(x)),
    }
    with pytest.raises(mr.SessionStateError, match=r"intercepts as 'layers\.\d\.mlp\.router' now sits at 'layers\."):
        with torch.no_grad(), opened[block]():
            model(x)
    session.detach()
    assert not ours_reachable(model)
    tried()


def _swap_routers(model: nn.Module) -> Callable[[], None]:
    def swap() -> None:
        layers = model.layers
        layers[0].router, layers[1].router = layers[1].router, layers[0].router

    swap()
    return swap


def _replace_router(model: nn.Module) -> Callable[[], None]:
    old = model.layers[0].router
    model.layers[0].router = TinyMoE([RouterSpec(8, 2)], seed=9).layers[0].router
    return lambda: setattr(model.layers[0], "router", old)


def _append_layer(model: nn.Module) -> Callable[[], None]:
    model.layers.append(TinyMoE([RouterSpec(8, 2)], seed=9).layers[0])
    return lambda: model.layers.__delitem__(-1)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("change", [_swap_routers, _replace_router, _append_layer], ids=["swap", "replace", "append"])
@pytest.mark.parametrize("block", ["capture", "replay", "replay-lax"])
def test_a_model_changed_inside_a_block_is_refused_as_it_ends(
    change: Callable[[nn.Module], Callable[[], None]], block: str
) -> None:
    """Once silent: routers swapped, replaced or added inside a block recorded rows under other names or natively."""
    specs = [RouterSpec(8, 2)] * 3  # alike routers: a swap changes no shape, so only the session can see it
    model = TinyMoE(specs)
    x = model.inputs((2, 5))
    before = snapshot(model)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    opened = {
        "capture": session.capture,
        "replay": lambda: session.replay(mr.Routes.cat([want, want])),
        "replay-lax": lambda: session.replay(mr.Routes.cat([want, want]), strict=False),
    }
    with pytest.raises(mr.SessionStateError, match=r"the model changed inside this (capture|replay)\(\) block"):
        with torch.no_grad(), opened[block]():
            model(x)
            undo = change(model)
            model(x)
    if block == "capture":  # marked interrupted: its rows are not read as a whole capture
        with pytest.raises(mr.SessionStateError, match="interrupted"):
            session.routes()
    assert session.state == "idle"
    undo()  # the model as it was: the session goes on exactly
    with torch.no_grad(), session.replay(want), session.capture():
        model(x)
    assert session.routes().equal(want)
    session.detach()
    assert_untouched(model, before)
    tried()


@pytest.mark.reliability("wrappers")
def test_routers_wrapped_where_they_sit_after_attach_keep_their_names() -> None:
    """Layers wrapped in place after attach (a checkpoint wrapper) keep recording and replaying under their names."""
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    want = plain_routes(model, x)
    session = mr.attach(model)
    for i, layer in enumerate(model.layers):
        model.layers[i] = _Wrapped(layer)
    with torch.no_grad(), session.replay(want), session.capture():
        model(x)
    assert session.routes().equal(want)
    assert session.verify(x) == {n: 1 for n in session.names}
    session.detach()
    assert not ours_reachable(model)
    tried()


class _ModulesToSave(nn.Module):
    """What PEFT's modules_to_save puts at a router's path: the original, and a copy that runs."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original)})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save["default"](*args, **kwargs)


@pytest.mark.reliability("wrappers")
def test_a_block_refuses_a_copy_of_a_router_made_after_attach_at_its_path() -> None:
    """PEFT's modules_to_save after attach runs a copy of the router, not intercepted: refused, not native."""
    model, x = model_and_input()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    model.layers[0].router = _ModulesToSave(model.layers[0].router)
    with pytest.raises(mr.SessionStateError, match=r"'layers\.0\.router' now holds a copy.*modules_to_save"):
        with torch.no_grad(), session.replay(want, strict=False):
            model(x)
    with pytest.raises(mr.SessionStateError, match="now holds a copy"), session.capture():
        pass
    session.detach()
    assert not ours_reachable(model)
    tried(2)


@pytest.mark.reliability("wrappers")
def test_detach_refuses_when_its_wrapper_is_held_where_it_cannot_edit() -> None:
    """A wrapper held by a list it cannot edit: detach refuses, changes nothing, and works once that is undone."""
    model, x = model_and_input()
    before = snapshot(model)
    want = plain_routes(model, x)
    router = model.layers[1].router
    session = mr.attach(model)
    registry = [router.forward]
    router.forward = lambda *a, **k: registry[0](*a, **k)
    with pytest.raises(mr.SessionStateError, match=r"cannot detach.*layers\.1\.router.*held by a list.*remove_hook"):
        session.detach()
    assert session.attached
    with torch.no_grad(), session.capture():
        model(x)
    assert session.routes().equal(want)  # still attached and working
    router.forward = registry.pop()
    session.detach()
    assert_untouched(model, before)


# ----------------------------------------------------------------------------- after the block (point 3)
@pytest.mark.reliability("lifecycle")
def test_routes_are_readable_after_detach() -> None:
    """What a session recorded stays readable after detach (kept on the host), with every check routes() makes."""
    model, x = model_and_input()
    with mr.attach(model) as s, s.capture(), torch.no_grad():
        model(x)
    want = s.routes()
    assert want.num_tokens == 10 and not s.attached
    assert s.routes().equal(want)
    with mr.attach(model) as s2, torch.no_grad():
        with s2.capture():
            model(x)
        assert s2.routes().equal(want)
    # an interrupted capture stays refused after detach, unless asked
    s3 = mr.attach(model)
    with pytest.raises(RuntimeError, match="boom"), s3.capture(), torch.no_grad():
        model(x)
        raise RuntimeError("boom")
    s3.detach()
    with pytest.raises(mr.SessionStateError, match="interrupted"):
        s3.routes()
    assert s3.routes(allow_partial=True).equal(want)
    s4 = mr.attach(model)
    s4.detach()
    with pytest.raises(mr.SessionStateError, match="detached before it captured"):
        s4.routes()
    with pytest.raises(mr.SessionStateError, match="detached"):
        s4.capture().__enter__()


# ----------------------------------------------------------------------------- pickling (point 5)
def _save_load(model: nn.Module, how: str) -> nn.Module:
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("state", ["idle", "capturing"])
def test_pickled_attached_model_comes_out_plain(how: str, state: str) -> None:
    """pickle/torch.save of an attached model (idle or mid-capture) gives a plain model, as deepcopy does."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    with torch.no_grad():
        ref = model(x)
    with mr.attach(model) as session:
        if state == "capturing":
            with session.capture(), torch.no_grad():
                copy_ = _save_load(model, how)
                model(x)
            assert session.routes().equal(want)
        else:
            copy_ = _save_load(model, how)
        assert not ours_reachable(copy_)
        with torch.no_grad():
            assert torch.equal(copy_(x), ref)
        assert plain_routes(copy_, x).equal(want)  # a session of its own, beside the original's
    deep = copy.deepcopy(copy_)
    assert not ours_reachable(deep)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "a model holding it"])
def test_a_session_cannot_be_copied_and_goes_on_as_it_was(how: str) -> None:
    """Copying or pickling a session is refused with the way out, and the session goes on as it was."""
    model, x = model_and_input()
    before = snapshot(model)
    want = plain_routes(model, x)
    session = mr.attach(model)
    holder = nn.Module()
    holder.session = session  # (a trainer or a user's module that keeps the session as an attribute)
    copies = {
        "copy": lambda: copy.copy(session),
        "deepcopy": lambda: copy.deepcopy(session),
        "pickle": lambda: pickle.dumps(session),
        "a model holding it": lambda: copy.deepcopy(holder),
    }
    with pytest.raises(mr.SessionStateError, match=r"cannot be copied or pickled.*session\.routes\(\)"):
        copies[how]()
    with torch.no_grad(), session.replay(want), session.capture():
        model(x)
    assert session.routes().equal(want)
    session.detach()
    assert_untouched(model, before)
    tried()


class _ScriptableRouter(nn.Module):
    """A router TorchScript compiles (a plain softmax top-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.top_k, self.num_experts = 2, 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = torch.topk(torch.softmax(x @ self.weight.t(), dim=-1), 2, dim=-1)
        return values, indices


class _ScriptableMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.routers = nn.ModuleList([_ScriptableRouter(), _ScriptableRouter()])
        self.experts = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for router in self.routers:
            w, i = router(x)
            x = x + (w.unsqueeze(-1) * self.experts[i]).sum(dim=-2)
        return x


@pytest.mark.reliability("wrappers")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_of_an_attached_model_or_its_copy_is_a_clear_error() -> None:
    """Once an AttributeError from inside TorchScript ('ScopedForward' has no '__globals__'), naming no way out."""
    torch.manual_seed(0)
    model, x = _ScriptableMoE(), torch.randn(6, 8)
    want = model(x)
    before = snapshot(model)
    session = mr.attach(model, include=_ScriptableRouter)
    session.verify(x)
    for scripted in (model, model.routers[0]):  # the feed level's wrapper, and a router's
        with pytest.raises(mr.UnsupportedRouterError, match=r"torch\.jit\.script of a model attached.*Detach first"):
            torch.jit.script(scripted)
    copied = copy.deepcopy(model)
    with pytest.raises(mr.UnsupportedRouterError, match=r"it is a copy .*mr\.attach\(copy\)\.detach\(\)"):
        torch.jit.script(copied)
    assert not hasattr(model.forward, "__globals__")  # (still an AttributeError where one is looked for)
    with torch.no_grad(), session.capture():  # the session goes on as it was
        model(x)
    assert session.routes().num_tokens == 6
    session.detach()
    assert_untouched(model, before)
    mr.attach(copied, include=_ScriptableRouter).detach()  # the way out the error names
    assert torch.allclose(torch.jit.script(copied)(x), want)
    assert torch.allclose(torch.jit.script(model)(x), want)
    tried(3)


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_an_attached_model_follows_a_later_patch_of_its_router_class(how: str) -> None:
    """A copy made while attached calls its routers' class forward at each call, as a plain model does (a kernel
    library patching the class after the copy reaches it), and an attach and detach on the copy leave its
    routers with no ``forward`` of their own."""
    model, x = model_and_input()
    with mr.attach(model) as session:
        copy_ = copy.deepcopy(model) if how == "deepcopy" else _save_load(model, how)
        routers = [copy_.get_submodule(n) for n in session.names]
    cls = type(routers[0])
    original, seen = cls.forward, []

    def patched(self: nn.Module, *args: object, **kwargs: object) -> object:
        seen.append(self)
        return original(self, *args, **kwargs)

    cls.forward = patched  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            copy_(x)
    finally:
        cls.forward = original  # type: ignore[method-assign]
    assert [id(m) for m in seen] == [id(m) for m in routers]
    with mr.attach(copy_):
        pass
    assert not [n for n, m in copy_.named_modules() if "forward" in m.__dict__]


# ----------------------------------------------------------------------------- inference mode (point 6)
@pytest.mark.reliability("lifecycle")
def test_attach_and_replay_under_inference_mode() -> None:
    """attach() or replay() under torch.inference_mode(): buffers stay ordinary; capture and replay work outside it."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    with torch.inference_mode():
        session = mr.attach(model)
    assert not any(h.capture_ring.buf.is_inference() or h.capture_ring.written.is_inference() for h in session._hooks)
    with torch.no_grad(), session.capture():
        model(x)
    assert session.routes().equal(want)
    with torch.inference_mode(), session.capture():
        model(x)
    assert session.routes().equal(want)
    with torch.inference_mode():
        block = session.replay(want)
        block.__enter__()
    with session.capture():
        model(x).sum().backward()
    block.__exit__(None, None, None)
    assert session.routes().equal(want)
    session.detach()


# ----------------------------------------------------------------------------- device moves (point 7)
@pytest.mark.reliability("lifecycle")
def test_model_moved_between_blocks_is_followed() -> None:
    """A model moved after attach (to meta and back here): the next block re-homes the buffers; rows stay exact."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    model.to("meta")
    with torch.no_grad(), session.capture():
        out = model(x.to("meta"))
    assert out.device.type == "meta"
    assert {h.capture_ring.device.type for h in session._hooks} == {"meta"}
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    with torch.no_grad(), session.capture():
        model(x)
    assert {h.capture_ring.device.type for h in session._hooks} == {"cpu"}
    assert session.routes().equal(want)
    model.to(torch.float64)  # a dtype change needs nothing
    with torch.no_grad(), session.capture():
        model(x.double())
    assert session.routes().num_tokens == 10
    session.detach()


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("when", ["before attach", "after attach"])
def test_accelerate_cpu_offload_records_and_replays_on_the_execution_device(when: str) -> None:
    """accelerate's CPU offload keeps the weights on meta between forwards: the rows live where the routers run.

    They were put on meta, where a capture wrote nothing and routes() (or a replay) raised torch's
    NotImplementedError ("Cannot copy out of meta tensor").
    """
    accelerate = pytest.importorskip("accelerate")
    model, x = model_and_input()
    want = plain_routes(model, x)  # before the routers change
    model.perturb()
    with torch.no_grad():
        ref_free = model(x)
    ref_forced = copy.deepcopy(model)
    with mr.attach(ref_forced) as s, torch.no_grad(), s.replay(want):
        ref_forced_out = ref_forced(x)
    free = plain_routes(model, x)
    assert not free.equal(want)

    def offload() -> None:
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))

    if when == "before attach":
        offload()
    session = mr.attach(model)
    if when == "after attach":
        offload()
    assert model.layers[0].router.weight.device.type == "meta"
    with torch.no_grad(), session.capture():
        assert torch.equal(model(x), ref_free)
    assert {h.capture_ring.device.type for h in session._hooks} == {"cpu"}
    assert session.routes().equal(free)
    with torch.no_grad(), session.replay(want), session.capture():
        assert torch.equal(model(x), ref_forced_out)
    assert session.routes().equal(want)
    session.detach()
    assert not ours_reachable(model)


@pytest.mark.reliability("lifecycle")
def test_meta_forwards_that_cannot_be_read_or_established_are_clear_errors() -> None:
    """On meta: a first forward (nothing to establish with), routes() and a strict replay's check (no values)
    are MoEReplayErrors, not torch's Tensor.item()/"Cannot copy out of meta tensor" errors."""
    model, x = model_and_input()
    want = plain_routes(model, x)
    fresh = copy.deepcopy(model).to("meta")
    with mr.attach(fresh) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="meta device.*real device"):
            with torch.no_grad():
                fresh(x.to("meta"))
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)  # established on the CPU
    model.to("meta")
    with torch.no_grad(), session.capture():
        model(x.to("meta"))
    with pytest.raises(mr.SessionStateError, match="meta device"):
        session.routes()
    with pytest.raises(mr.SessionStateError, match="meta device"), torch.no_grad(), session.replay(want):
        model(x.to("meta"))
    with torch.no_grad(), session.replay(want, strict=False):
        assert model(x.to("meta")).device.type == "meta"
    session.detach()
    tried(4)


@pytest.mark.reliability("lifecycle")
def test_model_moved_inside_a_block_is_a_clear_error() -> None:
    """A model moved inside a capture block: a SessionStateError saying so, not torch's raw device message."""
    model, x = model_and_input()
    session = mr.attach(model)
    with pytest.raises(mr.SessionStateError, match="moved inside a capture"), session.capture(), torch.no_grad():
        model(x)
        model.to("meta")
        model(x.to("meta"))
    session.detach()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_moved_to_cuda_and_back_after_attach() -> None:
    model, x = model_and_input()
    want = plain_routes(model, x)
    session = mr.attach(model)
    model.cuda()
    with torch.no_grad(), session.capture():
        model(x.cuda())
    assert session._hooks[0].capture_ring.device.type == "cuda"
    got = session.routes()
    assert got.equal(want)
    with torch.no_grad(), session.replay(got), session.capture():
        model(x.cuda())
    model.cpu()
    with torch.no_grad(), session.replay(got), session.capture():
        model(x)
    assert session.routes().equal(want)
    session.detach()


# ----------------------------------------------------------------------------- renamed routers (point 4)
class Holder(nn.Module):
    """A user's wrapper: the model is an attribute."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class DDPLike(Holder):
    """Holds the model as ``module``, as DistributedDataParallel does."""

    def __init__(self, inner: nn.Module) -> None:
        nn.Module.__init__(self)
        self.module = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


WRAPS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "user wrapper": Holder,
    "DDP-style module.": DDPLike,
    "two levels": lambda m: DDPLike(Holder(m)),
}
PREFIX = {
    "user wrapper": "inner.",
    "DDP-style module.": "module.",
    "two levels": "module.inner.",
}


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("direction", ["bare to wrapped", "wrapped to bare", "wrapped to other wrapper"])
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_routes_replay_across_wrappers(wrap: str, direction: str) -> None:
    """Routes recorded on the bare model replay on it wrapped (user, DDP-style) and back, mapped and said so."""
    model, x = model_and_input()
    wrapped = WRAPS[wrap](model)
    other = Holder(model) if wrap != "user wrapper" else DDPLike(model)
    src, dst = {
        "bare to wrapped": (model, wrapped),
        "wrapped to bare": (wrapped, model),
        "wrapped to other wrapper": (wrapped, other),
    }[direction]
    with mr.attach(src) as s, s.capture(), torch.no_grad():
        src(x)
    routes = s.routes()
    model.perturb(scale=3.0)  # replay must force the recorded experts
    with torch.no_grad():
        forced = model(x, forced=list(routes.per_layer()))
    with mr.attach(dst) as session:
        with session.replay(routes), session.capture(), torch.no_grad():
            out = dst(x)
            assert "routes renamed" in repr(session)
        old, new = next(iter(session.renamed.items()))
        assert session.routes().rename({new: old}).equal(routes)
    assert torch.equal(out, forced)
    names = {"bare to wrapped": ("", PREFIX[wrap])}.get(direction)
    if names:
        assert session.renamed == {names[0]: names[1]}


@pytest.mark.reliability("wrappers")
def test_ambiguous_renaming_is_refused_listing_candidates() -> None:
    """Routes that fit two sub-models by suffix are refused, listing both; an explicit rename picks one."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = TinyMoE(SPECS[:1], seed=1), TinyMoE(SPECS[:1], seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    pair = Pair()
    x = pair.enc.inputs((2, 5))
    routes = plain_routes(pair.enc, x)
    assert routes.names == ("layers.0.router",)
    with mr.attach(pair) as session:
        with pytest.raises(mr.RouterNotFoundError, match=r"more than one way.*'enc\.'.*'dec\.'.*routes\.rename"):
            with session.replay(routes, strict=False):
                pass
        with session.replay(routes.rename({"": "enc."}), strict=False), session.capture(), torch.no_grad():
            pair(x)
        assert session.renamed is None
        assert session.routes().select(["enc.layers.0.router"]).rename({"enc.": ""}).equal(routes)


@pytest.mark.parametrize("direction", ["bare to wrapped", "wrapped to bare"])
def test_routes_replay_across_wrappers_of_each_layer(direction: str) -> None:
    """Once refused: routes recorded on the bare model did not replay on it with each layer wrapped (FSDP1's
    units, apply_activation_checkpointing's checkpoint_wrapper put their module names inside the paths, where no
    one prefix change fits), nor the reverse. Names that differ only by those map one to one, and the replay
    forces the recorded experts."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from moe_replay.models import _Layer

    torch.manual_seed(0)
    bare = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, expert_impl="dense")
    wrapped = copy.deepcopy(bare)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, _Layer))
    x = torch.randint(0, 128, (2, 9))
    src, dst = (bare, wrapped) if direction == "bare to wrapped" else (wrapped, bare)
    with mr.attach(src) as s, s.capture(), torch.no_grad():
        src(x)
    routes = s.routes()
    with mr.attach(dst) as session:
        assert set(session.names).isdisjoint(routes.names)
        perturb_routers(session, scale=3.0)  # replay must force the recorded experts
        with session.replay(routes), session.capture():
            dst(x, labels=x).loss.backward()
        assert session.renamed == dict(zip(routes.names, session.names, strict=True))
        assert session.routes().equal(routes.rename(session.renamed)), "the recorded experts were not forced"
    # a name that fits two of the model's routers once the wrappers' names are left out is not guessed
    from moe_replay.session import _unwrapped_map

    targets = ["a.layers.1._checkpoint_wrapped_module.gate", "a._orig_mod.layers.1.gate"]
    assert _unwrapped_map(["a.layers.1.gate"], targets) is None
    assert _unwrapped_map(["a.layers.1.gate"], targets[:1]) == {"a.layers.1.gate": targets[0]}
    assert _unwrapped_map(["a.layers.2.gate"], targets) is None


@pytest.mark.reliability("wrappers")
def test_routes_of_one_layer_are_not_fitted_onto_a_session_of_another_layer() -> None:
    """Routes of ``layers.0``'s router, recorded on the whole model (token ids dropped), fitted ``layers.0.`` -> ``''``
    onto a session attached to ``layers[1]`` and forced layer 0's experts on layer 1 without a word: a prefix that
    drops, adds or changes an index into a module list names another layer, or one no name tells. Refused; an
    explicit rename says which, and then forces those rows."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2, expert_impl="dense")
    x = torch.randint(0, 128, (2, 5))
    with mr.attach(model) as s, s.capture(), torch.no_grad():
        model(x)
    full = s.routes()
    first = full.select([n for n in full.names if n.startswith("layers.0.")]).with_token_ids(None)
    layer = model.layers[1]
    hidden = torch.randn(2, 5, layer.mlp.router.weight.shape[1])
    with mr.attach(layer.mlp) as session:
        with pytest.raises(mr.RouterNotFoundError, match="routes.rename"):
            with session.replay(first), torch.no_grad():
                layer.mlp(hidden)
        assert session.renamed is None
        with session.replay(first.rename({"layers.0.mlp.": ""})), session.capture(), torch.no_grad():
            layer.mlp(hidden)
        assert session.routes().per_layer()[0].equal(first.per_layer()[0])  # (the rows named, forced)
    assert _prefix_maps(["m.layers.0.gate"], ["gate"]) == []  # (not ``m.layers.0.`` -> '')
    assert _prefix_maps(["gate"], ["layers.3.gate"]) == []
    assert _prefix_maps(["module.layers.0.gate"], ["layers.0.gate"])  # (a wrapper's prefix still fits)


def _hf_wraps() -> dict[str, Callable[[nn.Module], nn.Module]]:
    """What holds a causal LM as a whole: its base model inside it, PEFT's ``base_model.model.`` around it."""

    def peft_model(model: nn.Module) -> nn.Module:
        peft = pytest.importorskip("peft")
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], r=2))

    return {"base model": lambda m: m.model, "peft": peft_model}


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("direction", ["causal lm to other", "other to causal lm"])
@pytest.mark.parametrize("wrap", ["base model", "peft"])
def test_routes_of_a_causal_lm_replay_on_its_base_model_and_under_peft(wrap: str, direction: str) -> None:
    """A causal LM's ``model.`` around its base model and PEFT's ``base_model.model.`` around the causal LM hold the
    whole model: the routes (which keep every router they were recorded on) fit by the one prefix change, a router's
    routes selected from them too (strict=False), and the recorded experts are forced."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    causal = tiny_hf.build("qwen3_moe")
    other = _hf_wraps()[wrap](causal)
    src, dst = (causal, other) if direction == "causal lm to other" else (other, causal)
    x = torch.randint(1, 128, (2, 6))
    with mr.attach(src) as s, s.capture(), torch.no_grad():
        src(input_ids=x)
    routes = s.routes()
    with mr.attach(dst) as session, torch.no_grad():
        assert set(session.names).isdisjoint(routes.names)
        perturb_routers(session, scale=3.0)  # replay must force the recorded experts
        for given, strict in ((routes, True), (routes.select(routes.names[1:]), False)):
            with session.replay(given, strict=strict), session.capture():
                dst(input_ids=x)
            prefix = {"base model": "model.", "peft": "base_model.model."}[wrap]  # (what the wrapper adds or drops)
            assert session.renamed == ({prefix: ""} if (wrap == "base model") == (src is causal) else {"": prefix})
            got = session.routes().select(given.rename(session.renamed).names)
            assert got.equal(given.rename(session.renamed)), "the recorded experts were not forced"


@pytest.mark.reliability("silent replays")
def test_routes_fitted_onto_one_part_of_a_whole_model_only_where_they_were_recorded_on_that_part() -> None:
    """A session attached to a model of two parts, routes fitted onto one part by adding its prefix (strict=False):
    routes captured on that part replay there, forced; routes of another model that the part's first routers happen
    to fit were forced on them without a word. Refused, naming the prefix and the part beside it."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = TinyMoE(SPECS, seed=1), TinyMoE(SPECS[:1], seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    pair = Pair()
    x = pair.enc.inputs((2, 5))
    encoder = plain_routes(pair.enc, x)  # (captured on the encoder itself: every router of it)
    foreign = plain_routes(TinyMoE(SPECS[:2], seed=3), x)  # (a model of two routers, the encoder's first two's form)
    with mr.attach(pair) as session, torch.no_grad():
        perturb_routers(session, scale=3.0)
        with session.replay(encoder, strict=False), session.capture():
            pair(x)
        assert session.renamed == {"": "enc."}
        assert session.routes().select(list(encoder.rename({"": "enc."}).names)).rename({"enc.": ""}).equal(encoder)
        with pytest.raises(mr.RouterNotFoundError, match=r"'' -> 'enc\.'.*outside 'enc\.'.*'dec\.layers\.0\.router'"):
            with session.replay(foreign, strict=False):
                pass
        with session.replay(foreign.rename({"": "enc."}), strict=False), session.capture():  # (said explicitly)
            pair(x)
        assert (
            session.routes().select(["enc.layers.0.router", "enc.layers.1.router"]).rename({"enc.": ""}).equal(foreign)
        )


def test_rename_refuses_collisions_and_round_trips() -> None:
    r = mr.Routes([torch.tensor([[0, 1]]), torch.tensor([[2, 3]])], names=["a.gate", "b.gate"], num_experts=4)
    assert r.rename({"a.": "x.", "": "y."}).names == ("x.gate", "y.b.gate")
    assert r.rename({"": "m."}).rename({"m.": ""}).equal(r)
    with pytest.raises(mr.RoutesValidationError, match="same name"):
        r.rename({"a.": "c.", "b.": "c."})


def test_no_mapping_still_names_both_fingerprints() -> None:
    model, x = model_and_input()
    routes = plain_routes(model, x).rename({"layers.": "blocks."}).rename({"blocks.0.": "other.0."})
    with mr.attach(model) as session, pytest.raises(mr.RouterNotFoundError, match="fingerprint.*routes.rename"):
        with session.replay(routes):
            pass


def test_detach_inside_an_open_block_is_refused_and_the_block_goes_on() -> None:
    """Forwards later in the block would be neither recorded nor forced: detach waits for the block to close."""
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 8))
    session = mr.attach(model)
    with session.capture():
        model(x)
        with pytest.raises(mr.SessionStateError, match="inside an open capture"):
            session.detach()
        model(x)
    assert session.routes().num_tokens == 2 * x.numel()
    session.detach()
    assert "forward" not in vars(model.layers[0].mlp.router)


class _Interrupt(KeyboardInterrupt):
    """A user's Ctrl-C (a BaseException: no `except Exception` of ours may take it)."""


@pytest.mark.reliability("faults")
@pytest.mark.parametrize("error", [ValueError, _Interrupt])
@pytest.mark.parametrize("blocks", [("capture",), ("replay", "capture"), ("keep_scores",)])
def test_an_exception_leaving_the_sessions_with_leaves_its_open_blocks_and_detaches(
    error: type[BaseException], blocks: tuple[str, ...]
) -> None:
    """Once an exception leaving `with mr.attach(model) as session:` while a block entered by hand inside it was
    still open came out as a SessionStateError (detach refused: a block is open; a Ctrl-C turned into our error)
    and the model stayed attached. The open blocks are now left as the exception would leave `with` blocks, the
    model detached, and the exception comes out as it was raised; with no exception, detach still refuses."""
    model, x = model_and_input()
    before = snapshot(model)
    routes = plain_routes(model, x)
    with pytest.raises(error) as raised:
        with mr.attach(model) as session:
            make = {"replay": lambda: session.replay(routes), "capture": session.capture}
            held = [make.get(b, session.keep_scores)() for b in blocks]
            for block in held:
                block.__enter__()
            with torch.no_grad():
                model(x)
            raise error("the user's own")
    assert type(raised.value) is error and str(raised.value) == "the user's own"
    assert not session.attached
    assert_untouched(model, before)
    assert ours_reachable(model) == []
    if "capture" in blocks:  # (the capture was left on an exception: interrupted, its rows there when asked for)
        with pytest.raises(mr.SessionStateError, match="interrupted"):
            session.routes()
        assert session.routes(allow_partial=True).equal(routes)
    del held  # (left already: dropping them says nothing)
    with mr.attach(model) as again, torch.no_grad(), again.replay(routes), again.capture():
        model(x)
    assert again.routes().equal(routes)
    with pytest.raises(mr.SessionStateError, match="inside an open capture"):
        with mr.attach(model) as session:
            (block := session.capture()).__enter__()
    block.__exit__(None, None, None)
    session.detach()
    assert_untouched(model, before)


def test_verify_on_an_input_with_no_tokens_proves_nothing_and_says_so() -> None:
    model = mr.models.build("softmax_topk", num_layers=2)
    with mr.attach(model) as session:
        with pytest.raises(mr.UnsupportedRouterError, match="no router chose experts for any token"):
            session.verify(torch.zeros(1, 0, dtype=torch.long))
        assert session.verify(torch.zeros(1, 3, dtype=torch.long))["layers.0.mlp.router"] == 1


def test_routes_of_another_layer_are_not_fitted_by_changing_its_index() -> None:
    """The one-prefix fit is for wrappers (``module.``, ``_orig_mod.``); it never maps layer 3's router to layer 1's."""
    a = mr.models.build("softmax_topk", num_layers=4, first_dense_layers=3)  # router: layers.3.mlp.router
    b = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=1)  # router: layers.1.mlp.router
    x = torch.randint(0, 128, (1, 6))
    with mr.attach(a) as sa, sa.capture():
        a(x)
    routes = sa.routes()
    with mr.attach(b) as sb:
        with pytest.raises(mr.MoEReplayError, match="layers.3.mlp.router"), sb.replay(routes):
            b(x)
        assert sb.renamed is None or sb.renamed == {}


def test_a_class_patch_after_attach_reaches_the_attached_model() -> None:
    """As without the session (a kernel library patching the router class late): the new forward runs,
    and its decision is established again."""
    from moe_replay.models import SoftmaxTopKRouter

    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (1, 4))
    orig, calls = SoftmaxTopKRouter.forward, []

    def patched(self: nn.Module, h: torch.Tensor) -> Any:
        calls.append(1)
        return orig(self, h)

    with mr.attach(model) as session:
        with session.capture():
            ref = model(x).logits
        routes = session.routes()
        SoftmaxTopKRouter.forward = patched
        try:
            with session.replay(routes), session.capture():
                out = model(x).logits
            assert calls, "the patched forward did not run"
            assert session.routes().equal(routes) and torch.equal(out, ref)
        finally:
            SoftmaxTopKRouter.forward = orig
        calls.clear()
        model(x)
        assert not calls  # the patch undone: the original again


class _ModalityBlock(nn.Module):
    """Text and image tokens routed by their own routers; a text-only input reaches the image router with none."""

    def __init__(self) -> None:
        super().__init__()
        self.text = mr.models.build("softmax_topk", num_layers=1).layers[0].mlp
        self.image = mr.models.build("softmax_topk", num_layers=1).layers[0].mlp

    def forward(self, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[~is_image] = self.text(x[~is_image][None])[0]
        out[is_image] = self.image(x[is_image][None])[0]
        return out


def test_verify_names_routers_that_ran_on_no_token_and_passes_the_others() -> None:
    model = _ModalityBlock()
    x = torch.randn(6, model.text.router.weight.shape[1])
    with mr.attach(model) as session:
        report = session.verify(x, torch.zeros(6, dtype=torch.bool))  # text only
        assert report.idle == ("image.router",) and "text.router" in report.evidence
        assert "chose for no token" in str(report) and "lookup" not in str(report)
        both = torch.arange(6) % 2 == 0
        with session.capture():
            model(x, both)
        assert session.routes().tokens_per_layer == (3, 3)


# ----------------------------------------------------------------------------- a router's k changed
@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("block", ["replay", "capture"])
@pytest.mark.parametrize("new_k", [1, 3])
def test_a_router_whose_k_changes_inside_a_block_refuses_every_forward(block: str, new_k: int) -> None:
    """A router whose k changes inside a block refuses every forward, retried too: no row is cut, padded or mixed."""
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 8))
    router = model.layers[0].mlp.router
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        if block == "replay":
            # the retry loop catches the first refusal (the control flow changed); the next forward must
            # not force rows of k=2 on a router that now chooses new_k (cut to 1 or padded to 3)
            with pytest.raises(mr.RoutesValidationError, match=f"chooses {new_k} of 8.*rows of 2 of 8"):
                with session.replay(routes):
                    router.top_k = new_k
                    for _ in range(3):
                        with contextlib.suppress(mr.UnsupportedRouterError):
                            model(x)
        else:
            with session.capture(clear=False):
                router.top_k = new_k
                for _ in range(3):
                    with pytest.raises(mr.UnsupportedRouterError):
                        model(x)
            assert session.routes().equal(routes)  # nothing dropped, nothing of another k appended
        tried()


@pytest.mark.reliability("lifecycle")
def test_a_router_whose_k_changes_between_blocks_keeps_the_last_capture_readable() -> None:
    """A router whose k changes between blocks is established again; the last capture stays readable as it was."""
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 8))
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        model.layers[0].mlp.router.top_k = 1
        session.verify(x)  # another mode (no gradients) than the capture's: its evidence of k=2 no longer holds
        assert [s.top_k for s in session.sites] == [1, 2]
        assert session.routes().equal(routes)
        with pytest.raises(mr.SessionStateError, match="cannot append"):
            with session.capture(clear=False):
                pass
        assert session.routes().equal(routes)
        with pytest.raises(mr.RoutesValidationError, match="k=1"), session.replay(routes):
            pass
        with session.capture():
            ref = model(x).logits
        now = session.routes()
        assert now.k_per_layer == (1, 2)
        with session.replay(now):
            assert torch.equal(model(x).logits, ref)


@pytest.mark.reliability("lifecycle")
def test_a_session_no_name_holds_can_still_be_detached(tokens: torch.Tensor) -> None:
    """A notebook cell showing ``mr.attach(model)`` keeps no name for the session; the next attach said
    "detach it first" with nothing to detach. The error carries the session in the way, on the same model
    and on a submodule of it, and detaching it leaves the model as it was."""
    import gc

    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    mr.attach(model)  # shown, then dropped
    gc.collect()
    for target in (model, model.layers[0]):
        with pytest.raises(mr.SessionStateError, match=r"this error's \.session\.detach\(\)") as caught:
            mr.attach(target)
        held = caught.value.session
        assert isinstance(held, mr.Session) and held.attached
        with held.capture():  # the session it names is the one in the way
            model(tokens)
        assert held.routes().num_tokens == tokens.numel()
    held.detach()
    assert_untouched(model, before)
    with mr.attach(model.layers[0]) as session:
        assert session.names == ("mlp.router",)
    assert_untouched(model, before)


def test_a_model_dropped_while_attached_is_freed_and_its_session_stays_while_it_lives() -> None:
    """Once a model dropped while attached (never detached: an exception before detach, a notebook) was never freed:
    the registry of attached sessions, keyed weakly by model, held each session strongly, and the session holds its
    model's forwards. A session whose handle is dropped still lives with its model: attaching again is refused."""
    import gc
    import weakref

    model, x = model_and_input()
    with torch.no_grad():
        mr.attach(model).verify(x)  # (the handle is dropped at once)
    gc.collect()
    with pytest.raises(mr.SessionStateError, match="already has an attached session"):
        mr.attach(model)
    fresh = TinyMoE(SPECS)
    with torch.no_grad(), mr.attach(fresh) as other, other.capture():  # (another model: unaffected)
        fresh(x)
    assert other.routes().num_tokens == 10
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
