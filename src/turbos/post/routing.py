"""When to think: a problem's direct and thinking answers side by side (`turbos eval`, the demo report).

Every evaluated problem has a direct answer (``no_think``) and a thinking answer (``think``) from the
same model; ``auto`` picks one of the two with its first token after ``<think>`` (``</think>``:
answer directly), so any router of those two answers can be scored exactly from them
(``routed``). The summary counts which modes get each problem right and scores the fusion rule
(report §3.2.1) applied perfectly: think exactly where the direct answer is wrong, the routing the
fused training data teaches. Finer analyses of a finished run (the best possible router, routers
held to thinking rates, thresholds on the model's skip probability) are in
``benchmarks/routing.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    family: str = ""

    def routed(self, think: bool) -> tuple[bool, int]:
        """(correct, tokens) of auto taking this branch."""
        if think:
            return self.think_correct, self.think_tokens + AUTO_THINK_EXTRA
        return self.direct_correct, self.direct_tokens + AUTO_DIRECT_EXTRA


def paired(rows: Iterable[dict[str, Any]]) -> list[Choice]:
    """Choices from evaluation rows (``uid``, ``level``, ``question``, ``mode``, ``correct``,
    ``tokens`` and, if known, ``family``, as in the demo's ``eval/answers.jsonl``); every problem
    needs both modes."""
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
                str(think.get("family", "")),
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


def routing_summary(choices: Sequence[Choice]) -> dict[str, Any]:
    """Outcome counts; think mode's accuracy and mean tokens; and the fusion rule applied
    perfectly (think exactly where the direct answer is wrong), its tokens as a share of think
    mode's."""
    n = max(len(choices), 1)
    think_tokens = max(sum(c.think_tokens for c in choices) / n, 1e-9)
    accuracy, tokens = routed(choices, [not c.direct_correct for c in choices])
    return {
        "counts": outcome_counts(choices),
        "think_accuracy": sum(c.think_correct for c in choices) / n,
        "think_tokens": think_tokens,
        "fusion_rule": {"accuracy": accuracy, "token_ratio": tokens / think_tokens},
    }


def routing_report(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Markdown lines of ``routing_summary`` for evaluation rows (``Answer.row()``)."""
    summary = routing_summary(paired(rows))
    counts, fusion = summary["counts"], summary["fusion_rule"]
    return [
        "When to think (`turbos.post.routing`; `python benchmarks/routing.py --run <demo folder>` adds",
        "the best possible routers and the model's own skip probability, and plots them):",
        "",
        f"- right in both modes {counts['both']}, only directly {counts['direct_only']}, only with "
        f"thinking {counts['think_only']}, in neither {counts['neither']};",
        f"- thinking exactly where the direct answer is wrong: {fusion['accuracy'] * 100:.1f}% at "
        f"{fusion['token_ratio'] * 100:.0f}% of think's tokens (think: "
        f"{summary['think_accuracy'] * 100:.1f}%).",
        "",
    ]
