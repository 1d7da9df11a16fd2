"""Instruction-following constraints: exact checks, dict round trips and their errors, prompts,
the generated family (reproducible, disjoint splits) and the ``instructions`` reward."""

from __future__ import annotations

import json

import pytest

from turbos.data.tasks import split_of
from turbos.rl.instructions import (
    CONSTRAINTS,
    BannedWords,
    BulletCount,
    Constraint,
    EndsWith,
    Instruction,
    JsonFormat,
    Lowercase,
    ParagraphCount,
    RequiredWords,
    StartsWith,
    Uppercase,
    WordCount,
    check_all,
    constraint_from_dict,
    generate_instructions,
    instruction_prompt,
    words,
)
from turbos.rl.rewards import BUILTIN_REWARDS, instructions_reward, load_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, world!", ["Hello", "world"]),
        ("don't stop", ["don't", "stop"]),
        ("well-known 3.5 'quoted' it’s", ["well", "known", "3", "5", "'quoted'", "it’s"]),
        ("snake_case -- ... ''", ["snake", "case"]),
        ("  \n\t ", []),
    ],
)
def test_words_are_runs_of_letters_digits_and_apostrophes(text: str, expected: list[str]) -> None:
    assert words(text) == expected


CHECKS: list[tuple[Constraint, str, bool]] = [
    (WordCount("at_least", 3), "one two three", True),
    (WordCount("at_least", 3), "one two", False),
    (WordCount("at_most", 3), "one, two, three!   \n", True),
    (WordCount("at_most", 3), "one two three four", False),
    (WordCount("exactly", 2), "don't stop.", True),
    (WordCount("exactly", 2), "well-known fact", False),  # three words
    (WordCount("exactly", 0), " ... ", True),
    (JsonFormat(), '  {"a": 1}\n', True),
    (JsonFormat(), "[1, 2]", True),
    (JsonFormat(), "42", True),
    (JsonFormat(), '```json\n{"a": 1}\n```', False),  # a code fence is not JSON
    (JsonFormat(), 'Here: {"a": 1}', False),
    (JsonFormat(), "{'a': 1}", False),
    (JsonFormat(), "NaN", False),
    (JsonFormat(), "", False),
    (JsonFormat(), "[" * 100_000, False),
    (JsonFormat(("a", "b")), '{"a": 1, "b": null}', True),
    (JsonFormat(("a", "b")), '{"a": 1}', False),
    (JsonFormat(("a",)), '[{"a": 1}]', False),
    (RequiredWords(("cat",)), "The CAT sat.", True),
    (RequiredWords(("cat",)), "My cat, Tom.", True),
    (RequiredWords(("cat",)), "'Cat' is a word", True),
    (RequiredWords(("cat",)), "cats and category", False),
    (RequiredWords(("cat",)), "the cat's toy", False),
    (RequiredWords(("don't",)), "I DON’T know", True),
    (RequiredWords(("cat", "dog")), "a cat only", False),
    (BannedWords(("very",)), "It is VERY good.", False),
    (BannedWords(("very",)), "It is everything.", True),
    (BannedWords(("very", "good")), "fine", True),
    (StartsWith("Dear reader,"), "  Dear reader, hello", True),
    (StartsWith("Dear reader,"), "dear reader, hello", False),
    (StartsWith("Dear reader,"), "Dear reader hello", False),
    (StartsWith("  Sure. "), "Sure. Here it is.", True),
    (EndsWith("The end."), "Story...\nThe end.  \n\n", True),
    (EndsWith("The end."), "The end. Bye.", False),
    (EndsWith("The end."), "The end", False),
    (BulletCount(2), "- one\n- two", True),
    (BulletCount(2), "- one\n* two\n", True),
    (BulletCount(2), "Intro\n  - nested\n- top\n", True),
    (BulletCount(2), "+ one\n• two\n-three\n**bold**\n---", False),  # none of these is a bullet
    (BulletCount(0), "+ one\n• two\n-three\n**bold**\n---", True),
    (BulletCount(1), "a - b\n- c", True),
    (ParagraphCount(2), "one\n\ntwo", True),
    (ParagraphCount(2), "one\n   \n\n\ntwo\n\n", True),
    (ParagraphCount(2), "one\r\n\r\ntwo", True),
    (ParagraphCount(2), "one\ntwo", False),
    (ParagraphCount(1), "\n\n  one  \n\n", True),
    (ParagraphCount(0), "  \n ", True),
    (Lowercase(), "all lower, 123!", True),
    (Lowercase(), "Not lower", False),
    (Lowercase(), "123", False),  # no letter at all
    (Uppercase(), "ALL UPPER, 123!", True),
    (Uppercase(), "ALMOST uPPER", False),
    (Uppercase(), "", False),
]


@pytest.mark.parametrize(("constraint", "response", "expected"), CHECKS)
def test_checks_are_exact(constraint: Constraint, response: str, expected: bool) -> None:
    assert constraint.check(response) is expected


def test_every_kind_round_trips_through_its_dict_form() -> None:
    examples = [
        WordCount("at_most", 50),
        JsonFormat(),
        JsonFormat(("title", "text")),
        RequiredWords(("river", "light")),
        BannedWords(("very",)),
        StartsWith("Sure."),
        EndsWith("The end."),
        BulletCount(3),
        ParagraphCount(2),
        Lowercase(),
        Uppercase(),
    ]
    assert {type(c) for c in examples} == set(CONSTRAINTS.values())
    for constraint in examples:
        spec = constraint.to_dict()
        assert json.loads(json.dumps(spec)) == spec
        assert constraint_from_dict(spec) == constraint
    assert WordCount("at_most", 50).to_dict() == {"kind": "word_count", "relation": "at_most", "n": 50}
    assert RequiredWords(["a", "b"]).words == ("a", "b")  # lists are stored as tuples


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["word_count"], "must be a dict"),
        ({"relation": "at_most", "n": 5}, "missing field 'kind'"),
        ({"kind": "words"}, "field 'kind' must be one of"),
        ({"kind": None}, "field 'kind' must be one of"),
        ({"kind": "word_count", "n": 5}, "missing field 'relation'"),
        ({"kind": "word_count", "relation": "at_most", "n": 5, "max": 3}, "unknown field 'max'"),
        ({"kind": "word_count", "relation": "fewer", "n": 5}, "field 'relation' must be one of"),
        ({"kind": "word_count", "relation": "at_most", "n": "50"}, "'n' must be a non-negative integer"),
        ({"kind": "word_count", "relation": "at_most", "n": -1}, "field 'n'"),
        ({"kind": "word_count", "relation": "at_most", "n": True}, "field 'n'"),
        ({"kind": "bullets", "n": 2.0}, "field 'n'"),
        ({"kind": "required_words", "words": "cat"}, "field 'words' must be a list of strings"),
        ({"kind": "required_words", "words": []}, "field 'words' must be a non-empty list"),
        ({"kind": "banned_words", "words": ["two words"]}, "field 'words' must be a list of single words"),
        ({"kind": "banned_words", "words": [3]}, "field 'words'"),
        ({"kind": "json", "keys": [1]}, "field 'keys' must be a list of strings"),
        ({"kind": "starts_with", "phrase": "  "}, "field 'phrase' must be a non-blank string"),
        ({"kind": "ends_with"}, "missing field 'phrase'"),
        ({"kind": "lowercase", "n": 1}, "unknown field 'n'"),
    ],
)
def test_malformed_specs_raise_a_value_error_naming_the_field(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        constraint_from_dict(spec)  # type: ignore[arg-type]


def test_the_prompt_states_each_constraint_on_its_own_line() -> None:
    constraints = [WordCount("exactly", 1), RequiredWords(("river", "light", "window")), BulletCount(1)]
    prompt = instruction_prompt(" Describe a cat. ", constraints)
    assert prompt.splitlines() == [
        "Describe a cat.",
        "",
        "Answer with exactly 1 word.",
        'Include the words "river", "light" and "window".',
        'Use exactly 1 bullet point, each on its own line starting with "- ".',
    ]
    assert instruction_prompt("Describe a cat.", []) == "Describe a cat."
    instruction = Instruction("Describe a cat.", constraints)  # type: ignore[arg-type]
    assert instruction.constraints == tuple(constraints)
    assert instruction.prompt == prompt
    assert instruction.to_dict()["constraints"][0] == {"kind": "word_count", "relation": "exactly", "n": 1}
    assert check_all("- river light window", constraints) == [False, True, True]


def test_generated_instructions_are_reproducible_varied_and_split_by_their_prompt() -> None:
    train = generate_instructions(200, seed=0)
    assert [i.prompt for i in train] == [i.prompt for i in generate_instructions(200, seed=0, split="train")]
    assert [i.prompt for i in train] != [i.prompt for i in generate_instructions(200, seed=1)]
    test = generate_instructions(100, seed=0, split="test")
    prompts = {i.prompt for i in train}
    assert len(prompts) == 200 and not prompts & {i.prompt for i in test}
    assert all(split_of(i.prompt) == "train" for i in train)
    assert all(split_of(i.prompt) == "test" for i in test)
    assert {len(i.constraints) for i in train} == {1, 2, 3}
    assert {c.kind for i in train for c in i.constraints} == set(CONSTRAINTS)
    assert len({i.base for i in train}) > 50
    for instruction in train:
        kinds = [c.kind for c in instruction.constraints]
        assert len(set(kinds)) == len(kinds)
        assert not {"lowercase", "uppercase"} <= set(kinds)
        assert [constraint_from_dict(spec) for spec in instruction.to_dict()["constraints"]] == list(
            instruction.constraints
        )
    with pytest.raises(ValueError, match="unknown split"):
        generate_instructions(1, split="dev")
    with pytest.raises(ValueError, match="non-negative"):
        generate_instructions(-1)


def test_the_instructions_reward_is_the_share_of_constraints_met() -> None:
    assert load_reward("builtin:instructions") is instructions_reward is BUILTIN_REWARDS["instructions"]
    specs = [{"kind": "word_count", "relation": "at_most", "n": 3}, {"kind": "lowercase"}]
    contents = ["short and lower", "Short And Upper", "this one is far too long", "Anything"]
    meta = {"content": contents, "constraints": [specs, specs, specs, []]}
    assert instructions_reward([""] * 4, contents, **meta) == [1.0, 0.5, 0.5, 1.0]
    strict = [True, True, False, True]
    assert instructions_reward([""] * 4, contents, **meta, all_or_nothing=strict) == [1.0, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="field 'n'"):
        instructions_reward([""], ["x"], content=["x"], constraints=[[{"kind": "bullets", "n": "2"}]])
