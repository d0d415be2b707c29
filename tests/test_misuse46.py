"""Notebook use the earlier rounds did not try: ``np.asarray(routes)`` (which numpy read as a sequence of tokens, each
a sequence of one token, and gave up on after 64 dimensions with no word of what to pass), ``format_sites`` given one
site picked out of the list, the model or the session, an adapter whose ``match`` raises, a ``new_tokens`` count one
off in ``split_generation``, scores kept over a forward that raised half-way, and a ``KeyboardInterrupt`` that stops
a forward of an HF model half-way inside a capture or a replay, or a cell that raises after its forwards ran. Each
gives the plain answer or a :class:`~moe_replay.MoEReplayError` naming what to pass, and an interrupt leaves the model
as it was and the session usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_replay as mr

from .conftest import assert_untouched, snapshot, tried


def _captured() -> tuple[torch.nn.Module, torch.Tensor, mr.Routes]:
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
    return model, x, routes


@pytest.mark.reliability("bad inputs")
def test_numpy_reads_routes_as_their_array_and_refuses_what_no_one_array_holds() -> None:
    """Once a bare ValueError: ``np.asarray(routes)`` walked the routes as nested sequences (a token of routes is
    routes of one token) until numpy's 64 dimensions, saying nothing of ``to_numpy``. It is now the ``[T, L, k]``
    array ``to_numpy`` gives, in the dtype asked for; routers of other token counts are refused as ``to_numpy``
    refuses them, and ``copy=False`` (no array to share) says so."""
    _, _, routes = _captured()
    rows = [r.clone() for r in routes.per_layer()]
    rows[1][3] = -1  # (a row of no recorded route travels as -1)
    routes = mr.Routes(rows, names=routes.names, num_experts=routes.experts_per_layer)
    for read in (np.asarray, np.array, lambda r: np.asarray(r, dtype=np.int64)):
        tried()
        arr = read(routes)
        assert arr.shape == (routes.num_tokens, routes.num_layers, routes.top_k)
        for j, name in enumerate(routes.names):
            assert np.array_equal(arr[:, j], routes.layer(name).numpy())
        assert np.array_equal(arr, routes.to_numpy())
    assert np.asarray(routes, dtype=np.int64).dtype == np.int64
    arr = np.asarray(routes)
    arr[0, 0, 0] = 7  # (a new array: the routes keep their rows)
    assert int(routes.layer(routes.names[0])[0, 0]) == int(rows[0][0, 0])
    with pytest.raises(mr.InvalidArgumentError, match="copy"):
        np.asarray(routes, copy=False)
    mixed = mr.Routes(
        [torch.tensor([[0, 1]] * 3), torch.tensor([[2]] * 5)], names=["encoder.gate", "decoder.gate"], num_experts=4
    )
    with pytest.raises(mr.InvalidArgumentError, match="token counts"):
        np.asarray(mixed)
    assert np.asarray(mr.Routes([], names=[], num_experts=4)).shape == (0, 0, 0)


@pytest.mark.reliability("bad inputs")
def test_format_sites_takes_one_site_and_names_what_to_pass_for_a_model_or_a_session() -> None:
    """``format_sites(sites[0])`` was refused as no list of sites; it is the table of that one router now. The
    model or a session given instead are refused naming ``find_routers(model)`` and ``session.sites``."""
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    sites = mr.find_routers(model)
    whole = mr.format_sites(sites).splitlines()
    one = mr.format_sites(sites[0]).splitlines()
    assert len(one) == 3 and one[2].split() == whole[2].split()
    assert sites[0].name in one[2] and sites[1].name not in "\n".join(one)
    with pytest.raises(mr.ArgumentTypeError, match=r"find_routers\(model\)"):
        mr.format_sites(model)
    with mr.attach(model) as session:
        with pytest.raises(mr.ArgumentTypeError, match=r"session\.sites"):
            mr.format_sites(session)  # type: ignore[arg-type]
        assert mr.format_sites(session.sites).splitlines()[2].split()[0] == sites[0].name
    for bad in ("layers.0.mlp.router", 3, None):
        with pytest.raises(mr.ArgumentTypeError, match="a list of them"):
            mr.format_sites(bad)  # type: ignore[arg-type]
    assert_untouched(model, before)


@pytest.mark.reliability("bad inputs")
def test_an_adapter_match_that_raises_is_named_as_an_include_predicate_is() -> None:
    """An adapter's ``match`` reading ``module.top_k`` raised torch's bare AttributeError out of ``find_routers`` and
    ``attach`` at the first module without it, naming neither the adapter nor the module, where an ``include=``
    predicate's error is named. It is an ArgumentTypeError naming both, the user's error chained, and ``attach``
    leaves the model as it was; the same predicate written with ``getattr`` is taken."""
    model = mr.models.build("linear_gate")
    before = snapshot(model)
    raising = mr.Adapter("k-two", match=lambda name, module: module.top_k == 2, scope="parent")
    for call in (lambda: mr.find_routers(model, adapters=[raising]), lambda: mr.attach(model, adapters=[raising])):
        tried()
        with pytest.raises(mr.ArgumentTypeError, match=r"Adapter 'k-two': match raised AttributeError") as err:
            call()
        assert isinstance(err.value.__cause__, AttributeError) and "getattr(module" in str(err.value)
        assert_untouched(model, before)
    guarded = mr.Adapter("gates", match=lambda name, module: name.endswith(".gate"), scope="parent")
    assert [s.adapter for s in mr.find_routers(model, adapters=[guarded])] == ["gates", "gates"]


@pytest.mark.reliability("clear errors")
def test_a_new_tokens_count_one_off_names_the_count_split_generation_reads() -> None:
    """``generate(max_new_tokens=N)`` runs N - 1 decode steps (its last token is never fed back);
    ``split_generation(..., new_tokens=N - 1)`` said only "new_tokens=N-1, but the capture holds N-1 decode steps", a
    refusal that reads as an agreement. It now says the capture holds N new tokens and to pass new_tokens=N, which
    splits."""
    model = mr.models.build("softmax_topk")
    prompt = torch.randint(0, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture():
            out = model.generate(prompt, max_new_tokens=5)
        routes = session.routes()
    for wrong in (4, 6):
        tried()
        with pytest.raises(mr.RoutesValidationError, match=r"holds 4 decode steps \(= 5 new tokens.*pass new_tokens=5"):
            mr.split_generation(routes, sequences=out, prompt_len=4, new_tokens=wrong)
    parts = mr.split_generation(routes, sequences=out, prompt_len=4, new_tokens=5)
    assert [p.num_tokens for p in parts] == [9, 9]


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("caught", [False, True], ids=["interrupted", "caught-in-the-block"])
def test_scores_kept_over_a_forward_that_raised_half_way_are_refused_not_counted(caught: bool) -> None:
    """Once silent: a forward interrupted after its first router (Ctrl-C, or an error a retry loop catches inside the
    block) left the kept scores holding that router's rows of the forward and none of the next router's, and
    ``load_balancing_loss`` counted them without a word. Reading them is now refused, naming what raised and the rows
    per router; a block whose forwards all completed, or one whose forward raised before any router kept a row, is
    read as before, and the session keeps scores again as it did."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.keep_scores() as whole:
            model(x)
        want = mr.load_balancing_loss(whole.scores, whole.indices)

        def stop(module: torch.nn.Module, args: object) -> None:
            raise KeyboardInterrupt

        for where in (model.layers[1].mlp, model.embed):  # (after the first router kept its rows; before any)
            tried()
            try:
                with session.keep_scores() as kept:
                    model(x)  # (a forward that completes)
                    hook = where.register_forward_pre_hook(stop)
                    try:
                        model(x)
                    except KeyboardInterrupt:
                        if not caught:
                            raise
                    finally:
                        hook.remove()
            except KeyboardInterrupt:
                assert not caught
            if where is model.embed:  # (no router kept a row of the forward that raised: its rows are whole)
                assert "interrupted" not in repr(kept)
                assert torch.equal(mr.load_balancing_loss(kept.scores, kept.indices), want)
                continue
            assert "interrupted by KeyboardInterrupt" in repr(kept)
            for read in (
                lambda: kept.scores,
                lambda: kept.indices,
                lambda: kept[session.names[0]],
                lambda: kept.row_mask(torch.ones(2, 8)),
                lambda: mr.load_balancing_loss(kept.scores, kept.indices),
            ):
                with pytest.raises(mr.SessionStateError, match=r"raised KeyboardInterrupt.*'layers.0.mlp.router': 32"):
                    read()
        with session.keep_scores() as again:
            model(x)
        assert torch.equal(mr.load_balancing_loss(again.scores, again.indices), want)


class _Interrupt:
    """A forward hook on a router that raises ``KeyboardInterrupt`` at its ``at``-th call, as Ctrl-C in a cell."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, module: torch.nn.Module, args: object, out: object) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.mark.reliability("lifecycle")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_an_interrupt_inside_a_forward_of_a_hf_model_leaves_it_as_it_was_and_the_session_exact(family: str) -> None:
    """Ctrl-C while a router of an HF model runs (its first forward, a capture, a replay), re-run cells after it: the
    model keeps no hook, mode or changed tensor, the interrupted capture is refused until captured again, and the
    session's next capture and replay force exactly the recorded experts."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    from torch.overrides import _get_current_function_mode_stack

    model = tiny_hf.build(family)
    x = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    session = mr.attach(model)
    gate = model.get_submodule(session.names[-1])

    def run(block: object) -> None:
        with block:  # type: ignore[attr-defined]
            model(x)

    interrupted: list[object] = [_nullblock(), session.capture()]  # (the first forward, then a capture)
    for i, block in enumerate([*interrupted, "capture", "replay", "capture"]):
        if i == 2:
            run(session.capture())  # (a capture run to its end between interrupted cells)
            routes = session.routes()
        if isinstance(block, str):
            block = session.capture() if block == "capture" else session.replay(routes)
        tried()
        hook = gate.register_forward_hook(_Interrupt(1))
        try:
            with pytest.raises(KeyboardInterrupt):
                run(block)
        finally:
            hook.remove()
        assert not _get_current_function_mode_stack() and session.state == "idle"
    with pytest.raises(mr.SessionStateError, match="interrupted"):
        session.routes()  # (the last capture stopped half-way)
    run(session.capture())
    again = session.routes()
    assert again.equal(routes)
    with session.replay(routes), session.keep_scores() as kept:
        model(x)
    for name, used in zip(kept.names, kept.indices, strict=True):
        assert torch.equal(used.long().cpu(), routes.layer(name).long())
    # a cell that raises after its forward ran: the capture is marked, its rows kept for allow_partial
    with pytest.raises(KeyboardInterrupt):
        with session.capture():
            model(x)
            raise KeyboardInterrupt
    with pytest.raises(mr.SessionStateError, match="allow_partial"):
        session.routes()
    assert session.routes(allow_partial=True).equal(routes)
    session.detach()
    assert_untouched(model, before)


class _nullblock:
    """No block: a forward outside capture and replay (the session's first forward establishes its routers)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
