"""Cost of capture and replay inside a CUDA-graphed decode step, as ratios to the plain graph.

One fixed-shape step (B sequences x 1 token, no KV cache) of a reference MoE with
``expert_impl="dense"`` is captured three times: session idle, capturing, replaying.
Each round replays every graph ``--steps`` times, timed with CUDA events; rounds are
interleaved and the medians are compared, since the plain step alone varies by several
percent between runs. Capture and replay graphs are also checked: the capture graph
recorded every replay in order, the replay graph forced the rows.

    python benchmarks/cuda_graph_decode.py [--batch 64 --layers 8 --experts 64 --top-k 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moe_replay as mr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--style", default="grouped_sigmoid", choices=mr.models.STYLES)
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"

    model = mr.models.build(
        args.style,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=8,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_size=args.expert_size,
        n_group=8,
        topk_group=4,
        expert_impl="dense",
    ).to("cuda", torch.bfloat16)
    steps, b = args.steps, args.batch
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = torch.randint(0, model.config.vocab_size, (steps, b, 1), device="cuda", generator=g)
    static = inputs[0].clone()
    session = mr.attach(model, capacity=steps * b)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(side)

    def graph() -> torch.cuda.CUDAGraph:
        gr = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(gr):
            model(static)
        return gr

    # routes of every step, recorded eagerly, to replay
    with session.capture(), torch.no_grad():
        for x in inputs:
            model(x)
    routes = session.routes()

    plain = graph()
    with session.capture():
        capture = graph()
    replay_ctx = session.replay(routes, strict=False)
    replay_ctx.__enter__()
    replay = graph()

    def run(gr: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in inputs:
            static.copy_(x)
            gr.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / steps  # us per step

    times: dict[str, list[float]] = {"plain": [], "capture": [], "replay": []}
    for r in range(args.rounds + 1):
        order = [("plain", plain), ("capture", capture), ("replay", replay)]
        if r % 2:
            order.reverse()
        for name, gr in order:
            if name == "capture":
                with session.capture():
                    t = run(gr)
                recorded = session.routes()
            else:
                t = run(gr)
            if r:  # round 0 warms up
                times[name].append(t)
    replay_ctx.__exit__(None, None, None)
    assert recorded.equal(routes), "the capture graph did not record every replay in order"

    base = statistics.median(times["plain"])
    dev = torch.cuda.get_device_name()
    print(
        f"{dev}, torch {torch.__version__}, {args.style}, {args.layers} MoE layers, E={args.experts}, "
        f"k={args.top_k}, batch {b}, bf16, {steps} graph replays x {args.rounds} rounds"
    )
    for name in ("plain", "capture", "replay"):
        med = statistics.median(times[name])
        lo, hi = min(times[name]), max(times[name])
        print(f"  {name:8s} {med:8.1f} us/step  ({lo:.1f}..{hi:.1f})  ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
