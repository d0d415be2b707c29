"""Misuse of routes and their metrics by a notebook user in a hurry: rows cut, picked or joined out of their sequences
and compared with a capture, routes read into torch and numpy, metrics of routes with -1 rows. Each answer is exact
(checked against a computation of the user's own) or refused with a ``MoEReplayError`` that says what is wrong."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr


@pytest.fixture(scope="module")
def repeated() -> dict[str, Any]:
    """A capture of one sequence of a single repeated token id (padding fed as tokens, a line of spaces): every row
    holds the same id, and the routers still choose differently along the sequence (each place sees more of it)."""
    model = mr.models.build("softmax_topk", num_layers=2, seed=0)
    ids = torch.full((1, 8), 7)
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        routes = session.routes()
    rows = routes.layer(routes.names[0])
    assert len({tuple(sorted(r.tolist())) for r in rows}) > 1, "the example needs decisions that differ by place"
    return {"model": model, "ids": ids, "routes": routes}


def _by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows whose expert sets differ."""
    return float((a.sort(dim=1).values != b.sort(dim=1).values).any(dim=1).float().mean())


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "how",
    ["reversed", "halves swapped", "shifted by one"],
)
def test_rows_of_one_repeated_token_at_other_places_are_refused_by_compare(repeated: dict[str, Any], how: str) -> None:
    """Once a silent wrong figure: rows of one repeated token id picked, joined or cut at other places of their
    sequence than the other side's were compared row by row (the ids match, so the id check passed), each with the
    decision of another token made after other tokens: ``compare`` reported differing decisions of routing that did
    not differ, while a replay of the same rows is refused for their places. Now refused by the same places; dropping
    the ids compares them anyway, as for other ids."""
    r = repeated["routes"]
    n = len(r)
    if how == "reversed":
        a, b = r, r[list(range(n - 1, -1, -1))]
    elif how == "halves swapped":
        a, b = r, mr.Routes.cat([r[n // 2 :], r[: n // 2]])
    else:
        a, b = r[1:], r[:-1]
    assert torch.equal(a.token_ids, b.token_ids)  # (the id check alone cannot tell)
    with pytest.raises(mr.RoutesValidationError, match="at place"):
        mr.compare(a, b)
    with pytest.raises(mr.RoutesValidationError, match="at place"):
        mr.compare(b, a)
    # the way out the error names: without ids, the rows are compared as they are
    got = mr.compare(a.with_token_ids(None), b)
    name = r.names[0]
    assert got.per_layer[0] == pytest.approx(_by_hand(a.layer(name), b.layer(name)))


@pytest.mark.reliability("false refusals")
def test_rows_of_one_repeated_token_at_their_own_places_are_compared(repeated: dict[str, Any]) -> None:
    """The same rows at their own places compare as they are: cut and joined back, a slice with the capture of that
    slice's tokens in their context, rows taken in token order, a copy read back from a file."""
    r, model, ids = repeated["routes"], repeated["model"], repeated["ids"]
    n = len(r)
    assert mr.compare(r, mr.Routes.cat([r[: n // 2], r[n // 2 :]])).overall == 0
    assert mr.compare(r[2:5], r[2:5]).overall == 0
    assert mr.compare(r, r.in_token_order()).overall == 0
    # a capture of the same tokens in the same context, by another session: ids and places agree
    with mr.attach(model) as again, torch.no_grad():
        with again.capture():
            model(ids)
        other = again.routes()
    assert mr.compare(r[3:], other[3:]).overall == 0


@pytest.mark.reliability("false refusals")
def test_a_rollout_compared_with_its_teacher_forced_capture_is_not_refused_for_places() -> None:
    """The README's rollout against its training forward: a left-padded generate() split per sequence, and a capture of
    the right-padded teacher-forced batch laid out back per sequence. Each row's token sits at the same place of its
    sequence on both sides (padding is no place), so the comparison runs; its figure matches a count by hand."""
    model = mr.models.build("softmax_topk", num_layers=2, seed=0)
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            out = model.generate(prompt, max_new_tokens=4, attention_mask=mask, do_sample=False)
        rollout = mr.split_generation(session.routes(), attention_mask=mask, sequences=out)
        tokens = [torch.cat([p[m.bool()], o[6:]]) for p, m, o in zip(prompt, mask, out, strict=True)]
        layout = mr.BatchLayout.padded([len(t) for t in tokens])
        with session.capture():
            model(layout.tokens(tokens), attention_mask=layout.attention_mask())
        training = mr.Routes.cat(layout.unpack(session.routes()))
    a = mr.Routes.cat(rollout)
    report = mr.compare(a, training)
    for i, name in enumerate(report.names):
        x, y = a.layer(name), training.layer(name)
        both = ~((x < 0).all(dim=1) | (y < 0).all(dim=1))
        assert report.per_layer[i] == pytest.approx(_by_hand(x[both], y[both]))
        assert report.compared[i] == int(both.sum())


class _Wrapper(torch.nn.Module):
    """A wrapper around a whole model under one attribute (DDP's ``module``, ``torch.compile``'s ``_orig_mod``)."""

    def __init__(self, model: torch.nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.attr)(*args, **kwargs)


def _peft_like(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's nesting: ``base_model.model.<the model>``."""
    return _Wrapper(_Wrapper(model, "model"), "base_model")


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("wrap", ["module", "_orig_mod", "peft"])
def test_a_capture_of_a_wrapped_model_is_compared_with_the_bare_models_routes(wrap: str) -> None:
    """Once a false refusal with a hint that led nowhere: a rollout captured on the bare model (or read from an engine)
    compared with the training capture of the same model under DDP, ``torch.compile`` or PEFT was refused as holding
    other routers ("pass names= to compare the common ones", of which there were none), though a replay fits those
    names by itself. Now paired by the one change of wrappers' module names, both ways, with the figures of the
    explicit rename; the routers' names of ``a`` name the report."""
    model = mr.models.build("softmax_topk", num_layers=2, seed=0)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            model(ids)
        bare = session.routes()
    wrapped = _peft_like(model) if wrap == "peft" else _Wrapper(model, wrap)
    with mr.attach(wrapped) as session, torch.no_grad():
        with torch.no_grad():  # (move the routers: the two captures differ somewhere)
            model.layers[1].mlp.router.weight.mul_(-1)
        with session.capture():
            wrapped(ids)
        training = session.routes()
        with torch.no_grad():
            model.layers[1].mlp.router.weight.mul_(-1)
    prefix = "base_model.model." if wrap == "peft" else f"{wrap}."
    assert all(n.startswith(prefix) for n in training.names)
    want = mr.compare(bare, training.rename({prefix: ""}))
    assert want.per_layer[1] > 0  # (the example differs where the router moved)
    got = mr.compare(bare, training)
    assert got.names == bare.names
    assert got == want
    back = mr.compare(training, bare)
    assert back.names == training.names
    assert np.array_equal(back.differ, want.differ) and np.array_equal(back.compared, want.compared)
    assert mr.compare(bare, training, names=[bare.names[1]]).per_layer[0] == want.per_layer[1]


@pytest.mark.reliability("clear errors")
def test_routers_of_another_part_or_layer_are_still_refused_and_cat_names_the_rename() -> None:
    """Only wrappers' module names are fitted: routes of an encoder against a decoder's, or of other layers, are
    refused as before (naming the rename that would say they are the same), and ``Routes.cat`` of one routes under a
    wrapper's names and one bare says which rename joins them."""
    rows = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 2], [3, 0]])]
    enc = mr.Routes(rows, names=["encoder.layers.0.gate", "encoder.layers.1.gate"], num_experts=4)
    dec = enc.rename({"encoder.": "decoder."})
    with pytest.raises(mr.RoutesValidationError, match=r"different routers.*rename\(\{'decoder\.': 'encoder\.'\}\)"):
        mr.compare(enc, dec)
    other_layers = mr.Routes(rows, names=["encoder.layers.2.gate", "encoder.layers.3.gate"], num_experts=4)
    with pytest.raises(mr.RoutesValidationError, match="different routers"):
        mr.compare(enc, other_layers)
    # wrappers inside the paths (FSDP1's units, checkpoint_wrapper): fitted too; another module name inside is not
    inner = {f"encoder.layers.{i}.": f"encoder.layers.{i}._checkpoint_wrapped_module." for i in (0, 1)}
    assert mr.compare(enc, enc.rename(inner)).compared.tolist() == [len(r) for r in rows]
    foo = {f"encoder.layers.{i}.": f"encoder.layers.{i}.foo." for i in (0, 1)}
    with pytest.raises(mr.RoutesValidationError, match="different routers"):
        mr.compare(enc, enc.rename(foo))
    wrapped = enc.rename({"": "module."})
    with pytest.raises(mr.RoutesValidationError, match=r"rename part 1 .*\.rename\(\{'module\.': ''\}\)"):
        mr.Routes.cat([enc, wrapped])
    assert mr.Routes.cat([enc, wrapped.rename({"module.": ""})]).equal(mr.Routes.cat([enc, enc]))


def _numpy_kinds(values: list[Any], dtype: Any) -> dict[str, Any]:
    """The same numbers as numpy arrays torch does not take as they are: reversed twice (negative strides), of the
    other byte order, read-only (a buffer, a memory-mapped file)."""
    plain = np.asarray(values, dtype=dtype)
    swapped = plain.astype(plain.dtype.newbyteorder("S" if plain.dtype.isnative else "="))
    read_only = plain.copy()
    read_only.flags.writeable = False
    return {
        "negative strides": np.flip(np.flip(plain).copy()),
        "other byte order": swapped,
        "read-only": read_only,
    }


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("kind", ["negative strides", "other byte order", "read-only"])
def test_numpy_arrays_torch_does_not_take_as_they_are_index_lay_out_and_split_as_plain_ones(kind: str) -> None:
    """Once a false refusal with a wrong word: ``routes[np.argsort(x)[::-1]]`` (tokens by descending score), a mask
    flipped with ``np.fliplr`` given to ``split_generation``, token ids reversed with ``[::-1]`` given to
    ``BatchLayout.tokens`` were refused as "not integers" or "not token ids" (torch's ValueError on a numpy array of
    negative strides or of the other byte order, caught and misnamed); a read-only array got torch's warning of
    undefined behaviour. Each now gives what the plain array gives, without a warning."""
    model = mr.models.build("softmax_topk", num_layers=2, seed=0)
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    with mr.attach(model) as session, torch.no_grad():
        with session.capture():
            out = model.generate(prompt, max_new_tokens=3, attention_mask=torch.tensor(mask), do_sample=False)
        routes = session.routes()
    n = len(routes)
    order = list(range(n - 1, -1, -1))
    keep = [i % 3 != 1 for i in range(n)]
    want_split = mr.split_generation(routes, attention_mask=torch.tensor(mask), sequences=out)
    layout = mr.BatchLayout.padded([3, 2])
    want_tokens = layout.tokens([torch.tensor([3, 2, 1]), torch.tensor([5, 4])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert routes[_numpy_kinds(order, np.int64)[kind]].equal(routes[order])
        assert routes[_numpy_kinds(keep, bool)[kind]].equal(routes[keep])
        got = mr.split_generation(routes, attention_mask=_numpy_kinds(mask, np.int64)[kind], sequences=out)
        assert len(got) == len(want_split) and all(a.equal(b) for a, b in zip(got, want_split, strict=True))
        seqs = [_numpy_kinds([3, 2, 1], np.int64)[kind], _numpy_kinds([5, 4], np.int32)[kind]]
        assert torch.equal(layout.tokens(seqs), want_tokens)
        arr = routes.to_numpy()
        odd = _numpy_kinds(arr.tolist(), arr.dtype)[kind]
        plain = mr.Routes.from_numpy(arr, names=routes.names, num_experts=8)
        assert mr.Routes.from_numpy(odd, names=routes.names, num_experts=8).equal(plain)


@pytest.mark.reliability("clear errors")
def test_compare_of_lists_of_routes_per_sequence_says_to_join_them() -> None:
    """``split_generation`` and ``BatchLayout.unpack`` give one Routes per sequence; passed to ``compare`` as they
    come, the refusal said only that it takes two Routes. It now says how to join them, and joined they compare."""
    a = [mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["g"], num_experts=4)] * 2
    b = [mr.Routes([torch.tensor([[0, 1], [3, 1]])], names=["g"], num_experts=4)] * 2
    with pytest.raises(mr.ArgumentTypeError, match=r"mr\.Routes\.cat"):
        mr.compare(a, b)  # type: ignore[arg-type]
    with pytest.raises(mr.ArgumentTypeError, match=r"mr\.Routes\.cat"):
        mr.compare(mr.Routes.cat(a), tuple(b))  # type: ignore[arg-type]
    joined = mr.compare(mr.Routes.cat(a), mr.Routes.cat(b))
    assert joined.per_layer[0] == pytest.approx(_by_hand(mr.Routes.cat(a).layer("g"), mr.Routes.cat(b).layer("g")))


@pytest.mark.reliability("clear errors")
def test_load_balancing_loss_of_all_routers_indices_in_one_tensor_says_to_pass_one_per_router() -> None:
    """``routes.indices`` (``[tokens, routers, k]``) given as the indices of a model of several routers was refused as
    "got 2 and 1" tensors, with no word of what the one tensor was. The refusal now names it and what to pass, and
    what it names gives the loss of each router's own rows."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)]) for _ in range(2)]
    routes = mr.Routes(rows, names=["a", "b"], num_experts=4)
    probs = [torch.rand(5, 4, generator=g).softmax(-1) for _ in range(2)]
    with pytest.raises(mr.InvalidArgumentError, match=r"indices is one tensor of shape \(5, 2, 2\).*per_layer"):
        mr.load_balancing_loss(probs, routes.indices)
    with pytest.raises(mr.InvalidArgumentError, match=r"probs is one tensor of shape \(5, 2, 4\)"):
        mr.load_balancing_loss(torch.stack(probs, 1), list(routes.per_layer()))
    each = [mr.load_balancing_loss(p, r) for p, r in zip(probs, rows, strict=True)]
    got = mr.load_balancing_loss(probs, list(routes.indices.unbind(1)))
    assert got.item() == pytest.approx(sum(e.item() for e in each) / 2)
