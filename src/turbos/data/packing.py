"""Packing documents into fixed-length rows of token ids, streamed with exact resume.

Each document is tokenized (no special tokens added) and followed by EOS; the documents are
concatenated into one token stream, and row i is `stream[i * seq_len : i * seq_len + seq_len + 1]`.
A row holds `seq_len + 1` tokens (inputs `row[:-1]`, labels `row[1:]`) and consecutive rows
share one token, so every next-token pair of the stream is in exactly one row. The tail too short
for a full row is dropped (fewer than `seq_len + 1` tokens).

Validation documents are chosen by a hash of their text (`document_split`), whatever the corpus
order, without a first pass over the corpus.

A row read as one text lets attention and the Mamba2 state run across document boundaries;
`eos_seq_idx` numbers the documents of a row instead (the model's ``seq_idx``), so each sees only
itself. `first_fit_decreasing` packs whole sequences (SFT conversations) into rows.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from turbos.data.tokenizer import EOS_TOKEN

SPLITS = ("train", "val")


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def document_split(text: str, val_fraction: float) -> str:
    """The split of a document: "val" for about `val_fraction` of them, by a stable hash of the text."""
    _check_fraction(val_fraction)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def eos_token_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's EOS token, which ends every packed document."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token to end documents with")
    return eos


def tokenize_documents(
    documents: Iterable[str], tokenizer: Tokenizer, batch_size: int = 256
) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, encoded a batch at a time (in parallel)."""
    eos = eos_token_id(tokenizer)
    documents = iter(documents)
    while batch := list(itertools.islice(documents, batch_size)):
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            yield [*encoding.ids, eos]


def pack_rows(token_documents: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Rows of `seq_len + 1` tokens over the concatenated documents, overlapping by one token."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pending: list[int] = []
    for ids in token_documents:
        pending.extend(ids)
        n_rows = (len(pending) - 1) // seq_len
        for i in range(n_rows):
            yield pending[i * seq_len : (i + 1) * seq_len + 1]
        if n_rows:
            pending = pending[n_rows * seq_len :]


def eos_seq_idx(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's document within its row of EOS-separated documents (the model's ``seq_idx``,
    (..., T) long): the number of EOS tokens before it, so a document ends with its EOS and the
    next one starts after it. A row's first token continues whatever document it was cut from."""
    ends = (input_ids == eos_id).long()
    return ends.cumsum(-1) - ends


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length at most ``capacity``: longest first
    (ties in index order), each into the first bin with room, else a new one. Bins are in the
    order they were opened, their items in the order they were placed."""
    too_long = [length for length in lengths if length > capacity]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens does not fit in a row of {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            bins.append([])
            room.append(capacity)
            fits = len(bins) - 1
        bins[fits].append(i)
        room[fits] -= lengths[i]
    return bins


class StreamingPackedDataset(IterableDataset):
    """Rows packed on the fly from a corpus of any size, shuffled in a buffer of `shuffle_buffer` rows.

    Iterating yields LongTensor rows of `seq_len + 1`, continuing from the current position
    (`rows_consumed`), like a file; with `repeat` the corpus is read again and again, an endless
    stream for step-based training, and without it a finished pass puts the position back to 0.
    The whole row sequence is fixed by `seed`. `state_dict()` reports the position and
    `load_state_dict()` restores it, so training resumes with exactly the row that would have come
    next; restoring replays the stream up to there (tokenizing, not training). The position is
    counted in this process, so use it with `DataLoader(num_workers=0)`; `tokenizers` already
    encodes on every core.
    """

    def __init__(
        self,
        corpus: Iterable[str],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        split: str = "train",
        val_fraction: float = 0.0,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        repeat: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be non-negative, got {shuffle_buffer}")
        _check_fraction(val_fraction)
        self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len
        self.split, self.val_fraction = split, val_fraction
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        self.rows_consumed = 0

    def _documents(self) -> Iterator[str]:
        """This split's documents, read once or, with `repeat`, again and again. A corpus with an
        ``endless()`` reading (a mixture: each source starts again when it runs out, see
        `turbos.data.corpora.Mixture`) repeats through that, so no pass cuts a source short."""
        endless = getattr(self.corpus, "endless", None)
        if self.repeat and endless is not None:
            if not any(document_split(d, self.val_fraction) == self.split for d in self.corpus):
                raise ValueError(f"the corpus has no {self.split} documents")
            yield from (d for d in endless() if document_split(d, self.val_fraction) == self.split)
            return
        while True:
            found = False
            for document in self.corpus:
                if document_split(document, self.val_fraction) == self.split:
                    found = True
                    yield document
            if not found:
                raise ValueError(f"the corpus has no {self.split} documents")
            if not self.repeat:
                return

    def _rows(self) -> Iterator[list[int]]:
        """Every row from the start, in the order fixed by the seed."""
        rng = random.Random(self.seed)
        buffer: list[list[int]] = []
        for row in pack_rows(tokenize_documents(self._documents(), self.tokenizer), self.seq_len):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            if buffer:
                i = rng.randrange(len(buffer))
                buffer[i], row = row, buffer[i]
            yield row
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[torch.Tensor]:
        if get_worker_info() is not None:
            raise RuntimeError("StreamingPackedDataset counts its position in-process; use num_workers=0")
        for row in itertools.islice(self._rows(), self.rows_consumed, None):
            self.rows_consumed += 1
            yield torch.tensor(row, dtype=torch.long)
        self.rows_consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict` of a dataset built the same way."""
        mine = self.state_dict()
        different = [key for key in ("seed", "seq_len", "split") if state[key] != mine[key]]
        if different:
            raise ValueError(
                f"state is for a different stream: {[(k, state[k], mine[k]) for k in different]}"
            )
        self.rows_consumed = int(state["rows_consumed"])
