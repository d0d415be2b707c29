"""Adversarial review of a round's changes: a router whose backward chooses its experts again by their values, the
backwards that read a decision-like call's values legitimately, and a cache of plain tensors whose rows a beam
search reorders by hand (or keeps in place).

Each case must be exact (forced rows, the output and gradients of a replay written by hand) or refused with a
``MoEReplayError``: never silent, and never a refusal of an exact replay.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import moe_replay as mr

from .test_decisions4 import Router, _decide, outcome


# ------------------------------------------------------------------------ a backward that chooses again by values
class _ThresholdTopK(torch.autograd.Function):
    """Top-k whose backward finds the chosen experts again by value: each gradient slot goes where the saved scores
    equal the k largest (a threshold at the k-th largest, no indices read)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = scores.topk(k, dim=-1)
        ctx.save_for_backward(scores)
        ctx.k = k
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[torch.Tensor, None]:
        (scores,) = ctx.saved_tensors
        top = scores.topk(ctx.k, dim=-1).values
        out = torch.zeros_like(scores)
        for j in range(ctx.k):
            out = out + (scores == top[..., j : j + 1]) * grad[..., j : j + 1]
        return out, None


class BackwardChoosesByValues(Router):
    """The top-k in a custom autograd Function whose backward places the gradient at the experts whose saved scores
    are the k largest, found by value."""

    def route(self, x: torch.Tensor, forced: torch.Tensor | None) -> Any:
        probs = self.logits(x).softmax(-1)
        vals, idx = _ThresholdTopK.apply(probs, self.top_k) if forced is None else _decide(probs, self.top_k, forced)
        self.decision = idx
        return vals, idx


@pytest.mark.reliability("silent replays")
def test_a_decision_taken_again_by_its_values_in_backward_is_refused() -> None:
    """Once silent: a custom autograd Function whose backward finds its top-k again by value (the saved scores
    compared with the k largest, no index read) places the router's gradients at the experts the current scores
    choose, not at the forced ones; moving the indices of its backward's top-k changed nothing, so it was not seen.
    Its values moved move the gradients far past rounding: refused, naming the call in its backward."""
    got = outcome(BackwardChoosesByValues)
    assert got.startswith("refused:") and "its backward chooses among its experts again" in got, got
    assert "by its values" in got and "test_review37.py" in got, got


# ------------------------------------------------------------------ backwards that read values for stability only
class _StableSoftmax(torch.autograd.Function):
    """A softmax whose backward computes it again stably: the row maximum (``max(...).values``) subtracted."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return logits.softmax(-1)

    @staticmethod
    def again(logits: torch.Tensor) -> torch.Tensor:
        e = (logits - logits.max(-1, keepdim=True).values).exp()
        return e / e.sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        y = _StableSoftmax.again(logits)
        return y * (grad - (grad * y).sum(-1, keepdim=True))


class _SortedSoftmax(_StableSoftmax):
    """The same, its shift the first of the logits sorted (``sort(...)`` values, descending)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        top = logits.sort(-1, descending=True).values[..., :1]
        e = (logits - top).exp()
        y = e / e.sum(-1, keepdim=True)
        return y * (grad - (grad * y).sum(-1, keepdim=True))


class _StraightThroughTopK(torch.autograd.Function):
    """A one-hot of the top-k forward, the gradient passed through to every expert backward."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = scores.topk(k, dim=-1).indices
        ctx.mark_non_differentiable(idx)
        return torch.zeros_like(scores).scatter(-1, idx, 1.0), idx

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[torch.Tensor, None]:
        return grad, None


class StableSoftmaxBackward(Router):
    """Softmax by a custom Function whose backward reads each row's maximum for stability; then the top-k."""

    function: Any = _StableSoftmax

    def route(self, x: torch.Tensor, forced: torch.Tensor | None) -> Any:
        probs = self.function.apply(self.logits(x))
        vals, idx = _decide(probs, self.top_k, forced)
        self.decision = idx
        return vals, idx


class SortedSoftmaxBackward(StableSoftmaxBackward):
    """The same, its backward's shift read from a sort."""

    function = _SortedSoftmax


class StraightThroughFunction(Router):
    """A straight-through top-k written as a custom Function: dense one-hot gates times the probabilities."""

    def route(self, x: torch.Tensor, forced: torch.Tensor | None) -> Any:
        probs = self.logits(x).softmax(-1)
        if forced is None:
            hard, idx = _StraightThroughTopK.apply(probs, self.top_k)
        else:
            idx = forced.long()
            hard = torch.zeros_like(probs).scatter(-1, idx, 1.0) + probs - probs.detach()
        self.decision = idx
        return hard * probs


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "make", [StableSoftmaxBackward, SortedSoftmaxBackward, StraightThroughFunction], ids=lambda c: c.__name__
)
def test_a_backward_that_reads_values_for_stability_or_passes_the_gradient_through_is_exact(make: Any) -> None:
    """No false refusal: a backward whose ``max`` or ``sort`` over the experts gives only a shift for a stable
    exponential (its values moved change the gradients by rounding), and a straight-through Function whose backward
    makes no choice, replay exactly."""
    assert outcome(make) == "exact"


# ------------------------------------------------------------------------ a plain cache reordered by a beam search
def _own_beam_loop(model: torch.nn.Module, prompt: torch.Tensor, at: int, beams: list[int] | None) -> None:
    """A decode loop of one's own over a cache of plain tensors: the prompt forward, then four decode steps; where
    ``beams`` is given, the cache's batch rows and the next tokens are ``index_select``-ed by it after step ``at``
    (-1: right after the prompt forward), as a beam search reorders its hypotheses."""
    out = model(prompt, use_cache=True)
    cache, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for t in range(-1, 4):
        if t >= 0:
            out = model(step, past_key_values=cache, use_cache=True)
            cache, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if t == at and beams is not None:
            index = torch.tensor(beams)
            cache = [tuple(x.index_select(0, index) for x in layer) for layer in cache]
            step = step.index_select(0, index)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("at", [-1, 1], ids=["after the prompt forward", "after a decode step"])
@pytest.mark.parametrize("beams", [[1, 0], [0, 0]], ids=["swapped", "one copied over the other"])
def test_a_plain_tensor_cache_whose_rows_a_beam_search_reorders_is_refused_or_split_by_beam(
    at: int, beams: list[int]
) -> None:
    """Once split silently: a decode loop of one's own whose beams are reordered (the cache's rows and the next tokens
    ``index_select``-ed, as beam search reorders them): the rows after the move of batch row 0 continue another
    sequence. New tensors as long as those the forward before returned, a batch row of them holding what another row
    held and not what its own did, are such a move: splitting the capture per batch row is refused, as a cache
    object's ``reorder_cache`` is."""
    model = mr.models.build("softmax_topk")
    prompt = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(4))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            _own_beam_loop(model, prompt, at, beams)
        capture = session.routes()
        with pytest.raises(mr.RoutesValidationError, match="moved rows"):
            mr.split_generation(capture, batch_size=2, prompt_len=3)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("how", ["as returned", "each row in its place", "the same beams swapped", "two loops"])
def test_a_plain_tensor_cache_given_its_rows_in_place_still_splits(how: str) -> None:
    """No false refusal: a cache of plain tensors given on as returned, copied row by row into its own places
    (``index_select`` by the identity), reordered where the rows moved hold the same tokens (two beams of one prompt,
    nothing told apart and nothing to tell), or two decode loops over caches of their own interleaved, one forward
    each in turn (classifier-free guidance), keeps each batch row's rows: nothing is said moved."""
    model = mr.models.build("softmax_topk")
    prompt = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(4))
    if how == "the same beams swapped":
        prompt = prompt[:1].expand(2, 3)
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            if how == "two loops":  # (the second loop's cache as long as the first's, each forward given the other's)
                other = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(5))
                outs = [model(prompt, use_cache=True), model(other, use_cache=True)]
                steps = [o.logits[:, -1:].argmax(-1) for o in outs]
                caches = [o.past_key_values for o in outs]
                for _ in range(3):
                    for i in range(2):
                        out = model(steps[i], past_key_values=caches[i], use_cache=True)
                        caches[i], steps[i] = out.past_key_values, out.logits[:, -1:].argmax(-1)
            else:
                _own_beam_loop(
                    model,
                    prompt,
                    1,
                    None if how == "as returned" else [0, 1] if how != "the same beams swapped" else [1, 0],
                )
        capture = session.routes()
    assert capture._rows_moved is None


# ------------------------------------------------------------------ first captures of sessions in several threads
def _first_captures_at_once(models: list[torch.nn.Module], tokens: list[torch.Tensor]) -> dict[int, Any]:
    """Each model's first capture of its tokens, in a thread of its own, every thread entering it at once: the
    routes by model, or the errors raised (``"errors"``)."""
    got: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(models))

    def work(i: int) -> None:
        try:
            session = mr.attach(models[i])
            barrier.wait()
            with session.capture(), torch.no_grad():
                models[i](tokens[i])
            got[i] = session.routes()
            session.detach()
        except BaseException as exc:  # (reported by the test, from its own thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got


@pytest.mark.reliability("concurrency")
def test_first_captures_of_sessions_on_models_of_their_own_in_threads_at_once_record_their_own_rows() -> None:
    """Once silent: three threads, each with a model and a session of its own, entering their first capture at once.
    A block's first forward learns the order its routers see the tokens in by probe runs of the model that stop at
    the first router; the mark of the thread running such a probe was one for the whole process, so another thread's
    probe took it over, and the first thread's probe runs went on through its routers and recorded their rows (48
    rows for a forward of 16 tokens: the forward's own twice, and those of a probe's changed token). Each thread's
    mark is its own: every capture equals the one its model records alone."""
    n = 3
    tokens = [torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(n)]

    def build(i: int) -> torch.nn.Module:
        return mr.models.build("softmax_topk", num_layers=2, expert_impl="dense", seed=i)

    alone = []
    for i in range(n):
        model = build(i)
        with mr.attach(model) as session, session.capture(), torch.no_grad():
            model(tokens[i])
        alone.append(session.routes())
    for _ in range(2):  # (rounds of fresh sessions, each thread's first capture meeting the others')
        got = _first_captures_at_once([build(i) for i in range(n)], tokens)
        for i in range(n):
            assert got[i].num_tokens == alone[i].num_tokens, (i, got[i], alone[i])
            assert got[i].equal(alone[i]), i


# --------------------------------------------------------------------------- a compiled model fed the wrong batch
@pytest.mark.reliability("silent replays")
def test_routes_of_another_batch_replayed_through_a_compiled_model_are_refused() -> None:
    """Routes captured for one batch, replayed through ``torch.compile(model)`` fed another batch of the same
    shape: the eager model refuses it (``TokenMismatchError``, before any router reads a row); the compiled one
    must too, at least for the block's first forward."""
    model = mr.models.build("softmax_topk", num_layers=1, expert_impl="dense")
    g = torch.Generator().manual_seed(5)
    first, other = torch.randint(0, 100, (2, 8), generator=g), torch.randint(0, 100, (2, 8), generator=g)
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(first)
    routes = session.routes()
    with pytest.raises(mr.TokenMismatchError), session.replay(routes), torch.no_grad():
        model(other)  # (eager: refused)
    compiled = torch.compile(model, backend="eager")
    try:
        with pytest.raises(mr.TokenMismatchError), session.replay(routes), torch.no_grad():
            compiled(other)
    finally:
        session.detach()
