"""Misuse of the public API that tests/test_misuse.py, test_misuse2.py and test_misuse3.py do not try: dtypes
spelt as numpy spells them, token ids no sequence can hold, counts given as numpy integers or 0-d tensors to the
functions that did not take them yet, and the public objects shown or copied in every state.

Each bad input must end in a ``MoEReplayError`` naming what is wrong (and what to pass), with the model left as
it was; each good one in the answer of its plain spelling, never a refusal.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import interop as io_
from moe_replay.__main__ import main

from .conftest import assert_untouched, snapshot, tried


def _seq(t: int, layers: int = 2, k: int = 2, e: int = 8, seed: int = 0) -> mr.Routes:
    """An engine's sequence of ``t`` tokens: distinct experts per row, the last token unrouted."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) for _ in range(layers)]
    for r in rows:
        r[-1] = -1
    return mr.Routes(rows, names=[f"model.layers.{i + 1}.mlp.gate" for i in range(layers)], num_experts=e)


_E = _seq(5)
_LM = mr.LayerMap.from_names(list(_E.names), 3, 8, 2)  # hidden layer 0 dense


# --- to_nemo_rl's dtype: taken as numpy spells it, as Routes.to_numpy takes one ---------------------------------


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize(
    "spelt",
    [np.int16, np.dtype("int16"), np.dtype(">i2"), "i2", "<i2", np.short],
    ids=["np.int16", "np.dtype", "big-endian", "'i2'", "'<i2'", "np.short"],
)
def test_to_nemo_rl_takes_a_dtype_as_numpy_spells_it_and_writes_the_envelope_of_its_name(spelt: object) -> None:
    """``to_nemo_rl(dtype=np.int16)`` (and any spelling numpy reads as int16, a big-endian one too) writes exactly the
    envelope ``dtype="int16"`` writes, little-endian as the format is, and reads back to the same routes."""
    want = io_.to_nemo_rl(_E, _LM, dtype="int16")
    got = io_.to_nemo_rl(_E, _LM, dtype=spelt)
    assert got == want and got.startswith("nrlre1:int16:")
    back = io_.from_nemo_rl(got, _LM, missing="native")
    assert back.equal(io_.from_nemo_rl(io_.to_nemo_rl(_E, _LM), _LM, missing="native"))


_NEMO_DTYPES: dict[str, tuple[object, type[mr.MoEReplayError]]] = {
    "torch.int16": (torch.int16, mr.ArgumentTypeError),
    "np.int64": (np.int64, mr.RoutesValidationError),
    "np.uint8": (np.uint8, mr.RoutesValidationError),
    "'uint16'": ("uint16", mr.RoutesValidationError),
    "np.float32": (np.float32, mr.RoutesValidationError),
    "bool": (bool, mr.RoutesValidationError),
    "True": (True, mr.ArgumentTypeError),
    "''": ("", mr.ArgumentTypeError),
    "1": (1, mr.ArgumentTypeError),
    "'notadtype'": ("notadtype", mr.ArgumentTypeError),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("dtype", list(_NEMO_DTYPES))
def test_to_nemo_rl_refuses_a_dtype_it_does_not_carry_and_says_what_to_pass(dtype: str) -> None:
    """A dtype NeMo-RL does not carry, a torch dtype or no dtype at all is refused with a message that names the
    three it carries, never written under another name."""
    value, error = _NEMO_DTYPES[dtype]
    with pytest.raises(error, match="'int16'"):
        io_.to_nemo_rl(_E, _LM, dtype=value)


# --- generation_lengths: a negative eos id matches no token ------------------------------------------------------

_OUT = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 8, 9, 4]])  # prompt of 2, then 3 new tokens; the first stops at 2


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    "eos",
    [-1, [-1, 2], np.int64(-1), torch.tensor([-1]), torch.tensor(-100)],
    ids=["-1", "[-1, 2]", "np -1", "tensor [-1]", "0-d -100"],
)
def test_a_negative_eos_token_id_is_refused_never_read_as_no_sequence_stopping(eos: object) -> None:
    """``generation_lengths(eos_token_id=-1)`` matched no token, so every sequence read as running all its steps
    (here the first stopped at its eos after 2): the split then gave the tokens after an eos routes of their own.
    A negative id is refused, by ``split_generation`` too, with what to pass instead."""
    with pytest.raises(mr.InvalidArgumentError, match="eos_token_id must be token ids >= 0"):
        mr.generation_lengths(_OUT, 2, eos)
    routes = _seq(8, seed=3)  # the row count of one generate() over B=2, P=2, N=3: 2 * 2 + 2 * 2
    with pytest.raises(mr.InvalidArgumentError, match="eos_token_id must be token ids >= 0"):
        mr.split_generation(routes, batch_size=2, prompt_len=2, sequences=_OUT, eos_token_id=eos)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "prompt_len", [np.int64(2), np.int32(2), torch.tensor(2)], ids=["np.int64", "np.int32", "0-d tensor"]
)
def test_generation_lengths_takes_a_prompt_len_given_as_a_numpy_integer_or_a_0_d_tensor(prompt_len: object) -> None:
    """``prompt_len`` given as ``generation_capacity`` and ``split_generation`` take it (``input_ids.shape[1]`` kept as
    a numpy integer or a 0-d tensor) gives what the plain int gives, never a refusal."""
    want = mr.generation_lengths(_OUT, 2, 2)
    assert want.tolist() == [2, 3]
    assert torch.equal(mr.generation_lengths(_OUT, prompt_len, 2), want)  # type: ignore[arg-type]


# --- attach / find_routers: top_k and num_experts as numpy integers or 0-d tensors ------------------------------


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "as_count",
    [np.int64, np.int32, torch.tensor],
    ids=["np.int64", "np.int32", "0-d tensor"],
)
def test_top_k_and_num_experts_given_as_numpy_integers_or_0_d_tensors_are_the_counts_they_hold(
    as_count: Callable[[int], object],
) -> None:
    """``attach(top_k=torch.tensor(2))`` was refused as "not a positive int" while ``capacity=torch.tensor(...)`` was
    taken; now each is the count it holds: the same sites (plain ints on them) and the same capture."""
    model, x = mr.models.build("softmax_topk", num_layers=2), torch.randint(0, 128, (2, 5))
    before = snapshot(model)
    plain = [(s.name, s.top_k, s.num_experts) for s in mr.find_routers(model, top_k=2, num_experts=8)]
    sites = mr.find_routers(model, top_k=as_count(2), num_experts=as_count(8))  # type: ignore[arg-type]
    assert [(s.name, s.top_k, s.num_experts) for s in sites] == plain
    assert all(type(s.top_k) is int and type(s.num_experts) is int for s in sites)
    routes = []
    for k, e in ((2, 8), (as_count(2), as_count(8))):
        with mr.attach(model, top_k=k, num_experts=e) as session:  # type: ignore[arg-type]
            with session.capture():
                model(x)
            routes.append(session.routes())
    assert routes[0].equal(routes[1])
    assert_untouched(model, before)
    for bad in (as_count(0), as_count(-2)):
        with pytest.raises(mr.InvalidArgumentError, match="top_k must be a positive int"):
            mr.attach(model, top_k=bad)  # type: ignore[arg-type]
        assert_untouched(model, before)
    tried(3)


# --- split_generation: lengths and eos_token_id that disagree -----------------------------------------------------


def _rollout() -> tuple[mr.Routes, torch.Tensor, torch.Tensor]:
    """One ``generate()`` of 3 new tokens over 2 prompts of 4 (the first left-padded), its capture and output."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2)
    prompt, mask = torch.randint(1, 128, (2, 4)), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with mr.attach(model) as session:
        with session.capture():
            seqs = model.generate(prompt, max_new_tokens=3, attention_mask=mask)
        return session.routes(), mask, seqs


@pytest.mark.reliability("silent replays")
def test_lengths_and_an_eos_token_id_that_disagree_are_refused_never_one_of_them_ignored() -> None:
    """``split_generation(lengths=..., eos_token_id=..., sequences=...)``: both say where each sequence stopped. Where
    they disagree (the first sequence's second new token is the eos) the lengths were taken and the eos ignored, so
    the tokens after the eos kept routes as real tokens; now refused. Where they agree, the split is either one's."""
    routes, mask, seqs = _rollout()
    eos = int(seqs[0, 5])  # (the first sequence's second new token; the second sequence holds no such token)
    assert eos not in seqs[1, 4:].tolist()
    by_eos = mr.split_generation(routes, attention_mask=mask, sequences=seqs, eos_token_id=eos)
    assert [p.num_tokens for p in by_eos] == [5, 7]
    with pytest.raises(mr.InvalidArgumentError, match="disagree"):
        mr.split_generation(routes, attention_mask=mask, sequences=seqs, lengths=[3, 3], eos_token_id=eos)
    both = mr.split_generation(routes, attention_mask=mask, sequences=seqs, lengths=[2, 3], eos_token_id=eos)
    assert len(both) == 2 and all(a.equal(b) for a, b in zip(both, by_eos, strict=True))
    with pytest.raises(mr.InvalidArgumentError, match="eos_token_id needs sequences"):  # (nothing to check it on)
        mr.split_generation(routes, attention_mask=mask, lengths=[3, 3], eos_token_id=eos)


# --- interop offsets: a 0-d tensor is the offset it holds -----------------------------------------------------------

_OFFSETS: dict[str, Callable[[object], object]] = {
    "to_vllm prompt_start": lambda v: io_.to_vllm(_E, _LM, prompt_start=v),  # type: ignore[arg-type]
    "to_vllm_split prompt_len": lambda v: io_.to_vllm_split(_E, _LM, v),  # type: ignore[arg-type]
    "to_sglang start_len": lambda v: io_.to_sglang(_E, _LM, start_len=v),  # type: ignore[arg-type]
    "from_vllm prompt_len": lambda v: io_.from_vllm(
        io_.to_vllm(_E, _LM),
        _LM,
        prompt_len=v,
        completion_len=5 - int(v),  # type: ignore[arg-type, call-overload]
    ),
}


def _same(a: object, b: object) -> bool:
    if isinstance(a, mr.Routes):
        return isinstance(b, mr.Routes) and a.equal(b)
    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("call", list(_OFFSETS))
@pytest.mark.parametrize("as_count", [np.int64, torch.tensor], ids=["np.int64", "0-d tensor"])
def test_an_engine_offset_given_as_a_numpy_integer_or_a_0_d_tensor_is_the_offset_it_holds(
    call: str, as_count: Callable[[int], object]
) -> None:
    """``prompt_start``/``start_len``/``prompt_len`` given as a numpy integer or a 0-d tensor (``mask.sum()``) give what
    the plain int gives: a 0-d tensor was refused as "not an integer" while ``to_verl`` took one for its widths."""
    assert _same(_OFFSETS[call](as_count(1)), _OFFSETS[call](1))
    with pytest.raises(mr.RoutesValidationError, match="must be an integer >= 0"):
        _OFFSETS[call](as_count(-1))


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("position", [torch.tensor(-1)], ids=["0-d -1"])
def test_a_comparisons_plot_takes_a_router_position_given_as_a_0_d_tensor(position: object) -> None:
    """``plot(router=torch.tensor(1))`` (an argmax over ``per_layer``, say) draws that router's load, as
    ``router=1`` does; it was refused as "no position" while a numpy integer was taken."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    a, b = _seq(4, layers=3, seed=1), _seq(4, layers=3, seed=2)
    cmp = mr.compare(a, b)
    want = cmp.plot(router=int(position))  # type: ignore[call-overload]
    got = cmp.plot(router=position)  # type: ignore[arg-type]
    try:
        assert got.axes[1].get_title() == want.axes[1].get_title() == f"expert load, {a.names[int(position)]}"  # type: ignore[call-overload]
    finally:
        plt.close(want)
        plt.close(got)
    with pytest.raises(mr.InvalidArgumentError, match="out of range"):
        cmp.plot(router=torch.tensor(3))  # type: ignore[arg-type]


# --- RouterScores copied or pickled ---------------------------------------------------------------------------------


def _kept(grad: bool) -> tuple[mr.RouterScores, torch.nn.Module]:
    """Scores kept over two forwards of other batch sizes, with or without their autograd graph, and the model."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=2)
    x = torch.randint(0, 128, (2, 6))
    with mr.attach(model) as session, torch.set_grad_enabled(grad), session.keep_scores() as kept:
        model(x)
        model(x[:1, :4])
    return kept, model


_COPIES: dict[str, Callable[[mr.RouterScores], mr.RouterScores]] = {
    "pickle": lambda k: pickle.loads(pickle.dumps(k)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.reliability("round trips")
@pytest.mark.parametrize("how", list(_COPIES))
def test_router_scores_kept_without_a_graph_copy_and_pickle_whole(how: str) -> None:
    """``pickle``/``copy.deepcopy`` of scores kept under ``no_grad`` failed with an ``AttributeError`` from inside the
    package (the items came back before the state noting their forwards); the copy now holds the same scores,
    experts and forwards, so that the loss and each row's mask weight are the original's."""
    kept, _ = _kept(grad=False)
    got = _COPIES[how](kept)
    assert list(got) == list(kept)
    for name in kept:
        assert all(torch.equal(a, b) for a, b in zip(got[name], kept[name], strict=True))
    masks = [torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), torch.tensor([[1, 1, 0, 0]])]
    for a, b in zip(got.row_mask(masks), kept.row_mask(masks), strict=True):
        assert torch.equal(a, b)
    want = mr.load_balancing_loss(kept.scores, kept.indices, mask=masks)
    assert torch.equal(mr.load_balancing_loss(got.scores, got.indices, mask=masks), want)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", list(_COPIES))
def test_router_scores_with_their_graph_are_refused_a_copy_that_would_cut_them_from_it(how: str) -> None:
    """A pickle of scores kept with gradients gave leaf tensors that still required grad: an auxiliary loss on them
    ran backward with no error and no gradient to any router. A deep copy raised torch's own error. Both are refused
    with what to copy instead; a shallow copy shares the scores and their graph, and still gives router gradients."""
    kept, model = _kept(grad=True)
    with pytest.raises(mr.InvalidArgumentError, match=r"s\.detach\(\) for s in kept\.scores"):
        _COPIES[how](kept)
    shallow = copy.copy(kept)
    mr.load_balancing_loss(shallow.scores, shallow.indices).backward()
    routers = [m for m in model.modules() if isinstance(m, mr.models.SoftmaxTopKRouter)]
    assert len(routers) == 2
    assert all(r.weight.grad is not None and bool(r.weight.grad.abs().sum() > 0) for r in routers)


# --- every router style: the model cast, frozen or reloaded between capture and replay ------------------------------

_BETWEEN: dict[str, Callable[[torch.nn.Module, str], object]] = {
    "half()": lambda m, style: m.half(),
    "requires_grad_(False).eval()": lambda m, style: m.requires_grad_(False).eval(),
    "load_state_dict of other weights": lambda m, style: m.load_state_dict(
        mr.models.build(style, num_layers=2, seed=9).state_dict()
    ),
}


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("change", list(_BETWEEN))
@pytest.mark.parametrize("style", mr.models.STYLES)
def test_every_router_style_cast_frozen_or_reloaded_after_capture_replays_the_recorded_experts(
    style: str, change: str
) -> None:
    """Between capture and replay the routers are perturbed and the model cast, frozen or given other weights (the
    earlier files try this on one router style): every style's replay forces exactly the recorded experts, where a
    free forward of the changed model chooses others, and detach leaves no hook."""
    torch.manual_seed(0)
    model, x = mr.models.build(style, num_layers=2), torch.randint(0, 128, (2, 6))
    session = mr.attach(model)
    with session.capture():
        model(x)
    recorded = session.routes()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in session.sites:
            w = site.module.weight
            w.add_(3 * w.std() * torch.randn(w.shape, generator=g))
    _BETWEEN[change](model, style)
    with session.replay(recorded), session.capture():
        model(x)
    assert session.routes().equal(recorded)
    with session.capture():
        model(x)
    assert not session.routes().equal(recorded)  # (the change and the perturbation move the routing: not a no-op)
    before = snapshot(model)
    session.detach()
    assert_untouched(model, before)


# --- the command line -------------------------------------------------------------------------------------------


@pytest.mark.reliability("bad inputs")
def test_inspect_of_a_reference_model_of_too_many_layers_names_the_option_that_asked_for_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``inspect softmax_topk --layers 100000`` was refused with the config's advice ("use smaller sizes (num_layers,
    --num-experts, ...)"), which named an option that does not size the model and not the one given; now it names
    ``--layers``, and nothing is built."""
    assert main(["inspect", "softmax_topk", "--layers", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--layers 100000" in err and "fewer --layers" in err
    assert "--num-experts" not in err and "num_layers" not in err
