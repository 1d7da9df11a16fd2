"""Decoding state of the running batch: one row ("slot") per sequence, preallocated.

Layout. Attention keys and values live in buffers of shape (rows, kv_heads, capacity, head_dim);
Mamba2 layers keep their conv window and SSM state, fp32 (report §5), as (rows, ...) tensors. The
rows share one time axis: the live columns are ``[start, end)`` and every row's tokens are
right-aligned at ``end``, so a row with fewer tokens than the window is left-padded. A decode step
writes every row's new key at column ``end``; the attention mask hides each row's padding, and
positions, derived from the mask by the model, count real tokens only. This is the left-padded
layout ``TurboSForCausalLM`` already computes exactly (tests/test_model_cache.py), with no
reallocation per step: buffers grow by doubling, so appending is amortised O(1).

Rows stay packed in ``[0, num_rows)``, so the running batch is a view, never a gather: a joining
sequence takes the next row, a leaving one is replaced by the last row. When the longest row
leaves, the window shrinks to the longest remaining one.

``BatchCache`` offers what ``TurboSForCausalLM.forward`` uses of a ``HybridCache`` (``layers``,
``get_seq_length``, ``seen_tokens``); ``CacheManager`` owns the running batch and its row order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from turbos.config import TurboSConfig
from turbos.model.cache import MambaCache
from turbos.serve.sequence import Sequence

_MIN_CAPACITY = 64


class SlotAttention:
    """Keys and values of one attention layer for the rows of a ``BatchCache``."""

    def __init__(self, owner: BatchCache, key: torch.Tensor, value: torch.Tensor) -> None:
        self.owner = owner
        self.key, self.value = key, value

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (n, kv_heads, T, d) keys and values at column ``end``; return the window."""
        n, T = key.shape[0], key.shape[2]
        start, end = self.owner.start, self.owner.end
        self.key[:n, :, end : end + T] = key
        self.value[:n, :, end : end + T] = value
        return self.key[:n, :, start : end + T], self.value[:n, :, start : end + T]


class BatchCache:
    """Per-layer decoding state of a batch of rows sharing a time axis (see the module docstring)."""

    def __init__(
        self,
        config: TurboSConfig,
        num_rows: int,
        device: torch.device | str,
        dtype: torch.dtype,
        row_capacity: int | None = None,
        capacity: int = _MIN_CAPACITY,
    ) -> None:
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.num_rows = num_rows
        self.lengths: list[int] = [0] * num_rows
        """Real (non-padding) tokens of each row in the window."""
        self.start = self.end = 0
        rows = max(num_rows, row_capacity or 0, 1)
        self.layers: list[SlotAttention | MambaCache | None] = []
        for kind in config.layer_types:
            if kind == "A":
                self.layers.append(SlotAttention(self, *self._kv_buffers(rows, capacity)))
            elif kind == "M":
                self.layers.append(MambaCache.zeros(config, num_rows, device))
            else:
                self.layers.append(None)

    def _kv_buffers(self, rows: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, self.config.num_key_value_heads, capacity, self.config.attn_head_dim)
        return (
            torch.zeros(shape, device=self.device, dtype=self.dtype),
            torch.zeros(shape, device=self.device, dtype=self.dtype),
        )

    def _attention(self) -> list[SlotAttention]:
        return [layer for layer in self.layers if isinstance(layer, SlotAttention)]

    # --------------------------------------------------------------- what the model reads
    def get_seq_length(self) -> int:
        """Width of the shared window (the longest row)."""
        return self.end - self.start

    @property
    def seen_tokens(self) -> int:
        return self.end - self.start

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:  # the model adds the tokens it wrote at ``end``
        self.end = self.start + value

    # ----------------------------------------------------------------------- bookkeeping
    @property
    def capacity(self) -> int:
        """Columns of the attention buffers (0 without attention layers)."""
        layers = self._attention()
        return layers[0].key.shape[2] if layers else 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def attention_mask(self, num_new: int) -> torch.Tensor | None:
        """(rows, width + num_new) mask of real tokens for ``num_new`` tokens more in every row, or
        None when no row has padding."""
        width = self.width
        if all(length == width for length in self.lengths):
            return None
        first_real = torch.tensor([width - n for n in self.lengths], device=self.device)
        columns = torch.arange(width + num_new, device=self.device)
        return (columns[None, :] >= first_real[:, None]).long()

    def advance(self, num_new: int) -> None:
        """Count ``num_new`` more real tokens in every row (after a forward through all rows)."""
        self.lengths = [n + num_new for n in self.lengths]

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more columns at the end."""
        layers = self._attention()
        if layers and self.end + num_new > layers[0].key.shape[2]:
            self._relocate(self.width, capacity=max(_MIN_CAPACITY, 2 * (self.width + num_new)))

    def _relocate(self, width: int, capacity: int, rows: int | None = None) -> None:
        """Move the window into new buffers with the live columns right-aligned at ``width``."""
        old_width = self.width
        for layer in self._attention():
            key, value = self._kv_buffers(rows or layer.key.shape[0], capacity)
            n = self.num_rows
            key[:n, :, width - old_width : width] = layer.key[:n, :, self.start : self.end]
            value[:n, :, width - old_width : width] = layer.value[:n, :, self.start : self.end]
            layer.key, layer.value = key, value
        self.start, self.end = 0, width

    def _widen(self, width: int) -> None:
        """Make the window at least ``width`` columns (the new columns are padding for every row)."""
        if width <= self.width:
            return
        if self.end >= width:
            self.start = self.end - width
        else:
            capacity = self._attention()[0].key.shape[2] if self._attention() else 0
            self._relocate(width, capacity=max(capacity, _MIN_CAPACITY, 2 * width))

    def add_rows(self, source: BatchCache, rows: Seq[int]) -> None:
        """Append rows of another cache (e.g. a finished prefill) at the end of this batch."""
        if not rows:
            return
        if self.num_rows == 0:
            self.start = self.end
        self._widen(source.width)
        g, n = len(rows), self.num_rows
        attention = self._attention()
        if attention and n + g > attention[0].key.shape[0]:
            self._relocate(
                self.width, attention[0].key.shape[2], rows=max(2 * attention[0].key.shape[0], n + g)
            )
        index = torch.tensor(rows, device=self.device)
        pad = self.end - source.width
        for mine, theirs in zip(self.layers, source.layers, strict=True):
            if isinstance(mine, SlotAttention):
                for buf, src in ((mine.key, theirs.key), (mine.value, theirs.value)):
                    buf[n : n + g, :, self.start : pad] = 0
                    buf[n : n + g, :, pad : self.end] = src[index, :, source.start : source.end]
            elif isinstance(mine, MambaCache):
                mine.conv_state = torch.cat([mine.conv_state[:n], theirs.conv_state[index]])
                mine.ssm_state = torch.cat([mine.ssm_state[:n], theirs.ssm_state[index]])
        self.lengths += [source.lengths[r] for r in rows]
        self.num_rows += g

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its place."""
        last = self.num_rows - 1
        for layer in self.layers:
            if isinstance(layer, SlotAttention):
                if row != last:
                    layer.key[row, :, self.start : self.end] = layer.key[last, :, self.start : self.end]
                    layer.value[row, :, self.start : self.end] = layer.value[last, :, self.start : self.end]
            elif isinstance(layer, MambaCache):
                if row != last:
                    layer.conv_state[row] = layer.conv_state[last]
                    layer.ssm_state[row] = layer.ssm_state[last]
                layer.conv_state, layer.ssm_state = layer.conv_state[:last], layer.ssm_state[:last]
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        self.num_rows = last
        self.start = self.end - max(self.lengths, default=0)

    def keep_rows(self, rows: Seq[int]) -> None:
        """Keep only the given rows, in that order (e.g. to drop a cancelled prompt mid-prefill)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.layers:
            if isinstance(layer, SlotAttention):
                layer.key, layer.value = layer.key[index], layer.value[index]
            elif isinstance(layer, MambaCache):
                layer.conv_state, layer.ssm_state = layer.conv_state[index], layer.ssm_state[index]
        self.lengths = [self.lengths[r] for r in rows]
        self.num_rows = len(rows)

    def nbytes(self) -> int:
        """Bytes of state the rows need: live attention columns plus the Mamba2 states."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, SlotAttention):
                total += (
                    2 * self.num_rows * self.width * layer.key[0, :, 0].numel() * layer.key.element_size()
                )
            elif isinstance(layer, MambaCache):
                total += layer.conv_state[: self.num_rows].nbytes + layer.ssm_state[: self.num_rows].nbytes
        return total


class CacheManager:
    """Owns the running batch's state and which sequence sits in which row."""

    def __init__(
        self, config: TurboSConfig, max_rows: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.batch = BatchCache(config, 0, device, dtype, row_capacity=max_rows)
        self.seqs: list[Sequence] = []
        """Running sequences in row order: ``seqs[i]`` owns row i of ``batch``."""

    @property
    def num_rows(self) -> int:
        return len(self.seqs)

    def new_cache(self, num_rows: int, capacity: int) -> BatchCache:
        """A fresh cache for a group of prompts to prefill together, ``capacity`` columns wide."""
        return BatchCache(self.config, num_rows, self.device, self.dtype, capacity=capacity)

    def admit(self, source: BatchCache, rows: Seq[int], seqs: Seq[Sequence]) -> None:
        """Rows ``rows`` of ``source`` join the running batch for ``seqs`` (same order)."""
        self.batch.add_rows(source, rows)
        self.seqs.extend(seqs)

    def free(self, seq: Sequence) -> None:
        """Release the row of a sequence that left the batch."""
        row = self.seqs.index(seq)
        self.batch.remove_row(row)
        self.seqs[row] = self.seqs[-1]
        self.seqs.pop()

    def nbytes(self) -> int:
        return self.batch.nbytes()
