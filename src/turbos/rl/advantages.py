"""Group-relative advantages and the sample filters of the report's GRPO (§3.5).

- ``group_advantages``: GRPO's reward normalised inside each group of G responses to one prompt,
  with the report's *group reward adjustment*: shaped rewards (bonuses for the right reasoning
  depth, for shorter reasoning) must not give a correct answer a negative advantage or a wrong one
  a positive advantage, so the baseline is kept between the two.
- ``unstable_prompts``: the prompt-filtering pre-pass keeps prompts the starting policy solves
  sometimes, dropping those it always or never solves (they teach nothing).
- ``informative_groups``: dynamic sampling drops groups whose advantages are all zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ADVANTAGE_EPS = 1e-6
BAND = 0.25
"""The adjusted baseline stays at least this share of the gap away from the worst good reward and
the best bad one."""


def group_advantages(
    rewards: torch.Tensor, good: torch.Tensor | None = None, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """Advantages of one group: ``(r - b) / (std(r) + eps)``.

    The baseline ``b`` is the group mean (GRPO), moved when ``good`` (which responses are correct)
    is given and the group holds both kinds: into the band between the best bad reward ``lo`` and
    the worst good reward ``hi``, at least ``BAND * (hi - lo)`` from each end, so every good
    response gets a positive advantage and every bad one a negative advantage. A group whose
    rewards are all equal has zero advantages (std 0). rewards (G,) float; good (G,) bool."""
    rewards = rewards.double()
    std = rewards.std(unbiased=False)
    if std <= 0:
        return torch.zeros_like(rewards)
    baseline = rewards.mean()
    if good is not None and good.any() and (~good).any():
        lo, hi = rewards[~good].max(), rewards[good].min()
        if hi > lo:
            margin = BAND * (hi - lo)
            baseline = baseline.clamp(lo + margin, hi - margin)
    return (rewards - baseline) / (std + eps)


def unstable_prompts(solved: Sequence[int], samples: int) -> list[bool]:
    """Which prompts the filtering pre-pass keeps: solved by some but not all of ``samples``."""
    return [0 < s < samples for s in solved]


def informative_groups(advantages: Sequence[torch.Tensor]) -> list[bool]:
    """Dynamic sampling: which groups carry a learning signal (any non-zero advantage)."""
    return [bool((a != 0).any()) for a in advantages]
