"""The text forms of a solution and the exact check of a model's final answer.

The canonical final-answer line is `Answer: <answer>`; everything that writes or reads it is here.
"""

from __future__ import annotations

import re

from turbos.data.tasks.problem import Problem

ANSWER_PREFIX = "Answer:"
_ANSWER_LINE = re.compile(r"\banswer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?\d+")


def normalize_answer(answer: str) -> str:
    """Canonical form: surrounding whitespace and trailing periods dropped, integers as `str(int)`."""
    answer = answer.strip().rstrip(".").strip()
    return str(int(answer)) if _INTEGER.fullmatch(answer) else answer


def extract_answer(text: str) -> str | None:
    """The normalized answer on the last `Answer:` line of `text`, or None when there is none."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    return normalize_answer(matches[-1]) or None


def verify(problem: Problem, text: str) -> bool:
    """Whether the final answer in `text` equals the problem's (integers compare by value)."""
    return extract_answer(text) == normalize_answer(problem.answer)


def render_short(problem: Problem) -> str:
    """The direct answer with no derivation."""
    return f"{ANSWER_PREFIX} {problem.answer}"


def render_steps(problem: Problem) -> str:
    """The step-by-step derivation, one step a line, then the answer line."""
    return "\n".join((*problem.steps, render_short(problem)))


def render_document(problem: Problem) -> str:
    """Question, derivation and answer as one pre-training document."""
    return f"Question: {problem.question}\n{render_steps(problem)}"
