"""Routing analyses of a finished run, for `routing.py` and `sft_seeds.py`: the best possible routers.

A router picks, per problem, the direct answer or the thinking answer (``turbos.post.routing``). One
that knows which answers are right can do no better than the *oracle frontier*: the fewest tokens
at each accuracy, found exactly per level by how many problems of each outcome think
(``_level_costs``). The oracle can also be held to thinking rates per level (``think_bounds``,
e.g. the demo's target "think on >= 80% of the hardest problems and <= 20% of the easiest").

Comparing auto with the oracle (and with thresholds on the model's own probability of skipping)
tells whether a missed token target comes from what the model can answer or from when it thinks.
The *informed* frontier (``informed_frontier``) sits between the two: the best router that knows
where the direct answer fails, as fusion's labels say, but not where thinking does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from turbos.data.tokenizer import END_THINK_TOKEN
from turbos.post.demo import EASIEST_THINK_RATE, HARDEST_THINK_RATE
from turbos.post.routing import OUTCOMES, Choice, routed, routing_summary
from turbos.serve.chat_template import prepare_chat

ThinkBounds = Mapping[int, tuple[float, float]]
"""level -> (least, most) share of its problems on which a router thinks."""


def target_think_bounds(levels: Iterable[int]) -> dict[int, tuple[float, float]]:
    """The demo's thinking-rate target as routing bounds: think on at least 80% of the hardest
    level and at most 20% of the easiest (none with fewer than two levels)."""
    levels = sorted(set(levels))
    if len(levels) < 2:
        return {}
    return {levels[-1]: (HARDEST_THINK_RATE, 1.0), levels[0]: (0.0, EASIEST_THINK_RATE)}


def _check_bound_levels(choices: Sequence[Choice], think_bounds: ThinkBounds) -> None:
    unknown = set(think_bounds) - {c.level for c in choices}
    if unknown:
        raise ValueError(f"think_bounds name levels with no problems: {sorted(unknown)}")


def oracle_frontier(
    choices: Sequence[Choice], think_bounds: ThinkBounds | None = None
) -> list[tuple[float, float]]:
    """(accuracy, mean tokens) of the cheapest per-problem choices at each reachable accuracy,
    ascending; with ``think_bounds``, only among routings that think on those shares of those
    levels."""
    think_bounds = think_bounds or {}
    by_level: dict[int, list[Choice]] = {}
    for c in choices:
        by_level.setdefault(c.level, []).append(c)
    _check_bound_levels(choices, think_bounds)
    total = torch.zeros(1, dtype=torch.float64)  # fewest tokens for exactly k right answers so far
    for level, group in by_level.items():
        costs = _level_costs(group, *think_bounds.get(level, (0.0, 1.0)))
        k, j = torch.arange(len(total)).unsqueeze(1), torch.arange(len(costs)).unsqueeze(0)
        merged = torch.full((len(total) + len(costs) - 1,), math.inf, dtype=torch.float64)
        pairs = (total.unsqueeze(1) + costs.unsqueeze(0)).reshape(-1)
        total = merged.scatter_reduce_(0, (k + j).reshape(-1), pairs, reduce="amin")
    n = max(len(choices), 1)
    frontier, best = [], math.inf
    for k, tokens in reversed(list(enumerate(total.tolist()))):  # at least k right: cheapest from k up
        if tokens < best:
            best = tokens
            frontier.append((k / n, best / n))
    return frontier[::-1]


def _level_costs(choices: Sequence[Choice], least: float, most: float) -> torch.Tensor:
    """Fewest tokens for exactly k right answers (index k) on these problems, thinking on a share
    in [least, most] of them; inf where impossible.

    Only how many problems of each outcome think matters for k and for the count of thinking
    answers, and within an outcome the cheapest switches to thinking go first. So a routing is
    b switched "direct only" problems (each loses a right answer), c switched "think only" ones
    (each gains one) and m switched of the rest (no change), and for given b and c the best m is
    the count of switches that save tokens, clamped to what the bounds allow: O(n^2) in all.
    """
    n = len(choices)
    low, high = _count_bounds(n, least, most)
    costs = torch.full((n + 1,), math.inf, dtype=torch.float64)
    if low > high:
        return costs

    def prefix(deltas: list[int]) -> torch.Tensor:  # cost of switching the m cheapest, m = 0..len
        return torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.tensor(sorted(deltas), dtype=torch.float64).cumsum(0)]
        )

    deltas: dict[str, list[int]] = {"direct_only": [], "think_only": [], "rest": []}
    base_tokens = base_right = 0
    for c in choices:
        direct_ok, direct_tokens = c.routed(False)
        think_ok, think_tokens = c.routed(True)
        base_tokens, base_right = base_tokens + direct_tokens, base_right + direct_ok
        outcome = OUTCOMES[direct_ok, think_ok]
        deltas[outcome if outcome in ("direct_only", "think_only") else "rest"].append(
            think_tokens - direct_tokens
        )
    lose, gain, rest = (prefix(deltas[k]) for k in ("direct_only", "think_only", "rest"))
    b = torch.arange(len(lose)).unsqueeze(1)
    c = torch.arange(len(gain)).unsqueeze(0)
    m_low = (low - b - c).clamp(min=0)
    m_high = (high - b - c).clamp(max=len(rest) - 1)
    saving = sum(d < 0 for d in deltas["rest"])
    m = torch.maximum(torch.minimum(torch.full_like(m_low, saving), m_high), m_low).clamp(max=len(rest) - 1)
    total = base_tokens + lose[b] + gain[c] + rest[m]
    total = torch.where(m_low <= m_high, total, torch.full_like(total, math.inf))
    right = (base_right - b + c).expand_as(total)
    return costs.scatter_reduce_(0, right.reshape(-1), total.reshape(-1), reduce="amin")


def _count_bounds(n: int, least: float, most: float) -> tuple[int, int]:
    """The fewest and most of n problems a router may think on, for shares [least, most]."""
    return math.ceil(least * n - 1e-9), math.floor(most * n + 1e-9)


def informed_frontier(
    choices: Sequence[Choice], think_bounds: ThinkBounds | None = None
) -> list[tuple[float, float]]:
    """Vertices (accuracy, mean tokens), ascending, of the best routings that know each problem's
    kind (family and level) and whether its direct answer is right, but not whether thinking is:
    what fusion's labels tell the adaptive model (a wrong short answer becomes a long example).

    Such a router can only think on a share of each (kind, direct answer right) group, whose
    problems it cannot tell apart, so each problem it thinks on adds the group's mean change in
    right answers and tokens. That makes the best routing a linear program; for a price ``lam``
    on tokens, thinking on the groups of highest ``gain - lam * cost`` first (while positive, and
    as many as a level's ``think_bounds`` require) solves it exactly, and prices between the ones
    where that order changes give every vertex of its concave frontier. Between two vertices the
    frontier is linear (thinking on part of a group); ``best_accuracy`` reads it.
    """
    think_bounds = think_bounds or {}
    _check_bound_levels(choices, think_bounds)
    groups: dict[tuple[str, int, bool], list[tuple[int, int]]] = {}  # (right, tokens) gained by thinking
    base_right = base_tokens = 0
    for c in choices:
        (direct_ok, direct_tokens), (think_ok, think_tokens) = c.routed(False), c.routed(True)
        base_right, base_tokens = base_right + direct_ok, base_tokens + direct_tokens
        groups.setdefault((c.family, c.level, c.direct_correct), []).append(
            (think_ok - direct_ok, think_tokens - direct_tokens)
        )
    keys = list(groups)
    size = {k: len(g) for k, g in groups.items()}
    gain = {k: sum(right for right, _ in g) / len(g) for k, g in groups.items()}
    cost = {k: sum(tokens for _, tokens in g) / len(g) for k, g in groups.items()}
    by_level: dict[int, list[tuple[str, int, bool]]] = {}
    for k in keys:
        by_level.setdefault(k[1], []).append(k)
    limits = {}
    for level, level_keys in by_level.items():
        limits[level] = _count_bounds(sum(size[k] for k in level_keys), *think_bounds.get(level, (0.0, 1.0)))
        if limits[level][0] > limits[level][1]:
            return []

    def solve(lam: float) -> tuple[float, float]:
        right, tokens = base_right, base_tokens
        for level, level_keys in by_level.items():
            low, high = limits[level]
            taken = 0
            for k in sorted(level_keys, key=lambda k: (lam * cost[k] - gain[k], cost[k])):  # best first
                value = gain[k] - lam * cost[k]
                take = min(size[k], high - taken) if value > 0 else min(size[k], max(low - taken, 0))
                taken += take
                right, tokens = right + take * gain[k], tokens + take * cost[k]
        return right, tokens

    critical = {gain[k] / cost[k] for k in keys if cost[k]}
    for level_keys in by_level.values():
        for a, b in itertools.combinations(level_keys, 2):
            if cost[a] != cost[b]:
                critical.add((gain[a] - gain[b]) / (cost[a] - cost[b]))
    prices = sorted(lam for lam in critical if 0 < lam < math.inf)
    samples = (
        [prices[0] / 2, *((a + b) / 2 for a, b in itertools.pairwise(prices)), prices[-1] * 2]
        if prices
        else [1.0]
    )
    n = max(len(choices), 1)
    frontier: list[tuple[float, float]] = []
    for right, tokens in sorted((solve(lam) for lam in samples), key=lambda p: (p[1], -p[0])):
        if not frontier or right / n > frontier[-1][0] + 1e-12:
            frontier.append((right / n, tokens / n))
    return frontier


def best_accuracy(frontier: Sequence[tuple[float, float]], tokens: float) -> float | None:
    """Accuracy of a piecewise-linear frontier (``informed_frontier``) at this many mean tokens
    (None: fewer than its cheapest vertex)."""
    if not frontier or tokens < frontier[0][1] - 1e-12:
        return None
    for (a0, t0), (a1, t1) in itertools.pairwise(frontier):
        if tokens <= t1:
            return a0 + (a1 - a0) * (tokens - t0) / (t1 - t0)
    return frontier[-1][0]


def fewest_tokens(frontier: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """Mean tokens of the first frontier point with at least ``accuracy`` (None: out of reach)."""
    return next((tokens for acc, tokens in frontier if acc >= accuracy - 1e-12), None)


def level_rules(choices: Sequence[Choice], think_tokens: float) -> list[dict[str, float]]:
    """(accuracy, token ratio) of thinking exactly on the problems of level >= k, for each level
    k: the routing a pure difficulty rule gives, and how many tokens the hard levels alone cost."""
    rules = []
    for k in sorted({c.level for c in choices}):
        accuracy, tokens = routed(choices, [c.level >= k for c in choices])
        rules.append({"from_level": k, "accuracy": accuracy, "token_ratio": tokens / think_tokens})
    return rules


def describe_bounds(think_bounds: ThinkBounds) -> str:
    """E.g. "thinking on 80-100% of level 4 and 0-20% of level 1"."""
    parts = [f"{lo * 100:.0f}-{hi * 100:.0f}% of level {level}" for level, (lo, hi) in think_bounds.items()]
    return "thinking on " + " and ".join(parts)


def frontier_summary(
    choices: Sequence[Choice],
    max_drop: float = 0.03,
    think_bounds: ThinkBounds | None = None,
    max_token_ratio: float = 0.6,
) -> dict[str, Any]:
    """``routing_summary`` plus thinking from each level up (``level_rules``); the oracle frontier
    and its fewest tokens within ``max_drop`` of always thinking, also when held to
    ``think_bounds``; the informed frontier (held to ``think_bounds``) and its best accuracy at
    ``max_token_ratio`` of think's tokens. Token ratios are shares of think mode's."""
    summary = routing_summary(choices)
    think_accuracy, think_tokens = summary["think_accuracy"], summary["think_tokens"]

    def ratio(frontier: list[tuple[float, float]]) -> float | None:
        fewest = fewest_tokens(frontier, think_accuracy - max_drop)
        return None if fewest is None else fewest / think_tokens

    frontier = oracle_frontier(choices)
    informed = informed_frontier(choices, think_bounds)
    summary.update(
        level_rules=level_rules(choices, think_tokens),
        oracle_frontier=frontier,
        oracle_token_ratio=ratio(frontier),
        max_drop=max_drop,
        informed_frontier=informed,
        max_token_ratio=max_token_ratio,
        informed_accuracy=best_accuracy(informed, max_token_ratio * think_tokens),
    )
    if think_bounds:
        bounded = oracle_frontier(choices, think_bounds)
        summary["think_bounds"] = {str(level): list(b) for level, b in think_bounds.items()}
        summary["bounded_oracle_frontier"] = bounded
        summary["bounded_oracle_token_ratio"] = ratio(bounded)
    return summary


@torch.no_grad()
def skip_probabilities(model, tokenizer, questions: Sequence[str]) -> tuple[list[float], list[bool]]:
    """Per question, auto's probability of closing the think block at once, and whether that is
    its greedy choice (the most likely first token after ``<think>`` is ``</think>``). The think
    mode's prompt is auto's prompt followed by ``<think>``."""
    end_think = tokenizer.token_to_id(END_THINK_TOKEN)
    device = next(model.parameters()).device
    probabilities, skips = [], []
    for question in questions:
        prompt = prepare_chat([{"role": "user", "content": question}], "think").text
        ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
        logits = model(ids).logits[0, -1].float()
        probabilities.append(torch.softmax(logits, -1)[end_think].item())
        skips.append(int(logits.argmax()) == end_think)
    return probabilities, skips
