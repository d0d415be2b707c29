"""R3 on an FSDP2 training backend: engine routes replayed in a sharded HuggingFace MoE.

Rollout routing replay (R3) trains on the experts the inference engine chose. This
example runs the whole path on CPU with two processes (gloo), for a tiny random
HuggingFace Qwen3-MoE whose first layer is dense (``mlp_only_layers=[0]``):

1. **Engine outputs.** A rollout copy of the model, its routers slightly perturbed as an
   engine's numerics would be, generates the completions. Its routes are written in the
   engine formats: a vLLM 0.22-0.33 ``RequestOutput`` (``CompletionOutput.routed_experts``,
   uint8, all hidden layers, including a second conversation turn requested with
   ``routed_experts_prompt_start``) and SGLang 0.5 ``meta_info`` (base64 int32). In real
   training these come from the engine's responses.
2. **Per-sequence routes** with ``moe_replay.interop`` (the turns of the conversation
   stitched into one sequence).
3. **An FSDP2 batch**: each rank packs its sequences into one row
   (``BatchLayout.packed``: input ids, position ids and the replay routes).
4. **Replay** in the FSDP2-sharded training model, forward and backward.
5. **Check** with a capture inside the replay and ``compare()``: every route the engine
   recorded was forced. Without replay the training model routes differently.

Run it:

    python docs/examples/fsdp2_r3.py                      # 2 CPU processes (gloo)
    torchrun --nproc-per-node 2 docs/examples/fsdp2_r3.py  # or under torchrun (NCCL on GPUs)
"""

from __future__ import annotations

import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist

import moe_replay as mr

#: (prompt length, new tokens, engine) of each rank's rollouts; "vllm-turns" is a two-turn conversation.
ROLLOUTS = (
    [(5, 4, "vllm"), (7, 3, "sglang"), (4, 3, "vllm-turns")],
    [(6, 5, "sglang"), (3, 4, "vllm"), (5, 2, "vllm-turns")],
)


def tiny_qwen3_moe(seed: int = 0) -> torch.nn.Module:
    """A random 3-layer Qwen3-MoE: layer 0 dense, layers 1-2 with 8 experts, top-2."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3, mlp_only_layers=[0],
        num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def engine_generate(engine: torch.nn.Module, session: mr.Session, ids: torch.Tensor, new: int):
    """The engine's stand-in: greedy decoding, returning the sequence and its routes (last token unrouted)."""
    with session.capture(), torch.no_grad():
        out = engine.generate(ids[None], max_new_tokens=new, do_sample=False)
    return out[0], mr.split_generation(session.routes(), batch_size=1, prompt_len=ids.numel())[0]


def engine_outputs(rank: int, lm: mr.LayerMap) -> list[tuple[str, object, dict]]:
    """Step 1: this rank's rollouts, as vLLM and SGLang return them."""
    engine = tiny_qwen3_moe()
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():  # the engine's routers differ a little from the trainer's
        for layer in engine.model.layers[1:]:
            layer.mlp.gate.weight.add_(0.1 * torch.randn(layer.mlp.gate.weight.shape, generator=g))
    out = []
    with mr.attach(engine) as session:
        for prompt_len, new, kind in ROLLOUTS[rank]:
            prompt = torch.randint(1, 128, (prompt_len,), generator=g)
            seq, routes = engine_generate(engine, session, prompt, new)
            if kind == "sglang":
                meta_info = mr.interop.to_sglang(routes, lm)  # SGLang's meta_info["routed_experts"]
                out.append((kind, {"meta_info": meta_info}, {"num_tokens": seq.numel(), "ids": seq}))
            elif kind == "vllm":
                comp = SimpleNamespace(
                    token_ids=seq[prompt_len:].tolist(), routed_experts=mr.interop.to_vllm(routes, lm)
                )
                out.append((kind, SimpleNamespace(prompt_token_ids=prompt.tolist(), outputs=[comp]), {"ids": seq}))
            else:  # a second turn: the first turn's sequence plus a user message, routes from its last token on
                user = torch.randint(1, 128, (3,), generator=g)
                seq2, routes2 = engine_generate(engine, session, torch.cat([seq, user]), new)
                start = seq.numel() - 1  # the first token turn 1 has no route for
                turns = []
                for s, r, p, st in ((seq, routes, prompt_len, 0), (seq2, routes2, seq.numel() + 3, start)):
                    comp = SimpleNamespace(
                        token_ids=s[p:].tolist(), routed_experts=mr.interop.to_vllm(r, lm, prompt_start=st)
                    )
                    turns.append((SimpleNamespace(prompt_token_ids=s[:p].tolist(), outputs=[comp]), st, s))
                out.append((kind, turns, {"ids": seq2}))
    return out


def sequence_routes(outputs: list, lm: mr.LayerMap) -> tuple[list[torch.Tensor], list[mr.Routes]]:
    """Step 2: per-sequence routes, aligned to every token of each sequence."""
    ids, routes = [], []
    for kind, payload, info in outputs:
        if kind == "sglang":
            r = mr.interop.from_sglang(payload, lm, num_tokens=info["num_tokens"])
        elif kind == "vllm":
            r = mr.interop.from_vllm_output(payload, lm)
        else:
            parts = [mr.interop.from_vllm_output(out, lm, prompt_start=st) for out, st, _ in payload]
            r = mr.interop.stitch_turns(parts, token_ids=[s.tolist() for _, _, s in payload])
        ids.append(info["ids"])
        routes.append(r)
    return ids, routes


def run(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    trainer = tiny_qwen3_moe()
    with mr.attach(trainer) as probe:
        lm = mr.LayerMap.from_session(probe, num_layers=trainer.config.num_hidden_layers)
    assert lm.dense_layers == (0,)

    ids, seqs = sequence_routes(engine_outputs(rank, lm), lm)

    # step 3: one packed row per rank
    layout = mr.BatchLayout.packed([s.num_tokens for s in seqs])
    tokens, positions = layout.tokens(ids), layout.position_ids()
    replay_routes = layout.routes(seqs)

    for layer in trainer.model.layers:
        fully_shard(layer)
    fully_shard(trainer)
    trainer.train()
    with mr.attach(trainer) as session:
        with session.capture(), torch.no_grad():  # the trainer's own routing, for contrast
            trainer(input_ids=tokens, position_ids=positions)
        native = session.routes()
        # step 4: replay, with a capture inside it recording what the routers actually used
        with session.replay(replay_routes), session.capture():
            loss = trainer(input_ids=tokens, position_ids=positions, labels=tokens).loss
            loss.backward()
        used = session.routes()

    # step 5: every recorded route was forced; the trainer alone routes differently
    recorded = ~replay_routes.missing
    forced = mr.compare(used, replay_routes)
    drift = mr.compare(native, replay_routes)
    for name in replay_routes.names:
        rows = recorded[:, replay_routes.names.index(name)]
        assert torch.equal(used.layer(name)[rows], replay_routes.layer(name)[rows]), f"{name}: a route was not forced"
    assert forced.overall == 0.0 and drift.overall > 0.0, (forced, drift)
    grads = [p.grad for n, p in trainer.named_parameters() if n.endswith("mlp.gate.weight")]
    assert all(g is not None and float(g.full_tensor().abs().sum()) > 0 for g in grads), "routers got no gradient"
    counts = torch.tensor([int(recorded.sum()), replay_routes.num_tokens], dtype=torch.long)
    dist.all_reduce(counts)
    print(
        f"rank {rank}: {len(seqs)} sequences, {int(recorded.sum())} recorded routes forced "
        f"(native drift {drift.overall:.0%}); all ranks: {int(counts[0])} routes over {int(counts[1])} tokens. ok",
        flush=True,
    )


def spawned(rank: int, world: int, init_method: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn`` (CPU, gloo)."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        run(rank, world)
        dist.barrier()  # both ranks are done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "LOCAL_RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size())
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(spawned, args=(2, f"file://{os.path.join(tmp, 'rendezvous')}"), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
