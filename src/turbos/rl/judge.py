"""A generative reward model ("judge") client for RL rewards (report §3.4).

A judge model behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (``turbos serve``
included) compares a candidate answer with a reference answer, pairwise, twice: once with the
candidate as answer A and the reference as answer B, once swapped, which cancels position bias.
Each reply must end with a line ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie`` (with
``rationale=True`` the judge reasons first). The last such line is the round's choice; a reply
without one, or a request that failed (connection refused, timeout, non-200, malformed body), is
a counted failure, never a silent score.

Score: per parsed round the candidate earns 1 (preferred), 0.5 (tie) or 0 (not preferred);
``Verdict.score`` is the mean over parsed rounds (one of 0, 0.25, 0.5, 0.75, 1 with both rounds,
0, 0.5 or 1 with one), or None when neither round parsed.

``judge_reward(judge)`` turns a judge into a reward function with TRL's signature
(``reward(prompts, completions, **meta)``; candidate ``meta["content"]``, reference
``meta["answer"]``), scoring samples on ``judge.max_workers`` threads.

Requests use the standard library (``urllib.request``, JSON), temperature 0; proxies from the
environment are bypassed for loopback hosts.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

Choice = Literal["A", "B", "tie"]

VERDICT_LINE = re.compile(r"^\s*Verdict:\s*(A|B|tie)\s*$", re.IGNORECASE)

SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two answers to the same question and decide which "
    "one is better: correct, complete and faithful to the question. Judge the content only; the "
    "order of the answers and their length do not matter."
)

_RATIONALE_INSTRUCTION = (
    "First explain your reasoning step by step. Then end your reply with a final line that is "
    "exactly `Verdict: A`, `Verdict: B` or `Verdict: tie`."
)
_LINE_INSTRUCTION = (
    "Reply with a single line that is exactly `Verdict: A`, `Verdict: B` or `Verdict: tie`, and nothing else."
)

# Transient statuses worth a retry (when max_retries > 0).
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge gave no verdict for some samples (and no failure reward was set)."""


@dataclass
class Round:
    """One judge call: where the candidate stood, what came back and what it means."""

    candidate_position: Literal["A", "B"]
    messages: list[dict[str, str]]
    reply: str | None = None  # the raw reply text; None when the request failed
    choice: Choice | None = None  # the parsed verdict; None when unparseable or failed
    error: str | None = None  # why the round failed (request error or unparseable reply)
    attempts: int = 0  # HTTP attempts made (1 + retries used)

    @property
    def candidate_points(self) -> float | None:
        """1.0 when the candidate was preferred, 0.5 for a tie, 0.0 otherwise; None if unparsed."""
        if self.choice is None:
            return None
        if self.choice == "tie":
            return 0.5
        return 1.0 if self.choice == self.candidate_position else 0.0


@dataclass
class Verdict:
    """The combined result of the two (swapped) rounds of one comparison."""

    score: float | None
    rounds: list[Round] = field(default_factory=list)
    position_consistent: bool = False  # both rounds parsed and agree once un-swapped
    failures: int = 0  # rounds that were unparseable or whose request failed


def parse_verdict(reply: str) -> Choice | None:
    """The choice of the last line that is exactly a verdict line, or None when there is none."""
    for line in reversed(reply.splitlines()):
        match = VERDICT_LINE.match(line)
        if match:
            value = match.group(1)
            return "tie" if value.lower() == "tie" else value.upper()  # type: ignore[return-value]
    return None


def judge_messages(
    question: str, answer_a: str, answer_b: str, rationale: bool = False
) -> list[dict[str, str]]:
    """The chat messages of one round: the question and the two answers in this order."""
    user = (
        f"[Question]\n{question}\n[End of Question]\n\n"
        f"[Answer A]\n{answer_a}\n[End of Answer A]\n\n"
        f"[Answer B]\n{answer_b}\n[End of Answer B]\n\n"
        "Which answer is better? " + (_RATIONALE_INSTRUCTION if rationale else _LINE_INSTRUCTION)
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


class RequestFailed(Exception):
    """One HTTP attempt failed: ``reason``, and whether a retry may help (``retryable``)."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


class ChatEndpoint:
    """One OpenAI-compatible ``/v1/chat/completions`` endpoint over the standard library,
    temperature 0 (proxies from the environment are skipped for loopback hosts); shared by the
    judge and deliberation's endpoint rivals."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None, timeout: float, max_tokens: int | None
    ) -> None:
        self.url = _chat_url(base_url)
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.model, self.api_key, self.timeout, self.max_tokens = model, api_key, timeout, max_tokens
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def message(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One HTTP attempt; the reply's first message (``content``, maybe ``reasoning_content``),
        or RequestFailed with the reason and whether a retry may help."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = ""
            try:
                payload = json.loads(err.read() or b"null")
                detail = payload["error"]["message"] if isinstance(payload, dict) else str(payload)
            except Exception:  # noqa: BLE001 - any body is fine, the status is the reason
                pass
            reason = f"HTTP {err.code} from {self.url}" + (f": {detail}" if detail else "")
            raise RequestFailed(reason, err.code in _RETRY_STATUSES) from None
        except urllib.error.URLError as err:
            inner = err.reason
            if isinstance(inner, ConnectionRefusedError):
                raise RequestFailed(f"connection refused by {self.url}", True) from None
            if isinstance(inner, TimeoutError):
                raise RequestFailed(f"timed out after {self.timeout}s waiting for {self.url}", True) from None
            raise RequestFailed(f"cannot reach {self.url}: {inner}", True) from None
        except TimeoutError:
            raise RequestFailed(f"timed out after {self.timeout}s waiting for {self.url}", True) from None
        except OSError as err:  # reset connections and the like
            raise RequestFailed(f"request to {self.url} failed: {err}", True) from None
        try:
            message = json.loads(raw)["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            message = None
        if not isinstance(message, dict):
            raise RequestFailed(f"malformed response from {self.url}: {raw[:200]!r}", False)
        return message


class Judge:
    """A judge model behind an OpenAI-compatible chat completions endpoint.

    base_url: the server (``http://127.0.0.1:8000``, with or without ``/v1``); model: the model
    name sent with each request; api_key: sent as a bearer token when set; timeout: seconds per
    HTTP attempt; rationale: ask for reasoning before the verdict line; max_retries: extra
    attempts after a connection error, timeout or transient status (408, 429, 5xx), with a short
    backoff (an unparseable reply is not retried: at temperature 0 it would repeat); max_workers:
    threads of ``judge_reward``; max_tokens: the reply budget sent (server default when None).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        rationale: bool = False,
        max_retries: int = 0,
        max_workers: int = 4,
        max_tokens: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.endpoint = ChatEndpoint(base_url, model, api_key, timeout, max_tokens)
        self.rationale, self.max_retries, self.max_workers = rationale, max_retries, max_workers

    def _post(self, messages: list[dict[str, str]]) -> str:
        """One HTTP attempt; the reply's text, or RequestFailed with the reason."""
        content = self.endpoint.message(messages).get("content")
        if not isinstance(content, str):
            raise RequestFailed(f"response from {self.endpoint.url} has no text content", False)
        return content

    def _round(self, question: str, candidate: str, reference: str, position: Literal["A", "B"]) -> Round:
        if position == "A":
            messages = judge_messages(question, candidate, reference, self.rationale)
        else:
            messages = judge_messages(question, reference, candidate, self.rationale)
        record = Round(candidate_position=position, messages=messages)
        for attempt in range(self.max_retries + 1):
            record.attempts = attempt + 1
            try:
                record.reply = self._post(messages)
                record.error = None
                break
            except RequestFailed as err:
                record.error = err.reason
                if not err.retryable or attempt == self.max_retries:
                    return record
                time.sleep(min(0.25 * 2**attempt, 4.0))
        assert record.reply is not None
        record.choice = parse_verdict(record.reply)
        if record.choice is None:
            record.error = "unparseable reply: no final `Verdict: A|B|tie` line"
        return record

    def compare(self, question: str, candidate: str, reference: str) -> Verdict:
        """Judge ``candidate`` against ``reference`` in both orders and combine the rounds."""
        rounds = [self._round(question, candidate, reference, pos) for pos in ("A", "B")]
        points = [r.candidate_points for r in rounds if r.candidate_points is not None]
        score = sum(points) / len(points) if points else None
        return Verdict(
            score=score,
            rounds=rounds,
            position_consistent=len(points) == 2 and points[0] == points[1],
            failures=sum(r.choice is None for r in rounds),
        )


def judge_reward(judge: Judge, failure_reward: float | None = None) -> Callable[..., list[float]]:
    """A reward function ``reward(prompts, completions, **meta)`` scoring each sample with
    ``judge.compare(prompt, meta["content"], meta["answer"])`` on ``judge.max_workers`` threads.

    A sample without a verdict (both rounds failed) raises ``JudgeError``, unless
    ``failure_reward`` is set, which it then gets. ``reward.failures`` counts failed rounds and
    ``reward.unscored`` samples without a verdict, over all calls; ``reward.last_verdicts`` holds
    the verdicts of the latest call.
    """
    lock = threading.Lock()

    def reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
        candidates = meta.get("content", completions)
        answers = meta["answer"]
        if not (len(prompts) == len(candidates) == len(answers)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(candidates)} candidates and {len(answers)} answers"
            )
        jobs = list(zip(prompts, candidates, answers, strict=True))
        if len(jobs) <= 1 or judge.max_workers == 1:
            verdicts = [judge.compare(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(min(judge.max_workers, len(jobs)), "judge") as pool:
                verdicts = list(pool.map(lambda job: judge.compare(*job), jobs))
        missing = [i for i, v in enumerate(verdicts) if v.score is None]
        with lock:
            reward.failures += sum(v.failures for v in verdicts)  # type: ignore[attr-defined]
            reward.unscored += len(missing)  # type: ignore[attr-defined]
            reward.last_verdicts = verdicts  # type: ignore[attr-defined]
        if missing and failure_reward is None:
            first = verdicts[missing[0]].rounds[-1].error
            raise JudgeError(
                f"the judge gave no verdict for {len(missing)} of {len(verdicts)} samples "
                f"(first: sample {missing[0]}, {first}); pass failure_reward to score them instead"
            )
        return [failure_reward if v.score is None else v.score for v in verdicts]  # type: ignore[misc]

    reward.failures = 0  # type: ignore[attr-defined]
    reward.unscored = 0  # type: ignore[attr-defined]
    reward.last_verdicts = []  # type: ignore[attr-defined]
    return reward
