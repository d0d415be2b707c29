"""Routes captured from a model go through every format and come back unchanged."""

from __future__ import annotations

import ast
import base64
import doctest
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop

from ..conftest import tried


def test_capture_round_trips_through_every_format() -> None:
    model = mr.models.build("grouped_sigmoid", num_layers=3, first_dense_layers=1, num_experts=16, n_group=4)
    prompt = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with mr.attach(model) as session:
        with session.capture():
            model.generate(prompt, 5, attention_mask=mask)
        seqs = mr.split_generation(session.routes(), attention_mask=mask)
        lm = mr.LayerMap.from_session(session, num_layers=model.config.num_layers)
    plen = mask.sum(dim=1).tolist()
    for s, p in zip(seqs, plen, strict=True):
        c = s.num_tokens - p
        assert interop.from_vllm(interop.to_vllm(s, lm), lm, prompt_len=p, completion_len=c).equal(s)
        turn = interop.to_vllm(s, lm, prompt_start=p - 1)
        later = mr.Routes([x.index_fill(0, torch.arange(p - 1), -1) for x in s.per_layer()], s.names, 16)
        assert interop.from_vllm(turn, lm, prompt_len=p, completion_len=c, prompt_start=p - 1).equal(later)
        assert interop.from_vllm_legacy(interop.to_vllm_legacy(s, lm), lm).equal(s)
        split = interop.to_vllm_split(s, lm, p)
        assert interop.from_vllm_split(*split, lm, completion_len=c, cached_tokens=0, axes="tokens,layers,k").equal(s)
        assert interop.from_sglang(interop.to_sglang(s, lm), lm, num_tokens=s.num_tokens).equal(s)
        assert interop.from_megatron_inference(interop.to_megatron_inference(s, lm), lm).equal(s)
        for layout in ("all", "moe"):
            assert interop.from_nemo_rl(interop.to_nemo_rl(s, lm, layout=layout), lm, num_tokens=s.num_tokens).equal(s)
    verl = interop.to_verl(seqs, lm, prompt_lengths=plen)
    verl_mask = mr.BatchLayout.split(plen, [s.num_tokens for s in seqs]).attention_mask()
    assert all(a.equal(b) for a, b in zip(interop.from_verl(verl, verl_mask, lm), seqs, strict=True))
    packed = mr.pack_routes([s[:-1] for s in seqs])  # Megatron needs a route for every token
    assert interop.from_megatron(interop.to_megatron(packed, layer_map=lm), lm.names, 16).equal(packed)


def test_every_raise_in_interop_is_a_moe_replay_error() -> None:
    """Bad input to a converter raises a MoEReplayError (a ValueError too where natural), never a bare builtin."""
    root = Path(inspect.getfile(interop)).parent
    allowed = {n for n in dir(mr) if isinstance(getattr(mr, n), type) and issubclass(getattr(mr, n), mr.MoEReplayError)}
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = call.id if isinstance(call, ast.Name) else getattr(call, "attr", None)
                if name not in allowed:
                    bad.append(f"{path.name}:{node.lineno} raises {name}")
    assert not bad, bad


@pytest.mark.parametrize("name", ["layer_map", "vllm", "sglang", "megatron", "verl", "turns", "nemo_rl"])
def test_module_examples_run(name: str) -> None:
    """The examples in each engine module's docstrings run (tests/test_docs.py covers the package's own)."""
    module = importlib.import_module(f"moe_replay.interop.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("reader", ["sglang", "vllm", "megatron"])
def test_a_negative_expert_in_engine_data_is_refused(reader: str) -> None:
    """Engines fill their buffers with zeros: a -1 is padding or damage from elsewhere, never a route to skip."""
    lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate"], num_layers=2, num_experts=4, top_k=2)
    arr = np.zeros((3, 2, 2), np.int32)
    arr[:, 1] = [[0, 3], [-1, -1], [1, 2]]
    with pytest.raises(mr.RoutesValidationError, match="token 1 holds a negative expert"):
        if reader == "sglang":
            interop.from_sglang({"routed_experts": base64.b64encode(arr.tobytes()).decode()}, lm, num_tokens=4)
        elif reader == "vllm":
            interop.from_vllm(arr, lm, prompt_len=2, completion_len=2)
        else:
            interop.from_megatron_inference(arr[:, 1:], lm, num_tokens=4)


_NM = ["model.layers.0.mlp.gate"]
_ONE = np.zeros((1, 1, 2), np.int32) + np.array([0, 1], np.int32)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: mr.LayerMap.from_names(_NM, 2, None, 2), id="num_experts=None"),
        pytest.param(
            lambda: interop.from_vllm(
                _ONE.astype(np.uint8),
                mr.LayerMap.from_names(_NM, 1, 4, 2),
                prompt_len=1,
                completion_len=1,
                version=("a", "b"),
            ),
            id="version of strings",
        ),
        pytest.param(
            lambda: interop.from_sglang(
                base64.b64encode(_ONE.tobytes()).decode(), mr.LayerMap.from_names(_NM, 1, 4, 2), num_tokens=2.5
            ),
            id="num_tokens=2.5",
        ),
        pytest.param(
            lambda: interop.from_vllm_legacy(_ONE, mr.LayerMap.from_names(_NM, 1, 4, 2), num_tokens="2"),
            id="num_tokens='2'",
        ),
        pytest.param(
            lambda: interop.to_megatron(
                mr.Routes([torch.tensor([[0, 1], [-1, -1]])], names=_NM, num_experts=4), fill=0.5
            ),
            id="fill=0.5",
        ),
        pytest.param(  # cut to 1, the rows would not be reordered at all
            lambda: interop.to_megatron(
                mr.Routes([torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])], names=_NM, num_experts=4), batch_size=1.5
            ),
            id="to_megatron batch_size=1.5",
        ),
        pytest.param(  # cut to 2, the rows would be reordered as two sequences
            lambda: interop.from_megatron([torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])], _NM, 4, batch_size=2.5),
            id="from_megatron batch_size=2.5",
        ),
        pytest.param(
            lambda: interop.to_verl(
                [mr.Routes([torch.tensor([[0, 1], [-1, -1]])], names=_NM, num_experts=4)],
                mr.LayerMap.from_names(_NM, 1, 4, 2),
                prompt_lengths=[1],
                response_width=1.5,
            ),
            id="response_width=1.5",
        ),
    ],
)
def test_values_that_are_not_integers_are_refused_not_cut(call) -> None:
    with pytest.raises(mr.MoEReplayError):
        call()


_NOT_EXPERT_NUMBERS = {
    "bfloat16": lambda shape: torch.zeros(shape, dtype=torch.bfloat16),
    "bool": lambda shape: torch.zeros(shape, dtype=torch.bool),
    "meta": lambda shape: torch.zeros(shape, dtype=torch.int32, device="meta"),
    "uint64 all-ones": lambda shape: np.full(shape, 2**64 - 1, np.uint64),  # an int64 cast makes it -1
    "ragged": lambda shape: [[[0, 1]], [[1]]],
}
_READERS = {
    "vllm": lambda data, lm: interop.from_vllm(data, lm, prompt_len=2, completion_len=2, version="0.33"),
    "vllm_legacy": lambda data, lm: interop.from_vllm_legacy(data, lm),
    "megatron_inference": lambda data, lm: interop.from_megatron_inference(data, lm),
    "nemo_rl legacy list": lambda data, lm: interop.from_nemo_rl(data, lm),
    "megatron": lambda data, lm: interop.from_megatron([data], lm.names, 4),
    "verl": lambda data, lm: interop.from_verl(data, torch.ones(1, 3, dtype=torch.long), lm),
    "Routes.from_numpy": lambda data, lm: mr.Routes.from_numpy(data, names=lm.names, num_experts=4),
}
_SHAPES = {"megatron": (3, 2), "verl": (1, 3, 1, 2)}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("reader", list(_READERS))
@pytest.mark.parametrize("kind", list(_NOT_EXPERT_NUMBERS))
def test_data_that_holds_no_expert_numbers_is_refused(reader: str, kind: str) -> None:
    """Engine data of floats, bools, meta tensors, uint64 past int64 or ragged lists is refused by every reader.

    A RoutesValidationError names it; never a raw torch or numpy error, and never a cast (uint64
    all-ones read as int64 is -1, which verl's reader took for "route natively").
    """
    lm = mr.LayerMap.from_names(_NM, 1, 4, 2)
    data = _NOT_EXPERT_NUMBERS[kind](_SHAPES.get(reader, (3, 1, 2)))
    with pytest.raises(mr.RoutesValidationError, match="must hold integers|holds no values|past int64|rectangular"):
        _READERS[reader](data, lm)


#: Values of the wrong kind for any argument: none a converter can read.
_WRONG = [None, "x", 2.5, -1, True, [], [1, 2], np.array(3), torch.tensor(3), object(), {"a": 1}, (1,), 10**30]


def _converter_calls() -> dict[str, tuple[object, dict[str, object]]]:
    """Each public converter with arguments it reads without error, by name."""
    lm = mr.LayerMap.from_names(["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"], 3, 8, 2)
    rows = [torch.tensor([[0, 1], [2, 3], [-1, -1]])] * 2
    r = mr.Routes(rows, names=lm.names, num_experts=8)
    full = mr.Routes([torch.tensor([[0, 1], [2, 3], [4, 5]])] * 2, names=lm.names, num_experts=8)
    split = interop.to_vllm_split(r, lm, 2)
    return {
        "from_vllm": (
            interop.from_vllm,
            {"routed_experts": interop.to_vllm(r, lm), "layer_map": lm, "prompt_len": 2, "completion_len": 1},
        ),
        "to_vllm": (interop.to_vllm, {"routes": r, "layer_map": lm}),
        "from_vllm_legacy": (
            interop.from_vllm_legacy,
            {"routed_experts": interop.to_vllm_legacy(r, lm), "layer_map": lm},
        ),
        "to_vllm_legacy": (interop.to_vllm_legacy, {"routes": r, "layer_map": lm}),
        "from_vllm_split": (
            interop.from_vllm_split,
            {
                "prompt_routed_experts": split[0],
                "routed_experts": split[1],
                "layer_map": lm,
                "completion_len": 1,
                "axes": "tokens,layers,k",
            },
        ),
        "to_vllm_split": (interop.to_vllm_split, {"routes": r, "layer_map": lm, "prompt_len": 2}),
        "from_sglang": (interop.from_sglang, {"response": interop.to_sglang(r, lm), "layer_map": lm}),
        "to_sglang": (interop.to_sglang, {"routes": r, "layer_map": lm}),
        "to_megatron": (interop.to_megatron, {"routes": full, "layer_map": lm}),
        "from_megatron": (
            interop.from_megatron,
            {"tensors": interop.to_megatron(full), "names": full.names, "num_experts": 8},
        ),
        "from_megatron_inference": (
            interop.from_megatron_inference,
            {"routing_indices": interop.to_megatron_inference(r, lm), "layer_map": lm, "axes": "tokens,layers,k"},
        ),
        "to_megatron_inference": (interop.to_megatron_inference, {"routes": r, "layer_map": lm}),
        "from_nemo_rl": (interop.from_nemo_rl, {"payload": interop.to_nemo_rl(r, lm), "layer_map": lm}),
        "to_nemo_rl": (interop.to_nemo_rl, {"routes": r, "layer_map": lm}),
        "to_verl": (interop.to_verl, {"sequences": [r], "layer_map": lm, "prompt_lengths": [2]}),
        "from_verl": (
            interop.from_verl,
            {
                "routed_experts": interop.to_verl([r], lm, prompt_lengths=[2]),
                "attention_mask": torch.ones(1, 3),
                "layer_map": lm,
            },
        ),
        "stitch_turns": (interop.stitch_turns, {"turns": [r, r], "token_ids": [[1, 2, 3], [1, 2, 3]]}),
        "LayerMap.from_names": (
            mr.LayerMap.from_names,
            {"names": lm.names, "num_layers": 3, "num_experts": 8, "top_k": 2},
        ),
        "LayerMap.from_routes": (mr.LayerMap.from_routes, {"routes": r, "num_layers": 3}),
        "vllm_dtype": (interop.vllm_dtype, {"num_experts": 8}),
        "nemo_rl_dtype": (interop.nemo_rl_dtype, {"num_experts": 8}),
    }


@pytest.mark.reliability("bad inputs")
def test_an_argument_of_the_wrong_kind_is_a_moe_replay_error() -> None:
    """Every converter given a value of the wrong kind for any one argument (a LayerMap that is a string, names
    that are a number or a 0-d array, a count past int64, a pattern that is no regex) raises a MoEReplayError,
    never a bare TypeError, AttributeError or StopIteration from inside."""
    for name, (fn, good) in _converter_calls().items():
        fn(**good)  # the arguments are right as given
        params = inspect.signature(fn).parameters.values()
        for param in [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]:
            for value in _WRONG:
                try:
                    fn(**{**good, param.name: value})
                except mr.MoEReplayError:
                    pass
                except Exception as e:
                    pytest.fail(f"{name}({param.name}={value!r:.30}) raised {type(e).__name__}: {e}")
                tried()


_WRITERS = {
    "to_vllm": lambda r, lm: interop.to_vllm(r, lm),
    "to_vllm_legacy": lambda r, lm: interop.to_vllm_legacy(r, lm),
    "to_vllm_split": lambda r, lm: interop.to_vllm_split(r, lm, 1),
    "to_sglang": lambda r, lm: interop.to_sglang(r, lm),
    "to_megatron": lambda r, lm: interop.to_megatron(r[:-1]),
    "to_megatron with a map": lambda r, lm: interop.to_megatron(r[:-1], layer_map=lm),
    "to_megatron_inference": lambda r, lm: interop.to_megatron_inference(r, lm),
    "to_verl": lambda r, lm: interop.to_verl([r], lm, prompt_lengths=[1]),
    "to_nemo_rl": lambda r, lm: interop.to_nemo_rl(r, lm),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("writer", list(_WRITERS))
@pytest.mark.parametrize("row", [[3, -1], [1, 1]], ids=["mixed -1", "repeated expert"])
def test_writers_check_rows_that_validate_false_left_unchecked(writer: str, row: list[int]) -> None:
    """Routes(validate=False) leave the per-row checks to the replay; an engine format would carry such a row on
    (uint8 writes -1 as 255, an expert; Megatron collapses a repeated one), so every writer checks it first."""
    rows = torch.tensor([[0, 2], row, [-1, -1]])
    lm = mr.LayerMap.from_names(_NM, 1, 256, 2)
    unchecked = mr.Routes([rows], names=_NM, num_experts=256, validate=False)
    with pytest.raises(mr.RoutesValidationError, match="token 1: row .* (mixes -1|repeats an expert)"):
        _WRITERS[writer](unchecked, lm)
    fine = mr.Routes([torch.tensor([[0, 2], [1, 3], [-1, -1]])], names=_NM, num_experts=256, validate=False)
    _WRITERS[writer](fine, lm)


@pytest.mark.reliability("silent replays")
def test_formats_write_the_rows_of_routers_that_see_the_tokens_sequence_first_in_the_order_of_their_tokens() -> None:
    """Once silent: the engine writers wrote a capture's rows in the order its routers saw them, and engine formats
    keep no token ids that would show it: rows of routers that see a [batch, positions] forward sequence-first went
    out position by position. They now go out in the order of their tokens, as the captures of each sequence alone
    give them; Megatron's [S, B] order is written from them with batch_size=, and refused without."""
    from tests.test_batch import _sequence_first_captures

    captured, alone, _ = _sequence_first_captures([4, 4])
    lm = mr.LayerMap.from_routes(captured, num_layers=2, layers=[0, 1])
    want = mr.Routes.cat(alone)  # (the tokens of the batch, sequence by sequence)
    for writer in (interop.to_vllm, interop.to_vllm_legacy, interop.to_sglang, interop.to_megatron_inference):
        assert np.array_equal(writer(captured, lm, drop_last=True), writer(want, lm, drop_last=True)), writer
    for layout in ("all", "moe"):
        assert interop.to_nemo_rl(captured, lm, layout=layout, drop_last=True) == interop.to_nemo_rl(
            want, lm, layout=layout, drop_last=True
        )
    assert torch.equal(
        interop.to_verl([captured], lm, prompt_lengths=[3]), interop.to_verl([want], lm, prompt_lengths=[3])
    )
    stitched = interop.stitch_turns([captured])
    assert stitched.equal(want)
    megatron = interop.to_megatron(captured, layer_map=lm, batch_size=2)
    assert all(torch.equal(m, r.long()) for m, r in zip(megatron, captured.per_layer(), strict=True))  # [S, B]
    with pytest.raises(mr.RoutesValidationError, match="sequence-first.*batch_size="):
        interop.to_megatron(captured, layer_map=lm)
    tried(9)
