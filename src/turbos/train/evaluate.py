"""Next-token loss on packed rows, precision rules, and validation loss / perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbos.config import ConfigError
from turbos.model import TurboSForCausalLM
from turbos.model.moe import MoEStats


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless precision is 'fp32'; on CPU only when precision is 'bf16'.

    Weights, gradients and optimizer state stay fp32 (mixed precision); the Mamba2 scan and the
    router run in fp32 whatever the autocast dtype.
    """
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class RowLoss:
    loss: torch.Tensor
    """lm_loss + aux_loss: what is back-propagated."""
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list[MoEStats]


def row_loss(model: TurboSForCausalLM, rows: torch.Tensor) -> RowLoss:
    """Loss of rows (batch, seq_len + 1): inputs rows[:, :-1], targets rows[:, 1:]."""
    out = model(rows[:, :-1], router_losses=True)
    lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), rows[:, 1:].flatten())
    return RowLoss(lm_loss + out.aux_loss, lm_loss, out.aux_loss, out.moe_stats)


@torch.no_grad()
def evaluate_loss(
    model: TurboSForCausalLM,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean next-token cross-entropy over all target tokens of the batches (eval mode: no capacity
    limit, no recycling); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for rows in batches:
            rows = rows.to(device)
            with autocast_context(precision, device):
                loss = row_loss(model, rows).lm_loss
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
