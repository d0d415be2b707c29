"""One error family: everything moe_replay raises for bad input is a ``MoEReplayError``."""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr
from moe_replay import errors

from .conftest import tried

PACKAGE = Path(mr.__file__).resolve().parent

#: Modules allowed to raise builtin errors for bad input: none.
ALLOWED_MODULES: set[str] = set()
#: Builtin exceptions that are not errors about the caller's input (internal invariants).
NOT_INPUT_ERRORS = {"AssertionError", "NotImplementedError", "StopIteration", "KeyboardInterrupt"}


def _builtin_raises(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """``file:line name`` for each ``raise`` of a builtin exception class in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        name = exc.id if isinstance(exc, ast.Name) else None
        cls = getattr(builtins, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, BaseException) and name not in NOT_INPUT_ERRORS:
            found.append(f"{path.relative_to(root)}:{node.lineno} raise {name}")
    return found


def _sources() -> list[Path]:
    return [
        p for p in sorted(PACKAGE.rglob("*.py")) if not ({p.name, *p.relative_to(PACKAGE).parts[:1]} & ALLOWED_MODULES)
    ]


@pytest.mark.reliability("bad inputs")
def test_no_builtin_exception_is_raised_for_bad_input() -> None:
    """Every raise in moe_replay (an AST scan of every module) is a MoEReplayError subclass."""
    sources = _sources()
    assert len(sources) > 10 and any(p.name == "session.py" for p in sources)
    found = [hit for p in sources for hit in _builtin_raises(p)]
    assert not found, "raise a MoEReplayError subclass (with the builtin as a second base) instead:\n" + "\n".join(
        found
    )
    tried(len(sources))


def test_the_scan_finds_builtin_raises(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        "def f(x):\n"
        "    if x == 1:\n        raise ValueError('bad')\n"
        "    if x == 2:\n        raise KeyError\n"
        "    if x == 3:\n        raise AssertionError('invariant')\n"
        "    raise mr.InvalidArgumentError('ok')\n"
    )
    assert _builtin_raises(src, tmp_path) == ["probe.py:3 raise ValueError", "probe.py:5 raise KeyError"]


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_in_the_family_and_exported(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, mr.MoEReplayError)
    assert getattr(mr, name) is cls and name in mr.__all__
    assert cls.__doc__


@pytest.mark.reliability("bad inputs")
def test_bad_input_errors_keep_their_builtin_type() -> None:
    """Bad input across modules raises a MoEReplayError that is also the ValueError/TypeError/KeyError it was."""
    routes = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["a"], num_experts=4)
    cases = [
        (lambda: mr.split_generation(routes), ValueError),
        (lambda: mr.split_generation(routes.per_layer()[0]), TypeError),
        (lambda: mr.pad_routes([]), ValueError),
        (lambda: routes.layer("b"), KeyError),
        (lambda: routes.select(["b"]), KeyError),
        (lambda: mr.Routes.cat([]), ValueError),
        (lambda: mr.compare(routes, routes.per_layer()[0]), TypeError),
        (lambda: mr.Adapter("a", match=lambda n, m: True, scope="block"), ValueError),
        (lambda: mr.find_routers(torch.nn.Linear(2, 2), include=3.5), TypeError),
        (lambda: mr.attach("model"), TypeError),
        (lambda: mr.attach(mr.models.build("softmax_topk"), capacity=0), ValueError),
        (lambda: mr.models.build("softmax_topk", expert_impl="fused"), ValueError),
        (lambda: mr.distributed.split_routes(routes, [1, 5]), ValueError),
        (lambda: mr.load_balancing_loss([], []), ValueError),
    ]
    for fn, builtin in cases:
        with pytest.raises(mr.MoEReplayError) as err:
            fn()
        assert isinstance(err.value, builtin), (err.value, builtin)
        assert str(err.value) and not str(err.value).startswith("'"), str(err.value)
    tried(len(cases))


def _routes() -> mr.Routes:
    return mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["r"], num_experts=8)


def _session() -> mr.Session:
    return mr.attach(mr.models.build("softmax_topk", num_layers=1), capacity=16)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: mr.Routes(None, names=["r"], num_experts=8), id="Routes(layers=None)"),
        pytest.param(lambda: mr.Routes([torch.zeros(2, 2, device="meta")], names=["r"], num_experts=8), id="meta"),
        pytest.param(lambda: mr.Routes([torch.zeros(2, 2).long()], names=["r"], num_experts=10**30), id="E=1e30"),
        pytest.param(lambda: _routes().rename({1: 2}), id="rename(int keys)"),
        pytest.param(lambda: _routes().select(None), id="select(None)"),
        pytest.param(lambda: _routes().to_numpy("nope"), id="to_numpy(bad dtype)"),
        pytest.param(lambda: _routes().save(None), id="save(None)"),
        pytest.param(lambda: mr.Routes.load(None), id="load(None)"),
        pytest.param(lambda: mr.attach(mr.models.build("softmax_topk", num_layers=1), capacity=2**62), id="capacity"),
        pytest.param(lambda: mr.attach(mr.models.build("softmax_topk", num_layers=1), capacity=2**70), id="2**70"),
        pytest.param(lambda: _session().reserve(2**70), id="reserve(2**70)"),
        pytest.param(lambda: _session().capture(expected_tokens=2**70).__enter__(), id="expected_tokens=2**70"),
        pytest.param(lambda: mr.find_routers(mr.models.build("softmax_topk"), include=np.array(2)), id="include=0-d"),
        pytest.param(lambda: mr.find_routers(mr.models.build("softmax_topk"), exclude=torch.tensor(2)), id="exclude"),
        pytest.param(lambda: mr.find_routers(mr.models.build("softmax_topk"), adapters=np.array(2)), id="adapters"),
        pytest.param(lambda: mr.format_sites(torch.tensor(2)), id="format_sites(0-d)"),
        pytest.param(lambda: mr.find_routers(None), id="find_routers(None)"),
        pytest.param(lambda: mr.find_routers(mr.models.build("softmax_topk"), adapters=[5]), id="adapters=[5]"),
        pytest.param(lambda: mr.format_sites([1]), id="format_sites([1])"),
        pytest.param(lambda: mr.index_dtype(None), id="index_dtype(None)"),
        pytest.param(lambda: mr.generation_lengths(torch.ones(4, dtype=torch.long), 1, 0), id="1-D sequences"),
        pytest.param(lambda: mr.generation_lengths(torch.ones(2, 4, dtype=torch.long), 9, 0), id="prompt_len>width"),
        pytest.param(lambda: mr.compare(_routes(), _routes(), labels=None), id="compare(labels=None)"),
    ],
)
def test_public_functions_given_wrong_types_or_sizes_raise_our_errors(call) -> None:
    with pytest.raises(mr.MoEReplayError):
        call()


def test_a_ring_too_large_to_allocate_leaves_the_model_as_it_was() -> None:
    model = mr.models.build("softmax_topk", num_layers=1)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(mr.CaptureOverflowError, match="cannot allocate"):
        mr.attach(model, capacity=2**62)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert all("forward" not in vars(m) for m in model.modules())
    with mr.attach(model) as session, session.capture():
        model(torch.zeros(1, 3, dtype=torch.long))


def _named_options() -> dict[str, Callable[[Any], object]]:
    """Every public option that is named by a string, as a call that takes the option's value."""
    from moe_replay import interop

    names = ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    lm = mr.LayerMap.from_names(names, num_layers=3, num_experts=8, top_k=2)
    rows = torch.tensor([[0, 1], [1, 2], [2, 3], [-1, -1]])
    r = mr.Routes([rows, rows], names, 8)
    return {
        "compare(mode=)": lambda v: mr.compare(r, r, mode=v),
        "BatchLayout.padded(side=)": lambda v: mr.BatchLayout.padded([2, 3], side=v),
        "split_generation(padding_side=)": lambda v: mr.split_generation(
            r, prompt_lengths=[2], prompt_len=2, padding_side=v
        ),
        "LayerMap.width(layout)": lambda v: lm.width(v),
        "LayerMap.column(name)": lambda v: lm.column(v, "all"),
        "LayerMap(mtp=)": lambda v: mr.LayerMap(
            names=tuple(names), layers=(1, 2), num_layers=3, num_experts=(8, 8), top_k=(2, 2), mtp=v
        ),
        "to_verl(layout=)": lambda v: interop.to_verl([r], lm, prompt_lengths=[2], layout=v),
        "to_nemo_rl(layout=)": lambda v: interop.to_nemo_rl(r, lm, layout=v),
        "from_nemo_rl(missing=)": lambda v: interop.from_nemo_rl(interop.to_nemo_rl(r, lm), lm, missing=v),
        "from_megatron(missing=)": lambda v: interop.from_megatron(interop.to_megatron(r, fill=0), names, 8, missing=v),
        "stitch_turns(overlap=)": lambda v: interop.stitch_turns([r], overlap=v),
        "stitch_turns(gaps=)": lambda v: interop.stitch_turns([r], gaps=v),
        "Adapter(scope=)": lambda v: mr.Adapter(name="a", match=lambda n, m: False, scope=v),
        "Adapter(decision=)": lambda v: mr.Adapter(name="a", match=lambda n, m: False, decision=v),
        "models.build(style)": lambda v: mr.models.build(v),
        "models.build(expert_impl=)": lambda v: mr.models.build("softmax_topk", expert_impl=v),
        "models.build(checkpointing=)": lambda v: mr.models.build("softmax_topk", checkpointing=v),
        "Routes.select(names)": lambda v: r.select([names[0], v]),
    }


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("option", sorted(_named_options()))
def test_an_option_named_by_a_string_given_an_array_or_a_tensor_is_refused_as_such(option: str) -> None:
    """Once bare errors: ``option not in ("a", "b")`` compares a numpy array element by element, and its truth
    value raised numpy's ValueError ("ambiguous"); an unhashable value given to a set or a tuple's ``index``
    raised TypeError or ValueError. Each option is a string: anything else is refused with a MoEReplayError
    naming the option, and an array holding the right string is no exception."""
    call = _named_options()[option]
    for value in (np.array(["left", "right"]), np.array(["all"]), torch.tensor([1, 2]), ["all"], {"x": 1}, None):
        with pytest.raises(mr.MoEReplayError):
            call(value)
        tried()
