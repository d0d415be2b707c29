"""Capture and replay overhead against the plain forward: ``python -m benchmarks.run``.

In one process, interleaved and repeated, for each model (reference MoE, and a
Qwen3-MoE-shaped transformers model when transformers is installed) and each shape
(prefill: one long sequence; decode: a batch of single tokens over a KV cache):

* ``plain``: the model alone;
* ``idle``: a moe_replay session attached, neither capturing nor replaying;
* ``capture`` / ``replay``: moe_replay capturing, replaying the routes of that forward;
* ``recipe_capture`` / ``recipe_replay``: the transformers recipe (router subclass +
  output recorder), see :mod:`benchmarks.baselines`;
* ``naive_capture``: a forward hook copying the indices to the host on every call;

and, on CUDA, capture inside a CUDA-graphed decode step (see :mod:`benchmarks.graph`).
On the Qwen3-MoE-shaped model, whole steps (see :mod:`benchmarks.steps`): a training
step (forward + backward with HF gradient checkpointing; plain, capture, replay, the
recipe) and an eager ``generate()`` call (plain, capture, the recipe capturing).
Prints a markdown table (``benchmarks/RESULTS.md`` format) and writes every number to
``--out``.

Examples:
    python -m benchmarks.run --smoke                       # seconds: checks the harness
    python -m benchmarks.run --device cpu --out cpu.json   # the CPU figures
    python -m benchmarks.run --device cuda --out gpu.json --md gpu.md  # H100/H200, bf16, ~5 min
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

from .graph import bench_graph
from .harness import check_workload, eager_variants, profile_variants, summarise, time_variants
from .report import markdown
from .steps import bench_generate, bench_train
from .workloads import build_model, make_workload, transformers_version

__all__ = ["main", "run"]

_SHAPES = ("prefill", "decode", "graph", "train", "generate")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Defaults per setting: reps / inner forwards per timed block, by shape, and input sizes.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(
        size="gpu",
        dtype="bfloat16",
        prefill_tokens=8192,
        decode_batch=64,
        decode_past=512,
        reps={"prefill": 15, "decode": 15, "graph": 20, "train": 10, "generate": 8},
        inner={"prefill": 2, "decode": 5, "graph": 20, "train": 1, "generate": 1},
        graph_replays=220,
        train=(4, 2048),
        generate=(32, 64, 48),
    ),
    "cpu": dict(
        size="cpu",
        dtype="float32",
        prefill_tokens=1024,
        decode_batch=16,
        decode_past=128,
        reps={"prefill": 20, "decode": 40, "graph": 0, "train": 12, "generate": 10},
        inner={"prefill": 2, "decode": 4, "graph": 0, "train": 1, "generate": 1},
        graph_replays=0,
        train=(2, 256),
        generate=(8, 32, 16),
    ),
    "smoke": dict(
        size="smoke",
        dtype="float32",
        prefill_tokens=24,
        decode_batch=4,
        decode_past=6,
        reps={"prefill": 2, "decode": 2, "graph": 2, "train": 2, "generate": 2},
        inner={"prefill": 1, "decode": 2, "graph": 2, "train": 1, "generate": 1},
        graph_replays=3,
        train=(2, 8),
        generate=(2, 4, 3),
    ),
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--model", nargs="+", default=["reference", "qwen3"], choices=["reference", "qwen3"], help="models to run"
    )
    p.add_argument(
        "--shape",
        nargs="+",
        default=list(_SHAPES),
        choices=_SHAPES,
        help="workloads (train and generate run on the qwen3 model only)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 repetitions: checks the harness, not timings")
    p.add_argument("--out", default=None, help="write every number to this JSON file (rewritten after each workload)")
    p.add_argument("--md", default=None, help="also write the markdown tables (printed on stdout) to this file")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per workload (after one warm-up)")
    p.add_argument("--inner", type=int, default=None, help="forwards per timed block")
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--decode-batch", type=int, default=None)
    p.add_argument("--decode-past", type=int, default=None, help="KV-cache length of each decode step")
    p.add_argument("--layers", type=int, default=None, help="override the layer count of both models")
    p.add_argument("--train-batch", type=int, default=None, help="sequences per training step")
    p.add_argument("--train-seq", type=int, default=None, help="tokens per sequence of a training step")
    p.add_argument("--generate-batch", type=int, default=None, help="sequences per generate() call")
    p.add_argument("--generate-prompt", type=int, default=None, help="prompt tokens per sequence")
    p.add_argument("--generate-new", type=int, default=None, help="tokens generated per sequence")
    p.add_argument("--graph-replays", type=int, default=None, help="graph replays checked for in-order recording")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile plain / capture / replay (torch.profiler) and time capture with the\n"
        "ring write skipped (capture_noring), to split capture's cost",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of this process, for single-threaded\n"
        "CPU runs on a machine shared with other work",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace, log: Any = sys.stderr) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns the results dict."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    d = _DEFAULTS["smoke" if args.smoke else device.type]
    dtype = _DTYPES[args.dtype or d["dtype"]]
    if args.threads or args.smoke:  # smoke: one thread, immune to a busy machine's thread contention
        torch.set_num_threads(args.threads or 1)
    has_hf = transformers_version() is not None
    meta = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "transformers": transformers_version(),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "smoke": bool(args.smoke),
        "reps": {k: args.reps or v for k, v in d["reps"].items()},
        "inner": {k: args.inner or v for k, v in d["inner"].items()},
        "clock": args.clock,
        "argv": sys.argv[1:],
    }
    results: dict[str, Any] = {"meta": meta, "workloads": [], "graph": None, "steps": [], "skipped": []}
    if args.profile:
        results["profile"] = {}

    def say(msg: str) -> None:
        print(msg, file=log, flush=True)

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tokens = args.prefill_tokens or d["prefill_tokens"]
    batch = args.decode_batch or d["decode_batch"]
    past = args.decode_past or d["decode_past"]
    for family in args.model:
        if family == "qwen3" and not has_hf:
            results["skipped"].append("qwen3: transformers is not installed")
            say("skip qwen3: transformers is not installed")
            continue
        t0 = time.perf_counter()
        model, info = build_model(family, d["size"], device, dtype, layers=args.layers, seed=args.seed)
        say(f"built {family} {info} in {time.perf_counter() - t0:.1f}s")
        for shape in [s for s in ("prefill", "decode") if s in args.shape]:
            reps, inner = meta["reps"][shape], meta["inner"][shape]
            try:
                w = make_workload(family, shape, model, info, tokens=tokens, batch=batch, past=past, seed=args.seed)
                with torch.no_grad():
                    routes, forced, checks, nbytes = check_workload(w)
                    variants = eager_variants(w, inner, routes, forced, diagnose=args.profile)
                    t0 = time.perf_counter()
                    times = time_variants(
                        variants,
                        device=device,
                        reps=reps,
                        inner=inner,
                        prepare=w.prepare,
                        clock=clock,
                        progress=lambda s, n=w.name: say(f"  {n} {s}"),
                    )
                    entry = {
                        **w.describe(),
                        "reps": reps,
                        "inner": inner,
                        "variants": summarise(times, "plain"),
                        "checks": checks,
                        "bytes_per_token": nbytes,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                    if args.profile:
                        chosen = [v for v in variants if v.name in ("plain", "capture", "replay")]
                        results["profile"][w.name] = profile_variants(
                            chosen, device=device, forwards=inner, prepare=w.prepare
                        )
            except Exception as e:
                if args.smoke:
                    raise
                traceback.print_exc(file=log)
                entry = {"model": family, "shape": shape, "error": f"{type(e).__name__}: {e}"}
            results["workloads"].append(entry)
            say(f"{family}/{shape}: " + _line(entry))
            save()
        if family == "reference" and "graph" in args.shape:
            if device.type != "cuda" and not args.smoke:
                results["skipped"].append("graph: needs CUDA")
                say("skip graph: needs CUDA")
            else:
                try:
                    results["graph"] = bench_graph(
                        model,
                        batch=batch,
                        past=past,
                        reps=meta["reps"]["graph"],
                        inner=meta["inner"]["graph"],
                        replays=args.graph_replays or d["graph_replays"],
                        seed=args.seed,
                        clock=clock,
                        progress=lambda s: say(f"  graph {s}"),
                    )
                except Exception as e:
                    if args.smoke:
                        raise
                    traceback.print_exc(file=log)
                    results["graph"] = {"model": family, "shape": "decode-graph", "error": f"{type(e).__name__}: {e}"}
                say("graph: " + _line(results["graph"]))
                save()
        if family == "qwen3":
            _run_steps(args, d, meta, model, device, clock, results, say, save)
        elif any(s in args.shape for s in ("train", "generate")) and "qwen3" not in args.model:
            results["skipped"].append("train, generate: run on the qwen3 model only")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    return results


def _run_steps(
    args: argparse.Namespace,
    d: dict[str, Any],
    meta: dict[str, Any],
    model: torch.nn.Module,
    device: torch.device,
    clock: Any,
    results: dict[str, Any],
    say: Any,
    save: Any,
) -> None:
    """The training-step and ``generate()`` workloads on ``model`` (see :mod:`benchmarks.steps`)."""
    for shape in [s for s in ("train", "generate") if s in args.shape]:
        t0 = time.perf_counter()
        progress = lambda s, n=shape: say(f"  qwen3/{n} {s}")  # noqa: E731
        try:
            if shape == "train":
                batch, seq = args.train_batch or d["train"][0], args.train_seq or d["train"][1]
                entry = bench_train(
                    model,
                    batch=batch,
                    seq=seq,
                    reps=meta["reps"]["train"],
                    inner=meta["inner"]["train"],
                    seed=args.seed,
                    clock=clock,
                    progress=progress,
                )
            else:
                b, p, n = d["generate"]
                entry = bench_generate(
                    model,
                    batch=args.generate_batch or b,
                    prompt=args.generate_prompt or p,
                    new=args.generate_new or n,
                    reps=meta["reps"]["generate"],
                    seed=args.seed,
                    clock=clock,
                    progress=progress,
                )
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:
            if args.smoke:
                raise
            traceback.print_exc(file=sys.stderr)
            entry = {"model": "qwen3", "shape": shape, "error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["steps"].append(entry)
        say(f"qwen3/{shape}: " + _line(entry))
        save()


def _line(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return entry["error"]
    v = entry["variants"]
    return ", ".join(
        f"{k} {x['ratio']:.3f}x" if k not in ("plain", "plain_graph") else f"{k} {x['median_ms']:.3f} ms"
        for k, x in v.items()
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results = run(args)
    text = markdown(results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
