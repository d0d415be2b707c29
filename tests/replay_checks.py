"""The four replay checks, on any model: shared by the HF sweep and the non-HF router styles.

:func:`check_model` takes a model, its inputs and its MoE blocks (counted without moe_replay)
and fills a :class:`FamilyResult`:

1. ``capture``: ``find_routers`` finds exactly one router per MoE block and none elsewhere, and a
   capture records rows for every router;
2. ``replay``: replaying the captured routes gives bit-identical logits;
3. ``forced``: after perturbing the router weights a free forward chooses other experts, while a
   replay (captured again) chooses exactly the recorded ones;
4. ``grad``: under replay the loss's gradient reaches every router's weight.

A model whose routers cannot be replayed exactly must be refused by ``attach`` with a reason.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import moe_replay as mr

CHECKS = ("capture", "replay", "forced", "grad")
SEED = 0


@dataclass
class FamilyResult:
    """One row of the support matrix."""

    model_type: str
    status: str  # pass | fail | refused | no-build | not-routed | no-model
    model_class: str = ""
    router_class: str = ""
    num_experts: str = ""
    top_k: str = ""
    routers: int = 0
    checks: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(CHECKS))
    notes: str = ""
    seconds: float = 0.0

    @property
    def built(self) -> bool:
        return self.status in ("pass", "fail", "refused")

    @property
    def ok(self) -> bool:
        """Passed all four checks, or was refused at attach with a reason."""
        return self.status in ("pass", "refused")


@dataclass
class Built:
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    blocks: dict[str, int]
    fallback: str = ""  # why a preferred model class of the type was not used


# ----------------------------------------------------------------------- counting MoE blocks
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def expert_count(m: nn.Module) -> int | None:
    """How many experts a container holds: its attribute, its children of one class, or the leading
    dimension of its 3-D weights (its own or its layers', as Aria's grouped GEMM layers)."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "total_experts"):
        v = getattr(m, key, None)
        if _int(v):
            return v
    if isinstance(m, nn.ModuleList | nn.ModuleDict):
        classes = [type(c) for c in m.children()]
        return max((classes.count(c) for c in set(classes)), default=0)
    return next((int(p.shape[0]) for p in m.parameters() if p.dim() == 3), None)


def _looks_like_experts(name: str, m: nn.Module) -> bool:
    attr, cls = name.rsplit(".", 1)[-1].lower(), type(m).__name__.lower()
    named = "expert" in attr and "shared" not in attr
    typed = re.search(r"experts$", cls) is not None and "shared" not in cls
    return (named or typed) and (expert_count(m) or 0) >= 2


def _containers(model: nn.Module) -> dict[str, nn.Module]:
    """Expert containers that hold no other container (a ``JetMoeMoA`` is a block, not a container)."""
    found = {n: m for n, m in model.named_modules() if n and _looks_like_experts(n, m)}
    return {n: m for n, m in found.items() if not any(o.startswith(n + ".") for o in found)}


def _router_shaped(block: nn.Module, skip: set[int], count: int) -> bool:
    """Does the block own a 2-D parameter with a row per expert (plus a few null experts at most)?"""
    for name, p in block.named_parameters():
        if id(p) in skip or "shared" in name.lower():
            continue
        if p.dim() == 2 and count <= p.shape[0] <= 2 * count:
            return True
    return False


def _product_key_blocks(model: nn.Module) -> dict[str, int]:
    """Blocks whose experts are rows of two or more equal embedding tables (Doge's CDMoE, PEER),
    scored by a 2-D weight with one row per half-key: 2 * isqrt(E) rows."""
    out = {}
    for name, m in model.named_modules():
        if any(isinstance(c, nn.ModuleList) for c in m.children()):
            continue  # a model holding its layers, with token embeddings: not a block
        rows = [c.num_embeddings for c in m.children() if isinstance(c, nn.Embedding)]
        for n in set(rows):
            if rows.count(n) >= 2 and n >= 4:
                keys = 2 * math.isqrt(n)
                if any(p.dim() == 2 and p.shape[0] == keys for p in m.parameters()):
                    out[name] = n
    return out


def moe_blocks(model: nn.Module) -> dict[str, int]:
    """The routed MoE blocks of ``model``, found without moe_replay: name -> expert count.

    A block is the parent of an expert container (a module named like ``experts`` or of an
    ``*Experts`` class holding E >= 2 experts) that also owns, outside its containers and shared
    experts, a 2-D parameter with about one row per expert: the router's weight. Product-key
    blocks (experts as embedding rows) count too.
    """
    containers = _containers(model)
    modules = dict(model.named_modules())
    out: dict[str, int] = _product_key_blocks(model)
    for name, c in containers.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        inside = {id(p) for n, m in containers.items() if n.startswith(parent + ".") for p in m.parameters()}
        count = expert_count(c) or 0
        if parent not in out and _router_shaped(modules[parent], inside, count):
            out[parent] = count
    return out


def has_experts(model: nn.Module) -> bool:
    return bool(_containers(model)) or bool(_product_key_blocks(model))


# ----------------------------------------------------------------------- the checks
def short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {msg[:limit]}{where}"


# ----------------------------------------------------------------------- the checks
def _logits(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def _router_params(site: mr.RouterSite) -> list[nn.Parameter]:
    assert site.module is not None
    return [p for p in site.module.parameters() if p.is_floating_point()]


def perturb(sites: list[mr.RouterSite], seed: int = 1, scale: float = 2.0) -> None:
    """Add noise to every router parameter (a zero-initialised router gets unit noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in sites:
            for p in _router_params(s):
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_((scale * max(std, 0.05) * torch.randn(p.shape, generator=g)).to(p))


def _site_of_block(block: str, sites: list[mr.RouterSite]) -> list[mr.RouterSite]:
    prefix = block + "." if block else ""
    return [s for s in sites if s.name.startswith(prefix) or s.name == block]


def _check_discovery(built: Built, sites: list[mr.RouterSite]) -> str:
    """'' when there is exactly one router per MoE block and none elsewhere, else what is wrong."""
    problems = []
    claimed: set[str] = set()
    # deepest blocks first: a block nested in another claims its own router
    for block in sorted(built.blocks, key=lambda b: -b.count(".")):
        mine = [s for s in _site_of_block(block, sites) if s.name not in claimed]
        if len(mine) != 1:
            problems.append(f"{block}: {len(mine)} routers")
        claimed.update(s.name for s in mine)
    stray = [s.name for s in sites if s.name not in claimed]
    if stray:
        problems.append(f"routers outside MoE blocks: {stray[:3]}")
    return "; ".join(problems)


def forward(built: Built) -> torch.Tensor:
    """The model's logits (or last hidden state) on the sweep's inputs, without a KV cache."""
    kwargs = dict(built.inputs)
    if "use_cache" in inspect.signature(built.model.forward).parameters:
        kwargs["use_cache"] = False
    torch.manual_seed(SEED)  # models that sample (diffusion noise, jitter) sample the same each time
    return _logits(built.model(**kwargs))


def check_model(name: str, built: Built) -> FamilyResult:
    """Run the four checks on ``built``; never raises (a crash is a failed check, with its cause)."""
    t0 = time.perf_counter()
    res = FamilyResult(name, "fail", model_class=type(built.model).__name__)
    if built.fallback:
        res.notes = f"built as {res.model_class} ({built.fallback})"
    try:
        _check(built, res)
    except Exception as e:
        res.status = "fail"
        res.notes = join(res.notes, short(e))
    res.seconds = time.perf_counter() - t0
    return res


def _check(built: Built, res: FamilyResult) -> None:
    model = built.model
    sites = mr.find_routers(model)
    res.routers = len(sites)
    res.router_class = ", ".join(sorted({s.module_class for s in sites}))
    res.num_experts = ", ".join(str(e) for e in sorted({s.num_experts for s in sites}))
    res.top_k = ", ".join(str(k) for k in sorted({s.top_k for s in sites}))
    adapters = sorted({s.adapter for s in sites if s.adapter != "generic"})
    if adapters:
        res.notes = join(res.notes, "adapter: " + ", ".join(adapters))
    wrong = _check_discovery(built, sites)
    if wrong:
        res.checks["capture"] = False
        res.notes = join(res.notes, "discovery: " + wrong)
        return
    try:
        session = mr.attach(model, capacity=1 << 14)
    except mr.UnsupportedRouterError as e:
        res.status = "refused"
        res.notes = join(res.notes, "refused: " + " ".join(str(e).split("\n")[1].split()))
        return
    with session:
        _four_checks(built, session, res)
    res.status = "pass" if all(res.checks.values()) else "fail"


def join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _has_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and float(p.grad.abs().max()) > 1e-7


def _four_checks(built: Built, session: mr.Session, res: FamilyResult) -> None:
    sites = list(session.sites)
    with torch.no_grad():
        with session.capture():
            ref = forward(built)
        recorded = session.routes(allow_silent=True)
        silent = [n for n, t in zip(recorded.names, recorded.tokens_per_layer, strict=True) if t == 0]
        # experts of another modality (an image/audio MoE beside the text one) see no token of a text batch
        other = [n for n in silent if re.search(r"vision|visual|image|audio|speech", n)]
        if other:
            res.notes = join(res.notes, f"{len(other)} routers of another modality idle on text")
        res.checks["capture"] = len(other) == len(silent) < len(recorded.names)
        with session.replay(recorded):
            out = forward(built)
        res.checks["replay"] = torch.equal(ref, out)
        perturb(sites)
        with session.capture():
            forward(built)
        free = session.routes(allow_silent=True)
        with session.replay(recorded), session.capture():
            forward(built)
        forced = session.routes(allow_silent=True)
    res.checks["forced"] = (not free.equal(recorded)) and forced.equal(recorded)
    if not res.checks["forced"]:
        res.notes = join(res.notes, "perturbation changed no decision" if free.equal(recorded) else "not forced")
    built.model.zero_grad(set_to_none=True)
    with session.replay(recorded):
        logits = forward(built)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits.float() * weights).sum().backward()
    active = {n for n, t in zip(recorded.names, recorded.tokens_per_layer, strict=True) if t}
    missing = [s.name for s in sites if s.name in active and not any(_has_grad(p) for p in _router_params(s))]
    res.checks["grad"] = not missing
    if missing:
        res.notes = join(res.notes, f"no router gradient: {missing[:2]}")
