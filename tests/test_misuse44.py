"""Misuse of the public API that earlier rounds did not try: a dict or a nested tensor where a list of names or tensors
is taken (whose keys alone were read, or which raised torch's own error), a strict replay of routes that force no
expert, an ``exclude=`` that takes out every router, and messages that named the file twice or said nothing of the
mistake. Each is refused with a :class:`~moe_replay.MoEReplayError` naming what is wrong and what to do, and the
model is left as it was."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --- a dict or a nested tensor where a list is taken ---------------------------------------------------------------


def _list_takers(routes: mr.Routes) -> dict[str, Callable[[Any], object]]:
    """Public calls that take a list of router names, each fed ``value`` in its place."""
    rows = list(routes.per_layer())
    return {
        "compare(names=)": lambda v: mr.compare(routes, routes, names=v),
        "Routes(names=)": lambda v: mr.Routes(rows, names=v, num_experts=8),
        "Routes.select": lambda v: routes.select(v),
        "LayerMap.from_names": lambda v: mr.LayerMap.from_names(v, num_layers=2, num_experts=8, top_k=2),
        "Routes.from_numpy(names=)": lambda v: mr.Routes.from_numpy(routes.to_numpy(), names=v, num_experts=8),
    }


@pytest.mark.reliability("bad inputs")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_router_names_given_as_a_dict_or_a_nested_tensor_are_refused_not_read_as_its_keys() -> None:
    """``compare(names={...})``, ``Routes(names={...})`` and ``routes.select({...})`` read a dict's keys and dropped its
    values unsaid (a dict of router to weight compared or kept every router); ``compare(names=<nested tensor>)``
    raised torch's own "NestedTensorImpl doesn't support sizes". A list is items in order: a mapping, a nested or a
    sparse tensor is none, and each call now refuses it naming the argument."""
    _, _, routes = _captured()
    as_dict = {n: 1.0 for n in routes.names}
    odd = {
        "a dict": as_dict,
        "a nested tensor": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]),
        "a sparse tensor": torch.eye(2).to_sparse(),
    }
    for call, take in _list_takers(routes).items():
        take(list(routes.names))  # (the plain list is taken)
        for what, value in odd.items():
            tried()
            try:
                take(value)
            except mr.MoEReplayError as e:
                assert "names" in str(e), f"{call} with {what}: {e}"
            else:
                pytest.fail(f"{call} took {what} for router names")


@pytest.mark.reliability("bad inputs")
def test_load_balancing_loss_refuses_a_dict_of_tensors_and_says_how_to_pass_routes() -> None:
    """``load_balancing_loss({"router": probs}, ...)`` said "probs[0] is a str" (the dict's first key), and
    ``load_balancing_loss(probs, routes)`` said only that a Routes is no tensor; each now says what to pass."""
    _, _, routes = _captured()
    probs = torch.full((16, 8), 1 / 8)
    one = routes.layer(routes.names[0])
    mr.load_balancing_loss(probs, one)  # (tensors are taken)
    with pytest.raises(mr.ArgumentTypeError, match=r"got a dict: a dict iterates over its keys"):
        mr.load_balancing_loss({routes.names[0]: probs}, one)
    with pytest.raises(mr.ArgumentTypeError, match=r"got a dict"):
        mr.load_balancing_loss(probs, {routes.names[0]: one})
    with pytest.raises(mr.ArgumentTypeError, match=re.escape("pass routes.per_layer()")):
        mr.load_balancing_loss([probs, probs], routes)
    loss = mr.load_balancing_loss([probs, probs], list(routes.per_layer()))  # (the way it says)
    assert loss.ndim == 0 and bool(torch.isfinite(loss))


# --- a strict replay that forces nothing ---------------------------------------------------------------------------


@pytest.mark.reliability("silent replays")
def test_a_strict_replay_of_routes_whose_rows_are_all_minus_one_is_refused_before_any_forward() -> None:
    """Routes whose every row is -1 (route natively) made a strict replay engage nothing: the block ran as a plain
    forward and said nothing (a prompt served wholly from an engine's prefix cache, padding alone, a slice of a
    generation's last token). A strict replay now refuses them before any forward; ``strict=False`` routes natively
    on purpose, and routes with one recorded row still replay."""
    model, x, routes = _captured()
    blank = mr.Routes([torch.full_like(r, -1) for r in routes.per_layer()], names=routes.names, num_experts=8)
    before = snapshot(model)
    with mr.attach(model) as session:
        free = model(x).logits
        with pytest.raises(mr.RoutesValidationError, match=r"every row of these routes is -1.*strict=False"):
            with session.replay(blank):
                pytest.fail("the block ran")  # (refused as it is entered)
        with session.replay(blank, strict=False):
            native = model(x).logits
        assert torch.equal(native, free)  # (natively, as asked)
        one = [torch.full_like(r, -1) for r in routes.per_layer()]
        one[1][5] = routes.layer(routes.names[1])[5]
        partial = mr.Routes(one, names=routes.names, num_experts=8).with_token_ids(routes.token_ids)
        with session.replay(partial), session.capture():  # (one row forced: a replay)
            model(x)
        assert torch.equal(session.routes().layer(routes.names[1])[5], one[1][5])
        # (routes of routers all -1 beside a router with recorded rows: some expert is forced)
        mixed = mr.Routes([one[0], routes.layer(routes.names[1])], names=routes.names, num_experts=8)
        with session.replay(mixed.with_token_ids(routes.token_ids)):
            model(x)
    assert_untouched(model, before)


@pytest.mark.reliability("silent replays")
def test_a_strict_replay_of_no_rows_is_left_to_the_consumption_check() -> None:
    """Routes of no row force nothing either, but a forward of no token reads none: the -1 check leaves them be, and
    a forward of tokens is refused as an overdraw, as before."""
    model, x, routes = _captured()
    with mr.attach(model) as session:
        with pytest.raises(mr.ReplayConsumptionError):
            with session.replay(routes[:0].with_token_ids(None)):
                model(x)


# --- errors that say what is wrong ---------------------------------------------------------------------------------


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "exclude",
    ["*", "layers.*", ["layers.0.mlp.router", "layers.1.mlp.router"], lambda name, module: True],
    ids=["star", "glob", "every name", "predicate"],
)
def test_an_exclude_that_takes_out_every_router_is_named_as_the_cause(exclude: Any) -> None:
    """``attach(model, exclude="*")`` said "no MoE router found ... name the routers with include=", as if discovery
    had failed; the exclusion took them out. The error now names exclude= and the routers found without it."""
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    for call in (mr.find_routers, mr.attach):
        tried()
        with pytest.raises(mr.RouterNotFoundError, match=r"exclude=.* took out every router found") as info:
            call(model, exclude=exclude)
        assert "layers.0.mlp.router" in str(info.value)
    assert_untouched(model, before)
    assert mr.find_routers(model, exclude="layers.0.*")  # (an exclude that leaves one is taken)


@pytest.mark.reliability("bad inputs")
def test_the_cli_names_an_exclude_that_takes_out_every_router(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_replay.__main__ import main

    assert main(["inspect", "softmax_topk", "--exclude", "*"]) != 0
    assert "--exclude '*' took out every router found" in capsys.readouterr().err


@pytest.mark.reliability("files")
def test_a_corrupted_field_of_a_routes_file_names_the_file_once(tmp_path: Path) -> None:
    """A routes file whose forwards field was damaged said ``<path>: cannot read routes from <path>: ...``."""
    _, _, routes = _captured()
    path = tmp_path / "r.npz"
    routes.save(path)
    arrays = dict(np.load(path))
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["forwards"] = [1]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted") as info:
        mr.Routes.load(path)
    assert str(info.value).count(str(path)) == 1, str(info.value)


@pytest.mark.reliability("bad inputs")
def test_split_generation_of_sequences_shorter_than_the_prompt_says_so() -> None:
    """``split_generation(..., sequences=<cut to 4 of the prompt's 8 positions>)`` said "sequences hold -4 new
    tokens"; a mask given as a dict said "got Could not infer dtype of dict"."""
    _, x, routes = _captured()
    mask = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(mr.RoutesValidationError, match=r"sequences hold 4 positions, fewer than the prompt's 8"):
        mr.split_generation(routes, attention_mask=mask, sequences=x[:, :4])
    with pytest.raises(mr.InvalidArgumentError, match=r"got a dict \(.*pass the attention mask"):
        mr.split_generation(routes, attention_mask={"input_ids": x})


@pytest.mark.reliability("bad inputs")
def test_the_repr_of_a_layer_map_of_many_dense_layers_stays_one_short_line() -> None:
    """A LayerMap of 10 MoE layers in 10,000 printed every dense layer: a 59,000-character repr."""
    names = [f"model.layers.{i}.mlp.gate" for i in range(9990, 10000)]
    lm = mr.LayerMap.from_names(names, num_layers=10000, num_experts=8, top_k=2)
    text = repr(lm)
    assert len(text) < 200 and "\n" not in text, text
    assert "dense_layers=[0, 1, 2, 3, 4, 5, ... (+9983 more), 9989]" in text
    small = mr.LayerMap.from_names(names[:2], layers=[0, 3], num_layers=4, num_experts=8, top_k=2)
    assert "dense_layers=[1, 2]" in repr(small)


# --- probabilities made from kept scores -----------------------------------------------------------------------------


@pytest.mark.reliability("silent replays")
def test_probabilities_made_from_kept_scores_pair_with_their_own_routers_indices_in_any_order() -> None:
    """``load_balancing_loss([s.softmax(-1) for s in kept.scores][::-1], kept.indices)`` counted each router's
    probabilities with the other router's experts, a wrong loss without a word: the kept scores name their routers,
    but the probabilities made from them did not. They now name the router whose kept scores they were made from, a
    few ops back through their graph, and are paired by name as the kept scores are."""
    model = mr.models.build("softmax_topk", num_layers=3)
    x = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with mr.attach(model) as session, session.keep_scores() as kept:
        model(x)
    probs = [s.float().softmax(-1) for s in kept.scores]
    want = mr.load_balancing_loss(probs, kept.indices)
    by_hand = []
    for p, idx in zip(probs, kept.indices, strict=True):
        f = torch.zeros(p.shape[1]).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / p.shape[0]
        by_hand.append(p.shape[1] * (f * p.mean(0)).sum())
    assert want.item() == pytest.approx(torch.stack(by_hand).mean().item(), abs=1e-6)
    for order in ([2, 1, 0], [1, 2, 0]):
        tried()
        moved = [probs[i] for i in order]
        got = mr.load_balancing_loss(moved, kept.indices)  # (paired by name: each router's own)
        assert got.item() == pytest.approx(want.item(), abs=1e-6), order
        renormed = [(p / p.sum(-1, keepdim=True)) for p in moved]  # (two ops back)
        assert mr.load_balancing_loss(renormed, kept.indices).item() == pytest.approx(want.item(), abs=1e-6)
    got.backward()  # (gradients reach every router through the probabilities, as before)
    assert all(layer.mlp.router.weight.grad is not None for layer in model.layers)


@pytest.mark.reliability("bad inputs")
def test_routes_of_routers_that_see_other_token_counts_say_which_and_how_to_slice_them() -> None:
    """``routes[:2]`` of an encoder's and a decoder's routers (4 and 6 rows) said "routers differ in token counts ([4,
    6]); use .tokens_per_layer", naming neither the routers nor a way to slice; it now names both groups and
    ``select``, which slices."""
    rows = [torch.tensor([[0, 1]] * 4), torch.tensor([[2, 3]] * 6)]
    routes = mr.Routes(rows, names=["encoder.0.gate", "decoder.0.gate"], num_experts=8)
    for call in (lambda: routes[:2], lambda: routes.indices, lambda: len(routes), lambda: routes.to_numpy()):
        tried()
        with pytest.raises(mr.InvalidArgumentError, match=r"4: \['encoder.0.gate'\]; 6: \['decoder.0.gate'\]") as info:
            call()
        assert "routes.select([...])" in str(info.value)
    assert routes.select(["encoder.0.gate"])[:2].num_tokens == 2  # (the way it says)


@pytest.mark.reliability("files")
def test_a_routes_file_whose_metadata_names_a_key_twice_is_refused(tmp_path: Path) -> None:
    """A routes file whose metadata named ``"names"`` twice (an edited file) loaded with the second list, read over
    the first without a word; save() never writes a key twice, so such a file is refused as corrupted."""
    _, _, routes = _captured()
    path = tmp_path / "r.npz"
    routes.save(path)
    arrays = dict(np.load(path))
    text = bytes(arrays["meta"]).decode()
    assert mr.Routes.load(path).names == routes.names
    edited = text[:-1] + ', "names": ["other.0.gate", "other.1.gate"]}'
    arrays["meta"] = np.frombuffer(edited.encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted.*names the key 'names' twice"):
        mr.Routes.load(path)
