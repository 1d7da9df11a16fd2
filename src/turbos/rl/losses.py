"""The terms of the GRPO objective (report §3.5), as pure functions of per-token tensors.

Every function takes flat per-token tensors of one batch (the policy's log-probabilities
``logp``, the sampling policy's ``old_logp``, the reference model's ``ref_logp``, each token's
advantage) and returns per-token values; ``grpo_loss`` sums them over the batch's trained tokens
and divides by their number (token-level loss: every token of the batch weighs alike, whatever
the length of its response, as in DAPO), so a long response is not diluted into one average.

The objective, per token t of response i with advantage A_i and ratio r = exp(logp - old_logp):

    loss_t = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i)     policy gradient
           + kl_coef * clip(exp(d) - d - 1, 0, kl_max),  d = ref_logp - logp   K3 KL to the reference
           + nll_coef * [A_i > 0] * (-logp)                              best-of-N likelihood
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with separate low and high clip ranges.

    Returns (loss, clipped): ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` and where the
    clipped branch is taken with a ratio outside the range (its gradient is zero there)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    unclipped, clipped = ratio * advantages, clipped_ratio * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kl_max: float = 10.0) -> torch.Tensor:
    """Schulman's K3 estimate of KL(policy || reference) per token, ``exp(d) - d - 1`` with
    ``d = ref_logp - logp``, clipped to [0, kl_max] (the report's [0, 10]): non-negative and
    unbiased for samples of the policy; the clip bounds its gradient on tokens the reference
    finds very unlikely."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1).clamp(0, kl_max)


def positive_nll(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The best-of-N likelihood term per token: ``-logp`` on responses with a positive advantage
    (the better ones of their group), 0 elsewhere."""
    return torch.where(advantages > 0, -logp, torch.zeros_like(logp))


@dataclass(frozen=True)
class GRPOLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.001
    kl_max: float = 10.0
    nll_coef: float = 0.05


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    config: GRPOLossConfig,
    num_tokens: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-level GRPO loss and its parts (each a batch mean over tokens, detached).

    All inputs are flat (n,) tensors over the trained tokens; ``advantages`` holds each token's
    response advantage. ``num_tokens``: the divisor, the trained tokens of the whole optimizer
    step when it spans several micro-batches (default n). ``ref_logp`` None: no KL term."""
    n = num_tokens if num_tokens is not None else logp.numel()
    pg, clipped = clipped_policy_loss(logp, old_logp, advantages, config.eps_low, config.eps_high)
    total = pg
    parts = {"pg_loss": pg.detach().sum() / n, "clip_fraction": clipped.double().sum() / n}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp, config.kl_max)
        total = total + config.kl_coef * kl
        parts["kl"] = kl.detach().sum() / n
    if config.nll_coef:
        nll = positive_nll(logp, advantages)
        total = total + config.nll_coef * nll
        parts["nll_loss"] = nll.detach().sum() / n
    return total.sum() / n, parts
