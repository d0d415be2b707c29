"""Misuse of a session between and around the forwards of one block: casts, mode switches, a weight reparametrized,
checkpoint wrappers put in, checkpointed replays whose backwards run later and in another order, -1 rows with a
capture and kept scores inside the replay. Each replay is checked against the recorded experts forced by hand
(``TinyMoE``'s own forced path, which never calls moe_replay) and against the experts each layer used."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint as C
from torch import nn
from torch.nn.utils import parametrize

import moe_replay as mr
from tests.tinymoe import RouterSpec, TinyMoE

SPECS = [RouterSpec(8, 2), RouterSpec(6, 1, "argmax"), RouterSpec(8, 2, "grouped", n_group=4, topk_group=2)]
TOKENS = 12


def _used(model: TinyMoE) -> list[torch.Tensor]:
    return [layer.chosen.long().clone() for layer in model.layers]


class _LowRank(nn.Module):
    """A LoRA-like additive low-rank update of a router's weight, as a parametrization."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = nn.Parameter(torch.randn(rows, 2, generator=g))
        self.b = nn.Parameter(torch.randn(2, cols, generator=g))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.a @ self.b


def _low_rank(model: TinyMoE) -> None:
    for layer in model.layers:
        parametrize.register_parametrization(layer.router, "weight", _LowRank(*layer.router.weight.shape))


def _checkpointed(model: TinyMoE) -> None:
    for layer in model.layers:
        inner = layer.forward
        layer.forward = lambda x, forced=None, inner=inner: C.checkpoint(inner, x, forced, use_reentrant=False)


CHANGES: dict[str, Callable[[TinyMoE], object]] = {
    "cast-to-float64": lambda m: m.double(),
    "cast-to-bfloat16": lambda m: m.to(torch.bfloat16),
    "switched-to-eval": lambda m: m.eval(),
    "router-weight-reparametrized": _low_rank,
    "layers-wrapped-in-checkpoints": _checkpointed,
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_model_changed_between_the_forwards_of_one_replay_forces_the_recorded_experts(change: str) -> None:
    """Two forwards replayed in one block, the model cast, switched to eval, its router weights reparametrized by a
    low-rank update, or its layers wrapped in non-reentrant checkpoints between them: every forward uses the rows
    recorded for it, its output and gradients (after the block, through the recomputes, where the change leaves the
    first forward's graph whole) those of the recorded experts forced by hand on a copy changed alike."""
    model = TinyMoE(SPECS).train()
    xs = [model.inputs((TOKENS,), seed=i) for i in range(2)]
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            for x in xs:
                model(x)
        routes = session.routes()
        model.perturb(scale=3.0)
        ref = copy.deepcopy(model)
        rows = [routes.layer(name).long() for name in model.router_names]
        outs: list[torch.Tensor] = []
        expected: list[torch.Tensor] = []
        with session.replay(routes):
            for i, x in enumerate(xs):
                if i:
                    CHANGES[change](model)
                    CHANGES[change](ref)
                dtype = model.layers[0].expert_emb.dtype
                out = model(x.to(dtype))
                forced = [r[i * TOKENS : (i + 1) * TOKENS] for r in rows]
                for name, used, want in zip(model.router_names, _used(model), forced, strict=True):
                    assert torch.equal(used, want), f"'{name}' of forward {i}: not the recorded experts"
                want = ref(x.to(dtype), forced=forced)
                assert torch.equal(out.detach(), want.detach())
                if change == "router-weight-reparametrized":  # (the change rewrites the weight a graph saved)
                    out.float().square().sum().backward()
                    want.float().square().sum().backward()
                else:
                    outs.append(out)
                    expected.append(want)
        if outs:
            sum(o.float().square().sum() for o in outs).backward()
            sum(e.float().square().sum() for e in expected).backward()
        want_grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert (p.grad is None) == (want_grads[name].grad is None), name
            assert p.grad is None or torch.equal(p.grad, want_grads[name].grad), name


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_checkpointed_replays_whose_backwards_run_later_and_reversed_give_each_its_own_rows(
    checkpointing: str,
) -> None:
    """Two replays of checkpointed forwards of other routes, and a capture's checkpointed forward followed by a
    replay, each backward run after the later block (the later forward's first): every recompute gets its own
    forward's rows, so the gradients are those of each forward's backward run at once."""
    model = mr.models.build("softmax_topk", checkpointing=checkpointing, num_layers=2, hidden_size=16)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (2, 6), generator=g) for _ in range(2))

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(a)
        ra = session.routes()
        with torch.no_grad(), session.capture():
            model(b)
        rb = session.routes()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".router." in n or n.endswith("gate.weight"):
                    p.add_(torch.randn(p.shape, generator=g))
        for routes, ids in ((ra, a), (rb, b)):
            with session.replay(routes):
                model(ids, labels=ids).loss.backward()
        at_once = grads()
        assert at_once
        with session.replay(ra):
            la = model(a, labels=a).loss
        with session.replay(rb):
            lb = model(b, labels=b).loss
        lb.backward()
        la.backward()
        later = grads()
        assert later.keys() == at_once.keys()
        assert all(torch.equal(later[n], at_once[n]) for n in at_once)
        # a capture's forward whose backward runs after a replay of other routes: its recompute gets its own rows
        with session.capture():
            la = model(a, labels=a).loss
        captured = session.routes()
        with session.replay(rb):
            lb = model(b, labels=b).loss
        lb.backward()
        la.backward()
        later = grads()
        with session.replay(captured):
            model(a, labels=a).loss.backward()
        with session.replay(rb):
            model(b, labels=b).loss.backward()
        assert all(torch.equal(later[n], v) for n, v in grads().items())


@pytest.mark.reliability("silent replays")
def test_a_capture_and_kept_scores_inside_a_replay_with_native_rows_hold_the_experts_used() -> None:
    """Routes with -1 rows (tokens 3 to 5 routed natively) replayed with a capture and ``keep_scores`` inside: the
    output is the hand-forced one with those rows native, and both the capture and the kept indices hold the experts
    each layer used, forced and native alike; the capture replays as recorded after the routers change again."""
    model = TinyMoE(SPECS)
    x = model.inputs((TOKENS,), seed=0)
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        model.perturb(scale=3.0)
        rows = [routes.layer(name).long().clone() for name in model.router_names]
        for r in rows:
            r[3:6] = -1
        partial = mr.Routes(rows, names=model.router_names, num_experts=[s.num_experts for s in SPECS])
        with torch.no_grad(), session.replay(partial), session.capture(), session.keep_scores() as kept:
            out = model(x)
        assert torch.equal(out, copy.deepcopy(model)(x, forced=rows))
        used = _used(model)
        assert any(not torch.equal(u[3:6], r[3:6]) for u, r in zip(used, routes.per_layer(), strict=True))
        again = session.routes()
        assert again.missing.sum() == 0
        for name, u in zip(model.router_names, used, strict=True):
            assert torch.equal(again.layer(name).long(), u)
            assert torch.equal(kept[name][1].long(), u)
        model.perturb(seed=5, scale=3.0)
        with torch.no_grad(), session.replay(again):
            out = model(x)
        assert torch.equal(out, copy.deepcopy(model)(x, forced=used))
