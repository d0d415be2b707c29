"""A review of the watch of first runs (a module the watched forward did not run, watched at its first run with the
modules inside it) and of the comparison of token choices forward by forward, for research and training loops that
run parts of the model past their holders.

The rule checked: a decoder's layers called one by one (a logit lens), a slice of them (a pipeline stage's), or the
model after them, replay exactly and force the recorded rows; a Mixture-of-Depths choice first made in a layer called
alone is recorded, and a replay that runs those calls in another order (the same rankings in the same order, as many
rows in all, but each call's rows read at other places of the routes) is refused instead of forcing one call's rows on
another's tokens, also once the routes are saved, sent, sliced, joined, renamed or selected (where the routers stood
at each ranking goes with them, shifted with the rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay._choice_record import cut_record
from tests.conftest import perturb_routers
from tests.test_checkpointing import _tiny_hf
from tests.test_mod52 import _x as _mod_x
from tests.test_mod53 import _wire
from tests.test_public_routers32 import MoDStack
from tests.test_review66 import _EveryOtherForward


def _step(model: _EveryOtherForward, x: torch.Tensor, what: str) -> torch.Tensor:
    """One call: ``m`` the model's forward running every token through its layers (no choice), ``A`` its MoD layers
    called one by one past the model (each choosing its tokens), ``c`` the model's forward choosing as they do."""
    if what in "mc":
        model.n = 0 if what == "c" else 1
        return model(x)
    for layer in model.stack.layers:
        x = layer(x)
    return x


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("captured", "replayed", "exact"),
    [
        ("mA", "mA", True),
        ("Am", "Am", True),
        ("mA", "mc", True),  # (the model's forward choosing as the layers did alone: the same tokens, the same rows)
        ("mA", "Am", False),
        ("Am", "mA", False),
    ],
)
def test_a_choice_first_made_in_layers_called_alone_is_checked_where_the_routes_are_read(
    captured: str, replayed: str, exact: bool
) -> None:
    """The block's first forward runs every token (its MoD layers' own forwards never run), then the layers are called
    alone and choose their tokens: the choice, first seen by the watch of their first run, is recorded. Replayed in
    the order captured (or by the model's forward choosing the same tokens at the same rows), the recorded rows are
    forced; replayed in the other order, the rankings and the rows in all are the same, but the layers' routers would
    read the rows of the full forward's first tokens: once silent, refused now."""
    model = _EveryOtherForward().eval()
    x = _mod_x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            for what in captured:
                _step(model, x, what)
        routes = session.routes()
        assert len(routes._token_choices or ()) == 4  # (two rankings in each of the two layers called alone)
        if exact:
            perturb_routers(session, scale=3.0)  # (their own choice now differs: only forcing gives the rows back)
            with session.replay(routes), session.capture(), torch.no_grad():
                for what in replayed:
                    _step(model, x, what)
            assert session.routes().equal(routes)
        else:
            with pytest.raises(mr.TokenMismatchError, match=r"choice 1 of this replay was taken where router"):
                with session.replay(routes), torch.no_grad():
                    for what in replayed:
                        _step(model, x, what)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.reliability("silent replays")
def test_saved_routes_of_layers_called_alone_replayed_in_another_order_are_refused(tmp_path: Path) -> None:
    """Once silent: the routes above, saved and loaded, kept their rankings but not where the routers stood in their
    rows at each, so the rankings were compared in call order and the calls replayed in the other order forced the
    full forward's rows on the chosen tokens. Now the places are saved too, and that replay is refused (the other
    paths: see test_where_the_routers_stood_at_each_choice_travels_with_the_routes)."""
    model = _EveryOtherForward().eval()
    x = _mod_x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            _step(model, x, "m")
            _step(model, x, "A")
        session.routes().save(tmp_path / "r.npz")
        routes = mr.Routes.load(tmp_path / "r.npz")
        with pytest.raises(mr.TokenMismatchError), session.replay(routes), torch.no_grad():
            _step(model, x, "A")
            _step(model, x, "m")


def _transformed(routes: mr.Routes, how: str, tmp_path: Path) -> mr.Routes:
    """``routes`` saved and loaded, sent over the wire, joined alone, sliced whole, renamed and back, or selected."""
    if how == "save, load":
        routes.save(tmp_path / "r.npz")
        return mr.Routes.load(tmp_path / "r.npz")
    if how == "the wire":
        return _wire(routes)
    if how == "cat":
        return mr.Routes.cat([routes])
    if how == "every row":
        return routes[:]
    if how == "renamed and back":
        return routes.rename({"stack.": "s."}).rename({"s.": "stack."})
    return routes.select(routes.names)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["save, load", "the wire", "cat", "every row", "renamed and back", "select"])
def test_where_the_routers_stood_at_each_choice_travels_with_the_routes(how: str, tmp_path: Path) -> None:
    """Once silent: where the routers stood in their rows at each ranking was kept in memory only, so routes saved,
    sent, joined, sliced, renamed or selected compared their rankings in call order, and the layers called alone
    replayed in another order were forced the full forward's rows. Now it travels with the rankings: the calls in the
    captured order replay exactly, in the other order they are refused by where the routers stood."""
    model = _EveryOtherForward().eval()
    x = _mod_x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            _step(model, x, "m")
            _step(model, x, "A")
        captured = session.routes()
        routes = _transformed(captured, how, tmp_path)
        assert routes._choice_places == captured._choice_places
        with pytest.raises(mr.TokenMismatchError, match=r"choice 1 of this replay was taken where router"):
            with session.replay(routes), torch.no_grad():
                _step(model, x, "A")
                _step(model, x, "m")
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture(), torch.no_grad():
            _step(model, x, "m")
            _step(model, x, "A")
        assert session.routes().equal(captured)


def _without_places(routes: mr.Routes, tmp_path: Path, name: str) -> tuple[dict[str, Any], Any]:
    """``routes`` saved, then written again as a file of the same format without the routers' rows at each ranking
    (as written before they were kept) at ``name``: its arrays, and the rows taken out."""
    routes.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as f:
        arrays = {k: f[k] for k in f.files}
    places = arrays.pop("token_choice_places")
    np.savez_compressed(tmp_path / name, **arrays)
    return arrays, places


@pytest.mark.reliability("silent replays")
def test_a_file_saved_before_the_places_were_kept_is_exact_or_refused(tmp_path: Path) -> None:
    """A routes file without the routers' rows at each ranking (written before they were kept) loads. Where its
    rankings were all taken in forwards of the model, they are compared forward by forward, as then: the captured
    forwards replay. Where they were taken in layers called alone, no order of the calls can be shown: refused, even
    in the captured order. A file whose rows do not fit its rankings and routers, or lie past the rows the routers
    hold, is refused as corrupted."""
    model = _EveryOtherForward().eval()
    x = _mod_x()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            _step(model, x, "m")
            _step(model, x, "A")
        arrays, places = _without_places(session.routes(), tmp_path, "old.npz")
        old = mr.Routes.load(tmp_path / "old.npz")
        assert old._token_choices is not None and old._choice_places is None and old._choice_forwards is None
        with pytest.raises(mr.TokenMismatchError, match="tell neither where the routers stood"):
            with session.replay(old), torch.no_grad():
                _step(model, x, "m")
                _step(model, x, "A")
        for bad in (places[:1], places + 100, places[:, :1]):
            np.savez_compressed(tmp_path / "bad.npz", **arrays, token_choice_places=bad)
            with pytest.raises(mr.RoutesValidationError, match="chosen token set"):
                mr.Routes.load(tmp_path / "bad.npz")
    stack = MoDStack()
    y = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    with mr.attach(stack) as session:
        with session.capture(), torch.no_grad():
            stack(y)
            stack(y[:1])
        captured = session.routes()
        _without_places(captured, tmp_path, "counted.npz")
        counted = mr.Routes.load(tmp_path / "counted.npz")
        assert counted._choice_places is None and counted._choice_forwards is not None
        with session.replay(counted), session.capture(), torch.no_grad():
            stack(y)
            stack(y[:1])
        assert session.routes().equal(captured)


@pytest.mark.reliability("silent replays")
def test_slices_of_whole_forwards_and_their_joins_shift_where_the_routers_stood() -> None:
    """Two forwards of a Mixture-of-Depths stack (each choosing its tokens): a slice of the second forward's rows
    holds its rankings at rows counted from the slice's start, so it replays that forward alone; the slices joined
    in either order replay their forwards in that order (the places of the second part past the first's rows)."""
    model = MoDStack()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            model(x[:1])
        tail_rows = session.routes().num_tokens  # (the rows of the second forward alone)
        with session.capture(), torch.no_grad():
            model(x)
            model(x[:1])
        routes = session.routes()
        per = routes._choice_forwards
        assert per is not None and routes._choice_places is not None
        whole = routes.num_tokens - tail_rows
        head, tail = routes[:whole], routes[whole:]
        assert head._choice_places == routes._choice_places[: per[0]]
        shifted = tuple({k: v - whole for k, v in p.items()} for p in routes._choice_places[per[0] :] if p is not None)
        assert tail._choice_places == shifted and len(shifted) == per[1]
        for parts, inputs in (((tail,), (x[:1],)), ((head, tail), (x, x[:1])), ((tail, head), (x[:1], x))):
            joined = mr.Routes.cat(list(parts))
            with session.replay(joined), session.capture(), torch.no_grad():
                for one in inputs:
                    model(one)
            assert session.routes().equal(joined)
        with pytest.raises(mr.TokenMismatchError):  # (the tail's rows first, on the head's input)
            with session.replay(mr.Routes.cat([tail, head])), torch.no_grad():
                model(x)
                model(x[:1])


def test_a_cut_between_sequences_keeps_the_places_at_the_forwards_edges_only() -> None:
    """A forward of rows [0, 6) of two sequences, cut to its second sequence: a router that stood at the forward's
    first row stands at the kept rows' first, one at its last row at their last, one inside it is not told."""
    idx = torch.tensor([[4, 1, 2], [0, 5, 3]])
    places = ({"a": 0, "b": 0}, {"a": 6, "b": 3})
    kept, counts, kept_places = cut_record((("mod", idx), ("mod", idx)), (2,), places, ((6, 1),), (1,), 3, 6)
    assert kept is not None and counts == (2,)
    assert kept_places == ({"a": 0, "b": 0}, {"a": 3})
    assert cut_record((("mod", idx),), (1,), places[:1], ((6, 1),), (1,), 0, 6)[2] == places[:1]


def _layers_loop(model: Any, ids: torch.Tensor, layers: slice, head: bool) -> list[torch.Tensor]:
    """A research loop past the model's forward: the decoder's ``layers`` called one by one on the embedded tokens
    (each with its rotary embedding), the norm and head read after each where ``head`` (a logit lens)."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(h, pos)
    out = []
    for layer in inner.layers[layers]:
        o = layer(h, position_ids=pos, position_embeddings=rotary)
        h = o[0] if isinstance(o, tuple) else o
        out.append(model.lm_head(inner.norm(h)) if head else h)
    return out


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize(
    ("how", "layers"),
    [("lens", slice(None)), ("model-then-lens", slice(None)), ("stage", slice(1, None))],
)
def test_decoder_layers_called_one_by_one_replay_exactly(how: str, layers: slice) -> None:
    """A tiny Qwen3-MoE: a logit lens over every layer, the model's forward then the lens (the norm and head run by
    both), and a pipeline stage's slice of the layers (the first layer's router silent, allowed so): captured, the
    routers perturbed, then replayed while a capture reads back the rows forced: the recorded ones, no refusal."""
    model = _tiny_hf("qwen3_moe").eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        if how == "model-then-lens":
            model(ids)
        _layers_loop(model, ids, layers, head=how != "stage")

    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            run()
        routes = session.routes(allow_silent=how == "stage")
        perturb_routers(session, scale=3.0)
        with session.replay(routes), session.capture(), torch.no_grad():
            run()
        assert session.routes(allow_silent=how == "stage").equal(routes)
