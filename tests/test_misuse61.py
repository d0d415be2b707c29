"""Wrong arguments to the public entry points: a misspelled or unknown keyword, a required argument left out, too many
given by position. Each raised Python's own ``TypeError`` ("got an unexpected keyword argument"), which says nothing
of what to do; now an :class:`~moe_replay.ArgumentTypeError` (a ``MoEReplayError`` and still a ``TypeError``) that
names the function, the argument, the closest valid name and the parameters, raised before anything runs."""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

import moe_replay as mr
from moe_replay import errors

from .conftest import assert_untouched, snapshot

#: Public modules whose functions (and constructors) are entry points, besides the package itself (which has its
#: classes' public methods checked too).
_SUBMODULES = (
    "moe_replay.distributed",
    "moe_replay.interop",
    "moe_replay.interop.layer_map",
    "moe_replay.interop.megatron",
    "moe_replay.interop.nemo_rl",
    "moe_replay.interop.sglang",
    "moe_replay.interop.turns",
    "moe_replay.interop.verl",
    "moe_replay.interop.vllm",
    "moe_replay.models",
)

#: Entry points that take ``**kwargs`` on purpose, so that no keyword is unknown to them: why, for each.
_OPEN = {
    "Session.verify": "hands its arguments on to the model's forward, whose keywords are the model's",
    "build": "takes MoEConfig fields as keywords (**overrides), checked against MoEConfig with their own error",
    "RoutingReplayMixin": "hands its other arguments on to the trainer it is mixed into, whose keywords are trl's",
    "RoutingReplayGRPOTrainer": "hands its other arguments on to trl's GRPOTrainer, whose keywords are trl's",
}


def _entry_points(module: ModuleType, methods: bool) -> Iterator[tuple[str, Callable[..., Any]]]:
    """Each public callable of ``module`` (those named in ``__all__``, no exceptions) as (shown name, callable):
    functions, constructors and, with ``methods``, public methods (class and static methods too)."""
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type):
            if issubclass(obj, BaseException) or not obj.__module__.startswith("moe_replay"):
                continue
            yield obj.__qualname__, obj
            for member, value in vars(obj).items() if methods else ():
                if member.startswith("_"):
                    continue
                if isinstance(value, (classmethod, staticmethod)) or inspect.isfunction(value):
                    yield f"{obj.__qualname__}.{member}", getattr(obj, member)
        elif inspect.isfunction(obj) and obj.__module__.startswith("moe_replay"):
            yield obj.__name__, obj


def _all_entry_points() -> list[tuple[str, Callable[..., Any]]]:
    found = {shown: fn for shown, fn in _entry_points(mr, methods=True)}
    for name in _SUBMODULES:
        found.update({shown: fn for shown, fn in _entry_points(importlib.import_module(name), methods=False)})
    try:  # (needs trl, an optional dependency)
        trl = importlib.import_module("moe_replay.integrations.trl")
    except ImportError:
        return sorted(found.items())
    found.update({shown: fn for shown, fn in _entry_points(trl, methods=False)})
    return sorted(found.items())


def _takes_any_keyword(fn: Callable[..., Any]) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _misspelled(fn: Callable[..., Any]) -> tuple[str, str | None]:
    """A keyword ``fn`` does not take, close to one it does (that one), or a made-up one (None) where it takes none
    by keyword."""
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    if not names:
        return "no_such_option", None
    longest = max(names, key=len)
    return longest + "x", longest


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize(("shown", "fn"), _all_entry_points(), ids=lambda v: v if isinstance(v, str) else "")
def test_an_unknown_keyword_is_refused_naming_the_closest_valid_one(shown: str, fn: Callable[..., Any]) -> None:
    """Once Python's own ``TypeError``: every public callable (functions, constructors, the package's classes'
    methods) refuses a misspelled keyword with an ArgumentTypeError, still a ``TypeError`` (``except TypeError``
    keeps working), naming the callable, the keyword, the name meant and the parameters."""
    if shown in _OPEN:
        assert _takes_any_keyword(fn), f"{shown} no longer takes **kwargs: drop it from _OPEN"
        pytest.skip(f"{shown} {_OPEN[shown]}")
    bad, meant = _misspelled(fn)
    with pytest.raises(TypeError) as caught:
        fn(**{bad: 1})
    error = caught.value
    assert isinstance(error, mr.MoEReplayError) and isinstance(error, mr.ArgumentTypeError), repr(error)
    message = str(error)
    assert f"{shown}() got an unexpected keyword argument {bad!r}" in message
    if meant is not None:
        assert f"did you mean {meant!r}?" in message and "Its parameters are: " in message
        assert f"call it as {shown}(" in message


@pytest.mark.reliability("clear errors")
def test_a_missing_argument_and_too_many_by_position_are_refused() -> None:
    """A required argument left out and one too many by position, each an ArgumentTypeError that says how to call."""
    with pytest.raises(mr.ArgumentTypeError, match=r"Routes\.from_numpy\(\) missing a required argument: 'array'"):
        mr.Routes.from_numpy()
    with pytest.raises(mr.ArgumentTypeError, match=r"compare\(\) takes at most 2 positional arguments, got 3\. "):
        mr.compare(1, 2, 3)
    with pytest.raises(mr.ArgumentTypeError, match=r"stitch_turns\(\) takes at most 1 positional argument, got 2"):
        mr.interop.stitch_turns([], None)
    # a keyword the function takes by position only, or a value given twice, says what Python would have said
    with pytest.raises(mr.ArgumentTypeError, match=r"compare\(\) multiple values for argument 'a'.*call it as"):
        mr.compare(1, a=2)


@pytest.mark.reliability("the model is left as it was")
def test_attach_refusing_an_unknown_keyword_leaves_the_model_as_it_was() -> None:
    """``mr.attach(model, inclde=...)`` is refused before anything is done: no hook, no forward, no parameter
    changed, and no session holds the model (attaching again works)."""
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    with pytest.raises(mr.ArgumentTypeError, match=r"'inclde' \(did you mean 'include'\?\)"):
        mr.attach(model, inclde=["blocks.0"])
    assert_untouched(model, before)
    with mr.attach(model) as session, session.capture():
        model(torch.randint(0, model.config.vocab_size, (1, 4)))
    assert session.routes().num_tokens == 4
    assert_untouched(model, before)


def test_the_checked_entry_points_keep_their_signature_documentation_and_identity() -> None:
    """The check changes no signature, docstring, name, nor where ``pickle`` finds a function; a block method's own
    conversion (``session.capture``) keeps its words; a ``TypeError`` raised by a body that was called with arguments
    that bind is its own, not taken for a call that does not."""
    for shown, fn in _all_entry_points():
        if isinstance(fn, type):
            if "__init__" not in vars(fn):  # (inherited: checked where it is defined)
                continue
            checked = vars(fn)["__init__"]
            unbound = list(inspect.signature(checked.__wrapped__).parameters.values())[1:]
            assert list(inspect.signature(fn).parameters.values()) == unbound, shown
        else:
            checked = getattr(fn, "__func__", fn)
        original = checked.__wrapped__
        assert inspect.signature(checked) == inspect.signature(original), shown
        for attribute in ("__doc__", "__name__", "__qualname__", "__module__"):
            assert getattr(checked, attribute) == getattr(original, attribute), (shown, attribute)
    assert pickle.loads(pickle.dumps(mr.attach)) is mr.attach is mr.session.attach
    assert mr.interop.from_vllm is importlib.import_module("moe_replay.interop.vllm").from_vllm
    with mr.attach(mr.models.build("softmax_topk")) as session:
        with pytest.raises(mr.ArgumentTypeError, match=r"session\.capture\(\.\.\.\) was called with arguments"):
            session.capture(bogus=1)

    def body(x: int) -> int:
        raise TypeError(f"the body's own {x}")

    checked = errors._checked(body, "body")
    with pytest.raises(TypeError, match="the body's own 1") as caught:
        checked(1)
    assert not isinstance(caught.value, mr.MoEReplayError)
    with pytest.raises(mr.ArgumentTypeError, match=r"body\(\) got an unexpected keyword argument 'y'"):
        checked(y=1)
