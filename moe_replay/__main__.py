"""Command line: ``python -m moe_replay {demo,inspect}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import models
from .discovery import find_routers, format_sites
from .metrics import compare
from .routes import Routes
from .session import attach


def _mismatch(a: Routes, b: Routes) -> tuple[float, list[float]]:
    """Fraction of router decisions (the set of k experts) that differ, overall and per router."""
    c = compare(a, b)
    return c.overall, [float(x) for x in c.per_layer]


def demo(style: str = "softmax_topk", new_tokens: int = 16, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Capture while generating, perturb the routers, replay; print and return the figures."""
    torch.manual_seed(seed)
    model = models.build(style, seed=seed, num_layers=4, num_experts=16, top_k=min(2, 16)).to(device)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    session = attach(model)
    print(f"model: reference MoE '{style}', {cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}")
    print(session.table())
    print()

    # 1. rollout: capture while generating (the last sampled token is never routed)
    with session.capture():
        seq = model.generate(prompt, max_new_tokens=new_tokens)
    rollout = session.routes()
    tokens = seq[:, :-1]
    print(f"1. captured {rollout.num_tokens} tokens x {rollout.num_layers} routers while generating {new_tokens}")
    print(f"   {rollout}")

    # 2. policy update stand-in: perturb the router weights, look at the drift
    with torch.no_grad():
        for s in session.sites:
            w = s.module.weight  # type: ignore[union-attr]
            w.add_(0.3 * w.std() * torch.randn_like(w))
    with session.capture(), torch.no_grad():
        model(tokens)
    free = session.routes()
    drift, per_layer = _mismatch(rollout, free)
    print(f"2. perturbed the routers: a free forward routes {drift:.1%} of decisions differently")
    print("   per router: " + ", ".join(f"{d:.0%}" for d in per_layer))

    # 3. replay: forced routes, gradients into the routers
    model.zero_grad()
    with session.replay(rollout), session.capture():
        loss = model(tokens, labels=tokens).loss
        loss.backward()
    forced = session.routes()
    replay_drift, _ = _mismatch(rollout, forced)
    grads = [float(s.module.weight.grad.norm()) for s in session.sites]  # type: ignore[union-attr]
    print(f"3. replayed the rollout's routes: {replay_drift:.1%} of decisions differ, loss {loss.item():.4f}")
    print("   router gradient norms: " + ", ".join(f"{g:.2e}" for g in grads))
    session.detach()
    ok = replay_drift == 0.0 and all(g > 0 for g in grads)
    print()
    print("OK: replay reproduced every recorded route and gradients reached every router" if ok else "FAILED")
    return {"free_drift": drift, "replay_drift": replay_drift, "min_grad": min(grads)}


def inspect_model(target: str) -> str:
    """The router table of a reference model style."""
    if target in models.STYLES:
        return format_sites(find_routers(models.build(target)))
    raise SystemExit(f"unknown model '{target}': use one of {', '.join(models.STYLES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m moe_replay``."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_replay",
        description="Capture and replay MoE routing. Commands: demo (the whole loop on a reference MoE), "
        "inspect (print the routers a model has).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="capture while generating, perturb the routers, replay with gradients")
    p.add_argument("--style", default="softmax_topk", choices=models.STYLES, help="router style of the reference MoE")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    q = sub.add_parser("inspect", help="print the router table of a model")
    q.add_argument("model", help=f"a reference style ({', '.join(models.STYLES)})")
    args = parser.parse_args(argv)
    if args.command == "demo":
        out = demo(args.style, args.new_tokens, args.seed, args.device)
        return 0 if out["replay_drift"] == 0.0 and out["min_grad"] > 0 else 1
    print(inspect_model(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
