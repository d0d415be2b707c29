"""Regenerate the figures in docs/reliability.md.

Runs every test marked ``reliability`` with case counting on, times the run, and
rewrites the block between the ``figures`` markers of docs/reliability.md:

    python tests/reliability_report.py            # the CI example budget
    MOE_REPLAY_HYPOTHESIS=explore MOE_REPLAY_EXAMPLES=20 python tests/reliability_report.py --print

``--print`` writes the table to stdout and leaves the file alone (use it for exploratory
runs, whose counts are not the CI ones). The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
TOPICS = (
    "round trips",
    "bad inputs",
    "files",
    "faults",
    "re-entrance",
    "concurrency",
    "wrappers",
    "lifecycle",
    "overflow",
    "silent replays",
)


def run(workers: int = 1) -> tuple[int, dict[str, dict], float]:
    """Run the reliability tests (on ``workers`` pytest-xdist workers where more than one) and merge what each
    process counted: a test's parametrized cases may run in several."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cases.json"
        env = {**os.environ, "MOE_REPLAY_CASES": str(out)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "reliability", "-p", "no:cacheprovider"]
        if workers > 1:
            cmd += ["-n", str(workers)]
        start = time.perf_counter()
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        return code, _merged(sorted(Path(tmp).glob("cases.json*"))), wall


def _merged(paths: list[Path]) -> dict[str, dict]:
    """The counts of every process's file, summed test by test."""
    data: dict[str, dict] = {}
    for path in paths:
        for key, run in json.loads(path.read_text()).items():
            if key not in data:
                data[key] = {**run, "outcomes": dict(run.get("outcomes", {}))}
                continue
            into = data[key]
            into["cases"] = into.get("cases", 0) + run.get("cases", 0)
            into["items"] = into.get("items", 0) + run.get("items", 0)
            for outcome, n in run.get("outcomes", {}).items():
                into["outcomes"][outcome] = into["outcomes"].get(outcome, 0) + n
    return data


def _result(outcomes: dict[str, int]) -> str:
    failed = outcomes.get("failed", 0) + outcomes.get("error", 0)
    parts = []
    if failed:
        parts.append(f"**{failed} failed**")
    if outcomes.get("passed"):
        parts.append("passed" if not failed and len(outcomes) == 1 else f"{outcomes['passed']} passed")
    if outcomes.get("xfailed"):
        parts.append(f"{outcomes['xfailed']} known gap" + ("s" if outcomes["xfailed"] > 1 else ""))
    if outcomes.get("skipped"):
        parts.append(f"{outcomes['skipped']} skipped")
    return ", ".join(parts) or "not run"


def render(data: dict[str, dict], wall: float, workers: int = 1) -> str:
    def order(kv: tuple[str, dict]) -> tuple[int, str]:
        topic = kv[1]["topic"]
        return (TOPICS.index(topic) if topic in TOPICS else len(TOPICS), kv[0])

    rows = sorted(data.items(), key=order)
    lines = ["| topic | test | what it tries | cases | result |", "|---|---|---|---:|---|"]
    totals = {"cases": 0, "tests": 0, "failed": 0, "xfailed": 0}
    for key, run in rows:
        module, name = key.split("::", 1)
        lines.append(
            f"| {run['topic']} | `{Path(module).stem}::{name}` | {run['doc']} | {run['cases']} | "
            f"{_result(run['outcomes'])} |"
        )
        totals["cases"] += run["cases"]
        totals["tests"] += 1
        totals["failed"] += run["outcomes"].get("failed", 0) + run["outcomes"].get("error", 0)
        totals["xfailed"] += run["outcomes"].get("xfailed", 0)
    profile = os.environ.get("MOE_REPLAY_HYPOTHESIS", "ci")
    factor = os.environ.get("MOE_REPLAY_EXAMPLES", "1")
    summary = (
        f"{totals['tests']} tests, {totals['cases']} cases, {totals['failed']} failed, "
        f"{totals['xfailed']} known gaps (strict xfail). Hypothesis profile `{profile}`, examples x{factor}. "
        f"Wall time of the run, pytest start-up included: {wall:.0f} s on {os.cpu_count()} CPU cores"
        f"{f' ({workers} pytest-xdist workers)' if workers > 1 else ''} "
        f"(Python {platform.python_version()}, torch {torch.__version__})."
    )
    return "\n".join([summary, "", *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of rewriting the doc")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (the wall time is theirs)")
    args = parser.parse_args()
    code, data, wall = run(args.workers)
    if not data:
        print("no reliability test ran", file=sys.stderr)
        return code or 1
    table = render(data, wall, args.workers)
    if args.print:
        print(table)
        return code
    text = DOC.read_text()
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
    DOC.write_text(new)
    print(f"updated {DOC.relative_to(ROOT)}: {table.splitlines()[0]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
