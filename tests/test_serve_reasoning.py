"""Reasoning parser: whole replies, and streaming with tags split anywhere across deltas."""

from __future__ import annotations

import pytest

from turbos.serve.reasoning import ReasoningStreamParser, parse_reasoning

REPLIES = [
    "",
    "Answer: 5",
    "  Answer: 5  ",
    "<think>\n2+3=5\n</think>\nAnswer: 5",
    "  \n<think>a</think>b",
    "<think></think>direct",
    "<think>   </think>   ",
    "<think>unfinished reasoning  <",
    "<think>cut in the tag </thi",
    "<thinking> is not the tag",
    "<thi",
    "   ",
    "text <think>late tags are content</think> more",
    "<think>a</think>b</think>c <think>d",
    "<think><<</</t</think>>>",
]


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("Answer: 5", "auto", (None, "Answer: 5")),
        ("<think>\n2+3=5\n</think>\nAnswer: 5", "auto", ("2+3=5", "Answer: 5")),
        ("  <think>x</think>y", "auto", ("x", "y")),
        ("<think>never closed", "auto", ("never closed", "")),
        ("x</think>y", "think", ("x", "y")),
        ("all reasoning", "think", ("all reasoning", "")),
        ("<think>x</think>y", "no_think", (None, "<think>x</think>y")),
        ("late <think>x</think>", "auto", (None, "late <think>x</think>")),
    ],
)
def test_parse_reasoning(text, mode, expected) -> None:
    assert parse_reasoning(text, mode) == expected


def stream(pieces: list[str], mode: str) -> tuple[str | None, str]:
    parser = ReasoningStreamParser(mode)
    reasoning, content = "", ""
    for piece in [*pieces, None]:
        r, c = parser.finish() if piece is None else parser.feed(piece)
        reasoning, content = reasoning + r, content + c
    return (reasoning if parser.has_reasoning else None), content


@pytest.mark.parametrize("mode", ["auto", "think", "no_think"])
@pytest.mark.parametrize("text", REPLIES)
def test_streaming_equals_the_whole_parse_for_every_split(text, mode) -> None:
    whole = parse_reasoning(text, mode)
    assert stream(list(text), mode) == whole, "one character at a time"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            pieces = [text[:i], text[i:j], text[j:]]
            assert stream(pieces, mode) == whole, f"split at {i}, {j}"


def test_nothing_is_released_that_may_still_be_a_tag() -> None:
    parser = ReasoningStreamParser("auto")
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>abc </th") == ("abc", "")
    assert parser.feed("ink>  Answer") == ("", "Answer")
