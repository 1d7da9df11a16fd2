"""When two built-in questions are the same problem in another surface form.

The train/test split (`split_of`) hashes a question's text, so "What is 5 + 1?" can be held out
while "What is 1 + 5?" is trained on, and "Evaluate: 5 + 3" is the same sum as the addition
question "What is 5 + 3?". `equivalence_key` gives such questions one key: sums and products with
their operands sorted (in additions and in expressions alike, so the two families share keys),
and height facts as a set. Other questions are their own key. `benchmarks/leakage.py` measures
how many held-out problems have an equivalent in the training data.
"""

from __future__ import annotations

import ast
import re

from turbos.data.tasks.problem import Problem

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
