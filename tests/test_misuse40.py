"""Misuse of the token check by the way a model is fed: a wrapper attached around the model that changes its ids before
the model runs (next-token inputs cut by one, a BOS token put before each sequence), and a model of one's own fed its
batch as one dict. Each replay is checked by a capture inside it, after the routers were moved: it holds exactly the
recorded experts, and another batch is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr

BOS = 1


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def _move_routers(model: nn.Module) -> None:
    """Move every router's weight far enough that it chooses other experts on the same tokens."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.add_(3 * torch.randn(p.shape, generator=g))


class _Changing(nn.Module):
    """A training wrapper whose forward changes the ids before the model it calls (as code of one's own does)."""

    def __init__(self, inner: nn.Module, change: str) -> None:
        super().__init__()
        self.inner, self.change = inner, change

    def forward(self, input_ids: torch.Tensor) -> object:
        if self.change == "last token cut":  # the inputs of next-token prediction
            return self.inner(input_ids[:, :-1])
        if self.change == "sequences reversed":  # (as a sort by length may order them)
            return self.inner(input_ids.flip(0))
        bos = torch.full((input_ids.shape[0], 1), BOS, dtype=input_ids.dtype)
        return self.inner(torch.cat([bos, input_ids], dim=1))


CHANGES = ["last token cut", "bos put first", "sequences reversed"]


def _replays_exactly_and_refuses_another_batch(session: mr.Session, run: nn.Module, model: nn.Module) -> None:
    x = _batch(0)
    with session.capture(), torch.no_grad():
        run(x)
    routes = session.routes()
    _move_routers(model)
    with session.capture(), torch.no_grad():
        run(x)
    assert not session.routes().equal(routes)  # the premise: the moved routers choose other experts
    with session.replay(routes), session.capture(), torch.no_grad():
        run(x)
    assert session.routes().equal(routes)
    with pytest.raises(mr.TokenMismatchError):
        with session.replay(routes), torch.no_grad():
            run(x.flip(0))  # the two sequences swapped: each would get the other's experts


@pytest.mark.reliability("wrappers")
@pytest.mark.parametrize("change", CHANGES)
def test_a_session_on_the_model_a_wrapper_feeds_changed_ids_replays_exactly_and_refuses_another_batch(
    change: str,
) -> None:
    """Attached to the model the wrapper calls, the session reads the ids the routers' rows are: the wrapper's
    batch replays exactly and the batch with its sequences swapped is refused."""
    model = mr.models.build("softmax_topk", num_layers=2)
    wrapper = _Changing(model, change)
    with mr.attach(model) as session:
        _replays_exactly_and_refuses_another_batch(session, wrapper, model)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("change", CHANGES)
def test_a_session_on_a_wrapper_that_changes_the_ids_replays_exactly_and_refuses_another_batch(change: str) -> None:
    """Once silent (BOS put first: the routes kept no ids, another batch was forced unchecked) or a false refusal (last
    token cut, sequences reversed: the wrapper's own ids were checked): the same wrapper attached itself. The ids the
    routers see are those the model beneath it is fed, the innermost level fed ids, so its batch replays exactly and
    the batch with its sequences swapped is refused, as on the model alone."""
    model = mr.models.build("softmax_topk", num_layers=2)
    wrapper = _Changing(model, change)
    with mr.attach(wrapper) as session:
        _replays_exactly_and_refuses_another_batch(session, wrapper, model)


@pytest.mark.reliability("wrappers")
def test_a_wrapper_that_cuts_the_last_token_replays_its_batch_as_the_model_it_calls_does() -> None:
    """Once a false refusal (naming padding, then the attach of the model it calls): attached to the wrapper or to the
    model it calls, a session keeps the same ids for the rows (those the model is fed), and each replays the other's
    routes of the wrapper's batch."""
    model = mr.models.build("softmax_topk", num_layers=2)
    wrapper = _Changing(model, "last token cut")
    x = _batch(0)
    kept = []
    for attached in (wrapper, model):
        with mr.attach(attached) as session:
            with session.capture(), torch.no_grad():
                wrapper(x)
            kept.append(session.routes())
    assert kept[0].token_ids is not None
    assert torch.equal(kept[0].token_ids, kept[1].token_ids)
    for attached, routes in ((wrapper, kept[1]), (model, kept[0])):
        with mr.attach(attached) as session:
            with session.replay(routes), session.capture(), torch.no_grad():
                wrapper(x)
            assert torch.equal(session.routes().indices, routes.indices)
            assert torch.equal(session.routes().token_ids, routes.token_ids)


class _FedADict(nn.Module):
    """A model of one's own whose forward takes its batch as one dict (as a data loader hands it over) and embeds the
    batch's ``input_ids`` itself: no module between it and its routers is fed the ids."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.models.MoEConfig(hidden_size=16, num_experts=8, top_k=2, expert_size=16)
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 16)
        self.mix = nn.Linear(16, 16)  # (each token sees its sequence's mean: the sequences' order matters)
        self.blocks = nn.ModuleList([mr.models.MoEBlock(cfg) for _ in range(2)])
        for p in self.blocks.parameters():
            nn.init.normal_(p, std=0.5)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(batch["input_ids"])
        h = h + self.mix(h.mean(dim=1, keepdim=True))
        for block in self.blocks:
            h = h + block(h)
        return h


class _AsDict(nn.Module):
    """Runs ``model`` on a tensor of ids given as its dict batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids})


@pytest.mark.reliability("silent replays")
def test_a_model_fed_its_batch_as_one_dict_replays_exactly_and_refuses_another_batch() -> None:
    """Once silent (its capture kept no ids): a model fed ``{"input_ids": ...}`` knows the ids, its batch replays
    exactly and the batch with its sequences swapped is refused, as for a model fed the ids themselves."""
    model = _FedADict()
    with mr.attach(model) as session:
        _replays_exactly_and_refuses_another_batch(session, _AsDict(model), model)


class _FedEither(_FedADict):
    """:class:`_FedADict` whose routers see the tokens sequence-first (its blocks run ``[positions, batch, hidden]``) or
    only those the attention mask keeps (the padding taken out before them)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(batch["input_ids"])
        h = h + self.mix(h.mean(dim=1, keepdim=True))
        if self.layout == "sequence-first":
            h = h.transpose(0, 1)
        else:
            h = h[batch["attention_mask"].bool()]
        for block in self.blocks:
            h = h + block(h)
        return h


class _FedByName(_FedEither):
    """The same model fed its entries by name."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward({"input_ids": input_ids, "attention_mask": attention_mask})


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("layout", ["sequence-first", "padding taken out"])
def test_a_model_fed_one_dict_keeps_the_ids_and_order_of_the_model_fed_its_entries_by_name(layout: str) -> None:
    """A dict batch is read as its entries given by name: its mask, and the order in which the routers see its tokens
    (told by runs given the dict), are those of the same model given ``input_ids=`` and ``attention_mask=``."""
    x = _batch(0)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0  # (sequence 1 padded)
    kept = []
    for model, fed in (
        (_FedEither(layout), {"batch": {"input_ids": x, "attention_mask": mask}}),
        (_FedByName(layout), {"input_ids": x, "attention_mask": mask}),
    ):
        with mr.attach(model) as session:
            with session.capture(), torch.no_grad():
                model(**fed)
            kept.append(session.routes())
            if isinstance(model, _FedByName):
                continue
            with session.replay(kept[0]), session.capture(), torch.no_grad():
                model({"input_ids": x, "attention_mask": mask})
            assert session.routes().equal(kept[0])
            with pytest.raises(mr.TokenMismatchError):
                with session.replay(kept[0]), torch.no_grad():
                    model({"input_ids": x.flip(0), "attention_mask": mask.flip(0)})
    assert kept[1].token_ids is not None
    assert kept[0].equal(kept[1])
    assert torch.equal(kept[0].token_ids, kept[1].token_ids)


class _Stack(nn.Module):
    """The blocks of a model, called on hidden states."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h)
        return h


class _FedADictOverAStack(_FedADict):
    """:class:`_FedADict` whose blocks are called through a module of their own, fed hidden states: a level inside the
    model, which is fed no ids."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _Stack(self.blocks)
        del self.blocks

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(batch["input_ids"])
        return self.body(h + self.mix(h.mean(dim=1, keepdim=True)))


@pytest.mark.reliability("silent replays")
def test_a_model_fed_one_dict_over_a_stack_fed_hidden_states_replays_exactly_and_refuses_another_batch() -> None:
    """Once silent: as a model fed one dict, where a module between it and its routers is fed hidden states: no module
    inside is fed ids, so the dict's are those the routers' tokens come from; its batch replays exactly and the
    swapped batch is refused."""
    model = _FedADictOverAStack()
    with mr.attach(model) as session:
        _replays_exactly_and_refuses_another_batch(session, _AsDict(model), model)


class _InHalves(nn.Module):
    """A training wrapper that runs the model it calls once per sequence (micro-batches of one), cutting the last
    token of each."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(row[None, :-1]).logits for row in input_ids])


@pytest.mark.reliability("silent replays")
def test_a_wrapper_that_calls_the_model_per_sequence_replays_exactly_and_refuses_another_batch() -> None:
    """Once a false refusal (the wrapper's 16 ids for rows of 7 per call): each call of the model inside the wrapper's
    forward is a forward of its own, fed the ids its routers see; the batch replays exactly and the batch with its
    sequences swapped is refused, as on the model alone."""
    model = mr.models.build("softmax_topk", num_layers=2)
    wrapper = _InHalves(model)
    with mr.attach(wrapper) as session:
        _replays_exactly_and_refuses_another_batch(session, wrapper, model)
