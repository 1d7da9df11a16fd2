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

One conversation per row, right-padded: no attention between samples and every Mamba2 state starts
from zero, at the cost of padding. (Packing several conversations into a row would need
per-sample state resets inside the scan; at the lengths SFT uses here, padding is cheaper to get
right.) Several datasets mix by weight: each row's dataset is drawn with probability weight / sum;
a dataset left with no conversation (an empty file, or all longer than ``max_len``) is an error.

A finished run (``OUTPUT_DIR/model`` or ``sft_summary.json``) is not started again over itself
unless ``overwrite``; resuming it from its latest checkpoint reports it finished and changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from turbos.config import ConfigError
from turbos.data.tokenizer import (
    ASSISTANT_TOKEN,
    END_TOKEN,
    PAD_ID,
    SYSTEM_TOKEN,
    USER_TOKEN,
    load_tokenizer,
    save_tokenizer,
)
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX
from turbos.serve.chat_template import assistant_parts, render_chat, save_chat_template
from turbos.train.checkpoint import load_checkpoint, open_run_dir, save_checkpoint
from turbos.train.evaluate import autocast_context, resolve_device
from turbos.train.metrics import MetricsLog, summarize_moe
from turbos.train.optim import build_optimizer, expert_lr_scale, set_lr
from turbos.train.recipe import RecipeError, apply_overrides, coerce_fields

SUMMARY_FILE = "sft_summary.json"
MODEL_DIR = "model"


@dataclass
class SFTDataset:
    path: str
    weight: float = 1.0


@dataclass
class SFTRecipe:
    """An SFT run. ``model``: a directory with config.json, model.safetensors and tokenizer files."""

    model: str
    data: list[SFTDataset]
    output_dir: str
    max_len: int = 512
    batch_size: int = 16
    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    expert_lr: str = "sqrt"
    loss_normalization: str = "token"
    """"token": the batch loss is the mean over all target tokens (long replies weigh more);
    "sequence": the mean over replies of each reply's mean token loss (every example counts alike,
    however long). The logged ``lm_loss`` is the one optimized."""
    group_by_length: int = 8
    """Rows are drawn this many batches at a time, sorted by length and cut into batches visited in
    random order (Hugging Face's ``group_by_length``), so a batch pads to similar lengths; 1 draws
    each batch on its own. On data mixing short and long replies this halves the padded tokens.
    Batch losses are weighted by target tokens so that every token counts alike (``batch_rows``)."""
    checkpoint_interval: int = 0
    """0: only the final model is written."""
    keep_last: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into the run directory (e.g. which stage of a pipeline)."""

    def __post_init__(self) -> None:
        try:
            coerce_fields(self)  # types; numbers YAML read as strings ("1e-4") become numbers
        except RecipeError as err:
            raise ConfigError(f"sft recipe: {err}") from err
        if not self.data:
            raise ConfigError("sft recipe: data needs at least one {path, weight} entry")
        for i, d in enumerate(self.data):
            if d.weight <= 0:
                raise ConfigError(f"sft recipe: data[{i}].weight of {d.path} must be > 0, got {d.weight}")
        for name in ("max_len", "batch_size", "steps", "group_by_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sft recipe: {name} must be > 0, got {getattr(self, name)}")
        for name in ("checkpoint_interval", "keep_last", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sft recipe: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"sft recipe: warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"sft recipe: betas must be in [0, 1), got {list(self.betas)}")
        if self.loss_normalization not in ("token", "sequence"):
            raise ConfigError(
                "sft recipe: loss_normalization must be 'token' or 'sequence', "
                f"got {self.loss_normalization!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(
                f"sft recipe: precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}"
            )
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError("sft recipe: need 0 < min_lr <= lr")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SFTRecipe:
        try:
            return cls(**_known(raw, cls))
        except TypeError as err:
            raise ConfigError(f"sft recipe: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> SFTRecipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file {str(path)!r}")
        return cls.from_dict(apply_overrides(yaml.safe_load(path.read_text()) or {}, list(overrides)))


def _known(raw: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    return raw


# ------------------------------------------------------------------------------------------ data
def read_conversations(path: str | os.PathLike) -> list[list[dict[str, Any]]]:
    """Conversations of a chat JSONL file, checked line by line with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no chat data file {str(path)!r}")
    out = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{where}: needs a non-empty 'messages' list")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise ValueError(f"{where}: each message needs role system, user or assistant")
                if not isinstance(m.get("content"), str):
                    raise ValueError(f"{where}: message content must be a string")
                if not isinstance(m.get("reasoning_content", ""), str | None):
                    raise ValueError(f"{where}: reasoning_content must be a string")
            if not any(trained_turns(messages)):
                raise ValueError(
                    f"{where}: no assistant reply to learn from (replies before the last user message "
                    "whose reasoning the chat template drops are not trained)"
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


def collate(ids: Sequence[list[int]], labels: Sequence[list[int]]) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, labels)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), PAD_ID)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    target = torch.full((len(ids), width), IGNORE_INDEX)
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
        target[row, : len(y)] = torch.tensor(y)
    return input_ids, mask, target


def row_sampler(data: EncodedData, weights: Sequence[float], seed: int) -> torch.Tensor:
    """Per-row probabilities so that dataset d supplies weight_d / sum(weights) of the rows."""
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
    """Endless (row indices, loss weight) batches drawn with replacement from ``probs``.

    ``group`` batches at a time are sorted by ``lengths`` and visited in random order. Each batch's
    mean token loss is weighted by its share of the group's target tokens (``targets`` per row),
    so every target token counts alike, as in unsorted batches: otherwise a batch of short replies
    would weigh as much as one of long replies with ten times the tokens.
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


# ----------------------------------------------------------------------------------------- train
def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss averaged per row over its target tokens, then over rows that have any."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    counts = (targets != IGNORE_INDEX).sum(1)
    has = counts > 0
    return (losses.sum(1)[has] / counts[has]).mean()


def cosine_lr(step: int, recipe: SFTRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps + 1) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def export_model(model: TurboSForCausalLM, tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """A servable model directory: weights, config, tokenizer files with the chat template."""
    directory = Path(directory)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    save_chat_template(directory)
    return directory


# Recipe fields a resumed run may change: where it writes, how often it saves, where it runs.
# Every other field shapes the batches or the updates, so a checkpoint refuses a recipe that differs.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "checkpoint_interval", "keep_last", "device", "precision", "extra"}
)


def recipe_state(recipe: SFTRecipe) -> dict[str, Any]:
    """What identifies a run's training (JSON types): the recipe less ``RESUMABLE_CHANGES``."""
    state = json.loads(json.dumps(asdict(recipe)))
    return {key: value for key, value in state.items() if key not in RESUMABLE_CHANGES}


def run_sft(
    recipe: SFTRecipe,
    progress: bool = True,
    resume: str | None = None,
    overwrite: bool = False,
    stop_at: int | None = None,
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
    """
    if stop_at is not None and not 0 < stop_at <= recipe.steps:
        raise ValueError(f"stop_at must be in [1, steps={recipe.steps}], got {stop_at}")
    out = Path(recipe.output_dir)
    outputs = (out / MODEL_DIR, out / SUMMARY_FILE)
    finished = [path for path in outputs if path.exists()]
    if resume is None and finished:
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a finished SFT run ({', '.join(path.name for path in finished)}): pass "
                "--overwrite to replace it, or choose another output_dir"
            )
        for path in finished:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    current = recipe_state(recipe)
    checkpoint = open_run_dir(out, resume, overwrite, current, outputs)
    if checkpoint is not None and (out / SUMMARY_FILE).is_file():
        print(
            f"{out} is already finished (resumed from its latest checkpoint {checkpoint}); nothing to do",
            file=sys.stderr,
        )
        return json.loads((out / SUMMARY_FILE).read_text())
    torch.manual_seed(recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    device = resolve_device(recipe.device)
    model = TurboSForCausalLM.from_pretrained(recipe.model, device=device).train()
    if recipe.max_len > model.config.max_position_embeddings:
        raise ConfigError(
            f"sft recipe: max_len={recipe.max_len} exceeds the max_position_embeddings="
            f"{model.config.max_position_embeddings} of the model {recipe.model}"
        )
    tokenizer = load_tokenizer(recipe.model)
    tokenizer_dir = save_tokenizer(tokenizer, out / "tokenizer")  # copied into every checkpoint
    data = encode_datasets(recipe.data, tokenizer, recipe.max_len)
    probs = row_sampler(data, [d.weight for d in recipe.data], recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    c = model.config
    scale = expert_lr_scale(recipe.expert_lr, c.num_experts_per_tok, c.num_experts)
    optimizer = build_optimizer(model, recipe.lr, recipe.betas, recipe.weight_decay, expert_scale=scale)
    per_sequence = recipe.loss_normalization == "sequence"
    batches = batch_rows(
        probs,
        [len(x) for x in data.ids],
        [1 if per_sequence else sum(t != IGNORE_INDEX for t in y) for y in data.labels],
        recipe.batch_size,
        recipe.group_by_length,
        generator,
    )
    first, tokens, loss_value = 0, 0, float("nan")
    if checkpoint is not None:
        resumed = load_checkpoint(checkpoint, model, optimizer)  # weights, optimizer and RNG states
        first, tokens, loss_value = resumed["step"], resumed["tokens"], resumed.get("loss", loss_value)
        for _ in range(first):  # the batch stream replayed to where the run stopped
            next(batches)
    end = recipe.steps if stop_at is None else max(stop_at, first)
    log = MetricsLog(out, resume_step=first if checkpoint is not None else None)
    bar = tqdm(
        range(first, end),
        initial=first,
        total=recipe.steps,
        desc="sft",
        disable=not progress,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for step in bar:
        rows, weight = next(batches)
        input_ids, mask, labels = (
            t.to(device) for t in collate([data.ids[i] for i in rows], [data.labels[i] for i in rows])
        )
        lrs = set_lr(optimizer, cosine_lr(step, recipe))
        t0 = time.perf_counter()
        with autocast_context(recipe.precision, device):
            # Sequence loss is computed here from the logits, so the model need not compute the
            # token loss as well.
            result = model(
                input_ids, attention_mask=mask, labels=None if per_sequence else labels, router_losses=True
            )
        optimizer.zero_grad(set_to_none=True)
        lm_loss = sequence_mean_loss(result.logits, labels) if per_sequence else result.lm_loss
        (lm_loss * weight + result.aux_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip or math.inf).item()
        optimizer.step()
        step_tokens = int(mask.sum())
        tokens += step_tokens
        loss_value, aux_value = lm_loss.item(), result.aux_loss.item()
        tok_s = step_tokens / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}")
        log.write(
            {
                "step": step + 1,
                "loss": loss_value + aux_value,
                "lm_loss": loss_value,
                "aux_loss": aux_value,
                "lr": lrs,
                "grad_norm": grad_norm,
                "tokens_per_s": tok_s,
                **summarize_moe([result.moe_stats]),
            }
        )
        done = step + 1
        if (recipe.checkpoint_interval and done % recipe.checkpoint_interval == 0) or (
            done == end < recipe.steps
        ):
            trainer_state = {"step": done, "tokens": tokens, "loss": loss_value, "recipe": current}
            save_checkpoint(
                out, done, model, optimizer, trainer_state, tokenizer_dir, keep_last=recipe.keep_last
            )
    bar.close()
    if end < recipe.steps:
        return {"steps": end, "stopped_at": end, "tokens": tokens, "wall_s": time.perf_counter() - start}
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
        "tokens": tokens,
        "final_loss": loss_value,
        "wall_s": time.perf_counter() - start,
        "model_dir": str(out / MODEL_DIR),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
