"""Round 64's review: state the probe runs that establish a decision leave behind, inside the containers a router's
attributes hold (a dict of lists it logs its aux loss in, a per-layer list in a routing-replay buffer it keeps)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

_D, _E, _K, _T = 8, 4, 2, 6


class _LayerLog:
    """A plain object of the user's logging one layer's forwards (its entries and their count)."""

    def __init__(self) -> None:
        self.entries: list[torch.Tensor] = []
        self.count = 0


class _Buffer:
    """A routing-replay buffer of the user's that a router keeps: the experts each forward chose, per layer (in a dict
    of lists, or in a list of per-layer logs)."""

    def __init__(self) -> None:
        self.per_layer: dict[str, list[torch.Tensor]] = {"router": []}
        self.layers = [_LayerLog()]


class _LoggingRouter(nn.Module):
    """A top-k router that logs what each forward did in a list held inside one of its attributes (``holder``: a dict
    of lists, a plain object's dict of lists, or a list of lists), which the training loop reads after the forward."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.gate = nn.Linear(_D, _E, bias=False)
        self.holder = holder
        self.losses: dict[str, list[torch.Tensor]] = {"balance": []}
        self.buffer = _Buffer()
        self.per_step: list[list[torch.Tensor]] = [[]]
        self.by_name = {"router": [_LayerLog()]}

    def _log(self) -> list[torch.Tensor]:
        if self.holder == "dict":
            return self.losses["balance"]
        if self.holder == "object":
            return self.buffer.per_layer["router"]
        if self.holder == "object in a list":
            return self.buffer.layers[0].entries
        if self.holder == "object in a dict of lists":
            return self.by_name["router"][0].entries
        return self.per_step[0]

    def counts(self) -> list[int]:
        """The counts the per-layer logs hold."""
        return [self.buffer.layers[0].count, self.by_name["router"][0].count]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(probs, _K, dim=-1)
        load = F.one_hot(idx, _E).sum((0, 1)).to(probs.dtype) / idx.numel()
        self._log().append(_E * (load * probs.mean(0)).sum() if "object" not in self.holder else idx.detach().clone())
        if self.holder.startswith("object in"):
            self.buffer.layers[0].count += 1
            self.by_name["router"][0].count += 1
        return w, idx


class _Model(nn.Module):
    def __init__(self, holder: str) -> None:
        super().__init__()
        self.router = _LoggingRouter(holder)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x)


@pytest.mark.reliability("the model is left as it was")
@pytest.mark.parametrize("holder", ["dict", "object", "nested_list", "object in a list", "object in a dict of lists"])
def test_a_log_kept_inside_a_routers_container_attribute_holds_one_entry_per_forward(holder: str) -> None:
    """Once silent: the runs that establish a decision put back a router's attributes and the contents of the lists
    and dicts they hold, but not the lists those hold in turn: a dict of lists logging each forward's balance loss, a
    kept routing-replay buffer's per-layer list, a list of lists, a plain object of per-layer logs held in a list or in
    a dict of lists, held some forty entries after one captured forward (the probe runs' own), and a training loop
    summing the log trained on losses no forward of the model made. They hold each forward's entry alone now, as the
    same model unattached logs them, and the logs' counts move by one a forward."""
    torch.manual_seed(0)
    x = torch.randn(_T, _D)
    model = _Model(holder)
    plain = copy.deepcopy(model)
    plain(x), plain(x)
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session:
        with session.capture():
            model(x)
            model(x)
        routes = session.routes()
    log, expected = model.router._log(), plain.router._log()
    assert len(log) == len(expected) == 2, f"{len(log)} entries logged for 2 forwards"
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(log, expected, strict=True))
    assert model.router.counts() == plain.router.counts()
    with mr.attach(model, include=["router"], top_k=_K, num_experts=_E) as session, session.replay(routes):
        model(x)
        model(x)
    assert len(model.router._log()) == 4
