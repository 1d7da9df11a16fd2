"""How well ``auto`` chooses between answering directly and thinking, against the best possible choice.

Every evaluated problem has a direct answer (``no_think``) and a thinking answer (``think``) from the
same model; ``auto`` picks one of the two with its first token after ``<think>`` (``</think>``:
answer directly). A router that picks per problem, knowing which answers are right, can do no
better than the *oracle frontier*: start from the cheaper answer of every problem, then switch to
the dearer one, cheapest switch first, where only the dearer one is right. Each switch gains one
right answer, so this order gives the fewest tokens for every accuracy.

The oracle can also be held to thinking rates per level (``think_bounds``, e.g. the issue's "think
on >= 80% of the hardest problems and <= 20% of the easiest"); then an exact dynamic program over
(right answers, thinking answers) per level replaces the greedy order.

Comparing auto with the oracle (and with thresholds on the model's own probability of skipping)
tells whether a missed token target comes from what the model can answer or from when it thinks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from turbos.data.tokenizer import END_THINK_TOKEN
from turbos.serve.chat_template import prepare_chat

# Tokens auto generates beyond the primed modes: "<think></think>" before a direct answer (no_think
# primes both), "<think>" before thinking (think primes it).
AUTO_DIRECT_EXTRA, AUTO_THINK_EXTRA = 2, 1

ThinkBounds = Mapping[int, tuple[float, float]]
"""level -> (least, most) share of its problems on which a router thinks."""


@dataclass(frozen=True)
class Choice:
    """One problem's two answers: direct (no_think) and thinking (think)."""

    uid: str
    level: int
    question: str
    direct_correct: bool
    direct_tokens: int
    think_correct: bool
    think_tokens: int

    def routed(self, think: bool) -> tuple[bool, int]:
        """(correct, tokens) of auto taking this branch."""
        if think:
            return self.think_correct, self.think_tokens + AUTO_THINK_EXTRA
        return self.direct_correct, self.direct_tokens + AUTO_DIRECT_EXTRA


def paired(rows: Iterable[dict[str, Any]]) -> list[Choice]:
    """Choices from evaluation rows (``uid``, ``level``, ``question``, ``mode``, ``correct``,
    ``tokens``, as in the demo's ``eval/answers.jsonl``); every problem needs both modes."""
    by_uid: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_uid.setdefault(row["uid"], {})[row["mode"]] = row
    choices = []
    for uid, modes in by_uid.items():
        missing = {"no_think", "think"} - set(modes)
        if missing:
            raise ValueError(f"problem {uid} has no {' or '.join(sorted(missing))} answer")
        direct, think = modes["no_think"], modes["think"]
        choices.append(
            Choice(
                uid,
                int(think["level"]),
                think["question"],
                bool(direct["correct"]),
                int(direct["tokens"]),
                bool(think["correct"]),
                int(think["tokens"]),
            )
        )
    return choices


# (direct answer right, thinking answer right) -> outcome name
OUTCOMES = {
    (True, True): "both",
    (True, False): "direct_only",
    (False, True): "think_only",
    (False, False): "neither",
}


def outcome_counts(choices: Sequence[Choice]) -> dict[str, int]:
    """How many problems each mode gets right: both, only direct, only thinking, neither."""
    counts = dict.fromkeys(OUTCOMES.values(), 0)
    for c in choices:
        counts[OUTCOMES[c.direct_correct, c.think_correct]] += 1
    return counts


def routed(choices: Sequence[Choice], think: Sequence[bool]) -> tuple[float, float]:
    """(accuracy, mean tokens) of auto thinking exactly where ``think`` is true."""
    if len(think) != len(choices):
        raise ValueError(f"{len(think)} decisions for {len(choices)} problems")
    results = [c.routed(t) for c, t in zip(choices, think, strict=True)]
    n = max(len(results), 1)
    return sum(ok for ok, _ in results) / n, sum(tokens for _, tokens in results) / n


def oracle_frontier(
    choices: Sequence[Choice], think_bounds: ThinkBounds | None = None
) -> list[tuple[float, float]]:
    """(accuracy, mean tokens) of the cheapest per-problem choices at each reachable accuracy;
    with ``think_bounds``, only among routings that think on those shares of those levels."""
    if think_bounds:
        return _bounded_frontier(choices, think_bounds)
    n = max(len(choices), 1)
    correct = tokens = 0
    switches = []
    for c in choices:
        options = sorted((tokens, ok) for ok, tokens in (c.routed(False), c.routed(True)))
        (cheap_tokens, cheap_ok), (dear_tokens, dear_ok) = options
        correct += cheap_ok
        tokens += cheap_tokens
        if dear_ok and not cheap_ok:
            switches.append(dear_tokens - cheap_tokens)
    frontier = [(correct / n, tokens / n)]
    for extra in sorted(switches):
        correct, tokens = correct + 1, tokens + extra
        frontier.append((correct / n, tokens / n))
    return frontier


def _level_costs(choices: Sequence[Choice], least: float, most: float) -> list[float]:
    """Fewest tokens for exactly k right answers (index k) on these problems, thinking on a share
    in [least, most] of them; inf where impossible."""
    n = len(choices)
    # cost[k, t]: fewest tokens with k right answers and t thinking answers so far
    cost = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    cost[0, 0] = 0.0
    for c in choices:
        step = torch.full_like(cost, math.inf)
        for think in (False, True):
            ok, tokens = c.routed(think)
            shifted = torch.full_like(cost, math.inf)
            shifted[int(ok) :, int(think) :] = cost[: n + 1 - ok, : n + 1 - think] + tokens
            step = torch.minimum(step, shifted)
        cost = step
    low, high = math.ceil(least * n - 1e-9), math.floor(most * n + 1e-9)
    if low > high:
        return [math.inf] * (n + 1)
    return cost[:, low : high + 1].amin(dim=1).tolist()


def _bounded_frontier(choices: Sequence[Choice], think_bounds: ThinkBounds) -> list[tuple[float, float]]:
    by_level: dict[int, list[Choice]] = {}
    for c in choices:
        by_level.setdefault(c.level, []).append(c)
    unknown = set(think_bounds) - set(by_level)
    if unknown:
        raise ValueError(f"think_bounds name levels with no problems: {sorted(unknown)}")
    total = [0.0]  # fewest tokens for exactly k right answers over the levels so far
    for level, group in by_level.items():
        costs = _level_costs(group, *think_bounds.get(level, (0.0, 1.0)))
        merged = [math.inf] * (len(total) + len(costs) - 1)
        for k, base in enumerate(total):
            for j, extra in enumerate(costs):
                merged[k + j] = min(merged[k + j], base + extra)
        total = merged
    n = max(len(choices), 1)
    frontier, best = [], math.inf
    for k in reversed(range(len(total))):  # at least k right: the cheapest from k up
        if total[k] < best:
            best = total[k]
            frontier.append((k / n, best / n))
    return frontier[::-1]


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


def routing_summary(
    choices: Sequence[Choice], max_drop: float = 0.03, think_bounds: ThinkBounds | None = None
) -> dict[str, Any]:
    """Outcome counts; think mode's accuracy and mean tokens; the fusion rule applied perfectly
    (think exactly where the direct answer is wrong); thinking from each level up
    (``level_rules``); the oracle frontier and its fewest tokens within ``max_drop`` of always
    thinking, also when held to ``think_bounds``. Token ratios are shares of think mode's."""
    n = max(len(choices), 1)
    think_accuracy = sum(c.think_correct for c in choices) / n
    think_tokens = max(sum(c.think_tokens for c in choices) / n, 1e-9)
    accuracy, tokens = routed(choices, [not c.direct_correct for c in choices])

    def ratio(frontier: list[tuple[float, float]]) -> float | None:
        fewest = fewest_tokens(frontier, think_accuracy - max_drop)
        return None if fewest is None else fewest / think_tokens

    frontier = oracle_frontier(choices)
    summary = {
        "counts": outcome_counts(choices),
        "think_accuracy": think_accuracy,
        "think_tokens": think_tokens,
        "fusion_rule": {"accuracy": accuracy, "token_ratio": tokens / think_tokens},
        "level_rules": level_rules(choices, think_tokens),
        "oracle_frontier": frontier,
        "oracle_token_ratio": ratio(frontier),
        "max_drop": max_drop,
    }
    if think_bounds:
        bounded = oracle_frontier(choices, think_bounds)
        summary["think_bounds"] = {str(level): list(b) for level, b in think_bounds.items()}
        summary["bounded_oracle_frontier"] = bounded
        summary["bounded_oracle_token_ratio"] = ratio(bounded)
    return summary


def _reach(ratio: float | None) -> str:
    return "out of reach" if ratio is None else f"{ratio * 100:.0f}% of think's tokens"


def routing_report(
    rows: Iterable[dict[str, Any]], max_drop: float = 0.03, think_bounds: ThinkBounds | None = None
) -> list[str]:
    """Markdown lines of ``routing_summary`` for evaluation rows (``Answer.row()``)."""
    summary = routing_summary(paired(rows), max_drop, think_bounds)
    counts, fusion = summary["counts"], summary["fusion_rule"]
    bounded = (
        [f"- the same, {describe_bounds(think_bounds)}: {_reach(summary['bounded_oracle_token_ratio'])}."]
        if think_bounds
        else []
    )
    return [
        "When to think (`turbos.post.routing`; `python benchmarks/routing.py --run <demo folder>` adds",
        "the model's own skip probability as a router and plots it):",
        "",
        f"- right in both modes {counts['both']}, only directly {counts['direct_only']}, only with "
        f"thinking {counts['think_only']}, in neither {counts['neither']};",
        f"- thinking exactly where the direct answer is wrong: {fusion['accuracy'] * 100:.1f}% at "
        f"{fusion['token_ratio'] * 100:.0f}% of think's tokens;",
        *[
            f"- thinking on level {r['from_level']} and up only: {r['accuracy'] * 100:.1f}% at "
            f"{r['token_ratio'] * 100:.0f}% of think's tokens;"
            for r in summary["level_rules"][1:]
        ],
        f"- best per-problem choice within {max_drop * 100:.0f} points of think: "
        f"{_reach(summary['oracle_token_ratio'])}{';' if bounded else '.'}",
        *bounded,
        "",
    ]


@torch.no_grad()
def skip_probabilities(model, tokenizer, questions: Sequence[str]) -> tuple[list[float], list[bool]]:
    """Per question, auto's probability of closing the think block at once, and whether that is
    its greedy choice (the most likely first token after ``<think>`` is ``</think>``)."""
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
