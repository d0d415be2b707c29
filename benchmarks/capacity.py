"""What growing capture rings cost: a capture that grows against one into a preallocated ring.

Two levels, each timed round-robin in one process (rotated order every repetition) with
the paired-ratio method of :mod:`benchmarks.harness`:

* **ring write**: ``CaptureRing.write`` alone, for a decode-sized and a prefill-sized call
  (rows per call x k of the reference model), 512 and 64 calls per timed block (a rollout's
  decode steps, a batch of prompts). ``preallocated``: a ring that holds every row of the
  block; ``growing``: a ring whose first segment holds 1/32 of them, fresh for every block,
  so each block allocates five or six segments; ``regrown``: the same ring kept from block
  to block (grown in the first, as a session's segments stay for its next capture); ``wrapping``: the fixed ring's
  path (device cursor, positions, indexed copy), which every eager write took before rings
  grew. Ratios are to ``preallocated``.
* **model**: the reference model's forward, plain and capturing into a preallocated ring or
  a growing one (first segment 1/32 of the block's rows, a fresh session every block).
  Ratios are to the plain forward.

    python -m benchmarks.capacity [--device cpu] [--threads 1] [--clock cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

import moe_replay as mr
from moe_replay.ring import CaptureRing

from .harness import Variant, summarise, time_variants
from .run import _commit, _cpu_name
from .workloads import build_model, make_workload

#: First segment of a growing ring, as a fraction of the rows one timed block writes.
GROWTH = 32

_SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        size="cpu", tokens=1024, batch=16, past=128, reps=15, inner={"prefill": 2, "decode": 16}, calls=(512, 64)
    ),
    "cuda": dict(
        size="gpu", tokens=8192, batch=64, past=512, reps=20, inner={"prefill": 4, "decode": 32}, calls=(512, 64)
    ),
    "smoke": dict(size="smoke", tokens=24, batch=4, past=8, reps=2, inner={"prefill": 2, "decode": 4}, calls=(8, 4)),
}


# ----------------------------------------------------------------------------- ring writes
class _Writes:
    """``calls`` writes of ``rows`` rows into a ring made by ``make`` (fresh when ``fresh``)."""

    def __init__(self, make: Any, idx: torch.Tensor, fresh: bool) -> None:
        self.make, self.idx, self.fresh = make, idx, fresh
        self.ring: CaptureRing = make()

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        if self.fresh:
            self.ring = self.make()
        self.ring.reset()
        yield

    def step(self) -> None:
        self.ring.write(self.idx)


def ring_variants(rows: int, calls: int, k: int, experts: int, device: torch.device) -> list[Variant]:
    """Ring-write variants: ``calls`` writes of ``rows`` rows per timed block."""
    idx = torch.randint(0, experts, (rows, k), device=device)
    total = rows * calls
    preallocated = _Writes(lambda: CaptureRing(total, k, experts, device), idx, fresh=False)
    growing = _Writes(lambda: CaptureRing(max(1, total // GROWTH), k, experts, device), idx, fresh=True)
    regrown = _Writes(lambda: CaptureRing(max(1, total // GROWTH), k, experts, device), idx, fresh=False)
    wrapping = _Writes(lambda: CaptureRing(total, k, experts, device, keep_newest=True), idx, fresh=False)
    return [
        Variant(name, w.block, w.step)
        for name, w in [
            ("preallocated", preallocated),
            ("growing", growing),
            ("regrown", regrown),
            ("wrapping", wrapping),
        ]
    ]


# ----------------------------------------------------------------------------- model
@contextlib.contextmanager
def _capturing(model: torch.nn.Module, capacity: int) -> Iterator[None]:
    with mr.attach(model, capacity=capacity) as session, session.capture():
        yield


def model_variants(w: Any, inner: int) -> list[Variant]:
    rows = w.tokens * inner
    return [
        Variant("plain", nullcontext, w.forward),
        Variant("capture_preallocated", lambda: _capturing(w.model, rows), w.forward),
        Variant("capture_growing", lambda: _capturing(w.model, max(1, rows // GROWTH)), w.forward),
    ]


def _check_growing_capture(w: Any, inner: int) -> dict[str, Any]:
    """The growing capture records what the preallocated one does, and it did grow."""
    rows = w.tokens * inner
    got = []
    segments = 0
    for capacity in (rows, max(1, rows // GROWTH)):
        with mr.attach(w.model, capacity=capacity) as session:
            with session.capture():
                w.prepare(inner)
                for _ in range(inner):
                    w.forward()
            got.append(session.routes())
            segments = max(len(r._segments) for r in session._rings())
    return {"same_routes": got[0].equal(got[1]), "rows_per_router": rows, "segments_when_growing": segments}


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace, log: Any = sys.stderr) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = _SETTINGS["smoke" if args.smoke else device.type]
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    reps = args.reps or s["reps"]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, info = build_model("reference", s["size"], device, dtype, seed=0)
    k, experts = info["top_k"], info["experts"]
    results: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(),
            "clock": args.clock,
            "reps": reps,
            "growth": f"first segment = rows per timed block / {GROWTH}",
            "model": info,
        },
        "ring": [],
        "model": [],
    }
    for shape, inner in zip(("decode", "prefill"), s["calls"], strict=True):
        rows = s["batch"] if shape == "decode" else s["tokens"]
        times = time_variants(
            ring_variants(rows, inner, k, experts, device), device=device, reps=reps, inner=inner, clock=clock
        )
        results["ring"].append(
            {"shape": shape, "rows_per_call": rows, "k": k, "calls": inner, **_ratios(times, "preallocated", 1e3)}
        )
        print(f"ring write, {shape} ({rows} rows x k={k}): done", file=log, flush=True)
    for shape in ("decode", "prefill"):
        inner = s["inner"][shape]
        w = make_workload("reference", shape, model, info, tokens=s["tokens"], batch=s["batch"], past=s["past"])
        with torch.no_grad():
            check = _check_growing_capture(w, inner)
            times = time_variants(
                model_variants(w, inner), device=device, reps=reps, inner=inner, prepare=w.prepare, clock=clock
            )
        results["model"].append(
            {"shape": shape, "tokens": w.tokens, "forwards": inner, "checks": check, **_ratios(times, "plain", 1.0)}
        )
        print(f"model, {shape}: done", file=log, flush=True)
    return results


def _ratios(times: dict[str, list[float]], baseline: str, scale: float) -> dict[str, Any]:
    """Median time per step (ms, or us for ``scale=1e3``) and ratios to ``baseline``."""
    out = summarise(times, baseline)
    return {"variants": {n: {**v, "median": v["median_ms"] * scale} for n, v in out.items()}}


def report(results: dict[str, Any]) -> str:
    """Markdown tables of one run."""
    m = results["meta"]
    lines = [
        f"Machine: {m['device']}, {m['threads']} torch thread(s), torch {m['torch']}, {m['date']}, commit "
        f"{m['commit']}. Clock: {'process CPU time' if m['clock'] == 'cpu' else 'wall time'}. {m['reps']} "
        f"repetitions, interleaved; growing rings: {m['growth']}.",
        "",
        "| ring write | rows x k per call | preallocated us/call | growing (fresh segments) | regrown (kept segments) "
        "| wrapping (the fixed path) |",
        "|---|---|---:|---|---|---|",
    ]

    def ratio(v: dict[str, Any]) -> str:
        return f"{v['ratio']:.3f}x ({v['ratio_q1']:.3f}–{v['ratio_q3']:.3f})"

    for r in results["ring"]:
        v = r["variants"]
        lines.append(
            f"| {r['shape']} | {r['rows_per_call']} x {r['k']} | {v['preallocated']['median']:.1f} | "
            f"{ratio(v['growing'])} | {ratio(v['regrown'])} | {ratio(v['wrapping'])} |"
        )
    lines += [
        "",
        "| model (reference) | tokens per forward | plain ms | capture, preallocated | capture, growing "
        "| segments grown | same routes |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for r in results["model"]:
        v, c = r["variants"], r["checks"]
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {v['plain']['median']:.2f} | {ratio(v['capture_preallocated'])} | "
            f"{ratio(v['capture_growing'])} | {c['segments_when_growing']} | {c['same_routes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (shared machines)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 repetitions: checks the script, not timings")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)
    results = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
