"""When two built-in questions are the same problem in another surface form, and so which split
a problem belongs to.

"What is 5 + 1?" and "What is 1 + 5?" are one problem, and "Evaluate: 5 + 3" is the same sum as
the addition question "What is 5 + 3?". `equivalence_key` gives such questions one key: sums and
products with their operands sorted (in additions and in expressions alike, so the two families
share keys), and height facts as a set. Other questions are their own key. `problem_split` hashes
the key, so a problem and every equivalent of it are on the same side of the train/test split.
(Hashing the question text, as the split did before, held out "5 + 1" while training on "1 + 5":
`benchmarks/leakage.py` measures that on a demo run.)
"""

from __future__ import annotations

import ast
import re

from turbos.data.tasks.problem import Problem, split_of

_ADD = re.compile(r"What is (\d+) \+ (\d+)\?")
_CHAIN = re.compile(r"(.+)\. Who is (tallest|shortest)\?")
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _expression_key(node: ast.expr) -> str:
    """The expression with the operands of + and * sorted, fully parenthesized."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if not isinstance(node, ast.BinOp) or type(node.op) not in _OPERATORS:
        raise ValueError(f"not a built-in expression: {ast.unparse(node)!r}")
    op = _OPERATORS[type(node.op)]
    left, right = _expression_key(node.left), _expression_key(node.right)
    if op in "+*":
        left, right = sorted((left, right))
    return f"({left}{op}{right})"


def equivalence_key(problem: Problem) -> tuple[str, ...]:
    """One key for every surface form of the same problem (see the module docstring)."""
    if problem.family == "add" and (match := _ADD.fullmatch(problem.question)):
        return ("arithmetic", _expression_key(ast.parse(f"{match[1]} + {match[2]}", mode="eval").body))
    if problem.family == "expr" and problem.question.startswith("Evaluate: "):
        expression = problem.question.removeprefix("Evaluate: ")
        return ("arithmetic", _expression_key(ast.parse(expression, mode="eval").body))
    if problem.family == "chain" and (match := _CHAIN.fullmatch(problem.question)):
        return ("chain", *sorted(match[1].split(", ")), match[2])
    return (problem.family, problem.question)


def problem_split(problem: Problem) -> str:
    """The split ("train" or "test") of a problem and of every equivalent of it, fixed forever."""
    return split_of("\x1f".join(equivalence_key(problem)))
