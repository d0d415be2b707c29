"""Packaging metadata: one version source, the licence file, the typing marker and the types it vouches for."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import moe_replay as mr

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _installed_from_here() -> importlib.metadata.Distribution | None:
    """The metadata of moe_replay installed from this checkout (``pip install -e .``), if any.

    That is a ``.dist-info`` whose ``direct_url.json`` names this checkout, or the
    ``.egg-info`` an editable build leaves in it.
    """
    for dist in importlib.metadata.distributions(name="moe_replay"):
        direct = dist.read_text("direct_url.json")
        if direct and json.loads(direct).get("url", "").rstrip("/") == ROOT.as_uri():
            return dist
        if Path(str(dist.locate_file(""))).resolve() == ROOT:
            return dist
    return None


def test_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moe_replay.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", mr.__version__), mr.__version__
    written = [
        str(p.relative_to(ROOT))
        for p in [ROOT / "pyproject.toml", *sorted((ROOT / "moe_replay").rglob("*.py"))]
        if re.search(r"""^\s*_*version_*\s*=\s*["']\d""", p.read_text(), re.M)
    ]
    assert written == ["moe_replay/__init__.py"], written


def test_installed_metadata_has_the_package_version() -> None:
    dist = _installed_from_here()
    if dist is None:
        pytest.skip("moe_replay is not installed from this checkout (pip install -e .)")
    assert dist.version == mr.__version__


def test_licence_and_typing_marker_ship() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # the SPDX expression says it
    assert (ROOT / "moe_replay" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["moe_replay"]
    requires = PYPROJECT["build-system"]["requires"]
    setuptools_min = next(r for r in requires if r.startswith("setuptools>="))
    assert tuple(int(x) for x in setuptools_min.split(">=")[1].split(".")[:2]) >= (77, 0)  # PEP 639 fields
    dist = _installed_from_here()
    if dist is not None:
        assert dist.metadata["License-Expression"] == "Apache-2.0"


def test_runtime_dependencies_are_torch_numpy_einops() -> None:
    names = [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in PYPROJECT["project"]["dependencies"]]
    assert names == ["torch", "numpy", "einops"]
    assert PYPROJECT["project"]["scripts"] == {"moe-replay": "moe_replay.__main__:main"}


def test_the_package_type_checks() -> None:
    """The package ships ``py.typed``, so a user's mypy reads its annotations: mypy finds no error in them (with the
    configuration in pyproject.toml, a fresh cache)."""
    pytest.importorskip("mypy")
    with tempfile.TemporaryDirectory() as cache:
        run = subprocess.run(
            [sys.executable, "-m", "mypy", "--cache-dir", cache, "-p", "moe_replay"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
        )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_repository_top_level_holds_only_the_project_files() -> None:
    """A file a test or an experiment writes into the working directory must not be committed."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("git is not available")
    # (entries on disk only: a copy of the working tree beside a stale index lists files deleted since)
    top = {line.split("/", 1)[0] for line in listed.stdout.splitlines() if line and (ROOT / line).exists()}
    allowed = {
        ".ci",
        ".gitignore",
        "LICENSE",
        "README.md",
        "benchmarks",
        "docs",
        "moe_replay",
        "notebooks",
        "pyproject.toml",
        "tests",
    }
    assert top <= allowed, f"unexpected tracked top-level entries: {sorted(top - allowed)}"
