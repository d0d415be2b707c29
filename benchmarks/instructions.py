"""Machine instructions a router call costs, counted by callgrind: ``python -m benchmarks.instructions``.

:mod:`benchmarks.hostwork` counts Python bytecodes; what the interpreter and torch's bindings do
in C for each of them (a dict of thousands of names searched, a lock taken, a tuple built and
freed) it cannot see. This counts every machine instruction instead: the router of
:mod:`benchmarks.router_call` (Qwen3-MoE routing: linear, softmax, ``torch.topk``, renormalise;
64 tokens, hidden 64, 128 experts, top-8) called ``--calls`` times on the CPU under valgrind's
callgrind, which counts only inside those calls (they run through ``itertools.starmap``, named
to it as the function to count in). The count is exact and does not depend on the machine's load;
it changes with the Python and torch builds. Reported per variant: instructions per call, and what
the variant adds to the plain call. ``--cache-sim`` adds simulated first-level cache misses
(instruction and data), much slower.

    python -m benchmarks.instructions --out benchmarks/results/instructions.json

Needs ``valgrind`` on the PATH; each variant takes a couple of minutes (the interpreter starts
under it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import moe_replay as mr

from .router_call import _Block, _Router

__all__ = ["VARIANTS", "collected", "main", "run_calls"]

#: Variants counted: the router alone, and capturing and replaying lean forwards of it.
VARIANTS = ("plain", "capture", "replay")
_EVENTS = ("Ir", "I1mr", "D1mr", "D1mw")


def run_calls(variant: str, calls: int) -> None:
    """Call the router ``calls`` times in ``variant`` through ``itertools.starmap`` (what callgrind counts)."""
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    block = _Block(_Router(64, 128, 8), 128)
    with torch.no_grad():
        session = mr.attach(block) if variant != "plain" else None
        try:
            if session is not None:
                with session.capture():  # establishes the decision, audits, and records rows for the replay
                    for _ in range(calls + 4):
                        block.gate(x)
                routes = session.routes()
                state = session.capture() if variant == "capture" else session.replay(routes, strict=False)
                with state:
                    for _ in range(3):  # the block's first calls (a replay's first read, a capture's set-up)
                        block.gate(x)
                    list(itertools.starmap(block.gate, [(x,)] * calls))
            else:
                for _ in range(3):
                    block.gate(x)
                list(itertools.starmap(block.gate, [(x,)] * calls))
        finally:
            if session is not None:
                session.detach()


def collected(text: str) -> dict[str, int]:
    """The events counted, from a callgrind output file (its ``events:`` and ``totals:`` lines)."""
    names = re.search(r"^events:\s*(.+)$", text, re.MULTILINE)
    totals = re.search(r"^(?:totals|summary):\s*([\d ]+)$", text, re.MULTILINE)
    if names is None or totals is None:
        raise RuntimeError(f"no 'events:' and 'totals:' lines in callgrind's output:\n{text[-2000:]}")
    return dict(zip(names.group(1).split(), (int(c) for c in totals.group(1).split()), strict=False))


def _count(variant: str, calls: int, cache_sim: bool) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=starmap_next",
            "--collect-atstart=no",
            f"--cache-sim={'yes' if cache_sim else 'no'}",
            f"--callgrind-out-file={os.path.join(tmp, 'out')}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            variant,
            "--calls",
            str(calls),
        ]
        env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} under callgrind failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(tmp, "out")) as f:
            events = f.read()
    return collected(events)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10, help="router calls counted per variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cache-sim", action="store_true", help="also simulate first-level cache misses (slower)")
    p.add_argument("--out", default=None, help="write the counts to this JSON file")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # the process callgrind runs
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        run_calls(args.child, args.calls)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not on the PATH: install it to count instructions", file=sys.stderr)
        return 2
    variants = ["plain", *(v for v in args.variants if v != "plain")]
    per_call: dict[str, dict[str, float]] = {}
    for v in variants:
        counts = _count(v, args.calls, args.cache_sim)
        per_call[v] = {k: counts[k] / args.calls for k in _EVENTS if k in counts}
        print(f"  {v}: {per_call[v]}", file=sys.stderr, flush=True)
    added = {v: {k: c - per_call["plain"][k] for k, c in ev.items()} for v, ev in per_call.items()}
    shown = [k for k in _EVENTS if k in per_call["plain"]]
    lines = [
        "| variant | " + " | ".join(f"{k} per call | {k} added" for k in shown) + " |",
        "|---" + "|---:" * (2 * len(shown)) + "|",
    ]
    for v in variants:
        cells = " | ".join(f"{per_call[v][k]:,.0f} | {added[v][k]:+,.0f}" for k in shown)
        lines.append(f"| {v} | {cells} |")
    print("\n".join(lines))
    if args.out:
        meta = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "calls": args.calls,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "per_call": per_call, "added": added}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
