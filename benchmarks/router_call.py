"""Host cost of one router call: ``python -m benchmarks.router_call``.

An eager decode step is bound by the host, so what capture and replay cost there is the
Python run around each router call. This times one router module's forward alone (a
Qwen3-MoE-shaped ``TopKRouter`` of the reference model, in a tight loop) in one process,
interleaved over repetitions:

* ``plain``: the router alone; ``idle``: a session attached, neither capturing nor replaying;
* ``capture`` / ``replay``: lean forwards (the router calls ``torch.topk``);
* ``capture (mode)`` / ``replay (mode)``: the same router written with ``scores.topk``,
  which keeps the TorchFunctionMode (see docs/concepts.md, "Lean forwards").

Reported per variant: the minimum over repetitions of the mean time per call, and what it
adds to ``plain`` (microseconds). A tight loop keeps the interpreter's caches warm, so a
router call inside a model costs more; the differences between variants are what this
measures. ``--smoke`` checks the harness in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

__all__ = ["main", "run"]


class _Router(nn.Module):
    """A Qwen3-MoE router: linear, softmax, top-k (``torch.topk``), renormalise."""

    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / hidden**0.5)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float)
        w, idx = self.decide(probs)
        return w / w.sum(dim=-1, keepdim=True), idx

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(probs, self.top_k, dim=-1)


class _MethodRouter(_Router):
    """The same router deciding with ``probs.topk``: it keeps the mode."""

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return probs.topk(self.top_k, dim=-1)


class _Block(nn.Module):
    def __init__(self, router: _Router, experts: int) -> None:
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(nn.Identity() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, _ = self.gate(x)
        return w


def _per_call(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant; returns ``{"meta": ..., "us": {variant: min us per call}}``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    blocks = {
        method: _Block(router(args.hidden, args.experts, args.top_k), args.experts).to(device, dtype)
        for method, router in ((False, _Router), (True, _MethodRouter))
    }
    sessions = {method: mr.attach(block) for method, block in blocks.items()}
    calls = args.calls
    try:
        routes = {}
        with torch.no_grad():
            for method, session in sessions.items():
                with session.capture():  # establishes the decision, audits, and records one block of calls
                    for _ in range(calls + 1):
                        blocks[method].gate(x)
                routes[method] = session.routes()
            # a new session per repetition (as a trainer attaches anew), set up outside the timed calls
            variants: list[tuple[str, bool, Callable[[], AbstractContextManager[Any]]]] = [
                ("idle", False, nullcontext),
                ("capture", False, lambda: sessions[False].capture()),
                ("replay", False, lambda: sessions[False].replay(routes[False], strict=False)),
                ("capture (mode)", True, lambda: sessions[True].capture()),
                ("replay (mode)", True, lambda: sessions[True].replay(routes[True], strict=False)),
            ]
            times: dict[str, list[float]] = {"plain": [], **{name: [] for name, _, _ in variants}}
            for _ in range(args.reps):
                for session in sessions.values():
                    session.detach()
                times["plain"].append(_per_call(lambda: blocks[False].gate(x), calls, sync))
                sessions = {method: mr.attach(block) for method, block in blocks.items()}
                for name, method, context in variants:
                    router = blocks[method].gate
                    with context():
                        router(x)  # the first call of a block (a replay's first read, a capture's setup)
                        times[name].append(_per_call(lambda r=router: r(x), calls, sync))
    finally:
        for session in sessions.values():
            session.detach()
    best = {name: min(ts) for name, ts in times.items()}
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "tokens": args.tokens,
        "hidden": args.hidden,
        "experts": args.experts,
        "top_k": args.top_k,
        "calls": calls,
        "reps": args.reps,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return {"meta": meta, "us": best, "added_us": {k: v - best["plain"] for k, v in best.items()}}


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"Router call alone ({m['tokens']} tokens, hidden {m['hidden']}, E={m['experts']}, k={m['top_k']}; "
        f"{m['device']}, torch {m['torch']}, Python {m['python']}, {m['date']}; minimum over {m['reps']} "
        f"repetitions of {m['calls']} calls):",
        "",
        "| variant | us per call | added to plain |",
        "|---|---:|---:|",
    ]
    for name, us in results["us"].items():
        lines.append(f"| {name} | {us:.1f} | {results['added_us'][name]:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per call (a decode step of 64 sequences)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--calls", type=int, default=300, help="calls per timed block")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    p.add_argument("--smoke", action="store_true", help="a tiny router, a few calls: checks the harness")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.experts, args.top_k, args.calls, args.reps = 4, 16, 8, 2, 5, 2
    torch.set_num_threads(1)
    results = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
