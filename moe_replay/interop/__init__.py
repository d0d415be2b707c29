"""Explicit conversions between :class:`~moe_replay.Routes` and the formats of engines and trainers.

Every format here is a per-sequence array of expert indices ``[tokens, layers, k]`` (or a
list of per-layer arrays); they differ in which tokens and layers they hold, in dtype and
in encoding, and they changed between releases. One module per engine reads and writes
each release's layout, detects the layout where the array tells it (dtype, width against
the :class:`LayerMap`, row count against prompt and completion) and takes ``version=``
otherwise; anything that does not fit is refused, and rows are never shifted to fit.
docs/formats.md is the table of formats, with the source of every fact.

==========================  ============================================================
engine / trainer            readers and writers
==========================  ============================================================
vLLM 0.22-0.33, <= 0.20     from_vllm_output, from_vllm, to_vllm,
                            from_vllm_legacy, to_vllm_legacy
vLLM 0.21                   from_vllm_split, to_vllm_split
SGLang 0.5                  from_sglang, to_sglang
Megatron-core 0.19          to_megatron, from_megatron,
                            from_megatron_inference, to_megatron_inference
verl 0.9                    to_verl, from_verl
NeMo-RL (@7ea279ab)         from_nemo_rl, to_nemo_rl, nemo_rl_dtype
multi-turn                  stitch_turns
==========================  ============================================================

**Layers.** Engines number layers by the model's hidden-layer index ("all hidden layers":
dense layers get a column of zeros) or count only MoE layers. A :class:`LayerMap` ties
each router name to its hidden-layer index. A dense layer's column holding anything but
zeros means the map is wrong, and is refused.

**The last token.** Engines never route the last sampled token. Every ``from_*`` function
returns routes aligned to *all* tokens (prompt plus completion) and gives the last token
(and tokens the engine was asked to leave out at the front) a -1 row, which replay routes
natively. Every ``to_*`` function for an engine drops the last row (NeMo-RL's writes its
placeholder row there); it refuses if the row holds a route unless ``drop_last=True``.

**Places.** The readers of one sequence (``from_vllm_output``, ``from_vllm``, ``from_vllm_legacy``,
``from_vllm_split``, ``from_sglang``, ``from_nemo_rl``, ``from_megatron_inference`` and each
sequence of ``from_verl``) hold its rows from its first token, so row t is at place t of the
sequence, and the routes keep that place per row, as a capture's rows do: rows sliced without
their token ids (a sequence- or context-parallel rank's, with ``routes[...]``) are forced only
on tokens fed at those places (their ``position_ids``, or the places an attention mask gives),
and another rank's slice, or chunks fed as one run, are refused. Rows a reader placed by their
row count alone (no ``num_tokens=``, ``prompt_len=`` or ids to count the tokens) keep none: the
token their first row is is not known. ``from_megatron`` keeps no places: Megatron's
per-layer list is a micro-batch of packed or ``[S, B]`` sequences whose boundaries it does not
hold; lay such rows out with :class:`~moe_replay.BatchLayout`.

Example:
    >>> import numpy as np, moe_replay as mr
    >>> lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    >>> lm.dense_layers
    (0,)
    >>> engine = np.zeros((2, 2, 2), np.uint8)        # vLLM 0.22+: 3 tokens, 2 routed rows, 2 hidden layers
    >>> engine[:, 1] = [[0, 3], [1, 2]]
    >>> r = mr.interop.from_vllm(engine, lm, prompt_len=2, completion_len=1)
    >>> r.layer("model.layers.1.mlp.gate").tolist()
    [[0, 3], [1, 2], [-1, -1]]
    >>> np.array_equal(mr.interop.to_vllm(r, lm), engine)
    True
"""

from __future__ import annotations

from .layer_map import LayerMap
from .megatron import (
    check_megatron_config,
    from_megatron,
    from_megatron_inference,
    to_megatron,
    to_megatron_inference,
)
from .nemo_rl import from_nemo_rl, nemo_rl_dtype, to_nemo_rl
from .sglang import from_sglang, to_sglang
from .turns import stitch_turns
from .verl import from_verl, to_verl
from .vllm import (
    from_vllm,
    from_vllm_legacy,
    from_vllm_output,
    from_vllm_split,
    to_vllm,
    to_vllm_legacy,
    to_vllm_split,
    vllm_array_from_base64,
    vllm_array_to_base64,
    vllm_dtype,
    vllm_layout,
)

__all__ = [
    "LayerMap",
    "check_megatron_config",
    "from_megatron",
    "from_megatron_inference",
    "from_nemo_rl",
    "from_sglang",
    "from_verl",
    "from_vllm",
    "from_vllm_legacy",
    "from_vllm_output",
    "from_vllm_split",
    "nemo_rl_dtype",
    "stitch_turns",
    "to_megatron",
    "to_megatron_inference",
    "to_nemo_rl",
    "to_sglang",
    "to_verl",
    "to_vllm",
    "to_vllm_legacy",
    "to_vllm_split",
    "vllm_array_from_base64",
    "vllm_array_to_base64",
    "vllm_dtype",
    "vllm_layout",
]
