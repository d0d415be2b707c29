# %% [markdown]
# # 5. Routing replay in TRL's GRPOTrainer
#
# TRL's `GRPOTrainer` samples completions with the policy, then trains on them for
# `num_iterations` passes. Between the rollout and those passes the weights move, and a
# Mixture-of-Experts router can then send a token to other experts than the ones that
# produced it. `moe_replay.integrations.trl.RoutingReplayGRPOTrainer` records the experts of
# every rollout token while `generate()` runs and forces them in every later forward over
# those completions (routing replay, R2; with vLLM it reads vLLM's own routes, R3).
#
# This notebook trains a tiny random Qwen3-MoE twice, with and without replay, and plots
# what the trainer logs every step. Everything is local and runs on a CPU in well under a
# minute. It needs TRL (`pip install "moe_replay[trl]"`); the test suite skips it without.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

try:
    import trl
except ImportError:
    raise SystemExit("This notebook needs TRL: pip install 'moe_replay[trl]'") from None

import random
import tempfile
import warnings

import datasets
import matplotlib.pyplot as plt
import numpy as np
import tokenizers
import torch
import transformers
from transformers import PrinterCallback

from moe_replay.integrations.trl import RoutingReplayGRPOTrainer

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames gradient_checkpointing options
torch.set_num_threads(1)
print("trl", trl.__version__, "| transformers", transformers.__version__)

# %% [markdown]
# ## The setup
#
# A word-level tokenizer built in memory (30 words, `<pad>`, `<eos>`), prompts of 2 to 6
# random words, and a toy reward: the share of the completion's words that are `w3`, `w4`
# or `w5`. The policy is a 4-layer Qwen3-MoE with 8 experts, top-2; its router weights are
# drawn a little wider than the default (`initializer_range=0.1`) so that the routers have
# preferences to lose. Each model gets its own config object: TRL switches `use_cache`
# in the config it trains, and a shared one would leak into the other run.

# %%
words = [f"w{i}" for i in range(30)]
vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="<pad>", eos_token="<eos>")

rng = random.Random(0)
prompts = datasets.Dataset.from_dict(
    {"prompt": [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(64)]}
)


def reward(completions, **_):
    return [sum(w in ("w3", "w4", "w5") for w in c.split()) / max(1, len(c.split())) for c in completions]


def policy():
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, initializer_range=0.1,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


# %% [markdown]
# ## The three lines
#
# The trainer is TRL's, with one more argument. `routing_replay="replay"` forces the
# rollout's experts; `"measure"` routes freely but logs the same figures, which makes it
# the run without replay here. `verify_replay=True` also captures every replayed forward
# and checks with `compare()` that it used every forced expert (it raises otherwise).
#
# Each generation batch (16 completions: 4 prompts, 4 completions each) is trained on in
# two micro-batches, twice (`num_iterations=2`): a new rollout every 4 steps, and 3 steps
# out of 4 train on completions sampled by older weights.

# %%
def train(mode, steps=24):
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
            steps_per_generation=2, num_iterations=2, max_steps=steps, learning_rate=2e-3,
            lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tokenizer,
            routing_replay=mode, verify_replay=(mode == "replay"),
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the logs are plotted below instead
        trainer.train()
        trainer.detach_routing_replay()
    return trainer.state.log_history[:-1]  # one entry per step; the last one is the run summary


runs = {"replay": train("replay"), "no replay": train("measure")}
print(sorted(k for k in runs["replay"][0] if k.startswith("moe_replay/")))


# %%
def series(run, key):
    return np.array([entry.get(key, np.nan) for entry in runs[run]], dtype=float)


steps = np.arange(1, len(runs["replay"]) + 1)
rollout_steps = steps[~np.isnan(series("replay", "moe_replay/old/decisions_differ"))]
print("a new rollout at steps", rollout_steps.tolist())

# %% [markdown]
# ## What the trainer logged
#
# * `moe_replay/train/decisions_differ`: of the router decisions (token x router) of the
#   loss forward, the share where the current router, left free, would choose other
#   experts than the rollout did (`tokens_differ`: tokens with at least one such router).
#   Without replay, these are the decisions the loss forward actually changed. With
#   replay, the loss forward used the rollout's experts on every one of them (verified),
#   and the figure says what replay prevented.
# * `moe_replay/ratio/max` and `.../outside_clip`: the importance ratio
#   `exp(logp - old_logp)` of the completion tokens, its largest value and the share of
#   tokens outside the clip range `[0.8, 1.2]`. TRL's own `clip_ratio/*` are logged too.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
styles = {"replay": dict(color="tab:blue", marker="o"), "no replay": dict(color="tab:red", marker="s", alpha=0.8)}
for run, style in styles.items():
    axes[0].plot(steps, 100 * series(run, "moe_replay/train/decisions_differ"), label=run, ms=4, **style)
    axes[1].plot(steps, series(run, "moe_replay/ratio/max"), label=f"{run}: max", ms=4, **style)
    axes[1].plot(steps, 1 + series(run, "moe_replay/ratio/outside_clip"), ls=":", color=style["color"],
                 label=f"{run}: 1 + share outside clip")  # fmt: skip
    axes[2].plot(steps, series(run, "loss"), label=run, ms=4, **style)
for ax in axes:
    for s in rollout_steps:
        ax.axvline(s, color="0.85", lw=1, zorder=0)
    ax.set_xlabel("step (grey lines: a new rollout)")
    ax.legend(fontsize=8)
axes[0].set_ylabel("decisions differing from the rollout (%)")
axes[0].set_title("routing: rollout vs loss forward, router left free")
axes[1].set_ylabel("importance ratio")
axes[1].set_title("importance ratio spread")
axes[2].set_ylabel("loss")
axes[2].set_title("GRPO loss")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the plots show
#
# **Routing (left).** At every step with a new rollout (grey lines) the loss forward
# runs the very weights that generated the completions, and the free routers agree with
# the rollout on all but a fraction of a percent of decisions (the KV-cached decode and
# the full forward round differently). On the three steps that follow, the weights have
# moved and a growing share of decisions would change: the printout below gives the
# figures of this run. The two curves are nearly the same, because both measure the same
# drift of the routers; what differs is what the loss forward did with it. Without
# replay it used the drifted experts; with replay it used the rollout's, which
# `verify_replay=True` checked in every forward.
#
# **Importance ratio (middle).** The ratio is exactly 1 on rollout steps in both runs
# (same weights, same experts) and spreads as the weights move. On a model this small the
# spread comes from the weight update itself: the two runs are about as wide as each
# other (the printout counts the steps where each is wider). Replay removes one cause of
# ratio noise, the experts changing under the tokens; it matters where that cause is
# large, as between an inference engine computing in bf16 and the trainer, which is what
# R3 with vLLM replays.
#
# **Loss (right).** Both runs optimise the same objective on the same prompts; their
# losses stay close.

# %%
for run in runs:
    d = series(run, "moe_replay/train/decisions_differ")
    t = series(run, "moe_replay/train/tokens_differ")
    fresh = np.isin(steps, rollout_steps)
    print(
        f"{run:>9}: decisions differing on rollout steps {100 * d[fresh].mean():.2f}%, on later steps "
        f"{100 * d[~fresh].mean():.1f}% (tokens {100 * t[~fresh].mean():.1f}%); ratio max mean "
        f"{series(run, 'moe_replay/ratio/max').mean():.3f}, tokens outside the clip range "
        f"{100 * series(run, 'moe_replay/ratio/outside_clip').mean():.1f}%"
    )
wider = series("no replay", "moe_replay/ratio/max") > series("replay", "moe_replay/ratio/max")
print(f"the ratio's max is larger without replay on {int(wider.sum())} of {len(steps)} steps")

# %%
# the claims above, checked on this run
for run in runs:
    d = series(run, "moe_replay/train/decisions_differ")
    fresh = np.isin(steps, rollout_steps)
    assert d[fresh].max() < 0.02 < d[~fresh].mean(), run
    assert np.allclose(series(run, "moe_replay/ratio/max")[fresh], 1.0, atol=1e-4), run
    assert (series(run, "moe_replay/native_rows") < 0.2).all(), run  # only each sequence's last token

# %% [markdown]
# ## In your own script
#
# ```python
# from moe_replay.integrations.trl import RoutingReplayGRPOTrainer   # instead of trl.GRPOTrainer
#
# trainer = RoutingReplayGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
# trainer.train()
# ```
#
# With `use_vllm=True` (`vllm_mode="colocate"`), the same trainer starts vLLM with
# `enable_return_routed_experts=True` and replays vLLM's own routes (R3). See
# `docs/integrations.md` for what is logged, the TRL versions it was tested with, and
# what it does not support yet.
