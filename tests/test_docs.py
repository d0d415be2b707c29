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
    "generation_lengths",
    "BatchLayout",
    "pad_routes",
    "pack_routes",
    "RouterScores",
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


def _package_modules() -> list[str]:
    """Every module of the package, those of its subpackages too (``moe_replay.interop.vllm``: doctest runs the
    examples of a module's own objects only, so a subpackage's ``__init__`` does not run its modules'). Named, not
    imported: a module of an optional extra raises as it is imported where its extra is not installed."""
    return [mr.__name__] + [m.name for m in pkgutil.walk_packages(mr.__path__, "moe_replay.")]


def _imported(name: str) -> ModuleType:
    """The module ``name``; the test skips where it needs an optional extra that is not installed."""
    try:
        return importlib.import_module(name)
    except mr.MissingDependencyError as e:
        pytest.skip(str(e))


#: Modules a user reads first: each must carry examples.
EXAMPLE_MODULES = (
    "batch",
    "discovery",
    "distributed",
    "generation",
    "interop",
    "layer_map",
    "losses",
    "megatron",
    "nemo_rl",
    "metrics",
    "routes",
    "session",
    "sglang",
    "turns",
    "verl",
    "vllm",
)


@pytest.mark.parametrize("name", _package_modules())
def test_docstring_examples_run(name: str) -> None:
    """Every ``>>>`` example in the package runs and prints what it shows."""
    module = _imported(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} example(s) in {module.__name__} failed; see the output above"
    if module.__name__.rsplit(".", 1)[-1] in EXAMPLE_MODULES:
        assert result.attempted > 0, f"{module.__name__} has no example"


def test_the_examples_of_subpackage_modules_are_run() -> None:
    """Once only the package's top-level modules were walked: the examples of ``moe_replay.interop.vllm`` and the
    other engine readers (their module docstrings, ``from_vllm``...) were never run."""
    names = set(_package_modules())
    assert {"moe_replay.interop.vllm", "moe_replay.interop.sglang", "moe_replay.integrations.trl"} <= names


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


#: Every page a reader follows links on: README, docs/ and the benchmark results.
PAGES = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "RESULTS.md"]
)
_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def _prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans kept as plain text."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page has: its headings' slugs (repeats get -1, -2, ...) and HTML anchors."""
    text = _prose(page.read_text())
    seen: dict[str, int] = {}
    out = set(_HTML_ANCHOR.findall(text))
    for heading in _HEADING.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file does not exist or whose anchor is not in the target page."""
    text = _prose(page.read_text())
    broken = []
    for target in _INLINE_LINK.findall(text) + _REF_DEF.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path.startswith("/") or not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{fragment} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_resolve(page: str) -> None:
    broken = broken_links(ROOT / page)
    assert not broken, f"{page} has broken links: {broken}"


def test_every_linked_page_is_checked() -> None:
    assert {"README.md", "docs/concepts.md", "docs/api.md", "benchmarks/RESULTS.md"} <= set(PAGES)


def test_slugs_follow_github() -> None:
    assert slug("-1 rows: route natively") == "-1-rows-route-natively"
    assert slug("How that compares with Megatron's router replay") == "how-that-compares-with-megatrons-router-replay"
    assert slug("torch.compile") == "torchcompile"
    assert slug("Several processes (DDP, FSDP2)") == "several-processes-ddp-fsdp2"
    assert slug("`find_routers`") == "find_routers"
    assert slug("[Concepts](docs/concepts.md) in one paragraph") == "concepts-in-one-paragraph"


def test_the_checker_finds_broken_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n\n## A part\n\n```md\n## Not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n[ok](other.md) [ok](other.md#a-part) [ok](other.md#a-part-1) [ok](#here)\n"
        "[web](https://example.org/x#y) [bad](missing.md) [bad](other.md#nope) [bad](#not-here)\n"
        "[bad](other.md#not-a-heading)\n\n[ref]: other.md#gone\n\n```md\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "other.md#nope (no heading with anchor #nope in other.md)",
        "#not-here (no heading with anchor #not-here in page.md)",
        "other.md#not-a-heading (no heading with anchor #not-a-heading in other.md)",
        "other.md#gone (no heading with anchor #gone in other.md)",
    ]


def test_discovery_page_lists_the_hint_names() -> None:
    """docs/discovery.md's table of attribute names is the one discovery reads."""
    from moe_replay import discovery

    rows = {}
    for line in (ROOT / "docs" / "discovery.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0]] = tuple(re.findall(r"`([^`]+)`", cells[1]))
    assert rows["`E`, the expert count"] == discovery._EXPERT_KEYS
    assert rows["`k`, experts per token"] == discovery._TOPK_KEYS
    assert rows["nested configs searched"] == discovery._NESTED_CONFIGS
