"""How well ``auto`` chooses between answering directly and thinking, against the best possible choice.

Every evaluated problem has a direct answer (``no_think``) and a thinking answer (``think``) from the
same model; ``auto`` picks one of the two with its first token after ``<think>`` (``</think>``:
answer directly). A router that picks per problem, knowing which answers are right, can do no
better than the *oracle frontier*: start from the cheaper answer of every problem, then switch to
the dearer one, cheapest switch first, where only the dearer one is right. Each switch gains one
right answer, so this order gives the fewest tokens for every accuracy.

Comparing auto with the oracle (and with thresholds on the model's own probability of skipping)
tells whether a missed token target comes from what the model can answer or from when it thinks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from turbos.data.tokenizer import END_THINK_TOKEN
from turbos.serve.chat_template import prepare_chat

# Tokens auto generates beyond the primed modes: "<think></think>" before a direct answer (no_think
# primes both), "<think>" before thinking (think primes it).
AUTO_DIRECT_EXTRA, AUTO_THINK_EXTRA = 2, 1


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


def oracle_frontier(choices: Sequence[Choice]) -> list[tuple[float, float]]:
    """(accuracy, mean tokens) of the cheapest per-problem choices at each reachable accuracy."""
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


def routing_summary(choices: Sequence[Choice], max_drop: float = 0.03) -> dict[str, Any]:
    """Outcome counts; think mode's accuracy and mean tokens; the fusion rule applied perfectly
    (think exactly where the direct answer is wrong); thinking from each level up
    (``level_rules``); the oracle frontier and its fewest tokens within ``max_drop`` of always
    thinking. Token ratios are shares of think mode's."""
    n = max(len(choices), 1)
    think_accuracy = sum(c.think_correct for c in choices) / n
    think_tokens = max(sum(c.think_tokens for c in choices) / n, 1e-9)
    accuracy, tokens = routed(choices, [not c.direct_correct for c in choices])
    frontier = oracle_frontier(choices)
    oracle = fewest_tokens(frontier, think_accuracy - max_drop)
    return {
        "counts": outcome_counts(choices),
        "think_accuracy": think_accuracy,
        "think_tokens": think_tokens,
        "fusion_rule": {"accuracy": accuracy, "token_ratio": tokens / think_tokens},
        "level_rules": level_rules(choices, think_tokens),
        "oracle_frontier": frontier,
        "oracle_token_ratio": None if oracle is None else oracle / think_tokens,
        "max_drop": max_drop,
    }


def routing_report(rows: Iterable[dict[str, Any]], max_drop: float = 0.03) -> list[str]:
    """Markdown lines of ``routing_summary`` for evaluation rows (``Answer.row()``)."""
    summary = routing_summary(paired(rows), max_drop)
    counts, fusion, oracle = summary["counts"], summary["fusion_rule"], summary["oracle_token_ratio"]
    reach = "out of reach" if oracle is None else f"{oracle * 100:.0f}% of think's tokens"
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
        f"- best per-problem choice within {max_drop * 100:.0f} points of think: {reach}.",
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
