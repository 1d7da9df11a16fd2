"""Supervised fine-tuning on chat data (report §3.1), with loss on assistant tokens only.

Data: JSONL files, one conversation per line: ``{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]}`` (system turns and several rounds allowed; an
assistant turn may hold ``<think>...</think>`` or a ``reasoning_content`` field). Conversations
render with the serving chat template (``turbos.serve.chat_template.render_chat``), so training
and inference see the same text; the loss covers each assistant reply and its closing ``<|end|>``,
found by the positions of the role and ``<|end|>`` tokens. The template drops the reasoning of
assistant turns before the last user message (the model never sees it there), so such a turn that
had reasoning carries no loss: training its bare answer would teach answering without thinking.
A conversation with no reply left to train is an error.

A step draws ``batch_size`` conversations and packs them first-fit decreasing into rows as wide
as the longest (``packing``, the default), right-padded: each conversation sees only itself (the
model's ``seq_idx``: attention, Mamba2 conv and state restart, positions from 0), so the loss and
gradients are those of one conversation per row (``packing: false``; up to rounding and MoE
capacity overflow) with fewer rows and less padding. Several datasets mix by weight: each
conversation's dataset is drawn with probability weight / sum; a dataset left with no
conversation (an empty file, or all longer than ``max_len``) is an error. Training runs on the
shared loop (``turbos.train.loop``).

Under torchrun (``turbos.distributed``) the recipe's ``parallel:`` section shards the model with
FSDP2, and ``batch_size`` is the step's conversations over all data-parallel ranks: every rank
draws the same ones (same seed) and keeps every ranks-th of them, so the stream's position means
the same on any number of ranks. Each rank divides its summed token (or reply) losses by the
step's total over all ranks / ranks, so the ranks' mean, which FSDP's averaged gradients follow,
is the loss of one process on the whole step.

A finished run (``OUTPUT_DIR/model`` or ``sft_summary.json``) is not started again over itself
unless ``overwrite``; resuming it from its latest checkpoint reports it finished and changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer
from torch import nn

from turbos.config import ConfigError
from turbos.data.jsonl import JsonlError, read_jsonl
from turbos.data.packing import first_fit_decreasing
from turbos.data.tokenizer import (
    ASSISTANT_TOKEN,
    END_TOKEN,
    PAD_ID,
    SYSTEM_TOKEN,
    USER_TOKEN,
    load_tokenizer,
    save_tokenizer,
)
from turbos.device import resolve_device
from turbos.distributed.checkpoint import export_full_model
from turbos.distributed.fsdp import recipe_parallelism
from turbos.distributed.parallel import (
    ParallelConfig,
    ParallelError,
    broadcast_object,
    is_main,
    rank,
    world_size,
)
from turbos.model import TurboSForCausalLM
from turbos.model.context import seq_idx_from_lengths
from turbos.model.hybrid import IGNORE_INDEX
from turbos.serve.chat_template import assistant_parts, render_chat, save_chat_template
from turbos.settings import apply_overrides, check_settings, parse_settings, read_yaml, setting
from turbos.train.checkpoint import recipe_state, start_run
from turbos.train.loop import LoopSettings, LossFn, TrainLoop
from turbos.train.metrics import moe_counts
from turbos.train.optim import build_optimizer, expert_lr_scale
from turbos.train.schedule import LRSchedule

SUMMARY_FILE = "sft_summary.json"
MODEL_DIR = "model"


@dataclass
class SFTDataset:
    path: str
    """A chat JSONL file (``read_conversations``)."""
    weight: float = setting(1.0, gt=0)
    """This dataset supplies weight / (sum of the weights) of the rows."""


@dataclass
class SFTRecipe:
    """An SFT run. ``model``: a directory with config.json, model.safetensors and tokenizer files."""

    model: str
    data: list[SFTDataset] = setting(nonempty=True)
    output_dir: str
    max_len: int = setting(512, gt=0)
    batch_size: int = setting(16, gt=0)
    steps: int = setting(200, gt=0)
    lr: float = setting(1e-3, gt=0)
    min_lr: float = setting(1e-4, gt=0)
    """Where the cosine decay ends (at most ``lr``)."""
    warmup_steps: int = setting(20, ge=0)
    """Linear warm-up steps (fewer than ``steps``)."""
    weight_decay: float = setting(0.1, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    grad_clip: float = setting(1.0, ge=0)
    """Max global grad norm; 0 disables clipping."""
    expert_lr: Literal["sqrt", "linear", "none"] = "sqrt"
    """Routed-expert LR rule, see ``turbos.train.optim.expert_lr_scale``."""
    loss_normalization: Literal["token", "sequence"] = "token"
    """"token": the batch loss is the mean over all target tokens (long replies weigh more);
    "sequence": the mean over replies of each reply's mean token loss (every example counts alike,
    however long). The logged ``lm_loss`` is the one optimized."""
    group_by_length: int = setting(8, gt=0)
    """Rows are drawn this many batches at a time, sorted by length and cut into batches visited in
    random order (Hugging Face's ``group_by_length``), so a batch pads to similar lengths; 1 draws
    each batch on its own. On data mixing short and long replies this halves the padded tokens.
    Batch losses are weighted by target tokens so that every token counts alike (``batch_rows``)."""
    packing: bool = True
    """Pack a step's conversations first-fit decreasing into rows as wide as its longest one (each
    sees only itself, ``seq_idx``); false: one conversation per row. The same conversations and
    loss either way (up to rounding, and to which tokens overflow an expert's capacity: that
    follows their order); packed, fewer rows and padded tokens, and no row wider than one
    conversation's own (attention costs grow with the square of the width). It pays most without
    length grouping (``group_by_length: 1``), where one per row pads every short reply to the
    longest (``benchmarks/sft_packing.py``)."""
    checkpoint_interval: int = setting(0, ge=0)
    """0: only the final model is written."""
    keep_last: int = setting(1, ge=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Under torchrun: FSDP2 over the ranks, which share each step's ``batch_size`` conversations
    (a multiple of the data-parallel ranks)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into the run directory (e.g. which stage of a pipeline)."""

    def __post_init__(self) -> None:
        check_settings(self, "sft recipe")  # types and ranges; "1e-4" (text to YAML) is a number
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"sft recipe: warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"sft recipe: min_lr={self.min_lr} exceeds lr={self.lr}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SFTRecipe:
        """A recipe from a plain mapping (YAML or JSON), every value checked by its field."""
        return parse_settings(cls, raw, "sft recipe")

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> SFTRecipe:
        """A YAML recipe file, with ``key=value`` overrides (values read as YAML) applied."""
        return cls.from_dict(apply_overrides(read_yaml(path, "recipe"), overrides))


# ------------------------------------------------------------------------------------------ data
def read_conversations(path: str | os.PathLike) -> list[list[dict[str, Any]]]:
    """Conversations of a chat JSONL file, checked line by line; errors name the file and line."""
    out = []
    for number, record in read_jsonl(path, "chat data"):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise JsonlError(path, number, "needs a non-empty 'messages' list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise JsonlError(path, number, "each message needs role system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise JsonlError(path, number, "message content must be a string")
            if not isinstance(m.get("reasoning_content", ""), str | None):
                raise JsonlError(path, number, "reasoning_content must be a string")
        if not any(trained_turns(messages)):
            raise JsonlError(
                path,
                number,
                "no assistant reply to learn from (replies before the last user message whose "
                "reasoning the chat template drops are not trained)",
            )
        out.append(messages)
    return out


def trained_turns(messages: Sequence[dict[str, Any]]) -> list[bool]:
    """Per message, whether its reply is a training target: every assistant turn except those
    before the last user message that had reasoning (``reasoning_content`` or a ``</think>``),
    which ``render_chat`` drops from the history."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [
        m["role"] == "assistant" and not (i < last_user and assistant_parts(m)[0] is not None)
        for i, m in enumerate(messages)
    ]


def encode_conversation(
    messages: Sequence[dict[str, Any]], tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that are IGNORE_INDEX outside the trained
    assistant replies (``trained_turns``), each from after its ``<|assistant|>`` through its
    ``<|end|>``. Turns are found by token position: every message renders as one role token, its
    text and ``<|end|>``, and ``render_chat`` refuses special-token text inside a message."""
    ids = tokenizer.encode(render_chat(messages, add_generation_prompt=False)).ids
    role_ids = [tokenizer.token_to_id(token) for token in (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)]
    starts = [i for i, token in enumerate(ids) if token in role_ids]
    end_id = tokenizer.token_to_id(END_TOKEN)
    if len(starts) != len(messages) or any(ids[stop - 1] != end_id for stop in [*starts[1:], len(ids)]):
        raise ValueError(
            f"the rendered conversation does not split into its {len(messages)} turns by role and "
            f"{END_TOKEN} tokens"
        )
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop, trained in zip(starts, [*starts[1:], len(ids)], trained_turns(messages), strict=True):
        if trained:
            labels[start + 1 : stop] = ids[start + 1 : stop]
    return ids, labels


@dataclass
class EncodedData:
    ids: list[list[int]]
    labels: list[list[int]]
    source: list[int]
    """The dataset index of each row."""
    skipped: list[int]
    """Per dataset, the conversations longer than max_len (left out)."""


def encode_datasets(datasets: Sequence[SFTDataset], tokenizer: Tokenizer, max_len: int) -> EncodedData:
    """Encode every conversation; those longer than max_len tokens are skipped and counted.

    ValueError naming the dataset if one is left with no conversation: its weight would silently
    go to the others."""
    data = EncodedData([], [], [], [0] * len(datasets))
    for index, dataset in enumerate(datasets):
        conversations = read_conversations(dataset.path)
        kept = 0
        for number, messages in enumerate(conversations, 1):
            try:
                ids, labels = encode_conversation(messages, tokenizer)
            except ValueError as err:
                raise ValueError(f"{dataset.path}: conversation {number}: {err}") from err
            if len(ids) > max_len:
                data.skipped[index] += 1
                continue
            data.ids.append(ids)
            data.labels.append(labels)
            data.source.append(index)
            kept += 1
        if not kept:
            raise ValueError(
                f"dataset {dataset.path} (weight {dataset.weight}) has no conversation to train on: "
                + (
                    f"every one of its {len(conversations)} conversations is longer than "
                    f"max_len={max_len} tokens"
                    if conversations
                    else "the file holds none"
                )
            )
    return data


@dataclass
class ChatBatch:
    """One SFT micro-batch: rows of token ids, right-padded to the longest."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    """IGNORE_INDEX outside the trained replies, on padding and on each conversation's first token
    (the target its packed predecessor would predict)."""
    attention_mask: torch.Tensor
    """1 on real tokens, 0 on padding."""
    seq_idx: torch.Tensor | None
    """Each token's conversation within its row (packed rows; padding counts as the last one);
    None with one conversation per row."""
    target_index: torch.Tensor
    """(n,) flat positions (row * width + t) whose next token is a target: where logits are needed."""
    target_ids: torch.Tensor
    """(n,) the target token predicted at each of ``target_index``."""
    target_conversation: torch.Tensor
    """(n,) the conversation (0 .. batch size - 1) each target belongs to."""
    num_conversations: int
    num_tokens: int
    """Real tokens (padding excluded)."""
    weight: float = 1.0
    """The factor of the batch's mean loss (``batch_rows``)."""
    denominator: float | None = None
    """Under data parallelism, what the summed loss divides by: the step's target tokens (or
    replies) over all ranks / ranks. None: the batch's own mean (one process)."""

    def to(self, device: torch.device) -> ChatBatch:
        return replace(
            self,
            **{
                name: None if value is None else value.to(device)
                for name, value in vars(self).items()
                if isinstance(value, torch.Tensor) or name == "seq_idx"
            },
        )


def collate(
    ids: Sequence[list[int]], labels: Sequence[list[int]], pack_len: int | None = None, weight: float = 1.0
) -> ChatBatch:
    """Conversations as one right-padded micro-batch: one per row, or with ``pack_len`` packed into
    as few rows of at most that many tokens as first-fit decreasing finds, back to back. The
    targets' positions are found here, on the host, so the loss reads nothing back from the device."""
    lengths = [len(x) for x in ids]
    rows = first_fit_decreasing(lengths, pack_len) if pack_len else [[i] for i in range(len(ids))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX)
    index, conversation = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            input_ids[r, at : at + lengths[i]] = torch.tensor(ids[i])
            later = torch.tensor(labels[i][1:])
            target[r, at + 1 : at + lengths[i]] = later
            where = torch.nonzero(later != IGNORE_INDEX).squeeze(1)
            index.append(r * width + at + where)  # the position before each target predicts it
            conversation.append(torch.full_like(where, i))
            at += lengths[i]
        mask[r, :at] = 1
    seq_idx = seq_idx_from_lengths([[lengths[i] for i in row] for row in rows], width) if pack_len else None
    target_index = torch.cat(index)
    target_ids = target.flatten().index_select(0, target_index + 1)
    return ChatBatch(
        input_ids,
        target,
        mask,
        seq_idx,
        target_index,
        target_ids,
        torch.cat(conversation),
        len(ids),
        sum(lengths),
        weight,
    )


def row_sampler(data: EncodedData, weights: Sequence[float]) -> torch.Tensor:
    """Per-conversation probabilities so that dataset d supplies weight_d / sum(weights) of them."""
    counts = torch.bincount(torch.tensor(data.source), minlength=len(weights)).double()
    w = torch.tensor(weights, dtype=torch.double)
    per_row = (w / counts)[torch.tensor(data.source)]
    return per_row / per_row.sum()


def batch_rows(
    probs: torch.Tensor,
    lengths: Sequence[int],
    targets: Sequence[int],
    batch_size: int,
    group: int,
    generator: torch.Generator,
) -> Iterator[tuple[list[int], float]]:
    """Endless (conversation indices, loss weight) batches drawn with replacement from ``probs``.

    ``group`` batches at a time are sorted by ``lengths`` and visited in random order. Each batch's
    mean token loss is weighted by its share of the group's target tokens (``targets`` per
    conversation), so every target token counts alike, as in unsorted batches: otherwise a batch
    of short replies would weigh as much as one of long replies with ten times the tokens.
    """
    lengths, targets = torch.tensor(lengths), torch.tensor(targets, dtype=torch.float64)
    while True:
        rows = torch.multinomial(probs, batch_size * group, replacement=True, generator=generator)
        if group > 1:
            rows = rows[torch.argsort(lengths[rows], stable=True)]
        per_batch = targets[rows].view(group, batch_size).sum(1)
        mean = per_batch.mean().clamp(min=1.0)
        for b in torch.randperm(group, generator=generator).tolist():
            yield rows[b * batch_size : (b + 1) * batch_size].tolist(), float(per_batch[b] / mean)


class ChatBatches:
    """The SFT batch source: a step's ``batch_size`` conversations drawn by ``batch_rows`` (seeded
    by the recipe) and collated, with ``recipe.packing`` packed into rows as wide as the longest of
    them. Its position is the number of batches drawn; restoring one replays the draws (cheap: no
    tokenizing). On ``ranks`` data-parallel ranks, ``rank`` keeps every ranks-th conversation of
    the step, and its batch's ``denominator`` is the step's target tokens (or replies) / ranks."""

    def __init__(self, data: EncodedData, recipe: SFTRecipe, rank: int = 0, ranks: int = 1) -> None:
        if recipe.batch_size % ranks:
            raise ParallelError(
                f"sft recipe: batch_size={recipe.batch_size} conversations a step cannot be shared "
                f"evenly by {ranks} data-parallel ranks (use a multiple of {ranks})"
            )
        self.data, self.recipe, self.rank, self.ranks = data, recipe, rank, ranks
        self.per_sequence = recipe.loss_normalization == "sequence"
        self.targets = [sum(t != IGNORE_INDEX for t in y) for y in data.labels]
        """Per conversation, its target tokens."""
        self.probs = row_sampler(data, [d.weight for d in recipe.data])
        self._restart()

    def _restart(self) -> None:
        recipe = self.recipe
        self.drawn = 0
        self._draws = batch_rows(
            self.probs,
            [len(x) for x in self.data.ids],
            [1 if self.per_sequence else n for n in self.targets],
            recipe.batch_size,
            recipe.group_by_length,
            torch.Generator().manual_seed(recipe.seed),
        )

    def __next__(self) -> ChatBatch:
        rows, weight = next(self._draws)
        self.drawn += 1
        if self.ranks > 1:
            total = sum(min(self.targets[i], 1) if self.per_sequence else self.targets[i] for i in rows)
            rows = rows[self.rank :: self.ranks]
        ids, labels = [self.data.ids[i] for i in rows], [self.data.labels[i] for i in rows]
        batch = collate(ids, labels, max(map(len, ids)) if self.recipe.packing else None, weight)
        if self.ranks > 1:
            batch.denominator = total / self.ranks
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restart()
        for _ in range(state["batches"]):
            next(self._draws)
        self.drawn = state["batches"]


# ----------------------------------------------------------------------------------------- train
def sequence_mean_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    conversation: torch.Tensor,
    num_conversations: int,
    denominator: float | None = None,
) -> torch.Tensor:
    """Next-token loss averaged per conversation over its target tokens, then over conversations
    that have any (or summed and divided by ``denominator``). logits (n, vocab) at the targets'
    positions; targets and conversation (n,)."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    sums = losses.new_zeros(num_conversations).index_add_(0, conversation, losses)
    counts = losses.new_zeros(num_conversations).index_add_(0, conversation, torch.ones_like(losses))
    has = counts > 0
    return torch.where(has, sums / counts.clamp(min=1), 0).sum() / (
        has.sum() if denominator is None else denominator
    )


def sft_loss_fn(per_sequence: bool) -> LossFn:
    """SFT's loss on a ``ChatBatch``: the assistant-token loss (mean over tokens, or with
    ``per_sequence`` over conversations, ``sequence_mean_loss``; summed over the batch's
    ``denominator`` when it has one) times the batch weight, plus the MoE aux loss; logged with its
    parts and the routing counts. Logits are computed at the targets' positions only
    (``logits_index``): the prompts' positions need none."""

    def loss_fn(model: nn.Module, batch: ChatBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        result = model(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            router_losses=True,
            seq_idx=batch.seq_idx,
            logits_index=batch.target_index,
        )
        if per_sequence:
            lm_loss = sequence_mean_loss(
                result.logits,
                batch.target_ids,
                batch.target_conversation,
                batch.num_conversations,
                batch.denominator,
            )
        elif batch.denominator is None:
            lm_loss = F.cross_entropy(result.logits.float(), batch.target_ids)
        else:
            lm_loss = F.cross_entropy(result.logits.float(), batch.target_ids, reduction="sum")
            lm_loss = lm_loss / batch.denominator
        metrics = {
            "loss": lm_loss.double() + result.aux_loss.double(),
            "lm_loss": lm_loss,
            "aux_loss": result.aux_loss,
            **moe_counts(result.moe_stats),
        }
        return lm_loss * batch.weight + result.aux_loss, metrics

    return loss_fn


def export_model(model: TurboSForCausalLM, tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """A servable model directory: weights, config, tokenizer files with the chat template. On
    several ranks every rank calls (the shards are gathered) and rank 0 writes."""
    directory = Path(directory)
    if world_size() > 1:
        export_full_model(model, directory)
    else:
        model.save_pretrained(directory)
    if is_main():
        save_tokenizer(tokenizer, directory)
        save_chat_template(directory)
    return directory


def finetune_parts(
    recipe: Any,
    model: TurboSForCausalLM,
    min_lr: float,
    run_dir: Path,
    identity: dict[str, Any],
    device: torch.device,
    tokenizer_dir: Path,
    progress: bool,
    description: str,
) -> tuple[Callable[[nn.Module], torch.optim.Optimizer], LRSchedule, LoopSettings]:
    """What a post-training run (SFT, GRPO) gives ``TrainLoop`` from its recipe's common fields
    (lr, betas, weight_decay, expert_lr, warmup_steps, steps, precision, grad_clip,
    checkpoint_interval, keep_last): the optimizer factory (expert-specific LR), the warm-up +
    cosine schedule to ``min_lr``, and the loop settings (no final checkpoint: the exported model
    is the final output)."""
    c = model.config
    scale = expert_lr_scale(recipe.expert_lr, c.num_experts_per_tok, c.num_experts)
    return (
        lambda m: build_optimizer(m, recipe.lr, recipe.betas, recipe.weight_decay, expert_scale=scale),
        LRSchedule.warmup_cosine(recipe.lr, min_lr, recipe.warmup_steps, recipe.steps),
        LoopSettings(
            run_dir=run_dir,
            recipe_state=identity,
            device=device,
            precision=recipe.precision,
            grad_clip=recipe.grad_clip,
            checkpoint_interval=recipe.checkpoint_interval,
            keep_last=recipe.keep_last,
            save_final=False,
            tokenizer_dir=tokenizer_dir,
            progress=progress,
            description=description,
        ),
    )


# Recipe fields a resumed run may change: where it writes, how often it saves, where it runs.
# Every other field shapes the batches or the updates, so a checkpoint refuses a recipe that differs.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "checkpoint_interval", "keep_last", "device", "precision", "parallel", "extra"}
)


class SFTLoop(TrainLoop):
    """The shared loop, keeping the last loss in its checkpoints (a run resumed at its end reports it)."""

    last_loss: float = math.nan

    def after_step(self, record: dict[str, Any]) -> None:
        self.last_loss = record["lm_loss"]

    def extra_state(self) -> dict[str, Any]:
        return {"loss": self.last_loss}


def run_sft(
    recipe: SFTRecipe,
    progress: bool = True,
    resume: str | None = None,
    overwrite: bool = False,
    stop_at: int | None = None,
    parallelize: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``recipe.model`` and write ``OUTPUT_DIR/model`` (servable) plus metrics.jsonl.

    Checkpoints (every ``checkpoint_interval`` steps and at ``stop_at``) go to
    ``OUTPUT_DIR/checkpoints/step-N``. ``resume`` ('auto' or a checkpoint directory) continues a
    run where it stopped, with the same weights bit for bit on CPU as a run that never stopped: the
    batch stream is replayed to the checkpoint's step, and the model, optimizer and RNG states are
    restored. An output directory that holds checkpoints, or a finished run (``model/``,
    ``sft_summary.json``), is refused unless resuming or ``overwrite`` (which deletes them).
    Resuming a finished run from its latest checkpoint returns its summary and changes nothing;
    from an earlier one (a rewind), the later checkpoints and the finished model and summary move
    to ``checkpoints/abandoned-<time>/`` (``turbos.train.checkpoint.open_run_dir``).
    ``stop_at``: stop after that step (the model is exported only when all ``steps`` are done).
    ``parallelize``: applied to the loaded model before the optimizer is built (``TrainLoop``);
    by default the recipe's ``parallel:`` section (FSDP2 on several ranks, activation checkpointing).
    Under torchrun every rank calls this; rank 0 writes the output directory's files.
    An interrupt (Ctrl-C, SIGTERM) checkpoints the last completed step (``TrainLoop.interrupted``).
    """
    if stop_at is not None and not 0 < stop_at <= recipe.steps:
        raise ValueError(f"stop_at must be in [1, steps={recipe.steps}], got {stop_at}")
    out = Path(recipe.output_dir)
    identity = recipe_state(asdict(recipe), RESUMABLE_CHANGES)
    checkpoint, finished = broadcast_object(  # the output directory's files are rank 0's
        start_run(out, resume, overwrite, identity, (out / MODEL_DIR, out / SUMMARY_FILE), "SFT")
        if is_main()
        else None
    )
    if finished is not None:
        return finished
    torch.manual_seed(recipe.seed)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    device = resolve_device(recipe.device)
    model = TurboSForCausalLM.from_pretrained(recipe.model, device=device).train()
    if recipe.max_len > model.config.max_position_embeddings:
        raise ConfigError(
            f"sft recipe: max_len={recipe.max_len} exceeds the max_position_embeddings="
            f"{model.config.max_position_embeddings} of the model {recipe.model}"
        )
    dims, recipe_parallelize = recipe_parallelism(recipe.parallel, model.config, "SFT")
    parallelize = parallelize or recipe_parallelize
    tokenizer = load_tokenizer(recipe.model)
    tokenizer_dir = out / "tokenizer"  # copied into every checkpoint (by rank 0)
    if is_main():
        save_tokenizer(tokenizer, tokenizer_dir)
    data = encode_datasets(recipe.data, tokenizer, recipe.max_len)
    optimizer, schedule, settings = finetune_parts(
        recipe, model, recipe.min_lr, out, identity, device, tokenizer_dir, progress, "sft"
    )
    loop = SFTLoop(
        model,
        optimizer,
        schedule,
        ChatBatches(data, recipe, rank(), dims.data_parallel),
        sft_loss_fn(recipe.loss_normalization == "sequence"),
        settings,
        parallelize,
    )
    if checkpoint is not None:
        loop.last_loss = loop.resume(checkpoint).get("loss", math.nan)
    end = recipe.steps if stop_at is None else max(stop_at, loop.step)
    start = time.perf_counter()
    loop.train(end)
    if end < recipe.steps:
        return {"steps": end, "stopped_at": end, "tokens": loop.tokens, "wall_s": time.perf_counter() - start}
    try:
        model.eval()
        export_model(model, tokenizer, out / MODEL_DIR)
        summary = {
            "steps": recipe.steps,
            "conversations": len(data.ids),
            "skipped_too_long": sum(data.skipped),
            "datasets": [
                {"path": d.path, "conversations": data.source.count(i), "skipped_too_long": data.skipped[i]}
                for i, d in enumerate(recipe.data)
            ],
            "tokens": loop.tokens,
            "final_loss": loop.last_loss,
            "wall_s": time.perf_counter() - start,
            "model_dir": str(out / MODEL_DIR),
        }
        if is_main():
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    except KeyboardInterrupt as err:  # the export starts again on resume
        raise loop.interrupted(err) from None
    return summary
