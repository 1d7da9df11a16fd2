"""Built-in reasoning tasks with difficulty levels and exact verifiers.

Families (`TASK_FAMILIES`): `add` (column addition), `expr` (arithmetic expressions), `seq`
(next term of a sequence) and `chain` (ordering by height), each with levels 1-5. Easy levels
can be answered directly; hard levels need the step-by-step derivation every problem carries.
"""

from turbos.data.tasks.answers import (
    extract_answer,
    normalize_answer,
    render_document,
    render_short,
    render_steps,
    verify,
)
from turbos.data.tasks.generate import TASK_FAMILIES, generate_problems
from turbos.data.tasks.problem import SPLITS, Problem, TaskFamily, split_of

__all__ = [
    "SPLITS",
    "TASK_FAMILIES",
    "Problem",
    "TaskFamily",
    "extract_answer",
    "generate_problems",
    "normalize_answer",
    "render_document",
    "render_short",
    "render_steps",
    "split_of",
    "verify",
]
