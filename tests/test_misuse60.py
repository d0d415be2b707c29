"""Misuse of the public API by a hurried user: probabilities made over the tokens given to the load-balancing
loss, a predicate (Adapter match, include=, exclude=) answering a list or a str, a grouped reference router asked
for more experts than its kept groups hold, routes loaded from an empty path. Each answer is the plain result, or a
``MoEReplayError`` that names what is wrong and what to do."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import moe_replay as mr

from .conftest import assert_untouched, snapshot


@pytest.mark.reliability("silent wrong answers")
def test_probabilities_made_over_the_tokens_are_refused() -> None:
    """Once silent: ``load_balancing_loss(logits.softmax(0), ...)``, a softmax over the tokens of ``[tokens,
    experts]`` logits (every value from 0 to 1, every column summing to 1, no row), gave a loss of other values with
    no error. Refused, naming the dimension to take; rows of other sums alone (the sigmoid scores of a top-1 sigmoid
    router) are taken as before, and a row of weight 0 is not read."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    indices = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    with pytest.raises(mr.InvalidArgumentError, match=r"router 0: .*over the tokens.*row \d+ to .*softmax\(-1\)"):
        mr.load_balancing_loss(logits.softmax(0), indices)
    good = logits.softmax(-1)
    expected = mr.load_balancing_loss(good[:3], indices[:3])
    # a row of weight 0 is not counted, whatever it holds (padding zeroed out)
    padded = torch.cat([good[:3], torch.zeros(3, 4)])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(mr.load_balancing_loss(padded, indices, mask=mask), expected)
    # rounding of a bfloat16 softmax, and sigmoid scores, are no reason to refuse
    assert torch.isfinite(mr.load_balancing_loss(logits.softmax(-1).bfloat16(), indices))
    top1 = logits.argmax(-1, keepdim=True)
    sig = logits.sigmoid()
    assert torch.allclose(
        mr.load_balancing_loss(sig, top1), 4 * (torch.bincount(top1[:, 0], minlength=4) / 6 * sig.mean(0)).sum()
    )


#: predicate answers whose truth value is their length: true for every module, whatever they say
_BY_LENGTH: dict[str, Callable[[str, nn.Module], object]] = {
    "a one-element list": lambda name, module: [name == "layers.0.mlp.router"],
    "a str": lambda name, module: str(name == "layers.0.mlp.router"),
}


@pytest.mark.reliability("bad inputs")
@pytest.mark.parametrize("answer", list(_BY_LENGTH), ids=list(_BY_LENGTH))
def test_a_predicate_answering_a_container_is_refused_not_read_by_its_length(answer: str) -> None:
    """An Adapter whose match answered ``[False]`` or ``"False"`` for a router applied to it (a non-empty
    list or str is true), so ``mr.attach`` gave every router the adapter meant for one; include=/exclude= predicates
    answering so took every module. Refused at attach, naming the answer; the model is left as it was. A bool, None
    and a regular-expression match are read as before."""
    model = mr.models.build("softmax_topk")
    before = snapshot(model)
    match = _BY_LENGTH[answer]
    with pytest.raises(mr.ArgumentTypeError, match=r"match\('layers\.\d\.mlp\.router', module\) returned .*True or"):
        mr.attach(model, adapters=[mr.Adapter("first-only", match=match, decision="topk")])
    assert_untouched(model, before)
    with pytest.raises(mr.ArgumentTypeError, match=r"the include= predicate <lambda> returned .*True or False"):
        mr.attach(model, include=match)
    assert_untouched(model, before)
    # answers of one truth value go on as before: only the first router takes the adapter
    for ok in (lambda n, m: n == "layers.0.mlp.router", lambda n, m: re.fullmatch(r"layers\.0\.mlp\.router", n)):
        session = mr.attach(model, adapters=[mr.Adapter("first-only", match=ok, decision="topk")])
        assert [s.adapter for s in session.sites] == ["first-only", "generic"]
        session.detach()


@pytest.mark.reliability("silent wrong answers")
def test_a_grouped_router_asked_for_more_experts_than_its_kept_groups_hold_is_refused() -> None:
    """Once silent: ``build("grouped_sigmoid", topk_group=1, top_k=4)`` (groups of 2 experts) built a router whose
    top-k took experts of the groups it masks out, at score 0, and weighed them by their own scores: not the
    group-limited router asked for. Refused from the sizes; the largest top_k the kept groups hold is built."""
    with pytest.raises(mr.InvalidArgumentError, match=r"top_k=3 is more than the 2 experts of the topk_group=1 groups"):
        mr.models.build("grouped_sigmoid", n_group=4, topk_group=1, top_k=3, num_layers=1)
    model = mr.models.build("grouped_sigmoid", n_group=4, topk_group=1, top_k=2, num_layers=1)
    assert model.config.top_k == 2


@pytest.mark.reliability("clear errors")
def test_loading_routes_from_an_empty_path_says_the_path_is_empty() -> None:
    """``Routes.load("")`` (an unset variable) said "cannot read routes from : no such file", naming no path; saving
    to one already said the path is empty. Both say so now."""
    for call in (lambda: mr.Routes.load(""), lambda: mr.Routes([torch.tensor([[0]])], ["g"], 2).save("")):
        with pytest.raises(mr.MissingFileError, match=r"(from|to) '': the path is empty"):
            call()
