"""The command line: demo and inspect (reference styles, HF checkpoint folders, HF model types)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import moe_replay as mr
from moe_replay.__main__ import _as_options, demo, main


def test_demo_reports_drift_then_exact_replay(capsys) -> None:
    out = demo(new_tokens=6)
    text = capsys.readouterr().out
    assert out["free_drift"] > 0 and out["replay_drift"] == 0.0 and out["min_grad"] > 0
    assert "OK: replay reproduced every recorded route" in text


def test_demo_every_style() -> None:
    for style in mr.models.STYLES:
        assert main(["demo", "--style", style, "--new-tokens", "3"]) == 0


def test_module_entry_point_help_and_no_transformers_import() -> None:
    code = (
        "import sys, runpy; sys.argv = ['moe_replay', 'inspect', 'linear_gate']; "
        "import moe_replay\n"
        "try:\n    runpy.run_module('moe_replay', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('transformers imported:', 'transformers' in sys.modules, 'rc', rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "layers.0.mlp.gate" in res.stdout
    assert "transformers imported: False rc 0" in res.stdout
    res = subprocess.run([sys.executable, "-m", "moe_replay", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in res.stdout and "inspect" in res.stdout and "examples:" in res.stdout


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_every_command_has_help_with_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"python -m moe_replay {command}" in text


def test_inspect_reference(capsys) -> None:
    assert main(["inspect", "linear_gate", "--layers", "3", "--verify"]) == 0
    text = capsys.readouterr().out
    model = mr.models.build("linear_gate", num_layers=3)
    for name, module in model.named_modules():
        if isinstance(module, mr.models.MoEBlock):
            assert f"{name}.gate " in text
    assert "verify: one forward" in text


def test_inspect_include_exclude(capsys) -> None:
    assert main(["inspect", "softmax_topk", "--exclude", "layers.1.*"]) == 0
    text = capsys.readouterr().out
    assert "layers.0.mlp.router" in text and "layers.1.mlp.router" not in text
    assert main(["inspect", "softmax_topk", "--include", "layers.1.mlp.router"]) == 0
    text = capsys.readouterr().out
    assert "layers.1.mlp.router" in text and "layers.0.mlp.router" not in text


def test_inspect_errors_are_one_line_and_exit_1(tmp_path, capsys) -> None:
    assert main(["inspect", "not_a_model_type_at_all"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not_a_model_type_at_all" in err and "softmax_topk" in err
    assert main(["inspect", str(tmp_path)]) == 1  # a folder without config.json
    assert "config.json" in capsys.readouterr().err
    assert main(["inspect", "softmax_topk", "--include", "nothing.matches"]) == 1
    assert "matched no module" in capsys.readouterr().err


def test_inspect_without_transformers(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["inspect", "qwen3_moe"]) == 1
    assert "pip install" in capsys.readouterr().err
    assert main(["inspect", "top1_argmax"]) == 0  # reference models need no transformers


# ----------------------------------------------------------------------------- HF
def _moe_block_gates(model: torch.nn.Module, config) -> list[str]:
    """Module paths of the router of every sparse layer, from the model's own layer list."""
    layers = model.model.layers
    return [f"model.layers.{i}.mlp.gate" for i in range(len(layers)) if hasattr(layers[i].mlp, "experts")]


def test_inspect_hf_model_type(capsys) -> None:
    pytest.importorskip("transformers")
    from moe_replay._hf import tiny_model

    assert main(["inspect", "qwen3_moe", "--verify"]) == 0
    text = capsys.readouterr().out
    model = tiny_model("qwen3_moe")
    expected = _moe_block_gates(model, model.config)
    assert expected and all(f"{n} " in text for n in expected)
    assert f"{len(expected)} router(s), {len(expected)} replayable" in text
    assert "verify: one forward" in text


def test_inspect_hf_checkpoint_directory(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    from moe_replay._hf import load_checkpoint, tiny_model

    model = tiny_model("mixtral", num_hidden_layers=3, seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert type(loaded) is type(model)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k

    assert main(["inspect", str(tmp_path), "--verify"]) == 0
    text = capsys.readouterr().out
    expected = _moe_block_gates(model, model.config)
    assert len(expected) == 3 and all(f"{n} " in text for n in expected)
    assert "checkpoint directory" in text and "verify: one forward" in text


def test_tiny_config_caps_layers_and_takes_overrides() -> None:
    """The family rules themselves are exercised on every MoE family by the HF sweep."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    from moe_replay._hf import tiny_config

    full = AutoConfig.for_model("qwen2_moe")
    cfg = tiny_config("qwen2_moe", 3, num_experts=16)
    assert cfg.num_hidden_layers == 3 and cfg.num_experts == 16
    assert cfg.hidden_size < full.hidden_size and cfg.vocab_size < full.vocab_size
    assert len(cfg.layer_types) == 3  # per-layer lists follow the depth
    with pytest.raises(ValueError, match="not a model type"):
        tiny_config("no_such_model_type")


@pytest.mark.reliability("bad inputs")
def test_errors_suggest_options_not_python_keywords(capsys) -> None:
    """The CLI's errors say --include/--exclude/--top-k, never include= (Python syntax)."""
    for argv in (["--include", "nothing.matches"], ["--exclude", "*"]):
        assert main(["inspect", "softmax_topk", *argv]) == 1
        err = capsys.readouterr().err
        assert "--include" in err, err
        assert not re.search(r"\b(include|exclude|top_k|num_experts)=", err), err
    assert "--exclude 'x'" in _as_options("try mr.attach(model, exclude='x')")
    assert _as_options("pass top_k=/num_experts= if") == "pass --top-k/--num-experts if"
