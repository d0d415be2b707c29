"""Adversarial review of round 48's merges (round 49): the iterators a router draws from while its decision is
established, engine arrays whose axes order is proven from their data, and each router's calls in each forward.
A replay forces the captured experts on the tokens they were recorded for, or it is refused; plain use is not
refused, and the model is left as it was."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr
from tests.test_left48 import _Block, _Router

tiny_hf = pytest.importorskip("tests.tiny_hf")

_XS = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]


# --- iterators a router draws from ----------------------------------------------------------------------------------


class _JitterPerToken(_Router):
    """Draws one jitter item per token from the iterator it holds (``noise_iter``): the runs that establish its
    decision on more tokens than a forward (copies of one token) draw more items than the forward does."""

    def __init__(self, noise_iter: Iterator[int] | None = None) -> None:
        super().__init__()
        self.noise_iter = itertools.cycle(range(1000)) if noise_iter is None else noise_iter

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.tensor([float(next(self.noise_iter)) for _ in range(x.shape[0])])
        logits = F.linear(x, self.weight) + 0.3 * torch.sin(j)[:, None] * torch.arange(8.0)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


def _two_sharing() -> tuple[nn.Module, Iterator[int]]:
    """Two routers that draw from one iterator (a stream of seeds a model hands each layer)."""
    torch.manual_seed(0)
    shared = itertools.cycle(range(1000))
    return nn.Sequential(_Block(_JitterPerToken(shared)), _Block(_JitterPerToken(shared))), shared


@pytest.mark.reliability("the model is left as it was")
def test_an_iterator_two_routers_share_gives_the_forwards_after_attach_the_draws_they_get_without_it() -> None:
    """Once silent: each router's runs stood in for the iterator it holds with its own record of what they drew, so
    where two routers hold one iterator the second's runs drew past the items the first's runs kept for the forwards
    after them, and the second router's jitter in every forward after attach came from other items than without
    moe_replay (its output another, unsaid). One record per iterator now: the forwards see the plain model's draws,
    and the iterator gives its next item as it would."""
    plain, plain_iter = _two_sharing()
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    attached, _ = _two_sharing()
    with mr.attach(attached) as session, torch.no_grad():
        with session.capture():
            got = [attached(x) for x in _XS]
        routes = session.routes()
        with session.replay(routes):
            [attached(x) for x in _XS]
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g), "a forward after attach saw other draws than the plain model"
    with torch.no_grad():
        [plain(x) for x in _XS]  # (the replay's forwards draw on, as the plain model's do)
    assert next(attached[0].router.noise_iter) == next(plain_iter)
    assert next(attached[1].router.noise_iter) == next(plain_iter)


class _SendsItsStep(_Router):
    """Draws its jitter from a generator it drives with ``send(step)`` (a schedule that reads the step it is given)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.schedule = self._schedule()
        next(self.schedule)

    @staticmethod
    def _schedule() -> Iterator[float]:
        value = 0.0
        while True:
            step = yield value
            value = 0.5 * torch.sin(torch.tensor(float(step or 0))).item()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.step += 1
        jitter = self.schedule.send(self.step)
        w, idx = (F.linear(x, self.weight) + jitter * torch.arange(8.0)).softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("false refusals")
def test_a_generator_a_router_drives_with_send_is_not_broken_by_the_stand_in() -> None:
    """Once an AttributeError out of the user's forward: the stand-in for a generator the router holds had no
    ``send()``. It gives an item again for the value it was drawn for: the forwards after attach see the plain
    model's items, captured and replayed."""
    torch.manual_seed(0)
    plain = nn.Sequential(_Block(_SendsItsStep()), _Block(_SendsItsStep()))
    torch.manual_seed(0)
    attached = nn.Sequential(_Block(_SendsItsStep()), _Block(_SendsItsStep()))
    with torch.no_grad():
        want = [plain(x) for x in _XS]
    with mr.attach(attached) as session, torch.no_grad():
        with session.capture():
            got = [attached(x) for x in _XS]
        routes = session.routes()
        with session.replay(routes):
            [attached(x) for x in _XS]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
    with torch.no_grad():
        [plain(x) for x in _XS]  # (the replay's forwards send on, as the plain model's do)
    assert [b.router.step for b in attached] == [b.router.step for b in plain]
    assert [b.router.schedule.send(9) for b in attached] == [b.router.schedule.send(9) for b in plain]


class _SendsItsTokens(_Router):
    """Drives a generator with ``send()`` of its input's token count: the runs on more tokens send another value."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule = _SendsItsStep._schedule()
        next(self.schedule)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        jitter = self.schedule.send(x.shape[0])
        w, idx = (F.linear(x, self.weight) + jitter * torch.arange(8.0)).softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("the model is left as it was")
def test_a_generator_sent_another_value_than_its_items_were_drawn_for_is_refused_clearly() -> None:
    """What a generator gives for a value its runs did not send cannot be known without a draw they already made:
    a forward that sends one is refused with an error that says so, not given an item drawn for another value."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_SendsItsTokens()), _Block(_SendsItsTokens()))
    session = mr.attach(model)
    try:
        with pytest.raises(mr.MoEReplayError, match=r"send\(\)"):
            with session.capture(), torch.no_grad():
                model(_XS[0])
    finally:
        session.detach()


@pytest.mark.reliability("the model is left as it was")
def test_an_iterator_the_runs_drew_more_from_than_the_forwards_is_the_routers_own_after_detach() -> None:
    """Once left wrong: the runs that establish a decision drew more items from an iterator a router holds than the
    forwards after them did (per-token draws), and the stand-in that gave them back stayed in the router's attribute
    after detach(). An iterator over data alone is copied where the forwards stand and the runs draw from the copy:
    the router's attribute holds its own iterator again as the runs end, advanced by what the forwards drew."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_JitterPerToken()), _Block(_JitterPerToken()))
    torch.manual_seed(0)
    plain = nn.Sequential(_Block(_JitterPerToken()), _Block(_JitterPerToken()))
    held = [vars(b.router)["noise_iter"] for b in model]
    with torch.no_grad():
        want = plain(_XS[0])
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        got = model(_XS[0])
    assert torch.equal(got, want)
    assert all(vars(b.router)["noise_iter"] is it for b, it in zip(model, held, strict=True))
    assert [next(b.router.noise_iter) for b in model] == [next(b.router.noise_iter) for b in plain]


# --- a prompt fed from place 0 with a cache that still holds tokens -------------------------------------------------


def _prompts_on(model: Any, kind: str, reuse: bool) -> list[torch.Tensor]:
    """Two prompts, each fed its ``position_ids`` from 0 (as a collator writes them); each on a fresh cache, or both
    on one (``reuse``: the second prompt's cache not reset, its attention reading the first prompt's keys)."""
    name = tiny_hf.cache_kwarg(model)
    caches = [
        tiny_hf.transformers.DynamicCache(config=model.config)
        if kind == "dynamic"
        else tiny_hf.transformers.StaticCache(config=model.config, max_cache_len=16)
        for _ in range(2)
    ]
    out = []
    for i, seed in enumerate((1, 2)):
        prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(seed))
        cache = caches[0] if reuse else caches[i]
        out.append(model(prompt, use_cache=True, position_ids=torch.arange(4)[None], **{name: cache}).logits)
    return out


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_prompt_fed_from_place_0_with_a_cache_not_reset_is_refused(kind: str) -> None:
    """Once silent (before this round too): a prompt captured on a fresh cache, replayed on a cache that still held
    another prompt's tokens but fed ``position_ids`` from 0, was read at places 0.. from the ids it was given, so
    its places and ids matched its routes while its attention read the other prompt's keys: the captured experts were
    forced on tokens in another context (a capture there records other routes). A token's place counts the tokens it
    attends, the cache's included: refused. Replayed on fresh caches, forced exactly."""
    model = tiny_hf.build("qwen3_moe")
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            want = _prompts_on(model, kind, reuse=False)
        routes = session.routes()
        with session.replay(routes), torch.no_grad():
            got = _prompts_on(model, kind, reuse=False)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
        with session.capture(), torch.no_grad():
            _prompts_on(model, kind, reuse=True)
        assert not session.routes().equal(routes)  # (the context moves the routes: forcing them there is not exact)
        with pytest.raises(mr.TokenMismatchError, match="forward 2 of this replay.*other places"):
            with session.replay(routes), torch.no_grad():
                _prompts_on(model, kind, reuse=True)


# --- compare of captures of batches padded otherwise ----------------------------------------------------------------


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("ids", ["captured", "none"])
def test_compare_of_captures_of_a_batch_padded_on_either_side_is_refused_not_left_out_as_padding(ids: str) -> None:
    """Once silent: a capture of a left-padded batch compared with one of the same sequences right-padded, both fed
    their masks. Each side's padding rows hold the other side's first tokens, so compare left those rows out as
    padding and reported the rest: the short sequence's decisions were dropped unsaid ("tokens=4" of a batch of
    six). Refused, with or without ids; the same batch padded the same way is compared whole."""
    model = mr.models.build("softmax_topk")
    left, left_mask = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right, right_mask = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with mr.attach(model) as session, torch.no_grad():
        captured = []
        for batch, mask in ((left, left_mask), (right, right_mask), (left, left_mask)):
            with session.capture():
                model(batch, attention_mask=mask)
            got = session.routes()
            captured.append(got if ids == "captured" else got.with_token_ids(None))
    same = mr.compare(captured[0], captured[2])
    assert same.tokens == int(left_mask.sum())  # (every token of the batch compared, padding left out)
    with pytest.raises(mr.RoutesValidationError, match="padded otherwise"):
        mr.compare(captured[0], captured[1])


# --- slices of one router's calls joined again, on routes that know no ids ------------------------------------------


@pytest.mark.reliability("silent replays")
def test_slices_of_a_routers_calls_joined_in_another_order_are_refused_without_ids_too() -> None:
    """Once silent: a router called twice per forward (its own calls kept router by router), its rows cut inside a
    forward and joined in another order with ``Routes.cat``, were refused as cut through while the routes knew
    their ids, but forced once the ids were dropped (an engine's rows, ``with_token_ids(None)``): every router held
    as many rows, so only the order of the rows was checked, and each call read rows of other tokens. The calls the
    routes keep router by router are checked without ids too; the same slices joined in order replay exactly."""
    from tests.test_calls47 import _captured as captured_calls
    from tests.test_calls47 import _SharedAndOwn, _x

    model = _SharedAndOwn()
    with mr.attach(model) as session:
        routes, used = captured_calls(model, session, [_x(0), _x(0)])
        shared = routes.select(["shared.gate"])
        for whole in (shared.with_token_ids(None), mr.Routes.cat([shared[:30], shared[30:]]).with_token_ids(None)):
            with session.replay(whole, strict=False), torch.no_grad():  # (the own block's router left free)
                for _ in range(2):
                    model(_x(0))
                    assert torch.equal(model.shared.used.long(), used[1][2])
        swapped = mr.Routes.cat([shared[30:], shared[:30]]).with_token_ids(None)
        assert swapped._router_calls is not None
        with pytest.raises(mr.TokenMismatchError, match="cut through by a slice"):
            with session.replay(swapped, strict=False), torch.no_grad():
                model(_x(0))
