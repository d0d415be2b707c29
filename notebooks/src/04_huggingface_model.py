# %% [markdown]
# # 4. A HuggingFace transformers model
#
# moe_replay does not import transformers and does not depend on its internals: it finds
# the routers of an HF model the same way as any other `nn.Module`'s. This notebook builds
# a tiny random **Qwen3-MoE** from a config (no download, no network), captures its routing
# through HF `generate()`, and replays it in a training forward with gradient
# checkpointing on.
#
# It needs `transformers` (`pip install "moe_replay[hf]"`). The test suite skips it when
# transformers is missing. The same code works on a real checkpoint loaded with
# `from_pretrained`.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

try:
    import transformers
except ImportError:
    raise SystemExit("This notebook needs HuggingFace transformers: pip install 'moe_replay[hf]'") from None

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_replay as mr

print("transformers", transformers.__version__)

# %% [markdown]
# A 4-layer Qwen3-MoE with 16 experts and top-2 routing. `mlp_only_layers=[0]` makes the
# first layer dense, as in many real MoEs: it has no router, so the routers are layers
# 1-3. Routes are always keyed by module path, never by a layer number, so dense layers
# cannot shift them.

# %%
config = Qwen3MoeConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=16, num_experts_per_tok=2, mlp_only_layers=[0],
    max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)
torch.manual_seed(0)
model = Qwen3MoeForCausalLM(config).eval()
print(mr.format_sites(mr.find_routers(model)))

# %% [markdown]
# ## Capture through `generate()`
#
# The routers see the prompt in one forward, then one token per decode step. The last
# generated token is never fed back, so a prompt of 10 tokens plus 8 new tokens gives 17
# routed tokens: exactly the tokens of a teacher-forced forward over `sequence[:, :-1]`.

# %%
session = mr.attach(model)
prompt = torch.randint(1, config.vocab_size, (1, 10))
with session.capture():
    sequence = model.generate(prompt, max_new_tokens=8, do_sample=False)
rollout = session.routes()
print(sequence.shape, rollout)

# %% [markdown]
# Replaying those routes in one teacher-forced forward over the whole sequence reproduces
# the routing of the generation (the capture inside the replay records what was forced).

# %%
inputs = sequence[:, :-1]
with session.replay(rollout), session.capture():
    model(inputs)
assert session.routes() == rollout
print("the teacher-forced forward routed every token like the generation")

# %% [markdown]
# ## A training step with replay and gradient checkpointing
#
# Change the router weights (a stand-in for earlier policy updates), switch on gradient
# checkpointing and train. With checkpointing, each decoder layer runs its forward a
# second time during backward. moe_replay notices that recompute and hands the router the
# very rows its first forward got: nothing to switch by hand, and each row is counted
# once in the end-of-replay check.

# %%
with torch.no_grad():
    for site in session.sites:
        w = site.module.weight
        w.add_(0.2 * w.std() * torch.randn_like(w))
with session.capture():
    model(inputs)
print(f"free forward after the change: {mr.compare(rollout, session.routes()).overall:.0%} of the router decisions differ")

checkpoint_kwargs = {"use_reentrant": False}
if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers releases
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

with session.replay(rollout), session.capture():
    loss = model(inputs, labels=inputs, use_cache=False).loss
    loss.backward()
assert session.routes() == rollout
print("the training step used the rollout's experts")
print("router gradient norms:", [f"{s.module.weight.grad.norm():.2e}" for s in session.sites])
optimizer.step()
optimizer.zero_grad()

# %% [markdown]
# ## The command line on a saved checkpoint
#
# `python -m moe_replay inspect` prints the same router table for a reference model, an
# HF model type (a tiny random instance) or a local checkpoint directory. Detach first:
# `save_pretrained` then writes the plain model.

# %%
import subprocess
import sys
import tempfile

session.detach()
workdir = tempfile.mkdtemp()
model.save_pretrained(os.path.join(workdir, "tiny-qwen3-moe"))
result = subprocess.run(
    [sys.executable, "-m", "moe_replay", "inspect", "tiny-qwen3-moe", "--verify"],
    cwd=workdir, capture_output=True, text=True,
)
print(result.stdout or result.stderr)
