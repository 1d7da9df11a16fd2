"""HybridCache: what decoding carries between steps, for a batch.

Attention layers keep their keys and values (grows with the sequence, only a few layers have it);
Mamba2 layers keep a conv window and an SSM state of fixed size (report §5: the state stays in
fp32 whatever the model dtype; bf16 state caused repetitive long generations).

After a packed prefill (several documents per row, ``seq_idx``) the cache holds, per row, the
Mamba2 state of the row's last document and the keys and values of all its tokens with their
documents (``HybridCache.seq_idx``); later calls continue that last document by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbos.config import TurboSConfig


@dataclass
class AttentionCache:
    """Keys and values seen so far: (batch, kv_heads, tokens, head_dim), or None before the first call."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None:
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value


@dataclass
class MambaCache:
    """conv_state: the last (kernel - 1) conv inputs, (batch, kernel - 1, conv_dim); ssm_state:
    (batch, heads, head_dim, state_size). Both fp32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    @classmethod
    def zeros(
        cls, config: TurboSConfig, batch_size: int, device: torch.device | str | None = None
    ) -> MambaCache:
        """The state before any token: zeros, fp32."""
        conv = torch.zeros(batch_size, config.mamba_conv_kernel - 1, config.mamba_conv_dim, device=device)
        ssm = torch.zeros(
            batch_size,
            config.mamba_num_heads,
            config.mamba_head_dim,
            config.mamba_state_size,
            device=device,
        )
        return cls(conv, ssm)


class HybridCache:
    """Per-layer decoding state for a batch; ``layers[i]`` is None for feed-forward layers."""

    seq_idx: torch.Tensor | None
    """(batch, tokens) long: the document of every token fed so far, once a call was packed
    (``seq_idx`` given); None while every row is one document."""

    def __init__(
        self, config: TurboSConfig, batch_size: int, device: torch.device | str | None = None
    ) -> None:
        self.config = config
        self.batch_size = batch_size
        self.seen_tokens = 0
        self.seq_idx = None
        self.layers: list[AttentionCache | MambaCache | None] = []
        for kind in config.layer_types:
            if kind == "A":
                self.layers.append(AttentionCache())
            elif kind == "M":
                self.layers.append(MambaCache.zeros(config, batch_size, device))
            else:
                self.layers.append(None)

    def get_seq_length(self) -> int:
        """Tokens (including padding) already fed through the model."""
        return self.seen_tokens

    def nbytes(self) -> int:
        """Memory held by the cache, in bytes."""
        total = 0 if self.seq_idx is None else self.seq_idx.nbytes
        for layer in self.layers:
            if isinstance(layer, AttentionCache) and layer.key is not None:
                total += layer.key.nbytes + layer.value.nbytes
            elif isinstance(layer, MambaCache):
                total += layer.conv_state.nbytes + layer.ssm_state.nbytes
        return total

    def index_select(self, rows: torch.Tensor) -> HybridCache:
        """A new cache holding only the given batch rows (e.g. to drop finished sequences)."""
        out = HybridCache.__new__(HybridCache)
        out.config, out.batch_size, out.seen_tokens = self.config, len(rows), self.seen_tokens
        out.seq_idx = None if self.seq_idx is None else self.seq_idx[rows]
        out.layers = []
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                out.layers.append(
                    AttentionCache(
                        None if layer.key is None else layer.key[rows],
                        None if layer.value is None else layer.value[rows],
                    )
                )
            elif isinstance(layer, MambaCache):
                out.layers.append(MambaCache(layer.conv_state[rows], layer.ssm_state[rows]))
            else:
                out.layers.append(None)
        return out
