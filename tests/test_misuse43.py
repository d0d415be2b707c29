"""Misuse of the public API that earlier rounds did not try: an ``Adapter`` built with fields of the wrong kind (a
``match`` that is no predicate of ``(name, module)``, a ``call`` that numbers no call, an ``unsupported`` reason that
is no text). Each is refused with a :class:`~moe_replay.MoEReplayError` naming the field and what to pass, before
any module is touched, and the model is left as it was."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot, tried


def _on_router(name: str, module: nn.Module) -> bool:
    return name.endswith("router")


# --- Adapter fields -----------------------------------------------------------------------------------------------


_PREDICATE = "match must be a predicate"
_CALL = r"call must be None or the number \(an int >= 0"
_ARITY = r"must take two arguments, \(name, module\)"
_REASON = "unsupported must be None or a reason"

_BAD_FIELDS: list[tuple[str, dict[str, Any], type[mr.MoEReplayError], str]] = [
    ("match None", {"match": None}, mr.ArgumentTypeError, _PREDICATE),
    ("match a glob", {"match": "*.router"}, mr.ArgumentTypeError, _PREDICATE),
    ("match a list", {"match": ["layers.0.mlp.router"]}, mr.ArgumentTypeError, _PREDICATE),
    ("match a module", {"match": nn.Linear(2, 2)}, mr.ArgumentTypeError, "pass include="),
    ("match of one argument", {"match": lambda name: True}, mr.ArgumentTypeError, _ARITY),
    ("name None", {"name": None}, mr.ArgumentTypeError, "name must be a str"),
    ("unsupported an array", {"unsupported": np.array([1, 2])}, mr.ArgumentTypeError, _REASON),
    ("unsupported a tensor", {"unsupported": torch.tensor([1, 2])}, mr.ArgumentTypeError, _REASON),
    ("call -1", {"call": -1}, mr.InvalidArgumentError, _CALL),
    ("call 1.5", {"call": 1.5}, mr.InvalidArgumentError, _CALL),
    ("call a str", {"call": "0"}, mr.InvalidArgumentError, _CALL),
    ("call True", {"call": True}, mr.InvalidArgumentError, _CALL),
]


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(("case", "fields", "error", "message"), _BAD_FIELDS, ids=[c for c, *_ in _BAD_FIELDS])
def test_an_adapter_of_fields_of_the_wrong_kind_is_refused_where_it_is_built(
    case: str, fields: dict[str, Any], error: type[mr.MoEReplayError], message: str
) -> None:
    """A ``match`` that is no predicate raised Python's own ``TypeError`` ("'str' object is not callable") from deep in
    discovery, a ``call`` of ``"0"`` a bare ``TypeError`` at the first forward, ``call=-1`` or ``1.5`` a refusal saying
    the forward "does not make call #-1", and an array as ``unsupported`` numpy's "truth value is ambiguous": each is
    now refused where the Adapter is built, naming the field, and attach never sees it."""
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    given = {"name": "mine", "match": _on_router, **fields}
    with pytest.raises(error, match=message):
        mr.Adapter(**given)
    assert_untouched(model, before)
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", [0, np.int64(0), torch.tensor(0)], ids=["int", "np.int64", "0-d tensor"])
def test_an_adapter_call_given_as_a_numpy_integer_or_a_0_d_tensor_names_the_call_it_holds(call: object) -> None:
    """``call=`` given as a numpy integer or a 0-d tensor (a count kept from an array) is the plain int it holds: the
    capture under it is the capture of the plain ``call=0``, and the generic one's."""
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    captured = []
    for adapters in ([], [mr.Adapter("mine", match=_on_router, call=call)]):  # type: ignore[arg-type]
        model = mr.models.build("softmax_topk")
        adapter_calls = [a.call for a in adapters]
        assert all(type(c) is int for c in adapter_calls)
        with mr.attach(model, adapters=adapters) as session:
            with session.capture():
                model(x)
            captured.append(session.routes())
    assert captured[0].equal(captured[1])
    tried()


@pytest.mark.reliability("bad inputs")
def test_an_adapter_match_answering_a_tensor_of_several_values_is_refused_naming_the_adapter() -> None:
    """A predicate that answers a tensor of several elements raised torch's "Boolean value of Tensor with more than one
    value is ambiguous" from discovery; it is refused naming the Adapter and what to return, and the model is left as
    it was. Answers of one truth value (a ``re.Match`` or None, a one-element tensor) are read as Python reads them."""
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    several = mr.Adapter("several", match=lambda n, m: torch.tensor([n.endswith("router"), False]))
    with pytest.raises(mr.ArgumentTypeError, match="Adapter 'several': match.*no single truth value"):
        mr.attach(model, adapters=[several])
    assert_untouched(model, before)
    for match in (lambda n, m: re.search(r"router$", n), lambda n, m: torch.tensor([n.endswith("router")])):
        sites = mr.find_routers(model, adapters=[mr.Adapter("one", match=match)])
        assert [s.adapter for s in sites] == ["one", "one"]
    tried(3)


# --- the TRL trainer's own arguments -----------------------------------------------------------------------------


@pytest.mark.reliability("bad inputs")
def test_the_trl_trainers_counts_and_flags_given_as_numpy_values_are_the_values_they_hold(tmp_path: Any) -> None:
    """``capacity=np.int64(...)`` (a row count computed with numpy) was refused as "not a positive number of rows"
    while ``mr.attach`` takes it, and numpy's True and False as ``verify_replay`` or ``replay_ref_model`` as "not True
    or False". Each is now the value it holds: the session's ring has that many rows, the replays are verified, and
    ``replay_ref_model=np.False_`` attaches no session to the reference model, as ``False`` does, where ``None``
    attaches one."""
    trl_tests = pytest.importorskip("tests.integrations.test_trl")
    from moe_replay.integrations import trl as mr_trl

    path = tmp_path / "policy"  # (beta != 0: TRL builds the reference model from the policy's path)
    trl_tests.policy(seed=1).save_pretrained(path)
    trl_tests.tokenizer().save_pretrained(path)
    for ref in (np.False_, False, None):
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=str(path), reward_funcs=trl_tests.reward, args=trl_tests.config(str(tmp_path / "out"), beta=0.1),
            train_dataset=trl_tests.dataset(), processing_class=trl_tests.tokenizer(),
            capacity=np.int64(4096), verify_replay=np.True_, replay_ref_model=ref,
        )  # fmt: skip
        try:
            assert trainer.ref_model is not None  # (a reference model there is, in every case)
            assert trainer.moe_session is not None
            assert trainer.moe_session.memory()["cpu"]["rows"] == 4096 * len(trainer.moe_session.names)
            assert trainer._mr_verify is True
            assert (trainer.moe_ref_session is None) == (ref is not None)
        finally:
            trainer.detach_routing_replay()
    tried(3)


# --- rows of a capture replayed on the same token ids in another context -------------------------------------------


def _captured_pair() -> tuple[nn.Module, mr.Session, torch.Tensor, mr.Routes]:
    """A model, its session, a [2, 8] batch and the capture of one forward over it."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        model(x)
    return model, session, x, session.routes()


def _move_routers(model: nn.Module) -> None:
    """Move every router's weight far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.add_(3 * torch.randn(p.shape, generator=g))


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("part", ["a prefix of sequence 0", "sequence 1 alone", "the sequences swapped"])
def test_rows_of_a_capture_replayed_on_their_tokens_in_their_own_context_force_the_recorded_experts(part: str) -> None:
    """The replays that look like a slice of another batch but are right: a prefix of a sequence (a causal model
    routes it as it did beside the rest), one sequence of the batch alone, the sequences swapped with their rows. Each
    forces the recorded experts (a capture inside it, after the routers were moved, holds exactly those rows)."""
    model, session, x, routes = _captured_pair()
    rows, fed = {
        "a prefix of sequence 0": (routes[0:5], x[0:1, :5]),
        "sequence 1 alone": (routes[8:16], x[1:2]),
        "the sequences swapped": (mr.Routes.cat([routes[8:16], routes[0:8]]), x.flip(0)),
    }[part]
    _move_routers(model)
    with session.replay(rows), session.capture(), torch.no_grad():
        model(fed)
    assert session.routes().equal(rows)
    session.detach()
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("part", ["a suffix fed without its prefix", "every other token"])
def test_rows_of_a_capture_replayed_on_their_token_ids_in_another_context_are_refused(part: str) -> None:
    """Each row's token id matches, but the rows were recorded for those tokens after others the forward is not fed:
    the routers see other hidden states, and the experts forced are those of another context. Refused (each row's
    place in its sequence is recorded with it, and compared with the place the forward feeds its token at), with the
    model left as it was."""
    model, session, x, routes = _captured_pair()
    before = snapshot(model)
    rows, fed = {
        "a suffix fed without its prefix": (routes[4:8], x[0:1, 4:8]),
        "every other token": (routes[::2], x.reshape(-1)[::2].reshape(2, 4)),
    }[part]
    assert torch.equal(rows.token_ids, fed.reshape(-1))  # (the ids alone fit)
    try:
        with pytest.raises(mr.TokenMismatchError, match="other places in their sequences"):
            with session.replay(rows), torch.no_grad():
                model(fed)
    finally:
        session.detach()
    assert_untouched(model, before)
    tried()


_DECODE_CACHES = {
    "no KV cache": "other places in their sequences",
    "another batch's KV cache": "no earlier forward of this replay",
    "another batch's KV cache, then its own": "no earlier forward of this replay",
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("cache", list(_DECODE_CACHES))
def test_decode_steps_replayed_without_the_kv_cache_of_their_prompt_are_refused(cache: str) -> None:
    """The capture of ``generate()`` replayed in the same decode loop, but its steps fed their tokens with no cache (a
    loop that forgot to pass it on) or with a cache made from other prompts (at every step, or at the first and the
    cache it returned after: each token at the place it was recorded at): the routers see the new tokens beside
    another context (none, or other tokens) than the one their rows were recorded in. Refused (a cache that holds
    tokens must be one the replay's own forwards built, as the capture's built theirs), with the model left as it
    was; the same loop with its own cache replays (checked first)."""
    model = mr.models.build("softmax_topk")
    x, y = (torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(s)) for s in (0, 7))
    session = mr.attach(model)
    with session.capture():
        seq = model.generate(x, max_new_tokens=3)
    routes = session.routes()
    before = snapshot(model)

    def decode(given: str) -> None:
        with torch.no_grad():
            other = model(y, use_cache=True).past_key_values
        with session.replay(routes), torch.no_grad():
            kv = model(seq[:, :4], use_cache=True).past_key_values
            for i in range(2):
                past = {
                    "own": kv,
                    "no KV cache": None,
                    "another batch's KV cache": other,
                    "another batch's KV cache, then its own": other if i == 0 else kv,
                }[given]
                kv = model(seq[:, 4 + i : 5 + i], past_key_values=past, use_cache=True).past_key_values

    decode("own")
    try:
        with pytest.raises(mr.TokenMismatchError, match=_DECODE_CACHES[cache]):
            decode(cache)
    finally:
        session.detach()
    assert_untouched(model, before)
    tried()


def _kept_through(routes: mr.Routes, how: str, tmp: Path) -> mr.Routes:
    """``routes`` through one of the ways routes travel: a file, a pickle, cat of two slices, other ids."""
    if how == "save, load":
        routes.save(tmp / "r.npz")
        return mr.Routes.load(tmp / "r.npz")
    if how == "pickle":
        return pickle.loads(pickle.dumps(routes))
    if how == "cat of two slices":
        return mr.Routes.cat([routes[:5], routes[5:]])
    return routes.with_token_ids(routes.token_ids)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", ["save, load", "pickle", "cat of two slices", "with_token_ids"])
def test_each_rows_place_in_its_sequence_travels_with_it(how: str, tmp_path: Path) -> None:
    """The place each row was recorded at goes wherever the row goes (a file, a pickle, cat, other ids): the routes
    still replay on their own batch, and their suffix fed without its prefix is still refused."""
    model, session, x, routes = _captured_pair()
    kept = _kept_through(routes, how, tmp_path)
    _move_routers(model)
    with session.replay(kept), session.capture(), torch.no_grad():
        model(x)
    assert session.routes().equal(routes)
    try:
        with pytest.raises(mr.TokenMismatchError, match="other places in their sequences"):
            with session.replay(kept[4:8]), torch.no_grad():
                model(x[0:1, 4:8])
    finally:
        session.detach()
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("fed", ["in two chunks", "with a cache filled before the capture, again"])
def test_rows_replayed_in_their_own_context_by_other_forwards_force_the_recorded_experts(fed: str) -> None:
    """Forwards that give each token the context it was recorded in, another way than the capture did: a prefill cut in
    two chunks (the second given the cache the first returned), and decode steps captured on a cache filled before
    the capture, replayed on one filled the same way before the replay (its origin is as unknown as the capture's,
    and each token's place is checked). Each forces the recorded experts."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    session = mr.attach(model)
    with torch.no_grad():
        if fed == "in two chunks":
            with session.capture():
                model(x)
            # (the rows in the order the chunks read them: each sequence's first five, then each one's last three)
            chunked = session.routes()[
                torch.cat([torch.arange(0, 5), torch.arange(8, 13), torch.arange(5, 8), torch.arange(13, 16)])
            ]
            _move_routers(model)
            with session.replay(chunked), session.capture():
                kv = model(x[:, :5], use_cache=True).past_key_values
                model(x[:, 5:], past_key_values=kv)
            assert session.routes().equal(chunked)
        else:
            prefill = model(x[:, :6], use_cache=True).past_key_values
            with session.capture():
                kv = model(x[:, 6:7], past_key_values=prefill, use_cache=True).past_key_values
                model(x[:, 7:8], past_key_values=kv)
            routes = session.routes()
            with session.replay(routes), session.capture():
                kv = model(x[:, 6:7], past_key_values=prefill, use_cache=True).past_key_values
                model(x[:, 7:8], past_key_values=kv)
            assert session.routes().equal(routes)
            with pytest.raises(mr.TokenMismatchError, match="other places in their sequences"):
                with session.replay(routes):  # (its steps fed with no cache: refused all the same)
                    model(x[:, 6:7])
    session.detach()
    tried()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("given", ["its own", "another capture's replay's"])
def test_a_decode_loop_replayed_over_two_blocks_goes_on_from_the_cache_of_its_own_rows_only(given: str) -> None:
    """A ``generate()`` capture replayed in two blocks, the prompt's forward in the first and the decode steps in the
    second, given the cache the first built: its own rows' cache goes on (the recorded experts are forced), while the
    cache a replay of another capture's rows (other prompts, as long) built in the block before is refused."""
    model = mr.models.build("softmax_topk")
    x, y = (torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(s)) for s in (0, 7))
    session = mr.attach(model)
    with session.capture():
        seq = model.generate(x, max_new_tokens=3)
    routes = session.routes()
    with session.capture(), torch.no_grad():
        model(y)
    theirs = session.routes()
    _move_routers(model)
    with torch.no_grad():
        with session.replay(routes[:8] if given == "its own" else theirs):
            kv = model(seq[:, :4] if given == "its own" else y, use_cache=True).past_key_values

        def decode() -> None:
            cache = kv
            with session.replay(routes[8:]), session.capture():
                for i in range(2):
                    cache = model(seq[:, 4 + i : 5 + i], past_key_values=cache, use_cache=True).past_key_values

        if given == "its own":
            decode()
            assert session.routes().equal(routes[8:])
        else:
            with pytest.raises(mr.TokenMismatchError, match="no earlier forward of this replay"):
                decode()
    session.detach()
    tried()


@pytest.mark.reliability("silent replays")
def test_static_cache_decode_steps_replayed_without_the_cache_of_their_prompt_are_refused() -> None:
    """The capture of ``generate(cache_implementation="static")`` replayed in a decode loop of one's own that forgets
    to pass the cache on: its steps' tokens come at place 0 where they were recorded at 4 and 5. Refused, as the same
    loop over a dynamic cache's capture is. Once silent: a static cache counts its tokens on its device and
    generate() gives its decode steps a 4-d mask, so no place was recorded; the cache's count is read on the device
    (no host sync), each step's place where its 4-d mask shows no key before it left out."""
    tiny_hf = pytest.importorskip("tests.tiny_hf")
    model = tiny_hf.build("mixtral")
    x = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    session = mr.attach(model)
    with session.capture(), torch.no_grad():
        seq = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=3, pad_token_id=0, cache_implementation="static"
        )
    routes = session.routes()
    try:
        with pytest.raises(mr.TokenMismatchError, match="other places in their sequences"):
            with session.replay(routes), torch.no_grad():
                model(seq[:, :4], use_cache=True)
                for i in range(2):
                    model(seq[:, 4 + i : 5 + i], use_cache=True)
    finally:
        session.detach()
    tried()


# --- tensors whose values are not plain elements: sparse, nested, quantized ------------------------------------------


def _odd_layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t`` as tensors of no plain elements in memory: sparse (COO, and CSR where ``t`` has rows), nested (its rows,
    or ``t`` as a batch of one), quantized, on the meta device."""
    odd = {
        "sparse": t.to_sparse(),
        "nested": torch.nested.nested_tensor(list(t) if t.dim() > 1 else [t]),
        "quantized": torch.quantize_per_tensor(t.float(), 1.0, 0, torch.qint32),
        "meta": t.to("meta"),
    }
    if t.dim() == 2:
        odd["sparse csr"] = t.to_sparse_csr()
    return odd


@pytest.mark.reliability("bad inputs")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_masks_and_token_ids_of_no_plain_elements_are_refused_as_such() -> None:
    """An attention mask or token ids given as a sparse, nested, quantized or meta tensor raised torch's own error
    ("Could not run 'aten::eq.Scalar' with arguments from the 'SparseCPU' backend", "reshape is not implemented for
    sparse tensors") from ``split_generation``, ``from_verl``, ``BatchLayout.tokens``, ``from_sglang`` and
    ``load_balancing_loss``; each is now refused naming the argument and what to pass."""
    model = mr.models.build("softmax_topk")
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture():
            model(x)
        routes = session.routes()
        layer_map = mr.LayerMap.from_session(session, model.config.num_layers)
    one = routes[:8]
    verl = mr.interop.to_verl([one], layer_map, prompt_lengths=[3], progress=False)
    sglang = mr.interop.to_sglang(one, layer_map, drop_last=True)  # (its 8 tokens, the last unrouted)
    probs, experts = torch.full((8, 8), 1 / 8), one.layer(routes.names[0])
    # (each call with the plain tensor it takes, and how it is given the odd one)
    calls: dict[str, tuple[torch.Tensor, Any]] = {
        "split_generation": (
            torch.ones(2, 8, dtype=torch.long),
            lambda m: mr.split_generation(routes, attention_mask=m),
        ),
        "from_verl": (
            torch.ones(1, 8, dtype=torch.long),
            lambda m: mr.interop.from_verl(verl, m, layer_map, last_routed=True, progress=False),
        ),
        "BatchLayout.tokens": (x[0], lambda m: mr.BatchLayout.padded([8]).tokens([m])),
        "from_sglang": (x[0], lambda m: mr.interop.from_sglang(sglang, layer_map, token_ids=m)),
        "load_balancing_loss": (torch.ones(8), lambda m: mr.load_balancing_loss(probs, experts, mask=m)),
    }
    for given, call in calls.values():
        call(given)  # (the plain tensor is taken)
        for value in _odd_layouts(given).values():
            with pytest.raises(mr.MoEReplayError, match=r"meta device|sparse|nested|quantized"):
                call(value)
            tried()


class _JaggedWrapper(nn.Module):
    """A model that takes its batch as a jagged nested tensor of token ids (one sequence each, of any length) or as a
    sparse tensor, and runs the MoE model it holds on each sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mr.models.build("softmax_topk")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_nested:
            return torch.cat([self.inner(seq[None]).logits[0] for seq in ids.unbind()])
        return self.inner(ids.to_dense()).logits.flatten(0, 1)


@pytest.mark.reliability("wrappers")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", ["jagged", "strided nested", "sparse"])
def test_a_model_fed_a_nested_or_sparse_batch_captures_replays_and_refuses_another_batch(layout: str) -> None:
    """A forward fed a nested (jagged) or sparse batch of token ids, which the model runs natively, raised torch's own
    errors from the session's reading of its inputs ("'NestedIntNode' object has no attribute 'int_'", "reshape is
    not implemented for sparse tensors", "NestedTensorImpl doesn't support sizes"). Such a batch is now read as fed no
    ids at the outer call, and the model's calls inside it, fed plain ids, are its forwards: the capture is the
    native forward's, knows its tokens, replays the recorded experts after the routers moved, and refuses the
    batch with its sequences swapped; the model is left as it was."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in ((5, 8) if layout != "sparse" else (8, 8))]

    def batch(parts: list[torch.Tensor]) -> torch.Tensor:
        if layout == "sparse":
            return torch.stack(parts).to_sparse()
        return torch.nested.nested_tensor(parts, layout=torch.jagged if layout == "jagged" else torch.strided)

    model = _JaggedWrapper()
    before = snapshot(model)
    native = model(batch(seqs))
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            out = model(batch(seqs))
        routes = session.routes()
        assert torch.equal(out, native)
        assert torch.equal(routes.token_ids, torch.cat(seqs))
        _move_routers(model)
        with session.replay(routes), session.capture(), torch.no_grad():
            model(batch(seqs))
        assert session.routes().equal(routes)
        with pytest.raises(mr.TokenMismatchError):
            with session.replay(routes), torch.no_grad():
                model(batch(seqs[::-1]))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "router" not in k)
    assert all(
        "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("multiple", [np.int64(5), torch.tensor(5)], ids=["np.int64", "0-d tensor"])
def test_rollout_routes_from_generate_takes_pad_to_multiple_of_as_the_count_it_holds(multiple: object) -> None:
    """``pad_to_multiple_of=torch.tensor(5)`` (read off a config as a tensor) was checked as a count, then used as
    given: the prompt width became a tensor, compared with no row count, and the capture was refused with "holds [14]
    rows per router, but ... give ... = 14". It is now the int it holds: the same routes as ``5``."""
    pytest.importorskip("trl")  # (the integration raises its own MissingDependencyError without it)
    trl = pytest.importorskip("moe_replay.integrations.trl")
    model = mr.models.build("softmax_topk")
    x = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    x[0, :2] = 0
    with mr.attach(model) as session:
        with session.capture():
            seq = model.generate(x, max_new_tokens=3, attention_mask=(x != 0).long())
        routes = session.routes()
    prompts, completions = [x[0, 2:].tolist(), x[1].tolist()], [seq[0, 5:].tolist(), seq[1, 5:].tolist()]
    want = trl.rollout_routes_from_generate(routes, prompts, completions, pad_to_multiple_of=5)
    assert [r.num_tokens for r in want] == [6, 8]
    got = trl.rollout_routes_from_generate(routes, prompts, completions, pad_to_multiple_of=multiple)
    assert all(a.equal(b) and torch.equal(a.token_ids, b.token_ids) for a, b in zip(got, want, strict=True))
    tried()


# --- the reference models' sizes -----------------------------------------------------------------------------------


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("as_count", [np.int64, np.int32, torch.tensor], ids=["np.int64", "np.int32", "0-d tensor"])
def test_a_reference_model_built_of_sizes_and_a_seed_given_as_numpy_integers_is_the_model_of_the_ints(
    as_count: Any,
) -> None:
    """``mr.models.build(num_experts=np.int64(4))`` was refused as "num_experts must be a non-negative int, got
    np.int64(4)", and a numpy seed as "seed must be an int", where every other count of the package is taken as the
    int it holds. They are now: the same weights as the plain ints, and a config of plain ints."""
    sizes = {"num_experts": 4, "top_k": 2, "num_layers": 1, "hidden_size": 16, "expert_size": 8}
    want = mr.models.build("softmax_topk", seed=3, **sizes)
    got = mr.models.build("softmax_topk", seed=as_count(3), **{k: as_count(v) for k, v in sizes.items()})
    assert all(type(getattr(got.config, k)) is int and getattr(got.config, k) == v for k, v in sizes.items())
    assert want.state_dict().keys() == got.state_dict().keys()
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in want.state_dict().items())
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("as_array", [np.array, torch.tensor], ids=["numpy", "tensor"])
def test_a_batch_layout_of_placements_given_as_an_array_is_the_layout_of_the_triples(as_array: Any) -> None:
    """``BatchLayout(1, 4, np.array([[0, 0, 2], [0, 2, 2]]))`` (placements kept as one ``[sequences, 3]`` array) was
    refused as "placement 0 must be a (row, start, length) of ints, got array([0, 0, 2])", three ints; each row is now
    the triple it holds: the same layout, of plain ints, as the tuples give."""
    triples = ((0, 0, 2), (0, 2, 2), (1, 1, 3))
    want = mr.BatchLayout(2, 4, triples)
    got = mr.BatchLayout(2, 4, as_array([list(t) for t in triples]))
    assert got == want and all(type(v) is int for p in got.placements for v in p)
    tried()


@pytest.mark.reliability("bad inputs")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_stitch_turns_refuses_turn_token_ids_of_no_plain_elements_as_such() -> None:
    """A turn's token ids given to ``stitch_turns`` as a nested, quantized or meta tensor raised torch's own error
    ("NestedTensorImpl doesn't support sizes", "Tensor.item() cannot be called on meta tensors"); they are refused
    naming the turn, and the plain tensors stitch."""
    names = ["layers.0.gate"]
    g = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    ids = torch.randint(0, 100, (6,), generator=g)
    turns = [mr.Routes([rows[:4]], names, 8), mr.Routes([rows], names, 8)]
    stitched = mr.interop.stitch_turns(turns, token_ids=[ids[:4], ids])
    assert torch.equal(stitched.token_ids, ids)
    odd = {
        "nested": torch.nested.nested_tensor([ids[:4]]),
        "quantized": torch.quantize_per_tensor(ids[:4].float(), 1.0, 0, torch.qint32),
        "meta": ids[:4].to("meta"),
    }
    for value in odd.values():
        with pytest.raises(mr.ArgumentTypeError, match=r"stitch_turns: token_ids\[0\] is a .*(nested|quantized|meta)"):
            mr.interop.stitch_turns(turns, token_ids=[value, ids])
        tried()
