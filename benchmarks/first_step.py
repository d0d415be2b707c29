"""The first captured training step on a model, against a plain step: ``python -m benchmarks.first_step``.

A router establishes its decision at its first eager forward under a session (probe runs of its
forward, see :mod:`moe_replay.evidence`), and the model's first forward under a capture tells the
order in which its routers see the tokens (runs of the model up to its routers, see
:func:`moe_replay._feeds.token_order`) under the orphan watch. That is a one-off per model and
mode, which the timed blocks of :mod:`benchmarks.steps` leave out (they warm every session up);
users feel it as a slow first step. Here each repetition takes a fresh deep copy of the
Qwen3-MoE-shaped model (nothing established on it), runs one plain training step (HF gradient
checkpointing, non-reentrant), then under a new session one captured step (the first) and one
more (established). Wall and process CPU time are reported (medians); ``--count`` adds the Python
work of the first and the second captured step of one more copy (bytecodes, frames, C calls:
exact, where timings drift on a shared machine). Also checked: the first step records the same
routes as the second.

    python -m benchmarks.first_step --size cpu --layers 4 --out benchmarks/results/first-step-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import moe_replay as mr

from .hostwork import count
from .steps import _training
from .workloads import build_model

__all__ = ["bench_first_step", "main"]


def _step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> tuple[float, float]:
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_first_step(
    model: nn.Module, *, batch: int, seq: int, reps: int, counts: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Plain, first captured and second captured training steps of fresh copies of ``model``, ``reps`` times."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "first": [], "second": []}
    same_routes = True
    for _ in range(reps):
        fresh = copy.deepcopy(model)  # (a new module: no decision or token order established on it)
        step = _step(fresh, ids)
        with _training(fresh):
            step()  # (the plain step's own one-offs: allocator, autograd, kernels)
            times["plain"].append(_timed(step, sync))
            with mr.attach(fresh, capacity=batch * seq) as session:
                for name in ("first", "second"):
                    with session.capture():
                        times[name].append(_timed(step, sync))
                    routes = session.routes()
                    if name == "first":
                        first_rows = [r.clone() for r in routes.per_layer()]
                    else:
                        same_routes &= all(
                            torch.equal(a, b) for a, b in zip(first_rows, routes.per_layer(), strict=True)
                        )
    result: dict[str, Any] = {"batch": batch, "seq": seq, "reps": reps, "checks": {"same_routes": same_routes}}
    for name, got in times.items():
        result[name] = {
            "wall_s": statistics.median(w for w, _ in got),
            "cpu_s": statistics.median(c for _, c in got),
        }
    result["one_off_wall_s"] = result["first"]["wall_s"] - result["second"]["wall_s"]
    result["one_off_cpu_s"] = result["first"]["cpu_s"] - result["second"]["cpu_s"]
    if counts:
        fresh = copy.deepcopy(model)
        step = _step(fresh, ids)
        with _training(fresh):
            step()
            with mr.attach(fresh, capacity=batch * seq) as session:

                def captured() -> None:
                    with session.capture():
                        step()

                result["first"]["host_work"] = count(captured)
                result["second"]["host_work"] = count(captured)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.first_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=["smoke", "cpu", "gpu"], help="model shape")
    p.add_argument("--layers", type=int, default=None, help="number of MoE layers (default: the size's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--count", action="store_true", help="also count the Python work of the first and second step")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, info = build_model("qwen3", args.size, device, dtype, layers=args.layers)
    result = bench_first_step(model, batch=args.batch, seq=args.seq, reps=args.reps, counts=args.count)
    result["meta"] = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device), **info}
    lines = ["| step | wall (s) | CPU (s) |", "|---|---:|---:|"]
    lines += [f"| {k} | {result[k]['wall_s']:.3f} | {result[k]['cpu_s']:.3f} |" for k in ("plain", "first", "second")]
    print(
        f"Training step of {info['layers']} layers, {args.batch}x{args.seq} tokens, medians of {args.reps} fresh "
        f"copies (first - second: {result['one_off_wall_s']:.3f} s wall, {result['one_off_cpu_s']:.3f} s CPU; "
        f"same routes: {result['checks']['same_routes']}):\n" + "\n".join(lines)
    )
    if args.count:
        first, second = result["first"]["host_work"], result["second"]["host_work"]
        print(f"Python work of the first captured step: {first}, of the second: {second}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
