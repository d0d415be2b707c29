"""Misuse of routes by a hurried user: a capture's rows whose token ids were dropped, fed at other places than they
were recorded at with nothing that states the places (no ``position_ids``, no attention mask: a batch cut into rows of
another length, a suffix without its prefix or KV cache), routes of a prompt replayed on the prompt and its completion
or the reverse, a ``.npy`` file given to ``Routes.load``. Each answer is the recorded experts forced (checked against a
capture of the forced forward) or a ``MoEReplayError`` that says what is wrong."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 4, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model: mr.models.MoETransformer, session: mr.Session) -> None:
    """Move every router's weights, so that a forward left free chooses other experts than the capture did."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in session.names:
            for p in modules[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 2.0)


def _forced(session: mr.Session, routes: mr.Routes, *forwards: object, strict: bool = True) -> mr.Routes:
    """The experts the routers used in ``forwards`` (callables) replayed under ``routes``."""
    with torch.no_grad(), session.replay(routes, strict=strict), session.capture():
        for forward in forwards:
            forward()  # type: ignore[operator]
    return session.routes()


@pytest.mark.reliability("silent wrong answers")
def test_rows_of_a_capture_without_ids_fed_at_other_places_and_no_positions_are_refused() -> None:
    """Rows of a capture whose ids were dropped (``with_token_ids(None)``) keep the place in its sequence each was
    recorded at; a forward fed neither positions nor a mask (each token at its column) was once not compared with
    them: the batch cut into rows of another length, or the second half of a sequence fed alone, forced rows recorded
    at places 4..7 on tokens at places 0..3 without a word, in a strict replay and with ``strict=False``. Each is
    refused; the session stays usable, and the replays that feed the rows' tokens at their places force them."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    routes = session.routes()
    rows = routes.with_token_ids(None)
    cases = [
        ("rows of another length", rows, x.reshape(8, 4), True),
        ("one row of every sequence", rows, x.reshape(1, 32), True),
        ("a suffix without its prefix", rows[4:8], x[:1, 4:], True),
        ("the suffix's rows on the prefix", rows[4:8], x[:1, :4], True),
        ("a prefix of every sequence, strict=False", rows, x[:, :4], False),
        ("the suffixes alone, strict=False", rows[4:], x[:, 4:], False),
    ]
    for what, given, batch, strict in cases:
        with pytest.raises(mr.TokenMismatchError, match="other places of their sequences") as info:
            with torch.no_grad(), session.replay(given, strict=strict):
                model(batch)
        assert "position_ids" in str(info.value), what
    # (the session is left usable, and the plain replays are not refused: the rows forced where they were recorded)
    _perturb(model, session)
    with torch.no_grad(), session.capture():
        model(x)
    assert not session.routes().equal(routes), "the perturbation moved no decision: the test could not fail"
    assert _forced(session, rows, lambda: model(x)).equal(routes)
    assert _forced(session, rows[8:16], lambda: model(x[1:2])).equal(routes[8:16])
    assert _forced(session, rows[16:], lambda: model(x[:2])).equal(routes[16:])  # (other tokens at their places)
    session.detach()


@pytest.mark.reliability("false refusals")
def test_decode_steps_of_a_capture_without_ids_given_their_kv_cache_are_forced_and_without_it_refused() -> None:
    """A prefill and a decode step given its KV cache, captured, replayed with their ids dropped: each token is at the
    place its cache's length gives it, which is where its row was recorded, so the replay forces the recorded experts;
    the decode step fed without its cache (at place 0) is refused, strict or not."""
    model, x = _model(), _ids(batch=2, length=7)
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        cache = model(x[:, :6], use_cache=True).past_key_values
        model(x[:, 6:], past_key_values=cache, use_cache=True)
    routes = session.routes()
    rows = routes.with_token_ids(None)
    _perturb(model, session)

    def prefill_then_step() -> None:
        held = model(x[:, :6], use_cache=True).past_key_values
        model(x[:, 6:], past_key_values=held, use_cache=True)

    assert _forced(session, rows, prefill_then_step).equal(routes)
    for strict in (True, False):
        with pytest.raises(mr.TokenMismatchError, match="other places of their sequences"):
            with torch.no_grad(), session.replay(rows[12:], strict=strict):
                model(x[:, 6:])
    session.detach()


@pytest.mark.reliability("clear errors")
def test_routes_of_a_prompt_replayed_on_prompt_and_completion_or_the_reverse_name_the_counts() -> None:
    """Once unclear: routes captured on the prompts alone replayed on the prompts and their completions (or the
    reverse) were refused for other tokens, "15 of its 20 tokens differ", of a forward fed 32: the counts that tell
    what went wrong were not said. The refusal now names the tokens fed and the rows the routes hold for them, and
    which captured forward recorded them."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x[:, :5])
    prompts = session.routes()
    with torch.no_grad(), session.capture():
        model(x)
    whole = session.routes()
    for strict in (True, False):
        with pytest.raises(mr.TokenMismatchError) as info:
            with torch.no_grad(), session.replay(prompts, strict=strict):
                model(x)
        said = str(info.value)
        assert "it was fed 32 tokens, but the routes hold 20 rows from row 0 on" in said, said
        assert "of the first 20 of its 32 tokens differ" in said, said
        with pytest.raises(mr.TokenMismatchError) as info:
            with torch.no_grad(), session.replay(whole, strict=strict):
                model(x[:, :5])
        said = str(info.value)
        assert "it was fed 20 tokens, but its rows from row 0 on were recorded by forward 1 of the capture" in said
        assert "32 rows each" in said, said
    # (rows that fit the forward are forced as before)
    with torch.no_grad(), session.replay(whole[:16]), session.capture():
        model(x[:2])
    assert session.routes().equal(whole[:16])
    session.detach()


@pytest.mark.reliability("clear errors")
def test_load_of_one_numpy_array_says_what_it_is_and_how_to_read_it(tmp_path: pathlib.Path) -> None:
    """Once unclear: ``Routes.load`` of a ``.npy`` file (``np.save(path, routes.indices.numpy())``, a hurried save)
    was refused as "truncated or corrupted (BadZipFile)", though the file is whole; it now says the file holds one
    numpy array and names ``Routes.from_numpy``, which reads it back as the routes it holds. A truncated routes file
    is still refused as such."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    routes = session.routes()
    session.detach()
    path = tmp_path / "routes.npy"
    np.save(path, routes.to_numpy())
    with pytest.raises(mr.RoutesValidationError, match="one numpy array") as info:
        mr.Routes.load(path)
    assert "Routes.from_numpy" in str(info.value) and "corrupted" not in str(info.value)
    read = mr.Routes.from_numpy(np.load(path), names=list(routes.names), num_experts=routes.num_experts)
    assert read.equal(routes)
    whole = tmp_path / "routes.npz"
    routes.save(whole)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
        mr.Routes.load(cut)
