"""The TRL half of benchmarks/grpo_step.py: one GRPO iteration of `trl.GRPOTrainer`, timed by part.

`trl_grpo_iteration` runs TRL's own training loop (`trainer.train()`, one optimizer step per
iteration) on a Hugging Face model, and splits each iteration's wall time into

- rollout: `GRPOTrainer._generate` (tokenize the prompts, `model.generate` on the whole batch of
  prompts x group completions, decode);
- reference: `GRPOTrainer._get_per_token_logps_and_entropies` called with the reference model
  (no grad, inside `_generate_and_score_completions`);
- scoring: the rest of `GRPOTrainer._prepare_inputs` (reward function, group advantages,
  padding, shuffling);
- update: the rest of the iteration (from the `on_step_begin` to the `on_step_end` callback):
  `compute_loss` (policy forward with log-probs and entropy, GRPO loss), backward, gradient
  clipping, AdamW step, LR scheduler, zero_grad. `loss_forward` (the `compute_loss` part) is
  reported on its own too.

Needs the `bench` extra (`pip install -e '.[bench]'`: trl, accelerate). Offline: the reference
model is loaded from a temporary `save_pretrained` copy of the policy, nothing from the Hub.

    python benchmarks/grpo_trl.py [--preset tiny] [--prompts 4] [--group 4] [--max-new-tokens 16]

is a smoke run on `nemotron_h_like(preset)` with random weights and a quickly trained tokenizer;
it prints the dict and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import nemotron_h_like  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated.*")

PARTS = ("rollout", "reference", "scoring", "update")


def digit_fraction_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Deterministic toy reward: the fraction of characters of the completion that are digits."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in texts]


def hf_tokenizer(tokenizer, directory: str | Path):
    """Our `tokenizers.Tokenizer` as a `transformers.PreTrainedTokenizerFast`: written with
    `save_tokenizer` + `save_chat_template` into `directory` and loaded back from there, so it has
    our pad/bos/eos and chat template."""
    from transformers import PreTrainedTokenizerFast

    from turbos.data.tokenizer import save_tokenizer
    from turbos.serve.chat_template import save_chat_template

    save_chat_template(save_tokenizer(tokenizer, directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def quick_tokenizer(vocab_size: int, documents: int = 2000):
    """A byte-level BPE of `vocab_size` tokens trained in seconds on built-in data (offline)."""
    from turbos.data.corpora import build_corpus, interleave
    from turbos.data.tokenizer import train_tokenizer

    reasoning = build_corpus({"source": "builtin:reasoning", "n": 500})
    corpus = interleave([build_corpus("builtin:pydocs"), reasoning])
    return train_tokenizer(itertools.islice(corpus, documents), vocab_size)


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` generation prompts in our chat format (auto thinking mode): built-in reasoning questions
    rendered with `render_chat`, i.e. already-templated strings (TRL applies no chat template)."""
    from turbos.data.tasks import generate_problems
    from turbos.serve.chat_template import render_chat

    problems = generate_problems(n, seed=seed)
    return [render_chat([{"role": "user", "content": p.question}], mode="auto") for p in problems]


class _PartTimer:
    """Wraps trainer methods with wall-clock timers and records one row of part times per step."""

    def __init__(self, trainer) -> None:
        from transformers import TrainerCallback

        self.trainer = trainer
        self.rows: list[dict[str, float]] = []
        self._now: dict[str, float] = defaultdict(float)
        self._start = 0.0
        self._wrap("_generate", lambda *a, **k: "rollout_total", self._count_tokens)
        self._wrap("_prepare_inputs", lambda *a, **k: "prepare")
        self._wrap("compute_loss", lambda *a, **k: "loss_forward")
        self._wrap("_get_per_token_logps_and_entropies", self._logps_part)

        timer = self

        class _StepBounds(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._now = defaultdict(float)
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._finish(time.perf_counter() - timer._start)

        trainer.add_callback(_StepBounds())

    def _logps_part(self, model, *args, **kwargs) -> str:
        if self.trainer.ref_model is not None and model is self.trainer.ref_model:
            return "reference_total"
        return "policy_logps" if torch.is_grad_enabled() else "old_logps"

    def _count_tokens(self, result) -> None:
        completion_ids = result[1]  # _generate returns (prompt_ids, completion_ids, ...)
        self._now["completion_tokens"] += sum(len(ids) for ids in completion_ids)
        self._now["completions"] += len(completion_ids)
        self._now["decode_steps"] = max(self._now["decode_steps"], max(map(len, completion_ids)))
        self._now["prompt_tokens"] += sum(len(ids) for ids in result[0])

    def _wrap(self, name: str, part: Callable[..., str], after: Callable[[Any], None] | None = None) -> None:
        inner = getattr(self.trainer, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            self._now[part(*args, **kwargs)] += time.perf_counter() - start
            if after is not None:
                after(result)
            return result

        setattr(self.trainer, name, timed)  # instance attribute: shadows the bound method

    def _finish(self, iteration: float) -> None:
        now = self._now
        row = {
            "iteration": iteration,
            "rollout": now["rollout_total"],
            "reference": now["reference_total"],
            # old_logps stays 0 here (one optimizer step per generation, num_iterations=1)
            "scoring": now["prepare"] - now["rollout_total"] - now["reference_total"] - now["old_logps"],
            "update": iteration - now["prepare"],
            "loss_forward": now["loss_forward"],
            "old_logps": now["old_logps"],
            "completion_tokens": now["completion_tokens"],
            "prompt_tokens": now["prompt_tokens"],
            "completions": now["completions"],
            "decode_steps": now["decode_steps"],
        }
        self.rows.append(row)


def trl_grpo_iteration(
    hf_model,
    hf_tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    repeats: int,
    seed: int,
    *,
    warmup: int = 1,
    beta: float = 0.04,
    learning_rate: float = 1e-6,
    eos_token_ids: Sequence[int] | None = None,
) -> dict:
    """Time `repeats` GRPO iterations of `trl.GRPOTrainer` (after `warmup` untimed ones) on a copy of
    `hf_model` (the caller's model is left untouched), fp32 on CPU.

    One iteration = one optimizer step on len(prompts) x group_size completions: a single
    `generate` call on the whole batch (each prompt repeated group_size times), reference
    log-probs, rewards (`digit_fraction_reward`) and group advantages, one policy forward/backward
    on the whole batch (per_device_train_batch_size = len(prompts) * group_size, no gradient
    accumulation, so TRL's "global batch divisible by num_generations" holds by construction) and
    an AdamW step. Sampling at temperature 1.0, no top-k/top-p, up to `max_new_tokens`, stopping at
    `eos_token_ids` (default: the model's generation_config eos, else the tokenizer's; TRL always
    adds the tokenizer's eos). beta > 0 keeps a reference model (a second copy of the weights).

    Returns seconds per iteration (mean over the timed iterations, so the parts add up to the
    whole) overall and per part (see the module docstring for what each part wraps), the
    completion tokens generated per iteration (up to and including the first eos) and rollout
    tokens/s, with per-iteration lists under "all".
    """
    import datasets
    import trl
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    batch = len(prompts) * group_size
    if eos_token_ids is None:
        eos = hf_model.generation_config.eos_token_id
        eos_token_ids = [hf_tokenizer.eos_token_id] if eos is None else eos
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos_token_ids = [int(i) for i in eos_token_ids]
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="grpo_trl_") as tmp:
        policy = copy.deepcopy(hf_model).to(dtype=torch.float32)
        policy.generation_config.eos_token_id = eos_token_ids
        policy.generation_config.pad_token_id = hf_tokenizer.pad_token_id
        policy.generation_config.bos_token_id = hf_tokenizer.bos_token_id
        # TRL builds the reference model with from_pretrained(config._name_or_path): point it at a copy
        model_dir = Path(tmp) / "model"
        policy.save_pretrained(str(model_dir))
        policy.config._name_or_path = str(model_dir)
        args = GRPOConfig(
            output_dir=str(Path(tmp) / "out"),
            use_cpu=True,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,  # TRL's default is on; we compare compute, not memory
            seed=seed,
            data_seed=seed,
            max_steps=warmup + repeats,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            num_generations=group_size,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=beta,
            learning_rate=learning_rate,
            optim="adamw_torch",
            shuffle_dataset=False,
            disable_dropout=True,
            use_vllm=False,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=digit_fraction_reward,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": list(prompts)}),
            processing_class=hf_tokenizer,
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        timer = _PartTimer(trainer)
        trainer.train()
    timed = timer.rows[warmup:]
    if len(timed) != repeats:
        raise RuntimeError(f"expected {warmup + repeats} optimizer steps, TRL ran {len(timer.rows)}")

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in timed)

    row = {f"{part}_s": mean(part) for part in ("iteration", *PARTS, "loss_forward")}
    tokens = mean("completion_tokens")
    return {
        "trl": trl.__version__,
        "prompts": len(prompts),
        "group_size": group_size,
        "completions": batch,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        **row,
        "completion_tokens": tokens,
        "prompt_tokens": mean("prompt_tokens"),
        "decode_steps": mean("decode_steps"),
        "rollout_tok_s": tokens / row["rollout_s"],
        "settings": {
            "eos_token_ids": list(trainer.eos_token_ids),  # ours plus the tokenizer eos, as TRL adds it
            "pad_token_id": hf_tokenizer.pad_token_id,
            "beta": beta,
            "learning_rate": learning_rate,
            "loss_type": args.loss_type,
            "scale_rewards": args.scale_rewards,
            "epsilon": args.epsilon,
            "max_grad_norm": args.max_grad_norm,
            "optim": str(args.optim),
            "activation_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
            "dtype": str(trainer.model.dtype),
            "device": str(trainer.model.device),
            "generation": "transformers generate, one call per iteration, left-padded prompts, dynamic cache",
        },
        "all": {key: [r[key] for r in timed] for key in timed[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokenizer", type=Path, help="a saved turbos tokenizer (default: a quick one)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from turbos.data.tokenizer import END_TOKEN, EOS_ID, load_tokenizer
    from turbos.presets import get_preset

    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else quick_tokenizer(config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="grpo_trl_tok_") as tmp:
        tok = hf_tokenizer(tokenizer, tmp)
    model = nemotron_h_like(config)
    result = trl_grpo_iteration(
        model,
        tok,
        chat_prompts(args.prompts, args.seed),
        args.group,
        args.max_new_tokens,
        args.repeats,
        args.seed,
        warmup=args.warmup,
        eos_token_ids=[tok.convert_tokens_to_ids(END_TOKEN), EOS_ID],  # as our engine: <|end|> or <|eos|>
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
