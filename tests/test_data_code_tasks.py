"""The built-in code family: reproducible, split by specification, five levels, tests computed
from the reference solutions."""

from __future__ import annotations

import pytest

from turbos.data.tasks.code import LEVELS, generate_code_problems


def test_problems_are_reproducible_and_the_splits_share_no_specification() -> None:
    train = generate_code_problems(60, seed=1)
    assert train == generate_code_problems(60, seed=1)
    test = generate_code_problems(60, split="test", seed=1)
    assert not {p.uid for p in train} & {p.uid for p in test}
    assert {p.level for p in train} == set(LEVELS) and {p.level for p in test} == set(LEVELS)
    assert len({p.uid for p in train}) == len(train), "distinct problems"


def test_every_problem_names_its_function_and_its_reference_passes_its_hidden_tests() -> None:
    for problem in generate_code_problems(40, seed=0) + generate_code_problems(20, split="test"):
        assert f"`{problem.function}(" in problem.question
        assert problem.tests and problem.test_source().count("assert ") == len(problem.tests)
        namespace: dict = {}
        exec(problem.solution + problem.test_source(), namespace)  # our own reference code


def test_a_wrong_solution_fails_some_hidden_test() -> None:
    problem = next(p for p in generate_code_problems(10, levels=(3,)) if p.level == 3)
    wrong = f"def {problem.function}(values):\n    return 12345\n"
    with pytest.raises(AssertionError):
        exec(wrong + problem.test_source(), {})


def test_unknown_levels_and_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="no level 6"):
        generate_code_problems(3, levels=(6,))
    with pytest.raises(ValueError, match="unknown split"):
        generate_code_problems(3, split="dev")
