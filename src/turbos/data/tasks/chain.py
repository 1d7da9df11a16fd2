"""Ordering people by height from shuffled pairwise facts ("Al>Bo" reads "Al is taller than Bo").

Level L gives L facts about L+1 people, shuffled, and asks who is tallest or shortest. Steps grow
the known chain one fact at a time ("Cy>Al>Bo"), then name the end asked for.
"""

from __future__ import annotations

import random

from turbos.data.tasks.problem import TaskFamily

NAMES = ("Al", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oz")


def chain_steps(facts: list[tuple[str, str]]) -> list[str]:
    """Merge the facts into one chain, tallest first, taking the first fact that extends it each time."""
    chain, remaining = list(facts[0]), facts[1:]
    steps = [">".join(chain)]
    while remaining:
        taller, shorter = next(f for f in remaining if f[1] == chain[0] or f[0] == chain[-1])
        remaining.remove((taller, shorter))
        chain = [taller, *chain] if shorter == chain[0] else [*chain, shorter]
        steps.append(">".join(chain))
    return steps


def draw_chain(level: int, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    people = rng.sample(NAMES, level + 1)  # tallest first
    facts = [(people[i], people[i + 1]) for i in range(level)]
    rng.shuffle(facts)
    end = rng.choice(("tallest", "shortest"))
    answer = people[0] if end == "tallest" else people[-1]
    question = f"{', '.join(f'{a}>{b}' for a, b in facts)}. Who is {end}?"
    return question, answer, (*chain_steps(facts), f"{end}: {answer}")


CHAIN = TaskFamily("chain", levels=(1, 2, 3, 4, 5), draw=draw_chain)
