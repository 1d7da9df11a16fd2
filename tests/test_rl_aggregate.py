"""Reward aggregation: per-domain routing, weighted fusion, the repetition penalty."""

from __future__ import annotations

import pytest

from turbos.rl.aggregate import fuse, repetition_rate, route, with_repetition_penalty


def length(prompts, completions, **meta) -> list[float]:
    return [float(len(c)) for c in completions]


def test_route_gives_each_sample_the_scorer_of_its_domain_once_per_scorer() -> None:
    calls = []

    def code(prompts, completions, **meta):
        calls.append(("code", list(meta["family"]), list(meta["answer"])))
        return [100.0] * len(completions)

    reward = route({"code": code}, length)
    scores = reward(
        ["p1", "p2", "p3"], ["a", "bb", "ccc"], family=["add", "code", "expr"], answer=["1", "t", "3"]
    )
    assert scores == [1.0, 100.0, 3.0]
    assert calls == [("code", ["code"], ["t"])], "the rule sees only its own samples and their meta"


def test_fuse_weights_and_adds_scores() -> None:
    reward = fuse([(length, 0.5), (lambda p, c, **m: [1.0] * len(c), 2.0)])
    assert reward(["p", "p"], ["ab", "abcd"]) == [3.0, 4.0]
    with pytest.raises(ValueError, match="at least one"):
        fuse([])


def test_repetition_rate_and_penalty() -> None:
    assert repetition_rate("one two three four five") == 0.0
    looping = "the cat sat down " * 5  # 20 words, 17 4-grams of which 4 are distinct
    assert repetition_rate(looping) == pytest.approx(1 - 4 / 17)
    assert repetition_rate("short") == 0.0
    reward = with_repetition_penalty(lambda p, c, **m: [1.0] * len(c), coef=0.5)
    assert reward(["p", "p"], ["a b c d e f", looping]) == pytest.approx([1.0, 1 - 0.5 * (1 - 4 / 17)])
    with pytest.raises(ValueError, match=">= 0"):
        with_repetition_penalty(length, coef=-1)
