"""Review of round 50's merges: position_ids compared by value with laid-out rows, Ctrl-C held across capture's
set-up, and the ordinary uses these must neither refuse falsely nor let through silently.

Outcome of every replay: exact (each MoE layer dispatched the captured experts, read by the test's own hooks), or a
``MoEReplayError`` with the model's tensors unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

from .test_workflow import _dispatched, _joined, _perturb, _state, _unchanged, _watch_experts

Oracle = dict[str, torch.Tensor]


class _OwnCacheName(nn.Module):
    """A model of one's own that takes its KV cache under a name of its own (``kv_cache``, as gpt-fast and
    Megatron's ``inference_params`` do) and hands it to the inner model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_cache: Any = None,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> Any:
        """The inner model's output, its cache given as ``past_key_values`` (``num_items_in_batch``: a trainer's
        count of the tokens its loss counts, unused here)."""
        return self.inner(input_ids, position_ids=position_ids, past_key_values=kv_cache, use_cache=True)


def _outcome(
    model: nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any], watched: nn.Module
) -> Oracle | None:
    """The experts ``forward`` dispatched replaying ``routes``, or None where refused (model's tensors unchanged)."""
    before = _state(watched)
    try:
        with _dispatched(watched) as rec, session.replay(routes):
            forward()
    except mr.MoEReplayError:
        _unchanged(watched, before)
        assert session.state == "idle"
        return None
    return _joined(rec)


@pytest.mark.reliability("false refusals")
def test_a_continuation_fed_its_cache_under_a_name_of_ones_own_is_not_refused_by_its_positions() -> None:
    """A second turn fed after its first turn's KV cache, the cache given under a name the library does not know
    (``kv_cache``), its rows laid out as a sequence of their own (BatchLayout of the turn's routes) and fed the
    positions that follow the cached tokens: the replay is exact, as it is where the cache is given as
    ``past_key_values``. The value check of position_ids must not read such a forward as one fed no cache."""
    torch.manual_seed(0)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _OwnCacheName(inner)
    session = mr.attach(model)
    try:
        first, second = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 4))
        later = torch.arange(5, 9)[None]
        with torch.no_grad():
            cache = inner(first, use_cache=True).past_key_values
            with _dispatched(inner) as rec, session.capture():
                model(second, position_ids=later, kv_cache=cache)
        want, turn = _joined(rec), session.routes()
        _perturb(inner)
        routes = mr.BatchLayout.packed([4]).routes([turn.with_token_ids(None)])  # (as an engine's: no ids)
        for name in ("past_key_values", "kv_cache"):
            with torch.no_grad():
                if name == "kv_cache":
                    run: Callable[[], Any] = lambda: model(second, position_ids=later, kv_cache=cache)  # noqa: E731
                else:
                    run = lambda: inner(second, position_ids=later, past_key_values=cache)  # noqa: E731
                got = _outcome(model, session, routes, run, inner)
            assert got is not None, f"refused though exact (cache given as {name})"
            for layer, rows in got.items():
                assert torch.equal(rows, want[layer]), f"{name}: {layer}"
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_slices_tokens_with_an_unknown_cache_name_given_none_is_still_refused() -> None:
    """The value check still holds where the forward is given a cache argument of its own name set to None (no
    cache at all): a Ulysses slice's rows fed the other slice's tokens and positions are refused."""
    torch.manual_seed(1)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _OwnCacheName(inner)
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 8))
        with torch.no_grad(), session.capture():
            model(seq)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(inner)
        pos = torch.arange(8)[None]
        with torch.no_grad():
            own = _outcome(model, session, routes[:4], lambda: model(seq[:, :4], position_ids=pos[:, :4]), inner)
            assert own is not None, "refused though exact"
            other = _outcome(
                model, session, routes[:4], lambda: model(seq[:, 4:], position_ids=pos[:, 4:], kv_cache=None), inner
            )
            assert other is None, "rank 0's rows forced on rank 1's tokens"
            count = torch.tensor(4)  # (a 0-d tensor, as a trainer's num_items_in_batch: it holds no tokens)
            run = lambda: model(seq[:, 4:], position_ids=pos[:, 4:], num_items_in_batch=count)  # noqa: E731
            counted = _outcome(model, session, routes[:4], run, inner)
        assert counted is None, "rank 0's rows forced on rank 1's tokens, given a count"
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
def test_a_window_of_a_long_document_replayed_with_its_captured_positions() -> None:
    """A window of a long document captured fed its positions in the document (no mask, no KV cache), laid out with
    BatchLayout (places from 0) and replayed fed the same tokens and positions: exact where the routes know their
    token ids; without them the positions cannot be told from another slice's, and the refusal names the remedy."""
    torch.manual_seed(2)
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(model)
    session = mr.attach(model)
    try:
        window = torch.randint(1, 128, (1, 6))
        pos = torch.arange(10, 16)[None]
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(window, position_ids=pos)
        want, captured = _joined(rec), session.routes()
        _perturb(model)
        routes = mr.BatchLayout.packed([6]).routes([captured])
        with torch.no_grad():
            got = _outcome(model, session, routes, lambda: model(window, position_ids=pos), model)
        assert got is not None, "refused though exact, with token ids"
        for layer, rows in got.items():
            assert torch.equal(rows, want[layer]), layer
        bare = mr.BatchLayout.packed([6]).routes([captured.with_token_ids(None)])
        with pytest.raises(mr.MoEReplayError, match=r"with_token_ids"), torch.no_grad(), session.replay(bare):
            model(window, position_ids=pos)
    finally:
        session.detach()


# ----------------------------------------------------------------------------- Ctrl-C held across set-up windows
def _small() -> tuple[nn.Module, mr.Session, torch.Tensor]:
    torch.manual_seed(3)
    model = mr.models.build("softmax_topk", num_layers=2, first_dense_layers=0)
    return model, mr.attach(model), torch.randint(1, 128, (1, 5))


@pytest.mark.reliability("interrupts")
@pytest.mark.parametrize("handler", ["own", "ignore", "default"])
def test_a_users_sigint_handler_is_kept_through_capture_and_replay(handler: str) -> None:
    """A SIGINT handler the user set (one of their own, SIG_IGN, SIG_DFL) is the one in place after capture() and
    replay() blocks open and close, and during the forwards inside them; a SIGINT sent inside a block reaches the
    user's own handler once."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    calls: list[int] = []

    def own(signum: int, frame: Any) -> None:
        calls.append(signum)

    chosen: Any = {"own": own, "ignore": signal.SIG_IGN, "default": signal.SIG_DFL}[handler]
    seen: list[Any] = []
    model, session, x = _small()
    previous = signal.signal(signal.SIGINT, chosen)
    try:
        model.register_forward_pre_hook(lambda *_: seen.append(signal.getsignal(signal.SIGINT)))
        with torch.no_grad():
            with session.capture():
                model(x)
                if handler == "own":
                    signal.raise_signal(signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is chosen
            with session.replay(session.routes()):
                model(x)
            assert signal.getsignal(signal.SIGINT) is chosen
        assert seen == [chosen, chosen]
        assert calls == ([signal.SIGINT] if handler == "own" else [])
    finally:
        signal.signal(signal.SIGINT, previous)
        session.detach()


@pytest.mark.reliability("interrupts")
def test_capture_and_replay_in_a_worker_thread_leave_the_main_threads_handler() -> None:
    """capture() and replay() run in a thread other than the main one (no handler can be set there): exact, and the
    main thread's SIGINT handler is the one it was."""
    model, session, x = _small()
    before = signal.getsignal(signal.SIGINT)
    out: list[Any] = []

    def work() -> None:
        try:
            with torch.no_grad():
                with session.capture():
                    a = model(x).logits
                with session.replay(session.routes()):
                    b = model(x).logits
            out.append(torch.equal(a, b))
        except BaseException as e:  # (handed to the main thread's assert)
            out.append(e)

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert out == [True]
        assert signal.getsignal(signal.SIGINT) is before
        assert session.state == "idle"
    finally:
        session.detach()


@pytest.mark.reliability("interrupts")
def test_a_keyboard_interrupt_raised_in_a_forward_hook_leaves_the_session_and_modes_right() -> None:
    """A KeyboardInterrupt raised (not signalled) by a user's forward hook on a router in a capture block: the block
    ends with it, no torch function mode is left on the stack, the session is idle and the next capture records
    what a plain capture records."""
    model, session, x = _small()
    with torch.no_grad(), session.capture():
        model(x)
    want = session.routes()
    router = session.sites[0].module
    handle = router.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad(), session.capture():
            model(x)
        handle.remove()
        from moe_replay import _torch_compat

        assert _torch_compat.function_mode_stack() == []
        assert session.state == "idle"
        with torch.no_grad(), session.capture():
            model(x)
        assert session.routes().equal(want)
    finally:
        handle.remove()
        session.detach()


class _Mask4D(nn.Module):
    """A model of one's own fed a 4-d ``[batch, 1, queries, keys]`` boolean attention mask (as packed or custom
    attention code takes it), handing its inner model the keys it attends."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        """The inner model's output, fed the keys the 4-d mask attends as a 2-d mask."""
        keys = None if attention_mask is None else attention_mask[:, 0].any(-2).long()
        return self.inner(input_ids, attention_mask=keys, position_ids=position_ids)


@pytest.mark.reliability("false refusals")
def test_a_left_padded_batch_fed_a_4d_mask_and_plain_positions_is_not_refused_by_their_values() -> None:
    """A left-padded batch fed a 4-d attention mask and position_ids that count the padding (``arange`` over each
    row, as a forward given no positions computes them), captured and replayed alike, its routes laid out without
    token ids: exact. A mask is fed, so the positions are not each token's place and must not be compared by value
    (once a 4-d mask read as none made them so)."""
    torch.manual_seed(4)
    inner = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(inner)
    model = _Mask4D(inner)
    session = mr.attach(model)
    try:
        layout = mr.BatchLayout.padded([3, 5], side="left")
        seqs = [torch.randint(1, 128, (n,)) for n in (3, 5)]
        tokens, keys = layout.tokens(seqs), layout.attention_mask().bool()
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        mask4 = (causal[None] & keys[:, None, :])[:, None]
        pos = torch.arange(5)[None].expand(2, 5)
        with torch.no_grad(), _dispatched(inner) as rec, session.capture():
            model(tokens, attention_mask=mask4, position_ids=pos)
        want = _joined(rec)
        routes = layout.routes([r.with_token_ids(None) for r in layout.unpack(session.routes())])
        _perturb(inner)
        with torch.no_grad():
            run = lambda: model(tokens, attention_mask=mask4, position_ids=pos)  # noqa: E731
            got = _outcome(model, session, routes, run, inner)
        assert got is not None, "refused though exact"
        real = keys.flatten()
        for layer, rows in got.items():
            assert torch.equal(rows[real], want[layer][real]), layer
        # (the same rows laid out padded on the other side: the 4-d mask tells where the sequences are)
        right = mr.BatchLayout.padded([3, 5], side="right").routes(
            [r.with_token_ids(None) for r in layout.unpack(session.routes())]
        )
        with torch.no_grad():
            assert _outcome(model, session, right, run, inner) is None, "rows of another padding side forced"
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_a_slice_fed_another_slices_tokens_with_a_mask_of_ones_is_refused() -> None:
    """One sequence in two sequence-parallel slices, its routes laid out without token ids: slice 0's rows fed slice
    1's tokens, their position_ids and an attention mask of ones are refused, as they are without the mask, and so
    are slice 1's rows fed slice 0's; each slice fed its own is exact. Once silent: fed a mask, positions were
    compared by their steps only."""
    torch.manual_seed(5)
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(model)
    session = mr.attach(model)
    try:
        seq = torch.randint(1, 128, (1, 8))
        with torch.no_grad(), _dispatched(model) as rec, session.capture():
            model(seq)
        want = _joined(rec)
        routes = mr.BatchLayout.packed([8]).routes([session.routes().with_token_ids(None)])
        _perturb(model)
        pos, ones = torch.arange(8)[None], torch.ones(1, 4, dtype=torch.long)
        halves = (slice(0, 4), slice(4, 8))
        with torch.no_grad():
            for rows, fed in itertools.product(halves, halves):
                run = lambda f=fed: model(seq[:, f], attention_mask=ones, position_ids=pos[:, f])  # noqa: E731
                got = _outcome(model, session, routes[rows], run, model)
                if rows == fed:
                    assert got is not None, f"slice {rows} refused though exact"
                    for layer, dispatched in got.items():
                        assert torch.equal(dispatched, want[layer][rows]), f"slice {rows} at {layer}"
                else:
                    assert got is None, f"rows {rows} forced on the tokens of {fed}"
    finally:
        session.detach()


# ----------------------------------------------------------------------------- iterators over copied data
def _first(item: Any) -> float:
    return float(item[0] if isinstance(item, tuple) else item)


def _pairs() -> Iterator[Any]:
    shared = iter(range(100000))
    return zip(shared, shared, strict=False)  # (one iterator drawn twice per item)


_DRAWS: dict[str, Callable[[], Iterator[Any]]] = {
    "zip": lambda: zip(range(100000), iter(list(range(100000))), strict=True),
    "zip of one iterator twice": _pairs,
    "enumerate": lambda: enumerate(iter(torch.arange(100000.0))),
    "islice of a cycle": lambda: itertools.islice(itertools.cycle(range(7)), 1, None, 2),
    "map": lambda: map(float, range(100000)),
}


class _PerTokenFrom(nn.Module):
    """A top-2 router over 8 experts that draws one jitter item per token from an iterator it holds: the runs that
    establish its decision on more tokens than a forward draw more items than the forward does."""

    def __init__(self, draws: Iterator[Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.top_k = 2
        self.noise = draws

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and experts of each token."""
        j = torch.tensor([_first(next(self.noise)) for _ in range(x.shape[0])])
        logits = F.linear(x, self.weight) + 0.3 * torch.sin(j)[:, None] * torch.arange(8.0)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize(
    "draws",
    list(_DRAWS),
)
def test_an_iterator_over_iterators_of_data_is_the_routers_own_after_detach_and_in_step(draws: str) -> None:
    """A router draws per token from zip, enumerate, islice or a map of ``float`` over iterators of data (one
    iterator drawn twice per item too): captured forwards see the plain model's draws, and after detach() the router
    holds its own iterator, advanced by exactly what the forwards drew. Once left a stand-in: only iterators of data
    alone and cycles of them were copied for the runs (a map, then, handed back as a generator of the waiting
    items)."""
    make = _DRAWS[draws]
    torch.manual_seed(0)
    model = nn.Sequential(_RouterBlock(_PerTokenFrom(make())), _RouterBlock(_PerTokenFrom(make())))
    torch.manual_seed(0)
    plain = nn.Sequential(_RouterBlock(_PerTokenFrom(make())), _RouterBlock(_PerTokenFrom(make())))
    held = [vars(b.router)["noise"] for b in model]
    xs = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        got = [model(x) for x in xs]
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), "the forwards saw other draws"
    assert all(vars(b.router)["noise"] is it for b, it in zip(model, held, strict=True)), "a stand-in after detach"
    assert [_first(next(b.router.noise)) for b in model] == [_first(next(b.router.noise)) for b in plain]


class _RouterBlock(nn.Module):
    """An MoE block of 8 linear experts around ``router``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus its experts' outputs, weighted."""
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for slot in range(idx.shape[1]):
            for e in range(8):
                hit = idx[:, slot] == e
                if hit.any():
                    out[hit] += w[hit, slot, None] * self.experts[e](x[hit])
        return x + out


@pytest.mark.reliability("interrupts")
def test_capture_and_replay_inside_asyncio_keep_its_sigint_handler() -> None:
    """capture() and replay() inside a coroutine run by ``asyncio.run`` (which puts a SIGINT handler of its own in
    place while it runs): exact, asyncio's handler in place inside and after the blocks, Python's after the run."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    model, session, x = _small()
    before = signal.getsignal(signal.SIGINT)

    async def main() -> tuple[bool, bool]:
        theirs = signal.getsignal(signal.SIGINT)
        with torch.no_grad():
            with session.capture():
                a = model(x).logits
            with session.replay(session.routes()):
                b = model(x).logits
        return torch.equal(a, b), signal.getsignal(signal.SIGINT) is theirs

    try:
        assert asyncio.run(main()) == (True, True)
        assert signal.getsignal(signal.SIGINT) is before
        assert session.state == "idle"
    finally:
        session.detach()
