"""Remote rewards: a reward function served over HTTP (loopback only) and the client calling it."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from serve_helpers import serving
from turbos.cli import build_parser
from turbos.rl.remote import RemoteReward, RemoteRewardError, remote_reward, reward_app
from turbos.rl.rewards import BUILTIN_REWARDS, RewardFn, load_reward


@contextmanager
def running_reward(reward_fn: RewardFn, **options: Any) -> Iterator[str]:
    """``reward_app(reward_fn, **options)`` on 127.0.0.1 and a free port in a thread; yields the
    endpoint URL."""
    with serving(reward_app(reward_fn, **options), lifespan="off") as url:
        yield f"{url}/v1/reward"


class Recorder:
    """A reward function that records the batch sizes it was called with."""

    def __init__(self, fn: RewardFn) -> None:
        self.fn, self.batches = fn, []

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        self.batches.append(len(completions))
        return self.fn(prompts, completions, **meta)


def length_score(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """Depends on the prompt, the completion and two meta lists, so any mix-up shows."""
    return [
        len(c) / 10 + 0.5 * (p == str(a)) + (lvl or 0)
        for p, c, a, lvl in zip(prompts, completions, meta["answer"], meta["level"], strict=True)
    ]


def samples(n: int) -> tuple[list[str], list[str], dict[str, list]]:
    prompts = [f"q{i}" for i in range(n)]
    completions = [f"<think>t</think>Answer: {i % 3}" + "x" * i for i in range(n)]
    answers = [str(i % 3) if i % 2 else f"q{i}" for i in range(n)]
    meta = {
        "answer": answers,
        "level": [i % 4 for i in range(n)],
        "content": [f"Answer: {i % 3}" for i in range(n)],
        "family": ["arith"] * n,
        "constraints": [None if i % 2 else [{"kind": "x"}] for i in range(n)],
    }
    return prompts, completions, meta


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_remote_scores_equal_local_in_batches() -> None:
    prompts, completions, meta = samples(23)
    recorder = Recorder(length_score)
    with running_reward(recorder) as url:
        remote = remote_reward(url, batch_size=5)
        got = remote(prompts, completions, trainer_state=object(), **meta)  # non-list kwargs stay local
    assert got == length_score(prompts, completions, **meta)
    assert recorder.batches == [5, 5, 5, 5, 3]


def test_builtin_reward_remote_matches_local() -> None:
    prompts, completions, meta = samples(9)
    local = BUILTIN_REWARDS["correct"]
    with running_reward(local) as url:
        expected = local(prompts, completions, **meta)
        assert remote_reward(url, batch_size=4)(prompts, completions, **meta) == expected
        assert remote_reward(url)([], []) == []


def test_health_and_api_key() -> None:
    prompts, completions, meta = samples(3)
    with running_reward(length_score, api_key="secret") as url:
        health = url.removesuffix("/v1/reward") + "/health"
        with urllib.request.urlopen(health, timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        for key in ("wrong", None):
            with pytest.raises(RemoteRewardError, match="401.*API key"):
                remote_reward(url, api_key=key)(prompts, completions, **meta)
        status, body = post(url, {"prompts": [], "completions": []}, {"Authorization": "Bearer nope"})
        assert status == 401 and "API key" in body["error"]["message"]
        assert remote_reward(url, api_key="secret")(prompts, completions, **meta) == length_score(
            prompts, completions, **meta
        )


def test_bad_requests_are_400() -> None:
    recorder = Recorder(length_score)
    with running_reward(recorder, max_batch=4) as url:
        cases = [
            ({"prompts": ["a", "b"], "completions": ["x"]}, "different lengths"),
            ({"prompts": "a", "completions": ["x"]}, "'prompts' must be a list"),
            ({"prompts": ["a"], "completions": {"x": 1}}, "'completions' must be a list"),
            ({"prompts": ["a"] * 5, "completions": ["x"] * 5}, "max_batch 4"),
            ({"prompts": ["a"], "completions": ["x"], "meta": {"answer": ["1", "2"]}}, "2 values for 1"),
            ({"prompts": ["a"], "completions": ["x"], "meta": {"answer": "1"}}, "must be a list"),
            ({"prompts": ["a"], "completions": ["x"], "meta": ["answer"]}, "'meta' must be an object"),
            ([1, 2], "JSON object"),
        ]
        for body, message in cases:
            status, reply = post(url, body)
            assert status == 400 and message in reply["error"]["message"], (body, reply)
        assert recorder.batches == []

        # the server's message surfaces in the client's error (a 4xx is not retried)
        mismatched = RemoteReward(url)
        mismatched_batch = {"prompts": ["a", "b"], "completions": ["x"], "meta": {}}
        with pytest.raises(RemoteRewardError, match="HTTP 400: 'prompts' and 'completions' have different"):
            mismatched._post(mismatched_batch)
        with pytest.raises(RemoteRewardError, match="max_batch 4"):
            remote_reward(url, batch_size=8)(*samples(6)[:2], **samples(6)[2])
        with pytest.raises(RemoteRewardError, match="2 prompts for 1 completions"):
            remote_reward(url)(["a", "b"], ["x"])


def test_raising_reward_is_an_error_never_a_score() -> None:
    calls = []

    def broken(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        calls.append(len(completions))
        raise KeyError("constraints")

    def short(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        return [1.0]

    prompts, completions, meta = samples(3)
    with running_reward(broken) as url, pytest.raises(RemoteRewardError, match="500.*KeyError.*constraints"):
        remote_reward(url, max_retries=1)(prompts, completions, **meta)
    assert calls == [3, 3]  # a 5xx is retried once
    with running_reward(short) as url, pytest.raises(RemoteRewardError, match="expected 3 numbers"):
        remote_reward(url, max_retries=0)(prompts, completions, **meta)


def test_closed_port_raises_after_retries() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match="after 3 attempts.*cannot reach"):
        remote_reward(f"http://127.0.0.1:{port}/v1/reward", timeout=5, max_retries=2)(["a"], ["b"])
    assert time.monotonic() - started < 10


def test_load_reward_url() -> None:
    prompts, completions, meta = samples(4)
    with running_reward(length_score) as url:
        fn = load_reward(url)
        assert isinstance(fn, RemoteReward) and fn.url == url and fn.__name__ == "remote_reward"
        assert fn(prompts, completions, **meta) == length_score(prompts, completions, **meta)
    assert isinstance(load_reward("https://scorer.example/v1/reward"), RemoteReward)  # no request made


def test_cli_parses_reward_serve() -> None:
    args = build_parser().parse_args(["reward", "serve", "--reward", "builtin:correct", "--port", "8123"])
    assert (args.reward, args.host, args.port, args.api_key, args.max_batch) == (
        "builtin:correct",
        "127.0.0.1",
        8123,
        None,
        1024,
    )
    assert callable(args.func)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reward", "serve", "--port", "8123"])  # --reward is required


def test_timeout_raises() -> None:
    def slow(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        time.sleep(1.0)
        return [1.0] * len(completions)

    with running_reward(slow) as url, pytest.raises(RemoteRewardError, match="timed out"):
        remote_reward(url, timeout=0.2, max_retries=0)(["a"], ["b"])
