"""Private torch internals: found in one module, refused with a clear error when missing."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moe_replay as mr
from moe_replay import _torch_compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_replay"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _private_torch_uses(source: str, name: str) -> list[str]:
    """``torch._x`` attribute chains, ``from torch... import _x`` and ``t._dynamo_*`` in code (not comments)."""
    found = []
    tree = ast.parse(source)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # report whole chains once
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _dotted(node) or ""
            if chain.startswith("torch.") and any(p.startswith("_") and not p.endswith("__") for p in chain.split(".")):
                found.append(f"{name}:{node.lineno}: {chain}")
            elif node.attr.startswith("_dynamo"):
                found.append(f"{name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(p.startswith("_") for p in (node.module or "").split(".")):
                found.append(f"{name}:{node.lineno}: from {node.module} import {[a.name for a in node.names]}")
    return found


def test_private_torch_names_are_used_only_in_the_compat_module() -> None:
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_torch_compat.py"]
    elsewhere = [u for p in files for u in _private_torch_uses(p.read_text(), p.name)]
    assert not elsewhere, f"private torch internals outside moe_replay/_torch_compat.py: {elsewhere}"
    sample = (
        "import torch\nfrom torch.utils.checkpoint import _CheckpointFrame, checkpoint\n"
        "# torch._C._x in a comment\ntorch._C._current_graph_task_id()\nt._dynamo_static_input_type = 1\n"
        "torch.compiler.is_compiling()\ntorch.__version__\n"
    )
    assert [u.split(": ")[1] for u in _private_torch_uses(sample, "s")] == [
        "from torch.utils.checkpoint import ['_CheckpointFrame', 'checkpoint']",
        "torch._C._current_graph_task_id",
        "._dynamo_static_input_type",
    ]


def test_this_torch_has_every_internal() -> None:
    assert _torch_compat.missing() == {}, f"torch {torch.__version__} lacks {_torch_compat.missing()}"
    assert _torch_compat.CheckpointFrame is not None
    assert _torch_compat.current_graph_task_id() == -1  # outside backward
    assert _torch_compat.top_saved_tensors_hooks() is None  # no saved-tensor hooks active here


def test_tested_range_is_the_declared_one_and_holds_this_torch() -> None:
    specifiers = pytest.importorskip("packaging.specifiers")
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch" + _torch_compat.TESTED_TORCH in deps
    assert specifiers.SpecifierSet(_torch_compat.TESTED_TORCH).contains(torch.__version__.split("+")[0])


@pytest.fixture
def without_graph_task_id(monkeypatch: pytest.MonkeyPatch):
    """moe_replay as it imports on a torch that lacks ``torch._C._current_graph_task_id``."""
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    importlib.reload(_torch_compat)
    yield
    monkeypatch.undo()
    importlib.reload(_torch_compat)
    assert _torch_compat.missing() == {}


def test_a_missing_internal_is_refused_at_attach_naming_torch(without_graph_task_id) -> None:
    assert "torch._C._current_graph_task_id" in _torch_compat.missing()
    model = mr.models.build("softmax_topk")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mr.MoEReplayError) as info:
        mr.attach(model)
    text = str(info.value)
    assert "torch._C._current_graph_task_id" in text and torch.__version__ in text and "tested with torch>=" in text
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(mr.MoEReplayError, match="does not have"):  # a direct call: the same error, not AttributeError
        _torch_compat.current_graph_task_id()


def test_attach_works_again_after_the_internal_is_back() -> None:
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (1, 4))
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        assert session.routes().num_tokens == 4


def test_a_missing_speed_hint_warns_once_and_replay_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``maybe_mark_dynamic`` a compiled model only recompiles more: a warning, not an error."""
    import types

    monkeypatch.setitem(sys.modules, "torch._dynamo", types.ModuleType("torch._dynamo"))
    monkeypatch.setattr(_torch_compat, "_warned", set())
    t = torch.zeros(3)
    with pytest.warns(UserWarning, match="maybe_mark_dynamic"):
        _torch_compat.maybe_mark_dynamic(t, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _torch_compat.maybe_mark_dynamic(t, 0)  # once only
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (1, 4))
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        with session.replay(routes):
            model(x)


def test_the_hot_paths_flags_say_what_torchs_own_functions_say() -> None:
    assert _torch_compat.COMPILER._is_compiling_flag is torch.compiler.is_compiling() is False
    assert _torch_compat._CompilingFlag()._is_compiling_flag is False  # the stand-in where torch keeps no flag
    assert bool(_torch_compat.CUDA._initialized) == torch.cuda.is_initialized()
    assert _torch_compat._CudaState()._initialized == torch.cuda.is_initialized()
    capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
    assert bool(_torch_compat.graph_capturing()) == capturing
    assert _torch_compat.top_saved_tensors_hooks() is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert _torch_compat.top_saved_tensors_hooks() is not None
    assert _torch_compat.dynamo_compiling() is False

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if _torch_compat.dynamo_compiling() else x - 1

    assert traced(torch.zeros(1)).item() == 1.0  # dynamo reads it as True
