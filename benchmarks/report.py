"""Markdown tables from a results JSON: ``python -m benchmarks.report results.json``.

The output is ready to paste into ``benchmarks/RESULTS.md``: the machine, the results
table (median ms of the plain forward, every other variant as a ratio to it), the
CUDA-graph table, the bytes stored per token and the targets with met / missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["TARGETS", "markdown", "targets"]

#: (device type, workload shape, variant, limit, what it says). ``shape`` "prefill"
#: applies to prefill workloads of the device; on CPU only the reference model counts.
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("cuda", "prefill", "capture", 1.005, "prefill, capture"),
    ("cuda", "prefill", "replay", 1.00, "prefill, replay"),
    ("cuda", "decode", "capture", 1.03, "decode 64x1 eager, capture"),
    ("cuda", "decode", "replay", 1.03, "decode 64x1 eager, replay"),
    ("cuda", "decode-graph", "capture_graph", 1.01, "decode in a CUDA graph, capture"),
    ("cuda", "train", "capture", 1.005, "training step (checkpointing), capture"),
    ("cuda", "train", "replay", 1.005, "training step (checkpointing), replay"),
    ("cuda", "generate", "capture", 1.01, "generate() eager, capture"),
    ("cpu", "prefill", "capture", 1.05, "CPU reference prefill, capture"),
)

_COLUMNS = (
    ("idle", "idle"),
    ("capture", "capture"),
    ("replay", "replay"),
    ("recipe_capture", "HF recipe capture"),
    ("recipe_replay", "HF recipe replay"),
    ("naive_capture", "naive hook capture"),
    ("capture_torch", "capture, torch-op ring"),
    ("replay_torch", "replay, torch-op read"),
    ("capture_noring", "capture, ring write skipped (diagnostic)"),
)


def _ratio(v: dict[str, Any] | None) -> str:
    if not v:
        return "—"
    return f"{v['ratio']:.3f}x ({v['ratio_q1']:.3f}–{v['ratio_q3']:.3f})"


def _shape(w: dict[str, Any]) -> str:
    if w["shape"] == "prefill":
        return f"prefill {w['tokens']}"
    return f"{w['shape']} {w['batch']}x1, past {w['past']}"


def _model(w: dict[str, Any]) -> str:
    return f"{w['model']} ({w.get('layers', '?')}L, E={w.get('experts', '?')}, k={w.get('top_k', '?')})"


def _machine(m: dict[str, Any]) -> str:
    if m["device_type"] == "cpu":
        return f"{m['cpu']}, CPU only, {m['threads']} torch thread(s)"
    return f"{m['device_name']}; host {m['cpu']}"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each applicable target with the measured ratio and whether it is met."""
    dev = results["meta"]["device_type"]
    rows = []
    graph = [results["graph"]] if results.get("graph") else []
    for w in [*results.get("workloads", []), *graph, *results.get("steps", [])]:
        for t_dev, shape, variant, limit, what in TARGETS:
            if t_dev != dev or w.get("shape") != shape or "variants" not in w:
                continue
            if dev == "cpu" and w["model"] != "reference":
                continue
            v = w["variants"].get(variant)
            if v is None:
                continue
            rows.append(
                {
                    "target": what,
                    "model": w["model"],
                    "limit": limit,
                    "ratio": v["ratio"],
                    "met": v["ratio"] <= limit,
                }
            )
    return rows


_STEP_COLUMNS = (
    ("capture", "capture"),
    ("replay", "replay"),
    ("recipe_capture", "HF recipe capture"),
    ("recipe_replay", "HF recipe replay"),
)


def _step_shape(w: dict[str, Any]) -> str:
    if w["shape"] == "train":
        return f"training step, fwd+bwd, gradient checkpointing, {w['batch']} x {w['seq']} tokens"
    return f"generate() eager greedy, {w['batch']} x ({w['prompt']} + {w['new']}) tokens"


def _step_checks(w: dict[str, Any]) -> str:
    c = w["checks"]
    if w["shape"] == "train":
        text = (
            f"routes {c['routes_tokens']} rows per router for {w['tokens']} tokens (recompute not recorded again); "
            f"replay vs capture: loss diff {c['replay_loss_diff']:g}, router grads max diff "
            f"{c['replay_router_grad_max_diff']:g}; capture vs plain loss diff {c['capture_loss_diff']:g}"
        )
        if "recipe_indices_equal" in c:
            text += (
                f"; recipe records {c['recipe_records_per_step']}x per step (forward and recompute), "
                f"same experts as moe_replay: {'yes' if c['recipe_indices_equal'] else 'no'}"
            )
    else:
        text = (
            f"routes {c['routes_tokens']} rows per router (B*P + B*(N-1) = {c['expected_tokens']}), "
            f"{c['generated_tokens']} new tokens; capture generated the plain sequences: "
            f"{'yes' if c['capture_sequences_equal'] else 'no (separate runs, near-ties)'}"
        )
        if "recipe_rows" in c:
            eq = c["recipe_indices_equal"]
            text += "; recipe: " + (
                "not compared (its run generated other tokens)"
                if eq is None
                else ("same experts" if eq else "**other experts**")
            )
    if "baselines_error" in c:
        text += f"; recipe not applicable ({c['baselines_error']})"
    return text


def _steps(steps: list[dict[str, Any]]) -> list[str]:
    if not steps:
        return []
    cols = [(k, c) for k, c in _STEP_COLUMNS if any(k in w.get("variants", {}) for w in steps)]
    out = [
        "",
        "| model | step | plain ms | " + " | ".join(c for _, c in cols) + " | checks |",
        "|---|---|---:|" + "---|" * len(cols) + "---|",
    ]
    for w in steps:
        if "error" in w:
            out.append(f"| {w['model']} | {w['shape']} | error: {w['error']} |" + " |" * (len(cols) + 1))
            continue
        v = w["variants"]
        cells = " | ".join(_ratio(v.get(k)) for k, _ in cols)
        out.append(f"| {_model(w)} | {_step_shape(w)} | {v['plain']['median_ms']:.1f} | {cells} | {_step_checks(w)} |")
    return out


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    m = results["meta"]
    out = [
        f"Machine: {_machine(m)}. torch {m['torch']}"
        + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")
        + f", transformers {m.get('transformers') or 'not installed'}, {m['dtype']}, {m['date']}"
        + (f", commit {m['commit']}" if m.get("commit") else "")
        + f". Clock: {'process CPU time' if m.get('clock') == 'cpu' else 'wall'}. Repetitions "
        + ", ".join(f"{k} {v}" for k, v in m["reps"].items() if v)
        + " (forwards per timed block: "
        + ", ".join(f"{k} {v}" for k, v in m["inner"].items() if v)
        + "), interleaved in rotated order; ratios are medians of per-repetition ratios to the plain forward "
        "(quartiles in brackets).",
    ]
    if m.get("smoke"):
        out.append("\n**Smoke run: checks the harness only; these timings mean nothing.**")
    loads = results.get("workloads", [])
    cols = [(k, c) for k, c in _COLUMNS if any(k in w.get("variants", {}) for w in loads)]
    out += [
        "",
        "| model | workload | plain ms | " + " | ".join(c for _, c in cols) + " |",
        "|---|---|---:|" + "---|" * len(cols),
    ]
    for w in loads:
        if "error" in w:
            out.append(f"| {w['model']} | {w['shape']} | error: {w['error']} |" + " |" * len(cols))
            continue
        v = w["variants"]
        cells = " | ".join(_ratio(v.get(k)) for k, _ in cols)
        out.append(f"| {_model(w)} | {_shape(w)} | {v['plain']['median_ms']:.3f} | {cells} |")
    g = results.get("graph")
    if g:
        torch_col = "capture_graph_torch" in g.get("variants", {})
        out += [
            "",
            "| CUDA graph | workload | plain graph ms | capture in graph | "
            + ("capture in graph, torch-op ring | " if torch_col else "")
            + "replays recorded in order |",
        ]
        out.append("|---|---|---:|---|" + ("---|" if torch_col else "") + "---|")
        if "error" in g:
            out.append(f"| {g['model']} | decode-graph | error: {g['error']} | | |")
        else:
            c = g["checks"]
            graphed = "" if g.get("graphed") else " (emulated: no CUDA)"
            order = (
                f"{c['capture_graph_replays_matched']}/{c['replays']} (inputs replayed forward, then reversed: "
                "each replay's rows in its own place)"
                + f"; check graph vs its own hooks {c['check_graph_replays_matched']}/{c['replays']}"
                + f"; vs the check graph where both outputs are identical {c['capture_vs_check_matched']}/"
                + f"{c['capture_vs_check_compared']}"
                + f"; eager steps vs their own hooks {c['eager_replays_matched']}/{c['eager_replays']}"
            )
            if torch_col:
                order += f"; torch-op ring graph {c['capture_graph_torch_replays_matched']}/{c['replays']}"
            gv = g["variants"]
            out.append(
                f"| {_model(g)} dense experts{graphed} | decode {g['batch']}x1, past {g['past']} | "
                f"{gv['plain_graph']['median_ms']:.3f} | {_ratio(gv['capture_graph'])} | "
                + (f"{_ratio(gv['capture_graph_torch'])} | " if torch_col else "")
                + f"{order} |"
            )
    out += ["", "| model | workload | bytes stored per token: moe_replay | HF recipe | naive hook | checks |"]
    out.append("|---|---|---:|---:|---:|---|")
    for w in results.get("workloads", []):
        if "error" in w:
            continue
        b, c = w["bytes_per_token"], w["checks"]
        noise = c.get("plain_rerun_max_diff", 0.0)
        own = (
            "captured rows = the routers' own outputs"
            if c.get("captured_rows_are_router_outputs", True)
            else "**captured rows differ from the routers' own outputs**"
        )
        if "baselines_error" in c:
            same = f"{own}; recipe and naive hook not applicable here (" + c["baselines_error"] + ")"
        elif c["recipe_indices_equal"] and c["naive_indices_equal"]:
            same = f"{own}; same experts recorded by the recipe and the naive hook"
        elif c.get("recipe_output_max_diff", 0.0) > 0 or noise > 0:
            same = (
                f"{own}; the recipe's and the naive hook's separate forwards differ from it by run-to-run "
                f"noise (output max abs diff {c.get('recipe_output_max_diff', 0.0):g}), so near-tied experts differ"
            )
        else:
            same = f"{own}; **MISMATCH** of the experts recorded by the recipe or the naive hook (identical outputs)"
        replay = c["replay_output_max_diff"]
        if replay == 0 and c.get("recipe_replay_output_max_diff", 0.0) == 0:
            note = f"{same}; replays identical to their captures"
        else:
            note = (
                f"{same}; replay vs its capture max abs diff {replay:g}"
                + (f" (recipe {c['recipe_replay_output_max_diff']:g})" if "recipe_replay_output_max_diff" in c else "")
                + f"; plain vs its rerun {noise:g}"
            )
        out.append(
            f"| {w['model']} | {_shape(w)} | {b['moe_replay']:.0f} | {b.get('recipe', float('nan')):.0f} | "
            f"{b.get('naive', float('nan')):.0f} | {note} |"
        )
    out += _steps(results.get("steps", []))
    rows = targets(results)
    if rows and not m.get("smoke"):
        out += ["", "| target | model | limit | measured | |", "|---|---|---:|---:|---|"]
        for r in rows:
            out.append(
                f"| {r['target']} | {r['model']} | ≤ {r['limit']:.3f}x | {r['ratio']:.3f}x | "
                f"{'met' if r['met'] else '**missed**'} |"
            )
    prof = results.get("profile")
    if prof:
        out += [
            "",
            "Profile, per forward (one profiled pass per variant: op and kernel counts are exact, the µs are one "
            "sample, not a timing). `extra ops`: aten ops added against the plain forward (Δ count, Δ self-CPU µs):",
            "",
        ]
        out += ["| workload | variant | wall µs | aten ops | aten self µs | kernels | kernel µs | extra ops |"]
        out.append("|---|---|---:|---:|---:|---:|---:|---|")
        for name, per in prof.items():
            for variant, p in per.items():
                extra = ", ".join(
                    f"{k.removeprefix('aten::')} {c:+g} ({t:+.0f}µs)" for k, c, t in p.get("extra_ops", [])
                )
                out.append(
                    f"| {name} | {variant} | {p['wall_us']:.0f} | {p['aten_ops']:.0f} | {p['aten_self_us']:.0f} | "
                    f"{p['kernels']:.0f} | {p['kernel_us']:.0f} | {extra} |"
                )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the markdown tables of a benchmark results JSON.")
    parser.add_argument("results", help="JSON written by `python -m benchmarks.run --out FILE`")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        print(markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
