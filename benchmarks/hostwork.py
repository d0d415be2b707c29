"""Python work added per router call of an eager decode step: ``python -m benchmarks.hostwork``.

An eager decode step is bound by the host, and on a busy host every Python frame and attribute
touched between two router calls is a cache miss again: what a variant costs there follows how
much Python it runs per router call. This counts it exactly, where timings drift: one decode
step of a small Qwen3-MoE-shaped model on the CPU runs under a trace, and for each variant the
bytecodes executed, the Python frames entered and the calls of C functions are counted, minus
those of the plain step, per router call. The counts depend on the Python version, not on the
machine or its load.

    python -m benchmarks.hostwork --out benchmarks/results/hostwork.json

``--own`` counts moe_replay's own work instead, with nothing subtracted: the bytecodes of the library's frames
and the calls of C functions those frames make (torch's state reads among them), for one decode forward under
capture and under replay and for one step of an eager greedy ``generate()`` that a capture block surrounds (two
calls of different lengths, the difference per new token), per forward and per router call:

    python -m benchmarks.hostwork --own --size cpu --layers 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

import moe_replay as mr

from .paired import EXTRA_VARIANTS, VARIANTS, _variant
from .workloads import build_model, make_workload, routers_of

__all__ = ["count", "count_own", "main"]

#: the library's source folder: a frame runs moe_replay's code where its file lies under it
_LIBRARY = os.path.dirname(os.path.abspath(mr.__file__)) + os.sep


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


def count_own(step: Callable[[], Any]) -> dict[str, Any]:
    """The bytecodes of moe_replay's frames that ``step()`` runs, the frames, and the C calls those frames make (each
    C function's count under ``by_c_call``, named ``module.name``)."""
    n: collections.Counter[str] = collections.Counter()
    named: collections.Counter[str] = collections.Counter()

    def opcodes(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            n["bytecodes"] += 1
        return opcodes

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(_LIBRARY):
            return None  # (another library's frame, the model's, torch's: not counted, nor its lines)
        n["frames"] += 1
        frame.f_trace_opcodes = True
        return opcodes

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and frame.f_code.co_filename.startswith(_LIBRARY):
            n["c_calls"] += 1
            owner = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__name__
            named[f"{owner}.{getattr(arg, '__name__', '?')}"] += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return {**{k: n[k] for k in ("bytecodes", "frames", "c_calls")}, "by_c_call": dict(named.most_common())}


def _own(size: str, layers: int | None) -> dict[str, Any]:
    """:func:`count_own` for a decode forward (capture, replay) and a ``generate()`` step of the Qwen3-MoE shape."""
    torch.manual_seed(0)
    model, info = build_model("qwen3", size, torch.device("cpu"), torch.float32, layers=layers)
    work = make_workload("qwen3", "decode", model, info, tokens=0, batch=4, past=8, seed=0)
    routers = len(routers_of(model))
    out: dict[str, Any] = {"meta": {"python": sys.version.split()[0], "torch": torch.__version__, **info}}
    with torch.no_grad(), mr.attach(model) as session:
        work.warm()
        with session.capture():
            work.prepare(1)
            work.forward()
        routes = mr.Routes.cat([session.routes()] * 3)
        for name, block in (("capture", session.capture), ("replay", lambda: session.replay(routes))):
            with block():
                work.prepare(3)
                for _ in range(2):  # the first steps of a state audit and learn what the later ones reuse
                    work.forward()
                out[name] = count_own(work.forward)
        ids = torch.randint(2, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))

        def generate(new: int) -> Callable[[], Any]:
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)

            def run() -> Any:
                with session.capture(expected_tokens=mr.generation_capacity(*ids.shape, new)):
                    return model.generate(ids, pad_token_id=0, **kwargs)

            run()
            return run

        short, long = count_own(generate(4)), count_own(generate(8))
        out["generate_step"] = {k: (long[k] - short[k]) / 4 for k in ("bytecodes", "frames", "c_calls")}
    for name in ("capture", "replay", "generate_step"):
        out[name]["per_router_call"] = {k: out[name][k] / routers for k in ("bytecodes", "frames", "c_calls")}
    out["meta"]["routers"] = routers
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostwork", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS + EXTRA_VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--size", default="smoke", choices=["smoke", "cpu"], help="model shape (counts barely depend on it)")
    p.add_argument("--layers", type=int, default=None, help="number of MoE layers (default: the size's own)")
    p.add_argument("--out", default=None, help="write the counts to this JSON file")
    p.add_argument("--own", action="store_true", help="count moe_replay's own frames and C calls, per forward")
    args = p.parse_args(argv)
    if args.own:
        own = _own(args.size, args.layers)
        rows = ["| workload | bytecodes | frames | C calls | per router call: bytecodes | C calls |"]
        rows.append("|---|" + "---:|" * 5)
        for name in ("capture", "replay", "generate_step"):
            v, r = own[name], own[name]["per_router_call"]
            rows.append(
                f"| {name} | {v['bytecodes']:.0f} | {v['frames']:.0f} | {v['c_calls']:.0f} "
                f"| {r['bytecodes']:.1f} | {r['c_calls']:.1f} |"
            )
        print(f"moe_replay's own work, {own['meta']['routers']} routers, python {own['meta']['python']}:")
        print("\n".join(rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(own, f, indent=1)
        return 0
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
