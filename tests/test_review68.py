"""A review of the watch of first runs (a module the watched forward did not run, watched at its first run with the
modules inside it) and of the comparison of token choices forward by forward, for research and training loops that
run parts of the model past their holders.

The rule checked: a decoder's layers called one by one (a logit lens), a slice of them (a pipeline stage's), or the
model after them, replay exactly and force the recorded rows; a Mixture-of-Depths choice first made in a layer called
alone is recorded, and a replay that runs those calls in another order (the same rankings in the same order, as many
rows in all, but each call's rows read at other places of the routes) is refused instead of forcing one call's rows on
another's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moe_replay as mr
from tests.conftest import perturb_routers
from tests.test_checkpointing import _tiny_hf
from tests.test_mod52 import _x as _mod_x
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
@pytest.mark.xfail(strict=True, reason="where the routers stood at each ranking is kept in memory only")
def test_saved_routes_of_layers_called_alone_replayed_in_another_order_are_refused(tmp_path: Path) -> None:
    """The routes above, saved and loaded (or cut, joined, renamed, sent): the rankings travel, where the routers
    stood in their rows at each does not, so the rankings are compared in call order and the calls replayed in the
    other order force the full forward's rows on the chosen tokens."""
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
