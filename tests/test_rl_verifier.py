"""The answer-consistency verifier: equivalent answers match, different ones do not, junk never
raises; final-answer extraction; the ``verified`` reward."""

from __future__ import annotations

import random

import pytest

from turbos.rl.rewards import BUILTIN_REWARDS, load_reward, verified_reward
from turbos.rl.verifier import MAX_CHARS, answers_match, final_answer

MATCHES = [
    # presentation
    ("  42 ", "42"),
    ("42.", "42"),
    ("**42**", "42"),
    ("$42$", "42"),
    ("\\(42\\)", "42"),
    ("\\[42\\]", "42"),
    ("\\boxed{42}", "42"),
    ("$\\boxed{\\text{Paris}}$.", "paris"),
    ("New  York", "new york"),
    ("x = 5", "5"),
    ("`7`", "7"),
    # numbers by value
    ("2.50", "2.5"),
    ("1.0", "1"),
    (".5", "0.5"),
    ("-0", "0"),
    ("−5", "-5"),
    ("+5", "5"),
    ("minus 5", "-5"),
    ("1,000", "1000"),
    ("1 000", "1000"),
    ("1\u2009000", "1000"),
    ("1\u202f000 000", "1000000"),
    ("1\\,000", "1000"),
    ("1{,}000", "1000"),
    ("1,234,567.5", "1234567.5"),
    ("1e3", "1000"),
    ("1.5E-3", "0.0015"),
    ("1.5 \\times 10^3", "1500"),
    ("2 \\cdot 10^{-2}", "0.02"),
    ("10^{3}", "1,000"),
    # fractions, decimals, percentages
    ("\\frac{3}{4}", "0.75"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\tfrac12", "0.5"),
    ("2/4", "1/2"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-1/2"),
    ("1/2", "50%"),
    ("0.5", "50\\%"),
    ("12.5 percent", "1/8"),
    ("50%", "50"),
    # units
    ("12 cm", "12"),
    ("12cm", "12"),
    ("$5", "5"),
    ("5 dollars", "5"),
    ("$5", "5 dollars"),
    ("$5.00", "5"),
    ("10 centimeters", "10 cm"),
    ("5 m/s", "5 meters per second"),
    ("5\\text{ kg}", "5 kilograms"),
    ("90^\\circ", "90 degrees"),
    ("90°", "90"),
    ("3 apples", "3 apple"),
    # collections, in order
    ("(1, 2)", "1, 2"),
    ("[1, 2, 3]", "\\left( 1,2,3 \\right)"),
    ("{5}", "5"),
    ("1,000, 2,000", "1000; 2000"),
    ("(1, 2), (3, 4)", "[(1,2), (3,4)]"),
]

NON_MATCHES = [
    ("0.333", "1/3"),
    ("0.3333333333", "\\frac{1}{3}"),
    ("1,00", "100"),  # not grouped in threes: the list 1, 0 (no decimal commas)
    ("1,00", "1"),
    ("[1,000]", "1000"),  # inside brackets a comma separates items
    ("10 cm", "10 m"),
    ("12 cm", "0.12 m"),  # no conversion
    ("5 apples", "5 pears"),
    ("$5", "5 euros"),
    ("50%", "50 cm"),
    ("50%", "0.05"),
    ("-5", "5"),
    ("5x", "5"),  # a lone unknown letter is not a unit
    ("5 or 6", "5"),
    ("2", "3"),
    ("1e3", "100"),
    ("1/0", "0"),
    ("Paris", "London"),
    ("(1, 2)", "(2, 1)"),
    ("{1, 2}", "{1, 2, 3}"),
    ("1, 2", "12"),
    ("", ""),
    ("\\boxed{}", ""),
    ("   ", "0"),
]

UNORDERED = [
    ("{1, 2, 3}", "3, 2, 1", True),
    ("[2,1,3]", "{1, 2, 3}", True),
    ("\\{3, 1, 2\\}", "(1,2,3)", True),
    ("2, 3, and 5", "5, 3, 2", True),
    ("{1/2, 0.25}", "{25%, 0.5}", True),
    ("{1 cm, 2}", "{2 cm, 1}", True),
    ("{(1, 2), (3, 4)}", "{(3, 4), (1, 2)}", True),
    ("{(1, 2), (3, 4)}", "{(2, 1), (4, 3)}", False),  # only the outer level is unordered
    ("{1, 1, 2}", "{1, 2}", False),  # multisets: duplicates count
    ("{1, 1, 2}", "{1, 2, 2}", False),
    ("{1, 2, 3}", "{1, 2, 4}", False),
]


@pytest.mark.parametrize(("candidate", "reference"), MATCHES)
def test_equivalent_answers_match_both_ways(candidate: str, reference: str) -> None:
    assert answers_match(candidate, reference)
    assert answers_match(reference, candidate)


@pytest.mark.parametrize(("candidate", "reference"), NON_MATCHES)
def test_different_answers_do_not_match_either_way(candidate: str, reference: str) -> None:
    assert not answers_match(candidate, reference)
    assert not answers_match(reference, candidate)


@pytest.mark.parametrize(("candidate", "reference", "expected"), UNORDERED)
def test_unordered_compares_collections_as_multisets(candidate: str, reference: str, expected: bool) -> None:
    assert answers_match(candidate, reference, unordered=True) is expected
    assert answers_match(reference, candidate, unordered=True) is expected


def test_collections_compare_in_order_by_default() -> None:
    assert not answers_match("{1, 2, 3}", "3, 2, 1")
    assert answers_match("{1, 2, 3}", "1, 2, 3")


@pytest.mark.parametrize(
    "junk",
    [
        "\\boxed{",
        "}}}{{{",
        "\\frac{1}{0}",
        "1e99999",
        "10^{99999}",
        "[" * 50 + "1" + "]" * 50,
        "$$$",
        "\\left(",
        "1" * 5000,
        "1," * 4000,
        ", , ;",
        "and",
        "\x00\ufffd",
    ],
)
def test_junk_never_raises(junk: str) -> None:
    for other in (junk, "1", "", "{1, 2}"):
        for unordered in (False, True):
            assert isinstance(answers_match(junk, other, unordered=unordered), bool)
            assert isinstance(answers_match(other, junk, unordered=unordered), bool)


def test_random_junk_never_raises() -> None:
    pieces = list("0123456789,.;/ {}[]()$%-+eEx^*_'\"`") + ["\\frac", "\\boxed{", "cm", "\\times", "and"]
    rng = random.Random(0)
    for _ in range(2000):
        a, b = ("".join(rng.choice(pieces) for _ in range(rng.randint(0, 20))) for _ in range(2))
        assert isinstance(answers_match(a, b, unordered=rng.random() < 0.5), bool)


def test_non_strings_and_huge_inputs_do_not_match() -> None:
    assert not answers_match(None, "5")  # type: ignore[arg-type]
    assert not answers_match("5", 5)  # type: ignore[arg-type]
    assert not answers_match("1" * (MAX_CHARS + 1), "1" * (MAX_CHARS + 1))
    assert answers_match("1" * 5000, "1" * 5000)  # beyond int()'s digit limit: compared as text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the sum is 12.\nAnswer: 12", "12"),
        ("Answer: 3\nwait, no.\nAnswer: 4", "4"),
        ("**Answer:** 7", "7"),
        ("</think>Answer: \\boxed{5}", "\\boxed{5}"),  # as written: answers_match unwraps it
        ("The result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{1}, finally \\boxed{ {2, 3} }", "{2, 3}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("Answer:\n\\boxed{3}", "3"),  # a blank answer line falls back to the box
        ("\\boxed{7} and a broken \\boxed{8", "7"),
        ("\\boxed{}", None),
        ("my answer: 5", None),
        ("no answer at all", None),
        ("", None),
    ],
)
def test_final_answer(text: str, expected: str | None) -> None:
    assert final_answer(text) == expected


def test_the_verified_reward_scores_the_final_answer_of_the_content() -> None:
    assert load_reward("builtin:verified") is verified_reward is BUILTIN_REWARDS["verified"]
    contents = ["Answer: 1/2", "so \\boxed{0.5}", "Answer: 0.33", "no answer", *["Answer: 3, 2, 1"] * 2]
    meta = {"content": contents, "answer": ["0.5", "50%", "1/3", "1", "{1, 2, 3}", "{1, 2, 3}"]}
    rewards = verified_reward([""] * 6, contents, **meta)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    unordered = [False, False, False, False, False, True]
    assert verified_reward([""] * 6, contents, **meta, unordered=unordered)[-2:] == [0.0, 1.0]
    assert verified_reward([""], ["Answer: 42"], content=["Answer: 42"], answer=[42]) == [1.0]
