"""The notebooks: stored in sync with their sources, with outputs, and they run.

Each notebook is executed from scratch in a fresh kernel (nbclient) that imports
moe_replay from this checkout. Cells assert what they show, so a notebook that runs
is a notebook whose claims hold.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted((NOTEBOOKS / "src").glob("*.py"))
NEEDS = {"04_huggingface_model": "transformers", "05_grpo_routing_replay": "trl"}
PLOTS = ("01", "02", "05")


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build()


def test_there_are_five_notebooks() -> None:
    assert [s.stem[:2] for s in SOURCES] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_stored_notebook_matches_source_and_has_outputs(source: Path) -> None:
    stored = nbformat.read(build.target(source), as_version=4)
    fresh = build.to_notebook(build.parse(source))
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in fresh.cells], (
        f"{build.target(source).name} is out of date: run python notebooks/build.py {source.stem[:2]}"
    )
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "stored without executing every cell"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    if source.stem[:2] in PLOTS:
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "its plots are missing"
    assert build.local_paths(stored) == []


def test_the_notebooks_extra_installs_what_every_notebook_imports() -> None:
    """The README's ``pip install -e ".[notebooks]"`` is all a reader needs to run all five."""
    tomllib = pytest.importorskip("tomllib")
    import re

    extra = tomllib.loads((NOTEBOOKS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0] for req in extra["notebooks"]}
    assert {"jupyter", "matplotlib", *NEEDS.values()} <= names


def test_a_selection_that_matches_nothing_fails(capsys) -> None:
    """``build.py 99`` (a typo) built nothing and exited 0; ``--check 99`` checked nothing."""
    assert build.main(["99"]) == 2
    assert build.main(["--check", "99"]) == 2
    assert "no notebook source matches 99; the sources are 01_quick_start" in capsys.readouterr().err
    assert build.main(["--check", "01"]) == 0


def test_clean_joins_a_cells_stream_outputs() -> None:
    """The kernel splits prints into stream messages by timing; stored, they are one output per stream."""
    nb = build.to_notebook([("code", "print(1); print(2)")])
    new = nbformat.v4.new_output
    nb.cells[0].outputs = [
        new("stream", name="stdout", text="a\n"),
        new("stream", name="stdout", text="b\n"),
        new("stream", name="stderr", text="warn\n"),
        new("stream", name="stdout", text="c\n"),
        new("display_data", data={"text/plain": "x"}),
        new("stream", name="stdout", text="d\n"),
    ]
    build._clean(nb)
    got = [(o.output_type, o.get("name"), o.get("text")) for o in nb.cells[0].outputs]
    assert got == [
        ("stream", "stdout", "a\nb\n"),
        ("stream", "stderr", "warn\n"),
        ("stream", "stdout", "c\n"),
        ("display_data", None, None),
        ("stream", "stdout", "d\n"),
    ]


def test_parse_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "nb.py"
    src.write_text("# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\nprint(x)\n")
    assert build.parse(src) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "print(x)")]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(source: Path, tmp_path: Path, record_property) -> None:
    if source.stem in NEEDS:
        pytest.importorskip(NEEDS[source.stem])
    nb = build.to_notebook(build.parse(source))
    start = time.perf_counter()
    build.execute(nb, tmp_path, timeout=300)
    record_property("seconds", round(time.perf_counter() - start, 1))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
