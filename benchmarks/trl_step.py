"""The cost of routing replay in TRL's GRPOTrainer: ``python -m benchmarks.trl_step``.

Trains the same tiny random Qwen3-MoE policy with ``RoutingReplayGRPOTrainer`` in each
mode (``off``: a plain GRPOTrainer, ``measure``, ``replay``) for a few steps, round-robin
and repeated (rotated order each round), and prints each mode's median step time (TRL's
``step_time``: forward and backward, plus generation and scoring on the steps that start a
rollout) against ``off`` in the same round.

On a model this small every step is mostly Python overhead, so the ratios are an upper
bound of what the per-forward work (layout, token check, kept scores, metrics) costs;
on a real model that work stays the same while the forward grows.

Example:
    python -m benchmarks.trl_step --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny_setup() -> tuple[Any, Any, Any]:
    import datasets
    import tokenizers
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    words = [f"w{i}" for i in range(30)]
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="<pad>", eos_token="<eos>")
    prompts = datasets.Dataset.from_dict(
        {"prompt": [" ".join(words[(7 * i + j) % 30] for j in range(4)) for i in range(64)]}
    )

    def policy() -> Any:
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
            num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    return tok, prompts, policy


def step_times(mode: str, steps: int, tok: Any, prompts: Any, policy: Any) -> list[float]:
    """TRL's logged ``step_time`` of each step of one run."""
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from moe_replay.integrations.trl import RoutingReplayGRPOTrainer

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c)) for c in completions]

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
            steps_per_generation=2, num_iterations=2, max_steps=steps, learning_rate=1e-3, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = RoutingReplayGRPOTrainer(
            model=policy(), reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok,
            routing_replay=mode,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trainer.detach_routing_replay()
    return [e["step_time"] for e in trainer.state.log_history if "step_time" in e]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(1)
    tok, prompts, policy = _tiny_setup()
    modes = ["off", "measure", "replay"]
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes[r % 3 :] + modes[: r % 3]
        med = {m: statistics.median(step_times(m, args.steps, tok, prompts, policy)) for m in order}
        for m in modes:
            ratios[m].append(med[m] / med["off"])
    print("| mode | step time / off (median over rounds) |")
    print("|---|---|")
    for m in modes:
        print(f"| {m} | {statistics.median(ratios[m]):.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
