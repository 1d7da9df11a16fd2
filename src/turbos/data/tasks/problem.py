"""The `Problem` record, the `TaskFamily` that draws problems, and the stable train/test assignment."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of each family's question space that belongs to the test split

# A family's drawing function: (level, rng) -> (question, answer, steps).
Draw = Callable[[int, random.Random], tuple[str, str, tuple[str, ...]]]


@dataclass(frozen=True)
class Problem:
    """One reasoning problem with its canonical answer and a step-by-step derivation of it."""

    family: str
    level: int
    question: str
    answer: str
    steps: tuple[str, ...]
    uid: str


def _digest(question: str) -> bytes:
    return hashlib.sha256(question.encode("utf-8")).digest()


def split_of(text: str) -> str:
    """The split ("train" or "test") of a text, fixed forever by its hash; problems are split by
    their equivalence key (`turbos.data.tasks.equivalence.problem_split`)."""
    bucket = int.from_bytes(_digest(text)[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


@dataclass(frozen=True)
class TaskFamily:
    """A family of problems (e.g. multi-digit addition) with difficulty levels."""

    name: str
    levels: tuple[int, ...]
    draw: Draw

    def generate(self, level: int, rng: random.Random) -> Problem:
        """Draw one problem of `level` using `rng` (whatever its split)."""
        if level not in self.levels:
            raise ValueError(f"task family {self.name!r} has no level {level}; levels are {self.levels}")
        question, answer, steps = self.draw(level, rng)
        uid = f"{self.name}-{level}-{_digest(question).hex()[:12]}"
        return Problem(self.name, level, question, answer, steps, uid)
