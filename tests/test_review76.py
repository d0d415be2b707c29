"""A probe run's time limit leaves the interpreter as it found it, and its watchdog thread outlives any fault."""

from __future__ import annotations

import sys
import threading
import time
import traceback

import pytest


def _stacks() -> str:
    """Every thread's stack, to tell where a hung thread waits (or loops) and where the watchdog is."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)!r}:\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def _spin() -> None:  # (a loop in Python that would run for a minute)
    end = time.monotonic() + 60.0
    while time.monotonic() < end:
        pass


@pytest.mark.reliability("faults")
def test_a_stopped_probe_run_leaves_no_stop_signalled_that_hangs_a_traced_thread() -> None:
    """A stop fired at a run is taken back as the run ends. It was taken back by setting the thread's pending
    exception to none, which (CPython 3.11) leaves the interpreter's signal of a pending one set, cleared only where
    one is raised: from then on, in any thread running a trace function (a debugger, a coverage tool, a test's
    tracer), each call looped at its first instruction for ever. Seen as a hang of a traced test run after other
    tests of the same process had a probe run stopped. The stop is now replaced by one raised and taken at once."""
    from moe_replay import evidence

    with pytest.raises(evidence.ProbeTimeout):
        evidence._within(0.05, _spin)

    def called() -> int:
        return 7

    got: list[int] = []

    def traced() -> None:
        sys.settrace(lambda frame, event, arg: None)
        try:
            got.append(called())
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=traced, daemon=True)
    thread.start()
    thread.join(30.0)  # (a hang never ends)
    assert not thread.is_alive(), f"a traced call after a stopped probe run hung:\n{_stacks()}"
    assert got == [7]
    assert evidence._within(30.0, called) == 7  # (and runs go on as before)


@pytest.mark.reliability("faults")
def test_the_watchdog_outlives_a_fault_in_judging_a_run_and_still_stops_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception in the watchdog thread's loop (here judging how long a run waited) ended the thread, silently:
    every later probe run of the process went unlimited, and one that loops hung. The watchdog now keeps going, the
    faulty run stopped as one past its limit, and a thread found ended is started again."""
    from moe_replay import evidence

    class Faulty(evidence._Armed):
        __slots__ = ()

        def waited(self, now: float) -> float:
            raise RuntimeError("judging this run failed")

    monkeypatch.setattr(evidence, "_Armed", Faulty)
    with pytest.raises(evidence.ProbeTimeout):  # (the faulty one: stopped at its limit)
        evidence._within(0.05, _spin)
    monkeypatch.undo()
    began = time.monotonic()
    with pytest.raises(evidence.ProbeTimeout):  # (the next, judged as always)
        evidence._within(0.05, _spin)
    assert time.monotonic() - began < 30.0
    watcher = evidence._WATCHER
    assert watcher is not None and watcher.is_alive(), _stacks()


@pytest.mark.reliability("faults")
def test_a_watchdog_thread_found_ended_is_started_again_and_takes_over_its_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the watchdog thread ended (whatever ended it), a run handed to its queue was never stopped: the next
    run started it again, over the same queue and the runs already due."""
    from moe_replay import evidence

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    monkeypatch.setattr(evidence, "_WATCHED", evidence.queue.SimpleQueue())  # (this test's own, left to it after)
    monkeypatch.setattr(evidence, "_DUE", [])
    monkeypatch.setattr(evidence, "_WATCHER", ended)
    began = time.monotonic()
    with pytest.raises(evidence.ProbeTimeout):
        evidence._within(0.05, _spin)
    assert time.monotonic() - began < 30.0
    assert evidence._WATCHER is not ended and evidence._WATCHER.is_alive(), _stacks()
