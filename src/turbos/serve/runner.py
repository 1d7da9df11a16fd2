"""Batched forward passes: chunked prefill of a group of prompts, and one decode step for all rows.

A prefill group is left-padded to its longest prompt and fed ``prefill_chunk`` columns at a time,
so a long prompt never needs one huge forward and the engine can decode the running batch between
chunks. Padding sits before each row's first token only, where the model handles it exactly
(Mamba2 conv and SSM state see zeros, attention masks it, positions count real tokens).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from turbos.model import TurboSForCausalLM
from turbos.serve.cache_manager import BatchCache
from turbos.serve.cuda_graph import CUDAGraphDecoder
from turbos.serve.sequence import Sequence


@dataclass
class PrefillJob:
    """A group of prompts being prefilled together."""

    seqs: list[Sequence]
    input_ids: torch.Tensor
    """(rows, width), left-padded."""
    attention_mask: torch.Tensor | None
    """(rows, width), 0 on padding; None when all prompts have the same length."""
    cache: BatchCache
    done: int = 0
    """Columns fed so far."""

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def keep_rows(self, rows: Seq[int]) -> None:
        """Keep only these rows (e.g. after some were cancelled)."""
        self.seqs = [self.seqs[r] for r in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        self.input_ids = self.input_ids[index]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[index]
        self.cache.keep_rows(rows)


class ModelRunner:
    """Runs the model on a ``BatchCache``; knows nothing of scheduling or sampling."""

    def __init__(self, model: TurboSForCausalLM, prefill_chunk: int, graphs: CUDAGraphDecoder | None) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.graphs = graphs
        """Replays decode steps of up to ``graphs.max_rows`` rows as CUDA graphs; None: eager."""

    def start_prefill(self, seqs: list[Sequence], cache: BatchCache) -> PrefillJob:
        """Left-pad the prompts of ``seqs`` into one batch whose state will fill ``cache``."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        uniform = bool(mask.all())
        return PrefillJob(seqs, ids.to(self.device), None if uniform else mask.to(self.device), cache)

    @torch.inference_mode()
    def prefill_step(self, job: PrefillJob) -> torch.Tensor | None:
        """Feed the next chunk; after the last one, return the next-token logits (rows, vocab)."""
        T = min(self.prefill_chunk, job.width - job.done)
        mask = None if job.attention_mask is None else job.attention_mask[:, : job.done + T]
        job.cache.reserve(T)
        out = self.model(
            job.input_ids[:, job.done : job.done + T],
            attention_mask=mask,
            past_key_values=job.cache,
            logits_to_keep=1,
        )
        job.done += T
        if job.done < job.width:
            return None
        job.cache.lengths = [len(s.prompt_ids) for s in job.seqs]
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode_step(self, cache: BatchCache, seqs: Seq[Sequence]) -> torch.Tensor:
        """Feed every row its last token; return the next-token logits (rows, vocab)."""
        if self.graphs is not None and len(seqs) <= self.graphs.max_rows:
            cache.reserve(1)
            logits = self.graphs.step(cache, [s.last_token for s in seqs])
            cache.end += 1
            cache.advance(1)
            return logits
        ids = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)
        mask = cache.attention_mask(1)
        cache.reserve(1)
        out = self.model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        cache.advance(1)
        return out.logits[:, -1]
