# %% [markdown]
# # 3. Your own MoE: custom routers, `include=` and adapters
#
# Research code rarely names its router `gate` or `router`. This notebook writes a small
# MoE from scratch, with two router designs that the built-in patterns do not know, and
# shows how to point `moe_replay` at them:
#
# 1. a **noisy top-k dispatcher** (the router of Shazeer et al. 2017, as in nanoGPT-MoE
#    variants) with an unusual name: found with `include=`;
# 2. a **score head** that only computes scores, with the top-k in the MoE block, and a
#    logging call that looks like a decision: an `Adapter` says where the decision is.
#
# The only thing moe_replay needs from a router is that its decision is made by `topk`
# (or `argmax` / `max` calls, one per slot) over a `[tokens, num_experts]` score tensor;
# which call that is, it establishes itself by changing each candidate's choice once.

# %%
import torch
import torch.nn.functional as F
from torch import nn

import moe_replay as mr

torch.manual_seed(0)


class Dispatcher(nn.Module):
    """Noisy top-k gating: clean logits plus learned-scale noise while training."""

    def __init__(self, dim: int, n_experts: int, k: int) -> None:
        super().__init__()
        self.w_clean = nn.Linear(dim, n_experts, bias=False)
        self.w_noise = nn.Linear(dim, n_experts, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w_clean(x)
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.w_noise(x))
        top, idx = logits.topk(self.k, dim=-1)  # <- the decision moe_replay intercepts
        return top.softmax(dim=-1), idx


class ScoreHead(nn.Module):
    """Only scores (the block picks the experts), and a statistic for the training logs."""

    def __init__(self, dim: int, n_experts: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(n_experts, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(x @ self.proj.T)
        self.peak = scores.max(dim=-1).values.mean().detach()  # how confident the router is
        return scores


class SparseLayer(nn.Module):
    def __init__(self, dim: int, n_experts: int, k: int, router: str) -> None:
        super().__init__()
        self.k = k
        if router == "dispatcher":
            self.selector = Dispatcher(dim, n_experts, k)
        else:
            self.scores = ScoreHead(dim, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "selector"):
            weights, idx = self.selector(x)
        else:
            s = self.scores(x)
            top, idx = torch.topk(s, self.k, dim=-1)  # the decision happens here, in the block
            weights = top / top.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, weights[token, slot, None] * expert(x[token]))
        return x + out


class TinyMoE(nn.Module):
    def __init__(self, router: str, dim: int = 32, n_experts: int = 8, k: int = 2, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SparseLayer(dim, n_experts, k, router) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)


x = torch.randn(64, 32)  # 64 tokens
y = torch.randn(64)

# %% [markdown]
# ## A router with an unusual name: `include=`
#
# Nothing called `Dispatcher` / `selector` looks like a router to the built-in patterns,
# so `find_routers` says so and tells you what to do:

# %%
model = TinyMoE("dispatcher").eval()
try:
    mr.find_routers(model)
except mr.RouterNotFoundError as e:
    print(e)

# %% [markdown]
# `include=` takes a module path, a glob, a compiled regex, a class, a predicate
# `(name, module) -> bool`, or a list of those. Nothing else is needed: attribute names and
# weight shapes are only hints, and the router's first forward establishes which call
# decides, with its `k` and `E` (`session.verify(x)` prints it). `num_experts=` and `top_k=`
# may still be given; a decision that contradicts them is refused.

# %%
try:
    mr.find_routers(model, include="blocks.*.selector")
except mr.RouterNotFoundError as e:
    print(e)
print()
print(mr.format_sites(mr.find_routers(model, include=Dispatcher, num_experts=8)))

# %% [markdown]
# Capture in eval mode (no noise), then replay in training mode: the noise changes the
# scores, but every router gets the recorded experts back, with weights computed from its
# current (noisy) scores, and the gradient reaches both of its weight matrices.

# %%
session = mr.attach(model, include=Dispatcher, num_experts=8)
with session.capture():
    model(x)
routes = session.routes()

model.train()
with session.capture():
    model(x)
print("a free training forward (with noise) picks the recorded experts:", session.routes() == routes)

with session.replay(routes), session.capture():
    loss = F.mse_loss(model(x), y)
    loss.backward()
assert session.routes() == routes
print("a replayed training forward picks them")
sel = model.blocks[0].selector
print(f"grad norms of blocks.0.selector: w_clean {sel.w_clean.weight.grad.norm():.3f}, "
      f"w_noise {sel.w_noise.weight.grad.norm():.3f}")
session.detach()

# %% [markdown]
# ## The top-k is in the block: an `Adapter`
#
# `ScoreHead` returns scores and the block calls `torch.topk`. Interception is scoped to
# one module's forward (that is what keeps it from catching unrelated calls). When a
# router's forward contains no decision call at all, moe_replay sees that and intercepts
# its block instead. This head, though, calls `max(dim=-1)` for its logs, so it is taken at
# its word and intercepted in its own forward. There the probe of the first forward finds
# that changing the `max`'s choice changes nothing: no call of the head decides. It does
# not pass silently: the first forward raises, lists the calls it saw, and nothing is
# recorded or forced.

# %%
model = TinyMoE("scores").eval()
print(mr.format_sites(mr.find_routers(model, include="blocks.*.scores")))
session = mr.attach(model, include="blocks.*.scores")
try:
    with session.capture():
        model(x)
except mr.UnsupportedRouterError as e:
    print("\n" + str(e))
session.detach()

# %% [markdown]
# An `Adapter` says how to intercept a family of routers, matched by a predicate.
# `scope="parent"` intercepts the forward of the module that holds the router (here the
# `SparseLayer`), while the router still names the routes; `decision="topk"` limits the
# search to `topk` calls (the probe would find it anyway: the logging `max` changes
# nothing). The table shows which adapter applies, and `verify` which call decides. (A bare `nn.Linear` gate gets the parent scope automatically: that is
# the built-in `linear-gate` adapter.)

# %%
score_head = mr.Adapter(
    "score-head", match=lambda name, m: isinstance(m, ScoreHead), scope="parent", decision="topk"
)
session = mr.attach(model, include=ScoreHead, adapters=[score_head])
print(session.table())
print(session.verify(x))

with session.capture():
    reference = model(x)
routes = session.routes()
with session.replay(routes):
    replayed = model(x)
assert torch.equal(reference, replayed)
print("\nreplay reproduces the forward bit for bit")

# %% [markdown]
# Perturb the score heads, as a training step would, then run a training forward and
# backward under replay: the recorded experts are used, and gradients flow into the heads
# through the gathered scores.

# %%
with torch.no_grad():
    for site in session.sites:
        site.module.proj.add_(0.05 * torch.randn_like(site.module.proj))
with session.capture():
    model(x)
free = session.routes()
print(f"free forward after the change: {mr.compare(routes, free).overall:.0%} of the router decisions differ")

with session.replay(routes), session.capture():
    loss = F.mse_loss(model(x), y)
    loss.backward()
assert session.routes() == routes
print("replay forced the recorded experts")
print("score-head grad norms:", [f"{s.module.proj.grad.norm():.3f}" for s in session.sites])
session.detach()

# %% [markdown]
# ## Refusing what cannot be replayed
#
# An adapter can also *refuse* a family: `Adapter(name, match, unsupported="why")`.
# `attach` then raises with that reason instead of installing anything, the right answer
# for routers whose weights are not a function of the scores at the chosen experts
# (PhiMoE's sparsemixer, fused router kernels).

# %%
refuse = mr.Adapter("fused-kernel", match=lambda n, m: isinstance(m, ScoreHead),
                    unsupported="this router runs in a fused kernel that moe_replay cannot see")
try:
    mr.attach(model, include=ScoreHead, adapters=[refuse])
except mr.UnsupportedRouterError as e:
    print(e)
