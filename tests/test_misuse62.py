"""Misuse the suite did not hold yet: an ``inspect`` option the model refuses exited 1, as a model that cannot be
loaded does, where argparse's refusal of an option exits 2; ``MoEConfig.extra``, read by no part of the model, took
any entry and ignored it; ``build(MoEConfig(...))`` named the whole config an "unknown router style"; a path given to
``replay`` was told to build routes by hand; ``verify()`` given a keyword the model does not take raises the model's
own error, which is now said and held to: the model and the session are left as they were."""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

import moe_replay as mr
from moe_replay.__main__ import main

from .conftest import assert_untouched, snapshot


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "argv",
    [
        ["--top-k", "99"],  # more than the routers' experts
        ["--num-experts", "1"],  # the expert count of no router
        ["--include", "nothing.matches"],
        ["--exclude", "layers.*"],  # takes out every router
        ["--top-k", "3", "--verify"],  # refused at the decision, by verify()
        ["--layers", "100000"],  # more parameters than a reference model may hold
    ],
)
def test_an_inspect_option_the_model_refuses_exits_2_as_an_option_argparse_refuses(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``inspect softmax_topk --top-k 99`` exited 1, the status of a model that cannot be loaded, where ``--top-k 0``
    exits 2: a script could not tell its own bad option from a broken model. Now an option refused for this model is a
    usage error, 2, naming the option; the same command without it runs (status 0)."""
    assert main(["inspect", "softmax_topk", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and argv[0] in err and "Traceback" not in err, err
    without = [a for a in ("--verify",) if a in argv]
    assert main(["inspect", "softmax_topk", *without]) == 0
    with pytest.raises(SystemExit) as refused:  # (the status argparse gives an option it refuses)
        main(["inspect", "softmax_topk", "--top-k", "0"])
    assert refused.value.code == 2


@pytest.mark.reliability("bad inputs")
def test_an_inspect_of_a_model_that_cannot_be_loaded_exits_1_whatever_options_are_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model's own failure stays status 1 with router options given: they are not what is refused."""
    for argv in ([], ["--top-k", "2"], ["--include", "layers.*.mlp.router", "--num-experts", "8"]):
        assert main(["inspect", str(tmp_path), *argv]) == 1  # a folder without config.json
        err = capsys.readouterr().err
        assert "config.json" in err and len(err.splitlines()) == 1, err
    assert main(["inspect", "softmax_topk", "--top-k", "2", "--num-experts", "8"]) == 0  # options that fit


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize(
    "extra, said",
    [
        ({"top_k": 3}, "top_k=3 as a field"),  # a field's name: set it as that field
        ({"note": "mine"}, "set the fields"),
        (["top_k", 3], "set the fields"),  # no dict at all
    ],
)
def test_an_moe_config_extra_that_no_part_of_the_model_reads_is_refused_not_ignored(extra: object, said: str) -> None:
    """``build(extra={"top_k": 3})`` built a top-2 model without a word: no part of the reference model reads
    ``MoEConfig.extra``. Entries in it are refused wherever a config is made (``build``, ``MoEConfig``,
    ``dataclasses.replace``), naming them and the field to set; an empty one is the default and is taken."""
    for make in (
        lambda: mr.models.build("softmax_topk", num_layers=1, extra=extra),
        lambda: mr.models.MoEConfig(extra=extra),  # type: ignore[arg-type]
        lambda: dataclasses.replace(mr.models.MoEConfig(), extra=extra),
    ):
        with pytest.raises(mr.InvalidArgumentError, match="no part of the reference model reads") as info:
            make()
        assert said in str(info.value) and "extra=" in str(info.value), str(info.value)
    assert mr.models.build("softmax_topk", num_layers=1, extra={}).config.extra == {}
    assert mr.models.MoEConfig().extra == {}


@pytest.mark.reliability("bad inputs")
def test_build_given_a_config_says_how_to_pass_its_fields_and_that_way_builds_it() -> None:
    """``build(MoEConfig(num_layers=3))`` said "unknown router style MoEConfig(router=..., ...)" (the whole config
    read as a style's name). It now says that build takes a style name and how to pass the config's fields; done so,
    the model built is the config's."""
    config = mr.models.MoEConfig(router="topk_softmax", num_layers=3, num_experts=4, top_k=1)
    with pytest.raises(mr.InvalidArgumentError, match="takes a router style name, got a MoEConfig") as info:
        mr.models.build(config)  # type: ignore[arg-type]
    assert "vars(config)" in str(info.value)
    built = mr.models.build(config.router, **{k: v for k, v in vars(config).items() if k != "router"})
    assert built.config == config


@pytest.mark.reliability("bad inputs")
def test_replay_given_the_path_of_a_routes_file_says_to_load_it(tmp_path: Path) -> None:
    """``session.replay("routes.npz")`` was told to "build one with mr.Routes(...)"; it now names the file and
    ``Routes.load``, and the replay the advice gives forces the recorded experts."""
    model = mr.models.build("softmax_topk", num_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with mr.attach(model) as session:
        with session.capture():
            model(ids)
        routes = session.routes()
        path = tmp_path / "routes.npz"
        routes.save(path)
        for given in (str(path), path):
            with pytest.raises(mr.RoutesValidationError, match=r"Routes\.load\(") as info:
                with session.replay(given):  # type: ignore[arg-type]
                    model(ids)
            assert str(path) in str(info.value), str(info.value)
        with session.replay(mr.Routes.load(path)):
            model(ids)
        with session.capture():
            with session.replay(mr.Routes.load(path)):
                model(ids)
        assert session.routes().equal(routes)


@pytest.mark.reliability("bad inputs")
def test_verify_given_a_keyword_the_model_does_not_take_raises_the_models_own_error_and_changes_nothing() -> None:
    """``session.verify(ids, bogus=1)``: verify's arguments are the model's, so the error is the one the model's
    forward raises (a ``TypeError`` naming the keyword), as a plain call raises it; the model keeps its hooks and
    tensors, the session stays idle, and a verify and a replay after it are exact."""
    model = mr.models.build("softmax_topk", num_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError) as plain:
        model(ids, bogus=1)
    before = snapshot(model)
    session = mr.attach(model)
    hooks = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
    with pytest.raises(TypeError) as verified:
        session.verify(ids, bogus=1)
    assert type(verified.value) is type(plain.value) and str(verified.value) == str(plain.value)
    assert [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()] == hooks
    assert session.state == "idle"
    assert sorted(session.verify(ids)) == sorted(session.names)
    with session.capture():
        model(ids)
    routes = session.routes()
    with session.capture():
        with session.replay(routes):
            model(ids)
    assert session.routes().equal(routes)
    session.detach()
    assert_untouched(model, before)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("given", [-(2**63) - 1, 2**64])
def test_a_seed_out_of_range_is_told_the_range_the_command_takes(
    given: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed`` takes -2**63 .. 2**64 - 1 (what torch's generator takes), but its refusal said "0 to 2**64 - 1",
    a range the negative seeds it takes are not in. The range said is now the one taken: both its ends run, and
    past either end is refused."""
    with pytest.raises(SystemExit) as refused:
        main(["inspect", "softmax_topk", "--seed", str(given)])
    assert refused.value.code == 2
    said = re.search(r"must fit in 64 bits \((-?\d+) to (\d+)\)", capsys.readouterr().err)
    assert said is not None
    low, high = int(said[1]), int(said[2])
    assert not low <= given <= high
    for seed in (low, high):
        assert main(["inspect", "softmax_topk", "--seed", str(seed)]) == 0
    for seed in (low - 1, high + 1):  # (the ends said are the ends taken)
        with pytest.raises(SystemExit) as refused:
            main(["inspect", "softmax_topk", "--seed", str(seed)])
        assert refused.value.code == 2
    capsys.readouterr()


@pytest.mark.reliability("bad inputs")
def test_routes_read_inside_an_open_capture_before_its_first_forward_says_the_block_is_still_open() -> None:
    """``routes()`` inside ``with session.capture():`` before any forward said "the capture recorded nothing ... Was the
    model rebuilt or reloaded after attach", advice for a block that ended empty. It now says the block is still open
    and to read after the forward; read after a forward in the block, it gives that forward's rows, and the block's
    rows once it is left, which a replay forces."""
    model = mr.models.build("softmax_topk", num_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with mr.attach(model) as session:
        with session.capture():
            with pytest.raises(mr.UnsupportedRouterError, match="still open has recorded nothing yet") as info:
                session.routes()
            assert "rebuilt" not in str(info.value)
            model(ids)
            first = session.routes()
            model(ids)
        assert first.num_tokens == ids.numel()
        routes = session.routes()
        assert routes.num_tokens == 2 * ids.numel() and routes[: ids.numel()].equal(first)
        with session.capture():
            pass
        with pytest.raises(mr.UnsupportedRouterError, match="did no forward run in the block"):
            session.routes()  # (a block left empty: the advice for one)
        with session.capture():
            with session.replay(routes):
                model(ids)
                model(ids)
        assert session.routes().equal(routes)


@pytest.mark.reliability("bad inputs")
def test_cat_of_routes_of_another_k_or_other_routers_says_what_to_do_and_joins_the_parts_that_fit() -> None:
    """``Routes.cat`` of routes recorded with another k said only "part 1 has k (3, 3), part 0 (2, 2)", and of another
    model's routers only which routers each part holds: what was wrong, not what to do. Both now say that parts joined
    are routes of the same routers and k, and to replay the others in a block of their own; parts that fit join."""
    names = ["layers.0.mlp.router", "layers.1.mlp.router"]
    two = mr.Routes([torch.tensor([[0, 1], [2, 3]])] * 2, names, 8)
    three = mr.Routes([torch.tensor([[0, 1, 2]])] * 2, names, 8)
    other = mr.Routes([torch.tensor([[0, 1]])] * 3, [*names, "layers.2.mlp.router"], 8)
    wider = mr.Routes([torch.tensor([[0, 1]])] * 2, ["blocks.0.gate", "blocks.1.gate"], 16)
    for part, said in ((three, "part 1 has k (3, 3)"), (other, "part 1 holds routers"), (wider, "part 1 holds")):
        with pytest.raises(mr.RoutesValidationError, match="Routes.cat") as info:
            mr.Routes.cat([two, part])
        assert said in str(info.value) and "of their own" in str(info.value), str(info.value)
    joined = mr.Routes.cat([two, two[:1]])
    assert joined.num_tokens == 3 and joined[2:].equal(two[:1])


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("number", [0, -1, 1])
def test_layer_given_a_routers_number_names_the_call_that_takes_it(number: int) -> None:
    """``routes.layer(0)`` said "no router named '0' in these routes", as if a module were named "0". A number is now
    told apart from a name: the refusal gives the call with that router's name, and that call gives its rows."""
    names = ["layers.0.mlp.router", "layers.1.mlp.router"]
    rows = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])]
    routes = mr.Routes(rows, names, 8)
    with pytest.raises(mr.ArgumentTypeError, match=rf"routes\.layer\(routes\.names\[{number}\]\)") as info:
        routes.layer(number)  # type: ignore[arg-type]
    assert repr(names[number]) in str(info.value)
    assert torch.equal(routes.layer(routes.names[number]), rows[number])
    with pytest.raises(mr.ArgumentTypeError, match="routers: "):
        routes.layer(len(names))  # type: ignore[arg-type]  # (no router of that number: the names are listed)


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("value", ["2", "hide", "enabled"])
def test_a_progress_setting_of_no_known_value_is_warned_of_and_read_as_unset(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MOE_REPLAY_PROGRESS=hide`` (or ``2``) was read as unset without a word: a bar still drawn on a terminal, where
    the user asked to hide it. It is still read as unset (a progress bar changes no result), and a ``RuntimeWarning``
    names the variable, the value and the values it takes; those values, in any case, are taken without one."""
    from moe_replay import _progress

    terminal = type("Terminal", (io.StringIO,), {"isatty": lambda self: True})
    monkeypatch.delenv("MOE_REPLAY_PROGRESS", raising=False)
    unset = (_progress.wanted(terminal()), _progress.wanted(io.StringIO()))
    monkeypatch.setenv("MOE_REPLAY_PROGRESS", value)
    with pytest.warns(RuntimeWarning, match="MOE_REPLAY_PROGRESS") as caught:
        given = (_progress.wanted(terminal()), _progress.wanted(io.StringIO()))
    assert given == unset == (True, False)
    said = str(caught[0].message)
    assert repr(value) in said and "0, false, no, off" in said and "1, true, yes, on" in said, said
    for known, shown in (("ON", True), (" 0 ", False), ("No", False)):
        monkeypatch.setenv("MOE_REPLAY_PROGRESS", known)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _progress.wanted(io.StringIO()) is shown


@pytest.mark.reliability("bad inputs")
def test_adapters_given_one_rule_or_a_list_holding_no_rule_say_what_to_pass() -> None:
    """``attach(model, adapters=mr.Adapter(...))`` said "adapters must be a sequence of mr.Adapter, got Adapter(...",
    a repr cut in the middle and nothing of what to do; now one rule is told to go in a list, a list is told which item
    is no rule, and the model is left as it was. The list the advice gives is taken."""
    model = mr.models.build("softmax_topk", num_layers=1)
    before = snapshot(model)
    rule = mr.Adapter("gate", match=lambda name, module: name.endswith("mlp.router"))
    for given, said in (
        (rule, "adapters=[adapter]"),
        ([rule, "layers.0.mlp.router"], "holding str 'layers.0.mlp.router'"),
        (None, "leave adapters out"),
    ):
        with pytest.raises(mr.ArgumentTypeError, match="adapters must be a sequence") as info:
            mr.attach(model, adapters=given)  # type: ignore[arg-type]
        assert said in str(info.value), str(info.value)
        assert_untouched(model, before)
    with mr.attach(model, adapters=[rule]) as session:
        assert [s.adapter for s in session.sites] == ["gate"]
    assert_untouched(model, before)


@pytest.mark.reliability("bad inputs")
def test_compare_of_a_router_name_the_routes_do_not_hold_lists_the_routers_they_do() -> None:
    """``compare(a, b, names=["zz"])`` said "a holds no routes for routers ['zz']" and no more; it now lists the
    routers that side holds and says what to pass, and the names it lists compare."""
    a = mr.Routes([torch.tensor([[0, 1], [2, 3]])] * 2, ["layers.0.gate", "layers.1.gate"], 8)
    b = mr.Routes([torch.tensor([[0, 2], [2, 3]])] * 2, ["layers.0.gate", "layers.1.gate"], 8)
    with pytest.raises(mr.RoutesValidationError, match="holds no routes for routers") as info:
        mr.compare(a, b, names=["layers.0.gat"])
    assert "'layers.0.gate', 'layers.1.gate'" in str(info.value) and "names=" in str(info.value)
    assert mr.compare(a, b, names=["layers.0.gate"]).names == ("layers.0.gate",)
