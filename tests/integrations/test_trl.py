"""Routing replay in TRL's GRPOTrainer, on a tiny random Qwen3-MoE policy, on CPU.

The replay is checked independently of the integration's own metrics: every call of the
policy session's ``replay`` is wrapped by the test with a capture, and ``compare()`` of that
capture against the routes shows that the forward used every recorded expert.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import moe_replay as mr

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from trl import GRPOConfig  # noqa: E402

from moe_replay.integrations import trl as mr_trl  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 48
PAD, EOS = 0, 1


def tokenizer() -> Any:
    """A word-level tokenizer over ``<pad> <eos> w0 .. w45``, built offline."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def policy(seed: int = 0, layers: int = 2) -> Any:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, router_aux_loss_coef=0.01,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def dataset(n: int = 8) -> Any:
    # prompts of 2 to 4 words, so TRL left-pads them
    return datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"w{(5 * i + j) % 40}" for j in range(2 + i % 3)) for i in range(n)]}
    )


def reward(completions: list[str], **_: Any) -> list[float]:
    return [c.count("w3") - 0.1 * len(c.split()) for c in completions]


def config(out: str, **kw: Any) -> GRPOConfig:
    base = dict(
        output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=5, num_iterations=2,
        steps_per_generation=2, max_steps=4, logging_steps=1, learning_rate=3e-2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, temperature=1.0,
    )  # fmt: skip
    base.update(kw)
    return GRPOConfig(**base)


def spy_replays(session: mr.Session) -> list[tuple[mr.Routes, mr.RoutingComparison]]:
    """Wrap ``session.replay`` with a capture; record ``(routes, compare(captured, routes))`` per replay."""
    seen: list[tuple[mr.Routes, mr.RoutingComparison]] = []
    original = session.replay

    @contextlib.contextmanager
    def replay(routes: mr.Routes, **kwargs: Any) -> Any:
        with original(routes, **kwargs):
            with session.capture():
                yield session
            seen.append((routes, mr.compare(session.routes(), routes)))

    session.replay = replay  # type: ignore[method-assign]
    return seen


@pytest.fixture(scope="module")
def trained() -> Any:
    """A few GRPO steps with replay (num_iterations=2, two micro-batches per generation), and its replays."""
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, args=config(out), train_dataset=dataset(), processing_class=tokenizer()
        )
        replays = spy_replays(trainer.moe_session)
        trainer.train()
        yield SimpleNamespace(trainer=trainer, replays=replays, logs=trainer.state.log_history[:-1])
        trainer.detach_routing_replay()


def test_every_replayed_forward_forces_every_recorded_route(trained: Any) -> None:
    # 4 steps, 2 micro-batches per generation, num_iterations=2: one generation every 4 steps
    # -> one old-logprob forward (the whole generation batch) and 4 loss forwards
    assert len(trained.replays) == 5
    for routes, c in trained.replays:
        recorded = int((~routes.missing).sum())
        assert recorded > 0
        assert int(c.compared.sum()) == recorded  # every recorded route was compared...
        assert int(c.differ.sum()) == 0  # ...and used
    old, *losses = (r for r, _ in trained.replays)
    assert old.num_tokens == 8 * (old.num_tokens // 8)  # the 8 sequences of the generation batch
    for r in losses:
        assert r.num_tokens % 4 == 0  # micro-batches of 4 sequences


def test_each_sequence_is_replayed_with_its_own_generation_routes(trained: Any) -> None:
    # the old-logprob forward's routes, cut per row, equal what generate() chose for that sequence
    t = trained.trainer
    rollout = t._mr_rollouts["train"]
    old = trained.replays[0][0]
    rows, width = 8, old.num_tokens // 8
    p = width - max(len(c) for c in rollout.completions)
    for i in range(rows):
        n_p, n_c = len(rollout.prompts[i]), len(rollout.completions[i])
        own = old[i * width + p - n_p : i * width + p + n_c]
        assert torch.equal(own.indices, rollout.routes[i].indices)
        assert bool(own.missing[-1].all())  # the last token: never routed during generation
        pad = old[i * width : i * width + p - n_p]
        assert pad.num_tokens == 0 or bool(pad.missing.all())


def test_metrics_are_logged_every_step_and_in_range(trained: Any) -> None:
    logs = trained.logs
    assert len(logs) == 4
    for entry in logs:
        for key in ("moe_replay/train/decisions_differ", "moe_replay/train/tokens_differ", "moe_replay/native_rows"):
            assert key in entry and 0.0 <= entry[key] <= 1.0, (key, entry.get(key))
        assert entry["moe_replay/train/decisions_differ"] <= entry["moe_replay/train/tokens_differ"]
        assert 0.0 < entry["moe_replay/native_rows"] < 0.5  # the last token of each sequence, nothing else
        assert "clip_ratio/region_mean" in entry  # TRL's own ratio statistics are still logged
        assert 0.0 < entry["moe_replay/ratio/min"] <= entry["moe_replay/ratio/max"]
        assert 0.0 <= entry["moe_replay/ratio/outside_clip"] <= 1.0
    assert "moe_replay/old/decisions_differ" in logs[0]
    # the first loss pass runs the weights the rollout ran: the ratio is 1 and free routing agrees
    assert logs[0]["moe_replay/ratio/max"] == pytest.approx(1.0, abs=1e-4)
    assert logs[0]["moe_replay/train/decisions_differ"] == 0.0
    assert logs[0]["moe_replay/old/decisions_differ"] <= 0.05  # float32: the KV cache moves a decision rarely if ever


def _forward_metrics(t: Any, rows: list[int], ids: torch.Tensor, mask: torch.Tensor, c: int) -> dict[str, float]:
    """Run the trainer's forward over a batch of the held rollout; return the metrics it appended."""
    t._metrics["train"].clear()
    t._mr_batch = ("train", rows, None)
    try:
        with torch.no_grad():
            t._get_per_token_logps_and_entropies(t.model, ids, mask, c)
    finally:
        t._mr_batch = None
    out = {k: v[-1] for k, v in t._metrics["train"].items()}
    t._metrics["train"].clear()
    return out


def test_measured_disagreement_matches_compare_of_a_free_forward(trained: Any) -> None:
    t = trained.trainer
    rollout = t._mr_rollouts["train"]
    rows = list(range(len(rollout.routes)))
    ids, mask, c = grid(rollout, rows)
    routes = mr_trl._batch_routes(rollout, rows, ids, mask, c).routes
    # measure mode: the figure is compare() of a free forward against the rollout's routes
    t._mr_mode = "measure"
    try:
        got = _forward_metrics(t, rows, ids, mask, c)
    finally:
        t._mr_mode = "replay"
    with torch.no_grad(), t.moe_session.capture():
        t.model(input_ids=ids, attention_mask=mask)
    free = mr.compare(t.moe_session.routes(), routes)
    assert got["moe_replay/train/decisions_differ"] == pytest.approx(free.overall)
    assert got["moe_replay/train/tokens_differ"] == pytest.approx(free.token_fraction)
    assert free.overall > 0  # the policy was trained after this rollout: some decisions moved


def test_replay_mode_measures_the_router_that_would_choose_otherwise(trained: Any) -> None:
    t = trained.trainer
    rollout = t._mr_rollouts["train"]
    rows = list(range(len(rollout.routes)))
    ids, mask, c = grid(rollout, rows)
    gate = t.model.model.layers[0].mlp.gate.weight
    with torch.no_grad():
        gate.neg_()  # the first router now ranks its experts upside down: its free top-2 is the old bottom-2
    try:
        flipped = _forward_metrics(t, rows, ids, mask, c)
    finally:
        with torch.no_grad():
            gate.neg_()
    assert flipped["moe_replay/train/tokens_differ"] == 1.0
    assert flipped["moe_replay/train/decisions_differ"] >= 0.5  # one of the two routers differs everywhere


def test_native_rows_share_matches_the_layout(trained: Any) -> None:
    rollout = trained.trainer._mr_rollouts["train"]
    tokens = sum(len(p) + len(c) for p, c in zip(rollout.prompts, rollout.completions, strict=True))
    expected = len(rollout.routes) / tokens  # one -1 row per sequence, in every router
    whole = mr.Routes.cat(rollout.routes)
    assert float(whole.missing.float().mean()) == pytest.approx(expected)


def test_a_batch_whose_every_row_is_native_is_routed_natively_not_refused(trained: Any) -> None:
    """A strict replay refuses routes whose every row is -1; the trainer's batch of such rows (every prompt token
    served from an engine's prefix cache, completions of one token) holds nothing to force, and runs natively, its
    tokens checked as any batch's."""
    t = trained.trainer
    rollout = t._mr_rollouts["train"]
    held, layouts = rollout.routes, dict(rollout.layouts)
    blank = [
        mr.Routes([torch.full_like(x, -1) for x in r.per_layer()], names=r.names, num_experts=r.experts_per_layer)
        for r in held
    ]
    rollout.routes, rollout.layouts = [b.with_token_ids(r.token_ids) for b, r in zip(blank, held, strict=True)], {}
    try:
        rows = list(range(len(held)))
        ids, mask, c = grid(rollout, rows)
        got = _forward_metrics(t, rows, ids, mask, c)
        assert got["moe_replay/native_rows"] == 1.0
        with pytest.raises(mr.RoutesValidationError, match="do not line up"):  # (its tokens are still checked)
            _forward_metrics(t, rows, ids.flip(0), mask.flip(0), c)
    finally:
        rollout.routes, rollout.layouts = held, layouts


def grid(rollout: Any, rows: list[int], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """TRL's batch for ``rows`` of a rollout: prompts left-padded, completions right-padded (plus ``extra`` columns)."""
    p = max(len(x) for x in rollout.prompts)
    c = max(len(x) for x in rollout.completions) + extra
    ids = torch.full((len(rows), p + c), PAD)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows):
        seq = rollout.prompts[i] + rollout.completions[i]
        start = p - len(rollout.prompts[i])
        ids[r, start : start + len(seq)] = torch.tensor(seq)
        mask[r, start : start + len(seq)] = 1
    return ids, mask, c


def test_a_batch_that_does_not_match_its_routes_is_refused(trained: Any) -> None:
    rollout = trained.trainer._mr_rollouts["train"]
    rows = [0, 1]
    ids, mask, c = grid(rollout, rows, extra=1)
    batch = mr_trl._batch_routes(rollout, rows, ids, mask, c)  # lines up
    assert batch.routes.num_tokens == ids.numel()
    bad = ids.clone()
    p = ids.shape[1] - c
    bad[1, p] = (bad[1, p] + 1) % VOCAB
    with pytest.raises(mr.RoutesValidationError, match="do not line up"):
        mr_trl._batch_routes(rollout, rows, bad, mask, c)
    with pytest.raises(mr.RoutesValidationError, match="do not line up"):
        mr_trl._batch_routes(rollout, rows[::-1], ids, mask, c)
    with pytest.raises(mr.RoutesValidationError, match="do not line up"):
        mr_trl._batch_routes(rollout, rows, ids[:, 1:], mask[:, 1:], c)  # a prompt column cut off
    with pytest.raises(mr.RoutesValidationError, match="attends to position"):
        mr_trl._batch_routes(rollout, rows, ids, torch.ones_like(mask), c)


def test_loss_on_a_batch_without_routes_is_refused(trained: Any) -> None:
    t = trained.trainer
    inputs = {"prompt_ids": torch.zeros(1, 2, dtype=torch.long)}
    with pytest.raises(mr.RoutesValidationError, match="moe_replay_ids"):
        t.compute_loss(t.model, inputs)
    stale = {"moe_replay_ids": torch.tensor([[t._mr_rollouts["train"].serial - 1, 0]])}
    with pytest.raises(mr.RoutesValidationError, match="generation batch"):
        t.compute_loss(t.model, stale)


def test_off_attaches_nothing_and_measure_does_not_force() -> None:
    with tempfile.TemporaryDirectory() as out:
        model = policy()
        forwards = {n: m.forward for n, m in model.named_modules()}
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=reward, args=config(out, max_steps=1), train_dataset=dataset(),
            processing_class=tokenizer(), routing_replay="off",
        )  # fmt: skip
        assert trainer.moe_session is None
        assert all(getattr(m.forward, "__moe_replay_hook__", None) is None for m in model.modules())
        trainer.train()
        assert not any(k.startswith("moe_replay/") for k in trainer.state.log_history[0])
        assert {n: m.forward for n, m in model.named_modules()}.keys() == forwards.keys()

        model = policy()
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=reward, args=config(out, max_steps=4), train_dataset=dataset(),
            processing_class=tokenizer(), routing_replay="measure",
        )  # fmt: skip
        replays = spy_replays(trainer.moe_session)
        trainer.train()
        assert replays == []
        logs = trainer.state.log_history[:-1]
        assert all(0.0 <= e["moe_replay/train/decisions_differ"] <= 1.0 for e in logs)
        trainer.detach_routing_replay()
        assert all(getattr(m.forward, "__moe_replay_hook__", None) is None for m in model.modules())


def test_reference_model_of_the_same_architecture_is_replayed(tmp_path: Any) -> None:
    # beta != 0: TRL builds the reference model from the policy's path
    path = tmp_path / "policy"
    policy(seed=1).save_pretrained(path)
    tokenizer().save_pretrained(path)
    trainer = mr_trl.RoutingReplayGRPOTrainer(
        model=str(path), reward_funcs=reward, args=config(str(tmp_path / "out"), max_steps=1, beta=0.1),
        train_dataset=dataset(), processing_class=tokenizer(),
    )  # fmt: skip
    assert trainer.moe_ref_session is not None
    ref_replays = spy_replays(trainer.moe_ref_session)
    trainer.train()
    assert len(ref_replays) == 1
    (routes, c), = ref_replays  # fmt: skip
    assert int(c.differ.sum()) == 0 and int(c.compared.sum()) == int((~routes.missing).sum())
    assert "moe_replay/ref/decisions_differ" in trainer.state.log_history[0]
    trainer.detach_routing_replay()


def test_verify_replay_checks_every_forward_itself() -> None:
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, args=config(out, max_steps=2), train_dataset=dataset(),
            processing_class=tokenizer(), verify_replay=True,
        )  # fmt: skip
        checked = []
        original = mr_trl.compare
        mr_trl.compare = lambda a, b: checked.append(original(a, b)) or checked[-1]  # type: ignore[assignment]
        try:
            trainer.train()
        finally:
            mr_trl.compare = original
        assert len(checked) == 3  # the old-logprob forward and two loss forwards
        assert all(int(c.differ.sum()) == 0 and int(c.compared.sum()) > 0 for c in checked)
        trainer.detach_routing_replay()


def test_verify_replay_of_completions_the_batch_masks_out_is_not_refused() -> None:
    # the truncated completions TRL masks out are rows the loss forwards do not attend to (compare() leaves such
    # rows out as padding), while the rollout's routes hold them: the check compares them too, and they were forced
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer(),
            args=config(out, max_steps=1, max_completion_length=3, mask_truncated_completions=True),
            verify_replay=True,
        )  # fmt: skip
        trainer.train()
        trainer.detach_routing_replay()
    assert trainer.state.log_history[0]["completions/clipped_ratio"] == 1.0


@pytest.mark.reliability("silent replays")
def test_verify_replay_checks_the_completions_the_batch_masks_out_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once silent: verify_replay left out the rows of completions TRL masks out (attention 0), so a loss forward
    that routed them otherwise than the replayed routes passed the check."""
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer(),
            args=config(out, max_steps=1, max_completion_length=3, mask_truncated_completions=True),
            verify_replay=True,
        )  # fmt: skip
        read, compare = mr.Session.routes, mr_trl.compare
        masks: list[torch.Tensor | None] = []
        monkeypatch.setattr(
            mr.Session,
            "routes",
            lambda self, *a, **k: masks.append(read(self, *a, **k)._fed_mask) or read(self, *a, **k),
        )

        def other_at_masked_rows(a: mr.Routes, b: mr.Routes) -> Any:
            # the replayed routes with other experts at the rows the forward did not attend to: as if it had not
            # used the replayed experts there
            masked = masks[-1] == 0 if masks[-1] is not None else torch.zeros(a.num_tokens, dtype=torch.bool)
            assert bool(masked.any())
            rows = [
                torch.where(masked[:, None] & (x >= 0), (x + 1) % e, x)
                for x, e in zip(b.per_layer(), b.experts_per_layer, strict=True)
            ]
            return compare(a, mr.Routes(rows, names=b.names, num_experts=b.experts_per_layer))

        monkeypatch.setattr(mr_trl, "compare", other_at_masked_rows)
        try:
            with pytest.raises(mr.RoutesValidationError, match="did not use every replayed expert"):
                trainer.train()
        finally:
            trainer.detach_routing_replay()


def test_load_balancing_loss_follows_the_replayed_experts(trained: Any) -> None:
    # the aux loss the trainer adds is computed from the replayed experts: forcing other experts changes it
    t = trained.trainer
    rollout = t._mr_rollouts["train"]
    rows = list(range(len(rollout.routes)))
    ids, mask, c = grid(rollout, rows)
    t._mr_batch = ("train", rows, None)
    try:
        with torch.no_grad():
            _, _, aux = t._get_per_token_logps_and_entropies(t.model, ids, mask, c, compute_aux_loss=True)
    finally:
        t._mr_batch = None
    batch = mr_trl._batch_routes(rollout, rows, ids, mask, c)
    session = t.moe_session
    with torch.no_grad(), session.replay(batch.routes), session.keep_scores() as kept:
        t.model(input_ids=ids, attention_mask=mask)
    expected = mr.load_balancing_loss(kept.scores, kept.indices, mask=mask.reshape(-1))
    assert float(aux) == pytest.approx(float(expected), rel=1e-5)
    # the experts the forward used are the rollout's on every recorded row
    for name, used in zip(kept.names, kept.indices, strict=True):
        rec = batch.routes.layer(name)
        ok = rec[:, 0] >= 0
        assert torch.equal(used[ok].sort(-1).values, rec[ok].sort(-1).values)


def test_unsupported_setups_are_refused_before_training() -> None:
    with tempfile.TemporaryDirectory() as out:
        for kw, match in (
            (dict(args=config(out, use_vllm=True, vllm_mode="server")), "colocate"),
            (dict(args=config(out), tools=[len]), "tools"),
            (dict(args=config(out, use_transformers_continuous_batching=True)), "continuous_batching"),
            (dict(args=config(out, generation_kwargs={"prefill_chunk_size": 2})), "chunked prefill"),
            (dict(args=config(out, generation_kwargs={"num_beams": 2})), "beam search"),
            (dict(args=config(out, generation_kwargs={"prompt_lookup_num_tokens": 3})), "assisted decoding"),
            (dict(args=config(out, generation_kwargs={"use_cache": False})), "use_cache=False"),
        ):
            with pytest.raises(mr_trl.UnsupportedTrainerSetupError, match=match):
                mr_trl.RoutingReplayGRPOTrainer(
                    model=policy(), reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer(), **kw
                )
    with pytest.raises(ValueError, match="routing_replay"):
        mr_trl.RoutingReplayGRPOTrainer(model=policy(), routing_replay="sometimes")


@pytest.mark.reliability("bad inputs")
def test_a_routing_replay_mode_that_is_no_string_is_refused_as_such() -> None:
    """Once a bare TypeError: the mode was looked up in a dict first, and a list or an array is unhashable."""
    for mode in (["replay"], np.array(["replay"]), torch.tensor([1])):
        with pytest.raises(mr.InvalidArgumentError, match="routing_replay must be one of"):
            mr_trl.RoutingReplayGRPOTrainer(model=policy(), routing_replay=mode)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(attach_kwargs={"capacity": 10}), "pass capacity= to the trainer itself"),
        (dict(attach_kwargs={"keep_newest": True}), "keep_newest.*drops the rollout's first rows"),
        (dict(attach_kwargs={"inclde": "x"}), r"\['inclde'\] are not options of mr.attach.*'include'"),
        (dict(attach_kwargs=["include"]), "attach_kwargs must be a dict"),
        (dict(verify_replay="no"), "verify_replay must be True or False, got 'no'"),
        (dict(allow_untested_trl="false"), "allow_untested_trl must be True or False, got 'false'"),
        (dict(replay_ref_model="yes"), "replay_ref_model must be None, True or False"),
        (dict(capacity="big"), "capacity must be a positive number"),
    ],
)
def test_the_trainers_own_arguments_are_checked_before_trl_builds_anything(kw: dict[str, Any], match: str) -> None:
    model = policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mr.InvalidArgumentError, match=match):
        mr_trl.RoutingReplayGRPOTrainer(model=model, reward_funcs=reward, train_dataset=dataset(), **kw)
    assert all("forward" not in m.__dict__ for m in model.modules())  # refused before TRL or moe_replay wrapped it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_replay_ref_model_true_without_a_reference_model_is_refused() -> None:
    """``replay_ref_model=True`` promises a replayed reference forward; with beta=0 there is none."""
    model = policy()
    with tempfile.TemporaryDirectory() as out:
        with pytest.raises(mr_trl.UnsupportedTrainerSetupError, match="replay_ref_model=True, but beta=0.0"):
            mr_trl.RoutingReplayGRPOTrainer(
                model=model, reward_funcs=reward, args=config(out, beta=0.0), train_dataset=dataset(),
                processing_class=tokenizer(), replay_ref_model=True,
            )  # fmt: skip
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert routers and all("forward" not in m.__dict__ for m in routers)  # the policy's session was detached


def test_a_dense_policy_is_refused_in_the_trainers_words() -> None:
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    dense = transformers.AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory() as out, pytest.raises(mr.RouterNotFoundError) as info:
        mr_trl.RoutingReplayGRPOTrainer(
            model=dense, reward_funcs=reward, args=config(out), train_dataset=dataset(), processing_class=tokenizer()
        )
    text = str(info.value)
    assert "needs an MoE policy" in text and "attach_kwargs=" in text and "routing_replay='off'" in text


@pytest.mark.parametrize(("setting", "match"), [("num_beams", "beam search"), ("prefill_chunk_size", "chunked")])
def test_a_model_generation_config_that_reorders_rows_is_refused(setting: str, match: str) -> None:
    model = policy()
    setattr(model.generation_config, setting, 2)
    with tempfile.TemporaryDirectory() as out, pytest.raises(mr_trl.UnsupportedTrainerSetupError, match=match):
        mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer(), args=config(out)
        )


# ----------------------------------------------------------------------------- R3: vLLM outputs
def _vllm_output(prompt: list[int], completion: list[int], routes: mr.Routes, num_layers: int, lm: mr.LayerMap) -> Any:
    """A RequestOutput as vLLM 0.22+ writes it: one routed_experts array over prompt and completion,
    ``[prompt_len + gen_len - 1, num_hidden_layers, k]`` (dense layers' columns 0), uint8 up to 256 experts."""
    body = routes[: routes.num_tokens - 1]
    arr = np.zeros((body.num_tokens, num_layers, lm.k), dtype=np.uint8)
    for name in body.names:
        arr[:, lm.column(name, "all")] = body.layer(name).numpy().astype(np.uint8)
    comp = SimpleNamespace(token_ids=list(completion), routed_experts=arr)
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=[comp])


def test_vllm_routed_experts_give_the_generation_routes() -> None:
    # a 3-layer model whose first layer is dense: vLLM writes zeros in that column
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, pad_token_id=PAD, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        completions = [row[width:].tolist() for row in out]
        from_generate = mr_trl.rollout_routes_from_generate(session.routes(), prompts, completions)
        for r, p, c in zip(from_generate, prompts, completions, strict=True):
            assert r.token_ids.tolist() == p + c
        # completions in another order than generate() returned them: their tokens are not their rows'
        with pytest.raises(mr.RoutesValidationError, match="new tokens in sequences are not the tokens"):
            mr_trl.rollout_routes_from_generate(
                session.routes(), prompts, [completions[1], completions[0], completions[2]]
            )
        lm = mr.LayerMap.from_session(session, num_layers=3)
    assert lm.dense_layers == (0,)
    outputs = [_vllm_output(p, c, r, 3, lm) for p, c, r in zip(prompts, completions, from_generate, strict=True)]
    assert outputs[0].outputs[0].routed_experts.shape == (len(prompts[0]) + 4 - 1, 3, 2)
    from_vllm = mr_trl.rollout_routes_from_vllm(outputs, prompts, completions, lm)
    for a, b in zip(from_generate, from_vllm, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.token_ids, b.token_ids)
    # completions out of order are refused, as are outputs without routed_experts
    with pytest.raises(mr.RoutesValidationError, match="order"):
        mr_trl.rollout_routes_from_vllm(outputs[::-1], prompts, completions, lm)
    outputs[1].outputs[0].routed_experts = None
    with pytest.raises(mr.RoutesValidationError, match="enable_return_routed_experts"):
        mr_trl.rollout_routes_from_vllm(outputs, prompts, completions, lm)


@pytest.mark.reliability("bad inputs")
def test_rollout_token_ids_that_are_not_integers_are_refused_not_cut() -> None:
    """A token id 5.4 is no token: cut to 5 it would pass the check against the ids the routes were recorded for.

    Token lists of the wrong kind (None, a string, outputs without completions) are refused with a
    MoEReplayError naming the argument, never numpy's or Python's own error; numpy arrays of ids
    (a RequestOutput built from arrays) are read as the lists they hold.
    """
    model = policy().eval()
    prompts = [[5, 6, 7], [8, 9]]
    ids = torch.tensor([[5, 6, 7], [PAD, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        completions = [row[3:].tolist() for row in out]
        routes = session.routes()
        seqs = mr_trl.rollout_routes_from_generate(routes, prompts, completions)
        lm = mr.LayerMap.from_session(session, num_layers=2)
        for bad in ([[5.4, 6, 7], [8, 9]], [["5", 6, 7], [8, 9]], [[True, 6, 7], [8, 9]], ["abc", [8, 9]], None):
            with pytest.raises(mr.MoEReplayError, match="prompt_ids"):
                mr_trl.rollout_routes_from_generate(routes, bad, completions)
        with pytest.raises(mr.MoEReplayError, match="pad_to_multiple_of"):
            mr_trl.rollout_routes_from_generate(routes, prompts, completions, pad_to_multiple_of=2.5)
    outputs = [_vllm_output(p, c, r, 2, lm) for p, c, r in zip(prompts, completions, seqs, strict=True)]
    outputs[0].prompt_token_ids = np.array(prompts[0])  # ids held as an array: read as the list it holds
    got = mr_trl.rollout_routes_from_vllm(outputs, prompts, completions, lm)
    for a, b in zip(got, seqs, strict=True):
        assert torch.equal(a.indices, b.indices) and a.token_ids.equal(b.token_ids)
    with pytest.raises(mr.MoEReplayError, match="prompt_ids"):
        mr_trl.rollout_routes_from_vllm(outputs, [[5.4, 6, 7], [8, 9]], completions, lm)
    outputs[1].outputs[0].token_ids = [float(t) for t in completions[1]]
    with pytest.raises(mr.MoEReplayError, match="token_ids of completion 1"):
        mr_trl.rollout_routes_from_vllm(outputs, prompts, completions, lm)
    for bad_outputs in (None, [SimpleNamespace(prompt_token_ids=prompts[0], outputs=None)] * 2):
        with pytest.raises(mr.MoEReplayError, match="outputs"):
            mr_trl.rollout_routes_from_vllm(bad_outputs, prompts, completions, lm)


def test_generation_without_kv_cache_is_refused() -> None:
    # without a cache every decode step routes the whole sequence again: no single route per token exists
    model = policy().eval()
    prompts = [[5, 6, 7], [8, 9]]
    ids = torch.tensor([[5, 6, 7], [PAD, 8, 9]])
    mask = (ids != PAD).long()
    with mr.attach(model) as session:
        for use_cache, fails in ((True, False), (False, True)):
            with session.capture(), torch.no_grad():
                out = model.generate(
                    ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD, use_cache=use_cache
                )
            completions = [row[3:].tolist() for row in out]
            if fails:
                with pytest.raises(mr.RoutesValidationError, match="KV cache"):
                    mr_trl.rollout_routes_from_generate(session.routes(), prompts, completions)
            else:
                seqs = mr_trl.rollout_routes_from_generate(session.routes(), prompts, completions)
                assert [r.num_tokens for r in seqs] == [6, 5]


class _FakeLLM:
    """Stands in for vLLM's ``LLM`` on CPU: generates with a copy of the policy (the "engine") and
    returns RequestOutputs whose routed_experts are the engine's own routes, in vLLM 0.22+'s layout."""

    def __init__(self, engine: Any, num_layers: int, max_tokens: int) -> None:
        self.engine, self.num_layers, self.max_tokens = engine, num_layers, max_tokens
        self.session = mr.attach(engine)
        self.lm = mr.LayerMap.from_session(self.session, num_layers=num_layers)

    def generate(self, prompts: list[dict[str, Any]], sampling_params: Any = None, use_tqdm: bool = False) -> list[Any]:
        outs = []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            with self.session.capture(), torch.no_grad():
                seq = self.engine.generate(ids, max_new_tokens=self.max_tokens, do_sample=True, pad_token_id=PAD)
            comp = seq[0, ids.shape[1] :].tolist()
            if EOS in comp:
                comp = comp[: comp.index(EOS) + 1]
            routes = mr_trl.rollout_routes_from_generate(self.session.routes(), [ids[0].tolist()], [comp])[0]
            out = _vllm_output(ids[0].tolist(), comp, routes, self.num_layers, self.lm)
            with torch.no_grad():  # the sampled tokens' logprobs, as vLLM returns them
                logits = self.engine(seq[:, : ids.shape[1] + len(comp)]).logits[0, ids.shape[1] - 1 : -1]
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None])[:, 0].tolist()
            out.outputs[0].logprobs = [{t: SimpleNamespace(logprob=v)} for t, v in zip(comp, lp, strict=True)]
            outs.append(out)
        return outs


class _FakeVLLMGeneration:
    """TRL's VLLMGeneration in colocate mode, reduced to what GRPOTrainer calls."""

    def __init__(self, llm: _FakeLLM, trainer_model: Any) -> None:
        self.llm, self.model, self.tensor_parallel_size = llm, trainer_model, 1

    def sync_weights(self) -> None:
        self.llm.engine.load_state_dict(self.model.state_dict())

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts])
        completion_ids = [o.outputs[0].token_ids for o in outs]
        logprobs = [[[next(iter(d.values())).logprob] for d in o.outputs[0].logprobs] for o in outs]
        return [o.prompt_token_ids for o in outs], completion_ids, logprobs, None


def test_r3_trains_on_the_engines_routes() -> None:
    # use_vllm=True needs vLLM and a GPU; here the trainer's vLLM object is replaced by a CPU stand-in
    # that returns RequestOutputs in vLLM's format, and the trainer takes its generate() path for vLLM
    with tempfile.TemporaryDirectory() as out:
        model = policy(seed=2)
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=model, reward_funcs=reward, args=config(out, max_steps=2), train_dataset=dataset(),
            processing_class=tokenizer(),
        )  # fmt: skip
        engine = policy(seed=2)
        trainer.use_vllm = True
        trainer.vllm_generation = _FakeVLLMGeneration(_FakeLLM(engine, 2, 5), trainer.model)
        trainer._last_loaded_step = -1
        replays = spy_replays(trainer.moe_session)
        trainer.train()
        rollout = trainer._mr_rollouts["train"]
        assert rollout.source == "vLLM routed_experts"
        assert len(replays) >= 2
        for routes, c in replays:
            assert int(c.differ.sum()) == 0 and int(c.compared.sum()) == int((~routes.missing).sum())
        logs = trainer.state.log_history[:-1]
        assert "sampling/importance_sampling_ratio/max" in logs[0]  # TRL's own vLLM ratio statistics
        assert 0.0 <= logs[0]["moe_replay/old/decisions_differ"] <= 1.0
        assert math.isfinite(logs[0]["moe_replay/ratio/max"])
        trainer.detach_routing_replay()
        trainer.vllm_generation.llm.session.detach()


def test_the_colocated_engine_is_started_with_routed_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    # TRL builds its colocated engine with `LLM(...)` from trl.generation.vllm_generation
    from trl.generation import vllm_generation

    made: list[dict[str, Any]] = []
    monkeypatch.setattr(vllm_generation, "LLM", lambda *a, **kw: made.append(kw), raising=False)
    with mr_trl._engine_returns_routes(True):
        vllm_generation.LLM(model="m", seed=0)
    vllm_generation.LLM(model="m")  # outside: as TRL wrote it
    assert made == [{"model": "m", "seed": 0, "enable_return_routed_experts": True}, {"model": "m"}]


def test_the_core_does_not_import_trl() -> None:
    import subprocess
    import sys

    code = "import sys, moe_replay, moe_replay.integrations; assert 'trl' not in sys.modules, 'trl was imported'"
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})


def test_a_model_generation_config_overridden_by_the_trainer_is_not_refused() -> None:
    """Once refused: the model's num_beams=4 was refused though generation_kwargs={'num_beams': 1} overrides it,
    and generate() samples with one beam."""
    model = policy()
    model.generation_config.num_beams = 4
    with tempfile.TemporaryDirectory() as out:
        mr_trl.RoutingReplayGRPOTrainer(
            model=model,
            reward_funcs=reward,
            train_dataset=dataset(),
            processing_class=tokenizer(),
            args=config(out, generation_kwargs={"num_beams": 1}),
        )


@pytest.mark.reliability
@pytest.mark.parametrize("replay_ref_model", [None, False])
def test_a_peft_policys_reference_forward_is_logged_and_replayed_as_the_reference(replay_ref_model: Any) -> None:
    """Once wrong: a PEFT policy's reference forward (the policy with its adapter disabled) was logged under
    ``old/*``, averaged with the old-logprob forward, and replayed even with ``replay_ref_model=False``."""
    peft = pytest.importorskip("peft")
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, args=config(out, max_steps=1, beta=0.1), train_dataset=dataset(),
            processing_class=tokenizer(), peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            replay_ref_model=replay_ref_model,
        )  # fmt: skip
        assert trainer.ref_model is None  # TRL's PEFT reference: the policy itself, its adapter disabled
        disabled: list[bool] = []
        original = trainer.moe_session.replay

        @contextlib.contextmanager
        def replay(routes: mr.Routes, **kwargs: Any) -> Any:
            disabled.append(bool(trainer.model._adapters_disabled))
            with original(routes, **kwargs):
                yield trainer.moe_session

        trainer.moe_session.replay = replay  # type: ignore[method-assign]
        logged: list[str] = []
        metrics = trainer._metrics["train"]
        append = type(metrics).__getitem__

        class Spy(type(metrics)):  # type: ignore[misc]
            def __getitem__(self, key: str) -> Any:
                logged.append(key)
                return append(self, key)

        trainer._metrics["train"] = Spy(metrics.default_factory, metrics)
        trainer.train()
        trainer.detach_routing_replay()
    # one old-logprob forward, one reference forward, one loss forward; each logged under its own name
    assert logged.count("moe_replay/old/decisions_differ") == 1
    if replay_ref_model is None:
        assert disabled == [False, True, False]  # the reference forward replays the rollout's experts too
        assert logged.count("moe_replay/ref/decisions_differ") == 1
    else:
        assert disabled == [False, False]  # replay_ref_model=False: the reference routes natively
        assert "moe_replay/ref/decisions_differ" not in logged


@pytest.mark.reliability
def test_completions_the_batch_masks_out_are_not_measured() -> None:
    """Once misleading: with ``mask_truncated_completions`` the truncated completions' tokens are forwarded with
    no attention to themselves; their free choices were counted, and the first step (the rollout's own weights)
    reported 13% of decisions differing where every decision the loss sees agreed."""
    with tempfile.TemporaryDirectory() as out:
        trainer = mr_trl.RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, train_dataset=dataset(), processing_class=tokenizer(),
            args=config(out, max_steps=1, max_completion_length=3, mask_truncated_completions=True),
        )  # fmt: skip
        trainer.train()
        trainer.detach_routing_replay()
    log = trainer.state.log_history[0]
    assert log["completions/clipped_ratio"] == 1.0  # every completion truncated, so masked out
    assert log["moe_replay/train/decisions_differ"] == 0.0 and log["moe_replay/train/tokens_differ"] == 0.0
    assert log["moe_replay/old/decisions_differ"] <= 0.05


@pytest.mark.reliability
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_router_probabilities_rounded_to_low_precision_are_not_softmaxed_again(dtype: torch.dtype) -> None:
    """Once silent: a bfloat16 softmax sums to 1 within 3e-3 only; its probabilities were taken for logits and the
    trainer's load-balancing loss was computed from their softmax (nearly uniform)."""
    torch.manual_seed(0)
    logits = torch.randn(256, 8, dtype=dtype) * 2
    probs = logits.softmax(-1)
    assert mr_trl._probabilities(probs) is probs
    assert torch.allclose(mr_trl._probabilities(logits), logits.float().softmax(-1))  # logits are still softmaxed
    sigmoid = logits.sigmoid()  # scores that are no distribution, nor logits: refused (see below)
    with pytest.raises(mr.UnsupportedRouterError, match="router_aux_loss_coef=0.0"):
        mr_trl._probabilities(sigmoid)


class _HandRouter(torch.nn.Module):
    """A router over 8 experts of 16 features, ``top-2``: ``"softmax"`` picks on the softmax (Qwen-MoE, Mixtral),
    ``"logits"`` on the logits and softmaxes the two after (GPT-OSS), ``"sigmoid"`` on sigmoid scores plus a balancing
    bias (DeepSeek-V3, MiniMax-M2, whose own aux loss is a softmax of the logits, not of these scores; ``"sigmoid, no
    bias"`` with a bias of zeros)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.randn(8, 16))
        self.register_buffer("bias", 0.1 * torch.randn(8) * (kind != "sigmoid, no bias"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x, self.weight)
        if self.kind == "softmax":
            return logits.softmax(-1).topk(2, dim=-1)
        if self.kind == "logits":
            top, idx = logits.topk(2, dim=-1)
            return top.softmax(-1), idx
        scores = logits.sigmoid()
        idx = (scores + self.bias).topk(2, dim=-1).indices
        w = scores.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx


class _HandBlock(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.router = _HandRouter(kind)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return out


def _replayed_aux(kind: str, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _HandBlock]:
    """The trainer's replacement aux loss of a replayed forward of a :class:`_HandBlock` (after its router changed),
    with the inputs and the replayed experts."""
    torch.manual_seed(0)
    block, x = _HandBlock(kind), torch.randn(24, 16)
    mask = (torch.arange(24) % 5 != 0).long()  # (some padding)
    with mr.attach(block) as session:
        with torch.no_grad(), session.capture():
            block(x)
        routes = session.routes()
        with torch.no_grad():
            block.router.weight.add_(torch.randn(8, 16))
        with torch.set_grad_enabled(grad), session.replay(routes), session.keep_scores() as kept:
            block(x)
            aux = mr_trl._replay_aux_loss(kept, mask)
    return aux, x, routes.layer("router").long(), block


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize("kind", ["softmax", "logits"])
def test_the_replay_aux_loss_is_the_switch_loss_of_the_replayed_experts_by_hand(kind: str) -> None:
    """The trainer's aux loss in a replay: ``E * sum_e f_e * P_e`` over the tokens the mask counts, ``f_e`` the share
    of the replayed experts, ``P_e`` the mean softmax of the router's logits (the model's own probabilities), written
    here by hand from the router's weight; its gradient reaches the router."""
    aux, x, used, block = _replayed_aux(kind, grad=True)
    keep = (torch.arange(24) % 5 != 0).float()
    probs = (x @ block.router.weight.detach().T).softmax(-1)
    counts = torch.zeros(24, 8).scatter_add_(1, used, torch.ones_like(used, dtype=torch.float))
    f = (counts * keep[:, None]).sum(0) / keep.sum()
    p = (probs * keep[:, None]).sum(0) / keep.sum()
    assert float(aux) == pytest.approx(float(8 * (f * p).sum()), rel=1e-5)
    aux.backward()
    assert block.router.weight.grad is not None and bool(block.router.weight.grad.abs().sum() > 0)


@pytest.mark.reliability("silent replays")
@pytest.mark.parametrize(
    ("kind", "grad"),
    [
        pytest.param("sigmoid", True, id="biased-with-gradients"),
        pytest.param("sigmoid, no bias", False, id="no-gradients"),
        pytest.param("sigmoid", False, id="biased-no-gradients"),
    ],
)
def test_the_replay_aux_loss_of_a_sigmoid_router_is_refused(kind: str, grad: bool) -> None:
    """Once silent: the scores of a sigmoid router (DeepSeek-V3 style, plus a balancing bias) were taken for logits
    and softmaxed, a loss that is neither the model's own (a softmax of its logits) nor any other's. Refused, naming
    the router and what to do (the sigmoid seen in the scores' graph; with no graph, scores all in ``[0, 1]``, or a
    sigmoid the calls of the router's forward showed when its decision was established: once silent where a bias
    moved the scores out of ``[0, 1]``)."""
    with pytest.raises(mr.UnsupportedRouterError, match="router 'router' .*router_aux_loss_coef=0.0"):
        _replayed_aux(kind, grad)


def disagreement_by_hand(
    scores: list[torch.Tensor],
    rollout: list[torch.Tensor],
    used: list[torch.Tensor],
    replaying: bool,
    mask: torch.Tensor,
) -> tuple[float, float] | None:
    """The two logged shares written out token by token: the free choice is the scores' top-k under replay, the
    experts used otherwise; rows the rollout did not record (-1) or the batch does not attend to are left out."""
    attended = mask.reshape(-1).tolist()
    n_diff = n_cmp = 0
    tokens: dict[int, bool] = {}
    for sc, roll, use in zip(scores, rollout, used, strict=True):
        k = roll.shape[1]
        for t in range(roll.shape[0]):
            if int(roll[t, 0]) < 0 or not attended[t]:
                continue
            free = set(sc[t].float().topk(k).indices.tolist()) if replaying else set(use[t].tolist())
            differs = free != set(roll[t].tolist())
            n_cmp, n_diff = n_cmp + 1, n_diff + differs
            tokens[t] = tokens.get(t, False) or differs
    if not n_cmp:
        return None
    return n_diff / n_cmp, sum(tokens.values()) / len(tokens)


@pytest.mark.reliability("other")
def test_logged_disagreement_equals_a_hand_count() -> None:
    """The decisions_differ / tokens_differ figures against a hand count, on kept scores of several forwards, routers
    of 2 to 257 experts and k = 1 to 4, -1 rows, a padding mask, half-precision scores, rollout rows in any slot
    order; and where no decision is compared, no figure (once 0.0, which reads as full agreement)."""
    from moe_replay.losses import RouterScores

    rng = np.random.default_rng(0)
    for case in range(60):
        routers, b, s = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        t = b * s
        e = int(rng.choice([2, 8, 255, 256, 257]))
        k = int(rng.integers(1, min(e, 4) + 1))
        dtype = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
        replaying = case % 4 != 0
        none_recorded = case % 10 == 9
        mask = torch.from_numpy(rng.random((b, s)) < 0.8).long()
        names = [f"model.layers.{i}.mlp.gate" for i in range(routers)]
        kept, scores, rollout, used = RouterScores(names), [], [], []
        for name in names:
            sc = torch.randn(t, e).to(dtype)
            native = sc.topk(k, dim=-1).indices
            roll = torch.stack([torch.from_numpy(rng.permutation(e)[:k]) for _ in range(t)])
            agree = torch.from_numpy(rng.random(t) < 0.5)
            roll[agree] = native[agree][:, torch.from_numpy(rng.permutation(k))]  # the same experts, other slots
            roll[torch.from_numpy(rng.random(t) < 0.15) | none_recorded] = -1
            use = torch.where(roll < 0, native, roll) if replaying else native
            cut = int(rng.integers(0, t + 1))  # two forwards (TRL's chunks), concatenated by RouterScores
            kept._calls[name].extend([(sc[:cut], use[:cut], None), (sc[cut:], use[cut:], None)])
            scores.append(sc), rollout.append(roll), used.append(use)
        routes = mr.Routes(rollout, names=names, num_experts=e)
        batch = mr_trl._BatchRoutes(routes=routes, missing=routes.missing, native_share=0.0)
        got = mr_trl._disagreement(kept, batch, replaying, mask)
        want = disagreement_by_hand(scores, rollout, used, replaying, mask)
        if want is None:
            assert got is None, (case, got)
        else:
            assert got is not None and got == pytest.approx(want, abs=1e-12), (case, got, want)


@pytest.mark.reliability("other")
def test_logged_disagreement_of_a_group_limited_router_reads_its_group_mask() -> None:
    """Once silent: under replay the free choice of a group-limited router was the top-k of its scores without the
    group mask, so a replay of the very experts it chooses logged about a third of its decisions as differing."""
    model = mr.models.build("grouped_sigmoid", num_experts=16, n_group=4, topk_group=2, top_k=2)
    ids = torch.randint(1, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with mr.attach(model) as session:
        with session.capture():
            model(ids, attention_mask=mask)
        routes = session.routes()
        with session.replay(routes), session.keep_scores() as kept:
            model(ids, attention_mask=mask)
        batch = mr_trl._BatchRoutes(routes=routes, missing=routes.missing, native_share=0.0)
        assert mr_trl._disagreement(kept, batch, True, mask) == (0.0, 0.0)
        with torch.no_grad():  # routers that now choose other experts: the figure sees it, in both modes
            for layer in model.layers:
                layer.mlp.router.weight.neg_()
        with session.replay(routes), session.keep_scores() as kept:
            model(ids, attention_mask=mask)
        replayed = mr_trl._disagreement(kept, batch, True, mask)
        with session.capture(), session.keep_scores() as free:
            model(ids, attention_mask=mask)
        measured = mr_trl._disagreement(free, batch, False, mask)
        assert replayed is not None and replayed == measured == pytest.approx(
            (mr.compare(routes, session.routes()).overall, mr.compare(routes, session.routes()).token_fraction)
        )
        assert replayed[0] > 0.5


@pytest.mark.reliability("bad inputs")
def test_rollout_token_ids_of_every_integer_kind_are_read() -> None:
    """Once an empty prompt held as ``torch.tensor([])`` (float32: torch's dtype of an empty list) and ids held as a
    list of 0-d numpy integer arrays were refused as "not integer token ids": an empty tensor holds no value that is
    not an id, and a 0-d integer array is an integer. Both now give what the lists of ints give; a 0-d float array
    and a float tensor that holds values are still refused."""
    model = policy().eval()
    prompts = [[5, 6, 7], []]
    ids = torch.tensor([[5, 6, 7], [PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with mr.attach(model) as session:
        with session.capture(), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        routes = session.routes()
    completions = [row[3:].tolist() for row in out]
    want = mr_trl.rollout_routes_from_generate(routes, prompts, completions)
    assert want[1].num_tokens == len(completions[1])
    kinds = (
        ([torch.tensor(prompts[0]), torch.tensor([])], completions),
        (prompts, [[np.array(t) for t in c] for c in completions]),
        (
            [np.array(prompts[0]), np.array([], dtype=np.float64)],
            [[np.array(t, np.int32) for t in c] for c in completions],
        ),
    )
    for p, c in kinds:
        got = mr_trl.rollout_routes_from_generate(routes, p, c)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.indices, b.indices) and a.token_ids.equal(b.token_ids)
    for bad in ([[np.array(5.0), 6, 7], []], [torch.tensor([5.0, 6.0, 7.0]), []], [[np.array(True), 6, 7], []]):
        with pytest.raises(mr.RoutesValidationError, match=r"prompt_ids\[0\] must be integer token ids"):
            mr_trl.rollout_routes_from_generate(routes, bad, completions)
