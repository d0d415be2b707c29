"""Engine payloads of another model revision than the one they are read for, replayed on the target model.

Every reader gets a payload written (by the fake engines of :mod:`tests.interop.engines`) for a model
with other layers, another k or E, a dense layer elsewhere, an MTP layer, or for another sequence; each
must be refused with a :class:`~moe_replay.MoEReplayError`, at read time where the data proves it, else
by the replay on the target model: never forced on other layers or tokens. Ordinary payloads (a
prefix-cached SGLang request, vLLM's n > 1 samples, a stop-trimmed response) are read and replay.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from . import engines
from .engines import Model

pytestmark = pytest.mark.reliability("interop")


PROMPT, TOKENS = 4, 8


def _ids(n: int = TOKENS, seed: int = 0) -> list[int]:
    return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _replays(target: tuple[Any, mr.Session, mr.LayerMap], routes: Any, ids: list[int]) -> None:
    model, session, _ = target
    if isinstance(routes, list):
        (routes,) = routes
    with session.replay(routes):
        model(torch.tensor([ids]))


# ----------------------------------------------------------------------------- SGLang's meta_info counts
#: A model whose every hidden layer routes (Qwen3-MoE-like): no dense column to tell another model's rows.
ALL_MOE = Model(num_layers=4, moe_layers=(0, 1, 2, 3))


@pytest.fixture(scope="module")
def all_moe() -> tuple[Any, mr.Session, mr.LayerMap]:
    model = mr.models.build("softmax_topk", num_layers=4, first_dense_layers=0, num_experts=16, top_k=2)
    session = mr.attach(model)
    yield model, session, mr.LayerMap.from_session(session, num_layers=4)
    session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("other", [Model(num_layers=2, moe_layers=(0, 1)), Model(moe_layers=(0, 1, 2, 3), k=1)])
def test_an_sglang_payload_of_a_model_with_fewer_layers_or_a_smaller_k_is_refused_by_meta_info(all_moe, other) -> None:
    """Once a payload of a model with half the layers (or half the k), given with meta_info, was read as half as many
    rows (taken as a stop string's trim): replayed on the prompt's tokens alone, another model's experts were forced."""
    meta = engines.sglang_meta_info(other, other.truth(2 * PROMPT - 1, seed=4), prompt_len=PROMPT)  # 6 rows: 3 here
    model, session, lm = all_moe
    with pytest.raises(mr.RoutesValidationError, match=r"3 rows of num_hidden_layers\*k = 4\*2 .* at least 5 tokens"):
        interop.from_sglang(meta, lm)
    with pytest.raises(mr.RoutesValidationError, match="another model"):
        interop.from_sglang({"output_ids": [1, 2, 3], "meta_info": meta}, lm)


@pytest.mark.parametrize("generated", [0, 1, 3])
def test_meta_info_counts_do_not_refuse_a_trimmed_cached_or_start_len_payload(all_moe, generated: int) -> None:
    """A stop string's trim (earlier releases' completion_tokens count the trimmed tokens), prefix-cached prompt
    tokens (SGLang routes them from their KV slots; meta_info's cached_tokens) and routed_experts_start_len read."""
    model, session, lm = all_moe
    m = ALL_MOE
    truth = m.truth(PROMPT + generated, seed=5)
    trimmed = generated - 1 if generated else 0  # the stop's last token stays
    meta = engines.sglang_meta_info(m, truth, trim=trimmed)
    meta.update(prompt_tokens=PROMPT, completion_tokens=generated, cached_tokens=PROMPT - 1)  # len(output_ids)
    routes = interop.from_sglang(meta, lm)
    assert routes.num_tokens == truth.shape[0] - trimmed
    want = m.routes(truth[: routes.num_tokens]).per_layer()
    assert all(a.equal(b) for a, b in zip(routes.per_layer(), want, strict=True))
    _replays(all_moe, routes, _ids(routes.num_tokens))
    turn = engines.sglang_meta_info(m, truth, start_len=2, trim=trimmed)
    turn.update(prompt_tokens=PROMPT, completion_tokens=generated)
    assert interop.from_sglang(turn, lm, start_len=2).num_tokens == routes.num_tokens
    with pytest.raises(mr.RoutesValidationError, match="pass start_len=2"):  # rows from token 2 are not from token 0
        interop.from_sglang(turn, lm)
