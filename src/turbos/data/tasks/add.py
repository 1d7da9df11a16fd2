"""Multi-digit addition solved column by column, carrying from the ones digit up.

Level L adds two L-digit numbers (level 1: two single digits, 0-9). A step reads
"8+9+1=18, write 8 carry 1: 878": the column's digits plus the incoming carry, the digit written,
the outgoing carry, and the digits written so far.
"""

from __future__ import annotations

import random

from turbos.data.tasks.problem import TaskFamily


def addition_steps(a: int, b: int) -> tuple[str, ...]:
    """Column addition of two non-negative integers, one step per column (plus a final carry)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, written, carry = [], "", 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        written = str(total % 10) + written
        steps.append(f"{x}+{y}+{carry}={total}, write {total % 10} carry {total // 10}: {written}")
        carry = total // 10
    if carry:
        steps.append(f"carry {carry}: {carry}{written}")
    return tuple(steps)


def draw_addition(level: int, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    low = 0 if level == 1 else 10 ** (level - 1)
    a, b = rng.randint(low, 10**level - 1), rng.randint(low, 10**level - 1)
    return f"What is {a} + {b}?", str(a + b), addition_steps(a, b)


ADD = TaskFamily("add", levels=(1, 2, 3, 4, 5), draw=draw_addition)
