"""Eager decode and ``generate()`` overhead from paired steps of two identical models: ``python -m benchmarks.paired``.

On a shared GPU machine the host of an eager decode step drifts between states (the plain
step took 12 ms and 19 ms within one minute here), slower than one step but faster than a
repetition of :mod:`benchmarks.run`, which times every variant in turn. This benchmark pairs
steps instead: two copies of one model with the same weights, one running a variant
(capture, replay, the HF recipe...) and one plain, take turns step by step, each step timed
alone (synchronised before and after); the ratio of each pair is taken, so drift that lasts
longer than two steps cancels. The two models then swap roles, so that a difference between
the copies themselves cancels too. Reported per variant: the median of the pair ratios and
their quartiles, over both role assignments.

``generate()`` is paired the same way, one whole call per model per pair.

    python -m benchmarks.paired --device cuda --out benchmarks/results/gpu-paired.json

``--variants wrap`` pairs one plain Python layer around each router's forward (no moe_replay): the
floor of any interception that runs Python at every router call.

``--smoke`` runs tiny models on the CPU in seconds (checks the harness, not timings).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from typing import Any
from unittest import mock

import torch
from torch import nn

import moe_replay as mr
from moe_replay import _lean
from moe_replay.ring import CaptureRing

from . import unchecked
from .baselines import RecipeRouting
from .harness import _quantile, synchronize
from .workloads import Workload, build_model, make_workload, routers_of

__all__ = ["main", "paired_ratios"]

#: Decode pairs per batch of prepared caches (each step gets a fresh KV cache, built untimed).
_CHUNK = 10

#: The variants paired against the plain model by default.
VARIANTS = ("idle", "capture", "replay", "recipe_capture", "recipe_replay")
#: Also on request (``--variants``): ``wrap``, each router's forward behind one plain Python function that
#: calls it, the floor of any interception that runs Python at every router call; and ``capture_nocopy``, a
#: diagnostic: capture with the copy into the ring taken out (the rows are counted, not recorded: its routes
#: are void), which splits what capture costs between the interception and the copy; and ``capture_held``, a
#: diagnostic: capture with the lean wrappers put in once around each model forward (not at each router call),
#: what holding them for a step would save; and ``copy_floor``, no moe_replay: ``torch.topk`` wrapped in one
#: Python function that copies its indices into a buffer, the floor of any capture that records the decision
#: at the call; and the diagnostics of :mod:`benchmarks.unchecked` (capture with its checks or its per-forward
#: work taken out). Not modes of the library.
EXTRA_VARIANTS = ("wrap", "capture_nocopy", "capture_held", "copy_floor", *unchecked.NAMES)


def _count_only(ring: CaptureRing, idx: torch.Tensor) -> None:
    """``CaptureRing.write_eager`` without the copy: the host and device counts move, no row is written."""
    if ring._host + idx.shape[0] > ring._end:
        ring._grow(ring._host + idx.shape[0] - ring._end)
    ring._host += idx.shape[0]
    ring._lag += idx.shape[0]


def _time(device: torch.device, fn: Callable[[], Any]) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def paired_ratios(
    device: torch.device,
    steps: int,
    run_variant: Callable[[], Any],
    run_plain: Callable[[], Any],
    plain_times: list[float] | None = None,
) -> list[float]:
    """``steps`` pairs, the variant first in every other pair: the variant's time over the plain time of each.

    ``plain_times``, if given, gets the plain run's seconds of each pair (what a ratio's points are worth).
    """
    out = []
    for i in range(steps):
        if i % 2 == 0:
            a = _time(device, run_variant)
            b = _time(device, run_plain)
        else:
            b = _time(device, run_plain)
            a = _time(device, run_variant)
        out.append(a / b)
        if plain_times is not None:
            plain_times.append(b)
    return out


@contextlib.contextmanager
def _variant(name: str, model: nn.Module, warm: Callable[[], Any], routes: mr.Routes | None) -> Iterator[None]:
    """``model`` set up to run ``name`` (a session warmed up by one untimed forward, or the recipe).

    ``routes``: for ``replay``, the routes of every step to come; for ``recipe_replay``, those of one step
    (the recipe forces the same indices at every forward).
    """
    if name == "wrap":
        routers = routers_of(model)
        for r in routers:
            r.forward = _wrapped(r.forward)
        try:
            yield
        finally:
            for r in routers:
                del r.forward
        return
    if name.startswith("recipe"):
        recipe = RecipeRouting(routers_of(model)).install(record=name == "recipe_capture")
        if name == "recipe_replay":
            assert routes is not None
            recipe.force([t.long().to(next(model.parameters()).device) for t in routes.per_layer()])
        try:
            yield
        finally:
            recipe.uninstall()
        return
    if name == "capture_nocopy":
        with mock.patch.object(CaptureRing, "write_eager", _count_only), mr.attach(model) as session:
            warm()
            with session.capture():
                yield
        return
    if name == "copy_floor":
        model.forward = _copy_floor(model.forward)
        try:
            yield
        finally:
            del model.forward
        return
    if name in unchecked.NAMES:
        with mr.attach(model) as session:
            warm()
            with session.capture(), unchecked.patched(name):
                yield
        return
    if name == "capture_held":
        with mr.attach(model) as session:
            warm()
            watched = model.__dict__["forward"]  # the session's own (it watches the forwards entering the model)
            model.forward = _held(watched)
            try:
                with session.capture():
                    yield
            finally:
                model.forward = watched  # put back, so that detach finds its forward where it left it
        return
    with mr.attach(model) as session:
        warm()
        state: AbstractContextManager[Any] = nullcontext()
        if name == "capture":
            state = session.capture()
        elif name == "replay":
            assert routes is not None
            state = session.replay(routes, strict=False)
        with state:
            yield


def _held(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` with the lean wrappers put in before it and taken out after it (once per model forward)."""

    def held(*args: Any, **kwargs: Any) -> Any:
        _lean.enter()
        try:
            return forward(*args, **kwargs)
        finally:
            _lean.leave()

    return held


def _copy_floor(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` with ``torch.topk`` wrapped for its duration: the native top-k, its indices copied into a buffer.

    The least an exact capture does at a router call (one Python layer around the decision and one copy of
    its indices, made at the call), with no session, no check and no cursor on the device: a floor.
    """
    orig = torch.topk
    views: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    count = [0]

    def topk(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        idx = out[1]
        key = (idx.shape, idx.device)
        slots = views.get(key)
        if slots is None:
            slots = views[key] = list(torch.empty(64, *idx.shape, dtype=torch.uint8, device=idx.device).unbind(0))
        i = count[0]
        slots[i & 63].copy_(idx)
        count[0] = i + 1
        return out

    def floor(*args: Any, **kwargs: Any) -> Any:
        torch.topk = topk
        try:
            return forward(*args, **kwargs)
        finally:
            torch.topk = orig

    return floor


def _wrapped(forward: Callable[..., Any]) -> Callable[..., Any]:
    def wrap(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    return wrap


def _decode(models: list[nn.Module], info: dict[str, Any], batch: int, past: int) -> list[Workload]:
    return [make_workload("qwen3", "decode", m, info, tokens=0, batch=batch, past=past, seed=0) for m in models]


def bench_decode(models: list[nn.Module], info: dict[str, Any], device: torch.device, args: argparse.Namespace) -> dict:
    """Pair decode steps of each variant against the plain model, both role assignments."""
    work = _decode(models, info, args.decode_batch, args.decode_past)
    with mr.attach(models[0]) as s, torch.no_grad():
        work[0].warm()
        with s.capture():
            work[0].prepare(1)
            work[0].forward()
        one = s.routes()
    routes = mr.Routes.cat([one] * args.steps)
    out: dict[str, Any] = {}
    for name in args.variants:
        ratios: list[float] = []
        plain_times: list[float] = []
        for v in (0, 1):  # which copy runs the variant
            wv, wp = work[v], work[1 - v]
            with torch.no_grad():
                fits = True
                try:
                    given = routes if name == "replay" else one if name == "recipe_replay" else None
                    ctx = _variant(name, wv.model, wv.warm, given)
                    with ctx:
                        wp.warm()
                        for done in range(0, args.steps, _CHUNK):  # a decode step mutates its cache: fresh ones
                            n = min(_CHUNK, args.steps - done)
                            wv.prepare(n)
                            wp.prepare(n)
                            ratios += paired_ratios(device, n, wv.forward, wp.forward, plain_times)
                except Exception as e:  # the recipe fits (logits, weights, indices) routers only
                    if not name.startswith("recipe"):
                        raise
                    out[name] = {"error": f"{type(e).__name__}: {e}"}
                    fits = False
            if not fits:
                break
        if ratios:
            out[name] = _summary(ratios, plain_times)
        print(f"  decode {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def bench_generate(models: list[nn.Module], device: torch.device, args: argparse.Namespace) -> dict:
    """Pair whole eager greedy ``generate()`` calls, capturing against plain, both role assignments."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.generate_batch, args.generate_prompt)
    ids = torch.randint(2, models[0].config.vocab_size, shape, device=device, generator=g)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.generate_new,
        min_new_tokens=args.generate_new,
        do_sample=False,
        pad_token_id=0,
    )
    expected = mr.generation_capacity(args.generate_batch, args.generate_prompt, args.generate_new)
    out: dict[str, Any] = {}
    for name in ("capture", "recipe_capture"):
        ratios: list[float] = []
        plain_times: list[float] = []
        for v in (0, 1):
            mv, mp = models[v], models[1 - v]

            def plain(m: nn.Module = mp) -> Any:
                return m.generate(ids, **kwargs)

            if name == "capture":
                with mr.attach(mv, capacity=expected) as session:
                    mv(input_ids=ids[:, :2], use_cache=False, logits_to_keep=1)  # establish the decisions

                    def variant(m: nn.Module = mv, s: mr.Session = session) -> Any:
                        with s.capture(expected_tokens=expected):
                            return m.generate(ids, **kwargs)

                    plain()
                    ratios += paired_ratios(device, args.generate_pairs, variant, plain, plain_times)
            else:
                recipe = RecipeRouting(routers_of(mv)).install(record=True)
                try:

                    def variant(m: nn.Module = mv, r: RecipeRouting = recipe) -> Any:
                        r.recorded.clear()
                        return m.generate(ids, **kwargs)

                    plain()
                    ratios += paired_ratios(device, args.generate_pairs, variant, plain, plain_times)
                finally:
                    recipe.uninstall()
        out[name] = _summary(ratios, plain_times)
        print(f"  generate {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def _summary(ratios: list[float], plain_times: list[float]) -> dict[str, Any]:
    return {
        "ratio": statistics.median(ratios),
        "q1": _quantile(ratios, 0.25),
        "q3": _quantile(ratios, 0.75),
        "pairs": len(ratios),
        "plain_ms": 1000 * statistics.median(plain_times),
    }


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return "—"
    return f"{r['ratio']:.3f}x ({r['q1']:.3f}–{r['q3']:.3f}), {r['pairs']} pairs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=150, help="decode pairs per variant and role assignment")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-past", type=int, default=512)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--generate-pairs", type=int, default=10, help="generate() pairs per role assignment (0: none)")
    p.add_argument("--generate-batch", type=int, default=32)
    p.add_argument("--generate-prompt", type=int, default=64)
    p.add_argument("--generate-new", type=int, default=48)
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS + EXTRA_VARIANTS,
        help="decode variants to pair against the plain model (wrap: one plain Python layer per router)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, few pairs: checks the harness, not timings")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = "gpu" if device.type == "cuda" else "cpu"
    if args.smoke:
        size, args.steps, args.generate_pairs = "smoke", 2, 1
        args.decode_past, args.generate_batch, args.generate_prompt, args.generate_new = 8, 2, 4, 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    first, info = build_model("qwen3", size, device, dtype, layers=args.layers)
    models = [first, copy.deepcopy(first)]
    result: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": info,
            "steps": args.steps,
            "generate_pairs": args.generate_pairs,
        },
        "decode": bench_decode(models, info, device, args),
    }
    if args.generate_pairs:
        result["generate"] = bench_generate(models, device, args)
    shown = args.variants
    lines = [f"| workload | {' | '.join(shown)} |", "|---" * (len(shown) + 1) + "|"]
    lines.append(
        f"| decode {args.decode_batch}x1, past {args.decode_past} | "
        + " | ".join(_fmt(result["decode"][v]) for v in shown)
        + " |"
    )
    if "generate" in result:
        gen = result["generate"]
        cells = [_fmt(gen[v]) if v in gen else "—" for v in shown]
        lines.append(
            f"| generate() {args.generate_batch} x ({args.generate_prompt} + {args.generate_new}) | "
            + " | ".join(cells)
            + " |"
        )
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
