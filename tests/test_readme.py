"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _python_blocks()
    assert blocks, "the README has a python quick start"
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "README quick start", "exec"), scope)
    model = scope["model"]
    assert (tmp_path / "routes.npz").exists()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("router.weight"))
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert 10 <= len(blocks[0].strip().splitlines()) <= 20


def test_every_other_python_block_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks()[1:]
    assert blocks, "the README has a rollout-to-training example"
    scopes = []
    for i, block in enumerate(blocks, 1):
        scope: dict[str, object] = {}
        exec(compile(block, f"README python block {i + 1}", "exec"), scope)
        scopes.append(scope)
    rollout = next(s for s in scopes if "report" in s)
    report = rollout["report"]
    assert report.tokens > 0 and report.overall == 0.0  # replay reproduced every recorded route
    assert not rollout["session"].attached
    assert all(p.grad is not None for n, p in rollout["model"].named_parameters() if n.endswith("router.weight"))


def _setup_section() -> str:
    text = README.read_text()
    start = text.index("\n## Set-up\n")
    return text[start : text.index("\n## ", start + 1)]


def test_two_setup_commands_and_ci_runs_the_test_one() -> None:
    """A fresh machine needs two commands: the demo, and the tests; CI runs the tests' command verbatim."""
    setup = _setup_section()
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    demo, tests = commands
    assert demo.startswith("pip install -e . && ") and demo.endswith(" demo")
    assert tests.startswith('pip install -e ".[test]" && ') and "pytest" in tests
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert tests in ci, ".ci/run must run the README's test command as written"
    assert "demo" in _parser_commands()


def _parser_commands() -> set[str]:
    from moe_replay.__main__ import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    return set(sub.choices)


def test_the_torch_build_is_chosen_before_the_commands() -> None:
    """A reader going top to bottom meets the CPU-build step before any install command."""
    tomllib = pytest.importorskip("tomllib")
    setup = _setup_section()
    cpu = re.search(r'`pip install "torch([^"]*)" --index-url https://download\.pytorch\.org/whl/cpu`', setup)
    assert cpu and cpu.start() < setup.index("```bash"), "the CPU-build step comes first"
    declared = next(
        d
        for d in tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert "torch" + cpu.group(1) == declared, "the CPU build must satisfy the declared range, or pip swaps it"
    ci_torch = re.search(r"pip install -q torch==([\d.]+)", (README.parent / ".ci" / "run").read_text())
    specifiers = pytest.importorskip("packaging.specifiers")
    assert ci_torch and specifiers.SpecifierSet(cpu.group(1)).contains(ci_torch.group(1))
