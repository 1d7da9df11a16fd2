"""Reasoning tasks: reproducible, split-disjoint problem sets with genuine derivations and exact verifiers."""

import random
import statistics
from collections import Counter

import pytest

from turbos.data.tasks import (
    TASK_FAMILIES,
    Problem,
    extract_answer,
    generate_problems,
    normalize_answer,
    render_document,
    render_short,
    render_steps,
    verify,
)
from turbos.data.tasks.equivalence import problem_split
from turbos.data.tasks.expr import render


@pytest.fixture(scope="module")
def problems():
    return generate_problems(1000, seed=0)


def test_every_family_has_levels_one_to_five():
    assert set(TASK_FAMILIES) >= {"add", "expr", "seq", "chain"}
    assert all(family.levels == (1, 2, 3, 4, 5) for family in TASK_FAMILIES.values())


def test_same_seed_gives_the_same_problems():
    assert generate_problems(100, seed=7) == generate_problems(100, seed=7)
    assert generate_problems(100, seed=7) != generate_problems(100, seed=8)


def test_problems_are_balanced_over_families_and_levels(problems):
    counts = Counter((p.family, p.level) for p in problems)
    assert len(counts) == 20 and set(counts.values()) == {50}


def test_problems_are_distinct_within_a_split(problems):
    assert len({p.question for p in problems}) == len(problems)
    assert len({p.uid for p in problems}) == len(problems)


def test_train_and_test_never_overlap_not_even_in_another_form():
    train = generate_problems(2000, split="train", seed=1)
    test = generate_problems(500, split="test", seed=2)
    assert not {p.question for p in train} & {p.question for p in test}
    assert {problem_split(p) for p in train} == {"train"} and {problem_split(p) for p in test} == {"test"}
    # a sum is on one side of the split in every form: commuted, and asked as an expression
    for a in range(10):
        for b in range(10):
            forms = [
                Problem("add", 1, f"What is {a} + {b}?", "", (), "x"),
                Problem("add", 1, f"What is {b} + {a}?", "", (), "x"),
                Problem("expr", 1, f"Evaluate: {b} + {a}", "", (), "x"),
            ]
            assert len({problem_split(p) for p in forms}) == 1, (a, b)


def test_a_level_with_too_few_problems_gives_all_it_has_and_others_make_up():
    problems = generate_problems(400, families=["add"], levels=[1, 2])
    counts = Counter(p.level for p in problems)
    assert len(problems) == 400 and counts[1] < 100, "single-digit addition has only 100 questions"


def test_a_family_or_level_named_twice_counts_once():
    once = generate_problems(40, families=["add", "expr"], levels=[2, 3], seed=4)
    assert generate_problems(40, families=["add", "expr", "add"], levels=[2, 3, 2], seed=4) == once
    assert len({p.question for p in generate_problems(60, families=["add", "add"], levels=[1, 1])}) == 60


def test_asking_for_more_problems_than_exist_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(200, families=["add"], levels=[1])


@pytest.mark.parametrize(
    "kwargs",
    [{"families": ["nope"]}, {"levels": [6]}, {"levels": [0]}, {"split": "validation"}],
)
def test_unknown_family_level_or_split_is_rejected(kwargs):
    with pytest.raises(ValueError):
        generate_problems(10, **kwargs)


def test_every_problem_verifies_with_its_steps_and_its_short_answer(problems):
    for p in problems:
        assert verify(p, render_steps(p)), render_steps(p)
        assert verify(p, render_short(p)), render_short(p)


def test_wrong_answers_fail(problems):
    for p in problems:
        wrong = str(int(p.answer) + 1) if p.answer.isdigit() else p.answer + "x"
        assert not verify(p, f"Answer: {wrong}")
        assert not verify(p, render_steps(p).replace("Answer:", "Result:"))


def test_hard_levels_have_more_steps_than_easy_ones(problems):
    for name in TASK_FAMILIES:
        by_level = [[p for p in problems if (p.family, p.level) == (name, level)] for level in range(1, 6)]
        means = [statistics.mean(len(p.steps) for p in level) for level in by_level]
        assert means == sorted(means) and means[-1] >= means[0] + 3, f"{name}: mean steps {means}"


def test_texts_fit_a_small_context(problems):
    for p in problems:
        assert len(p.question) <= 64, p.question
        assert max(len(step) for step in p.steps) <= 40, p.steps
        assert len(render_steps(p)) <= 400


def test_renderings_have_the_documented_shape(problems):
    p = problems[0]
    assert render_short(p) == f"Answer: {p.answer}"
    assert render_steps(p) == "\n".join(p.steps) + f"\nAnswer: {p.answer}"
    assert render_document(p) == f"Question: {p.question}\n{render_steps(p)}"


def test_addition_steps_carry_digit_by_digit():
    p = TASK_FAMILIES["add"].generate(3, random.Random(0))
    a, b = (int(x) for x in p.question.removeprefix("What is ").removesuffix("?").split(" + "))
    assert int(p.answer) == a + b
    assert p.steps[-1].endswith(p.answer), "the digits written so far end as the answer"
    assert len(p.steps) in (3, 4), "one step per column, plus one for a final carry"


def test_expression_steps_each_reduce_one_operation_keeping_the_value():
    rng = random.Random(0)
    for _ in range(50):
        p = TASK_FAMILIES["expr"].generate(5, rng)
        expressions = [p.question.removeprefix("Evaluate: ")] + [s.split(": ")[1] for s in p.steps[:-1]]
        assert all(eval(e) == int(p.answer) for e in expressions), p.steps  # our own digits and + - * only
        assert [e.count(" ") // 2 for e in expressions] == [5, 4, 3, 2, 1], "one operation fewer each step"


def test_expression_rendering_keeps_only_needed_parentheses():
    assert render(("-", ("+", 1, 2), 3)) == "1 + 2 - 3"
    assert render(("-", 1, ("+", 2, 3))) == "1 - (2 + 3)"
    assert render(("*", ("+", 1, 2), 3)) == "(1 + 2) * 3"
    assert render(("+", 1, ("*", 2, 3))) == "1 + 2 * 3"


def test_chain_steps_end_with_everyone_in_order():
    p = TASK_FAMILIES["chain"].generate(5, random.Random(0))
    chain = p.steps[-2].split(">")
    assert len(chain) == 6 and p.answer in (chain[0], chain[-1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42", "42"),
        ("  answer :   42.  ", "42"),
        ("Answer: +042", "42"),
        ("Answer: -0", "0"),
        ("Answer: -17", "-17"),
        ("Answer: 1\nsome more thought\nAnswer: 2", "2"),
        ("steps...\n</think>Answer: Bo", "Bo"),
        ("Answer: Bo.", "Bo"),
        ("the answer is 42", None),
        ("Answer:   ", None),
        ("", None),
        # An answer line starts with "Answer:"; the last one wins; "answer:" inside a line is text.
        ("answer: 7\n(my answer: wrong)", "7"),
        ("Answer: x\nI hope this answer: helps", "x"),
        ("my final answer: 7", None),
        ("<think></think>Answer: 3", "3"),
        # Markdown emphasis and $...$ around the label or the value.
        ("**Answer:** 42", "42"),
        ("**Answer**: 42", "42"),
        ("**Answer: 42**", "42"),
        ("Answer: **42**.", "42"),
        ("Answer: $42$", "42"),
        ("Answer: $$-3$$", "-3"),
        # Numbers by value.
        ("Answer: 1,000", "1000"),
        ("Answer: 1,000,000.50", "1000000.5"),
        ("Answer: 2.50", "2.5"),
        ("Answer: 1.0", "1"),
        ("Answer: .5", "0.5"),
        ("Answer: \N{MINUS SIGN}5", "-5"),
        ("Answer: -0.0", "0"),
        ("Answer: 1,00", "1,00"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_compare_by_value_whatever_their_length():
    def problem(answer):
        return Problem("user", 0, "q", normalize_answer(answer), (), "1")

    assert verify(problem("1,000"), "Answer: 1000") and verify(problem("-5"), "Answer: \N{MINUS SIGN}5")
    huge = "7" * 5000  # int() refuses strings over 4300 digits
    assert verify(problem(huge), f"Answer: {huge}") and not verify(problem(huge), f"Answer: {huge}7")
    assert not verify(problem("12345678901234567890123456789012"), "Answer: 12345678901234567890123456789013")


def test_equivalent_questions_share_a_key_and_different_ones_do_not():
    from turbos.data.tasks.equivalence import equivalence_key

    def problem(family: str, question: str) -> Problem:
        return Problem(family, 1, question, "", (), "x")

    same = [
        problem("add", "What is 5 + 1?"),
        problem("add", "What is 1 + 5?"),
        problem("expr", "Evaluate: 1 + 5"),
        problem("expr", "Evaluate: 5 + 1"),
    ]
    assert len({equivalence_key(p) for p in same}) == 1
    assert equivalence_key(problem("expr", "Evaluate: 2 * (3 + 4)")) == equivalence_key(
        problem("expr", "Evaluate: (4 + 3) * 2")
    )
    assert equivalence_key(problem("expr", "Evaluate: 5 - 1")) != equivalence_key(
        problem("expr", "Evaluate: 1 - 5")
    ), "subtraction does not commute"
    assert equivalence_key(problem("chain", "Al>Bo, Bo>Cy. Who is tallest?")) == equivalence_key(
        problem("chain", "Bo>Cy, Al>Bo. Who is tallest?")
    )
    assert equivalence_key(problem("chain", "Al>Bo, Bo>Cy. Who is tallest?")) != equivalence_key(
        problem("chain", "Al>Bo, Bo>Cy. Who is shortest?")
    )
    seq = problem("seq", "What comes next: 1, 2, 3?")
    assert equivalence_key(seq) == ("seq", seq.question)
