"""Whole steps users run: a training step and a ``generate()`` call, each against the plain model.

* ``train``: forward and backward of a causal-LM loss with HF gradient checkpointing
  (non-reentrant) on the Qwen3-MoE-shaped model, ``batch`` x ``seq`` tokens. Variants:
  ``plain``, ``capture`` (the routes of the step recorded once, though every checkpointed
  layer runs its router twice), ``replay`` (the routes of that step forced in the forward
  and in the recompute), and the HF recipe (router subclass + output recorder) capturing
  and replaying.
* ``generate``: an eager greedy ``generate()`` of ``batch`` sequences, ``prompt`` tokens
  each, exactly ``new`` tokens generated. Variants: ``plain``, ``capture`` (a session
  capturing through the whole call) and the HF recipe capturing.

Both are timed as :func:`benchmarks.harness.time_variants` times the forwards: every
variant in the same process, round-robin in rotated order, ratios paired per repetition.
Every session is warmed up (one eager forward, untimed) before its timed block: a router
establishes its decision at its first eager forward under a session, a one-off cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

import moe_replay as mr

from .baselines import RecipeRouting
from .harness import Variant, summarise, time_variants
from .workloads import routers_of

__all__ = ["bench_generate", "bench_train"]


def _shape_of(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@contextlib.contextmanager
def _session(model: nn.Module, capacity: int, warm: Callable[[], Any]) -> Iterator[mr.Session]:
    """A session on ``model`` whose routers have established their decision (one untimed eager forward)."""
    with mr.attach(model, capacity=capacity) as session:
        with torch.no_grad():
            warm()
        yield session


@contextlib.contextmanager
def _recipe(routers: list[nn.Module], forced: list[torch.Tensor] | None) -> Iterator[RecipeRouting]:
    recipe = RecipeRouting(routers).install(record=forced is None)
    recipe.force(forced)
    try:
        yield recipe
    finally:
        recipe.uninstall()


@contextlib.contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    """``model`` in train mode with gradients and HF gradient checkpointing; put back as it was after."""
    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    had_input_hook = hasattr(model, "_require_grads_hook")
    model.train()
    model.requires_grad_(True)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if not had_input_hook and hasattr(model, "_require_grads_hook"):  # enabling added it; disabling keeps it
            model.disable_input_require_grads()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
        model.train(was_training)


def _router_grads(routers: list[nn.Module]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for r in routers for p in r.parameters() if p.grad is not None]


def bench_train(
    model: nn.Module,
    *,
    batch: int,
    seq: int,
    reps: int,
    inner: int,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Time forward + backward with gradient checkpointing: plain, moe_replay and the HF recipe."""
    p = next(model.parameters())
    device = p.device
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=g)
    routers = routers_of(model)
    result: dict[str, Any] = {"model": "qwen3", "shape": "train", "batch": batch, "seq": seq, "tokens": batch * seq}
    result.update(_shape_of(model))

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach()

    def warm() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    tokens = batch * seq
    with _training(model):
        # checks: capture records each token once per step (not again in the recompute), replay
        # of those routes reproduces the captured step's loss and router gradients
        plain_loss = step()
        with _session(model, tokens, warm) as session:
            with session.capture():
                captured_loss = step()
            captured_grads = _router_grads(routers)
            routes = session.routes()
            with session.replay(routes):
                replayed_loss = step()
            replayed_grads = _router_grads(routers)
        rows = [r.long().to(device) for r in routes.per_layer()]
        checks: dict[str, Any] = {
            "routes_tokens": routes.num_tokens,
            "capture_loss_diff": abs(float(captured_loss) - float(plain_loss)),
            "replay_loss_diff": abs(float(replayed_loss) - float(captured_loss)),
            "replay_router_grad_max_diff": max(
                (_max_diff(a, b) for a, b in zip(replayed_grads, captured_grads, strict=True)), default=0.0
            ),
        }
        forced: list[torch.Tensor] | None = None
        try:  # the recipe fits (logits, weights, indices) routers; moe_replay is timed regardless
            with _recipe(routers, None) as recipe:
                recipe_loss = step()
                recorded = recipe.per_router()  # forward, then recompute: the first rows are the forward's
            forced = [r[:tokens] for r in recorded]
            with _recipe(routers, forced):
                recipe_replay_loss = step()
            checks["recipe_records_per_step"] = recorded[0].shape[0] // tokens
            checks["recipe_indices_equal"] = all(
                torch.equal(a, b.reshape(a.shape)) for a, b in zip(rows, forced, strict=True)
            )
            checks["recipe_replay_loss_diff"] = abs(float(recipe_replay_loss) - float(recipe_loss))
        except Exception as e:
            checks["baselines_error"] = f"{type(e).__name__}: {e}"
        result["checks"] = checks

        routes_inner = mr.Routes.cat([routes] * inner)

        @contextlib.contextmanager
        def capturing() -> Iterator[None]:
            with _session(model, tokens * inner, warm) as s, s.capture():
                yield

        @contextlib.contextmanager
        def replaying() -> Iterator[None]:
            with _session(model, tokens * inner, warm) as s, s.replay(routes_inner):
                yield

        variants = [
            Variant("plain", nullcontext, step),
            Variant("capture", capturing, step),
            Variant("replay", replaying, step),
        ]
        if forced is not None:
            variants += [
                Variant("recipe_capture", lambda: _recipe(routers, None), step),
                Variant("recipe_replay", lambda: _recipe(routers, forced), step),
            ]
        times = time_variants(variants, device=device, reps=reps, inner=inner, clock=clock, progress=progress)
    result["variants"] = summarise(times, "plain")
    result["reps"], result["inner"] = reps, inner
    return result


@torch.no_grad()
def bench_generate(
    model: nn.Module,
    *,
    batch: int,
    prompt: int,
    new: int,
    reps: int,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Time one eager greedy ``generate()`` call: plain, capturing through it, and the HF recipe capturing."""
    p = next(model.parameters())
    device = p.device
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt), device=device, generator=g)
    mask = torch.ones_like(ids)
    routers = routers_of(model)
    expected = mr.generation_capacity(batch, prompt, new)
    result: dict[str, Any] = {
        "model": "qwen3",
        "shape": "generate",
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "tokens": batch * (prompt + new - 1),
        **_shape_of(model),
    }
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )

    def step() -> torch.Tensor:
        return model.generate(ids, **kwargs)

    def warm() -> None:
        model(input_ids=ids[:, :2], use_cache=False, logits_to_keep=1)

    plain = step()
    with _session(model, expected, warm) as session:
        with session.capture(expected_tokens=expected):
            captured = step()
        routes = session.routes()
    checks: dict[str, Any] = {
        "routes_tokens": routes.num_tokens,
        "expected_tokens": batch * prompt + batch * (new - 1),
        "generated_tokens": int(captured.shape[1] - prompt),
        "capture_sequences_equal": bool(torch.equal(captured, plain)),
    }
    try:
        with _recipe(routers, None) as recipe:
            recipe_seq = step()
            recorded = recipe.per_router()
        rows = [r.long().to(device) for r in routes.per_layer()]
        same_seq = torch.equal(recipe_seq, captured)
        checks["recipe_rows"] = recorded[0].shape[0]
        # separate runs agree on the experts only where they generated the same tokens
        checks["recipe_indices_equal"] = (
            all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(rows, recorded, strict=True)) if same_seq else None
        )
        fits = True
    except Exception as e:
        checks["baselines_error"] = f"{type(e).__name__}: {e}"
        fits = False
    result["checks"] = checks

    @contextlib.contextmanager
    def capturing() -> Iterator[None]:
        with _session(model, expected, warm) as s, s.capture(expected_tokens=expected):
            yield

    variants = [Variant("plain", nullcontext, step), Variant("capture", capturing, step)]
    if fits:
        variants.append(Variant("recipe_capture", lambda: _recipe(routers, None), step))
    times = time_variants(variants, device=device, reps=reps, inner=1, clock=clock, progress=progress)
    result["variants"] = summarise(times, "plain")
    result["reps"], result["inner"] = reps, 1
    return result
