"""The generative reward model client (turbos.rl.judge) against scripted judges on 127.0.0.1:
a tiny FastAPI app whose reply is a Python function of the request, and once the real
`turbos serve` app with the tiny random model."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import small_config
from serve_helpers import running_server, serving
from turbos.model import TurboSForCausalLM
from turbos.rl.judge import Judge, JudgeError, judge_reward, parse_verdict
from turbos.serve import LLMEngine

# A script maps the request's messages to the reply text, or to (status, JSON body) for an error.
Script = Callable[[list[dict[str, Any]]], "str | tuple[int, dict]"]


class ScriptedJudge:
    """An OpenAI-style /v1/chat/completions server whose replies come from ``self.script``."""

    def __init__(self) -> None:
        self.script: Script = lambda messages: "Verdict: tie"
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append({"body": body, "headers": dict(request.headers)})
            script, delay = self.script, self.delay  # as of arrival: a late reply meets no later test
            if delay:
                await asyncio.sleep(delay)
            reply = script(body["messages"])
            if isinstance(reply, tuple):
                return JSONResponse(reply[1], reply[0])
            message = {"role": "assistant", "content": reply}
            return JSONResponse(
                {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
            )

        self.app = app


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[str, ScriptedJudge]]:
    scripted = ScriptedJudge()
    with serving(scripted.app, timeout_graceful_shutdown=2) as url:
        yield url, scripted


@pytest.fixture
def scripted(scripted_server) -> Iterator[tuple[str, ScriptedJudge]]:
    url, judge = scripted_server
    judge.requests.clear()
    judge.delay = 0.0
    yield url, judge
    judge.script = lambda messages: "Verdict: tie"
    judge.delay = 0.0


def answers(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """Answers A and B of a judge prompt."""
    user = messages[-1]["content"]
    a = re.search(r"\[Answer A\]\n(.*?)\n\[End of Answer A\]", user, re.S)
    b = re.search(r"\[Answer B\]\n(.*?)\n\[End of Answer B\]", user, re.S)
    assert a and b, user
    return a.group(1), b.group(1)


def prefers_42(messages: list[dict[str, Any]]) -> str:
    a, b = answers(messages)
    if a == b:
        return "Verdict: tie"
    return "Verdict: A" if a == "42" else "Verdict: B" if b == "42" else "Verdict: tie"


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_parse_verdict_is_strict() -> None:
    assert parse_verdict("Verdict: A") == "A"
    assert parse_verdict("  verdict:   b  ") == "B"
    assert parse_verdict("Verdict: TIE") == "tie"
    assert parse_verdict("Verdict: A\nthinking more...\nVerdict: B\n") == "B"
    assert parse_verdict("Verdict: A is better") is None
    assert parse_verdict("The verdict: A") is None
    assert parse_verdict("Verdict: C") is None
    assert parse_verdict("") is None


def test_a_judge_preferring_the_correct_answer_scores_right_and_wrong(scripted) -> None:
    url, server = scripted
    server.script = prefers_42
    judge = Judge(url, "judge", timeout=5)
    right = judge.compare("What is 6*7?", "42", "42")
    assert right.score == 0.5 and right.position_consistent  # equal to the reference: a tie
    judge_wrong_ref = judge.compare("What is 6*7?", "42", "41")
    assert judge_wrong_ref.score == 1.0 and judge_wrong_ref.position_consistent
    wrong = judge.compare("What is 6*7?", "41", "42")
    assert wrong.score == 0.0 and wrong.position_consistent and wrong.failures == 0
    assert [r.choice for r in wrong.rounds] == ["B", "A"]
    body = server.requests[0]["body"]
    assert body["model"] == "judge" and body["temperature"] == 0


def test_a_correct_candidate_against_a_reference_gets_one_and_a_wrong_one_zero(scripted) -> None:
    """A judge that recognises the correct answer (here: it knows it is 42) and prefers it, tie
    between two correct ones, prefers the reference over a wrong candidate."""
    url, server = scripted

    def knows(messages):
        a, b = answers(messages)
        good_a, good_b = "42" in a, "42" in b
        return "Verdict: tie" if good_a == good_b else "Verdict: A" if good_a else "Verdict: B"

    server.script = knows
    judge = Judge(url, "judge", timeout=5)
    assert judge.compare("6*7?", "The answer is 42.", "I guess 41").score == 1.0
    assert judge.compare("6*7?", "I guess 41", "The answer is 42.").score == 0.0


def test_the_swap_really_swaps(scripted) -> None:
    url, server = scripted
    server.script = prefers_42
    verdict = Judge(url, "judge", timeout=5).compare("Q?", "cand", "ref")
    assert [answers(r["body"]["messages"]) for r in server.requests] == [("cand", "ref"), ("ref", "cand")]
    assert [r.candidate_position for r in verdict.rounds] == ["A", "B"]
    assert [r.messages for r in verdict.rounds] == [r["body"]["messages"] for r in server.requests]
    assert "Q?" in server.requests[1]["body"]["messages"][-1]["content"]


def test_a_position_biased_judge_gets_half_and_is_inconsistent(scripted) -> None:
    url, server = scripted
    server.script = lambda messages: "Verdict: A"
    verdict = Judge(url, "judge", timeout=5).compare("Q?", "41", "42")
    assert verdict.score == 0.5
    assert not verdict.position_consistent
    assert verdict.failures == 0
    assert [r.candidate_points for r in verdict.rounds] == [1.0, 0.0]


def test_garbage_replies_are_counted_failures_without_a_score(scripted) -> None:
    url, server = scripted
    server.script = lambda messages: "I think answer A is quite good, really."
    judge = Judge(url, "judge", timeout=5)
    verdict = judge.compare("Q?", "41", "42")
    assert verdict.score is None and verdict.failures == 2 and not verdict.position_consistent
    assert all(r.reply and r.choice is None and "unparseable" in r.error for r in verdict.rounds)

    reward = judge_reward(judge)
    with pytest.raises(JudgeError, match="no verdict for 2 of 2 samples"):
        reward(["Q1", "Q2"], ["x", "y"], content=["41", "42"], answer=["42", "42"])
    assert reward.failures == 4 and reward.unscored == 2

    lenient = judge_reward(judge, failure_reward=-1.0)
    assert lenient(["Q1"], ["x"], content=["41"], answer=["42"]) == [-1.0]
    assert lenient.failures == 2


def test_one_garbage_round_uses_the_other(scripted) -> None:
    url, server = scripted

    def garbage_when_candidate_first(messages):
        a, _ = answers(messages)
        return "no idea" if a == "cand" else "Verdict: B"  # candidate is B in round two: wins

    server.script = garbage_when_candidate_first
    verdict = Judge(url, "judge", timeout=5).compare("Q?", "cand", "ref")
    assert verdict.score == 1.0 and verdict.failures == 1
    assert not verdict.position_consistent
    assert verdict.rounds[0].choice is None and verdict.rounds[1].choice == "B"


def test_rationale_asks_for_reasoning_and_takes_the_last_verdict_line(scripted) -> None:
    url, server = scripted

    def reasoning(messages):
        assert "reasoning" in messages[-1]["content"]
        a, _ = answers(messages)
        final = "A" if a == "42" else "B"
        return f"Let me think. Verdict: A would be hasty.\nVerdict: tie\nOn reflection:\nVerdict: {final}\n"

    server.script = reasoning
    verdict = Judge(url, "judge", timeout=5, rationale=True).compare("Q?", "42", "41")
    assert verdict.score == 1.0 and verdict.position_consistent
    assert [r.choice for r in verdict.rounds] == ["A", "B"]

    server.script = lambda messages: "Verdict: A"
    Judge(url, "judge", timeout=5).compare("Q?", "42", "41")
    assert "reasoning" not in server.requests[-1]["body"]["messages"][-1]["content"]


def test_connection_refused_is_a_counted_failure() -> None:
    judge = Judge(f"http://127.0.0.1:{closed_port()}", "judge", timeout=2)
    verdict = judge.compare("Q?", "a", "b")
    assert verdict.score is None and verdict.failures == 2
    assert all(r.reply is None and "connection refused" in r.error for r in verdict.rounds)
    reward = judge_reward(judge, failure_reward=0.0)
    assert reward(["Q?"], ["a"], content=["a"], answer=["b"]) == [0.0]
    assert reward.failures == 2


def test_a_timeout_and_http_errors_are_counted_failures(scripted) -> None:
    url, server = scripted
    server.script = lambda messages: (503, {"error": {"message": "queue full"}})
    verdict = Judge(url, "judge", timeout=5).compare("Q?", "a", "b")
    assert verdict.score is None and verdict.failures == 2
    assert all("HTTP 503" in r.error and "queue full" in r.error for r in verdict.rounds)

    server.script = lambda messages: "Verdict: A"
    server.delay = 1.0
    started = time.monotonic()
    verdict = Judge(url, "judge", timeout=0.3).compare("Q?", "a", "b")
    assert time.monotonic() - started < 1.5
    assert verdict.score is None and all("timed out" in r.error for r in verdict.rounds)


def test_retries_recover_from_a_transient_error(scripted) -> None:
    url, server = scripted
    calls = []

    def flaky(messages):
        calls.append(1)
        return (503, {"error": {"message": "busy"}}) if len(calls) % 2 else "Verdict: A"

    server.script = flaky
    verdict = Judge(url, "judge", timeout=5, max_retries=1).compare("Q?", "a", "b")
    assert verdict.failures == 0 and verdict.score == 0.5
    assert [r.attempts for r in verdict.rounds] == [2, 2]


def test_api_key_is_sent_as_a_bearer_token(scripted) -> None:
    url, server = scripted
    Judge(url + "/v1/", "judge", api_key="sesame", timeout=5).compare("Q?", "a", "b")
    assert server.requests[0]["headers"]["authorization"] == "Bearer sesame"


def test_judge_reward_scores_in_parallel_and_in_order(scripted) -> None:
    url, server = scripted
    server.script = prefers_42
    server.delay = 0.2
    reward = judge_reward(Judge(url, "judge", timeout=5, max_workers=4))
    content = ["42", "41", "42", "7"]
    started = time.monotonic()
    scores = reward(
        ["Q"] * 4, ["<think>x</think>" + c for c in content], content=content, answer=["42", "42", "1", "42"]
    )
    assert scores == [0.5, 0.0, 1.0, 0.0]
    assert time.monotonic() - started < 4 * 2 * 0.2  # the samples overlapped
    assert reward.failures == 0 and len(reward.last_verdicts) == 4


def test_the_real_server_with_a_random_model_never_crashes_the_judge(tokenizer) -> None:
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048)
    model = TurboSForCausalLM(config).eval()
    with running_server(LLMEngine(model, tokenizer), model_name="tiny") as (url, _):
        judge = Judge(url, "tiny", timeout=20, max_tokens=8)
        verdict = judge.compare("What is 6*7?", "42", "41")
        assert len(verdict.rounds) == 2
        for r in verdict.rounds:
            assert (r.choice is not None) or (r.error is not None)
        assert verdict.failures == sum(r.choice is None for r in verdict.rounds)
        assert (verdict.score is None) == (verdict.failures == 2)
        reward = judge_reward(judge, failure_reward=0.0)
        scores = reward(["What is 6*7?"], ["42"], content=["42"], answer=["41"])
        assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0
        # an unknown model name is a 404: a counted failure with the reason kept
        unknown = Judge(url, "nope", timeout=20, max_tokens=8).compare("Q?", "a", "b")
        assert unknown.score is None and all("HTTP 404" in r.error for r in unknown.rounds)
