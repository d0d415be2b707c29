"""Interleaved timing, the variants of one workload, correctness checks and profiles.

Every variant of a workload is timed in the same process, round-robin: each repetition
runs every variant once (in a rotated order), each for ``inner`` forwards between two
device synchronisations. Setting a variant up (attach, enter a capture...) and tearing it
down (leave the context, read routes back, detach) is outside the timed region. Reported:
the median time per forward and, for the ratio, the median over repetitions of the
variant's time divided by the plain forward's time of the same repetition (paired, so
drift between repetitions cancels).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

import moe_replay as mr
from moe_replay import _triton

from .baselines import NaiveHook, RecipeRouting
from .workloads import Workload

__all__ = [
    "Variant",
    "check_workload",
    "eager_variants",
    "kernels_active",
    "profile_variants",
    "summarise",
    "time_variants",
    "torch_ops",
]


@dataclass
class Variant:
    """A way of running the forward: ``context`` sets it up, ``step`` is one timed forward."""

    name: str
    context: Callable[[], AbstractContextManager[Any]]
    step: Callable[[], Any]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    variants: Sequence[Variant],
    *,
    device: torch.device,
    reps: int,
    inner: int,
    warmup: int = 1,
    prepare: Callable[[int], None] = lambda n: None,
    progress: Callable[[str], None] = lambda s: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds per forward of each variant, one entry per repetition (warm-up dropped).

    ``clock`` is wall time by default; ``time.process_time`` (CPU time of this process)
    keeps single-threaded CPU figures honest on a machine shared with other work.
    """
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(warmup + reps):
        shift = rep % len(variants)
        for v in list(variants[shift:]) + list(variants[:shift]):
            prepare(inner)
            with v.context():
                synchronize(device)
                t0 = clock()
                for _ in range(inner):
                    v.step()
                synchronize(device)
                dt = (clock() - t0) / inner
            if rep >= warmup:
                times[v.name].append(dt * 1e3)
        progress(f"rep {rep + 1}/{warmup + reps}")
    return times


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """Median ms per forward and paired ratios against ``baseline`` (median, quartiles)."""
    base = times[baseline]
    out: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        out[name] = {
            "median_ms": statistics.median(ts),
            "ratio": statistics.median(ratios),
            "ratio_q1": _quantile(ratios, 0.25),
            "ratio_q3": _quantile(ratios, 0.75),
            "times_ms": [round(t, 4) for t in ts],
        }
    return out


# ----------------------------------------------------------------------------- variants
@contextlib.contextmanager
def _attached(w: Workload, capacity: int) -> Iterator[mr.Session]:
    """A session on the workload's model, warmed up: one untimed eager forward, at which every router
    establishes its decision (a one-off cost of each new session, kept out of the timed block)."""
    with mr.attach(w.model, capacity=capacity) as session:
        w.warm()
        yield session


@contextlib.contextmanager
def _capturing(w: Workload, capacity: int) -> Iterator[mr.Session]:
    with _attached(w, capacity) as session, session.capture():
        yield session


@contextlib.contextmanager
def _replaying(w: Workload, capacity: int, routes: mr.Routes) -> Iterator[mr.Session]:
    with _attached(w, capacity) as session, session.replay(routes):
        yield session


@contextlib.contextmanager
def _recipe(routers: list[torch.nn.Module], forced: list[torch.Tensor] | None) -> Iterator[RecipeRouting]:
    recipe = RecipeRouting(routers).install(record=forced is None)
    recipe.force(forced)
    try:
        yield recipe
    finally:
        recipe.uninstall()


@contextlib.contextmanager
def _naive(routers: list[torch.nn.Module]) -> Iterator[NaiveHook]:
    hook = NaiveHook(routers).install()
    try:
        yield hook
    finally:
        hook.uninstall()


@contextlib.contextmanager
def torch_ops(inner: AbstractContextManager[Any]) -> Iterator[Any]:
    """``inner`` with the ring's Triton kernels switched off (the torch-op path, for comparison)."""
    with _triton.disabled(), inner as value:
        yield value


def kernels_active(device: torch.device) -> bool:
    """Does moe_replay use its Triton kernels on this device?"""
    return _triton.enabled(torch.empty(0, device=device))


@contextlib.contextmanager
def _capturing_without_ring(w: Workload, capacity: int) -> Iterator[mr.Session]:
    """A capture whose ring writes do nothing: what the interception itself costs (a diagnostic)."""
    with _capturing(w, capacity) as session:
        for h in session._hooks:
            if h.capture_ring is not None:
                h.capture_ring.write = lambda idx: None  # type: ignore[method-assign]
                h.capture_ring.write_eager = lambda idx: None  # type: ignore[method-assign]
        yield session


def eager_variants(
    w: Workload, inner: int, routes: mr.Routes, recipe_forced: list[torch.Tensor] | None, diagnose: bool = False
) -> list[Variant]:
    """The variants of one workload: plain, moe_replay idle/capture/replay, recipe, naive hook.

    ``routes`` and ``recipe_forced`` are the routes of one forward (the same input every time).
    Where the ring runs Triton kernels (CUDA), ``capture_torch`` / ``replay_torch`` time
    the torch-op path too. Without ``recipe_forced`` the recipe and the naive hook are left
    out (they do not fit these routers). ``diagnose`` adds ``capture_noring``: capture with the ring write
    skipped, which splits capture's cost into interception (Python) and ring write.
    """
    capacity = w.tokens * inner
    routes_inner = mr.Routes.cat([routes] * inner)
    routers = w.routers
    step = w.forward
    variants = [
        Variant("plain", nullcontext, step),
        Variant("idle", lambda: _attached(w, capacity), step),
        Variant("capture", lambda: _capturing(w, capacity), step),
        Variant("replay", lambda: _replaying(w, capacity, routes_inner), step),
    ]
    if recipe_forced is not None:
        variants += [
            Variant("recipe_capture", lambda: _recipe(routers, None), step),
            Variant("recipe_replay", lambda: _recipe(routers, recipe_forced), step),
            Variant("naive_capture", lambda: _naive(routers), step),
        ]
    if kernels_active(next(w.model.parameters()).device):
        variants += [
            Variant("capture_torch", lambda: torch_ops(_capturing(w, capacity)), step),
            Variant("replay_torch", lambda: torch_ops(_replaying(w, capacity, routes_inner)), step),
        ]
    if diagnose:
        variants.append(Variant("capture_noring", lambda: _capturing_without_ring(w, capacity), step))
    return variants


# ----------------------------------------------------------------------------- checks
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _index_output(out: Any) -> torch.Tensor | None:
    """The expert indices in a router's output: its first integer tensor."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)


@contextlib.contextmanager
def _router_outputs(routers: list[torch.nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """The indices each router returned, per call, gathered by forward hooks (a check, never timed)."""
    seen: list[list[torch.Tensor]] = [[] for _ in routers]

    def hook(i: int) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: Any, out: Any) -> None:
            idx = _index_output(out)
            if idx is not None:
                seen[i].append(idx.detach().clone())

        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _check_baselines(
    w: Workload, rows: list[torch.Tensor], captured: torch.Tensor
) -> tuple[list[torch.Tensor], dict, dict]:
    """The recipe and the naive hook, once each: their rows, checks and bytes per token."""
    with _recipe(w.routers, None) as recipe:
        w.prepare(1)
        recipe_plain = w.forward().clone()
        recipe_rows = recipe.per_router()
        recipe_bytes = recipe.nbytes() / w.tokens
    with _recipe(w.routers, recipe_rows):
        w.prepare(1)
        recipe_replayed = w.forward().clone()
    with _naive(w.routers) as naive:
        w.prepare(1)
        w.forward()
        naive_rows = naive.per_router()
        naive_bytes = naive.nbytes() / w.tokens
    checks = {
        "recipe_output_max_diff": _max_diff(recipe_plain, captured),
        "recipe_replay_output_max_diff": _max_diff(recipe_replayed, recipe_plain),
        "recipe_indices_equal": all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(rows, recipe_rows, strict=True)),
        "naive_indices_equal": all(
            torch.equal(a.cpu(), b.reshape(a.shape)) for a, b in zip(rows, naive_rows, strict=True)
        ),
    }
    return recipe_rows, checks, {"recipe": recipe_bytes, "naive": naive_bytes}


@torch.no_grad()
def check_workload(w: Workload) -> tuple[mr.Routes, list[torch.Tensor] | None, dict[str, Any], dict[str, float]]:
    """Run each approach once; check they record the same experts and replay reproduces the forward.

    Exact checks (the same forward): moe_replay's captured rows are the indices each router
    returned in the captured forward; replaying them reproduces the captured output (the
    recipe: its replay, its own capture). Between separate forwards (plain and its rerun,
    plain and capture, moe_replay and the recipe or the naive hook) a GPU forward may differ
    by run-to-run noise (atomics, near-tied scores); those are reported, not asserted.

    Returns the routes of one forward, the recipe's forced indices (None when the recipe
    does not fit these routers: ``checks["baselines_error"]`` says why), the checks and
    the bytes stored per token by each approach (every router, all k indices).
    """
    w.prepare(2)
    plain = w.forward().clone()
    rerun = w.forward().clone()  # run-to-run noise of the plain forward (atomics in some kernels)
    with _attached(w, w.tokens) as session:
        with session.capture(), _router_outputs(w.routers) as returned:
            w.prepare(1)
            captured = w.forward().clone()
        routes = session.routes()
        ours = sum(h.capture_ring.buf.nbytes for h in session._hooks if h.capture_ring is not None) / w.tokens
        with session.replay(routes):
            w.prepare(1)
            replayed = w.forward().clone()
    rows = [r.long().to(plain.device) for r in routes.per_layer()]
    checks: dict[str, Any] = {
        "plain_rerun_max_diff": _max_diff(rerun, plain),
        "capture_output_max_diff": _max_diff(captured, plain),
        "replay_output_max_diff": _max_diff(replayed, captured),
        "routes_tokens": routes.num_tokens,
        "captured_rows_are_router_outputs": all(
            len(seen) == 1 and torch.equal(r, seen[0].long().reshape(r.shape))
            for r, seen in zip(rows, returned, strict=True)
        ),
    }
    nbytes: dict[str, Any] = {"moe_replay": ours}
    try:  # the recipe is written for (logits, weights, indices) routers; time moe_replay regardless
        recipe_rows, more, more_bytes = _check_baselines(w, rows, captured)
    except Exception as e:
        checks["baselines_error"] = f"{type(e).__name__}: {e}"
        return routes, None, checks, nbytes
    checks.update(more)
    nbytes.update(more_bytes)
    return routes, recipe_rows, checks, nbytes


# ----------------------------------------------------------------------------- profiles
def profile_variants(
    variants: Sequence[Variant], *, device: torch.device, forwards: int, prepare: Callable[[int], None], top: int = 12
) -> dict[str, Any]:
    """Per-forward op and kernel counts of each variant, and the ops whose counts differ from the first.

    Runs exactly ``forwards`` forwards per variant (what a replay variant's routes cover):
    the first warms up, the others are profiled. The difference between a variant's wall
    time and its operators' self time is Python.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    warm = 1 if forwards > 1 else 0
    forwards -= warm
    per: dict[str, dict[str, Any]] = {}
    for v in variants:
        prepare(forwards + warm)
        with v.context():
            for _ in range(warm):
                v.step()
            synchronize(device)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(forwards):
                    v.step()
                synchronize(device)
                wall = (time.perf_counter() - t0) / forwards
        ops: dict[str, tuple[float, float]] = {}
        kernels = 0
        device_us = 0.0
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                ops[e.key] = (e.count / forwards, e.self_cpu_time_total / forwards)
        for e in prof.events():
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                kernels += 1
                device_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
        per[v.name] = {
            "wall_us": wall * 1e6,
            "aten_ops": sum(c for c, _ in ops.values()),
            "aten_self_us": sum(t for _, t in ops.values()),
            "kernels": kernels / forwards,
            "kernel_us": device_us / forwards,
            "_ops": ops,
        }
    base = per[variants[0].name]["_ops"]
    for name, p in per.items():
        ops = p.pop("_ops")
        if name == variants[0].name:
            continue
        diff = []
        for key in set(ops) | set(base):
            c, t = ops.get(key, (0.0, 0.0))
            c0, t0 = base.get(key, (0.0, 0.0))
            if abs(c - c0) > 1e-9:
                diff.append((key, round(c - c0, 2), round(t - t0, 1)))
        diff.sort(key=lambda d: -abs(d[2]))
        p["extra_ops"] = diff[:top]
    return per
