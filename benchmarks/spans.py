"""Host time of each router call inside an eager decode step: ``python -m benchmarks.spans``.

:mod:`benchmarks.paired` gives what a variant adds to a whole step; this gives where it goes.
Every router module gets a forward pre-hook and a forward hook that read the host clock, so the
span of a call covers everything the module's ``__call__`` runs: the model's own router code, and
whatever a variant runs around it or inside it (moe_replay's interception and ring write, the
recipe's recorder). The plain model carries the same two hooks. Variants take turns in rounds
(the host of a shared machine drifts between states within a minute); per variant and round the
median span is taken, and reported is the median over rounds of each variant's span minus the
plain span of the same round, in microseconds, with the host time of a whole step.

A span measured in a running model is not the same as the same call timed alone in a loop
(:mod:`benchmarks.router_call`): between two router calls the model runs attention and experts,
and the host's caches hold their code and data, not the router's.

    python -m benchmarks.spans --device cuda --out benchmarks/results/gpu-spans.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any

import torch

import moe_replay as mr

from .harness import synchronize
from .paired import VARIANTS, _variant
from .workloads import build_model, make_workload, routers_of

__all__ = ["main", "spans"]


def spans(
    variants: list[str], device: torch.device, size: str, steps: int, rounds: int, batch: int, past: int
) -> dict[str, Any]:
    """Per variant: the router span added over the plain one, and the step's host time (medians over rounds)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, info = build_model("qwen3", size, device, dtype)
    work = make_workload("qwen3", "decode", model, info, tokens=0, batch=batch, past=past, seed=0)
    routers = routers_of(model)
    with mr.attach(model) as session, torch.no_grad():
        work.warm()
        with session.capture():
            work.prepare(1)
            work.forward()
        one = session.routes()
    routes = mr.Routes.cat([one] * steps)
    seen: list[float] = []
    began = [0.0]

    def pre(module: Any, args: Any) -> None:
        began[0] = time.perf_counter()

    def post(module: Any, args: Any, out: Any) -> None:
        seen.append(time.perf_counter() - began[0])

    def one_round(name: str) -> tuple[float, float]:
        given = routes if name == "replay" else one if name == "recipe_replay" else None
        with torch.no_grad(), _variant(name, model, work.warm, given) if name != "plain" else nullcontext():
            hooks = [r.register_forward_pre_hook(pre) for r in routers] + [
                r.register_forward_hook(post) for r in routers
            ]
            try:
                work.prepare(steps)
                seen.clear()
                host = []
                for _ in range(steps):
                    synchronize(device)
                    t0 = time.perf_counter()
                    work.forward()
                    host.append(time.perf_counter() - t0)
                    synchronize(device)
            finally:
                for h in hooks:
                    h.remove()
        return statistics.median(seen) * 1e6, statistics.median(host) * 1e3

    names = ["plain", *variants]
    per_round: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            per_round[name].append(one_round(name))
    out: dict[str, Any] = {}
    for name in names:
        added = [v[0] - p[0] for v, p in zip(per_round[name], per_round["plain"], strict=True)]
        out[name] = {
            "span_us": statistics.median(v[0] for v in per_round[name]),
            "added_us": statistics.median(added),
            "added_us_per_round": added,
            "step_host_ms": statistics.median(v[1] for v in per_round[name]),
        }
        print(f"  {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spans", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=40, help="decode steps per variant and round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-past", type=int, default=512)
    p.add_argument("--smoke", action="store_true", help="a tiny model, few steps: checks the harness, not timings")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = "gpu" if device.type == "cuda" else "cpu"
    if args.smoke:
        size, args.steps, args.rounds, args.decode_past = "smoke", 2, 1, 8
    result = {
        "meta": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "steps": args.steps,
            "rounds": args.rounds,
        },
        "spans": spans(args.variants, device, size, args.steps, args.rounds, args.decode_batch, args.decode_past),
    }
    print("| variant | router span, µs | added, µs | step (host), ms |")
    print("|---|---:|---:|---:|")
    for name, r in result["spans"].items():
        print(f"| {name} | {r['span_us']:.1f} | {r['added_us']:+.1f} | {r['step_host_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
