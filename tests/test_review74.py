"""Two false refusals of round 54, fixed generally. The settings a router's capture keeps for a remap of its ids after
its decision (see ``Routes._ids_settings``) left in the state its code changes itself, so a count of its calls (kept
by its remap's code, by a name the code cannot be read for, or by a user's hook on it) moved with every forward and
refused every replay after the first, the replay's own forward counting too. Such state is left out, as the checks
inside a block leave it out; a real setting changed between the blocks is still refused. And a user's hook on a
router's modules that takes the module handed to it by its class or identity alone (``type(m).__name__``,
``names[m]``, ``isinstance(m, ...)``, ``m is None``: a hook that logs outputs by module), or holds the router in a
closure cell and reads its attributes by name alone, was read as one whose
reading is not complete, which made every attribute of the scope a setting: a record the block keeps on its gate
(the last ids, for its loss) refused the capture at its second forward. Such uses read no attribute; a setting such a
hook reads by name is still one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import moe_replay as mr
from tests.test_evidence import D
from tests.test_review71 import E, _Model

#: the hooks on the router's gate that take the module they are handed by its class or identity alone
_LOGGING_HOOKS = ("type", "mapping key", "isinstance", "identity", "closure")

#: the counter's name, spelled so that the code reading it cannot be read for which attribute it names
_NAME = "cal" + "ls"


class _CountingShift(nn.Module):
    """The ids a router hands on, shifted by an offset its own code reads, counting its calls as ``how`` says:
    ``"statement"`` (``self.calls += 1``), ``"setattr"`` (through a name its code holds in a global)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.offset = [1]
        self.calls = 0
        self.how = how

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "statement":
            self.calls += 1
        else:
            setattr(self, _NAME, getattr(self, _NAME) + 1)
        return (ids + self.offset[0]) % E


def _model(how: str) -> _Model:
    """The router of test_review71 whose ids pass through a shift by an offset; a count of calls kept by the shift's
    code, or (``"hook"``) by a user's hook on it that shifts the ids by the router's ``offset``."""
    model = _Model()
    router = model.block.router
    if how == "hook":
        router.hook_calls = 0

        def shift(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            router.hook_calls += 1
            return (out + router.offset) % E

        router.remap.register_forward_hook(shift)
    else:
        router.remap = _CountingShift(how)
    return model


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", ["statement", "setattr", "hook"])
def test_a_count_of_calls_kept_by_the_remap_is_no_setting_of_the_routes(how: str) -> None:
    """Captured, then replayed three times: every replay runs the captured experts on the captured tokens (the count
    moved with each forward, the replays' own too, and refused each after the first); the offset changed after, the
    same routes are refused, naming it."""
    model = _model(how)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            model(x)
        routes = session.routes()
        captured = sorted(model.block.ran[-1])
        assert routes._ids_settings, "the router's ids pass through no code after its decision: the case tries nothing"
        for _ in range(3):
            with torch.no_grad(), session.replay(routes):
                model(x)
            assert sorted(model.block.ran[-1]) == captured
        if how == "hook":
            model.block.router.offset += 1
            setting = "'offset'"
        else:
            model.block.router.remap.offset[0] += 1
            setting = r"remap\.offset"
        with pytest.raises(mr.MoEReplayError, match=rf"router 'block\.router'.*{setting}.*captured"):
            with torch.no_grad(), session.replay(routes):
                model(x)


class _Logger:
    """A user's object whose bound method, a hook on a router's gate, logs the gate's output under the module's name,
    found as ``how`` says; it shifts nothing, but reads the router's ``offset`` by name (as a hook that scales by a
    setting would)."""

    def __init__(self, how: str, router: nn.Module) -> None:
        self.how, self.router = how, router
        self.names = {router.gate: "gate"}
        self.log: list[tuple[str, int]] = []

    def hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if self.how == "type":
            name = type(module).__name__
        elif self.how == "mapping key":
            name = self.names[module]
            self.names[module] = name
        elif self.how == "isinstance":
            name = "linear" if isinstance(module, nn.Linear) else "other"
        else:
            name = "none" if module is None else "gate"
        self.log.append((name, self.router.offset))


def _logging_hook(how: str, router: nn.Module) -> _Logger:
    """:class:`_Logger`'s hook, set on the router's gate; ``"closure"``: a function holding the router in a closure
    cell, reading its attributes by name alone."""
    logger = _Logger(how, router)
    if how == "closure":
        log = logger.log
        router.gate.register_forward_hook(lambda module, args, out: log.append((type(module).__name__, router.offset)))
    else:
        router.gate.register_forward_hook(logger.hook)
    return logger


class _Keeping(nn.Module):
    """The model of test_review71 whose forward keeps the router's last ids and token count on its gate, after the
    router returns (for a loss): records no code of the router reads."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.inner.block.router
        out = self.inner(x)
        w, ids = router(x)
        router.gate.last_ids = ids
        router.gate.last_count = int(x.shape[0])
        return out + w.sum()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("how", _LOGGING_HOOKS)
def test_a_hook_taking_its_module_by_class_or_identity_makes_no_record_a_setting(how: str) -> None:
    """Three forwards of different sizes captured, then replayed, with the logging hook on the gate and the records
    kept on it after each: neither block is refused (the records moved at every forward), the hook ran in each, and
    the replay runs the captured experts on the captured tokens."""
    model = _Keeping()
    logger = _logging_hook(how, model.inner.block.router)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    feeds = (x, x[:4], x[2:5])
    with mr.attach(model) as session:
        with torch.no_grad(), session.capture():
            for t in feeds:
                model(t)
        captured = [sorted(r) for r in model.inner.block.ran[-3:]]
        routes = session.routes()
        with torch.no_grad(), session.replay(routes):
            for t in feeds:
                model(t)
        assert [sorted(r) for r in model.inner.block.ran[-3:]] == captured
    assert logger.log, "the hook never ran: the case tries nothing"


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("how", _LOGGING_HOOKS)
def test_a_setting_such_a_hook_reads_by_name_is_still_one(how: str) -> None:
    """The same hook reads the router's ``offset`` by name: changed between two forwards of one capture block, it is
    refused naming it, as an attribute only a hook reads is (the hook's other uses of its module hide no read)."""
    model = _Model()
    _logging_hook(how, model.block.router)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    with mr.attach(model) as session:
        with pytest.raises(mr.MoEReplayError, match=r"'offset' of router 'block\.router'"):
            with torch.no_grad(), session.capture():
                model(x)
                model.block.router.offset += 1
                model(x)
