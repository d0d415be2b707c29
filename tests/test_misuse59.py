"""Misuse of the public API by a hurried user: a reference-model setting its router style never reads, a batch
of token ids handed to a layout as one sequence, a routes path through a file, a module instance as include=,
``inspect --seed/--layers`` of a checkpoint directory, ``to_numpy`` of unvalidated rows. Each answer is the plain
result, or a ``MoEReplayError`` (a usage error, on the command line) that names what is wrong and what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot

#: (style, an override that style does not read)
_UNREAD = [
    ("top1_argmax", {"top_k": 4}),
    ("softmax_topk", {"n_group": 2}),
    ("linear_gate", {"routed_scaling_factor": 1.0}),
    ("topk_softmax", {"norm_topk_prob": False}),
    ("softmax_topk", {"group_weights_from_topk": True}),
]


@pytest.mark.reliability("silent wrong answers")
@pytest.mark.parametrize(("style", "override"), _UNREAD, ids=[f"{s}-{next(iter(o))}" for s, o in _UNREAD])
def test_a_build_setting_the_style_never_reads_is_refused(style: str, override: dict[str, Any]) -> None:
    """Once silent: ``build("top1_argmax", top_k=4)`` built a top-1 model, ``n_group`` of a softmax router was
    dropped; the model built was not the one asked for."""
    ((name, value),) = override.items()
    with pytest.raises(mr.InvalidArgumentError, match=rf"does not read {name}={value!r} \(read by .*{style}"):
        mr.models.build(style, **override)


@pytest.mark.reliability("false refusals")
def test_a_build_setting_at_what_the_style_does_is_taken() -> None:
    """A field the style does not read is taken at the value it runs with (the default, or top_k=1 of a top-1
    style), and a style that reads a field takes any value of it."""
    assert mr.models.build("top1_argmax", top_k=1, num_layers=1).config.top_k == 1
    assert mr.models.build("softmax_topk", n_group=4, num_layers=1).config.n_group == 4
    model = mr.models.build("grouped_sigmoid", n_group=2, topk_group=1, norm_topk_prob=False, num_layers=1)
    assert (model.config.n_group, model.config.topk_group, model.config.norm_topk_prob) == (2, 1, False)
    assert mr.models.build("topk_softmax", top_k=3, num_layers=1).config.top_k == 3


@pytest.mark.reliability("silent wrong answers")
def test_a_batch_handed_to_a_layout_as_one_sequence_is_refused() -> None:
    """Once silent: a ``[2, 3]`` tensor for a sequence of 6 tokens was flattened, its two rows run together as
    one sequence; ``[1, n]`` (one sequence as a tokenizer returns it) is still one sequence."""
    layout = mr.BatchLayout.padded([6, 2])
    with pytest.raises(mr.InvalidArgumentError, match=r"sequence 0 is a \[2, 3\] tensor.*Pass each sequence"):
        layout.tokens([torch.arange(6).view(2, 3), torch.arange(2)])
    with pytest.raises(mr.InvalidArgumentError, match=r"sequence 1 is a \[2, 1\] tensor"):
        layout.tokens([torch.arange(6), [[4], [5]]])
    ids = layout.tokens([torch.arange(1, 7).view(1, 6), torch.tensor([7, 8])])
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0]]


@pytest.mark.reliability("clear errors")
def test_a_routes_path_through_a_file_says_the_file_is_in_the_way(tmp_path: Path) -> None:
    """Once: "no folder x; create it first" where x was a file (creating it fails), and "no such file" on load."""
    routes = mr.Routes([torch.tensor([[0, 1], [2, 3]])], names=["layers.0.gate"], num_experts=4)
    blocker = tmp_path / "routes.npz"
    routes.save(blocker)
    for path in (blocker / "again.npz", blocker / "sub" / "again.npz"):
        said = re.escape(f"{blocker} is a file, not a folder")
        with pytest.raises(mr.MissingFileError, match=said):
            routes.save(path)
        with pytest.raises(mr.MissingFileError, match=said):
            mr.Routes.load(path)
    assert mr.Routes.load(blocker).equal(routes)  # (the file in the way is left as it was)
    with pytest.raises(mr.MissingFileError, match=r"create it first$"):
        routes.save(tmp_path / "no_folder" / "routes.npz")
    assert sorted(os.listdir(tmp_path)) == ["routes.npz"]


class _Shared(nn.Module):
    """One router module reached by two paths (``a.router`` and ``b.router``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Module(), nn.Module()
        self.a.router = self.b.router = nn.Linear(4, 8, bias=False)


@pytest.mark.reliability("clear errors")
@pytest.mark.parametrize("call", ["find_routers", "attach"])
def test_a_module_instance_as_include_or_exclude_is_refused_with_its_path(call: str) -> None:
    """Once the refusal said "name it by its path ('layers.0.mlp.gate')", a path this model does not have, for
    its router at layers.0.mlp.router; it now gives the module's own path(s), or says it is no part of the model."""
    model = mr.models.build("softmax_topk", num_layers=2)
    before = snapshot(model)
    router = model.layers[1].mlp.router
    with pytest.raises(mr.ArgumentTypeError, match=r"its path is 'layers\.1\.mlp\.router' in MoETransformer\. "):
        getattr(mr, call)(model, include=router)
    with pytest.raises(mr.ArgumentTypeError, match=r"\(exclude='layers\.1\.mlp\.router'\), its class"):
        getattr(mr, call)(model, exclude=["layers.0.mlp.router", router])
    with pytest.raises(mr.ArgumentTypeError, match=r"it is no module of MoETransformer"):
        getattr(mr, call)(model, include=nn.Linear(2, 2))
    with pytest.raises(mr.ArgumentTypeError, match=r"the model itself \(MoETransformer\), which is never a router"):
        getattr(mr, call)(model, include=model)
    assert_untouched(model, before)
    shared = _Shared()
    with pytest.raises(mr.ArgumentTypeError, match=r"its paths are 'a\.router', 'b\.router' in _Shared"):
        mr.find_routers(shared, include=[shared.a.router])


@pytest.mark.reliability("silent wrong answers")
def test_inspect_refuses_random_model_options_for_a_checkpoint_directory(tmp_path: Path, capsys: Any) -> None:
    """Once silent: ``inspect ./checkpoint --layers 2`` printed every layer of the checkpoint and ``--seed 3`` loaded
    the same weights, the options dropped; they shape a random model only, and a checkpoint is loaded as saved."""
    from moe_replay.__main__ import main

    (tmp_path / "config.json").write_text("{}")  # (refused before anything is loaded: no weights needed)
    for argv, said in (
        (["--layers", "2"], "--layers 2 shapes"),
        (["--seed", "0"], "--seed 0 shapes"),
        (["--seed", "3", "--layers", "1"], "--seed 3 and --layers 1 shape"),
    ):
        assert main(["inspect", str(tmp_path), *argv]) == 2  # (options this model refuses: a usage error)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {said} a random model, but {tmp_path} is a checkpoint directory"), err
        assert err.rstrip().endswith("leave them out"), err
    assert main(["inspect", "softmax_topk", "--seed", "3", "--layers", "1"]) == 0  # (a random model takes both)
    assert "layers.0.mlp.router" in capsys.readouterr().out


@pytest.mark.reliability("silent wrong answers")
@pytest.mark.parametrize(("row", "said"), [([3, 3], "repeats an expert"), ([-1, 1], "mixes -1")])
def test_to_numpy_checks_the_rows_validate_false_deferred(row: list[int], said: str) -> None:
    """Once silent: ``Routes(..., validate=False).to_numpy()`` wrote a repeated expert or a -1 beside an expert,
    an array ``from_numpy`` refuses, while save() and every engine writer checked those rows first."""
    good = torch.tensor([[0, 1], [2, 3], [4, 5]])
    bad = good.clone()
    bad[1] = torch.tensor(row)
    unchecked = mr.Routes([good, bad], names=["layers.0.gate", "layers.1.gate"], num_experts=8, validate=False)
    with pytest.raises(mr.RoutesValidationError, match=rf"'layers\.1\.gate', token 1: row .*{said}"):
        unchecked.to_numpy()
    with pytest.raises(mr.RoutesValidationError, match=said):  # (refused alike wherever it is written)
        unchecked.save(os.devnull)
    fine = mr.Routes([good, good], names=["layers.0.gate", "layers.1.gate"], num_experts=8, validate=False)
    assert fine.to_numpy().tolist() == torch.stack([good, good], dim=1).tolist()
