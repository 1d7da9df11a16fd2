"""Reproducible problem sets, balanced over families x levels, with disjoint train and test splits."""

from __future__ import annotations

import random
from collections.abc import Sequence

from turbos.data.tasks.add import ADD
from turbos.data.tasks.chain import CHAIN
from turbos.data.tasks.equivalence import problem_split
from turbos.data.tasks.expr import EXPR
from turbos.data.tasks.problem import SPLITS, Problem, TaskFamily
from turbos.data.tasks.seq import SEQ

TASK_FAMILIES: dict[str, TaskFamily] = {family.name: family for family in (ADD, EXPR, SEQ, CHAIN)}

# Draws in a row that find no new problem of the split before a level counts as exhausted.
MAX_FRUITLESS_DRAWS = 10_000


class _LevelDraws:
    """Distinct problems of one (family, level) in one split, drawn from a stream seeded for it alone."""

    def __init__(self, family: TaskFamily, level: int, split: str, seed: int):
        self.family, self.level, self.split = family, level, split
        self.rng = random.Random(f"{seed}/{split}/{family.name}/{level}")
        self.found: dict[str, Problem] = {}
        self.exhausted = False

    def fill(self, count: int) -> None:
        """Draw until `count` problems are found or the level has no new ones left."""
        fruitless = 0
        while len(self.found) < count and not self.exhausted:
            problem = self.family.generate(self.level, self.rng)
            if problem_split(problem) == self.split and problem.question not in self.found:
                self.found[problem.question] = problem
                fruitless = 0
            else:
                fruitless += 1
                self.exhausted = fruitless > MAX_FRUITLESS_DRAWS


def _resolve(families: Sequence[str] | None, levels: Sequence[int] | None) -> list[tuple[TaskFamily, int]]:
    """The (family, level) pairs asked for, each once (a repeated family or level counts once)."""
    names = list(TASK_FAMILIES) if families is None else list(dict.fromkeys(families))
    pairs = []
    for name in names:
        if name not in TASK_FAMILIES:
            raise ValueError(f"unknown task family {name!r}; known: {sorted(TASK_FAMILIES)}")
        family = TASK_FAMILIES[name]
        for level in family.levels if levels is None else dict.fromkeys(levels):
            if level not in family.levels:
                raise ValueError(f"task family {name!r} has no level {level}; levels are {family.levels}")
            pairs.append((family, level))
    return pairs


def _share(total: int, cells: list[_LevelDraws]) -> dict[_LevelDraws, int]:
    return {cell: total // len(cells) + (i < total % len(cells)) for i, cell in enumerate(cells)}


def generate_problems(
    n: int,
    *,
    families: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    split: str = "train",
    seed: int = 0,
) -> list[Problem]:
    """`n` distinct problems of `split`, shuffled, spread evenly over every (family, level) pair.

    None means every family / each family's every level; a family or level named twice counts
    once. The same arguments always give the same list, and a problem belongs to the train or the
    test split forever, with every equivalent of it (`turbos.data.tasks.equivalence.problem_split`),
    so the two never overlap, not even in another surface form. A level with fewer distinct
    problems than its share (single-digit addition has 100 questions, 65 of them in train)
    gives all it has and the other levels make up the difference. Raises ValueError for an unknown
    family, level or split, and when all the levels together have fewer than `n` distinct problems.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    cells = [_LevelDraws(family, level, split, seed) for family, level in _resolve(families, levels)]
    wanted = _share(n, cells)
    while True:
        for cell in cells:
            cell.fill(wanted[cell])
        shortfall = n - sum(len(cell.found) for cell in cells)
        if shortfall == 0:
            break
        open_cells = [cell for cell in cells if not cell.exhausted]
        if not open_cells:
            raise ValueError(f"only {n - shortfall} distinct {split} problems exist here; asked for {n}")
        for cell, extra in _share(shortfall, open_cells).items():
            wanted[cell] = len(cell.found) + extra
    problems = [problem for cell in cells for problem in cell.found.values()]
    random.Random(f"{seed}/{split}").shuffle(problems)
    return problems
