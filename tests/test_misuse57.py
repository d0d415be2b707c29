"""Misuse of the public API by a hurried user: a one-dimensional mask of the wrong length (or one weight) given to
``RouterScores.row_mask``; an attribute set on (or deleted from) the frozen values the library hands out
(``LayerMap``, ``BatchLayout``, ``RouterSite``, ``Adapter``, ``RoutingComparison``, a verify report's evidence).
Each answer is the plain result, or a ``MoEReplayError`` that names what is wrong and what to do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kept(x: torch.Tensor) -> tuple[mr.Session, mr.RouterScores]:
    model = _model()
    session = mr.attach(model)
    with session.keep_scores() as kept:
        model(x)
    return session, kept


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("weights", [1, 5, 13, 0], ids=["one weight", "too few", "too many", "a 0-d tensor"])
def test_row_mask_of_a_one_dimensional_mask_of_another_length_is_refused(weights: int) -> None:
    """Once silent: ``kept.row_mask(mask)`` gave a one-dimensional mask back as it was, whatever its length, so one
    weight (``torch.tensor([0.])``) broadcast over every row of a loss of one's own (a z-loss weighed to nothing),
    and a mask of the wrong length was handed on as each router's weights. It is refused with an
    ``InvalidArgumentError`` that says how many rows the router kept and what to give; the right length, and the
    ``[batch, positions]`` mask, still give each router one weight per row."""
    x = _ids()
    session, kept = _kept(x)
    rows = kept.scores[0].shape[0]
    mask = torch.tensor(1.0) if weights == 0 else torch.ones(weights)
    with pytest.raises(mr.InvalidArgumentError, match=rf"gives {max(weights, 1)} weight\(s\).*kept {rows} rows"):
        kept.row_mask(mask)
    attention = torch.ones_like(x)
    attention[0, :2] = 0
    flat = kept.row_mask(attention.reshape(-1))
    grid = kept.row_mask(attention)
    assert [w.shape[0] for w in flat] == [s.shape[0] for s in kept.scores]
    for a, b in zip(flat, grid, strict=True):
        assert torch.equal(a, b)
    session.detach()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_row_mask_refuses_weights_load_balancing_loss_refuses(bad: float) -> None:
    """``row_mask`` reads a mask "the way load_balancing_loss reads its mask", and that loss refuses a negative or
    non-finite weight; ``row_mask`` handed it on (a NaN weight made a loss of one's own NaN). Both refuse it, with
    the same ``InvalidArgumentError``."""
    x = _ids()
    session, kept = _kept(x)
    mask = torch.ones(x.shape, dtype=torch.float32)
    mask[1, 3] = bad
    with pytest.raises(mr.InvalidArgumentError, match="finite and not negative"):
        kept.row_mask(mask)
    with pytest.raises(mr.InvalidArgumentError, match="finite and not negative"):
        mr.load_balancing_loss(kept.scores, kept.indices, mask=mask)
    session.detach()


def _frozen_values() -> dict[str, tuple[object, str]]:
    """One of each frozen value the public API hands out, with one of its fields."""
    x = _ids()
    model = _model()
    session = mr.attach(model)
    with session.capture():
        model(x)
    routes = session.routes()
    report = session.verify(x)
    evidence = report.evidence[session.names[0]]
    values: dict[str, tuple[object, str]] = {
        "LayerMap": (mr.LayerMap.from_session(session, num_layers=2), "num_layers"),
        "RouterSite": (session.sites[0], "top_k"),
        "Adapter": (mr.Adapter("mine", match=lambda name, module: False), "scope"),
        "RoutingComparison": (mr.compare(routes, routes), "tokens"),
        "BatchLayout": (mr.BatchLayout.padded([3, 4]), "row_length"),
        "Evidence": (evidence, "top_k"),
        "Call": (evidence.calls[0], "k"),
    }
    session.detach()
    return values


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "kind", ["LayerMap", "RouterSite", "Adapter", "RoutingComparison", "BatchLayout", "Evidence", "Call"]
)
def test_an_attribute_set_on_a_frozen_value_is_refused_with_a_library_error(kind: str) -> None:
    """Once a bare ``dataclasses.FrozenInstanceError`` ("cannot assign to field 'num_layers'"), not a
    ``MoEReplayError``, and saying nothing of what to do: ``layer_map.num_layers = 48``, ``site.top_k = 8``, a
    misspelt attribute, ``del layout.row_length``. Each is refused with a ``MoEReplayError`` (still an
    ``AttributeError`` and a ``dataclasses.FrozenInstanceError``, so ``hasattr``/``getattr`` with a default and code
    that catches the dataclass's own error behave as before) that names the class and the
    attribute and says what gives one with other values; the value is left as it was."""
    value, field = _frozen_values()[kind]
    held = getattr(value, field)
    for act in (
        lambda: setattr(value, field, 1),
        lambda: delattr(value, field),
        lambda: setattr(value, "no_such_field", 1),
    ):
        with pytest.raises(mr.MoEReplayError, match=rf"{kind} is a frozen value, and '\w+' cannot be set") as info:
            act()
        assert isinstance(info.value, AttributeError)
        assert isinstance(info.value, dataclasses.FrozenInstanceError)  # (code that catches the dataclass's still does)
        assert getattr(value, field) is held
    assert not hasattr(value, "no_such_field")
    with pytest.raises(mr.MoEReplayError, match="no field 'no_such_field'"):
        value.no_such_field = 2  # type: ignore[attr-defined]


@pytest.mark.reliability("bad inputs")
def test_a_layer_map_rebuilt_with_another_field_is_checked_as_built() -> None:
    """The refusal names ``dataclasses.replace(value, field=...)`` for a ``LayerMap``: that builds one with the
    field changed, and checks it as the constructor does (a layer count that leaves a router out of range is
    refused), so following the message never hands on a map the library would not build."""
    layer_map = _frozen_values()["LayerMap"][0]
    assert isinstance(layer_map, mr.LayerMap)
    with pytest.raises(mr.MoEReplayError, match="dataclasses.replace"):
        layer_map.num_layers = 3  # type: ignore[misc]
    wider = dataclasses.replace(layer_map, num_layers=3)
    assert wider.num_layers == 3 and wider.names == layer_map.names
    with pytest.raises(mr.LayerMapError):
        dataclasses.replace(layer_map, num_layers=1)


@pytest.mark.reliability("bad inputs")
def test_an_attribute_deleted_from_routes_a_session_or_kept_scores_is_refused_as_one_set() -> None:
    """``routes.names = ...`` was refused with a ``MoEReplayError`` that says what to do, but ``del routes.names``,
    ``del session.capacity`` and ``del kept.scores`` raised Python's bare "property has no deleter"
    ``AttributeError``. Deleting is refused as setting is (a ``MoEReplayError``, still an ``AttributeError``), and a
    method wrapped on the instance (``mock.patch.object``) is still taken off again as the patch ends."""
    from unittest import mock

    x = _ids()
    model = _model()
    session = mr.attach(model)
    with session.keep_scores() as kept, session.capture():
        model(x)
    routes = session.routes()
    for value, name, match in (
        (routes, "names", "cannot be deleted from them: routes.rename"),
        (session, "capacity", "cannot be deleted from a Session: session.reserve"),
        (kept, "scores", "cannot be deleted from RouterScores"),
    ):
        held = getattr(value, name)
        with pytest.raises(mr.MoEReplayError, match=match) as info:
            delattr(value, name)
        assert isinstance(info.value, AttributeError)
        after = getattr(value, name)
        assert after == held if isinstance(held, int) else len(after) == len(held)
    with mock.patch.object(session, "routes", wraps=session.routes) as spy:
        assert session.routes().equal(routes)
    assert spy.call_count == 1 and "routes" not in vars(session)
    assert session.routes().equal(routes)
    session.detach()


@pytest.mark.reliability("bad inputs")
def test_routes_of_an_interrupted_capture_read_after_detach_say_to_attach_again() -> None:
    """Once a message that said what cannot be done: ``routes()`` of a capture an exception interrupted, read after
    ``detach()``, said "Capture again", which a detached session refuses. It says the session was detached and to
    attach the model again; ``allow_partial=True`` still reads the rows, and on a session still attached the
    message says to capture again."""
    x = _ids()
    for detach in (True, False):
        model = _model()
        session = mr.attach(model)
        with pytest.raises(KeyError), session.capture():
            model(x)
            raise KeyError("the caller's own error")
        if detach:
            session.detach()
        want = "detached since: attach the model again" if detach else r"\)\. Capture again, or call"
        with pytest.raises(mr.SessionStateError, match=want):
            session.routes()
        assert session.routes(allow_partial=True).num_tokens == x.numel()
        if not detach:
            session.detach()
