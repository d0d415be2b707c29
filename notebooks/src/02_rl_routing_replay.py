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
# `moe_replay.interop`: see [docs/formats.md](../docs/formats.md).)
#
# We attach a session to the engine and capture while it samples 12 new tokens for a
# batch of 8 prompts of different lengths, left-padded as generation needs them. Capture
# costs one small device write per router per forward, with no host synchronisation.

# %%
engine = copy.deepcopy(policy).to(torch.bfloat16)
engine_session = mr.attach(engine)

batch, prompt_len, new_tokens = 8, 8, 12
prompt_lengths = torch.randint(3, prompt_len + 1, (batch,))
prompt_mask = (torch.arange(prompt_len) >= prompt_len - prompt_lengths[:, None]).long()  # left padding
prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len)) * prompt_mask
with engine_session.capture():
    sequences = engine.generate(
        prompts, max_new_tokens=new_tokens, attention_mask=prompt_mask, do_sample=True,
        generator=torch.Generator().manual_seed(1),
    )
captured = engine_session.routes()
print("sequences:", tuple(sequences.shape), "| prompt lengths:", prompt_lengths.tolist())
print("captured: ", captured)

# %% [markdown]
# ## 2. Align the routes with the training batch
#
# The capture holds rows in the order the routers saw them: the prompt forward (8 x 8
# rows, padding included), then one row per sequence per decode step. The last sampled
# token is never fed back, so it has no route: 8 x 8 + 8 x 11 = 152 rows.
#
# The training forward runs over `sequences` (8 x 20 tokens, row by row), so it needs
# one route per token in that order. `mr.split_generation` cuts the capture into one
# `Routes` per sequence, aligned to its token positions; with `keep_padding=True` the
# padding positions stay in place as `-1` rows, so that `Routes.cat` gives exactly the
# rows of a forward over `sequences`. A `-1` row means "route natively": padding, and the
# last token of each sequence, whose route cannot change the loss (no later token attends
# to it and its logits predict nothing).

# %%
per_sequence = mr.split_generation(captured, attention_mask=prompt_mask, sequences=sequences, keep_padding=True)
rollout = mr.Routes.cat(per_sequence)
attention_mask = torch.cat([prompt_mask, torch.ones(batch, new_tokens, dtype=torch.long)], dim=1)
print(rollout)

# %% [markdown]
# The engine also reports the log-probability of every sampled token; these are the
# "old" log-probabilities of the importance ratio. We compute them with one forward of the
# engine, replaying its own routes.

# %%
def token_logprobs(model, sequences):
    """log p(token t+1 | tokens <= t) for every position but the last: [batch, len - 1]."""
    logits = model(sequences, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)


with torch.no_grad(), engine_session.replay(rollout):
    old_logprobs = token_logprobs(engine, sequences)

completion = torch.zeros_like(old_logprobs, dtype=torch.bool)
completion[:, prompt_len - 1 :] = True  # positions whose next token was generated

# %% [markdown]
# The routes also remember the token each row was recorded for (`rollout.token_ids`), and
# every replayed forward is checked against them. Feeding the sequences in another order
# than their routes, the misalignment that a shuffled or length-sorted minibatch causes in
# an R3 pipeline, is refused before any router reads a row; a minibatch taken with its own
# routes, in the same order, replays.

# %%
order = torch.randperm(batch, generator=torch.Generator().manual_seed(0))[:4]
try:
    with torch.no_grad(), engine_session.replay(rollout[: 4 * sequences.shape[1]]):
        engine(sequences[order], attention_mask=attention_mask[order])
except mr.TokenMismatchError as e:
    print("refused:", str(e)[:150], "...")
minibatch = mr.Routes.cat([per_sequence[i] for i in order])
with torch.no_grad(), engine_session.replay(minibatch):
    engine(sequences[order], attention_mask=attention_mask[order])
print("the minibatch with its own routes:", minibatch)

# %% [markdown]
# ## 3. The engine/trainer mismatch, before any update
#
# Attach a session to the training policy (float32) and run a plain forward over the
# rollout tokens, capturing which experts the trainer would choose on its own.
# `mr.compare` reports the R3 paper's figures: the share of router decisions that differ,
# the share of tokens that differ in at least one router, and more. Rows that are -1 on
# either side (padding, last tokens) are left out.

# %%
session = mr.attach(policy)
with torch.no_grad(), session.capture():
    free_logprobs = token_logprobs(policy, sequences)
before = mr.compare(rollout, session.routes(), labels=("engine rollout", "trainer"))
before

# %% [markdown]
# The importance ratio `exp(trainer logprob - engine logprob)` of a generated token should
# be 1 before any update. Tokens routed through other experts than the engine's carry the
# largest errors. Replaying the rollout's routes removes that part and leaves only the
# numerical noise of bf16 against float32.

# %%
with torch.no_grad(), session.replay(rollout):
    replay_logprobs = token_logprobs(policy, sequences)

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
after = mr.compare(rollout, session.routes(), labels=("rollout", "updated policy"))
after

# %% [markdown]
# `plot()` draws the mismatch per router and the expert load on each side, named by the
# `labels` given to `compare`:

# %%
fig = after.plot()
fig.set_size_inches(9, 2.8)
fig.tight_layout()
fig

# %% [markdown]
# ## 5. A training step with replay under activation checkpointing
#
# Large models train with activation checkpointing: each layer's forward runs a second
# time during backward to rebuild its activations. That recompute must use the same
# experts as the forward, or the gradient is computed for a different network.
# moe_replay detects the recompute (it runs inside the autograd engine) and hands each
# router the very rows its forward used. Nothing to switch by hand, and every row is
# counted once in the end-of-replay check.
#
# The reference models checkpoint every layer with `torch.utils.checkpoint` when
# `config.checkpointing` is `"non_reentrant"` or `"reentrant"`; an HF model has its own
# gradient-checkpointing switch (notebook 4), and your own code can wrap its layers in
# `torch.utils.checkpoint.checkpoint`. To see the recompute happen we count how often each
# router runs, and we capture inside the replay to record what was forced.
#
# **Load balancing.** A model's own auxiliary loss usually runs its own top-k again on the
# router logits, outside the router; under replay it would count the experts the current
# router *would* pick, not the ones the forward used. `mr.load_balancing_loss` takes the
# experts actually used and the current router probabilities, which `session.keep_scores()`
# collects during the forward (with their gradients).

# %%
policy.config.checkpointing = "non_reentrant"
runs = dict.fromkeys(session.names, 0)


def count_run(module, args, output, name):
    runs[name] += 1


counters = [policy.get_submodule(n).register_forward_hook(partial(count_run, name=n)) for n in session.names]

with session.replay(rollout), session.capture(), session.keep_scores() as kept:
    logprobs = token_logprobs(policy, sequences)
    aux_loss = mr.load_balancing_loss(kept.scores, kept.indices, mask=attention_mask)
    loss = ppo_loss(logprobs, old_logprobs, advantages, completion) + 0.01 * aux_loss
    loss.backward()
forced = session.routes()
optimizer.step()
optimizer.zero_grad()
for c in counters:
    c.remove()

print("router runs (forward + recompute):", runs)
print(f"load-balancing loss {aux_loss.item():.2f} ({cfg.top_k} when the load is perfectly balanced)")
replayed = mr.compare(rollout, forced, labels=("rollout", "replayed"))
assert all(n == 2 for n in runs.values()) and replayed.overall == 0
replayed

# %% [markdown]
# ## Expert load
#
# How many token slots each expert received in the rollout, per layer:

# %%
load = torch.stack([torch.bincount(r[r >= 0], minlength=cfg.num_experts) for r in rollout.per_layer()])
fig, ax = plt.subplots(figsize=(6, 2.2))
im = ax.imshow(load, aspect="auto", cmap="viridis")
ax.set_yticks(range(len(rollout.names)), [n.split(".mlp")[0] for n in rollout.names])
ax.set_xlabel("expert")
ax.set_ylabel("layer")
ax.set_title("token slots per expert in the rollout")
fig.colorbar(im, ax=ax, label="token slots")
plt.show()

session.detach()
engine_session.detach()
