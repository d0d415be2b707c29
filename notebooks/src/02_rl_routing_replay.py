# %% [markdown]
# # 2. Routing replay for RL, end to end
#
# In RL on an MoE language model, an **inference engine** (vLLM, SGLang) generates the
# rollouts and a **training stack** computes the policy gradient. The two compute the
# router scores with different kernels and precisions, so they pick different experts for
# a share of the tokens (about 10% of router decisions for Qwen3-30B-A3B in the R3 paper,
# arXiv 2510.11370). Once the policy takes an optimizer step, the routing drifts further.
# The trainer then evaluates the rollout tokens through *other experts* than the ones that
# generated them, the importance ratios blow up and training collapses.
#
# **Routing replay** (R3) records the experts the engine chose and forces the trainer to
# use them, while the combine weights come from the trainer's current router scores so
# that the router still learns. This notebook runs the whole loop on a small MoE on CPU:
#
# 1. generate rollouts with an "engine" copy of the policy, capturing its routing;
# 2. align the captured routes with the tokens of the training batch;
# 3. measure the routing mismatch between engine and trainer;
# 4. take one optimizer step (the policy update) and measure the drift it causes;
# 5. take a training step **with replay under activation checkpointing**, and check that
#    it used exactly the rollout's experts.
#
# Install: `pip install -e ".[notebooks]"` from a clone of the repository.

# %%
import copy
from functools import partial

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import moe_replay as mr

torch.manual_seed(0)
policy = mr.models.build("softmax_topk", num_layers=4, num_experts=16, top_k=2, seed=0)
cfg = policy.config
print(f"policy: {cfg.num_layers} MoE layers, {cfg.num_experts} experts, top-{cfg.top_k}, vocab {cfg.vocab_size}")

# %% [markdown]
# ## 1. Rollouts from the engine
#
# Our engine is a **bfloat16 copy** of the policy: the same weights computed in another
# precision, which is one of the sources of the engine/trainer mismatch. (With vLLM or
# SGLang you would ask the engine for its routed experts instead, and convert them with
# `moe_replay.interop`.)
#
# We attach a session to the engine and capture while it samples 12 new tokens for a
# batch of 8 prompts. Capture costs one small device write per router per forward: no
# host synchronisation, so it also runs inside CUDA graphs.

# %%
engine = copy.deepcopy(policy).to(torch.bfloat16)
engine_session = mr.attach(engine)

batch, prompt_len, new_tokens = 8, 6, 12
prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len))
with engine_session.capture():
    sequences = engine.generate(
        prompts, max_new_tokens=new_tokens, do_sample=True, generator=torch.Generator().manual_seed(1)
    )
captured = engine_session.routes()
print("sequences:", tuple(sequences.shape))
print("captured: ", captured)

# %% [markdown]
# ## 2. Align the routes with the training batch
#
# The capture holds rows in the order the routers saw them: the prompt forward (8 x 6
# rows), then one row per sequence per decode step. The last sampled token is never fed
# back, so it has no route: 8 x 6 + 8 x 11 = 136 rows.
#
# The training forward runs over `sequences` (8 x 18 tokens, row by row), so it needs
# one route per token in that order. The last token of each sequence gets a `-1` row,
# which means "route natively": its route cannot change the loss, since no later token
# attends to it and its logits predict nothing.

# %%
def training_order(routes, batch, prompt_len, new_tokens):
    """Routes of a batched generate() in the token order of a forward over its output."""
    b = torch.arange(batch)[:, None]
    t = torch.arange(prompt_len + new_tokens)[None, :]
    row = torch.where(t < prompt_len, b * prompt_len + t, batch * prompt_len + (t - prompt_len) * batch + b)
    last = t == prompt_len + new_tokens - 1
    arr = routes.to_numpy()[row.clamp(max=routes.num_tokens - 1).flatten().numpy()]
    arr[last.expand(batch, -1).flatten().numpy()] = -1
    return mr.Routes.from_numpy(arr, names=routes.names, num_experts=routes.experts_per_layer)


rollout = training_order(captured, batch, prompt_len, new_tokens)
print(rollout)

# %% [markdown]
# The engine also reports the log-probability of every sampled token; these are the
# "old" log-probabilities of the importance ratio. We compute them with one forward of the
# engine, replaying its own routes.

# %%
def token_logprobs(model, sequences):
    """log p(token t+1 | tokens <= t) for every position but the last: [batch, len - 1]."""
    logits = model(sequences).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)


with torch.no_grad(), engine_session.replay(rollout):
    old_logprobs = token_logprobs(engine, sequences)

completion = torch.zeros_like(old_logprobs, dtype=torch.bool)
completion[:, prompt_len - 1 :] = True  # positions whose next token was generated

# %% [markdown]
# ## 3. The engine/trainer mismatch, before any update
#
# Attach a session to the training policy (float32) and run a plain forward over the
# rollout tokens, capturing which experts the trainer would choose on its own. Then run
# the same forward replaying the rollout's routes.

# %%
session = mr.attach(policy)


def mismatch(a, b):
    """Per router: the share of tokens whose set of k experts differs (-1 rows skipped)."""
    out = []
    for x, y in zip(a.per_layer(), b.per_layer(), strict=True):
        keep = (x >= 0).all(-1) & (y >= 0).all(-1)
        same = (x[keep].sort(-1).values == y[keep].sort(-1).values).all(-1)
        out.append(1 - same.float().mean().item())
    return torch.tensor(out)


with torch.no_grad(), session.capture():
    free_logprobs = token_logprobs(policy, sequences)
before = mismatch(rollout, session.routes())
print(f"routing mismatch engine vs trainer: {before.mean():.1%} of decisions (per router: "
      + ", ".join(f"{m:.1%}" for m in before) + ")")

with torch.no_grad(), session.replay(rollout):
    replay_logprobs = token_logprobs(policy, sequences)

# %% [markdown]
# The importance ratio `exp(trainer logprob - engine logprob)` of a generated token should
# be 1 before any update. Tokens routed through other experts than the engine's carry the
# largest errors; replay removes that part and leaves only the numerical noise of bf16
# against float32.

# %%
for label, logprobs in (("free routing", free_logprobs), ("replay", replay_logprobs)):
    err = (logprobs - old_logprobs).abs()[completion]
    print(f"|log ratio| with {label:12}: mean {err.mean():.5f}, max {err.max():.5f}")

# %% [markdown]
# ## 4. One optimizer step: the policy update
#
# A toy task: the reward of a sequence is the share of its generated tokens that fall in
# the lower half of the vocabulary. Advantages are normalised within the batch (as in
# GRPO) and the loss is PPO's clipped surrogate. As in R3, the training forward replays the
# rollout's routes.

# %%
rewards = (sequences[:, prompt_len:] < cfg.vocab_size // 2).float().mean(dim=1)
advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-6))[:, None]


def ppo_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = (logprobs - old_logprobs).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -(surrogate * mask).sum() / mask.sum()


optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
policy.train()
with session.replay(rollout):
    loss = ppo_loss(token_logprobs(policy, sequences), old_logprobs, advantages, completion)
    loss.backward()
print(f"mean reward {rewards.mean():.3f}; router gradient norms:",
      [f"{policy.get_submodule(n).weight.grad.norm():.2e}" for n in session.names])
optimizer.step()
optimizer.zero_grad()

# %% [markdown]
# The updated policy now routes the same tokens differently: the drift grows with every
# step taken on one batch of rollouts (several PPO epochs or minibatches).

# %%
with torch.no_grad(), session.capture():
    token_logprobs(policy, sequences)
after = mismatch(rollout, session.routes())
print(f"routing mismatch after one step: {after.mean():.1%} of decisions")

fig, ax = plt.subplots(figsize=(6, 2.4))
pos = torch.arange(len(before))
ax.bar(pos - 0.2, before * 100, width=0.4, label="before the update")
ax.bar(pos + 0.2, after * 100, width=0.4, label="after one step")
ax.set_xticks(pos, [n.split(".mlp")[0] for n in rollout.names])
ax.set_ylabel("decisions differing (%)")
ax.set_title("routing mismatch against the rollout, per layer")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 5. A training step with replay under activation checkpointing
#
# Large models train with activation checkpointing: each layer's forward runs a second
# time during backward to rebuild its activations. That recompute must use the same
# experts as the forward, or the gradient is computed for a different network.
# moe_replay detects the recompute (it runs inside the autograd engine) and hands each
# router the very rows its forward consumed. Nothing to switch by hand, and every row is
# counted once in the end-of-replay check.
#
# Here we checkpoint every decoder layer with `torch.utils.checkpoint`, count how often
# each router runs, and capture inside the replay to record what was forced.

# %%
from torch.utils.checkpoint import checkpoint

for layer in policy.layers:
    layer.forward = lambda *args, _inner=layer.forward: checkpoint(_inner, *args, use_reentrant=False)

runs = dict.fromkeys(session.names, 0)


def count_run(module, args, output, name):
    runs[name] += 1


counters = [policy.get_submodule(n).register_forward_hook(partial(count_run, name=n)) for n in session.names]

with session.replay(rollout), session.capture():
    logprobs = token_logprobs(policy, sequences)
    loss = ppo_loss(logprobs, old_logprobs, advantages, completion)
    loss.backward()
forced = session.routes()
optimizer.step()
optimizer.zero_grad()
for c in counters:
    c.remove()

print("router runs (forward + recompute):", runs)
print(f"routing mismatch under replay: {mismatch(rollout, forced).mean():.1%} of decisions")
assert all(n == 2 for n in runs.values()) and mismatch(rollout, forced).max() == 0

# %% [markdown]
# ## Expert load
#
# How many token slots each expert received in the rollout, per layer. A router's own
# load-balancing loss usually recomputes its top-k from the logits, so it does not see the
# replayed routes; compute it from the routes instead.

# %%
load = torch.stack([torch.bincount(r[r >= 0], minlength=cfg.num_experts) for r in rollout.per_layer()])
fig, ax = plt.subplots(figsize=(6, 2.2))
im = ax.imshow(load, aspect="auto", cmap="viridis")
ax.set_yticks(range(len(rollout.names)), [n.split(".mlp")[0] for n in rollout.names])
ax.set_xlabel("expert")
ax.set_title("token slots per expert in the rollout")
fig.colorbar(im, ax=ax)
plt.show()

session.detach()
engine_session.detach()
