"""The documentation: every public name documented, examples that run, docs/api.md current, links that resolve."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import moe_replay as mr

ROOT = Path(__file__).resolve().parents[1]
#: The names a reader meets first; each must show an example in its docstring.
MAIN = (
    "attach",
    "Session",
    "find_routers",
    "Adapter",
    "Routes",
    "format_sites",
    "compare",
    "load_balancing_loss",
    "split_generation",
    "index_dtype",
    "models",
)


def _make_api() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_api = _make_api()
PUBLIC = [n for n in mr.__all__ if not n.startswith("__")]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring(name: str) -> None:
    doc = make_api.doc_of(name, getattr(mr, name))
    assert doc and len(doc.strip()) > 20, f"moe_replay.{name} has no docstring (or #: comment for a constant)"


@pytest.mark.parametrize("name", [n for n in MAIN if n in PUBLIC])
def test_main_names_show_an_example(name: str) -> None:
    assert ">>>" in (make_api.doc_of(name, getattr(mr, name)) or ""), f"moe_replay.{name} needs an Example"


@pytest.mark.parametrize("name", ["Session", "Routes"])
def test_public_methods_are_documented(name: str) -> None:
    undocumented = [m for m, v in make_api._members(getattr(mr, name)) if not (v.__doc__ or "").strip()]
    assert not undocumented, f"{name} members without a docstring: {undocumented}"


def _package_modules() -> list[ModuleType]:
    return [mr] + [importlib.import_module(f"moe_replay.{m.name}") for m in pkgutil.iter_modules(mr.__path__)]


#: Modules a user reads first: each must carry examples.
EXAMPLE_MODULES = (
    "batch",
    "discovery",
    "distributed",
    "generation",
    "interop",
    "losses",
    "metrics",
    "routes",
    "session",
)


@pytest.mark.parametrize("module", _package_modules(), ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    """Every ``>>>`` example in the package runs and prints what it shows."""
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} example(s) in {module.__name__} failed; see the output above"
    if module.__name__.rsplit(".", 1)[-1] in EXAMPLE_MODULES:
        assert result.attempted > 0, f"{module.__name__} has no example"


def test_api_reference_is_current() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == make_api.render(), "run python docs/make_api.py"


def test_api_reference_lists_every_public_name() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    assert all(f"\n## {n}\n" in text for n in PUBLIC)


def test_render_docstring_sections_and_examples() -> None:
    doc = """Summary line.

    Args:
        x: the first
            argument, continued.
        **kw: options.

    Example:
        >>> 1 + 1
        2
    """
    md = make_api.render_docstring(doc)
    assert "- `x`: the first argument, continued." in md and "- `**kw`: options." in md
    assert "```python\n>>> 1 + 1\n2\n```" in md and "**Args**" in md and "**Example**" in md


@pytest.mark.parametrize("page", ["README.md", "docs/concepts.md", "docs/api.md"])
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    missing = [link for link in local if not (path.parent / link).exists()]
    assert not missing, f"{page} links to missing files: {missing}"
