"""What the layers of one forward pass share (``LayerContext``), and the masks and positions of
padded and packed batches.

Packed sequences: a batch row may hold several documents back to back. ``seq_idx`` (b, T), an
integer tensor non-decreasing along each row (as mamba_ssm's ``seq_idx``), gives each token's
document. Attention sees only its own document, Mamba2's conv and state restart at each boundary,
and positions restart at 0 (``packed_position_ids``), so every document gets the outputs it gets
alone. ``seq_idx_from_lengths`` builds ``seq_idx`` from document lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from turbos.model.moe import MoEStats


@dataclass
class LayerContext:
    """Inputs every layer of a forward pass reads, and where MoE layers leave their router losses.

    Every mixer is called as ``mixer(x, ctx, cache)``. MoE layers record their loss and stats
    under their layer index, so a layer run twice in one pass (activation checkpointing
    recomputes it in backward) overwrites its entry rather than counting twice.
    """

    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """(cos, sin), each (b, T, head_dim); None in a layout without attention."""
    attn_mask: torch.Tensor | None = None
    """Bool (b, 1, T, past + T), True = attend, as ``build_attention_mask`` makes it; None for plain
    causal attention."""
    token_mask: torch.Tensor | None = None
    """(b, T), 1 on real tokens, 0 on padding; None without padding."""
    seq_idx: torch.Tensor | None = None
    """(b, T) long, the document of each new token; None for one document per row."""
    new_document: torch.Tensor | None = None
    """(b,) bool: rows whose first new token starts a document other than the one their cached
    state belongs to (Mamba2 drops that state); None when every row continues its cache."""
    ssd_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    """What Mamba2 layers run in place of ``turbos.kernels.ssd_scan`` over a whole sequence (same
    arguments and results), e.g. context parallelism's scan, which adds the state carried in from
    other ranks; None: ``ssd_scan``."""
    router_losses: bool = False
    """Whether MoE layers compute their load-balancing / z losses and routing stats."""
    router_loss: dict[int, torch.Tensor] = field(default_factory=dict)
    """Weighted router loss (a scalar) of each MoE layer, by layer index."""
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)
    """Routing stats of each MoE layer, by layer index."""

    def record_router(self, layer_idx: int, loss: torch.Tensor, stats: MoEStats) -> None:
        """Keep MoE layer ``layer_idx``'s router loss and stats (replacing a recomputation's)."""
        self.router_loss[layer_idx] = loss
        self.moe_stats[layer_idx] = stats

    def total_router_loss(self, device: torch.device) -> torch.Tensor:
        """The router losses summed in layer order, fp32 scalar (0 without any)."""
        total = torch.zeros((), dtype=torch.float32, device=device)
        for layer_idx in sorted(self.router_loss):
            total = total + self.router_loss[layer_idx]
        return total

    def stats_in_layer_order(self) -> list[MoEStats]:
        return [self.moe_stats[layer_idx] for layer_idx in sorted(self.moe_stats)]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    num_new: int,
    num_past: int,
    device: torch.device,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean (b, 1, T, past + T) mask for SDPA, or None when plain causal attention is exact.

    ``attention_mask`` (b, past + T) marks real tokens with 1 and padding with 0; ``seq_idx``
    (b, past + T) gives each token's document, and a query sees only keys of its own. Every query
    may see itself, so padded rows stay finite (their outputs are never used).
    """
    if attention_mask is None and seq_idx is None and (num_past == 0 or num_new == 1):
        return None
    total = num_past + num_new
    q_pos = torch.arange(num_past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, total)
    if seq_idx is not None:
        mask = mask & (seq_idx[:, num_past:, None] == seq_idx[:, None, :])[:, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    if attention_mask is not None or seq_idx is not None:
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


def packed_position_ids(seq_idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's position inside its document: 0, 1, ... from every document's first token.

    seq_idx (b, L) as in the module docstring; attention_mask (b, L), 0 on padding, which does
    not count (as for left padding). Returns (b, L) long; padding before a document's first real
    token gets 0.
    """
    real = torch.ones_like(seq_idx) if attention_mask is None else attention_mask.long()
    count = real.cumsum(-1)  # real tokens up to and including each one
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    # Real tokens before the current document began: count is non-decreasing, so a running max
    # over the values at document starts carries each start's value to its document's tokens.
    before = torch.where(starts, count - real, 0).cummax(-1).values
    return (count - before - 1).clamp(min=0)


def seq_idx_from_lengths(
    lengths: Sequence[Sequence[int]], width: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``seq_idx`` (b, width) long for rows of documents back to back: row r holds documents of
    ``lengths[r]`` tokens, numbered 0, 1, ...; the columns after them (right padding, to be masked
    by ``attention_mask``) count as the row's last document. ``width`` defaults to the longest row.
    """
    totals = [sum(row) for row in lengths]
    if not lengths or any(not row or min(row) < 1 for row in lengths):
        raise ValueError(f"every row needs at least one document, of >= 1 token each; got {lengths}")
    width = max(totals) if width is None else width
    if max(totals) > width:
        raise ValueError(f"a row of {max(totals)} tokens does not fit in width {width}")
    rows = []
    for row, total in zip(lengths, totals, strict=True):
        ids = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
        rows.append(torch.cat([ids, ids[-1:].expand(width - total)]))
    return torch.stack(rows).to(device)


def check_seq_idx(seq_idx: torch.Tensor) -> None:
    """Raise ValueError unless ``seq_idx`` (b, L) is an integer tensor non-decreasing along each row
    (one host synchronisation)."""
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError(
            "seq_idx must be non-decreasing along each row (documents back to back), also across "
            "calls that continue a cache"
        )
