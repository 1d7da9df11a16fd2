"""The routing summary of `turbos eval` and the demo report: answers paired per problem, routings
scored exactly, auto's extra tokens as the tokenizer encodes them."""

from __future__ import annotations

import pytest

from serve_helpers import save_model_dir
from turbos.cli import main
from turbos.data.tokenizer import END_THINK_TOKEN, THINK_TOKEN
from turbos.post.routing import (
    AUTO_DIRECT_EXTRA,
    AUTO_THINK_EXTRA,
    outcome_counts,
    paired,
    routed,
    routing_report,
    routing_summary,
)
from turbos.serve.chat_template import prepare_chat

ROWS = [
    {"uid": "a", "level": 1, "question": "1+1", "mode": "no_think", "correct": True, "tokens": 5},
    {"uid": "a", "level": 1, "question": "1+1", "mode": "think", "correct": False, "tokens": 50},
    {"uid": "b", "level": 4, "question": "9*9", "mode": "no_think", "correct": False, "tokens": 6},
    {
        "uid": "b",
        "level": 4,
        "question": "9*9",
        "mode": "think",
        "correct": True,
        "tokens": 90,
        "family": "expr",
    },
    {"uid": "b", "level": 4, "question": "9*9", "mode": "auto", "correct": True, "tokens": 91},
]


def test_auto_generates_exactly_the_tokens_the_primed_modes_put_in_their_prompts(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    ids = {
        mode: tokenizer.encode(prepare_chat(messages, mode).text).ids
        for mode in ("auto", "think", "no_think")
    }
    auto = ids["auto"]
    think_id, end_think_id = tokenizer.token_to_id(THINK_TOKEN), tokenizer.token_to_id(END_THINK_TOKEN)
    assert ids["no_think"] == [*auto, think_id, end_think_id], (
        "no_think primes <think></think> after auto's prompt"
    )
    assert ids["think"] == [*auto, think_id], "think primes <think> after auto's prompt"
    assert len(ids["no_think"]) - len(auto) == AUTO_DIRECT_EXTRA, (
        "a direct auto answer also writes <think></think>"
    )
    assert len(ids["think"]) - len(auto) == AUTO_THINK_EXTRA, "a thinking auto answer also writes <think>"


def test_answers_pair_per_problem_with_the_family_when_rows_carry_it() -> None:
    choices = paired(ROWS)
    assert [(c.uid, c.level, c.family) for c in choices] == [("a", 1, ""), ("b", 4, "expr")]
    assert [(c.direct_correct, c.direct_tokens, c.think_correct, c.think_tokens) for c in choices] == [
        (True, 5, False, 50),
        (False, 6, True, 90),
    ], "auto's row is not one of the two answers"
    assert outcome_counts(choices) == {"both": 0, "direct_only": 1, "think_only": 1, "neither": 0}
    with pytest.raises(ValueError, match="problem a has no think answer"):
        paired(ROWS[:1])


def test_a_routing_scores_the_branch_it_takes_with_autos_extra_tokens() -> None:
    choices = paired(ROWS)
    assert routed(choices, [False, True]) == (1.0, (5 + 2 + 90 + 1) / 2), "direct on a, think on b"
    assert routed(choices, [True, False]) == (0.0, (50 + 1 + 6 + 2) / 2), "think on a, direct on b"
    with pytest.raises(ValueError, match="1 decisions for 2 problems"):
        routed(choices, [True])


def test_the_summary_scores_thinking_exactly_where_the_direct_answer_is_wrong() -> None:
    summary = routing_summary(paired(ROWS))
    assert (summary["think_accuracy"], summary["think_tokens"]) == (0.5, 70.0)
    assert summary["fusion_rule"] == {
        "accuracy": 1.0,
        "token_ratio": pytest.approx((5 + 2 + 90 + 1) / 2 / 70),
    }
    lines = routing_report(ROWS)
    assert "- right in both modes 0, only directly 1, only with thinking 1, in neither 0;" in lines
    assert (
        "- thinking exactly where the direct answer is wrong: 100.0% at 70% of think's tokens (think: 50.0%)."
        in lines
    )


def test_turbos_eval_prints_the_routing_summary_when_both_modes_ran(tmp_path, capsys) -> None:
    directory = save_model_dir(tmp_path / "model")
    args = ["eval", "--model", str(directory), "--families", "add", "--levels", "1", "2", "--per-level", "2"]
    assert main([*args, "--max-tokens", "4", "--modes", "no_think", "think"]) == 0
    printed = capsys.readouterr().out
    assert "- right in both modes " in printed
    assert "- thinking exactly where the direct answer is wrong: " in printed
    assert main([*args, "--max-tokens", "4", "--modes", "no_think"]) == 0
    assert "right in both modes" not in capsys.readouterr().out, "the summary needs both modes"
