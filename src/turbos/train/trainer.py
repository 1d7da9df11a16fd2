"""Pre-training on the shared loop (``turbos.train.loop``): stages, validation, the LM loss.

One global step counter runs through the recipe's stages (report §2.3-2.4). Entering a stage
sets its sequence length, batch and NTK RoPE alpha (``rotary_emb.set_alpha``; the alpha is also
written into the model config, so checkpoints carry it) and opens its data stream, the loop's
batch source. A step accumulates ``grad_accum`` micro-batches of (lm_loss + weighted MoE aux
loss) / grad_accum; the loop clips, sets each param group's LR from the WSD schedule and steps
AdamW.

Resume is exact: weights, optimizer, schedule position, data position and every RNG (MoE recycle
routing draws from torch's global generator) come back from the checkpoint, so N/2 steps +
resume + N/2 steps gives the same weights bit for bit as N steps on CPU. A checkpoint records
the recipe (less ``RESUMABLE_CHANGES``) and refuses to resume under a different one.

Under torchrun the recipe's ``parallel:`` section shards the model with FSDP2
(``turbos.distributed``). Each data-parallel rank reads its own micro-batches: every rank walks
the same stream and keeps its slice of each ``ranks x batch_size`` rows, so the stream's position
is the same on every rank and does not depend on their number. A run's global batch is fixed when
it starts (``batch_size x grad_accum x`` ranks, recorded as ``data_parallel``): resumed on another
number of ranks, each rank runs ``grad_accum x data_parallel / ranks`` micro-batches, so the steps
see the same rows and the loss curve goes on as if never stopped (within reduction-order rounding).
With context parallelism (``parallel.cp``) the ``cp`` ranks of a data-parallel slice read the same
rows and each trains and validates on its piece of every sequence (``row_loss``'s shard); the
model is then built on the meta device and each rank materialises its shards alone (as for any
run on several ranks).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from turbos.config import TurboSConfig
from turbos.data.packing import eos_token_id
from turbos.device import resolve_device
from turbos.distributed.fsdp import recipe_parallelism
from turbos.distributed.parallel import (
    ParallelError,
    broadcast_object,
    is_main,
    mean_over_ranks,
    rank,
)
from turbos.model import TurboSForCausalLM
from turbos.train.checkpoint import open_run_dir, read_trainer_state, recipe_state
from turbos.train.data import PackedBatch, prepare_tokenizer, stage_corpus, train_batches, validation_batches
from turbos.train.evaluate import evaluate_loss, perplexity, row_loss
from turbos.train.loop import LoopSettings, LossFn, TrainLoop
from turbos.train.metrics import METRICS_FILE, moe_counts
from turbos.train.optim import build_optimizer, expert_lr_scale
from turbos.train.recipe import Recipe, StagePlan, plan_stages
from turbos.train.schedule import LRSchedule

RECIPE_FILE = "recipe.yaml"

# Recipe sections a resumed run may change: where it writes, how often it saves and validates,
# where and on how many ranks it runs. Every other field shapes the batches or the updates.
RESUMABLE_CHANGES = frozenset({"output_dir", "checkpoint", "eval", "device", "precision", "parallel"})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lm_loss_fn(eos_id: int | None = None, shard: tuple[int, int] | None = None) -> LossFn:
    """Pre-training's loss: next-token cross-entropy + the MoE aux loss on packed rows (documents
    apart with ``eos_id``; one ``shard`` of the sequence under context parallelism, see
    ``row_loss``), with its parts and the routing counts as metrics."""

    def loss_fn(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = row_loss(model, batch.rows, eos_id, shard)
        metrics = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss}
        return out.loss, {**metrics, **moe_counts(out.moe_stats)}

    return loss_fn


class Trainer(TrainLoop):
    """Runs a recipe in ``recipe.output_dir`` (the run directory).

    resume: a checkpoint directory, or 'auto' for the run's latest. Without it, a run directory
    that already holds checkpoints is refused unless ``overwrite`` (which deletes them).
    parallelize: applied to the built model before the optimizer is (``TrainLoop``); by default
    the recipe's ``parallel:`` section (FSDP2 on several ranks, activation checkpointing).
    """

    def __init__(
        self,
        recipe: Recipe,
        resume: str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        parallelize: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.recipe = recipe
        run_dir = Path(recipe.output_dir)
        identity = recipe_state(recipe.to_dict(), RESUMABLE_CHANGES)
        device = resolve_device(recipe.device)
        seed_everything(recipe.seed)
        checkpoint = None
        if is_main():  # the run directory's files are rank 0's; the others read them after
            checkpoint = open_run_dir(run_dir, resume, overwrite, identity)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            if checkpoint is not None and recipe.data.tokenizer.path is None:
                _restore_trained_tokenizer(checkpoint, run_dir / "tokenizer")
            self.tokenizer, tokenizer_dir = prepare_tokenizer(recipe, run_dir, checkpoint is not None)
        checkpoint = broadcast_object(checkpoint)
        if not is_main():
            self.tokenizer, tokenizer_dir = prepare_tokenizer(recipe, run_dir, resuming=True)

        self.eos_id = eos_token_id(self.tokenizer) if recipe.data.reset_at_eos else None
        config = self._model_config()
        self.dims, recipe_parallelize = recipe_parallelism(recipe.parallel, config, device=device)
        self.data_parallel = (
            self.dims.data_parallel
            if checkpoint is None
            else read_trainer_state(checkpoint).get("data_parallel", 1)
        )
        """Data-parallel ranks of the run's first start, which fixed its global batch."""
        self.plans = plan_stages(recipe, self.data_parallel)
        self._check_global_batch()
        self.shard = self._sequence_shard(config)
        """(index, count) of this rank's piece of every sequence under context parallelism."""
        # On several ranks the recipe's parallelism builds the model on the meta device, and each
        # rank materialises only its shards (the draws of one process: distributed.fsdp.materialize).
        on_meta = self.dims.world > 1 and parallelize is None
        parallelize = parallelize or recipe_parallelize
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = TurboSForCausalLM(config).train()  # drawn on the CPU, as materialize draws
        if not on_meta:
            model.to(device)
        self.stage: StagePlan | None = None
        self._val_batches: dict[int, list[torch.Tensor]] = {}
        self.last_val_loss: float | None = None
        super().__init__(
            model,
            self._build_optimizer(model.config),
            LRSchedule(recipe.optimizer.lr, recipe.schedule.warmup_steps, self.plans),
            None,  # each stage's stream, opened when the stage is entered
            lm_loss_fn(self.eos_id, self.shard),
            LoopSettings(
                run_dir=run_dir,
                recipe_state=identity,
                device=device,
                precision=recipe.precision,
                grad_clip=recipe.optimizer.grad_clip,
                checkpoint_interval=recipe.checkpoint.interval,
                keep_last=recipe.checkpoint.keep_last,
                tokenizer_dir=tokenizer_dir,
                progress=progress,
            ),
            parallelize,
        )
        self.data_ranks = self.dims.data_parallel
        if checkpoint is not None:
            self.last_val_loss = self.resume(checkpoint).get("val_loss")

    def _check_global_batch(self) -> None:
        """ParallelError unless every stage's micro-batches per step divide over the ranks."""
        ranks = self.dims.data_parallel
        for plan in self.plans:
            if plan.grad_accum * self.data_parallel % ranks:
                raise ParallelError(
                    f"stage {plan.name!r} steps on {plan.grad_accum * self.data_parallel} micro-batches "
                    f"(grad_accum {plan.grad_accum} x {self.data_parallel} ranks when the run started), "
                    f"which {ranks} data-parallel ranks cannot share evenly"
                )

    def _sequence_shard(self, config: TurboSConfig) -> tuple[int, int] | None:
        """This rank's (index, count) piece of the sequences, or None without context parallelism;
        ParallelError where the recipe cannot be split so."""
        cp = self.dims.cp
        if cp == 1:
            return None
        if self.recipe.data.reset_at_eos:
            raise ParallelError(
                "parallel.cp > 1 does not support data.reset_at_eos (documents apart in a row)"
            )
        for plan in self.plans:
            if plan.seq_len % cp:
                raise ParallelError(
                    f"stage {plan.name!r}: seq_len {plan.seq_len} is not a multiple of parallel.cp={cp}"
                )
            if (
                self.recipe.parallel.cp_mode == "parallel"
                and plan.seq_len // cp < config.mamba_conv_kernel - 1
            ):
                raise ParallelError(
                    f"stage {plan.name!r}: shards of {plan.seq_len // cp} tokens are shorter than the Mamba2 "
                    f"conv window ({config.mamba_conv_kernel - 1}) that cp_mode=parallel passes on"
                )
        return self.dims.cp_rank(rank()), cp

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

    def _build_optimizer(self, config: TurboSConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
        opt = self.recipe.optimizer
        scale = expert_lr_scale(self.recipe.moe.expert_lr, config.num_experts_per_tok, config.num_experts)

        def build(model: nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(
                model,
                lr=opt.lr,
                betas=(opt.beta1, opt.beta2),
                weight_decay=opt.weight_decay,
                eps=opt.eps,
                expert_scale=scale,
                decay_embeddings=opt.decay_embeddings,
            )

        return build

    # ------------------------------------------------------------------------------- stages
    def _enter_stage(self, plan: StagePlan) -> None:
        self.stage = plan
        self.model.config.rope_alpha = plan.rope_alpha
        if self.model.model.rotary_emb is not None:
            self.model.model.rotary_emb.set_alpha(self.model.config.rope_theta, plan.rope_alpha)
        self.batches = train_batches(
            self.recipe, plan, self.tokenizer, self.dims.data_rank(rank()), self.dims.data_parallel
        )

    # ----------------------------------------------------------------------- the loop's hooks
    def grad_accum(self) -> int:
        return self.stage.grad_accum * self.data_parallel // self.dims.data_parallel

    def begin(self) -> None:
        if self.step == 0 and self.recipe.eval.interval:
            self._enter_stage(self.plans[0])
            record = {"step": 0, **self.record_fields(), **self._eval_record()}
            self.log(record)
            self.write(f"step 0: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")

    def before_step(self) -> None:
        plan = self.schedule.stage_at(self.step)
        if self.stage is None or plan.index != self.stage.index:
            self._enter_stage(plan)

    def after_step(self, record: dict[str, Any]) -> None:
        every = self.recipe.eval.interval
        if every and (self.step % every == 0 or self.step == self.stage.end):
            record.update(self._eval_record())
            self.write(f"step {self.step}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")

    def describe(self) -> str:
        plan = self.stage
        return f"{plan.name} (seq {plan.seq_len}, alpha {plan.rope_alpha:g})"

    def record_fields(self) -> dict[str, Any]:
        return {"stage": self.stage.name, "seq_len": self.stage.seq_len}

    def extra_state(self) -> dict[str, Any]:
        return {
            "stage": self.stage.index,
            "val_loss": self.last_val_loss,
            "data_parallel": self.data_parallel,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._enter_stage(self.plans[state["stage"]])  # its RoPE alpha is part of the saved config
        super().restore(state)

    # ------------------------------------------------------------------------------ validation
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
        loss = evaluate_loss(self.model, batches, self.device, self.recipe.precision, self.eos_id, self.shard)
        if self.shard is not None:  # each rank has its piece of the sequences: average them
            loss = mean_over_ranks({"val": torch.tensor(loss)})["val"].item()
        return loss

    def _eval_record(self) -> dict[str, float]:
        self.last_val_loss = self.evaluate()
        return {"val_loss": self.last_val_loss, "val_ppl": perplexity(self.last_val_loss)}

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end of the last stage (or to global step ``stop_at``); returns a summary."""
        started = time.perf_counter()
        super().train(stop_at)
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "total_steps": self.schedule.total_steps,
            "tokens": self.tokens,
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
