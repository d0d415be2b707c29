# %% [markdown]
# # 1. Quick start: find the routers, capture, inspect, replay
#
# A Mixture-of-Experts (MoE) layer sends each token to the `k` experts its **router**
# scores highest. `moe_replay` attaches to any PyTorch MoE, **records** which experts every
# router chose for every token, and later **replays** (forces) those choices while the
# combine weights are recomputed from the router's *current* scores, so gradients still
# reach the router.
#
# This notebook uses one of the small reference MoE transformers that ship with the
# library (pure PyTorch, a few seconds on a CPU). Everything here works the same on your
# own model or a HuggingFace one (notebooks 3 and 4).
#
# Install: `pip install -e ".[notebooks]"` from a clone of the repository.

# %%
import matplotlib.pyplot as plt
import torch

import moe_replay as mr

torch.manual_seed(0)
model = mr.models.build("softmax_topk", num_layers=4, num_experts=16, top_k=2)
x = torch.randint(0, model.config.vocab_size, (2, 12))  # 2 sequences of 12 tokens
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; input {tuple(x.shape)}")

# %% [markdown]
# ## Find the routers
#
# `find_routers` looks at module names, classes, weight shapes and `top_k`-like
# attributes; it returns one `RouterSite` per router. Nothing is changed on the model.
# The last column says how each router's decision will be intercepted: here, the
# `topk` call inside the router's own `forward`.

# %%
sites = mr.find_routers(model)
print(mr.format_sites(sites))
sites[0]

# %% [markdown]
# ## Attach
#
# `attach` installs the interception once and allocates a capture buffer of `capacity`
# rows (tokens) per router. A session is *idle* until you enter `capture()` or
# `replay()`: idle, the model runs exactly as before.
#
# `verify` runs one forward without gradients and checks that every router ran and
# that its decision call was seen. Use it once on a new model.

# %%
session = mr.attach(model, capacity=1024)
print(session)
session.verify(x)

# %% [markdown]
# ## Capture
#
# Every forward inside `with session.capture():` appends one row per token to each
# router's buffer, in call order. `session.routes()` copies everything to the host in
# one pass and returns a `Routes` object.

# %%
with session.capture():
    reference = model(x).logits
routes = session.routes()
routes

# %% [markdown]
# ## Inspect the routes
#
# `routes.indices` is an int64 tensor `[tokens, routers, k]`. Tokens are in the order the
# routers saw them: here the 2 x 12 batch flattened row by row.

# %%
print("indices:", tuple(routes.indices.shape))
print("routers:", routes.names)
name = routes.names[0]
print(f"first 4 tokens at {name}:", routes.layer(name)[:4].tolist())

# %% [markdown]
# How much work did each expert get? A histogram of the chosen experts per router:

# %%
load = torch.stack([torch.bincount(r.flatten(), minlength=16) for r in routes.per_layer()])
fig, ax = plt.subplots(figsize=(6, 2.2))
im = ax.imshow(load, aspect="auto", cmap="viridis")
ax.set_xlabel("expert")
ax.set_ylabel("router (layer)")
ax.set_title("token slots routed to each expert")
fig.colorbar(im, ax=ax, label="token slots")
plt.show()

# %% [markdown]
# Routes slice by token (`routes[a:b]`, index lists, masks), concatenate
# (`mr.Routes.cat`), and save to a small `.npz` file (numpy arrays and JSON metadata,
# never pickle; indices take 2 bytes each on the host, 1 byte in the capture buffer).

# %%
routes.save("routes.npz")
loaded = mr.Routes.load("routes.npz")
assert loaded == routes
print(loaded[:12])  # the first sequence

# %% [markdown]
# ## Capture while generating
#
# Capture records every forward: the prompt forward, then one row per sequence per
# decode step. The last sampled token is never fed back to the model, so it is never
# routed: 12 prompt tokens + 6 new tokens give 12 + 5 routed tokens per sequence.

# %%
prompt = x[:1]
with session.capture():
    generated = model.generate(prompt, max_new_tokens=6)
print(generated.shape, session.routes())

# %% [markdown]
# ## Replay
#
# Inside `with session.replay(routes):` every router consumes its recorded rows in order,
# one row per token. Its top-k call is answered with the recorded experts and with the
# router's current scores gathered at those experts, so the model's own normalisation
# and scaling run unchanged.
#
# With unchanged weights, replay reproduces the forward exactly:

# %%
with session.replay(routes):
    replayed = model(x).logits
assert torch.equal(replayed, reference)
print("replay reproduced the logits bit for bit")

# %% [markdown]
# Now change the router weights, as a training step would. A free forward routes some
# tokens differently (`mr.compare` counts the router decisions, the sets of k experts,
# that differ); under replay, every router picks the recorded experts again. A capture
# inside the replay records what was forced.

# %%
with torch.no_grad():
    for site in session.sites:
        site.module.weight.add_(0.2 * site.module.weight.std() * torch.randn_like(site.module.weight))

with session.capture():
    model(x)
free = session.routes()
print(f"free forward: {mr.compare(routes, free).overall:.0%} of the router decisions changed")

with session.replay(routes), session.capture():
    loss = model(x, labels=x).loss
    loss.backward()
assert session.routes() == routes
print("replay forced the recorded experts")
print("router gradient norms:", [f"{s.module.weight.grad.norm():.3f}" for s in session.sites])

# %% [markdown]
# ## It fails loudly
#
# Routes are checked against the model before any forward (router names, expert count,
# `k`, index range, duplicates), and on leaving the replay every router must have
# consumed exactly its rows. Every error says what is wrong and what to do:

# %%
try:
    with session.replay(routes[:12]):  # rows for one sequence, but a forward over two
        model(x)
except mr.MoEReplayError as e:
    print(type(e).__name__, "-", e)

# %% [markdown]
# A row of `-1` means "no recorded route: route this token natively" (a prompt token
# served from an engine's prefix cache, padding). `strict=False` relaxes the end-of-replay
# check, e.g. to replay only a prefix of the tokens.

# %%
partial = routes.to_numpy()
partial[:4] = -1  # the first 4 tokens were not recorded
partial = mr.Routes.from_numpy(partial, names=routes.names, num_experts=16)
with session.replay(partial), session.capture():
    model(x)
got = session.routes()
assert torch.equal(got.indices[4:], routes.indices[4:])  # recorded tokens: forced
assert torch.equal(got.indices[:4], free.indices[:4])  # -1 rows: routed like a free forward
print("recorded tokens forced, missing tokens routed natively")

# %% [markdown]
# ## Detach
#
# `detach()` (or leaving `with mr.attach(model) as session:`) removes every wrapper: the
# model is exactly as it was, with no hooks and an unchanged `state_dict`.

# %%
session.detach()
print(session, "| wrappers left:", sum("forward" in m.__dict__ for m in model.modules()))
