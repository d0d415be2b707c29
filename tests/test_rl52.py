"""An RL trainer's routing replay, part two: what GRPO trainers, reference models, async rollouts, multi-turn agents
and vision-language policies do with an engine's routes before the training forward.

The rollouts come from the fake engines of ``tests/interop/engines.py`` (vLLM 0.22-0.33 ``RequestOutput`` with ``n``
completions per prompt, each carrying its own full array), read with ``mr.interop.*``; their experts are arbitrary
(the engine's, not the trainer's), so the oracle is the test's own hooks on each experts module: every token whose
route names experts must dispatch exactly those, every -1 row is routed natively. The router weights are perturbed,
or trained, between rollout and training, so only a forced replay dispatches the engine's experts. Outcome: exact, or
a ``MoEReplayError`` with the model's tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import moe_replay as mr

from .interop import engines
from .test_workflow import _dispatched, _perturb, _state, _unchanged, _watch_experts

Record = dict[str, list[torch.Tensor]]

ENGINE = engines.Model(num_layers=3, moe_layers=(1, 2), num_experts=8, k=2)  # (the policy's shape, as vLLM sees it)


@pytest.fixture(scope="module")
def policy() -> Iterator[tuple[Any, ...]]:
    """A three-layer policy (one dense layer), attached, its decisions established, and its LayerMap."""
    model = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1)
    _watch_experts(model)
    session = mr.attach(model)
    session.verify(torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(9)))
    yield model, session, mr.LayerMap.from_session(session, num_layers=3), _state(model)
    session.detach()


def _experts_name(router: str) -> str:
    return router.rsplit(".", 1)[0] + ".experts"


def _assert_rows_forced(
    got: Record, call: int, layout: mr.BatchLayout, per_seq: list[mr.Routes], what: str = ""
) -> None:
    """Call ``call`` of every MoE layer dispatched, for each sequence ``j`` of ``layout``, the experts ``per_seq[j]``
    names for its tokens (rows of -1: any, routed natively), and at least one sequence had rows to force."""
    forced_any = False
    for j, routes in enumerate(per_seq):
        where = layout.flat_positions(j)
        for name in routes.names:
            rows = got[_experts_name(name)][call][where]
            want = routes.layer(name).long()
            held = want[:, 0] >= 0
            forced_any |= bool(held.any())
            assert torch.equal(rows[held], want[held]), f"{what}sequence {j} at {name}: not its engine rows"
    assert forced_any, "the test forced nothing"


def _refused(model: torch.nn.Module, session: mr.Session, routes: mr.Routes, forward: Callable[[], Any]) -> bool:
    """Whether replaying ``routes`` around ``forward`` is refused (leaving the model's tensors as they were)."""
    before = _state(model)
    try:
        with session.replay(routes):
            forward()
    except mr.MoEReplayError:
        _unchanged(model, before)
        assert session.state == "idle"
        return True
    return False


# ----------------------------------------------------------------------------- GRPO: n samples per prompt
PROMPT_LENGTHS = [3, 5, 2]
COMPLETIONS = [[4, 2, 3], [1, 3, 2], [2, 4, 1]]  # (n = 3 completions per prompt, one of a single token)


def _grpo_rollout(prompt_rows: str, seed: int = 0) -> tuple[list[list[torch.Tensor]], list[list[Any]]]:
    """Three prompts, three completions each, as vLLM 0.22-0.33 return them (one ``RequestOutput`` per prompt, each
    completion with its own full array): ``prompt_rows`` "shared" (every sample's prompt rows equal, one prefill),
    "per-sample" (each sample's prompt prefilled again, with other experts: a bf16 engine's batch-variance), or
    "prefix-cached" (samples after the first start their rows at ``routed_experts_prompt_start``: the prompt's rows
    but its last one were served from the prefix cache, -1 rows). Returns each sample's tokens and the requests."""
    g = torch.Generator().manual_seed(seed)
    tokens: list[list[torch.Tensor]] = []
    outputs: list[list[Any]] = []
    for p, (plen, comps) in enumerate(zip(PROMPT_LENGTHS, COMPLETIONS, strict=True)):
        prompt = torch.randint(1, 128, (plen,), generator=g)
        shared = ENGINE.truth(plen, seed=100 + p)
        seqs, outs = [], []
        for s, clen in enumerate(comps):
            gen = torch.randint(1, 128, (clen,), generator=g)
            truth = ENGINE.truth(plen + clen, seed=1000 + 10 * p + s)
            if prompt_rows != "per-sample":
                truth[:plen] = shared
            start = plen - 1 if prompt_rows == "prefix-cached" and s > 0 else 0
            req = engines.vllm_033_request_output(ENGINE, prompt.tolist(), [(gen.tolist(), truth)], prompt_start=start)
            seqs.append(torch.cat([prompt, gen]))
            outs.append((req, start))
        tokens.append(seqs)
        outputs.append(outs)
    return tokens, outputs


def _read(outputs: list[list[Any]], lm: mr.LayerMap) -> list[list[mr.Routes]]:
    return [[mr.interop.from_vllm_output(req, lm, prompt_start=start) for req, start in group] for group in outputs]


def _grpo_batch(
    picked: list[tuple[int, int]], tokens: list[list[torch.Tensor]]
) -> tuple[mr.BatchLayout, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of the ``picked`` (prompt, sample) pairs: prompts left-padded to the widest, completions
    right-padded (TRL's and OpenRLHF's layout), its attention mask, position_ids from the mask and labels on the
    completion tokens only."""
    plens = [PROMPT_LENGTHS[p] for p, _ in picked]
    lengths = [len(tokens[p][s]) for p, s in picked]
    pw = max(plens)
    width = pw + max(n - pl for n, pl in zip(lengths, plens, strict=True))
    layout = mr.BatchLayout.split(plens, lengths, prompt_width=pw, row_length=width)
    ids = torch.zeros(len(picked), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, ((p, s), pl) in enumerate(zip(picked, plens, strict=True)):
        seq = tokens[p][s]
        ids[j, pw - pl : pw - pl + len(seq)] = seq
        mask[j, pw - pl : pw - pl + len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :pw] = -100  # (the loss on the completions only)
    return layout, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), labels


_PICKS = {
    "all-in-rollout-order": [(p, s) for p in range(3) for s in range(3)],
    "sorted-by-reward": [(1, 2), (0, 1), (2, 0), (0, 0), (1, 0), (2, 2), (0, 2), (1, 1), (2, 1)],
    "group-1-filtered-out": [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2)],
    "groups-filtered-and-shuffled": [(2, 1), (0, 2), (2, 0), (0, 0)],
}


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("prompt_rows", ["shared", "per-sample", "prefix-cached"])
@pytest.mark.parametrize("pick", list(_PICKS))
def test_grpo_samples_of_a_prompt_reordered_or_filtered_replay_their_own_rows(
    pick: str, prompt_rows: str, policy: tuple[Any, ...]
) -> None:
    """GRPO with n = 3 completions per prompt read from vLLM's ``RequestOutput`` (each completion's own array), the
    samples of the training batch reordered by reward, groups filtered out (zero-variance groups dropped, as DAPO's
    dynamic sampling does), left-padded prompts of three lengths in one batch, the loss on the completions only:
    every sample's tokens dispatch its own engine rows, whether the samples of a prompt share their prompt rows, hold
    rows of their own, or start after a prefix-cache hit. The routes left in the rollout's order on the reordered
    batch: refused."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    tokens, outputs = _grpo_rollout(prompt_rows)
    per = _read(outputs, lm)
    picked = _PICKS[pick]
    layout, ids, mask, positions, labels = _grpo_batch(picked, tokens)
    routes = layout.routes([per[p][s] for p, s in picked])
    before = _state(model)
    with _dispatched(model) as rec, session.replay(routes):
        model(ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    _assert_rows_forced(rec, 0, layout, [per[p][s] for p, s in picked])
    model.load_state_dict(before)
    in_rollout_order = sorted(picked)
    if in_rollout_order != picked:  # (laid out for their own lengths at the batch's widths: as many rows)
        plens = [PROMPT_LENGTHS[p] for p, _ in in_rollout_order]
        lengths = [len(tokens[p][s]) for p, s in in_rollout_order]
        own = mr.BatchLayout.split(plens, lengths, prompt_width=max(plens), row_length=layout.row_length)
        wrong = own.routes([per[p][s] for p, s in in_rollout_order])
        assert wrong.num_tokens == routes.num_tokens
        assert _refused(model, session, wrong, lambda: model(ids, attention_mask=mask, position_ids=positions))


# ----------------------------------------------------------------------------- a reference model for the KL term
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_policy_routes_replayed_on_a_reference_model_of_other_weights(ids: str, policy: tuple[Any, ...]) -> None:
    """The reference policy of the KL term: the same architecture with other weights (another seed), attached on
    its own; the policy's rollout routes replayed on it (R3 for the reference forward, as the TRL integration does
    for a reference MoE of the same architecture): every token dispatches the rollout's experts there too, and the
    policy's own session is not involved. A reference of another expert count is refused naming a router."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    tokens, outputs = _grpo_rollout("shared", seed=2)
    per = _read(outputs, lm)
    if ids == "no-token-ids":
        per = [[r.with_token_ids(None) for r in group] for group in per]
    picked = [(0, 1), (2, 2), (1, 0)]
    layout, x, mask, positions, _ = _grpo_batch(picked, tokens)
    routes = layout.routes([per[p][s] for p, s in picked])
    ref = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, seed=5)
    _watch_experts(ref)
    with mr.attach(ref) as ref_session:
        with _dispatched(ref) as rec, ref_session.replay(routes), torch.no_grad():
            ref(x, attention_mask=mask, position_ids=positions)
        _assert_rows_forced(rec, 0, layout, [per[p][s] for p, s in picked], "reference: ")
        with _dispatched(model) as rec, session.replay(routes):
            model(x, attention_mask=mask, position_ids=positions).logits.sum().backward()
        model.zero_grad(set_to_none=True)
        _assert_rows_forced(rec, 0, layout, [per[p][s] for p, s in picked], "policy: ")
    model.load_state_dict(state)
    other = mr.models.build("softmax_topk", num_layers=3, first_dense_layers=1, num_experts=16, seed=5)
    with mr.attach(other) as other_session:
        with pytest.raises(mr.MoEReplayError, match="router"), other_session.replay(routes), torch.no_grad():
            other(x, attention_mask=mask, position_ids=positions)


# ----------------------------------------------------------------------------- async: routes of version t at t + 2
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
def test_off_policy_routes_replayed_two_optimizer_steps_later(checkpointing: str, policy: tuple[Any, ...]) -> None:
    """Async RL: the rollout of policy version t replayed after two optimizer steps on other batches (every weight
    moved, the routers' too): every token dispatches the rollout's experts, in the forward and in a checkpointing
    recompute, and the router weights get gradients."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    tokens, outputs = _grpo_rollout("per-sample", seed=3)
    per = _read(outputs, lm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):  # (versions t + 1 and t + 2, trained free on other tokens)
        other = torch.randint(1, 128, (2, 6), generator=g)
        model(other, labels=other).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _perturb(model, seed=6)
    picked = [(2, 0), (0, 2), (1, 1)]
    layout, x, mask, positions, labels = _grpo_batch(picked, tokens)
    model.config.checkpointing = checkpointing
    try:
        with _dispatched(model) as rec, session.replay(routes := layout.routes([per[p][s] for p, s in picked])):
            model(x, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    finally:
        model.config.checkpointing = "none"
    calls = 2 if checkpointing != "none" else 1
    assert all(len(c) == calls for c in rec.values()), {k: len(c) for k, c in rec.items()}
    for call in range(calls):
        _assert_rows_forced(rec, call, layout, [per[p][s] for p, s in picked])
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert routes.num_tokens == layout.rows * layout.row_length
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- multi-turn with tool tokens
@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("turn2", ["prefix-cached", "prefilled-again"])
def test_agentic_turns_with_tool_tokens_replay_the_turns_rows_under_a_loss_mask(
    turn2: str, policy: tuple[Any, ...]
) -> None:
    """A two-turn agentic rollout: turn 1 samples after the prompt, a tool's output is appended and turn 2 samples
    after it. Turn 2's request starts its rows at the prefix cache's end (the last sampled token of turn 1 and the
    tool tokens are prefilled in turn 2) or prefills the whole history again with other experts (stitched keeping
    turn 1's rows, those its tokens were sampled with). The conversation trained in one forward with the loss on
    the model's own tokens only (the prompt and the tool's tokens masked): every token dispatches its stitched row."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(11)
    prompt, gen1, tool, gen2 = (torch.randint(1, 128, (n,), generator=g) for n in (4, 3, 3, 2))
    seq1 = torch.cat([prompt, gen1])
    seq2 = torch.cat([seq1, tool, gen2])
    truth1 = ENGINE.truth(len(seq1), seed=21)
    truth2 = ENGINE.truth(len(seq2), seed=22)
    truth2[: len(seq1) - 1] = truth1[: len(seq1) - 1]  # (the KV cache of turn 1's routed tokens)
    start = len(seq1) - 1 if turn2 == "prefix-cached" else 0
    if turn2 == "prefilled-again":
        truth2[: len(seq1) - 1] = ENGINE.truth(len(seq1) - 1, seed=23)
    req1 = engines.vllm_033_request_output(ENGINE, prompt.tolist(), [(gen1.tolist(), truth1)])
    p2 = torch.cat([seq1, tool])
    req2 = engines.vllm_033_request_output(ENGINE, p2.tolist(), [(gen2.tolist(), truth2)], prompt_start=start)
    turns = [mr.interop.from_vllm_output(req1, lm), mr.interop.from_vllm_output(req2, lm, prompt_start=start)]
    stitched = mr.interop.stitch_turns(
        turns, token_ids=[seq1.tolist(), seq2.tolist()], overlap="check" if turn2 == "prefix-cached" else "first"
    )
    for name in stitched.names:  # (turn 1's rows where it routed, turn 2's after)
        rows = stitched.layer(name).long()
        assert torch.equal(rows[: len(seq1) - 1], torch.from_numpy(truth1[: len(seq1) - 1, lm.names.index(name)]))
    labels = seq2.clone()[None]
    labels[0, : len(prompt)] = -100
    labels[0, len(seq1) : len(seq1) + len(tool)] = -100  # (the tool's tokens: no loss)
    layout = mr.BatchLayout.padded([len(seq2)])
    with _dispatched(model) as rec, session.replay(stitched):
        model(seq2[None], labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    _assert_rows_forced(rec, 0, layout, [stitched])


# ----------------------------------------------------------------------------- a vision-language policy
def _tiny_qwen3_vl_moe() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=200, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, max_position_embeddings=256,
            rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
            deepstack_visual_indexes=[],
        ),
        image_token_id=190, video_token_id=191, vision_start_token_id=192, vision_end_token_id=193,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_a_vision_language_policy_replays_engine_routes_of_prompts_with_images(ids: str) -> None:
    """A Qwen3-VL-MoE policy (mrope ``position_ids`` ``[3, batch, seq]`` computed inside, the image's features merged
    into ``inputs_embeds`` at its placeholder tokens): vLLM's routes of two rollouts whose prompts hold an image and
    differ in length, replayed on the left-padded training batch fed ``input_ids``, ``pixel_values`` and
    ``image_grid_thw``: every token, the image's included, dispatches its engine rows; the two samples' routes
    swapped: refused."""
    model = _tiny_qwen3_vl_moe()
    _watch_experts(model)
    session = mr.attach(model)
    try:
        lm = mr.LayerMap.from_session(session, num_layers=2)
        eng = engines.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=2)
        img = [192, 190, 190, 190, 190, 193]  # (a 1x4x4 patch grid merged 2x2: four image tokens)
        prompts = [[5, *img, 7, 8], [9, 10, 11, *img, 12]]
        gens = [[20, 21, 22], [23, 24]]
        per, seqs = [], []
        for i, (p, gen) in enumerate(zip(prompts, gens, strict=True)):
            truth = eng.truth(len(p) + len(gen), seed=30 + i)
            req = engines.vllm_033_request_output(eng, p, [(gen, truth)])
            r = mr.interop.from_vllm_output(req, lm)
            per.append(r if ids == "token-ids" else r.with_token_ids(None))
            seqs.append(torch.tensor(p + gen))
        plens = [len(p) for p in prompts]
        lengths = [len(s) for s in seqs]
        pw = max(plens)
        width = pw + max(n - pl for n, pl in zip(lengths, plens, strict=True))
        layout = mr.BatchLayout.split(plens, lengths, prompt_width=pw, row_length=width)
        x = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, (s, pl) in enumerate(zip(seqs, plens, strict=True)):
            x[j, pw - pl : pw - pl + len(s)] = s
            mask[j, pw - pl : pw - pl + len(s)] = 1
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(2 * 16, 3 * 2 * 4 * 4, generator=g)
        grid = torch.tensor([[1, 4, 4], [1, 4, 4]])

        def forward() -> Any:
            return model(
                input_ids=x,
                attention_mask=mask,
                pixel_values=pixels,
                image_grid_thw=grid,
                mm_token_type_ids=(x == 190).long(),
            )

        with _dispatched(model) as rec, session.replay(layout.routes(per)):
            forward().logits.float().pow(2).mean().backward()
        _assert_rows_forced(rec, 0, layout, per)
        model.zero_grad(set_to_none=True)
        swapped = mr.BatchLayout.split(plens[::-1], lengths[::-1], prompt_width=pw, row_length=width).routes(per[::-1])
        assert _refused(model, session, swapped, forward), "the samples' rows were swapped silently"
    finally:
        session.detach()


# ----------------------------------------------------------------------------- one training step with everything on
@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("reentrant", [True, False])
def test_a_training_step_with_checkpointing_accumulation_autocast_and_router_jitter(reentrant: bool) -> None:
    """A transformers Mixtral in ``train()`` with its router jitter on (the hidden states scaled by noise in place
    before the gate), gradient checkpointing, ``torch.autocast(bfloat16)``, two micro-batches accumulated in one
    step and a loss on a subset of the tokens: every forward and every recompute dispatches the engine's rows, and
    the routers get gradients."""
    pytest.importorskip("transformers")
    from . import tiny_hf

    model = tiny_hf.build("mixtral")
    model.config.router_jitter_noise = 0.2
    for m in model.modules():
        if hasattr(m, "jitter_noise"):
            m.jitter_noise = 0.2
    _watch_experts(model)
    session = mr.attach(model)
    try:
        layers = model.config.num_hidden_layers
        lm = mr.LayerMap.from_session(session, num_layers=layers)
        eng = engines.Model(num_layers=layers, moe_layers=tuple(range(layers)), num_experts=8, k=2)
        g = torch.Generator().manual_seed(40)
        lengths = [[5, 3], [4, 6]]  # (two micro-batches of two sequences)
        micro = []
        for b, lens in enumerate(lengths):
            per, seqs = [], []
            for i, n in enumerate(lens):
                seq = torch.randint(1, 90, (n,), generator=g)
                truth = eng.truth(n, seed=50 + 10 * b + i)
                req = engines.vllm_033_request_output(eng, seq[:2].tolist(), [(seq[2:].tolist(), truth)])
                per.append(mr.interop.from_vllm_output(req, lm))
                seqs.append(seq)
            layout = mr.BatchLayout.padded(lens)
            micro.append((layout, per, layout.tokens(seqs), layout.attention_mask()))
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with _dispatched(model) as rec:
            for layout, per, x, mask in micro:
                with session.replay(layout.routes(per)), torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(input_ids=x, attention_mask=mask).logits
                    keep = mask.bool() & (torch.arange(x.shape[1]) % 2 == 0)  # (the loss on some tokens only)
                    (logits.float()[keep].logsumexp(-1).mean() / len(micro)).backward()
        calls = {k: len(v) for k, v in rec.items()}
        assert all(n == 2 * len(micro) for n in calls.values()), f"forwards and recomputes seen: {calls}"
        for c in range(2 * len(micro)):  # (each micro-batch's forward, then its recompute in backward)
            layout, per, _, _ = micro[c // 2]
            _assert_rows_forced(rec, c, layout, per, f"call {c}: ")
        grads = [p.grad for n, p in model.named_parameters() if n.endswith("gate.weight")]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.parametrize("ids", ["token-ids", "no-token-ids"])
def test_a_vision_language_policy_replays_remove_padding_rows_fed_mrope_positions(ids: str) -> None:
    """verl's remove-padding for a VLM: two rollouts whose prompts hold an image packed in one row, fed the mrope
    ``position_ids`` ``[3, 1, tokens]`` of each sequence concatenated (restarting at each, the image's rows apart):
    every token dispatches its engine rows. The rows in the other sequence order (12 and 14 tokens laid out as 14
    and 12): refused where the routes know their tokens (without ids: the next test)."""
    _vlm_packed(ids, swapped=False)


def _vlm_packed(ids: str, swapped: bool) -> None:
    """The remove-padding VLM case: ``swapped``, only the rows in the other sequence order, which must be refused."""
    model = _tiny_qwen3_vl_moe()
    _watch_experts(model)
    session = mr.attach(model)
    try:
        lm = mr.LayerMap.from_session(session, num_layers=2)
        eng = engines.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=2)
        img = [192, 190, 190, 190, 190, 193]
        prompts, gens = [[5, *img, 7, 8], [9, 10, 11, *img, 12]], [[20, 21, 22], [23, 24, 25, 26]]
        per, seqs = [], []
        for i, (p, gen) in enumerate(zip(prompts, gens, strict=True)):
            req = engines.vllm_033_request_output(eng, p, [(gen, eng.truth(len(p) + len(gen), seed=60 + i))])
            r = mr.interop.from_vllm_output(req, lm)
            per.append(r if ids == "token-ids" else r.with_token_ids(None))
            seqs.append(torch.tensor(p + gen))
        layout = mr.BatchLayout.packed([len(s) for s in seqs])
        x = layout.tokens(seqs)
        grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
        pixels = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
        one = grid[:1]
        pos = torch.cat(
            [
                model.model.get_rope_index(s[None], (s[None] == 190).long(), one, None, torch.ones_like(s[None]))[0]
                for s in seqs
            ],
            -1,
        )
        assert not torch.equal(pos[0], pos[1]), "the test's positions hold no image"

        def forward() -> Any:
            t = (x == 190).long()
            return model(input_ids=x, position_ids=pos, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=t)

        if not swapped:
            with _dispatched(model) as rec, session.replay(layout.routes(per)):
                forward().logits.float().pow(2).mean().backward()
            _assert_rows_forced(rec, 0, layout, per)
            model.zero_grad(set_to_none=True)
        if swapped or ids == "token-ids":
            other = mr.BatchLayout.packed([len(s) for s in seqs[::-1]]).routes(per[::-1])
            assert _refused(model, session, other, forward), "the sequences' rows were swapped silently"
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
def test_packed_vlm_rows_without_ids_in_another_sequence_order_are_refused() -> None:
    """As :func:`test_a_vision_language_policy_replays_remove_padding_rows_fed_mrope_positions`, the routes without
    ids laid out in the other sequence order (their sequences of other lengths start elsewhere in the row than the
    fed positions restart): refused, as the same routes fed ``[batch, seq]`` text positions are. Once silent: mrope
    rows that differ (an image) were compared with nothing, though each sequence's start, 0 in every row, shows
    where the sequences begin."""
    _vlm_packed("no-token-ids", swapped=True)


def _no_route(like: mr.Routes, n: int) -> mr.Routes:
    """``n`` rows of -1 (route natively) for ``like``'s routers."""
    return mr.Routes(
        [torch.full((n, k), -1) for k in like.k_per_layer], names=like.names, num_experts=like.experts_per_layer
    )


@pytest.mark.reliability("false refusals")
def test_ulysses_ranks_of_a_vlm_replay_their_slices_of_embeddings_and_mrope_positions() -> None:
    """verl's Ulysses sequence parallel for a VLM: the packed row's embeddings (the image's features merged) and its
    mrope ``position_ids`` ``[3, 1, tokens]`` padded to a multiple of the ranks (a dummy sequence whose positions
    restart at 0, routed natively) and sliced, each rank's language model fed its slice with the same slice of the
    routes (no ids: none are fed): exact, though a rank's slice starts inside a sequence or inside the image; a rank
    fed the next rank's slice with its own rows: refused (the next sequence starts elsewhere)."""
    model = _tiny_qwen3_vl_moe()
    _watch_experts(model)
    session = mr.attach(model)
    try:
        lm = mr.LayerMap.from_session(session, num_layers=2)
        eng = engines.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=2)
        img = [192, 190, 190, 190, 190, 193]
        prompts, gens = [[5, *img, 7, 8], [9, 10, 11, *img, 12]], [[20, 21, 22], [23, 24, 25, 26]]
        per, seqs = [], []
        for i, (p, gen) in enumerate(zip(prompts, gens, strict=True)):
            req = engines.vllm_033_request_output(eng, p, [(gen, eng.truth(len(p) + len(gen), seed=70 + i))])
            per.append(mr.interop.from_vllm_output(req, lm).with_token_ids(None))
            seqs.append(torch.tensor(p + gen))
        layout = mr.BatchLayout.packed([len(s) for s in seqs])
        x = layout.tokens(seqs)
        grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
        pixels = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
        pos = torch.cat(
            [
                model.model.get_rope_index(s[None], (s[None] == 190).long(), grid[:1], None, torch.ones_like(s[None]))[
                    0
                ]
                for s in seqs
            ],
            -1,
        )
        with torch.no_grad():
            emb = model.model.get_input_embeddings()(x)
            feats = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
            emb[x == 190] = feats.to(emb.dtype)
        ranks, n = 4, layout.row_length
        pad = -n % ranks
        emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
        pos = torch.cat([pos, torch.arange(pad).expand(3, 1, pad)], -1)
        routes = mr.Routes.cat([layout.routes(per), _no_route(per[0], pad)])
        width = (n + pad) // ranks
        lang = model.model.language_model
        for rank in range(ranks):
            sl = slice(rank * width, (rank + 1) * width)
            with _dispatched(model) as rec, session.replay(routes[sl]), torch.no_grad():
                lang(inputs_embeds=emb[:, sl], position_ids=pos[..., sl])
            for name in routes.names:
                want = routes.layer(name)[sl].long()
                held = want[:, 0] >= 0
                assert held.any() or rank == ranks - 1
                assert torch.equal(rec[_experts_name(name)][0][held], want[held]), f"rank {rank} at {name}"
        mine, next_ = slice(width, 2 * width), slice(2 * width, 3 * width)
        assert _refused(
            model, session, routes[mine], lambda: lang(inputs_embeds=emb[:, next_], position_ids=pos[..., next_])
        )
    finally:
        session.detach()


@pytest.mark.reliability("false refusals")
@pytest.mark.xfail(
    strict=True,
    reason="false refusal: a context-parallel rank's two chunks of a VLM sequence, an image between them, are fed "
    "mrope positions whose distance is not the chunks' distance in places (the image's tokens share positions), and "
    "the rows' places (an engine reader's, a capture's) are compared by that distance, which tells a misuse only "
    "for text",
)
def test_context_parallel_chunks_of_a_vlm_sequence_with_an_image_between_them_replay_exactly() -> None:
    """Megatron's load-balanced context parallel over a VLM: each rank's two chunks of the sequence (the image inside
    the chunks it does not hold), its language model fed their embeddings and mrope positions with the same rows of
    the routes: exact."""
    model = _tiny_qwen3_vl_moe()
    _watch_experts(model)
    session = mr.attach(model)
    try:
        lm = mr.LayerMap.from_session(session, num_layers=2)
        eng = engines.Model(num_layers=2, moe_layers=(0, 1), num_experts=8, k=2)
        seq = torch.tensor([5, 6, 7, 192, 190, 190, 190, 190, 193, 8, 9, 10])
        req = engines.vllm_033_request_output(eng, seq[:10].tolist(), [(seq[10:].tolist(), eng.truth(12, seed=80))])
        routes = mr.interop.from_vllm_output(req, lm).with_token_ids(None)
        grid = torch.tensor([[1, 4, 4]])
        pos = model.model.get_rope_index(seq[None], (seq[None] == 190).long(), grid, None, torch.ones_like(seq[None]))[
            0
        ]
        with torch.no_grad():
            emb = model.model.get_input_embeddings()(seq[None])
            pixels = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
            emb[seq[None] == 190] = torch.cat(model.model.get_image_features(pixels, grid).pooler_output).to(emb.dtype)
        at = torch.cat([torch.arange(0, 3), torch.arange(9, 12)])  # (rank 0 of 2: chunks 0 and 3 of 4)
        with _dispatched(model) as rec, session.replay(routes[at]), torch.no_grad():
            model.model.language_model(inputs_embeds=emb[:, at], position_ids=pos[..., at])
        for name in routes.names:
            want = routes.layer(name)[at].long()
            held = want[:, 0] >= 0
            assert torch.equal(rec[_experts_name(name)][0][held], want[held]), name
    finally:
        session.detach()


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("misuse", ["another-ranks-slice", "chunks-fed-as-a-run"])
def test_engine_rows_of_one_sequence_sliced_without_a_layout_and_fed_at_other_places_are_refused(
    misuse: str, policy: tuple[Any, ...]
) -> None:
    """An engine's routes of one sequence read without ids (``from_vllm_output(...).with_token_ids(None)``, row t:
    token t of the sequence) sliced for sequence-parallel ranks with ``routes[...]``, as laid out through
    ``mr.BatchLayout.packed`` they are refused: rank 0's rows fed rank 1's tokens at their positions, or zigzag chunks
    fed as if they followed each other. Once silent: the reader's rows kept no place (a capture's did), so sliced
    without a layout they were forced with nothing compared."""
    model, session, lm, state = policy
    model.load_state_dict(state)
    seq = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(12))
    req = engines.vllm_033_request_output(ENGINE, seq[:8].tolist(), [(seq[8:].tolist(), ENGINE.truth(12, seed=90))])
    routes = mr.interop.from_vllm_output(req, lm).with_token_ids(None)
    pos = torch.arange(12)[None]
    if misuse == "another-ranks-slice":
        rows, fed = routes[:6], slice(6, 12)
        forward = lambda: model(seq[None, fed], position_ids=pos[:, fed])  # noqa: E731
        laid = mr.BatchLayout.packed([12]).routes([routes])[:6]
    else:
        at = torch.cat([torch.arange(0, 3), torch.arange(9, 12)])
        rows = routes[at]
        forward = lambda: model(seq[None, at], position_ids=torch.arange(6)[None])  # noqa: E731
        laid = mr.BatchLayout.packed([12]).routes([routes])[at]
    assert _refused(model, session, laid, forward), "laid out: refused (the test's misuse is one)"
    assert _refused(model, session, rows, forward), "an engine's rows forced at other places than they were routed"
