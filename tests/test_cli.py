"""The command line: demo and inspect (reference styles, HF checkpoint folders, HF model types)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay.__main__ import _as_options, demo, main


def test_demo_reports_drift_then_exact_replay(capsys) -> None:
    out = demo(new_tokens=6)
    text = capsys.readouterr().out
    assert out["free_drift"] > 0 and out["replay_drift"] == 0.0 and out["min_grad"] > 0
    assert "OK: replay reproduced every recorded route" in text
    # the row count is explained: a prompt of 8, then every generated token but the last
    assert "captured 13 tokens x 4 routers while generating 6\n   (the prompt's 8, then 5 generated" in text


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
    # (``python -m moe_replay --help`` is run once, in test_program_name_is_the_console_script_or_the_module)


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_every_command_has_help_with_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"moe-replay {command}" in text and "python -m" not in text
    assert max(map(len, text.splitlines())) <= 100, "the help's prose is wrapped for a terminal"


def test_program_name_is_the_console_script_or_the_module(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: moe-replay ")
    res = subprocess.run([sys.executable, "-m", "moe_replay", "--help"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("usage: python -m moe_replay ") and "python -m moe_replay demo" in res.stdout
    assert "demo" in res.stdout and "inspect" in res.stdout and "examples:" in res.stdout
    script = Path(sys.executable).parent / "moe-replay"  # installed by pip install -e .
    if script.exists():
        res = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True, check=True)
        assert res.stdout.startswith("usage: moe-replay demo ") and "python -m" not in res.stdout


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe_replay {mr.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "no_such_device"])
def test_demo_on_an_unusable_device_is_one_line(device: str, capsys) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this device exists here")
    assert main(["demo", "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing of the demo ran
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith((f"error: --device {device}", f"error: --device '{device}'")), captured.err
    if device == "cuda" and torch.version.cuda is None:
        assert "CPU-only build" in lines[0] and torch.__version__ in lines[0]


def test_demo_device_error_from_the_shell() -> None:
    """The same through the interpreter: one line on stderr, no traceback, a non-zero status."""
    if torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    res = subprocess.run(
        [sys.executable, "-m", "moe_replay", "demo", "--device", "cuda"], capture_output=True, text=True
    )
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr and "cuda" in res.stderr


def test_inspect_reference(capsys) -> None:
    assert main(["inspect", "linear_gate", "--layers", "3", "--verify"]) == 0
    text = capsys.readouterr().out
    model = mr.models.build("linear_gate", num_layers=3)
    for name, module in model.named_modules():
        if isinstance(module, mr.models.MoEBlock):
            assert f"{name}.gate " in text
            assert f"{name}.gate: k=2 of 8, ran 1x, decides with #0 topk(k=2) over 8 at models.py:" in text
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
    assert main(["inspect", "softmax_topk", "--include", "nothing.matches"]) == 2  # (an option this model refuses)
    assert "matched no module" in capsys.readouterr().err


def test_demo_token_counts_it_cannot_or_can_run(capsys) -> None:
    """--new-tokens 0 is a one-line usage error; past the reference model's 512 positions the demo still runs."""
    for bad in ("0", "-3"):
        assert main(["demo", "--new-tokens", bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == f"error: --new-tokens must be at least 1, got {bad}\n"
    with pytest.raises(mr.InvalidArgumentError, match="at least 1"):
        demo(new_tokens=0)
    assert demo(new_tokens=510)["replay_drift"] == 0.0  # 8 prompt tokens + 510: over max_positions=512


def test_inspect_layers_must_be_positive(capsys) -> None:
    """--layers 0 built a model with no router and blamed discovery ("no MoE router found")."""
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "softmax_topk", "--layers", bad])
        assert exit_info.value.code == 2
        assert f"argument --layers: must be at least 1, got {bad}" in capsys.readouterr().err
    assert main(["inspect", "softmax_topk", "--layers", "3"]) == 0
    assert "layers.2.mlp.router" in capsys.readouterr().out


def test_inspect_a_checkpoint_directory_transformers_cannot_load(tmp_path, capsys) -> None:
    """A broken config.json, or no weights: one line naming the folder, not transformers' traceback."""
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text("not json")
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: cannot load the checkpoint directory {tmp_path}: OSError: ")
        and len(err.splitlines()) == 1
    ), err
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')  # no weights beside it
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the checkpoint directory") and len(err.splitlines()) == 1, err


def test_inspect_a_model_type_transformers_cannot_build(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from moe_replay import _hf

    def broken(*args, **kwargs):
        raise AttributeError("'MusicgenConfig' object has no attribute 'dropout'")  # as musicgen does

    monkeypatch.setattr(_hf, "tiny_model", broken)
    assert main(["inspect", "musicgen"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build a tiny random 'musicgen': AttributeError: 'MusicgenConfig' object")
    assert len(err.splitlines()) == 1


def test_inspect_without_transformers(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["inspect", "qwen3_moe"]) == 1
    assert "pip install" in capsys.readouterr().err
    assert main(["inspect", "top1_argmax"]) == 0  # reference models need no transformers
    capsys.readouterr()
    assert main(["inspect", "softmax-topk"]) == 1  # a typo of a style: not only "install transformers"
    err = capsys.readouterr().err
    assert "'softmax-topk' is not a reference style (softmax_topk, " in err and "pip install" in err
    assert len(err.splitlines()) == 1


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


def test_inspect_says_when_layers_is_capped_at_the_default_depth(capsys) -> None:
    """--layers past an HF type's default depth built that depth and said so only in --help."""
    transformers = pytest.importorskip("transformers")
    default = transformers.AutoConfig.for_model("qwen3_moe").num_hidden_layers
    assert main(["inspect", "qwen3_moe", "--layers", str(default + 1)]) == 0
    text = capsys.readouterr().out
    assert f", {default} layers (its default depth; --layers {default + 1} asks for more)" in text.splitlines()[0]
    assert f"{default} router(s)" in text
    assert main(["inspect", "qwen3_moe", "--layers", "2"]) == 0
    assert "default depth" not in capsys.readouterr().out


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
@pytest.mark.parametrize(
    "call, error",
    [
        (lambda hf: hf.tiny_config("qwen2_moe", 2.5), mr.InvalidArgumentError),
        (lambda hf: hf.tiny_config("qwen2_moe", 0), mr.InvalidArgumentError),
        (lambda hf: hf.tiny_config("qwen2_moe", True), mr.InvalidArgumentError),
        (lambda hf: hf.tiny_config(["qwen2_moe"]), mr.ArgumentTypeError),
        (lambda hf: hf.load_checkpoint(None), mr.ArgumentTypeError),
    ],
    ids=["layers-2.5", "layers-0", "layers-True", "type-list", "path-None"],
)
def test_hf_loaders_refuse_arguments_of_the_wrong_kind(call: Callable[[Any], object], error: type) -> None:
    """Once 2.5 layers or a list as the model type raised transformers' or Python's own error, and 0 layers built
    a model of no layer."""
    pytest.importorskip("transformers")
    from moe_replay import _hf

    with pytest.raises(error):
        call(_hf)


def test_a_model_with_no_replayable_router_is_refused_as_such(capsys) -> None:
    """PhiMoE's only routers are refused: no advice to exclude them "to replay the others"."""
    pytest.importorskip("transformers")
    from moe_replay._hf import tiny_model

    assert main(["inspect", "phimoe"]) == 0
    text = capsys.readouterr().out
    assert "none of its routers can be replayed exactly" in text and "the others" not in text
    with pytest.raises(mr.UnsupportedRouterError) as info:
        mr.attach(tiny_model("phimoe"))
    assert "No router of this model can be replayed exactly" in str(info.value)
    assert "the others" not in str(info.value)
    model = mr.models.build("softmax_topk")  # some refused, some not: excluding them is the advice
    refuse_first = mr.Adapter("x", match=lambda n, m: n == "layers.0.mlp.router", unsupported="a test refusal")
    with pytest.raises(mr.UnsupportedRouterError, match="to replay the others"):
        mr.attach(model, adapters=[refuse_first])


@pytest.mark.reliability("bad inputs")
def test_errors_suggest_options_not_python_keywords(capsys) -> None:
    """The CLI's errors say --include/--exclude/--top-k, never include= (Python syntax)."""
    for argv in (["--include", "nothing.matches"], ["--exclude", "*"]):
        assert main(["inspect", "softmax_topk", *argv]) == 2
        err = capsys.readouterr().err
        assert argv[0] in err, err  # (an exclude that takes out every router is named as the cause)
        assert not re.search(r"\b(include|exclude|top_k|num_experts)=", err), err
    assert "--exclude 'x'" in _as_options("try mr.attach(model, exclude='x')")
    assert _as_options("pass top_k=/num_experts= if") == "pass --top-k/--num-experts if"
    # the bare names too ("leave top_k out"), but not an attribute or a longer name
    for argv in (["--top-k", "99"], ["--num-experts", "5"], ["--top-k", "3", "--verify"]):
        assert main(["inspect", "softmax_topk", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and argv[0] in err, err
        assert not re.search(r"\b(top_k|num_experts)\b", err), err
    attributes = "config.top_k; cfg.num_experts"
    assert _as_options(f"leave top_k out; {attributes}") == f"leave --top-k out; {attributes}"


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("option", ["--top-k", "--num-experts"])
@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_inspect_counts_must_be_positive_whole_numbers(option: str, bad: str, capsys) -> None:
    """--top-k 0 said "top_k must be a positive int (or None: ...)", in Python's words, with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "softmax_topk", option, bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and bad in err and "Traceback" not in err, err
    assert "top_k" not in err and "num_experts" not in err


@pytest.mark.reliability("bad inputs")
def test_demo_on_the_meta_device_is_one_line(capsys) -> None:
    """--device meta passed the device check and ended in a traceback from the first forward."""
    assert main(["demo", "--device", "meta"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("error: --device meta: ") and "use cpu" in captured.err


def test_demo_refused_by_the_library_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A refusal during the demo (a router this torch or device cannot prove) is its message, not a traceback."""
    import moe_replay.__main__ as cli

    def refused(*args: object, **kwargs: object) -> dict[str, float]:
        raise mr.UnsupportedRouterError("router 'r' cannot be proven here")

    monkeypatch.setattr(cli, "demo", refused)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == "error: router 'r' cannot be proven here\n"


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--seed", str(2**64)],
        ["inspect", "softmax_topk", "--seed", str(-(2**63) - 1)],
        ["inspect", "softmax_topk", "--include", ""],
        ["inspect", "softmax_topk", "--exclude", " "],
    ],
    ids=["demo-seed-too-big", "inspect-seed-too-small", "empty-include", "blank-exclude"],
)
def test_seeds_torch_cannot_take_and_empty_patterns_are_usage_errors(argv: list[str], capsys) -> None:
    """A seed past 64 bits ended in torch's OverflowError traceback; --include '' took the whole model as a router."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"error: argument {argv[-2]}: " in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_seeds_at_the_ends_of_torch_range_run(capsys) -> None:
    for seed in (str(2**64 - 1), str(-(2**63))):
        assert main(["inspect", "softmax_topk", "--seed", seed]) == 0
        assert "2 router(s), 2 not refused before a forward" in capsys.readouterr().out


def test_inspect_without_verify_does_not_call_a_router_replayable_that_attach_refuses(capsys) -> None:
    """``--top-k 5`` on top-2 routers printed "4 replayable" where attach() refuses every one."""
    assert main(["inspect", "softmax_topk", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert "replayable" not in text and "--verify runs that forward now" in text
    assert main(["inspect", "softmax_topk", "--top-k", "5", "--verify"]) != 0
    assert "replayable" not in capsys.readouterr().out


@pytest.mark.reliability("bad inputs")
def test_demo_new_tokens_past_what_a_reference_model_holds_is_a_usage_error(capsys) -> None:
    """--new-tokens past the positions a reference model may hold exited 1 (the code of a failed replay) with advice
    naming config fields (num_layers, max_positions, ...) that no option of the command sets."""
    assert main(["demo", "--new-tokens", str(10**11)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"error: --new-tokens {10**11}: ") and "ask for fewer --new-tokens" in captured.err
    assert "max_positions" not in captured.err


@pytest.mark.reliability("bad inputs")
def test_inspect_verify_that_runs_no_forward_exits_1(capsys) -> None:
    """``inspect MODEL --verify`` on a model whose routers attach() refuses printed "verify: skipped" and exited 0, so a
    script that gates on the check took the skipped check for a passed one."""
    model = mr.models.build("softmax_topk", num_layers=2)
    refuse_first = mr.Adapter("x", match=lambda n, m: n == "layers.0.mlp.router", unsupported="a test refusal")
    refused = [s for s in mr.find_routers(model, adapters=[refuse_first]) if s.unsupported]
    assert refused  # (the refusal the command meets below, made by the library itself)
    import moe_replay.__main__ as cli

    real = cli.find_routers

    def with_refusal(model: torch.nn.Module, **kwargs: Any) -> Any:
        return real(model, adapters=[refuse_first], **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "find_routers", with_refusal)
        assert main(["inspect", "softmax_topk", "--layers", "2", "--verify"]) == 1
        captured = capsys.readouterr()
        assert "verify: skipped" in captured.out and len(captured.err.splitlines()) == 1
        assert captured.err.startswith("error: --verify ran no forward") and "--exclude them" in captured.err
        assert main(["inspect", "softmax_topk", "--layers", "2"]) == 0  # (without --verify: the table is the answer)
    assert main(["inspect", "softmax_topk", "--layers", "2", "--verify"]) == 0
    if importlib.util.find_spec("transformers") is not None:  # every router refused: nothing to exclude
        assert main(["inspect", "phimoe", "--verify"]) == 1
        assert "nothing to verify" in capsys.readouterr().err
