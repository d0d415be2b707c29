"""Fake engine outputs, written the way each engine's own code writes them.

Each writer follows the code path cited in its docstring (version: file inside the
released package: line), step by step: the buffer it allocates, the columns each layer
writes, the rows it reads out, the dtype it casts to, the encoding it sends. The tests
feed these to moe_replay's readers and compare with the routes the fake engine was given.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

import moe_replay as mr


@dataclass(frozen=True)
class Model:
    """What an engine knows of a model: its hidden layers, which of them route, E and k."""

    num_layers: int = 4
    moe_layers: tuple[int, ...] = (1, 2, 3)  # DeepSeek-style first_k_dense_replace=1: layer 0 dense
    num_experts: int = 16
    k: int = 2
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(f"model.layers.{i}.mlp.gate" for i in self.moe_layers))

    @property
    def layer_map(self) -> mr.LayerMap:
        return mr.LayerMap.from_names(self.names, self.num_layers, self.num_experts, self.k)

    def truth(self, tokens: int, seed: int = 0) -> np.ndarray:
        """``[tokens, len(moe_layers), k]``: the experts each MoE layer chose for each token."""
        g = np.random.default_rng(seed)
        return np.stack(
            [[g.choice(self.num_experts, self.k, replace=False) for _ in self.moe_layers] for _ in range(tokens)]
        ).reshape(tokens, len(self.moe_layers), self.k)

    def routes(self, truth: np.ndarray, *, front: int = 0, last: bool = True) -> mr.Routes:
        """moe_replay's routes of those tokens: -1 for ``front`` leading tokens and (``last``) the last."""
        layers = [torch.from_numpy(truth[:, j].astype(np.int64)).clone() for j in range(len(self.moe_layers))]
        for x in layers:
            x[:front] = -1
            if last:
                x[-1] = -1
        return mr.Routes(layers, names=self.names, num_experts=self.num_experts)


def capture_buffer(model: Model, truth: np.ndarray, width: int | None = None) -> np.ndarray:
    """An engine's int32 zero buffer ``[tokens, num_hidden_layers, width]`` with each MoE layer's column written.

    vLLM 0.33.0 ``model_executor/layers/fused_moe/routed_experts_capturer.py:80-84`` (zeros, int32,
    ``(max_num_batched_tokens, num_layers, top_k)``) and ``:89-98`` (a layer writes its ``layer_id``
    column; dense columns stay 0). SGLang 0.5.23 ``state_capturer/base.py:38-42, 68-75`` (int32,
    host zero-filled). ``width`` > k pads the slots past k with -1 (SGLang's fused shared experts,
    ``state_capturer/routed_experts.py:119-121``).
    """
    t = truth.shape[0]
    buf = np.zeros((t, model.num_layers, width or model.k), dtype=np.int32)
    if width and width > model.k:
        buf[:, :, model.k :] = -1
    for j, layer_id in enumerate(model.moe_layers):
        buf[:, layer_id, : model.k] = truth[:, j]
    return buf


# ----------------------------------------------------------------------------- vLLM
def vllm_033_routed_experts(
    model: Model, truth: np.ndarray, prompt_len: int, *, prompt_start: int = 0, trim: int = 0
) -> np.ndarray:
    """``CompletionOutput.routed_experts`` as vLLM 0.22-0.33 return it for one sequence.

    ``truth`` covers the prompt and every generated token (before stop-string trimming).
    vLLM 0.33.0: buffer and columns as :func:`capture_buffer`; rows
    ``[routed_experts_prompt_start, request.num_tokens - 1)``
    (``distributed/aux_output_connector/connector.py:197-219``, ``token_end = request.num_tokens - 1``);
    dtype ``uint8 if num_experts <= 256 else uint16`` (``routed_experts_capturer.py:69``); a stop
    string that trims ``trim`` tokens drops their rows too (``v1/engine/output_processor.py:914-915``),
    so ``prompt_len - prompt_start + len(token_ids) - 1`` rows remain.
    """
    assert 0 <= prompt_start <= prompt_len  # v1/engine/input_processor.py:457-462
    buf = capture_buffer(model, truth)
    rows = buf[prompt_start : truth.shape[0] - 1]
    rows = rows[: rows.shape[0] - trim]
    return rows.astype(np.uint8 if model.num_experts <= 256 else np.uint16)


def vllm_033_request_output(
    model: Model,
    prompt_ids: list[int],
    samples: list[tuple[list[int], np.ndarray]],
    *,
    prompt_start: int = 0,
    trim: int = 0,
) -> SimpleNamespace:
    """A vLLM 0.22-0.33 ``RequestOutput``: one ``CompletionOutput.routed_experts`` per sample.

    ``CompletionOutput.routed_experts: np.ndarray | None  # [seq_len,layer_num,topk]``
    (vLLM 0.33.0 ``outputs.py:92``); no ``prompt_routed_experts`` attribute exists. With
    ``n > 1`` each child request carries its own full array (prompt rows repeated). ``samples``
    are (generated token ids before trimming, truth over prompt and those tokens).
    """
    outs = []
    for ids, truth in samples:
        arr = vllm_033_routed_experts(model, truth, len(prompt_ids), prompt_start=prompt_start, trim=trim)
        outs.append(SimpleNamespace(token_ids=ids[: len(ids) - trim], routed_experts=arr))
    return SimpleNamespace(prompt_token_ids=list(prompt_ids), outputs=outs)


def vllm_openai_field(arr: np.ndarray) -> str:
    """The OpenAI server's choice ``routed_experts``: base64 of an ``.npy`` file.

    vLLM 0.33.0 ``utils/serial_utils.py:67-71`` (``numpy2base64``), documented decode
    ``np.load(io.BytesIO(base64.b64decode(s)))`` (``entrypoints/openai/chat_completion/protocol.py:130-138``).
    """
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_020_routed_experts(model: Model, truth: np.ndarray) -> np.ndarray:
    """vLLM <= 0.20's ``routed_experts``: the int32 host buffer read by KV slot, all hidden layers.

    vLLM 0.20.0 ``model_executor/layers/fused_moe/routed_experts_capturer.py:135, 153, 302``;
    rows up to ``num_tokens - 1``.
    """
    return capture_buffer(model, truth)[: truth.shape[0] - 1].astype(np.int32)


def vllm_021_request_output(
    model: Model, prompt_ids: list[int], samples: list[tuple[list[int], np.ndarray]], *, cached: int = 0
) -> SimpleNamespace:
    """A vLLM 0.21.0 ``RequestOutput``: ``prompt_routed_experts`` plus completion-only ``routed_experts``.

    vLLM 0.21.0 ``model_executor/layers/fused_moe/routed_experts_capturer.py``: int16 (``:59, 103``),
    MoE layers only (``_count_moe_layers``, ``:225-242``), a per-request host buffer ``np.zeros``
    (``:124-148``) that prefix-cached prompt positions never fill, so they stay 0; split by
    ``split_routed_experts`` (``:666-702``) into ``RequestOutput.prompt_routed_experts`` (``outputs.py:124, 145``)
    ``[prompt_len]`` and completion rows ``[gen_len - 1]``.
    """
    p = len(prompt_ids)
    outs, prompt_part = [], None
    for ids, truth in samples:
        host = np.zeros((truth.shape[0], len(model.moe_layers), model.k), dtype=np.int16)
        host[cached : truth.shape[0] - 1] = truth[cached : truth.shape[0] - 1]
        prompt_part = host[:p]
        outs.append(SimpleNamespace(token_ids=list(ids), routed_experts=host[p : truth.shape[0] - 1]))
    return SimpleNamespace(prompt_token_ids=list(prompt_ids), prompt_routed_experts=prompt_part, outputs=outs)


# ----------------------------------------------------------------------------- SGLang
def sglang_meta_info(
    model: Model,
    truth: np.ndarray,
    *,
    start_len: int = 0,
    trim: int = 0,
    shared_slots: int = 1,
    prompt_len: int | None = None,
) -> dict[str, object]:
    """SGLang 0.5.23's ``meta_info`` with ``routed_experts`` for one sequence.

    Device buffer ``topk + num_fused_shared_experts`` wide, padded with -1
    (``state_capturer/routed_experts.py:119-121``), cut to ``[:topk]`` before the int32 host copy
    (``:145-147``, ``state_capturer/base.py:38-42, 68-75``); rows
    ``req_to_token[req_pool_idx][start_len : seqlen - 1]`` (``base.py:173-188``) with
    ``seqlen = len(origin_input_ids) + len(output_ids_through_stop)``
    (``scheduler_components/batch_result_processor.py:136-179``); sent as
    ``pybase64.b64encode(tensor.numpy().tobytes())`` (``managers/detokenizer_manager.py:432-448``):
    no dtype field. ``truth`` covers every token before ``trim`` stop-trimmed ones.

    Given ``prompt_len``, ``meta_info`` also holds SGLang's token counts, ``prompt_tokens =
    len(origin_input_ids)`` and ``completion_tokens = len(output_ids_through_stop)``
    (``managers/scheduler_components/output_streamer.py``, ``_GenerationStreamAccumulator.accept``).
    """
    device = capture_buffer(model, truth, width=model.k + shared_slots)
    host = np.ascontiguousarray(device[:, :, : model.k]).astype(np.int32)
    seqlen = truth.shape[0] - trim
    rows = host[start_len : seqlen - 1]
    meta: dict[str, object] = {"routed_experts": base64.b64encode(rows.tobytes()).decode()}
    if prompt_len is not None:
        meta.update(prompt_tokens=prompt_len, completion_tokens=seqlen - prompt_len)
    return meta


# ----------------------------------------------------------------------------- Megatron
def megatron_routing_indices(model: Model, truth: np.ndarray) -> np.ndarray:
    """Megatron-core 0.19 inference ``DynamicInferenceRequest.routing_indices``.

    ``[total_tokens - 1, num_moe_layers, topk]`` (``inference/inference_request.py:376-377, 470-477``),
    int32 (``inference/contexts/routing_metadata.py:50-54``).
    """
    return truth[: truth.shape[0] - 1].astype(np.int32)


# ----------------------------------------------------------------------------- verl
def verl_padded(rows_per_seq: list[np.ndarray], prompt_lens: list[int], prompt_width: int, response_width: int):
    """verl 0.9.1's padded agent-loop ``routed_experts`` and attention mask.

    ``verl/experimental/agent_loop/agent_loop.py:783-809``: a zero int16 tensor
    ``[1, prompt_width + response_width, L, k]`` per sample with the engine's rows placed from
    ``start_pos = prompt_width - len(prompt_ids)``; the batch stacks them.
    """
    b, layers, k = len(rows_per_seq), rows_per_seq[0].shape[1], rows_per_seq[0].shape[2]
    out = torch.zeros(b, prompt_width + response_width, layers, k, dtype=torch.int16)
    mask = torch.zeros(b, prompt_width + response_width, dtype=torch.long)
    for i, (rows, p) in enumerate(zip(rows_per_seq, prompt_lens, strict=True)):
        start = prompt_width - p
        out[i, start : start + rows.shape[0]] = torch.from_numpy(rows.astype(np.int16))
        mask[i, start : start + rows.shape[0] + 1] = 1  # the engine's rows stop one short of the last token
    return out, mask


# ----------------------------------------------------------------------------- NeMo-RL
def nemo_rl_routed_experts(
    model: Model, truth: np.ndarray, prompt_len: int, *, returned: int | None = None, split: bool = False
) -> np.ndarray:
    """The ``[S, L, K]`` array NeMo-RL's vLLM chat server attaches to a choice (NVIDIA-NeMo/RL @7ea279ab).

    ``nemo_rl/models/generation/vllm/utils.py:238-272``: ``valid_length = padded_length = prompt + generation
    tokens``; ``pad_and_align_routed_expert_indices`` (``:141-235``) concatenates 0.21's
    ``prompt_routed_experts`` (``split``: MoE layers only) or takes vLLM 0.22+'s array (all hidden layers,
    NeMo-RL pins vLLM 0.25.1), casts it to the carry dtype (``:36-58``, ``interfaces.py:61-69``), fills
    ``[S, L, K]`` with ``arange(K)`` (``:220-229``), copies the first ``min(S - 1, returned)`` rows
    (``:230-232``) and sets rows vLLM did not return to -1 (``:233-234``). ``returned`` defaults to
    all ``S - 1``.
    """
    s = truth.shape[0]
    rows = truth[: s - 1] if split else vllm_033_routed_experts(model, truth, prompt_len)
    rows = rows[: s - 1 if returned is None else returned]
    dtype = {"int8": np.int8, "int16": np.int16, "int32": np.int32}[
        "int8" if model.num_experts <= 128 else "int16" if model.num_experts <= 32768 else "int32"
    ]
    full = np.broadcast_to(np.arange(model.k, dtype=dtype), (s, rows.shape[1], model.k)).copy()
    full[: rows.shape[0]] = rows.astype(dtype)
    full[rows.shape[0] : s - 1] = -1
    return full


def nemo_rl_envelope(full: np.ndarray) -> str:
    """``encode_routed_experts`` (``nemo_rl/utils/routed_experts_codec.py:45-67``): ``nrlre1:<dtype>:<S>x<L>x<K>:``
    and base64 of the array's C-contiguous (native, little-endian) bytes.
    """
    return f"nrlre1:{full.dtype.name}:{'x'.join(map(str, full.shape))}:" + base64.b64encode(full.tobytes()).decode()
