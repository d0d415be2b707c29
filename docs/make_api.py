"""Generate docs/api.md from the docstrings of everything in ``moe_replay.__all__``.

    python docs/make_api.py            # rewrite docs/api.md
    python docs/make_api.py --check    # exit 1 if docs/api.md is out of date

The reference is the docstrings, rendered: Google-style sections (Args, Returns,
Raises, Attributes, Example) become headed lists, doctest examples become code blocks.
Edit the docstrings, then rerun this script; tests/test_docs.py checks it was rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import moe_replay  # noqa: E402

SECTIONS = ("Args", "Arguments", "Returns", "Raises", "Attributes", "Yields", "Example", "Examples", "Note")
#: The order of the reference: the workflow first, then data, then helpers, then errors.
ORDER = (
    "attach",
    "Session",
    "find_routers",
    "RouterSite",
    "Adapter",
    "format_sites",
    "Routes",
    "compare",
    "RoutingComparison",
    "load_balancing_loss",
    "split_generation",
    "generation_lengths",
    "generation_capacity",
    "BatchLayout",
    "pad_routes",
    "pack_routes",
    "LayerMap",
    "interop",
    "models",
    "index_dtype",
    "DEFAULT_CAPACITY",
)


# ----------------------------------------------------------------------------- docstrings
def _inline(text: str) -> str:
    """reST inline markup to Markdown: roles and double backquotes become code."""
    text = re.sub(r":(?:func|class|meth|attr|data|mod|exc|obj):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def render_docstring(doc: str, level: int = 4) -> str:
    """A Google-style docstring as Markdown."""
    out: list[str] = []
    lines = inspect.cleandoc(doc).splitlines()
    i = 0
    section: str | None = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        header = re.fullmatch(r"(\w+):", stripped)
        if header and header.group(1) in SECTIONS and not line.startswith(" "):
            section = header.group(1)
            out += ["", f"**{section}**", ""]
            i += 1
            continue
        if stripped.startswith(">>>"):  # a doctest block, up to the next blank line
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip())
                i += 1
            out += ["", "```python", *block, "```", ""]
            continue
        if re.fullmatch(r"=+( +=+)+", stripped):  # an reST simple table: keep it as text
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["", "```text", *block, "```", ""]
            continue
        if section in ("Args", "Arguments", "Attributes", "Raises") and line.startswith("    ") and stripped:
            item = re.match(r"    (\*{0,2}[\w, /.*]+?)( \([^)]*\))?: (.*)", line)
            if item and not line.startswith("        "):
                out.append(f"- `{item.group(1)}`{item.group(2) or ''}: {_inline(item.group(3))}")
            else:
                out[-1] += " " + _inline(stripped)
            i += 1
            continue
        if section and line.startswith("    "):
            out.append(_inline(stripped))
        else:
            if not stripped:
                section = section if section in ("Example", "Examples") else None
            out.append(_inline(line))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def constant_doc(name: str) -> str | None:
    """The ``#:`` comment above ``NAME =`` in the package sources."""
    pattern = re.compile(rf"((?:^#:.*\n)+)^{re.escape(name)}\s*[:=]", re.M)
    for path in sorted((ROOT / "moe_replay").glob("*.py")):
        m = pattern.search(path.read_text())
        if m:
            return " ".join(line[2:].strip() for line in m.group(1).splitlines())
    return None


def doc_of(name: str, obj: Any) -> str | None:
    """The documentation of a public name: its docstring, or a constant's ``#:`` comment."""
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return inspect.getdoc(obj)
    return constant_doc(name)


# ----------------------------------------------------------------------------- objects
def _annotation(ann: Any) -> str:
    return ann if isinstance(ann, str) else inspect.formatannotation(ann)


def _signature(obj: Callable[..., Any], name: str, *, returns: bool = True) -> str:
    """``name(params) -> ret`` as written in the source; one parameter a line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params: list[str] = []
    star_done = False
    P = inspect.Parameter
    for p in sig.parameters.values():
        text = p.name
        if p.kind is P.VAR_POSITIONAL:
            text, star_done = "*" + text, True
        elif p.kind is P.VAR_KEYWORD:
            text = "**" + text
        elif p.kind is P.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        if p.annotation is not P.empty:
            text += ": " + _annotation(p.annotation)
        if p.default is not P.empty:
            text += (" = " if p.annotation is not P.empty else "=") + repr(p.default)
        params.append(text)
        if p.kind is P.POSITIONAL_ONLY and all(
            q.kind is not P.POSITIONAL_ONLY for q in list(sig.parameters.values())[len(params) :]
        ):
            params.append("/")
    ret = ""
    if returns and sig.return_annotation is not P.empty:
        ret = " -> " + _annotation(sig.return_annotation)
    one_line = f"{name}({', '.join(params)}){ret}"
    if len(one_line) <= 100:
        return one_line
    return f"{name}(\n" + "".join(f"    {q},\n" for q in params) + f"){ret}"


def _members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties a class defines (not inherited from object/Exception)."""
    found = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") and name != "__getitem__":
            continue
        if isinstance(value, property) or inspect.isfunction(value):
            found.append((name, value))
        elif isinstance(value, classmethod | staticmethod):
            found.append((name, value.__func__))
    return found


def _method_signature(func: Callable[..., Any], name: str) -> str:
    """A method's signature without ``self`` / ``cls``."""
    text = _signature(func, name)
    return re.sub(
        r"\((\n    )?(self|cls)(,\n|, |\))",
        lambda m: "(" + ("\n" if m.group(3) == ",\n" else ")" if m.group(3) == ")" else ""),
        text,
        count=1,
    )


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9_ -]", "", title.lower()).replace(" ", "-")


def render_class(name: str, cls: type) -> list[str]:
    if issubclass(cls, BaseException):
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        return [f"## {name}", "", f"```python\nclass {name}({bases})\n```", "", render_docstring(cls.__doc__ or ""), ""]
    out = [f"## {name}", "", f"```python\nclass {_signature(cls, name, returns=False)}\n```", ""]
    out += [render_docstring(inspect.getdoc(cls) or ""), ""]
    for member, value in _members(cls):
        doc = inspect.getdoc(value) or ""
        if isinstance(value, property):
            out += [f"#### `{name}.{member}` (property)", "", render_docstring(doc), ""]
        else:
            out += [f"#### `{name}.{member}`", "", f"```python\n{_method_signature(value, member)}\n```", ""]
            out += [render_docstring(doc), ""]
    return out


def render_module(name: str, module: ModuleType) -> list[str]:
    out = [f"## {name}", "", f"The module `moe_replay.{name}`.", "", render_docstring(inspect.getdoc(module) or ""), ""]
    for member in getattr(module, "__all__", ()):
        value = getattr(module, member)
        doc = doc_of(member, value) or ""
        if inspect.isclass(value):
            sig = _signature(value, member, returns=False) if dataclasses.is_dataclass(value) else f"{member}(...)"
            out += [f"#### `{name}.{member}`", "", f"```python\nclass {sig}\n```", ""]
            out += [render_docstring(doc.split("\n\n")[0]), ""]
        elif inspect.isroutine(value):
            out += [f"#### `{name}.{member}`", "", f"```python\n{_signature(value, member)}\n```", ""]
            out += [render_docstring(doc), ""]
        else:
            out += [f"#### `{name}.{member}`", "", f"`{value!r}`" + (f": {_inline(doc)}" if doc else ""), ""]
    return out


def public_names() -> list[str]:
    names = [n for n in moe_replay.__all__ if not n.startswith("__")]
    ranked = [n for n in ORDER if n in names]
    errors = sorted(n for n in names if n.endswith("Error") and n not in ranked)
    rest = sorted(n for n in names if n not in ranked and n not in errors)
    return ranked + rest + errors


def render() -> str:
    names = public_names()
    out = [
        "# API reference",
        "",
        "<!-- Generated by docs/make_api.py from the docstrings; edit those, then rerun the script. -->",
        "",
        f"Everything below is importable from `moe_replay` (`import moe_replay as mr`), version "
        f"{moe_replay.__version__}. Start with [`attach`](#attach) and [`Session`](#session); "
        "[concepts.md](concepts.md) explains what capture and replay do.",
        "",
    ]
    out += [f"- [`{n}`](#{_anchor(n)})" for n in names]
    out.append("")
    for n in names:
        obj = getattr(moe_replay, n)
        if inspect.ismodule(obj):
            out += render_module(n, obj)
        elif inspect.isclass(obj):
            out += render_class(n, obj)
        elif inspect.isroutine(obj):
            out += [
                f"## {n}",
                "",
                f"```python\n{_signature(obj, n)}\n```",
                "",
                render_docstring(doc_of(n, obj) or ""),
                "",
            ]
        else:
            out += [f"## {n}", "", f"`{n} = {obj!r}`", "", _inline(doc_of(n, obj) or ""), ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python docs/make_api.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
