"""The scripts in docs/examples run as documented."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from . import distributed_worker

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_r3_example_on_two_processes(tmp_path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """Engine outputs (vLLM 0.33, SGLang 0.5.23) replayed in an FSDP2-sharded HF MoE; every route forced."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU ranks on any machine, as tests/test_distributed.py
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # spawned ranks import the example by name
    importlib.import_module("fsdp2_r3")  # (imports in this process first: an error shows here, not in a rank)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(distributed_worker.spawned_example, args=(2, init, "fsdp2_r3"), nprocs=2, join=True)
    out = capfd.readouterr().out
    assert out.count(". ok") == 2 and "recorded routes forced" in out
