"""Misuse of the public API by a hurried user: routes written by another writer than ``Routes.save`` (``torch.save``,
``pickle.dump``, ``np.savez``), an open file or a file's bytes given to ``Routes.load``; attributes set on routes
and on a session (``routes.token_ids = ids``, ``session.max_bytes = n``); the kept scores object given whole to the
loss; SGLang token counts that are no counts; a ``top_k`` below the routers' given to ``attach``; ``attach`` from a
hook in the middle of a forward. Each answer is the plain result, or a ``MoEReplayError`` that names what is wrong
and what to do, with the model left exactly as it was."""

from __future__ import annotations

import pathlib
import pickle
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr


def _model(seed: int = 0) -> mr.models.MoETransformer:
    return mr.models.build("softmax_topk", num_layers=2, seed=seed)


def _ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _captured() -> tuple[mr.models.MoETransformer, mr.Session, mr.Routes, torch.Tensor]:
    model, x = _model(), _ids()
    session = mr.attach(model)
    with torch.no_grad(), session.capture():
        model(x)
    return model, session, session.routes(), x


def _state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything of ``model`` that the library may change: its tensors, and each module's class, hooks and
    instance ``forward``."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": {
            name: (
                type(m),
                list(m._forward_hooks.values()),
                list(m._forward_pre_hooks.values()),
                m.__dict__.get("forward"),
            )
            for name, m in model.named_modules()
        },
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"].keys() == after["modules"].keys()
    for name, (cls, hooks, pre, fwd) in before["modules"].items():
        cls2, hooks2, pre2, fwd2 = after["modules"][name]
        assert cls is cls2 and fwd is fwd2, name
        assert hooks == hooks2 and pre == pre2, name
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key


@pytest.mark.reliability("files")
def test_load_of_routes_written_by_torch_save_pickle_or_np_savez_says_what_the_file_is_and_how_to_read_it(
    tmp_path: pathlib.Path,
) -> None:
    """Once unclear: routes saved by ``torch.save(routes, path)`` or ``np.savez(path, routes.to_numpy())`` were refused
    by ``Routes.load`` as "not a moe_replay routes file (no 'moe_replay.routes' metadata)", and a ``pickle.dump`` of
    them as "truncated or corrupted", though each file is whole: nothing said what the file was or how to read it.
    Each refusal now names the writer and the reader that takes the file back; following it gives the routes."""
    model, session, routes, _ = _captured()
    before = _state(model)
    torch.save(routes, tmp_path / "torch.pt")
    with open(tmp_path / "pickled.pkl", "wb") as f:
        pickle.dump(routes, f)
    np.savez(tmp_path / "arrays.npz", indices=routes.to_numpy())
    torch.save({"indices": routes.indices}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    cases = [
        ("torch.pt", "torch.save archive", "torch.load(path, weights_only=False)"),
        ("pickled.pkl", "Python pickle", "pickle.load"),
        ("legacy.pt", "Python pickle", "torch.load(path, weights_only=False)"),
        ("arrays.npz", "numpy arrays ['indices']", "Routes.from_numpy(np.load(path)['indices']"),
    ]
    for name, what, how in cases:
        with pytest.raises(mr.RoutesValidationError) as info:
            mr.Routes.load(tmp_path / name)
        said = str(info.value)
        assert what in said and how in said and "not a moe_replay routes file" in said, (name, said)
        assert "truncated or corrupted" not in said, (name, said)
    # (the readers named give the routes back)
    assert torch.load(tmp_path / "torch.pt", weights_only=False).equal(routes)
    with open(tmp_path / "pickled.pkl", "rb") as f:
        assert pickle.load(f).equal(routes)
    arrays = np.load(tmp_path / "arrays.npz")
    assert mr.Routes.from_numpy(arrays["indices"], names=routes.names, num_experts=routes.num_experts).equal(routes)
    # (a file cut short is still refused as such; a zip of other members says what it holds)
    raw = (tmp_path / "torch.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(mr.RoutesValidationError, match="truncated or corrupted"):
        mr.Routes.load(tmp_path / "cut.pt")
    _assert_same(before, _state(model))
    session.detach()


@pytest.mark.reliability("silent replays")
def test_an_attribute_set_on_routes_is_refused_naming_the_call_that_gives_what_was_meant() -> None:
    """Once silent: ``routes.token_id = ids`` (a misspelt ``token_ids``) was kept beside the routes without a word, so
    a replay of them checked no token, and ``routes.token_ids = ids`` raised Python's "has no setter", which names no
    way to give routes their ids. Routes are values: any attribute set on them is refused with an
    ``AttributeError`` that is a ``MoEReplayError`` and names the call to make; the routes are left as they were,
    and the call named gives what was meant."""
    model, session, routes, x = _captured()
    plain = routes.with_token_ids(None)
    ids = x.reshape(-1)
    cases = {
        "token_ids": (ids, "with_token_ids(ids)"),
        "token_id": (ids, "no attribute 'token_id' (a misspelt one?"),
        "names": (("a", "b"), "rename({old_prefix: new_prefix})"),
        "num_experts": (16, "num_experts=...)"),
        "indices": (routes.indices, "Routes.from_numpy(array"),
        "num_tokens": (3, "it is read from their rows"),
    }
    for name, (value, how) in cases.items():
        with pytest.raises(mr.MoEReplayError) as info:
            setattr(plain, name, value)
        assert isinstance(info.value, AttributeError), name
        assert repr(name) in str(info.value) and how in str(info.value), (name, str(info.value))
        assert name not in vars(plain), name
    assert plain.token_ids is None and plain.equal(routes) and plain.names == routes.names
    # (the call named gives the routes their ids, which a replay checks: another batch is refused)
    known = plain.with_token_ids(ids)
    assert known.token_ids is not None and torch.equal(known.token_ids, ids)
    before = _state(model)
    with pytest.raises(mr.TokenMismatchError):
        with torch.no_grad(), session.replay(known):
            model(x.flip(0))
    _assert_same(before, _state(model))
    session.detach()


@pytest.mark.reliability("bad inputs")
def test_a_setting_set_on_a_session_is_refused_naming_the_call_that_makes_it() -> None:
    """Once silent: ``session.max_bytes = n`` after attach set no limit (the rings kept the limit they were made
    with) though the session's ``repr`` and ``table()`` then showed it, so a capture grew past it without a
    ``CaptureOverflowError``; ``session.keep_newest = True`` left the rings made as they were and made the later ones
    wrap; ``session.strict = False`` was kept without a word and no replay read it. Each is refused with an
    ``AttributeError`` that is a ``MoEReplayError`` and names the call to make; the session and the model are left
    as they were, and the call named sets the limit."""
    model, x = _model(), _ids()
    pristine = _state(model)
    session = mr.attach(model, capacity=4)
    before, shown = _state(model), repr(session)
    cases = {
        "max_bytes": (64, "session.capture(max_bytes=...)"),
        "keep_newest": (True, "mr.attach(model, keep_newest=True)"),
        "capacity": (1, "session.reserve(rows)"),
        "strict": (False, "session.replay(routes, strict=False)"),
        "capture_limit": (64, "no attribute 'capture_limit' (a misspelt one?"),
        "attached": (False, "read from the session's state"),
    }
    for name, (value, how) in cases.items():
        with pytest.raises(mr.MoEReplayError) as info:
            setattr(session, name, value)
        assert isinstance(info.value, AttributeError), name
        assert repr(name) in str(info.value) and how in str(info.value), (name, str(info.value))
        assert name not in vars(session), name
    assert repr(session) == shown and session.max_bytes is None and not session.keep_newest
    assert session.capacity == 4 and session.attached
    _assert_same(before, _state(model))
    # (the call named sets the limit: a capture past it is refused)
    with pytest.raises(mr.CaptureOverflowError):
        with torch.no_grad(), session.capture(max_bytes=24):
            model(x)
    with torch.no_grad(), session.capture():
        model(x)
    assert session.routes().num_tokens == x.numel()
    session.reserve(16)
    assert session.capacity == 16
    # (a method may still be wrapped on the instance, as a spy or a mock does)
    seen: list[mr.Routes] = []
    original = session.replay

    def spy(routes: mr.Routes, **kwargs: Any) -> Any:
        seen.append(routes)
        return original(routes, **kwargs)

    session.replay = spy  # type: ignore[method-assign]
    with torch.no_grad(), session.replay(session.routes()):
        model(x)
    assert len(seen) == 1
    del session.replay
    session.detach()
    _assert_same(pristine, _state(model))


@pytest.mark.reliability("bad inputs")
def test_load_balancing_loss_given_the_kept_scores_object_names_the_lists_to_pass() -> None:
    """Once unclear: ``load_balancing_loss(kept, kept.indices)`` (the ``RouterScores`` of ``keep_scores`` given whole)
    was refused as "probs[0] is a str" (iterating it gives router names). It now names the two lists it holds, and
    passing them gives the loss; given for ``indices``, alike."""
    model, x = _model(), _ids()
    session = mr.attach(model)
    with session.keep_scores() as kept:
        model(x)
    for probs, indices, what in ((kept, kept.indices, "probs"), (kept.scores, kept, "indices")):
        with pytest.raises(mr.ArgumentTypeError) as info:
            mr.load_balancing_loss(probs, indices)
        said = str(info.value)
        assert said.startswith(f"{what} must be") and "load_balancing_loss(kept.scores, kept.indices)" in said, said
    loss = mr.load_balancing_loss(kept.scores, kept.indices)
    assert loss.requires_grad and bool(torch.isfinite(loss))
    session.detach()


@pytest.mark.reliability("bad inputs")
def test_sglang_token_counts_that_are_no_counts_are_refused_never_read_as_absent() -> None:
    """Once silent: a ``meta_info`` whose ``prompt_tokens`` or ``completion_tokens`` is there but no count (``5.0``,
    as a table's float column gives it back, ``"5"``, a negative number) was read as holding no counts, so the rows
    were taken without the check those counts give: rows of another model (fewer layers or a smaller k read as fewer
    rows) were read as a sequence of their own length. Each is refused naming the field; the same counts as ints
    refuse the rows, and counts that fit read them."""
    from moe_replay import interop

    lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    rows = mr.Routes([torch.tensor([[0, 3], [1, 2], [-1, -1]])], names=list(lm.names), num_experts=4)
    payload = interop.to_sglang(rows, lm)  # (2 rows: a sequence of 3 tokens)
    for prompt, completion, field in (
        (5.0, 5, "prompt_tokens"),
        ("5", 5, "prompt_tokens"),
        (5, -1, "completion"),
        (True, 2, "prompt_tokens"),
        (5, 5.0, "completion_tokens"),
    ):
        meta = {**payload, "prompt_tokens": prompt, "completion_tokens": completion}
        with pytest.raises(mr.RoutesValidationError) as info:
            interop.from_sglang(meta, lm)
        said = str(info.value)
        assert f"meta_info's {field}" in said and "not a token count" in said and "num_tokens=" in said, said
    with pytest.raises(mr.RoutesValidationError, match="say they cover at least 6 tokens"):
        interop.from_sglang({**payload, "prompt_tokens": 5, "completion_tokens": 5}, lm)
    read = interop.from_sglang({**payload, "prompt_tokens": np.int64(2), "completion_tokens": 1}, lm)
    assert read.equal(rows)
    assert interop.from_sglang({**payload, "prompt_tokens": None, "completion_tokens": 1}, lm).equal(rows)


@pytest.mark.reliability("silent replays")
def test_a_top_k_below_the_routers_k_given_to_attach_records_no_row_cut_to_it() -> None:
    """``attach(model, top_k=1)`` on routers that choose 2 experts (a hurried reading of a config's k): a capture
    that kept each token's first expert only would replay another model. The first forward in a block is refused,
    naming the k the decision chooses; no row is kept, the model is left as it was, and once detached it is as it
    was before attach; attached without ``top_k=`` it records both experts."""
    model, x = _model(), _ids()
    pristine = _state(model)
    session = mr.attach(model, top_k=1)
    attached = _state(model)
    for block in (session.capture, session.keep_scores):
        with pytest.raises(mr.UnsupportedRouterError) as info:
            with torch.no_grad(), block():
                model(x)
        said = str(info.value)
        assert "top_k=1 was given" in said and "chooses 2 experts per token" in said and "Pass top_k=2" in said, said
        _assert_same(attached, _state(model))
    with pytest.raises(mr.MoEReplayError):
        session.routes()
    session.detach()
    _assert_same(pristine, _state(model))
    with mr.attach(model) as fixed:
        with torch.no_grad(), fixed.capture():
            model(x)
        assert fixed.routes().k_per_layer == (2, 2)
    _assert_same(pristine, _state(model))


@pytest.mark.reliability("files")
def test_save_and_load_given_an_open_file_a_buffer_or_a_files_bytes_say_to_pass_a_path(tmp_path: pathlib.Path) -> None:
    """Once unclear: ``Routes.load(open(path, "rb"))``, ``routes.save(io.BytesIO())`` and ``Routes.load(f.read())``
    were refused as "takes a file path, got BufferedReader" (or ``bytes``), which did not say that an open file is not
    taken, nor which path to pass. The refusal now says so and names the open file's own path; loading that path
    gives the routes; nothing is written anywhere."""
    import io

    model, session, routes, _ = _captured()
    before = _state(model)
    path = tmp_path / "routes.npz"
    routes.save(path)
    with open(path, "rb") as f:
        with pytest.raises(mr.ArgumentTypeError, match=r"an open file is not read or written here; pass its path"):
            mr.Routes.load(f)
        with pytest.raises(mr.ArgumentTypeError) as info:
            mr.Routes.load(f)
        assert repr(str(path)) in str(info.value)
        raw = f.read()
    with pytest.raises(mr.ArgumentTypeError, match="look like a file's contents, not its path"):
        mr.Routes.load(raw)
    buffer = io.BytesIO()
    with pytest.raises(mr.ArgumentTypeError, match="an open file or a buffer is not read or written here"):
        routes.save(buffer)
    assert buffer.getvalue() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["routes.npz"]
    assert mr.Routes.load(path).equal(routes)
    _assert_same(before, _state(model))
    session.detach()


@pytest.mark.reliability("re-entrance")
def test_attach_from_a_hook_in_the_middle_of_a_forward_leaves_that_forward_plain_and_replays_after() -> None:
    """Re-entrance: ``mr.attach`` called by a forward hook of a layer while the model's forward runs (a callback that
    attaches lazily). The forward it runs in goes on as a plain one (its output unchanged); the session then
    captures and replays exactly, and once detached, with the hook removed, the model is as it was."""
    model, x = _model(), _ids()
    pristine = _state(model)
    with torch.no_grad():
        plain = model(x).logits
    made: list[mr.Session] = []

    def attach_once(module: torch.nn.Module, args: Any, out: Any) -> None:
        if not made:
            made.append(mr.attach(model))

    handle = model.layers[0].register_forward_hook(attach_once)
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)
    (session,) = made
    with torch.no_grad(), session.capture():
        captured = model(x).logits
    routes = session.routes()
    assert torch.equal(captured, plain) and routes.num_tokens == x.numel()
    with torch.no_grad(), session.replay(routes), session.capture():
        assert torch.equal(model(x).logits, plain)
    assert session.routes().equal(routes)
    session.detach()
    handle.remove()
    _assert_same(pristine, _state(model))
