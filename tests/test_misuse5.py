"""Misuse with the libraries users combine moe_replay with: PEFT adapters, accelerate's hooks and empty
weights, ``DistributedDataParallel`` and FSDP2 in one process, ``torch.compile(dynamic=True)``, autocast,
inference mode and train mode switched between capture and replay, and ``generate()`` modes split per sequence.

Each case must end in a ``MoEReplayError`` that leaves the model as it was, or in a replay that forces exactly
the recorded experts with the output of a replay written by hand: never a replay that forces nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_misuse import _forced, _ids

tiny_hf = pytest.importorskip("tests.tiny_hf")


def _hf_forced_by_hand(model: nn.Module, x: torch.Tensor, routes: mr.Routes) -> torch.Tensor:
    """The logits of ``model(x)`` on a copy whose Qwen3-MoE or Mixtral gates take their experts from ``routes``, row
    after row in call order, with the combine weights gathered from their own softmax: no moe_replay. A gate under a
    PEFT wrapper (``<name>.base_layer``) is the routes' router of the wrapper's name."""
    ref = copy.deepcopy(model)
    rows = {name: routes.layer(name) for name in routes.names}
    used = dict.fromkeys(rows, 0)
    for name, module in ref.named_modules():
        key = name.removesuffix(".base_layer")
        if key not in rows or not hasattr(module, "top_k"):
            continue

        def forward(h: torch.Tensor, module: nn.Module = module, key: str = key) -> tuple[torch.Tensor, ...]:
            h = h.reshape(-1, module.hidden_dim)
            logits = F.linear(h, module.weight)
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            indices = rows[key][used[key] : used[key] + h.shape[0]]
            used[key] += h.shape[0]
            weights = probs.gather(-1, indices)
            if getattr(module, "norm_topk_prob", True):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(logits.dtype), indices

        module.forward = forward
    out = ref(x).logits
    assert used and all(used[n] == rows[n].shape[0] for n in rows), "the reference did not consume every row"
    return out


def _hooks_and_forwards(model: nn.Module) -> dict[str, tuple[object, ...]]:
    """Per module: its class, hooks and own ``forward`` (what a refusal must leave as it was; values on the meta
    device cannot be compared)."""
    return {
        name: (type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.get("forward"))
        for name, m in model.named_modules()
    }


# ----------------------------------------------------------------------------- a model on the meta device, then loaded
def _empty_hf() -> tuple[nn.Module, nn.Module]:
    accelerate = pytest.importorskip("accelerate")
    loaded = tiny_hf.build("qwen3_moe")
    with accelerate.init_empty_weights():
        empty = tiny_hf.transformers.AutoModelForCausalLM.from_config(loaded.config).eval()
    return empty, loaded


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("block", ["capture", "replay"])
@pytest.mark.parametrize("fed", ["real ids", "ids on meta"])
def test_a_model_of_empty_weights_run_in_a_block_is_refused_and_replays_once_loaded(fed: str, block: str) -> None:
    """Once a raw ``NotImplementedError`` (torch.nonzero on meta) from the runs that tell the routers' token order: a
    model built under accelerate's ``init_empty_weights`` (its weights on meta) run in a capture or a replay before
    its weights are loaded. Refused naming the meta device, with no hook left; loaded with ``assign=True`` after
    attach, the same session captures and forces the recorded experts as a replay by hand does."""
    empty, loaded = _empty_hf()
    x = _ids()
    session = mr.attach(empty)
    before = _hooks_and_forwards(empty)
    want_routes = _forced(tiny_hf_routes(loaded, x))  # (for the replay block: routes of these tokens)
    blocks: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
        "capture": session.capture,
        "replay": lambda: session.replay(want_routes),
    }
    with pytest.raises((mr.UnsupportedRouterError, mr.SessionStateError), match="meta device"):
        with torch.no_grad(), blocks[block]():
            empty(x if fed == "real ids" else x.to("meta"))
    assert _hooks_and_forwards(empty) == before
    empty.load_state_dict(loaded.state_dict(), assign=True)
    with torch.no_grad(), session.capture():
        empty(x)
    forced = _forced(session.routes())
    with torch.no_grad(), session.replay(forced), session.capture():
        got = empty(x).logits
    assert session.routes().equal(forced)
    assert torch.equal(got, _hf_forced_by_hand(loaded, x, forced))
    session.detach()
    assert all("forward" not in m.__dict__ for m in empty.modules())


def tiny_hf_routes(model: nn.Module, x: torch.Tensor) -> mr.Routes:
    """What ``model``'s routers choose for ``x`` (a session of its own)."""
    with mr.attach(model) as session, torch.no_grad(), session.capture():
        model(x)
    return session.routes()
