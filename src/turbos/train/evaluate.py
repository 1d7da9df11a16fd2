"""Next-token loss on packed rows, precision rules, and validation loss / perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbos.data.packing import eos_seq_idx
from turbos.device import autocast_context
from turbos.distributed.context_parallel import sequence_piece
from turbos.model import TurboSForCausalLM
from turbos.model.moe import MoEStats


@dataclass
class RowLoss:
    loss: torch.Tensor
    """lm_loss + aux_loss: what is back-propagated."""
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list[MoEStats]


def row_loss(
    model: TurboSForCausalLM,
    rows: torch.Tensor,
    eos_id: int | None = None,
    shard: tuple[int, int] | None = None,
) -> RowLoss:
    """Loss of rows (batch, seq_len + 1): inputs rows[:, :-1], targets rows[:, 1:]. With ``eos_id``
    each document of a row sees only itself (``turbos.data.packing.eos_seq_idx``). ``shard``
    (index, count): only that equal piece of the sequence, for a context-parallel model
    (``turbos.distributed.context_parallel``); its loss is the mean over the piece's tokens, so
    the pieces' losses average to the whole rows' loss."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if shard is not None:
        piece = sequence_piece(inputs.shape[1], *shard)
        inputs, targets = inputs[:, piece], targets[:, piece]
    seq_idx = None if eos_id is None else eos_seq_idx(inputs, eos_id)
    out = model(inputs, router_losses=True, seq_idx=seq_idx)
    lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    return RowLoss(lm_loss + out.aux_loss, lm_loss, out.aux_loss, out.moe_stats)


@torch.no_grad()
def evaluate_loss(
    model: TurboSForCausalLM,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    precision: str = "fp32",
    eos_id: int | None = None,
    shard: tuple[int, int] | None = None,
) -> float:
    """Mean next-token cross-entropy over all target tokens of the batches (eval mode: no capacity
    limit, no recycling), documents apart with ``eos_id``, on one ``shard`` of the sequences
    (``row_loss``); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for rows in batches:
            rows = rows.to(device)
            with autocast_context(precision, device):
                loss = row_loss(model, rows, eos_id, shard).lm_loss
            targets = rows[:, 1:].numel()
            total += loss.item() * targets
            count += targets
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches to evaluate")
    return total / count


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a huge number rather than overflowing."""
    return math.exp(min(loss, 700.0))
