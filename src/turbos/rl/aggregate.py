"""Reward aggregation (report §3.4): which scorer a sample gets, penalties, weighted fusion.

Each piece builds a reward function of TRL's signature ``reward(prompts, completions, **meta)``
from others, so a recipe's reward can be routed per domain and fused:

- ``route(rules, default)``: per-domain rules, each sample scored by the function its
  ``meta["family"]`` names (``{"code": code_reward}``), the others by ``default``; each function
  is called once with its own samples;
- ``fuse([(fn, weight), ...])``: the weighted sum of several scores;
- ``with_repetition_penalty(fn, coef, n)``: the score minus ``coef`` times the reply's repeated
  ``n``-gram rate (``repetition_rate``), the report's penalty on repetitive generations.

Group-level normalisation is the advantage rule of ``turbos.rl.advantages``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from turbos.rl.rewards import RewardFn, call_reward


def _subset(meta: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    return {k: [v[i] for i in rows] if isinstance(v, list | tuple) else v for k, v in meta.items()}


def route(rules: Mapping[str, RewardFn], default: RewardFn) -> RewardFn:
    """Score each sample with the rule of its ``meta["family"]`` (``default`` for the rest)."""

    def reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        families = meta.get("family") or [None] * len(completions)
        groups: dict[str | None, list[int]] = {}
        for i, family in enumerate(families):
            groups.setdefault(family if family in rules else None, []).append(i)
        out = [0.0] * len(completions)
        for family, rows in groups.items():
            fn = rules[family] if family is not None else default
            scores = call_reward(
                fn, [prompts[i] for i in rows], [completions[i] for i in rows], **_subset(meta, rows)
            )
            for i, score in zip(rows, scores, strict=True):
                out[i] = score
        return out

    return reward


def fuse(parts: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """The weighted sum of several reward functions' scores."""
    if not parts:
        raise ValueError("fuse needs at least one (reward function, weight) pair")

    def reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        total = [0.0] * len(completions)
        for fn, weight in parts:
            for i, score in enumerate(call_reward(fn, prompts, completions, **meta)):
                total[i] += weight * score
        return total

    return reward


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of the whitespace-separated word ``n``-grams of ``text`` that repeat an earlier one
    (0 for a text with fewer than ``n`` + 1 words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def with_repetition_penalty(fn: RewardFn, coef: float, n: int = 4) -> RewardFn:
    """``fn``'s score minus ``coef`` times the reply's ``repetition_rate`` (the whole reply,
    reasoning included)."""
    if coef < 0:
        raise ValueError(f"the repetition penalty must be >= 0, got {coef}")

    def reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        scores = call_reward(fn, prompts, completions, **meta)
        return [s - coef * repetition_rate(c, n) for s, c in zip(scores, completions, strict=True)]

    return reward
