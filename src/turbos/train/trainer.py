"""The pre-training loop: stages, gradient accumulation, clipping, validation, metrics, checkpoints.

One global step counter runs through the recipe's stages (report §2.3-2.4). Entering a stage
sets its sequence length, batch and NTK RoPE alpha (``rotary_emb.set_alpha``; the alpha is also
written into the model config, so checkpoints carry it) and opens its data stream. A step
accumulates ``grad_accum`` micro-batches of (lm_loss + weighted MoE aux loss) / grad_accum, clips
the global grad norm, sets each param group's LR from the schedule and steps AdamW.

Resume is exact: weights, optimizer, schedule position, data position and every RNG (MoE recycle
routing draws from torch's global generator) come back from the checkpoint, so N/2 steps +
resume + N/2 steps gives the same weights bit for bit as N steps on CPU. A checkpoint records
the recipe (less ``RESUMABLE_CHANGES``) and refuses to resume under a different one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from turbos.config import TurboSConfig
from turbos.model import TurboSForCausalLM
from turbos.train.checkpoint import load_checkpoint, open_run_dir, read_trainer_state, save_checkpoint
from turbos.train.data import BatchStream, prepare_tokenizer, stage_corpus, train_batches, validation_batches
from turbos.train.evaluate import autocast_context, evaluate_loss, perplexity, resolve_device, row_loss
from turbos.train.metrics import METRICS_FILE, MetricsLog, summarize_moe
from turbos.train.optim import build_optimizer, expert_lr_scale, set_lr
from turbos.train.recipe import Recipe, StagePlan, plan_stages
from turbos.train.schedule import LRSchedule

RECIPE_FILE = "recipe.yaml"

# Recipe sections a resumed run may change: where it writes, how often it saves and validates,
# where it runs. Every other field shapes the batches or the updates.
RESUMABLE_CHANGES = frozenset({"output_dir", "checkpoint", "eval", "device", "precision"})


def recipe_state(recipe: Recipe) -> dict[str, Any]:
    """What identifies a run's training (JSON types): the recipe less ``RESUMABLE_CHANGES``."""
    state = json.loads(json.dumps(recipe.to_dict()))
    return {key: value for key, value in state.items() if key not in RESUMABLE_CHANGES}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs a recipe in ``recipe.output_dir`` (the run directory).

    resume: a checkpoint directory, or 'auto' for the run's latest. Without it, a run directory
    that already holds checkpoints is refused unless ``overwrite`` (which deletes them).
    """

    def __init__(
        self, recipe: Recipe, resume: str | None = None, overwrite: bool = False, progress: bool = True
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        self.progress = progress
        self.recipe_state = recipe_state(recipe)
        checkpoint = open_run_dir(self.run_dir, resume, overwrite, self.recipe_state)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

        self.device = resolve_device(recipe.device)
        seed_everything(recipe.seed)
        self.plans = plan_stages(recipe)
        self.schedule = LRSchedule(recipe.optimizer.lr, recipe.schedule.warmup_steps, self.plans)
        if checkpoint is not None and recipe.data.tokenizer.path is None:
            _restore_trained_tokenizer(checkpoint, self.run_dir / "tokenizer")
        self.tokenizer, self.tokenizer_dir = prepare_tokenizer(recipe, self.run_dir, checkpoint is not None)
        self.model = TurboSForCausalLM(self._model_config()).to(self.device).train()
        config = self.model.config
        opt = recipe.optimizer
        self.optimizer = build_optimizer(
            self.model,
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            weight_decay=opt.weight_decay,
            eps=opt.eps,
            expert_scale=expert_lr_scale(
                recipe.moe.expert_lr, config.num_experts_per_tok, config.num_experts
            ),
            decay_embeddings=opt.decay_embeddings,
        )
        self.step = 0
        self.tokens_seen = 0
        self.stage: StagePlan | None = None
        self.stream: BatchStream | None = None
        self._batches: Iterator[torch.Tensor] | None = None
        self._val_batches: dict[int, list[torch.Tensor]] = {}
        self.last_val_loss: float | None = None
        if checkpoint is not None:
            state = read_trainer_state(checkpoint)
            self._enter_stage(self.plans[state["stage"]])
            load_checkpoint(checkpoint, self.model, self.optimizer)
            self.stream.load_state_dict(state["data"])
            self.step, self.tokens_seen = state["step"], state["tokens"]
            self.last_val_loss = state.get("val_loss")
        self.metrics = MetricsLog(self.run_dir, resume_step=self.step if checkpoint is not None else None)

    def _model_config(self) -> TurboSConfig:
        config = self.recipe.model_config()
        vocab = self.tokenizer.get_vocab_size()
        if self.recipe.data.tokenizer.path is not None and "vocab_size" not in self.recipe.model.overrides:
            config = config.replace(vocab_size=vocab)
        if vocab > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}"
            )
        return config

    # ------------------------------------------------------------------------------------ stages
    def _enter_stage(self, plan: StagePlan) -> None:
        self.stage = plan
        self.model.config.rope_alpha = plan.rope_alpha
        if self.model.model.rotary_emb is not None:
            self.model.model.rotary_emb.set_alpha(self.model.config.rope_theta, plan.rope_alpha)
        self.stream = train_batches(self.recipe, plan, self.tokenizer)
        self._batches = None  # opened at the first batch, after any resume position is loaded

    def _next_batch(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = iter(self.stream)
        batch = next(self._batches, None)
        if batch is None:
            raise RuntimeError(f"stage {self.stage.name!r}: the training data gave no full batch")
        return batch.to(self.device)

    # ------------------------------------------------------------------------------- train/eval
    def _train_step(self) -> dict[str, Any]:
        plan = self.stage
        lrs = set_lr(self.optimizer, self.schedule(self.step))
        start = time.perf_counter()
        loss = lm_loss = aux_loss = 0.0
        moe_stats = []
        for _ in range(plan.grad_accum):
            rows = self._next_batch()
            with autocast_context(self.recipe.precision, self.device):
                out = row_loss(self.model, rows)
            (out.loss / plan.grad_accum).backward()
            loss += out.loss.item() / plan.grad_accum
            lm_loss += out.lm_loss.item() / plan.grad_accum
            aux_loss += out.aux_loss.item() / plan.grad_accum
            moe_stats.append(out.moe_stats)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step + 1}; the last checkpoint is intact")
        clip = self.recipe.optimizer.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += plan.tokens_per_step
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "stage": plan.name,
            "seq_len": plan.seq_len,
            "loss": loss,
            "lm_loss": lm_loss,
            "aux_loss": aux_loss,
            "lr": lrs,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": plan.tokens_per_step / seconds,
            **summarize_moe(moe_stats),
        }

    def validation_batches(self, plan: StagePlan) -> list[torch.Tensor]:
        """Fixed validation batches of a stage's data at its sequence length and batch size."""
        if plan.index not in self._val_batches:
            self._val_batches[plan.index] = validation_batches(
                stage_corpus(self.recipe, plan),
                self.tokenizer,
                plan.seq_len,
                plan.batch_size,
                self.recipe.eval.batches,
                self.recipe.data.val_fraction,
            )
        return self._val_batches[plan.index]

    def evaluate(self, plan: StagePlan | None = None) -> float:
        """Validation loss of the current model on a stage's validation batches (default: current)."""
        batches = self.validation_batches(plan or self.stage)
        return evaluate_loss(self.model, batches, self.device, self.recipe.precision)

    def _eval_record(self) -> dict[str, float]:
        self.last_val_loss = self.evaluate()
        return {"val_loss": self.last_val_loss, "val_ppl": perplexity(self.last_val_loss)}

    def save(self) -> Path:
        state = {
            "step": self.step,
            "stage": self.stage.index,
            "stage_name": self.stage.name,
            "tokens": self.tokens_seen,
            "schedule": {"step": self.step, "next_lr": self.schedule(self.step)},
            "data": self.stream.state_dict(),
            "val_loss": self.last_val_loss,
            "recipe": self.recipe_state,
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.tokenizer_dir,
            self.recipe.checkpoint.keep_last,
        )

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end of the last stage (or to global step ``stop_at``); returns a summary."""
        total = self.schedule.total_steps
        end = total if stop_at is None else min(stop_at, total)
        every_eval, every_save = self.recipe.eval.interval, self.recipe.checkpoint.interval
        started = time.perf_counter()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        if self.step == 0 and every_eval:
            self._enter_stage(self.schedule.stage_at(0))
            record = {
                "step": 0,
                "stage": self.stage.name,
                "seq_len": self.stage.seq_len,
                **self._eval_record(),
            }
            self.metrics.write(record)
            bar.write(f"step 0: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")
        while self.step < end:
            plan = self.schedule.stage_at(self.step)
            if self.stage is None or plan.index != self.stage.index:
                self._enter_stage(plan)
            bar.set_description(f"{plan.name} (seq {plan.seq_len}, alpha {plan.rope_alpha:g})", refresh=False)
            record = self._train_step()
            stage_done = self.step == plan.end
            if every_eval and (self.step % every_eval == 0 or stage_done):
                record.update(self._eval_record())
                bar.write(
                    f"step {self.step}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})"
                )
            self.metrics.write(record)
            bar.set_postfix(
                loss=f"{record['lm_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False
            )
            bar.update(1)
            if self.step % every_save == 0 or self.step == end:
                self.save()
        bar.close()
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "total_steps": total,
            "tokens": self.tokens_seen,
            "wall_s": time.perf_counter() - started,
            "val_loss": self.last_val_loss,
            "metrics": str(self.run_dir / METRICS_FILE),
        }


def _restore_trained_tokenizer(checkpoint: Path, directory: Path) -> None:
    """A resumed run keeps the tokenizer it was trained with: the checkpoint's copy goes back to
    RUN_DIR/tokenizer (which may be missing, e.g. when resuming from another run's checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, directory / name)
