"""Adversarial review of replay inside training steps (round 45): routes replayed in the forwards of a training step
(micro-batches, activation checkpointing, double backward, compiled steps, train-mode randomness, an optimizer step
between capture and replay, TRL's GRPOTrainer) force the captured experts, with the gradients of the same model whose
top-k is replaced by those experts by hand, or the step is refused before it runs. Never neither."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from tests.conftest import tried

E, D, K, V = 8, 16, 2, 50


class _Gate(nn.Module):
    """A softmax top-k router with dropout before it and multiplicative jitter in training; ``forced`` (the reference)
    replaces its top-k by the given experts, their weights gathered from the same probabilities."""

    def __init__(self, drop: float, jitter: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) * 0.5)
        self.top_k, self.num_experts, self.jitter = K, E, jitter
        self.drop = nn.Dropout(drop)
        self.forced: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.drop(x)
        if self.training and self.jitter:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = F.linear(x, self.weight)
        probs = logits.softmax(-1, dtype=torch.float)
        if self.forced is None:
            weights, idx = torch.topk(probs, K, dim=-1)
        else:
            idx = self.forced
            weights = probs.gather(-1, idx)
        return logits, (weights / weights.sum(-1, keepdim=True)).to(x.dtype), idx


class _Block(nn.Module):
    def __init__(self, drop: float, jitter: float) -> None:
        super().__init__()
        self.gate = _Gate(drop, jitter)
        self.w = nn.Parameter(torch.randn(E, D, D) / D**0.5)
        self.used: list[torch.Tensor] = []  # (the experts each call dispatched to, forwards and recomputes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        _, weights, idx = self.gate(x)
        self.used.append(idx.detach().clone())
        every = torch.einsum("td,edf->tef", x, self.w)
        y = (weights[..., None] * every.gather(1, idx[..., None].expand(-1, -1, D))).sum(1)
        return (x + torch.tanh(y)).reshape(h.shape)


class _Model(nn.Module):
    """Two MoE layers between an embedding and a head, each checkpointed (``ckpt``) while gradients are on."""

    def __init__(self, ckpt: str = "none", drop: float = 0.0, jitter: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList(_Block(drop, jitter) for _ in range(2))
        self.head = nn.Linear(D, V)
        self.ckpt = ckpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            if self.ckpt == "none" or not torch.is_grad_enabled():
                h = layer(h)
            else:
                h = checkpoint(layer, h, use_reentrant=self.ckpt == "reentrant")
        return self.head(h)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        out = self(ids)
        return F.cross_entropy(out[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _ids(seed: int = 1, shape: tuple[int, int] = (3, 7)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _step_routers(model: _Model, seed: int) -> None:
    """An optimizer step's change of the router weights: large enough that the routers choose other experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.weight.add_(2 * torch.randn(E, D, generator=g))


def _forced_copy(model: _Model, **kw: Any) -> _Model:
    """The same model as a fresh module, its top-k to be replaced by hand (:func:`_force`)."""
    ref = _Model(**kw)
    ref.load_state_dict(model.state_dict())
    ref.train(model.training)
    return ref


def _force(model: _Model, rows: torch.Tensor | None) -> None:
    for i, layer in enumerate(model.layers):
        layer.gate.forced = None if rows is None else rows[:, i].long()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def _captured(model: _Model, ids: torch.Tensor, session: mr.Session) -> mr.Routes:
    with session.capture(), torch.no_grad():
        model.loss(ids)
    return session.routes()


# ----------------------------------------------------------------------------- double backward
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["none", "non_reentrant"])
def test_a_double_backward_through_the_replayed_combine_weights_equals_the_model_forced_by_hand(ckpt: str) -> None:
    """A gradient penalty on the router weights (``autograd.grad(create_graph=True)``, then backward of its norm)
    differentiates the replayed combine weights twice; after an optimizer step the routers would choose otherwise."""
    ids = _ids()
    model = _Model(ckpt)
    session = mr.attach(model)
    routes = _captured(model, ids, session)
    _step_routers(model, seed=2)
    with session.capture(), torch.no_grad():
        model.loss(ids)
    assert not session.routes().equal(routes)  # (free, the stepped routers choose other experts)
    ref = _forced_copy(model, ckpt=ckpt)
    with session.replay(routes):
        loss = model.loss(ids)
    gates = [layer.gate.weight for layer in model.layers]
    penalty = sum((g**2).sum() for g in torch.autograd.grad(loss, gates, create_graph=True))
    penalty.backward()  # type: ignore[union-attr]
    session.detach()
    _force(ref, routes.indices)
    ref_loss = ref.loss(ids)
    ref_gates = [layer.gate.weight for layer in ref.layers]
    sum((g**2).sum() for g in torch.autograd.grad(ref_loss, ref_gates, create_graph=True)).backward()  # type: ignore[union-attr]
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    _assert_same_grads(_grads(model), _grads(ref))
    tried(1)


# ----------------------------------------------------------------------------- the first training forward
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["none", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("noise", ["dropout", "jitter"])
def test_a_rollout_captured_in_eval_replays_in_the_first_train_mode_forward_as_forced_by_hand(
    ckpt: str, noise: str
) -> None:
    """R3 as a trainer runs it: routes captured in eval mode without gradients, an optimizer step, then the first
    forward in train mode (dropout before the router, or jitter only in training) is a replay with gradients under
    activation checkpointing: its decision is established then, under replay, and the random stream the model draws
    from must be the one a plain forward draws (the forced-by-hand reference draws it under the same seed)."""
    ids = _ids(4)
    kw: dict[str, Any] = {"ckpt": ckpt, "drop": 0.3 if noise == "dropout" else 0.0, "jitter": 0.3 * (noise == "jitter")}
    model = _Model(**kw).eval()
    session = mr.attach(model)
    routes = _captured(model, ids, session)
    _step_routers(model, seed=3)
    model.train()
    ref = _forced_copy(model, **kw)
    for layer in model.layers:
        layer.used.clear()
    with session.replay(routes):
        torch.manual_seed(7)
        loss = model.loss(ids)
    loss.backward()
    session.detach()
    for i, layer in enumerate(model.layers):  # every call, the recomputes too, used the captured experts
        assert layer.used and all(torch.equal(u, routes.indices[:, i].long()) for u in layer.used)
    _force(ref, routes.indices)
    torch.manual_seed(7)
    ref_loss = ref.loss(ids)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    _assert_same_grads(_grads(model), _grads(ref))
    tried(1)


# ----------------------------------------------------------------------------- micro-batches
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["none", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("how", ["a block per micro-batch", "one block around all", "blocks, then backward"])
def test_micro_batches_replaying_slices_of_one_capture_accumulate_the_gradients_forced_by_hand(
    ckpt: str, how: str
) -> None:
    """Gradient accumulation over micro-batches (one sequence each) that replay slices ``routes[i:j]`` of one
    rollout's capture, after an optimizer step, backpropagated as they come, in reverse order after one ``replay()``
    around all, or after all their ``replay()`` blocks ended (with a capture of another batch between)."""
    ids = _ids(5)
    n = ids.shape[1]
    model = _Model(ckpt)
    session = mr.attach(model)
    routes = _captured(model, ids, session)
    _step_routers(model, seed=4)
    ref = _forced_copy(model, ckpt=ckpt)
    losses: list[torch.Tensor] = []
    if how == "a block per micro-batch":
        for i in range(3):
            with session.replay(routes[i * n : (i + 1) * n]):
                part = model.loss(ids[i : i + 1]) / 3
            part.backward()
    elif how == "one block around all":
        with session.replay(routes):
            losses = [model.loss(ids[i : i + 1]) / 3 for i in range(3)]
        for part in reversed(losses):
            part.backward()
    else:
        for i in range(3):
            with session.replay(routes[i * n : (i + 1) * n]):
                losses.append(model.loss(ids[i : i + 1]) / 3)
        with session.capture(), torch.no_grad():
            model.loss(_ids(9))
        sum(losses).backward()  # type: ignore[union-attr]
    session.detach()
    for i in range(3):  # (each backward before the next is forced: the reference's recompute reads its own rows)
        _force(ref, routes.indices[i * n : (i + 1) * n])
        (ref.loss(ids[i : i + 1]) / 3).backward()
    _assert_same_grads(_grads(model), _grads(ref))
    tried(1)


# ----------------------------------------------------------------------------- compiled training steps
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["none", "non_reentrant"])
def test_a_compiled_training_step_replaying_other_routes_in_turn_forces_each_as_by_hand(ckpt: str) -> None:
    """``torch.compile(backend="aot_eager")`` of a training step replays a rollout's routes, then those of another
    policy, then the first again: none of them may be baked into the compiled code."""
    torch._dynamo.reset()
    ids = _ids(6)
    model = _Model(ckpt)
    session = mr.attach(model)
    first = _captured(model, ids, session)
    _step_routers(model, seed=5)
    second = _captured(model, ids, session)
    assert not second.equal(first)
    model.loss(ids).backward()  # (the eager forward with gradients that establishes the decisions first)
    step = torch.compile(model.loss, backend="aot_eager")
    for routes in (first, second, first):
        model.zero_grad()
        with session.replay(routes):
            loss = step(ids)
        loss.backward()
        ref = _forced_copy(model, ckpt=ckpt)
        _force(ref, routes.indices)
        ref_loss = ref.loss(ids)
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach())
        _assert_same_grads(_grads(model), _grads(ref))
        tried(1)
    session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["none", "non_reentrant"])
def test_a_whole_training_step_compiled_with_its_replay_block_inside_forces_each_routes_as_by_hand(ckpt: str) -> None:
    """``torch.compile`` of a whole training step (``aot_eager``) that opens ``session.replay(routes)`` itself, runs
    backward and an optimizer step: dynamo failed inside the session's bookkeeping (an internal error while tracing
    the block's entry) and, under a non-reentrant checkpoint, in the backward of the gathered combine weights (its
    guards unpacked the saved index twice). The block's entry and exit run eagerly at a graph break, and each call
    forces its own routes."""
    torch._dynamo.reset()
    ids = _ids(6)
    model = _Model(ckpt)
    session = mr.attach(model)
    first = _captured(model, ids, session)
    _step_routers(model, seed=5)
    second = _captured(model, ids, session)
    assert not second.equal(first)
    model.loss(ids).backward()  # (the eager forward with gradients that establishes the decisions first)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(ids: torch.Tensor, routes: mr.Routes) -> torch.Tensor:
        optimizer.zero_grad()
        with session.replay(routes):
            loss = model.loss(ids)
        loss.backward()
        optimizer.step()
        return loss.detach()

    compiled = torch.compile(step, backend="aot_eager")
    for routes in (first, second, first):
        loss = compiled(ids, routes)
        ref = _forced_copy(model, ckpt=ckpt)
        _force(ref, routes.indices)
        ref_loss = ref.loss(ids)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach())
        _assert_same_grads(_grads(model), _grads(ref))
        tried(1)
    session.detach()


# ----------------------------------------------------------------------------- native rows under recompute
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
def test_rows_routed_natively_are_recomputed_with_the_experts_their_forward_chose(ckpt: str) -> None:
    """Routes with -1 rows (prefix-cached tokens) route those tokens natively; the router weights then change between
    the forward and its backward (an in-place update): the recompute must dispatch every token, the native ones too,
    to the experts its forward used, or backward differentiates another function than the forward computed."""
    ids = _ids(7)
    model = _Model(ckpt)
    session = mr.attach(model)
    routes = _captured(model, ids, session)
    rows = routes.indices.clone()
    rows[::2] = -1
    holed = mr.Routes(list(rows.unbind(1)), names=routes.names, num_experts=E).with_token_ids(routes.token_ids)
    _step_routers(model, seed=6)
    for layer in model.layers:
        layer.used.clear()
    with session.replay(holed):
        loss = model.loss(ids)
    forward = [list(layer.used) for layer in model.layers]
    _step_routers(model, seed=7)
    loss.backward()
    session.detach()
    for i, layer in enumerate(model.layers):
        assert len(layer.used) == 2  # its forward, then its recompute
        torch.testing.assert_close(layer.used[1], forward[i][0], rtol=0, atol=0)
        kept = rows[:, i, 0] >= 0
        assert torch.equal(forward[i][0][kept], rows[:, i][kept].long())
    tried(1)


# ----------------------------------------------------------------------------- right-padded batches
class _PaddedContextModel(nn.Module):
    """Batch-major MoE layers fed ids and an attention mask, whose padding rows hold a multiple of the mean of the
    tokens before them in their sequence (as a right-padded completion's padding attends back to its tokens): a change
    of a sequence's last token moves its padding's rows more than its own row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList(_Block(0.0, 0.0) for _ in range(2))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        keep = attention_mask[..., None].float()
        before = (h * keep).cumsum(1) / keep.cumsum(1).clamp(min=1)
        h = h * keep + 4 * before * (1 - keep)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("routes_from", ["the capture of the batch", "a layout of per-sequence captures"])
def test_a_batch_whose_first_sequence_is_right_padded_replays_when_its_padding_sees_its_last_token(
    routes_from: str,
) -> None:
    """The order of a batch's tokens at the routers is told by changing sequence 0's last token and finding the row that
    changed most. A right-padded sequence 0 (TRL pads completions on the right) whose padding attends back to that token
    moves its padding's rows more than the token's own: the batch-major forward was refused as one whose routers see
    the tokens reordered (in TRL, the evaluation's old-logprob forward of a trained policy). It replays, exactly."""
    ids = _ids(3, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    ids[0, 3:] = 0
    model = _PaddedContextModel()
    session = mr.attach(model)
    if routes_from == "the capture of the batch":
        with session.capture(), torch.no_grad():
            model(ids, attention_mask=mask)
        routes = session.routes()
    else:
        sequences = [ids[0, :3], ids[1], ids[2]]
        with session.capture(), torch.no_grad():
            for seq in sequences:
                model(seq[None], attention_mask=torch.ones_like(seq)[None])
        layout = mr.BatchLayout.padded([3, 6, 6])
        parts = [session.routes()[a:b] for a, b in ((0, 3), (3, 9), (9, 15))]
        routes = layout.routes(parts)
        assert torch.equal(layout.tokens(sequences), ids) and torch.equal(layout.attention_mask(), mask)
    _step_routers(model, seed=8)  # type: ignore[arg-type]
    for layer in model.layers:
        layer.used.clear()
    with session.replay(routes), torch.no_grad():
        model(ids, attention_mask=mask)
    session.detach()
    for i, layer in enumerate(model.layers):
        kept = ~routes.missing[:, i]
        assert torch.equal(layer.used[0][kept], routes.indices[:, i][kept].long())
    tried(1)


# ----------------------------------------------------------------------------- a transformers model in training
def _hf_router_forced(router: nn.Module, rows: torch.Tensor) -> None:
    """transformers' Mixtral and Qwen3-MoE router forward, written out with its top-k replaced by ``rows``: the
    weights gathered from the same probabilities, normalized and cast as the model's own code does."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden_states, router.weight)
        probs = F.softmax(logits.float(), dim=-1)
        values = probs.gather(-1, rows)
        if getattr(router, "norm_topk_prob", True):
            values = values / values.sum(dim=-1, keepdim=True)
        return logits, values.to(logits.dtype), rows

    router.forward = forward  # type: ignore[method-assign]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("reentrant", [None, True, False])
def test_a_transformers_training_step_gives_the_gradients_and_aux_loss_of_its_routers_forced_by_hand(
    family: str, reentrant: bool | None
) -> None:
    """A tiny transformers model, routes captured in eval mode, its routers stepped, then a train-mode step under
    gradient checkpointing (Mixtral with router jitter drawn on the hidden states before its gate) that asks for the
    model's own load-balancing loss: the loss, the aux loss (computed by the model from its router logits, which
    replay must not alter) and every gradient equal the same model's with its routers' top-k replaced by hand."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))

    def build() -> nn.Module:
        model = tiny_hf.build(family)
        for module in model.modules():
            if hasattr(module, "jitter_noise"):
                module.jitter_noise = 0.2
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model

    model = build()
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(ids)
    routes = session.routes()
    with torch.no_grad():
        for site in session.sites:
            assert site.module is not None
            site.module.weight.add_(torch.randn(site.module.weight.shape, generator=torch.Generator().manual_seed(5)))
    with session.capture(), torch.no_grad():
        model(ids)
    assert not session.routes().equal(routes)  # (free, the stepped routers choose other experts)
    reference = build()
    reference.load_state_dict(model.state_dict())
    model.train()
    with session.replay(routes):
        torch.manual_seed(11)
        out = model(ids, labels=ids, output_router_logits=True)
    (out.loss + 0.1 * out.aux_loss).backward()
    session.detach()
    modules = dict(reference.named_modules())
    for name in routes.names:
        _hf_router_forced(modules[name], routes.layer(name).long())
    reference.train()
    torch.manual_seed(11)
    want = reference(ids, labels=ids, output_router_logits=True)
    (want.loss + 0.1 * want.aux_loss).backward()
    torch.testing.assert_close(out.loss.detach(), want.loss.detach())
    torch.testing.assert_close(out.aux_loss.detach(), want.aux_loss.detach())
    _assert_same_grads(_grads(model), _grads(reference))
    tried(1)


# ----------------------------------------------------------------------------- TRL
def _trl() -> Any:
    """The TRL test helpers (a tiny Qwen3-MoE policy, its tokenizer, data and reward), skipped without TRL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from tests.integrations import test_trl

    return test_trl


@contextlib.contextmanager
def _experts_seen(model: nn.Module) -> Iterator[list[tuple[str, bool, torch.Tensor]]]:
    """Every call of the policy's expert modules, as ``(name, in backward, top_k_index)``: what the experts were given,
    whoever computed it."""
    seen: list[tuple[str, bool, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ == "Qwen3MoeExperts":

            def pre(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                in_backward = torch._C._current_graph_task_id() != -1
                seen.append((name, in_backward, args[1].detach().clone()))

            handles.append(module.register_forward_pre_hook(pre))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(("reentrant", "aux"), [(False, None), (True, 0.0)])
def test_trl_training_under_gradient_checkpointing_recomputes_with_the_experts_each_forward_used(
    reentrant: bool, aux: float | None
) -> None:
    """GRPOTrainer with gradient checkpointing (reentrant without a load-balancing loss, non-reentrant with it): every
    recompute in backward hands the experts the very indices one of their forwards got, and every replayed forward
    used the rollout's experts."""
    t = _trl()
    model = t.policy()
    kw: dict[str, Any] = {
        "max_steps": 2,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": reentrant},
    }
    if aux is not None:
        kw["router_aux_loss_coef"] = aux
    with tempfile.TemporaryDirectory() as out, _experts_seen(model) as seen:
        trainer = t.mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=t.reward, args=t.config(out, **kw), train_dataset=t.dataset(),
            processing_class=t.tokenizer(),
        )  # fmt: skip
        replays = t.spy_replays(trainer.moe_session)
        trainer.train()
        trainer.detach_routing_replay()
    assert trainer.aux_loss_enabled == (aux is None)
    forwards: dict[str, list[torch.Tensor]] = {}
    for name, in_backward, idx in seen:
        if not in_backward:
            forwards.setdefault(name, []).append(idx)
    recomputes = [(name, idx) for name, in_backward, idx in seen if in_backward]
    assert recomputes  # (gradient checkpointing ran)
    for name, idx in recomputes:
        assert any(f.shape == idx.shape and torch.equal(f, idx) for f in forwards[name])
        tried(1)
    assert replays and all(int(c.differ.sum()) == 0 and int(c.compared.sum()) > 0 for _, c in replays)


@pytest.mark.reliability("clear errors")
def test_trl_replayed_aux_loss_under_reentrant_gradient_checkpointing_is_refused_before_training() -> None:
    """The replayed load-balancing loss reads the router scores of the loss forward, which a reentrant checkpoint runs
    without gradients: refused when the trainer is built, naming the settings to change, with no session left on the
    model (it was refused after the generation of the first batch, in words about checkpointed functions)."""
    t = _trl()
    model = t.policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    with tempfile.TemporaryDirectory() as out:
        with pytest.raises(t.mr_trl.UnsupportedTrainerSetupError, match=r"use_reentrant.*router_aux_loss_coef=0\.0"):
            t.mr_trl.RoutingReplayGRPOTrainer(
                model=model, reward_funcs=t.reward, args=t.config(out, **args), train_dataset=t.dataset(),
                processing_class=t.tokenizer(),
            )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    session = mr.attach(model)  # (nothing of a session is left on it: a new one attaches)
    session.detach()
    tried(1)


class _ReentrantLayer(nn.Module):
    """A decoder layer checkpointed by the model's own code with ``use_reentrant=True`` while training with gradients,
    whatever the trainer's arguments say (custom model code that checkpoints its layers itself)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(hidden_states, *args, **kwargs)
        return checkpoint(functools.partial(self.inner, **kwargs), hidden_states, *args, use_reentrant=True)


@pytest.mark.reliability("clear errors")
def test_trl_replayed_aux_loss_under_a_reentrant_checkpoint_of_the_models_code_is_refused_in_trainer_words() -> None:
    """A reentrant checkpoint the trainer's arguments do not show (the model's own code checkpoints its layers, the
    trainer's ``gradient_checkpointing`` off) is refused at the first loss forward, in the trainer's words."""
    t = _trl()
    model = t.policy()
    model.model.layers = nn.ModuleList(_ReentrantLayer(layer) for layer in model.model.layers)
    with tempfile.TemporaryDirectory() as out:
        trainer = t.mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=t.reward, args=t.config(out, max_steps=1, gradient_checkpointing=False),
            train_dataset=t.dataset(), processing_class=t.tokenizer(),
        )  # fmt: skip
        with pytest.raises(t.mr_trl.UnsupportedTrainerSetupError, match=r"use_reentrant.*router_aux_loss_coef=0\.0"):
            trainer.train()
        trainer.detach_routing_replay()
    tried(1)


@pytest.mark.reliability("silent replays")
def test_trl_evaluation_with_gradient_accumulation_replays_every_forward_exactly() -> None:
    """GRPOTrainer evaluating every step (``eval_strategy="steps"``) with ``gradient_accumulation_steps=2``: the
    evaluation's generation computes old log-probabilities on right-padded completions of the trained policy, whose
    padding rows move more than a completion's last token (refused as reordered before); every replayed forward, in
    training and in evaluation, uses the rollout's experts."""
    t = _trl()
    kw: dict[str, Any] = {
        "max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 2,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = t.mr_trl.RoutingReplayGRPOTrainer(
            model=t.policy(), reward_funcs=t.reward, args=t.config(out, **kw), train_dataset=t.dataset(),
            eval_dataset=t.dataset(4), processing_class=t.tokenizer(),
        )  # fmt: skip
        replays = t.spy_replays(trainer.moe_session)
        trainer.train()
        trainer.detach_routing_replay()
    assert any("eval_loss" in log for log in trainer.state.log_history)
    assert replays and all(int(c.differ.sum()) == 0 and int(c.compared.sum()) > 0 for _, c in replays)
    tried(len(replays))
