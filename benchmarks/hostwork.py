"""Python work added per router call of an eager decode step: ``python -m benchmarks.hostwork``.

An eager decode step is bound by the host, and on a busy host every Python frame and attribute
touched between two router calls is a cache miss again: what a variant costs there follows how
much Python it runs per router call. This counts it exactly, where timings drift: one decode
step of a small Qwen3-MoE-shaped model on the CPU runs under a trace, and for each variant the
bytecodes executed, the Python frames entered and the calls of C functions are counted, minus
those of the plain step, per router call. The counts depend on the Python version, not on the
machine or its load.

    python -m benchmarks.hostwork --out benchmarks/results/hostwork.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

import moe_replay as mr

from .paired import EXTRA_VARIANTS, VARIANTS, _variant
from .workloads import build_model, make_workload, routers_of

__all__ = ["count", "main"]


def count(step: Callable[[], Any]) -> dict[str, int]:
    """Bytecodes, Python frames and C calls that ``step()`` runs, traced (``sys.settrace``, ``sys.setprofile``)."""
    n: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            n["bytecodes"] += 1
        elif event == "call":
            n["frames"] += 1
        return trace

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            n["c_calls"] += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return {k: n[k] for k in ("bytecodes", "frames", "c_calls")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostwork", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS + EXTRA_VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--size", default="smoke", choices=["smoke", "cpu"], help="model shape (counts barely depend on it)")
    p.add_argument("--layers", type=int, default=None, help="number of MoE layers (default: the size's own)")
    p.add_argument("--out", default=None, help="write the counts to this JSON file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, info = build_model("qwen3", args.size, torch.device("cpu"), torch.float32, layers=args.layers)
    work = make_workload("qwen3", "decode", model, info, tokens=0, batch=4, past=8, seed=0)
    routers = len(routers_of(model))
    with torch.no_grad():
        work.warm()
        with mr.attach(model) as session:
            work.warm()
            with session.capture():
                work.prepare(1)
                work.forward()
            one = session.routes()
        routes = mr.Routes.cat([one] * 4)

        def counted(ctx: AbstractContextManager[Any]) -> dict[str, int]:
            with ctx:
                work.prepare(3)
                for _ in range(2):  # the first steps of a state audit and learn what the later ones reuse
                    work.forward()
                return count(work.forward)

        plain = counted(nullcontext())
        out: dict[str, Any] = {"meta": {"python": sys.version.split()[0], "torch": torch.__version__, **info}}
        for name in args.variants:
            given = routes if name == "replay" else one if name == "recipe_replay" else None
            got = counted(_variant(name, model, work.warm, given))
            out[name] = {k: (got[k] - plain[k]) / routers for k in plain}
    lines = ["| variant | bytecodes | Python frames | C calls |", "|---|---:|---:|---:|"]
    lines += [
        f"| {v} | {out[v]['bytecodes']:+.0f} | {out[v]['frames']:+.0f} | {out[v]['c_calls']:+.0f} |"
        for v in args.variants
    ]
    print(f"Python work added per router call, python {out['meta']['python']}:\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
