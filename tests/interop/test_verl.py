"""verl 0.9.1: the agent loop's padded int16 ``routed_experts``."""

from __future__ import annotations

import numpy as np
import torch

from moe_replay import interop

from .engines import Model, capture_buffer, verl_padded

M = Model()


def test_padded_agent_loop_layout() -> None:
    """verl 0.9.1 ``verl/experimental/agent_loop/agent_loop.py:783-809``: int16, the engine's rows placed
    from ``start_pos = prompt_width - len(prompt_ids)``, zeros elsewhere (the last token's row too).
    """
    prompt_width, response_width = 6, 5
    prompts, responses = [4, 6], [3, 5]
    truths = [M.truth(p + c, seed=i) for i, (p, c) in enumerate(zip(prompts, responses, strict=True))]
    engine_rows = [capture_buffer(M, t)[:-1] for t in truths]  # what SGLang / vLLM 0.22+ returned: all layers
    batch, mask = verl_padded(engine_rows, prompts, prompt_width, response_width)
    seqs = interop.from_verl(batch, mask, M.layer_map)
    assert all(s.equal(M.routes(t)) for s, t in zip(seqs, truths, strict=True))
    back = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, prompt_width=prompt_width, response_width=5)
    assert back.dtype == torch.int16
    for i, c in enumerate(responses):
        last = prompt_width + c - 1
        assert bool((back[i, last, list(M.moe_layers)] == -1).all())  # the unrouted last token stays -1
        back[i, last] = 0
    assert torch.equal(back, batch)
    moe_layout = interop.to_verl(seqs, M.layer_map, prompt_lengths=prompts, layout="moe")
    assert moe_layout.shape == (2, prompt_width + max(responses), 3, 2)
    assert np.array_equal(moe_layout[0, 2:8].numpy().astype(np.int64), truths[0][:6])  # MoE columns only
