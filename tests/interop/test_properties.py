"""Any model shape and any offset: the engines' arrays read back to what the engine routed, and write back exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moe_replay import interop

from ..conftest import examples
from .engines import Model, sglang_meta_info, vllm_033_request_output


@st.composite
def cases(draw):
    num_layers = draw(st.integers(1, 6))
    dense = draw(st.integers(0, num_layers - 1))  # first_k_dense_replace
    num_experts = draw(st.sampled_from([2, 8, 256, 257, 512]))
    k = draw(st.integers(1, min(num_experts, 4)))
    model = Model(num_layers=num_layers, moe_layers=tuple(range(dense, num_layers)), num_experts=num_experts, k=k)
    prompt_len = draw(st.integers(1, 6))
    gen_len = draw(st.integers(1, 5))
    start = draw(st.integers(0, prompt_len))
    trim = draw(st.integers(0, gen_len - 1))
    return model, prompt_len, gen_len, start, trim, draw(st.integers(0, 2**16))


@examples(40)
@given(cases())
def test_vllm_and_sglang_read_every_row_in_place(case) -> None:
    m, p, g, start, trim, seed = case
    truth = m.truth(p + g, seed=seed)
    kept = truth[: p + g - trim]
    out = vllm_033_request_output(m, list(range(p)), [(list(range(g)), truth)], prompt_start=start, trim=trim)
    arr = out.outputs[0].routed_experts
    assert arr.dtype == (np.uint8 if m.num_experts <= 256 else np.uint16)
    r = interop.from_vllm_output(out, m.layer_map, prompt_start=start)
    assert r.equal(m.routes(kept, front=start))
    assert np.array_equal(interop.to_vllm(r, m.layer_map, prompt_start=start), arr)
    meta = sglang_meta_info(m, truth, start_len=start, trim=trim)
    s = interop.from_sglang(meta, m.layer_map, num_tokens=p + g - trim, start_len=start, axes="tokens,layers,k")
    assert s.equal(r)
    assert interop.to_sglang(s, m.layer_map, start_len=start) == {"routed_experts": meta["routed_experts"]}
