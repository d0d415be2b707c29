"""Build the notebooks from their sources in ``notebooks/src/`` and execute them.

Each notebook is written as a plain Python file in the "percent" format: ``# %%``
starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are comments. The
sources read (and run) as ordinary scripts and diff cleanly; the ``.ipynb`` files next
to this script are generated from them and stored with their outputs so that they
render on GitHub.

    python notebooks/build.py              # regenerate and execute every notebook
    python notebooks/build.py 02           # only the notebooks whose name contains "02"
    python notebooks/build.py --check      # exit 1 if a stored notebook is out of date

The kernel imports moe_replay from this checkout: the repository root is put first on
the kernel's PYTHONPATH (an editable install works the same way).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCES = HERE / "src"
CELL = re.compile(r"^# %%(?P<md> \[markdown\])?[^\n]*$", re.M)
TIMEOUT_S = 300


def parse(path: Path) -> list[tuple[str, str]]:
    """The cells of a percent-format source: ``[(kind, text)]``, kind ``code`` or ``markdown``."""
    text = path.read_text()
    marks = list(CELL.finditer(text))
    cells = []
    for i, m in enumerate(marks):
        body = text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip("\n")
        if m.group("md"):
            body = "\n".join(re.sub(r"^# ?", "", line) for line in body.splitlines())
            cells.append(("markdown", body))
        elif body.strip():
            cells.append(("code", body))
    return cells


def to_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """An nbformat v4 notebook holding ``cells``, with a Python 3 kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(make(text, id=f"cell-{i}"))
    return nb


def kernel_env() -> dict[str, str]:
    """The environment of the kernel: this checkout first on PYTHONPATH, no network for the Hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")  # no progress bars in stored outputs
    env.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")  # tqdm without ipywidgets
    return env


def execute(nb: nbformat.NotebookNode, workdir: Path, timeout: int = TIMEOUT_S) -> float:
    """Run every cell of ``nb`` in place, in ``workdir``; returns the wall time in seconds.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    saved = dict(os.environ)
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
        return time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _clean(nb: nbformat.NotebookNode) -> None:
    """Drop per-run metadata so that a rebuild only changes what the cells printed.

    Adjacent outputs of one stream are joined: the kernel splits a cell's prints into
    stream messages by timing, which would change the stored notebook from run to run.
    """
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        outputs = []
        for out in cell.get("outputs", []):
            prev = outputs[-1] if outputs else None
            if prev is not None and out.output_type == prev.output_type == "stream" and out.name == prev.name:
                prev.text += out.text
            else:
                outputs.append(out)
        if "outputs" in cell:
            cell.outputs = outputs


def local_paths(nb: nbformat.NotebookNode) -> list[str]:
    """Outputs that show a path of this machine (the checkout, the Python install)."""
    needles = {str(REPO), sys.prefix, sys.base_prefix, str(Path.home())} - {"/", ""}
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") + "".join(str(v) for k, v in out.get("data", {}).items() if k.startswith("text"))
            text += "".join(out.get("traceback", []))
            found += [f"{cell.id}: {n}" for n in needles if n in text]
    return found


def target(source: Path) -> Path:
    return HERE / (source.stem + ".ipynb")


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="build only the notebooks whose file name contains one of these")
    parser.add_argument("--check", action="store_true", help="check that stored notebooks match their sources")
    args = parser.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("*.py") if not args.only or any(o in p.name for o in args.only))
    if not sources:  # a typo would otherwise build (or check) nothing and succeed
        names = ", ".join(p.stem for p in sorted(SOURCES.glob("*.py")))
        print(f"no notebook source matches {' '.join(args.only)}; the sources are {names}", file=sys.stderr)
        return 2
    stale = []
    for src in sources:
        nb = to_notebook(parse(src))
        if args.check:
            out = target(src)
            stored = nbformat.read(out, as_version=4) if out.exists() else None
            if stored is None or [c.source for c in stored.cells] != [c.source for c in nb.cells]:
                stale.append(out.name)
            continue
        with tempfile.TemporaryDirectory() as work:
            seconds = execute(nb, Path(work))
        _clean(nb)
        leaks = local_paths(nb)
        if leaks:
            print(f"{src.name}: outputs show local paths, not saved: {leaks}")
            return 1
        nbformat.write(nb, target(src))
        size = target(src).stat().st_size
        print(f"{target(src).name}: executed in {seconds:.1f} s, {size / 1024:.0f} KiB")
    if stale:
        print("out of date (run python notebooks/build.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
