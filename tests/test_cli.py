"""The command line: demo and inspect."""

from __future__ import annotations

import subprocess
import sys

import moe_replay as mr
from moe_replay.__main__ import demo, main


def test_demo_reports_drift_then_exact_replay(capsys) -> None:
    out = demo(new_tokens=6)
    text = capsys.readouterr().out
    assert out["free_drift"] > 0 and out["replay_drift"] == 0.0 and out["min_grad"] > 0
    assert "OK: replay reproduced every recorded route" in text


def test_demo_every_style() -> None:
    for style in mr.models.STYLES:
        assert main(["demo", "--style", style, "--new-tokens", "3"]) == 0


def test_module_entry_point_help() -> None:
    res = subprocess.run([sys.executable, "-m", "moe_replay", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in res.stdout and "inspect" in res.stdout


def test_inspect_reference(capsys) -> None:
    assert main(["inspect", "linear_gate"]) == 0
    assert "layers.0.mlp.gate" in capsys.readouterr().out
