"""The text forms of a solution and the exact check of a model's final answer.

The canonical final-answer line is `Answer: <answer>`; everything that writes or reads it is here.
An answer line is a line that starts with `Answer:` (any case; after spaces, think tags or
markdown emphasis such as `**Answer:**`); the last such line of a text holds its final answer, and
`Answer:` anywhere else in a line ("my answer: wrong") is just text.
"""

from __future__ import annotations

import re

from turbos.data.tasks.problem import Problem

ANSWER_PREFIX = "Answer:"
ANSWER_LINE = re.compile(
    r"^[ \t]*(?:</?think>[ \t]*)*(?P<open>\*\*|__|\*|_)?answer[ \t]*(?P=open)?[ \t]*:(?P<value>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
"""A final-answer line (the one definition: ``extract_answer`` reads it, fusion strips it)."""
_EMPHASIS = "*_"
# A number: optional sign, digits (grouped by commas in threes, or not), optional decimals.
_NUMBER = re.compile(r"(?P<sign>[+-]?)(?P<whole>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<fraction>\d*))?")
_MINUS_SIGN = "\N{MINUS SIGN}"


def _canonical_number(text: str) -> str | None:
    """`text` as a canonical decimal (no grouping commas, leading or trailing zeros, `-0`, `+`),
    or None when it is not a number. Exact for any length: no int() or float() conversion."""
    match = _NUMBER.fullmatch(text.replace(_MINUS_SIGN, "-", 1))
    if match is None or not (match["whole"] or match["fraction"]):
        return None
    whole = match["whole"].replace(",", "").lstrip("0") or "0"
    fraction = (match["fraction"] or "").rstrip("0")
    digits = f"{whole}.{fraction}" if fraction else whole
    return digits if match["sign"] != "-" or digits == "0" else f"-{digits}"


def normalize_answer(answer: str) -> str:
    """Canonical form: surrounding whitespace, trailing periods, markdown emphasis and `$...$`
    dropped; numbers compare by value (`1,000` = `1000`, `2.50` = `2.5`, `1.0` = `1`, `−5` = `-5`)."""
    answer = answer.strip().rstrip(".").strip().strip(_EMPHASIS).strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    answer = answer.rstrip(".").strip()
    return _canonical_number(answer) or answer


def extract_answer(text: str) -> str | None:
    """The normalized answer on the last answer line of `text` (see ``ANSWER_LINE``), or None when
    there is none."""
    matches = [match["value"] for match in ANSWER_LINE.finditer(text)]
    if not matches:
        return None
    return normalize_answer(matches[-1]) or None


def verify(problem: Problem, text: str) -> bool:
    """Whether the final answer in `text` equals the problem's (numbers compare by value)."""
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
