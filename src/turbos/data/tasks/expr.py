"""Arithmetic expressions over small numbers with +, -, * and parentheses, reduced one operation at a time.

Level L has L operations on the numbers 1-9. Every intermediate value stays in [0, 100] and every
product has a single-digit factor, so each step is mental arithmetic. Steps reduce the leftmost
operation whose operands are both numbers (which respects precedence and parentheses) and show
the rewritten expression: "3+4=7: 7 * 2 - 5", the last one only the operation: "14-5=9".
"""

from __future__ import annotations

import operator
import random

from turbos.data.tasks.problem import TaskFamily

Node = int | tuple[str, "Node", "Node"]  # a number, or (operator, left, right)

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
MAX_VALUE = 100


def random_tree(n_ops: int, rng: random.Random) -> Node:
    """A uniformly shaped random expression tree with `n_ops` operations and leaves 1-9."""
    if n_ops == 0:
        return rng.randint(1, 9)
    n_left = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), random_tree(n_left, rng), random_tree(n_ops - 1 - n_left, rng))


def render(node: Node, parent_precedence: int = 0, is_right: bool = False) -> str:
    """Infix text with only the parentheses the tree needs (operators are left-associative)."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    precedence = PRECEDENCE[op]
    text = f"{render(left, precedence)} {op} {render(right, precedence, True)}"
    if precedence < parent_precedence or (is_right and precedence == parent_precedence):
        return f"({text})"
    return text


def value(node: Node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    return OPERATIONS[op](value(left), value(right))


def is_easy(node: Node) -> bool:
    """Every intermediate value in [0, MAX_VALUE] and every product with a single-digit factor."""
    if isinstance(node, int):
        return True
    op, left, right = node
    if not (is_easy(left) and is_easy(right) and 0 <= value(node) <= MAX_VALUE):
        return False
    return op != "*" or min(value(left), value(right)) <= 9


def reduce_leftmost(node: tuple[str, Node, Node]) -> tuple[Node, str]:
    """Evaluate the leftmost operation whose operands are numbers; return the new tree and "a+b=c"."""
    op, left, right = node
    if isinstance(left, int) and isinstance(right, int):
        result = OPERATIONS[op](left, right)
        return result, f"{left}{op}{right}={result}"
    if not isinstance(left, int):
        new_left, done = reduce_leftmost(left)
        return (op, new_left, right), done
    new_right, done = reduce_leftmost(right)
    return (op, left, new_right), done


def draw_expression(level: int, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    tree = random_tree(level, rng)
    while not is_easy(tree):
        tree = random_tree(level, rng)
    question, steps = f"Evaluate: {render(tree)}", []
    while not isinstance(tree, int):
        tree, done = reduce_leftmost(tree)
        steps.append(done if isinstance(tree, int) else f"{done}: {render(tree)}")
    return question, str(tree), tuple(steps)


EXPR = TaskFamily("expr", levels=(1, 2, 3, 4, 5), draw=draw_expression)
