"""Misuse of the public API by a hurried user: an engine's base64 field that is cut, mangled, not text or of
another engine, handed to the readers of vLLM, SGLang and NeMo-RL; TRL trainer settings that the chosen
``routing_replay`` mode would not read. Each answer is the plain result, or a ``MoEReplayError`` that names what is
wrong and what to do."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

_LM = mr.LayerMap.from_names(["layers.0.gate", "layers.1.gate"], num_layers=2, num_experts=8, top_k=2)


def _rows(tokens: int = 5) -> np.ndarray:
    """``[tokens, 2 layers, k=2]`` distinct experts per row."""
    g = torch.Generator().manual_seed(tokens)
    return np.stack([[torch.randperm(8, generator=g)[:2].numpy() for _ in range(2)] for _ in range(tokens)])


def _vllm(field: Any) -> mr.Routes:
    return interop.from_vllm(field, _LM, prompt_len=3, completion_len=3)


def _vllm_decoded(field: Any) -> mr.Routes:
    return _vllm(interop.vllm_array_from_base64(field))


def _sglang(field: Any) -> mr.Routes:
    return interop.from_sglang({"routed_experts": field}, _LM)


def _nemo(field: Any) -> mr.Routes:
    return interop.from_nemo_rl(f"nrlre1:int8:6x2x2:{field}", _LM)


def _npy(arr: np.ndarray, *, pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=pickle)
    return buf.getvalue()


_VLLM_OK = base64.b64encode(_npy(_rows().astype(np.uint8))).decode()
_SGLANG_OK = base64.b64encode(_rows().astype("<i4").tobytes()).decode()
_NEMO_OK = base64.b64encode(np.concatenate([_rows(), np.tile([0, 1], (1, 2, 1))]).astype("<i1").tobytes()).decode()

#: (reader, the field it reads, cut or mangled, and the words its error must hold): what is wrong, and what to pass
_BAD: dict[str, tuple[Callable[[Any], mr.Routes], Any, tuple[str, ...]]] = {
    "vllm cut": (_vllm, _VLLM_OK[:-5], ("no whole groups of 4", "it was cut", "as the server sent it, whole")),
    "vllm cut on a group": (_vllm, _VLLM_OK[:-8], ("holds no whole array", "as the server sent it, whole")),
    "vllm mangled": (_vllm, _VLLM_OK[:10] + "%" + _VLLM_OK[11:], ("'%' at character 10", "as the server sent it")),
    "vllm raw bytes": (_vllm, _SGLANG_OK, ("not a .npy header", "from_sglang")),
    "vllm pickle": (
        _vllm,
        base64.b64encode(_npy(np.array([1, "a"], dtype=object), pickle=True)).decode(),
        ("Python objects (a pickle), which is never read", "as the server sent it"),
    ),
    "vllm not text": (
        _vllm_decoded,
        None,
        ("must be the base64 text the server sent", "got NoneType", "as it arrived"),
    ),
    "sglang cut": (_sglang, _SGLANG_OK[:-3], ("no whole groups of 4", "it was cut", "as the server sent it, whole")),
    "sglang mangled": (_sglang, "#" + _SGLANG_OK[1:], ("'#' at character 0", "as the server sent it")),
    "nemo cut": (_nemo, _NEMO_OK[:-1], ("no whole groups of 4", "it was cut", "as the server sent it, whole")),
    "nemo url-safe": (_nemo, _NEMO_OK.replace("/", "_").replace("+", "-") + "_", ("base64 does not use",)),
}


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("case", list(_BAD))
def test_an_engines_base64_field_cut_mangled_or_of_another_engine_says_what_is_wrong_and_what_to_pass(
    case: str,
) -> None:
    """Once unclear: a field that is no base64 was refused with the decoder's words alone ("Incorrect padding",
    "Only base64 data is allowed"), and base64 of something other than a .npy file with numpy's advice to load it
    unsafely with ``allow_pickle=`` (which this library never does). Each is now refused with what is wrong (cut
    short of whole 4-character groups, which character base64 does not use, not a .npy header, a pickle, data cut
    short) and what to pass: the field as the server sent it, whole, or the reader of the engine that writes such
    bytes. The fields whole are read."""
    read, field, words = _BAD[case]
    with pytest.raises(mr.RoutesValidationError) as err:
        read(field)
    text = str(err.value)
    for w in words:
        assert w in text, (w, text)
    assert "allow_pickle" not in text and "Incorrect padding" not in text
    # the same reader reads the field whole
    whole = {_vllm: _VLLM_OK, _vllm_decoded: _VLLM_OK, _sglang: _SGLANG_OK, _nemo: _NEMO_OK}[read]
    assert read(whole).layer("layers.1.gate")[:5].tolist() == _rows()[:, 1].tolist()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    ("mode", "setting", "value"),
    [
        ("measure", "verify_replay", True),
        ("off", "verify_replay", True),
        (False, "verify_replay", np.True_),
        ("off", "replay_ref_model", True),
    ],
    ids=["verify, measure", "verify, off", "verify, False", "ref required, off"],
)
def test_a_trainer_setting_its_routing_replay_mode_would_not_read_is_refused(
    mode: str | bool, setting: str, value: Any
) -> None:
    """Once silent: ``RoutingReplayGRPOTrainer(routing_replay="measure", verify_replay=True)`` trained with no
    check at all (only replayed forwards are verified, and "measure" replays none), and ``routing_replay="off"``
    with ``replay_ref_model=True``, which its docstring calls required (an error otherwise), trained with no
    session on the reference model. Both are refused before the trainer is built, naming the setting and the mode
    that has it; the model is not touched."""
    pytest.importorskip("trl")
    from moe_replay.integrations import trl as mr_trl

    model = mr.models.build("softmax_topk")
    forwards = {n: m.forward for n, m in model.named_modules()}
    with pytest.raises(mr.InvalidArgumentError) as err:
        mr_trl.RoutingReplayGRPOTrainer(model=model, routing_replay=mode, **{setting: value})
    text = str(err.value)
    assert f"{setting}=True" in text and "routing_replay='replay'" in text and "leave the setting out" in text
    assert {n: m.forward for n, m in model.named_modules()} == forwards
    assert all(getattr(m.forward, "__moe_replay_hook__", None) is None for m in model.modules())
    # what each mode does read is taken as before: verification in "replay", a required reference in "measure"
    mr_trl._check_mode_reads("replay", True, True)
    mr_trl._check_mode_reads("measure", True, False)
