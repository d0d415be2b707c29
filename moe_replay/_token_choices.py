"""Which tokens reach the routers: a choice made by values outside them, recorded at capture and checked at replay.

Routes are rows in the order a router sees its tokens. A module that holds routers may choose, by a ranking of scores it
computes (Mixture-of-Depths' top-k over each sequence, a sort of the tokens by a score), which of the forward's tokens
its routers see and in which order. The rows recorded for those routers are then those tokens' only; where the choice
comes out otherwise at replay (the module's weights moved, as they do between an RL rollout and its training step), the
recorded rows would be forced on other tokens with every count still matching. So the watched forward
(:class:`~moe_replay.orphans.OrphanWatch`) finds such modules (:attr:`~moe_replay.orphans.OrphanWatch.choosers`: a
ranking of floating scores along the input's tokens in the module's own forward, before a router in the nearest module
holding routers around it runs on fewer tokens, or on all of them in the order of a ranking of every token; or a boolean
mask made by a threshold on such scores that it picks tokens by, ``x[mask]`` or ``mask.nonzero()``, or ranks or picks by
once cast to numbers, ``keep.long().argsort()``; a mask read on the host instead, ``keep.tolist()``, is refused there),
and from then on each of their forwards is tapped: a capture records the indices of every ranking the module takes in
its own forward, and every boolean mask it picks by (a mask given as input too: the same at replay), in call order, and
the routes read from it keep them with how many each forward of the model took; a replay compares each with the recorded
one and refuses, with :class:`~moe_replay.TokenMismatchError`, a choice that differs, routes that hold no record of it,
or a replay that consumed every row yet never made a choice the capture recorded (the module's forward took a path that
chooses none). Where the routes know the rankings of each forward and the replay's forwards are counted (eager ones of
the model itself), a forward's rankings are compared with those of the capture's forward of the same number, and a
forward that takes fewer or more than that one is refused as it ends or as it takes one too many: a choice made in
another forward at replay than at the capture (the routers of one forward seeing every token, those of the next a chosen
few) would otherwise match in call order while each forward is forced the other's rows. Elsewhere (a compiled forward, a
part of the model called alone) they are compared in call order. Each ranking is also compared, where the routes know
it, with where the routers stood in their rows as the capture took it (their device cursors: rows written then), the
replay's standing the rows read: parts of the model called in another order than at the capture take the same rankings
at other rows, whose rows after them would be forced on other tokens; routes that tell neither where the routers stood
nor the rankings of each forward (saved before the places were kept) are refused at their first ranking. A recompute in
backward (activation checkpointing) repeats the forward's choice and is not counted.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._torch_compat import current_graph_task_id
from .errors import TokenMismatchError
from .evidence import NESTING, UNWRAP, unwrap
from .orphans import TOKEN_CHOICES, TOKEN_MASKS, _calling_module, _Inert, _ordering, choice_indices, picking_mask

__all__ = ["ChoiceLog", "count_forwards", "tap_choices"]

#: (``at`` of :meth:`ChoiceLog.note`: where the routers stand is read as the ranking is noted)
_NOW = object()

#: what a replay refused by :class:`ChoiceLog` tells the user to do
_FIX = (
    "Keep that choice as it was at the capture (the module's own scores, and everything before it, unchanged), or "
    "exclude= the routers inside it to run them natively on purpose"
)


class ChoiceLog:
    """The rankings of the modules that choose which tokens reach their routers, for one session (see the module's
    docstring): those recorded by the capture open now or last, and those a replay compares with."""

    def __init__(self) -> None:
        #: ``(module path, indices)`` of each ranking in the capture, in call order
        self.recorded: list[tuple[str, torch.Tensor]] = []
        #: how many of them each forward of the capture took, in order (None: not told, a ranking outside a forward
        #: counted: the record is then kept whole only)
        self.counts: list[int] | None = []
        self.capturing = False
        self.replaying = False
        #: what the routes of the open replay recorded (None: routes that hold no record of the choice)
        self.expected: tuple[tuple[str, torch.Tensor], ...] | None = None
        self.at = 0  # the next ranking of the replay, among ``expected``
        #: how many of ``expected`` each forward of the capture took (None: not told; they are compared in call order)
        self.per_forward: tuple[int, ...] | None = None
        self.forward = -1  # the replay's counted forward under way or last (its number from 0)
        self.open = False  # whether a counted forward of the replay is under way
        self.taken = 0  # the rankings the counted forward under way took
        self.starts: list[int] = []  # where each forward's rankings start among ``expected`` (see start_replay)
        #: where each router stands in its rows now, by name (set by the session: a capture's rows written, a replay's
        #: rows read; None where not told), and for each ranking of the capture where they stood as it was taken
        #: (None: noted after the fact, by a watch)
        #: (called with True for a replay's rows read)
        self.place: Callable[[bool], tuple[tuple[str, ...], torch.Tensor] | None] | None = None
        self.places: list[tuple[tuple[str, ...], torch.Tensor] | None] = []
        #: where the routers stood at each ranking of the open replay's routes (None: not told; not compared)
        self.expected_places: tuple[dict[str, int] | None, ...] | None = None
        #: whether the open replay's routes tell neither where the routers stood at their rankings nor how many each
        #: forward took (routes saved before the places were kept): a ranking of it cannot be shown to be taken at the
        #: capture's rows, and is refused
        self.unplaced = False

    def start_replay(
        self,
        expected: tuple[tuple[str, torch.Tensor], ...] | None,
        per_forward: tuple[int, ...] | None = None,
        places: tuple[dict[str, int] | None, ...] | None = None,
    ) -> None:
        """A replay of routes that recorded ``expected``, ``per_forward`` of them in each forward where told, and
        ``places``, the row of each router at each of them where told, starts."""
        # (none recorded: any ranking is refused in call order, and the forwards need no counting)
        told = bool(expected) and per_forward is not None and sum(per_forward) == len(expected or ())
        self.expected, self.at, self.replaying = expected, 0, True
        self.expected_places = (
            places if expected is not None and places is not None and len(places) == len(expected) else None
        )
        self.per_forward = per_forward if told else None
        self.unplaced = bool(expected) and self.expected_places is None and self.per_forward is None
        #: where each forward's rankings start among ``expected`` (by ``per_forward``)
        self.starts = list(itertools.accumulate(per_forward or (), initial=0)) if told else []
        self.forward, self.open, self.taken = -1, False, 0

    def end_replay(self) -> int:
        """The replay ended: how many recorded choices it never made (0 where the routes hold no record)."""
        unmet = 0 if self.expected is None else max(len(self.expected) - self.at, 0)
        self.expected, self.at, self.replaying = None, 0, False
        self.per_forward, self.forward, self.open, self.taken = None, -1, False, 0
        self.expected_places, self.unplaced = None, False
        return unmet

    def finish(self) -> None:
        """The replay's block ends without an error: its last counted forward, if still open (its forward's end was
        not seen), took as many rankings as the capture's."""
        if self.replaying:
            self._close()

    @staticmethod
    def unmet_error(unmet: int, recorded: int) -> TokenMismatchError:
        """The refusal of a replay that consumed every row yet made ``unmet`` of the ``recorded`` choices of which
        tokens reach the routers never (the choosing module swapped, or a path of its forward that chooses none)."""
        return TokenMismatchError(
            f"the capture recorded {recorded} choice(s), made outside the routers by a module's own scores (a ranking, "
            f"or a boolean mask it picks tokens by), of which tokens reach the routers, and this replay made "
            f"{recorded - unmet} of them: its routers were fed tokens no recorded choice shows are the ones their "
            f"rows were recorded on (the choosing module replaced, or its forward taking a path that chooses none), "
            f"so the recorded rows may have been forced on other tokens. {_FIX}"
        )

    def clear(self) -> None:
        """A capture starts anew: nothing recorded yet."""
        self.recorded, self.counts, self.places = [], [], []

    def begin(self) -> None:
        """A forward of the model starts (not a recompute in backward): the rankings noted next are its own. In a
        replay, the forward before it is checked to have taken all of its capture's forward's (see :meth:`end`)."""
        counted = self.capturing and self.counts is not None
        if not (counted or (self.replaying and self.per_forward is not None)) or current_graph_task_id() != -1:
            return  # (first: a forward with nothing to count reads nothing more)
        if self.capturing and self.counts is not None:
            self.counts.append(0)
        if self.replaying and self.per_forward is not None:
            self._close()
            self.forward += 1
            self.open, self.taken = True, 0
            self.at = self.starts[min(self.forward, len(self.starts) - 1)]

    def end(self, failed: bool) -> None:
        """A counted forward of the model ends (``failed``: it raises, and is not checked): in a replay, refuse it
        where it took fewer rankings than the capture's forward of the same number."""
        if not self.open or current_graph_task_id() != -1 or not self.replaying:
            return  # (first: no counted forward of a replay under way, nothing to check)
        if failed:
            self.open = False
        else:
            self._close()

    def _wanted(self) -> int:
        """How many rankings the capture's forward of the number of the replay's counted forward took."""
        per = self.per_forward or ()
        return per[self.forward] if 0 <= self.forward < len(per) else 0

    def _close(self) -> None:
        """The counted forward of the replay under way ends: refuse it where it took fewer rankings than the
        capture's forward of its number."""
        if not self.open or self.per_forward is None or self.expected is None:
            return
        self.open = False
        wanted = self._wanted()
        if self.taken < wanted:
            want_path = self.expected[self.at][0]
            raise TokenMismatchError(
                f"{self._what(want_path)}, and forward {self.forward + 1} of this replay took {self.taken} of its "
                f"choices where that forward of the capture took {wanted}: the choice was made in other forwards "
                f"than at the capture, so this forward's routers saw other tokens than the recorded rows'. {_FIX}"
            )

    def forwards(self) -> tuple[int, ...] | None:
        """How many rankings each forward of the capture took, where every ranking was taken in a counted forward."""
        return None if self.counts is None else tuple(self.counts)

    def note(self, path: str, indices: torch.Tensor, *, at: Any = _NOW) -> None:
        """The module at ``path`` ranked its tokens and got ``indices``: record them in a capture, compare them in a
        replay (raising :class:`~moe_replay.TokenMismatchError` where they differ). A recompute in backward is none.
        Where the routers stand in their rows (their rows after it not yet written or read) is recorded with it, and
        compared: now, or for a ranking noted after the fact, ``at`` (what :meth:`snapshot` told as it was taken;
        None: not told)."""
        if current_graph_task_id() != -1:
            return
        snap = self.snapshot() if at is _NOW else at
        if self.capturing:
            self.recorded.append((path, indices.detach().clone()))
            self.places.append(None if snap is None else snap[0])
            if self.counts:
                self.counts[-1] += 1
            else:  # (no forward counted before it: which forward took it is not told)
                self.counts = None
        if self.replaying:
            if self.open and self.per_forward is not None and self.expected is not None:
                wanted = self._wanted()
                if self.taken >= wanted:
                    raise TokenMismatchError(
                        f"{self._what(path)}, and forward {self.forward + 1} of this replay chose its tokens more "
                        f"times than that forward of the capture ({wanted}): the choice was made in other forwards "
                        f"than at the capture, so the recorded rows would be forced on other tokens. {_FIX}"
                    )
                self.taken += 1
            if self.unplaced:
                raise TokenMismatchError(
                    f"{self._what(path)}, and these routes tell neither where the routers stood in their rows at "
                    "each of its choices nor how many of them each forward of the capture took (routes saved by an "
                    "earlier version of moe_replay, which kept no places), so this replay cannot show that its calls "
                    "run in the order of the capture's and read its rows on the tokens they were recorded on. Capture "
                    f"the routes again with this version and replay those (saved, joined or sent as they are). {_FIX}"
                )
            self._compare_place(path, None if snap is None else snap[1])
            self._compare(path, indices.detach())

    def _place(self, replay: bool) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """Where the routers stand in their rows now (names, and rows on the device: no sync), where told: rows read
        by the replay (``replay``), else rows written by the capture."""
        if self.place is None or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return None
        return self.place(replay)

    def snapshot(self) -> tuple[Any, Any] | None:
        """Where the routers stand in their rows now: the capture's rows written and the replay's rows read (each
        None where not told)."""
        return (self._place(False) if self.capturing else None, self._place(True) if self.replaying else None)

    def _compare_place(self, path: str, now: tuple[tuple[str, ...], torch.Tensor] | None) -> None:
        """Refuse a ranking of the replay taken where the routers stand at other rows than at the capture's ranking
        of its number: the routes' rows after it (read in order) would be forced on other tokens than recorded."""
        places, at = self.expected_places, self.at
        if places is None or self.expected is None or at >= len(places) or places[at] is None:
            return
        if now is None:
            return
        names, rows = now
        want = places[at] or {}
        here = dict(zip(names, rows.tolist(), strict=True))
        moved = [(n, want[n], r) for n, r in here.items() if n in want and want[n] != r]
        if moved:
            name, was, is_ = moved[0]
            raise TokenMismatchError(
                f"{self._what(path)}, and its choice {at + 1} of this replay was taken where router '{name}' had read "
                f"{is_} rows of the routes, where at the capture it had written {was}: the calls ran in another "
                f"order than at the capture (a part of the model called before or after another), so the rows "
                f"after it would be forced on other tokens than they were recorded on. Run the calls in the order of "
                f"the capture, or capture them again in this order. {_FIX}"
            )

    @staticmethod
    def _what(path: str) -> str:
        """What the module at ``path`` does, for a refusal."""
        return (
            f"'{path}' chooses, by scores of its own along the tokens (a ranking, or a boolean mask it picks tokens "
            "by), which tokens reach the routers after it, or in which order (Mixture-of-Depths, a sort of the "
            "tokens): routes are rows in the order a router "
            "sees its tokens"
        )

    def _compare(self, path: str, indices: torch.Tensor) -> None:
        what = self._what(path)
        if self.expected is None:
            raise TokenMismatchError(
                f"{what}, and these routes hold no record of that choice (they were not read by session.routes() of a "
                "capture that watched it, or were cut since inside a forward's sequences, picked out of order, or "
                "joined from parts of one forward), so this replay "
                f"cannot show that its routers see the tokens they were recorded on. Replay the routes that "
                "session.routes() returned, whole or cut at the capture's forwards (saved, joined or sent as they "
                f"are). {_FIX}"
            )
        at = self.at
        self.at += 1
        if at >= len(self.expected):
            raise TokenMismatchError(
                f"{what}, and it chose its tokens more times in this replay than in the capture ({len(self.expected)} "
                f"in all): these forwards are not those the routes were recorded on. {_FIX}"
            )
        want_path, want = self.expected[at]
        same = (
            want_path == path
            and want.shape == indices.shape
            and want.dtype == indices.dtype
            and bool(torch.equal(want, indices.to(want.device)))
        )
        if not same:
            raise TokenMismatchError(
                f"{what}, and at its choice {at + 1} of the replay it chose other tokens than at the capture "
                f"(recorded at '{want_path}'): the recorded rows would be forced on other tokens. {_FIX}"
            )

    def kept(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """The capture's rankings on the host, for the routes read from it."""
        return tuple((path, indices.cpu()) for path, indices in self.recorded)

    def kept_places(self) -> tuple[dict[str, int] | None, ...]:
        """Where each router stood in its rows at each of the capture's rankings (None: not told), on the host."""
        return tuple(None if p is None else dict(zip(p[0], p[1].tolist(), strict=True)) for p in self.places)


class _TapMode(TorchFunctionMode):
    """Open while a choosing module's forward runs: hands each ranking it takes in its own forward to the log."""

    def __init__(self, tap: _Tap) -> None:
        super().__init__()
        self.tap = tap

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        named = unwrap(func, kwargs) if func in UNWRAP else func
        if named in TOKEN_CHOICES and not (NESTING.probing or NESTING.establishing or _ordering()):
            name, in_hook = _calling_module(self.tap.names)
            if name == self.tap.path and not in_hook:
                indices = choice_indices(named, out)
                if indices is not None:
                    self.tap.log.note(self.tap.path, indices)
        elif named in TOKEN_MASKS and not (NESTING.probing or NESTING.establishing or _ordering()):
            mask = picking_mask(named, args, kwargs)  # (the tokens a boolean mask picks: as the watch records them)
            if mask is not None:
                name, in_hook = _calling_module(self.tap.names)
                if name == self.tap.path and not in_hook:
                    self.tap.log.note(self.tap.path, mask)
        return out


class _Tap(_Inert):
    """The forward pre-hook (the instance) of a choosing module: opens a :class:`_TapMode` for its forward. It and its
    leaving hook run eagerly, also where the module's call is compiled (a graph break there, in a block only): code
    traced with them would hold no tap, and its rankings would go unrecorded and uncompared."""

    def __init__(self, path: str, names: dict[int, str], log: ChoiceLog) -> None:
        self.path, self.names, self.log = path, names, log
        self.open: list[_TapMode] = []
        self.handles: list[Any] = []

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        mode = _TapMode(self)
        mode.__enter__()
        self.open.append(mode)

    def close(self) -> None:
        """Leave the mode of the forward that ends (also where it raises)."""
        if self.open:
            self.open.pop().__exit__(None, None, None)


class _Begin(_Inert):
    """The forward pre-hook of the tapped model: tells the log that a forward starts."""

    def __init__(self, log: ChoiceLog) -> None:
        self.log = log

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.log.begin()


class _End(_Inert):
    """The forward hook of the tapped model (called also where the forward raises): tells the log that a forward
    ends."""

    def __init__(self, log: ChoiceLog) -> None:
        self.log = log

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.log.open and not torch.compiler.is_compiling():  # (a replay's counted forward under way only)
            self.log.end(failed=sys.exc_info()[0] is not None)


class _TapLeave(_Inert):
    """The forward hook of a :class:`_Tap`."""

    def __init__(self, tap: _Tap) -> None:
        self.tap = tap

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        self.tap.close()


def count_forwards(model: nn.Module, log: ChoiceLog) -> Callable[[], None]:
    """Tell ``log`` where each forward of ``model`` itself begins and ends (eager ones; not a recompute in backward);
    returns a function that stops."""
    handles = [model.register_forward_pre_hook(_Begin(log)), model.register_forward_hook(_End(log), always_call=True)]

    def stop() -> None:
        while handles:
            handles.pop().remove()

    return stop


def tap_choices(model: nn.Module, paths: Iterable[str], log: ChoiceLog, *, count: bool) -> Callable[[], None]:
    """Tap the forwards of the modules of ``model`` at ``paths`` (choosers of the tokens their routers see) into
    ``log``, and with ``count`` the forwards of ``model`` itself (where each forward's rankings start); returns a
    function that takes the taps off."""
    names = {id(m): n for n, m in model.named_modules()}
    taps: list[_Tap] = []
    counted = [count_forwards(model, log)] if count else []
    for path in dict.fromkeys(paths):
        try:
            module = model.get_submodule(path)
        except AttributeError:  # (gone since: a change on the way to the routers watches the model again)
            continue
        tap = _Tap(path, names, log)
        tap.handles = [
            module.register_forward_pre_hook(tap),
            module.register_forward_hook(_TapLeave(tap), always_call=True),
        ]
        taps.append(tap)

    def stop() -> None:
        for tap in taps:
            while tap.open:
                tap.close()
            for h in tap.handles:
                h.remove()
        taps.clear()
        while counted:
            counted.pop()()

    return stop
