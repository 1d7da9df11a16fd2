"""Supervised fine-tuning on chat data (report §3.1), with loss on assistant tokens only.

Data: JSONL files, one conversation per line: ``{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]}`` (system turns and several rounds allowed; an
assistant turn may hold ``<think>...</think>`` or a ``reasoning_content`` field). Conversations
render with the serving chat template (``turbos.serve.chat_template.render_chat``), so training
and inference see the same text; the loss covers each assistant reply and its closing ``<|end|>``.

One conversation per row, right-padded: no attention between samples and every Mamba2 state starts
from zero, at the cost of padding. (Packing several conversations into a row would need
per-sample state resets inside the scan; at the lengths SFT uses here, padding is cheaper to get
right.) Several datasets mix by weight: each row's dataset is drawn with probability weight / sum.
"""

from __future__ import annotations

import json
import math
import os
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
from turbos.data.tokenizer import ASSISTANT_TOKEN, END_TOKEN, PAD_ID, load_tokenizer, save_tokenizer
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX
from turbos.serve.chat_template import render_chat, save_chat_template
from turbos.train.checkpoint import load_checkpoint, open_run_dir, read_trainer_state, save_checkpoint
from turbos.train.evaluate import autocast_context, resolve_device
from turbos.train.metrics import MetricsLog, summarize_moe
from turbos.train.optim import build_optimizer, expert_lr_scale, set_lr
from turbos.train.recipe import apply_overrides


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
        self.data = [
            d if isinstance(d, SFTDataset) else SFTDataset(**_known(d, SFTDataset)) for d in self.data
        ]
        self.betas = tuple(self.betas)
        if not self.data:
            raise ConfigError("sft recipe: data needs at least one {path, weight} entry")
        for d in self.data:
            if d.weight <= 0:
                raise ConfigError(f"sft recipe: weight of {d.path} must be > 0")
        for name in ("max_len", "batch_size", "steps", "group_by_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sft recipe: {name} must be > 0, got {getattr(self, name)}")
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
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: no assistant message to learn from")
            out.append(messages)
    return out


def encode_conversation(
    messages: Sequence[dict[str, Any]], tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that are IGNORE_INDEX outside the
    assistant replies. Each reply's span runs from after ``<|assistant|>`` through ``<|end|>``;
    the markers are single special tokens, so tokenizing the pieces equals tokenizing the whole."""
    text = render_chat(messages, add_generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    rest = text
    while rest:
        head, marker, tail = rest.partition(ASSISTANT_TOKEN)
        piece = tokenizer.encode(head + marker).ids
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
        if not marker:
            break
        reply, end, rest = tail.partition(END_TOKEN)
        piece = tokenizer.encode(reply + end).ids
        ids += piece
        labels += piece
    return ids, labels


@dataclass
class EncodedData:
    ids: list[list[int]]
    labels: list[list[int]]
    source: list[int]
    skipped: int


def encode_datasets(datasets: Sequence[SFTDataset], tokenizer: Tokenizer, max_len: int) -> EncodedData:
    """Encode every conversation; those longer than max_len tokens are skipped and counted."""
    data = EncodedData([], [], [], 0)
    for index, dataset in enumerate(datasets):
        for messages in read_conversations(dataset.path):
            ids, labels = encode_conversation(messages, tokenizer)
            if len(ids) > max_len:
                data.skipped += 1
                continue
            data.ids.append(ids)
            data.labels.append(labels)
            data.source.append(index)
    if not data.ids:
        raise ValueError(f"no conversation fits in max_len={max_len} tokens")
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
    per_row = (w / counts.clamp(min=1))[torch.tensor(data.source)]
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
    restored. An output directory that holds checkpoints is refused unless resuming or ``overwrite``.
    ``stop_at``: stop after that step (the model is exported only when all ``steps`` are done).
    """
    if stop_at is not None and not 0 < stop_at <= recipe.steps:
        raise ValueError(f"stop_at must be in [1, steps={recipe.steps}], got {stop_at}")
    out = Path(recipe.output_dir)
    checkpoint = open_run_dir(out, resume, overwrite)
    current = recipe_state(recipe)
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint).get("recipe", {})
        changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
        if changed:
            raise ValueError(f"checkpoint {checkpoint} was trained with a different recipe: {changed} differ")
    torch.manual_seed(recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    device = resolve_device(recipe.device)
    model = TurboSForCausalLM.from_pretrained(recipe.model, device=device).train()
    tokenizer = load_tokenizer(recipe.model)
    tokenizer_dir = save_tokenizer(tokenizer, out / "tokenizer")  # copied into every checkpoint
    data = encode_datasets(recipe.data, tokenizer, recipe.max_len)
    probs = row_sampler(data, [d.weight for d in recipe.data], recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    c = model.config
    scale = expert_lr_scale(recipe.expert_lr, c.num_experts_per_tok, c.num_experts) if c.num_experts else 1.0
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
    first, tokens = 0, 0
    if checkpoint is not None:
        resumed = load_checkpoint(checkpoint, model, optimizer)  # weights, optimizer and RNG states
        first, tokens = resumed["step"], resumed["tokens"]
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
    start, loss_value = time.perf_counter(), float("nan")
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip).item()
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
            trainer_state = {"step": done, "tokens": tokens, "recipe": current}
            save_checkpoint(
                out, done, model, optimizer, trainer_state, tokenizer_dir, keep_last=recipe.keep_last
            )
    bar.close()
    if end < recipe.steps:
        return {"steps": end, "stopped_at": end, "tokens": tokens, "wall_s": time.perf_counter() - start}
    model.eval()
    export_model(model, tokenizer, out / "model")
    summary = {
        "steps": recipe.steps,
        "conversations": len(data.ids),
        "skipped_too_long": data.skipped,
        "tokens": tokens,
        "final_loss": loss_value,
        "wall_s": time.perf_counter() - start,
        "model_dir": str(out / "model"),
    }
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
