"""What a recipe's data section turns into: the tokenizer, and batches of packed rows per stage.

Training micro-batches are ``PackedBatch`` es of rows (batch, seq_len + 1): inputs ``[:, :-1]``,
targets ``[:, 1:]``, streamed by `turbos.data.packing.StreamingPackedDataset`, whose position
makes resume exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from turbos.data.corpora import Corpus, Mixture, build_corpus
from turbos.data.packing import StreamingPackedDataset, document_split
from turbos.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from turbos.train.recipe import Recipe, StagePlan

SHUFFLE_TOKENS = 2**18
"""Tokens the training stream shuffles together: the buffer holds SHUFFLE_TOKENS // seq_len rows
(at least one), so a stage of long rows does not tokenize far ahead before its first batch."""


@dataclass
class PackedBatch:
    """A micro-batch of packed rows (batch, seq_len + 1): inputs ``rows[:, :-1]``, targets
    ``rows[:, 1:]``."""

    rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.rows[:, :-1].numel()

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(self.rows.to(device))


class BatchStream:
    """Batches of ``batch_size`` rows from a streaming dataset (an iterator, endless when the
    dataset repeats), with the dataset's resumable position.

    Data parallel: of each ``ranks x batch_size`` rows, rank ``rank`` takes the ``rank``-th
    ``batch_size``; every rank walks the whole stream, so the position (rows read) is the same on
    all of them and means the same on any number of ranks."""

    def __init__(
        self, dataset: StreamingPackedDataset, batch_size: int, rank: int = 0, ranks: int = 1
    ) -> None:
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} is not one of {ranks} ranks")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.ranks = rank, ranks
        self._rows: Any = None  # opened at the first batch, after any saved position is loaded

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> PackedBatch:
        if self._rows is None:
            self._rows = iter(self.dataset)
        rows = list(itertools.islice(self._rows, self.batch_size * self.ranks))
        if len(rows) < self.batch_size * self.ranks:
            raise StopIteration
        start = self.rank * self.batch_size
        return PackedBatch(torch.stack(rows[start : start + self.batch_size]))

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._rows = None


def prepare_tokenizer(recipe: Recipe, run_dir: Path, resuming: bool = False) -> tuple[Tokenizer, Path]:
    """The recipe's tokenizer and the directory holding its files.

    With ``data.tokenizer.vocab_size`` a byte-level BPE is trained on the train split of
    ``data.sources`` (validation documents left out) and saved under ``RUN_DIR/tokenizer``; a
    resumed run loads the one its run trained instead.
    """
    spec = recipe.data.tokenizer
    if spec.path is not None:
        return load_tokenizer(spec.path), Path(spec.path)
    directory = run_dir / "tokenizer"
    if resuming:
        return load_tokenizer(directory), directory
    corpus = build_corpus(recipe.data.sources, seed=recipe.seed)
    documents = (d for d in corpus if document_split(d, recipe.data.val_fraction) == "train")
    tokenizer = train_tokenizer(itertools.islice(documents, spec.max_documents), spec.vocab_size)
    save_tokenizer(tokenizer, directory)
    return tokenizer, directory


def stage_corpus(recipe: Recipe, plan: StagePlan) -> Corpus:
    """The stage's sources (default data.sources), mixed with its long_sources at its short:long
    ratio when it has them.

    The ratio weighs documents: with [3, 1] three of every four documents (on average) come from
    the short sources (report §2.4: short:long 3:1).
    """
    stage = recipe.stages[plan.index]
    short = build_corpus(
        stage.sources if stage.sources is not None else recipe.data.sources, seed=recipe.seed
    )
    if stage.long_sources is None:
        return short
    long = build_corpus(stage.long_sources, seed=recipe.seed)
    return Mixture((short, long), tuple(stage.short_long_ratio), seed=recipe.seed + plan.index)


def train_batches(
    recipe: Recipe, plan: StagePlan, tokenizer: Tokenizer, rank: int = 0, ranks: int = 1
) -> BatchStream:
    """The endless, shuffled training stream of a stage (seeded by recipe seed and stage index),
    as data-parallel rank ``rank`` of ``ranks`` reads it."""
    dataset = StreamingPackedDataset(
        stage_corpus(recipe, plan),
        tokenizer,
        plan.seq_len,
        split="train",
        val_fraction=recipe.data.val_fraction,
        shuffle_buffer=max(1, SHUFFLE_TOKENS // plan.seq_len),
        seed=recipe.seed + plan.index,
    )
    return BatchStream(dataset, plan.batch_size, rank, ranks)


def validation_batches(
    corpus: Corpus,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    val_fraction: float,
    split: str = "val",
) -> list[torch.Tensor]:
    """The first ``num_batches`` batches of a split, unshuffled: the same rows at every evaluation."""
    dataset = StreamingPackedDataset(
        corpus, tokenizer, seq_len, split=split, val_fraction=val_fraction, shuffle_buffer=0, repeat=False
    )
    batches = [batch.rows for batch in itertools.islice(BatchStream(dataset, batch_size), num_batches)]
    if not batches:
        raise ValueError(
            f"the {split} split has too few tokens for one batch of {batch_size} x {seq_len + 1}; "
            "raise data.val_fraction or lower the batch size"
        )
    return batches
