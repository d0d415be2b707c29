"""A session per rollout on a compiled model: ``python -m benchmarks.sessions``.

An RL loop may attach a new session for each rollout (``with mr.attach(model) as s:`` in the
loop body) instead of keeping one session with a block per rollout. On a ``torch.compile``d model
each attach must not compile anything new: dynamo guards a module's ``forward`` attribute on its
identity, and a fresh wrapper per session would fail those guards and recompile the model at every
rollout, until torch's recompile limit (past it the code runs eagerly, and ``fullgraph=True``
raises). This runs both loops on one compiled model, in one process:

* ``one session``: one session, a capture block per rollout (the reference);
* ``a session per rollout``: attach, capture one forward, detach, for every rollout.

Reported for each: the frames compiled after each rollout (from a counting backend wrapped around
the real one), the wall time of the first rollout and the median of the later ones, and that every
rollout recorded the rows an eager capture records. ``--smoke`` runs it in seconds with the eager
backend (the counts, not the times, are what it checks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import moe_replay as mr

from .harness import synchronize

__all__ = ["main", "run"]


class _Counting:
    """A ``torch.compile`` backend that counts the frames it compiles and hands them to ``backend``."""

    def __init__(self, backend: str) -> None:
        self.frames = 0
        self._backend = backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.frames += 1
        if self._backend == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self._backend)(gm, example_inputs)


def _rollouts(
    model: nn.Module, tokens: torch.Tensor, rollouts: int, *, per_rollout: bool, backend: str
) -> dict[str, Any]:
    """``rollouts`` captured forwards of ``torch.compile(model)``, in one session or one session each."""
    counter = _Counting(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    frames: list[int] = []
    times: list[float] = []
    rows: list[mr.Routes] = []
    error = None
    session = None if per_rollout else mr.attach(model)
    try:
        for i in range(rollouts):
            start = time.perf_counter()
            s = mr.attach(model) if session is None else session
            try:
                with torch.no_grad():
                    s.verify(tokens)  # (an eager forward: known at once after the first)
                    with s.capture():
                        compiled(tokens)
                    synchronize(tokens.device)
                rows.append(s.routes())
            except Exception as e:  # (fullgraph=True past the recompile limit): what a user's loop would see
                error = f"rollout {i + 1}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                break
            finally:
                if session is None:
                    s.detach()
            times.append(time.perf_counter() - start)
            frames.append(counter.frames)
    finally:
        if session is not None:
            session.detach()
    torch._dynamo.reset()
    return {"frames": frames, "times_s": times, "rows": rows, "error": error}


def run(*, device: str, rollouts: int, backend: str, layers: int) -> dict[str, Any]:
    """Both loops on one model; the figures as a dict (see the module docstring)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = mr.models.build("softmax_topk", num_layers=layers, expert_impl="dense").to(dev).eval()
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), device=dev)
    with mr.attach(model) as session, session.capture(), torch.no_grad():
        model(tokens)
    want = session.routes()
    result: dict[str, Any] = {"device": device, "backend": backend, "rollouts": rollouts, "loops": {}}
    for name, per_rollout in (("one session", False), ("a session per rollout", True)):
        got = _rollouts(model, tokens, rollouts, per_rollout=per_rollout, backend=backend)
        later = got["times_s"][1:] or got["times_s"] or [float("nan")]
        result["loops"][name] = {
            "frames_after_each_rollout": got["frames"],
            "compiled_after_the_first": got["frames"][-1] - got["frames"][0] if got["frames"] else None,
            "first_rollout_s": got["times_s"][0] if got["times_s"] else None,
            "later_rollout_median_s": statistics.median(later),
            "rows_as_eager": bool(got["rows"]) and all(r.equal(want) for r in got["rows"]),
            "error": got["error"],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rollouts", type=int, default=12, help="more than torch's recompile limit (8)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="3 rollouts, the eager backend, 1 layer")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rollouts, args.backend, args.layers = 3, "eager", 1
    result = run(device=args.device, rollouts=args.rollouts, backend=args.backend, layers=args.layers)
    for name, loop in result["loops"].items():
        first = loop["first_rollout_s"]
        print(
            f"{name:>22}: frames {loop['frames_after_each_rollout']}, first "
            f"{'-' if first is None else f'{first:.3f}'} s, later median {loop['later_rollout_median_s']:.4f} s, "
            f"rows as eager: {loop['rows_as_eager']}" + (f", stopped at {loop['error']}" if loop["error"] else "")
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, **result}, f, indent=2)
    ok = all(
        loop["rows_as_eager"] and loop["compiled_after_the_first"] == 0 and loop["error"] is None
        for loop in result["loops"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
