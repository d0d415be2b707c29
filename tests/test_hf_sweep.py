"""Every MoE family of the installed transformers passes the four replay checks, or is refused.

One test per model type (see ``hf_sweep``); a family that does not build on CPU, or that is not
a routed MoE model of its own, is skipped with the reason.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

pytest.importorskip("transformers")

from . import hf_sweep
from .replay_checks import CHECKS, FamilyResult

_NOT_APPLICABLE = ("no-build", "no-model", "not-moe", "not-routed")
#: At least this share of the families that build must pass all four checks.
PASS_RATE = 0.95

Result = Callable[..., FamilyResult]


@pytest.fixture(scope="session")
def result(tmp_path_factory: pytest.TempPathFactory) -> Result:
    """``hf_sweep.result``, run once per family and dtype in the whole test run: with pytest-xdist the per-family
    tests and the pass-rate test land on different workers, which share each result through a file (under a lock,
    so that no family is run twice at the same time) instead of each running every family again."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return hf_sweep.result
    shared = tmp_path_factory.getbasetemp().parent / "hf_sweep_results"
    shared.mkdir(exist_ok=True)

    def shared_result(model_type: str, dtype: torch.dtype = torch.float32) -> FamilyResult:
        path = shared / f"{model_type}-{str(dtype).removeprefix('torch.')}.pickle"
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return pickle.loads(path.read_bytes())
            res = hf_sweep.result(model_type, dtype)
            part = Path(str(path) + ".part")
            part.write_bytes(pickle.dumps(res))
            part.replace(path)
            return res

    return shared_result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", hf_sweep.model_types())
def test_family(model_type: str, dtype: torch.dtype, result: Result) -> None:
    """fp32, and bf16 (routers that cast to fp32 themselves, bf16 ties) where the plain bf16 forward runs."""
    res = result(model_type, dtype)
    if res.status in _NOT_APPLICABLE:
        pytest.skip(f"{res.status}: {res.notes}")
    if res.status == "refused":
        assert "refused: " in res.notes and len(res.notes) > 40, "a refusal must say why"
        return
    failed = [c for c in CHECKS if not res.checks[c]]
    assert res.status == "pass", f"{model_type} failed {failed}: {res.notes}"


def test_pass_rate_over_families_that_build(result: Result) -> None:
    results: list[FamilyResult] = [result(t) for t in hf_sweep.model_types()]
    built = [r for r in results if r.built]
    passed = [r for r in built if r.status == "pass"]
    assert built, "no MoE family of this transformers builds on CPU"
    assert len(passed) >= PASS_RATE * len(built), [(r.model_type, r.notes) for r in built if r.status != "pass"]
    assert all(r.ok for r in built), "every family that builds passes or is refused at attach"


def test_enumeration_covers_every_config_with_expert_fields() -> None:
    """Cross-check the enumeration: any config with a field about experts (whatever its name) is a candidate."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    def expert_fields(model_type: str) -> bool:
        try:
            cls = CONFIG_MAPPING[model_type]
        except Exception:
            return False
        return any(re.search(r"num\w*experts|experts_num|n_\w*experts", f.name) for f in dataclasses.fields(cls))

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    named = {t for t in CONFIG_MAPPING_NAMES if expert_fields(t)}
    assert named, "transformers lists no config with expert fields"
    missing = named - set(hf_sweep.model_types())
    assert not missing, f"configs with expert fields the sweep does not enumerate: {sorted(missing)}"
