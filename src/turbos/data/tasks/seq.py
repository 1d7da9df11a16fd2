"""Next term of a number sequence, found from its table of differences (or ratios).

Levels: 1 arithmetic (small, increasing); 2 arithmetic (larger, may decrease); 3 geometric (ratio
2-4, tried after the differences turn out not constant); 4 quadratic (constant second
differences); 5 cubic (constant third differences). Steps list each row of differences, then
add back up the table: "next difference: 8 + 2 = 10", "next term: 30 + 10 = 40".
"""

from __future__ import annotations

import random
from itertools import pairwise

from turbos.data.tasks.problem import TaskFamily

ORDER_NAMES = ("", "second ", "third ")


def _plus(a: int, b: int) -> str:
    return f"{a} + {b}" if b >= 0 else f"{a} - {-b}"


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values))


def _differences(values: list[int]) -> list[int]:
    return [b - a for a, b in pairwise(values)]


def polynomial_terms(table_start: list[int], n_terms: int) -> list[int]:
    """Terms of the sequence whose difference table begins with `table_start`: the first term, the
    first difference, the first second difference, ..., and last the constant top difference."""
    row, terms = list(table_start), []
    for _ in range(n_terms):
        terms.append(row[0])
        row = [a + b for a, b in pairwise(row)] + [row[-1]]
    return terms


def difference_steps(terms: list[int]) -> list[str]:
    """Rows of differences until one is constant, then the sums back up the table to the next term."""
    rows, steps = [terms], []
    while len(set(rows[-1])) > 1:
        rows.append(_differences(rows[-1]))
        steps.append(f"{ORDER_NAMES[len(rows) - 2]}differences: {_listed(rows[-1])}")
    increment = rows[-1][-1]
    for depth in range(len(rows) - 2, -1, -1):
        last = rows[depth][-1]
        name = f"next {ORDER_NAMES[depth - 1]}difference" if depth else "next term"
        steps.append(f"{name}: {_plus(last, increment)} = {last + increment}")
        increment += last
    return steps


def geometric_steps(terms: list[int]) -> list[str]:
    """Differences (not constant), then the constant ratio, then the next term."""
    ratio = terms[1] // terms[0]
    return [
        f"differences: {_listed(_differences(terms))}",
        f"ratios: {_listed([ratio] * (len(terms) - 1))}",
        f"next term: {terms[-1]} * {ratio} = {terms[-1] * ratio}",
    ]


def _draw_terms(level: int, rng: random.Random) -> list[int]:
    """Shown terms plus the next one (last), all non-negative."""
    while True:
        if level == 1:
            terms = polynomial_terms([rng.randint(1, 20), rng.randint(1, 9)], 5)
        elif level == 2:
            terms = polynomial_terms([rng.randint(10, 99), rng.choice([-1, 1]) * rng.randint(1, 15)], 6)
        elif level == 3:
            start, ratio = rng.randint(1, 40), rng.randint(2, 4)
            terms = [start * ratio**i for i in range(5)]
        elif level == 4:
            terms = polynomial_terms([rng.randint(1, 20), rng.randint(-5, 9), rng.randint(1, 5)], 6)
        else:
            table = [rng.randint(1, 20), rng.randint(-3, 9), rng.randint(-3, 5), rng.randint(1, 3)]
            terms = polynomial_terms(table, 7)
        if min(terms) >= 0:
            return terms


def draw_sequence(level: int, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    terms = _draw_terms(level, rng)
    shown, answer = terms[:-1], terms[-1]
    steps = geometric_steps(shown) if level == 3 else difference_steps(shown)
    return f"What comes next: {_listed(shown)}?", str(answer), tuple(steps)


SEQ = TaskFamily("seq", levels=(1, 2, 3, 4, 5), draw=draw_sequence)
