"""Lean interception (moe_replay/_lean.py): a router whose decision-like calls all go through torch's
module functions runs its later forwards without the TorchFunctionMode, with the same results.

What a forward ran under is observed from inside the router: the torch-function mode stack that its
own code sees. The rows are observed independently, from the experts' inputs (tests/test_evidence.py).
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import moe_replay as mr
from moe_replay import _lean

from .test_evidence import (
    D,
    E,
    Experts,
    ExpertSpy,
    GroupLimitedRouter,
    RouterBlock,
    T,
    TwoLayers,
    as_sets,
    dispatch,
    perturb,
)

topk_bound_early = torch.topk  # a name bound before any session: the wrappers never see its calls


class SeenModes(nn.Module):
    """A router that notes how many torch-function modes its own code runs under; decides with torch.topk."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))
        self.top_k = top_k
        self.modes: list[int] = []
        self.extra_argmax = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(len(_get_current_function_mode_stack()))
        probs = F.linear(x, self.weight).softmax(-1)
        if self.extra_argmax:  # a later forward that takes another path
            probs = probs + 0 * torch.argmax(probs, dim=-1, keepdim=True)
        w, idx = self.decide(probs)
        return w / w.sum(-1, keepdim=True), idx

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(probs, self.top_k, dim=-1)


class MethodForm(SeenModes):
    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return probs.topk(self.top_k, dim=-1)


class BoundEarly(SeenModes):
    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_bound_early(probs, self.top_k, dim=-1)


class LateMask(SeenModes):
    """Masks half the experts, with a tensor method, only in forwards of many tokens (a prefill)."""

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if probs.shape[0] > T:
            half = torch.arange(E) < E // 2
            probs = probs.masked_fill(half, 0.0)
        return torch.topk(probs, self.top_k, dim=-1)


ROUTERS = {"function": SeenModes, "method": MethodForm, "bound early": BoundEarly}


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _routers(model: nn.Module) -> list[SeenModes]:
    return [m for m in model.modules() if isinstance(m, SeenModes)]


def _capture_replay_exact(model: nn.Module, forwards: int = 3) -> list[int]:
    """Capture (several forwards), then replay after perturbing: the experts get exactly the recorded rows.

    Returns the mode depth each router's code saw, per forward, over the whole run.
    """
    xs = [_x(i) for i in range(forwards)]
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session:
            used = []
            with torch.no_grad(), session.capture():
                for x in xs:
                    model(x)
                    used.append([spy.experts_of(b) for b in range(len(session.names))])
            routes = session.routes()
            for b, name in enumerate(session.names):
                rows = routes.layer(name).reshape(forwards, T, -1)
                for f in range(forwards):
                    assert torch.equal(as_sets(rows[f]), used[f][b]), f"capture of {name}, forward {f}"
            perturb(model)
            with torch.no_grad(), session.replay(routes):
                for f, x in enumerate(xs):
                    model(x)
                    for b, name in enumerate(session.names):
                        want = as_sets(routes.layer(name).reshape(forwards, T, -1)[f])
                        assert torch.equal(spy.experts_of(b), want), f"replay of {name}, forward {f}"
    finally:
        spy.remove()
    return [d for r in _routers(model) for d in r.modes]


def test_a_router_calling_torch_topk_goes_lean_after_one_audited_forward_and_stays_exact() -> None:
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    seen = _capture_replay_exact(model, forwards=3)
    per_router = [r.modes for r in _routers(model)]
    for modes in per_router:
        # probe runs and the audited first forward run under a mode; every later forward under none
        assert modes[-5:] == [0, 0, 0, 0, 0], modes
        assert max(modes) >= 1
    assert seen


@pytest.mark.parametrize("how", ["method", "bound early"])
def test_a_decision_that_bypasses_the_wrappers_keeps_the_mode_and_stays_exact(how: str) -> None:
    model = TwoLayers(lambda: RouterBlock(ROUTERS[how]()))
    _capture_replay_exact(model, forwards=3)
    for r in _routers(model):
        assert r.modes[-5:] == [1, 1, 1, 1, 1], r.modes  # the mode, every forward


def test_a_lean_forward_that_makes_another_decision_like_call_is_refused() -> None:
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(_x())
            model(_x(2))
        assert _routers(model)[0].modes[-1] == 0  # lean by now
        with pytest.raises(mr.UnsupportedRouterError, match="control flow changed"), session.capture():
            for r in _routers(model):  # inside the block (one started after it establishes the decision again)
                r.extra_argmax = True
            model(_x(3))


class FunctionalGroups(GroupLimitedRouter):
    """Case 8 (group-limited greedy) written with torch's module functions."""

    def __init__(self) -> None:
        super().__init__(n_group=4, topk_group=2, top_k=2)
        self.modes: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(len(_get_current_function_mode_stack()))
        scores = torch.sigmoid(F.linear(x, self.weight))
        grouped = scores.view(-1, self.n_group, E // self.n_group)
        group_scores = self.best(grouped, 2).values.sum(-1)
        group_idx = self.best(group_scores, self.topk_group).indices
        mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)
        keep = mask.unsqueeze(-1).expand_as(grouped).reshape(scores.shape)
        w, idx = self.best(self.masked(scores, keep == 0), self.top_k)
        return w / w.sum(-1, keepdim=True), idx

    def best(self, x: torch.Tensor, k: int) -> torch.return_types.topk:
        return torch.topk(x, k, dim=-1)

    def masked(self, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.masked_fill(x, drop, 0.0)


class MethodGroups(FunctionalGroups):
    """The same, with tensor methods."""

    def best(self, x: torch.Tensor, k: int) -> torch.return_types.topk:
        return x.topk(k, dim=-1)

    def masked(self, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(drop, 0.0)


def _replayed_with_gradients(make: Callable[[], nn.Module]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Capture, perturb the routers, replay twice (the first forward is the audited one) and backward:
    the output, the gradients and the mode depth each router's code saw in the last forward."""
    torch.manual_seed(0)
    model = TwoLayers(make)
    x = _x()
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        perturb(model)
        with session.replay(mr.Routes.cat([routes, routes])):
            model(x)
            out = model(x)
            out.square().sum().backward()
    depths = [layer.router.modes[-1] for layer in model.layers]
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], depths


def _assert_lean_matches_the_mode(lean: Callable[[], nn.Module], mode: Callable[[], nn.Module]) -> None:
    lean_out, lean_grads, lean_depths = _replayed_with_gradients(lean)
    mode_out, mode_grads, mode_depths = _replayed_with_gradients(mode)
    assert lean_depths == [0, 0] and mode_depths == [1, 1]
    torch.testing.assert_close(lean_out, mode_out, rtol=0, atol=0)
    for a, b in zip(lean_grads, mode_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_group_limited_routing_through_torch_functions_goes_lean_with_the_modes_values_and_gradients() -> None:
    """Forced experts outside the chosen groups get their unmasked scores, lean as under the mode."""
    _assert_lean_matches_the_mode(lambda: RouterBlock(FunctionalGroups()), lambda: RouterBlock(MethodGroups()))


def test_nested_lean_routers_count_only_their_own_calls() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = RouterBlock(SeenModes())
            self.gate = SeenModes()
            self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, idx = self.gate(x)
            return dispatch(self.experts, self.inner(x), idx, w)

    torch.manual_seed(0)
    model = Outer()
    with mr.attach(model) as session, torch.no_grad():
        assert sorted(session.names) == ["gate", "inner.router"]
        with session.capture():
            for i in range(3):
                model(_x(i))
        routes = session.routes()
        assert [model.gate.modes[-1], model.inner.router.modes[-1]] == [0, 0]
        with session.replay(routes):
            out = [model(_x(i)) for i in range(3)]
        with session.replay(routes):
            again = [model(_x(i)) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


def test_the_wrappers_are_in_place_only_while_an_eager_router_forward_runs() -> None:
    seen: list[bool] = []

    class Noting(SeenModes):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(torch.topk is not _lean.ORIGINALS["topk"])
            return super().forward(x)

    model = TwoLayers(lambda: RouterBlock(Noting()))
    with mr.attach(model) as session, torch.no_grad():
        assert torch.topk is _lean.ORIGINALS["topk"]
        with session.capture():
            model(_x())
            model(_x(1))
        assert torch.topk is _lean.ORIGINALS["topk"] and torch.where is _lean.ORIGINALS["where"]
        model(_x(2))  # idle: no interception at all
    # per router: probe runs without, then the audited forward with them; the lean forward with; idle without
    assert seen[-4:] == [True, True, False, False], seen
    assert seen[:-4].count(True) == 2 and seen[:-4][-1] is True, seen
    assert torch.topk is _lean.ORIGINALS["topk"]


def test_another_librarys_wrapper_is_neither_replaced_nor_removed() -> None:
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    calls: list[int] = []
    original = torch.topk

    def theirs(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    torch.topk = theirs
    try:
        _capture_replay_exact(model, forwards=3)  # their wrapper stays: the router keeps the mode
        assert torch.topk is theirs and calls
        assert [r.modes[-1] for r in _routers(model)] == [1, 1]
    finally:
        torch.topk = original


def _top2(x: torch.Tensor) -> torch.Tensor:
    return torch.topk(x, 2, dim=-1).indices


def test_torchscript_compiles_torch_topk_inside_a_lean_forward() -> None:
    scripted: list[torch.Tensor] = []

    class Scripting(SeenModes):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not scripted and torch.topk is not _lean.ORIGINALS["topk"]:
                scripted.append(torch.jit.script(_top2)(x))
            return super().forward(x)

    model = TwoLayers(lambda: RouterBlock(Scripting()))
    x = _x()
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
        model(x)
    assert scripted and torch.equal(scripted[0], x.topk(2, dim=-1).indices)


def test_other_threads_calls_pass_through_while_a_lean_forward_runs() -> None:
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    results: list[bool] = []
    started, go = threading.Event(), threading.Event()

    def other() -> None:
        started.set()
        go.wait(5)
        x = _x(9)
        results.append(torch.equal(torch.topk(x, 3, dim=-1).indices, x.argsort(-1, descending=True)[:, :3]))

    def slow_hook(module: nn.Module, args: object) -> None:
        go.set()  # the other thread calls torch.topk while this router's lean forward is open
        started.wait(5)

    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(_x())
        t = threading.Thread(target=other)
        t.start()
        handle = model.layers[0].router.register_forward_pre_hook(slow_hook)
        with session.capture():
            model(_x(1))
        handle.remove()
        t.join(10)
        assert session.routes().num_tokens == T
    assert results == [True]


@pytest.mark.parametrize("how", ["add_", "previous forward's, later", ".data", "numpy"])
def test_indices_changed_after_the_router_returned_them_do_not_change_what_was_recorded(how: str) -> None:
    """fastmoe's GShard gate drops experts with an in-place fill on the indices it returns; a model may
    also reuse the tensor, write through ``.data`` or a numpy view (no version bump): rows are copied at
    the call, so what was recorded is what the router chose."""

    class Changing(RouterBlock):
        def __init__(self, router: nn.Module) -> None:
            super().__init__(router)
            self.previous: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, idx = self.router(x)
            out = dispatch(self.experts, x, idx, w)
            if how == "add_":
                idx.add_(1)
            elif how == ".data":
                idx.data.fill_(0)
            elif how == "numpy":
                idx.numpy()[:] = 0
            elif self.previous is not None:
                self.previous.fill_(0)
            self.previous = idx
            return out

    model = TwoLayers(lambda: Changing(SeenModes()))
    _capture_replay_exact(model, forwards=4)
    _capture_replay_exact(model, forwards=4)  # a later session goes lean at once


def test_lean_replay_gives_the_outputs_and_gradients_of_the_mode() -> None:
    _assert_lean_matches_the_mode(lambda: RouterBlock(SeenModes()), lambda: RouterBlock(MethodForm()))


def test_lean_works_after_replay_reads_more_rows_than_one_int64_chunk() -> None:
    from moe_replay import ring

    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    xs = [_x(i) for i in range(ring._CHUNK_ROWS // T + 3)]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for x in xs:
                model(x)
        routes = session.routes()
        perturb(model)
        with session.replay(routes), session.capture():
            for x in xs:
                model(x)
        assert session.routes().equal(routes)


class LateMaskBelow(LateMask):
    """:class:`LateMask` reached through ``super().decide``: the branch is in a parent class's code."""

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().decide(probs)


@pytest.mark.parametrize("router", [LateMask, LateMaskBelow])
def test_a_mask_in_a_branch_the_audit_did_not_take_keeps_the_router_under_the_mode(router: type) -> None:
    """The audited forward has no mask; a later, longer forward masks with a tensor method. The router's
    code is read too, so it never goes lean, and the replay reads forced experts' unmasked scores."""
    model = TwoLayers(lambda: RouterBlock(router()))
    weights = _replayed_weights_of_a_long_forward(model)
    assert [layer.router.modes[-1] for layer in model.layers] == [1, 1]
    assert all(bool((w > 0).all()) for w in weights)  # no forced expert got the masked 0.0


def _replayed_weights_of_a_long_forward(
    model: nn.Module, seen: list[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> list[torch.Tensor]:
    """Capture two short forwards and a long one, perturb, replay them: each router's weights in the long one
    (and in ``seen``, each router's input and experts there)."""
    weights: list[torch.Tensor] = []
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def note(m: nn.Module, a: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, torch.Tensor]) -> None:
        weights.append(out[0].detach())
        inputs.append((a[0].detach(), out[1]))

    handles = [layer.router.register_forward_hook(note) for layer in model.layers]
    xs = [_x(1), _x(2), torch.randn(2 * T, D, generator=torch.Generator().manual_seed(3))]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            for x in xs:
                model(x)
        routes = session.routes()
        perturb(model)
        weights.clear()
        with torch.no_grad(), session.replay(routes):
            for x in xs:
                model(x)
    for h in handles:
        h.remove()
    if seen is not None:
        seen.extend(inputs[-len(model.layers) :])
    return weights[-len(model.layers) :]


def _late_mask(probs: torch.Tensor) -> torch.Tensor:
    if probs.shape[0] > T:  # only in forwards of many tokens: the experts scored below the mean are out
        probs = probs.masked_fill(probs < probs.mean(-1, keepdim=True), 0.0)
    return probs


def _decorated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapper(*args: torch.Tensor) -> torch.Tensor:  # (no functools.wraps: found through the closure)
        return fn(*args)

    return wrapper


helpers = types.ModuleType("helpers")  # a module of the user's, named by the router's code
helpers.late_mask = _late_mask


class _Masking:
    """Holds the mask as a static method, and as an object called like a function."""

    pick = staticmethod(_late_mask)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        return _late_mask(probs)


class _MaskModule(nn.Module):
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return _late_mask(probs)


class MaskedSomewhere(SeenModes):
    """Masks with a tensor method, only in long forwards, in code reached in one of several ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.mask = _late_mask  # a function kept as an attribute
        self.masking = _Masking()  # an object called like a function
        self.stages = nn.ModuleList([_MaskModule()])  # a container's child

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.how == "attribute":
            probs = self.mask(probs)
        elif self.how == "callable object":
            probs = self.masking(probs)
        elif self.how == "module function":
            probs = helpers.late_mask(probs)
        elif self.how == "static method":
            probs = _Masking.pick(probs)
        elif self.how == "container child":
            for stage in self.stages:
                probs = stage(probs)
        elif self.how == "decorated":
            probs = _closure_masked(probs)
        return torch.topk(probs, self.top_k, dim=-1)


_closure_masked = _decorated(_late_mask)
READ_WAYS = ["attribute", "callable object", "module function", "static method", "container child", "decorated"]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", READ_WAYS)
def test_a_mask_in_code_reached_other_ways_keeps_the_router_under_the_mode(how: str) -> None:
    """The audited forward has no mask; the code it sits in is read too, so the router never goes lean,
    and the replay reads forced experts' unmasked scores."""
    model = TwoLayers(lambda: RouterBlock(MaskedSomewhere(how)))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    weights = _replayed_weights_of_a_long_forward(model, seen)
    assert [layer.router.modes[-1] for layer in model.layers] == [1, 1]  # the mode
    read_through = 0
    for w, (x, idx), layer in zip(weights, seen, model.layers, strict=True):
        masked = _late_mask(F.linear(x, layer.router.weight).softmax(-1))
        # (a row of forced experts the masked top-k could return itself gets its values, masked 0.0 included)
        own = masked.gather(1, idx).sort(-1).values == masked.topk(idx.shape[1], dim=-1).values.sort(-1).values
        others = ~own.all(-1)
        assert bool((w[others] > 0).all())  # no other forced expert got the masked 0.0
        read_through += int((masked.gather(1, idx)[others] == 0).sum())
    assert read_through > 0  # (forced experts the mask excludes were read through)


def _import_on_demand(name: str) -> object:
    raise ImportError(f"lazy.{name} needs an optional dependency")


lazy = types.ModuleType("lazy")  # a module importing its attributes on first use (PEP 562)
lazy.__getattr__ = _import_on_demand  # type: ignore[method-assign]


class NamesALazyModule(SeenModes):
    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if probs.shape[0] < 0:  # never: reading the code must not import what the branch would
            probs = lazy.optional_kernel(probs)
        return torch.topk(probs, self.top_k, dim=-1)


class MasksInAProperty(SeenModes):
    """Reaches its mask through a property (reading must not run it: it counts its runs)."""

    runs = 0

    @property
    def masked(self) -> Callable[[torch.Tensor], torch.Tensor]:
        MasksInAProperty.runs += 1
        return lambda probs: probs.masked_fill(probs < probs.mean(-1, keepdim=True), 0.0)

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if probs.shape[0] > 1 << 20:  # (never here, nor in the probe runs on other numbers of tokens)
            probs = self.masked(probs)
        return torch.topk(probs, self.top_k, dim=-1)


def test_reading_a_routers_code_runs_none_of_it_not_even_a_modules_lazy_import() -> None:
    model = TwoLayers(lambda: RouterBlock(NamesALazyModule()))
    _capture_replay_exact(model, forwards=3)
    assert [r.modes[-1] for r in _routers(model)] == [0, 0]  # lean


def test_a_property_the_router_reaches_is_read_and_not_run() -> None:
    model = TwoLayers(lambda: RouterBlock(MasksInAProperty()))
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_x(1))
        model(_x(2))
    assert MasksInAProperty.runs == 0  # the branch never ran, and reading ran nothing
    assert [r.modes[-1] for r in _routers(model)] == [1, 1]  # its getter's code was read: the mode


def _reroute_overflow(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch-style capacity in a helper module: a token whose expert is full goes to its best one with room."""
    full = torch.bincount(idx.flatten(), minlength=probs.shape[-1]) > 2
    if bool(full.any()):  # only when a forward overflows an expert (long forwards)
        alt = torch.argmax(probs - 2.0 * full.to(probs.dtype), dim=-1, keepdim=True)
        idx = torch.where(full[idx], alt, idx)
    return idx


helpers.reroute_overflow = _reroute_overflow


class Rerouting(SeenModes):
    def __init__(self) -> None:
        super().__init__(top_k=1)

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = helpers.reroute_overflow(probs, torch.topk(probs, 1, dim=-1).indices)
        return probs.gather(-1, idx), idx


@pytest.mark.reliability("silent replays")
def test_a_decision_like_call_in_a_helper_on_a_branch_the_audit_did_not_take_is_refused() -> None:
    """A capacity reroute's argmax in a helper, run only when an expert overflows: refused, not left unforced."""
    model = TwoLayers(lambda: RouterBlock(Rerouting()))
    g = torch.Generator().manual_seed(1)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(torch.randn(2, D, generator=g))  # two tokens: no expert overflows
            model(torch.randn(2, D, generator=g))
        assert _routers(model)[0].modes[-1] == 0  # lean by now
        with session.capture(), pytest.raises(mr.UnsupportedRouterError, match="control flow changed"):
            model(torch.randn(8 * T, D, generator=g))  # experts overflow: the helper's argmax reroutes


def test_a_library_that_wraps_a_name_after_the_audit_sends_the_router_back_to_the_mode() -> None:
    def replayed(wrap: bool) -> tuple[torch.Tensor, list[int]]:
        torch.manual_seed(0)
        model = TwoLayers(lambda: RouterBlock(FunctionalGroups()))
        x = _x()
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(x)
                model(x)
            routes = session.routes()
            perturb(model)
            original = torch.masked_fill
            if wrap:
                torch.masked_fill = lambda *a, **k: original(*a, **k)  # a profiler, say
            try:
                with session.replay(routes):
                    model(x)
                    out = model(x)
            finally:
                torch.masked_fill = original
        return out, [layer.router.modes[-1] for layer in model.layers]

    plain, plain_modes = replayed(wrap=False)
    wrapped, wrapped_modes = replayed(wrap=True)
    assert plain_modes == [0, 0] and wrapped_modes == [1, 1]
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


class NotingTheLock(SeenModes):
    """A router that notes whether the wrappers' lock is held while its forward runs."""

    held: list[bool]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.held.append(_lean.SWAP.lock.locked())
        return super().forward(x)


def test_no_router_forward_runs_holding_the_wrappers_lock_not_even_a_refused_lean_one() -> None:
    # a router nested in this forward, or another thread's, must be able to take its own turn at the wrappers
    torch.manual_seed(0)
    model = TwoLayers(lambda: RouterBlock(NotingTheLock()))
    for r in _routers(model):
        r.held = []
    x = _x()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(x)  # lean
        original = torch.topk
        torch.topk = lambda *a, **k: original(*a, **k)  # a library wraps the router's name after the audit
        try:
            with session.replay(session.routes()):
                model(x)  # refused lean: under the mode
                model(x)
        finally:
            torch.topk = original
    routers = _routers(model)
    assert [r.modes[-3:] for r in routers] == [[0, 1, 1], [0, 1, 1]]  # lean, then the mode
    assert not any(held for r in routers for held in r.held), [r.held for r in routers]


def test_a_probe_in_another_thread_does_not_turn_this_threads_routers_plain() -> None:
    """Establishing one model's decisions (probe runs) in a thread leaves another thread's capture whole."""
    inside, done = threading.Event(), threading.Event()

    class Slow(SeenModes):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not done.is_set():
                inside.set()
                done.wait(10)  # hold the probe open while the other thread captures
            return super().forward(x)

    torch.manual_seed(0)
    slow = TwoLayers(lambda: RouterBlock(Slow()))
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    errors: list[BaseException] = []

    def establish() -> None:
        try:
            with mr.attach(slow) as s, torch.no_grad():
                s.verify(_x())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    spy = ExpertSpy(model)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(_x())
        t = threading.Thread(target=establish)
        t.start()
        assert inside.wait(10)
        used = []
        with session.capture():
            for i in range(3):
                model(_x(i))
                used.append([spy.experts_of(b) for b in range(2)])
        done.set()
        t.join(10)
        routes = session.routes()
    spy.remove()
    assert not errors
    for b, name in enumerate(session.names):
        rows = routes.layer(name)
        assert rows.shape[0] == 3 * T
        for f in range(3):
            assert torch.equal(as_sets(rows[f * T : (f + 1) * T]), used[f][b])


def test_the_session_table_says_which_routers_run_lean_and_why_the_others_do_not() -> None:
    lean_model = TwoLayers(lambda: RouterBlock(SeenModes()))
    mode_model = TwoLayers(lambda: RouterBlock(MethodForm()))
    for model, want in ((lean_model, "2 routers lean, 0 under"), (mode_model, "0 routers lean, 2 under")):
        with mr.attach(model) as session, torch.no_grad():
            assert "2 not audited yet" in session.table()
            with session.capture():
                model(_x())
            table = session.table()
        assert want in table
        assert ("its code calls .topk at test_lean.py" in table) == (model is mode_model)


# ----------------------------------------------------------------------------- the fast path
#: The call form :class:`FormRouter` decides in (``FORM["now"]``), which a test changes between forwards of one
#: block: held outside the routers, so that it is no setting of theirs (a block refuses a setting changed inside it).
FORM = {"now": "dim keyword"}


class FormRouter(SeenModes):
    """Decides with ``torch.topk`` in the call form named by ``FORM["now"]``."""

    @property
    def form(self) -> str:
        return FORM["now"]

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.top_k
        if self.form == "dim keyword":
            return torch.topk(probs, k, dim=-1)
        if self.form == "positional":
            return torch.topk(probs, k, -1)
        if self.form == "unsorted":
            return torch.topk(probs, k, dim=-1, sorted=False)
        if self.form == "3-D scores":
            w, idx = torch.topk(probs.unsqueeze(0), k, dim=-1)
            return w[0], idx[0]
        if self.form == "float64 scores":
            w, idx = torch.topk(probs.double(), k, dim=-1)
            return w.float(), idx
        raise AssertionError(self.form)


FORMS = ["dim keyword", "dim keyword", "positional", "positional", "unsorted", "3-D scores", "float64 scores"]
FORMS += ["dim keyword", "3-D scores", "3-D scores"]


def _general_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The routers whose calls the lean fast path left to the general one, in call order."""
    calls: list[str] = []
    general = mr.intercept.RouterHook._on_lean

    def spy(self: mr.intercept.RouterHook, func: Callable[..., object], args: tuple, kwargs: dict) -> object:
        calls.append(self.name)
        return general(self, func, args, kwargs)

    monkeypatch.setattr(mr.intercept.RouterHook, "_on_lean", spy)
    return calls


def test_the_fast_path_answers_only_the_call_form_it_learned_and_every_answer_is_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(FORM, "now", "dim keyword")  # (put back as the test ends)
    model = TwoLayers(lambda: RouterBlock(FormRouter()))
    general = _general_calls(monkeypatch)
    xs = [_x(i) for i in range(len(FORMS))]
    spy = ExpertSpy(model)
    try:
        with mr.attach(model) as session:
            with torch.no_grad(), session.capture():
                model(xs[0])  # establishes and audits: the later forwards run lean
            per_forward: list[list[str]] = []
            for state in ("capture", "replay"):
                if state == "replay":
                    routes = session.routes()
                    perturb(model)
                ctx = session.capture() if state == "capture" else session.replay(routes)
                with torch.no_grad(), ctx:
                    for f, (form, x) in enumerate(zip(FORMS, xs, strict=True)):
                        FORM["now"] = form
                        general.clear()
                        model(x)
                        per_forward.append(list(general))
                        for b, name in enumerate(session.names):
                            rows = session.routes().layer(name) if state == "capture" else routes.layer(name)
                            want = as_sets(rows.reshape(-1, T, rows.shape[-1])[f])
                            assert torch.equal(spy.experts_of(b), want), f"{state} of {name}, forward {f} ({form})"
    finally:
        spy.remove()
    learned = None  # the form of the last decision the general path answered in full (2-D scores only)
    for f, form in enumerate(FORMS + FORMS):
        if form == learned:  # answered at once
            assert per_forward[f] == [], (f, form)
        else:  # a new form, or scores the fast path does not take: the general path, which learns 2-D forms
            assert sorted(per_forward[f]) == sorted(session.names), (f, form)
            learned = form if form != "3-D scores" else learned


def test_scores_kept_after_fast_forwards_are_kept_for_every_decision() -> None:
    model = TwoLayers(lambda: RouterBlock(FormRouter()))
    with mr.attach(model) as session, torch.no_grad():
        model(_x(0))
        with session.capture():
            for i in range(3):
                model(_x(i))
        routes = session.routes()
        assert all(h._form is not None for h in session._hooks)  # the fast path answered the later forwards
        with session.replay(routes[: T * 2]), session.keep_scores() as kept:
            model(_x(0))
            model(_x(1))
        for name in session.names:
            scores, used = kept[name]
            assert scores.shape == (2 * T, E)
            assert torch.equal(used, routes.layer(name)[: 2 * T].long())
        assert dict(session.verify(_x(2))) == dict.fromkeys(session.names, 1)


class LoggedTwin(SeenModes):
    """Makes a top-k of the decision's very form first, for a statistic that does not reach the output."""

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.logged = torch.topk(probs.detach(), self.top_k, dim=-1)[1]
        return torch.topk(probs, self.top_k, dim=-1)


def test_a_top_k_of_the_decisions_form_at_another_place_in_the_forward_is_not_taken_for_it() -> None:
    model = TwoLayers(lambda: RouterBlock(LoggedTwin()))
    _capture_replay_exact(model, forwards=4)
    with mr.attach(model) as session, torch.no_grad():
        model(_x(0))
        with session.capture():
            for i in range(3):
                model(_x(i))
        assert all(h.evidence[h.mode()].decision == (1,) for h in session._hooks)  # the second call decides
        # (a twin may take dispatch on other inputs, whatever the router returns: checked by effect, in the mode)
        assert all(h.interception().startswith("mode: its forward makes other calls") for h in session._hooks)
        routes = session.routes()
        perturb(model)
        with session.replay(routes):
            for i in range(3):
                model(_x(i))
            assert all(h.replay_source.host_consumed == 3 * T for h in session._hooks)  # one decision each


#: The group mask of FunctionalGroups written with torch.where: the scores in either value argument, the fill
#: a number or a tensor, as a module function (lean) or a tensor method (the mode).
WHERE_MASKS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "scores first, number fill": lambda x, drop: torch.where(~drop, x, 0.0),
    "scores first, tensor fill": lambda x, drop: torch.where(~drop, x, torch.zeros_like(x)),
    "fill first, number": lambda x, drop: torch.where(drop, 0.0, x),
    "fill first, tensor": lambda x, drop: torch.where(drop, torch.zeros_like(x), x),
    "keywords, fill first": lambda x, drop: torch.where(drop, input=torch.zeros_like(x), other=x),
    "method, tensor fill": lambda x, drop: x.where(~drop, torch.zeros_like(x)),
    "method, number fill": lambda x, drop: x.where(~drop, 0.0),
}


@pytest.mark.parametrize("how", list(WHERE_MASKS))
def test_a_where_mask_with_the_scores_in_either_argument_replays_the_unmasked_scores(how: str) -> None:
    """Forced experts outside the chosen groups get their scores whichever side of torch.where holds them."""

    class WhereGroups(FunctionalGroups):
        def masked(self, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            return WHERE_MASKS[how](x, drop)

    got_out, got_grads, _ = _replayed_with_gradients(lambda: RouterBlock(WhereGroups()))
    want_out, want_grads, _ = _replayed_with_gradients(lambda: RouterBlock(FunctionalGroups()))
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_replayed_routers_rows_go_when_the_replay_block_ends() -> None:
    import gc
    import weakref

    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    x = _x()
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(x)
            model(x)
        with session.replay(session.routes()):
            model(x)
            model(x)  # the lean fast path
            sources = [weakref.ref(h.replay_source) for h in session._hooks]
        model(x)  # idle
        gc.collect()
        assert all(s() is None for s in sources)  # nothing still holds a device copy of the rows


class ShorterOutput(SeenModes):
    """Returns ``(weights, indices)``, or on a later forward (another branch) ``(indices,)`` alone."""

    short = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, idx = super().forward(x)
        return (idx,) if self.short else (w, idx)


class LastItemBlock(RouterBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.router(x)[-1]
        return dispatch(self.experts, x, idx, torch.full(idx.shape, 0.5))


def test_a_lean_router_that_returns_a_shorter_tuple_later_is_refused_with_the_librarys_error() -> None:
    model = TwoLayers(lambda: LastItemBlock(ShorterOutput()))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            for seed in range(3):
                model(_x(seed))
        assert _routers(model)[0].modes[-1] == 0  # lean by now
        with pytest.raises(mr.UnsupportedRouterError, match="other indices"), session.capture():
            for r in _routers(model):  # inside the block (one started after it establishes the decision again)
                r.short = True
            model(_x(4))


# ---------------------------------------------------------------- torch's own functions held in names, and patches
HELD_FILL = {"fill": torch.masked_fill}  # a module-level table of torch's functions, bound as it was imported
HELD_METHOD = torch.Tensor.masked_fill  # the tensor method, held in a global
helpers.held_fill = torch.masked_fill  # torch's function, kept as a helper module's attribute


def _mask_with(fill: Callable[..., torch.Tensor] = torch.masked_fill) -> Callable[[torch.Tensor], torch.Tensor]:
    def masked(probs: torch.Tensor) -> torch.Tensor:  # (torch.masked_fill as a default argument's, then a cell's)
        return fill(probs, probs < probs.mean(-1, keepdim=True), 0.0)

    return masked


def _by_default(probs: torch.Tensor, fill: Callable[..., torch.Tensor] = torch.masked_fill) -> torch.Tensor:
    return fill(probs, probs < probs.mean(-1, keepdim=True), 0.0)


_closed_fill = _mask_with()


def _below_mean(probs: torch.Tensor) -> torch.Tensor:
    return probs < probs.mean(-1, keepdim=True)


#: How a late mask reaches torch's masked_fill without the ``torch.`` name: each a body of HeldFill.decide's branch.
HELD: dict[str, Callable[[HeldFill, torch.Tensor], torch.Tensor]] = {
    "attribute": lambda self, p: self.fill(p, _below_mean(p), 0.0),
    "functools.partial attribute": lambda self, p: self.fill_zero(p, _below_mean(p)),
    "dict attribute": lambda self, p: self.ops["fill"](p, _below_mean(p), 0.0),
    "tensor method attribute": lambda self, p: self.method(p, _below_mean(p), 0.0),
    "global dict": lambda self, p: HELD_FILL["fill"](p, _below_mean(p), 0.0),
    "tensor method global": lambda self, p: HELD_METHOD(p, _below_mean(p), 0.0),
    "helper module attribute": lambda self, p: helpers.held_fill(p, _below_mean(p), 0.0),
    "default argument": lambda self, p: _by_default(p),
    "closure cell": lambda self, p: _closed_fill(p),
}


class HeldFill(SeenModes):
    """Holds torch's masked_fill in names bound before any session (``self.fill = torch.masked_fill`` in
    ``__init__``...): a lean forward's wrappers never see a call through one."""

    def __init__(self) -> None:
        super().__init__()
        self.fill = torch.masked_fill
        self.fill_zero = functools.partial(torch.masked_fill, value=0.0)
        self.ops = {"fill": torch.masked_fill}
        self.method = torch.Tensor.masked_fill


def _held_fill(how: str) -> HeldFill:
    """A router that masks the experts scored below the mean, in forwards of many tokens only, as ``HELD[how]``."""
    body = HELD[how]

    class Held(HeldFill):
        def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if probs.shape[0] > T:
                probs = body(self, probs)
            return torch.topk(probs, self.top_k, dim=-1)

    return Held()


def _forced_outside_the_mask_read_through_it(
    model: nn.Module,
    weights: list[torch.Tensor],
    seen: list[tuple[torch.Tensor, torch.Tensor]],
    mask: Callable[[torch.Tensor], torch.Tensor] = _late_mask,
) -> None:
    """Each router's replayed weights: a forced expert the late mask left out (in a row the masked top-k could not
    return itself) has its unmasked score, never the masked 0.0 (a reference computed here, not by moe_replay)."""
    read_through = 0
    for w, (x, idx), layer in zip(weights, seen, model.layers, strict=True):
        masked = mask(F.linear(x, layer.router.weight).softmax(-1))
        own = masked.gather(1, idx).sort(-1).values == masked.topk(idx.shape[1], dim=-1).values.sort(-1).values
        others = ~own.all(-1)
        assert bool((w[others] > 0).all())
        read_through += int((masked.gather(1, idx)[others] == 0).sum())
    assert read_through > 0  # (forced experts the mask excludes were read through)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", list(HELD))
def test_torchs_own_function_held_in_a_name_the_router_reaches_keeps_it_under_the_mode(how: str) -> None:
    """Once silent: a late mask through torch's masked_fill held in an attribute, a partial, a table, a default
    argument or a closure cell (bound before the session, so no wrapper) ran unseen in lean forwards, and forced
    experts the mask left out got its 0.0 as their weight. Such a name is read as a bypass: the mode."""
    model = TwoLayers(lambda: RouterBlock(_held_fill(how)))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    weights = _replayed_weights_of_a_long_forward(model, seen)
    assert [layer.router.modes[-1] for layer in model.layers] == [1, 1]  # the mode
    _forced_outside_the_mask_read_through_it(model, weights, seen)


class TakesFill(SeenModes):
    """Masks with the function its block passes it, in forwards of many tokens only."""

    def forward(self, x: torch.Tensor, fill: Callable[..., torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(len(_get_current_function_mode_stack()))
        probs = F.linear(x, self.weight).softmax(-1)
        if probs.shape[0] > T and fill is not None:
            probs = fill(probs, _below_mean(probs), 0.0)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


class PassesFill(RouterBlock):
    """Passes its router torch's masked_fill, held since before any session."""

    def __init__(self) -> None:
        super().__init__(TakesFill())
        self.fill = torch.masked_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, self.fill)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_torchs_own_function_passed_to_the_router_keeps_it_under_the_mode() -> None:
    """Once silent: the mask through a function the block passes as an argument ran unseen in lean forwards. The
    audited forward's arguments are looked at too (a function passed only to some forwards is not seen)."""
    model = TwoLayers(PassesFill)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    weights = _replayed_weights_of_a_long_forward(model, seen)
    assert [layer.router.modes[-1] for layer in model.layers] == [1, 1]  # the mode
    _forced_outside_the_mask_read_through_it(model, weights, seen)


class PassesFillLater(PassesFill):
    """Passes its router torch's masked_fill on forwards of many tokens only (the only ones it masks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, self.fill if x.shape[0] > T else None)
        return dispatch(self.experts, x, idx, w)


class PassesMethodLater(PassesFillLater):
    """Passes its router a function of its own that masks with a tensor method, on forwards of many tokens only."""

    def __init__(self) -> None:
        super().__init__()
        self.fill = lambda p, drop, value: p.masked_fill(drop, value)


class TakesModInATensorSlot(SeenModes):
    """Takes a bias tensor or a function that modifies its scores, in the same parameter."""

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor | Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(len(_get_current_function_mode_stack()))
        probs = F.linear(x, self.weight).softmax(-1)
        probs = probs + mod if isinstance(mod, torch.Tensor) else mod(probs, _below_mean(probs), 0.0)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


class PassesMethodInATensorSlot(RouterBlock):
    """Passes its router a zero bias on forwards of few tokens (the audited one among them), and a function of its
    own that masks with a tensor method in that very parameter on forwards of many tokens."""

    def __init__(self) -> None:
        super().__init__(TakesModInATensorSlot())
        self.fill = lambda p, drop, value: p.masked_fill(drop, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x, self.fill if x.shape[0] > T else x.new_zeros(()))
        return dispatch(self.experts, x, idx, w)


class SetsModPerForward(RouterBlock):
    """Sets its router's ``score_mod`` for each forward (a function that masks with a tensor method on forwards of
    many tokens, None on others) and puts None back after it."""

    def __init__(self) -> None:
        super().__init__(ReadsModAttribute())
        self.fill = lambda p, drop, value: p.masked_fill(drop, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router.score_mod = self.fill if x.shape[0] > T else None
        try:
            w, idx = self.router(x)
        finally:
            self.router.score_mod = None
        return dispatch(self.experts, x, idx, w)


class ReadsModAttribute(SeenModes):
    """Modifies its scores by the function its ``score_mod`` holds, where it holds one."""

    score_mod: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(len(_get_current_function_mode_stack()))
        probs = F.linear(x, self.weight).softmax(-1)
        if self.score_mod is not None:
            probs = self.score_mod(probs, _below_mean(probs), 0.0)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("silent replays")
def test_code_a_block_sets_on_its_router_for_one_forward_is_seen() -> None:
    """Once silent: a function set on the router for the long forward only, None again after it, was seen neither by
    the lean path (no argument) nor by the check of the code read (as blocks start and end), so its mask ran unseen.
    An attribute the router's code calls that holds None when read keeps it under the mode: exact (forced experts
    the mask leaves out read through it), or refused."""
    model = TwoLayers(SetsModPerForward)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        weights = _replayed_weights_of_a_long_forward(model, seen)
    except mr.MoEReplayError:
        return
    _forced_outside_the_mask_read_through_it(model, weights, seen)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("block", [PassesFillLater, PassesMethodLater, PassesMethodInATensorSlot])
def test_torchs_own_function_passed_to_the_router_on_later_forwards_only_is_seen(block: type[nn.Module]) -> None:
    """Once silent: the audited forward got None (or a tensor) where later ones got torch's masked_fill (or a
    function of the block's that masks with a tensor method), which is no code the audit read, and its mask ran
    unseen in lean forwards. A router whose forward takes more than one tensor now looks at each lean forward's
    arguments: one handed code (a function, a module) runs under the mode."""
    model = TwoLayers(block)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    weights = _replayed_weights_of_a_long_forward(model, seen)
    assert [layer.router.modes[-3:] for layer in model.layers] == [[0, 0, 1]] * 2  # (lean where handed none)
    _forced_outside_the_mask_read_through_it(model, weights, seen)


@pytest.mark.parametrize(("block", "looks"), [(lambda: RouterBlock(SeenModes()), False), (PassesFillLater, True)])
def test_only_a_router_whose_forward_takes_more_than_tensors_looks_at_its_arguments(
    block: Callable[[], nn.Module], looks: bool
) -> None:
    """The lean path of a router whose every parameter took a tensor in its audit reads no argument (it could be
    handed code only where it took a tensor); one handed None there looks at each forward's."""
    model = TwoLayers(block)
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(_x(1))
        model(_x(2))
        verdicts = [hook._lean[hook.mode()] for hook in session._hooks]
    assert [(v[1], v[4]) for v in verdicts] == [(True, looks)] * 2  # (lean, and whether it looks)


class HeldTopKBlock(nn.Module):
    """An MoE block with a bare linear gate (its output holds no indices to compare) that, on large inputs, decides
    with torch's top-k held as an attribute (no wrapper sees it) and then takes a top-k of the decision's very form
    for a statistic: a lean forward sees as many calls of that form as the audited one did."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Experts()
        self.top_k = 2
        self.pick = torch.topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        if x.abs().amax().item() > 100.0:  # large inputs only (none in the runs that establish the decision)
            w, idx = self.pick(probs, self.top_k, dim=-1)
            torch.topk(probs.detach(), self.top_k, dim=-1)  # (a statistic)
        else:
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        return dispatch(self.experts, x, idx, w)


@pytest.mark.reliability("silent replays")
def test_a_decision_through_a_held_top_k_beside_a_twin_is_refused_or_exact() -> None:
    """Once silent: the large input's decision ran unseen, the wrapper took the statistic's top-k of the same form
    for it and forced that one, and the experts were chosen by the current scores. Now the held name keeps the
    mode, which sees both calls."""
    model = TwoLayers(HeldTopKBlock)
    xs = [_x(1), _x(2), 200.0 * _x(3)]
    spy = ExpertSpy(model)
    outcome = "exact"
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                model(xs[0])
                model(xs[1])
                assert all(h.interception().startswith("mode") for h in session._hooks)  # the held top-k is read
                model(xs[2])
            routes = session.routes()
            perturb(model)
            with session.replay(routes):
                for f, x in enumerate(xs):
                    model(x)
                    for b, name in enumerate(session.names):
                        want = as_sets(routes.layer(name).reshape(len(xs), T, -1)[f])
                        if not torch.equal(spy.experts_of(b), want):
                            outcome = f"silent: {name}, forward {f}"
    except mr.MoEReplayError:
        outcome = "refused"
    finally:
        spy.remove()
    assert outcome in ("exact", "refused"), outcome


def _masked_everywhere(probs: torch.Tensor) -> torch.Tensor:
    return probs.masked_fill(_below_mean(probs), 0.0)


def _masked_decide(self: SeenModes, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`SeenModes.decide` with the late mask of a tensor method, in every forward."""
    return torch.topk(_masked_everywhere(probs), self.top_k, dim=-1)


def _patch_decide(model: nn.Module, where: str) -> Callable[[], None]:
    """Replace the routers' ``decide`` on each router or on their class; returns what puts it back."""
    if where == "class":
        SeenModes.decide = _masked_decide  # type: ignore[method-assign]
        return lambda: setattr(SeenModes, "decide", _SEEN_DECIDE)
    routers = _routers(model)
    for r in routers:
        r.decide = types.MethodType(_masked_decide, r)  # type: ignore[method-assign]
    return lambda: [vars(r).pop("decide") for r in routers] and None


_SEEN_DECIDE = SeenModes.decide


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("when", ["between blocks", "inside a block"])
@pytest.mark.parametrize("where", ["router", "class"])
def test_a_method_patched_after_the_audit_is_read_again_between_blocks_and_refused_inside_one(
    where: str, when: str
) -> None:
    """Once silent: a lean router's verdict held for the code as first read, so a ``decide`` patched later (on the
    router or its class) to mask with a tensor method ran unseen, and forced experts the mask left out got 0.0. The
    code read through each name is noted: a patch between blocks is read again (the mode, exact), one inside a block
    refuses it as a changed setting does."""
    model = TwoLayers(lambda: RouterBlock(SeenModes()))
    xs = [_x(1), _x(2), _x(3)]
    weights: list[torch.Tensor] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def note(m: nn.Module, a: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, torch.Tensor]) -> None:
        weights.append(out[0].detach())
        seen.append((a[0].detach(), out[1]))

    handles = [layer.router.register_forward_hook(note) for layer in model.layers]
    undo: Callable[[], None] = lambda: None  # noqa: E731
    try:
        with mr.attach(model) as session, torch.no_grad():
            with session.capture():
                for x in xs:
                    model(x)
            assert [r.modes[-1] for r in _routers(model)] == [0, 0]  # lean
            routes = session.routes()
            perturb(model)
            if when == "inside a block":
                with pytest.raises(mr.SessionStateError, match="decide"), session.replay(routes):
                    model(xs[0])
                    undo = _patch_decide(model, where)
                    model(xs[1])
                return
            undo = _patch_decide(model, where)
            weights.clear()
            seen.clear()
            with session.replay(routes):
                for x in xs:
                    model(x)
            assert [r.modes[-1] for r in _routers(model)] == [1, 1]  # the patched code is read: a tensor method
            for f in range(len(xs)):
                _forced_outside_the_mask_read_through_it(
                    model, weights[2 * f : 2 * f + 2], seen[2 * f : 2 * f + 2], _masked_everywhere
                )
    finally:
        undo()
        for h in handles:
            h.remove()
