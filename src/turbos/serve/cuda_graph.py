"""CUDA-graph decode steps, as vLLM runs them: a decode step of a small model is ~1,400 kernels, and
launching them one by one from Python costs far more than running them. A captured graph launches
the whole step at once.

A graph needs fixed shapes and addresses, so a captured step differs from the eager one in form
(not in result):

- rows are padded to a bucket (1, 2, 4, 8, ... up to ``max_rows``); padding rows compute garbage
  that no one reads;
- attention reads the whole capacity of the running batch's KV buffers, masked per row to the
  columns ``[end - length, end]``, and writes the new key and value at column ``end``, given as a
  device tensor;
- Mamba2 states live in static buffers that the running batch's ``MambaCache`` views (copied in
  once whenever the rows change);
- token ids, row lengths and ``end`` are copied into one static input tensor before each replay.

Graphs are captured lazily per bucket and again whenever the KV buffers are reallocated (capacity
doubling: a few times per context length). MoE layers take their sync-free path on CUDA
(``RoutedExperts.gathered`` / ``dense``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbos.model import TurboSForCausalLM
from turbos.model.cache import MambaCache
from turbos.serve.cache_manager import BatchCache, SlotAttention


class _StaticAttention:
    """Attention cache of a captured step: writes at column ``column`` of every row, returns the
    whole buffer (the mask selects each row's columns)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, column: torch.Tensor) -> None:
        self.key, self.value, self.column = key, value, column

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.key.index_copy_(2, self.column, key)
        self.value.index_copy_(2, self.column, value)
        return self.key, self.value


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    """(bucket, vocab), rewritten by each replay."""


def buckets(max_rows: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below ``max_rows``, and ``max_rows``."""
    return sorted({min(2**i, max_rows) for i in range(max_rows.bit_length() + 1)})


class CUDAGraphDecoder:
    """Decode steps of a ``BatchCache``'s rows by graph replay (see the module docstring)."""

    def __init__(self, model: TurboSForCausalLM, max_rows: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.max_rows = max_rows
        self.buckets = buckets(max_rows)
        self.inputs = torch.zeros(2 * max_rows + 1, dtype=torch.long, device=self.device)
        """Token ids [0, max_rows), row lengths [max_rows, 2 max_rows), column ``end`` last."""
        config = model.config
        self.mamba = [
            MambaCache.zeros(config, max_rows, self.device) if kind == "M" else None
            for kind in config.layer_types
        ]
        self.graphs: dict[int, _Graph] = {}
        self._captured_on: tuple[tuple[int, ...], ...] = ()
        self._pool = None

    def step(self, cache: BatchCache, token_ids: list[int]) -> torch.Tensor:
        """Feed row r token ``token_ids[r]`` at column ``cache.end``; (rows, vocab) logits.

        The caller reserves the column first and advances the cache after, as for an eager step."""
        n = len(token_ids)
        if not 0 < n <= self.max_rows or n != cache.num_rows:
            raise ValueError(
                f"a graph step takes one token per row (1 to {self.max_rows} rows), got {n} tokens"
            )
        bucket = next(b for b in self.buckets if b >= n)
        self._store_mamba_state(cache.layers, n)
        layout = tuple(
            (t.data_ptr(), *t.shape)
            for layer in cache.layers
            if isinstance(layer, SlotAttention)
            for t in (layer.key, layer.value)
        )
        if layout != self._captured_on:  # KV buffers reallocated: the graphs point at old ones
            self.graphs.clear()
            self._pool = None  # that pool went with its graphs; the next capture starts a new one
            self._captured_on = layout
        pad = [0] * (self.max_rows - n)
        host = torch.tensor([*token_ids, *pad, *cache.lengths, *pad, cache.end], dtype=torch.long)
        self.inputs.copy_(host)
        graph = self.graphs.get(bucket) or self._capture(cache, bucket)
        graph.graph.replay()
        return graph.logits[:n].clone()

    def _store_mamba_state(self, caches: list, rows: int) -> None:
        """Make the Mamba states of ``caches`` (one per layer) views of the static buffers, copying
        in any state that is not one already (rows joined, or a layer replaced its state)."""
        for cache, static in zip(caches, self.mamba, strict=True):
            if static is None:
                continue
            for name in ("conv_state", "ssm_state"):
                state, buffer = getattr(cache, name), getattr(static, name)
                if state.data_ptr() != buffer.data_ptr():
                    buffer[:rows].copy_(state)
                    setattr(cache, name, buffer[:rows])

    def _forward(self, cache: BatchCache, bucket: int) -> torch.Tensor:
        """One decode step on the static inputs: what the graph records."""
        m = self.max_rows
        ids, lengths, end = self.inputs[:bucket, None], self.inputs[m : m + bucket], self.inputs[2 * m :]
        columns = torch.arange(cache.capacity, device=self.device)
        mask = (columns >= (end - lengths)[:, None]) & (columns <= end)  # (bucket, capacity)
        layers: list[object | None] = []
        for layer, static in zip(cache.layers, self.mamba, strict=True):
            if isinstance(layer, SlotAttention):
                layers.append(_StaticAttention(layer.key[:bucket], layer.value[:bucket], end))
            elif static is not None:
                layers.append(MambaCache(static.conv_state[:bucket], static.ssm_state[:bucket]))
            else:
                layers.append(None)
        stack = self.model.model
        ctx = stack.layer_context(lengths[:, None], attn_mask=mask[:, None, None])
        hidden = stack.run_layers(ids, ctx, layers)
        self._store_mamba_state(layers, bucket)
        return self.model.lm_head(hidden[:, -1])

    def _capture(self, cache: BatchCache, bucket: int) -> _Graph:
        # Warm up on a side stream (lazy kernel and workspace set-up stays out of the graph); the
        # warm-up advances the Mamba states, so they are put back before capturing.
        states = [s for s in self.mamba if s is not None]
        saved = [(s.conv_state.clone(), s.ssm_state.clone()) for s in states]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(cache, bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for s, (conv, ssm) in zip(states, saved, strict=True):
            s.conv_state.copy_(conv)
            s.ssm_state.copy_(ssm)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's thread may touch CUDA (e.g. a request's seeded generator)
        # while the engine thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(cache, bucket)
        self._pool = graph.pool()
        self.graphs[bucket] = _Graph(graph, logits)
        return self.graphs[bucket]
